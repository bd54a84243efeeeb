//! Meridian's edge: TLS termination, HTTP routing by host and path prefix, and the QUIC tunnel
//! server that agents dial into. Requests are forwarded over one QUIC stream each to an agent of
//! the mounted service, chosen by power of two choices over in-flight requests.
//!
//! The edge runs on the coordinator's snapshots (`watch` channel) and keeps serving the last one
//! when the coordinator is away. [`serve`] takes the snapshot channel directly, so tests need no
//! coordinator; [`run`] wires it to the coordinator client.

mod access_log;
mod admin;
mod admission;
pub mod announce;
mod backend;
mod balance;
mod breaker;
mod client_auth;
mod coalesce;
mod config;
mod error;
mod forward;
mod h1client;
mod h1guard;
mod headers;
mod health;
mod heartbeat;
mod l4idle;
mod listen;
mod metrics;
mod outlier;
mod passthrough;
mod peers;
mod proxy_protocol;
mod ratelimit;
mod registry;
mod retry;
mod routing;
mod server;
mod sni;
mod state;
mod tcp_services;
mod tls;
mod tunnel;
mod upstream;
mod wire;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use coordinator_api::{Client, EdgeInfo, Snapshot, Subscriber, SubscriberConfig};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::Config;
pub use error::Error;
pub use routing::{RouteMatch, RouteTable, normalize_host};
pub use tls::transport_config;
pub use tunnel::{TcpService, parse_tcp_service};

use registry::Registry;
use state::Shared;

/// File name of the snapshot cache inside `--state-dir`.
pub const SNAPSHOT_CACHE_FILE: &str = "edge-snapshot.json";

/// An edge whose listeners are bound but not yet serving.
pub struct Edge {
    config: Config,
    http: Option<TcpListener>,
    https: Option<(TcpListener, TlsAcceptor)>,
    admin: Option<TcpListener>,
    endpoint: quinn::Endpoint,
    tunnel_tcp: Option<tunnel::TcpFallback>,
    tcp: Vec<tunnel::TcpServiceListener>,
    info: EdgeInfo,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

async fn bind_tcp(what: &'static str, addr: SocketAddr) -> Result<TcpListener, Error> {
    listen::tcp(addr).map_err(|source| Error::Bind { what, addr, source })
}

/// The address to advertise for a bound socket: a wildcard bind is advertised with a public IP.
fn advertise(bound: SocketAddr, public_ips: &[IpAddr]) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    let ip = public_ips
        .iter()
        .find(|ip| ip.is_ipv4() == bound.is_ipv4())
        .or_else(|| public_ips.first())
        .copied()
        .unwrap_or(bound.ip());
    SocketAddr::new(ip, bound.port()).to_string()
}

impl Edge {
    /// Loads TLS material and binds every listener; nothing is served until [`Edge::serve`].
    pub async fn bind(config: Config) -> Result<Self, Error> {
        if ::http::HeaderValue::from_str(&config.id).is_err() || config.id.is_empty() {
            return Err(Error::Config(format!(
                "edge id {:?} is not a valid header value",
                config.id
            )));
        }
        if ::http::HeaderValue::from_str(&config.region).is_err() || config.region.is_empty() {
            return Err(Error::Config(format!(
                "region {:?} is not a valid header value",
                config.region
            )));
        }
        let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
            return Err(Error::Config(
                "--tls-cert and --tls-key are required (the tunnel listener always uses TLS)"
                    .into(),
            ));
        };
        let identity = tls::Identity::load(cert, key)?;

        if config.http_listen.is_some() || config.https_listen.is_some() {
            listen::warn_unless_migrating();
        }
        let http = match config.http_listen {
            Some(addr) => Some(bind_tcp("HTTP", addr).await?),
            None => None,
        };
        let https = match config.https_listen {
            Some(addr) => {
                let acceptor = TlsAcceptor::from(tls::https_config(&identity)?);
                Some((bind_tcp("HTTPS", addr).await?, acceptor))
            }
            None => None,
        };
        let admin = match config.admin_listen {
            Some(addr) => Some(bind_tcp("admin", addr).await?),
            None => None,
        };
        let (endpoint, mux) = tunnel::bind_endpoint(
            tls::tunnel_config(&identity)?,
            config.tunnel_listen,
            identity.key.secret_der(),
        )
        .map_err(|source| Error::Bind {
            what: "tunnel (QUIC)",
            addr: config.tunnel_listen,
            source,
        })?;

        let tunnel_tcp = match (config.no_tunnel_tcp, endpoint.local_addr()) {
            (false, Ok(quic)) => {
                tunnel::bind_tcp_fallback(config.tunnel_tcp_listen, quic, &identity, mux).await?
            }
            _ => None,
        };
        let tcp =
            tunnel::bind_tcp_services(&config.tcp_services, config.tunnel_listen.ip()).await?;

        let local = |l: &TcpListener, what: &'static str, addr: SocketAddr| {
            l.local_addr()
                .map_err(|source| Error::Bind { what, addr, source })
        };
        let http_addr = match (&http, config.http_listen) {
            (Some(l), Some(a)) => Some(local(l, "HTTP", a)?),
            _ => None,
        };
        let https_addr = match (&https, config.https_listen) {
            (Some((l, _)), Some(a)) => Some(local(l, "HTTPS", a)?),
            _ => None,
        };
        let tunnel_addr = endpoint.local_addr().map_err(|source| Error::Bind {
            what: "tunnel (QUIC)",
            addr: config.tunnel_listen,
            source,
        })?;

        let mut public_ips = config.public_ips.clone();
        if public_ips.is_empty() {
            for a in [http_addr, https_addr, Some(tunnel_addr)]
                .into_iter()
                .flatten()
            {
                if !a.ip().is_unspecified() && !public_ips.contains(&a.ip()) {
                    public_ips.push(a.ip());
                }
            }
            if public_ips.is_empty() {
                warn!(
                    "listening on wildcard addresses and no --public-ip given: GeoDNS will have no address for this edge"
                );
            }
        }
        let info = EdgeInfo {
            id: config.id.clone(),
            region: config.region.clone(),
            http_addr: http_addr.map(|a| advertise(a, &public_ips)),
            https_addr: https_addr.map(|a| advertise(a, &public_ips)),
            tunnel_addr: Some(advertise(tunnel_addr, &public_ips)),
            anycast: None,
            healthy_services: None,
            public_ips,
        };
        Ok(Self {
            config,
            http,
            https,
            admin,
            endpoint,
            tunnel_tcp,
            tcp,
            info,
        })
    }

    /// Bound plain-HTTP address.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Bound HTTPS address.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Bound admin (`/metrics`, `/ready`) address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Bound UDP address of the tunnel listener.
    pub fn tunnel_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// What this edge reports in heartbeats.
    pub fn info(&self) -> &EdgeInfo {
        &self.info
    }

    /// Serves on `snapshots` until `shutdown`, without talking to a coordinator.
    pub async fn serve(
        self,
        snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        self.serve_with(snapshots, None, shutdown).await
    }

    async fn serve_with(
        self,
        snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
        heartbeats: Option<Client>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let Self {
            config,
            http,
            https,
            admin,
            endpoint,
            tunnel_tcp,
            tcp,
            info,
        } = self;
        info!(
            edge = %config.id,
            region = %config.region,
            http = ?http.as_ref().and_then(|l| l.local_addr().ok()),
            https = ?https.as_ref().and_then(|(l, _)| l.local_addr().ok()),
            tunnel = ?endpoint.local_addr().ok(),
            tunnel_tcp = ?tunnel_tcp.as_ref().and_then(|t| t.local_addr()),
            admin = ?admin.as_ref().and_then(|l| l.local_addr().ok()),
            tcp = ?tcp.iter().filter_map(|t| t.listener.local_addr().ok()).collect::<Vec<_>>(),
            "ready"
        );

        let initial = snapshots.borrow().clone();
        // Anycast (opt-in): the announcer decides when the listeners stop, so on shutdown the
        // route leaves the router before this edge stops accepting.
        let anycast = start_anycast(&config, &http, &https).await?;
        let serving = if anycast.is_some() {
            CancellationToken::new()
        } else {
            shutdown.clone()
        };
        let metrics = Arc::new(metrics::Metrics::default());
        let (access_log, log_task) = match &config.access_log {
            Some(dest) => {
                let (log, task) = access_log::start(dest, metrics.clone())
                    .await
                    .map_err(|e| Error::Config(format!("access log {}: {e}", dest.display())))?;
                (Some(log), Some(task))
            }
            None => (None, None),
        };
        let rate = |per_sec: Option<f64>, burst: Option<f64>| {
            per_sec.map(|r| ratelimit::Rate {
                per_sec: r.max(0.0),
                burst: burst.unwrap_or(r).max(1.0),
            })
        };
        let peers = match (&config.peer_ca, &config.node_token) {
            (Some(ca), Some(token)) => Some(peers::PeerClient::new(ca, token)?),
            (Some(_), None) => {
                return Err(Error::Config(
                    "--peer-ca needs a node token to authenticate to peer edges".into(),
                ));
            }
            _ => None,
        };
        let upstreams = upstream::Upstreams::new(config.node_token.as_deref());
        let initial_policies = initial
            .as_deref()
            .map(|s| balance::policies(&s.services, &Default::default(), &upstreams.pool))
            .unwrap_or_default();
        let shared = Arc::new(Shared {
            ip_limit: rate(config.rate_limit_ip, config.rate_limit_ip_burst)
                .map(|r| ratelimit::Limiter::new(r, 100_000)),
            route_limit: rate(config.rate_limit_route, config.rate_limit_route_burst)
                .map(|r| ratelimit::Limiter::new(r, 10_000)),
            metrics,
            access_log,
            open_connections: Default::default(),
            draining: shutdown.clone(),
            limits: state::Limits {
                upstream_timeout: config.upstream_timeout,
                l4_idle: config.l4_idle_timeout,
                max_request_body: config.max_request_body,
            },
            region_header: ::http::HeaderValue::from_str(&config.region)
                .map_err(|_| Error::Config("region is not a valid header value".into()))?,
            edge_header: ::http::HeaderValue::from_str(&config.id)
                .map_err(|_| Error::Config("edge id is not a valid header value".into()))?,
            edge_id: config.id.clone(),
            region: config.region.clone(),
            routes: ArcSwap::from_pointee(
                initial
                    .as_deref()
                    .map(|s| RouteTable::from_mounts(&s.mounts))
                    .unwrap_or_default(),
            ),
            passthrough: ArcSwap::from_pointee(
                initial
                    .as_deref()
                    .map(|s| passthrough::Table::from_mounts(&s.mounts))
                    .unwrap_or_default(),
            ),
            policies: ArcSwap::from_pointee(initial_policies),
            upstreams,
            agents: Registry::default(),
            snapshots: snapshots.clone(),
            retry_budget: Default::default(),
            outliers: Default::default(),
            agent_checks: Default::default(),
            coalescer: Default::default(),
            anycast: anycast.as_ref().map(|a| a.2.clone()),
            peers,
        });
        let anycast_stop = CancellationToken::new();
        let anycast_task = anycast.map(|(bird, settings, status)| {
            tokio::spawn(announce::drive(
                bird,
                settings,
                shared.clone(),
                status,
                shutdown.clone(),
                serving.clone(),
                anycast_stop.clone(),
            ))
        });

        let tracker = TaskTracker::new();
        // The admin listener outlives the drain so `/ready` reports it; stopped last.
        let admin_stop = CancellationToken::new();
        let admin_task =
            admin.map(|l| tokio::spawn(admin::serve(l, shared.clone(), admin_stop.clone())));
        tracker.spawn(update_routes(snapshots, shared.clone(), serving.clone()));
        tracker.spawn(health::supervise_agents(shared.clone(), serving.clone()));
        let conn_limit = Arc::new(Semaphore::new(config.max_connections.max(1)));
        let timeouts = server::Timeouts {
            header_read: config.header_read_timeout,
            idle: config.idle_timeout,
            drain: config.drain_timeout,
        };
        if let Some(l) = http {
            tracker.spawn(server::serve_listener(
                l,
                None,
                shared.clone(),
                conn_limit.clone(),
                timeouts,
                serving.clone(),
            ));
        }
        if let Some((l, acceptor)) = https {
            tracker.spawn(server::serve_listener(
                l,
                Some(acceptor),
                shared.clone(),
                conn_limit.clone(),
                timeouts,
                serving.clone(),
            ));
        }
        for l in tcp {
            tracker.spawn(tunnel::serve_tcp(
                l,
                shared.clone(),
                serving.clone(),
                tracker.clone(),
            ));
        }
        // TCP ports from the coordinator (`Service::tcp_ports`), opened as snapshots name them.
        tracker.spawn(tcp_services::follow(
            shared.snapshots.clone(),
            shared.clone(),
            config.tunnel_listen.ip(),
            config.tcp_services.iter().map(|t| t.port).collect(),
            serving.clone(),
            tracker.clone(),
        ));
        if let Some(fb) = tunnel_tcp {
            tracker.spawn(tunnel::serve_tcp_fallback(
                fb,
                serving.clone(),
                tracker.clone(),
            ));
        }
        tracker.spawn(tunnel::accept_loop(
            endpoint.clone(),
            shared.clone(),
            serving.clone(),
            tracker.clone(),
        ));
        if let Some(client) = heartbeats {
            tracker.spawn(heartbeat::run(
                client,
                info,
                shared.clone(),
                serving.clone(),
            ));
        }

        shutdown.cancelled().await;
        // With anycast, the announcer withdraws and then releases the listeners; bounded in case
        // it is stuck.
        if tokio::time::timeout(
            config.anycast_settle + Duration::from_secs(3),
            serving.cancelled(),
        )
        .await
        .is_err()
        {
            warn!("anycast withdraw did not finish in time; closing listeners anyway");
            serving.cancel();
        }
        info!("shutting down: draining in-flight requests");
        tracker.close();
        // Every task bounds its own drain at 10 s; the margin covers farewells to agents.
        if tokio::time::timeout(
            config.drain_timeout + Duration::from_secs(3),
            tracker.wait(),
        )
        .await
        .is_err()
        {
            warn!("drain did not finish in time; closing");
        }
        admin_stop.cancel();
        if let Some(t) = admin_task {
            let _ = t.await;
        }
        anycast_stop.cancel();
        if let Some(t) = anycast_task {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        drop(shared);
        if let Some(t) = log_task {
            // Every sender is gone once the connection tasks and `shared` are; the writer flushes.
            let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
        }
        endpoint.close(quinn::VarInt::from_u32(0), b"edge shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        info!("stopped");
        Ok(())
    }
}

/// With `--bird-socket`: puts the VIP on `lo`, starts (or connects to) BIRD and returns what the
/// announce driver needs; `None` when anycast is off.
async fn start_anycast(
    config: &Config,
    http: &Option<TcpListener>,
    https: &Option<(TcpListener, TlsAcceptor)>,
) -> Result<Option<(announce::Bird, announce::Settings, Arc<announce::Status>)>, Error> {
    let Some(socket) = config.bird_socket.clone() else {
        return Ok(None);
    };
    let bound = http
        .as_ref()
        .or(https.as_ref().map(|(l, _)| l))
        .and_then(|l| l.local_addr().ok())
        .ok_or_else(|| {
            Error::Config("anycast needs --http-listen or --https-listen to announce".into())
        })?;
    if let Some(vip) = config.anycast_vip {
        announce::ensure_vip(vip).await;
    }
    let bird = announce::Bird::start(announce::BirdOptions {
        socket,
        protocol: config.bird_protocol.clone(),
        spawn: config.bird_config.clone().map(|c| announce::SpawnOptions {
            binary: config.bird_binary.clone(),
            config: c,
        }),
    })
    .map_err(|e| Error::Config(format!("anycast: {e}")))?;
    let settings = announce::Settings {
        probe: announce::probe_addr(bound, config.anycast_vip),
        interval: config.anycast_check_interval.max(Duration::from_millis(10)),
        thresholds: announce::Thresholds {
            rise: config.anycast_rise,
            fall: config.anycast_fall,
        },
        backends: config.anycast_backends,
        settle: config.anycast_settle,
    };
    let status = Arc::new(announce::Status {
        vip: config
            .anycast_vip
            .map(|v| v.to_string())
            .unwrap_or_else(|| "-".into()),
        ..Default::default()
    });
    Ok(Some((bird, settings, status)))
}

/// Rebuilds the route table on every snapshot.
async fn update_routes(
    mut snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = snapshots.changed() => if changed.is_err() { return },
        }
        let snap = snapshots.borrow_and_update().clone();
        if let Some(snap) = snap {
            shared
                .routes
                .store(Arc::new(RouteTable::from_mounts(&snap.mounts)));
            shared
                .passthrough
                .store(Arc::new(passthrough::Table::from_mounts(&snap.mounts)));
            // Unchanged services keep their balancing state and origin handles.
            let old = shared.policies.load();
            let next = balance::policies(&snap.services, &old, &shared.upstreams.pool);
            shared.policies.store(Arc::new(next));
            tracing::debug!(
                revision = snap.revision,
                mounts = snap.mounts.len(),
                "routes updated"
            );
        }
    }
}

/// Binds and serves on a snapshot channel, without a coordinator (tests, embedding).
pub async fn serve(
    config: Config,
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    Edge::bind(config).await?.serve(snapshots, shutdown).await
}

/// The edge role: binds, follows the coordinator's snapshots, heartbeats, serves until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let Some(coordinator) = config.coordinator.clone() else {
        return Err(Error::Config(
            "--coordinator (MERIDIAN_COORDINATOR) is required".into(),
        ));
    };
    let edge = Edge::bind(config.clone()).await?;
    let client = Client::new(coordinator, config.node_token.clone().unwrap_or_default())?;
    let (snapshots, subscriber) = Subscriber::spawn(SubscriberConfig {
        client: client.clone(),
        cache_path: config
            .state_dir
            .as_ref()
            .map(|d| d.join(SNAPSHOT_CACHE_FILE)),
    });
    let res = edge.serve_with(snapshots, Some(client), shutdown).await;
    subscriber.abort();
    res
}
