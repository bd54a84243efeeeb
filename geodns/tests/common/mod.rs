//! A GeoDNS server on real sockets for the integration suites: start it on a config and a
//! snapshot, feed it new snapshots, stop it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use coordinator_api::Snapshot;
use geodns::{Config, Server};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub(crate) const TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Running {
    pub(crate) addr: SocketAddr,
    pub(crate) shutdown: CancellationToken,
    pub(crate) task: tokio::task::JoinHandle<Result<(), geodns::Error>>,
    /// Read by the serve suite only.
    #[allow(dead_code)]
    pub(crate) stats: Arc<geodns::Stats>,
    pub(crate) snapshots: watch::Sender<Option<Arc<Snapshot>>>,
}

/// Binds `config` (port 0 in tests) and serves `snapshot` until [`Running::stop`].
pub(crate) async fn start_with(config: Config, snapshot: Option<Snapshot>) -> Running {
    let server = Server::bind(&config).await.unwrap();
    let addr = server.local_addrs()[0];
    let stats = server.stats();
    let (tx, rx) = watch::channel(snapshot.map(Arc::new));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(rx, shutdown.clone()));
    Running {
        addr,
        shutdown,
        task,
        stats,
        snapshots: tx,
    }
}

impl Running {
    /// Cancels the server and waits for it to return without error.
    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(TIMEOUT, self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
