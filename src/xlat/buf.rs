//! Checked byte access helpers: every read or write is bounds-checked and
//! turned into a [`DropReason`] instead of a panic.
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use super::DropReason;

/// `b[start..start + len]`, or `Truncated`.
pub fn get(b: &[u8], start: usize, len: usize) -> Result<&[u8], DropReason> {
    let end = start.checked_add(len).ok_or(DropReason::Truncated)?;
    b.get(start..end).ok_or(DropReason::Truncated)
}

/// `b[start..]`, or `Truncated`.
pub fn tail(b: &[u8], start: usize) -> Result<&[u8], DropReason> {
    b.get(start..).ok_or(DropReason::Truncated)
}

/// One byte, or `Truncated`.
pub fn u8at(b: &[u8], off: usize) -> Result<u8, DropReason> {
    b.get(off).copied().ok_or(DropReason::Truncated)
}

/// Big-endian u16, or `Truncated`.
pub fn u16at(b: &[u8], off: usize) -> Result<u16, DropReason> {
    match get(b, off, 2)? {
        [x, y] => Ok(u16::from_be_bytes([*x, *y])),
        _ => Err(DropReason::Truncated),
    }
}

/// Big-endian u32, or `Truncated`.
pub fn u32at(b: &[u8], off: usize) -> Result<u32, DropReason> {
    match get(b, off, 4)? {
        [a, x, y, z] => Ok(u32::from_be_bytes([*a, *x, *y, *z])),
        _ => Err(DropReason::Truncated),
    }
}

/// Four bytes as an array.
pub fn arr4(b: &[u8], off: usize) -> Result<[u8; 4], DropReason> {
    let mut a = [0u8; 4];
    a.copy_from_slice(get(b, off, 4)?);
    Ok(a)
}

/// Sixteen bytes as an array.
pub fn arr16(b: &[u8], off: usize) -> Result<[u8; 16], DropReason> {
    let mut a = [0u8; 16];
    a.copy_from_slice(get(b, off, 16)?);
    Ok(a)
}

/// Mutable `out[start..start + len]`, or `OutputTooSmall`.
pub fn get_mut(out: &mut [u8], start: usize, len: usize) -> Result<&mut [u8], DropReason> {
    let end = start.checked_add(len).ok_or(DropReason::OutputTooSmall)?;
    out.get_mut(start..end).ok_or(DropReason::OutputTooSmall)
}

/// Copies `data` to `out[off..]`.
pub fn put(out: &mut [u8], off: usize, data: &[u8]) -> Result<(), DropReason> {
    get_mut(out, off, data.len())?.copy_from_slice(data);
    Ok(())
}

/// Writes one byte.
pub fn put8(out: &mut [u8], off: usize, v: u8) -> Result<(), DropReason> {
    *out.get_mut(off).ok_or(DropReason::OutputTooSmall)? = v;
    Ok(())
}

/// Writes a big-endian u16.
pub fn put16(out: &mut [u8], off: usize, v: u16) -> Result<(), DropReason> {
    put(out, off, &v.to_be_bytes())
}

/// Writes a big-endian u32.
pub fn put32(out: &mut [u8], off: usize, v: u32) -> Result<(), DropReason> {
    put(out, off, &v.to_be_bytes())
}

/// Zero-fills `out[off..off + len]`.
pub fn zero(out: &mut [u8], off: usize, len: usize) -> Result<(), DropReason> {
    get_mut(out, off, len)?.fill(0);
    Ok(())
}

/// Converts a length to u16, or `BadHeader` when it does not fit.
pub fn len16(v: usize) -> Result<u16, DropReason> {
    u16::try_from(v).map_err(|_| DropReason::BadHeader)
}

/// Deterministic, keyed 16-bit identification (FNV-1a), never zero.
pub fn ident(salt: u32, parts: &[&[u8]]) -> u16 {
    let mut h: u32 = 0x811c_9dc5 ^ salt;
    for p in parts {
        for &b in *p {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    let v = ((h >> 16) ^ (h & 0xFFFF)) as u16;
    if v == 0 {
        1
    } else {
        v
    }
}
