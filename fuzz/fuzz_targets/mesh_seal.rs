//! Fuzz target: sealed PROXY v2 headers between hubs (`mesh::seal::verify`),
//! the first bytes of a connection another hub (or anyone) opened.
//!
//! Invariants checked beyond "no panic":
//! * arbitrary bytes never verify under a key they were not sealed with
//!   (whatever they are, the MAC decides);
//! * a header sealed from the input's addresses and time (with or without
//!   an acknowledgement request) verifies at that time and gives those
//!   addresses back, carries the request when asked to, fails at a hub of
//!   another name, and fails once any one byte of it chosen by the input is
//!   changed.
#![no_main]

use gatewire::mesh::ack::requested;
use gatewire::mesh::seal::{carries_seal, seal, verify, SealKey};
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

fuzz_target!(|data: &[u8]| {
    let key = SealKey::new(&[7u8; 32]).expect("32 bytes");
    // Arbitrary input as a header: refused, unless it is a genuine seal.
    if let Ok((src, dst)) = verify(&key, "hub-a", data, 1_700_000_000) {
        assert!(carries_seal(data));
        // Only a header made with this key verifies: make it again.
        let ack = requested(data).expect("a sealed header's TLVs are sound");
        let again = seal(&key, "hub-a", src, dst, 1_700_000_000, [0; 8], ack);
        assert_eq!(again.len(), data.len());
    }
    // A header made from the input verifies, and any one change breaks it.
    if data.len() < 40 {
        return;
    }
    let b = |i: usize| data.get(i).copied().unwrap_or(0);
    let ip = |at: usize| -> IpAddr {
        if b(at) & 1 == 0 {
            Ipv4Addr::new(b(at + 1), b(at + 2), b(at + 3), b(at + 4)).into()
        } else {
            let mut o = [0u8; 16];
            for (i, x) in o.iter_mut().enumerate() {
                *x = b(at + 1 + i);
            }
            Ipv6Addr::from(o).into()
        }
    };
    let src = SocketAddr::new(ip(0), u16::from_be_bytes([b(18), b(19)]));
    let dst = SocketAddr::new(ip(20), u16::from_be_bytes([b(38), b(39)]));
    let now = u64::from(u32::from_be_bytes([b(1), b(2), b(3), b(4)]));
    // The receiving hub's name, from the input too (up to 63 bytes after
    // the addresses; names are ASCII in practice, any bytes here).
    let to = String::from_utf8_lossy(data.get(40..data.len().min(103)).unwrap_or_default());
    let ack = b(8) & 1 == 1;
    let h = seal(&key, &to, src, dst, now, [b(5); 8], ack);
    let (s, d) = verify(&key, &to, &h, now).expect("a fresh seal verifies");
    assert_eq!(requested(&h), Ok(ack), "the acknowledgement request");
    assert_eq!(s.port(), src.port());
    assert_eq!(d.port(), dst.port());
    let other = SealKey::new(&[8u8; 32]).expect("32 bytes");
    assert!(
        verify(&other, &to, &h, now).is_err(),
        "another key verified"
    );
    let elsewhere = format!("{to}x");
    assert!(
        verify(&key, &elsewhere, &h, now).is_err(),
        "verified at another hub"
    );
    let at = usize::from(b(6)) % h.len();
    let mut bad = h.clone();
    if let Some(x) = bad.get_mut(at) {
        *x ^= b(7) | 1;
    }
    assert!(
        verify(&key, &to, &bad, now).is_err(),
        "byte {at} changed, still verified"
    );
});
