//! Fuzz target: the framing of WireGuard datagrams on a node's TLS carrier
//! (`carrier::frame`), fed the stream in two pieces as a reader would get it.
//!
//! Invariants checked beyond "no panic":
//! * decoding the whole input or the same bytes split anywhere gives the same
//!   datagrams and the same outcome;
//! * every datagram is non-empty and re-encodes to exactly the bytes it came
//!   from.
#![no_main]

use bytes::BytesMut;
use gatewire::carrier::frame::{decode, encode, FrameError};
use libfuzzer_sys::fuzz_target;

fn run(pieces: &[&[u8]]) -> (Vec<Vec<u8>>, Option<FrameError>, usize) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for p in pieces {
        buf.extend_from_slice(p);
        loop {
            match decode(&mut buf) {
                Ok(Some(d)) => out.push(d.to_vec()),
                Ok(None) => break,
                Err(e) => return (out, Some(e), buf.len()),
            }
        }
    }
    (out, None, buf.len())
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let at = usize::from(cut).min(rest.len());
    let whole = run(&[rest]);
    let split = run(&[&rest[..at], &rest[at..]]);
    // Where a broken frame stops the reader, the bytes after it were never
    // read in one case: compare what is left only when nothing broke.
    assert_eq!((&whole.0, whole.1), (&split.0, split.1));
    if whole.1.is_none() {
        assert_eq!(whole.2, split.2);
    }
    let mut again = BytesMut::new();
    for d in &whole.0 {
        assert!(!d.is_empty());
        encode(d, &mut again).expect("a decoded datagram re-encodes");
    }
    assert_eq!(&again[..], &rest[..again.len()]);
});
