//! Active health checks of direct origins: a sans-IO checker (when to probe, what a result means)
//! and a thin task that runs the probes. An origin starts healthy (a new service serves at once;
//! retries cover a dead one until `fall` probes say so), `fall` consecutive failed probes take it
//! out of rotation, `rise` consecutive passes put it back (HAProxy's rise/fall).

use std::sync::Weak;
use std::time::{Duration, Instant};

use tracing::{debug, info};

/// Verdicts of the edge's own checks of agents (through the tunnel), by agent connection key.
/// Only failing connections are listed, so the usual answer is a lock-free load of an empty set;
/// writers (a verdict flipping) clone and swap.
#[derive(Debug, Default)]
#[allow(dead_code)] // Written by the tunnel checks, which land next.
pub(crate) struct AgentChecks {
    failing: arc_swap::ArcSwap<std::collections::HashSet<u64>>,
    write: std::sync::Mutex<()>,
}

#[allow(dead_code)]
impl AgentChecks {
    /// Whether agent connection `key` passes the edge's checks (true without checks).
    pub(crate) fn passing(&self, key: u64) -> bool {
        let failing = self.failing.load();
        failing.is_empty() || !failing.contains(&key)
    }

    /// Whether any agent connection fails the edge's checks (a cheap test for the fast path).
    pub(crate) fn any_failing(&self) -> bool {
        !self.failing.load().is_empty()
    }

    pub(crate) fn set(&self, key: u64, healthy: bool) {
        // Held for a clone of a (small) set, never across `.await`.
        let _g = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.failing.load();
        if cur.contains(&key) != healthy {
            return;
        }
        let mut next = (**cur).clone();
        if healthy {
            next.remove(&key);
        } else {
            next.insert(key);
        }
        self.failing.store(std::sync::Arc::new(next));
    }
}

/// A service's check settings in edge units.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Config {
    pub(crate) path: String,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) rise: u32,
    pub(crate) fall: u32,
}

impl From<&coordinator_api::HealthCheck> for Config {
    fn from(h: &coordinator_api::HealthCheck) -> Self {
        let interval = Duration::from_millis(h.interval_ms.max(10));
        Self {
            path: if h.path.starts_with('/') {
                h.path.clone()
            } else {
                format!("/{}", h.path)
            },
            interval,
            timeout: Duration::from_millis(h.timeout_ms.max(1)).min(interval),
            rise: h.rise.max(1),
            fall: h.fall.max(1),
        }
    }
}

/// What the driver should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Send one probe now, giving up after this long.
    Probe(Duration),
    /// Nothing to do before this instant.
    Wait(Instant),
}

/// The state of one origin's checks.
#[derive(Debug)]
pub(crate) struct Checker {
    cfg: Config,
    healthy: bool,
    /// Consecutive results that disagree with `healthy`.
    streak: u32,
    next: Instant,
    probing: bool,
}

impl Checker {
    /// The first probe goes out at once.
    pub(crate) fn new(cfg: Config, now: Instant) -> Self {
        Self {
            cfg,
            healthy: true,
            streak: 0,
            next: now,
            probing: false,
        }
    }

    #[cfg(test)]
    pub(crate) fn healthy(&self) -> bool {
        self.healthy
    }

    pub(crate) fn config(&self) -> &Config {
        &self.cfg
    }

    pub(crate) fn poll(&mut self, now: Instant) -> Action {
        if self.probing || now < self.next {
            return Action::Wait(self.next.max(now));
        }
        self.probing = true;
        Action::Probe(self.cfg.timeout)
    }

    /// Records a probe's result (a timeout is a failure); returns the new verdict when it flipped.
    pub(crate) fn on_result(&mut self, ok: bool, now: Instant) -> Option<bool> {
        self.probing = false;
        self.next = now + self.cfg.interval;
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.healthy {
            self.cfg.fall
        } else {
            self.cfg.rise
        };
        if self.streak >= needed {
            self.healthy = ok;
            self.streak = 0;
            return Some(ok);
        }
        None
    }
}

/// Runs `checker` against `origin`, publishing each verdict, until the origin is dropped (it is
/// no longer in any snapshot and no request holds it): the task holds only a weak reference.
pub(crate) async fn drive(origin: Weak<crate::upstream::OriginHandle>, mut checker: Checker) {
    loop {
        match checker.poll(Instant::now()) {
            Action::Wait(until) => tokio::time::sleep_until(until.into()).await,
            Action::Probe(limit) => {
                let Some(o) = origin.upgrade() else { return };
                let path = checker.config().path.clone();
                let ok = match tokio::time::timeout(limit, o.probe(&path)).await {
                    Ok(Ok(status)) => {
                        let ok = (200..400).contains(&status);
                        if !ok {
                            debug!(origin = %o.id, status, "health check failed");
                        }
                        ok
                    }
                    Ok(Err(e)) => {
                        debug!(origin = %o.id, error = %e, "health check failed");
                        false
                    }
                    Err(_) => {
                        debug!(origin = %o.id, "health check timed out");
                        false
                    }
                };
                if let Some(healthy) = checker.on_result(ok, Instant::now()) {
                    info!(origin = %o.id, healthy, "origin health changed");
                    o.set_healthy(healthy);
                }
            }
        }
        if origin.strong_count() == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            path: "/health".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(200),
            rise: 2,
            fall: 3,
        }
    }

    #[test]
    fn probes_on_the_interval_one_at_a_time() {
        let t = Instant::now();
        let mut c = Checker::new(cfg(), t);
        assert_eq!(c.poll(t), Action::Probe(Duration::from_millis(200)));
        assert_eq!(c.poll(t), Action::Wait(t), "no second probe while one runs");
        c.on_result(true, t);
        assert_eq!(c.poll(t), Action::Wait(t + Duration::from_secs(1)));
        assert!(matches!(
            c.poll(t + Duration::from_secs(1)),
            Action::Probe(_)
        ));
    }

    #[test]
    fn fall_then_rise_with_hysteresis() {
        let t = Instant::now();
        let mut c = Checker::new(cfg(), t);
        assert!(c.healthy());
        assert_eq!(c.on_result(false, t), None);
        assert_eq!(c.on_result(false, t), None);
        assert_eq!(c.on_result(true, t), None, "a pass resets the streak");
        assert_eq!(c.on_result(false, t), None);
        assert_eq!(c.on_result(false, t), None);
        assert_eq!(c.on_result(false, t), Some(false));
        assert!(!c.healthy());
        assert_eq!(c.on_result(true, t), None);
        assert_eq!(c.on_result(false, t), None, "a failure resets the rise");
        assert_eq!(c.on_result(true, t), None);
        assert_eq!(c.on_result(true, t), Some(true));
        assert!(c.healthy());
    }

    #[test]
    fn config_from_the_api_is_bounded() {
        let c = Config::from(&coordinator_api::HealthCheck {
            path: "h".into(),
            interval_ms: 100,
            timeout_ms: 5_000,
            rise: 0,
            fall: 0,
        });
        assert_eq!(c.path, "/h");
        assert_eq!(c.timeout, Duration::from_millis(100));
        assert_eq!((c.rise, c.fall), (1, 1));
    }
}
