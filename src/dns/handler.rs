//! The DNS listeners and the function that turns one received message into
//! one reply: read the query ([`super::query`]), answer it from the current
//! snapshot ([`super::answer`]), write the reply ([`super::reply`]).
//!
//! Header flags, EDNS(0) (payload size, DO, BADVERS), NSID, ECS, REFUSED
//! outside the zone, NOTIMP for other opcodes and FORMERR for malformed
//! queries are decided here. Nothing here logs above DEBUG or grows with
//! what a sender sends.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{LowerName, Name, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::answer::{Client, answer};
use super::mmsg::{RecvBatch, SendBatch};
use super::query::{self, ClientSubnet, Ecs, Query, Question};
use super::reply::{Header, Opt, Section, Writer};
use super::rrl::{Class, Rrl, Verdict};
use super::wire::{self, CopyContext};
use crate::config::RateLimit;
use crate::model::Snapshot;

/// The class IN; every other class is refused.
const CLASS_IN: u16 = 1;
/// Largest message over TCP.
const TCP_MAX: usize = u16::MAX as usize;
/// Pause after a failed accept (EMFILE, ENFILE): the error does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Pause after a failed UDP receive.
const RECEIVE_BACKOFF: Duration = Duration::from_millis(1);
/// Longest a UDP thread waits for a datagram before it looks for shutdown.
const UDP_WAKE: Duration = Duration::from_millis(100);

/// How a query arrived: it decides the largest reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Answers every query from the snapshot loaded at its start.
#[derive(Clone)]
pub struct Handler {
    snapshot: Arc<ArcSwap<Snapshot>>,
    max_udp_payload: u16,
    /// Response rate limiting buckets, shared by every socket.
    rrl: Arc<Rrl>,
    /// The clock of the RRL buckets.
    started: Instant,
    /// Pre-encoded answers are copied when they fit ([`super::wire`]).
    copy: bool,
}

impl Handler {
    pub fn new(snapshot: Arc<ArcSwap<Snapshot>>, max_udp_payload: u16) -> Self {
        Self {
            snapshot,
            max_udp_payload,
            rrl: Arc::new(Rrl::new()),
            started: Instant::now(),
            copy: true,
        }
    }

    /// The same handler with every query going down the general path (no
    /// pre-encoded copies): for the tests and benchmarks that compare them.
    pub fn general_only(mut self) -> Self {
        self.copy = false;
        self
    }

    /// The reply to one UDP datagram from `src`, or `None` for what gets
    /// no reply (shorter than a header, a response, from port 0 or an
    /// unspecified address).
    pub fn answer_udp(&self, packet: &[u8], src: SocketAddr) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(512);
        self.respond(packet, src, Transport::Udp, &mut out)
            .then_some(out)
    }

    /// Writes the reply to `packet` into `out`; `false` when it gets none.
    pub fn respond(
        &self,
        packet: &[u8],
        src: SocketAddr,
        transport: Transport,
        out: &mut Vec<u8>,
    ) -> bool {
        let snapshot = self.snapshot.load();
        if transport == Transport::Udp && (src.port() == 0 || src.ip().is_unspecified()) {
            snapshot.queries.ignored();
            return false;
        }
        let Ok(query) = query::parse(packet) else {
            snapshot.queries.ignored();
            return false;
        };
        let max_size = match (transport, query.edns) {
            (Transport::Tcp, _) => TCP_MAX,
            (Transport::Udp, None) => 512,
            (Transport::Udp, Some(edns)) => {
                usize::from(edns.payload.clamp(512, self.max_udp_payload.max(512)))
            }
        };
        let payload = self.max_udp_payload.max(512);
        // Pre-encoded answers first (copied); the general path for the rest.
        let copied = self.copy
            && wire::copy(
                &snapshot,
                &query,
                src.ip(),
                &CopyContext { max_size, payload },
                out,
            );
        let replied = copied || {
            let reply = Reply {
                query: &query,
                out,
                max_size,
                payload,
                udp: transport == Transport::Udp,
            };
            reply.write(&snapshot, src.ip())
        };
        match (&snapshot.rrl, transport) {
            (Some(limit), Transport::Udp) if replied => {
                self.rate_limit(&snapshot, limit, &query, src.ip(), out, max_size)
            }
            _ => replied,
        }
    }

    /// Response rate limiting of a written UDP reply: `false` when it is
    /// dropped; a slipped one is rewritten as TC=1 without records.
    fn rate_limit(
        &self,
        snapshot: &Snapshot,
        limit: &RateLimit,
        query: &Query<'_>,
        src: IpAddr,
        out: &mut Vec<u8>,
        max_size: usize,
    ) -> bool {
        let rcode = u16::from(out[3] & 0x0f);
        let records = u16::from_be_bytes([out[6], out[7]]);
        let class = match rcode {
            0 if records > 0 => Class::Answer,
            0 => Class::NoData,
            3 => Class::NxDomain,
            _ => Class::Error,
        };
        let name = query.question.map_or(&[][..], |q| &q.wire[..q.name_len]);
        let now_ms = || self.started.elapsed().as_millis() as u32;
        match self.rrl.check(limit, src, class, name, now_ms) {
            Verdict::Send => true,
            Verdict::Drop => {
                snapshot.queries.rate_limited(false);
                false
            }
            Verdict::Slip => {
                snapshot.queries.rate_limited(true);
                let reply = Reply {
                    query,
                    out,
                    max_size,
                    payload: self.max_udp_payload.max(512),
                    udp: true,
                };
                reply.slip(rcode);
                true
            }
        }
    }
}

/// The question's name, lowercased for lookups.
fn lower_name(question: &Question<'_>) -> Option<LowerName> {
    let mut decoder = BinDecoder::new(&question.wire[..question.name_len]);
    Name::read(&mut decoder).ok().map(|n| LowerName::new(&n))
}

/// One reply being written.
struct Reply<'q, 'o> {
    query: &'q Query<'q>,
    out: &'o mut Vec<u8>,
    max_size: usize,
    /// The UDP payload size we announce.
    payload: u16,
    /// Over UDP (spoofable): explanations are truncated.
    udp: bool,
}

impl Reply<'_, '_> {
    /// Writes the reply to the query; `true` (every query read gets one).
    fn write(self, snapshot: &Snapshot, resolver: IpAddr) -> bool {
        let query = self.query;
        if let Some(reason) = query.malformed {
            snapshot.queries.malformed(reason.index());
            return self.error(snapshot, ResponseCode::FormErr);
        }
        let Some(question) = query.question else {
            return self.error(snapshot, ResponseCode::FormErr);
        };
        let qtype = RecordType::from(question.qtype);
        if let Some(edns) = query.edns {
            if edns.version > 0 {
                return self.error(snapshot, ResponseCode::BADVERS);
            }
            if edns.ecs == Ecs::Malformed && snapshot.geo.ecs {
                snapshot.queries.malformed(query::Malformed::Ecs.index());
                return self.error(snapshot, ResponseCode::FormErr);
            }
        }
        if query.opcode != 0 {
            return self.error(snapshot, ResponseCode::NotImp);
        }
        let Some(qname) = lower_name(&question) else {
            snapshot
                .queries
                .malformed(query::Malformed::Question.index());
            return self.error(snapshot, ResponseCode::FormErr);
        };
        let in_zone = question.qclass == CLASS_IN && snapshot.zone.apex.zone_of(&qname);
        if !in_zone || matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            return self.error(snapshot, ResponseCode::Refused);
        }
        self.answer(snapshot, &question, &qname, qtype, resolver)
    }

    /// A rate-limited reply that slips: TC=1 with the question and the OPT
    /// record only, so a real client retries over TCP.
    fn slip(self, rcode: u16) {
        let mut header = self.header(ResponseCode::NoError, matches!(rcode, 0 | 3));
        header.rcode = rcode;
        let opt = self.opt(None);
        let mut writer = Writer::new(
            self.out,
            header,
            self.query.question.as_ref(),
            opt,
            self.max_size,
        );
        writer.truncate();
        writer.finish();
    }

    fn header(&self, rcode: ResponseCode, authoritative: bool) -> Header {
        Header {
            id: self.query.id,
            opcode: self.query.opcode,
            authoritative,
            recursion_desired: self.query.recursion_desired,
            checking_disabled: self.query.checking_disabled,
            rcode: u16::from(rcode),
        }
    }

    /// The OPT record of the reply: only when the query had one (RFC 6891).
    fn opt<'n>(&self, nsid: Option<&'n [u8]>) -> Option<Opt<'n>> {
        self.query.edns.map(|edns| Opt {
            payload: self.payload,
            dnssec_ok: edns.dnssec_ok,
            nsid: nsid.filter(|_| edns.nsid),
            ecs: None,
        })
    }

    /// An error reply: the question (when it could be read) and the OPT
    /// record (when the query's could be read), no records. Always fits
    /// 512 bytes: a name is at most 255.
    fn error(self, snapshot: &Snapshot, rcode: ResponseCode) -> bool {
        let question = self.query.question;
        let qtype = question.map_or(RecordType::Unknown(0), |q| RecordType::from(q.qtype));
        snapshot.queries.count(None, qtype, rcode);
        let header = self.header(rcode, false);
        let opt = self.opt(snapshot.nsid.as_deref());
        Writer::new(self.out, header, question.as_ref(), opt, self.max_size).finish();
        true
    }

    fn answer(
        self,
        snapshot: &Snapshot,
        question: &Question<'_>,
        qname: &LowerName,
        qtype: RecordType,
        resolver: IpAddr,
    ) -> bool {
        // RFC 7871: the client subnet, unless ECS is off (then the option is ignored).
        let subnet = match self.query.edns.map(|e| e.ecs) {
            Some(Ecs::Subnet(subnet)) if snapshot.geo.ecs => Some(subnet),
            _ => None,
        };
        let located = subnet.and_then(|s| located_subnet(s, snapshot));
        let client = Client {
            addr: Some(resolver.to_canonical()),
            ecs: located,
        };
        let result = answer(snapshot, qname, qtype, &client);
        snapshot.queries.count(result.service, qtype, result.rcode);
        if !result.answers.is_empty() && !result.explained {
            for counter in &result.answered {
                counter.inc();
            }
        }
        if let Some(refused) = result.refused {
            refused.inc();
        }
        let mut opt = self.opt(snapshot.nsid.as_deref());
        if let (Some(subnet), Some(opt)) = (subnet, opt.as_mut()) {
            opt.ecs = Some(ecs_echo(subnet, located, result.scope));
        }
        let header = self.header(result.rcode, true);
        let mut writer = Writer::new(self.out, header, Some(question), opt, self.max_size);
        // An explanation is large and its source spoofable over UDP: TC=1
        // without records, and `dig` asks again over TCP by itself.
        let whole = if result.explained && self.udp {
            writer.truncate();
            Err(super::reply::Full)
        } else {
            writer
                .whole(Section::Answer, result.answers.iter().map(|r| &**r))
                .and_then(|()| writer.whole(Section::Authority, result.authority.iter().copied()))
        };
        if whole.is_ok() {
            writer.optional(Section::Additional, result.additionals.iter().copied());
        }
        writer.finish();
        true
    }
}

/// The subnet to locate: the source prefix cut to the configured maximum;
/// `None` for a source prefix of 0, which asks us not to use it. An
/// IPv4-mapped IPv6 subnet (source prefix 96 or more) is located as the
/// IPv4 subnet it holds, cut to the IPv4 maximum.
pub(super) fn located_subnet(subnet: ClientSubnet, snapshot: &Snapshot) -> Option<ipnet::IpNet> {
    if subnet.source_prefix == 0 {
        return None;
    }
    let geo = &snapshot.geo;
    match subnet.addr {
        IpAddr::V6(v6) if subnet.source_prefix >= 96 && v6.to_ipv4_mapped().is_some() => {
            let v4 = v6.to_ipv4_mapped()?;
            let prefix = (subnet.source_prefix - 96).min(geo.max_prefix_v4);
            ipnet::IpNet::new(v4.into(), prefix).ok()
        }
        IpAddr::V6(v6) => {
            ipnet::IpNet::new(v6.into(), subnet.source_prefix.min(geo.max_prefix_v6)).ok()
        }
        IpAddr::V4(v4) => {
            ipnet::IpNet::new(v4.into(), subnet.source_prefix.min(geo.max_prefix_v4)).ok()
        }
    }
    .map(|n| n.trunc())
}

/// The ECS option to echo: the query's family, source prefix and address,
/// with the scope of the network that decided (`None`: the answer does not
/// depend on the client's subnet, echoed as 0, as it is when the source
/// prefix was 0), back in the option's family (+96) when an IPv4-mapped
/// subnet was located as IPv4.
pub(super) fn ecs_echo(
    subnet: ClientSubnet,
    located: Option<ipnet::IpNet>,
    scope: Option<u8>,
) -> (u16, u8, u8, [u8; 16]) {
    let mut addr = [0u8; 16];
    let family = match subnet.addr {
        IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            1
        }
        IpAddr::V6(v6) => {
            addr.copy_from_slice(&v6.octets());
            2
        }
    };
    let mapped = family == 2 && located.is_some_and(|l| l.addr().is_ipv4());
    let scope = match scope {
        // The client asked us not to use its subnet: the answer (decided by
        // the resolver's own address) says nothing about client subnets.
        _ if subnet.source_prefix == 0 => 0,
        None => 0,
        Some(scope) if mapped => scope.saturating_add(96),
        Some(scope) => scope,
    };
    (family, subnet.source_prefix, scope, addr)
}

/// Limits of DNS over TCP.
#[derive(Debug, Clone, Copy)]
pub struct TcpLimits {
    /// A connection is closed when a whole query (or the write of its
    /// answer) takes longer than this: idle or slow clients alike.
    pub idle_timeout: Duration,
    /// Open connections in all; more are closed at once.
    pub max_connections: u32,
    /// Open connections from one address; more are closed at once.
    pub max_per_address: u32,
}

/// Who may open one more TCP connection.
struct TcpGate {
    open: Arc<tokio::sync::Semaphore>,
    /// Open connections per address: at most `max_connections` entries.
    per_address: std::sync::Mutex<std::collections::HashMap<IpAddr, u32>>,
    max_per_address: u32,
}

/// One admitted connection; gives its places back when dropped.
struct Admitted {
    gate: Arc<TcpGate>,
    ip: IpAddr,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl TcpGate {
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Admitted> {
        let permit = self.open.clone().try_acquire_owned().ok()?;
        let mut per_address = self.per_address.lock().unwrap_or_else(|e| e.into_inner());
        let open = per_address.entry(ip).or_insert(0);
        if *open >= self.max_per_address {
            return None;
        }
        *open += 1;
        Some(Admitted {
            gate: self.clone(),
            ip,
            _permit: permit,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut per_address = self
            .gate
            .per_address
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(open) = per_address.get_mut(&self.ip) {
            *open -= 1;
            if *open == 0 {
                per_address.remove(&self.ip);
            }
        }
    }
}

/// The DNS listeners: one thread per UDP socket (batches received,
/// answered and sent in turn: the answer never waits for anything), each
/// watched by a task; one accept task per TCP listener with a task per
/// connection.
pub struct DnsServer {
    handler: Handler,
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
    limits: TcpLimits,
}

impl DnsServer {
    pub fn new(
        handler: Handler,
        udp: Vec<UdpSocket>,
        tcp: Vec<TcpListener>,
        limits: TcpLimits,
    ) -> Self {
        Self {
            handler,
            udp,
            tcp,
            limits,
        }
    }

    /// Serves until `cancel` fires. Returns an error as soon as any
    /// listener task ends on its own (an error or a panic): the server
    /// cannot serve every client without it, so the daemon must stop.
    pub async fn run(self, cancel: CancellationToken) -> std::io::Result<()> {
        let mut tasks = JoinSet::new();
        for socket in self.udp {
            tasks.spawn(serve_udp(socket, self.handler.clone(), cancel.clone()));
        }
        // One gate for every TCP listener: the caps are for the process.
        let gate = Arc::new(TcpGate {
            open: Arc::new(tokio::sync::Semaphore::new(
                self.limits.max_connections as usize,
            )),
            per_address: std::sync::Mutex::default(),
            max_per_address: self.limits.max_per_address,
        });
        for listener in self.tcp {
            tasks.spawn(serve_tcp(
                listener,
                self.handler.clone(),
                self.limits.idle_timeout,
                gate.clone(),
                cancel.clone(),
            ));
        }
        while let Some(done) = tasks.join_next().await {
            if cancel.is_cancelled() {
                continue;
            }
            // Dropping `tasks` stops the other listeners.
            return Err(match done {
                Ok(Err(e)) => e,
                Ok(Ok(())) => std::io::Error::other("a DNS listener stopped"),
                Err(e) if e.is_panic() => std::io::Error::other("a DNS listener task panicked"),
                Err(_) => std::io::Error::other("a DNS listener task was cancelled"),
            });
        }
        Ok(())
    }
}

/// Serves one UDP socket on a thread of its own until `cancel` fires (or
/// this future is dropped: the other listeners stopped), and returns what
/// the thread returned; an error if it panicked.
///
/// A thread per socket with blocking batch calls rather than a task on
/// tokio's readiness: registered with the runtime's epoll, the socket keeps
/// a waiter on its wait queue for good, so every reply sent (its buffer
/// freed as loopback or the driver takes it) and every datagram received
/// wakes that waiter under the queue's lock: 8 % of the server's CPU at
/// saturation in `perf` (`sock_wfree` -> `_raw_spin_unlock_irqrestore`).
/// A thread blocked in `recvmmsg` waits on the queue only while there is
/// nothing to read, as Knot's and gdnsd's workers do. The thread wakes at
/// least every [`UDP_WAKE`] to see `cancel`; supervision stays with the
/// task (a thread that ends or panics ends this future).
async fn serve_udp(
    socket: UdpSocket,
    handler: Handler,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let socket = socket.into_std()?;
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(UDP_WAKE))?;
    let stop = cancel.child_token();
    // Dropping this future (another listener died) stops the thread too.
    let _stop_on_drop = stop.clone().drop_guard();
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("dns-udp".into())
        .spawn(move || {
            crate::sched::queries();
            let _ = done.send(udp_loop(&socket, &handler, &stop));
        })?;
    match finished.await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::other("a DNS listener task panicked")),
    }
}

/// Receives, answers and sends in batches ([`super::mmsg`]): one
/// `recvmmsg` takes what is queued (up to 32 datagrams, waiting for the
/// first), each is answered in turn, one `sendmmsg` sends the replies.
fn udp_loop(
    socket: &std::net::UdpSocket,
    handler: &Handler,
    stop: &CancellationToken,
) -> std::io::Result<()> {
    use std::io::ErrorKind;
    let fd = socket.as_raw_fd();
    let mut received = RecvBatch::default();
    let mut replies = SendBatch::default();
    while !stop.is_cancelled() {
        let n = match received.recv(fd, true) {
            Ok(n) => n,
            // The read timeout: look at `stop` again.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                continue;
            }
            Err(e) => {
                // A lasting socket error must not spin the CPU.
                tracing::debug!(error = %e, "UDP receive failed.");
                std::thread::sleep(RECEIVE_BACKOFF);
                continue;
            }
        };
        replies.clear();
        for i in 0..n {
            let (packet, src) = received.get(i);
            let Some(src) = src else { continue };
            if handler.respond(packet, src, Transport::Udp, replies.next_buffer()) {
                replies.push(src);
            }
        }
        let mut sent = 0;
        while sent < replies.len() {
            match replies.send(fd, sent) {
                Ok(k) => sent += k,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // This reply's destination is unreachable: skip it.
                    tracing::debug!(error = %e, "UDP send failed.");
                    sent += 1;
                }
            }
        }
    }
    Ok(())
}

/// Accepts TCP connections until `cancel` fires; each is served by its own task.
async fn serve_tcp(
    listener: TcpListener,
    handler: Handler,
    idle: Duration,
    gate: Arc<TcpGate>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match gate.admit(peer.ip().to_canonical()) {
                    Some(admitted) => {
                        let handler = handler.clone();
                        connections.spawn(async move {
                            serve_connection(stream, peer, handler, idle).await;
                            drop(admitted);
                        });
                    }
                    // Over a cap: closed at once (dropping the stream).
                    None => handler.snapshot.load().queries.tcp_refused(),
                },
                Err(e) => {
                    // Out of descriptors or buffers: wait rather than spin.
                    tracing::debug!(error = %e, "TCP accept failed.");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done
                    && e.is_panic()
                {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
    }
}

/// Answers the queries of one TCP connection in order (RFC 7766), until
/// the client closes it or is idle for `idle`.
async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    handler: Handler,
    idle: Duration,
) {
    let _ = stream.set_nodelay(true);
    let mut packet = Vec::new();
    let mut out = Vec::with_capacity(512);
    let mut frame = Vec::with_capacity(514);
    loop {
        let mut length = [0u8; 2];
        let read = async {
            stream.read_exact(&mut length).await?;
            packet.resize(usize::from(u16::from_be_bytes(length)), 0);
            stream.read_exact(&mut packet).await
        };
        match tokio::time::timeout(idle, read).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
        if !handler.respond(&packet, peer, Transport::Tcp, &mut out) {
            continue;
        }
        frame.clear();
        frame.extend_from_slice(&(out.len() as u16).to_be_bytes());
        frame.extend_from_slice(&out);
        match tokio::time::timeout(idle, stream.write_all(&frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}
