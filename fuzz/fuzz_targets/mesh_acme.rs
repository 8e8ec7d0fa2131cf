//! Fuzz target: the shared ACME keys of the hub mesh (`mesh::acme`), as read
//! back from etcd: the input is split at the first newline into the key's text
//! after `<prefix>acme/` and the value, applied to a `Shared` view as a put,
//! then as a delete; a certificate record's PEM goes through
//! `proxy::tls::certified_key_from_pem`, as a hub taking it would.
//!
//! Invariants checked beyond "no panic":
//! * a key that parses prints back to the same text (`AcmeKey::path`);
//! * a put that applies makes the view hold exactly the decoded value under
//!   that key, and a delete takes it out again;
//! * a put that fails leaves nothing under that key;
//! * a value never decodes when it is larger than its kind allows.
#![no_main]

use gatewire::mesh::acme::{
    decode, parse_key, AcmeKey, AcmeValue, Shared, MAX_CERT_RECORD, MAX_KEY_AUTHORIZATION,
};
use libfuzzer_sys::fuzz_target;

fn held(s: &Shared, k: &AcmeKey) -> Option<AcmeValue> {
    match k {
        AcmeKey::Http01(t) => s.http01(t).map(|v| AcmeValue::Http01(v.to_string())),
        AcmeKey::Alpn01(h) => s.alpn01(h.as_str()).map(AcmeValue::Alpn01),
        AcmeKey::Dns01(d, v) => s
            .dns01(d.as_str())
            .contains(v)
            .then(|| AcmeValue::Dns01(v.clone())),
        AcmeKey::Cert(h) => s
            .cert(h.as_str())
            .cloned()
            .zip(s.cert_not_after(h.as_str()))
            .map(|(c, t)| AcmeValue::Cert(c, t)),
        AcmeKey::Lock(h) => s
            .lock_holder(h.as_str())
            .map(|v| AcmeValue::Lock(v.to_string())),
    }
}

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let (key, rest) = data.split_at(split);
    let value = rest.get(1..).unwrap_or_default();
    let Ok(path) = std::str::from_utf8(key) else {
        return;
    };
    let mut shared = Shared::default();
    let parsed = parse_key(path);
    let applied = shared.apply(path, Some(value));
    let Ok(k) = parsed else {
        assert!(applied.is_err(), "a key that does not parse applied");
        assert_eq!(shared, Shared::default());
        return;
    };
    assert_eq!(parse_key(&k.path()).as_ref(), Ok(&k), "key text round trip");
    let decoded = decode(&k, value);
    let limit = match k {
        AcmeKey::Cert(_) => MAX_CERT_RECORD,
        _ => MAX_KEY_AUTHORIZATION,
    };
    if value.len() > limit {
        assert!(decoded.is_err(), "oversized value decoded");
    }
    match (&applied, &decoded) {
        (Ok(_), Ok(v)) => assert_eq!(held(&shared, &k).as_ref(), Some(v)),
        (Err(_), Err(_)) => assert_eq!(held(&shared, &k), None),
        _ => panic!("apply and decode disagree: {applied:?} / {decoded:?}"),
    }
    if let Ok(AcmeValue::Cert(pem, _)) = &decoded {
        // What a hub does before it serves a shared certificate.
        let _ =
            gatewire::proxy::tls::certified_key_from_pem(pem.chain.as_bytes(), pem.key.as_bytes());
    }
    assert!(shared.apply(path, None).is_ok(), "a delete of a parsed key");
    assert_eq!(held(&shared, &k), None, "deleted");
    assert_eq!(shared, Shared::default());
});
