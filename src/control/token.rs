#![deny(clippy::unwrap_used, clippy::indexing_slicing)]
//! Join tokens (docs/control.md, "Join tokens"): `gwj1.` followed by unpadded
//! base64url of the JSON
//! `{"api": "host:port", "fp": "<64 hex>", "id": "<16 hex>", "secret": "<43 base64url>"}`.
//!
//! `api` is where the hub's admin API listens, `fp` the SHA-256 of its
//! certificate (the joining node pins it), `id` names the token in the API,
//! and `secret` is 32 random bytes: the credential. The hub keeps only
//! [`JoinToken::secret_hash`], the SHA-256 of those 32 bytes (not of their
//! base64 text).
//!
//! Pure: no I/O apart from the CSPRNG in [`JoinToken::generate`]. Neither the
//! token's nor the secret's `Debug` shows the secret.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use std::fmt;
use zeroize::Zeroize;

/// What every join token starts with.
pub const PREFIX: &str = "gwj1.";
/// Longest token accepted by [`JoinToken::decode`], in characters.
pub const MAX_TOKEN_LEN: usize = 1024;
/// Longest `api` (a DNS name of 253 characters, `:`, a port).
const MAX_API_LEN: usize = 261;
/// Length of the base64url text of a 32-byte secret.
pub const SECRET_LEN: usize = 43;

/// Why a string is not a join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("a join token starts with `gwj1.`")]
    Prefix,
    #[error("the join token is longer than {MAX_TOKEN_LEN} characters")]
    TooLong,
    #[error("the join token is not valid base64url after `gwj1.` (truncated when copied?)")]
    Base64,
    #[error("the join token does not hold valid JSON: {0}")]
    Json(String),
    #[error("the join token's `{field}` {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
}

fn field(field: &'static str, problem: impl Into<String>) -> TokenError {
    TokenError::Field {
        field,
        problem: problem.into(),
    }
}

/// A join token's secret: 32 random bytes, kept as their 43 base64url
/// characters. Masked in `Debug`, wiped on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// 32 fresh bytes from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut b = [0u8; 32];
        OsRng.fill_bytes(&mut b);
        let s = Secret(B64URL.encode(b));
        b.zeroize();
        s
    }

    /// Checks that `s` is 43 base64url characters encoding 32 bytes.
    pub fn parse(s: &str) -> Result<Self, TokenError> {
        decode_secret(s)
            .map(|mut b| {
                b.zeroize();
                Secret(s.to_string())
            })
            .ok_or_else(|| field("secret", "is not 43 base64url characters (32 bytes)"))
    }

    /// The secret's text. Only for encoding the token.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the 32 secret bytes: what the hub keeps.
    pub fn hash(&self) -> [u8; 32] {
        // A Secret always holds valid text (generate/parse); all-zero is unreachable.
        hash_secret_str(&self.0).unwrap_or([0; 32])
    }
}

fn decode_secret(s: &str) -> Option<[u8; 32]> {
    if s.len() != SECRET_LEN {
        return None;
    }
    let v = B64URL.decode(s).ok()?;
    let mut v = zeroize::Zeroizing::new(v);
    let out: [u8; 32] = v.as_slice().try_into().ok()?;
    v.zeroize();
    Some(out)
}

/// SHA-256 of the 32 bytes that `secret` (43 base64url characters) encodes;
/// `None` when it is not such a string.
pub fn hash_secret_str(secret: &str) -> Option<[u8; 32]> {
    let mut bytes = decode_secret(secret)?;
    let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
    bytes.zeroize();
    d.as_ref().try_into().ok()
}

/// A decoded join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// `host:port` of the hub's admin API (TLS).
    pub api: String,
    /// SHA-256 of the API's certificate (DER).
    pub fp: [u8; 32],
    /// 16 lowercase hex characters; names the token in the API.
    pub id: String,
    pub secret: Secret,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("api", &self.api)
            .field("fp", &hex::encode(self.fp))
            .field("id", &self.id)
            .field("secret", &self.secret)
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    api: String,
    fp: String,
    id: String,
    secret: String,
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

/// Checks a token's `api`: `host:port`, the host a DNS name, an IPv4
/// address or a bracketed IPv6 address, the port 1 to 65535.
pub fn check_api(api: &str) -> Result<(), TokenError> {
    if api.len() > MAX_API_LEN {
        return Err(field("api", "is too long"));
    }
    let Some((host, port)) = api.rsplit_once(':') else {
        return Err(field("api", format!("`{api}` is not host:port")));
    };
    if !port.parse::<u16>().is_ok_and(|p| p > 0) || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(field("api", format!("`{api}` has no valid port")));
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6
            .parse::<std::net::Ipv6Addr>()
            .map(|_| ())
            .map_err(|_| field("api", format!("`{api}`: bad IPv6 address")));
    }
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return Ok(());
    }
    crate::proxy::names::DomainName::parse(host)
        .map(|_| ())
        .map_err(|e| field("api", format!("`{api}`: {e}")))
}

fn check_id(id: &str) -> Result<(), TokenError> {
    if id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(field("id", "is not 16 lowercase hex characters"))
    }
}

impl JoinToken {
    /// A new token for the API at `api` (`host:port`) whose certificate has
    /// the SHA-256 `fp`: a random id and a random secret.
    pub fn generate(api: impl Into<String>, fp: [u8; 32]) -> Self {
        let mut id = [0u8; 8];
        OsRng.fill_bytes(&mut id);
        JoinToken {
            api: api.into(),
            fp,
            id: hex::encode(id),
            secret: Secret::generate(),
        }
    }

    /// The token as the operator copies it: `gwj1.<base64url JSON>`. It
    /// contains the secret: never log it.
    pub fn encode(&self) -> String {
        let w = Wire {
            api: self.api.clone(),
            fp: hex::encode(self.fp),
            id: self.id.clone(),
            secret: self.secret.expose().to_string(),
        };
        // Serialising four strings cannot fail; an empty body would not decode.
        let mut json = serde_json::to_vec(&w).unwrap_or_default();
        let out = format!("{PREFIX}{}", B64URL.encode(&json));
        json.zeroize();
        out
    }

    /// Parses a token; surrounding whitespace is ignored.
    pub fn decode(s: &str) -> Result<Self, TokenError> {
        let s = s.trim();
        if s.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        let body = s.strip_prefix(PREFIX).ok_or(TokenError::Prefix)?;
        let json = zeroize::Zeroizing::new(B64URL.decode(body).map_err(|_| TokenError::Base64)?);
        let w: Wire = serde_json::from_slice(&json).map_err(|e| {
            // serde_json's messages never quote the input's string values.
            TokenError::Json(e.to_string())
        })?;
        check_api(&w.api)?;
        let fp: [u8; 32] = hex::decode(&w.fp)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| field("fp", "is not 64 hex characters (a SHA-256)"))?;
        check_id(&w.id)?;
        let secret = Secret::parse(&w.secret)?;
        Ok(JoinToken {
            api: w.api.clone(),
            fp,
            id: w.id.clone(),
            secret,
        })
    }

    /// SHA-256 of the secret's 32 bytes: what the hub stores and compares.
    pub fn secret_hash(&self) -> [u8; 32] {
        self.secret.hash()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn wire(api: &str, fp: &str, id: &str, secret: &str) -> String {
        let j = serde_json::json!({"api": api, "fp": fp, "id": id, "secret": secret});
        format!("{PREFIX}{}", B64URL.encode(j.to_string()))
    }

    const FP: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    const ID: &str = "0123456789abcdef";
    const SECRET: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8";

    #[test]
    fn generate_encode_decode() {
        let t = JoinToken::generate("hub.example.org:7443", [7; 32]);
        let s = t.encode();
        assert!(s.starts_with("gwj1."));
        assert!(!s.contains('='));
        let d = JoinToken::decode(&format!("  {s}\n")).unwrap();
        assert_eq!(d, t);
        assert_eq!(d.id.len(), 16);
        assert_eq!(d.secret.expose().len(), SECRET_LEN);
        assert_eq!(d.secret_hash(), t.secret_hash());
        // Two tokens never share a secret or (practically) an id.
        let u = JoinToken::generate("hub.example.org:7443", [7; 32]);
        assert_ne!(u.secret, t.secret);
        assert_ne!(u.id, t.id);
    }

    #[test]
    fn known_token() {
        let s = wire("203.0.113.1:7443", FP, ID, SECRET);
        let t = JoinToken::decode(&s).unwrap();
        assert_eq!(t.api, "203.0.113.1:7443");
        assert_eq!(hex::encode(t.fp), FP);
        assert_eq!(t.id, ID);
        assert_eq!(t.encode(), s);
        // The secret is bytes 0..32; its hash is SHA-256 of those bytes.
        let bytes: Vec<u8> = (0u8..32).collect();
        let want = ring::digest::digest(&ring::digest::SHA256, &bytes);
        assert_eq!(t.secret_hash().as_slice(), want.as_ref());
        assert_eq!(hash_secret_str(SECRET), Some(t.secret_hash()));
        assert_eq!(hash_secret_str("short"), None);
        assert_eq!(hash_secret_str(&format!("{}!", &SECRET[..42])), None);
    }

    #[test]
    fn debug_hides_the_secret() {
        let t = JoinToken::generate("[2001:db8::1]:7443", [1; 32]);
        let d = format!("{t:?} {:?}", t.secret);
        assert!(!d.contains(t.secret.expose()), "{d}");
        assert!(d.contains("redacted"), "{d}");
        assert!(d.contains("2001:db8::1"), "{d}");
    }

    #[test]
    fn errors_are_clear() {
        let e = |s: &str| JoinToken::decode(s).unwrap_err();
        assert_eq!(e("gwj2.abc"), TokenError::Prefix);
        assert_eq!(e(""), TokenError::Prefix);
        assert_eq!(e("gwj1.a*b"), TokenError::Base64);
        assert_eq!(e(&"gwj1.".repeat(300)), TokenError::TooLong);
        assert!(matches!(
            e(&format!("gwj1.{}", B64URL.encode("not json"))),
            TokenError::Json(_)
        ));
        let extra =
            serde_json::json!({"api": "a.example:1", "fp": FP, "id": ID, "secret": SECRET, "x": 1});
        let m = e(&format!("gwj1.{}", B64URL.encode(extra.to_string()))).to_string();
        assert!(m.contains("unknown field"), "{m}");
        let cases = [
            (wire("hub.example", FP, ID, SECRET), "api"),
            (wire("hub.example:0", FP, ID, SECRET), "api"),
            (wire("hub.example:+1", FP, ID, SECRET), "api"),
            (wire("bad_host:7443", FP, ID, SECRET), "api"),
            (wire("[::1:7443", FP, ID, SECRET), "api"),
            (wire("h.example:1", &FP[2..], ID, SECRET), "fp"),
            (wire("h.example:1", &FP.replace('0', "g"), ID, SECRET), "fp"),
            (wire("h.example:1", FP, "0123456789ABCDEF", SECRET), "id"),
            (wire("h.example:1", FP, "0123", SECRET), "id"),
            (wire("h.example:1", FP, ID, &SECRET[1..]), "secret"),
            (wire("h.example:1", FP, ID, &format!("{SECRET}A")), "secret"),
            (
                wire("h.example:1", FP, ID, &SECRET.replace('A', "+")),
                "secret",
            ),
        ];
        for (tok, f) in cases {
            match JoinToken::decode(&tok) {
                Err(TokenError::Field { field, .. }) => assert_eq!(field, f, "{tok}"),
                other => panic!("{tok}: {other:?}"),
            }
        }
        // A field error never echoes the secret.
        let bad = wire("h.example:1", FP, ID, &SECRET[1..]);
        assert!(!e(&bad).to_string().contains(&SECRET[1..]));
    }

    #[test]
    fn api_forms() {
        for ok in [
            "hub.example.org:7443",
            "203.0.113.1:1",
            "[2001:db8::1]:65535",
            "Hub.Example:80",
        ] {
            assert_eq!(check_api(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ":7443",
            "hub:",
            "hub:65536",
            "2001:db8::1:7443",
            "a b:1",
            "[zz]:1",
        ] {
            assert!(check_api(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn round_trip(fp in any::<[u8; 32]>(), id in any::<[u8; 8]>(), secret in any::<[u8; 32]>(),
                      host in "[a-z]([a-z0-9-]{0,18}[a-z0-9])?(\\.[a-z][a-z0-9]{0,10}){0,3}", port in 1u16..) {
            let t = JoinToken {
                api: format!("{host}:{port}"),
                fp,
                id: hex::encode(id),
                secret: Secret::parse(&B64URL.encode(secret)).unwrap(),
            };
            let d = JoinToken::decode(&t.encode()).unwrap();
            prop_assert_eq!(&d, &t);
            let want = ring::digest::digest(&ring::digest::SHA256, &secret);
            let got = d.secret_hash();
            prop_assert_eq!(got.as_slice(), want.as_ref());
        }

        #[test]
        fn decode_never_panics(s in "\\PC{0,200}") {
            let _ = JoinToken::decode(&s);
            let _ = JoinToken::decode(&format!("gwj1.{s}"));
        }
    }
}
