//! Command-line configuration of the coordinator role.

use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Clone, clap::Args)]
pub struct Config {
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// Directory for the SQLite database (`coordinator.db`) and a generated `admin.token`; created if missing.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Bootstrap API token with scope `admin` (stored hashed; created if missing).
    #[arg(long, env = "MERIDIAN_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Bootstrap API token with scope `node`, for edges and GeoDNS (stored hashed).
    #[arg(long, env = "MERIDIAN_NODE_TOKEN", hide_env_values = true)]
    pub node_token: Option<String>,
}

/// Tokens are secrets: never print them.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "node_token",
                &self.node_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Config;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    #[test]
    fn flags_and_defaults() {
        let c = Cli::try_parse_from(["x", "--data-dir", "/tmp/d"])
            .unwrap()
            .config;
        assert_eq!(c.listen.to_string(), "127.0.0.1:7700");
        assert_eq!(c.data_dir.to_str(), Some("/tmp/d"));
        let c = Cli::try_parse_from([
            "x",
            "--listen",
            "0.0.0.0:9",
            "--data-dir",
            "d",
            "--admin-token",
            "a",
            "--node-token",
            "n",
        ])
        .unwrap()
        .config;
        assert_eq!(c.listen.port(), 9);
        assert_eq!(
            (c.admin_token.as_deref(), c.node_token.as_deref()),
            (Some("a"), Some("n"))
        );
        assert!(
            !format!("{c:?}").contains("\"a\""),
            "tokens must not be printed"
        );
        assert!(
            Cli::try_parse_from(["x"]).is_err(),
            "--data-dir is required"
        );
    }
}
