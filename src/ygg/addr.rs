//! Yggdrasil addressing [pure]: the 200::/7 node address and 300::/64 subnet
//! of an ed25519 public key, and the partial key recovered from either
//! (docs/yggdrasil.md section 2.1; unchanged between 0.4.x and 0.5.x).
//!
//! Derivation (`AddrForKey` upstream): invert the key, count its leading one
//! bits `N`, skip them and the zero bit after them, and take the next 112
//! bits in whole bytes (a last partial byte is dropped). Address = `0x02`,
//! `N`, those 14 bytes. The subnet is the first 8 bytes of the address with
//! the first byte changed to `0x03`, as a /64.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

/// First byte of every node address (200::/8).
pub const ADDR_PREFIX: u8 = 0x02;
/// First byte of every routed subnet (300::/8).
pub const SUBNET_PREFIX: u8 = 0x03;
/// Length of an ed25519 public key in bytes.
pub const KEY_LEN: usize = 32;

/// Number of key bits carried by a node address after the `N` byte.
const ADDR_BITS: usize = 112;
/// Number of key bits carried by a subnet prefix after the `N` byte.
const SUBNET_BITS: usize = 48;

fn get_bit(buf: &[u8], idx: usize) -> bool {
    buf.get(idx / 8)
        .is_some_and(|b| b & (0x80 >> (idx % 8)) != 0)
}

fn set_bit(buf: &mut [u8], idx: usize) {
    if let Some(b) = buf.get_mut(idx / 8) {
        *b |= 0x80 >> (idx % 8);
    }
}

/// The 200::/7 node address of a public key.
///
/// Matches yggdrasil-go's `AddrForKey` bit for bit, including its 8-bit
/// counter of leading zero bits (which wraps only for the all-zero key) and
/// its packing of whole bytes only (a key with 144 or more leading zero bits
/// has fewer than 112 bits left; a last partial byte is left zero).
pub fn addr_for_key(key: &[u8; KEY_LEN]) -> Ipv6Addr {
    let mut out = [0u8; 16];
    out[0] = ADDR_PREFIX;
    let mut ones: u8 = 0;
    let mut done = false;
    let mut out_bit = 16usize; // bit position in `out` where key bits start (byte 2)
    for idx in 0..KEY_LEN * 8 {
        // bit of the inverted key
        let bit = !get_bit(key, idx);
        if !done {
            if bit {
                ones = ones.wrapping_add(1);
            } else {
                done = true;
            }
            continue;
        }
        if out_bit >= 128 {
            break;
        }
        if bit {
            set_bit(&mut out, out_bit);
        }
        out_bit += 1;
    }
    // Upstream appends whole bytes only: the bits of a last, partial byte
    // (keys with 144 or more leading zero bits) are dropped.
    if !out_bit.is_multiple_of(8) {
        if let Some(b) = out.get_mut(out_bit / 8) {
            *b = 0;
        }
    }
    out[1] = ones;
    Ipv6Addr::from(out)
}

/// The 300::/64 routed subnet of a public key.
pub fn subnet_for_key(key: &[u8; KEY_LEN]) -> YggSubnet {
    let a = addr_for_key(key).octets();
    let mut prefix = [0u8; 8];
    for (dst, src) in prefix.iter_mut().zip(a.iter()) {
        *dst = *src;
    }
    prefix[0] = SUBNET_PREFIX;
    YggSubnet { prefix }
}

/// Whether `addr` lies in 200::/7, i.e. is a Yggdrasil node address
/// (200::/8) or inside a Yggdrasil routed subnet (300::/8).
pub fn is_ygg(addr: &Ipv6Addr) -> bool {
    addr.octets()[0] & 0xfe == ADDR_PREFIX
}

/// Whether `addr` is a Yggdrasil node address (200::/8).
pub fn is_ygg_node_addr(addr: &Ipv6Addr) -> bool {
    addr.octets()[0] == ADDR_PREFIX
}

/// Whether `addr` lies in a Yggdrasil routed subnet (300::/8).
pub fn is_ygg_subnet_addr(addr: &Ipv6Addr) -> bool {
    addr.octets()[0] == SUBNET_PREFIX
}

/// A Yggdrasil routed /64 (`300:…::/64`), owned by one key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct YggSubnet {
    prefix: [u8; 8],
}

impl YggSubnet {
    /// Builds a subnet from its first 8 bytes; `None` unless byte 0 is `0x03`.
    pub fn from_prefix(prefix: [u8; 8]) -> Option<Self> {
        (prefix[0] == SUBNET_PREFIX).then_some(Self { prefix })
    }

    /// The 8 prefix bytes.
    pub fn prefix(&self) -> [u8; 8] {
        self.prefix
    }

    /// The network address (host bits zero).
    pub fn network(&self) -> Ipv6Addr {
        let mut o = [0u8; 16];
        for (dst, src) in o.iter_mut().zip(self.prefix.iter()) {
            *dst = *src;
        }
        Ipv6Addr::from(o)
    }

    /// Prefix length, always 64.
    pub const fn prefix_len(&self) -> u8 {
        64
    }

    /// Whether `addr` is inside this /64.
    pub fn contains(&self, addr: &Ipv6Addr) -> bool {
        addr.octets().get(..8) == Some(&self.prefix[..])
    }
}

impl fmt::Display for YggSubnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/64", self.network())
    }
}

impl fmt::Debug for YggSubnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "YggSubnet({self})")
    }
}

/// Why a string is not a Yggdrasil subnet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubnetParseError {
    /// Not of the form `<ipv6>/64`.
    #[error("subnet `{0}` is not of the form <ipv6>/64")]
    Syntax(String),
    /// Not inside 300::/8.
    #[error("subnet `{0}` is not inside 300::/8")]
    NotYgg(String),
    /// Host bits (the last 64) are not zero.
    #[error("subnet `{0}` has host bits set")]
    HostBits(String),
}

impl FromStr for YggSubnet {
    type Err = SubnetParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || SubnetParseError::Syntax(s.to_owned());
        let (net, len) = s.trim().split_once('/').ok_or_else(syntax)?;
        if len != "64" {
            return Err(syntax());
        }
        let ip: Ipv6Addr = net.parse().map_err(|_| syntax())?;
        let o = ip.octets();
        let (hi, lo) = o.split_at(8);
        if lo.iter().any(|b| *b != 0) {
            return Err(SubnetParseError::HostBits(s.to_owned()));
        }
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(hi);
        Self::from_prefix(prefix).ok_or_else(|| SubnetParseError::NotYgg(s.to_owned()))
    }
}

/// The part of a public key that an address or subnet reveals
/// (`GetKey` upstream).
///
/// `key` has the known bits of the real key and **ones** in every unknown
/// position, exactly as yggdrasil-go builds it, so the real key is the
/// closest key at or below `key` in byte order. `mask` has a one for every
/// known bit.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PartialKey {
    /// Key bits; unknown bits are 1.
    pub key: [u8; KEY_LEN],
    /// One bit per known key bit (a prefix of the key).
    pub mask: [u8; KEY_LEN],
}

impl PartialKey {
    /// Whether `key` agrees with every known bit.
    pub fn matches(&self, key: &[u8; KEY_LEN]) -> bool {
        self.key
            .iter()
            .zip(self.mask.iter())
            .zip(key.iter())
            .all(|((p, m), k)| (p ^ k) & m == 0)
    }

    /// Number of known (leading) key bits.
    pub fn known_bits(&self) -> u32 {
        self.mask.iter().map(|b| b.count_ones()).sum()
    }
}

impl fmt::Debug for PartialKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PartialKey({}, {} known bits)",
            hex::encode(self.key),
            self.known_bits()
        )
    }
}

/// Recovers the partial key from a node address (200::/8, 112 key bits after
/// the `N` leading zeros) or from any address in a routed subnet (300::/8,
/// 48 bits; the interface identifier is ignored). `None` outside 200::/7.
pub fn partial_key(addr: &Ipv6Addr) -> Option<PartialKey> {
    let o = addr.octets();
    let carried = match o[0] {
        ADDR_PREFIX => ADDR_BITS,
        SUBNET_PREFIX => SUBNET_BITS,
        _ => return None,
    };
    let ones = usize::from(o[1]);
    // Build the *inverted* key: N ones, a zero, then the carried bits.
    let mut inv = [0u8; KEY_LEN];
    let mut mask = [0u8; KEY_LEN];
    for idx in 0..ones.min(KEY_LEN * 8) {
        set_bit(&mut inv, idx);
        set_bit(&mut mask, idx);
    }
    // the terminating zero bit is known too
    set_bit(&mut mask, ones);
    for i in 0..carried {
        let key_idx = ones + 1 + i;
        if key_idx >= KEY_LEN * 8 {
            break;
        }
        if get_bit(&o, 16 + i) {
            set_bit(&mut inv, key_idx);
        }
        set_bit(&mut mask, key_idx);
    }
    let mut key = [0u8; KEY_LEN];
    for (k, i) in key.iter_mut().zip(inv.iter()) {
        *k = !i;
    }
    Some(PartialKey { key, mask })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(h: &str) -> [u8; 32] {
        hex::decode(h).unwrap().try_into().unwrap()
    }

    /// (public key, address, subnet) from docs/yggdrasil.md section 2.1,
    /// computed with Debian's yggdrasil 0.4.7.
    const VECTORS: [(&str, &str, &str); 4] = [
        (
            "8988ec86fd70a116524ef24b11d0aed0ef374a69b1014ae93a82716a7fadca54",
            "200:ecee:26f2:51e:bdd3:5b62:1b69:dc5e",
            "300:ecee:26f2:51e::/64",
        ),
        (
            "a9427f83263cb29bf09d979f4fcffdc2692fca21a04ddab180ef025198938e58",
            "200:ad7b:f9:b386:9ac8:1ec4:d0c1:6060",
            "300:ad7b:f9:b386::/64",
        ),
        (
            "09931a311e648eb6b262a24639b733c68ee8e01c43e0aa2bb8a140010573aff7",
            "204:cd9c:b9dc:336e:2929:b3ab:b738:c919",
            "304:cd9c:b9dc:336e::/64",
        ),
        (
            "00006c79ac6a064244c5fb6da649dd1824dd1120767c7844eb10ce243f39205c",
            "211:4e19:4e57:e6f6:ece8:1249:66d8:8b9f",
            "311:4e19:4e57:e6f6::/64",
        ),
    ];

    #[test]
    fn doc_vectors() {
        for (k, a, s) in VECTORS {
            let k = key(k);
            assert_eq!(addr_for_key(&k), a.parse::<Ipv6Addr>().unwrap(), "{a}");
            assert_eq!(subnet_for_key(&k).to_string(), s);
            assert_eq!(s.parse::<YggSubnet>().unwrap(), subnet_for_key(&k));
            assert!(is_ygg(&addr_for_key(&k)));
            assert!(is_ygg(&subnet_for_key(&k).network()));
        }
    }

    #[test]
    fn doc_partial_keys() {
        let a: Ipv6Addr = "200:ecee:26f2:51e:bdd3:5b62:1b69:dc5e".parse().unwrap();
        let p = partial_key(&a).unwrap();
        let mut want = key("8988ec86fd70a116524ef24b11d0ffffffffffffffffffffffffffffffffffff");
        assert_eq!(p.key, want);
        assert_eq!(p.known_bits(), 113);
        let a: Ipv6Addr = "204:cd9c:b9dc:336e:2929:b3ab:b738:c919".parse().unwrap();
        let p = partial_key(&a).unwrap();
        want = key("09931a311e648eb6b262a24639b737ffffffffffffffffffffffffffffffffff");
        assert_eq!(p.key, want);
        assert_eq!(p.known_bits(), 117);
        for (k, a, s) in VECTORS {
            let k = key(k);
            assert!(partial_key(&a.parse().unwrap()).unwrap().matches(&k));
            let net = s.parse::<YggSubnet>().unwrap().network();
            let ps = partial_key(&net).unwrap();
            assert!(ps.matches(&k));
            assert_eq!(ps.known_bits(), u32::from(net.octets()[1]) + 1 + 48);
        }
    }

    #[test]
    fn classification() {
        assert!(is_ygg(&"200::1".parse().unwrap()));
        assert!(is_ygg(&"3ff:ffff::1".parse().unwrap()));
        assert!(!is_ygg(&"400::1".parse().unwrap()));
        assert!(!is_ygg(&"1ff::1".parse().unwrap()));
        assert!(!is_ygg(&"::1".parse().unwrap()));
        assert!(is_ygg_node_addr(&"2ff::".parse().unwrap()));
        assert!(is_ygg_subnet_addr(&"300::".parse().unwrap()));
        assert!(partial_key(&"fe80::1".parse().unwrap()).is_none());
    }

    #[test]
    fn subnet_parse_errors() {
        assert!(matches!(
            "300::1/64".parse::<YggSubnet>(),
            Err(SubnetParseError::HostBits(_))
        ));
        assert!(matches!(
            "200::/64".parse::<YggSubnet>(),
            Err(SubnetParseError::NotYgg(_))
        ));
        assert!(matches!(
            "300::/48".parse::<YggSubnet>(),
            Err(SubnetParseError::Syntax(_))
        ));
        let s: YggSubnet = "300:ecee:26f2:51e::/64".parse().unwrap();
        assert!(s.contains(&"300:ecee:26f2:51e::42".parse().unwrap()));
        assert!(!s.contains(&"300:ecee:26f2:51f::42".parse().unwrap()));
    }

    #[test]
    fn extreme_keys() {
        // all-zero key: 256 leading zeros, Go's byte counter wraps to 0
        let z = addr_for_key(&[0u8; 32]);
        assert_eq!(z, "200::".parse::<Ipv6Addr>().unwrap());
        // ...so its partial key does not describe it (an upstream quirk we keep)
        assert!(!partial_key(&z).unwrap().matches(&[0; 32]));
        // 255 leading zeros
        let mut k = [0u8; 32];
        k[31] = 1;
        let a = addr_for_key(&k);
        assert_eq!(a.octets()[1], 255);
        assert!(partial_key(&a).unwrap().matches(&k));
        // all-ones key
        let a = addr_for_key(&[0xff; 32]);
        assert_eq!(a.octets()[1], 0);
        assert!(partial_key(&a).unwrap().matches(&[0xff; 32]));
    }

    #[test]
    fn a_last_partial_byte_is_dropped_as_upstream_does() {
        // 150 zero bits, a one, then zeros: 105 inverted bits follow the
        // counted ones and their zero, 13 whole bytes and one bit. Go's
        // `AddrForKey` appends whole bytes only, so byte 15 stays zero.
        let mut k = [0u8; 32];
        k[150 / 8] = 0x80 >> (150 % 8);
        let a = addr_for_key(&k).octets();
        assert_eq!(a[1], 150);
        assert!(a[2..15].iter().all(|b| *b == 0xff), "{a:02x?}");
        assert_eq!(a[15], 0, "{a:02x?}");
        // 144 zero bits: 111 bits follow, the same 13 bytes and a zero.
        let mut k = [0u8; 32];
        k[144 / 8] = 0x80;
        let a = addr_for_key(&k).octets();
        assert_eq!(a[1], 144);
        assert_eq!(a[15], 0, "{a:02x?}");
        // 143 zero bits: exactly 112 bits follow, all kept.
        let mut k = [0u8; 32];
        k[143 / 8] = 0x80 >> (143 % 8);
        let a = addr_for_key(&k).octets();
        assert_eq!(a[1], 143);
        assert_eq!(a[15], 0xff, "{a:02x?}");
    }

    proptest! {
        #[test]
        fn address_round_trips_to_partial_key(k in any::<[u8; 32]>(), lead in 0usize..40) {
            // force some leading zero bits to exercise large N
            let mut k = k;
            for i in 0..lead { k[i / 8] &= !(0x80 >> (i % 8)); }
            let a = addr_for_key(&k);
            prop_assert!(is_ygg_node_addr(&a));
            let p = partial_key(&a).unwrap();
            prop_assert!(p.matches(&k));
            // the real key is at or below the partial key
            prop_assert!(k <= p.key);
            let n = u32::from(a.octets()[1]);
            prop_assert_eq!(p.known_bits(), (n + 1 + 112).min(256));
            let s = subnet_for_key(&k);
            prop_assert!(is_ygg_subnet_addr(&s.network()));
            prop_assert!(partial_key(&s.network()).unwrap().matches(&k));
            prop_assert_eq!(s.to_string().parse::<YggSubnet>().unwrap(), s);
        }

        #[test]
        fn any_address_never_panics(o in any::<[u8; 16]>()) {
            let a = Ipv6Addr::from(o);
            if let Some(p) = partial_key(&a) {
                prop_assert!(is_ygg(&a));
                // re-deriving from a key built from the partial key agrees on the prefix
                let again = addr_for_key(&p.key);
                if o[0] == ADDR_PREFIX {
                    prop_assert_eq!(again.octets()[1], o[1]);
                }
            } else {
                prop_assert!(!is_ygg(&a));
            }
        }
    }
}
