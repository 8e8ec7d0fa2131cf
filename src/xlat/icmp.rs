//! ICMP: type/code mapping (RFC 7915 §4.2/4.3/5.2/5.3), translation of ICMP
//! errors with their inner packet and RFC 4884 extensions, and the errors the
//! translator generates itself (§4.4/5.4).
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use super::addr::is_illegal_v4;
use super::buf::{arr4, get, ident, len16, put, put16, put32, put8, tail, u16at, u8at, zero};
use super::v6_to_v4::V6;
use super::{csum, v4_to_v6, v6_to_v4, Config, DropReason, Packets, Res};

/// Largest ICMPv4 error we emit (RFC 1812 §4.3.2.3).
pub const MAX_ICMP4_ERR: usize = 576;
/// Largest ICMPv6 error we emit (RFC 4443 §2.4 (c)).
pub const MAX_ICMP6_ERR: usize = 1280;
/// RFC 4884 minimum length of the "original datagram" field.
const RFC4884_MIN: usize = 128;

/// ICMPv4 error types.
pub fn is_v4_error(t: u8) -> bool {
    matches!(t, 3 | 4 | 5 | 11 | 12)
}

/// IPv4 → IPv6 Parameter Problem pointer (RFC 7915 §4.2, Figure 3).
pub fn pointer_4to6(p: u8) -> Option<u8> {
    Some(match p {
        0 => 0,
        1 => 1,
        2 | 3 => 4,
        8 => 7,
        9 => 6,
        12..=15 => 8,
        16..=19 => 24,
        _ => return None,
    })
}

/// IPv6 → IPv4 Parameter Problem pointer (RFC 7915 §5.2, Figure 6).
pub fn pointer_6to4(p: u32) -> Option<u8> {
    Some(match p {
        0 => 0,
        1 => 1,
        4 | 5 => 2,
        6 => 9,
        7 => 8,
        8..=23 => 12,
        24..=39 => 16,
        _ => return None,
    })
}

/// RFC 1191 plateau estimate for a Fragmentation Needed with MTU 0.
pub fn plateau(total_len: u16) -> u16 {
    const PLATEAUS: [u16; 11] = [
        65535, 32000, 17914, 8166, 4352, 2002, 1492, 1006, 508, 296, 68,
    ];
    PLATEAUS
        .iter()
        .copied()
        .find(|&p| p < total_len)
        .unwrap_or(68)
}

/// Source for a translated ICMPv6 error whose source has no IPv4 mapping.
pub fn rfc6791_v4(cfg: &Config, payload: &[u8]) -> Option<[u8; 4]> {
    match cfg.rfc6791_v4 {
        Some((a, len)) if len < 32 => {
            let host_bits = 32 - u32::from(len);
            let mask = if host_bits >= 32 {
                u32::MAX
            } else {
                (1u32 << host_bits) - 1
            };
            let h = u32::from(ident(cfg.id_salt, &[payload.get(..48).unwrap_or(payload)]));
            Some((u32::from(a) & !mask | (h & mask)).to_be_bytes())
        }
        Some((a, _)) => Some(a.octets()),
        None => cfg.self_v4.map(|a| a.octets()),
    }
}

/// Builds an ICMPv4 error from the translator about `orig` (an IPv4 packet).
pub(super) fn reply_v4(
    cfg: &Config,
    orig: &[u8],
    ty: u8,
    code: u8,
    rest: u32,
    cause: DropReason,
    out: &mut [u8],
) -> Result<Res, DropReason> {
    let src = cfg.self_v4.ok_or(cause)?.octets();
    let dst = arr4(orig, 12)?;
    // Never answer illegal sources, an ICMP error, or a fragment other than
    // the first (RFC 1812 §4.3.2.7).
    let ihl = usize::from(u8at(orig, 0)? & 0x0f) * 4;
    let first = u16at(orig, 6)? & 0x1fff == 0;
    let about_error =
        u8at(orig, 9)? == 1 && first && orig.get(ihl).is_some_and(|&t| is_v4_error(t));
    if is_illegal_v4(dst) || about_error || !first {
        return Err(cause);
    }
    let n = orig.len().min(MAX_ICMP4_ERR - 28);
    let body = get(orig, 0, n)?;
    let total = 28 + n;
    put(out, 28, body)?;
    put8(out, 20, ty)?;
    put8(out, 21, code)?;
    put16(out, 22, 0)?;
    put32(out, 24, rest)?;
    let c = csum::checksum(get(out, 20, 8 + n)?);
    put16(out, 22, c)?;
    let id = ident(cfg.id_salt, &[&src, &dst, get(orig, 0, 8)?]);
    v6_to_v4::write_v4(out, 0, 0, len16(total)?, id, 0, 64, 1, &src, &dst)?;
    Ok(Res::Reply(Packets::one(total)?, cause))
}

/// Builds an ICMPv6 error from the translator about `orig` (an IPv6 packet).
pub(super) fn reply_v6(
    cfg: &Config,
    orig: &[u8],
    ty: u8,
    code: u8,
    rest: u32,
    cause: DropReason,
    out: &mut [u8],
) -> Result<Res, DropReason> {
    let src = cfg.self_v6.ok_or(cause)?.octets();
    let dst = super::buf::arr16(orig, 8)?;
    // Never answer multicast or unspecified sources, nor an ICMPv6 error
    // (RFC 4443 §2.4 (e)).
    if dst.first() == Some(&0xff) || dst == [0; 16] || carries_v6_error(orig) {
        return Err(cause);
    }
    let n = orig.len().min(MAX_ICMP6_ERR - 48);
    let body = get(orig, 0, n)?;
    put(out, 48, body)?;
    put8(out, 40, ty)?;
    put8(out, 41, code)?;
    put16(out, 42, 0)?;
    put32(out, 44, rest)?;
    let len = u32::try_from(8 + n).map_err(|_| DropReason::BadHeader)?;
    let c = csum::finish(csum::add(
        csum::pseudo_v6(&src, &dst, 58, len),
        csum::sum(get(out, 40, 8 + n)?),
    ));
    put16(out, 42, c)?;
    v4_to_v6::write_v6(out, 0, 0, len16(8 + n)?, 58, 64, &src, &dst)?;
    Ok(Res::Reply(Packets::one(48 + n)?, cause))
}

/// Whether IPv6 packet `p` is an ICMPv6 error: its upper layer, past any
/// Hop-by-Hop, Routing, Destination Options and first Fragment headers, is
/// ICMPv6 with a type below 128 (a later fragment carries no ICMPv6
/// header). A chain that cannot be read is not one.
fn carries_v6_error(p: &[u8]) -> bool {
    super::nat64::find_l4(p).is_ok_and(|h| {
        h.nh == 58
            && !h.frag.is_some_and(|(_, later)| later)
            && u8at(p, h.off).is_ok_and(|t| t < 128)
    })
}

/// Splits an ICMP error body into (original datagram, extension) per RFC 4884.
/// `len_bytes` is the length attribute converted to bytes (0 = no extension).
fn split_ext(body: &[u8], len_bytes: usize) -> (&[u8], &[u8], bool) {
    if len_bytes == 0 || len_bytes > body.len() {
        return (body, &[], false);
    }
    match (body.get(..len_bytes), body.get(len_bytes..)) {
        (Some(a), Some(b)) => (a, b, true),
        _ => (body, &[], false),
    }
}

/// Lays out the translated original datagram (already written at
/// `out[body_off..body_off + inner_len]`) and the extension so that the body
/// is at most `max_body` bytes. `unit` is the length attribute unit of the
/// output family (8 for ICMPv6, 4 for ICMPv4). Returns (body length, length
/// attribute in units; 0 when there is no extension).
fn fit_body(
    out: &mut [u8],
    body_off: usize,
    inner_len: usize,
    ext: Option<&[u8]>,
    unit: usize,
    max_body: usize,
) -> Result<(usize, u8), DropReason> {
    if let Some(ext) = ext {
        // Like Jool: a datagram longer than the minimum is cut down to a whole
        // number of units (rather than padded up); a shorter one is zero-padded
        // to the RFC 4884 minimum of 128 bytes.
        let padded = if inner_len >= RFC4884_MIN {
            inner_len / unit * unit
        } else {
            RFC4884_MIN
        };
        let room = if padded + ext.len() <= max_body {
            Some(padded)
        } else {
            max_body
                .checked_sub(ext.len())
                .map(|r| r / unit * unit)
                .filter(|&r| r >= RFC4884_MIN)
        };
        if let Some(room) = room {
            if let Ok(units) = u8::try_from(room / unit) {
                if room > inner_len {
                    zero(out, body_off + inner_len, room - inner_len)?;
                }
                put(out, body_off + room, ext)?;
                return Ok((room + ext.len(), units));
            }
        }
    }
    Ok((inner_len.min(max_body), 0))
}

/// Translates an ICMPv4 error (`icmp4`: the whole ICMP message) into an ICMPv6
/// error written at `out[off..]`. Returns the ICMPv6 message length.
pub(super) fn err_4to6(
    cfg: &Config,
    icmp4: &[u8],
    src6: &[u8; 16],
    dst6: &[u8; 16],
    out: &mut [u8],
    off: usize,
) -> Result<usize, DropReason> {
    if !csum::verify(0, icmp4) {
        return Err(DropReason::BadChecksum);
    }
    let ty = u8at(icmp4, 0)?;
    let code = u8at(icmp4, 1)?;
    let body = tail(icmp4, 8)?;
    let len4 = usize::from(u8at(icmp4, 5)?) * 4;
    let (region, ext, has_ext) = match ty {
        3 | 11 | 12 => split_ext(body, len4),
        _ => (body, &[][..], false),
    };
    // (type, code, rest-of-header, carries a length attribute)
    let (t6, c6, mut rest, ext_ok): (u8, u8, u32, bool) = match (ty, code) {
        (3, 0 | 1 | 5 | 6 | 7 | 8 | 11 | 12) => (1, 0, 0, true),
        (3, 2) => (4, 1, 6, false),
        (3, 3) => (1, 4, 0, true),
        (3, 4) => (2, 0, 0, false),
        (3, 9 | 10 | 13 | 15) => (1, 1, 0, true),
        (11, 0 | 1) => (3, code, 0, true),
        (12, 0 | 2) => {
            let p = pointer_4to6(u8at(icmp4, 4)?).ok_or(DropReason::UnsupportedIcmp)?;
            (4, 0, u32::from(p), false)
        }
        _ => return Err(DropReason::UnsupportedIcmp),
    };
    let body_off = off + 8;
    let inner_len = v4_to_v6::inner(cfg, region, has_ext, out, body_off)?;
    if t6 == 2 {
        let mut mtu = u16at(icmp4, 6)?;
        if mtu == 0 {
            mtu = plateau(u16at(region, 2)?);
        }
        let m = (u32::from(mtu) + 20)
            .min(u32::from(cfg.ipv6_mtu))
            .min(u32::from(cfg.ipv4_mtu) + 20)
            .max(1280);
        rest = m;
    }
    let max_body = MAX_ICMP6_ERR - 48;
    let (body_len, units) = fit_body(
        out,
        body_off,
        inner_len,
        (has_ext && ext_ok).then_some(ext),
        8,
        max_body,
    )?;
    if units != 0 {
        rest = u32::from(units) << 24;
    }
    let msg_len = 8 + body_len;
    put8(out, off, t6)?;
    put8(out, off + 1, c6)?;
    put16(out, off + 2, 0)?;
    put32(out, off + 4, rest)?;
    let l = u32::try_from(msg_len).map_err(|_| DropReason::BadHeader)?;
    let c = csum::finish(csum::add(
        csum::pseudo_v6(src6, dst6, 58, l),
        csum::sum(get(out, off, msg_len)?),
    ));
    put16(out, off + 2, c)?;
    Ok(msg_len)
}

/// Translates an ICMPv6 error (`icmp6`: the whole ICMPv6 message of packet
/// `h`) into an ICMPv4 error written at `out[off..]`. Returns the ICMPv4
/// message length.
pub(super) fn err_6to4(
    cfg: &Config,
    h: &V6,
    icmp6: &[u8],
    _src4: &[u8; 4],
    _dst4: &[u8; 4],
    out: &mut [u8],
    off: usize,
) -> Result<usize, DropReason> {
    let l = u32::try_from(icmp6.len()).map_err(|_| DropReason::BadHeader)?;
    if !csum::verify(csum::pseudo_v6(&h.src, &h.dst, 58, l), icmp6) {
        return Err(DropReason::BadChecksum);
    }
    let ty = u8at(icmp6, 0)?;
    let code = u8at(icmp6, 1)?;
    let body = tail(icmp6, 8)?;
    let len6 = usize::from(u8at(icmp6, 4)?) * 8;
    let (region, ext, has_ext) = match ty {
        1 | 3 => split_ext(body, len6),
        _ => (body, &[][..], false),
    };
    let (t4, c4, mut rest): (u8, u8, u32) = match (ty, code) {
        (1, 0 | 2 | 3) => (3, 1, 0),
        (1, 1) => (3, 10, 0),
        (1, 4) => (3, 3, 0),
        (2, _) => (3, 4, 0),
        (3, 0 | 1) => (11, code, 0),
        (4, 0) => {
            let p = super::buf::u32at(icmp6, 4)?;
            (
                12,
                0,
                u32::from(pointer_6to4(p).ok_or(DropReason::UnsupportedIcmp)?) << 24,
            )
        }
        (4, 1) => (3, 2, 0),
        _ => return Err(DropReason::UnsupportedIcmp),
    };
    let body_off = off + 8;
    let inner_len = v6_to_v4::inner(cfg, region, has_ext, out, body_off)?;
    if ty == 2 {
        let reported = super::buf::u32at(icmp6, 4)?;
        let m = reported
            .saturating_sub(20)
            .min(u32::from(cfg.ipv4_mtu))
            .min(u32::from(cfg.ipv6_mtu).saturating_sub(20));
        rest = m.min(0xffff);
    }
    let max_body = MAX_ICMP4_ERR - 28;
    let (body_len, units) = fit_body(
        out,
        body_off,
        inner_len,
        has_ext.then_some(ext),
        4,
        max_body,
    )?;
    if units != 0 {
        rest |= u32::from(units) << 16;
    }
    let msg_len = 8 + body_len;
    put8(out, off, t4)?;
    put8(out, off + 1, c4)?;
    put16(out, off + 2, 0)?;
    put32(out, off + 4, rest)?;
    let c = csum::checksum(get(out, off, msg_len)?);
    put16(out, off + 2, c)?;
    Ok(msg_len)
}
