//! Direct origins (issue 3): services whose backends are URLs, served by the edge with no agent —
//! plain HTTP, HTTPS verified against a CA (HTTP/1.1 and HTTP/2 by ALPN), a wrong CA refused, and
//! one of two origins killed under load without a failed idempotent request.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meridian_tests::{
    clients::https_get,
    dev::{DevNetwork, demo_app, eventually},
};

const IAD: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 12));
const HOST: &str = "edge.meridian.test";

/// GET through the iad edge; `(status, body)`.
async fn get(net: &DevNetwork, path: &str) -> Option<(u16, String)> {
    let r = https_get(&net.ca(), IAD, 8443, HOST, path, &[])
        .await
        .ok()?;
    Some((r.status, r.text()))
}

async fn until_status(net: &DevNetwork, path: &str, status: u16) -> String {
    let body = eventually(Duration::from_secs(15), || async {
        get(net, path)
            .await
            .filter(|(s, _)| *s == status)
            .map(|(_, b)| b)
    })
    .await;
    match body {
        Some(b) => b,
        None => panic!(
            "{path} never answered {status}; now: {:?}",
            get(net, path).await
        ),
    }
}

/// An HTTPS origin on 127.0.0.1 with the dev network's edge certificate (names `localhost`),
/// answering `tls-origin <HTTP version>`; it offers h2 and http/1.1 by ALPN.
async fn https_origin(cert: &Path, key: &Path) -> SocketAddr {
    let certs = rustls_pemfile::certs(&mut std::fs::read(cert).unwrap().as_slice())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut std::fs::read(key).unwrap().as_slice())
        .unwrap()
        .unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let host = req
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .or_else(|| {
                                req.headers()
                                    .get("host")
                                    .and_then(|h| h.to_str().ok())
                                    .map(str::to_owned)
                            })
                            .unwrap_or_default();
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                            "tls-origin {:?} host={host}",
                            req.version()
                        )))))
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn origins_without_agents_plain_tls_and_failover() {
    let net = DevNetwork::start();

    // A service whose only backend is a URL: served with no agent anywhere.
    let _one = demo_app("127.0.3.1:7811", "one");
    net.ctl(&[
        "service",
        "create",
        "orig",
        "--origin",
        "http://127.0.3.1:7811",
    ]);
    net.ctl(&[
        "mount",
        "add",
        &format!("{HOST}/orig"),
        "orig",
        "--strip-prefix",
    ]);
    let body = until_status(&net, "/orig/", 200).await;
    assert!(body.contains("\"instance\":\"one\""), "{body}");
    let agents = net.ctl(&["agents"]);
    assert!(
        !agents.to_string().contains("\"service\":\"orig\""),
        "no agent serves orig: {agents}"
    );

    // HTTPS to the origin, verified against the CA that signed it; HTTP/1.1 by default, HTTP/2 by
    // ALPN once the service says h2 (a live update).
    let tls = https_origin(&net.path("edge.pem"), &net.path("edge.key")).await;
    let ca = net.ca().display().to_string();
    let url = format!("https://localhost:{}", tls.port());
    net.ctl(&[
        "service",
        "create",
        "tls",
        "--origin",
        &format!("{url},ca={ca}"),
    ]);
    net.ctl(&[
        "mount",
        "add",
        &format!("{HOST}/tls"),
        "tls",
        "--strip-prefix",
    ]);
    let body = until_status(&net, "/tls/", 200).await;
    assert!(body.contains("HTTP/1.1"), "{body}");
    assert!(
        body.contains(&format!("host={HOST}")),
        "the client's host reaches the origin: {body}"
    );
    net.ctl(&[
        "service",
        "update",
        "tls",
        "--origin",
        &format!("{url},h2,ca={ca}"),
    ]);
    let body = eventually(Duration::from_secs(15), || async {
        get(&net, "/tls/")
            .await
            .filter(|(s, b)| *s == 200 && b.contains("HTTP/2.0"))
            .map(|(_, b)| b)
    })
    .await
    .expect("the h2 update reached the edge");
    assert!(body.contains(&format!("host={HOST}")), "{body}");

    // The same origin verified against the system bundle (which did not sign it): refused.
    net.ctl(&["service", "create", "badtls", "--origin", &url]);
    net.ctl(&["mount", "add", &format!("{HOST}/badtls"), "badtls"]);
    let body = until_status(&net, "/badtls/", 502).await;
    assert!(body.contains("origin"), "{body}");

    // Two origins, one killed under load: no failed idempotent request.
    let mut two = Some(demo_app("127.0.3.2:7812", "two"));
    net.ctl(&[
        "service",
        "create",
        "pair",
        "--origin",
        "http://127.0.3.1:7811",
        "--origin",
        "http://127.0.3.2:7812",
    ]);
    net.ctl(&[
        "mount",
        "add",
        &format!("{HOST}/pair"),
        "pair",
        "--strip-prefix",
    ]);
    let seen = eventually(Duration::from_secs(15), || async {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            if let Some((200, b)) = get(&net, "/pair/").await {
                seen.insert(b.contains("\"two\""));
            }
        }
        (seen.len() == 2).then_some(())
    })
    .await;
    assert!(seen.is_some(), "both origins serve");

    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop_at = Instant::now() + Duration::from_secs(3);
    let ca = Arc::new(net.ca());
    let mut workers = Vec::new();
    for _ in 0..12 {
        let (ok, failed, ca) = (ok.clone(), failed.clone(), ca.clone());
        workers.push(tokio::spawn(async move {
            while Instant::now() < stop_at {
                match https_get(&ca, IAD, 8443, HOST, "/pair/", &[]).await {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failed
                        .lock()
                        .unwrap()
                        .push(format!("{} {}", r.status, r.text())),
                    Err(e) => failed.lock().unwrap().push(e.to_string()),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(two.take()); // SIGKILL
    for w in workers {
        w.await.unwrap();
    }
    let failed = std::mem::take(&mut *failed.lock().unwrap());
    let ok = ok.load(Ordering::Relaxed);
    assert!(ok > 100, "too little load to mean anything: {ok}");
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    let (status, body) = get(&net, "/pair/").await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("\"one\""), "{body}");
}
