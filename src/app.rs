//! Startup order and shutdown of the daemon.
//!
//! 1. Bind every socket (fail fast on a taken port).
//! 2. Start the publisher and one probe task per endpoint.
//! 3. Wait for the first probe round (or the startup grace).
//! 4. Serve DNS and the admin API.
//!
//! Shutdown cancels everything and waits for the listeners to finish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::dns::{DnsServer, Handler};
use crate::error::AppError;
use crate::health::{self, HttpProbe, Schedule};
use crate::model::EndpointIndex;
use crate::publish::{Msg, Publisher};

/// Command-line overrides of the config's listen addresses (port 0 allowed).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub dns_listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
}

/// A started server.
pub struct Running {
    /// Where DNS is served (UDP and TCP share each address).
    pub dns: Vec<SocketAddr>,
    pub admin: SocketAddr,
    cancel: CancellationToken,
    tasks: JoinSet<std::io::Result<()>>,
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

    /// Waits for every task; the first error wins.
    pub async fn wait(mut self) -> Result<(), AppError> {
        let mut result = Ok(());
        while let Some(joined) = self.tasks.join_next().await {
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
pub async fn start(mut config: Config, overrides: Overrides) -> Result<Running, AppError> {
    if let Some(addr) = overrides.dns_listen {
        config.server.dns_listen = vec![addr];
    }
    if let Some(addr) = overrides.admin_listen {
        config.server.admin_listen = addr;
    }
    let config = Arc::new(config);
    let server = &config.server;

    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    let mut dns_addrs = Vec::new();
    for &addr in &server.dns_listen {
        let (u, t, bound) = bind_dns(addr)?;
        udp.push(u);
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
    let mut tasks = JoinSet::new();
    let (publisher, snapshot, mut first_round) = Publisher::new(config.clone());
    let (tx, rx) = mpsc::channel::<Msg>(1024);
    {
        let cancel = cancel.clone();
        tasks.spawn(async move {
            publisher.run(rx, cancel).await;
            Ok(())
        });
    }

    let index = EndpointIndex::new(&config);
    for (r, region) in config.regions.iter().enumerate() {
        for (e, endpoint) in region.endpoints.iter().enumerate() {
            let probe = HttpProbe::new(&endpoint.probe).map_err(|source| AppError::Probe {
                endpoint: format!("{} in region {}", endpoint.target, region.id),
                source,
            })?;
            let schedule = Schedule {
                interval: endpoint.probe.interval,
                timeout: endpoint.probe.timeout,
            };
            tokio::spawn(health::probe_loop(
                index.global(r, e),
                probe,
                schedule,
                tx.clone(),
                cancel.child_token(),
            ));
        }
    }
    drop(tx);

    // Never answer before the probes have spoken (bounded by the grace period).
    let waited =
        tokio::time::timeout(server.startup_grace, first_round.wait_for(|done| *done)).await;
    if waited.is_err() {
        tracing::warn!(
            grace = ?server.startup_grace,
            "Not every endpoint answered its first probe in time; they count as down until they do."
        );
    }

    let ready = Arc::new(AtomicBool::new(false));
    let dns = DnsServer::new(
        Handler::new(snapshot.clone(), server.max_udp_payload),
        udp,
        tcp,
        server.tcp_idle_timeout,
    );
    tasks.spawn(dns.run(cancel.clone()));
    let admin_state = AdminState {
        snapshot,
        ready: ready.clone(),
    };
    tasks.spawn(admin::serve(admin_listener, admin_state, cancel.clone()));
    ready.store(true, Ordering::Release);

    Ok(Running {
        dns: dns_addrs,
        admin: admin_addr,
        cancel,
        tasks,
    })
}

/// Binds UDP and TCP on the same address; with port 0, on the same free port.
fn bind_dns(addr: SocketAddr) -> Result<(UdpSocket, TcpListener, SocketAddr), AppError> {
    let bind_error = |what, source| AppError::Bind { what, addr, source };
    for _attempt in 0..20 {
        let udp = bind_udp(addr).map_err(|e| bind_error("DNS over UDP", e))?;
        let bound = udp.local_addr()?;
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

fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = socket_for(addr, Type::DGRAM, Protocol::UDP)?;
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
/// SIGTERM or SIGINT.
pub async fn run(config: Config, overrides: Overrides) -> Result<(), AppError> {
    let running = start(config, overrides).await?;
    println!("{}", running.listening_line());
    tracing::info!(dns = ?running.dns, admin = %running.admin, "Serving.");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = hup.recv() => {
                tracing::warn!("SIGHUP received; reloading is not supported yet, restart to apply a new config.");
            }
        }
    }
    tracing::info!("Shutting down.");
    running.shutdown();
    running.wait().await
}
