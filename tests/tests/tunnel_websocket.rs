//! WebSocket end to end: client → edge (HTTP/1.1 upgrade) → QUIC tunnel → agent → demo app
//! `/ws` echo, and back. The handshake and frames are written by hand (RFC 6455), so the test
//! checks the bytes on the wire, not a client library's view of them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use meridian_tests::dev::DevNetwork;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const AMS_HTTP: &str = "127.0.0.11:8080";
const HOST: &str = "edge.meridian.test";

/// A masked client frame (FIN set) with `opcode` and `payload`.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
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

/// Reads one unmasked server frame: (fin, opcode, payload).
async fn server_frame<S: AsyncRead + Unpin>(s: &mut S) -> (bool, u8, Vec<u8>) {
    let read = async {
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
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload).await?;
        Ok::<_, std::io::Error>((h[0] & 0x80 != 0, h[0] & 0x0f, payload))
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("server frame within 10 s")
        .expect("read server frame")
}

/// A whole message (continuation frames joined).
async fn server_message<S: AsyncRead + Unpin>(s: &mut S) -> (u8, Vec<u8>) {
    let (mut fin, opcode, mut payload) = server_frame(s).await;
    while !fin {
        let (f, op, more) = server_frame(s).await;
        assert_eq!(op, 0, "continuation frame");
        fin = f;
        payload.extend_from_slice(&more);
    }
    (opcode, payload)
}

/// Sends the upgrade request and reads the response head (up to the blank line).
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, path: &str) -> String {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("response head within 10 s")
            .unwrap();
        assert_eq!(n, 1, "connection closed during the handshake: {head:?}");
        head.push(byte[0]);
        assert!(head.len() < 16 * 1024, "response head too long");
    }
    String::from_utf8(head).unwrap()
}

async fn connect_when_served() -> TcpStream {
    // The demo agent is registered when `meridian dev` is ready; retry a 503 only briefly.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = TcpStream::connect(AMS_HTTP).await.unwrap();
        let head = handshake(&mut s, "/demo/ws").await;
        if head.starts_with("HTTP/1.1 101") {
            let lower = head.to_ascii_lowercase();
            // RFC 6455 §1.3's example key and accept value.
            assert!(
                lower.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
                "{head}"
            );
            assert!(lower.contains("upgrade: websocket"), "{head}");
            assert!(lower.contains("meridian-region: ams"), "{head}");
            return s;
        }
        assert!(Instant::now() < deadline, "upgrade refused: {head}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_echo_through_the_tunnel() {
    let _net = DevNetwork::start();
    let mut ws = connect_when_served().await;

    // Text, then a 300 KB binary message (larger than a tunnel Data frame and a QUIC packet).
    ws.write_all(&client_frame(0x1, b"hello through the tunnel"))
        .await
        .unwrap();
    assert_eq!(
        server_message(&mut ws).await,
        (0x1, b"hello through the tunnel".to_vec())
    );
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    ws.write_all(&client_frame(0x2, &big)).await.unwrap();
    let (op, echoed) = server_message(&mut ws).await;
    assert_eq!(op, 0x2);
    assert!(
        echoed == big,
        "binary echo matches ({} bytes)",
        echoed.len()
    );

    // Several messages in flight at once keep their order.
    let mut burst = Vec::new();
    for i in 0..20 {
        burst.extend(client_frame(0x1, format!("msg {i}").as_bytes()));
    }
    ws.write_all(&burst).await.unwrap();
    for i in 0..20 {
        assert_eq!(
            server_message(&mut ws).await,
            (0x1, format!("msg {i}").into_bytes())
        );
    }

    // Close: the origin (axum/tungstenite) answers with a Close frame or just closes; either way
    // the close reaches the client through the tunnel within seconds.
    ws.write_all(&client_frame(0x8, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let eof = tokio::time::timeout(Duration::from_secs(5), ws.read_to_end(&mut rest)).await;
    assert!(
        matches!(eof, Ok(Ok(_))),
        "connection closed after Close: {eof:?}"
    );
    assert!(
        rest.is_empty() || rest[0] == 0x88,
        "only a Close frame may follow: {rest:?}"
    );

    // A second, concurrent pair of sessions: upgrades are independent tunnel streams.
    let (mut a, mut b) = (connect_when_served().await, connect_when_served().await);
    a.write_all(&client_frame(0x1, b"from a")).await.unwrap();
    b.write_all(&client_frame(0x1, b"from b")).await.unwrap();
    assert_eq!(server_message(&mut b).await, (0x1, b"from b".to_vec()));
    assert_eq!(server_message(&mut a).await, (0x1, b"from a".to_vec()));
}
