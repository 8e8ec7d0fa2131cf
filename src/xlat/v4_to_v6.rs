//! IPv4 → IPv6 (RFC 7915 §4).
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use super::addr::{is_illegal_v4, map_4to6, map_4to6_via, wkp_refused};
use super::buf::{arr4, get, len16, put, put16, put32, put8, tail, u16at, u8at};
use super::{csum, icmp, Config, DropReason, Packets, Res};

/// Parsed IPv4 header.
#[derive(Debug, Clone, Copy)]
pub(super) struct V4 {
    pub ihl: usize,
    pub tos: u8,
    pub total: usize,
    pub id: u16,
    pub df: bool,
    pub mf: bool,
    /// Fragment offset in 8-byte units.
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

impl V4 {
    pub fn is_fragment(&self) -> bool {
        self.mf || self.frag_off != 0
    }
}

/// Parses an IPv4 header. For an outer packet (`inner == false`) the header
/// checksum is verified and the total length must be present; an inner packet
/// (inside an ICMP error) may be truncated after its header.
pub(super) fn parse(b: &[u8], inner: bool) -> Result<V4, DropReason> {
    let vihl = u8at(b, 0)?;
    if vihl >> 4 != 4 {
        return Err(DropReason::BadHeader);
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 {
        return Err(DropReason::BadHeader);
    }
    let hdr = get(b, 0, ihl)?;
    let total = usize::from(u16at(b, 2)?);
    if total < ihl {
        return Err(DropReason::BadHeader);
    }
    if !inner {
        if total > b.len() {
            return Err(DropReason::Truncated);
        }
        if !csum::verify(0, hdr) {
            return Err(DropReason::BadChecksum);
        }
    }
    let flags = u16at(b, 6)?;
    Ok(V4 {
        ihl,
        tos: u8at(b, 1)?,
        total,
        id: u16at(b, 4)?,
        df: flags & 0x4000 != 0,
        mf: flags & 0x2000 != 0,
        frag_off: flags & 0x1fff,
        ttl: u8at(b, 8)?,
        proto: u8at(b, 9)?,
        src: arr4(b, 12)?,
        dst: arr4(b, 16)?,
    })
}

/// Writes a 40-byte IPv6 header at `out[off..]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn write_v6(
    out: &mut [u8],
    off: usize,
    tc: u8,
    plen: u16,
    nh: u8,
    hop: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
) -> Result<(), DropReason> {
    put32(out, off, 0x6000_0000 | (u32::from(tc) << 20))?;
    put16(out, off + 4, plen)?;
    put8(out, off + 6, nh)?;
    put8(out, off + 7, hop)?;
    put(out, off + 8, src)?;
    put(out, off + 24, dst)
}

/// Writes an 8-byte Fragment header.
pub(super) fn write_frag(
    out: &mut [u8],
    off: usize,
    nh: u8,
    offset_bytes: usize,
    more: bool,
    id: u32,
) -> Result<(), DropReason> {
    let units = u16::try_from(offset_bytes / 8).map_err(|_| DropReason::Fragment)?;
    if units > 0x1fff {
        return Err(DropReason::Fragment);
    }
    put8(out, off, nh)?;
    put8(out, off + 1, 0)?;
    put16(out, off + 2, (units << 3) | u16::from(more))?;
    put32(out, off + 4, id)
}

/// Up to two 16-bit edits to apply to a copied L4 header.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Patch {
    edits: [(usize, u16); 2],
    n: usize,
}

impl Patch {
    /// The value of the edit at `off`, if there is one.
    fn edit_mut(&mut self, off: usize) -> Option<&mut u16> {
        self.edits
            .get_mut(..self.n)?
            .iter_mut()
            .find(|(o, _)| *o == off)
            .map(|(_, v)| v)
    }

    pub fn add_edit(&mut self, off: usize, v: u16) {
        if let Some(e) = self.edits.get_mut(self.n) {
            *e = (off, v);
            self.n += 1;
        }
    }

    /// Applies the edits to `out[base..base + avail]`, skipping fields that
    /// are not present (truncated inner packets).
    pub fn apply(&self, out: &mut [u8], base: usize, avail: usize) -> Result<(), DropReason> {
        for &(off, v) in self.edits.get(..self.n).unwrap_or(&[]) {
            if off + 2 <= avail {
                put16(out, base + off, v)?;
            }
        }
        Ok(())
    }
}

/// The MSS option of a TCP SYN (`tcp` is the TCP header onward): its value's
/// offset in `tcp` and the value. `None` for anything else or when the
/// options are malformed.
pub(super) fn tcp_syn_mss(tcp: &[u8]) -> Option<(usize, u16)> {
    if tcp.get(13)? & 0x02 == 0 {
        return None;
    }
    let doff = usize::from(tcp.get(12)? >> 4) * 4;
    let opts = tcp.get(20..doff)?;
    let i = find_option(opts, |kind, len, _| Some(kind == 2 && len == 4))?;
    let v = u16::from_be_bytes([*opts.get(i + 2)?, *opts.get(i + 3)?]);
    Some((20 + i + 2, v))
}

/// Lowers the MSS of a TCP SYN to `max` (the other side's MTU less the IP and
/// TCP headers) so the connection never sends segments that would not fit
/// after translation; the checksum edit takes the change along (so a wrong
/// checksum stays wrong). Needs the checksum edit at offset 16 in `patch`.
pub(super) fn clamp_mss(patch: &mut Patch, tcp: &[u8], max: u16) {
    let Some((off, mss)) = tcp_syn_mss(tcp) else {
        return;
    };
    if mss <= max {
        return;
    }
    let Some(c) = patch.edit_mut(16) else {
        return;
    };
    // A value at an odd offset (the option after a single NOP) straddles
    // two of the checksum's 16-bit words: its bytes count swapped.
    *c = if off % 2 == 0 {
        csum::update(*c, u32::from(mss), u32::from(max))
    } else {
        csum::update(*c, u32::from(mss.swap_bytes()), u32::from(max.swap_bytes()))
    };
    patch.add_edit(off, max);
}

/// Protocol numbers that exist only in IPv6 and must not be passed through.
fn v6_only_proto(p: u8) -> bool {
    matches!(p, 0 | 43 | 44 | 58 | 60)
}

/// Computes the L4 edits for a first fragment or unfragmented packet
/// (`payload` is what is available; `l4_len` the L4 length the headers claim).
#[allow(clippy::too_many_arguments)]
pub(super) fn l4_patch(
    proto: u8,
    payload: &[u8],
    l4_len: usize,
    src4: &[u8; 4],
    dst4: &[u8; 4],
    src6: &[u8; 16],
    dst6: &[u8; 16],
    inner: bool,
) -> Result<Patch, DropReason> {
    let mut p = Patch::default();
    let removed = csum::add(csum::sum(src4), csum::sum(dst4));
    let added = csum::add(csum::sum(src6), csum::sum(dst6));
    match proto {
        6 => {
            if let Ok(old) = u16at(payload, 16) {
                p.add_edit(16, csum::update(old, removed, added));
            } else if !inner {
                return Err(DropReason::Truncated);
            }
        }
        17 => match u16at(payload, 6) {
            Ok(0) => {} // handled by the caller (outer) or left alone (inner)
            Ok(old) => {
                let mut c = csum::update(old, removed, added);
                if c == 0 {
                    c = 0xffff;
                }
                p.add_edit(6, c);
            }
            Err(e) => {
                if !inner {
                    return Err(e);
                }
            }
        },
        1 => {
            let ty = u8at(payload, 0)?;
            let code = u8at(payload, 1)?;
            let new_ty = match ty {
                8 => 128,
                0 => 129,
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
                        u32::from(old_word),
                        csum::add(u32::from(new_word), pseudo),
                    ),
                );
            }
        }
        _ => {}
    }
    Ok(p)
}

/// Main IPv4 → IPv6 entry. `hairpin`: second pass of a hairpinned packet
/// (no TTL decrement, source mapped through pool6 only). `src_pool6_only`:
/// source mapped through pool6 only (never into an EAM IPv6 range).
pub(super) fn translate(
    cfg: &Config,
    input: &[u8],
    out: &mut [u8],
    hairpin: bool,
    src_pool6_only: bool,
) -> Result<Res, DropReason> {
    let h = parse(input, false)?;
    let pkt = get(input, 0, h.total)?;
    let payload = tail(pkt, h.ihl)?;
    let first = h.frag_off == 0;
    let is_err = h.proto == 1 && first && icmp::is_v4_error(payload.first().copied().unwrap_or(0));

    if !hairpin && h.ttl <= 1 {
        if is_err {
            return Err(DropReason::TtlExpired);
        }
        return icmp::reply_v4(cfg, pkt, 11, 0, 0, DropReason::TtlExpired, out);
    }
    if unexpired_source_route(get(pkt, 20, h.ihl - 20)?) {
        if is_err {
            return Err(DropReason::SourceRoute);
        }
        return icmp::reply_v4(cfg, pkt, 3, 5, 0, DropReason::SourceRoute, out);
    }
    if v6_only_proto(h.proto) {
        return Err(DropReason::UnsupportedProtocol);
    }

    let pool6 = cfg.pool6.as_ref();
    let (dst6, dst_via) =
        map_4to6_via(&cfg.eamt, pool6, h.dst, false).ok_or(DropReason::Untranslatable)?;
    let src = map_4to6_via(&cfg.eamt, pool6, h.src, hairpin || src_pool6_only);
    let src6 = match src {
        Some((a, _)) => a,
        None if is_err => cfg
            .rfc6791_v6
            .or(cfg.self_v6)
            .map(|a| a.octets())
            .ok_or(DropReason::Untranslatable)?,
        None => return Err(DropReason::Untranslatable),
    };
    // RFC 6052 §3.1 as well: no non-global address behind the Well-Known
    // Prefix, an error's source excepted.
    if is_illegal_v4(h.dst)
        || wkp_refused(pool6, h.dst, dst_via)
        || (!is_err
            && (is_illegal_v4(h.src) || src.is_some_and(|(_, via)| wkp_refused(pool6, h.src, via))))
    {
        return Err(DropReason::IllegalAddress);
    }
    let hop = if hairpin { h.ttl } else { h.ttl - 1 };
    let nh = if h.proto == 1 { 58 } else { h.proto };

    // Checked before an error's checksum, which a fragment cannot verify.
    if h.proto == 1 && h.is_fragment() {
        return Err(DropReason::FragmentedIcmp);
    }
    if is_err {
        let icmp_len = icmp::err_4to6(cfg, payload, &src6, &dst6, out, 40)?;
        write_v6(out, 0, h.tos, len16(icmp_len)?, 58, hop, &src6, &dst6)?;
        return Ok(Res::Forward(Packets::one(40 + icmp_len)?));
    }

    // L4 edits (first fragment / unfragmented only).
    let mut patch = Patch::default();
    if first {
        if h.proto == 17 && u16at(payload, 6).ok() == Some(0) {
            if h.is_fragment() || !cfg.amend_udp_checksum_zero {
                return icmp::reply_v4(cfg, pkt, 3, 13, 0, DropReason::UdpZeroChecksum, out);
            }
            // The datagram is what the UDP Length says, not the IPv4
            // payload (which may carry padding after it).
            let ulen = usize::from(u16at(payload, 4)?);
            if ulen < 8 {
                return Err(DropReason::BadHeader);
            }
            let udp = get(payload, 0, ulen)?;
            let len = u32::try_from(ulen).map_err(|_| DropReason::BadHeader)?;
            let mut c = csum::finish(csum::add(
                csum::pseudo_v6(&src6, &dst6, 17, len),
                csum::sum(udp),
            ));
            if c == 0 {
                c = 0xffff;
            }
            patch.add_edit(6, c);
        } else {
            patch = l4_patch(
                h.proto,
                payload,
                payload.len(),
                &h.src,
                &h.dst,
                &src6,
                &dst6,
                false,
            )?;
            if h.proto == 6 && cfg.mss_clamp {
                // IPv6 header (40) and TCP header (20) out of the IPv6 MTU.
                clamp_mss(&mut patch, payload, cfg.ipv6_mtu.max(1280) - 60);
            }
        }
    }

    let frag_hdr = usize::from(h.is_fragment()) * 8;
    let whole = 40 + frag_hdr + payload.len();
    let mtu6 = usize::from(cfg.ipv6_mtu).max(1280);
    if h.df && whole > mtu6 {
        let mtu = u32::from(cfg.ipv6_mtu.max(1280)) - 20;
        return icmp::reply_v4(cfg, pkt, 3, 4, mtu, DropReason::PacketTooBig, out);
    }
    let limit = if h.df {
        mtu6
    } else {
        mtu6.min(usize::from(cfg.lowest_ipv6_mtu).max(1280))
    };

    if whole <= limit {
        let mut off = 40;
        if h.is_fragment() {
            write_frag(
                out,
                40,
                h.proto_v6(),
                usize::from(h.frag_off) * 8,
                h.mf,
                u32::from(h.id),
            )?;
            off = 48;
        }
        put(out, off, payload)?;
        patch.apply(out, off, payload.len())?;
        let plen = len16(whole - 40)?;
        write_v6(
            out,
            0,
            h.tos,
            plen,
            if h.is_fragment() { 44 } else { nh },
            hop,
            &src6,
            &dst6,
        )?;
        return Ok(Res::Forward(Packets::one(whole)?));
    }

    // Fragment: every piece but the last carries a multiple of 8 bytes.
    let max_piece = (limit - 48) & !7;
    let mut packets = Packets::new();
    let mut pos = 0usize;
    let mut base = 0usize;
    let base_off = usize::from(h.frag_off) * 8;
    while pos < payload.len() {
        let n = max_piece.min(payload.len() - pos);
        let last = pos + n >= payload.len();
        let piece = get(payload, pos, n)?;
        write_v6(out, base, h.tos, len16(8 + n)?, 44, hop, &src6, &dst6)?;
        write_frag(
            out,
            base + 40,
            nh,
            base_off + pos,
            !last || h.mf,
            u32::from(h.id),
        )?;
        put(out, base + 48, piece)?;
        if pos == 0 {
            patch.apply(out, base + 48, n)?;
        }
        packets.push(48 + n)?;
        pos += n;
        base += 48 + n;
    }
    Ok(Res::Forward(packets))
}

impl V4 {
    fn proto_v6(&self) -> u8 {
        if self.proto == 1 {
            58
        } else {
            self.proto
        }
    }
}

/// True if the options hold an unexpired LSRR/SSRR option (RFC 7915 §4.1).
fn unexpired_source_route(opts: &[u8]) -> bool {
    source_route_at(opts).is_some()
}

/// Offset of the first unexpired LSRR/SSRR option.
fn source_route_at(opts: &[u8]) -> Option<usize> {
    find_option(opts, |kind, len, o| {
        Some((kind == 131 || kind == 137) && usize::from(*o.get(2)?) <= len)
    })
}

/// Walks IPv4 or TCP options (kind, length, value; kind 0 ends the list, 1
/// is a one-byte pad) to the first option for which `want(kind, len, rest)`
/// holds, `rest` starting at that option; returns its offset. A malformed
/// length, or `want` giving `None` (bytes it needs are missing), ends the
/// walk with `None`.
fn find_option(opts: &[u8], want: impl Fn(u8, usize, &[u8]) -> Option<bool>) -> Option<usize> {
    let mut i = 0usize;
    while let Some(&kind) = opts.get(i) {
        match kind {
            0 => return None,
            1 => i += 1,
            _ => {
                let len = usize::from(*opts.get(i + 1)?);
                if len < 2 {
                    return None;
                }
                if want(kind, len, opts.get(i..)?)? {
                    return Some(i);
                }
                i += len;
            }
        }
    }
    None
}

/// Translates the IPv4 packet inside an ICMPv4 error (`region` is what the
/// error carries of it) to IPv6 at `out[off..]`. The TTL is not decremented.
/// Returns the number of bytes written.
pub(super) fn inner(
    cfg: &Config,
    region: &[u8],
    exact: bool,
    out: &mut [u8],
    off: usize,
) -> Result<usize, DropReason> {
    let h = parse(region, true)?;
    let avail = if exact {
        region.len().min(h.total)
    } else {
        region.len()
    };
    let payload = get(region, h.ihl, avail.saturating_sub(h.ihl))?;
    let first = h.frag_off == 0;
    if h.proto == 1 && first {
        if let Some(&t) = payload.first() {
            if icmp::is_v4_error(t) {
                return Err(DropReason::NestedIcmpError);
            }
        }
    }
    if v6_only_proto(h.proto) {
        return Err(DropReason::UnsupportedProtocol);
    }
    let pool6 = cfg.pool6.as_ref();
    let src6 = map_4to6(&cfg.eamt, pool6, h.src, false).ok_or(DropReason::Untranslatable)?;
    let dst6 = map_4to6(&cfg.eamt, pool6, h.dst, false).ok_or(DropReason::Untranslatable)?;
    let frag_hdr = usize::from(h.is_fragment()) * 8;
    let l4_len = h.total - h.ihl;
    let plen = len16(l4_len + frag_hdr)?;
    let mut poff = off + 40;
    if h.is_fragment() {
        write_frag(
            out,
            off + 40,
            h.proto_v6(),
            usize::from(h.frag_off) * 8,
            h.mf,
            u32::from(h.id),
        )?;
        poff += 8;
    }
    write_v6(
        out,
        off,
        h.tos,
        plen,
        if h.is_fragment() { 44 } else { h.proto_v6() },
        h.ttl,
        &src6,
        &dst6,
    )?;
    put(out, poff, payload)?;
    if first {
        // Inner ICMP that is not echo is left alone.
        if let Ok(p) = l4_patch(h.proto, payload, l4_len, &h.src, &h.dst, &src6, &dst6, true) {
            p.apply(out, poff, payload.len())?;
        }
    }
    Ok(40 + frag_hdr + payload.len())
}
