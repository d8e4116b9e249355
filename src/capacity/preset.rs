//! Metrics presets: which series of a model server's Prometheus `/metrics`
//! carry which capacity signal, checked against what each server documents
//! (README, "Capacity-aware routing", has the table and the reasons).
//!
//! Pure: the probe fetches the text (and llama.cpp's `/props`), this reads it.

use super::{Load, exposition, mean, sum};

/// One gauge: a metric name, and a label its series must carry (if any).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Series {
    pub name: String,
    pub label: Option<(String, String)>,
}

impl Series {
    pub fn plain(name: &str) -> Self {
        Self {
            name: name.to_string(),
            label: None,
        }
    }

    pub fn labelled(name: &str, key: &str, value: &str) -> Self {
        Self {
            name: name.to_string(),
            label: Some((key.to_string(), value.to_string())),
        }
    }
}

fn plain(list: &[&str]) -> Vec<Series> {
    list.iter().map(|n| Series::plain(n)).collect()
}

/// Which metric names carry which signal. In each list the first name
/// found in the text wins.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Preset {
    /// KV-cache use, 0..1 (series averaged).
    pub kv_cache: Vec<Series>,
    /// KV use as a ratio of two gauges (tokens held, token budget), read
    /// when no `kv_cache` gauge is found.
    pub kv_ratio: Vec<(Series, Series)>,
    /// Requests waiting for a slot or for KV space (series summed).
    pub waiting: Vec<Series>,
    /// Requests being served (series summed).
    pub running: Vec<Series>,
    /// The most requests the server runs at once (its slots; series summed).
    pub slots: Vec<Series>,
    /// The slot count comes from `GET /props` (`total_slots`): llama.cpp.
    pub props_slots: bool,
    /// A waiting request means no slot is free: llama.cpp defers a task
    /// only when every slot is busy. Lets the queue say "full" even when
    /// the slot count could not be read.
    pub queue_means_full: bool,
    /// A utilisation gauge, 0..1 (series averaged).
    pub utilization: Vec<Series>,
}

/// The path llama.cpp serves its properties on (`total_slots` among them).
pub const PROPS_PATH: &str = "/props";

impl Preset {
    /// The built-in presets, by the name a config gives.
    pub const NAMES: &[&str] = &["vllm", "sglang", "tgi", "llamacpp", "triton", "nim"];

    /// A built-in preset by name.
    pub fn named(name: &str) -> Option<Preset> {
        Some(match name {
            // V1 `kv_cache_usage_perc`, V0 (and V1 before 0.10) `gpu_cache_usage_perc`;
            // both 0..1. vLLM exports no slot count (`max_num_seqs`).
            "vllm" => Preset {
                kv_cache: plain(&["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]),
                waiting: plain(&["vllm:num_requests_waiting"]),
                running: plain(&["vllm:num_requests_running"]),
                ..Preset::default()
            },
            // `token_usage` is the KV pool's use (0..1).
            "sglang" => Preset {
                kv_cache: plain(&["sglang:token_usage"]),
                waiting: plain(&["sglang:num_queue_reqs"]),
                running: plain(&["sglang:num_running_reqs"]),
                ..Preset::default()
            },
            // No KV gauge; the v3 backend exports its token budget
            // (`tgi_batch_max_total_tokens`, set once at warm-up) and the
            // running batch's tokens (`tgi_batch_current_max_tokens`):
            // their ratio is what TGI's own scheduler admits requests by.
            "tgi" => Preset {
                kv_ratio: vec![(
                    Series::plain("tgi_batch_current_max_tokens"),
                    Series::plain("tgi_batch_max_total_tokens"),
                )],
                waiting: plain(&["tgi_queue_size"]),
                running: plain(&["tgi_batch_current_size"]),
                ..Preset::default()
            },
            // No KV gauge (removed in llama.cpp PR #13660): busy slots
            // (`requests_processing`) against `total_slots` from `/props`,
            // and the queue (`requests_deferred`, requests with no free slot).
            "llamacpp" => Preset {
                waiting: plain(&["llamacpp:requests_deferred"]),
                running: plain(&["llamacpp:requests_processing"]),
                props_slots: true,
                queue_means_full: true,
                ..Preset::default()
            },
            // TensorRT-LLM's batch manager behind Triton: KV block fraction,
            // its own queue, active requests against its maximum; Triton's
            // pending count for other backends. `nv_gpu_utilization` is not
            // read: kernel-busy time is near 100% at modest decode load and
            // says little about headroom (name it with `generic` if wanted).
            "triton" => Preset {
                kv_cache: vec![Series::labelled(
                    "nv_trt_llm_kv_cache_block_metrics",
                    "kv_cache_block_type",
                    "fraction",
                )],
                waiting: vec![
                    Series::labelled("nv_trt_llm_request_metrics", "request_type", "waiting"),
                    Series::plain("nv_inference_pending_request_count"),
                ],
                running: vec![Series::labelled(
                    "nv_trt_llm_request_metrics",
                    "request_type",
                    "active",
                )],
                slots: vec![Series::labelled(
                    "nv_trt_llm_request_metrics",
                    "request_type",
                    "max",
                )],
                ..Preset::default()
            },
            // NIM for LLMs 1.x: unprefixed vLLM names plus `num_request_max`
            // (the most concurrent requests); NIM 2.x may use vLLM's names.
            "nim" => Preset {
                kv_cache: plain(&[
                    "gpu_cache_usage_perc",
                    "vllm:kv_cache_usage_perc",
                    "vllm:gpu_cache_usage_perc",
                ]),
                waiting: plain(&["num_requests_waiting", "vllm:num_requests_waiting"]),
                running: plain(&["num_requests_running", "vllm:num_requests_running"]),
                slots: plain(&["num_request_max"]),
                ..Preset::default()
            },
            _ => return None,
        })
    }

    /// The signals in a Prometheus text exposition. Gauges with several
    /// series (engines, GPUs) are summed for counts and averaged for ratios.
    pub fn read(&self, text: &str) -> Result<Load, String> {
        let samples = exposition::samples(text);
        if samples.is_empty() && !text.trim().is_empty() && !text.trim_start().starts_with('#') {
            return Err("no Prometheus samples in the answer".into());
        }
        let values = |series: &Series| -> Vec<f64> {
            samples
                .iter()
                .filter(|s| s.name == series.name)
                .filter(|s| {
                    series
                        .label
                        .as_ref()
                        .is_none_or(|(k, v)| s.label(k) == Some(v.as_str()))
                })
                .map(|s| s.value)
                .filter(|v| v.is_finite())
                .collect()
        };
        // Finite samples can still add up to infinity (and inf / inf is
        // NaN): a figure that is not finite is no figure.
        let first = |candidates: &[Series], combine: fn(&[f64]) -> f64| {
            candidates
                .iter()
                .map(values)
                .find(|v| !v.is_empty())
                .map(|v| combine(&v))
                .filter(|v| v.is_finite())
        };
        let ratio = || {
            self.kv_ratio.iter().find_map(|(used, total)| {
                let total = sum(&values(total));
                let used = values(used);
                (total > 0.0 && !used.is_empty())
                    .then(|| sum(&used) / total)
                    .filter(|v| v.is_finite())
            })
        };
        let kv_cache = first(&self.kv_cache, mean)
            .or_else(ratio)
            .map(|v| v.clamp(0.0, 1.0));
        Ok(Load {
            kv_cache,
            waiting: first(&self.waiting, sum),
            running: first(&self.running, sum),
            slots: first(&self.slots, sum).filter(|s| *s > 0.0),
            utilization: first(&self.utilization, mean).map(|u| u.clamp(0.0, 1.0)),
        })
    }

    /// `load` completed with what the metrics cannot say: the slot count
    /// from `/props` (when the preset reads it), else, for a server that
    /// queues only when every slot is busy, the busy slots themselves.
    pub fn complete(&self, mut load: Load, props_slots: Option<f64>) -> Load {
        if load.slots.is_none() && self.props_slots {
            load.slots = props_slots.filter(|s| s.is_finite() && *s > 0.0);
        }
        if load.slots.is_none()
            && self.queue_means_full
            && let (Some(waiting), Some(running)) = (load.waiting, load.running)
            && waiting > 0.0
            && running > 0.0
        {
            load.slots = Some(running);
        }
        load
    }
}

/// `total_slots` of a llama.cpp `/props` body.
pub fn total_slots(props: &[u8]) -> Result<f64, String> {
    let v: serde_json::Value =
        serde_json::from_slice(props).map_err(|e| format!("/props is not JSON: {e}"))?;
    v.get("total_slots")
        .and_then(serde_json::Value::as_f64)
        .filter(|s| s.is_finite() && *s >= 1.0)
        .ok_or_else(|| "/props has no positive total_slots".to_string())
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

    /// Caught by the `exposition` fuzz target's check (ratios in 0..=1) on
    /// an input written by hand: finite samples that add up to infinity
    /// made the TGI KV ratio inf / inf, a NaN KV-cache use.
    #[test]
    fn sums_that_overflow_are_no_figure() {
        let text = "tgi_batch_current_max_tokens 1e308\n\
                    tgi_batch_current_max_tokens 1e308\n\
                    tgi_batch_max_total_tokens 1e308\n\
                    tgi_batch_max_total_tokens 1e308\n\
                    tgi_queue_size 1e308\n\
                    tgi_queue_size 1e308\n";
        let load = preset("tgi").read(text).unwrap();
        assert_eq!(load.kv_cache, None, "{load:?}");
        assert_eq!(load.waiting, None, "{load:?}");
    }

    fn preset(name: &str) -> Preset {
        Preset::named(name).unwrap()
    }

    #[test]
    fn every_name_is_a_preset() {
        for name in Preset::NAMES {
            assert!(Preset::named(name).is_some(), "{name}");
        }
        assert!(Preset::named("nope").is_none());
    }

    #[test]
    fn vllm_v1_and_v0() {
        let load = preset("vllm").read(VLLM_V1).unwrap();
        assert!(
            (load.kv_cache.unwrap() - 0.92).abs() < 1e-9,
            "engines averaged"
        );
        assert_eq!(
            (load.waiting, load.running, load.slots),
            (Some(7.0), Some(10.0), None),
            "queues summed; vLLM exports no slot count"
        );
        // vLLM before V1 named it gpu_cache_usage_perc.
        let v0 = "# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{model_name=\"x\"} 0.5\n";
        assert_eq!(preset("vllm").read(v0).unwrap().kv_cache, Some(0.5));
    }

    #[test]
    fn sglang_token_usage_and_queue() {
        let sglang = "sglang:token_usage{model_name=\"x\"} 0.3\nsglang:num_queue_reqs{model_name=\"x\"} 2\nsglang:num_running_reqs{model_name=\"x\"} 5\n";
        let l = preset("sglang").read(sglang).unwrap();
        assert_eq!(
            (l.kv_cache, l.waiting, l.running),
            (Some(0.3), Some(2.0), Some(5.0))
        );
    }

    #[test]
    fn tgi_token_budget_is_its_kv_signal() {
        let tgi = "tgi_queue_size 3\ntgi_batch_current_size 12\ntgi_batch_current_max_tokens 24576\ntgi_batch_max_total_tokens 32768\n";
        let l = preset("tgi").read(tgi).unwrap();
        assert_eq!(l.kv_cache, Some(0.75), "24576 of 32768 budget tokens");
        assert_eq!((l.waiting, l.running), (Some(3.0), Some(12.0)));
        // Without the budget gauge (older routers): queue only.
        let old =
            "tgi_queue_size 3\ntgi_batch_current_size 12\ntgi_batch_current_max_tokens 24576\n";
        assert_eq!(preset("tgi").read(old).unwrap().kv_cache, None);
    }

    #[test]
    fn triton_trt_llm_series_by_label() {
        let triton = r#"nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="m",version="1"} 0.6
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="m",version="1"} 900
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 3
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="context",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 4
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"} 64
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 7
nv_inference_pending_request_count{model="ensemble",version="1"} 9
nv_gpu_utilization{gpu_uuid="a"} 0.99
"#;
        let l = preset("triton").read(triton).unwrap();
        assert_eq!(l.kv_cache, Some(0.6), "only the fraction series");
        assert_eq!(
            (l.waiting, l.running, l.slots),
            (Some(3.0), Some(7.0), Some(64.0))
        );
        assert_eq!(l.utilization, None, "GPU busy time is not headroom");
        // Another backend: Triton's own pending count is the queue.
        let plain = "nv_inference_pending_request_count{model=\"m\",version=\"1\"} 2\n";
        assert_eq!(preset("triton").read(plain).unwrap().waiting, Some(2.0));
    }

    #[test]
    fn nim_unprefixed_names_and_request_max() {
        let nim = "gpu_cache_usage_perc 0.4\nnum_requests_waiting 1\nnum_requests_running 30\nnum_request_max 32\n";
        let l = preset("nim").read(nim).unwrap();
        assert_eq!(
            (l.kv_cache, l.waiting, l.running, l.slots),
            (Some(0.4), Some(1.0), Some(30.0), Some(32.0))
        );
    }

    #[test]
    fn llamacpp_slots_from_props_or_from_a_queue() {
        let busy = "llamacpp:requests_processing 2\nllamacpp:requests_deferred 2\n";
        let p = preset("llamacpp");
        let read = p.read(busy).unwrap();
        assert_eq!(
            (read.kv_cache, read.waiting, read.running, read.slots),
            (None, Some(2.0), Some(2.0), None)
        );
        assert_eq!(p.complete(read, Some(2.0)).slots, Some(2.0), "from /props");
        // /props unreadable: a queue still says every slot is busy.
        assert_eq!(p.complete(read, None).slots, Some(2.0));
        let one_busy = p
            .read("llamacpp:requests_processing 1\nllamacpp:requests_deferred 0\n")
            .unwrap();
        assert_eq!(p.complete(one_busy, None).slots, None, "unknown");
        assert_eq!(p.complete(one_busy, Some(4.0)).slots, Some(4.0));
        // Other presets ignore /props.
        assert_eq!(preset("vllm").complete(read, Some(2.0)).slots, None);
    }

    #[test]
    fn props_total_slots() {
        assert_eq!(total_slots(br#"{"total_slots":4,"n_ctx":1}"#), Ok(4.0));
        assert!(total_slots(br#"{"total_slots":0}"#).is_err());
        assert!(total_slots(br#"{"slots":2}"#).is_err());
        assert!(total_slots(b"<html>").is_err());
    }
}
