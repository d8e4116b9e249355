//! Last known good: the publisher's record of when each endpoint was last
//! fit, and of the services answering from it.
//!
//! Owns: one mark per endpoint (by probe id), updated from the health state
//! each time a snapshot is about to be built (not by the probe state
//! machines), the WARN/INFO lines and metrics of services entering and
//! leaving a last-known-good hold, and the wake-ups at the holds' ends. The
//! choice itself is made in `model::strategy::last_good` from
//! `EndpointInput::fit_ago`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use super::{EndpointHealth, EndpointInfo, Publisher};
use crate::health::{HealthState, Layer, Status};
use crate::model::{Decision, ServiceView, Snapshot};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Fit,
    /// Was fit, and stopped being fit then.
    UnfitSince(Instant),
}

/// When each endpoint was last fit, by probe id. An endpoint never fit
/// since it is watched has no mark.
#[derive(Debug, Default)]
pub(super) struct FitLog {
    marks: HashMap<u64, Mark>,
}

impl FitLog {
    /// Records whether endpoint `id` is fit at `now`.
    fn note(&mut self, id: u64, fit: bool, now: Instant) {
        match (self.marks.get(&id), fit) {
            (_, true) => {
                self.marks.insert(id, Mark::Fit);
            }
            (Some(Mark::Fit), false) => {
                self.marks.insert(id, Mark::UnfitSince(now));
            }
            (Some(Mark::UnfitSince(_)) | None, false) => {}
        }
    }

    /// How long ago endpoint `id` was last fit (zero while it is); `None`
    /// if it never was.
    pub(super) fn ago(&self, id: u64, now: Instant) -> Option<Duration> {
        match self.marks.get(&id)? {
            Mark::Fit => Some(Duration::ZERO),
            Mark::UnfitSince(at) => Some(now.saturating_duration_since(*at)),
        }
    }
}

/// Fit on every layer it is probed on and not drained (the model is the
/// service's: it is checked per answer).
fn endpoint_fit(h: &EndpointHealth, info: &EndpointInfo, drained: bool, now: Instant) -> bool {
    let layer_up = |layer: Layer, state: &HealthState| {
        !info.layers.contains(&layer) || state.status == Status::Up
    };
    !drained
        && h.state.status == Status::Up
        && layer_up(Layer::Models, &h.models_state)
        && layer_up(Layer::Completion, &h.completion_state)
        && h.cooling_until.is_none_or(|u| u <= now)
        && h.silent(info, now).is_none()
}

/// Whether any class of clients of the service answers last known good.
fn holding(view: &ServiceView) -> Option<&Decision> {
    match &view.residency {
        None => Some(&view.decision).filter(|d| d.is_last_known_good()),
        Some(classes) => classes
            .iter()
            .map(|c| &c.decision)
            .find(|d| d.is_last_known_good()),
    }
}

impl Publisher {
    /// Marks which endpoints are fit now; called before every build, so a
    /// mark changes at the moment the endpoint's state did (every change of
    /// health publishes at once, and silence limits and cool-downs wake the
    /// publisher).
    pub(super) fn note_fitness(&mut self) {
        let now = Instant::now();
        let ids = &self.loaded.ids;
        self.fit_log
            .marks
            .retain(|id, _| self.loaded.by_id.contains_key(id));
        for ((h, info), id) in self.health.iter().zip(&self.loaded.info).zip(ids) {
            let drained = self.drained.contains(&info.region);
            self.fit_log
                .note(*id, endpoint_fit(h, info, drained, now), now);
        }
    }

    /// Per global endpoint, how long ago it was last fit; `None` also once
    /// that can no longer matter: longer ago than every service's hold plus
    /// one probe cycle (the most a last-known-good endpoint can trail the
    /// one fit last). An input that stops changing lets builds share the
    /// services over it.
    pub(super) fn fit_ago(&self) -> Vec<Option<Duration>> {
        let now = Instant::now();
        let longest = self.loaded.holds.last().copied();
        self.loaded
            .ids
            .iter()
            .zip(&self.loaded.info)
            .map(|(id, info)| {
                let ago = self.fit_log.ago(*id, now)?;
                (ago < longest? + info.cycle).then_some(ago)
            })
            .collect()
    }

    /// When a last-known-good hold may end: each hold after each endpoint
    /// went unfit (the publisher republishes then).
    pub(super) fn last_good_deadlines(&self, mut each: impl FnMut(Instant)) {
        for mark in self.fit_log.marks.values() {
            if let Mark::UnfitSince(at) = mark {
                for hold in &self.loaded.holds {
                    each(*at + *hold);
                }
            }
        }
    }

    /// Logs services that began or stopped answering last known good in
    /// `next`, and keeps their metrics. Only the services `compiled` anew
    /// can have changed (all of them when the build was not incremental).
    pub(super) fn note_last_known_good(
        &mut self,
        next: &Snapshot,
        compiled: &[usize],
        incremental: bool,
    ) {
        for &i in compiled {
            let view = &next.service_views[i];
            let Some(decision) = holding(view) else {
                if self.holding.remove(&view.id) {
                    if matches!(
                        view.decision,
                        Decision::FailOpen | Decision::NoData | Decision::ServFail
                    ) {
                        tracing::warn!(
                            service = %view.id, decision = view.decision.state(), tier = view.decision.tier(), answer = %view.answer.join(" "),
                            "Last-known-good hold ended with nothing fit; the when-all-down rule applies."
                        );
                    } else {
                        tracing::info!(
                            service = %view.id, decision = view.decision.state(), tier = view.decision.tier(), answer = %view.answer.join(" "),
                            "Service no longer answers from last known good."
                        );
                    }
                    self.metrics.set_last_known_good(&view.id, false);
                }
                continue;
            };
            if self.holding.insert(view.id.clone()) {
                let (hold_left_ms, then) = match decision {
                    Decision::LastKnownGood {
                        hold_left_ms, then, ..
                    } => (*hold_left_ms, *then),
                    _ => (0, ""),
                };
                tracing::warn!(
                    service = %view.id, answer = %view.answer.join(" "), hold_left_ms, then,
                    "Nothing fit: every endpoint that was fit went unfit together; answering the last known good ones for the hold."
                );
                self.metrics.set_last_known_good(&view.id, true);
                self.metrics.count_last_known_good_hold(&view.id);
            }
        }
        if incremental {
            return;
        }
        // Services a reload removed while holding.
        let ids: HashSet<&str> = next.service_views.iter().map(|v| v.id.as_str()).collect();
        let gone: Vec<String> = self
            .holding
            .iter()
            .filter(|id| !ids.contains(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            self.holding.remove(&id);
            self.metrics.forget_last_known_good(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_keeps_the_moment_an_endpoint_stopped_being_fit() {
        let mut log = FitLog::default();
        let t0 = Instant::now();
        log.note(7, false, t0);
        assert_eq!(log.ago(7, t0), None, "never fit: no mark");
        log.note(7, true, t0);
        assert_eq!(
            log.ago(7, t0 + Duration::from_secs(5)),
            Some(Duration::ZERO)
        );
        let t1 = t0 + Duration::from_secs(10);
        log.note(7, false, t1);
        // Later publishes while it stays unfit do not move the mark.
        log.note(7, false, t1 + Duration::from_secs(3));
        assert_eq!(
            log.ago(7, t1 + Duration::from_secs(4)),
            Some(Duration::from_secs(4))
        );
    }
}
