//! Open connections per source, within a per-source cap [pure]: one client
//! cannot hold every slot of a listener and shut the others out. Used by the
//! control API, the node services API, carried tunnels and DNS over TCP.

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
}
