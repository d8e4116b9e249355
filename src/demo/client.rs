//! A small DNS client over real UDP and TCP sockets, for the demo and tests.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// How to ask.
#[derive(Debug, Clone)]
pub struct Ask {
    pub name: Name,
    pub qtype: RecordType,
    /// Advertise EDNS(0) with this UDP payload size.
    pub edns: Option<u16>,
    pub timeout: Duration,
}

impl Ask {
    pub fn new(name: &str, qtype: RecordType) -> Self {
        Self {
            name: Name::from_ascii(name).expect("a valid query name"),
            qtype,
            edns: Some(1232),
            timeout: Duration::from_secs(2),
        }
    }

    pub fn message(&self) -> Message {
        let mut m = Message::query();
        m.add_query(Query::query(self.name.clone(), self.qtype));
        m.metadata.recursion_desired = false;
        m.metadata.id = rand::random();
        if let Some(size) = self.edns {
            let mut edns = Edns::new();
            edns.set_max_payload(size);
            m.set_edns(edns);
        }
        m
    }
}

/// Sends raw bytes over UDP and returns the raw answer.
pub async fn exchange_udp(
    server: SocketAddr,
    packet: &[u8],
    timeout: Duration,
) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if server.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    }
    .parse()
    .expect("a literal address");
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(server).await?;
    socket.send(packet).await?;
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(timeout, socket.recv(&mut buf))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no DNS answer over UDP")
        })??;
    buf.truncate(n);
    Ok(buf)
}

/// Sends raw bytes over TCP (length-prefixed) and returns the raw answer.
pub async fn exchange_tcp(
    server: SocketAddr,
    packet: &[u8],
    timeout: Duration,
) -> std::io::Result<Vec<u8>> {
    tokio::time::timeout(timeout, async {
        let mut stream = TcpStream::connect(server).await?;
        let len = u16::try_from(packet.len()).map_err(std::io::Error::other)?;
        stream.write_all(&len.to_be_bytes()).await?;
        stream.write_all(packet).await?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut buf).await?;
        Ok(buf)
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no DNS answer over TCP"))?
}

fn decode(bytes: &[u8]) -> std::io::Result<Message> {
    Message::from_vec(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

pub async fn query_udp(server: SocketAddr, ask: &Ask) -> std::io::Result<Message> {
    let packet = ask.message().to_vec().map_err(std::io::Error::other)?;
    decode(&exchange_udp(server, &packet, ask.timeout).await?)
}

pub async fn query_tcp(server: SocketAddr, ask: &Ask) -> std::io::Result<Message> {
    let packet = ask.message().to_vec().map_err(std::io::Error::other)?;
    decode(&exchange_tcp(server, &packet, ask.timeout).await?)
}

/// The addresses and CNAME targets in the answer section, sorted.
pub fn answer_strings(m: &Message) -> Vec<String> {
    let mut out: Vec<String> = m
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::A(a) => a.0.to_string(),
            RData::AAAA(a) => a.0.to_string(),
            other => other.to_string(),
        })
        .collect();
    out.sort();
    out
}
