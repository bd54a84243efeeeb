//! Request coalescing on a route with `--coalesce`: twenty identical concurrent GETs reach a slow
//! origin once and all get its answer; requests carrying a cookie are never coalesced.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use meridian_tests::dev::{DevNetwork, Proc, eventually, start_agent};

const EDGE_HTTP: &str = "127.0.0.12:8080";
const HOST: &str = "edge.meridian.test";

/// An HTTP/1.1 origin that counts requests for `/slow` and answers them after 400 ms.
async fn start_origin(hits: Arc<AtomicUsize>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let hits = hits.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let hits = hits.clone();
                        async move {
                            if req.method() == hyper::Method::POST {
                                let saw = req.headers().get("x-from-edge").cloned();
                                let n = match req.into_body().collect().await {
                                    Ok(b) => b.to_bytes().len().to_string(),
                                    Err(_) => "error".into(),
                                };
                                let mut resp = hyper::Response::new(Full::new(Bytes::from(n)));
                                resp.headers_mut().insert(
                                    "server",
                                    hyper::header::HeaderValue::from_static("origin"),
                                );
                                if let Some(v) = saw {
                                    resp.headers_mut().insert("x-saw", v);
                                }
                                return Ok::<_, Infallible>(resp);
                            }
                            if req.uri().path() == "/slow" {
                                hits.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(400)).await;
                            }
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(
                                Bytes::from_static(b"the one answer"),
                            )))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

async fn get(path: &str, cookie: Option<&str>) -> (u16, Bytes) {
    let tcp = tokio::net::TcpStream::connect(EDGE_HTTP).await.unwrap();
    let (mut s, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(c);
    let mut req = hyper::Request::get(path).header("host", HOST);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let resp = s
        .send_request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

async fn burst(n: usize, cookie: Option<&'static str>) {
    let calls: Vec<_> = (0..n)
        .map(|_| tokio::spawn(get("/coal/slow", cookie)))
        .collect();
    for c in calls {
        let (status, body) = c.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, "the one answer");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn identical_gets_share_one_origin_request() {
    let net = DevNetwork::start();
    let hits = Arc::new(AtomicUsize::new(0));
    let origin = start_origin(hits.clone()).await;
    net.ctl(&["service", "create", "coal"]);
    net.ctl(&[
        "mount",
        "add",
        &format!("{HOST}/coal"),
        "coal",
        "--strip-prefix",
        "--coalesce",
    ]);
    let token = net.ctl(&["token", "create", "coal"])["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let _agent = Proc(start_agent(
        &net,
        &token,
        "coal",
        &format!("http://{origin}"),
        &[],
    ));
    eventually(Duration::from_secs(30), || async {
        (get("/coal/ready", None).await.0 == 200).then_some(())
    })
    .await
    .expect("served within 30 s");

    burst(20, None).await;
    let coalesced = hits.swap(0, Ordering::SeqCst);
    eprintln!("20 identical concurrent GETs: {coalesced} origin request(s)");
    assert_eq!(coalesced, 1, "one origin request for 20 identical GETs");

    burst(10, Some("session=abc")).await;
    let with_cookie = hits.load(Ordering::SeqCst);
    eprintln!("10 concurrent GETs with a cookie: {with_cookie} origin requests");
    assert_eq!(with_cookie, 10, "credentialed requests are never coalesced");

    // Per-route header edits and a per-route body limit that also holds for a chunked body.
    net.ctl(&[
        "mount",
        "add",
        &format!("{HOST}/small"),
        "coal",
        "--strip-prefix",
        "--max-body",
        "1000",
        "--request-header",
        "x-from-edge:yes",
        "--response-header",
        "x-route:small",
        "--response-header-remove",
        "server",
    ]);
    let post = |n: usize| async move {
        let tcp = tokio::net::TcpStream::connect(EDGE_HTTP).await.unwrap();
        let (mut s, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(c);
        // A stream body: chunked, no Content-Length for the edge to check up front.
        let chunks =
            futures_util::stream::iter((0..n / 100).map(|_| {
                Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(vec![b'x'; 100])))
            }));
        let req = hyper::Request::post("/small/upload")
            .header("host", HOST)
            .body(http_body_util::StreamBody::new(chunks))
            .unwrap();
        let resp = s.send_request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        (
            parts,
            body.collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default(),
        )
    };
    let (ok, body) = eventually(Duration::from_secs(10), || async {
        let r = post(500).await;
        (r.0.status == 200).then_some(r)
    })
    .await
    .expect("small route served");
    assert_eq!(body, "500");
    assert_eq!(ok.headers["x-route"], "small");
    assert_eq!(
        ok.headers["x-saw"], "yes",
        "request header set by the route"
    );
    assert!(
        ok.headers.get("server").is_none(),
        "response header removed"
    );
    let (big, _) = post(2000).await;
    assert_eq!(big.status, 413, "chunked body over the route's limit");
}
