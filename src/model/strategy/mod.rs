//! How a service's strategy turns endpoint and region states into the
//! answer for one class of clients, compiled when a snapshot is built.
//!
//! Owns: what every strategy shares (the fit endpoints of a tier among the
//! regions a class may use, shedding, last known good, the all-down rule
//! and the model fallback, the records, the status view and the explain
//! text) and one module per strategy for what differs: `failover`,
//! `proximity`, `capacity`, `cost`. A strategy chooses among fit endpoints
//! and adds its own parts to the answer; it does not decide what happens
//! when nothing is fit. Status and explain are written from the same
//! [`Decided`] as the answer, so they cannot disagree with it.
//!
//! Pure functions of the config and the inputs: no sockets, no tasks, no
//! clock.

mod answer;
mod capacity;
mod cost;
mod explain;
mod failover;
mod last_good;
mod proximity;

use std::net::IpAddr;

use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record};

use super::EndpointIndex;
use super::service::{ClassAnswer, ClassView, Counters, Decision, EndpointInput, RegionInputs};
use crate::capacity::{Criticality, Shed};
use crate::config::{self, AllDown, Allowed, Config, Service, Target};
use last_good::LastGood;

/// Everything one class's answer is compiled from.
pub(super) struct Cx<'a> {
    pub config: &'a Config,
    pub index: &'a EndpointIndex,
    pub service: &'a Service,
    /// Every endpoint's state, by global index.
    pub inputs: &'a [EndpointInput<'a>],
    pub regions: &'a RegionInputs<'a>,
    pub counters: &'a dyn Counters,
    /// Who the clients are (a residency rule's label), for status.
    pub label: &'a str,
    /// Where these clients may be sent.
    pub allowed: &'a Allowed,
    /// The model (or, in a rollout, the version) an endpoint must list.
    pub model: Option<&'a str>,
}

/// (region index, target) of endpoints, in tier and config order.
type Chosen<'a> = Vec<(usize, &'a Target)>;

/// What a strategy chose among fit endpoints.
pub(super) struct Choice<'a> {
    pub tier: usize,
    pub chosen: Chosen<'a>,
    /// Every fit region is shed: the shed rule was set aside.
    pub all_full: bool,
}

/// The decision for one class, with what the answer, the status view and
/// the explain text are all written from.
pub(super) struct Decided<'a> {
    pub decision: Decision,
    /// The endpoints answered (none for NODATA, SERVFAIL and fallback).
    pub chosen: Chosen<'a>,
    pub all_full: bool,
    /// When the decision is last known good: which endpoints and the hold.
    pub last_good: Option<LastGood>,
}

/// One strategy: how it chooses among fit endpoints, and what it adds to
/// the answer the shared steps built.
trait Strategy {
    /// The endpoints to answer and their tier; `None` when nothing these
    /// clients may use is fit (then the shared rules decide).
    fn choose<'a>(&self, cx: &Cx<'a>) -> Option<Choice<'a>>;

    /// The strategy's own parts of the answer (draws, spill, proximity
    /// candidates). `answered` are the regions answered, sorted.
    fn complete(
        &self,
        cx: &Cx<'_>,
        decided: &Decided<'_>,
        answered: &[usize],
        answer: &mut ClassAnswer,
    );
}

/// Compiles the answer for one class of clients, and its status view
/// (whose decision and lines the explain text shares).
pub(super) fn class_answer(cx: &Cx<'_>) -> (ClassAnswer, ClassView) {
    let cost;
    let strategy: &dyn Strategy = match cx.service.strategy {
        config::Strategy::Failover => &failover::Failover,
        config::Strategy::Proximity { .. } => &proximity::Proximity,
        config::Strategy::Capacity => &capacity::Capacity,
        config::Strategy::Cost { min_headroom } => {
            cost = cost::Cost { min_headroom };
            &cost
        }
    };
    let decided = decide(cx, strategy);
    let (mut answer, answered) = answer::assemble(cx, &decided);
    strategy.complete(cx, &decided, &answered, &mut answer);
    let view = explain::explain(cx, decided, &answered, &mut answer);
    (answer, view)
}

/// The strategy's choice, else (nothing fit) the rules every strategy
/// shares, in order: last known good, not probed yet, residency, model
/// fallback, the service's all-down rule.
fn decide<'a>(cx: &Cx<'a>, strategy: &dyn Strategy) -> Decided<'a> {
    if let Some(choice) = strategy.choose(cx) {
        return Decided {
            decision: Decision::Tier { tier: choice.tier },
            chosen: choice.chosen,
            all_full: choice.all_full,
            last_good: None,
        };
    }
    let s = cx.service;
    // A sheddable name with fit regions, all past its shed level: no room.
    // Its fallback, else NODATA; never a full region (nor the last known
    // good, nor fail-open: the regions are fit, only busy).
    let no_room = s.criticality == Criticality::Sheddable
        && s.tiers.iter().any(|tier| !cx.fit(tier).is_empty());
    if no_room {
        let decision = match cx.fallback() {
            Some(fallback) => Decision::Fallback {
                service: fallback.id.clone(),
            },
            None => Decision::NoRoom,
        };
        return Decided {
            decision,
            chosen: Vec::new(),
            all_full: false,
            last_good: None,
        };
    }
    // Nothing fit, but what was fit went unfit together a moment ago (an
    // edge whose probes all time out looks like that): the endpoints fit
    // last, for the hold, before any rule below.
    if let Some(good) = last_good::last_known_good(cx) {
        return Decided {
            decision: Decision::LastKnownGood {
                tier: good.tier,
                hold_left_ms: good.left.as_millis().try_into().unwrap_or(u64::MAX),
                then: s.when_all_down.name(),
            },
            chosen: good
                .endpoints
                .iter()
                .map(|&(r, e)| (r, &cx.config.regions[r].endpoints[e].target))
                .collect(),
            all_full: false,
            last_good: Some(good),
        };
    }
    let mut chosen = Vec::new();
    let decision = if s
        .tiers
        .iter()
        .any(|tier| !cx.pick(tier, |i| !i.drained && i.unprobed()).is_empty())
    {
        // Not known to be down, only not probed yet: no answer from
        // ignorance; SERVFAIL sends the resolver to another edge. (`pick`
        // keeps to the allowed regions: residency holds here too.)
        Decision::Unprobed
    } else if !matches!(cx.allowed, Allowed::Any) {
        // Residency always wins over fail-open: never outside the allowed set.
        Decision::ResidencyNoData
    } else if let Some(fallback) = cx.fallback() {
        // Model fallback: the other service's name, answered in the same response.
        Decision::Fallback {
            service: fallback.id.clone(),
        }
    } else {
        match s.when_all_down {
            AllDown::FailOpen => {
                // As if every endpoint were fit, but never a drained one.
                chosen = s
                    .tiers
                    .iter()
                    .map(|tier| cx.pick(tier, |i| !i.drained))
                    .find(|c| !c.is_empty())
                    .unwrap_or_default();
                Decision::FailOpen
            }
            AllDown::NoData => Decision::NoData,
            AllDown::ServFail => Decision::ServFail,
        }
    };
    Decided {
        decision,
        chosen,
        all_full: false,
        last_good: None,
    }
}

/// The first tier with fit endpoints in regions the shed rule keeps.
/// Shedding (the service's `shed` rule) skips a region whose load reached
/// the rule's level (its share goes to the other fit regions of the tier,
/// else to the next tier), unless every fit region has: then the first
/// tier with fit endpoints, shed or not.
fn first_fit_tier<'a>(cx: &Cx<'a>) -> Option<Choice<'a>> {
    let tiers = &cx.service.tiers;
    for (t, tier) in tiers.iter().enumerate() {
        let mut fit = cx.fit(tier);
        fit.retain(|(r, _)| !cx.shed(*r));
        if !fit.is_empty() {
            return Some(Choice {
                tier: t,
                chosen: fit,
                all_full: false,
            });
        }
    }
    // A sheddable name never takes a full region: the others keep it.
    if cx.service.shed == Shed::Never || cx.service.criticality == Criticality::Sheddable {
        return None;
    }
    tiers.iter().enumerate().find_map(|(t, tier)| {
        let fit = cx.fit(tier);
        (!fit.is_empty()).then_some(Choice {
            tier: t,
            chosen: fit,
            all_full: true,
        })
    })
}

impl<'a> Cx<'a> {
    pub fn model(&self) -> Option<&'a str> {
        self.model
    }

    /// The service's `max-latency` in ms: above it an endpoint is degraded.
    pub fn max_latency_ms(&self) -> Option<f64> {
        self.service.max_latency.map(|d| d.as_secs_f64() * 1000.0)
    }

    pub fn fallback(&self) -> Option<&'a Service> {
        self.service.fallback.map(|f| &self.config.services[f])
    }

    pub fn input(&self, r: usize, e: usize) -> &'a EndpointInput<'a> {
        &self.inputs[self.index.global(r, e)]
    }

    /// These clients may be sent to region `r`.
    pub fn allows(&self, r: usize) -> bool {
        allows(self.allowed, &self.config.regions[r].jurisdictions)
    }

    /// The endpoints of `tier` that pass `keep`, among allowed regions.
    pub fn pick(&self, tier: &[usize], keep: impl Fn(&EndpointInput<'_>) -> bool) -> Chosen<'a> {
        let mut out = Vec::new();
        for &r in tier {
            if !self.allows(r) {
                continue;
            }
            for (e, endpoint) in self.config.regions[r].endpoints.iter().enumerate() {
                if keep(self.input(r, e)) {
                    out.push((r, &endpoint.target));
                }
            }
        }
        out
    }

    /// The fit endpoints of `tier`, among allowed regions.
    pub fn fit(&self, tier: &[usize]) -> Chosen<'a> {
        let model = self.model();
        self.pick(tier, |i| i.fit(model))
    }

    /// The service's shed rule takes region `r` out at its current level.
    pub fn shed(&self, r: usize) -> bool {
        self.service.shed.removes(self.regions.level(r))
    }

    /// The share of an answered endpoint (slow start, degraded). Found by
    /// its target: the first endpoint of the region with it.
    pub fn weight_of(&self, r: usize, target: &Target) -> f64 {
        let e = self.config.regions[r]
            .endpoints
            .iter()
            .position(|e| &e.target == target)
            .unwrap_or(0);
        self.input(r, e).weight(self.max_latency_ms())
    }

    /// The service name's A or AAAA record of `ip`, with the TTL of now.
    pub fn record(&self, ip: &IpAddr) -> Record {
        let name = self.service.name.clone();
        let ttl = self.regions.ttl;
        match ip {
            IpAddr::V4(v4) => Record::from_rdata(name, ttl, RData::A(A(*v4))),
            IpAddr::V6(v6) => Record::from_rdata(name, ttl, RData::AAAA(AAAA(*v6))),
        }
    }

    /// `inferdns_dns_answers_total` of this service in region `r`.
    pub fn answered(&self, r: usize) -> Option<crate::metrics::Counter> {
        self.counters
            .answer(&self.service.id, &self.config.regions[r].id)
    }
}

fn allows(allowed: &Allowed, jurisdictions: &[String]) -> bool {
    match allowed {
        Allowed::Any => true,
        Allowed::Deny => false,
        Allowed::Only(tags) => jurisdictions.iter().any(|j| tags.contains(j)),
    }
}

/// A strategy's name in config, status and explain.
pub(super) fn name(strategy: config::Strategy) -> &'static str {
    match strategy {
        config::Strategy::Failover => "failover",
        config::Strategy::Proximity { .. } => "proximity",
        config::Strategy::Capacity => "capacity",
        config::Strategy::Cost { .. } => "cost",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
