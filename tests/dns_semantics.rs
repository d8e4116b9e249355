//! DNS semantics over real UDP and TCP sockets against the real server.

mod common;

use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use common::{APEX, Server, base_config};
use hickory_proto::op::{Edns, Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use inferdns::demo::client::{self, Ask, answer_strings, exchange_udp};
use inferdns::demo::{MODEL, SimRegion};

/// A server with one healthy service `chat` (127.0.0.21) and three services
/// whose only endpoint refuses connections, one per all-down rule.
async fn server() -> (Server, SimRegion) {
    let region = SimRegion::start("127.0.0.21:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    let extra = format!(
        r#"
[regions.live]
endpoints = [{{ address = "127.0.0.21", port = {port} }}]

[regions.dead]
endpoints = [{{ address = "127.0.0.22", port = 1 }}, {{ address = "2001:db8::22", port = 1 }}]

[services.chat]
tiers = [["live"]]
ttl = 20

[services.open]
tiers = [["dead"]]
when-all-down = "fail-open"

[services.empty]
tiers = [["dead"]]
when-all-down = "nodata"

[services.broken]
tiers = [["dead"]]
when-all-down = "servfail"
"#,
        port = region.addr().port()
    );
    (Server::start(&base_config(&extra)).await, region)
}

fn name(s: &str) -> Name {
    Name::from_str(s).unwrap()
}

#[tokio::test]
async fn service_answers_are_authoritative_with_the_service_ttl() {
    let (s, _r) = server().await;
    let m = s.udp("chat.inference.example.com.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert!(!m.metadata.recursion_available);
    assert_eq!(answer_strings(&m), ["127.0.0.21"]);
    assert_eq!(m.answers[0].ttl, 20);
    // The service has no IPv6 endpoint: NODATA with the SOA.
    let m = s.udp("chat.inference.example.com.", RecordType::AAAA).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
}

#[tokio::test]
async fn apex_has_soa_and_ns_with_glue() {
    let (s, _r) = server().await;
    let m = s.udp("inference.example.com.", RecordType::SOA).await;
    assert!(m.metadata.authoritative);
    assert_eq!(m.answers.len(), 1);
    let RData::SOA(soa) = &m.answers[0].data else {
        panic!("not an SOA: {m:?}")
    };
    assert_eq!(soa.serial, 7);
    assert_eq!(soa.mname, name("ns1.inference.example.com."));
    assert_eq!(m.answers[0].ttl, 3600);

    let m = s.udp("inference.example.com.", RecordType::NS).await;
    let mut ns: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
    ns.sort();
    assert_eq!(ns, ["ns.example.net.", "ns1.inference.example.com."]);
    let glue: Vec<String> = m.additionals.iter().map(|r| r.data.to_string()).collect();
    assert!(glue.contains(&"192.0.2.53".to_string()), "{glue:?}");
    assert!(glue.contains(&"2001:db8::53".to_string()), "{glue:?}");
    // The glue names answer for themselves too.
    let m = s.udp("ns1.inference.example.com.", RecordType::A).await;
    assert_eq!(answer_strings(&m), ["192.0.2.53"]);
}

#[tokio::test]
async fn nxdomain_carries_the_soa_with_the_negative_ttl() {
    let (s, _r) = server().await;
    for m in [
        s.udp("nope.inference.example.com.", RecordType::A).await,
        s.tcp("nope.inference.example.com.", RecordType::A).await,
        // Below a service name nothing exists either.
        s.udp("x.chat.inference.example.com.", RecordType::A).await,
    ] {
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(m.metadata.authoritative);
        assert!(m.answers.is_empty());
        assert_eq!(m.authorities.len(), 1);
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
        // RFC 2308: min(SOA TTL 3600, MINIMUM 60).
        assert_eq!(m.authorities[0].ttl, 60);
    }
}

#[tokio::test]
async fn nodata_for_existing_names_and_empty_non_terminals() {
    let (s, _r) = server().await;
    for (qname, qtype) in [
        ("www.inference.example.com.", RecordType::MX),
        // `_tcp` exists only because `_chat._tcp` does (RFC 8020: not NXDOMAIN).
        ("_tcp.inference.example.com.", RecordType::A),
        ("inference.example.com.", RecordType::A),
    ] {
        let m = s.udp(qname, qtype).await;
        assert_eq!(
            m.metadata.response_code,
            ResponseCode::NoError,
            "{qname} {qtype}"
        );
        assert!(m.answers.is_empty(), "{qname} {qtype}");
        assert_eq!(
            m.authorities[0].record_type(),
            RecordType::SOA,
            "{qname} {qtype}"
        );
        assert_eq!(m.authorities[0].ttl, 60);
    }
}

#[tokio::test]
async fn outside_the_zone_is_refused() {
    let (s, _r) = server().await;
    for qname in [
        "example.org.",
        "example.com.",
        "xinference.example.com.",
        ".",
    ] {
        let m = s.udp(qname, RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{qname}");
        assert!(!m.metadata.authoritative, "{qname}");
        assert!(m.answers.is_empty());
    }
    // Zone transfers are not offered.
    let m = s.tcp("inference.example.com.", RecordType::AXFR).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
}

#[tokio::test]
async fn lookup_ignores_case_and_echoes_the_question_as_asked() {
    let (s, _r) = server().await;
    for qname in ["WwW.InFeReNcE.ExAmPlE.CoM.", "CHAT.inference.EXAMPLE.com."] {
        let m = s.udp(qname, RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.answers.len(), 1, "{qname}");
        let asked = m.queries[0].name().to_string();
        assert_eq!(asked, qname, "question echoed with the case asked");
    }
}

#[tokio::test]
async fn cname_chains_wildcards_and_loops() {
    let (s, _r) = server().await;
    let m = s.udp("docs.inference.example.com.", RecordType::A).await;
    let types: Vec<RecordType> = m.answers.iter().map(|r| r.record_type()).collect();
    assert_eq!(types, [RecordType::CNAME, RecordType::A]);
    assert_eq!(m.answers[1].data.to_string(), "192.0.2.80");
    // Asking for the CNAME itself gives only the CNAME.
    let m = s
        .udp("docs.inference.example.com.", RecordType::CNAME)
        .await;
    assert_eq!(m.answers.len(), 1);
    // A target outside the zone is left for the resolver.
    let m = s.udp("outside.inference.example.com.", RecordType::A).await;
    assert_eq!(m.answers.len(), 1);
    assert_eq!(m.answers[0].data.to_string(), "api.example.net.");
    // A loop ends; it does not hang or crash the server.
    let m = s.udp("loop1.inference.example.com.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    let chain: Vec<String> = m
        .answers
        .iter()
        .map(|r| format!("{} {}", r.name, r.data))
        .collect();
    assert_eq!(
        chain,
        [
            "loop1.inference.example.com. loop2.inference.example.com.",
            "loop2.inference.example.com. loop1.inference.example.com."
        ],
        "each CNAME of the loop once"
    );
    // Wildcards synthesize the query name.
    let m = s
        .udp("a.b.wild.inference.example.com.", RecordType::A)
        .await;
    assert_eq!(answer_strings(&m), ["192.0.2.99"]);
    assert_eq!(m.answers[0].name, name("a.b.wild.inference.example.com."));
    let m = s
        .udp("a.wild.inference.example.com.", RecordType::AAAA)
        .await;
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
}

#[tokio::test]
async fn any_is_answered_minimally() {
    let (s, _r) = server().await;
    // www has A, AAAA and TXT: RFC 8482 lets us answer one RRset.
    let m = s.udp("www.inference.example.com.", RecordType::ANY).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    let types: std::collections::BTreeSet<RecordType> =
        m.answers.iter().map(|r| r.record_type()).collect();
    assert_eq!(types.len(), 1, "one RRset: {m:?}");
    let m = s.udp("chat.inference.example.com.", RecordType::ANY).await;
    assert_eq!(answer_strings(&m), ["127.0.0.21"]);
}

#[tokio::test]
async fn all_down_rules_fail_open_nodata_and_servfail() {
    let (s, _r) = server().await;
    let m = s.udp("open.inference.example.com.", RecordType::A).await;
    assert_eq!(
        answer_strings(&m),
        ["127.0.0.22"],
        "fail-open answers as if all were fit"
    );
    let m = s.udp("open.inference.example.com.", RecordType::AAAA).await;
    assert_eq!(answer_strings(&m), ["2001:db8::22"]);
    let m = s.udp("empty.inference.example.com.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
    let m = s.udp("broken.inference.example.com.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(m.answers.is_empty());
    // SERVFAIL says nothing about the name: no SOA to cache as negative.
    assert!(m.authorities.is_empty(), "{:?}", m.authorities);
}

#[tokio::test]
async fn edns_is_echoed_only_when_asked_and_the_payload_is_capped() {
    let (s, _r) = server().await;
    let with = client::query_udp(
        s.dns(),
        &Ask {
            edns: Some(4096),
            ..Ask::new("www.inference.example.com.", RecordType::A)
        },
    )
    .await
    .unwrap();
    let edns = with.edns.as_ref().expect("OPT in the response");
    assert_eq!(
        edns.max_payload(),
        1232,
        "we never claim more than max-udp-payload"
    );
    let without = client::query_udp(
        s.dns(),
        &Ask {
            edns: None,
            ..Ask::new("www.inference.example.com.", RecordType::A)
        },
    )
    .await
    .unwrap();
    assert!(without.edns.is_none(), "no OPT when the query had none");
    assert_eq!(answer_strings(&without), ["192.0.2.80"]);
}

#[tokio::test]
async fn unknown_edns_version_is_badvers() {
    let (s, _r) = server().await;
    let mut m = Ask::new("www.inference.example.com.", RecordType::A).message();
    let mut edns = Edns::new();
    edns.set_version(1);
    edns.set_max_payload(1232);
    m.set_edns(edns);
    let reply = Message::from_vec(
        &exchange_udp(s.dns(), &m.to_vec().unwrap(), Duration::from_secs(2))
            .await
            .unwrap(),
    )
    .unwrap();
    // BADVERS and BADSIG share the value 16 (RFC 6891, RFC 8945); hickory names it BADSIG.
    assert_eq!(
        u16::from(reply.metadata.response_code),
        u16::from(ResponseCode::BADVERS)
    );
    assert_eq!(reply.edns.as_ref().map(|e| e.version()), Some(0));
}

/// A zone with `big`, a TXT RRset of about 3 kB, and `mid`, one of about
/// 750 bytes (more than 512, less than 1232).
fn big_zone() -> String {
    let mut zone = common::ZONE.to_string();
    for i in 0..12 {
        zone.push_str(&format!("big IN TXT \"{i:02}{}\"\n", "x".repeat(240)));
    }
    for i in 0..3 {
        zone.push_str(&format!("mid IN TXT \"{i:02}{}\"\n", "y".repeat(240)));
    }
    zone
}

#[tokio::test]
async fn large_answers_truncate_over_udp_and_arrive_whole_over_tcp() {
    let s = Server::start_with_zone(&base_config(""), &big_zone()).await;
    let ask = |qname: &str, edns: Option<u16>| Ask {
        edns,
        ..Ask::new(qname, RecordType::TXT)
    };
    // (name, EDNS payload, whole over UDP?)
    for (qname, edns, whole) in [
        // No EDNS: 512 bytes.
        ("big.inference.example.com.", None, false),
        ("mid.inference.example.com.", None, false),
        // 1232 holds mid but not big.
        ("big.inference.example.com.", Some(1232), false),
        ("mid.inference.example.com.", Some(1232), true),
        // The client's smaller size is respected.
        ("mid.inference.example.com.", Some(600), false),
    ] {
        let m = client::query_udp(s.dns(), &ask(qname, edns)).await.unwrap();
        if whole {
            assert!(!m.metadata.truncation, "{qname} {edns:?}");
            assert_eq!(m.answers.len(), 3, "{qname} {edns:?}");
        } else {
            // RFC 2181 §9: TC=1, and no partial RRset for a resolver to cache.
            assert!(m.metadata.truncation, "{qname} {edns:?}: TC=1");
            assert_eq!(m.answers.len(), 0, "{qname} {edns:?}: no partial RRset");
            assert_eq!(
                m.queries.len(),
                1,
                "{qname} {edns:?}: the question is echoed"
            );
            assert_eq!(m.edns.is_some(), edns.is_some(), "{qname} {edns:?}");
        }
    }
    // TCP carries all of it.
    let full = s.tcp("big.inference.example.com.", RecordType::TXT).await;
    assert!(!full.metadata.truncation);
    assert_eq!(full.answers.len(), 12);
    // A small answer over UDP is not truncated.
    let www = s.udp("www.inference.example.com.", RecordType::A).await;
    assert!(!www.metadata.truncation);
    assert_eq!(answer_strings(&www), ["192.0.2.80"]);
}

fn raw_header(id: u16, flags: u16, qd: u16) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [id, flags, qd, 0, 0, 0] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v
}

fn encoded_question(qname: &str) -> Vec<u8> {
    let mut m = Message::query();
    m.add_query(Query::query(name(qname), RecordType::A));
    m.to_vec().unwrap()[12..].to_vec()
}

#[tokio::test]
async fn malformed_queries_get_formerr() {
    let (s, _r) = server().await;
    // No question at all.
    let reply = exchange_udp(s.dns(), &raw_header(0x1111, 0, 0), Duration::from_secs(2))
        .await
        .unwrap();
    let m = Message::from_vec(&reply).unwrap();
    assert_eq!(
        (m.metadata.id, m.metadata.response_code),
        (0x1111, ResponseCode::FormErr)
    );
    // Two questions.
    let mut two = raw_header(0x2222, 0, 2);
    two.extend(encoded_question("www.inference.example.com."));
    two.extend(encoded_question("chat.inference.example.com."));
    let m = Message::from_vec(
        &exchange_udp(s.dns(), &two, Duration::from_secs(2))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // A question count that promises more than the packet holds.
    let mut short = raw_header(0x3333, 0, 1);
    short.extend_from_slice(&[3, b'w', b'w']);
    let m = Message::from_vec(
        &exchange_udp(s.dns(), &short, Duration::from_secs(2))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (m.metadata.id, m.metadata.response_code),
        (0x3333, ResponseCode::FormErr)
    );
    // Opcodes other than QUERY are not implemented.
    let mut update = Ask::new("www.inference.example.com.", RecordType::A).message();
    update.metadata.op_code = OpCode::Update;
    let m = Message::from_vec(
        &exchange_udp(s.dns(), &update.to_vec().unwrap(), Duration::from_secs(2))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
}

#[tokio::test]
async fn ipv6_listener_serves_too() {
    let region = SimRegion::start("127.0.0.23:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    let extra = format!(
        "[regions.live]\nendpoints = [{{ address = \"127.0.0.23\", port = {} }}]\n[services.chat]\ntiers = [[\"live\"]]\n",
        region.addr().port()
    );
    let main = base_config(&extra).replace(
        r#"dns-listen = ["127.0.0.1:0"]"#,
        r#"dns-listen = ["[::1]:0"]"#,
    );
    let Ok(probe) = std::net::UdpSocket::bind("[::1]:0") else {
        // CI machines have IPv6 loopback: there the test must run.
        assert!(
            std::env::var("CI").is_err(),
            "no IPv6 loopback under CI: the IPv6 listener is untested"
        );
        eprintln!("SKIPPED: no IPv6 loopback here; the IPv6 listener is not tested");
        return;
    };
    drop(probe);
    let s = Server::start(&main).await;
    assert!(matches!(s.dns().ip(), IpAddr::V6(_)));
    let m = s.udp("chat.inference.example.com.", RecordType::A).await;
    assert_eq!(answer_strings(&m), ["127.0.0.23"]);
    let m = s.tcp("www.inference.example.com.", RecordType::AAAA).await;
    assert_eq!(answer_strings(&m), ["2001:db8::80"]);
    let _ = APEX;
}
