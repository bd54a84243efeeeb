//! Live agent connections per service.
//!
//! Readers (every proxied request) load an immutable map through `ArcSwap`; writers (agent connect
//! and disconnect, rare) clone-and-swap under a plain mutex that is never held across `.await`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use coordinator_api::AgentConn;
use tokio::sync::Notify;

use crate::balance;

/// How fast latency samples fade: a backend slow ten seconds ago is mostly forgiven.
const LATENCY_DECAY: std::time::Duration = std::time::Duration::from_secs(10);

/// A latency sample older than this no longer counts: the agent is probed again with real
/// traffic, so one slow (cold) answer cannot starve it.
const LATENCY_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

/// One registered agent connection.
#[derive(Debug)]
pub(crate) struct AgentHandle {
    /// Unique per connection for this process.
    pub(crate) key: u64,
    pub(crate) conn: quinn::Connection,
    pub(crate) info: AgentConn,
    in_flight: AtomicUsize,
    /// Last `OriginHealth` the agent reported; unhealthy connections are avoided while others exist.
    origin_healthy: AtomicBool,
    /// Time to response head, smoothed: P2C's cost steers away from slow agents before they queue.
    latency: Mutex<balance::Ewma>,
    /// Opaque name of the agent in sticky cookies (a digest of its id, equal on every edge).
    pub(crate) tag: String,
    /// Circuit breaker, for services that configure one.
    breaker: Mutex<crate::breaker::Breaker>,
    /// Whether the agent reached us over the TCP fallback (QUIC inside TLS/TCP) rather than UDP.
    pub(crate) via_tcp: bool,
}

impl AgentHandle {
    pub(crate) fn new(conn: quinn::Connection, info: AgentConn) -> Arc<Self> {
        let via_tcp = tunnel_proto::io::fallback::MuxSocket::is_tcp_peer(&conn.remote_address());
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Arc::new(Self {
            key: NEXT.fetch_add(1, Ordering::Relaxed),
            conn,
            tag: crate::upstream::backend_tag(&info.agent_id),
            breaker: Mutex::default(),
            via_tcp,
            info,
            in_flight: AtomicUsize::new(0),
            origin_healthy: AtomicBool::new(true),
            latency: Mutex::new(balance::Ewma::new(LATENCY_DECAY)),
        })
    }

    /// Records one request's time to response head.
    pub(crate) fn observe_latency(&self, d: std::time::Duration) {
        let now = std::time::Instant::now();
        // Held for one float update; a poisoned EWMA is still a valid number.
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(d, now);
    }

    pub(crate) fn latency(&self) -> Option<std::time::Duration> {
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(std::time::Instant::now(), LATENCY_MAX_AGE)
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Held for a state update, never across `.await`; a poisoned breaker is still a valid state.
    pub(crate) fn breaker(&self) -> std::sync::MutexGuard<'_, crate::breaker::Breaker> {
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the agent's latest origin verdict; true when it changed.
    pub(crate) fn set_origin_healthy(&self, healthy: bool) -> bool {
        self.origin_healthy.swap(healthy, Ordering::Relaxed) != healthy
    }

    pub(crate) fn origin_healthy(&self) -> bool {
        self.origin_healthy.load(Ordering::Relaxed)
    }

    /// Counts one request against this connection until the returned lease is dropped.
    pub(crate) fn lease(self: &Arc<Self>) -> Lease {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Lease(self.clone())
    }
}

/// An in-flight request on an agent connection; dropping it ends the request for balancing.
#[derive(Debug)]
pub(crate) struct Lease(Arc<AgentHandle>);

impl Lease {
    pub(crate) fn agent(&self) -> &Arc<AgentHandle> {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl balance::Backends for [Arc<AgentHandle>] {
    fn len(&self) -> usize {
        <[_]>::len(self)
    }
    fn in_flight(&self, i: usize) -> usize {
        self[i].in_flight()
    }
    fn latency(&self, i: usize) -> Option<std::time::Duration> {
        self[i].latency()
    }
    fn id(&self, i: usize) -> &str {
        &self[i].info.agent_id
    }
}

impl balance::Backends for [&Arc<AgentHandle>] {
    fn len(&self) -> usize {
        <[_]>::len(self)
    }
    fn in_flight(&self, i: usize) -> usize {
        self[i].in_flight()
    }
    fn latency(&self, i: usize) -> Option<std::time::Duration> {
        self[i].latency()
    }
    fn id(&self, i: usize) -> &str {
        &self[i].info.agent_id
    }
}

type Map = HashMap<String, Arc<[Arc<AgentHandle>]>>;

#[derive(Debug, Default)]
pub(crate) struct Registry {
    by_service: ArcSwap<Map>,
    write: Mutex<()>,
    /// Signalled on every connect/disconnect so the heartbeat goes out at once.
    pub(crate) changed: Notify,
}

impl Registry {
    fn update(&self, f: impl FnOnce(&mut Map)) {
        // A poisoned lock only means another writer panicked mid-update; the map itself is
        // immutable behind the ArcSwap, so carrying on is safe.
        let _guard = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let mut next: Map = (**self.by_service.load()).clone();
        f(&mut next);
        self.by_service.store(Arc::new(next));
        self.changed.notify_one();
    }

    pub(crate) fn add(&self, handle: Arc<AgentHandle>) {
        self.update(|m| {
            let service = handle.info.service.clone();
            let mut list: Vec<Arc<AgentHandle>> =
                m.get(&service).map(|l| l.to_vec()).unwrap_or_default();
            list.push(handle);
            m.insert(service, list.into());
        });
    }

    /// Stops routing to a connection; `false` if it was not registered.
    pub(crate) fn remove(&self, handle: &AgentHandle) -> bool {
        let present = self
            .by_service
            .load()
            .get(&handle.info.service)
            .is_some_and(|l| l.iter().any(|h| h.key == handle.key));
        if !present {
            return false;
        }
        self.update(|m| {
            if let Some(list) = m.get(&handle.info.service) {
                let rest: Vec<Arc<AgentHandle>> = list
                    .iter()
                    .filter(|h| h.key != handle.key)
                    .cloned()
                    .collect();
                if rest.is_empty() {
                    m.remove(&handle.info.service);
                } else {
                    m.insert(handle.info.service.clone(), rest.into());
                }
            }
        });
        true
    }

    /// Picks a connection for `service` by its balancing `choice`, skipping `exclude` and
    /// preferring connections whose origin is healthy (all of them when none is).
    pub(crate) fn pick(
        &self,
        service: &str,
        exclude: Option<u64>,
        choice: balance::Choice<'_>,
    ) -> Option<Lease> {
        let map = self.by_service.load();
        let list = map.get(service)?;
        let mut rng = rand::rng();
        let chosen = if exclude.is_none() && list.iter().all(|h| h.origin_healthy()) {
            // Fast path: no filtering, no allocation.
            choice.pick(&list[..], &mut rng).map(|i| &list[i])
        } else {
            let usable: Vec<&Arc<AgentHandle>> =
                list.iter().filter(|h| Some(h.key) != exclude).collect();
            let healthy: Vec<&Arc<AgentHandle>> = usable
                .iter()
                .copied()
                .filter(|h| h.origin_healthy())
                .collect();
            let pool = if healthy.is_empty() { usable } else { healthy };
            choice.pick(&pool[..], &mut rng).map(|i| pool[i])
        }?;
        Some(chosen.lease())
    }

    /// The connections serving `service` (one snapshot of the list).
    pub(crate) fn list(&self, service: &str) -> Option<Arc<[Arc<AgentHandle>]>> {
        self.by_service.load().get(service).cloned()
    }

    /// Whether `service` has a connection whose origin reports healthy (the anycast policy).
    pub(crate) fn has_healthy(&self, service: &str) -> bool {
        self.by_service
            .load()
            .get(service)
            .is_some_and(|l| l.iter().any(|h| h.origin_healthy()))
    }

    /// Registered connections by transport: (QUIC over UDP, QUIC over the TCP fallback).
    pub(crate) fn by_transport(&self) -> (usize, usize) {
        let map = self.by_service.load();
        let tcp = map
            .values()
            .flat_map(|l| l.iter())
            .filter(|h| h.via_tcp)
            .count();
        let all = map.values().map(|l| l.len()).sum::<usize>();
        (all - tcp, tcp)
    }

    /// `meridian_edge_agent_connections{transport}` for `/metrics`.
    pub(crate) fn render_transports(&self, out: &mut String) {
        use std::fmt::Write as _;
        let (quic, tcp) = self.by_transport();
        let _ = writeln!(
            out,
            "# HELP meridian_edge_agent_connections Agent connections registered now, by transport (tcp: QUIC inside TLS/TCP, for agents whose UDP is blocked).\n# TYPE meridian_edge_agent_connections gauge\nmeridian_edge_agent_connections{{transport=\"quic\"}} {quic}\nmeridian_edge_agent_connections{{transport=\"tcp\"}} {tcp}"
        );
    }

    /// Every registered connection, for the heartbeat.
    pub(crate) fn agent_conns(&self) -> Vec<AgentConn> {
        self.by_service
            .load()
            .values()
            .flat_map(|l| {
                l.iter().map(|h| AgentConn {
                    origin_healthy: h.origin_healthy(),
                    ..h.info.clone()
                })
            })
            .collect()
    }
}
