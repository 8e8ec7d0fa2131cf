//! Automatic certificates with ACME (RFC 8555) through `instant-acme`: HTTP-01
//! (answered on the HTTP listeners under `/.well-known/acme-challenge/`),
//! TLS-ALPN-01 (RFC 8737, answered on the TLS listeners to `acme-tls/1`
//! ClientHellos) and, for the wildcard certificates of gateway domains
//! (`*.<domain>`), DNS-01 (answered by the hub's DNS listeners for
//! `_acme-challenge.<domain>`, see [`crate::proxy::dns`]). Certificates and
//! the account live in a state directory and survive restarts; a certificate
//! is renewed `renew_before` ahead of expiry (up to a tenth of that earlier,
//! spread by host name).
//!
//! The [`AcmeState`] is shared by every proxy generation: the HTTP and TLS
//! paths read its challenge tables and certificates, the manager task
//! ([`spawn_manager`]) fills them.
//!
//! Hubs in a mesh coordinate through an [`AcmeShare`] (the mesh's etcd): one
//! hub at a time orders a host's certificate (it holds the host's lock), its
//! challenge answers are published so that whichever hub the ACME server
//! reaches answers the validation, and with shared certificates the result
//! is stored for the other hubs, which take it instead of ordering their own.

use crate::clock::unix_secs;
use crate::mesh::acme::CertPem;
use crate::proxy::settings::{AcmeChallenge, AcmeSettings};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BytesResponse, ChallengeType, HttpClient,
    Identifier, NewAccount, NewOrder, OrderStatus,
};
use parking_lot::RwLock;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

/// The ALPN protocol of TLS-ALPN-01 validation connections.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// Path prefix of HTTP-01 challenges.
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// A boxed future of an [`AcmeShare`] call.
pub type ShareFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A challenge answer published for the other hubs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// HTTP-01: the key authorization served for `token`.
    Http01 {
        token: String,
        key_authorization: String,
    },
    /// TLS-ALPN-01: the digest the validation certificate for `host` carries.
    Alpn01 { host: String, digest: [u8; 32] },
    /// DNS-01: a TXT value of `_acme-challenge.<domain>`.
    Dns01 { domain: String, value: String },
}

/// What hubs share to order certificates together (the mesh's etcd).
pub trait AcmeShare: Send + Sync {
    /// Orders can be coordinated now (the store is reachable).
    fn ready(&self) -> bool;
    /// Issued certificates are shared (stored and taken from the store).
    fn shares_certificates(&self) -> bool;
    /// Another hub's HTTP-01 key authorization for `token`.
    fn http01(&self, token: &str) -> Option<String>;
    /// Another hub's TLS-ALPN-01 digest for `host`.
    fn alpn01(&self, host: &str) -> Option<[u8; 32]>;
    /// The DNS-01 TXT values other hubs published for `domain`.
    fn dns01(&self, domain: &str) -> Vec<String>;
    /// The shared certificate of `host`, as last seen.
    fn cert(&self, host: &str) -> Option<CertPem>;
    /// Its `notAfter` (Unix seconds), also when this hub cannot use it.
    fn cert_not_after(&self, host: &str) -> Option<u64>;
    /// The stored certificate of `host` has its key in clear and this hub
    /// would store it sealed.
    fn wants_sealing(&self, host: &str) -> bool;
    /// `kick` is notified when a shared certificate or a lock changes.
    fn on_change(&self, kick: Arc<Notify>);
    /// The current session with the store (its etcd lease), if any: the
    /// lock and the published answers live as long as it does.
    fn session(&self) -> Option<i64>;
    /// Takes the lock on ordering for `host`: true when this hub holds it.
    fn lock<'a>(&'a self, host: &'a str) -> ShareFuture<'a, Result<bool, String>>;
    /// Lets go of the lock on `host` (if this hub holds it). False when
    /// the lock may still be there (the store did not take the delete).
    fn unlock<'a>(&'a self, host: &'a str) -> ShareFuture<'a, bool>;
    /// Publishes a challenge answer (it goes when this hub's session ends).
    fn publish<'a>(&'a self, c: &'a Challenge) -> ShareFuture<'a, Result<(), String>>;
    /// Withdraws a published challenge answer.
    fn withdraw<'a>(&'a self, c: &'a Challenge) -> ShareFuture<'a, ()>;
    /// Reads the shared certificate of `host` from the store itself.
    fn fetch_cert<'a>(&'a self, host: &'a str) -> ShareFuture<'a, Result<Option<CertPem>, String>>;
    /// Stores the certificate of `host` for the other hubs.
    fn store_cert<'a>(
        &'a self,
        host: &'a str,
        pem: &'a CertPem,
    ) -> ShareFuture<'a, Result<(), String>>;
}

/// A validation certificate made for a published digest.
type MadeAlpnCert = ([u8; 32], Arc<CertifiedKey>);

/// Challenge answers and issued certificates, shared with the listeners.
#[derive(Default)]
pub struct AcmeState {
    http01: RwLock<HashMap<String, String>>,
    alpn01: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    /// Validation certificates made for other hubs' TLS-ALPN-01 digests.
    alpn01_shared: RwLock<HashMap<String, MadeAlpnCert>>,
    /// DNS-01 TXT values by domain (answered for `_acme-challenge.<domain>`).
    dns01: RwLock<HashMap<String, Vec<String>>>,
    certs: RwLock<HashMap<String, (Arc<CertifiedKey>, u64)>>,
    wanted: RwLock<(Option<AcmeSettings>, Vec<String>)>,
    /// Domains whose `_acme-challenge` name the DNS listeners answer.
    dns_zones: RwLock<Vec<String>>,
    /// Hosts whose last order failed: the error and when it is tried
    /// again (Unix seconds).
    failures: RwLock<HashMap<String, (String, u64)>>,
    share: RwLock<Option<Arc<dyn AcmeShare>>>,
    kick: Arc<Notify>,
    /// Whether [`AcmeState::set_wanted`] was called (its first call is the
    /// start, which keeps every wait after failed orders).
    started: AtomicBool,
    /// The ACME settings changed: every failed order runs again at once,
    /// taken by the manager's next round (see [`AcmeState::set_wanted`]).
    settings_changed: AtomicBool,
    /// Issued certificates served but not written to `state_dir` yet (the
    /// write failed), with their expiry: each round writes them again. They
    /// stay until written or expired, also while a reload drops their host
    /// (wanted again, it is served from here and not ordered again).
    unsaved: RwLock<HashMap<String, (CertPem, u64)>>,
    /// The proxy stopped ([`AcmeState::stop`]): nothing is ordered any more
    /// and the manager ends, though connections still open hold the state.
    stopped: AtomicBool,
    /// Where the next order stops, for tests of what follows.
    #[cfg(test)]
    test_stop: parking_lot::Mutex<Option<TestStop>>,
}

/// Whether orders made with `a` and with `b` may end differently: any
/// setting but `renew_before` (which only says when to renew) differs.
fn orders_differ(a: &AcmeSettings, b: &AcmeSettings) -> bool {
    let a = AcmeSettings {
        renew_before: b.renew_before,
        ..a.clone()
    };
    a != *b
}

/// A digest of the settings [`orders_differ`] compares (all but
/// `renew_before`), as 16 hex digits: kept in a host's [`RETRY_FILE`], so
/// that a restart with other settings orders at once, as a reload does.
fn settings_digest(cfg: &AcmeSettings) -> String {
    // Every field named: a field added to the settings is not left out
    // unseen.
    let AcmeSettings {
        directory,
        contact,
        state_dir,
        directory_ca,
        challenge,
        renew_before: _,
        wildcard,
        dns_listen,
    } = cfg;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    // Each part with its length first: no two lists of parts read the same.
    let mut part = |b: &[u8]| {
        ctx.update(&(b.len() as u64).to_be_bytes());
        ctx.update(b);
    };
    part(directory.as_bytes());
    part(&(contact.len() as u64).to_be_bytes());
    for c in contact {
        part(c.as_bytes());
    }
    part(state_dir.as_os_str().as_encoded_bytes());
    match directory_ca {
        Some(ca) => part(ca.as_os_str().as_encoded_bytes()),
        None => part(b"-"),
    }
    part(match challenge {
        AcmeChallenge::Http01 => b"http-01",
        AcmeChallenge::TlsAlpn01 => b"tls-alpn-01",
    });
    part(&[u8::from(*wildcard)]);
    part(&(dns_listen.len() as u64).to_be_bytes());
    for a in dns_listen {
        part(a.to_string().as_bytes());
    }
    ctx.finish()
        .as_ref()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The [`PENDING_FILE`]s that go when the wanted hosts change from
/// `old_hosts` under `old` to `hosts` under `new`: those of hosts no longer
/// wanted, and all of them when the settings changed (an order of other
/// settings is not resumed). A host wanted again orders anew; the keys of
/// orders nobody resumes do not stay on disk.
fn pending_dropped(
    old: &Option<AcmeSettings>,
    old_hosts: &[String],
    new: Option<&AcmeSettings>,
    hosts: &[String],
) -> Vec<PathBuf> {
    let Some(old) = old else {
        return Vec::new();
    };
    let same = new.is_some_and(|n| !orders_differ(old, n));
    let kept: std::collections::HashSet<&str> = hosts.iter().map(String::as_str).collect();
    old_hosts
        .iter()
        .filter(|h| !same || !kept.contains(h.as_str()))
        .map(|h| host_dir(old, h).join(PENDING_FILE))
        .collect()
}

impl AcmeState {
    /// The key authorization for an HTTP-01 `token` (this hub's, or one
    /// another hub published).
    pub fn http01(&self, token: &str) -> Option<String> {
        if let Some(ka) = self.http01.read().get(token) {
            return Some(ka.clone());
        }
        self.share.read().as_ref()?.http01(token)
    }
    /// The TLS-ALPN-01 validation certificate for `host` (this hub's, or one
    /// made for the digest another hub published).
    pub fn alpn01(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        if let Some(k) = self.alpn01.read().get(host) {
            return Some(k.clone());
        }
        let digest = self.share.read().as_ref()?.alpn01(host)?;
        if let Some((d, k)) = self.alpn01_shared.read().get(host) {
            if *d == digest {
                return Some(k.clone());
            }
        }
        let k = alpn_cert(host, &digest).ok()?;
        let mut made = self.alpn01_shared.write();
        // Only hosts with a published digest stay (a bounded set).
        if made.len() > 1024 {
            made.clear();
        }
        made.insert(host.to_string(), (digest, k.clone()));
        Some(k)
    }
    /// Coordinates orders with other hubs through `share` (`None`: alone).
    pub fn set_share(&self, share: Option<Arc<dyn AcmeShare>>) {
        if let Some(s) = &share {
            s.on_change(self.kick.clone());
        }
        *self.share.write() = share;
        self.kick.notify_one();
    }
    fn share(&self) -> Option<Arc<dyn AcmeShare>> {
        self.share.read().clone()
    }
    /// The issued certificate for `host`: its own, or the wildcard
    /// certificate of its parent domain.
    pub fn cert(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let certs = self.certs.read();
        if let Some((k, _)) = certs.get(host) {
            return Some(k.clone());
        }
        let (_, parent) = host.split_once('.')?;
        certs.get(&format!("*.{parent}")).map(|(k, _)| k.clone())
    }
    /// What the DNS listeners answer for `qname` (lowercase, no trailing
    /// dot): the TXT values of `_acme-challenge.<domain>` for the domains
    /// whose wildcard certificate this hub keeps (its own order's and the
    /// ones other hubs of a mesh published).
    pub fn dns_lookup(&self, qname: &str) -> crate::proxy::dns::Lookup {
        use crate::proxy::dns::Lookup;
        let zones = self.dns_zones.read();
        for d in zones.iter() {
            let Some(head) = qname.strip_suffix(d.as_str()) else {
                continue;
            };
            if head == "_acme-challenge." {
                return Lookup::Apex {
                    zone: format!("_acme-challenge.{d}"),
                    txt: self.challenge_values(d),
                };
            }
            if head.ends_with("._acme-challenge.") {
                return Lookup::Below {
                    zone: format!("_acme-challenge.{d}"),
                };
            }
        }
        Lookup::Outside
    }
    /// The TXT values of `_acme-challenge.<domain>` now: this hub's own
    /// order's, or else another hub's of the mesh (one hub orders a host at
    /// a time); none between orders.
    pub fn challenge_values(&self, domain: &str) -> Vec<String> {
        let txt = self.dns01.read().get(domain).cloned().unwrap_or_default();
        if !txt.is_empty() {
            return txt;
        }
        self.share
            .read()
            .as_ref()
            .map(|sh| sh.dns01(domain))
            .unwrap_or_default()
    }
    /// Expiry (Unix seconds) of the certificate for `host`.
    pub fn not_after(&self, host: &str) -> Option<u64> {
        self.certs.read().get(host).map(|(_, t)| *t)
    }

    /// When the certificate kept for `host` is due for renewal.
    fn renew_time(&self, host: &str, renew_before: u64) -> Option<u64> {
        let certs = self.certs.read();
        let (k, na) = certs.get(host)?;
        let nb = k
            .cert
            .first()
            .and_then(|c| cert_validity(c))
            .map(|(nb, _)| nb);
        Some(renew_at(nb, *na, renew_before, host))
    }
    /// Sets what the manager should keep certificates for (`*.<domain>` for
    /// a wildcard certificate), and wakes it. Certificates of other hosts
    /// are no longer served. `dns_zones`: the domains whose
    /// `_acme-challenge` name the DNS listeners answer.
    ///
    /// Every reload calls this, the control plane's changes too (a node
    /// declaring its services, a join, a route made through the API), so
    /// the waits after failed orders are kept across calls, also for a host
    /// dropped and wanted again (a node's service that comes and goes must
    /// not order again each time it comes): only a change of the ACME
    /// settings (all hosts) has failed orders run again at once, or deleting
    /// a host's `retry` file. The first call (the start) keeps them too: the
    /// `retry` files say how long to wait. Orders waiting for their
    /// certificate do not outlive their host or their settings, though
    /// ([`pending_dropped`]).
    pub fn set_wanted(
        &self,
        settings: Option<AcmeSettings>,
        hosts: Vec<String>,
        dns_zones: Vec<String>,
    ) {
        let dropped = {
            let mut wanted = self.wanted.write();
            let changed = match (&wanted.0, &settings) {
                (Some(old), Some(new)) => orders_differ(old, new),
                // ACME turned on.
                (None, Some(_)) => true,
                (_, None) => false,
            };
            if self.started.swap(true, Ordering::Relaxed) && changed {
                self.settings_changed.store(true, Ordering::Relaxed);
            }
            let dropped = pending_dropped(&wanted.0, &wanted.1, settings.as_ref(), &hosts);
            *wanted = (settings, hosts);
            dropped
        };
        for f in dropped {
            remove_pending_at(&f);
        }
        *self.dns_zones.write() = dns_zones;
        self.prune();
        self.kick.notify_one();
    }

    /// Whether the manager still keeps a certificate for `host` (a reload
    /// may drop it while a round runs; none once the proxy stopped).
    fn wants(&self, host: &str) -> bool {
        if self.is_stopped() {
            return false;
        }
        let wanted = self.wanted.read();
        wanted.0.is_some() && wanted.1.iter().any(|h| h == host)
    }

    /// The proxy stopped (or was removed from the config): the manager
    /// orders nothing more (an order in flight is given up before its
    /// validation) and ends at once, though connections still open hold
    /// the state; a proxy started later has a manager of its own.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.kick.notify_one();
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// Stops serving the certificates of hosts no longer wanted, except one
    /// whose host a wanted wildcard covers while that wildcard is not there
    /// yet (switching `wildcard` on does not cut TLS off until the wildcard
    /// certificate is issued).
    fn prune(&self) {
        let wanted = self.wanted.read();
        let keep: std::collections::HashSet<&str> = wanted.1.iter().map(String::as_str).collect();
        let mut certs = self.certs.write();
        // By domain: wanted wildcards not there yet (their names keep their
        // own certificates), and the parents of wanted names without their
        // own certificate yet (their wildcard stays: switching back).
        let missing = |h: &&str| !certs.contains_key(*h);
        let waiting: std::collections::HashSet<&str> = keep
            .iter()
            .copied()
            .filter(missing)
            .filter_map(|h| h.strip_prefix("*."))
            .collect();
        let uncovered: std::collections::HashSet<&str> = keep
            .iter()
            .copied()
            .filter(missing)
            .filter(|h| !h.starts_with("*."))
            .filter_map(|h| Some(h.split_once('.')?.1))
            .collect();
        let keep_it = |h: &str| {
            keep.contains(h)
                || h.strip_prefix("*.").is_some_and(|d| uncovered.contains(d))
                || h.split_once('.').is_some_and(|(_, p)| waiting.contains(p))
        };
        certs.retain(|h, _| keep_it(h));
        self.failures
            .write()
            .retain(|h, _| keep.contains(h.as_str()));
        let now = unix_secs();
        self.unsaved
            .write()
            .retain(|h, (_, na)| keep.contains(h.as_str()) || *na > now);
    }

    /// The certificates ACME keeps, one per wanted host: expiry, renewal
    /// time, and the last order's error while it keeps failing.
    pub fn status(&self) -> Vec<crate::proxy::stats::CertStatus> {
        let wanted = self.wanted.read();
        let renew_before = wanted.0.as_ref().map_or(0, |c| c.renew_before.as_secs());
        let certs = self.certs.read();
        let failures = self.failures.read();
        let mut v: Vec<_> = wanted
            .1
            .iter()
            .map(|h| {
                let not_after = certs.get(h).map(|(_, na)| *na);
                let not_before = certs
                    .get(h)
                    .and_then(|(k, _)| k.cert.first())
                    .and_then(|c| cert_validity(c))
                    .map(|(nb, _)| nb);
                let failure = failures.get(h);
                crate::proxy::stats::CertStatus {
                    host: h.clone(),
                    source: "acme",
                    not_after,
                    renew_at: not_after.map(|na| renew_at(not_before, na, renew_before, h)),
                    error: failure.map(|(e, _)| e.clone()),
                    retry_at: failure.map(|(_, at)| *at),
                    superseded: false,
                }
            })
            .collect();
        // Still served while what replaces them is not there (see `prune`).
        let wanted_set: std::collections::HashSet<&String> = wanted.1.iter().collect();
        let mut kept: Vec<_> = certs
            .iter()
            .filter(|(h, _)| !wanted_set.contains(h))
            .map(|(h, (_, na))| crate::proxy::stats::CertStatus {
                host: h.clone(),
                source: "acme",
                not_after: Some(*na),
                renew_at: None,
                error: None,
                retry_at: None,
                superseded: true,
            })
            .collect();
        kept.sort_by(|a, b| a.host.cmp(&b.host));
        v.extend(kept);
        v
    }

    /// Whether this hub holds a certificate of `host` itself (not through a
    /// wildcard).
    fn has_own(&self, host: &str) -> bool {
        self.certs.read().contains_key(host)
    }
}

// ------------------------------------------------------------ DER: notAfter

fn der_tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let l0 = *b.get(1)?;
    let (len, hdr) = if l0 < 0x80 {
        (usize::from(l0), 2)
    } else {
        let n = usize::from(l0 & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | usize::from(*b.get(2 + i)?);
        }
        (len, 2 + n)
    };
    let end = hdr.checked_add(len)?;
    Some((tag, b.get(hdr..end)?, b.get(end..)?))
}

fn digits(s: &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u64::from(c - b'0');
    }
    Some(v)
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u64, d: u64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn der_time(tag: u8, v: &[u8]) -> Option<u64> {
    let (year, rest) = match tag {
        0x17 => {
            let yy = digits(v.get(..2)?)?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, v.get(2..)?)
        }
        0x18 => (digits(v.get(..4)?)?, v.get(4..)?),
        _ => return None,
    };
    let f = |i: usize| digits(rest.get(i..i + 2)?);
    let days = days_from_civil(i64::try_from(year).ok()?, f(0)?, f(2)?);
    let secs = days * 86_400 + i64::try_from(f(4)? * 3600 + f(6)? * 60 + f(8)?).ok()?;
    u64::try_from(secs).ok()
}

/// The `notAfter` of an X.509 certificate, in Unix seconds.
pub fn cert_not_after(der: &[u8]) -> Option<u64> {
    cert_validity(der).map(|(_, na)| na)
}

/// The `notBefore` and `notAfter` of an X.509 certificate, in Unix seconds.
pub fn cert_validity(der: &[u8]) -> Option<(u64, u64)> {
    let (_, cert, _) = der_tlv(der)?;
    let (_, tbs, _) = der_tlv(cert)?;
    let mut rest = tbs;
    // [0] version (optional), serial, signature, issuer, validity
    let (tag, _, r) = der_tlv(rest)?;
    if tag == 0xa0 {
        rest = r;
    }
    for _ in 0..3 {
        rest = der_tlv(rest)?.2;
    }
    let (_, validity, _) = der_tlv(rest)?;
    let (tag, v, after) = der_tlv(validity)?;
    let before = der_time(tag, v)?;
    let (tag, v, _) = der_tlv(after)?;
    Some((before, der_time(tag, v)?))
}

/// When the certificate of `host` valid from `not_before` to `not_after` is
/// renewed: `renew_before` ahead of its expiry; when that is as long as its
/// whole lifetime (a CA's short-lived certificates, a day, where
/// `renew_before` is 30 days), once two thirds of it have passed, rather
/// than at once and again after every order. Either is moved earlier by up
/// to a tenth of that margin (and of the time from `not_before`), by an
/// amount taken from the host name: certificates issued together are not
/// all renewed in the same round, and a host keeps its time across restarts.
pub fn renew_at(not_before: Option<u64>, not_after: u64, renew_before: u64, host: &str) -> u64 {
    let nb = not_before.filter(|nb| *nb < not_after);
    let at = match nb {
        Some(nb) if renew_before >= not_after - nb => nb + (not_after - nb) / 3 * 2,
        _ => not_after.saturating_sub(renew_before),
    };
    let mut spread = not_after - at;
    if let Some(nb) = nb {
        spread = spread.min(at.saturating_sub(nb));
    }
    let h = ring::digest::digest(&ring::digest::SHA256, host.as_bytes())
        .as_ref()
        .iter()
        .take(8)
        .fold(0u64, |a, b| a << 8 | u64::from(*b));
    at.saturating_sub(h % (spread / 10 + 1))
}

// ------------------------------------------------------------ HTTP client

/// How long one request to the ACME server may take, its whole body read.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest response body taken from the ACME server (a certificate
/// chain is a few KiB).
const BODY_LIMIT: usize = 1 << 20;

/// HTTPS to the ACME server, trusting `directory_ca` (or the system bundle).
struct AcmeHttp {
    tls: tokio_rustls::TlsConnector,
    /// [`REQUEST_TIMEOUT`], shorter in tests.
    timeout: Duration,
}

impl AcmeHttp {
    fn new(ca: Option<&Path>) -> Result<Self, String> {
        let roots = acme_roots(ca)?;
        let cfg = rustls::ClientConfig::builder_with_provider(crate::proxy::upstream::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(AcmeHttp {
            tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
            timeout: REQUEST_TIMEOUT,
        })
    }
}

/// The CA certificates that check the ACME server's: `directory_ca`'s, or
/// the system bundle's ([`crate::carrier::system_bundle`]). Errors name
/// which, and the file.
pub(crate) fn acme_roots(ca: Option<&Path>) -> Result<rustls::RootCertStore, String> {
    let (what, file) = match ca {
        Some(f) => ("[proxy.acme] directory_ca", f.to_path_buf()),
        None => (
            "the system CA bundle",
            PathBuf::from(crate::carrier::system_bundle().ok_or_else(|| {
                format!(
                    "[proxy.acme]: no system CA bundle found (looked for {}): \
                     install the CA certificates, or set directory_ca",
                    crate::carrier::SYSTEM_BUNDLES.join(", ")
                )
            })?),
        ),
    };
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&file)
        .map_err(|e| format!("{what} {}: {e}", file.display()))?
        .filter_map(Result::ok)
        .collect();
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(certs);
    if roots.is_empty() {
        return Err(format!("{what} {}: no usable certificate", file.display()));
    }
    Ok(roots)
}

/// A problem document (RFC 7807, `about:blank`: the status says it all) for
/// an error response that carries none, such as a 404 with an empty body:
/// instant-acme would report only a body it cannot read, and the status,
/// which tells an order the CA no longer knows from one it cannot serve
/// now ([`order_refused`]), would be lost. `None`: the body stays.
fn problem_for(status: http::StatusCode, body: &[u8]) -> Option<Bytes> {
    if !status.is_client_error() && !status.is_server_error() {
        return None;
    }
    if serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| v.is_object()) {
        return None;
    }
    let problem = serde_json::json!({
        "type": "about:blank",
        "detail": format!("HTTP {status}"),
        "status": status.as_u16(),
    });
    Some(Bytes::from(problem.to_string()))
}

fn other(e: impl std::fmt::Display) -> instant_acme::Error {
    instant_acme::Error::Other(e.to_string().into())
}

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        mut req: Request<Full<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let tls = self.tls.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let work = async {
                let uri = req.uri().clone();
                if uri.scheme_str() != Some("https") {
                    return Err(other(format!("ACME URL {uri} is not https")));
                }
                let host = uri.host().ok_or_else(|| other("ACME URL without host"))?;
                let port = uri.port_u16().unwrap_or(443);
                let bare = host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string();
                let tcp = TcpStream::connect((bare.as_str(), port))
                    .await
                    .map_err(other)?;
                let name = ServerName::try_from(bare.clone()).map_err(other)?;
                let stream = tls.connect(name, tcp).await.map_err(other)?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                        .await
                        .map_err(other)?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                let auth = match uri.port_u16() {
                    Some(p) => format!("{host}:{p}"),
                    None => host.to_string(),
                };
                req.headers_mut().insert(
                    http::header::HOST,
                    http::HeaderValue::from_str(&auth).map_err(other)?,
                );
                let pq = uri.path_and_query().map_or("/", |p| p.as_str());
                *req.uri_mut() = pq.parse().map_err(other)?;
                let resp = sender.send_request(req).await.map_err(other)?;
                // The whole body, within the timeout: one read later by
                // instant-acme would have none, and a server that stalls
                // mid-body would hold the manager for good.
                let (mut parts, body) = resp.into_parts();
                let body = http_body_util::BodyExt::collect(http_body_util::Limited::new(
                    body, BODY_LIMIT,
                ))
                .await
                .map_err(|e| other(format!("ACME response body: {e}")))?
                .to_bytes();
                if let Some(made) = problem_for(parts.status, &body) {
                    parts.headers.remove(http::header::CONTENT_LENGTH);
                    return Ok(BytesResponse::from(http::Response::from_parts(
                        parts,
                        Full::new(made),
                    )));
                }
                Ok(BytesResponse::from(http::Response::from_parts(
                    parts,
                    Full::new(body),
                )))
            };
            tokio::time::timeout(timeout, work)
                .await
                .unwrap_or_else(|_| Err(other("ACME request timed out")))
        })
    }
}

// ------------------------------------------------------------ files

/// Beside a host's `fullchain.pem`: the directory URL of the CA that issued it.
const DIRECTORY_FILE: &str = "directory";
/// In a host's directory: its private key and then its chain, written in one
/// step, so that a crash never leaves a key without its certificate. Loaded
/// first; `key.pem` and `fullchain.pem` are written after it for other
/// programs (and read when there is no bundle, from older versions).
const BUNDLE_FILE: &str = "bundle.pem";
const KEY_FILE: &str = "key.pem";
const CHAIN_FILE: &str = "fullchain.pem";
/// In a host's directory while its orders fail: when the next one may run
/// (Unix seconds), the last wait (seconds), the directory URL and the
/// [`settings_digest`] the orders failed with, then the last error.
const RETRY_FILE: &str = "retry";
/// In a host's directory from just before this hub finalizes an order until
/// the order's certificate is installed: a [`Pending`] record (mode 0600, it
/// holds the new private key). Should the wait for the certificate stop (the
/// order's deadline, a restart, a network error), the next try fetches that
/// order's certificate instead of ordering again: a new order counts against
/// the CA's limits on new orders and on duplicate certificates. It is this
/// hub's alone, never shared in a mesh: the key is no other hub's until the
/// certificate is published with it.
const PENDING_FILE: &str = "pending-order";
/// How long a [`PENDING_FILE`] is resumed after it was written: by then the
/// order has expired (Let's Encrypt keeps an order for 7 days).
const PENDING_KEPT: Duration = Duration::from_secs(7 * 86_400);

/// An order this hub finalized, or is about to, whose certificate it has not
/// installed yet (see [`PENDING_FILE`]). `Debug` leaves the key out.
struct Pending {
    /// The order's URL.
    order: String,
    /// The URL of the account that made it.
    account: String,
    /// The [`settings_digest`] it was made with.
    settings: String,
    /// When the record was written (Unix seconds).
    written: u64,
    /// The private key its certificate request was signed with (PEM).
    key: zeroize::Zeroizing<String>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("order", &self.order)
            .field("account", &self.account)
            .field("settings", &self.settings)
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl Pending {
    /// The file's content: the order URL, the account URL, the settings
    /// digest and the time on their own lines, then the key.
    fn text(&self) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(format!(
            "{}\n{}\n{} {}\n{}",
            self.order, self.account, self.settings, self.written, *self.key
        ))
    }

    /// Reads [`Pending::text`]; an error says what is missing or wrong
    /// (never the key).
    fn parse(text: &str) -> Result<Pending, String> {
        let mut lines = text.splitn(4, '\n');
        let order = lines
            .next()
            .filter(|l| !l.is_empty())
            .ok_or("no order URL")?;
        if !order.starts_with("https://") || order.contains(char::is_whitespace) {
            return Err("the order URL is not an https URL".into());
        }
        let account = lines
            .next()
            .filter(|l| !l.is_empty() && !l.contains(char::is_whitespace))
            .ok_or("no account URL")?;
        let mut head = lines.next().unwrap_or_default().split_whitespace();
        let settings = head
            .next()
            .filter(|d| d.len() == 16 && d.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or("no settings digest")?;
        let written = head
            .next()
            .and_then(|t| t.parse().ok())
            .ok_or("no time written")?;
        let key = lines
            .next()
            .filter(|k| k.starts_with("-----BEGIN "))
            .ok_or("no private key")?;
        rcgen::KeyPair::from_pem(key).map_err(|e| format!("the private key does not load: {e}"))?;
        Ok(Pending {
            order: order.to_string(),
            account: account.to_string(),
            settings: settings.to_string(),
            written,
            key: zeroize::Zeroizing::new(key.to_string()),
        })
    }

    /// Why this record is not resumed with `cfg` by the account `account`
    /// at `now` (Unix seconds), if it is not: an order of other settings
    /// (another CA directory, another `state_dir`), of another account, or
    /// one expired by now.
    fn unusable(&self, cfg: &AcmeSettings, account: &str, now: u64) -> Option<&'static str> {
        if self.settings != settings_digest(cfg) {
            Some("it was made with other ACME settings")
        } else if self.account != account {
            Some("it was made by another ACME account")
        } else if now.saturating_sub(self.written) > PENDING_KEPT.as_secs() {
            Some("it has expired")
        } else {
            None
        }
    }
}

/// Writes the [`PENDING_FILE`] of `host`.
fn save_pending(cfg: &AcmeSettings, host: &str, p: &Pending) -> Result<(), String> {
    let dir = host_dir(cfg, host);
    let path = dir.join(PENDING_FILE);
    std::fs::create_dir_all(&dir)
        .and_then(|()| write_private(&path, p.text().as_bytes()))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Reads the [`PENDING_FILE`] of `host`; `None` when there is none. An error
/// names the file and what is wrong with it.
fn read_pending(cfg: &AcmeSettings, host: &str) -> Option<Result<Pending, String>> {
    let path = host_dir(cfg, host).join(PENDING_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => zeroize::Zeroizing::new(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Err(format!("{}: {e}", path.display()))),
    };
    Some(Pending::parse(&text).map_err(|e| format!("{}: {e}", path.display())))
}

/// Removes the [`PENDING_FILE`] at `path`, if there is one.
fn remove_pending_at(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => debug!(file = %path.display(), "ACME pending order record removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            warn!(file = %path.display(), error = %e, "ACME pending order record not removed")
        }
    }
}

/// Removes the [`PENDING_FILE`] of `host`, if there is one.
fn remove_pending(cfg: &AcmeSettings, host: &str) {
    remove_pending_at(&host_dir(cfg, host).join(PENDING_FILE));
}

/// Whether the stored certificate of `host` was issued by another CA than
/// the configured one (`directory` changed since): it is served until the
/// new CA's replaces it, ordered at once. One without the note (taken from
/// the mesh, or older) is not.
fn from_another_directory(cfg: &AcmeSettings, host: &str) -> bool {
    std::fs::read_to_string(host_dir(cfg, host).join(DIRECTORY_FILE))
        .is_ok_and(|d| d.trim() != cfg.directory)
}

/// Replaces `path` with `data` (mode 0600) in one step: after a crash it
/// holds the old data or the new, and the new is on disk once this returns.
/// The data goes through a file of its own first (`<name>.<random>.tmp`,
/// made new): two writers of the same file never write into each other's.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("no file name"))?
        .to_string_lossy();
    let mut tries = 0;
    let (tmp, mut file) = loop {
        let draw = rand_core::RngCore::next_u64(&mut rand_core::OsRng);
        let tmp = path.with_file_name(format!("{name}.{draw:016x}.tmp"));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
        {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 8 => tries += 1,
            Err(e) => return Err(e),
        }
    };
    let written = file
        .write_all(data)
        .and_then(|()| file.sync_all())
        .and_then(|()| {
            drop(file);
            std::fs::rename(&tmp, path)
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

fn host_dir(cfg: &AcmeSettings, host: &str) -> PathBuf {
    cfg.state_dir.join("certs").join(host)
}

/// A chain and key that load and match, and the leaf's `notAfter`.
fn load_pair(pem: &CertPem) -> Result<(CertifiedKey, u64), String> {
    let k = crate::proxy::tls::certified_key_from_pem(pem.chain.as_bytes(), pem.key.as_bytes())?;
    let na = k
        .cert
        .first()
        .and_then(|c| cert_not_after(c))
        .ok_or("no notAfter in the certificate")?;
    Ok((k, na))
}

/// A bundle's key and chain (the key comes first).
fn split_bundle(text: &str) -> Result<CertPem, String> {
    let at = text
        .find("-----BEGIN CERTIFICATE-----")
        .ok_or("no certificate")?;
    let (key, chain) = text.split_at(at);
    Ok(CertPem {
        chain: chain.to_string(),
        key: key.to_string(),
    })
}

/// Reads a file of a host's directory; `None` when it is not there.
fn read_host_file(path: &Path) -> Option<Result<String, String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Some(Ok(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(Err(format!("{}: {e}", path.display()))),
    }
}

/// The stored certificate of `host`, checked: the bundle's or the one of
/// `key.pem` and `fullchain.pem`, whichever loads and expires later (the
/// bundle on a tie). A crash while they were written leaves one of them
/// good. `None` if neither loads.
fn read_stored(cfg: &AcmeSettings, host: &str) -> Option<(CertPem, CertifiedKey, u64)> {
    let dir = host_dir(cfg, host);
    let bundle = read_host_file(&dir.join(BUNDLE_FILE)).map(|t| split_bundle(&t?));
    let files = match (
        read_host_file(&dir.join(CHAIN_FILE)),
        read_host_file(&dir.join(KEY_FILE)),
    ) {
        (None, None) => None,
        (chain, key) => Some((|| -> Result<CertPem, String> {
            Ok(CertPem {
                chain: chain.ok_or("fullchain.pem missing")??,
                key: key.ok_or("key.pem missing")??,
            })
        })()),
    };
    let mut best: Option<(CertPem, CertifiedKey, u64)> = None;
    for (what, pem) in [(BUNDLE_FILE, bundle), ("key.pem and fullchain.pem", files)] {
        let Some(pem) = pem else { continue };
        match pem.and_then(|p| load_pair(&p).map(|(k, na)| (p, k, na))) {
            Ok(x) => {
                if best.as_ref().is_none_or(|b| x.2 > b.2) {
                    best = Some(x);
                }
            }
            Err(e) => warn!(host, file = what, error = %e, "stored ACME certificate unusable"),
        }
    }
    best
}

/// Loads the stored certificate for `host`; `None` if missing or unusable.
/// Files that do not hold it (a crash while they were written) are written
/// again.
fn load_stored(cfg: &AcmeSettings, host: &str) -> Option<(Arc<CertifiedKey>, u64)> {
    let (pem, k, na) = read_stored(cfg, host)?;
    let dir = host_dir(cfg, host);
    let same = |f: &str, want: &str| std::fs::read_to_string(dir.join(f)).is_ok_and(|t| t == want);
    if !same(BUNDLE_FILE, &bundle_text(&pem))
        || !same(KEY_FILE, &pem.key)
        || !same(CHAIN_FILE, &pem.chain)
    {
        match store_pair(&dir, &pem) {
            Ok(()) => info!(host, "stored ACME certificate files written again"),
            Err(e) => warn!(host, error = %e, "stored ACME certificate files not written again"),
        }
    }
    Some((Arc::new(k), na))
}

/// The content of a bundle: the key, then the chain.
fn bundle_text(pem: &CertPem) -> zeroize::Zeroizing<String> {
    let mut t = zeroize::Zeroizing::new(String::with_capacity(pem.key.len() + pem.chain.len() + 1));
    t.push_str(&pem.key);
    if !t.ends_with('\n') {
        t.push('\n');
    }
    t.push_str(&pem.chain);
    t
}

/// Writes a checked certificate to `dir`: the bundle first, then `key.pem`
/// and `fullchain.pem`. Whenever it stops (a crash, a full disk), the bundle
/// or those two hold a matching pair, the newest that did. An error: the
/// bundle is not written (those two failing only log, the bundle holds it).
fn store_pair(dir: &Path, pem: &CertPem) -> Result<(), String> {
    let bundle = dir.join(BUNDLE_FILE);
    std::fs::create_dir_all(dir)
        .and_then(|()| write_private(&bundle, bundle_text(pem).as_bytes()))
        .map_err(|e| format!("{}: {e}", bundle.display()))?;
    let files = write_private(&dir.join(KEY_FILE), pem.key.as_bytes())
        .and_then(|()| write_private(&dir.join(CHAIN_FILE), pem.chain.as_bytes()));
    if let Err(e) = files {
        warn!(dir = %dir.display(), error = %e, "ACME key.pem and fullchain.pem not written; bundle.pem holds the certificate");
    }
    Ok(())
}

async fn account(cfg: &AcmeSettings) -> Result<Account, String> {
    let path = cfg.state_dir.join("account.json");
    let http = || -> Result<Box<dyn HttpClient>, String> {
        Ok(Box::new(AcmeHttp::new(cfg.directory_ca.as_deref())?))
    };
    let stored = match std::fs::read(&path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        // Another account would be made over the one that is there.
        Err(e) => {
            return Err(format!(
                "ACME account {}: {e} (fix or remove it; no new account is made)",
                path.display()
            ))
        }
    };
    if let Some(text) = stored {
        // The account belongs to the directory it was made at (its URLs are
        // that CA's): a `directory` changed since (staging to production)
        // gets an account of its own, the old file kept beside.
        let made_at = serde_json::from_slice::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("directory")?.as_str().map(str::to_string));
        match serde_json::from_slice::<AccountCredentials>(&text) {
            Ok(creds) if made_at.as_deref().is_none_or(|d| d == cfg.directory) => {
                // A failure here is the CA's directory not answering: the
                // order fails and is tried again later; the account is kept.
                return Account::from_credentials_and_http(creds, http()?)
                    .await
                    .map_err(|e| format!("ACME account at {}: {e}", cfg.directory));
            }
            Ok(_) => {
                let aside = move_aside(&path)?;
                info!(
                    previous = made_at.as_deref().unwrap_or("?"),
                    directory = %cfg.directory,
                    kept_as = %aside.display(),
                    "the stored ACME account is another directory's; creating one"
                );
            }
            // A file broken by hand, a disk or another program: it may
            // still hold the only copy of the account's key, so no account
            // is made over it.
            Err(e) => {
                let what = format!("{}: not an account: {e}", path.display());
                return Err(format!(
                    "ACME account {what} (fix or remove it; no new account is made)"
                ));
            }
        }
    }
    // The new account's key must be kept: the directory is checked first.
    writable_dir(&cfg.state_dir).map_err(|e| format!("ACME state_dir {e}"))?;
    let contact: Vec<&str> = cfg.contact.iter().map(String::as_str).collect();
    let (acct, creds) = Account::create_with_http(
        &NewAccount {
            contact: &contact,
            terms_of_service_agreed: true,
            only_return_existing: false,
        },
        &cfg.directory,
        None,
        http()?,
    )
    .await
    .map_err(|e| format!("ACME account at {}: {e}", cfg.directory))?;
    let json = zeroize::Zeroizing::new(serde_json::to_vec(&creds).map_err(|e| e.to_string())?);
    write_private(&path, &json).map_err(|e| format!("{}: {e}", path.display()))?;
    info!(directory = %cfg.directory, "ACME account created");
    Ok(acct)
}

/// Moves the account at `path` (another directory's) aside, beside it as
/// `account.previous-<Unix seconds>.json` (`-2`, `-3` … added while that
/// name is taken): no earlier account is written over. Where it went.
fn move_aside(path: &Path) -> Result<PathBuf, String> {
    let now = unix_secs();
    for n in 1..=100u32 {
        let name = match n {
            1 => format!("account.previous-{now}.json"),
            n => format!("account.previous-{now}-{n}.json"),
        };
        let to = path.with_file_name(name);
        match std::fs::symlink_metadata(&to) {
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("ACME account kept aside: {}: {e}", to.display())),
        }
        return match std::fs::rename(path, &to) {
            Ok(()) => Ok(to),
            Err(e) => Err(format!(
                "ACME account {}: not moved aside to {}: {e} (no new account is made)",
                path.display(),
                to.display()
            )),
        };
    }
    Err(format!(
        "ACME account {}: no free name to move it aside (no new account is made)",
        path.display()
    ))
}

/// Creates `dir` if missing and checks that a file can be written in it.
fn writable_dir(dir: &Path) -> Result<(), String> {
    let probe = dir.join(".write-test");
    std::fs::create_dir_all(dir)
        .and_then(|()| write_private(&probe, b""))
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| format!("{}: {e}", dir.display()))
}

fn alpn_cert(host: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    crate::proxy::tls::self_signed(
        host,
        vec![rcgen::CustomExtension::new_acme_identifier(digest)],
    )
}

/// How long a hub waits after publishing challenge answers for the other
/// hubs before it asks for validation (they learn of them through a watch).
pub const SHARE_SETTLE: Duration = Duration::from_millis(1000);

/// The longest one order may take, from the account to the stored
/// certificate: whatever stalls, the manager goes on to its other hosts.
const ORDER_TIMEOUT: Duration = Duration::from_secs(600);

/// Orders, validates and stores a certificate for `host`; the issued chain
/// and key. With `share`, the challenge answers are published for the other
/// hubs while the order runs.
async fn issue(
    state: &AcmeState,
    cfg: &AcmeSettings,
    host: &str,
    share: Option<(&dyn AcmeShare, Option<i64>)>,
) -> Result<CertPem, String> {
    // Every answer given (here, and published for the other hubs) goes
    // when the order ends, whichever way it ends.
    let mut answers = Answers::default();
    let r = tokio::time::timeout(
        ORDER_TIMEOUT,
        issue_inner(state, cfg, host, share, &mut answers),
    )
    .await
    .unwrap_or_else(|_| Err(format!("the order took longer than {ORDER_TIMEOUT:?}")));
    let share = share.map(|(sh, _)| sh);
    for c in &answers.local {
        match c {
            Challenge::Http01 { token, .. } => {
                state.http01.write().remove(token);
            }
            Challenge::Alpn01 { host, .. } => {
                state.alpn01.write().remove(host);
            }
            Challenge::Dns01 { domain, value } => {
                let mut m = state.dns01.write();
                if let Some(v) = m.get_mut(domain) {
                    v.retain(|x| x != value);
                    if v.is_empty() {
                        m.remove(domain);
                    }
                }
            }
        }
    }
    if let Some(sh) = share {
        for c in &answers.published {
            sh.withdraw(c).await;
        }
    }
    r
}

/// The challenge answers an order gave.
#[derive(Default)]
struct Answers {
    /// Served by this hub.
    local: Vec<Challenge>,
    /// Published for the other hubs.
    published: Vec<Challenge>,
}

/// After the mesh's store session changed (the lease the order's lock and
/// published answers were written under expired, etcd out of reach for
/// longer than the mesh `ttl`), takes the lock again and publishes the
/// answers again under the new one; gives up the order when another hub
/// took the lock meanwhile. `held`: the session they were last written in.
async fn keep_shared(
    sh: &dyn AcmeShare,
    host: &str,
    held: &mut Option<i64>,
    published: &[Challenge],
) -> Result<(), String> {
    let now = sh.session();
    if now.is_none() || now == *held {
        // Unchanged, or no session to write in yet: looked at again later.
        return Ok(());
    }
    if !sh.lock(host).await? {
        return Err(
            "another hub took the mesh lock while this hub's etcd session was renewed".into(),
        );
    }
    for c in published {
        sh.publish(c)
            .await
            .map_err(|e| format!("publishing the challenge in the mesh again: {e}"))?;
    }
    info!(host = %host, answers = published.len(), "ACME order: lock and answers written again under the new mesh session");
    *held = now;
    Ok(())
}

async fn issue_inner(
    state: &AcmeState,
    cfg: &AcmeSettings,
    host: &str,
    share: Option<(&dyn AcmeShare, Option<i64>)>,
    answers: &mut Answers,
) -> Result<CertPem, String> {
    let (share, mut held) = match share {
        Some((sh, held)) => (Some(sh), held),
        None => (None, None),
    };
    // `issue` gives up at the same time.
    let deadline = tokio::time::Instant::now() + ORDER_TIMEOUT;
    let acct = account(cfg).await?;
    if let Some(pem) = resume(state, cfg, host, &acct, deadline, share, &mut held).await? {
        return Ok(pem);
    }
    let ids = [Identifier::Dns(host.to_string())];
    let mut order = acct
        .new_order(&NewOrder { identifiers: &ids })
        .await
        .map_err(|e| format!("new order: {e}"))?;
    // A wildcard can only be validated through DNS.
    let wildcard = host.strip_prefix("*.");
    let want = match (wildcard, cfg.challenge) {
        (Some(_), _) => ChallengeType::Dns01,
        (None, AcmeChallenge::Http01) => ChallengeType::Http01,
        (None, AcmeChallenge::TlsAlpn01) => ChallengeType::TlsAlpn01,
    };
    let authz = order
        .authorizations()
        .await
        .map_err(|e| format!("authorizations: {e}"))?;
    for a in &authz {
        if a.status == AuthorizationStatus::Valid {
            continue;
        }
        let ch = a
            .challenges
            .iter()
            .find(|c| c.r#type == want)
            .ok_or_else(|| format!("the ACME server offers no {:?} challenge", want))?;
        let ka = order.key_authorization(ch);
        let answer = match (wildcard, cfg.challenge) {
            (Some(domain), _) => {
                let value = ka.dns_value();
                state
                    .dns01
                    .write()
                    .entry(domain.to_string())
                    .or_default()
                    .push(value.clone());
                Challenge::Dns01 {
                    domain: domain.to_string(),
                    value,
                }
            }
            (None, AcmeChallenge::Http01) => {
                state
                    .http01
                    .write()
                    .insert(ch.token.clone(), ka.as_str().to_string());
                Challenge::Http01 {
                    token: ch.token.clone(),
                    key_authorization: ka.as_str().to_string(),
                }
            }
            (None, AcmeChallenge::TlsAlpn01) => {
                let mut digest = [0u8; 32];
                let d = ka.digest();
                if d.as_ref().len() != digest.len() {
                    return Err("TLS-ALPN-01 digest is not SHA-256".into());
                }
                digest.copy_from_slice(d.as_ref());
                let c = alpn_cert(host, &digest)?;
                state.alpn01.write().insert(host.to_string(), c);
                Challenge::Alpn01 {
                    host: host.to_string(),
                    digest,
                }
            }
        };
        answers.local.push(answer.clone());
        if let Some(sh) = share {
            // Whichever hub the ACME server reaches answers.
            sh.publish(&answer)
                .await
                .map_err(|e| format!("publishing the challenge in the mesh: {e}"))?;
            answers.published.push(answer);
            tokio::time::sleep(SHARE_SETTLE).await;
            keep_shared(sh, host, &mut held, &answers.published).await?;
        }
        if !state.wants(host) {
            return Err(NOT_WANTED.into());
        }
        order
            .set_challenge_ready(&ch.url)
            .await
            .map_err(|e| format!("challenge ready: {e}"))?;
    }
    let result = async {
        let mut delay = Duration::from_millis(250);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(sh) = share {
                keep_shared(sh, host, &mut held, &answers.published).await?;
            }
            let st = order.refresh().await.map_err(|e| format!("order: {e}"))?;
            match st.status {
                OrderStatus::Ready => break,
                OrderStatus::Invalid => {
                    let detail = order
                        .authorizations()
                        .await
                        .ok()
                        .and_then(|v| {
                            v.into_iter()
                                .flat_map(|a| a.challenges)
                                .find_map(|c| c.error.map(|p| format!("{p}")))
                        })
                        .unwrap_or_default();
                    return Err(format!("validation failed {detail}"));
                }
                OrderStatus::Valid => break,
                _ => {}
            }
            if tokio::time::Instant::now() > deadline {
                return Err("validation timed out".to_string());
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        Ok(())
    }
    .await;
    result?;
    finalizable(order.state().status)?;
    // A name dropped meanwhile gets no certificate (nor a record to resume).
    if !state.wants(host) {
        return Err(NOT_WANTED.into());
    }
    let kp = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let pending = Pending {
        order: order.url().to_string(),
        account: acct.id().to_string(),
        settings: settings_digest(cfg),
        written: unix_secs(),
        key: zeroize::Zeroizing::new(kp.serialize_pem()),
    };
    if let Err(e) = save_pending(cfg, host, &pending) {
        warn!(host = %host, error = %e, "ACME pending order not written: should the wait for its certificate stop, the next try orders again");
    }
    let fetched = fetch(
        state,
        cfg,
        host,
        &mut order,
        &pending.key,
        deadline,
        share,
        &mut held,
        &answers.published,
    )
    .await?;
    match fetched {
        Fetched::Installed(pem) => Ok(pem),
        Fetched::Useless(e) => Err(e),
    }
}

/// What became of an order's certificate ([`fetch`]).
enum Fetched {
    /// Issued, checked and installed.
    Installed(CertPem),
    /// The order gives none this hub can use (the CA refused it, it is
    /// invalid or gone, the certificate does not match the key or the
    /// host): why.
    Useless(String),
}

/// Stops an order at a point the test names, once.
#[cfg(test)]
#[derive(Clone, Copy, PartialEq, Eq)]
enum TestStop {
    BeforeFinalize,
    AfterFinalize,
}

#[cfg(test)]
fn test_stop(state: &AcmeState, at: TestStop) -> Result<(), String> {
    let mut stop = state.test_stop.lock();
    if *stop == Some(at) {
        *stop = None;
        return Err("stopped by the test".into());
    }
    Ok(())
}

/// Finalizes `order` with `key` (PEM) unless it was finalized before, waits
/// for its certificate until `deadline`, then checks and installs it with
/// `key`. The host's [`PENDING_FILE`] goes once the order is done with, an
/// installed certificate or a useless order; an error (the CA did not
/// answer, the certificate is not issued yet) keeps it for the next try.
#[allow(clippy::too_many_arguments)]
async fn fetch(
    state: &AcmeState,
    cfg: &AcmeSettings,
    host: &str,
    order: &mut instant_acme::Order,
    key: &str,
    deadline: tokio::time::Instant,
    share: Option<&dyn AcmeShare>,
    held: &mut Option<i64>,
    published: &[Challenge],
) -> Result<Fetched, String> {
    let useless = |e: String| {
        remove_pending(cfg, host);
        Ok(Fetched::Useless(e))
    };
    if order.state().status == OrderStatus::Ready {
        let csr = csr_for(host, key)?;
        #[cfg(test)]
        test_stop(state, TestStop::BeforeFinalize)?;
        match order.finalize(&csr).await {
            Ok(()) => {}
            Err(e) if order_refused(&e) => return useless(format!("finalize: {e}")),
            Err(e) => return Err(format!("finalize: {e}")),
        }
        #[cfg(test)]
        test_stop(state, TestStop::AfterFinalize)?;
    }
    // A CA slow to issue is waited for until the order's time is up: an
    // order again would count against its duplicate certificate limit.
    let mut delay = None;
    let chain = loop {
        match order.certificate().await {
            Ok(Some(c)) => break c,
            Ok(None) => {
                let d = cert_poll_delay(delay);
                if tokio::time::Instant::now() + d >= deadline {
                    return Err(format!(
                        "the certificate was not issued within {ORDER_TIMEOUT:?} of the order \
                         (the next try fetches it)"
                    ));
                }
                tokio::time::sleep(d).await;
                delay = Some(d);
                if let Some(sh) = share {
                    if let Err(e) = keep_shared(sh, host, held, published).await {
                        warn!(host = %host, error = %e, "ACME order: waiting for the certificate without the mesh lock");
                    }
                }
            }
            Err(e) if order_refused(&e) => return useless(format!("certificate: {e}")),
            Err(e) => return Err(format!("certificate: {e}")),
        }
    };
    let pem = CertPem {
        chain,
        key: key.to_string(),
    };
    if let Err(e) = install(state, cfg, host, &pem) {
        return useless(e);
    }
    remove_pending(cfg, host);
    Ok(Fetched::Installed(pem))
}

/// A certificate request for `host` signed with `key` (PEM), as DER.
fn csr_for(host: &str, key: &str) -> Result<Vec<u8>, String> {
    let kp = rcgen::KeyPair::from_pem(key).map_err(|e| format!("the order's key: {e}"))?;
    let mut params =
        rcgen::CertificateParams::new(vec![host.to_string()]).map_err(|e| e.to_string())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&kp).map_err(|e| e.to_string())?;
    Ok(csr.der().to_vec())
}

/// Whether the CA's answer `e` about an order means it will never give the
/// order's certificate: a problem document but for the CA's own trouble and
/// its rate limits (the order is gone, another account's, invalid, or the
/// request refused), or an order left in a state that has none. Anything
/// else (no answer, a timeout, a server error) may pass: the order is asked
/// about again on the next try.
fn order_refused(e: &instant_acme::Error) -> bool {
    match e {
        instant_acme::Error::Api(p) => {
            let passing = p.status.is_some_and(|s| s == 429 || s >= 500)
                || p.r#type
                    .as_deref()
                    .is_some_and(|t| t.ends_with(":rateLimited") || t.ends_with(":serverInternal"));
            !passing
        }
        // instant-acme's: "invalid order state", "no certificate URL found".
        instant_acme::Error::Str(_) => true,
        _ => false,
    }
}

/// Before a new order: fetches the certificate of the order this hub
/// finalized for `host` and did not see issued (its [`PENDING_FILE`]).
/// `Ok(None)`: there is none, or none this hub can use (a record that does
/// not load, of other settings or another account, expired; an order gone,
/// invalid, or whose certificate does not match the key): the record goes,
/// said why in the log, and a new order follows. An error (the CA did not
/// answer, the certificate is still not issued) keeps the record for the
/// next try, which asks again rather than ordering.
#[allow(clippy::too_many_arguments)]
async fn resume(
    state: &AcmeState,
    cfg: &AcmeSettings,
    host: &str,
    acct: &Account,
    deadline: tokio::time::Instant,
    share: Option<&dyn AcmeShare>,
    held: &mut Option<i64>,
) -> Result<Option<CertPem>, String> {
    let p = match read_pending(cfg, host) {
        None => return Ok(None),
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            warn!(host = %host, error = %e, "ACME pending order record unusable: removed, ordering anew");
            remove_pending(cfg, host);
            return Ok(None);
        }
    };
    if let Some(why) = p.unusable(cfg, acct.id(), unix_secs()) {
        info!(host = %host, order = %p.order, "ACME pending order not resumed ({why}): ordering anew");
        remove_pending(cfg, host);
        return Ok(None);
    }
    info!(host = %host, order = %p.order, "ACME order finalized before: fetching its certificate instead of ordering again");
    let mut order = match acct.order(p.order.clone()).await {
        Ok(o) => o,
        Err(e) if order_refused(&e) => {
            warn!(host = %host, order = %p.order, error = %e, "ACME pending order gone: ordering anew");
            remove_pending(cfg, host);
            return Ok(None);
        }
        Err(e) => return Err(format!("the pending order {}: {e}", p.order)),
    };
    let status = order.state().status;
    if !matches!(
        status,
        OrderStatus::Ready | OrderStatus::Processing | OrderStatus::Valid
    ) {
        warn!(host = %host, order = %p.order, ?status, "ACME pending order gives no certificate: ordering anew");
        remove_pending(cfg, host);
        return Ok(None);
    }
    match fetch(
        state,
        cfg,
        host,
        &mut order,
        &p.key,
        deadline,
        share,
        held,
        &[],
    )
    .await?
    {
        Fetched::Installed(pem) => {
            info!(host = %host, order = %p.order, "ACME certificate of the pending order installed");
            Ok(Some(pem))
        }
        Fetched::Useless(e) => {
            warn!(host = %host, order = %p.order, error = %e, "ACME pending order gives no usable certificate: ordering anew");
            Ok(None)
        }
    }
}

/// An order's error when its host was dropped from the config meanwhile.
const NOT_WANTED: &str = "the host is no longer wanted";

/// The longest wait between two requests for an issued certificate.
const CERT_POLL_MAX: Duration = Duration::from_secs(10);

/// The wait before asking for the certificate again after waiting `last`
/// (none: the first time): 250 ms, doubling up to [`CERT_POLL_MAX`].
fn cert_poll_delay(last: Option<Duration>) -> Duration {
    last.map_or(Duration::from_millis(250), |d| (d * 2).min(CERT_POLL_MAX))
}

/// Whether an order whose validation ended in `status` can be finalized
/// with a key made now. One already valid was finalized before (the CA
/// handed back an earlier order): its certificate is for a key this hub
/// does not hold.
fn finalizable(status: OrderStatus) -> Result<(), String> {
    match status {
        OrderStatus::Ready => Ok(()),
        s => Err(format!(
            "the ACME server's order is {s:?}, finalized with a key this hub does not hold; not used"
        )),
    }
}

/// Checks an issued certificate with its key (they load, match, and the
/// leaf is valid for `host`), then serves and stores it; nothing changes on
/// disk or in memory when it does not check. It is served first: one the CA
/// issued is never dropped because `state_dir` could not be written (an
/// order again would count against the CA's duplicate certificate limit);
/// such a write is tried again each round ([`save_unsaved`]).
fn install(state: &AcmeState, cfg: &AcmeSettings, host: &str, pem: &CertPem) -> Result<(), String> {
    let (k, na) = load_pair(pem)
        .and_then(|(k, na)| {
            if covers(&k, host) {
                Ok((k, na))
            } else {
                Err(format!("not valid for {host}"))
            }
        })
        .map_err(|e| format!("the issued certificate: {e}"))?;
    state
        .certs
        .write()
        .insert(host.to_string(), (Arc::new(k), na));
    info!(host, not_after = na, "ACME certificate issued");
    match save_issued(cfg, host, pem) {
        Ok(()) => {
            state.unsaved.write().remove(host);
        }
        Err(e) => {
            warn!(host, error = %e, "ACME certificate not written to state_dir; served, and written again on the next round");
            state
                .unsaved
                .write()
                .insert(host.to_string(), (pem.clone(), na));
        }
    }
    Ok(())
}

/// Writes a certificate issued by the configured CA to the directory of
/// `host`, with the note of that CA.
fn save_issued(cfg: &AcmeSettings, host: &str, pem: &CertPem) -> Result<(), String> {
    let dir = host_dir(cfg, host);
    store_pair(&dir, pem)?;
    write_private(&dir.join(DIRECTORY_FILE), cfg.directory.as_bytes())
        .map_err(|e| format!("{}: {e}", dir.join(DIRECTORY_FILE).display()))
}

/// Writes again the issued certificate of `host` that is served but could
/// not be written to `state_dir`, if there is one.
fn save_unsaved(state: &AcmeState, cfg: &AcmeSettings, host: &str) {
    let Some((pem, _)) = state.unsaved.read().get(host).cloned() else {
        return;
    };
    match save_issued(cfg, host, &pem) {
        Ok(()) => {
            state.unsaved.write().remove(host);
            info!(host, "ACME certificate written to state_dir");
        }
        Err(e) => debug!(host, error = %e, "ACME certificate still not written to state_dir"),
    }
}

/// The certificate of `host` this hub serves, as PEM: one not written to
/// `state_dir` yet, or the stored one.
fn own_pem(state: &AcmeState, cfg: &AcmeSettings, host: &str) -> Option<CertPem> {
    let unsaved = state.unsaved.read().get(host).map(|(pem, _)| pem.clone());
    unsaved.or_else(|| stored_pem(cfg, host))
}

/// The stored certificate of `host` as PEM, if one loads.
fn stored_pem(cfg: &AcmeSettings, host: &str) -> Option<CertPem> {
    read_stored(cfg, host).map(|(pem, _, _)| pem)
}

/// Whether the leaf certificate of `key` is valid for the name `host` (for
/// `*.<domain>`: for a name under `<domain>` no certificate names but a
/// wildcard one).
fn covers(key: &CertifiedKey, host: &str) -> bool {
    let Some(leaf) = key.cert.first() else {
        return false;
    };
    let probe;
    let host = match host.strip_prefix("*.") {
        Some(d) => {
            probe = format!("gatewire-wildcard-probe.{d}");
            probe.as_str()
        }
        None => host,
    };
    let (Ok(parsed), Ok(name)) = (
        rustls::server::ParsedCertificate::try_from(leaf),
        ServerName::try_from(host.to_string()),
    ) else {
        return false;
    };
    rustls::client::verify_server_name(&parsed, &name).is_ok()
}

/// Takes a certificate from the mesh for `host` when it is newer than this
/// hub's (in memory and on disk, so a restart without etcd keeps it). True
/// when it did.
fn adopt(state: &AcmeState, cfg: &AcmeSettings, host: &str, pem: &CertPem) -> bool {
    let (key, na) = match load_pair(pem) {
        Ok(x) => x,
        Err(e) => {
            warn!(host, error = %e, "mesh: shared ACME certificate unusable; ignored");
            return false;
        }
    };
    if state.not_after(host).is_some_and(|cur| cur >= na) {
        return false;
    }
    if !covers(&key, host) {
        warn!(
            host,
            "mesh: shared ACME certificate is not for this host; ignored"
        );
        return false;
    }
    let dir = host_dir(cfg, host);
    let written = store_pair(&dir, pem);
    // Which CA issued it is the other hub's business.
    let _ = std::fs::remove_file(dir.join(DIRECTORY_FILE));
    if let Err(e) = written {
        warn!(host, error = %e, dir = %dir.display(), "shared ACME certificate not written to disk");
    }
    state
        .certs
        .write()
        .insert(host.to_string(), (Arc::new(key), na));
    // (One of this hub's not written yet is older: not written any more.)
    state.unsaved.write().remove(host);
    info!(host, not_after = na, "ACME certificate taken from the mesh");
    true
}

/// With shared certificates: takes the mesh's certificate for `host` when it
/// is newer than this hub's, or offers this hub's when it is the newer one.
async fn sync_shared(state: &AcmeState, cfg: &AcmeSettings, sh: &dyn AcmeShare, host: &str) {
    let theirs = sh.cert_not_after(host);
    let mine = state.not_after(host);
    match (theirs, mine) {
        (Some(t), m) if m.is_none_or(|m| t > m) => {
            if let Some(pem) = sh.cert(host) {
                adopt(state, cfg, host, &pem);
            }
        }
        // Ours is newer, or the same one stored in clear that this hub
        // would seal.
        (t, Some(m))
            if (t.is_none_or(|t| t < m) || (t == Some(m) && sh.wants_sealing(host)))
                && sh.ready() =>
        {
            if let Some(pem) = own_pem(state, cfg, host) {
                match sh.store_cert(host, &pem).await {
                    Ok(()) => info!(host, not_after = m, "ACME certificate offered to the mesh"),
                    Err(e) => warn!(host, error = %e, "mesh: ACME certificate not stored"),
                }
            }
        }
        _ => {}
    }
}

/// Stores the certificate this hub just ordered in the mesh, before its
/// lock goes: tried [`STORE_TRIES`] times, as the hub that takes the lock
/// next would find only the old certificate and order again (the CA counts
/// duplicate certificates).
async fn store_issued(sh: &dyn AcmeShare, host: &str, pem: &CertPem) -> bool {
    let mut wait = STORE_RETRY;
    for attempt in 1..=STORE_TRIES {
        match sh.store_cert(host, pem).await {
            Ok(()) => {
                info!(host = %host, "ACME certificate stored in the mesh");
                return true;
            }
            Err(e) if attempt == STORE_TRIES => {
                warn!(host = %host, error = %e, "mesh: ACME certificate not stored");
            }
            Err(e) => {
                debug!(host = %host, error = %e, attempt, "mesh: ACME certificate not stored; trying again");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
    }
    false
}

/// How long a hub waits before looking again when another hub orders a
/// certificate it also wants (a lock that goes wakes it sooner).
pub const LOCKED_RETRY: Duration = Duration::from_secs(10);
/// How long a hub in a mesh waits for etcd before it looks again.
pub const MESH_WAIT: Duration = Duration::from_secs(2);
/// An order waiting this long for etcd is logged.
pub const MESH_WAIT_LOGGED: Duration = Duration::from_secs(30);
/// A hub in a mesh that cannot reach etcd renews alone a certificate that
/// expires within this long.
pub const ALONE_BEFORE: Duration = Duration::from_secs(7 * 86_400);
/// A hub whose mesh lock a reachable etcd refused this many times in a row
/// (its quota full, a user without write permission) renews alone too.
pub const ALONE_AFTER_REFUSED: u32 = 5;
/// The longest wait between tries of a lock that etcd keeps refusing.
pub const REFUSED_WAIT_MAX: Duration = Duration::from_secs(300);
/// A lock that etcd keeps refusing is logged at warn level at most this often.
pub const REFUSED_LOGGED: Duration = Duration::from_secs(600);

/// How an order that is due goes in a mesh.
#[derive(Debug, PartialEq, Eq)]
enum MeshOrder {
    /// Through the mesh: the lock first.
    Coordinated,
    /// Without the mesh: better a second order in the mesh than an
    /// expired certificate.
    Alone,
    /// Not yet: etcd is out of reach.
    Wait,
}

/// How a due order goes: `ready`, etcd is reachable; `expiring`, the
/// certificate expires within [`ALONE_BEFORE`]; `refused`, the lock
/// attempts etcd refused in a row. A first certificate waits for the mesh.
fn mesh_order(ready: bool, expiring: bool, refused: u32) -> MeshOrder {
    match (ready, expiring) {
        (false, true) => MeshOrder::Alone,
        (false, false) => MeshOrder::Wait,
        (true, true) if refused >= ALONE_AFTER_REFUSED => MeshOrder::Alone,
        (true, _) => MeshOrder::Coordinated,
    }
}

/// The wait after the `refused`-th lock attempt in a row that etcd refused:
/// [`MESH_WAIT`] (a blip passes quickly), doubling up to
/// [`REFUSED_WAIT_MAX`].
fn refused_wait(refused: u32) -> Duration {
    let doublings = refused.saturating_sub(1).min(16);
    (MESH_WAIT * (1 << doublings)).min(REFUSED_WAIT_MAX)
}

/// How many times an issued certificate is offered to the mesh before its
/// lock goes (the first retry after [`STORE_RETRY`], then twice as long).
const STORE_TRIES: u32 = 3;
/// The wait before the second try to store an issued certificate.
const STORE_RETRY: Duration = Duration::from_millis(500);

/// The wait after a host's first failed order.
pub const RETRY_FIRST: Duration = Duration::from_secs(120);
/// The longest wait between failed orders.
pub const RETRY_MAX: Duration = Duration::from_secs(6 * 3600);

/// The wait after a failed order, given the one before it: 2 min, doubling
/// up to 6 h. Orders run 2, 6, 14 and 30 min after the first failure (with
/// it, 5 in its hour, as many as Let's Encrypt allows failed validations of
/// a name per hour), then at 1 h 2 min, 2 h 6 min, 4 h 14 min, 8 h 30 min,
/// and every 6 h after.
fn retry_wait(last: Option<Duration>) -> Duration {
    last.map_or(RETRY_FIRST, |b| (b * 2).clamp(RETRY_FIRST, RETRY_MAX))
}

/// How much later than [`retry_wait`] says a failed order may run: hosts
/// that failed together (a DNS outage) are not all ordered again at once.
const RETRY_JITTER: f64 = 0.3;

/// The wait after a failed order: `wait` ([`retry_wait`]) made up to
/// [`RETRY_JITTER`] longer by `draw` (uniform over `u32`), that is 1.15
/// times `wait`, give or take 15%. Never shorter than `wait`: the orders
/// of the first hour stay five at most.
fn jittered(wait: Duration, draw: u32) -> Duration {
    wait + wait.mul_f64(RETRY_JITTER * f64::from(draw) / f64::from(u32::MAX))
}

/// When a failed host is tried again.
struct Retry {
    at: tokio::time::Instant,
    /// The last wait, as [`retry_wait`] gave it (without its jitter).
    wait: Duration,
    /// Written to the host's [`RETRY_FILE`] (deleting it lets the next order
    /// run at once).
    stored: bool,
}

type Retries = HashMap<String, Retry>;

/// What the manager remembers between rounds.
#[derive(Default)]
struct Rounds {
    /// When each failed host is tried again.
    retry_at: Retries,
    /// Hosts whose order waits for the mesh's etcd: since when, and whether
    /// that was logged (once it lasts [`MESH_WAIT_LOGGED`]).
    waiting: HashMap<String, (tokio::time::Instant, bool)>,
    /// Hosts whose mesh lock this hub could not let go of: each round tries
    /// again, before any order (the lock would hold the other hubs back
    /// until this hub's etcd session ends).
    unlocks: std::collections::HashSet<String>,
    /// Hosts whose mesh lock a reachable etcd refused, since the last lock
    /// it took.
    refused: HashMap<String, Refused>,
}

/// The lock attempts on one host that a reachable etcd refused in a row.
struct Refused {
    count: u32,
    /// When the lock is tried again ([`refused_wait`]).
    at: tokio::time::Instant,
    /// When a refusal was last logged at warn level ([`REFUSED_LOGGED`]).
    warned: Option<tokio::time::Instant>,
}

/// Notes that etcd refused the mesh lock on `host`; the wait before it is
/// tried again. The first refusal is logged at warn level, and then one
/// each [`REFUSED_LOGGED`] (a full etcd would log every host every 2 s).
fn note_refused(refused: &mut HashMap<String, Refused>, host: &str, e: &str) -> Duration {
    let now = tokio::time::Instant::now();
    let r = refused.entry(host.to_string()).or_insert(Refused {
        count: 0,
        at: now,
        warned: None,
    });
    r.count = r.count.saturating_add(1);
    let wait = refused_wait(r.count);
    r.at = now + wait;
    if r.warned
        .is_none_or(|t| now.duration_since(t) >= REFUSED_LOGGED)
    {
        r.warned = Some(now);
        warn!(host = %host, error = %e, refused = r.count, retry_in = ?wait, "ACME order: the mesh lock could not be taken");
    } else {
        debug!(host = %host, error = %e, refused = r.count, retry_in = ?wait, "ACME order: the mesh lock could not be taken");
    }
    wait
}

/// Lets go of this hub's mesh lock on `host`; one that stays is tried again
/// on the next rounds.
async fn unlock(sh: &dyn AcmeShare, host: &str, unlocks: &mut std::collections::HashSet<String>) {
    if sh.unlock(host).await {
        unlocks.remove(host);
    } else {
        unlocks.insert(host.to_string());
    }
}

/// Notes a failure for `host`, in memory and in its [`RETRY_FILE`] (a
/// restart waits too): the next try waits as [`retry_wait`] says, with
/// [`jittered`]'s spread. The wait.
fn failed(
    state: &AcmeState,
    cfg: &AcmeSettings,
    retry_at: &mut Retries,
    host: &str,
    e: &str,
) -> Duration {
    let wait = retry_wait(retry_at.get(host).map(|r| r.wait));
    let back = jittered(wait, rand_core::RngCore::next_u32(&mut rand_core::OsRng));
    // Whole seconds, as the file keeps it.
    let back = Duration::from_secs(back.as_secs());
    warn!(host = %host, error = %e, retry_in = ?back, "ACME order failed");
    let at = unix_secs().saturating_add(back.as_secs());
    let dir = host_dir(cfg, host);
    let stored = std::fs::create_dir_all(&dir)
        .and_then(|()| {
            // The directory and the other settings too: another directory
            // (staging to production), another challenge and so on are not
            // held back by these failures after a restart.
            let text = format!(
                "{at} {} {} {}\n{e}\n",
                wait.as_secs(),
                cfg.directory,
                settings_digest(cfg)
            );
            write_private(&dir.join(RETRY_FILE), text.as_bytes())
        })
        .inspect_err(|err| {
            warn!(host = %host, error = %err, dir = %dir.display(), "ACME retry time not written; a restart orders at once");
        })
        .is_ok();
    retry_at.insert(
        host.to_string(),
        Retry {
            at: tokio::time::Instant::now() + back,
            wait,
            stored,
        },
    );
    state
        .failures
        .write()
        .insert(host.to_string(), (e.to_string(), at));
    back
}

/// Reads the [`RETRY_FILE`] of `host`: when the next order may run (Unix
/// seconds), the last wait and the last error. A file written for another
/// directory, or with other settings (any [`orders_differ`] compares), is
/// removed and read as none, as a reload with the same change would have
/// it. (Files of older versions name no settings, or no directory either:
/// those they do not name are taken as the same.)
fn read_retry(cfg: &AcmeSettings, host: &str) -> Option<(u64, Duration, String)> {
    let file = host_dir(cfg, host).join(RETRY_FILE);
    let text = std::fs::read_to_string(&file).ok()?;
    let (head, error) = text.split_once('\n').unwrap_or((text.as_str(), ""));
    let mut fields = head.split_whitespace();
    let at = fields.next()?.parse().ok()?;
    let wait = Duration::from_secs(fields.next()?.parse().ok()?).clamp(RETRY_FIRST, RETRY_MAX);
    if let Some(dir) = fields.next().filter(|d| *d != cfg.directory) {
        info!(host = %host, failed_with = %dir, directory = %cfg.directory, "ACME directory changed since the failed orders: ordering now");
        let _ = std::fs::remove_file(&file);
        return None;
    }
    if fields.next().is_some_and(|d| d != settings_digest(cfg)) {
        info!(host = %host, "ACME settings changed since the failed orders: ordering now");
        let _ = std::fs::remove_file(&file);
        return None;
    }
    Some((at, wait, error.trim_end().to_string()))
}

/// Forgets the failures of `host`: in memory and its [`RETRY_FILE`].
fn clear_retry(cfg: &AcmeSettings, retry_at: &mut Retries, host: &str) {
    retry_at.remove(host);
    let _ = std::fs::remove_file(host_dir(cfg, host).join(RETRY_FILE));
}

/// How long `host` still waits after failed orders, if it does: as noted
/// in memory, or after a restart in its [`RETRY_FILE`]. A file the operator
/// deleted ends the wait.
fn retry_left(
    state: &AcmeState,
    cfg: &AcmeSettings,
    retry_at: &mut Retries,
    host: &str,
) -> Option<Duration> {
    if !retry_at.contains_key(host) {
        let (at, wait, e) = read_retry(cfg, host)?;
        // No longer than the longest wait, whatever the clock did.
        let longest = jittered(RETRY_MAX, u32::MAX);
        let left = Duration::from_secs(at.saturating_sub(unix_secs())).min(longest);
        if !left.is_zero() {
            info!(host = %host, retry_in = ?left, "ACME order waits after failed orders before the restart");
        }
        retry_at.insert(
            host.to_string(),
            Retry {
                at: tokio::time::Instant::now() + left,
                wait,
                stored: true,
            },
        );
        state.failures.write().insert(
            host.to_string(),
            (e, unix_secs().saturating_add(left.as_secs())),
        );
    }
    let r = retry_at.get(host)?;
    let now = tokio::time::Instant::now();
    if r.at <= now {
        return None;
    }
    if r.stored && !host_dir(cfg, host).join(RETRY_FILE).exists() {
        info!(host = %host, "ACME retry file removed: ordering now");
        retry_at.remove(host);
        return None;
    }
    Some(r.at - now)
}

/// After [`AcmeState::set_wanted`] changed the ACME settings: the failed
/// orders of `hosts` run again at once (their waits go, in memory and in
/// their [`RETRY_FILE`]s).
fn reset_retries(cfg: &AcmeSettings, hosts: &[String], retry_at: &mut Retries) {
    for h in hosts {
        if retry_at.contains_key(h) || host_dir(cfg, h).join(RETRY_FILE).exists() {
            info!(host = %h, "ACME settings changed: a failed order runs again now");
        }
        clear_retry(cfg, retry_at, h);
    }
}

/// What a round does before any order, for a host it keeps: serves its
/// stored certificate (from `state_dir`, or with shared certificates the
/// mesh's as last seen, when newer), and writes again one issued but not
/// written. Nothing here waits on the network, so an order that blocks
/// (validation, a slow CA) does not keep the other hosts' certificates
/// from being served after a restart.
fn load_local(state: &AcmeState, cfg: &AcmeSettings, share: Option<&dyn AcmeShare>, host: &str) {
    if !state.wants(host) {
        return;
    }
    save_unsaved(state, cfg, host);
    if !state.has_own(host) {
        // Still not written (kept while a reload dropped the host): newer
        // than any on disk.
        let unsaved = state.unsaved.read().get(host).cloned();
        if let Some((k, na)) = unsaved.and_then(|(pem, _)| load_pair(&pem).ok()) {
            debug!(host = %host, not_after = na, "ACME certificate not written to state_dir served again");
            state
                .certs
                .write()
                .insert(host.to_string(), (Arc::new(k), na));
        } else if let Some((k, na)) = load_stored(cfg, host) {
            debug!(host = %host, not_after = na, "ACME certificate loaded from disk");
            state.certs.write().insert(host.to_string(), (k, na));
        }
    }
    if let Some(sh) = share.filter(|s| s.shares_certificates()) {
        let mine = state.not_after(host);
        if sh
            .cert_not_after(host)
            .is_some_and(|t| mine.is_none_or(|m| t > m))
        {
            if let Some(pem) = sh.cert(host) {
                adopt(state, cfg, host, &pem);
            }
        }
    }
}

/// Keeps the certificate of one host: loads it from disk or from the mesh,
/// orders it when missing or due. `Some(wait)`: look again within `wait`.
async fn keep(
    state: &AcmeState,
    cfg: &AcmeSettings,
    share: Option<&dyn AcmeShare>,
    host: &str,
    rounds: &mut Rounds,
) -> Option<Duration> {
    if !state.wants(host) {
        return None;
    }
    let Rounds {
        retry_at,
        waiting,
        unlocks,
        refused,
    } = rounds;
    let due = |state: &AcmeState| {
        state
            .renew_time(host, cfg.renew_before.as_secs())
            .is_none_or(|at| unix_secs() >= at)
            // (One not written yet is this CA's, whatever the old note says.)
            || (from_another_directory(cfg, host) && !state.unsaved.read().contains_key(host))
    };
    load_local(state, cfg, None, host);
    let sharing = share.filter(|s| s.shares_certificates());
    if let Some(sh) = sharing {
        sync_shared(state, cfg, sh, host).await;
    }
    if !due(state) {
        // (A certificate loaded or taken from the mesh ends a failure too,
        // and makes an order waiting for its certificate useless.)
        state.failures.write().remove(host);
        clear_retry(cfg, retry_at, host);
        remove_pending(cfg, host);
        refused.remove(host);
        // Due before the next round: the manager looks again then (a
        // certificate due a second after it was loaded waited a whole round).
        return state
            .renew_time(host, cfg.renew_before.as_secs())
            .map(|at| Duration::from_secs(at.saturating_sub(unix_secs()).max(1)));
    }
    if let Some(left) = retry_left(state, cfg, retry_at, host) {
        return Some(left);
    }
    // Without a mesh: alone.
    let mut how = MeshOrder::Alone;
    if let Some(sh) = share {
        let expiring = state
            .not_after(host)
            .is_some_and(|na| na <= unix_secs().saturating_add(ALONE_BEFORE.as_secs()));
        let ready = sh.ready();
        let refusals = refused.get(host).map_or(0, |r| r.count);
        how = mesh_order(ready, expiring, refusals);
        match how {
            MeshOrder::Alone if ready => {
                warn!(host = %host, refused = refusals, "etcd refuses the mesh lock and the certificate expires soon: ordering without the mesh");
                // This once: should the order fail, the next try takes the
                // lock first (etcd may take writes again by then, and an
                // order alone cannot publish its challenge answers to the
                // other hubs), and goes alone again only if it is refused.
                if let Some(r) = refused.get_mut(host) {
                    r.count = ALONE_AFTER_REFUSED - 1;
                }
            }
            MeshOrder::Alone => {
                warn!(host = %host, "etcd unreachable and the certificate expires soon: ordering without the mesh");
            }
            MeshOrder::Wait => {
                let (since, logged) = waiting
                    .entry(host.to_string())
                    .or_insert((tokio::time::Instant::now(), false));
                if !*logged && since.elapsed() >= MESH_WAIT_LOGGED {
                    *logged = true;
                    warn!(host = %host, "ACME order waits until the mesh's etcd is reachable (orders are coordinated there)");
                }
                return Some(MESH_WAIT);
            }
            MeshOrder::Coordinated => {
                // After refusals, the next try waits its turn (a kick or
                // another host's wait may run this round sooner).
                let now = tokio::time::Instant::now();
                if let Some(r) = refused.get(host).filter(|r| r.at > now) {
                    return Some(r.at - now);
                }
            }
        }
        waiting.remove(host);
    }
    // Coordinated through the mesh, unless renewing alone (etcd away, or
    // refusing the lock).
    let coord = share.filter(|_| how == MeshOrder::Coordinated);
    // The session the lock is taken in (read first: a change in between
    // only makes the order take it once more).
    let session = coord.and_then(|s| s.session());
    if let Some(sh) = coord {
        match sh.lock(host).await {
            Ok(true) => {
                refused.remove(host);
            }
            Ok(false) => {
                refused.remove(host);
                debug!(host = %host, "another hub orders this certificate; waiting");
                return Some(LOCKED_RETRY);
            }
            Err(e) => {
                // etcd is there but the lock failed: a blip, looked at again
                // soon; or etcd refuses writes, looked at less and less often
                // (no order backoff that would grow to hours), and ordered
                // alone before the certificate expires (`mesh_order`).
                return Some(note_refused(refused, host, &e));
            }
        }
        // Another hub may have finished just before this one took the lock.
        if let Some(sh) = sharing.filter(|_| coord.is_some()) {
            match sh.fetch_cert(host).await {
                Ok(Some(pem)) => {
                    adopt(state, cfg, host, &pem);
                }
                Ok(None) => {}
                Err(e) => warn!(host = %host, error = %e, "mesh: shared certificate not read"),
            }
            if !due(state) {
                unlock(sh, host, unlocks).await;
                clear_retry(cfg, retry_at, host);
                remove_pending(cfg, host);
                state.failures.write().remove(host);
                return None;
            }
        }
    }
    // The proxy may have stopped, or a reload dropped the host, meanwhile.
    if !state.wants(host) {
        if let Some(sh) = coord {
            unlock(sh, host, unlocks).await;
        }
        return None;
    }
    let renewing = state.has_own(host);
    info!(host = %host, renewing, "ordering an ACME certificate");
    let r = issue(state, cfg, host, coord.map(|sh| (sh, session))).await;
    if let (Ok(pem), Some(sh)) = (&r, sharing.filter(|_| coord.is_some())) {
        store_issued(sh, host, pem).await;
    }
    if let Some(sh) = coord {
        unlock(sh, host, unlocks).await;
    }
    match r {
        Ok(_) if due(state) => {
            // Only a clock far ahead of the CA's makes a new certificate due:
            // ordering again would get the same, as often as it is asked.
            let e = "the new certificate is already due for renewal: is this hub's clock right?";
            warn!(host = %host, "{e}");
            Some(failed(state, cfg, retry_at, host, e))
        }
        Ok(_) => {
            clear_retry(cfg, retry_at, host);
            state.failures.write().remove(host);
            None
        }
        // Given up for it alone: any other error (the CA's) is noted, so
        // that the host wanted again, or a restart, waits as well.
        Err(e) if e == NOT_WANTED && state.is_stopped() => {
            info!(host = %host, "ACME order given up: the proxy stopped");
            None
        }
        Err(e) if e == NOT_WANTED => {
            info!(host = %host, "ACME order given up: the host is no longer wanted");
            remove_pending(cfg, host);
            None
        }
        Err(e) => {
            // Dropped by a reload while the certificate was waited for (a
            // stopped proxy keeps it: a restart fetches it).
            if !state.wants(host) && !state.is_stopped() {
                remove_pending(cfg, host);
            }
            Some(failed(state, cfg, retry_at, host, &e))
        }
    }
}

/// One round of the manager: loads what is stored for every wanted host
/// first, then keeps each one's certificate (ordering it when missing or
/// due). How long until the next round at the latest.
async fn round(state: &AcmeState, rounds: &mut Rounds) -> Duration {
    let (cfg, hosts, changed) = {
        let wanted = state.wanted.read();
        let changed = state.settings_changed.swap(false, Ordering::Relaxed);
        (wanted.0.clone(), wanted.1.clone(), changed)
    };
    let share = state.share();
    let mut next = Duration::from_secs(60);
    // No order of this hub runs now: a lock it still holds is a stale one.
    match share.as_deref() {
        Some(sh) => {
            for h in std::mem::take(&mut rounds.unlocks) {
                unlock(sh, &h, &mut rounds.unlocks).await;
            }
            if !rounds.unlocks.is_empty() {
                next = next.min(MESH_WAIT * 5);
            }
        }
        // Without a mesh, no lock is there to let go of.
        None => rounds.unlocks.clear(),
    }
    if let Some(cfg) = cfg {
        if changed {
            reset_retries(&cfg, &hosts, &mut rounds.retry_at);
        }
        for host in &hosts {
            load_local(state, &cfg, share.as_deref(), host);
        }
        for host in &hosts {
            if state.is_stopped() {
                break;
            }
            if let Some(wait) = keep(state, &cfg, share.as_deref(), host, rounds).await {
                next = next.min(wait);
            }
        }
    }
    // A reload during the round may have dropped a host it kept, and
    // a wildcard it obtained replaces the names it covers.
    state.prune();
    {
        let wanted = state.wanted.read();
        let wanted: std::collections::HashSet<&String> = wanted.1.iter().collect();
        rounds.retry_at.retain(|h, _| wanted.contains(h));
        rounds.waiting.retain(|h, _| wanted.contains(h));
        rounds.refused.retain(|h, _| wanted.contains(h));
    }
    next
}

/// Keeps certificates for the wanted hosts: loads stored ones, orders missing
/// or expiring ones, retries failures with backoff. Ends with the state, or
/// once it is stopped ([`AcmeState::stop`]).
pub fn spawn_manager(state: &Arc<AcmeState>) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(state);
    tokio::spawn(async move {
        let mut rounds = Rounds::default();
        loop {
            let Some(state) = weak.upgrade() else { return };
            if state.is_stopped() {
                debug!("ACME manager stopped");
                return;
            }
            let next = round(&state, &mut rounds).await;
            let kick = state.kick.clone();
            drop(state);
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = kick.notified() => {}
            }
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A store whose session, lock holder and published keys the test sets
    /// and reads.
    #[derive(Default)]
    struct FakeShare {
        session: parking_lot::Mutex<Option<i64>>,
        /// The lock's holder: `true` this hub, `false` another.
        ours: parking_lot::Mutex<bool>,
        locks: std::sync::atomic::AtomicUsize,
        published: parking_lot::Mutex<Vec<(i64, String)>>,
        /// Unlock calls, and whether they fail.
        unlocks: std::sync::atomic::AtomicUsize,
        unlock_fails: parking_lot::Mutex<bool>,
        /// etcd refuses the lock (reachable, but refusing writes).
        lock_refused: parking_lot::Mutex<bool>,
        /// Store calls, and how many of the next ones fail.
        stores: std::sync::atomic::AtomicUsize,
        store_fails: std::sync::atomic::AtomicUsize,
    }

    impl AcmeShare for FakeShare {
        fn ready(&self) -> bool {
            true
        }
        fn shares_certificates(&self) -> bool {
            false
        }
        fn http01(&self, _: &str) -> Option<String> {
            None
        }
        fn alpn01(&self, _: &str) -> Option<[u8; 32]> {
            None
        }
        fn dns01(&self, _: &str) -> Vec<String> {
            Vec::new()
        }
        fn cert(&self, _: &str) -> Option<CertPem> {
            None
        }
        fn cert_not_after(&self, _: &str) -> Option<u64> {
            None
        }
        fn wants_sealing(&self, _: &str) -> bool {
            false
        }
        fn on_change(&self, _: Arc<Notify>) {}
        fn session(&self) -> Option<i64> {
            *self.session.lock()
        }
        fn lock<'a>(&'a self, _: &'a str) -> ShareFuture<'a, Result<bool, String>> {
            self.locks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let ours = *self.ours.lock();
            let refused = *self.lock_refused.lock();
            Box::pin(async move {
                if refused {
                    return Err("etcdserver: mvcc: database space exceeded".into());
                }
                Ok(ours)
            })
        }
        fn unlock<'a>(&'a self, _: &'a str) -> ShareFuture<'a, bool> {
            self.unlocks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let released = !*self.unlock_fails.lock();
            Box::pin(async move { released })
        }
        fn publish<'a>(&'a self, c: &'a Challenge) -> ShareFuture<'a, Result<(), String>> {
            Box::pin(async move {
                let lease = self.session().ok_or("not connected")?;
                let Challenge::Http01 { token, .. } = c else {
                    return Err("unexpected".into());
                };
                self.published.lock().push((lease, token.clone()));
                Ok(())
            })
        }
        fn withdraw<'a>(&'a self, _: &'a Challenge) -> ShareFuture<'a, ()> {
            Box::pin(async {})
        }
        fn fetch_cert<'a>(
            &'a self,
            _: &'a str,
        ) -> ShareFuture<'a, Result<Option<CertPem>, String>> {
            Box::pin(async { Ok(None) })
        }
        fn store_cert<'a>(
            &'a self,
            _: &'a str,
            _: &'a CertPem,
        ) -> ShareFuture<'a, Result<(), String>> {
            use std::sync::atomic::Ordering::Relaxed;
            self.stores.fetch_add(1, Relaxed);
            let failed = self
                .store_fails
                .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
                .is_ok();
            Box::pin(async move {
                if failed {
                    return Err("etcdserver: request timed out".into());
                }
                Ok(())
            })
        }
    }

    #[test]
    fn a_due_order_goes_alone_when_etcd_is_away_or_refuses_the_lock() {
        use MeshOrder::*;
        // etcd out of reach: alone only when the certificate expires soon.
        assert_eq!(mesh_order(false, true, 0), Alone);
        assert_eq!(mesh_order(false, false, 0), Wait);
        assert_eq!(mesh_order(false, false, 99), Wait);
        // Reachable: through the mesh, until it refused the lock enough
        // times in a row and the certificate expires soon.
        assert_eq!(mesh_order(true, false, 0), Coordinated);
        assert_eq!(mesh_order(true, true, ALONE_AFTER_REFUSED - 1), Coordinated);
        assert_eq!(mesh_order(true, true, ALONE_AFTER_REFUSED), Alone);
        assert_eq!(mesh_order(true, false, u32::MAX), Coordinated);
        // The wait between refused locks: 2 s doubling, up to 5 min.
        assert_eq!(refused_wait(1), MESH_WAIT);
        assert_eq!(refused_wait(2), MESH_WAIT * 2);
        assert_eq!(refused_wait(4), MESH_WAIT * 8);
        assert_eq!(refused_wait(9), REFUSED_WAIT_MAX);
        assert_eq!(refused_wait(u32::MAX), REFUSED_WAIT_MAX);
        assert!((1..40).all(|n| refused_wait(n) <= refused_wait(n + 1)));
    }

    #[tokio::test]
    async fn a_lock_etcd_refuses_backs_off_then_the_order_goes_alone() {
        use std::sync::atomic::Ordering::Relaxed;
        let dir = tmpdir("refused");
        let cfg = cfg_in(&dir);
        let sh = FakeShare::default();
        *sh.lock_refused.lock() = true;
        let host = "blog.gw.test";
        let st = AcmeState::default();
        st.set_wanted(Some(cfg.clone()), vec![host.into()], Vec::new());
        let key = key_for(&[host]);
        let mut rounds = Rounds::default();
        // Due, but 20 days left: through the mesh, however often refused.
        let na = unix_secs() + 20 * 86_400;
        st.certs.write().insert(host.into(), (key.clone(), na));
        let mut waits = Vec::new();
        for n in 1..=ALONE_AFTER_REFUSED + 1 {
            waits.push(keep(&st, &cfg, Some(&sh), host, &mut rounds).await.unwrap());
            assert_eq!(sh.locks.load(Relaxed), n as usize);
            // Looked at again before its wait is over: no lock is tried.
            let early = keep(&st, &cfg, Some(&sh), host, &mut rounds).await.unwrap();
            assert!(early <= waits[waits.len() - 1], "{early:?}");
            assert_eq!(sh.locks.load(Relaxed), n as usize);
            rounds.refused.get_mut(host).unwrap().at = tokio::time::Instant::now();
        }
        assert_eq!(waits[0], MESH_WAIT);
        assert!(waits.windows(2).all(|w| w[1] == w[0] * 2), "{waits:?}");
        assert!(st.failures.read().is_empty());
        // 6 days left: the order runs without the lock (its CA is not
        // reached here: a failed order, with the usual wait).
        let na = unix_secs() + 6 * 86_400;
        st.certs.write().insert(host.into(), (key.clone(), na));
        let wait = keep(&st, &cfg, Some(&sh), host, &mut rounds).await;
        assert_jittered(wait.unwrap(), RETRY_FIRST);
        assert_eq!(sh.locks.load(Relaxed), ALONE_AFTER_REFUSED as usize + 1);
        assert!(st.failures.read().contains_key(host));
        // A lock taken again starts the count over.
        clear_retry(&cfg, &mut rounds.retry_at, host);
        *sh.lock_refused.lock() = false;
        *sh.ours.lock() = false;
        rounds.refused.get_mut(host).unwrap().at = tokio::time::Instant::now();
        let na = unix_secs() + 20 * 86_400;
        st.certs.write().insert(host.into(), (key, na));
        assert_eq!(
            keep(&st, &cfg, Some(&sh), host, &mut rounds).await,
            Some(LOCKED_RETRY)
        );
        assert!(rounds.refused.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_issued_certificate_is_stored_again_before_its_lock_goes() {
        use std::sync::atomic::Ordering::Relaxed;
        let sh = FakeShare::default();
        let pem = pem_for("blog.gw.test", 2031);
        // Two failed stores (an etcd timeout): the third takes it.
        sh.store_fails.store(2, Relaxed);
        assert!(store_issued(&sh, "blog.gw.test", &pem).await);
        assert_eq!(sh.stores.load(Relaxed), 3);
        // No more tries than that.
        sh.store_fails.store(STORE_TRIES as usize, Relaxed);
        assert!(!store_issued(&sh, "blog.gw.test", &pem).await);
        assert_eq!(sh.stores.load(Relaxed), 3 + STORE_TRIES as usize);
    }

    #[tokio::test]
    async fn an_order_writes_its_lock_and_answers_again_in_a_new_session() {
        let sh = FakeShare::default();
        *sh.ours.lock() = true;
        *sh.session.lock() = Some(1);
        let answers = vec![Challenge::Http01 {
            token: "tok".into(),
            key_authorization: "tok.thumb".into(),
        }];
        let mut held = Some(1);
        // Same session: nothing written.
        keep_shared(&sh, "blog.gw.test", &mut held, &answers)
            .await
            .unwrap();
        assert_eq!(sh.locks.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert!(sh.published.lock().is_empty());
        // No session for now: nothing to write in; looked at again later.
        *sh.session.lock() = None;
        keep_shared(&sh, "blog.gw.test", &mut held, &answers)
            .await
            .unwrap();
        assert_eq!(held, Some(1));
        assert!(sh.published.lock().is_empty());
        // A new lease: the lock and the answer are written under it, once.
        *sh.session.lock() = Some(2);
        keep_shared(&sh, "blog.gw.test", &mut held, &answers)
            .await
            .unwrap();
        keep_shared(&sh, "blog.gw.test", &mut held, &answers)
            .await
            .unwrap();
        assert_eq!(held, Some(2));
        assert_eq!(sh.locks.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(*sh.published.lock(), vec![(2, "tok".to_string())]);
        // Another hub took the lock meanwhile: the order gives up.
        *sh.session.lock() = Some(3);
        *sh.ours.lock() = false;
        let e = keep_shared(&sh, "blog.gw.test", &mut held, &answers)
            .await
            .unwrap_err();
        assert!(e.contains("another hub took the mesh lock"), "{e}");
        assert_eq!(held, Some(2));
        assert_eq!(sh.published.lock().len(), 1);
    }

    #[tokio::test]
    async fn a_lock_not_released_is_released_on_a_later_round() {
        let dir = tmpdir("unlock");
        let cfg = cfg_in(&dir);
        let sh = Arc::new(FakeShare::default());
        *sh.ours.lock() = true;
        *sh.unlock_fails.lock() = true;
        let unlocks = || sh.unlocks.load(std::sync::atomic::Ordering::Relaxed);
        let st = AcmeState::default();
        st.set_share(Some(sh.clone()));
        st.set_wanted(Some(cfg), vec!["blog.gw.test".into()], Vec::new());
        let mut rounds = Rounds::default();
        // The order fails (its CA is not reached) and the lock stays.
        round(&st, &mut rounds).await;
        assert_eq!(sh.locks.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(unlocks(), 1);
        assert!(rounds.unlocks.contains("blog.gw.test"));
        // Still failing: tried again, and the round comes back soon.
        let next = round(&st, &mut rounds).await;
        assert_eq!(unlocks(), 2);
        assert!(next <= MESH_WAIT * 5, "{next:?}");
        // Released on the next one, then no more tries (the order waits).
        *sh.unlock_fails.lock() = false;
        round(&st, &mut rounds).await;
        assert_eq!(unlocks(), 3);
        assert!(rounds.unlocks.is_empty());
        round(&st, &mut rounds).await;
        assert_eq!(unlocks(), 3);
        assert_eq!(sh.locks.load(std::sync::atomic::Ordering::Relaxed), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_certificate_covers_its_names_only() {
        let kp = rcgen::KeyPair::generate().unwrap();
        let c = rcgen::CertificateParams::new(vec!["blog.gw.test".to_string()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        let key = crate::proxy::tls::certified_key_from_pem(
            c.pem().as_bytes(),
            kp.serialize_pem().as_bytes(),
        )
        .unwrap();
        assert!(covers(&key, "blog.gw.test"));
        assert!(!covers(&key, "shop.gw.test"));
        assert!(!covers(&key, "gw.test"));
        // A key that is not the certificate's does not load.
        let other = rcgen::KeyPair::generate().unwrap();
        assert!(crate::proxy::tls::certified_key_from_pem(
            c.pem().as_bytes(),
            other.serialize_pem().as_bytes()
        )
        .is_err());
    }

    fn key_for(names: &[&str]) -> Arc<CertifiedKey> {
        let kp = rcgen::KeyPair::generate().unwrap();
        let c =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap()
                .self_signed(&kp)
                .unwrap();
        Arc::new(
            crate::proxy::tls::certified_key_from_pem(
                c.pem().as_bytes(),
                kp.serialize_pem().as_bytes(),
            )
            .unwrap(),
        )
    }

    #[test]
    fn a_wildcard_certificate_serves_one_label_below_its_domain() {
        let st = AcmeState::default();
        let wild = key_for(&["*.gw.test"]);
        let own = key_for(&["own.gw.test"]);
        st.certs
            .write()
            .insert("*.gw.test".into(), (wild.clone(), 1));
        st.certs
            .write()
            .insert("own.gw.test".into(), (own.clone(), 1));
        assert!(Arc::ptr_eq(&st.cert("blog.gw.test").unwrap(), &wild));
        // A host's own certificate comes first.
        assert!(Arc::ptr_eq(&st.cert("own.gw.test").unwrap(), &own));
        assert!(st.cert("a.blog.gw.test").is_none());
        assert!(st.cert("gw.test").is_none());
        assert!(st.cert("test").is_none());
        assert!(covers(&wild, "*.gw.test"));
        assert!(covers(&wild, "blog.gw.test"));
        assert!(!covers(&own, "*.gw.test"));
        assert!(!covers(&wild, "*.other.test"));
        // Hosts no longer wanted are no longer served.
        st.set_wanted(None, vec!["own.gw.test".into()], Vec::new());
        assert!(st.cert("blog.gw.test").is_none());
        assert!(st.cert("own.gw.test").is_some());
        // The status lists the wanted hosts, with a failing order's error.
        st.failures
            .write()
            .insert("own.gw.test".into(), ("validation failed".into(), 99));
        let s = st.status();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].host, "own.gw.test");
        assert_eq!(s[0].not_after, Some(1));
        assert_eq!(s[0].error.as_deref(), Some("validation failed"));
        assert_eq!(s[0].retry_at, Some(99));
        // Switching to a wildcard: the names it covers keep their own
        // certificates until the wildcard is there.
        let blog = key_for(&["blog.gw.test"]);
        st.certs
            .write()
            .insert("blog.gw.test".into(), (blog.clone(), 1));
        st.set_wanted(None, vec!["*.gw.test".into()], Vec::new());
        assert!(Arc::ptr_eq(&st.cert("blog.gw.test").unwrap(), &blog));
        assert!(Arc::ptr_eq(&st.cert("own.gw.test").unwrap(), &own));
        assert!(!st.has_own("shop.gw.test"));
        // They are listed, as superseded, so that their expiry shows.
        let s = st.status();
        assert_eq!(
            s.iter()
                .map(|c| (c.host.as_str(), c.superseded))
                .collect::<Vec<_>>(),
            vec![
                ("*.gw.test", false),
                ("blog.gw.test", true),
                ("own.gw.test", true)
            ]
        );
        st.certs
            .write()
            .insert("*.gw.test".into(), (wild.clone(), 1));
        st.prune();
        assert!(Arc::ptr_eq(&st.cert("blog.gw.test").unwrap(), &wild));
        assert!(Arc::ptr_eq(&st.cert("own.gw.test").unwrap(), &wild));
        assert!(!st.has_own("blog.gw.test"));
        // A failure of a host no longer wanted goes too.
        assert!(st.failures.read().is_empty());
        assert_eq!(st.status().len(), 1);
        assert_eq!(st.status()[0].host, "*.gw.test");
        // Switching back: the wildcard serves the names until each has its
        // own certificate.
        st.set_wanted(
            None,
            vec!["blog.gw.test".into(), "shop.gw.test".into()],
            Vec::new(),
        );
        assert!(Arc::ptr_eq(&st.cert("shop.gw.test").unwrap(), &wild));
        st.certs
            .write()
            .insert("blog.gw.test".into(), (blog.clone(), 1));
        st.prune();
        assert!(st.cert("shop.gw.test").is_some(), "shop still waits");
        st.certs
            .write()
            .insert("shop.gw.test".into(), (own.clone(), 1));
        st.prune();
        assert!(!st.has_own("*.gw.test"));
        assert!(Arc::ptr_eq(&st.cert("blog.gw.test").unwrap(), &blog));
    }

    #[test]
    fn dns_lookup_answers_the_challenge_names_of_its_zones() {
        use crate::proxy::dns::Lookup;
        let st = AcmeState::default();
        assert!(matches!(
            st.dns_lookup("_acme-challenge.gw.test"),
            Lookup::Outside
        ));
        st.set_wanted(None, Vec::new(), vec!["gw.test".into(), "b.gw.test".into()]);
        match st.dns_lookup("_acme-challenge.gw.test") {
            Lookup::Apex { zone, txt } => {
                assert_eq!(zone, "_acme-challenge.gw.test");
                assert!(txt.is_empty());
            }
            _ => panic!("apex"),
        }
        st.dns01
            .write()
            .insert("b.gw.test".into(), vec!["v1".into(), "v2".into()]);
        match st.dns_lookup("_acme-challenge.b.gw.test") {
            Lookup::Apex { zone, txt } => {
                assert_eq!(zone, "_acme-challenge.b.gw.test");
                assert_eq!(txt, vec!["v1".to_string(), "v2".into()]);
            }
            _ => panic!("apex of the second zone"),
        }
        assert!(matches!(
            st.dns_lookup("x._acme-challenge.gw.test"),
            Lookup::Below { zone } if zone == "_acme-challenge.gw.test"
        ));
        for out in [
            "gw.test",
            "blog.gw.test",
            "_acme-challenge.other.test",
            "x_acme-challenge.gw.test",
            "_acme-challenge.xgw.test",
        ] {
            assert!(matches!(st.dns_lookup(out), Lookup::Outside), "{out}");
        }
    }

    #[test]
    fn renewal_waits_for_two_thirds_of_a_short_lifetime() {
        let day = 86_400;
        // At `at`, or up to a tenth of `spread` earlier.
        let near = |r: u64, at: u64, spread: u64| {
            assert!(
                r <= at && r >= at - spread / 10,
                "{r} not in {at} - {spread}/10"
            );
        };
        let h = "blog.gw.test";
        // 90 days, 30 before expiry: day 60.
        near(renew_at(Some(0), 90 * day, 30 * day, h), 60 * day, 30 * day);
        // 90 days, 10 or 80 before expiry: day 80, day 10.
        near(renew_at(Some(0), 90 * day, 10 * day, h), 80 * day, 10 * day);
        near(renew_at(Some(0), 90 * day, 80 * day, h), 10 * day, 10 * day);
        // A one-day certificate with 30 days' margin: after 16 hours, not at once.
        near(
            renew_at(Some(1000), 1000 + day, 30 * day, h),
            1000 + day / 3 * 2,
            day / 3,
        );
        // No notBefore (or a broken one): the margin alone.
        near(renew_at(None, 90 * day, 30 * day, h), 60 * day, 30 * day);
        near(
            renew_at(Some(91 * day), 90 * day, 30 * day, h),
            60 * day,
            30 * day,
        );
        let mut p = rcgen::CertificateParams::new(vec!["a.example".to_string()]).unwrap();
        p.not_before = rcgen::date_time_ymd(2031, 7, 14);
        p.not_after = rcgen::date_time_ymd(2031, 7, 15);
        let kp = rcgen::KeyPair::generate().unwrap();
        let c = p.self_signed(&kp).unwrap();
        assert_eq!(
            cert_validity(c.der()),
            Some((1_941_840_000 - day, 1_941_840_000))
        );
    }

    #[test]
    fn renewal_is_spread_by_host_name() {
        let day = 86_400;
        let (nb, na, rb) = (1_000_000, 1_000_000 + 90 * day, 30 * day);
        let a = renew_at(Some(nb), na, rb, "a.gw.test");
        let b = renew_at(Some(nb), na, rb, "b.gw.test");
        assert_ne!(a, b);
        for r in [a, b] {
            assert!(r <= na - rb && r >= na - rb - rb / 10, "{r}");
        }
        // The same host, the same time (across restarts too).
        assert_eq!(renew_at(Some(nb), na, rb, "a.gw.test"), a);
        // A margin longer than what is known of the lifetime: at once.
        assert_eq!(renew_at(None, 100, rb, "a.gw.test"), 0);
        // A margin near the whole lifetime: still after notBefore, so a new
        // certificate is not due at once.
        for h in ["a.gw.test", "b.gw.test", "c.gw.test"] {
            assert!(renew_at(Some(nb), na, 89 * day, h) > nb);
            assert!(renew_at(Some(nb), nb + day, rb, h) > nb + day / 2);
        }
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "gatewire-acme-{tag}-{}-{}",
            std::process::id(),
            crate::clock::unix_nanos()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Settings whose CA is never reached: nothing listens on its port and
    /// its `directory_ca` is missing.
    fn cfg_in(dir: &Path) -> AcmeSettings {
        AcmeSettings {
            directory: "https://127.0.0.1:1/dir".into(),
            contact: Vec::new(),
            state_dir: dir.to_path_buf(),
            directory_ca: Some(dir.join("no-such-ca.pem")),
            challenge: AcmeChallenge::Http01,
            renew_before: Duration::from_secs(30 * 86_400),
            wildcard: false,
            dns_listen: Vec::new(),
        }
    }

    /// A self-signed certificate for `host` expiring in `year`, as PEM.
    fn pem_for(host: &str, year: i32) -> CertPem {
        let mut p = rcgen::CertificateParams::new(vec![host.to_string()]).unwrap();
        p.not_after = rcgen::date_time_ymd(year, 1, 1);
        let kp = rcgen::KeyPair::generate().unwrap();
        CertPem {
            chain: p.self_signed(&kp).unwrap().pem(),
            key: kp.serialize_pem(),
        }
    }

    fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_mismatched_pair_is_refused_before_any_file_changes() {
        let dir = tmpdir("mismatch");
        let cfg = cfg_in(&dir);
        let st = AcmeState::default();
        let host = "blog.gw.test";
        let good = pem_for(host, 2031);
        install(&st, &cfg, host, &good).unwrap();
        let before = files_of(&host_dir(&cfg, host));
        let served = st.cert(host).unwrap();
        // A chain with another key (an order finalized before), a
        // certificate for another name, a chain that is not one.
        let newer = pem_for(host, 2032);
        let other = pem_for(host, 2032);
        let bad = [
            (
                CertPem {
                    chain: newer.chain.clone(),
                    key: other.key.clone(),
                },
                "do not match",
            ),
            (pem_for("shop.gw.test", 2032), "not valid for blog.gw.test"),
            (
                CertPem {
                    chain: "garbage".into(),
                    key: newer.key.clone(),
                },
                "no PEM certificate",
            ),
        ];
        for (pem, why) in bad {
            let e = install(&st, &cfg, host, &pem).unwrap_err();
            assert!(e.contains(why), "{e}");
            assert!(!e.contains("PRIVATE KEY"), "{e}");
            assert_eq!(files_of(&host_dir(&cfg, host)), before);
            assert!(Arc::ptr_eq(&st.cert(host).unwrap(), &served));
        }
        // An order found valid before this hub's finalize is not used.
        assert!(finalizable(OrderStatus::Ready).is_ok());
        for s in [OrderStatus::Valid, OrderStatus::Processing] {
            let e = finalizable(s).unwrap_err();
            assert!(e.contains("does not hold"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_stored_pair_survives_a_crash_between_its_files() {
        let dir = tmpdir("crash");
        let cfg = cfg_in(&dir);
        let st = AcmeState::default();
        let host = "*.gw.test";
        let hd = host_dir(&cfg, host);
        let old = pem_for(host, 2031);
        let new = pem_for(host, 2032);
        let na = |p: &CertPem| load_pair(p).unwrap().1;
        // An install from before the bundle: loaded, and the bundle written.
        std::fs::create_dir_all(&hd).unwrap();
        std::fs::write(hd.join(KEY_FILE), &old.key).unwrap();
        std::fs::write(hd.join(CHAIN_FILE), &old.chain).unwrap();
        assert_eq!(load_stored(&cfg, host).unwrap().1, na(&old));
        assert_eq!(
            split_bundle(&std::fs::read_to_string(hd.join(BUNDLE_FILE)).unwrap()).unwrap(),
            old
        );
        install(&st, &cfg, host, &new).unwrap();
        // A crash after the bundle, between key.pem and fullchain.pem.
        std::fs::write(hd.join(KEY_FILE), &new.key).unwrap();
        std::fs::write(hd.join(CHAIN_FILE), &old.chain).unwrap();
        let (k, t) = load_stored(&cfg, host).unwrap();
        assert_eq!(t, na(&new));
        k.keys_match().unwrap();
        // The two files hold the pair again.
        assert_eq!(
            std::fs::read_to_string(hd.join(CHAIN_FILE)).unwrap(),
            new.chain
        );
        assert_eq!(stored_pem(&cfg, host).unwrap(), new);
        // A crash right after the bundle: the two files hold the old pair.
        install(&st, &cfg, host, &old).unwrap();
        std::fs::write(hd.join(BUNDLE_FILE), bundle_text(&new).as_bytes()).unwrap();
        assert_eq!(load_stored(&cfg, host).unwrap().1, na(&new));
        assert_eq!(std::fs::read_to_string(hd.join(KEY_FILE)).unwrap(), new.key);
        // A bundle that does not load: the two files.
        install(&st, &cfg, host, &new).unwrap();
        std::fs::write(hd.join(BUNDLE_FILE), &new.key).unwrap();
        assert_eq!(load_stored(&cfg, host).unwrap().1, na(&new));
        assert_eq!(
            split_bundle(&std::fs::read_to_string(hd.join(BUNDLE_FILE)).unwrap()).unwrap(),
            new
        );
        // Nothing loads: none.
        std::fs::write(hd.join(BUNDLE_FILE), "x").unwrap();
        std::fs::write(hd.join(KEY_FILE), &old.key).unwrap();
        assert!(load_stored(&cfg, host).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn failed_orders_back_off_from_two_minutes_to_six_hours() {
        let mut t = 0;
        let mut last = None;
        // The failed order itself, then the retries within its hour.
        let mut first_hour = 1;
        for _ in 0..20 {
            let w = retry_wait(last);
            t += w.as_secs();
            if t < 3600 {
                first_hour += 1;
            }
            last = Some(w);
        }
        assert!(first_hour <= 5, "{first_hour}");
        assert_eq!(retry_wait(None), Duration::from_secs(120));
        assert_eq!(
            retry_wait(Some(Duration::from_secs(120))),
            Duration::from_secs(240)
        );
        assert_eq!(last, Some(RETRY_MAX));
        assert_eq!(retry_wait(Some(RETRY_MAX)), RETRY_MAX);
    }

    /// `got` is the wait `nominal` with its jitter (whole seconds).
    fn assert_jittered(got: Duration, nominal: Duration) {
        let most = jittered(nominal, u32::MAX);
        assert!(
            got >= nominal && got <= most,
            "{got:?} not in {nominal:?}..={most:?}"
        );
    }

    #[test]
    fn retry_waits_are_jittered_up_to_thirty_percent_longer() {
        let w = RETRY_FIRST;
        assert_eq!(jittered(w, 0), w);
        let most = jittered(w, u32::MAX);
        assert!(
            most.abs_diff(w.mul_f64(1.3)) < Duration::from_millis(1),
            "{most:?}"
        );
        let mid = jittered(w, u32::MAX / 2);
        assert!(
            mid.abs_diff(w.mul_f64(1.15)) < Duration::from_millis(1),
            "{mid:?}"
        );
        for d in [1, 1 << 20, 1 << 31, u32::MAX - 1] {
            let j = jittered(RETRY_MAX, d);
            assert!(
                j >= RETRY_MAX && j <= jittered(RETRY_MAX, u32::MAX),
                "{j:?}"
            );
        }
        // With the shortest waits (no jitter) the first hour still holds
        // five orders at most; failures spread over the jitter's range.
        let dir = tmpdir("jitter");
        let cfg = cfg_in(&dir);
        let st = AcmeState::default();
        let mut seen = std::collections::HashSet::new();
        for i in 0..20 {
            let host = format!("h{i}.gw.test");
            let mut r = Retries::new();
            let w = failed(&st, &cfg, &mut r, &host, "x");
            assert_jittered(w, RETRY_FIRST);
            assert_eq!(r[&host].wait, RETRY_FIRST, "the nominal wait doubles");
            seen.insert(w);
        }
        assert!(seen.len() > 1, "{seen:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A CA reached at `127.0.0.1:port` whose certificate is trusted but
    /// not the one it would show: settings for it, in `dir`.
    fn cfg_at(dir: &Path, port: u16) -> AcmeSettings {
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, pem_for("ca.gw.test", 2031).chain).unwrap();
        AcmeSettings {
            directory: format!("https://127.0.0.1:{port}/dir"),
            directory_ca: Some(ca),
            ..cfg_in(dir)
        }
    }

    /// A CA that counts the connections made to it and closes each at once:
    /// every order fails at its first request. Its port and the count.
    async fn counting_ca() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = n.clone();
        tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(c);
            }
        });
        (port, n)
    }

    #[tokio::test]
    async fn a_reload_keeps_the_wait_of_a_failed_order() {
        let dir = tmpdir("reload");
        let (port, orders) = counting_ca().await;
        let orders = move || orders.load(std::sync::atomic::Ordering::SeqCst);
        let cfg = cfg_at(&dir, port);
        let host = "shop.gw.test";
        let hosts = || vec![host.to_string()];
        let st = AcmeState::default();
        st.set_wanted(Some(cfg.clone()), hosts(), Vec::new());
        let mut rounds = Rounds::default();
        round(&st, &mut rounds).await;
        assert_eq!(orders(), 1);
        assert!(st.failures.read().contains_key(host));
        let file = host_dir(&cfg, host).join(RETRY_FILE);
        assert!(file.exists());
        // Reloads that change nothing the order depends on (the control
        // plane's, another route's, `renew_before`): the wait holds.
        st.set_wanted(Some(cfg.clone()), hosts(), Vec::new());
        round(&st, &mut rounds).await;
        let mut later = cfg.clone();
        later.renew_before = Duration::from_secs(10 * 86_400);
        st.set_wanted(Some(later), hosts(), vec!["gw.test".into()]);
        round(&st, &mut rounds).await;
        assert_eq!(orders(), 1, "no order during the wait");
        assert!(file.exists());
        // Other ACME settings: ordered at once.
        let mut other = cfg.clone();
        other.contact = vec!["mailto:ops@gw.test".into()];
        st.set_wanted(Some(other.clone()), hosts(), Vec::new());
        round(&st, &mut rounds).await;
        assert_eq!(orders(), 2);
        round(&st, &mut rounds).await;
        assert_eq!(orders(), 2);
        // The host dropped and wanted again (a node's service that comes
        // and goes): still waits.
        st.set_wanted(Some(other.clone()), Vec::new(), Vec::new());
        st.set_wanted(Some(other.clone()), hosts(), Vec::new());
        round(&st, &mut rounds).await;
        assert_eq!(orders(), 2);
        // A restart waits (the retry file).
        let st = AcmeState::default();
        st.set_wanted(Some(other.clone()), hosts(), Vec::new());
        round(&st, &mut Rounds::default()).await;
        assert_eq!(orders(), 2);
        // Deleting the retry file ends the wait.
        std::fs::remove_file(&file).unwrap();
        round(&st, &mut Rounds::default()).await;
        assert_eq!(orders(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_order_failing_while_its_host_is_dropped_keeps_its_wait() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let dir = tmpdir("dropped");
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cfg = cfg_at(&dir, l.local_addr().unwrap().port());
        let host = "shop.gw.test";
        let st = Arc::new(AcmeState::default());
        st.set_wanted(Some(cfg.clone()), vec![host.into()], Vec::new());
        // A CA that fails every order, the first one while a reload drops
        // the host.
        let n = Arc::new(AtomicUsize::new(0));
        {
            let (st, cfg, n) = (st.clone(), cfg.clone(), n.clone());
            tokio::spawn(async move {
                while let Ok((c, _)) = l.accept().await {
                    if n.fetch_add(1, SeqCst) == 0 {
                        st.set_wanted(Some(cfg.clone()), Vec::new(), Vec::new());
                    }
                    drop(c);
                }
            });
        }
        let mut rounds = Rounds::default();
        round(&st, &mut rounds).await;
        assert_eq!(n.load(SeqCst), 1);
        assert!(host_dir(&cfg, host).join(RETRY_FILE).exists());
        // Wanted again: it waits.
        st.set_wanted(Some(cfg.clone()), vec![host.into()], Vec::new());
        round(&st, &mut rounds).await;
        assert_eq!(n.load(SeqCst), 1, "no order during the wait");
        assert!(st.failures.read().contains_key(host));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_certificate_is_asked_for_until_the_order_times_out() {
        let ms = Duration::from_millis;
        let mut last = None;
        let mut waits = Vec::new();
        let mut waited = Duration::ZERO;
        while waited < ORDER_TIMEOUT {
            let d = cert_poll_delay(last);
            assert!(d <= CERT_POLL_MAX, "{d:?}");
            waits.push(d);
            waited += d;
            last = Some(d);
        }
        assert_eq!(waits[..4], [ms(250), ms(500), ms(1000), ms(2000)]);
        assert_eq!(waits.last(), Some(&CERT_POLL_MAX));
        // Every 10 s once there: about 60 requests in 600 s.
        assert!((60..70).contains(&waits.len()), "{}", waits.len());
    }

    #[tokio::test]
    async fn stored_certificates_are_served_while_an_order_blocks() {
        let dir = tmpdir("blocked");
        // A CA that takes connections and never answers.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((c, _)) = l.accept().await {
                held.push(c);
            }
        });
        let cfg = cfg_at(&dir, port);
        store_pair(&host_dir(&cfg, "b.test"), &pem_for("b.test", 2031)).unwrap();
        let st = Arc::new(AcmeState::default());
        // a.test (no certificate: ordered) comes first.
        st.set_wanted(
            Some(cfg.clone()),
            vec!["a.test".into(), "b.test".into()],
            Vec::new(),
        );
        spawn_manager(&st);
        let start = tokio::time::Instant::now();
        while st.cert("b.test").is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "b.test not served while a.test's order waits"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(st.cert("a.test").is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A TLS server for `127.0.0.1` answering each request with `head` and
    /// then `body`, then holding the connection; its port and its
    /// certificate's PEM.
    async fn answering_server(head: String, body: Vec<u8>) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let kp = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(kp.serialize_der().into());
        let cfg = rustls::ServerConfig::builder_with_provider(crate::proxy::upstream::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                let (head, body) = (head.clone(), body.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(c).await else {
                        return;
                    };
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(n) if n > 0 => req.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                    }
                    let _ = tls.write_all(head.as_bytes()).await;
                    let _ = tls.write_all(&body).await;
                    let _ = tls.flush().await;
                    tokio::time::sleep(Duration::from_secs(60)).await;
                });
            }
        });
        (port, cert.pem())
    }

    /// A request to the server at `port` trusting `ca`, with `timeout`.
    async fn ask(
        dir: &Path,
        port: u16,
        ca: &str,
        timeout: Duration,
    ) -> Result<BytesResponse, instant_acme::Error> {
        let file = dir.join("server-ca.pem");
        std::fs::write(&file, ca).unwrap();
        let mut http = AcmeHttp::new(Some(&file)).unwrap();
        http.timeout = timeout;
        let req = Request::get(format!("https://127.0.0.1:{port}/dir"))
            .body(Full::default())
            .unwrap();
        http.request(req).await
    }

    #[tokio::test]
    async fn a_ca_response_body_is_read_whole_within_the_timeout() {
        let dir = tmpdir("body");
        let t = Duration::from_millis(500);
        // Headers, part of the body, then nothing.
        let (port, ca) = answering_server(
            "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n".into(),
            b"{\"partial\":".to_vec(),
        )
        .await;
        let start = tokio::time::Instant::now();
        let Err(e) = ask(&dir, port, &ca, t).await else {
            panic!("a stalled body read as a response")
        };
        assert!(e.to_string().contains("timed out"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));
        // A body over the limit.
        let big = BODY_LIMIT + 1;
        let (port, ca) = answering_server(
            format!("HTTP/1.1 200 OK\r\nContent-Length: {big}\r\n\r\n"),
            vec![b'x'; big],
        )
        .await;
        let Err(e) = ask(&dir, port, &ca, Duration::from_secs(10)).await else {
            panic!("a body over the limit read")
        };
        assert!(e.to_string().contains("ACME response body"), "{e}");
        // A whole body: handed over complete.
        let (port, ca) = answering_server(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n".into(),
            b"{}".to_vec(),
        )
        .await;
        let mut r = ask(&dir, port, &ca, t).await.unwrap();
        assert_eq!(r.parts.status, http::StatusCode::OK);
        let body = tokio::time::timeout(t, r.body.into_bytes()).await.unwrap();
        assert_eq!(body.unwrap().as_ref(), b"{}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_issued_certificate_is_served_when_it_cannot_be_stored() {
        let dir = tmpdir("unwritable");
        let (port, orders) = counting_ca().await;
        let cfg = cfg_at(&dir, port);
        let host = "blog.gw.test";
        // A file where the host's directory goes.
        let hd = host_dir(&cfg, host);
        std::fs::create_dir_all(hd.parent().unwrap()).unwrap();
        std::fs::write(&hd, "").unwrap();
        let st = AcmeState::default();
        st.set_wanted(Some(cfg.clone()), vec![host.into()], Vec::new());
        let pem = pem_for(host, 2031);
        install(&st, &cfg, host, &pem).unwrap();
        assert!(st.cert(host).is_some());
        // The next rounds order nothing: the certificate is served.
        let mut rounds = Rounds::default();
        round(&st, &mut rounds).await;
        assert_eq!(orders.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert!(st.cert(host).is_some());
        assert!(st.failures.read().is_empty());
        // Once the directory can be written, a round writes it.
        std::fs::remove_file(&hd).unwrap();
        round(&st, &mut rounds).await;
        assert_eq!(stored_pem(&cfg, host).unwrap(), pem);
        assert_eq!(
            std::fs::read_to_string(hd.join(DIRECTORY_FILE)).unwrap(),
            cfg.directory
        );
        assert!(st.unsaved.read().is_empty());
        assert_eq!(orders.load(std::sync::atomic::Ordering::SeqCst), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_certificate_not_written_yet_outlives_a_reload_that_drops_its_host() {
        let dir = tmpdir("unwritten-drop");
        let (port, orders) = counting_ca().await;
        let cfg = cfg_at(&dir, port);
        let host = "blog.gw.test";
        let old = "old.gw.test";
        // Files where the hosts' directories go.
        for h in [host, old] {
            let hd = host_dir(&cfg, h);
            std::fs::create_dir_all(hd.parent().unwrap()).unwrap();
            std::fs::write(&hd, "").unwrap();
        }
        let st = AcmeState::default();
        st.set_wanted(Some(cfg.clone()), vec![host.into(), old.into()], Vec::new());
        let pem = pem_for(host, 2031);
        install(&st, &cfg, host, &pem).unwrap();
        install(&st, &cfg, old, &pem_for(old, 2001)).unwrap();
        // A reload drops both: not served; the expired one is forgotten.
        st.set_wanted(Some(cfg.clone()), Vec::new(), Vec::new());
        assert!(st.cert(host).is_none());
        assert_eq!(
            st.unsaved.read().keys().collect::<Vec<_>>(),
            vec![&host.to_string()]
        );
        // Wanted again: served from memory, not ordered again.
        st.set_wanted(Some(cfg.clone()), vec![host.into()], Vec::new());
        let mut rounds = Rounds::default();
        round(&st, &mut rounds).await;
        assert!(st.cert(host).is_some());
        assert_eq!(orders.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert!(st.failures.read().is_empty());
        // And written once it can be.
        std::fs::remove_file(host_dir(&cfg, host)).unwrap();
        round(&st, &mut rounds).await;
        assert_eq!(stored_pem(&cfg, host).unwrap(), pem);
        assert!(st.unsaved.read().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_retry_time_survives_a_restart() {
        let dir = tmpdir("retry");
        let cfg = cfg_in(&dir);
        let host = "shop.gw.test";
        let file = host_dir(&cfg, host).join(RETRY_FILE);
        let st = AcmeState::default();
        let mut r = Retries::new();
        let first = failed(&st, &cfg, &mut r, host, "validation failed: x");
        assert_jittered(first, RETRY_FIRST);
        assert!(file.exists());
        // Another process: it waits, and the wait doubles from there.
        let st = AcmeState::default();
        let mut r = Retries::new();
        let left = retry_left(&st, &cfg, &mut r, host).unwrap();
        assert!(left > first - Duration::from_secs(10) && left <= first);
        assert_eq!(
            st.failures.read().get(host).map(|(e, _)| e.as_str()),
            Some("validation failed: x")
        );
        assert_jittered(failed(&st, &cfg, &mut r, host, "again"), RETRY_FIRST * 2);
        // The operator deletes the file: the next order runs at once, and
        // its wait starts over.
        std::fs::remove_file(&file).unwrap();
        assert_eq!(retry_left(&st, &cfg, &mut r, host), None);
        assert_jittered(failed(&st, &cfg, &mut r, host, "again"), RETRY_FIRST);
        // A change of the ACME settings: the same.
        reset_retries(&cfg, &[host.to_string()], &mut r);
        assert!(!file.exists());
        assert_eq!(retry_left(&st, &cfg, &mut r, host), None);
        // A time that passed: no wait, the last one is kept.
        std::fs::write(
            &file,
            format!("1000 {}\nold\n", (RETRY_FIRST * 4).as_secs()),
        )
        .unwrap();
        let mut r = Retries::new();
        assert_eq!(retry_left(&st, &cfg, &mut r, host), None);
        assert_jittered(failed(&st, &cfg, &mut r, host, "again"), RETRY_FIRST * 8);
        // Another directory after a restart (staging to production): the
        // failures with the old one do not hold the order back.
        let mut other = cfg_in(&dir);
        other.directory = "https://ca.example.test/directory".into();
        assert_ne!(other.directory, cfg.directory);
        let mut r = Retries::new();
        assert_eq!(retry_left(&st, &other, &mut r, host), None);
        assert!(!file.exists(), "the old directory's retry file removed");
        // While the same directory still waits.
        assert_jittered(failed(&st, &cfg, &mut r, host, "again"), RETRY_FIRST);
        let mut r = Retries::new();
        assert!(retry_left(&st, &cfg, &mut r, host).is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_host_dropped_from_the_config_is_not_ordered() {
        let dir = tmpdir("dropped");
        let cfg = cfg_in(&dir);
        let st = AcmeState::default();
        st.set_wanted(Some(cfg.clone()), vec!["kept.gw.test".into()], Vec::new());
        let mut rounds = Rounds::default();
        // Dropped by a reload during the round: not ordered.
        assert_eq!(
            keep(&st, &cfg, None, "gone.gw.test", &mut rounds).await,
            None
        );
        assert!(st.failures.read().is_empty());
        assert!(!host_dir(&cfg, "gone.gw.test").exists());
        // A wanted one is (its CA is not reached: a failed order).
        let wait = keep(&st, &cfg, None, "kept.gw.test", &mut rounds).await;
        assert_jittered(wait.unwrap(), RETRY_FIRST);
        let e = st.failures.read().get("kept.gw.test").unwrap().0.clone();
        assert!(e.contains("no-such-ca.pem"), "{e}");
        assert!(host_dir(&cfg, "kept.gw.test").join(RETRY_FILE).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_unreadable_account_file_is_kept() {
        let dir = tmpdir("account");
        let mut cfg = cfg_in(&dir);
        // With the system bundle, an attempt would reach 127.0.0.1:1.
        cfg.directory_ca = None;
        let path = dir.join("account.json");
        std::fs::create_dir(&path).unwrap();
        let Err(e) = account(&cfg).await else {
            panic!("an account from an unreadable file")
        };
        assert!(
            e.contains("account.json") && e.contains("no new account"),
            "{e}"
        );
        assert!(!e.contains("127.0.0.1"), "{e}");
        assert!(path.is_dir());
        // A state_dir where nothing can be written: no account is made.
        std::fs::remove_dir(&path).unwrap();
        std::fs::create_dir(dir.join(".write-test")).unwrap();
        let Err(e) = account(&cfg).await else {
            panic!("an account that could not be kept")
        };
        assert!(e.contains("state_dir"), "{e}");
        assert!(!e.contains("127.0.0.1"), "{e}");
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_account_file_that_holds_no_account_is_kept() {
        let dir = tmpdir("account-broken");
        let mut cfg = cfg_in(&dir);
        // With the system bundle, an attempt would reach 127.0.0.1:1.
        cfg.directory_ca = None;
        let path = dir.join("account.json");
        for text in [&b"{"[..], b"", b"{\"id\": 7}"] {
            std::fs::write(&path, text).unwrap();
            let Err(e) = account(&cfg).await else {
                panic!("an account from {text:?}")
            };
            assert!(
                e.contains("account.json") && e.contains("no new account"),
                "{e}"
            );
            assert!(!e.contains("127.0.0.1"), "{e}");
            assert_eq!(std::fs::read(&path).unwrap(), text, "the file as it was");
            let names: Vec<String> = files_of(&dir).into_iter().map(|(n, _)| n).collect();
            assert_eq!(names, ["account.json"], "nothing moved aside or made");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn accounts_moved_aside_never_replace_each_other() {
        let dir = tmpdir("account-aside");
        let path = dir.join("account.json");
        std::fs::write(&path, "first").unwrap();
        let one = move_aside(&path).unwrap();
        std::fs::write(&path, "second").unwrap();
        let two = move_aside(&path).unwrap();
        assert_ne!(one, two);
        assert!(!path.exists());
        assert_eq!(std::fs::read_to_string(&one).unwrap(), "first");
        assert_eq!(std::fs::read_to_string(&two).unwrap(), "second");
        for p in [&one, &two] {
            let name = p.file_name().unwrap().to_string_lossy();
            assert!(name.starts_with("account.previous-"), "{name}");
        }
        // A move that fails is an error naming the file.
        let e = move_aside(&dir.join("gone").join("account.json")).unwrap_err();
        assert!(
            e.contains("account.json") && e.contains("no new account"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_same_file_written_at_once_by_two_writers_is_never_mixed() {
        let dir = tmpdir("writers");
        let path = dir.join("bundle.pem");
        let (a, b) = (vec![b'a'; 1 << 20], vec![b'b'; 1 << 16]);
        std::thread::scope(|s| {
            for data in [&a, &b] {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..20 {
                        write_private(path, data).unwrap();
                    }
                });
            }
        });
        let got = std::fs::read(&path).unwrap();
        assert!(got == a || got == b, "{} bytes, mixed", got.len());
        let names: Vec<String> = files_of(&dir).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["bundle.pem"], "no temporary file left");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The `retry` file names the settings the orders failed with: a
    /// restart with others (any but `renew_before`) orders at once, as a
    /// reload with the same change does.
    #[test]
    fn a_restart_with_other_acme_settings_ends_the_wait() {
        let dir = tmpdir("retry-settings");
        let cfg = cfg_in(&dir);
        let host = "shop.gw.test";
        let hosts = || vec![host.to_string()];
        let file = host_dir(&cfg, host).join(RETRY_FILE);
        let mut later = cfg.clone();
        later.renew_before = Duration::from_secs(10 * 86_400);
        let others = [
            AcmeSettings {
                challenge: AcmeChallenge::TlsAlpn01,
                ..cfg.clone()
            },
            AcmeSettings {
                wildcard: true,
                ..cfg.clone()
            },
            AcmeSettings {
                dns_listen: vec!["127.0.0.1:53".parse().unwrap()],
                ..cfg.clone()
            },
            AcmeSettings {
                directory_ca: Some(dir.join("other-ca.pem")),
                ..cfg.clone()
            },
            AcmeSettings {
                directory_ca: None,
                ..cfg.clone()
            },
            AcmeSettings {
                contact: vec!["mailto:ops@gw.test".into()],
                ..cfg.clone()
            },
        ];
        for other in &others {
            assert!(orders_differ(&cfg, other), "{other:?}");
            failed(&AcmeState::default(), &cfg, &mut Retries::new(), host, "x");
            assert!(file.exists());
            // The restart: a fresh state, whose first `set_wanted` it is.
            let st = AcmeState::default();
            st.set_wanted(Some(other.clone()), hosts(), Vec::new());
            let mut r = Retries::new();
            assert_eq!(retry_left(&st, other, &mut r, host), None, "{other:?}");
            assert!(!file.exists(), "{other:?}");
            assert!(!r.contains_key(host));
        }
        // Only `renew_before` changed: the wait holds.
        failed(&AcmeState::default(), &cfg, &mut Retries::new(), host, "x");
        let st = AcmeState::default();
        st.set_wanted(Some(later.clone()), hosts(), Vec::new());
        assert!(retry_left(&st, &later, &mut Retries::new(), host).is_some());
        assert!(file.exists());
        // A file of an older version, which names no settings: read as
        // before (its directory still counts).
        let at = unix_secs() + 600;
        std::fs::write(&file, format!("{at} 120 {}\nold\n", cfg.directory)).unwrap();
        let st = AcmeState::default();
        let mut r = Retries::new();
        assert!(retry_left(&st, &others[0], &mut r, host).is_some());
        assert_eq!(
            st.failures.read().get(host).map(|(e, _)| e.as_str()),
            Some("old")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A stopped state's manager ends though the state lives on (the proxy's
    /// connections still hold it), and orders nothing more.
    #[tokio::test]
    async fn a_stopped_manager_ends_and_orders_nothing_more() {
        let dir = tmpdir("stopped");
        let (port, orders) = counting_ca().await;
        let orders = move || orders.load(std::sync::atomic::Ordering::SeqCst);
        let cfg = cfg_at(&dir, port);
        let host = "shop.gw.test";
        let st = Arc::new(AcmeState::default());
        st.set_wanted(Some(cfg.clone()), vec![host.to_string()], Vec::new());
        let manager = spawn_manager(&st);
        tokio::time::timeout(Duration::from_secs(10), async {
            while orders() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the first order");
        st.stop();
        tokio::time::timeout(Duration::from_secs(5), manager)
            .await
            .expect("the manager ends once stopped")
            .unwrap();
        // A change that would order at once (its wait gone) orders nothing.
        let mut other = cfg.clone();
        other.contact = vec!["mailto:ops@gw.test".into()];
        st.set_wanted(Some(other), vec![host.to_string()], Vec::new());
        round(&st, &mut Rounds::default()).await;
        assert_eq!(orders(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn not_after_of_a_generated_cert() {
        let mut p = rcgen::CertificateParams::new(vec!["a.example".to_string()]).unwrap();
        p.not_after = rcgen::date_time_ymd(2031, 7, 15);
        let kp = rcgen::KeyPair::generate().unwrap();
        let c = p.clone().self_signed(&kp).unwrap();
        // 2031-07-15T00:00:00Z
        assert_eq!(cert_not_after(c.der()), Some(1_941_840_000));
        p.not_after = rcgen::date_time_ymd(2060, 1, 1);
        let c = p.self_signed(&kp).unwrap();
        assert_eq!(cert_not_after(c.der()), Some(2_840_140_800));
        assert_eq!(cert_not_after(b"\x30\x03\x02\x01"), None);
    }

    // ------------------------------------------------ orders waiting for
    // their certificate

    fn pending_for(cfg: &AcmeSettings, order: &str) -> Pending {
        Pending {
            order: order.into(),
            account: "https://ca.gw.test/my-account/1".into(),
            settings: settings_digest(cfg),
            written: 1_800_000_000,
            key: zeroize::Zeroizing::new(rcgen::KeyPair::generate().unwrap().serialize_pem()),
        }
    }

    #[test]
    fn a_pending_order_record_reads_back_and_a_broken_one_is_an_error() {
        let cfg = cfg_in(Path::new("/nonexistent"));
        let p = pending_for(&cfg, "https://ca.gw.test/my-order/7");
        let text = p.text();
        let back = Pending::parse(&text).unwrap();
        assert_eq!(back.order, p.order);
        assert_eq!(back.account, p.account);
        assert_eq!(back.settings, p.settings);
        assert_eq!(back.written, p.written);
        assert_eq!(*back.key, *p.key);
        // The key shows in no Debug output.
        let body: Vec<&str> = p.key.lines().filter(|l| !l.starts_with("-----")).collect();
        let debug = format!("{back:?}");
        assert!(debug.contains("my-order/7"), "{debug}");
        assert!(
            !debug.contains("PRIVATE") && body.iter().all(|l| !debug.contains(l)),
            "{debug}"
        );
        let (order, account) = (p.order.as_str(), p.account.as_str());
        let (digest, key) = (p.settings.as_str(), p.key.as_str());
        let broken = [
            (String::new(), "no order URL"),
            ("garbage".into(), "not an https URL"),
            (
                format!("http://ca.gw.test/o\n{account}\n{digest} 1\n{key}"),
                "https",
            ),
            (format!("{order}\n"), "no account URL"),
            (format!("{order}\n\n{digest} 1\n{key}"), "no account URL"),
            (format!("{order}\n{account}\n"), "no settings digest"),
            (
                format!("{order}\n{account}\n{} 1\n{key}", &digest[1..]),
                "digest",
            ),
            (
                format!("{order}\n{account}\nzz{} 1\n{key}", &digest[2..]),
                "digest",
            ),
            (
                format!("{order}\n{account}\n{digest}\n{key}"),
                "no time written",
            ),
            (
                format!("{order}\n{account}\n{digest} soon\n{key}"),
                "no time written",
            ),
            (
                format!("{order}\n{account}\n{digest} 1\n"),
                "no private key",
            ),
            (
                format!("{order}\n{account}\n{digest} 1\nkey"),
                "no private key",
            ),
            (
                format!(
                    "{order}\n{account}\n{digest} 1\n{}",
                    pem_for("a.gw.test", 2031).chain
                ),
                "does not load",
            ),
        ];
        for (text, want) in &broken {
            let e = Pending::parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        // Cut anywhere before the end of the key (a crash, a full disk).
        let end = text.len() - "-----END PRIVATE KEY-----\n".len();
        for at in 0..end {
            let e = Pending::parse(&text[..at]).unwrap_err();
            assert!(body.iter().all(|l| !e.contains(l)), "{at}: {e}");
        }
    }

    #[test]
    fn a_pending_order_of_other_settings_another_account_or_expired_is_not_resumed() {
        let dir = Path::new("/nonexistent");
        let cfg = cfg_in(dir);
        let p = pending_for(&cfg, "https://ca.gw.test/my-order/7");
        let now = p.written + 60;
        assert_eq!(p.unusable(&cfg, &p.account, now), None);
        // Only when to renew changed: the same order.
        let later = AcmeSettings {
            renew_before: Duration::from_secs(86_400),
            ..cfg.clone()
        };
        assert_eq!(p.unusable(&later, &p.account, now), None);
        let others = [
            AcmeSettings {
                directory: "https://other-ca.gw.test/dir".into(),
                ..cfg.clone()
            },
            AcmeSettings {
                contact: vec!["mailto:ops@gw.test".into()],
                ..cfg.clone()
            },
            AcmeSettings {
                state_dir: dir.join("other"),
                ..cfg.clone()
            },
        ];
        for other in &others {
            let why = p.unusable(other, &p.account, now).unwrap();
            assert!(why.contains("settings"), "{other:?}: {why}");
        }
        let why = p.unusable(&cfg, "https://ca.gw.test/my-account/2", now);
        assert!(why.unwrap().contains("account"));
        let kept = p.written + PENDING_KEPT.as_secs();
        assert_eq!(p.unusable(&cfg, &p.account, kept), None);
        assert!(p
            .unusable(&cfg, &p.account, kept + 1)
            .unwrap()
            .contains("expired"));
        // A clock set back since: still resumed.
        assert_eq!(p.unusable(&cfg, &p.account, p.written - 3600), None);
    }

    #[test]
    fn only_an_answer_that_the_order_is_done_with_drops_it() {
        let problem = |json: &str| {
            instant_acme::Error::Api(serde_json::from_str::<instant_acme::Problem>(json).unwrap())
        };
        let refused = [
            r#"{"type":"urn:ietf:params:acme:error:malformed","detail":"no order","status":404}"#,
            r#"{"type":"urn:ietf:params:acme:error:unauthorized","status":403}"#,
            r#"{"type":"urn:ietf:params:acme:error:orderNotReady"}"#,
            r#"{"type":"urn:ietf:params:acme:error:badCSR","status":400}"#,
        ];
        for p in refused {
            assert!(order_refused(&problem(p)), "{p}");
        }
        assert!(order_refused(&instant_acme::Error::Str(
            "invalid order state"
        )));
        let passing = [
            r#"{"type":"urn:ietf:params:acme:error:serverInternal","status":500}"#,
            r#"{"type":"about:blank","status":503}"#,
            r#"{"type":"urn:ietf:params:acme:error:rateLimited","status":429}"#,
            r#"{"type":"urn:ietf:params:acme:error:rateLimited"}"#,
        ];
        for p in passing {
            assert!(!order_refused(&problem(p)), "{p}");
        }
        assert!(!order_refused(&other("ACME request timed out")));
        assert!(!order_refused(&other("connection refused")));
    }

    /// An error answered without a problem document keeps its status (a
    /// CA that answers an order it no longer knows with a bare 404).
    #[test]
    fn an_error_without_a_problem_document_gets_one_with_its_status() {
        use http::StatusCode;
        let read = |status: StatusCode, body: &[u8]| {
            let made = problem_for(status, body).unwrap();
            serde_json::from_slice::<instant_acme::Problem>(&made).unwrap()
        };
        let p = read(StatusCode::NOT_FOUND, b"");
        assert_eq!(p.status, Some(404));
        assert!(order_refused(&instant_acme::Error::Api(p.clone())));
        assert!(p.to_string().contains("404 Not Found"), "{p}");
        let p = read(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>");
        assert_eq!(p.status, Some(502));
        assert!(!order_refused(&instant_acme::Error::Api(p)));
        assert_eq!(read(StatusCode::BAD_REQUEST, b"[1]").status, Some(400));
        // The CA's own problem document, and answers that are no error,
        // stay as they are.
        let own = br#"{"type":"urn:ietf:params:acme:error:badNonce","status":400}"#;
        assert_eq!(problem_for(StatusCode::BAD_REQUEST, own), None);
        assert_eq!(problem_for(StatusCode::OK, b""), None);
        assert_eq!(problem_for(StatusCode::CREATED, b"not json"), None);
    }

    /// A host dropped by a reload loses its pending order's record (the key
    /// of an order nobody resumes does not stay); one kept keeps it, unless
    /// the settings changed.
    #[test]
    fn a_pending_order_goes_with_its_host_or_its_settings() {
        let dir = tmpdir("pending-drop");
        let cfg = cfg_in(&dir);
        let (kept, gone) = ("kept.gw.test", "gone.gw.test");
        let write = |cfg: &AcmeSettings, h: &str| {
            save_pending(cfg, h, &pending_for(cfg, "https://ca.gw.test/my-order/1")).unwrap();
            host_dir(cfg, h).join(PENDING_FILE)
        };
        let st = AcmeState::default();
        st.set_wanted(
            Some(cfg.clone()),
            vec![kept.into(), gone.into()],
            Vec::new(),
        );
        let (k, g) = (write(&cfg, kept), write(&cfg, gone));
        let mode = std::fs::metadata(&k).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077, 0);
        st.set_wanted(Some(cfg.clone()), vec![kept.into()], Vec::new());
        assert!(k.exists());
        assert!(!g.exists());
        // Only `renew_before` changed: kept.
        let later = AcmeSettings {
            renew_before: Duration::from_secs(86_400),
            ..cfg.clone()
        };
        st.set_wanted(Some(later.clone()), vec![kept.into()], Vec::new());
        assert!(k.exists());
        // Other settings: gone, also for a host still wanted.
        let other = AcmeSettings {
            contact: vec!["mailto:ops@gw.test".into()],
            ..later.clone()
        };
        st.set_wanted(Some(other.clone()), vec![kept.into()], Vec::new());
        assert!(!k.exists());
        // ACME turned off.
        let k = write(&other, kept);
        st.set_wanted(None, vec![kept.into()], Vec::new());
        assert!(!k.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A certificate there and not due (loaded, or taken from the mesh)
    /// makes an order still waiting for its certificate useless: its record
    /// goes, with no order.
    #[tokio::test]
    async fn a_pending_order_goes_once_the_host_has_a_certificate_not_due() {
        let dir = tmpdir("pending-not-due");
        let (port, orders) = counting_ca().await;
        let cfg = cfg_at(&dir, port);
        let host = "shop.gw.test";
        save_issued(&cfg, host, &pem_for(host, 2031)).unwrap();
        save_pending(
            &cfg,
            host,
            &pending_for(&cfg, "https://ca.gw.test/my-order/1"),
        )
        .unwrap();
        let file = host_dir(&cfg, host).join(PENDING_FILE);
        assert!(file.exists());
        let st = AcmeState::default();
        st.set_wanted(Some(cfg.clone()), vec![host.to_string()], Vec::new());
        round(&st, &mut Rounds::default()).await;
        assert!(st.cert(host).is_some());
        assert!(!file.exists());
        assert_eq!(orders.load(std::sync::atomic::Ordering::SeqCst), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Debian's `pebble` on loopback (the tests using it are skipped when
    /// it is not installed), validating every challenge without looking:
    /// what these tests are about comes after validation. Killed when
    /// dropped.
    struct Pebble {
        child: std::process::Child,
        dir_url: String,
        ca: PathBuf,
        log: PathBuf,
    }

    impl Drop for Pebble {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Pebble {
        /// How many requests its log shows that start with `what`.
        fn count(&self, what: &str) -> usize {
            std::fs::read_to_string(&self.log)
                .unwrap()
                .matches(what)
                .count()
        }

        /// Settings ordering from it, with `state_dir` in `dir`.
        fn cfg(&self, dir: &Path) -> AcmeSettings {
            AcmeSettings {
                directory: self.dir_url.clone(),
                directory_ca: Some(self.ca.clone()),
                ..cfg_in(&dir.join("state"))
            }
        }
    }

    const PEBBLE: &str = "/usr/bin/pebble";

    async fn pebble(dir: &Path) -> Option<Pebble> {
        if !Path::new(PEBBLE).exists() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "pebble is missing but CI=true: install Debian's pebble package"
            );
            eprintln!("pebble not installed; skipping");
            return None;
        }
        // Started again on other ports when it exits before listening (a
        // port found free was taken meanwhile).
        for _ in 0..3 {
            if let Some(p) = try_pebble(dir).await {
                return Some(p);
            }
        }
        panic!(
            "pebble exited before listening, three times (see {})",
            dir.display()
        );
    }

    async fn try_pebble(dir: &Path) -> Option<Pebble> {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let tls = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        let ca = dir.join("pebble-tls.pem");
        std::fs::write(&ca, tls.cert.pem()).unwrap();
        std::fs::write(dir.join("pebble-key.pem"), tls.key_pair.serialize_pem()).unwrap();
        let (acme, mgmt) = (free(), free());
        let conf = serde_json::json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{acme}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": ca,
            "privateKey": dir.join("pebble-key.pem"),
            "httpPort": free(),
            "tlsPort": free(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false
        }});
        std::fs::write(dir.join("pebble.json"), conf.to_string()).unwrap();
        let log = dir.join("pebble.log");
        let mut p = Pebble {
            child: std::process::Command::new(PEBBLE)
                .arg("-config")
                .arg(dir.join("pebble.json"))
                .env("PEBBLE_VA_ALWAYS_VALID", "1")
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .env("PEBBLE_AUTHZREUSE", "0")
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(std::fs::File::create(dir.join("pebble.err")).unwrap())
                .spawn()
                .unwrap(),
            dir_url: format!("https://127.0.0.1:{acme}/dir"),
            ca,
            log,
        };
        let t0 = std::time::Instant::now();
        while TcpStream::connect(("127.0.0.1", acme)).await.is_err() {
            if p.child.try_wait().ok().flatten().is_some() {
                return None;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "pebble never listened"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(p)
    }

    const NEW_ORDER: &str = "POST /order-plz";
    const FINALIZE: &str = "POST /finalize-order/";

    /// Orders `host` from `p` in a round that `stop`s; then, after `edit`
    /// changed its pending order's record, tries again as after a restart
    /// (the wait after the failed try ended by deleting its `retry` file,
    /// as an operator does). The record as it was after the first round,
    /// and the state after the second.
    async fn stopped_then_again(
        p: &Pebble,
        cfg: &AcmeSettings,
        host: &str,
        stop: TestStop,
        edit: impl FnOnce(&Path),
    ) -> (Pending, AcmeState) {
        let orders = p.count(NEW_ORDER);
        let st = AcmeState::default();
        st.set_wanted(Some(cfg.clone()), vec![host.to_string()], Vec::new());
        *st.test_stop.lock() = Some(stop);
        round(&st, &mut Rounds::default()).await;
        assert!(st.cert(host).is_none());
        let e = st.failures.read().get(host).unwrap().0.clone();
        assert!(e.contains("stopped by the test"), "{e}");
        assert_eq!(p.count(NEW_ORDER), orders + 1);
        let file = host_dir(cfg, host).join(PENDING_FILE);
        let mode = std::fs::metadata(&file).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077, 0);
        let record = Pending::parse(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert!(
            record.order.starts_with(&p.dir_url.replace("/dir", "/")),
            "{record:?}"
        );
        edit(&file);
        std::fs::remove_file(host_dir(cfg, host).join(RETRY_FILE)).unwrap();
        let st = AcmeState::default();
        st.set_wanted(Some(cfg.clone()), vec![host.to_string()], Vec::new());
        round(&st, &mut Rounds::default()).await;
        assert!(
            st.cert(host).is_some(),
            "{:?}",
            st.failures.read().get(host)
        );
        assert!(st.failures.read().is_empty());
        assert!(!host_dir(cfg, host).join(RETRY_FILE).exists());
        assert!(
            !file.exists(),
            "the record goes with the installed certificate"
        );
        (record, st)
    }

    #[tokio::test]
    async fn an_order_stopped_after_finalize_gives_its_certificate_to_the_next_try() {
        let dir = tmpdir("pending-finalized");
        let Some(p) = pebble(&dir).await else { return };
        let cfg = p.cfg(&dir);
        let host = "site.gw.test";
        let (record, _) = stopped_then_again(&p, &cfg, host, TestStop::AfterFinalize, |_| {}).await;
        assert_eq!(p.count(NEW_ORDER), 1, "no new order");
        assert_eq!(p.count(FINALIZE), 1, "finalized once");
        // The certificate is the stored key's.
        let stored = stored_pem(&cfg, host).unwrap();
        assert_eq!(stored.key, *record.key);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_order_stopped_before_finalize_is_finalized_with_the_stored_key() {
        let dir = tmpdir("pending-ready");
        let Some(p) = pebble(&dir).await else { return };
        let cfg = p.cfg(&dir);
        let host = "site.gw.test";
        let (record, _) =
            stopped_then_again(&p, &cfg, host, TestStop::BeforeFinalize, |_| {}).await;
        assert_eq!(p.count(NEW_ORDER), 1, "no new order");
        assert_eq!(p.count(FINALIZE), 1, "finalized by the second try");
        assert_eq!(stored_pem(&cfg, host).unwrap().key, *record.key);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A record whose order gives nothing usable (its certificate is not
    /// for the stored key, the CA no longer knows it, the file is cut
    /// short) goes, and a new order follows in the same try.
    #[tokio::test]
    async fn a_pending_order_that_gives_no_usable_certificate_is_ordered_anew() {
        let dir = tmpdir("pending-useless");
        let Some(p) = pebble(&dir).await else { return };
        let cfg = p.cfg(&dir);
        let other_key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let rewrite = |f: &Path, change: &dyn Fn(&mut Pending)| {
            let mut r = Pending::parse(&std::fs::read_to_string(f).unwrap()).unwrap();
            change(&mut r);
            std::fs::write(f, r.text().as_bytes()).unwrap();
        };
        let hosts = ["another-key.gw.test", "gone.gw.test", "cut.gw.test"];
        for (n, host) in hosts.into_iter().enumerate() {
            let edit = |f: &Path| match n {
                0 => rewrite(f, &|r: &mut Pending| r.key = other_key.clone().into()),
                1 => rewrite(f, &|r: &mut Pending| r.order.push_str("-no-such-order")),
                _ => {
                    let t = std::fs::read_to_string(f).unwrap();
                    std::fs::write(f, &t[..t.len() / 2]).unwrap();
                }
            };
            let (record, _) =
                stopped_then_again(&p, &cfg, host, TestStop::AfterFinalize, edit).await;
            assert_eq!(p.count(NEW_ORDER), 2 * (n + 1), "{host}: ordered anew");
            let stored = stored_pem(&cfg, host).unwrap();
            assert_ne!(stored.key, *record.key, "{host}");
            assert_ne!(stored.key, other_key, "{host}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
