//! The only file that knows hickory-server's handler and server types.
//!
//! Turns a hickory `Request` into a call of [`super::answer::answer`] on the
//! current snapshot and writes the response: header flags, EDNS(0) (payload
//! size, BADVERS), REFUSED outside the zone, FORMERR for malformed queries.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption, NSIDPayload};
use hickory_proto::rr::{DNSClass, Record, RecordType};
use hickory_server::Server;
use hickory_server::net::runtime::{Time, TokioTime};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

use super::answer::{Client, answer};
use crate::model::Snapshot;

/// Answers every query from the snapshot loaded at its start.
#[derive(Clone)]
pub struct Handler {
    snapshot: Arc<ArcSwap<Snapshot>>,
    max_udp_payload: u16,
}

impl Handler {
    pub fn new(snapshot: Arc<ArcSwap<Snapshot>>, max_udp_payload: u16) -> Self {
        Self {
            snapshot,
            max_udp_payload,
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let snapshot = self.snapshot.load_full();
        let qtype = request
            .queries
            .queries()
            .first()
            .map_or(RecordType::Unknown(0), |q| q.query_type());
        // RFC 6891: an OPT in the response only if the query had one.
        let mut response_edns = request.edns.as_ref().map(|query_edns| {
            let mut edns = Edns::new();
            let payload = match request.protocol() {
                Protocol::Udp => query_edns.max_payload().clamp(512, self.max_udp_payload),
                _ => self.max_udp_payload,
            };
            edns.set_max_payload(payload);
            edns.set_version(0);
            // RFC 5001: our identity, only when asked.
            if query_edns.option(EdnsCode::NSID).is_some()
                && let Some(nsid) = &snapshot.nsid
                && let Ok(payload) = NSIDPayload::new(nsid.clone())
            {
                edns.options_mut().insert(EdnsOption::NSID(payload));
            }
            edns
        });
        let refuse = |rcode: ResponseCode| {
            snapshot.queries.count(None, qtype, rcode);
            rcode
        };

        if let (Some(query_edns), Some(edns)) = (&request.edns, &response_edns)
            && query_edns.version() > 0
        {
            let mut edns = edns.clone();
            edns.set_rcode_high(ResponseCode::BADVERS.high());
            let response = MessageResponseBuilder::new(&request.queries, Some(&edns))
                .error_msg(&request.metadata, refuse(ResponseCode::BADVERS));
            return send(&mut response_handle, response, request).await;
        }
        let builder = MessageResponseBuilder::new(&request.queries, response_edns.as_ref());
        // RFC 7871: read (and check) the client subnet, unless ECS is off.
        let subnet = match ecs(request, &snapshot) {
            Ok(subnet) => subnet,
            Err(()) => {
                let response = builder.error_msg(&request.metadata, refuse(ResponseCode::FormErr));
                return send(&mut response_handle, response, request).await;
            }
        };

        if request.metadata.message_type != MessageType::Query {
            // hickory drops responses before we see them; be safe anyway.
            let response = builder.error_msg(&request.metadata, refuse(ResponseCode::FormErr));
            return send(&mut response_handle, response, request).await;
        }
        if request.metadata.op_code != OpCode::Query {
            let response = builder.error_msg(&request.metadata, refuse(ResponseCode::NotImp));
            return send(&mut response_handle, response, request).await;
        }
        // Exactly one question, or FORMERR.
        let Ok(info) = request.request_info() else {
            let response = builder.error_msg(&request.metadata, refuse(ResponseCode::FormErr));
            return send(&mut response_handle, response, request).await;
        };
        let qname = info.query.name();
        let in_zone = info.query.query_class() == DNSClass::IN && snapshot.zone.apex.zone_of(qname);
        let transfer = matches!(qtype, RecordType::AXFR | RecordType::IXFR);
        if !in_zone || transfer {
            let response = builder.error_msg(&request.metadata, refuse(ResponseCode::Refused));
            return send(&mut response_handle, response, request).await;
        }

        let client = Client {
            addr: Some(request.src().ip().to_canonical()),
            ecs: subnet.and_then(|(_, used)| used),
        };
        let result = answer(&snapshot, qname, qtype, &client);
        snapshot.queries.count(result.service, qtype, result.rcode);
        if !result.answers.is_empty() && !result.explained {
            for counter in &result.answered {
                counter.inc();
            }
        }
        if let Some(refused) = result.refused {
            refused.inc();
        }
        // Echo the option with the scope of the network that decided, or 0
        // when the answer does not depend on the client's location.
        if let (Some((mut echo, used)), Some(edns)) = (subnet, response_edns.as_mut()) {
            // Back in the option's family (an IPv4-mapped subnet was located as IPv4).
            let mapped = used.is_some_and(|u| u.addr().is_ipv4()) && echo.addr().is_ipv6();
            let scope = result.scope.unwrap_or(0);
            echo.set_scope_prefix(if mapped && scope > 0 {
                scope + 96
            } else {
                scope
            });
            edns.options_mut().insert(EdnsOption::Subnet(echo));
        }
        let builder = MessageResponseBuilder::new(&request.queries, response_edns.as_ref());
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        metadata.response_code = result.rcode;
        let response = builder.build(
            metadata,
            result.answers.iter().map(|r| &**r),
            std::iter::empty::<&Record>(),
            result.authority.iter().copied(),
            result.additionals.iter().copied(),
        );
        send(&mut response_handle, response, request).await
    }
}

/// The query's ECS option, if ECS is on: the option to echo and the subnet
/// to locate (source prefix cut to the configured maximum; `None` for a
/// source prefix of 0, which asks us not to use it). `Err` for a malformed
/// option: a non-zero SCOPE or address bits beyond the SOURCE PREFIX.
#[allow(clippy::type_complexity)]
fn ecs(
    request: &Request,
    snapshot: &Snapshot,
) -> Result<Option<(ClientSubnet, Option<ipnet::IpNet>)>, ()> {
    if !snapshot.geo.ecs {
        return Ok(None);
    }
    let Some(EdnsOption::Subnet(subnet)) = request
        .edns
        .as_ref()
        .and_then(|e| e.option(EdnsCode::Subnet))
    else {
        return Ok(None);
    };
    let source = subnet.source_prefix();
    let net = ipnet::IpNet::new(subnet.addr(), source).map_err(|_| ())?;
    if subnet.scope_prefix() != 0 || net.trunc().addr() != subnet.addr() {
        return Err(());
    }
    if source == 0 {
        return Ok(Some((*subnet, None)));
    }
    let max = match subnet.addr() {
        std::net::IpAddr::V4(_) => snapshot.geo.max_prefix_v4,
        std::net::IpAddr::V6(_) => snapshot.geo.max_prefix_v6,
    };
    let cut = source.min(max);
    // An IPv4-mapped IPv6 subnet is located as the IPv4 subnet it holds.
    let used = match subnet.addr() {
        std::net::IpAddr::V6(v6) if cut >= 96 && v6.to_ipv4_mapped().is_some() => v6
            .to_ipv4_mapped()
            .and_then(|v4| ipnet::IpNet::new(v4.into(), cut - 96).ok()),
        addr => ipnet::IpNet::new(addr, cut).ok(),
    }
    .map(|n| n.trunc());
    Ok(Some((*subnet, used)))
}

async fn send<'a, R: ResponseHandler>(
    handle: &mut R,
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    request: &Request,
) -> ResponseInfo {
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, "Failed to send a DNS response.");
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = ResponseCode::ServFail;
            Header {
                metadata,
                counts: HeaderCounts::default(),
            }
            .into()
        }
    }
}

/// The DNS listeners. TCP goes through hickory's server; each UDP socket is
/// served by one task that receives, answers and sends in turn (no task or
/// channel per query: the answer never waits for anything).
pub struct DnsServer {
    server: Server<Handler>,
    udp: Vec<(UdpSocket, Handler)>,
}

impl DnsServer {
    pub fn new(
        handler: Handler,
        udp: Vec<UdpSocket>,
        tcp: Vec<TcpListener>,
        tcp_idle_timeout: Duration,
    ) -> Self {
        let udp = udp.into_iter().map(|s| (s, handler.clone())).collect();
        let mut server = Server::new(handler);
        for listener in tcp {
            // 64 queued responses per connection, as hickory's own daemon uses.
            server.register_listener(listener, tcp_idle_timeout, 64);
        }
        Self { server, udp }
    }

    /// Serves until `cancel` fires, then stops accepting and finishes.
    pub async fn run(mut self, cancel: CancellationToken) -> std::io::Result<()> {
        let mut udp = tokio::task::JoinSet::new();
        for (socket, handler) in self.udp.drain(..) {
            udp.spawn(serve_udp(socket, handler, cancel.clone()));
        }
        let tcp = async {
            tokio::select! {
                result = self.server.block_until_done() => result.map_err(std::io::Error::other),
                () = cancel.cancelled() => {
                    self.server.shutdown_gracefully().await.map_err(std::io::Error::other)
                }
            }
        };
        let result = tcp.await;
        while let Some(done) = udp.join_next().await {
            if let Err(e) = done
                && e.is_panic()
            {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        result
    }
}

impl Handler {
    /// The reply to one UDP datagram from `src`, as the UDP loop sends it:
    /// `None` for what gets no reply (shorter than a header, from port 0 or
    /// an unspecified address, or a response), FORMERR for a message that
    /// does not parse, else the encoded answer truncated to the UDP size.
    /// It never waits on anything: the loop needs no task per query.
    pub async fn answer_udp(&self, packet: &[u8], src: std::net::SocketAddr) -> Option<Vec<u8>> {
        if packet.len() < 12
            || src.port() == 0
            || src.ip().is_unspecified()
            || packet[2] & 0x80 != 0
        {
            return None;
        }
        match Request::from_bytes(packet.to_vec(), src, Protocol::Udp) {
            Ok(request) => {
                let max_size = request
                    .edns
                    .as_ref()
                    .map_or(512, |e| e.max_payload().clamp(512, self.max_udp_payload));
                let capture = Encoded::new(max_size);
                self.handle_request::<_, TokioTime>(&request, capture.clone())
                    .await;
                capture.take()
            }
            // A message that does not parse: FORMERR with its id, no question.
            Err(_) => {
                let snapshot = self.snapshot.load();
                snapshot
                    .queries
                    .count(None, RecordType::Unknown(0), ResponseCode::FormErr);
                Some(formerr(packet))
            }
        }
    }
}

/// Receives, answers and sends on one UDP socket until `cancel` fires.
async fn serve_udp(
    socket: UdpSocket,
    handler: Handler,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    // The largest UDP message hickory reads too.
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, src) = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            received = socket.recv_from(&mut buf) => match received {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "UDP receive failed.");
                    continue;
                }
            },
        };
        let reply = handler.answer_udp(&buf[..n], src).await;
        if let Some(bytes) = reply
            && let Err(e) = socket.send_to(&bytes, src).await
        {
            tracing::debug!(error = %e, "UDP send failed.");
        }
    }
}

/// A bare FORMERR header answering `packet` (at least 12 bytes).
fn formerr(packet: &[u8]) -> Vec<u8> {
    let opcode_and_rd = packet[2] & 0x79;
    vec![
        packet[0],
        packet[1],
        0x80 | opcode_and_rd,
        0x01,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ]
}

/// A response handler that encodes the response, truncating (TC=1) what
/// does not fit `max_size`, for the UDP loop to send.
#[derive(Clone)]
struct Encoded {
    max_size: u16,
    bytes: Arc<std::sync::OnceLock<Vec<u8>>>,
}

impl Encoded {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            bytes: Arc::new(std::sync::OnceLock::new()),
        }
    }

    fn take(self) -> Option<Vec<u8>> {
        Arc::try_unwrap(self.bytes)
            .ok()
            .and_then(std::sync::OnceLock::into_inner)
    }
}

#[async_trait::async_trait]
impl ResponseHandler for Encoded {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, hickory_server::net::NetError> {
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = hickory_proto::serialize::binary::BinEncoder::new(&mut bytes);
        encoder.set_max_size(self.max_size);
        let info = response.destructive_emit(&mut encoder)?;
        let _ = self.bytes.set(bytes);
        Ok(info)
    }
}
