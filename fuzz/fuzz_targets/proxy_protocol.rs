//! Fuzz target: PROXY protocol header parsing (version 1 and 2), the header a
//! load balancer in front of the hub sends (`[proxy] proxy_protocol_from`).
//!
//! Invariants checked beyond "no panic":
//! * a decoded header fits in the input;
//! * every strict prefix of it is `Incomplete` (the reader waits for more
//!   bytes and never misreads a partial header);
//! * re-encoding a decoded `PROXY` command decodes to the same addresses.
#![no_main]

use gatewire::proxy::proxy_protocol::{
    decode, encode_v1, encode_v2, Command, DecodeError, Transport,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(d) = decode(data) else { return };
    assert!(d.len > 0 && d.len <= data.len());
    for cut in [0, d.len / 2, d.len - 1] {
        let prefix = data.get(..cut).unwrap_or_default();
        assert_eq!(
            decode(prefix),
            Err(DecodeError::Incomplete),
            "prefix {cut} of {}",
            d.len
        );
    }
    if let Command::Proxy {
        transport,
        src,
        dst,
    } = d.command
    {
        let mut again = Vec::new();
        if transport == Transport::Tcp && data.first() == Some(&b'P') {
            encode_v1(&mut again, src, dst);
        } else {
            encode_v2(&mut again, transport, src, dst);
        }
        let Ok(d2) = decode(&again) else {
            panic!("re-encoded header does not decode")
        };
        let Command::Proxy {
            src: s2, dst: d2a, ..
        } = d2.command
        else {
            panic!("re-encoded header is not PROXY")
        };
        assert_eq!(s2.port(), src.port());
        assert_eq!(d2a.port(), dst.port());
        assert_eq!(s2.ip().to_canonical(), src.ip().to_canonical());
    }
});
