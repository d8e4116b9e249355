//! The publisher's side of model-version rollouts: each rollout's phase
//! (promotions and rollbacks, by an operator or by the canary's checks),
//! kept across builds and reloads, and what is said about it (logs,
//! metrics). What a phase answers is compiled in `model::rollout`.

use std::collections::HashMap;

use tokio::time::Instant;

use super::Publisher;
use crate::model::Snapshot;
use crate::model::rollout::Phase;

/// One service's rollout as the publisher follows it.
#[derive(Debug, Clone)]
pub(super) struct Tracked {
    /// The canary the phase is about (a new canary starts a new rollout).
    canary: Option<String>,
    phase: Phase,
    /// The canary's checks have been clean since then (auto-promotion).
    clean_since: Option<Instant>,
    guard_breached: bool,
}

impl Tracked {
    fn new(canary: Option<String>) -> Self {
        Tracked {
            canary,
            phase: Phase::Canary,
            clean_since: None,
            guard_breached: false,
        }
    }
}

impl Publisher {
    /// Endpoint `g` serves the canary of a rollout in its canary phase: a
    /// failed model-list or completion check counts at once (fall 1).
    pub(super) fn on_probation(&self, g: usize) -> bool {
        let Some(models) = self.health[g].models.as_deref() else {
            return false;
        };
        let r = self.loaded.region_of[g];
        self.loaded.region_canaries[r].iter().any(|(i, canary)| {
            let id = &self.loaded.config.services[*i].id;
            self.rollouts
                .get(id)
                .is_none_or(|t| t.phase == Phase::Canary)
                && crate::model::lists(models, canary)
        })
    }

    /// Each tracked rollout's phase, by service id, for a build.
    pub(super) fn phases(&self) -> HashMap<String, Phase> {
        self.rollouts
            .iter()
            .map(|(id, t)| (id.clone(), t.phase.clone()))
            .collect()
    }

    /// After a reload: a promotion or rollback stays while the service
    /// rolls out the same canary; anything else starts over.
    pub(super) fn keep_rollouts(&mut self) {
        let services = &self.loaded.config.services;
        self.rollouts.retain(|id, t| {
            services
                .iter()
                .any(|s| &s.id == id && s.rollout.as_ref().is_some_and(|r| r.canary == t.canary))
        });
    }

    /// An operator promotes (`promote`) or rolls back a service's canary.
    pub(super) fn operate_rollout(&mut self, service: &str, promote: bool) -> Result<u64, String> {
        let Some(s) = self.loaded.config.services.iter().find(|s| s.id == service) else {
            return Err(format!("unknown service {service:?}"));
        };
        let Some(canary) = s.rollout.as_ref().and_then(|r| r.canary.clone()) else {
            return Err(format!("service {service} has no rollout with a canary"));
        };
        let phase = if promote {
            Phase::Promoted { automatic: false }
        } else {
            self.metrics
                .rollout_rollbacks
                .with_label_values(&[service, "operator"])
                .inc();
            Phase::RolledBack {
                automatic: false,
                why: "rolled back by an operator".into(),
            }
        };
        tracing::info!(service, canary = %canary, phase = phase.name(), "Rollout changed by an operator.");
        let t = self
            .rollouts
            .entry(service.to_string())
            .or_insert_with(|| Tracked::new(Some(canary)));
        t.phase = phase;
        t.clean_since = None;
        // A phase is no input the incremental build compares.
        self.built = None;
        if self.deferred.is_some() {
            self.settle(true);
        }
        self.publish();
        Ok(self.generation)
    }

    /// Promotes the canaries whose checks have been clean for their
    /// `promote-after` (before a build).
    pub(super) fn promote_due(&mut self, now: Instant) {
        for s in &self.loaded.config.services {
            let Some(after) = s.rollout.as_ref().and_then(|r| r.promote_after) else {
                continue;
            };
            let Some(t) = self.rollouts.get_mut(&s.id) else {
                continue;
            };
            if t.phase == Phase::Canary && t.clean_since.is_some_and(|since| since + after <= now) {
                tracing::info!(service = %s.id, canary = ?t.canary, clean_s = after.as_secs(), "Canary promoted: its checks were clean for promote-after.");
                t.phase = Phase::Promoted { automatic: true };
                t.clean_since = None;
                self.built = None;
            }
        }
    }

    /// When a canary's clean time reaches its `promote-after`.
    pub(super) fn rollout_deadlines(&self, mut each: impl FnMut(Instant)) {
        for s in &self.loaded.config.services {
            if let (Some(after), Some(t)) = (
                s.rollout.as_ref().and_then(|r| r.promote_after),
                self.rollouts.get(&s.id),
            ) && t.phase == Phase::Canary
                && let Some(since) = t.clean_since
            {
                each(since + after);
            }
        }
    }

    /// Reads the rollouts of the services compiled for `next`: a canary
    /// failing its checks is rolled back (true: build again, to show it),
    /// clean checks start the promotion clock, the guard is said when it
    /// changes; the rollout metrics follow.
    pub(super) fn note_rollouts(
        &mut self,
        next: &Snapshot,
        compiled: &[usize],
        now: Instant,
    ) -> bool {
        let mut rolled_back = false;
        for &i in compiled {
            let view = &next.service_views[i];
            let Some(r) = &view.rollout else {
                continue;
            };
            let t = self
                .rollouts
                .entry(view.id.clone())
                .or_insert_with(|| Tracked::new(r.canary.clone()));
            match (&t.phase, &r.failing) {
                (Phase::Canary, Some(why)) => {
                    tracing::warn!(service = %view.id, canary = ?r.canary, why = %why, "Canary failed its checks; its share goes to the stable version (automatic rollback).");
                    self.metrics
                        .rollout_rollbacks
                        .with_label_values(&[view.id.as_str(), "automatic"])
                        .inc();
                    t.phase = Phase::RolledBack {
                        automatic: true,
                        why: why.clone(),
                    };
                    t.clean_since = None;
                    rolled_back = true;
                }
                (Phase::Canary, None) if !r.canary_regions.is_empty() => {
                    t.clean_since.get_or_insert(now);
                }
                _ => t.clean_since = None,
            }
            if r.guard_breached != t.guard_breached {
                if r.guard_breached {
                    tracing::warn!(service = %view.id, stable = %r.stable, stable_regions = r.stable_regions.len(), min_stable_regions = r.min_stable_regions, "Fewer regions are fit on the stable version than the rollout's guard asks for.");
                } else {
                    tracing::info!(service = %view.id, stable_regions = r.stable_regions.len(), "Rollout guard met again.");
                }
                t.guard_breached = r.guard_breached;
            }
            let m = &self.metrics;
            let id = [view.id.as_str()];
            m.rollout_canary_share
                .with_label_values(&id)
                .set(r.canary_share);
            m.rollout_stable_regions
                .with_label_values(&id)
                .set(r.stable_regions.len() as i64);
            m.rollout_guard_breached
                .with_label_values(&id)
                .set(i64::from(r.guard_breached));
        }
        rolled_back
    }
}
