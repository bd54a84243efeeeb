//! UDP and TCP drivers: move bytes between sockets and [`respond`], nothing else.
//!
//! Why not `hickory_server::Server`: its UDP loop spawns a task per packet without bound, its
//! TCP loop has no connection limit, and its `Catalog` drops the ECS option we must echo. A
//! `RequestHandler` could fix the last point only; owning these ~200 lines fixes all three and
//! lets queries be answered inline from a precomputed table. hickory-proto still does all
//! parsing and encoding.

use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use coordinator_api::Snapshot;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage};
use quinn_udp::{Transmit, UdpSocketState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::Error;
use crate::config::Config;
use crate::fastpath::AnswerCache;
use crate::geoip;
use crate::gslb::{AnswerTable, Policy};
use crate::health::HealthTracker;
use crate::metrics::{Labels, Metrics};
use crate::respond::{MAX_QUERY_LEN, Outcome, Transport, respond, truncated_reply};
use crate::rrl::{Decision, SharedLimiter};
use crate::zone::{Zone, ZoneConfig, build_policies};

/// Sampled query-log entries waiting to be written; more are dropped.
const QUERY_LOG_QUEUE: usize = 1024;
/// Concurrent metrics scrapes.
const MAX_METRICS_CONNECTIONS: usize = 8;
/// Open TCP connections across all listeners; more are closed on accept.
pub const MAX_TCP_CONNECTIONS: usize = 256;
/// A TCP connection with no complete query (or unsent reply) for this long is closed.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Queries served on one TCP connection before we close it.
pub const MAX_QUERIES_PER_TCP_CONNECTION: usize = 1000;
/// UDP receive threads per socket (each answers inline, so this is the parallelism).
const MAX_UDP_WORKERS: usize = 4;
/// How long a UDP thread blocks for a datagram before it looks at the shutdown token, and at
/// most for send buffer space before it drops a reply.
const UDP_SHUTDOWN_POLL: Duration = Duration::from_millis(100);
/// Control-message space per datagram: packet info (v4 and v6 on dual-stack sockets), the
/// receive-offload segment size and the ECN byte quinn-udp asks for, with room to spare.
const UDP_CMSG_SPACE: usize = 128;
/// Datagrams received per system call.
const UDP_BATCH: usize = quinn_udp::BATCH_SIZE;
/// Largest receive buffer per datagram slot (receive offload joins datagrams up to this).
const MAX_UDP_SLOT: usize = 64 * 1024;
/// Largest segmented send.
const MAX_GSO_BYTES: usize = 60 * 1024;
/// Attempts to find a port free for both UDP and TCP when listening on port 0.
const EPHEMERAL_BIND_ATTEMPTS: usize = 16;

/// Counters since start; read them with `Ordering::Relaxed`.
#[derive(Debug, Default)]
pub struct Stats {
    pub queries: AtomicU64,
    pub malformed: AtomicU64,
    pub truncated: AtomicU64,
    pub tcp_rejected: AtomicU64,
    /// UDP responses dropped by rate limiting.
    pub rrl_dropped: AtomicU64,
    /// UDP responses sent truncated by rate limiting.
    pub rrl_slipped: AtomicU64,
    pub io_errors: AtomicU64,
    /// Bugs caught at the packet boundary; must stay 0.
    pub panics: AtomicU64,
    /// Labelled counters, set once at bind.
    pub metrics: OnceLock<Arc<Metrics>>,
    /// Sampled query log, set once at bind when enabled.
    query_log: OnceLock<QueryLog>,
}

/// One sampled query, sent off the hot path to be logged.
#[derive(Debug)]
struct LoggedQuery {
    peer: SocketAddr,
    transport: Transport,
    labels: Labels,
    region: Option<String>,
}

/// 1-in-`every` sampling into a bounded channel; full channel → the entry is dropped.
#[derive(Debug)]
struct QueryLog {
    every: u64,
    tx: mpsc::Sender<LoggedQuery>,
}

impl Stats {
    fn record(
        &self,
        labels: Option<&Labels>,
        malformed: bool,
        truncated: bool,
        zone: &Zone,
        peer: SocketAddr,
        transport: Transport,
    ) {
        let n = self.queries.fetch_add(1, Ordering::Relaxed);
        if let Some(l) = labels {
            if let Some(m) = self.metrics.get() {
                m.count(l);
            }
            if let Some(c) = l.region.and_then(|i| zone.region_counters.get(i)) {
                c.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(log) = self.query_log.get()
                && n.is_multiple_of(log.every)
            {
                let region = l
                    .region
                    .and_then(|i| zone.table.as_ref()?.regions().get(i))
                    .map(|r| r.name.clone());
                let _ = log.tx.try_send(LoggedQuery {
                    peer,
                    transport,
                    labels: *l,
                    region,
                });
            }
        }
        if malformed {
            self.malformed.fetch_add(1, Ordering::Relaxed);
        }
        if truncated {
            self.truncated.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A bound but not yet serving GeoDNS server.
#[derive(Debug)]
pub struct Server {
    zone_config: Arc<ZoneConfig>,
    udp: Vec<Arc<std::net::UdpSocket>>,
    tcp: Vec<TcpListener>,
    addrs: Vec<SocketAddr>,
    state: Arc<ArcSwap<Zone>>,
    stats: Arc<Stats>,
    metrics_listener: Option<TcpListener>,
    metrics_addr: Option<SocketAddr>,
    query_log_rx: Option<mpsc::Receiver<LoggedQuery>>,
}

impl Server {
    /// Validates the config and binds UDP and TCP on every `--listen` address (port 0 picks one
    /// free port for both).
    pub async fn bind(config: &Config) -> Result<Self, Error> {
        if config.listen.is_empty() {
            return Err(Error::Config("at least one --listen is required".into()));
        }
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        let mut addrs = Vec::new();
        for &addr in &config.listen {
            let (u, t, bound) = bind_pair(addr).await?;
            udp.push(Arc::new(u));
            tcp.push(t);
            addrs.push(bound);
        }
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| Error::Bind {
                        addr,
                        proto: "tcp (metrics)",
                        source,
                    })?,
            ),
            None => None,
        };
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
        // Listeners first, then the slow part (reading the GeoIP database).
        let zone_config =
            Arc::new(ZoneConfig::from_config(config).map_err(|e| Error::Config(e.to_string()))?);
        let (classes, nodes) = zone_config.policy().size();
        info!(
            classes,
            nodes,
            policies = zone_config.policies.len(),
            "client policy built"
        );
        let state = Arc::new(ArcSwap::from_pointee(Zone::new(zone_config.clone(), None)));
        let stats = Arc::new(Stats::default());
        let _ = stats.metrics.set(Arc::new(Metrics::new(
            &zone_config
                .geo_names
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
        )));
        let query_log_rx = match config.query_log_sample {
            0 => None,
            every => {
                let (tx, rx) = mpsc::channel(QUERY_LOG_QUEUE);
                let _ = stats.query_log.set(QueryLog {
                    every: u64::from(every),
                    tx,
                });
                Some(rx)
            }
        };
        Ok(Self {
            zone_config,
            udp,
            tcp,
            addrs,
            state,
            stats,
            metrics_listener,
            metrics_addr,
            query_log_rx,
        })
    }

    /// The bound metrics address, if `--metrics-listen` was given.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The bound addresses (UDP and TCP share each), in `--listen` order.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Serves until `shutdown` is cancelled, answering from the latest snapshot in `snapshots`.
    pub async fn run(
        self,
        snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let Self {
            zone_config,
            udp,
            tcp,
            addrs,
            state,
            stats,
            metrics_listener,
            metrics_addr,
            query_log_rx,
        } = self;
        let mut snapshots = snapshots;
        // A cached snapshot is usually already there: answer from it from the first packet.
        let initial = snapshots.borrow_and_update().clone();
        let mut health = HealthTracker::new(zone_config.hysteresis);
        if let Some(snap) = &initial {
            health.observe(snap, Instant::now());
            apply(
                snap,
                &zone_config,
                &zone_config.policies,
                &state,
                &health,
                &stats,
            );
        }
        let mut tasks = JoinSet::new();
        // UDP threads cannot be aborted: they stop on this token, which is also cancelled when
        // this future is dropped (a caller's `select!`, a panicking test), so none outlives it.
        let udp_stop = shutdown.child_token();
        let _udp_stop_on_drop = udp_stop.clone().drop_guard();
        tasks.spawn(follow_snapshots(
            snapshots,
            zone_config.clone(),
            state.clone(),
            health,
            initial,
            stats.clone(),
            shutdown.clone(),
        ));
        if let Some(listener) = metrics_listener {
            tasks.spawn(serve_metrics(listener, stats.clone(), shutdown.clone()));
        }
        if let Some(rx) = query_log_rx {
            tasks.spawn(write_query_log(rx, stats.clone(), shutdown.clone()));
        }
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, MAX_UDP_WORKERS);
        let rrl = (zone_config.source.rrl_rate > 0).then(|| {
            Arc::new(SharedLimiter::new(
                zone_config.source.rrl_rate,
                zone_config.source.rrl_slip,
            ))
        });
        for sock in udp {
            // quinn-udp sets the options (packet info, offloads) and makes the socket
            // non-blocking; the UDP threads want it blocking again.
            let io = UdpSocketState::new((&*sock).into())
                .and_then(|io| sock.set_nonblocking(false).map(|()| Arc::new(io)))
                .map_err(|source| Error::Bind {
                    addr: sock.local_addr().unwrap_or(addrs[0]),
                    proto: "udp (socket options)",
                    source,
                })?;
            for _ in 0..workers {
                let (sock, io, state, stats, rrl, stop) = (
                    sock.clone(),
                    io.clone(),
                    state.clone(),
                    stats.clone(),
                    rrl.clone(),
                    udp_stop.clone(),
                );
                tasks.spawn_blocking(move || udp_worker(&sock, &io, &state, &stats, rrl, &stop));
            }
        }
        let limit = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
        for listener in tcp {
            tasks.spawn(tcp_acceptor(
                listener,
                limit.clone(),
                state.clone(),
                stats.clone(),
                shutdown.clone(),
            ));
        }
        info!(listen = ?addrs, metrics = ?metrics_addr, zone = %zone_config.origin, "ready");

        shutdown.cancelled().await;
        while let Some(res) = tasks.join_next().await {
            if let Err(e) = res
                && e.is_panic()
            {
                error!(error = %e, "geodns task panicked");
            }
        }
        info!(
            queries = stats.queries.load(Ordering::Relaxed),
            malformed = stats.malformed.load(Ordering::Relaxed),
            truncated = stats.truncated.load(Ordering::Relaxed),
            tcp_rejected = stats.tcp_rejected.load(Ordering::Relaxed),
            rrl_dropped = stats.rrl_dropped.load(Ordering::Relaxed),
            rrl_slipped = stats.rrl_slipped.load(Ordering::Relaxed),
            "geodns stopped"
        );
        Ok(())
    }
}

async fn bind_pair(
    addr: SocketAddr,
) -> Result<(std::net::UdpSocket, TcpListener, SocketAddr), Error> {
    let attempts = if addr.port() == 0 {
        EPHEMERAL_BIND_ATTEMPTS
    } else {
        1
    };
    let mut last_err = None;
    for _ in 0..attempts {
        // Blocking: each UDP thread sleeps in `recvmmsg` like gdnsd's, with no readiness polling.
        // A send waits at most as long for buffer space, then that reply is dropped (counted).
        let udp = std::net::UdpSocket::bind(addr)
            .and_then(|u| u.set_read_timeout(Some(UDP_SHUTDOWN_POLL)).map(|()| u))
            .and_then(|u| u.set_write_timeout(Some(UDP_SHUTDOWN_POLL)).map(|()| u))
            .map_err(|source| Error::Bind {
                addr,
                proto: "udp",
                source,
            })?;
        let bound = udp.local_addr().map_err(|source| Error::Bind {
            addr,
            proto: "udp",
            source,
        })?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp, bound)),
            Err(e) => last_err = Some(e),
        }
    }
    let source = last_err.unwrap_or_else(|| std::io::Error::other("no bind attempt made"));
    Err(Error::Bind {
        addr,
        proto: "tcp",
        source,
    })
}

/// Rebuilds the answer table whenever the subscriber publishes a new snapshot, and whenever a
/// periodic re-observation flips a region's health verdict.
async fn follow_snapshots(
    mut rx: watch::Receiver<Option<Arc<Snapshot>>>,
    zone_config: Arc<ZoneConfig>,
    state: Arc<ArcSwap<Zone>>,
    mut health: HealthTracker,
    mut last: Option<Arc<Snapshot>>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(zone_config.hysteresis.tick());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut policies = zone_config.policies.clone();
    let reload_every = Duration::from_secs(zone_config.source.geoip_reload_secs.max(1));
    let reloading =
        zone_config.source.geoip_db.is_some() && zone_config.source.geoip_reload_secs > 0;
    let mut reload =
        tokio::time::interval_at(tokio::time::Instant::now() + reload_every, reload_every);
    reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {
                if let Some(snap) = &last
                    && health.observe(snap, Instant::now())
                {
                    apply(snap, &zone_config, &policies, &state, &health, &stats);
                }
                continue;
            }
            _ = reload.tick(), if reloading => {
                if let Some(p) = reload_policies(&zone_config, &policies).await {
                    policies = p;
                    if let Some(snap) = &last {
                        apply(snap, &zone_config, &policies, &state, &health, &stats);
                    }
                }
                continue;
            }
            changed = rx.changed() => if changed.is_err() {
                // The subscriber is gone: keep serving the last table (and keep re-observing it)
                // until shutdown.
                warn!("snapshot source closed; serving the last answer table");
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        _ = tick.tick() => if let Some(snap) = &last
                            && health.observe(snap, Instant::now())
                        {
                            apply(snap, &zone_config, &policies, &state, &health, &stats);
                        }
                    }
                }
            }
        }
        let current = rx.borrow_and_update().clone();
        if let Some(snap) = current
            && !last.as_ref().is_some_and(|l| Arc::ptr_eq(l, &snap))
        {
            health.observe(&snap, Instant::now());
            apply(&snap, &zone_config, &policies, &state, &health, &stats);
            last = Some(snap);
        }
    }
}

/// Re-reads `--geoip-db` if its modification time changed; `None` when unchanged or unreadable
/// (a bad new file keeps the old policy serving).
async fn reload_policies(
    zone_config: &Arc<ZoneConfig>,
    current: &[Arc<Policy>],
) -> Option<Vec<Arc<Policy>>> {
    let path = zone_config.source.geoip_db.clone()?;
    let loaded = current.first()?.db().and_then(|db| db.mtime);
    let now = geoip::mtime_of(&path);
    if now.is_none() || now == loaded {
        return None;
    }
    let zc = zone_config.clone();
    match tokio::task::spawn_blocking(move || build_policies(&zc.source, &zc.name_specs)).await {
        Ok(Ok(p)) => {
            let (classes, nodes) = p.first().map_or((0, 0), Policy::size);
            info!(path = %path.display(), classes, nodes, "GeoIP database reloaded");
            Some(p.into_iter().map(Arc::new).collect())
        }
        Ok(Err(e)) => {
            warn!(error = %e, "GeoIP database reload failed; keeping the previous one");
            None
        }
        Err(e) => {
            error!(error = %e, "GeoIP reload task failed");
            None
        }
    }
}

/// Builds the table for `snap` under `policy` and `health` and swaps it in.
fn apply(
    snap: &Snapshot,
    zone_config: &Arc<ZoneConfig>,
    policies: &[Arc<Policy>],
    state: &ArcSwap<Zone>,
    health: &HealthTracker,
    stats: &Stats,
) {
    let mut zone = Zone::build(zone_config.clone(), policies, snap, health);
    let verdicts: Vec<String> = health
        .verdicts()
        .map(|(n, v)| format!("{n}={v:?}"))
        .collect();
    let service_verdicts: Vec<String> = zone_config
        .geo_services
        .iter()
        .flatten()
        .flat_map(|s| {
            health
                .verdicts()
                .map(move |(n, _)| format!("{s}@{n}={:?}", health.verdict_for(n, Some(s))))
        })
        .collect();
    info!(
        revision = snap.revision,
        observed_version = snap.observed_version,
        ?verdicts,
        ?service_verdicts,
        records = snap.records.len(),
        ttl = zone.table.as_ref().map_or(0, AnswerTable::ttl),
        "answer table updated"
    );
    if let Some(m) = stats.metrics.get()
        && let Some(t) = &zone.table
    {
        zone.region_counters = t
            .regions()
            .iter()
            .map(|r| m.region_counter(&r.name))
            .collect();
    }
    state.store(Arc::new(zone));
}

/// Answers one packet, containing any panic to this packet.
fn answer(
    state: &ArcSwap<Zone>,
    stats: &Stats,
    packet: &[u8],
    peer: SocketAddr,
    transport: Transport,
) -> Outcome {
    let zone = state.load();
    match catch_unwind(AssertUnwindSafe(|| {
        respond(&zone, packet, peer.ip(), transport)
    })) {
        Ok(out) => {
            stats.record(
                out.labels.as_ref(),
                out.malformed,
                out.truncated,
                &zone,
                peer,
                transport,
            );
            out
        }
        Err(_) => {
            stats.panics.fetch_add(1, Ordering::Relaxed);
            error!(%peer, len = packet.len(), "panic while answering a query; dropped");
            Outcome {
                reply: None,
                malformed: true,
                truncated: false,
                labels: None,
                rotated: false,
            }
        }
    }
}

/// One reply waiting in a batch's output buffer.
#[derive(Clone, Copy, Debug)]
struct Pending {
    to: SocketAddr,
    /// Source address to send from (wildcard listeners answer from the address asked).
    from: Option<IpAddr>,
    start: usize,
    len: usize,
}

/// One received datagram (or, with receive offload, several of one sender and size).
#[derive(Clone, Copy, Debug)]
struct Datagram {
    peer: SocketAddr,
    /// The address it was sent to (packet info), for answering from it on wildcard listeners.
    dst: Option<IpAddr>,
    len: usize,
    /// Size of each joined datagram; `len` when not joined.
    stride: usize,
}

/// A UDP thread: blocks in `recvmmsg` for up to a batch of datagrams, answers them through its
/// own [`AnswerCache`], and sends the replies grouped per client (one `sendmsg` with UDP
/// segmentation offload for equal-sized replies to one address). Per-packet system calls were
/// most of a query's cost, and a blocking receive (as gdnsd does) saves the readiness polls and
/// empty reads of an async one: 6.5 % of the CPU per query in profiles.
fn udp_worker(
    sock: &std::net::UdpSocket,
    io: &UdpSocketState,
    state: &ArcSwap<Zone>,
    stats: &Stats,
    rrl: Option<Arc<SharedLimiter>>,
    shutdown: &CancellationToken,
) {
    let wildcard = sock.local_addr().is_ok_and(|a| a.ip().is_unspecified());
    // With receive offload the kernel may join datagrams of one sender into one buffer.
    let slot = (io.gro_segments().max(1) * (MAX_QUERY_LEN + 1)).min(MAX_UDP_SLOT);
    let mut bufs = vec![0u8; slot * UDP_BATCH];
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(
        UDP_BATCH,
        Some(Vec::with_capacity(UDP_CMSG_SPACE)),
    );
    let mut datagrams = Vec::with_capacity(UDP_BATCH);
    let mut cache = AnswerCache::default();
    let mut out = Vec::with_capacity(UDP_BATCH * 512);
    let mut pending: Vec<Pending> = Vec::with_capacity(UDP_BATCH);
    let mut gso = Vec::new();
    while !shutdown.is_cancelled() {
        if let Err(e) = recv_batch(
            sock.as_raw_fd(),
            &mut headers,
            &mut bufs,
            slot,
            &mut datagrams,
        ) {
            match e {
                // The read timeout: look at the shutdown token again.
                nix::Error::EAGAIN | nix::Error::EINTR => {}
                // ICMP-induced errors are per-peer; anything else may repeat, so back off.
                nix::Error::ECONNREFUSED | nix::Error::ECONNRESET => {
                    stats.io_errors.fetch_add(1, Ordering::Relaxed);
                }
                e => {
                    stats.io_errors.fetch_add(1, Ordering::Relaxed);
                    debug!(error = %e, "udp receive failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            continue;
        }
        let zone = state.load_full();
        let now = Instant::now();
        out.clear();
        pending.clear();
        for (d, buf) in datagrams.iter().zip(bufs.chunks(slot)) {
            let data = buf.get(..d.len).unwrap_or_default();
            for packet in data.chunks(d.stride.max(1)) {
                let peer = d.peer;
                if peer.port() == 0 || packet.len() > MAX_QUERY_LEN {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let start = out.len();
                let decision = rrl
                    .as_ref()
                    .map_or(Decision::Send, |l| l.check(peer.ip(), now));
                match decision {
                    Decision::Send => {
                        answer_cached(&mut cache, &zone, stats, packet, peer, &mut out);
                    }
                    Decision::Slip => {
                        stats.rrl_slipped.fetch_add(1, Ordering::Relaxed);
                        if let Some(r) = truncated_reply(packet) {
                            out.extend_from_slice(&r);
                        }
                    }
                    Decision::Drop => {
                        stats.rrl_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if out.len() > start {
                    pending.push(Pending {
                        to: peer,
                        from: d.dst.filter(|_| wildcard),
                        start,
                        len: out.len() - start,
                    });
                }
            }
        }
        send_grouped(sock, io, &out, &mut pending, &mut gso, stats);
    }
}

/// One `recvmmsg` that blocks (up to the socket's read timeout) for the first datagram only
/// (`MSG_WAITFORONE`), then takes whatever else is queued, up to [`UDP_BATCH`]. `datagrams`
/// gets one entry per buffer slot filled, in order.
fn recv_batch(
    fd: RawFd,
    headers: &mut MultiHeaders<SockaddrStorage>,
    bufs: &mut [u8],
    slot: usize,
    datagrams: &mut Vec<Datagram>,
) -> nix::Result<()> {
    datagrams.clear();
    let mut slots = bufs.chunks_mut(slot);
    let mut iovs: [[IoSliceMut<'_>; 1]; UDP_BATCH] =
        std::array::from_fn(|_| [IoSliceMut::new(slots.next().unwrap_or_default())]);
    let received =
        nix::sys::socket::recvmmsg(fd, headers, iovs.iter_mut(), MsgFlags::MSG_WAITFORONE, None)?;
    for msg in received {
        let peer = msg.address.as_ref().and_then(socket_addr);
        let mut dst = None;
        let mut stride = msg.bytes;
        // A truncated control area (never with our space) only loses the packet info.
        for cmsg in msg.cmsgs().into_iter().flatten() {
            match cmsg {
                ControlMessageOwned::Ipv4PacketInfo(info) => {
                    dst = Some(IpAddr::from(info.ipi_addr.s_addr.to_ne_bytes()));
                }
                ControlMessageOwned::Ipv6PacketInfo(info) => {
                    dst = Some(IpAddr::from(info.ipi6_addr.s6_addr));
                }
                ControlMessageOwned::UdpGroSegments(size) => {
                    stride = usize::try_from(size).unwrap_or(msg.bytes);
                }
                _ => {}
            }
        }
        datagrams.push(Datagram {
            // An address we cannot read is answered nowhere: port 0 is dropped as malformed.
            peer: peer.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
            dst,
            len: msg.bytes,
            stride,
        });
    }
    Ok(())
}

/// The standard library's form of a received peer address.
fn socket_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6((*v6).into()))
}

/// [`AnswerCache::answer`] with any panic contained to this packet (and the cache reset).
fn answer_cached(
    cache: &mut AnswerCache,
    zone: &Arc<Zone>,
    stats: &Stats,
    packet: &[u8],
    peer: SocketAddr,
    out: &mut Vec<u8>,
) {
    let start = out.len();
    match catch_unwind(AssertUnwindSafe(|| {
        cache.answer(zone, packet, peer.ip(), out)
    })) {
        Ok(a) => stats.record(
            a.labels.as_ref(),
            a.malformed,
            a.truncated,
            zone,
            peer,
            Transport::Udp,
        ),
        Err(_) => {
            out.truncate(start);
            *cache = AnswerCache::default();
            stats.panics.fetch_add(1, Ordering::Relaxed);
            error!(%peer, len = packet.len(), "panic while answering a query; dropped");
        }
    }
}

/// Sends a batch's replies, joining equal-sized replies to one client into one segmented send.
fn send_grouped(
    sock: &std::net::UdpSocket,
    io: &UdpSocketState,
    out: &[u8],
    pending: &mut [Pending],
    gso: &mut Vec<u8>,
    stats: &Stats,
) {
    pending.sort_unstable_by_key(|p| (p.to, p.from, p.len));
    let max_segments = io.max_gso_segments().max(1);
    let mut rest = &*pending;
    while let Some(first) = rest.first() {
        let fits = (MAX_GSO_BYTES / first.len.max(1)).clamp(1, max_segments);
        let run = rest
            .iter()
            .take(fits)
            .take_while(|p| (p.to, p.from, p.len) == (first.to, first.from, first.len))
            .count();
        let (group, tail) = rest.split_at(run);
        rest = tail;
        let contents = if let [one] = group {
            out.get(one.start..one.start + one.len).unwrap_or_default()
        } else {
            gso.clear();
            for p in group {
                gso.extend_from_slice(out.get(p.start..p.start + p.len).unwrap_or_default());
            }
            &gso[..]
        };
        let transmit = Transmit {
            destination: first.to,
            ecn: None,
            contents,
            segment_size: (group.len() > 1).then_some(first.len),
            src_ip: first.from,
        };
        // A blocking socket: the call waits (up to the write timeout) for buffer space.
        if let Err(e) = io.try_send(sock.into(), &transmit) {
            stats.io_errors.fetch_add(1, Ordering::Relaxed);
            debug!(to = %first.to, error = %e, "udp send failed");
        }
    }
}

async fn tcp_acceptor(
    listener: TcpListener,
    limit: Arc<Semaphore>,
    state: Arc<ArcSwap<Zone>>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        while conns.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Usually EMFILE: give the process a moment to free descriptors.
                stats.io_errors.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "tcp accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            stats.tcp_rejected.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let (state, stats, shutdown) = (state.clone(), stats.clone(), shutdown.clone());
        conns.spawn(async move {
            let _permit = permit;
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tcp_connection(stream, peer, &state, &stats) => {}
            }
        });
    }
    conns.shutdown().await;
}

/// RFC 7766 framing: two-byte length, then the message; queries answered in order.
async fn tcp_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    state: &ArcSwap<Zone>,
    stats: &Stats,
) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; MAX_QUERY_LEN];
    for _ in 0..MAX_QUERIES_PER_TCP_CONNECTION {
        let mut len = [0u8; 2];
        if !matches!(
            tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut len)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let n = usize::from(u16::from_be_bytes(len));
        let Some(query) = buf.get_mut(..n).filter(|_| n >= 12) else {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if !matches!(
            tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_exact(query)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let out = answer(state, stats, query, peer, Transport::Tcp);
        let Some(reply) = out.reply else { return };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut frame = Vec::with_capacity(2 + reply.len());
        frame.extend_from_slice(&reply_len.to_be_bytes());
        frame.extend_from_slice(&reply);
        if !matches!(
            tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.write_all(&frame)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}

/// Writes sampled queries to the log, off the query path.
async fn write_query_log(
    mut rx: mpsc::Receiver<LoggedQuery>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) {
    let names = stats.metrics.get().cloned();
    loop {
        let q = tokio::select! {
            () = shutdown.cancelled() => return,
            q = rx.recv() => match q { Some(q) => q, None => return },
        };
        let name = names.as_ref().map_or("?", |m| m.name_label(q.labels.name));
        info!(
            target: "geodns::query_log",
            peer = %q.peer,
            transport = ?q.transport,
            name,
            qtype = crate::metrics::qtype_label(q.labels.qtype),
            rcode = crate::metrics::rcode_label(q.labels.rcode),
            region = q.region.as_deref().unwrap_or("-"),
            "query"
        );
    }
}

/// A minimal HTTP/1.1 endpoint: `GET /metrics` in Prometheus text format, one request per
/// connection, bounded request size, time and concurrency.
async fn serve_metrics(listener: TcpListener, stats: Arc<Stats>, shutdown: CancellationToken) {
    let limit = Arc::new(Semaphore::new(MAX_METRICS_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        while conns.try_join_next().is_some() {}
        let Ok((mut stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            continue;
        };
        let stats = stats.clone();
        conns.spawn(async move {
            let _permit = permit;
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            let head_done = |b: &[u8]| b.windows(4).any(|w| w == b"\r\n\r\n");
            while n < buf.len() && !head_done(buf.get(..n).unwrap_or_default()) {
                match tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read(&mut buf[n..])).await {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                    Ok(Ok(k)) => n += k,
                }
            }
            let head = buf.get(..n).unwrap_or_default();
            let (status, body) = if head.starts_with(b"GET /metrics ") {
                let text = stats
                    .metrics
                    .get()
                    .map_or_else(String::new, |m| m.render(&stats));
                ("200 OK", text)
            } else {
                ("404 Not Found", "not found\n".to_owned())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.write_all(resp.as_bytes())).await;
        });
    }
    conns.shutdown().await;
}
