//! Automatic certificates with ACME (RFC 8555) through `instant-acme`: HTTP-01
//! (answered on the HTTP listeners under `/.well-known/acme-challenge/`) and
//! TLS-ALPN-01 (RFC 8737, answered on the TLS listeners to `acme-tls/1`
//! ClientHellos). Certificates and the account live in a state directory and
//! survive restarts; a certificate is renewed `renew_before` ahead of expiry.
//!
//! The [`AcmeState`] is shared by every proxy generation: the HTTP and TLS
//! paths read its challenge tables and certificates, the manager task
//! ([`spawn_manager`]) fills them.

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
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

/// The ALPN protocol of TLS-ALPN-01 validation connections.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// Path prefix of HTTP-01 challenges.
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// Challenge answers and issued certificates, shared with the listeners.
#[derive(Default)]
pub struct AcmeState {
    http01: RwLock<HashMap<String, String>>,
    alpn01: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    certs: RwLock<HashMap<String, (Arc<CertifiedKey>, u64)>>,
    wanted: RwLock<(Option<AcmeSettings>, Vec<String>)>,
    kick: Arc<Notify>,
}

impl AcmeState {
    /// The key authorization for an HTTP-01 `token`.
    pub fn http01(&self, token: &str) -> Option<String> {
        self.http01.read().get(token).cloned()
    }
    /// The TLS-ALPN-01 validation certificate for `host`.
    pub fn alpn01(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        self.alpn01.read().get(host).cloned()
    }
    /// The issued certificate for `host`.
    pub fn cert(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        self.certs.read().get(host).map(|(k, _)| k.clone())
    }
    /// Expiry (Unix seconds) of the certificate for `host`.
    pub fn not_after(&self, host: &str) -> Option<u64> {
        self.certs.read().get(host).map(|(_, t)| *t)
    }
    /// Sets what the manager should keep certificates for, and wakes it.
    pub fn set_wanted(&self, settings: Option<AcmeSettings>, hosts: Vec<String>) {
        *self.wanted.write() = (settings, hosts);
        self.kick.notify_one();
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
    let (_, _, after) = der_tlv(validity)?;
    let (tag, v, _) = der_tlv(after)?;
    der_time(tag, v)
}

// ------------------------------------------------------------ HTTP client

/// HTTPS to the ACME server, trusting `directory_ca` (or the system bundle).
struct AcmeHttp {
    tls: tokio_rustls::TlsConnector,
}

impl AcmeHttp {
    fn new(ca: Option<&Path>) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        let file = ca
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt"));
        use rustls::pki_types::pem::PemObject;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&file)
            .map_err(|e| format!("acme directory_ca {}: {e}", file.display()))?
            .filter_map(Result::ok)
            .collect();
        for c in certs {
            let _ = roots.add(c);
        }
        if roots.is_empty() {
            return Err(format!(
                "acme directory_ca {}: no usable certificate",
                file.display()
            ));
        }
        let cfg = rustls::ClientConfig::builder_with_provider(crate::proxy::upstream::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(AcmeHttp {
            tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
        })
    }
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
                Ok(BytesResponse::from(resp))
            };
            tokio::time::timeout(Duration::from_secs(30), work)
                .await
                .unwrap_or_else(|_| Err(other("ACME request timed out")))
        })
    }
}

// ------------------------------------------------------------ files

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn host_dir(cfg: &AcmeSettings, host: &str) -> PathBuf {
    cfg.state_dir.join("certs").join(host)
}

/// Loads a stored certificate for `host`; `None` if missing or unreadable.
fn load_stored(cfg: &AcmeSettings, host: &str) -> Option<(Arc<CertifiedKey>, u64)> {
    let dir = host_dir(cfg, host);
    let files = crate::proxy::settings::CertFiles {
        cert: dir.join("fullchain.pem"),
        key: dir.join("key.pem"),
    };
    if !files.cert.exists() {
        return None;
    }
    match crate::proxy::tls::load_certified_key(&files) {
        Ok(k) => {
            let na = k.cert.first().and_then(|c| cert_not_after(c))?;
            Some((Arc::new(k), na))
        }
        Err(e) => {
            warn!(host, error = %e, "stored ACME certificate unusable; ordering a new one");
            None
        }
    }
}

async fn account(cfg: &AcmeSettings) -> Result<Account, String> {
    let path = cfg.state_dir.join("account.json");
    let http = || -> Result<Box<dyn HttpClient>, String> {
        Ok(Box::new(AcmeHttp::new(cfg.directory_ca.as_deref())?))
    };
    if let Ok(text) = std::fs::read(&path) {
        if let Ok(creds) = serde_json::from_slice::<AccountCredentials>(&text) {
            match Account::from_credentials_and_http(creds, http()?).await {
                Ok(a) => return Ok(a),
                Err(e) => warn!(error = %e, "stored ACME account unusable; creating a new one"),
            }
        }
    }
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
    let json = serde_json::to_vec(&creds).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&cfg.state_dir)
        .map_err(|e| format!("{}: {e}", cfg.state_dir.display()))?;
    write_private(&path, &json).map_err(|e| format!("{}: {e}", path.display()))?;
    info!(directory = %cfg.directory, "ACME account created");
    Ok(acct)
}

fn alpn_cert(host: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    crate::proxy::tls::self_signed(
        host,
        vec![rcgen::CustomExtension::new_acme_identifier(digest)],
    )
}

/// Orders, validates and stores a certificate for `host`.
async fn issue(state: &AcmeState, cfg: &AcmeSettings, host: &str) -> Result<(), String> {
    let acct = account(cfg).await?;
    let ids = [Identifier::Dns(host.to_string())];
    let mut order = acct
        .new_order(&NewOrder { identifiers: &ids })
        .await
        .map_err(|e| format!("new order: {e}"))?;
    let want = match cfg.challenge {
        AcmeChallenge::Http01 => ChallengeType::Http01,
        AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
    };
    let authz = order
        .authorizations()
        .await
        .map_err(|e| format!("authorizations: {e}"))?;
    let mut tokens = Vec::new();
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
        match cfg.challenge {
            AcmeChallenge::Http01 => {
                state
                    .http01
                    .write()
                    .insert(ch.token.clone(), ka.as_str().to_string());
                tokens.push(ch.token.clone());
            }
            AcmeChallenge::TlsAlpn01 => {
                let c = alpn_cert(host, ka.digest().as_ref())?;
                state.alpn01.write().insert(host.to_string(), c);
            }
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
    for t in &tokens {
        state.http01.write().remove(t);
    }
    state.alpn01.write().remove(host);
    result?;

    let kp = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params =
        rcgen::CertificateParams::new(vec![host.to_string()]).map_err(|e| e.to_string())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&kp).map_err(|e| e.to_string())?;
    if order.state().status == OrderStatus::Ready {
        order
            .finalize(csr.der())
            .await
            .map_err(|e| format!("finalize: {e}"))?;
    }
    let mut delay = Duration::from_millis(250);
    let chain = loop {
        match order
            .certificate()
            .await
            .map_err(|e| format!("certificate: {e}"))?
        {
            Some(c) => break c,
            None => {
                if delay > Duration::from_secs(20) {
                    return Err("certificate not issued in time".into());
                }
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    };
    let dir = host_dir(cfg, host);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    write_private(&dir.join("key.pem"), kp.serialize_pem().as_bytes())
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    write_private(&dir.join("fullchain.pem"), chain.as_bytes())
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let (k, na) = load_stored(cfg, host).ok_or("the issued certificate does not load")?;
    state.certs.write().insert(host.to_string(), (k, na));
    info!(host, not_after = na, "ACME certificate issued");
    Ok(())
}

/// Keeps certificates for the wanted hosts: loads stored ones, orders missing
/// or expiring ones, retries failures with backoff. Ends with the state.
pub fn spawn_manager(state: &Arc<AcmeState>) {
    let weak = Arc::downgrade(state);
    tokio::spawn(async move {
        let mut retry_at: HashMap<String, (tokio::time::Instant, Duration)> = HashMap::new();
        loop {
            let Some(state) = weak.upgrade() else { return };
            let (cfg, hosts) = state.wanted.read().clone();
            let mut next = Duration::from_secs(60);
            if let Some(cfg) = cfg {
                for host in hosts {
                    let renew_at = |na: u64| na.saturating_sub(cfg.renew_before.as_secs());
                    if state.cert(&host).is_none() {
                        if let Some((k, na)) = load_stored(&cfg, &host) {
                            debug!(host = %host, not_after = na, "ACME certificate loaded from disk");
                            state.certs.write().insert(host.clone(), (k, na));
                        }
                    }
                    let due = state
                        .not_after(&host)
                        .is_none_or(|na| now_unix() >= renew_at(na));
                    if !due {
                        continue;
                    }
                    let now = tokio::time::Instant::now();
                    if let Some((at, _)) = retry_at.get(&host) {
                        if *at > now {
                            next = next.min(*at - now);
                            continue;
                        }
                    }
                    let renewing = state.cert(&host).is_some();
                    info!(host = %host, renewing, "ordering an ACME certificate");
                    match issue(&state, &cfg, &host).await {
                        Ok(()) => {
                            retry_at.remove(&host);
                        }
                        Err(e) => {
                            let back = retry_at
                                .get(&host)
                                .map_or(Duration::from_secs(5), |(_, b)| {
                                    (*b * 2).min(Duration::from_secs(3600))
                                });
                            warn!(host = %host, error = %e, retry_in = ?back, "ACME order failed");
                            retry_at
                                .insert(host.clone(), (tokio::time::Instant::now() + back, back));
                            next = next.min(back);
                        }
                    }
                }
            }
            let kick = state.kick.clone();
            drop(state);
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = kick.notified() => {}
            }
        }
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
}
