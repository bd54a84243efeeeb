//! Request-smuggling guard for HTTP/1 client connections.
//!
//! hyper already rejects invalid or conflicting `Content-Length`, a `Transfer-Encoding` that does
//! not end in `chunked`, and obsolete line folding. It *accepts* (and silently normalises) a
//! request carrying both `Content-Length` and `Transfer-Encoding`, or two identical
//! `Content-Length` lines: by the time the handler runs the evidence is gone. Front-ends that
//! normalise such requests are exactly what smuggling chains exploit, so this guard looks at the raw
//! bytes first.
//!
//! [`Guard`] is sans-IO: it follows HTTP/1 message framing (heads, fixed and chunked bodies) and
//! holds back each request head until it is complete and judged. [`Guarded`] is the thin IO
//! wrapper in front of hyper; on a rejected head it feeds hyper an unparseable request line instead,
//! so hyper answers its ordinary `400` and closes, and nothing reaches the handler or any origin.
//! When the guard cannot follow the framing it steps aside: hyper's parser is at least as strict.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use std::future::Future;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What hyper is fed in place of a rejected request head: an invalid method token → 400.
const POISON: &[u8] = b"SMUGGLING\x01 / HTTP/1.1\r\n\r\n";
/// Longest chunk-size line (with extensions) or trailer section followed before stepping aside.
const MAX_CHUNK_LINE: usize = 4096;
/// Free space ensured in the guard's buffer before each read from the client.
const READ_CHUNK: usize = 16 * 1024;
/// Header slots parsed on the stack; a larger `max_headers` takes a heap array.
const STACK_HEADERS: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Head,
    Fixed(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkCrlf,
    Trailers,
    /// Not HTTP/1 framing we follow (h2 preface, upgrade, confusion): hyper decides alone.
    Passthrough,
    Rejected,
}

/// Why a request head was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Smuggling {
    #[error("both Content-Length and Transfer-Encoding")]
    LengthAndEncoding,
    #[error("more than one Content-Length")]
    DuplicateLength,
}

/// Sans-IO framing follower. Feed it client bytes; it returns the bytes safe to hand to hyper.
#[derive(Debug)]
pub(crate) struct Guard {
    state: State,
    held: BytesMut,
    max_head: usize,
    max_headers: usize,
}

impl Guard {
    pub(crate) fn new(max_head: usize, max_headers: usize) -> Self {
        Self {
            state: State::Head,
            held: BytesMut::new(),
            max_head,
            max_headers,
        }
    }

    /// Accepts `input`, appends what may be released to `out`. After an `Err` the connection is
    /// poisoned: the caller substitutes [`POISON`] and stops reading.
    #[cfg(test)]
    pub(crate) fn feed(&mut self, input: &[u8], out: &mut BytesMut) -> Result<(), Smuggling> {
        self.held.extend_from_slice(input);
        self.process(out)
    }

    /// Judges the bytes appended to `held` since the last call (the IO wrapper reads straight
    /// into it, without a bounce buffer) and moves what may be released to `out`.
    pub(crate) fn process(&mut self, out: &mut BytesMut) -> Result<(), Smuggling> {
        loop {
            let progressed = match self.state {
                State::Passthrough => {
                    out.extend_from_slice(&self.held);
                    self.held.clear();
                    return Ok(());
                }
                State::Rejected => return Ok(()),
                State::Head => self.head(out)?,
                State::Fixed(n) => self.release(n, out, State::Head, State::Fixed),
                State::ChunkData(n) => self.release(n, out, State::ChunkCrlf, State::ChunkData),
                State::ChunkCrlf => {
                    if self.held.len() < 2 {
                        false
                    } else if &self.held[..2] == b"\r\n" {
                        self.release_to(2, out);
                        self.state = State::ChunkSize;
                        true
                    } else {
                        self.state = State::Passthrough;
                        true
                    }
                }
                State::ChunkSize => match httparse::parse_chunk_size(&self.held) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        self.release_to(used, out);
                        self.state = if size == 0 {
                            State::Trailers
                        } else {
                            State::ChunkData(size)
                        };
                        true
                    }
                    Ok(httparse::Status::Partial) if self.held.len() <= MAX_CHUNK_LINE => false,
                    _ => {
                        self.state = State::Passthrough;
                        true
                    }
                },
                State::Trailers => {
                    if self.held.starts_with(b"\r\n") {
                        self.release_to(2, out);
                        self.state = State::Head;
                        true
                    } else if let Some(i) = find(&self.held, b"\r\n\r\n") {
                        self.release_to(i + 4, out);
                        self.state = State::Head;
                        true
                    } else if self.held.len() > self.max_head {
                        self.state = State::Passthrough;
                        true
                    } else {
                        false
                    }
                }
            };
            if !progressed || self.held.is_empty() && self.state != State::Passthrough {
                return Ok(());
            }
        }
    }

    /// Moves the first `n` held bytes to `out`. (Copy and advance: `split_to` would turn the
    /// buffer into a shared one, an allocation per call.)
    fn release_to(&mut self, n: usize, out: &mut BytesMut) {
        out.extend_from_slice(&self.held[..n]);
        self.held.advance(n);
    }

    /// Releases up to `n` body bytes; `done` once all are out, else `more(remaining)`.
    fn release(&mut self, n: u64, out: &mut BytesMut, done: State, more: fn(u64) -> State) -> bool {
        let take = usize::try_from(n)
            .unwrap_or(usize::MAX)
            .min(self.held.len());
        self.release_to(take, out);
        let left = n - take as u64;
        self.state = if left == 0 { done } else { more(left) };
        left == 0
    }

    /// Parses a complete head when one is buffered; judges it; picks the body framing.
    fn head(&mut self, out: &mut BytesMut) -> Result<bool, Smuggling> {
        // Leading empty lines before a request line are allowed (RFC 9112 §2.2).
        while self.held.starts_with(b"\r\n") {
            self.release_to(2, out);
        }
        if self.held.is_empty() {
            return Ok(false);
        }
        // Uninitialised slots on the stack: no allocation or zeroing per request head.
        let mut stack =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
        let mut heap = Vec::new();
        let slots: &mut [std::mem::MaybeUninit<httparse::Header<'_>>] =
            if self.max_headers <= STACK_HEADERS {
                &mut stack[..self.max_headers]
            } else {
                heap.resize_with(self.max_headers, std::mem::MaybeUninit::uninit);
                &mut heap
            };
        let mut req = httparse::Request::new(&mut []);
        let used = match req.parse_with_uninit_headers(&self.held, slots) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if self.held.len() <= self.max_head => return Ok(false),
            // Too long, too many headers, not HTTP/1 (the h2 preface), or malformed: hyper will
            // refuse it or it is not ours to follow.
            _ => {
                self.state = State::Passthrough;
                return Ok(true);
            }
        };
        let mut lengths = 0usize;
        let mut length = None;
        let mut chunked = None;
        let mut upgrade = matches!(req.method, Some(m) if m.eq_ignore_ascii_case("CONNECT"));
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                lengths += 1;
                length = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok());
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        let verdict = if lengths > 0 && chunked.is_some() {
            Err(Smuggling::LengthAndEncoding)
        } else if lengths > 1 {
            Err(Smuggling::DuplicateLength)
        } else {
            Ok(())
        };
        if let Err(e) = verdict {
            self.state = State::Rejected;
            self.held.clear();
            return Err(e);
        }
        self.release_to(used, out);
        self.state = match (chunked, length, lengths) {
            // After an upgrade request the bytes may be another protocol; the handler closes the
            // connection when the upgrade is declined, so nothing unchecked follows as HTTP.
            _ if upgrade => State::Passthrough,
            (Some(true), _, _) => State::ChunkSize,
            // Not chunked, or an unparseable length: hyper rejects it.
            (Some(false), _, _) | (None, None, 1..) => State::Passthrough,
            (None, Some(0) | None, _) => State::Head,
            (None, Some(n), _) => State::Fixed(n),
        };
        Ok(true)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Guard {
    /// A request head has begun but is not complete (the slowloris window).
    fn in_partial_head(&self) -> bool {
        self.state == State::Head && !self.held.is_empty()
    }

    /// Following HTTP/1 messages (not an upgraded or h2 connection), so idleness is ours to bound.
    fn following(&self) -> bool {
        !matches!(self.state, State::Passthrough | State::Rejected)
    }
}

/// Time limits the guard enforces, since it (not hyper) now holds partial heads.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GuardLimits {
    pub(crate) max_head: usize,
    pub(crate) max_headers: usize,
    /// From the first byte of a request head to its end.
    pub(crate) head_timeout: Duration,
    /// No byte read or written for this long on an HTTP/1 connection closes it.
    pub(crate) idle_timeout: Duration,
}

/// An HTTP/1 client stream with the [`Guard`] on its read side, and the head and idle timers.
pub(crate) struct Guarded<S> {
    inner: S,
    guard: Guard,
    ready: BytesMut,
    poisoned: bool,
    limits: GuardLimits,
    head_started: Option<Instant>,
    last_activity: Instant,
    timer: Pin<Box<Sleep>>,
}

impl<S> Guarded<S> {
    pub(crate) fn new(inner: S, limits: GuardLimits) -> Self {
        let now = Instant::now();
        Self {
            inner,
            guard: Guard::new(limits.max_head, limits.max_headers),
            ready: BytesMut::new(),
            poisoned: false,
            limits,
            head_started: None,
            last_activity: now,
            timer: Box::pin(tokio::time::sleep_until(now + limits.idle_timeout)),
        }
    }

    /// Arms the relevant deadline; `Err` once it has passed.
    ///
    /// The timer is moved only to an *earlier* deadline: activity pushes the idle deadline back
    /// on every request, and re-registering the timer each time cost a timer-wheel update per
    /// request. A timer that fires before the current deadline is simply re-armed.
    fn check_timers(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let deadline = match self.head_started {
            Some(t) if self.guard.in_partial_head() => t + self.limits.head_timeout,
            _ if self.guard.following() => self.last_activity + self.limits.idle_timeout,
            _ => return Ok(()),
        };
        if deadline < self.timer.deadline() {
            self.timer.as_mut().reset(deadline);
        }
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
            if self.timer.deadline() >= deadline {
                break;
            }
            // Fired at an older, earlier deadline: wait for the current one.
            self.timer.as_mut().reset(deadline);
        }
        let what = if self.guard.in_partial_head() {
            "request head not received in time"
        } else {
            "connection idle"
        };
        Err(io::Error::new(io::ErrorKind::TimedOut, what))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.poisoned {
                return Poll::Ready(Ok(()));
            }
            // Straight into the guard's buffer (no zeroed bounce buffer, one copy less).
            this.guard.held.reserve(READ_CHUNK);
            let read = {
                let fut = tokio::io::AsyncReadExt::read_buf(&mut this.inner, &mut this.guard.held);
                std::pin::pin!(fut).poll(cx)?
            };
            let Poll::Ready(got) = read else {
                this.check_timers(cx)?;
                return Poll::Pending;
            };
            let now = Instant::now();
            this.last_activity = now;
            if got == 0 {
                // EOF: whatever is held goes to hyper, which reports the incomplete message.
                this.ready.extend_from_slice(&this.guard.held.split());
                if this.ready.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.poisoned = true;
                continue;
            }
            if let Err(e) = this.guard.process(&mut this.ready) {
                tracing::debug!(reason = %e, "request smuggling attempt refused");
                this.ready.extend_from_slice(POISON);
                this.poisoned = true;
            }
            if this.guard.in_partial_head() {
                this.head_started.get_or_insert(now);
            } else {
                this.head_started = None;
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.last_activity = Instant::now();
        Poll::Ready(Ok(n))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        this.last_activity = Instant::now();
        Poll::Ready(Ok(n))
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
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

    fn run(input: &[u8], step: usize) -> (Vec<u8>, Result<(), Smuggling>) {
        let mut g = Guard::new(64 * 1024, 100);
        let mut out = BytesMut::new();
        for chunk in input.chunks(step) {
            if let Err(e) = g.feed(chunk, &mut out) {
                return (out.to_vec(), Err(e));
            }
        }
        (out.to_vec(), Ok(()))
    }

    #[test]
    fn ordinary_pipelined_requests_pass_byte_for_byte() {
        let input = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
POST /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nworld\r\n0\r\nX-T: 1\r\n\r\n\
GET /z HTTP/1.1\r\nHost: a\r\n\r\n";
        for step in [1, 3, 7, 64, 4096] {
            let (out, res) = run(input, step);
            assert_eq!(res, Ok(()), "step {step}");
            assert_eq!(out, input.to_vec(), "step {step}");
        }
    }

    #[test]
    fn length_and_encoding_is_refused_before_any_byte_of_it_is_released() {
        let first = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        let mut input = first.clone();
        input.extend_from_slice(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        );
        for step in [1, 5, 4096] {
            let (out, res) = run(&input, step);
            assert_eq!(res, Err(Smuggling::LengthAndEncoding));
            assert_eq!(
                out, first,
                "only the honest request is released (step {step})"
            );
        }
        let (_, res) = run(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\ncontent-length: 4\r\n\r\n",
            4096,
        );
        assert_eq!(res, Err(Smuggling::LengthAndEncoding));
    }

    #[test]
    fn duplicate_length_is_refused_even_when_equal() {
        let (out, res) = run(
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
            4096,
        );
        assert_eq!(res, Err(Smuggling::DuplicateLength));
        assert!(out.is_empty());
    }

    #[test]
    fn a_body_that_looks_like_a_smuggled_head_is_just_a_body() {
        let body = b"X HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut input =
            format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        input.extend_from_slice(body);
        let (out, res) = run(&input, 10);
        assert_eq!(res, Ok(()));
        assert_eq!(out, input);
    }

    #[test]
    fn h2_preface_and_upgrades_pass_through() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04";
        let (out, res) = run(preface, 4096);
        assert_eq!(res, Ok(()));
        assert_eq!(out, preface.to_vec());
        let ws =
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x05hello";
        let (out, res) = run(ws, 4096);
        assert_eq!(res, Ok(()));
        assert_eq!(out, ws.to_vec());
    }

    #[test]
    fn partial_head_is_held_until_complete() {
        let mut g = Guard::new(1024, 100);
        let mut out = BytesMut::new();
        assert_eq!(g.feed(b"GET / HTTP/1.1\r\nHost", &mut out), Ok(()));
        assert!(out.is_empty());
        assert_eq!(g.feed(b": a\r\n\r\n", &mut out), Ok(()));
        assert_eq!(&out[..], b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    }

    #[test]
    fn oversized_head_is_left_to_hyper() {
        let mut g = Guard::new(32, 100);
        let mut out = BytesMut::new();
        let long = b"GET / HTTP/1.1\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        assert_eq!(g.feed(long, &mut out), Ok(()));
        assert_eq!(&out[..], &long[..], "released for hyper to answer 431");
    }
}
