//! Flags of `meridian agent`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Configuration of the tunnel agent: from flags, `MERIDIAN_*` variables and an optional
/// `--config FILE` (TOML), in that order of precedence, then built-in defaults.
#[derive(Clone, Debug)]
pub struct Config {
    /// Edge tunnel addresses to start from (see `--edge`).
    pub edges: Vec<SocketAddr>,
    pub token: String,
    pub service: String,
    /// Origin base URL; empty for a raw-TCP-only agent.
    pub to: String,
    pub tcp: Option<String>,
    pub ca: PathBuf,
    pub server_name: Option<String>,
    pub agent_id: Option<String>,
    pub regions: usize,
    pub health_interval: u64,
    pub health_path: Option<String>,
    pub admin_listen: Option<SocketAddr>,
    pub transport: Transport,
    pub quic_timeout: Duration,
    pub quic_reprobe: Duration,
    /// Present a coordinator-issued client certificate to edges (`--mtls`).
    pub mtls: bool,
    /// Coordinator API base URL, for `--mtls` certificates.
    pub coordinator: Option<String>,
}

/// Flags of `meridian agent`. Every value is optional here: a missing one comes from
/// `--config`, then the default, so "flags and environment override the file" holds even for a
/// flag given with its default value.
#[derive(Clone, Debug, Default, clap::Args)]
struct Flags {
    /// TOML file with any of the settings below, keys named like the flags (`edges = [...]`,
    /// `token`, `service`, `to`, `ca`, `regions`, `quic-timeout`, ...). Flags and `MERIDIAN_*`
    /// variables override it.
    #[arg(long, env = "MERIDIAN_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// UDP `ip:port` of an edge tunnel listener to start from (repeatable). The edge's `Welcome`
    /// names edges in other regions; these are only the first to try. Required (here or in the file).
    #[arg(long = "edge", env = "MERIDIAN_EDGES", value_delimiter = ',')]
    edges: Vec<SocketAddr>,
    /// Agent token presented in `Hello`. Required.
    #[arg(long, env = "MERIDIAN_AGENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Service this agent serves. Required.
    #[arg(long, env = "MERIDIAN_AGENT_SERVICE")]
    service: Option<String>,
    /// Origin base URL (`http://`, or `h2c://` for HTTP/2 without TLS such as gRPC servers), e.g.
    /// `http://127.0.0.1:3000`. Optional when `--tcp` is given (a raw-TCP-only service); HTTP
    /// requests then get a 502.
    #[arg(long = "to", env = "MERIDIAN_AGENT_TO")]
    to: Option<String>,
    /// Raw TCP origin `host:port` (e.g. `127.0.0.1:6379`): TCP connections the edge accepts for
    /// this service arrive as tunnel streams and are spliced to it, one QUIC stream each.
    #[arg(long, env = "MERIDIAN_AGENT_TCP")]
    tcp: Option<String>,
    /// PEM file with the CA certificate(s) that sign the edges' tunnel certificates. Required.
    #[arg(long, env = "MERIDIAN_AGENT_CA")]
    ca: Option<PathBuf>,
    /// TLS server name to verify the edge certificate against; default: the edge's IP address.
    #[arg(long, env = "MERIDIAN_AGENT_SERVER_NAME")]
    server_name: Option<String>,
    /// Agent identity; default: 12 random hex characters.
    #[arg(long, env = "MERIDIAN_AGENT_ID")]
    agent_id: Option<String>,
    /// Keep connections to edges in this many distinct regions (fewer if fewer exist) [default: 2].
    #[arg(long, env = "MERIDIAN_AGENT_REGIONS")]
    regions: Option<usize>,
    /// Seconds between origin health probes (0 disables); transitions are reported to edges
    /// [default: 5].
    #[arg(long, env = "MERIDIAN_AGENT_HEALTH_INTERVAL")]
    health_interval: Option<u64>,
    /// Probe with `GET <path>` (healthy below 500) instead of a TCP connect to the origin.
    #[arg(long, env = "MERIDIAN_AGENT_HEALTH_PATH")]
    health_path: Option<String>,
    /// Serve `/ready` and `/metrics` on this TCP address (e.g. `127.0.0.1:9090`).
    #[arg(long, env = "MERIDIAN_AGENT_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// `auto`: QUIC, falling back to QUIC inside TLS over TCP (same port) when no QUIC handshake
    /// completes within `--quic-timeout` (UDP blocked), and back to QUIC once a re-probe
    /// succeeds. `quic` or `tcp` use only that transport [default: auto].
    #[arg(long, env = "MERIDIAN_AGENT_TRANSPORT", value_enum)]
    transport: Option<Transport>,
    /// How long a QUIC handshake may take before `auto` tries TCP, e.g. `3s`, `500ms`
    /// [default: 3s].
    #[arg(long, env = "MERIDIAN_AGENT_QUIC_TIMEOUT", value_parser = parse_duration)]
    quic_timeout: Option<Duration>,
    /// While on the TCP fallback, try QUIC again this often (`auto` only) [default: 30s].
    #[arg(long, env = "MERIDIAN_AGENT_QUIC_REPROBE", value_parser = parse_duration)]
    quic_reprobe: Option<Duration>,
    /// Get a short-lived client certificate for the service from the coordinator (with the
    /// agent token; the private key stays here), present it to edges and renew it at
    /// half-life. Needed for services created with `--require-mtls`. Requires `--coordinator`.
    #[arg(long, env = "MERIDIAN_AGENT_MTLS")]
    mtls: bool,
    /// Coordinator API base URL, e.g. `http://127.0.0.1:7700` (used only by `--mtls`).
    #[arg(long, env = "MERIDIAN_AGENT_COORDINATOR")]
    coordinator: Option<String>,
}

/// `--config` file: the same settings as the flags, kebab-case keys, unknown keys refused.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct File {
    #[serde(default)]
    edges: Vec<SocketAddr>,
    token: Option<String>,
    service: Option<String>,
    to: Option<String>,
    tcp: Option<String>,
    ca: Option<PathBuf>,
    server_name: Option<String>,
    agent_id: Option<String>,
    regions: Option<usize>,
    health_interval: Option<u64>,
    health_path: Option<String>,
    admin_listen: Option<SocketAddr>,
    transport: Option<String>,
    quic_timeout: Option<String>,
    quic_reprobe: Option<String>,
    mtls: Option<bool>,
    coordinator: Option<String>,
}

impl Config {
    /// Merges flags (and environment, which clap already folded in) over the file over defaults.
    fn resolve(flags: Flags, file: File) -> Result<Self, String> {
        let required = |v: Option<String>, what: &str| {
            v.filter(|s| !s.is_empty()).ok_or_else(|| {
                format!("--{what} is required (as a flag, a MERIDIAN_* variable, or in --config)")
            })
        };
        let edges = if flags.edges.is_empty() {
            file.edges
        } else {
            flags.edges
        };
        if edges.is_empty() {
            return Err(
                "--edge is required (as a flag, MERIDIAN_EDGES, or `edges` in --config)".into(),
            );
        }
        let to = flags.to.or(file.to).unwrap_or_default();
        let tcp = flags.tcp.or(file.tcp);
        if to.is_empty() && tcp.is_none() {
            return Err("--to or --tcp is required".into());
        }
        let duration =
            |flag: Option<Duration>, file: Option<String>, default: Duration| match (flag, file) {
                (Some(d), _) => Ok(d),
                (None, Some(s)) => parse_duration(&s),
                (None, None) => Ok(default),
            };
        let transport = match (flags.transport, file.transport) {
            (Some(t), _) => t,
            (None, Some(s)) => <Transport as clap::ValueEnum>::from_str(&s, true)
                .map_err(|_| format!("transport {s:?}: expected auto, quic or tcp"))?,
            (None, None) => Transport::Auto,
        };
        let mtls = flags.mtls || file.mtls.unwrap_or(false);
        let coordinator = flags.coordinator.or(file.coordinator);
        if mtls && coordinator.is_none() {
            return Err(
                "--mtls needs --coordinator URL (where to get the client certificate)".into(),
            );
        }
        Ok(Self {
            edges,
            token: required(flags.token.or(file.token), "token")?,
            service: required(flags.service.or(file.service), "service")?,
            to,
            tcp,
            ca: flags
                .ca
                .or(file.ca)
                .ok_or("--ca is required (as a flag, MERIDIAN_AGENT_CA, or in --config)")?,
            server_name: flags.server_name.or(file.server_name),
            agent_id: flags.agent_id.or(file.agent_id),
            regions: flags.regions.or(file.regions).unwrap_or(2),
            health_interval: flags.health_interval.or(file.health_interval).unwrap_or(5),
            health_path: flags.health_path.or(file.health_path),
            admin_listen: flags.admin_listen.or(file.admin_listen),
            transport,
            quic_timeout: duration(
                flags.quic_timeout,
                file.quic_timeout,
                Duration::from_secs(3),
            )?,
            quic_reprobe: duration(
                flags.quic_reprobe,
                file.quic_reprobe,
                Duration::from_secs(30),
            )?,
            mtls,
            coordinator,
        })
    }

    fn from_flags(flags: Flags) -> Result<Self, String> {
        let file = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("reading --config {}: {e}", path.display()))?;
                toml::from_str(&text)
                    .map_err(|e| format!("parsing --config {}: {e}", path.display()))?
            }
            None => File::default(),
        };
        Self::resolve(flags, file)
    }
}

impl clap::Args for Config {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        Flags::augment_args(cmd)
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Flags::augment_args_for_update(cmd)
    }
}

impl clap::FromArgMatches for Config {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let flags = Flags::from_arg_matches(matches)?;
        Self::from_flags(flags)
            .map_err(|msg| clap::Error::raw(clap::error::ErrorKind::ValueValidation, msg + "\n"))
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
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
            mtls: false,
            coordinator: None,
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

    #[test]
    fn config_file_fills_in_and_flags_override_it() {
        let path = std::env::temp_dir().join(format!("agent-config-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            r#"
edges = ["127.0.0.1:7844", "127.0.0.2:7844"]
token = "from-file"
service = "shop"
to = "http://127.0.0.1:3000"
ca = "/etc/meridian/ca.pem"
regions = 3
transport = "tcp"
quic-timeout = "750ms"
"#,
        )
        .unwrap();
        let config = path.to_str().unwrap();
        // Everything from the file.
        let c = Cli::try_parse_from(["agent", "--config", config])
            .unwrap()
            .config;
        assert_eq!(c.edges.len(), 2);
        assert_eq!(c.token, "from-file");
        assert_eq!(c.regions, 3);
        assert_eq!(c.transport, Transport::Tcp);
        assert_eq!(c.quic_timeout, Duration::from_millis(750));
        assert_eq!(c.quic_reprobe, Duration::from_secs(30), "default");
        assert_eq!(c.health_interval, 5, "default");
        // Flags win, even one given with its default value.
        let c = Cli::try_parse_from([
            "agent",
            "--config",
            config,
            "--regions",
            "2",
            "--edge",
            "127.0.0.9:1",
            "--transport",
            "auto",
        ])
        .unwrap()
        .config;
        assert_eq!(c.regions, 2);
        assert_eq!(c.edges, vec!["127.0.0.9:1".parse().unwrap()]);
        assert_eq!(c.transport, Transport::Auto);
        assert_eq!(c.service, "shop");
        // Unknown keys and bad values are errors that name the problem.
        std::fs::write(&path, "edges = [\"127.0.0.1:1\"]\ntokn = \"typo\"\n").unwrap();
        let e = Cli::try_parse_from(["agent", "--config", config])
            .err()
            .unwrap();
        assert!(e.to_string().contains("tokn"), "{e}");
        std::fs::write(&path, "quic-timeout = \"soon\"\n").unwrap();
        assert!(Cli::try_parse_from(["agent", "--config", config]).is_err());
        let _ = std::fs::remove_file(&path);
        // Without a file, the required settings are still required.
        let e = Cli::try_parse_from(["agent", "--token", "t"])
            .err()
            .unwrap();
        assert!(e.to_string().contains("--edge is required"), "{e}");
    }

    #[test]
    fn mtls_needs_a_coordinator_and_comes_from_flag_or_file() {
        let base = [
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
        ];
        let c = Cli::try_parse_from(base).unwrap().config;
        assert!(!c.mtls && c.coordinator.is_none());
        let e = Cli::try_parse_from(base.iter().copied().chain(["--mtls"]))
            .err()
            .unwrap();
        assert!(e.to_string().contains("--coordinator"), "{e}");
        let c = Cli::try_parse_from(base.iter().copied().chain([
            "--mtls",
            "--coordinator",
            "http://127.0.0.1:7700",
        ]))
        .unwrap()
        .config;
        assert!(c.mtls);
        assert_eq!(c.coordinator.as_deref(), Some("http://127.0.0.1:7700"));
        let path = std::env::temp_dir().join(format!("agent-mtls-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "mtls = true\ncoordinator = \"http://10.0.0.1:7700\"\n",
        )
        .unwrap();
        let c = Cli::try_parse_from(
            base.iter()
                .copied()
                .chain(["--config", path.to_str().unwrap()]),
        )
        .unwrap()
        .config;
        let _ = std::fs::remove_file(&path);
        assert!(c.mtls);
        assert_eq!(c.coordinator.as_deref(), Some("http://10.0.0.1:7700"));
    }
}
