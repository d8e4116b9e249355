//! Operations: every admin route (with wrong tokens, oversize bodies and
//! unknown regions), Prometheus metrics parsed as a scraper would, explain
//! over DNS with its ACL, NSID, and reloads under continuous queries.

mod common;

use std::time::Duration;

use common::{FAST_PROBE, Server, base_config, http};
use hickory_proto::op::{Edns, Message, ResponseCode};
use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption, NSIDPayload};
use hickory_proto::rr::{RData, RecordType};
use inferdns::demo::client::{self, Ask, answer_strings, exchange_tcp, exchange_udp};
use inferdns::demo::{MODEL, SimRegion};

const TOKEN: &str = "s3cret-token";
const CHAT: &str = "chat.inference.example.com.";

/// Two regions (127.0.0.61 primary, 127.0.0.62 secondary), a token file,
/// NSID "edge-test", and the given extra server keys.
struct Ops {
    server: Server,
    _primary: SimRegion,
    _secondary: SimRegion,
}

async fn ops(server_extra: &str) -> Ops {
    let primary = SimRegion::start("127.0.0.61:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    let secondary = SimRegion::start("127.0.0.62:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    let extra = format!(
        r#"
[regions.primary]
endpoints = [{{ address = "127.0.0.61", port = {} }}]
{FAST_PROBE}

[regions.secondary]
endpoints = [{{ address = "127.0.0.62", port = {} }}]
{FAST_PROBE}

[services.chat]
tiers = [["primary"], ["secondary"]]
"#,
        primary.addr().port(),
        secondary.addr().port()
    );
    let main = base_config(&extra).replace(
        "startup-grace = \"3s\"",
        &format!("startup-grace = \"3s\"\nnsid = \"edge-test\"\n{server_extra}"),
    );
    let server = Server::start_with_token(&main, TOKEN).await;
    Ops {
        server,
        _primary: primary,
        _secondary: secondary,
    }
}

impl Ops {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.running.admin)
    }

    async fn chat(&self) -> Vec<String> {
        answer_strings(&self.server.udp(CHAT, RecordType::A).await)
    }
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test]
async fn drain_and_undrain_move_answers_within_one_snapshot() {
    let o = ops("").await;
    assert_eq!(o.chat().await, ["127.0.0.61"]);
    // No token, a wrong token: refused, and nothing changes.
    let (code, body) = http("POST", &o.url("/v1/regions/primary/drain"), None, None).await;
    assert_eq!(code, 401);
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .contains("bearer token")
    );
    let (code, _) = http(
        "POST",
        &o.url("/v1/regions/primary/drain"),
        Some("wrong"),
        None,
    )
    .await;
    assert_eq!(code, 401);
    assert_eq!(o.chat().await, ["127.0.0.61"]);
    // Unknown region.
    let (code, body) = http("POST", &o.url("/v1/regions/mars/drain"), Some(TOKEN), None).await;
    assert_eq!(code, 404);
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .contains("unknown region \"mars\"")
    );
    // Drain: the very next query already goes elsewhere.
    let (code, body) = http(
        "POST",
        &o.url("/v1/regions/primary/drain"),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["drained"], true);
    assert_eq!(o.chat().await, ["127.0.0.62"]);
    let (_, status) = http("GET", &o.url("/v1/status"), None, None).await;
    let status = json(&status);
    assert_eq!(status["drained"], serde_json::json!(["primary"]));
    let primary = status["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["region"] == "primary")
        .unwrap()
        .clone();
    assert_eq!(primary["drained"], true);
    assert_eq!(primary["status"], "up");
    // Drains survive a reload.
    let (code, _) = http("POST", &o.url("/v1/reload"), Some(TOKEN), None).await;
    assert_eq!(code, 200);
    assert_eq!(o.chat().await, ["127.0.0.62"]);
    let (code, _) = http(
        "POST",
        &o.url("/v1/regions/primary/undrain"),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(o.chat().await, ["127.0.0.61"]);
}

#[tokio::test]
async fn mutating_routes_are_disabled_without_a_token_file() {
    let s = Server::start(&base_config("")).await;
    let url = format!("http://{}/v1/reload", s.running.admin);
    let (code, body) = http("POST", &url, Some("anything"), None).await;
    assert_eq!(code, 403);
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .contains("admin-token-file")
    );
}

#[tokio::test]
async fn bodies_are_size_limited_and_errors_are_json() {
    let o = ops("").await;
    let (code, _) = http(
        "POST",
        &o.url("/v1/log-level"),
        Some(TOKEN),
        Some("x".repeat(100_000)),
    )
    .await;
    assert_eq!(code, 413);
    let (code, body) = http("GET", &o.url("/v1/nothing-here"), None, None).await;
    assert_eq!(code, 404);
    assert_eq!(json(&body)["error"], "no such route");
    // Errors axum answers itself are JSON too: a wrong method...
    let (code, body) = http("POST", &o.url("/v1/status"), Some(TOKEN), None).await;
    assert_eq!(code, 405);
    assert_eq!(
        json(&body)["error"],
        "method POST is not allowed on /v1/status"
    );
    let (code, body) = http("GET", &o.url("/v1/reload"), Some(TOKEN), None).await;
    assert_eq!(code, 405);
    assert_eq!(
        json(&body)["error"],
        "method GET is not allowed on /v1/reload"
    );
    // ...and a query string that does not parse.
    let (code, body) = http("GET", &o.url("/v1/explain?client=192.0.2.7"), None, None).await;
    assert_eq!(code, 400);
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .contains("missing field `name`"),
        "{body}"
    );
    for (path, code) in [("/healthz", 200), ("/readyz", 200)] {
        assert_eq!(
            http("GET", &o.url(path), None, None).await.0,
            code,
            "{path}"
        );
    }
}

/// The log filter is process-wide: every check of it is in this one test.
#[tokio::test]
async fn log_level_accepts_only_filters_whose_directives_name_a_level() {
    // This test process sets up logging as the daemon does (silent here).
    inferdns::log::init("off", inferdns::log::Format::Text);
    let o = ops("").await;
    let set = |filter: &str| {
        let url = o.url("/v1/log-level");
        let filter = filter.to_string();
        async move { http("POST", &url, Some(TOKEN), Some(filter)).await }
    };
    let current = || async {
        json(&http("GET", &o.url("/v1/log-level"), None, None).await.1)["filter"].clone()
    };
    // Valid and still quiet for the other tests of this process.
    let (code, body) = set("off,inferdns::admin=debug").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["filter"], "off,inferdns::admin=debug");
    let before = current().await;
    assert!(
        before.as_str().unwrap().contains("inferdns::admin=debug"),
        "{before}"
    );
    // A typo EnvFilter would take as a target (silencing every line), a bad
    // level, a bare target, nonsense: refused, and the filter stays.
    for bad in [
        "infoo",
        "inferdns=verbose",
        "info,inferdns",
        "[[[nonsense",
        "",
    ] {
        let (code, body) = set(bad).await;
        assert_eq!(code, 400, "{bad:?}: {body}");
        assert!(
            json(&body)["error"]
                .as_str()
                .unwrap()
                .contains("log filter"),
            "{bad:?}: {body}"
        );
        assert_eq!(current().await, before, "{bad:?} changed it");
    }
    let (code, body) = set("off").await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_count_what_happened() {
    let o = ops("").await;
    for _ in 0..3 {
        o.chat().await;
    }
    o.server
        .udp("nope.inference.example.com.", RecordType::A)
        .await;
    o.server.udp("example.org.", RecordType::A).await;
    http("POST", &o.url("/v1/reload"), Some(TOKEN), None).await;
    let (code, text) = http("GET", &o.url("/metrics"), None, None).await;
    assert_eq!(code, 200);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("valid exposition text");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{text}"))
    };
    assert_eq!(
        value(
            "inferdns_dns_queries_total",
            &[("service", "chat"), ("qtype", "A"), ("rcode", "NOERROR")]
        ),
        3.0
    );
    assert_eq!(
        value(
            "inferdns_dns_queries_total",
            &[("service", "-"), ("qtype", "A"), ("rcode", "NXDOMAIN")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "inferdns_dns_queries_total",
            &[("service", "-"), ("qtype", "A"), ("rcode", "REFUSED")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "inferdns_dns_answers_total",
            &[("service", "chat"), ("region", "primary")]
        ),
        3.0
    );
    assert_eq!(
        value(
            "inferdns_endpoint_up",
            &[("region", "primary"), ("endpoint", "127.0.0.61")]
        ),
        1.0
    );
    assert!(
        value(
            "inferdns_probes_total",
            &[
                ("region", "primary"),
                ("endpoint", "127.0.0.61"),
                ("layer", "alive"),
                ("result", "ok")
            ]
        ) >= 1.0
    );
    assert_eq!(
        value("inferdns_reloads_total", &[("result", "success")]),
        1.0
    );
    assert_eq!(
        value("inferdns_reloads_total", &[("result", "failure")]),
        0.0
    );
    assert_eq!(
        value(
            "inferdns_service_decision",
            &[("service", "chat"), ("decision", "tier")]
        ),
        1.0
    );
    assert_eq!(value("inferdns_service_tier", &[("service", "chat")]), 0.0);
    assert!(value("inferdns_snapshot_generation", &[]) >= 2.0);
    assert!(value("inferdns_snapshot_age_seconds", &[]) >= 0.0);
    assert_eq!(
        value(
            "inferdns_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "inferdns_probe_duration_seconds")
    );
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "inferdns_snapshot_build_seconds")
    );
    // Labels come from the config only: no client address or query name anywhere.
    assert!(!text.contains("127.0.0.1") && !text.contains("nope") && !text.contains("example.org"));
}

/// A TXT query over TCP (explanations are answered in full only there).
async fn txt(server: &Server, name: &str) -> Message {
    client::query_tcp(server.dns(), &Ask::new(name, RecordType::TXT))
        .await
        .unwrap()
}

fn txt_lines(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .flat_map(|r| match &r.data {
            RData::TXT(t) => t
                .txt_data
                .iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect::<Vec<_>>(),
            _ => Vec::new(),
        })
        .collect()
}

#[tokio::test]
async fn explain_answers_inside_the_acl_and_does_not_exist_outside() {
    let o = ops("").await;
    let m = txt(&o.server, "_explain.chat.inference.example.com.").await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(m.answers[0].ttl, 0);
    let lines = txt_lines(&m);
    let text = lines.join("\n");
    assert!(
        lines[0].starts_with("client 127.0.0.1 from the resolver address"),
        "{text}"
    );
    assert!(
        text.contains("tier 0 region primary endpoint 127.0.0.61: up -> kept"),
        "{text}"
    );
    assert!(
        text.contains(
            "tier 1 region secondary endpoint 127.0.0.62: up -> not used: a better tier is fit"
        ),
        "{text}"
    );
    assert!(text.contains("decision: tier 0 -> 127.0.0.61"), "{text}");
    // Over UDP (a spoofable source) the same question gets TC=1 and no
    // records, however large the client's buffer: dig retries over TCP.
    let m = client::query_udp(
        o.server.dns(),
        &Ask::new("_explain.chat.inference.example.com.", RecordType::TXT),
    )
    .await
    .unwrap();
    assert!(m.metadata.truncation);
    assert!(m.answers.is_empty());
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    // With ECS the client line says so.
    let mut ask = Ask::new("_explain.chat.inference.example.com.", RecordType::TXT).message();
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    edns.options_mut()
        .insert(EdnsOption::Subnet("198.51.100.0/24".parse().unwrap()));
    ask.set_edns(edns);
    let m = Message::from_vec(
        &exchange_tcp(
            o.server.dns(),
            &ask.to_vec().unwrap(),
            Duration::from_secs(2),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    assert!(
        txt_lines(&m)[0].starts_with("client 198.51.100.0/24 from ECS (resolver 127.0.0.1)"),
        "{:?}",
        txt_lines(&m)
    );
    // The same through the admin API, for any client.
    let (code, body) = http(
        "GET",
        &o.url("/v1/explain?name=chat.inference.example.com&client=192.0.2.7"),
        None,
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let lines = json(&body)["lines"].as_array().unwrap().clone();
    assert!(
        lines[0]
            .as_str()
            .unwrap()
            .starts_with("client 192.0.2.7 from the resolver address")
    );
    let (code, _) = http(
        "GET",
        &o.url("/v1/explain?name=www.inference.example.com"),
        None,
        None,
    )
    .await;
    assert_eq!(code, 404);
    let (code, _) = http(
        "GET",
        &o.url("/v1/explain?name=chat.inference.example.com&client=nope"),
        None,
        None,
    )
    .await;
    assert_eq!(code, 400);

    // Outside the ACL the name does not exist.
    let outside = ops("explain-acl = [\"192.0.2.0/24\"]").await;
    let m = txt(&outside.server, "_explain.chat.inference.example.com.").await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
}

#[tokio::test]
async fn nsid_is_sent_only_when_asked() {
    let o = ops("").await;
    let mut ask = Ask::new(CHAT, RecordType::A).message();
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    edns.options_mut()
        .insert(EdnsOption::NSID(NSIDPayload::new(Vec::new()).unwrap()));
    ask.set_edns(edns);
    let m = Message::from_vec(
        &exchange_udp(
            o.server.dns(),
            &ask.to_vec().unwrap(),
            Duration::from_secs(2),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    match m.edns.as_ref().unwrap().option(EdnsCode::NSID) {
        Some(EdnsOption::NSID(payload)) => assert_eq!(payload.as_ref(), b"edge-test"),
        other => panic!("no NSID in the answer: {other:?}"),
    }
    let plain = o.server.udp(CHAT, RecordType::A).await;
    assert!(
        plain
            .edns
            .as_ref()
            .unwrap()
            .option(EdnsCode::NSID)
            .is_none()
    );
}

/// Config texts for the reload test: the service answers region a or b.
fn reload_config(base: &str, tier: &str) -> String {
    base.replace(
        "tiers = [[\"primary\"], [\"secondary\"]]",
        &format!("tiers = [[\"{tier}\"]]"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_under_load_drop_nothing_and_answer_the_config_in_force() {
    let o = ops("").await;
    let path = o.server.files.dir.path().join("inferdns.toml");
    let base = std::fs::read_to_string(&path).unwrap();
    let dns = o.server.dns();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The expected answer, set before each reload starts and after it ends.
    let allowed = std::sync::Arc::new(std::sync::Mutex::new(vec![vec!["127.0.0.61".to_string()]]));
    // Right answers so far, so that each reload waits for the client to be
    // answered at least once (a count, not a rate).
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let client_task = {
        let stop = stop.clone();
        let allowed = allowed.clone();
        let answered = answered.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed, mut wrong) = (0u32, 0u32, Vec::new());
            let ask = Ask {
                timeout: Duration::from_secs(1),
                ..Ask::new(CHAT, RecordType::A)
            };
            // Bounded: at most 60 s, then it stops by itself.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::SeqCst)
                && tokio::time::Instant::now() < deadline
            {
                let expected = allowed.lock().unwrap().clone();
                match client::query_udp(dns, &ask).await {
                    Ok(m) if m.metadata.response_code == ResponseCode::NoError => {
                        let got = answer_strings(&m);
                        if expected.contains(&got) {
                            ok += 1;
                            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        } else {
                            wrong.push(got)
                        }
                    }
                    _ => failed += 1,
                }
            }
            (ok, failed, wrong)
        })
    };
    let (mut good, mut bad) = (0, 0);
    let mut current = "127.0.0.61";
    for i in 0..50 {
        // The client was answered since the last reload (bounded wait).
        let seen = answered.load(std::sync::atomic::Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while answered.load(std::sync::atomic::Ordering::SeqCst) == seen {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the client got no answer"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let broken = i % 2 == 1;
        let (next_tier, next_ip) = if current == "127.0.0.61" {
            ("secondary", "127.0.0.62")
        } else {
            ("primary", "127.0.0.61")
        };
        let text = if broken {
            // Broken in a different way each time: syntax, unknown region, bad TTL.
            match i % 3 {
                0 => format!("{}\n[services.x\n", reload_config(&base, next_tier)),
                1 => reload_config(&base, "nowhere"),
                _ => reload_config(&base, next_tier)
                    .replace("[services.chat]", "[services.chat]\nttl = 0"),
            }
        } else {
            reload_config(&base, next_tier)
        };
        std::fs::write(&path, text).unwrap();
        if !broken {
            *allowed.lock().unwrap() = vec![vec![current.to_string()], vec![next_ip.to_string()]];
        }
        let (code, body) = http("POST", &o.url("/v1/reload"), Some(TOKEN), None).await;
        if broken {
            assert_eq!(code, 422, "{body}");
            assert!(!json(&body)["problems"].as_array().unwrap().is_empty());
            bad += 1;
            assert_eq!(
                o.chat().await,
                [current],
                "a refused reload changes nothing"
            );
        } else {
            assert_eq!(code, 200, "{body}");
            good += 1;
            current = next_ip;
            *allowed.lock().unwrap() = vec![vec![current.to_string()]];
            assert_eq!(o.chat().await, [current], "the new config answers at once");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed, wrong) = client_task.await.unwrap();
    eprintln!(
        "reloads: {good} applied, {bad} refused; queries: {ok} right, {failed} failed, {} wrong",
        wrong.len()
    );
    assert_eq!((good, bad), (25, 25));
    assert_eq!(failed, 0, "no query failed or timed out");
    assert!(
        wrong.is_empty(),
        "answers outside the config in force: {wrong:?}"
    );
    assert!(
        ok >= 50,
        "the client was answered between every two reloads ({ok} answers)"
    );
    let (_, metrics) = http("GET", &o.url("/metrics"), None, None).await;
    assert!(
        metrics.contains("inferdns_reloads_total{result=\"failure\"} 25"),
        "{metrics}"
    );
    assert!(metrics.contains("inferdns_reloads_total{result=\"success\"} 25"));
    // Every one of them timed, applied or refused.
    assert!(
        metrics.contains("inferdns_reload_duration_seconds_count 50"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_adds_endpoints_serves_them_only_once_probed() {
    let o = ops("").await;
    let third = SimRegion::start("127.0.0.63:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    let path = o.server.files.dir.path().join("inferdns.toml");
    let base = std::fs::read_to_string(&path).unwrap();
    let text = base.replace(
        "[services.chat]\ntiers = [[\"primary\"], [\"secondary\"]]",
        &format!(
            "[regions.third]\nendpoints = [{{ address = \"127.0.0.63\", port = {} }}]\n\n[services.chat]\ntiers = [[\"third\"]]\nwhen-all-down = \"nodata\"",
            third.addr().port()
        ),
    );
    assert_ne!(text, base);
    std::fs::write(&path, text).unwrap();
    let (code, body) = http("POST", &o.url("/v1/reload"), Some(TOKEN), None).await;
    assert_eq!(code, 200, "{body}");
    // Not NODATA: the new endpoint was probed before the new config went live.
    assert_eq!(o.chat().await, ["127.0.0.63"]);
    let (_, status) = http("GET", &o.url("/v1/status"), None, None).await;
    let status = json(&status);
    let ep = status["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["region"] == "third")
        .unwrap()
        .clone();
    assert_eq!(ep["status"], "up");
    // The primary kept its state across the reload (no new first probe needed).
    let primary = status["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["region"] == "primary")
        .unwrap()
        .clone();
    assert_eq!(primary["status"], "up");
}
