//! `inferdns demo`: the embedded default for a first-time user, and the
//! simulated regions that the integration tests use too.
//!
//! Starts two simulated regions on loopback (`us-east` at 127.0.0.11 is the
//! primary, `us-west` at 127.0.0.12 the secondary), writes the built-in
//! config (the repository's example policy and zone file) to a scratch
//! directory, loads it with the real loader and starts the real server.
//! Then it kills the primary, restores it, hangs it, restores it again, and
//! measures each time from the fault to the first changed answer by
//! querying the server over UDP.

mod acts;
pub mod client;
pub mod region;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use hickory_proto::rr::RecordType;
use rand::Rng;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::app::{self, StartOptions};
use crate::config::{
    self, DEFAULT_FALL, DEFAULT_FALL_REFUSED, DEFAULT_INTERVAL, DEFAULT_RISE, DEFAULT_TIMEOUT,
};
use crate::error::AppError;
pub use region::{Fault, Load, SimRegion};

/// The model the simulated regions serve.
pub const MODEL: &str = "llama-3.1-8b-instruct";
/// The demo's service name.
pub const SERVICE: &str = "chat.inference.example.com.";
const PRIMARY_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);
const SECONDARY_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 12);
const EU_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 13);
/// us-central, where the demo's rollout puts its canary version.
const CANARY_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 14);
/// The version us-central serves.
pub const CANARY_MODEL: &str = "llama-3.1-8b-instruct-v2";
/// The demo's location-aware service.
pub const GEO_SERVICE: &str = "geo.inference.example.com.";
/// Longest wait for an answer to change before the demo gives up.
const STEP_DEADLINE: Duration = Duration::from_secs(20);
/// How often the demo asks the server while waiting for a change.
const POLL_EVERY: Duration = Duration::from_millis(20);

const ZONE_FILE: &str = include_str!("../../zones/inference.example.com.zone");
const CHAT_POLICY: &str = include_str!("../../policies/chat.toml");
const GEO_POLICY: &str = include_str!("../../policies/geo.toml");
const FLEET_POLICY: &str = include_str!("../../policies/fleet.toml");
/// The demo's capacity-weighted service.
pub const FLEET_SERVICE: &str = "fleet.inference.example.com.";
const GEOIP_DB: &[u8] = include_bytes!("../../geoip/test-city.mmdb");

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub json: bool,
    pub dns_listen: SocketAddr,
    pub hold: Option<Duration>,
}

/// The built-in main config, with the simulated regions' probe ports.
pub fn demo_config(dns_listen: SocketAddr, ports: [u16; 4]) -> String {
    let [primary, secondary, eu, canary] = ports;
    format!(
        r#"# Written by `inferdns demo`.
policy-dir = "policies"

[server]
dns-listen = ["{dns_listen}"]
admin-listen = "127.0.0.1:0"
admin-token-file = "admin-token"

[zone]
apex = "inference.example.com"
file = "inference.example.com.zone"
soa = {{ primary = "ns1.inference.example.com", contact = "hostmaster.inference.example.com", serial = 2026112301 }}
ns = [{{ name = "ns1.inference.example.com", addresses = ["127.0.0.1"] }}]

[geoip]
database = "test-city.mmdb"

[regions.us-east]
endpoints = [{{ address = "{PRIMARY_IP}", port = {primary} }}]
probe = {{ models-path = "/v1/models", models-interval = "500ms" }}
capacity = {{ metrics = "vllm", metrics-interval = "250ms" }}
location = {{ country = "US", lat = 38.90, lon = -77.04 }}
jurisdictions = ["us"]

[regions.us-west]
endpoints = [{{ address = "{SECONDARY_IP}", port = {secondary} }}]
probe = {{ models-path = "/v1/models", models-interval = "500ms" }}
capacity = {{ metrics = "vllm", metrics-interval = "250ms" }}
location = {{ country = "US", lat = 37.77, lon = -122.42 }}
jurisdictions = ["us"]

[regions.eu-west]
endpoints = [{{ address = "{EU_IP}", port = {eu} }}]
location = {{ country = "IE", lat = 53.35, lon = -6.26 }}
jurisdictions = ["eu"]

# The first region on the next model version (with a one-token completion
# probe: a canary's first failed check takes its share away).
[regions.us-central]
endpoints = [{{ address = "{CANARY_IP}", port = {canary} }}]
probe = {{ models-path = "/v1/models", models-interval = "500ms", completion = {{ model = "{CANARY_MODEL}", interval = "1s", timeout = "2s" }} }}
location = {{ country = "US", lat = 41.88, lon = -87.63 }}
jurisdictions = ["us"]

# Interactive, paying traffic: keeps a region's share while it has room.
[services.vip]
tiers = [["us-east", "us-west"]]
strategy = "capacity"
criticality = "critical"

# Batch traffic: leaves a busy region first (watermarks 65/75/80 %).
[services.bulk]
tiers = [["us-east", "us-west"]]
strategy = "capacity"
criticality = "sheddable"

# The next model version on 5 % of client subnets.
[services.rollout]
tiers = [["us-east", "us-west", "us-central"]]
rollout = {{ stable = "{MODEL}", canary = "{CANARY_MODEL}", canary-share = "5%" }}
"#
    )
}

/// Writes the demo's config, policy and zone file and its admin token
/// into `dir`.
pub fn write_demo_files(
    dir: &std::path::Path,
    main: &str,
    token: &str,
) -> std::io::Result<PathBuf> {
    std::fs::write(dir.join("admin-token"), format!("{token}\n"))?;
    std::fs::write(dir.join("policies/chat.toml"), CHAT_POLICY)?;
    std::fs::write(dir.join("policies/geo.toml"), GEO_POLICY)?;
    std::fs::write(dir.join("policies/fleet.toml"), FLEET_POLICY)?;
    std::fs::write(dir.join("test-city.mmdb"), GEOIP_DB)?;
    std::fs::write(dir.join("inference.example.com.zone"), ZONE_FILE)?;
    let path = dir.join("inferdns.toml");
    std::fs::write(&path, main)?;
    Ok(path)
}

struct Printer {
    json: bool,
    start: Instant,
}

impl Printer {
    fn event(&self, mut event: Value, human: String) {
        if self.json {
            event["t_s"] = json!(round3(self.start.elapsed().as_secs_f64()));
            println!("{event}");
        } else {
            println!("[{:6.2}s] {human}", self.start.elapsed().as_secs_f64());
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Runs the demo; returns once done (and after `hold`).
pub async fn run(opts: DemoOptions) -> Result<(), AppError> {
    let primary = SimRegion::start(SocketAddr::new(IpAddr::V4(PRIMARY_IP), 0), MODEL).await?;
    let secondary = SimRegion::start(SocketAddr::new(IpAddr::V4(SECONDARY_IP), 0), MODEL).await?;
    let eu = SimRegion::start(SocketAddr::new(IpAddr::V4(EU_IP), 0), MODEL).await?;
    let canary = SimRegion::start(SocketAddr::new(IpAddr::V4(CANARY_IP), 0), CANARY_MODEL).await?;
    let dir = std::env::temp_dir().join(format!("inferdns-demo-{}", std::process::id()));
    let ports = [
        primary.addr().port(),
        secondary.addr().port(),
        eu.addr().port(),
        canary.addr().port(),
    ];
    let token = format!("demo-{:016x}", rand::rng().random::<u64>());
    std::fs::create_dir_all(dir.join("policies"))?;
    let path = write_demo_files(&dir, &demo_config(opts.dns_listen, ports), &token)?;
    let loaded = config::load(&path);
    let started = match loaded {
        Ok(config) => app::start(config, StartOptions::default()).await,
        Err(e) => Err(e.into()),
    };
    // Everything is in memory now.
    let _ = std::fs::remove_dir_all(&dir);
    let running = started?;
    let dns = running.dns[0];
    let p = Printer {
        json: opts.json,
        start: Instant::now(),
    };
    let bound = DEFAULT_INTERVAL * DEFAULT_FALL + DEFAULT_TIMEOUT + Duration::from_secs(1);

    p.event(
        json!({
            "event": "started", "dns": dns.to_string(), "admin": running.admin.to_string(),
            "service": SERVICE, "primary": primary.addr().to_string(), "secondary": secondary.addr().to_string(),
            "probe": { "interval_s": DEFAULT_INTERVAL.as_secs_f64(), "timeout_s": DEFAULT_TIMEOUT.as_secs_f64(),
                       "rise": DEFAULT_RISE, "fall": DEFAULT_FALL, "fall_refused": DEFAULT_FALL_REFUSED },
        }),
        format!(
            "inferdns serving inference.example.com on {dns} (admin http://{}); regions us-east {} (primary), us-west {} (secondary); probes every {:?}, timeout {:?}, rise {DEFAULT_RISE}, fall {DEFAULT_FALL} (refused: {DEFAULT_FALL_REFUSED})",
            running.admin,
            primary.addr(),
            secondary.addr(),
            DEFAULT_INTERVAL,
            DEFAULT_TIMEOUT
        ),
    );
    let primary_answer = vec![PRIMARY_IP.to_string()];
    let secondary_answer = vec![SECONDARY_IP.to_string()];
    wait_for(&p, dns, &primary_answer, Instant::now(), "initial answer").await?;

    let failover = step(
        &p,
        dns,
        &primary,
        Fault::Down,
        &secondary_answer,
        "failover",
    )
    .await?;
    let failback = step(&p, dns, &primary, Fault::None, &primary_answer, "failback").await?;
    let hung = step(
        &p,
        dns,
        &primary,
        Fault::Hung,
        &secondary_answer,
        "hung_failover",
    )
    .await?;
    let hung_back = step(
        &p,
        dns,
        &primary,
        Fault::None,
        &primary_answer,
        "hung_failback",
    )
    .await?;
    // Model-level: /health stays 200, the model disappears from /v1/models.
    let model_over = step(
        &p,
        dns,
        &primary,
        Fault::ModelMissing,
        &secondary_answer,
        "model_failover",
    )
    .await?;
    let model_back = step(
        &p,
        dns,
        &primary,
        Fault::None,
        &primary_answer,
        "model_failback",
    )
    .await?;

    // Location: an EU and a US client subnet ask the location-aware service.
    for (who, subnet) in [("EU", "192.0.2.0/24"), ("US", "198.51.100.0/24")] {
        let (answer, scope) = ask_subnet(dns, GEO_SERVICE, subnet).await?;
        p.event(
            json!({"event": "geo", "client": who, "subnet": subnet, "answer": answer, "scope": scope}),
            format!("{GEO_SERVICE} A +subnet={subnet} ({who} client) -> {}   (ECS scope /{scope})", answer.join(" ")),
        );
    }
    // Capacity: us-east's KV cache fills up; fleet's answers move to us-west
    // before us-east saturates.
    secondary.set_load(Load {
        running: 4,
        waiting: 0,
        kv_cache: 0.30,
    });
    for kv in [0.30, 0.70, 0.85, 0.92, 0.97] {
        primary.set_load(Load {
            running: 8,
            waiting: 0,
            kv_cache: kv,
        });
        wait_utilization(running.admin, "us-east", kv).await?;
        let share = acts::share_of_east(dns, FLEET_SERVICE, 400).await?;
        let vip = acts::share_of_east(dns, acts::VIP_SERVICE, 400).await?;
        let bulk = acts::share_of_east(dns, acts::BULK_SERVICE, 400).await?;
        let watermarks = crate::capacity::Watermarks::default();
        let level = watermarks.level(kv, crate::capacity::Level::Normal);
        let east = crate::capacity::weight(
            1.0,
            1.0,
            Some(kv),
            level,
            crate::capacity::Criticality::Standard,
        );
        let expected = east / (east + 0.7);
        p.event(
            json!({"event": "capacity", "us_east_kv_cache": kv, "us_east_share": round3(share), "expected_share": round3(expected),
                   "critical_share": round3(vip), "sheddable_share": round3(bulk)}),
            format!(
                "{FLEET_SERVICE} us-east KV cache {:>3.0}% (us-west 30%) -> us-east gets {:>5.1}% of 400 answers (weights say {:.1}%); critical vip {:>5.1}%, sheddable bulk {:>5.1}%",
                kv * 100.0,
                share * 100.0,
                expected * 100.0,
                vip * 100.0,
                bulk * 100.0
            ),
        );
    }
    let rollout = acts::rollout(&p, dns, running.admin, &canary, &token).await?;
    let within = failover <= bound.as_secs_f64() && hung <= bound.as_secs_f64();
    let port = dns.port();
    let host = dns.ip();
    let tries = [
        format!("dig @{host} -p {port} chat.inference.example.com A +norec"),
        format!("dig @{host} -p {port} chat.inference.example.com A +tcp +norec"),
        format!("dig @{host} -p {port} inference.example.com SOA +norec"),
        format!("dig @{host} -p {port} www.inference.example.com AAAA +norec"),
        format!("dig @{host} -p {port} nope.inference.example.com A +norec   # NXDOMAIN with SOA"),
        format!("dig @{host} -p {port} example.org A +norec                  # REFUSED"),
        format!(
            "dig @{host} -p {port} geo.inference.example.com A +subnet=192.0.2.0/24 +norec     # EU client: eu-west"
        ),
        format!(
            "dig @{host} -p {port} geo.inference.example.com A +subnet=198.51.100.0/24 +norec  # US client: us-east"
        ),
        format!(
            "dig @{host} -p {port} TXT _explain.geo.inference.example.com +subnet=192.0.2.0/24 +norec"
        ),
        format!("curl -s http://{}/v1/status", running.admin),
        format!("inferdns status --admin {}", running.admin),
    ];
    if opts.json {
        println!(
            "{}",
            json!({
                "event": "summary",
                "failover_s": round3(failover),
                "failback_s": round3(failback),
                "hung_failover_s": round3(hung),
                "hung_failback_s": round3(hung_back),
                "model_failover_s": round3(model_over),
                "model_failback_s": round3(model_back),
                "canary_share": round3(rollout.share),
                "canary_rollback_s": round3(rollout.rollback_s),
                "promoted_share": round3(rollout.promoted_share),
                "bound_s": round3(bound.as_secs_f64()),
                "within_bound": within,
                "dns": dns.to_string(),
                "try": tries,
            })
        );
    } else {
        println!();
        println!("failover (primary killed):   {failover:.2} s");
        println!("failback (primary restored): {failback:.2} s");
        println!("failover (primary hung):     {hung:.2} s");
        println!("failback (hang cleared):     {hung_back:.2} s");
        println!("failover (model missing):    {model_over:.2} s");
        println!("failback (model back):       {model_back:.2} s");
        println!(
            "canary share:                {:.1}% of 2,000 subnets (5% asked)",
            rollout.share * 100.0
        );
        println!(
            "canary rolled back:          {:.2} s after its completions failed",
            rollout.rollback_s
        );
        println!(
            "after promotion:             {:.1}% on the canary version",
            rollout.promoted_share * 100.0
        );
        println!(
            "bound interval x fall + timeout + 1 s = {:.2} s: {}",
            bound.as_secs_f64(),
            if within { "within" } else { "EXCEEDED" }
        );
        println!();
        println!("Try:");
        for t in &tries {
            println!("  {t}");
        }
        if opts.hold.is_none() {
            println!();
            println!(
                "These need the demo running: run `inferdns demo --hold 600` to keep it up for them (Ctrl-C ends it sooner)."
            );
        }
    }
    if let Some(hold) = opts.hold {
        if !opts.json {
            println!("\nHolding for {} s (Ctrl-C to stop).", hold.as_secs());
        }
        tokio::select! {
            () = tokio::time::sleep(hold) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    running.shutdown();
    running.wait().await
}

/// Asks `name` with an ECS subnet; returns the answer and the echoed scope.
async fn ask_subnet(
    dns: SocketAddr,
    name: &str,
    subnet: &str,
) -> Result<(Vec<String>, u8), AppError> {
    use hickory_proto::op::Edns;
    use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
    let mut m = client::Ask::new(name, RecordType::A).message();
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    let subnet = subnet
        .parse()
        .map_err(|e| AppError::Demo(format!("{subnet}: {e}")))?;
    edns.options_mut().insert(EdnsOption::Subnet(subnet));
    m.set_edns(edns);
    let bytes = m.to_vec().map_err(|e| AppError::Demo(e.to_string()))?;
    let reply = client::exchange_udp(dns, &bytes, Duration::from_secs(2)).await?;
    let reply =
        hickory_proto::op::Message::from_vec(&reply).map_err(|e| AppError::Demo(e.to_string()))?;
    let scope = match reply.edns.as_ref().and_then(|e| e.option(EdnsCode::Subnet)) {
        Some(EdnsOption::Subnet(cs)) => cs.scope_prefix(),
        _ => 0,
    };
    Ok((client::answer_strings(&reply), scope))
}

/// Polls `GET /v1/status` until `done` holds for it; `what` names what was
/// awaited when it never does.
async fn wait_status(
    admin: SocketAddr,
    done: impl Fn(&Value) -> bool,
    what: &str,
) -> Result<(), AppError> {
    crate::health::probe::install_crypto_provider();
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| AppError::Demo(e.to_string()))?;
    let deadline = Instant::now() + STEP_DEADLINE;
    loop {
        let status: Option<Value> = match http.get(format!("http://{admin}/v1/status")).send().await
        {
            Ok(r) => r
                .text()
                .await
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok()),
            Err(_) => None,
        };
        if status.as_ref().is_some_and(&done) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(AppError::Demo(format!("{what} never happened")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the server's status shows `region` at `utilization` (its
/// metrics were scraped and a snapshot built with them).
async fn wait_utilization(
    admin: SocketAddr,
    region: &str,
    utilization: f64,
) -> Result<(), AppError> {
    let at = |s: &Value| {
        s["regions"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["id"] == region))
            .and_then(|r| r["utilization"].as_f64())
            .is_some_and(|u| (u - utilization).abs() < 1e-6)
    };
    wait_status(admin, at, &format!("{region} at utilisation {utilization}")).await
}

/// Applies `fault` at a random moment within one probe interval and
/// returns the seconds until the answer became `expect`.
async fn step(
    p: &Printer,
    dns: SocketAddr,
    region: &SimRegion,
    fault: Fault,
    expect: &[String],
    what: &str,
) -> Result<f64, AppError> {
    let settle =
        Duration::from_millis(500) + DEFAULT_INTERVAL.mul_f64(rand::rng().random_range(0.0..1.0));
    tokio::time::sleep(settle).await;
    let at = Instant::now();
    region.set_fault(fault);
    let human = match fault {
        Fault::None => format!("restored us-east {}", region.addr()),
        Fault::Down => format!("killed us-east {} (connection refused)", region.addr()),
        Fault::Hung => format!("hung us-east {} (accepts, never answers)", region.addr()),
        Fault::ModelMissing => format!(
            "us-east {} no longer lists {MODEL} in /v1/models (/health still 200)",
            region.addr()
        ),
        other => format!("fault {} on us-east", other.name()),
    };
    p.event(
        json!({"event": "fault", "region": "us-east", "fault": fault.name()}),
        human,
    );
    wait_for(p, dns, expect, at, what).await
}

/// Polls the service over UDP until it answers `expect`.
async fn wait_for(
    p: &Printer,
    dns: SocketAddr,
    expect: &[String],
    since: Instant,
    what: &str,
) -> Result<f64, AppError> {
    let ask = client::Ask {
        timeout: Duration::from_millis(500),
        ..client::Ask::new(SERVICE, RecordType::A)
    };
    // Answers with no address, or no answer at all: there should be none.
    let mut empty_or_failed = 0u32;
    loop {
        let polled = Instant::now();
        match client::query_udp(dns, &ask).await {
            Ok(m) => {
                let got = client::answer_strings(&m);
                if got == expect {
                    let seconds = polled.duration_since(since).as_secs_f64();
                    p.event(
                        json!({"event": what, "answer": got, "seconds": round3(seconds), "empty_or_failed": empty_or_failed}),
                        format!("{SERVICE} A -> {}   ({what} after {seconds:.2} s)", got.join(" ")),
                    );
                    return Ok(seconds);
                }
                if got.is_empty() {
                    empty_or_failed += 1;
                }
            }
            Err(e) => {
                empty_or_failed += 1;
                tracing::debug!(error = %e, "Demo query failed.");
            }
        }
        if since.elapsed() > STEP_DEADLINE {
            return Err(AppError::Demo(format!(
                "{what}: the answer did not become {expect:?} within {STEP_DEADLINE:?}"
            )));
        }
        tokio::time::sleep_until(polled + POLL_EVERY).await;
    }
}
