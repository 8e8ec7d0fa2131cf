//! Shared ACME through the mesh, the pure core: the keys hubs write under
//! `<prefix>acme/` in etcd, how a value read back is checked ([`decode`]), and
//! the [`Shared`] view a hub keeps of them. No I/O, no clock.
//!
//! | key (after `<prefix>acme/`) | value | lease |
//! |---|---|---|
//! | `http01/<token>` | the HTTP-01 key authorization | the ordering hub's |
//! | `alpn01/<host>` | SHA-256 of the TLS-ALPN-01 key authorization, hex | the ordering hub's |
//! | `dns01/<domain>/<value>` | the DNS-01 TXT value of `_acme-challenge.<domain>` (again) | the ordering hub's |
//! | `certs/<host>` (`<host>` may be `*.<domain>`) | [`CertPem`] as JSON: the issued chain and its key | none |
//! | `locks/<host>` | the name of the hub ordering for `host` | the ordering hub's |
//!
//! One hub at a time orders a certificate for a host (it holds the lock); it
//! publishes its challenge answers, so whichever hub the ACME server reaches
//! answers the validation; with shared certificates it stores the result,
//! and every hub that serves the host with `acme = true` uses it.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use crate::mesh::table::valid_name;
use crate::proxy::names::DomainName;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Longest HTTP-01 token accepted (RFC 8555 tokens are 43 characters).
pub const MAX_TOKEN: usize = 256;
/// Longest key authorization accepted.
pub const MAX_KEY_AUTHORIZATION: usize = 512;
/// Longest certificate record accepted (a chain and a key are a few KiB).
pub const MAX_CERT_RECORD: usize = 64 * 1024;
/// DNS-01 values kept per domain (an order publishes one or two).
pub const MAX_DNS01_VALUES: usize = 8;

/// What a key under `<prefix>acme/` names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AcmeKey {
    /// An HTTP-01 challenge by its token.
    Http01(String),
    /// A TLS-ALPN-01 challenge for a host.
    Alpn01(DomainName),
    /// A DNS-01 TXT value of `_acme-challenge.<domain>`.
    Dns01(DomainName, String),
    /// The shared certificate of a host.
    Cert(CertHost),
    /// The lock on ordering for a host.
    Lock(CertHost),
}

/// The host of a certificate: a domain name, or `*.<domain>` for a
/// wildcard certificate. Normalised (lowercase, no trailing dot).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertHost(String);

impl CertHost {
    /// Parses and normalises `s`; `None` if it is not a host name.
    pub fn parse(s: &str) -> Option<CertHost> {
        Some(match s.strip_prefix("*.") {
            Some(d) => CertHost(format!("*.{}", DomainName::parse(d).ok()?.as_str())),
            None => CertHost(DomainName::parse(s).ok()?.as_str().to_string()),
        })
    }
    /// The host as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl AcmeKey {
    /// The key's text after `<prefix>acme/`.
    pub fn path(&self) -> String {
        match self {
            AcmeKey::Http01(t) => format!("http01/{t}"),
            AcmeKey::Alpn01(h) => format!("alpn01/{}", h.as_str()),
            AcmeKey::Dns01(d, v) => format!("dns01/{}/{v}", d.as_str()),
            AcmeKey::Cert(h) => format!("certs/{}", h.as_str()),
            AcmeKey::Lock(h) => format!("locks/{}", h.as_str()),
        }
    }
}

/// An issued certificate as hubs share it: the PEM chain and the PEM private
/// key. `Debug` leaves the key out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertPem {
    /// The certificate chain, leaf first.
    pub chain: String,
    /// The private key of the leaf.
    pub key: String,
}

impl std::fmt::Debug for CertPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertPem")
            .field("chain_bytes", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl CertPem {
    /// The value stored in etcd.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A value read back, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcmeValue {
    /// The key authorization for an HTTP-01 token.
    Http01(String),
    /// The digest a TLS-ALPN-01 validation certificate must carry.
    Alpn01([u8; 32]),
    /// A DNS-01 TXT value.
    Dns01(String),
    /// A certificate and its key, and the leaf's `notAfter` (Unix seconds).
    Cert(CertPem, u64),
    /// The hub holding a lock.
    Lock(String),
}

/// Why a key or value under `<prefix>acme/` was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcmeRecordError {
    #[error("key `{0}` is not http01/, alpn01/, dns01/, certs/ or locks/ with a token or host")]
    Key(String),
    #[error("value of {0} bytes is too large")]
    TooLarge(usize),
    #[error("key authorization is not `<token>.<base64url>`")]
    KeyAuthorization,
    #[error("TLS-ALPN-01 digest is not 64 hex digits")]
    Digest,
    #[error("DNS-01 value is not the one its key names")]
    Dns01Value,
    #[error("more than {} DNS-01 values for one domain", MAX_DNS01_VALUES)]
    Dns01Full,
    #[error("certificate record: {0}")]
    Cert(String),
    #[error("lock holder is not a hub name")]
    Holder,
}

fn base64url(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `t` may be an ACME token (base64url, 1 to [`MAX_TOKEN`] characters).
pub fn valid_token(t: &str) -> bool {
    (1..=MAX_TOKEN).contains(&t.len()) && base64url(t)
}

/// Parses the text of a key after `<prefix>acme/`.
pub fn parse_key(path: &str) -> Result<AcmeKey, AcmeRecordError> {
    let bad = || AcmeRecordError::Key(path.chars().take(300).collect());
    let (kind, rest) = path.split_once('/').ok_or_else(bad)?;
    // Stored names are normalised: one key per host.
    let domain = |s: &str| match DomainName::parse(s) {
        Ok(h) if h.as_str() == s => Ok(h),
        _ => Err(bad()),
    };
    let cert_host = || match CertHost::parse(rest) {
        Some(h) if h.as_str() == rest => Ok(h),
        _ => Err(bad()),
    };
    match kind {
        "http01" if valid_token(rest) => Ok(AcmeKey::Http01(rest.to_string())),
        "alpn01" => Ok(AcmeKey::Alpn01(domain(rest)?)),
        "dns01" => {
            let (d, v) = rest.rsplit_once('/').ok_or_else(bad)?;
            if !valid_token(v) {
                return Err(bad());
            }
            Ok(AcmeKey::Dns01(domain(d)?, v.to_string()))
        }
        "certs" => Ok(AcmeKey::Cert(cert_host()?)),
        "locks" => Ok(AcmeKey::Lock(cert_host()?)),
        _ => Err(bad()),
    }
}

/// Hex form of a TLS-ALPN-01 digest, as stored.
pub fn encode_digest(d: &[u8; 32]) -> String {
    hex::encode(d)
}

/// The `notAfter` of the first certificate of a PEM chain.
fn first_not_after(chain: &str) -> Option<u64> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::pem_slice_iter(chain.as_bytes())
        .next()?
        .ok()?;
    crate::proxy::acme::cert_not_after(&der)
}

/// Checks the value stored under `key`.
pub fn decode(key: &AcmeKey, value: &[u8]) -> Result<AcmeValue, AcmeRecordError> {
    let limit = match key {
        AcmeKey::Cert(_) => MAX_CERT_RECORD,
        _ => MAX_KEY_AUTHORIZATION,
    };
    if value.len() > limit {
        return Err(AcmeRecordError::TooLarge(value.len()));
    }
    match key {
        AcmeKey::Http01(token) => {
            let s = std::str::from_utf8(value).map_err(|_| AcmeRecordError::KeyAuthorization)?;
            let thumb = s
                .strip_prefix(token.as_str())
                .and_then(|r| r.strip_prefix('.'))
                .ok_or(AcmeRecordError::KeyAuthorization)?;
            if thumb.is_empty() || !base64url(thumb) {
                return Err(AcmeRecordError::KeyAuthorization);
            }
            Ok(AcmeValue::Http01(s.to_string()))
        }
        AcmeKey::Dns01(_, v) => {
            if value != v.as_bytes() {
                return Err(AcmeRecordError::Dns01Value);
            }
            Ok(AcmeValue::Dns01(v.clone()))
        }
        AcmeKey::Alpn01(_) => {
            let mut d = [0u8; 32];
            if value.len() != 64 || !value.iter().all(u8::is_ascii_hexdigit) {
                return Err(AcmeRecordError::Digest);
            }
            hex::decode_to_slice(value, &mut d).map_err(|_| AcmeRecordError::Digest)?;
            Ok(AcmeValue::Alpn01(d))
        }
        AcmeKey::Cert(_) => {
            // (serde's message may quote the value, a private key maybe.)
            let c: CertPem = serde_json::from_slice(value)
                .map_err(|_| AcmeRecordError::Cert("not a certificate record".into()))?;
            if !c.chain.contains("-----BEGIN CERTIFICATE-----") {
                return Err(AcmeRecordError::Cert("no PEM certificate".into()));
            }
            if !c.key.contains("PRIVATE KEY-----") {
                return Err(AcmeRecordError::Cert("no PEM private key".into()));
            }
            let not_after = first_not_after(&c.chain)
                .ok_or_else(|| AcmeRecordError::Cert("no readable leaf certificate".into()))?;
            Ok(AcmeValue::Cert(c, not_after))
        }
        AcmeKey::Lock(_) => {
            let s = std::str::from_utf8(value).map_err(|_| AcmeRecordError::Holder)?;
            if !valid_name(s) {
                return Err(AcmeRecordError::Holder);
            }
            Ok(AcmeValue::Lock(s.to_string()))
        }
    }
}

/// What a hub knows of the shared ACME keys: the other hubs' challenge
/// answers, the shared certificates and who orders what.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Shared {
    http01: HashMap<String, String>,
    alpn01: HashMap<String, [u8; 32]>,
    /// DNS-01 TXT values by domain.
    dns01: HashMap<String, std::collections::BTreeSet<String>>,
    certs: HashMap<String, (CertPem, u64)>,
    /// Certificates whose key this hub cannot use (sealed with a mesh
    /// secret it does not have): only their `notAfter`, from the chain.
    unopened: HashMap<String, u64>,
    /// Hosts whose stored certificate has its key in clear.
    clear: std::collections::HashSet<String>,
    locks: HashMap<String, String>,
}

/// What [`Shared::apply`] changed, so the certificate manager can look again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A challenge answer came or went.
    Challenge,
    /// A certificate or a lock came or went: worth a look by the manager.
    CertOrLock,
}

impl Shared {
    /// Applies a put (`Some(value)`) or a delete (`None`) of the key whose text
    /// after `<prefix>acme/` is `path`. A value that does not check removes
    /// what the key held, and is the error.
    pub fn apply(&mut self, path: &str, value: Option<&[u8]>) -> Result<Change, AcmeRecordError> {
        let key = parse_key(path)?;
        let decoded = value.map(|v| decode(&key, v)).transpose();
        let change = match key {
            AcmeKey::Http01(_) | AcmeKey::Alpn01(_) | AcmeKey::Dns01(..) => Change::Challenge,
            AcmeKey::Cert(_) | AcmeKey::Lock(_) => Change::CertOrLock,
        };
        let v = match decoded {
            Ok(v) => v,
            Err(e) => {
                self.remove(&key);
                return Err(e);
            }
        };
        match (key, v) {
            (AcmeKey::Http01(t), Some(AcmeValue::Http01(ka))) => {
                self.http01.insert(t, ka);
            }
            (AcmeKey::Alpn01(h), Some(AcmeValue::Alpn01(d))) => {
                self.alpn01.insert(h.as_str().to_string(), d);
            }
            (AcmeKey::Dns01(d, _), Some(AcmeValue::Dns01(v))) => {
                let set = self.dns01.entry(d.as_str().to_string()).or_default();
                if set.len() >= MAX_DNS01_VALUES && !set.contains(&v) {
                    return Err(AcmeRecordError::Dns01Full);
                }
                set.insert(v);
            }
            (AcmeKey::Cert(h), Some(AcmeValue::Cert(c, not_after))) => {
                self.unopened.remove(h.as_str());
                self.certs.insert(h.as_str().to_string(), (c, not_after));
            }
            (AcmeKey::Lock(h), Some(AcmeValue::Lock(by))) => {
                self.locks.insert(h.as_str().to_string(), by);
            }
            (key, _) => self.remove(&key),
        }
        Ok(change)
    }

    fn remove(&mut self, key: &AcmeKey) {
        match key {
            AcmeKey::Http01(t) => {
                self.http01.remove(t);
            }
            AcmeKey::Alpn01(h) => {
                self.alpn01.remove(h.as_str());
            }
            AcmeKey::Dns01(d, v) => {
                if let Some(set) = self.dns01.get_mut(d.as_str()) {
                    set.remove(v);
                    if set.is_empty() {
                        self.dns01.remove(d.as_str());
                    }
                }
            }
            AcmeKey::Cert(h) => {
                self.certs.remove(h.as_str());
                self.unopened.remove(h.as_str());
                self.clear.remove(h.as_str());
            }
            AcmeKey::Lock(h) => {
                self.locks.remove(h.as_str());
            }
        }
    }

    /// A stored certificate for `host` whose key this hub cannot open: it
    /// keeps only the chain's `notAfter`, so that it neither takes the
    /// certificate nor offers an older one of its own in its place. False
    /// (and the host forgotten) when the chain has no readable leaf.
    pub fn hold_unopened(&mut self, host: &str, chain: &str) -> bool {
        let Ok(key) = parse_key(&format!("certs/{host}")) else {
            return false;
        };
        self.remove(&key);
        match first_not_after(chain) {
            Some(na) if chain.len() <= MAX_CERT_RECORD => {
                self.unopened.insert(host.to_string(), na);
                true
            }
            _ => false,
        }
    }

    /// Marks the stored certificate of `host` as held in clear (or sealed).
    pub fn set_clear(&mut self, host: &str, clear: bool) {
        if clear {
            self.clear.insert(host.to_string());
        } else {
            self.clear.remove(host);
        }
    }

    /// Whether the stored certificate of `host` has its key in clear.
    pub fn in_clear(&self, host: &str) -> bool {
        self.clear.contains(host)
    }

    /// The key authorization published for an HTTP-01 `token`.
    pub fn http01(&self, token: &str) -> Option<&str> {
        self.http01.get(token).map(String::as_str)
    }

    /// The TLS-ALPN-01 digest published for `host`.
    pub fn alpn01(&self, host: &str) -> Option<[u8; 32]> {
        self.alpn01.get(host).copied()
    }

    /// The DNS-01 TXT values published for `_acme-challenge.<domain>`.
    pub fn dns01(&self, domain: &str) -> Vec<String> {
        self.dns01
            .get(domain)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The shared certificate of `host`.
    pub fn cert(&self, host: &str) -> Option<&CertPem> {
        self.certs.get(host).map(|(c, _)| c)
    }

    /// The `notAfter` (Unix seconds) of the shared certificate of `host`,
    /// also when its key cannot be opened here.
    pub fn cert_not_after(&self, host: &str) -> Option<u64> {
        self.certs
            .get(host)
            .map(|(_, t)| *t)
            .or_else(|| self.unopened.get(host).copied())
    }

    /// The hub ordering for `host`, if any.
    pub fn lock_holder(&self, host: &str) -> Option<&str> {
        self.locks.get(host).map(String::as_str)
    }

    /// Number of shared certificates.
    pub fn certs(&self) -> usize {
        self.certs.len()
    }

    /// The hosts being ordered for now, with the hub ordering each, sorted.
    pub fn locks(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .locks
            .iter()
            .map(|(h, by)| (h.clone(), by.clone()))
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TOKEN: &str = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA";
    const KA: &str =
        "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA.nP1qzpXGymHBrUEepNY9HCsQk7K8KhOypzEt62jcerQ";

    /// A certificate valid until 2031-07-15T00:00:00Z (1,941,840,000).
    fn pem() -> CertPem {
        static PEM: std::sync::OnceLock<CertPem> = std::sync::OnceLock::new();
        PEM.get_or_init(|| {
            let mut p = rcgen::CertificateParams::new(vec!["a.b".to_string()]).unwrap();
            p.not_after = rcgen::date_time_ymd(2031, 7, 15);
            let kp = rcgen::KeyPair::generate().unwrap();
            let c = p.self_signed(&kp).unwrap();
            CertPem {
                chain: c.pem(),
                key: kp.serialize_pem(),
            }
        })
        .clone()
    }
    const NOT_AFTER: u64 = 1_941_840_000;

    #[test]
    fn a_certificate_whose_key_does_not_open_keeps_only_its_not_after() {
        let mut sh = Shared::default();
        let p = pem();
        let host = "www.example.net";
        assert!(sh
            .apply(&format!("certs/{host}"), Some(&p.encode()))
            .is_ok());
        let na = sh.cert_not_after(host).unwrap();
        sh.set_clear(host, true);
        assert!(sh.in_clear(host));
        // Replaced by a record this hub cannot open: no certificate to
        // take, but its notAfter stays known.
        assert!(sh.hold_unopened(host, &p.chain));
        assert_eq!(sh.cert(host), None);
        assert_eq!(sh.cert_not_after(host), Some(na));
        assert!(!sh.in_clear(host));
        assert_eq!(sh.certs(), 0);
        // A readable record, or a delete, replaces it.
        assert!(sh
            .apply(&format!("certs/{host}"), Some(&p.encode()))
            .is_ok());
        assert!(sh.cert(host).is_some());
        assert!(sh.hold_unopened(host, &p.chain));
        assert!(sh.apply(&format!("certs/{host}"), None).is_ok());
        assert_eq!(sh.cert_not_after(host), None);
        // A chain without a readable leaf holds nothing.
        assert!(!sh.hold_unopened(host, "garbage"));
        assert_eq!(sh.cert_not_after(host), None);
        assert!(!sh.hold_unopened("Not A Host", &p.chain));
    }

    #[test]
    fn keys_round_trip_and_bad_ones_are_named() {
        for k in [
            AcmeKey::Http01(TOKEN.into()),
            AcmeKey::Alpn01(DomainName::parse("blog.gw.test").unwrap()),
            AcmeKey::Cert(CertHost::parse("www.example.net").unwrap()),
            AcmeKey::Cert(CertHost::parse("*.gw.test").unwrap()),
            AcmeKey::Lock(CertHost::parse("a.b").unwrap()),
            AcmeKey::Lock(CertHost::parse("*.Gw.Test").unwrap()),
            AcmeKey::Dns01(DomainName::parse("gw.test").unwrap(), TOKEN.into()),
        ] {
            assert_eq!(parse_key(&k.path()), Ok(k));
        }
        for bad in [
            "",
            "http01",
            "http01/",
            "http01/a.b",
            "http01/a/b",
            "certs/",
            "certs/Blog.gw.test",
            "certs/blog.gw.test.",
            "certs/a..b",
            "locks/a_b!",
            "other/blog.gw.test",
            "alpn01/blog.gw.test/x",
            "alpn01/*.gw.test",
            "certs/*.Gw.test",
            "certs/**.gw.test",
            "certs/*",
            "certs/a.*.b",
            "dns01/gw.test",
            "dns01/gw.test/",
            "dns01/gw.test/a b",
            "dns01/*.gw.test/abc",
            "dns01/Gw.test/abc",
        ] {
            assert!(
                matches!(parse_key(bad), Err(AcmeRecordError::Key(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn values_are_checked() {
        let t = AcmeKey::Http01(TOKEN.into());
        assert_eq!(decode(&t, KA.as_bytes()), Ok(AcmeValue::Http01(KA.into())));
        for bad in [
            "",
            TOKEN,
            "other.abc",
            &format!("{TOKEN}."),
            &format!("{TOKEN}.a b"),
            &format!("{TOKEN}.a\n"),
        ] {
            assert_eq!(
                decode(&t, bad.as_bytes()),
                Err(AcmeRecordError::KeyAuthorization),
                "{bad:?}"
            );
        }
        assert!(matches!(
            decode(&t, &[b'a'; MAX_KEY_AUTHORIZATION + 1]),
            Err(AcmeRecordError::TooLarge(_))
        ));
        let h = DomainName::parse("blog.gw.test").unwrap();
        let d = [0xabu8; 32];
        let a = AcmeKey::Alpn01(h.clone());
        assert_eq!(
            decode(&a, encode_digest(&d).as_bytes()),
            Ok(AcmeValue::Alpn01(d))
        );
        assert_eq!(decode(&a, b"ab"), Err(AcmeRecordError::Digest));
        assert_eq!(decode(&a, &[b'g'; 64]), Err(AcmeRecordError::Digest));
        let dk = AcmeKey::Dns01(h.clone(), TOKEN.into());
        assert_eq!(
            decode(&dk, TOKEN.as_bytes()),
            Ok(AcmeValue::Dns01(TOKEN.into()))
        );
        assert_eq!(decode(&dk, b"other"), Err(AcmeRecordError::Dns01Value));
        let h = CertHost::parse(h.as_str()).unwrap();
        let c = AcmeKey::Cert(h.clone());
        assert_eq!(
            decode(&c, &pem().encode()),
            Ok(AcmeValue::Cert(pem(), NOT_AFTER))
        );
        let mut broken = pem();
        broken.chain = "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n".into();
        assert!(matches!(
            decode(&c, &broken.encode()),
            Err(AcmeRecordError::Cert(_))
        ));
        let mut no_key = pem();
        no_key.key = "x".into();
        assert!(matches!(
            decode(&c, &no_key.encode()),
            Err(AcmeRecordError::Cert(_))
        ));
        assert!(matches!(
            decode(&c, b"{\"chain\":\"\",\"key\":\"\",\"x\":1}"),
            Err(AcmeRecordError::Cert(_))
        ));
        let l = AcmeKey::Lock(h);
        assert_eq!(decode(&l, b"hub-a"), Ok(AcmeValue::Lock("hub-a".into())));
        assert_eq!(decode(&l, b"Hub A"), Err(AcmeRecordError::Holder));
    }

    #[test]
    fn debug_leaves_the_key_out() {
        let key_line = pem().key.lines().nth(1).unwrap().to_string();
        let s = format!("{:?}", pem());
        assert!(!s.contains(&key_line) && !s.contains("PRIVATE"), "{s}");
        let mut sh = Shared::default();
        sh.apply("certs/a.b", Some(&pem().encode())).unwrap();
        let s = format!("{sh:?}");
        assert!(!s.contains(&key_line), "{s}");
    }

    #[test]
    fn shared_follows_puts_and_deletes() {
        let mut s = Shared::default();
        assert_eq!(
            s.apply(&format!("http01/{TOKEN}"), Some(KA.as_bytes())),
            Ok(Change::Challenge)
        );
        assert_eq!(s.http01(TOKEN), Some(KA));
        for v in ["v1", "v2"] {
            assert_eq!(
                s.apply(&format!("dns01/gw.test/{v}"), Some(v.as_bytes())),
                Ok(Change::Challenge)
            );
        }
        assert_eq!(s.dns01("gw.test"), vec!["v1".to_string(), "v2".into()]);
        s.apply("dns01/gw.test/v1", None).unwrap();
        assert_eq!(s.dns01("gw.test"), vec!["v2".to_string()]);
        s.apply("dns01/gw.test/v2", None).unwrap();
        assert!(s.dns01("gw.test").is_empty());
        for i in 0..MAX_DNS01_VALUES {
            s.apply(
                &format!("dns01/gw.test/v{i}"),
                Some(format!("v{i}").as_bytes()),
            )
            .unwrap();
        }
        assert_eq!(
            s.apply("dns01/gw.test/more", Some(b"more")),
            Err(AcmeRecordError::Dns01Full)
        );
        assert_eq!(s.dns01("gw.test").len(), MAX_DNS01_VALUES);
        for i in 0..MAX_DNS01_VALUES {
            s.apply(&format!("dns01/gw.test/v{i}"), None).unwrap();
        }
        let d = [7u8; 32];
        s.apply("alpn01/a.b", Some(encode_digest(&d).as_bytes()))
            .unwrap();
        assert_eq!(s.alpn01("a.b"), Some(d));
        assert_eq!(
            s.apply("certs/a.b", Some(&pem().encode())),
            Ok(Change::CertOrLock)
        );
        assert_eq!(s.cert("a.b"), Some(&pem()));
        assert_eq!(s.cert_not_after("a.b"), Some(NOT_AFTER));
        assert_eq!(s.certs(), 1);
        s.apply("locks/a.b", Some(b"hub-b")).unwrap();
        assert_eq!(s.lock_holder("a.b"), Some("hub-b"));
        assert_eq!(s.locks(), vec![("a.b".to_string(), "hub-b".to_string())]);
        // A bad value takes out what the key held.
        assert!(s.apply("certs/a.b", Some(b"{")).is_err());
        assert_eq!(s.cert("a.b"), None);
        assert!(s.apply("alpn01/a.b", Some(b"zz")).is_err());
        assert_eq!(s.alpn01("a.b"), None);
        // Deletes.
        s.apply(&format!("http01/{TOKEN}"), None).unwrap();
        assert_eq!(s.http01(TOKEN), None);
        s.apply("locks/a.b", None).unwrap();
        assert_eq!(s.lock_holder("a.b"), None);
        // A bad key changes nothing.
        let before = s.clone();
        assert!(s.apply("certs/A.b", Some(&pem().encode())).is_err());
        assert_eq!(s, before);
    }

    proptest! {
        #[test]
        fn apply_never_panics_and_keeps_only_checked_values(
            kind in prop::sample::select(vec!["http01", "alpn01", "dns01", "certs", "locks", "x"]),
            rest in "[a-zA-Z0-9._/*-]{0,20}",
            value in prop::collection::vec(any::<u8>(), 0..200),
            delete in any::<bool>(),
        ) {
            let mut s = Shared::default();
            let path = format!("{kind}/{rest}");
            let r = s.apply(&path, (!delete).then_some(value.as_slice()));
            if r.is_err() || delete {
                prop_assert_eq!(s.certs(), 0);
                prop_assert!(s.locks().is_empty());
            }
            if let Ok(k) = parse_key(&path) {
                prop_assert_eq!(parse_key(&k.path()), Ok(k));
            }
        }

        #[test]
        fn published_values_read_back(token in "[A-Za-z0-9_-]{1,64}", thumb in "[A-Za-z0-9_-]{1,43}",
                                      d in any::<[u8; 32]>()) {
            let mut s = Shared::default();
            let ka = format!("{token}.{thumb}");
            let path = format!("http01/{token}");
            prop_assert!(s.apply(&path, Some(ka.as_bytes())).is_ok());
            prop_assert_eq!(s.http01(&token), Some(ka.as_str()));
            prop_assert!(s.apply("alpn01/x.y", Some(encode_digest(&d).as_bytes())).is_ok());
            prop_assert_eq!(s.alpn01("x.y"), Some(d));
            let dns = format!("dns01/x.y/{}", thumb);
            prop_assert!(s.apply(&dns, Some(thumb.as_bytes())).is_ok());
            prop_assert_eq!(s.dns01("x.y"), vec![thumb.clone()]);
        }
    }
}
