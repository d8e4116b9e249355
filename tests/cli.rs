//! Black-box tests of the built binary: `check`, `run` (startup line,
//! serving, SIGTERM), and `demo --json`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Files, ZONE, base_config};
use hickory_proto::rr::RecordType;
use inferdns::demo::client::{self, Ask, answer_strings};
use inferdns::demo::{MODEL, SimRegion};

const BIN: &str = env!("CARGO_BIN_EXE_inferdns");

/// Kills the child on drop so a failed test leaves nothing running.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `inferdns run` with `args`, and reads its startup line:
/// `inferdns listening dns=ADDR admin=ADDR`.
async fn start_daemon(args: &[&std::ffi::OsStr]) -> (Daemon, SocketAddr, SocketAddr) {
    let mut child = Command::new(BIN)
        .arg("run")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let daemon = Daemon(child);
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let rest = line
        .trim()
        .strip_prefix("inferdns listening ")
        .unwrap_or_else(|| panic!("{line:?}"));
    let field = |key: &str| -> SocketAddr {
        rest.split(' ')
            .find_map(|f| f.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
            .parse()
            .unwrap()
    };
    (daemon, field("dns="), field("admin="))
}

#[test]
fn check_accepts_the_example_and_rejects_with_positions() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/inferdns.toml");
    let out = Command::new(BIN)
        .args(["check", "--config", example])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok ("));

    let files = Files::new();
    files.write("zone.db", ZONE);
    let bad = base_config("[services.chat]\ntiers = [[\"nowhere\"]]\nttl = 0\n");
    let path = files.write("inferdns.toml", &bad);
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    let prefix = format!("{}:", path.display());
    assert!(lines.iter().all(|l| l.starts_with(&prefix)), "{stderr}");
    assert!(stderr.contains("unknown region \"nowhere\""), "{stderr}");
    assert!(stderr.contains("ttl 0 is out of range"), "{stderr}");

    let out = Command::new(BIN)
        .args(["check", "--config", "/nonexistent/inferdns.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .starts_with("/nonexistent/inferdns.toml:1:1: cannot read")
    );
}

#[tokio::test]
async fn run_prints_its_addresses_serves_and_stops_on_sigterm() {
    let region = SimRegion::start("127.0.0.41:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    let files = Files::new();
    files.write("zone.db", ZONE);
    let main = base_config(&format!(
        "[regions.r]\nendpoints = [{{ address = \"127.0.0.41\", port = {} }}]\n[services.chat]\ntiers = [[\"r\"]]\n",
        region.addr().port()
    ))
    // The flags must win over the file.
    .replace("127.0.0.1:0", "127.0.0.1:1");
    let path = files.write("inferdns.toml", &main);
    let (daemon, dns, admin) = start_daemon(&[
        "--config".as_ref(),
        path.as_os_str(),
        "--dns-listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--admin-listen".as_ref(),
        "127.0.0.1:0".as_ref(),
    ])
    .await;
    assert_ne!(dns.port(), 0);

    let ask = Ask::new("chat.inference.example.com.", RecordType::A);
    let m = client::query_udp(dns, &ask).await.unwrap();
    assert_eq!(answer_strings(&m), ["127.0.0.41"]);
    let m = client::query_tcp(dns, &ask).await.unwrap();
    assert_eq!(answer_strings(&m), ["127.0.0.41"]);
    assert_eq!(
        common::http_get(&format!("http://{admin}/readyz")).await.0,
        200
    );

    let pid = daemon.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut daemon = daemon;
    let status = tokio::task::spawn_blocking(move || {
        for _ in 0..100 {
            if let Some(status) = daemon.0.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    })
    .await
    .unwrap()
    .expect("exits within 5 s of SIGTERM");
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    assert!(
        client::query_udp(
            dns,
            &Ask {
                timeout: Duration::from_millis(300),
                ..ask
            }
        )
        .await
        .is_err()
    );
}

#[test]
fn run_with_a_bad_config_exits_1_and_names_the_problem() {
    let files = Files::new();
    files.write("zone.db", ZONE);
    let path = files.write(
        "inferdns.toml",
        &base_config("[services.chat]\ntiers = [[\"x\"]]\n"),
    );
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown region \"x\""));
}

#[test]
fn demo_json_reports_measured_failover_times() {
    let out = Command::new(BIN)
        .args(["demo", "--json", "--dns-listen", "127.0.0.1:0"])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "started",
            "initial answer",
            "fault",
            "failover",
            "fault",
            "failback",
            "fault",
            "hung_failover",
            "fault",
            "hung_failback",
            "fault",
            "model_failover",
            "fault",
            "model_failback",
            "geo",
            "geo",
            "capacity",
            "capacity",
            "capacity",
            "capacity",
            "capacity",
            "summary"
        ]
    );
    // The EU client subnet gets the EU region, the US one us-east, each with the GeoIP network's scope.
    let geo: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "geo").collect();
    assert_eq!(
        (geo[0]["answer"][0].as_str(), geo[0]["scope"].as_u64()),
        (Some("127.0.0.13"), Some(24))
    );
    assert_eq!(
        (geo[1]["answer"][0].as_str(), geo[1]["scope"].as_u64()),
        (Some("127.0.0.11"), Some(24))
    );
    // As us-east fills up, its share of fleet's answers falls, and it is
    // out before it saturates.
    let shares: Vec<f64> = events
        .iter()
        .filter(|e| e["event"] == "capacity")
        .map(|e| e["us_east_share"].as_f64().unwrap())
        .collect();
    assert!(shares[0] > 0.3 && shares[0] < 0.7, "{shares:?}");
    assert!(shares[2] < shares[0] && shares[3] < shares[2], "{shares:?}");
    assert_eq!(shares[4], 0.0, "{shares:?}");
    let summary = events.last().unwrap();
    for key in [
        "failover_s",
        "failback_s",
        "hung_failover_s",
        "model_failover_s",
    ] {
        let v = summary[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} is not a number"));
        assert!(v > 0.0 && v < 20.0, "{key} = {v}");
    }
    // The EU client subnet gets the EU region, the US one us-east, each with the GeoIP network's scope.
    let geo: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "geo").collect();
    assert_eq!(
        (geo[0]["answer"][0].as_str(), geo[0]["scope"].as_u64()),
        (Some("127.0.0.13"), Some(24))
    );
    assert_eq!(
        (geo[1]["answer"][0].as_str(), geo[1]["scope"].as_u64()),
        (Some("127.0.0.11"), Some(24))
    );
    for e in &events[1..events.len() - 1] {
        if e["event"] != "fault" && e["event"] != "geo" && e["event"] != "capacity" {
            assert_eq!(e["empty_or_failed"], 0, "{e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_explain_asks_the_daemon() {
    let region = SimRegion::start("127.0.0.42:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    let files = Files::new();
    let zone = files.write("zone.db", ZONE);
    let main = base_config(&format!(
        "[regions.r]\nendpoints = [{{ address = \"127.0.0.42\", port = {} }}]\n[services.chat]\ntiers = [[\"r\"]]\n",
        region.addr().port()
    ));
    let path = files.write("inferdns.toml", &main);
    let (daemon, dns, admin) = start_daemon(&["--config".as_ref(), path.as_os_str()]).await;
    let admin = admin.to_string();

    // A new zone-file record appears after SIGHUP.
    let ask = Ask::new("new.inference.example.com.", RecordType::A);
    assert!(answer_strings(&client::query_udp(dns, &ask).await.unwrap()).is_empty());
    std::fs::write(&zone, format!("{ZONE}new IN A 192.0.2.99\n")).unwrap();
    let pid = daemon.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut seen = Vec::new();
    for _ in 0..100 {
        seen = answer_strings(&client::query_udp(dns, &ask).await.unwrap());
        if !seen.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, ["192.0.2.99"], "SIGHUP reloaded the zone file");

    let out = Command::new(BIN)
        .args([
            "explain",
            "--name",
            "chat.inference.example.com",
            "--client",
            "192.0.2.1",
            "--admin",
            &admin,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("client 192.0.2.1 from the resolver address"),
        "{text}"
    );
    assert!(text.contains("decision: tier 0 -> 127.0.0.42"), "{text}");
    let out = Command::new(BIN)
        .args([
            "explain",
            "--name",
            "nothing.inference.example.com",
            "--admin",
            &admin,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a service name"));
}
