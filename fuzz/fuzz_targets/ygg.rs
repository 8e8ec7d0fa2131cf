//! Fuzz target: Yggdrasil admin-response parsing and link-URI validation.
//!
//! Goes to `fuzz/fuzz_targets/ygg.rs` of a cargo-fuzz crate that depends on
//! `libfuzzer-sys` and `gatewire`; run with `cargo fuzz run ygg`.
#![no_main]

use gatewire::ygg::admin::{self, AdminRequest};
use gatewire::ygg::identity::{redact_uri, LinkUri, UriRole};
use gatewire::ygg::{partial_key, Version};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Admin replies: the stream splitter, every typed parser, and dispatch.
    if let Ok(Some((value, used))) = admin::next_message(data) {
        assert!(used <= data.len());
        for req in [
            AdminRequest::List,
            AdminRequest::GetSelf,
            AdminRequest::GetPeers,
            AdminRequest::GetSessions,
            AdminRequest::GetDht,
            AdminRequest::GetTree,
        ] {
            let _ = admin::parse_reply(&req, value.clone());
        }
    }
    let _ = admin::parse_get_self(data);
    let _ = admin::parse_get_peers(data);
    let _ = admin::parse_get_sessions(data);
    let _ = admin::parse_get_dht(data);
    let _ = admin::parse_get_tree(data);
    let _ = admin::parse_list(data);
    let _ = admin::parse_ack(data);

    // Link URIs, for both dialects and both roles; a URI that parses must
    // re-parse identically and encode into an addPeer request.
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = redact_uri(s);
        for version in [Version::V0_4, Version::V0_5] {
            for role in [UriRole::Listen, UriRole::Peer] {
                if let Ok(uri) = LinkUri::parse(s, version, role) {
                    let again = LinkUri::parse(uri.as_str(), version, role);
                    assert_eq!(again.as_ref().ok(), Some(&uri));
                    if role == UriRole::Peer {
                        let req = AdminRequest::AddPeer {
                            uri,
                            interface: None,
                        };
                        assert!(req.encode(version, true).is_ok());
                    }
                }
            }
        }
    }

    // Addresses: any 16 bytes.
    if let Some(b) = data.get(..16) {
        let mut o = [0u8; 16];
        o.copy_from_slice(b);
        let _ = partial_key(&std::net::Ipv6Addr::from(o));
    }
});
