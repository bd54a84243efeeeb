//! Anycast: announce the edge's VIP over BGP only while the edge can serve, withdraw it first
//! on drain and shutdown.
//!
//! [`Policy`] decides (sans-IO, rise/fall hysteresis); an [`Announcer`] carries the decision to
//! the routing daemon ([`Bird`] over BIRD's control socket today; a GoBGP or embedded speaker
//! could replace it); [`drive`] is the thin loop that probes health and reconciles the two.

mod bird;
pub mod birdc;
mod policy;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use bird::{Bird, BirdOptions, SpawnOptions};
pub use birdc::BirdError;
pub use policy::{Health, Policy, Thresholds};

use crate::state::Shared;

/// The decision is re-sent this often even when unchanged, so a BIRD reconfigured or restarted
/// behind the edge's back (its `disabled` origin back in force) follows the edge again.
const REASSERT_EVERY: Duration = Duration::from_secs(5);

/// Why the routing daemon did not do what the edge asked.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error(transparent)]
    Bird(BirdError),
    #[error("{0}")]
    Backend(String),
}

/// Something that can announce and withdraw this edge's VIP.
pub trait Announcer: Send + 'static {
    /// Announces (`true`) or withdraws (`false`); idempotent.
    fn set(
        &mut self,
        announce: bool,
    ) -> impl std::future::Future<Output = Result<(), AnnounceError>> + Send;
    /// Releases what the backend holds (stops a child daemon); called once, after withdrawing.
    fn stop(&mut self) -> impl std::future::Future<Output = ()> + Send;
    /// For logs.
    fn describe(&self) -> String;
}

/// Which backends must be reachable for the edge to announce.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendPolicy {
    /// At least one mounted service has an agent here whose origin is healthy.
    #[default]
    Any,
    /// Every mounted service has one.
    All,
    /// Backends do not matter (listeners and configuration only).
    None,
}

/// A VIP with its prefix length, e.g. `198.18.0.10/32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vip {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl std::str::FromStr for Vip {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?}: expected an address like 198.18.0.10/32"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?
        };
        Ok(Self { addr, prefix })
    }
}

impl std::fmt::Display for Vip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// How the driver probes and decides.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    /// TCP address whose accept proves the listeners work (the VIP and listener port if set).
    pub(crate) probe: SocketAddr,
    pub(crate) interval: Duration,
    pub(crate) thresholds: Thresholds,
    pub(crate) backends: BackendPolicy,
    /// Time between withdrawing and closing the listeners on shutdown, for the router to move
    /// new flows elsewhere before this edge stops accepting them.
    pub(crate) settle: Duration,
}

/// Announce state shared with `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Status {
    pub(crate) vip: String,
    /// The routing daemon confirmed the announcement.
    pub(crate) announced: AtomicBool,
    /// The policy wants it announced.
    pub(crate) desired: AtomicBool,
    pub(crate) listeners_up: AtomicBool,
    pub(crate) config_fresh: AtomicBool,
    pub(crate) backends_ok: AtomicBool,
    pub(crate) transitions: AtomicU64,
    pub(crate) errors: AtomicU64,
}

/// The probe target for a listener bound to `bound`: the VIP if there is one (proving the VIP is
/// configured locally too), else the bound address (loopback for a wildcard bind).
pub(crate) fn probe_addr(bound: SocketAddr, vip: Option<Vip>) -> SocketAddr {
    match vip {
        Some(v) => SocketAddr::new(v.addr, bound.port()),
        None if bound.ip().is_unspecified() => {
            let lo = if bound.is_ipv4() {
                IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
            } else {
                IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
            };
            SocketAddr::new(lo, bound.port())
        }
        None => bound,
    }
}

/// Puts the VIP on `lo` (needs CAP_NET_ADMIN); a failure is only logged, since operators may
/// configure it themselves — the listener probe on the VIP catches a missing address.
pub(crate) async fn ensure_vip(vip: Vip) {
    let out = tokio::process::Command::new("ip")
        .args(["addr", "replace", &vip.to_string(), "dev", "lo"])
        .output()
        .await;
    match out {
        Ok(o) if o.status.success() => info!(%vip, "VIP on lo"),
        Ok(o) => {
            warn!(%vip, error = %String::from_utf8_lossy(&o.stderr).trim(), "cannot put the VIP on lo")
        }
        Err(e) => warn!(%vip, error = %e, "cannot run `ip` to put the VIP on lo"),
    }
}

async fn observe(shared: &Shared, settings: &Settings) -> Health {
    let listeners_up = matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(settings.probe)
        )
        .await,
        Ok(Ok(_))
    );
    let snapshot = shared.snapshots.borrow().clone();
    let config_fresh = snapshot.is_some();
    let backends_ok = match settings.backends {
        BackendPolicy::None => true,
        policy => {
            let mut services: Vec<&str> = snapshot
                .as_deref()
                .map(|s| s.mounts.iter().map(|m| m.service.as_str()).collect())
                .unwrap_or_default();
            services.sort_unstable();
            services.dedup();
            let healthy = |s: &&str| crate::backend::has_healthy(shared, s);
            match policy {
                BackendPolicy::All => !services.is_empty() && services.iter().all(healthy),
                _ => services.iter().any(healthy),
            }
        }
    };
    Health {
        listeners_up,
        config_fresh,
        backends_ok,
    }
}

/// Probes every `interval`, applies the policy, and keeps the announcer in line with it. On
/// `shutdown`: withdraw, wait `settle`, then cancel `serving` (the listeners close and drain);
/// the announcer is stopped once `stop` is cancelled, after the drain.
pub(crate) async fn drive<A: Announcer>(
    announcer: A,
    settings: Settings,
    shared: Arc<Shared>,
    status: Arc<Status>,
    shutdown: CancellationToken,
    serving: CancellationToken,
    stop: CancellationToken,
) {
    let probe = settings.clone();
    let health = move || {
        let shared = shared.clone();
        let probe = probe.clone();
        async move { observe(&shared, &probe).await }
    };
    run(
        announcer,
        &settings,
        health,
        status,
        Tokens {
            shutdown,
            serving,
            stop,
        },
    )
    .await;
}

/// The three tokens of the shutdown sequence: `shutdown` starts it, `serving` is what this
/// module cancels once withdrawn, `stop` says the drain is over.
struct Tokens {
    shutdown: CancellationToken,
    serving: CancellationToken,
    stop: CancellationToken,
}

/// [`drive`] with the health source abstracted, so the sequence is testable without sockets.
async fn run<A, F, Fut>(
    mut announcer: A,
    settings: &Settings,
    mut health_of: F,
    status: Arc<Status>,
    tokens: Tokens,
) where
    A: Announcer,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Health>,
{
    let Tokens {
        shutdown,
        serving,
        stop,
    } = tokens;
    let mut policy = Policy::new(settings.thresholds);
    // Unknown until the daemon confirms a command: the first round always reaches it.
    let mut applied: Option<bool> = None;
    let mut applied_at = Instant::now();
    let mut last_error = String::new();
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(announcer = %announcer.describe(), vip = %status.vip, "anycast announcer running");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let health = health_of().await;
        status
            .listeners_up
            .store(health.listeners_up, Ordering::Relaxed);
        status
            .config_fresh
            .store(health.config_fresh, Ordering::Relaxed);
        status
            .backends_ok
            .store(health.backends_ok, Ordering::Relaxed);
        let before = policy.announced();
        let want = policy.observe(health, Instant::now());
        status.desired.store(want, Ordering::Relaxed);
        status
            .transitions
            .store(policy.transitions(), Ordering::Relaxed);
        if want != before {
            info!(
                announce = want,
                reason = health.reason(),
                "anycast decision changed"
            );
        }
        if applied == Some(want) && applied_at.elapsed() < REASSERT_EVERY {
            continue;
        }
        match announcer.set(want).await {
            Ok(()) => {
                if applied != Some(want) {
                    info!(vip = %status.vip, announced = want, "anycast route {}", if want { "announced" } else { "withdrawn" });
                }
                applied = Some(want);
                applied_at = Instant::now();
                status.announced.store(want, Ordering::Relaxed);
                last_error.clear();
            }
            Err(e) => {
                applied = None;
                status.errors.fetch_add(1, Ordering::Relaxed);
                let msg = e.to_string();
                if msg != last_error {
                    warn!(error = %msg, "anycast announcer failed; retrying every check");
                    last_error = msg;
                }
            }
        }
    }
    // Shutdown: the route leaves first, then the listeners.
    let was = applied != Some(false);
    policy.drain(Instant::now());
    status.desired.store(false, Ordering::Relaxed);
    match tokio::time::timeout(Duration::from_secs(2), announcer.set(false)).await {
        Ok(Ok(())) => info!(vip = %status.vip, "anycast route withdrawn for shutdown"),
        Ok(Err(e)) => warn!(error = %e, "withdraw on shutdown failed"),
        Err(_) => warn!("withdraw on shutdown timed out"),
    }
    status.announced.store(false, Ordering::Relaxed);
    if was {
        tokio::time::sleep(settings.settle).await;
    }
    serving.cancel();
    stop.cancelled().await;
    announcer.stop().await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use std::sync::Mutex;

    /// Records each call and whether the listeners were still serving at that moment.
    struct Fake {
        calls: Arc<Mutex<Vec<(&'static str, bool)>>>,
        serving: CancellationToken,
        fail: Arc<AtomicBool>,
    }

    impl Announcer for Fake {
        async fn set(&mut self, announce: bool) -> Result<(), AnnounceError> {
            if self.fail.load(Ordering::Relaxed) {
                return Err(AnnounceError::Backend("down".into()));
            }
            let what = if announce { "announce" } else { "withdraw" };
            let mut calls = self.calls.lock().unwrap();
            calls.push((what, !self.serving.is_cancelled()));
            Ok(())
        }
        async fn stop(&mut self) {
            let mut calls = self.calls.lock().unwrap();
            calls.push(("stop", !self.serving.is_cancelled()));
        }
        fn describe(&self) -> String {
            "fake".into()
        }
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(t0.elapsed() < Duration::from_secs(5), "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[tokio::test]
    async fn announces_when_healthy_withdraws_on_failure_and_first_on_shutdown() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let tokens = Tokens {
            shutdown: CancellationToken::new(),
            serving: CancellationToken::new(),
            stop: CancellationToken::new(),
        };
        let (shutdown, serving, stop) = (
            tokens.shutdown.clone(),
            tokens.serving.clone(),
            tokens.stop.clone(),
        );
        let fail = Arc::new(AtomicBool::new(true));
        let fake = Fake {
            calls: calls.clone(),
            serving: serving.clone(),
            fail: fail.clone(),
        };
        let healthy = Arc::new(AtomicBool::new(true));
        let h = healthy.clone();
        let health = move || {
            let ok = h.load(Ordering::Relaxed);
            async move {
                Health {
                    listeners_up: true,
                    config_fresh: true,
                    backends_ok: ok,
                }
            }
        };
        let settings = Settings {
            probe: "127.0.0.1:9".parse().unwrap(),
            interval: Duration::from_millis(5),
            thresholds: Thresholds { rise: 2, fall: 2 },
            backends: BackendPolicy::Any,
            settle: Duration::from_millis(50),
        };
        let status = Arc::new(Status::default());
        let st = status.clone();
        let task = tokio::spawn(async move { run(fake, &settings, health, st, tokens).await });
        let log = || calls.lock().unwrap().clone();

        // The daemon is down at first: errors are counted and retried, nothing is assumed.
        until("errors counted", || {
            status.errors.load(Ordering::Relaxed) >= 2
        })
        .await;
        assert!(!status.announced.load(Ordering::Relaxed));
        fail.store(false, Ordering::Relaxed);
        until("announced", || log().contains(&("announce", true))).await;
        assert!(status.announced.load(Ordering::Relaxed));

        healthy.store(false, Ordering::Relaxed);
        until("withdrawn on failure", || {
            log().last() == Some(&("withdraw", true))
        })
        .await;
        assert!(!status.backends_ok.load(Ordering::Relaxed));
        healthy.store(true, Ordering::Relaxed);
        until("announced again", || {
            log().last() == Some(&("announce", true))
        })
        .await;

        // Shutdown: the withdraw happens while the listeners still serve; they are released
        // after it (and the settle time); the backend is stopped only after the drain.
        shutdown.cancel();
        until("listeners released", || serving.is_cancelled()).await;
        assert_eq!(log().last(), Some(&("withdraw", true)), "{:?}", log());
        assert!(!status.announced.load(Ordering::Relaxed));
        assert!(!log().iter().any(|c| c.0 == "stop"));
        stop.cancel();
        task.await.unwrap();
        assert_eq!(log().last(), Some(&("stop", false)));
    }

    #[test]
    fn parses_vips() {
        let v: Vip = "198.18.0.10/32".parse().unwrap();
        assert_eq!(v.to_string(), "198.18.0.10/32");
        assert_eq!("198.18.0.10".parse::<Vip>().unwrap().prefix, 32);
        assert_eq!("2001:db8::1".parse::<Vip>().unwrap().prefix, 128);
        assert!("198.18.0.10/33".parse::<Vip>().is_err());
        assert!("nope/32".parse::<Vip>().is_err());
    }

    #[test]
    fn probes_the_vip_when_there_is_one() {
        let bound: SocketAddr = "0.0.0.0:80".parse().unwrap();
        assert_eq!(probe_addr(bound, None).to_string(), "127.0.0.1:80");
        let vip = "198.18.0.10/32".parse().ok();
        assert_eq!(probe_addr(bound, vip).to_string(), "198.18.0.10:80");
        let specific: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        assert_eq!(probe_addr(specific, None), specific);
    }
}
