//! Flags of `meridian agent`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Configuration of the tunnel agent.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// UDP `ip:port` of an edge tunnel listener to start from (repeatable). The edge's `Welcome`
    /// names edges in other regions; these are only the first to try.
    #[arg(
        long = "edge",
        env = "MERIDIAN_EDGES",
        value_delimiter = ',',
        required = true
    )]
    pub edges: Vec<SocketAddr>,
    /// Agent token presented in `Hello`.
    #[arg(long, env = "MERIDIAN_AGENT_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Service this agent serves.
    #[arg(long, env = "MERIDIAN_AGENT_SERVICE")]
    pub service: String,
    /// Origin base URL (`http://`, or `h2c://` for HTTP/2 without TLS such as gRPC servers), e.g.
    /// `http://127.0.0.1:3000`. Optional when `--tcp`
    /// is given (a raw-TCP-only service); HTTP requests then get a 502.
    #[arg(
        long = "to",
        env = "MERIDIAN_AGENT_TO",
        required_unless_present = "tcp",
        default_value = ""
    )]
    pub to: String,
    /// Raw TCP origin `host:port` (e.g. `127.0.0.1:6379`): TCP connections the edge accepts for
    /// this service arrive as tunnel streams and are spliced to it, one QUIC stream each.
    #[arg(long, env = "MERIDIAN_AGENT_TCP")]
    pub tcp: Option<String>,
    /// PEM file with the CA certificate(s) that sign the edges' tunnel certificates.
    #[arg(long, env = "MERIDIAN_AGENT_CA")]
    pub ca: PathBuf,
    /// TLS server name to verify the edge certificate against; default: the edge's IP address.
    #[arg(long, env = "MERIDIAN_AGENT_SERVER_NAME")]
    pub server_name: Option<String>,
    /// Agent identity; default: 12 random hex characters.
    #[arg(long, env = "MERIDIAN_AGENT_ID")]
    pub agent_id: Option<String>,
    /// Keep connections to edges in this many distinct regions (fewer if fewer exist).
    #[arg(long, env = "MERIDIAN_AGENT_REGIONS", default_value_t = 2)]
    pub regions: usize,
    /// Seconds between origin health probes (0 disables); transitions are reported to edges.
    #[arg(long, env = "MERIDIAN_AGENT_HEALTH_INTERVAL", default_value_t = 5)]
    pub health_interval: u64,
    /// Probe with `GET <path>` (healthy below 500) instead of a TCP connect to the origin.
    #[arg(long, env = "MERIDIAN_AGENT_HEALTH_PATH")]
    pub health_path: Option<String>,
    /// Serve `/ready` and `/metrics` on this TCP address (e.g. `127.0.0.1:9090`).
    #[arg(long, env = "MERIDIAN_AGENT_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// `auto`: QUIC, falling back to QUIC inside TLS over TCP (same port) when no QUIC handshake
    /// completes within `--quic-timeout` (UDP blocked), and back to QUIC once a re-probe
    /// succeeds. `quic` or `tcp` use only that transport.
    #[arg(long, env = "MERIDIAN_AGENT_TRANSPORT", value_enum, default_value_t = Transport::Auto)]
    pub transport: Transport,
    /// How long a QUIC handshake may take before `auto` tries TCP, e.g. `3s`, `500ms`.
    #[arg(long, env = "MERIDIAN_AGENT_QUIC_TIMEOUT", value_parser = parse_duration, default_value = "3s")]
    pub quic_timeout: Duration,
    /// While on the TCP fallback, try QUIC again this often (`auto` only).
    #[arg(long, env = "MERIDIAN_AGENT_QUIC_REPROBE", value_parser = parse_duration, default_value = "30s")]
    pub quic_reprobe: Duration,
}

/// Which transport the agent dials edges with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Auto,
    Quic,
    Tcp,
}

/// Parses `250ms`, `3s`, `2m` or bare seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration like 500ms, 3s or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("{s:?}: expected a duration like 500ms, 3s or 2m")),
    }
}

impl Config {
    /// A config with the required fields set and defaults elsewhere (for tests and `meridian dev`).
    pub fn new(
        edges: Vec<SocketAddr>,
        token: impl Into<String>,
        service: impl Into<String>,
        to: impl Into<String>,
        ca: impl Into<PathBuf>,
    ) -> Self {
        Self {
            edges,
            token: token.into(),
            service: service.into(),
            to: to.into(),
            tcp: None,
            ca: ca.into(),
            server_name: None,
            agent_id: None,
            regions: 2,
            health_interval: 5,
            health_path: None,
            admin_listen: None,
            transport: Transport::Auto,
            quic_timeout: Duration::from_secs(3),
            quic_reprobe: Duration::from_secs(30),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

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
            "agent",
            "--edge",
            "127.0.0.1:7844",
            "--edge",
            "127.0.0.2:7844,127.0.0.3:7844",
            "--token",
            "t",
            "--service",
            "shop",
            "--to",
            "http://127.0.0.1:3000",
            "--ca",
            "/tmp/ca.pem",
        ])
        .unwrap();
        assert_eq!(cli.config.edges.len(), 3);
        assert_eq!(cli.config.regions, 2);
        assert!(cli.config.agent_id.is_none());
        assert!(cli.config.admin_listen.is_none());
        let cli = Cli::try_parse_from([
            "agent",
            "--edge",
            "127.0.0.1:7844",
            "--token",
            "t",
            "--service",
            "shop",
            "--to",
            "http://127.0.0.1:3000",
            "--ca",
            "/tmp/ca.pem",
            "--admin-listen",
            "127.0.0.1:9090",
        ])
        .unwrap();
        assert_eq!(
            cli.config.admin_listen,
            Some("127.0.0.1:9090".parse().unwrap())
        );
    }

    #[test]
    fn tcp_only_agent_needs_no_to() {
        let base = [
            "agent",
            "--edge",
            "127.0.0.1:7844",
            "--token",
            "t",
            "--service",
            "redis",
            "--ca",
            "/tmp/ca.pem",
        ];
        assert!(
            Cli::try_parse_from(base).is_err(),
            "--to or --tcp is required"
        );
        let cli =
            Cli::try_parse_from(base.iter().copied().chain(["--tcp", "127.0.0.1:6379"])).unwrap();
        assert_eq!(cli.config.tcp.as_deref(), Some("127.0.0.1:6379"));
        assert_eq!(cli.config.to, "");
    }
}
