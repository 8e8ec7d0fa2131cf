//! TCP segmentation-offload super-packets translated whole.
//!
//! A TUN opened with offloads (`IFF_VNET_HDR`, TSO) hands out TCP
//! "super-packets": one IPv4 or IPv6 header and one TCP header in front of up
//! to 64 KiB of payload, preceded by a virtio-net header that tells the kernel
//! how to cut it into segments of `gso_size` payload bytes. Splitting it in
//! userspace, translating every segment and coalescing them again costs a copy
//! and a full checksum per segment. [`plan`] and [`Plan::apply`] instead
//! translate the super-packet as a whole, in place: the IP header is rewritten
//! (IPv4 ↔ IPv6, 20 bytes longer or shorter), the virtio-net header is
//! rewritten for the other family, and the TCP checksum field is updated.
//!
//! For a super-packet the checksum field does not hold a checksum but the
//! *partial* one the kernel left for segmentation to complete
//! (`VIRTIO_NET_HDR_F_NEEDS_CSUM`): the folded, uncomplemented sum of the
//! pseudo-header with the super-packet's full TCP length. Segmentation
//! (Linux's `tcp_gso_segment`) replaces that length with each segment's, then
//! adds the segment's bytes and complements. The translation changes the
//! pseudo-header addresses only (the TCP length stays), so the partial sum is
//! updated for the address change alone, as a sum rather than as a complement.
//!
//! Segmenting the translated super-packet gives, segment for segment, what
//! translating each segment of the original with [`super::translate_4to6`] /
//! [`super::translate_6to4`] gives, with two differences the kernel's
//! segmentation imposes on IPv4 headers: every segment carries the
//! super-packet's DF flag, and identifications count up from the
//! super-packet's. IPv4 → IPv6 segments whose translation would exceed the
//! IPv6 MTU (or, without DF, `lowest_ipv6_mtu`) are cut smaller instead
//! (`gso_size` goes down; TCP does not mind where a stream is cut), and
//! likewise IPv6 → IPv4 segments larger than the IPv4 MTU, where the
//! per-packet path would answer with an ICMP "too big" error.
//!
//! Only plain cases are eligible; anything else (UDP, IPv4 options, IPv6
//! extension headers, fragments, expiring TTL, untranslatable or hairpinned
//! addresses, a virtio-net header that is not the kernel's usual one) returns
//! `None` and the caller splits the packet and takes the per-packet path.
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;

use super::addr::{
    eam_lookup_v4, is_illegal_v4, is_illegal_v4_dst, map_4to6_via, map_6to4_via, wkp_refused, Via,
};
use super::buf::{arr16, arr4, get, ident, u16at, u8at};
use super::{csum, Config};

/// Length of the virtio-net header in front of every packet of an offload TUN.
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start + csum_offset`
/// is partial and must be completed.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_ECN` (flag on top of the type).
pub const GSO_ECN: u8 = 0x80;
/// Room the caller leaves in front of the frame: an IPv6 header is 20 bytes
/// longer than the IPv4 header it replaces.
pub const HEADROOM: usize = 20;

const TCP: u8 = 6;
/// Offset of the checksum in the TCP header.
const TCP_CSUM: u16 = 16;

/// The virtio-net header (`struct virtio_net_hdr`), in the host's byte order
/// as a TUN without `TUNSETVNETLE`/`TUNSETVNETBE` uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Reads the header from the first [`VNET_HDR_LEN`] bytes of `b`.
    pub fn decode(b: &[u8]) -> Option<VnetHdr> {
        let b = b.get(..VNET_HDR_LEN)?;
        let w = |i: usize| -> Option<u16> {
            let s = b.get(i..i + 2)?;
            Some(u16::from_ne_bytes([*s.first()?, *s.get(1)?]))
        };
        Some(VnetHdr {
            flags: *b.first()?,
            gso_type: *b.get(1)?,
            hdr_len: w(2)?,
            gso_size: w(4)?,
            csum_start: w(6)?,
            csum_offset: w(8)?,
        })
    }

    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let [a, b] = self.hdr_len.to_ne_bytes();
        let [c, d] = self.gso_size.to_ne_bytes();
        let [e, f] = self.csum_start.to_ne_bytes();
        let [g, h] = self.csum_offset.to_ne_bytes();
        [self.flags, self.gso_type, a, b, c, d, e, f, g, h]
    }
}

/// How one super-packet is translated; computed by [`plan`] without touching
/// the packet, applied by [`Plan::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// New virtio-net header and IP header, back to back.
    head: [u8; VNET_HDR_LEN + 40],
    head_len: usize,
    /// Length of the virtio-net and IP headers being replaced.
    old_head_len: usize,
    /// Length of the frame (virtio-net header and packet) being replaced.
    old_len: usize,
    /// New value of the TCP checksum field (still a partial sum).
    csum: u16,
    dst: IpAddr,
    vnet: VnetHdr,
}

impl Plan {
    /// Destination of the translated packet (the caller decides where it goes).
    pub fn destination(&self) -> IpAddr {
        self.dst
    }

    /// The translated packet's virtio-net header.
    pub fn vnet_hdr(&self) -> VnetHdr {
        self.vnet
    }

    /// Rewrites the frame planned for, which starts at `buf[at]`, in place and
    /// returns where the translated frame (virtio-net header, then packet) now
    /// lies in `buf`. An IPv4 → IPv6 frame grows by [`HEADROOM`] bytes at the
    /// front, so `at` must be at least that. `None` (nothing written) when
    /// `buf` does not hold the frame and that room.
    pub fn apply(&self, buf: &mut [u8], at: usize) -> Option<Range<usize>> {
        let start = (at + self.old_head_len).checked_sub(self.head_len)?;
        let end = at.checked_add(self.old_len)?;
        let csum_at = at + self.old_head_len + usize::from(TCP_CSUM);
        if end > buf.len() || csum_at + 2 > end {
            return None;
        }
        buf.get_mut(start..start + self.head_len)?
            .copy_from_slice(self.head.get(..self.head_len)?);
        buf.get_mut(csum_at..csum_at + 2)?
            .copy_from_slice(&self.csum.to_be_bytes());
        Some(start..end)
    }
}

/// Translates the frame at `buf[frame]` (virtio-net header, then packet) in
/// place when it is an eligible TCP super-packet: [`plan`] then
/// [`Plan::apply`]. `None`: not eligible, `buf` untouched.
pub fn translate(cfg: &Config, buf: &mut [u8], frame: Range<usize>) -> Option<Range<usize>> {
    let p = plan(cfg, buf.get(frame.clone())?)?;
    p.apply(buf, frame.start)
}

/// Plans the translation of `frame` (virtio-net header, then packet, as one
/// TUN read returns it). `None` when it is not a TCP super-packet the
/// translator would turn, segment by segment, into plain TCP segments.
pub fn plan(cfg: &Config, frame: &[u8]) -> Option<Plan> {
    let v = VnetHdr::decode(frame)?;
    let pkt = frame.get(VNET_HDR_LEN..)?;
    if v.flags != F_NEEDS_CSUM || v.csum_offset != TCP_CSUM || v.gso_size == 0 {
        return None;
    }
    match (v.gso_type & !GSO_ECN, pkt.first()? >> 4) {
        (GSO_TCPV4, 4) => plan_4to6(cfg, v, pkt),
        (GSO_TCPV6, 6) => plan_6to4(cfg, v, pkt),
        _ => None,
    }
}

/// Length of the TCP header at `pkt[off..]`, when it is whole within `end`
/// and some payload follows it. A SYN is left to the per-packet path (which
/// clamps its MSS); the kernel never makes one a super-packet anyway.
fn tcp_header_len(pkt: &[u8], off: usize, end: usize) -> Option<usize> {
    let thl = usize::from(u8at(pkt, off + 12).ok()? >> 4) * 4;
    let syn = u8at(pkt, off + 13).ok()? & 0x02 != 0;
    (thl >= 20 && off + thl < end && !syn).then_some(thl)
}

/// The partial checksum at `pkt[off + 16]` updated for the pseudo-header
/// address change from `removed` to `added`. The field holds a sum, not its
/// complement, so the RFC 1624 update (which works on complements) is applied
/// to its complement.
fn partial(pkt: &[u8], off: usize, removed: u32, added: u32) -> Option<u16> {
    let old = u16at(pkt, off + usize::from(TCP_CSUM)).ok()?;
    Some(!csum::update(!old, removed, added))
}

fn plan_4to6(cfg: &Config, v: VnetHdr, pkt: &[u8]) -> Option<Plan> {
    let hdr = get(pkt, 0, 20).ok()?;
    // No options (they are dropped or answered by the per-packet path), and
    // a header the kernel would accept.
    if u8at(pkt, 0).ok()? != 0x45 || v.csum_start != 20 || !csum::verify(0, hdr) {
        return None;
    }
    let total = usize::from(u16at(pkt, 2).ok()?);
    let flags = u16at(pkt, 6).ok()?;
    let ttl = u8at(pkt, 8).ok()?;
    // MF or a fragment offset: not a super-packet the kernel would make.
    if total > pkt.len() || flags & 0x3fff != 0 || ttl <= 1 || u8at(pkt, 9).ok()? != TCP {
        return None;
    }
    let src = arr4(pkt, 12).ok()?;
    let dst = arr4(pkt, 16).ok()?;
    if is_illegal_v4(src) || is_illegal_v4(dst) {
        return None;
    }
    let pool6 = cfg.pool6.as_ref();
    let (dst6, dst_via) = map_4to6_via(&cfg.eamt, pool6, dst, false)?;
    let (src6, src_via) = map_4to6_via(&cfg.eamt, pool6, src, false)?;
    // Non-global behind the Well-Known Prefix: dropped (and counted) by the
    // per-packet path.
    if wkp_refused(pool6, dst, dst_via) || wkp_refused(pool6, src, src_via) {
        return None;
    }
    let thl = tcp_header_len(pkt, 20, total)?;

    // Segments must fit where the per-packet path would not fragment them.
    let df = flags & 0x4000 != 0;
    let mtu6 = usize::from(cfg.ipv6_mtu).max(1280);
    let limit = if df {
        mtu6
    } else {
        mtu6.min(usize::from(cfg.lowest_ipv6_mtu).max(1280))
    };
    let room = limit.checked_sub(40 + thl).filter(|&r| r > 0)?;
    let gso_size = u16::try_from(usize::from(v.gso_size).min(room)).ok()?;

    let csum = partial(
        pkt,
        20,
        csum::add(csum::sum(&src), csum::sum(&dst)),
        csum::add(csum::sum(&src6), csum::sum(&dst6)),
    )?;
    let vnet = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV6 | (v.gso_type & GSO_ECN),
        hdr_len: u16::try_from(40 + thl).ok()?,
        gso_size,
        csum_start: 40,
        csum_offset: TCP_CSUM,
    };
    let mut head = [0u8; VNET_HDR_LEN + 40];
    let (vh, ip) = head.split_at_mut(VNET_HDR_LEN);
    vh.copy_from_slice(&vnet.to_bytes());
    let tos = u8at(pkt, 1).ok()?;
    let plen = u16::try_from(total - 20).ok()?;
    let w0 = 0x6000_0000u32 | (u32::from(tos) << 20);
    put_all(
        ip,
        &[
            &w0.to_be_bytes(),
            &plen.to_be_bytes(),
            &[TCP, ttl - 1],
            &src6,
            &dst6,
        ],
    )?;
    Some(Plan {
        head,
        head_len: VNET_HDR_LEN + 40,
        old_head_len: VNET_HDR_LEN + 20,
        old_len: VNET_HDR_LEN + total,
        csum,
        dst: IpAddr::V6(Ipv6Addr::from(dst6)),
        vnet,
    })
}

fn plan_6to4(cfg: &Config, v: VnetHdr, pkt: &[u8]) -> Option<Plan> {
    // No extension headers: TCP right after the fixed header.
    if v.csum_start != 40 || u8at(pkt, 6).ok()? != TCP {
        return None;
    }
    let w0 = u16at(pkt, 0).ok()?;
    let plen = usize::from(u16at(pkt, 4).ok()?);
    let hop = u8at(pkt, 7).ok()?;
    let end = 40 + plen;
    if end > pkt.len() || hop <= 1 {
        return None;
    }
    let src = arr16(pkt, 8).ok()?;
    let dst = arr16(pkt, 24).ok()?;
    let pool6 = cfg.pool6.as_ref();
    let (dst4, dst_via) = map_6to4_via(&cfg.eamt, pool6, &dst)?;
    let (src4, src_via) = map_6to4_via(&cfg.eamt, pool6, &src)?;
    // The per-packet path drops these (and counts them).
    if is_illegal_v4_dst(dst4)
        || is_illegal_v4(src4)
        || wkp_refused(pool6, dst4, dst_via)
        || wkp_refused(pool6, src4, src_via)
    {
        return None;
    }
    // Hairpinning (RFC 7757 App. B: through pool6 onto an EAM address) goes
    // back out as IPv6: the per-packet path's business.
    if dst_via == Via::Pool6 && eam_lookup_v4(&cfg.eamt, dst4).is_some() {
        return None;
    }
    let thl = tcp_header_len(pkt, 40, end)?;
    let total = 20 + plen;
    let total16 = u16::try_from(total).ok()?;

    let room = usize::from(cfg.ipv4_mtu)
        .checked_sub(20 + thl)
        .filter(|&r| r > 0)?;
    let gso_size = u16::try_from(usize::from(v.gso_size).min(room)).ok()?;
    // RFC 7915 §5.1: DF when the packet is bigger than 1260 bytes; the
    // kernel gives every segment the super-packet's flags, so the full-sized
    // segments decide.
    let payload = plen - thl;
    let segment = 20 + thl + payload.min(usize::from(gso_size));
    let (id, ff) = if segment > 1260 {
        (0, 0x4000)
    } else {
        let head = get(pkt, 40, 8).ok()?;
        (
            ident(
                cfg.id_salt,
                &[&src4, &dst4, &[TCP], &total.to_be_bytes(), head],
            ),
            0,
        )
    };

    let csum = partial(
        pkt,
        40,
        csum::add(csum::sum(&src), csum::sum(&dst)),
        csum::add(csum::sum(&src4), csum::sum(&dst4)),
    )?;
    let vnet = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4 | (v.gso_type & GSO_ECN),
        hdr_len: u16::try_from(20 + thl).ok()?,
        gso_size,
        csum_start: 20,
        csum_offset: TCP_CSUM,
    };
    let mut head = [0u8; VNET_HDR_LEN + 40];
    let (vh, ip) = head.split_at_mut(VNET_HDR_LEN);
    vh.copy_from_slice(&vnet.to_bytes());
    let tos = ((w0 >> 4) & 0xff) as u8;
    put_all(
        ip,
        &[
            &[0x45, tos],
            &total16.to_be_bytes(),
            &id.to_be_bytes(),
            &u16::to_be_bytes(ff),
            &[hop - 1, TCP, 0, 0],
            &src4,
            &dst4,
        ],
    )?;
    let c = csum::checksum(ip.get(..20)?);
    ip.get_mut(10..12)?.copy_from_slice(&c.to_be_bytes());
    Some(Plan {
        head,
        head_len: VNET_HDR_LEN + 20,
        old_head_len: VNET_HDR_LEN + 40,
        old_len: VNET_HDR_LEN + end,
        csum,
        dst: IpAddr::V4(Ipv4Addr::from(dst4)),
        vnet,
    })
}

/// Writes `parts` back to back at the start of `out`.
fn put_all(out: &mut [u8], parts: &[&[u8]]) -> Option<()> {
    let mut off = 0;
    for p in parts {
        out.get_mut(off..off + p.len())?.copy_from_slice(p);
        off += p.len();
    }
    Some(())
}

#[cfg(test)]
#[path = "gso_tests.rs"]
mod tests;
