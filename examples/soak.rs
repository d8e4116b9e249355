//! Chaos soak (`benches/soak.sh`): the release daemon under ECS query load
//! while a seeded schedule kills, hangs, rate-limits, slow-drips and loads
//! its backends, reloads its config (some reloads broken) and swaps its
//! GeoIP file (some swaps truncated). Every answer is checked as it
//! arrives. Loopback only; bounded in time; exit 1 on any violation.
//!
//!   cargo build --release --bins --examples
//!   target/release/examples/soak --seconds 60 --seed 7 [--qps 1000] [--out FILE]
//!
//! An example rather than a bench target so that it shares the release
//! build (`panic = "abort"`, which bench builds ignore) with the daemon and
//! the Debian package: one release build in CI, not two. The daemon is
//! `inferdns` beside the `examples/` directory this binary runs from, or
//! `$INFERDNS_BIN`.
//!
//! What counts as a violation:
//! - an answer outside the client's jurisdiction (the residency rules of
//!   the service, the client's country from `geoip/test-city.json`);
//! - an answer naming a region whose endpoint has been down (refused, hung,
//!   slow-drip body, 503) longer than the detection bound, while another
//!   region of the service was fit (otherwise fail-open is the documented
//!   answer);
//! - SERVFAIL while a region the client may use was fit; any other error
//!   code; a reply that does not parse strictly;
//! - more than 0.1 % of queries unanswered;
//! - the daemon dying, logging a panic, or not exiting cleanly on SIGTERM;
//! - resident memory growing 10 % or more after the warm-up; open
//!   descriptors not back to their baseline once the faults are cleared;
//! - a reload or GeoIP swap counted differently from what was done.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
use hickory_proto::rr::{RData, RecordType};
use inferdns::config::{DEFAULT_FALL, DEFAULT_INTERVAL, DEFAULT_RISE, DEFAULT_TIMEOUT};
use inferdns::demo::client::{Ask, check_wire};
use inferdns::demo::{Fault, Load, SimRegion};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::net::UdpSocket;
use tokio::time::Instant;

const APEX: &str = "inference.example.com";
const MODEL: &str = "llama-3.1-8b-instruct";
const GEOIP: &[u8] = include_bytes!("../geoip/test-city.mmdb");
/// The default `models-interval` (README, probe table).
const MODELS_INTERVAL: Duration = Duration::from_secs(2);

/// Jurisdiction tags of regions, and client groups as the residency rules
/// below sort them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Zone {
    Eu,
    Us,
    Apac,
    /// A country no rule names (`otherwise = "any"`).
    Other,
    /// No country: not in the database, or a record without one.
    Unknown,
}

/// (id, address, country, lat, lon, jurisdiction)
const REGIONS: [(&str, Ipv4Addr, &str, f64, f64, Zone); 6] = [
    (
        "us-east",
        Ipv4Addr::new(127, 0, 0, 21),
        "US",
        38.90,
        -77.04,
        Zone::Us,
    ),
    (
        "us-west",
        Ipv4Addr::new(127, 0, 0, 22),
        "US",
        37.77,
        -122.42,
        Zone::Us,
    ),
    (
        "eu-west",
        Ipv4Addr::new(127, 0, 0, 23),
        "IE",
        53.35,
        -6.26,
        Zone::Eu,
    ),
    (
        "eu-central",
        Ipv4Addr::new(127, 0, 0, 24),
        "DE",
        50.11,
        8.68,
        Zone::Eu,
    ),
    (
        "ap-south",
        Ipv4Addr::new(127, 0, 0, 25),
        "SG",
        1.35,
        103.82,
        Zone::Apac,
    ),
    (
        "ap-east",
        Ipv4Addr::new(127, 0, 0, 26),
        "JP",
        35.69,
        139.69,
        Zone::Apac,
    ),
];

/// Client networks of `geoip/test-city.json` and where the rules put them
/// (README, "Residency"): the EU flag or one of the 40 EU/EEA codes is
/// `eu`; US and CA are `us`; continent AS is `apac`; a record without a
/// country is unknown, whatever its continent.
const CLIENTS: [(&str, &str, Zone); 26] = [
    ("192.0.2.0/24", "DE", Zone::Eu),
    ("10.1.0.0/16", "FR", Zone::Eu),
    ("10.2.0.0/16", "IE", Zone::Eu),
    ("10.3.0.0/16", "NO (EEA, no flag)", Zone::Eu),
    ("10.10.0.0/16", "AX", Zone::Eu),
    ("10.11.0.0/16", "MQ (continent NA)", Zone::Eu),
    ("10.12.0.0/16", "RE (registered country only)", Zone::Eu),
    ("100.64.0.0/10", "NL", Zone::Eu),
    ("2001:db8:1::/48", "DE", Zone::Eu),
    ("2001:db8:5::/48", "MF (continent NA)", Zone::Eu),
    ("fd00::/8", "IE", Zone::Eu),
    ("198.51.100.0/24", "US", Zone::Us),
    ("10.0.0.0/16", "US", Zone::Us),
    ("10.16.0.0/12", "US", Zone::Us),
    ("10.5.0.0/16", "CA", Zone::Us),
    ("2001:db8:2::/48", "US", Zone::Us),
    ("203.0.113.0/24", "JP", Zone::Apac),
    ("10.6.0.0/16", "SG", Zone::Apac),
    ("2001:db8:3::/48", "JP", Zone::Apac),
    ("10.4.0.0/16", "CH", Zone::Other),
    ("10.7.0.0/16", "BR", Zone::Other),
    ("10.8.0.0/16", "AU", Zone::Other),
    ("10.13.0.0/16", "GL (not flagged)", Zone::Other),
    ("10.9.0.0/16", "GB (registered country only)", Zone::Other),
    ("192.168.0.0/16", "continent EU, no country", Zone::Unknown),
    ("172.16.0.0/12", "not in the database", Zone::Unknown),
];

struct Service {
    id: &'static str,
    policy: &'static str,
    /// Indexes into REGIONS of every region in the tiers.
    regions: &'static [usize],
    /// Which regions a client group may be sent to; `None`: no residency.
    residency: Option<fn(Zone) -> &'static [Zone]>,
}

fn rules_eu_us_apac(client: Zone) -> &'static [Zone] {
    match client {
        Zone::Eu => &[Zone::Eu],
        Zone::Us => &[Zone::Us],
        Zone::Apac => &[Zone::Apac],
        Zone::Other => &[Zone::Eu, Zone::Us, Zone::Apac],
        Zone::Unknown => &[],
    }
}

fn rules_eu_us(client: Zone) -> &'static [Zone] {
    match client {
        Zone::Eu => &[Zone::Eu],
        Zone::Us => &[Zone::Us],
        Zone::Unknown => &[],
        _ => &[Zone::Eu, Zone::Us, Zone::Apac],
    }
}

fn rules_eu_only(client: Zone) -> &'static [Zone] {
    match client {
        Zone::Eu => &[Zone::Eu],
        Zone::Unknown => &[],
        _ => &[Zone::Eu, Zone::Us, Zone::Apac],
    }
}

const RESIDENCY: &str = r#"residency = { rules = [{ clients = ["eu"], allow = ["eu"] }, { clients = ["US", "CA"], allow = ["us"] }, { clients = ["continent:AS"], allow = ["apac"] }], otherwise = "any", unknown-location = "deny" }"#;

fn services() -> Vec<Service> {
    vec![
        Service {
            id: "chat",
            policy: r#"tiers = [["us-east"], ["us-west"], ["eu-west"]]
model = "llama-3.1-8b-instruct"
shed = "never"
when-all-down = "fail-open"
last-known-good = "30s"
"#,
            regions: &[0, 1, 2],
            residency: None,
        },
        Service {
            id: "geo",
            policy: r#"tiers = [["us-east", "us-west", "eu-west", "eu-central", "ap-south", "ap-east"]]
strategy = "proximity"
proximity-tolerance = "5ms"
"#,
            regions: &[0, 1, 2, 3, 4, 5],
            residency: Some(rules_eu_us_apac),
        },
        Service {
            id: "fleet",
            policy: r#"tiers = [["us-east", "us-west", "eu-west", "eu-central"]]
strategy = "capacity"
records = 1
shed = "at-remove"
residency = { rules = [{ clients = ["eu"], allow = ["eu"] }, { clients = ["US", "CA"], allow = ["us"] }], otherwise = "any", unknown-location = "deny" }
"#,
            regions: &[0, 1, 2, 3],
            residency: Some(rules_eu_us),
        },
        Service {
            id: "strict",
            policy: r#"tiers = [["eu-central", "us-east"], ["eu-west", "us-west"]]
when-all-down = "fail-open"
residency = { rules = [{ clients = ["eu"], allow = ["eu"] }], unknown-location = "deny" }
"#,
            regions: &[3, 0, 2, 1],
            residency: Some(rules_eu_only),
        },
    ]
}

fn policy_text(s: &Service, ttl: u32) -> String {
    let mut text = format!("{}ttl = {ttl}\n", s.policy);
    if s.id == "geo" {
        text.push_str(RESIDENCY);
        text.push('\n');
    }
    text
}

/// The faults the schedule injects. `Down`, `Hung`, `SlowDrip` and
/// `Unavailable` make an endpoint unfit within the detection bound.
const FAULTS: [(Fault, u32); 6] = [
    (Fault::Down, 25),
    (Fault::Hung, 20),
    (Fault::SlowDrip, 15),
    (Fault::RateLimited, 20),
    (Fault::Unavailable, 10),
    (Fault::ModelMissing, 10),
];

fn is_down(f: Fault) -> bool {
    matches!(
        f,
        Fault::Down | Fault::Hung | Fault::SlowDrip | Fault::Unavailable
    )
}

/// Fault history per region: (since, fault), in time order.
#[derive(Default)]
struct Timeline {
    events: Vec<Vec<(Instant, Fault)>>,
}

impl Timeline {
    fn at(&self, region: usize, t: Instant) -> (Fault, Option<Instant>) {
        let events = &self.events[region];
        match events.iter().rposition(|(since, _)| *since <= t) {
            None => (Fault::None, None),
            Some(i) => (events[i].1, Some(events[i].0)),
        }
    }

    /// Since when the region has been down at `t` (consecutive down faults
    /// count from the first).
    fn down_since(&self, region: usize, t: Instant) -> Option<Instant> {
        let events = &self.events[region];
        let last = events.iter().rposition(|(since, _)| *since <= t)?;
        if !is_down(events[last].1) {
            return None;
        }
        let mut first = last;
        while first > 0 && is_down(events[first - 1].1) {
            first -= 1;
        }
        Some(events[first].0)
    }

    /// Fault-free for at least `rise` at `t` (after a missing model, also
    /// the model list's interval).
    fn fit(&self, region: usize, t: Instant, rise: Duration) -> bool {
        let events = &self.events[region];
        let Some(last) = events.iter().rposition(|(since, _)| *since <= t) else {
            return true;
        };
        let (since, fault) = events[last];
        // The model list has its own rise, its successes spaced by its own
        // interval (with up to 10 % jitter): after a missing model, and
        // after any fault that failed the model list probe too (dead, hung,
        // dripping, 503), the region is fit once that layer has risen.
        let rise = match last.checked_sub(1).map(|i| events[i].1) {
            Some(f) if f == Fault::ModelMissing || is_down(f) => {
                rise + MODELS_INTERVAL.mul_f64(1.1) * (DEFAULT_RISE - 1)
            }
            _ => rise,
        };
        fault == Fault::None && t.saturating_duration_since(since) >= rise
    }
}

struct Pending {
    sent: Instant,
    service: usize,
    client: Option<usize>,
}

#[derive(Default)]
struct Stats {
    sent: u64,
    checked: u64,
    unanswered: u64,
    answers: u64,
    nodata: u64,
    servfail_none_fit: u64,
    fail_open_down: u64,
    rcodes: BTreeMap<String, u64>,
    violations: BTreeMap<String, u64>,
    /// Queries never answered, by the second (since the start) they were sent.
    lost_by_second: BTreeMap<u64, u64>,
    examples: Vec<String>,
}

impl Stats {
    fn violation(&mut self, kind: impl Into<String>, detail: String) {
        let kind = kind.into();
        if self.examples.len() < 20 {
            self.examples.push(format!("{kind}: {detail}"));
        }
        *self.violations.entry(kind).or_default() += 1;
    }

    fn lost(&mut self, p: &Pending, start: Instant) {
        self.unanswered += 1;
        let second = p.sent.saturating_duration_since(start).as_secs();
        *self.lost_by_second.entry(second).or_default() += 1;
    }
}

struct Checker {
    services: Vec<Service>,
    timeline: Mutex<Timeline>,
    pending: Mutex<Vec<Option<Pending>>>,
    stats: Mutex<Stats>,
    /// Down longer than this: never answered while another region is fit.
    bound: Duration,
    /// Restored this long ago: fit again.
    rise: Duration,
}

impl Checker {
    fn check(&self, p: &Pending, bytes: &[u8]) {
        let mut stats = self.stats.lock().unwrap();
        stats.checked += 1;
        let service = &self.services[p.service];
        let what = || {
            format!(
                "{} from {} at +{:?}",
                service.id,
                p.client.map_or("no ECS (127.0.0.1)", |c| CLIENTS[c].0),
                p.sent.elapsed()
            )
        };
        if let Err(e) = check_wire(bytes) {
            stats.violation("malformed reply", format!("{}: {e}", what()));
            return;
        }
        let m = match Message::from_vec(bytes) {
            Ok(m) => m,
            Err(e) => {
                stats.violation("unparsable reply", format!("{}: {e}", what()));
                return;
            }
        };
        let rcode = m.metadata.response_code;
        *stats.rcodes.entry(rcode.to_string()).or_default() += 1;
        let client = p.client.map_or(Zone::Unknown, |c| CLIENTS[c].2);
        let allowed = |r: usize| {
            service
                .residency
                .is_none_or(|f| f(client).contains(&REGIONS[r].5))
        };
        let timeline = self.timeline.lock().unwrap();
        let any_fit = service
            .regions
            .iter()
            .any(|&r| allowed(r) && timeline.fit(r, p.sent, self.rise));
        match rcode {
            ResponseCode::NoError => {}
            ResponseCode::ServFail => {
                if any_fit {
                    stats.violation("SERVFAIL with a fit region", what());
                } else {
                    stats.servfail_none_fit += 1;
                }
                return;
            }
            other => {
                stats.violation("unexpected rcode", format!("{}: {other}", what()));
                return;
            }
        }
        let addresses: Vec<IpAddr> = m
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect();
        if addresses.is_empty() {
            stats.nodata += 1;
            return;
        }
        stats.answers += 1;
        for address in addresses {
            let Some(r) = REGIONS.iter().position(|x| IpAddr::V4(x.1) == address) else {
                stats.violation("answer names no region", format!("{}: {address}", what()));
                continue;
            };
            if !allowed(r) {
                stats.violation(
                    "outside the client's jurisdiction",
                    format!("{}: {} ({:?})", what(), REGIONS[r].0, REGIONS[r].5),
                );
            }
            if let Some(since) = timeline.down_since(r, p.sent) {
                let down_for = p.sent.saturating_duration_since(since);
                if down_for > self.bound {
                    if any_fit {
                        let fault = timeline.at(r, p.sent).0;
                        stats.violation(
                            format!("down endpoint answered ({})", fault.name()),
                            format!(
                                "{}: {} {} for {down_for:?} (bound {:?})",
                                what(),
                                REGIONS[r].0,
                                fault.name(),
                                self.bound
                            ),
                        );
                    } else {
                        stats.fail_open_down += 1;
                    }
                }
            }
        }
    }
}

struct Args {
    seconds: u64,
    seed: u64,
    qps: u64,
    out: Option<PathBuf>,
}

fn args() -> Args {
    let mut a = Args {
        seconds: 60,
        seed: rand::random::<u32>() as u64,
        qps: 1000,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--seconds" => a.seconds = value().parse().expect("--seconds N"),
            "--seed" => a.seed = value().parse().expect("--seed N"),
            "--qps" => a.qps = value().parse().expect("--qps N"),
            "--out" => a.out = Some(value().into()),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!((10..=3600).contains(&a.seconds), "--seconds 10..=3600");
    assert!((1..=20_000).contains(&a.qps), "--qps 1..=20000");
    a
}

/// `$INFERDNS_BIN`, else `inferdns` in the directory above this example's.
fn daemon_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("INFERDNS_BIN") {
        return path.into();
    }
    let me = std::env::current_exe().expect("own path");
    let path = me
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("inferdns"))
        .expect("examples/ has a parent directory");
    assert!(
        path.exists(),
        "{} not found: cargo build --release --bins --examples, or set INFERDNS_BIN",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    // The same number must be free for UDP and TCP; retried if taken.
    for _ in 0..100 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on loopback");
}

fn main_config(dns: u16, admin: u16, ports: &[u16]) -> String {
    let mut text = format!(
        r#"policy-dir = "policies"

[server]
dns-listen = ["127.0.0.1:{dns}"]
admin-listen = "127.0.0.1:{admin}"

[zone]
apex = "{APEX}"
file = "zone.db"
soa = {{ primary = "ns1.{APEX}", contact = "hostmaster.{APEX}", serial = 1 }}
ns = [{{ name = "ns1.{APEX}", addresses = ["127.0.0.1"] }}]

[geoip]
database = "city.mmdb"
check-interval = "1s"
"#
    );
    for ((id, ip, country, lat, lon, zone), port) in REGIONS.iter().zip(ports) {
        let tag = match zone {
            Zone::Eu => "eu",
            Zone::Us => "us",
            _ => "apac",
        };
        text.push_str(&format!(
            r#"
[regions.{id}]
endpoints = [{{ address = "{ip}", port = {port} }}]
probe = {{ models-path = "/v1/models" }}
capacity = {{ metrics = "vllm", metrics-interval = "500ms" }}
location = {{ country = "{country}", lat = {lat}, lon = {lon} }}
jurisdictions = ["{tag}"]
"#
        ));
    }
    text
}

/// geoipupdate's way: write beside, rename over.
fn replace(path: &Path, bytes: &[u8]) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, bytes).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

fn proc_status(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rss_kb(pid: u32) -> u64 {
    proc_status(pid, "VmRSS:")
}

/// Open descriptors sampled every 100 ms for 2 s: (fewest, most). Probe
/// connections open and close (or stay pooled) as probes come and go, so
/// one sample is not a baseline.
async fn fds_window(pid: u32) -> (usize, usize) {
    let mut seen = Vec::new();
    for _ in 0..20 {
        seen.push(fds(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (*seen.iter().min().unwrap(), *seen.iter().max().unwrap())
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A random client subnet inside the network: /24 for IPv4, /56 for IPv6.
fn random_subnet(net: &str, rng: &mut StdRng) -> ClientSubnet {
    let net: ipnet::IpNet = net.parse().unwrap();
    match net {
        ipnet::IpNet::V4(n) => {
            let blocks = 1u32 << (24 - n.prefix_len().min(24));
            let base = u32::from(n.network()) + rng.random_range(0..blocks) * 256;
            ClientSubnet::new(IpAddr::V4(base.into()), 24, 0)
        }
        ipnet::IpNet::V6(n) => {
            let blocks = 1u128 << (56 - n.prefix_len().min(56));
            let base = u128::from(n.network()) + (rng.random_range(0..blocks.min(1 << 40)) << 72);
            ClientSubnet::new(IpAddr::V6(base.into()), 56, 0)
        }
    }
}

fn query(service: &Service, id: u16, subnet: Option<ClientSubnet>) -> Vec<u8> {
    let mut m = Ask::new(&format!("{}.{APEX}.", service.id), RecordType::A).message();
    m.metadata.id = id;
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    if let Some(s) = subnet {
        edns.options_mut().insert(EdnsOption::Subnet(s));
    }
    m.set_edns(edns);
    m.to_vec().unwrap()
}

async fn metrics(admin: u16) -> String {
    let response = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
        .get(format!("http://127.0.0.1:{admin}/metrics"))
        .send()
        .await;
    match response {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn sighup(pid: u32) {
    let status = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -HUP {pid}");
}

#[derive(Default, serde::Serialize)]
struct Events {
    down: u32,
    hung: u32,
    slow_drip: u32,
    rate_limited: u32,
    unavailable: u32,
    model_missing: u32,
    restored: u32,
    capacity_swings: u32,
    reloads_good: u32,
    reloads_broken: u32,
    geoip_swaps_good: u32,
    geoip_swaps_broken: u32,
}

struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    println!(
        "soak: {} s, seed {}, {} queries/s",
        a.seconds, a.seed, a.qps
    );
    inferdns::health::probe::install_crypto_provider();
    let mut rng = StdRng::seed_from_u64(a.seed);
    let mut sims = Vec::new();
    for (_, ip, ..) in REGIONS {
        sims.push(
            SimRegion::start(SocketAddr::new(IpAddr::V4(ip), 0), MODEL)
                .await
                .unwrap(),
        );
    }
    let ports: Vec<u16> = sims.iter().map(|s| s.addr().port()).collect();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (dns_port, admin_port) = (free_port(), free_port());
    let services = services();
    std::fs::create_dir_all(root.join("policies")).unwrap();
    for s in &services {
        std::fs::write(
            root.join(format!("policies/{}.toml", s.id)),
            policy_text(s, 30),
        )
        .unwrap();
    }
    std::fs::write(
        root.join("zone.db"),
        format!("$ORIGIN {APEX}.\n$TTL 300\nwww IN A 192.0.2.80\n"),
    )
    .unwrap();
    let db = root.join("city.mmdb");
    std::fs::write(&db, GEOIP).unwrap();
    let config = root.join("inferdns.toml");
    std::fs::write(&config, main_config(dns_port, admin_port, &ports)).unwrap();

    let log = root.join("daemon.log");
    let child = Command::new(daemon_binary())
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("the inferdns binary starts");
    let mut daemon = Daemon { child, log };
    let pid = daemon.child.id();
    let dns = SocketAddr::from(([127, 0, 0, 1], dns_port));

    // Ready: every service answers a US client (first probe results in).
    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    socket.connect(dns).await.unwrap();
    let us = Some("198.51.100.0/24".parse::<ClientSubnet>().unwrap());
    let ready_by = Instant::now() + Duration::from_secs(30);
    'ready: loop {
        assert!(
            Instant::now() < ready_by,
            "the daemon never answered; log:\n{}",
            std::fs::read_to_string(&daemon.log).unwrap_or_default()
        );
        if let Ok(Some(status)) = daemon.child.try_wait() {
            panic!(
                "the daemon exited: {status}; log:\n{}",
                std::fs::read_to_string(&daemon.log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        for s in &services {
            let _ = socket.send(&query(s, 1, us)).await;
            let mut buf = [0u8; 1500];
            match tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buf)).await {
                Ok(Ok(n)) => match Message::from_vec(&buf[..n]) {
                    Ok(m)
                        if m.metadata.response_code == ResponseCode::NoError
                            && !m.answers.is_empty() => {}
                    _ => continue 'ready,
                },
                _ => continue 'ready,
            }
        }
        break;
    }
    let (_, fds_baseline) = fds_window(pid).await;
    println!(
        "ready: pid {pid}, dns {dns}, admin 127.0.0.1:{admin_port}, {fds_baseline} descriptors, {} kB resident",
        rss_kb(pid)
    );

    // The README's failover bound: interval x fall + timeout + 1 s.
    let bound = DEFAULT_INTERVAL * DEFAULT_FALL + DEFAULT_TIMEOUT + Duration::from_secs(1);
    let rise = DEFAULT_INTERVAL * DEFAULT_RISE + DEFAULT_TIMEOUT + Duration::from_secs(1);
    let checker = Arc::new(Checker {
        services,
        timeline: Mutex::new(Timeline {
            events: vec![Vec::new(); REGIONS.len()],
        }),
        pending: Mutex::new((0..=u16::MAX).map(|_| None).collect()),
        stats: Mutex::new(Stats::default()),
        bound,
        rise,
    });

    // Receiver: checks each reply as it arrives.
    let receiver = {
        let (socket, checker) = (socket.clone(), checker.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            while let Ok(n) = socket.recv(&mut buf).await {
                if n < 2 {
                    continue;
                }
                let id = u16::from_be_bytes([buf[0], buf[1]]);
                let p = checker.pending.lock().unwrap()[id as usize].take();
                if let Some(p) = p {
                    checker.check(&p, &buf[..n]);
                }
            }
        })
    };

    let start = Instant::now();
    let chaos_end = start + Duration::from_secs(a.seconds);
    // After the chaos: every fault cleared, load goes on until all is fit again.
    let settle = rise + Duration::from_secs(3);
    let load_end = chaos_end + settle;
    let warmup = Duration::from_secs((a.seconds / 5).max(10));

    // Sender: qps/100 queries every 10 ms, ids in turn.
    let sender = {
        let (socket, checker) = (socket.clone(), checker.clone());
        let mut rng = StdRng::seed_from_u64(a.seed ^ 0x9e37_79b9);
        let per_tick = a.qps.div_ceil(100);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut id: u16 = 0;
            while Instant::now() < load_end {
                tick.tick().await;
                for _ in 0..per_tick {
                    let service = rng.random_range(0..checker.services.len());
                    // One query in 20 without ECS: the resolver (loopback) is unknown.
                    let client =
                        (!rng.random_ratio(1, 20)).then(|| rng.random_range(0..CLIENTS.len()));
                    let subnet = client.map(|c| random_subnet(CLIENTS[c].0, &mut rng));
                    let bytes = query(&checker.services[service], id, subnet);
                    let sent = Instant::now();
                    let old = checker.pending.lock().unwrap()[id as usize].replace(Pending {
                        sent,
                        service,
                        client,
                    });
                    {
                        let mut stats = checker.stats.lock().unwrap();
                        if let Some(old) = old {
                            stats.lost(&old, start);
                        }
                        stats.sent += 1;
                    }
                    let _ = socket.send(&bytes).await;
                    id = id.wrapping_add(1);
                }
            }
        })
    };

    // The schedule.
    let mut events = Events::default();
    let mut faulted: Vec<Option<Instant>> = vec![None; REGIONS.len()];
    let mut rss_samples: Vec<(f64, u64)> = Vec::new();
    let mut rss_baseline = 0;
    let mut next_sample = start;
    let mut ttl = 30;
    let total_weight: u32 = FAULTS.iter().map(|f| f.1).sum();
    let set_fault = |r: usize, fault: Fault| {
        sims[r].set_fault(fault);
        checker.timeline.lock().unwrap().events[r].push((Instant::now(), fault));
    };
    while Instant::now() < chaos_end {
        let now = Instant::now();
        if now >= next_sample {
            let rss = rss_kb(pid);
            rss_samples.push((now.duration_since(start).as_secs_f64(), rss));
            if rss_baseline == 0 && now.duration_since(start) >= warmup {
                rss_baseline = rss;
                println!("warm-up over at {:?}: {rss} kB resident", warmup);
            }
            next_sample += Duration::from_secs(1);
        }
        if let Ok(Some(status)) = daemon.child.try_wait() {
            panic!("the daemon died during the soak: {status}");
        }
        for (r, until) in faulted.iter_mut().enumerate() {
            if until.is_some_and(|until| until <= now) {
                set_fault(r, Fault::None);
                *until = None;
                events.restored += 1;
            }
        }
        match rng.random_range(0..100) {
            0..50 => {
                let busy = faulted.iter().filter(|f| f.is_some()).count();
                let r = rng.random_range(0..REGIONS.len());
                if busy < 2 && faulted[r].is_none() {
                    let mut pick = rng.random_range(0..total_weight);
                    let fault = FAULTS
                        .iter()
                        .find(|(_, w)| {
                            let hit = pick < *w;
                            pick = pick.saturating_sub(*w);
                            hit
                        })
                        .unwrap()
                        .0;
                    match fault {
                        Fault::Down => events.down += 1,
                        Fault::Hung => events.hung += 1,
                        Fault::SlowDrip => events.slow_drip += 1,
                        Fault::RateLimited => events.rate_limited += 1,
                        Fault::Unavailable => events.unavailable += 1,
                        _ => events.model_missing += 1,
                    }
                    set_fault(r, fault);
                    faulted[r] = Some(now + Duration::from_millis(rng.random_range(3_000..10_000)));
                }
            }
            50..70 => {
                let r = rng.random_range(0..REGIONS.len());
                sims[r].set_load(Load {
                    running: rng.random_range(0..64),
                    waiting: rng.random_range(0..40),
                    kv_cache: rng.random_range(0.05..0.99),
                });
                events.capacity_swings += 1;
            }
            70..85 => {
                let broken = rng.random_ratio(1, 3);
                let s = &checker.services[rng.random_range(0..checker.services.len())];
                let path = root.join(format!("policies/{}.toml", s.id));
                if broken {
                    // A key that does not exist: refused, the running config stays.
                    std::fs::write(&path, format!("{}tierz = 1\n", policy_text(s, ttl))).unwrap();
                    events.reloads_broken += 1;
                } else {
                    ttl = if ttl == 30 { 20 } else { 30 };
                    for s in &checker.services {
                        std::fs::write(
                            root.join(format!("policies/{}.toml", s.id)),
                            policy_text(s, ttl),
                        )
                        .unwrap();
                    }
                    events.reloads_good += 1;
                }
                sighup(pid);
            }
            _ => {
                if rng.random_ratio(1, 3) {
                    replace(&db, &GEOIP[..GEOIP.len() / 2]);
                    events.geoip_swaps_broken += 1;
                } else {
                    replace(&db, GEOIP);
                    events.geoip_swaps_good += 1;
                }
                // Give the 1 s check interval time to see each file.
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2_000))).await;
    }

    // Clear everything; the config and database end good.
    for (r, f) in faulted.iter_mut().enumerate() {
        if f.take().is_some() {
            set_fault(r, Fault::None);
            events.restored += 1;
        }
        sims[r].set_load(Load::default());
    }
    for s in &checker.services {
        std::fs::write(
            root.join(format!("policies/{}.toml", s.id)),
            policy_text(s, ttl),
        )
        .unwrap();
    }
    sighup(pid);
    events.reloads_good += 1;
    replace(&db, GEOIP);
    events.geoip_swaps_good += 1;
    sender.await.unwrap();
    // Replies still in flight.
    tokio::time::sleep(Duration::from_secs(2)).await;
    receiver.abort();
    // Leaked descriptors: even the fewest open at the end exceed the most
    // open at the start.
    let (fds_end, _) = fds_window(pid).await;
    let rss_end = rss_kb(pid);
    let rss_max = rss_samples
        .iter()
        .map(|s| s.1)
        .max()
        .unwrap_or(0)
        .max(rss_end);
    let text = metrics(admin_port).await;
    // Queries the daemon counted: far fewer than sent means loss on the way in.
    let daemon_queries: f64 = text
        .lines()
        .filter(|l| l.starts_with("inferdns_dns_queries_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let reloads_ok = metric(&text, "inferdns_reloads_total{result=\"success\"}");
    let reloads_failed = metric(&text, "inferdns_reloads_total{result=\"failure\"}");
    let geoip_ok = metric(&text, "inferdns_geoip_loads_total{result=\"success\"}");
    let geoip_failed = metric(&text, "inferdns_geoip_loads_total{result=\"failure\"}");

    // SIGTERM: a clean exit.
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let exit = {
        let by = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                break Some(status);
            }
            if Instant::now() > by {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let log_text = std::fs::read_to_string(&daemon.log).unwrap_or_default();

    let mut stats = std::mem::take(&mut *checker.stats.lock().unwrap());
    for p in checker.pending.lock().unwrap().iter().flatten() {
        stats.lost(p, start);
    }
    if stats.unanswered * 1000 > stats.sent {
        stats.violation(
            "unanswered above 0.1 %",
            format!("{} of {}", stats.unanswered, stats.sent),
        );
    }
    if log_text.contains("panicked") {
        stats.violation("panic", "the daemon's log holds a panic".into());
    }
    if !exit.is_some_and(|s| s.success()) {
        stats.violation("unclean exit", format!("{exit:?} after SIGTERM"));
    }
    let growth = if rss_baseline > 0 {
        (rss_end as f64 / rss_baseline as f64 - 1.0) * 100.0
    } else {
        0.0
    };
    if growth >= 10.0 {
        stats.violation(
            "memory growth",
            format!("{rss_baseline} kB after warm-up, {rss_end} kB at the end"),
        );
    }
    if fds_end > fds_baseline {
        stats.violation(
            "descriptors not back",
            format!("at most {fds_baseline} at the start, at least {fds_end} at the end"),
        );
    }
    // Each SIGHUP is one reload (they are spaced by at least 0.5 s); the
    // first GeoIP load is the start.
    if reloads_ok as u32 != events.reloads_good || reloads_failed as u32 != events.reloads_broken {
        stats.violation(
            "reloads miscounted",
            format!(
                "{reloads_ok} good and {reloads_failed} refused counted, {} and {} done",
                events.reloads_good, events.reloads_broken
            ),
        );
    }
    if events.geoip_swaps_broken > 0 && geoip_failed < 1.0 {
        stats.violation(
            "broken GeoIP file not noticed",
            format!("{} truncated files swapped in", events.geoip_swaps_broken),
        );
    }

    let violations: u64 = stats.violations.values().sum();
    let summary = json!({
        "seed": a.seed, "seconds": a.seconds, "qps": a.qps,
        "queries_sent": stats.sent, "answers_checked": stats.checked, "unanswered": stats.unanswered,
        "daemon_counted_queries": daemon_queries,
        "unanswered_by_second": stats.lost_by_second,
        "with_records": stats.answers, "nodata": stats.nodata,
        "servfail_with_nothing_fit": stats.servfail_none_fit,
        "fail_open_answers_naming_down_endpoints": stats.fail_open_down,
        "rcodes": stats.rcodes, "violations": violations, "violations_by_kind": stats.violations,
        "examples": stats.examples, "events": events,
        "detection_bound_s": bound.as_secs_f64(), "rise_bound_s": rise.as_secs_f64(),
        "rss_kb": { "after_warmup": rss_baseline, "end": rss_end, "max": rss_max, "growth_pct": (growth * 10.0).round() / 10.0 },
        "fds": { "most_at_start": fds_baseline, "fewest_at_end": fds_end },
        "reloads": { "success": reloads_ok, "failure": reloads_failed },
        "geoip_loads": { "success": geoip_ok, "failure": geoip_failed },
        "daemon_log_lines": { "warn": log_text.matches("WARN").count(), "error": log_text.matches("ERROR").count() },
    });
    println!("{}", serde_json::to_string_pretty(&summary).unwrap());
    if let Some(out) = &a.out {
        std::fs::write(out, format!("{summary}\n")).unwrap();
        println!("written to {}", out.display());
    }
    drop(daemon);
    drop(sims);
    if violations > 0 {
        // The daemon's own account of the run, for the post-mortem.
        if let Some(out) = &a.out {
            let kept = out.with_extension("daemon.log");
            std::fs::write(&kept, &log_text).unwrap();
            eprintln!("the daemon's log: {}", kept.display());
        }
        eprintln!("soak FAILED: {violations} violations");
        std::process::exit(1);
    }
    println!(
        "soak passed: {} queries, {} answers checked, 0 violations; RSS {rss_baseline} -> {rss_end} kB ({growth:+.1} %), descriptors {fds_baseline} -> {fds_end}",
        stats.sent, stats.checked
    );
}
