//! A simulated inference region: a real HTTP/1.1 server on loopback that
//! speaks the OpenAI-compatible surface (`/health`, `/v1/models`,
//! `/v1/chat/completions`) and vLLM-style `/metrics`, with switchable faults.
//!
//! Written on plain tokio sockets so that faults are exact: `Down` closes
//! the listening socket (connection refused), `Hung` accepts and never
//! answers, `Slow` delays every answer.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the region does wrong, if anything.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    None,
    /// Nothing listens: connection refused.
    Down,
    /// Accepts connections, reads the request, never answers.
    Hung,
    /// Answers everything after this delay.
    Slow(Duration),
    /// 429 with `Retry-After` on every route.
    RateLimited,
    /// 503 (model loading / overloaded) on every route.
    Unavailable,
    /// `/health` is 200 but `/v1/models` no longer lists the first model.
    ModelMissing,
    /// Completions return 200 with empty content.
    EmptyCompletion,
    /// Answers the status line and headers, then the body one byte at a time, forever.
    SlowDrip,
}

impl Fault {
    pub fn name(&self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::Down => "down",
            Fault::Hung => "hung",
            Fault::Slow(_) => "slow",
            Fault::RateLimited => "429",
            Fault::Unavailable => "503",
            Fault::ModelMissing => "model-missing",
            Fault::EmptyCompletion => "empty-completion",
            Fault::SlowDrip => "slow-drip",
        }
    }
}

/// Load figures served on `/metrics` in vLLM V1 names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    pub running: u32,
    pub waiting: u32,
    /// 0..1
    pub kv_cache: f64,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            running: 1,
            waiting: 0,
            kv_cache: 0.25,
        }
    }
}

struct Shared {
    /// Models served; the first is the one faults and completions are about.
    models: Mutex<Vec<String>>,
    load: Mutex<Load>,
    /// Headers of the last request seen, lowercased names.
    last_headers: Mutex<Vec<(String, String)>>,
    /// Completion requests answered (whatever the fault made of them).
    completions: std::sync::atomic::AtomicU64,
}

/// A running simulated region. Dropping it stops it.
pub struct SimRegion {
    addr: SocketAddr,
    shared: Arc<Shared>,
    fault: watch::Sender<Fault>,
    cancel: CancellationToken,
}

impl SimRegion {
    /// Starts a region serving `model` on `addr` (port 0 picks a free port).
    pub async fn start(addr: SocketAddr, model: &str) -> std::io::Result<SimRegion> {
        Self::start_models(addr, &[model]).await
    }

    /// Starts a region serving several models (the first is its main one).
    pub async fn start_models(addr: SocketAddr, models: &[&str]) -> std::io::Result<SimRegion> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            models: Mutex::new(models.iter().map(|m| m.to_string()).collect()),
            load: Mutex::new(Load::default()),
            last_headers: Mutex::new(Vec::new()),
            completions: Default::default(),
        });
        let (fault, fault_rx) = watch::channel(Fault::None);
        let cancel = CancellationToken::new();
        tokio::spawn(supervise(
            addr,
            Some(listener),
            shared.clone(),
            fault_rx,
            cancel.clone(),
        ));
        Ok(SimRegion {
            addr,
            shared,
            fault,
            cancel,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches the fault; `Fault::None` restores normal service.
    pub fn set_fault(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }

    /// A header of the last request this region saw (name in any case).
    pub fn last_header(&self, name: &str) -> Option<String> {
        let headers = self
            .shared
            .last_headers
            .lock()
            .expect("headers lock poisoned");
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    /// Replaces the models served.
    pub fn set_models(&self, models: &[&str]) {
        *self.shared.models.lock().expect("models lock poisoned") =
            models.iter().map(|m| m.to_string()).collect();
    }

    pub fn set_load(&self, load: Load) {
        *self.shared.load.lock().expect("load lock poisoned") = load;
    }

    /// Completion requests this region has answered.
    pub fn completions(&self) -> u64 {
        self.shared
            .completions
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for SimRegion {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Owns the listener: closes it while `Down`, binds it again afterwards.
/// Every connection task is cancelled when the fault changes, so a `Hung`
/// connection does not outlive its fault and `Down` leaves nothing open.
async fn supervise(
    addr: SocketAddr,
    mut listener: Option<TcpListener>,
    shared: Arc<Shared>,
    mut fault_rx: watch::Receiver<Fault>,
    cancel: CancellationToken,
) {
    loop {
        let fault = *fault_rx.borrow_and_update();
        let epoch = cancel.child_token();
        if fault == Fault::Down {
            listener = None;
        } else if listener.is_none() {
            listener = rebind(addr, &cancel).await;
            if listener.is_none() {
                return;
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = fault_rx.changed() => {
                epoch.cancel();
                if changed.is_err() {
                    return;
                }
            }
            () = accept_loop(listener.as_ref(), shared.clone(), fault, epoch.clone()) => {}
        }
    }
}

async fn rebind(addr: SocketAddr, cancel: &CancellationToken) -> Option<TcpListener> {
    for _ in 0..100 {
        if cancel.is_cancelled() {
            return None;
        }
        match TcpListener::bind(addr).await {
            Ok(l) => return Some(l),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    tracing::warn!(%addr, "Simulated region could not bind its address again.");
    None
}

async fn accept_loop(
    listener: Option<&TcpListener>,
    shared: Arc<Shared>,
    fault: Fault,
    epoch: CancellationToken,
) {
    let Some(listener) = listener else {
        return std::future::pending().await;
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors or similar: do not spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        let epoch = epoch.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = epoch.cancelled() => {}
                _ = serve_connection(stream, shared, fault) => {}
            }
        });
    }
}

/// The head of one request: method, path and body length.
struct RequestHead {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 64 * 1024;

async fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<RequestHead>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split_whitespace();
    let method = first.next().unwrap_or_default().to_string();
    let path = first.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let content_length = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0usize)
        .min(MAX_BODY);
    // Read (and ignore) the body so the client sees a clean exchange.
    let mut have = buf.len() - (head_end + 4);
    while have < content_length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        have += n;
    }
    Ok(Some(RequestHead {
        method,
        path,
        headers,
    }))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Serves requests on one connection until the client closes it or asks
/// to (`connection: close`), as model servers keep HTTP/1.1 connections
/// alive. A fault change cancels the connection (see `supervise`): a
/// region that goes down closes every open connection, as a dead process does.
async fn serve_connection(
    mut stream: TcpStream,
    shared: Arc<Shared>,
    fault: Fault,
) -> std::io::Result<()> {
    while let Some(request) = read_request(&mut stream).await? {
        let close = request
            .headers
            .iter()
            .any(|(k, v)| k == "connection" && v.eq_ignore_ascii_case("close"));
        serve_request(&mut stream, &request, &shared, fault, close).await?;
        if close {
            return stream.shutdown().await;
        }
    }
    Ok(())
}

async fn serve_request(
    stream: &mut TcpStream,
    request: &RequestHead,
    shared: &Shared,
    fault: Fault,
    close: bool,
) -> std::io::Result<()> {
    *shared.last_headers.lock().expect("headers lock poisoned") = request.headers.clone();
    match fault {
        Fault::Hung => return std::future::pending().await,
        Fault::Slow(delay) => tokio::time::sleep(delay).await,
        Fault::SlowDrip => {
            // A length under the probes' body bound: a larger one is
            // refused as soon as the head is read, and never drips.
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n")
                .await?;
            loop {
                stream.write_all(b" ").await?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        _ => {}
    }
    let (status, content_type, body, extra) = route(request, shared, fault);
    let connection = if close { "close" } else { "keep-alive" };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: {connection}\r\n{extra}\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await
}

fn route(
    request: &RequestHead,
    shared: &Shared,
    fault: Fault,
) -> (&'static str, &'static str, String, &'static str) {
    const JSON: &str = "application/json";
    match fault {
        Fault::RateLimited => {
            return (
                "429 Too Many Requests",
                JSON,
                r#"{"error":{"message":"rate limited","type":"rate_limit_error"}}"#.into(),
                "retry-after: 1\r\n",
            );
        }
        Fault::Unavailable => {
            return (
                "503 Service Unavailable",
                JSON,
                r#"{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}"#
                    .into(),
                "",
            );
        }
        _ => {}
    }
    let models = shared.models.lock().expect("models lock poisoned").clone();
    let model = models.first().cloned().unwrap_or_default();
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/health") => ("200 OK", JSON, r#"{"status":"ok"}"#.into(), ""),
        ("GET", "/v1/models") => {
            // ModelMissing: the main (first) model is gone, the others stay.
            let skip = usize::from(fault == Fault::ModelMissing);
            let data: Vec<serde_json::Value> = models
                .iter()
                .skip(skip)
                .map(|id| serde_json::json!({ "id": id, "object": "model", "created": 0, "owned_by": "inferdns-sim" }))
                .collect();
            let body = serde_json::json!({ "object": "list", "data": data });
            ("200 OK", JSON, body.to_string(), "")
        }
        ("POST", "/v1/chat/completions") => {
            shared
                .completions
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let content = if fault == Fault::EmptyCompletion {
                ""
            } else {
                "Hi"
            };
            let body = serde_json::json!({
                "id": "chatcmpl-sim",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": { "role": "assistant", "content": content },
                    "finish_reason": "length",
                }],
                "usage": { "prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6 },
            });
            ("200 OK", JSON, body.to_string(), "")
        }
        ("GET", "/metrics") => {
            let load = *shared.load.lock().expect("load lock poisoned");
            let body = format!(
                "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
# TYPE vllm:num_requests_running gauge\n\
vllm:num_requests_running{{engine=\"0\",model_name=\"{model}\"}} {}\n\
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
# TYPE vllm:num_requests_waiting gauge\n\
vllm:num_requests_waiting{{engine=\"0\",model_name=\"{model}\"}} {}\n\
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
# TYPE vllm:kv_cache_usage_perc gauge\n\
vllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"{model}\"}} {}\n",
                load.running, load.waiting, load.kv_cache
            );
            ("200 OK", "text/plain; version=0.0.4", body, "")
        }
        _ => ("404 Not Found", JSON, r#"{"error":"not found"}"#.into(), ""),
    }
}
