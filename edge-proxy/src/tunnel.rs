//! QUIC tunnel server: agents dial in, register on a control stream, and then carry one
//! edge-opened stream per proxied request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use coordinator_api::AgentConn;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use tunnel_proto::Frame;

use crate::admission::{self, Admitted};
use crate::registry::AgentHandle;
use crate::state::Shared;
use crate::wire::{FrameReader, WireError, code, write_frame};

/// Agent connections held at once; more are refused during the handshake.
const MAX_AGENT_CONNECTIONS: usize = 10_000;
/// Time for the QUIC handshake and then for the `Hello` to arrive.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a `Reject`/`GoAway` gets to reach the agent before the connection closes.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long in-flight requests may finish on a connection that is going away.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Agents heartbeat every second; one silent this long is presumed dead (kill -9, lost host) and
/// stops receiving requests, rather than after QUIC's much longer idle timeout.
const AGENT_SILENT_AFTER: Duration = Duration::from_secs(4);

/// `GoAway` reason answering an agent's `Drain`.
const DRAIN_ACK: &str = "drain acknowledged: no new streams";

/// QUIC application close codes.
mod close {
    pub(super) const NORMAL: u32 = 0;
    pub(super) const REJECTED: u32 = 1;
    pub(super) const REVOKED: u32 = 2;
    pub(super) const PROTOCOL: u32 = 3;
    pub(super) const SHUTDOWN: u32 = 4;
    pub(super) const SILENT: u32 = 5;
}

/// Accepts agent connections until `shutdown`; each is handled in its own task on `tracker`.
pub(crate) async fn accept_loop(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let limit = Arc::new(Semaphore::new(MAX_AGENT_CONNECTIONS));
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            debug!(remote = %incoming.remote_address(), "agent connection limit reached; refusing");
            incoming.refuse();
            continue;
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let remote = incoming.remote_address();
            if let Err(e) = session(incoming, &shared, &shutdown).await {
                debug!(%remote, error = %e, "agent session ended");
            }
        });
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("handshake: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("timed out waiting for the agent")]
    Timeout,
    #[error(transparent)]
    Wire(#[from] WireError),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Writes a final frame, finishes the stream, gives it a moment to arrive, then closes.
async fn farewell(
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    frame: Frame,
    close_code: u32,
    reason: &str,
) {
    let _ = tokio::time::timeout(FAREWELL_TIMEOUT, async {
        if write_frame(&mut send, &frame).await.is_ok() && send.finish().is_ok() {
            // Resolves once the agent has read everything (or closed).
            let _ = send.stopped().await;
        }
    })
    .await;
    conn.close(quinn::VarInt::from_u32(close_code), reason.as_bytes());
}

async fn session(
    incoming: quinn::Incoming,
    shared: &Shared,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let remote: SocketAddr = incoming.remote_address();
    let conn = tokio::time::timeout(HELLO_TIMEOUT, incoming)
        .await
        .map_err(|_| SessionError::Timeout)??;
    let (send, recv) = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| SessionError::Timeout)??;
    let mut reader = FrameReader::new(recv);
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, reader.next()).await {
        Err(_) => {
            farewell(
                &conn,
                send,
                Frame::Reject {
                    reason: "no hello within 10 s".into(),
                },
                close::REJECTED,
                "no hello",
            )
            .await;
            return Err(SessionError::Timeout);
        }
        Ok(Err(e)) => {
            let reason = format!("bad hello: {e}");
            farewell(
                &conn,
                send,
                Frame::Reject {
                    reason: reason.clone(),
                },
                close::PROTOCOL,
                &reason,
            )
            .await;
            return Err(e.into());
        }
        Ok(Ok(f)) => f,
    };
    let Some(Frame::Hello {
        version,
        token,
        agent_id,
        services,
    }) = hello
    else {
        let reason = "the first frame on the control stream must be Hello";
        farewell(
            &conn,
            send,
            Frame::Reject {
                reason: reason.into(),
            },
            close::PROTOCOL,
            reason,
        )
        .await;
        return Ok(());
    };

    let snapshot = shared.snapshots.borrow().clone();
    let admitted = match admission::admit(snapshot.as_deref(), version, &token, &services) {
        Ok(a) => a,
        Err(reason) => {
            warn!(%remote, agent_id, %reason, "agent rejected");
            farewell(
                &conn,
                send,
                Frame::Reject {
                    reason: reason.clone(),
                },
                close::REJECTED,
                &reason,
            )
            .await;
            return Ok(());
        }
    };
    let other_edges = snapshot
        .as_deref()
        .map(|s| admission::other_edges(s, &shared.edge_id, &shared.region))
        .unwrap_or_default();
    let mut send = send;
    write_frame(
        &mut send,
        &Frame::Welcome {
            edge_id: shared.edge_id.clone(),
            region: shared.region.clone(),
            other_edges,
        },
    )
    .await?;

    let handle = AgentHandle::new(
        conn.clone(),
        AgentConn {
            agent_id: agent_id.clone(),
            service: admitted.service.clone(),
            token_id: admitted.token_id.clone(),
            remote_addr: remote.to_string(),
            connected_at_ms: now_ms(),
        },
    );
    shared.agents.add(handle.clone());
    info!(%remote, agent_id, service = admitted.service, "agent connected");

    let end = control_loop(
        shared,
        &conn,
        &mut send,
        &mut reader,
        &admitted,
        &handle,
        shutdown,
    )
    .await;
    shared.agents.remove(&handle);
    info!(%remote, agent_id, service = admitted.service, reason = %end, "agent disconnected");

    match end {
        End::Revoked => {
            farewell(
                &conn,
                send,
                Frame::GoAway {
                    reason: "token revoked".into(),
                },
                close::REVOKED,
                "token revoked",
            )
            .await;
        }
        End::Shutdown => {
            let _ = write_frame(
                &mut send,
                &Frame::GoAway {
                    reason: "edge shutting down".into(),
                },
            )
            .await;
            drain(&conn, &handle).await;
            conn.close(
                quinn::VarInt::from_u32(close::SHUTDOWN),
                b"edge shutting down",
            );
        }
        End::Protocol(reason) => {
            farewell(
                &conn,
                send,
                Frame::GoAway {
                    reason: reason.clone(),
                },
                close::PROTOCOL,
                &reason,
            )
            .await;
        }
        End::AgentGone(_) => {
            drain(&conn, &handle).await;
            conn.close(quinn::VarInt::from_u32(close::NORMAL), b"bye");
        }
        End::Silent => {
            // Whatever is in flight on a dead agent fails now, where the retry logic can act,
            // instead of hanging until the QUIC idle timeout.
            conn.close(quinn::VarInt::from_u32(close::SILENT), b"no heartbeat");
        }
        End::Connection(_) => {}
    }
    Ok(())
}

/// Waits until no request is in flight on the connection (or it closes), at most [`DRAIN_TIMEOUT`].
async fn drain(conn: &quinn::Connection, handle: &AgentHandle) {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while handle.in_flight() > 0 && Instant::now() < deadline && conn.close_reason().is_none() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Debug)]
enum End {
    /// The agent said GoAway or finished its control stream.
    AgentGone(String),
    Revoked,
    Shutdown,
    Protocol(String),
    Connection(String),
    /// No heartbeat for [`AGENT_SILENT_AFTER`]: the agent is presumed dead.
    Silent,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::AgentGone(r) => write!(f, "agent going away: {r}"),
            Self::Revoked => f.write_str("token revoked"),
            Self::Shutdown => f.write_str("edge shutting down"),
            Self::Protocol(r) => write!(f, "protocol error: {r}"),
            Self::Connection(r) => write!(f, "connection lost: {r}"),
            Self::Silent => write!(f, "no heartbeat for {AGENT_SILENT_AFTER:?}"),
        }
    }
}

async fn control_loop(
    shared: &Shared,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    reader: &mut FrameReader,
    admitted: &Admitted,
    handle: &AgentHandle,
    shutdown: &CancellationToken,
) -> End {
    let mut snapshots = shared.snapshots.clone();
    // A snapshot may have landed between admission and here: check it once before waiting.
    let current = snapshots.borrow_and_update().clone();
    if current.is_some_and(|s| !admission::still_valid(&s, admitted)) {
        return End::Revoked;
    }
    let mut snapshots_open = true;
    let mut last_heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            frame = reader.next() => match frame {
                Ok(Some(Frame::Heartbeat { seq })) => {
                    last_heard = tokio::time::Instant::now();
                    if let Err(e) = write_frame(send, &Frame::HeartbeatAck { seq }).await {
                        return End::Connection(e.to_string());
                    }
                }
                Ok(Some(Frame::OriginHealth { service, healthy })) => {
                    debug!(agent = handle.info.agent_id, service, healthy, "origin health");
                    if service == handle.info.service {
                        handle.set_origin_healthy(healthy);
                    }
                }
                Ok(Some(Frame::Drain)) => {
                    if shared.agents.remove(handle) {
                        info!(agent = handle.info.agent_id, "agent draining; no new requests routed to it");
                    }
                    // Tells the agent that no new streams will be routed to this connection, so
                    // it can stop serving new ones (until then it serves what we already picked
                    // it for, so that no request fails during a rolling restart).
                    if let Err(e) = write_frame(send, &Frame::GoAway { reason: DRAIN_ACK.into() }).await {
                        return End::Connection(e.to_string());
                    }
                }
                Ok(Some(Frame::GoAway { reason })) => return End::AgentGone(reason),
                Ok(Some(other)) => {
                    return End::Protocol(format!("unexpected frame type {} on the control stream", other.type_code()));
                }
                Ok(None) => return End::AgentGone("control stream closed".into()),
                Err(WireError::Read(e)) => return End::Connection(e.to_string()),
                Err(e) => return End::Protocol(e.to_string()),
            },
            changed = snapshots.changed(), if snapshots_open => {
                if changed.is_err() {
                    snapshots_open = false;
                    continue;
                }
                let snap = snapshots.borrow_and_update().clone();
                if let Some(snap) = snap
                    && !admission::still_valid(&snap, admitted) {
                        return End::Revoked;
                    }
            }
            _ = tokio::time::sleep_until(last_heard + AGENT_SILENT_AFTER) => {
                return End::Silent;
            }
            _ = shutdown.cancelled() => return End::Shutdown,
            stream = conn.accept_bi() => match stream {
                // Only the edge opens data streams; refuse anything else the agent opens.
                Ok((mut s, mut r)) => {
                    let _ = s.reset(quinn::VarInt::from_u32(code::PROTOCOL));
                    let _ = r.stop(quinn::VarInt::from_u32(code::PROTOCOL));
                }
                Err(e) => return End::Connection(e.to_string()),
            },
        }
    }
}
