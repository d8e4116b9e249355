//! The answer to one question, computed from a snapshot. Pure: no I/O, no
//! locks, no logging; allocation is bounded by the size of the answer.

use std::borrow::Cow;

use std::net::IpAddr;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};

use crate::capacity::rendezvous_score;
use crate::geo::{Code, Point, code_str, in_eu_eea, rtt_ms_for_km};
use crate::model::{Candidate, GeoView, Node, RrSet, ServiceAnswer, Snapshot};

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
    /// ECS SCOPE PREFIX-LENGTH to echo: the network that decided a
    /// location-dependent answer; `None` when the answer does not depend on it.
    pub scope: Option<u8>,
    /// Answer counters of the regions in the answer.
    pub answered: Vec<&'a crate::metrics::Counter>,
    /// Residency left this client nothing (for the refusal counter).
    pub refused: Option<&'a crate::metrics::Counter>,
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
    let s = &snap.services[service];
    let located = locate(snap, client);
    let place = match (located.country, located.coords) {
        (Some(c), Some((lat, lon))) => format!(
            "located in {}{} at {lat:.2},{lon:.2} by {}, network /{}",
            code_str(&c),
            located
                .continent
                .map(|k| format!("/{}", code_str(&k)))
                .unwrap_or_default(),
            located.by,
            located.scope
        ),
        (Some(c), None) => format!(
            "located in {} by {}, network /{}",
            code_str(&c),
            located.by,
            located.scope
        ),
        (None, _) => format!(
            "location unknown (decided by {}, network /{})",
            located.by, located.scope
        ),
    };
    let mut lines = vec![format!("{who}; {place}")];
    if !s.located {
        lines.push("the answer does not depend on the client's location".to_string());
    }
    let class_index = class_of(s, s.located.then_some(&located));
    let class = &s.classes[class_index];
    lines.extend(class.explain.iter().map(str::to_string));
    if let (Some(tolerance), Some(point)) = (s.tolerance_ms, located.point)
        && !class.candidates.is_empty()
    {
        let chosen: Vec<&str> = nearest(&class.candidates, &point, tolerance)
            .map(|c| c.region.as_str())
            .collect();
        for c in &class.candidates {
            let km = point.km_to(&c.point);
            lines.push(format!(
                "proximity: region {} {:.0} km, estimate {:.1} ms ({:.1} ms distance + {:.1} ms measured) -> {}",
                c.region,
                km,
                rtt_ms_for_km(km) + c.latency_ms,
                rtt_ms_for_km(km),
                c.latency_ms,
                if chosen.contains(&c.region.as_str()) { "chosen" } else { "beyond the tolerance band" }
            ));
        }
    }
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
                service_records(snap, *i, qtype, client, &mut out)
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
                // SERVFAIL says nothing about the name: no SOA.
                if out.answers.len() == before && out.rcode != ResponseCode::ServFail {
                    if out.refused.is_some() {
                        out.authority.push(&snap.zone.soa_uncached);
                    } else {
                        out.no_data(snap);
                    }
                }
                return out;
            }
        }
    }
    // A chain longer than MAX_CHAIN (or a loop): answer what we have.
    out
}

/// Where a client is, and how we know.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Located {
    pub country: Option<Code>,
    pub continent: Option<Code>,
    pub coords: Option<(f64, f64)>,
    /// `coords` on the globe (proximity's distances).
    pub point: Option<Point>,
    /// In the built-in group `eu`: the database flags the client
    /// `is_in_european_union`, or its country is on the `EU_EEA` list (the
    /// list alone for network overrides, which carry no flag).
    pub eu: bool,
    /// The prefix of the network the answer holds for: inside the network
    /// that decided (override or GeoIP network), clear of any other override.
    pub scope: u8,
    pub from_ecs: bool,
    pub by: &'static str,
}

/// Locates the client: the ECS subnet if any, else the resolver; network
/// overrides first, then GeoIP.
///
/// Each query-path thread remembers the last [`RECENT`] subnets it located
/// (a fixed table, one entry per slot, overwritten on collision: nothing a
/// sender can grow; a thrashing sender only costs the lookups it would
/// cost anyway). An entry holds for one [`GeoView`] (its `id`; every
/// snapshot has its own), so a reload, a database swap or a new override
/// is never answered from an older view. Resolvers repeat their own address
/// and their clients' subnets, so most queries skip the tree walk.
pub fn locate(snap: &Snapshot, client: &Client) -> Located {
    let Some((subnet, from_ecs)) = locate_key(client) else {
        return Located::default();
    };
    let geo = &snap.geo;
    if geo.id == 0 {
        return locate_in(geo, subnet, from_ecs);
    }
    let key = (geo.id, subnet, from_ecs);
    let folded = subnet_bits(&subnet, from_ecs);
    if let Some(located) = RECENTLY_LOCATED.with_borrow(|recent| recent.get(folded, &key)) {
        return located;
    }
    let located = locate_in(geo, subnet, from_ecs);
    RECENTLY_LOCATED.with_borrow_mut(|recent| recent.put(folded, key, located));
    located
}

/// What [`locate`] places `client` by: the ECS subnet if any, else the
/// resolver's address; and whether it came from ECS.
pub(super) fn locate_key(client: &Client) -> Option<(ipnet::IpNet, bool)> {
    match (client.ecs, client.addr) {
        (Some(net), _) => Some((net.trunc(), true)),
        (None, Some(ip)) => Some((ipnet::IpNet::from(ip.to_canonical()), false)),
        (None, None) => None,
    }
}

type RecentKey = (u64, ipnet::IpNet, bool);

thread_local! {
    /// Subnets each thread remembers in [`locate`]: 1,024 entries of about
    /// 80 bytes.
    static RECENTLY_LOCATED: std::cell::RefCell<Recent<RecentKey, Located, 1024>> =
        const { std::cell::RefCell::new(Recent::new()) };
}

/// What a query-path thread remembers of recent work (located subnets,
/// decisions): `N` entries (a power of two), one per slot, overwritten on
/// collision, so nothing a sender sends can grow it; allocated at the
/// first entry. A key must say everything the value depends on.
pub(super) struct Recent<K, V, const N: usize> {
    entries: Vec<Option<(K, V)>>,
}

impl<K: PartialEq + Copy, V: Copy, const N: usize> Recent<K, V, N> {
    pub(super) const fn new() -> Self {
        Recent {
            entries: Vec::new(),
        }
    }

    /// The value under `key`, whose bits folded into 64 are `folded`.
    pub(super) fn get(&self, folded: u64, key: &K) -> Option<V> {
        self.entries
            .get(slot_of(folded, N))
            .and_then(|entry| entry.as_ref())
            .filter(|(k, _)| k == key)
            .map(|(_, value)| *value)
    }

    pub(super) fn put(&mut self, folded: u64, key: K, value: V) {
        if self.entries.is_empty() {
            self.entries.resize(N, None);
        }
        self.entries[slot_of(folded, N)] = Some((key, value));
    }
}

/// A subnet and its origin folded into 64 bits, for the query path's
/// per-thread tables. A sender can aim at a slot, which is harmless: the
/// tables only overwrite, so a collision costs a lookup, never memory.
pub(super) fn subnet_bits(subnet: &ipnet::IpNet, from_ecs: bool) -> u64 {
    let bits = match subnet.addr() {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    };
    (bits as u64)
        ^ ((bits >> 64) as u64).rotate_left(17)
        ^ (u64::from(subnet.prefix_len()) << 1)
        ^ u64::from(from_ecs)
}

/// The slot of `folded` in a table of `size` (a power of two) entries.
fn slot_of(folded: u64, size: usize) -> usize {
    (folded.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - size.trailing_zeros())) as usize
}

/// [`locate`] without the memory of recent subnets.
fn locate_in(geo: &GeoView, subnet: ipnet::IpNet, from_ecs: bool) -> Located {
    let (ip, used) = (subnet.addr(), subnet.prefix_len());
    let (place, eu, network, by) =
        if let Some(o) = geo.overrides.iter().find(|o| o.network.contains(&ip)) {
            let p = &o.place;
            let eu = p.country.is_some_and(in_eu_eea);
            (
                (p.country, p.continent, p.coords),
                eu,
                o.network,
                "a network override",
            )
        } else if let Some(record) = geo.db.as_ref().and_then(|db| db.lookup(ip)) {
            // An IPv6 tree without an IPv4 subtree can give a v6 prefix for a v4 address.
            let family_max = subnet.max_prefix_len();
            let prefix = if record.prefix > family_max {
                record.prefix.saturating_sub(96).min(family_max)
            } else {
                record.prefix
            };
            let eu = record.eu || record.country.is_some_and(in_eu_eea);
            (
                (record.country, record.continent, record.coords),
                eu,
                ipnet::IpNet::new(ip, prefix).map_or(subnet, |n| n.trunc()),
                "GeoIP",
            )
        } else {
            return Located {
                scope: used,
                from_ecs,
                by: "nothing (no GeoIP answer)",
                ..Located::default()
            };
        };
    // The subnet asked about is wider than the network that decides, or
    // holds an override of its own: its clients may be in different places,
    // so none of them is placed (fail closed), and the answer holds for
    // exactly the subnet asked.
    let spans = network.prefix_len() > used
        || geo
            .overrides
            .iter()
            .any(|o| o.network != network && subnet.contains(&o.network));
    if spans {
        return Located {
            scope: used,
            from_ecs,
            by: "nothing (the subnet spans several networks)",
            ..Located::default()
        };
    }
    Located {
        country: place.0,
        continent: place.1,
        coords: place.2,
        point: place.2.map(Point::new),
        eu,
        scope: clear_of_overrides(geo.overrides.iter().map(|o| o.network), network, ip),
        from_ecs,
        by,
    }
}

/// The widest prefix around `ip`, inside `network`, that holds none of the
/// overrides nested in `network` (they place their clients elsewhere, and a
/// resolver must not cache this answer for them). None of them overlaps the
/// client's subnet (the caller checked), so the result is no longer than
/// the subnet's prefix.
fn clear_of_overrides(
    overrides: impl Iterator<Item = ipnet::IpNet>,
    network: ipnet::IpNet,
    ip: IpAddr,
) -> u8 {
    overrides
        .filter(|o| *o != network && network.contains(o))
        .map(|o| common_prefix(ip, o.addr()) + 1)
        .fold(network.prefix_len(), u8::max)
}

/// Number of leading bits `a` and `b` share (0 across families).
fn common_prefix(a: IpAddr, b: IpAddr) -> u8 {
    let bits = match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) ^ u32::from(b)).leading_zeros(),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a) ^ u128::from(b)).leading_zeros(),
        _ => 0,
    };
    bits as u8
}

/// The residency class of a located client.
pub(super) fn class_of(service: &ServiceAnswer, located: Option<&Located>) -> usize {
    match (&service.residency, located) {
        (Some(index), Some(l)) if !l.from_ecs && index.without_ecs_unknown => index.unknown,
        (Some(index), Some(l)) => index.class(l.country, l.continent, l.eu),
        _ => 0,
    }
}

/// Proximity: the estimated round trip from `client` to a candidate, in ms.
pub(super) fn estimate(client: &Point, c: &Candidate) -> f64 {
    rtt_ms_for_km(client.km_to(&c.point)) + c.latency_ms
}

/// Proximity: the candidates within the tolerance of the best estimate.
pub(super) fn nearest<'a>(
    candidates: &'a [Candidate],
    client: &Point,
    tolerance_ms: f64,
) -> impl Iterator<Item = &'a Candidate> + 'a {
    let client = *client;
    let estimate = move |c: &Candidate| estimate(&client, c);
    let best = candidates
        .iter()
        .map(estimate)
        .fold(f64::INFINITY, f64::min);
    candidates
        .iter()
        .filter(move |c| estimate(c) <= best + tolerance_ms)
}

/// Puts service `i`'s answer for `client` into `out`; returns a CNAME
/// target to follow, if any.
fn service_records<'a>(
    snap: &'a Snapshot,
    i: usize,
    qtype: RecordType,
    client: &Client,
    out: &mut Answer<'a>,
) -> Option<LowerName> {
    let service = version_of(&snap.services[i], snap, client, out);
    let located = service.located.then(|| locate(snap, client));
    if let Some(l) = &located {
        // Along a CNAME chain the longest scope of its decisions holds (RFC 7871 7.2.1).
        out.scope = Some(out.scope.map_or(l.scope, |s| s.max(l.scope)));
    }
    let class = &service.classes[class_of(service, located.as_ref())];
    if class.servfail {
        out.rcode = ResponseCode::ServFail;
        out.answers.clear();
        return None;
    }
    if class.refused {
        out.refused = service.refusals.as_ref();
    }
    if let Some(cname) = &class.cname {
        out.answers.push(Cow::Borrowed(cname));
        out.answered.extend(class.answered.iter());
        return cname_target(cname).filter(|_| qtype != RecordType::CNAME);
    }
    let pick = |a: &'a [Record], aaaa: &'a [Record]| -> &'a [Record] {
        match qtype {
            RecordType::A => a,
            RecordType::AAAA => aaaa,
            // RFC 8482: one RRset is enough for ANY.
            RecordType::ANY if !a.is_empty() => a,
            RecordType::ANY => aaaa,
            _ => &[],
        }
    };
    // Capacity: `records` endpoints drawn by weight; the same client subnet
    // draws the same ones when the service is sticky.
    if let Some(drawn) = &class.drawn {
        let (entries, counters) = match qtype {
            RecordType::AAAA => (&drawn.aaaa, &drawn.aaaa_counters),
            RecordType::A => (&drawn.a, &drawn.a_counters),
            RecordType::ANY if !drawn.a.is_empty() => (&drawn.a, &drawn.a_counters),
            RecordType::ANY => (&drawn.aaaa, &drawn.aaaa_counters),
            _ => return None,
        };
        // A sticky draw (and every draw in a fleet) depends on the client's
        // subnet (when there are more endpoints than it answers): ECS scope
        // is the width of the key. A random draw does not depend on the
        // client and adds no scope.
        let key = if drawn.sticky || snap.choice_seed.is_some() {
            if entries.len() > drawn.records
                && let Some(width) = sticky_scope(client)
            {
                out.scope = Some(out.scope.map_or(width, |s| s.max(width)));
            }
            choice_key(snap, client)
        } else {
            rand::random()
        };
        draw(out, entries, counters, drawn.records, key);
        return None;
    }
    match (service.tolerance_ms, located.and_then(|l| l.point)) {
        (Some(tolerance), Some(point)) if !class.candidates.is_empty() => {
            for c in nearest(&class.candidates, &point, tolerance) {
                let records = pick(&c.a, &c.aaaa);
                let weights = if std::ptr::eq(records, &c.a[..]) {
                    &c.a_weights
                } else {
                    &c.aaaa_weights
                };
                let keyed = fleet_key(snap, client, weights, out);
                push_weighted(out, records, weights, keyed);
                out.answered.extend(c.answered.iter());
            }
        }
        // Failback under slow start: part of the answers still go to the next tier.
        _ if class.spill > 0.0 && chance(snap, client, SPILL_SALT, out) < class.spill => {
            out.answers.extend(
                pick(&class.spill_a, &class.spill_aaaa)
                    .iter()
                    .map(Cow::Borrowed),
            );
            out.answered.extend(class.spill_answered.iter());
        }
        // Failover, or a client we cannot place: the winning tier, each
        // record drawn with its share (slow start, degraded).
        _ => {
            let records = pick(&class.a, &class.aaaa);
            let weights = if std::ptr::eq(records, &class.a[..]) {
                &class.a_weights
            } else {
                &class.aaaa_weights
            };
            let keyed = fleet_key(snap, client, weights, out);
            push_weighted(out, records, weights, keyed);
            out.answered.extend(class.answered.iter());
        }
    }
    None
}

/// The key of a client subnet's choices: the subnet's, mixed with the
/// fleet's seed when there is one (every edge then chooses alike).
pub(super) fn choice_key(snap: &Snapshot, client: &Client) -> u64 {
    let key = subnet_key(client);
    snap.choice_seed
        .map_or(key, |seed| crate::fleet::mix(key, seed))
}

/// In a fleet, the key of the client's weighted picks among `weights`
/// (`None`: no weights, or no fleet, and the picks are random).
/// The answer then depends on the subnet, and its ECS scope says so.
fn fleet_key(
    snap: &Snapshot,
    client: &Client,
    weights: &[f64],
    out: &mut Answer<'_>,
) -> Option<u64> {
    if snap.choice_seed.is_none() || weights.is_empty() {
        return None;
    }
    widen_to_subnet(client, out);
    Some(choice_key(snap, client))
}

/// The answer depends on the client's subnet: its ECS scope covers the
/// subnet key's width.
fn widen_to_subnet(client: &Client, out: &mut Answer<'_>) {
    if let Some(width) = sticky_scope(client) {
        out.scope = Some(out.scope.map_or(width, |s| s.max(width)));
    }
}

/// Salt of a rollout's canary draw (apart from every other choice).
const CANARY_SALT: u64 = 0x0043_414e_4152_5931;

/// The answer of the version the client's subnet is on: the canary's for
/// its share of subnets (the same subnets on every query and every edge),
/// else the stable one's. The answer then depends on the subnet.
pub(super) fn version_of<'a>(
    service: &'a ServiceAnswer,
    snap: &Snapshot,
    client: &Client,
    out: &mut Answer<'_>,
) -> &'a ServiceAnswer {
    let Some((share, canary)) = &service.canary else {
        return service;
    };
    widen_to_subnet(client, out);
    if crate::fleet::unit(choice_key(snap, client), CANARY_SALT) < *share {
        canary
    } else {
        service
    }
}

/// Salt of the failback spill's chance (apart from the weighted picks').
const SPILL_SALT: u64 = 0x0053_5049_4c4c;

/// A number in [0, 1): random, or in a fleet the client subnet's own.
fn chance(snap: &Snapshot, client: &Client, salt: u64, out: &mut Answer<'_>) -> f64 {
    if snap.choice_seed.is_none() {
        return rand::random();
    }
    widen_to_subnet(client, out);
    crate::fleet::unit(choice_key(snap, client), salt)
}

/// Width of the sticky key: the /24 (IPv4) or /56 (IPv6) a client is in.
const STICKY_V4: u8 = 24;
const STICKY_V6: u8 = 56;

/// ECS scope of a sticky draw: the width of its key, but no longer than the
/// subnet asked about. The key is taken from the subnet as given (its bits
/// beyond the prefix are zero), so the draw holds for the whole of a
/// shorter subnet; RFC 7871 lets SCOPE exceed SOURCE, but a resolver caches
/// such an answer for SOURCE anyway, and it would only ask resolvers to
/// reveal longer prefixes. `None` without ECS (nothing is echoed).
pub(super) fn sticky_scope(client: &Client) -> Option<u8> {
    let net = client.ecs?;
    let width = if net.addr().is_ipv4() {
        STICKY_V4
    } else {
        STICKY_V6
    };
    Some(width.min(net.prefix_len()))
}

/// The client's subnet (/24 or /56 of the ECS subnet, else of the resolver)
/// as a key for sticky draws.
pub(super) fn subnet_key(client: &Client) -> u64 {
    let ip = client
        .ecs
        .map(|n| n.addr())
        .or(client.addr)
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    match ip.to_canonical() {
        IpAddr::V4(v4) => u64::from(u32::from(v4) & (u32::MAX << (32 - STICKY_V4))),
        IpAddr::V6(v6) => ((u128::from(v6) >> (128 - STICKY_V6)) as u64) | (1 << 63),
    }
}

/// The `k` entries with the lowest rendezvous scores for `key`.
fn draw<'a>(
    out: &mut Answer<'a>,
    entries: &'a [(Record, f64, u64)],
    counters: &'a [Option<crate::metrics::Counter>],
    k: usize,
    key: u64,
) {
    let score = |i: usize| rendezvous_score(key, entries[i].2, entries[i].1);
    if k == 1 {
        let best = (0..entries.len()).min_by(|a, b| score(*a).total_cmp(&score(*b)));
        if let Some(i) = best {
            out.answers.push(Cow::Borrowed(&entries[i].0));
            out.answered.extend(counters[i].iter());
        }
        return;
    }
    let mut order: Vec<(f64, usize)> = (0..entries.len()).map(|i| (score(i), i)).collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (_, i) in order.into_iter().take(k) {
        out.answers.push(Cow::Borrowed(&entries[i].0));
        out.answered.extend(counters[i].iter());
    }
}

/// Every record when `weights` is empty; else each record with probability
/// equal to its weight (drawn from `keyed`, the client subnet's key in a
/// fleet, else at random), and at least the heaviest one.
fn push_weighted<'a>(
    out: &mut Answer<'a>,
    records: &'a [Record],
    weights: &[f64],
    keyed: Option<u64>,
) {
    if weights.is_empty() {
        out.answers.extend(records.iter().map(Cow::Borrowed));
        return;
    }
    let before = out.answers.len();
    for (j, (record, weight)) in records.iter().zip(weights).enumerate() {
        let roll = match keyed {
            Some(key) => crate::fleet::unit(key, j as u64 + 1),
            None => rand::random::<f64>(),
        };
        if *weight >= 1.0 || roll < *weight {
            out.answers.push(Cow::Borrowed(record));
        }
    }
    if out.answers.len() == before
        && let Some((record, _)) = records
            .iter()
            .zip(weights)
            .max_by(|a, b| a.1.total_cmp(b.1))
    {
        out.answers.push(Cow::Borrowed(record));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(region: &str, coords: (f64, f64), latency_ms: f64) -> Candidate {
        Candidate {
            region: region.into(),
            coords,
            point: Point::new(coords),
            latency_ms,
            a: Vec::new(),
            aaaa: Vec::new(),
            a_weights: Vec::new(),
            aaaa_weights: Vec::new(),
            answered: None,
        }
    }

    fn chosen(candidates: &[Candidate], client: (f64, f64), tolerance: f64) -> Vec<&str> {
        nearest(candidates, &Point::new(client), tolerance)
            .map(|c| c.region.as_str())
            .collect()
    }

    #[test]
    fn proximity_ranks_by_distance_plus_measured_latency_within_the_band() {
        let paris = (48.86, 2.35);
        let regions = [
            candidate("frankfurt", (50.11, 8.68), 1.0),
            candidate("dublin", (53.35, -6.26), 1.0),
            candidate("virginia", (38.90, -77.04), 1.0),
        ];
        // Frankfurt 478 km (~7 ms), Dublin 781 km (~12 ms), Virginia ~6,200 km.
        assert_eq!(chosen(&regions, paris, 2.0), ["frankfurt"]);
        assert_eq!(chosen(&regions, paris, 10.0), ["frankfurt", "dublin"]);
        assert_eq!(chosen(&regions, paris, 1000.0).len(), 3);
        // A slow region loses to a farther fast one.
        let slow = [
            candidate("frankfurt", (50.11, 8.68), 30.0),
            candidate("dublin", (53.35, -6.26), 1.0),
        ];
        assert_eq!(chosen(&slow, paris, 2.0), ["dublin"]);
        // From New York, Virginia; from Tokyo, Frankfurt (9,300 km) beats Virginia (10,900 km).
        assert_eq!(chosen(&regions, (40.71, -74.01), 2.0), ["virginia"]);
        assert_eq!(chosen(&regions, (35.69, 139.69), 2.0), ["frankfurt"]);
    }
}
