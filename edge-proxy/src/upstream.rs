//! Direct origins: backends reached by URL instead of through an agent's tunnel.
//!
//! One process-wide pool keyed on the full upstream identity (scheme, address, SNI, ALPN, CA):
//! services fronting the same origin share its connections, and a connection is never reused
//! under another TLS identity (Pingora's lesson). An HTTP/1.1 identity keeps one list of idle
//! connections (`h1client::H1Pool`) for every request: those without a body or with a small one
//! take the lean client, the rest (large or unsized bodies, upgrades) hyper's HTTP/1 client on a
//! connection from the same list.
//! An HTTP/2 identity is one hyper-util client, which multiplexes; its connector always dials the
//! identity's address, so the request URI can carry the client's host (`:authority`) without
//! steering the dial.
//!
//! [`OriginHandle`] is one origin of one service: in-flight count, latency EWMA, active health
//! verdict and breaker, kept across snapshots while the origin's settings are unchanged.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use coordinator_api::Origin;
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;

use crate::balance::Ewma;
use crate::breaker::Breaker;
use crate::forward::BoxError;

/// Body of a request sent to an origin.
pub(crate) type UpBody = UnsyncBoxBody<Bytes, BoxError>;

/// Time to set up a connection (TCP, and TLS for https) to an origin.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle pooled connections are closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per (identity, host).
const MAX_IDLE_PER_HOST: usize = 256;
/// The OS CA bundle (Debian's ca-certificates) for `ca: "system"`.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Latency samples fade like the agents' (see `registry`).
const LATENCY_DECAY: Duration = Duration::from_secs(10);
const LATENCY_MAX_AGE: Duration = Duration::from_secs(1);

/// Everything that makes two upstream connections interchangeable.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct OriginKey {
    pub(crate) tls: bool,
    /// `host:port` dialled.
    pub(crate) authority: String,
    /// TLS server name (the URL's host).
    pub(crate) sni: String,
    /// ALPN `h2` (TLS) or prior-knowledge h2c (plain).
    pub(crate) h2: bool,
    /// PEM bundle path; `None` is the system bundle.
    pub(crate) ca: Option<String>,
}

impl OriginKey {
    pub(crate) fn parse(o: &Origin) -> Result<Self, String> {
        let uri: Uri = o
            .url
            .parse()
            .map_err(|e| format!("origin {:?}: {e}", o.url))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("origin {:?}: scheme must be http or https", o.url)),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("origin {:?} has no host", o.url))?;
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(Self {
            tls,
            authority: format!("{host}:{port}"),
            sni: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            h2: o.h2,
            ca: o.ca.clone().filter(|c| tls && c != "system"),
        })
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }
}

/// One upstream identity's client (and connection pool).
pub(crate) struct OriginClient {
    pub(crate) key: OriginKey,
    conns: Conns,
    stats: Arc<OriginPoolStats>,
}

/// How an identity's connections are held (one per identity, built on snapshot changes: the
/// size of the HTTP/2 client does not matter).
#[allow(clippy::large_enum_variant)]
enum Conns {
    /// HTTP/1.1 (plain, or TLS offering only `http/1.1`): one idle list for every request.
    H1(Arc<crate::h1client::H1Pool>),
    /// HTTP/2 (h2c, or ALPN `h2`): hyper-util's client, which multiplexes on one connection.
    H2(Client<OriginConnector, UpBody>),
}

/// Why a request to an origin failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OriginError {
    #[error(transparent)]
    H1(#[from] crate::h1client::H1Error),
    #[error(transparent)]
    H2(#[from] hyper_util::client::legacy::Error),
}

impl OriginError {
    /// Whether the request certainly never reached the origin.
    fn never_started(&self) -> bool {
        match self {
            Self::H1(e) => e.never_started(),
            Self::H2(e) => e.is_connect(),
        }
    }
}

/// Connection reuse of the origin pool, by protocol (relaxed atomics).
#[derive(Debug, Default)]
pub(crate) struct OriginPoolStats {
    pub(crate) h1: crate::metrics::PoolCounters,
    pub(crate) h2: crate::metrics::PoolCounters,
}

impl OriginPoolStats {
    fn kind(&self, h2: bool) -> &crate::metrics::PoolCounters {
        if h2 { &self.h2 } else { &self.h1 }
    }
}

/// Rides on every response of one pooled connection (hyper-util copies a connector's `extra`
/// into each response): set by the first response, so later ones know the connection is reused.
#[derive(Clone, Debug)]
struct Served(Arc<AtomicBool>);

impl std::fmt::Debug for OriginClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OriginClient")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl OriginClient {
    fn new(key: OriginKey, stats: Arc<OriginPoolStats>) -> Result<Self, String> {
        let tls = if key.tls {
            let name = ServerName::try_from(key.sni.clone())
                .map_err(|e| format!("origin server name {:?}: {e}", key.sni))?;
            Some((tokio_rustls::TlsConnector::from(tls_config(&key)?), name))
        } else {
            None
        };
        let conns = if key.h2 {
            let connector = OriginConnector {
                authority: key.authority.as_str().into(),
                tls,
                h2c: !key.tls,
                stats: stats.clone(),
            };
            Conns::H2(
                Client::builder(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .pool_timer(TokioTimer::new())
                    .pool_idle_timeout(IDLE_TIMEOUT)
                    .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
                    // The request carries the client's Host; the connector ignores the URI.
                    .set_host(false)
                    .http2_only(!key.tls)
                    .build(connector),
            )
        } else {
            Conns::H1(crate::h1client::H1Pool::new(
                key.authority.as_str().into(),
                tls,
                MAX_IDLE_PER_HOST,
                IDLE_TIMEOUT,
                CONNECT_TIMEOUT,
            ))
        };
        Ok(Self { key, conns, stats })
    }

    /// Sends one request; the URI's authority is the virtual host, never where it is dialled.
    /// `upgrade`: the request asks to switch protocols (its connection then goes to the upgrade).
    pub(crate) async fn send(
        &self,
        mut req: Request<UpBody>,
        upgrade: bool,
    ) -> Result<Response<crate::h1client::PooledBody>, OriginError> {
        let client = match &self.conns {
            Conns::H1(pool) => {
                // HTTP/1 sends the target as given: origin-form, the host in `Host`.
                if !req.headers().contains_key(header::HOST)
                    && let Some(host) = req
                        .uri()
                        .authority()
                        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                {
                    req.headers_mut().insert(header::HOST, host);
                }
                if let Some(target) = req.uri().path_and_query().cloned() {
                    *req.uri_mut() = Uri::from(target);
                }
                let r = pool.send_streaming(req, upgrade).await?;
                let stats = self.stats.kind(false);
                if !r.reused {
                    stats.opened();
                }
                stats.request(r.reused);
                return Ok(r.response);
            }
            Conns::H2(client) => client,
        };
        let resp = client.request(req).await?;
        let reused = resp
            .extensions()
            .get::<Served>()
            .is_some_and(|s| s.0.swap(true, Ordering::Relaxed));
        self.stats
            .kind(resp.version() == http::Version::HTTP_2)
            .request(reused);
        Ok(resp.map(crate::h1client::PooledBody::unpooled))
    }
}

fn tls_config(key: &OriginKey) -> Result<Arc<rustls::ClientConfig>, String> {
    let path = key.ca.as_deref().unwrap_or(SYSTEM_CA_BUNDLE);
    let pem = std::fs::read(path).map_err(|e| format!("read origin CA {path}: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| format!("origin CA {path}: {e}"))?;
        // A bundle may hold certificates rustls cannot use; the others still verify.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(format!("origin CA {path} holds no usable certificate"));
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS config: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = if key.h2 {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(cfg))
}

/// Dials one identity's address (plain TCP or TLS), whatever URI the request carries.
#[derive(Clone)]
struct OriginConnector {
    authority: Arc<str>,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    /// Prior-knowledge HTTP/2 over plain TCP (TLS connections say so by ALPN).
    h2c: bool,
    stats: Arc<OriginPoolStats>,
}

impl tower_service::Service<Uri> for OriginConnector {
    type Response = OriginStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<OriginStream, io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _dst: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let timed_out = || {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect to {} timed out", this.authority),
                )
            };
            tokio::time::timeout(CONNECT_TIMEOUT, async {
                let s = crate::h1client::dial(&this.authority, &this.tls).await?;
                // h2c is prior knowledge; over TLS, ALPN says.
                this.stats.kind(this.h2c || s.negotiated_h2()).opened();
                Ok(OriginStream(TokioIo::new(s)))
            })
            .await
            .map_err(|_| timed_out())?
        })
    }
}

/// A connection to an origin under hyper-util's pool: the lean client's stream in hyper's IO
/// traits, telling hyper-util when TLS negotiated HTTP/2.
struct OriginStream(TokioIo<crate::h1client::Stream>);

impl Connection for OriginStream {
    fn connected(&self) -> Connected {
        // Called once per new connection; its `extra` is copied into each of its responses.
        let c = Connected::new().extra(Served(Arc::new(AtomicBool::new(false))));
        if self.0.inner().negotiated_h2() {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

impl hyper::rt::Read for OriginStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for OriginStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        hyper::rt::Write::is_write_vectored(&self.0)
    }
}

/// The process-wide pool: one client per identity, shared by every service that uses it. Holds
/// weak references, so an identity no service names any more is closed with its last handle.
#[derive(Default)]
pub(crate) struct Pool {
    clients: Mutex<HashMap<OriginKey, Weak<OriginClient>>>,
    /// Connection reuse across every identity, for `/metrics`.
    pub(crate) stats: Arc<OriginPoolStats>,
}

impl Pool {
    /// The client for `key`, created on first use. Called on snapshot changes, not per request.
    pub(crate) fn client(&self, key: &OriginKey) -> Result<Arc<OriginClient>, String> {
        // Held for a map lookup or insert (and reading a CA file on first use), never across
        // `.await`; a poisoned map is still a valid map.
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(key).and_then(Weak::upgrade) {
            return Ok(c);
        }
        clients.retain(|_, w| w.strong_count() > 0);
        let c = Arc::new(OriginClient::new(key.clone(), self.stats.clone())?);
        clients.insert(key.clone(), Arc::downgrade(&c));
        Ok(c)
    }

    /// Identities with a live client.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

/// Process-wide upstream state of an edge.
pub(crate) struct Upstreams {
    pub(crate) pool: Pool,
    /// Signs sticky cookies. Derived from the node token, which every edge of the network shares,
    /// so a cookie set by one edge is honoured by the next one GeoDNS or anycast sends the
    /// client to; random per process when the edge runs without a token (then a restart or
    /// another edge re-balances the client once).
    pub(crate) sticky_secret: [u8; 32],
}

impl Upstreams {
    pub(crate) fn new(node_token: Option<&str>) -> Self {
        use sha2::{Digest, Sha256};
        let sticky_secret = match node_token {
            Some(t) => {
                let mut h = Sha256::new();
                h.update(b"meridian sticky cookie v1\0");
                h.update(t.as_bytes());
                h.finalize().into()
            }
            None => rand::random(),
        };
        Self {
            pool: Pool::default(),
            sticky_secret,
        }
    }
}

/// Keys of origin handles live in the upper half of the u64 space, agent connection keys in the
/// lower, so one detector or exclusion list can hold both.
const ORIGIN_KEY_BIT: u64 = 1 << 63;

/// One direct origin of one service.
pub(crate) struct OriginHandle {
    pub(crate) key: u64,
    /// The origin's URL: its identity for hashing and logs.
    pub(crate) id: String,
    /// Opaque stable name in sticky cookies (no internal address leaks to clients).
    pub(crate) tag: String,
    pub(crate) weight: u32,
    pub(crate) spec: Origin,
    pub(crate) client: Arc<OriginClient>,
    in_flight: AtomicUsize,
    latency: Mutex<Ewma>,
    /// The active health check's verdict (always true without checks).
    healthy: AtomicBool,
    pub(crate) breaker: Mutex<Breaker>,
    /// The service's check settings this handle was built with.
    pub(crate) health_check: Option<coordinator_api::HealthCheck>,
}

impl std::fmt::Debug for OriginHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OriginHandle")
            .field("id", &self.id)
            .field("in_flight", &self.in_flight())
            .field("healthy", &self.healthy())
            .finish_non_exhaustive()
    }
}

/// The tag naming a backend in sticky cookies: a digest of its id, equal on every edge.
pub(crate) fn backend_tag(id: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(id.as_bytes())[..8])
}

impl OriginHandle {
    fn new(
        spec: &Origin,
        client: Arc<OriginClient>,
        health_check: Option<coordinator_api::HealthCheck>,
    ) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self {
            key: ORIGIN_KEY_BIT | NEXT.fetch_add(1, Ordering::Relaxed),
            id: spec.url.clone(),
            tag: backend_tag(&spec.url),
            weight: spec.weight.unwrap_or(1).max(1),
            spec: spec.clone(),
            client,
            in_flight: AtomicUsize::new(0),
            latency: Mutex::new(Ewma::new(LATENCY_DECAY)),
            healthy: AtomicBool::new(true),
            breaker: Mutex::new(Breaker::default()),
            health_check,
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub(crate) fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    pub(crate) fn latency(&self) -> Option<Duration> {
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(Instant::now(), LATENCY_MAX_AGE)
    }

    pub(crate) fn observe_latency(&self, d: Duration) {
        // Held for one float update; a poisoned EWMA is still a valid number.
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(d, Instant::now());
    }

    pub(crate) fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one request against this origin until the lease is dropped.
    pub(crate) fn lease(self: &Arc<Self>) -> OriginLease {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        OriginLease(self.clone())
    }

    /// One health-check request: `GET path` with the origin's own host; the status code.
    pub(crate) async fn probe(&self, path: &str) -> Result<u16, BoxError> {
        let key = &self.client.key;
        let uri: Uri = format!("{}://{}{path}", key.scheme(), key.authority).parse()?;
        let mut req = Request::get(uri).body(empty())?;
        if !key.h2 {
            req.headers_mut()
                .insert(header::HOST, HeaderValue::from_str(&key.authority)?);
        }
        req.headers_mut().insert(
            header::USER_AGENT,
            HeaderValue::from_static("meridian-health-check"),
        );
        let resp = self.client.send(req, false).await?;
        let status = resp.status().as_u16();
        // Drain (bounded by the caller's timeout) so the connection can be reused.
        let _ = resp.into_body().collect().await;
        Ok(status)
    }
}

/// An in-flight request on an origin; dropping it ends the request for balancing.
#[derive(Debug)]
pub(crate) struct OriginLease(Arc<OriginHandle>);

impl OriginLease {
    pub(crate) fn origin(&self) -> &Arc<OriginHandle> {
        &self.0
    }
}

impl Drop for OriginLease {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) fn empty() -> UpBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Origin handles of one service for a new snapshot: the previous handle of an unchanged origin
/// is kept (its in-flight count, latency, health and breaker carry over); a new or changed one
/// gets a new handle and, with checks configured, its own health-check task.
pub(crate) fn build_origins(
    pool: &Pool,
    service: &coordinator_api::Service,
    previous: &[Arc<OriginHandle>],
) -> Arc<[Arc<OriginHandle>]> {
    let mut out = Vec::with_capacity(service.origins.len());
    for o in &service.origins {
        if let Some(prev) = previous
            .iter()
            .find(|h| h.spec == *o && h.health_check == service.health_check)
        {
            out.push(prev.clone());
            continue;
        }
        let client = match OriginKey::parse(o).and_then(|k| pool.client(&k)) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(service = %service.name, origin = %o.url, error = %e, "origin unusable; skipped");
                continue;
            }
        };
        let handle = Arc::new(OriginHandle::new(o, client, service.health_check.clone()));
        if let Some(hc) = &service.health_check {
            let checker = crate::health::Checker::new(hc.into(), Instant::now());
            tokio::spawn(crate::health::drive(Arc::downgrade(&handle), checker));
        }
        out.push(handle);
    }
    out.into()
}

/// Responses up to this size (by `Content-Length`) to idempotent requests are read whole before
/// the client sees the head, so an origin dying mid-body is retried elsewhere (as for agents).
const BUFFER_SMALL: u64 = 64 * 1024;

/// How one attempt on an origin failed, and the answer to give if it is not retried.
pub(crate) struct AttemptError {
    pub(crate) failure: crate::retry::Failure,
    pub(crate) response: Response<crate::forward::RespBody>,
}

/// The request for an origin: the head the edge already rewrote (forwarding headers, request id),
/// the client's host as the URI authority (HTTP/2 `:authority`; the `Host` header for HTTP/1).
fn origin_request(
    client: &OriginClient,
    head: &tunnel_proto::RequestHead,
    body: UpBody,
) -> Result<Request<UpBody>, String> {
    let method =
        http::Method::from_bytes(&head.method).map_err(|e| format!("request method: {e}"))?;
    // Built from the head's shared bytes (no formatting and re-parsing per request).
    let authority = head
        .headers
        .iter()
        .find(|(n, _)| n.as_ref() == b"host")
        .and_then(|(_, v)| http::uri::Authority::from_maybe_shared(v.clone()).ok())
        .map_or_else(
            || http::uri::Authority::try_from(client.key.authority.as_str()),
            Ok,
        )
        .map_err(|e| format!("origin authority: {e}"))?;
    let path = http::uri::PathAndQuery::from_maybe_shared(head.uri.clone())
        .map_err(|e| format!("request target: {e}"))?;
    let scheme = if client.key.tls {
        http::uri::Scheme::HTTPS
    } else {
        http::uri::Scheme::HTTP
    };
    let uri = Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|e| format!("request target: {e}"))?;
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    let headers = req.headers_mut();
    headers.reserve(head.headers.len());
    for (name, value) in &head.headers {
        // HTTP/2 carries the host in `:authority` (from the URI) and never in a Host header.
        if client.key.h2 && name.as_ref() == b"host" {
            continue;
        }
        if let (Some(n), Ok(v)) = (
            crate::headers::header_name(name),
            HeaderValue::from_maybe_shared(value.clone()),
        ) {
            headers.append(n, v);
        }
    }
    Ok(req)
}

/// Whether `e` (or what caused it) is the request body going over its limit.
fn body_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The lean client and the method when a request can take the lean path (see `h1client`): an
/// HTTP/1.1 origin, no upgrade, a common method, and no body or one whose `Content-Length` is at
/// most [`BUFFER_SMALL`] (read whole first, as nginx buffers request bodies, then sent with the
/// head in one write).
fn fast_path<'a>(
    origin: &'a OriginHandle,
    head: &tunnel_proto::RequestHead,
    body: &Option<Incoming>,
    upgrade: &Option<hyper::upgrade::OnUpgrade>,
) -> Option<(&'a Arc<crate::h1client::H1Pool>, http::Method)> {
    let Conns::H1(fast) = &origin.client.conns else {
        return None;
    };
    if upgrade.is_some() {
        return None;
    }
    if let Some(b) = body
        && !http_body::Body::is_end_stream(b)
    {
        // A length hyper holds the client to: the body cannot run longer or end early unnoticed.
        http_body::Body::size_hint(b)
            .exact()
            .filter(|&n| n <= BUFFER_SMALL)?;
    }
    let method = match &head.method[..] {
        b"GET" => http::Method::GET,
        b"HEAD" => http::Method::HEAD,
        b"OPTIONS" => http::Method::OPTIONS,
        b"POST" => http::Method::POST,
        b"PUT" => http::Method::PUT,
        b"PATCH" => http::Method::PATCH,
        b"DELETE" => http::Method::DELETE,
        _ => return None,
    };
    Some((fast, method))
}

/// One attempt on the lean path; the caller checked [`fast_path`] and read the body, if any.
#[allow(clippy::too_many_arguments)]
async fn attempt_fast(
    fast: &Arc<crate::h1client::H1Pool>,
    lease: OriginLease,
    method: http::Method,
    service: &str,
    head: &tunnel_proto::RequestHead,
    body: Option<Bytes>,
    idempotent: bool,
) -> Result<Response<crate::forward::RespBody>, AttemptError> {
    use crate::h1client::H1Body;
    use http::StatusCode;
    let origin = lease.origin().clone();
    let Some(wire) = crate::h1client::encode_request(
        &head.method,
        &head.uri,
        head.headers.iter().map(|(n, v)| (n.as_ref(), v.as_ref())),
        &origin.client.key.authority,
        body.as_deref(),
    ) else {
        return Ok(crate::forward::text(
            StatusCode::BAD_REQUEST,
            "request cannot be forwarded to an origin: invalid request line",
        ));
    };
    let started = Instant::now();
    let buffer_up_to = if idempotent { BUFFER_SMALL } else { 0 };
    let resp = match fast.send(&method, &wire, buffer_up_to, idempotent).await {
        Ok(r) => r,
        Err(e) => {
            let failure = if e.never_started() {
                crate::retry::Failure::NeverStarted
            } else {
                crate::retry::Failure::MaybeStarted
            };
            tracing::debug!(service, origin = %origin.id, error = %e, "origin request failed");
            return Err(AttemptError {
                failure,
                response: crate::forward::text(
                    StatusCode::BAD_GATEWAY,
                    format!("origin {} of service {service} failed: {e}", origin.id),
                ),
            });
        }
    };
    let stats = origin.client.stats.kind(false);
    if !resp.reused {
        stats.opened();
    }
    stats.request(resp.reused);
    origin.observe_latency(started.elapsed());
    let mut parts = resp.parts;
    crate::headers::strip_hop_by_hop(&mut parts.headers);
    let body = match resp.body {
        H1Body::Full(data) => {
            drop(lease);
            crate::forward::full(data)
        }
        H1Body::Stream(inner) => LeasedBody {
            inner,
            _lease: lease,
        }
        .map_err(|e| Box::new(e) as BoxError)
        .boxed_unsync(),
    };
    Ok(Response::from_parts(parts, body))
}

/// One attempt on one origin. `body` is taken once the request starts; `None` with
/// `body_empty` is a retry of a request without a body.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn attempt(
    lease: OriginLease,
    service: &str,
    head: &tunnel_proto::RequestHead,
    body: &mut Option<Incoming>,
    max_body: Option<u64>,
    upgrade: &mut Option<hyper::upgrade::OnUpgrade>,
    idempotent: bool,
) -> Result<Response<crate::forward::RespBody>, AttemptError> {
    use crate::forward::text;
    use crate::retry::Failure;
    use http::StatusCode;
    let origin = lease.origin().clone();
    if let Some((fast, method)) = fast_path(&origin, head, body, upgrade) {
        let data = match body.take() {
            Some(b) if !http_body::Body::is_end_stream(&b) => match b.collect().await {
                Ok(collected) => Some(collected.to_bytes()),
                Err(e) => {
                    return Ok(text(
                        StatusCode::BAD_REQUEST,
                        format!("reading the request body failed: {e}"),
                    ));
                }
            },
            _ => None,
        };
        return attempt_fast(fast, lease, method, service, head, data, idempotent).await;
    }
    let fail = |failure, msg: String| AttemptError {
        failure,
        response: text(StatusCode::BAD_GATEWAY, msg),
    };
    let up_body = match body.take() {
        Some(b) => match max_body {
            Some(max) => {
                http_body_util::Limited::new(b, usize::try_from(max).unwrap_or(usize::MAX))
                    .boxed_unsync()
            }
            None => b.map_err(|e| Box::new(e) as BoxError).boxed_unsync(),
        },
        None => empty(),
    };
    let req = match origin_request(&origin.client, head, up_body) {
        Ok(r) => r,
        Err(e) => {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                format!("request cannot be forwarded to an origin: {e}"),
            ));
        }
    };
    let started = Instant::now();
    let resp = match origin.client.send(req, upgrade.is_some()).await {
        Ok(r) => r,
        Err(e) => {
            if body_too_large(&e) {
                let mut resp = text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "request body is larger than {} bytes",
                        max_body.unwrap_or_default()
                    ),
                );
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return Ok(resp);
            }
            let failure = if e.never_started() {
                Failure::NeverStarted
            } else {
                Failure::MaybeStarted
            };
            let detail = std::error::Error::source(&e)
                .map_or_else(|| e.to_string(), |s| format!("{e}: {s}"));
            tracing::debug!(service, origin = %origin.id, error = %detail, "origin request failed");
            return Err(fail(
                failure,
                format!("origin {} of service {service} failed: {detail}", origin.id),
            ));
        }
    };
    origin.observe_latency(started.elapsed());
    let (mut parts, incoming) = resp.into_parts();
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_side) = upgrade.take() else {
            return Ok(text(
                StatusCode::BAD_GATEWAY,
                "origin switched protocols on a request that did not ask to",
            ));
        };
        let up = parts.headers.get(header::UPGRADE).cloned();
        crate::headers::strip_hop_by_hop(&mut parts.headers);
        if let Some(up) = up {
            parts.headers.insert(header::UPGRADE, up);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let origin_side = hyper::upgrade::on(Response::from_parts(parts.clone(), incoming));
        tokio::spawn(splice(client_side, origin_side, lease));
        return Ok(Response::from_parts(
            parts,
            crate::forward::full(Bytes::new()),
        ));
    }
    if parts.status.is_informational() {
        return Ok(text(
            StatusCode::BAD_GATEWAY,
            format!("origin sent an unexpected {}", parts.status),
        ));
    }
    crate::headers::strip_hop_by_hop(&mut parts.headers);
    let small = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&n| n <= BUFFER_SMALL);
    let body = if idempotent && upgrade.is_none() && small.is_some() {
        match http_body_util::Limited::new(incoming, BUFFER_SMALL as usize)
            .collect()
            .await
        {
            Ok(collected) => {
                drop(lease);
                let trailers = collected.trailers().cloned();
                let data = collected.to_bytes();
                if trailers.is_none() {
                    return Ok(Response::from_parts(parts, crate::forward::full(data)));
                }
                let mut frames = Vec::with_capacity(2);
                if !data.is_empty() {
                    frames.push(Ok(hyper::body::Frame::data(data)));
                }
                if let Some(t) = trailers {
                    frames.push(Ok(hyper::body::Frame::trailers(t)));
                }
                http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
            }
            Err(e) => {
                return Err(fail(
                    Failure::MaybeStarted,
                    format!(
                        "origin {} of service {service} failed mid-response: {e}",
                        origin.id
                    ),
                ));
            }
        }
    } else {
        LeasedBody {
            inner: incoming,
            _lease: lease,
        }
        .map_err(|e| Box::new(e) as BoxError)
        .boxed_unsync()
    };
    Ok(Response::from_parts(parts, body))
}

/// An origin's response body, holding the origin's lease until it ends or is dropped.
struct LeasedBody<B> {
    inner: B,
    _lease: OriginLease,
}

impl<B: http_body::Body<Data = Bytes> + Unpin> http_body::Body for LeasedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// After a `101`: raw bytes both ways between the client's and the origin's upgraded connections.
async fn splice(
    client: hyper::upgrade::OnUpgrade,
    origin: hyper::upgrade::OnUpgrade,
    _lease: OriginLease,
) {
    let (client, origin) = match tokio::try_join!(client, origin) {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade to origin failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut origin = TokioIo::new(origin);
    match tokio::io::copy_bidirectional(&mut client, &mut origin).await {
        Ok((up, down)) => tracing::debug!(up, down, "upgraded origin connection closed"),
        Err(e) => tracing::debug!(error = %e, "upgraded origin connection ended with an error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(url: &str) -> Origin {
        Origin {
            url: url.into(),
            ..Default::default()
        }
    }

    #[test]
    fn keys_carry_the_whole_identity() {
        let k = OriginKey::parse(&origin("http://10.0.0.1")).unwrap();
        assert_eq!(
            (k.tls, k.authority.as_str(), k.h2, k.ca.as_deref()),
            (false, "10.0.0.1:80", false, None)
        );
        let k = OriginKey::parse(&Origin {
            url: "https://api.internal:8443".into(),
            h2: true,
            ca: Some("/ca.pem".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (k.tls, k.authority.as_str(), k.sni.as_str(), k.h2),
            (true, "api.internal:8443", "api.internal", true)
        );
        assert_eq!(k.ca.as_deref(), Some("/ca.pem"));
        let k = OriginKey::parse(&origin("https://[::1]:9")).unwrap();
        assert_eq!((k.authority.as_str(), k.sni.as_str()), ("[::1]:9", "::1"));
        // "system" and no CA are the same identity; a CA on plain http is meaningless.
        let a = OriginKey::parse(&Origin {
            ca: Some("system".into()),
            ..origin("https://x.test")
        });
        assert_eq!(a, OriginKey::parse(&origin("https://x.test")));
        assert!(OriginKey::parse(&origin("ftp://x")).is_err());
        assert!(OriginKey::parse(&origin("x.test:80")).is_err());
    }

    #[tokio::test]
    async fn pool_shares_one_client_per_identity() {
        let pool = Pool::default();
        let a = pool
            .client(&OriginKey::parse(&origin("http://127.0.0.1:1")).unwrap())
            .unwrap();
        let b = pool
            .client(&OriginKey::parse(&origin("http://127.0.0.1:1")).unwrap())
            .unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let h2 = pool
            .client(
                &OriginKey::parse(&Origin {
                    h2: true,
                    ..origin("http://127.0.0.1:1")
                })
                .unwrap(),
            )
            .unwrap();
        assert!(!Arc::ptr_eq(&a, &h2), "ALPN is part of the identity");
        assert_eq!(pool.len(), 2);
        drop((a, b));
        assert_eq!(pool.len(), 1, "an identity nobody uses is released");
        // A missing CA file is an error for that origin, not a panic.
        let bad = OriginKey::parse(&Origin {
            ca: Some("/nonexistent/ca.pem".into()),
            ..origin("https://x.test")
        })
        .unwrap();
        assert!(pool.client(&bad).unwrap_err().contains("nonexistent"));
    }
}
