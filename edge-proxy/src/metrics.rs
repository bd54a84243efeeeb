//! Request metrics and the Prometheus text rendering, sans-IO apart from a short-held mutex.
//!
//! One small map keyed by (service, status) keeps the hot path to a hash lookup and a few adds;
//! the lock is never held across `.await` and rendering copies out first.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency histogram buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            self.counts[i] += 1;
        }
        self.sum += secs;
        self.count += 1;
    }
}

#[derive(Debug, Default)]
struct Inner {
    requests: HashMap<(String, u16), u64>,
    latency: HashMap<String, Histogram>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    inner: Mutex<Inner>,
    pub(crate) retries: AtomicU64,
    /// Requests this edge sent to a peer edge because it had no agent of the service.
    pub(crate) peer_forwards: AtomicU64,
    pub(crate) access_log_dropped: AtomicU64,
    /// L4 connections (TLS passthrough, TCP services) by service and outcome.
    pub(crate) l4: crate::passthrough::L4Metrics,
    /// Streams opened on agent connections (the tunnel's pool).
    pub(crate) agent_pool: AgentPool,
}

/// Connections opened and requests served by one upstream pool: relaxed atomics only, so the
/// request path never takes a lock to count.
#[derive(Debug, Default)]
pub(crate) struct PoolCounters {
    opened: AtomicU64,
    requests: AtomicU64,
    reused: AtomicU64,
}

impl PoolCounters {
    /// A new upstream connection.
    pub(crate) fn opened(&self) {
        self.opened.fetch_add(1, Ordering::Relaxed);
    }

    /// One request; `reused` when its connection had served a request before.
    pub(crate) fn request(&self, reused: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if reused {
            self.reused.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (connections opened, requests, requests on reused connections)
    pub(crate) fn get(&self) -> (u64, u64, u64) {
        (
            self.opened.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
            self.reused.load(Ordering::Relaxed),
        )
    }
}

/// Slots of [`AgentPool`]'s first-use table.
const AGENT_SLOTS: usize = 1024;

/// The agent stream pool: agents dial the edge, so a connection counts as opened the first time
/// a request uses it, and every later stream on it is a request on a reused connection. First
/// use is told by a direct-mapped table of connection keys (keys are sequential, so up to
/// [`AGENT_SLOTS`] live connections never collide; beyond that an evicted connection may count
/// as opened twice). Steady state is one relaxed load per request.
#[derive(Debug)]
pub(crate) struct AgentPool {
    pub(crate) counters: PoolCounters,
    seen: Box<[AtomicU64]>,
}

impl Default for AgentPool {
    fn default() -> Self {
        Self {
            counters: PoolCounters::default(),
            seen: (0..AGENT_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl AgentPool {
    /// One stream on agent connection `key` (keys start at 1).
    pub(crate) fn stream(&self, key: u64) {
        let slot = &self.seen[(key as usize) % AGENT_SLOTS];
        let reused =
            slot.load(Ordering::Relaxed) == key || slot.swap(key, Ordering::Relaxed) == key;
        if !reused {
            self.counters.opened();
        }
        self.counters.request(reused);
    }
}

/// Pool kinds as `/metrics` labels them.
pub(crate) const POOL_AGENT: &str = "agent";
pub(crate) const POOL_ORIGIN_H1: &str = "origin_h1";
pub(crate) const POOL_ORIGIN_H2: &str = "origin_h2";
pub(crate) const POOL_PEER: &str = "peer";

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one answered request; `route` is the service, or `-` when nothing matched.
    pub(crate) fn record(&self, route: &str, status: u16, latency: Duration) {
        let mut g = self.lock();
        match g.requests.get_mut(&(route.to_owned(), status)) {
            Some(c) => *c += 1,
            None => {
                g.requests.insert((route.to_owned(), status), 1);
            }
        }
        match g.latency.get_mut(route) {
            Some(h) => h.observe(latency.as_secs_f64()),
            None => {
                let mut h = Histogram::default();
                h.observe(latency.as_secs_f64());
                g.latency.insert(route.to_owned(), h);
            }
        }
    }

    /// Prometheus text format 0.0.4.
    pub(crate) fn render(&self, region: &str, edge: &str, gauges: &Gauges) -> String {
        let (mut requests, mut latency) = {
            let g = self.lock();
            (
                g.requests
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect::<Vec<_>>(),
                g.latency
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<Vec<_>>(),
            )
        };
        requests.sort();
        latency.sort_by(|a, b| a.0.cmp(&b.0));
        let region = escape(region);
        let edge = escape(edge);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP meridian_edge_requests_total Requests answered, by route (service), status and region.\n# TYPE meridian_edge_requests_total counter"
        );
        for ((route, status), n) in &requests {
            let _ = writeln!(
                out,
                "meridian_edge_requests_total{{route=\"{}\",status=\"{status}\",region=\"{region}\",edge=\"{edge}\"}} {n}",
                escape(route)
            );
        }
        let _ = writeln!(
            out,
            "# HELP meridian_edge_request_duration_seconds Time to the response head.\n# TYPE meridian_edge_request_duration_seconds histogram"
        );
        for (route, h) in &latency {
            let route = escape(route);
            let mut cum = 0;
            for (b, c) in BUCKETS.iter().zip(h.counts) {
                cum += c;
                let _ = writeln!(
                    out,
                    "meridian_edge_request_duration_seconds_bucket{{route=\"{route}\",region=\"{region}\",le=\"{b}\"}} {cum}"
                );
            }
            let _ = writeln!(
                out,
                "meridian_edge_request_duration_seconds_bucket{{route=\"{route}\",region=\"{region}\",le=\"+Inf\"}} {}\nmeridian_edge_request_duration_seconds_sum{{route=\"{route}\",region=\"{region}\"}} {}\nmeridian_edge_request_duration_seconds_count{{route=\"{route}\",region=\"{region}\"}} {}",
                h.count, h.sum, h.count
            );
        }
        let _ = writeln!(
            out,
            "# HELP meridian_edge_backends Agent connections registered (routable) per service.\n# TYPE meridian_edge_backends gauge"
        );
        for (service, total) in &gauges.backends {
            let _ = writeln!(
                out,
                "meridian_edge_backends{{service=\"{}\"}} {total}",
                escape(service)
            );
        }
        let _ = writeln!(
            out,
            "# TYPE meridian_edge_open_connections gauge\nmeridian_edge_open_connections {}\n# TYPE meridian_edge_retries_total counter\nmeridian_edge_retries_total {}\n# TYPE meridian_edge_peer_forwards_total counter\nmeridian_edge_peer_forwards_total {}\n# TYPE meridian_edge_access_log_dropped_total counter\nmeridian_edge_access_log_dropped_total {}\n# TYPE meridian_edge_draining gauge\nmeridian_edge_draining {}",
            gauges.open_connections,
            self.retries.load(Ordering::Relaxed),
            self.peer_forwards.load(Ordering::Relaxed),
            self.access_log_dropped.load(Ordering::Relaxed),
            u8::from(gauges.draining),
        );
        if let Some(a) = &gauges.anycast {
            render_anycast(&mut out, a);
        }
        self.l4.render(&mut out);
        out
    }
}

/// One backend of one service as `/metrics` shows it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BackendState {
    pub(crate) service: String,
    /// The origin's URL or the agent's id.
    pub(crate) backend: String,
    /// `origin` or `agent`.
    pub(crate) kind: &'static str,
    /// Passes active health checks (the edge's own for origins and, through the tunnel, for
    /// agents; for agents also the agent's own origin probe).
    pub(crate) checks_ok: bool,
    /// Ejected by passive outlier detection.
    pub(crate) ejected: bool,
    pub(crate) breaker: crate::breaker::Phase,
}

/// Renders backend health, breaker state and pool reuse (the upstream side of `/metrics`).
pub(crate) fn render_upstreams(
    out: &mut String,
    backends: &[BackendState],
    pools: &[(&str, (u64, u64, u64))],
) {
    let _ = writeln!(
        out,
        "# HELP meridian_edge_backend_healthy 1 while a backend passes its active health checks and is not ejected as an outlier.\n# TYPE meridian_edge_backend_healthy gauge"
    );
    for b in backends {
        let _ = writeln!(
            out,
            "meridian_edge_backend_healthy{{{}}} {}",
            backend_labels(b),
            u8::from(b.checks_ok && !b.ejected)
        );
    }
    let _ = writeln!(
        out,
        "# HELP meridian_edge_backend_check_passing 1 while a backend passes its active health checks.\n# TYPE meridian_edge_backend_check_passing gauge"
    );
    for b in backends {
        let _ = writeln!(
            out,
            "meridian_edge_backend_check_passing{{{}}} {}",
            backend_labels(b),
            u8::from(b.checks_ok)
        );
    }
    let _ = writeln!(
        out,
        "# HELP meridian_edge_backend_ejected 1 while passive outlier detection ejects a backend.\n# TYPE meridian_edge_backend_ejected gauge"
    );
    for b in backends {
        let _ = writeln!(
            out,
            "meridian_edge_backend_ejected{{{}}} {}",
            backend_labels(b),
            u8::from(b.ejected)
        );
    }
    let _ = writeln!(
        out,
        "# HELP meridian_edge_backend_circuit_state Circuit breaker state per backend: 1 on the current state.\n# TYPE meridian_edge_backend_circuit_state gauge"
    );
    for b in backends {
        let labels = backend_labels(b);
        for phase in crate::breaker::Phase::ALL {
            let _ = writeln!(
                out,
                "meridian_edge_backend_circuit_state{{{labels},state=\"{}\"}} {}",
                phase.label(),
                u8::from(b.breaker == phase)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP meridian_edge_upstream_connections_opened_total Upstream connections opened (agent connections: first used), by pool.\n# TYPE meridian_edge_upstream_connections_opened_total counter"
    );
    for (pool, (opened, _, _)) in pools {
        let _ = writeln!(
            out,
            "meridian_edge_upstream_connections_opened_total{{pool=\"{pool}\"}} {opened}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP meridian_edge_upstream_requests_total Upstream requests by pool, on a new or a reused connection.\n# TYPE meridian_edge_upstream_requests_total counter"
    );
    for (pool, (_, requests, reused)) in pools {
        let _ = writeln!(
            out,
            "meridian_edge_upstream_requests_total{{pool=\"{pool}\",connection=\"new\"}} {}\nmeridian_edge_upstream_requests_total{{pool=\"{pool}\",connection=\"reused\"}} {reused}",
            requests.saturating_sub(*reused)
        );
    }
}

fn backend_labels(b: &BackendState) -> String {
    format!(
        "service=\"{}\",backend=\"{}\",kind=\"{}\"",
        escape(&b.service),
        escape(&b.backend),
        b.kind
    )
}

/// Point-in-time values the renderer cannot count itself.
#[derive(Debug, Default)]
pub(crate) struct Gauges {
    /// (service, registered agent connections)
    pub(crate) backends: Vec<(String, usize)>,
    pub(crate) open_connections: usize,
    pub(crate) draining: bool,
    pub(crate) anycast: Option<std::sync::Arc<crate::announce::Status>>,
}

fn render_anycast(out: &mut String, a: &crate::announce::Status) {
    let vip = escape(&a.vip);
    let g = |b: &std::sync::atomic::AtomicBool| u8::from(b.load(Ordering::Relaxed));
    let _ = writeln!(
        out,
        "# HELP meridian_edge_anycast_announced 1 while the routing daemon confirms this edge announces the VIP.\n# TYPE meridian_edge_anycast_announced gauge\nmeridian_edge_anycast_announced{{vip=\"{vip}\"}} {}\n# HELP meridian_edge_anycast_desired 1 while the health policy wants the VIP announced.\n# TYPE meridian_edge_anycast_desired gauge\nmeridian_edge_anycast_desired{{vip=\"{vip}\"}} {}\n# HELP meridian_edge_anycast_check Last result of each announce health input.\n# TYPE meridian_edge_anycast_check gauge\nmeridian_edge_anycast_check{{vip=\"{vip}\",check=\"listeners\"}} {}\nmeridian_edge_anycast_check{{vip=\"{vip}\",check=\"config\"}} {}\nmeridian_edge_anycast_check{{vip=\"{vip}\",check=\"backends\"}} {}\n# TYPE meridian_edge_anycast_transitions_total counter\nmeridian_edge_anycast_transitions_total{{vip=\"{vip}\"}} {}\n# TYPE meridian_edge_anycast_announcer_errors_total counter\nmeridian_edge_anycast_announcer_errors_total{{vip=\"{vip}\"}} {}",
        g(&a.announced),
        g(&a.desired),
        g(&a.listeners_up),
        g(&a.config_fresh),
        g(&a.backends_ok),
        a.transitions.load(Ordering::Relaxed),
        a.errors.load(Ordering::Relaxed),
    );
}

/// Label values: backslash, quote and newline escaped.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_histogram() {
        let m = Metrics::default();
        m.record("web", 200, Duration::from_millis(3));
        m.record("web", 200, Duration::from_millis(30));
        m.record("web", 502, Duration::from_millis(300));
        m.record("we\"b", 404, Duration::from_secs(20));
        let text = m.render(
            "eu",
            "e1",
            &Gauges {
                backends: vec![("web".into(), 2)],
                open_connections: 3,
                draining: true,
                anycast: None,
            },
        );
        assert!(text.contains(
            "meridian_edge_requests_total{route=\"web\",status=\"200\",region=\"eu\",edge=\"e1\"} 2"
        ));
        assert!(text.contains("route=\"we\\\"b\",status=\"404\""));
        assert!(text.contains(
            "meridian_edge_request_duration_seconds_bucket{route=\"web\",region=\"eu\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "meridian_edge_request_duration_seconds_bucket{route=\"web\",region=\"eu\",le=\"0.05\"} 2"
        ));
        assert!(text.contains(
            "meridian_edge_request_duration_seconds_bucket{route=\"web\",region=\"eu\",le=\"+Inf\"} 3"
        ));
        assert!(text.contains("meridian_edge_backends{service=\"web\"} 2"));
        assert!(text.contains("meridian_edge_draining 1"));
        assert!(!text.contains("anycast"));
    }

    #[test]
    fn agent_pool_counts_first_use_as_a_connection() {
        let p = AgentPool::default();
        p.stream(1);
        p.stream(1);
        p.stream(2);
        p.stream(1);
        p.stream(2);
        assert_eq!(p.counters.get(), (2, 5, 3));
    }

    #[test]
    fn renders_backends_and_pools() {
        let mut out = String::new();
        render_upstreams(
            &mut out,
            &[
                BackendState {
                    service: "web".into(),
                    backend: "http://10.0.0.1:80".into(),
                    kind: "origin",
                    checks_ok: true,
                    ejected: true,
                    breaker: crate::breaker::Phase::HalfOpen,
                },
                BackendState {
                    service: "web".into(),
                    backend: "a1".into(),
                    kind: "agent",
                    checks_ok: true,
                    ejected: false,
                    breaker: crate::breaker::Phase::Closed,
                },
            ],
            &[(POOL_ORIGIN_H1, (2, 10, 8))],
        );
        let o = "service=\"web\",backend=\"http://10.0.0.1:80\",kind=\"origin\"";
        assert!(out.contains(&format!("meridian_edge_backend_healthy{{{o}}} 0")));
        assert!(out.contains(&format!("meridian_edge_backend_ejected{{{o}}} 1")));
        assert!(out.contains(&format!(
            "meridian_edge_backend_circuit_state{{{o},state=\"half_open\"}} 1"
        )));
        assert!(out.contains(&format!(
            "meridian_edge_backend_circuit_state{{{o},state=\"open\"}} 0"
        )));
        assert!(out.contains(
            "meridian_edge_backend_healthy{service=\"web\",backend=\"a1\",kind=\"agent\"} 1"
        ));
        assert!(
            out.contains("meridian_edge_upstream_connections_opened_total{pool=\"origin_h1\"} 2")
        );
        assert!(out.contains(
            "meridian_edge_upstream_requests_total{pool=\"origin_h1\",connection=\"reused\"} 8"
        ));
        assert!(out.contains(
            "meridian_edge_upstream_requests_total{pool=\"origin_h1\",connection=\"new\"} 2"
        ));
    }

    #[test]
    fn renders_anycast_state() {
        let status = crate::announce::Status {
            vip: "198.18.0.10/32".into(),
            ..Default::default()
        };
        status.announced.store(true, Ordering::Relaxed);
        status.listeners_up.store(true, Ordering::Relaxed);
        status.transitions.store(3, Ordering::Relaxed);
        let text = Metrics::default().render(
            "eu",
            "e1",
            &Gauges {
                anycast: Some(std::sync::Arc::new(status)),
                ..Default::default()
            },
        );
        assert!(text.contains("meridian_edge_anycast_announced{vip=\"198.18.0.10/32\"} 1"));
        assert!(text.contains("meridian_edge_anycast_desired{vip=\"198.18.0.10/32\"} 0"));
        assert!(
            text.contains(
                "meridian_edge_anycast_check{vip=\"198.18.0.10/32\",check=\"listeners\"} 1"
            )
        );
        assert!(
            text.contains(
                "meridian_edge_anycast_check{vip=\"198.18.0.10/32\",check=\"backends\"} 0"
            )
        );
        assert!(text.contains("meridian_edge_anycast_transitions_total{vip=\"198.18.0.10/32\"} 3"));
    }
}
