//! Whole-query handling: bytes in, reply out, as the UDP and TCP loops call
//! `Handler::respond`, against snapshots built by the real loader and
//! publisher from a config with every strategy (failover, proximity,
//! capacity with and without sticky, cost), residency, a model fallback,
//! a CNAME endpoint, every `when-all-down` rule, GeoIP with ECS, NSID, the
//! explain ACL, and response rate limiting off and on.
//!
//! The first input byte chooses the transport, the source address and the
//! snapshot; the rest is the DNS message. Every reply must parse strictly
//! (`check_wire`, then hickory), echo the ID and question, and fit: 512
//! bytes without EDNS over UDP, the advertised size clamped to
//! `max-udp-payload` with it, 65535 over TCP.

#![no_main]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use inferdns::dns::query::{self, Ignored};
use inferdns::dns::{Handler, Transport};
use inferdns::health::{Layer, Payload, ProbeOutcome, ProbeReport};
use inferdns::publish::{Msg, Publisher};
use libfuzzer_sys::fuzz_target;

const ZONE: &str = r#"$ORIGIN inference.example.com.
$TTL 300
www             IN A     192.0.2.80
                IN AAAA  2001:db8::80
                IN TXT   "web" "a second string"
docs            IN CNAME www
loop1           IN CNAME loop2
loop2           IN CNAME loop1
outside         IN CNAME api.example.net.
*.wild          IN A     192.0.2.99
_chat._tcp      IN SRV   0 0 443 chat
mail            IN MX    10 www
large           IN TXT   "0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234"
large           IN TXT   "1123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234"
large           IN TXT   "2123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234"
many            IN A     192.0.2.1
many            IN A     192.0.2.2
many            IN A     192.0.2.3
many            IN A     192.0.2.4
many            IN A     192.0.2.5
many            IN A     192.0.2.6
many            IN A     192.0.2.7
many            IN A     192.0.2.8
many            IN A     192.0.2.9
many            IN A     192.0.2.10
many            IN A     192.0.2.11
many            IN A     192.0.2.12
many            IN A     192.0.2.13
many            IN A     192.0.2.14
many            IN A     192.0.2.15
many            IN A     192.0.2.16
many            IN A     192.0.2.17
many            IN A     192.0.2.18
many            IN A     192.0.2.19
many            IN A     192.0.2.20
many            IN A     192.0.2.21
many            IN A     192.0.2.22
many            IN A     192.0.2.23
many            IN A     192.0.2.24
many            IN A     192.0.2.25
many            IN A     192.0.2.26
many            IN A     192.0.2.27
many            IN A     192.0.2.28
many            IN A     192.0.2.29
many            IN A     192.0.2.30
many            IN A     192.0.2.31
many            IN A     192.0.2.32
"#;

/// `{GEO}`, `{PAYLOAD}` and `{RRL}` are filled in per snapshot.
const CONFIG: &str = r#"
[server]
dns-listen = ["127.0.0.1:0"]
admin-listen = "127.0.0.1:0"
max-udp-payload = {PAYLOAD}
nsid = "fuzz-edge-1"
explain-acl = ["127.0.0.0/8", "::1/128", "192.0.2.0/24"]

[zone]
apex = "inference.example.com"
file = "zone.db"
[zone.soa]
primary = "ns1.inference.example.com"
contact = "hostmaster.example.com"
serial = 7
minimum = 60
[[zone.ns]]
name = "ns1.inference.example.com"
addresses = ["192.0.2.53", "2001:db8::53"]
[[zone.ns]]
name = "ns.example.net"

[geoip]
database = "{GEO}"

[ecs]
enabled = true
max-prefix-v4 = 24
max-prefix-v6 = 56

{RRL}

[[overrides]]
networks = ["10.20.0.0/16"]
region = "eu-west"

[regions.us-east]
location = { country = "US", lat = 38.90, lon = -77.04 }
jurisdictions = ["us"]
endpoints = [{ address = "192.0.2.10" }, { address = "192.0.2.11" }, { address = "2001:db8:10::10" }]
probe = { path = "/health", models-path = "/v1/models" }
capacity = { gpus = 8, cost = 2.5 }

[regions.us-west]
location = { country = "US", lat = 37.77, lon = -122.42 }
jurisdictions = ["us"]
endpoints = [{ address = "198.51.100.20" }]
probe = { path = "/health", models-path = "/v1/models" }
capacity = { gpus = 4, cost = 1.5 }

[regions.eu-west]
location = { country = "IE", lat = 53.35, lon = -6.26 }
jurisdictions = ["eu", "gdpr"]
endpoints = [{ address = "203.0.113.30" }, { address = "2001:db8:30::30" }]
probe = { path = "/health", models-path = "/v1/models" }
capacity = { gpus = 2, cost = 3.0 }

[regions.ap]
location = { country = "JP", lat = 35.69, lon = 139.69 }
jurisdictions = ["apac"]
endpoints = [{ address = "203.0.113.40" }]
capacity = { cost = 0.5 }

[regions.provider]
endpoints = [{ cname = "gw.provider.example.net", probe-address = "203.0.113.7" }]

# Never probed: unknown, so never fit.
[regions.dead]
location = { country = "DE", lat = 50.11, lon = 8.68 }
jurisdictions = ["eu"]
endpoints = [{ address = "192.0.2.66" }]

[services.chat]
tiers = [["us-west", "us-east"], ["provider"]]
when-all-down = "nodata"

[services.llama]
tiers = [["us-east"], ["us-west"]]
model = "llama"
ttl = 30
ttl-min = 5

[services.big]
tiers = [["us-east", "us-west"]]
model = "big"
fallback = "llama"

[services.fleet]
tiers = [["us-east", "us-west", "eu-west"]]
strategy = "capacity"
records = 2

[services.sticky]
tiers = [["us-east", "us-west", "eu-west"]]
strategy = "capacity"
sticky = true
records = 3

[services.cheap]
tiers = [["us-east", "us-west", "ap"]]
strategy = "cost"
min-headroom = 0.2

[services.near]
tiers = [["us-east", "us-west", "eu-west", "ap"]]
strategy = "proximity"
proximity-tolerance = "5ms"
residency = { rules = [{ clients = ["eu"], allow = ["eu"] }], otherwise = "any", unknown-location = "deny", without-ecs = "unknown" }

[services.eu]
tiers = [["dead"], ["eu-west"], ["us-east", "ap"]]
residency = { rules = [{ clients = ["eu"], allow = ["eu"] }, { clients = ["JP"], allow = ["apac"] }], otherwise = ["us"], unknown-location = "any" }

[services.open]
tiers = [["dead"]]
when-all-down = "fail-open"
last-known-good = "0s"

[services.fail]
tiers = [["dead"]]
when-all-down = "servfail"
last-known-good = "0s"

[services.nothing]
tiers = [["dead"]]
when-all-down = "nodata"
last-known-good = "0s"
"#;

const RRL_OFF: &str = "[rrl]\nenabled = false\n";
/// A tiny rate, so that most answers are limited: every second slips.
const RRL_ON: &str = "[rrl]\nrate = 1\nwindow = \"1s\"\nslip = 2\n";

/// Source addresses: resolvers in several countries of the test GeoIP
/// database, one inside the explain ACL, IPv6, an unknown one, and port 0.
const SOURCES: [&str; 8] = [
    "127.0.0.1:5353",
    "192.0.2.1:5353",
    "198.51.100.7:40000",
    "203.0.113.9:53",
    "10.1.2.3:1024",
    "[2001:db8:1::1]:5353",
    "[::ffff:10.2.0.1]:5353",
    "172.16.0.1:0",
];

struct Fixture {
    /// (handler, max-udp-payload): RRL off, then on.
    handlers: Vec<(Handler, u16)>,
    sources: Vec<SocketAddr>,
}

fn snapshot(dir: &Path, payload: u16, rrl: &str) -> Handler {
    let geo_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../geoip/test-city.mmdb");
    let text = CONFIG
        .replace("{GEO}", geo_path)
        .replace("{PAYLOAD}", &payload.to_string())
        .replace("{RRL}", rrl);
    let config = inferdns::config::load_str(&dir.join("inferdns.toml"), &text)
        .unwrap_or_else(|e| panic!("the fuzz config loads:\n{e}"));
    let geo = inferdns::geo::GeoDb::load(Path::new(geo_path)).expect("the test GeoIP database");
    let endpoints: usize = config.regions.iter().map(|r| r.endpoints.len()).sum();
    // Global endpoint indexes follow the regions in config order.
    let mut fit = Vec::new();
    let mut first = 0u64;
    for region in &config.regions {
        // `dead` is never probed; eu-west lists `big` too.
        let models = match region.id.as_str() {
            "eu-west" => vec!["big".to_string(), "llama".to_string()],
            _ => vec!["llama".to_string()],
        };
        let count = region.endpoints.len() as u64;
        if region.id != "dead" {
            fit.extend((first..first + count).map(|e| (e, models.clone())));
        }
        first += count;
    }
    let (mut publisher, snapshot, _) = Publisher::new(
        Arc::new(config),
        (0..endpoints as u64).collect(),
        Some(Arc::new(geo)),
        inferdns::metrics::Metrics::new(),
    );
    let report = |endpoint: u64, layer: Layer, payload: Payload| {
        Msg::Probe(ProbeReport {
            endpoint,
            layer,
            outcome: ProbeOutcome {
                result: Ok(payload),
                elapsed: Duration::from_millis(3),
            },
        })
    };
    // Two successes each: the default rise.
    for (endpoint, models) in fit {
        for _ in 0..2 {
            publisher.apply(report(endpoint, Layer::Alive, Payload::Alive));
            publisher.apply(report(
                endpoint,
                Layer::Models,
                Payload::Models(models.clone()),
            ));
        }
    }
    for (region, utilization) in [("us-east", 0.85), ("us-west", 0.4), ("eu-west", 0.97)] {
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
    Handler::new(snapshot, payload)
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("inferdns-fuzz-query-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    std::fs::write(dir.join("zone.db"), ZONE).expect("the zone file is written");
    let handlers = vec![
        (snapshot(&dir, 1232, RRL_OFF), 1232),
        (snapshot(&dir, 4096, RRL_ON), 4096),
    ];
    let _ = std::fs::remove_dir_all(&dir);
    Fixture {
        handlers,
        sources: SOURCES
            .iter()
            .map(|s| s.parse().expect("an address"))
            .collect(),
    }
});

fuzz_target!(|data: &[u8]| {
    let Some((&control, packet)) = data.split_first() else {
        return;
    };
    let fixture = &*FIXTURE;
    let transport = match control & 1 {
        0 => Transport::Udp,
        _ => Transport::Tcp,
    };
    let src = fixture.sources[usize::from(control >> 1) & 7];
    let (handler, max_udp) = &fixture.handlers[usize::from(control >> 4) & 1];
    let mut out = Vec::new();
    let replied = handler.respond(packet, src, transport, &mut out);
    let parsed = query::parse(packet);
    let rrl = control & 0x10 != 0;
    if !replied {
        let ignored = matches!(parsed, Err(Ignored::Short | Ignored::Response));
        let bad_source = transport == Transport::Udp && src.port() == 0;
        assert!(
            ignored || bad_source || (rrl && transport == Transport::Udp),
            "no reply to a query that should get one"
        );
        return;
    }
    let query = parsed.expect("a replied query parses");
    if let Err(e) = inferdns::demo::client::decode(&out) {
        panic!("the reply does not parse: {e}\nquery: {packet:02x?}\nreply: {out:02x?}");
    }
    let limit = match (transport, query.edns) {
        (Transport::Tcp, _) => usize::from(u16::MAX),
        (Transport::Udp, None) => 512,
        (Transport::Udp, Some(edns)) => usize::from(edns.payload.clamp(512, *max_udp)),
    };
    assert!(
        out.len() <= limit,
        "a {}-byte reply over {transport:?} with a limit of {limit}",
        out.len()
    );
    assert_eq!(out[..2], packet[..2], "the reply echoes the ID");
    assert!(out[2] & 0x80 != 0, "QR is set");
    if let Some(question) = query.question {
        assert_eq!(out[4..6], [0, 1], "one question");
        assert_eq!(
            &out[12..12 + question.wire.len()],
            question.wire,
            "the question is echoed as it came"
        );
    }
});
