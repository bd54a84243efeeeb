//! Command-line / environment configuration of the edge role.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

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
    /// Directory for the snapshot cache, so a restarted edge serves before the coordinator answers.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Client connections (HTTP + HTTPS) served at once; excess connections are closed on accept.
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,
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
            public_ips: Vec::new(),
            tls_cert: None,
            tls_key: None,
            coordinator: None,
            node_token: None,
            state_dir: None,
            max_connections: 10_000,
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
    }
}
