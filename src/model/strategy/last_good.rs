//! Last known good: what is answered for a while when everything went
//! unfit at once (the endpoints are more likely fine than the probes).

use std::time::Duration;

use super::Cx;

/// The endpoints answered as last known good, with the hold.
pub(in crate::model) struct LastGood {
    pub tier: usize,
    /// (region, endpoint) indexes.
    pub endpoints: Vec<(usize, usize)>,
    /// Since the last of them went unfit.
    pub ago: Duration,
    pub left: Duration,
}

/// Last known good for one class of clients: when nothing is fit, the
/// endpoints (of regions allowed for the class) that went unfit last,
/// together with those that went unfit less than one probe cycle
/// (`interval + timeout`) before them, are answered while the last one went
/// unfit less than the service's hold ago; of them, the best tier only, and
/// never one drained or rate limited since (a 429 asks us to back off).
pub(super) fn last_known_good(cx: &Cx<'_>) -> Option<LastGood> {
    let s = cx.service;
    let config = cx.config;
    let hold = s.last_known_good;
    let model = cx.model();
    // (tier, region, endpoint, last fit ago)
    let mut candidates = Vec::new();
    for (t, tier) in s.tiers.iter().enumerate() {
        for &r in tier {
            if !cx.allows(r) {
                continue;
            }
            for e in 0..config.regions[r].endpoints.len() {
                if let Some(ago) = cx.input(r, e).last_fit(model) {
                    candidates.push((t, r, e, ago));
                }
            }
        }
    }
    let latest = candidates.iter().map(|c| c.3).min()?;
    if latest >= hold {
        return None;
    }
    let cycle = |r: usize, e: usize| {
        let p = &config.regions[r].endpoints[e].probe;
        p.interval + p.timeout
    };
    candidates.retain(|&(_, r, e, ago)| {
        let input = cx.input(r, e);
        ago - latest <= cycle(r, e) && !input.drained && input.cooling_s.is_none()
    });
    let tier = candidates.iter().map(|c| c.0).min()?;
    Some(LastGood {
        tier,
        endpoints: candidates
            .iter()
            .filter(|c| c.0 == tier)
            .map(|&(_, r, e, _)| (r, e))
            .collect(),
        ago: latest,
        left: hold - latest,
    })
}
