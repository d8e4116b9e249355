//! The admin API's connection loop: what one client may hold.
//!
//! - At most `max_connections` connections are open; one more is closed as
//!   soon as it is accepted (as the DNS-over-TCP cap does), so the listen
//!   backlog never fills with clients waiting behind slow ones.
//! - A request head must arrive within `header_timeout`, counted from the
//!   first moment the server waits for it: a client sending a byte a second
//!   (slowloris), or an idle keep-alive connection, is closed then.
//! - A request head larger than `max_header_bytes` is answered 431 and the
//!   connection closed; HTTP/1.1 only, at most [`MAX_HEADERS`] headers.
//! - A request body must arrive within `body_timeout` once the head is in
//!   (408, connection closed), and is at most [`super::MAX_BODY`] bytes (413).
//! - A response write that makes no progress for `body_timeout` ends the
//!   connection: a client that stops reading (pipelined `/metrics` requests
//!   into a closed window) gives its slot back.
//!
//! Nothing a client does here is logged above DEBUG.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::error;
use crate::config::AdminLimits;

/// Most headers a request may carry.
pub const MAX_HEADERS: usize = 64;

/// How long shutdown waits for requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Pause after an accept error (out of descriptors, say) before the next
/// accept, so that the loop never spins.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Buffers the request body, within `body_timeout` and [`super::MAX_BODY`]
/// (set by the `DefaultBodyLimit` layer outside this one), before any
/// handler runs: a handler never waits on a slow client.
pub async fn read_body_in_time(
    State(body_timeout): State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let mut buffering = Request::new(body);
    *buffering.headers_mut() = parts.headers.clone();
    *buffering.extensions_mut() = parts.extensions.clone();
    let bytes = match tokio::time::timeout(body_timeout, Bytes::from_request(buffering, &())).await
    {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(rejection)) => return rejection.into_response(),
        Err(_) => {
            let mut response = error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {}",
                    humantime::format_duration(body_timeout)
                ),
            );
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// The HTTP/1.1 connection settings for `limits`.
fn http_builder(limits: &AdminLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes as usize)
        .max_headers(MAX_HEADERS);
    builder
}

/// Serves `app` on `listener` within `limits` until `cancel` fires, then
/// lets requests in flight finish (for at most [`SHUTDOWN_GRACE`]).
pub async fn serve_limited(
    listener: TcpListener,
    app: Router,
    limits: AdminLimits,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let builder = Arc::new(http_builder(&limits));
    let slots = limits.max_connections as usize;
    let open = Arc::new(Semaphore::new(slots));
    loop {
        let (stream, peer) = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!(error = %e, "Admin API accept failed; pausing.");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "Admin API connection cap reached; closing a new connection.");
            drop(stream);
            continue;
        };
        let builder = builder.clone();
        let service = TowerToHyperService::new(app.clone());
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let stream = WriteDeadline::new(stream, limits.body_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                () = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "Admin API connection ended with an error.");
            }
        });
    }
    // Every connection gives its slot back when it ends.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, open.acquire_many(slots as u32)).await;
    Ok(())
}

/// A stream whose writes fail once one has waited `limit` without any
/// progress (the peer's receive window stayed shut). Reads pass through.
struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    /// Armed when a write first returns `Pending`; cleared on progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// `Pending` from the inner stream: arms the timer or reports it run out.
    fn wait<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading the response",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wait(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wait(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.wait(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.wait(cx, poll)
    }
}
