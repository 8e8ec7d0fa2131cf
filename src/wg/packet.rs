//! Minimal IP header views for the tunnel data path: addresses and hop limits.
//!
//! Pure: checked reads over the caller's buffer, no allocation.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The source and destination of an IP packet, or `None` when the buffer is not
/// a plausible IPv4 or IPv6 header.
pub fn addrs(pkt: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match pkt.first()? >> 4 {
        4 => {
            let src: [u8; 4] = pkt.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = pkt.get(16..20)?.try_into().ok()?;
            Some((
                IpAddr::V4(Ipv4Addr::from(src)),
                IpAddr::V4(Ipv4Addr::from(dst)),
            ))
        }
        6 => {
            let src: [u8; 16] = pkt.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = pkt.get(24..40)?.try_into().ok()?;
            Some((
                IpAddr::V6(Ipv6Addr::from(src)),
                IpAddr::V6(Ipv6Addr::from(dst)),
            ))
        }
        _ => None,
    }
}

/// The destination address of an IP packet.
pub fn dst(pkt: &[u8]) -> Option<IpAddr> {
    addrs(pkt).map(|(_, d)| d)
}

/// Outcome of [`decrement_hop_limit`].
#[derive(Debug, PartialEq, Eq)]
pub enum Hop {
    /// The TTL or hop limit was decremented (and the IPv4 checksum adjusted).
    Forward,
    /// It would reach zero: the packet must not be forwarded.
    Expired,
    /// Not an IP packet.
    Malformed,
}

/// Decrements the IPv4 TTL (updating the header checksum incrementally, RFC 1624)
/// or the IPv6 hop limit, as a router does before forwarding.
pub fn decrement_hop_limit(pkt: &mut [u8]) -> Hop {
    match pkt.first().map(|b| b >> 4) {
        Some(4) if pkt.len() >= 20 => {
            let Some(ttl) = pkt.get_mut(8) else {
                return Hop::Malformed;
            };
            if *ttl <= 1 {
                return Hop::Expired;
            }
            *ttl -= 1;
            // The 16-bit word holding TTL went down by 0x0100, so the one's
            // complement sum goes down too: HC' = ~(~HC + ~m + m') = HC + 0x0100.
            let Some(c) = pkt.get_mut(10..12) else {
                return Hop::Malformed;
            };
            let Ok(old) = <[u8; 2]>::try_from(&*c) else {
                return Hop::Malformed;
            };
            let sum = u32::from(u16::from_be_bytes(old)) + 0x0100;
            let sum = (sum & 0xffff) + (sum >> 16);
            c.copy_from_slice(&(sum as u16).to_be_bytes());
            Hop::Forward
        }
        Some(6) if pkt.len() >= 40 => {
            let Some(hl) = pkt.get_mut(7) else {
                return Hop::Malformed;
            };
            if *hl <= 1 {
                return Hop::Expired;
            }
            *hl -= 1;
            Hop::Forward
        }
        _ => Hop::Malformed,
    }
}

/// The IPv4 header checksum over `hdr` (with the checksum field as it is).
pub fn ipv4_header_checksum(hdr: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in hdr.chunks(2) {
        let w = match c {
            [a, b] => u16::from_be_bytes([*a, *b]),
            [a] => u16::from_be_bytes([*a, 0]),
            _ => 0,
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v4(ttl: u8, rest: &[u8]) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 20, 0, 0, 0x40, 0, ttl, 17, 0, 0, 100, 64, 0, 2, 100, 64, 0, 3,
        ];
        p[12..16].copy_from_slice(&rest[..4]);
        let c = ipv4_header_checksum(&p);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn addresses() {
        let p = v4(64, &[100, 64, 0, 2]);
        let (s, d) = addrs(&p).unwrap();
        assert_eq!(s, "100.64.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(d, "100.64.0.3".parse::<IpAddr>().unwrap());
        assert_eq!(addrs(&p[..19]), None);
        assert_eq!(addrs(&[0x60; 39]), None);
        assert_eq!(addrs(&[]), None);
    }

    #[test]
    fn ttl_one_expires() {
        let mut p = v4(1, &[1, 2, 3, 4]);
        assert_eq!(decrement_hop_limit(&mut p), Hop::Expired);
        let mut p6 = vec![0x60; 40];
        p6[7] = 1;
        assert_eq!(decrement_hop_limit(&mut p6), Hop::Expired);
        p6[7] = 9;
        assert_eq!(decrement_hop_limit(&mut p6), Hop::Forward);
        assert_eq!(p6[7], 8);
    }

    proptest! {
        #[test]
        fn incremental_checksum_equals_full(ttl in 2u8..=255, src in any::<[u8; 4]>()) {
            let mut p = v4(ttl, &src);
            prop_assert_eq!(decrement_hop_limit(&mut p), Hop::Forward);
            prop_assert_eq!(p[8], ttl - 1);
            // A header with a correct checksum sums to zero.
            prop_assert_eq!(ipv4_header_checksum(&p), 0);
        }

        #[test]
        fn never_panics(mut data in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = addrs(&data);
            let _ = decrement_hop_limit(&mut data);
        }
    }
}
