//! A service's answers, precomputed per residency class when a snapshot is
//! built; only the proximity choice among candidate regions is left for the
//! query. The types the answer is made of and the inputs it is made from
//! live here; how each strategy makes it lives in `super::strategy`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use hickory_proto::rr::Record;
use serde::Serialize;

use super::EndpointIndex;
use super::strategy::{self, Cx};
use crate::capacity::{self, Level, Shed};
use crate::config::{Allowed, Config, Residency, Strategy};
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
    pub(super) fn unprobed(&self) -> bool {
        let unknown = match self.status {
            Status::Unknown => true,
            Status::Up => self.layers_pending,
            Status::Down => false,
        };
        unknown && self.silent.is_none()
    }

    pub(super) fn fit(&self, model: Option<&str>) -> bool {
        self.removed_by(model).is_none()
    }

    /// How long ago the endpoint was last fit for `model`: it was fit (so
    /// it was probed), and its last model list has the model.
    pub(super) fn last_fit(&self, model: Option<&str>) -> Option<Duration> {
        if let (Some(model), Some(models)) = (model, self.last_models)
            && !lists(models, model)
        {
            return None;
        }
        self.fit_ago
    }

    /// Why the endpoint cannot be answered for `model`, if it cannot.
    pub(super) fn removed_by(&self, model: Option<&str>) -> Option<String> {
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
            && !lists(models, model)
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
    pub(super) fn weight(&self, max_latency_ms: Option<f64>) -> f64 {
        let degraded = match (max_latency_ms, self.latency_ms) {
            (Some(max), Some(l)) if l > max => DEGRADED_SHARE,
            _ => 1.0,
        };
        self.slow_start * degraded
    }
}

/// `models` (a model list as read) has `want`: an id, or a version written
/// `id@tag` (Ollama's digest, vLLM's `root`), whose tag may be given cut
/// short (`llama3:8b@a80c4f17`).
pub fn lists(models: &[String], want: &str) -> bool {
    models
        .iter()
        .any(|m| m == want || (want.contains('@') && m.starts_with(want)))
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
    /// The service's criticality (a critical name keeps its share).
    pub criticality: capacity::Criticality,
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
        capacity::weight(l.base, l.gpus, l.util, self.level(r), self.criticality)
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
    pub a_counters: Vec<Option<crate::metrics::Counter>>,
    pub aaaa_counters: Vec<Option<crate::metrics::Counter>>,
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
    /// A sheddable name: every fit region is past its shed level and it
    /// has no fallback: NODATA, so that the others keep the headroom.
    NoRoom,
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
            Decision::NoRoom => "no-room",
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
    pub answered: Option<crate::metrics::Counter>,
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
    /// Boxed: most classes have none, and a record is 272 bytes.
    pub cname: Option<Box<Record>>,
    /// The service's all-down rule says SERVFAIL.
    pub servfail: bool,
    /// Residency left nothing to answer.
    pub refused: bool,
    /// `inferdns_dns_answers_total{service, region}` of the regions answered.
    pub answered: Vec<crate::metrics::Counter>,
    /// Proximity: the fit regions of the winning tier (two or more).
    pub candidates: Vec<Candidate>,
    /// Capacity: endpoints drawn per query by weight.
    pub drawn: Option<Box<Drawn>>,
    /// Failover while the winning tier is ramping up (slow start) or
    /// degraded: the share of answers that goes to the next fit tier instead.
    pub spill: f64,
    pub spill_a: Vec<Record>,
    pub spill_aaaa: Vec<Record>,
    pub spill_answered: Vec<crate::metrics::Counter>,
    /// Lines of the `_explain` TXT answer (without the client lines).
    pub explain: Lines,
}

/// Lines of text kept as one string, a line per `\n`: an explanation is
/// read rarely (`_explain` queries, the admin API) and kept for every class
/// of every service, where a `String` per line cost its own allocation
/// and slack (about 11 MB at 10,000 services).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Lines(Box<str>);

impl Lines {
    /// A line break inside a line (an error text) becomes a space.
    pub fn new<S: AsRef<str>>(lines: &[S]) -> Self {
        let mut text = String::with_capacity(lines.iter().map(|l| l.as_ref().len() + 1).sum());
        for (i, line) in lines.iter().enumerate() {
            if i > 0 {
                text.push('\n');
            }
            text.extend(
                line.as_ref()
                    .chars()
                    .map(|c| if c == '\n' { ' ' } else { c }),
            );
        }
        Lines(text.into_boxed_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        // An empty text is no lines, not one empty line.
        self.0.split('\n').filter(|_| !self.0.is_empty())
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Inserts `line` before line `at` (or last, past the end).
    pub fn insert(&mut self, at: usize, line: &str) {
        let mut lines: Vec<&str> = self.iter().collect();
        lines.insert(at.min(lines.len()), line);
        *self = Lines::new(&lines);
    }

    /// Every line, joined by `\n`.
    pub fn text(&self) -> &str {
        &self.0
    }
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
    pub refusals: Option<crate::metrics::Counter>,
    /// A rollout's canary: the share of client subnets it answers and its
    /// answer (the rest get this one, the stable version's).
    pub canary: Option<(f64, std::sync::Arc<ServiceAnswer>)>,
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
    /// The model-version rollout, when the service has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<super::rollout::RolloutView>,
}

/// Metric handles a service answer carries; none in tests and benchmarks.
pub trait Counters {
    fn answer(&self, service: &str, region: &str) -> Option<crate::metrics::Counter>;
    fn refusal(&self, service: &str) -> Option<crate::metrics::Counter>;
}

impl Counters for () {
    fn answer(&self, _: &str, _: &str) -> Option<crate::metrics::Counter> {
        None
    }
    fn refusal(&self, _: &str) -> Option<crate::metrics::Counter> {
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
    let model = config.services[service].model.as_deref();
    service_answer_for(config, index, service, model, inputs, regions, counters)
}

/// [`service_answer`] for the endpoints that list `model` (a rollout's
/// version) instead of the service's own.
pub fn service_answer_for(
    config: &Config,
    index: &EndpointIndex,
    service: usize,
    model: Option<&str>,
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
        let (answer, view) = strategy::class_answer(&Cx {
            config,
            index,
            service: s,
            inputs,
            regions,
            counters,
            label,
            allowed,
            model,
        });
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
        canary: None,
    };
    let view = ServiceView {
        id: s.id.clone(),
        name: s.name.to_string(),
        strategy: strategy::name(s.strategy),
        shed: s.shed,
        decision: shown.decision.clone(),
        answer: shown.answer.clone(),
        regions: shown.regions.clone(),
        residency: s.residency.as_ref().map(|_| views),
        rollout: None,
    };
    (answer, view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ResidencyRule;
    use crate::geo::code;

    #[test]
    fn lines_keep_their_order_and_count_and_a_break_inside_one_stays_inside() {
        assert_eq!(Lines::default().len(), 0);
        assert_eq!(Lines::new::<&str>(&[]).iter().count(), 0);
        let mut lines = Lines::new(&["a", "b (x\ny)", "c"]);
        assert_eq!(lines.len(), 3);
        lines.insert(2, "between");
        lines.insert(99, "last");
        assert_eq!(
            lines.iter().collect::<Vec<_>>(),
            ["a", "b (x y)", "between", "c", "last"]
        );
        assert_eq!(lines.text(), "a\nb (x y)\nbetween\nc\nlast");
    }

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
}
