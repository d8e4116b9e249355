//! One GET at a time over a kept plain-HTTP/1.1 connection: what the alive,
//! model-list and metrics probes need, and nothing else.
//!
//! Owns: writing the request, reading the response head (httparse), and
//! the body in each of HTTP/1.1's three framings (`Content-Length`,
//! `chunked`, or until the server closes), bounded by [`MAX_BODY`];
//! whether the connection may carry the next request.
//!
//! Why not hyper's connection API (which this replaced): an idle hyper
//! connection keeps an 8 KiB read buffer, an 8 KiB write buffer and its
//! request channel's first block (about 8 KiB) for good; at 1,000
//! endpoints with two probed layers that was about 50 MB of the daemon's
//! memory, for requests of 150 bytes and answers of a few hundred. Here an
//! idle connection is its socket; a probe's buffer lives for the probe.

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::probe::{MAX_BODY, ProbeError, classify_io, status_error};

/// Largest response head (status line and headers) read.
const MAX_HEAD: usize = 16 * 1024;
/// Headers parsed per response head; more is a malformed answer.
const MAX_HEADERS: usize = 64;
/// The first read's room: a typical probe answer, head and body, fits.
const FIRST_READ: usize = 2048;

/// How one exchange failed, and whether a fresh connection may try again.
#[derive(Debug)]
pub struct Failed {
    pub error: ProbeError,
    /// Nothing came back (the request could not be sent, or the connection
    /// closed or reset before any byte of an answer): a kept connection's
    /// race with the server closing it, not an answer.
    pub retry: bool,
}

impl Failed {
    fn answered(error: ProbeError) -> Self {
        Failed {
            error,
            retry: false,
        }
    }
}

/// The request head of a GET, built once per endpoint and layer.
#[derive(Debug, Clone)]
pub struct Get(Vec<u8>);

impl Get {
    /// `GET path` with the given `Host`, `User-Agent` and optional
    /// `Authorization`. A path or header that could smuggle a line break
    /// (or any control byte) is refused.
    pub fn new(
        path: &str,
        host: &str,
        user_agent: &str,
        authorization: Option<&str>,
    ) -> Result<Self, String> {
        if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(format!("bad request path {path:?}"));
        }
        let mut head =
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {user_agent}\r\n");
        if let Some(auth) = authorization {
            head.push_str("Authorization: ");
            head.push_str(auth);
            head.push_str("\r\n");
        }
        head.push_str("Accept: */*\r\n\r\n");
        let fields = [host, user_agent, authorization.unwrap_or_default()];
        if fields
            .iter()
            .any(|f| f.bytes().any(|b| b < b' ' && b != b'\t' || b == 0x7f))
        {
            return Err("a header value with a control character".into());
        }
        Ok(Get(head.into_bytes()))
    }
}

/// Sends `get` on `stream` and reads the whole answer (bounded). The body
/// is read only for a status `wanted` accepts. Gives the stream back when
/// it can carry the next request.
pub async fn exchange(
    mut stream: TcpStream,
    get: &Get,
    wanted: &(dyn Fn(u16) -> bool + Sync),
) -> (Result<Vec<u8>, Failed>, Option<TcpStream>) {
    if let Err(e) = stream.write_all(&get.0).await {
        return (
            Err(Failed {
                error: io_error(&e),
                retry: true,
            }),
            None,
        );
    }
    let mut reader = Reader {
        stream: &mut stream,
        buf: Vec::with_capacity(FIRST_READ),
        at: 0,
    };
    match reader.response(wanted).await {
        Ok((body, keep)) => (Ok(body), keep.then_some(stream)),
        Err(failed) => (Err(failed), None),
    }
}

/// The bytes read so far and how far they were consumed.
struct Reader<'a> {
    stream: &'a mut TcpStream,
    buf: Vec<u8>,
    at: usize,
}

/// How the body is delimited.
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

impl Reader<'_> {
    /// Reads more; `Ok(false)` when the server closed the connection.
    async fn fill(&mut self) -> Result<bool, ProbeError> {
        if self.buf.capacity() == self.buf.len() {
            self.buf.reserve(self.buf.len().max(FIRST_READ));
        }
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) => Ok(false),
            Ok(_) => Ok(true),
            Err(e) => Err(io_error(&e)),
        }
    }

    /// The response: its body and whether the connection stays usable.
    async fn response(
        &mut self,
        wanted: &(dyn Fn(u16) -> bool + Sync),
    ) -> Result<(Vec<u8>, bool), Failed> {
        loop {
            let Head {
                status,
                framing,
                mut keep,
                headers,
            } = self.head().await?;
            // 1xx (other than a switch) precede the real answer.
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            if !wanted(status) {
                return Err(Failed::answered(status_error(status, &headers)));
            }
            let framing = match status {
                204 | 304 => Framing::Length(0),
                _ => framing,
            };
            let body = match framing {
                Framing::Length(n) => self.exact(n).await,
                Framing::Chunked => self.chunked().await,
                Framing::UntilClose => {
                    keep = false;
                    self.until_close().await
                }
            }
            .map_err(Failed::answered)?;
            // Bytes beyond the answer: the server sent something unasked;
            // the connection is not trusted with another request.
            keep &= self.at == self.buf.len();
            return Ok((body, keep));
        }
    }

    /// Reads and parses a response head: status, body framing, and whether
    /// the server keeps the connection open.
    async fn head(&mut self) -> Result<Head, Failed> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(&self.buf[self.at..]) {
                Ok(httparse::Status::Complete(len)) => {
                    let head = parse_head(&response)?;
                    self.at += len;
                    return Ok(head);
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => {
                    return Err(Failed::answered(ProbeError::Malformed(format!(
                        "bad HTTP response head: {e}"
                    ))));
                }
            }
            if self.buf.len() - self.at > MAX_HEAD {
                return Err(Failed::answered(ProbeError::Malformed(format!(
                    "response head larger than {} KiB",
                    MAX_HEAD / 1024
                ))));
            }
            let nothing_yet = self.buf.is_empty();
            match self.fill().await {
                Ok(true) => {}
                // Closed (or reset) before any byte of an answer: the kept
                // connection's race; a fresh one may try again.
                Ok(false) if nothing_yet => {
                    return Err(Failed {
                        error: ProbeError::Transport("connection closed before a response".into()),
                        retry: true,
                    });
                }
                Err(error) if nothing_yet => return Err(Failed { error, retry: true }),
                Ok(false) => {
                    return Err(Failed::answered(ProbeError::Transport(
                        "connection closed in the response head".into(),
                    )));
                }
                Err(error) => return Err(Failed::answered(error)),
            }
        }
    }

    /// Exactly `n` body bytes.
    async fn exact(&mut self, n: usize) -> Result<Vec<u8>, ProbeError> {
        if n > MAX_BODY {
            return Err(too_large());
        }
        while self.buf.len() - self.at < n {
            if self.buf.capacity() < self.at + n {
                self.buf.reserve(self.at + n - self.buf.len());
            }
            if !self.fill().await? {
                return Err(ProbeError::Transport(
                    "connection closed before the end of the body".into(),
                ));
            }
        }
        let body = self.buf[self.at..self.at + n].to_vec();
        self.at += n;
        Ok(body)
    }

    /// Everything until the server closes.
    async fn until_close(&mut self) -> Result<Vec<u8>, ProbeError> {
        while self.fill().await? {
            if self.buf.len() - self.at > MAX_BODY {
                return Err(too_large());
            }
        }
        let body = self.buf[self.at..].to_vec();
        self.at = self.buf.len();
        Ok(body)
    }

    /// One line (without its line end), reading more as needed.
    async fn line(&mut self) -> Result<Vec<u8>, ProbeError> {
        loop {
            if let Some(i) = self.buf[self.at..].iter().position(|&b| b == b'\n') {
                let mut line = &self.buf[self.at..self.at + i];
                if let [rest @ .., b'\r'] = line {
                    line = rest;
                }
                let line = line.to_vec();
                self.at += i + 1;
                return Ok(line);
            }
            if self.buf.len() - self.at > MAX_HEAD {
                return Err(ProbeError::Malformed("chunk line too long".into()));
            }
            if !self.fill().await? {
                return Err(ProbeError::Transport(
                    "connection closed in a chunked body".into(),
                ));
            }
        }
    }

    /// A `Transfer-Encoding: chunked` body, trailers skipped.
    async fn chunked(&mut self) -> Result<Vec<u8>, ProbeError> {
        let mut body = Vec::new();
        loop {
            let line = self.line().await?;
            let size = line.split(|&b| b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(size)
                .ok()
                .map(str::trim)
                .and_then(|s| usize::from_str_radix(s, 16).ok())
                .ok_or_else(|| {
                    ProbeError::Malformed(format!(
                        "bad chunk size {:?}",
                        String::from_utf8_lossy(&line)
                    ))
                })?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !self.line().await?.is_empty() {}
                return Ok(body);
            }
            if body.len().saturating_add(size) > MAX_BODY {
                return Err(too_large());
            }
            body.extend_from_slice(&self.exact(size).await?);
            if !self.line().await?.is_empty() {
                return Err(ProbeError::Malformed("chunk without its line end".into()));
            }
        }
    }
}

/// What a response head says.
struct Head {
    status: u16,
    framing: Framing,
    /// Whether the server keeps the connection open after the answer.
    keep: bool,
    /// The headers a failure type reads (`Retry-After`).
    headers: http::HeaderMap,
}

fn parse_head(response: &httparse::Response<'_, '_>) -> Result<Head, Failed> {
    let status = response.code.unwrap_or_default();
    let mut keep = response.version == Some(1);
    let mut length = None;
    let mut chunked = false;
    let mut headers = http::HeaderMap::new();
    for h in response.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or_default().trim();
        if h.name.eq_ignore_ascii_case("retry-after")
            && let Ok(v) = http::HeaderValue::from_str(value)
        {
            headers.insert(http::header::RETRY_AFTER, v);
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let n = value.parse::<usize>().map_err(|_| {
                Failed::answered(ProbeError::Malformed(format!(
                    "bad Content-Length {value:?}"
                )))
            })?;
            if length.is_some_and(|l| l != n) {
                return Err(Failed::answered(ProbeError::Malformed(
                    "two different Content-Length headers".into(),
                )));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if h.name.eq_ignore_ascii_case("connection")
            && value
                .split(',')
                .any(|v| v.trim().eq_ignore_ascii_case("close"))
        {
            keep = false;
        }
    }
    // Chunked wins over a length (RFC 9112, 6.3).
    let framing = match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::UntilClose,
    };
    Ok(Head {
        status,
        framing,
        keep,
        headers,
    })
}

fn too_large() -> ProbeError {
    ProbeError::Malformed(format!("body larger than {} KiB", MAX_BODY / 1024))
}

fn io_error(e: &std::io::Error) -> ProbeError {
    classify_io(e).unwrap_or_else(|| ProbeError::Transport(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server on loopback that answers each connection's requests with
    /// the given raw bytes, one reply per request, then does `after`.
    async fn serve(replies: Vec<&'static [u8]>, close_after: bool) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            for reply in replies {
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while !request.ends_with(b"\r\n\r\n") {
                    if conn.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    request.push(byte[0]);
                }
                // Written in two pieces: framing must not rely on one read.
                let (a, b) = reply.split_at(reply.len() / 2);
                conn.write_all(a).await.unwrap();
                conn.flush().await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                conn.write_all(b).await.unwrap();
            }
            if !close_after {
                std::future::pending::<()>().await;
            }
        });
        addr
    }

    fn get() -> Get {
        Get::new("/v1/models", "127.0.0.1:1", "t", Some("Bearer k")).unwrap()
    }

    fn ok(_: u16) -> bool {
        true
    }

    async fn once(reply: &'static [u8]) -> (Result<Vec<u8>, Failed>, bool) {
        let addr = serve(vec![reply], false).await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let (result, kept) = exchange(stream, &get(), &ok).await;
        (result, kept.is_some())
    }

    #[tokio::test]
    async fn each_framing_gives_the_body_and_says_whether_the_connection_stays() {
        let (body, kept) = once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello").await;
        assert_eq!(body.unwrap(), b"hello");
        assert!(kept);
        let (body, kept) = once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nhel\r\n2\r\nlo\r\n0\r\nTrailer: t\r\n\r\n",
        )
        .await;
        assert_eq!(body.unwrap(), b"hello");
        assert!(kept);
        let (body, kept) =
            once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello").await;
        assert_eq!(body.unwrap(), b"hello");
        assert!(!kept, "Connection: close");
        let (body, kept) =
            once(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n").await;
        assert_eq!(body.unwrap(), b"");
        assert!(kept);
        let (body, kept) = once(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        assert_eq!(body.unwrap(), b"ok");
        assert!(!kept, "HTTP/1.0 closes");
        let (_, kept) = once(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA").await;
        assert!(!kept, "bytes beyond the answer");
    }

    #[tokio::test]
    async fn a_body_until_close_is_read_to_the_end() {
        let addr = serve(vec![b"HTTP/1.1 200 OK\r\n\r\nall of it"], true).await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let (body, kept) = exchange(stream, &get(), &ok).await;
        assert_eq!(body.unwrap(), b"all of it");
        assert!(kept.is_none());
    }

    #[tokio::test]
    async fn a_kept_connection_carries_the_next_request() {
        let addr = serve(
            vec![
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na",
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb",
            ],
            false,
        )
        .await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let (body, kept) = exchange(stream, &get(), &ok).await;
        assert_eq!(body.unwrap(), b"a");
        let (body, _) = exchange(kept.unwrap(), &get(), &ok).await;
        assert_eq!(body.unwrap(), b"b");
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_may_be_retried_and_an_answer_may_not() {
        // Closed before any byte: the kept connection's race.
        let addr = serve(vec![], true).await;
        let stream = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let (result, _) = exchange(stream, &get(), &ok).await;
        assert!(result.unwrap_err().retry);
        // Closed inside the body: an answer, not retried.
        let addr = serve(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhal"],
            true,
        )
        .await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let failed = exchange(stream, &get(), &ok).await.0.unwrap_err();
        assert!(!failed.retry);
        assert!(
            matches!(failed.error, ProbeError::Transport(_)),
            "{:?}",
            failed.error
        );
    }

    #[tokio::test]
    async fn an_unwanted_status_gives_its_failure_type_without_reading_the_body() {
        let addr = serve(
            vec![b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 1000000\r\n\r\n"],
            false,
        )
        .await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let wanted = |s: u16| s == 200;
        let (result, kept) = exchange(stream, &get(), &wanted).await;
        assert_eq!(
            result.unwrap_err().error,
            ProbeError::RateLimited {
                retry_after_s: Some(7)
            }
        );
        assert!(kept.is_none());
    }

    #[tokio::test]
    async fn oversized_and_malformed_answers_are_refused() {
        let malformed = |r: Result<Vec<u8>, Failed>| match r {
            Err(Failed {
                error: ProbeError::Malformed(m),
                retry: false,
            }) => m,
            other => panic!("{other:?}"),
        };
        let (r, _) = once(b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n").await;
        assert!(malformed(r).contains("larger"));
        let (r, _) =
            once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffff\r\n").await;
        assert!(malformed(r).contains("larger"));
        let (r, _) = once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").await;
        assert!(malformed(r).contains("chunk size"));
        let (r, _) =
            once(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc").await;
        assert!(malformed(r).contains("Content-Length"));
        let (r, _) = once(b"NOT HTTP AT ALL\r\n\r\n").await;
        assert!(malformed(r).contains("head"));
        // A head that never ends.
        static LONG: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let long = LONG.get_or_init(|| {
            let mut v = b"HTTP/1.1 200 OK\r\n".to_vec();
            v.extend(std::iter::repeat_n(b"X-A: b\r\n".as_slice(), 40).flatten());
            v.extend(std::iter::repeat_n(b'a', 20_000));
            v
        });
        let (r, _) = once(long).await;
        assert!(malformed(r).contains("head"));
    }

    #[test]
    fn a_request_cannot_smuggle_a_line() {
        assert!(Get::new("/a b", "h", "u", None).is_err());
        assert!(Get::new("/a\r\nX: y", "h", "u", None).is_err());
        assert!(Get::new("a", "h", "u", None).is_err());
        assert!(Get::new("/ok", "h\r\nX: y", "u", None).is_err());
        assert!(Get::new("/ok", "h", "u", Some("Bearer a\nb")).is_err());
        let get = Get::new("/ok?x=1", "h:1", "u", Some("Bearer k")).unwrap();
        assert_eq!(
            get.0,
            b"GET /ok?x=1 HTTP/1.1\r\nHost: h:1\r\nUser-Agent: u\r\nAuthorization: Bearer k\r\nAccept: */*\r\n\r\n"
        );
    }
}
