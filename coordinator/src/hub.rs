//! The hub joins desired state (from the store) and observed state (from heartbeats) into one
//! [`Snapshot`], computed once per change and fanned out through a `tokio::sync::watch`.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use coordinator_api::{AgentView, EdgeHeartbeat, EdgeStatus, Snapshot};
use tokio::sync::watch;

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
}

impl Hub {
    pub(crate) async fn new(store: StoreHandle) -> Result<Arc<Self>, StoreError> {
        let desired = store.call(|s| s.desired()).await?;
        let state = State {
            desired: Arc::new(desired),
            observed: Observed::default(),
        };
        let (tx, _) = watch::channel(Arc::new(build(&state)));
        Ok(Arc::new(Self {
            store,
            state: Mutex::new(state),
            tx,
        }))
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
    Snapshot {
        revision: d.revision,
        observed_version: st.observed.version(),
        regions: d.regions.clone(),
        services: d.services.clone(),
        mounts: d.mounts.clone(),
        agent_tokens: d.agent_tokens.clone(),
        edges: st.observed.edges(),
    }
}
