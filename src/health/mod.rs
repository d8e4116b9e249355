//! Health: probes and their rise/fall state machine.
//!
//! Owns: one task per endpoint that probes on its own schedule (with jitter
//! and a timeout, so a hung backend delays nothing else) and reports every
//! result to the publisher. Must not build snapshots or touch DNS; the
//! publisher owns the state machines and decides what answers change.

mod http1;
pub mod probe;
pub mod state;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::AppError;
use crate::metrics::Metrics;
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

/// How long a probe layer may go without a result before its endpoint
/// counts as unfit: three intervals plus the timeout. A healthy layer
/// reports at least every timeout + 1.1 x interval (the next probe starts
/// an interval, with jitter, after the previous one ended), so only a dead
/// or stuck probe task (or one starved of probe slots) reaches it.
pub fn silence_limit(interval: Duration, timeout: Duration) -> Duration {
    interval * 3 + timeout
}

/// What the publisher tells the probe loops, by probe id: when to probe the
/// layers above alive at once, and which completion probes to hold back.
/// Published on a `watch` channel; the query path never sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeHints {
    /// How many times each endpoint's alive layer has come back up (down ->
    /// up). A new count makes its model-list and completion loops probe at
    /// once instead of waiting for their next interval.
    recovered: HashMap<u64, u64>,
    /// Endpoints whose region the load signal says is full (at the remove
    /// watermark): their completion probes are skipped, not queued behind
    /// the load they would only add to.
    full: HashSet<u64>,
}

impl ProbeHints {
    /// Times `endpoint`'s alive layer has recovered.
    pub fn recoveries(&self, endpoint: u64) -> u64 {
        self.recovered.get(&endpoint).copied().unwrap_or(0)
    }

    /// Notes that `endpoint`'s alive layer came back up.
    pub fn recover(&mut self, endpoint: u64) {
        *self.recovered.entry(endpoint).or_default() += 1;
    }

    pub fn is_full(&self, endpoint: u64) -> bool {
        self.full.contains(&endpoint)
    }

    /// Replaces the set of endpoints in full regions; true if it changed.
    pub fn set_full(&mut self, full: HashSet<u64>) -> bool {
        if self.full == full {
            return false;
        }
        self.full = full;
        true
    }

    /// Forgets endpoints that are gone (after a reload).
    pub fn retain(&mut self, alive: impl Fn(u64) -> bool) {
        self.recovered.retain(|id, _| alive(*id));
        self.full.retain(|id| alive(*id));
    }
}

/// Up to 10% either way, so endpoints probed at the same interval drift
/// apart instead of probing in lock-step.
pub fn jittered(interval: Duration) -> Duration {
    let factor = rand::rng().random_range(0.9..=1.1);
    interval.mul_f64(factor)
}

/// Probes one layer of one endpoint until `cancel` fires. The first probe
/// runs at once; each next one starts an interval (with jitter) after the
/// previous one *finished* (answered or failed), as HAProxy and gdnsd
/// schedule checks, or at once after a timeout (which has waited long
/// enough). Probes of one layer therefore never overlap or
/// run back to back: a hung probe counts as exactly one failure, and when a
/// hang clears, `rise` successes are spaced by the interval (sustained
/// health), not answered together by a backend that wakes up.
///
/// `hints` steers the layers above alive: when the endpoint's alive layer
/// comes back up, the model-list and completion probes run at once (a
/// recovered endpoint is not held out for their long intervals); while its
/// region is full, a due completion probe is not sent but reported as
/// [`Payload::Skipped`] (the publisher still hears from the layer), and the
/// first probe after the region stops being full runs at once.
pub async fn probe_loop<P, M>(
    endpoint: u64,
    probe: P,
    schedule: Schedule,
    tx: mpsc::Sender<M>,
    mut hints: watch::Receiver<ProbeHints>,
    cancel: CancellationToken,
) where
    P: Probe,
    M: From<ProbeReport> + Send + 'static,
{
    let layer = probe.layer();
    let steered = matches!(layer, Layer::Models | Layer::Completion);
    let mut seen = hints.borrow_and_update().recoveries(endpoint);
    let mut hints_open = steered;
    let mut skipped = false;
    let mut next = Instant::now();
    loop {
        // Sleep until due, or until a hint says "now".
        loop {
            {
                let h = hints.borrow_and_update();
                let kicked = steered && h.recoveries(endpoint) != seen;
                let unblocked = skipped && !h.is_full(endpoint);
                if kicked || unblocked {
                    break;
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = sleep_until(next) => break,
                changed = hints.changed(), if hints_open => {
                    // The publisher is gone: no more hints, just the schedule.
                    hints_open = changed.is_ok();
                }
            }
        }
        seen = hints.borrow().recoveries(endpoint);
        let outcome = if layer == Layer::Completion && hints.borrow().is_full(endpoint) {
            skipped = true;
            ProbeOutcome {
                result: Ok(Payload::Skipped),
                elapsed: Duration::ZERO,
            }
        } else {
            skipped = false;
            // Boxed: the probe's state (its request, connection and read
            // buffer) exists while it runs; inline, every idle task would
            // keep room for it (about 4 KiB each, 9 MB at 2,000 probes).
            tokio::select! {
                () = cancel.cancelled() => return,
                outcome = Box::pin(probe::run_once(&probe, schedule.timeout)) => outcome,
            }
        };
        // A probe that timed out has already waited `timeout` (longer than
        // the interval at the defaults) for an answer: the next one starts
        // at once, so a hung endpoint meets `fall` after `fall` timeouts
        // rather than `fall` timeouts plus intervals. The probes still never
        // overlap, and successes (`rise`) stay an interval apart.
        let timed_out = outcome.result == Err(ProbeError::Timeout);
        let report = ProbeReport {
            endpoint,
            layer,
            outcome,
        };
        if tx.send(report.into()).await.is_err() {
            return;
        }
        next = if timed_out {
            Instant::now()
        } else {
            on_tick(Instant::now() + jittered(schedule.interval))
        };
    }
}

/// Probes wake on a 10 ms grid: 2,000 probes a second spread evenly woke
/// the runtime about once per millisecond (its timer's resolution), and
/// each wake-up (a thread switch and an epoll round) cost more than the
/// probe's own work; on the grid, each wake-up starts the probes of 10 ms
/// together. A probe starts at most 10 ms later than its jittered time.
pub(crate) const PROBE_TICK: Duration = Duration::from_millis(10);

/// `at`, rounded up to the next [`PROBE_TICK`] since the process's first
/// call.
fn on_tick(at: Instant) -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    on_grid(at, *EPOCH.get_or_init(Instant::now), PROBE_TICK)
}

/// `at`, rounded up to the next multiple of `tick` after `epoch`. A time
/// before `epoch` (which only another runtime's paused clock in tests can
/// give) is left as it is.
fn on_grid(at: Instant, epoch: Instant, tick: Duration) -> Instant {
    let Some(since) = at.checked_duration_since(epoch) else {
        return at;
    };
    let tick = tick.as_nanos().max(1);
    let rounded = since.as_nanos().div_ceil(tick) * tick;
    epoch + Duration::from_nanos(u64::try_from(rounded).unwrap_or(u64::MAX))
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
    metrics: Arc<Metrics>,
    hints: watch::Receiver<ProbeHints>,
}

impl ProbeSet {
    /// Probe tasks are children of `cancel`; their deaths are counted in
    /// `metrics`; `hints` come from the publisher.
    pub fn new(
        cancel: CancellationToken,
        metrics: Arc<Metrics>,
        hints: watch::Receiver<ProbeHints>,
    ) -> Self {
        Self {
            running: HashMap::new(),
            next_id: 1,
            cancel,
            metrics,
            hints,
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
                let layer = probe.layer();
                let task = tokio::spawn(probe_loop(
                    id,
                    probe,
                    schedule,
                    tx.clone(),
                    self.hints.clone(),
                    token.clone(),
                ));
                let endpoint = format!("{} in region {}", key.target, key.region);
                tokio::spawn(watch_probe(task, endpoint, layer, self.metrics.clone()));
            }
            keep.insert(key, (id, token));
        }
        self.running = keep;
        Ok(ids)
    }
}

/// Notices the death of a probe task. A probe loop ends on its own only by
/// panicking (in debug builds; release builds abort): that is logged and
/// counted, and the publisher's silence limit takes the endpoint out of
/// answers instead of keeping its last state.
async fn watch_probe(
    task: tokio::task::JoinHandle<()>,
    endpoint: String,
    layer: Layer,
    metrics: Arc<Metrics>,
) {
    if let Err(e) = task.await
        && e.is_panic()
    {
        metrics.task_failures.with_label_values(&["probe"]).inc();
        tracing::error!(
            endpoint = %endpoint, layer = ?layer,
            "Probe task panicked; the endpoint is unfit until the daemon is restarted."
        );
    }
}

/// A probe whose backend a test switches between answering, refusing and
/// hanging, for paused-clock tests of the schedule and the state machine.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio::sync::Notify;

    use super::{Layer, Payload, Probe, ProbeError};

    /// The model every scripted model list names.
    pub const MODEL: &str = "test-model";

    /// Hints from a publisher that is gone: probe loops keep their schedule.
    pub fn no_hints() -> tokio::sync::watch::Receiver<super::ProbeHints> {
        tokio::sync::watch::channel(super::ProbeHints::default()).1
    }

    #[derive(Default)]
    struct Backend {
        mode: AtomicU32,
        released: Notify,
        /// Probes received (answered or not).
        calls: AtomicU32,
    }

    /// The backend's mode, a wake-up for requests it holds while hung, and
    /// the layer it answers as.
    #[derive(Clone)]
    pub struct Scripted {
        backend: Arc<Backend>,
        layer: Layer,
    }

    impl Scripted {
        pub const OK: u32 = 0;
        pub const REFUSE: u32 = 1;
        /// Holds every request until the mode changes, then answers it in
        /// the new mode: a stopped process that is continued (SIGSTOP,
        /// SIGCONT) answers the requests it queued all at once.
        pub const HANG: u32 = 2;
        /// 429 with Retry-After: 2.
        pub const RATE_LIMITED: u32 = 3;
        /// The probe task panics (a bug in a probe).
        pub const PANIC: u32 = 4;

        /// An alive probe.
        pub fn new(mode: u32) -> Self {
            Self::on(Layer::Alive, mode)
        }

        /// A probe of `layer` with a backend of its own.
        pub fn on(layer: Layer, mode: u32) -> Self {
            let backend = Arc::new(Backend::default());
            backend.mode.store(mode, Ordering::SeqCst);
            Self { backend, layer }
        }

        /// A probe of `layer` against the same backend (another path of
        /// the same server).
        pub fn layer(&self, layer: Layer) -> Self {
            Self {
                backend: self.backend.clone(),
                layer,
            }
        }

        pub fn set(&self, mode: u32) {
            self.backend.mode.store(mode, Ordering::SeqCst);
            self.backend.released.notify_waiters();
        }

        /// Probes this backend has received.
        pub fn calls(&self) -> u32 {
            self.backend.calls.load(Ordering::SeqCst)
        }
    }

    impl Probe for Scripted {
        fn layer(&self) -> Layer {
            self.layer
        }

        async fn check(&self) -> Result<Payload, ProbeError> {
            self.backend.calls.fetch_add(1, Ordering::SeqCst);
            loop {
                let released = self.backend.released.notified();
                match self.backend.mode.load(Ordering::SeqCst) {
                    Self::OK => {
                        return Ok(match self.layer {
                            Layer::Alive => Payload::Alive,
                            Layer::Models => Payload::Models(vec![MODEL.into()]),
                            Layer::Completion => Payload::Completion,
                            Layer::Metrics => Payload::Load(Default::default()),
                        });
                    }
                    Self::REFUSE => return Err(ProbeError::Refused),
                    Self::RATE_LIMITED => {
                        return Err(ProbeError::RateLimited {
                            retry_after_s: Some(2),
                        });
                    }
                    Self::PANIC => panic!("scripted probe panics"),
                    _ => released.await,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{Scripted, no_hints};
    use super::*;

    #[test]
    fn probe_times_round_up_to_the_grid_and_never_earlier() {
        let epoch = Instant::now();
        let tick = Duration::from_millis(10);
        let ms = Duration::from_millis;
        assert_eq!(on_grid(epoch, epoch, tick), epoch);
        assert_eq!(on_grid(epoch + ms(3), epoch, tick), epoch + ms(10));
        assert_eq!(on_grid(epoch + ms(10), epoch, tick), epoch + ms(10));
        assert_eq!(
            on_grid(epoch + ms(10) + Duration::from_nanos(1), epoch, tick),
            epoch + ms(20)
        );
        // Probes due within one tick start together.
        assert_eq!(
            on_grid(epoch + ms(1001), epoch, tick),
            on_grid(epoch + ms(1009), epoch, tick)
        );
        // Before the epoch: unchanged.
        let later = epoch + ms(5);
        assert_eq!(on_grid(epoch, later, tick), epoch);
    }

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
        tokio::spawn(probe_loop(
            0,
            backend,
            schedule(),
            tx,
            no_hints(),
            cancel.clone(),
        ));
        let mut times = Vec::new();
        for _ in 0..6 {
            let report = rx.recv().await.unwrap();
            assert_eq!(report.outcome.result, Ok(Payload::Alive));
            times.push(t0.elapsed());
        }
        cancel.cancel();
        assert_eq!(times[0], Duration::ZERO);
        // 500 ms ± 10 % jitter, each start up to one tick late (the grid).
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_millis(450) - PROBE_TICK
                    && gap <= Duration::from_millis(550) + PROBE_TICK,
                "gap {gap:?} outside 500ms ± 10% ± one {PROBE_TICK:?} tick"
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
        tokio::spawn(probe_loop(
            0,
            hung,
            schedule(),
            tx.clone(),
            no_hints(),
            cancel.clone(),
        ));
        tokio::spawn(probe_loop(
            1,
            fine,
            schedule(),
            tx,
            no_hints(),
            cancel.clone(),
        ));
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
        // Each hung probe times out on its own; the next one starts when
        // it timed out (never overlapping it): the timeout was wait enough.
        assert_eq!(hung_reports[0], Duration::from_millis(800));
        for pair in hung_reports.windows(2) {
            let gap = pair[1] - pair[0];
            assert_eq!(
                gap,
                Duration::from_millis(800),
                "one timeout after the other"
            );
        }
        // Meanwhile the healthy endpoint kept its own schedule (~every 500 ms).
        assert!(
            fine_reports >= 5,
            "only {fine_reports} probes of the healthy endpoint"
        );
    }

    /// A backend that hangs and then wakes up answers the probe it held at
    /// once; the next success must still wait an interval, so `rise 2`
    /// means two successes spaced by the interval, not two at one instant.
    #[tokio::test(start_paused = true)]
    async fn after_a_hang_clears_successes_are_spaced_by_the_interval() {
        let (tx, mut rx) = mpsc::channel::<ProbeReport>(16);
        let cancel = CancellationToken::new();
        let backend = Scripted::new(Scripted::HANG);
        tokio::spawn(probe_loop(
            0,
            backend.clone(),
            schedule(),
            tx,
            no_hints(),
            cancel.clone(),
        ));
        for _ in 0..2 {
            let report = rx.recv().await.unwrap();
            assert_eq!(report.outcome.result, Err(ProbeError::Timeout));
        }
        let timed_out = Instant::now();
        // 700 ms after a timeout: more than an interval since it ended.
        tokio::time::sleep_until(timed_out + Duration::from_millis(700)).await;
        backend.set(Scripted::OK);
        let cleared = Instant::now();
        let mut successes = Vec::new();
        while successes.len() < 3 {
            let report = rx.recv().await.unwrap();
            assert_eq!(report.outcome.result, Ok(Payload::Alive));
            successes.push(Instant::now());
        }
        cancel.cancel();
        assert_eq!(successes[0], cleared, "the held probe is answered at once");
        for pair in successes.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_millis(450),
                "successes {gap:?} apart: probes ran back to back"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_task_that_dies_is_noticed_and_a_stopped_one_is_not() {
        let metrics = Metrics::new();
        let (tx, _rx) = mpsc::channel::<ProbeReport>(4);
        let cancel = CancellationToken::new();
        let dying = tokio::spawn(probe_loop(
            0,
            Scripted::new(Scripted::PANIC),
            schedule(),
            tx.clone(),
            no_hints(),
            cancel.clone(),
        ));
        watch_probe(
            dying,
            "192.0.2.1 in region a".into(),
            Layer::Alive,
            metrics.clone(),
        )
        .await;
        let failures = || metrics.task_failures.with_label_values(&["probe"]).get();
        assert_eq!(failures(), 1);
        // Stopped by its token (endpoint removed, shutdown): not a failure.
        let stopped = tokio::spawn(probe_loop(
            1,
            Scripted::new(Scripted::OK),
            schedule(),
            tx,
            no_hints(),
            cancel.clone(),
        ));
        cancel.cancel();
        watch_probe(
            stopped,
            "192.0.2.2 in region a".into(),
            Layer::Alive,
            metrics.clone(),
        )
        .await;
        assert_eq!(failures(), 1);
    }

    const SLOW: Schedule = Schedule {
        interval: Duration::from_secs(30),
        timeout: Duration::from_secs(5),
    };

    /// When the publisher says the alive layer came back, the layers above
    /// it probe at once instead of at their next (long) interval; the alive
    /// layer and other endpoints keep their schedule.
    #[tokio::test(start_paused = true)]
    async fn a_recovery_hint_makes_the_layers_above_probe_at_once() {
        let (tx, mut rx) = mpsc::channel::<ProbeReport>(16);
        let (hints, hints_rx) = watch::channel(ProbeHints::default());
        let cancel = CancellationToken::new();
        let completion = Scripted::on(Layer::Completion, Scripted::OK);
        let other = Scripted::on(Layer::Completion, Scripted::OK);
        for (id, probe) in [(0, completion.clone()), (1, other.clone())] {
            let (tx, hints, cancel) = (tx.clone(), hints_rx.clone(), cancel.clone());
            tokio::spawn(probe_loop(id, probe, SLOW, tx, hints, cancel));
        }
        for _ in 0..2 {
            rx.recv().await.unwrap();
        }
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(5)).await;
        hints.send_modify(|h| h.recover(0));
        let report = rx.recv().await.unwrap();
        assert_eq!(report.endpoint, 0);
        assert_eq!(report.outcome.result, Ok(Payload::Completion));
        assert_eq!(t0.elapsed(), Duration::from_secs(5), "probed at once");
        assert_eq!(other.calls(), 1, "another endpoint is not kicked");
        // Then the interval again, from that probe.
        while rx.recv().await.unwrap().endpoint != 0 {}
        assert!(
            t0.elapsed() >= Duration::from_secs(5 + 27),
            "{:?}",
            t0.elapsed()
        );
        cancel.cancel();
    }

    /// While the endpoint's region is full its completion probe is not
    /// sent: the loop reports `Skipped` at each interval instead (so the
    /// layer is not silent), and probes at once when the region has room.
    #[tokio::test(start_paused = true)]
    async fn completion_probes_are_skipped_while_the_region_is_full() {
        let (tx, mut rx) = mpsc::channel::<ProbeReport>(16);
        let mut full = ProbeHints::default();
        full.set_full([0].into());
        let (hints, hints_rx) = watch::channel(full);
        let cancel = CancellationToken::new();
        let completion = Scripted::on(Layer::Completion, Scripted::OK);
        tokio::spawn(probe_loop(
            0,
            completion.clone(),
            SLOW,
            tx,
            hints_rx,
            cancel.clone(),
        ));
        for _ in 0..3 {
            let report = rx.recv().await.unwrap();
            assert_eq!(report.outcome.result, Ok(Payload::Skipped));
        }
        assert_eq!(completion.calls(), 0, "nothing sent to a full region");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let room = Instant::now();
        hints.send_modify(|h| {
            h.set_full(HashSet::new());
        });
        let report = rx.recv().await.unwrap();
        assert_eq!(report.outcome.result, Ok(Payload::Completion));
        assert_eq!(
            room.elapsed(),
            Duration::ZERO,
            "probed as soon as there is room"
        );
        assert_eq!(completion.calls(), 1);
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_stops_the_loop() {
        let (tx, mut rx) = mpsc::channel::<ProbeReport>(4);
        let cancel = CancellationToken::new();
        let backend = Scripted::new(Scripted::REFUSE);
        let task = tokio::spawn(probe_loop(
            0,
            backend,
            schedule(),
            tx,
            no_hints(),
            cancel.clone(),
        ));
        assert_eq!(
            rx.recv().await.unwrap().outcome.result,
            Err(ProbeError::Refused)
        );
        cancel.cancel();
        task.await.unwrap();
        assert!(rx.recv().await.is_none(), "sender dropped after cancel");
    }
}
