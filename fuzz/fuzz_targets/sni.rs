//! Fuzz target: TLS ClientHello parsing and protocol detection.
//!
//! Invariants checked beyond "no panic":
//! * a parsed ClientHello means `detect` says TLS;
//! * every strict prefix of the records that carried it is `Incomplete`;
//! * `Incomplete { needed: Some(k) }` is never 0.
#![no_main]

use gatewire::proxy::detect::{
    detect, parse_client_hello, parse_client_hello_capped, Detected, SniError,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let detected = detect(data);
    match parse_client_hello(data) {
        Ok(info) => {
            assert_eq!(detected, Detected::Tls);
            let len = info.records_len();
            assert!(len <= data.len());
            for cut in [len - 1, len / 2, 5.min(len - 1)] {
                let prefix = data.get(..cut).unwrap_or_default();
                assert!(
                    matches!(parse_client_hello(prefix), Err(SniError::Incomplete { .. })),
                    "prefix {cut} of {len} not Incomplete"
                );
            }
            let _ = info.server_name();
            let _ = info.alpn_protocols().count();
            let _ = info.max_version();
            let _ = info.into_owned();
        }
        Err(SniError::Incomplete { needed }) => {
            assert_ne!(needed, Some(0));
            assert_ne!(detected, Detected::Unknown);
        }
        Err(_) => {}
    }
    let _ = parse_client_hello_capped(data, 256);
});
