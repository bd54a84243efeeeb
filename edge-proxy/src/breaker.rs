//! Circuit breaker per backend, sans-IO: `failures` consecutive failures open it (no traffic) for
//! `open_for`; then it is half-open and lets `probes` requests through; a probe's success closes
//! it, a failure opens it again. Unlike outlier ejection (which degrades a backend but still uses
//! it when nothing else is left), an open breaker sends nothing: that is what protects an origin
//! that is drowning from the retries and the traffic of every client at once.
//!
//! The configuration comes with every call, so a service's settings can change live without
//! resetting the state of its backends.

use std::time::{Duration, Instant};

/// A service's breaker settings (`coordinator_api::CircuitBreaker`, in edge units).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Config {
    pub(crate) failures: u32,
    pub(crate) open_for: Duration,
    pub(crate) probes: u32,
}

impl From<&coordinator_api::CircuitBreaker> for Config {
    fn from(c: &coordinator_api::CircuitBreaker) -> Self {
        Self {
            failures: c.failures.max(1),
            open_for: Duration::from_millis(c.open_ms),
            probes: c.half_open_probes.max(1),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    Closed {
        consecutive: u32,
    },
    Open {
        until: Instant,
    },
    /// `in_flight` probes were let through and have not reported yet.
    HalfOpen {
        in_flight: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Breaker {
    state: State,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            state: State::Closed { consecutive: 0 },
        }
    }
}

/// A breaker's state without its counters, for `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Closed,
    Open,
    HalfOpen,
}

impl Phase {
    pub(crate) const ALL: [Self; 3] = [Self::Closed, Self::Open, Self::HalfOpen];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// What [`Breaker::admit`] decided for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Closed: an ordinary request.
    Yes,
    /// Half-open: this request is a probe; its result decides.
    Probe,
    No,
}

impl Breaker {
    #[cfg(test)]
    pub(crate) fn state(&self) -> State {
        self.state
    }

    /// The state as `/metrics` shows it: an open breaker whose period is over is half-open
    /// (its next request is a probe).
    pub(crate) fn phase(&self, now: Instant) -> Phase {
        match self.state {
            State::Closed { .. } => Phase::Closed,
            State::Open { until } if now < until => Phase::Open,
            State::Open { .. } | State::HalfOpen { .. } => Phase::HalfOpen,
        }
    }

    /// Whether a request could go to this backend now, without taking a probe slot (for
    /// filtering candidates before one is chosen).
    pub(crate) fn would_admit(&self, cfg: Config, now: Instant) -> bool {
        match self.state {
            State::Closed { .. } => true,
            State::Open { until } => now >= until,
            State::HalfOpen { in_flight } => in_flight < cfg.probes,
        }
    }

    /// Admits one request (taking a probe slot when half-open).
    pub(crate) fn admit(&mut self, cfg: Config, now: Instant) -> Admit {
        match self.state {
            State::Closed { .. } => Admit::Yes,
            State::Open { until } if now < until => Admit::No,
            State::Open { .. } => {
                self.state = State::HalfOpen { in_flight: 1 };
                Admit::Probe
            }
            State::HalfOpen { in_flight } if in_flight < cfg.probes => {
                self.state = State::HalfOpen {
                    in_flight: in_flight + 1,
                };
                Admit::Probe
            }
            State::HalfOpen { .. } => Admit::No,
        }
    }

    /// Records one request's result.
    pub(crate) fn on_result(&mut self, cfg: Config, ok: bool, now: Instant) {
        self.state = match (self.state, ok) {
            (State::Closed { .. }, true) => State::Closed { consecutive: 0 },
            (State::Closed { consecutive }, false) => {
                let consecutive = consecutive.saturating_add(1);
                if consecutive >= cfg.failures {
                    State::Open {
                        until: now + cfg.open_for,
                    }
                } else {
                    State::Closed { consecutive }
                }
            }
            // A result of a request admitted before the breaker opened: it changes nothing.
            (s @ State::Open { .. }, _) => s,
            (State::HalfOpen { .. }, true) => State::Closed { consecutive: 0 },
            (State::HalfOpen { .. }, false) => State::Open {
                until: now + cfg.open_for,
            },
        };
    }

    /// Whether the breaker keeps traffic away right now.
    #[cfg(test)]
    pub(crate) fn is_open(&self, now: Instant) -> bool {
        matches!(self.state, State::Open { until } if now < until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: Config = Config {
        failures: 3,
        open_for: Duration::from_secs(5),
        probes: 1,
    };

    #[test]
    fn opens_after_consecutive_failures_only() {
        let t = Instant::now();
        let mut b = Breaker::default();
        b.on_result(CFG, false, t);
        b.on_result(CFG, false, t);
        b.on_result(CFG, true, t);
        b.on_result(CFG, false, t);
        b.on_result(CFG, false, t);
        assert_eq!(b.admit(CFG, t), Admit::Yes, "a success in between resets");
        b.on_result(CFG, false, t);
        assert!(b.is_open(t));
        assert_eq!(b.admit(CFG, t), Admit::No);
        assert!(!b.would_admit(CFG, t + Duration::from_secs(4)));
    }

    #[test]
    fn half_open_probe_closes_on_success() {
        let t = Instant::now();
        let mut b = Breaker::default();
        for _ in 0..3 {
            b.on_result(CFG, false, t);
        }
        let later = t + Duration::from_secs(5);
        assert_eq!(b.phase(t), Phase::Open);
        assert_eq!(
            b.phase(later),
            Phase::HalfOpen,
            "period over: the next is a probe"
        );
        assert!(b.would_admit(CFG, later));
        assert_eq!(b.admit(CFG, later), Admit::Probe);
        assert_eq!(b.phase(later), Phase::HalfOpen);
        // One probe at a time.
        assert_eq!(b.admit(CFG, later), Admit::No);
        assert!(!b.would_admit(CFG, later));
        b.on_result(CFG, true, later);
        assert_eq!(b.state(), State::Closed { consecutive: 0 });
        assert_eq!(b.phase(later), Phase::Closed);
        assert_eq!(b.admit(CFG, later), Admit::Yes);
    }

    #[test]
    fn half_open_probe_failure_reopens_for_a_full_period() {
        let t = Instant::now();
        let mut b = Breaker::default();
        for _ in 0..3 {
            b.on_result(CFG, false, t);
        }
        let later = t + Duration::from_secs(6);
        assert_eq!(b.admit(CFG, later), Admit::Probe);
        b.on_result(CFG, false, later);
        assert!(b.is_open(later + Duration::from_secs(4)));
        assert_eq!(b.admit(CFG, later + Duration::from_secs(4)), Admit::No);
        assert_eq!(
            b.admit(CFG, later + Duration::from_secs(5)),
            Admit::Probe,
            "probed again after another open period"
        );
    }

    #[test]
    fn several_probes_and_late_results() {
        let cfg = Config { probes: 2, ..CFG };
        let t = Instant::now();
        let mut b = Breaker::default();
        for _ in 0..3 {
            b.on_result(cfg, false, t);
        }
        // A request admitted before the breaker opened reports late: ignored.
        b.on_result(cfg, true, t);
        assert!(b.is_open(t));
        let later = t + Duration::from_secs(5);
        assert_eq!(b.admit(cfg, later), Admit::Probe);
        assert_eq!(b.admit(cfg, later), Admit::Probe);
        assert_eq!(b.admit(cfg, later), Admit::No);
    }
}
