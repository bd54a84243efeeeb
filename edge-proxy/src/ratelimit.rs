//! Token-bucket rate limits per client IP and per route, sans-IO (`now` is passed in).
//!
//! A refused request learns when a token will be available (`Retry-After`). The per-key table
//! is bounded: when full, buckets that have refilled completely (indistinguishable from new
//! ones) are dropped first, then the table is cleared rather than grown.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One bucket: `burst` tokens at most, refilled at `rate` per second.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Rate and burst of a limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Rate {
    pub(crate) per_sec: f64,
    pub(crate) burst: f64,
}

impl Bucket {
    fn new(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: rate.burst,
            last: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * rate.per_sec).min(rate.burst);
        self.last = now;
    }

    /// Takes a token, or says how long until one is available.
    pub(crate) fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if rate.per_sec <= 0.0 {
            Err(Duration::from_secs(60))
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate.per_sec))
        }
    }
}

/// Buckets per key behind one short-held mutex (never held across `.await`).
#[derive(Debug)]
pub(crate) struct Limiter<K> {
    rate: Rate,
    max_keys: usize,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    pub(crate) fn new(rate: Rate, max_keys: usize) -> Self {
        Self {
            rate,
            max_keys: max_keys.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = map.get_mut(key) {
            return b.take(self.rate, now);
        }
        if map.len() >= self.max_keys {
            let rate = self.rate;
            map.retain(|_, b| {
                b.refill(rate, now);
                b.tokens < rate.burst
            });
            if map.len() >= self.max_keys {
                map.clear();
            }
        }
        let mut b = Bucket::new(self.rate, now);
        let res = b.take(self.rate, now);
        map.insert(key.clone(), b);
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let l = Limiter::new(
            Rate {
                per_sec: 2.0,
                burst: 3.0,
            },
            100,
        );
        for _ in 0..3 {
            assert_eq!(l.check(&"a", t0), Ok(()));
        }
        let wait = l.check(&"a", t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(400) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        // Other keys are independent.
        assert_eq!(l.check(&"b", t0), Ok(()));
        // Half a second refills one token at 2/s.
        assert_eq!(l.check(&"a", t0 + Duration::from_millis(500)), Ok(()));
        assert!(l.check(&"a", t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn table_stays_bounded() {
        let t0 = Instant::now();
        let rate = Rate {
            per_sec: 1.0,
            burst: 1.0,
        };
        let l = Limiter::new(rate, 10);
        for i in 0..1000u32 {
            let _ = l.check(&i, t0);
            assert!(l.buckets.lock().map(|m| m.len()).unwrap_or(0) <= 10);
        }
    }
}
