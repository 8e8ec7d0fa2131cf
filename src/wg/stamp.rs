//! Handshake timestamps and the wall clock: when a peer gets a new `Tunn`
//! because the timestamps of its initiations lag the clock, and how often a
//! refused (stale) initiation is logged.
//!
//! Every handshake initiation carries a TAI64N timestamp, and a responder
//! refuses one that is not later than the last it accepted from the same key
//! (WireGuard's replay protection). boringtun's `Tunn` reads the wall clock
//! once, when it is made; each of its timestamps is that reading plus the
//! monotonic time since. A machine that starts with its clock behind (no
//! real-time clock, NTP not synchronised yet) makes `Tunn`s whose timestamps
//! are older than those its peers last accepted from it before it restarted:
//! every initiation is refused. When NTP then sets the clock forward, the
//! `Tunn`s keep the old reading, for as long as the clock was behind. A new
//! `Tunn` reads the clock again.
//!
//! Pure: the driver (`wg::device`) reads the clocks and passes them in, in
//! milliseconds.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

/// Lag past which a `Tunn`'s timestamps are renewed. The wall clock and the
/// monotonic clock part only when the wall clock is stepped (NTP setting it,
/// an administrator), or across a suspend (the monotonic clock stops); NTP's
/// slewing moves both alike. 2 s leaves out leap seconds and the small steps
/// chrony's `makestep` and the like make on a clock that was nearly right.
pub const LAG_MS: u64 = 2_000;

/// Initiations sent without an answer before a `Tunn` may be renewed. One may
/// still be on its way (answered within a round trip), and renewing forgets
/// the handshake it started: an answer arriving afterwards would be refused.
/// When the second goes out, the first has waited for a whole retry interval
/// (5 s: boringtun's REKEY_TIMEOUT, the node supervisor's retry), far longer
/// than any round trip.
pub const UNANSWERED: u32 = 2;

/// Least time between two warnings about stale initiations from one peer
/// (a node retries every 5 s).
pub const WARN_EVERY_MS: u64 = 60_000;

/// The clocks as read when a `Tunn` was made: the wall clock (milliseconds
/// since the Unix epoch) and a monotonic clock (milliseconds since any fixed
/// origin).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Base {
    pub wall_ms: u64,
    pub mono_ms: u64,
}

/// How many milliseconds the timestamps of a `Tunn` made at `base` lag the
/// wall clock now (its reading then plus the monotonic time since, against
/// `wall_ms`); 0 when they are level with it or ahead (the clock was set
/// back).
pub fn lag_ms(base: Base, wall_ms: u64, mono_ms: u64) -> u64 {
    let stamp = base
        .wall_ms
        .saturating_add(mono_ms.saturating_sub(base.mono_ms));
    wall_ms.saturating_sub(stamp)
}

/// Whether a peer's `Tunn` should be replaced by a new one, same keys, so
/// that its next initiation carries the wall clock's time: only when it has
/// no session (nothing is lost), its initiations go unanswered, and its
/// timestamps lag the clock by more than [`LAG_MS`] (a new `Tunn` would
/// stamp later ones). Never when they are ahead: a new `Tunn` would stamp
/// earlier ones, which a responder that accepted any of the old ones
/// refuses.
pub fn renew(live_session: bool, unanswered: u32, lag_ms: u64) -> bool {
    !live_session && unanswered >= UNANSWERED && lag_ms > LAG_MS
}

/// Whether a datagram is a handshake initiation (message type 1, 148 bytes).
pub fn is_initiation(datagram: &[u8]) -> bool {
    datagram.len() == 148 && datagram.get(..4) == Some(&[1, 0, 0, 0])
}

/// Whether a stale initiation from a peer is logged now, the last one having
/// been logged at `last_ms` (`None`: never), all in one monotonic clock.
pub fn warn_due(last_ms: Option<u64>, now_ms: u64) -> bool {
    last_ms.is_none_or(|l| now_ms.saturating_sub(l) >= WARN_EVERY_MS)
}

/// Whether the caller logs now ([`warn_due`]), `cell` holding the time of
/// the last warning plus one (0: never); a `true` stores `now_ms` there.
/// Of callers racing (both receive loops, IPv4 and IPv6), one gets `true`.
pub fn claim_warning(cell: &std::sync::atomic::AtomicU64, now_ms: u64) -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    let stored = cell.load(Relaxed);
    warn_due(stored.checked_sub(1), now_ms)
        && cell
            .compare_exchange(stored, now_ms.saturating_add(1), Relaxed, Relaxed)
            .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_796_000_000_000;

    #[test]
    fn a_tunn_made_with_the_right_time_keeps_it() {
        let b = Base {
            wall_ms: T0,
            mono_ms: 5_000,
        };
        assert_eq!(lag_ms(b, T0, 5_000), 0);
        // An hour later, both clocks moved alike.
        assert_eq!(lag_ms(b, T0 + 3_600_000, 3_605_000), 0);
        // A few milliseconds apart (the readings are not simultaneous).
        assert_eq!(lag_ms(b, T0 + 1_003, 6_000), 3);
    }

    #[test]
    fn a_clock_set_forward_after_the_tunn_was_made_is_a_lag() {
        // Made 10 min behind; 30 s later NTP sets the clock right.
        let b = Base {
            wall_ms: T0 - 600_000,
            mono_ms: 1_000,
        };
        assert_eq!(lag_ms(b, T0 + 30_000, 31_000), 600_000);
        // Before NTP: no lag, the Tunn stamps what the clock says.
        assert_eq!(lag_ms(b, T0 - 570_000, 31_000), 0);
    }

    #[test]
    fn a_clock_set_back_is_no_lag() {
        let b = Base {
            wall_ms: T0,
            mono_ms: 0,
        };
        assert_eq!(lag_ms(b, T0 - 600_000, 10_000), 0);
        // A wall clock before the epoch reads 0.
        assert_eq!(lag_ms(b, 0, 10_000), 0);
        // A monotonic reading before the base's (not expected) counts as none.
        assert_eq!(lag_ms(b, T0, 0), 0);
        assert_eq!(
            lag_ms(
                Base {
                    wall_ms: u64::MAX,
                    mono_ms: 0
                },
                T0,
                u64::MAX
            ),
            0
        );
    }

    #[test]
    fn renewed_only_without_a_session_after_unanswered_initiations_with_a_lag() {
        let lag = 600_000;
        assert!(renew(false, 2, lag));
        assert!(renew(false, 40, lag));
        // A session works: whatever else, it stays.
        assert!(!renew(true, 40, lag));
        // One initiation may still be answered; none sent: the peer is idle
        // (a responder keeps what it knows of its peer's timestamps).
        assert!(!renew(false, 1, lag));
        assert!(!renew(false, 0, lag));
        // The timestamps are right: the peer is down, or refuses them for
        // another reason, and a new Tunn would stamp the same.
        assert!(!renew(false, 40, 0));
        assert!(!renew(false, 40, LAG_MS));
        assert!(renew(false, 40, LAG_MS + 1));
    }

    #[test]
    fn the_scenario_renews_once() {
        // A node made its Tunn 10 min behind and has sent an initiation
        // every 5 s since; each was refused.
        let b = Base {
            wall_ms: T0 - 600_000,
            mono_ms: 0,
        };
        let mut unanswered = 0;
        let mut renewed_at = None;
        let mut base = b;
        for s in 0..120u64 {
            let mono = s * 1_000;
            // NTP steps the clock at 42 s.
            let wall = if s < 42 {
                T0 - 600_000 + mono
            } else {
                T0 + mono
            };
            if s % 5 == 0 {
                unanswered += 1;
            }
            if renew(false, unanswered, lag_ms(base, wall, mono)) {
                assert!(renewed_at.is_none(), "renewed twice");
                renewed_at = Some(s);
                base = Base {
                    wall_ms: wall,
                    mono_ms: mono,
                };
                unanswered = 0;
            }
        }
        assert_eq!(renewed_at, Some(42));
    }

    #[test]
    fn initiations_are_told_from_other_messages() {
        let mut m = [0u8; 148];
        m[0] = 1;
        assert!(is_initiation(&m));
        for t in [2u8, 3, 4] {
            m[0] = t;
            assert!(!is_initiation(&m));
        }
        m[0] = 1;
        m[1] = 1;
        assert!(!is_initiation(&m));
        let mut short = [0u8; 92];
        short[0] = 1;
        assert!(!is_initiation(&short));
        assert!(!is_initiation(&[]));
    }

    #[test]
    fn stale_initiations_are_logged_once_a_minute() {
        assert!(warn_due(None, 0));
        assert!(!warn_due(Some(1_000), 1_000));
        assert!(!warn_due(Some(1_000), WARN_EVERY_MS));
        assert!(warn_due(Some(1_000), 1_000 + WARN_EVERY_MS));
        // A clock that went back (not expected) does not log every time.
        assert!(!warn_due(Some(5_000), 1_000));
        let cell = std::sync::atomic::AtomicU64::new(0);
        assert!(claim_warning(&cell, 1_000));
        assert!(!claim_warning(&cell, 1_000 + WARN_EVERY_MS - 1));
        assert!(claim_warning(&cell, 1_000 + WARN_EVERY_MS));
    }
}
