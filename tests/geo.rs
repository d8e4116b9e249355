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
    // GB has only registered_country: known, so answered (nearest: eu-west;
    // Frankfurt is 2.6 ms further by distance, so measured probe times can
    // bring it into the 2 ms band). Not being in `eu` is checked in
    // eu_territories_with_their_own_codes_stay_in_the_eu.
    let gb = read(
        &ask_ecs(
            s,
            "chat.inference.example.com.",
            Some(subnet("10.9.0.0/24")),
        )
        .await,
    )
    .0;
    assert!(
        gb.contains(&"127.0.0.72".to_string())
            && gb.iter().all(|a| EU_REGIONS.contains(&a.as_str())),
        "{gb:?}"
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
    assert_eq!(ecs, Some((0, 0)), "(source, scope) echoed");
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

/// Drains (or undrains) a region; the new snapshot is live when this returns.
async fn set_drained(s: &Server, region: &str, drained: bool) {
    let verb = if drained { "drain" } else { "undrain" };
    let url = format!("http://{}/v1/regions/{region}/{verb}", s.running.admin);
    let (code, body) = http("POST", &url, Some(TOKEN), None).await;
    assert_eq!(code, 200, "{verb} {region}: {body}");
}

const EU_REGIONS: [&str; 2] = ["127.0.0.71", "127.0.0.72"];

#[tokio::test]
async fn eu_territories_with_their_own_codes_stay_in_the_eu() {
    let g = geo(r#"
# Override places carry no EU flag: the list decides.
[[overrides]]
networks = ["100.100.0.0/16"]
country = "IC"
continent = "AF"
lat = 28.12
lon = -15.43

[[overrides]]
networks = ["100.101.0.0/16"]
country = "BL"
continent = "NA"
lat = 17.90
lon = -62.83

# A continent rule listed before the eu group: the group still wins.
[services.continental]
tiers = [["eu-central", "us-east"]]
residency = { rules = [{ clients = ["continent:NA"], allow = ["us"] }, { clients = ["eu"], allow = ["eu"] }], unknown-location = "deny" }
"#)
    .await;
    let s = &g.server;
    // (subnet, why): clients in the group `eu` under codes other than EU-27.
    let eu_clients = [
        ("10.10.0.0/24", "Åland AX, flagged"),
        ("10.11.0.0/24", "Martinique MQ (North America), flagged"),
        (
            "10.12.0.0/24",
            "Réunion RE, flag on registered_country only",
        ),
        (
            "10.14.0.0/24",
            "Gibraltar GI flagged by an old database: the flag alone",
        ),
        (
            "2001:db8:5::/56",
            "Saint-Martin MF (North America), flagged",
        ),
        (
            "100.100.0.0/24",
            "Canaries IC by an override: the list alone",
        ),
        (
            "10.3.0.0/24",
            "Norway NO (EEA), not flagged: the list alone",
        ),
    ];
    // Outside the EU: not flagged, not on the list.
    let others = [
        ("10.13.0.0/24", "Greenland GL, flag false"),
        ("100.101.0.0/24", "Saint-Barthélemy BL by an override"),
        (
            "10.15.0.0/24",
            "Switzerland CH on a network registered in DE (flagged)",
        ),
        ("10.9.0.0/24", "United Kingdom GB (registered_country)"),
    ];
    for (subnet_text, why) in eu_clients {
        for name in ["chat", "continental"] {
            let qname = format!("{name}.inference.example.com.");
            let answer = read(&ask_ecs(s, &qname, Some(subnet(subnet_text))).await).0;
            assert!(
                !answer.is_empty() && answer.iter().all(|a| EU_REGIONS.contains(&a.as_str())),
                "{name}: {why}: {answer:?}"
            );
        }
    }
    // No EU region fit: NODATA for every one of them, never a region elsewhere.
    set_drained(s, "eu-central", true).await;
    set_drained(s, "eu-west", true).await;
    for (subnet_text, why) in eu_clients {
        for name in ["chat", "continental"] {
            let qname = format!("{name}.inference.example.com.");
            let m = ask_ecs(s, &qname, Some(subnet(subnet_text))).await;
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{why}");
            assert_eq!(answer_strings(&m), Vec::<String>::new(), "{name}: {why}");
            assert_eq!(m.authorities[0].record_type(), RecordType::SOA, "{why}");
        }
    }
    // The others may go elsewhere: the nearest fit region (chat), or by
    // continent (continental: GL and BL are in North America).
    for (subnet_text, why) in others {
        let answer =
            read(&ask_ecs(s, "chat.inference.example.com.", Some(subnet(subnet_text))).await).0;
        assert_eq!(answer, ["127.0.0.73"], "chat: {why}");
    }
    for subnet_text in ["10.13.0.0/24", "100.101.0.0/24"] {
        let answer = read(
            &ask_ecs(
                s,
                "continental.inference.example.com.",
                Some(subnet(subnet_text)),
            )
            .await,
        )
        .0;
        assert_eq!(answer, ["127.0.0.73"], "continental: {subnet_text}");
    }
}

#[tokio::test]
async fn an_override_elsewhere_in_the_geoip_network_does_not_unplace_a_subnet() {
    let g = geo(r#"
[[overrides]]
networks = ["10.20.0.0/28", "fd00:1::/32"]
country = "JP"
continent = "AS"
lat = 35.69
lon = 139.69
"#)
    .await;
    let s = &g.server;
    let ask = |subnet_text: &'static str| async move {
        read(&ask_ecs(s, "chat.inference.example.com.", Some(subnet(subnet_text))).await)
    };
    let us = vec!["127.0.0.73".to_string()];
    // 10.17.0.0/24 is in the database's US 10.16.0.0/12, like the override,
    // but does not hold it: placed in the US. The scope is the widest
    // network around it that holds no override: 10.16.0.0/14 (10.20 differs
    // from 10.17 in the 14th bit).
    assert_eq!(ask("10.17.0.0/24").await, (us.clone(), Some((24, 14))));
    assert_eq!(ask("10.31.255.0/24").await, (us.clone(), Some((24, 13))));
    // Next to the override, inside the same /24: the scope shrinks to clear it.
    assert_eq!(ask("10.20.0.16/28").await, (us.clone(), Some((28, 28))));
    assert_eq!(ask("10.20.0.64/32").await, (us, Some((32, 26))));
    // The override itself.
    assert_eq!(
        ask("10.20.0.0/28").await,
        (vec!["127.0.0.74".to_string()], Some((28, 28)))
    );
    // Subnets that hold the override (or the whole /12): nobody in them is
    // placed, and the answer is for exactly the subnet asked.
    for (spanning, prefix) in [("10.20.0.0/24", 24), ("10.16.0.0/12", 12)] {
        assert_eq!(
            ask(spanning).await,
            (vec![], Some((prefix, prefix))),
            "{spanning}"
        );
    }
    // IPv6 too: fd00::/8 is IE in the database, the override fd00:1::/32.
    assert_eq!(
        ask("fd00:2::/48").await,
        (vec!["127.0.0.72".to_string()], Some((48, 31)))
    );
    assert_eq!(ask("fd00::/16").await, (vec![], Some((16, 16))));
}

#[tokio::test]
async fn sticky_answers_echo_the_scope_of_the_sticky_key() {
    let g = geo(r#"
[ecs]
max-prefix-v4 = 32
max-prefix-v6 = 128

[services.sticky]
tiers = [["eu-central", "eu-west", "us-east", "ap"]]
strategy = "capacity"
sticky = true

[services.drawn]
tiers = [["eu-central", "eu-west", "us-east", "ap"]]
strategy = "capacity"

[services.sticky-eu]
tiers = [["eu-central", "eu-west", "us-east", "ap"]]
strategy = "capacity"
sticky = true
residency = { rules = [{ clients = ["eu"], allow = ["eu"] }] }
"#)
    .await;
    let s = &g.server;
    let ask = |name: &'static str, subnet_text: &'static str| async move {
        read(
            &ask_ecs(
                s,
                &format!("{name}.inference.example.com."),
                Some(subnet(subnet_text)),
            )
            .await,
        )
    };
    // The draw depends on the /24: different /24s land on different endpoints.
    let mut seen = std::collections::BTreeSet::new();
    for third in 0..16u8 {
        let subnet_text: &'static str = format!("198.18.{third}.0/24").leak();
        seen.insert(ask("sticky", subnet_text).await.0);
    }
    assert!(seen.len() >= 2, "the draw depends on the subnet: {seen:?}");
    // ... and is the same for every address of a /24: scope /24 is true.
    let whole = ask("sticky", "198.18.7.0/24").await;
    assert_eq!(whole.1, Some((24, 24)));
    for host in [1u8, 77, 128, 254] {
        let subnet_text: &'static str = format!("198.18.7.{host}/32").leak();
        let (answer, ecs) = ask("sticky", subnet_text).await;
        assert_eq!(answer, whole.0, "{subnet_text}");
        assert_eq!(ecs, Some((32, 24)), "{subnet_text}");
    }
    // Never longer than the subnet asked about; IPv6 keys are /56.
    for (subnet_text, expect) in [
        ("198.18.0.0/20", (20, 20)),
        ("2001:db8:7:ff00::/56", (56, 56)),
        ("2001:db8:7:ff00::/64", (64, 56)),
        ("2001:db8:7::/48", (48, 48)),
        // IPv4-mapped: located as 198.18.7.0/24, echoed in the option's family.
        ("::ffff:198.18.7.0/120", (120, 120)),
    ] {
        assert_eq!(
            ask("sticky", subnet_text).await.1,
            Some(expect),
            "{subnet_text}"
        );
    }
    // With residency too: the longer of the location scope (FR is a /16) and the key.
    assert_eq!(ask("sticky-eu", "10.1.2.0/24").await.1, Some((24, 24)));
    assert_eq!(ask("sticky-eu", "10.1.0.0/16").await.1, Some((16, 16)));
    // A random draw does not depend on the client: scope 0.
    assert_eq!(ask("drawn", "198.18.7.0/24").await.1, Some((24, 0)));
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

/// The group `eu` as the README states it, written out here rather than
/// taken from the code under test: EU-27, EU territories with codes of
/// their own, the exceptionally reserved IC, EA, EU, and the EEA.
const EU_GROUP: [&str; 40] = [
    "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT", "LV",
    "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE", "AX", "GF", "GP", "MQ", "RE",
    "YT", "MF", "IC", "EA", "EU", "IS", "LI", "NO",
];

/// A network of the test database's source file, as residency must see it:
/// the code (`country`, else `registered_country`) and the EU flag of the
/// same record.
struct SourceNet {
    net: ipnet::IpNet,
    country: Option<String>,
    flagged: bool,
}

fn source_networks() -> Vec<SourceNet> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/geoip/test-city.json"))
            .unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["networks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let (country, flag) = match n["country"].as_str() {
                Some(c) => (Some(c), &n["country_in_eu"]),
                None => (
                    n["registered_country"].as_str(),
                    &n["registered_country_in_eu"],
                ),
            };
            SourceNet {
                net: n["network"].as_str().unwrap().parse().unwrap(),
                country: country.map(str::to_string),
                flagged: flag.as_bool() == Some(true),
            }
        })
        .collect()
}

/// Network overrides of the property test: (networks, country, continent,
/// lat, lon). Nested in database networks, in each other, and in ranges the
/// database does not cover; EU territories by code (no flag: the list
/// decides) and territories outside the EU.
const PROPERTY_OVERRIDES: [(&str, &str, &str, f64, f64); 8] = [
    ("10.20.0.0/16", "AX", "EU", 60.10, 19.94),
    ("10.21.4.0/24", "MQ", "NA", 14.61, -61.07),
    ("10.1.128.0/17", "GL", "NA", 64.18, -51.72),
    ("10.1.200.0/24", "EA", "AF", 35.89, -5.32),
    ("100.100.0.0/16", "IC", "AF", 28.12, -15.43),
    ("100.101.0.0/16", "BL", "NA", 17.90, -62.83),
    ("172.16.0.0/16", "GP", "NA", 16.24, -61.53),
    ("fd00:1::/32", "NO", "EU", 59.91, 10.75),
];

/// An override pinning clients to a region (its location: US).
const PROPERTY_PIN: (&str, &str) = ("192.0.2.128/25", "us-east");

/// Where the server must place a client subnet, worked out from the
/// source file and the overrides alone.
#[derive(Debug)]
enum Expect {
    /// The subnet holds several networks: nobody placed, scope = the subnet.
    Spans,
    Placed {
        country: Option<String>,
        eu: bool,
        /// The network that decides, and whether it is an override.
        deciding: Option<(ipnet::IpNet, bool)>,
    },
}

fn expect(subnet: ipnet::IpNet, db: &[SourceNet], overrides: &[(ipnet::IpNet, &str)]) -> Expect {
    let ip = subnet.addr();
    let over = overrides
        .iter()
        .filter(|(n, _)| n.contains(&ip))
        .max_by_key(|(n, _)| n.prefix_len());
    let in_db = db.iter().find(|n| n.net.contains(&ip));
    let (deciding, country, eu) = match (over, in_db) {
        (Some((n, c)), _) => (Some((*n, true)), Some(c.to_string()), EU_GROUP.contains(c)),
        (None, Some(n)) => {
            let listed = n.country.as_deref().is_some_and(|c| EU_GROUP.contains(&c));
            (Some((n.net, false)), n.country.clone(), n.flagged || listed)
        }
        (None, None) => (None, None, false),
    };
    let other_override_inside = overrides
        .iter()
        .any(|(n, _)| Some(*n) != deciding.map(|d| d.0) && subnet.contains(n));
    let spans = match deciding {
        Some((n, _)) => n.prefix_len() > subnet.prefix_len() || other_override_inside,
        // Not in the database: the empty network around it, unless the
        // subnet holds a database network or an override.
        None => other_override_inside || db.iter().any(|n| subnet.contains(&n.net)),
    };
    if spans {
        Expect::Spans
    } else {
        Expect::Placed {
            country,
            eu,
            deciding,
        }
    }
}

/// Jurisdictions a client may be sent to under `service`'s rules (`None`:
/// anywhere). chat: eu → eu, US/CA → us; strict: eu → eu; both deny
/// unknown locations. Codes named by a rule first, then the EU flag.
fn allowed(service: &str, country: Option<&str>, eu: bool) -> Option<&'static [&'static str]> {
    let Some(c) = country else {
        return Some(&[]);
    };
    match (service, c) {
        (_, c) if EU_GROUP.contains(&c) => Some(&["eu"]),
        ("chat", "US" | "CA") => Some(&["us"]),
        _ if eu => Some(&["eu"]),
        _ => None,
    }
}

/// A random address of `net` with a random source prefix (sometimes wider
/// than the network): the subnet a resolver would send.
fn random_subnet(net: ipnet::IpNet, rand: &mut impl FnMut() -> u64) -> ipnet::IpNet {
    let (addr, source): (std::net::IpAddr, u8) = match net {
        ipnet::IpNet::V4(n) => {
            let host_bits = 32 - u32::from(n.prefix_len());
            let offset = (rand() as u32) & (((1u64 << host_bits) - 1) as u32);
            let ip = std::net::Ipv4Addr::from(u32::from(n.network()) | offset);
            (ip.into(), 12 + (rand() % 21) as u8)
        }
        ipnet::IpNet::V6(n) => {
            let host_bits = 128 - u32::from(n.prefix_len());
            let offset =
                (u128::from(rand()) << 64 | u128::from(rand())) & ((1u128 << host_bits) - 1);
            let ip = std::net::Ipv6Addr::from(u128::from(n.network()) | offset);
            (ip.into(), 12 + (rand() % 53) as u8)
        }
    };
    ipnet::IpNet::new(addr, source).unwrap().trunc()
}

/// Counts of what the property test saw, so that it cannot pass vacuously.
#[derive(Debug, Default)]
struct Seen {
    total: u32,
    answered: u32,
    empty: u32,
    spanning: u32,
    changes: u32,
    /// EU-group clients asked while both EU regions were drained.
    eu_without_eu_region: u32,
    /// EU-group clients outside EU-27 (territories, EEA, flag only) answered.
    territories_answered: u32,
    places: std::collections::BTreeSet<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_ecs_queries_never_leave_the_jurisdiction() {
    let db = source_networks();
    // The expectations below rely on no database network nested in another.
    for a in &db {
        assert!(
            !db.iter().any(|b| a.net != b.net && a.net.contains(&b.net)),
            "{} holds another network of test-city.json",
            a.net
        );
    }
    let mut overrides: Vec<(ipnet::IpNet, &str)> = PROPERTY_OVERRIDES
        .iter()
        .map(|o| (o.0.parse().unwrap(), o.1))
        .collect();
    overrides.push((PROPERTY_PIN.0.parse().unwrap(), "US"));
    let mut extra = String::new();
    for (net, country, continent, lat, lon) in PROPERTY_OVERRIDES {
        extra.push_str(&format!("[[overrides]]\nnetworks = [\"{net}\"]\ncountry = \"{country}\"\ncontinent = \"{continent}\"\nlat = {lat}\nlon = {lon}\n\n"));
    }
    extra.push_str(&format!(
        "[[overrides]]\nnetworks = [\"{}\"]\nregion = \"{}\"\n",
        PROPERTY_PIN.0, PROPERTY_PIN.1
    ));
    let g = geo(&extra).await;
    let s = &g.server;

    // Every network asked about: the database's, the overrides', and ranges
    // nothing covers.
    let mut pool: Vec<ipnet::IpNet> = db.iter().map(|n| n.net).collect();
    pool.extend(overrides.iter().map(|o| o.0));
    for uncovered in ["127.0.0.0/8", "172.16.0.0/12", "2001:db8:ff00::/40"] {
        pool.push(uncovered.parse().unwrap());
    }
    let mut seed: u64 = 0x5eed_1234_abcd_0042;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut drained = [false; 4];
    let mut seen = Seen::default();
    for i in 0..4000u32 {
        if i % 200 == 0 {
            // Regions go down and come back: backends killed and restored
            // under real probes, and operator drains (live when the call
            // returns). Every fourth phase drains both EU regions.
            for (r, region) in g.regions.iter().enumerate() {
                let drain = if (i / 200) % 4 == 1 && r < 2 {
                    true
                } else {
                    rand() % 3 == 0
                };
                if drain != drained[r] {
                    set_drained(s, REGIONS[r].0, drain).await;
                    drained[r] = drain;
                    seen.changes += 1;
                }
                let fault = if rand() % 3 == 0 {
                    inferdns::demo::Fault::Down
                } else {
                    inferdns::demo::Fault::None
                };
                if fault != region.fault() {
                    region.set_fault(fault);
                    seen.changes += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let net = pool[(rand() as usize) % pool.len()];
        let asked = random_subnet(net, &mut rand);
        // What the server looks at: the source prefix cut to max-prefix
        // (v4 32 in these tests, v6 56 by default).
        let max = if asked.addr().is_ipv4() { 32 } else { 56 };
        let used = ipnet::IpNet::new(asked.addr(), asked.prefix_len().min(max))
            .unwrap()
            .trunc();
        let service = if i % 2 == 0 { "chat" } else { "strict" };
        let m = ask_ecs(
            s,
            &format!("{service}.inference.example.com."),
            Some(ClientSubnet::new(asked.addr(), asked.prefix_len(), 0)),
        )
        .await;
        seen.total += 1;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{asked}");
        let (answer, ecs) = read(&m);
        let (echo_source, scope) = ecs.expect("ECS echoed");
        assert_eq!(echo_source, asked.prefix_len());
        if answer.is_empty() {
            seen.empty += 1;
        } else {
            seen.answered += 1;
        }
        let expected = expect(used, &db, &overrides);
        let (country, eu, deciding) = match expected {
            Expect::Spans => {
                assert!(
                    answer.is_empty(),
                    "{asked} spans networks but got {answer:?}"
                );
                assert_eq!(scope, used.prefix_len(), "{asked} spans networks");
                seen.spanning += 1;
                continue;
            }
            Expect::Placed {
                country,
                eu,
                deciding,
            } => (country, eu, deciding),
        };
        seen.places
            .insert(country.clone().unwrap_or("unknown".into()));
        // Jurisdiction: no answer outside what the client may use.
        let allow = allowed(service, country.as_deref(), eu);
        for ip in &answer {
            let region = REGIONS.iter().find(|r| r.1 == ip).unwrap();
            assert!(
                allow.is_none_or(|a| a.contains(&region.5)),
                "{service}: client {asked} ({country:?}, eu {eu}) was sent to {} ({})",
                region.0,
                region.5
            );
        }
        if allow == Some(&["eu"][..]) {
            if drained[0] && drained[1] {
                // No EU region fit: NODATA, never a region elsewhere.
                assert!(answer.is_empty(), "{service}: {asked}: {answer:?}");
                assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
                seen.eu_without_eu_region += 1;
            } else if !answer.is_empty()
                && country
                    .as_deref()
                    .is_some_and(|c| !EU_GROUP[..27].contains(&c))
            {
                seen.territories_answered += 1;
            }
        }
        // Scope: inside the deciding network, inside the subnet asked, and
        // clear of every other override (and database network): a resolver
        // reuses the answer for the whole scope.
        assert!(scope <= used.prefix_len(), "{asked}: scope /{scope}");
        if let Some((n, _)) = deciding {
            assert!(
                scope >= n.prefix_len(),
                "{asked}: scope /{scope} wider than the deciding network {n}"
            );
        }
        let block = ipnet::IpNet::new(used.addr(), scope).unwrap().trunc();
        let deciding_net = deciding.map(|d| d.0);
        let by_override = deciding.is_some_and(|d| d.1);
        for (o, _) in &overrides {
            assert!(
                Some(*o) == deciding_net || !block.contains(o),
                "{asked}: scope {block} holds the override {o}"
            );
        }
        let clear = |block: &ipnet::IpNet| {
            overrides
                .iter()
                .all(|(o, _)| Some(*o) == deciding_net || !block.contains(o))
                && (by_override
                    || db
                        .iter()
                        .all(|n| Some(n.net) == deciding_net || !block.contains(&n.net)))
        };
        assert!(
            clear(&block),
            "{asked}: scope {block} holds another network"
        );
        // ... and no narrower than that: the widest such prefix, found by
        // trying each one from the deciding network's down to the subnet's.
        let widest = (deciding_net.map_or(0, |n| n.prefix_len())..=used.prefix_len())
            .find(|&l| clear(&ipnet::IpNet::new(used.addr(), l).unwrap().trunc()))
            .unwrap();
        assert_eq!(scope, widest, "{asked}: the widest true scope");
    }
    eprintln!("residency: {seen:?}");
    assert!(
        seen.answered > 600 && seen.empty > 300 && seen.spanning > 300,
        "both outcomes were exercised: {seen:?}"
    );
    assert!(
        seen.eu_without_eu_region > 200 && seen.territories_answered > 100 && seen.changes > 20,
        "{seen:?}"
    );
    for place in [
        "AX", "MQ", "RE", "GI", "MF", "IC", "EA", "GP", "NO", "GL", "BL", "CH", "US", "unknown",
    ] {
        assert!(seen.places.contains(place), "{place} never asked: {seen:?}");
    }
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

/// The four regions on loopback with a `[geoip]` section naming `db`,
/// checked every `check_interval`: (config text, the running regions).
async fn regions_with_db(db: &std::path::Path, check_interval: &str) -> (String, Vec<SimRegion>) {
    let mut regions = Vec::new();
    let mut text = format!(
        "[geoip]\ndatabase = \"{}\"\ncheck-interval = \"{check_interval}\"\n",
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
    (text, regions)
}

/// `near` A for the DE test subnet 192.0.2.0/24.
async fn ask_near(dns: std::net::SocketAddr) -> Message {
    let mut m = Ask::new("near.inference.example.com.", RecordType::A).message();
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    edns.options_mut()
        .insert(EdnsOption::Subnet(subnet("192.0.2.0/24")));
    m.set_edns(edns);
    let bytes = exchange_udp(dns, &m.to_vec().unwrap(), Duration::from_secs(2))
        .await
        .unwrap();
    Message::from_vec(&bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_database_is_swapped_in_and_a_broken_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("city.mmdb");
    std::fs::write(&db, tiny_db("192.0.2.0/24", "DE", "EU", 50.11, 8.68)).unwrap();
    let (mut text, regions) = regions_with_db(&db, "1s").await;
    text.push_str("[services.near]\ntiers = [[\"eu-central\", \"us-east\"]]\nstrategy = \"proximity\"\nproximity-tolerance = \"1ms\"\n");
    let s = Server::start(&base_config(&text)).await;
    let near = |s: &Server| {
        let dns = s.dns();
        async move { answer_strings(&ask_near(dns).await) }
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

#[tokio::test]
async fn ipv4_mapped_subnets_are_located_as_ipv4_with_the_default_cuts() {
    // The default cuts: /24 for IPv4, /56 for IPv6. A mapped /120 or /128
    // is an IPv4 /24 or /32 cut to /24, not an IPv6 /56 (which would hold
    // every IPv4-mapped address and place nobody).
    let g = geo("[ecs]\n").await;
    let s = &g.server;
    for (subnet_text, expect) in [
        // 192.0.2.0/24 is DE in the test database.
        ("::ffff:192.0.2.0/120", (120, 120)),
        ("::ffff:192.0.2.77/128", (128, 120)),
    ] {
        let (answer, ecs) =
            read(&ask_ecs(s, "chat.inference.example.com.", Some(subnet(subnet_text))).await);
        assert!(
            !answer.is_empty() && answer.iter().all(|a| EU_REGIONS.contains(&a.as_str())),
            "{subnet_text}: {answer:?}"
        );
        assert_eq!(ecs, Some(expect), "{subnet_text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_while_the_database_file_is_broken_keeps_the_database_in_use() {
    // geoipupdate left a truncated file behind; an operator then reloads a
    // policy change. The change applies; the database in use stays (as the
    // file watcher does), rather than the whole reload being refused.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("city.mmdb");
    std::fs::write(&db, tiny_db("192.0.2.0/24", "DE", "EU", 50.11, 8.68)).unwrap();
    // The watcher looks only once an hour: the reload alone meets the file.
    let (text, regions) = regions_with_db(&db, "1h").await;
    let service = |ttl: u32| {
        format!(
            "[services.near]\ntiers = [[\"eu-central\", \"us-east\"]]\nstrategy = \"proximity\"\nproximity-tolerance = \"1ms\"\nttl = {ttl}\n"
        )
    };
    let main = base_config(&format!("{text}{}", service(30)));
    let s = Server::start_with_token(&main, TOKEN).await;
    let near = |s: &Server| ask_near(s.dns());
    assert_eq!(answer_strings(&near(&s).await), ["127.0.0.71"]);
    let good = tiny_db("192.0.2.0/24", "US", "NA", 38.9, -77.04);
    let staged = dir.path().join("city.mmdb.new");
    std::fs::write(&staged, &good[..good.len() / 2]).unwrap();
    std::fs::rename(&staged, &db).unwrap();
    // The policy change: TTL 30 -> 17.
    let changed = base_config(&format!("{text}{}", service(17)))
        .replace("[server]\n", "[server]\nadmin-token-file = \"token\"\n");
    s.files.write("inferdns.toml", &changed);
    let reload = format!("http://{}/v1/reload", s.running.admin);
    let metrics_url = format!("http://{}/metrics", s.running.admin);
    let (code, body) = http("POST", &reload, Some(TOKEN), None).await;
    assert_eq!(code, 200, "reload refused: {body}");
    let m = near(&s).await;
    assert_eq!(answer_strings(&m), ["127.0.0.71"], "still the DE database");
    assert_eq!(m.answers[0].ttl, 17, "the policy change applied");
    let metrics = http("GET", &metrics_url, None, None).await.1;
    assert!(
        metrics.contains("inferdns_geoip_loads_total{result=\"failure\"} 1"),
        "the broken file is counted once"
    );
    // A second reload does not read (or count) the same broken file again.
    let (code, _) = http("POST", &reload, Some(TOKEN), None).await;
    assert_eq!(code, 200);
    let metrics = http("GET", &metrics_url, None, None).await.1;
    assert!(metrics.contains("inferdns_geoip_loads_total{result=\"failure\"} 1"));
    drop(regions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_is_published_while_a_reload_still_loads_its_geoip_database() {
    // The reload moves the database to a named pipe: its load blocks (in
    // the reloader, on a blocking thread) until the test writes the bytes.
    // A region dies meanwhile; the failover must not wait for the reload.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("city.mmdb");
    let bytes = tiny_db("192.0.2.0/24", "DE", "EU", 50.11, 8.68);
    std::fs::write(&db, &bytes).unwrap();
    let (text, regions) = regions_with_db(&db, "1h").await;
    let text = text.replace("jurisdictions", &format!("{FAST_PROBE}\njurisdictions"));
    let service = "[services.near]\ntiers = [[\"eu-central\"], [\"us-east\"]]\n";
    let main = base_config(&format!("{text}{service}"));
    let s = Server::start_with_token(&main, TOKEN).await;
    assert_eq!(answer_strings(&ask_near(s.dns()).await), ["127.0.0.71"]);

    let pipe = dir.path().join("slow.mmdb");
    let made = std::process::Command::new("mkfifo")
        .arg(&pipe)
        .status()
        .unwrap();
    assert!(made.success());
    let moved = base_config(&format!(
        "{}{service}",
        text.replace(&db.display().to_string(), &pipe.display().to_string())
    ))
    .replace("[server]\n", "[server]\nadmin-token-file = \"token\"\n");
    s.files.write("inferdns.toml", &moved);
    let reload_url = format!("http://{}/v1/reload", s.running.admin);
    let reload = tokio::spawn(async move { http("POST", &reload_url, Some(TOKEN), None).await });
    // The load has the pipe open for reading once a writer can open it
    // without blocking (ENXIO until then).
    let writer = {
        let pipe = pipe.clone();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::OpenOptionsExt;
            for _ in 0..1000 {
                if let Ok(f) = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&pipe)
                {
                    return f;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            panic!("the reload never opened the GeoIP file");
        })
        .await
        .unwrap()
    };
    regions[0].set_fault(inferdns::demo::Fault::Down);
    s.wait_answer(
        "near.inference.example.com.",
        &["127.0.0.73"],
        Duration::from_secs(10),
    )
    .await;
    assert!(
        !reload.is_finished(),
        "the reload cannot have finished: its database is not written yet"
    );
    // The bytes arrive; the reload completes with the database from the pipe.
    tokio::task::spawn_blocking(move || {
        let mut writer = writer;
        std::io::Write::write_all(&mut writer, &bytes).unwrap();
    })
    .await
    .unwrap();
    let (code, body) = reload.await.unwrap();
    assert_eq!(code, 200, "reload refused: {body}");
    assert_eq!(answer_strings(&ask_near(s.dns()).await), ["127.0.0.73"]);
    drop(regions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_read_the_geoip_file_only_when_it_changed_and_check_it_only_when_its_bytes_did() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("city.mmdb");
    let de = tiny_db("192.0.2.0/24", "DE", "EU", 50.11, 8.68);
    std::fs::write(&db, &de).unwrap();
    // The watcher looks only once an hour: the reloads alone meet the file.
    let (text, regions) = regions_with_db(&db, "1h").await;
    let service = "[services.near]\ntiers = [[\"eu-central\", \"us-east\"]]\nstrategy = \"proximity\"\nproximity-tolerance = \"1ms\"\n";
    let main = base_config(&format!("{text}{service}"));
    let s = Server::start_with_token(&main, TOKEN).await;
    let reload_url = format!("http://{}/v1/reload", s.running.admin);
    let metrics_url = format!("http://{}/metrics", s.running.admin);
    let loads = || async {
        let metrics = http("GET", &metrics_url, None, None).await.1;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("inferdns_geoip_loads_total{result=\"success\"} "))
            .map(|v| v.trim().to_string())
    };
    let reload = || async {
        let (code, body) = http("POST", &reload_url, Some(TOKEN), None).await;
        assert_eq!(code, 200, "reload refused: {body}");
    };
    assert_eq!(loads().await.as_deref(), Some("1"), "the load at start");
    // Unchanged: not read again.
    reload().await;
    assert_eq!(loads().await.as_deref(), Some("1"));
    // The same bytes renamed into place (another inode): read, compared,
    // not checked or counted as a load.
    let staged = dir.path().join("city.mmdb.new");
    std::fs::write(&staged, &de).unwrap();
    std::fs::rename(&staged, &db).unwrap();
    reload().await;
    assert_eq!(loads().await.as_deref(), Some("1"));
    assert_eq!(answer_strings(&ask_near(s.dns()).await), ["127.0.0.71"]);
    // Other bytes with the very same size and modification time (as `cp -p`
    // or `rsync -a` leave them): the key still differs (inode, ctime).
    let us = tiny_db("192.0.2.0/24", "US", "NA", 38.9, -77.04);
    assert_eq!(us.len(), de.len(), "the fixture sizes match");
    let mtime = std::fs::metadata(&db).unwrap().modified().unwrap();
    std::fs::write(&staged, &us).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&staged)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    std::fs::rename(&staged, &db).unwrap();
    reload().await;
    assert_eq!(
        loads().await.as_deref(),
        Some("2"),
        "the new database loaded"
    );
    assert_eq!(answer_strings(&ask_near(s.dns()).await), ["127.0.0.73"]);
    drop(regions);
}
