//! Fuzz target: a web proxy's reply to a node's `CONNECT`
//! (`carrier::connect::parse_reply`), read as it arrives.
//!
//! Invariants checked beyond "no panic":
//! * a reply accepted whole is incomplete at every shorter prefix (the node
//!   never starts TLS on half a reply);
//! * an accepted reply ends with the empty line that ends an HTTP header
//!   (`\n`, or `\r\n`, after a line's end).
#![no_main]

use gatewire::carrier::connect::parse_reply;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if parse_reply(data) == Ok(Some(())) {
        assert!(data.ends_with(b"\n\n") || data.ends_with(b"\n\r\n"));
        for cut in [0, data.len() / 2, data.len() - 1] {
            assert_eq!(parse_reply(&data[..cut]), Ok(None), "prefix {cut}");
        }
    }
});
