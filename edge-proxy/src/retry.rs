//! Retry policy, sans-IO: which failures may be retried, and a budget so retries cannot multiply
//! load when a whole service is failing (the "retry storm" Envoy, linkerd and Finagle budget
//! against).

use std::collections::VecDeque;
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
#[derive(Debug)]
pub(crate) struct RetryBudget {
    ratio: f64,
    min_per_sec: f64,
    window: Duration,
    requests: VecDeque<Instant>,
    retries: VecDeque<Instant>,
}

/// Most timestamps kept per queue, so memory stays bounded under any load; beyond it the
/// oldest are dropped (the budget then errs on the side of fewer retries).
const MAX_TRACKED: usize = 100_000;

impl RetryBudget {
    pub(crate) fn new(ratio: f64, min_per_sec: f64, window: Duration) -> Self {
        Self {
            ratio,
            min_per_sec,
            window,
            requests: VecDeque::new(),
            retries: VecDeque::new(),
        }
    }

    fn expire(&mut self, now: Instant) {
        let window = self.window;
        for q in [&mut self.requests, &mut self.retries] {
            while q.front().is_some_and(|&t| now.duration_since(t) > window) {
                q.pop_front();
            }
        }
    }

    /// Counts one original request.
    pub(crate) fn on_request(&mut self, now: Instant) {
        self.expire(now);
        if self.requests.len() >= MAX_TRACKED {
            self.requests.pop_front();
        }
        self.requests.push_back(now);
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub(crate) fn try_retry(&mut self, now: Instant) -> bool {
        self.expire(now);
        let allowed =
            self.requests.len() as f64 * self.ratio + self.min_per_sec * self.window.as_secs_f64();
        if (self.retries.len() as f64) < allowed.min(MAX_TRACKED as f64) {
            self.retries.push_back(now);
            true
        } else {
            false
        }
    }
}

impl Default for RetryBudget {
    /// 20 % of requests plus 3 retries a second, over 10 s.
    fn default() -> Self {
        Self::new(0.2, 3.0, Duration::from_secs(10))
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
}
