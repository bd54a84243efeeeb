//! Application heartbeats on the control stream. QUIC keepalives only prove the peer's stack is
//! alive; a `HeartbeatAck` proves the edge's tunnel task still serves this connection.

use std::time::{Duration, Instant};

/// Half a second: besides liveness, a heartbeat is what makes a restarted edge answer with a
/// stateless reset, so this bounds how long an edge restart goes unnoticed (p99 reconnect < 1 s).
pub(crate) const INTERVAL: Duration = Duration::from_millis(500);
/// No ack for this long: the edge is dead or wedged (a kill -9 sends nothing); drop the
/// connection and reconnect. Short, so a dead edge costs seconds, not the QUIC idle timeout.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(3);
/// A heartbeat unacked this long makes us probe: a restarted edge answers our next packet with
/// a QUIC stateless reset, so packets every [`PROBE_INTERVAL`] while in doubt bound how long a
/// restart goes unnoticed (instead of the next regular heartbeat or QUIC's backed-off probes).
pub(crate) const PROBE_AFTER: Duration = Duration::from_millis(300);
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_millis(150);

#[derive(Debug)]
pub(crate) struct Heartbeat {
    interval: Duration,
    timeout: Duration,
    next_seq: u64,
    next_due: Instant,
    last_ack: Instant,
    last_sent: Option<Instant>,
    /// Sequence number and send time of the oldest heartbeat no ack has covered yet.
    outstanding: Option<(u64, Instant)>,
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
            last_sent: None,
            outstanding: None,
        }
    }

    /// When the next heartbeat is due: the regular interval, or sooner while one is overdue.
    fn due(&self) -> Instant {
        match (self.outstanding, self.last_sent) {
            (Some((_, sent)), Some(last)) => self
                .next_due
                .min((sent + PROBE_AFTER).max(last + PROBE_INTERVAL)),
            _ => self.next_due,
        }
    }

    /// When the driver should next call [`Self::poll`].
    pub(crate) fn deadline(&self) -> Instant {
        self.due().min(self.last_ack + self.timeout)
    }

    /// `Err(())` if the edge stopped acking; `Ok(Some(seq))` if a heartbeat is due now.
    pub(crate) fn poll(&mut self, now: Instant) -> Result<Option<u64>, Dead> {
        if now.saturating_duration_since(self.last_ack) >= self.timeout {
            return Err(Dead {
                since: self.last_ack,
            });
        }
        if now < self.due() {
            return Ok(None);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.next_due = now + self.interval;
        self.last_sent = Some(now);
        self.outstanding.get_or_insert((seq, now));
        Ok(Some(seq))
    }

    /// An ack for a heartbeat we sent; acks for sequence numbers never sent are ignored. The edge
    /// answers in order, so an ack covers every earlier heartbeat too.
    pub(crate) fn on_ack(&mut self, seq: u64, now: Instant) {
        if seq < self.next_seq {
            self.last_ack = self.last_ack.max(now);
            if self.outstanding.is_some_and(|(first, _)| seq >= first) {
                // Later heartbeats may still be in flight; count them from their send time.
                self.outstanding =
                    (seq + 1 < self.next_seq).then(|| (seq + 1, self.last_sent.unwrap_or(now)));
            }
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
        // Acked at one interval; alive until TIMEOUT after that ack, dead at it.
        assert!(
            hb.poll(t0 + INTERVAL + TIMEOUT - Duration::from_millis(1))
                .is_ok()
        );
        assert!(hb.poll(t0 + INTERVAL + TIMEOUT).is_err());
    }

    #[test]
    fn probes_faster_while_an_ack_is_overdue() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0);
        let t1 = t0 + INTERVAL;
        assert_eq!(hb.poll(t1), Ok(Some(0)));
        // Acked promptly: back to the regular interval.
        hb.on_ack(0, t1 + Duration::from_millis(1));
        assert_eq!(hb.deadline(), t1 + INTERVAL);
        let t2 = t1 + INTERVAL;
        assert_eq!(hb.poll(t2), Ok(Some(1)));
        // Not acked: the next heartbeat goes out after PROBE_AFTER, then every PROBE_INTERVAL.
        assert_eq!(hb.deadline(), t2 + PROBE_AFTER);
        assert_eq!(
            hb.poll(t2 + PROBE_AFTER - Duration::from_millis(1)),
            Ok(None)
        );
        assert_eq!(hb.poll(t2 + PROBE_AFTER), Ok(Some(2)));
        assert_eq!(hb.deadline(), t2 + PROBE_AFTER + PROBE_INTERVAL);
        assert_eq!(hb.poll(t2 + PROBE_AFTER + PROBE_INTERVAL), Ok(Some(3)));
        // An ack for 2 leaves 3 outstanding; an ack for 3 ends probing.
        let last = t2 + PROBE_AFTER + PROBE_INTERVAL;
        hb.on_ack(2, last + Duration::from_millis(1));
        assert!(hb.deadline() < last + INTERVAL);
        hb.on_ack(3, last + Duration::from_millis(2));
        assert_eq!(hb.deadline(), last + INTERVAL);
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
