//! An edge fleet on loopback: three inferdns instances that pull each
//! other's observations (admin API on 127.0.0.121-123), simulated regions,
//! faults injected for one edge only (that edge probes its own instance of
//! the region at the same address), and the answers every edge gives.
//! The quorum rule itself is tested in `fleet::tests`; timing bounds here
//! are generous and the measured figures are printed.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{FAST_PROBE, Files, ZONE, base_config, http};
use hickory_proto::op::{Edns, Message};
use hickory_proto::rr::RecordType;
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use inferdns::app::{self, Running};
use inferdns::config;
use inferdns::demo::client::{Ask, answer_strings, exchange_udp};
use inferdns::demo::{Fault, Load, MODEL, SimRegion};
use tokio::time::Instant;

const TOKEN: &str = "fleet-token-0123";
const CHAT: &str = "chat.inference.example.com.";
const NAMES: [&str; 3] = ["edge-a", "edge-b", "edge-c"];
const PULL: Duration = Duration::from_millis(200);
const DB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/geoip/test-city.mmdb");

struct Edge {
    running: Running,
    _files: Files,
}

/// The admin address of edge `i` (fixed: the peers must know it before start).
fn admin(i: usize, port: u16) -> String {
    format!("127.0.0.{}:{port}", 121 + i)
}

/// Starts three edges; `regions(i)` is edge `i`'s regions and services.
async fn start_fleet(quorum: &str, port: u16, regions: impl Fn(usize) -> String) -> Vec<Edge> {
    start_edges(3, quorum, port, regions).await
}

/// Starts the first `count` edges of a fleet of three.
async fn start_edges(
    count: usize,
    quorum: &str,
    port: u16,
    regions: impl Fn(usize) -> String,
) -> Vec<Edge> {
    let mut edges = Vec::new();
    for (i, name) in NAMES.iter().enumerate().take(count) {
        let peers: Vec<String> = (0..3)
            .filter(|j| *j != i)
            .map(|j| {
                format!(
                    "{{ name = \"{}\", url = \"http://{}\" }}",
                    NAMES[j],
                    admin(j, port)
                )
            })
            .collect();
        let extra = format!(
            "[geoip]\ndatabase = \"{DB}\"\n[ecs]\nmax-prefix-v4 = 32\n\n[fleet]\nedge = \"{}\"\ntoken-file = \"fleet-token\"\nquorum = \"{quorum}\"\npull-interval = \"{}ms\"\npeers = [{}]\n\n{}",
            name,
            PULL.as_millis(),
            peers.join(", "),
            regions(i)
        );
        let text = base_config(&extra).replace(
            "admin-listen = \"127.0.0.1:0\"",
            &format!("admin-listen = \"{}\"\nnsid = \"{}\"", admin(i, port), name),
        );
        let files = Files::new();
        files.write("zone.db", ZONE);
        files.write("fleet-token", &format!("{TOKEN}\n"));
        let path = files.write("inferdns.toml", &text);
        let config = config::load(&path).unwrap_or_else(|e| panic!("config should load:\n{e}"));
        let options = app::StartOptions {
            config_path: Some(path),
            ..app::StartOptions::default()
        };
        let running = app::start(config, options).await.expect("edge starts");
        edges.push(Edge {
            running,
            _files: files,
        });
    }
    edges
}

impl Edge {
    async fn answer(&self, name: &str, subnet: Option<&str>) -> Vec<String> {
        let mut m = Ask::new(name, RecordType::A).message();
        if let Some(s) = subnet {
            let mut edns = Edns::new();
            edns.set_max_payload(1232);
            let s: ClientSubnet = s.parse().unwrap();
            edns.options_mut().insert(EdnsOption::Subnet(s));
            m.set_edns(edns);
        }
        let bytes = exchange_udp(
            self.running.dns[0],
            &m.to_vec().unwrap(),
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        let m = Message::from_vec(&bytes).unwrap();
        if let Some(e) = &m.edns
            && subnet.is_some()
        {
            assert!(e.option(EdnsCode::Subnet).is_some(), "ECS echoed");
        }
        answer_strings(&m)
    }

    async fn status(&self) -> serde_json::Value {
        let url = format!("http://{}/v1/status", self.running.admin);
        let (code, body) = http("GET", &url, None, None).await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The quorum view of the endpoint at `address`.
    async fn quorum_of(&self, address: &str) -> serde_json::Value {
        let status = self.status().await;
        status["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["target"] == address)
            .map(|e| e["quorum"].clone())
            .unwrap_or_default()
    }
}

/// Polls until every edge in `edges` answers `want` for `name`.
async fn all_answer(edges: &[&Edge], name: &str, want: &[&str], limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let mut answers = Vec::new();
        for e in edges {
            answers.push(e.answer(name, None).await);
        }
        if answers.iter().all(|a| a == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "edges answer {answers:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `east` at 127.0.0.51 (edge-a probes its own instance of it, so that a
/// fault can be injected for edge-a alone), `west` at 127.0.0.52.
struct Regions {
    east: SimRegion,
    east_seen_by_a: SimRegion,
    west: SimRegion,
}

impl Regions {
    async fn start() -> Regions {
        let at = |ip: &str| format!("{ip}:0").parse().unwrap();
        Regions {
            east: SimRegion::start(at("127.0.0.51"), MODEL).await.unwrap(),
            east_seen_by_a: SimRegion::start(at("127.0.0.51"), MODEL).await.unwrap(),
            west: SimRegion::start(at("127.0.0.52"), MODEL).await.unwrap(),
        }
    }

    fn config(&self, edge: usize) -> String {
        let east = if edge == 0 {
            &self.east_seen_by_a
        } else {
            &self.east
        };
        format!(
            r#"
[regions.east]
endpoints = [{{ address = "127.0.0.51", port = {e} }}]
{FAST_PROBE}

[regions.west]
endpoints = [{{ address = "127.0.0.52", port = {w} }}]
{FAST_PROBE}

[services.chat]
tiers = [["east"], ["west"]]
"#,
            e = east.addr().port(),
            w = self.west.addr().port()
        )
    }
}

/// Waits until edge-a's own view of east (its first vantage point) is down.
async fn until_edge_a_sees_east_down(edge: &Edge) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let q = edge.quorum_of("127.0.0.51").await;
        if q["views"][0]["alive"] == "down" {
            return q;
        }
        assert!(Instant::now() < deadline, "edge-a never saw east down: {q}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls every edge for `window`; panics if one answers anything but `want`.
async fn steady(edges: &[&Edge], want: &[&str], window: Duration) -> usize {
    let end = Instant::now() + window;
    let mut asked = 0;
    while Instant::now() < end {
        for (i, e) in edges.iter().enumerate() {
            let got = e.answer(CHAT, None).await;
            assert_eq!(got, want, "edge {i} moved");
            asked += 1;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    asked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_majority_keeps_a_region_one_edge_cannot_reach_and_moves_together_when_it_dies() {
    let r = Regions::start().await;
    let edges = start_fleet("majority", 19153, |i| r.config(i)).await;
    let all: Vec<&Edge> = edges.iter().collect();
    all_answer(&all, CHAT, &["127.0.0.51"], Duration::from_secs(10)).await;

    // Edge-a alone loses its path to east: it sees east down, the fleet does not.
    r.east_seen_by_a.set_fault(Fault::Down);
    let q = until_edge_a_sees_east_down(&edges[0]).await;
    assert_eq!(q["result"], "up", "{q}");
    assert_eq!(q["local_fallback"], false, "{q}");
    // Explain says the fleet overruled this edge (2 of 3 views, or 1 of
    // 2 while a peer's last pull is late: a tie stays up).
    let url = format!("http://{}/v1/explain?name=chat", edges[0].running.admin);
    let (_, text) = http("GET", &url, None, None).await;
    assert!(
        text.contains("endpoint 127.0.0.51: up (quorum majority: ")
            && text.contains("vantage points see it up (this edge: down)) -> kept"),
        "{text}"
    );
    let asked = steady(&all, &["127.0.0.51"], Duration::from_secs(2)).await;
    eprintln!("one edge cut off from east: {asked} answers over 2 s, all east");

    // East really dies: every edge moves, within about a pull interval of each other.
    let died = Instant::now();
    r.east.set_fault(Fault::Down);
    let mut moved: Vec<Option<Duration>> = vec![None; 3];
    while moved.iter().any(Option::is_none) {
        assert!(died.elapsed() < Duration::from_secs(10), "{moved:?}");
        for (i, e) in edges.iter().enumerate() {
            if moved[i].is_none() && e.answer(CHAT, None).await == ["127.0.0.52"] {
                moved[i] = Some(died.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let moved: Vec<Duration> = moved.into_iter().flatten().collect();
    let spread = *moved.iter().max().unwrap() - *moved.iter().min().unwrap();
    eprintln!("east died: edges moved after {moved:?} (spread {spread:?}, pull interval {PULL:?})");
    // Detection on each edge (fall 2 x 100 ms probes, jittered) plus one
    // pull: well inside a second even on a loaded machine.
    assert!(spread < Duration::from_secs(1), "spread {spread:?}");
    // Nobody goes back while it is dead.
    steady(&all, &["127.0.0.52"], Duration::from_millis(500)).await;

    // Edge-c is killed: the two left keep working and say the quorum is degraded.
    edges[2].running.shutdown();
    r.east.set_fault(Fault::None);
    r.east_seen_by_a.set_fault(Fault::None);
    let two: Vec<&Edge> = edges[..2].iter().collect();
    all_answer(&two, CHAT, &["127.0.0.51"], Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    for e in &two {
        loop {
            let s = e.status().await;
            let fleet = &s["fleet"];
            if fleet["state"] == "degraded" {
                assert_eq!(fleet["fresh"], 2, "{fleet}");
                let c = fleet["peers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| p["name"] == "edge-c")
                    .unwrap();
                assert_eq!(c["fresh"], false, "{fleet}");
                assert!(c["last_error"].is_string(), "{fleet}");
                break;
            }
            assert!(Instant::now() < deadline, "never degraded: {fleet}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let url = format!("http://{}/metrics", e.running.admin);
        let (_, metrics) = http("GET", &url, None, None).await;
        assert!(
            metrics.contains("inferdns_fleet_vantage_points 2"),
            "{metrics}"
        );
        assert!(
            metrics.contains("inferdns_fleet_peer_fresh{peer=\"edge-c\"} 0"),
            "{metrics}"
        );
        assert!(metrics.contains("inferdns_fleet_local_fallback 0"));
    }
    // With two of three left, one edge's lost path still moves nothing (a tie keeps it up).
    r.east_seen_by_a.set_fault(Fault::Down);
    until_edge_a_sees_east_down(&edges[0]).await;
    steady(&two, &["127.0.0.51"], Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_left_alone_decides_from_its_own_view_and_says_so() {
    let r = Regions::start().await;
    let edges = start_fleet("majority", 19253, |i| r.config(i)).await;
    let all: Vec<&Edge> = edges.iter().collect();
    all_answer(&all, CHAT, &["127.0.0.51"], Duration::from_secs(10)).await;
    edges[1].running.shutdown();
    edges[2].running.shutdown();
    // Edge-a now sees east down alone, and nobody is left to outvote it.
    r.east_seen_by_a.set_fault(Fault::Down);
    all_answer(&all[..1], CHAT, &["127.0.0.52"], Duration::from_secs(10)).await;
    let s = edges[0].status().await;
    assert_eq!(s["fleet"]["state"], "local", "{}", s["fleet"]);
    let q = edges[0].quorum_of("127.0.0.51").await;
    assert_eq!(q["local_fallback"], true, "{q}");
    let url = format!("http://{}/metrics", edges[0].running.admin);
    let (_, metrics) = http("GET", &url, None, None).await;
    assert!(metrics.contains("inferdns_fleet_local_fallback 1"));
}

#[tokio::test]
async fn observations_need_the_fleet_token() {
    let r = Regions::start().await;
    let edges = start_fleet("majority", 19353, |i| r.config(i)).await;
    let url = format!("http://{}/v1/fleet/observations", edges[0].running.admin);
    assert_eq!(http("GET", &url, None, None).await.0, 401);
    assert_eq!(http("GET", &url, Some("wrong"), None).await.0, 401);
    let (code, body) = http("GET", &url, Some(TOKEN), None).await;
    assert_eq!(code, 200, "{body}");
    let obs: inferdns::fleet::Observations = serde_json::from_str(&body).unwrap();
    assert_eq!(obs.edge, "edge-a");
    assert_eq!(obs.endpoints.len(), 2);
    assert!(obs.endpoints.iter().any(|e| e.target == "127.0.0.51"));
}

/// Three regions at the three test-database places, each serving the same
/// load figures to every edge; three services over them.
fn steady_config(regions: &[(SimRegion, &str, &str, f64, f64)]) -> String {
    let mut text = String::new();
    for (region, id, country, lat, lon) in regions {
        text.push_str(&format!(
            "[regions.{id}]\nendpoints = [{{ address = \"{}\", port = {} }}]\nlocation = {{ country = \"{country}\", lat = {lat}, lon = {lon} }}\nprobe = {{ interval = \"200ms\" }}\ncapacity = {{ metrics = \"vllm\", metrics-interval = \"200ms\", max-age = \"30s\" }}\n\n",
            region.addr().ip(),
            region.addr().port()
        ));
    }
    text.push_str(
        r#"
[services.chat]
tiers = [["eu"], ["us"], ["ap"]]

[services.near]
tiers = [["eu", "us", "ap"]]
strategy = "proximity"
proximity-tolerance = "40ms"

[services.pool]
tiers = [["eu", "us", "ap"]]
strategy = "capacity"
"#,
    );
    text
}

/// /24 client subnets in the test database's networks (none in 127/8).
fn client_subnets(count: usize) -> Vec<String> {
    let mut out = Vec::new();
    for second in 0..=9u32 {
        for third in 0..=99u32 {
            out.push(format!("10.{second}.{third}.0/24"));
        }
    }
    out.truncate(count);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_edge_gives_a_client_subnet_the_same_answer() {
    let at = |ip: &str| format!("{ip}:0").parse().unwrap();
    let places = [
        ("eu", "127.0.0.55", "DE", 50.11, 8.68, 0.2),
        ("us", "127.0.0.56", "US", 38.90, -77.04, 0.5),
        ("ap", "127.0.0.57", "JP", 35.69, 139.69, 0.7),
    ];
    let mut regions = Vec::new();
    for (id, ip, country, lat, lon, kv) in places {
        let region = SimRegion::start(at(ip), MODEL).await.unwrap();
        region.set_load(Load {
            running: 2,
            waiting: 0,
            kv_cache: kv,
        });
        regions.push((region, id, country, lat, lon));
    }
    let text = steady_config(&regions);
    let edges = start_fleet("majority", 19453, |_| text.clone()).await;
    // Every edge has read every region's load (and its peers' views).
    for e in &edges {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = e.status().await;
            let known = s["regions"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["utilization"].is_number())
                .count();
            if known == 3 && s["fleet"]["state"] == "complete" {
                break;
            }
            assert!(Instant::now() < deadline, "{s}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let subnets = client_subnets(1000);
    let mut same = BTreeMap::new();
    let mut spread: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    for service in ["chat", "near", "pool"] {
        let name = format!("{service}.inference.example.com.");
        let mut identical = 0;
        for subnet in &subnets {
            let mut answers = Vec::new();
            for e in &edges {
                answers.push(e.answer(&name, Some(subnet)).await);
            }
            if answers.iter().all(|a| *a == answers[0]) {
                identical += 1;
            }
            *spread
                .entry(service)
                .or_default()
                .entry(answers[0].join(" "))
                .or_default() += 1;
        }
        same.insert(service, identical);
    }
    eprintln!("identical answers over {} subnets: {same:?}", subnets.len());
    eprintln!("answers: {spread:?}");
    for (service, identical) in &same {
        assert_eq!(*identical, subnets.len(), "{service}: {same:?}");
    }
    // The capacity draw really spreads clients, and proximity really places them.
    assert!(spread["pool"].len() >= 2, "{spread:?}");
    assert!(spread["near"].len() >= 2, "{spread:?}");
}

/// What a hostile or broken peer does with a pull.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Hostile {
    Garbage,
    OutOfRange,
    Huge,
    Silent,
}

/// A fake edge-c at its admin address that answers every pull with `mode`.
async fn hostile_peer(port: u16, mode: tokio::sync::watch::Receiver<Hostile>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(admin(2, port)).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let mode = *mode.borrow();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let body: Vec<u8> = match mode {
                    Hostile::Garbage => b"<html>not json</html>".to_vec(),
                    Hostile::OutOfRange => br#"{"edge":"edge-c","endpoints":[],"regions":[{"id":"east","utilization":5.0,"gpus":1,"age_ms":0}]}"#.to_vec(),
                    Hostile::Huge => vec![b' '; 9 * 1024 * 1024],
                    Hostile::Silent => {
                        // Holds the connection, never answers (bounded: the test ends first).
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        return;
                    }
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(&body).await;
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_garbage_peer_changes_nothing_but_its_own_freshness() {
    let r = Regions::start().await;
    let port = 19553;
    let (mode_tx, mode_rx) = tokio::sync::watch::channel(Hostile::Garbage);
    hostile_peer(port, mode_rx).await;
    let edges = start_edges(2, "majority", port, |i| r.config(i)).await;
    let two: Vec<&Edge> = edges.iter().collect();
    all_answer(&two, CHAT, &["127.0.0.51"], Duration::from_secs(10)).await;
    for (mode, error) in [
        (Hostile::Garbage, "not observations"),
        (Hostile::OutOfRange, "out of range"),
        (Hostile::Huge, "body larger than"),
        (Hostile::Silent, "no answer within"),
    ] {
        mode_tx.send_replace(mode);
        let deadline = Instant::now() + Duration::from_secs(10);
        for e in &two {
            loop {
                let s = e.status().await;
                let c = s["fleet"]["peers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| p["name"] == "edge-c")
                    .cloned()
                    .unwrap();
                if c["last_error"].as_str().is_some_and(|t| t.contains(error)) {
                    assert_eq!(c["fresh"], false, "{c}");
                    assert_eq!(s["fleet"]["state"], "degraded", "{}", s["fleet"]);
                    break;
                }
                assert!(Instant::now() < deadline, "{mode:?}: {c}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // The hostile load report moved no region's utilisation.
        for e in &two {
            let s = e.status().await;
            let east = s["regions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["id"] == "east")
                .cloned()
                .unwrap();
            assert!(east["utilization"].is_null(), "{east}");
        }
        steady(&two, &["127.0.0.51"], Duration::from_millis(300)).await;
    }
    // And edge-a's lost path is still outvoted by the one good peer left.
    r.east_seen_by_a.set_fault(Fault::Down);
    until_edge_a_sees_east_down(&edges[0]).await;
    steady(&two, &["127.0.0.51"], Duration::from_millis(500)).await;
}
