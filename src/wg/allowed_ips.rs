//! Longest-prefix-match table over allowed IPs: the cryptokey routing table.
//!
//! Pure: no I/O. One hash map per prefix length that is in use, searched from the
//! longest length down, so a lookup costs one hash probe per distinct prefix length
//! (in practice two or three) whatever the number of peers.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use ipnet::IpNet;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Clone, Debug)]
struct Level<K, T> {
    len: u8,
    map: HashMap<K, T>,
}

/// A longest-prefix-match table from IP prefixes to values.
#[derive(Clone, Debug)]
pub struct AllowedIps<T> {
    v4: Vec<Level<u32, T>>,
    v6: Vec<Level<u128, T>>,
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        Self {
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }
}

fn mask4(a: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        a & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask6(a: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        a & (u128::MAX << (128 - u32::from(len)))
    }
}

fn insert_level<K: std::hash::Hash + Eq, T>(
    levels: &mut Vec<Level<K, T>>,
    len: u8,
    key: K,
    value: T,
) -> Option<T> {
    match levels.binary_search_by(|l| len.cmp(&l.len)) {
        Ok(i) => levels.get_mut(i).and_then(|l| l.map.insert(key, value)),
        Err(i) => {
            let mut map = HashMap::new();
            map.insert(key, value);
            levels.insert(i, Level { len, map });
            None
        }
    }
}

fn remove_level<K: std::hash::Hash + Eq, T>(
    levels: &mut Vec<Level<K, T>>,
    len: u8,
    key: &K,
) -> Option<T> {
    let i = levels.binary_search_by(|l| len.cmp(&l.len)).ok()?;
    let level = levels.get_mut(i)?;
    let old = level.map.remove(key);
    if level.map.is_empty() {
        levels.remove(i);
    }
    old
}

impl<T> AllowedIps<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts `net` (host bits are ignored), returning the value it replaced.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        match net {
            IpNet::V4(n) => insert_level(
                &mut self.v4,
                n.prefix_len(),
                mask4(u32::from(n.addr()), n.prefix_len()),
                value,
            ),
            IpNet::V6(n) => insert_level(
                &mut self.v6,
                n.prefix_len(),
                mask6(u128::from(n.addr()), n.prefix_len()),
                value,
            ),
        }
    }

    /// Removes exactly `net`, returning its value.
    pub fn remove(&mut self, net: &IpNet) -> Option<T> {
        match net {
            IpNet::V4(n) => remove_level(
                &mut self.v4,
                n.prefix_len(),
                &mask4(u32::from(n.addr()), n.prefix_len()),
            ),
            IpNet::V6(n) => remove_level(
                &mut self.v6,
                n.prefix_len(),
                &mask6(u128::from(n.addr()), n.prefix_len()),
            ),
        }
    }

    /// Removes every entry whose value matches `pred`.
    pub fn retain(&mut self, mut pred: impl FnMut(&T) -> bool) {
        for l in &mut self.v4 {
            l.map.retain(|_, v| pred(v));
        }
        self.v4.retain(|l| !l.map.is_empty());
        for l in &mut self.v6 {
            l.map.retain(|_, v| pred(v));
        }
        self.v6.retain(|l| !l.map.is_empty());
    }

    pub fn lookup_v4(&self, a: Ipv4Addr) -> Option<&T> {
        let a = u32::from(a);
        self.v4.iter().find_map(|l| l.map.get(&mask4(a, l.len)))
    }

    pub fn lookup_v6(&self, a: Ipv6Addr) -> Option<&T> {
        let a = u128::from(a);
        self.v6.iter().find_map(|l| l.map.get(&mask6(a, l.len)))
    }

    /// The value of the longest prefix containing `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<&T> {
        match addr {
            IpAddr::V4(a) => self.lookup_v4(a),
            IpAddr::V6(a) => self.lookup_v6(a),
        }
    }

    /// Every entry, IPv4 first, longest prefixes first.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &T)> {
        let v4 = self.v4.iter().flat_map(|l| {
            l.map.iter().filter_map(move |(k, v)| {
                ipnet::Ipv4Net::new(Ipv4Addr::from(*k), l.len)
                    .ok()
                    .map(|n| (IpNet::V4(n), v))
            })
        });
        let v6 = self.v6.iter().flat_map(|l| {
            l.map.iter().filter_map(move |(k, v)| {
                ipnet::Ipv6Net::new(Ipv6Addr::from(*k), l.len)
                    .ok()
                    .map(|n| (IpNet::V6(n), v))
            })
        });
        v4.chain(v6)
    }

    pub fn len(&self) -> usize {
        self.v4.iter().map(|l| l.map.len()).sum::<usize>()
            + self.v6.iter().map(|l| l.map.len()).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = AllowedIps::new();
        t.insert(net("100.64.0.0/10"), 1);
        t.insert(net("100.64.0.2/32"), 2);
        t.insert(net("0.0.0.0/0"), 3);
        t.insert(net("fd77::/48"), 4);
        t.insert(net("fd77::2/128"), 5);
        assert_eq!(t.lookup("100.64.0.2".parse().unwrap()), Some(&2));
        assert_eq!(t.lookup("100.64.0.3".parse().unwrap()), Some(&1));
        assert_eq!(t.lookup("8.8.8.8".parse().unwrap()), Some(&3));
        assert_eq!(t.lookup("fd77::2".parse().unwrap()), Some(&5));
        assert_eq!(t.lookup("fd77::3".parse().unwrap()), Some(&4));
        assert_eq!(t.lookup("fd78::3".parse().unwrap()), None);
        assert_eq!(t.remove(&net("100.64.0.2/32")), Some(2));
        assert_eq!(t.lookup("100.64.0.2".parse().unwrap()), Some(&1));
        t.retain(|v| *v != 1);
        assert_eq!(t.lookup("100.64.0.2".parse().unwrap()), Some(&3));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn host_bits_are_ignored() {
        let mut t = AllowedIps::new();
        t.insert(net("10.1.2.3/8"), 1);
        assert_eq!(t.lookup("10.200.0.1".parse().unwrap()), Some(&1));
        assert_eq!(t.iter().next().unwrap().0, net("10.0.0.0/8"));
    }

    fn linear(entries: &[(IpNet, u32)], a: IpAddr) -> Option<&u32> {
        // Later inserts of the same prefix replace earlier ones.
        let mut best: Option<(u8, &u32)> = None;
        for (n, v) in entries {
            let n = n.trunc();
            if n.contains(&a) && best.is_none_or(|(l, _)| n.prefix_len() >= l) {
                best = Some((n.prefix_len(), v));
            }
        }
        best.map(|(_, v)| v)
    }

    proptest! {
        #[test]
        fn lookup_equals_linear_scan(
            prefixes in proptest::collection::vec((any::<u32>(), 0u8..=32, any::<u128>(), 0u8..=128), 0..64),
            probes in proptest::collection::vec((any::<u32>(), any::<u128>()), 1..64),
        ) {
            let mut t = AllowedIps::new();
            let mut entries = Vec::new();
            for (i, (a4, l4, a6, l6)) in prefixes.iter().enumerate() {
                let n4 = IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(*a4), *l4).unwrap());
                let n6 = IpNet::V6(ipnet::Ipv6Net::new(Ipv6Addr::from(*a6), *l6).unwrap());
                t.insert(n4, i as u32);
                t.insert(n6, i as u32);
                entries.push((n4, i as u32));
                entries.push((n6, i as u32));
            }
            for (p4, p6) in probes {
                // Probe both random addresses and addresses inside inserted prefixes.
                let a4 = IpAddr::V4(Ipv4Addr::from(p4));
                let a6 = IpAddr::V6(Ipv6Addr::from(p6));
                prop_assert_eq!(t.lookup(a4), linear(&entries, a4));
                prop_assert_eq!(t.lookup(a6), linear(&entries, a6));
            }
            for (n, _) in &entries {
                let a = n.network();
                prop_assert_eq!(t.lookup(a), linear(&entries, a));
            }
        }
    }
}
