//! Wall-clock timestamps as they are recorded in durable facts: milliseconds
//! since the Unix epoch.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch now (0 if the clock is set before 1970).
pub fn now_unix_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// `time` as milliseconds since the Unix epoch (0 before 1970).
pub fn unix_ms(time: SystemTime) -> u64 {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

/// The time `ms` milliseconds after the Unix epoch.
pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}
