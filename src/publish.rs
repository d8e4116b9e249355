//! The publisher: the one task that builds snapshots and swaps them in.
//!
//! Owns: the health state machine of every endpoint, operator overrides
//! (drained regions), the config in force, the generation counter, and the
//! `ArcSwap` the query path reads. Probes, reloads and admin requests send
//! it messages; it applies them in order, rebuilds what changed and
//! publishes a whole new snapshot, so config, health and answers are always
//! seen together.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::capacity::{self, Level, PushReport};
use crate::config::Config;
use crate::geo::GeoDb;
use crate::health::{
    HealthState, Layer, Payload, ProbeError, ProbeHints, ProbeReport, Status, silence_limit,
};
use crate::metrics::{Metrics, QueryTable};
use crate::model::{self, EndpointIndex, RegionLoad, Snapshot, Zone};

mod build;
mod fleet;
mod last_good;
mod rollout;

/// Everything the publisher can be told.
#[derive(Debug)]
pub enum Msg {
    Probe(ProbeReport),
    /// A checked new config; `ids[i]` is the probe id of global endpoint `i`.
    /// `done` gets the generation that first serves it.
    Reload {
        config: Arc<Config>,
        ids: Vec<u64>,
        geo: Option<Arc<GeoDb>>,
        done: oneshot::Sender<u64>,
    },
    /// A GeoIP database (re)loaded because its file was replaced.
    Geo(Arc<GeoDb>),
    /// A checked capacity report pushed for a region; `done` gets the
    /// generation, or an error for an unknown region.
    Capacity {
        region: String,
        report: PushReport,
        done: oneshot::Sender<Result<u64, String>>,
    },
    /// Drain (or undrain) a region by id; `done` gets the generation, or an
    /// error for an unknown region.
    Drain {
        region: String,
        drained: bool,
        done: oneshot::Sender<Result<u64, String>>,
    },
    /// A pull of a fleet peer, good or not.
    Peer(crate::fleet::pull::Pulled),
    /// This edge's own observations, for a peer.
    Observe(oneshot::Sender<crate::fleet::Observations>),
    /// The fleet as this edge sees it now (`None` without peers).
    Fleet(oneshot::Sender<Option<crate::fleet::FleetView>>),
    /// An operator promotes (or rolls back) a service's canary; `done` gets
    /// the generation, or why not.
    Rollout {
        service: String,
        promote: bool,
        done: oneshot::Sender<Result<u64, String>>,
    },
}

impl From<ProbeReport> for Msg {
    fn from(report: ProbeReport) -> Self {
        Msg::Probe(report)
    }
}

/// Fixed facts about one endpoint, by global index.
struct EndpointInfo {
    region: String,
    target: String,
    probe: String,
    rise: u32,
    fall: u32,
    /// Refused or reset connections of the alive probe that take it down.
    fall_refused: u32,
    layers: Vec<Layer>,
    /// The health layers with their silence limits (3 x interval + timeout).
    silence: Vec<(Layer, Duration)>,
    cooldown: Duration,
    slow_start: Duration,
    completion_model: Option<String>,
    /// One probe cycle (interval + timeout): endpoints that went unfit
    /// within one of each other went unfit together (last known good).
    cycle: Duration,
}

#[derive(Debug, Default, Clone)]
struct EndpointHealth {
    state: HealthState,
    last_error: Option<ProbeError>,
    since: Option<SystemTime>,
    /// Measured time of successful alive probes, in ms: the median of `rtt`.
    latency_ms: Option<f64>,
    rtt: RttWindow,
    /// L2: the model list probe, and the last list it read.
    models_state: HealthState,
    models: Option<Arc<[String]>>,
    /// The synthetic completion probe and its smoothed time, in ms.
    completion_state: HealthState,
    completion_ms: Option<f64>,
    /// Out of answers until then (429).
    cooling_until: Option<Instant>,
    /// Up again since then, after being down (slow start).
    up_since: Option<Instant>,
    /// The last load its metrics showed, and when.
    load: Option<(crate::capacity::Load, Instant)>,
    /// When each health layer last reported (or its probe started).
    heard: Vec<(Layer, Instant)>,
    /// Whether the alive probe's latest result was a success.
    alive_ok: Option<bool>,
    /// Refusals of a layer above alive that arrived while the alive layer
    /// was up and answering: counted against their layer only if the next
    /// alive probe succeeds (then the alive layer does not explain them).
    held: Vec<(Layer, ProbeError)>,
    /// The completion probe is not being sent: the region is full.
    completion_skipped: bool,
    /// `inferdns_probes_total` by layer and result, as used so far.
    probe_counters: Vec<(Layer, &'static str, prometheus::IntCounter)>,
    /// `inferdns_probe_duration_seconds` of the endpoint's region.
    probe_seconds: Option<prometheus::Histogram>,
}

impl EndpointHealth {
    /// A new endpoint whose probes were started about `now`.
    fn watching(info: &EndpointInfo, now: Instant) -> Self {
        Self {
            heard: info.silence.iter().map(|(l, _)| (*l, now)).collect(),
            ..Self::default()
        }
    }

    /// The first health layer silent for longer than its limit at `now`,
    /// with that limit.
    fn silent(&self, info: &EndpointInfo, now: Instant) -> Option<(Layer, Duration)> {
        info.silence.iter().copied().find(|(layer, limit)| {
            self.heard
                .iter()
                .find(|(l, _)| l == layer)
                .is_some_and(|(_, at)| now.saturating_duration_since(*at) >= *limit)
        })
    }
}

fn layer_name(layer: Layer) -> &'static str {
    match layer {
        Layer::Alive => "alive",
        Layer::Models => "model list",
        Layer::Completion => "completion",
        Layer::Metrics => "metrics",
    }
}

/// The reason shown in status and explain for a silent layer.
fn silence_reason(layer: Layer, limit: Duration) -> String {
    format!(
        "no {} probe result for over {:.1} s",
        layer_name(layer),
        limit.as_secs_f64()
    )
}

/// Why a completion probe is not sent, as status shows it.
const SKIPPED_FULL: &str = "completion probe skipped: region full";

/// The longest a 429 takes an endpoint out, whatever its Retry-After says.
const MAX_COOLDOWN: Duration = Duration::from_secs(3600);

/// Weight of a new completion time in the smoothed completion latency.
const LATENCY_SMOOTHING: f64 = 0.3;

/// The most a region's measured probe time adds to a proximity estimate,
/// in ms: less than the distance between continents (a Toronto client is
/// ~70 ms nearer Virginia than Dublin), so only the distance model can send
/// a client to another continent, while a sustained difference still moves
/// clients between nearby regions.
pub const MAX_MEASURED_MS: f64 = 30.0;

/// How many recent alive-probe times an endpoint's measured time is the
/// median of: a stall of the edge (or one slow probe) moves it only when
/// it lasts for half of them.
const RTT_WINDOW: usize = 9;

/// The last [`RTT_WINDOW`] probe times of an endpoint, in ms.
#[derive(Debug, Default, Clone, Copy)]
struct RttWindow {
    samples: [f64; RTT_WINDOW],
    len: usize,
    next: usize,
}

impl RttWindow {
    fn push(&mut self, ms: f64) {
        self.samples[self.next] = ms;
        self.next = (self.next + 1) % RTT_WINDOW;
        self.len = (self.len + 1).min(RTT_WINDOW);
    }

    /// The lower median of the samples (`None` before the first).
    fn median(&self) -> Option<f64> {
        let mut sorted = self.samples;
        let sorted = &mut sorted[..self.len];
        sorted.sort_by(f64::total_cmp);
        sorted.get(self.len.saturating_sub(1) / 2).copied()
    }
}

/// Everything derived from one config.
struct Loaded {
    config: Arc<Config>,
    index: EndpointIndex,
    zone: Arc<Zone>,
    /// The zone's names with their pre-encoded answers (per config).
    wire_names: Arc<crate::model::wire::Names>,
    info: Vec<EndpointInfo>,
    /// Probe id per global endpoint index, and back.
    ids: Vec<u64>,
    by_id: HashMap<u64, usize>,
    queries: Arc<QueryTable>,
    explain_acl: Arc<Vec<ipnet::IpNet>>,
    overrides: Arc<Vec<crate::config::Override>>,
    /// Region index of each global endpoint.
    region_of: Vec<usize>,
    /// The global endpoint indexes of each region.
    region_endpoints: Vec<std::ops::Range<usize>>,
    /// The distinct regions of each service, in tier order, one after the
    /// other: service `i`'s are `service_regions[service_span[i].clone()]`.
    /// Per-(service, region) state is kept in vectors of the same layout.
    service_regions: Vec<usize>,
    service_span: Vec<std::ops::Range<usize>>,
    /// The services that use each region.
    region_services: Vec<Vec<usize>>,
    /// Region index by id.
    region_by_id: HashMap<String, usize>,
    /// Global endpoint index by (region id, target): how peers name them.
    endpoint_by_key: HashMap<(String, String), usize>,
    /// The rollouts over each region: (service index, canary version).
    region_canaries: Vec<Vec<(usize, String)>>,
    /// The distinct last-known-good holds of the services (not zero), shortest first.
    holds: Vec<Duration>,
}

/// Drops `value` (a whole snapshot, configs a reload replaced: tens of
/// milliseconds of `free` at 10,000 services) off the publisher's path, on
/// a thread of its own, then returns the freed pages to the system.
/// Dropped here when no thread can be started.
fn drop_aside<T: Send + 'static>(value: T) {
    let work = move || {
        drop(value);
        crate::memory::release();
    };
    // On an error the closure, and with it `value`, is dropped here.
    let _ = std::thread::Builder::new()
        .name("inferdns-free".into())
        .spawn(work);
}

impl Loaded {
    fn new(config: Arc<Config>, ids: Vec<u64>, metrics: &Metrics) -> Loaded {
        let index = EndpointIndex::new(&config);
        assert_eq!(ids.len(), index.len(), "one probe id per endpoint");
        let mut info = Vec::with_capacity(index.len());
        let mut region_of = Vec::with_capacity(index.len());
        for (r, region) in config.regions.iter().enumerate() {
            for endpoint in &region.endpoints {
                region_of.push(r);
                let p = &endpoint.probe;
                let scheme = match p.scheme {
                    crate::config::Scheme::Http => "http",
                    crate::config::Scheme::Https => "https",
                };
                let mut layers = vec![Layer::Alive];
                layers.extend(p.models.as_ref().map(|_| Layer::Models));
                layers.extend(p.completion.as_ref().map(|_| Layer::Completion));
                let mut silence = vec![(Layer::Alive, silence_limit(p.interval, p.timeout))];
                silence.extend(
                    p.models
                        .as_ref()
                        .map(|m| (Layer::Models, silence_limit(m.interval, p.timeout))),
                );
                silence.extend(
                    p.completion
                        .as_ref()
                        .map(|c| (Layer::Completion, silence_limit(c.interval, c.timeout))),
                );
                info.push(EndpointInfo {
                    region: region.id.clone(),
                    target: endpoint.target.to_string(),
                    probe: match p.kind {
                        crate::config::ProbeKind::Tcp => format!("tcp://{}", p.addr),
                        crate::config::ProbeKind::Http => {
                            format!("{scheme}://{}{}", p.addr, p.path)
                        }
                    },
                    rise: p.rise,
                    fall: p.fall,
                    fall_refused: p.fall_refused,
                    layers,
                    silence,
                    cooldown: p.cooldown,
                    slow_start: p.slow_start,
                    completion_model: p.completion.as_ref().map(|c| c.model.clone()),
                    cycle: p.interval + p.timeout,
                });
            }
        }
        let service_ids: Vec<String> = config.services.iter().map(|s| s.id.clone()).collect();
        let region_endpoints = (0..config.regions.len())
            .map(|r| {
                let start = index.global(r, 0);
                start..start + config.regions[r].endpoints.len()
            })
            .collect();
        let mut region_services = vec![Vec::new(); config.regions.len()];
        let mut service_regions: Vec<usize> = Vec::new();
        let mut service_span = Vec::with_capacity(config.services.len());
        for (i, s) in config.services.iter().enumerate() {
            let start = service_regions.len();
            for &r in s.tiers.iter().flatten() {
                if !service_regions[start..].contains(&r) {
                    service_regions.push(r);
                    region_services[r].push(i);
                }
            }
            service_span.push(start..service_regions.len());
        }
        let mut holds: Vec<Duration> = config
            .services
            .iter()
            .map(|s| s.last_known_good)
            .filter(|h| !h.is_zero())
            .collect();
        holds.sort_unstable();
        holds.dedup();
        let zone = Arc::new(Zone::compile(&config));
        let endpoint_by_key = info
            .iter()
            .enumerate()
            .map(|(g, i)| ((i.region.clone(), i.target.clone()), g))
            .collect();
        let mut region_canaries = vec![Vec::new(); config.regions.len()];
        for (i, s) in config.services.iter().enumerate() {
            if let Some(canary) = s.rollout.as_ref().and_then(|r| r.canary.as_ref()) {
                for &r in &service_regions[service_span[i].clone()] {
                    region_canaries[r].push((i, canary.clone()));
                }
            }
        }
        Loaded {
            region_canaries,
            endpoint_by_key,
            wire_names: Arc::new(crate::dns::wire::compile_names(&zone)),
            zone,
            region_by_id: config
                .regions
                .iter()
                .enumerate()
                .map(|(i, r)| (r.id.clone(), i))
                .collect(),
            holds,
            region_endpoints,
            service_regions,
            service_span,
            region_services,
            by_id: ids.iter().enumerate().map(|(i, id)| (*id, i)).collect(),
            queries: Arc::new(metrics.query_table(&service_ids)),
            explain_acl: Arc::new(config.server.explain_acl.clone()),
            overrides: Arc::new(config.overrides.clone()),
            region_of,
            ids,
            info,
            index,
            config,
        }
    }
}

#[derive(Clone)]
/// Inputs of a snapshot that change with time: region latency and load,
/// the shedding level of each (service, region) pair (laid out as
/// `Loaded::service_regions`) and the TTL of each service.
struct Dynamic {
    latency_ms: Vec<f64>,
    loads: Vec<RegionLoad>,
    levels: Vec<Level>,
    ttls: Vec<u32>,
    /// Per global endpoint, how long ago it was last fit (last known good).
    fit_ago: Vec<Option<Duration>>,
}

/// A reload whose new endpoints have not all been probed yet.
struct Deferred {
    deadline: Instant,
    done: Vec<oneshot::Sender<u64>>,
}

pub struct Publisher {
    metrics: Arc<Metrics>,
    loaded: Loaded,
    /// Per global endpoint index.
    health: Vec<EndpointHealth>,
    drained: BTreeSet<String>,
    generation: u64,
    snapshot: Arc<ArcSwap<Snapshot>>,
    /// Probes (id, layer) that have not reported since they were started.
    pending_first: HashSet<(u64, Layer)>,
    first_round: watch::Sender<bool>,
    /// Every endpoint has reported once; tell `first_round` after the next publish.
    first_round_due: bool,
    deferred: Option<Deferred>,
    /// Health moved (a known endpoint changed status, or a timed change
    /// came due) while a reload waits for its new endpoints: the reload
    /// goes live now rather than hold the change back.
    health_moved: bool,
    geo: Option<Arc<GeoDb>>,
    /// Region latency (ms) in the published snapshot, by region index.
    published_latency: Vec<f64>,
    /// Pushed capacity reports by region id, with their time.
    pushed: HashMap<String, (PushReport, Instant)>,
    /// The shedding level of each (service, region) pair, laid out as
    /// `Loaded::service_regions`: hysteresis needs the last one.
    levels: Vec<Level>,
    /// The published weight of each (service, region) pair, for the
    /// adaptive TTL (`None` before the first).
    weights: Vec<Option<f64>>,
    /// When the last snapshot was built.
    last_publish: Instant,
    /// Region utilisation in the published snapshot, by region index.
    published_util: Vec<Option<f64>>,
    /// Probe layers (id, layer) silent past their limit, as last published.
    silent: HashSet<(u64, Layer)>,
    /// When each endpoint was last fit.
    fit_log: last_good::FitLog,
    /// Services answering last known good, as last published.
    holding: HashSet<String>,
    /// What the probe loops are told: recoveries and full regions.
    hints: watch::Sender<ProbeHints>,
    /// A publish waiting for the coalescing gap to pass.
    pending: Option<Instant>,
    /// A region's measured latency moved since the last publish.
    latency_moved: bool,
    /// How long the last build took (the coalescing gap follows it).
    build_cost: Duration,
    /// Builds the coalescing bucket held, and when.
    bucket: (f64, Instant),
    /// The drained flag and utilisation last set in each region's gauges.
    region_gauges: Vec<Option<(bool, Option<f64>)>>,
    /// What the published snapshot was built from; `None` when the next
    /// build compiles every service (at start, after a reload that changed
    /// more than services, after a rollback). After another reload it is
    /// carried over to the new config ([`build::Built::carried`]).
    built: Option<build::Built>,
    /// Configs replaced by reloads since the last build, freed after the
    /// next whole build (off the publisher, with the snapshot they served).
    replaced: Vec<Loaded>,
    /// The fleet's other edges, as last pulled.
    peers: Vec<crate::fleet::PeerView>,
    /// The fleet state last published (`complete`, `degraded`, `local`).
    fleet_state: &'static str,
    /// Each rollout's phase and checks, by service id (kept across reloads
    /// while the service rolls out the same canary).
    rollouts: HashMap<String, rollout::Tracked>,
}

impl Publisher {
    /// Builds generation 1 (every endpoint unknown) and returns the handle
    /// the query path reads and a flag that turns true once every endpoint
    /// has been probed once.
    pub fn new(
        config: Arc<Config>,
        ids: Vec<u64>,
        geo: Option<Arc<GeoDb>>,
        metrics: Arc<Metrics>,
    ) -> (Self, Arc<ArcSwap<Snapshot>>, watch::Receiver<bool>) {
        let loaded = Loaded::new(config, ids, &metrics);
        let (first_round, first_round_rx) = watch::channel(loaded.ids.is_empty());
        let peers = fleet::peer_views(&loaded, Vec::new());
        let now = Instant::now();
        let health: Vec<EndpointHealth> = loaded
            .info
            .iter()
            .map(|info| EndpointHealth::watching(info, now))
            .collect();
        let drained = BTreeSet::new();
        let published_latency = region_latency(&loaded, &health);
        let dynamic = Dynamic {
            latency_ms: published_latency.clone(),
            loads: loaded
                .config
                .regions
                .iter()
                .map(|r| RegionLoad {
                    util: None,
                    gpus: r.capacity.gpus,
                    base: r.capacity.weight,
                    cost: r.capacity.cost,
                })
                .collect(),
            levels: vec![Level::Normal; loaded.service_regions.len()],
            ttls: loaded.config.services.iter().map(|s| s.ttl).collect(),
            fit_ago: vec![None; loaded.ids.len()],
        };
        let first = build::build(
            build::BuildInputs {
                loaded: &loaded,
                health: &health,
                drained: &drained,
                generation: 1,
                geo: geo.clone(),
                dynamic,
                metrics: &metrics,
                overlay: &[],
                rollouts: &HashMap::new(),
            },
            None,
        );
        let snapshot = Arc::new(ArcSwap::from_pointee(first.snapshot));
        let levels = vec![Level::Normal; loaded.service_regions.len()];
        let weights = vec![None; loaded.service_regions.len()];
        let publisher = Self {
            pending_first: loaded
                .ids
                .iter()
                .zip(&loaded.info)
                .flat_map(|(id, info)| info.layers.iter().map(|l| (*id, *l)))
                .collect(),
            metrics,
            loaded,
            health,
            drained,
            generation: 1,
            snapshot: snapshot.clone(),
            first_round,
            first_round_due: false,
            deferred: None,
            health_moved: false,
            geo,
            published_latency,
            pushed: HashMap::new(),
            levels,
            weights,
            last_publish: Instant::now(),
            published_util: Vec::new(),
            silent: HashSet::new(),
            fit_log: last_good::FitLog::default(),
            holding: HashSet::new(),
            hints: watch::channel(ProbeHints::default()).0,
            built: Some(first.built),
            replaced: Vec::new(),
            region_gauges: Vec::new(),
            pending: None,
            latency_moved: false,
            build_cost: Duration::ZERO,
            bucket: (BURST, Instant::now()),
            peers,
            fleet_state: "complete",
            rollouts: HashMap::new(),
        };
        publisher.metrics.snapshot_generation.set(1);
        for view in &publisher.snapshot.load().service_views {
            publisher.metrics.set_decision(&view.id, &view.decision);
        }
        (publisher, snapshot, first_round_rx)
    }

    /// Tells the probe loops (through `hints`) when an endpoint's alive
    /// layer recovers and which regions are full.
    pub fn connect_probes(&mut self, hints: watch::Sender<ProbeHints>) {
        hints.send_replace(self.hints.borrow().clone());
        self.hints = hints;
    }

    /// Applies one message; returns true when answers or status changed
    /// (a moved probe latency is noted apart: `run` republishes it later).
    pub fn apply(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Probe(report) => {
                let endpoint = report.endpoint;
                let before = self.deferred.as_ref().and(self.known_status(endpoint));
                let changed = self.apply_probe(report);
                if before.is_some_and(|b| Some(b) != self.known_status(endpoint)) {
                    self.health_moved = true;
                }
                changed
            }
            Msg::Reload {
                config,
                ids,
                geo,
                done,
            } => {
                self.geo = geo;
                self.apply_reload(config, ids, done);
                true
            }
            Msg::Capacity {
                region,
                report,
                done,
            } => {
                if !self.loaded.config.regions.iter().any(|r| r.id == region) {
                    let _ = done.send(Err(format!("unknown region {region:?}")));
                    return false;
                }
                self.metrics
                    .capacity_reports
                    .with_label_values(&[region.as_str(), "push"])
                    .inc();
                self.pushed.insert(region, (report, Instant::now()));
                self.publish();
                let _ = done.send(Ok(self.generation));
                false
            }
            Msg::Peer(pulled) => self.apply_peer(pulled),
            Msg::Rollout {
                service,
                promote,
                done,
            } => {
                let result = self.operate_rollout(&service, promote);
                let _ = done.send(result);
                false
            }
            Msg::Observe(done) => {
                let _ = done.send(self.observations(Instant::now()));
                false
            }
            Msg::Fleet(done) => {
                let _ = done.send(self.fleet_view(Instant::now()));
                false
            }
            Msg::Geo(db) => {
                tracing::info!(path = %db.path.display(), build_epoch = db.build_epoch, "GeoIP database swapped in.");
                self.geo = Some(db);
                true
            }
            Msg::Drain {
                region,
                drained,
                done,
            } => {
                if !self.loaded.config.regions.iter().any(|r| r.id == region) {
                    let _ = done.send(Err(format!("unknown region {region:?}")));
                    return false;
                }
                // An operator's drain is applied now, not after a pending reload settles.
                if self.deferred.is_some() {
                    self.settle(true);
                }
                let changed = if drained {
                    self.drained.insert(region.clone())
                } else {
                    self.drained.remove(&region)
                };
                if changed {
                    tracing::info!(region = %region, drained, "Region drain changed by an operator.");
                    self.metrics
                        .region_drained
                        .with_label_values(&[region.as_str()])
                        .set(i64::from(drained));
                    self.publish();
                }
                let _ = done.send(Ok(self.generation));
                false
            }
        }
    }

    /// The status of each probed layer of an endpoint that was probed
    /// before (`None` for one not heard from yet: a reload's new endpoint,
    /// whose first report is what the reload waits for, not a change).
    fn known_status(&self, endpoint: u64) -> Option<(Status, Status, Status, bool)> {
        let h = &self.health[*self.loaded.by_id.get(&endpoint)?];
        (h.state.status != Status::Unknown).then_some((
            h.state.status,
            h.models_state.status,
            h.completion_state.status,
            h.cooling_until.is_some(),
        ))
    }

    fn apply_probe(&mut self, mut report: ProbeReport) -> bool {
        let Some(&i) = self.loaded.by_id.get(&report.endpoint) else {
            // The last report of an endpoint that a reload removed.
            return false;
        };
        let now = Instant::now();
        let r = self.loaded.region_of[i];
        // A completion that times out while the load signal already sheds
        // the region is a symptom of load: overloaded, not dead.
        if report.layer == Layer::Completion
            && report.outcome.result == Err(ProbeError::Timeout)
            && self.region_level(r) >= Level::Prepare
        {
            report.outcome.result = Err(ProbeError::Overloaded);
        }
        let info = &self.loaded.info[i];
        let h = &mut self.health[i];
        let label = match &report.outcome.result {
            Ok(Payload::Skipped) => "skipped",
            Ok(_) => "ok",
            Err(e) => e.kind(),
        };
        // Resolved once per endpoint, layer and result: 2,000 probes a
        // second would otherwise hash four labels each.
        let counter = match h
            .probe_counters
            .iter()
            .find(|(l, r, _)| *l == report.layer && *r == label)
        {
            Some((_, _, counter)) => counter,
            None => {
                let counter = self.metrics.probes.with_label_values(&[
                    info.region.as_str(),
                    info.target.as_str(),
                    crate::metrics::layer_label(report.layer),
                    label,
                ]);
                h.probe_counters.push((report.layer, label, counter));
                &h.probe_counters[h.probe_counters.len() - 1].2
            }
        };
        counter.inc();
        if report.outcome.result != Ok(Payload::Skipped) {
            h.probe_seconds
                .get_or_insert_with(|| {
                    self.metrics
                        .probe_seconds
                        .with_label_values(&[info.region.as_str()])
                })
                .observe(report.outcome.elapsed.as_secs_f64());
        }
        let mut changed = false;
        if self.pending_first.remove(&(report.endpoint, report.layer))
            && self.pending_first.is_empty()
            && !*self.first_round.borrow()
        {
            // Said only once the snapshot with these results is stored.
            self.first_round_due = true;
            changed = true;
        }
        if report.layer != Layer::Metrics {
            let silent_before = h.silent(info, now).is_some();
            if let Some(at) = h.heard.iter_mut().find(|(l, _)| *l == report.layer) {
                at.1 = now;
            }
            if silent_before && h.silent(info, now).is_none() {
                tracing::info!(
                    region = %info.region, endpoint = %info.target, probe = layer_name(report.layer),
                    "Probe results arrive again."
                );
                changed = true;
            }
        }
        // Capacity reports move weights, not health.
        if report.layer == Layer::Metrics {
            if let Ok(Payload::Load(load)) = report.outcome.result {
                h.load = Some((load, now));
                self.metrics
                    .capacity_reports
                    .with_label_values(&[info.region.as_str(), "metrics"])
                    .inc();
                let util = self.region_load(r, now).util;
                let then = self.published_util.get(r).copied().flatten();
                changed |= match (util, then) {
                    (Some(a), Some(b)) => (a - b).abs() >= 0.01,
                    (a, b) => a.is_some() != b.is_some(),
                };
            }
            return changed;
        }
        if report.layer == Layer::Completion {
            let skipped = report.outcome.result == Ok(Payload::Skipped);
            if h.completion_skipped != skipped {
                h.completion_skipped = skipped;
                changed = true;
            }
            if skipped {
                // Neither a success nor a failure: the layer keeps its state.
                return changed;
            }
        }
        // 429: rate limited is not dead. Out of answers for the cool-down,
        // and back afterwards without a rise count.
        if let Err(ProbeError::RateLimited { retry_after_s }) = &report.outcome.result {
            // A hostile or silly Retry-After cannot take an endpoint out for long.
            let pause = retry_after_s
                .map_or(info.cooldown, Duration::from_secs)
                .min(MAX_COOLDOWN);
            let until = now + pause;
            let entering = h.cooling_until.is_none_or(|u| u <= now);
            if h.cooling_until.is_none_or(|u| u < until) {
                if entering {
                    tracing::info!(
                        region = %info.region, endpoint = %info.target, cooldown_ms = pause.as_millis() as u64,
                        "Endpoint rate limited; out of answers for the cool-down."
                    );
                }
                h.cooling_until = Some(until);
                // Only entering the cool-down changes answers; the wake-up ends it.
                changed |= entering;
            }
            if let Err(e) = report.outcome.result
                && h.last_error.as_ref() != Some(&e)
            {
                h.last_error = Some(e);
            }
            return changed;
        }
        let upper = matches!(report.layer, Layer::Models | Layer::Completion);
        match &report.outcome.result {
            // Shown, never counted: the load signal sheds the region, or
            // this edge could not make the probe at all.
            Err(e @ (ProbeError::Overloaded | ProbeError::LocalResource(_))) => {
                changed |= note_error(h, e);
                return changed;
            }
            // All layers connect to the same listener: a refusal above the
            // alive layer is the alive layer's to judge. While it is down or
            // failing, it explains the refusal; while it is up and
            // answering, the refusal waits for its next result.
            Err(e @ ProbeError::Refused) if upper => {
                changed |= note_error(h, e);
                if h.state.status == Status::Up && h.alive_ok == Some(true) {
                    h.held.retain(|(l, _)| *l != report.layer);
                    h.held.push((report.layer, e.clone()));
                }
                return changed;
            }
            _ => {}
        }
        let ok = report.outcome.result.is_ok();
        if report.layer == Layer::Alive {
            h.alive_ok = Some(ok);
            // Refusals held for this result: explained by a failure, or
            // counted now against their layer if the listener answers.
            for (layer, e) in std::mem::take(&mut h.held) {
                if ok {
                    let fall = info.fall;
                    changed |= observe(info, h, layer, Err(&e), fall, now, &self.metrics).0;
                }
            }
        }
        let fall = match &report.outcome.result {
            Err(ProbeError::Refused) => info.fall_refused,
            // A canary on probation loses its share at its first failed check.
            Err(_) if upper && self.on_probation(i) => 1,
            _ => info.fall,
        };
        let h = &mut self.health[i];
        let (moved, became) = observe(
            info,
            h,
            report.layer,
            report.outcome.result.as_ref().map(|_| ()),
            fall,
            now,
            &self.metrics,
        );
        changed |= moved;
        if report.layer == Layer::Alive && became.is_some_and(|(before, _)| before != Status::Up) {
            // Back up: probe the layers above now, if it was down or a
            // layer above has no counted result yet (its first was a
            // refusal the alive layer explained).
            let id = report.endpoint;
            let unsettled = info.layers.iter().any(|l| {
                *l != Layer::Alive
                    && layer_state(h, *l).status == Status::Unknown
                    && !self.pending_first.contains(&(id, *l))
            });
            if became.is_some_and(|(before, _)| before == Status::Down) || unsettled {
                self.hints.send_modify(|hints| hints.recover(id));
            }
        }
        match &report.outcome.result {
            Ok(Payload::Models(models)) => {
                if h.models.as_deref() != Some(models.as_slice()) {
                    tracing::info!(region = %info.region, endpoint = %info.target, models = %models.join(","), "Endpoint model list changed.");
                    h.models = Some(models.clone().into());
                    changed = true;
                }
            }
            Ok(Payload::Completion) => {
                let sample = report.outcome.elapsed.as_secs_f64() * 1000.0;
                h.completion_ms = Some(
                    h.completion_ms
                        .map_or(sample, |old| old + LATENCY_SMOOTHING * (sample - old)),
                );
            }
            Ok(Payload::Alive) => {
                h.rtt.push(report.outcome.elapsed.as_secs_f64() * 1000.0);
                h.latency_ms = h.rtt.median();
            }
            // Handled above, before the state machines.
            Ok(Payload::Load(_) | Payload::Skipped) => {}
            Err(e) => changed |= note_error(h, e),
        }
        if ok {
            // Republish only when the region's latency moved noticeably,
            // and not at once (see `LATENCY_REPUBLISH`).
            let now_ms = region_latency_of(&self.loaded, &self.health, r);
            let then = self.published_latency.get(r).copied().unwrap_or(0.0);
            if (now_ms - then).abs() > (0.2 * then).max(2.0) {
                self.latency_moved = true;
            }
        }
        changed
    }

    /// The highest shedding level of region `r` among the services that
    /// use it, as last published.
    fn region_level(&self, r: usize) -> Level {
        self.loaded.region_services[r]
            .iter()
            .filter_map(|&s| {
                let span = self.loaded.service_span[s].clone();
                let at = self.loaded.service_regions[span.clone()]
                    .iter()
                    .position(|x| *x == r)?;
                self.levels.get(span.start + at).copied()
            })
            .max()
            .unwrap_or(Level::Normal)
    }

    /// Tells the probe loops which endpoints are in full regions (their
    /// completion probes are skipped).
    fn steer_completions(&mut self) {
        let mut full_regions = vec![false; self.loaded.config.regions.len()];
        for (&r, level) in self.loaded.service_regions.iter().zip(&self.levels) {
            full_regions[r] |= *level == Level::Removed;
        }
        let full: HashSet<u64> = self
            .loaded
            .ids
            .iter()
            .zip(&self.loaded.region_of)
            .filter(|(_, r)| full_regions[**r])
            .map(|(id, _)| *id)
            .collect();
        let ids = &self.loaded.by_id;
        self.hints.send_if_modified(|hints| {
            let before = hints.clone();
            hints.retain(|id| ids.contains_key(&id));
            hints.set_full(full);
            *hints != before
        });
    }

    /// When the next cool-down ends or slow-start step is due, if any.
    fn next_wake(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        // A deadline passed since the last publish (a message won the race
        // with the timer) is due now, not forgotten.
        let since = self.last_publish;
        let mut consider = |t: Instant| {
            let t = if t <= now && t > since { now } else { t };
            if t >= now && t > since && next.is_none_or(|n| t < n) {
                next = Some(t);
            }
        };
        // Called after every message: no hashing per region or endpoint.
        let regions = &self.loaded.config.regions;
        for (id, (_, at)) in &self.pushed {
            if let Some(region) = self.loaded.region_by_id.get(id) {
                consider(*at + regions[*region].capacity.max_age);
            }
        }
        for ((h, info), r) in self
            .health
            .iter()
            .zip(&self.loaded.info)
            .zip(&self.loaded.region_of)
        {
            if let Some((_, at)) = h.load {
                consider(at + regions[*r].capacity.max_age);
            }
            // A probe layer falls silent (its endpoint becomes unfit).
            for (layer, limit) in &info.silence {
                if let Some((_, at)) = h.heard.iter().find(|(l, _)| l == layer) {
                    consider(*at + *limit);
                }
            }
            if let Some(until) = h.cooling_until {
                consider(until);
            }
            if let Some(since) = h.up_since
                && !info.slow_start.is_zero()
            {
                // Twenty steps per ramp, at least 100 ms apart, on a fixed
                // grid from `since` (so that other messages cannot postpone
                // them), and the ramp's end.
                let end = since + info.slow_start;
                let step = (info.slow_start / 20).max(Duration::from_millis(100));
                let done = ((now.min(end) - since).as_nanos() / step.as_nanos()) as u32;
                // The step (or end) just reached is due if no publish followed it.
                consider((since + step * done).min(end));
                if now < end {
                    consider((since + step * (done + 1)).min(end));
                }
            }
        }
        // A last-known-good hold ends (the all-down rule applies).
        self.last_good_deadlines(&mut consider);
        // A peer's views expire (its votes and load reports stop counting).
        self.fleet_deadlines(&mut consider);
        // A canary's clean checks reach its promote-after.
        self.rollout_deadlines(&mut consider);
        next
    }

    /// Region `r`'s load now: this edge's own report, or a fleet peer's
    /// when that is fresher (see [`Publisher::local_region_load`]).
    fn region_load(&self, r: usize, now: Instant) -> RegionLoad {
        let (load, at) = self.local_region_load(r, now);
        self.freshest_region_load(r, now, load, at)
    }

    /// Region `r`'s load as this edge read it, and when: fresh scraped
    /// loads of its endpoints and a fresh pushed report; anything older
    /// than `max-age` is unknown.
    fn local_region_load(&self, r: usize, now: Instant) -> (RegionLoad, Option<Instant>) {
        let region = &self.loaded.config.regions[r];
        let cap = &region.capacity;
        let fresh = |at: Instant| now.saturating_duration_since(at) < cap.max_age;
        let mut newest: Option<Instant> = None;
        let scraped: Vec<crate::capacity::Load> = self.health
            [self.loaded.region_endpoints[r].clone()]
        .iter()
        .filter_map(|h| h.load.filter(|(_, at)| fresh(*at)))
        .map(|(l, at)| {
            newest = newest.max(Some(at));
            l
        })
        .collect();
        let pushed = self
            .pushed
            .get(&region.id)
            .filter(|(_, at)| fresh(*at))
            .map(|(p, at)| {
                newest = newest.max(Some(*at));
                *p
            });
        let from_metrics = (!scraped.is_empty())
            .then(|| capacity::utilization(&capacity::combine(&scraped), cap.queue_saturation))
            .flatten();
        let from_push = pushed.and_then(|p| capacity::utilization(&p.load(), cap.queue_saturation));
        let util = match (from_metrics, from_push) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let load = RegionLoad {
            util,
            gpus: pushed
                .and_then(|p| p.gpus_total)
                .filter(|g| *g > 0.0)
                .unwrap_or(cap.gpus),
            base: cap.weight,
            cost: cap.cost,
        };
        (load, newest.filter(|_| util.is_some()))
    }

    /// Loads, levels (with hysteresis) and adaptive TTLs for the next snapshot.
    fn dynamic(&mut self) -> Dynamic {
        let now = Instant::now();
        let config = self.loaded.config.clone();
        let loads: Vec<RegionLoad> = (0..config.regions.len())
            .map(|r| self.region_load(r, now))
            .collect();
        self.region_gauges.resize(config.regions.len(), None);
        for ((region, load), gauged) in config
            .regions
            .iter()
            .zip(&loads)
            .zip(&mut self.region_gauges)
        {
            // Set when they change only: a label lookup each is a cost at
            // thousands of regions.
            let drained = self.drained.contains(&region.id);
            if *gauged == Some((drained, load.util)) {
                continue;
            }
            *gauged = Some((drained, load.util));
            // Every region has the series, 0 until an operator drains it.
            self.metrics
                .region_drained
                .with_label_values(&[region.id.as_str()])
                .set(i64::from(drained));
            let gauge = &self.metrics.region_utilization;
            match load.util {
                Some(util) => gauge.with_label_values(&[region.id.as_str()]).set(util),
                // Unknown is absence, not a sentinel value.
                None => {
                    let _ = gauge.remove_label_values(&[region.id.as_str()]);
                }
            }
        }
        let mut ttls = Vec::with_capacity(config.services.len());
        for (i, s) in config.services.iter().enumerate() {
            let span = self.loaded.service_span[i].clone();
            let mut moving = false;
            for at in span {
                let r = self.loaded.service_regions[at];
                let (region, load) = (&config.regions[r], &loads[r]);
                let before = self.levels[at];
                let level = load
                    .util
                    .map_or(Level::Normal, |u| s.watermarks.level(u, before));
                if level != before {
                    // Only the service's shed rule takes a region out; with
                    // `shed = "never"` (or a level below the rule's) the
                    // region stays in answers with a lower weight.
                    if s.shed.removes(level) {
                        tracing::warn!(service = %s.id, region = %region.id, level = level.name(), shed = s.shed.name(), utilization = load.util, "Region shed by load.");
                    } else {
                        tracing::info!(service = %s.id, region = %region.id, level = level.name(), shed = s.shed.name(), utilization = load.util, "Region load level changed; it stays in answers.");
                    }
                }
                self.levels[at] = level;
                let w = capacity::weight(load.base, load.gpus, load.util, level, s.criticality);
                let old = self.weights[at].replace(w);
                // The gauges move only when their value does (10,000
                // services would otherwise cost a label lookup each, per build).
                if old != Some(w) {
                    self.metrics.set_region_weight(&s.id, &region.id, w);
                }
                if old.is_none() || level != before {
                    self.metrics
                        .set_region_shed_level(&s.id, &region.id, level as i64);
                }
                let old = old.unwrap_or(w);
                moving |= (w - old).abs() > 0.25 * old.max(1e-9) || level >= Level::Prepare;
            }
            // Adaptive TTL: short while weights move or a region nears a watermark.
            ttls.push(if moving { s.ttl_min } else { s.ttl });
        }
        self.published_util = loads.iter().map(|l| l.util).collect();
        Dynamic {
            latency_ms: self.published_latency.clone(),
            loads,
            levels: self.levels.clone(),
            ttls,
            fit_ago: self.fit_ago(),
        }
    }

    fn apply_reload(&mut self, config: Arc<Config>, ids: Vec<u64>, done: oneshot::Sender<u64>) {
        let next = Loaded::new(config, ids, &self.metrics);
        // Endpoints that did not change keep their state (matched by probe id).
        let mut health = Vec::with_capacity(next.ids.len());
        for (id, info) in next.ids.iter().zip(&next.info) {
            match self.loaded.by_id.get(id) {
                Some(&old) => health.push(self.health[old].clone()),
                None => {
                    self.pending_first
                        .extend(info.layers.iter().map(|l| (*id, *l)));
                    health.push(EndpointHealth::watching(info, Instant::now()));
                }
            }
        }
        for (i, id) in self.loaded.ids.iter().enumerate() {
            if !next.by_id.contains_key(id) {
                let info = &self.loaded.info[i];
                let _ = self
                    .metrics
                    .endpoint_up
                    .remove_label_values(&[info.region.as_str(), info.target.as_str()]);
                self.pending_first.retain(|(pending, _)| pending != id);
            }
        }
        let (old_services, new_services) = (
            self.loaded.config.services.len(),
            next.config.services.len(),
        );
        tracing::info!(
            endpoints_kept = health
                .iter()
                .filter(|h| h.state.status != Status::Unknown)
                .count(),
            endpoints = next.ids.len(),
            services_before = old_services,
            services = new_services,
            "Configuration reloaded."
        );
        // The services before, by id.
        let before: HashMap<&str, usize> = self
            .loaded
            .config
            .services
            .iter()
            .enumerate()
            .map(|(j, s)| (s.id.as_str(), j))
            .collect();
        (self.levels, self.weights) = self.carried_levels(&next, &before);
        // Indexes mean other services now: the next build compiles those
        // that changed, or all when more than the services changed.
        self.built = self
            .built
            .take()
            .and_then(|built| built.carried(&self.loaded, &next, &before));
        self.region_gauges.clear();
        // Freed with the snapshot it served, after the next build.
        let replaced = std::mem::replace(&mut self.loaded, next);
        self.replaced.push(replaced);
        self.health = health;
        self.peers = fleet::peer_views(&self.loaded, std::mem::take(&mut self.peers));
        self.keep_rollouts();
        // A drained region that the new config no longer has is forgotten.
        let regions: HashSet<&str> = self
            .loaded
            .config
            .regions
            .iter()
            .map(|r| r.id.as_str())
            .collect();
        let gone: Vec<String> = self
            .drained
            .iter()
            .filter(|r| !regions.contains(r.as_str()))
            .cloned()
            .collect();
        for region in gone {
            tracing::info!(region = %region, "Drain of a region the configuration no longer has dropped.");
            self.drained.remove(&region);
            let _ = self
                .metrics
                .region_drained
                .remove_label_values(&[region.as_str()]);
        }
        // Removing the last endpoints the first round waited for completes it.
        if self.pending_first.is_empty() && !*self.first_round.borrow() {
            self.first_round_due = true;
        }
        let deadline = Instant::now() + self.loaded.config.server.startup_grace;
        let deferred = self.deferred.get_or_insert(Deferred {
            deadline,
            done: Vec::new(),
        });
        deferred.deadline = deadline;
        deferred.done.push(done);
    }

    /// The shedding levels and weights of `next`'s (service, region) pairs:
    /// those of the same pairs before, else normal and none.
    /// `before`: the index of each service of the running config by id.
    fn carried_levels(
        &self,
        next: &Loaded,
        before: &HashMap<&str, usize>,
    ) -> (Vec<Level>, Vec<Option<f64>>) {
        let old = &self.loaded;
        let mut levels = Vec::with_capacity(next.service_regions.len());
        let mut weights = Vec::with_capacity(next.service_regions.len());
        for (s, span) in next.config.services.iter().zip(&next.service_span) {
            // The old service's pairs: a few regions, searched in turn.
            let old_span = before
                .get(s.id.as_str())
                .map(|&j| old.service_span[j].clone());
            for &r in &next.service_regions[span.clone()] {
                let region = next.config.regions[r].id.as_str();
                let at = old_span.clone().and_then(|mut span| {
                    span.find(|&at| old.config.regions[old.service_regions[at]].id == region)
                });
                levels.push(at.map_or(Level::Normal, |at| self.levels[at]));
                weights.push(at.and_then(|at| self.weights[at]));
            }
        }
        (levels, weights)
    }

    /// Publishes a deferred reload once its new endpoints have all reported
    /// (or its deadline passed).
    fn settle(&mut self, force: bool) {
        let new_pending = self
            .pending_first
            .iter()
            .any(|(id, _)| self.loaded.by_id.contains_key(id));
        if self.deferred.is_some() && (force || !new_pending || self.first_round_pending()) {
            let deferred = self.deferred.take().expect("checked above");
            self.publish_now();
            for done in deferred.done {
                let _ = done.send(self.generation);
            }
        }
    }

    /// Still in the first round after start: reloads do not wait for it.
    fn first_round_pending(&self) -> bool {
        !*self.first_round.borrow()
    }

    /// Builds and swaps in a new snapshot, unless a reload is waiting for
    /// its first probes (then the old config keeps serving until it settles).
    pub fn publish(&mut self) {
        // Whatever waited for the coalescing gap goes out with this one.
        self.pending = None;
        // Marked even while a reload is deferred: a mark is the moment of the change.
        self.note_fitness();
        let moved = std::mem::take(&mut self.health_moved);
        if self.deferred.is_some() {
            if moved {
                tracing::info!(
                    "Health changed while a reload waited for its new endpoints' first probes; the new configuration goes live now (endpoints not probed yet stay out of answers)."
                );
            }
            self.settle(moved);
            return;
        }
        self.publish_now();
    }

    /// Panics when `next` (built incrementally) differs from a snapshot
    /// compiled from scratch, naming the service and where they differ.
    #[cfg(test)]
    fn check_equals_full_build(
        &self,
        dynamic: Dynamic,
        overlay: &[Option<fleet::Overlay>],
        next: &Snapshot,
    ) {
        let full = build::build(
            build::BuildInputs {
                loaded: &self.loaded,
                health: &self.health,
                drained: &self.drained,
                generation: self.generation,
                geo: self.geo.clone(),
                dynamic,
                metrics: &self.metrics,
                overlay,
                rollouts: &self.phases(),
            },
            None,
        )
        .snapshot;
        fn differ(what: &str, id: &str, full: String, shared: String) {
            if full == shared {
                return;
            }
            let (full, shared): (Vec<char>, Vec<char>) =
                (full.chars().collect(), shared.chars().collect());
            let at = full.iter().zip(&shared).take_while(|(a, b)| a == b).count();
            let window = |text: &[char]| -> String {
                text[at.saturating_sub(300)..(at + 200).min(text.len())]
                    .iter()
                    .collect()
            };
            panic!(
                "{what} of service {id}: the incremental build differs from a full build\n full: ...{}\n incr: ...{}",
                window(&full),
                window(&shared),
            );
        }
        // Debug text with the residency maps in order (a HashMap's order
        // differs between two builds of the same config).
        fn answer_text(answer: &model::ServiceAnswer) -> String {
            let residency = answer.residency.as_ref().map(|r| {
                let mut countries: Vec<_> = r.by_country.iter().collect();
                countries.sort();
                let mut continents: Vec<_> = r.by_continent.iter().collect();
                continents.sort();
                format!(
                    "{countries:?} {continents:?} {:?} {} {} {}",
                    r.eu, r.otherwise, r.unknown, r.without_ecs_unknown
                )
            });
            let canary = answer
                .canary
                .as_ref()
                .map(|(share, canary)| format!("{share} {}", answer_text(canary)));
            format!(
                "{} {residency:?} {:?} {:?} {:?} {canary:?}",
                answer.located, answer.classes, answer.tolerance_ms, answer.refusals
            )
        }
        assert_eq!(full.services.len(), next.services.len());
        for (i, view) in full.service_views.iter().enumerate() {
            let id = &view.id;
            differ(
                "answer",
                id,
                answer_text(&full.services[i]),
                answer_text(&next.services[i]),
            );
            differ(
                "view",
                id,
                format!("{view:?}"),
                format!("{:?}", next.service_views[i]),
            );
            differ(
                "encoded answer",
                id,
                format!("{:?}", full.wire.services[i]),
                format!("{:?}", next.wire.services[i]),
            );
        }
    }

    fn publish_now(&mut self) {
        let started = std::time::Instant::now();
        self.last_publish = Instant::now();
        self.generation += 1;
        self.published_latency = region_latency(&self.loaded, &self.health);
        self.latency_moved = false;
        self.note_silence();
        self.note_fitness();
        let dynamic = self.dynamic();
        self.steer_completions();
        let now = Instant::now();
        self.note_fleet(now);
        let overlay = self.overlay(now);
        self.promote_due(now);
        let phases = self.phases();
        #[cfg(test)]
        let unshared = dynamic.clone();
        let previous = self.snapshot.load_full();
        let out = build::build(
            build::BuildInputs {
                loaded: &self.loaded,
                health: &self.health,
                drained: &self.drained,
                generation: self.generation,
                geo: self.geo.clone(),
                dynamic,
                metrics: &self.metrics,
                overlay: &overlay,
                rollouts: &phases,
            },
            self.built.as_ref().map(|b| (b, &*previous)),
        );
        let next = out.snapshot;
        self.built = Some(out.built);
        // Every unit test checks that sharing changed nothing: the
        // snapshot equals one compiled from scratch.
        #[cfg(test)]
        self.check_equals_full_build(unshared, &overlay, &next);
        // After a reload, services are matched by id; otherwise by index.
        let by_id: Option<HashMap<&str, &model::ServiceView>> = (!out.incremental).then(|| {
            previous
                .service_views
                .iter()
                .map(|v| (v.id.as_str(), &**v))
                .collect()
        });
        for &i in &out.compiled {
            let new = &next.service_views[i];
            let old = match &by_id {
                Some(by_id) => by_id.get(new.id.as_str()).copied(),
                None => Some(&*previous.service_views[i]),
            };
            if old.is_none_or(|old| {
                !old.decision.same_choice(&new.decision) || old.answer != new.answer
            }) {
                // Losing something (failing open, NODATA or SERVFAIL for lack
                // of a fit region, a model fallback) is a warning.
                if matches!(new.decision, model::Decision::Tier { .. }) {
                    tracing::info!(
                        service = %new.id,
                        decision = new.decision.state(),
                        tier = new.decision.tier(),
                        answer = %new.answer.join(" "),
                        "Service answer changed."
                    );
                } else {
                    tracing::warn!(
                        service = %new.id,
                        decision = new.decision.state(),
                        tier = new.decision.tier(),
                        answer = %new.answer.join(" "),
                        "Service answer changed: no fit region for its normal answer."
                    );
                }
            }
        }
        self.note_last_known_good(&next, &out.compiled, out.incremental);
        let rolled_back = self.note_rollouts(&next, &out.compiled, now);
        self.note_decisions(&previous, &next, &out.compiled, out.incremental);
        self.snapshot.store(Arc::new(next));
        let first_round = std::mem::take(&mut self.first_round_due);
        if first_round {
            self.first_round.send_replace(true);
        }
        self.metrics.snapshot_generation.set(self.generation as i64);
        self.build_cost = started.elapsed();
        let now = Instant::now();
        let tokens = self.tokens_at(now, coalescing_gap(self.build_cost));
        self.bucket = ((tokens - 1.0).max(0.0), now);
        self.metrics
            .snapshot_build_seconds
            .observe(self.build_cost.as_secs_f64());
        if !out.incremental || first_round {
            // A whole snapshot was built (or the start's work is done: the
            // first probe round is in) and the one before it is gone
            // (unless a query thread still reads it): give the pages that
            // freed back to the system.
            drop_aside((previous, std::mem::take(&mut self.replaced)));
        }
        if rolled_back {
            // The canary's share went with the build that found it failing;
            // this one shows the rollout rolled back.
            self.built = None;
            self.publish_now();
        }
    }

    /// Sets the decision gauges of the services compiled for `next`, and
    /// (after a reload) drops those of services that `previous` had and
    /// `next` has not.
    fn note_decisions(
        &self,
        previous: &Snapshot,
        next: &Snapshot,
        compiled: &[usize],
        incremental: bool,
    ) {
        for &i in compiled {
            let view = &next.service_views[i];
            self.metrics.set_decision(&view.id, &view.decision);
        }
        if incremental {
            return;
        }
        let ids: HashSet<&str> = next.service_views.iter().map(|v| v.id.as_str()).collect();
        for old in &previous.service_views {
            if !ids.contains(old.id.as_str()) {
                self.metrics.forget_service(&old.id);
            }
        }
    }

    /// Logs probe layers that fell silent since the last publish and counts
    /// them in a gauge. (Their endpoints are taken out by `build`.)
    fn note_silence(&mut self) {
        let now = Instant::now();
        let mut silent = HashSet::new();
        for ((h, info), id) in self
            .health
            .iter()
            .zip(&self.loaded.info)
            .zip(&self.loaded.ids)
        {
            for (layer, limit) in &info.silence {
                let heard = h.heard.iter().find(|(l, _)| l == layer);
                if heard.is_none_or(|(_, at)| now.saturating_duration_since(*at) < *limit) {
                    continue;
                }
                silent.insert((*id, *layer));
                if !self.silent.contains(&(*id, *layer)) {
                    tracing::warn!(
                        region = %info.region, endpoint = %info.target, probe = layer_name(*layer),
                        limit_ms = limit.as_millis() as u64,
                        "Probe sends no results (task dead or stuck); endpoint taken out of answers."
                    );
                }
            }
        }
        self.metrics.probe_layers_silent.set(silent.len() as i64);
        self.silent = silent;
    }

    /// Runs until the channel closes or `cancel` fires. Messages that arrive
    /// together are applied together and published once.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Msg>, cancel: CancellationToken) {
        // The next timed change (cool-down end, slow-start step, expiry,
        // silence, hold end): recomputed after a publish or when it fires,
        // not after every probe result (a scan of every endpoint). Probe
        // results only postpone deadlines (a silence limit) between
        // publishes; anything that brings one nearer changes the answer
        // and publishes.
        let mut wake: Option<Option<Instant>> = None;
        loop {
            let deadline = self.deferred.as_ref().map(|d| d.deadline);
            let generation = self.generation;
            let next = *wake.get_or_insert_with(|| self.next_wake());
            let msg = tokio::select! {
                () = cancel.cancelled() => return,
                () = sleep_until_some(next) => {
                    // Due unless it was postponed since it was computed.
                    let now = self.next_wake();
                    if now.is_some_and(|t| t <= Instant::now()) {
                        // A cool-down ended or a slow-start step is due:
                        // health moved (a reload waiting for new endpoints
                        // goes live; holding it back would also make this
                        // timer due again at once, a busy loop).
                        self.health_moved = true;
                        self.publish();
                        wake = None;
                    } else {
                        wake = Some(now);
                    }
                    continue;
                }
                () = sleep_until_some(self.pending) => {
                    self.publish();
                    wake = None;
                    continue;
                }
                () = sleep_until_some(deadline) => {
                    tracing::warn!("Reloaded endpoints did not all answer their first probe in time; serving the new config anyway.");
                    self.settle(true);
                    wake = None;
                    continue;
                }
                msg = rx.recv() => match msg {
                    Some(msg) => msg,
                    None => return,
                },
            };
            // An operator waits for a reload: it goes live at once, not
            // after the coalescing gap (its build still spends a token).
            let mut reload = matches!(msg, Msg::Reload { .. });
            let mut changed = self.apply(msg);
            while let Ok(msg) = rx.try_recv() {
                reload |= matches!(msg, Msg::Reload { .. });
                changed |= self.apply(msg);
            }
            if reload {
                self.publish();
            } else if changed {
                self.publish_coalesced();
            } else if self.latency_moved && self.pending.is_none() {
                self.pending = Some(self.last_publish + LATENCY_REPUBLISH);
            }
            if changed || self.generation != generation || self.deferred.is_some() {
                wake = None;
            }
        }
    }

    /// Publishes now while builds are rare; in a burst of changes (a whole
    /// region dying, its endpoints' failures spread over a probe interval)
    /// at most one build per coalescing gap, each with every change that
    /// arrived meanwhile: a token bucket of [`BURST`] builds, refilled one
    /// per gap. A single change is published at once.
    fn publish_coalesced(&mut self) {
        let gap = coalescing_gap(self.build_cost);
        let now = Instant::now();
        let tokens = self.tokens_at(now, gap);
        if tokens >= 1.0 {
            self.publish();
        } else {
            let wait = gap.mul_f64(1.0 - tokens);
            self.pending.get_or_insert(now + wait);
        }
    }

    /// Builds the bucket allows at `now` (spent by [`Publisher::publish_now`]).
    fn tokens_at(&self, now: Instant, gap: Duration) -> f64 {
        let (tokens, at) = self.bucket;
        let refill = now.saturating_duration_since(at).as_secs_f64() / gap.as_secs_f64();
        (tokens + refill).min(BURST)
    }
}

/// Builds the coalescing bucket allows back to back.
const BURST: f64 = 4.0;

/// Shortest time between a snapshot build and one for a moved probe
/// latency alone: it only re-ranks proximity answers, and on a busy edge
/// every probe time moves (1,000 regions republished several times a second).
const LATENCY_REPUBLISH: Duration = Duration::from_secs(1);

/// Time between two snapshot builds through a storm of changes: four
/// times what the last build took (builds take at most a fifth of a core),
/// between 50 and 250 ms.
fn coalescing_gap(build_cost: Duration) -> Duration {
    (build_cost * 4).clamp(Duration::from_millis(50), Duration::from_millis(250))
}

/// Records `e` as the endpoint's last error; true if that changed.
fn note_error(h: &mut EndpointHealth, e: &ProbeError) -> bool {
    if h.last_error.as_ref() == Some(e) {
        return false;
    }
    h.last_error = Some(e.clone());
    true
}

fn layer_state(h: &EndpointHealth, layer: Layer) -> &HealthState {
    match layer {
        Layer::Models => &h.models_state,
        Layer::Completion => &h.completion_state,
        Layer::Alive | Layer::Metrics => &h.state,
    }
}

/// Feeds one counted result to `layer`'s state machine (`fall` failures in
/// a row take it down), logs and counts a change. Returns whether the
/// status changed and, if so, from what to what.
fn observe(
    info: &EndpointInfo,
    h: &mut EndpointHealth,
    layer: Layer,
    result: Result<(), &ProbeError>,
    fall: u32,
    now: Instant,
    metrics: &Metrics,
) -> (bool, Option<(Status, Status)>) {
    let state = match layer {
        Layer::Alive => &mut h.state,
        Layer::Models => &mut h.models_state,
        Layer::Completion => &mut h.completion_state,
        Layer::Metrics => return (false, None),
    };
    let before = state.status;
    let Some(status) = state.observe(result.is_ok(), info.rise, fall) else {
        return (false, None);
    };
    let what = layer_name(layer);
    if layer == Layer::Alive {
        h.since = Some(SystemTime::now());
        metrics
            .endpoint_up
            .with_label_values(&[info.region.as_str(), info.target.as_str()])
            .set(i64::from(status == Status::Up));
        // Back after being down: ramp its share up (slow start).
        if before == Status::Down && status == Status::Up && !info.slow_start.is_zero() {
            h.up_since = Some(now);
        }
    }
    match result {
        Err(e) => tracing::warn!(
            region = %info.region, endpoint = %info.target, probe = what, status = "down", reason = %e,
            "Endpoint is down."
        ),
        Ok(()) => tracing::info!(
            region = %info.region, endpoint = %info.target, probe = what, status = "up",
            "Endpoint is up."
        ),
    }
    (true, Some((before, status)))
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Mean measured probe time of the up endpoints of region `r`, in ms, at
/// most [`MAX_MEASURED_MS`].
fn region_latency_of(loaded: &Loaded, health: &[EndpointHealth], r: usize) -> f64 {
    let (sum, n) = health[loaded.region_endpoints[r].clone()]
        .iter()
        .filter(|h| h.state.status == Status::Up)
        .filter_map(|h| h.latency_ms)
        .fold((0.0, 0), |(s, n), l| (s + l, n + 1));
    if n == 0 {
        0.0
    } else {
        (sum / f64::from(n)).min(MAX_MEASURED_MS)
    }
}

/// Measured region latency, for proximity. In a fleet, none: each edge
/// measures its own network path to a region, which says nothing of the
/// client's and would make edges answer one client differently; the
/// distance model alone ranks there.
fn region_latency(loaded: &Loaded, health: &[EndpointHealth]) -> Vec<f64> {
    let fleet = loaded.config.fleet.seed.is_some();
    (0..loaded.config.regions.len())
        .map(|r| match fleet {
            true => 0.0,
            false => region_latency_of(loaded, health, r),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    //! The whole signal path on tokio's paused clock: probe loops with
    //! scripted backends → publisher → snapshot, read as the query path does.

    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::health::testing::{Scripted, no_hints};
    use crate::health::{Schedule, probe_loop};
    use crate::model::Decision;

    const MAIN: &str = r#"
[server]
dns-listen = ["127.0.0.1:0"]
[zone]
apex = "inference.example.com"
soa = { primary = "ns1.example.net", contact = "hostmaster.example.net" }
ns = [{ name = "ns1.example.net" }]
[regions.primary]
endpoints = [{ address = "192.0.2.1" }]
[regions.secondary]
endpoints = [{ address = "192.0.2.2" }]
[services.chat]
tiers = [["primary"], ["secondary"]]
"#;

    /// `text` loaded with the real loader.
    fn load(text: &str) -> Arc<Config> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inferdns.toml");
        std::fs::write(&path, text).unwrap();
        Arc::new(crate::config::load(&path).unwrap())
    }

    fn answer(snapshot: &ArcSwap<Snapshot>) -> Vec<String> {
        snapshot.load().service_views[0].answer.clone()
    }

    /// Waits (in virtual time) until the service answers `want`; returns when.
    async fn until(snapshot: &ArcSwap<Snapshot>, want: &str) -> Instant {
        loop {
            if answer(snapshot) == [want] {
                return Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A reload is published at once, even after a storm of health changes
    /// spent the coalescing bucket (whose changes go out with it).
    #[tokio::test(start_paused = true)]
    async fn a_reload_goes_live_at_once_after_a_storm_of_changes() {
        let (publisher, snapshot, _) = Publisher::new(load(MAIN), vec![0, 1], None, Metrics::new());
        let (tx, rx) = mpsc::channel::<Msg>(64);
        let cancel = CancellationToken::new();
        tokio::spawn(publisher.run(rx, cancel.clone()));
        for endpoint in [0, 1] {
            for _ in 0..2 {
                tx.send(report(endpoint, true)).await.unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(answer(&snapshot), ["192.0.2.1"]);
        // The primary flaps (down at one refusal, up at two successes),
        // each change 1 ms apart: more than the bucket's builds.
        let before = snapshot.load().generation;
        for _ in 0..6 {
            tx.send(report(0, false)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
            tx.send(report(0, true)).await.unwrap();
            tx.send(report(0, true)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(snapshot.load().generation - before < 12, "coalesced");
        assert_eq!(
            answer(&snapshot),
            ["192.0.2.2"],
            "the last change (up again) waits for the coalescing gap"
        );
        let asked = Instant::now();
        let (done, applied) = oneshot::channel();
        tx.send(Msg::Reload {
            config: load(MAIN),
            ids: vec![0, 1],
            geo: None,
            done,
        })
        .await
        .unwrap();
        let generation = applied.await.unwrap();
        assert_eq!(asked.elapsed(), Duration::ZERO, "published at once");
        assert_eq!(snapshot.load().generation, generation);
        assert_eq!(answer(&snapshot), ["192.0.2.1"], "with the waiting change");
        cancel.cancel();
    }

    /// A reload that adds an endpoint waits for its first probe (here: a
    /// probe that never reports) before going live; a failover of an
    /// endpoint the old config had meanwhile is published as fast as
    /// without the reload, not when the wait ends.
    #[tokio::test(start_paused = true)]
    async fn a_failover_during_a_reload_waiting_for_new_endpoints_is_not_delayed() {
        let main = MAIN.replace("[server]\n", "[server]\nstartup-grace = \"20s\"\n");
        let config = load(&main);
        let (publisher, snapshot, mut first) =
            Publisher::new(config, vec![0, 1], None, Metrics::new());
        let (tx, rx) = mpsc::channel::<Msg>(64);
        let cancel = CancellationToken::new();
        tokio::spawn(publisher.run(rx, cancel.clone()));
        let schedule = Schedule {
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(800),
        };
        let primary = Scripted::new(Scripted::OK);
        for (id, probe) in [(0, primary.clone()), (1, Scripted::new(Scripted::OK))] {
            tokio::spawn(probe_loop(
                id,
                probe,
                schedule,
                tx.clone(),
                no_hints(),
                cancel.clone(),
            ));
        }
        first.wait_for(|done| *done).await.unwrap();
        assert_eq!(answer(&snapshot), ["192.0.2.1"]);
        // The reload adds a region whose endpoint (id 2) is never probed.
        let added = format!("{main}[regions.third]\nendpoints = [{{ address = \"192.0.2.3\" }}]\n");
        let (done, applied) = oneshot::channel();
        tx.send(Msg::Reload {
            config: load(&added),
            ids: vec![0, 1, 2],
            geo: None,
            done,
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(1234)).await;
        let fault = Instant::now();
        primary.set(Scripted::REFUSE);
        let moved = tokio::time::timeout(Duration::from_secs(5), until(&snapshot, "192.0.2.2"))
            .await
            .expect("no failover within 5 s of a reload waiting for a new endpoint")
            - fault;
        assert!(
            // One interval, +10 % jitter, the probe grid's tick.
            moved <= Duration::from_millis(550) + crate::health::PROBE_TICK,
            "failover after {moved:?} during a reload, expected within one interval"
        );
        // The reload went live with it; its new endpoint is not answered.
        let generation = applied.await.unwrap();
        assert!(snapshot.load().generation >= generation);
        assert_eq!(snapshot.load().endpoints.len(), 3);
        assert_eq!(snapshot.load().endpoints[2].status, Status::Unknown);
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn failover_and_failback_follow_fall_and_rise() {
        let (snapshot, primary, cancel) = started(MAIN).await;
        assert_eq!(answer(&snapshot), ["192.0.2.1"]);
        assert_eq!(
            snapshot.load().service_views[0].decision,
            Decision::Tier { tier: 0 }
        );

        // Killed: one refusal is enough (fall-refused = 1), at the next
        // probe, every 500ms ± 10%.
        tokio::time::sleep(Duration::from_millis(1234)).await;
        let fault = Instant::now();
        primary.set(Scripted::REFUSE);
        let moved = until(&snapshot, "192.0.2.2").await - fault;
        assert!(
            // One interval, +10 % jitter, the probe grid's tick.
            moved <= Duration::from_millis(550) + crate::health::PROBE_TICK,
            "failover after {moved:?}, expected within one interval"
        );
        assert_eq!(
            snapshot.load().service_views[0].decision,
            Decision::Tier { tier: 1 }
        );
        let down = &snapshot.load().endpoints[0];
        assert_eq!(down.status, Status::Down);
        assert_eq!(down.last_error.as_deref(), Some("connection refused"));

        // Restored: rise = 2 consecutive successes.
        tokio::time::sleep(Duration::from_millis(777)).await;
        let fixed = Instant::now();
        primary.set(Scripted::OK);
        let back = until(&snapshot, "192.0.2.1").await - fixed;
        assert!(
            back > Duration::from_millis(450)
                && back <= Duration::from_millis(1100) + 2 * crate::health::PROBE_TICK,
            "failback after {back:?}"
        );

        // Hung: each probe takes the whole 800ms timeout, two are needed,
        // and the second starts as the first times out: the next due probe
        // (within an interval), then two timeouts.
        tokio::time::sleep(Duration::from_millis(321)).await;
        let hung = Instant::now();
        primary.set(Scripted::HANG);
        let moved = until(&snapshot, "192.0.2.2").await - hung;
        assert!(
            moved >= Duration::from_millis(800 + 800)
                && moved <= Duration::from_millis(550 + 800 + 800) + 2 * crate::health::PROBE_TICK,
            "hung failover after {moved:?}, expected 2 timeouts and up to one interval"
        );
        assert_eq!(
            snapshot.load().endpoints[0].last_error.as_deref(),
            Some("timed out")
        );
        cancel.cancel();
    }

    fn report(endpoint: u64, ok: bool) -> Msg {
        let result = if ok {
            Ok(Payload::Alive)
        } else {
            Err(ProbeError::Refused)
        };
        report_on(endpoint, Layer::Alive, result)
    }

    fn report_on(endpoint: u64, layer: Layer, result: Result<Payload, ProbeError>) -> Msg {
        Msg::Probe(ProbeReport {
            endpoint,
            layer,
            outcome: crate::health::ProbeOutcome {
                result,
                elapsed: Duration::from_millis(1),
            },
        })
    }

    /// A failure that is not a refusal: it needs `fall` in a row.
    fn timeout(endpoint: u64) -> Msg {
        report_on(endpoint, Layer::Alive, Err(ProbeError::Timeout))
    }

    #[test]
    fn a_single_lost_probe_does_not_move_the_answer() {
        let (mut publisher, snapshot, first) =
            Publisher::new(load(MAIN), vec![0, 1], None, Metrics::new());
        for endpoint in [0, 1] {
            publisher.apply(report(endpoint, true));
        }
        assert!(!*first.borrow(), "not before the snapshot is published");
        publisher.publish();
        assert!(*first.borrow(), "every endpoint has reported once");
        assert_eq!(answer(&snapshot), ["192.0.2.1"]);
        // Alternating timeouts never reach fall = 2 in a row.
        for _ in 0..10 {
            let changed = publisher.apply(timeout(0));
            publisher.apply(report(0, true));
            if changed {
                publisher.publish();
            }
            assert_eq!(answer(&snapshot), ["192.0.2.1"]);
        }
        // The error is shown in status even though the answer never moved.
        assert_eq!(snapshot.load().endpoints[0].status, Status::Up);
        assert_eq!(
            snapshot.load().endpoints[0].last_error.as_deref(),
            Some("timed out")
        );
        // Two in a row do.
        publisher.apply(timeout(0));
        assert!(publisher.apply(timeout(0)));
        publisher.publish();
        assert_eq!(answer(&snapshot), ["192.0.2.2"]);
    }

    /// A probe this edge could not make (out of descriptors: a connection
    /// flood) says nothing about the endpoint: shown, never counted.
    /// What the query path remembers of located subnets is keyed by the
    /// snapshot's GeoView id: a health change keeps it (the memory
    /// outlives failovers), a reload gets a new one (never an older view).
    #[test]
    fn the_geo_view_id_survives_health_changes_and_not_reloads() {
        let (mut publisher, snapshot, _) =
            Publisher::new(load(MAIN), vec![0, 1], None, Metrics::new());
        for endpoint in [0, 1] {
            publisher.apply(report(endpoint, true));
        }
        publisher.publish();
        let first = snapshot.load().geo.id;
        assert_ne!(first, 0);
        for _ in 0..3 {
            publisher.apply(report(0, false));
        }
        publisher.publish();
        assert_eq!(answer(&snapshot), ["192.0.2.2"], "failed over");
        assert_eq!(snapshot.load().geo.id, first, "a health change");
        let (done, _applied) = oneshot::channel();
        publisher.apply(Msg::Reload {
            config: load(MAIN),
            ids: vec![0, 1],
            geo: None,
            done,
        });
        publisher.publish();
        let reloaded = snapshot.load().geo.id;
        assert!(reloaded != first && reloaded != 0, "a reload: {reloaded}");
    }

    #[test]
    fn a_local_resource_error_is_no_result_about_the_endpoint() {
        let (mut publisher, snapshot, _) =
            Publisher::new(load(MAIN), vec![0, 1], None, Metrics::new());
        for endpoint in [0, 1] {
            publisher.apply(report(endpoint, true));
        }
        publisher.publish();
        let emfile = ProbeError::LocalResource("Too many open files (os error 24)".into());
        for _ in 0..5 {
            publisher.apply(report_on(0, Layer::Alive, Err(emfile.clone())));
        }
        publisher.publish();
        let snap = snapshot.load();
        assert_eq!(answer(&snapshot), ["192.0.2.1"], "five of them, still up");
        assert_eq!(snap.endpoints[0].status, Status::Up);
        assert_eq!(
            snap.endpoints[0].last_error.as_deref(),
            Some(
                "this edge could not probe (Too many open files (os error 24)); not counted as down"
            )
        );
    }

    /// A refused connection is unambiguous: one takes the endpoint down
    /// (`fall-refused` 1 by default), where a timeout needs `fall`; and it
    /// counts from the first refusal even after a timeout.
    #[test]
    fn typed_failures_carry_their_own_fall_count() {
        let (mut publisher, snapshot, _) =
            Publisher::new(load(MAIN), vec![0, 1], None, Metrics::new());
        for endpoint in [0, 1] {
            publisher.apply(report(endpoint, true));
        }
        publisher.publish();
        publisher.apply(timeout(0));
        publisher.publish();
        assert_eq!(answer(&snapshot), ["192.0.2.1"], "one timeout of fall 2");
        publisher.apply(report(0, true));
        publisher.apply(report(0, false));
        publisher.publish();
        assert_eq!(answer(&snapshot), ["192.0.2.2"], "one refusal is enough");
        // Coming back still needs rise = 2.
        publisher.apply(report(0, true));
        publisher.publish();
        assert_eq!(answer(&snapshot), ["192.0.2.2"]);
        publisher.apply(report(0, true));
        publisher.publish();
        assert_eq!(answer(&snapshot), ["192.0.2.1"]);
        // A timeout then a refusal: the refusal decides.
        publisher.apply(timeout(0));
        publisher.apply(report(0, false));
        publisher.publish();
        assert_eq!(answer(&snapshot), ["192.0.2.2"]);
        // Configurable: fall-refused = 3 waits for three.
        let config = MAIN.replace(
            "endpoints = [{ address = \"192.0.2.1\" }]",
            "endpoints = [{ address = \"192.0.2.1\" }]\nprobe = { fall-refused = 3 }",
        );
        let (mut publisher, snapshot, _) =
            Publisher::new(load(&config), vec![0, 1], None, Metrics::new());
        for endpoint in [0, 1] {
            publisher.apply(report(endpoint, true));
        }
        publisher.publish();
        publisher.apply(report(0, false));
        publisher.apply(report(0, false));
        publisher.publish();
        assert_eq!(answer(&snapshot), ["192.0.2.1"], "two of three");
        publisher.apply(report(0, false));
        publisher.publish();
        assert_eq!(answer(&snapshot), ["192.0.2.2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_endpoints_are_never_fit() {
        let (publisher, snapshot, first) =
            Publisher::new(load(MAIN), vec![0, 1], None, Metrics::new());
        // Before any probe: every endpoint unknown. Not fail-open (that
        // would answer endpoints nobody has probed): SERVFAIL.
        assert_eq!(snapshot.load().generation, 1);
        assert_eq!(
            snapshot.load().service_views[0].decision,
            Decision::Unprobed
        );
        assert!(snapshot.load().services[0].classes[0].servfail);
        assert!(snapshot.load().service_views[0].answer.is_empty());
        assert!(!*first.borrow());
        drop(publisher);
    }

    /// Fail-open answers endpoints known to be down, never unprobed ones.
    #[tokio::test(start_paused = true)]
    async fn fail_open_waits_until_every_endpoint_is_known_down() {
        let (mut publisher, snapshot, _) =
            Publisher::new(load(MAIN), vec![0, 1], None, Metrics::new());
        let view = |s: &ArcSwap<Snapshot>| {
            let snap = s.load();
            (
                snap.service_views[0].decision.clone(),
                snap.service_views[0].answer.clone(),
                snap.services[0].classes[0].servfail,
            )
        };
        // The primary is known down; the secondary has no result yet.
        publisher.apply(report(0, false));
        publisher.publish();
        assert_eq!(view(&snapshot), (Decision::Unprobed, vec![], true));
        // Both known down: now fail-open answers the first tier.
        publisher.apply(report(1, false));
        publisher.publish();
        assert_eq!(
            view(&snapshot),
            (Decision::FailOpen, vec!["192.0.2.1".to_string()], false)
        );
        let explain = snapshot.load().services[0].classes[0]
            .explain
            .text()
            .to_string();
        assert!(explain.contains("fail-open"), "{explain}");
    }

    /// Issue 13, item 4: the primary hung a minute ago and the secondary
    /// serves; then the secondary's probes time out too (a loaded edge whose
    /// probes all time out looks like this). Fail-open answered the hung
    /// primary; now the secondary, fit a moment ago, is answered for the
    /// hold, and only then the all-down rule. The run loop wakes at the
    /// hold's end by itself (no probe result changes anything then).
    #[tokio::test(start_paused = true)]
    async fn everything_unfit_at_once_answers_the_last_known_good_for_the_hold() {
        let metrics = Metrics::new();
        let (publisher, snapshot, mut first) =
            Publisher::new(load(MAIN), vec![0, 1], None, metrics.clone());
        let (tx, rx) = mpsc::channel::<Msg>(64);
        let cancel = CancellationToken::new();
        tokio::spawn(publisher.run(rx, cancel.clone()));
        let schedule = Schedule {
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(800),
        };
        let primary = Scripted::new(Scripted::OK);
        let secondary = Scripted::new(Scripted::OK);
        for (id, script) in [(0, primary.clone()), (1, secondary.clone())] {
            tokio::spawn(probe_loop(
                id,
                script,
                schedule,
                tx.clone(),
                no_hints(),
                cancel.clone(),
            ));
        }
        first.wait_for(|done| *done).await.unwrap();
        primary.set(Scripted::HANG);
        until(&snapshot, "192.0.2.2").await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        secondary.set(Scripted::HANG);
        let decision = |s: &ArcSwap<Snapshot>| s.load().service_views[0].decision.clone();
        while matches!(decision(&snapshot), Decision::Tier { .. }) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let lost = Instant::now();
        assert_eq!(
            answer(&snapshot),
            ["192.0.2.2"],
            "the secondary, fit a moment ago, not the primary hung for a minute"
        );
        assert_eq!(
            decision(&snapshot),
            Decision::LastKnownGood {
                tier: 1,
                hold_left_ms: 30_000,
                then: "fail-open"
            }
        );
        let explain = snapshot.load().services[0].classes[0]
            .explain
            .text()
            .to_string();
        assert!(
            explain.contains("endpoint 192.0.2.2: down (timed out) -> kept as last known good: fit 0.0 s ago, down since"),
            "{explain}"
        );
        assert!(
            explain.contains("endpoint 192.0.2.1: down (timed out) -> removed at eligible: down"),
            "{explain}"
        );
        assert!(
            explain.contains(
                "-> last known good (tier 1) for 30.0 s more, then fail-open -> 192.0.2.2"
            ),
            "{explain}"
        );
        let text = metrics.encode();
        assert!(
            text.contains("inferdns_last_known_good{service=\"chat\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("inferdns_last_known_good_holds_total{service=\"chat\"} 1"),
            "{text}"
        );
        tokio::time::sleep_until(lost + Duration::from_millis(29_990)).await;
        assert_eq!(answer(&snapshot), ["192.0.2.2"], "held until the end");
        tokio::time::sleep_until(lost + Duration::from_millis(30_010)).await;
        assert_eq!(
            decision(&snapshot),
            Decision::FailOpen,
            "then the configured rule"
        );
        assert_eq!(answer(&snapshot), ["192.0.2.1"]);
        assert!(
            metrics
                .encode()
                .contains("inferdns_last_known_good{service=\"chat\"} 0")
        );
        // Back to normal when the secondary answers again.
        secondary.set(Scripted::OK);
        until(&snapshot, "192.0.2.2").await;
        assert_eq!(decision(&snapshot), Decision::Tier { tier: 1 });
        cancel.cancel();
    }

    const LAST_GOOD: &str = r#"
[server]
dns-listen = ["127.0.0.1:0"]
[zone]
apex = "inference.example.com"
soa = { primary = "ns1.example.net", contact = "hostmaster.example.net" }
ns = [{ name = "ns1.example.net" }]
[regions.primary]
endpoints = [{ address = "192.0.2.1" }]
[regions.secondary]
endpoints = [{ address = "192.0.2.2" }, { address = "192.0.2.3" }]
[services.chat]
tiers = [["primary"], ["secondary"]]
when-all-down = "nodata"
last-known-good = "10s"
"#;

    /// One probe round 500 ms after the last (every endpoint reports, so no
    /// layer falls silent), then a publish.
    async fn round(publisher: &mut Publisher, ok: [bool; 3]) {
        tokio::time::advance(Duration::from_millis(500)).await;
        for (endpoint, ok) in ok.into_iter().enumerate() {
            // Failures are timeouts (a loaded edge), which need `fall` in a row.
            publisher.apply(if ok {
                report(endpoint as u64, true)
            } else {
                timeout(endpoint as u64)
            });
        }
        publisher.publish();
    }

    /// The primary is down for good; the secondary's two endpoints go down
    /// `gap` rounds (of 500 ms) apart. Returns the publisher and snapshot as
    /// the second one goes down.
    async fn secondary_lost(gap: usize) -> (Publisher, Arc<ArcSwap<Snapshot>>) {
        let (mut publisher, snapshot, _) =
            Publisher::new(load(LAST_GOOD), vec![0, 1, 2], None, Metrics::new());
        round(&mut publisher, [true; 3]).await;
        for _ in 0..10 {
            round(&mut publisher, [false, true, true]).await;
        }
        assert_eq!(answer(&snapshot), ["192.0.2.2", "192.0.2.3"]);
        for _ in 0..2 + gap {
            round(&mut publisher, [false, false, true]).await;
        }
        assert_eq!(answer(&snapshot), ["192.0.2.3"]);
        for _ in 0..2 {
            round(&mut publisher, [false, false, false]).await;
        }
        (publisher, snapshot)
    }

    fn decision(snapshot: &ArcSwap<Snapshot>) -> Decision {
        snapshot.load().service_views[0].decision.clone()
    }

    /// "Together" is within one probe cycle (interval + timeout, 1.3 s with
    /// the defaults) of the last one to go; the hold is counted from it.
    #[tokio::test(start_paused = true)]
    async fn last_known_good_is_what_went_unfit_together_for_the_hold_then_the_rule() {
        // Down 1.0 s apart: both are last known good.
        let (mut publisher, snapshot) = secondary_lost(0).await;
        let lost = Instant::now();
        assert_eq!(answer(&snapshot), ["192.0.2.2", "192.0.2.3"]);
        assert_eq!(
            decision(&snapshot),
            Decision::LastKnownGood {
                tier: 1,
                hold_left_ms: 10_000,
                then: "nodata"
            }
        );
        // A drained region is never answered, not even as last known good.
        let drain = |publisher: &mut Publisher, drained: bool| {
            let (done, _) = oneshot::channel();
            publisher.apply(Msg::Drain {
                region: "secondary".into(),
                drained,
                done,
            });
        };
        drain(&mut publisher, true);
        assert_eq!(decision(&snapshot), Decision::NoData);
        drain(&mut publisher, false);
        assert!(decision(&snapshot).is_last_known_good());
        // The hold runs from the last one down, whatever was published since.
        while Instant::now() + Duration::from_millis(500) < lost + Duration::from_secs(10) {
            round(&mut publisher, [false; 3]).await;
            assert_eq!(answer(&snapshot), ["192.0.2.2", "192.0.2.3"]);
        }
        tokio::time::advance(lost + Duration::from_secs(10) - Instant::now()).await;
        publisher.publish();
        assert_eq!(decision(&snapshot), Decision::NoData, "then when-all-down");
        assert!(answer(&snapshot).is_empty());
        let explain = snapshot.load().services[0].classes[0]
            .explain
            .text()
            .to_string();
        assert!(
            explain.ends_with("decision: nothing fit -> NODATA"),
            "{explain}"
        );

        // Down 2.0 s apart (over one cycle): only the last one.
        let (_, snapshot) = secondary_lost(2).await;
        assert_eq!(answer(&snapshot), ["192.0.2.3"]);
        assert!(decision(&snapshot).is_last_known_good());
    }

    /// Alive and up, but its model list has no first result yet: not known
    /// to lack the model, so no fallback CNAME (cached for its TTL) either.
    #[tokio::test(start_paused = true)]
    async fn a_layer_without_a_first_result_holds_the_fallback_back() {
        let config = r#"
[server]
dns-listen = ["127.0.0.1:0"]
[zone]
apex = "inference.example.com"
soa = { primary = "ns1.example.net", contact = "hostmaster.example.net" }
ns = [{ name = "ns1.example.net" }]
[regions.big]
endpoints = [{ address = "192.0.2.1" }]
probe = { path = "/health", models-path = "/v1/models" }
[regions.small]
endpoints = [{ address = "192.0.2.2" }]
[services.chat]
model = "big-model"
tiers = [["big"]]
fallback = "small"
[services.small]
tiers = [["small"]]
"#;
        let (mut publisher, snapshot, _) =
            Publisher::new(load(config), vec![0, 1], None, Metrics::new());
        publisher.apply(report(0, true));
        publisher.apply(report(1, true));
        publisher.publish();
        assert_eq!(
            snapshot.load().service_views[0].decision,
            Decision::Unprobed,
            "alive, model list not heard from yet"
        );
        // The model list arrives without the model: now the fallback is right.
        publisher.apply(Msg::Probe(ProbeReport {
            endpoint: 0,
            layer: Layer::Models,
            outcome: crate::health::ProbeOutcome {
                result: Ok(Payload::Models(vec!["other-model".into()])),
                elapsed: Duration::from_millis(1),
            },
        }));
        publisher.publish();
        assert_eq!(
            snapshot.load().service_views[0].decision,
            Decision::Fallback {
                service: "small".into()
            }
        );
    }

    /// Clients restricted by residency get SERVFAIL too (another edge may
    /// know), not a NODATA that their resolver would keep, while the
    /// regions they may use are not probed yet.
    #[tokio::test(start_paused = true)]
    async fn residency_classes_wait_for_first_results_too() {
        let dir = tempfile::tempdir().unwrap();
        let db = concat!(env!("CARGO_MANIFEST_DIR"), "/geoip/test-city.mmdb");
        let config = format!(
            r#"
[server]
dns-listen = ["127.0.0.1:0"]
[zone]
apex = "inference.example.com"
soa = {{ primary = "ns1.example.net", contact = "hostmaster.example.net" }}
ns = [{{ name = "ns1.example.net" }}]
[geoip]
database = "{db}"
[regions.eu]
endpoints = [{{ address = "192.0.2.1" }}]
jurisdictions = ["eu"]
[regions.us]
endpoints = [{{ address = "192.0.2.2" }}]
jurisdictions = ["us"]
[services.chat]
tiers = [["eu", "us"]]
residency = {{ rules = [{{ clients = ["eu"], allow = ["eu"] }}] }}
"#
        );
        let path = dir.path().join("inferdns.toml");
        std::fs::write(&path, config).unwrap();
        let config = Arc::new(crate::config::load(&path).unwrap());
        let (mut publisher, snapshot, _) = Publisher::new(config, vec![0, 1], None, Metrics::new());
        publisher.apply(report(1, true));
        publisher.publish();
        let decisions = |s: &ArcSwap<Snapshot>| -> Vec<Decision> {
            s.load().service_views[0]
                .residency
                .as_ref()
                .unwrap()
                .iter()
                .map(|c| c.decision.clone())
                .collect()
        };
        // EU clients: their region unprobed -> SERVFAIL; others: the US region.
        assert_eq!(decisions(&snapshot)[0], Decision::Unprobed);
        assert_eq!(decisions(&snapshot)[1], Decision::Tier { tier: 0 });
        assert!(snapshot.load().services[0].classes[0].servfail);
        // Known down: NODATA, never the US region.
        publisher.apply(report(0, false));
        publisher.publish();
        assert_eq!(decisions(&snapshot)[0], Decision::ResidencyNoData);
    }

    /// Residency wins over last known good too: a class of clients holds
    /// only the endpoints it may use, and then gets NODATA, never a region
    /// outside its jurisdiction.
    #[tokio::test(start_paused = true)]
    async fn last_known_good_stays_inside_each_residency_class() {
        let db = concat!(env!("CARGO_MANIFEST_DIR"), "/geoip/test-city.mmdb");
        let config = format!(
            r#"
[server]
dns-listen = ["127.0.0.1:0"]
[zone]
apex = "inference.example.com"
soa = {{ primary = "ns1.example.net", contact = "hostmaster.example.net" }}
ns = [{{ name = "ns1.example.net" }}]
[geoip]
database = "{db}"
[regions.eu]
endpoints = [{{ address = "192.0.2.1" }}]
jurisdictions = ["eu"]
[regions.us]
endpoints = [{{ address = "192.0.2.2" }}]
jurisdictions = ["us"]
[services.chat]
tiers = [["eu", "us"]]
last-known-good = "10s"
residency = {{ rules = [{{ clients = ["eu"], allow = ["eu"] }}] }}
"#
        );
        let (mut publisher, snapshot, _) =
            Publisher::new(load(&config), vec![0, 1], None, Metrics::new());
        let classes = |s: &ArcSwap<Snapshot>| -> Vec<(Decision, Vec<String>)> {
            s.load().service_views[0]
                .residency
                .as_ref()
                .unwrap()
                .iter()
                .take(2)
                .map(|c| (c.decision.clone(), c.answer.clone()))
                .collect()
        };
        let step = |publisher: &mut Publisher, ok: [bool; 2]| {
            for (endpoint, ok) in ok.into_iter().enumerate() {
                // Timeouts: `fall` of them in a row take an endpoint down.
                publisher.apply(if ok {
                    report(endpoint as u64, true)
                } else {
                    timeout(endpoint as u64)
                });
            }
            publisher.publish();
        };
        step(&mut publisher, [true, true]);
        tokio::time::advance(Duration::from_millis(500)).await;
        // Both go down together.
        step(&mut publisher, [false, false]);
        tokio::time::advance(Duration::from_millis(500)).await;
        step(&mut publisher, [false, false]);
        let held = |tier| Decision::LastKnownGood {
            tier,
            hold_left_ms: 10_000,
            then: "fail-open",
        };
        assert_eq!(
            classes(&snapshot),
            [
                (held(0), vec!["192.0.2.1".to_string()]),
                (
                    held(0),
                    vec!["192.0.2.1".to_string(), "192.0.2.2".to_string()]
                ),
            ],
            "EU clients hold the EU region only; the others both"
        );
        for _ in 0..20 {
            tokio::time::advance(Duration::from_millis(500)).await;
            step(&mut publisher, [false, false]);
        }
        let after = classes(&snapshot);
        assert_eq!(after[0], (Decision::ResidencyNoData, vec![]));
        assert_eq!(after[1].0, Decision::FailOpen);
    }

    /// A probe layer whose probe never reports (its task stuck from the
    /// start) is given up on at its silence limit: then fail-open may answer it.
    #[tokio::test(start_paused = true)]
    async fn an_endpoint_never_heard_from_stops_holding_fail_open() {
        let (mut publisher, snapshot, _) =
            Publisher::new(load(MAIN), vec![0, 1], None, Metrics::new());
        publisher.apply(report(0, false));
        publisher.publish();
        assert_eq!(
            snapshot.load().service_views[0].decision,
            Decision::Unprobed
        );
        // Defaults: 3 x 500 ms + 800 ms.
        tokio::time::advance(Duration::from_millis(2300)).await;
        publisher.publish();
        let snap = snapshot.load();
        assert_eq!(snap.service_views[0].decision, Decision::FailOpen);
        assert_eq!(
            snap.endpoints[1].silent.as_deref(),
            Some("no alive probe result for over 2.3 s")
        );
    }

    /// A seeded xorshift generator: the jitter below reproduces.
    struct Jitter(u64);

    impl Jitter {
        fn unit(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }

        /// A probe time: mostly the region's own RTT, sometimes a slow
        /// probe, now and then a stall of 0.2 to 0.9 s.
        fn probe_ms(&mut self, base_ms: f64) -> f64 {
            match self.unit() {
                x if x < 0.93 => base_ms + 2.0 * self.unit(),
                x if x < 0.98 => 20.0 + 60.0 * self.unit(),
                _ => 200.0 + 700.0 * self.unit(),
            }
        }
    }

    /// Proximity with jittery probe times: edge stalls (all probes slow at
    /// once), single slow probes and short bursts never send a client to a
    /// region on another continent; the answer goes by distance, with the
    /// measured time smoothed (median of recent probes) and bounded.
    #[test]
    fn jittery_probe_times_never_move_a_client_across_continents() {
        use crate::dns::answer::{Client, answer};
        use hickory_proto::rr::{LowerName, Name, RData, RecordType};
        use std::str::FromStr;

        let db = concat!(env!("CARGO_MANIFEST_DIR"), "/geoip/test-city.mmdb");
        // (region, address, continent, lat, lon, the region's own RTT in ms)
        let regions = [
            ("us-east", "192.0.2.1", "NA", 38.90, -77.04, 1.0),
            ("us-west", "192.0.2.2", "NA", 37.77, -122.42, 25.0),
            ("eu-west", "192.0.2.3", "EU", 53.35, -6.26, 12.0),
            ("eu-central", "192.0.2.4", "EU", 50.11, 8.68, 14.0),
            ("ap", "192.0.2.5", "AS", 35.69, 139.69, 28.0),
        ];
        let mut config = format!(
            r#"
[server]
dns-listen = ["127.0.0.1:0"]
[zone]
apex = "inference.example.com"
soa = {{ primary = "ns1.example.net", contact = "hostmaster.example.net" }}
ns = [{{ name = "ns1.example.net" }}]
[geoip]
database = "{db}"
[ecs]
max-prefix-v4 = 32
[services.chat]
tiers = [["us-east", "us-west", "eu-west", "eu-central", "ap"]]
strategy = "proximity"
"#
        );
        for (id, ip, _, lat, lon, _) in regions {
            config.push_str(&format!(
                "[regions.{id}]\nendpoints = [{{ address = \"{ip}\" }}]\nlocation = {{ lat = {lat}, lon = {lon} }}\n"
            ));
        }
        let geo = Arc::new(GeoDb::load(std::path::Path::new(db)).unwrap());
        let (mut publisher, snapshot, _) = Publisher::new(
            load(&config),
            vec![0, 1, 2, 3, 4],
            Some(geo),
            Metrics::new(),
        );
        // Clients of the test database: (subnet, continent).
        let clients = [
            ("198.51.100.0/24", "NA"), // Washington
            ("10.0.0.0/16", "NA"),     // San Francisco
            ("10.5.0.0/16", "NA"),     // Toronto
            ("10.1.0.0/16", "EU"),     // Paris
            ("10.2.0.0/16", "EU"),     // Dublin
            ("192.0.2.0/24", "EU"),    // Frankfurt
            ("203.0.113.0/24", "AS"),  // Tokyo
            ("10.6.0.0/16", "AS"),     // Singapore
        ];
        let qname = LowerName::new(&Name::from_str("chat.inference.example.com.").unwrap());
        let continent_of = |ip: String| -> &str {
            regions
                .iter()
                .find(|r| r.1 == ip)
                .map(|r| r.2)
                .unwrap_or("none")
        };
        let mut jitter = Jitter(0x5eed_1234_abcd_9876);
        let (mut rounds, mut stalls, mut checked) = (0, 0, 0);
        for _ in 0..400 {
            // One round of probes: sometimes the edge stalls, and every
            // probe of the round is slow at once.
            let stall = jitter.unit() < 0.03;
            stalls += usize::from(stall);
            for (e, region) in regions.iter().enumerate() {
                let ms = if stall {
                    200.0 + 700.0 * jitter.unit()
                } else {
                    jitter.probe_ms(region.5)
                };
                publisher.apply(Msg::Probe(ProbeReport {
                    endpoint: e as u64,
                    layer: Layer::Alive,
                    outcome: crate::health::ProbeOutcome {
                        result: Ok(Payload::Alive),
                        elapsed: Duration::from_secs_f64(ms / 1000.0),
                    },
                }));
            }
            publisher.publish();
            rounds += 1;
            let snap = snapshot.load();
            for (subnet, continent) in clients {
                let client = Client {
                    addr: Some("127.0.0.1".parse().unwrap()),
                    ecs: Some(subnet.parse().unwrap()),
                };
                let a = answer(&snap, &qname, RecordType::A, &client);
                assert!(!a.answers.is_empty(), "{subnet}: an answer");
                for record in &a.answers {
                    let RData::A(ip) = &record.data else {
                        panic!("{subnet}: not an address")
                    };
                    assert_eq!(
                        continent_of(ip.to_string()),
                        continent,
                        "round {rounds}: client {subnet} sent to {ip}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(stalls > 5, "the jitter has edge stalls: {stalls}");
        assert!(checked >= 400 * clients.len());
    }

    #[test]
    fn status_names_the_real_strategy() {
        let (_, snapshot) = fleet();
        let strategies: Vec<&str> = snapshot
            .load()
            .service_views
            .iter()
            .map(|v| v.strategy)
            .collect();
        assert_eq!(strategies, ["cost", "capacity"]);
        let (_, main, _) = Publisher::new(load(MAIN), vec![0, 1], None, Metrics::new());
        assert_eq!(main.load().service_views[0].strategy, "failover");
    }

    /// A backend that hung and wakes up (SIGSTOP, SIGCONT) answers the probe
    /// it held at once. `rise 2` must still take a second success an
    /// interval later, not a back-to-back probe in the same instant.
    #[tokio::test(start_paused = true)]
    async fn a_hang_that_clears_needs_rise_successes_spaced_by_the_interval() {
        let (publisher, snapshot, mut first) =
            Publisher::new(load(MAIN), vec![0, 1], None, Metrics::new());
        let (tx, rx) = mpsc::channel::<Msg>(64);
        let cancel = CancellationToken::new();
        tokio::spawn(publisher.run(rx, cancel.clone()));
        let schedule = Schedule {
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(800),
        };
        // The primary's reports pass through here, so the test knows when
        // each one arrived.
        let (relay_tx, mut relay_rx) = mpsc::channel::<ProbeReport>(64);
        let (seen_tx, mut seen) = mpsc::unbounded_channel::<(Instant, bool)>();
        {
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(report) = relay_rx.recv().await {
                    let _ = seen_tx.send((Instant::now(), report.outcome.result.is_ok()));
                    if tx.send(Msg::Probe(report)).await.is_err() {
                        return;
                    }
                }
            });
        }
        let primary = Scripted::new(Scripted::OK);
        tokio::spawn(probe_loop(
            0,
            primary.clone(),
            schedule,
            relay_tx,
            no_hints(),
            cancel.clone(),
        ));
        tokio::spawn(probe_loop(
            1,
            Scripted::new(Scripted::OK),
            schedule,
            tx,
            no_hints(),
            cancel.clone(),
        ));
        first.wait_for(|done| *done).await.unwrap();
        primary.set(Scripted::HANG);
        until(&snapshot, "192.0.2.2").await;
        // The next timeout report from now on.
        while seen.try_recv().is_ok() {}
        let timed_out = loop {
            let (at, ok) = seen.recv().await.unwrap();
            if !ok {
                break at;
            }
        };
        // 700 ms after it (longer than an interval), the backend wakes up.
        tokio::time::sleep_until(timed_out + Duration::from_millis(700)).await;
        primary.set(Scripted::OK);
        let cleared = Instant::now();
        let back = until(&snapshot, "192.0.2.1").await;
        assert!(
            back - cleared >= Duration::from_millis(450),
            "up {:?} after the hang cleared: the second success did not wait an interval",
            back - cleared
        );
        assert!(
            back - cleared <= Duration::from_millis(550) + crate::health::PROBE_TICK,
            "up {:?} after the hang cleared",
            back - cleared
        );
        cancel.cancel();
    }

    /// A probe task that dies (here: panics) sends no more results; its
    /// endpoint must not keep its last state (up) forever.
    #[tokio::test(start_paused = true)]
    async fn a_probe_layer_that_stops_reporting_makes_the_endpoint_unfit() {
        let (snapshot, primary, cancel) = started(MAIN).await;
        assert_eq!(answer(&snapshot), ["192.0.2.1"]);
        primary.set(Scripted::PANIC);
        let stopped = Instant::now();
        // Its last result came at most one interval (+10%) before; the
        // limit is 3 x 500 ms + 800 ms after it.
        tokio::time::sleep_until(stopped + Duration::from_millis(2300 - 550 - 10)).await;
        assert_eq!(answer(&snapshot), ["192.0.2.1"], "not before the limit");
        tokio::time::sleep_until(stopped + Duration::from_millis(2300 + 10)).await;
        let snap = snapshot.load();
        assert_eq!(answer(&snapshot), ["192.0.2.2"], "failed over at the limit");
        assert_eq!(snap.service_views[0].decision, Decision::Tier { tier: 1 });
        let primary = &snap.endpoints[0];
        assert_eq!(primary.status, Status::Up, "its last result was a success");
        assert_eq!(
            primary.silent.as_deref(),
            Some("no alive probe result for over 2.3 s")
        );
        let explain = snap.services[0].classes[0].explain.text().to_string();
        assert!(
            explain.contains(
                "endpoint 192.0.2.1: up -> removed at eligible: no alive probe result for over 2.3 s"
            ),
            "{explain}"
        );
        cancel.cancel();
    }

    /// The primary probed on every layer: alive every 500 ms, the model
    /// list every 2 s, a completion every 30 s (the defaults).
    const LAYERED: &str = r#"
[server]
dns-listen = ["127.0.0.1:0"]
[zone]
apex = "inference.example.com"
soa = { primary = "ns1.example.net", contact = "hostmaster.example.net" }
ns = [{ name = "ns1.example.net" }]
[regions.primary]
endpoints = [{ address = "192.0.2.1" }]
probe = { models-path = "/v1/models", completion = { model = "test-model" } }
[regions.secondary]
endpoints = [{ address = "192.0.2.2" }]
[services.chat]
tiers = [["primary"], ["secondary"]]
"#;

    const ALIVE: Schedule = Schedule {
        interval: Duration::from_millis(500),
        timeout: Duration::from_millis(800),
    };
    const MODELS: Schedule = Schedule {
        interval: Duration::from_secs(2),
        timeout: Duration::from_millis(800),
    };
    const COMPLETION: Schedule = Schedule {
        interval: Duration::from_secs(30),
        timeout: Duration::from_secs(5),
    };

    /// A running publisher for `config` with probe loops steered by it, as
    /// the daemon wires them: endpoint 0 probed on each `(probe, schedule)`,
    /// endpoint 1 on an alive probe that always answers. Returns the
    /// snapshot, the publisher's channel, the first-round flag and the token
    /// that stops it all.
    fn steered(
        config: &str,
        primary: Vec<(Scripted, Schedule)>,
    ) -> (
        Arc<ArcSwap<Snapshot>>,
        mpsc::Sender<Msg>,
        watch::Receiver<bool>,
        CancellationToken,
    ) {
        let (mut publisher, snapshot, first) =
            Publisher::new(load(config), vec![0, 1], None, Metrics::new());
        let (hints, hints_rx) = watch::channel(ProbeHints::default());
        publisher.connect_probes(hints);
        let (tx, rx) = mpsc::channel::<Msg>(64);
        let cancel = CancellationToken::new();
        tokio::spawn(publisher.run(rx, cancel.clone()));
        for (probe, schedule) in primary {
            let (tx, hints, cancel) = (tx.clone(), hints_rx.clone(), cancel.clone());
            tokio::spawn(probe_loop(0, probe, schedule, tx, hints, cancel));
        }
        tokio::spawn(probe_loop(
            1,
            Scripted::new(Scripted::OK),
            ALIVE,
            tx.clone(),
            hints_rx,
            cancel.clone(),
        ));
        (snapshot, tx, first, cancel)
    }

    /// Waits (in virtual time, at most `limit`) until the service answers
    /// `want`; returns how long that took.
    async fn within(snapshot: &ArcSwap<Snapshot>, want: &str, limit: Duration) -> Duration {
        let start = Instant::now();
        while answer(snapshot) != [want] && start.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        start.elapsed()
    }

    /// Issue 13: a server that was not listening yet refused the first
    /// completion probe, and the completion layer (first result decides)
    /// held the endpoint out for rise x 30 s. The alive layer explains a
    /// refusal; when it comes up, the layers above are probed at once.
    #[tokio::test(start_paused = true)]
    async fn a_completion_refused_before_the_server_listened_does_not_hold_failback() {
        let server = Scripted::new(Scripted::REFUSE);
        let layers = vec![
            (server.clone(), ALIVE),
            (server.layer(Layer::Models), MODELS),
            (server.layer(Layer::Completion), COMPLETION),
        ];
        let (snapshot, _tx, mut first, cancel) = steered(LAYERED, layers);
        first.wait_for(|done| *done).await.unwrap();
        assert_eq!(answer(&snapshot), ["192.0.2.2"]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        server.set(Scripted::OK);
        // rise x alive interval (+10% jitter) + one model-list interval,
        // each probe up to one grid tick late.
        let bound =
            Duration::from_millis(2 * 550) + MODELS.interval + 3 * crate::health::PROBE_TICK;
        let back = within(&snapshot, "192.0.2.1", Duration::from_secs(90)).await;
        assert!(back <= bound, "failback after {back:?}, bound {bound:?}");
        cancel.cancel();
    }

    /// A 1 s outage (connection refused) while the 30 s completion probe
    /// runs: even with `fall = 1` the completion layer does not count the
    /// refusal (the alive layer sees it too and takes the endpoint out), so
    /// failback needs only the alive layer's rise.
    #[tokio::test(start_paused = true)]
    async fn a_short_outage_during_a_completion_probe_fails_back_on_the_alive_rise() {
        let config = LAYERED.replace(
            "completion = { model = \"test-model\" } }",
            "completion = { model = \"test-model\" }, fall = 1 }",
        );
        let server = Scripted::new(Scripted::OK);
        let completion = Scripted::on(Layer::Completion, Scripted::OK);
        let layers = vec![
            (server.clone(), ALIVE),
            (server.layer(Layer::Models), MODELS),
            (completion.clone(), COMPLETION),
        ];
        let (snapshot, _tx, mut first, cancel) = steered(&config, layers);
        first.wait_for(|done| *done).await.unwrap();
        assert_eq!(answer(&snapshot), ["192.0.2.1"]);
        // Hold the next completion probe, then start the outage with it.
        completion.set(Scripted::HANG);
        let calls = completion.calls();
        while completion.calls() == calls {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        server.set(Scripted::REFUSE);
        completion.set(Scripted::REFUSE);
        let out = within(&snapshot, "192.0.2.2", Duration::from_secs(1)).await;
        assert!(
            out < Duration::from_secs(1),
            "the alive layer saw the outage"
        );
        tokio::time::sleep(Duration::from_secs(1) - out).await;
        server.set(Scripted::OK);
        completion.set(Scripted::OK);
        let bound = Duration::from_millis(2 * 550) + MODELS.interval;
        let back = within(&snapshot, "192.0.2.1", Duration::from_secs(90)).await;
        assert!(back <= bound, "failback after {back:?}, bound {bound:?}");
        cancel.cancel();
    }

    /// The load signal says the region is full: its completion probes are
    /// not sent (they would queue behind the load), status says why, and
    /// they resume at once when the load ends.
    #[tokio::test(start_paused = true)]
    async fn no_completion_probe_is_sent_to_a_region_whose_load_signal_is_full() {
        let config = LAYERED.replace(
            "[regions.secondary]",
            "capacity = { max-age = \"1h\" }\n[regions.secondary]",
        );
        let server = Scripted::new(Scripted::OK);
        let completion = Scripted::on(Layer::Completion, Scripted::OK);
        let layers = vec![(server.clone(), ALIVE), (completion.clone(), COMPLETION)];
        let config = config.replace("models-path = \"/v1/models\", ", "");
        let (snapshot, tx, mut first, cancel) = steered(&config, layers);
        first.wait_for(|done| *done).await.unwrap();
        let push = |utilization: f64| {
            let tx = tx.clone();
            async move {
                let (done, generation) = oneshot::channel();
                tx.send(Msg::Capacity {
                    region: "primary".into(),
                    report: PushReport {
                        utilization: Some(utilization),
                        ..PushReport::default()
                    },
                    done,
                })
                .await
                .unwrap();
                generation.await.unwrap().unwrap();
            }
        };
        push(0.97).await;
        let sent = completion.calls();
        let skipped = |s: &ArcSwap<Snapshot>| s.load().endpoints[0].skipped.clone();
        // Five completion intervals: nothing sent, status says why.
        tokio::time::sleep(COMPLETION.interval * 5).await;
        assert_eq!(completion.calls() - sent, 0, "probes sent to a full region");
        assert_eq!(
            skipped(&snapshot).as_deref(),
            Some("completion probe skipped: region full")
        );
        assert!(
            snapshot.load().endpoints[0].silent.is_none(),
            "skipping is not silence"
        );
        assert_eq!(snapshot.load().endpoints[0].status, Status::Up);
        // The load ends: the next completion probe goes out at once.
        push(0.5).await;
        let ended = Instant::now();
        while completion.calls() == sent && ended.elapsed() < COMPLETION.interval {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(
            ended.elapsed() < Duration::from_millis(10),
            "{:?}",
            ended.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(skipped(&snapshot), None);
        assert_eq!(answer(&snapshot), ["192.0.2.1"]);
        cancel.cancel();
    }

    /// A completion that times out on a region the load signal already
    /// sheds is "overloaded": shown, never counted as dead. On an unloaded
    /// region a timeout still counts toward `fall`.
    #[tokio::test(start_paused = true)]
    async fn a_completion_timeout_on_a_loaded_region_is_overloaded_not_dead() {
        let config = LAYERED
            .replace(
                "[regions.secondary]",
                "capacity = { max-age = \"1h\" }\n[regions.secondary]",
            )
            .replace("models-path = \"/v1/models\", ", "");
        let (mut publisher, snapshot, _) =
            Publisher::new(load(&config), vec![0, 1], None, Metrics::new());
        let completion = |result| report_on(0, Layer::Completion, result);
        publisher.apply(report(0, true));
        publisher.apply(report(1, true));
        publisher.apply(completion(Ok(Payload::Completion)));
        publisher.publish();
        assert_eq!(answer(&snapshot), ["192.0.2.1"]);
        push(&mut publisher, "primary", 0.85);
        for _ in 0..5 {
            publisher.apply(completion(Err(ProbeError::Timeout)));
            publisher.publish();
            assert_eq!(
                answer(&snapshot),
                ["192.0.2.1"],
                "shed by load, not removed"
            );
        }
        let ep = &snapshot.load().endpoints[0];
        assert_eq!(
            ep.last_error.as_deref(),
            Some(
                "completion timed out while the region is loaded (overloaded, not counted as down)"
            )
        );
        // Without load, two timeouts in a row take it out.
        push(&mut publisher, "primary", 0.2);
        publisher.apply(completion(Err(ProbeError::Timeout)));
        publisher.apply(completion(Err(ProbeError::Timeout)));
        publisher.publish();
        assert_eq!(answer(&snapshot), ["192.0.2.2"]);
    }

    const POOL: &str = r#"
[server]
dns-listen = ["127.0.0.1:0"]
[zone]
apex = "inference.example.com"
soa = { primary = "ns1.example.net", contact = "hostmaster.example.net" }
ns = [{ name = "ns1.example.net" }]
[regions.pool]
endpoints = [{ address = "192.0.2.1" }, { address = "192.0.2.2" }]
probe = { interval = "500ms", timeout = "800ms", slow-start = "10s", cooldown = "5s" }
[services.chat]
tiers = [["pool"]]
"#;

    /// A publisher for `config` (two endpoints) running with a scripted probe
    /// loop per endpoint, after its first round. Returns the snapshot handle,
    /// the first endpoint's script (the second always answers) and the token
    /// that stops it all.
    async fn started(config: &str) -> (Arc<ArcSwap<Snapshot>>, Scripted, CancellationToken) {
        let config = load(config);
        let (publisher, snapshot, mut first) =
            Publisher::new(config, vec![0, 1], None, Metrics::new());
        let (tx, rx) = mpsc::channel::<Msg>(64);
        let cancel = CancellationToken::new();
        tokio::spawn(publisher.run(rx, cancel.clone()));
        let flaky = Scripted::new(Scripted::OK);
        let schedule = Schedule {
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(800),
        };
        tokio::spawn(probe_loop(
            0,
            flaky.clone(),
            schedule,
            tx.clone(),
            no_hints(),
            cancel.clone(),
        ));
        tokio::spawn(probe_loop(
            1,
            Scripted::new(Scripted::OK),
            schedule,
            tx,
            no_hints(),
            cancel.clone(),
        ));
        first.wait_for(|done| *done).await.unwrap();
        (snapshot, flaky, cancel)
    }

    async fn pool() -> (Arc<ArcSwap<Snapshot>>, Scripted, CancellationToken) {
        started(POOL).await
    }

    /// Weight of 192.0.2.1 in the published answer (1 when all are equal), if present.
    fn weight_of_first(snapshot: &ArcSwap<Snapshot>) -> Option<f64> {
        let snap = snapshot.load();
        let class = &snap.services[0].classes[0];
        let at = class
            .a
            .iter()
            .position(|r| r.data.to_string() == "192.0.2.1")?;
        Some(class.a_weights.get(at).copied().unwrap_or(1.0))
    }

    #[tokio::test(start_paused = true)]
    async fn slow_start_ramps_a_recovered_endpoint_up() {
        let (snapshot, flaky, cancel) = pool().await;
        assert_eq!(
            weight_of_first(&snapshot),
            Some(1.0),
            "a first start is not a recovery"
        );
        flaky.set(Scripted::REFUSE);
        while weight_of_first(&snapshot).is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        flaky.set(Scripted::OK);
        while weight_of_first(&snapshot).is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let back = Instant::now();
        let start = weight_of_first(&snapshot).unwrap();
        assert!((0.1..0.2).contains(&start), "starts small: {start}");
        // The share each query gives it matches the weight (2,000 draws).
        let client = crate::dns::answer::Client::default();
        let name = hickory_proto::rr::LowerName::from(
            hickory_proto::rr::Name::from_ascii("chat.inference.example.com.").unwrap(),
        );
        tokio::time::sleep_until(back + Duration::from_secs(5)).await;
        let mid = weight_of_first(&snapshot).unwrap();
        assert!((0.4..0.6).contains(&mid), "half way: {mid}");
        let snap = snapshot.load_full();
        let drawn = (0..2000)
            .filter(|_| {
                crate::dns::answer::answer(&snap, &name, hickory_proto::rr::RecordType::A, &client)
                    .answers
                    .iter()
                    .any(|r| r.data.to_string() == "192.0.2.1")
            })
            .count() as f64
            / 2000.0;
        // Binomial(2000, ~0.5): 5 standard deviations is ±0.056.
        assert!((drawn - mid).abs() < 0.06, "drawn {drawn} vs weight {mid}");
        tokio::time::sleep_until(back + Duration::from_millis(10_600)).await;
        assert_eq!(
            weight_of_first(&snapshot),
            Some(1.0),
            "full share after the ramp"
        );
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limiting_cools_down_for_retry_after_and_needs_no_rise() {
        let (snapshot, flaky, cancel) = pool().await;
        flaky.set(Scripted::RATE_LIMITED);
        while weight_of_first(&snapshot).is_some() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let out = Instant::now();
        // One 429 only; then healthy again.
        flaky.set(Scripted::OK);
        while weight_of_first(&snapshot).is_none() {
            assert_eq!(
                snapshot.load().endpoints[0].status,
                Status::Up,
                "never counted as dead"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let back = Instant::now() - out;
        assert!(
            back >= Duration::from_secs(2) && back <= Duration::from_millis(2010),
            "back exactly when Retry-After: 2 ends, not after a rise count: {back:?}"
        );
        assert_eq!(
            weight_of_first(&snapshot),
            Some(1.0),
            "no slow start: it never went down"
        );
        cancel.cancel();
    }

    const FLEET: &str = r#"
[server]
dns-listen = ["127.0.0.1:0"]
[zone]
apex = "inference.example.com"
soa = { primary = "ns1.example.net", contact = "hostmaster.example.net" }
ns = [{ name = "ns1.example.net" }]
[regions.cheap]
endpoints = [{ address = "192.0.2.1" }]
capacity = { gpus = 2, cost = 1.0, max-age = "10s" }
[regions.dear]
endpoints = [{ address = "192.0.2.2" }]
capacity = { gpus = 2, cost = 3.0, max-age = "10s" }
[services.fleet]
tiers = [["cheap", "dear"]]
strategy = "capacity"
ttl = 60
ttl-min = 10
[services.batch]
tiers = [["cheap", "dear"]]
strategy = "cost"
min-headroom = 0.25
"#;

    /// A publisher with both endpoints up, no probe tasks: reports are applied directly.
    fn fleet() -> (Publisher, Arc<ArcSwap<Snapshot>>) {
        let (mut publisher, snapshot, _) =
            Publisher::new(load(FLEET), vec![0, 1], None, Metrics::new());
        for endpoint in [0, 1] {
            publisher.apply(report(endpoint, true));
        }
        publisher.publish();
        (publisher, snapshot)
    }

    fn push(publisher: &mut Publisher, region: &str, utilization: f64) {
        let (done, _) = oneshot::channel();
        publisher.apply(Msg::Capacity {
            region: region.into(),
            report: PushReport {
                utilization: Some(utilization),
                ..PushReport::default()
            },
            done,
        });
    }

    fn utilization(snapshot: &ArcSwap<Snapshot>, region: &str) -> Option<f64> {
        snapshot
            .load()
            .region_loads
            .iter()
            .find(|l| l.0 == region)
            .and_then(|l| l.1)
    }

    fn fleet_weights(snapshot: &ArcSwap<Snapshot>) -> Vec<(String, f64)> {
        let snap = snapshot.load();
        // Services are in id order: batch (0), fleet (1).
        let drawn = snap.services[1].classes[0].drawn.as_ref().unwrap();
        drawn
            .a
            .iter()
            .map(|(r, w, _)| (r.data.to_string(), *w))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn reports_expire_to_the_static_weight() {
        let (mut publisher, snapshot) = fleet();
        push(&mut publisher, "cheap", 0.5);
        assert_eq!(utilization(&snapshot, "cheap"), Some(0.5));
        assert_eq!(
            fleet_weights(&snapshot),
            [("192.0.2.1".into(), 1.0), ("192.0.2.2".into(), 2.0)]
        );
        tokio::time::advance(Duration::from_millis(9_900)).await;
        publisher.publish();
        assert_eq!(utilization(&snapshot, "cheap"), Some(0.5), "still fresh");
        tokio::time::advance(Duration::from_millis(200)).await;
        publisher.publish();
        assert_eq!(
            utilization(&snapshot, "cheap"),
            None,
            "expired after max-age 10s"
        );
        assert_eq!(
            fleet_weights(&snapshot)[0],
            ("192.0.2.1".into(), 2.0),
            "back to gpus x base"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_run_loop_wakes_to_expire_reports() {
        let (publisher, snapshot) = fleet();
        let (tx, rx) = mpsc::channel::<Msg>(8);
        let cancel = CancellationToken::new();
        tokio::spawn(publisher.run(rx, cancel.clone()));
        let (done, result) = oneshot::channel();
        tx.send(Msg::Capacity {
            region: "dear".into(),
            report: PushReport {
                kv_cache: Some(0.9),
                ..PushReport::default()
            },
            done,
        })
        .await
        .unwrap();
        result.await.unwrap().unwrap();
        assert_eq!(utilization(&snapshot, "dear"), Some(0.9));
        tokio::time::sleep(Duration::from_millis(10_050)).await;
        assert_eq!(
            utilization(&snapshot, "dear"),
            None,
            "no message needed to expire it"
        );
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn saturated_regions_shed_and_every_full_region_still_answers() {
        let (mut publisher, snapshot) = fleet();
        push(&mut publisher, "cheap", 0.96);
        push(&mut publisher, "dear", 0.30);
        // cheap is removed (>= 95%): only dear is drawn.
        assert_eq!(fleet_weights(&snapshot), [("192.0.2.2".into(), 2.0 * 0.7)]);
        // Both full: both answer, on a small equal floor, rather than nothing.
        push(&mut publisher, "dear", 0.97);
        let w = fleet_weights(&snapshot);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w.iter().all(|(_, x)| *x > 0.0));
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_ttl_stays_within_its_bounds() {
        let (mut publisher, snapshot) = fleet();
        let ttl = |s: &ArcSwap<Snapshot>| {
            s.load().services[1].classes[0].drawn.as_ref().unwrap().a[0]
                .0
                .ttl
        };
        publisher.publish();
        assert_eq!(ttl(&snapshot), 60, "calm: the configured TTL");
        push(&mut publisher, "cheap", 0.85);
        assert_eq!(ttl(&snapshot), 10, "near a watermark: ttl-min");
        push(&mut publisher, "cheap", 0.2);
        assert_eq!(ttl(&snapshot), 10, "weights just moved a lot");
        publisher.publish();
        assert_eq!(ttl(&snapshot), 60, "calm again");
        for u in [0.1, 0.5, 0.92, 0.99, 0.0] {
            push(&mut publisher, "dear", u);
            assert!((10..=60).contains(&ttl(&snapshot)));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cost_picks_the_cheapest_region_with_headroom() {
        let (mut publisher, snapshot) = fleet();
        let batch = |s: &ArcSwap<Snapshot>| s.load().service_views[0].answer.clone();
        push(&mut publisher, "cheap", 0.5);
        push(&mut publisher, "dear", 0.1);
        assert_eq!(
            batch(&snapshot),
            ["192.0.2.1"],
            "cheapest with >= 25% headroom"
        );
        push(&mut publisher, "cheap", 0.8);
        assert_eq!(
            batch(&snapshot),
            ["192.0.2.2"],
            "cheap has only 20% headroom left"
        );
        push(&mut publisher, "dear", 0.9);
        assert_eq!(
            batch(&snapshot),
            ["192.0.2.1"],
            "none has enough: the most headroom"
        );
    }

    const TIERS: &str = r#"
[server]
dns-listen = ["127.0.0.1:0"]
[zone]
apex = "inference.example.com"
soa = { primary = "ns1.example.net", contact = "hostmaster.example.net" }
ns = [{ name = "ns1.example.net" }]
[regions.primary]
endpoints = [{ address = "192.0.2.1" }]
probe = { slow-start = "10s" }
[regions.secondary]
endpoints = [{ address = "192.0.2.2" }]
[services.chat]
tiers = [["primary"], ["secondary"]]
"#;

    #[tokio::test(start_paused = true)]
    async fn failback_ramps_the_primary_up_while_the_secondary_keeps_the_rest() {
        let (snapshot, primary, cancel) = started(TIERS).await;
        let name = hickory_proto::rr::LowerName::from(
            hickory_proto::rr::Name::from_ascii("chat.inference.example.com.").unwrap(),
        );
        let client = crate::dns::answer::Client::default();
        let primary_share = |snapshot: &ArcSwap<Snapshot>| {
            let snap = snapshot.load_full();
            (0..2000)
                .filter(|_| {
                    crate::dns::answer::answer(
                        &snap,
                        &name,
                        hickory_proto::rr::RecordType::A,
                        &client,
                    )
                    .answers
                    .iter()
                    .any(|r| r.data.to_string() == "192.0.2.1")
                })
                .count() as f64
                / 2000.0
        };
        assert_eq!(primary_share(&snapshot), 1.0);
        primary.set(Scripted::REFUSE);
        while primary_share(&snapshot) > 0.0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        primary.set(Scripted::OK);
        while primary_share(&snapshot) == 0.0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let back = Instant::now();
        // Binomial(2000, p): 5 standard deviations is at most 0.056.
        let start = primary_share(&snapshot);
        assert!((start - 0.1).abs() < 0.06, "about 10% at first: {start}");
        tokio::time::sleep_until(back + Duration::from_secs(5)).await;
        let mid = primary_share(&snapshot);
        assert!((mid - 0.5).abs() < 0.07, "about half way: {mid}");
        tokio::time::sleep_until(back + Duration::from_millis(10_600)).await;
        assert_eq!(primary_share(&snapshot), 1.0, "all of it after the ramp");
        cancel.cancel();
    }

    const MIXED: &str = r#"
[server]
dns-listen = ["127.0.0.1:0"]
[geoip]
database = "GEOIP"
[zone]
apex = "inference.example.com"
soa = { primary = "ns1.example.net", contact = "hostmaster.example.net" }
ns = [{ name = "ns1.example.net" }]
[regions.a]
location = { country = "DE", continent = "EU", lat = 50.1, lon = 8.7 }
jurisdictions = ["eu"]
endpoints = [{ address = "192.0.2.1" }, { address = "192.0.2.2" }]
probe = { models-path = "/v1/models", slow-start = "5s", cooldown = "3s" }
capacity = { gpus = 4, cost = 2.0, max-age = "10s" }
[regions.b]
location = { country = "IE", continent = "EU", lat = 53.3, lon = -6.3 }
jurisdictions = ["eu"]
endpoints = [{ address = "192.0.2.3" }]
probe = { models-path = "/v1/models" }
capacity = { gpus = 2, cost = 1.0, max-age = "10s" }
[regions.c]
location = { country = "US", continent = "NA", lat = 38.9, lon = -77.0 }
jurisdictions = ["us"]
endpoints = [{ address = "192.0.2.4" }, { address = "2001:db8::4" }]
capacity = { gpus = 8, cost = 3.0, max-age = "10s" }
[regions.d]
endpoints = [{ cname = "gw.provider.example.net", probe-address = "203.0.113.7" }]
[services.fail]
tiers = [["a"], ["b", "c"], ["d"]]
model = "m1"
max-latency = "5ms"
last-known-good = "10s"
[services.cap]
tiers = [["a", "b", "c"]]
strategy = "capacity"
records = 2
sticky = true
ttl-min = 5
[services.cheap]
tiers = [["a", "b"], ["c"]]
strategy = "cost"
model = "m2"
when-all-down = "nodata"
fallback = "fail"
[services.near]
tiers = [["a", "b", "c"]]
strategy = "proximity"
residency = { rules = [{ clients = ["eu"], allow = ["eu"] }], unknown-location = "deny" }
when-all-down = "servfail"
[services.other]
tiers = [["c"]]
"#;

    fn mixed() -> Arc<Config> {
        let geoip = concat!(env!("CARGO_MANIFEST_DIR"), "/geoip/test-city.mmdb");
        load(&MIXED.replace("GEOIP", geoip))
    }

    /// [`MIXED`] edited: 0 as it is, 1 with a service added before
    /// `fail` (which `cheap` falls back to: its index moves), 2 with one
    /// service's setting changed, 3 with a region's cost changed (more than
    /// the services), 4 with a service removed, 5 with `fail`'s name in
    /// capitals (a DNS name equal to the one before, written otherwise: the
    /// answers of `fail` and of `cheap`, whose CNAME names it, change), 6
    /// with region d's CNAME target in capitals, 7 with a service with a
    /// rollout added.
    fn mixed_variant(n: usize) -> Arc<Config> {
        let geoip = concat!(env!("CARGO_MANIFEST_DIR"), "/geoip/test-city.mmdb");
        let text = MIXED.replace("GEOIP", geoip);
        let text = match n {
            0 => text,
            1 => text.replace(
                "[services.fail]",
                "[services.added]\ntiers = [[\"b\"]]\n[services.fail]",
            ),
            2 => text.replace("records = 2", "records = 1"),
            3 => text.replace("cost = 3.0", "cost = 4.0"),
            4 => text.replace("[services.other]\ntiers = [[\"c\"]]\n", ""),
            5 => text.replace("[services.fail]\n", "[services.fail]\nname = \"FAIL\"\n"),
            6 => text.replace("gw.provider.example.net", "GW.Provider.example.net"),
            _ => format!(
                "{text}[services.canary]\ntiers = [[\"a\", \"b\"]]\nrollout = {{ stable = \"m1\", canary = \"m2\", canary-share = \"50%\" }}\n"
            ),
        };
        load(&text)
    }

    /// A reload compiles the services it changed (or, when it changed more
    /// than services, all of them); the others keep their answers, found
    /// by id although their indexes moved.
    #[tokio::test(start_paused = true)]
    async fn a_reload_recompiles_only_the_services_it_changed() {
        let (mut publisher, snapshot, _) =
            Publisher::new(mixed_variant(0), (0..6).collect(), None, Metrics::new());
        for id in 0..6 {
            for _ in 0..2 {
                publisher.apply(report_on(id, Layer::Alive, Ok(Payload::Alive)));
            }
        }
        publisher.publish();
        let reload = |publisher: &mut Publisher, variant| {
            let before = snapshot.load_full();
            let (done, _) = oneshot::channel();
            publisher.apply(Msg::Reload {
                config: mixed_variant(variant),
                ids: (0..6).collect(),
                geo: None,
                done,
            });
            publisher.publish();
            let after = snapshot.load_full();
            assert!(after.generation > before.generation);
            let mut kept: Vec<&str> = after
                .service_views
                .iter()
                .zip(&after.services)
                .filter(|(view, answer)| {
                    let was = before.service_views.iter().position(|v| v.id == view.id);
                    was.is_some_and(|j| Arc::ptr_eq(&before.services[j], answer))
                })
                .map(|(view, _)| view.id.as_str())
                .collect();
            kept.sort_unstable();
            kept.iter().map(ToString::to_string).collect::<Vec<_>>()
        };
        assert_eq!(
            reload(&mut publisher, 0),
            ["cap", "cheap", "fail", "near", "other"],
            "the same files: nothing compiled"
        );
        assert_eq!(
            reload(&mut publisher, 1),
            ["cap", "cheap", "fail", "near", "other"],
            "a service added: only it compiled"
        );
        assert_eq!(
            reload(&mut publisher, 2),
            ["cheap", "fail", "near", "other"],
            "`cap` changed (and `added` is gone)"
        );
        assert_eq!(
            reload(&mut publisher, 3),
            Vec::<String>::new(),
            "a region changed: every service compiled"
        );
        assert_eq!(
            reload(&mut publisher, 3),
            ["cap", "cheap", "fail", "near", "other"]
        );
        assert_eq!(reload(&mut publisher, 0), Vec::<String>::new());
        // Names as written, though equal as DNS names.
        assert_eq!(
            reload(&mut publisher, 5),
            ["cap", "near", "other"],
            "`fail` renamed FAIL: it and `cheap` (its CNAME names it) compiled"
        );
        assert_eq!(
            reload(&mut publisher, 6),
            Vec::<String>::new(),
            "a region's CNAME target in capitals: every service compiled"
        );
    }

    /// Many random changes of every kind, each published: every build
    /// (incremental, sharing the services whose inputs did not change) is
    /// checked against a build from scratch inside `publish_now`.
    #[tokio::test(start_paused = true)]
    async fn incremental_builds_equal_full_builds_through_random_changes() {
        use rand::{Rng, SeedableRng};
        let config = mixed();
        let endpoints: u64 = 6;
        let (mut publisher, snapshot, _) =
            Publisher::new(config, (0..endpoints).collect(), None, Metrics::new());
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let mut shared = 0;
        for _ in 0..600 {
            let id = rng.random_range(0..endpoints);
            let elapsed = Duration::from_micros(rng.random_range(0..9_000));
            let probe = |layer, result| {
                Msg::Probe(ProbeReport {
                    endpoint: id,
                    layer,
                    outcome: crate::health::ProbeOutcome { result, elapsed },
                })
            };
            match rng.random_range(0..10) {
                0..=2 => {
                    publisher.apply(probe(Layer::Alive, Ok(Payload::Alive)));
                }
                3 => {
                    publisher.apply(probe(Layer::Alive, Err(ProbeError::Refused)));
                }
                4 => {
                    publisher.apply(probe(Layer::Alive, Err(ProbeError::Timeout)));
                }
                5 => {
                    let models = match rng.random_range(0..3) {
                        0 => vec!["m1".to_string()],
                        1 => vec!["m2".to_string()],
                        _ => vec!["m1".to_string(), "m2".to_string()],
                    };
                    publisher.apply(probe(Layer::Models, Ok(Payload::Models(models))));
                }
                6 => {
                    publisher.apply(probe(
                        Layer::Alive,
                        Err(ProbeError::RateLimited {
                            retry_after_s: Some(rng.random_range(1..4)),
                        }),
                    ));
                }
                7 => {
                    let region = ["a", "b", "c"][rng.random_range(0..3)];
                    push(&mut publisher, region, rng.random_range(0.0..1.0));
                }
                8 => {
                    let (done, _) = oneshot::channel();
                    publisher.apply(Msg::Drain {
                        region: ["a", "b", "c", "d"][rng.random_range(0..4)].into(),
                        drained: rng.random_bool(0.3),
                        done,
                    });
                }
                9 if rng.random_bool(0.2) => {
                    // One reload, or two before the next build.
                    for _ in 0..rng.random_range(1..3) {
                        let (done, _) = oneshot::channel();
                        publisher.apply(Msg::Reload {
                            config: mixed_variant(rng.random_range(0..8)),
                            ids: (0..endpoints).collect(),
                            geo: None,
                            done,
                        });
                    }
                }
                _ => tokio::time::advance(Duration::from_millis(rng.random_range(0..4_000))).await,
            }
            let before = snapshot.load_full();
            publisher.publish();
            let after = snapshot.load();
            shared += before
                .services
                .iter()
                .zip(&after.services)
                .filter(|(a, b)| Arc::ptr_eq(a, b))
                .count();
        }
        assert!(shared > 600, "builds shared unchanged services: {shared}");
        let decisions: HashSet<&str> = snapshot
            .load()
            .service_views
            .iter()
            .map(|v| v.decision.state())
            .collect();
        assert!(!decisions.is_empty());
    }

    /// One endpoint's change recompiles the services over its region only;
    /// the others are the same `Arc`s as in the snapshot before.
    #[tokio::test(start_paused = true)]
    async fn a_change_recompiles_only_the_services_over_its_region() {
        let (mut publisher, snapshot, _) =
            Publisher::new(mixed(), (0..6).collect(), None, Metrics::new());
        for id in 0..6 {
            for _ in 0..2 {
                publisher.apply(report_on(id, Layer::Alive, Ok(Payload::Alive)));
                publisher.apply(report_on(
                    id,
                    Layer::Models,
                    Ok(Payload::Models(vec!["m1".into(), "m2".into()])),
                ));
            }
        }
        publisher.publish();
        let before = snapshot.load_full();
        // Endpoint 5 is the CNAME endpoint of region d, which only `fail` uses.
        publisher.apply(report(5, false));
        publisher.publish();
        let after = snapshot.load_full();
        for (i, view) in after.service_views.iter().enumerate() {
            assert_eq!(
                Arc::ptr_eq(&before.services[i], &after.services[i]),
                view.id != "fail",
                "{}",
                view.id
            );
        }
        let fail = after
            .service_views
            .iter()
            .position(|v| v.id == "fail")
            .unwrap();
        let explain = &after.services[fail].classes[0].explain;
        assert!(
            explain
                .iter()
                .any(|l| l.contains("region d endpoint gw.provider.example.net")
                    && l.contains("down")),
            "{explain:?}"
        );
        // A result that changes nothing an answer reads (region a's
        // endpoint still up, its time still under `fail`'s max-latency)
        // shares every service.
        publisher.apply(report(0, true));
        publisher.publish();
        let again = snapshot.load_full();
        assert!(again.generation > after.generation);
        for i in 0..again.services.len() {
            assert!(Arc::ptr_eq(&after.services[i], &again.services[i]));
        }
    }

    /// A whole group of regions dies at once (40 single-endpoint regions of
    /// one service; their probes find out over one jittered interval): the
    /// first loss is published at once, the rest coalesce into a few
    /// builds rather than one per endpoint.
    #[tokio::test(start_paused = true)]
    async fn many_endpoints_failing_together_cost_a_few_builds() {
        const N: u64 = 40;
        let mut text = String::from(
            "[server]\ndns-listen = [\"127.0.0.1:0\"]\n[zone]\napex = \"inference.example.com\"\nsoa = { primary = \"ns1.example.net\", contact = \"hostmaster.example.net\" }\nns = [{ name = \"ns1.example.net\" }]\n",
        );
        let mut tier = Vec::new();
        for i in 0..N {
            text.push_str(&format!(
                "[regions.r{i}]\nendpoints = [{{ address = \"192.0.2.{}\" }}]\n",
                i + 1
            ));
            tier.push(format!("\"r{i}\""));
        }
        text.push_str(&format!(
            "[services.chat]\ntiers = [[{}]]\n",
            tier.join(", ")
        ));
        let (publisher, snapshot, mut first) =
            Publisher::new(load(&text), (0..N).collect(), None, Metrics::new());
        let (tx, rx) = mpsc::channel::<Msg>(1024);
        let cancel = CancellationToken::new();
        tokio::spawn(publisher.run(rx, cancel.clone()));
        let backend = Scripted::new(Scripted::OK);
        let schedule = Schedule {
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(800),
        };
        for id in 0..N {
            tokio::spawn(probe_loop(
                id,
                backend.clone(),
                schedule,
                tx.clone(),
                no_hints(),
                cancel.clone(),
            ));
        }
        first.wait_for(|done| *done).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        assert_eq!(answer(&snapshot).len(), N as usize);
        let before = snapshot.load().generation;
        let fault = Instant::now();
        backend.set(Scripted::REFUSE);
        while answer(&snapshot).len() == N as usize {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let first_loss = fault.elapsed();
        assert!(
            first_loss <= Duration::from_millis(550) + crate::health::PROBE_TICK,
            "the first loss is published at once: {first_loss:?}"
        );
        // Once all are down the answer is the last known good one again:
        // wait for the endpoints' status instead.
        while !snapshot
            .load()
            .endpoints
            .iter()
            .all(|e| e.status == Status::Down)
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let all = fault.elapsed();
        let builds = snapshot.load().generation - before;
        assert!(
            all <= Duration::from_millis(550 + 250) + crate::health::PROBE_TICK,
            "every loss published within the interval and a gap: {all:?}"
        );
        assert!(
            builds <= 20,
            "{N} endpoints lost, {builds} builds (one per loss without coalescing)"
        );
        cancel.cancel();
    }

    /// A fleet of three (this edge "a", peers "b" and "c", nobody pulls
    /// them here: their pulls are sent by the test), majority.
    fn fleet_of_three() -> Arc<Config> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "fleet-secret\n").unwrap();
        let text = format!(
            "{MAIN}\n[fleet]\nedge = \"a\"\ntoken-file = \"token\"\nquorum = \"majority\"\npull-interval = \"1s\"\npeers = [{{ name = \"b\", url = \"http://127.0.0.1:1\" }}, {{ name = \"c\", url = \"http://127.0.0.1:2\" }}]\n"
        );
        let path = dir.path().join("inferdns.toml");
        std::fs::write(&path, text).unwrap();
        Arc::new(crate::config::load(&path).unwrap())
    }

    /// Peer `peer`'s pull: the primary up or down, the secondary up.
    fn peer_says(peer: &str, primary: Status) -> Msg {
        use crate::fleet::{EndpointObs, LayerObs, Observations};
        let endpoint = |region: &str, target: &str, state| EndpointObs {
            region: region.into(),
            target: target.into(),
            alive: LayerObs { state, age_ms: 100 },
            models: None,
            completion: None,
            model_list: None,
            error: None,
            rtt_ms: None,
            ttft_ms: None,
        };
        Msg::Peer(crate::fleet::pull::Pulled {
            peer: peer.into(),
            bytes: 200,
            result: Ok(Observations {
                edge: peer.into(),
                endpoints: vec![
                    endpoint("primary", "192.0.2.1", primary),
                    endpoint("secondary", "192.0.2.2", Status::Up),
                ],
                regions: Vec::new(),
            }),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_fleet_majority_outvotes_this_edge_until_its_peers_views_expire() {
        let (publisher, snapshot, _) =
            Publisher::new(fleet_of_three(), vec![0, 1], None, Metrics::new());
        let (tx, rx) = mpsc::channel::<Msg>(64);
        let cancel = CancellationToken::new();
        tokio::spawn(publisher.run(rx, cancel.clone()));
        for msg in [
            report(0, true),
            report(1, true),
            peer_says("b", Status::Up),
            peer_says("c", Status::Up),
        ] {
            tx.send(msg).await.unwrap();
        }
        until(&snapshot, "192.0.2.1").await;
        // This edge loses its path to the primary; both peers still reach it.
        for second in 0..5 {
            for msg in [
                report(0, false),
                report(1, true),
                peer_says("b", Status::Up),
                peer_says("c", Status::Up),
            ] {
                tx.send(msg).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
            assert_eq!(answer(&snapshot), ["192.0.2.1"], "second {second}");
        }
        let e = &snapshot.load().endpoints[0];
        let q = e.quorum.as_ref().expect("a quorum view");
        assert_eq!((q.result, q.voters, q.up), (Status::Up, 3, 2));
        assert_eq!(q.views[0].alive, Status::Down, "this edge's own view");
        assert!(
            e.last_error
                .as_deref()
                .is_some_and(|t| t.contains("quorum majority: 2 of 3")),
            "{e:?}"
        );
        // The peers fall silent: their views count for 3 pull intervals
        // after their last pull, then this edge decides alone.
        let last_pull = Instant::now() - Duration::from_millis(1000);
        let keep_local_alive = tokio::spawn({
            let tx = tx.clone();
            async move {
                loop {
                    for msg in [report(0, false), report(1, true)] {
                        if tx.send(msg).await.is_err() {
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        });
        let moved = until(&snapshot, "192.0.2.2").await - last_pull;
        assert!(
            moved >= Duration::from_secs(3) && moved <= Duration::from_millis(3010),
            "moved {moved:?} after the last pull"
        );
        let q = snapshot.load().endpoints[0].quorum.clone().unwrap();
        assert!(q.local_fallback, "{q:?}");
        // One peer back, seeing the primary up: two views, a tie keeps it up.
        tx.send(peer_says("b", Status::Up)).await.unwrap();
        until(&snapshot, "192.0.2.1").await;
        // ... and seeing it down: a majority of the views that count.
        tx.send(peer_says("b", Status::Down)).await.unwrap();
        until(&snapshot, "192.0.2.2").await;
        keep_local_alive.abort();
        cancel.cancel();
    }

    /// Two regions on v1, one on v2 (the canary), promoted after 10 s of
    /// clean checks.
    const ROLLOUT: &str = r#"
[server]
dns-listen = ["127.0.0.1:0"]
[zone]
apex = "inference.example.com"
soa = { primary = "ns1.example.net", contact = "hostmaster.example.net" }
ns = [{ name = "ns1.example.net" }]
[regions.a]
endpoints = [{ address = "192.0.2.1" }]
probe = { models-path = "/v1/models" }
[regions.b]
endpoints = [{ address = "192.0.2.2" }]
probe = { models-path = "/v1/models" }
[regions.c]
endpoints = [{ address = "192.0.2.3" }]
probe = { models-path = "/v1/models" }
[services.chat]
tiers = [["a", "b", "c"]]
rollout = { stable = "v1", canary = "v2", promote-after = "10s" }
"#;

    fn rollout_phase(snapshot: &ArcSwap<Snapshot>) -> (String, f64) {
        let view = snapshot.load().service_views[0].clone();
        let r = view.rollout.clone().expect("a rollout view");
        (r.phase.name().to_string(), r.canary_share)
    }

    #[tokio::test(start_paused = true)]
    async fn a_canary_clean_for_promote_after_is_promoted_and_a_failure_restarts_the_clock() {
        let (publisher, snapshot, _) =
            Publisher::new(load(ROLLOUT), vec![0, 1, 2], None, Metrics::new());
        let (tx, rx) = mpsc::channel::<Msg>(64);
        let cancel = CancellationToken::new();
        tokio::spawn(publisher.run(rx, cancel.clone()));
        let models = |id: u64, version: &str| {
            report_on(
                id,
                Layer::Models,
                Ok(Payload::Models(vec![version.to_string()])),
            )
        };
        // Every endpoint reports every 500 ms (no probe layer falls silent).
        let reports = |canary: &'static str| {
            vec![
                report(0, true),
                report(1, true),
                report(2, true),
                models(0, "v1"),
                models(1, "v1"),
                models(2, canary),
            ]
        };
        let feed = |canary: &'static str, seconds: u64| {
            let tx = tx.clone();
            async move {
                for _ in 0..seconds * 2 {
                    for msg in reports(canary) {
                        tx.send(msg).await.unwrap();
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        feed("v2", 6).await;
        assert_eq!(rollout_phase(&snapshot), ("canary".to_string(), 0.05));
        // The canary's model list fails once (a 500): rolled back at its
        // first failed check, and no clock promotes a rolled-back canary.
        tx.send(report_on(
            2,
            Layer::Models,
            Err(ProbeError::ServerError(500)),
        ))
        .await
        .unwrap();
        feed("v2", 1).await;
        assert_eq!(rollout_phase(&snapshot).0, "rolled-back");
        feed("v2", 20).await;
        assert_eq!(rollout_phase(&snapshot), ("rolled-back".to_string(), 0.0));
        cancel.cancel();

        // A clean canary: promoted 10 s after its first clean build.
        let (publisher, snapshot, _) =
            Publisher::new(load(ROLLOUT), vec![0, 1, 2], None, Metrics::new());
        let (tx2, rx) = mpsc::channel::<Msg>(64);
        let cancel = CancellationToken::new();
        tokio::spawn(publisher.run(rx, cancel.clone()));
        let started = Instant::now();
        let mut promoted_at = None;
        for _ in 0..30 {
            for msg in reports("v2") {
                tx2.send(msg).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            if promoted_at.is_none() && rollout_phase(&snapshot).0 == "promoted" {
                promoted_at = Some(started.elapsed());
            }
        }
        let at = promoted_at.expect("promoted");
        assert!(
            at >= Duration::from_secs(10) && at <= Duration::from_millis(10_600),
            "promoted after {at:?}"
        );
        assert_eq!(rollout_phase(&snapshot), ("promoted".to_string(), 1.0));
        assert_eq!(answer(&snapshot), ["192.0.2.3"], "everyone on v2");
        cancel.cancel();
    }
}
