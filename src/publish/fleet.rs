//! The publisher's side of the fleet: the peers' last views, this edge's
//! own observations for them, and the combined state of every endpoint
//! that the next snapshot is built from.
//!
//! The combination is an overlay on this edge's health: with `quorum =
//! "local"` (or no peers) there is none and nothing changes.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{EndpointHealth, EndpointInfo, Loaded, Publisher, layer_state};
use crate::fleet::{
    EndpointObs, EndpointQuorum, FleetView, LayerObs, Observations, PeerStatus, PeerView, Quorum,
    RegionObs, VantageView, Verdict, decide, fleet_state, pull::Pulled,
};
use crate::health::{Layer, Status};
use crate::model::RegionLoad;

/// One endpoint's state as the fleet decides it.
#[derive(Debug, Clone)]
pub(super) struct Overlay {
    pub alive: Status,
    pub models: Status,
    pub completion: Status,
    /// The model list that counts: this edge's, or (when only peers read
    /// one) the first fresh peer's that did.
    pub model_list: Option<Arc<[String]>>,
    /// Why the answer differs from this edge's own view (explain).
    pub note: Option<String>,
    pub view: EndpointQuorum,
}

/// The peers of `loaded`'s fleet, keeping what `old` knew of those that stay.
pub(super) fn peer_views(loaded: &Loaded, mut old: Vec<PeerView>) -> Vec<PeerView> {
    loaded
        .config
        .fleet
        .peers
        .iter()
        .map(|p| {
            let mut view = match old.iter().position(|o| o.name == p.name && o.url == p.url) {
                Some(i) => old.swap_remove(i),
                None => PeerView::new(p.name.clone(), p.url.clone()),
            };
            view.index(
                &loaded.endpoint_by_key,
                loaded.info.len(),
                &loaded.region_by_id,
            );
            view
        })
        .collect()
}

fn status_name(s: Status) -> &'static str {
    match s {
        Status::Up => "up",
        Status::Down => "down",
        Status::Unknown => "unknown",
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Publisher {
    fn combining(&self) -> bool {
        let fleet = &self.loaded.config.fleet;
        !fleet.peers.is_empty() && fleet.quorum != Quorum::Local
    }

    /// Applies a pull; true when the combined state or the fleet state moved.
    pub(super) fn apply_peer(&mut self, pulled: Pulled) -> bool {
        let now = Instant::now();
        let before = self.fleet_marks(now);
        let Some(peer) = self.peers.iter_mut().find(|p| p.name == pulled.peer) else {
            // A peer that a reload removed.
            return false;
        };
        let m = &self.metrics;
        m.fleet_pull_bytes
            .with_label_values(&[peer.name.as_str()])
            .inc_by(pulled.bytes);
        peer.bytes += pulled.bytes;
        match pulled.result {
            Ok(obs) => {
                m.fleet_pulls
                    .with_label_values(&[peer.name.as_str(), "ok"])
                    .inc();
                peer.pulls_ok += 1;
                if peer.last_error.take().is_some() {
                    tracing::info!(peer = %peer.name, "Fleet peer answers again.");
                }
                peer.last = Some((Arc::new(obs), now));
                peer.index(
                    &self.loaded.endpoint_by_key,
                    self.loaded.info.len(),
                    &self.loaded.region_by_id,
                );
            }
            Err(e) => {
                m.fleet_pulls
                    .with_label_values(&[peer.name.as_str(), "error"])
                    .inc();
                peer.pulls_failed += 1;
                if peer.last_error.as_deref() != Some(e.as_str()) {
                    // Once per new error, not per pull.
                    tracing::warn!(peer = %peer.name, url = %peer.url, error = %e, "Fleet peer pull failed; its last views count until they expire.");
                }
                peer.last_error = Some(e);
            }
        }
        before != self.fleet_marks(now)
    }

    /// What a snapshot takes from the fleet, to tell whether a pull moved it.
    fn fleet_marks(&self, now: Instant) -> (&'static str, Vec<Option<f64>>, Vec<Option<Marks>>) {
        let state = self.fleet_state_at(now);
        if self.peers.is_empty() {
            return (state, Vec::new(), Vec::new());
        }
        let loads = (0..self.loaded.config.regions.len())
            .map(|r| self.region_load(r, now).util)
            .collect();
        let overlay = self
            .overlay(now)
            .into_iter()
            .map(|o| {
                o.map(|o| Marks {
                    alive: o.alive,
                    models: o.models,
                    completion: o.completion,
                    model_list: o.model_list,
                })
            })
            .collect();
        (state, loads, overlay)
    }

    fn fresh_peers(&self, now: Instant) -> usize {
        let expiry = self.loaded.config.fleet.expiry;
        self.peers.iter().filter(|p| p.fresh(now, expiry)).count()
    }

    fn fleet_state_at(&self, now: Instant) -> &'static str {
        let edges = self.peers.len() + 1;
        fleet_state(
            self.loaded.config.fleet.quorum,
            edges,
            self.fresh_peers(now) + 1,
        )
    }

    /// Sets the fleet gauges and says when the fleet state changes (a WARN
    /// when this edge is left deciding alone). Called on every publish.
    pub(super) fn note_fleet(&mut self, now: Instant) {
        if self.peers.is_empty() {
            return;
        }
        let expiry = self.loaded.config.fleet.expiry;
        for p in &self.peers {
            self.metrics
                .fleet_peer_fresh
                .with_label_values(&[p.name.as_str()])
                .set(i64::from(p.fresh(now, expiry)));
        }
        let fresh = self.fresh_peers(now) + 1;
        let state = self.fleet_state_at(now);
        self.metrics.fleet_vantage_points.set(fresh as i64);
        self.metrics
            .fleet_local_fallback
            .set(i64::from(state == "local" && self.combining()));
        if state == self.fleet_state {
            return;
        }
        let quorum = self.loaded.config.fleet.quorum.name();
        let edges = self.peers.len() + 1;
        if state == "local" && self.combining() {
            tracing::warn!(quorum = %quorum, fresh, edges, "Too few fleet peers are fresh for the quorum; this edge decides from its own view.");
        } else {
            tracing::info!(state, quorum = %quorum, fresh, edges, "Fleet state changed.");
        }
        self.fleet_state = state;
    }

    /// When each peer's views expire.
    pub(super) fn fleet_deadlines(&self, mut each: impl FnMut(Instant)) {
        let fleet = &self.loaded.config.fleet;
        for p in &self.peers {
            if let Some(at) = p.expires(fleet.expiry) {
                each(at);
            }
            // A peer's load report of a region expires as this edge's would.
            for (r, region) in self.loaded.config.regions.iter().enumerate() {
                if let Some((_, at)) = p.region(r) {
                    each(at + region.capacity.max_age);
                }
            }
        }
    }

    /// `local` (read by this edge at `at`) or a fresh peer's report of
    /// region `r` if that one is newer: the freshest wins.
    pub(super) fn freshest_region_load(
        &self,
        r: usize,
        now: Instant,
        local: RegionLoad,
        at: Option<Instant>,
    ) -> RegionLoad {
        let fleet = &self.loaded.config.fleet;
        let max_age = self.loaded.config.regions[r].capacity.max_age;
        let mut best = (local, at);
        for p in self.peers.iter().filter(|p| p.fresh(now, fleet.expiry)) {
            let Some((report, read)) = p.region(r) else {
                continue;
            };
            if now.saturating_duration_since(read) >= max_age || best.1.is_some_and(|b| b >= read) {
                continue;
            }
            best = (
                RegionLoad {
                    util: Some(report.utilization),
                    gpus: if report.gpus > 0.0 {
                        report.gpus
                    } else {
                        local.gpus
                    },
                    ..local
                },
                Some(read),
            );
        }
        best.0
    }

    /// This edge's own observations (never the combined ones), for peers.
    pub(super) fn observations(&self, now: Instant) -> Observations {
        let endpoints = self
            .health
            .iter()
            .zip(&self.loaded.info)
            .map(|(h, info)| own_view(h, info, now))
            .collect();
        let regions = self
            .loaded
            .config
            .regions
            .iter()
            .enumerate()
            .filter_map(|(r, region)| {
                let (load, at) = self.local_region_load(r, now);
                Some(RegionObs {
                    id: region.id.clone(),
                    utilization: load.util?,
                    gpus: load.gpus,
                    age_ms: ms(now.saturating_duration_since(at?)),
                })
            })
            .collect();
        Observations {
            edge: self.loaded.config.fleet.edge.clone(),
            endpoints,
            regions,
        }
    }

    /// The fleet now, for status; `None` without peers.
    pub(super) fn fleet_view(&self, now: Instant) -> Option<FleetView> {
        if self.peers.is_empty() {
            return None;
        }
        let fleet = &self.loaded.config.fleet;
        let peers = self
            .peers
            .iter()
            .map(|p| PeerStatus {
                name: p.name.clone(),
                url: p.url.clone(),
                fresh: p.fresh(now, fleet.expiry),
                age_s: p
                    .last
                    .as_ref()
                    .map(|(_, at)| now.saturating_duration_since(*at).as_secs_f64()),
                last_error: p.last_error.clone(),
                pulls_ok: p.pulls_ok,
                pulls_failed: p.pulls_failed,
                bytes: p.bytes,
            })
            .collect();
        Some(FleetView {
            edge: fleet.edge.clone(),
            quorum: fleet.quorum.name(),
            edges: self.peers.len() + 1,
            fresh: self.fresh_peers(now) + 1,
            state: self.fleet_state_at(now),
            peers,
        })
    }

    /// The combined state of every endpoint (by global index); empty when
    /// this edge decides alone.
    pub(super) fn overlay(&self, now: Instant) -> Vec<Option<Overlay>> {
        if !self.combining() {
            return Vec::new();
        }
        let fleet = &self.loaded.config.fleet;
        let (quorum, edges) = (fleet.quorum, self.peers.len() + 1);
        let fresh: Vec<bool> = self
            .peers
            .iter()
            .map(|p| p.fresh(now, fleet.expiry))
            .collect();
        self.health
            .iter()
            .zip(&self.loaded.info)
            .enumerate()
            .map(|(g, (h, info))| {
                let own = own_view(h, info, now);
                let seen: Vec<&EndpointObs> = self
                    .peers
                    .iter()
                    .zip(&fresh)
                    .filter(|(_, fresh)| **fresh)
                    .filter_map(|(p, _)| p.endpoint(g))
                    .collect();
                let layer = |of: fn(&EndpointObs) -> Option<LayerObs>| -> Verdict {
                    let local = of(&own).map_or(Status::Unknown, |l| l.state);
                    let peers = seen
                        .iter()
                        .map(|e| of(e).map_or(Status::Unknown, |l| l.state));
                    decide(quorum, edges, local, peers)
                };
                let alive = layer(|e| Some(e.alive));
                let models = layer(|e| e.models);
                let completion = layer(|e| e.completion);
                // A list read by a peer counts only when this edge has none.
                let model_list =
                    if models.status == Status::Up && h.models_state.status != Status::Up {
                        seen.iter()
                            .filter(|e| e.models.is_some_and(|l| l.state == Status::Up))
                            .find_map(|e| e.model_list.as_deref())
                            .map(Arc::from)
                            .or_else(|| h.models.clone())
                    } else {
                        h.models.clone()
                    };
                let local_alive = own.alive.state;
                let note = (alive.status != local_alive).then(|| {
                    format!(
                        "quorum {}: {} of {} vantage points see it up (this edge: {})",
                        quorum.name(),
                        alive.up,
                        alive.voters,
                        status_name(local_alive)
                    )
                });
                let mut views = vec![vantage(&fleet.edge, &own, Duration::ZERO, false)];
                for (p, fresh) in self.peers.iter().zip(&fresh) {
                    if let (Some(e), Some((_, at))) = (p.endpoint(g), &p.last) {
                        views.push(vantage(
                            &p.name,
                            e,
                            now.saturating_duration_since(*at),
                            !fresh,
                        ));
                    }
                }
                Some(Overlay {
                    alive: alive.status,
                    models: models.status,
                    completion: completion.status,
                    model_list,
                    note,
                    view: EndpointQuorum {
                        quorum: quorum.name(),
                        result: alive.status,
                        voters: alive.voters,
                        up: alive.up,
                        local_fallback: alive.local,
                        views,
                    },
                })
            })
            .collect()
    }
}

/// What the fleet's overlay sets of an endpoint (compared between pulls).
#[derive(Debug, PartialEq)]
struct Marks {
    alive: Status,
    models: Status,
    completion: Status,
    model_list: Option<Arc<[String]>>,
}

/// A vantage point's view of an endpoint, `pulled` ago.
fn vantage(edge: &str, e: &EndpointObs, pulled: Duration, stale: bool) -> VantageView {
    let age = [Some(e.alive), e.models, e.completion]
        .into_iter()
        .flatten()
        .map(|l| l.age_ms)
        .max()
        .unwrap_or(0);
    VantageView {
        edge: edge.to_string(),
        alive: e.alive.state,
        models: e.models.map(|l| l.state),
        completion: e.completion.map(|l| l.state),
        age_s: pulled.as_secs_f64() + age as f64 / 1000.0,
        stale,
    }
}

/// This edge's own view of one endpoint: each probed layer's state (unknown
/// while its probe is silent) and how long ago it reported.
fn own_view(h: &EndpointHealth, info: &EndpointInfo, now: Instant) -> EndpointObs {
    let silent = h.silent(info, now).map(|(layer, _)| layer);
    let layer = |l: Layer| -> Option<LayerObs> {
        info.layers.contains(&l).then(|| LayerObs {
            state: if silent == Some(l) {
                Status::Unknown
            } else {
                layer_state(h, l).status
            },
            age_ms: h
                .heard
                .iter()
                .find(|(at, _)| *at == l)
                .map_or(0, |(_, at)| ms(now.saturating_duration_since(*at))),
        })
    };
    EndpointObs {
        region: info.region.clone(),
        target: info.target.clone(),
        alive: layer(Layer::Alive).unwrap_or(LayerObs {
            state: Status::Unknown,
            age_ms: 0,
        }),
        models: layer(Layer::Models),
        completion: layer(Layer::Completion),
        model_list: h.models.as_deref().map(<[String]>::to_vec),
        error: h.last_error.as_ref().map(|e| e.kind().to_string()),
        // Hundredths of a millisecond are plenty, and a third of the bytes.
        rtt_ms: h.latency_ms.map(|v| (v * 100.0).round() / 100.0),
        ttft_ms: h.completion_ms.map(|v| (v * 100.0).round() / 100.0),
    }
}
