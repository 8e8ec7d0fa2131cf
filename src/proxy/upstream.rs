//! Backend selection and connection: round-robin over a route's backends with
//! passive health (a failed connect skips the backend for a while), TLS to
//! `https://` backends.

use crate::proxy::settings::{Backend, BackendTls, Scheme};
use crate::proxy::stats::BackendHealth;
use parking_lot::Mutex;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

/// Why no backend connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Every backend is marked down (503).
    #[error("no healthy backend")]
    NoHealthy,
    /// The last backend tried refused or reset (502).
    #[error("backend {0} refused the connection: {1}")]
    Refused(SocketAddr, io::Error),
    /// The last backend tried did not answer in time (504).
    #[error("backend {0} timed out")]
    Timeout(SocketAddr),
}

struct State {
    backend: Backend,
    down_until: Mutex<Option<Instant>>,
    failures: AtomicU64,
}

/// A route's backends.
pub struct Upstreams {
    states: Vec<State>,
    next: AtomicUsize,
    down_for: Duration,
}

impl Upstreams {
    /// `backends` must be non-empty for connects to succeed.
    pub fn new(backends: &[Backend], down_for: Duration) -> Self {
        Upstreams {
            states: backends
                .iter()
                .map(|b| State {
                    backend: *b,
                    down_until: Mutex::new(None),
                    failures: AtomicU64::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
            down_for,
        }
    }

    /// Healthy backends in round-robin order for one attempt.
    fn candidates(&self, now: Instant) -> Vec<usize> {
        let n = self.states.len();
        if n == 0 {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, Relaxed) % n;
        (0..n)
            .map(|i| (start + i) % n)
            .filter(|&i| {
                self.states
                    .get(i)
                    .is_some_and(|s| s.down_until.lock().is_none_or(|t| t <= now))
            })
            .collect()
    }

    /// Picks the next healthy backend without connecting (UDP).
    pub fn pick(&self) -> Option<Backend> {
        let c = self.candidates(Instant::now());
        c.first()
            .and_then(|&i| self.states.get(i))
            .map(|s| s.backend)
    }

    /// Marks `addr` down (a failed connect or an ICMP refusal).
    pub fn mark_down(&self, addr: SocketAddr) {
        if let Some(s) = self.states.iter().find(|s| s.backend.addr == addr) {
            *s.down_until.lock() = Some(Instant::now() + self.down_for);
            s.failures.fetch_add(1, Relaxed);
        }
    }

    fn mark_up(&self, i: usize) {
        if let Some(s) = self.states.get(i) {
            *s.down_until.lock() = None;
        }
    }

    /// Connects to the next healthy backend, trying the others on failure.
    pub async fn connect(&self, timeout: Duration) -> Result<(TcpStream, Backend), UpstreamError> {
        let mut last = UpstreamError::NoHealthy;
        for i in self.candidates(Instant::now()) {
            let Some(s) = self.states.get(i) else {
                continue;
            };
            let addr = s.backend.addr;
            match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    self.mark_up(i);
                    return Ok((stream, s.backend));
                }
                Ok(Err(e)) => {
                    debug!(backend = %addr, error = %e, "backend connect failed");
                    self.mark_down(addr);
                    last = UpstreamError::Refused(addr, e);
                }
                Err(_) => {
                    debug!(backend = %addr, "backend connect timed out");
                    self.mark_down(addr);
                    last = UpstreamError::Timeout(addr);
                }
            }
        }
        Err(last)
    }

    /// Health for the stats.
    pub fn health(&self) -> Vec<BackendHealth> {
        let now = Instant::now();
        self.states
            .iter()
            .map(|s| BackendHealth {
                backend: s.backend.to_string(),
                up: s.down_until.lock().is_none_or(|t| t <= now),
                failures: s.failures.load(Relaxed),
            })
            .collect()
    }
}

/// The ring crypto provider every TLS config here uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts any server certificate: `backend_insecure_skip_verify = true`.
#[derive(Debug)]
struct DangerNoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for DangerNoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS client side for a route's `https://` backends.
pub struct BackendTlsClient {
    connector: tokio_rustls::TlsConnector,
    server_name: Option<ServerName<'static>>,
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate found", path.display()));
    }
    Ok(certs)
}

impl BackendTlsClient {
    /// Builds the client config; errors name the file.
    pub fn new(tls: &BackendTls) -> Result<Self, String> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let mut cfg = if tls.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(DangerNoVerify(provider)))
                .with_no_client_auth()
        } else {
            let mut roots = rustls::RootCertStore::empty();
            if let Some(ca) = &tls.ca {
                for c in load_certs(ca)? {
                    roots
                        .add(c)
                        .map_err(|e| format!("backend_ca {}: {e}", ca.display()))?;
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let server_name = match &tls.server_name {
            Some(n) => Some(
                ServerName::try_from(n.clone())
                    .map_err(|_| format!("backend_server_name `{n}` is not a valid name"))?,
            ),
            None => None,
        };
        Ok(BackendTlsClient {
            connector: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
            server_name,
        })
    }

    /// TLS handshake over `tcp` to `addr`.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = self
            .server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        self.connector.connect(name, tcp).await
    }
}

/// True if the backend speaks TLS.
pub fn is_tls(b: &Backend) -> bool {
    b.scheme == Scheme::Https
}
