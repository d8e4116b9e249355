//! Capacity: how full a region's GPUs are, and what share of answers that
//! leaves it.
//!
//! Owns: reading model servers' Prometheus `/metrics` with presets (vLLM V0
//! and V1, SGLang, TGI, llama.cpp, Triton, NIM, or named metrics), the
//! shape of pushed reports, and the pure weight function with its
//! watermarks and hysteresis. No sockets, no tasks: the probes fetch, the
//! publisher keeps the reports and expires them.

pub mod exposition;
mod preset;

use serde::{Deserialize, Serialize};

pub use preset::{PROPS_PATH, Preset, Series, total_slots};

/// What one endpoint's metrics (or a push) say.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Load {
    /// KV-cache use, 0..1.
    pub kv_cache: Option<f64>,
    /// Requests waiting for a slot (the queue).
    pub waiting: Option<f64>,
    /// Requests being served.
    pub running: Option<f64>,
    /// The most requests served at once (llama.cpp's slots, TensorRT-LLM's
    /// maximum active requests, NIM's `num_request_max`).
    #[serde(default)]
    pub slots: Option<f64>,
    /// GPU utilisation, 0..1.
    pub utilization: Option<f64>,
}

fn sum(v: &[f64]) -> f64 {
    v.iter().sum()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Combines the loads of a region's endpoints: queues add up, ratios average.
pub fn combine(loads: &[Load]) -> Load {
    let avg = |f: fn(&Load) -> Option<f64>| {
        let v: Vec<f64> = loads.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| mean(&v))
    };
    let add = |f: fn(&Load) -> Option<f64>| {
        let v: Vec<f64> = loads.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| sum(&v))
    };
    Load {
        kv_cache: avg(|l| l.kv_cache),
        waiting: add(|l| l.waiting),
        running: add(|l| l.running),
        slots: add(|l| l.slots),
        utilization: avg(|l| l.utilization),
    }
}

/// Watermarks of utilisation (0..1) and the hysteresis band.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Watermarks {
    /// Begin shedding.
    pub prepare: f64,
    /// Reduce sharply.
    pub reduce: f64,
    /// Remove (unless every region is this full).
    pub remove: f64,
    /// A level is left only when utilisation falls this far below it.
    pub hysteresis: f64,
}

impl Default for Watermarks {
    /// From practice (and GIE's saturation detector at 0.8): 80 / 90 / 95 %.
    fn default() -> Self {
        Self {
            prepare: 0.80,
            reduce: 0.90,
            remove: 0.95,
            hysteresis: 0.03,
        }
    }
}

/// How much a service's traffic matters when GPUs run short.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Criticality {
    /// Keeps its share of a region while the region is below its prepare
    /// watermark (the others leave to make that room); load never removes
    /// a region from it, only health does.
    Critical,
    /// The service's own watermarks and shed rule (the default).
    Standard,
    /// Watermarks [`SHEDDABLE_OFFSET`] lower, shed at its reduce watermark,
    /// and when every fit region is past it: its fallback or NODATA, never
    /// a full region.
    Sheddable,
}

/// How far below the service's watermarks a sheddable name's sit.
pub const SHEDDABLE_OFFSET: f64 = 0.15;

impl Criticality {
    pub const ALL: [(Criticality, &'static str); 3] = [
        (Criticality::Critical, "critical"),
        (Criticality::Standard, "standard"),
        (Criticality::Sheddable, "sheddable"),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(c, _)| *c == self)
            .map_or("standard", |(_, n)| n)
    }

    pub fn parse(name: &str) -> Option<Criticality> {
        Self::ALL.iter().find(|(_, n)| *n == name).map(|(c, _)| *c)
    }
}

impl Watermarks {
    /// Every watermark `by` lower (a sheddable name's), none below 0.01.
    pub fn lowered(self, by: f64) -> Watermarks {
        Watermarks {
            prepare: (self.prepare - by).max(0.01),
            reduce: (self.reduce - by).max(0.02),
            remove: (self.remove - by).max(0.03),
            hysteresis: self.hysteresis,
        }
    }
}

/// How hard a region is being shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    Normal,
    Prepare,
    Reduce,
    Removed,
}

impl Level {
    /// The level's name, as in the status JSON and the logs.
    pub fn name(self) -> &'static str {
        match self {
            Level::Normal => "normal",
            Level::Prepare => "prepare",
            Level::Reduce => "reduce",
            Level::Removed => "removed",
        }
    }
}

impl Watermarks {
    /// The level for `util`, given the level before: going up at a
    /// watermark, coming down only `hysteresis` below it.
    pub fn level(&self, util: f64, before: Level) -> Level {
        let up = if util >= self.remove {
            Level::Removed
        } else if util >= self.reduce {
            Level::Reduce
        } else if util >= self.prepare {
            Level::Prepare
        } else {
            Level::Normal
        };
        if up >= before {
            return up;
        }
        // Lower than before: step down only past the band.
        let h = self.hysteresis;
        let down = if util >= self.remove - h {
            Level::Removed
        } else if util >= self.reduce - h {
            Level::Reduce
        } else if util >= self.prepare - h {
            Level::Prepare
        } else {
            Level::Normal
        };
        down.min(before)
    }
}

/// Which shedding level takes a region out of one service's answers (the
/// service's `shed` key). Weights fall with headroom whatever the rule;
/// this decides when load alone removes a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shed {
    /// Load never removes a region from this service; only health does
    /// (the default of `failover` and `proximity` names).
    Never,
    /// From the `remove` watermark, unless every fit region is that full
    /// (the default of `capacity` and `cost` names).
    AtRemove,
    /// From the `reduce` watermark: a sheddable name leaves a busy region
    /// before the others do.
    AtReduce,
}

impl Shed {
    /// Every rule with its config name.
    pub const ALL: [(Shed, &'static str); 3] = [
        (Shed::Never, "never"),
        (Shed::AtRemove, "at-remove"),
        (Shed::AtReduce, "at-reduce"),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(s, _)| *s == self)
            .map_or("never", |(_, n)| n)
    }

    pub fn parse(name: &str) -> Option<Shed> {
        Self::ALL.iter().find(|(_, n)| *n == name).map(|(s, _)| *s)
    }

    /// A region at `level` is out of this service's answers (while some
    /// fit region is not).
    pub fn removes(self, level: Level) -> bool {
        match self {
            Shed::Never => false,
            Shed::AtRemove => level >= Level::Removed,
            Shed::AtReduce => level >= Level::Reduce,
        }
    }
}

/// Utilisation: the worst of
/// - KV-cache use;
/// - slot use: `(running + waiting) / slots`, capped at 1, when the server
///   says how many requests it serves at once: the share of its slots in
///   use, and 100 % as soon as requests wait for one (a new request would
///   wait too) - so two busy slots of two with two queued is full;
/// - queue pressure: waiting requests over `queue_saturation` (a queue
///   that long counts as full), for servers that queue for KV space rather
///   than for a slot;
/// - reported utilisation.
pub fn utilization(load: &Load, queue_saturation: f64) -> Option<f64> {
    let queue = load
        .waiting
        .map(|w| (w / queue_saturation.max(1.0)).clamp(0.0, 1.0));
    [load.kv_cache, slot_use(load), queue, load.utilization]
        .into_iter()
        .flatten()
        .fold(None, |worst: Option<f64>, u| {
            Some(worst.map_or(u, |w| w.max(u)))
        })
}

/// `(running + waiting) / slots`, 0..1; `None` without both figures.
pub fn slot_use(load: &Load) -> Option<f64> {
    let slots = load.slots.filter(|s| *s > 0.0)?;
    let demand = load.running? + load.waiting.unwrap_or(0.0);
    Some((demand / slots).clamp(0.0, 1.0))
}

/// Share of answers: base weight x size x headroom, shed by level. A
/// critical name keeps the static share (base x size) while the region is
/// below its prepare watermark: the headroom the others leave is its.
pub fn weight(
    base: f64,
    gpus: f64,
    util: Option<f64>,
    level: Level,
    criticality: Criticality,
) -> f64 {
    let Some(util) = util else {
        // Unknown (no report, or expired): the static weight.
        return base * gpus;
    };
    if criticality == Criticality::Critical && level == Level::Normal {
        return base * gpus;
    }
    let headroom = (1.0 - util).max(0.0);
    let shed = match level {
        Level::Normal => 1.0,
        Level::Prepare => 0.5,
        Level::Reduce => 0.1,
        Level::Removed => 0.0,
    };
    base * gpus * headroom * shed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utilization_is_the_worst_signal() {
        let l = Load {
            kv_cache: Some(0.3),
            waiting: Some(6.0),
            running: Some(1.0),
            slots: None,
            utilization: Some(0.5),
        };
        assert_eq!(utilization(&l, 8.0), Some(0.75), "6 of 8 waiting");
        assert_eq!(utilization(&Load::default(), 8.0), None);
        let full_queue = Load {
            waiting: Some(100.0),
            ..Load::default()
        };
        assert_eq!(utilization(&full_queue, 8.0), Some(1.0));
    }

    /// llama.cpp's captured states (tests/fixtures/llama.cpp): 2 slots.
    #[test]
    fn busy_slots_and_a_queue_are_full() {
        let slots = |running: f64, waiting: f64| Load {
            running: Some(running),
            waiting: Some(waiting),
            slots: Some(2.0),
            ..Load::default()
        };
        let u = |l: Load| utilization(&l, 8.0).unwrap();
        assert_eq!(u(slots(0.0, 0.0)), 0.0, "idle");
        assert_eq!(u(slots(1.0, 0.0)), 0.5, "one slot of two");
        assert_eq!(u(slots(2.0, 0.0)), 1.0, "every slot busy");
        assert_eq!(u(slots(2.0, 2.0)), 1.0, "busy and two queued: capped");
        let w = Watermarks::default();
        assert_eq!(w.level(u(slots(2.0, 2.0)), Level::Normal), Level::Removed);
        // Without a slot count the queue alone decides, as before: 2 of 8.
        let unknown = Load {
            slots: None,
            ..slots(2.0, 2.0)
        };
        assert_eq!(u(unknown), 0.25);
        // Slots of several endpoints add up, like their requests.
        let region = combine(&[slots(2.0, 1.0), slots(0.0, 0.0)]);
        assert_eq!((region.slots, slot_use(&region)), (Some(4.0), Some(0.75)));
    }

    #[test]
    fn weights_follow_headroom_and_shed_at_the_watermarks() {
        let w = Watermarks::default();
        let at = |u: f64| {
            weight(
                1.0,
                4.0,
                Some(u),
                w.level(u, Level::Normal),
                Criticality::Standard,
            )
        };
        assert!((at(0.30) - 2.8).abs() < 1e-9, "4 GPUs x 70% headroom");
        assert!(
            (at(0.85) - 4.0 * 0.15 * 0.5).abs() < 1e-9,
            "shedding begins at 80%"
        );
        assert!((at(0.92) - 4.0 * 0.08 * 0.1).abs() < 1e-9, "sharply at 90%");
        assert_eq!(at(0.96), 0.0, "removed at 95%");
        assert_eq!(
            weight(2.0, 4.0, None, Level::Normal, Criticality::Standard),
            8.0,
            "unknown: the static weight"
        );
        assert!(at(0.5) > at(0.7) && at(0.7) > at(0.85) && at(0.85) > at(0.92));
    }

    #[test]
    fn shed_rules_by_level() {
        use Level::*;
        let removed = |shed: Shed| {
            [Normal, Prepare, Reduce, Removed]
                .into_iter()
                .filter(|l| shed.removes(*l))
                .collect::<Vec<_>>()
        };
        assert_eq!(removed(Shed::Never), []);
        assert_eq!(removed(Shed::AtRemove), [Removed]);
        assert_eq!(removed(Shed::AtReduce), [Reduce, Removed]);
        for (shed, name) in Shed::ALL {
            assert_eq!((Shed::parse(name), shed.name()), (Some(shed), name));
        }
        assert_eq!(Shed::parse("capacity"), None);
    }

    #[test]
    fn hysteresis_keeps_levels_from_flapping() {
        let w = Watermarks::default();
        assert_eq!(w.level(0.91, Level::Normal), Level::Reduce);
        // Just under the watermark: stays until 3 points below it.
        assert_eq!(w.level(0.89, Level::Reduce), Level::Reduce);
        assert_eq!(w.level(0.871, Level::Reduce), Level::Reduce);
        assert_eq!(w.level(0.86, Level::Reduce), Level::Prepare);
        assert_eq!(w.level(0.70, Level::Reduce), Level::Normal);
        assert_eq!(w.level(0.945, Level::Removed), Level::Removed);
        assert_eq!(w.level(0.90, Level::Removed), Level::Reduce);
        // Oscillating around 80% does not flip back and forth.
        let mut level = Level::Normal;
        let mut flips = 0;
        for u in [0.81, 0.79, 0.805, 0.795, 0.80, 0.785] {
            let next = w.level(u, level);
            flips += usize::from(next != level);
            level = next;
        }
        assert_eq!(flips, 1);
    }

    #[test]
    fn loads_combine_queues_add_ratios_average() {
        let a = Load {
            kv_cache: Some(0.2),
            waiting: Some(1.0),
            ..Load::default()
        };
        let b = Load {
            kv_cache: Some(0.6),
            waiting: Some(3.0),
            running: Some(2.0),
            ..Load::default()
        };
        let c = combine(&[a, b]);
        assert!((c.kv_cache.unwrap() - 0.4).abs() < 1e-9);
        assert_eq!(
            (c.waiting, c.running, c.utilization),
            (Some(4.0), Some(2.0), None)
        );
    }
}

/// The largest GPU count a pushed report may give for one region (the
/// largest clusters today hold a few hundred thousand).
pub const MAX_PUSHED_GPUS: f64 = 1_000_000.0;
/// The largest queue depth a pushed report may give for one region.
pub const MAX_PUSHED_QUEUE: f64 = 1_000_000.0;

/// A capacity report pushed by a region over the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushReport {
    /// 0..=[`MAX_PUSHED_GPUS`]
    pub gpus_total: Option<f64>,
    /// 0..=`gpus_total`
    pub gpus_free: Option<f64>,
    /// 0..=1
    pub utilization: Option<f64>,
    /// 0..=[`MAX_PUSHED_QUEUE`]
    pub queue_depth: Option<f64>,
    /// 0..=1
    pub kv_cache: Option<f64>,
}

/// Why a pushed report was refused, and the field at fault (if one is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushError {
    pub field: Option<&'static str>,
    pub reason: String,
}

impl PushReport {
    /// Nonsense is refused whole, naming the field: every value must be a
    /// finite number within its documented bounds.
    pub fn validate(&self) -> Result<(), PushError> {
        let within = |v: Option<f64>, field: &'static str, max: f64| match v {
            Some(x) if !(x.is_finite() && (0.0..=max).contains(&x)) => Err(PushError {
                field: Some(field),
                reason: format!("{field} must be between 0 and {max}, got {x}"),
            }),
            _ => Ok(()),
        };
        within(self.utilization, "utilization", 1.0)?;
        within(self.kv_cache, "kv_cache", 1.0)?;
        within(self.queue_depth, "queue_depth", MAX_PUSHED_QUEUE)?;
        within(self.gpus_total, "gpus_total", MAX_PUSHED_GPUS)?;
        within(self.gpus_free, "gpus_free", MAX_PUSHED_GPUS)?;
        if let (Some(total), Some(free)) = (self.gpus_total, self.gpus_free)
            && free > total
        {
            return Err(PushError {
                field: Some("gpus_free"),
                reason: format!("gpus_free ({free}) is more than gpus_total ({total})"),
            });
        }
        if self.gpus_free.is_some() && self.gpus_total.is_none() {
            return Err(PushError {
                field: Some("gpus_free"),
                reason: "gpus_free needs gpus_total".into(),
            });
        }
        if *self == PushReport::default() {
            return Err(PushError {
                field: None,
                reason: "the report says nothing: give utilization, kv_cache, queue_depth or gpus"
                    .into(),
            });
        }
        Ok(())
    }

    /// As a load: busy GPUs count as utilisation when no utilisation is given.
    pub fn load(&self) -> Load {
        let busy = match (self.gpus_total, self.gpus_free) {
            (Some(total), Some(free)) if total > 0.0 => Some(1.0 - free / total),
            _ => None,
        };
        Load {
            kv_cache: self.kv_cache,
            waiting: self.queue_depth,
            running: None,
            slots: None,
            utilization: self.utilization.or(busy),
        }
    }
}

/// A stable pseudo-random number in (0, 1] from two keys (splitmix64).
pub fn unit_hash(a: u64, b: u64) -> f64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
}

/// Rendezvous (highest-random-weight) score: the lowest wins. Weighted so
/// an item is chosen with probability proportional to its weight, and
/// adding an item moves only the keys it now wins.
pub fn rendezvous_score(key: u64, item: u64, weight: f64) -> f64 {
    if weight <= 0.0 {
        return f64::INFINITY;
    }
    -unit_hash(key, item).ln() / weight
}

#[cfg(test)]
mod pick_tests {
    use super::*;

    fn winner(key: u64, items: &[(u64, f64)]) -> u64 {
        items
            .iter()
            .min_by(|a, b| {
                rendezvous_score(key, a.0, a.1).total_cmp(&rendezvous_score(key, b.0, b.1))
            })
            .unwrap()
            .0
    }

    #[test]
    fn rendezvous_shares_follow_weights() {
        let items = [(1, 3.0), (2, 1.0)];
        let n = 20_000u64;
        let ones = (0..n).filter(|k| winner(*k, &items) == 1).count() as f64 / n as f64;
        // Expected 0.75; binomial sd is 0.003, so 0.02 is over 6 sd.
        assert!((ones - 0.75).abs() < 0.02, "{ones}");
    }

    #[test]
    fn adding_a_region_moves_fewer_than_one_in_n_subnets() {
        let before: Vec<(u64, f64)> = (1..=4).map(|i| (i, 1.0)).collect();
        let mut after = before.clone();
        after.push((5, 1.0));
        let subnets = 10_000u64;
        let moved = (0..subnets)
            .filter(|k| winner(*k, &before) != winner(*k, &after))
            .count() as f64
            / subnets as f64;
        // Ideal: exactly the 1/5 that the new region wins; never more than 1/N + 2%.
        assert!(moved < 1.0 / 5.0 + 0.02, "{moved}");
        assert!(moved > 1.0 / 5.0 - 0.02, "{moved}");
        // And every moved subnet moved to the new region.
        assert!(
            (0..subnets).all(|k| winner(k, &before) == winner(k, &after) || winner(k, &after) == 5)
        );
    }

    #[test]
    fn push_reports_are_validated_whole() {
        assert!(
            PushReport {
                utilization: Some(0.3),
                ..PushReport::default()
            }
            .validate()
            .is_ok()
        );
        assert_eq!(
            PushReport {
                utilization: Some(1.3),
                ..PushReport::default()
            }
            .validate()
            .unwrap_err()
            .field,
            Some("utilization")
        );
        assert!(
            PushReport {
                kv_cache: Some(f64::NAN),
                ..PushReport::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            PushReport {
                queue_depth: Some(-1.0),
                ..PushReport::default()
            }
            .validate()
            .is_err()
        );
        let too_free = PushReport {
            gpus_total: Some(4.0),
            gpus_free: Some(5.0),
            ..PushReport::default()
        };
        assert!(
            too_free
                .validate()
                .unwrap_err()
                .reason
                .contains("more than gpus_total")
        );
        assert!(PushReport::default().validate().is_err());
        let gpus = PushReport {
            gpus_total: Some(8.0),
            gpus_free: Some(2.0),
            ..PushReport::default()
        };
        assert_eq!(gpus.load().utilization, Some(0.75));
    }

    #[test]
    fn pushed_values_are_bounded() {
        // 2^64 - 1 GPUs, as a JSON number: parses, and is refused.
        let huge: PushReport =
            serde_json::from_str(r#"{"gpus_total": 18446744073709551615}"#).unwrap();
        assert_eq!(huge.validate().unwrap_err().field, Some("gpus_total"));
        let at_max = PushReport {
            gpus_total: Some(MAX_PUSHED_GPUS),
            gpus_free: Some(0.0),
            ..PushReport::default()
        };
        assert!(at_max.validate().is_ok());
        let over = |report: PushReport| report.validate().unwrap_err().field;
        assert_eq!(
            over(PushReport {
                gpus_total: Some(MAX_PUSHED_GPUS + 1.0),
                ..PushReport::default()
            }),
            Some("gpus_total")
        );
        assert_eq!(
            over(PushReport {
                queue_depth: Some(MAX_PUSHED_QUEUE * 2.0),
                ..PushReport::default()
            }),
            Some("queue_depth")
        );
        assert_eq!(
            over(PushReport {
                kv_cache: Some(f64::INFINITY),
                ..PushReport::default()
            }),
            Some("kv_cache")
        );
        assert_eq!(
            over(PushReport {
                gpus_free: Some(-1.0),
                gpus_total: Some(4.0),
                ..PushReport::default()
            }),
            Some("gpus_free")
        );
    }
}
