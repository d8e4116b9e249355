//! GeoIP, EDNS Client Subnet, residency and proximity over real sockets,
//! with the test database `geoip/test-city.mmdb`.

mod common;

use std::time::Duration;

use common::{FAST_PROBE, Server, base_config, http};
use hickory_proto::op::{Edns, Message, ResponseCode};
use hickory_proto::rr::RecordType;
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use inferdns::demo::client::{Ask, answer_strings, exchange_udp};
use inferdns::demo::{MODEL, SimRegion};

const DB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/geoip/test-city.mmdb");
const TOKEN: &str = "geo-token";

/// Four regions on loopback: eu-central (Frankfurt, eu) .71, eu-west
/// (Dublin, eu) .72, us-east (Washington, us) .73, ap (Tokyo, apac) .74.
struct Geo {
    server: Server,
    regions: Vec<SimRegion>,
}

const REGIONS: [(&str, &str, &str, f64, f64, &str); 4] = [
    ("eu-central", "127.0.0.71", "DE", 50.11, 8.68, "eu"),
    ("eu-west", "127.0.0.72", "IE", 53.35, -6.26, "eu"),
    ("us-east", "127.0.0.73", "US", 38.90, -77.04, "us"),
    ("ap", "127.0.0.74", "JP", 35.69, 139.69, "apac"),
];

async fn geo(extra: &str) -> Geo {
    let mut regions = Vec::new();
    // The test database has networks smaller than /24: look at whole /32s
    // unless the test is about the cut.
    let ecs = if extra.contains("[ecs]") {
        ""
    } else {
        "[ecs]\nmax-prefix-v4 = 32\n"
    };
    let mut text = format!("[geoip]\ndatabase = \"{DB}\"\n{ecs}\n{extra}\n");
    for (id, ip, country, lat, lon, jurisdiction) in REGIONS {
        let region = SimRegion::start(format!("{ip}:0").parse().unwrap(), MODEL)
            .await
            .unwrap();
        text.push_str(&format!(
            "[regions.{id}]\nendpoints = [{{ address = \"{ip}\", port = {} }}]\nlocation = {{ country = \"{country}\", lat = {lat}, lon = {lon} }}\njurisdictions = [\"{jurisdiction}\"]\n{FAST_PROBE}\n\n",
            region.addr().port()
        ));
        regions.push(region);
    }
    text.push_str(
        r#"
# Nearest allowed region; EU clients stay in the EU, US and Canadian clients in the US.
[services.chat]
tiers = [["eu-central", "eu-west", "us-east", "ap"]]
strategy = "proximity"
proximity-tolerance = "2ms"
when-all-down = "fail-open"
residency = { rules = [{ clients = ["eu"], allow = ["eu"] }, { clients = ["US", "CA"], allow = ["us"] }], unknown-location = "deny" }

# Same rules, but a query without ECS counts as unknown.
[services.strict]
tiers = [["eu-central", "us-east"]]
residency = { rules = [{ clients = ["eu"], allow = ["eu"] }], without-ecs = "unknown", unknown-location = "deny" }

# No location in play: the answer is the same for everyone.
[services.global]
tiers = [["us-east"], ["eu-central"]]
"#,
    );
    let server = Server::start_with_token(&base_config(&text), TOKEN).await;
    Geo { server, regions }
}

/// Asks `name` A with an ECS option; returns the message.
async fn ask_ecs(server: &Server, name: &str, subnet: Option<ClientSubnet>) -> Message {
    let mut m = Ask::new(name, RecordType::A).message();
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    if let Some(s) = subnet {
        edns.options_mut().insert(EdnsOption::Subnet(s));
    }
    m.set_edns(edns);
    let bytes = exchange_udp(server.dns(), &m.to_vec().unwrap(), Duration::from_secs(2))
        .await
        .unwrap();
    Message::from_vec(&bytes).unwrap()
}

fn subnet(s: &str) -> ClientSubnet {
    s.parse().unwrap()
}

/// (answer, echoed source, echoed scope)
fn read(m: &Message) -> (Vec<String>, Option<(u8, u8)>) {
    let ecs = m
        .edns
        .as_ref()
        .and_then(|e| match e.option(EdnsCode::Subnet) {
            Some(EdnsOption::Subnet(cs)) => Some((cs.source_prefix(), cs.scope_prefix())),
            _ => None,
        });
    (answer_strings(m), ecs)
}

#[tokio::test]
async fn eu_and_us_subnets_get_their_own_regions_with_the_scope_of_the_network() {
    let g = geo("").await;
    let s = &g.server;
    // Frankfurt /24 → eu-central; the scope is the GeoIP network, /24.
    let (answer, ecs) = read(
        &ask_ecs(
            s,
            "chat.inference.example.com.",
            Some(subnet("192.0.2.0/24")),
        )
        .await,
    );
    assert_eq!(answer, ["127.0.0.71"]);
    assert_eq!(ecs, Some((24, 24)));
    // Washington /24 → us-east.
    let (answer, ecs) = read(
        &ask_ecs(
            s,
            "chat.inference.example.com.",
            Some(subnet("198.51.100.0/24")),
        )
        .await,
    );
    assert_eq!(answer, ["127.0.0.73"]);
    assert_eq!(ecs, Some((24, 24)));
    // Dublin → eu-west (nearest EU region); Toronto (CA) → us-east.
    assert_eq!(
        read(
            &ask_ecs(
                s,
                "chat.inference.example.com.",
                Some(subnet("10.2.0.0/24"))
            )
            .await
        )
        .0,
        ["127.0.0.72"]
    );
    assert_eq!(
        read(
            &ask_ecs(
                s,
                "chat.inference.example.com.",
                Some(subnet("10.5.0.0/24"))
            )
            .await
        )
        .0,
        ["127.0.0.73"]
    );
    // Tokyo (no rule: anywhere) → nearest is ap. IPv6 too.
    assert_eq!(
        read(
            &ask_ecs(
                s,
                "chat.inference.example.com.",
                Some(subnet("203.0.113.0/24"))
            )
            .await
        )
        .0,
        ["127.0.0.74"]
    );
    let (answer, ecs) = read(
        &ask_ecs(
            s,
            "chat.inference.example.com.",
            Some(subnet("2001:db8:3::/56")),
        )
        .await,
    );
    assert_eq!(
        (answer, ecs),
        (vec!["127.0.0.74".to_string()], Some((56, 48)))
    );
    // Zurich: not EU/EEA, so any region; nearest is Frankfurt.
    assert_eq!(
        read(
            &ask_ecs(
                s,
                "chat.inference.example.com.",
                Some(subnet("10.4.0.0/24"))
            )
            .await
        )
        .0,
        ["127.0.0.71"]
    );
    // A location-independent answer echoes scope 0.
    let (answer, ecs) = read(
        &ask_ecs(
            s,
            "global.inference.example.com.",
            Some(subnet("192.0.2.0/24")),
        )
        .await,
    );
    assert_eq!(
        (answer, ecs),
        (vec!["127.0.0.73".to_string()], Some((24, 0)))
    );
    let (_, ecs) = read(
        &ask_ecs(
            s,
            "www.inference.example.com.",
            Some(subnet("192.0.2.0/24")),
        )
        .await,
    );
    assert_eq!(ecs, Some((24, 0)));
}

#[tokio::test]
async fn unknown_locations_and_resolvers_without_ecs_follow_their_explicit_rules() {
    let g = geo("").await;
    let s = &g.server;
    // A resolver forwarding its own loopback as ECS is placed nowhere: unknown → deny.
    for unknown in [
        "127.0.0.0/24",
        "172.16.0.0/24",
        "192.168.1.0/24",
        "2001:db8:ff::/48",
    ] {
        let m = ask_ecs(s, "chat.inference.example.com.", Some(subnet(unknown))).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{unknown}");
        assert!(
            answer_strings(&m).is_empty(),
            "{unknown}: unknown location gets nothing"
        );
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
        let (_, ecs) = read(&m);
        assert!(
            ecs.unwrap().1 > 0,
            "{unknown}: the scope says which network was unknown"
        );
    }
    // GB has only registered_country: known, not in the EU group → anywhere (nearest: eu-west).
    assert_eq!(
        read(
            &ask_ecs(
                s,
                "chat.inference.example.com.",
                Some(subnet("10.9.0.0/24"))
            )
            .await
        )
        .0,
        ["127.0.0.72"]
    );
    // No ECS: the resolver (127.0.0.1) is located, and loopback is unknown.
    assert!(
        read(&ask_ecs(s, "chat.inference.example.com.", None).await)
            .0
            .is_empty()
    );
    // SOURCE PREFIX 0 means "do not use ECS": the resolver's location, scope 0 echoed.
    let (answer, ecs) =
        read(&ask_ecs(s, "chat.inference.example.com.", Some(subnet("0.0.0.0/0"))).await);
    assert!(answer.is_empty());
    assert_eq!(ecs.map(|e| e.0), Some(0));
}

#[tokio::test]
async fn a_resolver_outside_the_jurisdiction_without_ecs() {
    // Pretend the resolver (127.0.0.1) is in the US.
    let g = geo("[[overrides]]\nnetworks = [\"127.0.0.0/8\"]\ncountry = \"US\"\ncontinent = \"NA\"\nlat = 38.9\nlon = -77.04\n").await;
    let s = &g.server;
    // `chat` locates the resolver: a US client.
    assert_eq!(
        read(&ask_ecs(s, "chat.inference.example.com.", None).await).0,
        ["127.0.0.73"]
    );
    // `strict` treats a query without ECS as unknown: denied.
    assert!(
        read(&ask_ecs(s, "strict.inference.example.com.", None).await)
            .0
            .is_empty()
    );
    // With ECS from an EU client, strict answers the EU region.
    assert_eq!(
        read(
            &ask_ecs(
                s,
                "strict.inference.example.com.",
                Some(subnet("192.0.2.64/26"))
            )
            .await
        )
        .0,
        ["127.0.0.71"]
    );
}

#[tokio::test]
async fn residency_fails_closed_even_when_the_service_fails_open() {
    let g = geo("").await;
    let s = &g.server;
    let url = |p: &str| format!("http://{}{p}", s.running.admin);
    for region in ["eu-central", "eu-west"] {
        let (code, _) = http(
            "POST",
            &url(&format!("/v1/regions/{region}/drain")),
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(code, 200);
    }
    // An EU client: nothing in the EU is fit → NODATA, never the US or Japan.
    let m = ask_ecs(
        s,
        "chat.inference.example.com.",
        Some(subnet("192.0.2.0/26")),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(answer_strings(&m).is_empty());
    // A US client still gets the US.
    assert_eq!(
        read(
            &ask_ecs(
                s,
                "chat.inference.example.com.",
                Some(subnet("198.51.100.0/25"))
            )
            .await
        )
        .0,
        ["127.0.0.73"]
    );
    // Real probes: kill eu-west's backend, undrain both; the EU client gets eu-central only.
    g.regions[1].set_fault(inferdns::demo::Fault::Down);
    for region in ["eu-central", "eu-west"] {
        http(
            "POST",
            &url(&format!("/v1/regions/{region}/undrain")),
            Some(TOKEN),
            None,
        )
        .await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = read(
            &ask_ecs(
                s,
                "chat.inference.example.com.",
                Some(subnet("10.2.0.0/24")),
            )
            .await,
        )
        .0;
        assert!(
            got.iter().all(|a| a == "127.0.0.71" || a == "127.0.0.72"),
            "{got:?}"
        );
        if got == ["127.0.0.71"] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "eu-west never went down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, metrics) = http("GET", &url("/metrics"), None, None).await;
    assert!(
        metrics.contains("inferdns_residency_refusals_total{service=\"chat\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn malformed_ecs_is_formerr() {
    let g = geo("").await;
    // SCOPE must be 0 in a query.
    let m = ask_ecs(
        &g.server,
        "chat.inference.example.com.",
        Some(ClientSubnet::new("192.0.2.0".parse().unwrap(), 24, 8)),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // Address bits beyond SOURCE PREFIX (192.0.2.0/20 has a bit set in the third byte).
    let m = ask_ecs(
        &g.server,
        "chat.inference.example.com.",
        Some(ClientSubnet::new("192.0.2.0".parse().unwrap(), 20, 0)),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
}

#[tokio::test]
async fn long_source_prefixes_are_cut_and_overrides_come_first() {
    let g = geo(r#"[ecs]
max-prefix-v4 = 24

# A /32 inside the US /24: with the cut to /24 a /32 query cannot tell them apart.
[[overrides]]
networks = ["198.51.100.7/32"]
country = "JP"

# A corporate network pinned to eu-west, inside the database's US 10.16.0.0/12.
[[overrides]]
networks = ["10.20.0.0/16"]
region = "eu-west"
"#)
    .await;
    let s = &g.server;
    // /32 is cut to /24 before lookup. That /24 holds both the US network and
    // the JP /32: its clients are in different places, so none is placed
    // (unknown: denied), and the scope is the /24 looked at.
    let (answer, ecs) = read(
        &ask_ecs(
            s,
            "chat.inference.example.com.",
            Some(subnet("198.51.100.7/32")),
        )
        .await,
    );
    assert!(
        answer.is_empty(),
        "{answer:?}: neither US nor the JP override"
    );
    assert_eq!(ecs, Some((32, 24)), "the source prefix is echoed as sent");
    // The rest of the US /24 space is fine: 198.51.100.0/25 would be too, but
    // a /24 query spans the /32 override.
    let (answer, _) = read(
        &ask_ecs(
            s,
            "chat.inference.example.com.",
            Some(subnet("10.0.1.0/24")),
        )
        .await,
    );
    assert_eq!(answer, ["127.0.0.73"]);
    // The pinned network gets eu-west's location: eu-west, scope /16.
    let (answer, ecs) = read(
        &ask_ecs(
            s,
            "chat.inference.example.com.",
            Some(subnet("10.20.3.0/24")),
        )
        .await,
    );
    assert_eq!(
        (answer, ecs),
        (vec!["127.0.0.72".to_string()], Some((24, 16)))
    );
    // Elsewhere in 10.16.0.0/12 (US in the database): the scope is the
    // widest network around the client that holds no override, 10.16.0.0/14
    // (10.20/16 differs from 10.17 in the 14th bit): not the whole /12, which
    // a resolver would then use for the pinned clients too.
    let (answer, ecs) = read(
        &ask_ecs(
            s,
            "chat.inference.example.com.",
            Some(subnet("10.17.0.0/24")),
        )
        .await,
    );
    assert_eq!(
        (answer, ecs),
        (vec!["127.0.0.73".to_string()], Some((24, 14)))
    );
}

#[tokio::test]
async fn ecs_can_be_switched_off() {
    let g = geo("[ecs]\nenabled = false\n").await;
    let m = ask_ecs(
        &g.server,
        "global.inference.example.com.",
        Some(subnet("192.0.2.0/24")),
    )
    .await;
    assert_eq!(
        read(&m),
        (vec!["127.0.0.73".to_string()], None),
        "not echoed when off"
    );
    // Located by the resolver (loopback: unknown), not by the subnet.
    assert!(
        read(
            &ask_ecs(
                &g.server,
                "chat.inference.example.com.",
                Some(subnet("192.0.2.0/24"))
            )
            .await
        )
        .0
        .is_empty()
    );
}

#[tokio::test]
async fn explain_shows_the_location_residency_and_proximity() {
    let g = geo("").await;
    let url = format!(
        "http://{}/v1/explain?name=chat.inference.example.com&client=127.0.0.1&ecs=10.1.0.0/24",
        g.server.running.admin
    );
    let (code, body) = http("GET", &url, None, None).await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let text: Vec<&str> = v["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    let text = text.join("\n");
    assert!(text.contains("client 10.1.0.0/24 from ECS (resolver 127.0.0.1); located in FR/EU at 48.86,2.35 by GeoIP, network /16"), "{text}");
    assert!(
        text.contains("residency: eu -> regions tagged eu"),
        "{text}"
    );
    assert!(text.contains("region us-east endpoint 127.0.0.73: up -> removed at residency: jurisdiction not allowed"), "{text}");
    assert!(
        text.contains("proximity: region eu-central 478 km"),
        "{text}"
    );
    assert!(text.contains("proximity: region eu-west 781 km"), "{text}");
    assert!(text.contains("-> beyond the tolerance band"), "{text}");
    assert!(text.contains("-> chosen"), "{text}");
}

#[test]
fn the_committed_test_database_matches_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("regenerated.mmdb");
    let run = std::process::Command::new(env!("CARGO"))
        .args(["run", "--quiet", "--locked", "--example", "make-test-geoip"])
        .env("INFERDNS_GEOIP_OUT", &out)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let regenerated = std::fs::read(&out).unwrap();
    let committed = std::fs::read(DB).unwrap();
    assert!(
        regenerated == committed,
        "geoip/test-city.mmdb differs from what geoip/test-city.json produces: run `cargo run --example make-test-geoip` and commit"
    );
}

/// Networks of the test database's source, with the country residency uses.
fn source_networks() -> Vec<(ipnet::IpNet, Option<String>)> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/geoip/test-city.json"))
            .unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["networks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let net: ipnet::IpNet = n["network"].as_str().unwrap().parse().unwrap();
            let country = n["country"]
                .as_str()
                .or(n["registered_country"].as_str())
                .map(str::to_string);
            (net, country)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_ecs_queries_never_leave_the_jurisdiction() {
    let g = geo("").await;
    let s = &g.server;
    let db = inferdns::geo::GeoDb::load(std::path::Path::new(DB)).unwrap();
    let mut networks = source_networks();
    // Ranges the database does not cover: unknown, so denied.
    for uncovered in ["127.0.0.0/8", "172.16.0.0/12", "2001:db8:ff00::/40"] {
        networks.push((uncovered.parse().unwrap(), None));
    }
    let region_of = |ip: &str| {
        REGIONS
            .iter()
            .find(|r| r.1 == ip)
            .map(|r| (r.0, r.5))
            .unwrap()
    };
    let allowed = |country: Option<&str>| -> Option<Vec<&str>> {
        match country {
            None => Some(vec![]),
            Some(c) if inferdns::geo::EU_EEA.contains(&c) => Some(vec!["eu"]),
            Some("US" | "CA") => Some(vec!["us"]),
            Some(_) => None, // anywhere
        }
    };
    let admin = format!("http://{}", s.running.admin);
    let mut seed: u64 = 0x5eed_1234_abcd_0042;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut total, mut answered, mut denied, mut toggles, mut spanning) =
        (0u32, 0u32, 0u32, 0u32, 0u32);
    let mut countries = std::collections::BTreeSet::new();
    for i in 0..4000u32 {
        if i % 200 == 0 {
            // A random region goes down or comes back: by its backend (real
            // probes) or by an operator drain.
            let r = (rand() % 4) as usize;
            if rand() % 2 == 0 {
                let fault = if rand() % 2 == 0 {
                    inferdns::demo::Fault::Down
                } else {
                    inferdns::demo::Fault::None
                };
                g.regions[r].set_fault(fault);
            } else {
                let verb = if rand() % 2 == 0 { "drain" } else { "undrain" };
                http(
                    "POST",
                    &format!("{admin}/v1/regions/{}/{verb}", REGIONS[r].0),
                    Some(TOKEN),
                    None,
                )
                .await;
            }
            toggles += 1;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let (net, _) = networks[(rand() as usize) % networks.len()];
        // A random address in the network, asked with a random source prefix
        // (sometimes wider than the network itself).
        let (addr, source): (std::net::IpAddr, u8) = match net {
            ipnet::IpNet::V4(n) => {
                let host_bits = 32 - u32::from(n.prefix_len());
                let offset = if host_bits == 0 {
                    0
                } else {
                    (rand() as u32) & ((1u64 << host_bits) as u32).wrapping_sub(1)
                };
                let ip = std::net::Ipv4Addr::from(u32::from(n.network()) | offset);
                (ip.into(), 16 + (rand() % 17) as u8)
            }
            ipnet::IpNet::V6(n) => {
                let host_bits = 128 - u32::from(n.prefix_len());
                let offset =
                    (u128::from(rand()) << 64 | u128::from(rand())) & ((1u128 << host_bits) - 1);
                let ip = std::net::Ipv6Addr::from(u128::from(n.network()) | offset);
                (ip.into(), 32 + (rand() % 33) as u8)
            }
        };
        let masked = ipnet::IpNet::new(addr, source).unwrap().trunc();
        let m = ask_ecs(
            s,
            "chat.inference.example.com.",
            Some(ClientSubnet::new(masked.addr(), source, 0)),
        )
        .await;
        total += 1;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        // The client as the server must see it: the masked address.
        let country = networks
            .iter()
            .filter(|(n, _)| n.contains(&masked.addr()))
            .max_by_key(|(n, _)| n.prefix_len())
            .and_then(|(_, c)| c.clone());
        countries.insert(country.clone().unwrap_or_else(|| "unknown".into()));
        let (answer, ecs) = read(&m);
        if let Some(allow) = allowed(country.as_deref()) {
            for ip in &answer {
                let (region, jurisdiction) = region_of(ip);
                assert!(
                    allow.contains(&jurisdiction),
                    "client {masked} ({country:?}) was sent to {region} ({jurisdiction})"
                );
            }
        }
        if answer.is_empty() {
            denied += 1;
        } else {
            answered += 1;
        }
        // The scope is never wider than the GeoIP network that decided.
        let decided = db.lookup(masked.addr()).unwrap().prefix;
        let (echo_source, scope) = ecs.expect("ECS echoed");
        assert_eq!(echo_source, source);
        if decided > source {
            // The subnet spans several networks: nobody in it is placed.
            assert!(
                answer.is_empty(),
                "client {masked} spans networks but got {answer:?}"
            );
            assert_eq!(scope, source, "client {masked}");
            spanning += 1;
        } else {
            assert!(
                scope >= decided && scope <= source,
                "client {masked}: scope /{scope} outside /{decided}..=/{source}"
            );
        }
    }
    eprintln!(
        "residency: {total} queries, {answered} answered, {denied} empty ({spanning} spanning several networks), {toggles} region changes, countries {countries:?}"
    );
    assert!(
        answered > 1000 && denied > 100,
        "both outcomes were exercised"
    );
    assert!(
        countries.len() >= 14,
        "every country of the test database: {countries:?}"
    );
}

/// A one-network City database: `network` in `country` at (lat, lon).
fn tiny_db(network: &str, country: &str, continent: &str, lat: f64, lon: f64) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Code<'a> {
        iso_code: &'a str,
    }
    #[derive(serde::Serialize)]
    struct Cont<'a> {
        code: &'a str,
    }
    #[derive(serde::Serialize)]
    struct Loc {
        latitude: f64,
        longitude: f64,
    }
    #[derive(serde::Serialize)]
    struct Rec<'a> {
        country: Code<'a>,
        continent: Cont<'a>,
        location: Loc,
    }
    let mut w = mmdb_writer::Writer::builder("GeoIP2-City")
        .description(&[("en", "swap test")])
        .build();
    let rec = Rec {
        country: Code { iso_code: country },
        continent: Cont { code: continent },
        location: Loc {
            latitude: lat,
            longitude: lon,
        },
    };
    w.insert(network.parse::<ipnet::IpNet>().unwrap(), &rec)
        .unwrap();
    w.to_bytes().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_database_is_swapped_in_and_a_broken_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("city.mmdb");
    std::fs::write(&db, tiny_db("192.0.2.0/24", "DE", "EU", 50.11, 8.68)).unwrap();
    let mut regions = Vec::new();
    let mut text = format!(
        "[geoip]\ndatabase = \"{}\"\ncheck-interval = \"1s\"\n",
        db.display()
    );
    for (id, ip, country, lat, lon, jurisdiction) in REGIONS {
        let region = SimRegion::start(format!("{ip}:0").parse().unwrap(), MODEL)
            .await
            .unwrap();
        text.push_str(&format!(
            "[regions.{id}]\nendpoints = [{{ address = \"{ip}\", port = {} }}]\nlocation = {{ country = \"{country}\", lat = {lat}, lon = {lon} }}\njurisdictions = [\"{jurisdiction}\"]\n",
            region.addr().port()
        ));
        regions.push(region);
    }
    text.push_str("[services.near]\ntiers = [[\"eu-central\", \"us-east\"]]\nstrategy = \"proximity\"\nproximity-tolerance = \"1ms\"\n");
    let s = Server::start(&base_config(&text)).await;
    let near = |s: &Server| {
        let dns = s.dns();
        async move {
            let mut m = Ask::new("near.inference.example.com.", RecordType::A).message();
            let mut edns = Edns::new();
            edns.set_max_payload(1232);
            edns.options_mut()
                .insert(EdnsOption::Subnet(subnet("192.0.2.0/24")));
            m.set_edns(edns);
            let bytes = exchange_udp(dns, &m.to_vec().unwrap(), Duration::from_secs(2))
                .await
                .unwrap();
            answer_strings(&Message::from_vec(&bytes).unwrap())
        }
    };
    assert_eq!(
        near(&s).await,
        ["127.0.0.71"],
        "Frankfurt is nearest for DE"
    );
    // geoipupdate's way: write a new file, rename it over the old one.
    let staged = dir.path().join("city.mmdb.new");
    std::fs::write(&staged, tiny_db("192.0.2.0/24", "US", "NA", 38.9, -77.04)).unwrap();
    std::fs::rename(&staged, &db).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while near(&s).await != ["127.0.0.73"] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replaced database was never swapped in"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A truncated file is refused; the database in use keeps serving.
    let good = tiny_db("192.0.2.0/24", "JP", "AS", 35.69, 139.69);
    std::fs::write(&staged, &good[..good.len() / 2]).unwrap();
    std::fs::rename(&staged, &db).unwrap();
    let metrics_url = format!("http://{}/metrics", s.running.admin);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !http("GET", &metrics_url, None, None)
        .await
        .1
        .contains("inferdns_geoip_loads_total{result=\"failure\"} 1")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broken file was never looked at"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        near(&s).await,
        ["127.0.0.73"],
        "still the last good database"
    );
    drop(regions);
}
