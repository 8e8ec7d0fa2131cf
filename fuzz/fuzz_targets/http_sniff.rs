//! Fuzz target: HTTP/1.x request-head sniffing.
//!
//! Invariants checked beyond "no panic":
//! * a parsed head ends inside the input and its prefixes are `Incomplete`
//!   (or an early request-line error, never a success);
//! * a parsed host name round-trips through `DomainName::parse`.
#![no_main]

use gatewire::proxy::detect::{detect, sniff_http_host, sniff_http_host_capped, SniffError};
use gatewire::proxy::names::DomainName;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = detect(data);
    if let Ok(head) = sniff_http_host(data) {
        assert!(head.head_len <= data.len());
        let prefix = data.get(..head.head_len - 1).unwrap_or_default();
        assert!(
            sniff_http_host(prefix).is_err(),
            "prefix of a complete head parsed"
        );
        if let Some(name) = head.host_name() {
            assert_eq!(DomainName::parse(name.as_str()).as_ref(), Ok(name));
        }
    }
    if let Err(SniffError::TooLarge { limit }) = sniff_http_host_capped(data, 64) {
        assert_eq!(limit, 64);
    }
});
