//! Idle timeout for L4 connections (TCP services, TLS passthrough): a spliced connection that
//! moves no byte either way for the timeout is closed, like HAProxy's `timeout tunnel`. Without
//! it a client that vanished without a FIN (a dropped NAT mapping, a crashed host) would hold a
//! connection slot, a tunnel stream and an origin connection forever.
//!
//! Readers are wrapped in [`Tracked`], which stamps [`Activity`] on every read that returns
//! bytes; [`Activity::idle`] resolves once the newest stamp is older than the timeout.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When a connection last moved bytes, as milliseconds since it started (one relaxed store per
/// read; no lock, no timer reset on the data path).
#[derive(Debug)]
pub(crate) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// The moment the connection counts as idle, given the latest activity.
    fn deadline(&self, timeout: Duration) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + timeout
    }

    /// Resolves once nothing was read either way for `timeout`; never for a zero `timeout`
    /// (`--l4-idle-timeout 0` turns the limit off, as an unset `timeout tunnel` does in HAProxy,
    /// instead of cutting every connection at once). Sleeps until the current deadline and
    /// re-checks, so traffic costs no timer work.
    pub(crate) async fn idle(&self, timeout: Duration) {
        if timeout.is_zero() {
            return std::future::pending().await;
        }
        loop {
            let deadline = self.deadline(timeout);
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A stream whose reads stamp an [`Activity`]; writes pass through.
#[derive(Debug)]
pub(crate) struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Tracked<S> {
    pub(crate) fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }

    pub(crate) fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn reads_push_the_deadline_and_silence_ends_it() {
        let act = Activity::new();
        let (a, mut b) = tokio::io::duplex(64);
        let mut a = Tracked::new(a, act.clone());
        let timeout = Duration::from_secs(10);
        let t0 = Instant::now();
        // Bytes every 6 s keep it alive past the first 10 s.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            b.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            a.read_exact(&mut one).await.unwrap();
        }
        act.idle(timeout).await;
        let waited = t0.elapsed();
        assert_eq!(
            waited,
            Duration::from_secs(28),
            "18 s of traffic, then 10 s of silence"
        );
        // Writes alone do not count: the peer may have vanished.
        let act = Activity::new();
        let (a, _b) = tokio::io::duplex(64);
        let mut a = Tracked::new(a, act.clone());
        a.write_all(b"y").await.unwrap();
        let t1 = Instant::now();
        act.idle(timeout).await;
        assert_eq!(t1.elapsed(), timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_timeout_never_fires() {
        let act = Activity::new();
        let fired = tokio::time::timeout(Duration::from_secs(86_400), act.idle(Duration::ZERO));
        assert!(fired.await.is_err(), "0 turns the idle limit off");
    }
}
