//! Response rate limiting for UDP, per client prefix, sans-IO.
//!
//! UDP answers can be sent to a spoofed source: without a limit we are a reflection amplifier.
//! Each client prefix (/24 for IPv4, /56 for IPv6, as BIND's RRL) has a token bucket refilled at
//! `rate` per second with a burst of `rate`. Over the limit, every `slip`-th response is sent
//! truncated (TC, no answers: a real client retries over TCP, which cannot be spoofed) and the
//! others are dropped. Simpler than BIND's (no per-qname/rcode accounting): a whole prefix
//! shares one bucket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// IPv4 prefix length clients are grouped by.
pub const V4_PREFIX: u8 = 24;
/// IPv6 prefix length clients are grouped by.
pub const V6_PREFIX: u8 = 56;
/// Prefixes tracked per shard; beyond it idle ones are forgotten (bounded memory under spoofing).
const MAX_PREFIXES_PER_SHARD: usize = 16_384;
const SHARDS: usize = 16;

/// What to do with one response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Send,
    /// Send a truncated reply instead.
    Slip,
    Drop,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    /// Responses limited since the bucket last had a token (drives `slip`).
    limited: u32,
}

/// One shard of the limiter: a plain state machine.
#[derive(Debug)]
pub struct Limiter {
    rate: f64,
    slip: u32,
    buckets: HashMap<u128, Bucket>,
}

impl Limiter {
    /// `rate` responses per second per prefix (burst the same); `slip` 0 drops everything over
    /// the limit, 1 truncates everything, N truncates every Nth.
    pub fn new(rate: u32, slip: u32) -> Self {
        Self {
            rate: f64::from(rate.max(1)),
            slip,
            buckets: HashMap::new(),
        }
    }

    pub fn check(&mut self, client: IpAddr, now: Instant) -> Decision {
        let key = prefix_key(client);
        if self.buckets.len() >= MAX_PREFIXES_PER_SHARD && !self.buckets.contains_key(&key) {
            // Forget every prefix whose bucket has refilled: they are indistinguishable from new.
            let rate = self.rate;
            self.buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < rate
            });
            if self.buckets.len() >= MAX_PREFIXES_PER_SHARD {
                self.buckets.clear();
            }
        }
        let b = self.buckets.entry(key).or_insert(Bucket {
            tokens: self.rate,
            last: now,
            limited: 0,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.rate);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            b.limited = 0;
            return Decision::Send;
        }
        b.limited = b.limited.saturating_add(1);
        if self.slip > 0 && b.limited.is_multiple_of(self.slip) {
            Decision::Slip
        } else {
            Decision::Drop
        }
    }
}

/// The client's prefix, IPv4 and IPv6 kept apart by a family bit.
fn prefix_key(client: IpAddr) -> u128 {
    match client.to_canonical() {
        IpAddr::V4(a) => (1u128 << 127) | u128::from(u32::from(a) >> (32 - V4_PREFIX)),
        IpAddr::V6(a) => u128::from(a) >> (128 - V6_PREFIX),
    }
}

/// The limiter shared by the UDP workers, sharded so they rarely contend.
#[derive(Debug)]
pub struct SharedLimiter {
    shards: Vec<Mutex<Limiter>>,
}

impl SharedLimiter {
    pub fn new(rate: u32, slip: u32) -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Limiter::new(rate, slip)))
                .collect(),
        }
    }

    pub fn check(&self, client: IpAddr, now: Instant) -> Decision {
        let key = prefix_key(client);
        let shard = (key ^ (key >> 17) ^ (key >> 41)) as usize % SHARDS;
        match self.shards.get(shard).map(Mutex::lock) {
            Some(Ok(mut l)) => l.check(client, now),
            // A poisoned shard only means a panic elsewhere; answering is the safe default.
            _ => Decision::Send,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn burst_then_slip_every_second_then_refill() {
        let mut l = Limiter::new(5, 2);
        let t0 = Instant::now();
        let c = ip("192.0.2.1");
        for _ in 0..5 {
            assert_eq!(l.check(c, t0), Decision::Send);
        }
        let over: Vec<Decision> = (0..6).map(|_| l.check(c, t0)).collect();
        use Decision::*;
        assert_eq!(over, [Drop, Slip, Drop, Slip, Drop, Slip]);
        // Same /24 shares the bucket; another /24 does not.
        assert_ne!(l.check(ip("192.0.2.200"), t0), Send);
        assert_eq!(l.check(ip("192.0.3.1"), t0), Send);
        // 200 ms later one token is back.
        assert_eq!(l.check(c, t0 + Duration::from_millis(200)), Send);
        assert_ne!(l.check(c, t0 + Duration::from_millis(200)), Send);
    }

    #[test]
    fn slip_zero_drops_and_ipv6_groups_by_56() {
        let mut l = Limiter::new(1, 0);
        let t0 = Instant::now();
        assert_eq!(l.check(ip("2001:db8:0:1::1"), t0), Decision::Send);
        assert_eq!(l.check(ip("2001:db8:0:2::1"), t0), Decision::Drop);
        assert_eq!(l.check(ip("2001:db8:0:100::1"), t0), Decision::Send);
        // v4-mapped is the IPv4 client.
        assert_eq!(l.check(ip("198.51.100.1"), t0), Decision::Send);
        assert_eq!(l.check(ip("::ffff:198.51.100.9"), t0), Decision::Drop);
    }

    #[test]
    fn memory_is_bounded_under_spoofed_sources() {
        let mut l = Limiter::new(1, 0);
        let t0 = Instant::now();
        for i in 0..(MAX_PREFIXES_PER_SHARD as u32 * 2) {
            l.check(IpAddr::from((i << 8).to_be_bytes()), t0);
        }
        assert!(l.buckets.len() <= MAX_PREFIXES_PER_SHARD);
    }
}
