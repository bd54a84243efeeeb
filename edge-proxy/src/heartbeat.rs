//! Tells the coordinator this edge is alive, which agents it holds, which services it can serve
//! (for GSLB) and whether its anycast VIP is announced.
//!
//! Never fatal: when the coordinator is away the edge keeps serving on its last snapshot.

use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::Ordering;

use coordinator_api::{AnycastState, Client, EdgeHeartbeat, EdgeInfo, HEARTBEAT_INTERVAL_MS};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::state::Shared;

const SEND_TIMEOUT: Duration = Duration::from_secs(5);

async fn send(client: &Client, hb: &EdgeHeartbeat, limit: Duration) {
    match tokio::time::timeout(limit, client.heartbeat(hb)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "heartbeat failed"),
        Err(_) => debug!("heartbeat timed out"),
    }
}

/// Every [`HEARTBEAT_INTERVAL_MS`] and at once whenever the agent set changes; a last heartbeat
/// without agents on shutdown so the coordinator stops counting them here.
pub(crate) async fn run(
    client: Client,
    info: EdgeInfo,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(HEARTBEAT_INTERVAL_MS));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
            _ = shared.agents.changed.notified() => {}
        }
        let mut info = info.clone();
        info.anycast = shared.anycast.as_ref().map(|a| AnycastState {
            vip: a.vip.clone(),
            announced: a.announced.load(Ordering::Relaxed),
        });
        info.healthy_services = Some(healthy_services(&shared));
        let hb = EdgeHeartbeat {
            info,
            agents: shared.agents.agent_conns(),
        };
        send(&client, &hb, SEND_TIMEOUT).await;
    }
    // Draining: nothing is served here any more.
    let mut info = info;
    info.healthy_services = Some(Vec::new());
    let hb = EdgeHeartbeat {
        info,
        agents: Vec::new(),
    };
    send(&client, &hb, Duration::from_secs(1)).await;
}

/// The services of the current snapshot this edge could serve now (see
/// [`crate::backend::has_healthy`]), sorted so an unchanged verdict is an unchanged heartbeat.
fn healthy_services(shared: &Shared) -> Vec<String> {
    let policies = shared.policies.load();
    let mut names: Vec<String> = policies
        .keys()
        .filter(|s| crate::backend::has_healthy(shared, s))
        .cloned()
        .collect();
    names.sort_unstable();
    names
}
