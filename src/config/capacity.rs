//! Checks of the capacity settings: region size, weight, cost and metrics
//! scraping; service records, stickiness, watermarks and adaptive TTL.

use std::time::Duration;

use super::check::Checker;
use super::file::{CapacitySection, ServiceSection};
use super::{MetricsSpec, RegionCapacity, Source, Strategy};
use crate::capacity::{Criticality, Preset, SHEDDABLE_OFFSET, Series, Shed, Watermarks};

/// Load reports older than this expire to "unknown".
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(15);
const DEFAULT_METRICS_INTERVAL: Duration = Duration::from_secs(5);
/// Waiting requests that count as a full queue (GIE's detector uses 5).
const DEFAULT_QUEUE_SATURATION: f64 = 8.0;
/// Cost strategy: the least headroom a region needs to be chosen.
pub(super) const DEFAULT_MIN_HEADROOM: f64 = 0.2;

impl Checker {
    pub(super) fn capacity(
        &mut self,
        src: &Source<'_>,
        c: Option<&CapacitySection>,
    ) -> (RegionCapacity, Option<MetricsSpec>) {
        let default = CapacitySection::default();
        let c = c.unwrap_or(&default);
        let mut positive = |v: &Option<toml::Spanned<f64>>, what: &str, default: f64| match v {
            Some(x) if !(x.get_ref().is_finite() && *x.get_ref() > 0.0 && *x.get_ref() <= 1e6) => {
                self.err(
                    src,
                    x.span(),
                    format!("capacity {what} {} must be a positive number", x.get_ref()),
                );
                default
            }
            Some(x) => *x.get_ref(),
            None => default,
        };
        let gpus = positive(&c.gpus, "gpus", 1.0);
        let weight = positive(&c.weight, "weight", 1.0);
        let queue_saturation = positive(
            &c.queue_saturation,
            "queue-saturation",
            DEFAULT_QUEUE_SATURATION,
        );
        let cost = c.cost.as_ref().map(|x| *x.get_ref());
        if let Some(x) = &c.cost
            && !(x.get_ref().is_finite() && *x.get_ref() >= 0.0)
        {
            self.err(src, x.span(), "capacity cost must be zero or more");
        }
        let max_age = match &c.max_age {
            Some(a) => self
                .duration(
                    src,
                    a,
                    "capacity max-age",
                    Duration::from_secs(1),
                    Duration::from_secs(3600),
                )
                .unwrap_or(DEFAULT_MAX_AGE),
            None => DEFAULT_MAX_AGE,
        };
        let metrics = c.metrics.as_ref().and_then(|name| {
            let preset = match name.get_ref().as_str() {
                "generic" => {
                    let one = |m: &Option<toml::Spanned<String>>| {
                        m.iter().map(|n| Series::plain(n.get_ref())).collect::<Vec<_>>()
                    };
                    let preset = Preset {
                        kv_cache: one(&c.kv_cache_metric),
                        waiting: one(&c.waiting_metric),
                        running: one(&c.running_metric),
                        slots: one(&c.slots_metric),
                        utilization: one(&c.utilization_metric),
                        ..Preset::default()
                    };
                    if preset.kv_cache.is_empty() && preset.waiting.is_empty() && preset.utilization.is_empty() && preset.slots.is_empty() {
                        self.err(
                            src,
                            name.span(),
                            "the generic preset needs kv-cache-metric, waiting-metric, slots-metric or utilization-metric",
                        );
                        return None;
                    }
                    if !preset.slots.is_empty() && preset.running.is_empty() {
                        let span = c.slots_metric.as_ref().map_or(name.span(), |m| m.span());
                        self.err(src, span, "slots-metric needs running-metric (slot use is running plus waiting over slots)");
                    }
                    preset
                }
                other => match Preset::named(other) {
                    Some(p) => p,
                    None => {
                        self.err(
                            src,
                            name.span(),
                            format!("metrics preset {other:?} is not one of {}, generic", Preset::NAMES.join(", ")),
                        );
                        return None;
                    }
                },
            };
            let interval = match &c.metrics_interval {
                Some(i) => self.duration(src, i, "metrics-interval", Duration::from_millis(100), Duration::from_secs(3600))?,
                None => DEFAULT_METRICS_INTERVAL,
            };
            let path = c.metrics_path.as_ref().map_or("/metrics".to_string(), |p| p.get_ref().clone());
            if !path.starts_with('/') {
                let span = c.metrics_path.as_ref().map_or(0..0, |p| p.span());
                self.err(src, span, format!("metrics path {path:?} must start with '/'"));
            }
            Some(MetricsSpec {
                path,
                interval,
                preset,
                preset_name: name.get_ref().clone(),
            })
        });
        (
            RegionCapacity {
                gpus,
                weight,
                cost,
                max_age,
                queue_saturation,
            },
            metrics,
        )
    }

    /// Records, stickiness, watermarks and the adaptive TTL floor of a service.
    pub(super) fn service_capacity(
        &mut self,
        src: &Source<'_>,
        s: &ServiceSection,
        ttl: u32,
    ) -> (usize, bool, Watermarks, u32) {
        let records = match &s.records {
            Some(r) if *r.get_ref() == 0 || *r.get_ref() > 64 => {
                self.err(
                    src,
                    r.span(),
                    format!("records {} is out of range (1..=64)", r.get_ref()),
                );
                1
            }
            Some(r) => *r.get_ref() as usize,
            None => 1,
        };
        let mut watermarks = Watermarks::default();
        if let Some(w) = &s.watermarks {
            let given = w.get_ref();
            watermarks.prepare = given.prepare.unwrap_or(watermarks.prepare);
            watermarks.reduce = given.reduce.unwrap_or(watermarks.reduce);
            watermarks.remove = given.remove.unwrap_or(watermarks.remove);
            let ordered = 0.0 < watermarks.prepare
                && watermarks.prepare < watermarks.reduce
                && watermarks.reduce < watermarks.remove
                && watermarks.remove <= 1.0;
            if !ordered {
                self.err(
                    src,
                    w.span(),
                    format!(
                        "watermarks must rise: 0 < prepare ({}) < reduce ({}) < remove ({}) <= 1",
                        watermarks.prepare, watermarks.reduce, watermarks.remove
                    ),
                );
            }
        }
        let ttl_min = match &s.ttl_min {
            Some(t) if *t.get_ref() == 0 || *t.get_ref() > ttl => {
                self.err(
                    src,
                    t.span(),
                    format!(
                        "ttl-min {} must be between 1 and the ttl ({ttl})",
                        t.get_ref()
                    ),
                );
                ttl
            }
            Some(t) => *t.get_ref(),
            None => ttl,
        };
        (records, s.sticky.unwrap_or(false), watermarks, ttl_min)
    }

    /// The service's shedding rule, and whether it was written.
    pub(super) fn shed(
        &mut self,
        src: &Source<'_>,
        s: &ServiceSection,
        strategy: Strategy,
    ) -> (Shed, bool) {
        let default = default_shed(strategy);
        let Some(given) = &s.shed else {
            return (default, false);
        };
        match Shed::parse(given.get_ref()) {
            Some(shed) => (shed, true),
            None => {
                let names: Vec<String> = Shed::ALL.iter().map(|(_, n)| format!("{n:?}")).collect();
                self.err(
                    src,
                    given.span(),
                    format!(
                        "shed {:?} is not one of {}",
                        given.get_ref(),
                        names.join(", ")
                    ),
                );
                (default, false)
            }
        }
    }
}

impl Checker {
    /// A service's `rollout`.
    pub(super) fn rollout(
        &mut self,
        src: &Source<'_>,
        s: &ServiceSection,
        r: &toml::Spanned<super::file::RolloutSection>,
    ) -> Option<super::Rollout> {
        let section = r.get_ref();
        if let Some(model) = &s.model {
            self.err(
                src,
                model.span(),
                "model and rollout: choose one (a rollout's versions are what endpoints must list)",
            );
        }
        let stable = section.stable.get_ref().trim().to_string();
        if stable.is_empty() {
            self.err(src, section.stable.span(), "rollout.stable cannot be empty");
        }
        let canary = section
            .canary
            .as_ref()
            .map(|c| c.get_ref().trim().to_string());
        if let (Some(c), Some(span)) = (&canary, &section.canary)
            && (c.is_empty() || *c == stable)
        {
            self.err(
                src,
                span.span(),
                "rollout.canary must be another version than rollout.stable",
            );
        }
        let canary_share = match &section.canary_share {
            None => 0.05,
            Some(text) => match text
                .get_ref()
                .trim()
                .strip_suffix('%')
                .and_then(|p| p.trim().parse::<f64>().ok())
            {
                Some(p) if p > 0.0 && p <= 100.0 => p / 100.0,
                _ => {
                    self.err(
                        src,
                        text.span(),
                        format!(
                            "rollout.canary-share {:?} is not a share such as \"5%\" (above 0, at most 100%)",
                            text.get_ref()
                        ),
                    );
                    0.05
                }
            },
        };
        let min_stable_regions = self.bounded(
            src,
            section.min_stable_regions.as_ref(),
            "rollout.min-stable-regions",
            0,
            1000,
            2,
        ) as usize;
        let promote_after = section.promote_after.as_ref().and_then(|d| {
            self.duration(
                src,
                d,
                "rollout.promote-after",
                Duration::from_secs(1),
                Duration::from_secs(30 * 86_400),
            )
        });
        Some(super::Rollout {
            stable,
            canary,
            canary_share,
            min_stable_regions,
            promote_after,
        })
    }

    /// The service's criticality, and the watermarks and shed rule it
    /// makes: sheddable names sit [`SHEDDABLE_OFFSET`] lower and shed at
    /// their reduce watermark; critical names are never shed for load. A
    /// `shed` written beside a class that sets it is refused.
    pub(super) fn criticality(
        &mut self,
        src: &Source<'_>,
        s: &ServiceSection,
        watermarks: Watermarks,
        shed: Shed,
        shed_set: bool,
    ) -> (Criticality, Watermarks, Shed) {
        let Some(given) = &s.criticality else {
            return (Criticality::Standard, watermarks, shed);
        };
        let Some(class) = Criticality::parse(given.get_ref()) else {
            let names: Vec<String> = Criticality::ALL
                .iter()
                .map(|(_, n)| format!("{n:?}"))
                .collect();
            self.err(
                src,
                given.span(),
                format!(
                    "criticality {:?} is not one of {}",
                    given.get_ref(),
                    names.join(", ")
                ),
            );
            return (Criticality::Standard, watermarks, shed);
        };
        if shed_set
            && class != Criticality::Standard
            && let Some(written) = &s.shed
        {
            self.err(
                src,
                written.span(),
                format!(
                    "shed and criticality = {:?}: choose one (a {} name's shed rule is set by its class)",
                    class.name(),
                    class.name()
                ),
            );
        }
        match class {
            Criticality::Critical => (class, watermarks, Shed::Never),
            Criticality::Standard => (class, watermarks, shed),
            Criticality::Sheddable => (class, watermarks.lowered(SHEDDABLE_OFFSET), Shed::AtReduce),
        }
    }
}

/// Names that answer whole regions (failover, proximity) keep a full
/// region by default: moving all of a name's clients at once at 95 %
/// would swing its whole load onto the next tier and back, and such names
/// are usually the critical ones that capacity names make room for.
/// Capacity and cost names shed at `remove`: for them a full region is
/// the end of a gradual ramp of weights.
pub fn default_shed(strategy: Strategy) -> Shed {
    match strategy {
        Strategy::Capacity | Strategy::Cost { .. } => Shed::AtRemove,
        Strategy::Failover | Strategy::Proximity { .. } => Shed::Never,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_answering_whole_regions_keep_full_ones_by_default() {
        let tolerance = Duration::from_millis(10);
        assert_eq!(default_shed(Strategy::Failover), Shed::Never);
        assert_eq!(default_shed(Strategy::Proximity { tolerance }), Shed::Never);
        assert_eq!(default_shed(Strategy::Capacity), Shed::AtRemove);
        assert_eq!(
            default_shed(Strategy::Cost { min_headroom: 0.2 }),
            Shed::AtRemove
        );
    }
}
