//! Cost: the cheapest fit region (of any tier) with enough headroom.

use super::{Choice, Cx, Decided, Strategy, failover, first_fit_tier};
use crate::model::service::ClassAnswer;

pub(super) struct Cost {
    /// Headroom (1 - utilisation) a region needs to be chosen for its price.
    pub min_headroom: f64,
}

/// A region cost may choose, where it is listed, its price and headroom.
#[derive(Clone, Copy)]
struct Priced {
    tier: usize,
    region: usize,
    cost: f64,
    headroom: f64,
}

impl Strategy for Cost {
    /// The cheapest fit region with at least `min_headroom`, ties by
    /// headroom (the first listed of equals); none with enough: the one
    /// with the most. A region without a price costs the most. Shed
    /// regions are candidates only when every fit region is shed.
    fn choose<'a>(&self, cx: &Cx<'a>) -> Option<Choice<'a>> {
        // The tier walk finds something exactly when some region is fit;
        // its `all_full` stands for the explanation.
        let mut choice = first_fit_tier(cx)?;
        let fit = |r: usize| !cx.fit(&[r]).is_empty();
        let regions = || cx.service.tiers.iter().flatten().copied();
        let unshed = regions().any(|r| !cx.shed(r) && fit(r));
        let mut best: Option<Priced> = None;
        let mut roomiest: Option<Priced> = None;
        for (t, tier) in cx.service.tiers.iter().enumerate() {
            for &r in tier {
                if !fit(r) || (unshed && cx.shed(r)) {
                    continue;
                }
                let load = &cx.regions.loads[r];
                let here = Priced {
                    tier: t,
                    region: r,
                    cost: load.cost.unwrap_or(f64::INFINITY),
                    headroom: 1.0 - load.util.unwrap_or(0.0),
                };
                if roomiest.is_none_or(|p| here.headroom > p.headroom) {
                    roomiest = Some(here);
                }
                let better = best.is_none_or(|p| {
                    here.cost < p.cost || (here.cost == p.cost && here.headroom > p.headroom)
                });
                if here.headroom >= self.min_headroom && better {
                    best = Some(here);
                }
            }
        }
        if let Some(p) = best.or(roomiest) {
            choice.tier = p.tier;
            choice.chosen = cx.fit(&[p.region]);
        }
        Some(choice)
    }

    fn complete(&self, cx: &Cx<'_>, d: &Decided<'_>, _: &[usize], answer: &mut ClassAnswer) {
        failover::spill(cx, d, answer);
    }
}
