//! Capacity: how full a region's GPUs are, and what share of answers that
//! leaves it.
//!
//! Owns: reading model servers' Prometheus `/metrics` with presets (vLLM V0
//! and V1, SGLang, TGI, llama.cpp, Triton, NIM, or named metrics), the
//! shape of pushed reports, and the pure weight function with its
//! watermarks and hysteresis. No sockets, no tasks: the probes fetch, the
//! publisher keeps the reports and expires them.

pub mod exposition;

use serde::{Deserialize, Serialize};

/// What one endpoint's metrics (or a push) say.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Load {
    /// KV-cache use, 0..1.
    pub kv_cache: Option<f64>,
    /// Requests waiting for a slot (the queue).
    pub waiting: Option<f64>,
    /// Requests being served.
    pub running: Option<f64>,
    /// GPU utilisation, 0..1.
    pub utilization: Option<f64>,
}

/// Which metric names carry which signal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Preset {
    /// Names of the KV-cache gauge, first found wins (0..1).
    pub kv_cache: Vec<(String, Option<(String, String)>)>,
    pub waiting: Vec<String>,
    pub running: Vec<String>,
    pub utilization: Vec<String>,
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

impl Preset {
    /// A built-in preset by name.
    pub fn named(name: &str) -> Option<Preset> {
        let plain = |list: &[&str]| list.iter().map(|n| (n.to_string(), None)).collect();
        Some(match name {
            // V1 `kv_cache_usage_perc`, older `gpu_cache_usage_perc` (both 0..1).
            "vllm" => Preset {
                kv_cache: plain(&["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]),
                waiting: names(&["vllm:num_requests_waiting"]),
                running: names(&["vllm:num_requests_running"]),
                utilization: Vec::new(),
            },
            "sglang" => Preset {
                kv_cache: plain(&["sglang:token_usage"]),
                waiting: names(&["sglang:num_queue_reqs"]),
                running: names(&["sglang:num_running_reqs"]),
                utilization: Vec::new(),
            },
            "tgi" => Preset {
                kv_cache: Vec::new(),
                waiting: names(&["tgi_queue_size"]),
                running: names(&["tgi_batch_current_size"]),
                utilization: Vec::new(),
            },
            "llamacpp" => Preset {
                kv_cache: Vec::new(),
                waiting: names(&["llamacpp:requests_deferred"]),
                running: names(&["llamacpp:requests_processing"]),
                utilization: Vec::new(),
            },
            "triton" => Preset {
                kv_cache: vec![(
                    "nv_trt_llm_kv_cache_block_metrics".into(),
                    Some(("kv_cache_block_type".into(), "fraction".into())),
                )],
                waiting: names(&["nv_inference_pending_request_count"]),
                running: Vec::new(),
                utilization: names(&["nv_gpu_utilization"]),
            },
            "nim" => Preset {
                kv_cache: plain(&[
                    "gpu_cache_usage_perc",
                    "vllm:kv_cache_usage_perc",
                    "vllm:gpu_cache_usage_perc",
                ]),
                waiting: names(&["num_requests_waiting", "vllm:num_requests_waiting"]),
                running: names(&["num_requests_running", "vllm:num_requests_running"]),
                utilization: Vec::new(),
            },
            _ => return None,
        })
    }

    /// The signals in a Prometheus text exposition. Gauges with several
    /// series (engines, GPUs) are summed for queues and averaged for ratios.
    pub fn read(&self, text: &str) -> Result<Load, String> {
        let samples = exposition::samples(text);
        if samples.is_empty() && !text.trim().is_empty() && !text.trim_start().starts_with('#') {
            return Err("no Prometheus samples in the answer".into());
        }
        let values = |name: &str, label: Option<&(String, String)>| -> Vec<f64> {
            samples
                .iter()
                .filter(|s| s.name == name)
                .filter(|s| label.is_none_or(|(k, v)| s.label(k) == Some(v.as_str())))
                .map(|s| s.value)
                .filter(|v| v.is_finite())
                .collect()
        };
        let first = |candidates: &[String], combine: fn(&[f64]) -> f64| {
            candidates
                .iter()
                .map(|n| values(n, None))
                .find(|v| !v.is_empty())
                .map(|v| combine(&v))
        };
        let kv_cache = self
            .kv_cache
            .iter()
            .map(|(n, label)| values(n, label.as_ref()))
            .find(|v| !v.is_empty())
            .map(|v| mean(&v).clamp(0.0, 1.0));
        Ok(Load {
            kv_cache,
            waiting: first(&self.waiting, sum),
            running: first(&self.running, sum),
            utilization: first(&self.utilization, mean).map(|u| u.clamp(0.0, 1.0)),
        })
    }
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

/// How hard a region is being shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    Normal,
    Prepare,
    Reduce,
    Removed,
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

/// Utilisation: the worst of KV-cache use, queue pressure and reported
/// utilisation. Queue pressure is the waiting requests over
/// `queue_saturation` (a queue that long counts as full).
pub fn utilization(load: &Load, queue_saturation: f64) -> Option<f64> {
    let queue = load
        .waiting
        .map(|w| (w / queue_saturation.max(1.0)).clamp(0.0, 1.0));
    [load.kv_cache, queue, load.utilization]
        .into_iter()
        .flatten()
        .fold(None, |worst: Option<f64>, u| {
            Some(worst.map_or(u, |w| w.max(u)))
        })
}

/// Share of answers: base weight x size x headroom, shed by level.
pub fn weight(base: f64, gpus: f64, util: Option<f64>, level: Level) -> f64 {
    let Some(util) = util else {
        // Unknown (no report, or expired): the static weight.
        return base * gpus;
    };
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

    const VLLM_V1: &str = r#"# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.9
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.94
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 3
vllm:num_requests_waiting{engine="1",model_name="llama"} 4
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 10
"#;

    #[test]
    fn presets_read_each_servers_names() {
        let load = Preset::named("vllm").unwrap().read(VLLM_V1).unwrap();
        assert!(
            (load.kv_cache.unwrap() - 0.92).abs() < 1e-9,
            "engines averaged"
        );
        assert_eq!(
            (load.waiting, load.running),
            (Some(7.0), Some(10.0)),
            "queues summed"
        );
        // vLLM before V1 named it gpu_cache_usage_perc.
        let v0 = "# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{model_name=\"x\"} 0.5\n";
        assert_eq!(
            Preset::named("vllm").unwrap().read(v0).unwrap().kv_cache,
            Some(0.5)
        );
        let sglang =
            "sglang:token_usage{model_name=\"x\"} 0.3\nsglang:num_queue_reqs{model_name=\"x\"} 2\n";
        let l = Preset::named("sglang").unwrap().read(sglang).unwrap();
        assert_eq!((l.kv_cache, l.waiting), (Some(0.3), Some(2.0)));
        let llamacpp = "# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 2\nllamacpp:requests_processing 2\n";
        let l = Preset::named("llamacpp").unwrap().read(llamacpp).unwrap();
        assert_eq!(
            (l.kv_cache, l.waiting, l.running),
            (None, Some(2.0), Some(2.0))
        );
        let triton = "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"fraction\",model=\"m\"} 0.6\nnv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"max\",model=\"m\"} 900\nnv_gpu_utilization{gpu_uuid=\"a\"} 0.5\nnv_gpu_utilization{gpu_uuid=\"b\"} 0.7\n";
        let l = Preset::named("triton").unwrap().read(triton).unwrap();
        assert_eq!(l.kv_cache, Some(0.6), "only the fraction series");
        assert!((l.utilization.unwrap() - 0.6).abs() < 1e-9);
        assert!(Preset::named("nope").is_none());
    }

    #[test]
    fn utilization_is_the_worst_signal() {
        let l = Load {
            kv_cache: Some(0.3),
            waiting: Some(6.0),
            running: Some(1.0),
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

    #[test]
    fn weights_follow_headroom_and_shed_at_the_watermarks() {
        let w = Watermarks::default();
        let at = |u: f64| weight(1.0, 4.0, Some(u), w.level(u, Level::Normal));
        assert!((at(0.30) - 2.8).abs() < 1e-9, "4 GPUs x 70% headroom");
        assert!(
            (at(0.85) - 4.0 * 0.15 * 0.5).abs() < 1e-9,
            "shedding begins at 80%"
        );
        assert!((at(0.92) - 4.0 * 0.08 * 0.1).abs() < 1e-9, "sharply at 90%");
        assert_eq!(at(0.96), 0.0, "removed at 95%");
        assert_eq!(
            weight(2.0, 4.0, None, Level::Normal),
            8.0,
            "unknown: the static weight"
        );
        assert!(at(0.5) > at(0.7) && at(0.7) > at(0.85) && at(0.85) > at(0.92));
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
