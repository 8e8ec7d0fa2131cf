//! Framing of WireGuard datagrams on a byte stream (pure: bytes in, frames
//! out; no sockets).
//!
//! Each datagram is sent as a two-byte big-endian length followed by the
//! datagram itself, the framing WireGuard-over-TCP carriers commonly use. A
//! zero length is refused: WireGuard has no empty message, so it can only mean
//! a broken or hostile peer, and the stream is closed.

use bytes::{Buf, BufMut, BytesMut};

/// Bytes of the length prefix.
pub const HEADER: usize = 2;
/// The largest datagram a frame carries.
pub const MAX_DATAGRAM: usize = u16::MAX as usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A frame announced a length of zero.
    #[error("empty frame")]
    Empty,
    /// A datagram too long for the two-byte length (only on encode).
    #[error("datagram of {0} bytes does not fit a frame")]
    TooLong(usize),
}

impl FrameError {
    /// Short name, for counters.
    pub fn as_str(self) -> &'static str {
        match self {
            FrameError::Empty => "empty_frame",
            FrameError::TooLong(_) => "too_long",
        }
    }
}

/// Appends `datagram` as one frame to `out`.
pub fn encode(datagram: &[u8], out: &mut BytesMut) -> Result<(), FrameError> {
    if datagram.is_empty() {
        return Err(FrameError::Empty);
    }
    let len = u16::try_from(datagram.len()).map_err(|_| FrameError::TooLong(datagram.len()))?;
    out.reserve(HEADER + datagram.len());
    out.put_u16(len);
    out.put_slice(datagram);
    Ok(())
}

/// Takes the first complete frame off the front of `buf` and returns its
/// datagram; `Ok(None)` when `buf` holds only part of a frame (read more and
/// call again). On error `buf` is left as it was.
pub fn decode(buf: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
    let Some(&[hi, lo]) = buf.get(..HEADER) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if buf.len() < HEADER + len {
        // Room for the rest, so the reader's next read lands in place.
        buf.reserve(HEADER + len - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER);
    Ok(Some(buf.split_to(len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8]) -> (Vec<Vec<u8>>, Result<(), FrameError>, usize) {
        let mut b = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match decode(&mut b) {
                Ok(Some(d)) => out.push(d.to_vec()),
                Ok(None) => return (out, Ok(()), b.len()),
                Err(e) => return (out, Err(e), b.len()),
            }
        }
    }

    #[test]
    fn vectors() {
        let mut out = BytesMut::new();
        encode(b"\x01\x02\x03", &mut out).unwrap();
        encode(&[0xaa; 300], &mut out).unwrap();
        assert_eq!(&out[..5], b"\x00\x03\x01\x02\x03");
        assert_eq!(&out[5..7], b"\x01\x2c");
        assert_eq!(out.len(), 5 + 2 + 300);
        let (f, r, rest) = frames(&out);
        assert_eq!(r, Ok(()));
        assert_eq!(rest, 0);
        assert_eq!(f, vec![vec![1, 2, 3], vec![0xaa; 300]]);
    }

    #[test]
    fn partial_frames_wait() {
        for input in [&b""[..], b"\x00", b"\x00\x05", b"\x00\x05abcd"] {
            let (f, r, rest) = frames(input);
            assert!(f.is_empty());
            assert_eq!(r, Ok(()));
            assert_eq!(rest, input.len(), "{input:?} must stay buffered");
        }
    }

    #[test]
    fn empty_frames_are_refused_and_kept() {
        let (f, r, rest) = frames(b"\x00\x01z\x00\x00\x00\x01y");
        assert_eq!(f, vec![b"z".to_vec()]);
        assert_eq!(r, Err(FrameError::Empty));
        assert_eq!(rest, 5);
        let mut out = BytesMut::new();
        assert_eq!(encode(b"", &mut out), Err(FrameError::Empty));
        assert!(out.is_empty());
    }

    #[test]
    fn longest_fits_and_one_more_does_not() {
        let mut out = BytesMut::new();
        assert_eq!(encode(&vec![7; MAX_DATAGRAM], &mut out), Ok(()));
        assert_eq!(&out[..2], b"\xff\xff");
        let (f, r, _) = frames(&out);
        assert_eq!((f.len(), f[0].len(), r), (1, MAX_DATAGRAM, Ok(())));
        let mut out = BytesMut::new();
        assert_eq!(
            encode(&vec![0; MAX_DATAGRAM + 1], &mut out),
            Err(FrameError::TooLong(MAX_DATAGRAM + 1))
        );
        assert!(out.is_empty());
    }

    proptest::proptest! {
        /// Datagrams encoded back to back and delivered in arbitrary pieces
        /// come out whole, in order, and nothing is left over.
        #[test]
        fn any_split_gives_the_datagrams_back(
            grams in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 1..1600), 0..12),
            cuts in proptest::collection::vec(1usize..700, 0..40),
        ) {
            let mut wire = BytesMut::new();
            for g in &grams {
                encode(g, &mut wire).unwrap();
            }
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut at = 0;
            let mut cuts = cuts.into_iter();
            while at < wire.len() {
                let n = cuts.next().unwrap_or(usize::MAX).min(wire.len() - at);
                buf.extend_from_slice(&wire[at..at + n]);
                at += n;
                while let Some(d) = decode(&mut buf).unwrap() {
                    got.push(d.to_vec());
                }
            }
            proptest::prop_assert_eq!(got, grams);
            proptest::prop_assert!(buf.is_empty());
        }
    }
}
