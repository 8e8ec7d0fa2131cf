//! Sealed PROXY headers between hubs (pure): with a mesh secret
//! (`[mesh] secret_file`), the PROXY v2 header a hub writes before a
//! connection it sends to another hub ends in a TLV that carries the time, a
//! nonce and an HMAC-SHA256 under the secret of everything before the MAC
//! and of the receiving hub's mesh name (`[mesh] name`).
//! A hub that has the secret takes such a header from any address, so hubs
//! go on serving each other's connections when one of them has lost etcd and
//! its record has gone from the others' tables. The name binds a seal to the
//! hub it was made for: a header copied on its way to one hub does not
//! verify at another (each hub remembers only the seals it took itself). It
//! is the name, not an address, because a hub behind 1:1 NAT does not see
//! the address the sender connected to. No I/O, no clock: the caller passes
//! `now` (Unix seconds) and the nonce.
//!
//! Layout of the TLV (type [`TLV_TYPE`], in the PROXY v2 range for custom
//! use), always the last 52 bytes of the header and its only TLV but for an
//! acknowledgement request ([`super::ack::REQUEST`]) right before it, which
//! the MAC then covers:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | type `0xE7` |
//! | 2 | length 49, big-endian |
//! | 1 | version 2 |
//! | 8 | Unix time in seconds, big-endian |
//! | 8 | nonce |
//! | 32 | HMAC-SHA256 of all the header's bytes before it, then [`TO_LABEL`], the receiving hub's name's length (8 bytes, big-endian) and the name |
//!
//! The name is not on the wire: the receiver puts its own in. Version 1
//! (the MAC over the header's bytes alone, bound to no hub) is refused, so
//! every hub of a mesh with a secret must run a gatewire that seals with
//! version 2.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::ack::REQUEST;
use crate::proxy::proxy_protocol::{decode_v2, encode_v2, Command, Transport};
use ring::hmac;
use std::collections::HashSet;
use std::net::SocketAddr;

/// The TLV type of a seal.
pub const TLV_TYPE: u8 = 0xE7;
/// The seal format.
pub const SEAL_VERSION: u8 = 2;
/// What the MAC covers after the header's bytes, before the receiving hub's
/// name: keeps the name apart from anything else the secret signs.
pub const TO_LABEL: &[u8] = b"gatewire mesh seal v2, for hub:";
/// The TLV's value length.
const TLV_VALUE_LEN: usize = 1 + 8 + 8 + 32;
/// The whole TLV.
pub const TLV_LEN: usize = 3 + TLV_VALUE_LEN;
/// How far a seal's time may be from the receiver's clock.
pub const MAX_SKEW_SECS: u64 = 60;
/// Shortest secret accepted.
pub const MIN_SECRET: usize = 32;

/// The mesh secret as an HMAC key. `Debug` shows nothing of it.
#[derive(Clone)]
pub struct SealKey(hmac::Key);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl SealKey {
    /// The key for `secret` (at least [`MIN_SECRET`] bytes).
    pub fn new(secret: &[u8]) -> Result<SealKey, String> {
        if secret.len() < MIN_SECRET {
            return Err(format!(
                "the mesh secret has {} bytes; at least {MIN_SECRET} are needed",
                secret.len()
            ));
        }
        Ok(SealKey(hmac::Key::new(hmac::HMAC_SHA256, secret)))
    }
}

/// Why a header's seal does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("not a PROXY v2 header with addresses")]
    NotProxy,
    #[error("no seal")]
    Missing,
    #[error("seal version {v}; this hub takes version {SEAL_VERSION} only ({hint})", v = .0, hint = version_hint(.0))]
    Version(u8),
    #[error("seal made at {at}, {skew} s from this hub's clock (at most {MAX_SKEW_SECS})")]
    Time { at: u64, skew: u64 },
    /// The MAC does not hold: a seal under another secret and one made
    /// for another hub look the same to the receiver.
    #[error(
        "seal does not match (another secret, a seal made for another hub, or changed on the way)"
    )]
    Mac,
    #[error("seal seen before (a replayed header)")]
    Replayed,
    /// Made before this hub started: the seals taken before are forgotten
    /// with the process, so one of them could be a copy.
    #[error("seal made at {0}, before this hub started at {1} (a replayed header, or the sending hub's clock behind)")]
    BeforeStart(u64, u64),
}

/// What a seal's version says about the hub that sent it.
fn version_hint(v: &u8) -> String {
    if *v < SEAL_VERSION {
        format!("the sending hub runs an older gatewire: every hub of the mesh must run one that seals with version {SEAL_VERSION}")
    } else {
        "the sending hub runs a newer gatewire".to_string()
    }
}

/// What the MAC of a seal covers: `head` (the header's bytes before the
/// MAC), [`TO_LABEL`], the length of `to` (8 bytes, big-endian) and `to`,
/// the mesh name of the hub the header is for.
fn signed(head: &[u8], to: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(head.len() + TO_LABEL.len() + 8 + to.len());
    m.extend_from_slice(head);
    m.extend_from_slice(TO_LABEL);
    m.extend_from_slice(&u64::try_from(to.len()).unwrap_or(u64::MAX).to_be_bytes());
    m.extend_from_slice(to.as_bytes());
    m
}

/// Remembers the seals taken in the last [`REMEMBER_SECS`] (at least), so a
/// header copied off the wire cannot be used again while its time is still
/// within [`MAX_SKEW_SECS`]. Two generations of seals, each at most `cap`.
#[derive(Debug)]
pub struct ReplayGuard {
    cap: usize,
    started: u64,
    current: HashSet<u128>,
    previous: HashSet<u128>,
}

/// How long a generation of remembered seals lasts: a seal is refused when
/// its time is more than [`MAX_SKEW_SECS`] away, so it need not be
/// remembered longer than twice that after it arrived.
pub const REMEMBER_SECS: u64 = 2 * MAX_SKEW_SECS;

/// What [`ReplayGuard::admit`] says about a seal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Not seen before; remembered now.
    New,
    /// Seen before.
    Replayed,
    /// Not seen before, but the guard is full: taken without being
    /// remembered (the hubs send more than it holds).
    Full,
}

impl ReplayGuard {
    /// A guard that remembers at most `cap` seals per generation.
    pub fn new(cap: usize) -> ReplayGuard {
        ReplayGuard {
            cap,
            started: 0,
            current: HashSet::new(),
            previous: HashSet::new(),
        }
    }

    /// Whether the seal `id` ([`seal_id`]) arriving at `now` is new.
    ///
    /// A `now` a little before the generation's start (two connections
    /// checked at once across a second's edge, or the clock stepped back a
    /// little) counts as the start: forgetting the remembered seals then
    /// would let them be taken again while their times are still valid.
    /// Only a clock stepped back by more than [`REMEMBER_SECS`], after which
    /// every remembered seal's time is out of the window, starts afresh.
    pub fn admit(&mut self, id: u128, now: u64) -> Admit {
        let back = now.saturating_add(REMEMBER_SECS) < self.started;
        let now = if back { now } else { now.max(self.started) };
        if back || now >= self.started.saturating_add(REMEMBER_SECS) {
            // A generation is over: the older one goes, unless the gap is
            // so long (or the clock went so far back) that both are stale.
            let stale = back || now >= self.started.saturating_add(2 * REMEMBER_SECS);
            self.previous = if stale {
                HashSet::new()
            } else {
                std::mem::take(&mut self.current)
            };
            self.current.clear();
            self.started = now;
        }
        if self.current.contains(&id) || self.previous.contains(&id) {
            return Admit::Replayed;
        }
        if self.current.len() >= self.cap {
            return Admit::Full;
        }
        self.current.insert(id);
        Admit::New
    }
}

/// The time a seal says it was made (Unix seconds); only worth reading once
/// [`verify`] has taken it.
pub fn sealed_at(header: &[u8]) -> Option<u64> {
    let tlv = header.get(header.len().checked_sub(TLV_LEN)?..)?;
    Some(u64::from_be_bytes(tlv.get(4..12)?.try_into().ok()?))
}

/// What tells one seal from another: the first 16 bytes of its MAC.
pub fn seal_id(header: &[u8]) -> Option<u128> {
    let mac = header.get(header.len().checked_sub(32)?..)?;
    Some(u128::from_be_bytes(mac.get(..16)?.try_into().ok()?))
}

/// A PROXY v2 header for a TCP connection from `src` to `dst`, sealed with
/// `key` for the hub named `to` (its `[mesh] name`) at `now` (Unix seconds)
/// with `nonce`; with an acknowledgement request when `ack`.
pub fn seal(
    key: &SealKey,
    to: &str,
    src: SocketAddr,
    dst: SocketAddr,
    now: u64,
    nonce: [u8; 8],
    ack: bool,
) -> Vec<u8> {
    let mut h = Vec::with_capacity(16 + 36 + REQUEST.len() + TLV_LEN);
    encode_v2(&mut h, Transport::Tcp, src, dst);
    if ack {
        h.extend_from_slice(&REQUEST);
    }
    // The header's length (bytes 14 and 15) takes the TLV in.
    let body = h.len().saturating_sub(16) + TLV_LEN;
    let len = u16::try_from(body).unwrap_or(u16::MAX).to_be_bytes();
    if let Some(l) = h.get_mut(14..16) {
        l.copy_from_slice(&len);
    }
    h.push(TLV_TYPE);
    h.extend_from_slice(&(TLV_VALUE_LEN as u16).to_be_bytes());
    h.push(SEAL_VERSION);
    h.extend_from_slice(&now.to_be_bytes());
    h.extend_from_slice(&nonce);
    let tag = hmac::sign(&key.0, &signed(&h, to));
    h.extend_from_slice(tag.as_ref());
    h
}

/// Whether `header` (one whole PROXY v2 header) ends in a seal TLV, sound
/// or not.
pub fn carries_seal(header: &[u8]) -> bool {
    header.len() >= 16 + 12 + TLV_LEN && header.get(header.len() - TLV_LEN) == Some(&TLV_TYPE)
}

/// Checks the seal of `header` (one whole PROXY v2 header, as long as its
/// length field says) at `now`, at the hub named `me` (its `[mesh] name`);
/// the client and destination it names.
pub fn verify(
    key: &SealKey,
    me: &str,
    header: &[u8],
    now: u64,
) -> Result<(SocketAddr, SocketAddr), SealError> {
    let d = decode_v2(header).map_err(|_| SealError::NotProxy)?;
    let Command::Proxy { src, dst, .. } = d.command else {
        return Err(SealError::NotProxy);
    };
    if d.len != header.len() {
        return Err(SealError::NotProxy);
    }
    // The addresses, then the seal, with at most an acknowledgement request
    // between.
    let addr_len = if src.is_ipv4() && dst.is_ipv4() {
        12
    } else {
        36
    };
    let tlv_at = header
        .len()
        .checked_sub(TLV_LEN)
        .filter(|&at| at >= 16 + addr_len)
        .ok_or(SealError::Missing)?;
    match header.get(16 + addr_len..tlv_at) {
        Some([]) => {}
        Some(between) if between == REQUEST => {}
        _ => return Err(SealError::Missing),
    }
    let tlv = header.get(tlv_at..).ok_or(SealError::Missing)?;
    let (head, mac) = header.split_at(header.len() - 32);
    match tlv {
        [TLV_TYPE, 0, l, version, rest @ ..] if usize::from(*l) == TLV_VALUE_LEN => {
            if *version != SEAL_VERSION {
                return Err(SealError::Version(*version));
            }
            let at = rest
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .ok_or(SealError::Missing)?;
            let skew = now.abs_diff(at);
            // The MAC first: a time is only news when the seal is genuine.
            hmac::verify(&key.0, &signed(head, me), mac).map_err(|_| SealError::Mac)?;
            if skew > MAX_SKEW_SECS {
                return Err(SealError::Time { at, skew });
            }
            Ok((src, dst))
        }
        _ => Err(SealError::Missing),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: u8) -> SealKey {
        SealKey::new(&[b; 32]).unwrap()
    }
    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A version 1 seal, as older hubs made it: the MAC over the header's
    /// bytes alone.
    fn seal_v1(key: &SealKey, src: SocketAddr, dst: SocketAddr, now: u64) -> Vec<u8> {
        let mut h = Vec::new();
        encode_v2(&mut h, Transport::Tcp, src, dst);
        let body = (h.len() - 16 + TLV_LEN) as u16;
        h[14..16].copy_from_slice(&body.to_be_bytes());
        h.push(TLV_TYPE);
        h.extend_from_slice(&49u16.to_be_bytes());
        h.push(1);
        h.extend_from_slice(&now.to_be_bytes());
        h.extend_from_slice(&[4; 8]);
        let tag = hmac::sign(&key.0, &h);
        h.extend_from_slice(tag.as_ref());
        h
    }

    #[test]
    fn a_sealed_header_is_a_proxy_header_and_verifies() {
        let (src, dst) = (sa("198.51.100.7:40000"), sa("203.0.113.1:443"));
        let h = seal(&key(1), "a", src, dst, 1_000_000, [9; 8], false);
        assert_eq!(h.len(), 16 + 12 + TLV_LEN);
        assert_eq!(h[16 + 12 + 3], SEAL_VERSION);
        // Any PROXY v2 reader sees the addresses (and skips the TLV).
        let d = decode_v2(&h).unwrap();
        assert_eq!(d.len, h.len());
        assert!(matches!(d.command, Command::Proxy { src: s, dst: t, .. } if s == src && t == dst));
        assert_eq!(verify(&key(1), "a", &h, 1_000_000), Ok((src, dst)));
        assert_eq!(verify(&key(1), "a", &h, 1_000_060), Ok((src, dst)));
        assert_eq!(verify(&key(1), "a", &h, 999_940), Ok((src, dst)));
        let v6 = seal(&key(1), "a", sa("[2001:db8::7]:1"), dst, 5, [0; 8], false);
        assert_eq!(v6.len(), 16 + 36 + TLV_LEN);
        assert!(verify(&key(1), "a", &v6, 5).is_ok());
    }

    #[test]
    fn the_wire_format_is_pinned() {
        // Made independently (Python's hmac) from the layout in the module
        // documentation: other hubs, and other tools, compute the same.
        let h = seal(
            &key(1),
            "hub-a",
            sa("198.51.100.7:40000"),
            sa("203.0.113.1:443"),
            1_000_000,
            [9; 8],
            false,
        );
        let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "0d0a0d0a000d0a515549540a21110040c6336407cb0071019c4001bb\
             e700310200000000000f42400909090909090909\
             6a6ae400cbe2c4d01d4995b7f411c3bc2a7f63d35a0bbf7b6ffb23775a183843"
        );
    }

    #[test]
    fn an_acknowledgement_request_is_sealed_with_the_header() {
        let (src, dst) = (sa("198.51.100.7:40000"), sa("203.0.113.1:443"));
        let h = seal(&key(1), "hub-a", src, dst, 1_000_000, [9; 8], true);
        // Made independently (Python's hmac), as the pinned vector above.
        let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "0d0a0d0a000d0a515549540a21110044c6336407cb0071019c4001bb\
             e8000101\
             e700310200000000000f42400909090909090909\
             270d680c605c0ffc35c367d61a65df0fe9ddae0cd12ee28c1ce804f965df9d6d"
        );
        assert_eq!(verify(&key(1), "hub-a", &h, 1_000_000), Ok((src, dst)));
        assert!(carries_seal(&h));
        assert_eq!(crate::mesh::ack::requested(&h), Ok(true));
        let plain = seal(&key(1), "hub-a", src, dst, 1_000_000, [9; 8], false);
        assert_eq!(crate::mesh::ack::requested(&plain), Ok(false));
        // The request taken out (the length put right), or put into a seal
        // made without it: the MAC no longer holds.
        let mut cut = h.clone();
        cut.drain(28..32);
        cut[15] -= 4;
        assert_eq!(
            verify(&key(1), "hub-a", &cut, 1_000_000),
            Err(SealError::Mac)
        );
        let mut added = plain.clone();
        added.splice(28..28, crate::mesh::ack::REQUEST);
        added[15] += 4;
        assert_eq!(
            verify(&key(1), "hub-a", &added, 1_000_000),
            Err(SealError::Mac)
        );
        // Any other TLV before the seal: no seal this hub takes.
        let mut other = plain.clone();
        other.splice(28..28, [0x04, 0, 1, 1]);
        other[15] += 4;
        assert_eq!(
            verify(&key(1), "hub-a", &other, 1_000_000),
            Err(SealError::Missing)
        );
        let v6 = seal(&key(1), "a", sa("[2001:db8::7]:1"), dst, 5, [0; 8], true);
        assert_eq!(v6.len(), 16 + 36 + 4 + TLV_LEN);
        assert!(verify(&key(1), "a", &v6, 5).is_ok());
    }

    #[test]
    fn a_seal_holds_only_at_the_hub_it_was_made_for() {
        let (src, dst) = (sa("198.51.100.7:40000"), sa("203.0.113.1:443"));
        let h = seal(&key(1), "hub-a", src, dst, 1_000_000, [9; 8], false);
        assert_eq!(verify(&key(1), "hub-a", &h, 1_000_000), Ok((src, dst)));
        // The same bytes at another hub: refused like another secret's.
        for other in ["hub-b", "hub-ab", "hub-", "HUB-A", ""] {
            assert_eq!(
                verify(&key(1), other, &h, 1_000_000),
                Err(SealError::Mac),
                "{other}"
            );
        }
        // The name is in the MAC only: the header is as long as ever, and
        // one made for another hub differs in nothing but the MAC.
        let b = seal(&key(1), "hub-b", src, dst, 1_000_000, [9; 8], false);
        assert_eq!(b.len(), h.len());
        assert_eq!(b[..b.len() - 32], h[..h.len() - 32]);
        assert_ne!(b[b.len() - 32..], h[h.len() - 32..]);
        assert_eq!(verify(&key(1), "hub-b", &b, 1_000_000), Ok((src, dst)));
        assert!(SealError::Mac.to_string().contains("made for another hub"));
    }

    #[test]
    fn a_version_1_seal_is_refused_for_its_version() {
        let (src, dst) = (sa("198.51.100.7:40000"), sa("203.0.113.1:443"));
        let old = seal_v1(&key(1), src, dst, 1_000_000);
        // A genuine seal of an older hub: its layout is the same ...
        assert_eq!(
            old.len(),
            seal(&key(1), "a", src, dst, 1, [0; 8], false).len()
        );
        assert!(carries_seal(&old));
        // ... but it is bound to no hub, so it is not taken, whatever the
        // name or the secret.
        for me in ["a", "b"] {
            assert_eq!(
                verify(&key(1), me, &old, 1_000_000),
                Err(SealError::Version(1))
            );
        }
        assert_eq!(
            verify(&key(2), "a", &old, 1_000_000),
            Err(SealError::Version(1))
        );
        let e = SealError::Version(1).to_string();
        assert!(
            e.contains("version 1") && e.contains("older gatewire"),
            "{e}"
        );
        let e = SealError::Version(3).to_string();
        assert!(
            e.contains("version 3") && e.contains("newer gatewire"),
            "{e}"
        );
    }

    #[test]
    fn every_fault_is_named() {
        let (src, dst) = (sa("198.51.100.7:40000"), sa("203.0.113.1:443"));
        let h = seal(&key(1), "a", src, dst, 1_000_000, [9; 8], false);
        assert_eq!(verify(&key(2), "a", &h, 1_000_000), Err(SealError::Mac));
        assert_eq!(
            verify(&key(1), "a", &h, 1_000_061),
            Err(SealError::Time {
                at: 1_000_000,
                skew: 61
            })
        );
        // A forged seal is refused for its MAC, whatever its time.
        assert_eq!(verify(&key(2), "a", &h, 5), Err(SealError::Mac));
        // So is one made for another hub.
        assert_eq!(verify(&key(1), "b", &h, 5), Err(SealError::Mac));
        // Another client address in the same seal.
        let mut other = h.clone();
        other[16] ^= 1;
        assert_eq!(verify(&key(1), "a", &other, 1_000_000), Err(SealError::Mac));
        let mut plain = Vec::new();
        encode_v2(&mut plain, Transport::Tcp, src, dst);
        assert_eq!(verify(&key(1), "a", &plain, 0), Err(SealError::Missing));
        assert!(!carries_seal(&plain) && carries_seal(&h));
        for version in [0, 1, 3] {
            let mut v = h.clone();
            v[16 + 12 + 3] = version;
            assert_eq!(
                verify(&key(1), "a", &v, 1_000_000),
                Err(SealError::Version(version))
            );
        }
        assert_eq!(
            verify(&key(1), "a", b"GET / HTTP/1.1\r\n", 0),
            Err(SealError::NotProxy)
        );
        assert_eq!(
            verify(&key(1), "a", &h[..h.len() - 1], 0),
            Err(SealError::NotProxy)
        );
        assert!(SealKey::new(b"short").is_err());
        assert_eq!(format!("{:?}", key(1)), "SealKey(..)");
    }

    #[test]
    fn a_seal_is_taken_once() {
        let mut g = ReplayGuard::new(3);
        let h = seal(
            &key(1),
            "a",
            sa("192.0.2.1:5"),
            sa("192.0.2.2:80"),
            1_000,
            [1; 8],
            false,
        );
        let id = seal_id(&h).unwrap();
        assert_eq!(g.admit(id, 1_000), Admit::New);
        assert_eq!(g.admit(id, 1_001), Admit::Replayed);
        // Still refused in the next generation, while its time is valid.
        assert_eq!(g.admit(id, 1_000 + REMEMBER_SECS + 1), Admit::Replayed);
        // Forgotten two generations on (its time is long out of the window).
        assert_eq!(g.admit(id, 1_000 + 3 * REMEMBER_SECS), Admit::New);
        // Full: taken, not remembered.
        let mut g = ReplayGuard::new(2);
        assert_eq!(g.admit(1, 500), Admit::New);
        assert_eq!(g.admit(2, 500), Admit::New);
        assert_eq!(g.admit(3, 500), Admit::Full);
        assert_eq!(g.admit(3, 501), Admit::Full);
        assert_eq!(g.admit(1, 501), Admit::Replayed);
        // The clock going far back starts afresh (every remembered seal's
        // time is then out of the window).
        assert_eq!(g.admit(4, 100), Admit::New);
        assert_eq!(g.admit(1, 100), Admit::New);
    }

    #[test]
    fn a_time_just_before_the_generation_forgets_nothing() {
        let mut g = ReplayGuard::new(8);
        assert_eq!(g.admit(1, 1_000), Admit::New);
        // Another connection starts the next generation a second later ...
        assert_eq!(g.admit(2, 1_000 + REMEMBER_SECS), Admit::New);
        // ... and one checked with the second before still finds both.
        assert_eq!(g.admit(1, 1_000 + REMEMBER_SECS - 1), Admit::Replayed);
        assert_eq!(g.admit(2, 1_000 + REMEMBER_SECS - 1), Admit::Replayed);
        // A clock stepped back by a minute forgets nothing either.
        assert_eq!(g.admit(1, 1_000 + REMEMBER_SECS - 60), Admit::Replayed);
        assert_eq!(g.admit(3, 1_000 + REMEMBER_SECS - 60), Admit::New);
        assert_eq!(g.admit(3, 1_000 + REMEMBER_SECS + 1), Admit::Replayed);
        assert_eq!(seal_id(b"short"), None);
    }

    proptest! {
        /// A seal accepted at some time is refused at every later time its
        /// own time is still within the window.
        #[test]
        fn no_replay_within_the_window(
            arrivals in proptest::collection::vec(0u64..400, 1..50),
            at in 0u64..400,
        ) {
            let mut g = ReplayGuard::new(1_000);
            let mut now = 0;
            let mut taken_at = None;
            for dt in arrivals {
                now += dt;
                let in_window = now.abs_diff(at + 1_000) <= MAX_SKEW_SECS;
                let r = g.admit(7, now + 1_000);
                if let Some(t) = taken_at {
                    let t: u64 = t;
                    if in_window && now + 1_000 >= t {
                        prop_assert_eq!(r, Admit::Replayed);
                    }
                } else if r == Admit::New && in_window {
                    taken_at = Some(now + 1_000);
                }
            }
        }

        #[test]
        fn any_change_to_a_sealed_header_is_caught(
            v6 in any::<bool>(),
            at in any::<usize>(),
            bit in 0u8..8,
            now in 0u64..u64::MAX / 2,
            to in "[a-z0-9_.-]{1,63}",
            ack in any::<bool>(),
        ) {
            let src = if v6 { sa("[2001:db8::1]:5") } else { sa("192.0.2.1:5") };
            let h = seal(&key(3), &to, src, sa("192.0.2.2:80"), now, [1; 8], ack);
            prop_assert!(verify(&key(3), &to, &h, now).is_ok());
            let mut bad = h.clone();
            let i = at % bad.len();
            bad[i] ^= 1 << bit;
            prop_assert!(verify(&key(3), &to, &bad, now).is_err());
        }

        /// A seal made for one hub holds at no hub of another name.
        #[test]
        fn a_seal_holds_at_no_other_hub(
            to in "[a-z0-9_.-]{1,63}",
            me in "[a-z0-9_.-]{1,63}",
            now in 0u64..u64::MAX / 2,
        ) {
            let h = seal(&key(3), &to, sa("192.0.2.1:5"), sa("192.0.2.2:80"), now, [1; 8], false);
            if me == to {
                prop_assert!(verify(&key(3), &me, &h, now).is_ok());
            } else {
                prop_assert_eq!(verify(&key(3), &me, &h, now), Err(SealError::Mac));
            }
        }
    }
}
