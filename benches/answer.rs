//! The per-query answer path, without sockets:
//! - `answer/*`: the pure lookup over a snapshot (what the query path adds
//!   on top of reading the query and writing the reply);
//! - `query/*`: a whole UDP query as the server's UDP loop handles it
//!   (`Handler::answer_udp`): read the wire bytes, one snapshot load,
//!   copy the pre-encoded answer (or answer and encode it);
//! - `general/*`: the same queries with the copy path off.
//!
//! Run: `cargo bench --bench answer`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{LowerName, Name, RecordType};
use inferdns::dns::Handler;
use inferdns::dns::answer::answer;
use inferdns::health::{ProbeOutcome, ProbeReport};
use inferdns::publish::{Msg, Publisher};

const MAIN: &str = r#"
[server]
dns-listen = ["127.0.0.1:0"]
[zone]
apex = "inference.example.com"
file = "zone.db"
soa = { primary = "ns1.inference.example.com", contact = "hostmaster.example.com" }
ns = [{ name = "ns1.inference.example.com", addresses = ["192.0.2.53"] }]
[regions.us-east]
endpoints = [{ address = "192.0.2.10" }, { address = "192.0.2.11" }, { address = "2001:db8::10" }]
[regions.us-west]
endpoints = [{ address = "198.51.100.20" }]
[services.chat]
tiers = [["us-east"], ["us-west"]]
[services.fleet]
tiers = [["us-east", "us-west"]]
strategy = "capacity"
[services.sticky]
tiers = [["us-east", "us-west"]]
strategy = "capacity"
sticky = true
records = 2
"#;

const ZONE: &str =
    "$ORIGIN inference.example.com.\n$TTL 300\nwww IN A 192.0.2.80\ndocs IN CNAME www\n";

fn query(name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    m.set_edns(edns);
    m.to_vec().unwrap()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("zone.db"), ZONE).unwrap();
    std::fs::write(dir.path().join("inferdns.toml"), MAIN).unwrap();
    let config = inferdns::config::load(&dir.path().join("inferdns.toml")).unwrap();
    let (mut publisher, snapshot, _) = Publisher::new(
        Arc::new(config),
        vec![0, 1, 2, 3],
        None,
        inferdns::metrics::Metrics::new(),
    );
    for endpoint in 0..4 {
        publisher.apply(Msg::Probe(ProbeReport {
            endpoint,
            layer: inferdns::health::Layer::Alive,
            outcome: ProbeOutcome {
                result: Ok(inferdns::health::Payload::Alive),
                elapsed: Duration::from_millis(1),
            },
        }));
    }
    // Different loads, so the draw has real weights.
    for (region, utilization) in [("us-east", 0.85), ("us-west", 0.4)] {
        let (done, _) = tokio::sync::oneshot::channel();
        publisher.apply(Msg::Capacity {
            region: region.into(),
            report: inferdns::capacity::PushReport {
                utilization: Some(utilization),
                ..Default::default()
            },
            done,
        });
    }
    publisher.publish();

    let client = inferdns::dns::answer::Client {
        addr: Some("127.0.0.1".parse().unwrap()),
        ecs: None,
    };
    let mut group = c.benchmark_group("answer");
    for (label, name, qtype) in [
        ("service_a", "chat.inference.example.com.", RecordType::A),
        ("static_a", "www.inference.example.com.", RecordType::A),
        ("cname_chain", "docs.inference.example.com.", RecordType::A),
        ("nxdomain", "nope.inference.example.com.", RecordType::A),
        (
            "capacity_draw_1_of_4",
            "fleet.inference.example.com.",
            RecordType::A,
        ),
        (
            "capacity_sticky_2_of_4",
            "sticky.inference.example.com.",
            RecordType::A,
        ),
    ] {
        let qname = LowerName::from(Name::from_ascii(name).unwrap());
        group.bench_function(label, |b| {
            b.iter(|| {
                let snap = snapshot.load();
                let a = answer(&snap, black_box(&qname), black_box(qtype), &client);
                black_box(a.answers.len());
            })
        });
    }
    group.finish();

    // `query/*`: the whole answer as the UDP loop gets it (copy path where
    // it applies); `general/*`: the same with every query on the general path.
    let src: SocketAddr = "127.0.0.1:5353".parse().unwrap();
    for (group_name, handler) in [
        ("query", Handler::new(snapshot.clone(), 1232)),
        (
            "general",
            Handler::new(snapshot.clone(), 1232).general_only(),
        ),
    ] {
        let mut group = c.benchmark_group(group_name);
        for (label, name, qtype) in [
            ("service_a", "chat.inference.example.com.", RecordType::A),
            ("static_a", "www.inference.example.com.", RecordType::A),
            ("nxdomain", "nope.inference.example.com.", RecordType::A),
            (
                "capacity_draw_1_of_4",
                "fleet.inference.example.com.",
                RecordType::A,
            ),
            (
                "capacity_sticky_2_of_4",
                "sticky.inference.example.com.",
                RecordType::A,
            ),
        ] {
            let bytes = query(name, qtype);
            group.bench_function(label, |b| {
                b.iter(|| black_box(handler.answer_udp(black_box(&bytes), src)))
            });
            // The response is real: decode it once.
            let reply = Message::from_vec(&handler.answer_udp(&bytes, src).unwrap()).unwrap();
            assert!(reply.metadata.authoritative, "{label}");
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
