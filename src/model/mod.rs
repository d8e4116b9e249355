//! The Snapshot: everything the query path may read, immutable once built.
//!
//! Owns: the zone's name tree compiled from the config (built once per
//! config) and the per-service answers compiled from the config plus the
//! current health (rebuilt by the publisher on every change). Pure data and
//! pure functions; no sockets, no tasks, no hickory server types.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use hickory_proto::rr::rdata::{NS, SOA};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use serde::Serialize;

use crate::config::{Config, Override};
use crate::geo::GeoDb;
use crate::health::Status;
use crate::metrics::QueryTable;

pub mod rollout;
mod service;
mod strategy;
pub mod wire;

pub use service::{
    Candidate, ClassAnswer, ClassView, Counters, Decision, Drawn, EndpointInput, Lines,
    RegionInputs, RegionLoad, RegionShare, ResidencyIndex, ServiceAnswer, ServiceView, address_key,
    lists, service_answer, service_answer_for,
};

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
    /// The SOA with TTL 0, for residency refusals: resolvers cache a
    /// negative answer for every client (RFC 7871 7.4), so it must not stick.
    pub soa_uncached: Record,
    /// A/AAAA of in-zone name servers, for the additional section of NS answers.
    pub glue: Vec<Record>,
    pub names: HashMap<LowerName, Node>,
    pub has_wildcards: bool,
}

/// Health of one endpoint as the publisher last saw it.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointView {
    pub region: String,
    pub target: String,
    pub probe: String,
    pub status: Status,
    /// The status of each health probe layer (`alive`, and `models`,
    /// `completion` when probed): the endpoint is fit only if all are up.
    pub layers: std::collections::BTreeMap<&'static str, Status>,
    pub drained: bool,
    /// Models the endpoint lists (when its model list is probed).
    pub models: Option<Vec<String>>,
    /// Out of answers after a 429, until its cool-down ends.
    pub cooling: bool,
    /// Smoothed completion time, else probe time, in ms.
    pub latency_ms: Option<f64>,
    pub last_error: Option<String>,
    /// Why the last status is not trusted: a probe layer sent no result for
    /// longer than 3 x interval + timeout (the endpoint is unfit meanwhile).
    pub silent: Option<String>,
    /// A probe that is not being sent, and why (`completion probe skipped:
    /// region full`).
    pub skipped: Option<String>,
    /// When the status last changed (seconds since the Unix epoch).
    pub since_unix_s: Option<u64>,
    /// How the fleet decided `status` (with a fleet quorum).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quorum: Option<crate::fleet::EndpointQuorum>,
}

/// Everything the query path reads, swapped in whole.
#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    /// Unique to this snapshot in the process ([`Snapshot::next_id`]; 0
    /// for a scratch one): what the query path's memory of decisions is
    /// keyed by, so that nothing decided on one snapshot answers from
    /// another (generations repeat across publishers in one process).
    pub id: u64,
    pub built: SystemTime,
    pub zone: Arc<Zone>,
    /// By service index; a build shares the unchanged ones with the
    /// snapshot before it.
    pub services: Vec<Arc<ServiceAnswer>>,
    pub service_views: Vec<Arc<ServiceView>>,
    pub endpoints: Vec<EndpointView>,
    /// Regions an operator has drained, by id.
    pub drained: Vec<String>,
    /// Query counters by (service, qtype, rcode).
    pub queries: Arc<QueryTable>,
    /// NSID to send when a query asks for it (RFC 5001).
    pub nsid: Option<Vec<u8>>,
    /// Who may ask `_explain.<service>`.
    pub explain_acl: Arc<Vec<ipnet::IpNet>>,
    /// How clients are located.
    pub geo: GeoView,
    /// (region id, utilisation, GPUs) for status.
    pub region_loads: Vec<(String, Option<f64>, f64)>,
    /// Response rate limiting of UDP answers; `None` when off.
    pub rrl: Option<Arc<crate::config::RateLimit>>,
    /// With a fleet: the seed of the weighted choices, which then depend
    /// on the client subnet only (every edge chooses alike).
    pub choice_seed: Option<u64>,
    /// Answers already encoded, for the query path to copy (empty: every
    /// query takes the general path).
    pub wire: wire::Wire,
}

/// An id never given before in this process, never 0: what the query
/// path's per-thread memories key snapshots and GeoIP views by.
fn unique_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Snapshot {
    /// A snapshot id never given before in this process, never 0.
    pub fn next_id() -> u64 {
        unique_id()
    }
}

/// Everything needed to locate a client.
#[derive(Debug, Clone, Default)]
pub struct GeoView {
    /// Unique to this view in the process ([`unique_id`], shared with
    /// snapshots; 0 for a default one): what the query path's memory of
    /// located subnets is keyed by.
    pub id: u64,
    pub db: Option<Arc<GeoDb>>,
    /// Longest prefix first.
    pub overrides: Arc<Vec<Override>>,
    pub ecs: bool,
    pub max_prefix_v4: u8,
    pub max_prefix_v6: u8,
}

impl GeoView {
    /// The view of `db`, `overrides` and the config's `[geo]` settings. It
    /// keeps the `id` of `previous` when it locates every client the same
    /// way (the same database and override list, the same settings: a
    /// health change), and gets a new one otherwise (never 0, never given
    /// twice in a process), so that what the query path remembers of
    /// located subnets outlives health changes but never a reload or a
    /// database swap.
    pub fn new(
        db: Option<Arc<GeoDb>>,
        overrides: Arc<Vec<Override>>,
        config: &Config,
        previous: Option<&GeoView>,
    ) -> GeoView {
        let mut view = GeoView {
            id: 0,
            db,
            overrides,
            ecs: config.geo.ecs,
            max_prefix_v4: config.geo.max_prefix_v4,
            max_prefix_v6: config.geo.max_prefix_v6,
        };
        view.id = match previous {
            Some(p) if p.id != 0 && p.locates_as(&view) => p.id,
            _ => unique_id(),
        };
        view
    }

    fn locates_as(&self, other: &GeoView) -> bool {
        let same_db = match (&self.db, &other.db) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        same_db
            && Arc::ptr_eq(&self.overrides, &other.overrides)
            && (self.ecs, self.max_prefix_v4, self.max_prefix_v6)
                == (other.ecs, other.max_prefix_v4, other.max_prefix_v6)
    }
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
        let mut soa_uncached = soa.clone();
        soa_uncached.ttl = 0;

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
            soa_uncached,
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

/// The name of a record as text without the trailing dot, for logs.
pub fn display_name(name: &Name) -> String {
    name.to_ascii().trim_end_matches('.').to_string()
}
