//! Startup order and shutdown of the daemon.
//!
//! 1. Bind every socket (fail fast on a taken port).
//! 2. Start the publisher and one probe task per endpoint.
//! 3. Wait for the first probe round (or the startup grace).
//! 4. Serve DNS and the admin API.
//!
//! Shutdown cancels everything and waits for the listeners to finish.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminAuth, AdminState};
use crate::config::{self, Config};
use crate::dns::{DnsServer, Handler, TcpLimits};
use crate::error::AppError;
use crate::geo::{FileKey, GeoDb, GeoError, Reloaded};
use crate::health::{ProbeHints, ProbeSet};
use crate::metrics::Metrics;
use crate::model::Snapshot;
use crate::notify::Notifier;
use crate::publish::{Msg, Publisher};

/// How to start: command-line overrides of the config's listen addresses
/// (port 0 allowed), and the file that reloads read again.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    pub dns_listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    /// Reloads (SIGHUP, `POST /v1/reload`) read this file; none: reload is refused.
    pub config_path: Option<PathBuf>,
    /// What loading the config learned of its policy files
    /// ([`config::load_known`]): a reload reads only those that changed.
    /// Empty: the first reload reads every file.
    pub policy_files: config::Learned,
}

/// The outcome of a reload: the generation that serves the new config, or
/// every problem found (the old config keeps serving).
pub type ReloadResult = Result<u64, Vec<String>>;

/// Handles the admin API uses to change things.
#[derive(Clone)]
pub struct Control {
    pub publisher: mpsc::Sender<Msg>,
    pub reload: mpsc::Sender<oneshot::Sender<ReloadResult>>,
    /// Who may use the admin API (replaced on reload).
    pub admin_auth: Arc<ArcSwap<AdminAuth>>,
}

impl Control {
    /// Asks for a reload and waits for its result.
    pub async fn reload(&self) -> ReloadResult {
        let (tx, rx) = oneshot::channel();
        self.reload
            .send(tx)
            .await
            .map_err(|_| vec!["the server is shutting down".to_string()])?;
        rx.await
            .map_err(|_| vec!["the server is shutting down".to_string()])?
    }
}

/// The long-lived tasks of a running server, each with its name, so that
/// the death of any one (an error, a panic, or an end nobody asked for) is
/// noticed and said by name.
struct Tasks {
    set: JoinSet<std::io::Result<()>>,
    names: HashMap<tokio::task::Id, &'static str>,
}

impl Tasks {
    fn new() -> Self {
        Self {
            set: JoinSet::new(),
            names: HashMap::new(),
        }
    }

    fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = std::io::Result<()>> + Send + 'static,
    {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// The next task to end, by name, with how it ended.
    async fn join_next(
        &mut self,
    ) -> Option<(&'static str, Result<std::io::Result<()>, JoinError>)> {
        let (id, joined) = match self.set.join_next_with_id().await? {
            Ok((id, result)) => (id, Ok(result)),
            Err(e) => (e.id(), Err(e)),
        };
        Some((self.names.remove(&id).unwrap_or("server"), joined))
    }
}

/// The text of a panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// A started server.
pub struct Running {
    /// Where DNS is served (UDP and TCP share each address).
    pub dns: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub control: Control,
    cancel: CancellationToken,
    tasks: Tasks,
    metrics: Arc<Metrics>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    /// systemd's `$NOTIFY_SOCKET` (a no-op without it).
    notifier: Notifier,
}

impl Running {
    /// The line scripts and tests wait for.
    pub fn listening_line(&self) -> String {
        let dns: Vec<String> = self.dns.iter().map(ToString::to_string).collect();
        format!(
            "inferdns listening dns={} admin={}",
            dns.join(","),
            self.admin
        )
    }

    /// Asks everything to stop.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// Resolves when any task ends on its own (before a shutdown was asked):
    /// the daemon cannot serve correctly without every one of them. The
    /// error names the task and is counted in `inferdns_task_failures_total`.
    pub async fn failed(&mut self) -> AppError {
        let Some((task, joined)) = self.tasks.join_next().await else {
            return AppError::Task {
                task: "server",
                reason: "set is empty".into(),
            };
        };
        self.metrics.task_failures.with_label_values(&[task]).inc();
        let reason = match joined {
            Ok(Ok(())) => "ended unexpectedly".to_string(),
            Ok(Err(e)) => format!("failed: {e}"),
            Err(e) if e.is_panic() => {
                format!("panicked: {}", panic_message(e.into_panic().as_ref()))
            }
            Err(e) => format!("was cancelled: {e}"),
        };
        AppError::Task { task, reason }
    }

    /// Waits for every task; the first error wins.
    pub async fn wait(mut self) -> Result<(), AppError> {
        let mut result = Ok(());
        while let Some((_, joined)) = self.tasks.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.cancel.cancel();
                    if result.is_ok() {
                        result = Err(AppError::Io(e));
                    }
                }
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => {}
            }
        }
        result
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Starts the server for `config` and returns once DNS is being served.
pub async fn start(mut config: Config, options: StartOptions) -> Result<Running, AppError> {
    if let Some(addr) = options.dns_listen {
        config.server.dns_listen = vec![addr];
    }
    if let Some(addr) = options.admin_listen {
        config.server.admin_listen = addr;
    }
    if let Some(reason) = admin::refuse_exposed(&config.server) {
        return Err(AppError::Bind {
            what: "the admin API",
            addr: config.server.admin_listen,
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, reason),
        });
    }
    let server = config.server.clone();
    let endpoints: usize = config.regions.iter().map(|r| r.endpoints.len()).sum();

    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    let mut dns_addrs = Vec::new();
    let dont_fragment = server.max_udp_payload <= DF_MAX_UDP_PAYLOAD;
    for &addr in &server.dns_listen {
        let (u, t, bound) = bind_dns(addr, dont_fragment)?;
        udp.extend(u);
        tcp.push(t);
        dns_addrs.push(bound);
    }
    let admin_listener = bind_tcp(server.admin_listen).map_err(|source| AppError::Bind {
        what: "the admin API",
        addr: server.admin_listen,
        source,
    })?;
    let admin_addr = admin_listener.local_addr()?;

    let cancel = CancellationToken::new();
    let notifier = Notifier::from_env();
    let mut tasks = Tasks::new();
    let metrics = Metrics::new();
    // The config in force was loaded just before start.
    metrics.config_loaded_now();
    let (tx, rx) = mpsc::channel::<Msg>(1024);
    // The publisher steers the probe loops (recoveries, full regions).
    let (probe_hints, probe_hints_rx) = watch::channel(ProbeHints::default());
    let mut probes = ProbeSet::new(cancel.clone(), metrics.clone(), probe_hints_rx);
    let ids = probes.sync(&config, &tx)?;
    let admin_auth = Arc::new(ArcSwap::from_pointee(AdminAuth::of(&config)));
    let geo_db = load_geo(&config, &metrics)
        .await
        .map_err(|e| AppError::Geo(e.to_string()))?;
    let (geo_target, geo_target_rx) = watch::channel(GeoTarget::of(&config));
    let (fleet, fleet_rx) = watch::channel(Arc::new(config.fleet.clone()));
    let geo_state = Arc::new(std::sync::Mutex::new(GeoState::of(geo_db.clone())));
    let config = Arc::new(config);
    let (mut publisher, snapshot, mut first_round) =
        Publisher::new(config.clone(), ids, geo_db.clone(), metrics.clone());
    publisher.connect_probes(probe_hints);
    {
        let cancel = cancel.clone();
        tasks.spawn("publisher", async move {
            publisher.run(rx, cancel).await;
            Ok(())
        });
    }
    let (reload_tx, reload_rx) = mpsc::channel(4);
    let reloader = Reloader {
        path: options.config_path.clone(),
        known: Arc::new(config::PolicyFiles::new(config, options.policy_files)),
        probes,
        publisher: tx.clone(),
        metrics: metrics.clone(),
        admin_auth: admin_auth.clone(),
        started: server.clone(),
        geo_target,
        geo_state: geo_state.clone(),
        notifier: notifier.clone(),
        fleet,
    };
    tasks.spawn("reloader", reloader.run(reload_rx, cancel.clone()));
    let watcher = GeoWatcher {
        target: geo_target_rx,
        state: geo_state,
        publisher: tx.clone(),
        metrics: metrics.clone(),
    };
    tasks.spawn("geoip-watcher", watcher.run(cancel.clone()));
    tasks.spawn(
        "fleet-pull",
        crate::fleet::pull::run(fleet_rx, tx.clone(), cancel.clone()),
    );
    let control = Control {
        publisher: tx,
        reload: reload_tx,
        admin_auth,
    };

    // Never answer before the probes have spoken (bounded by the grace period).
    let waited =
        tokio::time::timeout(server.startup_grace, first_round.wait_for(|done| *done)).await;
    if waited.is_err() {
        tracing::warn!(
            grace_ms = server.startup_grace.as_millis() as u64,
            "Not every endpoint answered its first probe in time; services that need them answer SERVFAIL until they do."
        );
    }

    let ready = Arc::new(AtomicBool::new(false));
    let dns = DnsServer::new(
        Handler::new(snapshot.clone(), server.max_udp_payload),
        udp,
        tcp,
        TcpLimits {
            idle_timeout: server.tcp_idle_timeout,
            max_connections: tcp_connection_cap(server.tcp_max_connections, endpoints),
            max_per_address: server.tcp_max_per_address,
        },
    );
    tasks.spawn("dns", dns.run(cancel.clone()));
    let admin_state = AdminState {
        snapshot: snapshot.clone(),
        ready: ready.clone(),
        metrics: metrics.clone(),
        control: control.clone(),
    };
    tasks.spawn(
        "admin",
        admin::serve(
            admin_listener,
            admin_state,
            server.admin_limits,
            cancel.clone(),
        ),
    );
    ready.store(true, Ordering::Release);

    Ok(Running {
        dns: dns_addrs,
        admin: admin_addr,
        control,
        cancel,
        tasks,
        metrics,
        snapshot,
        notifier,
    })
}

/// Descriptors kept for everything but DNS-over-TCP clients: probes (a few
/// per endpoint), the admin API, the GeoIP file, logs.
fn descriptor_reserve(endpoints: usize) -> u64 {
    256 + 4 * endpoints as u64
}

/// The TCP connection cap actually used: the configured one, lowered so
/// that a connection flood can never take the descriptors probes need (a
/// probe failing with "too many open files" would fail a healthy region
/// over). The soft descriptor limit is raised to the hard one first.
fn tcp_connection_cap(configured: u32, endpoints: usize) -> u32 {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    let room = limit.saturating_sub(descriptor_reserve(endpoints)).max(16);
    let cap = u64::from(configured).min(room) as u32;
    if cap < configured {
        tracing::warn!(
            configured,
            cap,
            descriptor_limit = limit,
            "DNS-over-TCP connections capped below tcp-max-connections to keep descriptors for probes."
        );
    }
    cap
}

/// Performs reloads one at a time: read and check the config files, start
/// and stop probes, hand the new config to the publisher.
struct Reloader {
    path: Option<PathBuf>,
    /// The config in force and what its load learned of its policy files.
    known: Arc<config::PolicyFiles>,
    probes: ProbeSet,
    publisher: mpsc::Sender<Msg>,
    metrics: Arc<Metrics>,
    admin_auth: Arc<ArcSwap<AdminAuth>>,
    /// The `[server]` settings at start: a reload cannot change those
    /// that [`keep_start_only`] names.
    started: config::ServerConfig,
    /// Which GeoIP file the watcher watches (a reload may move it).
    geo_target: watch::Sender<GeoTarget>,
    /// The GeoIP database in use, shared with the watcher.
    geo_state: Arc<std::sync::Mutex<GeoState>>,
    /// Tells systemd a reload is under way, and when it is over.
    notifier: Notifier,
    /// The fleet the pull loops pull (restarted when it changes).
    fleet: watch::Sender<Arc<crate::config::Fleet>>,
}

impl Reloader {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<oneshot::Sender<ReloadResult>>,
        cancel: CancellationToken,
    ) -> std::io::Result<()> {
        loop {
            let reply = tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                reply = requests.recv() => match reply {
                    Some(reply) => reply,
                    None => return Ok(()),
                },
            };
            // systemd ≥ 253 holds `systemctl reload` until the READY=1
            // that ends this reload, applied or refused.
            self.notifier.reloading();
            let started = std::time::Instant::now();
            let result = self.reload().await;
            self.notifier.ready();
            let label = if result.is_ok() { "success" } else { "failure" };
            self.metrics.reloads.with_label_values(&[label]).inc();
            self.metrics
                .reload_seconds
                .observe(started.elapsed().as_secs_f64());
            if result.is_ok() {
                self.metrics.config_loaded_now();
            }
            let _ = reply.send(result);
        }
    }

    async fn reload(&mut self) -> ReloadResult {
        let Some(path) = &self.path else {
            return Err(vec![
                "started without a config file: nothing to reload".into(),
            ]);
        };
        // Reading and checking happen here, off the publisher and the query path.
        let started = std::time::Instant::now();
        let loaded = {
            let (path, known) = (path.clone(), self.known.clone());
            tokio::task::spawn_blocking(move || config::load_known(&path, &known))
                .await
                .map_err(|e| vec![format!("reload task failed: {e}")])?
        };
        let (mut config, learned) = match loaded {
            Ok(loaded) => loaded,
            Err(errors) => {
                let errors: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
                for e in &errors {
                    tracing::error!(error = %e, "Reload refused; the running configuration stays.");
                }
                return Err(errors);
            }
        };
        tracing::info!(
            policy_files_read = learned.read,
            policy_files_kept = learned.kept,
            took_ms = started.elapsed().as_millis() as u64,
            "Configuration read and checked (policy files unchanged since the last load are taken from the config in force)."
        );
        let kept = keep_start_only(&self.started, &mut config.server);
        if !kept.is_empty() {
            tracing::warn!(
                settings = %kept.join(", "),
                "These [server] settings change only on restart; keeping the ones in use."
            );
        }
        if let Some(reason) = admin::refuse_exposed(&config.server) {
            tracing::error!(%reason, "Reload refused; the running configuration stays.");
            return Err(vec![reason]);
        }
        // Everything that can fail happens before anything changes.
        let geo = self.reload_geo(&config).await.map_err(|e| {
            tracing::error!(error = %e, "Reload refused; the running configuration stays.");
            vec![e.to_string()]
        })?;
        let ids = self.probes.sync(&config, &self.publisher).map_err(|e| {
            tracing::error!(error = %e, "Reload refused; the running configuration stays.");
            vec![e.to_string()]
        })?;
        self.admin_auth.store(Arc::new(AdminAuth::of(&config)));
        let geo_db = geo.in_use.clone();
        *self.geo_state.lock().expect("GeoIP state lock poisoned") = geo;
        self.geo_target.send_replace(GeoTarget::of(&config));
        self.fleet.send_if_modified(|fleet| {
            let changed = **fleet != config.fleet;
            if changed {
                *fleet = Arc::new(config.fleet.clone());
            }
            changed
        });
        let (done, generation) = oneshot::channel();
        let config = Arc::new(config);
        let msg = Msg::Reload {
            config: config.clone(),
            ids,
            geo: geo_db,
            done,
        };
        if self.publisher.send(msg).await.is_err() {
            return Err(vec!["the server is shutting down".into()]);
        }
        self.known = Arc::new(config::PolicyFiles::new(config, learned));
        generation
            .await
            .map_err(|_| vec!["the server is shutting down".to_string()])
    }
}

impl Reloader {
    /// The GeoIP database for a reloaded config. The database in use stays
    /// when its file has not changed since it was read (same device, inode,
    /// size and times: not even opened; a City database is tens of
    /// megabytes), when the file changed but holds the same bytes (read and
    /// compared, not checked again), or when the file changed into one that
    /// does not load (refused and counted once, as the watcher does); a
    /// database at a new path must load, or the reload is refused. Returns
    /// the state to store once the reload is committed.
    async fn reload_geo(&self, config: &Config) -> Result<GeoState, GeoError> {
        let Some(path) = config.geo.database.clone() else {
            return Ok(GeoState::default());
        };
        let (in_use, attempted) = {
            let state = self.geo_state.lock().expect("GeoIP state lock poisoned");
            (state.in_use.clone(), state.attempted)
        };
        let Some(in_use) = in_use.filter(|db| db.path == path) else {
            return Ok(GeoState::of(load_geo(config, &self.metrics).await?));
        };
        let key = FileKey::at(&path);
        if key.is_none() || key == attempted {
            return Ok(GeoState {
                in_use: Some(in_use),
                attempted,
            });
        }
        match reload_geo_file(&path, &in_use, &self.metrics).await {
            Ok(Reloaded::New(db)) => Ok(GeoState::of(Some(Arc::new(*db)))),
            Ok(Reloaded::Same(file)) => Ok(GeoState {
                in_use: Some(in_use),
                attempted: Some(file),
            }),
            Err(e) => {
                tracing::error!(error = %e, "GeoIP database file refused; the one in use keeps serving.");
                Ok(GeoState {
                    in_use: Some(in_use),
                    attempted: key,
                })
            }
        }
    }
}

/// Loads the config's GeoIP database, if it names one (off the runtime's
/// worker threads: a City database is tens of megabytes).
async fn load_geo(config: &Config, metrics: &Metrics) -> Result<Option<Arc<GeoDb>>, GeoError> {
    let Some(path) = config.geo.database.clone() else {
        return Ok(None);
    };
    let loaded = tokio::task::spawn_blocking(move || GeoDb::load(&path))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    let label = if loaded.is_ok() { "success" } else { "failure" };
    metrics.geoip_loads.with_label_values(&[label]).inc();
    let db = loaded?;
    tracing::info!(path = %db.path.display(), database_type = %db.database_type, build_epoch = db.build_epoch, places = db.places(), memory_bytes = db.memory(), "GeoIP database loaded.");
    Ok(Some(Arc::new(db)))
}

/// Reads a changed GeoIP file again (on a blocking thread: never on the
/// publisher's path, which keeps publishing health changes meanwhile) and
/// checks it, unless its bytes are those of `in_use`. Counts and logs what
/// it found; the caller logs a refusal.
async fn reload_geo_file(
    path: &std::path::Path,
    in_use: &Arc<GeoDb>,
    metrics: &Metrics,
) -> Result<Reloaded, GeoError> {
    let (path, current) = (path.to_path_buf(), in_use.clone());
    let loaded = tokio::task::spawn_blocking(move || GeoDb::reload(&path, Some(&current)))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    match &loaded {
        Ok(Reloaded::New(db)) => {
            metrics.geoip_loads.with_label_values(&["success"]).inc();
            tracing::info!(path = %db.path.display(), database_type = %db.database_type, build_epoch = db.build_epoch, places = db.places(), memory_bytes = db.memory(), "GeoIP database loaded.");
        }
        Ok(Reloaded::Same(_)) => {
            tracing::info!(path = %in_use.path.display(), "GeoIP database file replaced by the same bytes; the database in use stays, not checked again.");
        }
        Err(_) => {
            metrics.geoip_loads.with_label_values(&["failure"]).inc();
        }
    }
    loaded
}

/// Notices a replaced GeoIP database file (geoipupdate renames a new file
/// into place) and hands the new database to the publisher; a file that
/// does not load is refused and the old database keeps serving.
struct GeoWatcher {
    target: watch::Receiver<GeoTarget>,
    state: Arc<std::sync::Mutex<GeoState>>,
    publisher: mpsc::Sender<Msg>,
    metrics: Arc<Metrics>,
}

/// The GeoIP file to watch and how often.
#[derive(Debug, Clone, Default)]
struct GeoTarget {
    path: Option<PathBuf>,
    every: std::time::Duration,
}

impl GeoTarget {
    fn of(config: &Config) -> Self {
        Self {
            path: config.geo.database.clone(),
            every: config.geo.check_interval,
        }
    }
}

/// The GeoIP database in use and the key of the last file read (loaded,
/// refused, or found to hold the same bytes), shared by the watcher and the
/// reloader so that neither reads, nor reports, the same file twice.
#[derive(Debug, Default)]
struct GeoState {
    in_use: Option<Arc<GeoDb>>,
    attempted: Option<FileKey>,
}

impl GeoState {
    fn of(db: Option<Arc<GeoDb>>) -> Self {
        Self {
            attempted: db.as_ref().and_then(|db| db.file),
            in_use: db,
        }
    }
}

impl GeoWatcher {
    async fn run(mut self, cancel: CancellationToken) -> std::io::Result<()> {
        let mut target = self.target.borrow_and_update().clone();
        loop {
            let every = if target.path.is_some() {
                target.every
            } else {
                std::time::Duration::from_secs(3600)
            };
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                changed = self.target.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    // A reload moved (or re-read) the database.
                    target = self.target.borrow_and_update().clone();
                    continue;
                }
                () = tokio::time::sleep(every) => {}
            }
            let Some(path) = target.path.clone() else {
                continue;
            };
            let key = FileKey::at(&path);
            let in_use = {
                let mut state = self.state.lock().expect("GeoIP state lock poisoned");
                if key.is_none() || key == state.attempted {
                    continue;
                }
                // Remember the attempt either way: a bad file is reported once, not every interval.
                state.attempted = key;
                state.in_use.clone()
            };
            let loaded = match &in_use {
                Some(in_use) => reload_geo_file(&path, in_use, &self.metrics).await,
                None => {
                    let loaded = tokio::task::spawn_blocking(move || GeoDb::load(&path))
                        .await
                        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
                    let label = if loaded.is_ok() { "success" } else { "failure" };
                    self.metrics.geoip_loads.with_label_values(&[label]).inc();
                    loaded.map(|db| Reloaded::New(Box::new(db)))
                }
            };
            match loaded {
                Ok(Reloaded::New(db)) => {
                    let db = Arc::new(*db);
                    {
                        let mut state = self.state.lock().expect("GeoIP state lock poisoned");
                        state.in_use = Some(db.clone());
                        state.attempted = db.file;
                    }
                    if self.publisher.send(Msg::Geo(db)).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(Reloaded::Same(file)) => {
                    self.state
                        .lock()
                        .expect("GeoIP state lock poisoned")
                        .attempted = Some(file);
                }
                Err(e) => {
                    tracing::error!(error = %e, "Replaced GeoIP database refused; the previous one keeps serving.");
                }
            }
        }
    }
}

/// Puts back into `new` the `[server]` settings that only a restart
/// applies (the sockets bound, the limits the listeners were given, the
/// answer size their sockets were bound for), so that the config in force
/// says what is in use; returns the names of those that differed.
fn keep_start_only(
    started: &config::ServerConfig,
    new: &mut config::ServerConfig,
) -> Vec<&'static str> {
    let mut kept = Vec::new();
    macro_rules! keep {
        ($($field:ident: $name:literal),* $(,)?) => {$(
            if new.$field != started.$field {
                kept.push($name);
                new.$field = started.$field.clone();
            }
        )*};
    }
    keep!(
        dns_listen: "dns-listen",
        admin_listen: "admin-listen",
        max_udp_payload: "max-udp-payload",
        tcp_idle_timeout: "tcp-idle-timeout",
        tcp_max_connections: "tcp-max-connections",
        tcp_max_per_address: "tcp-max-per-address",
        admin_limits: "admin-max-connections/-header-timeout/-body-timeout/-max-header-bytes",
    );
    kept
}

/// Binds UDP and TCP on the same address; with port 0, on the same free port.
/// One UDP socket per CPU (SO_REUSEPORT: the kernel spreads clients over
/// them), each served by its own task.
fn bind_dns(
    addr: SocketAddr,
    dont_fragment: bool,
) -> Result<(Vec<UdpSocket>, TcpListener, SocketAddr), AppError> {
    let bind_error = |what, source| AppError::Bind { what, addr, source };
    let sockets = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    for _attempt in 0..20 {
        let first = bind_udp(addr, dont_fragment).map_err(|e| bind_error("DNS over UDP", e))?;
        let bound = first.local_addr()?;
        let mut udp = vec![first];
        for _ in 1..sockets {
            udp.push(bind_udp(bound, dont_fragment).map_err(|e| bind_error("DNS over UDP", e))?);
        }
        match bind_tcp(bound) {
            Ok(tcp) => return Ok((udp, tcp, bound)),
            // The UDP port was free but its TCP twin is taken: try another port.
            Err(e) if addr.port() == 0 && e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(bind_error("DNS over TCP", e)),
        }
    }
    Err(bind_error(
        "DNS over TCP",
        std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "no port free for both UDP and TCP",
        ),
    ))
}

fn socket_for(addr: SocketAddr, kind: Type, protocol: Protocol) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), kind, Some(protocol))?;
    if addr.is_ipv6() {
        // So that "0.0.0.0:53" and "[::]:53" can both be listed.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// The largest `max-udp-payload` under which IPv4 answers are sent with
/// DF set: 1232 bytes (the default; DNS Flag Day 2020) make IP packets of
/// at most 1260 bytes, which nearly every path carries whole (a path that
/// does not drops them, and the resolver retries smaller or over TCP).
const DF_MAX_UDP_PAYLOAD: u16 = 1232;

/// A UDP socket for DNS, where answers never take path-MTU information
/// from ICMP: a forged "fragmentation needed" can neither fragment nor
/// shrink them (the fragment-based cache-poisoning attacks).
///
/// IPv4, `dont_fragment` (every answer fits [`DF_MAX_UDP_PAYLOAD`]):
/// `IP_PMTUDISC_PROBE`, so answers carry DF (RFC 9715's recommendation
/// for UDP responders) and are never fragmented, by us or on the path;
/// the interface MTU stays the limit. DF packets also take IP ID 0
/// (RFC 6864), which spares each answer the kernel's shared IP ID
/// generator: 25-110 ns of CPU an answer on this project's benchmark VM.
/// Otherwise (an operator allows larger answers): `IP_PMTUDISC_OMIT`, as
/// Knot, gdnsd and BIND set it: no DF, answers over the interface MTU are
/// fragmented. IPv6: `IPV6_PMTUDISC_OMIT` (routers never fragment IPv6,
/// and 1232 bytes make packets of 1280, the minimum every IPv6 link
/// carries).
fn bind_udp(addr: SocketAddr, dont_fragment: bool) -> std::io::Result<UdpSocket> {
    let socket = socket_for(addr, Type::DGRAM, Protocol::UDP)?;
    socket.set_reuse_port(true)?;
    #[cfg(target_os = "linux")]
    {
        use rustix::net::sockopt;
        if addr.is_ipv6() {
            sockopt::set_ipv6_mtu_discover(&socket, sockopt::Ipv6PathMtuDiscovery::OMIT)?;
        } else if dont_fragment {
            sockopt::set_ip_mtu_discover(&socket, sockopt::Ipv4PathMtuDiscovery::PROBE)?;
        } else {
            sockopt::set_ip_mtu_discover(&socket, sockopt::Ipv4PathMtuDiscovery::OMIT)?;
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = dont_fragment;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket_for(addr, Type::STREAM, Protocol::TCP)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// `inferdns run`: load, start, print the listening line, serve until
/// SIGTERM or SIGINT; SIGHUP reloads. systemd hears `READY=1` once DNS is
/// bound and the first snapshot is live.
pub async fn run(config: Config, options: StartOptions) -> Result<(), AppError> {
    // Handlers first: systemd may reload (SIGHUP) the moment it hears
    // READY=1, and SIGHUP's default action ends the process.
    let signals = Signals::new()?;
    let running = start(config, options).await?;
    println!("{}", running.listening_line());
    let dns: Vec<String> = running.dns.iter().map(ToString::to_string).collect();
    tracing::info!(dns = %dns.join(","), admin = %running.admin, "Serving.");
    running.notifier.ready();
    serve(running, signals).await
}

/// The signals `serve` acts on, registered before anything announces the
/// daemon: from then on SIGTERM stops it cleanly and SIGHUP reloads it.
struct Signals {
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// The `STATUS=` line `systemctl status` shows.
fn status_line(snapshot: &Snapshot) -> String {
    let apex = snapshot.zone.apex.to_string();
    format!(
        "serving {}, snapshot generation {}, {} services",
        apex.trim_end_matches('.'),
        snapshot.generation,
        snapshot.service_views.len()
    )
}

/// How often the serve loop looks at the snapshot generation (at most one
/// `STATUS=` per tick) when no watchdog asks for more.
const STATUS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves until SIGTERM or SIGINT (then stops cleanly), or until a task
/// dies: then everything stops and its error comes back (exit code 2), so
/// systemd restarts a whole process rather than one that limps along.
///
/// The same loop pets systemd's watchdog (`WatchdogSec=`): it does so only
/// while no supervised task has died and the publisher still takes
/// messages, so a dead task or a wedged runtime lets the watchdog fire.
async fn serve(mut running: Running, signals: Signals) -> Result<(), AppError> {
    let Signals { mut term, mut hup } = signals;
    let notifier = running.notifier.clone();
    let watchdog = notifier.watchdog_interval();
    let mut tick = tokio::time::interval(watchdog.map_or(STATUS_EVERY, |w| w.min(STATUS_EVERY)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // (generation, when) of the last STATUS= sent.
    let mut last_status: Option<(u64, Instant)> = None;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            error = running.failed() => {
                tracing::error!(error = %error, "A server task stopped; shutting down.");
                notifier.stopping();
                running.shutdown();
                let _ = running.wait().await;
                return Err(error);
            }
            _ = hup.recv() => {
                tracing::info!("SIGHUP received; reloading.");
                let control = running.control.clone();
                // A reload must not hold up SIGTERM.
                tokio::spawn(async move {
                    if let Ok(generation) = control.reload().await {
                        tracing::info!(generation, "Reload applied.");
                    }
                });
            }
            _ = tick.tick(), if notifier.enabled() => {
                if watchdog.is_some() && !running.control.publisher.is_closed() {
                    notifier.watchdog();
                }
                let snapshot = running.snapshot.load();
                let due = last_status.is_none_or(|(generation, at)| {
                    generation != snapshot.generation && at.elapsed() >= STATUS_EVERY
                });
                if due {
                    last_status = Some((snapshot.generation, Instant::now()));
                    notifier.status(&status_line(&snapshot));
                }
            }
        }
    }
    tracing::info!("Shutting down.");
    notifier.stopping();
    running.shutdown();
    running.wait().await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn udp_answers_ignore_path_mtu_updates_and_carry_df_while_they_fit_1232_bytes() {
        use rustix::net::sockopt::{self, Ipv4PathMtuDiscovery, Ipv6PathMtuDiscovery};
        let v4 = |df| bind_udp("127.0.0.1:0".parse().unwrap(), df).unwrap();
        let v6 = |df| bind_udp("[::1]:0".parse().unwrap(), df).unwrap();
        assert_eq!(
            sockopt::ip_mtu_discover(v4(true)).unwrap(),
            Ipv4PathMtuDiscovery::PROBE
        );
        assert_eq!(
            sockopt::ip_mtu_discover(v4(false)).unwrap(),
            Ipv4PathMtuDiscovery::OMIT
        );
        for df in [true, false] {
            assert_eq!(
                sockopt::ipv6_mtu_discover(v6(df)).unwrap(),
                Ipv6PathMtuDiscovery::OMIT
            );
        }
    }

    #[test]
    fn a_reload_keeps_the_start_only_server_settings_and_names_them() {
        let started = config().server;
        let mut new = started.clone();
        assert!(keep_start_only(&started, &mut new).is_empty());
        new.max_udp_payload = 4096;
        new.tcp_max_per_address = started.tcp_max_per_address + 1;
        new.dns_listen = vec!["127.0.0.1:53".parse().unwrap()];
        new.nsid = "edge-2".into(); // A reload applies this one.
        let kept = keep_start_only(&started, &mut new);
        assert_eq!(
            kept,
            ["dns-listen", "max-udp-payload", "tcp-max-per-address"]
        );
        assert_eq!(
            config::ServerConfig {
                nsid: started.nsid.clone(),
                ..new
            },
            started
        );
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_default_payload_limit_binds_df_sockets_and_a_larger_one_does_not() {
        use rustix::net::sockopt::{self, Ipv4PathMtuDiscovery};
        for (payload, want) in [
            (1232, Ipv4PathMtuDiscovery::PROBE),
            (1233, Ipv4PathMtuDiscovery::OMIT),
        ] {
            let (udp, _tcp, _) = bind_dns(
                "127.0.0.1:0".parse().unwrap(),
                payload <= DF_MAX_UDP_PAYLOAD,
            )
            .unwrap();
            for socket in &udp {
                assert_eq!(sockopt::ip_mtu_discover(socket).unwrap(), want, "{payload}");
            }
        }
        // The default is under the bar: a config that does not set it gets DF.
        assert_eq!(config().server.max_udp_payload, DF_MAX_UDP_PAYLOAD);
    }

    /// One region on a TEST-NET address (never answers), one service.
    const CONFIG: &str = r#"
[server]
dns-listen = ["127.0.0.1:0"]
admin-listen = "127.0.0.1:0"
startup-grace = "50ms"
[zone]
apex = "inference.example.com"
soa = { primary = "ns1.example.net", contact = "hostmaster.example.net" }
ns = [{ name = "ns1.example.net" }]
[regions.primary]
endpoints = [{ address = "127.0.0.1", port = 1 }]
[services.chat]
tiers = [["primary"]]
"#;

    fn config() -> Config {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inferdns.toml");
        std::fs::write(&path, CONFIG).unwrap();
        config::load(&path).unwrap()
    }

    /// Makes the real publisher task panic: a reload whose probe ids do not
    /// match its endpoints breaks the publisher's invariant.
    async fn kill_the_publisher(running: &Running) {
        let (done, _) = oneshot::channel();
        let msg = Msg::Reload {
            config: Arc::new(config()),
            ids: Vec::new(),
            geo: None,
            done,
        };
        running.control.publisher.send(msg).await.unwrap();
    }

    #[tokio::test]
    async fn a_dead_task_is_noticed_by_name_and_counted() {
        let mut running = start(config(), StartOptions::default()).await.unwrap();
        kill_the_publisher(&running).await;
        let error = tokio::time::timeout(Duration::from_secs(30), running.failed())
            .await
            .expect("the death is noticed");
        assert!(
            matches!(&error, AppError::Task { task: "publisher", reason } if reason.starts_with("panicked: ")),
            "{error}"
        );
        let failures = |task| {
            running
                .metrics
                .task_failures
                .with_label_values(&[task])
                .get()
        };
        assert_eq!(failures("publisher"), 1);
        assert_eq!(failures("admin"), 0);
    }

    #[tokio::test]
    async fn the_daemon_stops_with_exit_code_2_when_a_task_dies() {
        let running = start(config(), StartOptions::default()).await.unwrap();
        let admin = running.admin;
        kill_the_publisher(&running).await;
        let result = tokio::time::timeout(
            Duration::from_secs(30),
            serve(running, Signals::new().unwrap()),
        )
        .await
        .expect("serve returns once a task died");
        let error = result.unwrap_err();
        assert!(
            error.to_string().starts_with("the publisher task panicked"),
            "{error}"
        );
        assert_eq!(error.exit_code(), 2);
        // Everything else was stopped: the admin API no longer answers.
        assert!(tokio::net::TcpStream::connect(admin).await.is_err());
    }
}
