//! WebSocket over HTTP/2 (RFC 8441 extended CONNECT): an h2 client over TLS opens a stream with
//! `:method CONNECT`, `:protocol websocket` to the dev network's demo app `/ws` echo (an
//! HTTP/1.1 WebSocket origin behind the tunnel), and exchanges hand-written RFC 6455 frames on
//! it. Two sessions share one HTTP/2 connection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::Request;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meridian_tests::clients::tls_client_config;
use meridian_tests::dev::DevNetwork;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

const HOST: &str = "edge.meridian.test";
const EDGE: &str = "127.0.0.11:8443";

/// A masked client frame (FIN set) with `opcode` and `payload`.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x5au8, 0x13, 0xc4, 0x7e];
    let mut out = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// One whole server message: (opcode, payload), continuation frames joined.
async fn server_message<S: AsyncRead + Unpin>(s: &mut S) -> (u8, Vec<u8>) {
    let read = async {
        let mut opcode = None;
        let mut payload = Vec::new();
        loop {
            let mut h = [0u8; 2];
            s.read_exact(&mut h).await?;
            assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
            let len = match h[1] & 0x7f {
                126 => {
                    let mut b = [0u8; 2];
                    s.read_exact(&mut b).await?;
                    u64::from(u16::from_be_bytes(b))
                }
                127 => {
                    let mut b = [0u8; 8];
                    s.read_exact(&mut b).await?;
                    u64::from_be_bytes(b)
                }
                n => u64::from(n),
            };
            let mut part = vec![0u8; len as usize];
            s.read_exact(&mut part).await?;
            payload.extend_from_slice(&part);
            opcode.get_or_insert(h[0] & 0x0f);
            if h[0] & 0x80 != 0 {
                return Ok::<_, std::io::Error>((opcode.unwrap_or(0), payload));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("server message within 10 s")
        .expect("read server message")
}

type H2 = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

async fn h2(ca: &std::path::Path) -> H2 {
    let tcp = tokio::net::TcpStream::connect(EDGE).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(ca, &[b"h2"]).unwrap());
    let name = rustls::pki_types::ServerName::try_from(HOST.to_owned()).unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// Extended CONNECT to `/demo/ws`; retried briefly until the demo agent serves.
async fn open(client: &H2) -> TokioIo<Upgraded> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut req = Request::connect(format!("https://{HOST}:8443/demo/ws"))
            .header("sec-websocket-version", "13")
            .body(Empty::new())
            .unwrap();
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        let resp = client.clone().send_request(req).await.unwrap();
        if resp.status() == 200 {
            assert!(resp.headers().get("sec-websocket-accept").is_none());
            assert_eq!(resp.headers()["meridian-region"], "ams");
            let up = hyper::upgrade::on(resp).await.expect("upgraded h2 stream");
            return TokioIo::new(up);
        }
        assert!(
            Instant::now() < deadline,
            "extended CONNECT refused: {}",
            resp.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_over_h2_extended_connect() {
    let net = DevNetwork::start();
    let client = h2(&net.ca()).await;
    // The server's SETTINGS must have arrived before the client may use :protocol; one ordinary
    // request guarantees that.
    let warm = Request::get(format!("https://{HOST}:8443/demo/"))
        .body(Empty::new())
        .unwrap();
    // (The h2 client refuses `:protocol` unless the edge sent SETTINGS_ENABLE_CONNECT_PROTOCOL.)
    let _ = client.clone().send_request(warm).await.unwrap();

    let mut ws = open(&client).await;
    ws.write_all(&client_frame(0x1, b"hello over h2"))
        .await
        .unwrap();
    assert_eq!(
        server_message(&mut ws).await,
        (0x1, b"hello over h2".to_vec())
    );
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    ws.write_all(&client_frame(0x2, &big)).await.unwrap();
    let (op, echoed) = server_message(&mut ws).await;
    assert_eq!(op, 0x2);
    assert!(
        echoed == big,
        "binary echo matches ({} bytes)",
        echoed.len()
    );

    // A second session on the same connection, interleaved with the first.
    let mut ws2 = open(&client).await;
    ws2.write_all(&client_frame(0x1, b"second")).await.unwrap();
    ws.write_all(&client_frame(0x1, b"first")).await.unwrap();
    assert_eq!(server_message(&mut ws2).await, (0x1, b"second".to_vec()));
    assert_eq!(server_message(&mut ws).await, (0x1, b"first".to_vec()));

    // Close reaches the origin and its close (or EOF) comes back.
    ws.write_all(&client_frame(0x8, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let eof = tokio::time::timeout(Duration::from_secs(5), ws.read_to_end(&mut rest)).await;
    assert!(
        matches!(eof, Ok(Ok(_))),
        "stream ended after Close: {eof:?}"
    );
    assert!(
        rest.is_empty() || rest[0] == 0x88,
        "only a Close may follow"
    );

    // Other protocols are not spoken.
    let mut req = Request::connect(format!("https://{HOST}:8443/demo/ws"))
        .body(Empty::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("connect-udp"));
    let resp = client.clone().send_request(req).await.unwrap();
    assert_eq!(resp.status(), 501);
}
