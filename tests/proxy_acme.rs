//! ACME against a real server: Debian's `pebble` (skipped when it is not
//! installed) on loopback, with `pebble-challtestsrv` as its DNS answering
//! 127.0.0.1 for every name. The proxy obtains a certificate through HTTP-01 and
//! through TLS-ALPN-01, serves it (verified against pebble's root), keeps it in
//! the state directory and loads it from there after a restart without a new
//! order. A TLS-terminating TCP forward gets its certificate the same way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use gatewire::proxy::names::{DomainName, Label};
use gatewire::proxy::settings::{
    AcmeChallenge, AcmeSettings, Backend, BackendTls, Balance, Limits, ProxyProtocol,
    ProxySettings, RouteHost, RouteSettings, Scheme, TcpForwardSettings, TcpTls, TlsMode,
};
use gatewire::proxy::Proxy;
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PEBBLE: &str = "/usr/bin/pebble";
const CHALLTESTSRV: &str = "/usr/bin/pebble-challtestsrv";

/// Kills the child (by its PID, through the handle) when dropped.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gatewire-acme-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Pebble {
    _pebble: Proc,
    _dns: Proc,
    dir_url: String,
    mgmt: u16,
    ca: PathBuf,
}

/// A port free for both UDP and TCP on 127.0.0.1 (a DNS listener's).
fn free_dns_port() -> u16 {
    loop {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = u.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Pebble asking pebble-challtestsrv for every name (127.0.0.1).
async fn start_pebble(dir: &Path, http_port: u16, tls_port: u16) -> Pebble {
    start_pebble_dns(dir, http_port, tls_port, None).await
}

/// Pebble asking the DNS server on `dns` (a port on 127.0.0.1) instead of
/// pebble-challtestsrv, when given. Started again on other ports when it
/// exits before listening (a port found free was taken meanwhile, say as
/// another connection's local port).
async fn start_pebble_dns(dir: &Path, http_port: u16, tls_port: u16, dns: Option<u16>) -> Pebble {
    for _ in 0..3 {
        if let Some(p) = try_start_pebble(dir, http_port, tls_port, dns).await {
            return p;
        }
    }
    panic!(
        "pebble exited before listening, three times (see pebble.err in {})",
        dir.display()
    );
}

/// Whether `port` opened before `child` exited (15 s at most).
async fn opened(port: u16, child: &mut Child) -> bool {
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "port {port} never opened"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

async fn try_start_pebble(
    dir: &Path,
    http_port: u16,
    tls_port: u16,
    dns: Option<u16>,
) -> Option<Pebble> {
    // Pebble's own HTTPS certificate, for 127.0.0.1 and localhost.
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let ca = dir.join("pebble-tls.pem");
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    std::fs::write(dir.join("pebble-key.pem"), ck.key_pair.serialize_pem()).unwrap();
    let (acme, mgmt, testsrv) = (free_port(), free_port(), free_udp_port());
    let dns = dns.unwrap_or(testsrv);
    let cfg = serde_json::json!({ "pebble": {
        "listenAddress": format!("127.0.0.1:{acme}"),
        "managementListenAddress": format!("127.0.0.1:{mgmt}"),
        "certificate": dir.join("pebble-tls.pem"),
        "privateKey": dir.join("pebble-key.pem"),
        "httpPort": http_port,
        "tlsPort": tls_port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": false
    }});
    std::fs::write(dir.join("pebble.json"), cfg.to_string()).unwrap();
    let log = |n: &str| std::fs::File::create(dir.join(n)).unwrap();
    let dns_proc = Proc(
        Command::new(CHALLTESTSRV)
            .args([
                "-dns01",
                &format!("127.0.0.1:{testsrv}"),
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                &format!("127.0.0.1:{}", free_port()),
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
            ])
            .stdout(log("challtestsrv.log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble-challtestsrv"),
    );
    let mut pebble = Proc(
        Command::new(PEBBLE)
            .args(["-config"])
            .arg(dir.join("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn()
            .expect("pebble"),
    );
    if !(opened(acme, &mut pebble.0).await && opened(mgmt, &mut pebble.0).await) {
        return None;
    }
    Some(Pebble {
        _pebble: pebble,
        _dns: dns_proc,
        dir_url: format!("https://127.0.0.1:{acme}/dir"),
        mgmt,
        ca,
    })
}

fn tls_client(roots: &[CertificateDer<'static>], alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(c))
}

fn pem_certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// Pebble's current root (it makes a new one each start).
async fn pebble_root(p: &Pebble) -> Vec<CertificateDer<'static>> {
    let ca = pem_certs(&std::fs::read(&p.ca).unwrap());
    let tls = tls_client(&ca, &[]);
    let tcp = TcpStream::connect(("127.0.0.1", p.mgmt)).await.unwrap();
    let mut s = tls
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    s.write_all(b"GET /roots/0 HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let at = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    pem_certs(&out[at..])
}

/// GET https://host/ through the proxy, verifying against `roots`.
async fn https_get(at: SocketAddr, host: &str, roots: &[CertificateDer<'static>]) -> String {
    let tls = tls_client(roots, &[b"http/1.1"]);
    let tcp = TcpStream::connect(at).await.unwrap();
    let mut s = tls
        .connect(ServerName::try_from(host.to_string()).unwrap(), tcp)
        .await
        .expect("TLS to the proxy verifies against pebble's root");
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nacme-ok",
                    )
                    .await;
            });
        }
    });
    a
}

fn settings(
    http: u16,
    tls: u16,
    p: &Pebble,
    state: &Path,
    ch: AcmeChallenge,
    b: SocketAddr,
) -> ProxySettings {
    ProxySettings {
        domains: vec![DomainName::parse("gw.test").unwrap()],
        http_listen: vec![format!("127.0.0.1:{http}").parse().unwrap()],
        https_listen: vec![format!("127.0.0.1:{tls}").parse().unwrap()],
        routes: vec![RouteSettings {
            host: RouteHost::Name(Label::parse("site").unwrap()),
            tls: TlsMode::Terminate,
            cert: None,
            backends: vec![Backend {
                scheme: Scheme::Http,
                addr: b,
            }],
            redirect_https: false,
            proxy_protocol: ProxyProtocol::Off,
            backend_tls: BackendTls::default(),
            backend_protocol: Default::default(),
            balance: Balance::default(),
            acme: true,
            paused: false,
            access: Default::default(),
            rate_limit: None,
            bandwidth: None,
            basic_auth_file: None,
            forward_auth: None,
            paths: vec![],
            max_body_size: None,
            request_headers: vec![],
            response_headers: vec![],
        }],
        tcp: vec![],
        udp: vec![],
        limits: Limits::default(),
        acme: Some(AcmeSettings {
            directory: p.dir_url.clone(),
            contact: vec!["mailto:ops@gw.test".into()],
            state_dir: state.to_path_buf(),
            directory_ca: Some(p.ca.clone()),
            challenge: ch,
            renew_before: Duration::from_secs(86_400),
            wildcard: false,
            dns_listen: Vec::new(),
        }),
        access_log: None,
        proxy_protocol_from: None,
        trusted_proxies: None,
        dns: None,
    }
}

async fn wait_cert(state: &Path) {
    wait_cert_for(state, "site.gw.test").await;
}

async fn wait_cert_for(state: &Path, host: &str) {
    let f = state.join("certs").join(host).join("fullchain.pem");
    let t0 = Instant::now();
    while !f.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no certificate issued; see the pebble logs in {}",
            state.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Whether pebble and its challenge server are installed: when not, the
/// test is skipped, except under `CI=true`, where it fails.
fn pebble_installed() -> bool {
    if Path::new(PEBBLE).exists() && Path::new(CHALLTESTSRV).exists() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "pebble is missing but CI=true: install Debian's pebble package"
    );
    eprintln!("pebble not installed; skipping");
    false
}

async fn run(ch: AcmeChallenge, tag: &str) {
    if !pebble_installed() {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("gatewire=info")
        .try_init();
    let dir = tmpdir(tag);
    let (http, tls) = (free_port(), free_port());
    let p = start_pebble(&dir, http, tls).await;
    let state = dir.join("state");
    let b = backend().await;
    let proxy = Proxy::start(settings(http, tls, &p, &state, ch, b))
        .await
        .unwrap();
    wait_cert(&state).await;
    let root = pebble_root(&p).await;
    let at: SocketAddr = format!("127.0.0.1:{tls}").parse().unwrap();
    let r = https_get(at, "site.gw.test", &root).await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.ends_with("acme-ok"),
        "{r}"
    );
    let mode = std::fs::metadata(state.join("certs/site.gw.test/key.pem"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077,
        0,
        "key not private"
    );
    let account = state.join("account.json");
    assert!(account.exists());
    proxy.shutdown(Duration::from_secs(1)).await;

    // A restart loads the stored certificate: served at once, no new order.
    let before = std::fs::metadata(state.join("certs/site.gw.test/fullchain.pem"))
        .unwrap()
        .modified()
        .unwrap();
    let proxy = Proxy::start(settings(http, tls, &p, &state, ch, b))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = https_get(at, "site.gw.test", &root).await;
    assert!(r.ends_with("acme-ok"), "{r}");
    let after = std::fs::metadata(state.join("certs/site.gw.test/fullchain.pem"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after, "no new order after a restart");
    proxy.shutdown(Duration::from_secs(1)).await;

    // Renewal: a certificate inside the renewal window is replaced (the
    // window: all of its lifetime but its first seconds, which the stored
    // one has passed and the new one will not have when it is checked: a
    // new certificate already due is refused as a clock fault).
    const YOUNG: u64 = 6;
    let pem = std::fs::read(state.join("certs/site.gw.test/fullchain.pem")).unwrap();
    let (nb, na) = gatewire::proxy::acme::cert_validity(&pem_certs(&pem)[0]).unwrap();
    let unix = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    while unix() <= nb + YOUNG {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut s = settings(http, tls, &p, &state, ch, b);
    if let Some(a) = s.acme.as_mut() {
        a.renew_before = Duration::from_secs(na - nb - YOUNG);
    }
    let proxy = Proxy::start(s).await.unwrap();
    let t0 = Instant::now();
    loop {
        let m = std::fs::metadata(state.join("certs/site.gw.test/fullchain.pem"))
            .and_then(|m| m.modified())
            .unwrap_or(before);
        if m != before {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no renewal");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !state.join("certs/site.gw.test/retry").exists(),
        "the renewal counted as failed"
    );
    let r = https_get(at, "site.gw.test", &root).await;
    assert!(r.ends_with("acme-ok"), "{r}");
    proxy.shutdown(Duration::from_secs(1)).await;

    // Another directory (here the same CA under another name, as staging
    // to production would be): an account of its own, the old one kept
    // aside, and the stored certificate ordered again from it.
    let before = std::fs::metadata(state.join("certs/site.gw.test/fullchain.pem"))
        .unwrap()
        .modified()
        .unwrap();
    let mut s = settings(http, tls, &p, &state, ch, b);
    if let Some(a) = s.acme.as_mut() {
        a.directory = a.directory.replace("127.0.0.1", "localhost");
    }
    let proxy = Proxy::start(s).await.unwrap();
    let t0 = Instant::now();
    loop {
        let m = std::fs::metadata(state.join("certs/site.gw.test/fullchain.pem"))
            .and_then(|m| m.modified())
            .unwrap_or(before);
        if m != before {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no new order after the directory changed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let aside = std::fs::read_dir(&state)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("account.previous-") && name.ends_with(".json")
        })
        .count();
    assert_eq!(aside, 1, "the old directory's account kept aside");
    let made_at = std::fs::read_to_string(state.join("certs/site.gw.test/directory")).unwrap();
    assert!(made_at.contains("localhost"), "{made_at}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = https_get(at, "site.gw.test", &root).await;
    assert!(r.ends_with("acme-ok"), "{r}");
    proxy.shutdown(Duration::from_secs(1)).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn acme_http01_with_pebble() {
    run(AcmeChallenge::Http01, "http01").await;
}

#[tokio::test]
async fn acme_tls_alpn01_with_pebble() {
    run(AcmeChallenge::TlsAlpn01, "alpn01").await;
}

#[tokio::test]
async fn acme_certificate_on_a_tcp_forward() {
    if !pebble_installed() {
        return;
    }
    let dir = tmpdir("tcp-acme");
    let (http, tls) = (free_port(), free_port());
    let p = start_pebble(&dir, http, tls).await;
    let state = dir.join("state");
    let b = backend().await;
    let mut s = settings(http, tls, &p, &state, AcmeChallenge::Http01, b);
    // No routes at all: the HTTP listener answers the challenge for the
    // forward's name.
    s.routes.clear();
    s.tcp = vec![TcpForwardSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        backends: vec![Backend {
            scheme: Scheme::Http,
            addr: b,
        }],
        proxy_protocol: ProxyProtocol::Off,
        balance: Balance::default(),
        tls: Some(TcpTls::Acme(DomainName::parse("db.gw.test").unwrap())),
        access: Default::default(),
        rate_limit: None,
        bandwidth: None,
    }];
    let proxy = Proxy::start(s).await.unwrap();
    let at = proxy.tcp_addrs()[0];
    wait_cert_for(&state, "db.gw.test").await;
    let root = pebble_root(&p).await;
    // The TLS client verifies the forward's certificate against pebble's
    // root; the backend gets the plain stream and answers it.
    let r = https_get(at, "db.gw.test", &root).await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.ends_with("acme-ok"),
        "{r}"
    );
    proxy.shutdown(Duration::from_secs(1)).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// DNS-01: two name routes under the gateway domain share one `*.gw.test`
/// certificate. Pebble asks the proxy's own DNS listener for
/// `_acme-challenge.gw.test` (as a resolver would after the NS delegation);
/// one order serves both names, and a restart loads it from disk.
#[tokio::test]
async fn acme_dns01_wildcard_with_pebble() {
    if !pebble_installed() {
        return;
    }
    let dir = tmpdir("dns01");
    let (http, tls, dns) = (free_port(), free_port(), free_dns_port());
    let p = start_pebble_dns(&dir, http, tls, Some(dns)).await;
    let state = dir.join("state");
    let b = backend().await;
    let settings = || {
        let mut s = settings(http, tls, &p, &state, AcmeChallenge::Http01, b);
        let mut shop = s.routes[0].clone();
        shop.host = RouteHost::Name(Label::parse("shop").unwrap());
        s.routes.push(shop);
        if let Some(a) = s.acme.as_mut() {
            a.wildcard = true;
            a.dns_listen = vec![format!("127.0.0.1:{dns}").parse().unwrap()];
        }
        s
    };
    let proxy = Proxy::start(settings()).await.unwrap();
    assert_eq!(proxy.dns_addrs().len(), 1);
    wait_cert_for(&state, "*.gw.test").await;
    let root = pebble_root(&p).await;
    let at: SocketAddr = format!("127.0.0.1:{tls}").parse().unwrap();
    for host in ["site.gw.test", "shop.gw.test"] {
        let r = https_get(at, host, &root).await;
        assert!(r.ends_with("acme-ok"), "{host}: {r}");
    }
    assert!(!state.join("certs/site.gw.test").exists());
    assert!(!state.join("certs/shop.gw.test").exists());
    let log = std::fs::read_to_string(dir.join("pebble.log")).unwrap();
    assert_eq!(log.matches("POST /order-plz").count(), 1, "{log}");
    // The CA's query was answered by the proxy's DNS listener.
    let dns_stats = proxy
        .stats()
        .into_iter()
        .find(|r| r.route == "dns")
        .expect("a dns entry in the counters");
    assert!(dns_stats.requests >= 1, "{dns_stats:?}");
    let certs = proxy.certificates();
    let wild = certs
        .iter()
        .find(|c| c.host == "*.gw.test")
        .expect("the wildcard in the certificates");
    assert_eq!(wild.source, "acme");
    assert!(
        wild.not_after.is_some_and(|na| na > 1_700_000_000),
        "{wild:?}"
    );
    assert!(wild.error.is_none(), "{wild:?}");
    assert_eq!(certs.len(), 1, "{certs:?}");
    proxy.shutdown(Duration::from_secs(1)).await;

    let proxy = Proxy::start(settings()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = https_get(at, "shop.gw.test", &root).await;
    assert!(r.ends_with("acme-ok"), "{r}");
    let log = std::fs::read_to_string(dir.join("pebble.log")).unwrap();
    assert_eq!(log.matches("POST /order-plz").count(), 1, "no new order");
    proxy.shutdown(Duration::from_secs(1)).await;
    let _ = std::fs::remove_dir_all(&dir);
}
