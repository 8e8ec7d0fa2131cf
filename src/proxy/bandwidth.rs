//! Bandwidth limits of a route or forward (`bandwidth`): one pacer per
//! direction, shared by all the route's connections, refilled at the
//! configured rate.
//!
//! Streams (HTTP bodies, spliced TCP and TLS) go into debt: the bytes just
//! read are passed on, and the next read waits until the debt is paid back,
//! so a route's connections together move at most the rate on average,
//! whoever reads first. Datagrams (UDP forwards) are not delayed: one that
//! does not fit in what has refilled is dropped (and counted by the caller).
//!
//! Pure: the caller passes the time in nanoseconds on a monotonic clock.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::time::Duration;

/// The lowest limit accepted, in bytes per second (8 kbit/s).
pub const MIN_RATE: u64 = 1_000;
/// The highest limit accepted, in bytes per second (800 Gbit/s).
pub const MAX_RATE: u64 = 100_000_000_000;
/// The smallest burst: one full-sized body frame or TLS record passes at once.
pub const MIN_BURST: u64 = 16 * 1024;

const NANOS: u128 = 1_000_000_000;

/// Splits `s` into its number and its unit (trimmed); `example` is a
/// well-formed value for the error.
fn number_and_unit<'a>(s: &'a str, example: &str) -> Result<(f64, &'a str), String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}`: expected a number and a unit, such as \"{example}\""))?;
    Ok((value, unit.trim()))
}

/// Bytes in one of a byte unit (`B`, `kB`, `MB`, `GB`, `KiB`, `MiB`, `GiB`).
fn byte_unit(unit: &str) -> Option<f64> {
    Some(match unit {
        "B" => 1.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    })
}

/// Parses a rate: a number and a unit, bits (`kbit/s`, `Mbit/s`, `Gbit/s`,
/// `bit/s`) or bytes (`B/s`, `kB/s`, `MB/s`, `GB/s`, `KiB/s`, `MiB/s`,
/// `GiB/s`), with or without a space and the `/s`. Returns bytes per second.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let (value, unit) = number_and_unit(s, "20 Mbit/s")?;
    let unit = unit.strip_suffix("/s").unwrap_or(unit);
    let (per_unit, bits) = match unit {
        "bit" | "bps" => (1.0, true),
        "kbit" | "Kbit" | "kbps" => (1e3, true),
        "Mbit" | "mbit" | "Mbps" => (1e6, true),
        "Gbit" | "gbit" | "Gbps" => (1e9, true),
        "" => return Err(format!("`{s}`: a unit is needed, such as \"Mbit/s\" or \"MB/s\"")),
        u => match byte_unit(u) {
            Some(b) => (b, false),
            None => {
                return Err(format!(
                    "`{s}`: unknown unit `{u}` (bit/s, kbit/s, Mbit/s, Gbit/s, B/s, kB/s, MB/s, GB/s, KiB/s, MiB/s, GiB/s)"
                ))
            }
        },
    };
    let bytes = value * per_unit / if bits { 8.0 } else { 1.0 };
    if !bytes.is_finite() || bytes < MIN_RATE as f64 || bytes > MAX_RATE as f64 {
        return Err(format!(
            "`{s}`: expected 8 kbit/s (1 kB/s) to 800 Gbit/s (100 GB/s)"
        ));
    }
    Ok(bytes.round() as u64)
}

/// The largest size [`parse_size`] accepts: 1 TiB.
pub const MAX_SIZE: u64 = 1 << 40;

/// Parses a size (`max_body_size`): a number and a byte unit (`"10 MB"`,
/// `"512 KiB"`, `"1 GiB"`, `"0 B"`), at most [`MAX_SIZE`]. Returns bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (value, unit) = number_and_unit(s, "10 MB")?;
    let per_unit = match unit {
        "" => {
            return Err(format!(
                "`{s}`: a unit is needed, such as \"MB\" or \"MiB\""
            ))
        }
        u => byte_unit(u)
            .ok_or_else(|| format!("`{s}`: unknown unit `{u}` (B, kB, MB, GB, KiB, MiB, GiB)"))?,
    };
    let bytes = (value * per_unit).round();
    if !bytes.is_finite() || bytes > MAX_SIZE as f64 {
        return Err(format!("`{s}`: at most 1 TiB"));
    }
    Ok(bytes as u64)
}

/// A rate as people write it (`20 Mbit/s`), for messages and `show`.
pub fn format_rate(bytes_per_sec: u64) -> String {
    let bits = bytes_per_sec as f64 * 8.0;
    let (v, u) = if bits >= 1e9 {
        (bits / 1e9, "Gbit/s")
    } else if bits >= 1e6 {
        (bits / 1e6, "Mbit/s")
    } else {
        (bits / 1e3, "kbit/s")
    };
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s} {u}")
}

/// One direction's pacer: a token bucket counted in nano-bytes (no drift),
/// which streams may overdraw.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate: u64,
    /// Most nano-bytes held when idle.
    burst: i128,
    /// Nano-bytes available; negative: debt.
    level: i128,
    last_ns: u64,
}

impl Pacer {
    /// A full pacer for `rate` bytes per second; its burst is a tenth of a
    /// second's worth, at least [`MIN_BURST`].
    pub fn new(rate: u64, now_ns: u64) -> Pacer {
        let rate = rate.clamp(MIN_RATE, MAX_RATE);
        let burst = i128::from((rate / 10).max(MIN_BURST)) * NANOS as i128;
        Pacer {
            rate,
            burst,
            level: burst,
            last_ns: now_ns,
        }
    }

    /// The rate, in bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// A new rate from now on (a reload); what was taken stays taken.
    pub fn set_rate(&mut self, rate: u64, now_ns: u64) {
        self.refill(now_ns);
        let rate = rate.clamp(MIN_RATE, MAX_RATE);
        self.rate = rate;
        self.burst = i128::from((rate / 10).max(MIN_BURST)) * NANOS as i128;
        self.level = self.level.min(self.burst);
    }

    fn refill(&mut self, now_ns: u64) {
        let dt = now_ns.saturating_sub(self.last_ns);
        self.last_ns = self.last_ns.max(now_ns);
        let add = i128::from(dt) * i128::from(self.rate);
        self.level = self.level.saturating_add(add).min(self.burst);
    }

    /// A stream passed `n` bytes: takes them (into debt if need be) and
    /// returns how long the stream must wait before it passes more.
    pub fn take(&mut self, n: u64, now_ns: u64) -> Duration {
        self.refill(now_ns);
        self.level = self.level.saturating_sub(i128::from(n) * NANOS as i128);
        self.wait()
    }

    /// How long until the debt is paid (zero without debt).
    fn wait(&self) -> Duration {
        if self.level >= 0 {
            return Duration::ZERO;
        }
        let ns = self.level.unsigned_abs().div_ceil(u128::from(self.rate));
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// A datagram of `n` bytes: `true` (and taken) if it fits in what has
    /// refilled, or the bucket is full (so a datagram larger than the burst
    /// still passes now and then, into debt); `false` (nothing taken) if it
    /// must be dropped.
    pub fn admit(&mut self, n: u64, now_ns: u64) -> bool {
        self.refill(now_ns);
        let need = i128::from(n) * NANOS as i128;
        if self.level < need && self.level < self.burst {
            return false;
        }
        self.level = self.level.saturating_sub(need);
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn rates() {
        for (s, want) in [
            ("20 Mbit/s", 2_500_000),
            ("20Mbit/s", 2_500_000),
            ("20 Mbit", 2_500_000),
            ("1.5 Gbit/s", 187_500_000),
            ("8 kbit/s", 1_000),
            ("100 kB/s", 100_000),
            ("2 MiB/s", 2 * 1024 * 1024),
            ("1 GB/s", 1_000_000_000),
            (" 3 MB/s ", 3_000_000),
        ] {
            assert_eq!(parse_rate(s), Ok(want), "{s}");
        }
        for (s, says) in [
            ("20", "a unit is needed"),
            ("Mbit/s", "expected a number"),
            ("20 Mb/s", "unknown unit `Mb`"),
            ("-1 Mbit/s", "expected a number"),
            ("1 bit/s", "8 kbit/s (1 kB/s) to 800 Gbit/s"),
            ("900 Gbit/s", "8 kbit/s (1 kB/s) to 800 Gbit/s"),
            ("1e400 B/s", "unknown unit"),
            ("", "expected a number"),
        ] {
            let e = parse_rate(s).unwrap_err();
            assert!(e.contains(says), "{s}: {e}");
        }
        assert_eq!(format_rate(2_500_000), "20 Mbit/s");
        assert_eq!(format_rate(187_500_000), "1.5 Gbit/s");
        assert_eq!(format_rate(1_000), "8 kbit/s");
    }

    #[test]
    fn a_stream_is_paced_to_the_rate() {
        // 1 MB/s; burst 100 kB.
        let mut p = Pacer::new(1_000_000, 0);
        assert_eq!(p.take(100_000, 0), Duration::ZERO);
        // 50 kB more: 50 ms of debt.
        assert_eq!(p.take(50_000, 0), Duration::from_millis(50));
        // Waited 50 ms: paid; the next 10 kB cost 10 ms.
        assert_eq!(p.take(10_000, 50_000_000), Duration::from_millis(10));
        // A stream that reads, then waits what it is told, moves the rate.
        let mut p = Pacer::new(1_000_000, 0);
        let mut now = 0;
        let mut moved = 0;
        while now < 10 * S {
            now += p.take(8192, now).as_nanos() as u64;
            moved += 8192;
        }
        // Ten seconds at 1 MB/s, plus the first burst.
        assert!((10_000_000..=10_110_000).contains(&moved), "{moved}");
    }

    #[test]
    fn idle_time_refills_up_to_the_burst_only() {
        let mut p = Pacer::new(1_000_000, 0);
        assert_eq!(p.take(100_000, 0), Duration::ZERO);
        // An hour idle: still one burst, not an hour's worth.
        let t = 3600 * S;
        assert_eq!(p.take(100_000, t), Duration::ZERO);
        assert_eq!(p.take(1_000, t), Duration::from_millis(1));
        // A clock that goes back takes nothing away and adds nothing.
        assert_eq!(p.take(1_000, t - S), Duration::from_millis(2));
    }

    #[test]
    fn datagrams_are_dropped_not_delayed() {
        let mut p = Pacer::new(10_000, 0); // burst: MIN_BURST
        let mut passed = 0;
        while p.admit(1_000, 0) {
            passed += 1;
        }
        assert_eq!(passed, MIN_BURST / 1_000);
        // 100 ms later: 1,000 bytes have refilled, one datagram passes.
        assert!(p.admit(1_000, S / 10));
        assert!(!p.admit(1_000, S / 10));
        // A dropped datagram took nothing.
        assert!(p.admit(384, S / 10));
        // One larger than the burst passes when the bucket is full, into
        // debt, and the next waits for the debt to be paid.
        let mut p = Pacer::new(10_000, 0);
        assert!(p.admit(30_000, 0));
        assert!(!p.admit(100, S));
        assert!(p.admit(30_000, 5 * S));
    }

    #[test]
    fn a_new_rate_applies_from_now() {
        let mut p = Pacer::new(1_000_000, 0);
        assert_eq!(p.take(100_000, 0), Duration::ZERO);
        assert_eq!(p.take(10_000, 0), Duration::from_millis(10));
        p.set_rate(100_000, 0);
        assert_eq!(p.rate(), 100_000);
        // The debt is paid at the new rate: 10 kB more at 100 kB/s.
        assert_eq!(p.take(0, 0), Duration::from_millis(100));
    }

    proptest::proptest! {
        /// Whatever the reads and clock, what passes by time t is at most
        /// one burst plus t times the rate, plus the read that went into
        /// debt; waiting what `take` says is always enough to be out of
        /// debt.
        #[test]
        fn never_above_the_rate(
            rate in MIN_RATE..10_000_000u64,
            steps in proptest::collection::vec((0u64..100_000, 0u64..50_000_000), 1..200),
        ) {
            let mut p = Pacer::new(rate, 0);
            let burst = (rate / 10).max(MIN_BURST);
            let mut now = 0u64;
            let mut moved = 0u128;
            for (n, gap) in steps {
                now += gap;
                let w = p.take(n, now);
                moved += u128::from(n);
                let allowed = u128::from(burst) + u128::from(now) * u128::from(rate) / NANOS;
                proptest::prop_assert!(moved <= allowed + u128::from(n));
                now += w.as_nanos() as u64;
                proptest::prop_assert_eq!(p.take(0, now), Duration::ZERO);
            }
        }
    }
}
