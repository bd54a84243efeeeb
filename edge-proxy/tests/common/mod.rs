//! Helpers shared by the edge's integration tests.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Reads a response head through its blank line, a byte at a time, so whatever follows (an
/// upgraded stream's first bytes) stays on the socket.
pub(crate) async fn read_head(s: &mut TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        head.push(byte[0]);
    }
    head
}
