//! The hub joins desired state (from the store) and observed state (from heartbeats) into one
//! [`Snapshot`], computed once per change and fanned out through a `tokio::sync::watch`.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use std::collections::{BTreeMap, BTreeSet};

use coordinator_api::{
    AdminState, AgentView, EdgeHeartbeat, EdgeStatus, Region, RegionHealth, ServiceAgents, Snapshot,
};
use tokio::sync::{Notify, watch};
use tracing::warn;

use crate::observed::{Observed, ObservedError};
use crate::store::{Desired, StoreError, StoreHandle};

#[derive(Debug)]
struct State {
    desired: Arc<Desired>,
    observed: Observed,
    /// Observed state is shared with other coordinators (etcd): the GSLB view is the leader's.
    shared: bool,
    /// Whether this coordinator leads (always, when not shared).
    leader: bool,
    /// The leader's last published GSLB view (followers serve it instead of their own).
    gslb: Option<Vec<RegionHealth>>,
    /// The leader's view is no longer published (it died): serve the last one, frozen, as stale.
    gslb_stale: bool,
    /// Bumped when the served GSLB view changes for a reason `observed` does not count (a
    /// published view, a leadership change), so subscribers hear of it: observed_version is the
    /// sum of both counters.
    gslb_version: u64,
    /// PEM of the tunnel client CA, in every snapshot.
    tunnel_client_ca: Option<String>,
}

#[derive(Debug)]
pub(crate) struct Hub {
    store: StoreHandle,
    /// Held only for in-memory work, never across `.await`.
    state: Mutex<State>,
    tx: watch::Sender<Arc<Snapshot>>,
    started: Instant,
    /// Heartbeats received since the last [`Hub::take_shared`], latest per edge (shared stores).
    to_share: Mutex<BTreeMap<String, EdgeHeartbeat>>,
    share_ready: Notify,
    /// Signs agents' tunnel client certificates (`POST /v1/agent/certificate`).
    tunnel_ca: Arc<crate::pki::TunnelCa>,
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
        let shared = store.call(|s| Ok(s.shared_observed().is_some())).await?;
        // Loaded before the first snapshot is built: a snapshot only goes out again when a
        // revision moves, and the CA must be in the very first one.
        let tunnel_ca = crate::pki::load_or_create(&store)
            .await
            .map_err(|e| match e {
                crate::pki::PkiError::Store(e) => e,
                other => StoreError::Backend(other.to_string()),
            })?;
        let state = State {
            desired: Arc::new(desired),
            observed,
            shared,
            leader: !shared,
            gslb: None,
            gslb_stale: false,
            gslb_version: 0,
            tunnel_client_ca: Some(tunnel_ca.cert_pem().to_owned()),
        };
        let (tx, _) = watch::channel(Arc::new(build(&state)));
        Ok(Arc::new(Self {
            store,
            state: Mutex::new(state),
            tx,
            started,
            to_share: Mutex::default(),
            share_ready: Notify::new(),
            tunnel_ca: Arc::new(tunnel_ca),
        }))
    }

    /// When this hub (the coordinator process) started.
    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    pub(crate) fn store(&self) -> &StoreHandle {
        &self.store
    }

    /// The tunnel client CA that signs agent certificates.
    pub(crate) fn tunnel_ca(&self) -> &crate::pki::TunnelCa {
        &self.tunnel_ca
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
        let shared = st.shared.then(|| hb.clone());
        if st.observed.heartbeat(hb, now, now_ms)? {
            self.publish(&st);
        }
        drop(st);
        if let Some(mut hb) = shared {
            sort_agents(&mut hb);
            let mut q = self.to_share.lock().unwrap_or_else(PoisonError::into_inner);
            q.insert(hb.info.id.clone(), hb);
            drop(q);
            self.share_ready.notify_one();
        }
        Ok(())
    }

    /// Heartbeats to write to the shared store: waits for at least one, then takes them all.
    pub(crate) async fn take_shared(&self) -> Vec<EdgeHeartbeat> {
        loop {
            let batch =
                std::mem::take(&mut *self.to_share.lock().unwrap_or_else(PoisonError::into_inner));
            if !batch.is_empty() {
                return batch.into_values().collect();
            }
            self.share_ready.notified().await;
        }
    }

    /// Edges other coordinators heard from (the shared view holds them while their leases live):
    /// each counts as a heartbeat now. Edges this coordinator hears itself are refreshed both ways.
    pub(crate) fn remote_edges(&self, edges: Vec<EdgeHeartbeat>, now: Instant, now_ms: u64) {
        let mut st = self.lock();
        let mut changed = false;
        for hb in edges {
            // Refused only beyond MAX_EDGES, which the local heartbeat path reports.
            changed |= st.observed.heartbeat(hb, now, now_ms).unwrap_or(false);
        }
        if changed {
            self.publish(&st);
        }
    }

    /// Leadership changed: a leader serves (and publishes) its own GSLB view, a follower the
    /// leader's.
    pub(crate) fn set_leader(&self, leader: bool) {
        let mut st = self.lock();
        if st.leader != leader {
            st.leader = leader;
            st.gslb_version += 1;
            self.publish(&st);
        }
    }

    /// The leader's published view as the shared store has it; `None` once it is gone (the
    /// leader died): the last view stays, marked stale, instead of turning everything down.
    pub(crate) fn set_published_gslb(&self, view: Option<Vec<RegionHealth>>) {
        let mut st = self.lock();
        if st.published(view) {
            self.publish(&st);
        }
    }

    /// The GSLB view computed from this coordinator's own observation (what a leader publishes).
    pub(crate) fn own_region_health(&self) -> Vec<RegionHealth> {
        let st = self.lock();
        region_health(
            &st.desired.regions,
            &st.observed.edges(),
            st.observed.stale(),
        )
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

impl State {
    /// Records the leader's published view (`None`: no longer published); returns whether what
    /// this coordinator serves changed. A view that disappears stays, frozen and marked stale.
    fn published(&mut self, view: Option<Vec<RegionHealth>>) -> bool {
        let stale = view.is_none() && (self.gslb.is_some() || self.gslb_stale);
        let gslb = view.or_else(|| self.gslb.clone());
        if gslb == self.gslb && stale == self.gslb_stale {
            return false;
        }
        self.gslb = gslb;
        self.gslb_stale = stale;
        // A leader serves its own view; only a follower's subscribers see this one.
        if self.leader {
            return false;
        }
        self.gslb_version += 1;
        true
    }
}

/// `edges[].last_seen_ms` in a snapshot is as of the last observed change; `GET /v1/edges`
/// has the live value. That keeps heartbeats from pushing a snapshot every second.
fn build(st: &State) -> Snapshot {
    let d = &st.desired;
    let edges = st.observed.edges();
    let health = match &st.gslb {
        Some(view) if st.shared && !st.leader => view
            .iter()
            .map(|r| RegionHealth {
                stale: r.stale || st.gslb_stale,
                ..r.clone()
            })
            .collect(),
        _ => region_health(&d.regions, &edges, st.observed.stale()),
    };
    Snapshot {
        revision: d.revision,
        observed_version: st.observed.version() + st.gslb_version,
        regions: d.regions.clone(),
        services: d.services.clone(),
        mounts: d.mounts.clone(),
        agent_tokens: d.agent_tokens.clone(),
        records: d.records.clone(),
        region_health: health,
        edges,
        tunnel_client_ca: st.tunnel_client_ca.clone(),
    }
}

/// Agents in the order [`Observed`] keeps them, so an unchanged heartbeat compares equal.
fn sort_agents(hb: &mut EdgeHeartbeat) {
    hb.agents.sort_by(|a, b| {
        (&a.agent_id, &a.token_id, &a.remote_addr).cmp(&(&b.agent_id, &b.token_id, &b.remote_addr))
    });
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
                healthy_services: None,
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
                    origin_healthy: true,
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

    fn state(shared: bool, leader: bool) -> State {
        State {
            desired: Arc::new(Desired {
                regions: vec![region("ams", AdminState::Auto)],
                ..Desired::default()
            }),
            observed: Observed::default(),
            shared,
            leader,
            gslb: None,
            gslb_stale: false,
            gslb_version: 0,
            tunnel_client_ca: None,
        }
    }

    fn view(healthy: bool) -> Vec<RegionHealth> {
        vec![RegionHealth {
            region: "ams".into(),
            edges_alive: u32::from(healthy),
            edges_total: 1,
            services: vec![],
            healthy,
            stale: false,
        }]
    }

    #[test]
    fn a_follower_serves_the_leaders_view_and_freezes_it_when_the_leader_goes() {
        // This follower sees no edge at all: on its own it would call ams down.
        let mut st = state(true, false);
        assert!(!build(&st).region_health[0].healthy);
        let v0 = build(&st).observed_version;
        assert!(st.published(Some(view(true))));
        let snap = build(&st);
        assert_eq!(snap.region_health, view(true));
        assert!(snap.observed_version > v0, "subscribers must hear of it");
        assert!(!st.published(Some(view(true))), "unchanged");
        // The leader died: its view stays, marked stale, not turned into "down".
        assert!(st.published(None));
        let frozen = build(&st).region_health;
        assert!(frozen[0].healthy && frozen[0].stale);
        assert!(!st.published(None));
        // A new leader publishes: fresh again.
        assert!(st.published(Some(view(false))));
        assert_eq!(build(&st).region_health, view(false));
        // A leader serves its own computation whatever is published.
        let mut leader = state(true, true);
        assert!(!leader.published(Some(view(true))));
        assert!(!build(&leader).region_health[0].healthy);
        // Without a shared store nothing is published and the own view is served.
        assert!(!build(&state(false, true)).region_health[0].stale);
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
