//! The admin API against clients that hold it: slowloris heads, slow
//! bodies, idle connections beyond the cap, oversize heads, wrong tokens,
//! and the option that puts the read routes behind the token. Real sockets
//! on loopback; every wait is bounded, nothing asserts how fast.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Server, base_config, http};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

const TOKEN: &str = "s3cret-token";
/// Longest any test waits for something that must happen.
const BOUND: Duration = Duration::from_secs(30);

/// A server with the admin token and these extra `[server]` keys.
async fn server(server_extra: &str) -> Server {
    let main = base_config("").replace(
        "startup-grace = \"3s\"",
        &format!("startup-grace = \"3s\"\n{server_extra}"),
    );
    Server::start_with_token(&main, TOKEN).await
}

fn url(s: &Server, path: &str) -> String {
    format!("http://{}{path}", s.running.admin)
}

/// Reads until the server closes the connection (EOF or reset) and
/// returns what it sent, or `None` if it is still open after `BOUND`.
async fn until_closed(stream: &mut TcpStream) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + BOUND;
    loop {
        match timeout(deadline - Instant::now(), stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// One raw HTTP/1.1 exchange (`Connection: close`): the status line's code.
async fn raw_status(admin: SocketAddr, head: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(admin).await.ok()?;
    stream.write_all(head.as_bytes()).await.ok()?;
    let text = until_closed(&mut stream).await?;
    text.split(' ').nth(1)?.parse().ok()
}

/// Polls `GET /healthz` until it answers 200, within `BOUND`.
async fn healthz_answers(admin: SocketAddr) -> bool {
    let deadline = Instant::now() + BOUND;
    while Instant::now() < deadline {
        let head = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        if raw_status(admin, head).await == Some(200) {
            return true;
        }
        sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn a_slowloris_head_is_cut_off_and_others_are_served_meanwhile() {
    let s = server("admin-header-timeout = \"1s\"").await;
    let admin = s.running.admin;
    let mut slow = TcpStream::connect(admin).await.unwrap();
    slow.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    // A byte every 100 ms, never ending the head, until the server hangs up.
    let drip = tokio::spawn(async move {
        for _ in 0..(BOUND.as_millis() / 100) {
            if slow.write_all(b"a").await.is_err() {
                return Some(slow);
            }
            sleep(Duration::from_millis(100)).await;
            let mut probe = [0u8; 1];
            // A closed connection reads EOF (or resets) at once.
            if let Ok(Ok(0) | Err(_)) = timeout(Duration::ZERO, slow.read(&mut probe)).await {
                return Some(slow);
            }
        }
        None
    });
    // Meanwhile, every other request is answered.
    for _ in 0..5 {
        let (code, _) = http("GET", &url(&s, "/v1/status"), None, None).await;
        assert_eq!(code, 200);
    }
    let cut = drip.await.unwrap();
    assert!(
        cut.is_some(),
        "the slowloris connection was still open after {BOUND:?}"
    );
}

#[tokio::test]
async fn idle_connections_cannot_hold_the_api_beyond_the_header_timeout() {
    let s = server("admin-max-connections = 3\nadmin-header-timeout = \"1s\"").await;
    let admin = s.running.admin;
    // Fill every slot with a connection that sends nothing...
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(admin).await.unwrap());
    }
    // ...the server closes them itself, and serves again.
    for stream in &mut idle {
        assert!(until_closed(stream).await.is_some(), "idle connection held");
    }
    assert!(healthz_answers(admin).await);
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once_and_slots_come_back() {
    // A long header timeout: the idle connections keep their slots.
    let s = server("admin-max-connections = 4\nadmin-header-timeout = \"60s\"").await;
    let admin = s.running.admin;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(admin).await.unwrap());
    }
    // The listener accepts in order: the fifth finds every slot taken and
    // is closed without an answer, even with a complete request.
    let mut extra = TcpStream::connect(admin).await.unwrap();
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert_eq!(until_closed(&mut extra).await.as_deref(), Some(""));
    // The idle ones are still open (the server never wrote to them)...
    let mut buf = [0u8; 1];
    for stream in &mut idle {
        assert!(
            timeout(Duration::ZERO, stream.read(&mut buf))
                .await
                .is_err()
        );
    }
    // ...and once they go, their slots serve others.
    drop(idle);
    assert!(healthz_answers(admin).await);
}

#[tokio::test]
async fn a_slow_body_gets_408_and_a_whole_one_is_served() {
    let s = server("admin-body-timeout = \"1s\"").await;
    let admin = s.running.admin;
    let head = |len: usize| {
        format!(
            "POST /v1/regions/nowhere/drain HTTP/1.1\r\nHost: x\r\n\
             Authorization: Bearer {TOKEN}\r\nContent-Length: {len}\r\n\r\n"
        )
    };
    // Promises 100 bytes, sends 4 and waits: cut off before any handler
    // runs (the handler would say 404, unknown region).
    let mut stream = TcpStream::connect(admin).await.unwrap();
    stream
        .write_all(format!("{}abcd", head(100)).as_bytes())
        .await
        .unwrap();
    let text = until_closed(&mut stream).await.expect("closed in time");
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(text.contains("did not arrive within 1s"), "{text}");
    // The whole body: the handler answers.
    let mut stream = TcpStream::connect(admin).await.unwrap();
    stream
        .write_all(format!("{}abcd", head(4)).as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = timeout(BOUND, stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 404 "), "{text}");
}

#[tokio::test]
async fn heads_are_bounded_in_size() {
    let s = server("").await;
    let admin = s.running.admin;
    let with_header = |bytes: usize| {
        format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(bytes)
        )
    };
    assert_eq!(raw_status(admin, &with_header(4 * 1024)).await, Some(200));
    // Over the 16 KiB default.
    assert_eq!(raw_status(admin, &with_header(20 * 1024)).await, Some(431));
    // More headers than allowed.
    let many: String = (0..=inferdns::admin::MAX_HEADERS)
        .map(|i| format!("X-{i}: v\r\n"))
        .collect();
    let head = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{many}\r\n");
    assert_eq!(raw_status(admin, &head).await, Some(431));
}

#[tokio::test]
async fn a_wrong_token_of_the_right_length_is_refused() {
    let s = server("").await;
    let wrong = "s3cret-tokem";
    assert_eq!(wrong.len(), TOKEN.len());
    for token in [Some(wrong), Some(""), Some("s3cret-token-and-more"), None] {
        let (code, body) = http("POST", &url(&s, "/v1/reload"), token, None).await;
        assert_eq!(code, 401, "{token:?}");
        assert!(!body.contains(TOKEN), "{body}");
    }
    let (code, _) = http("POST", &url(&s, "/v1/reload"), Some(TOKEN), None).await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn the_read_routes_need_the_token_when_asked() {
    let reads = [
        "/v1/status",
        "/metrics",
        "/v1/explain?name=chat.inference.example.com",
        "/v1/log-level",
    ];
    let open = server("").await;
    for path in reads {
        let (code, _) = http("GET", &url(&open, path), None, None).await;
        assert_ne!(code, 401, "{path} is open by default");
    }
    let closed = server("admin-token-for-reads = true").await;
    for path in reads {
        for token in [None, Some("s3cret-tokem")] {
            let (code, body) = http("GET", &url(&closed, path), token, None).await;
            assert_eq!(code, 401, "{path} {token:?}: {body}");
        }
        let (code, _) = http("GET", &url(&closed, path), Some(TOKEN), None).await;
        assert_ne!(code, 401, "{path} with the token");
    }
    // Liveness and readiness stay open for load balancers and systemd.
    for path in ["/healthz", "/readyz"] {
        let (code, _) = http("GET", &url(&closed, path), None, None).await;
        assert_eq!(code, 200, "{path}");
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_loses_its_slot_after_the_body_timeout() {
    // One slot; a long header timeout, so only a write deadline can free it.
    let s = server(
        "admin-max-connections = 1\nadmin-header-timeout = \"60s\"\nadmin-body-timeout = \"1s\"",
    )
    .await;
    let admin = s.running.admin;
    // A small receive window, then pipelined requests for the largest page,
    // never reading a byte: the server's writes fill both buffers and stall.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stalled = socket.connect(admin).await.unwrap();
    let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut written = 0usize;
    while written < 4 << 20 {
        match stalled.try_write(request) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("writing the pipelined requests: {e}"),
        }
    }
    assert!(
        written > 100 * request.len(),
        "only {written} bytes went out"
    );
    // The stalled client holds the only slot until its write deadline ends
    // the connection; then others are served again.
    assert!(
        healthz_answers(admin).await,
        "a client that never reads held the admin API for {BOUND:?}"
    );
    drop(stalled);
}
