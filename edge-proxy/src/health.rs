//! Active health checks: a sans-IO checker (when to probe, what a result means) and thin tasks
//! that run the probes, directly to origins and, through the tunnel, to each agent connection
//! (the check request travels over a stream like a forwarded request, so the edge judges the
//! agent's origin itself instead of trusting only the agent's own probe). A backend starts
//! healthy (a new service serves at once; retries cover a dead one until `fall` probes say so),
//! `fall` consecutive failed probes take it out of rotation, `rise` consecutive passes put it
//! back (HAProxy's rise/fall).

use std::sync::Weak;
use std::time::{Duration, Instant};

use tracing::{debug, info};

/// Verdicts of the edge's own checks of agents (through the tunnel), by agent connection key.
/// Only failing connections are listed, so the usual answer is a lock-free load of an empty set;
/// writers (a verdict flipping) clone and swap.
#[derive(Debug, Default)]
pub(crate) struct AgentChecks {
    failing: arc_swap::ArcSwap<std::collections::HashSet<u64>>,
    write: std::sync::Mutex<()>,
}

impl AgentChecks {
    /// Whether agent connection `key` passes the edge's checks (true without checks).
    pub(crate) fn passing(&self, key: u64) -> bool {
        let failing = self.failing.load();
        failing.is_empty() || !failing.contains(&key)
    }

    pub(crate) fn set(&self, key: u64, healthy: bool) {
        // Held for a clone of a (small) set, never across `.await`.
        let _g = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.failing.load();
        if cur.contains(&key) != healthy {
            return;
        }
        let mut next = (**cur).clone();
        if healthy {
            next.remove(&key);
        } else {
            next.insert(key);
        }
        self.failing.store(std::sync::Arc::new(next));
    }
}

/// A service's check settings in edge units.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Config {
    pub(crate) path: String,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) rise: u32,
    pub(crate) fall: u32,
}

impl From<&coordinator_api::HealthCheck> for Config {
    fn from(h: &coordinator_api::HealthCheck) -> Self {
        let interval = Duration::from_millis(h.interval_ms.max(10));
        Self {
            path: if h.path.starts_with('/') {
                h.path.clone()
            } else {
                format!("/{}", h.path)
            },
            interval,
            timeout: Duration::from_millis(h.timeout_ms.max(1)).min(interval),
            rise: h.rise.max(1),
            fall: h.fall.max(1),
        }
    }
}

/// What the driver should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Send one probe now, giving up after this long.
    Probe(Duration),
    /// Nothing to do before this instant.
    Wait(Instant),
}

/// The state of one origin's checks.
#[derive(Debug)]
pub(crate) struct Checker {
    cfg: Config,
    healthy: bool,
    /// Consecutive results that disagree with `healthy`.
    streak: u32,
    next: Instant,
    probing: bool,
}

impl Checker {
    /// The first probe goes out at once.
    pub(crate) fn new(cfg: Config, now: Instant) -> Self {
        Self {
            cfg,
            healthy: true,
            streak: 0,
            next: now,
            probing: false,
        }
    }

    #[cfg(test)]
    pub(crate) fn healthy(&self) -> bool {
        self.healthy
    }

    pub(crate) fn config(&self) -> &Config {
        &self.cfg
    }

    pub(crate) fn poll(&mut self, now: Instant) -> Action {
        if self.probing || now < self.next {
            return Action::Wait(self.next.max(now));
        }
        self.probing = true;
        Action::Probe(self.cfg.timeout)
    }

    /// Records a probe's result (a timeout is a failure); returns the new verdict when it flipped.
    pub(crate) fn on_result(&mut self, ok: bool, now: Instant) -> Option<bool> {
        self.probing = false;
        self.next = now + self.cfg.interval;
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.healthy {
            self.cfg.fall
        } else {
            self.cfg.rise
        };
        if self.streak >= needed {
            self.healthy = ok;
            self.streak = 0;
            return Some(ok);
        }
        None
    }
}

/// Runs `checker` against `origin`, publishing each verdict, until the origin is dropped (it is
/// no longer in any snapshot and no request holds it): the task holds only a weak reference.
pub(crate) async fn drive(origin: Weak<crate::upstream::OriginHandle>, mut checker: Checker) {
    loop {
        match checker.poll(Instant::now()) {
            Action::Wait(until) => tokio::time::sleep_until(until.into()).await,
            Action::Probe(limit) => {
                let Some(o) = origin.upgrade() else { return };
                let path = checker.config().path.clone();
                let ok = match tokio::time::timeout(limit, o.probe(&path)).await {
                    Ok(Ok(status)) => {
                        let ok = (200..400).contains(&status);
                        if !ok {
                            debug!(origin = %o.id, status, "health check failed");
                        }
                        ok
                    }
                    Ok(Err(e)) => {
                        debug!(origin = %o.id, error = %e, "health check failed");
                        false
                    }
                    Err(_) => {
                        debug!(origin = %o.id, "health check timed out");
                        false
                    }
                };
                if let Some(healthy) = checker.on_result(ok, Instant::now()) {
                    info!(origin = %o.id, healthy, "origin health changed");
                    o.set_healthy(healthy);
                }
            }
        }
        if origin.strong_count() == 0 {
            return;
        }
    }
}

/// How often the supervisor looks for agent connections to check (new ones are probed within
/// this, then on their service's interval).
const SUPERVISE_EVERY: Duration = Duration::from_millis(200);

/// Most bytes of a check response read through the tunnel; the rest is abandoned.
const MAX_CHECK_BODY: usize = 64 * 1024;

/// One checked agent connection: its settings and its probe task.
struct Watched {
    cfg: Config,
    task: tokio::task::AbortHandle,
}

/// Keeps one probe task per agent connection of every service with a health check: starts
/// tasks for new connections, stops those of connections that left or whose service changed its
/// check (forgetting their verdict), until `stop`.
pub(crate) async fn supervise_agents(
    shared: std::sync::Arc<crate::state::Shared>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut watched: std::collections::HashMap<u64, Watched> = std::collections::HashMap::new();
    let mut tick = tokio::time::interval(SUPERVISE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let policies = shared.policies.load();
        let mut wanted = std::collections::HashMap::new();
        for (service, sb) in policies.iter() {
            let Some(cfg) = &sb.health_check else {
                continue;
            };
            for a in shared.agents.list(service).as_deref().unwrap_or(&[]) {
                wanted.insert(a.key, (cfg, a.clone(), service));
            }
        }
        watched.retain(|key, w| {
            let keep = wanted.get(key).is_some_and(|(cfg, _, _)| **cfg == w.cfg);
            if !keep {
                w.task.abort();
                shared.agent_checks.set(*key, true);
            }
            keep
        });
        for (key, (cfg, agent, service)) in wanted {
            if watched.contains_key(&key) {
                continue;
            }
            let checker = Checker::new(cfg.clone(), Instant::now());
            let task = tokio::spawn(drive_agent(
                std::sync::Arc::downgrade(&agent),
                service.clone(),
                checker,
                shared.clone(),
            ));
            watched.insert(
                key,
                Watched {
                    cfg: cfg.clone(),
                    task: task.abort_handle(),
                },
            );
        }
    }
    for w in watched.values() {
        w.task.abort();
    }
}

/// Runs `checker` against one agent connection through the tunnel, publishing each verdict in
/// `shared.agent_checks`, until the connection is gone (or the supervisor aborts it).
async fn drive_agent(
    agent: Weak<crate::registry::AgentHandle>,
    service: String,
    mut checker: Checker,
    shared: std::sync::Arc<crate::state::Shared>,
) {
    loop {
        match checker.poll(Instant::now()) {
            Action::Wait(until) => tokio::time::sleep_until(until.into()).await,
            Action::Probe(limit) => {
                let Some(a) = agent.upgrade() else { return };
                let path = checker.config().path.clone();
                let host = check_host(&shared, &service);
                let conn = a.conn.clone();
                let key = a.key;
                let id = a.info.agent_id.clone();
                drop(a);
                let ok = match tokio::time::timeout(
                    limit,
                    probe_agent(conn, &service, &host, &path),
                )
                .await
                {
                    Ok(Ok(status)) => {
                        let ok = (200..400).contains(&status);
                        if !ok {
                            debug!(agent = %id, service, status, "health check through the tunnel failed");
                        }
                        ok
                    }
                    Ok(Err(e)) => {
                        debug!(agent = %id, service, error = %e, "health check through the tunnel failed");
                        false
                    }
                    Err(_) => {
                        debug!(agent = %id, service, "health check through the tunnel timed out");
                        false
                    }
                };
                if let Some(healthy) = checker.on_result(ok, Instant::now()) {
                    info!(agent = %id, service, healthy, "agent health (edge check) changed");
                    shared.agent_checks.set(key, healthy);
                }
            }
        }
        if agent.strong_count() == 0 {
            return;
        }
    }
}

/// The `Host` of a check through the tunnel: the service's first mount's host, as real traffic
/// carries (the agent forwards headers as they come), or the service name without one.
fn check_host(shared: &crate::state::Shared, service: &str) -> String {
    shared
        .snapshots
        .borrow()
        .as_deref()
        .and_then(|s| s.mounts.iter().find(|m| m.service == service))
        .map_or_else(|| service.to_owned(), |m| m.host.clone())
}

/// Errors of one check through the tunnel.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProbeError {
    #[error("opening a tunnel stream: {0}")]
    Open(#[from] quinn::ConnectionError),
    #[error("encoding the check request: {0}")]
    Encode(String),
    #[error("writing the check request: {0}")]
    Write(#[from] quinn::WriteError),
    #[error(transparent)]
    Wire(#[from] crate::wire::WireError),
    #[error("the agent sent frame type {0} instead of a response head")]
    Unexpected(u8),
    #[error("the stream ended without a response")]
    NoResponse,
}

/// One check through the tunnel: `GET path` as a forwarded request on a new stream of `conn`;
/// the origin's status (an agent's `Error` frame counts as its code, e.g. 502 when the origin
/// refused). The body is read up to [`MAX_CHECK_BODY`] so the agent finishes cleanly.
pub(crate) async fn probe_agent(
    conn: quinn::Connection,
    service: &str,
    host: &str,
    path: &str,
) -> Result<u16, ProbeError> {
    use bytes::{Bytes, BytesMut};
    use tunnel_proto::{Frame, RequestHead};
    let (mut send, recv) = conn.open_bi().await?;
    let head = Frame::RequestHead(RequestHead {
        service: service.to_owned(),
        method: Bytes::from_static(b"GET"),
        uri: Bytes::copy_from_slice(path.as_bytes()),
        headers: vec![
            (
                Bytes::from_static(b"host"),
                Bytes::copy_from_slice(host.as_bytes()),
            ),
            (
                Bytes::from_static(b"user-agent"),
                Bytes::from_static(b"meridian-health-check"),
            ),
        ],
    });
    let mut buf = BytesMut::new();
    tunnel_proto::encode_preamble(&mut buf);
    tunnel_proto::encode(&head, &mut buf).map_err(|e| ProbeError::Encode(e.to_string()))?;
    tunnel_proto::encode(&Frame::End, &mut buf).map_err(|e| ProbeError::Encode(e.to_string()))?;
    send.write_all(&buf).await?;
    let _ = send.finish();
    let mut reader = crate::wire::FrameReader::new(recv);
    let status = match reader.next().await? {
        Some(Frame::ResponseHead(h)) => h.status,
        Some(Frame::Error { code, .. }) => return Ok(code),
        Some(other) => {
            reader.stop(crate::wire::code::PROTOCOL);
            return Err(ProbeError::Unexpected(other.type_code()));
        }
        None => return Err(ProbeError::NoResponse),
    };
    let mut read = 0usize;
    loop {
        match reader.next().await {
            Ok(Some(Frame::Data(d))) => {
                read += d.len();
                if read > MAX_CHECK_BODY {
                    reader.stop(crate::wire::code::CANCELLED);
                    break;
                }
            }
            Ok(Some(Frame::Trailers(_))) => {}
            Ok(Some(Frame::End) | None) => break,
            Ok(Some(_)) | Err(_) => {
                reader.stop(crate::wire::code::CANCELLED);
                break;
            }
        }
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            path: "/health".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(200),
            rise: 2,
            fall: 3,
        }
    }

    #[test]
    fn probes_on_the_interval_one_at_a_time() {
        let t = Instant::now();
        let mut c = Checker::new(cfg(), t);
        assert_eq!(c.poll(t), Action::Probe(Duration::from_millis(200)));
        assert_eq!(c.poll(t), Action::Wait(t), "no second probe while one runs");
        c.on_result(true, t);
        assert_eq!(c.poll(t), Action::Wait(t + Duration::from_secs(1)));
        assert!(matches!(
            c.poll(t + Duration::from_secs(1)),
            Action::Probe(_)
        ));
    }

    #[test]
    fn fall_then_rise_with_hysteresis() {
        let t = Instant::now();
        let mut c = Checker::new(cfg(), t);
        assert!(c.healthy());
        assert_eq!(c.on_result(false, t), None);
        assert_eq!(c.on_result(false, t), None);
        assert_eq!(c.on_result(true, t), None, "a pass resets the streak");
        assert_eq!(c.on_result(false, t), None);
        assert_eq!(c.on_result(false, t), None);
        assert_eq!(c.on_result(false, t), Some(false));
        assert!(!c.healthy());
        assert_eq!(c.on_result(true, t), None);
        assert_eq!(c.on_result(false, t), None, "a failure resets the rise");
        assert_eq!(c.on_result(true, t), None);
        assert_eq!(c.on_result(true, t), Some(true));
        assert!(c.healthy());
    }

    #[test]
    fn agent_verdicts_list_only_failing_connections() {
        let c = AgentChecks::default();
        assert!(c.passing(1));
        c.set(1, false);
        c.set(2, true);
        assert!(!c.passing(1) && c.passing(2));
        c.set(1, false);
        assert_eq!(c.failing.load().len(), 1);
        c.set(1, true);
        assert!(c.passing(1));
        assert!(c.failing.load().is_empty());
    }

    #[test]
    fn config_from_the_api_is_bounded() {
        let c = Config::from(&coordinator_api::HealthCheck {
            path: "h".into(),
            interval_ms: 100,
            timeout_ms: 5_000,
            rise: 0,
            fall: 0,
        });
        assert_eq!(c.path, "/h");
        assert_eq!(c.timeout, Duration::from_millis(100));
        assert_eq!((c.rise, c.fall), (1, 1));
    }
}
