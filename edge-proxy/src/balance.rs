//! Backend choice, sans-IO: every policy is a pure function or a small state machine over a
//! slice of candidates, so it is unit tested without sockets and the registry stays a thin driver.
//!
//! P2C gets close to least-loaded without scanning every backend and without the herd effect of
//! "always the least loaded" when many edges see the same stale counts (linkerd, Envoy, HAProxy);
//! weighting its cost by an EWMA of latency steers away from slow backends before they queue.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use sha2::{Digest, Sha256};

/// Picks an index in `0..n` by P2C: two distinct random candidates, the one with fewer in-flight
/// requests wins (the first drawn on a tie). `None` when `n == 0`.
pub(crate) fn p2c<R: Rng + ?Sized>(
    n: usize,
    in_flight: impl Fn(usize) -> usize,
    rng: &mut R,
) -> Option<usize> {
    match n {
        0 => None,
        1 => Some(0),
        _ => {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            Some(choose(a, b, &in_flight))
        }
    }
}

/// The less loaded of two candidates; `a` on a tie.
fn choose(a: usize, b: usize, in_flight: impl Fn(usize) -> usize) -> usize {
    if in_flight(b) < in_flight(a) { b } else { a }
}

/// The policy a registry lookup applies to its candidate list.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Choice<'a> {
    /// P2C over in-flight requests (the default).
    P2c,
    RoundRobin(&'a RoundRobin),
}

impl Choice<'_> {
    pub(crate) fn pick<R: Rng + ?Sized>(
        self,
        n: usize,
        in_flight: impl Fn(usize) -> usize,
        rng: &mut R,
    ) -> Option<usize> {
        match self {
            Choice::P2c => p2c(n, in_flight, rng),
            Choice::RoundRobin(rr) => rr.pick(n),
        }
    }
}

/// Per-service balancing state, rebuilt with each snapshot.
#[derive(Debug, Default)]
pub(crate) struct ServiceBalance {
    pub(crate) policy: coordinator_api::LbPolicy,
    pub(crate) rr: RoundRobin,
}

impl ServiceBalance {
    pub(crate) fn choice(&self) -> Choice<'_> {
        match self.policy {
            coordinator_api::LbPolicy::P2c => Choice::P2c,
            coordinator_api::LbPolicy::RoundRobin => Choice::RoundRobin(&self.rr),
        }
    }
}

/// Balancing state of every service in the current snapshot.
pub(crate) type Policies = std::collections::HashMap<String, std::sync::Arc<ServiceBalance>>;

/// Builds [`Policies`] from a snapshot's services.
pub(crate) fn policies(services: &[coordinator_api::Service]) -> Policies {
    services
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                std::sync::Arc::new(ServiceBalance {
                    policy: s.lb_policy,
                    rr: RoundRobin::default(),
                }),
            )
        })
        .collect()
}

// The policies below are complete and unit tested; `LbPolicy` (coordinator-api) has only
// `P2c` and `RoundRobin` today, and the coordinator's store maps it exhaustively, so new
// variants need the coordinator engineer first. Until then they are reachable from tests only.

#[cfg_attr(not(test), allow(dead_code))]
/// Picks by P2C where each candidate costs `(in_flight + 1) × latency_ewma` (linkerd's
/// "peak EWMA" idea without the peak); a backend with no samples yet costs `in_flight + 1` × the
/// smallest known latency, so new backends get traffic. `None` when `n == 0`.
pub(crate) fn p2c_ewma<R: Rng + ?Sized>(
    n: usize,
    in_flight: impl Fn(usize) -> usize,
    latency: impl Fn(usize) -> Option<Duration>,
    rng: &mut R,
) -> Option<usize> {
    let floor = (0..n)
        .filter_map(&latency)
        .min()
        .unwrap_or(Duration::from_millis(1));
    let cost = |i: usize| {
        let lat = latency(i).unwrap_or(floor).as_secs_f64().max(1e-6);
        (in_flight(i) as f64 + 1.0) * lat
    };
    match n {
        0 => None,
        1 => Some(0),
        _ => {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            Some(if cost(b) < cost(a) { b } else { a })
        }
    }
}

#[cfg_attr(not(test), allow(dead_code))]
/// Exponentially weighted moving average of latency, decaying with wall time (not sample
/// count), so a backend that was slow a minute ago is not punished forever.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ewma {
    value: Option<f64>,
    last: Option<Instant>,
    tau: Duration,
}

#[cfg_attr(not(test), allow(dead_code))]
impl Ewma {
    pub(crate) fn new(tau: Duration) -> Self {
        Self {
            value: None,
            last: None,
            tau,
        }
    }

    pub(crate) fn observe(&mut self, sample: Duration, now: Instant) {
        let x = sample.as_secs_f64();
        self.value = Some(match (self.value, self.last) {
            (Some(v), Some(last)) => {
                let dt = now.saturating_duration_since(last).as_secs_f64();
                let w = (-dt / self.tau.as_secs_f64().max(1e-9)).exp();
                v * w + x * (1.0 - w)
            }
            _ => x,
        });
        self.last = Some(now);
    }

    pub(crate) fn get(&self) -> Option<Duration> {
        self.value.map(Duration::from_secs_f64)
    }
}

/// Round robin over whatever candidate list the caller has now (lock-free, shared by threads).
#[derive(Debug, Default)]
pub(crate) struct RoundRobin(AtomicUsize);

impl RoundRobin {
    pub(crate) fn pick(&self, n: usize) -> Option<usize> {
        (n > 0).then(|| self.0.fetch_add(1, Ordering::Relaxed) % n)
    }
}

#[cfg_attr(not(test), allow(dead_code))]
/// Smooth weighted round robin (nginx): over any window of `sum(weights)` picks each candidate is
/// chosen exactly `weight` times, interleaved rather than in bursts.
#[derive(Debug, Default)]
pub(crate) struct SmoothWeighted {
    current: Vec<i64>,
}

#[cfg_attr(not(test), allow(dead_code))]
impl SmoothWeighted {
    /// `weights[i] == 0` never wins while another candidate has weight. The state resizes when the
    /// candidate list changes length.
    pub(crate) fn pick(&mut self, weights: &[u32]) -> Option<usize> {
        if weights.is_empty() {
            return None;
        }
        if self.current.len() != weights.len() {
            self.current = vec![0; weights.len()];
        }
        let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
        if total == 0 {
            return Some(0);
        }
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            self.current[i] += i64::from(w);
            if self.current[i] > self.current[best] {
                best = i;
            }
        }
        self.current[best] -= total;
        Some(best)
    }
}

#[cfg_attr(not(test), allow(dead_code))]
/// The candidate with the fewest in-flight requests; ties broken at random so equal backends
/// share load. `None` when `n == 0`.
pub(crate) fn least_connections<R: Rng + ?Sized>(
    n: usize,
    in_flight: impl Fn(usize) -> usize,
    rng: &mut R,
) -> Option<usize> {
    let min = (0..n).map(&in_flight).min()?;
    let ties: Vec<usize> = (0..n).filter(|&i| in_flight(i) == min).collect();
    ties.get(rng.random_range(0..ties.len())).copied()
}

#[cfg_attr(not(test), allow(dead_code))]
fn hash64(parts: &[&[u8]]) -> u64 {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b)
}

#[cfg_attr(not(test), allow(dead_code))]
/// Consistent hashing on a ring with virtual nodes: adding or removing one of `n` backends moves
/// only about `1/n` of the keys (a header, cookie or client IP), so caches behind stay warm.
#[derive(Debug, Default)]
pub(crate) struct Ring {
    points: Vec<(u64, usize)>,
}

/// Virtual nodes per backend: enough for a spread within a few percent.
const VNODES: usize = 160;

#[cfg_attr(not(test), allow(dead_code))]
impl Ring {
    /// Builds the ring from stable backend ids (index `i` of the result refers to `ids[i]`).
    pub(crate) fn new<S: AsRef<[u8]>>(ids: &[S]) -> Self {
        let mut points = Vec::with_capacity(ids.len() * VNODES);
        for (i, id) in ids.iter().enumerate() {
            for v in 0..VNODES {
                points.push((hash64(&[id.as_ref(), &(v as u64).to_le_bytes()]), i));
            }
        }
        points.sort_unstable();
        Self { points }
    }

    pub(crate) fn pick(&self, key: &[u8]) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let h = hash64(&[key]);
        let i = self.points.partition_point(|&(p, _)| p < h);
        Some(self.points[i % self.points.len()].1)
    }
}

#[cfg_attr(not(test), allow(dead_code))]
/// HMAC-SHA256 (RFC 2104); sha2 is already a dependency and the construction is eight lines.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

#[cfg_attr(not(test), allow(dead_code))]
/// Sticky-session cookie value naming a backend: `<backend>.<mac>`, so clients cannot steer
/// themselves onto a backend of their choosing.
pub(crate) fn sticky_cookie(secret: &[u8], backend: &str) -> String {
    let mac = hmac_sha256(secret, backend.as_bytes());
    format!("{backend}.{}", hex::encode(&mac[..16]))
}

#[cfg_attr(not(test), allow(dead_code))]
/// The backend a sticky cookie names, if its signature is valid. The caller falls back to the
/// service's policy when that backend is gone.
pub(crate) fn verify_sticky<'a>(secret: &[u8], value: &'a str) -> Option<&'a str> {
    let (backend, mac) = value.rsplit_once('.')?;
    let want = hmac_sha256(secret, backend.as_bytes());
    let got = hex::decode(mac).ok()?;
    // Constant-time compare: the MAC is secret-derived.
    (got.len() == 16
        && got
            .iter()
            .zip(&want[..16])
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0)
        .then_some(backend)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::time::{Duration, Instant};

    #[test]
    fn ewma_prefers_the_faster_backend_and_forgets() {
        let mut rng = StdRng::seed_from_u64(5);
        let lat = [
            Some(Duration::from_millis(100)),
            Some(Duration::from_millis(5)),
        ];
        for _ in 0..500 {
            assert_eq!(p2c_ewma(2, |_| 0, |i| lat[i], &mut rng), Some(1));
        }
        // Load outweighs latency: 30 in flight on the fast one makes it costlier.
        assert_eq!(
            p2c_ewma(2, |i| if i == 1 { 30 } else { 0 }, |i| lat[i], &mut rng),
            Some(0)
        );
        let t0 = Instant::now();
        let mut e = Ewma::new(Duration::from_secs(1));
        assert_eq!(e.get(), None);
        e.observe(Duration::from_millis(100), t0);
        e.observe(Duration::from_millis(10), t0 + Duration::from_secs(10));
        let v = e.get().unwrap_or_default();
        assert!(v < Duration::from_millis(11), "{v:?}");
    }

    #[test]
    fn round_robin_cycles() {
        let rr = RoundRobin::default();
        let picks: Vec<_> = (0..6).filter_map(|_| rr.pick(3)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        assert_eq!(rr.pick(0), None);
    }

    #[test]
    fn smooth_weighted_is_exact_and_interleaved() {
        let mut w = SmoothWeighted::default();
        let picks: Vec<_> = (0..7).filter_map(|_| w.pick(&[5, 1, 1])).collect();
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0], "nginx's documented sequence");
        let mut w = SmoothWeighted::default();
        let mut counts = [0usize; 3];
        for _ in 0..1000 {
            counts[w.pick(&[3, 0, 7]).unwrap_or(9)] += 1;
        }
        assert_eq!(counts, [300, 0, 700]);
        assert_eq!(w.pick(&[]), None);
    }

    #[test]
    fn least_connections_takes_the_minimum_and_spreads_ties() {
        let mut rng = StdRng::seed_from_u64(9);
        let loads = [4usize, 1, 1, 9];
        let mut counts = [0usize; 4];
        for _ in 0..1000 {
            counts[least_connections(4, |i| loads[i], &mut rng).unwrap_or(0)] += 1;
        }
        assert_eq!(counts[0] + counts[3], 0);
        assert!(counts[1] > 400 && counts[2] > 400, "{counts:?}");
        assert_eq!(least_connections(0, |_| 0, &mut rng), None);
    }

    #[test]
    fn ring_is_stable_and_moves_few_keys() {
        let ids = ["a", "b", "c", "d"];
        let ring = Ring::new(&ids);
        let keys: Vec<String> = (0..4000).map(|i| format!("client-{i}")).collect();
        let before: Vec<&str> = keys
            .iter()
            .map(|k| ids[ring.pick(k.as_bytes()).unwrap_or(0)])
            .collect();
        // Same key, same backend.
        assert_eq!(ring.pick(b"client-7"), ring.pick(b"client-7"));
        let mut counts = std::collections::HashMap::new();
        for b in &before {
            *counts.entry(*b).or_insert(0usize) += 1;
        }
        assert!(counts.values().all(|&c| c > 700), "spread: {counts:?}");
        // Remove "c": only keys that were on "c" move.
        let ids2 = ["a", "b", "d"];
        let ring2 = Ring::new(&ids2);
        let moved = keys
            .iter()
            .zip(&before)
            .filter(|(k, b)| ids2[ring2.pick(k.as_bytes()).unwrap_or(0)] != **b)
            .count();
        assert_eq!(moved, counts["c"]);
        assert_eq!(Ring::new::<&str>(&[]).pick(b"x"), None);
    }

    #[test]
    fn sticky_cookie_round_trips_and_rejects_forgery() {
        let secret = b"edge secret";
        let c = sticky_cookie(secret, "agent-7");
        assert_eq!(verify_sticky(secret, &c), Some("agent-7"));
        assert_eq!(verify_sticky(b"other secret", &c), None);
        let forged = c.replace("agent-7", "agent-8");
        assert_eq!(verify_sticky(secret, &forged), None);
        assert_eq!(verify_sticky(secret, "agent-7"), None);
        assert_eq!(verify_sticky(secret, "agent-7.zz"), None);
        // RFC 4231 test case 2.
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn empty_and_single() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(p2c(0, |_| 0, &mut rng), None);
        assert_eq!(p2c(1, |_| 99, &mut rng), Some(0));
    }

    #[test]
    fn two_backends_always_prefers_fewer_in_flight() {
        let mut rng = StdRng::seed_from_u64(7);
        let loads = [5usize, 1];
        for _ in 0..1000 {
            assert_eq!(p2c(2, |i| loads[i], &mut rng), Some(1));
        }
    }

    #[test]
    fn never_picks_the_most_loaded_of_many() {
        let mut rng = StdRng::seed_from_u64(42);
        let loads = [3usize, 0, 7, 2, 100];
        let mut counts = [0usize; 5];
        for _ in 0..10_000 {
            let i = p2c(loads.len(), |i| loads[i], &mut rng).unwrap_or(usize::MAX);
            counts[i] += 1;
        }
        assert_eq!(counts[4], 0, "the most loaded backend can never win a pair");
        // The idle backend wins every pair it is drawn into: 2/5 of draws.
        assert!(counts[1] > 3_500, "{counts:?}");
        assert!(counts[1] > counts[0] && counts[0] > counts[2], "{counts:?}");
    }

    #[test]
    fn equal_load_spreads() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut counts = [0usize; 4];
        for _ in 0..8_000 {
            let i = p2c(4, |_| 0, &mut rng).unwrap_or(usize::MAX);
            counts[i] += 1;
        }
        assert!(counts.iter().all(|&c| c > 1_500), "{counts:?}");
    }
}
