//! Meridian's control plane: the store of desired state, the admin API, edge heartbeats
//! (observed state), and the watch streams that push snapshots to edges and GeoDNS.

mod api;
mod bootstrap;
mod clock;
mod compaction;
mod config;
mod dashboard;
mod error;
mod hub;
mod observed;
mod openapi;
mod pki;
mod resume;
mod server;
pub mod store;
mod validate;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::{Config, StoreKind};
pub use error::Error;

/// How often edge liveness is re-evaluated (well under `EDGE_DEAD_AFTER_MS`).
const LIVENESS_TICK: Duration = Duration::from_millis(250);

/// Runs the coordinator until `shutdown` is cancelled: binds first, then opens the store,
/// registers bootstrap tokens, logs `ready` and serves.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| Error::Bind {
        addr: config.listen,
        source,
    })?;
    let node = format!("{addr}/{}", std::process::id());
    let store = bootstrap::open_store(&config, node.clone()).await?;
    bootstrap::tokens(&store, &config).await?;
    let hub = hub::Hub::new(store).await?;
    info!(addr = %addr, data_dir = %config.data_dir.display(), store = hub.store().backend(), "ready");
    let tuning = Tuning {
        retention: compaction::Retention {
            revisions: config.history_revisions,
            keep_for: Duration::from_secs(config.history_minutes.saturating_mul(60)),
        },
        compact_every: Duration::from_millis(config.compact_every_ms),
        ..Tuning::default()
    };
    let sharing = tokio::spawn(share_observed(hub.clone(), shutdown.child_token(), node));
    let res = serve_with(listener, hub, shutdown.clone(), tuning).await;
    shutdown.cancel();
    let _ = sharing.await;
    res?;
    info!("coordinator stopped");
    Ok(())
}

/// Timings of the background work (shorter in tests).
#[derive(Clone, Copy, Debug)]
struct Tuning {
    progress_every: Duration,
    retention: compaction::Retention,
    compact_every: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            progress_every: api::PROGRESS_EVERY,
            retention: compaction::Retention {
                revisions: 10_000,
                keep_for: Duration::from_secs(3600),
            },
            compact_every: Duration::from_secs(30),
        }
    }
}

/// Serves the API on `listener` with the liveness ticker, observed-state saver, store follower
/// and compactor beside it, until `shutdown`.
async fn serve_with(
    listener: TcpListener,
    hub: Arc<hub::Hub>,
    shutdown: CancellationToken,
    tuning: Tuning,
) -> Result<(), Error> {
    // Child token: stops the ticker and watch streams also when serving fails on its own.
    let stop = shutdown.child_token();
    let ticker = tokio::spawn(liveness_ticker(hub.clone(), stop.clone()));
    let saver = tokio::spawn(persist_observed(hub.clone(), stop.clone()));
    let follower = tokio::spawn(follow_store(hub.clone(), stop.clone()));
    let compactor = tokio::spawn(compact_history(
        hub.clone(),
        stop.clone(),
        tuning.retention,
        tuning.compact_every,
    ));
    let mut state = api::AppState::new(hub, stop.clone());
    state.progress_every = tuning.progress_every;
    let app = api::router(state);
    let res = server::serve(listener, app, stop.clone())
        .await
        .map_err(Error::Serve);
    stop.cancel();
    let _ = ticker.await;
    let _ = saver.await;
    let _ = follower.await;
    let _ = compactor.await;
    res
}

/// Coalescing window of heartbeat writes to a shared store.
const SHARE_EVERY: Duration = Duration::from_millis(100);
/// How often a leader checks that the published GSLB view is its current one.
const GSLB_CHECK: Duration = Duration::from_millis(500);

/// With a shared store (etcd): writes the heartbeats this coordinator receives, follows what
/// the others wrote, and, while leading, publishes the GSLB view; so coordinators behind one
/// load balancer serve the same view. Does nothing with an embedded store.
async fn share_observed(hub: Arc<hub::Hub>, stop: CancellationToken, node: String) {
    let (view, leader) = match hub
        .store()
        .call(|s| Ok((s.shared_observed(), s.leadership())))
        .await
    {
        Ok((Some(v), l)) => (v, l),
        Ok((None, _)) => return,
        Err(e) => {
            tracing::warn!(error = %e, "cannot follow shared observed state");
            return;
        }
    };
    tokio::join!(
        write_shared(hub.clone(), stop.clone()),
        follow_shared(hub.clone(), stop.clone(), view.clone()),
        publish_gslb(hub, stop, view, leader, node),
    );
}

/// Writes received heartbeats to the shared store, coalesced per [`SHARE_EVERY`].
async fn write_shared(hub: Arc<hub::Hub>, stop: CancellationToken) {
    loop {
        let batch = tokio::select! {
            () = stop.cancelled() => return,
            b = hub.take_shared() => b,
        };
        if let Err(e) = hub.store().call(move |s| s.share_edges(batch)).await {
            tracing::warn!(error = %e, "could not share heartbeats");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(SHARE_EVERY) => {}
        }
    }
}

/// Feeds the edges other coordinators hear from into the hub (each liveness tick, so an edge
/// stays alive while its key does) and the leader's published GSLB view.
async fn follow_shared(
    hub: Arc<hub::Hub>,
    stop: CancellationToken,
    mut view: tokio::sync::watch::Receiver<Arc<store::SharedObserved>>,
) {
    let mut every = tokio::time::interval(LIVENESS_TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
            r = view.changed() => if r.is_err() { return },
        }
        let v = view.borrow_and_update().clone();
        let edges = v.edges.values().map(|e| e.heartbeat.clone()).collect();
        hub.remote_edges(edges, Instant::now(), clock::unix_ms());
        hub.set_published_gslb(v.gslb.as_ref().map(|g| g.regions.clone()));
    }
}

/// While leading: publishes this coordinator's GSLB view whenever the shared one differs.
async fn publish_gslb(
    hub: Arc<hub::Hub>,
    stop: CancellationToken,
    view: tokio::sync::watch::Receiver<Arc<store::SharedObserved>>,
    mut leader: tokio::sync::watch::Receiver<bool>,
    node: String,
) {
    let mut snaps = hub.subscribe();
    let mut every = tokio::time::interval(GSLB_CHECK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
            r = snaps.changed() => if r.is_err() { return },
            r = leader.changed() => if r.is_err() { return },
        }
        snaps.borrow_and_update();
        let leading = *leader.borrow_and_update();
        hub.set_leader(leading);
        if !leading {
            continue;
        }
        let own = hub.own_region_health();
        let published = view.borrow().gslb.as_ref().map(|g| g.regions.clone());
        if published.as_ref() == Some(&own) {
            continue;
        }
        let g = store::PublishedGslb {
            leader: node.clone(),
            regions: own,
        };
        if let Err(e) = hub.store().call(move |s| s.publish_gslb(&g)).await {
            tracing::warn!(error = %e, "could not publish the GSLB view");
        }
    }
}

/// Compacts the change log on its own ([`compaction::Compactor`] decides how far), only while
/// this coordinator leads: with a shared etcd one coordinator compacts, and the others' watch
/// resumes fall back to snapshots like everyone's.
async fn compact_history(
    hub: Arc<hub::Hub>,
    stop: CancellationToken,
    retention: compaction::Retention,
    every: Duration,
) {
    let (revs, leader) = match hub
        .store()
        .call(|s| Ok((s.revisions(), s.leadership())))
        .await
    {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(error = %e, "cannot follow the store; not compacting history");
            return;
        }
    };
    let mut policy = compaction::Compactor::new(retention);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let latest = *revs.borrow();
        let Some(upto) = policy.tick(Instant::now(), latest) else {
            continue;
        };
        if !*leader.borrow() {
            continue;
        }
        match hub.store().call(move |s| s.compact(upto)).await {
            Ok(()) => {
                policy.compacted(upto);
                info!(upto, latest, "compacted change history");
            }
            Err(e) => tracing::warn!(error = %e, upto, "could not compact change history"),
        }
    }
}

/// Re-reads desired state whenever the store's revision moves past the published one: commits
/// by other coordinators sharing the backend (etcd) reach this coordinator's watchers too.
async fn follow_store(hub: Arc<hub::Hub>, stop: CancellationToken) {
    let mut revs = match hub.store().call(|s| Ok(s.revisions())).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot follow store revisions");
            return;
        }
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            r = revs.changed() => if r.is_err() { return },
        }
        let latest = *revs.borrow_and_update();
        if latest <= hub.current().revision {
            continue;
        }
        if let Err(e) = hub.refresh_desired().await {
            tracing::warn!(error = %e, "could not re-read desired state; retrying");
            revs.mark_changed();
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
}

/// Saves the observed edge set whenever it changes, so a restarted coordinator starts from it
/// (with a grace period) instead of from nothing. Coalesces: only the latest set is written.
///
/// Singleton work: with a shared store only the leader writes it (one writer, no flapping
/// between coordinators' partial views); an embedded store is always its own leader.
async fn persist_observed(hub: Arc<hub::Hub>, stop: CancellationToken) {
    let mut leader = match hub.store().call(|s| Ok(s.leadership())).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot follow leadership; not persisting observed state");
            return;
        }
    };
    let mut rx = hub.subscribe();
    let mut saved = rx.borrow_and_update().observed_version;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
            r = leader.changed() => {
                if r.is_err() { return }
                // A new leader saves what it sees now.
                saved = u64::MAX;
            }
        }
        if !*leader.borrow_and_update() {
            continue;
        }
        let snap = rx.borrow_and_update().clone();
        if snap.observed_version == saved {
            continue;
        }
        saved = snap.observed_version;
        let json = match serde_json::to_string(&snap.edges) {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(error = %e, "could not serialise observed state");
                continue;
            }
        };
        if let Err(e) = hub.store().call(move |s| s.save_observed(&json)).await {
            tracing::warn!(error = %e, "could not save observed state");
        }
    }
}

async fn liveness_ticker(hub: Arc<hub::Hub>, stop: CancellationToken) {
    let mut every = tokio::time::interval(LIVENESS_TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => hub.tick(Instant::now()),
        }
    }
}
