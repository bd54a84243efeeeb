//! The general backend choice: a service's agents and direct origins together, filtered by what
//! may take a request now (tried already, at the hard limit, failing its health checks, breaker
//! open) and ranked (preferred, over the soft limit, degraded), then chosen by the service's
//! policy within the best rank, or by a sticky cookie. Services without origins, limits, a
//! breaker or stickiness take the allocation-free agent-only path in `registry`.

use std::sync::Arc;
use std::time::Instant;

use crate::balance::{Backends, Choice, ServiceBalance};
use crate::breaker::Admit;
use crate::registry::{AgentHandle, Lease};
use crate::state::Shared;
use crate::upstream::{OriginHandle, OriginLease};

/// A chosen backend with its request counted against it.
#[derive(Debug)]
pub(crate) enum Picked {
    Agent(Lease),
    Origin(OriginLease),
}

/// A chosen backend, kept to report the result after the lease moved into the attempt.
#[derive(Clone, Debug)]
pub(crate) enum Chosen {
    Agent(Arc<AgentHandle>),
    Origin(Arc<OriginHandle>),
}

impl Picked {
    pub(crate) fn chosen(&self) -> Chosen {
        match self {
            Self::Agent(l) => Chosen::Agent(l.agent().clone()),
            Self::Origin(l) => Chosen::Origin(l.origin().clone()),
        }
    }
}

impl Chosen {
    pub(crate) fn key(&self) -> u64 {
        match self {
            Self::Agent(a) => a.key,
            Self::Origin(o) => o.key,
        }
    }

    /// The backend's name in sticky cookies.
    pub(crate) fn tag(&self) -> &str {
        match self {
            Self::Agent(a) => &a.tag,
            Self::Origin(o) => &o.tag,
        }
    }

    /// Feeds one result to the backend's breaker, when the service has one.
    pub(crate) fn report(&self, sb: Option<&ServiceBalance>, ok: bool) {
        let Some(cfg) = sb.and_then(|b| b.breaker) else {
            return;
        };
        let now = Instant::now();
        match self {
            Self::Agent(a) => a.breaker().on_result(cfg, ok, now),
            Self::Origin(o) => o.breaker().on_result(cfg, ok, now),
        }
    }
}

/// Why no backend could be chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unavailable {
    /// The service has no backend here (or every one was tried).
    None,
    /// Every usable backend is at the service's hard concurrency limit.
    AtLimit(usize),
    /// Every backend fails its health checks or has its breaker open.
    Unhealthy,
}

/// What decides one candidate's rank, gathered so the ranking is a pure function.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Facts {
    pub(crate) tried: bool,
    pub(crate) in_flight: usize,
    /// The active health check (of an origin, or of an agent through the tunnel) says down.
    pub(crate) failing_checks: bool,
    /// The breaker would refuse a request now.
    pub(crate) breaker_open: bool,
    /// The agent reports its origin unhealthy, or passive outlier detection ejected it: used
    /// only when nothing better is left.
    pub(crate) degraded: bool,
}

/// A candidate's rank (lower is better) or why it is out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rank {
    Preferred,
    OverSoftLimit,
    Degraded,
    OutTried,
    OutAtLimit,
    OutUnhealthy,
}

pub(crate) fn rank(f: &Facts, soft: Option<usize>, hard: Option<usize>) -> Rank {
    if f.tried {
        Rank::OutTried
    } else if hard.is_some_and(|h| f.in_flight >= h) {
        Rank::OutAtLimit
    } else if f.failing_checks || f.breaker_open {
        Rank::OutUnhealthy
    } else if f.degraded {
        Rank::Degraded
    } else if soft.is_some_and(|s| f.in_flight >= s) {
        Rank::OverSoftLimit
    } else {
        Rank::Preferred
    }
}

#[derive(Clone, Copy)]
enum Cand<'a> {
    Agent(&'a Arc<AgentHandle>),
    Origin(&'a Arc<OriginHandle>),
}

impl Cand<'_> {
    fn key(&self) -> u64 {
        match self {
            Cand::Agent(a) => a.key,
            Cand::Origin(o) => o.key,
        }
    }
    fn tag(&self) -> &str {
        match self {
            Cand::Agent(a) => &a.tag,
            Cand::Origin(o) => &o.tag,
        }
    }
}

impl Backends for [Cand<'_>] {
    fn len(&self) -> usize {
        <[_]>::len(self)
    }
    fn in_flight(&self, i: usize) -> usize {
        match self[i] {
            Cand::Agent(a) => a.in_flight(),
            Cand::Origin(o) => o.in_flight(),
        }
    }
    fn latency(&self, i: usize) -> Option<std::time::Duration> {
        match self[i] {
            Cand::Agent(a) => a.latency(),
            Cand::Origin(o) => o.latency(),
        }
    }
    fn id(&self, i: usize) -> &str {
        match self[i] {
            Cand::Agent(a) => &a.info.agent_id,
            Cand::Origin(o) => &o.id,
        }
    }
    fn weight(&self, i: usize) -> u32 {
        match self[i] {
            Cand::Agent(_) => 1,
            Cand::Origin(o) => o.weight,
        }
    }
}

/// Most re-picks when a chosen backend's breaker refuses at admission (another request took
/// its last probe slot in between).
const MAX_REPICKS: usize = 3;

/// Chooses a backend of `service` (agents and origins) for one attempt, skipping `tried`.
/// `sticky` is the backend tag a verified sticky cookie names.
pub(crate) fn pick(
    shared: &Shared,
    service: &str,
    sb: &ServiceBalance,
    tried: &[u64],
    choice: Choice<'_>,
    sticky: Option<&str>,
) -> Result<Picked, Unavailable> {
    let agents = shared.agents.list(service);
    let agents = agents.as_deref().unwrap_or(&[]);
    let mut refused: Vec<u64> = Vec::new();
    for _ in 0..MAX_REPICKS {
        let now = Instant::now();
        let mut ranked: Vec<(Cand<'_>, Rank)> = Vec::with_capacity(agents.len() + sb.origins.len());
        {
            // One lock for the whole list; held for map lookups only.
            let outliers = shared.outliers();
            let detector = outliers.get(service);
            let ejected = |key| detector.is_some_and(|d| d.is_ejected(key, now));
            let breaker_open = |b: &crate::breaker::Breaker| {
                sb.breaker.is_some_and(|cfg| !b.would_admit(cfg, now))
            };
            for a in agents {
                let f = Facts {
                    tried: tried.contains(&a.key) || refused.contains(&a.key),
                    in_flight: a.in_flight(),
                    // The edge's own check through the tunnel.
                    failing_checks: !shared.agent_checks.passing(a.key),
                    breaker_open: breaker_open(&a.breaker()),
                    degraded: !a.origin_healthy() || ejected(a.key),
                };
                ranked.push((Cand::Agent(a), rank(&f, sb.soft_limit, sb.hard_limit)));
            }
            for o in sb.origins.iter() {
                let f = Facts {
                    tried: tried.contains(&o.key) || refused.contains(&o.key),
                    in_flight: o.in_flight(),
                    failing_checks: !o.healthy(),
                    breaker_open: breaker_open(&o.breaker()),
                    degraded: ejected(o.key),
                };
                ranked.push((Cand::Origin(o), rank(&f, sb.soft_limit, sb.hard_limit)));
            }
        }
        let best = ranked
            .iter()
            .map(|(_, r)| *r)
            .filter(|r| matches!(r, Rank::Preferred | Rank::OverSoftLimit | Rank::Degraded))
            .min_by_key(|r| *r as u8);
        let Some(best) = best else {
            return Err(unavailable(&ranked, sb.hard_limit));
        };
        let chosen = match sticky.and_then(|tag| {
            ranked
                .iter()
                .find(|(c, r)| c.tag() == tag && matches!(r, Rank::Preferred | Rank::OverSoftLimit))
        }) {
            Some((c, _)) => *c,
            None => {
                let pool: Vec<Cand<'_>> = ranked
                    .iter()
                    .filter(|(_, r)| *r == best)
                    .map(|(c, _)| *c)
                    .collect();
                let i = choice
                    .pick(&pool[..], &mut rand::rng())
                    .ok_or(Unavailable::None)?;
                pool[i]
            }
        };
        let admitted = match (sb.breaker, chosen) {
            (None, _) => true,
            (Some(cfg), Cand::Agent(a)) => a.breaker().admit(cfg, now) != Admit::No,
            (Some(cfg), Cand::Origin(o)) => o.breaker().admit(cfg, now) != Admit::No,
        };
        if !admitted {
            refused.push(chosen.key());
            continue;
        }
        return Ok(match chosen {
            Cand::Agent(a) => Picked::Agent(a.lease()),
            Cand::Origin(o) => Picked::Origin(o.lease()),
        });
    }
    Err(Unavailable::Unhealthy)
}

/// The backend a valid sticky cookie of this service names (its tag), if the request has one.
pub(crate) fn sticky_tag(
    headers: &[(bytes::Bytes, bytes::Bytes)],
    cookie: Option<&str>,
    secret: &[u8],
) -> Option<String> {
    let name = cookie?;
    headers
        .iter()
        .filter(|(n, _)| n.as_ref() == b"cookie")
        .filter_map(|(_, v)| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| crate::balance::verify_sticky(secret, v))
        .map(str::to_owned)
}

/// Sets the sticky cookie on a response when the request did not already name this backend.
pub(crate) fn stick(
    resp: &mut http::Response<crate::forward::RespBody>,
    sb: &ServiceBalance,
    chosen: &Chosen,
    had: Option<&str>,
    shared: &Shared,
) {
    let Some(name) = sb.sticky.as_deref() else {
        return;
    };
    if had == Some(chosen.tag()) || resp.status().is_server_error() {
        return;
    }
    let value = crate::balance::sticky_cookie(&shared.upstreams.sticky_secret, chosen.tag());
    if let Ok(v) =
        http::HeaderValue::from_str(&format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax"))
    {
        resp.headers_mut().append(http::header::SET_COOKIE, v);
    }
}

/// Whether `service` has a backend that could serve now: an agent whose origin is healthy, or a
/// direct origin passing its checks with its breaker not open (the anycast policy's question).
pub(crate) fn has_healthy(shared: &Shared, service: &str) -> bool {
    // The registry's answer (the agents' own origin probes) first, then the edge's own checks.
    if shared.agents.has_healthy(service)
        && shared.agents.list(service).is_some_and(|l| {
            l.iter()
                .any(|a| a.origin_healthy() && shared.agent_checks.passing(a.key))
        })
    {
        return true;
    }
    let policies = shared.policies.load();
    let Some(sb) = policies.get(service) else {
        return false;
    };
    let now = Instant::now();
    sb.origins.iter().any(|o| {
        o.healthy()
            && sb
                .breaker
                .is_none_or(|cfg| o.breaker().would_admit(cfg, now))
    })
}

/// Every backend of every service this edge knows, for `/metrics`: direct origins from the
/// current policies, agents from the registry. Scrape-time only (takes the outlier lock once).
pub(crate) fn states(shared: &Shared) -> Vec<crate::metrics::BackendState> {
    use crate::metrics::BackendState;
    let now = Instant::now();
    let policies = shared.policies.load();
    let mut services: Vec<String> = policies.keys().cloned().collect();
    for a in shared.agents.agent_conns() {
        if !services.contains(&a.service) {
            services.push(a.service);
        }
    }
    services.sort();
    let outliers = shared.outliers();
    let mut out = Vec::new();
    for service in &services {
        let detector = outliers.get(service);
        let ejected = |key| detector.is_some_and(|d| d.is_ejected(key, now));
        let first = out.len();
        for a in shared.agents.list(service).as_deref().unwrap_or(&[]) {
            // One agent may hold several connections: each is its own backend.
            let n = out[first..]
                .iter()
                .filter(|b: &&BackendState| {
                    b.kind == "agent"
                        && (b.backend == a.info.agent_id
                            || b.backend.starts_with(&format!("{}#", a.info.agent_id)))
                })
                .count();
            out.push(BackendState {
                service: service.clone(),
                backend: if n == 0 {
                    a.info.agent_id.clone()
                } else {
                    format!("{}#{}", a.info.agent_id, n + 1)
                },
                kind: "agent",
                checks_ok: a.origin_healthy() && shared.agent_checks.passing(a.key),
                ejected: ejected(a.key),
                breaker: a.breaker().phase(now),
            });
        }
        if let Some(sb) = policies.get(service) {
            for o in sb.origins.iter() {
                out.push(BackendState {
                    service: service.clone(),
                    backend: o.id.clone(),
                    kind: "origin",
                    checks_ok: o.healthy(),
                    ejected: ejected(o.key),
                    breaker: o.breaker().phase(now),
                });
            }
        }
    }
    out
}

/// The upstream part of `/metrics`: backend health, breaker state and pool reuse.
pub(crate) fn render_metrics(shared: &Shared, out: &mut String) {
    use crate::metrics as m;
    let origins = &shared.upstreams.pool.stats;
    let mut pools = vec![
        (m::POOL_AGENT, shared.metrics.agent_pool.counters.get()),
        (m::POOL_ORIGIN_H1, origins.h1.get()),
        (m::POOL_ORIGIN_H2, origins.h2.get()),
    ];
    if let Some(p) = &shared.peers {
        pools.push((m::POOL_PEER, p.stats.get()));
    }
    m::render_upstreams(out, &states(shared), &pools);
}

/// Every backend is at the service's hard concurrency limit.
pub(crate) fn at_limit(service: &str, n: usize) -> http::Response<crate::forward::RespBody> {
    let mut resp = crate::forward::text(
        http::StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "service {service} is at its concurrency limit ({n} requests in flight per backend); try again shortly"
        ),
    );
    resp.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("1"),
    );
    resp
}

/// Every backend fails its health checks or has its breaker open.
pub(crate) fn unhealthy(service: &str) -> http::Response<crate::forward::RespBody> {
    let mut resp = crate::forward::text(
        http::StatusCode::SERVICE_UNAVAILABLE,
        format!("no healthy backend for service {service} (health checks failing or circuit open)"),
    );
    resp.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("1"),
    );
    resp
}

fn unavailable(ranked: &[(Cand<'_>, Rank)], hard: Option<usize>) -> Unavailable {
    if ranked.iter().any(|(_, r)| *r == Rank::OutAtLimit) {
        Unavailable::AtLimit(hard.unwrap_or_default())
    } else if ranked.iter().any(|(_, r)| *r == Rank::OutUnhealthy) {
        Unavailable::Unhealthy
    } else {
        Unavailable::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks() {
        let ok = Facts::default();
        assert_eq!(rank(&ok, None, None), Rank::Preferred);
        let busy = Facts { in_flight: 5, ..ok };
        assert_eq!(rank(&busy, Some(5), Some(10)), Rank::OverSoftLimit);
        assert_eq!(rank(&busy, Some(6), Some(10)), Rank::Preferred);
        assert_eq!(rank(&busy, Some(2), Some(5)), Rank::OutAtLimit);
        assert_eq!(
            rank(
                &Facts {
                    failing_checks: true,
                    ..ok
                },
                None,
                None
            ),
            Rank::OutUnhealthy
        );
        assert_eq!(
            rank(
                &Facts {
                    breaker_open: true,
                    ..ok
                },
                None,
                None
            ),
            Rank::OutUnhealthy
        );
        assert_eq!(
            rank(
                &Facts {
                    degraded: true,
                    ..busy
                },
                Some(1),
                None
            ),
            Rank::Degraded,
            "degraded is worse than busy"
        );
        assert_eq!(
            rank(&Facts { tried: true, ..ok }, None, None),
            Rank::OutTried
        );
        // Ranks order as the choice uses them.
        assert!((Rank::Preferred as u8) < (Rank::OverSoftLimit as u8));
        assert!((Rank::OverSoftLimit as u8) < (Rank::Degraded as u8));
    }
}
