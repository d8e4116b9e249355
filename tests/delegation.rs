//! The README's delegation guide against a real parent: Knot serves the
//! parent zone `example.com` with the guide's NS and glue records (the
//! edges' addresses moved to loopback), two inferdns edges serve
//! `inference.example.com` with the guide's `[[zone.ns]]`, and the test
//! walks the delegation as a resolver does. Loopback only; Knot is
//! required under CI (`.ci/run` installs it) and skipped visibly elsewhere.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::{Knot, Server, base_config};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use inferdns::demo::client::{Ask, answer_strings, decode, exchange_udp};
use inferdns::demo::{MODEL, SimRegion};

const README: &str = include_str!("../README.md");
/// The edges' public addresses in the guide, and where they are here.
const EDGES: [(&str, &str); 2] = [
    ("192.0.2.53", "127.0.0.53"),
    ("198.51.100.53", "127.0.0.54"),
];

/// The fenced block of the README's Delegation section in `lang`.
fn guide_block(lang: &str) -> String {
    let section = README
        .split("\n## Delegation\n")
        .nth(1)
        .expect("README has a Delegation section");
    let section = section.split("\n## ").next().unwrap();
    let fence = format!("```{lang}\n");
    let start = section.find(&fence).expect("a fenced block") + fence.len();
    let end = start + section[start..].find("```").unwrap();
    // The blocks are indented under list items.
    section[start..end]
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n")
}

fn on_loopback(text: &str) -> String {
    EDGES.iter().fold(text.to_string(), |t, (public, here)| {
        t.replace(public, here)
    })
}

async fn ask(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
    let mut ask = Ask::new(name, qtype);
    ask.timeout = Duration::from_secs(2);
    let bytes = exchange_udp(server, &ask.message().to_vec().unwrap(), ask.timeout)
        .await
        .unwrap_or_else(|e| panic!("{name} {qtype} from {server}: {e}"));
    decode(&bytes).unwrap()
}

fn names(records: &[hickory_proto::rr::Record], qtype: RecordType) -> BTreeSet<String> {
    records
        .iter()
        .filter(|r| r.record_type() == qtype)
        .filter_map(|r| match &r.data {
            RData::NS(ns) => Some(ns.0.to_ascii()),
            _ => None,
        })
        .collect()
}

fn glue(m: &Message) -> BTreeSet<(String, IpAddr)> {
    m.additionals
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((r.name.to_ascii(), IpAddr::V4(a.0))),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delegation_guide_holds_against_a_real_parent() {
    let parent_zone = format!(
        "$ORIGIN example.com.\n$TTL 3600\n@ IN SOA ns.example.com. hostmaster.example.com. 1 3600 600 86400 60\n@ IN NS ns.example.com.\nns IN A 127.0.0.1\n{}\n",
        on_loopback(&guide_block("zone"))
    );
    let Some(parent) = Knot::start("example.com", &parent_zone).await else {
        assert!(
            std::env::var("CI").is_err(),
            "CI must run this test against Knot: install the knot package"
        );
        eprintln!("SKIPPED: knotd is not installed (apt-get install knot); delegation not checked");
        return;
    };
    let region = SimRegion::start("127.0.0.47:0".parse().unwrap(), MODEL)
        .await
        .unwrap();
    // The guide's [[zone.ns]], replacing the test harness's.
    let ns = on_loopback(&guide_block("toml"));
    let mut edges = Vec::new();
    for (_, here) in EDGES {
        let main = base_config(&format!(
            "[regions.r]\nendpoints = [{{ address = \"127.0.0.47\", port = {} }}]\n[services.chat]\ntiers = [[\"r\"]]\n",
            region.addr().port()
        ));
        let (head, rest) = main.split_once("[[zone.ns]]").unwrap();
        let rest = rest
            .split_once("\n\n[[zone.ns]]\nname = \"ns.example.net\"\n")
            .unwrap()
            .1;
        let main = format!("{head}{ns}\n{rest}").replace(
            "dns-listen = [\"127.0.0.1:0\"]",
            &format!("dns-listen = [\"{here}:0\"]"),
        );
        edges.push(Server::start(&main).await);
    }
    // A resolver only knows the glue address; here each edge has its own port.
    let edge_at = |ip: IpAddr| {
        edges
            .iter()
            .find(|e| e.dns().ip() == ip)
            .unwrap_or_else(|| panic!("glue {ip} names no edge"))
            .dns()
    };

    // 1. The parent refers the name to the edges, with glue.
    let referral = ask(parent.addr, "chat.inference.example.com.", RecordType::A).await;
    assert_eq!(referral.metadata.response_code, ResponseCode::NoError);
    assert!(
        !referral.metadata.authoritative,
        "a referral, not an answer"
    );
    assert!(referral.answers.is_empty());
    let parent_ns = names(&referral.authorities, RecordType::NS);
    assert_eq!(
        parent_ns,
        BTreeSet::from([
            "ns1.inference.example.com.".to_string(),
            "ns2.inference.example.com.".to_string()
        ])
    );
    let glue = glue(&referral);
    assert_eq!(glue.len(), 2, "glue for both name servers: {glue:?}");

    // 2. Each edge, reached at its glue address, answers with authority and
    //    agrees with the parent about the name servers and their addresses.
    let mut answers = Vec::new();
    for (ns_name, address) in &glue {
        let edge = edge_at(*address);
        let chat = ask(edge, "chat.inference.example.com.", RecordType::A).await;
        assert!(chat.metadata.authoritative, "{ns_name}: no aa");
        answers.push(answer_strings(&chat));
        let apex = ask(edge, "inference.example.com.", RecordType::NS).await;
        assert!(apex.metadata.authoritative);
        assert_eq!(
            names(&apex.answers, RecordType::NS),
            parent_ns,
            "{ns_name}: the child's NS set differs from the parent's"
        );
        let own = ask(edge, ns_name, RecordType::A).await;
        assert_eq!(
            answer_strings(&own),
            [address.to_string()],
            "{ns_name}: the edge's address for it differs from the glue"
        );
    }
    // 3. Both edges give the same answer.
    assert_eq!(answers[0], ["127.0.0.47"]);
    assert_eq!(answers[0], answers[1]);
}
