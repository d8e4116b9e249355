//! Supervision of the DNS listeners: a listener task that dies (here: a
//! panic while answering, from a snapshot whose zone names a service that
//! does not exist) makes `DnsServer::run` return an error at once, so the
//! daemon stops (exit 2) instead of silently losing the clients that
//! socket would have served.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use hickory_proto::rr::rdata::SOA;
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use inferdns::demo::client::{Ask, exchange_tcp, exchange_udp};
use inferdns::dns::{DnsServer, Handler, TcpLimits};
use inferdns::model::{Node, Snapshot, Zone};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

/// A snapshot whose `boom.inference.example.com` points at service 7 of none.
fn broken_snapshot() -> Snapshot {
    let apex = Name::from_str("inference.example.com.").unwrap();
    let soa = Record::from_rdata(
        apex.clone(),
        3600,
        RData::SOA(SOA::new(
            Name::from_str("ns1.inference.example.com.").unwrap(),
            Name::from_str("hostmaster.inference.example.com.").unwrap(),
            1,
            3600,
            600,
            86400,
            60,
        )),
    );
    let mut names = HashMap::new();
    names.insert(LowerName::new(&apex), Node::Static(Vec::new()));
    names.insert(
        LowerName::new(&Name::from_str("boom.inference.example.com.").unwrap()),
        Node::Service(7),
    );
    Snapshot {
        generation: 1,
        id: Snapshot::next_id(),
        built: SystemTime::now(),
        zone: Arc::new(Zone {
            apex: LowerName::new(&apex),
            soa: soa.clone(),
            soa_negative: soa.clone(),
            soa_uncached: soa,
            glue: Vec::new(),
            names,
            has_wildcards: false,
        }),
        services: Vec::new(),
        service_views: Vec::new(),
        endpoints: Vec::new(),
        drained: Vec::new(),
        queries: Arc::default(),
        nsid: None,
        explain_acl: Arc::default(),
        geo: Default::default(),
        region_loads: Vec::new(),
        rrl: None,
        choice_seed: None,
        wire: Default::default(),
    }
}

#[tokio::test]
async fn a_listener_task_that_dies_stops_the_dns_server() {
    let snapshot = Arc::new(ArcSwap::from_pointee(broken_snapshot()));
    let ok = Ask::new("inference.example.com.", RecordType::SOA)
        .message()
        .to_vec()
        .unwrap();
    let boom = Ask::new("boom.inference.example.com.", RecordType::A)
        .message()
        .to_vec()
        .unwrap();
    for over_tcp in [false, true] {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
        let server = DnsServer::new(
            Handler::new(snapshot.clone(), 1232),
            vec![udp],
            vec![tcp],
            TcpLimits {
                idle_timeout: Duration::from_secs(5),
                max_connections: 100,
                max_per_address: 10,
            },
        );
        let cancel = CancellationToken::new();
        let run = tokio::spawn(server.run(cancel.clone()));
        // Healthy first, over both transports.
        exchange_udp(udp_addr, &ok, Duration::from_secs(2))
            .await
            .expect("UDP answer");
        exchange_tcp(tcp_addr, &ok, Duration::from_secs(2))
            .await
            .expect("TCP answer");
        assert!(!run.is_finished());
        // The query whose answer panics gets no reply...
        let lost = if over_tcp {
            exchange_tcp(tcp_addr, &boom, Duration::from_millis(500)).await
        } else {
            exchange_udp(udp_addr, &boom, Duration::from_millis(500)).await
        };
        assert!(lost.is_err());
        // ...and the server reports the dead listener instead of limping on.
        let result = tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("run returns once a listener dies")
            .expect("run itself does not panic");
        let error = result.expect_err("a dead listener is an error");
        assert!(error.to_string().contains("panicked"), "{error}");
        assert!(!cancel.is_cancelled(), "nobody asked it to stop");
    }
}
