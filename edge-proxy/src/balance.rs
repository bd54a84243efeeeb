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

/// Plain P2C over in-flight requests: [`p2c_ewma`] before any latency is known.
#[cfg(test)]
fn p2c<R: Rng + ?Sized>(
    n: usize,
    in_flight: impl Fn(usize) -> usize,
    rng: &mut R,
) -> Option<usize> {
    p2c_ewma(n, in_flight, |_| None, rng)
}

/// What a policy may look at in a candidate list (index `0..len()`), so policies stay pure
/// functions of numbers and ids, unit tested without connections.
pub(crate) trait Backends {
    fn len(&self) -> usize;
    fn in_flight(&self, i: usize) -> usize;
    /// EWMA of time to response head; `None` before the first answer.
    fn latency(&self, i: usize) -> Option<Duration>;
    /// Stable identity (the agent id), for consistent hashing.
    fn id(&self, i: usize) -> &str;
    /// Share under weighted round robin (agents weigh 1).
    fn weight(&self, _i: usize) -> u32 {
        1
    }
}

/// The policy a registry lookup applies to its candidate list.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Choice<'a> {
    /// P2C over (in-flight + 1) × EWMA latency (the default).
    P2c,
    RoundRobin(&'a RoundRobin),
    WeightedRoundRobin(&'a std::sync::Mutex<SmoothWeighted>),
    LeastConnections,
    /// Consistent hashing of the request's key; `None` (no key in this request) falls back to P2C.
    Hash(Option<&'a [u8]>, &'a RingCache),
}

impl Choice<'_> {
    pub(crate) fn pick<B: Backends + ?Sized, R: Rng + ?Sized>(
        self,
        b: &B,
        rng: &mut R,
    ) -> Option<usize> {
        let n = b.len();
        match self {
            Choice::P2c | Choice::Hash(None, _) => {
                p2c_ewma(n, |i| b.in_flight(i), |i| b.latency(i), rng)
            }
            Choice::RoundRobin(rr) => rr.pick(n),
            Choice::WeightedRoundRobin(wrr) => {
                let weights: Vec<u32> = (0..n).map(|i| b.weight(i)).collect();
                // Held for one pass over the weights; a poisoned state is still valid numbers.
                wrr.lock().unwrap_or_else(|e| e.into_inner()).pick(&weights)
            }
            Choice::LeastConnections => least_connections(n, |i| b.in_flight(i), rng),
            Choice::Hash(Some(key), cache) => cache.ring(b).pick(key),
        }
    }
}

/// Per-service balancing state and backend settings, rebuilt with each snapshot (and kept as is
/// while the service's definition is unchanged).
#[derive(Debug, Default)]
pub(crate) struct ServiceBalance {
    pub(crate) policy: coordinator_api::LbPolicy,
    pub(crate) rr: RoundRobin,
    pub(crate) wrr: std::sync::Mutex<SmoothWeighted>,
    pub(crate) ring: RingCache,
    /// Direct origins, balanced together with the service's agents.
    pub(crate) origins: std::sync::Arc<[std::sync::Arc<crate::upstream::OriginHandle>]>,
    /// Cookie name for stickiness.
    pub(crate) sticky: Option<String>,
    pub(crate) breaker: Option<crate::breaker::Config>,
    /// Active health checks: of direct origins by their handles, of agents through the tunnel.
    pub(crate) health_check: Option<crate::health::Config>,
    /// In-flight limits per backend.
    pub(crate) soft_limit: Option<usize>,
    pub(crate) hard_limit: Option<usize>,
    /// This service's own retry budget, carried over when its definition changes.
    pub(crate) retry_budget: std::sync::Arc<crate::retry::ServiceBudget>,
    /// The definition this was built from.
    spec: coordinator_api::Service,
}

impl ServiceBalance {
    /// The choice for one request; `key` is [`hash_key`]'s answer when the policy hashes.
    pub(crate) fn choice<'a>(&'a self, key: Option<&'a [u8]>) -> Choice<'a> {
        use coordinator_api::LbPolicy;
        match &self.policy {
            LbPolicy::P2c => Choice::P2c,
            // Weighted round robin until origins carry weights (all agents weigh 1).
            LbPolicy::RoundRobin => Choice::RoundRobin(&self.rr),
            LbPolicy::WeightedRoundRobin => Choice::WeightedRoundRobin(&self.wrr),
            LbPolicy::LeastConnections => Choice::LeastConnections,
            LbPolicy::Hash(_) => Choice::Hash(key, &self.ring),
        }
    }

    /// Whether requests need the general backend choice (origins, limits, breaker, stickiness)
    /// rather than the allocation-free agent-only path.
    pub(crate) fn general(&self) -> bool {
        !self.origins.is_empty()
            || self.sticky.is_some()
            || self.breaker.is_some()
            || self.health_check.is_some()
            || self.soft_limit.is_some()
            || self.hard_limit.is_some()
    }

    fn new(
        s: &coordinator_api::Service,
        origins: std::sync::Arc<[std::sync::Arc<crate::upstream::OriginHandle>]>,
        retry_budget: Option<std::sync::Arc<crate::retry::ServiceBudget>>,
    ) -> Self {
        let retry_budget = match retry_budget {
            Some(b) => {
                let (ratio, min) = crate::retry::limits(s.retry_budget.as_ref());
                b.lock().set_limits(ratio, min);
                b
            }
            None => std::sync::Arc::new(crate::retry::ServiceBudget::new(s.retry_budget.as_ref())),
        };
        let limit = |v: Option<u32>| v.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        Self {
            policy: s.lb_policy.clone(),
            origins,
            sticky: s.sticky.as_ref().map(|c| c.name.clone()),
            breaker: s.circuit_breaker.as_ref().map(Into::into),
            health_check: s.health_check.as_ref().map(Into::into),
            soft_limit: limit(s.concurrency.as_ref().and_then(|c| c.soft)),
            hard_limit: limit(s.concurrency.as_ref().and_then(|c| c.hard)),
            spec: s.clone(),
            retry_budget,
            ..Self::default()
        }
    }

    /// The request's hash key under this policy (`None` when it does not hash or the request
    /// lacks the attribute).
    pub(crate) fn key(
        &self,
        headers: &[(bytes::Bytes, bytes::Bytes)],
        client: std::net::IpAddr,
    ) -> Option<Vec<u8>> {
        match &self.policy {
            coordinator_api::LbPolicy::Hash(on) => hash_key(on, headers, client),
            _ => None,
        }
    }
}

/// What [`coordinator_api::HashOn`] names in one request. Header names in `headers` are
/// lower-case (the edge builds them from `http::HeaderName`).
pub(crate) fn hash_key(
    on: &coordinator_api::HashOn,
    headers: &[(bytes::Bytes, bytes::Bytes)],
    client: std::net::IpAddr,
) -> Option<Vec<u8>> {
    use coordinator_api::HashOn;
    fn header<'h>(
        headers: &'h [(bytes::Bytes, bytes::Bytes)],
        name: &'h str,
    ) -> impl Iterator<Item = &'h bytes::Bytes> {
        headers
            .iter()
            .filter(move |(n, _)| n.as_ref().eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }
    match on {
        HashOn::Header(name) => header(headers, name).next().map(|v| v.to_vec()),
        HashOn::Cookie(name) => header(headers, "cookie").find_map(|v| {
            std::str::from_utf8(v).ok()?.split(';').find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == name).then(|| v.as_bytes().to_vec())
            })
        }),
        HashOn::ClientIp => Some(client.to_string().into_bytes()),
    }
}

/// Balancing state of every service in the current snapshot.
pub(crate) type Policies = std::collections::HashMap<String, std::sync::Arc<ServiceBalance>>;

/// Builds [`Policies`] from a snapshot's services. A service whose definition is unchanged keeps
/// its state (round-robin position, ring, origin handles); a changed one keeps the handles of
/// its unchanged origins. Origin clients come from the process-wide `pool`.
pub(crate) fn policies(
    services: &[coordinator_api::Service],
    previous: &Policies,
    pool: &crate::upstream::Pool,
) -> Policies {
    services
        .iter()
        .map(|s| {
            let prev = previous.get(&s.name);
            if let Some(p) = prev
                && p.spec == *s
            {
                return (s.name.clone(), p.clone());
            }
            let origins =
                crate::upstream::build_origins(pool, s, prev.map_or(&[][..], |p| &p.origins[..]));
            (
                s.name.clone(),
                std::sync::Arc::new(ServiceBalance::new(
                    s,
                    origins,
                    prev.map(|p| p.retry_budget.clone()),
                )),
            )
        })
        .collect()
}

/// The ring of the current candidate list, rebuilt only when that list changes (agents come and
/// go rarely; requests are many). The lock is held for a lookup or a swap, never across `.await`.
#[derive(Debug, Default)]
pub(crate) struct RingCache(std::sync::Mutex<Option<(Vec<String>, std::sync::Arc<Ring>)>>);

impl RingCache {
    fn ring<B: Backends + ?Sized>(&self, b: &B) -> std::sync::Arc<Ring> {
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // The common case allocates nothing: the candidate list is the one the ring was built on.
        if let Some((have, ring)) = cached.as_ref()
            && have.len() == b.len()
            && have.iter().enumerate().all(|(i, id)| id == b.id(i))
        {
            return ring.clone();
        }
        let ids: Vec<String> = (0..b.len()).map(|i| b.id(i).to_owned()).collect();
        let ring = std::sync::Arc::new(Ring::new(&ids));
        *cached = Some((ids, ring.clone()));
        ring
    }
}

/// Latency ratio under which two backends count as equally fast.
const LATENCY_TOLERANCE: f64 = 1.25;

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
    let lat = |i: usize| latency(i).unwrap_or(floor).as_secs_f64().max(1e-6);
    match n {
        0 => None,
        1 => Some(0),
        _ => {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            // Latencies within a quarter of each other are noise, not a signal: compare on load
            // alone then, so two equal backends share traffic instead of the one that happened to
            // answer a microsecond faster taking all of it. `a` is the random draw on a tie.
            let (la, lb) = (lat(a), lat(b));
            let (la, lb) = if la.max(lb) <= la.min(lb) * LATENCY_TOLERANCE {
                (la.min(lb), la.min(lb))
            } else {
                (la, lb)
            };
            let cost = |i: usize, l: f64| (in_flight(i) as f64 + 1.0) * l;
            Some(if cost(b, lb) < cost(a, la) { b } else { a })
        }
    }
}

/// Exponentially weighted moving average of latency, decaying with wall time (not sample
/// count), so a backend that was slow a minute ago is not punished forever.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ewma {
    value: Option<f64>,
    last: Option<Instant>,
    tau: Duration,
}

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

    /// The average, or `None` when the last sample is older than `max_age`: a backend that was
    /// slow once (a cold first request) and so got no traffic must be probed again soon rather
    /// than stay shunned.
    pub(crate) fn get(&self, now: Instant, max_age: Duration) -> Option<Duration> {
        let last = self.last?;
        if now.saturating_duration_since(last) > max_age {
            return None;
        }
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

/// Smooth weighted round robin (nginx): over any window of `sum(weights)` picks each candidate is
/// chosen exactly `weight` times, interleaved rather than in bursts.
#[derive(Debug, Default)]
pub(crate) struct SmoothWeighted {
    current: Vec<i64>,
}

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

/// Consistent hashing on a ring with virtual nodes: adding or removing one of `n` backends moves
/// only about `1/n` of the keys (a header, cookie or client IP), so caches behind stay warm.
#[derive(Debug, Default)]
pub(crate) struct Ring {
    points: Vec<(u64, usize)>,
}

/// Virtual nodes per backend: enough for a spread within a few percent.
const VNODES: usize = 160;

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

/// Sticky-session cookie value naming a backend: `<backend>.<mac>`, so clients cannot steer
/// themselves onto a backend of their choosing.
pub(crate) fn sticky_cookie(secret: &[u8], backend: &str) -> String {
    let mac = hmac_sha256(secret, backend.as_bytes());
    format!("{backend}.{}", hex::encode(&mac[..16]))
}

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

    #[test]
    fn every_service_has_its_own_retry_budget_kept_across_changes() {
        let pool = crate::upstream::Pool::default();
        let svc = |name: &str, percent: Option<u32>| coordinator_api::Service {
            name: name.into(),
            retry_budget: percent.map(|percent| coordinator_api::RetryBudget {
                percent,
                min_per_sec: 0,
            }),
            ..Default::default()
        };
        let p = policies(
            &[svc("a", None), svc("b", Some(0))],
            &Policies::new(),
            &pool,
        );
        let (a, b) = (&p["a"], &p["b"]);
        assert!(!std::sync::Arc::ptr_eq(&a.retry_budget, &b.retry_budget));
        let t = Instant::now();
        for _ in 0..100 {
            a.retry_budget.lock().on_request(t);
            b.retry_budget.lock().on_request(t);
        }
        // A storm on a spends a's budget (20 % + 3/s × 10 s) only.
        assert_eq!(
            (0..1000)
                .take_while(|_| a.retry_budget.lock().try_retry(t))
                .count(),
            50
        );
        // b allows no retries at 0 % and no floor, whatever a did...
        assert!(!b.retry_budget.lock().try_retry(t));
        // ...until its budget is changed live: the same counters under the new ratio.
        let next = policies(&[svc("a", None), svc("b", Some(10))], &p, &pool);
        assert!(std::sync::Arc::ptr_eq(
            &next["b"].retry_budget,
            &b.retry_budget
        ));
        assert_eq!(
            (0..1000)
                .take_while(|_| next["b"].retry_budget.lock().try_retry(t))
                .count(),
            10
        );
        assert!(
            !next["a"].retry_budget.lock().try_retry(t),
            "a is still spent"
        );
    }
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
        let age = Duration::from_secs(1);
        assert_eq!(e.get(t0, age), None);
        e.observe(Duration::from_millis(100), t0);
        let t1 = t0 + Duration::from_secs(10);
        e.observe(Duration::from_millis(10), t1);
        let v = e.get(t1, age).unwrap_or_default();
        assert!(v < Duration::from_millis(11), "{v:?}");
        // An old sample is forgotten, so the backend gets probed again.
        assert_eq!(e.get(t1 + Duration::from_secs(2), age), None);
    }

    #[test]
    fn nearly_equal_latencies_share_traffic() {
        let mut rng = StdRng::seed_from_u64(7);
        let lat = [
            Some(Duration::from_micros(1_000)),
            Some(Duration::from_micros(1_100)),
        ];
        let picks: Vec<_> = (0..400)
            .filter_map(|_| p2c_ewma(2, |_| 0, |i| lat[i], &mut rng))
            .collect();
        let slower = picks.iter().filter(|&&i| i == 1).count();
        assert!((100..300).contains(&slower), "{slower} of 400");
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
    fn hash_keys_come_from_header_cookie_or_client() {
        use bytes::Bytes;
        use coordinator_api::HashOn;
        let h = |n: &'static str, v: &'static str| {
            (
                Bytes::from_static(n.as_bytes()),
                Bytes::from_static(v.as_bytes()),
            )
        };
        let headers = [h("x-user", "alice"), h("cookie", "a=1; sid=s-42; b=2")];
        let ip: std::net::IpAddr = [192, 0, 2, 7].into();
        let key = |on: HashOn| hash_key(&on, &headers, ip);
        assert_eq!(
            key(HashOn::Header("x-user".into())),
            Some(b"alice".to_vec())
        );
        assert_eq!(
            key(HashOn::Header("X-User".into())),
            Some(b"alice".to_vec())
        );
        assert_eq!(key(HashOn::Header("x-other".into())), None);
        assert_eq!(key(HashOn::Cookie("sid".into())), Some(b"s-42".to_vec()));
        assert_eq!(key(HashOn::Cookie("si".into())), None);
        assert_eq!(key(HashOn::ClientIp), Some(b"192.0.2.7".to_vec()));
    }

    struct Fake(Vec<&'static str>);

    impl Backends for Fake {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn in_flight(&self, _: usize) -> usize {
            0
        }
        fn latency(&self, _: usize) -> Option<Duration> {
            None
        }
        fn id(&self, i: usize) -> &str {
            self.0[i]
        }
    }

    #[test]
    fn hashing_choice_is_sticky_per_key_and_survives_reordering() {
        let mut rng = StdRng::seed_from_u64(9);
        let cache = RingCache::default();
        let three = Fake(vec!["a", "b", "c"]);
        let pick = |b: &Fake, key: &str, rng: &mut StdRng| {
            Choice::Hash(Some(key.as_bytes()), &cache)
                .pick(b, rng)
                .map(|i| b.0[i])
        };
        let first: Vec<_> = (0..50)
            .map(|k| pick(&three, &k.to_string(), &mut rng))
            .collect();
        let again: Vec<_> = (0..50)
            .map(|k| pick(&three, &k.to_string(), &mut rng))
            .collect();
        assert_eq!(first, again, "same key, same backend");
        assert!(first.contains(&Some("a")) && first.contains(&Some("c")));
        // "b" leaves: only its keys move.
        let two = Fake(vec!["a", "c"]);
        for (k, before) in first.iter().enumerate() {
            let after = pick(&two, &k.to_string(), &mut rng);
            if *before != Some("b") {
                assert_eq!(after, *before, "key {k} moved though its backend stayed");
            }
        }
        // No key: P2C still picks something.
        assert!(Choice::Hash(None, &cache).pick(&two, &mut rng).is_some());
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
