//! `meridian ctl`: a thin client of the coordinator API, human tables by default, `--json` for scripts.

use anyhow::{Context, bail};
use clap::Subcommand;
use coordinator_api::{
    AdminState, ApiScope, Client, CreateApiToken, CreateToken, DnsRecord, DnsRecordType, HashOn,
    LbPolicy, Mount, Region,
};
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Coordinator API base URL.
    #[arg(
        long,
        env = "MERIDIAN_COORDINATOR",
        default_value = "http://127.0.0.1:7700",
        global = true
    )]
    coordinator: String,
    /// Admin token; defaults to the one `meridian dev` wrote to `.meridian-dev/admin.token`.
    #[arg(
        long,
        env = "MERIDIAN_ADMIN_TOKEN",
        global = true,
        hide_env_values = true
    )]
    token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Services: create, list, delete.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// List services.
    Services,
    /// Mounts: add, remove, list.
    #[command(subcommand)]
    Mount(MountCmd),
    /// List mounts.
    Mounts,
    /// Agent tokens: create (shown once), list, revoke.
    #[command(subcommand)]
    Token(TokenCmd),
    /// List agent tokens (ids only, never secrets).
    Tokens,
    /// Regions: create, list.
    #[command(subcommand)]
    Region(RegionCmd),
    /// List regions.
    Regions,
    /// Edges with liveness, agent counts and the services each can serve now.
    Edges,
    /// Agent connections, with the edge and region holding each.
    Agents,
    /// Per-region health as GeoDNS sees it: live edges, agents per service, overrides.
    Health,
    /// The coordinator at a glance.
    Status,
    /// API tokens (admin, read, node): create (shown once), list, revoke.
    #[command(subcommand, name = "api-token")]
    ApiToken(ApiTokenCmd),
    /// Benchmark: open N watch streams, make CHANGES mount changes, and print how long each
    /// took to reach every stream (p50/p99 ms). Used by bench/propagation.sh.
    #[command(hide = true)]
    BenchWatch {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[arg(long, default_value_t = 20)]
        changes: usize,
        /// Service the benchmark mounts point at (must exist).
        #[arg(long, default_value = "demo")]
        service: String,
        /// Streams get a whole snapshot per change instead of a delta.
        #[arg(long)]
        snapshots: bool,
    },
    /// Benchmark: make CHANGES mount adds and time each from the API call until every edge
    /// answers 200 for the new host over plain HTTP (p50/p99 ms). Each edge is polled by its
    /// own task every millisecond, without process starts or TLS handshakes in the sample.
    /// Used by bench/propagation.sh.
    #[command(hide = true)]
    BenchEdges {
        #[arg(long, default_value_t = 100)]
        changes: usize,
        /// The edges' plain-HTTP listeners.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "127.0.0.11:8080,127.0.0.12:8080,127.0.0.13:8080"
        )]
        edges: Vec<std::net::SocketAddr>,
        /// Service the benchmark mounts point at (must exist).
        #[arg(long, default_value = "demo")]
        service: String,
        /// Path requested at each edge (the service must answer it with 200).
        #[arg(long, default_value = "/headers")]
        path: String,
    },
    /// GeoDNS zone records: `dns record add|list|rm`.
    #[command(subcommand)]
    Dns(DnsCmd),
    /// The audit log: who changed what, when.
    Audit {
        /// Only entries after this id.
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Subcommand, Debug)]
enum DnsCmd {
    /// Zone records GeoDNS serves (CNAME, TXT, CAA, MX, A, AAAA).
    #[command(subcommand)]
    Record(DnsRecordCmd),
}

#[derive(Subcommand, Debug)]
enum DnsRecordCmd {
    /// `NAME TYPE VALUE...`: adds the values to the RRset (name, type), creating it, e.g.
    /// `www.example.com CNAME edge.meridian.test --zone example.com` or
    /// `example.com MX "10 mail.example.com"`.
    Add {
        name: String,
        #[arg(value_parser = parse_rtype)]
        rtype: DnsRecordType,
        #[arg(required = true)]
        values: Vec<String>,
        /// Zone of the name; defaults to the zone of an existing record the name falls in.
        #[arg(long)]
        zone: Option<String>,
        /// Seconds (0: GeoDNS's --ttl); defaults to the existing set's TTL.
        #[arg(long)]
        ttl: Option<u32>,
    },
    List,
    /// `NAME TYPE [VALUE]`: removes one value, or the whole RRset without one.
    #[command(alias = "remove")]
    Rm {
        name: String,
        #[arg(value_parser = parse_rtype)]
        rtype: DnsRecordType,
        value: Option<String>,
    },
}

fn parse_rtype(s: &str) -> Result<DnsRecordType, String> {
    s.parse()
}

/// The zone for a new record at `name`: the longest zone of an existing record `name` falls in.
fn zone_for(name: &str, existing: &[DnsRecord]) -> Option<String> {
    existing
        .iter()
        .map(|r| r.zone.as_str())
        .filter(|z| name == *z || name.ends_with(&format!(".{z}")))
        .max_by_key(|z| z.len())
        .map(str::to_owned)
}

#[derive(Subcommand, Debug)]
enum ApiTokenCmd {
    Create {
        #[arg(long, value_parser = parse_scope)]
        scope: ApiScope,
        #[arg(long, default_value = "")]
        description: String,
    },
    List,
    Revoke {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum ServiceCmd {
    Create {
        name: String,
        #[arg(long, value_parser = parse_policy, default_value = "p2c")]
        lb: LbPolicy,
        #[command(flatten)]
        backend: ServiceFlags,
    },
    /// Change a service: only the flags given change (`--origin` replaces the origin list).
    Update {
        name: String,
        #[arg(long, value_parser = parse_policy)]
        lb: Option<LbPolicy>,
        #[command(flatten)]
        backend: ServiceFlags,
    },
    List,
    Delete {
        name: String,
    },
}

/// Backend settings of a service, shared by `service create` and `service update`.
#[derive(clap::Args, Debug, Default)]
struct ServiceFlags {
    /// A direct origin, `URL[,weight=N][,h2][,ca=PATH|system]`, e.g.
    /// `https://10.0.0.5:8443,weight=3,h2,ca=/etc/meridian/origin-ca.pem`. Repeat for several.
    #[arg(long = "origin", value_parser = parse_origin)]
    origins: Vec<coordinator_api::Origin>,
    /// Remove every direct origin (update).
    #[arg(long, conflicts_with = "origins")]
    no_origins: bool,
    /// Cookie stickiness: the cookie naming the backend that served the client.
    #[arg(long, value_name = "COOKIE")]
    sticky: Option<String>,
    #[arg(long, conflicts_with = "sticky")]
    no_sticky: bool,
    /// Active health checks of origins: `PATH[,interval=MS][,timeout=MS][,rise=N][,fall=N]`.
    #[arg(long, value_parser = parse_health_check)]
    health_check: Option<coordinator_api::HealthCheck>,
    #[arg(long, conflicts_with = "health_check")]
    no_health_check: bool,
    /// Circuit breaker per backend: `on` or `[failures=N][,open=MS][,probes=N]`.
    #[arg(long, value_parser = parse_breaker)]
    circuit_breaker: Option<coordinator_api::CircuitBreaker>,
    #[arg(long, conflicts_with = "circuit_breaker")]
    no_circuit_breaker: bool,
    /// In-flight requests per backend above which another backend is preferred.
    #[arg(long)]
    soft_limit: Option<u32>,
    /// In-flight requests per backend it never exceeds (503 when every backend is there).
    #[arg(long)]
    hard_limit: Option<u32>,
    /// Remove both concurrency limits (update).
    #[arg(long, conflicts_with_all = ["soft_limit", "hard_limit"])]
    no_limits: bool,
    /// Edges accept this service's agents only with a coordinator-issued client certificate
    /// naming the service (agents run with `--mtls`).
    #[arg(long)]
    require_mtls: bool,
    /// Stop requiring agent client certificates (update).
    #[arg(long, conflicts_with = "require_mtls")]
    no_require_mtls: bool,
    /// This service's own retry budget at each edge: `RATIO[,min=N]`, retries as a share of
    /// its requests over 10 s (e.g. `0.2` or `20%`) plus N a second always (default 0).
    #[arg(long, value_parser = parse_retry_budget, value_name = "RATIO")]
    retry_budget: Option<coordinator_api::RetryBudget>,
    /// Back to the edge's default budget (update).
    #[arg(long, conflicts_with = "retry_budget")]
    no_retry_budget: bool,
    /// A raw TCP port every edge listens on for this service, `PORT[,proxy-protocol]` (repeat;
    /// replaces the list on update): connections go to agents started with `--tcp`.
    #[arg(long = "tcp-port", value_parser = parse_tcp_port)]
    tcp_ports: Vec<coordinator_api::TcpPort>,
    /// Remove every TCP port (update).
    #[arg(long, conflicts_with = "tcp_ports")]
    no_tcp_ports: bool,
}

/// `PORT[,proxy-protocol]` for `--tcp-port`.
fn parse_tcp_port(s: &str) -> Result<coordinator_api::TcpPort, String> {
    let mut parts = s.split(',');
    let port = parts.next().unwrap_or_default();
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => return Err(format!("{s:?}: expected PORT[,proxy-protocol], e.g. 6379")),
    };
    let mut t = coordinator_api::TcpPort {
        port,
        proxy_protocol: false,
    };
    for opt in parts {
        match opt {
            "proxy-protocol" => t.proxy_protocol = true,
            _ => return Err(format!("unknown TCP port option {opt:?} (proxy-protocol)")),
        }
    }
    Ok(t)
}

impl ServiceFlags {
    /// Applies the flags given to `s`; absent flags leave its fields alone.
    fn apply(self, s: &mut coordinator_api::Service) {
        if !self.origins.is_empty() || self.no_origins {
            s.origins = self.origins;
        }
        if let Some(name) = self.sticky {
            s.sticky = Some(coordinator_api::StickyCookie { name });
        } else if self.no_sticky {
            s.sticky = None;
        }
        if self.health_check.is_some() || self.no_health_check {
            s.health_check = self.health_check;
        }
        if self.circuit_breaker.is_some() || self.no_circuit_breaker {
            s.circuit_breaker = self.circuit_breaker;
        }
        if self.no_limits {
            s.concurrency = None;
        } else if self.soft_limit.is_some() || self.hard_limit.is_some() {
            let c = s.concurrency.get_or_insert_with(Default::default);
            c.soft = self.soft_limit.or(c.soft);
            c.hard = self.hard_limit.or(c.hard);
        }
        if self.require_mtls || self.no_require_mtls {
            s.require_mtls = self.require_mtls;
        }
        if self.retry_budget.is_some() || self.no_retry_budget {
            s.retry_budget = self.retry_budget;
        }
        if !self.tcp_ports.is_empty() || self.no_tcp_ports {
            s.tcp_ports = self.tcp_ports;
        }
    }
}

/// `RATIO[,min=N]`: `0.2` or `20%` of requests, plus N retries a second.
fn parse_retry_budget(s: &str) -> Result<coordinator_api::RetryBudget, String> {
    let mut parts = s.split(',');
    let ratio = parts.next().unwrap_or_default().trim();
    let percent = match ratio.strip_suffix('%') {
        Some(p) => p
            .parse::<f64>()
            .map_err(|_| format!("retry budget: not a percentage: {ratio:?}"))?,
        None => {
            ratio
                .parse::<f64>()
                .map_err(|_| format!("retry budget: not a ratio: {ratio:?}"))?
                * 100.0
        }
    };
    if !(0.0..=1000.0).contains(&percent) {
        return Err(format!(
            "retry budget {ratio:?} out of range (0 to 10, or 0% to 1000%)"
        ));
    }
    let mut b = coordinator_api::RetryBudget {
        percent: percent.round() as u32,
        min_per_sec: 0,
    };
    for opt in parts {
        match opt.split_once('=') {
            Some(("min", v)) => {
                b.min_per_sec = v
                    .parse()
                    .map_err(|_| format!("retry budget min: not a number: {v:?}"))?;
            }
            _ => return Err(format!("unknown retry-budget option {opt:?} (min=N)")),
        }
    }
    Ok(b)
}

/// Origins for the services table, as `--origin` takes them (`-` for none).
fn origins_label(origins: &[coordinator_api::Origin]) -> String {
    if origins.is_empty() {
        return "-".into();
    }
    let one = |o: &coordinator_api::Origin| {
        let mut s = o.url.clone();
        if let Some(w) = o.weight {
            s += ",weight=";
            s += &w.to_string();
        }
        if o.h2 {
            s += ",h2";
        }
        if let Some(ca) = &o.ca {
            s += ",ca=";
            s += ca;
        }
        s
    };
    origins.iter().map(one).collect::<Vec<_>>().join(" ")
}

/// `URL[,weight=N][,h2][,ca=PATH|system]`.
fn parse_origin(s: &str) -> Result<coordinator_api::Origin, String> {
    let mut parts = s.split(',');
    let url = parts.next().unwrap_or_default().trim();
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!(
            "origin {url:?} must start with http:// or https://"
        ));
    }
    let mut o = coordinator_api::Origin {
        url: url.trim_end_matches('/').to_owned(),
        ..Default::default()
    };
    for opt in parts {
        match opt.trim().split_once('=') {
            Some(("weight", n)) => {
                o.weight = Some(n.parse().map_err(|_| format!("bad weight {n:?}"))?);
            }
            Some(("ca", path)) if !path.is_empty() => o.ca = Some(path.to_owned()),
            None if opt.trim() == "h2" => o.h2 = true,
            _ => {
                return Err(format!(
                    "unknown origin option {opt:?} (weight=N, h2, ca=PATH|system)"
                ));
            }
        }
    }
    Ok(o)
}

/// `PATH[,interval=MS][,timeout=MS][,rise=N][,fall=N]`.
fn parse_health_check(s: &str) -> Result<coordinator_api::HealthCheck, String> {
    let mut parts = s.split(',');
    let mut h = coordinator_api::HealthCheck {
        path: parts.next().unwrap_or("/").to_owned(),
        ..Default::default()
    };
    for opt in parts {
        let Some((k, v)) = opt.split_once('=') else {
            return Err(format!("expected key=value, got {opt:?}"));
        };
        let n: u64 = v.parse().map_err(|_| format!("{k}: not a number: {v:?}"))?;
        let small = || u32::try_from(n).map_err(|_| format!("{k} too large"));
        match k {
            "interval" => h.interval_ms = n,
            "timeout" => h.timeout_ms = n,
            "rise" => h.rise = small()?,
            "fall" => h.fall = small()?,
            _ => {
                return Err(format!(
                    "unknown health-check option {k:?} (interval, timeout, rise, fall)"
                ));
            }
        }
    }
    Ok(h)
}

/// `on` or `[failures=N][,open=MS][,probes=N]`.
fn parse_breaker(s: &str) -> Result<coordinator_api::CircuitBreaker, String> {
    let mut b = coordinator_api::CircuitBreaker::default();
    if s == "on" {
        return Ok(b);
    }
    for opt in s.split(',') {
        let Some((k, v)) = opt.split_once('=') else {
            return Err(format!("expected key=value or 'on', got {opt:?}"));
        };
        let n: u64 = v.parse().map_err(|_| format!("{k}: not a number: {v:?}"))?;
        let small = || u32::try_from(n).map_err(|_| format!("{k} too large"));
        match k {
            "failures" => b.failures = small()?,
            "open" => b.open_ms = n,
            "probes" => b.half_open_probes = small()?,
            _ => {
                return Err(format!(
                    "unknown circuit-breaker option {k:?} (failures, open, probes)"
                ));
            }
        }
    }
    Ok(b)
}

#[derive(Subcommand, Debug)]
enum MountCmd {
    /// `HOST/PREFIX SERVICE`, e.g. `edge.meridian.test/shop shop --strip-prefix`.
    Add {
        target: String,
        service: String,
        #[arg(long)]
        strip_prefix: bool,
        #[command(flatten)]
        route: MountFlags,
    },
    /// Point an existing `HOST/PREFIX` at SERVICE (and set its strip flag); other settings stay
    /// unless their flags are given.
    Update {
        target: String,
        service: String,
        #[arg(long)]
        strip_prefix: bool,
        #[command(flatten)]
        route: MountFlags,
    },
    #[command(alias = "rm")]
    Remove {
        target: String,
    },
    List,
}

/// Route settings of a mount, shared by `mount add` and `mount update`.
#[derive(clap::Args, Debug, Default)]
struct MountFlags {
    /// Weighted split target `SERVICE=WEIGHT` (repeat; replaces the list), e.g.
    /// `--split shop=95 --split shop-canary=5`.
    #[arg(long = "split", value_parser = parse_split)]
    splits: Vec<coordinator_api::Split>,
    /// Send everything to the mount's service again (update).
    #[arg(long, conflicts_with = "splits")]
    no_splits: bool,
    /// Set a request header towards the origin, `NAME:VALUE` (repeat).
    #[arg(long = "request-header", value_parser = parse_header_set)]
    request_set: Vec<coordinator_api::HeaderSet>,
    /// Remove a request header before it reaches the origin (repeat).
    #[arg(long = "request-header-remove")]
    request_remove: Vec<String>,
    /// Set a response header towards the client, `NAME:VALUE` (repeat).
    #[arg(long = "response-header", value_parser = parse_header_set)]
    response_set: Vec<coordinator_api::HeaderSet>,
    /// Remove a response header before it reaches the client (repeat).
    #[arg(long = "response-header-remove")]
    response_remove: Vec<String>,
    /// Drop every header edit (update).
    #[arg(long)]
    no_header_edits: bool,
    /// Request body limit for this route, in bytes (413 above it).
    #[arg(long)]
    max_body: Option<u64>,
    #[arg(long, conflicts_with = "max_body")]
    no_max_body: bool,
    /// Coalesce identical concurrent GET/HEAD requests without credentials into one.
    #[arg(long)]
    coalesce: bool,
    #[arg(long, conflicts_with = "coalesce")]
    no_coalesce: bool,
    /// TLS passthrough by SNI to the service's TCP origin (path prefix `/`).
    #[arg(long)]
    passthrough: bool,
    /// Send a PROXY protocol v2 header to the origin (passthrough mounts).
    #[arg(long)]
    proxy_protocol: bool,
}

impl MountFlags {
    /// Applies the flags given to `m`; absent flags leave its fields alone.
    fn apply(self, m: &mut Mount) {
        if !self.splits.is_empty() || self.no_splits {
            m.splits = self.splits;
        }
        if self.no_header_edits {
            m.headers = Default::default();
        }
        let h = &mut m.headers;
        if !self.request_set.is_empty() {
            h.request_set = self.request_set;
        }
        if !self.request_remove.is_empty() {
            h.request_remove = self.request_remove;
        }
        if !self.response_set.is_empty() {
            h.response_set = self.response_set;
        }
        if !self.response_remove.is_empty() {
            h.response_remove = self.response_remove;
        }
        if self.max_body.is_some() || self.no_max_body {
            m.max_body_bytes = self.max_body;
        }
        if self.coalesce || self.no_coalesce {
            m.coalesce = self.coalesce;
        }
        if self.passthrough {
            m.passthrough = true;
        }
        if self.proxy_protocol {
            m.proxy_protocol = true;
        }
    }
}

/// `SERVICE=WEIGHT`.
fn parse_split(s: &str) -> Result<coordinator_api::Split, String> {
    let (service, weight) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected SERVICE=WEIGHT, e.g. shop=95"))?;
    Ok(coordinator_api::Split {
        service: service.to_owned(),
        weight: weight
            .parse()
            .map_err(|_| format!("{s:?}: weight {weight:?} is not a number"))?,
    })
}

/// `NAME:VALUE`.
fn parse_header_set(s: &str) -> Result<coordinator_api::HeaderSet, String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected NAME:VALUE"))?;
    Ok(coordinator_api::HeaderSet {
        name: name.trim().to_ascii_lowercase(),
        value: value.trim().to_owned(),
    })
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    Create { service: String },
    List,
    Revoke { id: String },
}

#[derive(Subcommand, Debug)]
enum RegionCmd {
    Create {
        name: String,
        #[arg(long, allow_hyphen_values = true)]
        lat: Option<f64>,
        #[arg(long, allow_hyphen_values = true)]
        lon: Option<f64>,
    },
    List,
    /// Force a region out of GeoDNS answers.
    Down {
        name: String,
    },
    /// Force a region into GeoDNS answers whatever its observed health.
    Up {
        name: String,
    },
    /// Follow observed health again.
    Auto {
        name: String,
    },
}

fn parse_scope(s: &str) -> Result<ApiScope, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("unknown scope {s:?} (admin, read, node)"))
}

/// `p2c`, `round-robin`, `least-connections`, `hash:header:NAME`, `hash:cookie:NAME`,
/// `hash:client-ip`.
fn parse_policy(s: &str) -> Result<LbPolicy, String> {
    let unknown = || {
        format!(
            "unknown policy {s:?} (p2c, round-robin, least-connections, hash:header:NAME, \
             hash:cookie:NAME, hash:client-ip)"
        )
    };
    if let Some(on) = s.strip_prefix("hash:") {
        let on = match on.split_once(':') {
            Some(("header", name)) if !name.is_empty() => HashOn::Header(name.to_ascii_lowercase()),
            Some(("cookie", name)) if !name.is_empty() => HashOn::Cookie(name.to_owned()),
            None if on == "client-ip" => HashOn::ClientIp,
            _ => return Err(unknown()),
        };
        return Ok(LbPolicy::Hash(on));
    }
    serde_json::from_value(serde_json::Value::String(s.replace('-', "_"))).map_err(|_| unknown())
}

/// Splits `host/prefix` (prefix defaults to `/`).
fn split_target(target: &str) -> (String, String) {
    let target = target
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    match target.find('/') {
        Some(i) => (target[..i].to_owned(), target[i..].to_owned()),
        None => (target.to_owned(), "/".to_owned()),
    }
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let token = match args.token {
        Some(t) => t,
        None => std::fs::read_to_string(".meridian-dev/admin.token")
            .map(|t| t.trim().to_owned())
            .context("no admin token: pass --token or set MERIDIAN_ADMIN_TOKEN")?,
    };
    let c = Client::new(args.coordinator, token)?;
    let out = Out { json: args.json };
    match args.command {
        Cmd::Service(ServiceCmd::Create { name, lb, backend }) => {
            let mut svc = coordinator_api::Service {
                name,
                lb_policy: lb,
                ..Default::default()
            };
            backend.apply(&mut svc);
            out.one(&c.create_service_spec(&svc).await?)
        }
        Cmd::Service(ServiceCmd::Update { name, lb, backend }) => {
            let Some(mut svc) = c
                .list_services()
                .await?
                .into_iter()
                .find(|s| s.name == name)
            else {
                bail!("no service {name:?}");
            };
            if let Some(lb) = lb {
                svc.lb_policy = lb;
            }
            backend.apply(&mut svc);
            out.one(&c.update_service(&svc).await?)
        }
        Cmd::Service(ServiceCmd::List) | Cmd::Services => {
            let rows = c.list_services().await?;
            let mounts = c.list_mounts().await?;
            let agents = c.list_agents().await?;
            out.table(&rows, &["NAME", "LB", "MOUNTS", "AGENTS", "ORIGINS"], |s| {
                let m: Vec<String> = mounts
                    .iter()
                    .filter(|m| m.service == s.name)
                    .map(|m| format!("{}{}", m.host, m.path_prefix))
                    .collect();
                let n = agents
                    .iter()
                    .filter(|a| a.conn.service == s.name)
                    .map(|a| a.conn.agent_id.as_str())
                    .collect::<std::collections::BTreeSet<_>>()
                    .len();
                vec![
                    s.name.clone(),
                    policy_label(&s.lb_policy),
                    if m.is_empty() {
                        "-".into()
                    } else {
                        m.join(",")
                    },
                    n.to_string(),
                    origins_label(&s.origins),
                ]
            })
        }
        Cmd::Service(ServiceCmd::Delete { name }) => {
            c.delete_service(&name).await?;
            out.done(&format!("deleted service {name}"))
        }
        Cmd::Mount(MountCmd::Add {
            target,
            service,
            strip_prefix,
            route,
        }) => {
            let (host, path_prefix) = split_target(&target);
            let mut m = Mount {
                host,
                path_prefix,
                service,
                strip_prefix,
                ..Default::default()
            };
            route.apply(&mut m);
            out.one(&c.add_mount(&m).await?)
        }
        Cmd::Dns(DnsCmd::Record(DnsRecordCmd::Add {
            name,
            rtype,
            values,
            zone,
            ttl,
        })) => {
            let existing = c.list_dns_records().await?;
            let name = coordinator_api::dns_name(&name).map_err(anyhow::Error::msg)?;
            let current = existing.iter().find(|r| r.name == name && r.rtype == rtype);
            let zone = match (zone, current) {
                (Some(z), _) => z,
                (None, Some(r)) => r.zone.clone(),
                (None, None) => zone_for(&name, &existing)
                    .context("no record in a zone containing this name yet: pass --zone ZONE")?,
            };
            let mut all = current.map(|r| r.values.clone()).unwrap_or_default();
            all.extend(values);
            let record = DnsRecord {
                name,
                zone,
                rtype,
                ttl: ttl.or(current.map(|r| r.ttl)).unwrap_or(0),
                values: all,
            };
            out.one(&c.put_dns_record(&record).await?)
        }
        Cmd::Dns(DnsCmd::Record(DnsRecordCmd::List)) => {
            let rows = c.list_dns_records().await?;
            out.table(&rows, &["NAME", "TYPE", "TTL", "ZONE", "VALUES"], |r| {
                vec![
                    r.name.clone(),
                    r.rtype.as_str().to_owned(),
                    r.ttl.to_string(),
                    r.zone.clone(),
                    r.values.join(" | "),
                ]
            })
        }
        Cmd::Dns(DnsCmd::Record(DnsRecordCmd::Rm { name, rtype, value })) => {
            let name = coordinator_api::dns_name(&name).map_err(anyhow::Error::msg)?;
            if let Some(value) = value {
                let existing = c.list_dns_records().await?;
                let Some(current) = existing
                    .into_iter()
                    .find(|r| r.name == name && r.rtype == rtype)
                else {
                    bail!("no {} record at {name}", rtype.as_str());
                };
                // Compare in canonical form, so `"10 mail.example.com."` matches what is stored.
                let want = coordinator_api::DnsRdata::parse(rtype, &value)
                    .map_err(anyhow::Error::msg)?
                    .to_string();
                let rest: Vec<String> = current
                    .values
                    .iter()
                    .filter(|v| **v != want)
                    .cloned()
                    .collect();
                if rest.len() == current.values.len() {
                    bail!("{name} {} has no value {want:?}", rtype.as_str());
                }
                if !rest.is_empty() {
                    return out.one(
                        &c.put_dns_record(&DnsRecord {
                            values: rest,
                            ..current
                        })
                        .await?,
                    );
                }
            }
            c.delete_dns_record(&name, rtype).await?;
            out.done(&format!("removed {name} {}", rtype.as_str()))
        }
        Cmd::Mount(MountCmd::Update {
            target,
            service,
            strip_prefix,
            route,
        }) => {
            let (host, path_prefix) = split_target(&target);
            let prefix = if path_prefix.len() > 1 {
                path_prefix.trim_end_matches('/')
            } else {
                path_prefix.as_str()
            };
            let Some(mut m) = c
                .list_mounts()
                .await?
                .into_iter()
                .find(|m| m.host == host.to_ascii_lowercase() && m.path_prefix == prefix)
            else {
                bail!("no mount {host}{path_prefix}");
            };
            m.service = service;
            m.strip_prefix = strip_prefix;
            route.apply(&mut m);
            out.one(&c.update_mount(&m).await?)
        }
        Cmd::Mount(MountCmd::Remove { target }) => {
            let (host, prefix) = split_target(&target);
            c.delete_mount(&host, &prefix).await?;
            out.done(&format!("removed mount {host}{prefix}"))
        }
        Cmd::Mount(MountCmd::List) | Cmd::Mounts => {
            let rows = c.list_mounts().await?;
            out.table(&rows, &["HOST", "PREFIX", "SERVICE", "STRIP"], |m| {
                vec![
                    m.host.clone(),
                    m.path_prefix.clone(),
                    m.service.clone(),
                    m.strip_prefix.to_string(),
                ]
            })
        }
        Cmd::Token(TokenCmd::Create { service }) => {
            let t = c.create_token(&CreateToken { service }).await?;
            if out.json {
                return out.one(&t);
            }
            println!(
                "token {} for service {} (shown once, store it now):",
                t.id, t.service
            );
            println!("{}", t.token);
            Ok(())
        }
        Cmd::Token(TokenCmd::List) | Cmd::Tokens => {
            let rows = c.list_tokens().await?;
            out.table(&rows, &["ID", "SERVICE", "CREATED_MS"], |t| {
                vec![t.id.clone(), t.service.clone(), t.created_at_ms.to_string()]
            })
        }
        Cmd::Token(TokenCmd::Revoke { id }) => {
            c.revoke_token(&id).await?;
            out.done(&format!("revoked token {id}"))
        }
        Cmd::Region(RegionCmd::Create { name, lat, lon }) => {
            if lat.is_some() != lon.is_some() {
                bail!("give both --lat and --lon, or neither");
            }
            out.one(
                &c.create_region(&Region {
                    name,
                    latitude: lat,
                    longitude: lon,
                    admin_state: Default::default(),
                })
                .await?,
            )
        }
        Cmd::Region(RegionCmd::List) | Cmd::Regions => {
            let rows = c.list_regions().await?;
            out.table(&rows, &["NAME", "LAT", "LON", "ADMIN"], |r| {
                vec![
                    r.name.clone(),
                    opt(r.latitude),
                    opt(r.longitude),
                    serde_plain(&r.admin_state),
                ]
            })
        }
        Cmd::Region(RegionCmd::Down { name }) => {
            out.one(&c.set_region_admin_state(&name, AdminState::Down).await?)
        }
        Cmd::Region(RegionCmd::Up { name }) => {
            out.one(&c.set_region_admin_state(&name, AdminState::Up).await?)
        }
        Cmd::Region(RegionCmd::Auto { name }) => {
            out.one(&c.set_region_admin_state(&name, AdminState::Auto).await?)
        }
        Cmd::Health => {
            let rows = c.status().await?.regions;
            out.table(
                &rows,
                &["REGION", "HEALTHY", "EDGES", "SERVICES", "STALE"],
                |h| {
                    vec![
                        h.region.clone(),
                        h.healthy.to_string(),
                        format!("{}/{}", h.edges_alive, h.edges_total),
                        h.services
                            .iter()
                            .map(|s| format!("{}:{}", s.service, s.agents))
                            .collect::<Vec<_>>()
                            .join(","),
                        h.stale.to_string(),
                    ]
                },
            )
        }
        Cmd::Status => {
            let s = c.status().await?;
            if out.json {
                return out.one(&s);
            }
            println!(
                "revision {}  observed {}  backend {}  up {}s  watchers {}",
                s.revision,
                s.observed_version,
                s.backend,
                s.uptime_ms / 1000,
                s.watchers
            );
            println!(
                "services {}  mounts {}  edges alive {}  agents {}",
                s.services, s.mounts, s.edges_alive, s.agents
            );
            for h in &s.regions {
                println!(
                    "  {:<8} {:<9} edges {}/{}",
                    h.region,
                    if h.healthy { "healthy" } else { "UNHEALTHY" },
                    h.edges_alive,
                    h.edges_total
                );
            }
            Ok(())
        }
        Cmd::ApiToken(ApiTokenCmd::Create { scope, description }) => {
            let t = c
                .create_api_token(&CreateApiToken { scope, description })
                .await?;
            if out.json {
                return out.one(&t);
            }
            println!(
                "API token {} with scope {} (shown once, store it now):",
                t.id,
                serde_plain(&t.scope)
            );
            println!("{}", t.token);
            Ok(())
        }
        Cmd::ApiToken(ApiTokenCmd::List) => {
            let rows = c.list_api_tokens().await?;
            out.table(&rows, &["ID", "SCOPE", "DESCRIPTION", "CREATED_MS"], |t| {
                vec![
                    t.id.clone(),
                    serde_plain(&t.scope),
                    t.description.clone(),
                    t.created_at_ms.to_string(),
                ]
            })
        }
        Cmd::ApiToken(ApiTokenCmd::Revoke { id }) => {
            c.revoke_api_token(&id).await?;
            out.done(&format!("revoked API token {id}"))
        }
        Cmd::BenchWatch {
            subscribers,
            changes,
            service,
            snapshots,
        } => bench_watch(&c, subscribers, changes, &service, !snapshots).await,
        Cmd::BenchEdges {
            changes,
            edges,
            service,
            path,
        } => bench_edges(&c, changes, &edges, &service, &path).await,
        Cmd::Audit { after, limit } => {
            let rows = c.list_audit(after, limit).await?;
            out.table(
                &rows,
                &["ID", "AT_MS", "ACTOR", "ACTION", "TARGET", "REV"],
                |a| {
                    vec![
                        a.id.to_string(),
                        a.at_ms.to_string(),
                        a.actor.clone(),
                        a.action.clone(),
                        a.target.clone(),
                        a.revision.to_string(),
                    ]
                },
            )
        }
        Cmd::Edges => {
            let rows = c.list_edges().await?;
            out.table(
                &rows,
                &[
                    "ID",
                    "REGION",
                    "ALIVE",
                    "PUBLIC_IPS",
                    "TUNNEL",
                    "AGENTS",
                    "ANYCAST",
                    "SERVING",
                ],
                |e| {
                    vec![
                        e.info.id.clone(),
                        e.info.region.clone(),
                        e.alive.to_string(),
                        e.info
                            .public_ips
                            .iter()
                            .map(|i| i.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                        e.info.tunnel_addr.clone().unwrap_or_default(),
                        e.agents.len().to_string(),
                        e.info.anycast.as_ref().map_or_else(
                            || "-".to_owned(),
                            |a| {
                                let state = if a.announced {
                                    "announced"
                                } else {
                                    "withdrawn"
                                };
                                format!("{} {state}", a.vip)
                            },
                        ),
                        // The services this edge can serve by its own checks.
                        e.info
                            .healthy_services
                            .as_ref()
                            .map_or_else(|| "-".to_owned(), |s| s.join(",")),
                    ]
                },
            )
        }
        Cmd::Agents => {
            let rows = c.list_agents().await?;
            out.table(
                &rows,
                &["AGENT", "SERVICE", "EDGE", "REGION", "FROM", "TOKEN"],
                |a| {
                    vec![
                        a.conn.agent_id.clone(),
                        a.conn.service.clone(),
                        a.edge_id.clone(),
                        a.region.clone(),
                        a.conn.remote_addr.clone(),
                        a.conn.token_id.clone(),
                    ]
                },
            )
        }
    }
}

/// Opens `n` watch streams; for each of `changes` mount adds, measures the time until every
/// stream delivered a snapshot at (or past) the write's revision.
async fn bench_edges(
    c: &Client,
    changes: usize,
    edges: &[std::net::SocketAddr],
    service: &str,
    path: &str,
) -> anyhow::Result<()> {
    use std::time::{Duration, Instant};
    if changes == 0 || edges.is_empty() {
        bail!("--changes and --edges must not be empty");
    }
    let mut ms = Vec::with_capacity(changes);
    for k in 0..changes {
        let host = format!("benche-{}-{k}.meridian.test", std::process::id());
        let mount: Mount = serde_json::from_value(serde_json::json!({
            "host": host, "path_prefix": "/", "service": service,
        }))?;
        let t0 = Instant::now();
        c.add_mount(&mount).await?;
        let mut pollers = Vec::with_capacity(edges.len());
        for &edge in edges {
            let (host, path) = (host.clone(), path.to_owned());
            pollers.push(tokio::spawn(async move {
                while t0.elapsed() < Duration::from_secs(10) {
                    if http_status(edge, &host, &path).await == Some(200) {
                        return Some(t0.elapsed());
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                None
            }));
        }
        let mut last = Duration::ZERO;
        for (p, edge) in pollers.into_iter().zip(edges) {
            match p.await? {
                Some(d) => last = last.max(d),
                None => bail!("edge {edge} never served {host} within 10 s"),
            }
        }
        ms.push(last.as_secs_f64() * 1000.0);
        c.delete_mount(&host, "/").await?;
    }
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms[((ms.len() as f64 * p).ceil() as usize).clamp(1, ms.len()) - 1];
    println!(
        "edges={} changes={changes} p50_ms={:.1} p99_ms={:.1} max_ms={:.1}",
        edges.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    Ok(())
}

/// Status code of `GET path` with `Host: host` at `addr` over plain HTTP/1.1 (`None` on any
/// failure or after 2 s).
async fn http_status(addr: std::net::SocketAddr, host: &str, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.set_nodelay(true).ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 32];
        let mut n = 0;
        while n < 12 {
            let k = s.read(&mut buf[n..]).await.ok()?;
            if k == 0 {
                break;
            }
            n += k;
        }
        // "HTTP/1.1 200 ..."
        std::str::from_utf8(buf.get(9..12)?).ok()?.parse().ok()
    };
    tokio::time::timeout(std::time::Duration::from_secs(2), probe)
        .await
        .ok()
        .flatten()
}

async fn bench_watch(
    c: &Client,
    n: usize,
    changes: usize,
    service: &str,
    deltas: bool,
) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    if changes == 0 || n == 0 {
        bail!("--subscribers and --changes must be at least 1");
    }
    let seen: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let mut events = if deltas {
            c.watch_deltas(None).await.map(StreamExt::boxed)
        } else {
            c.watch_from(None).await.map(StreamExt::boxed)
        }
        .context("open watch stream")?;
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(ev)) = events.next().await {
                let rev = match ev {
                    coordinator_api::WatchEvent::Snapshot(s) => s.revision,
                    coordinator_api::WatchEvent::Delta(d) => d.revision,
                    _ => continue,
                };
                seen[i].fetch_max(rev, Ordering::Relaxed);
            }
        }));
    }
    let prefix = format!("benchw-{}", std::process::id());
    let mut ms = Vec::with_capacity(changes);
    for k in 0..changes {
        let host = format!("{prefix}-{k}.meridian.test");
        let t0 = std::time::Instant::now();
        c.add_mount(&Mount {
            host: host.clone(),
            path_prefix: "/".into(),
            service: service.to_owned(),
            strip_prefix: false,
            ..Default::default()
        })
        .await?;
        let rev = c.snapshot().await?.revision;
        let deadline = t0 + std::time::Duration::from_secs(30);
        while seen.iter().any(|s| s.load(Ordering::Relaxed) < rev) {
            if std::time::Instant::now() > deadline {
                bail!("change {k} did not reach every subscriber within 30 s");
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        c.delete_mount(&host, "/").await?;
    }
    for t in tasks {
        t.abort();
    }
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms[((ms.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "subscribers={n} changes={changes} lines={} p50_ms={:.1} p99_ms={:.1} max_ms={:.1}",
        if deltas { "deltas" } else { "snapshots" },
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    Ok(())
}

/// A unit enum as its wire name (`round_robin`, `down`), for tables.
/// A policy as `--lb` takes it.
fn policy_label(p: &LbPolicy) -> String {
    match p {
        LbPolicy::Hash(HashOn::Header(n)) => format!("hash:header:{n}"),
        LbPolicy::Hash(HashOn::Cookie(n)) => format!("hash:cookie:{n}"),
        LbPolicy::Hash(HashOn::ClientIp) => "hash:client-ip".into(),
        other => serde_plain(other).replace('_', "-"),
    }
}

fn serde_plain<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

fn opt(v: Option<f64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

struct Out {
    json: bool,
}

impl Out {
    /// A single created resource reads well as JSON for humans and scripts alike.
    fn one<T: Serialize>(&self, v: &T) -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(v)?);
        Ok(())
    }

    fn done(&self, msg: &str) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::json!({ "ok": true, "message": msg }));
        } else {
            println!("{msg}");
        }
        Ok(())
    }

    fn table<T: Serialize>(
        &self,
        rows: &[T],
        header: &[&str],
        cells: impl Fn(&T) -> Vec<String>,
    ) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(rows)?);
            return Ok(());
        }
        let body: Vec<Vec<String>> = rows.iter().map(cells).collect();
        let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
        for row in &body {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let line = |cells: Vec<String>| {
            let parts: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            println!("{}", parts.join("  ").trim_end());
        };
        line(header.iter().map(|h| (*h).to_owned()).collect());
        for row in body {
            line(row);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_port_flag() {
        let t = parse_tcp_port("6379,proxy-protocol").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((t.port, t.proxy_protocol), (6379, true));
        assert_eq!(parse_tcp_port("5432").map(|t| t.proxy_protocol), Ok(false));
        for bad in ["0", "", "x", "70000", "6379,nope"] {
            assert!(parse_tcp_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn split_targets() {
        assert_eq!(
            split_target("edge.meridian.test/shop"),
            ("edge.meridian.test".into(), "/shop".into())
        );
        assert_eq!(
            split_target("edge.meridian.test"),
            ("edge.meridian.test".into(), "/".into())
        );
        assert_eq!(
            split_target("https://a.b/c/d"),
            ("a.b".into(), "/c/d".into())
        );
    }

    #[test]
    fn scopes_and_plain_names() {
        assert_eq!(parse_scope("read"), Ok(ApiScope::Read));
        assert!(parse_scope("root").is_err());
        assert_eq!(serde_plain(&LbPolicy::RoundRobin), "round_robin");
        assert_eq!(serde_plain(&AdminState::Down), "down");
    }

    #[test]
    fn dns_record_commands_parse() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: Args,
        }
        let t = T::try_parse_from([
            "x",
            "dns",
            "record",
            "add",
            "www.example.com",
            "cname",
            "edge.meridian.test",
            "--zone",
            "example.com",
        ])
        .unwrap();
        assert!(matches!(
            t.a.command,
            Cmd::Dns(DnsCmd::Record(DnsRecordCmd::Add {
                rtype: DnsRecordType::Cname,
                ref zone,
                ref values,
                ..
            })) if zone.as_deref() == Some("example.com") && values.len() == 1
        ));
        assert!(
            T::try_parse_from(["x", "dns", "record", "add", "a.example.com", "SRV", "x"]).is_err()
        );
        assert!(T::try_parse_from(["x", "dns", "record", "add", "a.example.com", "TXT"]).is_err());
        let t =
            T::try_parse_from(["x", "dns", "record", "rm", "example.com", "TXT", "hi"]).unwrap();
        assert!(matches!(
            t.a.command,
            Cmd::Dns(DnsCmd::Record(DnsRecordCmd::Rm { ref value, .. })) if value.as_deref() == Some("hi")
        ));
        let existing = vec![DnsRecord {
            name: "example.com".into(),
            zone: "example.com".into(),
            rtype: DnsRecordType::Txt,
            ttl: 0,
            values: vec!["x".into()],
        }];
        assert_eq!(
            zone_for("www.example.com", &existing).as_deref(),
            Some("example.com")
        );
        assert_eq!(
            zone_for("example.com", &existing).as_deref(),
            Some("example.com")
        );
        assert_eq!(zone_for("badexample.com", &existing), None);
    }

    #[test]
    fn region_override_commands_parse() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: Args,
        }
        let t = T::try_parse_from(["x", "region", "down", "ams", "--json"]).unwrap();
        assert!(t.a.json);
        assert!(matches!(t.a.command, Cmd::Region(RegionCmd::Down { ref name }) if name == "ams"));
        let t = T::try_parse_from(["x", "api-token", "create", "--scope", "read"]).unwrap();
        assert!(matches!(
            t.a.command,
            Cmd::ApiToken(ApiTokenCmd::Create {
                scope: ApiScope::Read,
                ..
            })
        ));
    }

    #[test]
    fn policies() {
        assert_eq!(parse_policy("p2c"), Ok(LbPolicy::P2c));
        assert_eq!(parse_policy("round-robin"), Ok(LbPolicy::RoundRobin));
        assert_eq!(
            parse_policy("least-connections"),
            Ok(LbPolicy::LeastConnections)
        );
        assert_eq!(
            parse_policy("hash:header:X-User"),
            Ok(LbPolicy::Hash(HashOn::Header("x-user".into())))
        );
        assert_eq!(
            parse_policy("hash:cookie:sid"),
            Ok(LbPolicy::Hash(HashOn::Cookie("sid".into())))
        );
        assert_eq!(
            parse_policy("hash:client-ip"),
            Ok(LbPolicy::Hash(HashOn::ClientIp))
        );
        assert!(parse_policy("hash:header:").is_err());
        assert!(parse_policy("hash:body").is_err());
        assert!(parse_policy("random").is_err());
        assert_eq!(
            parse_policy("weighted-round-robin"),
            Ok(LbPolicy::WeightedRoundRobin)
        );
    }

    #[test]
    fn service_backend_flags() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: Args,
        }
        let t = T::try_parse_from([
            "x",
            "service",
            "update",
            "web",
            "--origin",
            "https://10.0.0.5:8443/,weight=3,h2,ca=/ca.pem",
            "--origin",
            "http://10.0.0.6:80",
            "--sticky",
            "mrd",
            "--health-check",
            "/healthz,interval=500,rise=1",
            "--soft-limit",
            "8",
        ])
        .unwrap();
        let Cmd::Service(ServiceCmd::Update { backend, .. }) = t.a.command else {
            panic!("not an update");
        };
        let mut svc = coordinator_api::Service {
            name: "web".into(),
            concurrency: Some(coordinator_api::ConcurrencyLimits {
                soft: None,
                hard: Some(20),
            }),
            ..Default::default()
        };
        backend.apply(&mut svc);
        assert_eq!(svc.origins.len(), 2);
        assert_eq!(svc.origins[0].url, "https://10.0.0.5:8443");
        assert_eq!(svc.origins[0].weight, Some(3));
        assert!(svc.origins[0].h2 && !svc.origins[1].h2);
        assert_eq!(svc.origins[0].ca.as_deref(), Some("/ca.pem"));
        assert_eq!(svc.sticky.unwrap().name, "mrd");
        let h = svc.health_check.unwrap();
        assert_eq!(
            (h.path.as_str(), h.interval_ms, h.rise, h.fall),
            ("/healthz", 500, 1, 3)
        );
        assert_eq!(
            svc.concurrency,
            Some(coordinator_api::ConcurrencyLimits {
                soft: Some(8),
                hard: Some(20)
            })
        );
        assert_eq!(
            origins_label(&svc.origins),
            "https://10.0.0.5:8443,weight=3,h2,ca=/ca.pem http://10.0.0.6:80"
        );
        assert_eq!(
            parse_origin("https://10.0.0.5:8443,weight=3,h2,ca=/ca.pem"),
            Ok(svc.origins[0].clone()),
            "the label parses back"
        );
        assert!(parse_origin("10.0.0.1:80").is_err());
        assert!(parse_origin("http://a,weight=x").is_err());
        assert!(parse_origin("http://a,bogus").is_err());
        assert_eq!(
            parse_retry_budget("0.25"),
            Ok(coordinator_api::RetryBudget {
                percent: 25,
                min_per_sec: 0
            })
        );
        assert_eq!(
            parse_retry_budget("10%,min=2"),
            Ok(coordinator_api::RetryBudget {
                percent: 10,
                min_per_sec: 2
            })
        );
        assert!(parse_retry_budget("x").is_err());
        assert!(parse_retry_budget("0.2,max=3").is_err());
        assert!(parse_retry_budget("-1").is_err());
        assert_eq!(parse_breaker("on"), Ok(Default::default()));
        assert_eq!(parse_breaker("failures=2,open=100").unwrap().open_ms, 100);
    }
}
