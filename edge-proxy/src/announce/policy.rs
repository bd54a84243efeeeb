//! When to announce the VIP: a pure state machine over periodic health observations.
//!
//! Rise/fall hysteresis keeps one flaky probe from moving every flow hashed to this edge (an ECMP
//! change reshuffles flows on the router), while a drain withdraws at once and for good: on
//! shutdown the route must leave before the listeners do.

use std::time::Instant;

/// One observation of the inputs that decide whether this edge may attract traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// The client listeners accept connections (probed on the VIP when one is configured).
    pub listeners_up: bool,
    /// A configuration snapshot is loaded (from the coordinator or the on-disk cache).
    pub config_fresh: bool,
    /// Backends are reachable as `--anycast-backends` asks.
    pub backends_ok: bool,
}

impl Health {
    /// Every input healthy.
    pub fn ok(&self) -> bool {
        self.listeners_up && self.config_fresh && self.backends_ok
    }

    /// The first failing input, for logs and metrics.
    pub fn reason(&self) -> &'static str {
        if !self.listeners_up {
            "listeners down"
        } else if !self.config_fresh {
            "no configuration"
        } else if !self.backends_ok {
            "no healthy backends"
        } else {
            "healthy"
        }
    }
}

/// Rise/fall thresholds, in consecutive observations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Healthy observations in a row before announcing.
    pub rise: u32,
    /// Unhealthy observations in a row before withdrawing.
    pub fall: u32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self { rise: 3, fall: 2 }
    }
}

/// What the policy wants, and since when.
#[derive(Debug)]
pub struct Policy {
    thresholds: Thresholds,
    announce: bool,
    draining: bool,
    /// Observations in a row that disagree with the current decision.
    streak: u32,
    since: Option<Instant>,
    transitions: u64,
    last: Health,
}

impl Policy {
    /// Starts withdrawn: an edge earns its announcement with `rise` healthy observations.
    pub fn new(thresholds: Thresholds) -> Self {
        Self {
            thresholds: Thresholds {
                rise: thresholds.rise.max(1),
                fall: thresholds.fall.max(1),
            },
            announce: false,
            draining: false,
            streak: 0,
            since: None,
            transitions: 0,
            last: Health::default(),
        }
    }

    /// Feeds one observation; returns whether the VIP should be announced now.
    pub fn observe(&mut self, health: Health, now: Instant) -> bool {
        self.last = health;
        if self.draining {
            return false;
        }
        if health.ok() == self.announce {
            self.streak = 0;
            return self.announce;
        }
        self.streak += 1;
        let needed = if self.announce {
            self.thresholds.fall
        } else {
            self.thresholds.rise
        };
        if self.streak >= needed {
            self.set(!self.announce, now);
        }
        self.announce
    }

    /// Drain or shutdown: withdraw now, whatever the health, and never announce again.
    pub fn drain(&mut self, now: Instant) -> bool {
        self.draining = true;
        if self.announce {
            self.set(false, now);
        }
        false
    }

    fn set(&mut self, announce: bool, now: Instant) {
        self.announce = announce;
        self.streak = 0;
        self.since = Some(now);
        self.transitions += 1;
    }

    /// The current decision.
    pub fn announced(&self) -> bool {
        self.announce
    }

    /// Whether [`Policy::drain`] was called.
    pub fn draining(&self) -> bool {
        self.draining
    }

    /// When the decision last changed (`None` before the first change).
    pub fn since(&self) -> Option<Instant> {
        self.since
    }

    /// Announce/withdraw decisions so far.
    pub fn transitions(&self) -> u64 {
        self.transitions
    }

    /// The last observation fed in.
    pub fn last_health(&self) -> Health {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const UP: Health = Health {
        listeners_up: true,
        config_fresh: true,
        backends_ok: true,
    };
    const NO_BACKENDS: Health = Health {
        listeners_up: true,
        config_fresh: true,
        backends_ok: false,
    };

    fn run(p: &mut Policy, seq: &[Health]) -> Vec<bool> {
        let t0 = Instant::now();
        seq.iter()
            .enumerate()
            .map(|(i, h)| p.observe(*h, t0 + Duration::from_millis(100 * i as u64)))
            .collect()
    }

    #[test]
    fn starts_withdrawn_and_rises_after_rise_healthy_observations() {
        let mut p = Policy::new(Thresholds { rise: 3, fall: 2 });
        assert!(!p.announced());
        assert_eq!(run(&mut p, &[UP, UP, UP, UP]), [false, false, true, true]);
        assert_eq!(p.transitions(), 1);
        assert!(p.since().is_some());
    }

    #[test]
    fn a_failure_resets_the_rise_count() {
        let mut p = Policy::new(Thresholds { rise: 3, fall: 2 });
        assert_eq!(
            run(&mut p, &[UP, UP, NO_BACKENDS, UP, UP, UP]),
            [false, false, false, false, false, true]
        );
    }

    #[test]
    fn falls_after_fall_unhealthy_observations_and_ignores_a_single_blip() {
        let mut p = Policy::new(Thresholds { rise: 1, fall: 2 });
        assert_eq!(
            run(&mut p, &[UP, NO_BACKENDS, UP, NO_BACKENDS, NO_BACKENDS, UP]),
            [true, true, true, true, false, true]
        );
        assert_eq!(p.transitions(), 3);
    }

    #[test]
    fn every_input_counts() {
        for h in [
            Health {
                listeners_up: false,
                ..UP
            },
            Health {
                config_fresh: false,
                ..UP
            },
            NO_BACKENDS,
        ] {
            assert!(!h.ok());
            assert_ne!(h.reason(), "healthy");
            let mut p = Policy::new(Thresholds { rise: 1, fall: 1 });
            assert_eq!(run(&mut p, &[UP, h]), [true, false], "{}", h.reason());
        }
        assert_eq!(UP.reason(), "healthy");
    }

    #[test]
    fn drain_withdraws_at_once_and_for_good() {
        let mut p = Policy::new(Thresholds { rise: 1, fall: 5 });
        let now = Instant::now();
        assert!(p.observe(UP, now));
        assert!(!p.drain(now));
        assert!(!p.announced());
        assert!(p.draining());
        assert!(!p.observe(UP, now));
        assert!(!p.observe(UP, now));
        assert_eq!(p.transitions(), 2);
        // Draining a withdrawn edge is not a transition.
        let mut q = Policy::new(Thresholds::default());
        assert!(!q.drain(now));
        assert_eq!(q.transitions(), 0);
    }

    #[test]
    fn zero_thresholds_act_as_one() {
        let mut p = Policy::new(Thresholds { rise: 0, fall: 0 });
        assert_eq!(run(&mut p, &[UP, NO_BACKENDS, UP]), [true, false, true]);
    }
}
