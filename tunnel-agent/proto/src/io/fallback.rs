//! QUIC over TCP+TLS when UDP is blocked: quinn sockets ([`quinn::AsyncUdpSocket`]) whose
//! "datagrams" travel length-prefixed ([`crate::encode_datagram`]) over a byte stream.
//!
//! - Agent: [`StreamSocket`], one per TCP connection, talking to exactly one peer (the edge).
//! - Edge: [`MuxSocket`] wraps the real UDP socket and adds every accepted TCP connection as a
//!   pseudo-peer with a unique fake address (in the `100::/64` discard prefix, RFC 6666), so one
//!   quinn endpoint serves agents on both transports and the tunnel code above is unchanged.
//!
//! A datagram that does not fit a peer's queue is dropped, as a congested UDP path would: QUIC
//! recovers it, and a slow agent never blocks the endpoint's sends to the others.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::{DatagramError, MAX_DATAGRAM, decode_datagram, encode_datagram};

/// Datagrams queued per direction of one TCP connection (~1.5 MB of full-size packets).
const QUEUE: usize = 1024;
/// Datagrams from all TCP peers waiting for the edge's endpoint to read them.
const MUX_INBOUND_QUEUE: usize = 8192;
/// Bytes read from the TCP stream at once.
const READ_CHUNK: usize = 64 * 1024;
/// Coalesce queued datagrams into one write up to this many bytes (one TLS record is 16 KiB).
const WRITE_BATCH: usize = 64 * 1024;

type Datagram = (SocketAddr, Bytes);

/// Pseudo-peer numbers, unique in the process (not per socket), so a fake address names one TCP
/// connection even with several edges in one process, and [`REAL_PEERS`] can be global.
static NEXT_PEER: AtomicU64 = AtomicU64::new(1);
/// Fake address → the TCP connection's real peer address, while the connection is attached: for
/// logs, the admin API and heartbeats, which should show where an agent really is.
static REAL_PEERS: Mutex<BTreeMap<SocketAddr, SocketAddr>> = Mutex::new(BTreeMap::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values (a channel receiver, a peer map) stay consistent across a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Splits a (possibly GSO-batched) transmit into single datagrams.
fn segments<'a>(t: &'a Transmit<'_>) -> impl Iterator<Item = &'a [u8]> {
    let size = t.segment_size.unwrap_or(t.contents.len()).max(1);
    t.contents.chunks(size)
}

/// Moves datagrams between `stream` and quinn until the stream ends, fails, or quinn's side is
/// dropped: bytes read become `(label, datagram)` on `to_quic`; datagrams from `from_quic` are
/// written length-prefixed, coalesced while more are queued.
pub async fn pump<S>(
    stream: S,
    label: SocketAddr,
    to_quic: mpsc::Sender<Datagram>,
    mut from_quic: mpsc::Receiver<Bytes>,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let read = async {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            loop {
                match decode_datagram(&mut buf) {
                    Ok(Some(d)) => {
                        if to_quic.send((label, d)).await.is_err() {
                            return Ok(());
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                }
            }
            buf.reserve(READ_CHUNK);
            if rd.read_buf(&mut buf).await? == 0 {
                return if buf.is_empty() {
                    Ok(())
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
        }
    };
    let write = async {
        let mut out = BytesMut::with_capacity(WRITE_BATCH + MAX_DATAGRAM);
        while let Some(d) = from_quic.recv().await {
            encode(&d, &mut out);
            while out.len() < WRITE_BATCH {
                match from_quic.try_recv() {
                    Ok(d) => encode(&d, &mut out),
                    Err(_) => break,
                }
            }
            wr.write_all(&out).await?;
            wr.flush().await?;
            out.clear();
        }
        wr.shutdown().await
    };
    // Either direction ending ends the connection: QUIC above notices and reconnects.
    tokio::select! {
        r = read => r,
        r = write => r,
    }
}

fn encode(d: &[u8], out: &mut BytesMut) {
    // quinn never hands out empty or >64 KiB datagrams; skip one rather than break the stream.
    if let Err(DatagramError::Empty | DatagramError::TooLarge(_)) = encode_datagram(d, out) {}
}

/// Fills quinn's receive buffers from `rx` without blocking once something was delivered.
fn poll_channel(
    rx: &mut mpsc::Receiver<Datagram>,
    cx: &mut Context<'_>,
    bufs: &mut [IoSliceMut<'_>],
    meta: &mut [RecvMeta],
) -> Poll<usize> {
    let mut n = 0;
    while n < bufs.len().min(meta.len()) {
        let next = if n == 0 {
            match rx.poll_recv(cx) {
                Poll::Ready(Some(d)) => d,
                // Closed: nothing more will arrive; the connection above times out or was closed.
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        } else {
            match rx.try_recv() {
                Ok(d) => d,
                Err(_) => break,
            }
        };
        let (from, data) = next;
        let Some(buf) = bufs.get_mut(n) else { break };
        if data.len() > buf.len() {
            // Larger than quinn's receive buffer: it could not be a packet for us.
            continue;
        }
        buf[..data.len()].copy_from_slice(&data);
        meta[n] = RecvMeta {
            addr: from,
            len: data.len(),
            stride: data.len(),
            ecn: None,
            dst_ip: None,
        };
        n += 1;
    }
    if n == 0 {
        // Everything taken was dropped; ask to be polled again rather than sleeping forever.
        cx.waker().wake_by_ref();
        return Poll::Pending;
    }
    Poll::Ready(n)
}

/// A poller for sockets that never report `WouldBlock`.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Agent side: a quinn socket over one TCP(+TLS) connection to `peer`.
pub struct StreamSocket {
    local: SocketAddr,
    peer: SocketAddr,
    to_stream: mpsc::Sender<Bytes>,
    from_stream: Mutex<mpsc::Receiver<Datagram>>,
}

impl fmt::Debug for StreamSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamSocket")
            .field("local", &self.local)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl StreamSocket {
    /// Wraps `stream`, connected to the edge at `peer` (the address quinn connects to). Returns
    /// the socket and the pump future that must be spawned; it resolves when the TCP connection
    /// ends, after which the socket carries nothing.
    pub fn new<S>(
        stream: S,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> (
        Arc<Self>,
        impl Future<Output = io::Result<()>> + Send + 'static,
    )
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (to_stream, from_quic) = mpsc::channel(QUEUE);
        let (to_quic, from_stream) = mpsc::channel(QUEUE);
        // quinn refuses a remote of another address family than the local socket.
        let local = if local.is_ipv4() == peer.is_ipv4() {
            local
        } else {
            SocketAddr::new(peer.ip(), 0)
        };
        let socket = Arc::new(Self {
            local,
            peer,
            to_stream,
            from_stream: Mutex::new(from_stream),
        });
        (socket, pump(stream, peer, to_quic, from_quic))
    }
}

impl AsyncUdpSocket for StreamSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        for d in segments(transmit) {
            // Full: dropped like a congested UDP packet. Closed: the connection is gone.
            let _ = self.to_stream.try_send(Bytes::copy_from_slice(d));
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        poll_channel(&mut lock(&self.from_stream), cx, bufs, meta).map(Ok)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn may_fragment(&self) -> bool {
        false
    }
}

/// Edge side: the real UDP socket plus TCP pseudo-peers, behind one quinn endpoint.
pub struct MuxSocket {
    udp: Arc<dyn AsyncUdpSocket>,
    inbound_tx: mpsc::Sender<Datagram>,
    inbound: Mutex<mpsc::Receiver<Datagram>>,
    peers: Mutex<HashMap<SocketAddr, mpsc::Sender<Bytes>>>,
    /// Alternates which source `poll_recv` reads first, so neither starves the other.
    tcp_first: AtomicBool,
}

impl fmt::Debug for MuxSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MuxSocket")
            .field("udp", &self.udp)
            .field("tcp_peers", &lock(&self.peers).len())
            .finish_non_exhaustive()
    }
}

impl MuxSocket {
    pub fn new(udp: Arc<dyn AsyncUdpSocket>) -> Arc<Self> {
        let (inbound_tx, inbound) = mpsc::channel(MUX_INBOUND_QUEUE);
        Arc::new(Self {
            udp,
            inbound_tx,
            inbound: Mutex::new(inbound),
            peers: Mutex::new(HashMap::new()),
            tcp_first: AtomicBool::new(false),
        })
    }

    /// The fake address quinn sees for TCP peer number `id` (its real port kept for logs).
    fn fake_addr(id: u64, port: u16) -> SocketAddr {
        let [a, b, c, d] = [id >> 48, id >> 32, id >> 16, id].map(|x| (x & 0xffff) as u16);
        SocketAddr::new(Ipv6Addr::new(0x100, 0, 0, 0, a, b, c, d).into(), port)
    }

    /// Whether `addr` is a TCP pseudo-peer's address (as opposed to a real UDP peer).
    pub fn is_tcp_peer(addr: &SocketAddr) -> bool {
        matches!(addr.ip(), std::net::IpAddr::V6(ip) if ip.segments()[..4] == [0x100, 0, 0, 0])
    }

    /// The real address of the TCP connection behind fake address `addr` while it is attached;
    /// `addr` itself for UDP peers (and for TCP peers already gone).
    pub fn real_peer(addr: SocketAddr) -> SocketAddr {
        if !Self::is_tcp_peer(&addr) {
            return addr;
        }
        lock(&REAL_PEERS).get(&addr).copied().unwrap_or(addr)
    }

    /// TCP connections currently attached.
    pub fn tcp_peers(&self) -> usize {
        lock(&self.peers).len()
    }

    /// Attaches an accepted (TLS) connection as a new pseudo-peer. Returns its fake address and
    /// the pump future to spawn; the peer is detached when that future resolves.
    pub fn add_stream<S>(
        self: &Arc<Self>,
        stream: S,
        real_peer: SocketAddr,
    ) -> (
        SocketAddr,
        impl Future<Output = io::Result<()>> + Send + 'static,
    )
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let id = NEXT_PEER.fetch_add(1, Ordering::Relaxed);
        let fake = Self::fake_addr(id, real_peer.port());
        let (tx, rx) = mpsc::channel(QUEUE);
        lock(&self.peers).insert(fake, tx);
        lock(&REAL_PEERS).insert(fake, real_peer);
        // Moved into the future, so the peer is detached however it ends, even dropped unpolled.
        let detach = Detach {
            mux: self.clone(),
            fake,
        };
        let inbound = self.inbound_tx.clone();
        let fut = async move {
            let _detach = detach;
            pump(stream, fake, inbound, rx).await
        };
        (fake, fut)
    }
}

/// Removes a pseudo-peer from its socket and from [`REAL_PEERS`] when dropped.
struct Detach {
    mux: Arc<MuxSocket>,
    fake: SocketAddr,
}

impl Drop for Detach {
    fn drop(&mut self) {
        lock(&self.mux.peers).remove(&self.fake);
        lock(&REAL_PEERS).remove(&self.fake);
    }
}

impl AsyncUdpSocket for MuxSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        // Only the UDP socket ever says `WouldBlock`.
        self.udp.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        if !Self::is_tcp_peer(&transmit.destination) {
            return self.udp.try_send(transmit);
        }
        let Some(tx) = lock(&self.peers).get(&transmit.destination).cloned() else {
            // A peer whose TCP connection ended: its packets go nowhere.
            return Ok(());
        };
        for d in segments(transmit) {
            let _ = tx.try_send(Bytes::copy_from_slice(d));
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let tcp_first = self.tcp_first.fetch_xor(true, Ordering::Relaxed);
        if tcp_first && let Poll::Ready(n) = poll_channel(&mut lock(&self.inbound), cx, bufs, meta)
        {
            return Poll::Ready(Ok(n));
        }
        if let Poll::Ready(r) = self.udp.poll_recv(cx, bufs, meta) {
            return Poll::Ready(r);
        }
        if !tcp_first && let Poll::Ready(n) = poll_channel(&mut lock(&self.inbound), cx, bufs, meta)
        {
            return Poll::Ready(Ok(n));
        }
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.udp.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.udp.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.udp.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn fake_addresses_are_unique_and_recognised() {
        let a = MuxSocket::fake_addr(1, 4000);
        let b = MuxSocket::fake_addr(2, 4000);
        let far = MuxSocket::fake_addr(u64::MAX, 1);
        assert_ne!(a, b);
        assert!(MuxSocket::is_tcp_peer(&a) && MuxSocket::is_tcp_peer(&far));
        assert!(!MuxSocket::is_tcp_peer(&"127.0.0.1:4000".parse().unwrap()));
        assert!(!MuxSocket::is_tcp_peer(&"[::1]:4000".parse().unwrap()));
    }

    #[tokio::test]
    async fn pump_carries_datagrams_both_ways_and_ends_on_garbage() {
        let (a, b) = tokio::io::duplex(4096);
        let label: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let (to_quic, mut got) = mpsc::channel(16);
        let (send, from_quic) = mpsc::channel(16);
        let pumping = tokio::spawn(pump(a, label, to_quic, from_quic));
        // Far side: write two datagrams, read what the pump writes.
        let (mut far_rd, mut far_wr) = tokio::io::split(b);
        let mut wire = BytesMut::new();
        encode_datagram(b"one", &mut wire).unwrap();
        encode_datagram(&[9u8; 3000], &mut wire).unwrap();
        far_wr.write_all(&wire).await.unwrap();
        assert_eq!(
            got.recv().await.unwrap(),
            (label, Bytes::from_static(b"one"))
        );
        assert_eq!(got.recv().await.unwrap().1.len(), 3000);
        send.send(Bytes::from_static(b"back")).await.unwrap();
        let mut buf = [0u8; 6];
        far_rd.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"\x00\x04back");
        // A zero length prefix is a protocol error that ends the pump.
        far_wr.write_all(&[0, 0]).await.unwrap();
        let r = pumping.await.unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }
}
