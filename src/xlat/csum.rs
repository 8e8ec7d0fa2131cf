//! Internet checksum helpers (RFC 1071) and incremental updates (RFC 1624).
//!
//! Sums are accumulated in a `u32` and folded to 16 bits at the end. Callers
//! combine partial sums with [`add`], so a pseudo-header, a header and a payload
//! can be summed separately without copying.
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

/// Ones'-complement sum of `data` (odd trailing byte padded with zero), not yet folded.
pub fn sum(data: &[u8]) -> u32 {
    let mut acc: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        if let [a, b] = c {
            acc = add(acc, u32::from(u16::from_be_bytes([*a, *b])));
        }
    }
    if let [last] = chunks.remainder() {
        acc = add(acc, u32::from(*last) << 8);
    }
    acc
}

/// Adds two partial sums without overflowing (end-around carry kept in the
/// upper half and folded later).
pub fn add(a: u32, b: u32) -> u32 {
    let (s, carry) = a.overflowing_add(b);
    if carry {
        // 2^32 == 2^16 * 2^16 == 1 (mod 0xFFFF): add the carry back in.
        s.wrapping_add(1)
    } else {
        s
    }
}

/// Folds a partial sum into 16 bits (ones'-complement).
pub fn fold(mut acc: u32) -> u16 {
    while acc > 0xFFFF {
        acc = (acc & 0xFFFF) + (acc >> 16);
    }
    // The loop guarantees acc <= 0xFFFF.
    u16::try_from(acc).unwrap_or(0xFFFF)
}

/// Final checksum (complement of the folded sum).
pub fn finish(acc: u32) -> u16 {
    !fold(acc)
}

/// Checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    finish(sum(data))
}

/// Pseudo-header sum for IPv4 (RFC 768/793).
pub fn pseudo_v4(src: &[u8; 4], dst: &[u8; 4], proto: u8, len: u32) -> u32 {
    let mut acc = add(sum(src), sum(dst));
    acc = add(acc, u32::from(proto));
    add(acc, (len >> 16) + (len & 0xFFFF))
}

/// Pseudo-header sum for IPv6 (RFC 8200 §8.1).
pub fn pseudo_v6(src: &[u8; 16], dst: &[u8; 16], next_header: u8, len: u32) -> u32 {
    let mut acc = add(sum(src), sum(dst));
    acc = add(acc, u32::from(next_header));
    add(acc, (len >> 16) + (len & 0xFFFF))
}

/// RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')`, where `m` is the sum of the
/// removed 16-bit words and `m'` the sum of the added ones.
///
/// A checksum that was wrong before stays wrong by exactly the same amount.
pub fn update(old: u16, removed: u32, added: u32) -> u16 {
    let mut acc = u32::from(!old);
    acc = add(acc, u32::from(!fold(removed)));
    acc = add(acc, u32::from(fold(added)));
    !fold(acc)
}

/// True when `data` (which contains its own checksum field) sums to `0xFFFF`
/// together with `extra` (e.g. a pseudo-header).
pub fn verify(extra: u32, data: &[u8]) -> bool {
    fold(add(extra, sum(data))) == 0xFFFF
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data)), 0xddf2);
    }

    #[test]
    fn odd_length() {
        assert_eq!(sum(&[0x12]), 0x1200);
    }

    #[test]
    fn update_matches_recompute() {
        let mut data = [
            0x45u8, 0, 0, 0x20, 0x12, 0x34, 0, 0, 0x40, 0x11, 0, 0, 1, 2, 3, 4,
        ];
        let c = checksum(&data);
        let old = sum(&data[12..16]);
        data[12..16].copy_from_slice(&[9, 8, 7, 6]);
        let new = sum(&data[12..16]);
        let full = checksum(&data);
        assert_eq!(update(c, old, new), full);
    }
}
