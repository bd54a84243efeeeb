//! Command-line configuration of the coordinator role.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Which [`crate::store::Store`] backend holds desired state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// Embedded SQLite in `--data-dir` (one coordinator).
    #[default]
    Sqlite,
    /// A shared etcd cluster (`--etcd-endpoints`): several coordinators, one leader.
    Etcd,
}

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
    /// Store backend: `sqlite` (embedded, the default) or `etcd` (shared by several coordinators).
    #[arg(long = "store", value_enum, default_value_t = StoreKind::Sqlite)]
    pub store: StoreKind,
    /// etcd client URLs, comma-separated (with `--store etcd`).
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix in etcd; deployments sharing a cluster use different prefixes.
    #[arg(long, default_value = "/meridian")]
    pub etcd_prefix: String,
    /// Seconds a dead leader's lease outlives it before another coordinator takes over.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub etcd_lease_ttl: u64,
    /// Change history kept for watch resumes: at least the last this many revisions...
    #[arg(long, default_value_t = 10_000)]
    pub history_revisions: u64,
    /// ...and every revision current within this many minutes (0: count only). Subscribers
    /// further behind resume with a snapshot.
    #[arg(long, default_value_t = 60)]
    pub history_minutes: u64,
    /// How often the change log is compacted (by the leader, with a shared store).
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(10..))]
    pub compact_every_ms: u64,
}

impl Config {
    /// The defaults the flags have: SQLite in `data_dir`, no bootstrap tokens.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            listen,
            data_dir,
            admin_token: None,
            node_token: None,
            store: StoreKind::Sqlite,
            etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
            etcd_prefix: "/meridian".into(),
            etcd_lease_ttl: 5,
            history_revisions: 10_000,
            history_minutes: 60,
            compact_every_ms: 30_000,
        }
    }
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
            .field("store", &self.store)
            .field("etcd_endpoints", &self.etcd_endpoints)
            .field("etcd_prefix", &self.etcd_prefix)
            .field("etcd_lease_ttl", &self.etcd_lease_ttl)
            .field("history_revisions", &self.history_revisions)
            .field("history_minutes", &self.history_minutes)
            .field("compact_every_ms", &self.compact_every_ms)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Config, StoreKind};

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
        assert_eq!(c.store, StoreKind::Sqlite, "SQLite is the default");
        let c = Cli::try_parse_from([
            "x",
            "--data-dir",
            "d",
            "--store",
            "etcd",
            "--etcd-endpoints",
            "http://127.0.0.1:1,http://127.0.0.1:2",
            "--etcd-prefix",
            "/m2",
            "--etcd-lease-ttl",
            "2",
        ])
        .unwrap()
        .config;
        assert_eq!(c.store, StoreKind::Etcd);
        assert_eq!(
            c.etcd_endpoints,
            ["http://127.0.0.1:1", "http://127.0.0.1:2"]
        );
        assert_eq!((c.etcd_prefix.as_str(), c.etcd_lease_ttl), ("/m2", 2));
        assert!(Cli::try_parse_from(["x", "--data-dir", "d", "--store", "zk"]).is_err());
    }

    #[test]
    fn history_flags() {
        let c = Cli::try_parse_from(["x", "--data-dir", "d"])
            .unwrap()
            .config;
        let d = Config::new(c.listen, c.data_dir.clone());
        assert_eq!(
            (c.history_revisions, c.history_minutes, c.compact_every_ms),
            (d.history_revisions, d.history_minutes, d.compact_every_ms)
        );
        let c = Cli::try_parse_from([
            "x",
            "--data-dir",
            "d",
            "--history-revisions",
            "5",
            "--history-minutes",
            "0",
            "--compact-every-ms",
            "100",
        ])
        .unwrap()
        .config;
        assert_eq!(
            (c.history_revisions, c.history_minutes, c.compact_every_ms),
            (5, 0, 100)
        );
    }
}
