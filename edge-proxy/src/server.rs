//! Client-facing HTTP/1.1 + HTTP/2 listeners (plain and TLS) and the per-request entry point.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use tunnel_proto::RequestHead;

use crate::access_log::Record as AccessRecord;
use crate::forward::{self, Outgoing, RespBody, text};
use crate::h1guard::{GuardLimits, Guarded};
use crate::headers::{self, ForwardCtx};
use crate::routing::normalize_host;
use crate::state::Shared;

/// Request headers, in bytes (HTTP/1 read buffer; HTTP/2 header list).
pub(crate) const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Request header count (HTTP/1); beyond it hyper answers 431.
pub(crate) const MAX_HEADERS: usize = 100;

/// Connection-level timeouts from the command line.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timeouts {
    /// Time for a client to send a complete request head (and to finish the TLS handshake); also
    /// bounds an idle HTTP/1 keep-alive connection, since hyper arms it while awaiting the next head.
    pub(crate) header_read: Duration,
    /// No byte either way for this long closes an HTTP/1 connection (not upgraded ones).
    pub(crate) idle: Duration,
    /// How long in-flight requests may run after shutdown starts.
    pub(crate) drain: Duration,
}

impl Timeouts {
    fn guard(&self) -> GuardLimits {
        GuardLimits {
            max_head: MAX_HEADER_BYTES,
            max_headers: MAX_HEADERS,
            head_timeout: self.header_read,
            idle_timeout: self.idle,
        }
    }
}
const H2_MAX_STREAMS: u32 = 256;
const H2_KEEPALIVE: Duration = Duration::from_secs(20);
/// Longest a drain waits for connections accepted just before the listener closed to send their
/// first request (see [`Fresh`]).
const FRESH_LINGER: Duration = Duration::from_secs(1);

/// What a request handler knows about its client connection.
#[derive(Clone, Copy, Debug)]
struct ConnInfo {
    remote: SocketAddr,
    proto: &'static str,
}

fn builder(t: Timeouts) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(t.header_read)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(H2_MAX_STREAMS)
        // RFC 8441: WebSockets over HTTP/2 streams.
        .enable_connect_protocol()
        .keep_alive_interval(H2_KEEPALIVE)
        .keep_alive_timeout(H2_KEEPALIVE);
    b
}

/// Accepts until `shutdown`, then lets open connections finish for up to `timeouts.drain`.
pub(crate) async fn serve_listener(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    conn_limit: Arc<Semaphore>,
    timeouts: Timeouts,
    shutdown: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let (fresh_tx, mut fresh_rx) = watch::channel(0usize);
    let fresh_tx = Arc::new(fresh_tx);
    let builder = Arc::new(builder(timeouts));
    let proto = if tls.is_some() { "https" } else { "http" };
    loop {
        let (stream, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = conn_limit.clone().try_acquire_owned() else {
            debug!(%remote, "connection limit reached; closing new connection");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let shared = shared.clone();
        let tls = tls.clone();
        let info = ConnInfo { remote, proto };
        let fresh = Arc::new(Fresh::new(fresh_tx.clone()));
        tokio::spawn(async move {
            let _permit = permit;
            shared.open_connections.fetch_add(1, Ordering::Relaxed);
            let _open = OpenGuard(shared.clone());
            let l4_shared = shared.clone();
            let svc = hyper::service::service_fn(move |req| {
                fresh.served();
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, info, req).await) }
            });
            let res = match tls {
                None => {
                    if !first_byte_within(&stream, timeouts.header_read).await {
                        return;
                    }
                    let io = Guarded::new(stream, timeouts.guard());
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    // SNI passthrough or TLS here; the ClientHello read and the handshake share
                    // the header-read timeout.
                    use crate::passthrough::{Accepted, accept};
                    let tls_stream =
                        match accept(stream, remote, &acceptor, &l4_shared, timeouts.header_read)
                            .await
                        {
                            Accepted::Tls(s) => s,
                            Accepted::Passthrough(p) => {
                                // Not an HTTP connection: out of the first-request drain gate; the
                                // held `watcher` keeps the drain waiting for it (up to its timeout).
                                drop(svc);
                                p.serve(&l4_shared).await;
                                drop(watcher);
                                return;
                            }
                            Accepted::Failed => return,
                        };
                    let io = Guarded::new(tls_stream, timeouts.guard());
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(e) = res {
                debug!(%remote, error = %e, "client connection ended with an error");
            }
        });
    }
    drop(listener);
    // A graceful shutdown closes connections with no request in progress, which includes ones
    // accepted a moment ago whose request is not read yet; let those reach their first request.
    let linger = FRESH_LINGER.min(timeouts.header_read);
    let _ = tokio::time::timeout(linger, fresh_rx.wait_for(|n| *n == 0)).await;
    if tokio::time::timeout(timeouts.drain, graceful.shutdown())
        .await
        .is_err()
    {
        debug!(proto, "drain timeout: closing remaining client connections");
    }
}

/// A connection whose first request has not arrived yet, counted in `serve_listener`'s drain
/// gate until it does or the connection ends.
struct Fresh {
    count: Arc<watch::Sender<usize>>,
    done: AtomicBool,
}

impl Fresh {
    fn new(count: Arc<watch::Sender<usize>>) -> Self {
        count.send_modify(|n| *n += 1);
        Self {
            count,
            done: AtomicBool::new(false),
        }
    }

    fn served(&self) {
        if !self.done.swap(true, Ordering::Relaxed) {
            self.count.send_modify(|n| *n = n.saturating_sub(1));
        }
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        self.served();
    }
}

/// Counts a connection as open for `/metrics` until dropped.
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The service a request was routed to, left on the response for metrics and the access log.
#[derive(Clone, Debug)]
pub(crate) struct Routed(pub(crate) Arc<str>);

/// Waits for the first byte so an idle connection cannot sit in protocol detection forever
/// (hyper's header timeout only starts once HTTP/1 is chosen).
async fn first_byte_within(stream: &TcpStream, limit: Duration) -> bool {
    let mut b = [0u8; 1];
    matches!(tokio::time::timeout(limit, stream.peek(&mut b)).await, Ok(Ok(n)) if n > 0)
}

async fn handle(shared: &Shared, conn: ConnInfo, req: Request<Incoming>) -> Response<RespBody> {
    let start = std::time::Instant::now();
    let log = shared.access_log.as_ref().map(|_| {
        (
            req.method().as_str().to_owned(),
            req.uri()
                .authority()
                .map(|a| a.as_str().to_owned())
                .or_else(|| {
                    req.headers()
                        .get(header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_owned)
                })
                .unwrap_or_default(),
            req.uri().path().chars().take(2048).collect::<String>(),
            req.headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(|v| v.chars().take(200).collect::<String>()),
        )
    });
    let mut resp = route(shared, conn, req).await;
    headers::stamp_response(
        resp.headers_mut(),
        &shared.region_header,
        &shared.edge_header,
    );
    let elapsed = start.elapsed();
    let route_name = resp.extensions().get::<Routed>().map_or("-", |r| &*r.0);
    shared
        .metrics
        .record(route_name, resp.status().as_u16(), elapsed);
    if let (Some(access), Some((method, host, path, request_id))) = (&shared.access_log, log) {
        access.log(AccessRecord {
            ts_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            client: conn.remote.ip().to_canonical().to_string(),
            proto: conn.proto,
            method,
            host,
            path,
            status: resp.status().as_u16(),
            route: route_name.to_owned(),
            duration_us: elapsed.as_micros() as u64,
            request_id,
        });
    }
    resp
}

/// Longest piece of client input echoed back in an error message.
const ECHO_LIMIT: usize = 200;

fn echo(s: &str) -> &str {
    match s.char_indices().nth(ECHO_LIMIT) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn too_many(what: &str, wait: Duration) -> Response<RespBody> {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut resp = text(
        StatusCode::TOO_MANY_REQUESTS,
        format!("rate limit for this {what} exceeded; retry in {secs} s"),
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    resp
}

async fn route(shared: &Shared, conn: ConnInfo, mut req: Request<Incoming>) -> Response<RespBody> {
    let client_ip = conn.remote.ip().to_canonical();
    // A peer edge already applied its limits to the real client; only a peer is trusted with
    // the one-hop rule (see `peers`).
    let from_peer = shared
        .peers
        .as_ref()
        .is_some_and(|p| p.is_peer_hop(req.headers()));
    if !from_peer
        && let Some(limit) = &shared.ip_limit
        && let Err(wait) = limit.check(&client_ip, std::time::Instant::now())
    {
        return too_many("client", wait);
    }
    // RFC 8441 extended CONNECT (`:protocol`): only WebSocket, carried as an upgrade.
    let extended_connect = req.method() == Method::CONNECT
        && req.version() == Version::HTTP_2
        && req.extensions().get::<hyper::ext::Protocol>().is_some();
    if extended_connect {
        let websocket = req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
        if !websocket {
            return text(
                StatusCode::NOT_IMPLEMENTED,
                "extended CONNECT is supported for the websocket protocol only",
            );
        }
        *req.method_mut() = Method::GET;
        headers::extended_connect_as_upgrade(req.headers_mut());
    }
    if req.method() == Method::CONNECT {
        let mut resp = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported: this edge is not a forward proxy",
        );
        resp.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
        return resp;
    }
    let uri = req.uri();
    if let Some(scheme) = uri.scheme_str()
        && !scheme.eq_ignore_ascii_case("http")
        && !scheme.eq_ignore_ascii_case("https")
    {
        return text(
            StatusCode::BAD_REQUEST,
            format!("unsupported scheme {:?}", echo(scheme)),
        );
    }
    // HTTP/2 :authority and HTTP/1 absolute-form both land in the URI and win over Host (RFC 9112 §3.2.2).
    let authority = match uri.authority() {
        Some(a) => a
            .as_str()
            .rsplit_once('@')
            .map_or(a.as_str(), |(_, h)| h)
            .to_owned(),
        None => match req.headers().get(header::HOST).map(|v| v.to_str()) {
            Some(Ok(h)) => h.to_owned(),
            Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "invalid Host header"),
            None => return text(StatusCode::BAD_REQUEST, "missing Host header"),
        },
    };
    let Some(host) = normalize_host(&authority) else {
        return text(StatusCode::BAD_REQUEST, "invalid Host header");
    };
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    let Some(matched) = shared.routes.load().route(&host, path_and_query) else {
        return text(
            StatusCode::NOT_FOUND,
            format!(
                "no route for {}{}: nothing is mounted there on this edge",
                echo(&host),
                echo(uri.path())
            ),
        );
    };

    if let Some(limit) = &shared.route_limit
        && let Err(wait) = limit.check(&matched.service, std::time::Instant::now())
    {
        return too_many("route", wait);
    }
    let max_body = matched.opts.max_body.or(shared.limits.max_request_body);
    if let Some(max) = max_body
        && let Some(len) = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        && len > max
    {
        let mut resp = text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body of {len} bytes is larger than the {max} byte limit"),
        );
        // The body is not read; closing avoids parsing it as the next request.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    let wants_upgrade = extended_connect
        || (req.version() == Version::HTTP_11 && headers::wants_upgrade(req.headers()));
    let ctx = ForwardCtx {
        client_ip: conn.remote.ip().to_canonical(),
        proto: conn.proto,
        host: &authority,
        upgrade: wants_upgrade,
    };
    let mut head = RequestHead {
        service: matched.service.to_string(),
        method: Bytes::copy_from_slice(req.method().as_str().as_bytes()),
        uri: Bytes::from(matched.path_and_query),
        headers: headers::request_headers(req.headers(), &ctx),
    };
    matched.opts.headers.apply_request(&mut head.headers);
    let coalesce_key =
        if matched.opts.coalesce && !wants_upgrade && http_body::Body::is_end_stream(req.body()) {
            crate::coalesce::key(
                req.method(),
                &matched.service,
                &host,
                path_and_query,
                req.headers(),
            )
        } else {
            None
        };
    let client_uri = path_and_query.to_owned();
    // A peer appended the client it saw last in X-Forwarded-For.
    let original_client = if from_peer {
        req.headers()
            .get_all("x-forwarded-for")
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|ip| ip.trim().parse().ok())
            .unwrap_or(client_ip)
    } else {
        client_ip
    };
    let upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut req));
    let out = Outgoing {
        service: matched.service.to_string(),
        head,
        upgrade,
        client_uri,
        from_peer,
        client_ip: original_client,
        body: req.into_body(),
        max_body,
    };
    use crate::coalesce::Role;
    let mut resp = match coalesce_key.map(|k| shared.coalescer.join(k)) {
        Some(Role::Leader(leader)) => leader.finish(forward::forward(shared, out).await).await,
        Some(Role::Follower(rx)) => match crate::coalesce::wait(rx).await {
            Some(resp) => resp,
            None => forward::forward(shared, out).await,
        },
        _ => forward::forward(shared, out).await,
    };
    if extended_connect && resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        // The splice starts once hyper sends this 200 and hands over the stream.
        *resp.status_mut() = StatusCode::OK;
        headers::upgrade_as_extended_connect(resp.headers_mut());
    }
    matched.opts.headers.apply_response(resp.headers_mut());
    resp.extensions_mut().insert(Routed(matched.service));
    resp
}
