//! The translator on the device's data path (hub mode): decides which packets
//! the SIIT translator (and the NAT64 table) take, runs them, and counts what
//! they drop. The device routes whatever comes out: an output packet whose
//! destination belongs to a peer is encrypted for it, anything else goes to the
//! TUN (the hub's own stack forwards it).
//!
//! * From the TUN: an IPv4 packet to an EAM IPv4 range or to the NAT64 pool4
//!   address is translated 4→6 (then, for pool4, mapped back to the node by
//!   its NAT64 session), its source through pool6 only: one inside an EAM
//!   IPv4 range takes no node's IPv6 address. An IPv6 packet to pool6 that
//!   no peer owns is translated 6→4.
//! * From a peer (after cryptokey routing, when no other peer owns the
//!   destination): an IPv6 packet to pool6 or to an EAM IPv6 range is
//!   translated 6→4; when its source has no EAM mapping it goes through NAT64
//!   first (if configured).
//! * NAT64 bounds the sessions of one node ([`nat64::Owner`]): for a packet
//!   from a peer, the peer ([`peer_owner`]: all the addresses its allowed
//!   IPs give it together); for one from the TUN (the hub's own host or its
//!   LAN), its IPv6 source address.
//! * Either way, an IPv6 packet to an EAM IPv6 range that no peer owns is
//!   dropped (`eam_no_peer`): the EAM IPv4 ranges are routed onto the TUN,
//!   so its translation would come straight back, again and again.
//!
//! Nothing here allocates per packet: the caller owns the output buffer
//! ([`crate::xlat::OUT_BUF_LEN`] bytes; its last [`SCRATCH`] bytes are used as
//! scratch space for NAT64 rewrites).

use crate::xlat::{self, nat64, DropReason, Outcome};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Scratch room at the end of the output buffer for a packet being rewritten.
pub const SCRATCH: usize = 65_536;

/// Translator state of a device.
pub struct XlatPath {
    cfg: Arc<xlat::Config>,
    /// `cfg` for the packets NAT64 rewrote: their `pool6 + pool4` address
    /// is the hub's own and may be non-global behind the Well-Known Prefix
    /// (the table checks the remote addresses itself).
    nat_cfg: Arc<xlat::Config>,
    /// `nat_cfg` without EAM, for IPv4 packets to pool4: a NAT64 node knows
    /// every remote by its `pool6` address (also one inside an EAM IPv4
    /// range, reached by hairpinning), and its sessions are keyed by it.
    nat_in_cfg: Arc<xlat::Config>,
    nat: Option<Mutex<nat64::Table>>,
    pool4: Option<[u8; 4]>,
    /// IPv4 destinations (besides EAM ranges) translated through pool6.
    via_pool6: Vec<ipnet::Ipv4Net>,
    drops: [AtomicU64; DropReason::ALL.len()],
    /// Generated ICMP errors allowed per second; the ones over it are dropped.
    budget: Mutex<xlat::budget::ErrorBudget>,
    rate_limited: AtomicU64,
    /// Held NAT64 fragments ready to go on (so the data path need not lock
    /// the table to learn there are none).
    released: AtomicUsize,
}

/// The drop counter name of generated ICMP errors over the rate limit.
pub const RATE_LIMITED: &str = "icmp_error_rate_limited";

/// Where the translator sends an IPv4 packet that comes to it from the TUN
/// ([`XlatPath::returns`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Return {
    /// To pool4: the NAT64 session it hits decides, whoever opened it (a
    /// node, or a host on the hub's side).
    Pool4,
    /// To this IPv6 address (an EAM range's, or pool6's for an
    /// `ipv4_via_pool6` range).
    To(std::net::Ipv6Addr),
}

/// The NAT64 owner of a peer's packets: the first 16 bytes of its public key.
/// The key, not the addresses, names the peer: one that routes a prefix
/// gets one bound for all the addresses in it, and the same key keeps its
/// count across reloads (its sessions keep the owner they were opened
/// under). Another key, or an IPv6 address (the owner of a packet from the
/// TUN), with the same 16 bytes would take some 2^128 tries to find.
pub fn peer_owner(public_key: &crate::keys::PublicKey) -> nat64::Owner {
    // A key has 32 bytes: the default is never taken.
    public_key.0.first_chunk().copied().unwrap_or_default()
}

impl XlatPath {
    pub fn new(
        cfg: Arc<xlat::Config>,
        nat64: Option<nat64::Settings>,
        via_pool6: Vec<ipnet::Ipv4Net>,
        icmp_error_rate: u32,
    ) -> Self {
        let nat_cfg = match (&nat64, cfg.pool6) {
            (Some(_), Some(p)) => Arc::new(xlat::Config {
                pool6: Some(p.with_wkp_strict(false)),
                ..(*cfg).clone()
            }),
            _ => cfg.clone(),
        };
        let nat_in_cfg = Arc::new(xlat::Config {
            eamt: Vec::new(),
            ..(*nat_cfg).clone()
        });
        XlatPath {
            nat_cfg,
            nat_in_cfg,
            budget: Mutex::new(xlat::budget::ErrorBudget::new(icmp_error_rate)),
            rate_limited: AtomicU64::new(0),
            via_pool6,
            pool4: nat64.as_ref().map(|n| n.pool4.octets()),
            nat: nat64.map(|n| Mutex::new(nat64::Table::new(n))),
            cfg,
            drops: Default::default(),
            released: AtomicUsize::new(0),
        }
    }

    pub fn config(&self) -> &xlat::Config {
        &self.cfg
    }

    fn count(&self, o: &Outcome) {
        let r = match o {
            Outcome::Drop(r) | Outcome::Reply { cause: r, .. } => *r,
            _ => return,
        };
        if let Some(c) = self.drops.get(r.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts `o`, and holds a generated ICMP error to the rate limit: over
    /// it, the error is not sent (the packet that caused it is dropped and
    /// counted under its reason either way).
    fn done(&self, o: Outcome, now: u64) -> Option<Outcome> {
        self.count(&o);
        if let Outcome::Reply { cause, .. } = &o {
            if !self.budget.lock().allow(now) {
                self.rate_limited.fetch_add(1, Ordering::Relaxed);
                return Some(Outcome::Drop(*cause));
            }
        }
        Some(o)
    }

    /// Drop counters by reason (only reasons seen at least once), and
    /// [`RATE_LIMITED`]: generated ICMP errors not sent.
    pub fn drops(&self) -> BTreeMap<String, u64> {
        let mut m: BTreeMap<String, u64> = DropReason::ALL
            .iter()
            .filter_map(|r| {
                let n = self.drops.get(r.index())?.load(Ordering::Relaxed);
                (n > 0).then(|| (r.as_str().to_string(), n))
            })
            .collect();
        let n = self.rate_limited.load(Ordering::Relaxed);
        if n > 0 {
            m.insert(RATE_LIMITED.to_string(), n);
        }
        m
    }

    /// NAT64 sessions, bindings, tracked fragmented datagrams and held
    /// fragments, if NAT64 is on.
    pub fn nat64_counts(&self) -> Option<crate::wg::device::ShowNat64> {
        self.nat.as_ref().map(|n| {
            let t = n.lock();
            crate::wg::device::ShowNat64 {
                sessions: t.sessions(),
                bindings: t.bindings(),
                fragments: t.fragment_flows(),
                held_fragments: t.held_fragments().0,
                held_fragments_total: t.held_total(),
            }
        })
    }

    /// After a NAT64 call: notes the held fragments now ready and counts the
    /// held ones whose first never came.
    fn after_nat(&self, nat: &mut nat64::Table) {
        self.released.store(nat.released_len(), Ordering::Relaxed);
        let n = nat.take_expired_held();
        if n > 0 {
            if let Some(c) = self.drops.get(DropReason::Fragment.index()) {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// A held NAT64 fragment whose first has since been mapped, finished into
    /// `out`: outbound ones translated to IPv4, inbound ones as they are (for
    /// the node). The caller sends it as it sends [`Self::on_tun`]'s outcomes,
    /// and calls again until `None`. With an outbound one comes the address
    /// its datagram was sent from (a node's, or one on the hub's side): the
    /// caller places it as that sender's packet, whichever loop takes it.
    pub fn released(
        &self,
        out: &mut [u8],
        now: u64,
    ) -> Option<(Outcome, Option<std::net::Ipv6Addr>)> {
        if self.released.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let nat = self.nat.as_ref()?;
        let r = {
            let mut t = nat.lock();
            let r = t.take_released();
            self.after_nat(&mut t);
            r?
        };
        let (o, from) = if r.outbound {
            let o = match xlat::translate_6to4(&self.nat_cfg, &r.packet, out) {
                // Its source is pool4 now, not the node's: no error can
                // reach the node for it.
                Outcome::Reply { cause, .. } => Outcome::Drop(cause),
                o => o,
            };
            (o, Some(r.source.into()))
        } else {
            let o = match (
                out.get_mut(..r.packet.len()),
                xlat::Packets::one(r.packet.len()),
            ) {
                (Some(dst), Ok(p)) => {
                    dst.copy_from_slice(&r.packet);
                    Outcome::Forward(p)
                }
                _ => Outcome::Drop(DropReason::OutputTooSmall),
            };
            (o, None)
        };
        self.done(o, now).map(|o| (o, from))
    }

    /// Where an IPv4 packet for `dst` that the host's kernel routes onto
    /// the TUN goes once [`Self::on_tun`] has translated it: the translated
    /// ranges are routed there, so a packet a peer sends to one of them
    /// comes back through the translator. `None`: the translator does not
    /// take it.
    pub fn returns(&self, dst: std::net::Ipv4Addr) -> Option<Return> {
        let d = dst.octets();
        if self.pool4 == Some(d) {
            return Some(Return::Pool4);
        }
        if xlat::addr::eam_lookup_v4(&self.cfg.eamt, d).is_none()
            && !self.via_pool6.iter().any(|n| n.contains(&dst))
        {
            return None;
        }
        xlat::addr::map_4to6(&self.cfg.eamt, self.cfg.pool6.as_ref(), d, false)
            .map(|a| Return::To(a.into()))
    }

    fn in_pool6(&self, dst: &[u8; 16]) -> bool {
        self.cfg
            .pool6
            .as_ref()
            .is_some_and(|p| p.extract(dst).is_some())
    }

    /// A packet read from the TUN. `None`: not for the translator.
    /// `peer_owns` tells whether a peer's allowed IPs hold an IPv6 address
    /// (such packets are the peer's, even inside an EAM range).
    pub fn on_tun(
        &self,
        pkt: &[u8],
        out: &mut [u8],
        now: u64,
        peer_owns: impl Fn(std::net::Ipv6Addr) -> bool,
    ) -> Option<Outcome> {
        match pkt.first().map(|b| b >> 4) {
            Some(4) => {
                let dst: [u8; 4] = pkt.get(16..20)?.try_into().ok()?;
                let to_pool4 = self.pool4 == Some(dst);
                if !to_pool4
                    && xlat::addr::eam_lookup_v4(&self.cfg.eamt, dst).is_none()
                    && !self
                        .via_pool6
                        .iter()
                        .any(|n| n.contains(&std::net::Ipv4Addr::from(dst)))
                {
                    return None;
                }
                // From the IPv4 side: its source is no node's, so it is
                // mapped through pool6 only (an EAM IPv6 address names a node).
                if !to_pool4 {
                    let o = xlat::translate_4to6_pool6_src(&self.cfg, pkt, out);
                    return self.done(o, now);
                }
                let o = xlat::translate_4to6(&self.nat_in_cfg, pkt, out);
                self.done(self.nat_inbound(o, out, now), now)
            }
            Some(6) => {
                let dst: [u8; 16] = pkt.get(24..40)?.try_into().ok()?;
                if xlat::addr::eam_lookup_v6(&self.cfg.eamt, &dst).is_some() {
                    // A peer's address goes to the peer as it is; any other
                    // has nowhere to go.
                    if peer_owns(dst.into()) {
                        return None;
                    }
                    return self.done(Outcome::Drop(DropReason::EamNoPeer), now);
                }
                if !self.in_pool6(&dst) {
                    return None;
                }
                // A peer's address (an `ipv4_via_pool6` node's) goes to it as
                // it is.
                if peer_owns(dst.into()) {
                    return None;
                }
                // NAT64 sessions count against the source address.
                self.done(self.six_to_four(pkt, out, now, None), now)
            }
            _ => None,
        }
    }

    /// A frame read from an offload TUN (virtio-net header, then packet, at
    /// `buf[frame]`, with [`xlat::gso::HEADROOM`] free bytes before it): when it
    /// is a TCP super-packet that [`Self::on_tun`] would translate statelessly
    /// into packets for the TUN (no peer owns the translated destination, no
    /// NAT64), translates it whole and in place and returns where the
    /// translated frame lies. `None`: anything else, `buf` untouched; the
    /// caller splits it and takes the per-packet path.
    pub fn on_tun_gso(
        &self,
        buf: &mut [u8],
        frame: std::ops::Range<usize>,
        peer_owns: impl Fn(std::net::IpAddr) -> bool,
    ) -> Option<std::ops::Range<usize>> {
        let f = buf.get(frame.clone())?;
        let pkt = f.get(xlat::gso::VNET_HDR_LEN..)?;
        match pkt.first().map(|b| b >> 4) {
            Some(4) => {
                let dst: [u8; 4] = pkt.get(16..20)?.try_into().ok()?;
                // pool4 (NAT64) packets go to their session's node.
                if self.pool4 == Some(dst)
                    || (xlat::addr::eam_lookup_v4(&self.cfg.eamt, dst).is_none()
                        && !self
                            .via_pool6
                            .iter()
                            .any(|n| n.contains(&std::net::Ipv4Addr::from(dst))))
                {
                    return None;
                }
                // A source in an EAM range: `on_tun` maps it through pool6.
                let src: [u8; 4] = pkt.get(12..16)?.try_into().ok()?;
                if xlat::addr::eam_lookup_v4(&self.cfg.eamt, src).is_some() {
                    return None;
                }
            }
            Some(6) => {
                let dst: [u8; 16] = pkt.get(24..40)?.try_into().ok()?;
                // To an EAM IPv6 range: a peer's, or dropped by `on_tun`.
                // To pool6 that a peer owns: the peer's, as it is.
                if !self.in_pool6(&dst)
                    || xlat::addr::eam_lookup_v6(&self.cfg.eamt, &dst).is_some()
                    || peer_owns(std::net::Ipv6Addr::from(dst).into())
                {
                    return None;
                }
                // A source without a stateless mapping (NAT64) is not planned:
                // `xlat::gso::plan` maps both addresses statelessly or gives up.
            }
            _ => return None,
        }
        let plan = xlat::gso::plan(&self.cfg, f)?;
        if peer_owns(plan.destination()) {
            return None;
        }
        plan.apply(buf, frame.start)
    }

    /// A decrypted IPv6 packet from a peer that no other peer takes. `None`: not
    /// for the translator. `owner` names the peer ([`peer_owner`]): the NAT64
    /// sessions it opens count against it, whatever its source address.
    /// `peer_owns` as for [`Self::on_tun`].
    pub fn on_peer(
        &self,
        pkt: &[u8],
        out: &mut [u8],
        now: u64,
        owner: nat64::Owner,
        peer_owns: impl Fn(std::net::Ipv6Addr) -> bool,
    ) -> Option<Outcome> {
        if pkt.first().map(|b| b >> 4) != Some(6) {
            return None;
        }
        let dst: [u8; 16] = pkt.get(24..40)?.try_into().ok()?;
        if xlat::addr::eam_lookup_v6(&self.cfg.eamt, &dst).is_some() {
            // Translated, it would come back from the TUN as IPv6 to the
            // same address (the EAM IPv4 ranges are routed there).
            if !peer_owns(dst.into()) {
                return self.done(Outcome::Drop(DropReason::EamNoPeer), now);
            }
        } else if !self.in_pool6(&dst) {
            return None;
        }
        self.done(self.six_to_four(pkt, out, now, Some(owner)), now)
    }

    /// IPv6 → IPv4, through NAT64 when the source has no stateless mapping.
    /// NAT64 sessions count against `owner`, or the source address when
    /// `None`.
    fn six_to_four(
        &self,
        pkt: &[u8],
        out: &mut [u8],
        now: u64,
        owner: Option<nat64::Owner>,
    ) -> Outcome {
        let src = pkt.get(8..24).and_then(|s| <[u8; 16]>::try_from(s).ok());
        let stateless = src.is_some_and(|src| {
            xlat::addr::eam_lookup_v6(&self.cfg.eamt, &src).is_some() || self.in_pool6(&src)
        });
        let (Some(nat), Some(pool6), false) = (&self.nat, &self.cfg.pool6, stateless) else {
            // To `pool6 + pool4` (an answer to a NAT64 session): the hub's
            // own address, as `nat_cfg` has it.
            let dst = pkt.get(24..40).and_then(|d| <[u8; 16]>::try_from(d).ok());
            let to_pool4 = self.pool4.is_some()
                && dst
                    .zip(self.cfg.pool6.as_ref())
                    .is_some_and(|(d, p)| p.extract(&d) == self.pool4);
            let cfg = if to_pool4 { &self.nat_cfg } else { &self.cfg };
            return xlat::translate_6to4(cfg, pkt, out);
        };
        let Some(owner) = owner.or(src) else {
            return Outcome::Drop(DropReason::Truncated);
        };
        let Some(split) = out.len().checked_sub(SCRATCH) else {
            return Outcome::Drop(DropReason::OutputTooSmall);
        };
        let (head, scratch) = out.split_at_mut(split);
        let Some(s) = scratch.get_mut(..pkt.len()) else {
            return Outcome::Drop(DropReason::OutputTooSmall);
        };
        s.copy_from_slice(pkt);
        let step = {
            let mut t = nat.lock();
            let r = t.outbound(s, pool6, owner, now);
            self.after_nat(&mut t);
            r
        };
        match step {
            Ok(nat64::Step::Mapped) => {}
            Ok(nat64::Step::Held) => return Outcome::Held,
            Err(e) => return Outcome::Drop(e),
        }
        match xlat::translate_6to4(&self.nat_cfg, s, head) {
            // The error is about the rewritten packet, to the pool4 address:
            // readdress it to the node, quoting the original.
            Outcome::Reply { packets, cause } => {
                let requoted = head
                    .get_mut(..packets.total_len())
                    .is_some_and(|r| xlat::requote_v6_error(r, pkt).is_ok());
                if requoted {
                    Outcome::Reply { packets, cause }
                } else {
                    Outcome::Drop(cause)
                }
            }
            o => o,
        }
    }

    /// Maps a packet translated from IPv4 to pool4 back to its NAT64 session.
    fn nat_inbound(&self, o: Outcome, out: &mut [u8], now: u64) -> Outcome {
        let Outcome::Forward(p) = o else {
            return o;
        };
        let (Some(nat), Some(pool6)) = (&self.nat, &self.cfg.pool6) else {
            return Outcome::Drop(DropReason::Untranslatable);
        };
        // One IPv4 packet may have become several IPv6 fragments: the first
        // finds the session, the later ones the mapping it left.
        // Pieces of one IPv4 packet share its identification: a later fragment
        // with no first yet makes them all held.
        let mut nat = nat.lock();
        let mut start = 0usize;
        let mut held = 0usize;
        let mut result = Outcome::Forward(p);
        for &len in p.lens() {
            let end = start.saturating_add(len as usize);
            let Some(piece) = out.get_mut(start..end) else {
                result = Outcome::Drop(DropReason::OutputTooSmall);
                break;
            };
            match nat.inbound(piece, pool6, now) {
                Ok(nat64::Step::Mapped) => {}
                Ok(nat64::Step::Held) => held += 1,
                Err(e) => {
                    result = Outcome::Drop(e);
                    break;
                }
            }
            start = end;
        }
        self.after_nat(&mut nat);
        match (result, held) {
            (r, 0) => r,
            (Outcome::Forward(p), n) if n == p.len() => Outcome::Held,
            // Some pieces mapped and some held: not what one IPv4 packet makes.
            (Outcome::Forward(_), _) => Outcome::Drop(DropReason::Fragment),
            (r, _) => r,
        }
    }
}

/// The translator configuration a hub device runs with: the validated settings
/// and a fresh random key for the IPv4 identification hash.
pub fn device_config(x: &xlat::settings::XlatSettings) -> Arc<xlat::Config> {
    use rand_core::RngCore;
    let mut c = x.config.clone();
    c.id_salt = rand_core::OsRng.next_u32();
    Arc::new(c)
}

/// Routes the translated ranges (EAM IPv4 ranges, pool6, the NAT64 pool4
/// address) onto the TUN `iface` with iproute2, so the host's stack hands their
/// packets to the translator.
pub fn add_routes(iface: &str, x: Option<&xlat::settings::XlatSettings>) -> anyhow::Result<()> {
    let Some(x) = x else {
        return Ok(());
    };
    for r in &x.routes {
        crate::wg::route::replace(r, iface).map_err(|e| anyhow::anyhow!("xlat: {e}"))?;
    }
    if !x.routes.is_empty() {
        let routes: Vec<String> = x.routes.iter().map(|r| r.to_string()).collect();
        tracing::info!(?routes, "xlat routes added");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    /// A network-specific pool6 (the documentation addresses the tests use
    /// are not global: the Well-Known Prefix refuses them, RFC 6052 §3.1).
    const POOL6: &str = "2001:db8:64::";

    fn pool6() -> xlat::Pool6 {
        xlat::Pool6::new(POOL6.parse().unwrap(), 96).unwrap()
    }

    /// `pool6` + `v4`.
    fn embed(pool6: &xlat::Pool6, v4: [u8; 4]) -> Ipv6Addr {
        pool6.embed(v4).into()
    }

    /// An IPv6 UDP packet from `src` to `dst` with hop limit `hop` and `len`
    /// bytes of payload, checksum right.
    fn udp6_between(src: Ipv6Addr, dst: Ipv6Addr, hop: u8, len: usize) -> Vec<u8> {
        let ulen = (8 + len) as u16;
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&ulen.to_be_bytes());
        p.extend_from_slice(&[17, hop]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&[0x30, 0x39, 0x00, 0x35]);
        p.extend_from_slice(&ulen.to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend(std::iter::repeat_n(0x5a, len));
        let acc = xlat::csum::add(
            xlat::csum::pseudo_v6(&src.octets(), &dst.octets(), 17, u32::from(ulen)),
            xlat::csum::sum(&p[40..]),
        );
        let c = xlat::csum::finish(acc).to_be_bytes();
        p[46] = c[0];
        p[47] = c[1];
        p
    }

    /// The answer to the IPv6 UDP packet `to` (addresses and ports
    /// swapped), with `len` bytes of payload, checksum right.
    fn udp6_answer(to: &[u8], len: usize) -> Vec<u8> {
        let addr = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&to[at..at + 16]).unwrap());
        let (src, dst) = (addr(24), addr(8));
        let mut a = udp6_between(src, dst, 64, len);
        a[40..42].copy_from_slice(&to[42..44]);
        a[42..44].copy_from_slice(&to[40..42]);
        a[46..48].fill(0);
        let c = xlat::csum::finish(xlat::csum::add(
            xlat::csum::pseudo_v6(&src.octets(), &dst.octets(), 17, (8 + len) as u32),
            xlat::csum::sum(&a[40..]),
        ));
        a[46..48].copy_from_slice(&c.to_be_bytes());
        a
    }

    /// An IPv6 UDP packet from pool6 + 198.51.100.2 to pool6 + 192.0.2.1
    /// with hop limit `hop`.
    fn udp6(hop: u8) -> Vec<u8> {
        let p = pool6();
        udp6_between(
            embed(&p, [198, 51, 100, 2]),
            embed(&p, [192, 0, 2, 1]),
            hop,
            4,
        )
    }

    fn path(rate: u32) -> XlatPath {
        let cfg = xlat::Config {
            pool6: Some(pool6()),
            self_v4: Some("198.51.100.1".parse().unwrap()),
            self_v6: Some("fd77:6777::1".parse().unwrap()),
            ..xlat::Config::default()
        };
        XlatPath::new(Arc::new(cfg), None, Vec::new(), rate)
    }

    /// A NAT64 hub's path with `cfg`, pool4 198.51.100.200.
    fn nat_path_with(cfg: xlat::Config) -> XlatPath {
        let nat = nat64::Settings {
            pool4: "198.51.100.200".parse().unwrap(),
            ..nat64::Settings::default()
        };
        XlatPath::new(Arc::new(cfg), Some(nat), Vec::new(), 10)
    }

    /// A NAT64 hub's path whose nodes have at most `per_node` sessions each.
    fn nat_path_per_node(per_node: usize) -> XlatPath {
        let cfg = xlat::Config {
            pool6: Some(pool6()),
            ..xlat::Config::default()
        };
        let nat = nat64::Settings {
            pool4: "198.51.100.200".parse().unwrap(),
            max_sessions: 64,
            max_sessions_per_host: per_node,
            ..nat64::Settings::default()
        };
        XlatPath::new(Arc::new(cfg), Some(nat), Vec::new(), 10)
    }

    fn nat_path() -> XlatPath {
        nat_path_with(xlat::Config {
            pool6: Some(pool6()),
            ..xlat::Config::default()
        })
    }

    const NODE: &str = "fd77:6777::1:1";

    /// The NAT64 owner of the peer the tests' packets come from.
    const PEER: nat64::Owner = [7; 16];

    /// A UDP datagram from a node to pool6 + 203.0.113.10, as two IPv6
    /// fragments (the second carrying no ports).
    fn node_fragments(id: u32) -> [Vec<u8>; 2] {
        let src: Ipv6Addr = NODE.parse().unwrap();
        let dst = embed(&pool6(), [203, 0, 113, 10]);
        let payload = [0x5au8; 200];
        let ulen = 8 + payload.len();
        let mut l4 = vec![0x30, 0x39, 0x1b, 0x58, 0, ulen as u8, 0, 0];
        l4.extend_from_slice(&payload);
        let acc = xlat::csum::add(
            xlat::csum::pseudo_v6(&src.octets(), &dst.octets(), 17, ulen as u32),
            xlat::csum::sum(&l4),
        );
        let c = xlat::csum::finish(acc).to_be_bytes();
        l4[6] = c[0];
        l4[7] = c[1];
        let piece = |data: &[u8], offset: u16, more: bool| {
            let mut p = vec![0x60, 0, 0, 0];
            p.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
            p.extend_from_slice(&[44, 64]);
            p.extend_from_slice(&src.octets());
            p.extend_from_slice(&dst.octets());
            p.extend_from_slice(&[17, 0]);
            p.extend_from_slice(&(offset | u16::from(more)).to_be_bytes());
            p.extend_from_slice(&id.to_be_bytes());
            p.extend_from_slice(data);
            p
        };
        [piece(&l4[..104], 0, true), piece(&l4[104..], 104, false)]
    }

    #[test]
    fn nat64_fragment_before_its_first_is_sent_after_it() {
        let x = nat_path();
        let mut out = vec![0u8; xlat::OUT_BUF_LEN];
        let [first, later] = node_fragments(7);
        assert_eq!(
            x.on_peer(&later, &mut out, 10, PEER, |_| false),
            Some(Outcome::Held)
        );
        assert_eq!(x.released(&mut out, 10), None, "nothing before its first");
        assert_eq!(x.nat64_counts().map(|n| n.held_fragments), Some(1));
        let Some(Outcome::Forward(p)) = x.on_peer(&first, &mut out, 10, PEER, |_| false) else {
            panic!("the first is translated");
        };
        let v4 = p.iter(&out).next().unwrap().to_vec();
        assert_eq!(&v4[12..16], &[198, 51, 100, 200]);
        let Some((Outcome::Forward(p), from)) = x.released(&mut out, 10) else {
            panic!("the held fragment follows");
        };
        assert_eq!(from, NODE.parse().ok(), "placed as the node's packet");
        let v4_later = p.iter(&out).next().unwrap().to_vec();
        assert_eq!(&v4_later[12..16], &[198, 51, 100, 200], "from pool4");
        assert_eq!(&v4_later[16..20], &[203, 0, 113, 10]);
        assert_eq!(&v4_later[4..6], &v4[4..6], "same IPv4 identification");
        assert_eq!(x.released(&mut out, 10), None);
        assert_eq!(x.nat64_counts().map(|n| n.held_fragments), Some(0));
        assert!(!x.drops().contains_key("fragment"));
    }

    #[test]
    fn nat64_held_fragment_whose_first_never_comes_is_counted() {
        let x = nat_path();
        let mut out = vec![0u8; xlat::OUT_BUF_LEN];
        let [_, later] = node_fragments(8);
        assert_eq!(
            x.on_peer(&later, &mut out, 10, PEER, |_| false),
            Some(Outcome::Held)
        );
        // Any NAT64 packet after the timeout sweeps the table.
        let [other, _] = node_fragments(9);
        let now = 10 + nat64::FRAG_TIMEOUT;
        assert!(matches!(
            x.on_peer(&other, &mut out, now, PEER, |_| false),
            Some(Outcome::Forward(_))
        ));
        assert_eq!(x.drops().get("fragment"), Some(&1));
        assert_eq!(x.nat64_counts().map(|n| n.held_fragments), Some(0));
    }

    #[test]
    fn generated_errors_are_rate_limited_per_second() {
        let x = path(2);
        let mut out = vec![0u8; xlat::OUT_BUF_LEN];
        let expired = udp6(1);
        let kinds = |x: &XlatPath, now: u64, out: &mut [u8]| -> Vec<&'static str> {
            (0..5)
                .map(|_| match x.on_peer(&expired, out, now, PEER, |_| false) {
                    Some(Outcome::Reply { .. }) => "reply",
                    Some(Outcome::Drop(_)) => "drop",
                    Some(_) => "other",
                    None => "none",
                })
                .collect()
        };
        assert_eq!(
            kinds(&x, 100, &mut out),
            ["reply", "reply", "drop", "drop", "drop"]
        );
        assert_eq!(x.drops().get(RATE_LIMITED), Some(&3));
        // Every expired packet is counted under its own reason too.
        let expired_count: u64 = x
            .drops()
            .iter()
            .filter(|(k, _)| k.as_str() != RATE_LIMITED)
            .map(|(_, v)| *v)
            .sum();
        assert_eq!(expired_count, 5);
        // The next second sends again; forwarded packets are never limited.
        assert_eq!(kinds(&x, 101, &mut out)[..2], ["reply", "reply"]);
        assert!(matches!(
            x.on_peer(&udp6(64), &mut out, 101, PEER, |_| false),
            Some(Outcome::Forward(_))
        ));
        // 0: no generated errors at all.
        let off = path(0);
        assert_eq!(kinds(&off, 100, &mut out), ["drop"; 5]);
    }

    /// A node's datagram through NAT64 that is too big for the IPv4 side
    /// gets a Packet Too Big from the hub, to the node (not to pool4),
    /// quoting the packet as the node sent it.
    #[test]
    fn nat64_packet_too_big_reaches_the_node() {
        let x = nat_path_with(xlat::Config {
            pool6: Some(pool6()),
            self_v6: Some("fd77:6777::1".parse().unwrap()),
            ipv4_mtu: 1300,
            ..xlat::Config::default()
        });
        let mut out = vec![0u8; xlat::OUT_BUF_LEN];
        let node: Ipv6Addr = NODE.parse().unwrap();
        let big = udp6_between(node, embed(&pool6(), [203, 0, 113, 10]), 64, 1352);
        assert_eq!(big.len(), 1400);
        let Some(Outcome::Reply { packets, cause }) =
            x.on_peer(&big, &mut out, 10, PEER, |_| false)
        else {
            panic!("a Packet Too Big");
        };
        assert_eq!(cause, DropReason::PacketTooBig);
        let r = packets.iter(&out).next().unwrap();
        assert_eq!(&r[24..40], &node.octets(), "to the node");
        assert_eq!((r[40], r[41]), (2, 0));
        assert_eq!(u32::from_be_bytes([r[44], r[45], r[46], r[47]]), 1320);
        assert_eq!(&r[48..], &big[..r.len() - 48], "the packet as sent");
        let src: [u8; 16] = r[8..24].try_into().unwrap();
        assert!(xlat::csum::verify(
            xlat::csum::pseudo_v6(&src, &node.octets(), 58, (r.len() - 40) as u32),
            &r[40..]
        ));
        assert_eq!(x.drops().get("packet_too_big"), Some(&1));
        // One that fits goes.
        let fits = udp6_between(node, embed(&pool6(), [203, 0, 113, 10]), 64, 1252);
        assert!(matches!(
            x.on_peer(&fits, &mut out, 10, PEER, |_| false),
            Some(Outcome::Forward(_))
        ));
    }

    /// An EAM IPv6 address no peer owns has nowhere to go: translated, it
    /// would come back from the TUN (the EAM IPv4 ranges are routed there)
    /// and round again. Dropped and counted, from a peer and from the TUN.
    #[test]
    fn eam_address_no_peer_owns_is_dropped() {
        let cfg = xlat::Config {
            pool6: Some(pool6()),
            eamt: vec![xlat::Eam::new(
                "192.0.2.0".parse().unwrap(),
                24,
                "2001:db8:e::".parse().unwrap(),
                120,
            )
            .unwrap()],
            ..xlat::Config::default()
        };
        let x = XlatPath::new(Arc::new(cfg), None, Vec::new(), 10);
        let mut out = vec![0u8; xlat::OUT_BUF_LEN];
        let eam_dst: Ipv6Addr = "2001:db8:e::9".parse().unwrap();
        let p = udp6_between(embed(&pool6(), [198, 51, 100, 2]), eam_dst, 64, 4);
        assert_eq!(
            x.on_peer(&p, &mut out, 10, PEER, |_| false),
            Some(Outcome::Drop(DropReason::EamNoPeer))
        );
        assert_eq!(
            x.on_tun(&p, &mut out, 10, |_| false),
            Some(Outcome::Drop(DropReason::EamNoPeer))
        );
        assert_eq!(x.drops().get("eam_no_peer"), Some(&2));
        // A peer's: from the TUN it goes to the peer as it is.
        assert_eq!(x.on_tun(&p, &mut out, 10, |a| a == eam_dst), None);
    }

    /// A NAT64 node reaches an EAM node through pool6 + its EAM IPv4
    /// address (RFC 6146 hairpinning by way of the host's routes): out from
    /// pool4, back in from the TUN to the EAM node, whose answer goes to
    /// pool4 and from the TUN back to the NAT64 node.
    #[test]
    fn nat64_node_reaches_an_eam_node_and_back() {
        let eam_v6: Ipv6Addr = "2001:db8:e::9".parse().unwrap();
        let x = nat_path_with(eam_cfg());
        let mut out = vec![0u8; xlat::OUT_BUF_LEN];
        let node: Ipv6Addr = NODE.parse().unwrap();
        let owns = |a: Ipv6Addr| a == eam_v6 || a == node;
        let p = udp6_between(node, embed(&pool6(), [192, 0, 2, 9]), 64, 4);
        let o = x.on_peer(&p, &mut out, 10, PEER, owns);
        let Some(Outcome::Hairpin(pk)) = o else {
            panic!("through NAT64 and back: {o:?}");
        };
        let v6 = pk.iter(&out).next().unwrap().to_vec();
        let pool4_v6 = embed(&pool6(), [198, 51, 100, 200]);
        assert_eq!(&v6[8..24], &pool4_v6.octets());
        assert_eq!(&v6[24..40], &eam_v6.octets());
        // Its answer.
        let answer = udp6_answer(&v6, 4);
        const EAM_NODE: nat64::Owner = [9; 16];
        let Some(Outcome::Forward(pk)) = x.on_peer(&answer, &mut out, 11, EAM_NODE, owns) else {
            panic!("the answer goes out to pool4");
        };
        let v4 = pk.iter(&out).next().unwrap().to_vec();
        assert_eq!(
            (&v4[12..16], &v4[16..20]),
            (&[192, 0, 2, 9][..], &[198, 51, 100, 200][..])
        );
        let o = x.on_tun(&v4, &mut out, 11, owns);
        let Some(Outcome::Forward(pk)) = o else {
            panic!("the answer reaches the NAT64 node: {o:?} {:?}", x.drops());
        };
        let back = pk.iter(&out).next().unwrap().to_vec();
        assert_eq!(&back[8..24], &embed(&pool6(), [192, 0, 2, 9]).octets());
        assert_eq!(&back[24..40], &node.octets());
        assert_eq!(&back[40..44], &[p[42], p[43], p[40], p[41]]);
    }

    /// With the Well-Known Prefix, a NAT64 hub whose pool4 is not global
    /// still works (pool6 + pool4 never leaves the hub), but refuses
    /// non-global remotes before a session is made.
    #[test]
    fn nat64_with_the_well_known_prefix() {
        let wkp = xlat::Pool6::new("64:ff9b::".parse().unwrap(), 96).unwrap();
        let x = nat_path_with(xlat::Config {
            pool6: Some(wkp),
            ..xlat::Config::default()
        });
        let mut out = vec![0u8; xlat::OUT_BUF_LEN];
        let node: Ipv6Addr = NODE.parse().unwrap();
        let p = udp6_between(node, embed(&wkp, [8, 8, 8, 8]), 64, 4);
        let Some(Outcome::Forward(pk)) = x.on_peer(&p, &mut out, 10, PEER, |_| false) else {
            panic!("a global remote is reached");
        };
        let v4 = pk.iter(&out).next().unwrap().to_vec();
        assert_eq!(&v4[12..16], &[198, 51, 100, 200], "from pool4");
        assert_eq!(x.nat64_counts().map(|n| n.sessions), Some(1));
        // The answer comes back to the node.
        let mut answer = v4.clone();
        answer[12..16].copy_from_slice(&v4[16..20]);
        answer[16..20].copy_from_slice(&v4[12..16]);
        answer[20..22].copy_from_slice(&v4[22..24]);
        answer[22..24].copy_from_slice(&v4[20..22]);
        answer[26..28].fill(0);
        let udp = xlat::csum::finish(xlat::csum::add(
            xlat::csum::pseudo_v4(
                &answer[12..16].try_into().unwrap(),
                &answer[16..20].try_into().unwrap(),
                17,
                (answer.len() - 20) as u32,
            ),
            xlat::csum::sum(&answer[20..]),
        ));
        answer[26..28].copy_from_slice(&udp.to_be_bytes());
        answer[10..12].fill(0);
        let c = xlat::csum::checksum(&answer[..20]);
        answer[10..12].copy_from_slice(&c.to_be_bytes());
        let Some(Outcome::Forward(pk)) = x.on_tun(&answer, &mut out, 10, |_| false) else {
            panic!("the answer reaches the node");
        };
        assert_eq!(&pk.iter(&out).next().unwrap()[24..40], &node.octets());
        for remote in [
            [10, 0, 0, 1],
            [192, 168, 1, 1],
            [100, 64, 0, 1],
            [203, 0, 113, 10],
        ] {
            let p = udp6_between(node, embed(&wkp, remote), 64, 4);
            assert_eq!(
                x.on_peer(&p, &mut out, 10, PEER, |_| false),
                Some(Outcome::Drop(DropReason::IllegalAddress)),
                "{remote:?}"
            );
        }
        assert_eq!(x.nat64_counts().map(|n| n.sessions), Some(1), "no session");
    }

    /// A peer's NAT64 sessions are bounded together, whatever addresses of
    /// its prefix it sends from; another peer still opens its own. From the
    /// TUN (no peer) the bound is per source address.
    #[test]
    fn nat64_bound_is_per_peer_not_per_address() {
        let x = nat_path_per_node(3);
        let mut out = vec![0u8; xlat::OUT_BUF_LEN];
        let remote = embed(&pool6(), [203, 0, 113, 10]);
        let from = |last: u16| Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, last);
        let forwarded = |o: Option<Outcome>| matches!(o, Some(Outcome::Forward(_)));
        for last in 1..=3 {
            let p = udp6_between(from(last), remote, 64, 4);
            assert!(
                forwarded(x.on_peer(&p, &mut out, 10, PEER, |_| false)),
                "{last}"
            );
        }
        // A fourth address of the same peer: its bound is reached.
        let p = udp6_between(from(4), remote, 64, 4);
        assert_eq!(
            x.on_peer(&p, &mut out, 10, PEER, |_| false),
            Some(Outcome::Drop(DropReason::Nat64HostLimit))
        );
        assert_eq!(x.drops().get("nat64_host_limit"), Some(&1));
        // Another peer, even from the same address, opens its own.
        let other = [8; 16];
        assert!(forwarded(x.on_peer(&p, &mut out, 10, other, |_| false)));
        // A peer's owner is its key's, the same whatever the addresses.
        let key = crate::keys::PublicKey([9; 32]);
        assert_eq!(peer_owner(&key), [9; 16]);
        // From the TUN each source address has its own bound.
        for last in 10..=13 {
            let p = udp6_between(from(last), remote, 64, 4);
            assert!(forwarded(x.on_tun(&p, &mut out, 10, |_| false)), "{last}");
        }
        // One address's sessions (to three remotes) reach its bound.
        for last in [11, 12, 13] {
            let to = embed(&pool6(), [203, 0, 113, last]);
            let p = udp6_between(from(20), to, 64, 4);
            assert!(forwarded(x.on_tun(&p, &mut out, 10, |_| false)), "{last}");
        }
        let p = udp6_between(from(20), remote, 64, 4);
        assert_eq!(
            x.on_tun(&p, &mut out, 10, |_| false),
            Some(Outcome::Drop(DropReason::Nat64HostLimit))
        );
        assert_eq!(x.nat64_counts().map(|n| n.sessions), Some(3 + 1 + 4 + 3));
        // Once the peer's sessions expire, it has its room again.
        let p = udp6_between(from(4), remote, 64, 4);
        assert!(forwarded(x.on_peer(
            &p,
            &mut out,
            10 + nat64::UDP_TIMEOUT,
            PEER,
            |_| false
        )));
    }

    /// An EAM table 192.0.2.0/24 <-> 2001:db8:e::/120 over pool6.
    fn eam_cfg() -> xlat::Config {
        xlat::Config {
            pool6: Some(pool6()),
            eamt: vec![xlat::Eam::new(
                "192.0.2.0".parse().unwrap(),
                24,
                "2001:db8:e::".parse().unwrap(),
                120,
            )
            .unwrap()],
            ..xlat::Config::default()
        }
    }

    /// An IPv4 UDP packet from `src` to `dst`, checksums right.
    fn udp4_between(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 32, 0, 1, 0x40, 0, 64, 17, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0, 12, 0, 0, 1, 2, 3, 4]);
        let c = xlat::csum::checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let u = xlat::csum::finish(xlat::csum::add(
            xlat::csum::pseudo_v4(&src, &dst, 17, 12),
            xlat::csum::sum(&p[20..]),
        ));
        p[26..28].copy_from_slice(&u.to_be_bytes());
        p
    }

    /// An offload TUN frame (with [`xlat::gso::HEADROOM`] in front): a TCP
    /// super-packet of two 500-byte segments, `ip` its IP header (checksums
    /// left to fill for IPv4).
    fn super_frame(mut ip: Vec<u8>) -> (Vec<u8>, std::ops::Range<usize>) {
        let v6 = ip[0] >> 4 == 6;
        let iph = ip.len();
        let mut tcp = vec![0x30, 0x39, 0x1f, 0x90, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x10];
        tcp.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
        let len = tcp.len() + 1000;
        if v6 {
            ip[4..6].copy_from_slice(&(len as u16).to_be_bytes());
        } else {
            ip[2..4].copy_from_slice(&((iph + len) as u16).to_be_bytes());
            let c = xlat::csum::checksum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let v = xlat::gso::VnetHdr {
            flags: xlat::gso::F_NEEDS_CSUM,
            gso_type: if v6 {
                xlat::gso::GSO_TCPV6
            } else {
                xlat::gso::GSO_TCPV4
            },
            hdr_len: (iph + 20) as u16,
            gso_size: 500,
            csum_start: iph as u16,
            csum_offset: 16,
        };
        let mut buf = vec![0u8; xlat::gso::HEADROOM];
        buf.extend_from_slice(&v.to_bytes());
        buf.extend_from_slice(&ip);
        buf.extend_from_slice(&tcp);
        buf.extend(std::iter::repeat_n(0x5a, 1000));
        let frame = xlat::gso::HEADROOM..buf.len();
        (buf, frame)
    }

    /// An IPv4 packet from the TUN whose source is a node's EAM IPv4
    /// address (the internet, or a peer routing 0.0.0.0/0, can send one)
    /// does not take that node's IPv6 address: its source goes through
    /// pool6. A TCP super-packet from one is left to the per-packet path.
    #[test]
    fn an_eam_source_from_the_ipv4_side_is_no_node() {
        let x = XlatPath::new(Arc::new(eam_cfg()), None, Vec::new(), 10);
        let mut out = vec![0u8; xlat::OUT_BUF_LEN];
        let p = udp4_between([192, 0, 2, 5], [192, 0, 2, 9]);
        let o = x.on_tun(&p, &mut out, 10, |_| false);
        let Some(Outcome::Forward(pk)) = o else {
            panic!("translated: {o:?}");
        };
        let v6 = pk.iter(&out).next().unwrap().to_vec();
        let node_a: Ipv6Addr = "2001:db8:e::5".parse().unwrap();
        assert_ne!(&v6[8..24], &node_a.octets(), "not node A's address");
        assert_eq!(&v6[8..24], &embed(&pool6(), [192, 0, 2, 5]).octets());
        let node_b: Ipv6Addr = "2001:db8:e::9".parse().unwrap();
        assert_eq!(&v6[24..40], &node_b.octets());
        let ip4 = |src: [u8; 4]| {
            let mut h = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0];
            h.extend_from_slice(&src);
            h.extend_from_slice(&[192, 0, 2, 9]);
            h
        };
        let (mut buf, frame) = super_frame(ip4([192, 0, 2, 5]));
        assert_eq!(x.on_tun_gso(&mut buf, frame, |_| false), None);
        let (mut buf, frame) = super_frame(ip4([198, 51, 100, 2]));
        assert!(x.on_tun_gso(&mut buf, frame, |_| false).is_some());
    }

    /// IPv6 from the TUN to a pool6 address a peer owns (an
    /// `ipv4_via_pool6` node's) goes to the peer as it is, per packet and
    /// as a TCP super-packet.
    #[test]
    fn pool6_address_a_peer_owns_is_not_translated_from_the_tun() {
        let via = vec!["10.9.0.0/16".parse().unwrap()];
        let x = XlatPath::new(Arc::new(eam_cfg()), None, via, 10);
        let mut out = vec![0u8; xlat::OUT_BUF_LEN];
        let node: Ipv6Addr = "2001:db8:e::5".parse().unwrap();
        let peer_c = embed(&pool6(), [10, 9, 1, 2]);
        let p = udp6_between(node, peer_c, 64, 4);
        assert_eq!(x.on_tun(&p, &mut out, 10, |a| a == peer_c), None);
        assert!(matches!(
            x.on_tun(&p, &mut out, 10, |_| false),
            Some(Outcome::Forward(_))
        ));
        let mut ip = vec![0x60, 0, 0, 0, 0, 0, 6, 64];
        ip.extend_from_slice(&node.octets());
        ip.extend_from_slice(&peer_c.octets());
        let (mut buf, frame) = super_frame(ip);
        let c = std::net::IpAddr::V6(peer_c);
        assert_eq!(
            x.on_tun_gso(&mut buf.clone(), frame.clone(), |a| a == c),
            None
        );
        assert!(x.on_tun_gso(&mut buf, frame, |_| false).is_some());
    }

    /// With the Well-Known Prefix and a non-global pool4, an EAM node's
    /// answer to a NAT64 node (to `64:ff9b::` + pool4) goes out all the same.
    #[test]
    fn eam_node_answers_a_nat64_node_through_the_well_known_prefix() {
        let wkp = xlat::Pool6::new("64:ff9b::".parse().unwrap(), 96).unwrap();
        let eam_v6: Ipv6Addr = "2001:db8:e::9".parse().unwrap();
        let x = nat_path_with(xlat::Config {
            pool6: Some(wkp),
            eamt: vec![xlat::Eam::new(
                "1.0.0.0".parse().unwrap(),
                24,
                "2001:db8:e::".parse().unwrap(),
                120,
            )
            .unwrap()],
            ..xlat::Config::default()
        });
        let mut out = vec![0u8; xlat::OUT_BUF_LEN];
        let node: Ipv6Addr = NODE.parse().unwrap();
        let owns = |a: Ipv6Addr| a == eam_v6 || a == node;
        let p = udp6_between(node, embed(&wkp, [1, 0, 0, 9]), 64, 4);
        let o = x.on_peer(&p, &mut out, 10, PEER, owns);
        let Some(Outcome::Hairpin(pk)) = o else {
            panic!("through NAT64 and back: {o:?}");
        };
        let v6 = pk.iter(&out).next().unwrap().to_vec();
        let pool4_v6 = embed(&wkp, [198, 51, 100, 200]);
        assert_eq!(&v6[8..24], &pool4_v6.octets());
        assert_eq!(&v6[24..40], &eam_v6.octets());
        let answer = udp6_answer(&v6, 4);
        const EAM_NODE: nat64::Owner = [9; 16];
        let o = x.on_peer(&answer, &mut out, 11, EAM_NODE, owns);
        let Some(Outcome::Forward(pk)) = o else {
            panic!("the answer goes out to pool4: {o:?}");
        };
        let v4 = pk.iter(&out).next().unwrap().to_vec();
        assert_eq!(
            (&v4[12..16], &v4[16..20]),
            (&[1, 0, 0, 9][..], &[198, 51, 100, 200][..])
        );
        let o = x.on_tun(&v4, &mut out, 11, owns);
        let Some(Outcome::Forward(pk)) = o else {
            panic!("the answer reaches the NAT64 node: {o:?} {:?}", x.drops());
        };
        let back = pk.iter(&out).next().unwrap().to_vec();
        assert_eq!(&back[8..24], &embed(&wkp, [1, 0, 0, 9]).octets());
        assert_eq!(&back[24..40], &node.octets());
    }

    #[test]
    fn what_the_kernel_routes_back_comes_back_through_the_translator() {
        let cfg = xlat::Config {
            pool6: Some(pool6()),
            eamt: vec![xlat::Eam::new(
                "192.0.2.0".parse().unwrap(),
                24,
                "fd77:6777:e::".parse().unwrap(),
                120,
            )
            .unwrap()],
            ..xlat::Config::default()
        };
        let nat = nat64::Settings {
            pool4: "198.51.100.200".parse().unwrap(),
            ..nat64::Settings::default()
        };
        let via = vec!["10.9.0.0/16".parse().unwrap()];
        let x = XlatPath::new(Arc::new(cfg), Some(nat), via, 10);
        let r = |a: &str| x.returns(a.parse().unwrap());
        assert_eq!(r("198.51.100.200"), Some(Return::Pool4));
        assert_eq!(
            r("192.0.2.5"),
            Some(Return::To("fd77:6777:e::5".parse().unwrap())),
            "the EAM IPv6 address"
        );
        assert_eq!(
            r("10.9.1.2"),
            Some(Return::To(embed(&pool6(), [10, 9, 1, 2]))),
            "through pool6"
        );
        // Not the translator's: the kernel's routes alone decide.
        assert_eq!(r("203.0.113.10"), None);
        assert_eq!(r("198.51.100.201"), None);
        // Without NAT64 there is no pool4.
        assert_eq!(path(10).returns("198.51.100.200".parse().unwrap()), None);
    }
}
