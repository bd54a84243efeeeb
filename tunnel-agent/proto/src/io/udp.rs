//! UDP sockets for the tunnel with large kernel buffers: quinn-udp leaves them at the kernel
//! default (~200 KiB on Linux), which caps a QUIC connection at a few tens of MB/s and drops
//! bursts.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Send and receive buffer size asked for.
pub const WANTED_BUFFER: usize = 8 * 1024 * 1024;

/// Buffer sizes the kernel granted, as it reports them (Linux reports twice the usable size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffers {
    pub recv: usize,
    pub send: usize,
}

impl Buffers {
    /// The sysctls to raise when the kernel granted less than [`WANTED_BUFFER`], if any.
    pub fn shortfall(&self) -> Option<String> {
        let mut short = Vec::new();
        if self.recv < WANTED_BUFFER {
            short.push(format!("net.core.rmem_max={WANTED_BUFFER}"));
        }
        if self.send < WANTED_BUFFER {
            short.push(format!("net.core.wmem_max={WANTED_BUFFER}"));
        }
        (!short.is_empty()).then(|| short.join(" "))
    }
}

/// Binds a UDP socket on `addr` and asks for [`WANTED_BUFFER`]-sized buffers each way. Failing
/// to raise them is not an error (the socket still works, slower): callers log
/// [`Buffers::shortfall`].
pub fn bind(addr: SocketAddr) -> std::io::Result<(std::net::UdpSocket, Buffers)> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Same as std: an IPv6 wildcard also takes IPv4 (mapped) where the OS allows.
        let _ = socket.set_only_v6(false);
    }
    if addr.port() != 0 {
        // A restarted edge binds its tunnel port while the old process drains (see the edge's
        // `listen` module); an agent's port-0 socket has nothing to share.
        socket.set_reuse_port(true)?;
    }
    let _ = socket.set_recv_buffer_size(WANTED_BUFFER);
    let _ = socket.set_send_buffer_size(WANTED_BUFFER);
    socket.bind(&addr.into())?;
    let buffers = Buffers {
        recv: socket.recv_buffer_size().unwrap_or(0),
        send: socket.send_buffer_size().unwrap_or(0),
    };
    Ok((socket.into(), buffers))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn binds_and_reports_buffers() {
        let (s, b) = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_ne!(s.local_addr().unwrap().port(), 0);
        assert!(b.recv > 0 && b.send > 0);
        // Whatever the host allows, the shortfall names the sysctl exactly when short.
        assert_eq!(b.shortfall().is_some(), b.recv.min(b.send) < WANTED_BUFFER);
        let short = Buffers {
            recv: 1,
            send: WANTED_BUFFER,
        }
        .shortfall()
        .unwrap();
        assert!(short.contains("net.core.rmem_max") && !short.contains("wmem"));
    }
}
