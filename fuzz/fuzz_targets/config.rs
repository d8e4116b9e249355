//! The real config loader (`config::load_str`, what `inferdns check` and a
//! reload run) on arbitrary text as the main file: it must never panic,
//! and every error it reports must name the file and a real position.
//!
//! The scratch directory holds a zone file (`zone.db`), a policy
//! directory (`policies/`) and a token file (`token`), so that the seeds
//! reach the checks behind them. Inputs naming `/dev`, `/proc` or `/sys`,
//! or using `\u` escapes (which could spell them), are skipped: reading
//! `/dev/zero` or `/dev/stdin` as a zone file never ends, which is the
//! operator's choice, not a bug.

#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;

const ZONE: &str =
    "$ORIGIN inference.example.com.\n$TTL 300\nwww IN A 192.0.2.80\ndocs IN CNAME www\n";
const POLICY: &str = "tiers = [[\"us-east\"]]\nstrategy = \"capacity\"\nrecords = 2\n";

static MAIN: LazyLock<PathBuf> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("inferdns-fuzz-config-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("policies")).expect("a scratch directory");
    std::fs::write(dir.join("zone.db"), ZONE).expect("the zone file is written");
    std::fs::write(dir.join("policies/batch.toml"), POLICY).expect("a policy is written");
    std::fs::write(dir.join("token"), "s3cret\n").expect("a token file is written");
    dir.join("inferdns.toml")
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if ["/dev", "/proc", "/sys", "\\u", "\\U"]
        .iter()
        .any(|s| text.contains(s))
    {
        return;
    }
    let path = &*MAIN;
    if let Err(errors) = inferdns::config::load_str(path, text) {
        assert!(!errors.0.is_empty(), "an error without a problem");
        let lines = text.split('\n').count();
        for e in &errors.0 {
            // Errors in the policy files name those files.
            if e.file == *path {
                assert!(
                    e.line >= 1 && e.line <= lines,
                    "{e} (the text has {lines} lines)"
                );
            }
            assert!(e.col >= 1, "{e}");
            let _ = e.to_string();
        }
    }
});
