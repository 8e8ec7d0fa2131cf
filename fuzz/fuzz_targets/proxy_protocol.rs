//! Fuzz target: PROXY protocol header parsing (version 1 and 2), the header a
//! load balancer in front of the hub sends (`[proxy] proxy_protocol_from`).
//!
//! Invariants checked beyond "no panic":
//! * a decoded header fits in the input;
//! * every strict prefix of it is `Incomplete` (the reader waits for more
//!   bytes and never misreads a partial header);
//! * re-encoding a decoded `PROXY` command decodes to the same addresses;
//! * the TLVs of a v2 header lie within it, and a header made of the
//!   input's addresses and TLVs lists them back; the mesh's
//!   acknowledgement request is read from any input without a panic.
#![no_main]

use gatewire::proxy::proxy_protocol::{
    decode, encode_v1, encode_v2, push_tlv, tlvs_v2, Command, DecodeError, Transport,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = gatewire::mesh::ack::requested(data);
    if let Ok(tlvs) = tlvs_v2(data) {
        let d = decode(data).expect("TLVs only of a header");
        let inside = 3 * tlvs.len() + tlvs.iter().map(|t| t.value.len()).sum::<usize>();
        assert!(inside <= d.len);
    }
    tlvs_back(data);
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

/// A header of fixed addresses with TLVs cut from `data` (a type byte, a
/// length byte, that many bytes) lists those TLVs back.
fn tlvs_back(data: &[u8]) {
    let mut h = Vec::new();
    encode_v2(
        &mut h,
        Transport::Tcp,
        "192.0.2.1:1".parse().expect("address"),
        "192.0.2.2:2".parse().expect("address"),
    );
    let mut want = Vec::new();
    let mut rest = data;
    while let [kind, n, tail @ ..] = rest {
        let n = usize::from(*n).min(tail.len());
        // (What one header's length field can hold.)
        if h.len() + 3 + n > usize::from(u16::MAX) {
            break;
        }
        let (value, more) = tail.split_at(n);
        push_tlv(&mut h, *kind, value);
        want.push((*kind, value));
        rest = more;
    }
    let got = tlvs_v2(&h).expect("pushed TLVs parse");
    assert_eq!(got.len(), want.len());
    for (g, (k, v)) in got.iter().zip(want) {
        assert_eq!((g.kind, g.value), (k, v));
    }
}
