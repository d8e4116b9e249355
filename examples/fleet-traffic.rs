//! Peer traffic of an edge fleet (`benches/fleet-traffic.sh`): four edges
//! in this process (each with three peers), 200 endpoints (20 regions of 10
//! simulated servers on 127.0.3.x, alive + model-list probes at their
//! defaults), pulls every `--pull` (default 1 s) for `--seconds` (default
//! 20). Prints what one edge receives and sends for its peers: observation
//! bodies (the edges' own counters) and the bytes on the wire (the kernel's
//! per-socket counters from `ss`, heads included). Loopback only; bounded.
//!
//!   cargo run --release --example fleet-traffic -- [--seconds 20] [--pull 1s]

use std::time::Duration;

use inferdns::app::{self, Running};
use inferdns::config;
use inferdns::demo::{MODEL, SimRegion};

const EDGES: usize = 4;
const REGIONS: usize = 20;
const PER_REGION: usize = 10;
const PORT: u16 = 19653;

fn admin(i: usize) -> String {
    format!("127.0.0.{}:{PORT}", 111 + i)
}

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

/// Sums `key:N` over the `ss` info lines of client sockets to the edges.
fn wire_bytes(key: &str) -> u64 {
    let mut total = 0;
    for i in 0..EDGES {
        let out = std::process::Command::new("ss")
            .args(["-tinH", "state", "established", "dst", &admin(i)])
            .output()
            .expect("ss (iproute2) runs");
        let text = String::from_utf8_lossy(&out.stdout);
        for word in text.split_whitespace() {
            if let Some(n) = word.strip_prefix(key).and_then(|v| v.parse::<u64>().ok()) {
                total += n;
            }
        }
    }
    total
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::main]
async fn main() {
    let seconds: u64 = arg("--seconds", "20").parse().expect("--seconds N");
    let pull = arg("--pull", "1s");
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(dir.path().join("token"), "fleet-traffic-token\n").unwrap();
    let mut servers = Vec::new();
    let mut regions = String::new();
    for r in 0..REGIONS {
        let mut endpoints = Vec::new();
        for e in 0..PER_REGION {
            let ip = format!("127.0.3.{}", 1 + r * PER_REGION + e);
            let s = SimRegion::start(format!("{ip}:0").parse().unwrap(), MODEL)
                .await
                .expect("a simulated server");
            endpoints.push(format!(
                "{{ address = \"{ip}\", port = {} }}",
                s.addr().port()
            ));
            servers.push(s);
        }
        regions.push_str(&format!(
            "[regions.r{r}]\nendpoints = [{}]\nprobe = {{ models-path = \"/v1/models\" }}\n\n",
            endpoints.join(", ")
        ));
    }
    regions.push_str("[services.chat]\ntiers = [[\"r0\", \"r1\"], [\"r2\"]]\n");
    let mut edges: Vec<Running> = Vec::new();
    for i in 0..EDGES {
        let peers: Vec<String> = (0..EDGES)
            .filter(|j| *j != i)
            .map(|j| format!("{{ name = \"e{j}\", url = \"http://{}\" }}", admin(j)))
            .collect();
        let text = format!(
            r#"[server]
dns-listen = ["127.0.0.1:0"]
admin-listen = "{admin}"
[zone]
apex = "inference.example.com"
soa = {{ primary = "ns1.example.net", contact = "hostmaster.example.net" }}
ns = [{{ name = "ns1.example.net" }}]
[fleet]
edge = "e{i}"
token-file = "token"
quorum = "majority"
pull-interval = "{pull}"
peers = [{peers}]

{regions}"#,
            admin = admin(i),
            peers = peers.join(", ")
        );
        let path = dir.path().join(format!("edge{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let config = config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let options = app::StartOptions {
            config_path: Some(path),
            ..app::StartOptions::default()
        };
        edges.push(app::start(config, options).await.expect("edge starts"));
    }
    // Warm up: every edge has pulled every peer once (connections open).
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Each scrape on a connection of its own, closed before `ss` looks.
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let scrape = |i: usize| {
        let url = format!("http://{}/metrics", admin(i));
        let client = client.clone();
        async move { client.get(url).send().await.unwrap().text().await.unwrap() }
    };
    let mut body0 = 0.0;
    for i in 0..EDGES {
        body0 += metric(&scrape(i).await, "inferdns_fleet_pull_bytes_total");
    }
    let (rx0, tx0) = (wire_bytes("bytes_received:"), wire_bytes("bytes_sent:"));
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let (rx1, tx1) = (wire_bytes("bytes_received:"), wire_bytes("bytes_sent:"));
    let mut body1 = 0.0;
    let mut pulls = 0.0;
    for i in 0..EDGES {
        let m = scrape(i).await;
        body1 += metric(&m, "inferdns_fleet_pull_bytes_total");
        pulls += metric(&m, "inferdns_fleet_pulls_total{peer=");
    }
    let per_edge = |total: f64| total / EDGES as f64 / elapsed;
    let body = per_edge(body1 - body0);
    let rx = per_edge((rx1 - rx0) as f64);
    let tx = per_edge((tx1 - tx0) as f64);
    println!(
        "fleet of {EDGES} edges (3 peers each), {} endpoints, pull every {pull}, {elapsed:.1} s",
        REGIONS * PER_REGION
    );
    println!("per edge, pulling its 3 peers:");
    println!("  observation bodies received  {body:>9.0} B/s");
    println!("  on the wire received         {rx:>9.0} B/s (responses, heads included)");
    println!("  on the wire sent             {tx:>9.0} B/s (requests)");
    println!("per edge, served to its 3 peers: the same, the other way round");
    println!(
        "one observations body (gzip): {:.0} bytes ({:.1} per endpoint); pulls since start, all edges: {pulls:.0}",
        body * 1.0 / 3.0 * parse_secs(&pull),
        body / 3.0 * parse_secs(&pull) / (REGIONS * PER_REGION) as f64
    );
    for e in &edges {
        e.shutdown();
    }
    drop(servers);
}

fn parse_secs(text: &str) -> f64 {
    humantime::parse_duration(text)
        .map(|d| d.as_secs_f64())
        .unwrap_or(1.0)
}
