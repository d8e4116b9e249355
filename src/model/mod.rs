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
use crate::metrics::QueryTable;

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
    /// `inferdns_dns_answers_total{service, region}` of the regions answered.
    pub answered: Vec<prometheus::IntCounter>,
    /// Lines of the `_explain` TXT answer (without the client line).
    pub explain: Vec<String>,
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
    /// Region ids in the answer, each with its share of the answered endpoints.
    pub regions: Vec<RegionShare>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegionShare {
    pub region: String,
    pub share: f64,
}

/// Health of one endpoint as the publisher last saw it.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointView {
    pub region: String,
    pub target: String,
    pub probe: String,
    pub status: Status,
    pub drained: bool,
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
    /// Regions an operator has drained, by id.
    pub drained: Vec<String>,
    /// Query counters by (service, qtype, rcode).
    pub queries: Arc<QueryTable>,
    /// NSID to send when a query asks for it (RFC 5001).
    pub nsid: Option<Vec<u8>>,
    /// Who may ask `_explain.<service>`.
    pub explain_acl: Arc<Vec<ipnet::IpNet>>,
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

/// What the publisher knows about one endpoint, by global index.
#[derive(Debug, Clone, Copy)]
pub struct EndpointInput<'a> {
    pub status: Status,
    pub last_error: Option<&'a str>,
    /// The endpoint's region is drained by an operator.
    pub drained: bool,
}

impl EndpointInput<'_> {
    fn fit(&self) -> bool {
        self.status == Status::Up && !self.drained
    }

    /// Why the endpoint cannot be answered, if it cannot.
    fn removed_by(&self) -> Option<&'static str> {
        if self.drained {
            Some("drained by an operator")
        } else {
            match self.status {
                Status::Up => None,
                Status::Down => Some("down"),
                Status::Unknown => Some("not probed yet"),
            }
        }
    }
}

/// Chooses the answer of service `service` from the endpoints' states.
/// `answer_counter(region)` gives the metric counted when an answer carries
/// that region (none in tests and benchmarks).
pub fn service_answer(
    config: &Config,
    index: &EndpointIndex,
    service: usize,
    inputs: &[EndpointInput<'_>],
    answer_counter: &dyn Fn(&str, &str) -> Option<prometheus::IntCounter>,
) -> (ServiceAnswer, ServiceView) {
    let s = &config.services[service];
    // (region, target) of the endpoints of `tier` that pass `keep`.
    let pick =
        |tier: &Vec<usize>, keep: &dyn Fn(&EndpointInput<'_>) -> bool| -> Vec<(usize, &Target)> {
            let mut out = Vec::new();
            for &r in tier {
                for (e, endpoint) in config.regions[r].endpoints.iter().enumerate() {
                    if keep(&inputs[index.global(r, e)]) {
                        out.push((r, &endpoint.target));
                    }
                }
            }
            out
        };
    let mut decision = None;
    let mut chosen = Vec::new();
    for (t, tier) in s.tiers.iter().enumerate() {
        let fit = pick(tier, &|i| i.fit());
        if !fit.is_empty() {
            decision = Some(Decision::Tier { tier: t });
            chosen = fit;
            break;
        }
    }
    let decision = decision.unwrap_or_else(|| match s.when_all_down {
        AllDown::FailOpen => {
            // As if every endpoint were fit, but never a drained one.
            chosen = s
                .tiers
                .iter()
                .map(|tier| pick(tier, &|i| !i.drained))
                .find(|c| !c.is_empty())
                .unwrap_or_default();
            Decision::FailOpen
        }
        AllDown::NoData => Decision::NoData,
        AllDown::ServFail => Decision::ServFail,
    });

    let mut answer = ServiceAnswer {
        servfail: decision == Decision::ServFail,
        ..ServiceAnswer::default()
    };
    for (_, target) in &chosen {
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
    let mut answered_regions: Vec<usize> = chosen.iter().map(|(r, _)| *r).collect();
    if answer.a.is_empty() && answer.aaaa.is_empty() {
        let first_cname = chosen.iter().find_map(|(r, t)| match t {
            Target::Cname(name) => Some((*r, name.clone())),
            Target::Address(_) => None,
        });
        answered_regions = first_cname.iter().map(|(r, _)| *r).collect();
        answer.cname = first_cname
            .map(|(_, name)| Record::from_rdata(s.name.clone(), s.ttl, RData::CNAME(CNAME(name))));
    }
    answered_regions.sort_unstable();
    answered_regions.dedup();
    answer.answered = answered_regions
        .iter()
        .filter_map(|&r| answer_counter(&s.id, &config.regions[r].id))
        .collect();
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

    // The explanation: every candidate, the stage that removed it, the choice.
    let mut explain = vec![format!(
        "service {} ({}), ttl {}",
        display_name(&s.name),
        s.id,
        s.ttl
    )];
    let winning_tier = match decision {
        Decision::Tier { tier } => Some(tier),
        _ => None,
    };
    for (t, tier) in s.tiers.iter().enumerate() {
        for &r in tier {
            for (e, endpoint) in config.regions[r].endpoints.iter().enumerate() {
                let input = &inputs[index.global(r, e)];
                let status = match input.status {
                    Status::Up => "up",
                    Status::Down => "down",
                    Status::Unknown => "unknown",
                };
                let error = input
                    .last_error
                    .map(|e| format!(", last error: {e}"))
                    .unwrap_or_default();
                let verdict = match (input.removed_by(), winning_tier) {
                    (Some(why), _) => format!("removed at eligible: {why}"),
                    (None, Some(w)) if t == w => "kept".to_string(),
                    (None, Some(_)) => "not used: a better tier is fit".to_string(),
                    (None, None) => "kept".to_string(),
                };
                explain.push(format!(
                    "tier {t} region {} endpoint {}: {status}{error} -> {verdict}",
                    config.regions[r].id, endpoint.target
                ));
            }
        }
    }
    let result = match decision {
        Decision::Tier { tier } => format!("decision: tier {tier} -> {}", shown.join(" ")),
        Decision::FailOpen => format!("decision: nothing fit, fail-open -> {}", shown.join(" ")),
        Decision::NoData => "decision: nothing fit -> NODATA".to_string(),
        Decision::ServFail => "decision: nothing fit -> SERVFAIL".to_string(),
    };
    explain.push(result);
    answer.explain = explain;

    let answered_endpoints = chosen.len().max(1) as f64;
    let regions = answered_regions
        .iter()
        .map(|&r| RegionShare {
            region: config.regions[r].id.clone(),
            share: if answer.cname.is_some() {
                1.0
            } else {
                chosen.iter().filter(|(cr, _)| *cr == r).count() as f64 / answered_endpoints
            },
        })
        .collect();
    let view = ServiceView {
        id: s.id.clone(),
        name: s.name.to_string(),
        decision,
        answer: shown,
        regions,
    };
    (answer, view)
}

/// The name of a record as text without the trailing dot, for logs.
pub fn display_name(name: &Name) -> String {
    name.to_ascii().trim_end_matches('.').to_string()
}
