//! Reading a query off the wire: the header, the one question and the OPT
//! record (payload size, version, DO, NSID, ECS). Nothing else in the
//! message is kept. Strict: every byte of the message must belong to a
//! well-formed section, or the query is malformed and gets FORMERR.
//! Reading never allocates and never logs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Length of the DNS header.
pub const HEADER_LEN: usize = 12;
/// Longest domain name on the wire (RFC 1035 §3.1).
const MAX_NAME_LEN: usize = 255;
/// RR type of the OPT pseudo-record (RFC 6891).
const OPT: u16 = 41;
/// EDNS option codes we read.
const OPTION_NSID: u16 = 3;
const OPTION_ECS: u16 = 8;

/// Why a packet gets no reply at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// Shorter than a DNS header.
    Short,
    /// A response (QR=1): answering it could start a loop.
    Response,
}

/// What is wrong with a malformed query (answered with FORMERR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Not exactly one question.
    QuestionCount,
    /// The question name or its type and class are cut short or invalid.
    Question,
    /// A record in the answer, authority or additional section is cut short.
    Record,
    /// Bytes after the last record.
    Trailing,
    /// An OPT record that is not the only one, not at the root, or whose
    /// options overrun it.
    Edns,
    /// An ECS option that breaks RFC 7871 §6 (while ECS is on).
    Ecs,
}

impl Malformed {
    /// Its index in `metrics::MALFORMED_REASONS`, the `reason` labels of
    /// `inferdns_dns_malformed_total` (in the order of this enum).
    pub fn index(self) -> usize {
        self as usize
    }

    pub const ALL: [Malformed; 6] = [
        Malformed::QuestionCount,
        Malformed::Question,
        Malformed::Record,
        Malformed::Trailing,
        Malformed::Edns,
        Malformed::Ecs,
    ];
}

/// The one question of a query.
#[derive(Debug, Clone, Copy)]
pub struct Question<'a> {
    /// Name, type and class exactly as received (for the echo: case kept).
    pub wire: &'a [u8],
    /// The name's length within `wire` (labels and the root byte).
    pub name_len: usize,
    pub qtype: u16,
    pub qclass: u16,
}

impl<'a> Question<'a> {
    /// The name's labels, in wire order.
    pub fn labels(&self) -> Labels<'a> {
        Labels {
            wire: &self.wire[..self.name_len],
            at: 0,
        }
    }
}

/// Labels of an uncompressed wire name.
#[derive(Debug, Clone)]
pub struct Labels<'a> {
    wire: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Labels<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let len = usize::from(*self.wire.get(self.at)?);
        if len == 0 {
            return None;
        }
        let label = self.wire.get(self.at + 1..self.at + 1 + len)?;
        self.at += 1 + len;
        Some(label)
    }
}

/// The client subnet of an ECS option (RFC 7871).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientSubnet {
    /// The address, padded with zero bits.
    pub addr: IpAddr,
    pub source_prefix: u8,
}

/// What the query's ECS option says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ecs {
    #[default]
    Absent,
    Subnet(ClientSubnet),
    /// Unknown family, a prefix too long for it, more (or fewer) address
    /// bytes than the prefix needs, bits set past the prefix, a non-zero
    /// scope, or a second ECS option (RFC 7871 §6, §7.1.1).
    Malformed,
}

/// The query's OPT record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    /// The requester's UDP payload size (values below 512 count as 512).
    pub payload: u16,
    pub version: u8,
    /// DNSSEC OK (RFC 3225): copied into the response.
    pub dnssec_ok: bool,
    /// NSID asked for (RFC 5001).
    pub nsid: bool,
    pub ecs: Ecs,
}

/// A query as far as it could be read.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub id: u16,
    pub opcode: u8,
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    /// `None` when there is not exactly one well-formed question.
    pub question: Option<Question<'a>>,
    /// The OPT record, when there is one and it could be read.
    pub edns: Option<Edns>,
    /// Set when the message is malformed: the answer is FORMERR.
    pub malformed: Option<Malformed>,
}

/// Reads `packet`. `Err` for what gets no reply at all.
pub fn parse(packet: &[u8]) -> Result<Query<'_>, Ignored> {
    if packet.len() < HEADER_LEN {
        return Err(Ignored::Short);
    }
    if packet[2] & 0x80 != 0 {
        return Err(Ignored::Response);
    }
    let count = |i: usize| u16::from_be_bytes([packet[4 + 2 * i], packet[5 + 2 * i]]);
    let mut query = Query {
        id: u16::from_be_bytes([packet[0], packet[1]]),
        opcode: (packet[2] >> 3) & 0x0f,
        recursion_desired: packet[2] & 0x01 != 0,
        checking_disabled: packet[3] & 0x10 != 0,
        question: None,
        edns: None,
        malformed: None,
    };
    if count(0) != 1 {
        query.malformed = Some(Malformed::QuestionCount);
        return Ok(query);
    }
    let Some((question, mut at)) = question(packet) else {
        query.malformed = Some(Malformed::Question);
        return Ok(query);
    };
    query.question = Some(question);
    let records = usize::from(count(1)) + usize::from(count(2));
    let additional = usize::from(count(3));
    for i in 0..records + additional {
        let Some((rtype, owner_is_root, class, ttl, rdata, next)) = record(packet, at) else {
            query.malformed = Some(Malformed::Record);
            return Ok(query);
        };
        at = next;
        if i < records || rtype != OPT {
            continue;
        }
        // RFC 6891 §6.1.1: one OPT, owned by the root.
        if query.edns.is_some() || !owner_is_root {
            query.malformed = Some(Malformed::Edns);
            return Ok(query);
        }
        match opt(class, ttl, rdata) {
            Some(edns) => query.edns = Some(edns),
            None => {
                query.malformed = Some(Malformed::Edns);
                return Ok(query);
            }
        }
    }
    if at != packet.len() {
        query.malformed = Some(Malformed::Trailing);
    }
    Ok(query)
}

/// The question starting right after the header, and where it ends.
fn question(packet: &[u8]) -> Option<(Question<'_>, usize)> {
    let start = HEADER_LEN;
    let mut at = start;
    loop {
        let len = usize::from(*packet.get(at)?);
        // A question name is never compressed (there is nothing before it
        // to point to), and label types 0x40 / 0x80 are not in use.
        if len > 63 {
            return None;
        }
        at += 1 + len;
        if at - start > MAX_NAME_LEN {
            return None;
        }
        if len == 0 {
            break;
        }
    }
    let name_len = at - start;
    let fixed = packet.get(at..at + 4)?;
    let question = Question {
        wire: &packet[start..at + 4],
        name_len,
        qtype: u16::from_be_bytes([fixed[0], fixed[1]]),
        qclass: u16::from_be_bytes([fixed[2], fixed[3]]),
    };
    Some((question, at + 4))
}

/// Skips a possibly compressed name at `at`; returns where it ends and
/// whether it is the root.
fn skip_name(packet: &[u8], mut at: usize) -> Option<(usize, bool)> {
    let start = at;
    loop {
        let len = *packet.get(at)?;
        match len & 0xc0 {
            0xc0 => {
                packet.get(at + 1)?;
                return Some((at + 2, false));
            }
            0x00 => {
                at += 1 + usize::from(len);
                if at - start > MAX_NAME_LEN {
                    return None;
                }
                if len == 0 {
                    return Some((at, at - start == 1));
                }
            }
            _ => return None,
        }
    }
}

/// A resource record at `at`: (type, owner is root, class, TTL, RDATA, end).
#[allow(clippy::type_complexity)]
fn record(packet: &[u8], at: usize) -> Option<(u16, bool, u16, u32, &[u8], usize)> {
    let (at, root) = skip_name(packet, at)?;
    let fixed = packet.get(at..at + 10)?;
    let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
    let class = u16::from_be_bytes([fixed[2], fixed[3]]);
    let ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
    let len = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
    let rdata = packet.get(at + 10..at + 10 + len)?;
    Some((rtype, root, class, ttl, rdata, at + 10 + len))
}

/// The OPT record's fields; `None` when its options overrun it.
fn opt(class: u16, ttl: u32, mut rdata: &[u8]) -> Option<Edns> {
    let mut edns = Edns {
        payload: class.max(512),
        version: (ttl >> 16) as u8,
        dnssec_ok: ttl & 0x8000 != 0,
        nsid: false,
        ecs: Ecs::Absent,
    };
    while !rdata.is_empty() {
        let header = rdata.get(..4)?;
        let code = u16::from_be_bytes([header[0], header[1]]);
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        let data = rdata.get(4..4 + len)?;
        rdata = &rdata[4 + len..];
        match code {
            OPTION_NSID => edns.nsid = true,
            OPTION_ECS => {
                edns.ecs = match edns.ecs {
                    Ecs::Absent => client_subnet(data).map_or(Ecs::Malformed, Ecs::Subnet),
                    // RFC 7871 §7.1.1: more than one ECS option is malformed.
                    _ => Ecs::Malformed,
                };
            }
            _ => {}
        }
    }
    Some(edns)
}

/// An ECS option's subnet; `None` when it breaks RFC 7871 §6.
fn client_subnet(data: &[u8]) -> Option<ClientSubnet> {
    let header = data.get(..4)?;
    let family = u16::from_be_bytes([header[0], header[1]]);
    let source_prefix = header[2];
    let scope_prefix = header[3];
    let address = &data[4..];
    let width = match family {
        1 => 32,
        2 => 128,
        _ => return None,
    };
    // Queries carry SCOPE 0; the address is exactly as long as the prefix
    // needs, with every bit past the prefix zero.
    if scope_prefix != 0
        || source_prefix > width
        || address.len() != usize::from(source_prefix).div_ceil(8)
    {
        return None;
    }
    let mut bytes = [0u8; 16];
    bytes[..address.len()].copy_from_slice(address);
    let spare = (8 - source_prefix % 8) % 8;
    if let Some(last) = address.last()
        && last & ((1u8 << spare) - 1) != 0
    {
        return None;
    }
    let addr = if family == 1 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(bytes))
    };
    Some(ClientSubnet {
        addr,
        source_prefix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `www.example.` A with `additional` appended and ARCOUNT `arcount`.
    fn query(additional: &[u8], arcount: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x10, 0, 1, 0, 0, 0, 0];
        q.extend(arcount.to_be_bytes());
        q.extend(b"\x03WwW\x07example\x00\x00\x01\x00\x01");
        q.extend(additional);
        q
    }

    fn opt_rr(flags: u16, options: &[u8]) -> Vec<u8> {
        let mut rr = vec![0, 0, 41, 0x04, 0xd0, 0, 0];
        rr.extend(flags.to_be_bytes());
        rr.extend((options.len() as u16).to_be_bytes());
        rr.extend(options);
        rr
    }

    fn ecs_option(family: u16, source: u8, scope: u8, addr: &[u8]) -> Vec<u8> {
        let mut o = vec![0, 8];
        o.extend(((4 + addr.len()) as u16).to_be_bytes());
        o.extend(family.to_be_bytes());
        o.extend([source, scope]);
        o.extend(addr);
        o
    }

    #[test]
    fn every_reason_has_its_metric_label() {
        let labels: Vec<&str> = Malformed::ALL
            .iter()
            .map(|r| crate::metrics::MALFORMED_REASONS[r.index()])
            .collect();
        assert_eq!(
            labels,
            [
                "question-count",
                "question",
                "record",
                "trailing-data",
                "edns",
                "ecs"
            ]
        );
        assert_eq!(
            Malformed::ALL.len(),
            crate::metrics::MALFORMED_REASONS.len()
        );
    }

    #[test]
    fn reads_header_question_and_opt() {
        let packet = query(&opt_rr(0x8000, &[0, 3, 0, 0]), 1);
        let q = parse(&packet).unwrap();
        assert_eq!((q.id, q.opcode), (0x1234, 0));
        assert!(q.recursion_desired && q.checking_disabled);
        assert_eq!(q.malformed, None);
        let question = q.question.unwrap();
        assert_eq!((question.qtype, question.qclass), (1, 1));
        let labels: Vec<&[u8]> = question.labels().collect();
        assert_eq!(labels, [&b"WwW"[..], b"example"]);
        assert_eq!(question.wire, b"\x03WwW\x07example\x00\x00\x01\x00\x01");
        let edns = q.edns.unwrap();
        assert_eq!((edns.payload, edns.version), (1232, 0));
        assert!(edns.dnssec_ok && edns.nsid);
        assert_eq!(edns.ecs, Ecs::Absent);
    }

    #[test]
    fn responses_and_short_packets_get_no_reply() {
        assert_eq!(parse(&[0; 11]).unwrap_err(), Ignored::Short);
        let mut packet = query(&[], 0);
        packet[2] |= 0x80;
        assert_eq!(parse(&packet).unwrap_err(), Ignored::Response);
    }

    #[test]
    fn malformed_messages_are_named() {
        let cases: Vec<(Vec<u8>, Malformed)> = vec![
            // Two questions.
            (
                {
                    let mut q = query(&[], 0);
                    q[5] = 2;
                    q
                },
                Malformed::QuestionCount,
            ),
            // The name runs past the end.
            (
                vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 9, b'a'],
                Malformed::Question,
            ),
            // A compression pointer in the question.
            (
                vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1],
                Malformed::Question,
            ),
            // ARCOUNT 1 and no record.
            (query(&[], 1), Malformed::Record),
            // Junk after the question.
            (query(&[0xde, 0xad], 0), Malformed::Trailing),
            // Two OPT records.
            (
                query(&[opt_rr(0, &[]), opt_rr(0, &[])].concat(), 2),
                Malformed::Edns,
            ),
            // An option longer than the OPT record.
            (query(&opt_rr(0, &[0, 3, 0, 9, 1]), 1), Malformed::Edns),
        ];
        for (packet, reason) in cases {
            assert_eq!(
                parse(&packet).unwrap().malformed,
                Some(reason),
                "{packet:?}"
            );
        }
    }

    #[test]
    fn ecs_follows_rfc_7871_section_6() {
        let ecs = |option: Vec<u8>| {
            let packet = query(&opt_rr(0, &option), 1);
            parse(&packet).unwrap().edns.unwrap().ecs
        };
        assert_eq!(
            ecs(ecs_option(1, 24, 0, &[192, 0, 2])),
            Ecs::Subnet(ClientSubnet {
                addr: "192.0.2.0".parse().unwrap(),
                source_prefix: 24
            })
        );
        assert_eq!(
            ecs(ecs_option(2, 56, 0, &[0x20, 1, 0x0d, 0xb8, 0, 0, 0x01])),
            Ecs::Subnet(ClientSubnet {
                addr: "2001:db8:0:100::".parse().unwrap(),
                source_prefix: 56
            })
        );
        assert_eq!(
            ecs(ecs_option(1, 0, 0, &[])),
            Ecs::Subnet(ClientSubnet {
                addr: "0.0.0.0".parse().unwrap(),
                source_prefix: 0
            })
        );
        for bad in [
            // More address bytes than a /24 needs.
            ecs_option(1, 24, 0, &[192, 0, 2, 0]),
            // Fewer.
            ecs_option(1, 24, 0, &[192, 0]),
            // Bits past the prefix.
            ecs_option(1, 23, 0, &[192, 0, 3]),
            // A scope in a query.
            ecs_option(1, 24, 24, &[192, 0, 2]),
            // A prefix longer than the family.
            ecs_option(1, 33, 0, &[192, 0, 2, 0, 0]),
            // An unknown family.
            ecs_option(3, 8, 0, &[1]),
            // Cut short.
            vec![0, 8, 0, 2, 0, 1],
            // Two ECS options.
            [
                ecs_option(1, 24, 0, &[192, 0, 2]),
                ecs_option(1, 24, 0, &[192, 0, 2]),
            ]
            .concat(),
        ] {
            assert_eq!(ecs(bad.clone()), Ecs::Malformed, "{bad:?}");
        }
    }

    #[test]
    fn every_prefix_of_a_valid_query_parses_without_panic() {
        let packet = query(&opt_rr(0, &ecs_option(1, 24, 0, &[192, 0, 2])), 1);
        for end in 0..packet.len() {
            let _ = parse(&packet[..end]);
        }
        assert_eq!(parse(&packet).unwrap().malformed, None);
    }
}
