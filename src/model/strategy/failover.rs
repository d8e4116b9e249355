//! Failover: the first tier with a fit endpoint, all of its fit endpoints;
//! while that tier ramps up, part of the answers still go to the next.

use super::{Choice, Cx, Decided, Strategy, first_fit_tier};
use crate::config::Target;
use crate::model::service::{ClassAnswer, Decision};

pub(super) struct Failover;

impl Strategy for Failover {
    fn choose<'a>(&self, cx: &Cx<'a>) -> Option<Choice<'a>> {
        first_fit_tier(cx)
    }

    fn complete(&self, cx: &Cx<'_>, d: &Decided<'_>, _: &[usize], answer: &mut ClassAnswer) {
        spill(cx, d, answer);
    }
}

/// Failback under slow start: while the best endpoint of the winning tier
/// has less than a full share (slow start, degraded), the rest goes to the
/// next fit tier rather than all back at once.
pub(super) fn spill(cx: &Cx<'_>, d: &Decided<'_>, answer: &mut ClassAnswer) {
    let Decision::Tier { tier } = d.decision else {
        return;
    };
    // The shares of the answered addresses (before full ones are dropped).
    let weights: Vec<f64> = d
        .chosen
        .iter()
        .filter(|(_, target)| matches!(target, Target::Address(_)))
        .map(|&(r, target)| cx.weight_of(r, target))
        .collect();
    let best = weights.iter().copied().fold(0.0f64, f64::max);
    let next = cx
        .service
        .tiers
        .iter()
        .skip(tier + 1)
        .map(|t| cx.fit(t))
        .find(|f| !f.is_empty());
    if best < 1.0
        && !weights.is_empty()
        && let Some(next) = next
    {
        answer.spill = 1.0 - best;
        let mut regions = Vec::new();
        for (r, target) in &next {
            if let Target::Address(ip) = target {
                let records = match ip {
                    std::net::IpAddr::V4(_) => &mut answer.spill_a,
                    std::net::IpAddr::V6(_) => &mut answer.spill_aaaa,
                };
                records.push(cx.record(ip));
                if !regions.contains(r) {
                    regions.push(*r);
                }
            }
        }
        answer.spill_answered = regions.iter().filter_map(|&r| cx.answered(r)).collect();
    }
}
