//! Prometheus metrics.
//!
//! Owns: the registry and every metric family. Labels come from the config
//! only (service, region, endpoint ids, a fixed set of qtypes and rcodes),
//! never from client addresses or query names. The query path only
//! increments counters whose handles were resolved when the snapshot was
//! built, so it takes no lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

mod services;

pub use services::Counter;
use services::ServiceSeries;

use crate::health::Layer;
use crate::model::Decision;

/// Query types counted by name; everything else is `other`.
const QTYPES: [RecordType; 7] = [
    RecordType::A,
    RecordType::AAAA,
    RecordType::CNAME,
    RecordType::TXT,
    RecordType::NS,
    RecordType::SOA,
    RecordType::ANY,
];
/// Response codes counted by name; everything else is `other`.
const RCODES: [ResponseCode; 5] = [
    ResponseCode::NoError,
    ResponseCode::NXDomain,
    ResponseCode::ServFail,
    ResponseCode::Refused,
    ResponseCode::FormErr,
];
/// The `rcode` labels of `RCODES`, in the names dig prints.
const RCODE_NAMES: [&str; 5] = ["NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED", "FORMERR"];
const QTYPE_LABELS: usize = QTYPES.len() + 1;
const RCODE_LABELS: usize = RCODES.len() + 1;
const QUERY_CELLS: usize = QTYPE_LABELS * RCODE_LABELS;

/// One service's query counts, a cell per (qtype, rcode). The query path
/// adds to a cell (one relaxed atomic add); a scrape writes a series for
/// each cell that counted a query. (Creating all 48 series of every
/// service up front cost 480,000 series, ~400 MB and a 40 MB scrape, at
/// 10,000 services.)
#[derive(Debug)]
pub struct QueryRow {
    cells: [AtomicU64; QUERY_CELLS],
}

/// The `qtype` and `rcode` labels of cell `i` of a row.
fn cell_labels(i: usize) -> (String, &'static str) {
    let (q, c) = (i / RCODE_LABELS, i % RCODE_LABELS);
    (
        QTYPES
            .get(q)
            .map_or("other".to_string(), ToString::to_string),
        RCODE_NAMES.get(c).copied().unwrap_or("other"),
    )
}

/// The `reason` labels of `inferdns_dns_malformed_total`: what made a
/// query FORMERR, in the order of `dns::query::Malformed`.
pub const MALFORMED_REASONS: [&str; 6] = [
    "question-count",
    "question",
    "record",
    "trailing-data",
    "edns",
    "ecs",
];

/// The `service` label of queries that are not for a service name.
pub const NO_SERVICE: &str = "-";

/// The `decision` labels of `inferdns_service_decision`, one per
/// [`Decision`] kind: each service has all of them, the current one 1.
pub const DECISIONS: [&str; 9] = [
    "tier",
    "last_known_good",
    "fail_open",
    "nodata",
    "no_room",
    "servfail",
    "unprobed",
    "residency_nodata",
    "fallback",
];

/// The `decision` label of `decision`.
pub fn decision_label(decision: &Decision) -> &'static str {
    match decision {
        Decision::Tier { .. } => "tier",
        Decision::LastKnownGood { .. } => "last_known_good",
        Decision::FailOpen => "fail_open",
        Decision::NoData => "nodata",
        Decision::NoRoom => "no_room",
        Decision::ServFail => "servfail",
        Decision::Unprobed => "unprobed",
        Decision::ResidencyNoData => "residency_nodata",
        Decision::Fallback { .. } => "fallback",
    }
}

/// The `layer` labels of `inferdns_probes_total`.
pub fn layer_label(layer: Layer) -> &'static str {
    match layer {
        Layer::Alive => "alive",
        Layer::Models => "models",
        Layer::Completion => "completion",
        Layer::Metrics => "metrics",
    }
}

pub struct Metrics {
    registry: Registry,
    /// The per-service families (queries, answers, decisions, ...), written
    /// out at scrape.
    services: ServiceSeries,
    malformed: IntCounterVec,
    ignored: IntCounter,
    rate_limited: IntCounterVec,
    tcp_refused: IntCounter,
    pub endpoint_up: IntGaugeVec,
    pub probes: IntCounterVec,
    pub probe_seconds: HistogramVec,
    pub snapshot_generation: IntGauge,
    pub snapshot_build_seconds: Histogram,
    pub snapshot_age_seconds: prometheus::Gauge,
    pub reloads: IntCounterVec,
    pub reload_seconds: Histogram,
    pub region_drained: IntGaugeVec,
    pub geoip_loads: IntCounterVec,
    pub region_utilization: prometheus::GaugeVec,
    pub capacity_reports: IntCounterVec,
    /// Long-lived tasks that died (error or panic), by task.
    pub task_failures: IntCounterVec,
    /// Probe layers that sent no result for longer than their silence limit.
    pub probe_layers_silent: IntGauge,
    /// Rollouts: the share of client subnets answered with the canary.
    pub rollout_canary_share: GaugeVec,
    /// Rollouts: canaries rolled back, by service and trigger.
    pub rollout_rollbacks: IntCounterVec,
    /// Rollouts: regions fit on the stable version.
    pub rollout_stable_regions: IntGaugeVec,
    /// Rollouts: 1 while fewer regions are fit on the stable version than
    /// the guard asks for.
    pub rollout_guard_breached: IntGaugeVec,
    /// Fleet: 1 while a peer's observations are fresh, by peer.
    pub fleet_peer_fresh: IntGaugeVec,
    /// Fleet: pulls of a peer by result (`ok`, `error`).
    pub fleet_pulls: IntCounterVec,
    /// Fleet: observation body bytes received from a peer.
    pub fleet_pull_bytes: IntCounterVec,
    /// Fleet: vantage points with fresh views, this edge included.
    pub fleet_vantage_points: IntGauge,
    /// Fleet: 1 while too few vantage points are fresh for the quorum and
    /// this edge decides from its own view.
    pub fleet_local_fallback: IntGauge,
    /// When the config in force was loaded (start or reload).
    pub config_loaded: Gauge,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique and valid");
    metric
}

/// The `task` labels of `inferdns_task_failures_total`.
pub const TASKS: [&str; 6] = [
    "publisher",
    "reloader",
    "geoip-watcher",
    "admin",
    "dns",
    "probe",
];

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new();
        let malformed = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "inferdns_dns_malformed_total",
                    "Malformed DNS messages answered with FORMERR, by what was wrong.",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        );
        for reason in MALFORMED_REASONS {
            malformed.with_label_values(&[reason]).inc_by(0);
        }
        let ignored = register(
            &r,
            IntCounter::new(
                "inferdns_dns_ignored_total",
                "DNS packets that got no reply: shorter than a header, responses, or from port 0.",
            )
            .expect("valid metric"),
        );
        let rate_limited = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "inferdns_rrl_limited_total",
                    "UDP responses over the rate limit: dropped, or slipped (sent truncated).",
                ),
                &["action"],
            )
            .expect("valid metric"),
        );
        for action in ["dropped", "slipped"] {
            rate_limited.with_label_values(&[action]).inc_by(0);
        }
        let tcp_refused = register(
            &r,
            IntCounter::new(
                "inferdns_dns_tcp_refused_total",
                "DNS-over-TCP connections closed at once: over the cap in all or per address.",
            )
            .expect("valid metric"),
        );
        let endpoint_up = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "inferdns_endpoint_up",
                    "1 if the endpoint is up, 0 if down or not probed yet.",
                ),
                &["region", "endpoint"],
            )
            .expect("valid metric"),
        );
        let probes = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "inferdns_probes_total",
                    "Probe results by region, endpoint, probe layer and result type.",
                ),
                &["region", "endpoint", "layer", "result"],
            )
            .expect("valid metric"),
        );
        let probe_seconds = register(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "inferdns_probe_duration_seconds",
                    "Time a probe took, failures included.",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
                &["region"],
            )
            .expect("valid metric"),
        );
        let snapshot_generation = register(
            &r,
            IntGauge::new(
                "inferdns_snapshot_generation",
                "Generation of the snapshot being served.",
            )
            .expect("valid metric"),
        );
        let snapshot_build_seconds = register(
            &r,
            Histogram::with_opts(
                HistogramOpts::new(
                    "inferdns_snapshot_build_seconds",
                    "Time to build a snapshot.",
                )
                .buckets(vec![0.00001, 0.0001, 0.001, 0.01, 0.1, 1.0]),
            )
            .expect("valid metric"),
        );
        let snapshot_age_seconds = register(
            &r,
            prometheus::Gauge::new(
                "inferdns_snapshot_age_seconds",
                "Seconds since the served snapshot was built.",
            )
            .expect("valid metric"),
        );
        let reloads = register(
            &r,
            IntCounterVec::new(
                Opts::new("inferdns_reloads_total", "Configuration reloads by result."),
                &["result"],
            )
            .expect("valid metric"),
        );
        let reload_seconds = register(
            &r,
            Histogram::with_opts(
                HistogramOpts::new(
                    "inferdns_reload_duration_seconds",
                    "Time from a reload request to its result: the new config published, or refused.",
                )
                .buckets(vec![0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0]),
            )
            .expect("valid metric"),
        );
        let region_drained = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "inferdns_region_drained",
                    "1 while an operator has drained the region.",
                ),
                &["region"],
            )
            .expect("valid metric"),
        );
        let geoip_loads = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "inferdns_geoip_loads_total",
                    "GeoIP database loads (start, reload, file replaced) by result.",
                ),
                &["result"],
            )
            .expect("valid metric"),
        );
        for result in ["success", "failure"] {
            geoip_loads.with_label_values(&[result]).inc_by(0);
        }
        let region_utilization = register(
            &r,
            prometheus::GaugeVec::new(
                Opts::new(
                    "inferdns_region_utilization_ratio",
                    "Region utilisation 0..1 (worst of KV cache, queue, GPU); absent while unknown.",
                ),
                &["region"],
            )
            .expect("valid metric"),
        );
        let capacity_reports = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "inferdns_capacity_reports_total",
                    "Capacity reports received, by region and source.",
                ),
                &["region", "source"],
            )
            .expect("valid metric"),
        );
        let task_failures = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "inferdns_task_failures_total",
                    "Long-lived tasks that ended on their own (error or panic), by task.",
                ),
                &["task"],
            )
            .expect("valid metric"),
        );
        for task in TASKS {
            task_failures.with_label_values(&[task]).inc_by(0);
        }
        let probe_layers_silent = register(
            &r,
            IntGauge::new(
                "inferdns_probe_layers_silent",
                "Probe layers with no result for longer than 3 x interval + timeout (their endpoints are unfit).",
            )
            .expect("valid metric"),
        );
        let rollout_canary_share = register(
            &r,
            GaugeVec::new(
                Opts::new(
                    "inferdns_rollout_canary_share",
                    "Share of client subnets a service's rollout answers with the canary version (0 after a rollback, 1 once promoted).",
                ),
                &["service"],
            )
            .expect("valid metric"),
        );
        let rollout_rollbacks = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "inferdns_rollout_rollbacks_total",
                    "Canaries rolled back, by trigger (automatic: its checks failed; operator).",
                ),
                &["service", "trigger"],
            )
            .expect("valid metric"),
        );
        let rollout_stable_regions = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "inferdns_rollout_stable_regions",
                    "Regions fit on a rollout's stable version.",
                ),
                &["service"],
            )
            .expect("valid metric"),
        );
        let rollout_guard_breached = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "inferdns_rollout_guard_breached",
                    "1 while fewer regions are fit on a rollout's stable version than min-stable-regions (before promotion).",
                ),
                &["service"],
            )
            .expect("valid metric"),
        );
        let fleet_peer_fresh = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "inferdns_fleet_peer_fresh",
                    "1 while the fleet peer's observations are fresh (pulled within the expiry).",
                ),
                &["peer"],
            )
            .expect("valid metric"),
        );
        let fleet_pulls = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "inferdns_fleet_pulls_total",
                    "Pulls of a fleet peer's observations, by result (ok, error).",
                ),
                &["peer", "result"],
            )
            .expect("valid metric"),
        );
        let fleet_pull_bytes = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "inferdns_fleet_pull_bytes_total",
                    "Observation body bytes received from a fleet peer.",
                ),
                &["peer"],
            )
            .expect("valid metric"),
        );
        let fleet_vantage_points = register(
            &r,
            IntGauge::new(
                "inferdns_fleet_vantage_points",
                "Edges whose views are fresh, this one included (1 without a fleet).",
            )
            .expect("valid metric"),
        );
        fleet_vantage_points.set(1);
        let fleet_local_fallback = register(
            &r,
            IntGauge::new(
                "inferdns_fleet_local_fallback",
                "1 while too few fleet peers are fresh for the quorum and this edge decides alone.",
            )
            .expect("valid metric"),
        );
        let config_loaded = register(
            &r,
            Gauge::new(
                "inferdns_last_reload_success_timestamp_seconds",
                "When the configuration in force was loaded (at start or by a reload), in seconds since the Unix epoch.",
            )
            .expect("valid metric"),
        );
        // process_cpu_seconds_total, process_resident_memory_bytes,
        // process_open_fds, process_max_fds, process_start_time_seconds, ...
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("process metric names are unique and valid");
        let build_info = register(
            &r,
            IntGaugeVec::new(
                Opts::new("inferdns_build_info", "Build information; always 1."),
                &["version"],
            )
            .expect("valid metric"),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for result in ["success", "failure"] {
            reloads.with_label_values(&[result]).inc_by(0);
        }
        Arc::new(Metrics {
            registry: r,
            services: ServiceSeries::default(),
            malformed,
            ignored,
            rate_limited,
            tcp_refused,
            endpoint_up,
            probes,
            probe_seconds,
            snapshot_generation,
            snapshot_build_seconds,
            snapshot_age_seconds,
            reloads,
            reload_seconds,
            region_drained,
            geoip_loads,
            region_utilization,
            capacity_reports,
            task_failures,
            probe_layers_silent,
            rollout_canary_share,
            rollout_rollbacks,
            rollout_stable_regions,
            rollout_guard_breached,
            fleet_peer_fresh,
            fleet_pulls,
            fleet_pull_bytes,
            fleet_vantage_points,
            fleet_local_fallback,
            config_loaded,
        })
    }

    /// Query count rows for [`NO_SERVICE`] and every service, in that
    /// order. A service's `A`/`NOERROR` series exists from the start (at 0);
    /// the others appear with their first query.
    pub fn query_table(&self, services: &[String]) -> QueryTable {
        let cells = std::iter::once(NO_SERVICE)
            .chain(services.iter().map(String::as_str))
            .map(|service| self.services.queries(service))
            .collect();
        QueryTable {
            cells,
            malformed: MALFORMED_REASONS
                .iter()
                .map(|reason| self.malformed.with_label_values(&[reason]))
                .collect(),
            ignored: Some(self.ignored.clone()),
            rate_limited: [
                Some(self.rate_limited.with_label_values(&["dropped"])),
                Some(self.rate_limited.with_label_values(&["slipped"])),
            ],
            tcp_refused: Some(self.tcp_refused.clone()),
        }
    }

    /// The counter of answers for `service` that carried `region`.
    pub fn answer_counter(&self, service: &str, region: &str) -> Counter {
        self.services.answers(service, region)
    }

    /// Sets the decision gauges of `service` (called by the publisher for
    /// each snapshot it builds).
    pub fn set_decision(&self, service: &str, decision: &Decision) {
        let tier = match decision {
            Decision::Tier { tier } | Decision::LastKnownGood { tier, .. } => {
                Some(i64::try_from(*tier).unwrap_or(i64::MAX))
            }
            _ => None,
        };
        let label = decision_label(decision);
        let index = DECISIONS
            .iter()
            .position(|d| *d == label)
            .expect("every decision label is in DECISIONS");
        self.services.set_decision(service, index, tier);
    }

    /// `inferdns_last_known_good{service}`: 1 while it holds, else 0.
    pub fn set_last_known_good(&self, service: &str, holding: bool) {
        self.services.set_last_known_good(service, holding);
    }

    /// Counts one hold in `inferdns_last_known_good_holds_total{service}`.
    pub fn count_last_known_good_hold(&self, service: &str) {
        self.services.count_hold(service);
    }

    /// Drops `inferdns_last_known_good{service}`.
    pub fn forget_last_known_good(&self, service: &str) {
        self.services.forget_last_known_good(service);
    }

    /// `inferdns_region_weight{service,region}`.
    pub fn set_region_weight(&self, service: &str, region: &str, weight: f64) {
        self.services.set_region_weight(service, region, weight);
    }

    /// `inferdns_region_shed_level{service,region}`.
    pub fn set_region_shed_level(&self, service: &str, region: &str, level: i64) {
        self.services.set_region_shed_level(service, region, level);
    }

    /// Drops every series of a service a reload removed.
    pub fn forget_service(&self, service: &str) {
        self.services.forget(service);
    }

    /// Notes that a configuration was loaded and put in force now.
    pub fn config_loaded_now(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.config_loaded.set(now.as_secs_f64());
    }

    /// Everything in the Prometheus text format: the registry's families,
    /// then the per-service ones written straight from their rows.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        let mut text = String::from_utf8(buf).expect("the text format is UTF-8");
        self.services.encode(&mut text);
        text
    }
}

impl crate::model::Counters for Metrics {
    fn answer(&self, service: &str, region: &str) -> Option<Counter> {
        Some(self.answer_counter(service, region))
    }

    fn refusal(&self, service: &str) -> Option<Counter> {
        Some(self.services.refusals(service))
    }
}

/// Pre-resolved query counters, indexed without hashing or locks.
#[derive(Debug, Clone, Default)]
pub struct QueryTable {
    /// Row 0 is [`NO_SERVICE`], row `i + 1` service `i`.
    cells: Vec<Arc<QueryRow>>,
    /// By `dns::query::Malformed::index`.
    malformed: Vec<IntCounter>,
    ignored: Option<IntCounter>,
    /// Dropped, slipped.
    rate_limited: [Option<IntCounter>; 2],
    tcp_refused: Option<IntCounter>,
}

impl QueryTable {
    /// Counts one query; `service` is the index of the service, if any.
    pub fn count(&self, service: Option<usize>, qtype: RecordType, rcode: ResponseCode) {
        let row = service.map_or(0, |s| s + 1);
        let q = QTYPES
            .iter()
            .position(|t| *t == qtype)
            .unwrap_or(QTYPES.len());
        let c = RCODES
            .iter()
            .position(|r| *r == rcode)
            .unwrap_or(RCODES.len());
        if let Some(row) = self.cells.get(row) {
            row.cells[q * RCODE_LABELS + c].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one malformed query by its reason's index in [`MALFORMED_REASONS`].
    pub fn malformed(&self, reason: usize) {
        if let Some(counter) = self.malformed.get(reason) {
            counter.inc();
        }
    }

    /// Counts one rate-limited response.
    pub fn rate_limited(&self, slipped: bool) {
        if let Some(counter) = &self.rate_limited[usize::from(slipped)] {
            counter.inc();
        }
    }

    /// Counts one TCP connection closed at once by the caps.
    pub fn tcp_refused(&self) {
        if let Some(counter) = &self.tcp_refused {
            counter.inc();
        }
    }

    /// Counts one packet that got no reply.
    pub fn ignored(&self) {
        if let Some(counter) = &self.ignored {
            counter.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(text: &str, name: &str) -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn decision_gauges_have_every_label_per_service_and_go_with_the_service() {
        let metrics = Metrics::new();
        metrics.set_decision("chat", &Decision::Tier { tier: 1 });
        metrics.set_decision("lost", &Decision::NoData);
        metrics.set_decision("chat", &Decision::Tier { tier: 0 });
        let text = metrics.encode();
        let decisions = samples(&text, "inferdns_service_decision{");
        assert_eq!(decisions.len(), 2 * DECISIONS.len(), "{decisions:#?}");
        assert!(
            decisions
                .contains(&r#"inferdns_service_decision{decision="tier",service="chat"} 1"#.into())
        );
        assert!(
            decisions.contains(
                &r#"inferdns_service_decision{decision="nodata",service="chat"} 0"#.into()
            )
        );
        assert!(
            decisions.contains(
                &r#"inferdns_service_decision{decision="nodata",service="lost"} 1"#.into()
            )
        );
        assert_eq!(
            decisions.iter().filter(|l| l.ends_with(" 1")).count(),
            2,
            "one current decision per service: {decisions:#?}"
        );
        assert_eq!(
            samples(&text, "inferdns_service_tier{"),
            vec![r#"inferdns_service_tier{service="chat"} 0"#.to_string()]
        );
        assert!(text.contains("# TYPE inferdns_service_decision gauge"));

        metrics.forget_service("chat");
        let text = metrics.encode();
        assert!(!text.contains(r#"service="chat""#), "{text}");
        assert_eq!(
            samples(&text, "inferdns_service_decision{").len(),
            DECISIONS.len()
        );
        assert!(samples(&text, "inferdns_service_tier{").is_empty());
    }
}
