//! Fuzz target: a shared certificate record as read back from etcd when the
//! hubs share a secret (`mesh::vault`): the input is split at the first
//! newline into the host and the stored value, which is opened with a fixed
//! key as a hub would before checking it; the rest of the input is also
//! sealed as a private key and opened again.
//!
//! Invariants checked beyond "no panic":
//! * a value that is not a sealed record comes back unchanged;
//! * a sealed record that does not come from the key does not open;
//! * what is sealed for a host opens for that host to the same bytes, and
//!   not for another host.
#![no_main]

use gatewire::mesh::acme::CertPem;
use gatewire::mesh::vault::{is_sealed, open_record, seal_record, VaultKey};
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"fuzzing the mesh vault, 32 bytes";

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let (host, rest) = data.split_at(split);
    let value = rest.get(1..).unwrap_or_default();
    let Ok(host) = std::str::from_utf8(host) else {
        return;
    };
    let keys = [VaultKey::new(SECRET)];
    match open_record(&keys, host, value) {
        Ok(plain) if !is_sealed(value) => assert_eq!(plain.as_ref(), value),
        // Forging a ChaCha20-Poly1305 tag is out of a fuzzer's reach.
        Ok(_) => panic!("a sealed record not made with the key opened"),
        Err(_) => assert!(is_sealed(value), "only sealed records fail to open"),
    }
    let Ok(key) = std::str::from_utf8(value) else {
        return;
    };
    let pem = CertPem {
        chain: "-----BEGIN CERTIFICATE-----\n".into(),
        key: key.into(),
    };
    let stored = seal_record(Some(&keys[0]), host, [3; 12], &pem);
    assert!(is_sealed(&stored));
    let plain = open_record(&keys, host, &stored).expect("sealed here, opens here");
    assert_eq!(plain.as_ref(), pem.encode().as_slice());
    let other = format!("{host}.other");
    assert!(
        open_record(&keys, &other, &stored).is_err(),
        "opened for another host"
    );
});
