//! Automatic change-log compaction: keep the last N revisions *and* everything from the last T
//! minutes, drop the rest. Subscribers further behind than that resume with a snapshot (the
//! watch falls back on [`crate::store::StoreError::Compacted`]), as Kubernetes clients re-list
//! after 410 Gone.
//!
//! Sans-IO: [`Compactor`] remembers when each revision became current (in memory, so a
//! restarted coordinator keeps everything for T minutes before compacting by time) and says how
//! far history may go; the driver in lib.rs compacts, and only while this coordinator leads.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use coordinator_api::Revision;

/// How much change history to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Retention {
    /// Always keep the last this many revisions.
    pub(crate) revisions: u64,
    /// And every revision that was current within this long.
    pub(crate) keep_for: Duration,
}

/// Most (time, revision) samples kept; at one per change and tick that bounds memory even
/// under a write storm (older samples are thinned, which only keeps history longer).
const MAX_SAMPLES: usize = 4_096;

#[derive(Debug)]
pub(crate) struct Compactor {
    retention: Retention,
    /// When each sampled revision was first seen current, oldest first.
    samples: VecDeque<(Instant, Revision)>,
    /// History before this is already gone.
    done: Revision,
}

impl Compactor {
    pub(crate) fn new(retention: Retention) -> Self {
        Self {
            retention,
            samples: VecDeque::new(),
            done: 0,
        }
    }

    /// Records that `latest` is current at `now`; returns the revision to compact to (history
    /// before it goes, a subscriber holding it can still resume) when that is further than what
    /// was compacted already. Call [`Self::compacted`] once the store did it.
    pub(crate) fn tick(&mut self, now: Instant, latest: Revision) -> Option<Revision> {
        if self.samples.back().is_none_or(|&(_, r)| r != latest) {
            if self.samples.len() >= MAX_SAMPLES {
                // Drop every other sample of the older half: coarser, never shorter, history.
                let keep: VecDeque<_> = self
                    .samples
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i >= MAX_SAMPLES / 2 || i % 2 == 0)
                    .map(|(_, s)| *s)
                    .collect();
                self.samples = keep;
            }
            self.samples.push_back((now, latest));
        }
        // The newest revision already current at the time horizon: everything after it is younger.
        let horizon = now.checked_sub(self.retention.keep_for)?;
        let idx = self.samples.iter().rposition(|&(t, _)| t <= horizon)?;
        let by_time = self.samples[idx].1;
        self.samples.drain(..idx);
        let by_count = latest.saturating_sub(self.retention.revisions);
        let target = by_time.min(by_count);
        (target > self.done).then_some(target)
    }

    pub(crate) fn compacted(&mut self, revision: Revision) {
        self.done = self.done.max(revision);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn keeps_the_last_n_revisions_and_the_last_t() {
        let t0 = Instant::now();
        let mut c = Compactor::new(Retention {
            revisions: 10,
            keep_for: 5 * MIN,
        });
        // Revision 50 at t0, 100 at t0+1min: nothing is five minutes old yet.
        assert_eq!(c.tick(t0, 50), None);
        assert_eq!(c.tick(t0 + MIN, 100), None);
        // At t0+5min revision 50 was current five minutes ago: keep from 50.
        assert_eq!(c.tick(t0 + 5 * MIN, 100), Some(50));
        c.compacted(50);
        assert_eq!(c.tick(t0 + 5 * MIN, 100), None, "nothing new to drop");
        // At t0+6min: 100 was current; the count (last 10 of 120) is the tighter bound.
        assert_eq!(c.tick(t0 + 6 * MIN, 120), Some(100));
        c.compacted(100);
        assert_eq!(c.tick(t0 + 20 * MIN, 120), Some(110));
    }

    #[test]
    fn zero_time_means_count_only_and_count_never_goes_below_zero() {
        let t0 = Instant::now();
        let mut c = Compactor::new(Retention {
            revisions: 3,
            keep_for: Duration::ZERO,
        });
        assert_eq!(c.tick(t0, 2), None);
        assert_eq!(c.tick(t0, 9), Some(6));
        c.compacted(6);
        assert_eq!(c.tick(t0, 9), None);
    }

    #[test]
    fn samples_stay_bounded_under_a_write_storm() {
        let t0 = Instant::now();
        let mut c = Compactor::new(Retention {
            revisions: 1,
            keep_for: MIN,
        });
        for r in 1..20_000u64 {
            c.tick(t0 + Duration::from_millis(r), r);
            assert!(c.samples.len() <= MAX_SAMPLES);
        }
        // Thinning kept the oldest sample, so history is never cut shorter than T.
        assert_eq!(c.samples.front().map(|s| s.1), Some(1));
    }
}
