//! Shared test harness: config files in a scratch directory, the real
//! loader, the real server on 127.0.0.1:0, simulated regions on loopback.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use inferdns::app::{self, Running};
use inferdns::config;
use inferdns::demo::client::{self, Ask};

pub const APEX: &str = "inference.example.com";

/// Zone file used by most tests.
pub const ZONE: &str = r#"$ORIGIN inference.example.com.
$TTL 300
www             IN A     192.0.2.80
                IN AAAA  2001:db8::80
                IN TXT   "web"
docs            IN CNAME www
loop1           IN CNAME loop2
loop2           IN CNAME loop1
outside         IN CNAME api.example.net.
*.wild          IN A     192.0.2.99
_chat._tcp      IN SRV   0 0 443 chat
"#;

/// Test config files in a temporary directory.
pub struct Files {
    pub dir: tempfile::TempDir,
}

impl Files {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("a temp dir"),
        }
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// The `[server]` and `[zone]` sections with the test zone file.
pub fn base_config(extra: &str) -> String {
    format!(
        r#"[server]
dns-listen = ["127.0.0.1:0"]
admin-listen = "127.0.0.1:0"
startup-grace = "3s"

[zone]
apex = "{APEX}"
file = "zone.db"
[zone.soa]
primary = "ns1.{APEX}"
contact = "hostmaster.{APEX}"
serial = 7
minimum = 60
ttl = 3600

[[zone.ns]]
name = "ns1.{APEX}"
addresses = ["192.0.2.53", "2001:db8::53"]

[[zone.ns]]
name = "ns.example.net"

{extra}
"#
    )
}

/// Fast probes for tests that watch failover happen.
pub const FAST_PROBE: &str =
    r#"probe = { path = "/health", interval = "100ms", timeout = "200ms", rise = 2, fall = 2 }"#;

/// A started server with its scratch files.
pub struct Server {
    pub running: Running,
    pub files: Files,
}

impl Server {
    pub async fn start(main: &str) -> Server {
        Self::start_with_zone(main, ZONE).await
    }

    pub async fn start_with_zone(main: &str, zone: &str) -> Server {
        Self::start_files(main, zone, None).await
    }

    /// A server whose mutating admin routes take `token` (written to the
    /// file `token`, named by `admin-token-file`).
    pub async fn start_with_token(main: &str, token: &str) -> Server {
        Self::start_files(main, ZONE, Some(token)).await
    }

    async fn start_files(main: &str, zone: &str, token: Option<&str>) -> Server {
        let files = Files::new();
        files.write("zone.db", zone);
        let main = match token {
            Some(token) => {
                files.write("token", &format!("{token}\n"));
                main.replace("[server]\n", "[server]\nadmin-token-file = \"token\"\n")
            }
            None => main.to_string(),
        };
        let path = files.write("inferdns.toml", &main);
        let config = config::load(&path).unwrap_or_else(|e| panic!("config should load:\n{e}"));
        let options = app::StartOptions {
            config_path: Some(path),
            ..app::StartOptions::default()
        };
        let running = app::start(config, options).await.expect("server starts");
        Server { running, files }
    }

    pub fn dns(&self) -> SocketAddr {
        self.running.dns[0]
    }

    pub async fn udp(&self, name: &str, qtype: RecordType) -> Message {
        client::query_udp(self.dns(), &Ask::new(name, qtype))
            .await
            .expect("UDP answer")
    }

    pub async fn tcp(&self, name: &str, qtype: RecordType) -> Message {
        client::query_tcp(self.dns(), &Ask::new(name, qtype))
            .await
            .expect("TCP answer")
    }

    /// Polls until the service answers `expect` (sorted strings) or panics after `limit`.
    pub async fn wait_answer(&self, name: &str, expect: &[&str], limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        let mut last = Vec::new();
        while tokio::time::Instant::now() < deadline {
            let m = self.udp(name, RecordType::A).await;
            last = client::answer_strings(&m);
            if last == expect {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("{name} still answers {last:?}, expected {expect:?}");
    }
}

/// GET over plain HTTP; returns status and body.
pub async fn http_get(url: &str) -> (u16, String) {
    inferdns::health::probe::install_crypto_provider();
    let response = reqwest::get(url).await.expect("HTTP answer");
    let status = response.status().as_u16();
    (status, response.text().await.expect("HTTP body"))
}

/// An HTTP request with an optional bearer token and body; returns status and body.
pub async fn http(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<String>,
) -> (u16, String) {
    inferdns::health::probe::install_crypto_provider();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut request = client.request(method.parse().unwrap(), url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.body(body);
    }
    let response = request.send().await.expect("HTTP answer");
    let status = response.status().as_u16();
    (status, response.text().await.expect("HTTP body"))
}

/// A main file and two policy files with ten mistakes between them, one of
/// each kind `check` explains (see [`TEN_MISTAKES_REPORT`]).
pub const TEN_MISTAKES: [(&str, &str); 3] = [
    (
        "inferdns.toml",
        r#"policy-dir = "policies"

[server]
dns-listen = ["127.0.0.1:0"]
admin-listen = "127.0.0.1:0"
tcp-idle-timout = "10s"
max-udp-payload = "1232"

[zone]
apex = "inference.example.com"
[zone.soa]
primary = "ns1.example.net"
contact = "hostmaster.example.net"

[[zone.ns]]
name = "ns1.example.net"

[regions.us-east]
endpoints = [{ address = "192.0.2.1", port = 70000 }]

[regions.us-west]
endpoints = [{ address = "192.0.2.2" }]
probe = { interval = "fast", rise = 0 }

[regions.eu-west]
endpoints = [{ address = "192.0.2.3" }]
jurisdictions = "eu"

[services.chat]
tiers = [["us-west"]]
"#,
    ),
    (
        "policies/batch.toml",
        "tiers = [[us-west], [\"us-esat\"]]\n",
    ),
    (
        "policies/chat.toml",
        "# Chat, again.\ntiers = [[\"us-west\"]]\nstrategy = \"fastest\"\n",
    ),
];

/// What one `check` of [`TEN_MISTAKES`] reports, paths relative to its
/// directory: every mistake, in file order.
pub const TEN_MISTAKES_REPORT: [&str; 10] = [
    "inferdns.toml:6:1: unknown field `tcp-idle-timout`; did you mean `tcp-idle-timeout`?",
    "inferdns.toml:7:19: max-udp-payload: expected a whole number 0-65535, found the string \"1232\" (remove the quotes)",
    "inferdns.toml:19:46: port: expected a port number 1-65535, found 70000",
    "inferdns.toml:23:22: probe interval: expected a duration such as \"500ms\" or \"2s\", found \"fast\"",
    "inferdns.toml:23:37: rise 0 is out of range (1..=100)",
    "inferdns.toml:27:17: jurisdictions: expected a list of jurisdiction tags: [\"eu\"], found the string \"eu\"",
    "policies/batch.toml:1:11: a name must be quoted: \"us-west\"",
    "policies/batch.toml:1:22: service batch refers to unknown region \"us-esat\"; did you mean `us-east`?",
    "policies/chat.toml:1:1: service chat is defined twice, already defined at inferdns.toml:29:1",
    "policies/chat.toml:3:12: strategy \"fastest\" is not failover, proximity, capacity or cost",
];

/// Writes [`TEN_MISTAKES`]; returns the main file's path.
pub fn write_ten_mistakes(files: &Files) -> PathBuf {
    for (name, text) in TEN_MISTAKES {
        files.write(name, text);
    }
    files.dir.path().join("inferdns.toml")
}

/// `inferdns_probes_total` of `region` and `result` in a scrape, summed
/// over endpoints and probe layers (0 without a series).
pub fn probe_results(metrics: &str, region: &str, result: &str) -> f64 {
    let (region, result) = (
        format!("region=\"{region}\""),
        format!("result=\"{result}\""),
    );
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("inferdns_probes_total{"))
        .filter_map(|l| l.split_once("} "))
        .filter(|(labels, _)| labels.split(',').any(|kv| kv == region))
        .filter(|(labels, _)| labels.split(',').any(|kv| kv == result))
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

/// A real Knot DNS serving `zone` on loopback, stopped on drop.
pub struct Knot {
    child: std::process::Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Knot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Knot {
    /// Serves `zone` (zone-file text) as `domain`; `None` when `knotd` is
    /// not installed.
    pub async fn start(domain: &str, zone: &str) -> Option<Knot> {
        let knotd = ["/usr/sbin/knotd", "/usr/bin/knotd"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let soa = Ask::new(&format!("{domain}."), RecordType::SOA)
            .message()
            .to_vec()
            .unwrap();
        // The port is free when picked but not held: another test may take
        // it (UDP or TCP) before knotd binds, and knotd then exits. Such a
        // start is tried again on another port.
        let mut last = None;
        for _attempt in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let port = std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let path = dir.path().display().to_string();
            std::fs::write(dir.path().join("zone"), zone).unwrap();
            std::fs::write(
                dir.path().join("knot.conf"),
                format!(
                    "server:\n  rundir: \"{path}\"\n  listen: 127.0.0.1@{port}\n\
                     database:\n  storage: \"{path}\"\n\
                     zone:\n  - domain: {domain}\n    file: \"{path}/zone\"\n    storage: \"{path}\"\n    zonefile-load: whole\n    journal-content: none\n"
                ),
            )
            .unwrap();
            let child = std::process::Command::new(knotd)
                .arg("-c")
                .arg(dir.path().join("knot.conf"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .ok()?;
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let mut knot = Knot {
                child,
                addr,
                _dir: dir,
            };
            for _ in 0..100 {
                if client::exchange_udp(addr, &soa, std::time::Duration::from_millis(100))
                    .await
                    .is_ok()
                {
                    return Some(knot);
                }
                if knot.child.try_wait().ok().flatten().is_some() {
                    break; // exited: most likely the port was taken
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            last = Some(addr);
        }
        let addr = last.expect("at least one attempt");
        panic!("knotd did not start answering on {addr}");
    }
}
