//! The probes of one endpoint, with typed failures.
//!
//! - L1 alive: an HTTP GET of a health path (or a TCP connect);
//! - L2 ready: `GET /v1/models` (OpenAI list, or Ollama's `/api/tags`
//!   shape), giving the model ids the endpoint serves;
//! - a synthetic completion (`max_tokens: 1`) that must return content.
//!
//! Every probe connects to the endpoint's configured address: URLs carry
//! the IP, or a name pinned to that IP with `resolve`, so no DNS lookup ever
//! happens. A probe reuses the connection its layer's previous probe left
//! open, and connects afresh for every failure and at least every 30 s
//! (see [`Http`]); bodies are read up to a bound, and a global cap limits
//! probes in flight.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::http1;
use crate::config::{ProbeKind, ProbeSpec, Scheme, Secret};

/// User-Agent of every probe, so backends can tell probes from users.
pub const USER_AGENT: &str = concat!("inferdns/", env!("CARGO_PKG_VERSION"), " (health probe)");
/// Largest body a probe reads; a backend that sends more (or streams
/// forever) fails the probe instead of hurting us.
pub const MAX_BODY: usize = 256 * 1024;
/// Probes in flight at once, over all endpoints.
pub const MAX_IN_FLIGHT: usize = 512;

/// Which probe of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layer {
    Alive,
    Models,
    Completion,
    /// The model server's Prometheus metrics (capacity).
    Metrics,
}

/// What a successful probe learned.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Alive,
    /// Model ids the endpoint lists.
    Models(Vec<String>),
    Completion,
    /// The load the metrics show.
    Load(crate::capacity::Load),
    /// Not sent: the completion probe of an endpoint whose region the load
    /// signal says is full (it would only queue behind the load). Neither a
    /// success nor a failure; it tells the publisher the layer is alive.
    Skipped,
}

/// Why a probe failed; each type has its own rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "detail")]
pub enum ProbeError {
    /// Connection refused or reset: nothing listens. On the alive layer it
    /// falls after `fall-refused` (1 by default); on the layers above, the
    /// alive layer explains it (see `publish`).
    Refused,
    /// No complete answer within the timeout (hung, overloaded, slow drip).
    Timeout,
    /// 429: rate limited. Not dead: cooled down, then back without a rise count.
    RateLimited { retry_after_s: Option<u64> },
    /// 503: loading or overloaded.
    Unavailable,
    /// Another 5xx.
    ServerError(u16),
    /// Any other unexpected status.
    Status(u16),
    /// A completion answered 200 without content.
    EmptyCompletion,
    /// A body that is not what the API promises (or too large).
    Malformed(String),
    /// TLS handshake or certificate failure.
    Tls(String),
    /// Any other transport error.
    Transport(String),
    /// A completion that timed out while the load signal already sheds its
    /// region: a symptom of load, not of death. Set by the publisher (a
    /// probe itself reports `Timeout`); never counted toward `fall`.
    Overloaded,
    /// This edge could not make the probe (out of descriptors or buffers,
    /// no local port): no result about the endpoint, never counted toward
    /// `fall`. A flood that exhausts descriptors must not fail regions over.
    LocalResource(String),
}

impl ProbeError {
    /// The metric label of the type.
    pub fn kind(&self) -> &'static str {
        match self {
            ProbeError::Refused => "refused",
            ProbeError::Timeout => "timeout",
            ProbeError::RateLimited { .. } => "rate_limited",
            ProbeError::Unavailable => "unavailable",
            ProbeError::ServerError(_) => "server_error",
            ProbeError::Status(_) => "status",
            ProbeError::EmptyCompletion => "empty_completion",
            ProbeError::Malformed(_) => "malformed",
            ProbeError::Tls(_) => "tls",
            ProbeError::Transport(_) => "transport",
            ProbeError::Overloaded => "overloaded",
            ProbeError::LocalResource(_) => "local_resource",
        }
    }
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeError::Refused => write!(f, "connection refused"),
            ProbeError::Timeout => write!(f, "timed out"),
            ProbeError::RateLimited {
                retry_after_s: Some(s),
            } => write!(f, "HTTP 429 rate limited (Retry-After {s} s)"),
            ProbeError::RateLimited {
                retry_after_s: None,
            } => write!(f, "HTTP 429 rate limited"),
            ProbeError::Unavailable => write!(f, "HTTP 503 unavailable (loading or overloaded)"),
            ProbeError::ServerError(s) => write!(f, "HTTP {s} server error"),
            ProbeError::Status(s) => write!(f, "HTTP status {s}"),
            ProbeError::EmptyCompletion => write!(f, "completion returned no content"),
            ProbeError::Malformed(e) => write!(f, "malformed answer: {e}"),
            ProbeError::Tls(e) => write!(f, "TLS: {e}"),
            ProbeError::Transport(e) => write!(f, "transport: {e}"),
            ProbeError::Overloaded => write!(
                f,
                "completion timed out while the region is loaded (overloaded, not counted as down)"
            ),
            ProbeError::LocalResource(e) => {
                write!(f, "this edge could not probe ({e}); not counted as down")
            }
        }
    }
}

/// The result of one probe.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeOutcome {
    pub result: Result<Payload, ProbeError>,
    /// Time from start to the answer (or to the failure).
    pub elapsed: Duration,
}

/// Anything that can check one layer of one endpoint once. The scheduler
/// applies the timeout; an implementation may take as long as the backend
/// makes it.
pub trait Probe: Send + Sync + 'static {
    fn layer(&self) -> Layer;
    fn check(&self) -> impl std::future::Future<Output = Result<Payload, ProbeError>> + Send;
}

/// reqwest is built without a default crypto provider; install ring once.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // An error means another provider is already installed: fine either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The TLS settings of probe clients, built once per set of extra CA
/// certificates and shared: building them reads and parses every system
/// root certificate, which each of 2,000 clients did on its own (9 s of
/// start-up and ~400 MB at 1,000 endpoints). The same verifier reqwest
/// builds (the platform's roots plus the region's `ca-file`), the same
/// protocol versions and ALPN (h2, http/1.1).
pub(crate) fn shared_tls(ca_pem: Option<&[u8]>) -> Option<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    static SHARED: Mutex<Vec<(Option<Vec<u8>>, rustls::ClientConfig)>> = Mutex::new(Vec::new());
    let mut shared = SHARED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, config)) = shared.iter().find(|(pem, _)| pem.as_deref() == ca_pem) {
        return Some(config.clone());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = match ca_pem {
        None => rustls_platform_verifier::Verifier::new(provider.clone()),
        Some(pem) => {
            let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<_, _>>()
                .ok()?;
            rustls_platform_verifier::Verifier::new_with_extra_roots(roots, provider.clone())
        }
    }
    .ok()?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    shared.push((ca_pem.map(<[u8]>::to_vec), config.clone()));
    Some(config)
}

/// The longest a probe layer goes without a fresh connection.
pub const FRESH_CONNECT_EVERY: Duration = Duration::from_secs(30);

/// An HTTP client bound to one endpoint's address.
///
/// A probe reuses the connection the previous one left open (HTTP/1.1
/// keep-alive, one per endpoint and layer): a fresh connection costs the
/// edge ~100 µs of CPU on loopback, which at 2,000 probes per second is a
/// fifth of a core by itself. Fresh connections still decide every
/// failure and test the accept path regularly:
/// - any failure to send on a kept connection (closed or reset under us,
///   the race every keep-alive client has) is tried once more on a fresh
///   connection, and that result counts: a dead backend is refused at
///   once, as before;
/// - every probe that is [`FRESH_CONNECT_EVERY`] after the last fresh one
///   connects afresh, so a backend that stops accepting connections but
///   keeps serving an open one is noticed within that time.
pub struct Http {
    /// How GETs go out, keeping one idle connection for the next probe.
    kept: Kept,
    /// A new connection for every request (fresh GETs over HTTPS, and
    /// completions): built when first needed, so plain-HTTP alive and
    /// model-list probes never build one (a client is ~1.7 KB).
    fresh: OnceLock<reqwest::Client>,
    recipe: Recipe,
    /// `scheme://authority:port`
    base: String,
    host: Option<String>,
    api_key: Option<Secret>,
    /// Probes sent since the last fresh connection, and how many may be.
    reused: AtomicU32,
    fresh_every: u32,
}

/// What a reqwest client of an [`Http`] is built from.
struct Recipe {
    tls: Option<rustls::ClientConfig>,
    ca_pem: Option<Vec<u8>>,
    /// A TLS name pinned to the endpoint's address (no DNS lookup).
    pin: Option<String>,
    addr: std::net::SocketAddr,
    timeout: Duration,
}

impl Recipe {
    /// A client keeping up to `idle` connections for the next request.
    fn build(&self, idle: usize) -> Result<reqwest::Client, reqwest::Error> {
        let mut builder = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .no_proxy()
            .pool_max_idle_per_host(idle)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(self.timeout)
            .timeout(self.timeout);
        match &self.tls {
            Some(tls) => builder = builder.tls_backend_preconfigured(tls.clone()),
            // Whatever failed, reqwest fails the same way and says why.
            None => {
                if let Some(pem) = &self.ca_pem {
                    builder = builder.add_root_certificate(reqwest::Certificate::from_pem(pem)?);
                }
            }
        }
        if let Some(name) = &self.pin {
            builder = builder.resolve(name, self.addr);
        }
        builder.build()
    }
}

/// The GET transport of an [`Http`].
enum Kept {
    /// Plain HTTP: our own kept connection (see [`Plain`]).
    Plain(Plain),
    /// HTTPS (or a Host header hyper's request cannot carry): reqwest with
    /// one idle connection in its pool.
    Reqwest(reqwest::Client),
}

/// GETs of a plain-HTTP endpoint over one kept HTTP/1.1 connection that
/// the probing task drives itself ([`super::http1`]): no connection pool,
/// no second task per connection, no request layers, and nothing but the
/// socket kept between probes. Through reqwest, a probe was two tasks (the
/// probe and the connection's) and two thread wake-ups, with pool checkout,
/// redirect and retry wrappers on the way; through hyper's connection API,
/// an idle connection kept about 24 KiB of buffers. HTTPS and the
/// completion probe (a POST, always fresh) still go through reqwest.
struct Plain {
    addr: std::net::SocketAddr,
    /// The `Host` header: the configured host, else the address.
    host: String,
    /// `Bearer <key>`.
    authorization: Option<String>,
    /// The connection the last probe left open, taken while in use; a
    /// probe cancelled by its timeout drops it.
    kept: Mutex<Option<tokio::net::TcpStream>>,
}

impl Plain {
    fn new(spec: &ProbeSpec) -> Option<Self> {
        let port = spec.addr.port();
        let host = match &spec.host {
            Some(host) => host.clone(),
            None if port == 80 => bracket(spec.addr.ip()),
            None => format!("{}:{port}", bracket(spec.addr.ip())),
        };
        let plain = Self {
            addr: spec.addr,
            host,
            authorization: spec.api_key.as_ref().map(|key| format!("Bearer {}", key.0)),
            kept: Mutex::new(None),
        };
        // A Host or key that cannot be a header value: reqwest says why.
        plain.request("/").ok().map(|_| plain)
    }

    fn request(&self, path: &str) -> Result<http1::Get, ProbeError> {
        http1::Get::new(path, &self.host, USER_AGENT, self.authorization.as_deref())
            .map_err(ProbeError::Transport)
    }

    async fn connect(&self) -> Result<tokio::net::TcpStream, ProbeError> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| classify_io(&e).unwrap_or_else(|| ProbeError::Transport(e.to_string())))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// GETs `path`: on the kept connection (a failure before any answer is
    /// tried once more on a fresh one), or on a fresh one when `fresh`.
    async fn get(
        &self,
        path: &str,
        fresh: bool,
        wanted: &(dyn Fn(u16) -> bool + Sync),
    ) -> Result<Vec<u8>, ProbeError> {
        let request = self.request(path)?;
        let kept = match fresh {
            true => None,
            false => self
                .kept
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        };
        if let Some(conn) = kept {
            match http1::exchange(conn, &request, wanted).await {
                (Ok(body), open) => {
                    self.keep(open);
                    return Ok(body);
                }
                (Err(http1::Failed { retry: true, .. }), _) => {}
                (Err(http1::Failed { error, .. }), _) => return Err(error),
            }
        }
        let conn = self.connect().await?;
        match http1::exchange(conn, &request, wanted).await {
            (Ok(body), open) => {
                self.keep(open);
                Ok(body)
            }
            (Err(http1::Failed { error, .. }), _) => Err(error),
        }
    }

    fn keep(&self, conn: Option<tokio::net::TcpStream>) {
        if let Some(conn) = conn {
            *self
                .kept
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(conn);
        }
    }
}

/// Appends a piece of a body, refusing a body over [`MAX_BODY`].
fn append_bounded(body: &mut Vec<u8>, data: &[u8]) -> Result<(), ProbeError> {
    if body.len() + data.len() > MAX_BODY {
        return Err(ProbeError::Malformed(format!(
            "body larger than {} KiB",
            MAX_BODY / 1024
        )));
    }
    body.extend_from_slice(data);
    Ok(())
}

impl Http {
    /// A client for probes sent every `interval`, each within `timeout`.
    pub fn new(
        spec: &ProbeSpec,
        timeout: Duration,
        interval: Duration,
    ) -> Result<Self, reqwest::Error> {
        install_crypto_provider();
        let port = spec.addr.port();
        let tls = shared_tls(spec.ca_pem.as_deref());
        let mut pin = None;
        let (scheme, authority) = match spec.scheme {
            Scheme::Http => ("http", bracket(spec.addr.ip())),
            Scheme::Https => match spec.tls_server_name.clone().or_else(|| spec.host.clone()) {
                Some(name) => {
                    // Pin the name to the endpoint's address: no DNS lookup happens.
                    pin = Some(name.clone());
                    ("https", name)
                }
                None => ("https", bracket(spec.addr.ip())),
            },
        };
        let recipe = Recipe {
            tls,
            ca_pem: spec.ca_pem.clone(),
            pin,
            addr: spec.addr,
            timeout,
        };
        let fresh_every = (FRESH_CONNECT_EVERY.as_secs_f64() / interval.as_secs_f64().max(1e-3))
            .floor()
            .clamp(1.0, f64::from(u32::MAX)) as u32;
        let kept = match spec.scheme {
            Scheme::Http => Plain::new(spec).map(Kept::Plain),
            Scheme::Https => None,
        };
        let kept = match kept {
            Some(kept) => kept,
            None => Kept::Reqwest(recipe.build(1)?),
        };
        let fresh = OnceLock::new();
        if spec.scheme == Scheme::Https {
            // Whatever is wrong with the TLS settings is said at start.
            let _ = fresh.set(recipe.build(0)?);
        }
        Ok(Self {
            kept,
            fresh,
            recipe,
            base: format!("{scheme}://{authority}:{port}"),
            host: spec.host.clone(),
            api_key: spec.api_key.clone(),
            reused: AtomicU32::new(0),
            fresh_every,
        })
    }

    /// The client that connects afresh for every request.
    fn fresh(&self) -> Result<&reqwest::Client, ProbeError> {
        if let Some(client) = self.fresh.get() {
            return Ok(client);
        }
        let client = self
            .recipe
            .build(0)
            .map_err(|e| ProbeError::Transport(root_cause(&e)))?;
        Ok(self.fresh.get_or_init(|| client))
    }

    fn request(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let mut request = client.request(method, format!("{}{path}", self.base));
        if let Some(host) = &self.host {
            request = request.header(reqwest::header::HOST, host);
        }
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(&key.0);
        }
        request
    }

    /// GETs `path` on the kept connection (see [`Http`]): the body of an
    /// answer whose status `wanted` accepts (bounded), else the status's
    /// failure type.
    async fn fetch(
        &self,
        path: &str,
        wanted: &(dyn Fn(u16) -> bool + Sync),
    ) -> Result<Vec<u8>, ProbeError> {
        let sent = self.reused.fetch_add(1, Ordering::Relaxed);
        let fresh = sent.is_multiple_of(self.fresh_every);
        let result = match &self.kept {
            Kept::Plain(plain) => plain.get(path, fresh, wanted).await,
            Kept::Reqwest(client) => self.fetch_reqwest(client, path, fresh, wanted).await,
        };
        tracing::trace!(
            url = %self.url(path),
            fresh,
            result = match &result {
                Ok(body) => format!("{} bytes", body.len()),
                Err(e) => e.to_string(),
            },
            "Probe request answered."
        );
        result
    }

    /// [`Http::fetch`] through reqwest (HTTPS).
    async fn fetch_reqwest(
        &self,
        client: &reqwest::Client,
        path: &str,
        fresh: bool,
        wanted: &(dyn Fn(u16) -> bool + Sync),
    ) -> Result<Vec<u8>, ProbeError> {
        let response = match fresh {
            true => self.get_fresh(path).await?,
            false => match self
                .request(client, reqwest::Method::GET, path)
                .send()
                .await
            {
                Ok(response) => response,
                // Out of time: a fresh try would only take more.
                Err(e) if e.is_timeout() => return Err(ProbeError::Timeout),
                Err(_) => self.get_fresh(path).await?,
            },
        };
        if !wanted(response.status().as_u16()) {
            return Err(status_error(response.status().as_u16(), response.headers()));
        }
        read_body(response).await
    }

    async fn get_fresh(&self, path: &str) -> Result<reqwest::Response, ProbeError> {
        self.request(self.fresh()?, reqwest::Method::GET, path)
            .send()
            .await
            .map_err(classify)
    }

    /// GETs `path`; a 2xx answer's body (bounded), else the status's failure type.
    async fn get_body(&self, path: &str) -> Result<Vec<u8>, ProbeError> {
        self.fetch(path, &|status| (200..300).contains(&status))
            .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

fn bracket(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Maps an unexpected status to its failure type.
pub(super) fn status_error(status: u16, headers: &http::HeaderMap) -> ProbeError {
    match status {
        429 => ProbeError::RateLimited {
            retry_after_s: headers
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok()),
        },
        503 => ProbeError::Unavailable,
        500..=599 => ProbeError::ServerError(status),
        _ => ProbeError::Status(status),
    }
}

/// Reads at most [`MAX_BODY`] bytes of a body.
async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>, ProbeError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(classify)? {
        append_bounded(&mut body, &chunk)?;
    }
    Ok(body)
}

/// L1 over HTTP: the health path answers the expected status.
pub struct AliveProbe {
    pub http: Http,
    pub path: String,
    pub expect_status: Option<u16>,
}

impl Probe for AliveProbe {
    fn layer(&self) -> Layer {
        Layer::Alive
    }

    async fn check(&self) -> Result<Payload, ProbeError> {
        let wanted = |status: u16| match self.expect_status {
            Some(wanted) => status == wanted,
            None => (200..300).contains(&status),
        };
        // Alive means a whole answer within the timeout: a body that never
        // completes (a half-dead proxy dripping bytes) is a timeout, not
        // "up". The body is read to the end (bounded), which also keeps the
        // connection reusable.
        self.http
            .fetch(&self.path, &wanted)
            .await
            .map(|_| Payload::Alive)
    }
}

/// L1 over TCP: a connect succeeds.
pub struct TcpProbe {
    pub addr: std::net::SocketAddr,
}

impl Probe for TcpProbe {
    fn layer(&self) -> Layer {
        Layer::Alive
    }

    async fn check(&self) -> Result<Payload, ProbeError> {
        tokio::net::TcpStream::connect(self.addr)
            .await
            .map(|_| Payload::Alive)
            .map_err(|e| classify_io(&e).unwrap_or_else(|| ProbeError::Transport(e.to_string())))
    }
}

/// L2: the models the endpoint lists.
pub struct ModelsProbe {
    pub http: Http,
    pub path: String,
    /// The entry field holding the version (`None`: `root`, `digest`).
    pub version_field: Option<String>,
}

impl Probe for ModelsProbe {
    fn layer(&self) -> Layer {
        Layer::Models
    }

    async fn check(&self) -> Result<Payload, ProbeError> {
        let body = self.http.get_body(&self.path).await?;
        parse_models_versions(&body, self.version_field.as_deref()).map(Payload::Models)
    }
}

/// Model ids from an OpenAI-style list (`data[].id`) or Ollama's `/api/tags`
/// (`models[].name` / `models[].model`); llama.cpp sends both. The versions
/// a server tells come along as `id@tag`: vLLM's `root` (the weights it
/// loaded) when it differs from the id, Ollama's `digest`.
pub fn parse_models(body: &[u8]) -> Result<Vec<String>, ProbeError> {
    parse_models_versions(body, None)
}

/// [`parse_models`], the version tag read from `version_field` of each
/// entry when given (any entry field: `root`, `digest`, `revision`...).
pub fn parse_models_versions(
    body: &[u8],
    version_field: Option<&str>,
) -> Result<Vec<String>, ProbeError> {
    let tag = |m: &serde_json::Value, default: &str| -> Option<String> {
        let value = m.get(version_field.unwrap_or(default))?;
        value
            .as_str()
            .map(str::to_string)
            .or_else(|| value.is_number().then(|| value.to_string()))
    };
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ProbeError::Malformed(format!("model list is not JSON: {e}")))?;
    let mut ids = Vec::new();
    if let Some(data) = v.get("data").and_then(|d| d.as_array()) {
        for m in data {
            let Some(id) = m.get("id").and_then(|x| x.as_str()) else {
                continue;
            };
            ids.push(id.to_string());
            if let Some(version) = tag(m, "root")
                && version != id
            {
                ids.push(format!("{id}@{version}"));
            }
        }
    }
    if let Some(models) = v.get("models").and_then(|d| d.as_array()) {
        for m in models {
            for key in ["name", "model"] {
                if let Some(id) = m.get(key).and_then(|x| x.as_str()) {
                    ids.push(id.to_string());
                    if let Some(version) = tag(m, "digest") {
                        ids.push(format!("{id}@{version}"));
                    }
                }
            }
        }
    }
    if ids.is_empty() && v.get("data").is_none() && v.get("models").is_none() {
        return Err(ProbeError::Malformed(
            "model list has neither `data` nor `models`".into(),
        ));
    }
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// A one-token chat completion that must return content.
pub struct CompletionProbe {
    pub http: Http,
    pub path: String,
    pub model: String,
}

impl Probe for CompletionProbe {
    fn layer(&self) -> Layer {
        Layer::Completion
    }

    async fn check(&self) -> Result<Payload, ProbeError> {
        let body = serde_json::json!({
            "model": self.model,
            "messages": [{ "role": "user", "content": "ping" }],
            "max_tokens": 1,
            "stream": false,
        });
        // A fresh connection each time: it costs GPU time, is sent every
        // 30 s or so (servers close idle connections sooner), and is never
        // sent twice.
        let response = self
            .http
            .request(self.http.fresh()?, reqwest::Method::POST, &self.path)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(classify)?;
        if !response.status().is_success() {
            return Err(status_error(response.status().as_u16(), response.headers()));
        }
        let body = read_body(response).await?;
        parse_completion(&body).map(|()| Payload::Completion)
    }
}

/// Checks a completion body (OpenAI chat `choices[0].message.content` or
/// legacy `choices[0].text`): `Ok` when it carries content, an empty
/// completion when the first choice has none.
pub fn parse_completion(body: &[u8]) -> Result<(), ProbeError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ProbeError::Malformed(format!("completion is not JSON: {e}")))?;
    let choice = v.get("choices").and_then(|c| c.get(0));
    let content = choice
        .and_then(|c| {
            c.get("message")
                .and_then(|m| m.get("content"))
                .or_else(|| c.get("text"))
        })
        .and_then(|c| c.as_str());
    match content {
        Some(text) if !text.is_empty() => Ok(()),
        Some(_) => Err(ProbeError::EmptyCompletion),
        None if choice.is_some() => Err(ProbeError::EmptyCompletion),
        None => Err(ProbeError::Malformed("completion has no choices".into())),
    }
}

/// Capacity: the model server's `/metrics`, read with a preset.
pub struct MetricsProbe {
    pub http: Http,
    pub path: String,
    pub preset: crate::capacity::Preset,
    /// llama.cpp's `total_slots` from `/props`, and when it was read.
    pub props: std::sync::Mutex<Option<(f64, Instant)>>,
}

/// `total_slots` changes only when llama.cpp restarts: read `/props` again
/// after this long (or after a failed scrape, which a restart causes).
pub const PROPS_MAX_AGE: Duration = Duration::from_secs(60);

impl MetricsProbe {
    pub fn new(http: Http, path: String, preset: crate::capacity::Preset) -> Self {
        Self {
            http,
            path,
            preset,
            props: std::sync::Mutex::new(None),
        }
    }

    fn cached_slots(&self) -> Option<f64> {
        let cached = *self.props.lock().unwrap_or_else(|e| e.into_inner());
        cached
            .filter(|(_, at)| at.elapsed() < PROPS_MAX_AGE)
            .map(|(slots, _)| slots)
    }

    fn remember_slots(&self, slots: Option<f64>) {
        *self.props.lock().unwrap_or_else(|e| e.into_inner()) = slots.map(|s| (s, Instant::now()));
    }

    /// The slot count from `/props` (cached); `None` when it cannot be read:
    /// the load is then judged without it (the queue still says "full").
    async fn props_slots(&self) -> Option<f64> {
        if let Some(slots) = self.cached_slots() {
            return Some(slots);
        }
        let slots = match self.http.get_body(crate::capacity::PROPS_PATH).await {
            Ok(body) => crate::capacity::total_slots(&body).ok(),
            Err(_) => None,
        };
        self.remember_slots(slots);
        slots
    }
}

impl Probe for MetricsProbe {
    fn layer(&self) -> Layer {
        Layer::Metrics
    }

    async fn check(&self) -> Result<Payload, ProbeError> {
        let body = match self.http.get_body(&self.path).await {
            Ok(body) => body,
            Err(e) => {
                // Perhaps restarting, perhaps with another slot count.
                self.remember_slots(None);
                return Err(e);
            }
        };
        let text = String::from_utf8_lossy(&body);
        let load = self.preset.read(&text).map_err(ProbeError::Malformed)?;
        let props = match self.preset.props_slots && load.slots.is_none() {
            true => self.props_slots().await,
            false => None,
        };
        Ok(Payload::Load(self.preset.complete(load, props)))
    }
}

/// Builds the probes of one endpoint, one per configured layer.
pub fn probes_for(spec: &ProbeSpec) -> Result<Vec<(AnyProbe, Duration, Duration)>, reqwest::Error> {
    let mut out = Vec::new();
    match spec.kind {
        ProbeKind::Tcp => out.push((
            AnyProbe::Tcp(TcpProbe { addr: spec.addr }),
            spec.interval,
            spec.timeout,
        )),
        ProbeKind::Http => out.push((
            AnyProbe::Alive(AliveProbe {
                http: Http::new(spec, spec.timeout, spec.interval)?,
                path: spec.path.clone(),
                expect_status: spec.expect_status,
            }),
            spec.interval,
            spec.timeout,
        )),
    }
    if let Some(models) = &spec.models {
        out.push((
            AnyProbe::Models(ModelsProbe {
                http: Http::new(spec, spec.timeout, models.interval)?,
                path: models.path.clone(),
                version_field: models.version_field.clone(),
            }),
            models.interval,
            spec.timeout,
        ));
    }
    if let Some(m) = &spec.metrics {
        out.push((
            AnyProbe::Metrics(MetricsProbe::new(
                Http::new(spec, spec.timeout, m.interval)?,
                m.path.clone(),
                m.preset.clone(),
            )),
            m.interval,
            spec.timeout,
        ));
    }
    if let Some(c) = &spec.completion {
        out.push((
            AnyProbe::Completion(CompletionProbe {
                http: Http::new(spec, c.timeout, c.interval)?,
                path: c.path.clone(),
                model: c.model.clone(),
            }),
            c.interval,
            c.timeout,
        ));
    }
    Ok(out)
}

/// One of the probe kinds, so a probe loop can run any of them.
pub enum AnyProbe {
    Alive(AliveProbe),
    Tcp(TcpProbe),
    Models(ModelsProbe),
    Completion(CompletionProbe),
    Metrics(MetricsProbe),
}

impl Probe for AnyProbe {
    fn layer(&self) -> Layer {
        match self {
            AnyProbe::Alive(p) => p.layer(),
            AnyProbe::Tcp(p) => p.layer(),
            AnyProbe::Models(p) => p.layer(),
            AnyProbe::Completion(p) => p.layer(),
            AnyProbe::Metrics(p) => p.layer(),
        }
    }

    async fn check(&self) -> Result<Payload, ProbeError> {
        match self {
            AnyProbe::Alive(p) => p.check().await,
            AnyProbe::Tcp(p) => p.check().await,
            AnyProbe::Models(p) => p.check().await,
            AnyProbe::Completion(p) => p.check().await,
            AnyProbe::Metrics(p) => p.check().await,
        }
    }
}

/// Maps a reqwest error to the failure type, walking its sources.
fn classify(e: reqwest::Error) -> ProbeError {
    if e.is_timeout() {
        return ProbeError::Timeout;
    }
    classify_chain(&e).unwrap_or_else(|| ProbeError::Transport(root_cause(&e)))
}

/// Errors of this host's own resources (Linux errno values): EMFILE,
/// ENFILE, ENOBUFS, ENOMEM, EADDRINUSE, EADDRNOTAVAIL.
const LOCAL_RESOURCE_ERRNOS: [i32; 6] = [24, 23, 105, 12, 98, 99];

pub(super) fn classify_io(io: &std::io::Error) -> Option<ProbeError> {
    use std::io::ErrorKind::*;
    if io
        .raw_os_error()
        .is_some_and(|errno| LOCAL_RESOURCE_ERRNOS.contains(&errno))
    {
        return Some(ProbeError::LocalResource(io.to_string()));
    }
    match io.kind() {
        ConnectionRefused | ConnectionReset | ConnectionAborted => Some(ProbeError::Refused),
        TimedOut => Some(ProbeError::Timeout),
        _ => None,
    }
}

/// Walks an error chain. `io::Error` wraps its inner error without exposing
/// it as `source()` (hyper-rustls puts the `rustls::Error` there), so the
/// wrapped error is searched too.
fn classify_chain(err: &(dyn std::error::Error + 'static)) -> Option<ProbeError> {
    let mut source = Some(err);
    while let Some(err) = source {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(ProbeError::Tls(tls.to_string()));
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref()
                && let Some(found) = classify_chain(inner)
            {
                return Some(found);
            }
            if let Some(found) = classify_io(io) {
                return Some(found);
            }
        }
        source = err.source();
    }
    None
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

fn in_flight() -> &'static Semaphore {
    static PERMITS: OnceLock<Semaphore> = OnceLock::new();
    PERMITS.get_or_init(|| Semaphore::new(MAX_IN_FLIGHT))
}

/// Runs one probe under `timeout` and measures it (a probe waiting for a
/// slot in the in-flight cap does not start its clock yet).
pub async fn run_once<P: Probe>(probe: &P, timeout: Duration) -> ProbeOutcome {
    let _permit = in_flight()
        .acquire()
        .await
        .expect("the semaphore is never closed");
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback HTTP server that keeps connections alive but closes one
    /// when a second request arrives on it (a server closing an idle
    /// connection just as the client reuses it); `stop` closes the
    /// listener and every connection, as a dead process does. Returns
    /// the address and the connections accepted so far.
    async fn closing_server(
        stop: tokio_util::sync::CancellationToken,
    ) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicU32>) {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => accepted.unwrap(),
                };
                count.fetch_add(1, Ordering::SeqCst);
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut served = 0;
                    loop {
                        let more = tokio::select! {
                            () = stop.cancelled() => return,
                            more = next_head(&mut stream) => more,
                        };
                        if !more {
                            return;
                        }
                        if served == 1 {
                            return; // closed under the client's second request
                        }
                        served += 1;
                        let body = r#"{"status":"ok"}"#;
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: keep-alive\r\n\r\n{body}",
                            body.len()
                        );
                        stream.write_all(head.as_bytes()).await.unwrap();
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// Reads one request head (up to the blank line) off `stream`, the
    /// byte at a time a test server can afford; `false` at the end.
    async fn next_head(stream: &mut tokio::net::TcpStream) -> bool {
        use tokio::io::AsyncReadExt;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return false,
            }
        }
        true
    }

    fn alive_probe(addr: std::net::SocketAddr) -> AnyProbe {
        probes_of(addr, "").remove(0)
    }

    /// A loopback server that answers every request with `reply` (a whole
    /// HTTP/1.1 response) and closes the connection after it when `reply`
    /// says `connection: close`. Returns the address and the connections
    /// accepted so far.
    async fn scripted_server(
        reply: &'static str,
    ) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicU32>) {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    while next_head(&mut stream).await {
                        stream.write_all(reply.as_bytes()).await.unwrap();
                        if reply.contains("connection: close") {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn probes_of(addr: std::net::SocketAddr, region: &str) -> Vec<AnyProbe> {
        let text = format!(
            "[server]\ndns-listen = [\"127.0.0.1:0\"]\n[zone]\napex = \"inference.example.com\"\nsoa = {{ primary = \"ns1.example.net\", contact = \"h.example.net\" }}\nns = [{{ name = \"ns1.example.net\" }}]\n[regions.r]\n{region}\nendpoints = [{{ address = \"127.0.0.1\", port = {} }}]\n[services.s]\nmodel = \"m\"\ntiers = [[\"r\"]]\n",
            addr.port()
        );
        let config = crate::config::load_str(std::path::Path::new("t.toml"), &text).unwrap();
        let spec = &config.regions[0].endpoints[0].probe;
        probes_for(spec).unwrap().into_iter().map(|p| p.0).collect()
    }

    /// A chunked model list (Go's and uvicorn's servers send one when they
    /// do not know the length) is read whole; a server that closes after
    /// each answer gets a fresh connection each time and is not failed for
    /// it; one that keeps the connection open serves every probe on one.
    #[tokio::test]
    async fn chunked_answers_and_closing_servers_on_the_plain_path() {
        let (addr, accepted) = scripted_server(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
             9\r\n{\"data\":[\r\n\
             a\r\n{\"id\":\"m\"}\r\n\
             2\r\n]}\r\n0\r\n\r\n",
        )
        .await;
        let probes = probes_of(addr, r#"probe = { models-path = "/v1/models" }"#);
        let models = probes
            .iter()
            .find(|p| p.layer() == Layer::Models)
            .expect("a model list probe");
        for n in 1..=3 {
            assert_eq!(
                models.check().await,
                Ok(Payload::Models(vec!["m".to_string()])),
                "probe {n}"
            );
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3, "a connection each");

        let (addr, accepted) =
            scripted_server("HTTP/1.1 200 OK\r\ncontent-length: 15\r\n\r\n{\"status\":\"ok\"}")
                .await;
        let probe = alive_probe(addr);
        for n in 1..=5 {
            assert_eq!(probe.check().await, Ok(Payload::Alive), "probe {n}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one kept connection");
    }

    /// A 429 on the plain path keeps its Retry-After; a 503 is unavailable.
    #[tokio::test]
    async fn statuses_on_the_plain_path_keep_their_failure_types() {
        let (addr, _) = scripted_server(
            "HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        assert_eq!(
            alive_probe(addr).check().await,
            Err(ProbeError::RateLimited {
                retry_after_s: Some(7)
            })
        );
        let (addr, _) =
            scripted_server("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await;
        assert_eq!(
            alive_probe(addr).check().await,
            Err(ProbeError::Unavailable)
        );
    }

    /// The keep-alive race: the server closes the kept connection as the
    /// next probe is sent on it. The probe is tried again on a fresh
    /// connection and succeeds; it is not a failure (a refusal would take
    /// the endpoint down at once).
    #[tokio::test]
    async fn a_kept_connection_closed_under_a_probe_is_retried_on_a_fresh_one() {
        let stop = tokio_util::sync::CancellationToken::new();
        let (addr, accepted) = closing_server(stop.clone()).await;
        let probe = alive_probe(addr);
        // The first probe connects afresh and keeps its connection; the
        // second is sent on it, which the server closes, and connects
        // again; so does the third.
        for n in 1..=3 {
            assert_eq!(probe.check().await, Ok(Payload::Alive), "probe {n}");
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            3,
            "the third one connected again"
        );
        // A dead server (listener and connections closed) is refused at
        // once, kept connection or not.
        assert_eq!(
            probe.check().await,
            Ok(Payload::Alive),
            "probe 4 keeps a connection"
        );
        stop.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(probe.check().await, Err(ProbeError::Refused));
    }

    #[test]
    fn errors_of_this_hosts_own_resources_are_their_own_type() {
        for errno in [24, 23, 105, 12, 98, 99] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert!(
                matches!(classify_io(&e), Some(ProbeError::LocalResource(_))),
                "errno {errno}: {e}"
            );
        }
        let refused = std::io::Error::from_raw_os_error(111);
        assert_eq!(classify_io(&refused), Some(ProbeError::Refused));
        assert_eq!(
            ProbeError::LocalResource("x".into()).kind(),
            "local_resource"
        );
    }

    #[test]
    fn model_lists_of_each_server_shape() {
        let openai = br#"{"object":"list","data":[{"id":"llama-3.1-8b","object":"model"},{"id":"lora-a","parent":"llama-3.1-8b"}]}"#;
        assert_eq!(parse_models(openai).unwrap(), ["llama-3.1-8b", "lora-a"]);
        let ollama = br#"{"models":[{"name":"llama3:8b","model":"llama3:8b","size":1}]}"#;
        assert_eq!(parse_models(ollama).unwrap(), ["llama3:8b"]);
        // llama.cpp sends both shapes.
        let llamacpp = br#"{"models":[{"name":"smollm2-135m","model":"smollm2-135m"}],"object":"list","data":[{"id":"smollm2-135m","owned_by":"llamacpp"}]}"#;
        assert_eq!(parse_models(llamacpp).unwrap(), ["smollm2-135m"]);
        // Versions: vLLM's root (when it is not the id), Ollama's digest.
        let vllm = br#"{"object":"list","data":[{"id":"chat","object":"model","root":"/models/llama-3.1-8b-v2"},{"id":"same","root":"same"}]}"#;
        assert_eq!(
            parse_models(vllm).unwrap(),
            ["chat", "chat@/models/llama-3.1-8b-v2", "same"]
        );
        let ollama = br#"{"models":[{"name":"llama3:8b","model":"llama3:8b","digest":"a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72"}]}"#;
        let listed = parse_models(ollama).unwrap();
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert!(crate::model::lists(&listed, "llama3:8b@a80c4f17"));
        assert!(!crate::model::lists(&listed, "llama3:8b@b00"));
        assert!(!crate::model::lists(&listed, "llama3"));
        // A field named in the config.
        let custom = br#"{"data":[{"id":"chat","revision":7,"root":"/m"}]}"#;
        assert_eq!(
            parse_models_versions(custom, Some("revision")).unwrap(),
            ["chat", "chat@7"]
        );
        assert_eq!(
            parse_models(br#"{"data":[]}"#).unwrap(),
            Vec::<String>::new()
        );
        assert!(matches!(
            parse_models(b"<html>"),
            Err(ProbeError::Malformed(_))
        ));
        assert!(matches!(
            parse_models(br#"{"error":"x"}"#),
            Err(ProbeError::Malformed(_))
        ));
    }

    #[test]
    fn error_kinds_are_stable_metric_labels() {
        assert_eq!(
            ProbeError::RateLimited {
                retry_after_s: Some(5)
            }
            .kind(),
            "rate_limited"
        );
        assert_eq!(ProbeError::Unavailable.kind(), "unavailable");
        assert_eq!(
            ProbeError::RateLimited {
                retry_after_s: Some(5)
            }
            .to_string(),
            "HTTP 429 rate limited (Retry-After 5 s)"
        );
    }
}
