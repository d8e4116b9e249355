//! The publisher: the one task that builds snapshots and swaps them in.
//!
//! Owns: the health state machine of every endpoint, the generation
//! counter, and the `ArcSwap` the query path reads. Probes (and later
//! reports, overrides and reloads) send it messages; it applies them in
//! order, rebuilds what changed and publishes a whole new snapshot, so
//! config, health and answers are always seen together.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::health::{HealthState, ProbeError, ProbeReport, Status};
use crate::model::{self, EndpointIndex, EndpointView, Snapshot, Zone};

/// Everything the publisher can be told.
#[derive(Debug)]
pub enum Msg {
    Probe(ProbeReport),
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
}

#[derive(Debug, Default, Clone)]
struct EndpointHealth {
    state: HealthState,
    last_error: Option<ProbeError>,
    since: Option<SystemTime>,
    probed: bool,
}

pub struct Publisher {
    config: Arc<Config>,
    index: EndpointIndex,
    zone: Arc<Zone>,
    /// Per global endpoint index.
    health: Vec<EndpointHealth>,
    /// Per global endpoint index.
    info: Vec<EndpointInfo>,
    generation: u64,
    snapshot: Arc<ArcSwap<Snapshot>>,
    /// Endpoints that have not reported a first result yet.
    pending_first: usize,
    first_round: watch::Sender<bool>,
}

impl Publisher {
    /// Builds generation 1 (every endpoint unknown) and returns the handle
    /// the query path reads and a flag that turns true once every endpoint
    /// has been probed once.
    pub fn new(config: Arc<Config>) -> (Self, Arc<ArcSwap<Snapshot>>, watch::Receiver<bool>) {
        let index = EndpointIndex::new(&config);
        let zone = Arc::new(Zone::compile(&config));
        let mut info = Vec::with_capacity(index.len());
        for region in &config.regions {
            for endpoint in &region.endpoints {
                let p = &endpoint.probe;
                let scheme = match p.scheme {
                    crate::config::Scheme::Http => "http",
                    crate::config::Scheme::Https => "https",
                };
                info.push(EndpointInfo {
                    region: region.id.clone(),
                    target: endpoint.target.to_string(),
                    probe: format!("{scheme}://{}{}", p.addr, p.path),
                    rise: p.rise,
                    fall: p.fall,
                });
            }
        }
        let (first_round, first_round_rx) = watch::channel(index.is_empty());
        let health = vec![EndpointHealth::default(); index.len()];
        let first = build(&config, &index, &zone, &health, &info, 1);
        let snapshot = Arc::new(ArcSwap::from_pointee(first));
        let publisher = Self {
            pending_first: index.len(),
            health,
            config,
            index,
            zone,
            info,
            generation: 1,
            snapshot: snapshot.clone(),
            first_round,
        };
        (publisher, snapshot, first_round_rx)
    }

    /// Applies one message; returns true when answers or status changed.
    pub fn apply(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Probe(report) => self.apply_probe(report),
        }
    }

    fn apply_probe(&mut self, report: ProbeReport) -> bool {
        let Some(h) = self.health.get_mut(report.endpoint) else {
            return false;
        };
        let info = &self.info[report.endpoint];
        let (region, target) = (&info.region, &info.target);
        let ok = report.outcome.result.is_ok();
        let mut changed = false;
        if !h.probed {
            h.probed = true;
            self.pending_first -= 1;
            if self.pending_first == 0 {
                self.first_round.send_replace(true);
            }
        }
        if let Some(status) = h.state.observe(ok, info.rise, info.fall) {
            h.since = Some(SystemTime::now());
            changed = true;
            match (&report.outcome.result, status) {
                (Err(e), _) => tracing::info!(
                    region = %region, endpoint = %target, status = "down", reason = %e,
                    "Endpoint is down."
                ),
                (Ok(()), _) => tracing::info!(
                    region = %region, endpoint = %target, status = "up",
                    "Endpoint is up."
                ),
            }
        }
        let error = report.outcome.result.err();
        if error.is_some() && h.last_error != error {
            changed = true;
        }
        if error.is_some() {
            h.last_error = error;
        }
        changed
    }

    /// Builds and swaps in a new snapshot, logging services whose answer moved.
    pub fn publish(&mut self) {
        self.generation += 1;
        let next = build(
            &self.config,
            &self.index,
            &self.zone,
            &self.health,
            &self.info,
            self.generation,
        );
        let previous = self.snapshot.load();
        for (old, new) in previous.service_views.iter().zip(&next.service_views) {
            if old.decision != new.decision || old.answer != new.answer {
                tracing::info!(
                    service = %new.id,
                    decision = ?new.decision,
                    answer = ?new.answer,
                    "Service answer changed."
                );
            }
        }
        self.snapshot.store(Arc::new(next));
    }

    /// Runs until the channel closes or `cancel` fires. Messages that arrive
    /// together are applied together and published once.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Msg>, cancel: CancellationToken) {
        loop {
            let msg = tokio::select! {
                () = cancel.cancelled() => return,
                msg = rx.recv() => match msg {
                    Some(msg) => msg,
                    None => return,
                },
            };
            let mut changed = self.apply(msg);
            while let Ok(msg) = rx.try_recv() {
                changed |= self.apply(msg);
            }
            if changed {
                self.publish();
            }
        }
    }
}

/// Builds a snapshot from config and health.
fn build(
    config: &Config,
    index: &EndpointIndex,
    zone: &Arc<Zone>,
    health: &[EndpointHealth],
    info: &[EndpointInfo],
    generation: u64,
) -> Snapshot {
    let status: Vec<Status> = health.iter().map(|h| h.state.status).collect();
    let mut services = Vec::with_capacity(config.services.len());
    let mut service_views = Vec::with_capacity(config.services.len());
    for i in 0..config.services.len() {
        let (answer, view) = model::service_answer(config, index, i, &status);
        services.push(answer);
        service_views.push(view);
    }
    let endpoints = health
        .iter()
        .zip(info)
        .map(|(h, info)| EndpointView {
            region: info.region.clone(),
            target: info.target.clone(),
            probe: info.probe.clone(),
            status: h.state.status,
            last_error: h.last_error.as_ref().map(ToString::to_string),
            since_unix_s: h
                .since
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
        })
        .collect();
    Snapshot {
        generation,
        built: SystemTime::now(),
        zone: zone.clone(),
        services,
        service_views,
        endpoints,
    }
}

#[cfg(test)]
mod tests {
    //! The whole signal path on tokio's paused clock: probe loops with
    //! scripted backends → publisher → snapshot, read as the query path does.

    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::health::testing::Scripted;
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

    fn config() -> Arc<Config> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inferdns.toml");
        std::fs::write(&path, MAIN).unwrap();
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

    #[tokio::test(start_paused = true)]
    async fn failover_and_failback_follow_fall_and_rise() {
        let config = config();
        let (publisher, snapshot, mut first) = Publisher::new(config.clone());
        let (tx, rx) = mpsc::channel::<Msg>(64);
        let cancel = CancellationToken::new();
        tokio::spawn(publisher.run(rx, cancel.clone()));
        let primary = Scripted::new(Scripted::OK);
        let secondary = Scripted::new(Scripted::OK);
        let schedule = Schedule {
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(800),
        };
        tokio::spawn(probe_loop(
            0,
            primary.clone(),
            schedule,
            tx.clone(),
            cancel.clone(),
        ));
        tokio::spawn(probe_loop(
            1,
            secondary.clone(),
            schedule,
            tx.clone(),
            cancel.clone(),
        ));

        first.wait_for(|done| *done).await.unwrap();
        assert_eq!(answer(&snapshot), ["192.0.2.1"]);
        assert_eq!(
            snapshot.load().service_views[0].decision,
            Decision::Tier { tier: 0 }
        );

        // Killed: fall = 2 consecutive refusals, probes every 500ms ± 10%.
        tokio::time::sleep(Duration::from_millis(1234)).await;
        let fault = Instant::now();
        primary.set(Scripted::REFUSE);
        let moved = until(&snapshot, "192.0.2.2").await - fault;
        assert!(
            moved > Duration::from_millis(450) && moved <= Duration::from_millis(1100),
            "failover after {moved:?}, expected between one and two intervals"
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
            back > Duration::from_millis(450) && back <= Duration::from_millis(1100),
            "failback after {back:?}"
        );

        // Hung: each probe takes the whole 800ms timeout, two are needed.
        tokio::time::sleep(Duration::from_millis(321)).await;
        let hung = Instant::now();
        primary.set(Scripted::HANG);
        let moved = until(&snapshot, "192.0.2.2").await - hung;
        assert!(
            moved >= Duration::from_millis(1600) && moved <= Duration::from_millis(2150),
            "hung failover after {moved:?}, expected 2 timeouts plus at most one interval"
        );
        assert_eq!(
            snapshot.load().endpoints[0].last_error.as_deref(),
            Some("timed out")
        );
        cancel.cancel();
    }

    fn report(endpoint: usize, ok: bool) -> Msg {
        Msg::Probe(ProbeReport {
            endpoint,
            outcome: crate::health::ProbeOutcome {
                result: if ok { Ok(()) } else { Err(ProbeError::Refused) },
                elapsed: Duration::from_millis(1),
            },
        })
    }

    #[test]
    fn a_single_lost_probe_does_not_move_the_answer() {
        let (mut publisher, snapshot, first) = Publisher::new(config());
        for endpoint in [0, 1] {
            publisher.apply(report(endpoint, true));
        }
        assert!(*first.borrow(), "every endpoint has reported once");
        publisher.publish();
        assert_eq!(answer(&snapshot), ["192.0.2.1"]);
        // Alternating failures never reach fall = 2 in a row.
        for _ in 0..10 {
            let changed = publisher.apply(report(0, false));
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
            Some("connection refused")
        );
        // Two in a row do.
        publisher.apply(report(0, false));
        assert!(publisher.apply(report(0, false)));
        publisher.publish();
        assert_eq!(answer(&snapshot), ["192.0.2.2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_endpoints_are_never_fit() {
        let (publisher, snapshot, first) = Publisher::new(config());
        // Before any probe: every endpoint unknown, the all-down rule applies.
        assert_eq!(snapshot.load().generation, 1);
        assert_eq!(
            snapshot.load().service_views[0].decision,
            Decision::FailOpen
        );
        assert!(!*first.borrow());
        drop(publisher);
    }
}
