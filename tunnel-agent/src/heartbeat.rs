//! Application heartbeats on the control stream. QUIC keepalives only prove the peer's stack is
//! alive; a `HeartbeatAck` proves the edge's tunnel task still serves this connection.

use std::time::{Duration, Instant};

pub(crate) const INTERVAL: Duration = Duration::from_secs(1);
/// No ack for this long: the edge is dead or wedged (a kill -9 sends nothing); drop the
/// connection and reconnect. Short, so a dead edge costs seconds, not the QUIC idle timeout.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug)]
pub(crate) struct Heartbeat {
    interval: Duration,
    timeout: Duration,
    next_seq: u64,
    next_due: Instant,
    last_ack: Instant,
}

impl Heartbeat {
    pub(crate) fn new(now: Instant) -> Self {
        Self::with_timing(now, INTERVAL, TIMEOUT)
    }

    pub(crate) fn with_timing(now: Instant, interval: Duration, timeout: Duration) -> Self {
        Self {
            interval,
            timeout,
            next_seq: 0,
            next_due: now + interval,
            last_ack: now,
        }
    }

    /// When the driver should next call [`Self::poll`].
    pub(crate) fn deadline(&self) -> Instant {
        self.next_due.min(self.last_ack + self.timeout)
    }

    /// `Err(())` if the edge stopped acking; `Ok(Some(seq))` if a heartbeat is due now.
    pub(crate) fn poll(&mut self, now: Instant) -> Result<Option<u64>, Dead> {
        if now.saturating_duration_since(self.last_ack) >= self.timeout {
            return Err(Dead {
                since: self.last_ack,
            });
        }
        if now < self.next_due {
            return Ok(None);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.next_due = now + self.interval;
        Ok(Some(seq))
    }

    /// An ack for a heartbeat we sent; acks for sequence numbers never sent are ignored.
    pub(crate) fn on_ack(&mut self, seq: u64, now: Instant) {
        if seq < self.next_seq {
            self.last_ack = self.last_ack.max(now);
        }
    }
}

/// The edge has not acked a heartbeat since `since`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dead {
    pub(crate) since: Instant,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_every_interval_and_tracks_acks() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0);
        assert_eq!(hb.poll(t0), Ok(None));
        assert_eq!(hb.deadline(), t0 + INTERVAL);
        assert_eq!(hb.poll(t0 + INTERVAL), Ok(Some(0)));
        assert_eq!(hb.poll(t0 + INTERVAL), Ok(None));
        hb.on_ack(0, t0 + INTERVAL);
        assert_eq!(hb.poll(t0 + INTERVAL * 2), Ok(Some(1)));
        // Acked at 2 s; still alive at 11 s, dead at 12 s.
        assert!(
            hb.poll(t0 + INTERVAL + TIMEOUT - Duration::from_millis(1))
                .is_ok()
        );
        assert!(hb.poll(t0 + INTERVAL + TIMEOUT).is_err());
    }

    #[test]
    fn ignores_acks_for_unsent_seq() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0);
        hb.on_ack(5, t0 + Duration::from_secs(5));
        assert!(hb.poll(t0 + TIMEOUT).is_err());
    }

    #[test]
    fn deadline_covers_timeout() {
        let t0 = Instant::now();
        let hb = Heartbeat::with_timing(t0, Duration::from_secs(30), Duration::from_secs(10));
        assert_eq!(hb.deadline(), t0 + Duration::from_secs(10));
    }
}
