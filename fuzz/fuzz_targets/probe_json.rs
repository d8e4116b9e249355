//! The JSON bodies probes read from model servers: the model list
//! (OpenAI `/v1/models`, Ollama `/api/tags`, llama.cpp's mix of both),
//! a completion, and llama.cpp's `/props`. Never panics; a model list
//! comes back sorted without duplicates, a slot count is finite and >= 1.

#![no_main]

use inferdns::health::probe::{parse_completion, parse_models};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Ok(ids) = parse_models(body) {
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    }
    let _ = parse_completion(body);
    if let Ok(slots) = inferdns::capacity::total_slots(body) {
        assert!(slots.is_finite() && slots >= 1.0, "{slots}");
    }
});
