//! A service's answers, precomputed per residency class when a snapshot is
//! built; only the proximity choice among candidate regions is left for the
//! query.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{RData, Record};
use serde::Serialize;

use super::{EndpointIndex, display_name};
use crate::capacity::{self, Level, Shed};
use crate::config::{AllDown, Allowed, Config, Residency, Strategy, Target};
use crate::geo::Code;
use crate::health::Status;

/// What the publisher knows about one endpoint, by global index.
#[derive(Debug, Clone, Copy)]
pub struct EndpointInput<'a> {
    /// L1: alive.
    pub status: Status,
    pub last_error: Option<&'a str>,
    /// The endpoint's region is drained by an operator.
    pub drained: bool,
    /// Seconds left of a 429 cool-down.
    pub cooling_s: Option<f64>,
    /// L2: the models it serves (empty while its model list fails); `None`
    /// when the model list is not probed (then any model is assumed).
    pub models: Option<&'a [String]>,
    /// The synthetic completion passes (or is not configured).
    pub completion_ok: bool,
    /// The model the completion probe asks for.
    pub completion_model: Option<&'a str>,
    /// Slow-start share, 0.1..=1.
    pub slow_start: f64,
    /// Smoothed completion time, else probe time, in ms.
    pub latency_ms: Option<f64>,
    /// A probe layer has sent no result for longer than its silence limit
    /// (its task is dead or stuck): why the last state is not trusted.
    pub silent: Option<&'a str>,
    /// A layer above alive (model list, completion) has no first result yet.
    pub layers_pending: bool,
    /// How long ago the endpoint was last fit on every layer it is probed
    /// on (zero while it is); `None` if it never was since it is watched.
    pub fit_ago: Option<Duration>,
    /// The last model list read, kept while that probe fails; `None` when
    /// the model list is not probed.
    pub last_models: Option<&'a [String]>,
}

impl EndpointInput<'_> {
    /// Not probed yet (alive, or alive and up but a layer above it not yet),
    /// and still within its first probes' time: nothing is known about it,
    /// so it is neither answered nor failed open to, nor a reason for a
    /// fallback.
    fn unprobed(&self) -> bool {
        let unknown = match self.status {
            Status::Unknown => true,
            Status::Up => self.layers_pending,
            Status::Down => false,
        };
        unknown && self.silent.is_none()
    }

    fn fit(&self, model: Option<&str>) -> bool {
        self.removed_by(model).is_none()
    }

    /// How long ago the endpoint was last fit for `model`: it was fit (so
    /// it was probed), and its last model list has the model.
    fn last_fit(&self, model: Option<&str>) -> Option<Duration> {
        if let (Some(model), Some(models)) = (model, self.last_models)
            && !models.iter().any(|m| m == model)
        {
            return None;
        }
        self.fit_ago
    }

    /// Why the endpoint cannot be answered for `model`, if it cannot.
    fn removed_by(&self, model: Option<&str>) -> Option<String> {
        if self.drained {
            return Some("drained by an operator".into());
        }
        if let Some(why) = self.silent {
            return Some(why.to_string());
        }
        match self.status {
            Status::Up => {}
            Status::Down => return Some("down".into()),
            Status::Unknown => return Some("not probed yet".into()),
        }
        if let Some(left) = self.cooling_s {
            return Some(format!("rate limited, cooling down ({left:.0} s left)"));
        }
        if let (Some(model), Some(models)) = (model, self.models)
            && !models.iter().any(|m| m == model)
        {
            return Some(format!("model {model} not listed"));
        }
        // A failing completion speaks for its own model only.
        let same_model = match (model, self.completion_model) {
            (Some(m), Some(c)) => m == c,
            _ => true,
        };
        if !self.completion_ok && same_model {
            return Some("synthetic completion failing".into());
        }
        None
    }

    /// Share of answers: slow start times the L3 penalty.
    fn weight(&self, max_latency_ms: Option<f64>) -> f64 {
        let degraded = match (max_latency_ms, self.latency_ms) {
            (Some(max), Some(l)) if l > max => DEGRADED_SHARE,
            _ => 1.0,
        };
        self.slow_start * degraded
    }
}

/// What the publisher knows about a region's capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RegionLoad {
    /// Utilisation 0..1; `None` when unknown or expired (static weight).
    pub util: Option<f64>,
    pub gpus: f64,
    pub base: f64,
    pub cost: Option<f64>,
}

/// Per-region inputs of one service's answer.
#[derive(Debug, Clone, Copy)]
pub struct RegionInputs<'a> {
    /// Measured latency of each region, in ms (proximity).
    pub latency_ms: &'a [f64],
    pub loads: &'a [RegionLoad],
    /// This service's regions (by region index) and, beside them, its
    /// shedding level of each (a region not listed is at the normal level).
    pub regions: &'a [usize],
    pub levels: &'a [Level],
    /// The TTL to answer with now (adaptive TTL).
    pub ttl: u32,
}

impl RegionInputs<'_> {
    /// This service's shedding level of region `r`.
    pub fn level(&self, r: usize) -> Level {
        self.regions
            .iter()
            .position(|x| *x == r)
            .and_then(|at| self.levels.get(at).copied())
            .unwrap_or(Level::Normal)
    }

    /// Capacity weight of region `r` (headroom x size x base, shed by level).
    pub fn weight(&self, r: usize) -> f64 {
        let l = &self.loads[r];
        capacity::weight(l.base, l.gpus, l.util, self.level(r))
    }
}

/// Endpoints to draw per query, with their weights.
#[derive(Debug, Default, Clone)]
pub struct Drawn {
    /// (record, weight, stable key) per family.
    pub a: Vec<(Record, f64, u64)>,
    pub aaaa: Vec<(Record, f64, u64)>,
    pub records: usize,
    pub sticky: bool,
    /// `inferdns_dns_answers_total` of the region of each entry, by family.
    pub a_counters: Vec<Option<prometheus::IntCounter>>,
    pub aaaa_counters: Vec<Option<prometheus::IntCounter>>,
}

/// A stable key of an address for rendezvous hashing.
pub fn address_key(ip: &IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => u64::from(u32::from(*v4)),
        IpAddr::V6(v6) => {
            let bits = u128::from(*v6);
            (bits as u64) ^ ((bits >> 64) as u64)
        }
    }
}

/// Share of answers of an endpoint whose latency is above the service's
/// `max-latency` (degraded, not removed).
pub const DEGRADED_SHARE: f64 = 0.25;

/// Why a class of clients gets what it gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum Decision {
    /// Tier `tier` (0 = best) has fit endpoints.
    Tier { tier: usize },
    /// Nothing is fit; answering the first tier as if it were.
    FailOpen,
    /// Nothing is fit, but the endpoints fit last went unfit together
    /// (within one probe cycle of each other) less than the service's
    /// `last-known-good` hold ago: answering those of tier `tier` (the best
    /// tier among them) for `hold_left_ms` more (when the snapshot was
    /// built), then the `when-all-down` rule `then`.
    LastKnownGood {
        tier: usize,
        hold_left_ms: u64,
        then: &'static str,
    },
    /// Nothing is fit; answering NODATA.
    NoData,
    /// Nothing is fit; answering SERVFAIL.
    ServFail,
    /// Nothing is fit because endpoints have no probe result yet (just
    /// started or added): SERVFAIL, so the resolver asks another edge.
    /// Fail-open applies only to endpoints known to be down.
    Unprobed,
    /// Nothing these clients may be sent to is fit: NODATA, never elsewhere.
    ResidencyNoData,
    /// No region can serve this service's model: CNAME to the fallback.
    Fallback { service: String },
}

impl Decision {
    /// The decision's name, as the `state` of the status JSON.
    pub fn state(&self) -> &'static str {
        match self {
            Decision::Tier { .. } => "tier",
            Decision::FailOpen => "fail-open",
            Decision::LastKnownGood { .. } => "last-known-good",
            Decision::NoData => "no-data",
            Decision::ServFail => "serv-fail",
            Decision::Unprobed => "unprobed",
            Decision::ResidencyNoData => "residency-no-data",
            Decision::Fallback { .. } => "fallback",
        }
    }

    /// The tier answered from, if any.
    pub fn tier(&self) -> Option<u64> {
        match self {
            Decision::Tier { tier } | Decision::LastKnownGood { tier, .. } => Some(*tier as u64),
            _ => None,
        }
    }

    /// The same choice, whatever is left of a last-known-good hold: what
    /// "the answer changed" means for logs.
    pub fn same_choice(&self, other: &Decision) -> bool {
        match (self, other) {
            (Decision::LastKnownGood { tier: a, .. }, Decision::LastKnownGood { tier: b, .. }) => {
                a == b
            }
            (a, b) => a == b,
        }
    }

    pub fn is_last_known_good(&self) -> bool {
        matches!(self, Decision::LastKnownGood { .. })
    }
}

/// The endpoints answered as last known good, with the hold.
struct LastGood {
    tier: usize,
    /// (region, endpoint) indexes.
    endpoints: Vec<(usize, usize)>,
    /// Since the last of them went unfit.
    ago: Duration,
    left: Duration,
}

/// Last known good for one class of clients: when nothing is fit, the
/// endpoints (of regions `allowed` for the class) that went unfit last,
/// together with those that went unfit less than one probe cycle
/// (`interval + timeout`) before them, are answered while the last one went
/// unfit less than the service's hold ago; of them, the best tier only, and
/// never one drained or rate limited since (a 429 asks us to back off).
fn last_known_good(
    config: &Config,
    index: &EndpointIndex,
    service: usize,
    inputs: &[EndpointInput<'_>],
    allowed: &Allowed,
) -> Option<LastGood> {
    let s = &config.services[service];
    let hold = s.last_known_good;
    let model = s.model.as_deref();
    // (tier, region, endpoint, last fit ago)
    let mut candidates = Vec::new();
    for (t, tier) in s.tiers.iter().enumerate() {
        for &r in tier {
            if !allows(allowed, &config.regions[r].jurisdictions) {
                continue;
            }
            for e in 0..config.regions[r].endpoints.len() {
                if let Some(ago) = inputs[index.global(r, e)].last_fit(model) {
                    candidates.push((t, r, e, ago));
                }
            }
        }
    }
    let latest = candidates.iter().map(|c| c.3).min()?;
    if latest >= hold {
        return None;
    }
    let cycle = |r: usize, e: usize| {
        let p = &config.regions[r].endpoints[e].probe;
        p.interval + p.timeout
    };
    candidates.retain(|&(_, r, e, ago)| {
        let input = &inputs[index.global(r, e)];
        ago - latest <= cycle(r, e) && !input.drained && input.cooling_s.is_none()
    });
    let tier = candidates.iter().map(|c| c.0).min()?;
    Some(LastGood {
        tier,
        endpoints: candidates
            .iter()
            .filter(|c| c.0 == tier)
            .map(|&(_, r, e, _)| (r, e))
            .collect(),
        ago: latest,
        left: hold - latest,
    })
}

/// A region the proximity strategy may choose for a client.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub region: String,
    pub coords: (f64, f64),
    /// `coords` on the globe, for the query path's distances.
    pub point: crate::geo::Point,
    /// What this edge measures for the region (probe time), in ms.
    pub latency_ms: f64,
    pub a: Vec<Record>,
    pub aaaa: Vec<Record>,
    /// Shares of `a` / `aaaa` (slow start, degraded); empty when all are full.
    pub a_weights: Vec<f64>,
    pub aaaa_weights: Vec<f64>,
    pub answered: Option<prometheus::IntCounter>,
}

/// The answer for one residency class (or the only one).
#[derive(Debug, Default, Clone)]
pub struct ClassAnswer {
    pub a: Vec<Record>,
    pub aaaa: Vec<Record>,
    /// Share of answers of each record of `a` / `aaaa` (slow start, degraded);
    /// empty when every record is in every answer.
    pub a_weights: Vec<f64>,
    pub aaaa_weights: Vec<f64>,
    pub cname: Option<Record>,
    /// The service's all-down rule says SERVFAIL.
    pub servfail: bool,
    /// Residency left nothing to answer.
    pub refused: bool,
    /// `inferdns_dns_answers_total{service, region}` of the regions answered.
    pub answered: Vec<prometheus::IntCounter>,
    /// Proximity: the fit regions of the winning tier (two or more).
    pub candidates: Vec<Candidate>,
    /// Capacity: endpoints drawn per query by weight.
    pub drawn: Option<Drawn>,
    /// Failover while the winning tier is ramping up (slow start) or
    /// degraded: the share of answers that goes to the next fit tier instead.
    pub spill: f64,
    pub spill_a: Vec<Record>,
    pub spill_aaaa: Vec<Record>,
    pub spill_answered: Vec<prometheus::IntCounter>,
    /// Lines of the `_explain` TXT answer (without the client lines).
    pub explain: Vec<String>,
}

/// Which residency class a located client is in.
#[derive(Debug, Clone, Default)]
pub struct ResidencyIndex {
    /// Codes named by a rule, directly or through a group (the `eu` list too).
    pub by_country: HashMap<Code, usize>,
    pub by_continent: HashMap<Code, usize>,
    /// The first rule naming the group `eu`: it also holds clients the
    /// database flags `is_in_european_union`, whatever their code.
    pub eu: Option<usize>,
    pub otherwise: usize,
    pub unknown: usize,
    pub without_ecs_unknown: bool,
}

impl ResidencyIndex {
    fn new(r: &Residency) -> Self {
        let mut index = ResidencyIndex {
            otherwise: r.rules.len(),
            unknown: r.rules.len() + 1,
            without_ecs_unknown: r.without_ecs_unknown,
            eu: r.rules.iter().position(|rule| rule.eu),
            ..ResidencyIndex::default()
        };
        for (i, rule) in r.rules.iter().enumerate() {
            for c in &rule.countries {
                index.by_country.entry(*c).or_insert(i);
            }
            for c in &rule.continents {
                index.by_continent.entry(*c).or_insert(i);
            }
        }
        index
    }

    /// The class of a client: by its country code (named directly or
    /// through a group), then by the database's EU flag (`eu`: the client is
    /// in the group `eu` though its code is not on the list), then by
    /// continent, else `otherwise`. A client without a country is `unknown`
    /// unless the database flags it EU.
    pub fn class(&self, country: Option<Code>, continent: Option<Code>, eu: bool) -> usize {
        let flagged = || self.eu.filter(|_| eu);
        match country {
            None => flagged().unwrap_or(self.unknown),
            Some(c) => self
                .by_country
                .get(&c)
                .copied()
                .or_else(flagged)
                .or_else(|| continent.and_then(|k| self.by_continent.get(&k).copied()))
                .unwrap_or(self.otherwise),
        }
    }
}

/// A service's answers.
#[derive(Debug, Default, Clone)]
pub struct ServiceAnswer {
    /// The answer depends on where the client is (ECS scope is echoed).
    pub located: bool,
    pub residency: Option<ResidencyIndex>,
    /// One per residency class (rules, otherwise, unknown), or just one.
    pub classes: Vec<ClassAnswer>,
    /// Proximity band in ms, when the strategy is proximity.
    pub tolerance_ms: Option<f64>,
    /// `inferdns_residency_refusals_total{service}`.
    pub refusals: Option<prometheus::IntCounter>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegionShare {
    pub region: String,
    pub share: f64,
}

/// One class of a service, for status.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassView {
    pub clients: String,
    pub allowed: String,
    pub decision: Decision,
    pub answer: Vec<String>,
    /// Region ids in the answer, each with its share of the answered endpoints.
    pub regions: Vec<RegionShare>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceView {
    pub id: String,
    pub name: String,
    pub strategy: &'static str,
    /// When load alone takes a region out of this service's answers.
    pub shed: Shed,
    /// The answer for clients no residency rule names (or for everyone).
    pub decision: Decision,
    pub answer: Vec<String>,
    pub regions: Vec<RegionShare>,
    /// Per residency class, when the service has residency rules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub residency: Option<Vec<ClassView>>,
}

/// Metric handles a service answer carries; none in tests and benchmarks.
pub trait Counters {
    fn answer(&self, service: &str, region: &str) -> Option<prometheus::IntCounter>;
    fn refusal(&self, service: &str) -> Option<prometheus::IntCounter>;
}

impl Counters for () {
    fn answer(&self, _: &str, _: &str) -> Option<prometheus::IntCounter> {
        None
    }
    fn refusal(&self, _: &str) -> Option<prometheus::IntCounter> {
        None
    }
}

/// Builds service `service`'s answers from the endpoints' states and the
/// regions' measured latency (ms, by region index).
pub fn service_answer(
    config: &Config,
    index: &EndpointIndex,
    service: usize,
    inputs: &[EndpointInput<'_>],
    regions: &RegionInputs<'_>,
    counters: &dyn Counters,
) -> (ServiceAnswer, ServiceView) {
    let s = &config.services[service];
    let classes: Vec<(String, Allowed)> = match &s.residency {
        None => vec![("all clients".into(), Allowed::Any)],
        Some(r) => r
            .rules
            .iter()
            .map(|rule| (rule.label.clone(), rule.allow.clone()))
            .chain([
                ("clients no rule names".into(), r.otherwise.clone()),
                ("clients of unknown location".into(), r.unknown.clone()),
            ])
            .collect(),
    };
    let mut answers = Vec::with_capacity(classes.len());
    let mut views = Vec::with_capacity(classes.len());
    for (label, allowed) in &classes {
        let (answer, view) = class_answer(
            config, index, service, inputs, regions, counters, label, allowed,
        );
        answers.push(answer);
        views.push(view);
    }
    let shown = match &s.residency {
        Some(r) => views[r.rules.len()].clone(),
        None => views[0].clone(),
    };
    let proximity = match s.strategy {
        Strategy::Proximity { tolerance } => Some(tolerance.as_secs_f64() * 1000.0),
        _ => None,
    };
    // Every service has the series (at 0 without residency rules), so that
    // a rate over it exists before the first refusal.
    let refusals = counters.refusal(&s.id);
    let answer = ServiceAnswer {
        located: s.residency.is_some() || proximity.is_some(),
        residency: s.residency.as_ref().map(ResidencyIndex::new),
        classes: answers,
        tolerance_ms: proximity,
        refusals: s.residency.as_ref().and(refusals),
    };
    let view = ServiceView {
        id: s.id.clone(),
        name: s.name.to_string(),
        strategy: strategy_name(s.strategy),
        shed: s.shed,
        decision: shown.decision.clone(),
        answer: shown.answer.clone(),
        regions: shown.regions.clone(),
        residency: s.residency.as_ref().map(|_| views),
    };
    (answer, view)
}

fn strategy_name(strategy: Strategy) -> &'static str {
    match strategy {
        Strategy::Failover => "failover",
        Strategy::Proximity { .. } => "proximity",
        Strategy::Capacity => "capacity",
        Strategy::Cost { .. } => "cost",
    }
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::Normal => "normal",
        Level::Prepare => "prepare",
        Level::Reduce => "reduce",
        Level::Removed => "removed",
    }
}

fn allows(allowed: &Allowed, jurisdictions: &[String]) -> bool {
    match allowed {
        Allowed::Any => true,
        Allowed::Deny => false,
        Allowed::Only(tags) => jurisdictions.iter().any(|j| tags.contains(j)),
    }
}

#[allow(clippy::too_many_arguments)]
fn class_answer(
    config: &Config,
    index: &EndpointIndex,
    service: usize,
    inputs: &[EndpointInput<'_>],
    regions: &RegionInputs<'_>,
    counters: &dyn Counters,
    label: &str,
    allowed: &Allowed,
) -> (ClassAnswer, ClassView) {
    let latency_ms = regions.latency_ms;
    let ttl = regions.ttl;
    let s = &config.services[service];
    let restricted = !matches!(allowed, Allowed::Any);
    let model = s.model.as_deref();
    let max_latency_ms = s.max_latency.map(|d| d.as_secs_f64() * 1000.0);
    // (region, target) of the endpoints of `tier` that pass `keep`, among allowed regions.
    let pick =
        |tier: &Vec<usize>, keep: &dyn Fn(&EndpointInput<'_>) -> bool| -> Vec<(usize, &Target)> {
            let mut out = Vec::new();
            for &r in tier {
                if !allows(allowed, &config.regions[r].jurisdictions) {
                    continue;
                }
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
    // Shedding (the service's `shed` rule): a region whose load reached the
    // rule's level is skipped (its share goes to the other fit regions of
    // the tier, else to the next tier), unless every fit region has.
    let capacity = matches!(s.strategy, Strategy::Capacity);
    let shed = |r: usize| s.shed.removes(regions.level(r));
    let mut all_full = false;
    for (t, tier) in s.tiers.iter().enumerate() {
        let mut fit = pick(tier, &|i| i.fit(model));
        fit.retain(|(r, _)| !shed(*r));
        if !fit.is_empty() {
            decision = Some(Decision::Tier { tier: t });
            chosen = fit;
            break;
        }
    }
    if decision.is_none() && s.shed != Shed::Never {
        for (t, tier) in s.tiers.iter().enumerate() {
            let fit = pick(tier, &|i| i.fit(model));
            if !fit.is_empty() {
                decision = Some(Decision::Tier { tier: t });
                chosen = fit;
                all_full = true;
                break;
            }
        }
    }
    // Cost: the cheapest fit region (any tier) with enough headroom; ties
    // by headroom; none with enough: the one with the most.
    if let Strategy::Cost { min_headroom } = s.strategy {
        let mut best: Option<(usize, usize, f64, f64)> = None; // (tier, region, cost, headroom)
        let mut roomiest: Option<(usize, usize, f64)> = None;
        // Shed regions are candidates only when every fit region is shed.
        let unshed = s
            .tiers
            .iter()
            .flatten()
            .any(|&r| !shed(r) && !pick(&vec![r], &|i| i.fit(model)).is_empty());
        for (t, tier) in s.tiers.iter().enumerate() {
            for &r in tier {
                if pick(&vec![r], &|i| i.fit(model)).is_empty() || (unshed && shed(r)) {
                    continue;
                }
                let headroom = 1.0 - regions.loads[r].util.unwrap_or(0.0);
                let cost = regions.loads[r].cost.unwrap_or(f64::INFINITY);
                if roomiest.is_none_or(|(_, _, h)| headroom > h) {
                    roomiest = Some((t, r, headroom));
                }
                let better =
                    best.is_none_or(|(_, _, c, h)| cost < c || (cost == c && headroom > h));
                if headroom >= min_headroom && better {
                    best = Some((t, r, cost, headroom));
                }
            }
        }
        if let Some((t, r)) = best
            .map(|(t, r, _, _)| (t, r))
            .or(roomiest.map(|(t, r, _)| (t, r)))
        {
            decision = Some(Decision::Tier { tier: t });
            chosen = pick(&vec![r], &|i| i.fit(model));
        }
    }
    // Nothing fit, but what was fit went unfit together a moment ago (an
    // edge whose probes all time out looks like that): the endpoints fit
    // last, for the hold, before any rule below.
    let last_good = decision
        .is_none()
        .then(|| last_known_good(config, index, service, inputs, allowed))
        .flatten();
    if let Some(good) = &last_good {
        chosen = good
            .endpoints
            .iter()
            .map(|&(r, e)| (r, &config.regions[r].endpoints[e].target))
            .collect();
        decision = Some(Decision::LastKnownGood {
            tier: good.tier,
            hold_left_ms: good.left.as_millis().try_into().unwrap_or(u64::MAX),
            then: s.when_all_down.name(),
        });
    }
    let fallback = s.fallback.map(|f| &config.services[f]);
    let decision = match decision {
        Some(d) => d,
        // Not known to be down, only not probed yet: no answer from
        // ignorance; SERVFAIL sends the resolver to another edge. (`pick`
        // keeps to the allowed regions: residency holds here too.)
        None if s
            .tiers
            .iter()
            .any(|tier| !pick(tier, &|i| !i.drained && i.unprobed()).is_empty()) =>
        {
            Decision::Unprobed
        }
        // Residency always wins over fail-open: never outside the allowed set.
        None if restricted => Decision::ResidencyNoData,
        // Model fallback: the other service's name, answered in the same response.
        None if fallback.is_some() => Decision::Fallback {
            service: fallback.map(|f| f.id.clone()).unwrap_or_default(),
        },
        None => match s.when_all_down {
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
        },
    };

    let mut answer = ClassAnswer {
        servfail: matches!(decision, Decision::ServFail | Decision::Unprobed),
        refused: decision == Decision::ResidencyNoData,
        ..ClassAnswer::default()
    };
    if let (Decision::Fallback { .. }, Some(f)) = (&decision, fallback) {
        answer.cname = Some(Record::from_rdata(
            s.name.clone(),
            ttl,
            RData::CNAME(CNAME(f.name.clone())),
        ));
    }
    let record = |target: &IpAddr| match target {
        IpAddr::V4(v4) => Record::from_rdata(s.name.clone(), ttl, RData::A(A(*v4))),
        IpAddr::V6(v6) => Record::from_rdata(s.name.clone(), ttl, RData::AAAA(AAAA(*v6))),
    };
    // The weight of each chosen endpoint, in `chosen` order.
    let weight_of = |r: usize, target: &Target| -> f64 {
        let e = config.regions[r]
            .endpoints
            .iter()
            .position(|e| &e.target == target)
            .unwrap_or(0);
        inputs[index.global(r, e)].weight(max_latency_ms)
    };
    for (r, target) in &chosen {
        if let Target::Address(ip) = target {
            let w = if matches!(
                decision,
                Decision::FailOpen | Decision::LastKnownGood { .. }
            ) {
                1.0
            } else {
                weight_of(*r, target)
            };
            match ip {
                IpAddr::V4(_) => {
                    answer.a.push(record(ip));
                    answer.a_weights.push(w);
                }
                IpAddr::V6(_) => {
                    answer.aaaa.push(record(ip));
                    answer.aaaa_weights.push(w);
                }
            }
        }
    }
    if capacity && !chosen.is_empty() {
        let mut per_region: HashMap<usize, usize> = HashMap::new();
        for (r, _) in &chosen {
            *per_region.entry(*r).or_default() += 1;
        }
        let mut drawn = Drawn {
            records: s.records,
            sticky: s.sticky,
            ..Drawn::default()
        };
        for (r, target) in &chosen {
            let Target::Address(ip) = target else {
                continue;
            };
            let region_weight = if all_full {
                let l = &regions.loads[*r];
                l.base * l.gpus * 0.01
            } else {
                regions.weight(*r)
            };
            let w = region_weight / per_region[r] as f64 * weight_of(*r, target);
            let counter = counters.answer(&s.id, &config.regions[*r].id);
            let entry = (record(ip), w, address_key(ip));
            match ip {
                IpAddr::V4(_) => {
                    drawn.a.push(entry);
                    drawn.a_counters.push(counter);
                }
                IpAddr::V6(_) => {
                    drawn.aaaa.push(entry);
                    drawn.aaaa_counters.push(counter);
                }
            }
        }
        // Nothing has headroom (all at 100%): draw evenly rather than not at all.
        for family in [&mut drawn.a, &mut drawn.aaaa] {
            if family.iter().all(|(_, w, _)| *w <= 0.0) {
                for entry in family.iter_mut() {
                    entry.1 = 1.0;
                }
            }
        }
        answer.drawn = Some(drawn);
    }
    // Failback under slow start: while the best endpoint of the winning tier
    // has less than a full share, the rest goes to the next fit tier rather
    // than all back at once.
    if let (false, Decision::Tier { tier }) = (capacity, &decision) {
        let best = answer
            .a_weights
            .iter()
            .chain(&answer.aaaa_weights)
            .copied()
            .fold(0.0f64, f64::max);
        let next = s
            .tiers
            .iter()
            .skip(tier + 1)
            .map(|t| pick(t, &|i| i.fit(model)))
            .find(|f| !f.is_empty());
        let weighted = !answer.a_weights.is_empty() || !answer.aaaa_weights.is_empty();
        if best < 1.0
            && weighted
            && let Some(next) = next
        {
            answer.spill = 1.0 - best;
            let mut regions = Vec::new();
            for (r, target) in &next {
                if let Target::Address(ip) = target {
                    match ip {
                        IpAddr::V4(_) => answer.spill_a.push(record(ip)),
                        IpAddr::V6(_) => answer.spill_aaaa.push(record(ip)),
                    }
                    if !regions.contains(r) {
                        regions.push(*r);
                    }
                }
            }
            answer.spill_answered = regions
                .iter()
                .filter_map(|&r| counters.answer(&s.id, &config.regions[r].id))
                .collect();
        }
    }
    // Every record in every answer: no weights to draw.
    for weights in [&mut answer.a_weights, &mut answer.aaaa_weights] {
        if weights.iter().all(|w| *w >= 1.0) {
            weights.clear();
        }
    }
    // A CNAME stands alone: only when the chosen endpoints have no addresses.
    let mut answered_regions: Vec<usize> = chosen.iter().map(|(r, _)| *r).collect();
    if answer.a.is_empty() && answer.aaaa.is_empty() && answer.cname.is_none() {
        let first_cname = chosen.iter().find_map(|(r, t)| match t {
            Target::Cname(name) => Some((*r, name.clone())),
            Target::Address(_) => None,
        });
        answered_regions = first_cname.iter().map(|(r, _)| *r).collect();
        answer.cname = first_cname
            .map(|(_, name)| Record::from_rdata(s.name.clone(), ttl, RData::CNAME(CNAME(name))));
    }
    answered_regions.sort_unstable();
    answered_regions.dedup();
    answer.answered = answered_regions
        .iter()
        .filter_map(|&r| counters.answer(&s.id, &config.regions[r].id))
        .collect();

    // Proximity: each answered region with its own records, for the query to choose.
    if matches!(s.strategy, Strategy::Proximity { .. })
        && answer.cname.is_none()
        && answered_regions.len() > 1
    {
        for &r in &answered_regions {
            let Some(coords) = config.regions[r].location.and_then(|l| l.coords) else {
                continue;
            };
            let mut candidate = Candidate {
                region: config.regions[r].id.clone(),
                coords,
                point: crate::geo::Point::new(coords),
                latency_ms: latency_ms.get(r).copied().unwrap_or(0.0),
                a: Vec::new(),
                aaaa: Vec::new(),
                a_weights: Vec::new(),
                aaaa_weights: Vec::new(),
                answered: counters.answer(&s.id, &config.regions[r].id),
            };
            for (cr, target) in &chosen {
                if let (true, Target::Address(ip)) = (*cr == r, target) {
                    let w = weight_of(r, target);
                    match ip {
                        IpAddr::V4(_) => {
                            candidate.a.push(record(ip));
                            candidate.a_weights.push(w);
                        }
                        IpAddr::V6(_) => {
                            candidate.aaaa.push(record(ip));
                            candidate.aaaa_weights.push(w);
                        }
                    }
                }
            }
            // Slow start and degraded shares apply here as in failover.
            for weights in [&mut candidate.a_weights, &mut candidate.aaaa_weights] {
                if weights.iter().all(|w| *w >= 1.0) {
                    weights.clear();
                }
            }
            answer.candidates.push(candidate);
        }
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
    let allowed_text = match allowed {
        Allowed::Any => "any region".to_string(),
        Allowed::Deny => "no region".to_string(),
        Allowed::Only(tags) => format!("regions tagged {}", tags.join(" or ")),
    };

    // The explanation: every candidate, the stage that removed it, the choice.
    let mut explain = vec![format!(
        "service {} ({}), ttl {}",
        display_name(&s.name),
        s.id,
        s.ttl
    )];
    if s.residency.is_some() {
        explain.push(format!("residency: {label} -> {allowed_text}"));
    }
    let winning_tier = match decision {
        Decision::Tier { tier } => Some(tier),
        _ => None,
    };
    for (t, tier) in s.tiers.iter().enumerate() {
        for &r in tier {
            let region = &config.regions[r];
            let region_allowed = allows(allowed, &region.jurisdictions);
            for (e, endpoint) in region.endpoints.iter().enumerate() {
                let input = &inputs[index.global(r, e)];
                let status = match input.status {
                    Status::Up => "up",
                    Status::Down => "down",
                    Status::Unknown => "unknown",
                };
                // A past error of an endpoint that is up again is history, not a reason.
                let error = input
                    .last_error
                    .filter(|_| input.status != Status::Up)
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                let last_good = last_good
                    .as_ref()
                    .filter(|g| g.endpoints.contains(&(r, e)))
                    .and(input.fit_ago);
                let verdict = match (region_allowed, input.removed_by(model), winning_tier) {
                    (false, _, _) => "removed at residency: jurisdiction not allowed".to_string(),
                    (true, Some(why), _) if last_good.is_some() => format!(
                        "kept as last known good: fit {:.1} s ago, {why} since",
                        last_good.unwrap_or_default().as_secs_f64()
                    ),
                    (true, Some(why), _) => format!("removed at eligible: {why}"),
                    (true, None, Some(_)) if shed(r) && !all_full => format!(
                        "removed at capacity: level {} (shed = \"{}\")",
                        level_name(regions.level(r)),
                        s.shed.name()
                    ),
                    (true, None, Some(w)) if t == w => match input.weight(max_latency_ms) {
                        w if w < 1.0 => {
                            format!("kept with a {:.0}% share (slow start or slow)", w * 100.0)
                        }
                        _ => "kept".to_string(),
                    },
                    (true, None, Some(_)) => "not used: a better tier is fit".to_string(),
                    (true, None, None) => "kept".to_string(),
                };
                explain.push(format!(
                    "tier {t} region {} endpoint {}: {status}{error} -> {verdict}",
                    region.id, endpoint.target
                ));
            }
        }
    }
    // Capacity: each region's load and what the service's shed rule made
    // of it (always for capacity and cost names; for the others once a
    // region of theirs reports load).
    let load_matters = matches!(s.strategy, Strategy::Capacity | Strategy::Cost { .. })
        || s.tiers
            .iter()
            .flatten()
            .any(|&r| regions.loads[r].util.is_some());
    if load_matters {
        explain.push(format!(
            "capacity: shed = \"{}\" ({}): {}",
            s.shed.name(),
            if s.shed_set {
                "set for this service".to_string()
            } else {
                format!("default for {} names", strategy_name(s.strategy))
            },
            match s.shed {
                Shed::Never => "load never removes a region, only health does",
                Shed::AtRemove =>
                    "a region leaves at the remove watermark unless all are that full",
                Shed::AtReduce =>
                    "a region leaves at the reduce watermark unless all are that full",
            }
        ));
        let mut seen = Vec::new();
        for &r in s.tiers.iter().flatten() {
            if seen.contains(&r) || !allows(allowed, &config.regions[r].jurisdictions) {
                continue;
            }
            seen.push(r);
            let l = &regions.loads[r];
            let util = l.util.map_or("unknown (static weight)".to_string(), |u| {
                format!("{:.0}%", u * 100.0)
            });
            let level = regions.level(r);
            let rule = if shed(r) && all_full {
                " -> kept: every fit region is this full"
            } else if shed(r) {
                " -> removed by the shed rule"
            } else if level >= Level::Reduce && s.shed == Shed::Never {
                " -> kept: shed = \"never\""
            } else {
                ""
            };
            explain.push(format!(
                "capacity: region {} utilisation {util}, level {}, weight {:.3}{}{rule}",
                config.regions[r].id,
                level_name(level),
                regions.weight(r),
                l.cost.map(|c| format!(", cost {c}")).unwrap_or_default()
            ));
        }
    }
    let result = match decision {
        Decision::Tier { tier } => format!("decision: tier {tier} -> {}", shown.join(" ")),
        Decision::FailOpen => format!("decision: nothing fit, fail-open -> {}", shown.join(" ")),
        Decision::LastKnownGood { tier, then, .. } => {
            let good = last_good.as_ref().expect("decided from it");
            format!(
                "decision: nothing fit; what was fit went unfit together {:.1} s ago -> last known good (tier {tier}) for {:.1} s more, then {then} -> {}",
                good.ago.as_secs_f64(),
                good.left.as_secs_f64(),
                shown.join(" ")
            )
        }
        Decision::NoData => "decision: nothing fit -> NODATA".to_string(),
        Decision::ServFail => "decision: nothing fit -> SERVFAIL".to_string(),
        Decision::Unprobed => {
            "decision: nothing fit, endpoints not probed yet -> SERVFAIL".to_string()
        }
        Decision::ResidencyNoData => {
            "decision: nothing these clients may use is fit -> NODATA (residency)".to_string()
        }
        Decision::Fallback { ref service } => format!(
            "decision: no region can serve {} -> CNAME to fallback service {service}",
            model.unwrap_or("this service")
        ),
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
    let view = ClassView {
        clients: label.to_string(),
        allowed: allowed_text,
        decision,
        answer: shown,
        regions,
    };
    (answer, view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ResidencyRule;
    use crate::geo::code;

    fn rule(countries: &[&str], continents: &[&str], tag: &str) -> ResidencyRule {
        ResidencyRule {
            countries: countries.iter().filter_map(|c| code(c)).collect(),
            continents: continents.iter().filter_map(|c| code(c)).collect(),
            eu: false,
            allow: Allowed::Only(vec![tag.to_string()]),
            label: tag.to_string(),
        }
    }

    /// A rule naming the group `eu`, as the config expands it.
    fn eu_rule(tag: &str) -> ResidencyRule {
        ResidencyRule {
            eu: true,
            ..rule(crate::geo::EU_EEA, &[], tag)
        }
    }

    #[test]
    fn residency_classes_by_country_then_continent_then_otherwise() {
        let residency = Residency {
            rules: vec![
                rule(&["DE", "FR"], &[], "eu"),
                rule(&[], &["NA"], "us"),
                rule(&["CA"], &[], "ca"),
            ],
            otherwise: Allowed::Any,
            unknown: Allowed::Deny,
            without_ecs_unknown: false,
        };
        let index = ResidencyIndex::new(&residency);
        assert_eq!(index.class(code("DE"), code("EU"), true), 0);
        assert_eq!(
            index.class(code("US"), code("NA"), false),
            1,
            "by continent"
        );
        assert_eq!(
            index.class(code("CA"), code("NA"), false),
            2,
            "a country rule beats a continent rule"
        );
        assert_eq!(index.class(code("JP"), code("AS"), false), 3, "otherwise");
        assert_eq!(index.class(code("GB"), None, false), 3);
        assert_eq!(
            index.class(None, code("EU"), false),
            4,
            "no country: unknown, whatever the continent"
        );
        assert_eq!(
            index.class(code("AX"), code("EU"), true),
            3,
            "no rule names the group eu: the flag alone places nobody"
        );
    }

    #[test]
    fn the_eu_group_holds_flagged_clients_and_listed_codes_before_continents() {
        let residency = Residency {
            rules: vec![
                rule(&[], &["NA"], "us"),
                rule(&["GI"], &[], "uk"),
                eu_rule("eu"),
            ],
            otherwise: Allowed::Any,
            unknown: Allowed::Deny,
            without_ecs_unknown: false,
        };
        let index = ResidencyIndex::new(&residency);
        // Martinique is in North America, and in the EU: the group wins
        // over the continent rule listed before it, flag or no flag (an override).
        assert_eq!(index.class(code("MQ"), code("NA"), true), 2);
        assert_eq!(index.class(code("MQ"), code("NA"), false), 2);
        assert_eq!(
            index.class(code("NO"), code("EU"), false),
            2,
            "EEA, no flag"
        );
        // A flagged code the list does not hold (a database from before 2020
        // flags GB): in the group; a code a rule names itself keeps its rule.
        assert_eq!(index.class(code("GB"), code("EU"), true), 2);
        assert_eq!(index.class(code("GI"), code("EU"), true), 1);
        // Not flagged, not on the list: continent, else otherwise.
        assert_eq!(index.class(code("GL"), code("NA"), false), 0);
        assert_eq!(index.class(code("CH"), code("EU"), false), 3);
        // A flag without a code still says EU; nothing at all is unknown.
        assert_eq!(index.class(None, None, true), 2);
        assert_eq!(index.class(None, code("EU"), false), 4);
    }

    #[test]
    fn allowed_sets_match_any_tag() {
        let eu = Allowed::Only(vec!["eu".into(), "gdpr".into()]);
        assert!(allows(&eu, &["gdpr".into()]));
        assert!(allows(&eu, &["us".into(), "eu".into()]));
        assert!(!allows(&eu, &["us".into()]));
        assert!(!allows(&eu, &[]));
        assert!(allows(&Allowed::Any, &[]));
        assert!(!allows(&Allowed::Deny, &["eu".into()]));
    }
}
