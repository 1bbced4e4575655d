//! Wall-clock helpers for the timestamps recorded in durable facts.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is set before 1970).
pub fn now_unix_ms() -> i64 {
    unix_ms(SystemTime::now())
}

/// `time` as milliseconds since the Unix epoch (0 before 1970).
pub fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis()
        .try_into()
        .unwrap_or(i64::MAX)
}
