//! Fuzz target: join token decoding (`gwj1.` + base64url JSON).
//!
//! Invariants checked beyond "no panic": a decoded token encodes to a token
//! that decodes to the same value, and its secret hash is defined.
#![no_main]

use gatewire::control::token::{hash_secret_str, JoinToken};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = hash_secret_str(s);
    if let Ok(t) = JoinToken::decode(s) {
        let again = JoinToken::decode(&t.encode());
        assert_eq!(again.as_ref(), Ok(&t));
        assert_eq!(hash_secret_str(t.secret.expose()), Some(t.secret_hash()));
    }
});
