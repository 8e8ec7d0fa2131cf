//! The wall clock, read as time since the Unix epoch: the one place drivers
//! read it. Pure cores take `now` as an argument instead (seconds or
//! milliseconds, as these give it), so their tests choose the time.
//!
//! A clock set before 1970-01-01 reads as the epoch itself: `0` from the
//! integer readings, `None` from [`since_epoch`]. Nothing here panics.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time since the Unix epoch, `None` when the clock is before it.
pub fn since_epoch() -> Option<Duration> {
    SystemTime::now().duration_since(UNIX_EPOCH).ok()
}

/// Whole seconds since the Unix epoch (0 before it).
pub fn unix_secs() -> u64 {
    since_epoch().map_or(0, |d| d.as_secs())
}

/// Whole milliseconds since the Unix epoch (0 before it; truncated to 64
/// bits, which matters only past the year 584 million).
pub fn unix_ms() -> u64 {
    since_epoch().map_or(0, |d| d.as_millis() as u64)
}

/// Nanoseconds since the Unix epoch (0 before it): what tests put in the
/// names of scratch directories.
pub fn unix_nanos() -> u128 {
    since_epoch().map_or(0, |d| d.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readings_agree() {
        let d = since_epoch().unwrap_or_default();
        let (s, ms, ns) = (unix_secs(), unix_ms(), unix_nanos());
        // Read after `d`, each in its own unit, never behind it.
        assert!(s >= d.as_secs());
        assert!(u128::from(ms) >= d.as_millis());
        assert!(ns >= d.as_nanos());
        // And one after the other: ms then ns were read after s.
        assert!(ms / 1000 >= s);
        assert!(ns / 1_000_000 >= u128::from(ms));
        // A clock that works is past 2020 (1_577_836_800).
        assert!(s > 1_577_836_800);
    }
}
