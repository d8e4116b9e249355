//! The admin HTTP API (loopback by default).
//!
//! Owns: the HTTP routes for health, status, metrics, explain, drain,
//! reload and the log level. Reads snapshots; changes go to the publisher
//! or the reloader as messages. Mutating routes need the bearer token (the
//! read routes too with `admin-token-for-reads`); connections, request heads
//! and bodies are bounded in number, size and time ([`serve`]); errors are
//! JSON with a reason. No secret is ever part of a response, a log line or
//! a metric. Must not be on the DNS query path. [`client`] is the other
//! end: `inferdns status` and `inferdns explain`.

mod auth;
pub mod client;
mod explain;
mod serve;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::app::Control;
use crate::capacity::PushReport;
use crate::config::AdminLimits;
use crate::metrics::Metrics;
use crate::model::Snapshot;
use crate::publish::Msg;

pub use auth::{AdminAuth, refuse_exposed};
pub use explain::ExplainQuery;
pub use serve::MAX_HEADERS;

/// Largest request body accepted by any route.
pub const MAX_BODY: usize = 16 * 1024;

/// What the admin handlers can see.
#[derive(Clone)]
pub struct AdminState {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// True once the first snapshot with probe results is published and the
    /// DNS listeners serve.
    pub ready: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    pub control: Control,
}

/// The routes; request bodies are read within `body_timeout`.
pub fn router(state: AdminState, body_timeout: Duration) -> Router {
    let mutating = Router::new()
        .route("/v1/regions/{id}/drain", post(drain))
        .route("/v1/regions/{id}/undrain", post(undrain))
        .route("/v1/regions/{id}/capacity", post(push_capacity))
        .route("/v1/services/{id}/promote", post(promote))
        .route("/v1/services/{id}/rollback", post(rollback))
        .route("/v1/reload", post(reload))
        .route("/v1/log-level", post(log_level))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    // Everything but the liveness and readiness checks.
    let reads = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/explain", get(explain::explain))
        .route("/v1/log-level", get(current_log_level))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_read_token,
        ));
    let fleet = Router::new()
        .route(crate::config::fleet::OBSERVATIONS_PATH, get(observations))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_fleet_token,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(fleet)
        .route("/readyz", get(readyz))
        .merge(reads)
        .merge(mutating)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .layer(middleware::from_fn_with_state(
            body_timeout,
            serve::read_body_in_time,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(json_errors))
        .with_state(state)
}

/// A JSON error with a reason.
pub fn error(status: StatusCode, reason: impl Into<String>) -> Response {
    (status, Json(json!({ "error": reason.into() }))).into_response()
}

async fn readyz(State(state): State<AdminState>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

fn age_s(snap: &Snapshot) -> f64 {
    SystemTime::now()
        .duration_since(snap.built)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Sends the publisher the message `make` builds around a reply channel
/// and waits for the reply; a 503 when the server is shutting down.
async fn ask<T>(
    state: &AdminState,
    make: impl FnOnce(oneshot::Sender<T>) -> Msg,
) -> Result<T, Response> {
    let gone = || error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    let (done, result) = oneshot::channel();
    if state.control.publisher.send(make(done)).await.is_err() {
        return Err(gone());
    }
    result.await.map_err(|_| gone())
}

/// A publisher's reply to a change: the generation that serves it as JSON
/// (`fields` besides it), or a 404 with the reason it was refused.
fn changed(reply: Result<Result<u64, String>, Response>, fields: serde_json::Value) -> Response {
    match reply {
        Ok(Ok(generation)) => {
            let mut body = fields;
            body["generation"] = json!(generation);
            Json(body).into_response()
        }
        Ok(Err(reason)) => error(StatusCode::NOT_FOUND, reason),
        Err(response) => response,
    }
}

/// This edge's own observations, for its fleet peers.
async fn observations(State(state): State<AdminState>, headers: axum::http::HeaderMap) -> Response {
    let obs = match ask(&state, Msg::Observe).await {
        Ok(obs) => obs,
        Err(response) => return response,
    };
    let json = match serde_json::to_vec(&obs) {
        Ok(json) => json,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    // Peers ask for gzip (the JSON repeats itself endpoint after endpoint);
    // curl and browsers that do not ask get it plain.
    let gzip = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim().starts_with("gzip")));
    let json_type = (header::CONTENT_TYPE, "application/json");
    if gzip && let Ok(body) = crate::fleet::gzip(&json) {
        return ([json_type, (header::CONTENT_ENCODING, "gzip")], body).into_response();
    }
    ([json_type], json).into_response()
}

/// The fleet as the publisher sees it now (`None` without peers).
async fn fleet_view(state: &AdminState) -> Option<crate::fleet::FleetView> {
    ask(state, Msg::Fleet).await.ok().flatten()
}

async fn status(State(state): State<AdminState>) -> Json<serde_json::Value> {
    let fleet = fleet_view(&state).await;
    let snap = state.snapshot.load_full();
    // Regions in config order, with their endpoint counts.
    let mut regions: Vec<serde_json::Value> = Vec::new();
    for e in &snap.endpoints {
        // A silent probe layer makes an endpoint unfit whatever its last status.
        let up = u64::from(e.status == crate::health::Status::Up && e.silent.is_none());
        match regions.iter_mut().find(|r| r["id"] == e.region.as_str()) {
            Some(r) => {
                r["endpoints"] = json!(r["endpoints"].as_u64().unwrap_or(0) + 1);
                r["endpoints_up"] = json!(r["endpoints_up"].as_u64().unwrap_or(0) + up);
            }
            None => regions.push(json!({
                "id": e.region, "drained": e.drained, "endpoints": 1, "endpoints_up": up,
            })),
        }
    }
    for r in regions.iter_mut() {
        if let Some(load) = snap.region_loads.iter().find(|l| r["id"] == l.0.as_str()) {
            r["utilization"] = json!(load.1);
            r["gpus"] = json!(load.2);
        }
    }
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "ready": state.ready.load(Ordering::Acquire),
        "snapshot": { "generation": snap.generation, "age_s": age_s(&snap) },
        "drained": snap.drained,
        "regions": regions,
        "services": snap.service_views.iter().map(|v| &**v).collect::<Vec<_>>(),
        "endpoints": snap.endpoints,
        "fleet": fleet,
    }))
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let snap = state.snapshot.load();
    state.metrics.snapshot_age_seconds.set(age_s(&snap));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

async fn set_drain(state: AdminState, region: String, drained: bool) -> Response {
    let reply = ask(&state, |done| Msg::Drain {
        region: region.clone(),
        drained,
        done,
    })
    .await;
    changed(reply, json!({ "region": region, "drained": drained }))
}

/// Promotes or rolls back a service's canary (kept across reloads).
async fn set_rollout(state: AdminState, service: String, promote: bool) -> Response {
    let reply = ask(&state, |done| Msg::Rollout {
        service: service.clone(),
        promote,
        done,
    })
    .await;
    let phase = if promote { "promoted" } else { "rolled-back" };
    changed(reply, json!({ "service": service, "phase": phase }))
}

async fn promote(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    set_rollout(state, id, true).await
}

async fn rollback(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    set_rollout(state, id, false).await
}

async fn drain(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    set_drain(state, id, true).await
}

async fn undrain(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    set_drain(state, id, false).await
}

/// A region's capacity report: JSON with any of `gpus_total`, `gpus_free`,
/// `utilization`, `queue_depth`, `kv_cache`. Checked whole before anything
/// changes.
async fn push_capacity(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    body: String,
) -> Response {
    let report: PushReport = match serde_json::from_str(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("not a capacity report: {e}"),
            );
        }
    };
    if let Err(refused) = report.validate() {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": refused.reason, "field": refused.field })),
        )
            .into_response();
    }
    let reply = ask(&state, |done| Msg::Capacity {
        region: id.clone(),
        report,
        done,
    })
    .await;
    changed(reply, json!({ "region": id, "accepted": true }))
}

async fn reload(State(state): State<AdminState>) -> Response {
    match state.control.reload().await {
        Ok(generation) => Json(json!({ "reloaded": true, "generation": generation })).into_response(),
        Err(errors) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "error": "the new configuration was refused; the running one stays", "problems": errors })),
        )
            .into_response(),
    }
}

/// Body: a tracing filter such as `debug` or `info,inferdns=debug`, where
/// every directive names a level. A refused filter leaves the old one.
async fn log_level(body: String) -> Response {
    match crate::log::set_filter(body.trim()) {
        Ok(()) => Json(json!({ "filter": body.trim() })).into_response(),
        Err(e @ crate::log::FilterError::Invalid(_)) => {
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
        Err(e @ crate::log::FilterError::NotInitialised) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

/// The log filter in force.
async fn current_log_level() -> Response {
    match crate::log::current_filter() {
        Some(filter) => Json(json!({ "filter": filter })).into_response(),
        None => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            crate::log::FilterError::NotInitialised.to_string(),
        ),
    }
}

/// Every client error is JSON with a reason, including those axum answers
/// itself (405 wrong method, 400 bad query string, 413 body too large,
/// 415, 422): their plain-text body becomes the reason.
async fn json_errors(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !status.is_client_error() || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let allow = parts.headers.get(header::ALLOW).cloned();
    let reason = if status == StatusCode::METHOD_NOT_ALLOWED {
        format!("method {method} is not allowed on {path}")
    } else if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("client error")
            .to_lowercase()
    } else {
        text
    };
    let mut out = error(status, reason);
    if let Some(allow) = allow {
        out.headers_mut().insert(header::ALLOW, allow);
    }
    out
}

/// Serves the admin API on `listener` within `limits` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    limits: AdminLimits,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let app = router(state, limits.body_timeout);
    serve::serve_limited(listener, app, limits, cancel).await
}
