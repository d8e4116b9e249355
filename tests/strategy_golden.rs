//! Characterization of the strategies: every service's compiled answer
//! (records, weights, draws, spill, proximity candidates, counters), its
//! status view and its explain text, over named and seeded combinations of
//! endpoint and region states, compared with `tests/fixtures/strategy.golden`
//! (written by the code before the strategies moved into modules of their
//! own). The named scenarios are kept as text, the seeded ones as a digest
//! per scenario; a difference prints the scenario's text.
//!
//! `INFERDNS_BLESS=1 cargo test --test strategy_golden` rewrites the file:
//! only when a change of behaviour is meant.

use std::fmt::Write as _;
use std::time::Duration;

use hickory_proto::rr::Record;
use inferdns::capacity::Level;
use inferdns::config::{self, Config};
use inferdns::health::Status;
use inferdns::metrics::Counter;
use inferdns::model::{
    ClassAnswer, Counters, EndpointIndex, EndpointInput, RegionInputs, RegionLoad, service_answer,
};

const GOLDEN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/strategy.golden"
);
const DB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/geoip/test-city.mmdb");
const MODEL: &str = "llama-3.1-8b-instruct";
const SEEDED: u64 = 400;

/// Regions: (id, endpoints, location, jurisdictions, capacity, probe extras).
fn config_text() -> String {
    let mut text = format!(
        r#"[server]
dns-listen = ["127.0.0.1:0"]
admin-listen = "127.0.0.1:0"

[zone]
apex = "inference.example.com"
[zone.soa]
primary = "ns1.inference.example.com"
contact = "hostmaster.inference.example.com"
[[zone.ns]]
name = "ns.example.net"

[geoip]
database = "{DB}"

[regions.eu-central]
endpoints = [{{ address = "192.0.2.1" }}, {{ address = "2001:db8::1" }}, {{ address = "192.0.2.2" }}]
location = {{ country = "DE", continent = "EU", lat = 50.11, lon = 8.68 }}
jurisdictions = ["eu", "gdpr"]
capacity = {{ gpus = 8, weight = 1, cost = 3.0 }}
probe = {{ models-path = "/v1/models", completion = {{ model = "{MODEL}" }}, interval = "1s", timeout = "500ms" }}

[regions.eu-west]
endpoints = [{{ address = "192.0.2.11" }}]
location = {{ country = "IE", continent = "EU", lat = 53.35, lon = -6.26 }}
jurisdictions = ["eu"]
capacity = {{ gpus = 2, weight = 2, cost = 1.5 }}
probe = {{ models-path = "/v1/models" }}

[regions.us-east]
endpoints = [{{ address = "192.0.2.21" }}, {{ address = "192.0.2.22" }}, {{ address = "2001:db8::21" }}]
location = {{ country = "US", continent = "NA", lat = 38.90, lon = -77.04 }}
jurisdictions = ["us"]
capacity = {{ gpus = 4, cost = 1.0 }}
probe = {{ models-path = "/v1/models", interval = "2s", timeout = "1s" }}

[regions.us-west]
endpoints = [{{ cname = "gw.provider.example.net", probe-address = "203.0.113.7", port = 443 }}]
location = {{ country = "US", continent = "NA", lat = 37.77, lon = -122.42 }}
jurisdictions = ["us"]
capacity = {{ gpus = 1, cost = 0.5 }}

[regions.ap]
endpoints = [{{ address = "192.0.2.31" }}, {{ address = "2001:db8::31" }}]
location = {{ country = "JP", continent = "AS", lat = 35.69, lon = 139.69 }}
jurisdictions = ["apac"]
capacity = {{ gpus = 2, cost = 2.0 }}

[regions.nowhere]
endpoints = [{{ address = "192.0.2.41" }}]
location = {{ country = "FR", continent = "EU", lat = 48.86, lon = 2.35 }}
jurisdictions = ["eu"]
"#
    );
    text.push_str(&format!(
        r#"
[services.fo]
tiers = [["eu-central"], ["us-east", "us-west"], ["ap"]]
model = "{MODEL}"
max-latency = "100ms"
last-known-good = "30s"

[services.fo-shed]
tiers = [["eu-central", "eu-west"], ["us-east"]]
shed = "at-reduce"
when-all-down = "servfail"
last-known-good = "0s"

[services.fo-res]
tiers = [["eu-west"], ["eu-central", "us-east"], ["ap", "us-west"]]
model = "{MODEL}"
when-all-down = "nodata"
fallback = "small"
residency = {{ rules = [{{ clients = ["eu"], allow = ["eu"] }}, {{ clients = ["US", "CA"], allow = ["us"] }}], otherwise = "any", unknown-location = "deny" }}

[services.fo-fallback]
tiers = [["us-east"], ["eu-central"]]
model = "{MODEL}"
when-all-down = "servfail"
fallback = "small"
last-known-good = "5s"

[services.fo-nodata]
tiers = [["us-west"], ["ap"]]
when-all-down = "nodata"
last-known-good = "0s"

[services.small]
tiers = [["ap", "us-west"]]
model = "small-model"
ttl = 60

[services.near]
tiers = [["eu-central", "eu-west", "us-east", "nowhere"], ["ap"]]
strategy = "proximity"
proximity-tolerance = "5ms"
max-latency = "50ms"
residency = {{ rules = [{{ clients = ["eu"], allow = ["eu"] }}], otherwise = ["us", "apac"], unknown-location = "any" }}

[services.near-open]
tiers = [["us-east", "us-west", "eu-west"]]
strategy = "proximity"
shed = "at-remove"

[services.cap]
tiers = [["eu-central", "us-east", "eu-west"], ["ap"]]
strategy = "capacity"
records = 2
sticky = true
shed = "at-reduce"

[services.cap-never]
tiers = [["eu-central", "us-east"]]
strategy = "capacity"
shed = "never"
when-all-down = "nodata"
last-known-good = "0s"

[services.cheap]
tiers = [["eu-central", "eu-west"], ["us-east", "us-west", "ap"]]
strategy = "cost"
min-headroom = 0.3
residency = {{ rules = [{{ clients = ["continent:AS"], allow = ["apac"] }}], otherwise = "any", unknown-location = "deny" }}

[services.cheap-model]
tiers = [["us-west", "eu-west", "eu-central"]]
strategy = "cost"
model = "{MODEL}"
shed = "never"
"#
    ));
    text
}

fn load() -> Config {
    let dir = std::env::temp_dir().join(format!("inferdns-strategy-golden-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch dir");
    let path = dir.join("inferdns.toml");
    std::fs::write(&path, config_text()).expect("write the config");
    let config = config::load(&path).unwrap_or_else(|e| panic!("config should load:\n{e}"));
    let _ = std::fs::remove_dir_all(&dir);
    config
}

/// A small deterministic generator (xorshift64*), so the seeds mean the
/// same thing everywhere.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p && p > 0.0
    }
    fn pick<T: Copy>(&mut self, of: &[T]) -> T {
        of[(self.next() % of.len() as u64) as usize]
    }
}

/// Owned endpoint inputs (the model borrows them).
#[derive(Clone)]
struct Endpoint {
    status: Status,
    last_error: Option<String>,
    cooling_s: Option<f64>,
    models: Option<Vec<String>>,
    completion_ok: bool,
    slow_start: f64,
    latency_ms: Option<f64>,
    silent: Option<String>,
    layers_pending: bool,
    fit_ago: Option<Duration>,
    last_models: Option<Vec<String>>,
}

struct Scenario {
    name: String,
    endpoints: Vec<Endpoint>,
    /// Region index of each endpoint.
    region_of: Vec<usize>,
    drained: Vec<bool>,
    loads: Vec<RegionLoad>,
    latency_ms: Vec<f64>,
    ttl: u32,
}

fn up() -> Endpoint {
    Endpoint {
        status: Status::Up,
        last_error: None,
        cooling_s: None,
        models: Some(vec![MODEL.to_string(), "small-model".to_string()]),
        completion_ok: true,
        slow_start: 1.0,
        latency_ms: Some(20.0),
        silent: None,
        layers_pending: false,
        fit_ago: Some(Duration::ZERO),
        last_models: Some(vec![MODEL.to_string(), "small-model".to_string()]),
    }
}

fn down(ago: Option<Duration>) -> Endpoint {
    Endpoint {
        status: Status::Down,
        last_error: Some("connection refused".into()),
        fit_ago: ago,
        ..up()
    }
}

fn base(config: &Config, name: &str) -> Scenario {
    let mut region_of = Vec::new();
    for (r, region) in config.regions.iter().enumerate() {
        region_of.extend(std::iter::repeat_n(r, region.endpoints.len()));
    }
    let n = config.regions.len();
    Scenario {
        name: name.to_string(),
        endpoints: vec![up(); region_of.len()],
        region_of,
        drained: vec![false; n],
        loads: (0..n)
            .map(|_| RegionLoad {
                util: None,
                gpus: 1.0,
                base: 1.0,
                cost: None,
            })
            .collect(),
        latency_ms: vec![10.0; n],
        ttl: 30,
    }
}

fn region(config: &Config, id: &str) -> usize {
    config
        .regions
        .iter()
        .position(|r| r.id == id)
        .expect("a region of the test config")
}

/// Hand-written combinations, kept as text in the golden file.
fn named(config: &Config) -> Vec<Scenario> {
    let mut out = Vec::new();
    out.push(base(config, "all up, no load"));

    let mut s = base(config, "all down long ago");
    s.endpoints = vec![down(None); s.endpoints.len()];
    out.push(s);

    let mut s = base(config, "all down together 2 s ago");
    s.endpoints = vec![down(Some(Duration::from_secs(2))); s.endpoints.len()];
    out.push(s);

    let mut s = base(config, "all not probed yet");
    for e in &mut s.endpoints {
        e.status = Status::Unknown;
        e.fit_ago = None;
    }
    out.push(s);

    let mut s = base(config, "eu regions drained");
    s.drained[region(config, "eu-central")] = true;
    s.drained[region(config, "eu-west")] = true;
    out.push(s);

    let mut s = base(config, "eu drained, us down, ap up");
    s.drained[region(config, "eu-central")] = true;
    s.drained[region(config, "eu-west")] = true;
    for (e, r) in s.region_of.clone().into_iter().enumerate() {
        if config.regions[r].id.starts_with("us-") {
            s.endpoints[e] = down(None);
        }
    }
    out.push(s);

    let mut s = base(config, "everything drained");
    s.drained = vec![true; s.drained.len()];
    out.push(s);

    let mut s = base(
        config,
        "loads: eu-central 96%, us-east 91%, eu-west 85%, costs",
    );
    let loads = [
        ("eu-central", 0.96, 8.0, Some(3.0)),
        ("eu-west", 0.85, 2.0, Some(1.5)),
        ("us-east", 0.91, 4.0, Some(1.0)),
        ("us-west", 0.5, 1.0, Some(0.5)),
        ("ap", 0.2, 2.0, None),
    ];
    for (id, util, gpus, cost) in loads {
        s.loads[region(config, id)] = RegionLoad {
            util: Some(util),
            gpus,
            base: 1.0,
            cost,
        };
    }
    out.push(s);

    let mut s = base(config, "everything full (100%)");
    for l in &mut s.loads {
        l.util = Some(1.0);
    }
    out.push(s);

    let mut s = base(config, "slow start and slow endpoints in the first tiers");
    for (e, r) in s.region_of.clone().into_iter().enumerate() {
        match config.regions[r].id.as_str() {
            "eu-central" => s.endpoints[e].slow_start = 0.3,
            "us-east" | "eu-west" => s.endpoints[e].latency_ms = Some(400.0),
            _ => {}
        }
    }
    out.push(s);

    let mut s = base(config, "model missing, completion failing, cooling, silent");
    for (e, r) in s.region_of.clone().into_iter().enumerate() {
        match config.regions[r].id.as_str() {
            "eu-central" => s.endpoints[e].completion_ok = false,
            "eu-west" => s.endpoints[e].models = Some(vec!["other".into()]),
            "us-east" => s.endpoints[e].cooling_s = Some(7.4),
            "us-west" => s.endpoints[e].silent = Some("alive probe silent for 4.5 s".into()),
            _ => s.endpoints[e].layers_pending = true,
        }
    }
    out.push(s);

    let mut s = base(config, "proximity latencies spread");
    for (id, ms) in [
        ("eu-central", 4.0),
        ("eu-west", 7.0),
        ("us-east", 90.0),
        ("us-west", 140.0),
        ("ap", 200.0),
    ] {
        s.latency_ms[region(config, id)] = ms;
    }
    s.ttl = 5;
    out.push(s);
    out
}

/// A seeded combination: how likely an endpoint is up varies by seed, so
/// that all-down and last-known-good cases come up too.
fn seeded(config: &Config, seed: u64) -> Scenario {
    let mut rng = Rng::new(seed);
    let mut s = base(config, &format!("seed {seed}"));
    let p_up = rng.pick(&[0.95, 0.7, 0.4, 0.1, 0.0]);
    let p_recent = rng.pick(&[0.0, 0.5, 1.0]);
    for e in &mut s.endpoints {
        let mut input = up();
        if !rng.chance(p_up) {
            input.status = if rng.chance(0.8) {
                Status::Down
            } else {
                Status::Unknown
            };
            input.last_error = rng.chance(0.7).then(|| "timed out".to_string());
            input.fit_ago = if rng.chance(p_recent) {
                Some(Duration::from_millis(
                    rng.pick(&[300, 1200, 2500, 6000, 40_000]),
                ))
            } else {
                None
            };
        }
        if rng.chance(0.1) {
            input.cooling_s = Some(rng.pick(&[1.0, 9.6]));
        }
        if rng.chance(0.15) {
            input.models = Some(vec!["other-model".into()]);
        }
        if rng.chance(0.1) {
            input.last_models = Some(vec!["small-model".into()]);
        }
        input.completion_ok = !rng.chance(0.1);
        if rng.chance(0.2) {
            input.slow_start = rng.pick(&[0.1, 0.45, 0.8]);
        }
        input.latency_ms = rng.pick(&[None, Some(15.0), Some(60.0), Some(300.0)]);
        if rng.chance(0.05) {
            input.silent = Some("models probe silent for 9.0 s".into());
        }
        input.layers_pending = input.status == Status::Up && rng.chance(0.08);
        *e = input;
    }
    for d in &mut s.drained {
        *d = rng.chance(0.12);
    }
    for l in &mut s.loads {
        *l = RegionLoad {
            util: rng.pick(&[
                None,
                Some(0.3),
                Some(0.75),
                Some(0.82),
                Some(0.92),
                Some(0.97),
                Some(1.0),
            ]),
            gpus: rng.pick(&[1.0, 2.0, 8.0]),
            base: rng.pick(&[1.0, 2.0]),
            cost: rng.pick(&[None, Some(0.5), Some(1.0), Some(2.5)]),
        };
    }
    for l in &mut s.latency_ms {
        *l = rng.pick(&[3.0, 8.0, 12.0, 45.0, 150.0]);
    }
    s.ttl = rng.pick(&[30, 5]);
    s
}

/// Counters that say which series an answer would count in: each counter
/// handed out is remembered with its series' name.
static NAMED: std::sync::Mutex<Vec<(String, Counter)>> = std::sync::Mutex::new(Vec::new());

struct Named;

impl Named {
    fn named(name: String) -> Option<Counter> {
        let counter = Counter::default();
        NAMED.lock().unwrap().push((name, counter.clone()));
        Some(counter)
    }
}

impl Counters for Named {
    fn answer(&self, service: &str, region: &str) -> Option<Counter> {
        Named::named(format!("answers{{region={region},service={service}}}"))
    }
    fn refusal(&self, service: &str) -> Option<Counter> {
        Named::named(format!("refusals{{service={service}}}"))
    }
}

fn counter(c: &Counter) -> String {
    let named = NAMED.lock().unwrap();
    let (name, _) = named
        .iter()
        .find(|(_, known)| known.same(c))
        .expect("every counter was handed out by Named");
    name.clone()
}

fn counters(cs: &[Counter]) -> String {
    cs.iter().map(counter).collect::<Vec<_>>().join(" ")
}

fn opt_counters(cs: &[Option<Counter>]) -> String {
    cs.iter()
        .map(|c| c.as_ref().map_or("-".to_string(), counter))
        .collect::<Vec<_>>()
        .join(" ")
}

fn records(rs: &[Record]) -> String {
    rs.iter()
        .map(|r| format!("{} {} {}", r.name, r.ttl, r.data))
        .collect::<Vec<_>>()
        .join(" | ")
}

fn class_text(out: &mut String, c: &ClassAnswer) {
    let w = |out: &mut String, line: String| {
        out.push_str("    ");
        out.push_str(&line);
        out.push('\n');
    };
    w(
        out,
        format!("a: {}  weights {:?}", records(&c.a), c.a_weights),
    );
    w(
        out,
        format!("aaaa: {}  weights {:?}", records(&c.aaaa), c.aaaa_weights),
    );
    w(
        out,
        format!(
            "cname: {}  servfail {} refused {}",
            c.cname
                .as_ref()
                .map_or("-".into(), |r| records(std::slice::from_ref(r))),
            c.servfail,
            c.refused
        ),
    );
    w(out, format!("answered: {}", counters(&c.answered)));
    for k in &c.candidates {
        w(
            out,
            format!(
                "candidate {} {:?} {} ms: a {} {:?} aaaa {} {:?} counter {}",
                k.region,
                k.coords,
                k.latency_ms,
                records(&k.a),
                k.a_weights,
                records(&k.aaaa),
                k.aaaa_weights,
                k.answered.as_ref().map_or("-".into(), counter)
            ),
        );
    }
    if let Some(d) = &c.drawn {
        w(
            out,
            format!("drawn: records {} sticky {}", d.records, d.sticky),
        );
        for (family, entries, cs) in [
            ("a", &d.a, &d.a_counters),
            ("aaaa", &d.aaaa, &d.aaaa_counters),
        ] {
            let shown: Vec<String> = entries
                .iter()
                .map(|(r, weight, key)| format!("{} w={weight:?} key={key}", r.data))
                .collect();
            w(
                out,
                format!(
                    "drawn {family}: {} counters {}",
                    shown.join(", "),
                    opt_counters(cs)
                ),
            );
        }
    }
    if c.spill > 0.0 || !c.spill_a.is_empty() || !c.spill_aaaa.is_empty() {
        w(
            out,
            format!(
                "spill {:?}: a {} aaaa {} counters {}",
                c.spill,
                records(&c.spill_a),
                records(&c.spill_aaaa),
                counters(&c.spill_answered)
            ),
        );
    }
    for line in c.explain.iter() {
        w(out, format!("explain: {line}"));
    }
}

/// Everything one scenario compiles to, as text; and the decision states seen.
fn render(config: &Config, s: &Scenario, states: &mut Vec<String>) -> String {
    let index = EndpointIndex::new(config);
    assert_eq!(index.len(), s.endpoints.len());
    let inputs: Vec<EndpointInput<'_>> = s
        .endpoints
        .iter()
        .zip(&s.region_of)
        .map(|(e, r)| EndpointInput {
            status: e.status,
            last_error: e.last_error.as_deref(),
            drained: s.drained[*r],
            cooling_s: e.cooling_s,
            models: e.models.as_deref(),
            completion_ok: e.completion_ok,
            completion_model: Some(MODEL),
            slow_start: e.slow_start,
            latency_ms: e.latency_ms,
            silent: e.silent.as_deref(),
            layers_pending: e.layers_pending,
            fit_ago: e.fit_ago,
            last_models: e.last_models.as_deref(),
        })
        .collect();
    let mut out = format!("== {}\n", s.name);
    for (i, service) in config.services.iter().enumerate() {
        let mut regions: Vec<usize> = Vec::new();
        for &r in service.tiers.iter().flatten() {
            if !regions.contains(&r) {
                regions.push(r);
            }
        }
        let w = &service.watermarks;
        let levels: Vec<Level> = regions
            .iter()
            .map(|&r| match s.loads[r].util {
                Some(u) if u >= w.remove => Level::Removed,
                Some(u) if u >= w.reduce => Level::Reduce,
                Some(u) if u >= w.prepare => Level::Prepare,
                _ => Level::Normal,
            })
            .collect();
        let inputs_of = RegionInputs {
            latency_ms: &s.latency_ms,
            loads: &s.loads,
            regions: &regions,
            levels: &levels,
            ttl: s.ttl,
            criticality: service.criticality,
        };
        let (answer, view) = service_answer(config, &index, i, &inputs, &inputs_of, &Named);
        writeln!(out, "-- service {}", service.id).unwrap();
        writeln!(
            out,
            "  view: {}",
            serde_json::to_string(&view).expect("the view serializes")
        )
        .unwrap();
        let residency = answer.residency.as_ref().map(|r| {
            let mut countries: Vec<String> =
                r.by_country.iter().map(|(c, i)| format!("{c:?}:{i}")).collect();
            countries.sort();
            let mut continents: Vec<String> =
                r.by_continent.iter().map(|(c, i)| format!("{c:?}:{i}")).collect();
            continents.sort();
            format!(
                "countries [{}] continents [{}] eu {:?} otherwise {} unknown {} without-ecs-unknown {}",
                countries.join(" "),
                continents.join(" "),
                r.eu,
                r.otherwise,
                r.unknown,
                r.without_ecs_unknown
            )
        });
        writeln!(
            out,
            "  located {} tolerance {:?} refusals {} residency {}",
            answer.located,
            answer.tolerance_ms,
            answer.refusals.as_ref().map_or("-".into(), counter),
            residency.unwrap_or_else(|| "-".into())
        )
        .unwrap();
        let classes = view.residency.clone().unwrap_or_default();
        states.push(format!("{} {}", view.strategy, view.decision.state()));
        for class in &classes {
            states.push(format!("{} {}", view.strategy, class.decision.state()));
        }
        for (k, class) in answer.classes.iter().enumerate() {
            writeln!(out, "  class {k}").unwrap();
            class_text(&mut out, class);
        }
    }
    out
}

/// FNV-1a, 64 bits: a digest that means the same on every platform.
fn digest(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[test]
fn strategies_compile_what_they_compiled_before() {
    let config = load();
    let mut states = Vec::new();
    let mut golden = String::new();
    let mut texts = Vec::new();
    for s in named(&config) {
        let text = render(&config, &s, &mut states);
        golden.push_str(&text);
        texts.push(text);
    }
    golden.push_str("== seeded digests\n");
    for seed in 0..SEEDED {
        let text = render(&config, &seeded(&config, seed), &mut states);
        writeln!(golden, "seed {seed} {:016x}", digest(&text)).unwrap();
        texts.push(text);
    }

    // The combinations reach every strategy's every decision that the
    // config makes possible; a generator that stopped doing so would pin
    // nothing.
    states.sort();
    states.dedup();
    for want in [
        "failover tier",
        "failover fail-open",
        "failover last-known-good",
        "failover no-data",
        "failover serv-fail",
        "failover unprobed",
        "failover residency-no-data",
        "failover fallback",
        "proximity tier",
        "proximity fail-open",
        "proximity residency-no-data",
        "proximity unprobed",
        "proximity last-known-good",
        "capacity tier",
        "capacity no-data",
        "capacity last-known-good",
        "capacity fail-open",
        "capacity unprobed",
        "cost tier",
        "cost fail-open",
        "cost residency-no-data",
        "cost last-known-good",
        "cost unprobed",
    ] {
        assert!(
            states.iter().any(|s| s == want),
            "no combination reaches {want}: {states:?}"
        );
    }

    if std::env::var_os("INFERDNS_BLESS").is_some() {
        std::fs::write(GOLDEN, &golden).expect("write the golden file");
        return;
    }
    let want = std::fs::read_to_string(GOLDEN)
        .expect("tests/fixtures/strategy.golden (INFERDNS_BLESS=1 writes it)");
    if want == golden {
        return;
    }
    // Name the first scenario that differs, with its text now.
    let want_sections: Vec<&str> = want.split("\n== ").collect();
    let got_sections: Vec<&str> = golden.split("\n== ").collect();
    for (k, (w, g)) in want_sections.iter().zip(&got_sections).enumerate() {
        if w != g {
            let first_line = w
                .lines()
                .zip(g.lines())
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!("golden: {a}\n   now: {b}"))
                .unwrap_or_else(|| "(one is longer)".into());
            let detail = if g.starts_with("seeded digests") {
                let seed = w
                    .lines()
                    .zip(g.lines())
                    .position(|(a, b)| a != b)
                    .map_or(0, |p| p.saturating_sub(1));
                texts
                    .get(texts.len() - SEEDED as usize + seed)
                    .cloned()
                    .unwrap_or_default()
            } else {
                String::new()
            };
            panic!("section {k} differs from the golden file\n{first_line}\n{detail}");
        }
    }
    panic!("the golden file and the output differ in length");
}
