//! Which WireGuard peer each of a hub's carried tunnels serves [pure], and
//! at most a few of them per peer.
//!
//! A relay serves the peer whose endpoint an authenticated datagram
//! through it last moved there (the hub's device tells of every move). A
//! peer's endpoint is one address, so it uses one relay at a time: a node
//! that reconnects has its new stream and, until the hub sees the old one
//! end, the old. When a move gives a peer more relays than its limit, the
//! one it moved to least recently is given back for its caller to close:
//! it is not the peer's endpoint, and the device sends nothing but to an
//! endpoint. So whoever holds one node's keys holds no more carried
//! tunnels than that node would, from however many addresses they open
//! streams. Moves to addresses that are no relay (a node back on UDP)
//! change nothing: the node may come back to its stream.
//!
//! No sockets and no clock: moves are numbered in order, which is what
//! "least recently" means; each relay holds a `T` its caller uses to stop
//! it. The caller tells of every move; the bookkeeping happens then, and
//! when a relay opens or ends, never per datagram.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// Open relays by address (`A`), each serving at most one peer (`P`).
#[derive(Debug)]
pub struct Relays<A, P, T> {
    per_peer: usize,
    /// The next move's number.
    next: u64,
    open: HashMap<A, Open<P, T>>,
    /// Each peer's relays by the number of the last move to them: the
    /// first is the one it moved to least recently.
    by_peer: HashMap<P, BTreeMap<u64, A>>,
}

#[derive(Debug)]
struct Open<P, T> {
    stop: T,
    /// The peer it serves and the number of the move that said so.
    serves: Option<(P, u64)>,
}

/// Takes move `at` from `peer`'s relays, forgetting a peer with none.
fn unlink<A, P: Eq + Hash>(by_peer: &mut HashMap<P, BTreeMap<u64, A>>, peer: &P, at: u64) {
    if let Some(m) = by_peer.get_mut(peer) {
        m.remove(&at);
        if m.is_empty() {
            by_peer.remove(peer);
        }
    }
}

impl<A: Eq + Hash + Clone, P: Eq + Hash + Clone, T: Clone> Relays<A, P, T> {
    /// At most `per_peer` relays serve one peer (at least 1: the one its
    /// endpoint is at).
    pub fn new(per_peer: usize) -> Self {
        Relays {
            per_peer: per_peer.max(1),
            next: 0,
            open: HashMap::new(),
            by_peer: HashMap::new(),
        }
    }

    /// A relay opened at `relay`, serving no one yet, stopped by `stop`.
    /// (An address is one relay's until [`Relays::close`]; were it still
    /// another's, that one is forgotten.)
    pub fn open(&mut self, relay: A, stop: T) {
        let old = self.open.insert(relay, Open { stop, serves: None });
        if let Some((p, at)) = old.and_then(|o| o.serves) {
            unlink(&mut self.by_peer, &p, at);
        }
    }

    /// `peer`'s endpoint moved to `relay`: the relay now serves it (and no
    /// longer whichever peer it served before). The `stop` of the peer's
    /// relay it moved to least recently when that makes more than the
    /// limit (it serves no one any more; the caller stops it). Nothing
    /// when `relay` is no open relay.
    pub fn moved(&mut self, peer: P, relay: &A) -> Option<T> {
        let r = self.open.get_mut(relay)?;
        let n = self.next;
        self.next += 1;
        if let Some((old, at)) = r.serves.take() {
            unlink(&mut self.by_peer, &old, at);
        }
        r.serves = Some((peer.clone(), n));
        let mine = self.by_peer.entry(peer).or_default();
        mine.insert(n, relay.clone());
        if mine.len() <= self.per_peer {
            return None;
        }
        // Not `relay`: it has the newest number, and the limit is at least 1.
        let (_, oldest) = mine.pop_first()?;
        let o = self.open.get_mut(&oldest)?;
        o.serves = None;
        Some(o.stop.clone())
    }

    /// The relay at `relay` ended: forgotten (nothing if it was not open).
    pub fn close(&mut self, relay: &A) {
        if let Some((p, at)) = self.open.remove(relay).and_then(|o| o.serves) {
            unlink(&mut self.by_peer, &p, at);
        }
    }

    /// How many relays serve `peer` now.
    pub fn serving(&self, peer: &P) -> usize {
        self.by_peer.get(peer).map_or(0, BTreeMap::len)
    }

    /// The peer `relay` serves, if any.
    pub fn serves(&self, relay: &A) -> Option<&P> {
        self.open
            .get(relay)
            .and_then(|o| o.serves.as_ref())
            .map(|(p, _)| p)
    }

    /// Open relays now.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Whether nothing is held (no peer remembered either).
    pub fn is_empty(&self) -> bool {
        self.open.is_empty() && self.by_peer.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn relays(names: &[&'static str]) -> Relays<&'static str, char, &'static str> {
        let mut r = Relays::new(2);
        for &n in names {
            r.open(n, n);
        }
        r
    }

    #[test]
    fn a_peer_moving_between_relays_keeps_at_most_the_limit() {
        let mut r = relays(&["r1", "r2", "r3", "r4", "r5"]);
        assert_eq!(r.moved('a', &"r1"), None);
        assert_eq!(r.moved('a', &"r2"), None);
        assert_eq!(r.serving(&'a'), 2);
        // A third: the one it left first goes.
        assert_eq!(r.moved('a', &"r3"), Some("r1"));
        assert_eq!(r.serving(&'a'), 2);
        assert_eq!(r.serves(&"r1"), None);
        assert_eq!(r.serves(&"r3"), Some(&'a'));
        // Back to r2, then on to r4: r3 is the one it left longest ago.
        assert_eq!(r.moved('a', &"r2"), None);
        assert_eq!(r.moved('a', &"r2"), None, "again: nothing more");
        assert_eq!(r.moved('a', &"r4"), Some("r3"));
        assert_eq!(r.serves(&"r2"), Some(&'a'));
        // The closed ones end; their places are given back.
        r.close(&"r1");
        r.close(&"r3");
        assert_eq!(r.len(), 3);
        assert_eq!(r.serving(&'a'), 2);
        assert_eq!(r.moved('a', &"r5"), Some("r2"));
    }

    #[test]
    fn other_peers_relays_are_untouched() {
        let mut r = relays(&["a1", "a2", "a3", "b1", "b2"]);
        assert_eq!(r.moved('b', &"b1"), None);
        assert_eq!(r.moved('b', &"b2"), None);
        for a in ["a1", "a2"] {
            assert_eq!(r.moved('a', &a), None);
        }
        assert_eq!(r.moved('a', &"a3"), Some("a1"));
        assert_eq!(r.serving(&'b'), 2);
        assert_eq!(r.serves(&"b1"), Some(&'b'));
        // A relay another peer's endpoint moves to serves that one: its
        // first peer has room for one more.
        assert_eq!(r.moved('b', &"a3"), Some("b1"));
        assert_eq!(r.serving(&'a'), 1);
        assert_eq!(r.serves(&"a3"), Some(&'b'));
        r.open("a4", "a4");
        assert_eq!(r.moved('a', &"a4"), None);
        assert_eq!(r.serving(&'a'), 2);
    }

    #[test]
    fn moves_to_what_is_no_relay_change_nothing() {
        let mut r = relays(&["r1", "r2"]);
        assert_eq!(r.moved('a', &"udp"), None);
        assert_eq!(r.serving(&'a'), 0);
        r.moved('a', &"r1");
        r.moved('a', &"udp");
        assert_eq!(r.serves(&"r1"), Some(&'a'), "it may come back to it");
        // A relay that ended is no relay.
        r.close(&"r2");
        assert_eq!(r.moved('a', &"r2"), None);
        assert_eq!(r.serving(&'a'), 1);
    }

    #[test]
    fn ended_relays_are_forgotten() {
        let mut r = relays(&["r1", "r2", "r3"]);
        r.moved('a', &"r1");
        r.moved('a', &"r2");
        assert_eq!(r.moved('a', &"r3"), Some("r1"));
        r.close(&"r1");
        r.close(&"r2");
        r.close(&"r2");
        r.close(&"r3");
        assert!(r.is_empty());
        // An address opened again serves no one, whomever it served.
        r.open("r1", "r1");
        r.moved('a', &"r1");
        r.open("r1", "r1'");
        assert_eq!(r.serving(&'a'), 0);
        r.close(&"r1");
        assert!(r.is_empty());
        // A limit of 0 is 1: the relay it is at.
        let mut one: Relays<&str, char, ()> = Relays::new(0);
        one.open("r1", ());
        one.open("r2", ());
        assert_eq!(one.moved('a', &"r1"), None);
        assert_eq!(one.moved('a', &"r2"), Some(()));
        assert_eq!(one.serves(&"r2"), Some(&'a'));
    }
}
