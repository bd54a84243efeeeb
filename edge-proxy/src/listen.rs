//! Listening sockets that a restarted edge can share with the one it replaces.
//!
//! Every listener sets `SO_REUSEPORT`, so a new edge process binds the same ports while the old
//! one still serves; the old one then drains (SIGTERM). With `net.ipv4.tcp_migrate_req = 1` the
//! kernel hands connections still queued on the old listener to the new one instead of
//! resetting them, so a restart loses no connection attempt.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};
use tracing::warn;

/// Pending connections per listener (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: u32 = 4096;
const MIGRATE_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// A TCP listener on `addr` with `SO_REUSEADDR` and `SO_REUSEPORT`.
pub(crate) fn tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Says once at startup when the kernel would reset, not migrate, the connections queued on
/// this edge's listeners when it stops (a restart would then lose a few connection attempts).
pub(crate) fn warn_unless_migrating() {
    match std::fs::read_to_string(MIGRATE_SYSCTL) {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => warn!(
            "net.ipv4.tcp_migrate_req is 0: connections queued when this edge stops are reset instead of handed to its replacement; set it with: sysctl -w net.ipv4.tcp_migrate_req=1"
        ),
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn two_listeners_share_a_port_and_both_accept() {
        let a = tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = a.local_addr().unwrap();
        let b = tcp(addr).unwrap();
        // Dropping the first leaves the second serving the port.
        drop(a);
        let (client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), b.accept());
        client.unwrap();
        accepted.unwrap();
    }
}
