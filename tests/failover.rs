//! Failover and failback with simulated regions over real sockets. Timing
//! bounds are asserted on the paused clock in `publish::tests`; here the
//! deadlines are generous and only the outcome is checked.

mod common;

use std::time::Duration;

use common::{FAST_PROBE, Server, base_config};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use inferdns::demo::client::answer_strings;
use inferdns::demo::{Fault, MODEL, SimRegion};

const LIMIT: Duration = Duration::from_secs(10);
const CHAT: &str = "chat.inference.example.com.";

struct Setup {
    server: Server,
    primary: SimRegion,
    _secondary: SimRegion,
}

/// `primary` (127.0.0.31) then `secondary` (127.0.0.32); `before` runs on the
/// primary before the server starts.
async fn setup(before: Fault) -> Setup {
    let primary = SimRegion::start("127.0.0.31:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    let secondary = SimRegion::start("127.0.0.32:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    primary.set_fault(before);
    let extra = format!(
        r#"
[regions.primary]
endpoints = [{{ address = "127.0.0.31", port = {p} }}]
{FAST_PROBE}

[regions.secondary]
endpoints = [{{ address = "127.0.0.32", port = {s} }}]
{FAST_PROBE}

[services.chat]
tiers = [["primary"], ["secondary"]]
"#,
        p = primary.addr().port(),
        s = secondary.addr().port()
    );
    let server = Server::start(&base_config(&extra)).await;
    Setup {
        server,
        primary,
        _secondary: secondary,
    }
}

#[tokio::test]
async fn killed_primary_fails_over_and_back() {
    let s = setup(Fault::None).await;
    s.server.wait_answer(CHAT, &["127.0.0.31"], LIMIT).await;
    s.primary.set_fault(Fault::Down);
    s.server.wait_answer(CHAT, &["127.0.0.32"], LIMIT).await;
    s.primary.set_fault(Fault::None);
    s.server.wait_answer(CHAT, &["127.0.0.31"], LIMIT).await;
}

#[tokio::test]
async fn hung_primary_fails_over_and_back() {
    let s = setup(Fault::None).await;
    s.server.wait_answer(CHAT, &["127.0.0.31"], LIMIT).await;
    s.primary.set_fault(Fault::Hung);
    s.server.wait_answer(CHAT, &["127.0.0.32"], LIMIT).await;
    s.primary.set_fault(Fault::None);
    s.server.wait_answer(CHAT, &["127.0.0.31"], LIMIT).await;
}

#[tokio::test]
async fn a_health_body_that_never_completes_takes_the_primary_out() {
    // Status line and headers at once, then the body a byte per 100 ms: a
    // half-dead proxy. Alive means a whole answer within the timeout.
    let s = setup(Fault::None).await;
    s.server.wait_answer(CHAT, &["127.0.0.31"], LIMIT).await;
    s.primary.set_fault(Fault::SlowDrip);
    s.server.wait_answer(CHAT, &["127.0.0.32"], LIMIT).await;
    s.primary.set_fault(Fault::None);
    s.server.wait_answer(CHAT, &["127.0.0.31"], LIMIT).await;
}

#[tokio::test]
async fn error_statuses_take_the_primary_out() {
    for fault in [Fault::Unavailable, Fault::RateLimited] {
        let s = setup(Fault::None).await;
        s.server.wait_answer(CHAT, &["127.0.0.31"], LIMIT).await;
        s.primary.set_fault(fault);
        s.server.wait_answer(CHAT, &["127.0.0.32"], LIMIT).await;
    }
}

// Multi-threaded, so the publisher really runs beside `start`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_answer_already_reflects_the_probes() {
    for fault in [Fault::Down, Fault::Hung] {
        let s = setup(fault).await;
        let status = common::http_get(&format!("http://{}/v1/status", s.server.running.admin))
            .await
            .1;
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        assert!(
            status["snapshot"]["generation"].as_u64().unwrap() > 1,
            "probe results published before serving"
        );
        // No waiting: the very first query after start.
        let m = s.server.udp(CHAT, RecordType::A).await;
        assert_eq!(
            answer_strings(&m),
            ["127.0.0.32"],
            "dead primary ({fault:?}) never answered as alive"
        );
    }
}

/// With no startup grace, DNS is served before the first probe result: an
/// endpoint nobody has probed yet is never answered (not even by
/// fail-open); SERVFAIL sends the resolver to another edge. Once the probe
/// has timed out it is known down, and fail-open may answer it.
#[tokio::test]
async fn an_unprobed_endpoint_is_never_answered_even_by_fail_open() {
    let hung = SimRegion::start("127.0.0.36:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    hung.set_fault(Fault::Hung);
    let extra = format!(
        r#"
[regions.r]
endpoints = [{{ address = "127.0.0.36", port = {} }}]
probe = {{ path = "/health", interval = "1s", timeout = "5s", rise = 2, fall = 2 }}

[services.chat]
tiers = [["r"]]
when-all-down = "fail-open"
"#,
        hung.addr().port()
    );
    let main = base_config(&extra).replace("startup-grace = \"3s\"", "startup-grace = \"0s\"");
    let server = Server::start(&main).await;
    // The first probe takes its whole 5 s timeout.
    let m = server.udp(CHAT, RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(answer_strings(&m).is_empty());
    let url = format!("http://{}/v1/status", server.running.admin);
    let status: serde_json::Value = serde_json::from_str(&common::http_get(&url).await.1).unwrap();
    assert_eq!(status["services"][0]["decision"]["state"], "unprobed");
    assert_eq!(status["endpoints"][0]["status"], "unknown");
    // Known down after its timeout: fail-open answers it.
    server.wait_answer(CHAT, &["127.0.0.36"], LIMIT).await;
    let status: serde_json::Value = serde_json::from_str(&common::http_get(&url).await.1).unwrap();
    assert_eq!(status["services"][0]["decision"]["state"], "fail-open");
    assert_eq!(status["endpoints"][0]["status"], "down");
}

#[tokio::test]
async fn only_fit_endpoints_of_the_winning_tier_are_answered() {
    let a = SimRegion::start("127.0.0.33:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    let b = SimRegion::start("127.0.0.34:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    let extra = format!(
        r#"
[regions.pool]
endpoints = [{{ address = "127.0.0.33", port = {} }}, {{ address = "127.0.0.34", port = {} }}]
{FAST_PROBE}

[services.chat]
tiers = [["pool"]]
when-all-down = "nodata"
last-known-good = "0s"
"#,
        a.addr().port(),
        b.addr().port()
    );
    let server = Server::start(&base_config(&extra)).await;
    server
        .wait_answer(CHAT, &["127.0.0.33", "127.0.0.34"], LIMIT)
        .await;
    b.set_fault(Fault::Down);
    server.wait_answer(CHAT, &["127.0.0.33"], LIMIT).await;
    a.set_fault(Fault::Hung);
    // Nothing fit: this service says NODATA.
    server.wait_answer(CHAT, &[], LIMIT).await;
    b.set_fault(Fault::None);
    server.wait_answer(CHAT, &["127.0.0.34"], LIMIT).await;
}

/// Issue 13, item 4, over real sockets: the primary has hung for a while
/// and the secondary serves; then the secondary hangs too (as every probe of
/// a loaded edge times out). The secondary, fit a moment ago, is answered
/// as last known good for the hold; then fail-open answers the first tier.
#[tokio::test]
async fn a_loss_of_everything_at_once_answers_the_last_known_good_first() {
    let primary = SimRegion::start("127.0.0.37:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    let secondary = SimRegion::start("127.0.0.38:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    let extra = format!(
        r#"
[regions.primary]
endpoints = [{{ address = "127.0.0.37", port = {p} }}]
{FAST_PROBE}

[regions.secondary]
endpoints = [{{ address = "127.0.0.38", port = {s} }}]
{FAST_PROBE}

[services.chat]
tiers = [["primary"], ["secondary"]]
when-all-down = "fail-open"
last-known-good = "4s"
"#,
        p = primary.addr().port(),
        s = secondary.addr().port()
    );
    let server = Server::start(&base_config(&extra)).await;
    server.wait_answer(CHAT, &["127.0.0.37"], LIMIT).await;
    primary.set_fault(Fault::Hung);
    server.wait_answer(CHAT, &["127.0.0.38"], LIMIT).await;
    secondary.set_fault(Fault::Hung);
    let url = format!("http://{}/v1/status", server.running.admin);
    let deadline = tokio::time::Instant::now() + LIMIT;
    let chat = loop {
        let status: serde_json::Value =
            serde_json::from_str(&common::http_get(&url).await.1).unwrap();
        let chat = status["services"][0].clone();
        if chat["decision"]["state"] != "tier" {
            break chat;
        }
        assert!(tokio::time::Instant::now() < deadline, "{chat}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(chat["decision"]["state"], "last-known-good", "{chat}");
    assert_eq!(chat["decision"]["tier"], 1);
    assert_eq!(chat["decision"]["then"], "fail-open");
    assert_eq!(chat["answer"], serde_json::json!(["127.0.0.38"]));
    // Then the configured rule: fail-open answers the first tier.
    server.wait_answer(CHAT, &["127.0.0.37"], LIMIT).await;
    let status: serde_json::Value = serde_json::from_str(&common::http_get(&url).await.1).unwrap();
    assert_eq!(status["services"][0]["decision"]["state"], "fail-open");
}

#[tokio::test]
async fn status_shows_each_endpoint_and_its_last_error() {
    let s = setup(Fault::None).await;
    s.primary.set_fault(Fault::Down);
    s.server.wait_answer(CHAT, &["127.0.0.32"], LIMIT).await;
    let url = format!("http://{}/v1/status", s.server.running.admin);
    let (_, body) = common::http_get(&url).await;
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let endpoints = status["endpoints"].as_array().unwrap();
    let primary = endpoints
        .iter()
        .find(|e| e["target"] == "127.0.0.31")
        .unwrap();
    assert_eq!(primary["status"], "down");
    assert_eq!(primary["last_error"], "connection refused");
    assert_eq!(primary["region"], "primary");
    let secondary = endpoints
        .iter()
        .find(|e| e["target"] == "127.0.0.32")
        .unwrap();
    assert_eq!(secondary["status"], "up");
    let chat = &status["services"][0];
    assert_eq!(chat["decision"]["state"], "tier");
    assert_eq!(chat["decision"]["tier"], 1);
    assert_eq!(chat["answer"][0], "127.0.0.32");
    assert_eq!(
        chat["regions"],
        serde_json::json!([{ "region": "secondary", "share": 1.0 }])
    );
    let regions = status["regions"].as_array().unwrap();
    assert_eq!(
        regions[0],
        serde_json::json!({
            "id": "primary", "drained": false, "endpoints": 1, "endpoints_up": 0,
            "utilization": null, "gpus": 1.0
        })
    );
    assert_eq!(regions[1]["endpoints_up"], 1);
    assert!(status["snapshot"]["generation"].as_u64().unwrap() > 1);
    for (path, code) in [("/healthz", 200), ("/readyz", 200), ("/nope", 404)] {
        let url = format!("http://{}{path}", s.server.running.admin);
        assert_eq!(common::http_get(&url).await.0, code, "{path}");
    }
}

#[tokio::test]
async fn probes_send_the_configured_host_header_and_our_user_agent() {
    let region = SimRegion::start("127.0.0.35:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    let extra = format!(
        r#"
[regions.r]
endpoints = [{{ address = "127.0.0.35", port = {} }}]
probe = {{ path = "/health", host = "vllm.internal.example", interval = "100ms" }}

[services.chat]
tiers = [["r"]]
"#,
        region.addr().port()
    );
    let _server = Server::start(&base_config(&extra)).await;
    assert_eq!(
        region.last_header("host").as_deref(),
        Some("vllm.internal.example")
    );
    let agent = region.last_header("user-agent").unwrap();
    assert!(agent.starts_with("inferdns/"), "{agent}");
    // A wrong expected status takes the endpoint out even though /health is 200.
    let extra = format!(
        r#"
[regions.r]
endpoints = [{{ address = "127.0.0.35", port = {} }}]
probe = {{ expect-status = 204 }}

[services.chat]
tiers = [["r"]]
when-all-down = "nodata"
"#,
        region.addr().port()
    );
    let server = Server::start(&base_config(&extra)).await;
    let m = server.udp(CHAT, RecordType::A).await;
    assert!(answer_strings(&m).is_empty());
}
