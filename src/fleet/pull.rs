//! Pulling the peers: one loop per peer, each pull bounded in time and
//! size, every result (good or not) sent to the publisher.
//!
//! A peer that is slow, down or answers garbage only stops being fresh: its
//! last good observations count until they expire, and nothing else waits
//! for it. A reload that changes `[fleet]` restarts the loops.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::Observations;
use crate::config::{Fleet, Peer, Secret};
use crate::health::jittered;
use crate::publish::Msg;

/// Largest observations body accepted from a peer (about 30,000 endpoints).
pub const MAX_BODY: usize = 8 * 1024 * 1024;

/// One pull's result.
#[derive(Debug)]
pub struct Pulled {
    pub peer: String,
    pub result: Result<Observations, String>,
    /// Body bytes received.
    pub bytes: u64,
}

/// Runs the pull loops of the fleet in `fleet` until `cancel` fires,
/// restarting them when a reload changes it.
pub async fn run(
    mut fleet: watch::Receiver<Arc<Fleet>>,
    publisher: mpsc::Sender<Msg>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    loop {
        let current = fleet.borrow_and_update().clone();
        let loops = cancel.child_token();
        match client(&current) {
            Ok(client) => {
                for peer in &current.peers {
                    tokio::spawn(pull_loop(
                        peer.clone(),
                        client.clone(),
                        current.clone(),
                        publisher.clone(),
                        loops.clone(),
                    ));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "Cannot build the HTTP client for fleet peers; not pulling them.");
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            changed = fleet.changed() => {
                loops.cancel();
                if changed.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

fn client(fleet: &Fleet) -> Result<reqwest::Client, reqwest::Error> {
    crate::health::probe::install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("inferdns/", env!("CARGO_PKG_VERSION"), " (fleet)"))
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(1)
        .connect_timeout(fleet.pull_timeout)
        .timeout(fleet.pull_timeout);
    if fleet.peers.iter().any(|p| p.url.starts_with("https:"))
        && let Some(tls) = crate::health::probe::shared_tls(fleet.ca_pem.as_deref())
    {
        builder = builder.tls_backend_preconfigured(tls);
    }
    builder.build()
}

async fn pull_loop(
    peer: Peer,
    client: reqwest::Client,
    fleet: Arc<Fleet>,
    publisher: mpsc::Sender<Msg>,
    cancel: CancellationToken,
) {
    loop {
        let pulled = tokio::select! {
            () = cancel.cancelled() => return,
            p = pull(&client, &peer, fleet.token.as_ref(), fleet.pull_timeout) => p,
        };
        if publisher.send(Msg::Peer(pulled)).await.is_err() {
            return;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(jittered(fleet.pull_interval)) => {}
        }
    }
}

/// One pull of `peer`'s observations within `timeout`.
pub async fn pull(
    client: &reqwest::Client,
    peer: &Peer,
    token: Option<&Secret>,
    timeout: Duration,
) -> Pulled {
    let mut bytes = 0u64;
    let late = || format!("no answer within {} ms", timeout.as_millis());
    // reqwest's own timeout (the same) may fire first: said the same way.
    let describe = |e: reqwest::Error| if e.is_timeout() { late() } else { describe(&e) };
    let result = tokio::time::timeout(timeout, async {
        let mut request = client
            .get(&peer.url)
            .header(reqwest::header::ACCEPT_ENCODING, "gzip");
        if let Some(token) = token {
            request = request.bearer_auth(&token.0);
        }
        let mut response = request.send().await.map_err(describe)?;
        let status = response.status();
        let response_gzipped = response
            .headers()
            .get(reqwest::header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
        if !status.is_success() {
            return Err(format!("HTTP {}", status.as_u16()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(describe)? {
            bytes += chunk.len() as u64;
            if body.len() + chunk.len() > MAX_BODY {
                return Err(format!("body larger than {} MiB", MAX_BODY >> 20));
            }
            body.extend_from_slice(&chunk);
        }
        if response_gzipped {
            body = super::gunzip(&body, MAX_BODY)?;
        }
        let obs: Observations =
            serde_json::from_slice(&body).map_err(|e| format!("not observations: {e}"))?;
        obs.validate()?;
        Ok(obs)
    })
    .await
    .unwrap_or_else(|_| Err(late()));
    Pulled {
        peer: peer.name.clone(),
        result,
        bytes,
    }
}

/// A reqwest error and its causes on one line.
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
