//! The on-disk format: serde structs for `inferdns.toml` and the policy files.
//!
//! Everything here is exactly what a user writes, with spans kept for the
//! values that later checks may complain about. Nothing here is validated
//! beyond its TOML type; `super::check` turns these into the runtime model.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// The main configuration file.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MainFile {
    pub server: ServerSection,
    pub zone: ZoneSection,
    /// Regions by id (`[regions.us-east]`).
    #[serde(default)]
    pub regions: BTreeMap<String, Spanned<RegionSection>>,
    /// Services written inline (`[services.chat]`), besides those in `policy-dir`.
    #[serde(default)]
    pub services: BTreeMap<String, Spanned<ServiceSection>>,
    /// Directory of policy files, one service per `*.toml`, relative to this file.
    pub policy_dir: Option<Spanned<String>>,
    #[serde(default)]
    pub geoip: GeoipSection,
    #[serde(default)]
    pub ecs: EcsSection,
    /// Named client groups for residency rules: `nordics = ["NO", "SE"]`.
    #[serde(default)]
    pub groups: BTreeMap<String, Spanned<Vec<Spanned<String>>>>,
    /// Networks placed at a location or a region before GeoIP is asked.
    #[serde(default)]
    pub overrides: Vec<Spanned<OverrideSection>>,
    /// Response rate limiting of UDP answers.
    #[serde(default)]
    pub rrl: RrlSection,
    /// The other edges of the fleet and how their observations count.
    #[serde(default)]
    pub fleet: FleetSection,
}

/// `[fleet]`: the other edges serving the zone, pulled for what they observe.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FleetSection {
    /// This edge's name as its peers list it. Default: `server.nsid`.
    pub edge: Option<Spanned<String>>,
    /// The other edges (`[[fleet.peers]]`).
    #[serde(default)]
    pub peers: Vec<Spanned<PeerSection>>,
    /// Bearer token shared by the fleet: sent to peers, required of them.
    pub token_file: Option<Spanned<String>>,
    /// PEM CA for `https://` peer URLs (a private CA), besides the system roots.
    pub ca_file: Option<Spanned<String>>,
    /// How often each peer is pulled. Default "1s".
    pub pull_interval: Option<Spanned<String>>,
    /// Longest wait for one pull. Default: half the pull interval.
    pub pull_timeout: Option<Spanned<String>>,
    /// A peer's observations count this long after its last good pull.
    /// Default: three pull intervals.
    pub expiry: Option<Spanned<String>>,
    /// `"local"` (default), `"any-up"`, `"majority"`, a count (`"2"`) or a
    /// share (`"60%"`) of vantage points that must see an endpoint up.
    pub quorum: Option<Spanned<String>>,
    /// Seed of the weighted choices every edge makes alike. Default: the zone apex.
    pub seed: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PeerSection {
    pub name: Spanned<String>,
    /// The peer's admin API, e.g. `http://10.0.0.2:9153`.
    pub url: Spanned<String>,
}

/// `[rrl]`: response rate limiting (as NSD's and Knot's RRL), on by default.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RrlSection {
    /// Default true.
    pub enabled: Option<Spanned<bool>>,
    /// Responses per second per client prefix and response class. Default 200.
    pub rate: Option<Spanned<u32>>,
    /// How many seconds of `rate` a bucket holds (the burst). Default "1s".
    pub window: Option<Spanned<String>>,
    /// Every `slip`-th limited response goes out truncated (TC=1); 0: none.
    /// Default 2.
    pub slip: Option<Spanned<u32>>,
    /// Client prefix lengths a bucket is kept for. Defaults 24 and 56.
    pub ipv4_prefix: Option<Spanned<u8>>,
    pub ipv6_prefix: Option<Spanned<u8>>,
    /// Sources never limited. Default loopback (which cannot be spoofed from
    /// outside the host).
    pub exempt: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct GeoipSection {
    /// MaxMind-format database (GeoIP2/GeoLite2/DB-IP City or Country).
    pub database: Option<Spanned<String>>,
    /// How often to look for a replaced database file. Default 60s.
    pub check_interval: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct EcsSection {
    /// Use EDNS Client Subnet (RFC 7871). Default true.
    pub enabled: Option<bool>,
    /// Longer IPv4 source prefixes are cut to this (privacy). Default 24.
    pub max_prefix_v4: Option<Spanned<u8>>,
    /// Longer IPv6 source prefixes are cut to this. Default 56.
    pub max_prefix_v6: Option<Spanned<u8>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct OverrideSection {
    pub networks: Vec<Spanned<String>>,
    /// Place the networks in this region (its location).
    pub region: Option<Spanned<String>>,
    /// Or at this location.
    pub country: Option<Spanned<String>>,
    pub continent: Option<Spanned<String>>,
    pub lat: Option<f64>,
    pub lon: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LocationSection {
    pub country: Option<Spanned<String>>,
    pub continent: Option<Spanned<String>>,
    pub lat: Spanned<f64>,
    pub lon: Spanned<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ResidencySection {
    /// First match by country (groups expand to countries), then continent.
    #[serde(default)]
    pub rules: Vec<Spanned<ResidencyRule>>,
    /// Clients no rule names: `"any"` (default), `"deny"`, or jurisdictions.
    pub otherwise: Option<Spanned<Allow>>,
    /// Clients whose location is unknown: `"any"`, `"deny"` (default), or jurisdictions.
    pub unknown_location: Option<Spanned<Allow>>,
    /// Queries without ECS: locate the resolver (`"resolver"`, default) or
    /// treat the client as unknown (`"unknown"`).
    pub without_ecs: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ResidencyRule {
    /// Countries (`DE`), continents (`continent:EU`) or groups (`eu`).
    pub clients: Vec<Spanned<String>>,
    /// Jurisdiction tags of the regions these clients may be sent to.
    pub allow: Vec<Spanned<String>>,
}

/// `"any"`, `"deny"`, or a list of jurisdiction tags.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Allow {
    Word(String),
    List(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServerSection {
    /// DNS listen addresses; UDP and TCP are both bound on each.
    #[serde(default = "default_dns_listen")]
    pub dns_listen: Vec<Spanned<String>>,
    /// Admin HTTP API address.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: Spanned<String>,
    /// Longest wait for the first probe round before the listeners open.
    #[serde(default = "default_startup_grace")]
    pub startup_grace: Spanned<String>,
    /// Idle TCP connections are closed after this long.
    #[serde(default = "default_tcp_idle_timeout")]
    pub tcp_idle_timeout: Spanned<String>,
    /// Open DNS-over-TCP connections, in all. Default 1000 (and never more
    /// than the descriptor limit leaves after a reserve for probes).
    pub tcp_max_connections: Option<Spanned<u32>>,
    /// Open DNS-over-TCP connections from one address. Default 16.
    pub tcp_max_per_address: Option<Spanned<u32>>,
    /// Largest UDP response we send, whatever the client advertises (RFC 6891).
    #[serde(default = "default_max_udp_payload")]
    pub max_udp_payload: Spanned<u16>,
    /// NSID (RFC 5001) this edge answers with when asked; default: the host name.
    pub nsid: Option<Spanned<String>>,
    /// Networks that may query `_explain.<service>` TXT records.
    #[serde(default = "default_explain_acl")]
    pub explain_acl: Vec<Spanned<String>>,
    /// File holding the bearer token of the mutating admin routes.
    pub admin_token_file: Option<Spanned<String>>,
    /// The read routes (`/v1/status`, `/v1/explain`, `/metrics`,
    /// `GET /v1/log-level`) need the token too. Default false.
    pub admin_token_for_reads: Option<Spanned<bool>>,
    /// Open admin API connections; more are closed at once. Default 64.
    pub admin_max_connections: Option<Spanned<u32>>,
    /// A request's head (and an idle keep-alive connection's next one) must
    /// arrive within this. Default "5s".
    pub admin_header_timeout: Option<Spanned<String>>,
    /// A request's body must arrive within this after its head. Default "10s".
    pub admin_body_timeout: Option<Spanned<String>>,
    /// Largest request head (request line and headers). Default 16384.
    pub admin_max_header_bytes: Option<Spanned<u32>>,
}

/// Explanations reveal the whole routing state: loopback only by default.
fn default_explain_acl() -> Vec<Spanned<String>> {
    vec![
        Spanned::new(0..0, "127.0.0.0/8".to_string()),
        Spanned::new(0..0, "::1/128".to_string()),
    ]
}

/// `127.0.0.1:53` and `[::1]:53`: loopback until the operator says otherwise.
fn default_dns_listen() -> Vec<Spanned<String>> {
    vec![
        Spanned::new(0..0, "127.0.0.1:53".to_string()),
        Spanned::new(0..0, "[::1]:53".to_string()),
    ]
}

/// The admin API stays on loopback by default.
fn default_admin_listen() -> Spanned<String> {
    Spanned::new(0..0, "127.0.0.1:9153".to_string())
}

/// Long enough for a first probe with the default timeout, short enough for systemd.
fn default_startup_grace() -> Spanned<String> {
    Spanned::new(0..0, "3s".to_string())
}

/// Resolvers reuse TCP connections briefly; 10 s is what most servers use.
fn default_tcp_idle_timeout() -> Spanned<String> {
    Spanned::new(0..0, "10s".to_string())
}

/// The DNS flag day 2020 value that avoids IP fragmentation.
fn default_max_udp_payload() -> Spanned<u16> {
    Spanned::new(0..0, 1232)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ZoneSection {
    /// The delegated apex, e.g. `inference.example.com`.
    pub apex: Spanned<String>,
    /// RFC 1035 zone file with the static records, relative to the config file.
    pub file: Option<Spanned<String>>,
    pub soa: SoaSection,
    /// Name servers of the zone (the NS RRset at the apex).
    pub ns: Vec<NsSection>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SoaSection {
    /// MNAME: the primary name server.
    pub primary: Spanned<String>,
    /// RNAME: the responsible mailbox written as a name (`hostmaster.example.com`).
    pub contact: Spanned<String>,
    #[serde(default = "default_serial")]
    pub serial: u32,
    #[serde(default = "default_refresh")]
    pub refresh: Spanned<u32>,
    #[serde(default = "default_retry")]
    pub retry: Spanned<u32>,
    #[serde(default = "default_expire")]
    pub expire: Spanned<u32>,
    /// Negative-caching TTL (RFC 2308).
    #[serde(default = "default_minimum")]
    pub minimum: Spanned<u32>,
    /// TTL of the SOA and NS records themselves.
    #[serde(default = "default_apex_ttl")]
    pub ttl: Spanned<u32>,
}

/// Nothing transfers this zone (no AXFR), so the serial only needs to exist.
fn default_serial() -> u32 {
    1
}
/// One hour, the common refresh.
fn default_refresh() -> Spanned<u32> {
    Spanned::new(0..0, 3600)
}
/// Ten minutes.
fn default_retry() -> Spanned<u32> {
    Spanned::new(0..0, 600)
}
/// One week.
fn default_expire() -> Spanned<u32> {
    Spanned::new(0..0, 604_800)
}
/// Short negative caching: a service name added by reload should appear quickly.
fn default_minimum() -> Spanned<u32> {
    Spanned::new(0..0, 30)
}
/// One hour for SOA and NS.
fn default_apex_ttl() -> Spanned<u32> {
    Spanned::new(0..0, 3600)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NsSection {
    pub name: Spanned<String>,
    /// Glue addresses, required when the name is inside the zone.
    #[serde(default)]
    pub addresses: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RegionSection {
    pub endpoints: Vec<Spanned<EndpointSection>>,
    #[serde(default)]
    pub probe: ProbeSection,
    /// Where the region is (for proximity and network overrides).
    pub location: Option<LocationSection>,
    /// Jurisdiction tags residency rules allow: `["eu", "gdpr"]`.
    #[serde(default)]
    pub jurisdictions: Vec<Spanned<String>>,
    /// Size, weight, cost and where load reports come from.
    pub capacity: Option<CapacitySection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CapacitySection {
    /// GPUs in the region (its size). Default 1.
    pub gpus: Option<Spanned<f64>>,
    /// Base weight. Default 1.
    pub weight: Option<Spanned<f64>>,
    /// Cost per GPU-hour, for `strategy = "cost"`.
    pub cost: Option<Spanned<f64>>,
    /// Scrape each endpoint's metrics with this preset: vllm, sglang, tgi,
    /// llamacpp, triton, nim, or generic (name the metrics below).
    pub metrics: Option<Spanned<String>>,
    /// Default `/metrics`.
    pub metrics_path: Option<Spanned<String>>,
    /// Default 5s.
    pub metrics_interval: Option<Spanned<String>>,
    /// generic preset: the KV-cache gauge (0..1).
    pub kv_cache_metric: Option<Spanned<String>>,
    /// generic preset: the waiting-requests gauge.
    pub waiting_metric: Option<Spanned<String>>,
    /// generic preset: the running-requests gauge.
    pub running_metric: Option<Spanned<String>>,
    /// generic preset: the gauge of the most requests served at once
    /// (slots); slot use is (running + waiting) / slots.
    pub slots_metric: Option<Spanned<String>>,
    /// generic preset: a utilisation gauge (0..1).
    pub utilization_metric: Option<Spanned<String>>,
    /// Reports older than this expire to unknown. Default 15s.
    pub max_age: Option<Spanned<String>>,
    /// Waiting requests that count as a full queue. Default 8.
    pub queue_saturation: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct EndpointSection {
    /// IPv4 or IPv6 address that goes into A/AAAA answers and is probed.
    pub address: Option<Spanned<String>>,
    /// A name answered as CNAME (a provider or gateway) instead of an address.
    pub cname: Option<Spanned<String>>,
    /// Address to probe for a `cname` endpoint (we never resolve names through DNS).
    pub probe_address: Option<Spanned<String>>,
    /// Probe port for this endpoint, overriding the region's probe port.
    pub port: Option<Spanned<u16>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ProbeSection {
    /// `http` or `https`.
    pub scheme: Option<Spanned<String>>,
    /// Default: 80 for http, 443 for https.
    pub port: Option<Spanned<u16>>,
    /// Default `/health`.
    pub path: Option<Spanned<String>>,
    /// Exact status expected; default any 2xx.
    pub expect_status: Option<Spanned<u16>>,
    /// Default 500ms.
    pub interval: Option<Spanned<String>>,
    /// Default 800ms.
    pub timeout: Option<Spanned<String>>,
    /// Consecutive successes to mark a down endpoint up. Default 2.
    pub rise: Option<Spanned<u32>>,
    /// Consecutive failures to mark an up endpoint down. Default 2.
    pub fall: Option<Spanned<u32>>,
    /// Consecutive refused or reset connections of the alive probe that
    /// mark an up endpoint down (nothing listens: unambiguous). Default 1.
    pub fall_refused: Option<Spanned<u32>>,
    /// Host header to send (default: the address, or the CNAME target).
    pub host: Option<Spanned<String>>,
    /// TLS server name (SNI and certificate name) for https.
    pub tls_server_name: Option<Spanned<String>>,
    /// `http` (default) or `tcp` (a connect is enough) for the alive probe.
    pub kind: Option<Spanned<String>>,
    /// Model list (`/v1/models`, or Ollama's `/api/tags`); none: not checked.
    pub models_path: Option<Spanned<String>>,
    /// How often the model list is read. Default 2s.
    pub models_interval: Option<Spanned<String>>,
    /// A field of each model-list entry that holds its version (read as
    /// `id@value`). Default: vLLM's `root` and Ollama's `digest`.
    pub models_version_field: Option<Spanned<String>>,
    /// A synthetic one-token completion (costs GPU time: keep it slow).
    pub completion: Option<CompletionSection>,
    /// PEM file of a private CA to trust for https probes.
    pub ca_file: Option<Spanned<String>>,
    /// File holding an API key, sent as `Authorization: Bearer`.
    pub api_key_file: Option<Spanned<String>>,
    /// Environment variable holding the API key.
    pub api_key_env: Option<Spanned<String>>,
    /// How long a 429 without Retry-After takes an endpoint out. Default 10s.
    pub cooldown: Option<Spanned<String>>,
    /// A recovered endpoint's share of answers ramps up over this. Default 0s (off).
    pub slow_start: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CompletionSection {
    /// The model to ask.
    pub model: Spanned<String>,
    /// Default `/v1/chat/completions`.
    pub path: Option<Spanned<String>>,
    /// Default 30s.
    pub interval: Option<Spanned<String>>,
    /// Default 5s.
    pub timeout: Option<Spanned<String>>,
}

/// One service: inline in the main file or a whole policy file.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServiceSection {
    /// Name relative to the apex (`chat`) or absolute (`chat.inference.example.com.`).
    /// Default: the service id (the policy file's stem).
    pub name: Option<Spanned<String>>,
    /// Failover tiers, best first: `[["us-east"], ["us-west", "eu-west"]]`.
    pub tiers: Spanned<Vec<Vec<Spanned<String>>>>,
    /// TTL of the answers. Default 30.
    pub ttl: Option<Spanned<u32>>,
    /// What to answer when no endpoint of any tier is fit.
    pub when_all_down: Option<Spanned<String>>,
    /// When everything went unfit together, answer the endpoints that were
    /// fit last for this long before `when-all-down` applies; "0s" is off.
    /// Default 30s (`DEFAULT_LAST_KNOWN_GOOD`).
    pub last_known_good: Option<Spanned<String>>,
    /// `failover` (default: the first fit tier) or `proximity` (within the
    /// first fit tier, the regions with the lowest estimated latency).
    pub strategy: Option<Spanned<String>>,
    /// Proximity: regions within this much of the best estimate share. Default 10ms.
    pub proximity_tolerance: Option<Spanned<String>>,
    /// Data residency: which clients may be sent to which jurisdictions.
    pub residency: Option<ResidencySection>,
    /// The model id this service needs; endpoints whose model list lacks it
    /// do not answer for it.
    pub model: Option<Spanned<String>>,
    /// Service id to answer (as a CNAME) when no region can serve this one.
    pub fallback: Option<Spanned<String>>,
    /// Above this smoothed latency (completion, else probe) an endpoint's
    /// share of answers is lowered (degraded), not removed.
    pub max_latency: Option<Spanned<String>>,
    /// Records per answer (capacity strategy; default 1).
    pub records: Option<Spanned<u32>>,
    /// The same client subnet keeps getting the same endpoints.
    pub sticky: Option<bool>,
    /// Utilisation watermarks: `{ prepare = 0.8, reduce = 0.9, remove = 0.95 }`.
    pub watermarks: Option<Spanned<WatermarkSection>>,
    /// When load alone takes a region out of this name's answers: `never`,
    /// `at-remove` or `at-reduce`. Default: `at-remove` for the capacity
    /// and cost strategies, `never` for failover and proximity.
    pub shed: Option<Spanned<String>>,
    /// `critical`, `standard` (default) or `sheddable`: who leaves a busy
    /// region first (sheddable: watermarks 0.15 lower, shed at reduce, no
    /// full region ever), who keeps its share (critical).
    pub criticality: Option<Spanned<String>>,
    /// A model-version rollout: `{ stable = "chat-v1", canary = "chat-v2",
    /// canary-share = "5%" }`.
    pub rollout: Option<Spanned<RolloutSection>>,
    /// Cost strategy: the least headroom a region needs to be chosen. Default 0.2.
    pub min_headroom: Option<Spanned<f64>>,
    /// Adaptive TTL: the TTL while weights move or a region is near a watermark.
    pub ttl_min: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RolloutSection {
    /// The version every client gets unless it is in the canary share: a
    /// model id as the model list shows it, or `id@tag` (vLLM root,
    /// Ollama digest, a prefix of it).
    pub stable: Spanned<String>,
    /// The version being rolled out; none: only `stable` is answered.
    pub canary: Option<Spanned<String>>,
    /// Share of client subnets answered with the canary. Default "5%".
    pub canary_share: Option<Spanned<String>>,
    /// Regions that must stay fit on the stable version until promotion
    /// (said loudly when fewer are). Default 2.
    pub min_stable_regions: Option<Spanned<u32>>,
    /// Promote the canary once its checks have been clean this long.
    pub promote_after: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct WatermarkSection {
    pub prepare: Option<f64>,
    pub reduce: Option<f64>,
    pub remove: Option<f64>,
}
