//! Bearer-token checks of the admin routes.
//!
//! Mutating routes always need the token; the read routes need it when
//! `admin-token-for-reads` is set. The comparison is constant-time
//! (`subtle`), so the time of a refusal says nothing about how much of a
//! guess was right (only whether its length was). No token, given or
//! expected, is ever put in a response, a log line or a metric.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use super::{AdminState, error};
use crate::config::{Config, Secret, ServerConfig};

/// Who may use the admin API (replaced whole on reload).
#[derive(Debug, Clone, Default)]
pub struct AdminAuth {
    /// `None`: mutating routes are disabled.
    pub token: Option<Secret>,
    /// The read routes need the token too.
    pub reads: bool,
    /// The fleet's token: peers pulling observations send it. `None`: the
    /// route is closed.
    pub fleet: Option<Secret>,
}

impl AdminAuth {
    pub fn of(config: &Config) -> Self {
        let server = &config.server;
        Self {
            token: server.admin_token.clone(),
            reads: server.admin_token_for_reads,
            fleet: config.fleet.token.clone(),
        }
    }
}

/// Why `server` must not serve its admin API: a non-loopback address
/// without a token (the config check says the same with a position; this
/// also covers `run --admin-listen`).
pub fn refuse_exposed(server: &ServerConfig) -> Option<String> {
    let addr = server.admin_listen;
    (!addr.ip().to_canonical().is_loopback() && server.admin_token.is_none()).then(|| {
        format!("admin API on {addr} is not loopback and server.admin-token-file is not set")
    })
}

/// The bearer token of `headers` is the configured one.
fn token_matches(expected: &Secret, headers: &HeaderMap) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    // `ct_eq` on slices returns at once only when the lengths differ.
    given.ct_eq(expected.0.as_bytes()).into()
}

/// A 401 that says which scheme to use.
fn unauthorized() -> Response {
    let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// `request` if it carries `expected`; 403 with `disabled` when there is
/// no token to expect, 401 when it is missing or wrong.
async fn with_token(
    expected: Option<&Secret>,
    disabled: &str,
    headers: &HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = expected else {
        return error(StatusCode::FORBIDDEN, disabled);
    };
    if !token_matches(expected, headers) {
        return unauthorized();
    }
    next.run(request).await
}

/// Mutating routes: the token, always.
pub async fn require_token(
    State(state): State<AdminState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let auth = state.control.admin_auth.load();
    let disabled = "mutating routes are disabled: set server.admin-token-file in the config";
    with_token(auth.token.as_ref(), disabled, &headers, request, next).await
}

/// The fleet route: the fleet's token, always (an edge's observations are
/// its whole view of the regions).
pub async fn require_fleet_token(
    State(state): State<AdminState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let auth = state.control.admin_auth.load();
    let disabled = "this edge has no fleet: set [fleet] token-file and peers in the config";
    with_token(auth.fleet.as_ref(), disabled, &headers, request, next).await
}

/// Read routes: the token when `admin-token-for-reads` is set.
pub async fn require_read_token(
    State(state): State<AdminState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let auth = state.control.admin_auth.load();
    if auth.reads {
        // The config check refuses reads-need-token without a token file.
        let allowed = auth
            .token
            .as_ref()
            .is_some_and(|expected| token_matches(expected, &headers));
        if !allowed {
            return unauthorized();
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_bytes(value).unwrap(),
        );
        h
    }

    #[test]
    fn only_the_exact_bearer_token_matches() {
        let secret = Secret("s3cret-token".into());
        assert!(token_matches(&secret, &with(b"Bearer s3cret-token")));
        // Same length, one byte off; a prefix; a longer one; another scheme.
        assert!(!token_matches(&secret, &with(b"Bearer s3cret-tokem")));
        assert!(!token_matches(&secret, &with(b"Bearer s3cret")));
        assert!(!token_matches(&secret, &with(b"Bearer s3cret-token2")));
        assert!(!token_matches(&secret, &with(b"Basic s3cret-token")));
        assert!(!token_matches(&secret, &HeaderMap::new()));
    }
}
