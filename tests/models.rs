//! Model-aware health over real sockets: per-model eligibility, typed
//! failures with their own rules, hung and slow-drip backends, synthetic
//! completions, model fallback. (Slow start and cool-down timing are tested
//! on the paused clock in `publish::tests`.)

mod common;

use std::time::Duration;

use common::{Server, base_config, http};
use hickory_proto::rr::{RData, RecordType};
use inferdns::demo::client::answer_strings;
use inferdns::demo::{Fault, SimRegion};

const LIMIT: Duration = Duration::from_secs(10);
const LLAMA: &str = "llama-3.1-8b";
const MISTRAL: &str = "mistral-7b";
const PROBE: &str = r#"probe = { path = "/health", interval = "100ms", timeout = "300ms", rise = 2, fall = 2, models-path = "/v1/models", models-interval = "100ms", cooldown = "1s" }"#;

struct Setup {
    server: Server,
    a: SimRegion,
    b: SimRegion,
}

/// Regions a (127.0.0.81) and b (127.0.0.82) both serve llama and mistral;
/// services `llama` and `mistral` prefer a, then b.
async fn setup(extra: &str) -> Setup {
    let a = SimRegion::start_models("127.0.0.81:0".parse().unwrap(), &[LLAMA, MISTRAL])
        .await
        .unwrap();
    let b = SimRegion::start_models("127.0.0.82:0".parse().unwrap(), &[LLAMA, MISTRAL])
        .await
        .unwrap();
    let text = format!(
        r#"
[regions.a]
endpoints = [{{ address = "127.0.0.81", port = {} }}]
{PROBE}

[regions.b]
endpoints = [{{ address = "127.0.0.82", port = {} }}]
{PROBE}

[services.llama]
model = "{LLAMA}"
tiers = [["a"], ["b"]]
when-all-down = "nodata"

[services.mistral]
model = "{MISTRAL}"
tiers = [["a"], ["b"]]
when-all-down = "nodata"
{extra}
"#,
        a.addr().port(),
        b.addr().port()
    );
    Setup {
        server: Server::start(&base_config(&text)).await,
        a,
        b,
    }
}

async fn status(s: &Server) -> serde_json::Value {
    let (_, body) = http(
        "GET",
        &format!("http://{}/v1/status", s.running.admin),
        None,
        None,
    )
    .await;
    serde_json::from_str(&body).unwrap()
}

fn endpoint(status: &serde_json::Value, ip: &str) -> serde_json::Value {
    status["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["target"] == ip)
        .unwrap()
        .clone()
}

#[tokio::test]
async fn a_missing_model_takes_the_endpoint_out_for_that_model_only() {
    let s = setup("").await;
    s.server
        .wait_answer("llama.inference.example.com.", &["127.0.0.81"], LIMIT)
        .await;
    s.server
        .wait_answer("mistral.inference.example.com.", &["127.0.0.81"], LIMIT)
        .await;
    // /health stays 200, but llama is no longer listed on a.
    s.a.set_fault(Fault::ModelMissing);
    s.server
        .wait_answer("llama.inference.example.com.", &["127.0.0.82"], LIMIT)
        .await;
    assert_eq!(
        answer_strings(
            &s.server
                .udp("mistral.inference.example.com.", RecordType::A)
                .await
        ),
        ["127.0.0.81"]
    );
    let st = status(&s.server).await;
    let a = endpoint(&st, "127.0.0.81");
    assert_eq!(a["status"], "up", "alive: not a death");
    assert_eq!(a["models"], serde_json::json!([MISTRAL]));
    let (_, why) = http(
        "GET",
        &format!(
            "http://{}/v1/explain?name=llama.inference.example.com&client=127.0.0.1",
            s.server.running.admin
        ),
        None,
        None,
    )
    .await;
    assert!(
        why.contains(&format!("removed at eligible: model {LLAMA} not listed")),
        "{why}"
    );
    // The model comes back.
    s.a.set_fault(Fault::None);
    s.server
        .wait_answer("llama.inference.example.com.", &["127.0.0.81"], LIMIT)
        .await;
}

#[tokio::test]
async fn rate_limiting_cools_down_without_counting_as_dead() {
    let s = setup("").await;
    s.server
        .wait_answer("llama.inference.example.com.", &["127.0.0.81"], LIMIT)
        .await;
    s.a.set_fault(Fault::RateLimited);
    s.server
        .wait_answer("llama.inference.example.com.", &["127.0.0.82"], LIMIT)
        .await;
    let st = status(&s.server).await;
    let a = endpoint(&st, "127.0.0.81");
    assert_eq!(a["status"], "up", "a 429 is not a death");
    assert_eq!(a["cooling"], true);
    assert!(a["last_error"].as_str().unwrap().contains("429"), "{a}");
    // Back after the cool-down (Retry-After: 1), and it was never down.
    s.a.set_fault(Fault::None);
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        assert_eq!(
            endpoint(&status(&s.server).await, "127.0.0.81")["status"],
            "up"
        );
        if answer_strings(
            &s.server
                .udp("llama.inference.example.com.", RecordType::A)
                .await,
        ) == ["127.0.0.81"]
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, metrics) = http(
        "GET",
        &format!("http://{}/metrics", s.server.running.admin),
        None,
        None,
    )
    .await;
    assert!(
        common::probe_results(&metrics, "a", "rate_limited") > 0.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn error_statuses_each_count_under_their_type() {
    let s = setup("").await;
    s.server
        .wait_answer("llama.inference.example.com.", &["127.0.0.81"], LIMIT)
        .await;
    s.a.set_fault(Fault::Unavailable);
    s.server
        .wait_answer("llama.inference.example.com.", &["127.0.0.82"], LIMIT)
        .await;
    // The model list may notice first; the alive probe follows.
    let deadline = tokio::time::Instant::now() + LIMIT;
    let a = loop {
        let a = endpoint(&status(&s.server).await, "127.0.0.81");
        if a["status"] == "down" || tokio::time::Instant::now() > deadline {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(a["status"], "down");
    assert_eq!(
        a["last_error"],
        "HTTP 503 unavailable (loading or overloaded)"
    );
    let (_, metrics) = http(
        "GET",
        &format!("http://{}/metrics", s.server.running.admin),
        None,
        None,
    )
    .await;
    assert!(
        common::probe_results(&metrics, "a", "unavailable") > 0.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn hung_and_slow_drip_backends_time_out_without_delaying_the_others() {
    let s = setup("").await;
    s.server
        .wait_answer("llama.inference.example.com.", &["127.0.0.81"], LIMIT)
        .await;
    let count = common::probe_results;
    let metrics_url = format!("http://{}/metrics", s.server.running.admin);
    for fault in [Fault::SlowDrip, Fault::Hung] {
        s.a.set_fault(fault);
        s.server
            .wait_answer("llama.inference.example.com.", &["127.0.0.82"], LIMIT)
            .await;
        // Counted, not timed: while a's probes time out four more times,
        // b's probes (every ~100 ms, a's every 300 ms timeout + 100 ms) must
        // finish more often than that. Were b's probes held up behind a's,
        // b could not finish more probes than a times out.
        let metrics = http("GET", &metrics_url, None, None).await.1;
        let (a_before, b_before) = (count(&metrics, "a", "timeout"), count(&metrics, "b", "ok"));
        let deadline = tokio::time::Instant::now() + LIMIT;
        let (a_timeouts, b_ok) = loop {
            let metrics = http("GET", &metrics_url, None, None).await.1;
            let a = count(&metrics, "a", "timeout") - a_before;
            if a >= 4.0 {
                break (a, count(&metrics, "b", "ok") - b_before);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{fault:?}: a's probes stopped timing out"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            b_ok > a_timeouts,
            "{fault:?}: b finished {b_ok} probes while a timed out {a_timeouts} times"
        );
        let a = endpoint(&status(&s.server).await, "127.0.0.81");
        assert!(
            a["last_error"].as_str().unwrap().contains("timed out"),
            "{fault:?}: {a}"
        );
        s.a.set_fault(Fault::None);
        s.server
            .wait_answer("llama.inference.example.com.", &["127.0.0.81"], LIMIT)
            .await;
    }
    let _ = &s.b;
}

#[tokio::test]
async fn an_empty_completion_takes_the_endpoint_out() {
    let extra = "";
    let a = SimRegion::start_models("127.0.0.83:0".parse().unwrap(), &[LLAMA])
        .await
        .unwrap();
    let b = SimRegion::start_models("127.0.0.84:0".parse().unwrap(), &[LLAMA])
        .await
        .unwrap();
    let probe = format!(
        r#"probe = {{ path = "/health", interval = "100ms", timeout = "300ms", completion = {{ model = "{LLAMA}", interval = "1s", timeout = "1s" }} }}"#
    );
    let text = format!(
        "[regions.a]\nendpoints = [{{ address = \"127.0.0.83\", port = {} }}]\n{probe}\n[regions.b]\nendpoints = [{{ address = \"127.0.0.84\", port = {} }}]\n{probe}\n[services.llama]\nmodel = \"{LLAMA}\"\ntiers = [[\"a\"], [\"b\"]]\n{extra}",
        a.addr().port(),
        b.addr().port()
    );
    let server = Server::start(&base_config(&text)).await;
    server
        .wait_answer("llama.inference.example.com.", &["127.0.0.83"], LIMIT)
        .await;
    a.set_fault(Fault::EmptyCompletion);
    server
        .wait_answer("llama.inference.example.com.", &["127.0.0.84"], LIMIT)
        .await;
    let ep = endpoint(&status(&server).await, "127.0.0.83");
    assert_eq!(ep["status"], "up", "alive, but its completions are empty");
    assert_eq!(ep["last_error"], "completion returned no content");
}

#[tokio::test]
async fn fallback_answers_a_cname_with_the_fallback_records() {
    let s = setup(
        r#"
[services.big]
model = "llama-3.1-405b"
tiers = [["a"], ["b"]]
fallback = "llama"
"#,
    )
    .await;
    s.server
        .wait_answer("llama.inference.example.com.", &["127.0.0.81"], LIMIT)
        .await;
    // Nobody serves the 405b model: CNAME to llama, and llama's address in the same answer.
    let m = s
        .server
        .udp("big.inference.example.com.", RecordType::A)
        .await;
    assert_eq!(m.answers.len(), 2, "{m:?}");
    assert_eq!(
        m.answers[0].data,
        RData::CNAME(hickory_proto::rr::rdata::CNAME(
            "llama.inference.example.com.".parse().unwrap()
        ))
    );
    assert_eq!(m.answers[1].data.to_string(), "127.0.0.81");
    // When llama's model moves to b, the chain follows.
    s.a.set_fault(Fault::ModelMissing);
    s.server
        .wait_answer("llama.inference.example.com.", &["127.0.0.82"], LIMIT)
        .await;
    let m = s
        .server
        .udp("big.inference.example.com.", RecordType::A)
        .await;
    assert_eq!(m.answers[1].data.to_string(), "127.0.0.82");
    let _ = &s.b;
}

/// Two regions, `a` (`a_ip`) then `b` (`b_ip`), for service `llama`, each
/// probed with `probe` (and `extra` in region a).
async fn pair(a_ip: &str, b_ip: &str, probe: &str, extra: &str) -> (Server, SimRegion, SimRegion) {
    let a = SimRegion::start_models(format!("{a_ip}:0").parse().unwrap(), &[LLAMA])
        .await
        .unwrap();
    let b = SimRegion::start_models(format!("{b_ip}:0").parse().unwrap(), &[LLAMA])
        .await
        .unwrap();
    let text = format!(
        "[regions.a]\nendpoints = [{{ address = \"{a_ip}\", port = {} }}]\n{probe}\n{extra}\n[regions.b]\nendpoints = [{{ address = \"{b_ip}\", port = {} }}]\n{probe}\n[services.llama]\nmodel = \"{LLAMA}\"\ntiers = [[\"a\"], [\"b\"]]\n",
        a.addr().port(),
        b.addr().port()
    );
    (Server::start(&base_config(&text)).await, a, b)
}

/// Issue 13: the first completion probe of a server that was not listening
/// yet was refused and held the region out for rise x the completion
/// interval (30 s here) after `/health` and `/v1/models` were back. The
/// alive layer explains a refusal, and its recovery probes the rest at once.
#[tokio::test]
async fn a_completion_refused_before_the_server_listened_does_not_hold_the_region_out() {
    let probe = format!(
        r#"probe = {{ path = "/health", interval = "100ms", timeout = "300ms", models-path = "/v1/models", models-interval = "200ms", completion = {{ model = "{LLAMA}", interval = "30s" }} }}"#
    );
    let a = SimRegion::start_models("127.0.0.85:0".parse().unwrap(), &[LLAMA])
        .await
        .unwrap();
    a.set_fault(Fault::Down);
    let b = SimRegion::start_models("127.0.0.86:0".parse().unwrap(), &[LLAMA])
        .await
        .unwrap();
    let text = format!(
        "[regions.a]\nendpoints = [{{ address = \"127.0.0.85\", port = {} }}]\n{probe}\n[regions.b]\nendpoints = [{{ address = \"127.0.0.86\", port = {} }}]\n{probe}\n[services.llama]\nmodel = \"{LLAMA}\"\ntiers = [[\"a\"], [\"b\"]]\n",
        a.addr().port(),
        b.addr().port()
    );
    let server = Server::start(&base_config(&text)).await;
    let name = "llama.inference.example.com.";
    server.wait_answer(name, &["127.0.0.86"], LIMIT).await;
    a.set_fault(Fault::None);
    // Well under the 30 s completion interval.
    server.wait_answer(name, &["127.0.0.85"], LIMIT).await;
    assert!(a.completions() >= 1, "the completion was probed again");
    drop(b);
}

/// While a region's load signal says it is full, its completion probes are
/// not sent (they would queue behind the load); status says why, and they
/// resume when the load ends.
#[tokio::test]
async fn completion_probes_are_not_sent_to_a_full_region() {
    let probe = format!(
        r#"probe = {{ path = "/health", interval = "100ms", timeout = "300ms", completion = {{ model = "{LLAMA}", interval = "1s" }} }}"#
    );
    let capacity = r#"capacity = { metrics = "vllm", metrics-interval = "100ms" }"#;
    let (server, a, _b) = pair("127.0.0.87", "127.0.0.88", &probe, capacity).await;
    let name = "llama.inference.example.com.";
    server.wait_answer(name, &["127.0.0.87"], LIMIT).await;
    let skipped = |status: &serde_json::Value| endpoint(status, "127.0.0.87")["skipped"].clone();
    a.set_load(inferdns::demo::Load {
        running: 8,
        waiting: 40,
        kv_cache: 0.99,
    });
    let deadline = tokio::time::Instant::now() + LIMIT;
    while skipped(&status(&server).await) != "completion probe skipped: region full" {
        assert!(tokio::time::Instant::now() < deadline, "never skipped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent = a.completions();
    // Three completion intervals: none sent.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        a.completions(),
        sent,
        "completion probes sent to a full region"
    );
    let ep = endpoint(&status(&server).await, "127.0.0.87");
    assert_eq!(ep["status"], "up", "full is shed by load, not down");
    a.set_load(inferdns::demo::Load::default());
    while a.completions() == sent || !skipped(&status(&server).await).is_null() {
        assert!(
            tokio::time::Instant::now() < deadline + Duration::from_secs(3),
            "completion probes never resumed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
