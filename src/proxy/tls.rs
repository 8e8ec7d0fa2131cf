//! TLS on the :443 listeners: reading the ClientHello (with a deadline and the
//! size cap) to route on SNI, TLS alerts for refusals, and the per-name
//! certificate resolver for terminated routes.

use crate::proxy::detect::{parse_client_hello, SniError, MAX_CLIENT_HELLO_LEN};
use crate::proxy::names::DomainName;
use crate::proxy::settings::CertFiles;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// TLS 1.2-framed fatal `unrecognized_name` (112) alert.
pub const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];
/// Fatal `decode_error` (50) alert, for a malformed ClientHello.
pub const ALERT_DECODE_ERROR: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32];
/// Fatal `internal_error` (80) alert.
pub const ALERT_INTERNAL_ERROR: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x50];
/// Fatal `access_denied` (49): the client's address is not admitted.
pub const ALERT_ACCESS_DENIED: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];

/// The outcome of reading a ClientHello.
#[derive(Debug)]
pub enum Hello {
    /// A complete ClientHello; `bytes` is everything read (to replay), `sni` the
    /// server name if any.
    Ok {
        /// All bytes read from the client so far.
        bytes: Vec<u8>,
        /// The SNI host name.
        sni: Option<DomainName>,
        /// The client offers ALPN `acme-tls/1` (a TLS-ALPN-01 validation).
        acme_alpn: bool,
        /// The client offers ALPN [`crate::carrier::ALPN`]: a node carrying
        /// its tunnel over TLS.
        carrier: bool,
    },
    /// Not a ClientHello (or a broken one).
    Bad(SniError),
    /// The deadline passed first.
    Timeout,
    /// The client closed or the read failed.
    Closed,
}

/// Reads from `s` until [`parse_client_hello`] gives a final answer, for at most
/// `deadline` and [`MAX_CLIENT_HELLO_LEN`] (plus one read) bytes.
pub async fn read_client_hello<S: AsyncRead + Unpin>(s: &mut S, deadline: Duration) -> Hello {
    let mut buf = Vec::with_capacity(2048);
    // The parser's lower bound on the bytes still missing: no parse before
    // they are here (a hello in many tiny segments is not parsed per byte).
    let mut want = 0;
    let work = async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return Hello::Closed,
                Ok(n) => n,
            };
            buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
            if buf.len() < want {
                continue;
            }
            match parse_client_hello(&buf) {
                Ok(info) => {
                    let sni = info.server_name().cloned();
                    let acme_alpn = info.offers_alpn(crate::proxy::acme::ACME_TLS_ALPN);
                    let carrier = info.offers_alpn(crate::carrier::ALPN);
                    return Hello::Ok {
                        bytes: std::mem::take(&mut buf),
                        sni,
                        acme_alpn,
                        carrier,
                    };
                }
                Err(SniError::Incomplete { needed }) if buf.len() <= MAX_CLIENT_HELLO_LEN + 5 => {
                    want = buf.len() + needed.unwrap_or(1);
                }
                Err(SniError::Incomplete { .. }) => {
                    return Hello::Bad(SniError::TooLarge {
                        limit: MAX_CLIENT_HELLO_LEN,
                    })
                }
                Err(e) => return Hello::Bad(e),
            }
        }
    };
    tokio::time::timeout(deadline, work)
        .await
        .unwrap_or(Hello::Timeout)
}

/// Sends `alert` and closes the write side; errors are ignored (the client may be gone).
pub async fn send_alert<S: AsyncWrite + Unpin>(s: &mut S, alert: &[u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = s.write_all(alert).await;
        let _ = s.shutdown().await;
    })
    .await;
}

/// Loads a PEM chain and key into a signing key. Errors name the files, never the key.
pub fn load_certified_key(files: &CertFiles) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| format!("cert {}: {e}", files.cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cert {}: {e}", files.cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "cert {}: no PEM certificate found",
            files.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("key {}: no usable private key ({e})", files.key.display()))?;
    let provider = crate::proxy::upstream::provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("key {}: unsupported private key: {e}", files.key.display()))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|e| {
        format!(
            "cert {} and key {} do not match: {e}",
            files.cert.display(),
            files.key.display()
        )
    })?;
    Ok(ck)
}

/// Loads a PEM chain and key given as bytes (a certificate shared through the
/// mesh). Errors never show the key.
pub fn certified_key_from_pem(chain: &[u8], key: &[u8]) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate chain: {e}"))?;
    if chain.is_empty() {
        return Err("no PEM certificate found".into());
    }
    let key =
        PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("no usable private key ({e})"))?;
    let signing = crate::proxy::upstream::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("unsupported private key: {e}"))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()
        .map_err(|e| format!("certificate and key do not match: {e}"))?;
    Ok(ck)
}

/// Picks the certificate by SNI among the terminated routes' hosts.
#[derive(Default)]
pub struct SniResolver {
    certs: HashMap<String, Arc<CertifiedKey>>,
    acme: Option<Arc<crate::proxy::acme::AcmeState>>,
}

impl std::fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SniResolver")
            .field("names", &self.certs.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SniResolver {
    /// Serves `key` for `host`.
    pub fn insert(&mut self, host: &DomainName, key: Arc<CertifiedKey>) {
        self.certs.insert(host.as_str().to_string(), key);
    }
    /// Falls back to ACME certificates for names without a file certificate.
    pub fn with_acme(mut self, acme: Arc<crate::proxy::acme::AcmeState>) -> Self {
        self.acme = Some(acme);
        self
    }
    /// True if `host` has a certificate.
    pub fn has(&self, host: &DomainName) -> bool {
        self.certs.contains_key(host.as_str())
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        let name = DomainName::parse(name).ok()?;
        self.certs
            .get(name.as_str())
            .cloned()
            .or_else(|| self.acme.as_ref()?.cert(name.as_str()))
    }
}

/// The server config of every terminated route: SNI resolver, ALPN h2 and http/1.1.
pub fn server_config(resolver: SniResolver) -> Result<rustls::ServerConfig, String> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(crate::proxy::upstream::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Presents one certificate whatever the client asks for.
#[derive(Debug)]
struct One(Arc<CertifiedKey>);

impl ResolvesServerCert for One {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A server config presenting `key` (TLS-terminated TCP forwards; no ALPN).
pub fn single_cert_config(key: Arc<CertifiedKey>) -> Result<rustls::ServerConfig, String> {
    Ok(
        rustls::ServerConfig::builder_with_provider(crate::proxy::upstream::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(One(key))),
    )
}

/// Presents the ACME certificate of one name whatever the client asks for
/// (the current one at each handshake, so renewals take effect at once).
struct AcmeOne {
    acme: Arc<crate::proxy::acme::AcmeState>,
    name: String,
}

impl std::fmt::Debug for AcmeOne {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeOne").field("name", &self.name).finish()
    }
}

impl ResolvesServerCert for AcmeOne {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.acme.cert(&self.name)
    }
}

/// A server config presenting the ACME certificate of `name` (TLS-terminated
/// TCP forwards with `acme`; until it is issued, handshakes fail).
pub fn acme_cert_config(
    acme: Arc<crate::proxy::acme::AcmeState>,
    name: &DomainName,
) -> Result<rustls::ServerConfig, String> {
    Ok(
        rustls::ServerConfig::builder_with_provider(crate::proxy::upstream::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(AcmeOne {
                acme,
                name: name.as_str().to_string(),
            })),
    )
}

/// A server config that answers one TLS-ALPN-01 validation with `key`.
pub fn acme_alpn_config(key: Arc<CertifiedKey>) -> Result<rustls::ServerConfig, String> {
    one_cert_config(key, crate::proxy::acme::ACME_TLS_ALPN)
}

/// TLS 1.3 with `key` for every name, agreeing only on ALPN `alpn`.
pub fn one_cert_config(
    key: Arc<CertifiedKey>,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, String> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(crate::proxy::upstream::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(One(key)));
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// A fresh key and a self-signed certificate for `host`, with `extensions`.
pub fn self_signed(
    host: &str,
    extensions: Vec<rcgen::CustomExtension>,
) -> Result<Arc<CertifiedKey>, String> {
    let mut p = rcgen::CertificateParams::new(vec![host.to_string()]).map_err(|e| e.to_string())?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.custom_extensions = extensions;
    let kp = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = p.self_signed(&kp).map_err(|e| e.to_string())?;
    let key = crate::proxy::upstream::provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(kp.serialize_der().into()))
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(CertifiedKey::new(vec![cert.der().clone()], key)))
}
