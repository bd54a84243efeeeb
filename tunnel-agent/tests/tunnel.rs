//! End-to-end: a fake edge (quinn server, rcgen certs) and a local hyper origin around the real
//! agent. Checks registration, a streamed POST, an upgrade, an unreachable origin, Reject retry
//! and drain on shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tunnel_proto::{Decoder, Frame, RequestHead};

struct Pki {
    ca_path: PathBuf,
    server: quinn::ServerConfig,
    /// The edge's TLS for the TCP fallback listener.
    tcp: Arc<rustls::ServerConfig>,
}

fn pki(name: &str) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();

    let ca_path = std::env::temp_dir().join(format!(
        "meridian-agent-test-{name}-{}.pem",
        std::process::id()
    ));
    std::fs::write(&ca_path, ca.pem()).unwrap();

    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone()], key)
    .unwrap();
    let mut tcp = tls.clone();
    tcp.alpn_protocols = vec![tunnel_proto::TCP_ALPN.to_vec()];
    tls.alpn_protocols = vec![tunnel_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    Pki {
        ca_path,
        server: quinn::ServerConfig::with_crypto(Arc::new(crypto)),
        tcp: Arc::new(tcp),
    }
}

/// Origin: `/echo` answers "METHOD URI BODY" with an `x-origin` header and a trailer-less
/// body; `/ws` upgrades to a raw echo.
async fn origin() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(|mut req: http::Request<hyper::body::Incoming>| async move {
                    if req.uri().path() == "/ws" {
                        let on_upgrade = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            let mut io = TokioIo::new(on_upgrade.await.unwrap());
                            let mut buf = [0u8; 1024];
                            loop {
                                let n = io.read(&mut buf).await.unwrap_or(0);
                                if n == 0 {
                                    break;
                                }
                                io.write_all(&buf[..n]).await.unwrap();
                            }
                        });
                        let resp = http::Response::builder()
                            .status(101)
                            .header("connection", "upgrade")
                            .header("upgrade", "echo")
                            .body(Full::new(Bytes::new()))
                            .unwrap();
                        return Ok::<_, Infallible>(resp);
                    }
                    let head = format!("{} {} ", req.method(), req.uri());
                    let hop = req.headers().contains_key("keep-alive");
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let mut out = head.into_bytes();
                    out.extend_from_slice(&body);
                    let resp = http::Response::builder()
                        .header("x-origin", "yes")
                        .header("x-saw-keep-alive", if hop { "1" } else { "0" })
                        .body(Full::new(Bytes::from(out)))
                        .unwrap();
                    Ok(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

struct Reader {
    recv: quinn::RecvStream,
    buf: BytesMut,
    dec: Decoder,
}

impl Reader {
    fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            buf: BytesMut::new(),
            dec: Decoder::new(),
        }
    }

    async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = self.dec.decode(&mut self.buf).unwrap() {
                return Some(f);
            }
            match self.recv.read_chunk(65536, true).await {
                Ok(Some(c)) => self.buf.extend_from_slice(&c.bytes),
                Ok(None) | Err(_) => return None,
            }
        }
    }
}

async fn write(send: &mut quinn::SendStream, frames: &[Frame], preamble: bool) {
    let mut buf = BytesMut::new();
    if preamble {
        tunnel_proto::encode_preamble(&mut buf);
    }
    for f in frames {
        tunnel_proto::encode(f, &mut buf).unwrap();
    }
    send.write_all(&buf).await.unwrap();
}

fn head(method: &str, uri: &str, headers: &[(&str, &str)]) -> Frame {
    Frame::RequestHead(RequestHead {
        service: "shop".into(),
        method: Bytes::copy_from_slice(method.as_bytes()),
        uri: Bytes::copy_from_slice(uri.as_bytes()),
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    Bytes::copy_from_slice(n.as_bytes()),
                    Bytes::copy_from_slice(v.as_bytes()),
                )
            })
            .collect(),
    })
}

/// Reads a whole response: head, concatenated data, whether End arrived.
async fn response(r: &mut Reader) -> (Frame, Vec<u8>, bool) {
    let head = r.next().await.unwrap();
    let mut body = Vec::new();
    let mut ended = false;
    while let Some(f) = r.next().await {
        match f {
            Frame::Data(d) => body.extend_from_slice(&d),
            Frame::End => ended = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    (head, body, ended)
}

fn agent_config(edge: SocketAddr, origin: &str, ca: &PathBuf) -> tunnel_agent::Config {
    let mut c = tunnel_agent::Config::new(vec![edge], "tok", "shop", origin, ca);
    c.agent_id = Some("agent-test".into());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_requests_upgrades_and_drains() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_test_writer()
        .try_init();
    let pki = pki("main");
    let edge = quinn::Endpoint::server(pki.server.clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let edge_addr = edge.local_addr().unwrap();
    let origin = origin().await;

    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(tunnel_agent::run(
        agent_config(edge_addr, &format!("http://{origin}"), &pki.ca_path),
        shutdown.clone(),
    ));

    let conn = tokio::time::timeout(Duration::from_secs(10), edge.accept())
        .await
        .unwrap()
        .unwrap()
        .await
        .unwrap();
    let (mut ctl_send, ctl_recv) = conn.accept_bi().await.unwrap();
    let mut ctl = Reader::new(ctl_recv);
    match ctl.next().await.unwrap() {
        Frame::Hello {
            version,
            token,
            agent_id,
            services,
        } => {
            assert_eq!(version, tunnel_proto::VERSION);
            assert_eq!(token, "tok");
            assert_eq!(agent_id, "agent-test");
            assert_eq!(services, vec!["shop".to_owned()]);
        }
        other => panic!("expected Hello, got {other:?}"),
    }
    write(
        &mut ctl_send,
        &[Frame::Welcome {
            edge_id: "edge-1".into(),
            region: "eu".into(),
            other_edges: vec![],
        }],
        false,
    )
    .await;

    // Control loop: ack heartbeats, report Drain.
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel();
    let (hb_tx, mut hb_rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        let mut drain_tx = Some(drain_tx);
        while let Some(f) = ctl.next().await {
            match f {
                Frame::Heartbeat { seq } => {
                    write(&mut ctl_send, &[Frame::HeartbeatAck { seq }], false).await;
                    let _ = hb_tx.send(seq).await;
                }
                Frame::Drain => {
                    if let Some(tx) = drain_tx.take() {
                        let _ = tx.send(());
                    }
                }
                other => panic!("unexpected control frame {other:?}"),
            }
        }
    });

    // A streamed POST.
    let (mut send, recv) = conn.open_bi().await.unwrap();
    write(
        &mut send,
        &[
            head(
                "POST",
                "/echo?x=1",
                &[("host", "example.com"), ("keep-alive", "timeout=5")],
            ),
            Frame::Data(Bytes::from_static(b"hello ")),
        ],
        true,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    write(
        &mut send,
        &[Frame::Data(Bytes::from_static(b"world")), Frame::End],
        false,
    )
    .await;
    send.finish().unwrap();
    let (rh, body, ended) = response(&mut Reader::new(recv)).await;
    let Frame::ResponseHead(rh) = rh else {
        panic!("expected head, got {rh:?}")
    };
    assert_eq!(rh.status, 200);
    let has = |n: &str, v: &str| {
        rh.headers
            .iter()
            .any(|(hn, hv)| hn == n.as_bytes() && hv == v.as_bytes())
    };
    assert!(has("x-origin", "yes"));
    assert!(
        has("x-saw-keep-alive", "0"),
        "hop-by-hop header was forwarded"
    );
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "POST /echo?x=1 hello world"
    );
    assert!(ended);

    // Many concurrent GETs on one connection.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            let (mut send, recv) = conn.open_bi().await.unwrap();
            write(
                &mut send,
                &[head("GET", &format!("/echo/{i}"), &[]), Frame::End],
                true,
            )
            .await;
            send.finish().unwrap();
            let (_, body, ended) = response(&mut Reader::new(recv)).await;
            assert!(ended);
            assert_eq!(String::from_utf8(body).unwrap(), format!("GET /echo/{i} "));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    // An upgrade: 101 head, then raw bytes both ways.
    let (mut send, recv) = conn.open_bi().await.unwrap();
    write(
        &mut send,
        &[
            head(
                "GET",
                "/ws",
                &[("connection", "upgrade"), ("upgrade", "echo")],
            ),
            Frame::End,
        ],
        true,
    )
    .await;
    let mut r = Reader::new(recv);
    let Frame::ResponseHead(rh) = r.next().await.unwrap() else {
        panic!("expected 101 head")
    };
    assert_eq!(rh.status, 101);
    assert!(
        rh.headers
            .iter()
            .any(|(n, v)| n == "upgrade" && v == "echo")
    );
    send.write_all(b"ping-raw").await.unwrap();
    let mut got = r.buf.to_vec();
    while got.len() < 8 {
        let c = r.recv.read_chunk(1024, true).await.unwrap().unwrap();
        got.extend_from_slice(&c.bytes);
    }
    assert_eq!(&got, b"ping-raw");
    send.finish().unwrap();

    // A TCP head at an agent without `--tcp` is refused: the stream is reset with code 5.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write(
        &mut send,
        &[Frame::TcpHead {
            service: "shop".into(),
        }],
        true,
    )
    .await;
    let refused = recv.read_chunk(1024, true).await;
    assert!(
        matches!(refused, Err(quinn::ReadError::Reset(c)) if c == quinn::VarInt::from_u32(5)),
        "{refused:?}"
    );

    // Heartbeats flow.
    let seq = tokio::time::timeout(Duration::from_secs(5), hb_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seq, 0);

    // Shutdown: Drain on the control stream, then the connection closes with code 0.
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), drain_rx)
        .await
        .unwrap()
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(15), conn.closed())
        .await
        .unwrap();
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(0))
        }
        other => panic!("unexpected close {other:?}"),
    }
    tokio::time::timeout(Duration::from_secs(15), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_file(&pki.ca_path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_is_retried_and_unreachable_origin_is_502() {
    let pki = pki("reject");
    let edge = quinn::Endpoint::server(pki.server.clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let edge_addr = edge.local_addr().unwrap();
    // A port nothing listens on.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);

    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(tunnel_agent::run(
        agent_config(edge_addr, &format!("http://{dead_addr}"), &pki.ca_path),
        shutdown.clone(),
    ));

    // First attempt: Reject.
    let conn = edge.accept().await.unwrap().await.unwrap();
    let (mut ctl_send, ctl_recv) = conn.accept_bi().await.unwrap();
    let mut ctl = Reader::new(ctl_recv);
    assert!(matches!(ctl.next().await, Some(Frame::Hello { .. })));
    write(
        &mut ctl_send,
        &[Frame::Reject {
            reason: "bad token".into(),
        }],
        false,
    )
    .await;

    // The agent comes back (backoff ≤ 100 ms on the first retry).
    let conn = tokio::time::timeout(Duration::from_secs(5), edge.accept())
        .await
        .unwrap()
        .unwrap()
        .await
        .unwrap();
    let (mut ctl_send, ctl_recv) = conn.accept_bi().await.unwrap();
    let mut ctl = Reader::new(ctl_recv);
    assert!(matches!(ctl.next().await, Some(Frame::Hello { .. })));
    write(
        &mut ctl_send,
        &[Frame::Welcome {
            edge_id: "edge-1".into(),
            region: "eu".into(),
            other_edges: vec![],
        }],
        false,
    )
    .await;

    // The agent probed its origin and reports it down.
    let health = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ctl.next().await {
                Some(Frame::OriginHealth { service, healthy }) => break (service, healthy),
                Some(Frame::Heartbeat { .. }) => {}
                other => panic!("unexpected control frame {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(health, ("shop".to_owned(), false));

    let (mut send, recv) = conn.open_bi().await.unwrap();
    write(&mut send, &[head("GET", "/", &[]), Frame::End], true).await;
    let mut r = Reader::new(recv);
    match r.next().await {
        Some(Frame::Error { code, message }) => {
            assert_eq!(code, 502);
            assert!(message.contains("origin unreachable"), "{message}");
        }
        other => panic!("expected Error 502, got {other:?}"),
    }

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_file(&pki.ca_path);
}

/// Accepts one agent connection on `edge` and registers it as `edge_id` in `region`.
async fn register(
    edge: &quinn::Endpoint,
    edge_id: &str,
    region: &str,
    others: Vec<tunnel_proto::EdgeEndpoint>,
) -> (quinn::Connection, quinn::SendStream, Reader) {
    let conn = tokio::time::timeout(Duration::from_secs(10), edge.accept())
        .await
        .unwrap()
        .unwrap()
        .await
        .unwrap();
    let (mut send, recv) = conn.accept_bi().await.unwrap();
    let mut ctl = Reader::new(recv);
    assert!(matches!(ctl.next().await, Some(Frame::Hello { .. })));
    write(
        &mut send,
        &[Frame::Welcome {
            edge_id: edge_id.into(),
            region: region.into(),
            other_edges: others,
        }],
        false,
    )
    .await;
    (conn, send, ctl)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_to_a_second_region_and_reconnects_after_drain() {
    let pki = pki("regions");
    let edge_a =
        quinn::Endpoint::server(pki.server.clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let edge_b =
        quinn::Endpoint::server(pki.server.clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let b_addr = edge_b.local_addr().unwrap();
    let origin = origin().await;

    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(tunnel_agent::run(
        agent_config(
            edge_a.local_addr().unwrap(),
            &format!("http://{origin}"),
            &pki.ca_path,
        ),
        shutdown.clone(),
    ));

    let others = vec![tunnel_proto::EdgeEndpoint {
        edge_id: "edge-b".into(),
        region: "us".into(),
        addr: b_addr.to_string(),
    }];
    let (_conn_a, mut ctl_a, _ctl_a_reader) = register(&edge_a, "edge-a", "eu", others).await;
    // Welcome named a region the agent has no connection to: it dials it.
    let (conn_b, _ctl_b, _ctl_b_reader) = register(&edge_b, "edge-b", "us", vec![]).await;

    // Requests work through the second region's edge too.
    let (mut send, recv) = conn_b.open_bi().await.unwrap();
    write(&mut send, &[head("GET", "/via-b", &[]), Frame::End], true).await;
    let (_, body, ended) = response(&mut Reader::new(recv)).await;
    assert!(ended);
    assert_eq!(String::from_utf8(body).unwrap(), "GET /via-b ");

    // Edge A drains: the agent reconnects to A (its region's only address).
    write(&mut ctl_a, &[Frame::Drain], false).await;
    let (_conn_a2, _ctl_a2, _r) = register(&edge_a, "edge-a", "eu", vec![]).await;

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_file(&pki.ca_path);
}

/// A TCP origin that echoes every byte until EOF, then closes its write side.
async fn tcp_echo() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_streams_are_spliced_to_the_tcp_origin() {
    let pki = pki("tcp");
    let edge = quinn::Endpoint::server(pki.server.clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let echo = tcp_echo().await;
    let mut cfg = agent_config(edge.local_addr().unwrap(), "", &pki.ca_path);
    cfg.tcp = Some(echo.to_string());
    cfg.health_interval = 0;
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(tunnel_agent::run(cfg, shutdown.clone()));
    let (conn, _ctl, _ctl_reader) = register(&edge, "edge-a", "eu", vec![]).await;

    // Head and the first bytes in one write (the agent must keep what it read past the head),
    // then more, then FIN: everything comes back, then FIN.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut first = BytesMut::new();
    tunnel_proto::encode_preamble(&mut first);
    tunnel_proto::encode(
        &Frame::TcpHead {
            service: "shop".into(),
        },
        &mut first,
    )
    .unwrap();
    first.extend_from_slice(b"hello ");
    send.write_all(&first).await.unwrap();
    let big = vec![7u8; 3 * 1024 * 1024];
    send.write_all(&big).await.unwrap();
    send.finish().unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(8 << 20))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed.len(), 6 + big.len());
    assert_eq!(&echoed[..6], b"hello ");
    assert!(echoed[6..].iter().all(|b| *b == 7));

    // HTTP to a TCP-only agent: 502, not a hang.
    let (mut send, recv) = conn.open_bi().await.unwrap();
    write(&mut send, &[head("GET", "/", &[]), Frame::End], true).await;
    assert!(matches!(
        Reader::new(recv).next().await,
        Some(Frame::Error { code: 502, .. })
    ));

    // A TCP stream for another service is refused (code 5).
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write(
        &mut send,
        &[Frame::TcpHead {
            service: "other".into(),
        }],
        true,
    )
    .await;
    assert!(matches!(
        recv.read_chunk(1024, true).await,
        Err(quinn::ReadError::Reset(c)) if c == quinn::VarInt::from_u32(5)
    ));

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_file(&pki.ca_path);
}

/// Opens a `GET /echo` stream and returns the first frame, or the reset code if refused.
async fn try_get(conn: &quinn::Connection) -> Result<Frame, u64> {
    let (mut send, recv) = conn.open_bi().await.map_err(|_| u64::MAX)?;
    write(&mut send, &[head("GET", "/echo", &[]), Frame::End], true).await;
    let _ = send.finish();
    let mut r = Reader::new(recv);
    loop {
        if let Some(f) = r.dec.decode(&mut r.buf).unwrap() {
            return Ok(f);
        }
        match r.recv.read_chunk(65536, true).await {
            Ok(Some(c)) => r.buf.extend_from_slice(&c.bytes),
            Err(quinn::ReadError::Reset(code)) => return Err(code.into_inner()),
            Ok(None) | Err(_) => return Err(u64::MAX),
        }
    }
}

/// A rolling restart must not fail requests: after the agent sends `Drain`, streams the edge
/// opened before it saw the `Drain` are served; once the edge answers `GoAway`, new ones are
/// refused with code 3 (retryable) and the connection closes when in-flight streams finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_serves_streams_until_the_edge_answers_goaway() {
    let pki = pki("drain-ack");
    let edge = quinn::Endpoint::server(pki.server.clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let origin = origin().await;
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(tunnel_agent::run(
        agent_config(
            edge.local_addr().unwrap(),
            &format!("http://{origin}"),
            &pki.ca_path,
        ),
        shutdown.clone(),
    ));
    let (conn, mut ctl_send, mut ctl) = register(&edge, "edge-1", "eu", vec![]).await;

    // A long-lived stream in flight (an upgrade), so the drain cannot end early.
    let (mut ws_send, ws_recv) = conn.open_bi().await.unwrap();
    write(
        &mut ws_send,
        &[
            head(
                "GET",
                "/ws",
                &[("connection", "upgrade"), ("upgrade", "echo")],
            ),
            Frame::End,
        ],
        true,
    )
    .await;
    let mut ws = Reader::new(ws_recv);
    assert!(matches!(ws.next().await, Some(Frame::ResponseHead(h)) if h.status == 101));

    shutdown.cancel();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ctl.next())
            .await
            .unwrap()
        {
            Some(Frame::Drain) => break,
            Some(Frame::Heartbeat { .. } | Frame::OriginHealth { .. }) => {}
            other => panic!("expected Drain, got {other:?}"),
        }
    }
    // The edge has not answered yet: a request it routed here meanwhile is served.
    match try_get(&conn).await {
        Ok(Frame::ResponseHead(h)) => assert_eq!(h.status, 200),
        other => panic!("a stream opened before the GoAway answer was not served: {other:?}"),
    }

    write(
        &mut ctl_send,
        &[Frame::GoAway {
            reason: "drain acknowledged".into(),
        }],
        false,
    )
    .await;
    // Once the agent has read the answer, new streams are refused with code 3.
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        match try_get(&conn).await {
            Err(3) => break,
            Ok(Frame::ResponseHead(_)) if std::time::Instant::now() < deadline => {}
            other => panic!("expected a refusal with code 3 after GoAway, got {other:?}"),
        }
    }

    // The in-flight upgrade still works, and ending it lets the connection close with code 0.
    ws_send.write_all(b"still-here").await.unwrap();
    let mut got = ws.buf.to_vec();
    while got.len() < 10 {
        let c = ws.recv.read_chunk(1024, true).await.unwrap().unwrap();
        got.extend_from_slice(&c.bytes);
    }
    assert_eq!(&got, b"still-here");
    ws_send.finish().unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .unwrap();
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(0)),
        "{closed:?}"
    );
    tokio::time::timeout(Duration::from_secs(15), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_file(&pki.ca_path);
}

/// Accepts the next agent connection that opens a control stream, registers it, and answers its
/// heartbeats from a background task; other control frames (e.g. `Drain`) arrive on the channel.
async fn register_acking(
    edge: &quinn::Endpoint,
) -> (
    quinn::Connection,
    tokio::sync::mpsc::UnboundedReceiver<Frame>,
) {
    loop {
        let conn = tokio::time::timeout(Duration::from_secs(10), edge.accept())
            .await
            .unwrap()
            .unwrap()
            .await
            .unwrap();
        let Ok((mut send, recv)) = conn.accept_bi().await else {
            continue;
        };
        let mut ctl = Reader::new(recv);
        assert!(matches!(ctl.next().await, Some(Frame::Hello { .. })));
        write(
            &mut send,
            &[Frame::Welcome {
                edge_id: "edge-1".into(),
                region: "eu".into(),
                other_edges: vec![],
            }],
            false,
        )
        .await;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(f) = ctl.next().await {
                match f {
                    Frame::Heartbeat { seq } => {
                        let mut buf = BytesMut::new();
                        tunnel_proto::encode(&Frame::HeartbeatAck { seq }, &mut buf).unwrap();
                        if send.write_all(&buf).await.is_err() {
                            break;
                        }
                    }
                    other => {
                        let _ = tx.send(other);
                    }
                }
            }
        });
        return (conn, rx);
    }
}

/// UDP blocked, then unblocked: the agent dials the "edge" at a gate address whose UDP port
/// drops everything while closed (and relays to the real QUIC endpoint once open) and whose TCP
/// port is the edge's TLS fallback listener feeding the same endpoint ([`MuxSocket`]). The agent
/// registers over TCP and serves a request there; once the gate opens, its re-probe moves it
/// back to QUIC (it sends `Drain` on the TCP connection) and requests work over UDP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_blocked_falls_back_to_tcp_and_returns_to_quic() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tunnel_proto::io::fallback::MuxSocket;

    let pki = pki("fallback");
    let runtime = quinn::default_runtime().unwrap();
    let real = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let real_addr = real.local_addr().unwrap();
    let mux = MuxSocket::new(runtime.wrap_udp_socket(real).unwrap());
    let edge = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        Some(pki.server.clone()),
        mux.clone(),
        runtime,
    )
    .unwrap();

    // The gate: UDP relay to the real endpoint while open, black hole while closed.
    // UDP and TCP on the same port number, as an edge listens (retry if the TCP one is taken).
    let (gate, tcp) = loop {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        if let Ok(tcp) = tokio::net::TcpListener::bind(udp.local_addr().unwrap()).await {
            break (Arc::new(udp), tcp);
        }
    };
    let gate_addr = gate.local_addr().unwrap();
    let relay = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let open = Arc::new(AtomicBool::new(false));
    let agent_udp = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    {
        let (gate, relay, open, agent_udp) =
            (gate.clone(), relay.clone(), open.clone(), agent_udp.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = gate.recv_from(&mut buf).await {
                if open.load(Ordering::SeqCst) {
                    *agent_udp.lock().unwrap() = Some(from);
                    let _ = relay.send_to(&buf[..n], real_addr).await;
                }
            }
        });
    }
    {
        let (gate, relay, open, agent_udp) =
            (gate.clone(), relay.clone(), open.clone(), agent_udp.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, _)) = relay.recv_from(&mut buf).await {
                let to = *agent_udp.lock().unwrap();
                if let (true, Some(to)) = (open.load(Ordering::SeqCst), to) {
                    let _ = gate.send_to(&buf[..n], to).await;
                }
            }
        });
    }
    // The TCP fallback listener on the gate's port.
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.tcp.clone());
    {
        let mux = mux.clone();
        tokio::spawn(async move {
            while let Ok((s, peer)) = tcp.accept().await {
                let (acceptor, mux) = (acceptor.clone(), mux.clone());
                tokio::spawn(async move {
                    let tls = acceptor.accept(s).await.unwrap();
                    let (_fake, pump) = mux.add_stream(tls, peer);
                    let _ = pump.await;
                });
            }
        });
    }

    let origin = origin().await;
    let mut config = agent_config(gate_addr, &format!("http://{origin}"), &pki.ca_path);
    config.quic_timeout = Duration::from_millis(300);
    config.quic_reprobe = Duration::from_millis(500);
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(tunnel_agent::run(config, shutdown.clone()));

    // UDP blocked: the agent arrives over TCP, and requests work there.
    let (conn, mut ctl) = register_acking(&edge).await;
    assert!(
        MuxSocket::is_tcp_peer(&conn.remote_address()),
        "first connection should be the TCP fallback, came from {}",
        conn.remote_address()
    );
    assert_eq!(mux.tcp_peers(), 1);
    let (mut send, recv) = conn.open_bi().await.unwrap();
    write(
        &mut send,
        &[head("GET", "/over-tcp", &[]), Frame::End],
        true,
    )
    .await;
    let (_, body, ended) = response(&mut Reader::new(recv)).await;
    assert!(ended);
    assert_eq!(String::from_utf8(body).unwrap(), "GET /over-tcp ");

    // UDP works again: a re-probe succeeds, the TCP connection is drained, QUIC comes back.
    open.store(true, Ordering::SeqCst);
    let (quic, _ctl2) = register_acking(&edge).await;
    assert!(
        !MuxSocket::is_tcp_peer(&quic.remote_address()),
        "after unblocking the agent should be back on UDP"
    );
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ctl.recv().await {
                Some(Frame::Drain) => return true,
                Some(_) => {}
                None => return false,
            }
        }
    })
    .await;
    assert_eq!(drained, Ok(true), "the TCP connection is drained");
    let (mut send, recv) = quic.open_bi().await.unwrap();
    write(
        &mut send,
        &[head("GET", "/over-quic", &[]), Frame::End],
        true,
    )
    .await;
    let (_, body, ended) = response(&mut Reader::new(recv)).await;
    assert!(ended);
    assert_eq!(String::from_utf8(body).unwrap(), "GET /over-quic ");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_file(&pki.ca_path);
}
