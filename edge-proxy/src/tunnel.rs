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
use tunnel_proto::io::fallback::MuxSocket;

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

/// Label mixed into the key derived from the TLS key, so it has its own use.
const RESET_KEY_LABEL: &[u8] = b"meridian edge tunnel stateless reset v1";
/// Minimum gap between stateless resets (quinn's default is 20 ms, which would let a restarted
/// edge reset only 50 stale agent connections per second). A reset is always smaller than the
/// packet that caused it, so this bounds CPU, not amplification.
const MIN_RESET_INTERVAL: Duration = Duration::from_millis(1);

/// HMAC-SHA256 (RFC 2104) over sha2, as quinn's `HmacKey`: the key that makes stateless-reset
/// tokens. The edge derives it from its TLS key instead of quinn's per-process random key, so a
/// restarted edge produces the same tokens as before and can reset an agent's stale connection
/// on its first packet; otherwise the agent waits out its heartbeat timeout (seconds).
struct ResetKey {
    /// The HMAC key, already at the SHA-256 block size.
    key: [u8; 64],
}

impl ResetKey {
    fn derive(label: &[u8], secret: &[u8]) -> Self {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(label);
        h.update(secret);
        let mut key = [0u8; 64];
        key[..32].copy_from_slice(&h.finalize());
        Self { key }
    }

    fn mac(&self, data: &[u8]) -> [u8; 32] {
        use sha2::Digest;
        let pad = |byte: u8| self.key.map(|k| k ^ byte);
        let mut inner = sha2::Sha256::new();
        inner.update(pad(0x36));
        inner.update(data);
        let mut outer = sha2::Sha256::new();
        outer.update(pad(0x5c));
        outer.update(inner.finalize());
        outer.finalize().into()
    }
}

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let mac = self.mac(data);
        let n = signature_out.len().min(mac.len());
        signature_out[..n].copy_from_slice(&mac[..n]);
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        let mac = self.mac(data);
        // Constant time: no early exit on the first differing byte.
        let diff = mac
            .iter()
            .zip(signature)
            .fold(u8::from(signature.len() != mac.len()), |acc, (a, b)| {
                acc | (a ^ b)
            });
        if diff == 0 {
            Ok(())
        } else {
            Err(quinn::crypto::CryptoError)
        }
    }
}

/// Random 8-byte connection IDs that accept any 8-byte ID as possibly ours. quinn's default
/// generator MACs its IDs with a per-process key and sends stateless resets only for IDs that
/// validate, so a restarted edge would silently drop the agent's packets instead of resetting its
/// stale connection. (Resets stay bounded: each is smaller than the packet that caused it, and
/// [`MIN_RESET_INTERVAL`] apart.)
struct CidGenerator;

impl CidGenerator {
    const LEN: usize = 8;
}

impl quinn::ConnectionIdGenerator for CidGenerator {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let cid: [u8; Self::LEN] = rand::random();
        quinn::ConnectionId::new(&cid)
    }

    fn cid_len(&self) -> usize {
        Self::LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Binds the tunnel's QUIC endpoint with a stateless-reset key derived from `secret` (the edge's
/// TLS private key, so stable across restarts) and [`CidGenerator`], so a restarted edge resets
/// an agent's stale connection on its first packet; see [`ResetKey`]. The UDP socket gets large
/// kernel buffers (a warning names the sysctl when refused) and sits inside a [`MuxSocket`], so
/// agents on the TCP fallback ([`serve_tcp_fallback`]) reach the same endpoint.
pub(crate) fn bind_endpoint(
    server: quinn::ServerConfig,
    addr: SocketAddr,
    secret: &[u8],
) -> std::io::Result<(quinn::Endpoint, Arc<MuxSocket>)> {
    let mut config =
        quinn::EndpointConfig::new(Arc::new(ResetKey::derive(RESET_KEY_LABEL, secret)));
    config.min_reset_interval(MIN_RESET_INTERVAL);
    config.cid_generator(|| Box::new(CidGenerator));
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for the QUIC endpoint"))?;
    let (socket, buffers) = tunnel_proto::io::udp::bind(addr)?;
    if let Some(sysctl) = buffers.shortfall() {
        warn!(
            recv = buffers.recv,
            send = buffers.send,
            wanted = tunnel_proto::io::udp::WANTED_BUFFER,
            "the kernel granted smaller UDP buffers than asked for the tunnel; raise them with: sysctl -w {sysctl}"
        );
    }
    let mux = MuxSocket::new(runtime.wrap_udp_socket(socket)?);
    let endpoint =
        quinn::Endpoint::new_with_abstract_socket(config, Some(server), mux.clone(), runtime)?;
    Ok((endpoint, mux))
}

/// TLS handshakes on the TCP fallback listener in progress at once.
const MAX_TCP_HANDSHAKES: usize = 256;

/// The TCP+TLS fallback listener: agents whose UDP is blocked carry the same QUIC packets over
/// it (see `tunnel_proto::io::fallback`).
pub(crate) struct TcpFallback {
    pub(crate) listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    mux: Arc<MuxSocket>,
}

impl TcpFallback {
    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }
}

/// Binds the TCP fallback listener: on `explicit` if given, else on the QUIC listener's address
/// (same port, TCP), where a failure only disables the fallback with a warning.
pub(crate) async fn bind_tcp_fallback(
    explicit: Option<SocketAddr>,
    quic_addr: SocketAddr,
    identity: &crate::tls::Identity,
    mux: Arc<MuxSocket>,
) -> Result<Option<TcpFallback>, crate::Error> {
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| crate::Error::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(identity.chain.clone(), identity.key.clone_key())
    .map_err(|e| crate::Error::Tls(format!("certificate/key: {e}")))?;
    tls.alpn_protocols = vec![tunnel_proto::TCP_ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let addr = explicit.unwrap_or(quic_addr);
    let listener = match crate::listen::tcp(addr) {
        Ok(l) => l,
        Err(source) if explicit.is_some() => {
            return Err(crate::Error::Bind {
                what: "tunnel TCP fallback",
                addr,
                source,
            });
        }
        Err(e) => {
            warn!(%addr, error = %e, "cannot listen for the tunnel's TCP fallback on the QUIC port; agents behind UDP-blocking networks cannot connect (set --tunnel-tcp-listen)");
            return Ok(None);
        }
    };
    Ok(Some(TcpFallback {
        listener,
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        mux,
    }))
}

/// Accepts TCP+TLS fallback connections until `shutdown`; each becomes a pseudo-peer of the QUIC
/// endpoint, so the agent's session is served by [`accept_loop`] like any other.
pub(crate) async fn serve_tcp_fallback(
    fb: TcpFallback,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let TcpFallback {
        listener,
        acceptor,
        mux,
    } = fb;
    let connections = Arc::new(Semaphore::new(MAX_AGENT_CONNECTIONS));
    let handshakes = Arc::new(Semaphore::new(MAX_TCP_HANDSHAKES));
    loop {
        let (sock, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    debug!(error = %e, "tunnel TCP fallback accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let (Ok(permit), Ok(handshake)) = (
            connections.clone().try_acquire_owned(),
            handshakes.clone().try_acquire_owned(),
        ) else {
            debug!(%peer, "tunnel TCP fallback connection limit reached; closing");
            continue;
        };
        let _ = sock.set_nodelay(true);
        let (acceptor, mux, shutdown) = (acceptor.clone(), mux.clone(), shutdown.clone());
        tracker.spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HELLO_TIMEOUT, acceptor.accept(sock)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "tunnel TCP fallback TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "tunnel TCP fallback TLS handshake timed out");
                    return;
                }
            };
            drop(handshake);
            let (fake, pump) = mux.add_stream(tls, peer);
            info!(%peer, quic_peer = %fake, "agent connected over the TCP fallback");
            tokio::select! {
                r = pump => debug!(%peer, result = ?r, "tunnel TCP fallback connection ended"),
                // The QUIC session on top drains first; this only cuts what is left.
                _ = async { shutdown.cancelled().await; tokio::time::sleep(DRAIN_TIMEOUT + FAREWELL_TIMEOUT).await } => {}
            }
        });
    }
}

/// A raw TCP service the edge listens for: `--tcp-service [IP:]PORT=SERVICE[,proxy-protocol]`.
/// The coordinator API has no TCP mounts yet, so this is edge configuration; a bare port binds on
/// the tunnel listener's IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpService {
    pub ip: Option<std::net::IpAddr>,
    pub port: u16,
    pub service: String,
    /// Send a PROXY protocol v2 header (the client's address) to the origin first.
    pub proxy_protocol: bool,
}

/// Parses `--tcp-service [IP:]PORT=SERVICE[,proxy-protocol]`.
pub fn parse_tcp_service(s: &str) -> Result<TcpService, String> {
    let usage = || format!("{s:?}: expected [IP:]PORT=SERVICE[,proxy-protocol], e.g. 6379=redis");
    let (listen, rest) = s.rsplit_once('=').ok_or_else(usage)?;
    let mut parts = rest.split(',');
    let service = parts.next().unwrap_or_default();
    if service.is_empty() {
        return Err(usage());
    }
    let mut proxy_protocol = false;
    for opt in parts {
        match opt {
            "proxy-protocol" => proxy_protocol = true,
            _ => {
                return Err(format!(
                    "{s:?}: unknown option {opt:?} (known: proxy-protocol)"
                ));
            }
        }
    }
    let (ip, port) = match listen.parse::<u16>() {
        Ok(port) => (None, port),
        Err(_) => {
            let addr: SocketAddr = listen.parse().map_err(|_| usage())?;
            (Some(addr.ip()), addr.port())
        }
    };
    Ok(TcpService {
        ip,
        port,
        service: service.to_owned(),
        proxy_protocol,
    })
}

/// A bound listener for a [`TcpService`].
pub(crate) struct TcpServiceListener {
    pub(crate) listener: tokio::net::TcpListener,
    pub(crate) service: String,
    pub(crate) proxy_protocol: bool,
}

/// Binds every `--tcp-service` (bare ports on `default_ip`, the tunnel listener's IP).
pub(crate) async fn bind_tcp_services(
    services: &[TcpService],
    default_ip: std::net::IpAddr,
) -> Result<Vec<TcpServiceListener>, crate::Error> {
    let mut out = Vec::with_capacity(services.len());
    for s in services {
        let addr = SocketAddr::new(s.ip.unwrap_or(default_ip), s.port);
        let listener = crate::listen::tcp(addr).map_err(|source| crate::Error::Bind {
            what: "TCP service",
            addr,
            source,
        })?;
        out.push(TcpServiceListener {
            listener,
            service: s.service.clone(),
            proxy_protocol: s.proxy_protocol,
        });
    }
    Ok(out)
}

/// Raw TCP connections held at once per TCP service listener.
const MAX_TCP_CONNECTIONS: usize = 10_000;
/// Read size from TCP clients (the default 8 KiB makes bulk transfers syscall-bound).
const TCP_COPY_BUF: usize = 64 * 1024;

/// Accepts TCP clients for one service until `shutdown`; each becomes one tunnel stream (a
/// `TcpHead` then raw bytes both ways) to an agent of the service, picked like HTTP requests.
pub(crate) async fn serve_tcp(
    l: TcpServiceListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    serve_tcp_until(l, shared, shutdown.clone(), shutdown, tracker).await;
}

/// [`serve_tcp`] that stops accepting at `stop` (a port the coordinator no longer lists) while
/// open connections keep running until they end or `shutdown` drains them.
pub(crate) async fn serve_tcp_until(
    l: TcpServiceListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let TcpServiceListener {
        listener,
        service,
        proxy_protocol,
    } = l;
    let service: Arc<str> = service.into();
    let limit = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let (sock, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    debug!(error = %e, "TCP service accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            debug!(%peer, service = %service, "TCP connection limit reached; closing");
            continue;
        };
        let (shared, service, shutdown) = (shared.clone(), service.clone(), shutdown.clone());
        tracker.spawn(async move {
            let _permit = permit;
            let result =
                tcp_connection(sock, peer, &service, proxy_protocol, &shared, &shutdown).await;
            shared
                .metrics
                .l4
                .record(crate::passthrough::Kind::Tcp, &service, &result);
            if let Err(e) = result {
                debug!(%peer, service = %service, error = %e, "TCP connection ended");
            }
        });
    }
}

/// Why an L4 connection (TCP service or TLS passthrough) ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TcpError {
    #[error("no agent connected for service {0}")]
    NoAgent(String),
    #[error("opening a tunnel stream: {0}")]
    Open(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("edge shutting down")]
    Shutdown,
    #[error("no byte either way for {0:?} (--l4-idle-timeout)")]
    Idle(Duration),
}

impl TcpError {
    /// Label for the `outcome` of `meridian_edge_l4_connections_total`.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            Self::NoAgent(_) => "no_agent",
            Self::Open(_) | Self::Wire(_) => "tunnel_error",
            Self::Io(_) => "io_error",
            Self::Shutdown => "shutdown",
            Self::Idle(_) => "idle_timeout",
        }
    }
}

/// One accepted TCP client of a `--tcp-service`: a PROXY v2 header first when the listener asks
/// for it, then the shared L4 path.
async fn tcp_connection(
    sock: tokio::net::TcpStream,
    peer: SocketAddr,
    service: &str,
    proxy_protocol: bool,
    shared: &Shared,
    shutdown: &CancellationToken,
) -> Result<(), TcpError> {
    let mut first = Vec::new();
    if proxy_protocol {
        match sock.local_addr() {
            Ok(local) => crate::proxy_protocol::encode_v2(peer, local, &mut first),
            Err(_) => crate::proxy_protocol::encode_v2_local(&mut first),
        }
    }
    tcp_stream(sock, &first, service, shared, shutdown).await
}

/// Carries a client's TCP connection over one tunnel stream (a `TcpHead`, then `first`, then raw
/// bytes both ways) to an agent of `service`, which splices it to its `--tcp` origin. Used by
/// `--tcp-service` listeners and TLS passthrough (`first` is then the ClientHello already read,
/// after an optional PROXY header: the agent needs no change for either).
pub(crate) async fn tcp_stream(
    sock: tokio::net::TcpStream,
    first: &[u8],
    service: &str,
    shared: &Shared,
    shutdown: &CancellationToken,
) -> Result<(), TcpError> {
    use tokio::io::AsyncWriteExt;

    let _ = sock.set_nodelay(true);
    let lease = shared
        .agents
        .pick(service, None, crate::balance::Choice::P2c)
        .ok_or_else(|| TcpError::NoAgent(service.to_owned()))?;
    let (mut send, recv) = lease.agent().conn.open_bi().await?;
    let mut head = bytes::BytesMut::new();
    tunnel_proto::encode_preamble(&mut head);
    tunnel_proto::encode(
        &Frame::TcpHead {
            service: service.to_owned(),
        },
        &mut head,
    )
    .map_err(WireError::from)?;
    head.extend_from_slice(first);
    send.write_all(&head).await.map_err(WireError::from)?;

    let (client_rd, mut client_wr) = sock.into_split();
    let activity = crate::l4idle::Activity::new();
    let client_rd = crate::l4idle::Tracked::new(client_rd, activity.clone());
    let mut recv = crate::l4idle::Tracked::new(recv, activity.clone());
    let up = async {
        let mut client_rd = tokio::io::BufReader::with_capacity(TCP_COPY_BUF, client_rd);
        tokio::io::copy_buf(&mut client_rd, &mut send).await?;
        // Half-close: the agent shuts down its write side to the origin.
        let _ = send.finish();
        Ok::<_, std::io::Error>(())
    };
    let down = async {
        tokio::io::copy(&mut recv, &mut client_wr).await?;
        client_wr.shutdown().await
    };
    let both = async { tokio::try_join!(up, down).map(|_| ()) };
    // On shutdown, open TCP connections get the drain period, then are cut.
    let drained = async {
        shutdown.cancelled().await;
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    let idle = shared.limits.l4_idle;
    let result = tokio::select! {
        r = both => r.map_err(TcpError::from),
        () = drained => Err(TcpError::Shutdown),
        () = activity.idle(idle) => Err(TcpError::Idle(idle)),
    };
    if result.is_err() {
        let _ = recv
            .get_mut()
            .stop(quinn::VarInt::from_u32(code::CANCELLED));
    }
    drop(lease);
    result
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
            let remote = MuxSocket::real_peer(incoming.remote_address());
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
    // TCP-fallback agents appear to quinn under a fake `100::` address: log and report the
    // connection's real peer instead.
    let via_tcp = MuxSocket::is_tcp_peer(&incoming.remote_address());
    let remote: SocketAddr = MuxSocket::real_peer(incoming.remote_address());
    let transport = if via_tcp { "tcp" } else { "quic" };
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
    let mut admitted = match admission::admit(snapshot.as_deref(), version, &token, &services) {
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
    // Per-service mTLS: a service with `require_mtls` takes only agents whose handshake
    // presented a current certificate from the tunnel client CA naming it.
    let chain = crate::client_auth::peer_chain(&conn);
    admitted.mtls = match snapshot.as_deref().map(|s| {
        crate::client_auth::admit(
            s,
            &admitted.service,
            chain.as_deref(),
            rustls::pki_types::UnixTime::now(),
        )
    }) {
        Some(Ok(verified)) => verified,
        // Unreachable: admission already needed a snapshot.
        None => false,
        Some(Err(reason)) => {
            warn!(%remote, agent_id, service = admitted.service, %reason, "agent rejected");
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
            origin_healthy: true,
        },
    );
    shared.agents.add(handle.clone());
    info!(%remote, agent_id, service = admitted.service, mtls = admitted.mtls, transport, "agent connected");

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
        End::MtlsRequired => {
            let reason = "service now requires mTLS and this connection presented no valid client certificate";
            farewell(
                &conn,
                send,
                Frame::GoAway {
                    reason: reason.into(),
                },
                close::REVOKED,
                reason,
            )
            .await;
        }
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
    /// The service started requiring mTLS and this connection was admitted without it.
    MtlsRequired,
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
            Self::MtlsRequired => f.write_str("service now requires mTLS"),
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
    if let Some(s) = &current {
        if !admission::still_valid(s, admitted) {
            return End::Revoked;
        }
        if !admitted.mtls && crate::client_auth::required(s, &admitted.service) {
            return End::MtlsRequired;
        }
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
                    if service == handle.info.service && handle.set_origin_healthy(healthy) {
                        // The coordinator (and through it GeoDNS) hears of it with the next
                        // heartbeat, sent at once.
                        shared.agents.changed.notify_one();
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
                if let Some(snap) = snap {
                    if !admission::still_valid(&snap, admitted) {
                        return End::Revoked;
                    }
                    if !admitted.mtls && crate::client_auth::required(&snap, &admitted.service) {
                        return End::MtlsRequired;
                    }
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

#[cfg(test)]
mod tests {
    use quinn::crypto::HmacKey;

    use super::{ResetKey, TcpService, parse_tcp_service};

    #[test]
    fn tcp_service_flag() {
        assert_eq!(
            parse_tcp_service("6379=redis"),
            Ok(TcpService {
                ip: None,
                port: 6379,
                service: "redis".into(),
                proxy_protocol: false,
            })
        );
        let s = parse_tcp_service("6379=redis,proxy-protocol").unwrap_or_else(|e| panic!("{e}"));
        assert!(s.proxy_protocol);
        assert_eq!(s.service, "redis");
        let s = parse_tcp_service("127.0.0.5:5432=pg").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.ip, Some([127, 0, 0, 5].into()));
        assert_eq!(s.port, 5432);
        for bad in [
            "6379",
            "6379=",
            "=redis",
            "host:1=x",
            "70000=x",
            "6379=redis,nope",
            "6379=,proxy-protocol",
        ] {
            assert!(parse_tcp_service(bad).is_err(), "{bad}");
        }
    }

    /// RFC 4231 test case 2, through our HMAC with the raw key (not the derived one).
    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        let mut key = [0u8; 64];
        key[..4].copy_from_slice(b"Jefe");
        let k = ResetKey { key };
        let mac = k.mac(b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(k.verify(b"what do ya want for nothing?", &mac).is_ok());
        assert!(k.verify(b"what do ya want for nothing!", &mac).is_err());
        assert!(
            k.verify(b"what do ya want for nothing?", &mac[..31])
                .is_err()
        );
    }

    #[test]
    fn any_8_byte_connection_id_is_ours_after_a_restart() {
        use quinn::ConnectionIdGenerator;
        let cid = super::CidGenerator.generate_cid();
        assert_eq!(cid.len(), 8);
        // Default `validate`: accepts IDs from a previous process, so they get a reset.
        assert!(super::CidGenerator.validate(&cid).is_ok());
    }

    /// The point of the key: the same TLS key gives the same reset tokens in a new process.
    #[test]
    fn reset_key_is_stable_per_secret() {
        let (a, b, c) = (
            ResetKey::derive(super::RESET_KEY_LABEL, b"tls key one"),
            ResetKey::derive(super::RESET_KEY_LABEL, b"tls key one"),
            ResetKey::derive(super::RESET_KEY_LABEL, b"tls key two"),
        );
        let (mut ta, mut tb, mut tc) = ([0u8; 16], [0u8; 16], [0u8; 16]);
        a.sign(b"connection id", &mut ta);
        b.sign(b"connection id", &mut tb);
        c.sign(b"connection id", &mut tc);
        assert_eq!(ta, tb);
        assert_ne!(ta, tc);
    }
}
