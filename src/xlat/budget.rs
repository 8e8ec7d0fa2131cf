//! Rate limit for the ICMP errors the translator generates itself (Time
//! Exceeded, Packet Too Big / Fragmentation Needed, unreachables): at most
//! `per_second` in each second, so that a flood of expiring or oversized
//! packets cannot turn the hub into an ICMP source at line rate (RFC 4443
//! section 2.4 (f); RFC 7915 leaves errors to the operator's policy). Pure:
//! the caller passes the time in seconds.

/// How many generated errors may go out in the current second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorBudget {
    per_second: u32,
    second: u64,
    used: u32,
}

/// The default: enough for traceroute and path MTU discovery of many flows.
pub const DEFAULT_PER_SECOND: u32 = 100;

impl ErrorBudget {
    /// At most `per_second` errors in each second; 0 sends none.
    pub fn new(per_second: u32) -> Self {
        ErrorBudget {
            per_second,
            second: 0,
            used: 0,
        }
    }

    pub fn per_second(&self) -> u32 {
        self.per_second
    }

    /// Whether one more error may be sent at `now` (seconds). A clock that
    /// goes backwards keeps the current second's count.
    pub fn allow(&mut self, now: u64) -> bool {
        if now > self.second {
            self.second = now;
            self.used = 0;
        }
        if self.used < self.per_second {
            self.used += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn per_second_then_refills() {
        let mut b = ErrorBudget::new(3);
        assert_eq!((0..5).filter(|_| b.allow(10)).count(), 3);
        assert!(b.allow(11), "a new second refills");
        // Backwards time: still the same (spent) second.
        assert!(b.allow(11) && b.allow(11) && !b.allow(11));
        assert!(!b.allow(5));
        let mut off = ErrorBudget::new(0);
        assert!(!off.allow(1) && !off.allow(2));
    }

    proptest! {
        /// Whatever the (non-decreasing) times, no second ever sees more than
        /// `per_second` errors, and a second's first calls up to the limit pass.
        #[test]
        fn never_over_the_limit(rate in 0u32..20, steps in prop::collection::vec(0u64..3, 1..200)) {
            let mut b = ErrorBudget::new(rate);
            let mut now = 0u64;
            let mut in_second = 0u32;
            for s in steps {
                if s > 0 {
                    now += s;
                    in_second = 0;
                }
                let ok = b.allow(now);
                prop_assert_eq!(ok, in_second < rate);
                if ok {
                    in_second += 1;
                }
            }
        }
    }
}
