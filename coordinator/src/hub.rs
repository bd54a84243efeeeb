//! The hub joins desired state (from the store) and observed state (from heartbeats) into one
//! [`Snapshot`], computed once per change and fanned out through a `tokio::sync::watch`.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use std::collections::{BTreeMap, BTreeSet};

use coordinator_api::{
    AdminState, AgentView, EdgeHeartbeat, EdgeStatus, Region, RegionHealth, ServiceAgents, Snapshot,
};
use tokio::sync::watch;
use tracing::warn;

use crate::observed::{Observed, ObservedError};
use crate::store::{Desired, StoreError, StoreHandle};

#[derive(Debug)]
struct State {
    desired: Arc<Desired>,
    observed: Observed,
}

#[derive(Debug)]
pub(crate) struct Hub {
    store: StoreHandle,
    /// Held only for in-memory work, never across `.await`.
    state: Mutex<State>,
    tx: watch::Sender<Arc<Snapshot>>,
    started: Instant,
}

impl Hub {
    pub(crate) async fn new(store: StoreHandle) -> Result<Arc<Self>, StoreError> {
        let (desired, saved) = store
            .call(|s| Ok((s.desired()?, s.load_observed()?)))
            .await?;
        let started = Instant::now();
        let mut observed = Observed::default();
        if let Some(json) = saved {
            match serde_json::from_str::<Vec<EdgeStatus>>(&json) {
                Ok(edges) => observed.restore(edges, started),
                Err(e) => warn!(error = %e, "ignoring unreadable saved observed state"),
            }
        }
        let state = State {
            desired: Arc::new(desired),
            observed,
        };
        let (tx, _) = watch::channel(Arc::new(build(&state)));
        Ok(Arc::new(Self {
            store,
            state: Mutex::new(state),
            tx,
            started,
        }))
    }

    /// When this hub (the coordinator process) started.
    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    pub(crate) fn store(&self) -> &StoreHandle {
        &self.store
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing under this lock can leave `State` half-updated, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Re-reads desired state after a write and publishes it if it is newer than what we have.
    /// Concurrent refreshes converge: an older read never replaces a newer one.
    pub(crate) async fn refresh_desired(&self) -> Result<(), StoreError> {
        let desired = self.store.call(|s| s.desired()).await?;
        let mut st = self.lock();
        if desired.revision > st.desired.revision {
            st.desired = Arc::new(desired);
            self.publish(&st);
        }
        Ok(())
    }

    pub(crate) fn heartbeat(
        &self,
        hb: EdgeHeartbeat,
        now: Instant,
        now_ms: u64,
    ) -> Result<(), ObservedError> {
        let mut st = self.lock();
        if st.observed.heartbeat(hb, now, now_ms)? {
            self.publish(&st);
        }
        Ok(())
    }

    /// Re-evaluates edge liveness at `now`, publishing only if something changed.
    pub(crate) fn tick(&self, now: Instant) {
        let mut st = self.lock();
        if st.observed.tick(now) {
            self.publish(&st);
        }
    }

    fn publish(&self, st: &State) {
        let snap = Arc::new(build(st));
        self.tx.send_if_modified(|cur| {
            let changed =
                cur.revision != snap.revision || cur.observed_version != snap.observed_version;
            if changed {
                *cur = snap;
            }
            changed
        });
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    pub(crate) fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    pub(crate) fn edges(&self) -> Vec<EdgeStatus> {
        self.lock().observed.edges()
    }

    pub(crate) fn agents(&self) -> Vec<AgentView> {
        self.lock().observed.agents()
    }
}

/// `edges[].last_seen_ms` in a snapshot is as of the last observed change; `GET /v1/edges`
/// has the live value. That keeps heartbeats from pushing a snapshot every second.
fn build(st: &State) -> Snapshot {
    let d = &st.desired;
    let edges = st.observed.edges();
    Snapshot {
        revision: d.revision,
        observed_version: st.observed.version(),
        regions: d.regions.clone(),
        services: d.services.clone(),
        mounts: d.mounts.clone(),
        agent_tokens: d.agent_tokens.clone(),
        records: d.records.clone(),
        region_health: region_health(&d.regions, &edges, st.observed.stale()),
        edges,
    }
}

/// The GSLB view: per region, live edges and the agents (per service) on them, with the
/// operator's override applied. Regions only edges mention are included too.
pub(crate) fn region_health(
    regions: &[Region],
    edges: &[EdgeStatus],
    stale: bool,
) -> Vec<RegionHealth> {
    let mut admin: BTreeMap<&str, AdminState> = BTreeMap::new();
    for r in regions {
        admin.insert(&r.name, r.admin_state);
    }
    for e in edges {
        admin.entry(&e.info.region).or_insert(AdminState::Auto);
    }
    admin
        .into_iter()
        .map(|(name, admin_state)| {
            let in_region = edges.iter().filter(|e| e.info.region == name);
            let mut total = 0u32;
            let mut alive = 0u32;
            let mut agents: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
            for e in in_region {
                total = total.saturating_add(1);
                if !e.alive {
                    continue;
                }
                alive = alive.saturating_add(1);
                for a in &e.agents {
                    agents.entry(&a.service).or_default().insert(&a.agent_id);
                }
            }
            let healthy = match admin_state {
                AdminState::Up => true,
                AdminState::Down => false,
                AdminState::Auto => alive > 0,
            };
            RegionHealth {
                region: name.to_owned(),
                edges_alive: alive,
                edges_total: total,
                services: agents
                    .into_iter()
                    .map(|(service, ids)| ServiceAgents {
                        service: service.to_owned(),
                        agents: u32::try_from(ids.len()).unwrap_or(u32::MAX),
                    })
                    .collect(),
                healthy,
                stale,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use coordinator_api::{AgentConn, EdgeInfo};

    use super::*;

    fn edge(id: &str, region: &str, alive: bool, agents: &[(&str, &str)]) -> EdgeStatus {
        EdgeStatus {
            info: EdgeInfo {
                id: id.into(),
                region: region.into(),
                public_ips: vec![],
                http_addr: None,
                https_addr: None,
                tunnel_addr: None,
                anycast: None,
            },
            alive,
            last_seen_ms: 0,
            agents: agents
                .iter()
                .map(|(agent, service)| AgentConn {
                    agent_id: (*agent).into(),
                    service: (*service).into(),
                    token_id: "t".into(),
                    remote_addr: "127.0.0.1:1".into(),
                    connected_at_ms: 0,
                })
                .collect(),
        }
    }

    fn region(name: &str, admin_state: AdminState) -> Region {
        Region {
            name: name.into(),
            latitude: None,
            longitude: None,
            admin_state,
        }
    }

    #[test]
    fn region_health_counts_live_edges_and_agents_and_honours_admin_state() {
        let regions = [
            region("ams", AdminState::Auto),
            region("iad", AdminState::Down),
            region("sin", AdminState::Up),
        ];
        let edges = [
            edge("ams-1", "ams", true, &[("a1", "web"), ("a2", "web")]),
            edge("ams-2", "ams", true, &[("a1", "web"), ("a3", "api")]),
            edge("iad-1", "iad", true, &[]),
            edge("sin-1", "sin", false, &[("a9", "web")]),
            edge("fra-1", "fra", false, &[]),
        ];
        let h = region_health(&regions, &edges, false);
        let names: Vec<&str> = h.iter().map(|r| r.region.as_str()).collect();
        assert_eq!(names, ["ams", "fra", "iad", "sin"]);
        assert_eq!(
            (h[0].edges_alive, h[0].edges_total, h[0].healthy),
            (2, 2, true)
        );
        assert_eq!(
            h[0].services,
            [
                ServiceAgents {
                    service: "api".into(),
                    agents: 1
                },
                ServiceAgents {
                    service: "web".into(),
                    agents: 2
                }
            ]
        );
        assert!(!h[1].healthy, "fra: no live edge");
        assert!(!h[2].healthy, "iad: forced down although alive");
        assert!(h[3].healthy, "sin: forced up although dead");
        assert!(
            h[3].services.is_empty(),
            "agents on dead edges do not count"
        );
    }
}
