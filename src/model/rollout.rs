//! Model-version rollouts: the stable version's answer, the canary's beside
//! it for its share of client subnets, the checks that take the canary's
//! share away, and the guard on regions left on the stable version.
//!
//! Pure, like the rest of the model: the publisher keeps each rollout's
//! phase (across reloads) and acts on what the compiled view says (a
//! failing canary, a breached guard).

use std::sync::Arc;

use serde::Serialize;

use super::EndpointIndex;
use super::service::{
    Counters, EndpointInput, RegionInputs, ServiceAnswer, ServiceView, lists, service_answer_for,
};
use crate::config::Config;
use crate::health::Status;

/// Where a service's rollout stands.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "phase")]
pub enum Phase {
    /// The canary takes its share of client subnets.
    Canary,
    /// The canary lost its share (`automatic`: its checks failed, `why`).
    RolledBack { automatic: bool, why: String },
    /// The canary version is answered to every client.
    Promoted { automatic: bool },
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Canary => "canary",
            Phase::RolledBack { .. } => "rolled-back",
            Phase::Promoted { .. } => "promoted",
        }
    }
}

/// A rollout as status and explain show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutView {
    pub stable: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<String>,
    #[serde(flatten)]
    pub phase: Phase,
    /// Share of client subnets answered with the canary now.
    pub canary_share: f64,
    /// Regions with an endpoint fit on each version.
    pub stable_regions: Vec<String>,
    pub canary_regions: Vec<String>,
    pub min_stable_regions: usize,
    /// Before promotion, fewer regions are fit on the stable version than
    /// `min_stable_regions`.
    pub guard_breached: bool,
    /// Why the canary fails its checks now (what rolls it back).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failing: Option<String>,
}

/// Service `i`'s answer and view under its rollout in `phase`.
pub fn rollout_answer(
    config: &Config,
    index: &EndpointIndex,
    i: usize,
    inputs: &[EndpointInput<'_>],
    regions: &RegionInputs<'_>,
    counters: &dyn Counters,
    phase: &Phase,
) -> (ServiceAnswer, ServiceView) {
    let s = &config.services[i];
    let r = s.rollout.as_ref().expect("a service with a rollout");
    let canary = r.canary.as_deref();
    let promoted = matches!(phase, Phase::Promoted { .. }) && canary.is_some();
    let on = |version: &str| -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for &region in s.tiers.iter().flatten() {
            let id = &config.regions[region].id;
            let fit = (0..config.regions[region].endpoints.len())
                .any(|e| inputs[index.global(region, e)].fit(Some(version)));
            if fit && !out.contains(id) {
                out.push(id.clone());
            }
        }
        out
    };
    let stable_regions = on(&r.stable);
    let canary_regions = canary.map(on).unwrap_or_default();
    let failing = match (phase, canary) {
        (Phase::Canary, Some(c)) => canary_failing(config, index, i, inputs, c),
        _ => None,
    };
    let active = matches!(phase, Phase::Canary)
        && failing.is_none()
        && !canary_regions.is_empty()
        && canary.is_some();
    let main_version = if promoted {
        canary
    } else {
        Some(r.stable.as_str())
    };
    let (mut answer, mut view) =
        service_answer_for(config, index, i, main_version, inputs, regions, counters);
    let share = match (promoted, active) {
        (true, _) => 1.0,
        (false, true) => r.canary_share,
        (false, false) => 0.0,
    };
    if active && let Some(c) = canary {
        let (canary_answer, _) =
            service_answer_for(config, index, i, Some(c), inputs, regions, counters);
        answer.canary = Some((r.canary_share, Arc::new(canary_answer)));
    }
    let line = format!(
        "rollout: {}; stable {} on {}; canary {} on {}, {:.1}% of client subnets{}",
        phase.name(),
        r.stable,
        listed(&stable_regions),
        canary.unwrap_or("-"),
        listed(&canary_regions),
        share * 100.0,
        failing
            .as_ref()
            .map(|w| format!("; failing: {w}"))
            .unwrap_or_default()
    );
    for class in &mut answer.classes {
        let at = class.explain.len().saturating_sub(1);
        class.explain.insert(at, &line);
    }
    // Said once every endpoint of the service has been probed (not at start).
    let unprobed = s.tiers.iter().flatten().any(|&region| {
        (0..config.regions[region].endpoints.len())
            .any(|e| inputs[index.global(region, e)].unprobed())
    });
    view.rollout = Some(RolloutView {
        stable: r.stable.clone(),
        canary: r.canary.clone(),
        phase: phase.clone(),
        canary_share: share,
        guard_breached: !promoted && !unprobed && stable_regions.len() < r.min_stable_regions,
        stable_regions,
        canary_regions,
        min_stable_regions: r.min_stable_regions,
        failing,
    });
    (answer, view)
}

fn listed(regions: &[String]) -> String {
    if regions.is_empty() {
        "no fit region".to_string()
    } else {
        regions.join(" ")
    }
}

/// Why the canary fails its checks, if it does: an endpoint that serves
/// the canary version (its last model list read has it), alive and not
/// drained, fails its model-list check, fails its completion probe, or
/// answers slower than the service's `max-latency`. A region that dies is
/// not the version's fault (health moves its clients, as for any service),
/// and one whose list, read fine, no longer has the canary was moved off
/// it: its clients go to the stable version while no region serves the
/// canary, without a rollback.
fn canary_failing(
    config: &Config,
    index: &EndpointIndex,
    i: usize,
    inputs: &[EndpointInput<'_>],
    canary: &str,
) -> Option<String> {
    let s = &config.services[i];
    let max_ms = s.max_latency.map(|d| d.as_secs_f64() * 1000.0);
    for &r in s.tiers.iter().flatten() {
        let region = &config.regions[r];
        for (e, endpoint) in region.endpoints.iter().enumerate() {
            let input = &inputs[index.global(r, e)];
            let served = input.last_models.is_some_and(|m| lists(m, canary));
            // A layer without its first result yet says nothing.
            if !served || input.drained || input.status != Status::Up || input.layers_pending {
                continue;
            }
            let at = format!("endpoint {} of {}", endpoint.target, region.id);
            if input.models.is_some_and(|m| !lists(m, canary)) {
                return Some(format!("{at} fails its model-list check"));
            }
            // Its completion probe tries the version it serves.
            if !input.completion_ok {
                return Some(format!("{at} fails its completion probe"));
            }
            if let (Some(max), Some(l)) = (max_ms, input.latency_ms)
                && l > max
            {
                return Some(format!(
                    "{at} answers in {l:.0} ms, over max-latency {max:.0} ms"
                ));
            }
        }
    }
    None
}
