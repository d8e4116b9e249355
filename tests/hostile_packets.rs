//! Hostile input: thousands of mutated and random packets. In its own test
//! binary because it installs a process-wide panic hook.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Server, base_config};
use hickory_proto::rr::RecordType;
use inferdns::demo::client::{Ask, answer_strings};
use inferdns::demo::{MODEL, SimRegion};

#[tokio::test]
async fn no_input_panics_the_server() {
    let panics = Arc::new(AtomicUsize::new(0));
    let counter = panics.clone();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        counter.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));

    let region = SimRegion::start("127.0.0.21:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    let extra = format!(
        "[regions.live]\nendpoints = [{{ address = \"127.0.0.21\", port = {} }}]\n[services.chat]\ntiers = [[\"live\"]]\n",
        region.addr().port()
    );
    let s = Server::start(&base_config(&extra)).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let valid = Ask::new("chat.inference.example.com.", RecordType::A)
        .message()
        .to_vec()
        .unwrap();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        // xorshift: reproducible noise without another dependency.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let target: SocketAddr = s.dns();
    for i in 0..3000u32 {
        let mut packet = if i % 2 == 0 {
            // Mutations of a valid query: flipped bytes, cut short, grown.
            let mut p = valid.clone();
            for _ in 0..(1 + next() % 4) {
                let at = (next() as usize) % p.len();
                p[at] = next() as u8;
            }
            p.truncate(1 + (next() as usize) % (p.len() + 8));
            p
        } else {
            let len = (next() % 600) as usize;
            (0..len).map(|_| next() as u8).collect()
        };
        if packet.is_empty() {
            packet.push(0);
        }
        socket.send_to(&packet, target).await.unwrap();
    }
    // Still serving, and correctly.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = s.udp("chat.inference.example.com.", RecordType::A).await;
    assert_eq!(answer_strings(&m), ["127.0.0.21"]);
    let m = s.tcp("chat.inference.example.com.", RecordType::A).await;
    assert_eq!(answer_strings(&m), ["127.0.0.21"]);
    assert_eq!(
        panics.load(Ordering::SeqCst),
        0,
        "a packet made the server panic"
    );
}
