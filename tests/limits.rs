//! Limits against strangers over real sockets: response rate limiting of
//! UDP answers, and the DNS-over-TCP connection caps.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::{FAST_PROBE, Server, base_config};
use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use inferdns::demo::client::{self, Ask, answer_strings, check_wire};
use inferdns::demo::{MODEL, SimRegion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const CHAT: &str = "chat.inference.example.com.";

/// A server whose `chat` is served by a live region at 127.0.0.41, with
/// `server_extra` in `[server]` and `rest` after it.
async fn server(server_extra: &str, rest: &str) -> (Server, SimRegion) {
    let region = SimRegion::start("127.0.0.41:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    let extra = format!(
        "[regions.live]\nendpoints = [{{ address = \"127.0.0.41\", port = {} }}]\n{FAST_PROBE}\n[services.chat]\ntiers = [[\"live\"]]\n{rest}",
        region.addr().port()
    );
    let main = base_config(&extra).replace(
        "startup-grace = \"3s\"",
        &format!("startup-grace = \"3s\"\n{server_extra}"),
    );
    let s = Server::start(&main).await;
    s.wait_answer(CHAT, &["127.0.0.41"], Duration::from_secs(3))
        .await;
    (s, region)
}

/// What a burst of `n` queries from `from` got back: (full answers,
/// truncated answers, no answer), and the seconds it took. Replies are read
/// while the queries go out, and the queries are paced a little, so that no
/// socket buffer on loopback overflows: every missing reply was dropped by
/// the server.
async fn burst(server: SocketAddr, from: &str, n: u16) -> (usize, usize, usize, f64) {
    let socket = std::sync::Arc::new(UdpSocket::bind(format!("{from}:0")).await.unwrap());
    socket.connect(server).await.unwrap();
    let start = std::time::Instant::now();
    let receiver = {
        let socket = socket.clone();
        tokio::spawn(async move {
            let mut seen: HashMap<u16, bool> = HashMap::new();
            let mut buf = vec![0u8; 4096];
            // Until the server has been silent for 500 ms.
            while let Ok(Ok(len)) =
                tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buf)).await
            {
                check_wire(&buf[..len]).unwrap();
                let m = Message::from_vec(&buf[..len]).unwrap();
                if m.metadata.truncation {
                    assert!(m.answers.is_empty(), "a slipped reply has no records");
                } else {
                    assert_eq!(answer_strings(&m), ["127.0.0.41"]);
                }
                seen.insert(m.metadata.id, m.metadata.truncation);
            }
            seen
        })
    };
    for id in 0..n {
        let mut m = Ask::new(CHAT, RecordType::A).message();
        m.metadata.id = id;
        socket.send(&m.to_vec().unwrap()).await.unwrap();
        if id % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let seen = receiver.await.unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    let full = seen.values().filter(|tc| !**tc).count();
    let truncated = seen.values().filter(|tc| **tc).count();
    (full, truncated, usize::from(n) - seen.len(), elapsed)
}

/// `inferdns_rrl_limited_total{action}` from the admin API.
async fn limited(s: &Server, action: &str) -> f64 {
    let (_, metrics) = common::http_get(&format!("http://{}/metrics", s.running.admin)).await;
    let line = format!("inferdns_rrl_limited_total{{action=\"{action}\"}}");
    metrics
        .lines()
        .find(|l| l.starts_with(&line))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line} not in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_prefix_is_cut_to_the_rate_while_another_is_answered() {
    // Loopback is exempt by default; here it is not.
    let (s, _r) = server(
        "",
        "[rrl]\nrate = 20\nwindow = \"1s\"\nslip = 2\nexempt = []\n",
    )
    .await;
    let (full, truncated, lost, secs) = burst(s.dns(), "127.0.0.1", 600).await;
    // The bucket holds 20 (rate x window) and refills 20 per second.
    let most = 20.0 + 20.0 * secs + 1.0;
    assert!(full >= 20, "the burst is answered: {full}");
    assert!(
        (full as f64) <= most,
        "{full} full answers in {secs:.2} s, at most {most:.0}"
    );
    // Every second limited response slips (TC=1), the others are dropped.
    let limited_n = 600 - full;
    assert!(
        truncated.abs_diff(limited_n / 2) <= 1,
        "{truncated} slipped of {limited_n}"
    );
    assert_eq!(truncated + lost, limited_n);
    assert_eq!(limited(&s, "slipped").await, truncated as f64);
    assert_eq!(limited(&s, "dropped").await, lost as f64);
    // Another /24 asking the same name at the same time has its own bucket.
    let (full, truncated, lost, _) = burst(s.dns(), "127.0.1.1", 20).await;
    assert_eq!((full, truncated, lost), (20, 0, 0));
    // TCP is never limited (its source cannot be spoofed).
    for _ in 0..30 {
        let m = s.tcp(CHAT, RecordType::A).await;
        assert_eq!(answer_strings(&m), ["127.0.0.41"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_is_exempt_by_default() {
    let (s, _r) = server("", "").await;
    let (full, truncated, lost, _) = burst(s.dns(), "127.0.0.1", 500).await;
    assert_eq!((full, truncated, lost), (500, 0, 0));
}

/// The `status` and `since` of every endpoint, from `/v1/status`.
async fn endpoint_states(s: &Server) -> Vec<(String, String)> {
    let (_, body) = common::http_get(&format!("http://{}/v1/status", s.running.admin)).await;
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    status["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["status"].to_string(), e["since_unix_s"].to_string()))
        .collect()
}

#[tokio::test]
async fn idle_and_slow_tcp_clients_from_one_address_cannot_starve_the_others() {
    // The test process holds both ends of every connection.
    rlimit::increase_nofile_limit(u64::MAX).unwrap();
    let (s, _r) = server(
        "tcp-idle-timeout = \"2s\"\ntcp-max-connections = 200\ntcp-max-per-address = 16",
        "",
    )
    .await;
    let before = endpoint_states(&s).await;
    // 2,000 idle connections from 127.0.0.1: 16 are kept, the rest closed at once.
    let mut idle = Vec::new();
    for _ in 0..2000 {
        if let Ok(stream) = TcpStream::connect(s.dns()).await {
            idle.push(stream);
        }
    }
    // A client from 127.0.0.1 that sends one byte a second.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let drip = socket.connect(s.dns()).await;
    // Another address is answered over UDP and TCP all the while.
    for i in 0..20 {
        let m = client::query_udp(s.dns(), &Ask::new(CHAT, RecordType::A))
            .await
            .unwrap();
        assert_eq!(answer_strings(&m), ["127.0.0.41"], "UDP {i}");
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut stream = socket.connect(s.dns()).await.unwrap();
        let query = Ask::new(CHAT, RecordType::A).message().to_vec().unwrap();
        stream
            .write_all(&(query.len() as u16).to_be_bytes())
            .await
            .unwrap();
        stream.write_all(&query).await.unwrap();
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.unwrap();
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut reply).await.unwrap();
        let m = client::decode(&reply).unwrap();
        assert_eq!(answer_strings(&m), ["127.0.0.41"], "TCP {i}");
    }
    // Of the 2,000, all but 16 were closed by the server.
    let mut open = 0;
    for stream in &mut idle {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(50), stream.read(&mut byte)).await {
            Err(_) => open += 1,         // still open, nothing to read
            Ok(Ok(0)) | Ok(Err(_)) => {} // closed
            Ok(Ok(n)) => panic!("{n} bytes from an idle connection"),
        }
    }
    assert!(open <= 16, "{open} idle connections from one address kept");
    // The dripping client is closed once a whole query takes longer than the
    // idle timeout (bounded wait: it must be closed within 10 s).
    if let Ok(mut drip) = drip {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut closed = false;
        while tokio::time::Instant::now() < deadline {
            if drip.write_all(&[0]).await.is_err() {
                closed = true;
                break;
            }
            let mut byte = [0u8; 1];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_secs(1), drip.read(&mut byte)).await
            {
                closed = true;
                break;
            }
        }
        assert!(closed, "a client sending a byte a second is closed");
    }
    // No endpoint changed state.
    assert_eq!(endpoint_states(&s).await, before);
    drop(idle);
}
