//! Command-line / environment configuration of the edge role.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Flags of `meridian edge`.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// Edge identity reported to the coordinator and stamped on responses (`Meridian-Edge`).
    #[arg(long = "id", env = "MERIDIAN_EDGE_ID", default_value = "edge-1")]
    pub id: String,
    /// Region this edge belongs to (`Meridian-Region`).
    #[arg(long)]
    pub region: String,
    /// Plain HTTP listener, e.g. `0.0.0.0:80`.
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// HTTPS listener, e.g. `0.0.0.0:443` (needs `--tls-cert`/`--tls-key`).
    #[arg(long)]
    pub https_listen: Option<SocketAddr>,
    /// UDP address of the QUIC tunnel listener agents dial.
    #[arg(long)]
    pub tunnel_listen: SocketAddr,
    /// TCP address of the tunnel's TLS fallback for agents whose UDP is blocked; default: the
    /// tunnel listener's address (same port, TCP), skipped with a warning if that is taken.
    #[arg(long, env = "MERIDIAN_TUNNEL_TCP_LISTEN")]
    pub tunnel_tcp_listen: Option<SocketAddr>,
    /// Do not listen for the tunnel's TCP fallback.
    #[arg(long, conflicts_with = "tunnel_tcp_listen")]
    pub no_tunnel_tcp: bool,
    /// Addresses GeoDNS hands out for this edge (repeatable); default: the listen addresses' IPs.
    #[arg(long = "public-ip")]
    pub public_ips: Vec<IpAddr>,
    /// PEM certificate chain for HTTPS and the tunnel listener.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key matching `--tls-cert`.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Coordinator base URL, e.g. `http://127.0.0.1:7000`.
    #[arg(long, env = "MERIDIAN_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Node API token presented to the coordinator.
    #[arg(long, env = "MERIDIAN_NODE_TOKEN", hide_env_values = true)]
    pub node_token: Option<String>,
    /// CA certificate(s) that sign the other edges' HTTPS certificates. With a node token, turns on
    /// cross-region forwarding: a request for a service with no agent here goes to the nearest
    /// edge that has one (one hop, HTTP/2, the node token authenticating this edge).
    #[arg(long, env = "MERIDIAN_PEER_CA")]
    pub peer_ca: Option<PathBuf>,
    /// Directory for the snapshot cache, so a restarted edge serves before the coordinator answers.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Client connections (HTTP + HTTPS) served at once; excess connections are closed on accept.
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,
    /// Time a client has to send a complete request head, and the longest an idle keep-alive
    /// HTTP/1 connection is kept (slowloris defence), e.g. `10s`, `500ms`.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub header_read_timeout: Duration,
    /// An HTTP/1 connection with no byte read or written for this long is closed.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub idle_timeout: Duration,
    /// Time the origin has to send a response head before the client gets a 504.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub upstream_timeout: Duration,
    /// An L4 connection (TCP service or TLS passthrough) that moves no byte either way for this
    /// long is closed (HAProxy's `timeout tunnel`); 0 turns the limit off.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    pub l4_idle_timeout: Duration,
    /// Largest request body accepted (413 beyond it); unlimited when not given.
    #[arg(long)]
    pub max_request_body: Option<u64>,
    /// Requests per second each client IP may make (token bucket; 429 with Retry-After beyond).
    #[arg(long)]
    pub rate_limit_ip: Option<f64>,
    /// Burst for `--rate-limit-ip` (default: one second's worth, at least 1).
    #[arg(long)]
    pub rate_limit_ip_burst: Option<f64>,
    /// Requests per second each route (mounted service) may receive from all clients together.
    #[arg(long)]
    pub rate_limit_route: Option<f64>,
    /// Burst for `--rate-limit-route` (default: one second's worth, at least 1).
    #[arg(long)]
    pub rate_limit_route_burst: Option<f64>,
    /// Admin listener serving Prometheus `/metrics` and `/ready` (503 while draining).
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,
    /// JSON access log, one line per request: a file path, or `-` for stdout. Off by default.
    #[arg(long)]
    pub access_log: Option<PathBuf>,
    /// Raw TCP service, `[IP:]PORT=SERVICE[,proxy-protocol]` (repeatable): TCP clients on that port
    /// are carried to an agent of SERVICE started with `--tcp`. A bare port listens on the tunnel
    /// listener's IP. `proxy-protocol` sends the origin a PROXY v2 header with the client's address.
    #[arg(long = "tcp-service", value_parser = crate::tunnel::parse_tcp_service)]
    pub tcp_services: Vec<crate::tunnel::TcpService>,
    /// How long in-flight requests may finish after shutdown (SIGTERM) starts.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub drain_timeout: Duration,
    /// Anycast VIP this edge announces, e.g. `198.18.0.10/32`: put on `lo` at startup (needs
    /// CAP_NET_ADMIN) and probed before announcing. Anycast is on only with `--bird-socket`.
    #[arg(long)]
    pub anycast_vip: Option<crate::announce::Vip>,
    /// BIRD2 control socket; turns anycast announcing on.
    #[arg(long)]
    pub bird_socket: Option<PathBuf>,
    /// BIRD protocol that originates the VIP (declare it `disabled`; the edge enables it while
    /// healthy). The BGP session itself is never touched.
    #[arg(long, default_value = "vip")]
    pub bird_protocol: String,
    /// Run BIRD as a child with this config (`bird -f -c PATH -s SOCKET`), killed by the kernel
    /// if the edge dies, so a dead edge's route leaves the router. Without it, an external BIRD.
    #[arg(long, requires = "bird_socket")]
    pub bird_config: Option<PathBuf>,
    /// The BIRD binary for `--bird-config`.
    #[arg(long, default_value = "bird")]
    pub bird_binary: PathBuf,
    /// Interval between anycast health checks.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub anycast_check_interval: Duration,
    /// Healthy checks in a row before announcing.
    #[arg(long, default_value_t = 3)]
    pub anycast_rise: u32,
    /// Failed checks in a row before withdrawing.
    #[arg(long, default_value_t = 2)]
    pub anycast_fall: u32,
    /// Which backends must be healthy to announce: any mounted service (default), all, or none.
    #[arg(long, value_enum, default_value = "any")]
    pub anycast_backends: crate::announce::BackendPolicy,
    /// On shutdown, time between withdrawing the route and closing the listeners.
    #[arg(long, value_parser = parse_duration, default_value = "300ms")]
    pub anycast_settle: Duration,
}

/// Parses `250ms`, `10s`, `2m` or a bare number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration like 500ms, 10s, 2m or 1h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        "h" => Ok(Duration::from_secs(n.saturating_mul(3600))),
        _ => Err(format!("{s:?}: unit must be ms, s, m or h")),
    }
}

impl Config {
    /// A config with only the required fields set, everything else default (handy for tests).
    pub fn new(region: impl Into<String>, tunnel_listen: SocketAddr) -> Self {
        Self {
            id: "edge-1".into(),
            region: region.into(),
            http_listen: None,
            https_listen: None,
            tunnel_listen,
            tunnel_tcp_listen: None,
            no_tunnel_tcp: false,
            public_ips: Vec::new(),
            tls_cert: None,
            tls_key: None,
            coordinator: None,
            node_token: None,
            peer_ca: None,
            state_dir: None,
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            upstream_timeout: Duration::from_secs(30),
            l4_idle_timeout: Duration::from_secs(3600),
            idle_timeout: Duration::from_secs(60),
            max_request_body: None,
            admin_listen: None,
            rate_limit_ip: None,
            rate_limit_ip_burst: None,
            rate_limit_route: None,
            rate_limit_route_burst: None,
            access_log: None,
            drain_timeout: Duration::from_secs(10),
            tcp_services: Vec::new(),
            anycast_vip: None,
            bird_socket: None,
            bird_protocol: "vip".into(),
            bird_config: None,
            bird_binary: "bird".into(),
            anycast_check_interval: Duration::from_secs(1),
            anycast_rise: 3,
            anycast_fall: 2,
            anycast_backends: crate::announce::BackendPolicy::Any,
            anycast_settle: Duration::from_millis(300),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    #[test]
    fn parses_flags() {
        let cli = Cli::try_parse_from([
            "edge",
            "--region",
            "eu",
            "--tunnel-listen",
            "0.0.0.0:4443",
            "--http-listen",
            "127.0.0.1:8080",
            "--public-ip",
            "192.0.2.1",
            "--public-ip",
            "2001:db8::1",
        ]);
        let c = match cli {
            Ok(c) => c.config,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(c.region, "eu");
        assert_eq!(c.public_ips.len(), 2);
        assert_eq!(c.max_connections, 10_000);
        assert!(Cli::try_parse_from(["edge", "--tunnel-listen", "0.0.0.0:1"]).is_err());
        assert_eq!(c.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.l4_idle_timeout, Duration::from_secs(3600));
        assert_eq!(c.max_request_body, None);
        assert!(c.bird_socket.is_none(), "anycast is opt-in");
        let c = Cli::try_parse_from([
            "edge",
            "--region",
            "eu",
            "--tunnel-listen",
            "0.0.0.0:4443",
            "--anycast-vip",
            "198.18.0.10/32",
            "--bird-socket",
            "/run/bird.ctl",
            "--bird-config",
            "/etc/bird.conf",
            "--anycast-backends",
            "all",
            "--anycast-check-interval",
            "200ms",
        ])
        .map(|c| c.config);
        let c = match c {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            c.anycast_vip.map(|v| v.to_string()).as_deref(),
            Some("198.18.0.10/32")
        );
        assert_eq!(c.anycast_backends, crate::announce::BackendPolicy::All);
        assert_eq!(c.anycast_check_interval, Duration::from_millis(200));
        assert_eq!(c.bird_protocol, "vip");
        // A child BIRD needs to know its control socket.
        assert!(
            Cli::try_parse_from([
                "edge",
                "--region",
                "eu",
                "--tunnel-listen",
                "0.0.0.0:1",
                "--bird-config",
                "/etc/bird.conf"
            ])
            .is_err()
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("2d").is_err());
        assert!(parse_duration("ms").is_err());
    }
}
