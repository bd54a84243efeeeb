//! Retry policy, sans-IO: which failures may be retried, and a budget so retries cannot multiply
//! load when a whole service is failing (the "retry storm" Envoy, linkerd and Finagle budget
//! against).

use std::time::{Duration, Instant};

/// How far an attempt got before it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Nothing left the edge, or the agent said it did not start the request (stream reset
    /// with code 3): retrying cannot run the request twice.
    NeverStarted,
    /// The request may have reached the origin (connection lost, stream reset mid-way).
    MaybeStarted,
}

/// Whether a failed attempt may be retried, budget aside.
pub(crate) fn retryable(failure: Failure, idempotent: bool, body_replayable: bool) -> bool {
    body_replayable
        && match failure {
            Failure::NeverStarted => true,
            Failure::MaybeStarted => idempotent,
        }
}

/// Methods RFC 9110 §9.2.2 defines as idempotent.
pub(crate) fn idempotent(method: &[u8]) -> bool {
    matches!(
        method,
        b"GET" | b"HEAD" | b"OPTIONS" | b"TRACE" | b"PUT" | b"DELETE"
    )
}

/// Retries allowed per window: `ratio` of the requests seen in it, plus `min_per_sec` always.
///
/// Counts live in one-second buckets over the window (memory is fixed whatever the load), and
/// every service has its own budget (see [`Budgets`]) so one failing service cannot spend the
/// retries another one needs.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    ratio: f64,
    min_per_sec: f64,
    /// Buckets in the window (its length in whole seconds, at least 1).
    slots: usize,
    /// When bucket 0 of second 0 began.
    origin: Instant,
    /// Per bucket: (the second it counts, requests, retries).
    buckets: Vec<(u64, u64, u64)>,
}

/// Longest window kept, in one-second buckets.
const MAX_SLOTS: usize = 300;

impl RetryBudget {
    pub(crate) fn new(ratio: f64, min_per_sec: f64, window: Duration) -> Self {
        let slots = usize::try_from(window.as_secs())
            .unwrap_or(MAX_SLOTS)
            .clamp(1, MAX_SLOTS);
        Self {
            ratio: ratio.max(0.0),
            min_per_sec: min_per_sec.max(0.0),
            slots,
            origin: Instant::now(),
            buckets: vec![(u64::MAX, 0, 0); slots],
        }
    }

    /// The same counts under new settings (a service's budget changed live).
    pub(crate) fn set_limits(&mut self, ratio: f64, min_per_sec: f64) {
        self.ratio = ratio.max(0.0);
        self.min_per_sec = min_per_sec.max(0.0);
    }

    /// The bucket for `now`, emptied when it last counted an older second.
    fn bucket(&mut self, now: Instant) -> &mut (u64, u64, u64) {
        let sec = now.saturating_duration_since(self.origin).as_secs();
        let i = (sec % self.slots as u64) as usize;
        let b = &mut self.buckets[i];
        if b.0 != sec {
            *b = (sec, 0, 0);
        }
        b
    }

    /// (requests, retries) in the window ending at `now`.
    fn totals(&self, now: Instant) -> (u64, u64) {
        let sec = now.saturating_duration_since(self.origin).as_secs();
        self.buckets
            .iter()
            .filter(|b| b.0 != u64::MAX && b.0 <= sec && sec - b.0 < self.slots as u64)
            .fold((0, 0), |(r, t), b| (r + b.1, t + b.2))
    }

    /// Counts one original request.
    pub(crate) fn on_request(&mut self, now: Instant) {
        let b = self.bucket(now);
        b.1 = b.1.saturating_add(1);
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub(crate) fn try_retry(&mut self, now: Instant) -> bool {
        let (requests, retries) = self.totals(now);
        let allowed = requests as f64 * self.ratio + self.min_per_sec * self.slots as f64;
        if (retries as f64) < allowed {
            let b = self.bucket(now);
            b.2 = b.2.saturating_add(1);
            true
        } else {
            false
        }
    }
}

impl Default for RetryBudget {
    /// 20 % of requests plus 3 retries a second, over 10 s.
    fn default() -> Self {
        Self::new(DEFAULT_RATIO, DEFAULT_MIN_PER_SEC, DEFAULT_WINDOW)
    }
}

const DEFAULT_RATIO: f64 = 0.2;
const DEFAULT_MIN_PER_SEC: f64 = 3.0;
const DEFAULT_WINDOW: Duration = Duration::from_secs(10);

/// A service's budget settings (`coordinator_api::RetryBudget`, or the defaults without one).
pub(crate) fn limits(spec: Option<&coordinator_api::RetryBudget>) -> (f64, f64) {
    spec.map_or((DEFAULT_RATIO, DEFAULT_MIN_PER_SEC), |b| {
        (f64::from(b.percent) / 100.0, f64::from(b.min_per_sec))
    })
}

/// One service's budget, kept in its balancing state across snapshots; the lock is held for a
/// few counter updates, never across `.await`.
#[derive(Debug, Default)]
pub(crate) struct ServiceBudget(std::sync::Mutex<RetryBudget>);

impl ServiceBudget {
    pub(crate) fn new(spec: Option<&coordinator_api::RetryBudget>) -> Self {
        let (ratio, min) = limits(spec);
        Self(std::sync::Mutex::new(RetryBudget::new(
            ratio,
            min,
            DEFAULT_WINDOW,
        )))
    }

    /// A poisoned lock still holds valid counters.
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, RetryBudget> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_may_be_retried() {
        assert!(retryable(Failure::NeverStarted, false, true));
        assert!(retryable(Failure::MaybeStarted, true, true));
        assert!(!retryable(Failure::MaybeStarted, false, true));
        assert!(!retryable(Failure::NeverStarted, true, false));
        assert!(idempotent(b"GET") && idempotent(b"PUT") && idempotent(b"DELETE"));
        assert!(!idempotent(b"POST") && !idempotent(b"PATCH"));
    }

    #[test]
    fn budget_is_a_share_of_traffic_plus_a_floor() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(0.2, 0.5, Duration::from_secs(10));
        // Floor alone: 0.5/s × 10 s = 5 retries with no traffic.
        for _ in 0..5 {
            assert!(b.try_retry(t0));
        }
        assert!(!b.try_retry(t0));
        // 100 requests add 20 more.
        for _ in 0..100 {
            b.on_request(t0);
        }
        for _ in 0..20 {
            assert!(b.try_retry(t0));
        }
        assert!(!b.try_retry(t0), "no retry storm: the budget is spent");
        // The window slides: old requests and retries expire together.
        let later = t0 + Duration::from_secs(11);
        assert!(b.try_retry(later));
    }

    #[test]
    fn memory_is_fixed_under_any_load() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(0.1, 0.0, Duration::from_secs(10));
        for i in 0..1_000_000u64 {
            b.on_request(t0 + Duration::from_micros(i * 5));
        }
        assert_eq!(b.buckets.len(), 10);
        let now = t0 + Duration::from_secs(5);
        let (requests, _) = b.totals(now);
        assert_eq!(requests, 1_000_000);
        // 10 % of a million, no more.
        let granted = (0..200_000).take_while(|_| b.try_retry(now)).count();
        assert_eq!(granted, 100_000);
    }

    #[test]
    fn a_storm_on_one_service_leaves_another_budget_intact() {
        let t0 = Instant::now();
        let a = ServiceBudget::new(None);
        let b = ServiceBudget::new(Some(&coordinator_api::RetryBudget {
            percent: 50,
            min_per_sec: 0,
        }));
        for _ in 0..100 {
            a.lock().on_request(t0);
            b.lock().on_request(t0);
        }
        // Service a fails everything and retries until its budget (20 % + 3/s floor) is spent.
        let spent = (0..1_000).take_while(|_| a.lock().try_retry(t0)).count();
        assert_eq!(spent, 20 + 30);
        assert!(!a.lock().try_retry(t0));
        // b's own budget (50 %, no floor) is untouched by a's storm.
        let granted = (0..1_000).take_while(|_| b.lock().try_retry(t0)).count();
        assert_eq!(granted, 50);
    }

    #[test]
    fn limits_change_live_without_losing_counts() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(0.0, 0.0, Duration::from_secs(10));
        for _ in 0..10 {
            b.on_request(t0);
        }
        assert!(!b.try_retry(t0));
        b.set_limits(1.0, 0.0);
        assert_eq!((0..100).take_while(|_| b.try_retry(t0)).count(), 10);
    }
}
