//! The status view of one class and the lines of its `_explain` TXT
//! answer: every candidate endpoint, the stage that removed it, the
//! regions' load, the choice. Written from the decision the answer was
//! built from.

use super::{Cx, Decided, name};
use crate::capacity::{Criticality, Level, Shed};
use crate::config::{self, Allowed};
use crate::health::Status;
use crate::model::display_name;
use crate::model::service::{ClassAnswer, ClassView, Decision, Lines, RegionShare};

/// Writes the explain lines into `answer` and returns the status view.
pub(super) fn explain(
    cx: &Cx<'_>,
    d: Decided<'_>,
    answered: &[usize],
    answer: &mut ClassAnswer,
) -> ClassView {
    let s = cx.service;
    let shown: Vec<String> = if let Some(c) = &answer.cname {
        vec![c.data.to_string()]
    } else {
        answer
            .a
            .iter()
            .chain(&answer.aaaa)
            .map(|r| r.data.to_string())
            .collect()
    };
    let allowed = match cx.allowed {
        Allowed::Any => "any region".to_string(),
        Allowed::Deny => "no region".to_string(),
        Allowed::Only(tags) => format!("regions tagged {}", tags.join(" or ")),
    };

    let mut lines = vec![format!(
        "service {} ({}), ttl {}",
        display_name(&s.name),
        s.id,
        s.ttl
    )];
    if s.residency.is_some() {
        lines.push(format!("residency: {} -> {allowed}", cx.label));
    }
    endpoint_lines(cx, &d, &mut lines);
    capacity_lines(cx, &d, &mut lines);
    lines.push(decision_line(cx, &d, &shown));
    answer.explain = Lines::new(&lines);

    let endpoints = d.chosen.len().max(1) as f64;
    let regions = answered
        .iter()
        .map(|&r| RegionShare {
            region: cx.config.regions[r].id.clone(),
            share: if answer.cname.is_some() {
                1.0
            } else {
                d.chosen.iter().filter(|(cr, _)| *cr == r).count() as f64 / endpoints
            },
        })
        .collect();
    ClassView {
        clients: cx.label.to_string(),
        allowed,
        decision: d.decision,
        answer: shown,
        regions,
    }
}

/// One line per endpoint of every tier: its state and what became of it.
fn endpoint_lines(cx: &Cx<'_>, d: &Decided<'_>, lines: &mut Vec<String>) {
    for (t, tier) in cx.service.tiers.iter().enumerate() {
        for &r in tier {
            let region = &cx.config.regions[r];
            for (e, endpoint) in region.endpoints.iter().enumerate() {
                let input = cx.input(r, e);
                let status = match input.status {
                    Status::Up => "up",
                    Status::Down => "down",
                    Status::Unknown => "unknown",
                };
                // A past error of an endpoint that is up again is history,
                // not a reason; a fleet's quorum that overruled this edge is.
                let error = input
                    .last_error
                    .filter(|e| input.status != Status::Up || e.starts_with("quorum "))
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                lines.push(format!(
                    "tier {t} region {} endpoint {}: {status}{error} -> {}",
                    region.id,
                    endpoint.target,
                    verdict(cx, d, t, r, e)
                ));
            }
        }
    }
}

/// What became of endpoint `e` of region `r` listed in tier `t`.
fn verdict(cx: &Cx<'_>, d: &Decided<'_>, t: usize, r: usize, e: usize) -> String {
    let input = cx.input(r, e);
    let winning_tier = match d.decision {
        Decision::Tier { tier } => Some(tier),
        _ => None,
    };
    let last_good = d
        .last_good
        .as_ref()
        .filter(|g| g.endpoints.contains(&(r, e)))
        .and(input.fit_ago);
    match (cx.allows(r), input.removed_by(cx.model()), winning_tier) {
        (false, _, _) => "removed at residency: jurisdiction not allowed".to_string(),
        (true, Some(why), _) if last_good.is_some() => format!(
            "kept as last known good: fit {:.1} s ago, {why} since",
            last_good.unwrap_or_default().as_secs_f64()
        ),
        (true, Some(why), _) => format!("removed at eligible: {why}"),
        (true, None, _) if cx.shed(r) && !d.all_full => format!(
            "removed at capacity: level {} (shed = \"{}\"{})",
            level_name(cx.regions.level(r)),
            cx.service.shed.name(),
            match cx.service.criticality {
                Criticality::Standard => String::new(),
                c => format!(", criticality {}", c.name()),
            }
        ),
        (true, None, Some(w)) if t == w => match input.weight(cx.max_latency_ms()) {
            w if w < 1.0 => {
                format!("kept with a {:.0}% share (slow start or slow)", w * 100.0)
            }
            _ => "kept".to_string(),
        },
        (true, None, Some(_)) => "not used: a better tier is fit".to_string(),
        (true, None, None) => "kept".to_string(),
    }
}

/// Capacity: each region's load and what the service's shed rule made of
/// it (always for capacity and cost names; for the others once a region
/// of theirs reports load).
fn capacity_lines(cx: &Cx<'_>, d: &Decided<'_>, lines: &mut Vec<String>) {
    let s = cx.service;
    let loads = cx.regions.loads;
    let load_matters = matches!(
        s.strategy,
        config::Strategy::Capacity | config::Strategy::Cost { .. }
    ) || s.tiers.iter().flatten().any(|&r| loads[r].util.is_some());
    if !load_matters {
        return;
    }
    lines.push(format!(
        "capacity: shed = \"{}\" ({}): {}",
        s.shed.name(),
        match s.criticality {
            Criticality::Standard if s.shed_set => "set for this service".to_string(),
            Criticality::Standard => format!("default for {} names", name(s.strategy)),
            c => format!(
                "criticality {}, watermarks {:.0}/{:.0}/{:.0}%",
                c.name(),
                s.watermarks.prepare * 100.0,
                s.watermarks.reduce * 100.0,
                s.watermarks.remove * 100.0
            ),
        },
        match s.shed {
            Shed::Never => "load never removes a region, only health does",
            Shed::AtRemove => "a region leaves at the remove watermark unless all are that full",
            Shed::AtReduce if s.criticality == Criticality::Sheddable => {
                "a region leaves at the reduce watermark, even when all are that full (then the fallback, else NODATA)"
            }
            Shed::AtReduce => "a region leaves at the reduce watermark unless all are that full",
        }
    ));
    let mut seen = Vec::new();
    for &r in s.tiers.iter().flatten() {
        if seen.contains(&r) || !cx.allows(r) {
            continue;
        }
        seen.push(r);
        let l = &loads[r];
        let util = l.util.map_or("unknown (static weight)".to_string(), |u| {
            format!("{:.0}%", u * 100.0)
        });
        let level = cx.regions.level(r);
        let rule = if cx.shed(r) && d.all_full {
            " -> kept: every fit region is this full"
        } else if cx.shed(r) && s.criticality == Criticality::Sheddable {
            " -> removed: criticality sheddable leaves a busy region first"
        } else if cx.shed(r) {
            " -> removed by the shed rule"
        } else if level >= Level::Reduce && s.shed == Shed::Never {
            " -> kept: shed = \"never\""
        } else {
            ""
        };
        lines.push(format!(
            "capacity: region {} utilisation {util}, level {}, weight {:.3}{}{rule}",
            cx.config.regions[r].id,
            level_name(level),
            cx.regions.weight(r),
            l.cost.map(|c| format!(", cost {c}")).unwrap_or_default()
        ));
    }
}

/// The last line: the decision and the answer (`shown`).
fn decision_line(cx: &Cx<'_>, d: &Decided<'_>, shown: &[String]) -> String {
    match &d.decision {
        Decision::Tier { tier } => format!("decision: tier {tier} -> {}", shown.join(" ")),
        Decision::FailOpen => format!("decision: nothing fit, fail-open -> {}", shown.join(" ")),
        Decision::LastKnownGood { tier, then, .. } => {
            let good = d.last_good.as_ref().expect("decided from it");
            format!(
                "decision: nothing fit; what was fit went unfit together {:.1} s ago -> last known good (tier {tier}) for {:.1} s more, then {then} -> {}",
                good.ago.as_secs_f64(),
                good.left.as_secs_f64(),
                shown.join(" ")
            )
        }
        Decision::NoData => "decision: nothing fit -> NODATA".to_string(),
        Decision::NoRoom => {
            "decision: every fit region is past this sheddable name's shed level -> NODATA (the headroom is kept for the others)".to_string()
        }
        Decision::ServFail => "decision: nothing fit -> SERVFAIL".to_string(),
        Decision::Unprobed => {
            "decision: nothing fit, endpoints not probed yet -> SERVFAIL".to_string()
        }
        Decision::ResidencyNoData => {
            "decision: nothing these clients may use is fit -> NODATA (residency)".to_string()
        }
        Decision::Fallback { service }
            if cx.service.criticality == Criticality::Sheddable
                && cx.service.tiers.iter().any(|t| !cx.fit(t).is_empty()) =>
        {
            format!(
                "decision: no region has room for this sheddable name -> CNAME to fallback service {service}"
            )
        }
        Decision::Fallback { service } => format!(
            "decision: no region can serve {} -> CNAME to fallback service {service}",
            cx.model().unwrap_or("this service")
        ),
    }
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::Normal => "normal",
        Level::Prepare => "prepare",
        Level::Reduce => "reduce",
        Level::Removed => "removed",
    }
}
