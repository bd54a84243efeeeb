//! State shared by every listener of one edge.

use std::sync::Arc;

use arc_swap::ArcSwap;
use coordinator_api::Snapshot;
use http::HeaderValue;
use tokio::sync::watch;

use crate::registry::Registry;
use crate::routing::RouteTable;

/// Per-request limits from the command line.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) upstream_timeout: std::time::Duration,
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
    pub(crate) agents: Registry,
    pub(crate) snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
}
