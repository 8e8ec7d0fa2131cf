//! Whether a peer's tunnel works both ways, from what arrives from it.
//!
//! Any authenticated datagram shows that the peer reaches this side, not that
//! this side reaches the peer. A node whose return path is broken (a NAT
//! mapping that lets its packets out but no answers in, a firewall that
//! drops them) still sends: handshake initiations every few seconds, once it
//! stops hearing its hub, and for up to three minutes the keepalives of the
//! session it had. A hub that counted those would keep routing requests down
//! a tunnel whose answers are lost.
//!
//! Two things prove the way back: a handshake response (this side's
//! initiation arrived and its answer came back), and a session datagram on
//! the session a response of this side opened (the peer got the response).
//! An answer is lost when the peer initiates again while it is still unused;
//! when [`UNCONFIRMED`] are lost in a row, the answers are not getting there.
//! Either proof ends that.
//!
//! The same holds the other way round: a side whose own initiations go
//! unanswered, [`UNCONFIRMED`] in a row with one more out, does not reach
//! the peer, whatever the peer still sends on a session it had (its
//! keepalives, data of a request in flight). Only a handshake response
//! ends that.
//!
//! Pure: the driver (`wg::device`) passes in each datagram it authenticated
//! and each response it sent; no clock, no socket.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// WireGuard message types (the first byte).
const INITIATION: u8 = 1;
const RESPONSE: u8 = 2;
const DATA: u8 = 4;

/// Answers to one peer's initiations lost in a row (the peer initiated again
/// while the answer was unused) after which its tunnel reads as down. A peer
/// confirms a response at once (its first session datagram, a keepalive
/// when it has nothing to send), within a round trip; it initiates again
/// only after 5 s without an answer (WireGuard's REKEY_TIMEOUT). One lost
/// datagram loses one answer; two in a row, 10 s apart, are a broken path.
pub const UNCONFIRMED: u64 = 2;

/// Whether an authenticated `datagram` shows that the path to its peer works
/// both ways on its own: anything but a handshake initiation, which a peer
/// sends again and again when this side's answers never reach it.
pub fn proves_two_way(datagram: &[u8]) -> bool {
    datagram.first() != Some(&INITIATION)
}

/// The receiver (type 4: data) or sender (type 2: response) index of a
/// message, bytes 4..8, little-endian.
fn index(message: &[u8], kind: u8) -> Option<u32> {
    if message.first() != Some(&kind) {
        return None;
    }
    let b: [u8; 4] = message.get(4..8)?.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

/// The state word of [`Answers`]: this side's index in the last response
/// (bits 0..32), whether that response is still unused (bit 32), and the
/// answers lost in a row before it (bits 33..).
const INDEX: u64 = 0xffff_ffff;
const PENDING: u64 = 1 << 32;
const LOST_SHIFT: u32 = 33;

fn lost(s: u64) -> u64 {
    s >> LOST_SHIFT
}

/// One peer's answered initiations, until it uses a session one opened.
/// One word, changed by compare-and-swap: the device's IPv4 and IPv6
/// receive loops may both be at it.
#[derive(Debug, Default)]
pub struct Answers {
    state: AtomicU64,
    /// This side's initiations sent since the last handshake response.
    initiations: AtomicU32,
}

impl Answers {
    /// Applies `f` to the state word until it sticks.
    fn update(&self, f: impl Fn(u64) -> u64) {
        let _ = self
            .state
            .fetch_update(Relaxed, Relaxed, |s| Some(f(s)).filter(|n| *n != s));
    }

    /// This side answered an initiation of the peer with `response`: an
    /// answer still unused before it is lost.
    pub fn answered(&self, response: &[u8]) {
        if let Some(i) = index(response, RESPONSE) {
            self.update(|s| {
                let lost = lost(s).saturating_add((s & PENDING) >> 32).min(UNCONFIRMED);
                (lost << LOST_SHIFT) | PENDING | u64::from(i)
            });
        }
    }

    /// An authenticated `datagram` arrived from the peer: a session datagram
    /// on the last answer's session, or a handshake response to this side's
    /// initiation, proves the way back.
    pub fn received(&self, datagram: &[u8]) {
        let response = datagram.first() == Some(&RESPONSE);
        if response {
            self.initiations.store(0, Relaxed);
        }
        // One load per data datagram; a swap only on the first of a session.
        let s = self.state.load(Relaxed);
        if s & !INDEX == 0 {
            return;
        }
        let proves = match index(datagram, DATA) {
            Some(i) => u64::from(i) == s & INDEX,
            None => response,
        };
        if proves {
            self.update(|s| s & INDEX);
            // The peer used this side's answer: the way to it works, so
            // this side's own initiations that went unanswered meanwhile
            // (the peer away, its address changed) are history. From here
            // this side may stay the responder for good and never see a
            // response again.
            self.initiations.store(0, Relaxed);
        }
    }

    /// Forgets everything: a new tunnel state for the peer.
    pub fn reset(&self) {
        self.state.store(0, Relaxed);
        self.initiations.store(0, Relaxed);
    }

    /// This side sent `n` handshake initiations to the peer's endpoint.
    /// (Not for a try of another path, such as a node on TLS trying UDP:
    /// an unanswered try says nothing of the path in use.)
    pub fn initiated(&self, n: u32) {
        if n > 0 {
            self.initiations.fetch_add(n, Relaxed);
        }
    }

    /// Whether fewer than [`UNCONFIRMED`] answers in a row were lost, and
    /// fewer than [`UNCONFIRMED`] of this side's initiations went
    /// unanswered before the one out now.
    pub fn confirmed(&self) -> bool {
        lost(self.state.load(Relaxed)) < UNCONFIRMED
            && u64::from(self.initiations.load(Relaxed)) <= UNCONFIRMED
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
pub(crate) mod tests {
    use super::*;
    use crate::keys::PrivateKey;
    use boringtun::noise::{Tunn, TunnResult};

    pub(crate) fn pair() -> (Tunn, Tunn) {
        let hub = PrivateKey::generate();
        let node = PrivateKey::generate();
        let h = Tunn::new(
            hub.secret(),
            node.public_key().as_x25519(),
            None,
            None,
            1 << 8,
            None,
        );
        let n = Tunn::new(
            node.secret(),
            hub.public_key().as_x25519(),
            None,
            None,
            2 << 8,
            None,
        );
        (h, n)
    }

    fn network(r: TunnResult<'_>) -> Vec<u8> {
        match r {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("expected a datagram, got {other:?}"),
        }
    }

    /// `from` handles `d`; returns what it sends back.
    pub(crate) fn exchange(to: &mut Tunn, d: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; 2048];
        network(to.decapsulate(None, d, &mut out))
    }

    /// A fresh handshake initiation from `n`.
    pub(crate) fn initiation(n: &mut Tunn) -> Vec<u8> {
        let mut out = vec![0u8; 2048];
        network(n.format_handshake_initiation(&mut out, true))
    }

    #[test]
    fn only_an_initiation_proves_nothing_back() {
        assert!(!proves_two_way(&[1, 0, 0, 0]));
        for t in [2u8, 4] {
            assert!(proves_two_way(&[t, 0, 0, 0]));
        }
        assert!(proves_two_way(&[]));
    }

    /// Through boringtun: the node's confirming keepalive, on the session
    /// the hub's response opened, confirms it.
    #[test]
    fn a_used_answer_confirms() {
        let (mut h, mut n) = pair();
        let a = Answers::default();
        let init = initiation(&mut n);
        assert!(!proves_two_way(&init));
        let resp = exchange(&mut h, &init);
        assert_eq!(resp[0], RESPONSE);
        a.answered(&resp);
        assert!(a.confirmed(), "an answer may still be on its way");
        let keepalive = exchange(&mut n, &resp);
        assert_eq!(keepalive[0], DATA);
        assert!(proves_two_way(&keepalive));
        a.received(&keepalive);
        assert!(a.confirmed());
        assert_eq!(a.state.load(Relaxed) & !INDEX, 0, "nothing pending");
    }

    /// Through boringtun: answers that never reach the node (it initiates
    /// again and again) are lost, even while the keepalives of its old
    /// session keep coming: two lost, the third answer out, it reads as
    /// unconfirmed; the first use of an answer's session ends it.
    #[test]
    fn lost_answers_are_unconfirmed_whatever_the_old_session_carries() {
        let (mut h, mut n) = pair();
        let a = Answers::default();
        // A working session first.
        let resp = exchange(&mut h, &initiation(&mut n));
        a.answered(&resp);
        let ka = exchange(&mut n, &resp);
        a.received(&ka);
        let mut out = vec![0u8; 2048];
        let _ = h.decapsulate(None, &ka, &mut out);
        // Now the hub's answers are lost: the node initiates three times.
        let old = network(n.encapsulate(&[], &mut out));
        assert_eq!(old[0], DATA);
        let mut last = Vec::new();
        for round in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(2));
            last = exchange(&mut h, &initiation(&mut n));
            a.answered(&last);
            // An old-session keepalive from the node: not a confirmation.
            a.received(&old);
            assert_eq!(a.confirmed(), round < 2, "after answer {}", round + 1);
        }
        // The path heals: the node gets the last answer and uses it.
        let confirm = exchange(&mut n, &last);
        a.received(&confirm);
        assert!(a.confirmed());
        assert_eq!(a.state.load(Relaxed) & !INDEX, 0);
    }

    /// One lost answer, then a used one: never unconfirmed.
    #[test]
    fn one_lost_answer_is_room_not_down() {
        let (mut h, mut n) = pair();
        let a = Answers::default();
        let lost = exchange(&mut h, &initiation(&mut n));
        a.answered(&lost);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let got = exchange(&mut h, &initiation(&mut n));
        a.answered(&got);
        assert!(a.confirmed(), "one lost, the next still on its way");
        a.received(&exchange(&mut n, &got));
        assert!(a.confirmed());
        assert_eq!(a.state.load(Relaxed) & !INDEX, 0);
    }

    /// Through boringtun: after lost answers, the hub's own initiation
    /// answered by the node proves the way back (from then on the hub may
    /// stay the initiator, and the node never uses an answer of the hub's).
    #[test]
    fn a_response_to_this_sides_initiation_proves_the_way_back() {
        let (mut h, mut n) = pair();
        let a = Answers::default();
        for _ in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(2));
            a.answered(&exchange(&mut h, &initiation(&mut n)));
        }
        assert!(!a.confirmed());
        std::thread::sleep(std::time::Duration::from_millis(2));
        let hub_init = initiation(&mut h);
        let node_resp = exchange(&mut n, &hub_init);
        assert_eq!(node_resp[0], RESPONSE);
        assert!(proves_two_way(&node_resp));
        a.received(&node_resp);
        assert!(a.confirmed());
    }

    /// Through boringtun: the node's initiations never reach the hub while
    /// the hub's datagrams of the session they had still reach the node.
    /// Two lost, the third out: unconfirmed; the hub's response to the
    /// next one ends it.
    #[test]
    fn unanswered_initiations_are_unconfirmed_whatever_the_peer_still_sends() {
        let (mut h, mut n) = pair();
        let a = Answers::default();
        let init = initiation(&mut n);
        a.initiated(1);
        let resp = exchange(&mut h, &init);
        a.received(&resp);
        let ka = exchange(&mut n, &resp);
        let mut out = vec![0u8; 2048];
        let _ = h.decapsulate(None, &ka, &mut out);
        assert!(a.confirmed());
        // The hub's keepalives of the session still arrive.
        let hub_ka = network(h.encapsulate(&[], &mut out));
        assert_eq!(hub_ka[0], DATA);
        for round in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(2));
            let _lost = initiation(&mut n);
            a.initiated(1);
            a.received(&hub_ka);
            assert_eq!(a.confirmed(), round < 2, "after initiation {}", round + 1);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
        let init = initiation(&mut n);
        a.initiated(1);
        a.received(&exchange(&mut h, &init));
        assert!(a.confirmed(), "a response ends it");
    }

    /// Through boringtun: the hub's initiations went unanswered while the
    /// node was away; the node comes back with a handshake of its own and
    /// uses the hub's answer. That proves the way to the node, although no
    /// initiation of the hub's is ever answered (the hub stays the
    /// responder).
    #[test]
    fn a_peer_that_uses_this_sides_answer_ends_unanswered_initiations() {
        let (mut h, mut n) = pair();
        let a = Answers::default();
        for _ in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(2));
            let _lost = initiation(&mut h);
            a.initiated(1);
        }
        assert!(!a.confirmed());
        std::thread::sleep(std::time::Duration::from_millis(2));
        let resp = exchange(&mut h, &initiation(&mut n));
        a.answered(&resp);
        assert!(!a.confirmed(), "not until the node uses the answer");
        a.received(&exchange(&mut n, &resp));
        assert!(a.confirmed());
        assert_eq!(a.initiations.load(Relaxed), 0);
        // And a reset forgets both counts.
        a.initiated(5);
        a.reset();
        assert!(a.confirmed());
    }

    /// One initiation lost on the way, the next answered: never unconfirmed.
    #[test]
    fn one_unanswered_initiation_is_room_not_down() {
        let (mut h, mut n) = pair();
        let a = Answers::default();
        let _lost = initiation(&mut n);
        a.initiated(1);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let init = initiation(&mut n);
        a.initiated(1);
        assert!(a.confirmed(), "one lost, the next still on its way");
        a.received(&exchange(&mut h, &init));
        assert!(a.confirmed());
        assert_eq!(a.initiations.load(Relaxed), 0);
    }

    #[test]
    fn short_or_other_messages_change_nothing() {
        let a = Answers::default();
        a.answered(&[2, 0, 0]);
        a.answered(&[4, 1, 0, 0, 9, 0, 0, 0]);
        assert_eq!(a.state.load(Relaxed), 0);
        for _ in 0..3 {
            a.answered(&[2, 0, 0, 0, 9, 0, 0, 0]);
        }
        assert!(!a.confirmed());
        a.received(&[4, 0, 0]);
        a.received(&[1, 0, 0, 0, 9, 0, 0, 0]);
        a.received(&[4, 0, 0, 0, 8, 0, 0, 0]);
        assert!(!a.confirmed());
        // Lost answers stop counting at the limit.
        for _ in 0..100 {
            a.answered(&[2, 0, 0, 0, 9, 0, 0, 0]);
        }
        assert_eq!(lost(a.state.load(Relaxed)), UNCONFIRMED);
        a.received(&[4, 0, 0, 0, 9, 0, 0, 0]);
        assert!(a.confirmed());
    }
}
