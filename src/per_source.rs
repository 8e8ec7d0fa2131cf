//! Open connections per source, within a per-source cap [pure]: one client
//! cannot hold every slot of a listener and shut the others out. Used by the
//! control API, the node services API, carried tunnels, DNS over TCP and
//! (counting an IPv6 client by its /56: [`subscriber_key`]) the proxy's
//! listeners.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

/// Open connections per key (a client address, or a node), within a
/// per-key cap.
pub struct PerSource<K = IpAddr> {
    open: parking_lot::Mutex<HashMap<K, usize>>,
}

impl<K> Default for PerSource<K> {
    fn default() -> Self {
        PerSource {
            open: parking_lot::Mutex::new(HashMap::new()),
        }
    }
}

/// One connection's place in [`PerSource`], given back when dropped.
pub struct SourceSlot<K: Eq + Hash = IpAddr> {
    of: Arc<PerSource<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> PerSource<K> {
    /// A place for one more connection under `key`, or `None` when `cap`
    /// are open under it.
    pub fn take(self: &Arc<Self>, key: K, cap: usize) -> Option<SourceSlot<K>> {
        // No entry for a cap of 0: none would ever be given back to remove it.
        if cap == 0 {
            return None;
        }
        let mut open = self.open.lock();
        let n = open.entry(key.clone()).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            of: self.clone(),
            key,
        })
    }

    /// Connections open under `key`.
    pub fn open(&self, key: &K) -> usize {
        self.open.lock().get(key).copied().unwrap_or(0)
    }
}

impl<K: Eq + Hash> Drop for SourceSlot<K> {
    fn drop(&mut self) {
        let mut open = self.of.open.lock();
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// The key a client is counted under: its IPv4 address, or its IPv6 /64
/// (one host usually holds a whole one).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            Ipv6Addr::from(bits).into()
        }
        v4 => v4,
    }
}

/// The key the proxy's listeners count a client under: its IPv4 address, or
/// its IPv6 /56, what an ISP commonly delegates to one subscriber (a home or
/// a site numbers its LAN segments from the /56's 256 /64s). A subscriber's
/// /56 is what its one IPv4 address is behind a NAT: both hold one client's
/// share, so one subscriber cannot take 256 shares by spreading its
/// connections over its /64s.
pub fn subscriber_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 72) - 1);
            Ipv6Addr::from(bits).into()
        }
        v4 => v4,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn one_source_cannot_take_every_connection() {
        let p = Arc::new(PerSource::default());
        let a: IpAddr = "100.64.0.2".parse().unwrap();
        let b: IpAddr = "100.64.0.3".parse().unwrap();
        let mut held: Vec<SourceSlot> = (0..3).map(|_| p.take(a, 3).unwrap()).collect();
        assert!(
            p.take(a, 3).is_none(),
            "a fourth connection from one source"
        );
        let other = p.take(b, 3).unwrap();
        drop(held.pop());
        let again = p.take(a, 3);
        assert!(again.is_some(), "a closed connection's place is given back");
        assert!(p.take(a, 3).is_none());
        drop((again, other, held));
        // Keys with nothing open are forgotten.
        assert_eq!(p.open(&b), 0);
        assert!(p.open.lock().is_empty());
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        let k = |s: &str| source_key(s.parse().unwrap());
        assert_eq!(k("2001:db8:1:2:aaaa::1"), k("2001:db8:1:2:bbbb::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(k("2001:db8:1:2:aaaa::1"), k("2001:db8:1:2::"));
        // An IPv4 client reached over a dual-stack socket is its IPv4 address.
        assert_eq!(k("::ffff:192.0.2.7"), k("192.0.2.7"));
        assert_ne!(k("192.0.2.7"), k("192.0.2.8"));
    }

    #[test]
    fn per_source_64s_of_one_56_share_one_cap() {
        let p = Arc::new(PerSource::default());
        let take = |s: &str| p.take(subscriber_key(s.parse().unwrap()), 3);
        // Four /64s of one subscriber's /56 (and one more): together no more
        // than the per-source cap.
        let mut held = Vec::new();
        for sub in ["400", "401", "402", "4fe", "4ff"] {
            while let Some(s) = take(&format!("2001:db8:0:{sub}::1")) {
                held.push(s);
            }
        }
        assert_eq!(held.len(), 3);
        // Another /56, and IPv4 clients, have shares of their own.
        let other: Vec<_> = (0..3).map(|_| take("2001:db8:0:500::1").unwrap()).collect();
        let v4: Vec<_> = (0..3).map(|_| take("192.0.2.7").unwrap()).collect();
        assert!(take("::ffff:192.0.2.7").is_none());
        drop(held.pop());
        assert!(take("2001:db8:0:4ab::9").is_some());
        drop((held, other, v4));
        assert!(p.open.lock().is_empty());
        let k = |s: &str| subscriber_key(s.parse().unwrap());
        assert_eq!(
            k("2001:db8:0:4ab::1"),
            "2001:db8:0:400::".parse::<IpAddr>().unwrap()
        );
        assert_ne!(k("2001:db8:0:4ab::1"), k("2001:db8:0:5ab::1"));
        assert_eq!(k("::ffff:192.0.2.7"), k("192.0.2.7"));
    }
}
