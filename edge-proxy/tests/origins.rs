//! Direct origins behind an edge fed injected snapshots: weighted round robin, cookie stickiness
//! (across two edges sharing a node token), active health checks, and concurrency limits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use coordinator_api::{
    ConcurrencyLimits, HealthCheck, LbPolicy, Mount, Origin, Service, Snapshot, StickyCookie,
};
use edge_proxy::{Config, Edge};
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A test origin: `/` answers its name, `/slow` after 400 ms, `/health` 200 or 503 by `healthy`.
struct TestOrigin {
    addr: SocketAddr,
    healthy: Arc<AtomicBool>,
    /// Requests other than health checks.
    hits: Arc<AtomicUsize>,
    /// `/` answers 500 while set.
    failing: Arc<AtomicBool>,
}

async fn origin(name: &'static str) -> TestOrigin {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let healthy = Arc::new(AtomicBool::new(true));
    let hits = Arc::new(AtomicUsize::new(0));
    let failing = Arc::new(AtomicBool::new(false));
    let (h, n, f) = (healthy.clone(), hits.clone(), failing.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (h, n, f) = (h.clone(), n.clone(), f.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (h, n, f) = (h.clone(), n.clone(), f.clone());
                    async move {
                        let path = req.uri().path().to_owned();
                        let mut resp = Response::new(Full::new(Bytes::from(name)));
                        match path.as_str() {
                            "/health" => {
                                if !h.load(Ordering::SeqCst) {
                                    *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                                }
                            }
                            "/slow" => {
                                n.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(400)).await;
                            }
                            _ => {
                                n.fetch_add(1, Ordering::SeqCst);
                                if f.load(Ordering::SeqCst) {
                                    *resp.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
                                }
                            }
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
    TestOrigin {
        addr,
        healthy,
        hits,
        failing,
    }
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Harness {
    http: SocketAddr,
    admin: SocketAddr,
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
    _shutdown: tokio_util::sync::DropGuard,
    _dir: TempDir,
}

async fn edge(snap: Snapshot, node_token: Option<&str>) -> Harness {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = std::env::temp_dir().join(format!("edge-origins-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    let mut config = Config::new("eu", "127.0.0.1:0".parse().unwrap());
    config.id = "edge-test".into();
    config.http_listen = Some("127.0.0.1:0".parse().unwrap());
    config.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    config.tls_cert = Some(dir.join("cert.pem"));
    config.tls_key = Some(dir.join("key.pem"));
    config.node_token = node_token.map(str::to_owned);
    let edge = Edge::bind(config).await.unwrap();
    let http = edge.http_addr().unwrap();
    let admin = edge.admin_addr().unwrap();
    let (tx, rx) = watch::channel(Some(Arc::new(snap)));
    let shutdown = CancellationToken::new();
    tokio::spawn(edge.serve(rx, shutdown.clone()));
    Harness {
        http,
        admin,
        snapshots: tx,
        _shutdown: shutdown.drop_guard(),
        _dir: TempDir(dir),
    }
}

fn snapshot(svc: Service) -> Snapshot {
    Snapshot {
        revision: 1,
        // From JSON, so the mount's other (defaulted) fields need not be named here.
        mounts: vec![
            serde_json::from_value::<Mount>(serde_json::json!({
                "host": "app.test",
                "path_prefix": "/",
                "service": svc.name,
            }))
            .unwrap(),
        ],
        services: vec![svc],
        ..Default::default()
    }
}

fn origins(list: &[(&TestOrigin, u32)]) -> Vec<Origin> {
    list.iter()
        .map(|(o, w)| Origin {
            url: format!("http://{}", o.addr),
            weight: Some(*w),
            ..Default::default()
        })
        .collect()
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One `GET path` on a fresh connection (`Connection: close`), with extra header lines.
async fn get(addr: SocketAddr, path: &str, extra: &str) -> Resp {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: app.test\r\n{extra}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Resp {
        status,
        headers,
        body: body.to_owned(),
    }
}

async fn tally(addr: SocketAddr, n: usize, extra: &str) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for _ in 0..n {
        let r = get(addr, "/", extra).await;
        assert_eq!(r.status, 200, "{r:?}");
        *out.entry(r.body).or_default() += 1;
    }
    out
}

#[tokio::test]
async fn weighted_round_robin_follows_origin_weights() {
    let (a, b) = (origin("a").await, origin("b").await);
    let h = edge(
        snapshot(Service {
            name: "web".into(),
            lb_policy: LbPolicy::WeightedRoundRobin,
            origins: origins(&[(&a, 3), (&b, 1)]),
            ..Default::default()
        }),
        None,
    )
    .await;
    let t = tally(h.http, 40, "").await;
    assert_eq!(t.get("a"), Some(&30), "{t:?}");
    assert_eq!(t.get("b"), Some(&10), "{t:?}");
}

fn sticky_service(list: &[&TestOrigin]) -> Service {
    Service {
        name: "web".into(),
        lb_policy: LbPolicy::RoundRobin,
        origins: origins(&list.iter().map(|o| (*o, 1)).collect::<Vec<_>>()),
        sticky: Some(StickyCookie { name: "mrd".into() }),
        ..Default::default()
    }
}

/// The `name=value` part of a Set-Cookie.
fn cookie(r: &Resp) -> String {
    let c = r.header("set-cookie").expect("a sticky cookie is set");
    assert!(c.contains("HttpOnly") && c.contains("Path=/"), "{c}");
    c.split(';').next().unwrap().to_owned()
}

#[tokio::test]
async fn sticky_cookie_holds_across_edges_and_falls_back_when_the_backend_goes() {
    let (a, b) = (origin("a").await, origin("b").await);
    // Without stickiness round robin alternates.
    let h1 = edge(snapshot(sticky_service(&[&a, &b])), Some("node-secret")).await;
    let h2 = edge(snapshot(sticky_service(&[&a, &b])), Some("node-secret")).await;
    let first = get(h1.http, "/", "").await;
    let c = cookie(&first);
    let mine = first.body.clone();
    let with = format!("Cookie: other=1; {c}\r\n");
    for h in [&h1, &h2] {
        let t = tally(h.http, 8, &with).await;
        assert_eq!(
            t.get(&mine),
            Some(&8),
            "the cookie pins the backend on every edge: {t:?}"
        );
    }
    // A request that already names its backend gets no new cookie.
    assert!(
        get(h1.http, "/", &with)
            .await
            .header("set-cookie")
            .is_none()
    );

    // A forged cookie is ignored (round robin again) and replaced.
    let other = if mine == "a" { "b" } else { "a" };
    let flip = if c.ends_with('0') { '1' } else { '0' };
    let forged = format!("Cookie: {}{flip}\r\n", &c[..c.len() - 1]);
    let t = tally(h1.http, 8, &forged).await;
    assert_eq!(t.len(), 2, "forged cookie not honoured: {t:?}");

    // An edge with another secret does not honour it either.
    let h3 = edge(snapshot(sticky_service(&[&a, &b])), Some("another")).await;
    assert_eq!(tally(h3.http, 8, &with).await.len(), 2);

    // The backend leaves: the client falls back to the other one and is re-pinned there.
    let remaining = if mine == "a" { &b } else { &a };
    h1.snapshots
        .send(Some(Arc::new(snapshot(sticky_service(&[remaining])))))
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let r = get(h1.http, "/", &with).await;
            if r.body == other {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_ne!(cookie(&r), c, "re-pinned to the remaining backend");
}

#[tokio::test]
async fn health_checks_take_an_origin_out_and_rise_brings_it_back() {
    let (a, b) = (origin("a").await, origin("b").await);
    let h = edge(
        snapshot(Service {
            name: "web".into(),
            lb_policy: LbPolicy::RoundRobin,
            origins: origins(&[(&a, 1), (&b, 1)]),
            health_check: Some(HealthCheck {
                path: "/health".into(),
                interval_ms: 100,
                timeout_ms: 100,
                rise: 2,
                fall: 2,
            }),
            ..Default::default()
        }),
        None,
    )
    .await;
    assert_eq!(tally(h.http, 10, "").await.len(), 2, "both serve");
    b.healthy.store(false, Ordering::SeqCst);
    // Two failed probes (~200 ms) take b out.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = b.hits.load(Ordering::SeqCst);
    let t = tally(h.http, 20, "").await;
    assert_eq!(t.get("a"), Some(&20), "{t:?}");
    assert_eq!(
        b.hits.load(Ordering::SeqCst),
        before,
        "no traffic to a failing origin"
    );
    b.healthy.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        tally(h.http, 10, "").await.get("b"),
        Some(&5),
        "back after rise"
    );
}

#[tokio::test]
async fn hard_limit_is_503_and_soft_limit_prefers_another_backend() {
    let (a, b) = (origin("a").await, origin("b").await);
    // Hard: one slow request in flight on the only origin; the next is refused with a clear body.
    let h = edge(
        snapshot(Service {
            name: "web".into(),
            origins: origins(&[(&a, 1)]),
            concurrency: Some(ConcurrencyLimits {
                soft: None,
                hard: Some(1),
            }),
            ..Default::default()
        }),
        None,
    )
    .await;
    let addr = h.http;
    let slow = tokio::spawn(async move { get(addr, "/slow", "").await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let r = get(h.http, "/", "").await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("concurrency limit"), "{r:?}");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(slow.await.unwrap().status, 200);
    assert_eq!(get(h.http, "/", "").await.status, 200, "free again");

    // Soft: a takes nearly everything by weight, but while it is at its soft limit the others go
    // to b.
    let h = edge(
        snapshot(Service {
            name: "web".into(),
            lb_policy: LbPolicy::WeightedRoundRobin,
            origins: origins(&[(&a, 100), (&b, 1)]),
            concurrency: Some(ConcurrencyLimits {
                soft: Some(1),
                hard: None,
            }),
            ..Default::default()
        }),
        None,
    )
    .await;
    let addr = h.http;
    let slow = tokio::spawn(async move { get(addr, "/slow", "").await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let t = tally(h.http, 5, "").await;
    assert_eq!(t.get("b"), Some(&5), "{t:?}");
    assert_eq!(slow.await.unwrap().body, "a");
    assert_eq!(
        tally(h.http, 5, "").await.get("a"),
        Some(&5),
        "a again once free"
    );
}

#[tokio::test]
async fn circuit_breaker_opens_then_a_half_open_probe_closes_it() {
    let (a, b) = (origin("a").await, origin("b").await);
    let h = edge(
        snapshot(Service {
            name: "web".into(),
            lb_policy: LbPolicy::RoundRobin,
            origins: origins(&[(&a, 1), (&b, 1)]),
            circuit_breaker: Some(coordinator_api::CircuitBreaker {
                failures: 2,
                open_ms: 400,
                half_open_probes: 1,
            }),
            ..Default::default()
        }),
        None,
    )
    .await;
    assert_eq!(tally(h.http, 4, "").await.len(), 2, "both serve");
    a.failing.store(true, Ordering::SeqCst);
    // Round robin sends a its share until two 500s in a row open its breaker (passive ejection
    // would need five).
    let mut errors = 0;
    for _ in 0..4 {
        if get(h.http, "/", "").await.status == 500 {
            errors += 1;
        }
    }
    assert_eq!(errors, 2);
    let before = a.hits.load(Ordering::SeqCst);
    let t = tally(h.http, 10, "").await;
    assert_eq!(t.get("b"), Some(&10), "{t:?}");
    assert_eq!(
        a.hits.load(Ordering::SeqCst),
        before,
        "an open breaker sends nothing"
    );

    // Recovered: after the open period one probe goes through, succeeds, and closes it.
    a.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(450)).await;
    let t = tally(h.http, 10, "").await;
    assert!(t.get("a").copied().unwrap_or(0) >= 4, "closed again: {t:?}");
}

/// The edge's `/metrics` body.
async fn metrics(h: &Harness) -> String {
    let mut s = tokio::net::TcpStream::connect(h.admin).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

/// The value of the sample `series` (name and labels exactly as rendered).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Polls `/metrics` until `series` has `value` (a health verdict lands on the check's clock).
async fn wait_sample(h: &Harness, series: &str, value: f64) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = metrics(h).await;
        if sample(&m, series) == Some(value) {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} never became {value}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_show_backend_health_breaker_state_and_pool_reuse() {
    let (a, b) = (origin("a").await, origin("b").await);
    let h = edge(
        snapshot(Service {
            name: "web".into(),
            lb_policy: LbPolicy::RoundRobin,
            origins: origins(&[(&a, 1), (&b, 1)]),
            health_check: Some(HealthCheck {
                path: "/health".into(),
                interval_ms: 50,
                timeout_ms: 50,
                rise: 1,
                fall: 2,
            }),
            circuit_breaker: Some(coordinator_api::CircuitBreaker {
                failures: 2,
                open_ms: 60_000,
                half_open_probes: 1,
            }),
            ..Default::default()
        }),
        None,
    )
    .await;
    let label = |o: &TestOrigin| {
        format!(
            "service=\"web\",backend=\"http://{}\",kind=\"origin\"",
            o.addr
        )
    };
    let (la, lb) = (label(&a), label(&b));
    assert_eq!(tally(h.http, 20, "").await.len(), 2, "both serve");
    let m = metrics(&h).await;
    for o in [&la, &lb] {
        assert_eq!(
            sample(&m, &format!("meridian_edge_backend_healthy{{{o}}}")),
            Some(1.0),
            "{m}"
        );
        assert_eq!(
            sample(
                &m,
                &format!("meridian_edge_backend_circuit_state{{{o},state=\"closed\"}}")
            ),
            Some(1.0),
            "{m}"
        );
    }
    // Twenty requests (plus health checks) over keep-alive connections: a handful opened, the
    // rest reused.
    let opened = sample(
        &m,
        "meridian_edge_upstream_connections_opened_total{pool=\"origin_h1\"}",
    )
    .unwrap();
    let new = sample(
        &m,
        "meridian_edge_upstream_requests_total{pool=\"origin_h1\",connection=\"new\"}",
    )
    .unwrap();
    let reused = sample(
        &m,
        "meridian_edge_upstream_requests_total{pool=\"origin_h1\",connection=\"reused\"}",
    )
    .unwrap();
    assert!((1.0..=6.0).contains(&opened), "{m}");
    assert!(new <= opened, "{m}");
    assert!(reused >= 20.0 - opened, "{m}");

    // b fails its checks: unhealthy on /metrics, as it is for routing.
    b.healthy.store(false, Ordering::SeqCst);
    let m = wait_sample(&h, &format!("meridian_edge_backend_healthy{{{lb}}}"), 0.0).await;
    assert_eq!(
        sample(&m, &format!("meridian_edge_backend_check_passing{{{lb}}}")),
        Some(0.0)
    );
    assert_eq!(
        sample(&m, &format!("meridian_edge_backend_healthy{{{la}}}")),
        Some(1.0)
    );

    // a answers 500 twice: its breaker opens.
    a.failing.store(true, Ordering::SeqCst);
    for _ in 0..2 {
        assert_eq!(get(h.http, "/", "").await.status, 500);
    }
    let m = metrics(&h).await;
    assert_eq!(
        sample(
            &m,
            &format!("meridian_edge_backend_circuit_state{{{la},state=\"open\"}}")
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            &format!("meridian_edge_backend_circuit_state{{{la},state=\"closed\"}}")
        ),
        Some(0.0)
    );
    b.healthy.store(true, Ordering::SeqCst);
    wait_sample(&h, &format!("meridian_edge_backend_healthy{{{lb}}}"), 1.0).await;
}

/// An origin for bodies and upgrades: `POST` streams its body back, `/ws` switches to an echo of
/// raw bytes, anything else answers `get`. Counts the connections it accepted.
async fn echo_origin() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let svc =
                hyper::service::service_fn(|mut req: Request<hyper::body::Incoming>| async move {
                    use http_body_util::BodyExt;
                    if req.uri().path() == "/ws" {
                        let up = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            let mut io = TokioIo::new(up.await.unwrap());
                            let mut b = [0u8; 64];
                            let n = io.read(&mut b).await.unwrap();
                            io.write_all(&b[..n]).await.unwrap();
                        });
                        let mut resp = Response::new(
                            Full::new(Bytes::new())
                                .map_err(|never| match never {})
                                .boxed(),
                        );
                        *resp.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
                        resp.headers_mut()
                            .insert("upgrade", "echo".parse().unwrap());
                        resp.headers_mut()
                            .insert("connection", "upgrade".parse().unwrap());
                        return Ok::<_, Infallible>(resp);
                    }
                    if req.method() == hyper::Method::POST {
                        return Ok(Response::new(req.into_body().boxed()));
                    }
                    Ok(Response::new(
                        Full::new(Bytes::from_static(b"get"))
                            .map_err(|never| match never {})
                            .boxed(),
                    ))
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades(),
            );
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn uploads_and_upgrades_reach_a_direct_origin_over_one_pool() {
    use http_body_util::BodyExt;
    let (addr, accepted) = echo_origin().await;
    let h = edge(
        snapshot(Service {
            name: "web".into(),
            origins: vec![Origin {
                url: format!("http://{addr}"),
                ..Default::default()
            }],
            ..Default::default()
        }),
        None,
    )
    .await;
    let tcp = tokio::net::TcpStream::connect(h.http).await.unwrap();
    let (mut client, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let get = |path: &str| {
        Request::get(path)
            .header("host", "app.test")
            .body(
                http_body_util::Empty::<Bytes>::new()
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .unwrap()
    };
    let r = client.send_request(get("/")).await.unwrap();
    assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), "get");

    // 4 MiB streamed up in 64 KiB frames and streamed back.
    let chunk = Bytes::from((0..65_536).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let frames = (0..64).map(move |_| Ok::<_, Infallible>(hyper::body::Frame::data(chunk.clone())));
    let upload = http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed();
    let req = Request::post("/echo")
        .header("host", "app.test")
        .body(upload.map_err(|never| match never {}).boxed())
        .unwrap();
    let r = client.send_request(req).await.unwrap();
    assert_eq!(r.status(), 200);
    let back = r.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(back.len(), 64 * 65_536);
    assert!(
        back.iter()
            .enumerate()
            .all(|(i, &b)| b == ((i % 65_536) % 251) as u8)
    );

    // A small form post (read whole, then sent with its head).
    let req = Request::post("/form")
        .header("host", "app.test")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(
            http_body_util::Full::new(Bytes::from_static(b"a=1&b=2"))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap();
    let r = client.send_request(req).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), "a=1&b=2");

    let r = client.send_request(get("/")).await.unwrap();
    assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), "get");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "the GETs and both uploads share one pooled origin connection"
    );

    // An upgrade: the origin's raw bytes come back through the edge.
    let mut s = tokio::net::TcpStream::connect(h.http).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let head = common::read_head(&mut s).await;
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    s.write_all(b"ping to a direct origin").await.unwrap();
    let mut got = [0u8; 23];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"ping to a direct origin");
}
