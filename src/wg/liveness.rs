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
//! When a peer's initiations are answered but the answers' sessions are never
//! used, [`UNCONFIRMED`] of them in a row, the answers are not getting there.
//!
//! Pure: the driver (`wg::device`) passes in each datagram it authenticated
//! and each response it sent; no clock, no socket.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

/// WireGuard message types (the first byte).
const INITIATION: u8 = 1;
const RESPONSE: u8 = 2;
const DATA: u8 = 4;

/// Answered initiations from one peer whose sessions it never used, in a
/// row, after which its tunnel reads as down. A peer confirms a response at
/// once (its first session datagram, a keepalive when it has nothing to
/// send), within a round trip; it initiates again only after 5 s without an
/// answer (WireGuard's REKEY_TIMEOUT). Two in a row leave room for one lost
/// datagram.
pub const UNCONFIRMED: u32 = 2;

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

/// One peer's answered initiations, until it uses a session one opened.
#[derive(Debug, Default)]
pub struct Answers {
    /// This side's index in the last response sent (0: none yet; boringtun's
    /// indexes carry the peer's slot in their upper bits, never 0 for a peer).
    last: AtomicU32,
    /// Responses sent since the peer last used the session of one.
    unconfirmed: AtomicU32,
}

impl Answers {
    /// This side answered an initiation of the peer with `response`.
    pub fn answered(&self, response: &[u8]) {
        if let Some(i) = index(response, RESPONSE) {
            self.last.store(i, Relaxed);
            self.unconfirmed.fetch_add(1, Relaxed);
        }
    }

    /// An authenticated `datagram` arrived from the peer.
    pub fn received(&self, datagram: &[u8]) {
        // One load per data datagram; a store only on the first of a session.
        if let Some(i) = index(datagram, DATA) {
            if i == self.last.load(Relaxed) && self.unconfirmed.load(Relaxed) != 0 {
                self.unconfirmed.store(0, Relaxed);
            }
        }
    }

    /// Whether the peer used the session of one of this side's last
    /// [`UNCONFIRMED`] answers (or was never answered).
    pub fn confirmed(&self) -> bool {
        self.unconfirmed.load(Relaxed) < UNCONFIRMED
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;
    use boringtun::noise::{Tunn, TunnResult};

    fn pair() -> (Tunn, Tunn) {
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
    fn exchange(to: &mut Tunn, d: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; 2048];
        network(to.decapsulate(None, d, &mut out))
    }

    fn initiation(n: &mut Tunn) -> Vec<u8> {
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
        assert!(a.confirmed(), "one answer may still be on its way");
        let keepalive = exchange(&mut n, &resp);
        assert_eq!(keepalive[0], DATA);
        assert!(proves_two_way(&keepalive));
        a.received(&keepalive);
        assert!(a.confirmed());
        assert_eq!(a.unconfirmed.load(Relaxed), 0);
    }

    /// Through boringtun: answers that never reach the node (it initiates
    /// again and again) read as unconfirmed, even while the keepalives of
    /// its old session keep coming; the first use of a new answer's session
    /// ends it.
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
        // Now the hub's answers are lost: the node initiates twice more.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let lost1 = exchange(&mut h, &initiation(&mut n));
        a.answered(&lost1);
        assert!(a.confirmed());
        // An old-session keepalive from the node: not a confirmation.
        let old = network(n.encapsulate(&[], &mut out));
        assert_eq!(old[0], DATA);
        a.received(&old);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let lost2 = exchange(&mut h, &initiation(&mut n));
        a.answered(&lost2);
        a.received(&old);
        assert!(!a.confirmed(), "two answers in a row unused");
        // The path heals: the node gets the last answer and uses it.
        let confirm = exchange(&mut n, &lost2);
        a.received(&confirm);
        assert!(a.confirmed());
    }

    #[test]
    fn short_or_other_messages_change_nothing() {
        let a = Answers::default();
        a.answered(&[2, 0, 0]);
        a.answered(&[4, 1, 0, 0, 9, 0, 0, 0]);
        assert_eq!(a.unconfirmed.load(Relaxed), 0);
        a.answered(&[2, 0, 0, 0, 9, 0, 0, 0]);
        a.answered(&[2, 0, 0, 0, 9, 0, 0, 0]);
        assert!(!a.confirmed());
        a.received(&[4, 0, 0]);
        a.received(&[1, 0, 0, 0, 9, 0, 0, 0]);
        a.received(&[4, 0, 0, 0, 8, 0, 0, 0]);
        assert!(!a.confirmed());
        a.received(&[4, 0, 0, 0, 9, 0, 0, 0]);
        assert!(a.confirmed());
    }
}
