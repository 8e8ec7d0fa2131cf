//! Handshakes that carry a cookie [pure]: a bucket per source, as kernel
//! WireGuard's `wg_ratelimiter_allow` and wireguard-go's
//! `rate.limiter.Allow` keep, and one for the whole device.
//!
//! Past its handshake limit the device answers handshakes with a cookie
//! reply and lets through only those whose mac2 proves a cookie for their
//! source address. Such a cookie costs one round trip, and from then on the
//! host holding it could have a Diffie-Hellman done per datagram. So a
//! handshake that carries a cookie (a non-zero mac2) takes a token from its
//! source's bucket first: 20 a second, 5 at once, the kernel's numbers.
//!
//! One source's bucket bounds one host; a host with many addresses (an IPv6
//! /48 holds 65,536 /64s) fetches a cookie for each and gets each one's
//! share. Every handshake that passes costs the receive task, which also
//! decrypts every peer's data, about five X25519 operations, so a handshake
//! that has its source's token then takes one from the device's bucket too
//! ([`DEVICE_PER_SECOND`], [`DEVICE_BURST`]): the handshakes the device does
//! under load stay a bounded share of a core, and the data of established
//! sessions keeps flowing whatever the number of sources.
//!
//! A node sends a non-zero mac2 only for the two minutes after it was given a
//! cookie, and the device gives cookies only under load; every handshake that
//! passes under load carries one. So the limit applies where the kernel's
//! does (a valid cookie under load), and a little beyond it (a node still
//! holding a cookie after the load ended), where 20 a second is far above a
//! node's one initiation per 5 seconds.
//!
//! Sources are keyed as the kernel keys them: an IPv4 address, an IPv6 /64.
//! A tunnel carried over TLS or WebSocket reaches the device from its
//! relay's loopback socket; the device passes the carried connection's
//! client address instead (with the relay's port), so all of one client's
//! carried connections share its bucket, as its UDP datagrams would. A
//! loopback source left (a relay the device was not told of, a client on
//! the host itself) is keyed by its port: one loopback socket cannot use up
//! another's bucket.
//!
//! The table is bounded ([`MAX_SOURCES`], the kernel's largest table) as
//! [`Limiter`] bounds it: refilled buckets go first, then the longest idle.

use crate::proxy::ratelimit::{key, Limiter, RateLimit};
use std::net::{IpAddr, SocketAddr};

/// Handshakes a second per source.
pub const PER_SECOND: u32 = 20;
/// Handshakes a source may send at once.
pub const BURST: u32 = 5;
/// Sources tracked at most.
pub const MAX_SOURCES: usize = 65_536;
/// Handshakes carrying a cookie a second that the whole device lets
/// through, from all sources together. An initiation costs the receive
/// task four X25519 Diffie-Hellmans and a key generation (0.07 to 0.1 ms
/// measured on a server core), so this is about a tenth of a core. 10,000
/// nodes coming back at once (a hub restarted), each sending an initiation
/// every 4 to 6 s, all with a cookie, get through within about 10 s of
/// holding one.
pub const DEVICE_PER_SECOND: u32 = 1000;
/// Handshakes carrying a cookie the whole device lets through at once: a
/// quarter of a second's worth, some 25 ms of work in one go at most.
pub const DEVICE_BURST: u32 = 250;

/// Length of mac2, the last field of an initiation and of a response.
const MAC2_LEN: usize = 16;

/// Why a handshake was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its source has no token left.
    Source,
    /// Its source had one, the device has none left.
    Device,
}

/// One token bucket per source, and one for the device.
#[derive(Debug)]
pub struct HandshakeLimiter {
    buckets: Limiter,
    device: Limiter,
}

impl Default for HandshakeLimiter {
    fn default() -> Self {
        HandshakeLimiter::with_capacity(MAX_SOURCES)
    }
}

impl HandshakeLimiter {
    /// A limiter tracking at most `sources` sources (at least one).
    pub fn with_capacity(sources: usize) -> Self {
        HandshakeLimiter::with_limits(
            sources,
            RateLimit {
                per_second: DEVICE_PER_SECOND,
                burst: DEVICE_BURST,
            },
        )
    }

    /// A limiter tracking at most `sources` sources, the device's bucket
    /// filled as `device` says.
    pub fn with_limits(sources: usize, device: RateLimit) -> Self {
        HandshakeLimiter {
            buckets: Limiter::with_capacity(
                RateLimit {
                    per_second: PER_SECOND,
                    burst: BURST,
                },
                sources,
            ),
            device: Limiter::with_capacity(device, 1),
        }
    }

    /// Takes a token for a handshake from `from` at `now_ms` from its
    /// source's bucket, then from the device's: refused when either has
    /// none left. (The source's first: one source past its share takes
    /// nothing from the others'.)
    pub fn check(&mut self, from: SocketAddr, now_ms: u64) -> Result<(), Refused> {
        if self.buckets.check_key(source(from), now_ms).is_err() {
            return Err(Refused::Source);
        }
        // One key: the device's only bucket.
        self.device
            .check_key(0, now_ms)
            .map_err(|_| Refused::Device)
    }

    /// [`HandshakeLimiter::check`]: whether the handshake may go on.
    pub fn allow(&mut self, from: SocketAddr, now_ms: u64) -> bool {
        self.check(from, now_ms).is_ok()
    }

    /// Sources tracked now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True if no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// The bucket `from` takes from: its IPv4 address or IPv6 /64 ([`key`]), or
/// for loopback, its port (bit 126 set, kept apart from both).
pub fn source(from: SocketAddr) -> u128 {
    let ip = from.ip().to_canonical();
    if ip.is_loopback() {
        let family = u128::from(matches!(ip, IpAddr::V6(_))) << 16;
        (1u128 << 126) | family | u128::from(from.port())
    } else {
        key(ip)
    }
}

/// Whether a handshake message claims a cookie: its mac2 is not all zeros
/// (a sender without a cookie leaves it zero).
pub fn carries_cookie(datagram: &[u8]) -> bool {
    datagram
        .len()
        .checked_sub(MAC2_LEN)
        .and_then(|at| datagram.get(at..))
        .is_some_and(|m| m.iter().any(|b| *b != 0))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_burst_of_five_then_twenty_a_second() {
        let mut l = HandshakeLimiter::default();
        let a = at("192.0.2.1:51820");
        for _ in 0..5 {
            assert!(l.allow(a, 1000));
        }
        assert!(!l.allow(a, 1000), "a sixth at once");
        // One token every 50 ms.
        assert!(!l.allow(a, 1049));
        assert!(l.allow(a, 1050));
        assert!(!l.allow(a, 1050));
        // Over a second idle: the burst again, no more.
        let n = (0..10).filter(|_| l.allow(a, 5000)).count();
        assert_eq!(n, 5);
    }

    #[test]
    fn sources_are_apart_and_ports_do_not_matter_off_loopback() {
        let mut l = HandshakeLimiter::default();
        for _ in 0..5 {
            assert!(l.allow(at("192.0.2.1:1000"), 0));
        }
        // Another port of the same host: the same bucket.
        assert!(!l.allow(at("192.0.2.1:2000"), 0));
        // As a dual-stack socket reports the same host.
        assert!(!l.allow(at("[::ffff:192.0.2.1]:3000"), 0));
        assert!(l.allow(at("192.0.2.2:1000"), 0));
        // IPv6 by /64.
        for _ in 0..5 {
            assert!(l.allow(at("[2001:db8:1:2::1]:1000"), 0));
        }
        assert!(!l.allow(at("[2001:db8:1:2:ffff::9]:1000"), 0));
        assert!(l.allow(at("[2001:db8:1:3::1]:1000"), 0));
    }

    #[test]
    fn carried_tunnels_on_loopback_are_apart_by_port() {
        let mut l = HandshakeLimiter::default();
        for _ in 0..5 {
            assert!(l.allow(at("127.0.0.1:40000"), 0));
        }
        assert!(!l.allow(at("127.0.0.1:40000"), 0));
        assert!(l.allow(at("127.0.0.1:40001"), 0));
        assert!(l.allow(at("[::1]:40000"), 0));
        assert!(l.allow(at("[::ffff:127.0.0.1]:40002"), 0));
        // Apart from every IPv4 and IPv6 key.
        let k = source(at("127.0.0.1:40000"));
        assert_ne!(k, source(at("[::1]:40000")));
        assert!(k > u128::from(u32::MAX) && k < 1u128 << 127);
    }

    /// Past the device's bucket, handshakes from fresh sources, each well
    /// within its own share, are refused; a second later the device lets
    /// its rate through again. A source past its own share takes nothing
    /// from the device's bucket.
    #[test]
    fn many_sources_share_the_devices_budget() {
        let mut l = HandshakeLimiter::default();
        let fresh = |i: u32| SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 1));
        // One source past its share first: refused as the source's.
        let a = at("192.0.2.1:51820");
        let firsts = (0..BURST + 100).map(|_| l.check(a, 0)).collect::<Vec<_>>();
        assert!(firsts[..BURST as usize].iter().all(Result::is_ok));
        assert!(firsts[BURST as usize..]
            .iter()
            .all(|r| *r == Err(Refused::Source)));
        let left = DEVICE_BURST - BURST;
        for i in 0..left {
            assert_eq!(l.check(fresh(i), 0), Ok(()), "source {i}");
        }
        // Fresh sources, each with its whole burst: the device has none.
        for i in left..left + 50 {
            assert_eq!(l.check(fresh(i), 0), Err(Refused::Device));
        }
        // A tenth of a second on: a tenth of the device's rate, no more.
        let n = (0..DEVICE_PER_SECOND)
            .filter(|i| l.allow(fresh(100_000 + i), 100))
            .count();
        assert_eq!(n, DEVICE_PER_SECOND as usize / 10);
        // Idle for long: the burst, no more.
        let n = (0..DEVICE_PER_SECOND)
            .filter(|i| l.allow(fresh(200_000 + i), 60_000))
            .count();
        assert_eq!(n, DEVICE_BURST as usize);
        // Another budget.
        let mut small = HandshakeLimiter::with_limits(
            MAX_SOURCES,
            RateLimit {
                per_second: 10,
                burst: 3,
            },
        );
        let n = (0..20).filter(|i| small.allow(fresh(*i), 0)).count();
        assert_eq!(n, 3);
        assert!(!small.allow(fresh(30), 99));
        assert!(small.allow(fresh(31), 100), "a token every 100 ms");
    }

    #[test]
    fn mac2_zero_is_no_cookie() {
        let mut m = vec![0u8; 148];
        m[0] = 1;
        assert!(!carries_cookie(&m));
        m[147] = 1;
        assert!(carries_cookie(&m));
        m[147] = 0;
        m[132] = 9;
        assert!(carries_cookie(&m));
        // mac1 is not mac2.
        m[132] = 0;
        m[131] = 9;
        assert!(!carries_cookie(&m));
        assert!(!carries_cookie(&[1, 2, 3]));
    }

    #[test]
    fn the_table_is_bounded() {
        let mut l = HandshakeLimiter::with_capacity(64);
        for i in 0..10_000u32 {
            let a = SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 1));
            l.allow(a, u64::from(i));
            assert!(l.len() <= 64);
        }
    }

    proptest! {
        /// Whatever the timing, one source gets at most the burst plus 20 a
        /// second, and a source it shares nothing with is untouched.
        #[test]
        fn one_source_never_more_than_burst_plus_rate(
            gaps in proptest::collection::vec(0u64..40, 1..500),
            port in 1u16..,
            loopback in any::<bool>(),
        ) {
            let mut l = HandshakeLimiter::default();
            let ip: IpAddr = if loopback { [127, 0, 0, 1].into() } else { [198, 51, 100, 7].into() };
            let a = SocketAddr::new(ip, port);
            let (mut now, mut allowed) = (0u64, 0u64);
            for g in &gaps {
                now += g;
                if l.allow(a, now) {
                    allowed += 1;
                }
            }
            prop_assert!(allowed <= u64::from(BURST) + now * u64::from(PER_SECOND) / 1000);
            // A flood of one source leaves another its whole burst.
            let other = SocketAddr::new(ip, port.wrapping_add(1).max(1));
            let b = if loopback { other } else { at("198.51.100.8:1") };
            let n = (0..BURST).filter(|_| l.allow(b, now)).count();
            prop_assert_eq!(n, BURST as usize);
        }
    }
}
