//! Origin health, agent side: the edge steers away from agents whose origin is down
//! (cloudflared users ask for this most, #725/#826). Sans-IO hysteresis here; the probe loop
//! below is a thin driver.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Consecutive failures before the origin counts as down (one blip is not an outage).
const FALL: u32 = 2;
/// Consecutive successes before it counts as up again.
const RISE: u32 = 2;
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub(crate) struct Hysteresis {
    healthy: Option<bool>,
    streak: u32,
}

impl Hysteresis {
    pub(crate) fn new() -> Self {
        Self {
            healthy: None,
            streak: 0,
        }
    }

    /// Feeds one probe result; returns the new state when it changes. The first result sets the
    /// state directly so a dead origin is reported right after start.
    pub(crate) fn on_probe(&mut self, ok: bool) -> Option<bool> {
        match self.healthy {
            None => {
                self.healthy = Some(ok);
                Some(ok)
            }
            Some(current) if current == ok => {
                self.streak = 0;
                None
            }
            Some(_) => {
                self.streak += 1;
                let needed = if ok { RISE } else { FALL };
                if self.streak >= needed {
                    self.streak = 0;
                    self.healthy = Some(ok);
                    Some(ok)
                } else {
                    None
                }
            }
        }
    }
}

/// Probes the origin every `interval` until shutdown, publishing transitions on `tx`.
pub(crate) async fn probe_loop(
    origin: std::sync::Arc<crate::stream::StreamCtx>,
    interval: Duration,
    tx: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut state = Hysteresis::new();
    loop {
        let ok = probe(&origin).await;
        if let Some(healthy) = state.on_probe(ok) {
            if healthy {
                info!(service = %origin.service, "origin is healthy");
            } else {
                warn!(service = %origin.service, "origin is unhealthy; edges will avoid this agent");
            }
            // Only real changes wake the connections (the initial `true` needs no report).
            tx.send_if_modified(|v| std::mem::replace(v, healthy) != healthy);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn probe(ctx: &crate::stream::StreamCtx) -> bool {
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, ctx.probe()).await,
        Ok(true)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_result_sets_state_then_hysteresis() {
        let mut h = Hysteresis::new();
        assert_eq!(h.on_probe(true), Some(true));
        assert_eq!(h.on_probe(true), None);
        assert_eq!(h.on_probe(false), None);
        assert_eq!(h.on_probe(true), None, "a blip resets the streak");
        assert_eq!(h.on_probe(false), None);
        assert_eq!(h.on_probe(false), Some(false));
        assert_eq!(h.on_probe(false), None);
        assert_eq!(h.on_probe(true), None);
        assert_eq!(h.on_probe(true), Some(true));
    }

    #[test]
    fn dead_at_start_is_reported_at_once() {
        let mut h = Hysteresis::new();
        assert_eq!(h.on_probe(false), Some(false));
    }
}
