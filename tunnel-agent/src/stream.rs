//! One data stream: a request from the edge, proxied to the local origin.
//!
//! Request direction (edge → agent): optional preamble, `RequestHead`, body frames (`Data`*,
//! optional `Trailers`, `End`). Response direction: `ResponseHead` (or `Error` when the origin
//! cannot be reached), `Data`* (≤ 64 KiB each), optional `Trailers`, `End`, then FIN. For an
//! upgrade, the edge sends the (usually empty) request body and `End` as for any request; after
//! the agent's `101` head both directions carry raw bytes until FIN.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};
use tunnel_proto::{Frame, RequestHead, ResponseHead};

use crate::headers;
use crate::origin::{BodyError, BodyItem, Origin, TunnelBody};
use crate::wire::{self, FrameReader, code, write_frame};

/// The edge must send the head promptly after opening the stream.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest `Data` frame the agent writes.
pub(crate) const MAX_DATA_FRAME: usize = 64 * 1024;
/// Time to connect to the raw TCP origin.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Read size from the TCP origin (the default 8 KiB makes bulk transfers syscall-bound).
const TCP_COPY_BUF: usize = 64 * 1024;
/// How long a finished stream waits for the edge to acknowledge its last bytes.
const FINISH_ACK_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct StreamCtx {
    /// HTTP origin (`--to`); `None` for a raw-TCP-only agent.
    pub(crate) origin: Option<Origin>,
    /// Raw TCP origin `host:port` (`--tcp`).
    pub(crate) tcp: Option<String>,
    pub(crate) service: String,
}

impl StreamCtx {
    /// One health probe of whichever origin this agent has (HTTP preferred).
    pub(crate) async fn probe(&self) -> bool {
        match (&self.origin, &self.tcp) {
            (Some(origin), _) => origin.probe().await,
            (None, Some(addr)) => tokio::net::TcpStream::connect(addr.as_str()).await.is_ok(),
            (None, None) => false,
        }
    }
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello { .. } => "Hello",
        Frame::Welcome { .. } => "Welcome",
        Frame::Reject { .. } => "Reject",
        Frame::Heartbeat { .. } => "Heartbeat",
        Frame::HeartbeatAck { .. } => "HeartbeatAck",
        Frame::OriginHealth { .. } => "OriginHealth",
        Frame::Drain => "Drain",
        Frame::GoAway { .. } => "GoAway",
        Frame::RequestHead(_) => "RequestHead",
        Frame::TcpHead { .. } => "TcpHead",
        Frame::ResponseHead(_) => "ResponseHead",
        Frame::Error { .. } => "Error",
        Frame::Data(_) => "Data",
        Frame::Trailers(_) => "Trailers",
        Frame::End => "End",
    }
}

/// Serves one edge-opened stream to completion; never panics on what the edge sends.
pub(crate) async fn handle(send: quinn::SendStream, recv: quinn::RecvStream, ctx: Arc<StreamCtx>) {
    let mut reader = FrameReader::new(recv);
    let head = match tokio::time::timeout(HEAD_TIMEOUT, reader.next()).await {
        Ok(Ok(Some(frame))) => frame,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            debug!(error = %e, "bad data stream head");
            return protocol_error(reader, send);
        }
        Err(_) => {
            debug!("no request head within {HEAD_TIMEOUT:?}");
            return protocol_error(reader, send);
        }
    };
    match head {
        Frame::RequestHead(head) => proxy_http(head, reader, send, &ctx).await,
        Frame::TcpHead { service } => proxy_tcp(service, reader, send, &ctx).await,
        other => {
            debug!(
                frame = frame_name(&other),
                "unexpected first frame on data stream"
            );
            protocol_error(reader, send);
        }
    }
}

fn protocol_error(mut reader: FrameReader, mut send: quinn::SendStream) {
    reader.stop(code::PROTOCOL);
    wire::reset(&mut send, code::PROTOCOL);
}

async fn respond_error(send: &mut quinn::SendStream, code: u16, message: String) {
    // Error messages are bounded well below the control-frame limit.
    let mut message = message;
    if message.len() > 1024 {
        let mut cut = 1024;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    if write_frame(send, &Frame::Error { code, message })
        .await
        .is_ok()
    {
        finish(send).await;
    }
}

/// Finishes the stream and waits (bounded) until the edge has the data: closing the connection
/// during a drain discards anything unacknowledged, so in-flight streams count until then.
pub(crate) async fn finish(send: &mut quinn::SendStream) {
    if send.finish().is_ok() {
        let _ = tokio::time::timeout(FINISH_ACK_TIMEOUT, send.stopped()).await;
    }
}

/// Where the request body reader lives: here (body was empty) or in the pump task.
enum BodySource {
    Here(FrameReader),
    Pump(JoinHandle<Option<FrameReader>>),
}

impl BodySource {
    fn abort(self) {
        if let Self::Pump(h) = self {
            h.abort();
        }
    }

    async fn into_reader(self) -> Option<FrameReader> {
        match self {
            Self::Here(r) => Some(r),
            Self::Pump(h) => h.await.ok().flatten(),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

async fn proxy_http(
    head: RequestHead,
    mut reader: FrameReader,
    mut send: quinn::SendStream,
    ctx: &StreamCtx,
) {
    if !head.service.is_empty() && head.service != ctx.service {
        reader.stop(code::DONE);
        let msg = format!(
            "this agent serves {:?}, not {:?}",
            ctx.service, head.service
        );
        return respond_error(&mut send, 421, msg).await;
    }
    let Some(origin) = ctx.origin.as_ref() else {
        reader.stop(code::DONE);
        let msg = format!("service {:?} has no HTTP origin at this agent", ctx.service);
        return respond_error(&mut send, 502, msg).await;
    };
    let upgrade = headers::is_upgrade_request(&head.headers);
    let request = Method::from_bytes(&head.method)
        .map_err(|_| "invalid method".to_owned())
        .and_then(|m| Ok((m, origin.uri_for(&head.uri)?)))
        .and_then(|(m, u)| {
            let h = headers::to_header_map(&head.headers, upgrade).map_err(|e| e.to_string())?;
            Ok((m, u, h))
        });
    let (method, uri, header_map) = match request {
        Ok(parts) => parts,
        Err(msg) => {
            reader.stop(code::DONE);
            return respond_error(&mut send, 400, msg).await;
        }
    };

    // Peek the first body frame so a bodiless request reaches the origin as bodiless (no chunked
    // encoding on a GET).
    let first = match reader.next().await {
        Ok(Some(Frame::End)) => None,
        Ok(Some(Frame::Data(d))) => Some(http_body::Frame::data(d)),
        Ok(Some(Frame::Trailers(t))) => match headers::to_header_map(&t, false) {
            Ok(map) => Some(http_body::Frame::trailers(map)),
            Err(e) => {
                reader.stop(code::DONE);
                return respond_error(&mut send, 400, format!("request trailers: {e}")).await;
            }
        },
        Ok(Some(other)) => {
            debug!(
                frame = frame_name(&other),
                "unexpected frame in request body"
            );
            return protocol_error(reader, send);
        }
        Ok(None) => {
            debug!("stream ended before the request body");
            return protocol_error(reader, send);
        }
        Err(e) => {
            debug!(error = %e, "reading request body");
            return protocol_error(reader, send);
        }
    };
    let (body, source) = match first {
        None => (TunnelBody::empty(), BodySource::Here(reader)),
        Some(first) => {
            let (body, tx) = TunnelBody::channel(first);
            (body, BodySource::Pump(tokio::spawn(pump(reader, tx))))
        }
    };

    let mut req = http::Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = header_map;

    // Resolves only if the edge abandons the stream (STOP_SENDING) or the connection dies.
    let mut stopped = std::pin::pin!(send.stopped());
    let resp = tokio::select! {
        r = origin.client.request(req) => r,
        _ = &mut stopped => {
            source.abort();
            return;
        }
    };
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            source.abort();
            let msg = format!("origin unreachable: {}", error_chain(&e));
            debug!(error = %msg, "origin request failed");
            return respond_error(&mut send, 502, msg).await;
        }
    };

    let status = resp.status();
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    if switching && !upgrade {
        source.abort();
        return respond_error(
            &mut send,
            502,
            "origin sent 101 without an upgrade request".into(),
        )
        .await;
    }
    let head = Frame::ResponseHead(ResponseHead {
        status: status.as_u16(),
        headers: headers::from_header_map(resp.headers(), switching),
    });
    let small = http_body::Body::size_hint(resp.body())
        .exact()
        .is_some_and(|n| n <= SMALL_RESPONSE as u64);
    if !switching && small {
        return small_response(head, resp.into_body(), send, &mut stopped, source).await;
    }
    if let Err(e) = write_frame(&mut send, &head).await {
        debug!(error = %e, "writing response head");
        source.abort();
        return;
    }
    if switching {
        return tunnel_upgrade(resp, source, send).await;
    }

    let mut body = resp.into_body();
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = &mut stopped => {
                source.abort();
                return;
            }
        };
        let result = match frame {
            None => break,
            Some(Err(e)) => {
                warn!(error = %error_chain(&e), "origin response body failed");
                wire::reset(&mut send, code::ORIGIN);
                source.abort();
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => wire::write_data(&mut send, data, MAX_DATA_FRAME).await,
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => {
                        let t = headers::from_header_map(&trailers, false);
                        write_frame(&mut send, &Frame::Trailers(t)).await
                    }
                    Err(_) => Ok(()),
                },
            },
        };
        if let Err(e) = result {
            debug!(error = %e, "writing response body");
            source.abort();
            return;
        }
    }
    if write_frame(&mut send, &Frame::End).await.is_ok() {
        finish(&mut send).await;
    }
    // The origin answered in full; any request body still arriving is no longer needed.
    source.abort();
}

/// Responses of at most this many bytes (by an exact size hint, i.e. `Content-Length`) travel as
/// one write.
const SMALL_RESPONSE: usize = 16 * 1024;

/// A small response in one stream write: head, body frames and `End` encoded together, then FIN.
/// Separate writes cost a wake-up of the connection driver (and often a packet) each. The edge
/// reads the same frames as from the streaming path.
async fn small_response(
    head: Frame,
    mut body: hyper::body::Incoming,
    mut send: quinn::SendStream,
    stopped: &mut std::pin::Pin<&mut impl std::future::Future>,
    source: BodySource,
) {
    let mut buf = bytes::BytesMut::with_capacity(1024);
    if let Err(e) = tunnel_proto::encode(&head, &mut buf) {
        debug!(error = %e, "encoding response head");
        source.abort();
        wire::reset(&mut send, code::ORIGIN);
        return;
    }
    let mut failed = false;
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = stopped.as_mut() => {
                source.abort();
                return;
            }
        };
        let encoded = match frame {
            None => break,
            Some(Err(e)) => {
                warn!(error = %error_chain(&e), "origin response body failed");
                failed = true;
                break;
            }
            Some(Ok(frame)) => match frame.into_data() {
                // The size hint bounds the body (hyper enforces Content-Length): each piece fits
                // one frame.
                Ok(data) if data.is_empty() => Ok(()),
                Ok(data) => tunnel_proto::encode(&Frame::Data(data), &mut buf),
                Err(frame) => match frame.into_trailers() {
                    Ok(t) => tunnel_proto::encode(
                        &Frame::Trailers(headers::from_header_map(&t, false)),
                        &mut buf,
                    ),
                    Err(_) => Ok(()),
                },
            },
        };
        if let Err(e) = encoded {
            debug!(error = %e, "encoding response body");
            failed = true;
            break;
        }
    }
    if !failed {
        // `End` has no payload: it always encodes.
        let _ = tunnel_proto::encode(&Frame::End, &mut buf);
    }
    let written = send.write_chunk(buf.freeze()).await;
    if failed {
        // As on the streaming path: what was read goes out, then the reset tells the edge.
        wire::reset(&mut send, code::ORIGIN);
    } else if written.is_ok() {
        finish(&mut send).await;
    }
    // The origin answered in full; any request body still arriving is no longer needed.
    source.abort();
}

/// A raw TCP connection the edge accepted for this service: after the `TcpHead`, bytes both ways
/// between the stream and a fresh connection to `--tcp`, with half-closes passed through. A
/// failed origin connect resets the stream with [`code::ORIGIN`] (the edge closes its client).
async fn proxy_tcp(
    service: String,
    mut reader: FrameReader,
    mut send: quinn::SendStream,
    ctx: &StreamCtx,
) {
    let Some(addr) = ctx.tcp.as_deref().filter(|_| service == ctx.service) else {
        debug!(
            service,
            "TCP stream for a service without a TCP origin here"
        );
        reader.stop(code::REFUSED_TCP);
        wire::reset(&mut send, code::REFUSED_TCP);
        return;
    };
    let origin =
        match tokio::time::timeout(TCP_CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                warn!(origin = addr, error = %e, "TCP origin unreachable");
                reader.stop(code::ORIGIN);
                wire::reset(&mut send, code::ORIGIN);
                return;
            }
            Err(_) => {
                warn!(origin = addr, "TCP origin connect timed out");
                reader.stop(code::ORIGIN);
                wire::reset(&mut send, code::ORIGIN);
                return;
            }
        };
    let _ = origin.set_nodelay(true);
    let (mut recv, leftover) = reader.into_parts();
    let (origin_rd, mut origin_wr) = origin.into_split();
    let up = async {
        if !leftover.is_empty() {
            origin_wr.write_all(&leftover).await?;
        }
        tokio::io::copy(&mut recv, &mut origin_wr).await?;
        origin_wr.shutdown().await
    };
    let down = async {
        let mut origin_rd = tokio::io::BufReader::with_capacity(TCP_COPY_BUF, origin_rd);
        tokio::io::copy_buf(&mut origin_rd, &mut send).await?;
        finish(&mut send).await;
        Ok::<_, std::io::Error>(())
    };
    if let Err(e) = tokio::try_join!(up, down) {
        debug!(error = %e, "TCP stream ended with an error");
        wire::reset(&mut send, code::CANCELLED);
    }
}

/// Streams request body frames from the tunnel into hyper. Returns the reader after `End`.
async fn pump(mut reader: FrameReader, tx: mpsc::Sender<BodyItem>) -> Option<FrameReader> {
    loop {
        let item: BodyItem = match reader.next().await {
            Ok(Some(Frame::Data(d))) => Ok(http_body::Frame::data(d)),
            Ok(Some(Frame::Trailers(t))) => headers::to_header_map(&t, false)
                .map(http_body::Frame::trailers)
                .map_err(|e| BodyError(format!("request trailers: {e}"))),
            Ok(Some(Frame::End)) => return Some(reader),
            Ok(Some(other)) => Err(BodyError(format!(
                "unexpected {} frame in request body",
                frame_name(&other)
            ))),
            Ok(None) => Err(BodyError("tunnel stream ended before End".into())),
            Err(e) => Err(BodyError(e.to_string())),
        };
        let failed = item.is_err();
        if tx.send(item).await.is_err() {
            // hyper dropped the body: the origin answered without reading all of it.
            reader.stop(code::DONE);
            return None;
        }
        if failed {
            reader.stop(code::PROTOCOL);
            return None;
        }
    }
}

/// After a `101`: raw bytes both ways between the QUIC stream and the origin's upgraded socket.
async fn tunnel_upgrade(
    resp: http::Response<hyper::body::Incoming>,
    source: BodySource,
    mut send: quinn::SendStream,
) {
    let upgraded = match hyper::upgrade::on(resp).await {
        Ok(u) => u,
        Err(e) => {
            warn!(error = %e, "origin upgrade failed");
            wire::reset(&mut send, code::ORIGIN);
            source.abort();
            return;
        }
    };
    let Some(reader) = source.into_reader().await else {
        wire::reset(&mut send, code::PROTOCOL);
        return;
    };
    let (mut recv, leftover) = reader.into_parts();
    let (mut origin_rd, mut origin_wr) = tokio::io::split(TokioIo::new(upgraded));
    let up = async {
        if !leftover.is_empty() {
            origin_wr.write_all(&leftover).await?;
        }
        tokio::io::copy(&mut recv, &mut origin_wr).await?;
        origin_wr.shutdown().await
    };
    let down = async {
        tokio::io::copy(&mut origin_rd, &mut send).await?;
        finish(&mut send).await;
        Ok(())
    };
    if let Err(e) = tokio::try_join!(up, down) {
        debug!(error = %e, "upgraded stream ended with an error");
    }
}
