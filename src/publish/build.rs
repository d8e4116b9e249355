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

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::fleet::Overlay;
use super::{Dynamic, EndpointHealth, Loaded, SKIPPED_FULL, layer_state, silence_reason};
use crate::capacity::Level;
use crate::config::Strategy;
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
    /// Built from `previous`: service `i` is the same service in both.
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
    };
    let geo = GeoView::new(
        geo,
        loaded.overrides.clone(),
        config,
        previous.map(|(_, snapshot)| &snapshot.geo),
    );
    let previous = previous.filter(|(before, snapshot)| {
        before.endpoints.len() == built.endpoints.len()
            && before.loads.len() == built.loads.len()
            && before.levels.len() == built.levels.len()
            && snapshot.services.len() == config.services.len()
            && snapshot.service_views.len() == config.services.len()
            && snapshot.wire.services.len() == config.services.len()
    });
    let changes = previous.map(|(before, _)| Changes::between(before, &built, loaded));
    let mut services = Vec::with_capacity(config.services.len());
    let mut service_views = Vec::with_capacity(config.services.len());
    let mut compiled = Vec::new();
    let mut wires = Vec::with_capacity(config.services.len());
    for i in 0..config.services.len() {
        if let (Some((_, snapshot)), Some(changes)) = (previous, &changes)
            && !changes.touch(i, loaded, &built)
        {
            services.push(snapshot.services[i].clone());
            service_views.push(snapshot.service_views[i].clone());
            wires.push(snapshot.wire.services[i].clone());
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
        incremental: changes.is_some(),
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
