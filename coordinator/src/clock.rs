//! Wall-clock helpers (the monotonic clock is passed in as `now: Instant` where logic needs it).

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in milliseconds; 0 if the clock is before 1970.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
