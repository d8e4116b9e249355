//! The per-service metric families, kept as one small row per service and
//! written out at scrape in the Prometheus text format.
//!
//! Owns: `inferdns_dns_queries_total`, `inferdns_dns_answers_total`,
//! `inferdns_residency_refusals_total`, `inferdns_service_decision`,
//! `inferdns_service_tier`, `inferdns_last_known_good`,
//! `inferdns_last_known_good_holds_total`, `inferdns_region_weight` and
//! `inferdns_region_shed_level`. At 10,000 services these are over 150,000
//! series; as the prometheus crate's vectors each series was an object of
//! its own with a copy of its family's description (about 45 MB), and a
//! scrape built a second copy of all of them before writing the text (the
//! daemon's resident memory grew by 140 MB over three scrapes).

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{DECISIONS, QUERY_CELLS, QueryRow, cell_labels};

/// A counter the query path adds to: one relaxed atomic add, no lock.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Whether both are the same counter (not merely equal counts).
    pub fn same(&self, other: &Counter) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// One service's series. A field is `None` (or empty) until the series
/// exists.
#[derive(Debug, Default)]
struct Row {
    /// Query counts by (qtype, rcode); shared with the query path.
    queries: Option<Arc<QueryRow>>,
    /// Answers that carried a region's endpoints, by region id (sorted).
    answers: Vec<(Arc<str>, Counter)>,
    refusals: Option<Counter>,
    /// The index of the current decision in [`DECISIONS`] and the tier.
    decision: Option<(usize, Option<i64>)>,
    last_known_good: Option<bool>,
    holds: Option<u64>,
    /// Capacity weight and shed level, by region id (sorted).
    regions: Vec<(Arc<str>, RegionCells)>,
}

/// The entry of `key` in a vector sorted by key, added (with the
/// interned key) when missing. Sorted vectors rather than maps: a map's
/// nodes and a `String` per key were most of these rows' memory.
fn entry<'v, T: Default>(
    list: &'v mut Vec<(Arc<str>, T)>,
    key: &str,
    names: &mut HashSet<Arc<str>>,
) -> &'v mut T {
    let at = match list.binary_search_by(|(k, _)| (**k).cmp(key)) {
        Ok(at) => at,
        Err(at) => {
            let name = match names.get(key) {
                Some(name) => name.clone(),
                None => {
                    let name: Arc<str> = Arc::from(key);
                    names.insert(name.clone());
                    name
                }
            };
            list.insert(at, (name, T::default()));
            at
        }
    };
    &mut list[at].1
}

#[derive(Debug, Default)]
struct RegionCells {
    weight: Option<f64>,
    shed_level: Option<i64>,
}

/// Every service's row, by service id (sorted, so a scrape's order is
/// stable).
#[derive(Debug, Default)]
pub struct ServiceSeries {
    rows: Mutex<Rows>,
}

#[derive(Debug, Default)]
struct Rows {
    by_service: BTreeMap<String, Row>,
    /// Region ids, one copy each for every row that names them.
    regions: HashSet<Arc<str>>,
}

impl ServiceSeries {
    fn with_row<T>(
        &self,
        service: &str,
        f: impl FnOnce(&mut Row, &mut HashSet<Arc<str>>) -> T,
    ) -> T {
        let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        let Rows {
            by_service,
            regions,
        } = &mut *rows;
        match by_service.get_mut(service) {
            Some(row) => f(row, regions),
            None => f(by_service.entry(service.to_string()).or_default(), regions),
        }
    }

    /// The query count row of `service`, created (with its `A`/`NOERROR`
    /// series at 0) on first use and kept while the service exists.
    pub fn queries(&self, service: &str) -> Arc<QueryRow> {
        self.with_row(service, |row, _| {
            row.queries
                .get_or_insert_with(|| {
                    Arc::new(QueryRow {
                        cells: std::array::from_fn(|_| AtomicU64::new(0)),
                    })
                })
                .clone()
        })
    }

    pub fn answers(&self, service: &str, region: &str) -> Counter {
        self.with_row(service, |row, names| {
            entry(&mut row.answers, region, names).clone()
        })
    }

    pub fn refusals(&self, service: &str) -> Counter {
        self.with_row(service, |row, _| {
            row.refusals.get_or_insert_default().clone()
        })
    }

    /// Sets the current decision (an index in [`DECISIONS`]) and tier; the
    /// holds counter exists at 0 from then on.
    pub fn set_decision(&self, service: &str, decision: usize, tier: Option<i64>) {
        self.with_row(service, |row, _| {
            row.decision = Some((decision, tier));
            row.holds.get_or_insert(0);
        });
    }

    pub fn set_last_known_good(&self, service: &str, holding: bool) {
        self.with_row(service, |row, _| row.last_known_good = Some(holding));
    }

    pub fn count_hold(&self, service: &str) {
        self.with_row(service, |row, _| *row.holds.get_or_insert(0) += 1);
    }

    pub fn forget_last_known_good(&self, service: &str) {
        let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(row) = rows.by_service.get_mut(service) {
            row.last_known_good = None;
        }
    }

    pub fn set_region_weight(&self, service: &str, region: &str, weight: f64) {
        self.with_region(service, region, |cells| cells.weight = Some(weight));
    }

    pub fn set_region_shed_level(&self, service: &str, region: &str, level: i64) {
        self.with_region(service, region, |cells| cells.shed_level = Some(level));
    }

    fn with_region(&self, service: &str, region: &str, f: impl FnOnce(&mut RegionCells)) {
        self.with_row(service, |row, names| {
            f(entry(&mut row.regions, region, names))
        });
    }

    /// Drops every series of a service a reload removed.
    pub fn forget(&self, service: &str) {
        let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        rows.by_service.remove(service);
        // Region ids no row names any more go too (the set holds one
        // reference of each).
        rows.regions.retain(|name| Arc::strong_count(name) > 1);
    }

    /// Writes every family in the text format. The lock is taken once per
    /// family, so a publisher waits at most for one family's lines.
    pub fn encode(&self, out: &mut String) {
        for family in FAMILIES {
            family.header(out);
            let rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
            for (service, row) in rows.by_service.iter() {
                family.samples(service, row, out);
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Family {
    Queries,
    Answers,
    Refusals,
    Decision,
    Tier,
    LastKnownGood,
    Holds,
    Weight,
    ShedLevel,
}

const FAMILIES: [Family; 9] = [
    Family::Queries,
    Family::Answers,
    Family::Refusals,
    Family::Decision,
    Family::Tier,
    Family::LastKnownGood,
    Family::Holds,
    Family::Weight,
    Family::ShedLevel,
];

impl Family {
    fn name_help_type(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Family::Queries => (
                "inferdns_dns_queries_total",
                "DNS queries answered, by service, query type and response code.",
                "counter",
            ),
            Family::Answers => (
                "inferdns_dns_answers_total",
                "Service answers that carried a region's endpoints.",
                "counter",
            ),
            Family::Refusals => (
                "inferdns_residency_refusals_total",
                "Queries answered NODATA because nothing the client may be sent to was fit.",
                "counter",
            ),
            Family::Decision => (
                "inferdns_service_decision",
                "1 for the decision the service's answer follows (tier, last_known_good, fail_open, nodata, no_room, servfail, unprobed, residency_nodata, fallback), 0 for the others.",
                "gauge",
            ),
            Family::Tier => (
                "inferdns_service_tier",
                "The tier (0 = best) a service answers; absent while it answers no tier.",
                "gauge",
            ),
            Family::LastKnownGood => (
                "inferdns_last_known_good",
                "1 while a service, with nothing fit, answers the endpoints that were fit last (for its hold).",
                "gauge",
            ),
            Family::Holds => (
                "inferdns_last_known_good_holds_total",
                "Times a service began answering its last known good endpoints.",
                "counter",
            ),
            Family::Weight => (
                "inferdns_region_weight",
                "Capacity weight of a region for a service (headroom x size x base).",
                "gauge",
            ),
            Family::ShedLevel => (
                "inferdns_region_shed_level",
                "How hard load sheds a region for a service: 0 normal, 1 prepare (short TTL), 2 reduce (weight cut), 3 removed from answers.",
                "gauge",
            ),
        }
    }

    fn name(self) -> &'static str {
        self.name_help_type().0
    }

    fn header(self, out: &mut String) {
        let (name, help, kind) = self.name_help_type();
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    }

    /// The family's lines for one service. Labels are in name order, as
    /// the prometheus crate writes them.
    fn samples(self, service: &str, row: &Row, out: &mut String) {
        let name = self.name();
        match self {
            Family::Queries => {
                let Some(cells) = &row.queries else { return };
                for i in 0..QUERY_CELLS {
                    let n = cells.cells[i].load(Ordering::Relaxed);
                    // A/NOERROR (cell 0) exists from the start; the others
                    // appear with their first query.
                    if n > 0 || i == 0 {
                        let (qtype, rcode) = cell_labels(i);
                        sample(
                            out,
                            name,
                            &[("qtype", &qtype), ("rcode", rcode), ("service", service)],
                            n,
                        );
                    }
                }
            }
            Family::Answers => {
                for (region, counter) in &row.answers {
                    let labels = [("region", &**region), ("service", service)];
                    sample(out, name, &labels, counter.get());
                }
            }
            Family::Refusals => {
                if let Some(counter) = &row.refusals {
                    sample(out, name, &[("service", service)], counter.get());
                }
            }
            Family::Decision => {
                if let Some((current, _)) = row.decision {
                    for (i, decision) in DECISIONS.iter().enumerate() {
                        let labels = [("decision", *decision), ("service", service)];
                        sample(out, name, &labels, u64::from(i == current));
                    }
                }
            }
            Family::Tier => {
                if let Some((_, Some(tier))) = row.decision {
                    sample(out, name, &[("service", service)], tier);
                }
            }
            Family::LastKnownGood => {
                if let Some(holding) = row.last_known_good {
                    sample(out, name, &[("service", service)], u64::from(holding));
                }
            }
            Family::Holds => {
                if let Some(holds) = row.holds {
                    sample(out, name, &[("service", service)], holds);
                }
            }
            Family::Weight | Family::ShedLevel => {
                for (region, cells) in &row.regions {
                    let labels = [("region", &**region), ("service", service)];
                    match self {
                        Family::Weight => {
                            if let Some(w) = cells.weight {
                                sample(out, name, &labels, Float(w));
                            }
                        }
                        _ => {
                            if let Some(level) = cells.shed_level {
                                sample(out, name, &labels, level);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A gauge's value as the text format spells it.
struct Float(f64);

impl std::fmt::Display for Float {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            v if v.is_nan() => f.write_str("NaN"),
            v if v == f64::INFINITY => f.write_str("+Inf"),
            v if v == f64::NEG_INFINITY => f.write_str("-Inf"),
            v => write!(f, "{v}"),
        }
    }
}

/// One line: `name{label="value",...} value`.
fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    out.push_str(name);
    out.push('{');
    for (i, (label, value)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(label);
        out.push_str("=\"");
        escape_label(value, out);
        out.push('"');
    }
    let _ = writeln!(out, "}} {value}");
}

/// Label values escape `\`, `"` and line feeds (the text format's rule).
fn escape_label(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_and_floats_spelled_as_the_format_wants() {
        let mut out = String::new();
        sample(&mut out, "m", &[("a", "x\"y\\z\nw")], Float(f64::INFINITY));
        assert_eq!(out, "m{a=\"x\\\"y\\\\z\\nw\"} +Inf\n");
        out.clear();
        sample(&mut out, "m", &[("a", "b"), ("c", "d")], Float(0.25));
        assert_eq!(out, "m{a=\"b\",c=\"d\"} 0.25\n");
    }

    #[test]
    fn a_forgotten_service_leaves_no_series_and_counters_held_elsewhere_still_count() {
        let series = ServiceSeries::default();
        let answers = series.answers("chat", "eu");
        answers.inc();
        series.set_region_weight("chat", "eu", 1.5);
        series.set_decision("chat", 0, Some(0));
        let mut text = String::new();
        series.encode(&mut text);
        assert!(
            text.contains("inferdns_dns_answers_total{region=\"eu\",service=\"chat\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("inferdns_region_weight{region=\"eu\",service=\"chat\"} 1.5\n"));
        assert!(text.contains("inferdns_last_known_good_holds_total{service=\"chat\"} 0\n"));
        // Two services name the region: one copy of its id.
        series.set_region_shed_level("other", "eu", 1);
        assert_eq!(series.rows.lock().unwrap().regions.len(), 1);
        series.forget("other");
        assert_eq!(
            series.rows.lock().unwrap().regions.len(),
            1,
            "chat names it"
        );
        series.forget("chat");
        assert!(series.rows.lock().unwrap().regions.is_empty());
        answers.inc();
        let mut text = String::new();
        series.encode(&mut text);
        assert!(!text.contains("chat"), "{text}");
        assert_eq!(answers.get(), 2);
    }
}
