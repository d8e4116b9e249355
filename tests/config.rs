//! Configuration errors: each is reported as file:line:col with a clear
//! message, all at once; good configs (including the shipped example) load.

mod common;

use common::{Files, TEN_MISTAKES_REPORT, ZONE, base_config, write_ten_mistakes};
use inferdns::config::{self, AllDown, ConfigError, Target};

fn load_errors(main: &str, zone: &str, policies: &[(&str, &str)]) -> (Files, Vec<ConfigError>) {
    let files = Files::new();
    files.write("zone.db", zone);
    for (name, text) in policies {
        files.write(&format!("policies/{name}"), text);
    }
    let path = files.write("inferdns.toml", main);
    let errors = match config::load(&path) {
        Ok(_) => Vec::new(),
        Err(e) => e.0,
    };
    (files, errors)
}

/// Asserts one error at `file:line:col` whose message contains `needle`.
fn has(errors: &[ConfigError], file: &str, line: usize, col: usize, needle: &str) {
    let found = errors.iter().any(|e| {
        e.file.file_name().and_then(|f| f.to_str()) == Some(file)
            && (e.line, e.col) == (line, col)
            && e.message.contains(needle)
    });
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert!(
        found,
        "no {file}:{line}:{col} error containing {needle:?} in:\n{}",
        shown.join("\n")
    );
}

/// Line and column (1-based) of the first occurrence of `needle` in `text`.
fn pos(text: &str, needle: &str) -> (usize, usize) {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in the config"));
    let line = text[..at].matches('\n').count() + 1;
    let col = at - text[..at].rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

const REGIONS: &str = r#"
[regions.us-east]
endpoints = [{ address = "192.0.2.1", port = 8000 }]
[regions.us-west]
endpoints = [{ address = "192.0.2.2" }, { cname = "gw.provider.example.net", probe-address = "198.51.100.7", port = 443 }]
probe = { scheme = "https", tls-server-name = "gw.provider.example.net", interval = "1s", timeout = "750ms", rise = 3, fall = 4 }
"#;

#[test]
fn a_good_config_compiles_to_the_runtime_model() {
    let main = base_config(&format!(
        "policy-dir = \"policies\"\n{REGIONS}\n[services.chat]\ntiers = [[\"us-east\"], [\"us-west\"]]\nttl = 15\nwhen-all-down = \"servfail\"\nlast-known-good = \"3s\"\n"
    ))
    // policy-dir must be a top-level key: move it above [server].
    .replace("policy-dir = \"policies\"\n", "");
    let main = format!("policy-dir = \"policies\"\n{main}");
    let files = Files::new();
    files.write("zone.db", ZONE);
    files.write(
        "policies/batch.toml",
        "name = \"batch.eu\"\ntiers = [[\"us-west\"]]\n",
    );
    let config = config::load(&files.write("inferdns.toml", &main)).unwrap();
    assert_eq!(config.regions.len(), 2);
    let west = &config.regions[1];
    assert_eq!(
        west.endpoints[1].target,
        Target::Cname("gw.provider.example.net.".parse().unwrap())
    );
    let probe = &west.endpoints[1].probe;
    assert_eq!(probe.addr, "198.51.100.7:443".parse().unwrap());
    assert_eq!((probe.rise, probe.fall), (3, 4));
    assert_eq!(probe.interval, std::time::Duration::from_secs(1));
    assert_eq!(probe.host.as_deref(), Some("gw.provider.example.net"));
    assert_eq!(
        west.endpoints[0].probe.addr.port(),
        443,
        "https defaults to 443"
    );
    assert_eq!(config.regions[0].endpoints[0].probe.path, "/health");
    let names: Vec<String> = config.services.iter().map(|s| s.name.to_string()).collect();
    assert_eq!(
        names,
        [
            "chat.inference.example.com.",
            "batch.eu.inference.example.com."
        ]
    );
    assert_eq!(config.services[0].when_all_down, AllDown::ServFail);
    assert_eq!(config.services[0].tiers, vec![vec![0], vec![1]]);
    assert_eq!(config.services[1].ttl, 30);
    assert_eq!(
        config.services[0].last_known_good,
        std::time::Duration::from_secs(3),
        "set"
    );
    assert_eq!(
        config.services[1].last_known_good,
        std::time::Duration::from_secs(30),
        "the default hold"
    );
    // Zone file records plus the glue of ns1 (one A, one AAAA).
    assert!(config.zone.records.len() > 8);
}

#[test]
fn the_shipped_example_config_checks() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("inferdns.toml");
    let config = config::load(&path).unwrap_or_else(|e| panic!("inferdns.toml:\n{e}"));
    assert!(!config.services.is_empty());
}

#[test]
fn toml_syntax_and_unknown_keys_point_at_the_spot() {
    let main = base_config(REGIONS).replace(
        "startup-grace = \"3s\"",
        "startup-grace = \"3s\"\nlisten-dns = 1",
    );
    let (_f, errors) = load_errors(&main, ZONE, &[]);
    let (line, _) = pos(&main, "listen-dns");
    assert_eq!(errors.len(), 1);
    has(
        &errors,
        "inferdns.toml",
        line,
        1,
        "unknown field `listen-dns`",
    );

    let broken = base_config("[regions.x\n");
    let (_f, errors) = load_errors(&broken, ZONE, &[]);
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].line > 1 && errors[0].file.ends_with("inferdns.toml"),
        "{:?}",
        errors[0]
    );
}

#[test]
fn every_semantic_error_is_reported_at_once() {
    let extra = r#"
[regions.us-east]
endpoints = [{ address = "192.0.2.300" }, { address = "192.0.2.1", cname = "x.example.net" }]
probe = { interval = "10ms", timeout = "soon", fall = 0, path = "health" }

[regions.us-west]
endpoints = [{ address = "192.0.2.2" }, { address = "192.0.2.2" }, { cname = "gw.example.net" }]
probe = { tls-server-name = "gw.example.net" }

[services.chat]
tiers = [["us-east"], ["eu-west"], ["us-east"]]
ttl = 999999

[services.www]
tiers = [["us-west"]]

[services.other]
name = "chat"
tiers = [["us-west"]]
when-all-down = "maybe"
last-known-good = "10m"

[services.far]
name = "far.example.org."
tiers = [["us-west"]]
"#;
    let main = base_config(extra);
    let (_f, errors) = load_errors(&main, ZONE, &[]);
    let f = "inferdns.toml";
    let at = |needle: &str| pos(&main, needle);
    let (l, c) = at("\"192.0.2.300\"");
    has(&errors, f, l, c, "not an IPv4 or IPv6 address");
    let (l, c) = at("\"x.example.net\"");
    has(&errors, f, l, c, "either address or cname");
    let (l, c) = at("\"10ms\"");
    has(&errors, f, l, c, "probe interval 10ms is out of range");
    let (l, c) = at("\"soon\"");
    has(
        &errors,
        f,
        l,
        c,
        "probe timeout: expected a duration such as \"500ms\" or \"2s\", found \"soon\"",
    );
    let (l, c) = at("fall = 0");
    has(&errors, f, l, c + 7, "fall 0 is out of range");
    let (l, c) = at("\"health\"");
    has(&errors, f, l, c, "must start with '/'");
    let (l, _) = at("{ address = \"192.0.2.2\" }, { address = \"192.0.2.2\" }");
    assert!(
        errors
            .iter()
            .any(|e| e.line == l && e.message.contains("lists endpoint 192.0.2.2 twice"))
    );
    assert!(
        errors
            .iter()
            .any(|e| e.line == l && e.message.contains("needs probe-address"))
    );
    let (l, c) = at("tls-server-name = \"gw");
    has(
        &errors,
        f,
        l,
        c + 18,
        "tls-server-name needs scheme = \"https\"",
    );
    let (l, c) = at("\"eu-west\"");
    has(&errors, f, l, c, "unknown region \"eu-west\"");
    let (l, c) = at("\"us-east\"]]");
    has(&errors, f, l, c, "region us-east appears twice");
    let (l, c) = at("999999");
    has(&errors, f, l, c, "ttl 999999 is out of range");
    let (l, c) = at("\"maybe\"");
    has(&errors, f, l, c, "not one of fail-open, nodata, servfail");
    let (l, c) = at("\"10m\"");
    has(
        &errors,
        f,
        l,
        c,
        "last-known-good 10m is out of range (0s..=5m)",
    );
    let (l, c) = at("\"far.example.org.\"");
    has(&errors, f, l, c, "must be below the apex");
    // www is a zone-file name; `other` reuses chat's name (reported at its table header).
    assert!(errors.iter().any(|e| {
        e.message
            .contains("service www name www.inference.example.com. collides")
    }));
    let other_line = at("[services.other]").0;
    assert!(
        errors.iter().any(|e| e.line == other_line
            && e.message
                .contains("same name chat.inference.example.com. as service chat")),
        "{errors:#?}"
    );
    assert!(
        errors.len() >= 15,
        "all problems at once, got {}",
        errors.len()
    );
}

#[test]
fn zone_and_ns_errors_name_their_file() {
    let zone =
        "$ORIGIN inference.example.com.\n$TTL 300\nwww IN A 192.0.2.80\nns1 IN A 192.0.2.53\n";
    let (_f, errors) = load_errors(&base_config(""), zone, &[]);
    has(
        &errors,
        "zone.db",
        4,
        1,
        "has addresses in [[zone.ns]] already",
    );

    let bad_zone = "$TTL 300\nwww IN A 192.0.2.80\nweb IN AAAA 192.0.2.1\n";
    let (_f, errors) = load_errors(&base_config(""), bad_zone, &[]);
    has(&errors, "zone.db", 3, 1, "zone file does not parse");

    let main = base_config("").replace(
        "name = \"ns.example.net\"",
        "name = \"ns.example.net\"\naddresses = [\"192.0.2.9\"]",
    );
    let (_f, errors) = load_errors(&main, ZONE, &[]);
    let (l, c) = pos(&main, "\"192.0.2.9\"");
    has(
        &errors,
        "inferdns.toml",
        l,
        c,
        "outside the zone; glue addresses are only for names inside it",
    );

    let main = base_config("").replace("addresses = [\"192.0.2.53\", \"2001:db8::53\"]\n", "");
    let (_f, errors) = load_errors(&main, ZONE, &[]);
    let (l, c) = pos(&main, "name = \"ns1.");
    has(&errors, "inferdns.toml", l, c + 7, "needs glue");

    let main = base_config("").replace("file = \"zone.db\"", "file = \"missing.db\"");
    let (_f, errors) = load_errors(&main, ZONE, &[]);
    has(
        &errors,
        "inferdns.toml",
        pos(&main, "\"missing.db\"").0,
        pos(&main, "\"missing.db\"").1,
        "cannot read",
    );

    let main = base_config("").replace("minimum = 60", "minimum = 100000");
    let (_f, errors) = load_errors(&main, ZONE, &[]);
    has(
        &errors,
        "inferdns.toml",
        pos(&main, "100000").0,
        pos(&main, "100000").1,
        "zone.soa.minimum 100000 is out of range",
    );
}

#[test]
fn policy_file_errors_name_the_policy_file() {
    let main = format!("policy-dir = \"policies\"\n{}", base_config(REGIONS));
    let (_f, errors) = load_errors(
        &main,
        ZONE,
        &[
            ("good.toml", "tiers = [[\"us-east\"]]\n"),
            (
                "typo.toml",
                "tiers = [[\"us-east\"]]\nttl = 30\nwhen_all_down = \"nodata\"\n",
            ),
            (
                "refs.toml",
                "# comment\ntiers = [[\"us-east\", \"mars\"]]\n",
            ),
            ("Bad_Name.toml", "tiers = [[\"us-east\"]]\n"),
        ],
    );
    has(&errors, "typo.toml", 3, 1, "unknown field `when_all_down`");
    has(&errors, "refs.toml", 2, 22, "unknown region \"mars\"");
    has(&errors, "Bad_Name.toml", 1, 1, "service id \"Bad_Name\"");
    assert_eq!(errors.len(), 3, "{errors:#?}");

    let main = format!("policy-dir = \"nowhere\"\n{}", base_config(REGIONS));
    let (_f, errors) = load_errors(&main, ZONE, &[]);
    has(
        &errors,
        "inferdns.toml",
        1,
        14,
        "cannot read policy directory",
    );
}

#[test]
fn listen_addresses_must_have_ports() {
    let main = base_config("").replace(
        "admin-listen = \"127.0.0.1:0\"",
        "admin-listen = \"localhost\"",
    );
    let (_f, errors) = load_errors(&main, ZONE, &[]);
    let (l, c) = pos(&main, "\"localhost\"");
    has(&errors, "inferdns.toml", l, c, "not an address with a port");
}

#[test]
fn names_that_would_misbehave_are_refused() {
    let extra = r#"
[regions.r]
endpoints = [{ address = "192.0.2.1" }, { cname = "missing.inference.example.com", probe-address = "192.0.2.2" }]

[regions.tls]
endpoints = [{ address = "192.0.2.3" }]
probe = { scheme = "https" }

[services.star]
name = "*.eu"
tiers = [["r"]]

[services.explained]
name = "_explain.x"
tiers = [["r"]]
"#;
    let main = base_config(extra).replace(
        "[[zone.ns]]\nname = \"ns.example.net\"",
        "[[zone.ns]]\nname = \"ns.example.net\"\n\n[[zone.ns]]\nname = \"ns.example.net\"\n\n[[zone.ns]]\nname = \"ns2\"",
    );
    let (_f, errors) = load_errors(&main, ZONE, &[]);
    let f = "inferdns.toml";
    let (l, c) = pos(&main, "\"missing.inference");
    has(
        &errors,
        f,
        l,
        c,
        "is inside the zone but no record in the zone file has that name",
    );
    let (l, _) = pos(&main, "{ address = \"192.0.2.3\" }");
    assert!(
        errors
            .iter()
            .any(|e| e.line == l && e.message.contains("need tls-server-name")),
        "{errors:#?}"
    );
    let (l, c) = pos(&main, "\"*.eu\"");
    has(&errors, f, l, c, "cannot have a '*' or '_explain' label");
    let (l, c) = pos(&main, "\"_explain.x\"");
    has(&errors, f, l, c, "cannot have a '*' or '_explain' label");
    assert!(
        errors.iter().any(|e| e
            .message
            .contains("name server ns.example.net. is listed twice")),
        "{errors:#?}"
    );
    let (l, c) = pos(&main, "\"ns2\"");
    has(&errors, f, l, c, "single label");

    let zone = format!("{ZONE}ns1 IN CNAME www\n");
    let (_f, errors) = load_errors(&base_config(""), &zone, &[]);
    assert!(
        errors
            .iter()
            .any(|e| e.message.contains("remove its CNAME here")),
        "{errors:#?}"
    );
}

#[test]
fn contradictory_or_unservable_residency_rules_are_refused() {
    let db = concat!(env!("CARGO_MANIFEST_DIR"), "/geoip/test-city.mmdb");
    let extra = format!(
        r#"
[geoip]
database = "{db}"

[groups]
dach = ["DE", "AT", "CH"]
bad = ["Germany"]

[regions.eu]
endpoints = [{{ address = "192.0.2.1" }}]
location = {{ country = "DE", lat = 50.1, lon = 8.7 }}
jurisdictions = ["eu"]

[regions.us]
endpoints = [{{ address = "192.0.2.2" }}]
jurisdictions = ["us"]

[services.chat]
tiers = [["eu", "us"]]
strategy = "proximity"
residency = {{ rules = [{{ clients = ["eu"], allow = ["eu"] }}, {{ clients = ["dach"], allow = ["us"] }}, {{ clients = ["mars", "continent:XX"], allow = ["apac"] }}], unknown-location = "maybe", without-ecs = "guess" }}

[services.fine]
tiers = [["eu", "us"]]
residency = {{ rules = [{{ clients = ["eu"], allow = ["eu"] }}, {{ clients = ["DE"], allow = ["eu"] }}, {{ clients = ["continent:NA"], allow = ["us"] }}] }}

[[overrides]]
networks = ["10.0.0.0/8", "not-a-net"]
region = "us"
"#
    );
    let main = base_config(&extra);
    let (_f, errors) = load_errors(&main, ZONE, &[]);
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let text = messages.join("\n");
    // DE is in `eu` (rule 1) and in `dach` (rule 2) with another allow list.
    assert!(
        text.contains(
            "residency rules contradict: country DE is in rule 1 (as eu) and in rule 2 (as dach)"
        ),
        "{text}"
    );
    assert!(text.contains("country AT is in rule 1"), "{text}");
    // Rule 2 of `fine` repeats DE with the same allow list: redundant, not contradictory.
    assert!(!text.contains("rule 2 (as DE)"), "{text}");
    assert!(
        text.contains("\"mars\" is not a country (DE), a continent (continent:EU) or a group"),
        "{text}"
    );
    assert!(text.contains("\"XX\" is not a continent code"), "{text}");
    assert!(
        text.contains("no region of this service carries jurisdiction \"apac\""),
        "{text}"
    );
    assert!(
        text.contains("\"maybe\" is not \"any\", \"deny\" or a list of jurisdictions"),
        "{text}"
    );
    assert!(
        text.contains("without-ecs \"guess\" is not resolver or unknown"),
        "{text}"
    );
    assert!(
        text.contains("strategy proximity needs a location for region us"),
        "{text}"
    );
    assert!(
        text.contains("\"Germany\" is not a two-letter country code"),
        "{text}"
    );
    assert!(
        text.contains("region us has no location to pin clients to"),
        "{text}"
    );
    let (l, c) = pos(&main, "\"dach\"]");
    has(&errors, "inferdns.toml", l, c, "residency rules contradict");

    // Residency and proximity need a GeoIP database; a broken one is refused.
    let main = base_config(
        "[regions.eu]\nendpoints = [{ address = \"192.0.2.1\" }]\njurisdictions = [\"eu\"]\nlocation = { lat = 50.0, lon = 8.0 }\n[services.chat]\ntiers = [[\"eu\"]]\nstrategy = \"proximity\"\nresidency = { rules = [{ clients = [\"eu\"], allow = [\"eu\"] }] }\n",
    );
    let (_f, errors) = load_errors(&main, ZONE, &[]);
    let text: String = errors.iter().map(|e| e.message.clone() + "\n").collect();
    assert!(
        text.contains("strategy proximity needs [geoip] database"),
        "{text}"
    );
    assert!(
        text.contains("residency rules need [geoip] database"),
        "{text}"
    );
    let files = Files::new();
    files.write("zone.db", ZONE);
    files.write("broken.mmdb", "not a database");
    let path = files.write(
        "inferdns.toml",
        &format!("[geoip]\ndatabase = \"broken.mmdb\"\n{}", base_config("")),
    );
    let errors = config::load(&path).unwrap_err().0;
    assert!(
        errors[0]
            .message
            .contains("is not a valid MaxMind database"),
        "{errors:?}"
    );
    assert_eq!((errors[0].line, errors[0].col), (2, 12));
}

#[test]
fn fallback_loops_and_unknown_fallbacks_are_refused() {
    let extra = r#"
[regions.r]
endpoints = [{ address = "192.0.2.1" }]
probe = { models-path = "/v1/models", completion = { model = "m" }, api-key-env = "INFERDNS_TEST_UNSET_VARIABLE", kind = "tcp" }

[services.a]
model = "big"
tiers = [["r"]]
fallback = "b"

[services.b]
model = "medium"
tiers = [["r"]]
fallback = "c"

[services.c]
model = "small"
tiers = [["r"]]
fallback = "a"

[services.d]
tiers = [["r"]]
fallback = "nowhere"

[services.e]
tiers = [["r"]]
fallback = "e"

[services.f]
tiers = [["r"]]
fallback = "g"

[services.g]
tiers = [["r"]]
fallback = "h"

[services.h]
tiers = [["r"]]
fallback = "g"
"#;
    let (_f, errors) = load_errors(&base_config(extra), ZONE, &[]);
    let text: Vec<String> = errors.iter().map(|e| e.message.clone()).collect();
    let text = text.join("\n");
    assert!(text.contains("fallback loop: a -> b -> c -> a"), "{text}");
    // f leads into a loop it is not part of: the loop is reported once,
    // from its first service.
    assert!(text.contains("fallback loop: g -> h -> g"), "{text}");
    assert_eq!(
        errors
            .iter()
            .filter(|e| e.message.starts_with("fallback loop"))
            .count(),
        2,
        "{text}"
    );
    let main = base_config(extra);
    let (l, c) = pos(&main, "\"b\"\n\n[services.b]");
    has(&errors, "inferdns.toml", l, c, "fallback loop");
    assert!(
        text.contains("service d falls back to unknown service \"nowhere\""),
        "{text}"
    );
    assert!(
        text.contains("service e cannot fall back to itself"),
        "{text}"
    );
    assert!(
        text.contains("environment variable INFERDNS_TEST_UNSET_VARIABLE is not set"),
        "{text}"
    );
    assert!(
        text.contains("a tcp probe cannot read models or completions"),
        "{text}"
    );
}

#[test]
fn fall_refused_defaults_to_one_and_is_range_checked() {
    let files = Files::new();
    files.write("zone.db", ZONE);
    let main = base_config(&format!(
        "{REGIONS}\n[services.chat]\ntiers = [[\"us-east\"], [\"us-west\"]]\n"
    ));
    let config = config::load(&files.write("inferdns.toml", &main)).unwrap();
    let probe = &config.regions[0].endpoints[0].probe;
    assert_eq!((probe.fall, probe.fall_refused), (2, 1));
    let main = main.replace(
        "rise = 3, fall = 4 }",
        "rise = 3, fall = 4, fall-refused = 3 }",
    );
    let config = config::load(&files.write("inferdns.toml", &main)).unwrap();
    assert_eq!(config.regions[1].endpoints[0].probe.fall_refused, 3);
    let bad = main.replace("fall-refused = 3", "fall-refused = 0");
    let (_files, errors) = load_errors(&bad, ZONE, &[]);
    let (line, col) = pos(&bad, "fall-refused = 0");
    let col = col + "fall-refused = ".len();
    has(
        &errors,
        "inferdns.toml",
        line,
        col,
        "fall-refused 0 is not in 1..=100",
    );
}

#[test]
fn ten_mistakes_in_three_files_are_reported_in_one_run() {
    let files = Files::new();
    let path = write_ten_mistakes(&files);
    let errors = config::load(&path).unwrap_err().0;
    let dir = format!("{}/", files.dir.path().display());
    let shown: Vec<String> = errors
        .iter()
        .map(|e| e.to_string().replace(&dir, ""))
        .collect();
    assert_eq!(shown, TEN_MISTAKES_REPORT, "\n{}", shown.join("\n"));
}

#[test]
fn a_value_that_does_not_parse_is_reported_once_without_follow_ups() {
    // us-east is defined twice, us-west's port is out of range: services
    // naming them get no "unknown region"; a policy file that does not
    // parse reports its first syntax error only, the others are checked.
    let extra = r#"
[regions.us-east]
endpoints = [{ address = "192.0.2.1" }]

[regions.us-west]
endpoints = [{ address = "192.0.2.2", port = 65536 }]

[regions.us-east]
endpoints = [{ address = "192.0.2.3" }]
"#;
    let main = format!("policy-dir = \"policies\"\n{}", base_config(extra));
    let (files, errors) = load_errors(
        &main,
        ZONE,
        &[
            (
                "a.toml",
                "tiers = [[\"us-east\"], [\"us-west\"]]\nttl = 0\n",
            ),
            ("b.toml", "tiers = [[\"us-west\"]\nttl = 30\nnot valid\n"),
            (
                "c.toml",
                "tiers = [[\"us-west\"]]\nfallback = \"b\"\nttl = 0\n",
            ),
        ],
    );
    let first = pos(&main, "[regions.us-east]");
    let second = main.rfind("[regions.us-east]").unwrap();
    let second = main[..second].matches('\n').count() + 1;
    has(
        &errors,
        "inferdns.toml",
        second,
        10,
        &format!(
            "duplicate key `us-east`, already defined at {}:{}:10",
            files.dir.path().join("inferdns.toml").display(),
            first.0
        ),
    );
    let (l, c) = pos(&main, "65536");
    has(
        &errors,
        "inferdns.toml",
        l,
        c,
        "port: expected a port number 1-65535, found 65536",
    );
    has(&errors, "a.toml", 2, 7, "ttl 0 is out of range");
    has(
        &errors,
        "b.toml",
        2,
        1,
        "missing comma between array elements",
    );
    has(&errors, "c.toml", 3, 7, "ttl 0 is out of range");
    assert_eq!(errors.len(), 5, "{errors:#?}");

    // A main file that cannot be used at all still has its policy files read.
    let main = format!("policy-dir = \"policies\"\n{}", base_config(""))
        .replace("apex = \"inference.example.com\"", "apex = 5");
    let (_f, errors) = load_errors(
        &main,
        ZONE,
        &[("d.toml", "tiers = [[\"x\"]]\nttl_min = 5\n")],
    );
    let (l, c) = pos(&main, "5\n");
    has(
        &errors,
        "inferdns.toml",
        l,
        c,
        "apex: expected a quoted string, found 5",
    );
    has(
        &errors,
        "d.toml",
        2,
        1,
        "unknown field `ttl_min`; did you mean `ttl-min`?",
    );
    assert_eq!(errors.len(), 2, "{errors:#?}");
}

#[test]
fn fleet_mistakes_are_refused_where_they_are_written() {
    let main = base_config(
        r#"[regions.east]
endpoints = [{ address = "192.0.2.1" }]
[services.chat]
tiers = [["east"]]

[fleet]
edge = "edge-a"
quorum = "most"
pull-interval = "10ms"
peers = [{ name = "edge-a", url = "http://127.0.0.2:9153" }, { name = "edge-b", url = "ftp://127.0.0.3" }]
"#,
    );
    let (_files, errors) = load_errors(&main, ZONE, &[]);
    let at = |needle: &str| pos(&main, needle);
    let (l, c) = at("\"most\"");
    has(
        &errors,
        "inferdns.toml",
        l,
        c,
        "is not \"local\", \"any-up\", \"majority\"",
    );
    let (l, c) = at("\"10ms\"");
    has(
        &errors,
        "inferdns.toml",
        l,
        c,
        "fleet.pull-interval 10ms is out of range",
    );
    let (l, c) = at("\"edge-a\", url");
    has(&errors, "inferdns.toml", l, c, "this edge's own");
    let (l, c) = at("\"ftp://");
    has(
        &errors,
        "inferdns.toml",
        l,
        c,
        "not an http:// or https:// URL",
    );
    let (l, c) = at("{ name = \"edge-a\"");
    has(
        &errors,
        "inferdns.toml",
        l,
        c,
        "fleet peers need fleet.token-file",
    );

    // A quorum needs peers; a count cannot exceed the fleet.
    let main = base_config(
        "[regions.east]\nendpoints = [{ address = \"192.0.2.1\" }]\n[services.chat]\ntiers = [[\"east\"]]\n[fleet]\nquorum = \"majority\"\n",
    );
    let (_files, errors) = load_errors(&main, ZONE, &[]);
    let (l, c) = pos(&main, "\"majority\"");
    has(
        &errors,
        "inferdns.toml",
        l,
        c,
        "a fleet quorum needs [[fleet.peers]]",
    );
    let main = base_config(
        "[regions.east]\nendpoints = [{ address = \"192.0.2.1\" }]\n[services.chat]\ntiers = [[\"east\"]]\n[fleet]\nquorum = \"3\"\ntoken-file = \"token\"\npeers = [{ name = \"b\", url = \"http://127.0.0.2:9153\" }]\n",
    );
    let files = Files::new();
    files.write("zone.db", ZONE);
    files.write("token", "t0ken\n");
    let path = files.write("inferdns.toml", &main);
    let errors = config::load(&path).err().map(|e| e.0).unwrap_or_default();
    let (l, c) = pos(&main, "\"3\"");
    has(
        &errors,
        "inferdns.toml",
        l,
        c,
        "fleet.quorum 3 is out of range: the fleet has 2 edge(s)",
    );
}

#[test]
fn criticality_is_checked_and_sets_the_shed_rule() {
    let main = base_config(
        r#"[regions.east]
endpoints = [{ address = "192.0.2.1" }]
[services.chat]
tiers = [["east"]]
criticality = "vip"
[services.batch]
tiers = [["east"]]
criticality = "sheddable"
shed = "at-remove"
"#,
    );
    let (_files, errors) = load_errors(&main, ZONE, &[]);
    let (l, c) = pos(&main, "\"vip\"");
    has(
        &errors,
        "inferdns.toml",
        l,
        c,
        "criticality \"vip\" is not one of \"critical\", \"standard\", \"sheddable\"",
    );
    let (l, c) = pos(&main, "\"at-remove\"");
    has(
        &errors,
        "inferdns.toml",
        l,
        c,
        "shed and criticality = \"sheddable\": choose one",
    );

    let files = Files::new();
    files.write("zone.db", ZONE);
    let path = files.write(
        "inferdns.toml",
        &base_config(
            "[regions.east]\nendpoints = [{ address = \"192.0.2.1\" }]\n[services.batch]\ntiers = [[\"east\"]]\nstrategy = \"capacity\"\ncriticality = \"sheddable\"\n[services.vip]\ntiers = [[\"east\"]]\nstrategy = \"capacity\"\ncriticality = \"critical\"\n",
        ),
    );
    let config = config::load(&path).unwrap();
    let batch = &config.services[0];
    assert_eq!(batch.shed, inferdns::capacity::Shed::AtReduce);
    let w = batch.watermarks;
    assert!(
        (w.prepare - 0.65).abs() < 1e-9
            && (w.reduce - 0.75).abs() < 1e-9
            && (w.remove - 0.80).abs() < 1e-9,
        "{w:?}"
    );
    assert_eq!(config.services[1].shed, inferdns::capacity::Shed::Never);
}

#[test]
fn rollout_mistakes_are_refused_where_they_are_written() {
    let main = base_config(
        r#"[regions.east]
endpoints = [{ address = "192.0.2.1" }]
[services.chat]
tiers = [["east"]]
model = "chat"
rollout = { stable = "chat-v1", canary = "chat-v1", canary-share = "five", min-stable-regions = 2000, promote-after = "soon" }
[regions.west]
endpoints = [{ address = "192.0.2.2" }]
probe = { models-version-field = "revision" }
"#,
    );
    let (_files, errors) = load_errors(&main, ZONE, &[]);
    let at = |needle: &str| pos(&main, needle);
    let (l, c) = at("\"chat\"");
    has(
        &errors,
        "inferdns.toml",
        l,
        c,
        "model and rollout: choose one",
    );
    let (l, c) = at("canary = \"chat-v1\"");
    has(
        &errors,
        "inferdns.toml",
        l,
        c + 9,
        "rollout.canary must be another version",
    );
    let (l, c) = at("\"five\"");
    has(
        &errors,
        "inferdns.toml",
        l,
        c,
        "rollout.canary-share \"five\" is not a share",
    );
    let (l, c) = at("2000");
    has(
        &errors,
        "inferdns.toml",
        l,
        c,
        "rollout.min-stable-regions 2000 is out of range",
    );
    let (l, c) = at("\"soon\"");
    has(
        &errors,
        "inferdns.toml",
        l,
        c,
        "rollout.promote-after: expected a duration",
    );
    let (l, c) = at("\"revision\"");
    has(
        &errors,
        "inferdns.toml",
        l,
        c,
        "models-version-field needs models-path",
    );
}

#[test]
fn a_large_policy_directory_read_on_every_cpu_keeps_its_files_order_and_every_error() {
    // Over 256 files: read and parsed on several threads, checked in order.
    let mut policies: Vec<(String, String)> = (0..600)
        .map(|i| {
            (
                format!("s{i:03}.toml"),
                "tiers = [[\"us-east\"]]\nttl = 30\n".to_string(),
            )
        })
        .collect();
    policies[7].1 = "tiers = [[\"us-east\"]\nttl = 30\n".into();
    policies[450].1 = "tiers = [[\"nowhere\"]]\nttl = 30\n".into();
    policies[599].1 = "tiers = [[\"us-east\"]]\nttl = \"soon\"\n".into();
    let refs: Vec<(&str, &str)> = policies
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let main = format!(
        "policy-dir = \"policies\"\n{}",
        base_config("[regions.us-east]\nendpoints = [{ address = \"192.0.2.1\" }]\n")
    );
    let (_files, errors) = load_errors(&main, ZONE, &refs);
    let files: Vec<String> = errors
        .iter()
        .map(|e| e.file.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        files,
        ["s007.toml", "s450.toml", "s599.toml"],
        "{errors:#?}"
    );
    has(&errors, "s450.toml", 1, 11, "nowhere");

    // The same directory without the mistakes loads all 600 services.
    policies[7].1 = policies[0].1.clone();
    policies[450].1 = policies[0].1.clone();
    policies[599].1 = policies[0].1.clone();
    let files = Files::new();
    files.write("zone.db", ZONE);
    for (name, text) in &policies {
        files.write(&format!("policies/{name}"), text);
    }
    let config = config::load(&files.write("inferdns.toml", &main)).unwrap();
    let ids: Vec<&str> = config.services.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids.len(), 600);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in file order");
}
