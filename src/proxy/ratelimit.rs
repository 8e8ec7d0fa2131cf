//! Per-client rate limits of a route or forward (`rate_limit`, `rate_burst`):
//! a token bucket per client, refilled at `rate_limit` per second up to
//! `rate_burst`; a request (HTTP), connection (TCP, passthrough) or datagram
//! (UDP) takes one token, and a client with none left is refused until its
//! next token.
//!
//! Pure: the caller passes the time in milliseconds. Clients are keyed by
//! their IPv4 address, or by their IPv6 /64 (a client with a /64 of its own
//! would otherwise get a fresh bucket per address). The table is bounded:
//! buckets that have refilled completely carry no state worth keeping and are
//! swept first; if it is still full, the longest-idle bucket goes.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::net::IpAddr;

/// Buckets kept per route at most.
pub const MAX_CLIENTS: usize = 65_536;

/// A validated limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Tokens added per second.
    pub per_second: u32,
    /// Most tokens a client can hold (requests it may send at once).
    pub burst: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens, in thousandths (integer arithmetic, no drift).
    milli: u64,
    last_ms: u64,
    /// Refusals of this client so far, odd or even ([`Limiter::refusals_odd`]).
    odd: bool,
}

/// The buckets of one route or forward.
#[derive(Debug)]
pub struct Limiter {
    limit: RateLimit,
    max_clients: usize,
    buckets: HashMap<u128, Bucket>,
}

/// The bucket key: an IPv4 address (below 2^32), or an IPv6 /64 (the top
/// bit set). Keys with the top bit clear and above 2^32 are free for
/// callers of [`Limiter::check_key`].
pub fn key(ip: IpAddr) -> u128 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        // The top bit set keeps IPv6 keys apart from IPv4 ones.
        IpAddr::V6(v6) => (u128::from(v6) & !((1u128 << 64) - 1)) | (1u128 << 127) | 1,
    }
}

impl Limiter {
    /// A limiter holding at most [`MAX_CLIENTS`] buckets.
    pub fn new(limit: RateLimit) -> Limiter {
        Limiter::with_capacity(limit, MAX_CLIENTS)
    }

    /// A limiter holding at most `max_clients` buckets (at least one).
    pub fn with_capacity(limit: RateLimit, max_clients: usize) -> Limiter {
        Limiter {
            limit,
            max_clients: max_clients.max(1),
            buckets: HashMap::new(),
        }
    }

    /// The limit it enforces.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Clients tracked now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True if no client is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    fn full(&self) -> u64 {
        u64::from(self.limit.burst) * 1000
    }

    /// `b` refilled up to `now_ms` (time never goes back).
    fn refill(&self, b: Bucket, now_ms: u64) -> Bucket {
        let dt = now_ms.saturating_sub(b.last_ms);
        let add = dt.saturating_mul(u64::from(self.limit.per_second));
        Bucket {
            milli: b.milli.saturating_add(add).min(self.full()),
            last_ms: b.last_ms.max(now_ms),
            odd: b.odd,
        }
    }

    /// Takes a token for `ip` at `now_ms`: `Ok(())`, or `Err(ms)` with the
    /// time until its next token.
    pub fn check(&mut self, ip: IpAddr, now_ms: u64) -> Result<(), u64> {
        self.check_key(key(ip), now_ms)
    }

    /// As [`Limiter::check`], for a key of the caller's (see [`key`]).
    pub fn check_key(&mut self, k: u128, now_ms: u64) -> Result<(), u64> {
        let b = match self.buckets.get(&k) {
            Some(b) => self.refill(*b, now_ms),
            None => {
                self.make_room(now_ms);
                Bucket {
                    milli: self.full(),
                    last_ms: now_ms,
                    odd: false,
                }
            }
        };
        let (b, r) = if b.milli >= 1000 {
            (
                Bucket {
                    milli: b.milli - 1000,
                    ..b
                },
                Ok(()),
            )
        } else {
            let per = u64::from(self.limit.per_second).max(1);
            // Milliseconds until the bucket holds a whole token again.
            let b = Bucket { odd: !b.odd, ..b };
            (b, Err((1000 - b.milli).div_ceil(per)))
        };
        self.buckets.insert(k, b);
        r
    }

    /// Whether `ip` has no whole token at `now_ms` (its next
    /// [`Limiter::check`] would be refused), taking none and changing
    /// nothing. A client not tracked has a full bucket.
    pub fn is_limited(&self, ip: IpAddr, now_ms: u64) -> bool {
        self.buckets
            .get(&key(ip))
            .is_some_and(|b| self.refill(*b, now_ms).milli < 1000)
    }

    /// Whether the last refusal of `ip` was its first, third, fifth... (so a
    /// caller can treat every other refusal of one client alike, whatever
    /// other clients do). False for a client never refused or not tracked.
    pub fn refusals_odd(&self, ip: IpAddr) -> bool {
        self.buckets.get(&key(ip)).is_some_and(|b| b.odd)
    }

    /// Frees slots when the table is full: every bucket that has refilled
    /// completely, and when that frees less than a sixteenth of the table,
    /// the longest idle buckets up to a sixteenth. One pass over the table
    /// makes room for many new clients, so a flood of new (or forged)
    /// sources costs no full scan per packet.
    fn make_room(&mut self, now_ms: u64) {
        if self.buckets.len() < self.max_clients {
            return;
        }
        let full = self.full();
        let per = u64::from(self.limit.per_second);
        self.buckets.retain(|_, b| {
            let dt = now_ms.saturating_sub(b.last_ms);
            b.milli.saturating_add(dt.saturating_mul(per)) < full
        });
        let batch = (self.max_clients / 16).max(1);
        let want = self.max_clients.saturating_sub(batch);
        if self.buckets.len() > want {
            let mut idle: Vec<u64> = self.buckets.values().map(|b| b.last_ms).collect();
            let cut = self.buckets.len() - want;
            let (_, nth, _) = idle.select_nth_unstable(cut - 1);
            let cut_at = *nth;
            let mut left = cut;
            self.buckets.retain(|_, b| {
                if left > 0 && b.last_ms <= cut_at {
                    left -= 1;
                    false
                } else {
                    true
                }
            });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lim(per_second: u32, burst: u32) -> Limiter {
        Limiter::new(RateLimit { per_second, burst })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refusals_alternate_per_client() {
        let mut l = Limiter::new(RateLimit {
            per_second: 1,
            burst: 1,
        });
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        assert!(l.check(a, 0).is_ok());
        assert!(l.check(b, 0).is_ok());
        assert!(!l.refusals_odd(a));
        let mut seen = Vec::new();
        for _ in 0..4 {
            // b's refusals in between do not shift a's.
            assert!(l.check(b, 10).is_err());
            assert!(l.check(a, 10).is_err());
            seen.push(l.refusals_odd(a));
        }
        assert_eq!(seen, [true, false, true, false]);
        // A token taken keeps the parity where it was.
        assert!(l.check(a, 2000).is_ok());
        assert!(!l.refusals_odd(a));
        assert!(!l.refusals_odd("192.0.2.9".parse().unwrap()));
    }

    #[test]
    fn a_burst_then_the_rate() {
        let mut l = lim(10, 3);
        let a = ip("192.0.2.1");
        assert_eq!(l.check(a, 1000), Ok(()));
        assert_eq!(l.check(a, 1000), Ok(()));
        assert_eq!(l.check(a, 1000), Ok(()));
        // Empty: the next token comes after 100 ms.
        assert_eq!(l.check(a, 1000), Err(100));
        assert_eq!(l.check(a, 1040), Err(60));
        assert_eq!(l.check(a, 1100), Ok(()));
        assert_eq!(l.check(a, 1100), Err(100));
        // A long pause refills to the burst, no further.
        for _ in 0..3 {
            assert_eq!(l.check(a, 60_000), Ok(()));
        }
        assert!(l.check(a, 60_000).is_err());
    }

    #[test]
    fn clients_have_their_own_buckets() {
        let mut l = lim(1, 1);
        assert_eq!(l.check(ip("192.0.2.1"), 0), Ok(()));
        assert!(l.check(ip("192.0.2.1"), 0).is_err());
        assert_eq!(l.check(ip("192.0.2.2"), 0), Ok(()));
        // Mapped IPv4 is the same client.
        assert!(l.check(ip("::ffff:192.0.2.2"), 0).is_err());
        // One IPv6 /64 is one client; another /64 is another.
        assert_eq!(l.check(ip("2001:db8:0:1::1"), 0), Ok(()));
        assert!(l.check(ip("2001:db8:0:1::ffff"), 0).is_err());
        assert_eq!(l.check(ip("2001:db8:0:2::1"), 0), Ok(()));
        // An IPv6 address whose low bits look like an IPv4 one is not it.
        assert_eq!(l.check(ip("::c000:201"), 0), Ok(()));
    }

    #[test]
    fn a_look_at_a_bucket_takes_nothing() {
        let mut l = lim(1, 2);
        let a = ip("192.0.2.1");
        assert!(!l.is_limited(a, 0), "an unknown client has a full bucket");
        assert!(l.is_empty(), "and looking does not track it");
        l.check(a, 0).unwrap();
        for _ in 0..5 {
            assert!(!l.is_limited(a, 0));
        }
        l.check(a, 0).unwrap();
        assert!(l.is_limited(a, 0));
        assert!(l.is_limited(a, 999));
        assert!(!l.is_limited(a, 1000), "a token has come back");
        assert!(!l.refusals_odd(a), "looks are no refusals");
        l.check(a, 1000).unwrap();
        assert!(l.check(a, 1000).is_err());
        // A mapped IPv4 address is the same client; another is not.
        assert!(l.is_limited(ip("::ffff:192.0.2.1"), 1000));
        assert!(!l.is_limited(ip("192.0.2.2"), 1000));
    }

    #[test]
    fn slow_rates_wait_whole_seconds() {
        let mut l = lim(1, 1);
        let a = ip("198.51.100.1");
        assert_eq!(l.check(a, 5_000), Ok(()));
        assert_eq!(l.check(a, 5_000), Err(1000));
        assert_eq!(l.check(a, 5_999), Err(1));
        assert_eq!(l.check(a, 6_000), Ok(()));
    }

    #[test]
    fn the_table_is_bounded_and_idle_clients_go_first() {
        let mut l = Limiter::with_capacity(
            RateLimit {
                per_second: 1,
                burst: 2,
            },
            3,
        );
        // a is busy (empty bucket), b and c are half full.
        let (a, b, c, d) = (
            ip("192.0.2.1"),
            ip("192.0.2.2"),
            ip("192.0.2.3"),
            ip("192.0.2.4"),
        );
        l.check(a, 0).unwrap();
        l.check(a, 0).unwrap();
        l.check(b, 0).unwrap();
        l.check(c, 0).unwrap();
        assert_eq!(l.len(), 3);
        // At 1 s, b and c have refilled completely (they go), a has not.
        l.check(d, 1000).unwrap();
        assert_eq!(l.len(), 2);
        assert!(l.check(a, 1000).is_ok());
        assert!(l.check(a, 1000).is_err(), "a's state survived the sweep");
        // Nothing refilled: the longest idle goes.
        let mut l = Limiter::with_capacity(
            RateLimit {
                per_second: 1,
                burst: 1,
            },
            2,
        );
        l.check(a, 0).unwrap();
        l.check(b, 10).unwrap();
        l.check(c, 20).unwrap();
        assert_eq!(l.len(), 2);
        assert!(l.check(b, 20).is_err(), "b was kept");
        assert!(l.check(a, 20).is_ok(), "a was evicted (a fresh bucket)");
        // A full table of busy clients: one pass frees a sixteenth, the
        // longest idle, so the next new clients find room without one.
        let mut l = Limiter::with_capacity(
            RateLimit {
                per_second: 1,
                burst: 1,
            },
            32,
        );
        let nth = |i: u64| IpAddr::from([192, 0, 2, i as u8]);
        for i in 0..32 {
            l.check(nth(i), i).unwrap();
        }
        assert_eq!(l.len(), 32);
        l.check(nth(100), 40).unwrap();
        assert_eq!(l.len(), 31, "two went, one came");
        l.check(nth(101), 41).unwrap();
        assert_eq!(l.len(), 32);
        assert!(l.check(nth(2), 42).is_err(), "the third oldest was kept");
        assert!(l.check(nth(1), 42).is_ok(), "the second oldest went");
    }

    #[test]
    fn time_going_back_grants_nothing() {
        let mut l = lim(1000, 1);
        let a = ip("192.0.2.1");
        l.check(a, 10_000).unwrap();
        assert!(l.check(a, 5_000).is_err());
        assert!(l.check(a, 10_000).is_err());
        assert!(l.check(a, 10_001).is_ok());
    }

    proptest! {
        /// Over any window, a client gets at most burst + rate x window tokens.
        #[test]
        fn never_more_than_burst_plus_rate(
            per_second in 1u32..1000,
            burst in 1u32..50,
            gaps in proptest::collection::vec(0u64..50, 1..400),
        ) {
            let mut l = lim(per_second, burst);
            let a = ip("203.0.113.5");
            let mut now = 0u64;
            let mut granted = 0u64;
            for g in gaps {
                now += g;
                if l.check(a, now).is_ok() {
                    granted += 1;
                }
            }
            let bound = u64::from(burst) + now * u64::from(per_second) / 1000;
            prop_assert!(granted <= bound, "{granted} > {bound}");
        }

        /// A refused client that waits the time it was told gets a token.
        #[test]
        fn retry_after_is_enough(per_second in 1u32..5000, burst in 1u32..10) {
            let mut l = lim(per_second, burst);
            let a = ip("203.0.113.5");
            let mut now = 1000;
            while l.check(a, now).is_ok() {}
            let wait = l.check(a, now).unwrap_err();
            now += wait;
            prop_assert!(l.check(a, now).is_ok());
        }
    }
}
