//! The admin HTTP API (loopback by default).
//!
//! Owns: `/healthz`, `/readyz` and `/v1/status`. Reads snapshots; never
//! writes them (changes go to the publisher as messages). Must not be on the
//! DNS query path.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::model::Snapshot;

/// What the admin handlers can see.
#[derive(Clone)]
pub struct AdminState {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// True once the first snapshot with probe results is published and the
    /// DNS listeners serve.
    pub ready: Arc<AtomicBool>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/status", get(status))
        .with_state(state)
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn status(State(state): State<AdminState>) -> Json<serde_json::Value> {
    let snap = state.snapshot.load_full();
    let age = SystemTime::now()
        .duration_since(snap.built)
        .unwrap_or_default()
        .as_secs_f64();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "ready": state.ready.load(Ordering::Acquire),
        "snapshot": { "generation": snap.generation, "age_s": age },
        "services": snap.service_views,
        "endpoints": snap.endpoints,
    }))
}

/// Serves the admin API on `listener` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}
