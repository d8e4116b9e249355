//! Building the next snapshot from the loaded config, health and overrides.
//!
//! Owns: turning the publisher's state into [`EndpointInput`]s, and the
//! record of what the last snapshot was built from, so that a build
//! recompiles only the services whose inputs changed and shares the rest
//! (an `Arc` each) with the snapshot before. With 10,000 services one
//! endpoint's change recompiles the few services over its region, not all.
//!
//! A service's answer is a pure function of the config, the inputs of the
//! endpoints of its regions, the loads (and, for proximity, the measured
//! latency) of those regions, and its shedding levels and TTL; those are
//! exactly what is compared here. Must not log or touch metrics beyond the
//! answer counters the model asks for.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::fleet::Overlay;
use super::{Dynamic, EndpointHealth, Loaded, SKIPPED_FULL, layer_state, silence_reason};
use crate::capacity::Level;
use crate::config::{Config, Region, Service, Strategy, Target};
use crate::geo::GeoDb;
use crate::health::{Layer, Status};
use crate::metrics::Metrics;
use crate::model::{
    self, EndpointInput, EndpointView, GeoView, RegionInputs, RegionLoad, Snapshot,
};

/// One endpoint's input to the service answers, owned, without its latency
/// (which matters only to services with `max-latency`, compared apart).
#[derive(Debug, Clone, PartialEq)]
struct InputMark {
    status: Status,
    last_error: Option<String>,
    drained: bool,
    cooling_s: Option<f64>,
    models: Option<Vec<String>>,
    completion_ok: bool,
    completion_model: Option<String>,
    slow_start: f64,
    silent: Option<String>,
    layers_pending: bool,
    fit_ago: Option<Duration>,
    last_models: Option<Vec<String>>,
}

impl InputMark {
    fn of(input: &EndpointInput<'_>) -> Self {
        let EndpointInput {
            status,
            last_error,
            drained,
            cooling_s,
            models,
            completion_ok,
            completion_model,
            slow_start,
            latency_ms: _,
            silent,
            layers_pending,
            fit_ago,
            last_models,
        } = *input;
        InputMark {
            status,
            last_error: last_error.map(str::to_string),
            drained,
            cooling_s,
            models: models.map(<[String]>::to_vec),
            completion_ok,
            completion_model: completion_model.map(str::to_string),
            slow_start,
            silent: silent.map(str::to_string),
            layers_pending,
            fit_ago,
            last_models: last_models.map(<[String]>::to_vec),
        }
    }
}

/// What the published snapshot's services were built from.
pub(super) struct Built {
    endpoints: Vec<InputMark>,
    latency: Vec<Option<f64>>,
    loads: Vec<RegionLoad>,
    region_latency: Vec<f64>,
    levels: Vec<Level>,
    ttls: Vec<u32>,
    /// `None`: service `i` is service `i` of the snapshot built from this.
    /// After a reload ([`Built::carried`]): where service `i` of the new
    /// config is in that snapshot, `None` for one to compile anew.
    carried: Option<Vec<Option<usize>>>,
}

impl Built {
    /// Where service `i` was in the snapshot built from this.
    fn source(&self, i: usize) -> Option<usize> {
        match &self.carried {
            None => Some(i),
            Some(carried) => carried.get(i).copied().flatten(),
        }
    }

    /// This build as seen from the config of a reload (`next`, from `old`),
    /// so that the first build after the reload compiles only the services
    /// that changed; `None` when every service must be compiled.
    ///
    /// A service keeps its answer when everything outside the services is
    /// unchanged (regions, endpoints in the same order with the same probe
    /// ids, zone, server, GeoIP settings, overrides, rate limit, fleet),
    /// its own settings are the same (its fallback named by id and name, as
    /// an index moves when services are added or removed) and it has no
    /// rollout (whose phase a reload may reset). The build then compares
    /// its inputs as for any other build.
    /// `before`: the index of each service of `old` by id.
    pub(super) fn carried(
        self,
        old: &Loaded,
        next: &Loaded,
        before: &HashMap<&str, usize>,
    ) -> Option<Built> {
        if old.ids != next.ids || !same_but_services(&old.config, &next.config) {
            return None;
        }
        let carried: Vec<Option<usize>> = next
            .config
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let j = *before.get(s.id.as_str())?;
                (self.source(j).is_some()
                    && s.rollout.is_none()
                    && same_service(&old.config, j, &next.config, i))
                .then_some(j)
            })
            .collect();
        if carried.iter().all(Option::is_none) {
            return None;
        }
        // Per-service state in the new config's layout (the spans of a
        // carried service have the same length: its tiers are the same).
        let mut levels = Vec::with_capacity(next.service_regions.len());
        let mut ttls = Vec::with_capacity(carried.len());
        for (i, from) in carried.iter().enumerate() {
            let span = next.service_span[i].clone();
            match from {
                Some(j) => {
                    levels.extend_from_slice(&self.levels[old.service_span[*j].clone()]);
                    ttls.push(self.ttls[*j]);
                }
                None => {
                    levels.extend(span.map(|_| Level::Normal));
                    ttls.push(0);
                }
            }
        }
        // Sources in the snapshot, which is in `old`'s layout.
        let carried = carried
            .into_iter()
            .map(|j| j.and_then(|j| self.source(j)))
            .collect();
        Some(Built {
            levels,
            ttls,
            carried: Some(carried),
            ..self
        })
    }
}

/// The two configs are the same but for their services. Names are
/// compared with their case too (`==` on a DNS name ignores it, but an
/// answer carries the name as written).
fn same_but_services(a: &Config, b: &Config) -> bool {
    let Config {
        server,
        zone,
        regions,
        services: _,
        geo,
        overrides,
        rrl,
        fleet,
    } = a;
    *server == b.server
        && *zone == b.zone
        && zone.apex.eq_case(&b.zone.apex)
        && *regions == b.regions
        && same_case_targets(regions, &b.regions)
        && *geo == b.geo
        && *overrides == b.overrides
        && *rrl == b.rrl
        && *fleet == b.fleet
}

/// The CNAME targets of the endpoints of equal regions have the same case.
fn same_case_targets(a: &[Region], b: &[Region]) -> bool {
    a.iter().zip(b).all(|(x, y)| {
        x.endpoints
            .iter()
            .zip(&y.endpoints)
            .all(|(e, f)| match (&e.target, &f.target) {
                (Target::Cname(m), Target::Cname(n)) => m.eq_case(n),
                _ => true,
            })
    })
}

/// Service `i` of `a` and service `j` of `b` have the same settings; their
/// fallbacks (indexes into each config's services) are compared by id and
/// name, what an answer takes from them. Names with their case.
fn same_service(a: &Config, i: usize, b: &Config, j: usize) -> bool {
    fn fallback(c: &Config, f: Option<usize>) -> Option<&Service> {
        f.map(|f| &c.services[f])
    }
    let same_fallback = match (
        fallback(a, a.services[i].fallback),
        fallback(b, b.services[j].fallback),
    ) {
        (None, None) => true,
        (Some(x), Some(y)) => x.id == y.id && x.name.eq_case(&y.name),
        _ => false,
    };
    let Service {
        id,
        name,
        tiers,
        ttl,
        when_all_down,
        last_known_good,
        strategy,
        residency,
        model,
        fallback: _,
        max_latency,
        records,
        sticky,
        watermarks,
        shed,
        shed_set,
        criticality,
        rollout,
        ttl_min,
    } = &a.services[i];
    let t = &b.services[j];
    *id == t.id
        && name.eq_case(&t.name)
        && *tiers == t.tiers
        && *ttl == t.ttl
        && *when_all_down == t.when_all_down
        && *last_known_good == t.last_known_good
        && *strategy == t.strategy
        && *residency == t.residency
        && *model == t.model
        && same_fallback
        && *max_latency == t.max_latency
        && *records == t.records
        && *sticky == t.sticky
        && *watermarks == t.watermarks
        && *shed == t.shed
        && *shed_set == t.shed_set
        && *criticality == t.criticality
        && *rollout == t.rollout
        && *ttl_min == t.ttl_min
}

/// Everything a build reads.
pub(super) struct BuildInputs<'a> {
    pub loaded: &'a Loaded,
    pub health: &'a [EndpointHealth],
    pub drained: &'a BTreeSet<String>,
    pub generation: u64,
    pub geo: Option<Arc<GeoDb>>,
    pub dynamic: Dynamic,
    pub metrics: &'a Metrics,
    /// The fleet's combined state per endpoint; empty: this edge's own.
    pub overlay: &'a [Option<Overlay>],
    /// The phase of each service's rollout, by service id (a service
    /// with a rollout and no entry is in its canary phase).
    pub rollouts: &'a std::collections::HashMap<String, model::rollout::Phase>,
}

/// A new snapshot, what it was built from, and the indexes of the
/// services compiled anew (every one without a previous build).
pub(super) struct BuildOutput {
    pub snapshot: Snapshot,
    pub built: Built,
    pub compiled: Vec<usize>,
    /// Built from `previous` of the same config: service `i` is the same
    /// service in both (after a reload services are matched by id, even
    /// when most were carried over).
    pub incremental: bool,
}

/// Builds a snapshot. With `previous` (the last build of the same config
/// and the snapshot it made), a service whose inputs are unchanged keeps
/// its answer and view from that snapshot.
pub(super) fn build(cx: BuildInputs<'_>, previous: Option<(&Built, &Snapshot)>) -> BuildOutput {
    let BuildInputs {
        loaded,
        health,
        drained,
        generation,
        geo,
        dynamic,
        metrics,
        overlay,
        rollouts,
    } = cx;
    let over = |g: usize| overlay.get(g).and_then(Option::as_ref);
    let config = &loaded.config;
    let errors: Vec<Option<String>> = health
        .iter()
        .enumerate()
        .map(|(g, h)| match over(g).and_then(|o| o.note.clone()) {
            Some(note) => Some(note),
            None => h.last_error.as_ref().map(ToString::to_string),
        })
        .collect();
    let now = Instant::now();
    let silent: Vec<Option<String>> = health
        .iter()
        .zip(&loaded.info)
        .map(|(h, info)| {
            h.silent(info, now)
                .map(|(layer, limit)| silence_reason(layer, limit))
        })
        .collect();
    let inputs: Vec<EndpointInput<'_>> = health
        .iter()
        .zip(&loaded.info)
        .zip(&errors)
        .zip(&silent)
        .zip(&dynamic.fit_ago)
        .enumerate()
        .map(|(g, ((((h, info), error), silent), fit_ago))| {
            // The fleet's state of each layer where it decides, else this edge's.
            let o = over(g);
            let (alive, models_status, completion_status) = match o {
                Some(o) => (o.alive, o.models, o.completion),
                None => (
                    h.state.status,
                    h.models_state.status,
                    h.completion_state.status,
                ),
            };
            let model_list = match o {
                Some(o) => o.model_list.as_deref(),
                None => h.models.as_deref(),
            };
            EndpointInput {
                status: alive,
                last_error: error.as_deref(),
                drained: drained.contains(&info.region),
                cooling_s: h
                    .cooling_until
                    .filter(|u| *u > now)
                    .map(|u| (u - now).as_secs_f64()),
                models: info
                    .layers
                    .contains(&Layer::Models)
                    .then(|| match models_status {
                        Status::Up => model_list.unwrap_or(&[]),
                        _ => &[],
                    }),
                completion_ok: !info.layers.contains(&Layer::Completion)
                    || completion_status == Status::Up,
                completion_model: info.completion_model.as_deref(),
                layers_pending: (info.layers.contains(&Layer::Models)
                    && models_status == Status::Unknown)
                    || (info.layers.contains(&Layer::Completion)
                        && completion_status == Status::Unknown),
                slow_start: h
                    .up_since
                    .filter(|_| !info.slow_start.is_zero())
                    .map(|since| {
                        ((now - since).as_secs_f64() / info.slow_start.as_secs_f64())
                            .clamp(0.1, 1.0)
                    })
                    .unwrap_or(1.0),
                latency_ms: h.completion_ms.or(h.latency_ms),
                silent: silent.as_deref(),
                fit_ago: *fit_ago,
                last_models: info
                    .layers
                    .contains(&Layer::Models)
                    .then(|| h.models.as_deref().unwrap_or(&[])),
            }
        })
        .collect();
    let built = Built {
        endpoints: inputs.iter().map(InputMark::of).collect(),
        latency: inputs.iter().map(|i| i.latency_ms).collect(),
        loads: dynamic.loads,
        region_latency: dynamic.latency_ms,
        levels: dynamic.levels,
        ttls: dynamic.ttls,
        carried: None,
    };
    let geo = GeoView::new(
        geo,
        loaded.overrides.clone(),
        config,
        previous.map(|(_, snapshot)| &snapshot.geo),
    );
    let previous = previous.filter(|(before, snapshot)| {
        let n = snapshot.services.len();
        before.endpoints.len() == built.endpoints.len()
            && before.loads.len() == built.loads.len()
            && before.levels.len() == built.levels.len()
            && before.ttls.len() == config.services.len()
            && snapshot.service_views.len() == n
            && snapshot.wire.services.len() == n
            && match &before.carried {
                None => n == config.services.len(),
                Some(carried) => carried.iter().flatten().all(|&j| j < n),
            }
    });
    let changes = previous.map(|(before, _)| Changes::between(before, &built, loaded));
    let mut services = Vec::with_capacity(config.services.len());
    let mut service_views = Vec::with_capacity(config.services.len());
    let mut compiled = Vec::new();
    let mut wires = Vec::with_capacity(config.services.len());
    for i in 0..config.services.len() {
        if let (Some((before, snapshot)), Some(changes)) = (previous, &changes)
            && let Some(j) = before.source(i)
            && !changes.touch(i, loaded, &built)
        {
            services.push(snapshot.services[j].clone());
            service_views.push(snapshot.service_views[j].clone());
            wires.push(snapshot.wire.services[j].clone());
            continue;
        }
        let span = loaded.service_span[i].clone();
        let regions = RegionInputs {
            latency_ms: &built.region_latency,
            loads: &built.loads,
            regions: &loaded.service_regions[span.clone()],
            levels: &built.levels[span],
            ttl: built.ttls[i],
            criticality: config.services[i].criticality,
        };
        let s = &config.services[i];
        let (answer, view) = match &s.rollout {
            Some(_) => model::rollout::rollout_answer(
                config,
                &loaded.index,
                i,
                &inputs,
                &regions,
                metrics,
                rollouts
                    .get(&s.id)
                    .unwrap_or(&model::rollout::Phase::Canary),
            ),
            None => model::service_answer(config, &loaded.index, i, &inputs, &regions, metrics),
        };
        wires.push(Arc::new(crate::dns::wire::compile_service(&answer)));
        services.push(Arc::new(answer));
        service_views.push(Arc::new(view));
        compiled.push(i);
    }
    let endpoints = health
        .iter()
        .zip(&loaded.info)
        .zip(errors)
        .zip(silent)
        .enumerate()
        .map(|(g, (((h, info), last_error), silent))| EndpointView {
            region: info.region.clone(),
            target: info.target.clone(),
            probe: info.probe.clone(),
            status: over(g).map_or(h.state.status, |o| o.alive),
            quorum: over(g).map(|o| o.view.clone()),
            layers: info
                .layers
                .iter()
                .filter(|l| **l != Layer::Metrics)
                .map(|l| (crate::metrics::layer_label(*l), layer_state(h, *l).status))
                .collect(),
            drained: drained.contains(&info.region),
            models: h.models.as_deref().map(<[String]>::to_vec),
            cooling: h.cooling_until.is_some_and(|u| u > now),
            latency_ms: h.completion_ms.or(h.latency_ms),
            last_error,
            silent,
            skipped: h.completion_skipped.then(|| SKIPPED_FULL.to_string()),
            since_unix_s: h
                .since
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
        })
        .collect();
    let nsid = &config.server.nsid;
    let snapshot = Snapshot {
        generation,
        id: Snapshot::next_id(),
        built: SystemTime::now(),
        zone: loaded.zone.clone(),
        services,
        service_views,
        endpoints,
        drained: drained.iter().cloned().collect(),
        queries: loaded.queries.clone(),
        nsid: (!nsid.is_empty()).then(|| nsid.as_bytes().to_vec()),
        explain_acl: loaded.explain_acl.clone(),
        geo,
        region_loads: config
            .regions
            .iter()
            .zip(&built.loads)
            .map(|(r, l)| (r.id.clone(), l.util, l.gpus))
            .collect(),
        rrl: config.rrl.clone().map(Arc::new),
        choice_seed: config.fleet.seed,
        wire: crate::model::wire::Wire {
            names: loaded.wire_names.clone(),
            services: wires,
        },
    };
    BuildOutput {
        snapshot,
        built,
        compiled,
        incremental: previous.is_some_and(|(before, _)| before.carried.is_none()),
    }
}

/// What changed between two builds of the same config, by region.
struct Changes<'a> {
    before: &'a Built,
    /// An endpoint's input (latency apart) or the region's load changed.
    region: Vec<bool>,
    /// The region's measured latency changed (proximity reads it).
    latency: Vec<bool>,
}

impl<'a> Changes<'a> {
    fn between(before: &'a Built, now: &Built, loaded: &Loaded) -> Self {
        let region = loaded
            .region_endpoints
            .iter()
            .zip(before.loads.iter().zip(&now.loads))
            .map(|(range, (a, b))| {
                a != b || before.endpoints[range.clone()] != now.endpoints[range.clone()]
            })
            .collect();
        let latency = before
            .region_latency
            .iter()
            .zip(&now.region_latency)
            .map(|(a, b)| a != b)
            .collect();
        Changes {
            before,
            region,
            latency,
        }
    }

    /// Whether service `i` must be compiled again.
    fn touch(&self, i: usize, loaded: &Loaded, now: &Built) -> bool {
        let s = &loaded.config.services[i];
        let span = loaded.service_span[i].clone();
        let regions = &loaded.service_regions[span.clone()];
        if self.before.ttls[i] != now.ttls[i]
            || self.before.levels[span.clone()] != now.levels[span]
            || regions.iter().any(|&r| self.region[r])
        {
            return true;
        }
        if matches!(s.strategy, Strategy::Proximity { .. })
            && regions.iter().any(|&r| self.latency[r])
        {
            return true;
        }
        // Latency moves the answer only across the service's `max-latency`.
        let Some(max) = s.max_latency.map(|d| d.as_secs_f64() * 1000.0) else {
            return false;
        };
        let slow = |l: Option<f64>| l.is_some_and(|l| l > max);
        regions.iter().any(|&r| {
            loaded.region_endpoints[r]
                .clone()
                .any(|e| slow(self.before.latency[e]) != slow(now.latency[e]))
        })
    }
}
