//! Fuzz target: a name claim of the hub mesh (`mesh::claims`) as read back
//! from etcd: the input is split at the first newline into the key's text
//! after `<prefix>names/` and the value; a claim that decodes goes through
//! the plan and the verdict of a hub that grants its host to another node.
//!
//! Invariants checked beyond "no panic":
//! * a key that decodes is its own normal spelling;
//! * a value that decodes encodes back to a value that decodes the same;
//! * a value larger than `MAX_CLAIM` never decodes;
//! * for a live claim of another hub, a hub granting the host to another
//!   node plans no write to it and is refused, and one granting it to the
//!   claim's owner is not.
#![no_main]

use gatewire::mesh::claims::{decode, decode_key, plan, refusal, Claims, MAX_CLAIM};
use libfuzzer_sys::fuzz_target;

const OTHER: &str = "ACb8VKRYVDsQLlaM/lmNBlPbVxHPJ+OmXSrSqJ1Pt3I=";

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let (key, rest) = data.split_at(split);
    let value = rest.get(1..).unwrap_or_default();
    let claim = decode(value);
    if value.len() > MAX_CLAIM {
        assert!(claim.is_err(), "oversized claim decoded");
    }
    let Ok(path) = std::str::from_utf8(key) else {
        return;
    };
    let Ok(host) = decode_key(path) else {
        return;
    };
    assert_eq!(host.as_str(), path, "key spelling");
    let Ok(c) = claim else {
        return;
    };
    assert_eq!(decode(&c.encode()).as_ref(), Ok(&c), "claim round trip");
    let claims: Claims = [(host.clone(), (Some(c.clone()), value.to_vec()))].into();
    let now = 1_000;
    let fqdn = host.as_str().contains('.');
    if c.hub == "me" || c.lapsed(now) || c.owner == OTHER || !fqdn {
        return;
    }
    let wants = [(host.clone(), (OTHER.to_string(), None))].into();
    let (actions, conflicts) = plan("me", &wants, &claims, now);
    assert!(actions.is_empty(), "a live claim of another hub rewritten");
    assert_eq!(conflicts.len(), 1);
    assert!(refusal("me", host.as_str(), OTHER, &[], &claims, now).is_some());
    assert!(refusal("me", host.as_str(), &c.owner, &[], &claims, now).is_none());
});
