//! The Snapshot: everything the query path may read, immutable once built.
//!
//! Owns: the zone's name tree compiled from the config (built once per
//! config) and the per-service answers compiled from the config plus the
//! current health (rebuilt by the publisher on every change). Pure data and
//! pure functions; no sockets, no tasks, no hickory server types.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, SOA};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use serde::Serialize;

use crate::config::{AllDown, Config, Target};
use crate::health::Status;

/// What exists at one name of the zone.
#[derive(Debug)]
pub enum Node {
    /// Records from the zone file (and the apex SOA/NS, glue), grouped by type.
    Static(Vec<RrSet>),
    /// A service name; its answer lives in `Snapshot::services[index]`.
    Service(usize),
    /// A name with no records but with names below it (RFC 8020: not NXDOMAIN).
    EmptyNonTerminal,
}

#[derive(Debug)]
pub struct RrSet {
    pub rtype: RecordType,
    pub records: Vec<Record>,
}

/// The static part of a snapshot: built once per config.
#[derive(Debug)]
pub struct Zone {
    pub apex: LowerName,
    pub soa: Record,
    /// The SOA with TTL min(SOA TTL, MINIMUM) for negative answers (RFC 2308 §3).
    pub soa_negative: Record,
    /// A/AAAA of in-zone name servers, for the additional section of NS answers.
    pub glue: Vec<Record>,
    pub names: HashMap<LowerName, Node>,
    pub has_wildcards: bool,
}

/// The answer a service gives right now.
#[derive(Debug, Default, Clone)]
pub struct ServiceAnswer {
    pub a: Vec<Record>,
    pub aaaa: Vec<Record>,
    pub cname: Option<Record>,
    /// The service's all-down rule says SERVFAIL.
    pub servfail: bool,
}

/// Why a service answers what it answers (for status and logs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum Decision {
    /// Tier `tier` (0 = best) has fit endpoints.
    Tier { tier: usize },
    /// Nothing is fit; answering the first tier as if it were.
    FailOpen,
    /// Nothing is fit; answering NODATA.
    NoData,
    /// Nothing is fit; answering SERVFAIL.
    ServFail,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceView {
    pub id: String,
    pub name: String,
    pub decision: Decision,
    pub answer: Vec<String>,
}

/// Health of one endpoint as the publisher last saw it.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointView {
    pub region: String,
    pub target: String,
    pub probe: String,
    pub status: Status,
    pub last_error: Option<String>,
    /// When the status last changed (seconds since the Unix epoch).
    pub since_unix_s: Option<u64>,
}

/// Everything the query path reads, swapped in whole.
#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub built: SystemTime,
    pub zone: Arc<Zone>,
    pub services: Vec<ServiceAnswer>,
    pub service_views: Vec<ServiceView>,
    pub endpoints: Vec<EndpointView>,
}

impl Zone {
    /// Compiles the static name tree. Services become placeholder nodes so
    /// that names above and below them get NODATA / NXDOMAIN right.
    pub fn compile(config: &Config) -> Zone {
        let z = &config.zone;
        let apex = LowerName::new(&z.apex);
        let soa_rdata = SOA::new(
            z.soa.primary.clone(),
            z.soa.contact.clone(),
            z.soa.serial,
            z.soa.refresh as i32,
            z.soa.retry as i32,
            z.soa.expire as i32,
            z.soa.minimum,
        );
        let soa = Record::from_rdata(z.apex.clone(), z.soa.ttl, RData::SOA(soa_rdata));
        let mut soa_negative = soa.clone();
        soa_negative.ttl = z.soa.ttl.min(z.soa.minimum);

        let mut grouped: HashMap<LowerName, Vec<RrSet>> = HashMap::new();
        let mut push = |record: Record| {
            let sets = grouped.entry(LowerName::new(&record.name)).or_default();
            let rtype = record.record_type();
            match sets.iter_mut().find(|s| s.rtype == rtype) {
                Some(set) => set.records.push(record),
                None => sets.push(RrSet {
                    rtype,
                    records: vec![record],
                }),
            }
        };
        push(soa.clone());
        for ns in &z.ns {
            push(Record::from_rdata(
                z.apex.clone(),
                z.soa.ttl,
                RData::NS(NS(ns.clone())),
            ));
        }
        let mut glue = Vec::new();
        for record in &z.records {
            if z.ns
                .iter()
                .any(|n| LowerName::new(n) == LowerName::new(&record.name))
                && matches!(record.data, RData::A(_) | RData::AAAA(_))
            {
                glue.push(record.clone());
            }
            push(record.clone());
        }

        let mut names: HashMap<LowerName, Node> = grouped
            .into_iter()
            .map(|(name, mut sets)| {
                // A stable order: ANY answers the first set, so make it the same every time.
                sets.sort_by_key(|s| u16::from(s.rtype));
                (name, Node::Static(sets))
            })
            .collect();
        for (i, service) in config.services.iter().enumerate() {
            names.insert(LowerName::new(&service.name), Node::Service(i));
        }
        // Every ancestor of a name, down to the apex, exists.
        let owners: Vec<LowerName> = names.keys().cloned().collect();
        let mut has_wildcards = false;
        for owner in owners {
            has_wildcards |= owner.is_wildcard();
            let mut name = owner.base_name();
            while apex.zone_of(&name) && name != apex {
                names.entry(name.clone()).or_insert(Node::EmptyNonTerminal);
                name = name.base_name();
            }
        }
        Zone {
            apex,
            soa,
            soa_negative,
            glue,
            names,
            has_wildcards,
        }
    }
}

/// Maps (region, endpoint within region) to a global endpoint index.
#[derive(Debug, Clone)]
pub struct EndpointIndex {
    offsets: Vec<usize>,
    total: usize,
}

impl EndpointIndex {
    pub fn new(config: &Config) -> Self {
        let mut offsets = Vec::with_capacity(config.regions.len());
        let mut total = 0;
        for region in &config.regions {
            offsets.push(total);
            total += region.endpoints.len();
        }
        Self { offsets, total }
    }

    pub fn global(&self, region: usize, endpoint: usize) -> usize {
        self.offsets[region] + endpoint
    }

    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

/// Chooses the answer of service `index` from the endpoints' statuses.
pub fn service_answer(
    config: &Config,
    index: &EndpointIndex,
    service: usize,
    status: &[Status],
) -> (ServiceAnswer, ServiceView) {
    let s = &config.services[service];
    let fit_in = |tier: &Vec<usize>, all: bool| -> Vec<&Target> {
        let mut out = Vec::new();
        for &r in tier {
            for (e, endpoint) in config.regions[r].endpoints.iter().enumerate() {
                if all || status[index.global(r, e)] == Status::Up {
                    out.push(&endpoint.target);
                }
            }
        }
        out
    };
    let mut decision = None;
    let mut targets = Vec::new();
    for (t, tier) in s.tiers.iter().enumerate() {
        let fit = fit_in(tier, false);
        if !fit.is_empty() {
            decision = Some(Decision::Tier { tier: t });
            targets = fit;
            break;
        }
    }
    let decision = decision.unwrap_or_else(|| match s.when_all_down {
        AllDown::FailOpen => {
            targets = s.tiers.first().map(|t| fit_in(t, true)).unwrap_or_default();
            Decision::FailOpen
        }
        AllDown::NoData => Decision::NoData,
        AllDown::ServFail => Decision::ServFail,
    });

    let mut answer = ServiceAnswer {
        servfail: decision == Decision::ServFail,
        ..ServiceAnswer::default()
    };
    for target in &targets {
        match target {
            Target::Address(std::net::IpAddr::V4(v4)) => {
                answer
                    .a
                    .push(Record::from_rdata(s.name.clone(), s.ttl, RData::A(A(*v4))))
            }
            Target::Address(std::net::IpAddr::V6(v6)) => answer.aaaa.push(Record::from_rdata(
                s.name.clone(),
                s.ttl,
                RData::AAAA(AAAA(*v6)),
            )),
            Target::Cname(_) => {}
        }
    }
    // A CNAME stands alone: only when the chosen endpoints have no addresses.
    if answer.a.is_empty() && answer.aaaa.is_empty() {
        let first_cname = targets.iter().find_map(|t| match t {
            Target::Cname(name) => Some(name.clone()),
            Target::Address(_) => None,
        });
        answer.cname = first_cname
            .map(|name| Record::from_rdata(s.name.clone(), s.ttl, RData::CNAME(CNAME(name))));
    }
    let shown: Vec<String> = if let Some(c) = &answer.cname {
        vec![c.data.to_string()]
    } else {
        answer
            .a
            .iter()
            .chain(&answer.aaaa)
            .map(|r| r.data.to_string())
            .collect()
    };
    let view = ServiceView {
        id: s.id.clone(),
        name: s.name.to_string(),
        decision,
        answer: shown,
    };
    (answer, view)
}

/// The name of a record as text without the trailing dot, for logs.
pub fn display_name(name: &Name) -> String {
    name.to_ascii().trim_end_matches('.').to_string()
}
