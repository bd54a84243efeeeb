//! Keeps a validated snapshot of the coordinator's state in a `tokio::sync::watch` channel.
//!
//! Fail static (as Envoy and linkerd do): a snapshot that fails [`Snapshot::validate`] is
//! refused and the last good one stays; when the coordinator is away the last good snapshot
//! keeps serving, and it is persisted so a restarted edge cold-starts from it.

use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::client::{Client, MAX_WATCH_LINE};
use crate::types::{Snapshot, WatchEvent};

/// First reconnect delay ceiling.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Reconnect delay ceiling once failures pile up.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct SubscriberConfig {
    pub client: Client,
    /// Where the last good snapshot is kept across restarts; `None` disables the cache.
    pub cache_path: Option<PathBuf>,
}

/// The receiver holds `None` until the first good snapshot (from cache or coordinator) and
/// never goes back to `None` after that.
pub type SnapshotRx = watch::Receiver<Option<Arc<Snapshot>>>;

#[derive(Debug)]
pub struct Subscriber;

impl Subscriber {
    /// Loads the cache (synchronously, so the receiver starts with it), then follows the
    /// coordinator's watch stream in a task. The task ends when every receiver is dropped or
    /// the handle is aborted.
    pub fn spawn(cfg: SubscriberConfig) -> (SnapshotRx, JoinHandle<()>) {
        let initial = cfg.cache_path.as_deref().and_then(|p| match load_cache(p) {
            Ok(Some(s)) => {
                info!(path = %p.display(), revision = s.revision, "loaded cached snapshot");
                Some(Arc::new(s))
            }
            Ok(None) => None,
            Err(e) => {
                warn!(path = %p.display(), error = %e, "ignoring cached snapshot");
                None
            }
        });
        let (tx, rx) = watch::channel(initial);
        let handle = tokio::spawn(async move {
            tokio::select! {
                () = run(cfg, &tx) => {}
                () = tx.closed() => debug!("all snapshot receivers dropped; subscriber stops"),
            }
        });
        (rx, handle)
    }
}

/// What to do with one watch event; pure so it is testable without a server.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// A new, valid snapshot: publish and persist it.
    Publish(Arc<Snapshot>),
    /// Valid but identical to what we have, or a progress line.
    Unchanged,
    /// Refused; the last good snapshot stays.
    Rejected {
        error: String,
        revision: u64,
        observed_version: u64,
    },
    /// A delta that does not apply to what we hold (or yields an invalid or different state):
    /// refused like [`Outcome::Rejected`], and the stream is reopened asking for a snapshot, since
    /// the coordinator's next delta would build on the state we refused.
    Resync {
        error: String,
        revision: u64,
        observed_version: u64,
    },
}

/// Tells the coordinator what we applied (or refused), without holding up the stream; an ack
/// that fails is only logged: the next one supersedes it.
fn send_ack(
    cfg: &SubscriberConfig,
    id: &str,
    revision: u64,
    observed_version: u64,
    error: Option<String>,
) {
    let client = cfg.client.clone();
    let ack = crate::types::WatchAck {
        subscriber: id.to_owned(),
        revision,
        observed_version,
        ok: error.is_none(),
        error,
    };
    tokio::spawn(async move {
        if let Err(e) = client.ack(&ack).await {
            debug!(error = %e, "watch ack not delivered");
        }
    });
}

fn on_event(current: Option<&Snapshot>, ev: WatchEvent) -> Outcome {
    match ev {
        WatchEvent::Progress { .. } => Outcome::Unchanged,
        WatchEvent::Delta(d) => {
            let observed_version = d
                .observed
                .as_ref()
                .map_or(current.map_or(0, |c| c.observed_version), |o| {
                    o.observed_version
                });
            let resync = |error: String| Outcome::Resync {
                error,
                revision: d.revision,
                observed_version,
            };
            let Some(base) = current else {
                return resync(format!(
                    "delta from revision {} but no snapshot held",
                    d.from_revision
                ));
            };
            match crate::delta::apply(base, &d) {
                Ok(s) if s == *base => Outcome::Unchanged,
                Ok(s) => Outcome::Publish(Arc::new(s)),
                Err(e) => resync(e.to_string()),
            }
        }
        WatchEvent::Snapshot(s) => {
            if let Err(error) = s.validate() {
                return Outcome::Rejected {
                    error,
                    revision: s.revision,
                    observed_version: s.observed_version,
                };
            }
            if current == Some(&s) {
                Outcome::Unchanged
            } else {
                Outcome::Publish(Arc::new(s))
            }
        }
    }
}

/// Capped exponential backoff with full jitter (AWS architecture blog's "full jitter").
#[derive(Debug, Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    /// Delay before the next attempt, uniformly drawn from `[0, min(MAX, MIN * 2^attempt)]`
    /// but never below `MIN`; `rand` is any uniformly random u64.
    fn next_delay(&mut self, rand: u64) -> Duration {
        let ceiling = BACKOFF_MIN
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(BACKOFF_MAX);
        self.attempt = self.attempt.saturating_add(1);
        let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        let min_ms = u64::try_from(BACKOFF_MIN.as_millis()).unwrap_or(0);
        Duration::from_millis((rand % (ms + 1)).max(min_ms))
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A random u64 without a dependency: std seeds each `RandomState` from OS randomness.
fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

async fn run(cfg: SubscriberConfig, tx: &watch::Sender<Option<Arc<Snapshot>>>) {
    let mut backoff = Backoff::default();
    let id = format!("{}-{:08x}", std::process::id(), random_u64() as u32);
    let mut resync = false;
    loop {
        match follow(&cfg, tx, &mut backoff, &id, &mut resync).await {
            Ok(()) => info!(
                coordinator = cfg.client.base_url(),
                "watch stream ended; reconnecting"
            ),
            Err(e) => {
                warn!(coordinator = cfg.client.base_url(), error = %e, "watch stream failed; reconnecting")
            }
        }
        let delay = backoff.next_delay(random_u64());
        debug!(?delay, "watch reconnect backoff");
        tokio::time::sleep(delay).await;
    }
}

/// One watch connection: until EOF or error.
async fn follow(
    cfg: &SubscriberConfig,
    tx: &watch::Sender<Option<Arc<Snapshot>>>,
    backoff: &mut Backoff,
    id: &str,
    resync: &mut bool,
) -> Result<(), crate::ClientError> {
    // Resume from what we hold (cache or last stream): the changes since then as a delta, or
    // nothing if nothing changed. After a refused delta, ask for a whole snapshot instead.
    let have = if *resync {
        None
    } else {
        tx.borrow()
            .as_ref()
            .map(|s| (s.revision, s.observed_version))
    };
    let mut events = cfg.client.watch_deltas(have).await?;
    info!(
        coordinator = cfg.client.base_url(),
        "watch stream connected"
    );
    let mut last_heard = Instant::now();
    while let Some(ev) = events.next().await {
        let ev = ev?;
        let since = last_heard.elapsed();
        last_heard = Instant::now();
        let current = tx.borrow().clone();
        match on_event(current.as_deref(), ev) {
            Outcome::Unchanged => {
                debug!(?since, "watch progress");
                backoff.reset();
            }
            Outcome::Rejected {
                error,
                revision,
                observed_version,
            } => {
                warn!(error = %error, "refusing invalid snapshot; keeping the last good one");
                send_ack(cfg, id, revision, observed_version, Some(error));
            }
            Outcome::Resync {
                error,
                revision,
                observed_version,
            } => {
                warn!(error = %error, "refusing delta; keeping the last good snapshot and asking for a whole one");
                send_ack(cfg, id, revision, observed_version, Some(error));
                *resync = true;
                return Ok(());
            }
            Outcome::Publish(snap) => {
                backoff.reset();
                *resync = false;
                send_ack(cfg, id, snap.revision, snap.observed_version, None);
                debug!(
                    revision = snap.revision,
                    observed_version = snap.observed_version,
                    "new snapshot"
                );
                tx.send_replace(Some(snap.clone()));
                if let Some(path) = cfg.cache_path.clone() {
                    let res =
                        tokio::task::spawn_blocking(move || persist_cache(&path, &snap)).await;
                    match res {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => warn!(error = %e, "could not persist snapshot cache"),
                        Err(e) => warn!(error = %e, "snapshot cache writer panicked"),
                    }
                }
            }
        }
    }
    Ok(())
}

/// Reads and validates a cached snapshot; `Ok(None)` when there is no cache file.
pub fn load_cache(path: &Path) -> Result<Option<Snapshot>, String> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    if meta.len() > MAX_WATCH_LINE as u64 {
        return Err(format!("cache file larger than {MAX_WATCH_LINE} bytes"));
    }
    let data = std::fs::read(path).map_err(|e| e.to_string())?;
    let snap: Snapshot = serde_json::from_slice(&data).map_err(|e| format!("decode: {e}"))?;
    snap.validate().map_err(|e| format!("invalid: {e}"))?;
    Ok(Some(snap))
}

/// Writes the snapshot atomically: a temporary file beside the target, fsync, rename.
pub fn persist_cache(path: &Path, snap: &Snapshot) -> std::io::Result<()> {
    use std::io::Write;
    let data = serde_json::to_vec(snap).map_err(std::io::Error::other)?;
    // Roles are pointed at a state dir that may not exist yet; the cache is theirs to create.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp_name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // Make the rename durable too; failure here only weakens durability, not correctness.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;

    use super::*;
    use crate::types::{Mount, Service};

    fn good(rev: u64) -> Snapshot {
        Snapshot {
            revision: rev,
            services: vec![Service {
                name: "web".into(),
                lb_policy: Default::default(),
                ..Default::default()
            }],
            mounts: vec![Mount {
                host: "a.test".into(),
                path_prefix: "/".into(),
                service: "web".into(),
                strip_prefix: false,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn bad(rev: u64) -> Snapshot {
        let mut s = good(rev);
        s.mounts[0].service = "missing".into();
        s
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "mrd-sub-{name}-{}-{}",
            std::process::id(),
            random_u64()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn outcome_rules() {
        let g = good(1);
        assert_eq!(
            on_event(None, WatchEvent::Snapshot(g.clone())),
            Outcome::Publish(Arc::new(g.clone()))
        );
        assert_eq!(
            on_event(Some(&g), WatchEvent::Snapshot(g.clone())),
            Outcome::Unchanged
        );
        assert!(matches!(
            on_event(Some(&g), WatchEvent::Snapshot(bad(2))),
            Outcome::Rejected { .. }
        ));
        assert_eq!(
            on_event(
                Some(&g),
                WatchEvent::Progress {
                    revision: 1,
                    observed_version: 0
                }
            ),
            Outcome::Unchanged
        );
    }

    /// `good(from)` with one more mount, as a delta.
    fn added_mount(from: u64, to: u64) -> (Snapshot, crate::delta::Delta) {
        let mut next = good(to);
        next.mounts.push(Mount {
            host: "b.test".into(),
            path_prefix: "/".into(),
            service: "web".into(),
            strip_prefix: true,
            ..Default::default()
        });
        let mut d = crate::delta::diff(&good(from), &next);
        d.digest = Some(crate::delta::digest(&next));
        (next, d)
    }

    #[test]
    fn delta_outcomes() {
        let (next, d) = added_mount(1, 2);
        assert_eq!(
            on_event(Some(&good(1)), WatchEvent::Delta(d.clone())),
            Outcome::Publish(Arc::new(next.clone()))
        );
        // Applying to the wrong base, or with nothing held, refuses and resyncs.
        assert!(matches!(
            on_event(Some(&good(3)), WatchEvent::Delta(d.clone())),
            Outcome::Resync { revision: 2, .. }
        ));
        assert!(matches!(
            on_event(None, WatchEvent::Delta(d.clone())),
            Outcome::Resync { .. }
        ));
        // A delta whose result fails validation is refused too.
        let mut invalid = d.clone();
        if let Some(crate::delta::DeltaOp::PutMount { mount }) = invalid.ops.first_mut() {
            mount.service = "missing".into();
        }
        invalid.digest = None;
        assert!(matches!(
            on_event(Some(&good(1)), WatchEvent::Delta(invalid)),
            Outcome::Resync { .. }
        ));
        // An empty delta to the same revision changes nothing.
        let same = crate::delta::diff(&next, &next);
        assert_eq!(
            on_event(Some(&next), WatchEvent::Delta(same)),
            Outcome::Unchanged
        );
    }

    #[tokio::test]
    async fn applies_deltas_and_resyncs_with_a_snapshot_when_one_does_not_apply() {
        use axum::extract::RawQuery;
        use axum::routing::get;
        use std::sync::Mutex;
        // Connection 1: snapshot 1, delta 1→2, then a delta from a revision we never had.
        // Connection 2 must ask for a whole snapshot (no revision) and gets revision 5.
        let (two, d12) = added_mount(1, 2);
        let (_, mut stray) = added_mount(3, 4);
        stray.from_revision = 3;
        let queries = Arc::new(Mutex::new(Vec::<String>::new()));
        let q2 = queries.clone();
        let app = axum::Router::new().route(
            "/v1/watch",
            get(move |RawQuery(q): RawQuery| {
                let mut seen = q2.lock().unwrap();
                seen.push(q.unwrap_or_default());
                let lines = if seen.len() == 1 {
                    vec![
                        WatchEvent::Snapshot(good(1)),
                        WatchEvent::Delta(d12.clone()),
                        WatchEvent::Delta(stray.clone()),
                    ]
                } else {
                    vec![WatchEvent::Snapshot(good(5))]
                };
                async move {
                    let chunks = lines.into_iter().map(|ev| {
                        let mut s = serde_json::to_string(&ev).unwrap();
                        s.push('\n');
                        Ok::<_, Infallible>(Bytes::from(s))
                    });
                    axum::body::Body::from_stream(
                        futures_util::stream::iter(chunks).chain(futures_util::stream::pending()),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let dir = tmpdir("delta");
        let path = dir.join("snap.json");
        let client = Client::new(format!("http://{addr}"), "tok").unwrap();
        let (mut rx, handle) = Subscriber::spawn(SubscriberConfig {
            client,
            cache_path: Some(path.clone()),
        });
        wait_for(&mut rx, |s| s == Some(&two)).await;
        wait_for(&mut rx, |s| s.map(|s| s.revision) == Some(5)).await;
        let seen = queries.lock().unwrap().clone();
        assert_eq!(seen[0], "deltas=true");
        assert_eq!(seen[1], "deltas=true", "resync asks for a whole snapshot");
        // The cache is written just after the swap.
        for _ in 0..100 {
            if load_cache(&path) == Ok(Some(good(5))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(load_cache(&path), Ok(Some(good(5))));
        handle.abort();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let mut b = Backoff::default();
        for _ in 0..40 {
            let d = b.next_delay(u64::MAX - 3);
            assert!(d >= BACKOFF_MIN && d <= BACKOFF_MAX, "{d:?}");
        }
        assert_eq!(
            b.next_delay(u64::MAX),
            Duration::from_millis(u64::MAX % 5001).max(BACKOFF_MIN)
        );
        b.reset();
        assert_eq!(b.next_delay(0), BACKOFF_MIN);
        assert!(b.next_delay(1_000_000) <= Duration::from_millis(200));
    }

    #[test]
    fn cache_round_trip_and_rejects_invalid() {
        let dir = tmpdir("cache");
        let path = dir.join("snap.json");
        assert_eq!(load_cache(&path), Ok(None));
        persist_cache(&path, &good(7)).unwrap();
        assert_eq!(load_cache(&path), Ok(Some(good(7))));
        assert!(!dir.join("snap.json.tmp").exists());
        std::fs::write(&path, serde_json::to_vec(&bad(8)).unwrap()).unwrap();
        assert!(load_cache(&path).is_err());
        std::fs::write(&path, b"{garbage").unwrap();
        assert!(load_cache(&path).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn cold_start_from_cache_without_coordinator() {
        let dir = tmpdir("cold");
        let path = dir.join("snap.json");
        persist_cache(&path, &good(3)).unwrap();
        // Port 1 on loopback: nothing listens, connects fail fast.
        let client = Client::new("http://127.0.0.1:1", "t").unwrap();
        let (rx, handle) = Subscriber::spawn(SubscriberConfig {
            client,
            cache_path: Some(path),
        });
        assert_eq!(rx.borrow().as_deref(), Some(&good(3)));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(rx.borrow().as_deref(), Some(&good(3)));
        handle.abort();
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Serves `lines` on every connection, then keeps the stream open; counts connections.
    async fn serve(lines: Vec<WatchEvent>) -> (String, Arc<AtomicUsize>) {
        use axum::routing::get;
        let conns = Arc::new(AtomicUsize::new(0));
        let c2 = conns.clone();
        let app = axum::Router::new().route(
            "/v1/watch",
            get(move |headers: axum::http::HeaderMap| {
                let lines = lines.clone();
                let conns = c2.clone();
                async move {
                    assert_eq!(headers.get("authorization").unwrap(), "Bearer tok");
                    conns.fetch_add(1, Ordering::SeqCst);
                    let chunks = lines.into_iter().map(|ev| {
                        let mut s = serde_json::to_string(&ev).unwrap();
                        s.push('\n');
                        Ok::<_, Infallible>(Bytes::from(s))
                    });
                    let body =
                        futures_util::stream::iter(chunks).chain(futures_util::stream::pending());
                    axum::body::Body::from_stream(body)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}"), conns)
    }

    async fn wait_for(rx: &mut SnapshotRx, pred: impl Fn(Option<&Snapshot>) -> bool) {
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| pred(s.as_deref())))
            .await
            .expect("timed out waiting for snapshot")
            .unwrap();
    }

    #[tokio::test]
    async fn follows_stream_rejects_invalid_and_persists() {
        let (url, conns) = serve(vec![
            WatchEvent::Snapshot(good(1)),
            WatchEvent::Snapshot(bad(2)),
            WatchEvent::Progress {
                revision: 2,
                observed_version: 0,
            },
        ])
        .await;
        let dir = tmpdir("follow");
        let path = dir.join("snap.json");
        let client = Client::new(url, "tok").unwrap();
        let (mut rx, handle) = Subscriber::spawn(SubscriberConfig {
            client,
            cache_path: Some(path.clone()),
        });
        wait_for(&mut rx, |s| s == Some(&good(1))).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The invalid revision 2 was refused; revision 1 stays, and is what the cache holds.
        assert_eq!(rx.borrow().as_deref(), Some(&good(1)));
        assert_eq!(load_cache(&path), Ok(Some(good(1))));
        assert_eq!(conns.load(Ordering::SeqCst), 1);
        handle.abort();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn reconnects_after_eof_and_picks_up_new_state() {
        use axum::routing::get;
        // First connection: good(1) then EOF. Later connections: good(2) and stay open.
        let conns = Arc::new(AtomicUsize::new(0));
        let c2 = conns.clone();
        let app = axum::Router::new().route(
            "/v1/watch",
            get(move || {
                let n = c2.fetch_add(1, Ordering::SeqCst);
                async move {
                    let snap = if n == 0 { good(1) } else { good(2) };
                    let mut s = serde_json::to_string(&WatchEvent::Snapshot(snap)).unwrap();
                    s.push('\n');
                    let first = futures_util::stream::iter([Ok::<_, Infallible>(Bytes::from(s))]);
                    if n == 0 {
                        axum::body::Body::from_stream(first)
                    } else {
                        axum::body::Body::from_stream(first.chain(futures_util::stream::pending()))
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let client = Client::new(format!("http://{addr}"), "tok").unwrap();
        let (mut rx, handle) = Subscriber::spawn(SubscriberConfig {
            client,
            cache_path: None,
        });
        wait_for(&mut rx, |s| s.map(|s| s.revision) == Some(2)).await;
        assert!(conns.load(Ordering::SeqCst) >= 2);
        handle.abort();
    }
}
