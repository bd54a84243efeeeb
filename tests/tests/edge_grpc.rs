//! gRPC end to end: an h2 client over TLS to the edge → QUIC tunnel → agent (`--to h2c://…`) →
//! an h2c origin in this process speaking gRPC framing. Trailers (`grpc-status`,
//! `grpc-message`) arrive intact, a trailers-only error keeps its status, and a bidirectional
//! streaming call streams: each message is echoed back before the next one is sent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meridian_tests::clients::tls_client_config;
use meridian_tests::dev::{DevNetwork, Proc, eventually, start_agent};
use tokio::sync::mpsc;

const HOST: &str = "edge.meridian.test";
const EDGE: &str = "127.0.0.12:8443";

type Body = BoxBody<Bytes, Infallible>;

/// One gRPC length-prefixed message (uncompressed).
fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(msg);
    b.freeze()
}

/// Splits whole gRPC messages off the front of `buf`.
fn grpc_messages(buf: &mut BytesMut) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() < 5 + len {
            break;
        }
        buf.advance(5);
        out.push(buf.split_to(len).to_vec());
    }
    out
}

fn trailers(status: &str, message: &str) -> hyper::HeaderMap {
    let mut t = hyper::HeaderMap::new();
    t.insert("grpc-status", status.parse().unwrap());
    t.insert("grpc-message", message.parse().unwrap());
    t
}

/// A channel-fed body: what the sender pushes is what goes out, as it is pushed.
fn channel_body() -> (mpsc::Sender<Frame<Bytes>>, Body) {
    let (tx, rx) = mpsc::channel::<Frame<Bytes>>(16);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| (Ok::<_, Infallible>(f), rx))
    });
    (tx, StreamBody::new(stream).boxed())
}

/// The gRPC-style origin: `Unary` echoes with a prefix, `Stream` echoes each message as it
/// arrives, `Fail` answers trailers-only with NOT_FOUND.
async fn origin(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let te = req
        .headers()
        .get("te")
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    let base = || {
        Response::builder()
            .header("content-type", "application/grpc")
            .header("x-origin-saw-te", te.clone())
    };
    match req.uri().path() {
        "/echo.Echo/Unary" => {
            let mut body = req.into_body().collect().await.unwrap().to_bytes();
            let mut buf = BytesMut::from(&body.split_off(0)[..]);
            let msgs = grpc_messages(&mut buf);
            let reply = format!("unary:{}", String::from_utf8_lossy(&msgs.concat()));
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                let _ = tx.send(Frame::data(grpc_frame(reply.as_bytes()))).await;
                let _ = tx.send(Frame::trailers(trailers("0", "all%20good"))).await;
            });
            Ok(base().body(body).unwrap())
        }
        "/echo.Echo/Stream" => {
            let (tx, body) = channel_body();
            let mut incoming = req.into_body();
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                let mut n = 0;
                while let Some(Ok(frame)) = incoming.frame().await {
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                        for m in grpc_messages(&mut buf) {
                            n += 1;
                            let echo = [b"echo:".as_slice(), &m].concat();
                            let _ = tx.send(Frame::data(grpc_frame(&echo))).await;
                        }
                    }
                }
                let _ = tx
                    .send(Frame::trailers(trailers("0", &format!("streamed {n}"))))
                    .await;
            });
            Ok(base().body(body).unwrap())
        }
        _ => Ok(base()
            .header("grpc-status", "5")
            .header("grpc-message", "no such method")
            .body(Full::new(Bytes::new()).boxed())
            .unwrap()),
    }
}

/// Serves h2c (prior knowledge) on an ephemeral port.
async fn start_origin() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), hyper::service::service_fn(origin))
                    .await;
            });
        }
    });
    addr
}

type H2 = hyper::client::conn::http2::SendRequest<Body>;

/// An HTTP/2 connection to the edge over TLS (ALPN h2).
async fn h2(ca: &std::path::Path) -> H2 {
    let tcp = tokio::net::TcpStream::connect(EDGE).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(ca, &[b"h2"]).unwrap());
    let name = rustls::pki_types::ServerName::try_from(HOST.to_owned()).unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

fn grpc_request(method: &str, body: Body) -> Request<Body> {
    Request::post(format!("https://{HOST}:8443/echo.Echo/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap()
}

/// Reads the next data frame (skipping none) or `None` at trailers / end.
async fn next_frame(body: &mut Incoming) -> Option<Frame<Bytes>> {
    tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("a frame within 10 s")
        .map(|f| f.expect("body frame"))
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_trailers_and_bidi_streaming_through_the_edge() {
    let net = DevNetwork::start();
    let origin = start_origin().await;
    net.ctl(&["service", "create", "grpc"]);
    net.ctl(&["mount", "add", &format!("{HOST}/echo.Echo"), "grpc"]);
    let token = net.ctl(&["token", "create", "grpc"])["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let _agent = Proc(start_agent(
        &net,
        &token,
        "grpc",
        &format!("h2c://{origin}"),
        &[],
    ));
    let ca = net.ca();

    // Unary: body and trailers intact (waits until an agent serves the edge).
    let client = h2(&ca).await;
    let resp = eventually(Duration::from_secs(30), || {
        let mut c = client.clone();
        async move {
            let body = Full::new(grpc_frame(b"hello")).boxed();
            let resp = c.send_request(grpc_request("Unary", body)).await.ok()?;
            (resp.status() == 200).then_some(resp)
        }
    })
    .await
    .expect("unary call answered 200 within 30 s");
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    assert_eq!(
        resp.headers()["x-origin-saw-te"],
        "trailers",
        "te: trailers reaches a gRPC origin"
    );
    let collected = resp.into_body().collect().await.unwrap();
    let t = collected.trailers().cloned().expect("response trailers");
    assert_eq!(t["grpc-status"], "0");
    assert_eq!(t["grpc-message"], "all%20good");
    let mut buf = BytesMut::from(&collected.to_bytes()[..]);
    assert_eq!(grpc_messages(&mut buf), vec![b"unary:hello".to_vec()]);

    // Trailers-only error: the status lives in the headers.
    let resp = client
        .clone()
        .send_request(grpc_request("Missing", Full::new(grpc_frame(b"x")).boxed()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["grpc-status"], "5");
    assert_eq!(resp.headers()["grpc-message"], "no such method");

    // Bidirectional streaming: each reply arrives before the next request message is sent.
    let (tx, body) = channel_body();
    tx.send(Frame::data(grpc_frame(b"m0"))).await.unwrap();
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.clone().send_request(grpc_request("Stream", body)),
    )
    .await
    .expect("stream response head within 10 s (the request body is still open)")
    .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    for i in 0..5 {
        let want = format!("echo:m{i}").into_bytes();
        let mut got = Vec::new();
        while got.is_empty() {
            let frame = next_frame(&mut body).await.expect("echo before end");
            buf.extend_from_slice(&frame.into_data().expect("data frame"));
            got = grpc_messages(&mut buf);
        }
        assert_eq!(got, vec![want], "message {i} echoed while the call is open");
        if i < 4 {
            tx.send(Frame::data(grpc_frame(format!("m{}", i + 1).as_bytes())))
                .await
                .unwrap();
        }
    }
    drop(tx);
    let mut trailers = None;
    while let Some(f) = next_frame(&mut body).await {
        if let Ok(t) = f.into_trailers() {
            trailers = Some(t);
        }
    }
    let t = trailers.expect("trailers at the end of the stream");
    assert_eq!(t["grpc-status"], "0");
    assert_eq!(t["grpc-message"], "streamed 5");
}
