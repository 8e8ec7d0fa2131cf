//! IPv6 → IPv4 (RFC 7915 §5), including RFC 7757 hairpinning.
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use super::addr::{
    eam_lookup_v4, is_illegal_v4, is_illegal_v4_dst, map_6to4, map_6to4_via, wkp_refused, Via,
};
use super::buf::{arr16, get, ident, len16, put, put16, put8, tail, u16at, u32at, u8at};
use super::v4_to_v6::Patch;
use super::{csum, icmp, v4_to_v6, Config, DropReason, Packets, Res};

/// Fragment header contents.
#[derive(Debug, Clone, Copy)]
pub(super) struct Frag {
    /// Offset in 8-byte units.
    pub off: u16,
    pub more: bool,
    pub id: u32,
}

/// Parsed IPv6 header plus the walk over its extension headers.
#[derive(Debug, Clone, Copy)]
pub(super) struct V6 {
    pub tc: u8,
    pub plen: usize,
    pub hop: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Final next header (the transport protocol).
    pub proto: u8,
    /// Offset of the transport header (end of the extension headers).
    pub l4_off: usize,
    pub frag: Option<Frag>,
}

impl V6 {
    pub fn is_fragment(&self) -> bool {
        self.frag.is_some_and(|f| f.off != 0 || f.more)
    }
    pub fn first(&self) -> bool {
        self.frag.is_none_or(|f| f.off == 0)
    }
    pub fn proto_v4(&self) -> u8 {
        if self.proto == 58 {
            1
        } else {
            self.proto
        }
    }
}

/// Why the extension header walk stopped without a header.
pub(super) enum WalkError {
    Drop(DropReason),
    /// Routing header with Segments Left != 0: pointer to that field.
    SegmentsLeft(u32),
    /// Extension header after the Fragment header.
    AfterFragment,
}

impl From<DropReason> for WalkError {
    fn from(e: DropReason) -> Self {
        WalkError::Drop(e)
    }
}

/// Extension headers (IANA's list, but ESP and 253/254): after the Fragment
/// header none may follow, AH, Mobility, HIP and Shim6 included (RFC 7915
/// §5.1).
fn is_ext(nh: u8) -> bool {
    matches!(nh, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140)
}

/// Parses the fixed header and walks Hop-by-Hop, Routing, Destination Options
/// and Fragment headers. `b` may be truncated after the extension headers
/// (inner packets); `inner` disables the payload-length check.
pub(super) fn parse(b: &[u8], inner: bool) -> Result<V6, WalkError> {
    let w0 = u32at(b, 0)?;
    if w0 >> 28 != 6 {
        return Err(DropReason::BadHeader.into());
    }
    let plen = usize::from(u16at(b, 4)?);
    // A payload length of 0 with a Hop-by-Hop header would be a jumbogram: the
    // walk below then fails (the header does not fit), which is what we want.
    if !inner && 40 + plen > b.len() {
        return Err(DropReason::Truncated.into());
    }
    let end = if inner { b.len() } else { 40 + plen };
    let mut nh = u8at(b, 6)?;
    let mut off = 40usize;
    let mut frag: Option<Frag> = None;
    loop {
        match nh {
            0 | 43 | 60 => {
                if frag.is_some() {
                    return Err(WalkError::AfterFragment);
                }
                if nh == 0 && off != 40 {
                    return Err(DropReason::BadHeader.into());
                }
                let next = u8at(b, off)?;
                let hlen = (usize::from(u8at(b, off + 1)?) + 1) * 8;
                if off + hlen > end {
                    return Err(DropReason::Truncated.into());
                }
                if nh == 43 && u8at(b, off + 3)? != 0 && !inner {
                    return Err(WalkError::SegmentsLeft(u32::try_from(off + 3).unwrap_or(0)));
                }
                off += hlen;
                nh = next;
            }
            44 => {
                if frag.is_some() {
                    return Err(WalkError::AfterFragment);
                }
                if off + 8 > end {
                    return Err(DropReason::Truncated.into());
                }
                let next = u8at(b, off)?;
                let fo = u16at(b, off + 2)?;
                frag = Some(Frag {
                    off: fo >> 3,
                    more: fo & 1 != 0,
                    id: u32at(b, off + 4)?,
                });
                off += 8;
                nh = next;
                if is_ext(nh) {
                    return Err(WalkError::AfterFragment);
                }
            }
            _ => break,
        }
    }
    Ok(V6 {
        tc: ((w0 >> 20) & 0xff) as u8,
        plen,
        hop: u8at(b, 7)?,
        src: arr16(b, 8)?,
        dst: arr16(b, 24)?,
        proto: nh,
        l4_off: off,
        frag,
    })
}

/// Writes a 20-byte IPv4 header (with checksum) at `out[off..]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn write_v4(
    out: &mut [u8],
    off: usize,
    tos: u8,
    total: u16,
    id: u16,
    flags_frag: u16,
    ttl: u8,
    proto: u8,
    src: &[u8; 4],
    dst: &[u8; 4],
) -> Result<(), DropReason> {
    put8(out, off, 0x45)?;
    put8(out, off + 1, tos)?;
    put16(out, off + 2, total)?;
    put16(out, off + 4, id)?;
    put16(out, off + 6, flags_frag)?;
    put8(out, off + 8, ttl)?;
    put8(out, off + 9, proto)?;
    put16(out, off + 10, 0)?;
    put(out, off + 12, src)?;
    put(out, off + 16, dst)?;
    let c = csum::checksum(get(out, off, 20)?);
    put16(out, off + 10, c)
}

/// Identification, DF and fragment fields for a translated header (RFC 7915 §5.1/5.1.1).
pub(super) fn id_flags(
    cfg: &Config,
    h: &V6,
    total: usize,
    src4: &[u8; 4],
    dst4: &[u8; 4],
    l4: &[u8],
) -> (u16, u16) {
    match h.frag {
        Some(f) => ((f.id & 0xffff) as u16, (u16::from(f.more) << 13) | f.off),
        None if total > 1260 => (0, 0x4000),
        None => {
            let head = l4.get(..8).unwrap_or(l4);
            (
                ident(
                    cfg.id_salt,
                    &[src4, dst4, &[h.proto], &total.to_be_bytes(), head],
                ),
                0,
            )
        }
    }
}

/// L4 edits for IPv6 → IPv4 (first fragment or unfragmented).
#[allow(clippy::too_many_arguments)]
pub(super) fn l4_patch(
    proto: u8,
    payload: &[u8],
    l4_len: usize,
    src6: &[u8; 16],
    dst6: &[u8; 16],
    src4: &[u8; 4],
    dst4: &[u8; 4],
    inner: bool,
) -> Result<Patch, DropReason> {
    let mut p = Patch::default();
    let removed = csum::add(csum::sum(src6), csum::sum(dst6));
    let added = csum::add(csum::sum(src4), csum::sum(dst4));
    match proto {
        6 => match u16at(payload, 16) {
            Ok(old) => p.add_edit(16, csum::update(old, removed, added)),
            Err(e) if !inner => return Err(e),
            Err(_) => {}
        },
        17 => match u16at(payload, 6) {
            Ok(0) => {}
            Ok(old) => {
                let mut c = csum::update(old, removed, added);
                if c == 0 {
                    c = 0xffff;
                }
                p.add_edit(6, c);
            }
            Err(e) if !inner => return Err(e),
            Err(_) => {}
        },
        58 => {
            let ty = u8at(payload, 0)?;
            let code = u8at(payload, 1)?;
            let new_ty = match ty {
                128 => 8,
                129 => 0,
                _ => return Err(DropReason::UnsupportedIcmp),
            };
            let old_word = u16::from_be_bytes([ty, code]);
            let new_word = u16::from_be_bytes([new_ty, code]);
            p.add_edit(0, new_word);
            if let Ok(old) = u16at(payload, 2) {
                let len = u32::try_from(l4_len).map_err(|_| DropReason::BadHeader)?;
                let pseudo = csum::pseudo_v6(src6, dst6, 58, len);
                p.add_edit(
                    2,
                    csum::update(
                        old,
                        csum::add(u32::from(old_word), pseudo),
                        u32::from(new_word),
                    ),
                );
            }
        }
        _ => {}
    }
    Ok(p)
}

/// Main IPv6 → IPv4 entry.
pub(super) fn translate(cfg: &Config, input: &[u8], out: &mut [u8]) -> Result<Res, DropReason> {
    let pkt_len = 40 + usize::from(u16at(input, 4)?);
    let pkt = get(input, 0, pkt_len.min(input.len()))?;
    let h = match parse(input, false) {
        Ok(h) => h,
        Err(WalkError::Drop(e)) => return Err(e),
        Err(WalkError::SegmentsLeft(ptr)) => {
            return icmp::reply_v6(cfg, pkt, 4, 0, ptr, DropReason::SourceRoute, out);
        }
        Err(WalkError::AfterFragment) => {
            return icmp::reply_v6(cfg, pkt, 1, 1, 0, DropReason::ExtensionAfterFragment, out);
        }
    };
    let pkt = get(input, 0, 40 + h.plen)?;
    let payload = tail(pkt, h.l4_off)?;
    let is_err = h.proto == 58 && h.first() && payload.first().is_some_and(|&t| t < 128);

    if h.hop <= 1 {
        if is_err {
            return Err(DropReason::TtlExpired);
        }
        return icmp::reply_v6(cfg, pkt, 3, 0, 0, DropReason::TtlExpired, out);
    }
    if h.proto == 1 {
        return Err(DropReason::UnsupportedProtocol);
    }
    let pool6 = cfg.pool6.as_ref();
    let (dst4, dst_via) =
        map_6to4_via(&cfg.eamt, pool6, &h.dst).ok_or(DropReason::Untranslatable)?;
    let src = map_6to4_via(&cfg.eamt, pool6, &h.src);
    let src4 = match src {
        Some((a, _)) => a,
        None if is_err => icmp::rfc6791_v4(cfg, payload).ok_or(DropReason::Untranslatable)?,
        None => return Err(DropReason::Untranslatable),
    };
    // As the other way (RFC 7915 §4.1): no packet to 0/8, loopback,
    // multicast, broadcast or link-local, nor from them unless an error
    // (whose source is the RFC 6791 pool's). RFC 6052 §3.1: nor to or from
    // a non-global address behind the Well-Known Prefix (an error's source
    // excepted, as above).
    if is_illegal_v4_dst(dst4)
        || wkp_refused(pool6, dst4, dst_via)
        || (!is_err
            && (is_illegal_v4(src4) || src.is_some_and(|(a, via)| wkp_refused(pool6, a, via))))
    {
        return Err(DropReason::IllegalAddress);
    }
    // Checked before an error's checksum, which a fragment cannot verify.
    if h.proto == 58 && h.is_fragment() {
        return Err(DropReason::FragmentedIcmp);
    }
    let hairpin = hairpins(cfg, is_err, dst4, dst_via, payload);
    let total = 20 + payload.len();
    // A packet of 1260 bytes or less (DF clear, `id_flags`) gets no Packet
    // Too Big on a link narrower than that: asking for less than IPv6's
    // minimum of 1280 would get nothing smaller, again and again. It is
    // sent on, to be fragmented on the way out.
    if !hairpin && total > usize::from(cfg.ipv4_mtu) && total > 1260 && !is_err {
        let mtu = u32::from(cfg.ipv4_mtu).saturating_add(20).max(1280);
        return icmp::reply_v6(cfg, pkt, 2, 0, mtu, DropReason::PacketTooBig, out);
    }

    // With hairpinning the IPv4 packet is built at the end of `out` and then
    // translated back into the start of `out`.
    let base = if hairpin {
        out.len()
            .checked_sub(total.max(576))
            .ok_or(DropReason::OutputTooSmall)?
    } else {
        0
    };
    let len = if is_err {
        let icmp_len = icmp::err_6to4(cfg, &h, payload, &src4, &dst4, out, base + 20)?;
        let total = 20 + icmp_len;
        let (id, ff) = id_flags(cfg, &h, total, &src4, &dst4, payload);
        write_v4(
            out,
            base,
            h.tc,
            len16(total)?,
            id,
            ff,
            h.hop - 1,
            1,
            &src4,
            &dst4,
        )?;
        total
    } else {
        let patch = if h.first() {
            let mut p = l4_patch(
                h.proto,
                payload,
                payload.len(),
                &h.src,
                &h.dst,
                &src4,
                &dst4,
                false,
            )?;
            if h.proto == 6 && cfg.mss_clamp {
                // IPv4 header (20) and TCP header (20) out of the IPv4 MTU.
                super::v4_to_v6::clamp_mss(&mut p, payload, cfg.ipv4_mtu.max(576) - 40);
            }
            p
        } else {
            Patch::default()
        };
        put(out, base + 20, payload)?;
        patch.apply(out, base + 20, payload.len())?;
        let (id, ff) = id_flags(cfg, &h, total, &src4, &dst4, payload);
        write_v4(
            out,
            base,
            h.tc,
            len16(total)?,
            id,
            ff,
            h.hop - 1,
            h.proto_v4(),
            &src4,
            &dst4,
        )?;
        total
    };
    if !hairpin {
        return Ok(Res::Forward(Packets::one(len)?));
    }
    let (front, back) = out.split_at_mut(base);
    let v4 = back.get(..len).ok_or(DropReason::OutputTooSmall)?;
    match v4_to_v6::translate(cfg, v4, front, true, true)? {
        Res::Forward(p) => Ok(Res::Hairpin(p)),
        Res::Reply(_, cause) => Err(cause),
        Res::Hairpin(_) => Err(DropReason::BadHeader),
    }
}

/// RFC 7757 Appendix B: a packet hairpins when its destination was mapped
/// through pool6 onto an EAM IPv4 address; for an ICMPv6 error (`payload`:
/// its whole message) the source of the packet it carries decides the same
/// way instead. A destination inside an EAM IPv6 range is no hairpin: its
/// translation goes out as IPv4.
fn hairpins(cfg: &Config, is_err: bool, dst4: [u8; 4], dst_via: Via, payload: &[u8]) -> bool {
    let (a, via) = if is_err {
        let Ok(inner_src) = arr16(payload, 8 + 8) else {
            return false;
        };
        match map_6to4_via(&cfg.eamt, cfg.pool6.as_ref(), &inner_src) {
            Some(m) => m,
            None => return false,
        }
    } else {
        (dst4, dst_via)
    };
    via == Via::Pool6 && eam_lookup_v4(&cfg.eamt, a).is_some()
}

/// Translates the IPv6 packet inside an ICMPv6 error (`region` is what the
/// error carries of it) to IPv4 at `out[off..]`; hop limit untouched.
/// Returns the number of bytes written.
pub(super) fn inner(
    cfg: &Config,
    region: &[u8],
    exact: bool,
    out: &mut [u8],
    off: usize,
) -> Result<usize, DropReason> {
    let h = match parse(region, true) {
        Ok(h) => h,
        Err(WalkError::Drop(e)) => return Err(e),
        Err(_) => return Err(DropReason::BadHeader),
    };
    let avail = if exact {
        region.len().min(40 + h.plen)
    } else {
        region.len()
    };
    let payload = get(region, h.l4_off, avail.saturating_sub(h.l4_off))?;
    if h.proto == 58 && h.first() && payload.first().is_some_and(|&t| t < 128) {
        return Err(DropReason::NestedIcmpError);
    }
    let pool6 = cfg.pool6.as_ref();
    let src4 = map_6to4(&cfg.eamt, pool6, &h.src).ok_or(DropReason::Untranslatable)?;
    let dst4 = map_6to4(&cfg.eamt, pool6, &h.dst).ok_or(DropReason::Untranslatable)?;
    let l4_len = (40 + h.plen).saturating_sub(h.l4_off);
    let total = 20 + l4_len;
    let (id, ff) = id_flags(cfg, &h, total, &src4, &dst4, payload);
    write_v4(
        out,
        off,
        h.tc,
        len16(total)?,
        id,
        ff,
        h.hop,
        h.proto_v4(),
        &src4,
        &dst4,
    )?;
    put(out, off + 20, payload)?;
    if h.first() {
        if let Ok(p) = l4_patch(h.proto, payload, l4_len, &h.src, &h.dst, &src4, &dst4, true) {
            p.apply(out, off + 20, payload.len())?;
        }
    }
    Ok(20 + payload.len())
}
