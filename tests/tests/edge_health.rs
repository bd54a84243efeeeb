//! Active health checks of direct origins (issue 3) under `meridian dev`: an origin whose health
//! path fails `fall` times gets no traffic, and passes back in after `rise` passes; set with
//! `meridian ctl service create --health-check`. The edges' heartbeats say whether they can serve
//! the service, which GSLB reads.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meridian_tests::{
    clients::https_get,
    dev::{DevNetwork, eventually},
};

const IAD: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 12));
const HOST: &str = "edge.meridian.test";

struct Origin {
    addr: SocketAddr,
    healthy: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
}

/// An origin in this process: `/health` answers 200 or 503 by `healthy`, anything else its name.
async fn origin(ip: &str, name: &'static str) -> Origin {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let healthy = Arc::new(AtomicBool::new(true));
    let hits = Arc::new(AtomicUsize::new(0));
    let (h, n) = (healthy.clone(), hits.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (h, n) = (h.clone(), n.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (h, n) = (h.clone(), n.clone());
                    async move {
                        let mut resp = Response::new(Full::new(Bytes::from(name)));
                        if req.uri().path() == "/health" {
                            if !h.load(Ordering::SeqCst) {
                                *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                            }
                        } else {
                            n.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Origin {
        addr,
        healthy,
        hits,
    }
}

async fn names(net: &DevNetwork, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let r = https_get(&net.ca(), IAD, 8443, HOST, "/hc/", &[])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        out.push(r.text());
    }
    out
}

/// Waits (10 s) until every edge's heartbeat, as `ctl edges` shows it, says `hc` is served
/// (`want`) or not.
async fn all_edges_serve_hc(net: &DevNetwork, want: bool, what: &str) {
    let done = eventually(Duration::from_secs(10), || async {
        let edges = net.ctl(&["edges"]);
        let all = edges.as_array()?.iter().all(|e| {
            let list = e["info"]["healthy_services"].as_array();
            list.is_some_and(|l| l.iter().any(|s| s == "hc")) == want
        });
        all.then_some(())
    })
    .await;
    assert!(done.is_some(), "{what}: {}", net.ctl(&["edges"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_origin_gets_no_traffic_and_rise_brings_it_back() {
    let net = DevNetwork::start();
    let a = origin("127.0.3.3", "a").await;
    let b = origin("127.0.3.4", "b").await;
    net.ctl(&[
        "service",
        "create",
        "hc",
        "--lb",
        "round-robin",
        "--origin",
        &format!("http://{}", a.addr),
        "--origin",
        &format!("http://{}", b.addr),
        "--health-check",
        "/health,interval=150,timeout=100,rise=2,fall=2",
    ]);
    net.ctl(&[
        "mount",
        "add",
        &format!("{HOST}/hc"),
        "hc",
        "--strip-prefix",
    ]);
    let both = eventually(Duration::from_secs(15), || async {
        let r = https_get(&net.ca(), IAD, 8443, HOST, "/hc/", &[])
            .await
            .ok()?;
        (r.status == 200 && b.hits.load(Ordering::SeqCst) > 0 && a.hits.load(Ordering::SeqCst) > 0)
            .then_some(())
    })
    .await;
    assert!(both.is_some(), "both origins serve");

    b.healthy.store(false, Ordering::SeqCst);
    // Out after two failed probes; the edge stops sending b anything.
    let out = eventually(Duration::from_secs(5), || async {
        let before = b.hits.load(Ordering::SeqCst);
        let got = names(&net, 10).await;
        (b.hits.load(Ordering::SeqCst) == before && got.iter().all(|n| n == "a")).then_some(())
    })
    .await;
    assert!(
        out.is_some(),
        "b still gets traffic while failing its checks"
    );
    let before = b.hits.load(Ordering::SeqCst);
    assert!(names(&net, 20).await.iter().all(|n| n == "a"));
    assert_eq!(
        b.hits.load(Ordering::SeqCst),
        before,
        "no traffic to a failing origin"
    );

    // The edges tell the coordinator (and so GeoDNS) whether they can serve `hc`: not while
    // both origins fail their checks, again once one passes.
    all_edges_serve_hc(&net, true, "every edge reports hc as served").await;
    a.healthy.store(false, Ordering::SeqCst);
    all_edges_serve_hc(&net, false, "an edge reports hc with both origins failing").await;
    a.healthy.store(true, Ordering::SeqCst);
    all_edges_serve_hc(
        &net,
        true,
        "hc not reported again after a passed its checks",
    )
    .await;

    b.healthy.store(true, Ordering::SeqCst);
    let back = eventually(Duration::from_secs(5), || async {
        names(&net, 10).await.iter().any(|n| n == "b").then_some(())
    })
    .await;
    assert!(back.is_some(), "b passes back in after rise");
    let got = names(&net, 10).await;
    assert_eq!(got.iter().filter(|n| *n == "b").count(), 5, "{got:?}");
}
