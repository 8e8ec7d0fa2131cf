//! Fuzz target: the X.509 validity reader (`notBefore`, `notAfter`) that
//! looks at certificates from the ACME server and from the mesh's etcd.
//!
//! Invariants checked beyond "no panic": `cert_not_after` agrees with
//! `cert_validity`, and the renewal time of a read validity lies within
//! it (or at its expiry less the margin, never after its expiry).
#![no_main]

use gatewire::proxy::acme::{cert_not_after, cert_validity, renew_at};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let v = cert_validity(data);
    assert_eq!(cert_not_after(data), v.map(|(_, na)| na));
    if let Some((nb, na)) = v {
        for margin in [0, 86_400, 30 * 86_400, u64::MAX] {
            assert!(renew_at(Some(nb), na, margin, "blog.gw.test") <= na);
        }
    }
});
