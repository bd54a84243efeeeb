//! Passive outlier ejection, sans-IO: a backend connection that fails `threshold` times in a row
//! (origin 5xx, tunnel failures, timeouts) is skipped for a while, growing with each ejection,
//! but never more than `max_share` of a service's backends at once, so a service-wide outage
//! is not turned into "no backend at all" (Envoy's max_ejection_percent).

use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    consecutive: u32,
    ejected_until: Option<Instant>,
    times_ejected: u32,
}

#[derive(Debug)]
pub(crate) struct Detector {
    threshold: u32,
    base: Duration,
    max_share: f64,
    entries: HashMap<u64, Entry>,
}

/// Most tracked backends; beyond it, healthy entries are forgotten first.
const MAX_ENTRIES: usize = 65_536;

impl Default for Detector {
    /// 5 consecutive failures, 10 s base ejection (×2 each time, at most 5 min), 50 % at most.
    fn default() -> Self {
        Self::new(5, Duration::from_secs(10), 0.5)
    }
}

impl Detector {
    pub(crate) fn new(threshold: u32, base: Duration, max_share: f64) -> Self {
        Self {
            threshold: threshold.max(1),
            base,
            max_share,
            entries: HashMap::new(),
        }
    }

    pub(crate) fn is_ejected(&self, key: u64, now: Instant) -> bool {
        self.entries
            .get(&key)
            .and_then(|e| e.ejected_until)
            .is_some_and(|t| now < t)
    }

    /// Records one result for backend `key` (one detector per service). `backends` counts the
    /// service's backends, for the ejected share; it is only called when ejecting is considered.
    pub(crate) fn on_result(
        &mut self,
        key: u64,
        ok: bool,
        now: Instant,
        backends: impl FnOnce() -> usize,
    ) {
        if ok {
            if let Some(e) = self.entries.get_mut(&key) {
                e.consecutive = 0;
                if e.ejected_until.is_some_and(|t| now >= t) {
                    e.ejected_until = None;
                }
            }
            return;
        }
        if self.entries.len() >= MAX_ENTRIES && !self.entries.contains_key(&key) {
            self.entries
                .retain(|_, e| e.ejected_until.is_some() || e.consecutive > 0);
            if self.entries.len() >= MAX_ENTRIES {
                return;
            }
        }
        let e = self.entries.entry(key).or_default();
        e.consecutive += 1;
        if e.consecutive < self.threshold || e.ejected_until.is_some_and(|t| now < t) {
            return;
        }
        let ejected = self
            .entries
            .iter()
            .filter(|&(&k, e)| k != key && e.ejected_until.is_some_and(|t| now < t))
            .count();
        let allowed = (backends() as f64 * self.max_share).floor() as usize;
        if ejected + 1 > allowed {
            return;
        }
        let Some(e) = self.entries.get_mut(&key) else {
            return;
        };
        let factor = 1u32 << e.times_ejected.min(5);
        e.ejected_until = Some(now + (self.base * factor).min(Duration::from_secs(300)));
        e.times_ejected += 1;
        e.consecutive = 0;
    }

    /// Forgets a backend that disconnected.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn forget(&mut self, key: u64) {
        self.entries.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejects_after_consecutive_failures_and_returns() {
        let t0 = Instant::now();
        let mut d = Detector::new(3, Duration::from_secs(10), 0.5);
        let peers = || 2;
        d.on_result(1, false, t0, peers);
        d.on_result(1, false, t0, peers);
        d.on_result(1, true, t0, peers);
        d.on_result(1, false, t0, peers);
        d.on_result(1, false, t0, peers);
        assert!(!d.is_ejected(1, t0), "a success resets the streak");
        d.on_result(1, false, t0, peers);
        assert!(d.is_ejected(1, t0));
        assert!(!d.is_ejected(1, t0 + Duration::from_secs(10)));
        // Second ejection lasts twice as long.
        let t1 = t0 + Duration::from_secs(11);
        for _ in 0..3 {
            d.on_result(1, false, t1, peers);
        }
        assert!(d.is_ejected(1, t1 + Duration::from_secs(19)));
        assert!(!d.is_ejected(1, t1 + Duration::from_secs(20)));
    }

    #[test]
    fn never_ejects_more_than_the_max_share() {
        let t0 = Instant::now();
        let mut d = Detector::new(1, Duration::from_secs(10), 0.5);
        let peers = || 4;
        for k in 1..=4 {
            d.on_result(k, false, t0, peers);
        }
        let ejected = (1..=4).filter(|&k| d.is_ejected(k, t0)).count();
        assert_eq!(ejected, 2);
        // A lone backend is never ejected.
        let mut d = Detector::new(1, Duration::from_secs(10), 0.5);
        d.on_result(9, false, t0, || 1);
        assert!(!d.is_ejected(9, t0));
        d.forget(9);
    }
}
