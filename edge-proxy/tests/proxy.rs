//! End to end: an edge fed an injected snapshot, a fake agent speaking the tunnel protocol over
//! quinn, and raw HTTP/1.1 clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use coordinator_api::{AgentTokenRecord, Mount, Service, Snapshot, token};
use edge_proxy::{Config, Edge};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tunnel_proto::{Decoder, Frame, RequestHead, ResponseHead};

const GOOD_TOKEN: &str = "mrd_agent_t1_goodsecret";
const API_TOKEN: &str = "mrd_agent_t2_apisecret";

fn snapshot() -> Snapshot {
    let svc = |n: &str| Service {
        name: n.into(),
        lb_policy: Default::default(),
        ..Default::default()
    };
    let tok = |id: &str, service: &str, secret: &str| AgentTokenRecord {
        id: id.into(),
        service: service.into(),
        sha256: token::sha256_hex(secret),
        created_at_ms: 0,
    };
    Snapshot {
        revision: 1,
        services: vec![svc("web"), svc("api")],
        mounts: vec![
            Mount {
                host: "app.test".into(),
                path_prefix: "/demo".into(),
                service: "web".into(),
                strip_prefix: true,
                ..Default::default()
            },
            Mount {
                host: "app.test".into(),
                path_prefix: "/api".into(),
                service: "api".into(),
                strip_prefix: false,
                ..Default::default()
            },
        ],
        agent_tokens: vec![tok("t1", "web", GOOD_TOKEN), tok("t2", "api", API_TOKEN)],
        ..Default::default()
    }
}

struct Harness {
    admin: Option<SocketAddr>,
    http: SocketAddr,
    https: SocketAddr,
    tunnel: SocketAddr,
    cert: CertificateDer<'static>,
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), edge_proxy::Error>>,
    _dir: TempDir,
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start(snap: Option<Snapshot>) -> Harness {
    start_with(snap, |_| {}).await
}

async fn start_with(snap: Option<Snapshot>, tweak: impl FnOnce(&mut Config)) -> Harness {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let dir = std::env::temp_dir().join(format!("edge-proxy-test-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, ck.cert.pem()).unwrap();
    std::fs::write(&key_path, ck.signing_key.serialize_pem()).unwrap();

    let mut config = Config::new("eu", "127.0.0.1:0".parse().unwrap());
    config.id = "edge-test".into();
    config.http_listen = Some("127.0.0.1:0".parse().unwrap());
    config.https_listen = Some("127.0.0.1:0".parse().unwrap());
    config.tls_cert = Some(cert_path);
    config.tls_key = Some(key_path);
    tweak(&mut config);
    let edge = Edge::bind(config).await.unwrap();
    let admin = edge.admin_addr();
    let http = edge.http_addr().unwrap();
    let https = edge.https_addr().unwrap();
    let tunnel = edge.tunnel_addr().unwrap();
    assert_eq!(
        edge.info().tunnel_addr.as_deref(),
        Some(tunnel.to_string().as_str())
    );
    let (tx, rx) = watch::channel(snap.map(Arc::new));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(edge.serve(rx, shutdown.clone()));
    Harness {
        admin,
        http,
        https,
        tunnel,
        cert: ck.cert.der().clone(),
        snapshots: tx,
        shutdown,
        task,
        _dir: TempDir(dir),
    }
}

// ---------------------------------------------------------------- fake agent

struct Reader {
    recv: quinn::RecvStream,
    decoder: Decoder,
    buf: BytesMut,
}

impl Reader {
    fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            decoder: Decoder::new(),
            buf: BytesMut::new(),
        }
    }

    async fn fill(&mut self) -> bool {
        match self.recv.read_chunk(64 * 1024, true).await {
            Ok(Some(c)) => {
                self.buf.extend_from_slice(&c.bytes);
                true
            }
            _ => false,
        }
    }

    async fn preamble(&mut self) {
        loop {
            if tunnel_proto::decode_preamble(&mut self.buf)
                .unwrap()
                .is_some()
            {
                return;
            }
            assert!(self.fill().await, "stream ended before the preamble");
        }
    }

    async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = self.decoder.decode(&mut self.buf).unwrap() {
                return Some(f);
            }
            if !self.fill().await {
                return None;
            }
        }
    }
}

async fn write(send: &mut quinn::SendStream, frame: &Frame) {
    let mut buf = BytesMut::new();
    tunnel_proto::encode(frame, &mut buf).unwrap();
    send.write_all(&buf).await.unwrap();
}

struct Agent {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    control_send: quinn::SendStream,
    control: Reader,
    reply: Frame,
}

async fn connect_agent(h: &Harness, token: &str, services: &[&str]) -> Agent {
    connect_agent_as(h, "agent-1", token, services).await
}

async fn connect_agent_as(h: &Harness, id: &str, token: &str, services: &[&str]) -> Agent {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(h.cert.clone()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![tunnel_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut client_cfg = quinn::ClientConfig::new(Arc::new(crypto));
    client_cfg.transport_config(Arc::new(edge_proxy::transport_config()));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_cfg);
    let conn = endpoint
        .connect(h.tunnel, "localhost")
        .unwrap()
        .await
        .unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    write(
        &mut send,
        &Frame::Hello {
            version: tunnel_proto::VERSION,
            token: token.into(),
            agent_id: id.into(),
            services: services.iter().map(|s| s.to_string()).collect(),
        },
    )
    .await;
    let mut control = Reader::new(recv);
    let reply = tokio::time::timeout(Duration::from_secs(5), control.next())
        .await
        .expect("edge answers Hello")
        .expect("a reply frame");
    Agent {
        _endpoint: endpoint,
        conn,
        control_send: send,
        control,
        reply,
    }
}

fn header<'a>(h: &'a RequestHead, name: &str) -> Option<&'a str> {
    h.headers
        .iter()
        .find(|(n, _)| n.as_ref() == name.as_bytes())
        .map(|(_, v)| std::str::from_utf8(v).unwrap())
}

/// Serves data streams: echoes what it saw in headers and the body, or switches to a raw echo
/// on an upgrade request. Returns how many streams (requests) reached the agent.
fn serve_streams(conn: quinn::Connection) -> Arc<AtomicUsize> {
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut send, recv)) = conn.accept_bi().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut r = Reader::new(recv);
                r.preamble().await;
                let Some(Frame::RequestHead(head)) = r.next().await else {
                    panic!("expected a request head")
                };
                let mut body_len = 0usize;
                loop {
                    match r.next().await {
                        Some(Frame::Data(d)) => {
                            assert!(d.len() <= 64 * 1024);
                            body_len += d.len();
                        }
                        Some(Frame::Trailers(_)) => {}
                        Some(Frame::End) => break,
                        other => panic!("unexpected {other:?}"),
                    }
                }
                let h = |n: &str| Bytes::from(header(&head, n).unwrap_or("-").to_owned());
                if head.uri.ends_with(b"/slow") {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if head.uri.ends_with(b"/hang") {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return;
                }
                if head.uri.ends_with(b"/fail") {
                    write(
                        &mut send,
                        &Frame::Error {
                            code: 502,
                            message: "origin refused the connection".into(),
                        },
                    )
                    .await;
                    let _ = send.finish();
                    return;
                }
                if header(&head, "upgrade").is_some() {
                    write(
                        &mut send,
                        &Frame::ResponseHead(ResponseHead {
                            status: 101,
                            headers: vec![
                                (Bytes::from_static(b"upgrade"), Bytes::from_static(b"echo")),
                                (
                                    Bytes::from_static(b"connection"),
                                    Bytes::from_static(b"upgrade"),
                                ),
                            ],
                        }),
                    )
                    .await;
                    // Raw echo from here on.
                    if !r.buf.is_empty() {
                        send.write_all(&r.buf).await.unwrap();
                    }
                    let mut recv = r.recv;
                    let _ = tokio::io::copy(&mut recv, &mut send).await;
                    let _ = send.finish();
                    return;
                }
                let body = format!(
                    "{} {} body={}",
                    String::from_utf8_lossy(&head.method),
                    String::from_utf8_lossy(&head.uri),
                    body_len
                );
                write(
                    &mut send,
                    &Frame::ResponseHead(ResponseHead {
                        status: 200,
                        headers: vec![
                            (
                                Bytes::from_static(b"content-type"),
                                Bytes::from_static(b"text/plain"),
                            ),
                            (Bytes::from_static(b"x-seen-xff"), h("x-forwarded-for")),
                            (Bytes::from_static(b"x-seen-proto"), h("x-forwarded-proto")),
                            (Bytes::from_static(b"x-seen-host"), h("host")),
                            (
                                Bytes::from_static(b"x-seen-fwd-host"),
                                h("x-forwarded-host"),
                            ),
                            (Bytes::from_static(b"x-seen-request-id"), h("x-request-id")),
                            (Bytes::from_static(b"x-seen-via"), h("via")),
                            (Bytes::from_static(b"x-seen-connection"), h("connection")),
                            (
                                Bytes::from_static(b"connection"),
                                Bytes::from_static(b"x-hop"),
                            ),
                        ],
                    }),
                )
                .await;
                write(&mut send, &Frame::Data(Bytes::from(body))).await;
                write(&mut send, &Frame::End).await;
                let _ = send.finish();
            });
        }
    });
    seen
}

// ---------------------------------------------------------------- raw HTTP/1.1 client

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

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(i) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..i]).unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + size]);
        b = &b[i + 2 + size + 2..];
    }
}

fn parse(raw: &[u8]) -> Resp {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(raw)));
    let head = std::str::from_utf8(&raw[..end]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let body = &raw[end + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_vec()
    };
    Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Sends raw bytes on a fresh connection and reads until the server closes.
async fn raw(addr: SocketAddr, request: &[u8]) -> Resp {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("response in time")
        .unwrap();
    parse(&buf)
}

async fn get(addr: SocketAddr, host: &str, path: &str) -> Resp {
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

fn assert_stamped(r: &Resp) {
    assert_eq!(r.header("meridian-region"), Some("eu"), "{r:?}");
    assert_eq!(r.header("meridian-edge"), Some("edge-test"), "{r:?}");
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn proxies_to_agent_with_forwarding_headers() {
    let h = start(Some(snapshot())).await;
    let agent = connect_agent(&h, GOOD_TOKEN, &["web"]).await;
    let Frame::Welcome {
        edge_id, region, ..
    } = &agent.reply
    else {
        panic!("expected Welcome, got {:?}", agent.reply)
    };
    assert_eq!((edge_id.as_str(), region.as_str()), ("edge-test", "eu"));
    serve_streams(agent.conn.clone());

    let r = get(h.http, "App.Test:8080", "/demo/hello?x=1").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "GET /hello?x=1 body=0");
    assert_eq!(r.header("x-seen-xff"), Some("127.0.0.1"));
    assert_eq!(r.header("x-seen-proto"), Some("http"));
    assert_eq!(r.header("x-seen-host"), Some("App.Test:8080"));
    assert_eq!(r.header("x-seen-fwd-host"), Some("App.Test:8080"));
    assert_eq!(r.header("x-seen-via"), Some("1.1 meridian"));
    assert_eq!(r.header("x-seen-request-id").map(str::len), Some(32));
    assert_eq!(
        r.header("x-seen-connection"),
        Some("-"),
        "hop-by-hop header leaked"
    );
    assert!(r.header("x-hop").is_none());
    assert_stamped(&r);

    // Client-chosen request id is kept; XFF is appended to.
    let r = raw(
        h.http,
        b"GET /demo HTTP/1.1\r\nHost: app.test\r\nX-Request-Id: abc\r\nX-Forwarded-For: 198.51.100.9\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "GET / body=0");
    assert_eq!(r.header("x-seen-request-id"), Some("abc"));
    assert_eq!(r.header("x-seen-xff"), Some("198.51.100.9, 127.0.0.1"));

    // A streamed request body larger than one frame, chunked by the client.
    let big = vec![b'x'; 300 * 1024];
    let mut req = b"POST /demo/upload HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for part in big.chunks(100 * 1024) {
        req.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        req.extend_from_slice(part);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let r = raw(h.http, &req).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, format!("POST /upload body={}", big.len()));

    h.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), h.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn unknown_mount_is_404_and_no_agent_is_503() {
    let h = start(Some(snapshot())).await;
    let r = get(h.http, "app.test", "/demox").await;
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.body.contains("no route"), "{r:?}");
    assert_stamped(&r);
    let r = get(h.http, "unknown.test", "/demo").await;
    assert_eq!(r.status, 404, "{r:?}");

    // Absolute-form for a host we do not serve: never an open proxy.
    let r = raw(
        h.http,
        b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 404, "{r:?}");
    let r = raw(
        h.http,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 405, "{r:?}");
    assert_stamped(&r);

    let r = get(h.http, "app.test", "/api/x").await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(
        r.body.contains("no agent connected for service api"),
        "{r:?}"
    );
    assert_stamped(&r);
}

#[tokio::test]
async fn bad_tokens_are_rejected_while_a_good_agent_serves() {
    let h = start(Some(snapshot())).await;
    let good = connect_agent(&h, GOOD_TOKEN, &["web"]).await;
    assert!(
        matches!(good.reply, Frame::Welcome { .. }),
        "{:?}",
        good.reply
    );
    serve_streams(good.conn.clone());

    let bad = connect_agent(&h, "mrd_agent_t1_wrong", &["web"]).await;
    assert_eq!(
        bad.reply,
        Frame::Reject {
            reason: "invalid agent token".into()
        }
    );
    // A valid token of another service cannot claim this one.
    let cross = connect_agent(&h, API_TOKEN, &["web"]).await;
    assert!(
        matches!(&cross.reply, Frame::Reject { reason } if reason.contains("api")),
        "{:?}",
        cross.reply
    );
    tokio::time::timeout(Duration::from_secs(5), bad.conn.closed())
        .await
        .unwrap();

    let r = get(h.http, "app.test", "/demo/ok").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "GET /ok body=0");
}

#[tokio::test]
async fn no_snapshot_means_reject() {
    let h = start(None).await;
    let a = connect_agent(&h, GOOD_TOKEN, &["web"]).await;
    assert_eq!(
        a.reply,
        Frame::Reject {
            reason: "edge has no configuration yet".into()
        }
    );
    let r = get(h.http, "app.test", "/demo").await;
    assert_eq!(r.status, 404, "{r:?}");
}

#[tokio::test]
async fn revoked_token_gets_goaway() {
    let h = start(Some(snapshot())).await;
    let mut a = connect_agent(&h, GOOD_TOKEN, &["web"]).await;
    assert!(matches!(a.reply, Frame::Welcome { .. }));
    serve_streams(a.conn.clone());
    // Heartbeats are answered.
    write(&mut a.control_send, &Frame::Heartbeat { seq: 7 }).await;
    assert_eq!(a.control.next().await, Some(Frame::HeartbeatAck { seq: 7 }));
    assert_eq!(get(h.http, "app.test", "/demo").await.status, 200);

    let mut snap = snapshot();
    snap.revision = 2;
    snap.agent_tokens.retain(|t| t.service != "web");
    h.snapshots.send_replace(Some(Arc::new(snap)));
    let f = tokio::time::timeout(Duration::from_secs(5), a.control.next())
        .await
        .unwrap();
    assert_eq!(
        f,
        Some(Frame::GoAway {
            reason: "token revoked".into()
        })
    );
    tokio::time::timeout(Duration::from_secs(5), a.conn.closed())
        .await
        .unwrap();
    let r = get(h.http, "app.test", "/demo").await;
    assert_eq!(r.status, 503, "{r:?}");
}

#[tokio::test]
async fn oversized_headers_get_431_and_the_edge_keeps_serving() {
    let h = start(Some(snapshot())).await;
    let a = connect_agent(&h, GOOD_TOKEN, &["web"]).await;
    serve_streams(a.conn.clone());

    let big = "a".repeat(70 * 1024);
    let r = raw(
        h.http,
        format!(
            "GET /demo HTTP/1.1\r\nHost: app.test\r\nX-Big: {big}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(r.status, 431, "{r:?}");

    let mut many = String::from("GET /demo HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n");
    for i in 0..120 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let r = raw(h.http, many.as_bytes()).await;
    assert_eq!(r.status, 431, "{r:?}");

    let r = raw(h.http, b"GARBAGE\r\n\r\n").await;
    assert_eq!(r.status / 100, 4, "{r:?}");

    let r = get(h.http, "app.test", "/demo/after").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "GET /after body=0");
}

#[tokio::test]
async fn upgrade_becomes_a_raw_byte_stream() {
    let h = start(Some(snapshot())).await;
    let a = connect_agent(&h, GOOD_TOKEN, &["web"]).await;
    serve_streams(a.conn.clone());

    let mut s = TcpStream::connect(h.http).await.unwrap();
    s.write_all(
        b"GET /demo/ws HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let head = common::read_head(&mut s).await;
    let resp = parse(&head);
    assert_eq!(resp.status, 101, "{resp:?}");
    assert_eq!(resp.header("upgrade"), Some("echo"));
    assert_stamped(&resp);
    s.write_all(b"ping over the tunnel").await.unwrap();
    let mut got = [0u8; 20];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"ping over the tunnel");
}

#[tokio::test]
async fn https_with_http2_routes_on_authority() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let h = start(Some(snapshot())).await;
    let a = connect_agent(&h, GOOD_TOKEN, &["web"]).await;
    serve_streams(a.conn.clone());

    let mut roots = rustls::RootCertStore::empty();
    roots.add(h.cert.clone()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(h.https).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);

    for (path, status) in [("/demo/h2?q=1", 200), ("/nope", 404)] {
        let req = http::Request::get(format!("https://app.test{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), status);
        assert_eq!(resp.headers()["meridian-region"], "eu");
        if status == 200 {
            assert_eq!(resp.headers()["x-seen-proto"], "https");
            assert_eq!(resp.headers()["x-seen-host"], "app.test");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"GET /h2?q=1 body=0");
        }
    }
}

#[tokio::test]
async fn agent_error_is_502_and_drain_stops_routing() {
    let h = start(Some(snapshot())).await;
    let mut a = connect_agent(&h, GOOD_TOKEN, &["web"]).await;
    serve_streams(a.conn.clone());

    let r = get(h.http, "app.test", "/demo/fail").await;
    assert_eq!(r.status, 502, "{r:?}");
    assert!(r.body.contains("origin refused the connection"), "{r:?}");
    assert_stamped(&r);

    write(&mut a.control_send, &Frame::Drain).await;
    // Heartbeat round trip: once acked, the Drain before it has been processed.
    write(&mut a.control_send, &Frame::Heartbeat { seq: 1 }).await;
    // The edge may acknowledge the Drain (GoAway) before the heartbeat ack.
    loop {
        match a.control.next().await {
            Some(Frame::HeartbeatAck { seq: 1 }) => break,
            Some(Frame::GoAway { .. }) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
    let r = get(h.http, "app.test", "/demo").await;
    assert_eq!(r.status, 503, "{r:?}");
}

#[tokio::test]
async fn smuggling_requests_get_400_and_nothing_reaches_the_origin() {
    let h = start(Some(snapshot())).await;
    let a = connect_agent(&h, GOOD_TOKEN, &["web"]).await;
    let seen = serve_streams(a.conn.clone());

    let cases: &[(&str, &str)] = &[
        (
            "CL then TE",
            "POST /demo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX",
        ),
        (
            "TE then CL",
            "POST /demo HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\nX",
        ),
        (
            "duplicate equal CL",
            "POST /demo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nX",
        ),
        (
            "duplicate different CL",
            "POST /demo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nXY",
        ),
        (
            "CL list",
            "POST /demo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1, 1\r\n\r\nX",
        ),
        (
            "invalid CL",
            "POST /demo HTTP/1.1\r\nHost: app.test\r\nContent-Length: +1\r\n\r\nX",
        ),
        (
            "negative CL",
            "POST /demo HTTP/1.1\r\nHost: app.test\r\nContent-Length: -1\r\n\r\nX",
        ),
        (
            "TE not ending in chunked",
            "POST /demo HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        ),
        (
            "TE on HTTP/1.0",
            "POST /demo HTTP/1.0\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "obsolete line folding",
            "GET /demo HTTP/1.1\r\nHost: app.test\r\nX-Folded: a\r\n b\r\n\r\n",
        ),
        (
            "space before colon",
            "GET /demo HTTP/1.1\r\nHost: app.test\r\nContent-Length : 0\r\n\r\n",
        ),
    ];
    for (name, req) in cases {
        let r = raw(h.http, req.as_bytes()).await;
        assert_eq!(r.status, 400, "{name}: {r:?}");
    }
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "nothing may reach the origin"
    );

    // Pipelined: the honest request is served, the smuggling one behind it is refused.
    let r = raw_all(
        h.http,
        b"GET /demo/first HTTP/1.1\r\nHost: app.test\r\n\r\n\
POST /demo/second HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("HTTP/1.1 400"), "{r}");
    assert!(!r.contains("/second"), "{r}");
    assert_eq!(seen.load(Ordering::SeqCst), 1);

    // An ordinary chunked upload still goes through.
    let r = raw(
        h.http,
        b"POST /demo/up HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "POST /up body=3");
}

/// Sends raw bytes and returns everything read until the server closes, as text.
async fn raw_all(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("server closes in time")
        .unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn request_body_over_the_limit_is_413() {
    let h = start_with(Some(snapshot()), |c| c.max_request_body = Some(10)).await;
    let a = connect_agent(&h, GOOD_TOKEN, &["web"]).await;
    let seen = serve_streams(a.conn.clone());

    let r = raw(
        h.http,
        format!(
            "POST /demo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{}",
            "x".repeat(100)
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "declared length: refused up front"
    );

    let r = raw(
        h.http,
        b"POST /demo HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 413, "chunked body counted as it streams: {r:?}");

    let r = raw(
        h.http,
        b"POST /demo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 10\r\nConnection: close\r\n\r\n0123456789",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "POST / body=10");
}

#[tokio::test]
async fn slow_heads_and_idle_connections_are_closed() {
    let h = start_with(Some(snapshot()), |c| {
        c.header_read_timeout = Duration::from_millis(300);
        c.idle_timeout = Duration::from_millis(500);
    })
    .await;
    let a = connect_agent(&h, GOOD_TOKEN, &["web"]).await;
    serve_streams(a.conn.clone());

    // Slowloris: a head that never completes.
    let mut s = TcpStream::connect(h.http).await.unwrap();
    s.write_all(b"GET /demo HTTP/1.1\r\nHost: app.test\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf))
        .await
        .expect("slow head is cut off")
        .ok();

    // Idle keep-alive: one request served, then the connection is closed when nothing follows.
    let mut s = TcpStream::connect(h.http).await.unwrap();
    s.write_all(b"GET /demo HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf))
        .await
        .expect("idle connection is closed")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"),
        "{buf:?}"
    );

    // A silent connection that never sends a byte.
    let mut s = TcpStream::connect(h.http).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf))
        .await
        .expect("silent connection is closed")
        .ok();
}

#[tokio::test]
async fn slow_origin_is_504() {
    let h = start_with(Some(snapshot()), |c| {
        c.upstream_timeout = Duration::from_millis(300)
    })
    .await;
    let a = connect_agent(&h, GOOD_TOKEN, &["web"]).await;
    serve_streams(a.conn.clone());
    let r = get(h.http, "app.test", "/demo/hang").await;
    assert_eq!(r.status, 504, "{r:?}");
    assert_stamped(&r);
}

#[tokio::test]
async fn connections_over_the_limit_are_closed() {
    let h = start_with(Some(snapshot()), |c| c.max_connections = 1).await;
    let a = connect_agent(&h, GOOD_TOKEN, &["web"]).await;
    serve_streams(a.conn.clone());

    let mut first = TcpStream::connect(h.http).await.unwrap();
    first
        .write_all(b"GET /demo/1 HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let mut b = [0u8; 12];
    first.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"HTTP/1.1 200");

    // The first connection still holds the only slot: the second is closed unanswered.
    let mut second = TcpStream::connect(h.http).await.unwrap();
    let _ = second
        .write_all(b"GET /demo/2 HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), second.read_to_end(&mut buf))
        .await
        .expect("closed at once")
        .ok();
    assert!(buf.is_empty(), "{:?}", String::from_utf8_lossy(&buf));

    drop(first);
    // The slot frees once the first connection's task sees the close.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = raw_all(
            h.http,
            b"GET /demo/3 HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
        )
        .await;
        if r.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An agent that refuses every stream the way a draining tunnel-agent does: reset with code 3.
fn refuse_streams(conn: quinn::Connection) -> Arc<AtomicUsize> {
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = send.reset(quinn::VarInt::from_u32(3));
            let _ = recv.stop(quinn::VarInt::from_u32(3));
        }
    });
    seen
}

#[tokio::test]
async fn refused_streams_are_retried_even_for_post() {
    let h = start(Some(snapshot())).await;
    let a = connect_agent_as(&h, "refuser", GOOD_TOKEN, &["web"]).await;
    let refused = refuse_streams(a.conn.clone());
    let b = connect_agent_as(&h, "server", GOOD_TOKEN, &["web"]).await;
    let served = serve_streams(b.conn.clone());

    for i in 0..20 {
        let r = raw(
            h.http,
            format!(
                "POST /demo/p{i} HTTP/1.1\r\nHost: app.test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
    }
    assert!(
        refused.load(Ordering::SeqCst) > 0,
        "the refusing agent was tried"
    );
    assert_eq!(served.load(Ordering::SeqCst), 20);
}

#[tokio::test]
async fn killing_one_of_two_agents_mid_load_fails_no_idempotent_request() {
    let h = start(Some(snapshot())).await;
    let a = connect_agent_as(&h, "victim", GOOD_TOKEN, &["web"]).await;
    let victim = serve_streams(a.conn.clone());
    let b = connect_agent_as(&h, "survivor", GOOD_TOKEN, &["web"]).await;
    serve_streams(b.conn.clone());

    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..8 {
        let addr = h.http;
        let done = done.clone();
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for i in 0..40 {
                let r = get(addr, "app.test", &format!("/demo/{w}-{i}/slow")).await;
                if r.status != 200 {
                    failures.push(r);
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
            failures
        }));
    }
    // Kill the victim once load is flowing through both agents.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while done.load(Ordering::SeqCst) < 40 || victim.load(Ordering::SeqCst) < 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "load never reached the victim"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.conn.close(quinn::VarInt::from_u32(0), b"killed");
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert_eq!(done.load(Ordering::SeqCst), 320);
}

#[tokio::test]
async fn service_lb_policy_round_robin_alternates_agents() {
    let mut snap = snapshot();
    snap.services[0].lb_policy = coordinator_api::LbPolicy::RoundRobin;
    let h = start(Some(snap)).await;
    let a = connect_agent_as(&h, "a", GOOD_TOKEN, &["web"]).await;
    let seen_a = serve_streams(a.conn.clone());
    let b = connect_agent_as(&h, "b", GOOD_TOKEN, &["web"]).await;
    let seen_b = serve_streams(b.conn.clone());
    for i in 0..20 {
        let r = get(h.http, "app.test", &format!("/demo/{i}")).await;
        assert_eq!(r.status, 200, "{r:?}");
        let (x, y) = (seen_a.load(Ordering::SeqCst), seen_b.load(Ordering::SeqCst));
        assert!(
            x.abs_diff(y) <= 1,
            "after {i}: {x} vs {y} — not round robin"
        );
    }
    assert_eq!(seen_a.load(Ordering::SeqCst), 10);
}

#[tokio::test]
async fn metrics_ready_access_log_and_drain() {
    let log_path = std::env::temp_dir().join(format!("edge-access-{}.log", rand::random::<u64>()));
    let lp = log_path.clone();
    let h = start_with(Some(snapshot()), move |c| {
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
        c.access_log = Some(lp);
        c.upstream_timeout = Duration::from_secs(2);
        c.drain_timeout = Duration::from_secs(5);
    })
    .await;
    let admin = h.admin.unwrap();
    let a = connect_agent(&h, GOOD_TOKEN, &["web"]).await;
    let seen = serve_streams(a.conn.clone());

    assert_eq!(get(h.http, "app.test", "/demo/x").await.status, 200);
    assert_eq!(get(h.http, "app.test", "/nope").await.status, 404);
    assert_eq!(get(admin, "admin", "/ready").await.status, 200);
    let m = get(admin, "admin", "/metrics").await;
    assert_eq!(m.status, 200);
    for want in [
        "meridian_edge_requests_total{route=\"web\",status=\"200\",region=\"eu\",edge=\"edge-test\"} 1",
        "meridian_edge_requests_total{route=\"-\",status=\"404\",region=\"eu\",edge=\"edge-test\"} 1",
        "meridian_edge_request_duration_seconds_count{route=\"web\",region=\"eu\"} 1",
        "meridian_edge_backends{service=\"web\"} 1",
        "meridian_edge_draining 0",
    ] {
        assert!(m.body.contains(want), "missing {want} in\n{}", m.body);
    }

    // The access log is written by a separate task: poll for it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= 2 {
            assert_eq!(lines[0]["status"], 200);
            assert_eq!(lines[0]["route"], "web");
            assert_eq!(lines[0]["path"], "/demo/x");
            assert_eq!(lines[1]["status"], 404);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "access log: {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Drain: an in-flight request finishes, /ready turns 503, new connections are refused.
    let http = h.http;
    let in_flight = tokio::spawn(async move { get(http, "app.test", "/demo/hang").await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while seen.load(Ordering::SeqCst) < 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    h.shutdown.cancel();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if get(admin, "admin", "/ready").await.status == 503 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/ready never turned 503"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        get(admin, "admin", "/metrics")
            .await
            .body
            .contains("meridian_edge_draining 1")
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(h.http).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "still accepting");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Finished during the drain (the origin hangs, so the upstream timeout answers).
    assert_eq!(in_flight.await.unwrap().status, 504);
    tokio::time::timeout(Duration::from_secs(10), h.task)
        .await
        .expect("edge stops after the drain")
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_file(&log_path);
}

#[tokio::test]
async fn rate_limits_per_client_ip_and_per_route_answer_429_with_retry_after() {
    let h = start_with(Some(snapshot()), |c| {
        c.rate_limit_ip = Some(0.5);
        c.rate_limit_ip_burst = Some(3.0);
    })
    .await;
    let a = connect_agent(&h, GOOD_TOKEN, &["web"]).await;
    let seen = serve_streams(a.conn.clone());
    for _ in 0..3 {
        assert_eq!(get(h.http, "app.test", "/demo").await.status, 200);
    }
    let r = get(h.http, "app.test", "/demo").await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.header("retry-after"), Some("2"), "{r:?}");
    assert_stamped(&r);
    assert_eq!(
        seen.load(Ordering::SeqCst),
        3,
        "the refused request never left the edge"
    );

    let h = start_with(Some(snapshot()), |c| {
        c.rate_limit_route = Some(1.0);
        c.rate_limit_route_burst = Some(2.0);
    })
    .await;
    let a = connect_agent(&h, GOOD_TOKEN, &["web"]).await;
    serve_streams(a.conn.clone());
    let b = connect_agent_as(&h, "api-agent", API_TOKEN, &["api"]).await;
    serve_streams(b.conn.clone());
    assert_eq!(get(h.http, "app.test", "/demo").await.status, 200);
    assert_eq!(get(h.http, "app.test", "/demo").await.status, 200);
    let r = get(h.http, "app.test", "/demo").await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.header("retry-after"), Some("1"));
    // Another route has its own bucket.
    assert_eq!(get(h.http, "app.test", "/api/x").await.status, 200);
}

/// An agent whose origin fails every request (the agent reports `Error` 502).
fn fail_streams(conn: quinn::Connection) -> Arc<AtomicUsize> {
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut send, _recv)) = conn.accept_bi().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                write(
                    &mut send,
                    &Frame::Error {
                        code: 502,
                        message: "origin down".into(),
                    },
                )
                .await;
                let _ = send.finish();
            });
        }
    });
    seen
}

#[tokio::test]
async fn failing_backend_is_ejected_as_an_outlier() {
    let h = start_with(Some(snapshot()), |c| {
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let bad = connect_agent_as(&h, "bad", GOOD_TOKEN, &["web"]).await;
    let bad_seen = fail_streams(bad.conn.clone());
    let good = connect_agent_as(&h, "good", GOOD_TOKEN, &["web"]).await;
    serve_streams(good.conn.clone());

    let mut failed = 0;
    for i in 0..60 {
        let r = get(h.http, "app.test", &format!("/demo/{i}")).await;
        if r.status != 200 {
            assert_eq!(r.status, 502, "{r:?}");
            failed += 1;
        }
    }
    // Five consecutive failures eject it; without ejection about half of 60 would fail.
    assert_eq!(failed, 5, "failures before ejection");
    assert_eq!(bad_seen.load(Ordering::SeqCst), 5);

    // /metrics shows the ejection per backend, and the tunnel's pool: two agent connections,
    // every other stream on a connection already in use.
    let m = get(h.admin.unwrap(), "admin", "/metrics").await.body;
    for want in [
        "meridian_edge_backend_ejected{service=\"web\",backend=\"bad\",kind=\"agent\"} 1",
        "meridian_edge_backend_healthy{service=\"web\",backend=\"bad\",kind=\"agent\"} 0",
        "meridian_edge_backend_check_passing{service=\"web\",backend=\"bad\",kind=\"agent\"} 1",
        "meridian_edge_backend_healthy{service=\"web\",backend=\"good\",kind=\"agent\"} 1",
        "meridian_edge_backend_circuit_state{service=\"web\",backend=\"good\",kind=\"agent\",state=\"closed\"} 1",
        "meridian_edge_upstream_connections_opened_total{pool=\"agent\"} 2",
        "meridian_edge_upstream_requests_total{pool=\"agent\",connection=\"new\"} 2",
        "meridian_edge_upstream_requests_total{pool=\"agent\",connection=\"reused\"} 58",
    ] {
        assert!(m.contains(want), "missing {want} in\n{m}");
    }
}

/// A fake agent whose origin answers `/health` 200 or 503 by `healthy` and everything else 200
/// naming the agent; counts (checks, other requests) and the Host each check carried.
fn serve_checked(
    conn: quinn::Connection,
    name: &'static str,
    healthy: Arc<std::sync::atomic::AtomicBool>,
) -> (Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let checks = Arc::new(AtomicUsize::new(0));
    let hits = Arc::new(AtomicUsize::new(0));
    let (c, n) = (checks.clone(), hits.clone());
    tokio::spawn(async move {
        while let Ok((mut send, recv)) = conn.accept_bi().await {
            let (c, n, healthy) = (c.clone(), n.clone(), healthy.clone());
            tokio::spawn(async move {
                let mut r = Reader::new(recv);
                r.preamble().await;
                let Some(Frame::RequestHead(head)) = r.next().await else {
                    panic!("expected a request head")
                };
                while !matches!(r.next().await, Some(Frame::End) | None) {}
                let status = if head.uri.as_ref() == b"/health" {
                    assert_eq!(header(&head, "user-agent"), Some("meridian-health-check"));
                    assert_eq!(header(&head, "host"), Some("app.test"), "the mount's host");
                    c.fetch_add(1, Ordering::SeqCst);
                    if healthy.load(Ordering::SeqCst) {
                        200
                    } else {
                        503
                    }
                } else {
                    n.fetch_add(1, Ordering::SeqCst);
                    200
                };
                write(
                    &mut send,
                    &Frame::ResponseHead(ResponseHead {
                        status,
                        headers: vec![(Bytes::from_static(b"x-agent"), Bytes::from(name))],
                    }),
                )
                .await;
                write(&mut send, &Frame::End).await;
                let _ = send.finish();
            });
        }
    });
    (checks, hits)
}

/// Polls the edge's `/metrics` until it contains `line`.
async fn wait_metric(admin: SocketAddr, line: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = get(admin, "admin", "/metrics").await.body;
        if m.lines().any(|l| l == line) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saw {line} in\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn health_checks_through_the_tunnel_take_an_agent_out_and_back() {
    let mut snap = snapshot();
    // Round robin, so "both serve" is exact rather than up to P2C's latency scores.
    snap.services[0].lb_policy = coordinator_api::LbPolicy::RoundRobin;
    snap.services[0].health_check = Some(coordinator_api::HealthCheck {
        path: "/health".into(),
        interval_ms: 50,
        timeout_ms: 50,
        rise: 2,
        fall: 2,
    });
    let h = start_with(Some(snap), |c| {
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let admin = h.admin.unwrap();
    let flag = || Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (a_ok, b_ok) = (flag(), flag());
    let a = connect_agent_as(&h, "a", GOOD_TOKEN, &["web"]).await;
    let (a_checks, _) = serve_checked(a.conn.clone(), "a", a_ok);
    let b = connect_agent_as(&h, "b", GOOD_TOKEN, &["web"]).await;
    let (b_checks, b_hits) = serve_checked(b.conn.clone(), "b", b_ok.clone());
    let label = |n: &str| format!("service=\"web\",backend=\"{n}\",kind=\"agent\"");

    // Both agents are probed through their tunnel connections, and both serve.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while a_checks.load(Ordering::SeqCst) == 0 || b_checks.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no checks through the tunnel"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut seen = std::collections::HashSet::new();
    for i in 0..20 {
        let r = get(h.http, "app.test", &format!("/demo/{i}")).await;
        assert_eq!(r.status, 200, "{r:?}");
        seen.insert(r.header("x-agent").unwrap().to_owned());
    }
    assert_eq!(seen.len(), 2, "both serve: {seen:?}");

    // b's origin fails the edge's check (b itself stays connected and would serve): after
    // `fall` probes the edge sends it nothing.
    b_ok.store(false, Ordering::SeqCst);
    wait_metric(
        admin,
        &format!("meridian_edge_backend_check_passing{{{}}} 0", label("b")),
    )
    .await;
    let before = b_hits.load(Ordering::SeqCst);
    for i in 0..20 {
        let r = get(h.http, "app.test", &format!("/demo/{i}")).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-agent"), Some("a"));
    }
    assert_eq!(b_hits.load(Ordering::SeqCst), before, "no traffic to b");

    // Back after `rise` passes.
    b_ok.store(true, Ordering::SeqCst);
    wait_metric(
        admin,
        &format!("meridian_edge_backend_check_passing{{{}}} 1", label("b")),
    )
    .await;
    let mut seen = std::collections::HashSet::new();
    for i in 0..20 {
        let r = get(h.http, "app.test", &format!("/demo/{i}")).await;
        seen.insert(r.header("x-agent").unwrap().to_owned());
    }
    assert!(seen.contains("b"), "b serves again: {seen:?}");
}
