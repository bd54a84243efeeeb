//! Observed state shared between coordinators on etcd.
//!
//! - `P/observed/edge/<id>`: an edge's last heartbeat (info and agents), written by whichever
//!   coordinator received it, under a short per-edge lease. Unchanged heartbeats only renew the
//!   lease (no new revision, so the key space does not churn once a second per edge); a changed
//!   one is put again. A dead edge stops renewing and its key expires: existence is liveness.
//! - `P/observed/gslb`: the leader's GSLB view (per-region health), put under the leader's
//!   lease whenever it changes. When the leader dies the key goes with its lease, and the others
//!   keep the last view, marked stale (frozen), until a new leader publishes its own.
//!
//! Every coordinator follows `P/observed/` with a list-then-watch into a
//! [`watch::Receiver<Arc<SharedObserved>>`] that the hub reads.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use coordinator_api::{EdgeHeartbeat, RegionHealth};
use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::StoreError;

/// An edge key's lease: renewed by every heartbeat (one a second), so an edge is gone from the
/// shared view this long after its last one. etcd's minimum TTL is about 1.5 s.
pub const EDGE_LEASE_TTL: Duration = Duration::from_secs(2);
/// Most edge keys written or renewed per flush.
const MAX_FLUSH: usize = 10_000;
/// Pause before the follower lists again after an error.
const RETRY: Duration = Duration::from_millis(250);

/// One edge as the shared view holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedEdge {
    pub heartbeat: EdgeHeartbeat,
    /// The lease the key is attached to; renewing it keeps the edge in the view.
    pub lease: i64,
}

/// The leader's GSLB view as published.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedGslb {
    /// The coordinator that computed it (for operators).
    pub leader: String,
    pub regions: Vec<RegionHealth>,
}

/// Everything the coordinators share about the network.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedObserved {
    pub edges: BTreeMap<String, SharedEdge>,
    /// The leader's current view; `None` when no leader publishes one (none yet, or it died).
    pub gslb: Option<PublishedGslb>,
}

#[derive(Clone, Debug)]
pub(super) struct SharedKeys {
    root: String,
}

impl SharedKeys {
    pub(super) fn new(root: &str) -> Self {
        Self {
            root: format!("{root}/observed/"),
        }
    }
    fn edge(&self, id: &str) -> String {
        format!("{}edge/{id}", self.root)
    }
    fn gslb(&self) -> String {
        format!("{}gslb", self.root)
    }
}

fn backend(e: etcd_client::Error) -> StoreError {
    StoreError::Backend(format!("etcd: {e}"))
}

/// Writes what changed and renews the rest: `edges` are heartbeats this coordinator received,
/// `view` is the shared view it follows (to know what is already there, under which lease).
pub(super) async fn write_edges(
    mut c: Client,
    keys: &SharedKeys,
    edges: Vec<EdgeHeartbeat>,
    view: Arc<SharedObserved>,
) -> Result<(), StoreError> {
    let ttl = i64::try_from(EDGE_LEASE_TTL.as_secs()).unwrap_or(2);
    let mut fresh_lease = None;
    for hb in edges.into_iter().take(MAX_FLUSH) {
        if let Some(have) = view.edges.get(&hb.info.id)
            && have.heartbeat == hb
            && renew(&mut c, have.lease).await?
        {
            continue;
        }
        // New, changed, or its lease is gone: put it under a lease of ours (one per flush).
        let lease = match fresh_lease {
            Some(l) => l,
            None => {
                let l = c.lease_grant(ttl, None).await.map_err(backend)?.id();
                fresh_lease = Some(l);
                l
            }
        };
        let value = serde_json::to_vec(&hb).map_err(|e| StoreError::Backend(e.to_string()))?;
        c.put(
            keys.edge(&hb.info.id),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .map_err(backend)?;
    }
    Ok(())
}

/// Renews `lease` once; false when it no longer exists.
async fn renew(c: &mut Client, lease: i64) -> Result<bool, StoreError> {
    let (mut keeper, mut acks) = c.lease_keep_alive(lease).await.map_err(backend)?;
    keeper.keep_alive().await.map_err(backend)?;
    let ack = acks.message().await.map_err(backend)?;
    Ok(ack.is_some_and(|a| a.ttl() > 0))
}

/// Puts the leader's view under the leader's lease (it goes when the leader does).
pub(super) async fn publish_gslb(
    mut c: Client,
    keys: &SharedKeys,
    view: &PublishedGslb,
    lease: i64,
) -> Result<(), StoreError> {
    if lease == 0 {
        return Err(StoreError::Backend(
            "not leading: no lease to publish under".into(),
        ));
    }
    let value = serde_json::to_vec(view).map_err(|e| StoreError::Backend(e.to_string()))?;
    c.put(
        keys.gslb(),
        value,
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .map_err(backend)?;
    Ok(())
}

/// List-then-watch of `P/observed/` into `tx`, relisting after any error, until `stop`.
pub(super) async fn follow(
    c: Client,
    keys: SharedKeys,
    tx: watch::Sender<Arc<SharedObserved>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            r = follow_once(c.clone(), &keys, &tx) => {
                if let Err(e) = r {
                    warn!(error = %e, "shared observed state: etcd watch failed; relisting");
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

async fn follow_once(
    mut c: Client,
    keys: &SharedKeys,
    tx: &watch::Sender<Arc<SharedObserved>>,
) -> Result<(), StoreError> {
    let list = c
        .get(keys.root.clone(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(backend)?;
    let mut view = SharedObserved::default();
    for kv in list.kvs() {
        apply(&mut view, keys, kv.key(), Some((kv.value(), kv.lease())));
    }
    tx.send_replace(Arc::new(view.clone()));
    let from = list.header().map_or(0, |h| h.revision()) + 1;
    let mut stream = c
        .watch(
            keys.root.clone(),
            Some(WatchOptions::new().with_prefix().with_start_revision(from)),
        )
        .await
        .map_err(backend)?;
    while let Some(resp) = stream.message().await.map_err(backend)? {
        if resp.canceled() || resp.compact_revision() > 0 {
            return Err(StoreError::Backend(format!(
                "watch canceled: {}",
                resp.cancel_reason()
            )));
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let value = match ev.event_type() {
                EventType::Put => Some((kv.value(), kv.lease())),
                EventType::Delete => None,
            };
            apply(&mut view, keys, kv.key(), value);
        }
        tx.send_if_modified(|cur| {
            let changed = **cur != view;
            if changed {
                *cur = Arc::new(view.clone());
            }
            changed
        });
    }
    Ok(())
}

/// Applies one key's put (value, lease) or delete to `view`; undecodable values are skipped.
fn apply(view: &mut SharedObserved, keys: &SharedKeys, key: &[u8], value: Option<(&[u8], i64)>) {
    let Ok(key) = std::str::from_utf8(key) else {
        return;
    };
    let Some(rest) = key.strip_prefix(&keys.root) else {
        return;
    };
    if let Some(id) = rest.strip_prefix("edge/") {
        match value {
            Some((v, lease)) => match serde_json::from_slice::<EdgeHeartbeat>(v) {
                Ok(heartbeat) if heartbeat.info.id == id => {
                    view.edges
                        .insert(id.to_owned(), SharedEdge { heartbeat, lease });
                }
                Ok(_) => debug!(key, "edge key and id disagree; skipped"),
                Err(e) => debug!(key, error = %e, "undecodable edge; skipped"),
            },
            None => {
                view.edges.remove(id);
            }
        }
    } else if rest == "gslb" {
        view.gslb = value.and_then(|(v, _)| serde_json::from_slice(v).ok());
    }
}

#[cfg(test)]
mod tests {
    use coordinator_api::EdgeInfo;

    use super::*;

    fn hb(id: &str) -> EdgeHeartbeat {
        EdgeHeartbeat {
            info: EdgeInfo {
                id: id.into(),
                region: "ams".into(),
                public_ips: vec![],
                http_addr: None,
                https_addr: None,
                tunnel_addr: None,
                anycast: None,
                healthy_services: None,
            },
            agents: vec![],
        }
    }

    #[test]
    fn apply_tracks_edges_and_the_gslb_view() {
        let keys = SharedKeys::new("/m");
        let mut v = SharedObserved::default();
        let e1 = serde_json::to_vec(&hb("e1")).unwrap();
        apply(&mut v, &keys, b"/m/observed/edge/e1", Some((&e1, 7)));
        assert_eq!(v.edges["e1"].lease, 7);
        // A key whose id disagrees with the body, garbage, and foreign keys are ignored.
        apply(&mut v, &keys, b"/m/observed/edge/e2", Some((&e1, 7)));
        apply(&mut v, &keys, b"/m/observed/edge/e3", Some((b"{", 7)));
        apply(&mut v, &keys, b"/m/observed/edges", Some((b"[]", 0)));
        apply(&mut v, &keys, b"/other/observed/edge/e1", None);
        assert_eq!(v.edges.len(), 1);
        let g = PublishedGslb {
            leader: "a".into(),
            regions: vec![],
        };
        apply(
            &mut v,
            &keys,
            b"/m/observed/gslb",
            Some((&serde_json::to_vec(&g).unwrap(), 9)),
        );
        assert_eq!(v.gslb.as_ref(), Some(&g));
        apply(&mut v, &keys, b"/m/observed/gslb", None);
        apply(&mut v, &keys, b"/m/observed/edge/e1", None);
        assert_eq!(v, SharedObserved::default());
    }
}
