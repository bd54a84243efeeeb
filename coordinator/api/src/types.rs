//! Desired state (what users asked for) and observed state (what the network reports).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Desired-state revision: increases by one with every committed change.
pub type Revision = u64;

/// A region: a group of edges near each other. Coordinates drive "nearest region" ordering.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Region {
    pub name: String,
    #[serde(default)]
    pub latitude: Option<f64>,
    #[serde(default)]
    pub longitude: Option<f64>,
    /// Operator override of the health the network observes (`meridian ctl region down NAME`).
    #[serde(default)]
    pub admin_state: AdminState,
}

/// An operator's say over a region's health: `Auto` follows observation, the others force it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminState {
    #[default]
    Auto,
    Up,
    Down,
}

/// How an edge picks among a service's backends.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// Power of two choices, each costing (in-flight requests + 1) × EWMA latency.
    #[default]
    P2c,
    RoundRobin,
    /// The backend with the fewest in-flight requests.
    LeastConnections,
    /// Smooth weighted round robin (nginx's): origins by their `weight`, agents weight 1.
    WeightedRoundRobin,
    /// Consistent hashing (a ring of virtual nodes) on a request attribute: one key keeps reaching
    /// one backend while it is there, and losing a backend moves only its keys. Requests without
    /// the key fall back to P2C.
    Hash(HashOn),
}

/// What [`LbPolicy::Hash`] hashes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashOn {
    /// A request header (name, case-insensitive).
    Header(String),
    /// A cookie (name).
    Cookie(String),
    /// The client's IP address as the edge sees it.
    ClientIp,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    #[serde(default)]
    pub lb_policy: LbPolicy,
    /// Backends reached directly by URL, balanced together with the service's agents.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub origins: Vec<Origin>,
    /// Cookie stickiness: a signed cookie names the backend that served the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<StickyCookie>,
    /// Active health checks of the service's direct origins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Per-backend circuit breaker with half-open probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// This service's retry budget at each edge (the edge's default, 20 % + 3/s, when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,
    /// In-flight request limits per backend of this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<ConcurrencyLimits>,
    /// Edges refuse this service's agents unless their tunnel handshake presents a client
    /// certificate from the coordinator's tunnel CA naming the service ([`service_cert_uri`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_mtls: bool,
    /// Raw TCP ports every edge listens on for this service (on its tunnel listener's IP); each
    /// connection goes over the tunnel to an agent started with `--tcp`. The coordinator-driven
    /// form of the edge's `--tcp-service` flag (which wins for a port both name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp_ports: Vec<TcpPort>,
}

/// One raw TCP port of a service ([`Service::tcp_ports`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpPort {
    pub port: u16,
    /// Send a PROXY protocol v2 header (the client's address) to the origin first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proxy_protocol: bool,
}

/// Retries an edge may add for one service within a sliding 10 s window: `percent` of the
/// service's requests in it, plus `min_per_sec` per second always. Each service has its own
/// budget, so one failing service cannot spend the retries of another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryBudget {
    pub percent: u32,
    #[serde(default)]
    pub min_per_sec: u32,
}

/// A backend reached directly (no agent): `http://host:port` or `https://host:port`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// Scheme, host and optional port; no path. The TLS server name (SNI) is the URL's host.
    pub url: String,
    /// Share under weighted round robin (1 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Speak HTTP/2 to the origin (ALPN h2 over TLS, prior-knowledge h2c over plain TCP).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub h2: bool,
    /// How an https origin is verified: a PEM CA bundle path on the edge, or `system`
    /// (the OS bundle). Absent means `system`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

/// Cookie stickiness: the edge sets `name` to a signed backend id and honours it while that
/// backend is usable, falling back to the policy when it is gone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StickyCookie {
    pub name: String,
}

/// An active health check: `GET path` every `interval_ms`; `fall` consecutive failures take
/// an origin out of rotation, `rise` consecutive passes put it back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    #[serde(default = "HealthCheck::default_path")]
    pub path: String,
    #[serde(default = "HealthCheck::default_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "HealthCheck::default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "HealthCheck::default_rise")]
    pub rise: u32,
    #[serde(default = "HealthCheck::default_fall")]
    pub fall: u32,
}

impl HealthCheck {
    fn default_path() -> String {
        "/".to_owned()
    }
    fn default_interval_ms() -> u64 {
        2_000
    }
    fn default_timeout_ms() -> u64 {
        1_000
    }
    fn default_rise() -> u32 {
        2
    }
    fn default_fall() -> u32 {
        3
    }
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            path: Self::default_path(),
            interval_ms: Self::default_interval_ms(),
            timeout_ms: Self::default_timeout_ms(),
            rise: Self::default_rise(),
            fall: Self::default_fall(),
        }
    }
}

/// A circuit breaker per backend: `failures` consecutive failures open it for `open_ms`,
/// then up to `half_open_probes` requests probe it; a success closes it, a failure reopens it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CircuitBreaker {
    #[serde(default = "CircuitBreaker::default_failures")]
    pub failures: u32,
    #[serde(default = "CircuitBreaker::default_open_ms")]
    pub open_ms: u64,
    #[serde(default = "CircuitBreaker::default_half_open_probes")]
    pub half_open_probes: u32,
}

impl CircuitBreaker {
    fn default_failures() -> u32 {
        5
    }
    fn default_open_ms() -> u64 {
        5_000
    }
    fn default_half_open_probes() -> u32 {
        1
    }
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            failures: Self::default_failures(),
            open_ms: Self::default_open_ms(),
            half_open_probes: Self::default_half_open_probes(),
        }
    }
}

/// In-flight limits per backend of a service. At `soft` the edge prefers another backend
/// below it; at `hard` the backend takes no more, and when every backend is there the edge
/// answers 503.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConcurrencyLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard: Option<u32>,
}

/// Host + path prefix → service. Identity is (host, path_prefix).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Lower-case host name without port, e.g. `edge.meridian.test`.
    pub host: String,
    /// Starts with `/`; `/` mounts the whole host. Matched on whole path segments.
    pub path_prefix: String,
    pub service: String,
    /// Remove the prefix before the request reaches the origin.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Weighted traffic split between services (canary 95/5, blue-green 100/0 → 0/100), chosen
    /// per request; empty sends everything to `service`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub splits: Vec<Split>,
    /// Header edits on requests to the origin and responses to the client.
    #[serde(default, skip_serializing_if = "HeaderEdits::is_empty")]
    pub headers: HeaderEdits,
    /// Request body limit for this route in bytes (413 above it); `None`: the edge's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
    /// Identical concurrent GET/HEAD requests without credentials share one origin request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub coalesce: bool,
    /// L4 TLS passthrough: TLS connections whose SNI is `host` go, undecrypted, to the
    /// service's TCP origin (the origin terminates TLS). Needs `path_prefix` `/`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub passthrough: bool,
    /// Send a PROXY protocol v2 header (the client's address) to the origin first on
    /// passthrough connections.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proxy_protocol: bool,
}

/// One weighted target of a mount's traffic split.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub service: String,
    /// Relative weight; 0 takes no traffic (the "off" side of a blue-green switch).
    pub weight: u32,
}

/// A header to set (replacing any of the same name).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderSet {
    pub name: String,
    pub value: String,
}

/// Per-route header edits; removals apply before additions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderEdits {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_set: Vec<HeaderSet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_remove: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub response_set: Vec<HeaderSet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub response_remove: Vec<String>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.request_set.is_empty()
            && self.request_remove.is_empty()
            && self.response_set.is_empty()
            && self.response_remove.is_empty()
    }
}

/// An agent token as edges see it: never the secret, only its SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentTokenRecord {
    pub id: String,
    /// The one service this token may serve.
    pub service: String,
    /// Lower-case hex SHA-256 of the whole token string.
    pub sha256: String,
    /// Unix milliseconds.
    pub created_at_ms: u64,
}

/// What an edge says about itself in each heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeInfo {
    pub id: String,
    pub region: String,
    /// Addresses GeoDNS hands out for this edge.
    pub public_ips: Vec<IpAddr>,
    pub http_addr: Option<String>,
    pub https_addr: Option<String>,
    /// `ip:port` of the QUIC tunnel listener agents dial.
    pub tunnel_addr: Option<String>,
    /// Anycast announcement, for edges that announce a VIP over BGP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anycast: Option<AnycastState>,
    /// Services this edge can serve now by its own checks (an agent whose origin passes, or a
    /// direct origin passing its health check with its breaker closed), sorted. GSLB reads it
    /// because direct origins appear nowhere else in the heartbeat. `None` from older edges:
    /// then only the agents count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_services: Option<Vec<String>>,
}

/// Whether an edge's anycast VIP is in the routing table, as its routing daemon confirmed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnycastState {
    /// The VIP with its prefix length, e.g. `198.18.0.10/32`.
    pub vip: String,
    pub announced: bool,
}

/// One agent connection held by an edge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentConn {
    pub agent_id: String,
    pub service: String,
    pub token_id: String,
    pub remote_addr: String,
    /// Unix milliseconds.
    pub connected_at_ms: u64,
    /// What the agent's own origin health check last said; a connected agent whose origin fails
    /// serves nothing, so GSLB counts only healthy ones. Older edges do not send it: healthy.
    #[serde(default = "healthy")]
    pub origin_healthy: bool,
}

fn healthy() -> bool {
    true
}

/// Sent by every edge every [`HEARTBEAT_INTERVAL_MS`] and whenever its agent set changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeHeartbeat {
    pub info: EdgeInfo,
    pub agents: Vec<AgentConn>,
}

pub const HEARTBEAT_INTERVAL_MS: u64 = 1_000;
/// An edge not heard from for this long is not alive.
pub const EDGE_DEAD_AFTER_MS: u64 = 3_500;

/// An edge as the coordinator observes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeStatus {
    pub info: EdgeInfo,
    pub alive: bool,
    /// Unix milliseconds of the last heartbeat.
    pub last_seen_ms: u64,
    pub agents: Vec<AgentConn>,
}

/// Everything a subscriber needs, at one desired revision and one observed version.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub revision: Revision,
    /// Bumped whenever observed state (edge liveness, agent connections) changes.
    pub observed_version: u64,
    pub regions: Vec<Region>,
    pub services: Vec<Service>,
    pub mounts: Vec<Mount>,
    pub agent_tokens: Vec<AgentTokenRecord>,
    pub edges: Vec<EdgeStatus>,
    /// Per-region health as the coordinator sees it (GSLB view); empty from older coordinators.
    #[serde(default)]
    pub region_health: Vec<RegionHealth>,
    /// Zone records GeoDNS serves (CNAME, TXT, CAA, MX, A, AAAA), sorted by (name, type).
    #[serde(default)]
    pub records: Vec<DnsRecord>,
    /// PEM certificate of the coordinator's tunnel client CA (never its key): edges verify
    /// agents' client certificates against it, also while the coordinator is away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_client_ca: Option<String>,
}

impl Snapshot {
    /// Checks internal consistency; subscribers refuse snapshots that fail it and keep the last good one.
    pub fn validate(&self) -> Result<(), String> {
        let services: std::collections::HashSet<&str> =
            self.services.iter().map(|s| s.name.as_str()).collect();
        for m in &self.mounts {
            if !m.path_prefix.starts_with('/') {
                return Err(format!(
                    "mount {}{}: path prefix must start with '/'",
                    m.host, m.path_prefix
                ));
            }
            if !services.contains(m.service.as_str()) {
                return Err(format!(
                    "mount {}{}: unknown service {:?}",
                    m.host, m.path_prefix, m.service
                ));
            }
        }
        for t in &self.agent_tokens {
            if !services.contains(t.service.as_str()) {
                return Err(format!("token {}: unknown service {:?}", t.id, t.service));
            }
        }
        Ok(())
    }
}

/// One line of the NDJSON watch stream (`GET /v1/watch`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WatchEvent {
    /// The whole state; sent first and on every change.
    Snapshot(Snapshot),
    /// Nothing changed; sent every few seconds so subscribers know the stream is alive.
    Progress {
        revision: Revision,
        observed_version: u64,
    },
    /// The changes since the subscriber's snapshot (only to subscribers that ask with `deltas=true`).
    Delta(crate::delta::Delta),
}

// ---- request / response bodies of the admin API ----

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateService {
    pub name: String,
    #[serde(default)]
    pub lb_policy: LbPolicy,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateToken {
    pub service: String,
}

/// Returned once by `POST /v1/tokens`; the secret is never shown again.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreatedToken {
    pub id: String,
    pub service: String,
    pub token: String,
}

/// `POST /v1/agent/certificate` body (authenticated with an agent token): a PEM PKCS#10
/// request. The agent's private key never leaves the agent; only the public key is certified.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentCertificateRequest {
    pub csr: String,
}

/// A short-lived tunnel client certificate for the token's service.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentCertificate {
    /// PEM leaf certificate; its only SAN is [`service_cert_uri`] of `service`.
    pub certificate: String,
    /// PEM certificate of the issuing tunnel client CA.
    pub ca: String,
    pub service: String,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
}

/// The URI SAN that names `service` in a tunnel client certificate.
pub fn service_cert_uri(service: &str) -> String {
    format!("{SERVICE_CERT_URI_PREFIX}{service}")
}

/// Prefix of [`service_cert_uri`].
pub const SERVICE_CERT_URI_PREFIX: &str = "meridian://service/";

/// A token as listed by the API: no secret, no hash.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub service: String,
    pub created_at_ms: u64,
}

/// An agent connection with the edge that holds it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentView {
    pub edge_id: String,
    pub region: String,
    #[serde(flatten)]
    pub conn: AgentConn,
}

/// Every API error: a message, and the request field at fault when there is one.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

// ---- added in phase 2: every field below has a serde default, so older peers still parse ----

/// Body of `PUT /v1/regions/{name}/admin_state`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAdminState {
    pub state: AdminState,
}

/// What an API token may do. `admin` everything; `read` every GET of the admin API;
/// `node` (edges, GeoDNS) only watch, snapshot and heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiScope {
    Admin,
    Read,
    Node,
}

/// Body of `POST /v1/api-tokens`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateApiToken {
    pub scope: ApiScope,
    /// Free text for humans ("ci", "alice's laptop").
    #[serde(default)]
    pub description: String,
}

/// Returned once by `POST /v1/api-tokens`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreatedApiToken {
    pub id: String,
    pub scope: ApiScope,
    pub token: String,
}

/// An API token as listed: no secret, no hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiTokenInfo {
    pub id: String,
    pub scope: ApiScope,
    #[serde(default)]
    pub description: String,
    pub created_at_ms: u64,
}

/// One entry of the audit log (`GET /v1/audit`): who changed what, when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Increasing id; pass the last one seen as `?after=` to page.
    pub id: u64,
    /// Unix milliseconds.
    pub at_ms: u64,
    /// `token:<id>` of the API token that made the change, or `system`.
    pub actor: String,
    /// e.g. `mount.put`, `region.admin_state`, `api_token.delete`.
    pub action: String,
    /// The object changed (`host/prefix`, a name, a token id).
    pub target: String,
    /// The desired-state revision the change produced (0 for credentials).
    #[serde(default)]
    pub revision: Revision,
    /// The new value, when there is one (never a secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// Agents serving one service in one region.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAgents {
    pub service: String,
    /// Distinct agent ids connected to live edges of the region.
    pub agents: u32,
}

/// The GSLB view of one region, computed by the coordinator from heartbeats.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionHealth {
    pub region: String,
    pub edges_alive: u32,
    pub edges_total: u32,
    #[serde(default)]
    pub services: Vec<ServiceAgents>,
    /// Observed health with the operator's `admin_state` applied.
    pub healthy: bool,
    /// The coordinator's observation is too old to trust (it just restarted, or hears from no
    /// edge at all): liveness is frozen at its last value instead of turning everything down.
    #[serde(default)]
    pub stale: bool,
}

/// `GET /v1/status`: the coordinator at a glance.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub revision: Revision,
    pub observed_version: u64,
    pub uptime_ms: u64,
    pub backend: String,
    pub watchers: u64,
    pub regions: Vec<RegionHealth>,
    #[serde(default)]
    pub services: u64,
    #[serde(default)]
    pub mounts: u64,
    #[serde(default)]
    pub edges_alive: u64,
    #[serde(default)]
    pub agents: u64,
    /// Last ack/nack per subscriber.
    #[serde(default)]
    pub subscribers: Vec<SubscriberState>,
}

/// Body of `POST /v1/watch/ack`: a subscriber says whether it applied a snapshot (ack) or
/// refused it (nack, with the validation error), so operators can see who runs what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchAck {
    /// Stable for one subscriber process (random per start).
    pub subscriber: String,
    pub revision: Revision,
    pub observed_version: u64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The last ack or nack of one subscriber, as `GET /v1/status` lists them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriberState {
    pub subscriber: String,
    /// Id of the API token it authenticated with.
    pub token_id: String,
    pub revision: Revision,
    pub observed_version: u64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Unix milliseconds of the ack.
    pub at_ms: u64,
}

// ---- added in phase 4: zone records GeoDNS serves (issue 5) ----

/// Record types the coordinator stores for GeoDNS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DnsRecordType {
    A,
    Aaaa,
    Cname,
    Txt,
    Caa,
    Mx,
}

impl DnsRecordType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::A => "A",
            Self::Aaaa => "AAAA",
            Self::Cname => "CNAME",
            Self::Txt => "TXT",
            Self::Caa => "CAA",
            Self::Mx => "MX",
        }
    }
}

impl std::str::FromStr for DnsRecordType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "A" => Self::A,
            "AAAA" => Self::Aaaa,
            "CNAME" => Self::Cname,
            "TXT" => Self::Txt,
            "CAA" => Self::Caa,
            "MX" => Self::Mx,
            _ => {
                return Err(format!(
                    "unsupported record type {s:?} (A, AAAA, CNAME, TXT, CAA, MX)"
                ));
            }
        })
    }
}

/// One RRset GeoDNS serves: every value of one type at one name. Identity: (name, type);
/// writing it again replaces the set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsRecord {
    /// Owner name, lower-case, without the trailing dot (`www.example.com`, or the zone apex).
    pub name: String,
    /// The zone GeoDNS answers for this name from (lower-case, no trailing dot); `name` is it
    /// or lies under it. A zone other than GeoDNS's own `--zone` gets a synthesized SOA/NS.
    pub zone: String,
    #[serde(rename = "type")]
    pub rtype: DnsRecordType,
    /// Seconds; 0 means GeoDNS's `--ttl`.
    #[serde(default)]
    pub ttl: u32,
    /// Presentation-format data, one record each: `192.0.2.1`, `2001:db8::1`,
    /// `edge.meridian.test`, text, `10 mail.example.com`, `0 issue "letsencrypt.org"`.
    pub values: Vec<String>,
}

impl DnsRecord {
    /// The store key: `name/TYPE`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.name, self.rtype.as_str())
    }

    /// Checks and normalises every field (names lower-cased without trailing dot, values
    /// trimmed); the error names the field at fault.
    pub fn normalized(&self) -> Result<Self, (&'static str, String)> {
        let name = dns_name(&self.name).map_err(|e| ("name", e))?;
        let zone = dns_name(&self.zone).map_err(|e| ("zone", e))?;
        if name != zone && !name.ends_with(&format!(".{zone}")) {
            return Err(("name", format!("{name:?} is not in zone {zone:?}")));
        }
        if self.rtype == DnsRecordType::Cname && name == zone {
            return Err((
                "type",
                format!("CNAME at the zone apex {zone:?} is not allowed (the apex has SOA and NS)"),
            ));
        }
        if self.ttl > MAX_DNS_TTL {
            return Err(("ttl", format!("ttl must be at most {MAX_DNS_TTL} seconds")));
        }
        if self.values.is_empty() {
            return Err(("values", "at least one value is required".into()));
        }
        if self.values.len() > MAX_DNS_VALUES {
            return Err((
                "values",
                format!("at most {MAX_DNS_VALUES} values per name and type"),
            ));
        }
        if self.rtype == DnsRecordType::Cname && self.values.len() != 1 {
            return Err(("values", "a CNAME has exactly one target".into()));
        }
        let mut values = Vec::with_capacity(self.values.len());
        for v in &self.values {
            let data = DnsRdata::parse(self.rtype, v).map_err(|e| ("values", e))?;
            let v = data.to_string();
            if !values.contains(&v) {
                values.push(v);
            }
        }
        Ok(Self {
            name,
            zone,
            rtype: self.rtype,
            ttl: self.ttl,
            values,
        })
    }

    /// Why `self` cannot join `existing` (a CNAME shares its name with no other data, RFC 1034
    /// §3.6.2); the set with the same (name, type) is the one `self` replaces.
    pub fn conflict(&self, existing: &[Self]) -> Option<String> {
        let other = existing.iter().find(|r| {
            r.name == self.name
                && r.rtype != self.rtype
                && (r.rtype == DnsRecordType::Cname || self.rtype == DnsRecordType::Cname)
        })?;
        Some(if self.rtype == DnsRecordType::Cname {
            format!(
                "CNAME at {:?}: the name already has {} data (a CNAME must be alone at its name)",
                self.name,
                other.rtype.as_str()
            )
        } else {
            format!(
                "{} at {:?}: the name is a CNAME (a CNAME must be alone at its name)",
                self.rtype.as_str(),
                self.name
            )
        })
    }
}

/// Longest TTL a record may ask for (one week).
pub const MAX_DNS_TTL: u32 = 604_800;
/// Most values in one RRset.
pub const MAX_DNS_VALUES: usize = 32;
/// Longest TXT value (split into 255-byte strings on the wire).
pub const MAX_TXT_LEN: usize = 2048;

/// A DNS name in canonical form: lower-case, no trailing dot, labels of `a-z 0-9 - _`.
pub fn dns_name(value: &str) -> Result<String, String> {
    let n = value.trim().to_ascii_lowercase();
    let n = n.strip_suffix('.').unwrap_or(&n);
    if n.is_empty() || n.len() > 253 {
        return Err(format!("{value:?}: a name must be 1 to 253 characters"));
    }
    for label in n.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("{value:?}: each label must be 1 to 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "{value:?}: labels may contain only a-z, 0-9, '-' and '_'"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("{value:?}: labels may not start or end with '-'"));
        }
    }
    Ok(n.to_owned())
}

/// One parsed record value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsRdata {
    A(std::net::Ipv4Addr),
    Aaaa(std::net::Ipv6Addr),
    /// Canonical target name.
    Cname(String),
    Txt(String),
    Caa {
        flags: u8,
        tag: String,
        value: String,
    },
    Mx {
        preference: u16,
        exchange: String,
    },
}

impl DnsRdata {
    /// Parses a presentation-format value of type `t`.
    pub fn parse(t: DnsRecordType, value: &str) -> Result<Self, String> {
        let v = value.trim();
        let bad = |what: &str| format!("{} value {value:?}: {what}", t.as_str());
        Ok(match t {
            DnsRecordType::A => Self::A(v.parse().map_err(|_| bad("not an IPv4 address"))?),
            DnsRecordType::Aaaa => Self::Aaaa(v.parse().map_err(|_| bad("not an IPv6 address"))?),
            DnsRecordType::Cname => Self::Cname(dns_name(v).map_err(|e| bad(&e))?),
            DnsRecordType::Txt => {
                let text = unquote(v);
                if text.len() > MAX_TXT_LEN {
                    return Err(bad(&format!("longer than {MAX_TXT_LEN} bytes")));
                }
                if text.chars().any(char::is_control) {
                    return Err(bad("control characters are not allowed"));
                }
                Self::Txt(text.to_owned())
            }
            DnsRecordType::Mx => {
                let (pref, host) = v
                    .split_once(char::is_whitespace)
                    .ok_or_else(|| bad("expected PREFERENCE EXCHANGE, e.g. 10 mail.example.com"))?;
                Self::Mx {
                    preference: pref
                        .parse()
                        .map_err(|_| bad("preference must be 0 to 65535"))?,
                    exchange: dns_name(host.trim()).map_err(|e| bad(&e))?,
                }
            }
            DnsRecordType::Caa => {
                let mut it = v.splitn(3, char::is_whitespace);
                let (Some(flags), Some(tag), Some(rest)) = (it.next(), it.next(), it.next()) else {
                    return Err(bad(
                        "expected FLAGS TAG VALUE, e.g. 0 issue \"letsencrypt.org\"",
                    ));
                };
                let flags: u8 = flags.parse().map_err(|_| bad("flags must be 0 to 255"))?;
                let tag = tag.to_ascii_lowercase();
                if tag.is_empty()
                    || tag.len() > 15
                    || !tag
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                {
                    return Err(bad("tag must be 1 to 15 letters or digits"));
                }
                if !matches!(tag.as_str(), "issue" | "issuewild" | "iodef") {
                    return Err(bad("tag must be issue, issuewild or iodef"));
                }
                let value = unquote(rest.trim());
                if value.len() > 255 || value.chars().any(|c| c.is_control() || c == '"') {
                    return Err(bad("value must be at most 255 printable bytes"));
                }
                if tag == "iodef"
                    && !(value.starts_with("mailto:")
                        || value.starts_with("https://")
                        || value.starts_with("http://"))
                {
                    return Err(bad("iodef value must be a mailto: or http(s): URL"));
                }
                if tag != "iodef" {
                    let issuer = value.split(';').next().unwrap_or_default().trim();
                    if !issuer.is_empty() {
                        dns_name(issuer).map_err(|e| bad(&e))?;
                    }
                }
                Self::Caa {
                    flags,
                    tag,
                    value: value.to_owned(),
                }
            }
        })
    }
}

/// `"text"` → `text`; anything else as is.
fn unquote(v: &str) -> &str {
    v.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(v)
}

impl std::fmt::Display for DnsRdata {
    /// The canonical stored form (what [`DnsRdata::parse`] reads back).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::A(ip) => write!(f, "{ip}"),
            Self::Aaaa(ip) => write!(f, "{ip}"),
            Self::Cname(n) => f.write_str(n),
            Self::Txt(t) => f.write_str(t),
            Self::Caa { flags, tag, value } => write!(f, "{flags} {tag} \"{value}\""),
            Self::Mx {
                preference,
                exchange,
            } => write!(f, "{preference} {exchange}"),
        }
    }
}

#[cfg(test)]
mod dns_record_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rec(name: &str, zone: &str, t: DnsRecordType, values: &[&str]) -> DnsRecord {
        DnsRecord {
            name: name.into(),
            zone: zone.into(),
            rtype: t,
            ttl: 0,
            values: values.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn normalises_and_rejects() {
        let r = rec(
            "WWW.Example.com.",
            "example.com",
            DnsRecordType::Cname,
            &["Edge.Meridian.Test."],
        )
        .normalized()
        .unwrap();
        assert_eq!(
            (r.name.as_str(), r.values[0].as_str()),
            ("www.example.com", "edge.meridian.test")
        );
        let field = |r: DnsRecord| r.normalized().unwrap_err().0;
        assert_eq!(
            field(rec(
                "example.com",
                "example.com",
                DnsRecordType::Cname,
                &["x.test"]
            )),
            "type"
        );
        assert_eq!(
            field(rec(
                "www.other.com",
                "example.com",
                DnsRecordType::Txt,
                &["x"]
            )),
            "name"
        );
        assert_eq!(
            field(rec(
                "a.example.com",
                "example.com",
                DnsRecordType::A,
                &["::1"]
            )),
            "values"
        );
        assert_eq!(
            field(rec(
                "a.example.com",
                "example.com",
                DnsRecordType::Mx,
                &["mail"]
            )),
            "values"
        );
        assert_eq!(
            field(rec(
                "a.example.com",
                "example.com",
                DnsRecordType::Caa,
                &["0 bogus \"x\""]
            )),
            "values"
        );
        assert_eq!(
            field(rec(
                "a.example.com",
                "example.com",
                DnsRecordType::Cname,
                &["a.b", "c.d"]
            )),
            "values"
        );
        assert_eq!(
            field(rec(
                "a..example.com",
                "example.com",
                DnsRecordType::A,
                &["192.0.2.1"]
            )),
            "name"
        );
        let caa = rec(
            "example.com",
            "example.com",
            DnsRecordType::Caa,
            &["0 issue letsencrypt.org"],
        )
        .normalized()
        .unwrap();
        assert_eq!(caa.values, vec!["0 issue \"letsencrypt.org\"".to_owned()]);
        let mx = rec(
            "example.com",
            "example.com",
            DnsRecordType::Mx,
            &[" 10   mail.example.com. "],
        )
        .normalized()
        .unwrap();
        assert_eq!(mx.values, vec!["10 mail.example.com".to_owned()]);
    }

    #[test]
    fn cname_must_be_alone() {
        let txt = rec("a.example.com", "example.com", DnsRecordType::Txt, &["x"]);
        let cname = rec(
            "a.example.com",
            "example.com",
            DnsRecordType::Cname,
            &["b.example.com"],
        );
        assert!(cname.conflict(std::slice::from_ref(&txt)).is_some());
        assert!(txt.conflict(std::slice::from_ref(&cname)).is_some());
        assert!(
            cname.conflict(std::slice::from_ref(&cname)).is_none(),
            "replacing itself"
        );
        let mx = rec(
            "a.example.com",
            "example.com",
            DnsRecordType::Mx,
            &["1 m.example.com"],
        );
        assert!(mx.conflict(&[txt]).is_none());
    }
}
