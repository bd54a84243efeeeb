//! Meridian's control plane: the store of desired state, the admin API, edge heartbeats
//! (observed state), and the watch streams that push snapshots to edges and GeoDNS.

mod api;
mod bootstrap;
mod clock;
mod config;
mod dashboard;
mod error;
mod hub;
mod observed;
mod openapi;
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

pub use config::Config;
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
    let store = bootstrap::open_store(&config.data_dir).await?;
    bootstrap::tokens(&store, &config).await?;
    let hub = hub::Hub::new(store).await?;
    info!(addr = %addr, data_dir = %config.data_dir.display(), "ready");
    serve(listener, hub, shutdown).await?;
    info!("coordinator stopped");
    Ok(())
}

/// Serves the API on `listener` with a liveness ticker beside it, until `shutdown`.
async fn serve(
    listener: TcpListener,
    hub: Arc<hub::Hub>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    serve_with(listener, hub, shutdown, api::PROGRESS_EVERY).await
}

async fn serve_with(
    listener: TcpListener,
    hub: Arc<hub::Hub>,
    shutdown: CancellationToken,
    progress_every: Duration,
) -> Result<(), Error> {
    // Child token: stops the ticker and watch streams also when serving fails on its own.
    let stop = shutdown.child_token();
    let ticker = tokio::spawn(liveness_ticker(hub.clone(), stop.clone()));
    let saver = tokio::spawn(persist_observed(hub.clone(), stop.clone()));
    let mut state = api::AppState::new(hub, stop.clone());
    state.progress_every = progress_every;
    let app = api::router(state);
    let res = server::serve(listener, app, stop.clone())
        .await
        .map_err(Error::Serve);
    stop.cancel();
    let _ = ticker.await;
    let _ = saver.await;
    res
}

/// Saves the observed edge set whenever it changes, so a restarted coordinator starts from it
/// (with a grace period) instead of from nothing. Coalesces: only the latest set is written.
async fn persist_observed(hub: Arc<hub::Hub>, stop: CancellationToken) {
    let mut rx = hub.subscribe();
    let mut saved = rx.borrow_and_update().observed_version;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
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
