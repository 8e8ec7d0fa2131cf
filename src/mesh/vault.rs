//! Private keys of shared certificates, sealed with the mesh secret.
//!
//! When the hubs share a secret (`[mesh] secret_file`), a certificate record
//! a hub stores under `<prefix>acme/certs/<host>` carries its private key
//! encrypted, not in clear:
//!
//! ```text
//! {"chain": "-----BEGIN CERTIFICATE-----...", "key_sealed": "v1.<base64>"}
//! ```
//!
//! `<base64>` is a 12-byte random nonce followed by the PEM key encrypted
//! with ChaCha20-Poly1305 (and its 16-byte tag), under a key derived from
//! the secret with HKDF-SHA256; the associated data is the host and the
//! SHA-256 of the chain, so a sealed key copied under another host, or next
//! to another chain, does not open. Hubs seal with the first
//! secret and open with any (rotation without downtime). Records with the
//! key in clear (written before the secret, or by a hub without one) are
//! still read.
//!
//! Pure: the caller passes the nonce. [`open_record`] turns a stored record
//! into the plain form that [`super::acme::decode`] checks; [`seal_record`]
//! makes the stored form of a plain one.

use super::acme::CertPem;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// The version prefix of a sealed key.
const V1: &str = "v1.";
/// HKDF salt and info: this key is for nothing but sealed certificate keys.
const SALT: &[u8] = b"gatewire mesh vault";
const INFO: &[u8] = b"acme certificate private key v1";
/// Longest sealed key taken (a PEM key is a few KiB at most).
pub const MAX_SEALED: usize = 32 * 1024;

/// A key derived from one mesh secret. `Debug` shows nothing of it.
pub struct VaultKey(LessSafeKey);

impl std::fmt::Debug for VaultKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VaultKey(..)")
    }
}

impl VaultKey {
    pub fn new(secret: &[u8]) -> VaultKey {
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, SALT).extract(secret);
        let info = [INFO];
        // The output length is the algorithm's key length by construction.
        let key = match prk.expand(&info, &CHACHA20_POLY1305) {
            Ok(okm) => UnboundKey::from(okm),
            Err(_) => unreachable!("HKDF-SHA256 gives 32 bytes"),
        };
        VaultKey(LessSafeKey::new(key))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    #[error("the certificate's sealed key does not open with this hub's mesh secrets (another secret_file, or a record copied from another host)")]
    NoKey,
    #[error("the certificate's sealed key is malformed")]
    Malformed,
}

/// The stored form of a record with a sealed key.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SealedRecord {
    chain: String,
    key_sealed: String,
}

/// The associated data of the key sealed for `host` beside `chain`.
fn aad(host: &str, chain: &str) -> Vec<u8> {
    let mut a = host.as_bytes().to_vec();
    a.push(0);
    a.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, chain.as_bytes()).as_ref());
    a
}

/// Seals `plain` (a PEM key) for `host` beside `chain`.
pub fn seal(
    key: &VaultKey,
    host: &str,
    chain: &str,
    nonce: [u8; NONCE_LEN],
    plain: &str,
) -> String {
    let aad = aad(host, chain);
    let mut buf = plain.as_bytes().to_vec();
    // Sealing fails only for inputs beyond ChaCha20's 256 GiB.
    if key
        .0
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad.as_slice()),
            &mut buf,
        )
        .is_err()
    {
        return String::new();
    }
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buf);
    format!("{V1}{}", B64.encode(out))
}

/// Opens a key sealed for `host` beside `chain` with any of `keys`.
pub fn open(
    keys: &[VaultKey],
    host: &str,
    chain: &str,
    sealed: &str,
) -> Result<String, VaultError> {
    let b64 = sealed.strip_prefix(V1).ok_or(VaultError::Malformed)?;
    if b64.len() > MAX_SEALED {
        return Err(VaultError::Malformed);
    }
    let raw = B64.decode(b64).map_err(|_| VaultError::Malformed)?;
    if raw.len() < NONCE_LEN + CHACHA20_POLY1305.tag_len() {
        return Err(VaultError::Malformed);
    }
    let aad = aad(host, chain);
    let (n, ct) = raw.split_at(NONCE_LEN);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(n);
    for k in keys {
        let mut buf = ct.to_vec();
        if let Ok(p) = k.0.open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad.as_slice()),
            &mut buf,
        ) {
            return String::from_utf8(p.to_vec()).map_err(|_| VaultError::Malformed);
        }
    }
    Err(VaultError::NoKey)
}

/// The stored form of `pem` for `host`: the key sealed when there is a
/// vault key, else the plain record.
pub fn seal_record(
    key: Option<&VaultKey>,
    host: &str,
    nonce: [u8; NONCE_LEN],
    pem: &CertPem,
) -> Vec<u8> {
    let Some(k) = key else {
        return pem.encode();
    };
    let r = SealedRecord {
        chain: pem.chain.clone(),
        key_sealed: seal(k, host, &pem.chain, nonce, &pem.key),
    };
    serde_json::to_vec(&r).unwrap_or_default()
}

/// The plain form of a stored record for `host`: a record with a sealed key
/// opened, any other value as it is (for [`super::acme::decode`] to check).
pub fn open_record<'a>(
    keys: &[VaultKey],
    host: &str,
    value: &'a [u8],
) -> Result<Cow<'a, [u8]>, VaultError> {
    let Ok(r) = serde_json::from_slice::<SealedRecord>(value) else {
        return Ok(Cow::Borrowed(value));
    };
    let key = open(keys, host, &r.chain, &r.key_sealed)?;
    let pem = CertPem {
        chain: r.chain,
        key,
    };
    Ok(Cow::Owned(pem.encode()))
}

/// Whether a stored record carries a sealed key.
pub fn is_sealed(value: &[u8]) -> bool {
    serde_json::from_slice::<SealedRecord>(value).is_ok()
}

/// The chain (in clear) of a stored record with a sealed key.
pub fn sealed_chain(value: &[u8]) -> Option<String> {
    serde_json::from_slice::<SealedRecord>(value)
        .ok()
        .map(|r| r.chain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S1: &[u8] = b"the first mesh secret, 32 bytes+";
    const S2: &[u8] = b"the second mesh secret, 32 bytes";

    fn pem() -> CertPem {
        CertPem {
            chain: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            key: "-----BEGIN PRIVATE KEY-----\nsecret-key-material\n-----END PRIVATE KEY-----\n"
                .into(),
        }
    }

    #[test]
    fn a_sealed_record_opens_with_the_secret_and_shows_no_key() {
        let k1 = VaultKey::new(S1);
        let stored = seal_record(Some(&k1), "blog.gw.test", [7; 12], &pem());
        let text = String::from_utf8(stored.clone()).unwrap();
        assert!(!text.contains("PRIVATE KEY") && !text.contains("secret-key-material"));
        assert!(text.contains("BEGIN CERTIFICATE") && text.contains("\"key_sealed\":\"v1."));
        assert!(is_sealed(&stored));
        let plain = open_record(
            &[VaultKey::new(S2), VaultKey::new(S1)],
            "blog.gw.test",
            &stored,
        )
        .unwrap();
        assert_eq!(plain.as_ref(), pem().encode().as_slice());
        assert_eq!(sealed_chain(&stored).as_deref(), Some(pem().chain.as_str()));
        // Without the secret, under another host or beside another chain:
        // not opened.
        let mut other_chain: serde_json::Value = serde_json::from_slice(&stored).unwrap();
        other_chain["chain"] = "-----BEGIN CERTIFICATE-----\nMIIC\n".into();
        let other_chain = serde_json::to_vec(&other_chain).unwrap();
        assert_eq!(
            open_record(&[VaultKey::new(S1)], "blog.gw.test", &other_chain),
            Err(VaultError::NoKey)
        );
        assert_eq!(
            open_record(&[VaultKey::new(S2)], "blog.gw.test", &stored),
            Err(VaultError::NoKey)
        );
        assert_eq!(
            open_record(&[], "blog.gw.test", &stored),
            Err(VaultError::NoKey)
        );
        assert_eq!(
            open_record(&[VaultKey::new(S1)], "shop.gw.test", &stored),
            Err(VaultError::NoKey)
        );
        // A plain record goes through as it is; without a key, records stay plain.
        let plain = pem().encode();
        assert_eq!(
            open_record(&[], "x", &plain).unwrap().as_ref(),
            plain.as_slice()
        );
        assert_eq!(seal_record(None, "x", [0; 12], &pem()), plain);
        assert!(!is_sealed(&plain));
        assert_eq!(sealed_chain(&plain), None);
        assert!(format!("{:?}", VaultKey::new(S1)) == "VaultKey(..)");
    }

    #[test]
    fn rotation_seals_with_the_first_secret_and_opens_with_any() {
        // Mid-rotation a hub has [new, old]: it seals with the new one.
        let mid = [VaultKey::new(S2), VaultKey::new(S1)];
        let stored = seal_record(mid.first(), "blog.gw.test", [1; 12], &pem());
        assert!(open_record(&mid, "blog.gw.test", &stored).is_ok());
        // A hub that has only the old secret cannot open it (which is why
        // the new secret goes second on every hub first), nor one without.
        assert_eq!(
            open_record(&[VaultKey::new(S1)], "blog.gw.test", &stored),
            Err(VaultError::NoKey)
        );
        assert_eq!(
            open_record(&[], "blog.gw.test", &stored),
            Err(VaultError::NoKey)
        );
        // A hub with [old, new] opens it.
        let both = [VaultKey::new(S1), VaultKey::new(S2)];
        let plain = open_record(&both, "blog.gw.test", &stored).unwrap();
        assert_eq!(plain.as_ref(), pem().encode().as_slice());
    }

    #[test]
    fn malformed_sealed_keys_are_named() {
        let k = [VaultKey::new(S1)];
        for bad in ["", "v2.AAAA", "v1.***", "v1.AAAA"] {
            assert_eq!(open(&k, "h", "c", bad), Err(VaultError::Malformed), "{bad}");
        }
        let long = format!("v1.{}", "A".repeat(MAX_SEALED + 4));
        assert_eq!(open(&k, "h", "c", &long), Err(VaultError::Malformed));
    }

    proptest! {
        #[test]
        fn any_changed_byte_fails_to_open(key in "[ -~]{1,200}", nonce in any::<[u8; 12]>(), at in any::<usize>(), bit in 0u8..8) {
            let k = VaultKey::new(S1);
            let sealed = seal(&k, "h.gw.test", "chain", nonce, &key);
            prop_assert_eq!(open(std::slice::from_ref(&k), "h.gw.test", "chain", &sealed), Ok(key.clone()));
            let mut raw = B64.decode(&sealed[3..]).unwrap();
            let i = at % raw.len();
            raw[i] ^= 1 << bit;
            let changed = format!("v1.{}", B64.encode(raw));
            prop_assert!(open(&[k], "h.gw.test", "chain", &changed).is_err());
        }
    }
}
