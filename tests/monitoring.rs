//! Monitoring: a real `/metrics` scrape passes `promtool check metrics`,
//! carries the decision, reload and process metrics, and names every
//! metric that `packaging/prometheus-alerts.yml` and
//! `packaging/grafana-dashboard.json` use; the alert rules pass
//! `promtool check rules`.
//!
//! promtool comes with the Debian package `prometheus`. Without it these
//! checks are skipped with a note on stderr, except under `CI=true`, where
//! a missing promtool fails the test.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{FAST_PROBE, Server, base_config, http};
use hickory_proto::rr::RecordType;
use inferdns::demo::{MODEL, SimRegion};

const TOKEN: &str = "m0nitor-token";
const LIMIT: Duration = Duration::from_secs(10);
const ALERTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/packaging/prometheus-alerts.yml"
);
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/packaging/grafana-dashboard.json"
);

/// `promtool` when it runs; `None` (after saying so) when it is missing
/// outside CI. Under `CI=true` a missing promtool fails the test.
fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Some("promtool");
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "promtool is required under CI=true (Debian package `prometheus`)"
    );
    eprintln!("SKIPPED: promtool not found (apt-get install prometheus); not checking with it");
    None
}

/// Runs promtool with `args`, `stdin` piped in; panics with its output
/// unless it succeeds.
fn run_promtool(promtool: &str, args: &[&str], stdin: &str) -> String {
    let mut child = Command::new(promtool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool starts");
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(stdin.as_bytes())
        .expect("promtool reads its input");
    let out = child.wait_with_output().expect("promtool ends");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{text}\ninput:\n{stdin}"
    );
    text
}

/// `chat` (tiers up, then down), `lost` (only a dead region, NODATA), a
/// capacity report pushed for `up` and a drain undone: every family the
/// packaging files use has a series.
struct Monitored {
    server: Server,
    _up: SimRegion,
}

async fn monitored() -> Monitored {
    let up = SimRegion::start("127.0.0.91:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    let main = base_config(&format!(
        r#"
[regions.up]
endpoints = [{{ address = "127.0.0.91", port = {} }}]
{FAST_PROBE}

[regions.dead]
endpoints = [{{ address = "127.0.0.92", port = 1 }}]
{FAST_PROBE}

[services.chat]
tiers = [["up"], ["dead"]]

[services.lost]
tiers = [["dead"]]
when-all-down = "nodata"
"#,
        up.addr().port()
    ));
    let server = Server::start_with_token(&main, TOKEN).await;
    Monitored { server, _up: up }
}

impl Monitored {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.running.admin)
    }

    async fn scrape(&self) -> String {
        let (code, text) = http("GET", &self.url("/metrics"), None, None).await;
        assert_eq!(code, 200, "{text}");
        text
    }

    /// Polls the scrape until it has `line` (a whole sample line).
    async fn wait_sample(&self, line: &str) -> String {
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            let text = self.scrape().await;
            if text.lines().any(|l| l == line) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {line:?} in:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Exercises drain, capacity push, reload and queries.
    async fn exercise(&self) {
        self.server
            .wait_answer("chat.inference.example.com.", &["127.0.0.91"], LIMIT)
            .await;
        for path in ["/v1/regions/dead/drain", "/v1/regions/dead/undrain"] {
            let (code, text) = http("POST", &self.url(path), Some(TOKEN), None).await;
            assert_eq!(code, 200, "{path}: {text}");
        }
        let report = r#"{"kv_cache": 0.25}"#.to_string();
        let (code, text) = http(
            "POST",
            &self.url("/v1/regions/up/capacity"),
            Some(TOKEN),
            Some(report),
        )
        .await;
        assert_eq!(code, 200, "{text}");
        let (code, text) = http("POST", &self.url("/v1/reload"), Some(TOKEN), None).await;
        assert_eq!(code, 200, "{text}");
        self.server
            .udp("lost.inference.example.com.", RecordType::A)
            .await;
    }
}

/// The value of the sample line that starts with `series`.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Every metric name in `text` that starts with `inferdns_` or
/// `process_`, as PromQL or the exposition format writes it.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for prefix in ["inferdns_", "process_"] {
        let mut rest = text;
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().next_back();
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            // A name, not the end of a longer word nor a bare prefix (`inferdns_*`).
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.ends_with('_')
            {
                names.insert(name.to_string());
            }
            rest = &tail[end..];
        }
    }
    names
}

/// The names of the samples of a scrape (histograms by their `_bucket`,
/// `_sum` and `_count` series).
fn scraped_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            l.split(['{', ' '])
                .next()
                .expect("a sample line has a name")
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn a_real_scrape_has_the_decisions_and_passes_promtool() {
    let m = monitored().await;
    m.exercise().await;
    // The dead region is down: `lost` answers NODATA, `chat` its first tier.
    let text = m
        .wait_sample(r#"inferdns_service_decision{decision="nodata",service="lost"} 1"#)
        .await;
    for (series, expected) in [
        (
            r#"inferdns_service_decision{decision="tier",service="chat"}"#,
            1.0,
        ),
        (
            r#"inferdns_service_decision{decision="fail_open",service="chat"}"#,
            0.0,
        ),
        (
            r#"inferdns_service_decision{decision="tier",service="lost"}"#,
            0.0,
        ),
        (r#"inferdns_service_tier{service="chat"}"#, 0.0),
        (r#"inferdns_region_utilization_ratio{region="up"}"#, 0.25),
        (r#"inferdns_region_drained{region="dead"}"#, 0.0),
        (
            r#"inferdns_region_shed_level{region="up",service="chat"}"#,
            0.0,
        ),
        (r#"inferdns_residency_refusals_total{service="chat"}"#, 0.0),
        (r#"inferdns_reloads_total{result="success"}"#, 1.0),
    ] {
        assert_eq!(value(&text, series), Some(expected), "{series} in:\n{text}");
    }
    // No tier serves `lost`: its tier is absent, not a sentinel.
    assert_eq!(
        value(&text, r#"inferdns_service_tier{service="lost"}"#),
        None
    );
    // Every decision kind is a series of each service, exactly one at 1.
    for service in ["chat", "lost"] {
        let current: Vec<&str> = inferdns::metrics::DECISIONS
            .iter()
            .copied()
            .filter(|d| {
                let series =
                    format!(r#"inferdns_service_decision{{decision="{d}",service="{service}"}}"#);
                let v = value(&text, &series);
                assert!(v.is_some(), "no {series} in:\n{text}");
                v == Some(1.0)
            })
            .collect();
        assert_eq!(current.len(), 1, "{service}: {current:?}");
    }
    // Probe results name their layer and endpoint.
    assert!(
        value(
            &text,
            r#"inferdns_probes_total{endpoint="127.0.0.92",layer="alive",region="dead",result="refused"}"#
        )
        .is_some_and(|v| v >= 1.0),
        "{text}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let loaded = value(&text, "inferdns_last_reload_success_timestamp_seconds")
        .unwrap_or_else(|| panic!("no reload timestamp in:\n{text}"));
    assert!(loaded > now - 3600.0 && loaded <= now, "{loaded} vs {now}");
    // The process metrics, on Linux.
    if cfg!(target_os = "linux") {
        assert!(value(&text, "process_resident_memory_bytes").is_some_and(|v| v > 0.0));
        assert!(value(&text, "process_open_fds").is_some_and(|v| v > 0.0));
        assert!(value(&text, "process_max_fds").is_some_and(|v| v > 0.0));
        assert!(value(&text, "process_cpu_seconds_total").is_some());
        assert!(value(&text, "process_start_time_seconds").is_some_and(|v| v <= now));
    }
    // No value is the old -1 "unknown" sentinel.
    assert!(
        !text.lines().any(|l| l.ends_with(" -1")),
        "a -1 sentinel in:\n{text}"
    );
    if let Some(promtool) = promtool() {
        let out = run_promtool(promtool, &["check", "metrics"], &text);
        // promtool prints lint problems and still exits 0 on some of them.
        assert!(out.trim().is_empty(), "promtool check metrics:\n{out}");
    }
}

#[tokio::test]
async fn alert_rules_check_and_every_metric_they_and_the_dashboard_use_is_scraped() {
    let alerts = std::fs::read_to_string(ALERTS).unwrap();
    let dashboard = std::fs::read_to_string(DASHBOARD).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let exprs: Vec<&str> = parsed["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .collect();
    assert!(exprs.len() > 20, "the dashboard has its queries");

    let m = monitored().await;
    m.exercise().await;
    let text = m
        .wait_sample(r#"inferdns_service_decision{decision="nodata",service="lost"} 1"#)
        .await;
    let scraped = scraped_names(&text);
    let used_by_alerts = metric_names(&alerts);
    let used_by_dashboard = metric_names(&exprs.join("\n"));
    for (file, used) in [(ALERTS, &used_by_alerts), (DASHBOARD, &used_by_dashboard)] {
        assert!(used.len() > 8, "{file} uses {used:?}");
        let missing: Vec<&String> = used.iter().filter(|n| !scraped.contains(*n)).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics a scrape does not have: {missing:?}\nscrape:\n{text}"
        );
    }
    // The ones on-call needs most are among them.
    for name in [
        "inferdns_service_decision",
        "inferdns_endpoint_up",
        "inferdns_region_shed_level",
        "inferdns_reloads_total",
        "inferdns_geoip_loads_total",
        "process_start_time_seconds",
    ] {
        assert!(used_by_alerts.contains(name), "no alert on {name}");
    }
    if let Some(promtool) = promtool() {
        let out = run_promtool(promtool, &["check", "rules", ALERTS], "");
        assert!(out.contains("SUCCESS"), "{out}");
    }
}

#[test]
fn metric_names_are_found_in_expressions() {
    let names = metric_names(
        r#"sum by (le) (rate(inferdns_probe_duration_seconds_bucket{job="x"}[5m])) / process_max_fds and not_inferdns_x, inferdns_* names"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["inferdns_probe_duration_seconds_bucket", "process_max_fds"]
    );
}
