//! The Prometheus text reader (`capacity::exposition::samples`) and every
//! metrics preset reading its samples into a load, as the capacity probe
//! does with a model server's `/metrics` body. Never panics; a sample's
//! name is a valid metric name; the ratios a load holds (KV cache, GPU
//! utilisation, the utilisation derived from them) are numbers in 0..=1.

#![no_main]

use inferdns::capacity::{Preset, exposition};
use libfuzzer_sys::fuzz_target;

fn ratio(what: &str, value: Option<f64>) {
    if let Some(v) = value {
        assert!((0.0..=1.0).contains(&v), "{what} is {v}");
    }
}

fuzz_target!(|data: &[u8]| {
    // What the probe does with a body that is not UTF-8.
    let text = String::from_utf8_lossy(data);
    for sample in exposition::samples(&text) {
        let mut chars = sample.name.chars();
        let first = chars.next().expect("a sample has a name");
        assert!(first.is_ascii_alphabetic() || first == '_' || first == ':');
        assert!(chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'));
    }
    for name in Preset::NAMES {
        let preset = Preset::named(name).expect("a preset by its listed name");
        let Ok(load) = preset.read(&text) else {
            continue;
        };
        for slots in [None, Some(4.0)] {
            let load = preset.complete(load, slots);
            ratio("kv_cache", load.kv_cache);
            ratio("utilization", load.utilization);
            ratio("slot use", inferdns::capacity::slot_use(&load));
            ratio(
                "the utilisation",
                inferdns::capacity::utilization(&load, 8.0),
            );
        }
    }
});
