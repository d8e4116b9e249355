//! Capacity-aware routing over real sockets: one region reports load through
//! vLLM V1 metrics, the other pushes a report; answer shares follow the
//! weights computed from headroom.

mod common;

use std::time::Duration;

use common::{Server, base_config, http};
use hickory_proto::op::{Edns, Message};
use hickory_proto::rr::RecordType;
use hickory_proto::rr::rdata::opt::EdnsOption;
use inferdns::demo::client::{Ask, answer_strings, exchange_udp};
use inferdns::demo::{Load, MODEL, SimRegion};

const TOKEN: &str = "capacity-token";

struct Fleet {
    server: Server,
    a: SimRegion,
    _b: SimRegion,
}

async fn fleet(service_extra: &str) -> Fleet {
    let a = SimRegion::start("127.0.0.91:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    let b = SimRegion::start("127.0.0.92:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    let text = format!(
        r#"
[regions.a]
endpoints = [{{ address = "127.0.0.91", port = {} }}]
probe = {{ interval = "100ms" }}
capacity = {{ metrics = "vllm", metrics-interval = "100ms", max-age = "30s" }}

[regions.b]
endpoints = [{{ address = "127.0.0.92", port = {} }}]
probe = {{ interval = "100ms" }}
capacity = {{ max-age = "30s" }}

[services.fleet]
tiers = [["a", "b"]]
strategy = "capacity"
{service_extra}
"#,
        a.addr().port(),
        b.addr().port()
    );
    let server = Server::start_with_token(&base_config(&text), TOKEN).await;
    Fleet { server, a, _b: b }
}

impl Fleet {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.running.admin)
    }

    async fn utilization(&self, region: &str) -> Option<f64> {
        let (_, body) = http("GET", &self.url("/v1/status"), None, None).await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["regions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == region)?["utilization"]
            .as_f64()
    }

    async fn wait_utilization(&self, region: &str, want: f64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self
            .utilization(region)
            .await
            .is_none_or(|u| (u - want).abs() > 1e-6)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{region} never reported {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Share of `n` answers that carried 127.0.0.91.
    async fn share_of_a(&self, n: u32) -> f64 {
        let mut a = 0;
        for _ in 0..n {
            let got = answer_strings(
                &self
                    .server
                    .udp("fleet.inference.example.com.", RecordType::A)
                    .await,
            );
            assert_eq!(got.len(), 1, "records = 1");
            a += u32::from(got[0] == "127.0.0.91");
        }
        f64::from(a) / f64::from(n)
    }
}

/// |observed - expected| within 5 binomial standard deviations (+ 0.5/n continuity).
fn within_tolerance(observed: f64, expected: f64, n: u32) -> bool {
    let sd = (expected * (1.0 - expected) / f64::from(n)).sqrt();
    (observed - expected).abs() <= 5.0 * sd + 0.5 / f64::from(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_follow_weights_from_metrics_and_pushes() {
    let f = fleet("").await;
    // a: 92% KV cache through vLLM V1 metrics; b: 30% utilisation pushed.
    f.a.set_load(Load {
        running: 8,
        waiting: 0,
        kv_cache: 0.92,
    });
    f.wait_utilization("a", 0.92).await;
    let body = r#"{"utilization": 0.30, "gpus_total": 1}"#.to_string();
    let (code, reply) = http(
        "POST",
        &f.url("/v1/regions/b/capacity"),
        Some(TOKEN),
        Some(body),
    )
    .await;
    assert_eq!(code, 200, "{reply}");
    f.wait_utilization("b", 0.30).await;

    // Weights: a is past the 90% watermark (reduce: x0.1): 1 x 0.08 x 0.1 = 0.008;
    // b has 70% headroom: 0.7. Expected share of a: 0.008 / 0.708 = 1.13%.
    let n = 2000;
    let expected = 0.008 / 0.708;
    let observed = f.share_of_a(n).await;
    eprintln!("92% vs 30%: a got {observed:.4} of {n} answers, expected {expected:.4}");
    assert!(
        within_tolerance(observed, expected, n),
        "observed {observed}, expected {expected}"
    );

    // a drops to 50%: weights 0.5 vs 0.7.
    f.a.set_load(Load {
        running: 2,
        waiting: 0,
        kv_cache: 0.5,
    });
    f.wait_utilization("a", 0.5).await;
    // Hysteresis: a left "reduce" (< 87%) and "prepare" (< 77%) on the way down.
    let expected = 0.5 / 1.2;
    let observed = f.share_of_a(n).await;
    eprintln!("50% vs 30%: a got {observed:.4} of {n} answers, expected {expected:.4}");
    assert!(
        within_tolerance(observed, expected, n),
        "observed {observed}, expected {expected}"
    );

    // a saturates (96%): removed; everything goes to b.
    f.a.set_load(Load {
        running: 9,
        waiting: 0,
        kv_cache: 0.96,
    });
    f.wait_utilization("a", 0.96).await;
    assert_eq!(f.share_of_a(200).await, 0.0);

    let (_, metrics) = http("GET", &f.url("/metrics"), None, None).await;
    assert!(
        metrics.contains("inferdns_region_utilization{region=\"a\"} 0.96"),
        "{metrics}"
    );
    assert!(
        metrics.contains("inferdns_region_weight{region=\"a\",service=\"fleet\"} 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn pushes_are_authenticated_validated_and_all_or_nothing() {
    let f = fleet("").await;
    let url = f.url("/v1/regions/b/capacity");
    let good = r#"{"utilization": 0.4}"#.to_string();
    let (code, _) = http("POST", &url, Some("wrong-token"), Some(good.clone())).await;
    assert_eq!(code, 401);
    let (code, _) = http("POST", &url, None, Some(good.clone())).await;
    assert_eq!(code, 401);
    assert_eq!(
        f.utilization("b").await,
        None,
        "a refused push changes nothing"
    );
    for (body, reason) in [
        (
            r#"{"utilization": 1.7}"#,
            "utilization must be between 0 and 1",
        ),
        (
            r#"{"kv_cache": 0.2, "gpus_total": 2, "gpus_free": 3}"#,
            "more than gpus_total",
        ),
        (r#"{"utilization": 0.2, "color": "blue"}"#, "unknown field"),
        (r#"{}"#, "says nothing"),
        ("not json", "not a capacity report"),
    ] {
        let (code, reply) = http("POST", &url, Some(TOKEN), Some(body.into())).await;
        assert_eq!(code, 400, "{body}");
        assert!(reply.contains(reason), "{body}: {reply}");
        assert_eq!(
            f.utilization("b").await,
            None,
            "{body}: nothing partly applied"
        );
    }
    // Every pushed value is bounded; the JSON error names the field.
    for (body, field) in [
        (r#"{"gpus_total": 18446744073709551615}"#, "gpus_total"),
        (
            r#"{"utilization": 0.2, "queue_depth": 1e12}"#,
            "queue_depth",
        ),
        (r#"{"kv_cache": -0.1}"#, "kv_cache"),
    ] {
        let (code, reply) = http("POST", &url, Some(TOKEN), Some(body.into())).await;
        assert_eq!(code, 400, "{body}: {reply}");
        let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(reply["field"], field, "{body}: {reply}");
        assert!(
            reply["error"].as_str().unwrap().contains(field),
            "{body}: {reply}"
        );
        assert_eq!(f.utilization("b").await, None, "{body}: nothing applied");
    }
    let (code, reply) = http(
        "POST",
        &f.url("/v1/regions/mars/capacity"),
        Some(TOKEN),
        Some(good.clone()),
    )
    .await;
    assert_eq!(code, 404, "{reply}");
    let (code, _) = http("POST", &url, Some(TOKEN), Some(good)).await;
    assert_eq!(code, 200);
    assert_eq!(f.utilization("b").await, Some(0.4));
}

#[tokio::test]
async fn sticky_services_keep_a_subnet_on_the_same_endpoint() {
    let f = fleet("sticky = true").await;
    let ask = |subnet: &'static str| {
        let dns = f.server.dns();
        async move {
            let mut m = Ask::new("fleet.inference.example.com.", RecordType::A).message();
            let mut edns = Edns::new();
            edns.set_max_payload(1232);
            edns.options_mut()
                .insert(EdnsOption::Subnet(subnet.parse().unwrap()));
            m.set_edns(edns);
            let reply = exchange_udp(dns, &m.to_vec().unwrap(), Duration::from_secs(2))
                .await
                .unwrap();
            answer_strings(&Message::from_vec(&reply).unwrap())
        }
    };
    let mut seen = std::collections::BTreeSet::new();
    for subnet in [
        "192.0.2.0/24",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "10.1.2.0/24",
        "10.9.9.0/24",
        "172.16.3.0/24",
    ] {
        let first = ask(subnet).await;
        for _ in 0..20 {
            assert_eq!(ask(subnet).await, first, "{subnet} moved");
        }
        seen.insert(first);
    }
    assert_eq!(
        seen.len(),
        2,
        "different subnets land on both regions: {seen:?}"
    );
}

#[tokio::test]
async fn status_names_the_strategy_of_each_service() {
    let f = fleet(
        r#"
[regions.cheap]
endpoints = [{ address = "127.0.0.93", port = 9 }]
capacity = { cost = 1.0 }

[services.batch]
tiers = [["cheap"]]
strategy = "cost"

[services.chat]
tiers = [["a"], ["b"]]
"#,
    )
    .await;
    let (code, body) = http("GET", &f.url("/v1/status"), None, None).await;
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let strategies: Vec<(String, String)> = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["strategy"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        strategies,
        [
            ("batch".to_string(), "cost".to_string()),
            ("chat".to_string(), "failover".to_string()),
            ("fleet".to_string(), "capacity".to_string()),
        ]
    );
}
