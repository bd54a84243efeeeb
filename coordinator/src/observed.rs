//! Observed state: which edges are alive and which agents they hold. Sans-IO: every method
//! takes `now`, so liveness is tested without sleeping.
//!
//! `version` changes only when something a subscriber cares about changes (an edge appears,
//! its info or agent set changes, it dies or comes back), not on every heartbeat.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use coordinator_api::{
    AgentConn, AgentView, EDGE_DEAD_AFTER_MS, EdgeHeartbeat, EdgeInfo, EdgeStatus,
};

/// An edge silent for this long is dropped from the list altogether.
pub(crate) const EDGE_FORGET_AFTER: Duration = Duration::from_secs(600);
/// Most edges tracked at once; heartbeats from further new edges are refused.
pub(crate) const MAX_EDGES: usize = 10_000;

#[derive(Debug)]
struct Entry {
    info: EdgeInfo,
    agents: Vec<AgentConn>,
    alive: bool,
    last_seen: Instant,
    last_seen_ms: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Observed {
    edges: BTreeMap<String, Entry>,
    version: u64,
    /// Liveness is frozen: every one of several edges went silent at once, which says more about
    /// our own connectivity than about the edges. Cleared by the next heartbeat.
    frozen: bool,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ObservedError {
    #[error("too many edges (limit {MAX_EDGES})")]
    TooManyEdges,
}

impl Observed {
    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    /// Restores the last persisted edge set after a restart. Each edge that was alive gets a
    /// full `EDGE_DEAD_AFTER_MS` from `now` to heartbeat before it is declared dead, so a
    /// coordinator that just restarted neither starts blind nor declares the whole network down.
    /// An edge saved dead stays dead until it heartbeats again.
    pub(crate) fn restore(&mut self, edges: Vec<EdgeStatus>, now: Instant) {
        let dead_after = Duration::from_millis(EDGE_DEAD_AFTER_MS);
        for e in edges {
            if self.edges.len() >= MAX_EDGES {
                break;
            }
            // Backdated so the next tick agrees with the saved verdict instead of reviving it.
            let last_seen = if e.alive {
                now
            } else {
                now.checked_sub(dead_after).unwrap_or(now)
            };
            self.edges.insert(
                e.info.id.clone(),
                Entry {
                    info: e.info,
                    agents: e.agents,
                    alive: e.alive,
                    last_seen,
                    last_seen_ms: e.last_seen_ms,
                },
            );
        }
        self.version += 1;
    }

    /// Whether liveness is currently frozen (see [`Observed::tick`]).
    pub(crate) fn stale(&self) -> bool {
        self.frozen
    }

    /// Records a heartbeat; returns whether observed state changed.
    pub(crate) fn heartbeat(
        &mut self,
        hb: EdgeHeartbeat,
        now: Instant,
        now_ms: u64,
    ) -> Result<bool, ObservedError> {
        let mut agents = hb.agents;
        agents.sort_by(|a, b| {
            (&a.agent_id, &a.token_id, &a.remote_addr).cmp(&(
                &b.agent_id,
                &b.token_id,
                &b.remote_addr,
            ))
        });
        let changed = match self.edges.get_mut(&hb.info.id) {
            Some(e) => {
                let changed = !e.alive || e.info != hb.info || e.agents != agents;
                e.info = hb.info;
                e.agents = agents;
                e.alive = true;
                e.last_seen = now;
                e.last_seen_ms = now_ms;
                changed
            }
            None => {
                if self.edges.len() >= MAX_EDGES {
                    return Err(ObservedError::TooManyEdges);
                }
                let id = hb.info.id.clone();
                self.edges.insert(
                    id,
                    Entry {
                        info: hb.info,
                        agents,
                        alive: true,
                        last_seen: now,
                        last_seen_ms: now_ms,
                    },
                );
                true
            }
        };
        let changed = changed || self.frozen;
        self.frozen = false;
        if changed {
            self.version += 1;
        }
        Ok(changed)
    }

    /// Re-evaluates liveness at `now`; returns whether anything changed.
    ///
    /// When several edges are known and *all* of them are silent, liveness is frozen rather than
    /// flipped to dead: a coordinator cut off from the network must not tell GeoDNS that every
    /// region is down. A single edge going silent (or some of many) flips as usual.
    pub(crate) fn tick(&mut self, now: Instant) -> bool {
        let dead_after = Duration::from_millis(EDGE_DEAD_AFTER_MS);
        let before = self.edges.len();
        self.edges
            .retain(|_, e| now.saturating_duration_since(e.last_seen) < EDGE_FORGET_AFTER);
        let mut changed = self.edges.len() != before;
        let all_silent = self.edges.len() > 1
            && self
                .edges
                .values()
                .all(|e| now.saturating_duration_since(e.last_seen) >= dead_after);
        if all_silent {
            if !self.frozen {
                self.frozen = true;
                changed = true;
            }
            if changed {
                self.version += 1;
            }
            return changed;
        }
        for e in self.edges.values_mut() {
            let alive = now.saturating_duration_since(e.last_seen) < dead_after;
            if alive != e.alive {
                e.alive = alive;
                changed = true;
            }
        }
        if changed {
            self.version += 1;
        }
        changed
    }

    pub(crate) fn edges(&self) -> Vec<EdgeStatus> {
        self.edges
            .values()
            .map(|e| EdgeStatus {
                info: e.info.clone(),
                alive: e.alive,
                last_seen_ms: e.last_seen_ms,
                agents: e.agents.clone(),
            })
            .collect()
    }

    /// Agent connections held by live edges.
    pub(crate) fn agents(&self) -> Vec<AgentView> {
        self.edges
            .values()
            .filter(|e| e.alive)
            .flat_map(|e| {
                e.agents.iter().map(|c| AgentView {
                    edge_id: e.info.id.clone(),
                    region: e.info.region.clone(),
                    conn: c.clone(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(id: &str, agents: &[&str]) -> EdgeHeartbeat {
        EdgeHeartbeat {
            info: EdgeInfo {
                id: id.into(),
                region: "ams".into(),
                public_ips: vec![],
                http_addr: None,
                https_addr: None,
                tunnel_addr: Some("127.0.0.1:4433".into()),
                anycast: None,
                healthy_services: None,
            },
            agents: agents
                .iter()
                .map(|a| AgentConn {
                    agent_id: (*a).into(),
                    service: "web".into(),
                    token_id: "t1".into(),
                    remote_addr: "127.0.0.1:9".into(),
                    connected_at_ms: 1,
                    origin_healthy: true,
                })
                .collect(),
        }
    }

    #[test]
    fn liveness_flips_after_timeout() {
        let t0 = Instant::now();
        let mut o = Observed::default();
        assert!(o.heartbeat(hb("e1", &["a1"]), t0, 1000).unwrap());
        let v1 = o.version();
        // Same heartbeat again: nothing a subscriber cares about changed.
        assert!(
            !o.heartbeat(hb("e1", &["a1"]), t0 + Duration::from_secs(1), 2000)
                .unwrap()
        );
        assert_eq!(o.version(), v1);
        assert_eq!(o.edges()[0].last_seen_ms, 2000);

        let last = t0 + Duration::from_secs(1);
        assert!(!o.tick(last + Duration::from_millis(EDGE_DEAD_AFTER_MS - 1)));
        assert!(o.edges()[0].alive);
        assert_eq!(o.agents().len(), 1);
        assert!(o.tick(last + Duration::from_millis(EDGE_DEAD_AFTER_MS)));
        assert!(!o.edges()[0].alive);
        assert!(o.agents().is_empty());
        let v2 = o.version();
        assert!(v2 > v1);
        // Still dead: no further bump.
        assert!(!o.tick(last + Duration::from_secs(10)));
        assert_eq!(o.version(), v2);
        // Back alive.
        assert!(
            o.heartbeat(hb("e1", &["a1"]), last + Duration::from_secs(11), 9000)
                .unwrap()
        );
        assert!(o.edges()[0].alive);
        // Forgotten after a long silence.
        assert!(o.tick(last + Duration::from_secs(11) + EDGE_FORGET_AFTER));
        assert!(o.edges().is_empty());
    }

    #[test]
    fn all_edges_silent_freezes_instead_of_killing() {
        let t0 = Instant::now();
        let mut o = Observed::default();
        o.heartbeat(hb("e1", &["a1"]), t0, 1).unwrap();
        o.heartbeat(hb("e2", &[]), t0, 1).unwrap();
        let late = t0 + Duration::from_millis(EDGE_DEAD_AFTER_MS + 1);
        assert!(o.tick(late), "freezing is a change subscribers see");
        assert!(o.stale());
        assert!(o.edges().iter().all(|e| e.alive), "frozen, not dead");
        assert!(!o.tick(late + Duration::from_secs(5)));
        // One edge comes back: unfrozen, and the silent one is now judged normally.
        o.heartbeat(hb("e1", &["a1"]), late + Duration::from_secs(6), 2)
            .unwrap();
        assert!(!o.stale());
        assert!(o.tick(late + Duration::from_secs(6)));
        let alive: Vec<bool> = o.edges().iter().map(|e| e.alive).collect();
        assert_eq!(alive, [true, false]);
    }

    #[test]
    fn restored_edges_get_a_grace_period() {
        let t0 = Instant::now();
        let mut before = Observed::default();
        before.heartbeat(hb("e1", &["a1"]), t0, 1).unwrap();
        let saved = before.edges();
        // Restart, much later: the restored edge is alive until a full timeout passes.
        let t1 = t0 + Duration::from_secs(300);
        let mut o = Observed::default();
        o.restore(saved, t1);
        assert!(!o.tick(t1 + Duration::from_millis(EDGE_DEAD_AFTER_MS - 1)));
        assert_eq!(o.agents().len(), 1);
        assert!(o.tick(t1 + Duration::from_millis(EDGE_DEAD_AFTER_MS)));
        assert!(o.agents().is_empty());

        // Saved dead: restored dead, and the next tick does not revive it.
        let mut again = Observed::default();
        again.restore(o.edges(), t1 + Duration::from_secs(60));
        assert!(!again.tick(t1 + Duration::from_secs(60)));
        assert!(again.agents().is_empty() && !again.edges()[0].alive);
    }

    #[test]
    fn agent_set_changes_bump_version() {
        let t0 = Instant::now();
        let mut o = Observed::default();
        o.heartbeat(hb("e1", &["a1", "a2"]), t0, 1).unwrap();
        // Order of agents in the heartbeat does not matter.
        assert!(!o.heartbeat(hb("e1", &["a2", "a1"]), t0, 2).unwrap());
        assert!(o.heartbeat(hb("e1", &["a1"]), t0, 3).unwrap());
        assert_eq!(o.agents().len(), 1);
        assert_eq!(o.agents()[0].edge_id, "e1");
    }
}
