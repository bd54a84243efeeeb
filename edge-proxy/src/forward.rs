//! Forwarding one routed request over a QUIC stream to an agent, streaming both bodies.
//!
//! Retry policy lives here and only here: a request is retried (once, on another connection) only
//! when opening the stream failed, i.e. when nothing has reached any agent.

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::debug;
use tunnel_proto::{Frame, Headers, RequestHead};

use crate::headers::response_headers;
use crate::registry::Lease;
use crate::retry::{self, Failure};
use crate::state::Shared;
use crate::wire::{FrameReader, WireError, code, write_frame};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of every response the edge sends.
pub(crate) type RespBody = UnsyncBoxBody<Bytes, BoxError>;

/// Largest `Data` frame the edge writes.
const MAX_CHUNK: usize = 64 * 1024;

/// A fully routed request, ready to go upstream.
pub(crate) struct Outgoing {
    pub(crate) service: String,
    pub(crate) head: RequestHead,
    /// Set for HTTP/1.1 requests that ask to switch protocols.
    pub(crate) upgrade: Option<OnUpgrade>,
    pub(crate) body: Incoming,
    /// Path and query as the client sent them (before any prefix strip), for a peer edge that
    /// routes the request again.
    pub(crate) client_uri: String,
    /// The request came from a peer edge: it is served here or not at all (one hop at most).
    pub(crate) from_peer: bool,
    /// The client's address (for a peer's request, the one that peer saw), for hashing on it.
    pub(crate) client_ip: std::net::IpAddr,
    /// Request body limit of the request's route (413 above it).
    pub(crate) max_body: Option<u64>,
}

pub(crate) fn full(body: impl Into<Bytes>) -> RespBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn empty() -> RespBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A plain-text response the edge itself generates.
pub(crate) fn text(status: StatusCode, msg: impl Into<String>) -> Response<RespBody> {
    let mut msg = msg.into();
    msg.push('\n');
    let mut resp = Response::new(full(msg));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn no_agent(service: &str) -> Response<RespBody> {
    let mut resp = text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("no agent connected for service {service}"),
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

/// Sends the request to an agent of its service and returns the (streaming) response.
pub(crate) async fn forward(shared: &Shared, out: Outgoing) -> Response<RespBody> {
    let service = out.service.clone();
    let limit = shared.limits.upstream_timeout;
    match tokio::time::timeout(limit, exchange(shared, out)).await {
        Ok(resp) => resp,
        Err(_) => text(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "service {service} did not answer within {} ms",
                limit.as_millis()
            ),
        ),
    }
}

/// Most attempts per request (the first plus retries), whatever the budget says.
const MAX_ATTEMPTS: usize = 3;

/// A failed attempt: how far it got, which connection failed, and the answer if not retried.
struct Failed {
    failure: Failure,
    agent: u64,
    response: Response<RespBody>,
}

fn tunnel_failed(service: &str, e: impl std::fmt::Display) -> Response<RespBody> {
    text(
        StatusCode::BAD_GATEWAY,
        format!("tunnel to service {service} failed: {e}"),
    )
}

/// Every retry and failover decision is made here: pick, attempt, and on failure ask
/// [`retry::retryable`] and the budget whether another connection may be tried.
async fn exchange(shared: &Shared, out: Outgoing) -> Response<RespBody> {
    let Outgoing {
        service,
        head,
        mut upgrade,
        body,
        client_uri,
        from_peer,
        client_ip,
        max_body,
    } = out;
    let idempotent = retry::idempotent(&head.method);

    let head = Frame::RequestHead(head);
    // Encoded when an agent is first picked: a request served by a direct origin never needs it.
    let mut prelude: Option<Bytes> = None;

    // An empty body can be "replayed" after it was consumed; any other only while untouched.
    let body_empty = http_body::Body::is_end_stream(&body);
    let mut body = Some(body);
    let mut exclude = None;
    let mut attempt = 0;
    let policies = shared.policies.load_full();
    let balance = policies.get(&service);
    shared
        .retry_budget(balance.map(|b| &**b))
        .on_request(std::time::Instant::now());
    let hash_key = match (&head, balance) {
        (Frame::RequestHead(h), Some(b)) => b.key(&h.headers, client_ip),
        _ => None,
    };
    let choice = balance.map_or(crate::balance::Choice::P2c, |b| {
        b.choice(hash_key.as_deref())
    });
    // Services with origins, limits, a breaker or stickiness take the general choice.
    let general = balance.map(|b| &**b).filter(|b| b.general());
    let sticky = match (&head, general) {
        (Frame::RequestHead(h), Some(sb)) => crate::backend::sticky_tag(
            &h.headers,
            sb.sticky.as_deref(),
            &shared.upstreams.sticky_secret,
        ),
        _ => None,
    };
    let mut tried: Vec<u64> = Vec::new();
    let mut unavailable = None;
    let mut last_failure = None;
    loop {
        attempt += 1;
        let picked = match general {
            Some(sb) => {
                match crate::backend::pick(shared, &service, sb, &tried, choice, sticky.as_deref())
                {
                    Ok(p) => Some(p),
                    Err(why) => {
                        unavailable = Some(why);
                        None
                    }
                }
            }
            None => pick_avoiding_outliers(shared, &service, exclude, choice)
                .map(crate::backend::Picked::Agent),
        };
        let Some(picked) = picked else {
            if let Some(crate::backend::Unavailable::AtLimit(n)) = unavailable
                && last_failure.is_none()
            {
                return crate::backend::at_limit(&service, n);
            }
            // Nothing (more) to try here: the nearest region with an agent may serve it.
            let Frame::RequestHead(head) = &head else {
                return no_agent(&service);
            };
            // A retry that lands here was already charged to the budget.
            if !from_peer
                && upgrade.is_none()
                // Boxed, as `attempt_once` below: a rarely taken path's future would otherwise set
                // the size of every request's future, which is moved (memcpy) on each await.
                && let Some(resp) = Box::pin(via_peer(
                    shared,
                    &service,
                    head,
                    &client_uri,
                    &mut body,
                    body_empty,
                ))
                .await
            {
                return resp;
            }
            return last_failure.map_or_else(
                || match unavailable {
                    Some(crate::backend::Unavailable::Unhealthy) => {
                        crate::backend::unhealthy(&service)
                    }
                    _ => no_agent(&service),
                },
                |f: Failed| f.response,
            );
        };
        let chosen = picked.chosen();
        let agent = chosen.key();
        let result = match (picked, &head) {
            (crate::backend::Picked::Agent(lease), _) => {
                shared.metrics.agent_pool.stream(agent);
                let p = match &prelude {
                    Some(p) => p.clone(),
                    None => match encode_prelude(&head) {
                        Ok(p) => prelude.insert(p).clone(),
                        Err(resp) => return resp,
                    },
                };
                Box::pin(attempt_once(
                    &service,
                    lease,
                    &p,
                    &mut body,
                    &mut upgrade,
                    idempotent,
                    max_body,
                ))
                .await
            }
            (crate::backend::Picked::Origin(lease), Frame::RequestHead(h)) => {
                crate::upstream::attempt(
                    lease,
                    &service,
                    h,
                    &mut body,
                    max_body,
                    &mut upgrade,
                    idempotent,
                )
                .await
                .map_err(|e| Failed {
                    failure: e.failure,
                    agent,
                    response: e.response,
                })
            }
            (crate::backend::Picked::Origin(_), _) => {
                return text(StatusCode::INTERNAL_SERVER_ERROR, "request head missing");
            }
        };
        let ok = result.as_ref().is_ok_and(|r| !r.status().is_server_error());
        record_outcome(shared, &service, agent, ok);
        chosen.report(general, ok);
        let failed = match result {
            Ok(mut resp) => {
                if let Some(sb) = general {
                    crate::backend::stick(&mut resp, sb, &chosen, sticky.as_deref(), shared);
                }
                return resp;
            }
            Err(f) => f,
        };
        let replayable = body.is_some() || body_empty;
        if attempt < MAX_ATTEMPTS
            && retry::retryable(failed.failure, idempotent, replayable)
            && shared
                .retry_budget(balance.map(|b| &**b))
                .try_retry(std::time::Instant::now())
        {
            debug!(service, attempt, failure = ?failed.failure, "retrying on another agent connection");
            exclude = Some(failed.agent);
            tried.push(failed.agent);
            shared
                .metrics
                .retries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            last_failure = Some(failed);
            continue;
        }
        return failed.response;
    }
}

/// The tunnel preamble and the request head, as the first bytes of an agent stream.
#[allow(clippy::result_large_err)]
fn encode_prelude(head: &Frame) -> Result<Bytes, Response<RespBody>> {
    let mut prelude = BytesMut::new();
    tunnel_proto::encode_preamble(&mut prelude);
    if let Err(e) = tunnel_proto::encode(head, &mut prelude) {
        return Err(text(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("request head cannot be forwarded: {e}"),
        ));
    }
    Ok(prelude.freeze())
}

/// Sends the request to the nearest peer edge that has an agent of `service` (a second one only
/// when the first certainly never got it). `None` when no peer could take it, so the caller
/// answers as if there were none.
async fn via_peer(
    shared: &Shared,
    service: &str,
    head: &RequestHead,
    client_uri: &str,
    body: &mut Option<Incoming>,
    body_empty: bool,
) -> Option<Response<RespBody>> {
    use crate::peers::{self, PeerBody};
    let client = shared.peers.as_ref()?;
    let snap = shared.snapshots.borrow().clone()?;
    let candidates = peers::candidates(&snap, &shared.edge_id, &shared.region, service);
    for peer in candidates.iter().take(peers::MAX_PEERS) {
        // Connect first: a peer that cannot be reached has not consumed the body.
        let mut sender = match client.connect(peer).await {
            Ok(s) => s,
            Err(e) => {
                debug!(service, peer = %peer.edge_id, error = %e, "peer edge unreachable");
                continue;
            }
        };
        let req_body: PeerBody = match body.take() {
            Some(b) => b.map_err(|e| Box::new(e) as BoxError).boxed(),
            None if body_empty => Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed(),
            None => return None,
        };
        let req = peer_request(head, client_uri, req_body, client.hop_value())?;
        match sender.send_request(req).await {
            Ok(resp) => {
                debug!(service, peer = %peer.edge_id, "served by a peer edge");
                shared
                    .metrics
                    .peer_forwards
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let (mut parts, incoming) = resp.into_parts();
                crate::headers::strip_hop_by_hop(&mut parts.headers);
                if let Ok(v) = HeaderValue::from_str(&peer.edge_id) {
                    parts.headers.insert(peers::UPSTREAM_EDGE_HEADER, v);
                }
                let body = incoming.map_err(|e| Box::new(e) as BoxError).boxed_unsync();
                return Some(Response::from_parts(parts, body));
            }
            // Refused before it was sent (the connection was going away): another peer may take
            // it if there is nothing to replay.
            Err(e) if e.is_canceled() && body_empty => {
                debug!(service, peer = %peer.edge_id, error = %e, "peer edge refused");
            }
            Err(e) => {
                return Some(text(
                    StatusCode::BAD_GATEWAY,
                    format!("forwarding to edge {} failed: {e}", peer.edge_id),
                ));
            }
        }
    }
    None
}

/// The request for a peer edge: the client's method and URI (the peer routes it again) with the
/// headers this edge already rewrote (forwarding headers, request id) minus `Host`, which becomes
/// the URI's authority.
fn peer_request(
    head: &RequestHead,
    client_uri: &str,
    body: crate::peers::PeerBody,
    hop: &HeaderValue,
) -> Option<http::Request<crate::peers::PeerBody>> {
    let host = head
        .headers
        .iter()
        .find(|(n, _)| n.as_ref() == b"host")
        .and_then(|(_, v)| std::str::from_utf8(v).ok())?;
    let mut req = http::Request::builder()
        .method(http::Method::from_bytes(&head.method).ok()?)
        .uri(format!("https://{host}{client_uri}"))
        .body(body)
        .ok()?;
    let headers = req.headers_mut();
    for (name, value) in &head.headers {
        if name.as_ref() == b"host" {
            continue;
        }
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
    headers.insert(crate::peers::HOP_HEADER, hop.clone());
    Some(req)
}

/// Picks a connection, re-picking (a couple of times, excluding it) when the pick is ejected as an
/// outlier. When every candidate is ejected the last pick is used: degraded beats nothing.
fn pick_avoiding_outliers(
    shared: &Shared,
    service: &str,
    exclude: Option<u64>,
    choice: crate::balance::Choice<'_>,
) -> Option<Lease> {
    let mut lease = shared.agents.pick(service, exclude, choice)?;
    for _ in 0..2 {
        let key = lease.agent().key;
        let ejected = shared
            .outliers()
            .get(service)
            .is_some_and(|d| d.is_ejected(key, std::time::Instant::now()));
        if !ejected {
            break;
        }
        match shared.agents.pick(service, Some(key), choice) {
            Some(other) => lease = other,
            None => break,
        }
    }
    Some(lease)
}

/// Feeds one attempt's outcome (5xx and tunnel failures count against the connection) to the
/// service's outlier detector.
fn record_outcome(shared: &Shared, service: &str, agent: u64, ok: bool) {
    let now = std::time::Instant::now();
    let mut detectors = shared.outliers();
    if ok && !detectors.contains_key(service) {
        return;
    }
    let d = detectors.entry(service.to_owned()).or_default();
    d.on_result(agent, ok, now, || {
        shared.agents.list(service).map_or(0, |l| l.len())
            + shared
                .policies
                .load()
                .get(service)
                .map_or(0, |b| b.origins.len())
    });
}

/// How a stream read or write error bears on retrying: a reset or stop with code 3 means the
/// agent did not start the request.
fn classify_read(e: &WireError) -> Failure {
    match e {
        WireError::Read(quinn::ReadError::Reset(c))
            if c.into_inner() == u64::from(code::REFUSED) =>
        {
            Failure::NeverStarted
        }
        _ => Failure::MaybeStarted,
    }
}

/// One attempt on one agent connection. `body` is taken once its upload starts.
async fn attempt_once(
    service: &str,
    lease: Lease,
    prelude: &Bytes,
    body: &mut Option<Incoming>,
    upgrade: &mut Option<OnUpgrade>,
    idempotent: bool,
    max_body: Option<u64>,
) -> Result<Response<RespBody>, Failed> {
    let started = std::time::Instant::now();
    let agent = lease.agent().key;
    let fail = |failure, response| Failed {
        failure,
        agent,
        response,
    };
    let (mut send, recv) = match lease.agent().conn.open_bi().await {
        Ok(x) => x,
        Err(e) => {
            debug!(service, agent, error = %e, "opening a tunnel stream failed");
            return Err(fail(Failure::NeverStarted, tunnel_failed(service, e)));
        }
    };

    // A request without a body (most GETs): prelude and `End` in one write, the stream finished
    // at once, and no upload task (a spawn, a cancel token and two more writes per request).
    let bodiless = upgrade.is_none() && body.as_ref().is_none_or(http_body::Body::is_end_stream);
    let written = if bodiless {
        body.take();
        let mut end = BytesMut::with_capacity(tunnel_proto::FRAME_HEADER_LEN);
        // `End` has no payload: it always encodes.
        let _ = tunnel_proto::encode(&Frame::End, &mut end);
        let r = send
            .write_all_chunks(&mut [prelude.clone(), end.freeze()])
            .await;
        if r.is_ok() {
            let _ = send.finish();
        }
        r
    } else {
        send.write_all(prelude).await
    };
    if let Err(e) = written {
        let failure = match &e {
            quinn::WriteError::Stopped(c) if c.into_inner() == u64::from(code::REFUSED) => {
                Failure::NeverStarted
            }
            _ => Failure::MaybeStarted,
        };
        return Err(fail(failure, tunnel_failed(service, e)));
    }

    // Request body: inline for upgrades (it is empty, and the stream is needed afterwards for raw
    // bytes), otherwise in its own task so a large upload streams while we wait for the response.
    let cancel = CancellationToken::new();
    let mut upgrade_send = None;
    let (too_large_tx, mut too_large) = tokio::sync::oneshot::channel::<()>();
    if bodiless {
        drop(too_large_tx);
    } else if upgrade.is_some() {
        if let Err(e) = upload(&mut send, body.take(), max_body).await {
            let _ = send.reset(quinn::VarInt::from_u32(code::CANCELLED));
            return Ok(text(
                StatusCode::BAD_GATEWAY,
                format!("sending the request failed: {e}"),
            ));
        }
        upgrade_send = Some(send);
    } else {
        let cancelled = cancel.clone();
        let body = body.take();
        tokio::spawn(async move {
            let res = tokio::select! {
                _ = cancelled.cancelled() => Err(UploadError::Abandoned),
                r = upload(&mut send, body, max_body) => r,
            };
            match res {
                Ok(()) => {
                    let _ = send.finish();
                }
                Err(UploadError::TooLarge(limit)) => {
                    debug!(limit, "request body over the limit; abandoning the request");
                    let _ = send.reset(quinn::VarInt::from_u32(code::CANCELLED));
                    let _ = too_large_tx.send(());
                }
                Err(e) => {
                    debug!(error = %e, "request body not fully forwarded");
                    let _ = send.reset(quinn::VarInt::from_u32(code::CANCELLED));
                }
            }
        });
    }
    // Dropping the guard (on every early return, or when the response body ends) stops the upload.
    let cancel_guard = cancel.drop_guard();

    let mut reader = FrameReader::new(recv);
    let next = tokio::select! {
        biased;
        Ok(()) = &mut too_large => {
            let mut resp = text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body is larger than {} bytes", max_body.unwrap_or_default()),
            );
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Ok(resp);
        }
        next = reader.next() => next,
    };
    let head = match next {
        Ok(Some(Frame::ResponseHead(h))) => {
            lease.agent().observe_latency(started.elapsed());
            h
        }
        Ok(Some(Frame::Error { code, message })) => {
            return Ok(text(
                StatusCode::BAD_GATEWAY,
                format!("service {service} failed ({code}): {message}"),
            ));
        }
        Ok(Some(other)) => {
            reader.stop(code::PROTOCOL);
            return Ok(text(
                StatusCode::BAD_GATEWAY,
                format!(
                    "agent protocol error: expected a response head, got frame type {}",
                    other.type_code()
                ),
            ));
        }
        Ok(None) => {
            return Err(fail(
                Failure::MaybeStarted,
                text(
                    StatusCode::BAD_GATEWAY,
                    format!("agent for service {service} closed the stream without a response"),
                ),
            ));
        }
        Err(e) => {
            return Err(fail(classify_read(&e), tunnel_failed(service, e)));
        }
    };
    let upgrade = upgrade.take();

    let Ok(status) = StatusCode::from_u16(head.status) else {
        return Ok(text(
            StatusCode::BAD_GATEWAY,
            format!("agent sent an invalid status {}", head.status),
        ));
    };
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let (Some(on_upgrade), Some(send)) = (upgrade, upgrade_send) else {
            return Ok(text(
                StatusCode::BAD_GATEWAY,
                "origin switched protocols on a request that did not ask to",
            ));
        };
        let mut resp = Response::new(empty());
        *resp.status_mut() = status;
        *resp.headers_mut() = response_headers(&head.headers, true);
        tokio::spawn(splice(on_upgrade, reader, send, lease));
        return Ok(resp);
    }
    if status.is_informational() {
        return Ok(text(
            StatusCode::BAD_GATEWAY,
            format!("origin sent an unexpected {status}"),
        ));
    }
    let declined = upgrade_send.is_some();
    if let Some(mut send) = upgrade_send {
        // The upgrade was declined: the request is complete.
        let _ = send.finish();
    }

    let headers = response_headers(&head.headers, false);
    let small = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n <= BUFFER_SMALL);
    let body = if let Some(declared) = small.filter(|_| idempotent && !declined) {
        // A small answer to an idempotent request is read whole before the client sees its head:
        // if the agent dies mid-body the request can still go elsewhere instead of failing.
        match buffered(reader, declared).await {
            Ok(frames) => {
                drop(lease);
                StreamBody::new(futures_util::stream::iter(frames.into_iter().map(Ok)))
                    .boxed_unsync()
            }
            Err(e) => {
                return Err(fail(
                    Failure::MaybeStarted,
                    text(
                        StatusCode::BAD_GATEWAY,
                        format!("service {service} failed mid-response: {e}"),
                    ),
                ));
            }
        }
    } else {
        response_body(reader, lease, cancel_guard)
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    if declined {
        // The smuggling guard stopped following this connection at the upgrade request; close
        // it rather than parse unchecked bytes as the next request.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

#[derive(Debug, thiserror::Error)]
enum UploadError {
    #[error("client body: {0}")]
    Client(#[from] hyper::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("response finished or request abandoned")]
    Abandoned,
    #[error("request body over the {0} byte limit")]
    TooLarge(u64),
}

/// Streams the client's body as `Data` frames of at most 64 KiB, then `Trailers` and `End`;
/// stops with [`UploadError::TooLarge`] once more than `max` bytes arrived. `None` is an empty
/// body (a retry of a request whose empty body was already consumed).
async fn upload(
    send: &mut quinn::SendStream,
    body: Option<Incoming>,
    max: Option<u64>,
) -> Result<(), UploadError> {
    let Some(mut body) = body else {
        write_frame(send, &Frame::End).await?;
        return Ok(());
    };
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(mut data) => {
                total = total.saturating_add(data.len() as u64);
                if let Some(max) = max
                    && total > max
                {
                    return Err(UploadError::TooLarge(max));
                }
                while !data.is_empty() {
                    let chunk = data.split_to(data.len().min(MAX_CHUNK));
                    write_frame(send, &Frame::Data(chunk)).await?;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    write_frame(send, &Frame::Trailers(to_wire(&trailers))).await?;
                }
            }
        }
    }
    write_frame(send, &Frame::End).await?;
    Ok(())
}

fn to_wire(map: &HeaderMap) -> Headers {
    map.iter()
        .map(|(n, v)| {
            (
                Bytes::copy_from_slice(n.as_str().as_bytes()),
                Bytes::copy_from_slice(v.as_bytes()),
            )
        })
        .collect()
}

fn from_wire(headers: &Headers) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(headers.len());
    for (n, v) in headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n),
            HeaderValue::from_maybe_shared(v.clone()),
        ) {
            map.append(n, v);
        }
    }
    map
}

/// What the response body keeps alive: the stream, the balancing lease, the upload's cancel guard.
struct BodyState {
    reader: FrameReader,
    _lease: Lease,
    _cancel: DropGuard,
    done: bool,
}

#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("agent closed the stream before the end of the response body")]
    Truncated,
    #[error("origin sent more than the {0} bytes its Content-Length declared")]
    LongerThanDeclared(usize),
    #[error("origin failed mid-response ({code}): {message}")]
    Upstream { code: u16, message: String },
    #[error("agent protocol error: unexpected frame type {0} in a response body")]
    Protocol(u8),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Responses up to this size (by `Content-Length`) to idempotent requests are buffered whole.
const BUFFER_SMALL: usize = 64 * 1024;

/// Reads a whole response body of `declared` (≤ [`BUFFER_SMALL`]) bytes; more is an error.
async fn buffered(
    mut reader: FrameReader,
    declared: usize,
) -> Result<Vec<hyper::body::Frame<Bytes>>, BodyError> {
    let mut frames = Vec::new();
    let mut total = 0usize;
    loop {
        match reader.next().await {
            Ok(Some(Frame::Data(b))) => {
                total += b.len();
                if total > declared {
                    reader.stop(code::CANCELLED);
                    return Err(BodyError::LongerThanDeclared(declared));
                }
                if !b.is_empty() {
                    frames.push(hyper::body::Frame::data(b));
                }
            }
            Ok(Some(Frame::Trailers(h))) => {
                frames.push(hyper::body::Frame::trailers(from_wire(&h)))
            }
            Ok(Some(Frame::End)) => return Ok(frames),
            Ok(Some(Frame::Error { code, message })) => {
                return Err(BodyError::Upstream { code, message });
            }
            Ok(Some(other)) => {
                reader.stop(code::CANCELLED);
                return Err(BodyError::Protocol(other.type_code()));
            }
            Ok(None) => return Err(BodyError::Truncated),
            Err(e) => return Err(BodyError::Wire(e)),
        }
    }
}

fn response_body(reader: FrameReader, lease: Lease, cancel: DropGuard) -> RespBody {
    let state = BodyState {
        reader,
        _lease: lease,
        _cancel: cancel,
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            let item = match st.reader.next().await {
                Ok(Some(Frame::Data(b))) if b.is_empty() => continue,
                Ok(Some(Frame::Data(b))) => Ok(hyper::body::Frame::data(b)),
                Ok(Some(Frame::Trailers(h))) => Ok(hyper::body::Frame::trailers(from_wire(&h))),
                Ok(Some(Frame::End)) => return None,
                Ok(Some(Frame::Error { code, message })) => {
                    Err(BodyError::Upstream { code, message })
                }
                Ok(Some(other)) => Err(BodyError::Protocol(other.type_code())),
                Ok(None) => Err(BodyError::Truncated),
                Err(e) => Err(BodyError::Wire(e)),
            };
            if item.is_err() {
                st.done = true;
                st.reader.stop(code::CANCELLED);
            }
            return Some((item.map_err(|e| Box::new(e) as BoxError), st));
        }
    });
    StreamBody::new(stream).boxed_unsync()
}

/// After a `101`: raw bytes both ways between the client's upgraded connection and the stream.
async fn splice(
    on_upgrade: OnUpgrade,
    reader: FrameReader,
    mut send: quinn::SendStream,
    _lease: Lease,
) {
    let upgraded = match on_upgrade.await {
        Ok(u) => u,
        Err(e) => {
            debug!(error = %e, "client upgrade failed");
            let _ = send.reset(quinn::VarInt::from_u32(code::CANCELLED));
            return;
        }
    };
    let mut client = TokioIo::new(upgraded);
    let (recv, leftover) = reader.into_parts();
    if !leftover.is_empty() && client.write_all(&leftover).await.is_err() {
        let _ = send.reset(quinn::VarInt::from_u32(code::CANCELLED));
        return;
    }
    let mut tunnel = tokio::io::join(recv, send);
    match tokio::io::copy_bidirectional(&mut client, &mut tunnel).await {
        Ok((up, down)) => debug!(up, down, "upgraded connection closed"),
        Err(e) => debug!(error = %e, "upgraded connection ended with an error"),
    }
}
