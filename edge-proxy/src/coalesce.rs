//! Request coalescing: identical concurrent GET/HEAD requests without credentials, on routes
//! that enable it, share one origin request. The first becomes the leader and forwards; the rest
//! wait for its answer and get a copy. Only answers up to [`MAX_SHARED_BODY`] are shared: a
//! larger one streams to the leader alone and the waiters make their own requests, as they do
//! when the leader is cancelled (its client went away).
//!
//! The in-flight map is behind a mutex held only to insert, look up or remove a key, never
//! across `.await`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::watch;

use crate::forward::{BoxError, RespBody};

/// Largest body copied to waiters.
pub(crate) const MAX_SHARED_BODY: usize = 1024 * 1024;
/// Most distinct keys in flight; beyond it requests are simply not coalesced.
const MAX_KEYS: usize = 10_000;

/// A complete answer the leader got, shared with its waiters.
#[derive(Debug)]
pub(crate) struct Shared {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl Shared {
    fn response(&self) -> Response<RespBody> {
        let mut frames = Vec::with_capacity(2);
        if !self.body.is_empty() {
            frames.push(Ok::<_, BoxError>(hyper::body::Frame::data(
                self.body.clone(),
            )));
        }
        if let Some(t) = &self.trailers {
            frames.push(Ok(hyper::body::Frame::trailers(t.clone())));
        }
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let mut resp = Response::new(body.boxed_unsync());
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers.clone();
        resp
    }
}

/// What the leader publishes: the answer, or `None` when it cannot be shared.
type Outcome = Option<Arc<Shared>>;

/// In-flight coalesced requests of one edge.
#[derive(Debug, Default)]
pub(crate) struct Coalescer {
    inflight: Mutex<HashMap<String, watch::Receiver<Option<Outcome>>>>,
}

/// A request's part in coalescing.
pub(crate) enum Role<'a> {
    /// Forward, then [`Leader::finish`].
    Leader(Leader<'a>),
    /// Wait with [`wait`].
    Follower(watch::Receiver<Option<Outcome>>),
    /// Not coalesced (too many keys).
    Alone,
}

/// The request that goes to the origin; removes its key when dropped, so a cancelled leader
/// releases its waiters (they see the channel close and forward themselves).
pub(crate) struct Leader<'a> {
    owner: &'a Coalescer,
    key: String,
    tx: watch::Sender<Option<Outcome>>,
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        let mut map = self.owner.lock();
        map.remove(&self.key);
    }
}

/// The coalescing key of a request, `None` when it must not be shared: only GET and HEAD,
/// without credentials (`Authorization`, `Cookie`) and without a body; the key includes what the
/// answer may vary on (`Accept`, `Accept-Encoding`, `Accept-Language`).
pub(crate) fn key(
    method: &Method,
    service: &str,
    host: &str,
    path_and_query: &str,
    headers: &HeaderMap,
) -> Option<String> {
    if !(method == Method::GET || method == Method::HEAD)
        || headers.contains_key(header::AUTHORIZATION)
        || headers.contains_key(header::COOKIE)
        || headers.contains_key(header::CONTENT_LENGTH)
        || headers.contains_key(header::TRANSFER_ENCODING)
        || headers.contains_key(header::UPGRADE)
        || headers.contains_key(header::RANGE)
    {
        return None;
    }
    let mut k = String::with_capacity(
        method.as_str().len() + service.len() + host.len() + path_and_query.len() + 64,
    );
    for part in [method.as_str(), service, host, path_and_query] {
        k.push_str(part);
        k.push('\n');
    }
    for h in [
        header::ACCEPT,
        header::ACCEPT_ENCODING,
        header::ACCEPT_LANGUAGE,
    ] {
        for v in headers.get_all(&h) {
            k.push_str(&String::from_utf8_lossy(v.as_bytes()));
            k.push(',');
        }
        k.push('\n');
    }
    Some(k)
}

impl Coalescer {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Receiver<Option<Outcome>>>> {
        // A poisoned map still holds valid receivers.
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins the request with `key` in flight, or leads a new one.
    pub(crate) fn join(&self, key: String) -> Role<'_> {
        let mut map = self.lock();
        if let Some(rx) = map.get(&key) {
            return Role::Follower(rx.clone());
        }
        if map.len() >= MAX_KEYS {
            return Role::Alone;
        }
        let (tx, rx) = watch::channel(None);
        map.insert(key.clone(), rx);
        drop(map);
        Role::Leader(Leader {
            owner: self,
            key,
            tx,
        })
    }

    /// Requests in flight (for tests and metrics).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

impl Leader<'_> {
    /// Publishes the leader's answer to its waiters and returns the leader's own response: the
    /// body is read whole up to [`MAX_SHARED_BODY`]; beyond that the waiters are told to go
    /// alone and the leader's body streams on (bytes read so far first).
    pub(crate) async fn finish(self, resp: Response<RespBody>) -> Response<RespBody> {
        // No new waiters from here on: late arrivals start their own request.
        self.owner.lock().remove(&self.key);
        let (parts, mut body) = resp.into_parts();
        let mut buf = BytesMut::new();
        let mut trailers = None;
        loop {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if buf.len() + data.len() > MAX_SHARED_BODY {
                            let _ = self.tx.send(Some(None));
                            let head = buf.freeze();
                            let first = [
                                Ok(hyper::body::Frame::data(head)),
                                Ok(hyper::body::Frame::data(data)),
                            ];
                            let rest = http_body_util::BodyStream::new(body);
                            let stream = futures_util::StreamExt::chain(
                                futures_util::stream::iter(first),
                                rest,
                            );
                            let body = http_body_util::StreamBody::new(stream).boxed_unsync();
                            return Response::from_parts(parts, body);
                        }
                        buf.extend_from_slice(&data);
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            trailers = Some(t);
                        }
                    }
                },
                Some(Err(e)) => {
                    // The body failed: nothing to share; the leader's client sees the error.
                    let _ = self.tx.send(Some(None));
                    let err = futures_util::stream::iter([Err::<hyper::body::Frame<Bytes>, _>(e)]);
                    let data =
                        futures_util::stream::iter([Ok(hyper::body::Frame::data(buf.freeze()))]);
                    let stream = futures_util::StreamExt::chain(data, err);
                    return Response::from_parts(
                        parts,
                        http_body_util::StreamBody::new(stream).boxed_unsync(),
                    );
                }
            }
        }
        let shared = Arc::new(Shared {
            status: parts.status,
            headers: parts.headers,
            body: buf.freeze(),
            trailers,
        });
        let _ = self.tx.send(Some(Some(shared.clone())));
        let mut resp = shared.response();
        resp.extensions_mut().extend(parts.extensions);
        resp
    }
}

/// Waits for the leader: its answer, or `None` when the waiter must forward on its own.
pub(crate) async fn wait(mut rx: watch::Receiver<Option<Outcome>>) -> Option<Response<RespBody>> {
    let outcome = rx.wait_for(Option::is_some).await.ok()?.clone();
    outcome.flatten().map(|s| s.response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn resp(body: &'static [u8]) -> Response<RespBody> {
        let mut r = Response::new(crate::forward::full(Bytes::from_static(body)));
        r.headers_mut()
            .insert("x-origin", http::HeaderValue::from_static("1"));
        r
    }

    async fn body(r: Response<RespBody>) -> Bytes {
        r.into_body().collect().await.unwrap().to_bytes()
    }

    #[test]
    fn keys() {
        let h = HeaderMap::new();
        let k = |m: &Method, h: &HeaderMap| key(m, "svc", "a.test", "/x?y", h);
        assert!(k(&Method::GET, &h).is_some());
        assert!(k(&Method::HEAD, &h).is_some());
        assert_ne!(k(&Method::GET, &h), k(&Method::HEAD, &h));
        assert!(k(&Method::POST, &h).is_none());
        for (n, v) in [
            ("cookie", "a=1"),
            ("authorization", "Bearer x"),
            ("range", "bytes=0-1"),
        ] {
            let mut with = HeaderMap::new();
            with.insert(
                http::HeaderName::from_static(n),
                http::HeaderValue::from_static(v),
            );
            assert!(k(&Method::GET, &with).is_none(), "{n}");
        }
        let mut gz = HeaderMap::new();
        gz.insert(
            header::ACCEPT_ENCODING,
            http::HeaderValue::from_static("gzip"),
        );
        assert_ne!(
            k(&Method::GET, &gz),
            k(&Method::GET, &h),
            "varies on encoding"
        );
    }

    #[tokio::test]
    async fn followers_get_the_leaders_answer() {
        let c = Coalescer::default();
        let Role::Leader(leader) = c.join("k".into()) else {
            panic!("first is the leader");
        };
        let Role::Follower(rx1) = c.join("k".into()) else {
            panic!("second waits");
        };
        let Role::Follower(rx2) = c.join("k".into()) else {
            panic!("third waits");
        };
        let waiting = tokio::spawn(async move { (wait(rx1).await, wait(rx2).await) });
        let mine = leader.finish(resp(b"hello")).await;
        assert_eq!(body(mine).await, "hello");
        let (a, b) = waiting.await.unwrap();
        let a = a.unwrap();
        assert_eq!(a.headers()["x-origin"], "1");
        assert_eq!(body(a).await, "hello");
        assert_eq!(body(b.unwrap()).await, "hello");
        assert_eq!(c.len(), 0);
        assert!(
            matches!(c.join("k".into()), Role::Leader(_)),
            "a new round after"
        );
    }

    #[tokio::test]
    async fn a_cancelled_leader_releases_its_waiters() {
        let c = Coalescer::default();
        let leader = c.join("k".into());
        let Role::Follower(rx) = c.join("k".into()) else {
            panic!("waits");
        };
        drop(leader);
        assert!(wait(rx).await.is_none(), "the waiter goes alone");
        assert_eq!(c.len(), 0);
    }

    #[tokio::test]
    async fn large_answers_are_not_shared_but_reach_the_leader_whole() {
        let c = Coalescer::default();
        let Role::Leader(leader) = c.join("k".into()) else {
            panic!("leader");
        };
        let Role::Follower(rx) = c.join("k".into()) else {
            panic!("waits");
        };
        let chunk = Bytes::from(vec![7u8; 300 * 1024]);
        let frames: Vec<Result<_, BoxError>> = (0..5)
            .map(|_| Ok(hyper::body::Frame::data(chunk.clone())))
            .collect();
        let big = Response::new(
            http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync(),
        );
        let mine = leader.finish(big).await;
        assert!(wait(rx).await.is_none());
        assert_eq!(body(mine).await.len(), 5 * 300 * 1024);
    }
}
