//! The admin listener: Prometheus `/metrics` and a `/ready` that turns 503 while draining, so a
//! load balancer in front stops sending before connections are closed.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::metrics::Gauges;
use crate::state::Shared;

fn reply(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    r
}

fn answer(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    let draining = shared.draining.is_cancelled();
    match req.uri().path() {
        "/ready" => {
            if draining {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
            } else if shared.snapshots.borrow().is_none() {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "no configuration snapshot yet\n",
                )
            } else {
                reply(StatusCode::OK, "text/plain", "ready\n")
            }
        }
        "/metrics" => {
            let mut backends: BTreeMap<String, usize> = BTreeMap::new();
            for a in shared.agents.agent_conns() {
                *backends.entry(a.service).or_default() += 1;
            }
            let gauges = Gauges {
                backends: backends.into_iter().collect(),
                open_connections: shared.open_connections.load(Ordering::Relaxed),
                draining,
                anycast: shared.anycast.clone(),
            };
            let mut text = shared
                .metrics
                .render(&shared.region, &shared.edge_id, &gauges);
            crate::backend::render_metrics(shared, &mut text);
            shared.agents.render_transports(&mut text);
            reply(StatusCode::OK, "text/plain; version=0.0.4", text)
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics or /ready\n",
        ),
    }
}

/// Serves until `stop` (cancelled once the data plane has drained, so `/ready` answers 503
/// throughout the drain).
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let (stream, remote) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let resp = answer(&shared, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                r = conn => if let Err(e) = r { debug!(%remote, error = %e, "admin connection error") },
                _ = stop.cancelled() => {}
            }
        });
    }
}
