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
}

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
