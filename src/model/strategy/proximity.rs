//! Proximity: the fit regions of the first tier with one, each with its own
//! records; the query chooses among them by the client's estimated latency.

use std::net::IpAddr;

use super::{Choice, Cx, Decided, Strategy, answer::clear_full, failover, first_fit_tier};
use crate::config::Target;
use crate::model::service::{Candidate, ClassAnswer};

pub(super) struct Proximity;

impl Strategy for Proximity {
    fn choose<'a>(&self, cx: &Cx<'a>) -> Option<Choice<'a>> {
        first_fit_tier(cx)
    }

    fn complete(&self, cx: &Cx<'_>, d: &Decided<'_>, answered: &[usize], answer: &mut ClassAnswer) {
        failover::spill(cx, d, answer);
        // Only a choice of two or more regions is left to the query.
        if answer.cname.is_none() && answered.len() > 1 {
            answer.candidates = answered
                .iter()
                .filter_map(|&r| candidate(cx, d, r))
                .collect();
        }
    }
}

/// Answered region `r` with its own records, if it has a location.
fn candidate(cx: &Cx<'_>, d: &Decided<'_>, r: usize) -> Option<Candidate> {
    let region = &cx.config.regions[r];
    let coords = region.location.and_then(|l| l.coords)?;
    let mut candidate = Candidate {
        region: region.id.clone(),
        coords,
        point: crate::geo::Point::new(coords),
        latency_ms: cx.regions.latency_ms.get(r).copied().unwrap_or(0.0),
        a: Vec::new(),
        aaaa: Vec::new(),
        a_weights: Vec::new(),
        aaaa_weights: Vec::new(),
        answered: cx.answered(r),
    };
    for (cr, target) in &d.chosen {
        if let (true, Target::Address(ip)) = (*cr == r, target) {
            // Slow start and degraded shares apply here as in failover.
            let w = cx.weight_of(r, target);
            let (records, weights) = match ip {
                IpAddr::V4(_) => (&mut candidate.a, &mut candidate.a_weights),
                IpAddr::V6(_) => (&mut candidate.aaaa, &mut candidate.aaaa_weights),
            };
            records.push(cx.record(ip));
            weights.push(w);
        }
    }
    clear_full(&mut candidate.a_weights, &mut candidate.aaaa_weights);
    Some(candidate)
}
