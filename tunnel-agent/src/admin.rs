//! `--admin-listen`: `/ready` for orchestrators (200 once registered with at least one edge and
//! the origin is healthy) and `/metrics` in Prometheus text format. Plain HTTP/1.1, loopback by
//! convention; a handful of counters read without locks.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::conn::Via;

/// Admin connections served at once; more wait in the kernel backlog.
const MAX_CONNECTIONS: usize = 64;
/// An admin client gets this long per connection.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Counters shared by the connection slots and the admin server.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Edge connections currently registered (Welcome received, not yet ended).
    pub(crate) registered: AtomicU64,
    /// Of those, how many run on the TCP fallback (QUIC inside TLS over TCP).
    pub(crate) registered_tcp: AtomicU64,
    pub(crate) registrations_total: AtomicU64,
    pub(crate) streams_active: AtomicU64,
    pub(crate) streams_total: AtomicU64,
}

impl Stats {
    /// Counts a stream until the returned guard drops.
    pub(crate) fn stream(self: &Arc<Self>) -> StreamGuard {
        self.streams_total.fetch_add(1, Ordering::Relaxed);
        self.streams_active.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.clone())
    }

    /// Counts a registered connection until the returned guard drops.
    pub(crate) fn registered(self: &Arc<Self>, via: Via) -> RegisteredGuard {
        self.registrations_total.fetch_add(1, Ordering::Relaxed);
        self.registered.fetch_add(1, Ordering::Relaxed);
        if via == Via::Tcp {
            self.registered_tcp.fetch_add(1, Ordering::Relaxed);
        }
        RegisteredGuard(self.clone(), via)
    }
}

pub(crate) struct StreamGuard(Arc<Stats>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams_active.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) struct RegisteredGuard(Arc<Stats>, Via);

impl Drop for RegisteredGuard {
    fn drop(&mut self) {
        self.0.registered.fetch_sub(1, Ordering::Relaxed);
        if self.1 == Via::Tcp {
            self.0.registered_tcp.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// What `/ready` and `/metrics` read.
#[derive(Clone)]
pub(crate) struct View {
    pub(crate) stats: Arc<Stats>,
    pub(crate) health: watch::Receiver<bool>,
    pub(crate) service: String,
    /// With `--mtls`: the client certificate, for its expiry.
    pub(crate) client_cert: Option<Arc<crate::client_cert::ClientCert>>,
}

impl View {
    fn ready(&self) -> bool {
        self.stats.registered.load(Ordering::Relaxed) > 0 && *self.health.borrow()
    }

    fn metrics(&self) -> String {
        let s = &self.stats;
        let svc = &self.service;
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            let _ = writeln!(out, "{name}{{service=\"{svc}\"}} {value}");
        };
        metric(
            "meridian_agent_edge_connections",
            "gauge",
            "Edge connections registered now.",
            s.registered.load(Ordering::Relaxed),
        );
        let (all, tcp) = (
            s.registered.load(Ordering::Relaxed),
            s.registered_tcp.load(Ordering::Relaxed),
        );
        let name = "meridian_agent_edge_connections_by_transport";
        let _ = writeln!(
            out,
            "# HELP {name} Edge connections registered now, by transport (tcp: the TLS/TCP fallback for blocked UDP).\n# TYPE {name} gauge"
        );
        let _ = writeln!(
            out,
            "{name}{{service=\"{svc}\",transport=\"quic\"}} {}",
            all.saturating_sub(tcp)
        );
        let _ = writeln!(out, "{name}{{service=\"{svc}\",transport=\"tcp\"}} {tcp}");
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            let _ = writeln!(out, "{name}{{service=\"{svc}\"}} {value}");
        };
        metric(
            "meridian_agent_registrations_total",
            "counter",
            "Successful registrations with an edge.",
            s.registrations_total.load(Ordering::Relaxed),
        );
        metric(
            "meridian_agent_streams_active",
            "gauge",
            "Edge-opened streams being served.",
            s.streams_active.load(Ordering::Relaxed),
        );
        metric(
            "meridian_agent_streams_total",
            "counter",
            "Edge-opened streams accepted.",
            s.streams_total.load(Ordering::Relaxed),
        );
        metric(
            "meridian_agent_origin_healthy",
            "gauge",
            "1 when the last origin health verdict was healthy.",
            u64::from(*self.health.borrow()),
        );
        if let Some(cert) = &self.client_cert {
            metric(
                "meridian_agent_client_cert_expiry_seconds",
                "gauge",
                "Unix time the current tunnel client certificate (--mtls) expires; 0 before the first.",
                cert.not_after_ms.load(Ordering::Relaxed) / 1000,
            );
        }
        metric(
            "meridian_agent_ready",
            "gauge",
            "1 when registered with an edge and the origin is healthy.",
            u64::from(self.ready()),
        );
        out
    }

    fn respond(&self, path: &str) -> hyper::Response<Full<Bytes>> {
        let (status, body, ctype) = match path {
            "/ready" if self.ready() => (200, "ready\n".to_owned(), "text/plain"),
            "/ready" => {
                let why = if self.stats.registered.load(Ordering::Relaxed) == 0 {
                    "not registered with any edge\n"
                } else {
                    "origin unhealthy\n"
                };
                (503, why.to_owned(), "text/plain")
            }
            "/metrics" => (200, self.metrics(), "text/plain; version=0.0.4"),
            _ => (404, "try /ready or /metrics\n".to_owned(), "text/plain"),
        };
        let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(ctype),
        );
        resp
    }
}

/// Serves the admin endpoints on an already bound listener until shutdown.
pub(crate) async fn serve(
    listener: TcpListener,
    view: View,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let view = view.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let resp = view.respond(req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn) => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtls_agents_report_their_certificate_expiry() {
        let (_tx, rx) = watch::channel(true);
        let cert = Arc::new(crate::client_cert::ClientCert::default());
        let view = View {
            stats: Arc::new(Stats::default()),
            health: rx,
            service: "shop".into(),
            client_cert: Some(cert.clone()),
        };
        let line = "meridian_agent_client_cert_expiry_seconds{service=\"shop\"}";
        assert!(view.metrics().contains(&format!("{line} 0")));
        cert.not_after_ms
            .store(1_800_000_123_456, Ordering::Relaxed);
        assert!(view.metrics().contains(&format!("{line} 1800000123")));
    }

    #[test]
    fn ready_needs_a_registration_and_a_healthy_origin() {
        let (tx, rx) = watch::channel(true);
        let view = View {
            stats: Arc::new(Stats::default()),
            health: rx,
            service: "shop".into(),
            client_cert: None,
        };
        assert!(!view.metrics().contains("client_cert"), "only with --mtls");
        assert_eq!(view.respond("/ready").status(), 503);
        let reg = view.stats.registered(Via::Quic);
        assert_eq!(view.respond("/ready").status(), 200);
        let tcp = view.stats.registered(Via::Tcp);
        let m = view.metrics();
        for line in [
            "meridian_agent_edge_connections_by_transport{service=\"shop\",transport=\"quic\"} 1",
            "meridian_agent_edge_connections_by_transport{service=\"shop\",transport=\"tcp\"} 1",
        ] {
            assert!(m.contains(line), "{m}");
        }
        drop(tcp);
        assert!(view.metrics().contains(
            "meridian_agent_edge_connections_by_transport{service=\"shop\",transport=\"tcp\"} 0"
        ));
        tx.send_replace(false);
        assert_eq!(view.respond("/ready").status(), 503);
        tx.send_replace(true);
        let s = view.stats.stream();
        let m = view.metrics();
        assert!(
            m.contains("meridian_agent_edge_connections{service=\"shop\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("meridian_agent_streams_active{service=\"shop\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("meridian_agent_ready{service=\"shop\"} 1"),
            "{m}"
        );
        drop((s, reg));
        let m = view.metrics();
        assert!(
            m.contains("meridian_agent_edge_connections{service=\"shop\"} 0"),
            "{m}"
        );
        assert!(
            m.contains("meridian_agent_streams_total{service=\"shop\"} 1"),
            "{m}"
        );
        assert_eq!(view.respond("/ready").status(), 503);
        assert_eq!(view.respond("/nope").status(), 404);
    }
}
