//! The part of a class's answer every strategy shares: the records of the
//! chosen endpoints with their shares, the CNAME, the counters.

use std::net::IpAddr;

use hickory_proto::rr::rdata::CNAME;
use hickory_proto::rr::{RData, Record};

use super::{Cx, Decided};
use crate::config::Target;
use crate::model::service::{ClassAnswer, Decision};

/// The answer from the decision, and the regions answered (sorted).
pub(super) fn assemble(cx: &Cx<'_>, d: &Decided<'_>) -> (ClassAnswer, Vec<usize>) {
    let s = cx.service;
    let ttl = cx.regions.ttl;
    let mut answer = ClassAnswer {
        servfail: matches!(d.decision, Decision::ServFail | Decision::Unprobed),
        refused: d.decision == Decision::ResidencyNoData,
        ..ClassAnswer::default()
    };
    if let (Decision::Fallback { .. }, Some(f)) = (&d.decision, cx.fallback()) {
        answer.cname = Some(Box::new(Record::from_rdata(
            s.name.clone(),
            ttl,
            RData::CNAME(CNAME(f.name.clone())),
        )));
    }
    // Answered as if fit: every one in full.
    let full = matches!(
        d.decision,
        Decision::FailOpen | Decision::LastKnownGood { .. }
    );
    for (r, target) in &d.chosen {
        if let Target::Address(ip) = target {
            let w = if full { 1.0 } else { cx.weight_of(*r, target) };
            let (records, weights) = match ip {
                IpAddr::V4(_) => (&mut answer.a, &mut answer.a_weights),
                IpAddr::V6(_) => (&mut answer.aaaa, &mut answer.aaaa_weights),
            };
            records.push(cx.record(ip));
            weights.push(w);
        }
    }
    clear_full(&mut answer.a_weights, &mut answer.aaaa_weights);
    // A CNAME stands alone: only when the chosen endpoints have no addresses.
    let mut answered: Vec<usize> = d.chosen.iter().map(|(r, _)| *r).collect();
    if answer.a.is_empty() && answer.aaaa.is_empty() && answer.cname.is_none() {
        let first_cname = d.chosen.iter().find_map(|(r, t)| match t {
            Target::Cname(name) => Some((*r, name.clone())),
            Target::Address(_) => None,
        });
        answered = first_cname.iter().map(|(r, _)| *r).collect();
        answer.cname = first_cname.map(|(_, name)| {
            Box::new(Record::from_rdata(
                s.name.clone(),
                ttl,
                RData::CNAME(CNAME(name)),
            ))
        });
    }
    answered.sort_unstable();
    answered.dedup();
    answer.answered = answered.iter().filter_map(|&r| cx.answered(r)).collect();
    (answer, answered)
}

/// Every record in every answer: no weights to draw.
pub(super) fn clear_full(a_weights: &mut Vec<f64>, aaaa_weights: &mut Vec<f64>) {
    for weights in [a_weights, aaaa_weights] {
        if weights.iter().all(|w| *w >= 1.0) {
            weights.clear();
        }
    }
}
