//! Capacity: the fit endpoints of the first tier with one, drawn per query
//! by their region's capacity weight (headroom x size x base).

use std::collections::HashMap;
use std::net::IpAddr;

use super::{Choice, Cx, Decided, Strategy, first_fit_tier};
use crate::config::Target;
use crate::model::service::{ClassAnswer, Drawn, address_key};

pub(super) struct Capacity;

impl Strategy for Capacity {
    fn choose<'a>(&self, cx: &Cx<'a>) -> Option<Choice<'a>> {
        first_fit_tier(cx)
    }

    /// Whatever the decision: last known good and fail-open are drawn from
    /// too.
    fn complete(&self, cx: &Cx<'_>, d: &Decided<'_>, _: &[usize], answer: &mut ClassAnswer) {
        if !d.chosen.is_empty() {
            answer.drawn = Some(Box::new(drawn(cx, d)));
        }
    }
}

/// Each answered address with its weight: its region's weight split among
/// the region's answered endpoints, times its own share (slow start,
/// degraded).
fn drawn(cx: &Cx<'_>, d: &Decided<'_>) -> Drawn {
    let s = cx.service;
    let mut per_region: HashMap<usize, usize> = HashMap::new();
    for (r, _) in &d.chosen {
        *per_region.entry(*r).or_default() += 1;
    }
    let mut drawn = Drawn {
        records: s.records,
        sticky: s.sticky,
        ..Drawn::default()
    };
    for (r, target) in &d.chosen {
        let Target::Address(ip) = target else {
            continue;
        };
        // Every fit region is full (shed set aside): by size alone.
        let region_weight = if d.all_full {
            let l = &cx.regions.loads[*r];
            l.base * l.gpus * 0.01
        } else {
            cx.regions.weight(*r)
        };
        let w = region_weight / per_region[r] as f64 * cx.weight_of(*r, target);
        let counter = cx.answered(*r);
        let entry = (cx.record(ip), w, address_key(ip));
        let (entries, counters) = match ip {
            IpAddr::V4(_) => (&mut drawn.a, &mut drawn.a_counters),
            IpAddr::V6(_) => (&mut drawn.aaaa, &mut drawn.aaaa_counters),
        };
        entries.push(entry);
        counters.push(counter);
    }
    // Nothing has headroom (all at 100%): draw evenly rather than not at all.
    for family in [&mut drawn.a, &mut drawn.aaaa] {
        if family.iter().all(|(_, w, _)| *w <= 0.0) {
            for entry in family.iter_mut() {
                entry.1 = 1.0;
            }
        }
    }
    drawn
}
