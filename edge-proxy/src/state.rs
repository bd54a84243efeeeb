//! State shared by every listener of one edge.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use coordinator_api::Snapshot;
use http::HeaderValue;
use tokio::sync::watch;

use crate::registry::Registry;
use crate::retry::RetryBudget;
use crate::routing::RouteTable;

/// Per-request limits from the command line.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) upstream_timeout: std::time::Duration,
    /// See `Config::l4_idle_timeout`.
    pub(crate) l4_idle: std::time::Duration,
    pub(crate) max_request_body: Option<u64>,
}

pub(crate) struct Shared {
    pub(crate) limits: Limits,
    pub(crate) edge_id: String,
    pub(crate) region: String,
    /// `Meridian-Region` / `Meridian-Edge` values, validated once at startup.
    pub(crate) region_header: HeaderValue,
    pub(crate) edge_header: HeaderValue,
    pub(crate) routes: ArcSwap<RouteTable>,
    /// TLS passthrough hosts (by SNI), swapped with each snapshot like `routes`.
    pub(crate) passthrough: ArcSwap<crate::passthrough::Table>,
    /// Balancing policy and state per service, swapped with each snapshot.
    pub(crate) policies: ArcSwap<crate::balance::Policies>,
    /// Direct origins: the process-wide upstream pool and the sticky-cookie secret.
    pub(crate) upstreams: crate::upstream::Upstreams,
    pub(crate) agents: Registry,
    pub(crate) snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    /// Retry budget of requests for services without a definition in the snapshot (each
    /// defined service has its own, in its balancing state).
    pub(crate) retry_budget: Mutex<RetryBudget>,
    /// Identical GET/HEAD requests in flight on routes that coalesce.
    pub(crate) coalescer: crate::coalesce::Coalescer,
    /// Passive outlier detection, one detector per service.
    pub(crate) outliers: Mutex<std::collections::HashMap<String, crate::outlier::Detector>>,
    /// The edge's own health checks of agents, through the tunnel.
    pub(crate) agent_checks: crate::health::AgentChecks,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    pub(crate) ip_limit: Option<crate::ratelimit::Limiter<std::net::IpAddr>>,
    pub(crate) route_limit: Option<crate::ratelimit::Limiter<Arc<str>>>,
    pub(crate) access_log: Option<crate::access_log::AccessLog>,
    /// Client connections being served (HTTP + HTTPS).
    pub(crate) open_connections: std::sync::atomic::AtomicUsize,
    /// Cancelled when shutdown starts: `/ready` answers 503 from then on.
    pub(crate) draining: tokio_util::sync::CancellationToken,
    /// Client to peer edges for cross-region forwarding, when `--peer-ca` and a node token are set.
    pub(crate) peers: Option<crate::peers::PeerClient>,
    /// Anycast announce state, when `--bird-socket` is set.
    pub(crate) anycast: Option<Arc<crate::announce::Status>>,
}

impl Shared {
    /// The outlier detectors; held for a map lookup and a counter update, never across `.await`.
    pub(crate) fn outliers(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, crate::outlier::Detector>>
    {
        self.outliers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The retry budget of the service whose balancing state is `sb`: its own, so a storm on
    /// one service cannot spend another's retries; the shared fallback for a service without a
    /// definition. The lock is held for a few counter updates, never across `.await`; a
    /// poisoned lock still holds valid counters.
    pub(crate) fn retry_budget<'a>(
        &'a self,
        sb: Option<&'a crate::balance::ServiceBalance>,
    ) -> std::sync::MutexGuard<'a, RetryBudget> {
        match sb {
            Some(sb) => sb.retry_budget.lock(),
            None => self.retry_budget.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }
}
