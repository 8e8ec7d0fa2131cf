//! Fuzz target: the `Authorization` header value of requests to routes with
//! `basic_auth_file` (network input), and htpasswd file text.
//!
//! Invariants checked beyond "no panic":
//! * credentials come only from a `Basic` value, and the user never holds a
//!   colon (the first colon separates user and password);
//! * a parsed htpasswd file has at least one user, and its `Debug` output
//!   never holds a hash.
#![no_main]

use gatewire::proxy::basic_auth::{credentials, Htpasswd};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((user, _pass)) = credentials(data) {
        assert!(!user.contains(':'));
        let text = String::from_utf8_lossy(data);
        assert!(text
            .trim_start()
            .get(..5)
            .is_some_and(|s| s.eq_ignore_ascii_case("basic")));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(h) = Htpasswd::parse(text) {
            assert!(!h.is_empty());
            let dbg = format!("{h:?}");
            for line in text.lines().map(str::trim) {
                if let Some((user, hash)) = line.split_once(':') {
                    if !line.starts_with('#') && !user.contains('$') {
                        assert!(!dbg.contains(hash), "a hash in Debug output");
                    }
                }
            }
        }
    }
});
