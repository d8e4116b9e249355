//! Configuration: file formats (serde) turned into a checked runtime config.
//!
//! Owns: reading `inferdns.toml`, the policy directory and the zone file, and
//! every check that can be made without touching the network. Loading is
//! parse → check → compile; every problem is reported at once as
//! `file:line:col: message`. Must not open sockets or start tasks.

mod admin;
mod capacity;
mod check;
pub mod file;
pub mod fleet;
mod known;
mod limits;
mod parse;
mod probes;
mod residency;
mod secret;
mod suggest;
mod zonefile;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hickory_proto::rr::{Name, Record};

pub use probes::DEFAULT_FALL_REFUSED;

pub use check::{
    DEFAULT_FALL, DEFAULT_INTERVAL, DEFAULT_RISE, DEFAULT_SERVICE_TTL, DEFAULT_TIMEOUT, load,
    load_for_reload, load_known, load_str,
};
pub use known::{Learned, PolicyFiles};

/// The checked runtime configuration: everything the daemon needs, no spans.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub zone: ZoneConfig,
    pub regions: Vec<Region>,
    pub services: Vec<Service>,
    pub geo: GeoConfig,
    /// Network overrides, longest prefix first.
    pub overrides: Vec<Override>,
    /// Response rate limiting; `None` when off.
    pub rrl: Option<RateLimit>,
    /// The other edges; empty: this edge decides alone.
    pub fleet: Fleet,
}

/// `[fleet]`: the peers this edge pulls and how their views combine.
#[derive(Debug, Clone, PartialEq)]
pub struct Fleet {
    /// This edge's name.
    pub edge: String,
    pub peers: Vec<Peer>,
    /// Sent to peers and required of them; set whenever there are peers.
    pub token: Option<Secret>,
    /// Extra root certificate (PEM) for `https://` peers.
    pub ca_pem: Option<Vec<u8>>,
    pub pull_interval: Duration,
    pub pull_timeout: Duration,
    pub expiry: Duration,
    pub quorum: crate::fleet::Quorum,
    /// Seed of the weighted choices; `Some` when there are peers (every
    /// edge then chooses alike for a client subnet).
    pub seed: Option<u64>,
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet {
            edge: String::new(),
            peers: Vec::new(),
            token: None,
            ca_pem: None,
            pull_interval: Duration::from_secs(1),
            pull_timeout: Duration::from_millis(500),
            expiry: Duration::from_secs(3),
            quorum: crate::fleet::Quorum::Local,
            seed: None,
        }
    }
}

/// A service's model-version rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    pub stable: String,
    pub canary: Option<String>,
    /// 0 < share <= 1.
    pub canary_share: f64,
    pub min_stable_regions: usize,
    pub promote_after: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    /// The peer's observations route (`<url>/v1/fleet/observations`).
    pub url: String,
}

/// Response rate limiting (RRL) of UDP answers, per client prefix and
/// response class.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    /// Responses per second a bucket refills.
    pub rate: f64,
    /// Most responses a bucket holds (rate x window).
    pub burst: f64,
    /// Every `slip`-th limited response is sent truncated; 0: none.
    pub slip: u32,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    pub exempt: Vec<ipnet::IpNet>,
}

/// GeoIP and EDNS Client Subnet settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GeoConfig {
    pub database: Option<PathBuf>,
    pub check_interval: Duration,
    pub ecs: bool,
    pub max_prefix_v4: u8,
    pub max_prefix_v6: u8,
}

/// A place a client or a region is at.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Place {
    pub country: Option<crate::geo::Code>,
    pub continent: Option<crate::geo::Code>,
    pub coords: Option<(f64, f64)>,
}

/// Clients in `network` are at `place` (a region's location, for a region pin).
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub network: ipnet::IpNet,
    pub place: Place,
    /// The region it pins to, for explanations.
    pub region: Option<String>,
}

/// How a service chooses among fit regions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Strategy {
    /// The first tier with a fit endpoint, all of its fit endpoints.
    Failover,
    /// Within that tier, the regions with the lowest estimated latency for
    /// the client (within `tolerance` of the best).
    Proximity { tolerance: Duration },
    /// Within that tier, endpoints drawn by capacity weight (headroom x size).
    Capacity,
    /// The cheapest fit region with at least `min_headroom`; ties by headroom.
    Cost { min_headroom: f64 },
}

/// Where clients of a residency class may be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    Any,
    Deny,
    /// Regions carrying at least one of these jurisdiction tags.
    Only(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ResidencyRule {
    /// Country codes it names, directly or through a group (`eu` included).
    pub countries: Vec<crate::geo::Code>,
    pub continents: Vec<crate::geo::Code>,
    /// It names the built-in group `eu`: it also holds clients the GeoIP
    /// database flags `is_in_european_union`, whatever their code.
    pub eu: bool,
    pub allow: Allowed,
    /// The clients as written, for explanations.
    pub label: String,
}

/// Residency classes: each rule, then `otherwise`, then `unknown`.
#[derive(Debug, Clone, PartialEq)]
pub struct Residency {
    pub rules: Vec<ResidencyRule>,
    pub otherwise: Allowed,
    pub unknown: Allowed,
    /// Without ECS the client's location is unknown (not the resolver's).
    pub without_ecs_unknown: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub dns_listen: Vec<SocketAddr>,
    pub admin_listen: SocketAddr,
    pub startup_grace: Duration,
    pub tcp_idle_timeout: Duration,
    pub tcp_max_connections: u32,
    pub tcp_max_per_address: u32,
    pub max_udp_payload: u16,
    /// NSID payload, at most 128 bytes; empty means none.
    pub nsid: String,
    pub explain_acl: Vec<ipnet::IpNet>,
    /// Bearer token of the mutating admin routes; `None` disables them.
    pub admin_token: Option<Secret>,
    /// The read routes need the token too.
    pub admin_token_for_reads: bool,
    pub admin_limits: AdminLimits,
}

/// What one admin API client may hold (read at start; a reload does not
/// change them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminLimits {
    /// Open connections; more are closed at once.
    pub max_connections: u32,
    /// The request head (and an idle connection's next head) must arrive
    /// within this.
    pub header_timeout: Duration,
    /// The request body must arrive within this after the head.
    pub body_timeout: Duration,
    /// Largest request head, in bytes.
    pub max_header_bytes: u32,
}

/// A value that never shows in logs or debug output.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ZoneConfig {
    /// Fully qualified apex.
    pub apex: Name,
    pub soa: Soa,
    /// NS names of the apex, in config order.
    pub ns: Vec<Name>,
    /// Static records: the zone file plus the glue of in-zone name servers.
    pub records: Vec<Record>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Soa {
    pub primary: Name,
    pub contact: Name,
    pub serial: u32,
    pub refresh: u32,
    pub retry: u32,
    pub expire: u32,
    pub minimum: u32,
    pub ttl: u32,
}

/// A place that can serve inference.
#[derive(Debug, Clone, PartialEq)]
pub struct Region {
    pub id: String,
    pub endpoints: Vec<Endpoint>,
    pub location: Option<Place>,
    pub jurisdictions: Vec<String>,
    pub capacity: RegionCapacity,
}

/// Static capacity of a region and how its reports are read.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionCapacity {
    pub gpus: f64,
    pub weight: f64,
    pub cost: Option<f64>,
    pub max_age: Duration,
    pub queue_saturation: f64,
}

/// Scraping a model server's metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MetricsSpec {
    pub path: String,
    pub interval: Duration,
    pub preset: crate::capacity::Preset,
    pub preset_name: String,
}

/// What an endpoint contributes to an answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Address(IpAddr),
    Cname(Name),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Address(ip) => ip.fmt(f),
            Target::Cname(name) => name.fmt(f),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub target: Target,
    pub probe: ProbeSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

/// How one endpoint is probed. The probe always connects to `addr`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProbeSpec {
    pub addr: SocketAddr,
    pub scheme: Scheme,
    pub path: String,
    /// Exact status wanted; `None` accepts any 2xx.
    pub expect_status: Option<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    /// Consecutive failures (timeouts, 5xx, ...) that take an endpoint down.
    pub fall: u32,
    /// Consecutive refused or reset connections of the alive probe that
    /// take an endpoint down.
    pub fall_refused: u32,
    pub host: Option<String>,
    pub tls_server_name: Option<String>,
    pub kind: ProbeKind,
    pub models: Option<ModelsSpec>,
    pub completion: Option<CompletionSpec>,
    /// A private CA (PEM) to trust.
    pub ca_pem: Option<Vec<u8>>,
    pub api_key: Option<Secret>,
    /// Cool-down after a 429 without Retry-After.
    pub cooldown: Duration,
    /// Ramp of a recovered endpoint's share; zero is off.
    pub slow_start: Duration,
    pub metrics: Option<MetricsSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    Http,
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelsSpec {
    pub path: String,
    pub interval: Duration,
    /// The entry field that holds the version; `None`: `root`, `digest`.
    pub version_field: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CompletionSpec {
    pub path: String,
    pub model: String,
    pub interval: Duration,
    pub timeout: Duration,
}

/// What a service answers when none of its endpoints is fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllDown {
    /// Answer as if every endpoint were fit (the first tier).
    FailOpen,
    /// NOERROR with no records.
    NoData,
    /// SERVFAIL.
    ServFail,
}

impl AllDown {
    /// The `when-all-down` value that names this rule.
    pub fn name(self) -> &'static str {
        match self {
            AllDown::FailOpen => "fail-open",
            AllDown::NoData => "nodata",
            AllDown::ServFail => "servfail",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub id: String,
    /// Fully qualified name under the apex.
    pub name: Name,
    /// Region indexes into `Config::regions`, best tier first.
    pub tiers: Vec<Vec<usize>>,
    pub ttl: u32,
    pub when_all_down: AllDown,
    /// How long the endpoints fit last are answered when everything went
    /// unfit together, before `when_all_down` applies; zero is off.
    pub last_known_good: Duration,
    pub strategy: Strategy,
    pub residency: Option<Residency>,
    pub model: Option<String>,
    /// Index of the fallback service.
    pub fallback: Option<usize>,
    pub max_latency: Option<Duration>,
    /// Records per answer for the capacity strategy.
    pub records: usize,
    pub sticky: bool,
    pub watermarks: crate::capacity::Watermarks,
    /// When load alone takes a region out of this service's answers.
    pub shed: crate::capacity::Shed,
    /// `shed` was written in the config (else it is the strategy's default).
    pub shed_set: bool,
    pub criticality: crate::capacity::Criticality,
    /// A model-version rollout (then `model` is unset: the versions are
    /// what endpoints must list).
    pub rollout: Option<Rollout>,
    /// Adaptive TTL floor; equal to `ttl` when off.
    pub ttl_min: u32,
}

/// One problem found while loading, with its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

/// Every problem found while loading, in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A source text with its path, able to turn byte offsets into line:col.
pub(crate) struct Source<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl Source<'_> {
    /// 1-based line and column (in characters) of a byte offset.
    pub fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }

    pub fn error(&self, span: std::ops::Range<usize>, message: impl Into<String>) -> ConfigError {
        let (line, col) = self.position(span.start);
        ConfigError {
            file: self.path.to_path_buf(),
            line,
            col,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_lines_and_columns() {
        let text = "a = 1\nbb = \"é2\"\n";
        let src = Source {
            path: Path::new("x.toml"),
            text,
        };
        assert_eq!(src.position(0), (1, 1));
        assert_eq!(src.position(6), (2, 1));
        // After the two-byte 'é' the column counts characters, not bytes.
        let after = text.find('2').unwrap();
        assert_eq!(src.position(after), (2, 8));
        assert_eq!(src.position(10_000), (3, 1));
    }
}
