//! The copy path: replies built from answers encoded when the snapshot was
//! built ([`crate::model::wire`]), and the functions that encode them.
//!
//! A query takes this path when its name is in the zone's index and its
//! answer is one of the pre-encoded forms; the reply is then the header,
//! the question as received, the records copied (a static answer in one
//! piece; a service's records picked per client: its residency class, the
//! nearest candidates, the capacity draw) and the OPT record. Every other
//! query, and every reply that would not fit the client's size whole, goes
//! down the general path ([`super::answer`] and [`super::reply`]), which
//! stays the reference: the static blobs are written by it, and the
//! service records are the bytes it writes for an A/AAAA record whose owner
//! is the question. No allocation, no lock, no logging.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{LowerName, RData, Record, RecordType};

use super::answer::{
    Client, Recent, choice_key, class_of, estimate, locate, locate_key, sticky_scope, subnet_bits,
};
use super::handler::{ecs_echo, located_subnet};
use super::query::{self, Ecs, HEADER_LEN, Query, Question};
use super::reply::{Header, Opt, Section, Writer, write_opt};
use crate::capacity::rendezvous_score;
use crate::model::wire::{
    Blob, CandidateWire, ClassWire, NameEntry, Names, Records, ServiceWire, StaticAnswers,
};
use crate::model::{Candidate, ClassAnswer, Node, ServiceAnswer, Snapshot, Zone};

/// Most records a capacity draw may answer on this path (more: general path).
const MAX_DRAWN: usize = 16;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_ANY: u16 = 255;
const TYPE_AXFR: u16 = 252;
const TYPE_IXFR: u16 = 251;

/// Encodes the answers of every name of `zone` that does not depend on
/// the client or on health: static names without a CNAME, empty
/// non-terminals, and the NODATA reply of each service name. Once per
/// config.
pub fn compile_names(zone: &Arc<Zone>) -> Names {
    let snapshot = scratch_snapshot(zone.clone());
    let mut entries = Vec::with_capacity(zone.names.len());
    for (name, node) in &zone.names {
        let first = name.iter().next().unwrap_or_default();
        if first.eq_ignore_ascii_case(b"_explain") {
            continue; // An explanation question is the general path's.
        }
        let key = wire_name(name);
        let entry = match node {
            Node::Service(index) => NameEntry::Service {
                index: *index,
                nodata: encode(&key, TYPE_A, |w| {
                    w.whole(Section::Authority, [&zone.soa_negative])
                }),
            },
            Node::Static(sets) if sets.iter().any(|s| s.rtype == RecordType::CNAME) => continue,
            Node::Static(sets) => {
                let mut types: Vec<u16> = sets.iter().map(|s| u16::from(s.rtype)).collect();
                types.push(TYPE_ANY);
                types.sort_unstable();
                types.dedup();
                // A type the name has no records of: the NODATA answer.
                let other = (0xff00..=u16::MAX)
                    .find(|t| !types.contains(t))
                    .unwrap_or(0xff00);
                let by_type = types
                    .iter()
                    .map(|&t| (t, general(&snapshot, name, &key, t)))
                    .collect();
                NameEntry::Static(StaticAnswers {
                    by_type,
                    other: general(&snapshot, name, &key, other),
                })
            }
            Node::EmptyNonTerminal => NameEntry::Static(StaticAnswers {
                by_type: Vec::new(),
                other: general(&snapshot, name, &key, 0xff00),
            }),
        };
        entries.push((key, entry));
    }
    Names::new(entries)
}

/// The general path's answer to `name`/`qtype`, encoded.
fn general(snapshot: &Snapshot, name: &LowerName, key: &[u8], qtype: u16) -> Blob {
    let client = Client::default();
    let result = super::answer::answer(snapshot, name, RecordType::from(qtype), &client);
    let rcode = result.rcode;
    encode(key, qtype, |w| {
        w.whole(Section::Answer, result.answers.iter().map(|r| &**r))?;
        w.whole(Section::Authority, result.authority.iter().copied())?;
        w.optional(Section::Additional, result.additionals.iter().copied());
        Ok(())
    })
    .with_rcode(rcode)
}

trait WithRcode {
    fn with_rcode(self, rcode: ResponseCode) -> Self;
}

impl WithRcode for Blob {
    fn with_rcode(mut self, rcode: ResponseCode) -> Blob {
        self.rcode = (u16::from(rcode) & 0x0f) as u8;
        self
    }
}

/// Writes a reply to a question for `key` with `records`, and keeps what
/// follows the question.
fn encode(
    key: &[u8],
    qtype: u16,
    records: impl FnOnce(&mut Writer<'_, '_>) -> Result<(), super::reply::Full>,
) -> Blob {
    let mut packet = vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    packet.extend_from_slice(key);
    packet.extend_from_slice(&qtype.to_be_bytes());
    packet.extend_from_slice(&1u16.to_be_bytes());
    let parsed = query::parse(&packet).expect("a query we wrote ourselves");
    let question = parsed.question.expect("one question, well formed");
    let mut out = Vec::new();
    let mut writer = Writer::new(
        &mut out,
        Header::default(),
        Some(&question),
        None,
        usize::from(u16::MAX),
    );
    // Nothing of one name overflows 64 KiB; if it did, the copy would be
    // refused for size and the general path would truncate.
    let _ = records(&mut writer);
    writer.finish();
    let count = |i: usize| u16::from_be_bytes([out[6 + 2 * i], out[7 + 2 * i]]);
    Blob {
        bytes: out[HEADER_LEN + question.wire.len()..].into(),
        counts: [count(0), count(1), count(2)],
        rcode: 0,
    }
}

/// The lowercase wire form of a name (the index key).
fn wire_name(name: &LowerName) -> Box<[u8]> {
    let mut key = Vec::with_capacity(64);
    for label in name.iter() {
        key.push(label.len() as u8);
        key.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    key.push(0);
    key.into()
}

/// A snapshot holding only `zone`, for the general path to answer static
/// names from when the index is built.
fn scratch_snapshot(zone: Arc<Zone>) -> Snapshot {
    Snapshot {
        generation: 0,
        id: 0,
        built: SystemTime::UNIX_EPOCH,
        zone,
        services: Vec::new(),
        service_views: Vec::new(),
        endpoints: Vec::new(),
        drained: Vec::new(),
        queries: Arc::default(),
        nsid: None,
        explain_acl: Arc::default(),
        geo: Default::default(),
        region_loads: Vec::new(),
        rrl: None,
        choice_seed: None,
        wire: Default::default(),
    }
}

/// Encodes each service's client classes. Per snapshot: a few bytes per
/// endpoint, no name compression to search (every owner is the question).
pub fn compile_service(service: &ServiceAnswer) -> ServiceWire {
    ServiceWire {
        classes: service.classes.iter().map(class_wire).collect(),
    }
}

fn class_wire(c: &ClassAnswer) -> ClassWire {
    let weighted = !c.a_weights.is_empty()
        || !c.aaaa_weights.is_empty()
        || c.candidates
            .iter()
            .any(|k| !k.a_weights.is_empty() || !k.aaaa_weights.is_empty());
    let a = records(&c.a);
    let aaaa = records(&c.aaaa);
    let candidates: Option<Vec<CandidateWire>> = c
        .candidates
        .iter()
        .map(|k| {
            Some(CandidateWire {
                a: records(&k.a)?,
                aaaa: records(&k.aaaa)?,
            })
        })
        .collect();
    let drawn_a: Option<Vec<[u8; 16]>> = c
        .drawn
        .iter()
        .flat_map(|d| &d.a)
        .map(|e| rr(&e.0)?.try_into().ok())
        .collect();
    let drawn_aaaa: Option<Vec<[u8; 28]>> = c
        .drawn
        .iter()
        .flat_map(|d| &d.aaaa)
        .map(|e| rr(&e.0)?.try_into().ok())
        .collect();
    let drawable = c.drawn.as_ref().is_none_or(|d| d.records <= MAX_DRAWN);
    match (a, aaaa, candidates, drawn_a, drawn_aaaa) {
        (Some(a), Some(aaaa), Some(candidates), Some(drawn_a), Some(drawn_aaaa)) => ClassWire {
            copyable: c.cname.is_none() && !c.refused && c.spill <= 0.0 && !weighted && drawable,
            servfail: c.servfail,
            a,
            aaaa,
            candidates,
            drawn_a,
            drawn_aaaa,
        },
        _ => ClassWire::default(),
    }
}

/// The records one after the other; `None` if one is not an A or AAAA.
fn records(list: &[Record]) -> Option<Records> {
    let mut out = Records::default();
    for record in list {
        out.bytes.extend_from_slice(&rr(record)?);
        out.count += 1;
    }
    Some(out)
}

/// An A or AAAA record as the writer writes it after a question for its
/// owner: the owner is a pointer to the question (offset 12).
fn rr(record: &Record) -> Option<Vec<u8>> {
    let (rtype, rdata): (u16, Vec<u8>) = match &record.data {
        RData::A(a) => (TYPE_A, a.0.octets().to_vec()),
        RData::AAAA(a) => (TYPE_AAAA, a.0.octets().to_vec()),
        _ => return None,
    };
    let mut out = Vec::with_capacity(12 + rdata.len());
    out.extend_from_slice(&[0xc0, 0x0c]);
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&u16::from(record.dns_class).to_be_bytes());
    out.extend_from_slice(&record.ttl.to_be_bytes());
    out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    out.extend_from_slice(&rdata);
    Some(out)
}

/// What the copy path needs of the handler.
pub(super) struct CopyContext {
    pub max_size: usize,
    /// The UDP payload size we announce.
    pub payload: u16,
}

/// Writes the reply to `query` into `out` from the pre-encoded answers;
/// `false` when the query is for the general path (then `out` holds
/// nothing of value).
pub(super) fn copy(
    snap: &Snapshot,
    query: &Query<'_>,
    resolver: IpAddr,
    cx: &CopyContext,
    out: &mut Vec<u8>,
) -> bool {
    if query.malformed.is_some() || query.opcode != 0 {
        return false;
    }
    let Some(question) = query.question else {
        return false;
    };
    if question.qclass != 1 || matches!(question.qtype, TYPE_AXFR | TYPE_IXFR) {
        return false;
    }
    let mut subnet = None;
    if let Some(edns) = query.edns {
        if edns.version > 0 {
            return false;
        }
        match edns.ecs {
            Ecs::Malformed if snap.geo.ecs => return false,
            Ecs::Subnet(s) if snap.geo.ecs => subnet = Some(s),
            _ => {}
        }
    }
    let mut lower = [0u8; 256];
    let name = &question.wire[..question.name_len];
    let Some(key) = lower.get_mut(..name.len()) else {
        return false;
    };
    for (d, s) in key.iter_mut().zip(name) {
        *d = s.to_ascii_lowercase();
    }
    let Some(entry) = snap.wire.names.get(key) else {
        return false;
    };
    let asked = Asked {
        snap,
        query,
        question: &question,
        cx,
        subnet,
        qtype: RecordType::from(question.qtype),
    };
    match entry {
        NameEntry::Static(answers) => {
            let blob = answers.get(question.qtype);
            let body = Body {
                parts: [&blob.bytes, &[], &[]],
                counts: blob.counts,
                rcode: blob.rcode,
            };
            asked.finish(body, None, None, None, Counted::None, out)
        }
        NameEntry::Service { index, nodata } => {
            let mut drawn = [0u8; 28 * MAX_DRAWN];
            match asked.service(*index, resolver, &mut drawn) {
                Some(pick) => asked.records(*index, nodata, pick, out),
                None => false,
            }
        }
    }
}

/// Pieces a reply's records are copied from (the nearest candidates'
/// records each take one).
const PIECES: usize = 3;

/// The records part of a reply: up to three pieces copied in order.
struct Body<'a> {
    parts: [&'a [u8]; PIECES],
    counts: [u16; 3],
    rcode: u8,
}

/// One query on the copy path.
struct Asked<'a, 'q> {
    snap: &'a Snapshot,
    query: &'a Query<'q>,
    question: &'a Question<'q>,
    cx: &'a CopyContext,
    /// The ECS subnet (when ECS is on).
    subnet: Option<query::ClientSubnet>,
    qtype: RecordType,
}

/// The records picked for a client (none: NODATA).
struct Pick<'a> {
    /// SERVFAIL instead (all down and so configured, or not probed yet).
    servfail: bool,
    parts: [&'a [u8]; PIECES],
    count: u16,
    counters: Counted<'a>,
    /// The subnet located (for the ECS echo) and the scope of the decision.
    located: Option<ipnet::IpNet>,
    scope: Option<u8>,
}

/// Which answer counters a reply increments.
enum Counted<'a> {
    None,
    /// The class's `answered`.
    Class(&'a [crate::metrics::Counter]),
    /// The chosen candidates' (bit j: candidate j).
    Candidates(&'a [Candidate], u64),
    /// The drawn entries' (indexes, how many).
    Drawn(
        &'a [Option<crate::metrics::Counter>],
        [usize; MAX_DRAWN],
        usize,
    ),
}

/// What a decision for one subnet is remembered under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DecidedKey {
    /// [`Snapshot::id`]: never 0 here, never given to two snapshots.
    snapshot: u64,
    service: usize,
    /// The subnet located and whether it came from ECS ([`locate_key`]).
    subnet: ipnet::IpNet,
    from_ecs: bool,
}

/// A service's answer for one subnet, as far as it does not depend on the
/// query's type: its client class, the scope, and for proximity the
/// candidates within the tolerance (bit j: candidate j; `None`: the
/// class's records).
#[derive(Debug, Clone, Copy)]
struct Decision {
    class: usize,
    scope: Option<u8>,
    nearest: Option<u64>,
}

thread_local! {
    /// Decisions each query-path thread remembers: 1,024 entries of about
    /// 80 bytes. An entry holds for one snapshot only (its `id`), so a
    /// health change, a reload or a database swap is never answered from an
    /// older decision; resolvers repeat their own address and their
    /// clients' subnets, so most queries of a located service skip locating
    /// and the distance estimates. Drawn (capacity) answers are never
    /// remembered.
    static DECIDED_RECENTLY: std::cell::RefCell<Recent<DecidedKey, Decision, 1024>> =
        const { std::cell::RefCell::new(Recent::new()) };
}

fn folded(key: &DecidedKey) -> u64 {
    subnet_bits(&key.subnet, key.from_ecs)
        ^ (key.service as u64).rotate_left(40)
        ^ key.snapshot.rotate_left(23)
}

fn recall(key: &DecidedKey) -> Option<Decision> {
    DECIDED_RECENTLY.with_borrow(|decided| decided.get(folded(key), key))
}

fn remember(key: DecidedKey, decision: Decision) {
    DECIDED_RECENTLY.with_borrow_mut(|decided| decided.put(folded(&key), key, decision));
}

/// The records of a decision, in the query's family.
fn pick<'a>(
    service: &'a ServiceAnswer,
    wire: &'a ServiceWire,
    decision: Decision,
    located: Option<ipnet::IpNet>,
    aaaa: bool,
) -> Option<Pick<'a>> {
    let class = service.classes.get(decision.class)?;
    let cw = wire.classes.get(decision.class)?;
    let mut pick = Pick {
        servfail: false,
        parts: [&[], &[], &[]],
        count: 0,
        counters: Counted::None,
        located,
        scope: decision.scope,
    };
    match decision.nearest {
        Some(mask) => {
            if mask.checked_shr(cw.candidates.len() as u32).unwrap_or(0) != 0 {
                return None; // Not encoded for every candidate: the general path.
            }
            let mut used = 0;
            for (j, candidate) in cw.candidates.iter().enumerate() {
                if mask & (1 << j) == 0 {
                    continue;
                }
                let records = if aaaa { &candidate.aaaa } else { &candidate.a };
                *pick.parts.get_mut(used)? = &records.bytes;
                used += 1;
                pick.count += records.count;
            }
            pick.counters = Counted::Candidates(&class.candidates, mask);
        }
        None => {
            let records = if aaaa { &cw.aaaa } else { &cw.a };
            pick.parts[0] = &records.bytes;
            pick.count = records.count;
            pick.counters = Counted::Class(&class.answered);
        }
    }
    Some(pick)
}

impl<'a> Asked<'a, '_> {
    /// Service `index`'s answer for this client, as the general path
    /// decides it (`service_records` in `super::answer`); `None` for the
    /// general path. A capacity draw writes its records into `drawn`.
    fn service<'d>(
        &self,
        index: usize,
        resolver: IpAddr,
        drawn: &'d mut [u8; 28 * MAX_DRAWN],
    ) -> Option<Pick<'d>>
    where
        'a: 'd,
    {
        let snap = self.snap;
        let aaaa = match self.question.qtype {
            TYPE_A => false,
            TYPE_AAAA => true,
            _ => return None,
        };
        let service = snap.services.get(index)?;
        if service.canary.is_some() {
            // A rollout's canary: the general path picks the version.
            return None;
        }
        let wire = snap.wire.services.get(index)?;
        let located_net = self.subnet.and_then(|s| located_subnet(s, snap));
        let client = Client {
            addr: Some(resolver.to_canonical()),
            ecs: located_net,
        };
        // Decided before on this very snapshot for the same subnet: the
        // same class, scope and nearest candidates (all functions of the
        // snapshot and the subnet), without locating or measuring again.
        let key = if service.located && snap.id != 0 {
            locate_key(&client).map(|(subnet, from_ecs)| DecidedKey {
                snapshot: snap.id,
                service: index,
                subnet,
                from_ecs,
            })
        } else {
            None
        };
        if let Some(decision) = key.as_ref().and_then(recall) {
            return pick(service, wire, decision, located_net, aaaa);
        }
        let located = service.located.then(|| locate(snap, &client));
        let class_index = class_of(service, located.as_ref());
        let class = service.classes.get(class_index)?;
        let cw = wire.classes.get(class_index)?;
        if !cw.copyable {
            return None;
        }
        let mut scope = located.map(|l| l.scope);
        if cw.servfail {
            return Some(Pick {
                servfail: true,
                parts: [&[], &[], &[]],
                count: 0,
                counters: Counted::None,
                located: located_net,
                scope,
            });
        }
        if let Some(d) = &class.drawn {
            let entries = if aaaa { &d.aaaa } else { &d.a };
            let key = if d.sticky || snap.choice_seed.is_some() {
                if entries.len() > d.records
                    && let Some(width) = sticky_scope(&client)
                {
                    scope = Some(scope.map_or(width, |s| s.max(width)));
                }
                choice_key(snap, &client)
            } else {
                rand::random()
            };
            // The `k` lowest scores, lowest first, ties to the earlier entry
            // (as the general path's stable sort orders them).
            // Each entry's score once (the same values the general path
            // compares); more entries than that: the general path.
            let n = entries.len();
            let mut scores = [0.0f64; 64];
            for (score, e) in scores.get_mut(..n)?.iter_mut().zip(entries) {
                *score = rendezvous_score(key, e.2, e.1);
            }
            let k = d.records.min(n);
            let mut chosen = [usize::MAX; MAX_DRAWN];
            let mut len = 0;
            for slot in 0..k {
                let best = (0..n)
                    .filter(|i| !chosen[..slot].contains(i))
                    .min_by(|a, b| scores[*a].total_cmp(&scores[*b]))?;
                chosen[slot] = best;
                let rr: &[u8] = if aaaa {
                    cw.drawn_aaaa.get(best)?
                } else {
                    cw.drawn_a.get(best)?
                };
                drawn[len..len + rr.len()].copy_from_slice(rr);
                len += rr.len();
            }
            let counters = if aaaa {
                &d.aaaa_counters
            } else {
                &d.a_counters
            };
            return Some(Pick {
                servfail: false,
                parts: [&drawn[..len], &[], &[]],
                count: k as u16,
                counters: Counted::Drawn(counters, chosen, k),
                located: located_net,
                scope,
            });
        }
        let nearest = match (service.tolerance_ms, located.and_then(|l| l.point)) {
            (Some(tolerance), Some(point)) if !class.candidates.is_empty() => {
                // As `nearest` decides, with each estimate computed once.
                let n = class.candidates.len();
                if n > 64 {
                    return None;
                }
                let mut estimates = [0.0f64; 64];
                for (e, c) in estimates.iter_mut().zip(&class.candidates) {
                    *e = estimate(&point, c);
                }
                let best = estimates[..n].iter().copied().fold(f64::INFINITY, f64::min);
                let mut mask = 0u64;
                for (j, e) in estimates[..n].iter().enumerate() {
                    // (Written as `nearest` compares: a NaN is never within.)
                    if *e <= best + tolerance {
                        mask |= 1 << j;
                    }
                }
                if mask.count_ones() as usize > PIECES {
                    return None; // More regions in the band than pieces.
                }
                Some(mask)
            }
            _ => None,
        };
        let decision = Decision {
            class: class_index,
            scope,
            nearest,
        };
        if let Some(key) = key {
            remember(key, decision);
        }
        pick(service, wire, decision, located_net, aaaa)
    }

    /// The reply with the records picked; NODATA when there are none.
    fn records(&self, index: usize, nodata: &Blob, pick: Pick<'_>, out: &mut Vec<u8>) -> bool {
        let (body, counters) = if pick.servfail {
            let body = Body {
                parts: [&[], &[], &[]],
                counts: [0; 3],
                rcode: 2,
            };
            (body, Counted::None)
        } else if pick.count == 0 {
            let body = Body {
                parts: [&nodata.bytes, &[], &[]],
                counts: nodata.counts,
                rcode: 0,
            };
            (body, Counted::None)
        } else {
            let body = Body {
                parts: pick.parts,
                counts: [pick.count, 0, 0],
                rcode: 0,
            };
            (body, pick.counters)
        };
        self.finish(body, Some(index), pick.located, pick.scope, counters, out)
    }

    /// Writes the reply and counts it, as the general path does; `false`
    /// (nothing counted) when it does not fit whole.
    fn finish(
        &self,
        body: Body<'_>,
        service: Option<usize>,
        located: Option<ipnet::IpNet>,
        scope: Option<u8>,
        counters: Counted<'_>,
        out: &mut Vec<u8>,
    ) -> bool {
        let ecs = self.subnet.map(|s| ecs_echo(s, located, scope));
        let opt = opt(self.snap, self.query, self.cx, ecs);
        if !emit(out, self.query, self.question, &body, opt, self.cx.max_size) {
            return false;
        }
        self.snap
            .queries
            .count(service, self.qtype, ResponseCode::from_low(body.rcode));
        match counters {
            Counted::None => {}
            Counted::Class(list) => list.iter().for_each(crate::metrics::Counter::inc),
            Counted::Candidates(candidates, mask) => {
                for (j, c) in candidates.iter().enumerate() {
                    if mask & (1 << j) != 0
                        && let Some(counter) = &c.answered
                    {
                        counter.inc();
                    }
                }
            }
            Counted::Drawn(list, chosen, k) => {
                for i in &chosen[..k] {
                    if let Some(Some(c)) = list.get(*i) {
                        c.inc();
                    }
                }
            }
        }
        true
    }
}

/// The reply's OPT record: only when the query had one (RFC 6891).
fn opt<'s>(
    snap: &'s Snapshot,
    query: &Query<'_>,
    cx: &CopyContext,
    ecs: Option<(u16, u8, u8, [u8; 16])>,
) -> Option<Opt<'s>> {
    query.edns.map(|edns| Opt {
        payload: cx.payload,
        dnssec_ok: edns.dnssec_ok,
        nsid: snap.nsid.as_deref().filter(|_| edns.nsid),
        ecs,
    })
}

/// Writes header, question, body and OPT; `false` (nothing written of
/// use) when the whole reply does not fit `max_size`: the general path
/// then decides what to leave out.
fn emit(
    out: &mut Vec<u8>,
    query: &Query<'_>,
    question: &Question<'_>,
    body: &Body<'_>,
    opt: Option<Opt<'_>>,
    max_size: usize,
) -> bool {
    let body_len: usize = body.parts.iter().map(|p| p.len()).sum();
    let size = HEADER_LEN + question.wire.len() + body_len + opt.map_or(0, |o| o.len());
    if size > max_size {
        return false;
    }
    out.clear();
    out.extend_from_slice(&query.id.to_be_bytes());
    // QR, opcode QUERY (0), AA, RD copied; CD copied, RCODE.
    out.push(0x80 | 0x04 | u8::from(query.recursion_desired));
    out.push(u8::from(query.checking_disabled) << 4 | (body.rcode & 0x0f));
    let additional = body.counts[2] + u16::from(opt.is_some());
    for count in [1, body.counts[0], body.counts[1], additional] {
        out.extend_from_slice(&count.to_be_bytes());
    }
    out.extend_from_slice(question.wire);
    for part in body.parts {
        out.extend_from_slice(part);
    }
    if let Some(opt) = opt {
        write_opt(out, &opt, u16::from(body.rcode));
    }
    true
}
