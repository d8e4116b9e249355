//! Health: probes and their rise/fall state machine.
//!
//! Owns: one task per endpoint that probes on its own schedule (with jitter
//! and a timeout, so a hung backend delays nothing else) and reports every
//! result to the publisher. Must not build snapshots or touch DNS; the
//! publisher owns the state machines and decides what answers change.

pub mod probe;
pub mod state;

use std::collections::HashMap;
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::AppError;
pub use probe::{Layer, Payload, Probe, ProbeError, ProbeOutcome};
pub use state::{HealthState, Status};

/// One probe result for the endpoint with this probe id.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    pub endpoint: u64,
    pub layer: Layer,
    pub outcome: ProbeOutcome,
}

/// How often and how long one endpoint is probed.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub interval: Duration,
    pub timeout: Duration,
}

/// Up to 10% either way, so endpoints probed at the same interval drift
/// apart instead of probing in lock-step.
pub fn jittered(interval: Duration) -> Duration {
    let factor = rand::rng().random_range(0.9..=1.1);
    interval.mul_f64(factor)
}

/// Probes one endpoint until `cancel` fires. The first probe runs at once;
/// each next one starts an interval (with jitter) after the previous one
/// started, or at once when the previous one took longer than that.
pub async fn probe_loop<P, M>(
    endpoint: u64,
    probe: P,
    schedule: Schedule,
    tx: mpsc::Sender<M>,
    cancel: CancellationToken,
) where
    P: Probe,
    M: From<ProbeReport> + Send + 'static,
{
    let mut next = Instant::now();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = sleep_until(next) => {}
        }
        let started = Instant::now();
        let outcome = tokio::select! {
            () = cancel.cancelled() => return,
            outcome = probe::run_once(&probe, schedule.timeout) => outcome,
        };
        let layer = probe.layer();
        let report = ProbeReport {
            endpoint,
            layer,
            outcome,
        };
        if tx.send(report.into()).await.is_err() {
            return;
        }
        next = started + jittered(schedule.interval);
    }
}

/// What makes two endpoints the same probe: same region, same answer,
/// same probe settings. Reloads keep the probe (and its state) of an
/// endpoint whose key did not change.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EndpointKey {
    region: String,
    target: crate::config::Target,
    spec: crate::config::ProbeSpec,
}

/// The running probe tasks, one per endpoint, by stable id.
pub struct ProbeSet {
    running: HashMap<EndpointKey, (u64, CancellationToken)>,
    next_id: u64,
    cancel: CancellationToken,
}

impl ProbeSet {
    /// Probe tasks are children of `cancel`.
    pub fn new(cancel: CancellationToken) -> Self {
        Self {
            running: HashMap::new(),
            next_id: 1,
            cancel,
        }
    }

    /// Starts probes for new endpoints, stops those of removed ones, keeps
    /// the rest; returns the probe id of every endpoint in global order.
    /// On error nothing has changed.
    pub fn sync<M>(&mut self, config: &Config, tx: &mpsc::Sender<M>) -> Result<Vec<u64>, AppError>
    where
        M: From<ProbeReport> + Send + 'static,
    {
        let mut ids = Vec::new();
        let mut keep = HashMap::new();
        let mut start = Vec::new();
        for region in &config.regions {
            for endpoint in &region.endpoints {
                let key = EndpointKey {
                    region: region.id.clone(),
                    target: endpoint.target.clone(),
                    spec: endpoint.probe.clone(),
                };
                if let Some((id, token)) = self.running.get(&key) {
                    ids.push(*id);
                    keep.insert(key, (*id, token.clone()));
                    continue;
                }
                let probes =
                    probe::probes_for(&endpoint.probe).map_err(|source| AppError::Probe {
                        endpoint: format!("{} in region {}", endpoint.target, region.id),
                        source,
                    })?;
                let id = self.next_id + start.len() as u64;
                ids.push(id);
                start.push((key, id, probes));
            }
        }
        self.next_id += start.len() as u64;
        for (key, (_, token)) in &self.running {
            if !keep.contains_key(key) {
                token.cancel();
            }
        }
        for (key, id, probes) in start {
            let token = self.cancel.child_token();
            // One loop per layer, each on its own schedule.
            for (probe, interval, timeout) in probes {
                let schedule = Schedule { interval, timeout };
                tokio::spawn(probe_loop(id, probe, schedule, tx.clone(), token.clone()));
            }
            keep.insert(key, (id, token));
        }
        self.running = keep;
        Ok(ids)
    }
}

/// A probe whose backend a test switches between answering, refusing and
/// hanging, for paused-clock tests of the schedule and the state machine.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::{Probe, ProbeError};

    #[derive(Clone, Default)]
    pub struct Scripted(Arc<AtomicU32>);

    impl Scripted {
        pub const OK: u32 = 0;
        pub const REFUSE: u32 = 1;
        pub const HANG: u32 = 2;
        /// 429 with Retry-After: 2.
        pub const RATE_LIMITED: u32 = 3;

        pub fn new(mode: u32) -> Self {
            Self(Arc::new(AtomicU32::new(mode)))
        }

        pub fn set(&self, mode: u32) {
            self.0.store(mode, Ordering::SeqCst);
        }
    }

    impl Probe for Scripted {
        fn layer(&self) -> super::Layer {
            super::Layer::Alive
        }

        async fn check(&self) -> Result<super::Payload, ProbeError> {
            match self.0.load(Ordering::SeqCst) {
                Self::OK => Ok(super::Payload::Alive),
                Self::REFUSE => Err(ProbeError::Refused),
                Self::RATE_LIMITED => Err(ProbeError::RateLimited {
                    retry_after_s: Some(2),
                }),
                _ => std::future::pending().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Scripted;
    use super::*;

    fn schedule() -> Schedule {
        Schedule {
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(800),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn probes_start_at_once_and_repeat_at_the_interval_with_jitter() {
        let (tx, mut rx) = mpsc::channel::<ProbeReport>(16);
        let cancel = CancellationToken::new();
        let backend = Scripted::new(Scripted::OK);
        let t0 = Instant::now();
        tokio::spawn(probe_loop(0, backend, schedule(), tx, cancel.clone()));
        let mut times = Vec::new();
        for _ in 0..6 {
            let report = rx.recv().await.unwrap();
            assert_eq!(report.outcome.result, Ok(Payload::Alive));
            times.push(t0.elapsed());
        }
        cancel.cancel();
        assert_eq!(times[0], Duration::ZERO);
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_millis(450) && gap <= Duration::from_millis(550),
                "gap {gap:?} outside 500ms ± 10%"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_backend_times_out_without_delaying_another_endpoint() {
        let (tx, mut rx) = mpsc::channel::<ProbeReport>(64);
        let cancel = CancellationToken::new();
        let hung = Scripted::new(Scripted::HANG);
        let fine = Scripted::new(Scripted::OK);
        let t0 = Instant::now();
        tokio::spawn(probe_loop(0, hung, schedule(), tx.clone(), cancel.clone()));
        tokio::spawn(probe_loop(1, fine, schedule(), tx, cancel.clone()));
        let mut hung_reports = Vec::new();
        let mut fine_reports = 0;
        while hung_reports.len() < 3 {
            let report = rx.recv().await.unwrap();
            if report.endpoint == 0 {
                assert_eq!(report.outcome.result, Err(ProbeError::Timeout));
                assert_eq!(report.outcome.elapsed, Duration::from_millis(800));
                hung_reports.push(t0.elapsed());
            } else {
                fine_reports += 1;
            }
        }
        cancel.cancel();
        // The hung probe takes longer than the interval, so probes run back to back.
        assert_eq!(
            hung_reports,
            vec![
                Duration::from_millis(800),
                Duration::from_millis(1600),
                Duration::from_millis(2400)
            ]
        );
        // Meanwhile the healthy endpoint kept its own schedule (~every 500 ms).
        assert!(
            fine_reports >= 5,
            "only {fine_reports} probes of the healthy endpoint"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_stops_the_loop() {
        let (tx, mut rx) = mpsc::channel::<ProbeReport>(4);
        let cancel = CancellationToken::new();
        let backend = Scripted::new(Scripted::REFUSE);
        let task = tokio::spawn(probe_loop(0, backend, schedule(), tx, cancel.clone()));
        assert_eq!(
            rx.recv().await.unwrap().outcome.result,
            Err(ProbeError::Refused)
        );
        cancel.cancel();
        task.await.unwrap();
        assert!(rx.recv().await.is_none(), "sender dropped after cancel");
    }
}
