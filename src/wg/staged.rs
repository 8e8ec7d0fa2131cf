//! Packets held for a peer that has no session, until a handshake gives it
//! one (kernel WireGuard's staged queue): the first packets of a
//! conversation after a quiet spell are not lost to the handshake.
//!
//! boringtun's `Tunn` would keep them itself, copied into a queue of up to
//! 256 packets of any size per peer, dropped without a word when full or
//! 90 s later. The device never hands it a packet without a session
//! (`Peer::seal`); they come here instead, bounded: at most [`PACKETS`] a
//! peer and [`PACKETS`] times the MTU of bytes, held [`HOLD_MS`] at most,
//! and all peers together within the device's [`Pool`], but for one packet
//! of at most the MTU for a peer that holds none (peers that fill the pool
//! never starve another's first packet). Whatever is not
//! held, or is given up, is counted as `no_session`: a packet given to
//! [`Staged::push`] is either taken back by [`Staged::pop`] or counted.

use crate::wg::device::{DropCounters, DropReason};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Most packets held per peer (the newest: a full queue lets its oldest go).
pub const PACKETS: usize = 8;
/// How long a packet is held, at most (a lost initiation is sent again
/// after 5 s).
pub const HOLD_MS: u64 = 10_000;
/// Most bytes held for all the device's peers together.
pub const DEVICE_BYTES: usize = 1 << 20;

/// The bytes all of a device's peers may hold, and the counters of what
/// is given up.
pub struct Pool {
    used: AtomicUsize,
    limit: usize,
    /// Most bytes per peer.
    peer_limit: usize,
    drops: Arc<DropCounters>,
}

impl Pool {
    /// A pool of `limit` bytes, `peer_limit` of them at most per peer.
    pub fn new(limit: usize, peer_limit: usize, drops: Arc<DropCounters>) -> Self {
        Pool {
            used: AtomicUsize::new(0),
            limit,
            peer_limit,
            drops,
        }
    }

    /// The pool for a device whose MTU is `mtu`.
    pub fn for_mtu(mtu: u16, drops: Arc<DropCounters>) -> Self {
        Self::new(DEVICE_BYTES, PACKETS * usize::from(mtu), drops)
    }

    /// Bytes held now, all peers together, but for the packets held past
    /// the pool ([`Staged::push`]).
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                u.checked_add(n).filter(|t| *t <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        // Never below zero, whatever the caller.
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(n))
            });
    }

    fn lost(&self, n: usize) {
        self.drops.add(DropReason::NoSession, n as u64);
    }
}

struct Held {
    /// When it was staged (milliseconds since the device started).
    at_ms: u64,
    pkt: Box<[u8]>,
}

#[derive(Default)]
struct Queue {
    held: VecDeque<Held>,
    bytes: usize,
    /// The oldest packet is held past the pool (its bytes are not the
    /// pool's).
    past: bool,
}

impl Queue {
    /// The oldest packet, no longer held: its bytes go back to `pool`.
    fn pop_front(&mut self, pool: &Pool) -> Option<Held> {
        let h = self.held.pop_front()?;
        self.bytes -= h.pkt.len();
        if !std::mem::take(&mut self.past) {
            pool.give(h.pkt.len());
        }
        Some(h)
    }
}

/// One peer's staged packets.
pub struct Staged {
    pool: Arc<Pool>,
    queue: Mutex<Queue>,
    /// Packets held, read without the lock (every datagram looks).
    len: AtomicUsize,
}

impl Staged {
    pub fn new(pool: Arc<Pool>) -> Self {
        Staged {
            pool,
            queue: Mutex::new(Queue::default()),
            len: AtomicUsize::new(0),
        }
    }

    /// Whether anything is held.
    #[inline]
    pub fn pending(&self) -> bool {
        self.len.load(Ordering::Relaxed) > 0
    }

    /// Packets held.
    pub fn packets(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.queue.lock().bytes
    }

    /// Holds a copy of `pkt`, staged at `now_ms`, letting the peer's oldest
    /// go if its share is full; whether it is held (if not, it is counted).
    /// A peer that holds nothing holds a packet of at most the MTU even when
    /// the pool is full, past it: one a peer, so all peers together hold
    /// at most the pool plus an MTU each.
    pub fn push(&self, pkt: &[u8], now_ms: u64) -> bool {
        let n = pkt.len();
        if n > self.pool.peer_limit {
            self.pool.lost(1);
            return false;
        }
        let mut q = self.queue.lock();
        let mut lost = 0;
        while q.held.len() >= PACKETS || q.bytes + n > self.pool.peer_limit {
            if q.pop_front(&self.pool).is_none() {
                break;
            }
            lost += 1;
        }
        let mut held = self.pool.take(n);
        if !held && q.held.is_empty() && n <= self.pool.peer_limit / PACKETS {
            q.past = true;
            held = true;
        }
        if held {
            q.held.push_back(Held {
                at_ms: now_ms,
                pkt: pkt.into(),
            });
            q.bytes += n;
        } else {
            lost += 1;
        }
        self.len.store(q.held.len(), Ordering::Relaxed);
        drop(q);
        self.pool.lost(lost);
        held
    }

    /// The oldest packet held, no longer held.
    pub fn pop(&self) -> Option<Box<[u8]>> {
        let mut q = self.queue.lock();
        let h = q.pop_front(&self.pool)?;
        self.len.store(q.held.len(), Ordering::Relaxed);
        Some(h.pkt)
    }

    /// Gives up (and counts) the packets held for [`HOLD_MS`] or longer at
    /// `now_ms`: no handshake came in time.
    pub fn expire(&self, now_ms: u64) {
        if !self.pending() {
            return;
        }
        let mut q = self.queue.lock();
        let mut lost = 0;
        while q
            .held
            .front()
            .is_some_and(|h| now_ms.saturating_sub(h.at_ms) >= HOLD_MS)
        {
            if q.pop_front(&self.pool).is_some() {
                lost += 1;
            }
        }
        self.len.store(q.held.len(), Ordering::Relaxed);
        drop(q);
        self.pool.lost(lost);
    }
}

impl Drop for Staged {
    /// A peer removed with packets held: they are given up, and counted.
    fn drop(&mut self) {
        let q = self.queue.get_mut();
        let n = q.held.len();
        while q.pop_front(&self.pool).is_some() {}
        self.pool.lost(n);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pool(limit: usize, peer_limit: usize) -> (Arc<Pool>, Arc<DropCounters>) {
        let d = Arc::new(DropCounters::default());
        (Arc::new(Pool::new(limit, peer_limit, Arc::clone(&d))), d)
    }

    fn lost(d: &DropCounters) -> u64 {
        d.get(DropReason::NoSession)
    }

    #[test]
    fn a_peer_holds_its_newest_few_and_counts_the_rest() {
        let (p, d) = pool(1 << 20, PACKETS * 1500);
        let s = Staged::new(Arc::clone(&p));
        for i in 0..20u8 {
            assert!(s.push(&[i; 1000], 0));
        }
        assert_eq!(s.packets(), PACKETS);
        assert_eq!(s.bytes(), PACKETS * 1000);
        assert_eq!(p.used(), PACKETS * 1000);
        assert_eq!(lost(&d), (20 - PACKETS) as u64);
        // The newest, oldest first.
        let first = s.pop().unwrap();
        assert_eq!(first[0], 20 - PACKETS as u8);
        while s.pop().is_some() {}
        assert!(!s.pending());
        assert_eq!(p.used(), 0);
        assert_eq!(lost(&d), (20 - PACKETS) as u64, "taken back: not lost");
    }

    #[test]
    fn a_peers_share_is_bytes_too() {
        let (p, d) = pool(1 << 20, 3000);
        let s = Staged::new(Arc::clone(&p));
        assert!(s.push(&[0; 1400], 0));
        assert!(s.push(&[1; 1400], 0));
        // Past the share: the oldest makes room.
        assert!(s.push(&[2; 1400], 0));
        assert_eq!((s.packets(), s.bytes()), (2, 2800));
        assert_eq!(lost(&d), 1);
        // Larger than the share: never held, nothing else lost.
        assert!(!s.push(&[3; 3001], 0));
        assert_eq!((s.packets(), lost(&d)), (2, 2));
        assert_eq!(s.pop().unwrap()[0], 1);
    }

    #[test]
    fn the_device_budget_bounds_all_peers_together() {
        let (p, d) = pool(10_000, 8000);
        let peers: Vec<Staged> = (0..5).map(|_| Staged::new(Arc::clone(&p))).collect();
        let mut held = 0;
        for s in &peers {
            for _ in 0..PACKETS {
                if s.push(&[0; 1000], 0) {
                    held += 1;
                }
            }
        }
        // Ten within the budget, and one each past it for the three peers
        // that found it full holding nothing.
        assert_eq!(held, 13);
        assert_eq!(p.used(), 10_000);
        assert_eq!(lost(&d), (5 * PACKETS - 13) as u64);
        // What a peer lets go is another's to take.
        assert!(peers[0].pop().is_some());
        assert!(peers[4].push(&[0; 1000], 0));
        assert!(!peers[4].push(&[0; 1000], 0));
        assert_eq!(p.used(), 10_000);
        assert_eq!(peers[4].packets(), 2);
        // A peer removed gives its bytes back; its packets count as lost.
        let before = lost(&d);
        drop(peers);
        assert_eq!(p.used(), 0);
        assert_eq!(lost(&d), before + 13);
    }

    /// Peers that keep the pool full never starve another's first packet:
    /// a peer holding nothing holds one (of at most the MTU) past the
    /// limit, one only; whatever else finds the pool full is counted.
    #[test]
    fn a_full_pool_still_holds_a_quiet_peers_first_packet() {
        let mtu = 1000;
        let (p, d) = pool(10 * mtu, PACKETS * mtu);
        let busy: Vec<Staged> = (0..2).map(|_| Staged::new(Arc::clone(&p))).collect();
        for s in &busy {
            for _ in 0..PACKETS {
                s.push(&[0; 1000], 0);
            }
        }
        assert_eq!(p.used(), 10 * mtu);
        let filled = lost(&d);
        let quiet = Staged::new(Arc::clone(&p));
        assert!(
            !quiet.push(&[1; 1001], 0),
            "past the MTU: never past the pool"
        );
        assert_eq!(lost(&d), filled + 1);
        assert!(quiet.push(&[1; 1000], 0));
        assert_eq!((quiet.bytes(), p.used()), (mtu, 10 * mtu));
        // One only: the next waits for room, counted meanwhile.
        assert!(!quiet.push(&[2; 1000], 0));
        assert_eq!((quiet.packets(), lost(&d)), (1, filled + 2));
        // A busy peer's next still takes the room its oldest leaves.
        assert!(busy[0].push(&[3; 1000], 0));
        assert_eq!((p.used(), lost(&d)), (10 * mtu, filled + 3));
        // Taken back or given up, the one past the pool leaves it as it was.
        assert_eq!(quiet.pop().unwrap()[0], 1);
        assert_eq!(p.used(), 10 * mtu);
        assert!(quiet.push(&[4; 1000], 0));
        quiet.expire(HOLD_MS);
        assert_eq!((quiet.packets(), lost(&d)), (0, filled + 4));
        assert_eq!(p.used(), 10 * mtu);
        assert!(quiet.push(&[5; 1000], 0));
        drop(busy);
        assert_eq!(p.used(), 0);
        drop(quiet);
        assert_eq!(p.used(), 0);
        // The ten the busy peers held, and the quiet one's last.
        assert_eq!(lost(&d), filled + 4 + 10 + 1);
    }

    #[test]
    fn packets_not_sent_in_time_are_given_up() {
        let (p, d) = pool(1 << 20, PACKETS * 1500);
        let s = Staged::new(Arc::clone(&p));
        s.push(&[0; 100], 1000);
        s.push(&[1; 100], 5000);
        s.expire(1000 + HOLD_MS - 1);
        assert_eq!((s.packets(), lost(&d)), (2, 0));
        s.expire(1000 + HOLD_MS);
        assert_eq!((s.packets(), lost(&d)), (1, 1));
        assert_eq!(p.used(), 100);
        s.expire(u64::MAX);
        assert_eq!((s.packets(), lost(&d), p.used()), (0, 2, 0));
    }
}
