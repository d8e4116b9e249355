//! The edge fleet: what this edge tells its peers it observed, what it
//! heard from them, and how the vantage points combine into one state per
//! endpoint layer.
//!
//! Owns: the observation format (JSON on `GET /v1/fleet/observations`),
//! the quorum rule, the peers' last views (kept by the publisher) and the
//! seed of the choices every edge makes alike. There is no controller and
//! no protocol of our own beyond "pull the peers' latest observations":
//! every edge combines the same inputs with the same rule, so edges agree
//! as soon as they have heard each other. Must not touch the query path
//! (the publisher folds the combined states into the snapshot).
//!
//! What an edge shares is its *own* observations (after its own rise/fall),
//! never the combined state: a combined state passed around would outvote
//! the probes that made it.

pub mod pull;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::health::Status;

/// How many vantage points (this edge and its fresh peers) must see an
/// endpoint layer up for it to count as up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quorum {
    /// This edge's own view only (no fleet, or a fleet that only shares).
    Local,
    /// Up if any vantage point sees it up.
    AnyUp,
    /// Down only when more than half of the vantage points that have a
    /// view see it down; a fleet of which fewer than half are reachable
    /// uses the local view.
    Majority,
    /// Up while at least this many vantage points see it up.
    AtLeast(usize),
    /// Up while at least this percentage of the vantage points with a view
    /// see it up.
    Percent(u32),
}

impl Quorum {
    /// `"local"`, `"any-up"`, `"majority"`, `"2"`, `"60%"`; `fleet` is the
    /// number of edges (this one included).
    pub fn parse(text: &str, fleet: usize) -> Result<Quorum, String> {
        let t = text.trim();
        match t {
            "local" => return Ok(Quorum::Local),
            "any-up" => return Ok(Quorum::AnyUp),
            "majority" => return Ok(Quorum::Majority),
            _ => {}
        }
        if let Some(p) = t.strip_suffix('%') {
            return match p.trim().parse::<u32>() {
                Ok(p @ 1..=100) => Ok(Quorum::Percent(p)),
                _ => Err(format!("fleet.quorum {text:?}: a share is 1% to 100%")),
            };
        }
        match t.parse::<usize>() {
            Ok(k) if k >= 1 && k <= fleet => Ok(Quorum::AtLeast(k)),
            Ok(k) => Err(format!(
                "fleet.quorum {k} is out of range: the fleet has {fleet} edge(s), this one included"
            )),
            Err(_) => Err(format!(
                "fleet.quorum {text:?} is not \"local\", \"any-up\", \"majority\", a count (\"2\") or a share (\"60%\")"
            )),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Quorum::Local => "local".into(),
            Quorum::AnyUp => "any-up".into(),
            Quorum::Majority => "majority".into(),
            Quorum::AtLeast(k) => k.to_string(),
            Quorum::Percent(p) => format!("{p}%"),
        }
    }

    /// Views (this edge's included) an endpoint layer needs for the fleet
    /// to decide it; with fewer, this edge's own view decides.
    pub fn required(&self, fleet: usize) -> usize {
        match self {
            Quorum::Local | Quorum::AnyUp => 1,
            Quorum::Majority => fleet / 2 + 1,
            Quorum::AtLeast(k) => *k,
            Quorum::Percent(p) => (fleet * *p as usize).div_ceil(100).max(1),
        }
    }

    /// Whether `up` of `voters` views make the layer up.
    fn up(&self, up: usize, voters: usize) -> bool {
        match self {
            Quorum::Local | Quorum::AnyUp => up >= 1,
            Quorum::Majority => (voters - up) * 2 <= voters,
            Quorum::AtLeast(k) => up >= *k,
            Quorum::Percent(p) => up * 100 >= *p as usize * voters,
        }
    }
}

/// One layer's state as the fleet decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub status: Status,
    /// Views that counted (known states from fresh vantage points).
    pub voters: usize,
    pub up: usize,
    /// Too few views: this edge's own decided.
    pub local: bool,
}

/// Combines this edge's view of a layer with its fresh peers' views.
pub fn decide(
    quorum: Quorum,
    fleet: usize,
    local: Status,
    peers: impl Iterator<Item = Status>,
) -> Verdict {
    let (mut voters, mut up) = (0, 0);
    for s in std::iter::once(local).chain(peers) {
        if s != Status::Unknown {
            voters += 1;
            up += usize::from(s == Status::Up);
        }
    }
    if quorum == Quorum::Local || voters < quorum.required(fleet) {
        return Verdict {
            status: local,
            voters,
            up,
            local: true,
        };
    }
    let status = if quorum.up(up, voters) {
        Status::Up
    } else {
        Status::Down
    };
    Verdict {
        status,
        voters,
        up,
        local: false,
    }
}

/// A 64-bit seed from the config's text (FNV-1a: stable across builds and
/// platforms, unlike the standard library's hasher, so that edges running
/// different releases still choose alike).
pub fn seed_of(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `key` mixed with `seed` (the splitmix64 finaliser): a client subnet's
/// key for the fleet's choices.
pub fn mix(key: u64, seed: u64) -> u64 {
    let mut z = key ^ seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A number in [0, 1) from a mixed key: the same for every edge.
pub fn unit(key: u64, salt: u64) -> f64 {
    (mix(key, salt) >> 11) as f64 / (1u64 << 53) as f64
}

/// `data` gzipped (fast: a pull is small and frequent).
pub fn gzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 4),
        flate2::Compression::fast(),
    );
    encoder.write_all(data)?;
    encoder.finish()
}

/// `data` gunzipped, refused when it would be larger than `limit` (a small
/// body can hold a huge one).
pub fn gunzip(data: &[u8], limit: usize) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("not gzip: {e}"))?;
    if out.len() > limit {
        return Err(format!("body larger than {} MiB unpacked", limit >> 20));
    }
    Ok(out)
}

/// What one edge observed, as served to its peers.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Observations {
    /// The edge that observed.
    pub edge: String,
    pub endpoints: Vec<EndpointObs>,
    #[serde(default)]
    pub regions: Vec<RegionObs>,
}

/// One endpoint as an edge sees it, after its own rise/fall.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EndpointObs {
    pub region: String,
    /// The endpoint as the config writes it (with `region`, its key).
    pub target: String,
    pub alive: LayerObs,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<LayerObs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<LayerObs>,
    /// The model ids its last model list read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_list: Option<Vec<String>>,
    /// The type of its last probe error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Median alive-probe time and smoothed completion time, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
}

/// A layer's state and how long ago its probe last reported.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct LayerObs {
    pub state: Status,
    pub age_ms: u64,
}

/// A region's load as an edge last read it (scraped or pushed).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RegionObs {
    pub id: String,
    pub utilization: f64,
    pub gpus: f64,
    /// How old the report is.
    pub age_ms: u64,
}

impl Observations {
    /// Refuses what no edge would send: values out of range.
    pub fn validate(&self) -> Result<(), String> {
        for r in &self.regions {
            if !(0.0..=1.0).contains(&r.utilization) || !r.gpus.is_finite() || r.gpus < 0.0 {
                return Err(format!(
                    "region {:?}: utilization or gpus out of range",
                    r.id
                ));
            }
        }
        for e in &self.endpoints {
            let bad = |v: Option<f64>| v.is_some_and(|v| !v.is_finite() || v < 0.0);
            if bad(e.rtt_ms) || bad(e.ttft_ms) {
                return Err(format!(
                    "endpoint {:?}: negative or infinite time",
                    e.target
                ));
            }
        }
        Ok(())
    }
}

/// A peer's last observations, mapped onto this edge's endpoints.
#[derive(Debug, Clone)]
pub struct PeerView {
    pub name: String,
    pub url: String,
    /// The last good pull: what it said, and when it arrived.
    pub last: Option<(Arc<Observations>, Instant)>,
    /// By this edge's global endpoint index: the position in `last`.
    pub by_endpoint: Vec<Option<u32>>,
    /// By region index: the position in `last.regions`.
    pub by_region: Vec<Option<u32>>,
    pub last_error: Option<String>,
    pub pulls_ok: u64,
    pub pulls_failed: u64,
    pub bytes: u64,
}

impl PeerView {
    pub fn new(name: String, url: String) -> Self {
        PeerView {
            name,
            url,
            last: None,
            by_endpoint: Vec::new(),
            by_region: Vec::new(),
            last_error: None,
            pulls_ok: 0,
            pulls_failed: 0,
            bytes: 0,
        }
    }

    /// Its views count until `expiry` after its last good pull.
    pub fn fresh(&self, now: Instant, expiry: Duration) -> bool {
        self.last
            .as_ref()
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) < expiry)
    }

    /// When its views stop counting.
    pub fn expires(&self, expiry: Duration) -> Option<Instant> {
        self.last.as_ref().map(|(_, at)| *at + expiry)
    }

    /// Maps its observations onto endpoints keyed (region, target) and
    /// regions by id.
    pub fn index(
        &mut self,
        endpoints: &HashMap<(String, String), usize>,
        endpoint_count: usize,
        regions: &HashMap<String, usize>,
    ) {
        self.by_endpoint = vec![None; endpoint_count];
        self.by_region = vec![None; regions.len()];
        let Some((obs, _)) = &self.last else {
            return;
        };
        for (i, e) in obs.endpoints.iter().enumerate() {
            if let Some(&g) = endpoints.get(&(e.region.clone(), e.target.clone())) {
                self.by_endpoint[g] = Some(i as u32);
            }
        }
        for (i, r) in obs.regions.iter().enumerate() {
            if let Some(&g) = regions.get(&r.id) {
                self.by_region[g] = Some(i as u32);
            }
        }
    }

    /// What it observed of endpoint `g`.
    pub fn endpoint(&self, g: usize) -> Option<&EndpointObs> {
        let i = (*self.by_endpoint.get(g)?)?;
        self.last.as_ref()?.0.endpoints.get(i as usize)
    }

    /// Its report of region `r`'s load, with the time it was read.
    pub fn region(&self, r: usize) -> Option<(&RegionObs, Instant)> {
        let i = (*self.by_region.get(r)?)?;
        let (obs, at) = self.last.as_ref()?;
        let report = obs.regions.get(i as usize)?;
        Some((
            report,
            at.checked_sub(Duration::from_millis(report.age_ms))?,
        ))
    }
}

/// One vantage point's view of an endpoint, for status and explain.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VantageView {
    pub edge: String,
    pub alive: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion: Option<Status>,
    /// How old the view is (the peer's pull plus its probe's age).
    pub age_s: f64,
    /// Past its expiry: shown, not counted.
    pub stale: bool,
}

/// How the fleet decided an endpoint, for status.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointQuorum {
    pub quorum: String,
    /// The combined alive state.
    pub result: Status,
    /// Views that counted, and how many saw it up.
    pub voters: usize,
    pub up: usize,
    /// Too few views: this edge's own decided.
    pub local_fallback: bool,
    pub views: Vec<VantageView>,
}

/// The fleet as this edge sees it, for status.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetView {
    pub edge: String,
    pub quorum: String,
    /// Edges in the fleet, this one included, and those with fresh views.
    pub edges: usize,
    pub fresh: usize,
    /// `complete` (every peer fresh), `degraded` (some peer stale, still
    /// enough for the quorum) or `local` (too few: this edge's own view).
    pub state: &'static str,
    pub peers: Vec<PeerStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerStatus {
    pub name: String,
    pub url: String,
    pub fresh: bool,
    /// Since its last good pull.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub pulls_ok: u64,
    pub pulls_failed: u64,
    pub bytes: u64,
}

/// The fleet state name for `fresh` of `edges` vantage points.
pub fn fleet_state(quorum: Quorum, edges: usize, fresh: usize) -> &'static str {
    if fresh >= edges {
        "complete"
    } else if quorum != Quorum::Local && fresh >= quorum.required(edges) {
        "degraded"
    } else {
        "local"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Status::{Down, Unknown, Up};

    fn verdict(q: Quorum, local: Status, peers: &[Status]) -> (Status, bool) {
        let v = decide(q, 3, local, peers.iter().copied());
        (v.status, v.local)
    }

    #[test]
    fn majority_needs_more_than_half_to_see_it_down() {
        // One edge cut off from a region: the other two keep it up.
        assert_eq!(verdict(Quorum::Majority, Down, &[Up, Up]), (Up, false));
        assert_eq!(verdict(Quorum::Majority, Up, &[Down, Up]), (Up, false));
        // Really dead: everybody sees it.
        assert_eq!(verdict(Quorum::Majority, Down, &[Down, Up]), (Down, false));
        // One peer gone (no view): the two left decide; a tie keeps it up.
        assert_eq!(verdict(Quorum::Majority, Down, &[Up, Unknown]), (Up, false));
        assert_eq!(
            verdict(Quorum::Majority, Down, &[Down, Unknown]),
            (Down, false)
        );
        // Alone of three: its own view, said to be local.
        assert_eq!(
            verdict(Quorum::Majority, Down, &[Unknown, Unknown]),
            (Down, true)
        );
        assert_eq!(verdict(Quorum::Majority, Up, &[]), (Up, true));
        // A restarted edge that has not probed yet takes its peers' view.
        assert_eq!(verdict(Quorum::Majority, Unknown, &[Up, Up]), (Up, false));
    }

    #[test]
    fn counts_and_shares() {
        assert_eq!(verdict(Quorum::AnyUp, Down, &[Down, Up]), (Up, false));
        assert_eq!(verdict(Quorum::AnyUp, Down, &[Down, Down]), (Down, false));
        assert_eq!(
            verdict(Quorum::AtLeast(2), Up, &[Down, Down]),
            (Down, false)
        );
        assert_eq!(verdict(Quorum::AtLeast(2), Up, &[Up, Down]), (Up, false));
        // Two views needed, one there: local.
        assert_eq!(verdict(Quorum::AtLeast(2), Up, &[Unknown]), (Up, true));
        assert_eq!(verdict(Quorum::Percent(60), Up, &[Up, Down]), (Up, false));
        assert_eq!(verdict(Quorum::Percent(70), Up, &[Up, Down]), (Down, false));
        assert_eq!(verdict(Quorum::Local, Down, &[Up, Up]), (Down, true));
    }

    #[test]
    fn quorum_text() {
        assert_eq!(Quorum::parse("majority", 3), Ok(Quorum::Majority));
        assert_eq!(Quorum::parse("2", 3), Ok(Quorum::AtLeast(2)));
        assert_eq!(Quorum::parse("60%", 3), Ok(Quorum::Percent(60)));
        assert!(Quorum::parse("4", 3).is_err());
        assert!(Quorum::parse("0", 3).is_err());
        assert!(Quorum::parse("120%", 3).is_err());
        assert!(Quorum::parse("most", 3).is_err());
        assert_eq!(Quorum::Majority.required(3), 2);
        assert_eq!(Quorum::Majority.required(2), 2);
        assert_eq!(Quorum::Percent(50).required(3), 2);
    }

    #[test]
    fn the_fleet_state_says_when_the_local_view_decides() {
        assert_eq!(fleet_state(Quorum::Majority, 3, 3), "complete");
        assert_eq!(fleet_state(Quorum::Majority, 3, 2), "degraded");
        assert_eq!(fleet_state(Quorum::Majority, 3, 1), "local");
    }

    #[test]
    fn a_small_gzip_body_that_unpacks_huge_is_refused() {
        let bomb = gzip(&vec![0u8; 9 << 20]).unwrap();
        assert!(bomb.len() < 64 << 10, "{} bytes", bomb.len());
        let e = gunzip(&bomb, 8 << 20).unwrap_err();
        assert!(e.contains("larger than 8 MiB unpacked"), "{e}");
        let small = gzip(b"{\"edge\":\"b\"}").unwrap();
        assert_eq!(gunzip(&small, 8 << 20).unwrap(), b"{\"edge\":\"b\"}");
        assert!(gunzip(b"not gzip", 1024).is_err());
    }

    #[test]
    fn the_seed_is_stable_and_spreads() {
        // FNV-1a of "" and "a": the published test vectors.
        assert_eq!(seed_of(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(seed_of("a"), 0xaf63_dc4c_8601_ec8c);
        let below = (0..10_000u64).filter(|k| unit(*k, 7) < 0.25).count();
        assert!((2_300..2_700).contains(&below), "{below}");
    }
}
