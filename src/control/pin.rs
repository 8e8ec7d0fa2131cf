//! The admin API's TLS identity and certificate pinning.
//!
//! The hub's API on TCP uses a self-signed certificate ([`ApiCert`]), kept in
//! the state directory so its SHA-256 fingerprint stays the same across
//! restarts: join tokens carry that fingerprint. Clients
//! ([`pinned_client_config`]) accept exactly the certificate with that
//! fingerprint and ignore names and validity dates, but still verify the
//! handshake signatures, so only the holder of the private key passes.

use anyhow::Context as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// Certificate file in the state directory.
pub const CERT_FILE: &str = "api-cert.pem";
/// Private key file in the state directory (mode 0600).
pub const KEY_FILE: &str = "api-key.pem";
/// Subject name of a certificate made without names.
const DEFAULT_NAME: &str = "gatewire-api";

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn provider() -> Arc<CryptoProvider> {
    crate::proxy::upstream::provider()
}

/// The hub API's certificate and key.
#[derive(Clone)]
pub struct ApiCert {
    cert: CertificateDer<'static>,
    fp: [u8; 32],
    server: Arc<rustls::ServerConfig>,
}

impl fmt::Debug for ApiCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiCert")
            .field("fingerprint", &self.fingerprint_hex())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Writes `data` to `path` atomically: a temporary file with `mode`, fsync,
/// rename, fsync of the directory.
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    let r = f
        .write_all(data)
        .and_then(|_| f.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r?;
    // Renamed: the new file is the one in place, whatever follows. A
    // directory that cannot be synced (some network and FUSE file systems)
    // only makes the rename less durable against a power cut; an error now
    // would have callers undo a write that was made.
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), error = %e, "file written, but its directory could not be synced");
    }
    Ok(())
}

fn create_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

impl ApiCert {
    /// Loads `api-cert.pem` and `api-key.pem` from `state_dir`, or creates a
    /// new self-signed certificate for `names` (DNS names or IP addresses; its
    /// subject alternative names) when neither exists. A key without a
    /// certificate (an interrupted creation) is replaced; a certificate
    /// without its key is an error, since tokens may carry its fingerprint.
    /// Callers in one process take turns: at a hub's start the admin API's
    /// TCP listener and a first `status` or `token create` on the control
    /// socket may both find no certificate, and two creations would leave
    /// the listener serving one certificate while tokens carry the other.
    pub fn load_or_create(state_dir: &Path, names: &[String]) -> anyhow::Result<ApiCert> {
        static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = TURN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let cert_path = state_dir.join(CERT_FILE);
        let key_path = state_dir.join(KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Self::load(&cert_path, &key_path),
            (true, false) => anyhow::bail!(
                "{} exists without {}: restore the key, or remove the certificate to make a \
                 new one (join tokens issued for the old one will no longer work)",
                cert_path.display(),
                key_path.display()
            ),
            _ => {
                create_dir(state_dir)
                    .with_context(|| format!("creating {}", state_dir.display()))?;
                Self::create(&cert_path, &key_path, names)
            }
        }
    }

    fn create(cert_path: &Path, key_path: &Path, names: &[String]) -> anyhow::Result<ApiCert> {
        let names: Vec<String> = if names.is_empty() {
            vec![DEFAULT_NAME.to_string()]
        } else {
            names.to_vec()
        };
        let mut params = rcgen::CertificateParams::new(names.clone())
            .with_context(|| format!("API certificate names {names:?}"))?;
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "gatewire API");
        params.distinguished_name = dn;
        let kp = rcgen::KeyPair::generate().context("generating the API key")?;
        let cert = params
            .self_signed(&kp)
            .context("making the API certificate")?;
        let key_pem = zeroize::Zeroizing::new(kp.serialize_pem());
        // Key first: a crash before the certificate is written leaves a key
        // alone, which the next start replaces.
        write_atomic(key_path, key_pem.as_bytes(), 0o600)
            .with_context(|| format!("writing {}", key_path.display()))?;
        write_atomic(cert_path, cert.pem().as_bytes(), 0o644)
            .with_context(|| format!("writing {}", cert_path.display()))?;
        Self::from_der(
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(kp.serialize_der().into()),
        )
        .context("the new API certificate")
    }

    fn load(cert_path: &Path, key_path: &Path) -> anyhow::Result<ApiCert> {
        let cert = CertificateDer::from_pem_file(cert_path)
            .with_context(|| format!("reading {}", cert_path.display()))?;
        let key = PrivateKeyDer::from_pem_file(key_path)
            .with_context(|| format!("reading {}", key_path.display()))?;
        Self::from_der(cert, key).with_context(|| {
            format!(
                "{} and {} do not belong together",
                cert_path.display(),
                key_path.display()
            )
        })
    }

    fn from_der(
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
    ) -> anyhow::Result<Self> {
        let p = provider();
        let ck = CertifiedKey::from_der(vec![cert.clone()], key, &p)?;
        let mut server = rustls::ServerConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(ck)));
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ApiCert {
            fp: sha256(&cert),
            cert,
            server: Arc::new(server),
        })
    }

    /// SHA-256 of the certificate (DER): what join tokens carry.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fp
    }

    /// [`ApiCert::fingerprint`] in lowercase hex.
    pub fn fingerprint_hex(&self) -> String {
        hex::encode(self.fp)
    }

    /// The certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// TLS server config for the API listener (ALPN `http/1.1`).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }
}

/// The presented certificate is not the pinned one.
struct PinMismatch {
    got: [u8; 32],
}

// rustls shows this error with `Debug`: make that the readable message.
impl fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the server's certificate has SHA-256 {}, not the pinned fingerprint",
            hex::encode(self.got)
        )
    }
}

impl std::error::Error for PinMismatch {}

/// Accepts exactly the certificate whose SHA-256 is `fp`.
#[derive(Debug)]
struct Pinned {
    fp: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = sha256(end_entity);
        if got == self.fp {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch { got }))),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS client config that trusts only the certificate whose SHA-256 is
/// `fp` (names and dates are not checked; handshake signatures are). ALPN
/// `http/1.1`.
pub fn pinned_client_config(fp: [u8; 32]) -> Arc<rustls::ClientConfig> {
    let p = provider();
    let builder = match rustls::ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
    {
        Ok(b) => b,
        // The ring provider supports both default versions; kept total anyway.
        Err(_) => rustls::ClientConfig::builder_with_protocol_versions(rustls::DEFAULT_VERSIONS),
    };
    let mut cfg = builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned { fp, provider: p }))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// The TLS server name to send to `api` (`host:port`): its host when that is
/// a DNS name or an IP address, else a fixed name. The pinned verifier
/// ignores it either way.
pub fn server_name(api: &str) -> ServerName<'static> {
    let host = api.rsplit_once(':').map_or(api, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .or_else(|_| ServerName::try_from(DEFAULT_NAME))
        .unwrap_or(ServerName::IpAddress(
            std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST).into(),
        ))
}

/// Opens TCP to `api` (`host:port`, resolved) and a TLS session that accepts
/// only the certificate with SHA-256 `fp`, within `timeout`.
pub async fn connect(
    api: &str,
    fp: [u8; 32],
    timeout: Duration,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let work = async {
        let tcp = TcpStream::connect(api)
            .await
            .with_context(|| format!("connecting to {api}"))?;
        let _ = tcp.set_nodelay(true);
        tokio_rustls::TlsConnector::from(pinned_client_config(fp))
            .connect(server_name(api), tcp)
            .await
            .with_context(|| format!("TLS with {api}"))
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("{api}: no answer within {timeout:?}")))
}

/// Where the certificate and key of `state_dir` live.
pub fn paths(state_dir: &Path) -> (PathBuf, PathBuf) {
    (state_dir.join(CERT_FILE), state_dir.join(KEY_FILE))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "gatewire-pin-{tag}-{}-{}",
            std::process::id(),
            hex::encode(sha256(
                format!("{:?}", std::time::Instant::now()).as_bytes()
            ))
            .get(..8)
            .unwrap_or("x")
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn concurrent_callers_get_one_certificate() {
        let d = tmpdir("concurrent");
        let fps: Vec<[u8; 32]> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| ApiCert::load_or_create(&d, &[]).unwrap().fingerprint()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let on_disk = ApiCert::load_or_create(&d, &[]).unwrap().fingerprint();
        assert!(fps.iter().all(|f| *f == on_disk), "one certificate for all");
    }

    #[test]
    fn created_once_then_loaded() {
        use std::os::unix::fs::PermissionsExt;
        let d = tmpdir("create");
        let a =
            ApiCert::load_or_create(&d, &["hub.example.org".into(), "203.0.113.1".into()]).unwrap();
        let (cert, key) = paths(&d);
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(a.fingerprint(), sha256(a.cert_der()));
        assert_eq!(a.fingerprint_hex().len(), 64);
        let b = ApiCert::load_or_create(&d, &[]).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        let dbg = format!("{b:?}");
        let key_pem = std::fs::read_to_string(&key).unwrap();
        assert!(!dbg.contains("PRIVATE"), "{dbg}");
        assert!(key_pem.contains("PRIVATE KEY"));
        // A key left alone (interrupted creation) is replaced.
        std::fs::remove_file(&cert).unwrap();
        let c = ApiCert::load_or_create(&d, &[]).unwrap();
        assert_ne!(c.fingerprint(), a.fingerprint());
        // A certificate without its key is refused.
        std::fs::remove_file(&key).unwrap();
        let e = ApiCert::load_or_create(&d, &[]).unwrap_err().to_string();
        assert!(e.contains(KEY_FILE), "{e}");
        // A key that does not match the certificate is refused.
        let other = tmpdir("other");
        ApiCert::load_or_create(&other, &[]).unwrap();
        std::fs::copy(other.join(KEY_FILE), &key).unwrap();
        let e = format!("{:#}", ApiCert::load_or_create(&d, &[]).unwrap_err());
        assert!(e.contains("do not belong together"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::remove_dir_all(&other);
    }

    async fn handshake(
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> Result<Vec<u8>, String> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let srv = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            if let Ok(mut s) = tokio_rustls::TlsAcceptor::from(server).accept(tcp).await {
                let _ = s.write_all(b"hello").await;
                let _ = s.shutdown().await;
            }
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let r = async {
            let mut s = tokio_rustls::TlsConnector::from(client)
                .connect(server_name("gatewire.invalid:1"), tcp)
                .await
                .map_err(|e| e.to_string())?;
            let alpn = s.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
            Ok(buf)
        }
        .await;
        let _ = srv.await;
        r
    }

    #[tokio::test]
    async fn pinned_handshake() {
        let d = tmpdir("tls");
        let a = ApiCert::load_or_create(&d, &["hub.example.org".into()]).unwrap();
        // TLS 1.3 (the default) with the right pin.
        let got = handshake(a.server_config(), pinned_client_config(a.fingerprint())).await;
        assert_eq!(got.unwrap(), b"hello");
        // A wrong pin fails, naming the fingerprint seen.
        let mut wrong = a.fingerprint();
        wrong[0] ^= 1;
        let e = handshake(a.server_config(), pinned_client_config(wrong))
            .await
            .unwrap_err();
        assert!(e.contains(&a.fingerprint_hex()), "{e}");
        // TLS 1.2 only on the server: the 1.2 signature path.
        let d2 = tmpdir("tls12");
        let b = ApiCert::load_or_create(&d2, &[]).unwrap();
        let (cert, key) = paths(&d2);
        let mut s12 = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from_pem_file(&cert).unwrap()],
                PrivateKeyDer::from_pem_file(&key).unwrap(),
            )
            .unwrap();
        s12.alpn_protocols = vec![b"http/1.1".to_vec()];
        let s12 = Arc::new(s12);
        let got = handshake(s12.clone(), pinned_client_config(b.fingerprint())).await;
        assert_eq!(got.unwrap(), b"hello");
        assert!(handshake(s12, pinned_client_config(a.fingerprint()))
            .await
            .is_err());
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::remove_dir_all(&d2);
    }

    #[test]
    fn server_names() {
        assert_eq!(
            server_name("hub.example.org:7443"),
            ServerName::try_from("hub.example.org").unwrap()
        );
        assert!(matches!(
            server_name("[2001:db8::1]:7443"),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("203.0.113.1:7443"),
            ServerName::IpAddress(_)
        ));
        assert_eq!(
            server_name("bad host:1"),
            ServerName::try_from(DEFAULT_NAME).unwrap()
        );
    }
}
