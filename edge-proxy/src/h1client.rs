//! The connection pool of an HTTP/1.1 origin (plain or TLS), and a lean client on it for
//! requests without a body or with a small one (the bulk of edge traffic).
//!
//! Why not hyper-util's pooled client for these: it runs every connection in a task of its own
//! and hands each request to it over a channel, so one proxied request costs several task
//! switches and wake-ups on the edge's one worker, plus a pool checkout keyed by URI (the largest
//! user-space cost after hyper's server in the profile in docs/benchmarks.md). Here the request's
//! own task writes the head, parses the answer and, for small responses, reads the body whole;
//! idle connections wait in a plain list. Larger or unsized bodies and upgrades take hyper's
//! HTTP/1 client on a connection from the same list ([`H1Pool::send_streaming`]), so an origin
//! has one pool whatever its requests are; HTTP/2 origins stay with hyper-util (see `upstream`).
//!
//! Framing of the response body is the sans-IO [`BodyDecoder`]; the IO around it is thin.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use http_body::Frame;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Most bytes in a response head (status line and headers) or a chunked body's trailer section.
const MAX_HEAD: usize = 64 * 1024;
/// Most headers in a response head.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (size, extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// Bytes asked of the kernel per read.
const READ_CHUNK: usize = 16 * 1024;
/// Largest data frame handed on from a streamed body.
const MAX_FRAME: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum H1Error {
    /// Nothing was sent: the connection could not be made.
    #[error("connect to {authority}: {source}")]
    Connect {
        authority: Arc<str>,
        source: io::Error,
    },
    #[error("origin connection: {0}")]
    Io(#[from] io::Error),
    #[error("origin closed the connection before a complete response head")]
    ClosedBeforeHead,
    #[error("origin sent a malformed response: {0}")]
    Malformed(&'static str),
    /// A request with a body or an upgrade, carried by hyper's HTTP/1 client.
    #[error("origin exchange: {0}")]
    Exchange(#[from] hyper::Error),
    /// The connection closed before the request was written (hyper handed it back).
    #[error("origin closed a new connection before the request was sent: {0}")]
    Unsent(hyper::Error),
}

impl H1Error {
    /// Whether the request certainly never reached the origin.
    pub(crate) fn never_started(&self) -> bool {
        matches!(self, Self::Connect { .. } | Self::Unsent(_))
    }
}

/// TLS to the origin: the connector (its config offers only `http/1.1` by ALPN) and the name.
pub(crate) type TlsTo = (tokio_rustls::TlsConnector, ServerName<'static>);

/// A connection to an origin, plain or TLS (also under hyper-util's pool, see `upstream`).
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// TLS negotiated HTTP/2 by ALPN.
    pub(crate) fn negotiated_h2(&self) -> bool {
        matches!(self, Self::Tls(s) if s.get_ref().1.alpn_protocol() == Some(b"h2"))
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Plain(_) => "Plain",
            Self::Tls(_) => "Tls",
        })
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Connects to `authority` (TCP without Nagle, then TLS when given); no timeout of its own.
pub(crate) async fn dial(authority: &str, tls: &Option<TlsTo>) -> io::Result<Stream> {
    let tcp = TcpStream::connect(authority).await?;
    tcp.set_nodelay(true)?;
    Ok(match tls {
        None => Stream::Plain(tcp),
        Some((connector, name)) => {
            Stream::Tls(Box::new(connector.connect(name.clone(), tcp).await?))
        }
    })
}

/// A connection with whatever bytes were read past the last response.
#[derive(Debug)]
struct Conn {
    io: Stream,
    buf: BytesMut,
    served: bool,
}

#[derive(Debug)]
struct Idle {
    conn: Conn,
    since: Instant,
}

/// Idle keep-alive connections to one HTTP/1.1 origin identity.
pub(crate) struct H1Pool {
    authority: Arc<str>,
    tls: Option<TlsTo>,
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
}

/// A response head and its body as the client gets it.
#[derive(Debug)]
pub(crate) struct H1Response {
    pub(crate) parts: http::response::Parts,
    pub(crate) body: H1Body,
    /// The connection had served a request before this one (else it was opened for this one).
    pub(crate) reused: bool,
}

#[derive(Debug)]
pub(crate) enum H1Body {
    /// Read whole (`Content-Length` no larger than the caller's `buffer_up_to`, or no body).
    Full(Bytes),
    /// Read from the connection as the client consumes it.
    Stream(StreamBody),
}

impl H1Pool {
    pub(crate) fn new(
        authority: Arc<str>,
        tls: Option<TlsTo>,
        max_idle: usize,
        idle_timeout: Duration,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        let pool = Arc::new(Self {
            authority,
            tls,
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
            connect_timeout,
        });
        // Closes connections idle for too long even when no request comes to reuse them.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(reap(Arc::downgrade(&pool), idle_timeout));
        }
        pool
    }

    /// Idle connections held now.
    #[cfg(test)]
    fn idle_len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // A panic while holding this lock cannot leave the list inconsistent (push/pop only).
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn checkout(&self, now: Instant) -> Option<Conn> {
        let mut idle = self.lock();
        while let Some(i) = idle.pop() {
            if now.saturating_duration_since(i.since) < self.idle_timeout {
                return Some(i.conn);
            }
        }
        None
    }

    /// An idle connection on which nothing arrived while it waited (no close, no stray bytes).
    fn checkout_open(&self, now: Instant) -> Option<Conn> {
        while let Some(mut conn) = self.checkout(now) {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let tcp = match &conn.io {
                Stream::Plain(tcp) => tcp,
                Stream::Tls(tls) => tls.get_ref().0,
            };
            // Not readable as far as the reactor knows: nothing arrived, no system call needed.
            if tcp.poll_read_ready(&mut cx).is_pending() {
                return Some(conn);
            }
            // Something may have: a read tells a close or stray bytes from a stale readiness.
            let mut byte = [0u8; 1];
            let mut probe = ReadBuf::new(&mut byte);
            if Pin::new(&mut conn.io)
                .poll_read(&mut cx, &mut probe)
                .is_pending()
            {
                return Some(conn);
            }
        }
        None
    }

    /// Pools `conn` for the next request, unless the origin sent bytes past the response it
    /// just finished (broken framing: the next answer on it could not be trusted).
    fn checkin(&self, conn: Conn) {
        if !conn.buf.is_empty() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < self.max_idle {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<Conn, H1Error> {
        let err = |source| H1Error::Connect {
            authority: self.authority.clone(),
            source,
        };
        let io = tokio::time::timeout(self.connect_timeout, dial(&self.authority, &self.tls))
            .await
            .map_err(|_| err(io::Error::new(io::ErrorKind::TimedOut, "timed out")))?
            .map_err(err)?;
        Ok(Conn {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            served: false,
        })
    }

    /// Sends `head` (an already encoded request, see [`encode_request`]) and reads the response
    /// head; bodies of at most `buffer_up_to` bytes are read whole.
    ///
    /// A reused connection that the origin closed while it sat idle is retried once on a new one
    /// when the request is `idempotent` (repeating it is harmless). Otherwise idle connections are
    /// first checked for a close that already arrived ([`Self::checkout_open`]), and one that
    /// closes after the request was written is a failure: the origin may have acted on it.
    pub(crate) async fn send(
        self: &Arc<Self>,
        method: &Method,
        head: &[u8],
        buffer_up_to: u64,
        idempotent: bool,
    ) -> Result<H1Response, H1Error> {
        let idle = if idempotent {
            self.checkout(Instant::now())
        } else {
            self.checkout_open(Instant::now())
        };
        if let Some(conn) = idle {
            match self.exchange(conn, method, head, buffer_up_to).await {
                Err(Exchange::Stale) if idempotent => {}
                Err(Exchange::Stale) => return Err(H1Error::ClosedBeforeHead),
                Err(Exchange::Failed(e)) => return Err(e),
                Ok(r) => return Ok(r),
            }
        }
        let conn = self.connect().await?;
        match self.exchange(conn, method, head, buffer_up_to).await {
            Ok(r) => Ok(r),
            Err(Exchange::Stale) => Err(H1Error::ClosedBeforeHead),
            Err(Exchange::Failed(e)) => Err(e),
        }
    }

    async fn exchange(
        self: &Arc<Self>,
        mut conn: Conn,
        method: &Method,
        head: &[u8],
        buffer_up_to: u64,
    ) -> Result<H1Response, Exchange> {
        let reused = conn.served;
        // TLS buffers records until flushed; for TCP the flush is free.
        let written = async {
            conn.io.write_all(head).await?;
            conn.io.flush().await
        };
        if let Err(e) = written.await {
            return Err(if reused {
                Exchange::Stale
            } else {
                Exchange::Failed(e.into())
            });
        }
        let parsed = loop {
            match parse_head(&conn.buf) {
                Ok(Some(p)) if p.status.is_informational() && p.status.as_u16() != 101 => {
                    // 100 Continue and friends: skip, the real answer follows.
                    conn.buf.advance(p.len);
                    continue;
                }
                Ok(Some(p)) => break p,
                Ok(None) => {}
                Err(e) => return Err(Exchange::Failed(e)),
            }
            if conn.buf.len() >= MAX_HEAD {
                return Err(Exchange::Failed(H1Error::Malformed(
                    "response head too large",
                )));
            }
            conn.buf.reserve(READ_CHUNK);
            match tokio::io::AsyncReadExt::read_buf(&mut conn.io, &mut conn.buf).await {
                Ok(0) if conn.buf.is_empty() && reused => return Err(Exchange::Stale),
                Ok(0) => return Err(Exchange::Failed(H1Error::ClosedBeforeHead)),
                Ok(_) => {}
                Err(_) if conn.buf.is_empty() && reused => return Err(Exchange::Stale),
                Err(e) => return Err(Exchange::Failed(e.into())),
            }
        };
        if parsed.status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Exchange::Failed(H1Error::Malformed(
                "101 to a request that did not ask to switch",
            )));
        }
        let head_bytes = conn.buf.split_to(parsed.len).freeze();
        let headers = parsed.headers(&head_bytes).map_err(Exchange::Failed)?;
        let decoder =
            BodyDecoder::for_response(method, parsed.status, &headers).map_err(Exchange::Failed)?;
        let keep_alive =
            parsed.version_1_1 && !connection_close(&headers) && decoder != BodyDecoder::Close;
        let mut resp = http::Response::new(());
        *resp.status_mut() = parsed.status;
        *resp.headers_mut() = headers;
        let (parts, ()) = resp.into_parts();
        conn.served = true;
        let mut r = H1Response {
            parts,
            body: H1Body::Full(Bytes::new()),
            reused,
        };
        match decoder {
            BodyDecoder::Done => {
                if keep_alive {
                    self.checkin(conn);
                }
            }
            BodyDecoder::Length(n) if n <= buffer_up_to => {
                // Small: read it whole (usually already in the buffer with the head).
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                while conn.buf.len() < n {
                    conn.buf.reserve(n - conn.buf.len());
                    let got = tokio::io::AsyncReadExt::read_buf(&mut conn.io, &mut conn.buf)
                        .await
                        .map_err(|e| Exchange::Failed(e.into()))?;
                    if got == 0 {
                        return Err(Exchange::Failed(H1Error::Malformed(
                            "response body shorter than its Content-Length",
                        )));
                    }
                }
                r.body = H1Body::Full(conn.buf.split_to(n).freeze());
                if keep_alive {
                    self.checkin(conn);
                }
            }
            decoder => {
                r.body = H1Body::Stream(StreamBody {
                    conn: Some(conn),
                    decoder,
                    pool: if keep_alive {
                        Arc::downgrade(self)
                    } else {
                        Weak::new()
                    },
                    eof: false,
                });
            }
        }
        Ok(r)
    }
}

impl std::fmt::Debug for H1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Pool")
            .field("authority", &self.authority)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

enum Exchange {
    /// A reused connection turned out closed before any response byte.
    Stale,
    Failed(H1Error),
}

/// A response from [`H1Pool::send_streaming`].
#[derive(Debug)]
pub(crate) struct Streamed {
    pub(crate) response: http::Response<PooledBody>,
    /// As in [`H1Response`].
    pub(crate) reused: bool,
}

impl H1Pool {
    /// Sends a request the lean path does not carry (a body to stream, an upgrade) with hyper's
    /// HTTP/1 client, on a connection from the same idle list: an origin has one pool of
    /// connections whatever its requests are. The connection goes back to the list when the
    /// exchange ended cleanly (see [`keep_or_close`]); after an upgrade it belongs to the upgrade.
    ///
    /// `req` carries an origin-form target and a `Host` header. A pooled connection the origin
    /// closed while it sat idle hands the unsent request back (hyper's `TrySendError`), which is
    /// then sent on the next one, so only requests that may have left fail.
    pub(crate) async fn send_streaming<B>(
        self: &Arc<Self>,
        mut req: http::Request<B>,
        upgrade: bool,
    ) -> Result<Streamed, H1Error>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        loop {
            let (conn, reused) = match self.checkout(Instant::now()) {
                Some(conn) => (conn, true),
                None => (self.connect().await?, false),
            };
            let (mut tx, driver) = hyper::client::conn::http1::Builder::new()
                .max_headers(MAX_HEADERS)
                .handshake::<_, B>(hyper_util::rt::TokioIo::new(conn.io))
                .await?;
            let (verdict_tx, verdict_rx) = tokio::sync::oneshot::channel();
            if upgrade {
                tokio::spawn(async move {
                    if let Err(e) = driver.with_upgrades().await {
                        tracing::debug!(error = %e, "origin connection ended with an error");
                    }
                });
            } else {
                tokio::spawn(keep_or_close(driver, verdict_rx, Arc::downgrade(self)));
            }
            let resp = match tx.try_send_request(req).await {
                Ok(resp) => resp,
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => {
                        req = unsent;
                        continue;
                    }
                    Some(_) => return Err(H1Error::Unsent(e.into_error())),
                    None => return Err(e.into_error().into()),
                },
            };
            let keep = !upgrade
                && resp.version() == http::Version::HTTP_11
                && !resp.status().is_informational()
                && !connection_close(resp.headers());
            let response = resp.map(|inner| PooledBody {
                inner,
                verdict: Some((keep, verdict_tx)),
            });
            return Ok(Streamed { response, reused });
        }
    }
}

/// Drives one exchange of [`H1Pool::send_streaming`], then pools the connection if hyper left it
/// idle (the request went out whole: otherwise the driver errs), nothing was read past the
/// response, and the response body said the connection may stay and was read to its end.
async fn keep_or_close<B>(
    driver: hyper::client::conn::http1::Connection<hyper_util::rt::TokioIo<Stream>, B>,
    verdict: tokio::sync::oneshot::Receiver<bool>,
    pool: Weak<H1Pool>,
) where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let parts = match driver.without_shutdown().await {
        Ok(parts) => parts,
        Err(e) => {
            tracing::debug!(error = %e, "origin connection ended with an error");
            return;
        }
    };
    if verdict.await == Ok(true)
        && parts.read_buf.is_empty()
        && let Some(pool) = pool.upgrade()
    {
        pool.checkin(Conn {
            io: parts.io.into_inner(),
            buf: BytesMut::with_capacity(READ_CHUNK),
            served: true,
        });
    }
}

/// A response body from [`H1Pool::send_streaming`] (or from hyper-util's HTTP/2 client, without
/// a verdict): tells the connection's driver, once, whether the body was read to its end.
#[derive(Debug)]
pub(crate) struct PooledBody {
    inner: hyper::body::Incoming,
    /// Whether the response allows reuse, and where the verdict goes.
    verdict: Option<(bool, tokio::sync::oneshot::Sender<bool>)>,
}

impl PooledBody {
    /// A body whose connection is not this module's to pool.
    pub(crate) fn unpooled(inner: hyper::body::Incoming) -> Self {
        Self {
            inner,
            verdict: None,
        }
    }

    fn verdict(&mut self, ended: bool) {
        if let Some((keep, tx)) = self.verdict.take() {
            let _ = tx.send(keep && ended);
        }
    }
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            None => this.verdict(true),
            Some(Err(_)) => this.verdict(false),
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Consumers may stop at `is_end_stream` without polling the final `None`.
        let ended = http_body::Body::is_end_stream(&self.inner);
        self.verdict(ended);
    }
}

async fn reap(pool: Weak<H1Pool>, idle_timeout: Duration) {
    let mut every = tokio::time::interval(idle_timeout / 2);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let now = Instant::now();
        pool.lock()
            .retain(|i| now.saturating_duration_since(i.since) < idle_timeout);
    }
}

/// Encodes a request: request line, the given headers (invalid names or values are dropped, as
/// `HeaderValue` parsing would), and `Host: fallback_host` when the headers carry none. `body`
/// follows the head under a `Content-Length` of its own (the headers' `Content-Length` is
/// dropped, so the framing always matches the bytes that follow).
pub(crate) fn encode_request<'a>(
    method: &[u8],
    target: &[u8],
    headers: impl IntoIterator<Item = (&'a [u8], &'a [u8])> + Clone,
    fallback_host: &str,
    body: Option<&[u8]>,
) -> Option<Vec<u8>> {
    if !method.iter().all(|&b| is_token(b)) || method.is_empty() || !valid_target(target) {
        return None;
    }
    let size: usize = headers
        .clone()
        .into_iter()
        .map(|(n, v)| n.len() + v.len() + 4)
        .sum();
    let body_len = body.map_or(0, <[u8]>::len);
    let mut out = Vec::with_capacity(method.len() + target.len() + size + 64 + body_len);
    out.extend_from_slice(method);
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut host = false;
    for (name, value) in headers {
        if name.is_empty()
            || !name.iter().all(|&b| is_token(b))
            || !valid_value(value)
            || (body.is_some() && name.eq_ignore_ascii_case(b"content-length"))
        {
            continue;
        }
        host |= name.eq_ignore_ascii_case(b"host");
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if !host {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(fallback_host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(body) = body {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(body_len.to_string().as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(body);
    } else {
        out.extend_from_slice(b"\r\n");
    }
    Some(out)
}

fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Field values: visible ASCII, obs-text and tabs, never CR, LF or NUL.
fn valid_value(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

fn valid_target(t: &[u8]) -> bool {
    !t.is_empty() && t.iter().all(|&b| b > 0x20 && b != 0x7f)
}

/// A parsed response head: where it ends and where its headers sit in the buffer.
#[derive(Debug)]
struct ParsedHead {
    len: usize,
    status: StatusCode,
    version_1_1: bool,
    /// (name, value) byte ranges within the head.
    fields: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
}

impl ParsedHead {
    fn headers(&self, head: &Bytes) -> Result<HeaderMap, H1Error> {
        let mut map = HeaderMap::with_capacity(self.fields.len());
        for (n, v) in &self.fields {
            let name = HeaderName::from_bytes(&head[n.clone()])
                .map_err(|_| H1Error::Malformed("invalid header name"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(v.clone()))
                .map_err(|_| H1Error::Malformed("invalid header value"))?;
            map.append(name, value);
        }
        Ok(map)
    }
}

/// Parses a response head at the start of `buf`: `Ok(None)` until it is complete.
fn parse_head(buf: &[u8]) -> Result<Option<ParsedHead>, H1Error> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(H1Error::Malformed("more than 128 response headers"));
        }
        Err(_) => return Err(H1Error::Malformed("unparsable status line or header")),
    };
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(H1Error::Malformed("invalid status code"))?;
    let base = buf.as_ptr() as usize;
    let range = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    let fields = resp
        .headers
        .iter()
        .map(|h| (range(h.name.as_bytes()), range(h.value)))
        .collect();
    Ok(Some(ParsedHead {
        len,
        status,
        version_1_1: resp.version == Some(1),
        fields,
    }))
}

fn connection_close(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

/// How a response body is delimited, and how much of it is left (sans-IO).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BodyDecoder {
    /// `Content-Length` bytes left.
    Length(u64),
    Chunked(ChunkState),
    /// Until the origin closes the connection (which then is not reused).
    Close,
    Done,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// What [`BodyDecoder::decode`] found in the buffer.
#[derive(Debug, PartialEq)]
pub(crate) enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// Read more (or, at EOF, see `decode`'s errors).
    NeedMore,
    End,
}

impl BodyDecoder {
    /// RFC 9112 §6.3: no body for HEAD, 1xx, 204 and 304; chunked wins over a length; a length
    /// must be one valid number; otherwise until close.
    pub(crate) fn for_response(
        method: &Method,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Result<Self, H1Error> {
        if method == Method::HEAD
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok(Self::Done);
        }
        if let Some(te) = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
        {
            let last = te.as_bytes().rsplit(|&b| b == b',').next().unwrap_or(b"");
            return if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                Ok(Self::Chunked(ChunkState::Size))
            } else {
                Ok(Self::Close)
            };
        }
        let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
        match (lengths.next(), lengths.next()) {
            (None, _) => Ok(Self::Close),
            (Some(v), None) => {
                let n = std::str::from_utf8(v.as_bytes())
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or(H1Error::Malformed("invalid Content-Length"))?;
                Ok(if n == 0 { Self::Done } else { Self::Length(n) })
            }
            (Some(_), Some(_)) => Err(H1Error::Malformed("several Content-Length headers")),
        }
    }

    /// Takes the next piece of body out of `buf`; `eof` says the connection has closed.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Decoded, H1Error> {
        loop {
            match self {
                Self::Done => return Ok(Decoded::End),
                Self::Close => {
                    if !buf.is_empty() {
                        let n = buf.len().min(MAX_FRAME);
                        return Ok(Decoded::Data(buf.split_to(n).freeze()));
                    }
                    if eof {
                        *self = Self::Done;
                        return Ok(Decoded::End);
                    }
                    return Ok(Decoded::NeedMore);
                }
                Self::Length(left) => {
                    if buf.is_empty() {
                        if eof {
                            return Err(H1Error::Malformed(
                                "response body shorter than its Content-Length",
                            ));
                        }
                        return Ok(Decoded::NeedMore);
                    }
                    let data = take(buf, left);
                    if *left == 0 {
                        *self = Self::Done;
                    }
                    return Ok(Decoded::Data(data));
                }
                Self::Chunked(state) => {
                    let need_more = || {
                        if eof {
                            Err(H1Error::Malformed("chunked body cut short"))
                        } else {
                            Ok(Decoded::NeedMore)
                        }
                    };
                    match state {
                        ChunkState::Size => {
                            let Some(end) = find_crlf(buf) else {
                                if buf.len() > MAX_CHUNK_LINE {
                                    return Err(H1Error::Malformed("chunk size line too long"));
                                }
                                return need_more();
                            };
                            let line = &buf[..end];
                            let digits = line
                                .split(|&b| b == b';')
                                .next()
                                .unwrap_or(b"")
                                .trim_ascii();
                            if digits.is_empty() || digits.len() > 16 {
                                return Err(H1Error::Malformed("invalid chunk size"));
                            }
                            let size = std::str::from_utf8(digits)
                                .ok()
                                .and_then(|s| u64::from_str_radix(s, 16).ok())
                                .ok_or(H1Error::Malformed("invalid chunk size"))?;
                            buf.advance(end + 2);
                            *state = if size == 0 {
                                ChunkState::Trailers
                            } else {
                                ChunkState::Data(size)
                            };
                        }
                        ChunkState::Data(left) => {
                            if buf.is_empty() {
                                return need_more();
                            }
                            let data = take(buf, left);
                            if *left == 0 {
                                *state = ChunkState::DataEnd;
                            }
                            return Ok(Decoded::Data(data));
                        }
                        ChunkState::DataEnd => {
                            if buf.len() < 2 {
                                return need_more();
                            }
                            if &buf[..2] != b"\r\n" {
                                return Err(H1Error::Malformed("chunk not followed by CRLF"));
                            }
                            buf.advance(2);
                            *state = ChunkState::Size;
                        }
                        ChunkState::Trailers => {
                            if buf.starts_with(b"\r\n") {
                                buf.advance(2);
                                *self = Self::Done;
                                return Ok(Decoded::End);
                            }
                            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                            match httparse::parse_headers(buf, &mut slots) {
                                Ok(httparse::Status::Complete((n, fields))) => {
                                    let mut map = HeaderMap::with_capacity(fields.len());
                                    for f in fields {
                                        if let (Ok(name), Ok(value)) = (
                                            HeaderName::from_bytes(f.name.as_bytes()),
                                            HeaderValue::from_bytes(f.value),
                                        ) {
                                            map.append(name, value);
                                        }
                                    }
                                    buf.advance(n);
                                    *self = Self::Done;
                                    return Ok(Decoded::Trailers(map));
                                }
                                Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => {
                                    return need_more();
                                }
                                _ => return Err(H1Error::Malformed("invalid chunked trailers")),
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Splits off as much of the `left` body bytes as the buffer holds (at most one frame).
fn take(buf: &mut BytesMut, left: &mut u64) -> Bytes {
    let n = buf
        .len()
        .min(MAX_FRAME)
        .min(usize::try_from(*left).unwrap_or(usize::MAX));
    *left -= n as u64;
    buf.split_to(n).freeze()
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// A response body read from its connection as the client consumes it; the connection goes back
/// to the pool when the body has been read to its end (and never when it is dropped early).
#[derive(Debug)]
pub(crate) struct StreamBody {
    conn: Option<Conn>,
    decoder: BodyDecoder,
    /// Dangling when the connection must not be reused.
    pool: Weak<H1Pool>,
    eof: bool,
}

impl http_body::Body for StreamBody {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.decode(&mut conn.buf, this.eof) {
                Ok(Decoded::Data(d)) => {
                    if this.decoder == BodyDecoder::Done {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Ok(Decoded::Trailers(t)) => {
                    this.finish();
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            conn.buf.reserve(READ_CHUNK);
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.io),
                cx,
                &mut conn.buf
            )) {
                Ok(0) => this.eof = true,
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || self.decoder == BodyDecoder::Done
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.decoder {
            BodyDecoder::Length(n) => http_body::SizeHint::with_exact(n),
            BodyDecoder::Done => http_body::SizeHint::with_exact(0),
            _ => http_body::SizeHint::default(),
        }
    }
}

impl StreamBody {
    fn finish(&mut self) {
        if let (Some(conn), Some(pool)) = (self.conn.take(), self.pool.upgrade())
            && !self.eof
        {
            pool.checkin(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use std::convert::Infallible;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    fn decode_all(d: &mut BodyDecoder, input: &[u8], step: usize) -> Result<Vec<u8>, H1Error> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match d.decode(&mut buf, fed >= input.len())? {
                Decoded::Data(b) => out.extend_from_slice(&b),
                Decoded::Trailers(_) => {}
                Decoded::End => return Ok(out),
                Decoded::NeedMore => {
                    let n = step.min(input.len() - fed);
                    buf.extend_from_slice(&input[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (n, v) in pairs {
            m.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let get = Method::GET;
        let ok = StatusCode::OK;
        let f = |m: &Method, s, h: &[(&str, &str)]| BodyDecoder::for_response(m, s, &headers(h));
        assert_eq!(
            f(&Method::HEAD, ok, &[("content-length", "5")]).unwrap(),
            BodyDecoder::Done
        );
        assert_eq!(
            f(&get, StatusCode::NOT_MODIFIED, &[("content-length", "5")]).unwrap(),
            BodyDecoder::Done
        );
        assert_eq!(
            f(&get, ok, &[("content-length", "5")]).unwrap(),
            BodyDecoder::Length(5)
        );
        assert_eq!(
            f(&get, ok, &[("content-length", "0")]).unwrap(),
            BodyDecoder::Done
        );
        assert_eq!(
            f(
                &get,
                ok,
                &[
                    ("transfer-encoding", "gzip, chunked"),
                    ("content-length", "3")
                ]
            )
            .unwrap(),
            BodyDecoder::Chunked(ChunkState::Size)
        );
        assert_eq!(
            f(&get, ok, &[("transfer-encoding", "gzip")]).unwrap(),
            BodyDecoder::Close
        );
        assert_eq!(f(&get, ok, &[]).unwrap(), BodyDecoder::Close);
        for bad in ["", "-1", "1 2", "0x10", "+5"] {
            assert!(f(&get, ok, &[("content-length", bad)]).is_err(), "{bad:?}");
        }
        assert!(
            f(
                &get,
                ok,
                &[("content-length", "5"), ("content-length", "5")]
            )
            .is_err()
        );
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_sizes() {
        let wire = b"5;ext=1\r\nhello\r\n1\r\n \r\n6\r\nworld!\r\n0\r\nx-sum: 9\r\n\r\n";
        for step in [1, 2, 3, 7, 64] {
            let mut d = BodyDecoder::Chunked(ChunkState::Size);
            assert_eq!(decode_all(&mut d, wire, step).unwrap(), b"hello world!");
            assert_eq!(d, BodyDecoder::Done);
        }
        // Trailers come out as a trailers frame.
        let mut d = BodyDecoder::Chunked(ChunkState::Size);
        let mut buf = BytesMut::from(&b"0\r\nx-sum: 9\r\n\r\n"[..]);
        match d.decode(&mut buf, false).unwrap() {
            Decoded::Trailers(t) => assert_eq!(t["x-sum"], "9"),
            other => panic!("{other:?}"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn broken_bodies_are_errors_not_hangs() {
        for bad in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\r\nhel",
            b"fffffffffffffffff\r\n",
        ] {
            let mut d = BodyDecoder::Chunked(ChunkState::Size);
            assert!(decode_all(&mut d, bad, 4).is_err(), "{bad:?}");
        }
        let mut d = BodyDecoder::Length(10);
        assert!(decode_all(&mut d, b"short", 3).is_err());
        let mut d = BodyDecoder::Close;
        assert_eq!(
            decode_all(&mut d, b"until close", 4).unwrap(),
            b"until close"
        );
        // A length body stops at its length; what follows stays for the next response.
        let mut d = BodyDecoder::Length(3);
        let mut buf = BytesMut::from(&b"abcHTTP/1.1"[..]);
        assert_eq!(
            d.decode(&mut buf, false).unwrap(),
            Decoded::Data(Bytes::from_static(b"abc"))
        );
        assert_eq!(&buf[..], b"HTTP/1.1");
    }

    #[test]
    fn request_heads_drop_what_could_split_them() {
        let h: Vec<(&[u8], &[u8])> = vec![
            (b"host", b"a.test"),
            (b"x-ok", b"v\tw"),
            (b"x-bad", b"v\r\nInjected: 1"),
            (b"bad name", b"v"),
        ];
        let out = encode_request(b"GET", b"/p?q=1", h.iter().copied(), "o:80", None).unwrap();
        assert_eq!(
            out,
            b"GET /p?q=1 HTTP/1.1\r\nhost: a.test\r\nx-ok: v\tw\r\n\r\n".to_vec()
        );
        let none: Vec<(&[u8], &[u8])> = vec![];
        let out =
            encode_request(b"HEAD", b"/", none.iter().copied(), "10.0.0.1:8080", None).unwrap();
        assert_eq!(
            out,
            b"HEAD / HTTP/1.1\r\nhost: 10.0.0.1:8080\r\n\r\n".to_vec()
        );
        assert!(encode_request(b"GET", b"/a b", none.iter().copied(), "o", None).is_none());
        assert!(encode_request(b"G T", b"/", none.iter().copied(), "o", None).is_none());
    }

    /// An origin that answers each request on a connection with the next canned response, and
    /// reports how many connections it accepted.
    async fn origin(
        responses: Vec<&'static [u8]>,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        origin_over(responses, None).await
    }

    trait OriginIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
    impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> OriginIo for T {}

    /// [`origin`], over TLS when `tls` is given.
    async fn origin_over(
        responses: Vec<&'static [u8]>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = l.accept().await.unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let responses = responses.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let mut s: Box<dyn OriginIo> = match tls {
                        Some(a) => Box::new(a.accept(tcp).await.unwrap()),
                        None => Box::new(tcp),
                    };
                    let mut buf = Vec::new();
                    for r in responses {
                        // Read one request head.
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 1024];
                            let n = s.read(&mut chunk).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        buf.drain(..end);
                        if r.is_empty() {
                            return; // close without answering
                        }
                        s.write_all(r).await.unwrap();
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn pool(addr: &str) -> Arc<H1Pool> {
        H1Pool::new(
            addr.into(),
            None,
            4,
            Duration::from_secs(60),
            Duration::from_secs(1),
        )
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: t\r\n\r\n";

    #[tokio::test]
    async fn keep_alive_connections_are_reused_and_small_bodies_read_whole() {
        let (addr, accepted) = origin(vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nend",
        ])
        .await;
        let p = pool(&addr);
        let r = p.send(&Method::GET, GET, 1024, true).await.unwrap();
        assert!(!r.reused);
        assert_eq!(r.parts.headers["x-a"], "1");
        assert!(matches!(r.body, H1Body::Full(ref b) if b == "hello"));
        assert_eq!(p.idle_len(), 1);

        let r = p.send(&Method::GET, GET, 1024, true).await.unwrap();
        assert!(r.reused);
        let H1Body::Stream(body) = r.body else {
            panic!("chunked bodies stream")
        };
        assert_eq!(p.idle_len(), 0, "busy until its body is read");
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abc");
        assert_eq!(p.idle_len(), 1, "back once the body ended");

        let r = p.send(&Method::GET, GET, 1024, true).await.unwrap();
        assert!(matches!(r.body, H1Body::Full(ref b) if b == "end"));
        assert_eq!(p.idle_len(), 0, "connection: close is not pooled");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_retried_on_a_new_one() {
        // Each connection answers once, then closes at the next request.
        let (addr, accepted) =
            origin(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", b""]).await;
        let p = pool(&addr);
        for _ in 0..3 {
            let r = p.send(&Method::GET, GET, 1024, true).await.unwrap();
            assert!(matches!(r.body, H1Body::Full(ref b) if b == "ok"));
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_connection_with_bytes_past_its_response_is_not_reused() {
        let (addr, accepted) =
            origin(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokJUNK"]).await;
        let p = pool(&addr);
        for _ in 0..2 {
            let r = p.send(&Method::GET, GET, 1024, true).await.unwrap();
            assert!(matches!(r.body, H1Body::Full(ref b) if b == "ok"));
            assert!(
                !r.reused,
                "the next request gets a new connection, not an error"
            );
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(p.idle_len(), 0);
    }

    #[tokio::test]
    async fn failures_say_whether_the_request_left() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let e = pool(&addr)
            .send(&Method::GET, GET, 1024, true)
            .await
            .unwrap_err();
        assert!(e.never_started(), "{e}");

        let (addr, _) = origin(vec![b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n"]).await;
        let e = pool(&addr)
            .send(&Method::GET, GET, 1024, true)
            .await
            .unwrap_err();
        assert!(!e.never_started() && e.to_string().contains("Content-Length"));

        let (addr, _) = origin(vec![b""]).await;
        let e = pool(&addr)
            .send(&Method::GET, GET, 1024, true)
            .await
            .unwrap_err();
        assert!(matches!(e, H1Error::ClosedBeforeHead), "{e}");
    }

    #[tokio::test]
    async fn tls_origins_speak_http1_over_one_reused_connection() {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let cert = rcgen::generate_simple_self_signed(vec!["origin.test".into()]).unwrap();
        let der = CertificateDer::from(cert.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\ntls";
        let (addr, accepted) = origin_over(vec![OK, OK, OK], Some(acceptor)).await;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tls = (
            tokio_rustls::TlsConnector::from(Arc::new(client)),
            ServerName::try_from("origin.test").unwrap(),
        );
        let p = H1Pool::new(
            addr.as_str().into(),
            Some(tls),
            4,
            Duration::from_secs(60),
            Duration::from_secs(1),
        );
        for i in 0..3 {
            let r = p.send(&Method::GET, GET, 1024, true).await.unwrap();
            assert!(matches!(r.body, H1Body::Full(ref b) if b == "tls"));
            assert_eq!(r.reused, i > 0);
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn large_bodies_stream_and_an_abandoned_one_is_not_pooled() {
        static BIG: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let big: &'static [u8] = BIG.get_or_init(|| {
            let mut v = b"HTTP/1.1 200 OK\r\ncontent-length: 200000\r\n\r\n".to_vec();
            v.extend(std::iter::repeat_n(b'x', 200_000));
            v
        });
        let (addr, _) = origin(vec![big, big]).await;
        let p = pool(&addr);
        let r = p.send(&Method::GET, GET, 1024, true).await.unwrap();
        let H1Body::Stream(body) = r.body else {
            panic!("large bodies stream")
        };
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 200_000);
        assert_eq!(p.idle_len(), 1);
        let r = p.send(&Method::GET, GET, 1024, true).await.unwrap();
        drop(r);
        assert_eq!(
            p.idle_len(),
            0,
            "a half-read connection is closed, not reused"
        );
    }

    #[test]
    fn a_small_body_goes_with_the_head_under_its_own_length() {
        let h: &[(&[u8], &[u8])] = &[(b"host", b"h"), (b"content-length", b"999")];
        let out = encode_request(b"POST", b"/u", h.iter().copied(), "o", Some(b"hello")).unwrap();
        assert_eq!(
            out,
            b"POST /u HTTP/1.1\r\nhost: h\r\ncontent-length: 5\r\n\r\nhello".to_vec()
        );
        let out = encode_request(b"PUT", b"/u", h.iter().copied(), "o", Some(b"")).unwrap();
        assert!(out.ends_with(b"content-length: 0\r\n\r\n"));
    }

    #[tokio::test]
    async fn requests_that_cannot_be_repeated_are_never_sent_twice() {
        const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        const POST: &[u8] = b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n";
        // Closed while idle (after its one response): seen before writing, so the POST goes out on
        // a new connection.
        let (addr, accepted) = origin(vec![OK]).await;
        let p = pool(&addr);
        p.send(&Method::GET, GET, 1024, true).await.unwrap();
        let idle = p.checkout(Instant::now()).unwrap();
        let Stream::Plain(tcp) = &idle.io else {
            panic!("plain")
        };
        let mut probe = [0u8; 1];
        assert_eq!(tcp.peek(&mut probe).await.unwrap(), 0, "origin closed it");
        p.checkin(idle);
        let r = p.send(&Method::POST, POST, 1024, false).await.unwrap();
        assert!(!r.reused && matches!(r.body, H1Body::Full(ref b) if b == "ok"));
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);

        // Closed after reading the POST, without an answer: the origin may have acted on it, so
        // it is an error, not a second copy on a new connection.
        let (addr, accepted) = origin(vec![OK, b""]).await;
        let p = pool(&addr);
        p.send(&Method::GET, GET, 1024, true).await.unwrap();
        let e = p.send(&Method::POST, POST, 1024, false).await.unwrap_err();
        assert!(!e.never_started(), "{e}");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// A hyper origin: `POST` echoes its body, `/ws` switches protocols and echoes raw bytes,
    /// `/big` answers 200 000 bytes, anything else `get`. Counts accepted and closed connections.
    async fn echo_origin() -> (String, [Arc<std::sync::atomic::AtomicUsize>; 2]) {
        use hyper::body::Incoming;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (count, ended) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = l.accept().await.unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let ended = ended.clone();
                let svc =
                    hyper::service::service_fn(|mut req: http::Request<Incoming>| async move {
                        let body = if req.uri().path() == "/ws" {
                            let up = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                let mut io = hyper_util::rt::TokioIo::new(up.await.unwrap());
                                let mut b = [0u8; 64];
                                let n = io.read(&mut b).await.unwrap();
                                io.write_all(&b[..n]).await.unwrap();
                            });
                            let mut resp =
                                http::Response::new(http_body_util::Full::new(Bytes::new()));
                            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                            resp.headers_mut()
                                .insert(header::UPGRADE, HeaderValue::from_static("echo"));
                            resp.headers_mut()
                                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                            return Ok::<_, hyper::Error>(resp);
                        } else if req.method() == Method::POST {
                            req.into_body().collect().await?.to_bytes()
                        } else if req.uri().path() == "/big" {
                            Bytes::from(vec![b'x'; 200_000])
                        } else {
                            Bytes::from_static(b"get")
                        };
                        Ok(http::Response::new(http_body_util::Full::new(body)))
                    });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .with_upgrades()
                        .await;
                    ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        });
        (addr, [accepted, closed])
    }

    fn request<B>(method: Method, path: &str, body: B) -> http::Request<B> {
        let mut req = http::Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = path.parse().unwrap();
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("t"));
        req
    }

    /// The driver pools a connection once the exchange is over, a moment after the body ends.
    async fn until_idle(p: &H1Pool, n: usize) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while p.idle_len() != n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{} idle connections, not {n}", p.idle_len()));
    }

    #[tokio::test]
    async fn streamed_bodies_and_lean_requests_share_one_connection() {
        let (addr, [accepted, closed]) = echo_origin().await;
        let p = pool(&addr);
        let r = p.send(&Method::GET, GET, 1024, true).await.unwrap();
        assert!(matches!(r.body, H1Body::Full(ref b) if b == "get"));
        assert_eq!(p.idle_len(), 1);

        // An upload streamed in three frames rides the connection the GET left idle.
        let frames =
            ["one,", "two,", "three"].map(|s| Ok::<_, Infallible>(Frame::data(Bytes::from(s))));
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let r = p
            .send_streaming(request(Method::POST, "/echo", body), false)
            .await
            .unwrap();
        assert!(r.reused);
        let echoed = r.response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(echoed, "one,two,three");
        until_idle(&p, 1).await;

        let r = p.send(&Method::GET, GET, 1024, true).await.unwrap();
        assert!(r.reused && matches!(r.body, H1Body::Full(ref b) if b == "get"));
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);

        // A response abandoned half-read closes its connection instead of pooling it.
        let r = p
            .send_streaming(request(Method::GET, "/big", Empty::<Bytes>::new()), false)
            .await
            .unwrap();
        assert!(r.reused);
        drop(r);
        tokio::time::timeout(Duration::from_secs(5), async {
            while closed.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the abandoned connection is closed");
        assert_eq!(p.idle_len(), 0);
    }

    #[tokio::test]
    async fn an_unsent_request_moves_past_a_connection_closed_while_idle() {
        // The origin closes each connection right after its one response.
        const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let (addr, accepted) = origin(vec![OK]).await;
        let p = pool(&addr);
        p.send(&Method::GET, GET, 1024, true).await.unwrap();
        assert_eq!(p.idle_len(), 1);
        // Let the origin's close arrive: the next read on the idle connection sees it.
        tokio::time::timeout(Duration::from_secs(5), async {
            while accepted.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        let mut probe = [0u8; 1];
        let idle = p.checkout(Instant::now()).unwrap();
        let Stream::Plain(tcp) = &idle.io else {
            panic!("plain")
        };
        assert_eq!(tcp.peek(&mut probe).await.unwrap(), 0, "origin closed it");
        p.checkin(idle);
        let r = p
            .send_streaming(request(Method::DELETE, "/x", Empty::<Bytes>::new()), false)
            .await
            .unwrap();
        assert!(!r.reused, "sent on a new connection");
        assert_eq!(
            r.response.into_body().collect().await.unwrap().to_bytes(),
            "ok"
        );
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_upgrade_takes_its_connection_out_of_the_pool() {
        let (addr, [accepted, _]) = echo_origin().await;
        let p = pool(&addr);
        p.send(&Method::GET, GET, 1024, true).await.unwrap();
        let mut req = request(Method::GET, "/ws", Empty::<Bytes>::new());
        req.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("echo"));
        req.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let r = p.send_streaming(req, true).await.unwrap();
        assert!(r.reused);
        assert_eq!(r.response.status(), StatusCode::SWITCHING_PROTOCOLS);
        let mut io = hyper_util::rt::TokioIo::new(hyper::upgrade::on(r.response).await.unwrap());
        io.write_all(b"raw bytes").await.unwrap();
        let mut b = [0u8; 9];
        io.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"raw bytes");
        assert_eq!(p.idle_len(), 0);
        // The next request needs a connection of its own.
        let r = p.send(&Method::GET, GET, 1024, true).await.unwrap();
        assert!(!r.reused);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
