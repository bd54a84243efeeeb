//! Capped exponential backoff with full jitter (AWS "full jitter"): the delay before retry `n` is
//! uniform in `[0, min(cap, base * 2^n)]`, so a fleet of agents reconnecting after an edge
//! restart spreads out instead of arriving in waves.

use std::time::{Duration, Instant};

use rand::Rng;

/// First retry ceiling.
pub(crate) const BASE: Duration = Duration::from_millis(100);
/// Largest retry ceiling.
pub(crate) const CAP: Duration = Duration::from_secs(10);
/// A connection that stayed up this long counts as healthy and resets the backoff; one that
/// drops sooner keeps growing it, so a flapping edge is not hammered.
pub(crate) const HEALTHY_AFTER: Duration = Duration::from_secs(5);
/// After a healthy connection drops, retry ceilings stay at most [`FAST_CAP`] for this long: an
/// edge restart is over in seconds and the agent should be back within a second of it
/// (p99 reconnect < 1 s), while an edge that stays down still gets the full backoff after this.
pub(crate) const FAST_WINDOW: Duration = Duration::from_secs(30);
/// Largest retry ceiling inside [`FAST_WINDOW`].
pub(crate) const FAST_CAP: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    /// Until when ceilings are held at [`FAST_CAP`] (set when a healthy connection dropped).
    fast_until: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(BASE, CAP)
    }
}

impl Backoff {
    pub(crate) fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
            fast_until: None,
        }
    }

    /// Upper bound of the next delay.
    pub(crate) fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// Upper bound of the next delay at `now`, inside or outside the fast-reconnect window.
    pub(crate) fn ceiling_at(&self, now: Instant) -> Duration {
        match self.fast_until {
            Some(until) if now < until => self.ceiling().min(FAST_CAP),
            _ => self.ceiling(),
        }
    }

    /// Delay before the next attempt; each call grows the ceiling until the cap.
    pub(crate) fn next_delay<R: Rng + ?Sized>(&mut self, now: Instant, rng: &mut R) -> Duration {
        let ceiling = self.ceiling_at(now);
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=nanos))
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The edge reset our connection statelessly: it restarted and is listening, so retry at
    /// once (with jitter within [`BASE`]) however short-lived the connection was.
    pub(crate) fn on_edge_restart(&mut self, now: Instant) {
        self.reset();
        self.fast_until = Some(now + FAST_WINDOW);
    }

    /// A registered connection ended: reset if it was up long enough to count as healthy.
    pub(crate) fn on_disconnect(&mut self, connected_at: Instant, now: Instant) {
        if now.saturating_duration_since(connected_at) >= HEALTHY_AFTER {
            self.reset();
            self.fast_until = Some(now + FAST_WINDOW);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn ceiling_doubles_then_caps() {
        let mut b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(1);
        let mut ceilings = Vec::new();
        for _ in 0..12 {
            ceilings.push(b.ceiling());
            let d = b.next_delay(Instant::now(), &mut rng);
            assert!(d <= *ceilings.last().unwrap_or(&CAP));
        }
        assert_eq!(ceilings[0], Duration::from_millis(100));
        assert_eq!(ceilings[1], Duration::from_millis(200));
        assert_eq!(ceilings[6], Duration::from_millis(6400));
        assert_eq!(ceilings[7], CAP);
        assert_eq!(ceilings[11], CAP);
    }

    #[test]
    fn never_overflows() {
        let mut b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(2);
        for _ in 0..1000 {
            assert!(b.next_delay(Instant::now(), &mut rng) <= CAP);
        }
    }

    #[test]
    fn full_jitter_spreads() {
        let mut rng = StdRng::seed_from_u64(3);
        let delays: Vec<Duration> = (0..200)
            .map(|_| {
                let mut b = Backoff::default();
                for _ in 0..10 {
                    b.next_delay(Instant::now(), &mut rng);
                }
                b.next_delay(Instant::now(), &mut rng)
            })
            .collect();
        let min = delays.iter().min().copied().unwrap_or_default();
        let max = delays.iter().max().copied().unwrap_or_default();
        assert!(min < Duration::from_secs(1), "min {min:?}");
        assert!(max > Duration::from_secs(9), "max {max:?}");
    }

    #[test]
    fn resets_only_after_healthy_connection() {
        let mut rng = StdRng::seed_from_u64(4);
        let mut b = Backoff::default();
        for _ in 0..5 {
            b.next_delay(Instant::now(), &mut rng);
        }
        let t0 = Instant::now();
        b.on_disconnect(t0, t0 + Duration::from_secs(1));
        assert_eq!(b.ceiling(), Duration::from_millis(3200));
        b.on_disconnect(t0, t0 + HEALTHY_AFTER);
        assert_eq!(b.ceiling(), BASE);
    }

    #[test]
    fn fast_reconnect_window_after_a_healthy_connection_drops() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut b = Backoff::default();
        let t0 = Instant::now();
        let dropped = t0 + Duration::from_secs(60);
        b.on_disconnect(t0, dropped);
        // An edge restart: every retry in the first 30 s waits at most 500 ms.
        let mut now = dropped;
        for _ in 0..20 {
            assert!(b.ceiling_at(now) <= FAST_CAP);
            now += b.next_delay(now, &mut rng);
        }
        assert!(now < dropped + FAST_WINDOW);
        // An edge that stays down: after the window, the exponential ceiling is back.
        let later = dropped + FAST_WINDOW;
        assert_eq!(b.ceiling_at(later), CAP);
        assert!(b.ceiling_at(later - Duration::from_millis(1)) <= FAST_CAP);
        // A flapping edge (up less than HEALTHY_AFTER) does not reopen the window.
        let mut f = Backoff::default();
        f.on_disconnect(t0, t0 + Duration::from_secs(1));
        for _ in 0..8 {
            f.next_delay(t0, &mut rng);
        }
        assert!(f.ceiling_at(t0 + Duration::from_secs(2)) > FAST_CAP);
    }

    #[test]
    fn edge_restart_resets_even_a_short_connection() {
        let mut rng = StdRng::seed_from_u64(6);
        let mut b = Backoff::default();
        for _ in 0..6 {
            b.next_delay(Instant::now(), &mut rng);
        }
        let t0 = Instant::now();
        b.on_edge_restart(t0);
        assert_eq!(b.ceiling_at(t0), BASE);
    }
}
