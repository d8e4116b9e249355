//! One HTTP(S) health probe of one endpoint, with typed failures.
//!
//! The probe connects to the endpoint's configured address: URLs carry the
//! IP, or a name that is pinned to that IP with `resolve`, so no DNS lookup
//! ever happens. Connections are not pooled: each probe tests a fresh
//! connect, the way a new client would meet the endpoint.

use std::sync::Once;
use std::time::Duration;

use tokio::time::Instant;

use serde::Serialize;

use crate::config::{ProbeSpec, Scheme};

/// User-Agent of every probe, so backends can tell probes from users.
pub const USER_AGENT: &str = concat!("inferdns/", env!("CARGO_PKG_VERSION"), " (health probe)");

/// Why a probe failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "detail")]
pub enum ProbeError {
    /// Connection refused or reset: nothing listens.
    Refused,
    /// No complete answer within the timeout (hung or overloaded backend).
    Timeout,
    /// An HTTP status other than the expected one.
    Status(u16),
    /// TLS handshake or certificate failure.
    Tls(String),
    /// Any other transport error.
    Transport(String),
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeError::Refused => write!(f, "connection refused"),
            ProbeError::Timeout => write!(f, "timed out"),
            ProbeError::Status(s) => write!(f, "HTTP status {s}"),
            ProbeError::Tls(e) => write!(f, "TLS: {e}"),
            ProbeError::Transport(e) => write!(f, "transport: {e}"),
        }
    }
}

/// The result of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    pub result: Result<(), ProbeError>,
    /// Time from start to the answer (or to the failure).
    pub elapsed: Duration,
}

/// Anything that can check one endpoint once. The scheduler applies the
/// timeout; an implementation may take as long as the backend makes it.
pub trait Probe: Send + Sync + 'static {
    fn check(&self) -> impl std::future::Future<Output = Result<(), ProbeError>> + Send;
}

/// The HTTP(S) probe of one endpoint.
pub struct HttpProbe {
    client: reqwest::Client,
    url: String,
    host: Option<String>,
    expect_status: Option<u16>,
}

/// reqwest is built without a default crypto provider; install ring once.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // An error means another provider is already installed: fine either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl HttpProbe {
    pub fn new(spec: &ProbeSpec) -> Result<Self, reqwest::Error> {
        install_crypto_provider();
        let mut builder = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .no_proxy()
            .pool_max_idle_per_host(0)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(spec.timeout)
            .timeout(spec.timeout);
        let port = spec.addr.port();
        let (scheme, authority) = match spec.scheme {
            Scheme::Http => ("http", bracket(spec.addr.ip())),
            Scheme::Https => {
                let name = spec.tls_server_name.clone().or_else(|| spec.host.clone());
                match name {
                    Some(name) => {
                        // Pin the name to the endpoint's address: no DNS lookup happens.
                        builder = builder.resolve(&name, spec.addr);
                        ("https", name)
                    }
                    None => ("https", bracket(spec.addr.ip())),
                }
            }
        };
        let url = format!("{scheme}://{authority}:{port}{}", spec.path);
        Ok(Self {
            client: builder.build()?,
            url,
            host: spec.host.clone(),
            expect_status: spec.expect_status,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

fn bracket(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

impl Probe for HttpProbe {
    async fn check(&self) -> Result<(), ProbeError> {
        let mut request = self.client.get(&self.url);
        if let Some(host) = &self.host {
            request = request.header(reqwest::header::HOST, host);
        }
        let response = request.send().await.map_err(classify)?;
        let status = response.status().as_u16();
        let ok = match self.expect_status {
            Some(wanted) => status == wanted,
            None => (200..300).contains(&status),
        };
        // The body is not read: dropping the response closes the connection.
        if ok {
            Ok(())
        } else {
            Err(ProbeError::Status(status))
        }
    }
}

/// Maps a reqwest error to the failure type, walking its sources.
fn classify(e: reqwest::Error) -> ProbeError {
    if e.is_timeout() {
        return ProbeError::Timeout;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            match io.kind() {
                ConnectionRefused | ConnectionReset | ConnectionAborted => {
                    return ProbeError::Refused;
                }
                TimedOut => return ProbeError::Timeout,
                _ => {}
            }
        }
        if err.downcast_ref::<rustls::Error>().is_some() {
            return ProbeError::Tls(err.to_string());
        }
        source = err.source();
    }
    ProbeError::Transport(root_cause(&e))
}

/// The innermost error's text: the URL is shown beside the error anyway, and
/// reqwest's outer layers only repeat "error sending request".
fn root_cause(e: &dyn std::error::Error) -> String {
    let mut inner = e;
    while let Some(source) = inner.source() {
        inner = source;
    }
    inner.to_string()
}

/// Runs one probe under `timeout` and measures it.
pub async fn run_once<P: Probe>(probe: &P, timeout: Duration) -> ProbeOutcome {
    let start = Instant::now();
    let result = match tokio::time::timeout(timeout, probe.check()).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout),
    };
    ProbeOutcome {
        result,
        elapsed: start.elapsed(),
    }
}
