//! The answer to one question, computed from a snapshot. Pure: no I/O, no
//! locks, no logging; allocation is bounded by the size of the answer.

use std::borrow::Cow;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};

use crate::model::{Node, RrSet, Snapshot};

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

/// Answers `qname`/`qtype`, which the caller has checked is inside the zone.
pub fn answer<'a>(snap: &'a Snapshot, qname: &LowerName, qtype: RecordType) -> Answer<'a> {
    let mut out = Answer::default();
    let mut name = Cow::Borrowed(qname);
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
            Some(target) if snap.zone.apex.zone_of(&target) => name = Cow::Owned(target),
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
