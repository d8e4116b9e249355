//! Model-version rollouts over real sockets: three regions serve `chat-v1`
//! (stable), one serves `chat-v2` (canary, 5 % of client subnets); client
//! subnets arrive as ECS. The canary's share, its stickiness, its automatic
//! rollback, the stable-region guard, and promotion and rollback by the
//! admin API across reloads.

mod common;

use std::time::Duration;

use common::{Server, base_config, http};
use hickory_proto::op::{Edns, Message};
use hickory_proto::rr::RecordType;
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use inferdns::demo::client::{Ask, answer_strings, exchange_udp};
use inferdns::demo::{Fault, SimRegion};
use tokio::time::Instant;

const TOKEN: &str = "rollout-token";
const CHAT: &str = "chat.inference.example.com.";
const CANARY: &str = "127.0.0.84";
const STABLE: [&str; 3] = ["127.0.0.81", "127.0.0.82", "127.0.0.83"];

struct Rollout {
    server: Server,
    regions: Vec<SimRegion>,
}

/// r1-r3 on chat-v1, r4 on chat-v2 (with a completion probe); `extra`
/// goes into the rollout table.
async fn rollout(extra: &str) -> Rollout {
    let mut regions = Vec::new();
    let mut text = String::new();
    for (i, ip) in STABLE.iter().chain([&CANARY]).enumerate() {
        let version = if *ip == CANARY { "chat-v2" } else { "chat-v1" };
        let region = SimRegion::start_models(format!("{ip}:0").parse().unwrap(), &[version])
            .await
            .unwrap();
        let completion = if *ip == CANARY {
            ", completion = { model = \"chat-v2\", interval = \"1s\", timeout = \"500ms\" }"
        } else {
            ""
        };
        text.push_str(&format!(
            "[regions.r{}]\nendpoints = [{{ address = \"{ip}\", port = {} }}]\nprobe = {{ interval = \"100ms\", timeout = \"200ms\", models-path = \"/v1/models\", models-interval = \"100ms\"{completion} }}\n\n",
            i + 1,
            region.addr().port()
        ));
        regions.push(region);
    }
    text.push_str(&format!(
        "[services.chat]\ntiers = [[\"r1\", \"r2\", \"r3\", \"r4\"]]\nrollout = {{ stable = \"chat-v1\", canary = \"chat-v2\", canary-share = \"5%\"{extra} }}\n"
    ));
    let server = Server::start_with_token(&base_config(&text), TOKEN).await;
    let r = Rollout { server, regions };
    r.wait_rollout(|v| v["canary_regions"] == serde_json::json!(["r4"]))
        .await;
    r
}

/// 2,000 client /24s.
fn subnets() -> Vec<String> {
    (0..2000)
        .map(|i| format!("10.{}.{}.0/24", i / 250, i % 250))
        .collect()
}

impl Rollout {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.running.admin)
    }

    /// The answer for `subnet` (ECS), and the echoed scope.
    async fn ask(&self, subnet: &str) -> (Vec<String>, Option<u8>) {
        let mut m = Ask::new(CHAT, RecordType::A).message();
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        let s: ClientSubnet = subnet.parse().unwrap();
        edns.options_mut().insert(EdnsOption::Subnet(s));
        m.set_edns(edns);
        let bytes = exchange_udp(
            self.server.dns(),
            &m.to_vec().unwrap(),
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        let m = Message::from_vec(&bytes).unwrap();
        let scope = m
            .edns
            .as_ref()
            .and_then(|e| match e.option(EdnsCode::Subnet) {
                Some(EdnsOption::Subnet(cs)) => Some(cs.scope_prefix()),
                _ => None,
            });
        (answer_strings(&m), scope)
    }

    async fn rollout_view(&self) -> serde_json::Value {
        let (_, body) = http("GET", &self.url("/v1/status"), None, None).await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["services"][0]["rollout"].clone()
    }

    async fn wait_rollout(&self, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.rollout_view().await;
            if done(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "rollout never got there: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many of `subnets` get the canary.
    async fn on_canary(&self, subnets: &[String]) -> usize {
        let mut n = 0;
        for s in subnets {
            let (answer, _) = self.ask(s).await;
            n += usize::from(answer == [CANARY]);
        }
        n
    }

    async fn metrics(&self) -> String {
        http("GET", &self.url("/metrics"), None, None).await.1
    }

    /// POSTs `path` with the admin token; panics unless it succeeds.
    async fn post(&self, path: &str) {
        let (code, body) = http("POST", &self.url(path), Some(TOKEN), None).await;
        assert_eq!(code, 200, "POST {path}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_gets_its_share_of_subnets_and_a_subnet_keeps_its_version() {
    let r = rollout("").await;
    let subnets = subnets();
    let mut first = Vec::new();
    let mut canary = 0;
    for s in &subnets {
        let (answer, scope) = r.ask(s).await;
        assert_eq!(scope, Some(24), "the answer holds for the /24");
        if answer == [CANARY] {
            canary += 1;
        } else {
            assert_eq!(answer, STABLE, "stable subnets get every stable region");
        }
        first.push(answer);
    }
    // 5 % of 2,000: 100 expected; 5 binomial standard deviations (9.7) either way.
    let n = subnets.len() as f64;
    let sd = (n * 0.05 * 0.95).sqrt();
    eprintln!(
        "canary answered {canary} of {} subnets (expected 100 +/- {:.0})",
        subnets.len(),
        5.0 * sd
    );
    assert!((canary as f64 - n * 0.05).abs() <= 5.0 * sd, "{canary}");
    // Steady state: no subnet changes version.
    for _ in 0..2 {
        for (s, before) in subnets.iter().zip(&first) {
            assert_eq!(&r.ask(s).await.0, before, "{s} changed version");
        }
    }
    let v = r.rollout_view().await;
    assert_eq!(v["phase"], "canary", "{v}");
    assert_eq!(v["stable_regions"], serde_json::json!(["r1", "r2", "r3"]));
    let why = http("GET", &r.url("/v1/explain?name=chat"), None, None)
        .await
        .1;
    assert!(
        why.contains("rollout: canary; stable chat-v1 on r1 r2 r3; canary chat-v2 on r4, 5.0% of client subnets"),
        "{why}"
    );
    assert!(
        r.metrics()
            .await
            .contains("inferdns_rollout_canary_share{service=\"chat\"} 0.05")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_its_completion_probe_loses_its_share_at_once_and_stays_rolled_back() {
    let r = rollout("").await;
    // The subnets on the canary now.
    let mut on_canary = Vec::new();
    for s in subnets() {
        if r.ask(&s).await.0 == [CANARY] {
            on_canary.push(s);
        }
    }
    assert!(!on_canary.is_empty());
    let broke = Instant::now();
    r.regions[3].set_fault(Fault::EmptyCompletion);
    // Probe interval 100 ms (fall 2 for a failed completion) plus the publish.
    loop {
        if r.on_canary(&on_canary).await == 0 {
            break;
        }
        assert!(
            broke.elapsed() < Duration::from_secs(5),
            "canary still answered"
        );
    }
    let moved = broke.elapsed();
    // Lost at its first failed check (no `fall` of 2 on probation): the
    // failed completions counted so far are one, or two if the next one
    // landed during the sweep above.
    let failed: f64 = r
        .metrics()
        .await
        .lines()
        .filter(|l| {
            l.starts_with("inferdns_probes_total{")
                && l.contains("layer=\"completion\"")
                && l.contains("region=\"r4\"")
                && !l.contains("result=\"ok\"")
                && !l.contains("result=\"skipped\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    eprintln!(
        "canary lost all {} of its subnets {moved:?} after its completions went empty ({failed} failed completions counted)",
        on_canary.len()
    );
    assert!((1.0..=2.0).contains(&failed), "{failed} failed completions");
    let v = r.rollout_view().await;
    assert_eq!(v["phase"], "rolled-back", "{v}");
    assert_eq!(v["automatic"], true, "{v}");
    assert!(
        v["why"]
            .as_str()
            .is_some_and(|w| w.contains("endpoint 127.0.0.84 of r4 fails its completion probe")),
        "{v}"
    );
    assert!(
        r.metrics()
            .await
            .contains("inferdns_rollout_rollbacks_total{service=\"chat\",trigger=\"automatic\"} 1")
    );
    // The canary heals: it stays rolled back until an operator says otherwise.
    r.regions[3].set_fault(Fault::None);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(r.on_canary(&on_canary).await, 0);
    assert_eq!(r.rollout_view().await["phase"], "rolled-back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_says_when_fewer_stable_regions_are_fit() {
    let r = rollout(", min-stable-regions = 3").await;
    assert_eq!(r.rollout_view().await["guard_breached"], false);
    r.regions[0].set_fault(Fault::Down);
    let v = r.wait_rollout(|v| v["guard_breached"] == true).await;
    assert_eq!(v["stable_regions"], serde_json::json!(["r2", "r3"]), "{v}");
    let m = r.metrics().await;
    assert!(
        m.contains("inferdns_rollout_guard_breached{service=\"chat\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("inferdns_rollout_stable_regions{service=\"chat\"} 2"),
        "{m}"
    );
    r.regions[0].set_fault(Fault::None);
    r.wait_rollout(|v| v["guard_breached"] == false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_and_rollback_persist_across_a_reload() {
    let r = rollout("").await;
    let some: Vec<String> = subnets().into_iter().step_by(20).collect();
    // Without the token: refused.
    let (code, _) = http("POST", &r.url("/v1/services/chat/promote"), None, None).await;
    assert_eq!(code, 401);
    let (code, body) = http(
        "POST",
        &r.url("/v1/services/nope/promote"),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(code, 404, "{body}");

    r.post("/v1/services/chat/promote").await;
    assert_eq!(
        r.on_canary(&some).await,
        some.len(),
        "promoted: everyone on chat-v2"
    );
    r.post("/v1/reload").await;
    let v = r.rollout_view().await;
    assert_eq!(v["phase"], "promoted", "{v}");
    assert_eq!(
        r.on_canary(&some).await,
        some.len(),
        "still promoted after the reload"
    );

    r.post("/v1/services/chat/rollback").await;
    assert_eq!(
        r.on_canary(&some).await,
        0,
        "rolled back: everyone on chat-v1"
    );
    r.post("/v1/reload").await;
    let v = r.rollout_view().await;
    assert_eq!(v["phase"], "rolled-back", "{v}");
    assert_eq!(v["automatic"], false, "{v}");
    assert_eq!(
        r.on_canary(&some).await,
        0,
        "still rolled back after the reload"
    );
    assert!(
        r.metrics()
            .await
            .contains("inferdns_rollout_rollbacks_total{service=\"chat\",trigger=\"operator\"} 1")
    );
}
