//! Places of a hub's carried tunnels [pure]: a small pool of unproven
//! streams (not yet carrying a WireGuard session, see
//! [`super::carries_session`]) and the main one of proven streams, each
//! bounded overall and per source.
//!
//! A stream is admitted unproven. When the unproven pool is full, the
//! oldest unproven stream is evicted to make room: a stranger holding the
//! pool with idle streams has to open new ones faster than a real node
//! proves itself (one round trip: the node's device starts a handshake as
//! soon as its stream is open, and the hub's device answers it at once) to
//! shut anyone out. A source whose unproven quota is full is refused. A
//! stream that proves itself moves to the main pool, within its limits;
//! when there is no room there it is refused (and closed by its caller).
//!
//! No sockets and no clock: admissions are numbered in order, which is
//! what "oldest" means; each entry holds a `T` its caller uses to stop the
//! evicted stream.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// The pools' sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Unproven streams at once, overall.
    pub unproven: usize,
    /// Unproven streams at once from one source.
    pub unproven_per_source: usize,
    /// Proven streams at once, overall.
    pub proven: usize,
    /// Proven streams at once from one source.
    pub proven_per_source: usize,
}

/// Why a stream has no place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its source's unproven streams are at their limit.
    SourceUnproven,
    /// The unproven pool holds nothing (a limit of 0).
    NoUnproven,
    /// Proven: no room in the main pool (overall or for its source).
    Full,
    /// It is no longer in the pool (evicted, or released).
    Gone,
}

/// Streams by state, within [`Limits`].
#[derive(Debug)]
pub struct Pool<K, T> {
    limits: Limits,
    /// The next admission's number.
    next: u64,
    /// Unproven streams by admission number: the first is the oldest.
    unproven: BTreeMap<u64, (K, T)>,
    unproven_per: HashMap<K, usize>,
    proven: HashMap<u64, K>,
    proven_per: HashMap<K, usize>,
}

/// Adds one under `key`.
fn up<K: Eq + Hash>(m: &mut HashMap<K, usize>, key: K) {
    *m.entry(key).or_insert(0) += 1;
}

/// Takes one from under `key`, forgetting keys with none.
fn down<K: Eq + Hash>(m: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = m.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            m.remove(key);
        }
    }
}

impl<K: Eq + Hash + Clone, T> Pool<K, T> {
    pub fn new(limits: Limits) -> Self {
        Pool {
            limits,
            next: 0,
            unproven: BTreeMap::new(),
            unproven_per: HashMap::new(),
            proven: HashMap::new(),
            proven_per: HashMap::new(),
        }
    }

    /// Admits a new stream from `key`, unproven, holding `stop`: its
    /// number, and the `stop` of the oldest unproven stream when it was
    /// evicted to make room (the caller stops that stream).
    pub fn admit(&mut self, key: K, stop: T) -> Result<(u64, Option<T>), Refused> {
        if self.limits.unproven == 0 {
            return Err(Refused::NoUnproven);
        }
        if self.unproven_per.get(&key).copied().unwrap_or(0) >= self.limits.unproven_per_source {
            return Err(Refused::SourceUnproven);
        }
        let evicted = if self.unproven.len() >= self.limits.unproven {
            self.unproven.pop_first().map(|(_, (k, t))| {
                down(&mut self.unproven_per, &k);
                t
            })
        } else {
            None
        };
        let id = self.next;
        self.next += 1;
        up(&mut self.unproven_per, key.clone());
        self.unproven.insert(id, (key, stop));
        Ok((id, evicted))
    }

    /// Moves stream `id`, which has proven itself, to the main pool.
    /// Already there: nothing to do. No room there: it leaves the pool
    /// ([`Refused::Full`]; the caller closes it).
    pub fn promote(&mut self, id: u64) -> Result<(), Refused> {
        if self.proven.contains_key(&id) {
            return Ok(());
        }
        let Some((key, _stop)) = self.unproven.remove(&id) else {
            return Err(Refused::Gone);
        };
        down(&mut self.unproven_per, &key);
        let from_key = self.proven_per.get(&key).copied().unwrap_or(0);
        if self.proven.len() >= self.limits.proven || from_key >= self.limits.proven_per_source {
            return Err(Refused::Full);
        }
        up(&mut self.proven_per, key.clone());
        self.proven.insert(id, key);
        Ok(())
    }

    /// Stream `id` ended: its place is given back (nothing if it has none
    /// any more).
    pub fn release(&mut self, id: u64) {
        if let Some((key, _stop)) = self.unproven.remove(&id) {
            down(&mut self.unproven_per, &key);
        } else if let Some(key) = self.proven.remove(&id) {
            down(&mut self.proven_per, &key);
        }
    }

    /// Whether stream `id` has proven itself (and has its place).
    pub fn is_proven(&self, id: u64) -> bool {
        self.proven.contains_key(&id)
    }

    /// Streams unproven and proven now.
    pub fn len(&self) -> (usize, usize) {
        (self.unproven.len(), self.proven.len())
    }

    /// Unproven and proven streams from `key` now.
    pub fn from_source(&self, key: &K) -> (usize, usize) {
        (
            self.unproven_per.get(key).copied().unwrap_or(0),
            self.proven_per.get(key).copied().unwrap_or(0),
        )
    }

    /// Whether nothing is held (no key remembered either).
    pub fn is_empty(&self) -> bool {
        self.unproven.is_empty()
            && self.proven.is_empty()
            && self.unproven_per.is_empty()
            && self.proven_per.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    const SMALL: Limits = Limits {
        unproven: 4,
        unproven_per_source: 2,
        proven: 3,
        proven_per_source: 2,
    };

    #[test]
    fn the_oldest_unproven_stream_makes_room() {
        let mut p: Pool<&str, &str> = Pool::new(SMALL);
        let (a1, e) = p.admit("a", "a1").unwrap();
        assert_eq!(e, None);
        let (_a2, _) = p.admit("a", "a2").unwrap();
        let (b1, _) = p.admit("b", "b1").unwrap();
        let (_b2, _) = p.admit("b", "b2").unwrap();
        assert_eq!(p.len(), (4, 0));
        // Full: the oldest (a1) goes, whatever its source.
        let (c1, e) = p.admit("c", "c1").unwrap();
        assert_eq!(e, Some("a1"));
        assert_eq!(p.from_source(&"a"), (1, 0));
        assert_eq!(p.promote(a1), Err(Refused::Gone));
        // A proven stream is never evicted.
        p.promote(b1).unwrap();
        let (_, e) = p.admit("d", "d1").unwrap();
        assert_eq!(e, None, "room was made by b1's promotion");
        let (_, e) = p.admit("d", "d2").unwrap();
        assert_eq!(e, Some("a2"));
        let (_, e) = p.admit("e", "e1").unwrap();
        assert_eq!(e, Some("b2"));
        assert!(p.is_proven(b1));
        assert!(!p.is_proven(c1));
        assert_eq!(p.len(), (4, 1));
    }

    #[test]
    fn a_source_at_its_unproven_limit_is_refused() {
        let mut p: Pool<&str, ()> = Pool::new(SMALL);
        let (a1, _) = p.admit("a", ()).unwrap();
        p.admit("a", ()).unwrap();
        assert_eq!(p.admit("a", ()), Err(Refused::SourceUnproven));
        // Nothing was evicted for it.
        assert_eq!(p.len(), (2, 0));
        // Proven streams do not count against it.
        p.promote(a1).unwrap();
        assert!(p.admit("a", ()).is_ok());
        assert_eq!(p.from_source(&"a"), (2, 1));
        let none = Limits {
            unproven: 0,
            ..SMALL
        };
        assert_eq!(
            Pool::<&str, ()>::new(none).admit("a", ()),
            Err(Refused::NoUnproven)
        );
    }

    #[test]
    fn promotion_needs_room_in_the_main_pool() {
        let mut p: Pool<&str, ()> = Pool::new(SMALL);
        let mut ids = Vec::new();
        for k in ["a", "a", "b", "b"] {
            ids.push(p.admit(k, ()).unwrap().0);
        }
        p.promote(ids[0]).unwrap();
        p.promote(ids[0]).unwrap(); // twice: nothing more
        p.promote(ids[1]).unwrap();
        assert_eq!(p.from_source(&"a"), (0, 2));
        // "a" at its proven limit.
        let a3 = p.admit("a", ()).unwrap().0;
        assert_eq!(p.promote(a3), Err(Refused::Full));
        assert_eq!(p.from_source(&"a"), (0, 2), "a refused stream leaves");
        p.promote(ids[2]).unwrap();
        // The main pool full overall.
        assert_eq!(p.promote(ids[3]), Err(Refused::Full));
        assert_eq!(p.len(), (0, 3));
        // A proven stream that ends gives its place back.
        p.release(ids[0]);
        let c = p.admit("c", ()).unwrap().0;
        p.promote(c).unwrap();
        assert_eq!(p.len(), (0, 3));
    }

    #[test]
    fn released_places_are_given_back() {
        let mut p: Pool<&str, ()> = Pool::new(SMALL);
        let (a1, _) = p.admit("a", ()).unwrap();
        let (a2, _) = p.admit("a", ()).unwrap();
        p.promote(a2).unwrap();
        p.release(a1);
        p.release(a2);
        // Twice, or an evicted one: nothing.
        p.release(a1);
        assert!(p.is_empty());
        // Numbers are never reused.
        let (a3, _) = p.admit("a", ()).unwrap();
        assert!(a3 > a2);
        p.release(a2);
        assert_eq!(p.len(), (1, 0));
    }
}
