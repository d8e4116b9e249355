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

/// Decodes a reply strictly: every byte must belong to a section (see
/// [`check_wire`]), then hickory decodes it.
pub fn decode(bytes: &[u8]) -> std::io::Result<Message> {
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    check_wire(bytes).map_err(invalid)?;
    Message::from_vec(bytes).map_err(|e| invalid(e.to_string()))
}

/// Walks a DNS message as its counts describe it and accounts for every
/// byte: names well-formed with pointers only backwards, the RDATA of
/// A, AAAA, CNAME, NS, PTR, MX, SOA, TXT and OPT exactly as long as its
/// fields, nothing after the last record.
pub fn check_wire(m: &[u8]) -> Result<(), String> {
    let header = m.get(..12).ok_or("shorter than a header")?;
    let count = |i: usize| usize::from(u16::from_be_bytes([header[4 + 2 * i], header[5 + 2 * i]]));
    let mut at = 12;
    for _ in 0..count(0) {
        at = wire_name(m, at)? + 4;
        if at > m.len() {
            return Err("question cut short".into());
        }
    }
    for i in 0..count(1) + count(2) + count(3) {
        at = wire_name(m, at)?;
        let fixed = m.get(at..at + 10).ok_or(format!("record {i} cut short"))?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let len = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let start = at + 10;
        let end = start + len;
        if end > m.len() {
            return Err(format!("record {i}: RDATA runs past the end"));
        }
        let used = match rtype {
            1 => start + 4,
            28 => start + 16,
            2 | 5 | 12 => wire_name(m, start)?,
            15 => wire_name(m, start + 2)?,
            6 => wire_name(m, wire_name(m, start)?)? + 20,
            16 | 41 => {
                // TXT: length-prefixed strings; OPT: (code, length, data) options.
                let mut p = start;
                while p < end {
                    p += if rtype == 16 {
                        1 + usize::from(m[p])
                    } else {
                        let l = m.get(p + 2..p + 4).ok_or("OPT option cut short")?;
                        4 + usize::from(u16::from_be_bytes([l[0], l[1]]))
                    };
                }
                p
            }
            _ => end,
        };
        if used != end {
            return Err(format!(
                "record {i} (type {rtype}): RDATA is {len} bytes, its fields {}",
                used as isize - start as isize
            ));
        }
        at = end;
    }
    if at != m.len() {
        return Err(format!(
            "{} bytes after the last record (message is {} bytes)",
            m.len() - at,
            m.len()
        ));
    }
    Ok(())
}

/// Checks the name at `at`; returns where it ends in place.
fn wire_name(m: &[u8], at: usize) -> Result<usize, String> {
    let mut p = at;
    let mut end = None;
    let mut length = 0;
    for _ in 0..128 {
        let len = *m.get(p).ok_or("name runs past the end")?;
        match len & 0xc0 {
            0xc0 => {
                let low = *m.get(p + 1).ok_or("pointer cut short")?;
                let target = usize::from(u16::from_be_bytes([len & 0x3f, low]));
                if target >= p {
                    return Err(format!("pointer at {p} to {target} does not point back"));
                }
                end.get_or_insert(p + 2);
                p = target;
            }
            0x00 => {
                length += 1 + usize::from(len);
                if length > 255 {
                    return Err("name longer than 255 bytes".into());
                }
                p += 1 + usize::from(len);
                if len == 0 {
                    return Ok(*end.get_or_insert(p));
                }
            }
            _ => return Err(format!("label type {len:#x} at {p}")),
        }
    }
    Err("name with too many labels or pointers".into())
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
