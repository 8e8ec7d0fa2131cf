//! Fuzz target: WebSocket frames of a carried tunnel
//! (`carrier::ws::Decoder`), read as they arrive, at a node and at the hub,
//! and the hub's answer to a node's opening request (`parse_response`).
//!
//! Invariants checked beyond "no panic":
//! * a message is never longer than `MAX_MESSAGE`;
//! * feeding the same bytes in two pieces gives the same messages and the
//!   same verdict as feeding them whole;
//! * an accepted answer's header length is within the input.
#![no_main]

use bytes::BytesMut;
use gatewire::carrier::ws::{parse_response, Decoder, Msg, MAX_MESSAGE};
use libfuzzer_sys::fuzz_target;

fn run(masked: bool, pieces: &[&[u8]]) -> (Vec<Msg>, bool) {
    let mut d = Decoder::new(masked);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for p in pieces {
        buf.extend_from_slice(p);
        loop {
            match d.decode(&mut buf) {
                Ok(Some(m)) => {
                    if let Msg::Data(b) = &m {
                        assert!(b.len() <= MAX_MESSAGE);
                    }
                    out.push(m);
                }
                Ok(None) => break,
                Err(_) => return (out, false),
            }
        }
    }
    (out, true)
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let masked = first & 1 == 1;
    let cut = usize::from(first >> 1).min(rest.len());
    let whole = run(masked, &[rest]);
    let split = run(masked, &[&rest[..cut], &rest[cut..]]);
    assert_eq!(whole, split);
    if let Ok(Some(len)) = parse_response(rest, "AAAAAAAAAAAAAAAAAAAAAA==") {
        assert!(len <= rest.len());
    }
});
