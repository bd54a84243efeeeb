//! Meridian's tunnel agent: runs beside an app, dials out to edges over QUIC, and proxies the
//! requests the edges send down the tunnel to the local origin.
//!
//! Layout: sans-IO policy in `backoff`, `targets`, `heartbeat` and `headers`; IO in
//! `conn` (connection slots, control stream, drain) and `stream` (one request per QUIC stream).

mod admin;
mod backoff;
mod client_cert;
mod config;
mod conn;
mod error;
mod headers;
mod health;
mod heartbeat;
mod origin;
mod quic;
mod stream;
mod targets;
mod wire;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

pub use config::{Config, Transport};
pub use error::Error;

/// Runs the agent until `shutdown` is cancelled, then drains every connection (sends `Drain`,
/// lets in-flight requests finish for up to 10 s, closes with code 0) and returns.
///
/// Errors only for bad configuration; unreachable or rejecting edges are retried forever.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    if config.edges.is_empty() {
        return Err(Error::Config("at least one --edge is required".into()));
    }
    if config.token.is_empty() {
        return Err(Error::Config("--token must not be empty".into()));
    }
    if config.service.is_empty() {
        return Err(Error::Config("--service must not be empty".into()));
    }
    // Listeners first, before anything slow.
    let admin_listener = match config.admin_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| Error::AdminBind { addr, source })?,
        ),
        None => None,
    };
    let ca = std::fs::read(&config.ca).map_err(|source| Error::Ca {
        path: config.ca.clone(),
        source,
    })?;
    // `--mtls`: the certificate is fetched in the background; slots start once the first one
    // is here (or after a short wait, so a coordinator outage does not stop the agent from
    // serving services that do not require mTLS).
    let mtls = match (config.mtls, &config.coordinator) {
        (true, Some(url)) => {
            let client = coordinator_api::Client::new(url.clone(), config.token.clone())
                .map_err(|e| Error::Config(format!("--coordinator: {e}")))?;
            Some((client, Arc::new(client_cert::ClientCert::default())))
        }
        (true, None) => return Err(Error::Config("--mtls needs --coordinator".into())),
        (false, _) => None,
    };
    let client_configs = quic::client_configs(
        &ca,
        mtls.as_ref()
            .map(|(_, c)| c.clone() as Arc<dyn rustls::client::ResolvesClientCert>),
    )?;
    let origin = if config.to.is_empty() {
        None
    } else {
        Some(origin::Origin::new(&config.to, config.health_path.clone())?)
    };
    if origin.is_none() && config.tcp.is_none() {
        return Err(Error::Config("--to or --tcp is required".into()));
    }
    if let Some(tcp) = &config.tcp
        && !tcp
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
    {
        return Err(Error::Config(format!(
            "--tcp {tcp:?}: expected host:port, e.g. 127.0.0.1:6379"
        )));
    }
    let agent_id = config.agent_id.clone().unwrap_or_else(random_agent_id);

    let stream_ctx = Arc::new(stream::StreamCtx {
        origin,
        tcp: config.tcp.clone(),
        service: config.service.clone(),
    });
    let (health_tx, health_rx) = tokio::sync::watch::channel(true);
    let stats = Arc::new(admin::Stats::default());
    let shared = Arc::new(conn::Shared {
        token: config.token.clone(),
        agent_id: agent_id.clone(),
        service: config.service.clone(),
        server_name: config.server_name.clone(),
        client_config: client_configs.quic,
        tcp_tls: client_configs.tcp,
        transport: config.transport,
        quic_timeout: config.quic_timeout,
        quic_reprobe: config.quic_reprobe,
        targets: Mutex::new(targets::Targets::new(config.edges.clone(), config.regions)),
        stream_ctx: stream_ctx.clone(),
        health: health_rx.clone(),
        stats: stats.clone(),
        shutdown: shutdown.clone(),
        tasks: TaskTracker::new(),
    });
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(listener) = admin_listener {
        let view = admin::View {
            stats,
            health: health_rx,
            service: config.service.clone(),
            client_cert: mtls.as_ref().map(|(_, c)| c.clone()),
        };
        shared.tasks.spawn(admin::serve(
            listener,
            view,
            shutdown.clone(),
            shared.tasks.clone(),
        ));
    }
    info!(
        agent_id = %agent_id,
        admin = ?admin_addr,
        service = %config.service,
        origin = %config.to,
        tcp = ?config.tcp,
        edges = ?config.edges,
        regions = config.regions,
        transport = ?config.transport,
        "ready"
    );
    if let Some((client, cert)) = mtls {
        let (ready_tx, mut ready) = tokio::sync::watch::channel(false);
        shared.tasks.spawn(client_cert::renew_loop(
            client,
            config.service.clone(),
            cert,
            ready_tx,
            shutdown.clone(),
        ));
        tokio::select! {
            _ = ready.wait_for(|r| *r) => {}
            _ = tokio::time::sleep(FIRST_CERT_WAIT) => tracing::warn!(
                "no tunnel client certificate yet; connecting without one (services requiring mTLS refuse this agent until it arrives)"
            ),
            _ = shutdown.cancelled() => {}
        }
    }
    if config.health_interval > 0 {
        shared.tasks.spawn(health::probe_loop(
            stream_ctx,
            Duration::from_secs(config.health_interval),
            health_tx,
            shutdown.clone(),
        ));
    } else {
        drop(health_tx);
    }
    conn::spawn_slot(&shared, 0);

    shutdown.cancelled().await;
    info!("shutting down: draining tunnel connections");
    shared.tasks.close();
    shared.tasks.wait().await;
    info!("stopped");
    Ok(())
}

/// How long `--mtls` waits for its first certificate before connecting without one.
const FIRST_CERT_WAIT: Duration = Duration::from_secs(10);

fn random_agent_id() -> String {
    let bytes: [u8; 6] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn agent_id_is_12_hex() {
        let id = super::random_agent_id();
        assert_eq!(id.len(), 12);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
