//! Meridian's authoritative GeoDNS: answers each client with the edges of its nearest live region.
//!
//! Layout: [`gslb`] (client → region → addresses, pure), [`zone`] (the zone's static records),
//! [`respond`] (one packet in, one packet out, pure), [`server`] (UDP/TCP drivers). Snapshots
//! arrive through the coordinator subscriber and are turned into immutable answer tables swapped
//! atomically, so queries never wait on the control plane.

pub mod config;
pub mod explain;
pub mod fastpath;
pub mod geoip;
pub mod gslb;
pub mod health;
pub mod metrics;
pub mod mmdb_writer;
pub mod prefix;
pub mod respond;
pub mod rrl;
pub mod server;
pub mod zone;

use std::sync::Arc;

use coordinator_api::{Snapshot, Subscriber, SubscriberConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::{Config, GeoMap, NetRule};
pub use explain::{ExplainArgs, explain};
pub use server::{Server, Stats};

/// File in `--state-dir` holding the last good snapshot.
const SNAPSHOT_CACHE_FILE: &str = "snapshot.json";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot bind {proto} {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        proto: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("coordinator client: {0}")]
    Coordinator(#[from] coordinator_api::ClientError),
}

/// Runs the GeoDNS role until `shutdown` is cancelled: binds every listener, then follows the
/// coordinator's snapshots.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let Some(url) = config.coordinator.clone() else {
        return Err(Error::Config(
            "--coordinator (or MERIDIAN_COORDINATOR) is required".into(),
        ));
    };
    let server = Server::bind(&config).await?;
    let client = coordinator_api::Client::new(url, config.node_token.clone().unwrap_or_default())?;
    let cache_path = config
        .state_dir
        .as_ref()
        .map(|d| d.join(SNAPSHOT_CACHE_FILE));
    let (snapshots, subscriber) = Subscriber::spawn(SubscriberConfig { client, cache_path });
    let result = server.run(snapshots, shutdown).await;
    subscriber.abort();
    result
}

/// Serves `config` from an injected snapshot source (tests, embedders): [`run`] without the
/// coordinator.
pub async fn serve(
    config: Config,
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    Server::bind(&config).await?.run(snapshots, shutdown).await
}
