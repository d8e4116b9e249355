//! Black-box tests of the built binary: `check`, `run` (startup line,
//! serving, SIGTERM), and `demo --json`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Files, TEN_MISTAKES_REPORT, ZONE, base_config, write_ten_mistakes};
use hickory_proto::rr::RecordType;
use inferdns::demo::client::{self, Ask, answer_strings};
use inferdns::demo::{MODEL, SimRegion};

const BIN: &str = env!("CARGO_BIN_EXE_inferdns");

/// `inferdns check --config path`.
fn run_check(path: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap()
}

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
    let out = run_check(&path);
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

#[test]
fn check_reports_ten_mistakes_in_three_files_in_one_run() {
    let files = Files::new();
    let path = write_ten_mistakes(&files);
    let out = run_check(&path);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let dir = format!("{}/", files.dir.path().display());
    let lines: Vec<String> = stderr.lines().map(|l| l.replace(&dir, "")).collect();
    assert_eq!(lines, TEN_MISTAKES_REPORT, "{stderr}");
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
            "rollout",
            "fault",
            "rollback",
            "promoted",
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
    // The sheddable name leaves us-east (at 85 %) while the critical one
    // still has its share at 70 %.
    let class = |key: &str| -> Vec<f64> {
        events
            .iter()
            .filter(|e| e["event"] == "capacity")
            .map(|e| e[key].as_f64().unwrap())
            .collect()
    };
    let (vip, bulk) = (class("critical_share"), class("sheddable_share"));
    assert!(vip[1] > 0.3 && bulk[1] < vip[1], "{vip:?} {bulk:?}");
    assert_eq!(bulk[2], 0.0, "{bulk:?}");
    let summary = events.last().unwrap();
    // The canary took about its 5 % (2,000 subnets), was rolled back, promoted.
    let share = summary["canary_share"].as_f64().unwrap();
    assert!(share > 0.02 && share < 0.08, "{share}");
    assert!(summary["canary_rollback_s"].as_f64().unwrap() > 0.0);
    assert_eq!(summary["promoted_share"].as_f64(), Some(1.0));
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
        if matches!(e["event"].as_str(), Some(k) if k.ends_with("failover") || k.ends_with("failback") || k == "initial answer")
        {
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

#[test]
fn check_refuses_an_exposed_admin_api_without_a_token() {
    let files = Files::new();
    files.write("zone.db", ZONE);
    let exposed = base_config("").replace(
        "admin-listen = \"127.0.0.1:0\"",
        "admin-listen = \"0.0.0.0:9053\"",
    );
    let check = |text: &str| {
        let path = files.write("inferdns.toml", text);
        let out = run_check(&path);
        (path, out)
    };
    let (path, out) = check(&exposed);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Line 3, at the value.
    let expected = format!(
        "{}:3:16: admin-listen 0.0.0.0:9053 is not a loopback address: set admin-token-file",
        path.display()
    );
    assert!(stderr.starts_with(&expected), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    // With a token it may listen anywhere.
    files.write("admin.token", "t0ken\n");
    let with_token = exposed.replace(
        "[server]\n",
        "[server]\nadmin-token-file = \"admin.token\"\n",
    );
    let (_, out) = check(&with_token);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Reads behind a token that does not exist: refused.
    let reads = base_config("").replace("[server]\n", "[server]\nadmin-token-for-reads = true\n");
    let (path, out) = check(&reads);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "{}:2:25: admin-token-for-reads needs admin-token-file",
            path.display()
        )),
        "{stderr}"
    );

    // `run --admin-listen` cannot get round the check.
    let (path, _) = check(&base_config(""));
    let out = Command::new(BIN)
        .args(["run", "--admin-listen", "0.0.0.0:0", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not loopback"), "{stderr}");
}

/// Every output of a run: the daemon's stdout and stderr (at trace level),
/// every read route, error bodies, refused reloads, `check` and `explain`.
/// Neither the admin token nor a probe API key shows anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_any_output_of_a_run() {
    const ADMIN_SECRET: &str = "adm1n-T0KEN-7f3e9c41";
    const PROBE_SECRET: &str = "pr0be-KEY-a81d42b7";
    let region = SimRegion::start("127.0.0.43:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    let files = Files::new();
    files.write("zone.db", ZONE);
    files.write("admin.token", &format!("{ADMIN_SECRET}\n"));
    files.write("probe.key", &format!("{PROBE_SECRET}\n"));
    let probe = r#"probe = { path = "/health", interval = "100ms", timeout = "200ms", models-path = "/v1/models", api-key-file = "probe.key" }"#;
    let config = |key_file: &str| {
        base_config(&format!(
            "[regions.r]\nendpoints = [{{ address = \"127.0.0.43\", port = {} }}]\n{}\n\
             [regions.dead]\nendpoints = [{{ address = \"127.0.0.44\", port = 1 }}]\n{}\n\
             [services.chat]\nmodel = \"{MODEL}\"\ntiers = [[\"r\"], [\"dead\"]]\n",
            region.addr().port(),
            probe.replace("probe.key", key_file),
            probe.replace("probe.key", key_file),
        ))
        .replace(
            "[server]\n",
            "[server]\nadmin-token-file = \"admin.token\"\n",
        )
    };
    let path = files.write("inferdns.toml", &config("probe.key"));
    let mut outputs: Vec<(String, String)> = Vec::new();

    let out = run_check(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    outputs.push((
        "check stdout".into(),
        String::from_utf8_lossy(&out.stdout).into(),
    ));
    outputs.push((
        "check stderr".into(),
        String::from_utf8_lossy(&out.stderr).into(),
    ));

    let stdout_path = files.dir.path().join("stdout");
    let stderr_path = files.dir.path().join("stderr");
    let child = Command::new(BIN)
        .args([
            "run",
            "--dns-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&path)
        .env("RUST_LOG", "trace")
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let mut daemon = Daemon(child);
    let mut admin = None;
    for _ in 0..300 {
        let text = std::fs::read_to_string(&stdout_path).unwrap_or_default();
        if let Some(a) = text
            .lines()
            .find_map(|l| l.strip_prefix("inferdns listening "))
            .and_then(|rest| rest.split(' ').find_map(|f| f.strip_prefix("admin=")))
        {
            admin = Some(a.parse::<SocketAddr>().unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let admin = admin.expect("the daemon printed its listening line");
    let url = |p: &str| format!("http://{admin}{p}");

    // Every read route, with and without the token; every kind of error.
    let requests: [(&str, &str, Option<&str>, Option<&str>); 14] = [
        ("GET", "/metrics", None, None),
        ("GET", "/metrics", Some(ADMIN_SECRET), None),
        ("GET", "/v1/status", None, None),
        (
            "GET",
            "/v1/explain?name=chat.inference.example.com&client=192.0.2.1",
            None,
            None,
        ),
        (
            "GET",
            "/v1/explain?name=nothing.inference.example.com",
            None,
            None,
        ),
        ("GET", "/v1/log-level", None, None),
        ("POST", "/v1/reload", None, None),
        ("POST", "/v1/reload", Some("adm1n-T0KEN-7f3e9c42"), None),
        ("POST", "/v1/regions/mars/drain", Some(ADMIN_SECRET), None),
        (
            "POST",
            "/v1/regions/r/capacity",
            Some(ADMIN_SECRET),
            Some("{not json"),
        ),
        ("POST", "/v1/log-level", Some(ADMIN_SECRET), Some("trace")),
        ("GET", "/v1/reload", Some(ADMIN_SECRET), None),
        ("GET", "/nowhere", Some(ADMIN_SECRET), None),
        (
            "POST",
            "/v1/log-level",
            Some(ADMIN_SECRET),
            Some("nonsense=level"),
        ),
    ];
    for (method, p, token, body) in requests {
        let (code, text) = common::http(method, &url(p), token, body.map(String::from)).await;
        outputs.push((format!("{method} {p} -> {code}"), text));
    }
    // The probe with the key ran: the region is up.
    let (_, status) = common::http("GET", &url("/v1/status"), None, None).await;
    assert!(status.contains("127.0.0.43"), "{status}");
    // Refused reloads name the files, not what is in them.
    std::fs::write(&path, config("missing.key")).unwrap();
    files.write("empty.token", " \n");
    let (code, text) = common::http("POST", &url("/v1/reload"), Some(ADMIN_SECRET), None).await;
    assert_eq!(code, 422, "{text}");
    outputs.push(("reload with a missing key file".into(), text));
    std::fs::write(
        &path,
        config("probe.key").replace("admin.token", "empty.token"),
    )
    .unwrap();
    let (code, text) = common::http("POST", &url("/v1/reload"), Some(ADMIN_SECRET), None).await;
    assert_eq!(code, 422, "{text}");
    outputs.push(("reload with an empty token file".into(), text));
    std::fs::write(&path, config("probe.key")).unwrap();
    let (code, text) = common::http("POST", &url("/v1/reload"), Some(ADMIN_SECRET), None).await;
    assert_eq!(code, 200, "{text}");
    let out = Command::new(BIN)
        .args(["explain", "--name", "chat.inference.example.com", "--admin"])
        .arg(admin.to_string())
        .output()
        .unwrap();
    outputs.push((
        "explain stdout".into(),
        String::from_utf8_lossy(&out.stdout).into(),
    ));
    outputs.push((
        "explain stderr".into(),
        String::from_utf8_lossy(&out.stderr).into(),
    ));
    let (_, metrics) = common::http("GET", &url("/metrics"), None, None).await;
    outputs.push(("metrics at the end".into(), metrics));

    let pid = daemon.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let daemon_exit = tokio::task::spawn_blocking(move || {
        for _ in 0..200 {
            if daemon.0.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    });
    assert!(daemon_exit.await.unwrap(), "exits within 10 s of SIGTERM");
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    // Trace level: the probes, the reloads and the requests were all logged.
    assert!(stderr.lines().count() > 20, "{stderr}");
    outputs.push((
        "daemon stdout".into(),
        std::fs::read_to_string(&stdout_path).unwrap(),
    ));
    outputs.push(("daemon stderr".into(), stderr));

    for (what, text) in &outputs {
        for secret in [ADMIN_SECRET, PROBE_SECRET] {
            assert!(!text.contains(secret), "{what} shows a secret:\n{text}");
        }
    }
}

/// Starts `inferdns run --config path` with stderr to `stderr_path`, and,
/// when `journal`, `JOURNAL_STREAM` naming that file (as systemd does when
/// it connects stderr to journald). Returns once the stderr file holds the
/// endpoint-down line (the endpoint at 127.0.0.46:1 refuses).
async fn run_logging_to(
    path: &std::path::Path,
    stderr_path: &std::path::Path,
    journal: bool,
) -> (Daemon, String) {
    use std::os::unix::fs::MetadataExt;
    let stderr = std::fs::File::create(stderr_path).unwrap();
    let meta = stderr.metadata().unwrap();
    let mut command = Command::new(BIN);
    command
        .args(["run", "--config"])
        .arg(path)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(stderr);
    if journal {
        command.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    } else {
        command.env_remove("JOURNAL_STREAM");
    }
    let daemon = Daemon(command.spawn().unwrap());
    let mut text = String::new();
    for _ in 0..300 {
        text = std::fs::read_to_string(stderr_path).unwrap_or_default();
        if text.contains("Endpoint is down.") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(text.contains("Endpoint is down."), "{text}");
    (daemon, text)
}

fn dead_endpoint_config(files: &Files) -> std::path::PathBuf {
    files.write("zone.db", ZONE);
    files.write(
        "inferdns.toml",
        &base_config(&format!(
            "[regions.dead]\nendpoints = [{{ address = \"127.0.0.46\", port = 1 }}]\n{}\n\
             [services.chat]\ntiers = [[\"dead\"]]\n",
            common::FAST_PROBE
        )),
    )
}

/// Does `line` carry a timestamp (`2025-01-31T12:00:00…`)?
fn has_timestamp(line: &str) -> bool {
    line.as_bytes().windows(11).any(|w| {
        w[..4].iter().all(u8::is_ascii_digit)
            && w[4] == b'-'
            && w[5..7].iter().all(u8::is_ascii_digit)
            && w[7] == b'-'
            && w[8..10].iter().all(u8::is_ascii_digit)
            && w[10] == b'T'
    })
}

/// With stderr connected to the journal: every line starts with its syslog
/// priority, the endpoint-down line is `<4>` (what `journalctl -p warning`
/// shows), startup is `<6>` with the version, no colour, no timestamp.
#[tokio::test]
async fn journal_lines_carry_syslog_priorities_and_no_colour_or_time() {
    let files = Files::new();
    let path = dead_endpoint_config(&files);
    let stderr_path = files.dir.path().join("stderr");
    let (_daemon, text) = run_logging_to(&path, &stderr_path, true).await;
    assert!(
        !text.contains("\x1b["),
        "ANSI escape in journal lines:\n{text}"
    );
    let lines: Vec<&str> = text.lines().collect();
    for line in &lines {
        let priority = line
            .strip_prefix('<')
            .and_then(|rest| rest.split_once('>'))
            .map(|(n, _)| n);
        assert!(
            matches!(priority, Some("3" | "4" | "6" | "7")),
            "no priority prefix: {line:?}"
        );
        assert!(!has_timestamp(line), "timestamp in {line:?}");
    }
    assert!(
        lines.iter().any(|l| l.starts_with("<4>")
            && l.contains("Endpoint is down.")
            && l.contains("region=dead")),
        "{text}"
    );
    let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
    assert!(
        lines.iter().any(|l| l.starts_with("<6>")
            && l.contains("Starting inferdns.")
            && l.contains(&version)
            && l.contains("inferdns.toml")),
        "{text}"
    );
}

/// stderr redirected to a file (no journal, no terminal): timestamps stay,
/// colours never appear.
#[tokio::test]
async fn a_log_file_gets_no_colour() {
    let files = Files::new();
    let path = dead_endpoint_config(&files);
    let stderr_path = files.dir.path().join("stderr");
    let (_daemon, text) = run_logging_to(&path, &stderr_path, false).await;
    assert!(!text.contains("\x1b["), "ANSI escape in a file:\n{text}");
    let down = text
        .lines()
        .find(|l| l.contains("Endpoint is down."))
        .unwrap();
    assert!(has_timestamp(down) && !down.starts_with('<'), "{down:?}");
    assert!(down.contains("WARN"), "{down:?}");
}

/// Datagrams to `socket` until `done` says stop (or 60 s without one).
fn notifications_until(
    socket: &std::os::unix::net::UnixDatagram,
    seen: &mut Vec<String>,
    done: impl Fn(&[String]) -> bool,
) {
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while !done(seen) {
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification ({e}); seen {seen:?}"));
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
}

/// `Type=notify`: READY=1 once DNS answers (a query sent right after it is
/// answered), STATUS= with the generation, RELOADING=1 with MONOTONIC_USEC
/// and READY=1 around a SIGHUP reload, STOPPING=1 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_only_when_dns_answers_and_around_a_reload() {
    let region = SimRegion::start("127.0.0.45:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    let files = Files::new();
    files.write("zone.db", ZONE);
    let path = files.write(
        "inferdns.toml",
        &base_config(&format!(
            "[regions.r]\nendpoints = [{{ address = \"127.0.0.45\", port = {} }}]\n[services.chat]\ntiers = [[\"r\"]]\n",
            region.addr().port()
        )),
    );
    let socket_path = files.dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .env("NOTIFY_SOCKET", &socket_path)
        .env_remove("WATCHDOG_USEC")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let daemon = Daemon(child);

    let (socket, mut seen) = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        notifications_until(&socket, &mut seen, |s| !s.is_empty());
        (socket, seen)
    })
    .await
    .unwrap();
    assert_eq!(seen[0], "READY=1", "the first notification: {seen:?}");
    // READY=1 came after the listening line: the DNS port is known and answers now.
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let dns: SocketAddr = line
        .split(' ')
        .find_map(|f| f.strip_prefix("dns="))
        .unwrap_or_else(|| panic!("{line:?}"))
        .parse()
        .unwrap();
    let ask = Ask::new("chat.inference.example.com.", RecordType::A);
    let m = client::query_udp(dns, &ask).await.unwrap();
    assert_eq!(answer_strings(&m), ["127.0.0.45"]);

    let pid = daemon.0.id().to_string();
    let signal = |name: &str| {
        assert!(
            Command::new("kill")
                .args([name, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-HUP");
    let (socket, mut seen) = tokio::task::spawn_blocking(move || {
        notifications_until(&socket, &mut seen, |s| {
            s.iter()
                .skip_while(|m| !m.starts_with("RELOADING=1"))
                .any(|m| m == "READY=1")
        });
        (socket, seen)
    })
    .await
    .unwrap();
    let reloading = seen.iter().find(|m| m.starts_with("RELOADING=1")).unwrap();
    let usec = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("{reloading:?}"));
    assert!(usec.parse::<u64>().is_ok_and(|u| u > 0), "{reloading:?}");
    assert!(
        seen.iter().any(|m| m
            .starts_with("STATUS=serving inference.example.com, snapshot generation ")
            && m.ends_with(", 1 services")),
        "{seen:?}"
    );

    signal("-TERM");
    let seen = tokio::task::spawn_blocking(move || {
        notifications_until(&socket, &mut seen, |s| s.iter().any(|m| m == "STOPPING=1"));
        seen
    })
    .await
    .unwrap();
    assert!(seen.iter().all(|m| !m.contains("WATCHDOG")), "{seen:?}");
}

/// A SIGHUP while the daemon starts (or the moment systemd hears READY=1
/// and runs `systemctl reload`) reloads once it serves; it must not end the
/// process, which is SIGHUP's default action when no handler is in place.
/// The start is held in its startup grace by a hung endpoint (first probe
/// result after 5 s, grace 3 s), and the SIGHUP lands inside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_during_startup_reloads_once_serving_rather_than_kills() {
    let region = SimRegion::start("127.0.0.45:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    region.set_fault(inferdns::demo::Fault::Hung);
    let files = Files::new();
    files.write("zone.db", ZONE);
    let path = files.write(
        "inferdns.toml",
        &base_config(&format!(
            "[regions.r]\nendpoints = [{{ address = \"127.0.0.45\", port = {} }}]\nprobe = {{ timeout = \"5s\", interval = \"10s\" }}\n[services.chat]\ntiers = [[\"r\"]]\n",
            region.addr().port()
        )),
    );
    let socket_path = files.dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    let stderr_path = files.dir.path().join("stderr");
    let child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .env("NOTIFY_SOCKET", &socket_path)
        .env_remove("WATCHDOG_USEC")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let mut daemon = Daemon(child);
    for _ in 0..200 {
        let text = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        if text.contains("Starting inferdns.") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Inside the 3 s grace: the config is loaded, the probe still hangs.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let pid = daemon.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let seen = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        notifications_until(&socket, &mut seen, |s| {
            s.iter()
                .skip_while(|m| !m.starts_with("RELOADING=1"))
                .any(|m| m == "READY=1")
        });
        seen
    })
    .await
    .unwrap();
    assert_eq!(seen[0], "READY=1", "{seen:?}");
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "the daemon died of the SIGHUP; heard {seen:?}"
    );
}

/// Runs the binary with `args`; (exit code, stdout, stderr).
fn run_bin(args: &[&std::ffi::OsStr]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[tokio::test]
async fn status_and_explain_find_the_daemon_and_its_token_in_the_config() {
    let region = SimRegion::start("127.0.0.45:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    let files = Files::new();
    files.write("zone.db", ZONE);
    files.write("admin.token", "st4tus-token\n");
    // A free loopback port for the admin API, named in the config file.
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let main = base_config(&format!(
        "[regions.r]\nendpoints = [{{ address = \"127.0.0.45\", port = {} }}]\n{}\n\
         [regions.dead]\nendpoints = [{{ address = \"127.0.0.46\", port = 1 }}]\n{}\n\
         [services.chat]\ntiers = [[\"r\"], [\"dead\"]]\n\
         [services.lost]\ntiers = [[\"dead\"]]\nwhen-all-down = \"servfail\"\n",
        region.addr().port(),
        common::FAST_PROBE,
        common::FAST_PROBE,
    ))
    .replace(
        "admin-listen = \"127.0.0.1:0\"",
        &format!(
            "admin-listen = \"127.0.0.1:{admin_port}\"\nadmin-token-file = \"admin.token\"\nadmin-token-for-reads = true"
        ),
    );
    let path = files.write("inferdns.toml", &main);
    let (_daemon, _dns, admin) = start_daemon(&["--config".as_ref(), path.as_os_str()]).await;
    assert_eq!(admin.port(), admin_port);

    // The address and the token come from the config file.
    let status = |path: &std::path::Path| {
        run_bin(&["status".as_ref(), "--config".as_ref(), path.as_os_str()])
    };
    let mut seen = (None, String::new(), String::new());
    for _ in 0..200 {
        seen = status(&path);
        if seen.1.contains("servfail") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, out, err) = seen;
    assert_eq!(code, Some(0), "{err}");
    let rows: Vec<String> = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let has = |prefix: &str| rows.iter().any(|r| r.starts_with(prefix));
    for prefix in [
        "REGION UP DRAINED",
        "r 1/1 no",
        "dead 0/1 no",
        "REGION ENDPOINT STATE LAYERS",
        "r 127.0.0.45 up alive up",
        "dead 127.0.0.46 down alive down",
        "chat chat.inference.example.com. everyone tier 0 r 100%",
        "lost lost.inference.example.com. everyone servfail -",
    ] {
        assert!(has(prefix), "no row {prefix:?} in:\n{out}");
    }
    assert!(!out.contains("st4tus-token") && !err.contains("st4tus-token"));

    // The token is needed: the address alone gets a 401, said plainly.
    let (code, _, err) = run_bin(&[
        "status".as_ref(),
        "--admin".as_ref(),
        admin.to_string().as_ref(),
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("status: 401"), "{err}");

    // explain by service id, as a positional, and by name with --name.
    for args in [
        vec!["explain", "chat"],
        vec!["explain", "--name", "chat.inference.example.com."],
    ] {
        let mut args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        args.extend(["--config".as_ref(), path.as_os_str()]);
        let (code, out, err) = run_bin(&args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert!(
            out.contains("decision: tier 0 -> 127.0.0.45"),
            "{args:?}: {out}"
        );
    }
    let (code, _, err) = run_bin(&[
        "explain".as_ref(),
        "nothing".as_ref(),
        "--config".as_ref(),
        path.as_os_str(),
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("is not a service name"), "{err}");
}
