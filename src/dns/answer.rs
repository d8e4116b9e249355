//! The answer to one question, computed from a snapshot. Pure: no I/O, no
//! locks, no logging; allocation is bounded by the size of the answer.

use std::borrow::Cow;

use std::net::IpAddr;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};

use crate::model::{Node, RrSet, Snapshot};

/// The label that asks for an explanation: `_explain.<service>`.
const EXPLAIN_LABEL: &[u8] = b"_explain";

/// Who is asking: the resolver's address and the EDNS Client Subnet, if any.
#[derive(Debug, Clone, Copy, Default)]
pub struct Client {
    pub addr: Option<IpAddr>,
    pub ecs: Option<ipnet::IpNet>,
}

/// Longest in-zone CNAME chain we follow before giving up (loops included).
const MAX_CHAIN: usize = 8;

/// The sections of a response (the question is echoed by the caller).
#[derive(Debug, Default)]
pub struct Answer<'a> {
    pub rcode: ResponseCode,
    pub answers: Vec<Cow<'a, Record>>,
    pub authority: Vec<&'a Record>,
    pub additionals: Vec<&'a Record>,
    /// Index of the service whose answer this is, if any (for metrics).
    pub service: Option<usize>,
    /// An `_explain` answer, not a routing one.
    pub explained: bool,
}

impl<'a> Answer<'a> {
    fn no_data(&mut self, snap: &'a Snapshot) {
        self.authority.push(&snap.zone.soa_negative);
    }
}

enum Found<'a> {
    Node(&'a Node),
    /// A wildcard node answering for the query name.
    Wildcard(&'a Node),
    Nothing,
}

fn lookup<'a>(snap: &'a Snapshot, name: &LowerName) -> Found<'a> {
    let zone = &snap.zone;
    if let Some(node) = zone.names.get(name) {
        return Found::Node(node);
    }
    if !zone.has_wildcards {
        return Found::Nothing;
    }
    // RFC 4592: the closest existing ancestor decides; its wildcard child answers.
    let mut ancestor = name.base_name();
    while zone.apex.zone_of(&ancestor) {
        if zone.names.contains_key(&ancestor) {
            let Ok(wildcard) = Name::from_labels([&b"*"[..]])
                .and_then(|star| star.append_domain(&Name::from(ancestor)))
            else {
                return Found::Nothing;
            };
            let wildcard = LowerName::new(&wildcard);
            return match zone.names.get(&wildcard) {
                Some(node) => Found::Wildcard(node),
                None => Found::Nothing,
            };
        }
        ancestor = ancestor.base_name();
    }
    Found::Nothing
}

/// The index of the service named `name`, if it is one.
pub fn service_index(snap: &Snapshot, name: &LowerName) -> Option<usize> {
    match snap.zone.names.get(name) {
        Some(Node::Service(i)) => Some(*i),
        _ => None,
    }
}

/// The explanation of a service's current answer for `client`.
pub fn explain_lines(snap: &Snapshot, service: usize, client: &Client) -> Vec<String> {
    let who = match (client.ecs, client.addr) {
        (Some(net), Some(resolver)) => format!("client {net} from ECS (resolver {resolver})"),
        (Some(net), None) => format!("client {net} from ECS"),
        (None, Some(resolver)) => format!("client {resolver} from the resolver address (no ECS)"),
        (None, None) => "client not given".to_string(),
    };
    let mut lines = vec![format!(
        "{who}; location: not used (no GeoIP database configured)"
    )];
    lines.extend(snap.services[service].explain.iter().cloned());
    lines.push(format!("snapshot generation {}", snap.generation));
    lines
}

/// `_explain.<service>` for a client inside the ACL: the explanation as TXT.
/// `None` when the name is not such a question (it is then looked up
/// normally, and does not exist).
fn explain<'a>(
    snap: &'a Snapshot,
    qname: &LowerName,
    qtype: RecordType,
    client: &Client,
) -> Option<Answer<'a>> {
    let first = qname.iter().next()?;
    if !first.eq_ignore_ascii_case(EXPLAIN_LABEL) {
        return None;
    }
    let allowed = client.addr.is_some_and(|ip| {
        snap.explain_acl
            .iter()
            .any(|net| net.contains(&ip.to_canonical()))
    });
    if !allowed {
        return None;
    }
    let service = service_index(snap, &qname.base_name())?;
    let mut out = Answer {
        service: Some(service),
        explained: true,
        ..Answer::default()
    };
    if matches!(qtype, RecordType::TXT | RecordType::ANY) {
        // TXT strings hold at most 255 bytes each.
        let strings: Vec<String> = explain_lines(snap, service, client)
            .into_iter()
            .flat_map(|line| split_255(&line))
            .collect();
        // TTL 0: an explanation is true only now.
        let record = Record::from_rdata(Name::from(qname), 0, RData::TXT(TXT::new(strings)));
        out.answers.push(Cow::Owned(record));
    } else {
        out.no_data(snap);
    }
    Some(out)
}

fn split_255(line: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    for c in line.chars() {
        if current.len() + c.len_utf8() > 255 {
            parts.push(std::mem::take(&mut current));
        }
        current.push(c);
    }
    parts.push(current);
    parts
}

/// Answers `qname`/`qtype` for `client`; the caller has checked that the
/// name is inside the zone.
pub fn answer<'a>(
    snap: &'a Snapshot,
    qname: &LowerName,
    qtype: RecordType,
    client: &Client,
) -> Answer<'a> {
    if let Some(explained) = explain(snap, qname, qtype, client) {
        return explained;
    }
    let mut out = Answer::default();
    let mut name = Cow::Borrowed(qname);
    // CNAME targets already followed: a loop stops at its first repeat.
    let mut followed: Vec<LowerName> = Vec::new();
    for _ in 0..MAX_CHAIN {
        let before = out.answers.len();
        let (node, owner) = match lookup(snap, &name) {
            Found::Node(node) => (node, None),
            Found::Wildcard(node) => (node, Some(Name::from(name.as_ref()))),
            Found::Nothing => {
                // RFC 6604: after a CNAME chain the rcode is that of the last name.
                out.rcode = ResponseCode::NXDomain;
                out.no_data(snap);
                return out;
            }
        };
        let next = match node {
            Node::EmptyNonTerminal => None,
            Node::Service(i) => {
                out.service = Some(*i);
                let service = &snap.services[*i];
                if service.servfail {
                    out.rcode = ResponseCode::ServFail;
                    out.answers.clear();
                    return out;
                }
                if let Some(cname) = &service.cname {
                    out.answers.push(Cow::Borrowed(cname));
                    cname_target(cname).filter(|_| qtype != RecordType::CNAME)
                } else {
                    let set = match qtype {
                        RecordType::A => &service.a[..],
                        RecordType::AAAA => &service.aaaa[..],
                        // RFC 8482: one RRset is enough for ANY.
                        RecordType::ANY if !service.a.is_empty() => &service.a[..],
                        RecordType::ANY => &service.aaaa[..],
                        _ => &[],
                    };
                    out.answers.extend(set.iter().map(Cow::Borrowed));
                    None
                }
            }
            Node::Static(sets) => {
                let cname = sets.iter().find(|s| s.rtype == RecordType::CNAME);
                match cname {
                    Some(set) if qtype != RecordType::CNAME => {
                        push_set(&mut out, set, owner.as_ref());
                        set.records.first().and_then(cname_target)
                    }
                    _ => {
                        let set = if qtype == RecordType::ANY {
                            sets.first()
                        } else {
                            sets.iter().find(|s| s.rtype == qtype)
                        };
                        if let Some(set) = set {
                            push_set(&mut out, set, owner.as_ref());
                            if qtype == RecordType::NS && name.as_ref() == &snap.zone.apex {
                                out.additionals.extend(snap.zone.glue.iter());
                            }
                        }
                        None
                    }
                }
            }
        };
        match next {
            Some(target) if &target == qname || followed.contains(&target) => return out,
            Some(target) if snap.zone.apex.zone_of(&target) => {
                followed.push(target.clone());
                name = Cow::Owned(target);
            }
            // Out-of-zone targets are for the resolver to chase.
            Some(_) => return out,
            None => {
                // Nothing of the asked type at the last name: NODATA (after any CNAMEs).
                if out.answers.len() == before {
                    out.no_data(snap);
                }
                return out;
            }
        }
    }
    // A chain longer than MAX_CHAIN (or a loop): answer what we have.
    out
}

fn push_set<'a>(out: &mut Answer<'a>, set: &'a RrSet, owner: Option<&Name>) {
    match owner {
        None => out.answers.extend(set.records.iter().map(Cow::Borrowed)),
        Some(owner) => out.answers.extend(set.records.iter().map(|r| {
            let mut synthesized = r.clone();
            synthesized.name = owner.clone();
            Cow::Owned(synthesized)
        })),
    }
}

fn cname_target(record: &Record) -> Option<LowerName> {
    match &record.data {
        RData::CNAME(target) => Some(LowerName::new(&target.0)),
        _ => None,
    }
}
