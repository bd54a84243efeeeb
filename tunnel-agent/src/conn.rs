//! Connection slots: each dials an edge, registers on the control stream, serves the streams the
//! edge opens, and reconnects with backoff. Which edge to dial is decided by [`Targets`]; how long
//! to wait by [`Backoff`]. This module is only the IO around them.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};
use tunnel_proto::{EdgeEndpoint, Frame, VERSION};

use crate::Transport;
use crate::backoff::Backoff;
use crate::heartbeat::Heartbeat;
use crate::stream::{self, StreamCtx};
use crate::targets::{SlotId, Targets};
use crate::wire::{FrameReader, code, write_frame};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// In-flight requests get this long to finish once a connection drains.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long, after sending `Drain`, new streams are still served while waiting for the edge's
/// `GoAway` answer (edges that do not answer cost this much extra at shutdown).
const DRAIN_ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// State every slot shares (immutable except the small `targets` map, locked without `.await`).
pub(crate) struct Shared {
    pub(crate) token: String,
    pub(crate) agent_id: String,
    pub(crate) service: String,
    pub(crate) server_name: Option<String>,
    pub(crate) client_config: quinn::ClientConfig,
    /// Outer TLS of the TCP fallback.
    pub(crate) tcp_tls: Arc<rustls::ClientConfig>,
    pub(crate) transport: Transport,
    /// QUIC handshake time before `auto` falls back to TCP.
    pub(crate) quic_timeout: Duration,
    /// While on TCP, how often `auto` tries QUIC again.
    pub(crate) quic_reprobe: Duration,
    pub(crate) targets: Mutex<Targets>,
    pub(crate) stream_ctx: Arc<StreamCtx>,
    /// Latest origin health (true until a probe says otherwise).
    pub(crate) health: watch::Receiver<bool>,
    /// Counters for `/metrics` and `/ready`.
    pub(crate) stats: Arc<crate::admin::Stats>,
    pub(crate) shutdown: CancellationToken,
    /// Slots and background drains; `run` waits for all of them.
    pub(crate) tasks: TaskTracker,
}

impl Shared {
    fn targets(&self) -> MutexGuard<'_, Targets> {
        // A panic while holding this lock cannot leave Targets half-updated in a harmful way.
        self.targets.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) fn spawn_slot(shared: &Arc<Shared>, slot: SlotId) {
    shared.tasks.spawn(run_slot(shared.clone(), slot));
}

enum Outcome {
    /// Registered and served until the connection ended.
    Served {
        connected_at: Instant,
        /// Redial at once: the edge answered with a QUIC stateless reset (it restarted and is
        /// listening again), or the slot is leaving the TCP fallback for QUIC.
        reconnect_now: bool,
    },
    Failed,
    Shutdown,
}

async fn run_slot(shared: Arc<Shared>, slot: SlotId) {
    let mut backoff = Backoff::default();
    let mut rng = StdRng::from_os_rng();
    let mut endpoint: Option<quinn::Endpoint> = None;
    // When the last QUIC handshake of this slot timed out (UDP blocked?).
    let mut quic_failed_at: Option<Instant> = None;
    while !shared.shutdown.is_cancelled() {
        let addr = shared.targets().next_addr(slot);
        if let Some(addr) = addr {
            match attempt(&shared, slot, addr, &mut endpoint, &mut quic_failed_at).await {
                Outcome::Served {
                    connected_at,
                    reconnect_now,
                } => {
                    if reconnect_now {
                        backoff.on_edge_restart(Instant::now());
                    } else {
                        backoff.on_disconnect(connected_at, Instant::now());
                    }
                }
                Outcome::Failed => shared.targets().on_failure(slot),
                Outcome::Shutdown => break,
            }
        }
        let delay = backoff.next_delay(Instant::now(), &mut rng);
        debug!(slot, ?delay, "next connection attempt after");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shared.shutdown.cancelled() => break,
        }
    }
    if let Some(ep) = endpoint {
        // Let CONNECTION_CLOSE frames go out.
        let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
    }
    debug!(slot, "slot stopped");
}

/// One endpoint (one local UDP port) per slot, kept across reconnects; rebound if the address
/// family changes.
fn endpoint_for(
    ep: &mut Option<quinn::Endpoint>,
    addr: SocketAddr,
) -> std::io::Result<quinn::Endpoint> {
    if let Some(e) = ep.as_ref()
        && e.local_addr().is_ok_and(|l| l.is_ipv4() == addr.is_ipv4())
    {
        return Ok(e.clone());
    }
    let bind: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let (socket, buffers) = tunnel_proto::io::udp::bind(bind)?;
    if let Some(sysctl) = buffers.shortfall() {
        warn!(
            recv = buffers.recv,
            send = buffers.send,
            wanted = tunnel_proto::io::udp::WANTED_BUFFER,
            "the kernel granted smaller UDP buffers than asked for the tunnel; raise them with: sysctl -w {sysctl}"
        );
    }
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for the QUIC endpoint"))?;
    let e = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)?;
    *ep = Some(e.clone());
    Ok(e)
}

/// The transport a connection runs over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Via {
    Quic,
    /// QUIC packets inside TLS over TCP (`tunnel_proto::io::fallback`).
    Tcp,
}

impl Via {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Tcp => "tcp",
        }
    }
}

enum DialError {
    /// No handshake within the time allowed: with `auto`, a reason to try TCP.
    TimedOut(Duration),
    /// Plain UDP to the edge failed visibly (`auto` only): try TCP without waiting.
    UdpFailed(std::io::Error),
    Failed(String),
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TimedOut(d) => write!(f, "QUIC handshake timed out after {d:?}"),
            Self::UdpFailed(e) => write!(f, "UDP to the edge fails: {e}"),
            Self::Failed(why) => f.write_str(why),
        }
    }
}

async fn dial_quic(
    shared: &Shared,
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection, DialError> {
    let connecting = ep
        .connect_with(shared.client_config.clone(), addr, server_name)
        .map_err(|e| DialError::Failed(format!("QUIC connect: {e}")))?;
    let timeout = match shared.transport {
        Transport::Auto => shared.quic_timeout,
        Transport::Quic | Transport::Tcp => HANDSHAKE_TIMEOUT,
    };
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(quinn::ConnectionError::TimedOut)) | Err(_) => Err(DialError::TimedOut(timeout)),
        Ok(Err(e)) => Err(DialError::Failed(format!("QUIC handshake: {e}"))),
    }
}

/// Dials the edge's TCP fallback (same address, TCP), verifies its certificate like QUIC does,
/// and runs a QUIC connection over it. The connection is closed as soon as the TCP connection
/// ends, rather than after a heartbeat timeout.
async fn dial_tcp(
    shared: &Shared,
    addr: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection, DialError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| DialError::Failed(format!("{what}: {e}"));
    let dial = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| fail("TCP connect", &e))?;
        let _ = tcp.set_nodelay(true);
        let local = tcp
            .local_addr()
            .map_err(|e| fail("TCP local address", &e))?;
        let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
            .map_err(|e| fail("TLS server name", &e))?;
        let tls = tokio_rustls::TlsConnector::from(shared.tcp_tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| fail("TLS over TCP", &e))?;
        let (socket, pump) = tunnel_proto::io::fallback::StreamSocket::new(tls, local, addr);
        let lost = CancellationToken::new();
        let lost_tx = lost.clone();
        tokio::spawn(async move {
            if let Err(e) = pump.await {
                debug!(error = %e, "TCP fallback connection ended");
            }
            lost_tx.cancel();
        });
        let runtime = quinn::default_runtime()
            .ok_or_else(|| DialError::Failed("no async runtime for QUIC".into()))?;
        let ep = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            None,
            socket,
            runtime,
        )
        .map_err(|e| fail("QUIC endpoint over TCP", &e))?;
        let conn = ep
            .connect_with(shared.client_config.clone(), addr, server_name)
            .map_err(|e| fail("QUIC connect over TCP", &e))?
            .await
            .map_err(|e| fail("QUIC handshake over TCP", &e))?;
        let watched = conn.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = lost.cancelled() => watched.close(
                    quinn::VarInt::from_u32(code::CANCELLED),
                    b"TCP fallback connection closed",
                ),
                _ = watched.closed() => {}
            }
        });
        Ok(conn)
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, dial)
        .await
        .unwrap_or_else(|_| {
            Err(DialError::Failed(format!(
                "TCP+TLS dial timed out after {HANDSHAKE_TIMEOUT:?}"
            )))
        })
}

/// Send and receive errors that mean UDP to the edge cannot work: a local firewall dropping the
/// packet (EPERM/EACCES on send), no route, or an ICMP "administratively prohibited" /
/// unreachable from a filtering router (EHOSTUNREACH on the connected socket). Not ECONNREFUSED:
/// a port-unreachable usually means the edge is restarting, and QUIC's retransmits reach it as
/// soon as it is back, which a TCP dial that fails now would not.
fn udp_unusable(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::PermissionDenied | K::HostUnreachable | K::NetworkUnreachable
    )
}

/// Resolves with the error as soon as plain UDP to `addr` visibly fails; never resolves while it
/// does not (a silent drop looks like a slow edge, so the QUIC timeout still decides). quinn only
/// logs its send errors, so without this a local firewall rule costs the whole `--quic-timeout`.
/// The probe is one byte, which QUIC endpoints discard as too short to be a packet.
async fn udp_fails_at_once(addr: SocketAddr) -> std::io::Error {
    let bind: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let probe = async {
        let socket = tokio::net::UdpSocket::bind(bind).await?;
        socket.connect(addr).await?;
        socket.send(&[0]).await?;
        // Only an ICMP error (reported on the connected socket) ends this; answers are ignored.
        let mut buf = [0u8; 64];
        loop {
            socket.recv(&mut buf).await?;
        }
    };
    let r: std::io::Result<std::convert::Infallible> = probe.await;
    match r {
        Err(e) if udp_unusable(&e) => e,
        // Anything else (EMFILE, ...) says nothing about the path: leave it to QUIC.
        Err(e) => {
            debug!(edge = %addr, error = %e, "UDP probe inconclusive");
            std::future::pending().await
        }
    }
}

/// Dials `addr` over the transport the slot's state and `--transport` call for.
async fn dial(
    shared: &Shared,
    slot: SlotId,
    addr: SocketAddr,
    endpoint: &mut Option<quinn::Endpoint>,
    quic_failed_at: &mut Option<Instant>,
) -> Result<(quinn::Connection, Via), DialError> {
    let server_name = shared
        .server_name
        .clone()
        .unwrap_or_else(|| addr.ip().to_string());
    let tcp_first = match shared.transport {
        Transport::Tcp => true,
        Transport::Quic => false,
        // UDP failed recently: go straight to TCP until the next re-probe is due.
        Transport::Auto => quic_failed_at.is_some_and(|t| t.elapsed() < shared.quic_reprobe),
    };
    if tcp_first {
        return dial_tcp(shared, addr, &server_name)
            .await
            .map(|c| (c, Via::Tcp));
    }
    let ep = endpoint_for(endpoint, addr)
        .map_err(|e| DialError::Failed(format!("binding a UDP socket: {e}")))?;
    // With `auto`, a UDP path that fails visibly (local firewall, ICMP reject) goes to TCP at
    // once instead of after `--quic-timeout`.
    let probe = async {
        match shared.transport {
            Transport::Auto => udp_fails_at_once(addr).await,
            Transport::Quic | Transport::Tcp => std::future::pending().await,
        }
    };
    let quic = tokio::select! {
        r = dial_quic(shared, &ep, addr, &server_name) => r,
        e = probe => Err(DialError::UdpFailed(e)),
    };
    match quic {
        Ok(c) => {
            *quic_failed_at = None;
            Ok((c, Via::Quic))
        }
        Err(DialError::UdpFailed(e)) => {
            warn!(slot, edge = %addr, error = %e, "UDP to the edge fails at once: UDP is blocked; trying QUIC over TLS/TCP now");
            let c = dial_tcp(shared, addr, &server_name).await?;
            *quic_failed_at = Some(Instant::now());
            Ok((c, Via::Tcp))
        }
        Err(DialError::TimedOut(after)) if shared.transport == Transport::Auto => {
            *quic_failed_at = Some(Instant::now());
            warn!(slot, edge = %addr, ?after, "no QUIC handshake: UDP may be blocked; trying QUIC over TLS/TCP");
            dial_tcp(shared, addr, &server_name)
                .await
                .map(|c| (c, Via::Tcp))
        }
        Err(e) => Err(e),
    }
}

/// While a slot runs on the TCP fallback: resolves with a QUIC connection to the same edge once
/// a handshake succeeds (probing every `--quic-reprobe`), so the slot can move back to QUIC.
async fn quic_is_back(
    shared: &Shared,
    ep: Option<quinn::Endpoint>,
    addr: SocketAddr,
) -> quinn::Connection {
    let Some(ep) = ep else {
        return std::future::pending().await;
    };
    let server_name = shared
        .server_name
        .clone()
        .unwrap_or_else(|| addr.ip().to_string());
    loop {
        tokio::time::sleep(shared.quic_reprobe).await;
        match dial_quic(shared, &ep, addr, &server_name).await {
            Ok(conn) => return conn,
            Err(e) => debug!(edge = %addr, error = %e, "QUIC re-probe failed; staying on TCP"),
        }
    }
}

struct Welcome {
    edge_id: String,
    region: String,
    other_edges: Vec<EdgeEndpoint>,
}

enum RegisterError {
    Rejected(String),
    Failed(String),
}

/// A TCP-fallback connection being replaced by QUIC: drained (`Drain`, in-flight and already
/// routed streams served, then closed) only once the QUIC connection is registered, so the edge
/// always has a connection to route to and the switch fails no request.
struct Retiring {
    conn: quinn::Connection,
    streams: TaskTracker,
    ctl_send: quinn::SendStream,
    ctl: FrameReader,
}

impl Retiring {
    fn start(self, shared: &Arc<Shared>) {
        let Self {
            conn,
            streams,
            mut ctl_send,
            ctl,
        } = self;
        let ctx = shared.stream_ctx.clone();
        shared.tasks.spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                write_frame(&mut ctl_send, &Frame::Drain),
            )
            .await;
            drain(conn, streams, ctl_send, Some(ctl), ctx).await;
        });
    }
}

async fn attempt(
    shared: &Arc<Shared>,
    slot: SlotId,
    addr: SocketAddr,
    endpoint: &mut Option<quinn::Endpoint>,
    quic_failed_at: &mut Option<Instant>,
) -> Outcome {
    // A QUIC connection a re-probe already established, and the TCP one it replaces.
    let mut upgraded: Option<(quinn::Connection, Retiring)> = None;
    loop {
        let (conn, via, retiring) = match upgraded.take() {
            Some((conn, retiring)) => {
                *quic_failed_at = None;
                (conn, Via::Quic, Some(retiring))
            }
            None => tokio::select! {
                r = dial(shared, slot, addr, endpoint, quic_failed_at) => match r {
                    Ok((conn, via)) => (conn, via, None),
                    Err(e) => {
                        warn!(slot, edge = %addr, error = %e, "connecting to the edge failed");
                        return Outcome::Failed;
                    }
                },
                _ = shared.shutdown.cancelled() => return Outcome::Shutdown,
            },
        };
        let registered = tokio::select! {
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, register(shared, &conn)) => match r {
                Ok(r) => r,
                Err(_) => Err(RegisterError::Failed(format!("no Welcome within {HANDSHAKE_TIMEOUT:?}"))),
            },
            _ = shared.shutdown.cancelled() => {
                conn.close(quinn::VarInt::from_u32(0), b"shutdown");
                if let Some(r) = retiring {
                    r.start(shared);
                }
                return Outcome::Shutdown;
            }
        };
        // Registered or not, the old connection goes now.
        if let Some(r) = retiring {
            r.start(shared);
        }
        let (ctl_send, ctl_recv, welcome) = match registered {
            Ok(r) => r,
            Err(RegisterError::Rejected(reason)) => {
                error!(slot, edge = %addr, %reason, "edge rejected this agent; retrying with backoff");
                conn.close(quinn::VarInt::from_u32(0), b"rejected");
                return Outcome::Failed;
            }
            Err(RegisterError::Failed(why)) => {
                warn!(slot, edge = %addr, error = %why, "registration failed");
                conn.close(
                    quinn::VarInt::from_u32(code::PROTOCOL),
                    b"registration failed",
                );
                return Outcome::Failed;
            }
        };
        let others: Vec<String> = welcome
            .other_edges
            .iter()
            .map(|e| format!("{}@{}={}", e.edge_id, e.region, e.addr))
            .collect();
        info!(
            slot,
            edge = %addr,
            edge_id = %welcome.edge_id,
            region = %welcome.region,
            other_edges = ?others,
            transport = via.as_str(),
            "registered with edge"
        );
        let (new_slots, bad) =
            shared
                .targets()
                .on_welcome(slot, addr, &welcome.region, &welcome.other_edges);
        if bad > 0 {
            warn!(slot, edge = %addr, bad, "Welcome listed edges with unparsable addresses");
        }
        for s in new_slots {
            let region = shared.targets().slot_region(s).map(str::to_owned);
            info!(slot = s, ?region, "connecting to another region");
            spawn_slot(shared, s);
        }
        let connected_at = Instant::now();
        let registered = shared.stats.registered(via);
        // On the TCP fallback, `auto` keeps probing QUIC and moves back when it works.
        let probe_from = match (via, shared.transport) {
            (Via::Tcp, Transport::Auto) => endpoint_for(endpoint, addr).ok(),
            _ => None,
        };
        let end = serve(shared, slot, addr, conn, ctl_send, ctl_recv, probe_from).await;
        drop(registered);
        match end {
            Ended::Upgrade(quic, retiring) => upgraded = Some((quic, retiring)),
            Ended::Done { reconnect_now } => {
                return Outcome::Served {
                    connected_at,
                    reconnect_now,
                };
            }
        }
    }
}

async fn register(
    shared: &Shared,
    conn: &quinn::Connection,
) -> Result<(quinn::SendStream, FrameReader, Welcome), RegisterError> {
    let fail =
        |what: &str, e: &dyn std::fmt::Display| RegisterError::Failed(format!("{what}: {e}"));
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| fail("opening control stream", &e))?;
    let hello = Frame::Hello {
        version: VERSION,
        token: shared.token.clone(),
        agent_id: shared.agent_id.clone(),
        services: vec![shared.service.clone()],
    };
    let mut buf = BytesMut::new();
    tunnel_proto::encode(&hello, &mut buf).map_err(|e| fail("encoding Hello", &e))?;
    send.write_all(&buf)
        .await
        .map_err(|e| fail("sending Hello", &e))?;
    let mut reader = FrameReader::new(recv);
    match reader.next().await {
        Ok(Some(Frame::Welcome {
            edge_id,
            region,
            other_edges,
        })) => Ok((
            send,
            reader,
            Welcome {
                edge_id,
                region,
                other_edges,
            },
        )),
        Ok(Some(Frame::Reject { reason })) => Err(RegisterError::Rejected(reason)),
        Ok(Some(Frame::GoAway { reason })) => {
            Err(RegisterError::Failed(format!("edge sent GoAway: {reason}")))
        }
        Ok(Some(other)) => Err(RegisterError::Failed(format!(
            "expected Welcome, got frame type {}",
            other.type_code()
        ))),
        Ok(None) => Err(RegisterError::Failed(
            "edge closed the control stream".into(),
        )),
        Err(e) => Err(fail("reading Welcome", &e)),
    }
}

enum Stop {
    Shutdown,
    /// UDP works again: register this QUIC connection, then drain the TCP-fallback one.
    Upgrade(quinn::Connection),
    EdgeDrain(String),
    Lost(String),
}

/// How [`serve`] ended.
enum Ended {
    /// `reconnect_now`: a stateless reset (the edge restarted and is back).
    Done { reconnect_now: bool },
    /// A QUIC re-probe succeeded while on the TCP fallback.
    Upgrade(quinn::Connection, Retiring),
}

/// Serves a registered connection until shutdown, an edge `Drain`/`GoAway`, loss, or (with
/// `upgrade`, the slot's UDP endpoint, on the TCP fallback) a successful QUIC re-probe.
async fn serve(
    shared: &Arc<Shared>,
    slot: SlotId,
    addr: SocketAddr,
    conn: quinn::Connection,
    mut ctl_send: quinn::SendStream,
    mut ctl: FrameReader,
    upgrade: Option<quinn::Endpoint>,
) -> Ended {
    let probing = upgrade.is_some();
    let quic_back = quic_is_back(shared, upgrade, addr);
    tokio::pin!(quic_back);
    let streams = TaskTracker::new();
    let mut hb = Heartbeat::new(Instant::now());
    let mut health = shared.health.clone();
    let mut health_open = true;
    // Edges assume a healthy origin for a new connection; correct them at once if not.
    if !*health.borrow_and_update()
        && let Err(e) = write_frame(&mut ctl_send, &origin_health(shared, false)).await
    {
        warn!(slot, edge = %addr, error = %e, "control stream failed");
    }
    let stop = loop {
        let deadline = tokio::time::Instant::from_std(hb.deadline());
        tokio::select! {
            _ = shared.shutdown.cancelled() => break Stop::Shutdown,
            quic = &mut quic_back, if probing => break Stop::Upgrade(quic),
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    let counted = shared.stats.stream();
                    let ctx = shared.stream_ctx.clone();
                    streams.spawn(async move {
                        stream::handle(send, recv, ctx).await;
                        drop(counted);
                    });
                }
                Err(e) => break Stop::Lost(format!("connection lost: {e}")),
            },
            f = ctl.next() => match f {
                Ok(Some(Frame::HeartbeatAck { seq })) => hb.on_ack(seq, Instant::now()),
                Ok(Some(Frame::Heartbeat { seq })) => {
                    if let Err(e) = write_frame(&mut ctl_send, &Frame::HeartbeatAck { seq }).await {
                        break Stop::Lost(format!("control stream: {e}"));
                    }
                }
                Ok(Some(Frame::Drain)) => break Stop::EdgeDrain("edge sent Drain".into()),
                Ok(Some(Frame::GoAway { reason })) => {
                    break Stop::EdgeDrain(format!("edge sent GoAway: {reason}"));
                }
                Ok(Some(other)) => debug!(slot, type_code = other.type_code(), "ignoring control frame"),
                Ok(None) => break Stop::Lost("edge closed the control stream".into()),
                Err(e) => break Stop::Lost(format!("control stream: {e}")),
            },
            r = health.changed(), if health_open => match r {
                Ok(()) => {
                    let healthy = *health.borrow_and_update();
                    if let Err(e) = write_frame(&mut ctl_send, &origin_health(shared, healthy)).await {
                        break Stop::Lost(format!("control stream: {e}"));
                    }
                }
                Err(_) => health_open = false,
            },
            _ = tokio::time::sleep_until(deadline) => match hb.poll(Instant::now()) {
                Ok(Some(seq)) => {
                    if let Err(e) = write_frame(&mut ctl_send, &Frame::Heartbeat { seq }).await {
                        break Stop::Lost(format!("control stream: {e}"));
                    }
                }
                Ok(None) => {}
                Err(dead) => {
                    break Stop::Lost(format!("no HeartbeatAck for {:?}", dead.since.elapsed()));
                }
            },
        }
    };
    streams.close();
    match stop {
        Stop::Shutdown => {
            info!(slot, edge = %addr, in_flight = streams.len(), "draining connection");
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                write_frame(&mut ctl_send, &Frame::Drain),
            )
            .await;
            // Streams the edge opened before it saw `Drain` are still served; the edge's
            // `GoAway` answer says no more are coming.
            drain(
                conn,
                streams,
                ctl_send,
                Some(ctl),
                shared.stream_ctx.clone(),
            )
            .await;
        }
        Stop::Upgrade(quic) => {
            info!(slot, edge = %addr, in_flight = streams.len(), "UDP works again: moving this connection from TCP back to QUIC");
            // Streams the edge opens meanwhile wait in QUIC until the drain accepts them.
            return Ended::Upgrade(
                quic,
                Retiring {
                    conn,
                    streams,
                    ctl_send,
                    ctl,
                },
            );
        }
        Stop::EdgeDrain(why) => {
            info!(slot, edge = %addr, %why, in_flight = streams.len(), "edge is draining; reconnecting");
            // Finish in-flight requests in the background while the slot reconnects.
            shared.tasks.spawn(drain(
                conn,
                streams,
                ctl_send,
                None,
                shared.stream_ctx.clone(),
            ));
        }
        Stop::Lost(why) => {
            if matches!(conn.close_reason(), Some(quinn::ConnectionError::Reset)) {
                info!(slot, edge = %addr, "edge restarted (stateless reset); reconnecting at once");
                return Ended::Done {
                    reconnect_now: true,
                };
            }
            warn!(slot, edge = %addr, %why, "tunnel connection lost; reconnecting");
            conn.close(quinn::VarInt::from_u32(code::CANCELLED), b"lost");
        }
    }
    Ended::Done {
        reconnect_now: false,
    }
}

fn origin_health(shared: &Shared, healthy: bool) -> Frame {
    Frame::OriginHealth {
        service: shared.service.clone(),
        healthy,
    }
}

/// Lets in-flight streams finish for up to [`DRAIN_TIMEOUT`], then closes the connection with
/// code 0. With `ctl` (we sent `Drain`), streams the edge opens until it answers with `GoAway`
/// (or [`DRAIN_ACK_TIMEOUT`] passes, for edges that do not answer) are still served: the edge
/// picked this connection before it saw `Drain`, and refusing them would fail requests. Streams
/// opened after that are refused with [`code::REFUSED`] (nothing reached the origin, so the edge
/// may retry them elsewhere).
async fn drain(
    conn: quinn::Connection,
    streams: TaskTracker,
    mut ctl_send: quinn::SendStream,
    mut ctl: Option<FrameReader>,
    ctx: Arc<StreamCtx>,
) {
    let deadline = tokio::time::sleep(DRAIN_TIMEOUT);
    tokio::pin!(deadline);
    let ack_deadline = tokio::time::sleep(DRAIN_ACK_TIMEOUT);
    tokio::pin!(ack_deadline);
    loop {
        let acked = ctl.is_none();
        tokio::select! {
            _ = streams.wait(), if acked => break,
            _ = &mut deadline => {
                warn!(in_flight = streams.len(), "drain timed out; closing with requests in flight");
                break;
            }
            _ = &mut ack_deadline, if !acked => {
                debug!("no GoAway answered our Drain; assuming the edge stopped routing");
                ctl = None;
            }
            f = next_ctl(&mut ctl), if !acked => match f {
                Ok(Some(Frame::GoAway { .. } | Frame::Drain)) | Ok(None) | Err(_) => ctl = None,
                Ok(Some(_)) => {}
            },
            s = conn.accept_bi() => match s {
                Ok((send, recv)) if !acked => {
                    streams.spawn(stream::handle(send, recv, ctx.clone()));
                }
                Ok((mut send, mut recv)) => {
                    let _ = send.reset(quinn::VarInt::from_u32(code::REFUSED));
                    let _ = recv.stop(quinn::VarInt::from_u32(code::REFUSED));
                }
                Err(_) => break,
            },
        }
    }
    // `close` drops unacknowledged data: make sure the `Drain` frame got there first.
    stream::finish(&mut ctl_send).await;
    conn.close(quinn::VarInt::from_u32(0), b"drained");
}

async fn next_ctl(ctl: &mut Option<FrameReader>) -> Result<Option<Frame>, crate::wire::WireError> {
    match ctl {
        Some(r) => r.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::io::{Error, ErrorKind};
    use std::time::Duration;

    use super::{udp_fails_at_once, udp_unusable};

    #[test]
    fn which_udp_errors_mean_blocked() {
        for kind in [
            ErrorKind::PermissionDenied,
            ErrorKind::HostUnreachable,
            ErrorKind::NetworkUnreachable,
        ] {
            assert!(udp_unusable(&Error::from(kind)), "{kind:?}");
        }
        // A closed port: the edge may be restarting; QUIC keeps trying.
        assert!(!udp_unusable(&Error::from(ErrorKind::ConnectionRefused)));
        assert!(!udp_unusable(&Error::from_raw_os_error(24)), "EMFILE");
    }

    /// A send the kernel refuses (broadcast without SO_BROADCAST: EACCES, as a local firewall's
    /// EPERM) is reported at once.
    #[tokio::test]
    async fn a_refused_send_is_reported_at_once() {
        let e = tokio::time::timeout(
            Duration::from_secs(1),
            udp_fails_at_once("255.255.255.255:7443".parse().unwrap()),
        )
        .await
        .expect("reported within a second");
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    }

    /// A silent peer and a closed port leave the decision to the QUIC timeout.
    #[tokio::test]
    async fn silence_and_closed_ports_are_not_blocking() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        for addr in [silent.local_addr().unwrap(), closed_addr] {
            assert!(
                tokio::time::timeout(Duration::from_millis(300), udp_fails_at_once(addr))
                    .await
                    .is_err(),
                "{addr}"
            );
        }
    }
}
