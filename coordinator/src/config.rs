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
