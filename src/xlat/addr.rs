//! Address mapping: RFC 6052 (IPv4-embedded IPv6 addresses) and RFC 7757
//! (Explicit Address Mappings).
//!
//! EAM entries take precedence over the RFC 6052 prefix ("pool6") in both
//! directions; among EAM entries the longest matching prefix wins.
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Error building a [`Pool6`] or an [`Eam`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrError {
    /// RFC 6052 only allows /32, /40, /48, /56, /64 and /96.
    BadPool6Length(u8),
    /// Prefix length larger than the address.
    BadLength(u8),
    /// Host bits set beyond the prefix length.
    HostBitsSet,
    /// RFC 7757: the IPv6 suffix must be at least as long as the IPv4 suffix.
    SuffixTooShort,
    /// For /96 the "u" octet (bits 64-71) must be zero.
    NonZeroUOctet,
}

impl fmt::Display for AddrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddrError::BadPool6Length(l) => {
                write!(f, "RFC 6052 prefix length /{l} not in 32,40,48,56,64,96")
            }
            AddrError::BadLength(l) => write!(f, "prefix length /{l} too long"),
            AddrError::HostBitsSet => f.write_str("prefix has host bits set"),
            AddrError::SuffixTooShort => f.write_str("IPv6 suffix shorter than the IPv4 suffix"),
            AddrError::NonZeroUOctet => f.write_str("RFC 6052 prefix has a non-zero u octet"),
        }
    }
}

impl std::error::Error for AddrError {}

/// An RFC 6052 translation prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool6 {
    prefix: [u8; 16],
    len: u8,
    /// RFC 6052 §3.1 enforced: the Well-Known Prefix carries global IPv4
    /// addresses only (see [`Pool6::refuses`]).
    wkp_strict: bool,
}

/// The Well-Known Prefix `64:ff9b::/96` (RFC 6052 §2.1).
const WKP: [u8; 16] = [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

impl Pool6 {
    /// Validates and builds a prefix (`len` in 32, 40, 48, 56, 64, 96).
    pub fn new(prefix: Ipv6Addr, len: u8) -> Result<Self, AddrError> {
        if !matches!(len, 32 | 40 | 48 | 56 | 64 | 96) {
            return Err(AddrError::BadPool6Length(len));
        }
        let p = prefix.octets();
        if mask6(&p, len) != p {
            return Err(AddrError::HostBitsSet);
        }
        // RFC 6052 §2.2: bits 64..71 (the "u" octet) must be zero; only a /96
        // prefix covers them.
        if len == 96 && p[8] != 0 {
            return Err(AddrError::NonZeroUOctet);
        }
        Ok(Pool6 {
            prefix: p,
            len,
            wkp_strict: true,
        })
    }

    /// The same prefix with RFC 6052 §3.1 enforced (`true`, what
    /// [`Pool6::new`] gives) or not (labs numbered from documentation
    /// ranges behind the Well-Known Prefix).
    pub fn with_wkp_strict(self, on: bool) -> Self {
        Pool6 {
            wkp_strict: on,
            ..self
        }
    }

    /// True if this is the Well-Known Prefix `64:ff9b::/96`.
    pub fn is_wkp(&self) -> bool {
        self.len == 96 && self.prefix == WKP
    }

    /// RFC 6052 §3.1: the Well-Known Prefix must not represent non-global
    /// IPv4 addresses, and translators must drop packets whose address is
    /// made of it and one. True when this is the Well-Known Prefix (strict,
    /// the default) and `v4` is not global. Network-specific prefixes
    /// refuse nothing.
    pub fn refuses(&self, v4: [u8; 4]) -> bool {
        self.wkp_strict && self.is_wkp() && !is_global_v4(v4)
    }

    /// The prefix address.
    pub fn prefix(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.prefix)
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Embeds `v4` (RFC 6052 §2.2). The u octet and the suffix are zero.
    pub fn embed(&self, v4: [u8; 4]) -> [u8; 16] {
        let mut out = self.prefix;
        let [a, b, c, d] = v4;
        match self.len {
            32 => {
                out[4] = a;
                out[5] = b;
                out[6] = c;
                out[7] = d;
            }
            40 => {
                out[5] = a;
                out[6] = b;
                out[7] = c;
                out[9] = d;
            }
            48 => {
                out[6] = a;
                out[7] = b;
                out[9] = c;
                out[10] = d;
            }
            56 => {
                out[7] = a;
                out[9] = b;
                out[10] = c;
                out[11] = d;
            }
            64 => {
                out[9] = a;
                out[10] = b;
                out[11] = c;
                out[12] = d;
            }
            _ => {
                out[12] = a;
                out[13] = b;
                out[14] = c;
                out[15] = d;
            }
        }
        out
    }

    /// Extracts the IPv4 address if `v6` lies inside this prefix. The u octet
    /// and suffix are ignored (be liberal in what you accept).
    pub fn extract(&self, v6: &[u8; 16]) -> Option<[u8; 4]> {
        if mask6(v6, self.len) != self.prefix {
            return None;
        }
        let o = v6;
        Some(match self.len {
            32 => [o[4], o[5], o[6], o[7]],
            40 => [o[5], o[6], o[7], o[9]],
            48 => [o[6], o[7], o[9], o[10]],
            56 => [o[7], o[9], o[10], o[11]],
            64 => [o[9], o[10], o[11], o[12]],
            _ => [o[12], o[13], o[14], o[15]],
        })
    }
}

/// One RFC 7757 Explicit Address Mapping: an IPv4 prefix paired with an IPv6
/// prefix. The IPv4 suffix bits are copied bit by bit right after the IPv6
/// prefix; any further IPv6 suffix bits are zero (and ignored on the way back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eam {
    v4: [u8; 4],
    v4_len: u8,
    v6: [u8; 16],
    v6_len: u8,
}

impl Eam {
    /// Validates and builds an entry.
    pub fn new(v4: Ipv4Addr, v4_len: u8, v6: Ipv6Addr, v6_len: u8) -> Result<Self, AddrError> {
        if v4_len > 32 {
            return Err(AddrError::BadLength(v4_len));
        }
        if v6_len > 128 {
            return Err(AddrError::BadLength(v6_len));
        }
        let v4 = v4.octets();
        let v6 = v6.octets();
        if mask4(v4, v4_len) != v4 || mask6(&v6, v6_len) != v6 {
            return Err(AddrError::HostBitsSet);
        }
        if 128 - u32::from(v6_len) < 32 - u32::from(v4_len) {
            return Err(AddrError::SuffixTooShort);
        }
        Ok(Eam {
            v4,
            v4_len,
            v6,
            v6_len,
        })
    }

    /// IPv4 prefix and length.
    pub fn v4(&self) -> (Ipv4Addr, u8) {
        (Ipv4Addr::from(self.v4), self.v4_len)
    }

    /// IPv6 prefix and length.
    pub fn v6(&self) -> (Ipv6Addr, u8) {
        (Ipv6Addr::from(self.v6), self.v6_len)
    }

    /// True if `a` is inside the IPv4 prefix.
    pub fn contains_v4(&self, a: [u8; 4]) -> bool {
        mask4(a, self.v4_len) == self.v4
    }

    /// True if `a` is inside the IPv6 prefix.
    pub fn contains_v6(&self, a: &[u8; 16]) -> bool {
        mask6(a, self.v6_len) == self.v6
    }

    fn to_v6(self, a: [u8; 4]) -> [u8; 16] {
        let suffix_bits = 32 - u32::from(self.v4_len);
        let host = u32::from_be_bytes(a) & low_mask32(suffix_bits);
        let mut v = u128::from_be_bytes(self.v6);
        // Place the suffix right after the IPv6 prefix.
        let shift = 128 - u32::from(self.v6_len) - suffix_bits;
        v |= u128::from(host).checked_shl(shift).unwrap_or(0);
        v.to_be_bytes()
    }

    fn to_v4(self, a: &[u8; 16]) -> [u8; 4] {
        let suffix_bits = 32 - u32::from(self.v4_len);
        let shift = 128 - u32::from(self.v6_len) - suffix_bits;
        let host = u128::from_be_bytes(*a).checked_shr(shift).unwrap_or(0);
        let host = u32::try_from(host & u128::from(low_mask32(suffix_bits))).unwrap_or(0);
        (u32::from_be_bytes(self.v4) | host).to_be_bytes()
    }
}

fn low_mask32(bits: u32) -> u32 {
    if bits >= 32 {
        u32::MAX
    } else {
        (1u32 << bits) - 1
    }
}

fn mask4(a: [u8; 4], len: u8) -> [u8; 4] {
    let m = !low_mask32(32 - u32::from(len.min(32)));
    (u32::from_be_bytes(a) & m).to_be_bytes()
}

fn mask6(a: &[u8; 16], len: u8) -> [u8; 16] {
    let len = u32::from(len.min(128));
    let m = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    (u128::from_be_bytes(*a) & m).to_be_bytes()
}

/// Longest-prefix match of an IPv4 address in the table.
pub fn eam_lookup_v4(table: &[Eam], a: [u8; 4]) -> Option<&Eam> {
    table
        .iter()
        .filter(|e| e.contains_v4(a))
        .max_by_key(|e| e.v4_len)
}

/// Longest-prefix match of an IPv6 address in the table.
pub fn eam_lookup_v6<'a>(table: &'a [Eam], a: &[u8; 16]) -> Option<&'a Eam> {
    table
        .iter()
        .filter(|e| e.contains_v6(a))
        .max_by_key(|e| e.v6_len)
}

/// IPv4 → IPv6: EAM first (unless `pool6_only`), then pool6.
pub fn map_4to6(
    eamt: &[Eam],
    pool6: Option<&Pool6>,
    a: [u8; 4],
    pool6_only: bool,
) -> Option<[u8; 16]> {
    map_4to6_via(eamt, pool6, a, pool6_only).map(|(v6, _)| v6)
}

/// How an address was mapped between the families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// By an EAM entry.
    Eam,
    /// Through the RFC 6052 prefix.
    Pool6,
}

/// IPv4 → IPv6 like [`map_4to6`], also telling how.
pub fn map_4to6_via(
    eamt: &[Eam],
    pool6: Option<&Pool6>,
    a: [u8; 4],
    pool6_only: bool,
) -> Option<([u8; 16], Via)> {
    if !pool6_only {
        if let Some(e) = eam_lookup_v4(eamt, a) {
            return Some((e.to_v6(a), Via::Eam));
        }
    }
    pool6.map(|p| (p.embed(a), Via::Pool6))
}

/// IPv6 → IPv4: EAM first, then pool6.
pub fn map_6to4(eamt: &[Eam], pool6: Option<&Pool6>, a: &[u8; 16]) -> Option<[u8; 4]> {
    map_6to4_via(eamt, pool6, a).map(|(v4, _)| v4)
}

/// IPv6 → IPv4 like [`map_6to4`], also telling how.
pub fn map_6to4_via(eamt: &[Eam], pool6: Option<&Pool6>, a: &[u8; 16]) -> Option<([u8; 4], Via)> {
    if let Some(e) = eam_lookup_v6(eamt, a) {
        return Some((e.to_v4(a), Via::Eam));
    }
    pool6.and_then(|p| p.extract(a)).map(|v4| (v4, Via::Pool6))
}

/// True when `v4`, mapped `via`, is an address [`Pool6::refuses`] (a
/// non-global one behind the Well-Known Prefix).
pub fn wkp_refused(pool6: Option<&Pool6>, v4: [u8; 4], via: Via) -> bool {
    via == Via::Pool6 && pool6.is_some_and(|p| p.refuses(v4))
}

/// Global IPv4 unicast, as far as RFC 6052 §3.1 is concerned: not in one of
/// the IANA special-purpose ranges that are not global (RFC 6890 and its
/// registry: 0/8, 10/8, 100.64/10, 127/8, 169.254/16, 172.16/12, 192.0.0/24,
/// 192.0.2/24, 192.168/16, 198.18/15, 198.51.100/24, 203.0.113/24, 240/4
/// with 255.255.255.255) nor multicast (224/4, refused everywhere anyway).
pub fn is_global_v4(a: [u8; 4]) -> bool {
    let [x, y, z, _] = a;
    !(x == 0
        || x == 10
        || (x == 100 && (64..128).contains(&y))
        || x == 127
        || (x == 169 && y == 254)
        || (x == 172 && (16..32).contains(&y))
        || (x == 192 && y == 0 && (z == 0 || z == 2))
        || (x == 192 && y == 168)
        || (x == 198 && (y == 18 || y == 19))
        || (x == 198 && y == 51 && z == 100)
        || (x == 203 && y == 0 && z == 113)
        || x >= 224)
}

/// Addresses that must never be the source or destination of a translated
/// (non-error) IPv4 packet: 0/8, 127/8, 224/4 (multicast), 240/4 (incl. the
/// limited broadcast address).
pub fn is_illegal_v4(a: [u8; 4]) -> bool {
    let [first, ..] = a;
    first == 0 || first == 127 || first >= 224
}

/// Destinations an IPv6 packet must not be translated to, on top of
/// [`is_illegal_v4`]: 169.254/16 (link-local, RFC 3927: never forwarded;
/// a cloud's metadata service lives there).
pub fn is_illegal_v4_dst(a: [u8; 4]) -> bool {
    is_illegal_v4(a) || a[..2] == [169, 254]
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    /// RFC 6052 §2.4 table.
    #[test]
    fn rfc6052_table() {
        let a = [192, 0, 2, 33];
        let cases = [
            ("2001:db8::", 32, "2001:db8:c000:221::"),
            ("2001:db8:100::", 40, "2001:db8:1c0:2:21::"),
            ("2001:db8:122::", 48, "2001:db8:122:c000:2:2100::"),
            ("2001:db8:122:300::", 56, "2001:db8:122:3c0:0:221::"),
            ("2001:db8:122:344::", 64, "2001:db8:122:344:c0:2:2100:0"),
            ("2001:db8:122:344::", 96, "2001:db8:122:344::192.0.2.33"),
        ];
        for (p, l, e) in cases {
            let pool = Pool6::new(v6(p), l).unwrap();
            let got = pool.embed(a);
            assert_eq!(Ipv6Addr::from(got), v6(e), "/{l}");
            assert_eq!(pool.extract(&got), Some(a));
        }
    }

    /// RFC 6052 §3.1: the Well-Known Prefix refuses the non-global special
    /// ranges, to their edges; other prefixes, or the check off, nothing.
    #[test]
    fn wkp_refuses_non_global_only() {
        let wkp = Pool6::new(v6("64:ff9b::"), 96).unwrap();
        assert!(wkp.is_wkp());
        for a in [
            [0, 1, 2, 3],
            [10, 255, 0, 1],
            [100, 64, 0, 0],
            [100, 127, 255, 255],
            [127, 0, 0, 1],
            [169, 254, 0, 1],
            [172, 16, 0, 0],
            [172, 31, 255, 255],
            [192, 0, 0, 9],
            [192, 0, 2, 1],
            [192, 168, 0, 1],
            [198, 18, 0, 0],
            [198, 19, 255, 255],
            [198, 51, 100, 1],
            [203, 0, 113, 1],
            [240, 0, 0, 1],
            [255, 255, 255, 255],
        ] {
            assert!(wkp.refuses(a), "{a:?}");
        }
        for a in [
            [8, 8, 8, 8],
            [100, 63, 255, 255],
            [100, 128, 0, 0],
            [172, 15, 255, 255],
            [172, 32, 0, 0],
            [192, 0, 1, 1],
            [192, 0, 3, 1],
            [192, 169, 0, 1],
            [198, 17, 0, 1],
            [198, 20, 0, 1],
            [198, 51, 101, 1],
            [203, 0, 112, 1],
        ] {
            assert!(!wkp.refuses(a), "{a:?}");
        }
        assert!(!wkp.with_wkp_strict(false).refuses([10, 0, 0, 1]));
        let nsp = Pool6::new(v6("2001:db8:64::"), 96).unwrap();
        assert!(!nsp.is_wkp() && !nsp.refuses([10, 0, 0, 1]));
        // Only the /96 is the Well-Known Prefix.
        assert!(!Pool6::new(v6("64:ff9b::"), 64).unwrap().is_wkp());
        // Only what came through pool6 counts.
        assert!(wkp_refused(Some(&wkp), [10, 0, 0, 1], Via::Pool6));
        assert!(!wkp_refused(Some(&wkp), [10, 0, 0, 1], Via::Eam));
    }

    #[test]
    fn bad_pool6() {
        assert!(Pool6::new(v6("2001:db8::"), 33).is_err());
        assert!(Pool6::new(v6("2001:db8::1"), 96).is_err());
    }

    #[test]
    fn eam_suffix_bits() {
        // RFC 7757 style: a /29 <-> /125 entry maps .8 to ::0 (bit by bit).
        let e = Eam::new("192.0.2.8".parse().unwrap(), 29, v6("2001:db8::"), 125).unwrap();
        assert_eq!(
            Ipv6Addr::from(map_4to6(&[e], None, [192, 0, 2, 8], false).unwrap()),
            v6("2001:db8::")
        );
        assert_eq!(
            Ipv6Addr::from(map_4to6(&[e], None, [192, 0, 2, 15], false).unwrap()),
            v6("2001:db8::7")
        );
        assert_eq!(
            map_6to4(&[e], None, &v6("2001:db8::5").octets()),
            Some([192, 0, 2, 13])
        );
        // Longer IPv6 suffix (/24 <-> /72).
        let e = Eam::new(
            "198.51.100.0".parse().unwrap(),
            24,
            v6("2001:db8:1c6:3364::"),
            72,
        )
        .unwrap();
        let got = map_4to6(&[e], None, [198, 51, 100, 2], false).unwrap();
        assert_eq!(Ipv6Addr::from(got), v6("2001:db8:1c6:3364:2::"));
        assert_eq!(map_6to4(&[e], None, &got), Some([198, 51, 100, 2]));
        assert!(Eam::new("10.0.0.0".parse().unwrap(), 8, v6("2001:db8::"), 112).is_err());
    }

    #[test]
    fn eam_longest_match_and_precedence() {
        let pool = Pool6::new(v6("64:ff9b::"), 96).unwrap();
        let a = Eam::new("10.0.0.0".parse().unwrap(), 8, v6("2001:db8:a::"), 104).unwrap();
        let b = Eam::new("10.1.0.0".parse().unwrap(), 16, v6("2001:db8:b::"), 112).unwrap();
        let t = [a, b];
        let got = map_4to6(&t, Some(&pool), [10, 1, 2, 3], false).unwrap();
        assert_eq!(Ipv6Addr::from(got), v6("2001:db8:b::203"));
        let got = map_4to6(&t, Some(&pool), [10, 2, 2, 3], false).unwrap();
        assert_eq!(Ipv6Addr::from(got), v6("2001:db8:a::2:203"));
        let got = map_4to6(&t, Some(&pool), [10, 2, 2, 3], true).unwrap();
        assert_eq!(Ipv6Addr::from(got), v6("64:ff9b::a02:203"));
        assert_eq!(
            map_6to4(&t, Some(&pool), &v6("64:ff9b::c000:221").octets()),
            Some([192, 0, 2, 33])
        );
        assert_eq!(map_6to4(&t, Some(&pool), &v6("2001:db9::1").octets()), None);
    }
}
