//! SNI passthrough on the HTTPS listener: the ClientHello is read (bounded, under the handshake
//! timeout) and, when its SNI names a passthrough mount, the connection goes undecrypted over a
//! tunnel TCP stream to an agent of the mount's service (the origin terminates TLS). Every other
//! connection is handed to rustls with the bytes already read replayed ([`Rewind`]).
//!
//! The decision ([`decide`]) is sans-IO; [`accept`] is the thin driver.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use coordinator_api::Mount;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::debug;

use crate::routing::normalize_host;
use crate::sni::{self, Peek};
use crate::state::Shared;

/// Where a passthrough host's connections go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) service: Arc<str>,
    /// Write a PROXY protocol v2 header first, so the origin sees the client's address.
    pub(crate) proxy_protocol: bool,
}

/// Passthrough hosts of one snapshot; built once per snapshot, read through an `ArcSwap`.
#[derive(Debug, Default)]
pub(crate) struct Table {
    hosts: HashMap<String, Target>,
}

impl Table {
    pub(crate) fn from_mounts(mounts: &[Mount]) -> Self {
        let mut hosts = HashMap::new();
        for m in mounts.iter().filter(|m| m.passthrough) {
            let Some(host) = normalize_host(&m.host) else {
                continue;
            };
            // First mount for a host wins, as for HTTP routes.
            hosts.entry(host).or_insert_with(|| Target {
                service: Arc::from(m.service.as_str()),
                proxy_protocol: m.proxy_protocol,
            });
        }
        Self { hosts }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }
}

/// What to do with a connection given its first bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Read more (the ClientHello is not complete yet).
    NeedMore,
    /// Terminate TLS here: not TLS, no SNI, an SNI without a passthrough mount, or malformed
    /// (rustls then answers with its own alert).
    Terminate,
    Passthrough(Target),
}

/// Decides on the bytes read so far, sans-IO.
pub(crate) fn decide(buf: &[u8], table: &Table) -> Decision {
    if table.is_empty() {
        return Decision::Terminate;
    }
    match sni::peek(buf) {
        Peek::NeedMore if buf.len() < sni::MAX_PEEK => Decision::NeedMore,
        Peek::NeedMore | Peek::NotTls | Peek::NoSni => Decision::Terminate,
        Peek::Sni(name) => table
            .hosts
            .get(&name)
            .map_or(Decision::Terminate, |t| Decision::Passthrough(t.clone())),
    }
}

/// A stream that first yields bytes already read from it, so rustls sees the ClientHello the
/// passthrough check consumed.
#[derive(Debug)]
pub(crate) struct Rewind<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Rewind<S> {
    pub(crate) fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Bytes read per step while waiting for the ClientHello (grown up to [`sni::MAX_PEEK`]).
const READ_STEP: usize = 4096;

/// Reads until [`decide`] settles; EOF settles as [`Decision::Terminate`] (rustls reports it).
async fn classify(stream: &mut TcpStream, shared: &Shared) -> std::io::Result<(Vec<u8>, Decision)> {
    let mut buf = Vec::new();
    loop {
        // The table is loaded per step and never held across the read.
        let decision = decide(&buf, &shared.passthrough.load());
        if decision != Decision::NeedMore {
            return Ok((buf, decision));
        }
        let start = buf.len();
        buf.resize((start + READ_STEP).min(sni::MAX_PEEK), 0);
        let n = stream.read(&mut buf[start..]).await?;
        buf.truncate(start + n);
        if n == 0 {
            return Ok((buf, Decision::Terminate));
        }
    }
}

/// A connection the edge does not terminate, ready to be carried to its service.
pub(crate) struct Passthrough {
    stream: TcpStream,
    remote: SocketAddr,
    /// The ClientHello bytes already read.
    hello: Vec<u8>,
    target: Target,
}

/// What [`accept`] made of a connection.
// Returned once per connection and unpacked at once; boxing the TLS stream would cost an
// allocation per HTTPS connection for nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Accepted {
    /// Terminated here: serve HTTP on it.
    Tls(TlsStream<Rewind<TcpStream>>),
    Passthrough(Passthrough),
    /// Handshake failed or timed out (logged).
    Failed,
}

/// Reads the ClientHello and either passes the connection through or completes the TLS handshake,
/// both within `timeout` (slowloris-safe: a client trickling its hello gets no longer).
pub(crate) async fn accept(
    mut stream: TcpStream,
    remote: SocketAddr,
    acceptor: &TlsAcceptor,
    shared: &Shared,
    timeout: Duration,
) -> Accepted {
    let deadline = tokio::time::Instant::now() + timeout;
    let (hello, decision) = if shared.passthrough.load().is_empty() {
        (Vec::new(), Decision::Terminate)
    } else {
        match tokio::time::timeout_at(deadline, classify(&mut stream, shared)).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                debug!(%remote, error = %e, "reading the ClientHello failed");
                return Accepted::Failed;
            }
            Err(_) => {
                debug!(%remote, "TLS ClientHello timed out");
                return Accepted::Failed;
            }
        }
    };
    if let Decision::Passthrough(target) = decision {
        return Accepted::Passthrough(Passthrough {
            stream,
            remote,
            hello,
            target,
        });
    }
    match tokio::time::timeout_at(deadline, acceptor.accept(Rewind::new(hello, stream))).await {
        Ok(Ok(s)) => Accepted::Tls(s),
        Ok(Err(e)) => {
            debug!(%remote, error = %e, "TLS handshake failed");
            Accepted::Failed
        }
        Err(_) => {
            debug!(%remote, "TLS handshake timed out");
            Accepted::Failed
        }
    }
}

impl Passthrough {
    /// Carries the connection to an agent of the target's service until either side closes (or
    /// shutdown's drain period ends).
    pub(crate) async fn serve(self, shared: &Shared) {
        let Self {
            stream,
            remote,
            hello,
            target,
        } = self;
        let mut first = Vec::with_capacity(hello.len() + 52);
        if target.proxy_protocol {
            match stream.local_addr() {
                Ok(local) => crate::proxy_protocol::encode_v2(remote, local, &mut first),
                Err(_) => crate::proxy_protocol::encode_v2_local(&mut first),
            }
        }
        first.extend_from_slice(&hello);
        // Agents first; a service without a connected agent goes to its https origins directly.
        let has_agent = shared
            .agents
            .list(&target.service)
            .is_some_and(|l| !l.is_empty());
        let origins = if has_agent {
            Vec::new()
        } else {
            let snap = shared.snapshots.borrow().clone();
            snap.map(|s| tls_origins(&s.services, &target.service))
                .unwrap_or_default()
        };
        let result = if origins.is_empty() {
            crate::tunnel::tcp_stream(stream, &first, &target.service, shared, &shared.draining)
                .await
        } else {
            direct(
                stream,
                &first,
                &origins,
                &shared.draining,
                shared.limits.l4_idle,
            )
            .await
        };
        shared
            .metrics
            .l4
            .record(Kind::Passthrough, &target.service, &result);
        if let Err(e) = result {
            debug!(%remote, service = %target.service, error = %e, "passthrough connection ended");
        }
    }
}

/// `host:port` of a service's `https://` origins (port 443 when the URL has none): the TLS
/// origins a passthrough connection may reach without an agent. Plain-HTTP origins cannot
/// terminate the client's TLS and are left out.
pub(crate) fn tls_origins(services: &[coordinator_api::Service], service: &str) -> Vec<String> {
    let Some(s) = services.iter().find(|s| s.name == service) else {
        return Vec::new();
    };
    s.origins
        .iter()
        .filter_map(|o| {
            let rest = o.url.strip_prefix("https://")?;
            let authority = rest.split('/').next().unwrap_or_default();
            if authority.is_empty() {
                return None;
            }
            // A port is present when the authority ends in `:digits` outside IPv6 brackets.
            let has_port = authority
                .rsplit_once(':')
                .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
            Some(if has_port {
                authority.to_owned()
            } else {
                format!("{authority}:443")
            })
        })
        .collect()
}

/// Time to connect to a direct origin before trying the next.
const ORIGIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Drain period of an open passthrough connection after shutdown starts.
const DIRECT_DRAIN: Duration = Duration::from_secs(10);

/// Carries a passthrough connection straight to one of `origins` (tried from a random start),
/// `first` written ahead of the client's bytes.
async fn direct(
    client: TcpStream,
    first: &[u8],
    origins: &[String],
    shutdown: &tokio_util::sync::CancellationToken,
    idle: Duration,
) -> Result<(), crate::tunnel::TcpError> {
    use tokio::io::AsyncWriteExt;
    let start = rand::random_range(0..origins.len());
    let mut last = None;
    let mut origin = None;
    for i in 0..origins.len() {
        let addr = &origins[(start + i) % origins.len()];
        match tokio::time::timeout(ORIGIN_CONNECT_TIMEOUT, TcpStream::connect(addr.as_str())).await
        {
            Ok(Ok(s)) => {
                origin = Some(s);
                break;
            }
            Ok(Err(e)) => last = Some(e),
            Err(_) => last = Some(std::io::ErrorKind::TimedOut.into()),
        }
    }
    let Some(mut origin) = origin else {
        return Err(last
            .unwrap_or_else(|| std::io::ErrorKind::NotFound.into())
            .into());
    };
    let _ = origin.set_nodelay(true);
    let _ = client.set_nodelay(true);
    origin.write_all(first).await?;
    let activity = crate::l4idle::Activity::new();
    let mut client = crate::l4idle::Tracked::new(client, activity.clone());
    let mut origin = crate::l4idle::Tracked::new(origin, activity.clone());
    let drained = async {
        shutdown.cancelled().await;
        tokio::time::sleep(DIRECT_DRAIN).await;
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut origin) => r.map(|_| ()).map_err(Into::into),
        () = drained => Err(crate::tunnel::TcpError::Shutdown),
        () = activity.idle(idle) => Err(crate::tunnel::TcpError::Idle(idle)),
    }
}

/// Which L4 path a connection took.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    /// TLS passthrough by SNI on the HTTPS listener.
    Passthrough,
    /// A `--tcp-service` listener.
    Tcp,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Passthrough => "passthrough",
            Self::Tcp => "tcp",
        }
    }
}

/// L4 connection counters for `/metrics`, by kind, service and outcome.
#[derive(Debug, Default)]
pub(crate) struct L4Metrics {
    connections: Mutex<HashMap<(Kind, String, &'static str), u64>>,
}

impl L4Metrics {
    /// Counts one finished connection; the lock is held for one map update.
    pub(crate) fn record<T>(
        &self,
        kind: Kind,
        service: &str,
        result: &Result<T, crate::tunnel::TcpError>,
    ) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        };
        let mut g = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        *g.entry((kind, service.to_owned(), outcome)).or_default() += 1;
    }

    /// Appends `meridian_edge_l4_connections_total` in Prometheus text format.
    pub(crate) fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let mut rows: Vec<_> = self
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        rows.sort();
        let _ = writeln!(
            out,
            "# HELP meridian_edge_l4_connections_total Finished L4 connections (TLS passthrough by SNI, TCP services), by service and outcome.\n# TYPE meridian_edge_l4_connections_total counter"
        );
        for ((kind, service, outcome), n) in rows {
            let service: String = service
                .chars()
                .filter(|c| !matches!(c, '"' | '\\' | '\n'))
                .collect();
            let _ = writeln!(
                out,
                "meridian_edge_l4_connections_total{{kind=\"{}\",service=\"{service}\",outcome=\"{outcome}\"}} {n}",
                kind.as_str()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sni::tests::client_hello;

    fn mount(host: &str, service: &str, passthrough: bool, proxy_protocol: bool) -> Mount {
        Mount {
            host: host.into(),
            path_prefix: "/".into(),
            service: service.into(),
            passthrough,
            proxy_protocol,
            ..Default::default()
        }
    }

    fn table() -> Table {
        Table::from_mounts(&[
            mount("Secure.Example.test", "vault", true, true),
            mount("secure.example.test", "other", true, false),
            mount("plain.example.test", "web", false, false),
        ])
    }

    #[test]
    fn passthrough_host_goes_through_others_terminate() {
        let t = table();
        assert_eq!(
            decide(&client_hello("secure.example.test"), &t),
            Decision::Passthrough(Target {
                service: "vault".into(),
                proxy_protocol: true
            }),
            "first mount for a host wins; names compare case-insensitively"
        );
        // An HTTP mount's host, an unknown host, no SNI: the edge terminates TLS.
        for name in ["plain.example.test", "unknown.example.test", "192.0.2.1"] {
            assert_eq!(
                decide(&client_hello(name), &t),
                Decision::Terminate,
                "{name}"
            );
        }
    }

    #[test]
    fn waits_for_the_whole_hello_then_gives_up_at_the_limit() {
        let t = table();
        let hello = client_hello("secure.example.test");
        for cut in [0, 1, 5, hello.len() / 2, hello.len() - 1] {
            assert_eq!(decide(&hello[..cut], &t), Decision::NeedMore, "cut {cut}");
        }
        // A record header announcing a large (allowed) record, never completed: at the peek
        // limit the edge stops reading and lets rustls judge it.
        let mut big = vec![22, 3, 1, 0x48, 0x00];
        big.resize(sni::MAX_PEEK - 1, 0);
        assert_eq!(decide(&big, &t), Decision::NeedMore);
        big.push(0);
        assert_eq!(decide(&big, &t), Decision::Terminate);
    }

    #[test]
    fn malformed_and_plain_http_terminate() {
        let t = table();
        assert_eq!(decide(b"GET / HTTP/1.1\r\n", &t), Decision::Terminate);
        assert_eq!(decide(&[22, 9, 9, 9, 9, 9], &t), Decision::Terminate);
        let mut junk = vec![22, 3, 1, 0, 10];
        junk.extend_from_slice(&[1, 0, 0, 200, 9, 9, 9, 9, 9, 9]);
        assert_eq!(decide(&junk, &t), Decision::Terminate);
        // Without passthrough mounts nothing is read before rustls.
        assert_eq!(
            decide(&[], &Table::default()),
            Decision::Terminate,
            "empty table: no peek"
        );
    }

    #[tokio::test]
    async fn rewind_replays_the_prefix_then_reads_on() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b" world")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        drop(a);
        let mut r = Rewind::new(b"hello".to_vec(), b);
        let mut out = Vec::new();
        r.read_to_end(&mut out)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out, b"hello world");
    }

    #[test]
    fn tls_origins_of_a_service() {
        let svc = coordinator_api::Service {
            name: "vault".into(),
            origins: [
                "https://10.0.0.5:8443",
                "https://vault.internal",
                "http://10.0.0.6:80",
                "https://[2001:db8::1]",
                "https://[2001:db8::2]:9443",
            ]
            .iter()
            .map(|u| coordinator_api::Origin {
                url: (*u).into(),
                ..Default::default()
            })
            .collect(),
            ..Default::default()
        };
        assert_eq!(
            tls_origins(std::slice::from_ref(&svc), "vault"),
            vec![
                "10.0.0.5:8443",
                "vault.internal:443",
                "[2001:db8::1]:443",
                "[2001:db8::2]:9443"
            ]
        );
        assert!(tls_origins(&[svc], "other").is_empty());
    }

    #[test]
    fn metrics_render_by_kind_service_outcome() {
        let m = L4Metrics::default();
        m.record::<()>(Kind::Passthrough, "vault", &Ok(()));
        m.record::<()>(Kind::Passthrough, "vault", &Ok(()));
        m.record::<()>(
            Kind::Tcp,
            "redis",
            &Err(crate::tunnel::TcpError::NoAgent("redis".into())),
        );
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("meridian_edge_l4_connections_total{kind=\"passthrough\",service=\"vault\",outcome=\"ok\"} 2"), "{out}");
        assert!(out.contains("meridian_edge_l4_connections_total{kind=\"tcp\",service=\"redis\",outcome=\"no_agent\"} 1"), "{out}");
    }
}
