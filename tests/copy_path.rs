//! The copy path (answers pre-encoded in the snapshot, `dns::wire`) gives
//! byte for byte the reply the general path gives, for every kind of name
//! and client: static names of every type, empty non-terminals, NODATA,
//! failover, proximity, residency classes, sticky capacity draws, SERVFAIL
//! while unprobed, with and without EDNS, NSID, ECS (IPv4, IPv6, mapped,
//! source 0), case changes in the question, and small and large payloads.
//! Before and after the GeoIP table of places is built. No sockets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
use hickory_proto::rr::{Name, RecordType};
use inferdns::dns::{Handler, Transport};
use inferdns::geo::GeoDb;
use inferdns::health::{Layer, Payload, ProbeOutcome, ProbeReport};
use inferdns::publish::{Msg, Publisher};

const DB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/geoip/test-city.mmdb");

const MAIN: &str = r#"
[server]
dns-listen = ["127.0.0.1:0"]
nsid = "edge-1"
[zone]
apex = "inference.example.com"
file = "zone.db"
soa = { primary = "ns1.inference.example.com", contact = "hostmaster.example.com" }
ns = [{ name = "ns1.inference.example.com", addresses = ["192.0.2.53", "2001:db8::53"] }]
[rrl]
enabled = false
[geoip]
database = "@DB@"
[ecs]
max-prefix-v4 = 32
[regions.eu-central]
endpoints = [{ address = "192.0.2.71" }, { address = "2001:db8::71" }]
location = { country = "DE", lat = 50.11, lon = 8.68 }
jurisdictions = ["eu"]
[regions.eu-west]
endpoints = [{ address = "192.0.2.72" }]
location = { country = "IE", lat = 53.35, lon = -6.26 }
jurisdictions = ["eu"]
[regions.us-east]
endpoints = [{ address = "198.51.100.73" }, { address = "198.51.100.74" }]
location = { country = "US", lat = 38.90, lon = -77.04 }
jurisdictions = ["us"]
[regions.ap]
endpoints = [{ address = "203.0.113.75" }]
location = { country = "JP", lat = 35.69, lon = 139.69 }
jurisdictions = ["apac"]
[regions.never]
endpoints = [{ address = "203.0.113.99" }]
[services.chat]
tiers = [["eu-central", "eu-west", "us-east", "ap"]]
strategy = "proximity"
proximity-tolerance = "2ms"
residency = { rules = [{ clients = ["eu"], allow = ["eu"] }, { clients = ["US", "CA"], allow = ["us"] }], unknown-location = "deny" }
[services.near]
tiers = [["eu-central", "eu-west", "us-east", "ap"]]
strategy = "proximity"
proximity-tolerance = "50ms"
[services.strict]
tiers = [["eu-central", "us-east"]]
residency = { rules = [{ clients = ["eu"], allow = ["eu"] }], without-ecs = "unknown", unknown-location = "deny" }
[services.failover]
tiers = [["us-east"], ["eu-central"]]
[services.fleet]
tiers = [["eu-central", "us-east", "ap"]]
strategy = "capacity"
sticky = true
records = 2
[services.one]
tiers = [["eu-central", "us-east", "ap"]]
strategy = "capacity"
sticky = true
[services.waiting]
tiers = [["never"]]
"#;

const ZONE: &str = "$ORIGIN inference.example.com.\n$TTL 300\n\
www IN A 192.0.2.80\nwww IN A 192.0.2.81\nwww IN AAAA 2001:db8::80\n\
mail IN MX 10 www.inference.example.com.\n\
txt IN TXT \"hello\" \"world\"\n\
docs IN CNAME www\n\
*.wild IN A 192.0.2.90\n\
a.b.deep IN A 192.0.2.91\n\
big IN TXT \"@250@\" \"@250@\"\nbig IN TXT \"@250@x\" \"@250@\"\n";

fn query(name: &str, qtype: RecordType, edns: Option<(u16, bool, Option<&str>)>) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 0x1234;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some((payload, nsid, ecs)) = edns {
        let mut e = Edns::new();
        e.set_max_payload(payload);
        e.set_dnssec_ok(nsid);
        if nsid {
            e.options_mut().insert(EdnsOption::Unknown(3, Vec::new()));
        }
        if let Some(subnet) = ecs {
            let s: ClientSubnet = subnet.parse().unwrap();
            e.options_mut().insert(EdnsOption::Subnet(s));
        }
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn up(publisher: &mut Publisher, endpoint: u64) {
    publisher.apply(Msg::Probe(ProbeReport {
        endpoint,
        layer: Layer::Alive,
        outcome: ProbeOutcome {
            result: Ok(Payload::Alive),
            elapsed: Duration::from_millis(1),
        },
    }));
}

#[test]
fn copied_replies_are_the_general_paths_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let zone = ZONE.replace("@250@", &"z".repeat(250));
    std::fs::write(dir.path().join("zone.db"), zone).unwrap();
    std::fs::write(dir.path().join("inferdns.toml"), MAIN.replace("@DB@", DB)).unwrap();
    let config = inferdns::config::load(&dir.path().join("inferdns.toml")).unwrap();
    // Global endpoint indexes in config order; `never`'s stays unprobed.
    let mut endpoints = 0u64;
    let mut probed = Vec::new();
    for region in &config.regions {
        for _ in &region.endpoints {
            if region.id != "never" {
                probed.push(endpoints);
            }
            endpoints += 1;
        }
    }
    {
        let geo = Arc::new(GeoDb::load(std::path::Path::new(DB)).unwrap());
        let (mut publisher, snapshot, _) = Publisher::new(
            Arc::new(config.clone()),
            (0..endpoints).collect(),
            Some(geo),
            inferdns::metrics::Metrics::new(),
        );
        // Every endpoint but `never`'s is up: `waiting` stays unprobed (SERVFAIL).
        for &e in &probed {
            up(&mut publisher, e);
        }
        publisher.publish();
        let copying = Handler::new(snapshot.clone(), 1232);
        let general = Handler::new(snapshot, 1232).general_only();
        let names = [
            "inference.example.com.",
            "INFERENCE.example.COM.",
            "www.inference.example.com.",
            "wWw.Inference.Example.Com.",
            "mail.inference.example.com.",
            "txt.inference.example.com.",
            "docs.inference.example.com.",
            "x.wild.inference.example.com.",
            "*.wild.inference.example.com.",
            "deep.inference.example.com.",
            "b.deep.inference.example.com.",
            "a.b.deep.inference.example.com.",
            "big.inference.example.com.",
            "nothing.inference.example.com.",
            "ns1.inference.example.com.",
            "chat.inference.example.com.",
            "CHAT.inference.example.com.",
            "near.inference.example.com.",
            "strict.inference.example.com.",
            "failover.inference.example.com.",
            "fleet.inference.example.com.",
            "one.inference.example.com.",
            "waiting.inference.example.com.",
            "_explain.chat.inference.example.com.",
            "example.org.",
        ];
        let types = [
            RecordType::A,
            RecordType::AAAA,
            RecordType::MX,
            RecordType::TXT,
            RecordType::NS,
            RecordType::SOA,
            RecordType::CNAME,
            RecordType::ANY,
            RecordType::SRV,
        ];
        let subnets = [
            None,
            Some("192.0.2.0/24"),
            Some("198.51.100.0/24"),
            Some("10.1.70.0/24"),
            Some("10.5.0.0/16"),
            Some("10.9.1.0/24"),
            Some("10.3.0.0/24"),
            Some("192.168.1.0/24"),
            Some("172.16.5.0/24"),
            Some("2001:db8:3::/48"),
            Some("::ffff:192.0.2.0/120"),
            Some("0.0.0.0/0"),
            Some("10.0.0.0/8"),
        ];
        let sources: [SocketAddr; 3] = [
            "127.0.0.1:5353".parse().unwrap(),
            "192.0.2.7:5353".parse().unwrap(),
            "[2001:db8:3::9]:5353".parse().unwrap(),
        ];
        let mut compared = 0;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for name in names {
            for qtype in types {
                for edns in [
                    None,
                    Some((1232, false, None)),
                    Some((512, true, None)),
                    Some((4096, true, None)),
                ]
                .into_iter()
                .chain(subnets.iter().map(|s| Some((1232, true, *s))))
                {
                    for src in sources {
                        for transport in [Transport::Udp, Transport::Tcp] {
                            let packet = query(name, qtype, edns);
                            let ra = copying.respond(&packet, src, transport, &mut a);
                            let rb = general.respond(&packet, src, transport, &mut b);
                            assert_eq!(
                                (ra, &a),
                                (rb, &b),
                                "{name} {qtype} {edns:?} from {src} over {transport:?}"
                            );
                            compared += 1;
                        }
                    }
                }
            }
        }
        assert!(compared > 10_000, "{compared}");
    }
}

/// The A records of a reply.
fn addresses(reply: &[u8]) -> Vec<String> {
    let mut found: Vec<String> = Message::from_vec(reply)
        .unwrap()
        .answers
        .iter()
        .map(|r| r.data.to_string())
        .collect();
    found.sort();
    found
}

/// The query path remembers proximity decisions per subnet; a decision
/// taken on one snapshot must never answer on another: not after a drain
/// (the candidates' order moves, so an old mask would name other regions),
/// not on a second publisher whose generation number is the same.
#[test]
fn a_remembered_decision_never_answers_from_another_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("zone.db"), ZONE.replace("@250@", "z")).unwrap();
    std::fs::write(dir.path().join("inferdns.toml"), MAIN.replace("@DB@", DB)).unwrap();
    let config = Arc::new(inferdns::config::load(&dir.path().join("inferdns.toml")).unwrap());
    let endpoints: u64 = config
        .regions
        .iter()
        .map(|r| r.endpoints.len() as u64)
        .sum();
    let geo = Arc::new(GeoDb::load(std::path::Path::new(DB)).unwrap());
    let publisher = |drain: Option<&str>| {
        let (mut publisher, snapshot, _) = Publisher::new(
            config.clone(),
            (0..endpoints).collect(),
            Some(geo.clone()),
            inferdns::metrics::Metrics::new(),
        );
        for e in 0..endpoints {
            up(&mut publisher, e);
        }
        if let Some(region) = drain {
            let (done, _) = tokio::sync::oneshot::channel();
            publisher.apply(Msg::Drain {
                region: region.into(),
                drained: true,
                done,
            });
        }
        publisher.publish();
        (publisher, snapshot)
    };
    // A client in DE (ECS 192.0.2.0/24): within 50 ms of both EU regions.
    let packet = query(
        "near.inference.example.com.",
        RecordType::A,
        Some((1232, false, Some("192.0.2.0/24"))),
    );
    let src: SocketAddr = "127.0.0.1:5353".parse().unwrap();
    let ask = |handler: &Handler| {
        let mut out = Vec::new();
        assert!(handler.respond(&packet, src, Transport::Udp, &mut out));
        addresses(&out)
    };
    let both = vec!["192.0.2.71".to_string(), "192.0.2.72".to_string()];
    let west = vec!["192.0.2.72".to_string()];

    // One publisher: asked, drained, asked again on the same thread.
    let (mut first, first_snapshot) = publisher(None);
    let handler = Handler::new(first_snapshot.clone(), 1232);
    assert_eq!(ask(&handler), both);
    assert_eq!(ask(&handler), both); // From memory this time.
    let (done, _) = tokio::sync::oneshot::channel();
    first.apply(Msg::Drain {
        region: "eu-central".into(),
        drained: true,
        done,
    });
    first.publish();
    assert_eq!(ask(&handler), west);

    // Two publishers at the same generation, one with eu-central drained
    // (the other drains a region `near` does not use).
    let (_a, up_all) = publisher(Some("never"));
    let (_b, drained) = publisher(Some("eu-central"));
    assert_eq!(up_all.load().generation, drained.load().generation);
    let (a, b) = (Handler::new(up_all, 1232), Handler::new(drained, 1232));
    for _ in 0..3 {
        assert_eq!(ask(&a), both);
        assert_eq!(ask(&b), west);
    }
}
