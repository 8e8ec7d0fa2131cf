//! Loopback integration tests of the hub's reverse proxy (no root needed).
//!
//! Config validation refuses loopback backends, so these tests build
//! `ProxySettings` directly (the runtime takes validated settings as given) and
//! point routes at tiny servers on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use gatewire::proxy::names::{DomainName, Label};
use gatewire::proxy::paths::PathPrefix;
use gatewire::proxy::proxy_protocol::{decode_v2, Command, Transport};
use gatewire::proxy::settings::{
    Backend, BackendProtocol, BackendTls, Balance, CertFiles, HealthCheck, HealthKind, Limits,
    PathRoute, ProxyProtocol, ProxySettings, RouteHost, RouteSettings, Scheme, TcpForwardSettings,
    TcpTls, TlsMode, UdpForwardSettings,
};
use gatewire::proxy::Proxy;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const T: Duration = Duration::from_secs(10);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn be(addr: SocketAddr) -> Backend {
    Backend {
        scheme: Scheme::Http,
        addr,
    }
}

fn route(name: &str, tls: TlsMode, backends: Vec<Backend>) -> RouteSettings {
    RouteSettings {
        host: RouteHost::Name(Label::parse(name).unwrap()),
        tls,
        cert: None,
        backends,
        redirect_https: false,
        proxy_protocol: ProxyProtocol::Off,
        backend_tls: BackendTls::default(),
        backend_protocol: Default::default(),
        balance: Balance::default(),
        acme: false,
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
    }
}

fn settings(routes: Vec<RouteSettings>) -> ProxySettings {
    ProxySettings {
        domains: vec![DomainName::parse("gw.test").unwrap()],
        http_listen: vec!["127.0.0.1:0".parse().unwrap()],
        https_listen: vec!["127.0.0.1:0".parse().unwrap()],
        routes,
        tcp: vec![],
        udp: vec![],
        limits: Limits {
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(5),
            ..Limits::default()
        },
        acme: None,
        access_log: None,
        proxy_protocol_from: None,
        trusted_proxies: None,
        dns: None,
    }
}

/// A request header's value, or `-`.
fn header<B>(req: &hyper::Request<B>, name: &str) -> String {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string()
}

/// An HTTP/1.1 backend answering `name <path> xff=<X-Forwarded-For> ...`; it
/// echoes the upgraded stream for `Upgrade: echo` requests.
async fn http_backend(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = service_fn(
                    move |mut req: hyper::Request<hyper::body::Incoming>| async move {
                        let h = |n: &str| header(&req, n);
                        if req.headers().contains_key("upgrade") {
                            let up = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                let up = up.await.unwrap();
                                let mut io = TokioIo::new(up);
                                let mut buf = [0u8; 64];
                                while let Ok(n) = io.read(&mut buf).await {
                                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            });
                            let mut r = hyper::Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
                            r.headers_mut()
                                .insert("connection", "upgrade".parse().unwrap());
                            r.headers_mut().insert("upgrade", "echo".parse().unwrap());
                            return Ok::<_, Infallible>(r);
                        }
                        let text = format!(
                            "{name} {} host={} xff={} xfp={} xfh={} fwd={} conn={} auth={} user={}",
                            req.uri(),
                            h("host"),
                            h("x-forwarded-for"),
                            h("x-forwarded-proto"),
                            h("x-forwarded-host"),
                            h("forwarded"),
                            h("x-hop"),
                            h("authorization"),
                            h("x-auth-request-user"),
                        );
                        let all = req.into_body().collect().await.unwrap();
                        let trl = all
                            .trailers()
                            .and_then(|t| t.get("x-sum"))
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_string();
                        let body = all.to_bytes();
                        let text = format!("{text} body={} trl={trl}", body.len());
                        Ok(hyper::Response::new(Full::new(Bytes::from(text))))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// Sends a raw HTTP/1.1 request and returns the whole response (connection: close).
/// Sends `bytes` on a new connection to `addr` and reads until it closes.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

async fn raw_http(addr: SocketAddr, host: &str, extra: &str) -> String {
    let req =
        format!("GET /hello?x=1 HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n");
    String::from_utf8_lossy(&exchange(addr, req.as_bytes()).await).into_owned()
}

struct Pki {
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

fn pki(names: &[&str]) -> Pki {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    Pki {
        cert_pem: ck.cert.pem(),
        key_pem: ck.key_pair.serialize_pem(),
        cert_der: ck.cert.der().clone(),
        key_der: ck.key_pair.serialize_der(),
    }
}

fn client_config(trust: &CertificateDer<'static>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.clone()).unwrap();
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(c)
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gatewire-proxy-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test]
async fn http_by_host_forwarding_headers_and_404() {
    let b = http_backend("blog").await;
    let p = Proxy::start(settings(vec![route(
        "blog",
        TlsMode::Terminate,
        vec![be(b)],
    )]))
    .await
    .unwrap();
    let at = p.http_addrs()[0];
    let r = raw_http(
        at,
        "Blog.GW.test",
        "X-Forwarded-For: 192.0.2.9\r\nConnection: x-hop\r\nX-Hop: secret\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("blog /hello?x=1 host=Blog.GW.test"), "{r}");
    // The client is no trusted proxy: its own X-Forwarded-For is replaced.
    assert!(r.contains("xff=127.0.0.1 "), "{r}");
    assert!(r.contains("xfp=http xfh=Blog.GW.test"), "{r}");
    assert!(
        r.contains("fwd=for=127.0.0.1;host=\"Blog.GW.test\";proto=http"),
        "{r}"
    );
    assert!(r.contains("conn=-"), "hop-by-hop header leaked: {r}");

    let r = raw_http(at, "nope.gw.test", "").await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    assert!(r.contains("no route"), "{r}");
    let r = raw_http(at, "blog.other.test", "").await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    // Heads the parser refuses (smuggling probes: a coding the hub cannot
    // frame, two lengths) get 400 and are counted as bad requests.
    for probe in [
        "Transfer-Encoding: gzip\r\n",
        "Content-Length: 3\r\nContent-Length: 4\r\n",
    ] {
        let r = raw_http(at, "blog.gw.test", probe).await;
        assert!(r.starts_with("HTTP/1.1 400"), "{probe}: {r}");
    }
    // (Counted as the connection ends, which may be just after the client
    // read its end.)
    let bad = || {
        let st = p.stats();
        let l = st.iter().find(|s| s.route == "listener").unwrap();
        l.errors.get("bad_request").copied().unwrap_or(0)
    };
    for _ in 0..100 {
        if bad() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let st = p.stats();
    let blog = st.iter().find(|s| s.route == "name:blog").unwrap();
    assert_eq!(blog.requests, 1);
    assert!(blog.bytes_out > 0);
    assert_eq!(blog.hosts, vec!["blog.gw.test".to_string()]);
    let l = st.iter().find(|s| s.route == "listener").unwrap();
    assert_eq!(l.errors.get("unknown_host"), Some(&2));
    assert_eq!(l.errors.get("bad_request"), Some(&2));
}

#[tokio::test]
async fn trusted_proxies_keep_their_forwarding_headers() {
    let b = http_backend("blog").await;
    let mut s = settings(vec![route("blog", TlsMode::Terminate, vec![be(b)])]);
    s.trusted_proxies = Some(access(&["127.0.0.0/8"], &[]));
    let p = Proxy::start(s).await.unwrap();
    let at = p.http_addrs()[0];
    let r = raw_http(
        at,
        "blog.gw.test",
        "X-Forwarded-For: 192.0.2.9\r\nX-Forwarded-Proto: https\r\nForwarded: for=192.0.2.9\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("xff=192.0.2.9, 127.0.0.1 "), "{r}");
    assert!(r.contains("xfp=https xfh=blog.gw.test"), "{r}");
    assert!(
        r.contains("fwd=for=192.0.2.9, for=127.0.0.1;host=\"blog.gw.test\";proto=http"),
        "{r}"
    );

    // A proxy list that does not hold the client: replaced as from anyone.
    let mut s = settings(vec![route("blog", TlsMode::Terminate, vec![be(b)])]);
    s.trusted_proxies = Some(access(&["10.0.0.0/8"], &[]));
    let p = Proxy::start(s).await.unwrap();
    let r = raw_http(
        p.http_addrs()[0],
        "blog.gw.test",
        "X-Forwarded-For: 192.0.2.9\r\nX-Forwarded-Proto: https\r\n",
    )
    .await;
    assert!(r.contains("xff=127.0.0.1 "), "{r}");
    assert!(r.contains("xfp=http "), "{r}");
}

/// `GET /` for `host` from `src` with `extra` header lines; the status line.
async fn status_from(src: &str, to: SocketAddr, host: &str, extra: &str) -> String {
    let text = http_from_with(src, to, host, extra).await;
    text.lines().next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn behind_trusted_proxies_rules_count_the_forwarded_client() {
    let b = http_backend("cdn").await;
    let mut r = route("cdn", TlsMode::Terminate, vec![be(b)]);
    r.access = access(&[], &["192.0.2.66"]);
    r.rate_limit = Some(gatewire::proxy::settings::RateLimit {
        per_second: 1,
        burst: 1,
    });
    let mut s = settings(vec![r]);
    s.trusted_proxies = Some(access(&["127.0.0.1"], &[]));
    let dir = tmpdir("trusted-log");
    let path = dir.join("access.log");
    let _ = std::fs::remove_file(&path);
    s.access_log = Some(path.clone());
    let p = Proxy::start(s).await.unwrap();
    let at = p.http_addrs()[0];
    let xff = |ip: &str| format!("X-Forwarded-For: {ip}\r\n");
    let ok = "HTTP/1.1 200 OK";
    // The proxy's clients are told apart: each has a rate of its own...
    assert_eq!(
        status_from("127.0.0.1", at, "cdn.gw.test", &xff("192.0.2.7")).await,
        ok
    );
    assert_eq!(
        status_from("127.0.0.1", at, "cdn.gw.test", &xff("192.0.2.8")).await,
        ok
    );
    let again = status_from("127.0.0.1", at, "cdn.gw.test", &xff("192.0.2.7")).await;
    assert!(again.starts_with("HTTP/1.1 429"), "{again}");
    // ... and the route's `deny` reaches them.
    let denied = status_from("127.0.0.1", at, "cdn.gw.test", &xff("192.0.2.66")).await;
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    // What the client wrote itself, left of the address the proxy saw, is
    // not believed.
    let spoof = status_from(
        "127.0.0.1",
        at,
        "cdn.gw.test",
        &xff("192.0.2.66, 198.51.100.1"),
    )
    .await;
    assert_eq!(spoof, ok);
    // A client that is no trusted proxy counts as itself, whatever it sends.
    assert_eq!(
        status_from("127.0.0.2", at, "cdn.gw.test", &xff("192.0.2.9")).await,
        ok
    );
    let own = status_from("127.0.0.2", at, "cdn.gw.test", &xff("192.0.2.10")).await;
    assert!(own.starts_with("HTTP/1.1 429"), "{own}");

    // The log names both: the proxy's connection and the client it forwarded.
    let lines = log_lines(&path, 7).await;
    assert_eq!(lines.len(), 7, "{lines:?}");
    let fwd: Vec<String> = lines
        .iter()
        .map(|l| l["forwarded_for"].as_str().unwrap_or("-").to_string())
        .collect();
    assert_eq!(
        fwd,
        [
            "192.0.2.7",
            "192.0.2.8",
            "192.0.2.7",
            "192.0.2.66",
            "198.51.100.1",
            "-",
            "-"
        ],
        "{lines:?}"
    );
    assert!(lines[0]["client"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    let st = p.stats();
    let c = st.iter().find(|s| s.route == "name:cdn").unwrap();
    assert_eq!(c.errors.get("rate_limited"), Some(&2));
    assert_eq!(c.errors.get("denied"), Some(&1));
}

#[tokio::test]
async fn post_body_streams_and_counts() {
    let b = http_backend("up").await;
    let p = Proxy::start(settings(vec![route("up", TlsMode::Terminate, vec![be(b)])]))
        .await
        .unwrap();
    let mut s = TcpStream::connect(p.http_addrs()[0]).await.unwrap();
    let body = vec![b'z'; 300_000];
    s.write_all(
        format!(
            "POST /u HTTP/1.1\r\nHost: up.gw.test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    s.write_all(&body).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.contains("body=300000"), "{out}");
    let st = p.stats();
    let up = st.iter().find(|s| s.route == "name:up").unwrap();
    assert_eq!(up.bytes_in, 300_000);
}

/// A chunked body reaches the backend whole, whatever the method (hyper
/// would send a GET's unannounced body as none), and so do the trailers
/// the request names in `Trailer`.
#[tokio::test]
async fn chunked_bodies_and_trailers_reach_the_backend() {
    let b = http_backend("up").await;
    let p = Proxy::start(settings(vec![route("up", TlsMode::Terminate, vec![be(b)])]))
        .await
        .unwrap();
    let addr = p.http_addrs()[0];
    for method in ["GET", "POST", "DELETE"] {
        let req = format!(
            "{method} /c HTTP/1.1\r\nHost: up.gw.test\r\nTransfer-Encoding: chunked\r\n\
             Trailer: X-Sum\r\nConnection: close\r\n\r\n\
             5\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n"
        );
        let out = String::from_utf8_lossy(&exchange(addr, req.as_bytes()).await).into_owned();
        assert!(out.starts_with("HTTP/1.1 200"), "{method}: {out}");
        assert!(out.contains("body=11 trl=11"), "{method}: {out}");
    }
    // Without a body, a GET stays without one (no chunked header added).
    let out = raw_http(addr, "up.gw.test", "").await;
    assert!(out.contains("body=0 trl=-"), "{out}");
}

#[tokio::test]
async fn bad_backends_502_then_503_and_failover() {
    // A port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let good = http_backend("good").await;
    let p = Proxy::start(settings(vec![
        route("dead", TlsMode::Terminate, vec![be(dead)]),
        route("mixed", TlsMode::Terminate, vec![be(dead), be(good)]),
    ]))
    .await
    .unwrap();
    let at = p.http_addrs()[0];
    let r = raw_http(at, "dead.gw.test", "").await;
    assert!(r.starts_with("HTTP/1.1 502"), "{r}");
    let r = raw_http(at, "dead.gw.test", "").await;
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    for _ in 0..4 {
        let r = raw_http(at, "mixed.gw.test", "").await;
        assert!(r.starts_with("HTTP/1.1 200") && r.contains("good"), "{r}");
    }
    let st = p.stats();
    let d = st.iter().find(|s| s.route == "name:dead").unwrap();
    assert_eq!(d.errors.get("backend_refused"), Some(&1));
    assert_eq!(d.errors.get("no_healthy_backend"), Some(&1));
    let m = st.iter().find(|s| s.route == "name:mixed").unwrap();
    assert!(!m.backends[0].up && m.backends[1].up, "{:?}", m.backends);
}

#[tokio::test]
async fn path_prefixes_choose_backends() {
    let web = http_backend("web").await;
    let api = http_backend("api").await;
    let v2 = http_backend("v2").await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let path = |prefix: &str, b: SocketAddr, strip_prefix: bool| PathRoute {
        prefix: PathPrefix::parse(prefix).unwrap(),
        backends: vec![be(b)],
        strip_prefix,
        balance: Balance::default(),
    };
    let mut r = route("app", TlsMode::Terminate, vec![be(web)]);
    r.paths = vec![
        path("/api", api, true),
        path("/api/v2/", v2, false),
        path("/down", dead, false),
    ];
    let p = Proxy::start(settings(vec![r])).await.unwrap();
    let at = p.http_addrs()[0];
    let get = |target: &'static str| async move {
        let req =
            format!("GET {target} HTTP/1.1\r\nHost: app.gw.test\r\nConnection: close\r\n\r\n");
        String::from_utf8_lossy(&exchange(at, req.as_bytes()).await).into_owned()
    };
    for (target, want) in [
        ("/", "web / "),
        ("/apix", "web /apix "),
        ("/api", "api / "),
        ("/api?q=1", "api /?q=1 "),
        ("/api/users/7?x=y", "api /users/7?x=y "),
        ("/api/v2", "v2 /api/v2 "),
        ("/api/v2/items", "v2 /api/v2/items "),
        ("/api/v20", "api /v20 "),
        ("/API/x", "web /API/x "),
    ] {
        let r = get(target).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{target}: {r}");
        assert!(r.contains(want), "{target}: want `{want}` in {r}");
    }
    // Dot-segments could lead a backend out of the prefix it was chosen for.
    for target in [
        "/api/../admin",
        "/x/%2e%2e/api",
        "/api%2f..%2fadmin",
        "/static/.",
        "/api/..;/admin",
    ] {
        let r = get(target).await;
        assert!(r.starts_with("HTTP/1.1 400"), "{target}: {r}");
    }
    // A prefix with a dead backend fails alone.
    assert!(get("/down/x").await.starts_with("HTTP/1.1 502"));
    assert!(get("/").await.starts_with("HTTP/1.1 200"));

    // One keep-alive client connection across prefixes: each request goes
    // to its own prefix's backend (a held backend connection is not reused
    // for another prefix).
    let s = TcpStream::connect(at).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    for (target, want) in [
        ("/api/a", "api /a "),
        ("/b", "web /b "),
        ("/api/v2/c", "v2 /api/v2/c "),
        ("/api/d", "api /d "),
        ("/e", "web /e "),
    ] {
        let req = hyper::Request::get(target)
            .header("host", "app.gw.test")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(body.starts_with(want), "{target}: {body}");
    }

    let st = p.stats();
    let app = st.iter().find(|s| s.route == "name:app").unwrap();
    assert_eq!(app.errors.get("bad_path"), Some(&5));
    assert_eq!(app.errors.get("backend_refused"), Some(&1));
    let paths: Vec<Option<&str>> = app.backends.iter().map(|b| b.path.as_deref()).collect();
    assert_eq!(
        paths,
        vec![None, Some("/api"), Some("/api/v2"), Some("/down")]
    );
    assert!(
        app.backends[0].up && !app.backends[3].up,
        "{:?}",
        app.backends
    );
}

#[tokio::test]
async fn request_bodies_over_max_body_size_get_413() {
    let b = http_backend("up").await;
    let mut r = route("up", TlsMode::Terminate, vec![be(b)]);
    r.max_body_size = Some(1000);
    let p = Proxy::start(settings(vec![r])).await.unwrap();
    let at = p.http_addrs()[0];
    let post = |head: String, body: Vec<u8>| async move {
        let mut s = TcpStream::connect(at).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        // The hub may answer and close before taking all of it.
        let _ = s.write_all(&body).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(T, s.read_to_end(&mut out))
            .await
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    };
    let fixed = |n: usize, extra: &str| {
        format!("POST /u HTTP/1.1\r\nHost: up.gw.test\r\nContent-Length: {n}\r\n{extra}Connection: close\r\n\r\n")
    };
    let chunked = "POST /u HTTP/1.1\r\nHost: up.gw.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_string();
    let chunks = |sizes: &[usize]| {
        let mut v = Vec::new();
        for n in sizes {
            v.extend_from_slice(format!("{n:x}\r\n").as_bytes());
            v.extend(std::iter::repeat_n(b'z', *n));
            v.extend_from_slice(b"\r\n");
        }
        v.extend_from_slice(b"0\r\n\r\n");
        v
    };
    // Within the limit, announced or chunked: through.
    let out = post(fixed(1000, ""), vec![b'z'; 1000]).await;
    assert!(
        out.starts_with("HTTP/1.1 200") && out.contains("body=1000"),
        "{out}"
    );
    let out = post(chunked.clone(), chunks(&[400, 400])).await;
    assert!(
        out.starts_with("HTTP/1.1 200") && out.contains("body=800"),
        "{out}"
    );
    // Announced over it: refused before the backend, also when the client
    // waits for 100-continue (it gets the 413 instead).
    let out = post(fixed(1001, ""), vec![b'z'; 1001]).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(!out.contains("body="), "{out}");
    let out = post(fixed(5_000_000, "Expect: 100-continue\r\n"), Vec::new()).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    // A length given as a list is refused before anything is read or sent
    // (hyper answers 400; were it taken, the hub reads it as hyper does).
    let listed = "POST /u HTTP/1.1\r\nHost: up.gw.test\r\nContent-Length: 5000000, 5000000\r\n\
                  Expect: 100-continue\r\nConnection: close\r\n\r\n";
    let out = post(listed.to_string(), Vec::new()).await;
    assert!(out.starts_with("HTTP/1.1 4"), "{out}");
    assert!(
        !out.contains("100 Continue") && !out.contains("body="),
        "{out}"
    );
    // Chunked and larger than announced nothing: cut off at the limit.
    let out = post(chunked, chunks(&[600, 600, 600])).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "{out}"
    );
    let st = p.stats();
    let up = st.iter().find(|s| s.route == "name:up").unwrap();
    assert_eq!(up.errors.get("body_too_large"), Some(&3));
    assert_eq!(up.requests, 5);
}

#[tokio::test]
async fn route_headers_are_set_and_removed() {
    let b = http_backend("up").await;
    let mut r = route("up", TlsMode::Terminate, vec![be(b)]);
    let h = |n: &str, v: Option<&str>| {
        (
            http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
            v.map(|v| http::HeaderValue::from_str(v).unwrap()),
        )
    };
    r.request_headers = vec![
        h("authorization", None),
        h("x-auth-request-user", Some("svc")),
    ];
    r.response_headers = vec![
        h("strict-transport-security", Some("max-age=31536000")),
        h("x-frame-options", Some("DENY")),
    ];
    let p = Proxy::start(settings(vec![r])).await.unwrap();
    let out = raw_http(
        p.http_addrs()[0],
        "up.gw.test",
        "Authorization: Bearer client-secret\r\nX-Auth-Request-User: mallory\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // Removed, and replaced whatever the client sent.
    assert!(out.contains("auth=- user=svc "), "{out}");
    let head = out.to_ascii_lowercase();
    assert!(
        head.contains("\r\nstrict-transport-security: max-age=31536000\r\n"),
        "{out}"
    );
    assert!(head.contains("\r\nx-frame-options: deny\r\n"), "{out}");
}

/// A prefix whose backend speaks TLS on a route whose own backends do not:
/// the route still gets a backend TLS client (requests and checks use it).
#[tokio::test]
async fn https_backend_under_a_prefix_only() {
    let web = http_backend("web").await;
    let pki_back = pki(&["backend.internal"]);
    let secure = tls_backend(&pki_back).await;
    let ca = tmpdir("pathca").join("ca.pem");
    std::fs::write(&ca, &pki_back.cert_pem).unwrap();
    let mut r = route("mix", TlsMode::Terminate, vec![be(web)]);
    r.backend_tls = BackendTls {
        ca: Some(ca),
        server_name: Some("backend.internal".into()),
        insecure_skip_verify: false,
    };
    r.paths = vec![PathRoute {
        prefix: PathPrefix::parse("/secure").unwrap(),
        backends: vec![Backend {
            scheme: Scheme::Https,
            addr: secure,
        }],
        strip_prefix: false,
        balance: Balance::default(),
    }];
    let p = Proxy::start(settings(vec![r])).await.unwrap();
    let at = p.http_addrs()[0];
    let req = b"GET /secure/x HTTP/1.1\r\nHost: mix.gw.test\r\nConnection: close\r\n\r\n";
    let r = String::from_utf8_lossy(&exchange(at, req).await).into_owned();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.ends_with("pt:backend.internal"), "{r}");
    let r = raw_http(at, "mix.gw.test", "").await;
    assert!(r.contains("web /hello"), "{r}");
}

/// TLS to an `https://` backend is part of its connect: a backend that
/// accepts but never finishes the handshake within `connect_timeout`, or
/// that will not speak HTTP/2 to an `http2` route, is marked down and the
/// next one is tried.
#[tokio::test]
async fn https_backends_fail_over_when_tls_times_out_or_fails() {
    let pki_back = pki(&["backend.internal"]);
    let ca = tmpdir("failoverca").join("ca.pem");
    std::fs::write(&ca, &pki_back.cert_pem).unwrap();
    let https = |addr| Backend {
        scheme: Scheme::Https,
        addr,
    };
    let backend_tls = BackendTls {
        ca: Some(ca.clone()),
        server_name: Some("backend.internal".into()),
        insecure_skip_verify: false,
    };
    // Accepts connections (the kernel does) and never says a word.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let good = tls_backend(&pki_back).await;
    let mut a = route(
        "slow",
        TlsMode::Terminate,
        vec![https(silent.local_addr().unwrap()), https(good)],
    );
    a.backend_tls = backend_tls.clone();
    // No ALPN `h2` on the first one.
    let h1tls = tls_backend(&pki_back).await;
    let (h2tls, _) = h2_backend(Some(&pki_back)).await;
    let mut b = route("h2", TlsMode::Terminate, vec![https(h1tls), https(h2tls)]);
    b.backend_tls = backend_tls;
    b.backend_protocol = BackendProtocol::Http2;
    let mut s = settings(vec![a, b]);
    s.limits.connect_timeout = Duration::from_secs(1);
    let p = Proxy::start(s).await.unwrap();
    let at = p.http_addrs()[0];
    let r = raw_http(at, "slow.gw.test", "").await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.ends_with("pt:backend.internal"),
        "{r}"
    );
    let r = raw_http(at, "h2.gw.test", "").await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("ver=HTTP/2.0"),
        "{r}"
    );
    let st = p.stats();
    for name in ["name:slow", "name:h2"] {
        let s = st.iter().find(|s| s.route == name).unwrap();
        assert!(!s.backends[0].up && s.backends[1].up, "{:?}", s.backends);
        assert_eq!(s.backends[0].failures, 1, "{:?}", s.backends);
        assert!(s.errors.is_empty(), "{:?}", s.errors);
    }
    drop(silent);
}

/// Accepts connections and reads whatever comes, never answering.
async fn hung_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    at
}

#[tokio::test]
async fn a_backend_that_hangs_is_skipped_while_another_answers() {
    let hung = hung_backend().await;
    let good = http_backend("good").await;
    let lone = hung_backend().await;
    let (h2good, _) = h2_backend(None).await;
    let h2hung = hung_backend().await;
    let mut h2 = route("h2", TlsMode::Terminate, vec![be(h2hung), be(h2good)]);
    h2.backend_protocol = BackendProtocol::Http2;
    let mut s = settings(vec![
        route("pair", TlsMode::Terminate, vec![be(hung), be(good)]),
        route("lone", TlsMode::Terminate, vec![be(lone)]),
        h2,
    ]);
    s.limits.response_timeout = Duration::from_millis(300);
    s.limits.backend_down_for = Duration::from_secs(30);
    let p = Proxy::start(s).await.unwrap();
    let at = p.http_addrs()[0];
    for host in ["pair.gw.test", "h2.gw.test"] {
        // Round-robin: one of the first two requests goes to the hung
        // backend and times out; every later one goes to the other.
        let mut answers = Vec::new();
        for _ in 0..6 {
            let r = raw_http(at, host, "").await;
            answers.push(r.lines().next().unwrap_or_default().to_string());
        }
        let timeouts = answers
            .iter()
            .filter(|a| a.starts_with("HTTP/1.1 504"))
            .count();
        assert_eq!(timeouts, 1, "{host}: {answers:?}");
        assert!(
            answers[2..].iter().all(|a| a.starts_with("HTTP/1.1 200")),
            "{host}: {answers:?}"
        );
    }
    // A route's only backend is not taken out by a slow answer: the next
    // request is tried on it again (504, not 503).
    for _ in 0..2 {
        let r = raw_http(at, "lone.gw.test", "").await;
        assert!(r.starts_with("HTTP/1.1 504"), "{r}");
    }
    let st = p.stats();
    for name in ["name:pair", "name:h2"] {
        let s = st.iter().find(|s| s.route == name).unwrap();
        assert!(
            !s.backends[0].up && s.backends[1].up,
            "{name}: {:?}",
            s.backends
        );
        assert_eq!(s.backends[0].failures, 1, "{name}: {:?}", s.backends);
        assert_eq!(
            s.errors.get("backend_timeout"),
            Some(&1),
            "{name}: {:?}",
            s.errors
        );
    }
    let lone = st.iter().find(|s| s.route == "name:lone").unwrap();
    assert!(lone.backends[0].up, "{:?}", lone.backends);
    assert_eq!(lone.errors.get("backend_timeout"), Some(&2));
}

#[tokio::test]
async fn upgrade_is_relayed() {
    let b = http_backend("ws").await;
    let p = Proxy::start(settings(vec![route("ws", TlsMode::Terminate, vec![be(b)])]))
        .await
        .unwrap();
    let mut s = TcpStream::connect(p.http_addrs()[0]).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: ws.gw.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    let back = round_trip(&mut s, b"ping-through-the-proxy").await;
    assert_eq!(&back, b"ping-through-the-proxy");
}

/// A backend's `101` to another protocol than the client asked for is not
/// passed on: the client gets a 502, counted as `backend_protocol`.
#[tokio::test]
async fn a_switch_to_another_protocol_is_a_bad_gateway() {
    let b = http_backend("ws").await;
    let p = Proxy::start(settings(vec![route("ws", TlsMode::Terminate, vec![be(b)])]))
        .await
        .unwrap();
    // The backend always switches to `echo`.
    let r = raw_http(
        p.http_addrs()[0],
        "ws.gw.test",
        "Connection: Upgrade\r\nUpgrade: websocket\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 502"), "{r}");
    let stats = p.stats();
    let ws = stats.iter().find(|r| r.route == "name:ws").unwrap();
    assert_eq!(
        ws.errors.get("backend_protocol"),
        Some(&1),
        "{:?}",
        ws.errors
    );
}

/// A TLS acceptor with `pki`'s certificate, offering `alpn`.
fn tls_acceptor(pki: &Pki, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![pki.cert_der.clone()],
            PrivateKeyDer::Pkcs8(pki.key_der.clone().into()),
        )
        .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}

/// A TLS server on loopback that answers one HTTP request with `pt:<sni>`.
async fn tls_backend(pki: &Pki) -> SocketAddr {
    let acc = tls_acceptor(pki, &[]);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let acc = acc.clone();
            tokio::spawn(async move {
                let Ok(mut t) = acc.accept(s).await else {
                    return;
                };
                let sni = t.get_ref().1.server_name().unwrap_or("-").to_string();
                let mut buf = [0u8; 1024];
                let _ = t.read(&mut buf).await;
                let body = format!("pt:{sni}");
                let _ = t
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
                let _ = t.shutdown().await;
            });
        }
    });
    addr
}

async fn tls_get(
    at: SocketAddr,
    sni: &str,
    trust: &CertificateDer<'static>,
) -> std::io::Result<String> {
    tls_get_over(TcpStream::connect(at).await?, sni, trust).await
}

/// `GET /tls` over TLS on the connection `tcp`; the response as text.
async fn tls_get_over(
    tcp: TcpStream,
    sni: &str,
    trust: &CertificateDer<'static>,
) -> std::io::Result<String> {
    let conn = tokio_rustls::TlsConnector::from(client_config(trust, &[b"http/1.1"]));
    let mut t = conn
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await?;
    t.write_all(
        format!("GET /tls HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, t.read_to_end(&mut out)).await;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test]
async fn sni_passthrough_reaches_tls_backend() {
    let pki = pki(&["secure.gw.test"]);
    let b = tls_backend(&pki).await;
    let p = Proxy::start(settings(vec![route(
        "secure",
        TlsMode::Passthrough,
        vec![be(b)],
    )]))
    .await
    .unwrap();
    let r = tls_get(p.https_addrs()[0], "secure.gw.test", &pki.cert_der)
        .await
        .unwrap();
    assert!(
        r.starts_with("HTTP/1.1 200") && r.ends_with("pt:secure.gw.test"),
        "{r}"
    );
    // Plain HTTP for a passthrough route is redirected.
    let r = raw_http(p.http_addrs()[0], "secure.gw.test", "").await;
    assert!(r.starts_with("HTTP/1.1 308"), "{r}");
    assert!(
        r.contains("location: https://secure.gw.test/hello?x=1"),
        "{r}"
    );
    let st = p.stats();
    let s = st.iter().find(|s| s.route == "name:secure").unwrap();
    assert_eq!(s.connections, 1);
    assert!(s.bytes_in > 200 && s.bytes_out > 200, "{s:?}");
}

/// A backend behind a passthrough route gets its own certificates by
/// TLS-ALPN-01: a ClientHello offering only `acme-tls/1` reaches it, not an
/// `unrecognized_name` alert from the hub (which has no challenge for it).
#[tokio::test]
async fn passthrough_carries_the_backends_own_alpn01_validation() {
    let pki = pki(&["self.gw.test"]);
    let acc = tls_acceptor(&pki, &[b"acme-tls/1"]);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acc = acc.clone();
            tokio::spawn(async move {
                if let Ok(mut t) = acc.accept(s).await {
                    let _ = t.write_all(b"validated").await;
                    let _ = t.shutdown().await;
                }
            });
        }
    });
    let p = Proxy::start(settings(vec![route(
        "self",
        TlsMode::Passthrough,
        vec![be(b)],
    )]))
    .await
    .unwrap();
    let conn = tokio_rustls::TlsConnector::from(client_config(&pki.cert_der, &[b"acme-tls/1"]));
    let tcp = TcpStream::connect(p.https_addrs()[0]).await.unwrap();
    let mut t = tokio::time::timeout(
        T,
        conn.connect(ServerName::try_from("self.gw.test").unwrap(), tcp),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(t.get_ref().1.alpn_protocol(), Some(&b"acme-tls/1"[..]));
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, t.read_to_end(&mut out)).await;
    assert_eq!(out, b"validated");
}

/// `pki`'s certificate and key as PEM files in a fresh directory `tag`.
fn cert_files(tag: &str, pki: &Pki) -> CertFiles {
    let dir = tmpdir(tag);
    let (cert, key) = (dir.join("fullchain.pem"), dir.join("key.pem"));
    std::fs::write(&cert, &pki.cert_pem).unwrap();
    std::fs::write(&key, &pki.key_pem).unwrap();
    CertFiles { cert, key }
}

fn terminate_route(name: &str, pki: &Pki, backend: SocketAddr) -> RouteSettings {
    let mut r = route(name, TlsMode::Terminate, vec![be(backend)]);
    r.cert = Some(cert_files(name, pki));
    r
}

/// Writes `msg` and reads back as many bytes (within `T`).
async fn round_trip<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    msg: &[u8],
) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(T, s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    back
}

#[tokio::test]
async fn terminate_with_file_cert_http1_and_h2() {
    let pki_a = pki(&["blog.gw.test"]);
    let pki_b = pki(&["shop.gw.test"]);
    let pki_v = pki(&["vault.gw.test"]);
    let b = http_backend("tb").await;
    let mut vault = terminate_route("vault", &pki_v, b);
    vault.access = access(&[], &["127.0.0.0/8"]);
    let p = Proxy::start(settings(vec![
        terminate_route("blog", &pki_a, b),
        terminate_route("shop", &pki_b, b),
        vault,
    ]))
    .await
    .unwrap();
    let at = p.https_addrs()[0];
    let r = tls_get(at, "blog.gw.test", &pki_a.cert_der).await.unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        r.contains("tb /tls host=blog.gw.test xff=127.0.0.1 xfp=https"),
        "{r}"
    );
    // Per-name certificates: shop gets its own.
    let r = tls_get(at, "shop.gw.test", &pki_b.cert_der).await.unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // Host that disagrees with SNI: 421.
    let conn = tokio_rustls::TlsConnector::from(client_config(&pki_a.cert_der, &[]));
    let tcp = TcpStream::connect(at).await.unwrap();
    let mut t = conn
        .connect(ServerName::try_from("blog.gw.test").unwrap(), tcp)
        .await
        .unwrap();
    t.write_all(b"GET / HTTP/1.1\r\nHost: shop.gw.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    let _ = t.read_to_string(&mut out).await;
    assert!(out.starts_with("HTTP/1.1 421"), "{out}");
    // ... before the Host's route's own rules: a route that denies this
    // client answers 421 too (its rules are not probed from another name's
    // connection), and counts no denial.
    let tcp = TcpStream::connect(at).await.unwrap();
    let mut t = conn
        .connect(ServerName::try_from("blog.gw.test").unwrap(), tcp)
        .await
        .unwrap();
    t.write_all(b"GET / HTTP/1.1\r\nHost: vault.gw.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    let _ = t.read_to_string(&mut out).await;
    assert!(out.starts_with("HTTP/1.1 421"), "{out}");
    assert_eq!(denied(&p, "name:vault"), 0);

    // HTTP/2 over ALPN.
    let mut send = h2_client(at, "blog.gw.test", &pki_a.cert_der).await;
    let req = hyper::Request::builder()
        .uri("https://blog.gw.test/h2path")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("tb /h2path host=blog.gw.test"), "{body}");
}

/// A WebSocket backend speaking HTTP/1.1 only: it sends each opening
/// request's head to the returned channel, answers it with `101` (with
/// `Sec-WebSocket-Accept` for the request's key, or a wrong one when
/// `wrong_accept`), subprotocol `chat`, and echoes what follows.
async fn websocket_backend(
    wrong_accept: bool,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let key = head
                    .lines()
                    .find_map(|l| {
                        let (n, v) = l.split_once(':')?;
                        n.eq_ignore_ascii_case("sec-websocket-key")
                            .then(|| v.trim().to_string())
                    })
                    .unwrap_or_default();
                let _ = tx.send(head);
                let accept = if wrong_accept {
                    gatewire::carrier::ws::accept_for("not the key")
                } else {
                    gatewire::carrier::ws::accept_for(&key)
                };
                let answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: chat\r\n\r\n"
                );
                if s.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// A WebSocket over HTTP/2 (RFC 8441): the hub offers extended CONNECT,
/// opens the backend's WebSocket with an HTTP/1.1 upgrade of its own key,
/// answers the client `200` once the backend's `101` answers that key, and
/// relays the stream, which outlives the connection's idle closing; a `101`
/// that does not answer the key is a `502`; a plain `CONNECT` stays refused.
#[tokio::test]
async fn websocket_over_http2_reaches_an_http1_backend() {
    let pki_ws = pki(&["ws.gw.test", "bad.gw.test"]);
    let (good, mut heads) = websocket_backend(false).await;
    let (bad, _) = websocket_backend(true).await;
    let mut s = settings(vec![
        terminate_route("ws", &pki_ws, good),
        terminate_route("bad", &pki_ws, bad),
    ]);
    s.limits.header_timeout = Duration::from_secs(1);
    let p = Proxy::start(s).await.unwrap();
    let at = p.https_addrs()[0];
    let mut send = h2_client(at, "ws.gw.test", &pki_ws.cert_der).await;
    let connect = |host: &str| {
        let mut req = hyper::Request::builder()
            .method("CONNECT")
            .uri(format!("https://{host}/chat?room=1"))
            .header("sec-websocket-version", "13")
            .header("sec-websocket-protocol", "chat, superchat")
            .body(Full::new(Bytes::new()))
            .unwrap();
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        req
    };
    // Any answer first: the hub's SETTINGS (which offer extended CONNECT)
    // have then been read.
    let req = hyper::Request::builder()
        .uri("https://other.gw.test/")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 404);
    let mut resp = tokio::time::timeout(T, send.send_request(connect("ws.gw.test")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["sec-websocket-protocol"], "chat");
    assert!(!resp.headers().contains_key("sec-websocket-accept"));
    let head = heads.recv().await.unwrap().to_lowercase();
    assert!(head.starts_with("get /chat?room=1 http/1.1\r\n"), "{head}");
    for want in [
        "host: ws.gw.test",
        "upgrade: websocket",
        "connection: upgrade",
        "sec-websocket-version: 13",
        "sec-websocket-protocol: chat, superchat",
        "sec-websocket-key: ",
        "x-forwarded-proto: https",
    ] {
        assert!(head.contains(want), "{want} in {head}");
    }
    let up = hyper::upgrade::on(&mut resp).await.unwrap();
    let mut io = TokioIo::new(up);
    assert_eq!(
        round_trip(&mut io, b"hello over h2").await,
        b"hello over h2"
    );
    // Quiet for longer than an idle connection is kept: the WebSocket's
    // stream keeps it open.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(round_trip(&mut io, b"still here").await, b"still here");

    let mut send = h2_client(at, "bad.gw.test", &pki_ws.cert_der).await;
    let req = hyper::Request::builder()
        .uri("https://other.gw.test/")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 404);
    let resp = tokio::time::timeout(T, send.send_request(connect("bad.gw.test")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 502);
    let stats = p.stats();
    let bad = stats.iter().find(|r| r.route == "name:bad").unwrap();
    assert_eq!(
        bad.errors.get("backend_protocol"),
        Some(&1),
        "{:?}",
        bad.errors
    );
    // Any other CONNECT is not tunnelled.
    let req = hyper::Request::builder()
        .method("CONNECT")
        .uri("ws.gw.test:443")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(T, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 405);
}

/// An HTTP/2 client connection over TLS (ALPN `h2`) to the proxy at `at`.
async fn h2_client(
    at: SocketAddr,
    sni: &str,
    trust: &CertificateDer<'static>,
) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let conn = tokio_rustls::TlsConnector::from(client_config(trust, &[b"h2"]));
    let tcp = TcpStream::connect(at).await.unwrap();
    let t = conn
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(t.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, c) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(t),
    )
    .await
    .unwrap();
    tokio::spawn(c);
    send
}

/// An HTTP/2-only backend (prior knowledge, or TLS offering only ALPN `h2`
/// with `tls`), like a gRPC server: it answers `h2 <uri> ver=.. te=.. xff=..
/// len=<request body bytes>` followed by gRPC-style trailers, and counts the
/// connections it accepted.
async fn h2_backend(tls: Option<&Pki>) -> (SocketAddr, Arc<AtomicUsize>) {
    let acc = tls.map(|pki| tls_acceptor(pki, &[b"h2"]));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let n = conns.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            n.fetch_add(1, SeqCst);
            let acc = acc.clone();
            tokio::spawn(async move {
                let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let h = |n: &str| header(&req, n);
                    let head = format!(
                        "h2 {} ver={:?} te={} xff={} host={}",
                        req.uri(),
                        req.version(),
                        h("te"),
                        h("x-forwarded-for"),
                        h("host"),
                    );
                    let len = match req.into_body().collect().await {
                        Ok(c) => c.to_bytes().len(),
                        Err(_) => 0,
                    };
                    let mut tr = hyper::HeaderMap::new();
                    tr.insert("grpc-status", "0".parse().unwrap());
                    tr.insert("grpc-message", "ok".parse().unwrap());
                    let body = Full::new(Bytes::from(format!("{head} len={len}")))
                        .with_trailers(async move { Some(Ok(tr)) });
                    Ok::<_, Infallible>(hyper::Response::new(body))
                });
                let b =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                match acc {
                    Some(a) => {
                        if let Ok(t) = a.accept(s).await {
                            let _ = b.serve_connection(TokioIo::new(t), svc).await;
                        }
                    }
                    None => {
                        let _ = b.serve_connection(TokioIo::new(s), svc).await;
                    }
                }
            });
        }
    });
    (addr, conns)
}

#[tokio::test]
async fn http2_backend_carries_trailers_on_one_connection() {
    let pki = pki(&["grpc.gw.test"]);
    let (b, conns) = h2_backend(None).await;
    let mut r = terminate_route("grpc", &pki, b);
    r.backend_protocol = BackendProtocol::Http2;
    let p = Proxy::start(settings(vec![r])).await.unwrap();
    let mut send = h2_client(p.https_addrs()[0], "grpc.gw.test", &pki.cert_der).await;
    let call = |send: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>| {
        let req = hyper::Request::post("https://grpc.gw.test/pkg.Svc/Call")
            .header("te", "trailers")
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\x05hello")))
            .unwrap();
        send.send_request(req)
    };
    let resp = call(&mut send).await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = resp.into_body().collect().await.unwrap();
    assert_eq!(got.trailers().unwrap()["grpc-status"], "0");
    let body = String::from_utf8_lossy(&got.to_bytes()).into_owned();
    assert!(
        body.starts_with("h2 https://grpc.gw.test/pkg.Svc/Call ver=HTTP/2.0 te=trailers xff=127.0.0.1 host=- len=10"),
        "{body}"
    );
    // Concurrent calls share the backend's one HTTP/2 connection.
    let calls: Vec<_> = (0..20).map(|_| call(&mut send)).collect();
    for c in calls {
        let got = c.await.unwrap().into_body().collect().await.unwrap();
        assert_eq!(got.trailers().unwrap()["grpc-message"], "ok");
    }
    assert_eq!(conns.load(SeqCst), 1);
    // After an idle spell the connection is not trusted any more (the node
    // may have gone): a burst of calls makes one new connection, not one each.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let calls: Vec<_> = (0..20).map(|_| call(&mut send)).collect();
    for c in calls {
        assert_eq!(c.await.unwrap().status(), 200);
    }
    assert_eq!(conns.load(SeqCst), 2);
    // HTTP/1.1 clients are served too (trailers only when they send TE).
    let r = raw_http(p.http_addrs()[0], "grpc.gw.test", "").await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("h2 http://grpc.gw.test/hello?x=1"),
        "{r}"
    );
    // An upgrade cannot cross to an HTTP/2 backend: a clear 501.
    let r = raw_http(
        p.http_addrs()[0],
        "grpc.gw.test",
        "Connection: Upgrade\r\nUpgrade: websocket\r\n",
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 501") && r.contains("backend_protocol"),
        "{r}"
    );
    let st = p.stats();
    let s = st.iter().find(|s| s.route == "name:grpc").unwrap();
    assert_eq!(s.requests, 43);
    assert_eq!(s.errors.get("backend_protocol"), Some(&1), "{s:?}");
    assert_eq!(s.errors.values().sum::<u64>(), 1, "{s:?}");
}

/// An HTTP/2 backend allowing `streams` streams per connection, as a gRPC
/// server with `max_concurrent_streams` does; `/hold` answers only when
/// released (a long server-streaming call), other paths at once. Returns its
/// address, its connection count, the count of held calls and the release.
async fn holding_h2_backend(
    streams: u32,
) -> (
    SocketAddr,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    tokio::sync::watch::Sender<bool>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let held = Arc::new(AtomicUsize::new(0));
    let (release, released) = tokio::sync::watch::channel(false);
    let (n, h) = (conns.clone(), held.clone());
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            n.fetch_add(1, SeqCst);
            let (h, released) = (h.clone(), released.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (h, mut released) = (h.clone(), released.clone());
                    async move {
                        if req.uri().path() == "/hold" {
                            h.fetch_add(1, SeqCst);
                            let _ = released.wait_for(|r| *r).await;
                        }
                        let body = Full::new(Bytes::from(format!("done {}", req.uri().path())));
                        Ok::<_, Infallible>(hyper::Response::new(body))
                    }
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .max_concurrent_streams(streams)
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
            });
        }
    });
    (b, conns, held, release)
}

#[tokio::test]
async fn http2_backend_full_of_long_streams_gets_another_connection() {
    let (b, conns, held, release) = holding_h2_backend(2).await;
    let mut r = route("grpc", TlsMode::Terminate, vec![be(b)]);
    r.backend_protocol = BackendProtocol::Http2;
    let p = Proxy::start(settings(vec![r])).await.unwrap();
    let http = p.http_addrs()[0];
    let get = move |path: &'static str| async move {
        let req = format!("GET {path} HTTP/1.1\r\nHost: grpc.gw.test\r\nConnection: close\r\n\r\n");
        String::from_utf8_lossy(&exchange(http, req.as_bytes()).await).into_owned()
    };
    // A first call, so the hub has read the backend's SETTINGS (a
    // connection's first moments go by the default of 100 streams).
    assert!(get("/first").await.ends_with("done /first"));
    let holds: Vec<_> = (0..2).map(|_| tokio::spawn(get("/hold"))).collect();
    let deadline = tokio::time::Instant::now() + T;
    while held.load(SeqCst) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the held calls never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(conns.load(SeqCst), 1, "two streams fit on one connection");
    // The first connection is full: this call goes on a second one instead
    // of waiting behind the held ones.
    let r = tokio::time::timeout(T, get("/quick"))
        .await
        .expect("a call behind two long streams was not served");
    assert!(
        r.starts_with("HTTP/1.1 200") && r.ends_with("done /quick"),
        "{r}"
    );
    assert_eq!(conns.load(SeqCst), 2);
    release.send(true).unwrap();
    for h in holds {
        let r = tokio::time::timeout(T, h).await.unwrap().unwrap();
        assert!(
            r.starts_with("HTTP/1.1 200") && r.ends_with("done /hold"),
            "{r}"
        );
    }
    // With the streams ended, calls go on the first connection again.
    for _ in 0..3 {
        assert!(get("/again").await.starts_with("HTTP/1.1 200"));
    }
    assert_eq!(conns.load(SeqCst), 2);
}

#[tokio::test]
async fn a_burst_of_long_calls_shares_a_new_http2_connection_at_once() {
    // No connection yet: one call connects, the others wait for it, then all
    // go out on it together; none waits for another's answer.
    let (b, conns, held, release) = holding_h2_backend(100).await;
    let mut r = route("grpc", TlsMode::Terminate, vec![be(b)]);
    r.backend_protocol = BackendProtocol::Http2;
    let p = Proxy::start(settings(vec![r])).await.unwrap();
    let http = p.http_addrs()[0];
    let get = move |path: &'static str| async move {
        let req = format!("GET {path} HTTP/1.1\r\nHost: grpc.gw.test\r\nConnection: close\r\n\r\n");
        String::from_utf8_lossy(&exchange(http, req.as_bytes()).await).into_owned()
    };
    let holds: Vec<_> = (0..6).map(|_| tokio::spawn(get("/hold"))).collect();
    let deadline = tokio::time::Instant::now() + T;
    while held.load(SeqCst) < 6 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of 6 calls reached the backend while the first were unanswered",
            held.load(SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(conns.load(SeqCst), 1);
    release.send(true).unwrap();
    for h in holds {
        let r = tokio::time::timeout(T, h).await.unwrap().unwrap();
        assert!(
            r.starts_with("HTTP/1.1 200") && r.ends_with("done /hold"),
            "{r}"
        );
    }
}

#[tokio::test]
async fn h2c_clients_on_the_plain_listener() {
    // Prior-knowledge HTTP/2 on the plain port (gRPC without TLS), to an
    // HTTP/2 backend (trailers arrive) and to an HTTP/1.1 one.
    let (b2, _) = h2_backend(None).await;
    let b1 = http_backend("one").await;
    let mut g = route("g", TlsMode::Terminate, vec![be(b2)]);
    g.backend_protocol = BackendProtocol::Http2;
    let p = Proxy::start(settings(vec![
        g,
        route("w", TlsMode::Terminate, vec![be(b1)]),
    ]))
    .await
    .unwrap();
    let tcp = TcpStream::connect(p.http_addrs()[0]).await.unwrap();
    let (mut send, c) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(c);
    let req = hyper::Request::post("http://g.gw.test/pkg.Svc/Call")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"abc")))
        .unwrap();
    let got = send
        .send_request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    assert_eq!(got.trailers().unwrap()["grpc-status"], "0");
    let body = String::from_utf8_lossy(&got.to_bytes()).into_owned();
    assert!(
        body.starts_with("h2 http://g.gw.test/pkg.Svc/Call ver=HTTP/2.0 te=trailers xff=127.0.0.1"),
        "{body}"
    );
    let req = hyper::Request::get("http://w.gw.test/x")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("one /x host=w.gw.test xff=127.0.0.1 xfp=http "),
        "{body}"
    );
    // HTTP/1.1 on the same port, a request line starting like the preface too.
    let r = raw_http(p.http_addrs()[0], "w.gw.test", "").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let out = exchange(
        p.http_addrs()[0],
        b"PRI /x HTTP/1.1\r\nHost: w.gw.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 "), "{out}");
}

#[tokio::test]
async fn silent_and_stalled_plain_clients_are_closed() {
    let b = http_backend("one").await;
    let mut st = settings(vec![route("w", TlsMode::Terminate, vec![be(b)])]);
    st.limits.header_timeout = Duration::from_millis(300);
    let p = Proxy::start(st).await.unwrap();
    // Nothing sent, a stall inside the HTTP/2 preface, a stall inside an
    // HTTP/1 head: each closed at the header timeout (`exchange` gives up
    // after 10 s).
    for first in [
        &b""[..],
        b"PRI * HTTP/2",
        b"GET / HTTP/1.1\r\nHost: w.gw.test\r\n",
    ] {
        let out = exchange(p.http_addrs()[0], first).await;
        assert!(
            out.is_empty() || out.starts_with(b"HTTP/1.1 408"),
            "{first:?}: {out:?}"
        );
    }
    let r = raw_http(p.http_addrs()[0], "w.gw.test", "").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[tokio::test]
async fn a_dribbling_client_gets_one_header_timeout_from_its_accept() {
    let b = http_backend("one").await;
    let mut st = settings(vec![route("w", TlsMode::Terminate, vec![be(b)])]);
    st.limits.header_timeout = Duration::from_millis(1000);
    let p = Proxy::start(st).await.unwrap();
    let begun = std::time::Instant::now();
    let mut s = TcpStream::connect(p.http_addrs()[0]).await.unwrap();
    // The first byte late, then one byte every 100 ms: the head never ends.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let head = b"GET / HTTP/1.1\r\nHost: w.gw.test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed = None;
    for b in head {
        if s.write_all(&[*b]).await.is_err() {
            closed = Some(begun.elapsed());
            break;
        }
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = Some(begun.elapsed());
                break;
            }
            Ok(Ok(n)) => panic!("an answer to half a head: {:?}", &buf[..n]),
            Err(_) => {}
        }
    }
    let closed = closed.expect("the connection outlived its head");
    // Closed once, at the header timeout from the accept; a fresh timer
    // after the first byte would have closed it at about 1.8 s.
    assert!(closed >= Duration::from_millis(950), "{closed:?}");
    assert!(closed < Duration::from_millis(1600), "{closed:?}");
    let st = p.stats();
    let l = st.iter().find(|s| s.route == "listener").unwrap();
    assert_eq!(l.errors.get("header_timeout"), Some(&1), "{l:?}");
    let r = raw_http(p.http_addrs()[0], "w.gw.test", "").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[tokio::test]
async fn idle_http2_clients_are_closed_but_not_their_open_calls() {
    let (b, _, held, release) = holding_h2_backend(100).await;
    let mut r = route("g", TlsMode::Terminate, vec![be(b)]);
    r.backend_protocol = BackendProtocol::Http2;
    let mut st = settings(vec![r]);
    st.limits.header_timeout = Duration::from_millis(300);
    let p = Proxy::start(st).await.unwrap();
    let tcp = TcpStream::connect(p.http_addrs()[0]).await.unwrap();
    let (mut send, c) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(c);
    // A call held for three times the idle limit keeps the connection.
    let req = hyper::Request::get("http://g.gw.test/hold")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let call = tokio::spawn(send.send_request(req));
    let deadline = tokio::time::Instant::now() + T;
    while held.load(SeqCst) < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the call never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(!conn.is_finished(), "closed under an open call");
    release.send(true).unwrap();
    let resp = call.await.unwrap().unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"done /hold");
    // Then nothing more: the hub closes the connection.
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("an idle HTTP/2 connection stayed open")
        .unwrap()
        .unwrap();
}

/// A body that announces 100 bytes, gives 5, then nothing ever.
struct Stall(bool);

impl hyper::body::Body for Stall {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        if self.0 {
            return std::task::Poll::Pending;
        }
        self.0 = true;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
            b"12345",
        )))))
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(100)
    }
}

/// A backend: `/stall` answers with a [`Stall`] body, any other path with
/// the length of the request body it read.
async fn stalling_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    if req.uri().path() == "/stall" {
                        return Ok::<_, Infallible>(hyper::Response::new(
                            http_body_util::Either::Left(Stall(false)),
                        ));
                    }
                    let n = match req.into_body().collect().await {
                        Ok(b) => b.to_bytes().len(),
                        Err(_) => 0,
                    };
                    Ok(hyper::Response::new(http_body_util::Either::Right(
                        Full::new(Bytes::from(format!("len={n}"))),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn stalled_bodies_fail_and_slow_uploads_are_answered() {
    let b = stalling_backend().await;
    let mut st = settings(vec![route("s", TlsMode::Terminate, vec![be(b)])]);
    st.limits.idle_timeout = Duration::from_millis(500);
    st.limits.response_timeout = Duration::from_millis(300);
    let p = Proxy::start(st).await.unwrap();
    let at = p.http_addrs()[0];
    // A backend that stops mid-body: the answer is cut off at idle_timeout
    // (`exchange` waits for the end, 10 s at most).
    let out = exchange(at, b"GET /stall HTTP/1.1\r\nHost: s.gw.test\r\n\r\n").await;
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("12345"),
        "{out}"
    );
    // An upload four times as long as response_timeout, never idle: the
    // backend's answer comes.
    let mut s = TcpStream::connect(at).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: s.gw.test\r\nContent-Length: 10\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(120)).await;
        s.write_all(b"x").await.unwrap();
    }
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("len=10"),
        "{out}"
    );
    // An upload that stops: 408, the client's doing.
    let out = exchange(
        at,
        b"POST /echo HTTP/1.1\r\nHost: s.gw.test\r\nContent-Length: 10\r\n\r\nxx",
    )
    .await;
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    // An upload whose client goes away: not the backend's fault.
    let mut s = TcpStream::connect(at).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: s.gw.test\r\nContent-Length: 10\r\n\r\nxx")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(s);
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let st = p.stats();
        let s = st.iter().find(|s| s.route == "name:s").unwrap();
        if s.errors.contains_key("client_aborted") {
            assert_eq!(s.errors.get("backend_timeout"), Some(&1), "{s:?}");
            assert_eq!(s.errors.get("client_timeout"), Some(&1), "{s:?}");
            assert_eq!(s.errors.get("client_aborted"), Some(&1), "{s:?}");
            assert_eq!(s.errors.get("backend_protocol"), None, "{s:?}");
            assert!(
                s.backends.iter().all(|b| b.active_connections == 0),
                "{s:?}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 64 KiB of a body that never ends.
static ENDLESS: [u8; 65536] = [b'e'; 65536];

/// A body that never ends: 64 KiB frames for as long as it is read.
struct Endless;

impl hyper::body::Body for Endless {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
            &ENDLESS,
        )))))
    }
}

/// A backend: `/endless` answers with an [`Endless`] body, `/empty` with
/// an empty one, any other path with `small`.
async fn endless_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let body = match req.uri().path() {
                        "/endless" => http_body_util::Either::Left(Endless),
                        "/empty" => http_body_util::Either::Right(Full::new(Bytes::new())),
                        _ => http_body_util::Either::Right(Full::new(Bytes::from_static(b"small"))),
                    };
                    Ok::<_, Infallible>(hyper::Response::new(body))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn clients_that_take_nothing_are_cut_off_at_idle_timeout() {
    let b = endless_backend().await;
    let mut st = settings(vec![route("e", TlsMode::Terminate, vec![be(b)])]);
    let idle = Duration::from_millis(800);
    st.limits.idle_timeout = idle;
    let p = Proxy::start(st).await.unwrap();
    let at = p.http_addrs()[0];
    let stats = || p.stats().into_iter().find(|s| s.route == "name:e").unwrap();
    let not_reading = || stats().errors.get("client_not_reading").copied();
    let released = || stats().backends.iter().all(|b| b.active_connections == 0);
    async fn eventually(what: &str, ok: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + T;
        while !ok() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // HTTP/1.1, a client that reads in bursts a quarter of idle_timeout
    // apart: never cut off.
    let mut s = TcpStream::connect(at).await.unwrap();
    s.write_all(b"GET /endless HTTP/1.1\r\nHost: e.gw.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0;
    let until = tokio::time::Instant::now() + idle * 4;
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(idle / 4).await;
        loop {
            match s.try_read(&mut buf) {
                Ok(0) => panic!("a client that reads was cut off after {got} bytes"),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("a client that reads was cut off after {got} bytes: {e}"),
            }
        }
    }
    assert!(got > 1 << 20, "{got}");
    drop(s);
    eventually("the reader's exchange ended", released).await;
    assert_eq!(not_reading(), None);

    // A client that never reads: cut off at idle_timeout once the buffers
    // on the way are full, its backend connection let go.
    let mut s = TcpStream::connect(at).await.unwrap();
    s.write_all(b"GET /endless HTTP/1.1\r\nHost: e.gw.test\r\n\r\n")
        .await
        .unwrap();
    let begun = tokio::time::Instant::now();
    eventually("an HTTP/1.1 client that never reads was cut off", || {
        not_reading() == Some(1)
    })
    .await;
    assert!(begun.elapsed() >= idle, "{:?}", begun.elapsed());
    eventually("its backend connection was let go", released).await;
    // It gets what was sent, then the end.
    let mut sink = Vec::new();
    let end = tokio::time::timeout(T, s.read_to_end(&mut sink)).await;
    assert!(end.is_ok(), "the connection stayed open");

    // HTTP/2, a stream whose window the client never opens: that stream is
    // reset at idle_timeout; the connection goes on.
    let tcp = TcpStream::connect(at).await.unwrap();
    let (mut send, c) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(0)
            .handshake(TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(c);
    let get = |path: &str| {
        hyper::Request::get(format!("http://e.gw.test{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let resp = send.send_request(get("/endless")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let begun = tokio::time::Instant::now();
    let body = tokio::time::timeout(T, resp.into_body().collect())
        .await
        .expect("a stream the client takes nothing of stayed open");
    assert!(body.is_err(), "the stream was reset");
    assert!(begun.elapsed() >= idle * 3 / 4, "{:?}", begun.elapsed());
    eventually("the stream's cut was counted", || not_reading() == Some(2)).await;
    eventually("its backend connection was let go", released).await;
    let resp = send.send_request(get("/empty")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(body.is_empty());
    assert!(!conn.is_finished());

    // Other clients are served meanwhile.
    let r = raw_http(at, "e.gw.test", "").await;
    assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("small"), "{r}");
}

#[tokio::test]
async fn http2_backends_are_balanced() {
    let (b1, c1) = h2_backend(None).await;
    let (b2, c2) = h2_backend(None).await;
    let mut r = route("rr", TlsMode::Terminate, vec![be(b1), be(b2)]);
    r.backend_protocol = BackendProtocol::Http2;
    let p = Proxy::start(settings(vec![r])).await.unwrap();
    for _ in 0..4 {
        let r = raw_http(p.http_addrs()[0], "rr.gw.test", "").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    assert_eq!((c1.load(SeqCst), c2.load(SeqCst)), (1, 1));
}

#[tokio::test]
async fn http2_backend_over_tls_needs_alpn_h2_and_is_health_checked() {
    let pki_front = pki(&["a.gw.test", "b.gw.test"]);
    let pki_back = pki(&["backend.internal"]);
    let (h2tls, _) = h2_backend(Some(&pki_back)).await;
    let h1tls = tls_backend(&pki_back).await;
    let ca = tmpdir("h2ca").join("ca.pem");
    std::fs::write(&ca, &pki_back.cert_pem).unwrap();
    let https = |r: &mut RouteSettings, b: SocketAddr| {
        r.backends = vec![Backend {
            scheme: Scheme::Https,
            addr: b,
        }];
        r.backend_protocol = BackendProtocol::Http2;
        r.backend_tls = BackendTls {
            ca: Some(ca.clone()),
            server_name: Some("backend.internal".into()),
            insecure_skip_verify: false,
        };
    };
    let mut a = terminate_route("a", &pki_front, h2tls);
    https(&mut a, h2tls);
    let mut b = terminate_route("b", &pki_front, h1tls);
    https(&mut b, h1tls);
    // An HTTP health check over HTTP/2: an HTTP/1.1-only backend fails it.
    let (h2c, _) = h2_backend(None).await;
    let h1 = http_backend("old").await;
    let mut c = route("c", TlsMode::Terminate, vec![be(h2c), be(h1)]);
    c.backend_protocol = BackendProtocol::Http2;
    c.balance.health = Some(HealthCheck {
        kind: HealthKind::Http {
            path: "/healthz".into(),
        },
        interval: Duration::from_millis(100),
        timeout: Duration::from_secs(1),
        fall: 1,
        rise: 1,
        send: Default::default(),
    });
    let p = Proxy::start(settings(vec![a, b, c])).await.unwrap();
    let r = raw_http(p.http_addrs()[0], "a.gw.test", "").await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("ver=HTTP/2.0"),
        "{r}"
    );
    // The backend offers no ALPN `h2`: 502, counted as a backend TLS error.
    let r = raw_http(p.http_addrs()[0], "b.gw.test", "").await;
    assert!(r.starts_with("HTTP/1.1 502") && r.contains("HTTP/2"), "{r}");
    let st = p.stats();
    let sb = st.iter().find(|s| s.route == "name:b").unwrap();
    assert_eq!(sb.errors.get("backend_tls"), Some(&1), "{sb:?}");
    let mut health = Vec::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let st = p.stats();
        let sc = st.iter().find(|s| s.route == "name:c").unwrap();
        health = sc.backends.iter().map(|b| b.check).collect();
        if health == [Some("passing"), Some("failing")] {
            break;
        }
    }
    assert_eq!(health, [Some("passing"), Some("failing")]);
    for _ in 0..4 {
        let r = raw_http(p.http_addrs()[0], "c.gw.test", "").await;
        assert!(
            r.starts_with("HTTP/1.1 200") && r.contains("ver=HTTP/2.0"),
            "{r}"
        );
    }
}

/// The raw ClientHello a rustls client sends for `sni`.
fn client_hello(sni: &str) -> Vec<u8> {
    let pki = pki(&["x.test"]);
    let mut c = rustls::ClientConnection::new(
        client_config(&pki.cert_der, &[]),
        ServerName::try_from(sni.to_string()).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    c.write_tls(&mut out).unwrap();
    out
}

#[tokio::test]
async fn unknown_sni_gets_unrecognized_name_alert() {
    let b = http_backend("x").await;
    let p = Proxy::start(settings(vec![route(
        "x",
        TlsMode::Passthrough,
        vec![be(b)],
    )]))
    .await
    .unwrap();
    let hello = client_hello("nope.gw.test");
    let mut s = TcpStream::connect(p.https_addrs()[0]).await.unwrap();
    // Split the ClientHello over two writes: the proxy must reassemble it.
    let (a, rest) = hello.split_at(20);
    s.write_all(a).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(rest).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out, [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70]);
    // Garbage gets a decode_error alert, not a crash.
    let out = exchange(
        p.https_addrs()[0],
        &[0x16, 0x03, 0x01, 0x00, 0x05, 0x02, 0, 0, 1, 0],
    )
    .await;
    assert_eq!(out.first(), Some(&0x15));
    let st = p.stats();
    let l = st.iter().find(|s| s.route == "listener").unwrap();
    assert_eq!(l.errors.get("unknown_sni"), Some(&1));
    assert_eq!(l.errors.get("bad_client_hello"), Some(&1));
}

async fn tcp_backend(proxy_protocol: bool) -> (SocketAddr, tokio::sync::mpsc::Receiver<Command>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut have = 0;
                if proxy_protocol {
                    loop {
                        let n = s.read(&mut buf[have..]).await.unwrap();
                        assert!(n > 0);
                        have += n;
                        match decode_v2(&buf[..have]) {
                            Ok(d) => {
                                tx.send(d.command).await.unwrap();
                                buf.copy_within(d.len..have, 0);
                                have -= d.len;
                                break;
                            }
                            Err(gatewire::proxy::proxy_protocol::DecodeError::Incomplete) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                if have > 0 {
                    s.write_all(&buf[..have]).await.unwrap();
                }
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn tcp_forward_with_and_without_proxy_v2() {
    let (plain, _) = tcp_backend(false).await;
    let (pp, mut seen) = tcp_backend(true).await;
    let mut s = settings(vec![]);
    s.tcp = vec![
        tcp_forward(plain),
        TcpForwardSettings {
            proxy_protocol: ProxyProtocol::V2,
            ..tcp_forward(pp)
        },
    ];
    let p = Proxy::start(s).await.unwrap();
    for (i, at) in p.tcp_addrs().iter().enumerate() {
        let mut c = TcpStream::connect(at).await.unwrap();
        let back = round_trip(&mut c, b"hello tcp").await;
        assert_eq!(&back, b"hello tcp", "forward {i}");
        if i == 1 {
            let cmd = tokio::time::timeout(T, seen.recv()).await.unwrap().unwrap();
            let Command::Proxy { src, dst, .. } = cmd else {
                panic!("{cmd:?}")
            };
            assert_eq!(src, c.local_addr().unwrap());
            assert_eq!(dst, *at);
        }
    }
    let st = p.stats();
    let f = st.iter().find(|s| s.route.starts_with("tcp:")).unwrap();
    assert_eq!(f.connections, 1);
}

#[tokio::test]
async fn tcp_forward_terminates_tls() {
    let pki = pki(&["db.example.org"]);
    let (pp, mut seen) = tcp_backend(true).await;
    let mut s = settings(vec![]);
    s.tcp = vec![TcpForwardSettings {
        proxy_protocol: ProxyProtocol::V2,
        tls: Some(TcpTls::Files(cert_files("tcp-tls", &pki))),
        ..tcp_forward(pp)
    }];
    let p = Proxy::start(s).await.unwrap();
    let at = p.tcp_addrs()[0];
    // A client that does not speak TLS: closed, counted, no backend connection.
    let out = exchange(at, b"hello plain\r\n").await;
    assert!(!out.starts_with(b"hello"), "{out:?}");
    // A TLS client: verified certificate, the plain stream reaches the
    // backend, which learns the client's address from the PROXY header.
    let conn = tokio_rustls::TlsConnector::from(client_config(&pki.cert_der, &[]));
    let tcp = TcpStream::connect(at).await.unwrap();
    let me = tcp.local_addr().unwrap();
    let mut t = conn
        .connect(ServerName::try_from("db.example.org").unwrap(), tcp)
        .await
        .unwrap();
    let back = round_trip(&mut t, b"hello tls").await;
    assert_eq!(&back, b"hello tls");
    let cmd = tokio::time::timeout(T, seen.recv()).await.unwrap().unwrap();
    let Command::Proxy { src, .. } = cmd else {
        panic!("{cmd:?}")
    };
    assert_eq!(src, me, "the first PROXY header is the TLS client's");
    let st = p.stats();
    let f = st.iter().find(|s| s.route.starts_with("tcp:")).unwrap();
    assert_eq!(f.connections, 2);
    assert_eq!(f.errors.get("tls_handshake"), Some(&1), "{f:?}");
}

#[tokio::test]
async fn passthrough_sends_proxy_v2_before_the_hello() {
    let (pp, mut seen) = tcp_backend(true).await;
    let mut r = route("pp", TlsMode::Passthrough, vec![be(pp)]);
    r.proxy_protocol = ProxyProtocol::V2;
    let p = Proxy::start(settings(vec![r])).await.unwrap();
    let hello = client_hello("pp.gw.test");
    let mut c = TcpStream::connect(p.https_addrs()[0]).await.unwrap();
    c.write_all(&hello).await.unwrap();
    let cmd = tokio::time::timeout(T, seen.recv()).await.unwrap().unwrap();
    let Command::Proxy { src, .. } = cmd else {
        panic!("{cmd:?}")
    };
    assert_eq!(src, c.local_addr().unwrap());
    // The echo backend returns the ClientHello bytes unchanged after the header.
    let mut back = vec![0u8; hello.len()];
    tokio::time::timeout(T, c.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, hello);
}

#[tokio::test]
async fn udp_forward_echo_and_flows() {
    let echo_addr = udp_echo().await;
    let mut s = settings(vec![]);
    s.udp = vec![UdpForwardSettings {
        max_flows: 2,
        ..udp_forward(echo_addr)
    }];
    let p = Proxy::start(s).await.unwrap();
    let at = p.udp_addrs()[0];
    let mut clients = Vec::new();
    for i in 0..3u8 {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.send_to(&[b'q', i], at).await.unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = tokio::time::timeout(T, c.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], &[b'q', i]);
        assert_eq!(from, at, "replies come from the listening socket");
        clients.push(c);
    }
    // The first flow was evicted (max 2) but a new packet opens a new flow.
    clients[0].send_to(b"again", at).await.unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = tokio::time::timeout(T, clients[0].recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"again");
    let st = p.stats();
    let u = st.iter().find(|s| s.route.starts_with("udp:")).unwrap();
    assert_eq!(u.requests, 4, "flows created");
    assert_eq!(u.bytes_in, 11);
    assert_eq!(u.bytes_out, 11);
}

#[tokio::test]
async fn oversized_headers_are_refused_and_proxy_stays_up() {
    let b = http_backend("big").await;
    let p = Proxy::start(settings(vec![route(
        "big",
        TlsMode::Terminate,
        vec![be(b)],
    )]))
    .await
    .unwrap();
    let at = p.http_addrs()[0];
    let huge = format!("X-Big: {}\r\n", "a".repeat(64 * 1024));
    let mut s = TcpStream::connect(at).await.unwrap();
    let _ = s
        .write_all(format!("GET / HTTP/1.1\r\nHost: big.gw.test\r\n{huge}\r\n").as_bytes())
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 431"), "{out}");
    let r = raw_http(at, "big.gw.test", "").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[tokio::test]
async fn shutdown_stops_accepting() {
    let b = http_backend("s").await;
    let p = Proxy::start(settings(vec![route("s", TlsMode::Terminate, vec![be(b)])]))
        .await
        .unwrap();
    let at = p.http_addrs()[0];
    assert!(raw_http(at, "s.gw.test", "")
        .await
        .starts_with("HTTP/1.1 200"));
    p.shutdown(Duration::from_secs(1)).await;
    assert!(TcpStream::connect(at).await.is_err());
}

/// An upgraded (echo) connection from `src` to `at`, for `host`: busy for
/// as long as it is open.
async fn upgraded_from(src: &str, at: SocketAddr, host: &str) -> TcpStream {
    let mut s = connect_from(src, at).await;
    let req =
        format!("GET /ws HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(T, s.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    s
}

/// Whether the hub closed `s` within `wait` without sending anything.
async fn closed_unanswered<S: tokio::io::AsyncRead + Unpin>(s: &mut S, wait: Duration) -> bool {
    let mut out = Vec::new();
    let r = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    matches!(r, Ok(Ok(0)) | Ok(Err(_))) && out.is_empty()
}

/// `GET /` for `host` on `s`, kept alive: whether it was answered 200.
async fn get_kept<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    host: &str,
) -> bool {
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(T, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    buf[..n].starts_with(b"HTTP/1.1 200")
}

/// The overall connection limit: past `max_connections`, with every open
/// connection busy (here upgraded), a new client connection is closed at
/// once and counted; once one closes, the next is served.
#[tokio::test]
async fn overall_connection_limit() {
    let b = http_backend("lim").await;
    let mut s = settings(vec![route("lim", TlsMode::Terminate, vec![be(b)])]);
    s.limits.max_connections = 2;
    let p = Proxy::start(s).await.unwrap();
    let at = p.http_addrs()[0];
    let c1 = upgraded_from("127.0.0.2", at, "lim.gw.test").await;
    let mut c2 = upgraded_from("127.0.0.3", at, "lim.gw.test").await;
    let mut c3 = connect_from("127.0.0.4", at).await;
    let _ = c3
        .write_all(b"GET / HTTP/1.1\r\nHost: lim.gw.test\r\n\r\n")
        .await;
    assert!(
        closed_unanswered(&mut c3, T).await,
        "the third connection is closed unanswered"
    );
    let st = p.stats();
    let l = st.iter().find(|s| s.route == "listener").unwrap();
    assert_eq!(l.errors.get("over_capacity"), Some(&1));
    assert_eq!(l.errors.get("evicted"), None);
    // The busy ones were not touched.
    assert_eq!(round_trip(&mut c2, b"still here").await, b"still here");
    drop(c1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = raw_http(at, "lim.gw.test", "").await;
    assert!(r.starts_with("HTTP/1.1 200"), "served again: {r}");
}

/// Connections left idle (a keep-alive one after its request, silent ones
/// that never sent one, a TLS one that never finished its ClientHello) from
/// a few clients, each within its own share, cannot lock a new client out
/// once `max_connections` are open: the one idle longest is closed to make
/// room (counted as `evicted`), and only when every open connection is busy
/// is a new one refused.
#[tokio::test]
async fn idle_connections_make_room_for_a_new_client() {
    let pki = pki(&["lim.gw.test"]);
    let b = http_backend("lim").await;
    let mut s = settings(vec![terminate_route("lim", &pki, b)]);
    s.limits.max_connections = 4;
    s.limits.max_connections_per_source = 2;
    let p = Proxy::start(s).await.unwrap();
    let (at, tls_at) = (p.http_addrs()[0], p.https_addrs()[0]);
    let host = "lim.gw.test";
    let listener = |kind: &str| {
        let st = p.stats();
        let l = st.iter().find(|s| s.route == "listener").unwrap();
        l.errors.get(kind).copied().unwrap_or(0)
    };
    // Well before `header_timeout` and `handshake_timeout` (10 s) would.
    let soon = Duration::from_secs(3);
    // A keep-alive connection that was served and is now idle, a silent
    // one, one with half a request head, and a TLS one with half a
    // ClientHello: every slot taken by two clients, each within its share.
    let mut kept = connect_from("127.0.0.2", at).await;
    assert!(get_kept(&mut kept, host).await);
    let mut silent = connect_from("127.0.0.2", at).await;
    let mut half = connect_from("127.0.0.3", at).await;
    half.write_all(b"GET / HTTP/1.1\r\nHost: lim")
        .await
        .unwrap();
    let mut hello = connect_from("127.0.0.3", tls_at).await;
    hello.write_all(&client_hello(host)[..20]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // New clients, over plain HTTP and over TLS, are served (and keep their
    // connections); the ones idle longest make room, in turn.
    let mut new = connect_from("127.0.0.4", at).await;
    assert!(get_kept(&mut new, host).await, "a new client is served");
    assert!(
        closed_unanswered(&mut kept, soon).await,
        "the keep-alive one went"
    );
    assert_eq!(listener("evicted"), 1);
    let tls = tokio_rustls::TlsConnector::from(client_config(&pki.cert_der, &[b"http/1.1"]));
    let name = ServerName::try_from(host.to_string()).unwrap();
    let mut new_tls = tls
        .connect(name.clone(), connect_from("127.0.0.5", tls_at).await)
        .await
        .unwrap();
    assert!(get_kept(&mut new_tls, host).await);
    assert!(
        closed_unanswered(&mut silent, soon).await,
        "then the silent one"
    );
    let mut new2 = connect_from("127.0.0.4", at).await;
    assert!(get_kept(&mut new2, host).await);
    assert!(
        closed_unanswered(&mut half, soon).await,
        "then the half head"
    );
    let mut new3 = connect_from("127.0.0.5", at).await;
    assert!(get_kept(&mut new3, host).await);
    assert!(
        closed_unanswered(&mut hello, soon).await,
        "then the half ClientHello"
    );
    assert_eq!(listener("evicted"), 4);
    assert_eq!(listener("over_capacity"), 0);
    drop((new, new_tls, new2, new3));
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Busy connections are not closed to make room: with all four
    // upgraded, a new client is refused.
    let mut busy = Vec::new();
    for src in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"] {
        busy.push(upgraded_from(src, at, host).await);
    }
    let mut late = connect_from("127.0.0.6", at).await;
    let _ = late
        .write_all(b"GET / HTTP/1.1\r\nHost: lim.gw.test\r\n\r\n")
        .await;
    assert!(closed_unanswered(&mut late, T).await);
    for s in &mut busy {
        assert_eq!(round_trip(s, b"ping").await, b"ping");
    }
    assert_eq!(listener("over_capacity"), 1);
    assert_eq!(listener("evicted"), 4);
}

/// One address holds at most `max_connections_per_source` connections: its
/// next is closed at once and counted, while another address is served;
/// a trusted proxy, which speaks for many clients, is not held to it.
#[tokio::test]
async fn per_source_connection_limit() {
    let b = http_backend("lim").await;
    let mut s = settings(vec![route("lim", TlsMode::Terminate, vec![be(b)])]);
    s.limits.max_connections_per_source = 2;
    s.trusted_proxies = Some(access(&["127.0.0.9"], &[]));
    let p = Proxy::start(s).await.unwrap();
    let at = p.http_addrs()[0];
    let c1 = connect_from("127.0.0.2", at).await;
    let _c2 = connect_from("127.0.0.2", at).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c3 = connect_from("127.0.0.2", at).await;
    let _ = c3
        .write_all(b"GET / HTTP/1.1\r\nHost: lim.gw.test\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let r = tokio::time::timeout(T, c3.read_to_end(&mut out)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "the third connection from one address is closed unanswered: {r:?} {}",
        String::from_utf8_lossy(&out)
    );
    let st = p.stats();
    let l = st.iter().find(|s| s.route == "listener").unwrap();
    assert_eq!(l.errors.get("over_capacity"), Some(&1));
    // Another address, and the trusted proxy three times over.
    assert!(http_from("127.0.0.3", at, "lim.gw.test")
        .await
        .starts_with("HTTP/1.1 200"));
    let _t1 = connect_from("127.0.0.9", at).await;
    let _t2 = connect_from("127.0.0.9", at).await;
    assert!(http_from("127.0.0.9", at, "lim.gw.test")
        .await
        .starts_with("HTTP/1.1 200"));
    // A place comes back when its connection closes.
    drop(c1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(http_from("127.0.0.2", at, "lim.gw.test")
        .await
        .starts_with("HTTP/1.1 200"));
}

/// A spliced connection (a TCP forward) idle for `idle_timeout` is closed;
/// one that keeps talking is not.
#[tokio::test]
async fn idle_spliced_connections_are_closed() {
    let (echo, _) = tcp_backend(false).await;
    let mut s = settings(vec![]);
    s.limits.idle_timeout = Duration::from_millis(600);
    s.tcp = vec![tcp_forward(echo)];
    let p = Proxy::start(s).await.unwrap();
    let at = p.tcp_addrs()[0];
    let mut c = TcpStream::connect(at).await.unwrap();
    // Talking every 300 ms for 1.5 s keeps it open.
    for i in 0..5u8 {
        c.write_all(&[b'a' + i]).await.unwrap();
        let mut back = [0u8; 1];
        tokio::time::timeout(T, c.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back[0], b'a' + i);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Then silence: the proxy closes it (the default would wait 300 s).
    let mut out = Vec::new();
    let r = tokio::time::timeout(T, c.read_to_end(&mut out)).await;
    assert!(matches!(r, Ok(Ok(0))), "{r:?}");
}

/// `redirect_https` per route: plain HTTP to the route that asks for it gets
/// a 308 to the same path over https, its HTTPS is served, and a route
/// without it still serves plain HTTP.
#[tokio::test]
async fn redirect_to_https_per_route() {
    let pki = pki(&["strict.gw.test"]);
    let b = http_backend("be").await;
    let mut strict = terminate_route("strict", &pki, b);
    strict.redirect_https = true;
    let plain = route("plain", TlsMode::Terminate, vec![be(b)]);
    let p = Proxy::start(settings(vec![strict, plain])).await.unwrap();
    let r = raw_http(p.http_addrs()[0], "Strict.gw.test", "").await;
    assert!(r.starts_with("HTTP/1.1 308"), "{r}");
    assert!(
        r.contains("location: https://strict.gw.test/hello?x=1"),
        "{r}"
    );
    let r = tls_get(p.https_addrs()[0], "strict.gw.test", &pki.cert_der)
        .await
        .unwrap();
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("be /tls"),
        "{r}"
    );
    assert!(r.contains("xfp=https"), "{r}");
    let r = raw_http(p.http_addrs()[0], "plain.gw.test", "").await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("xfp=http "),
        "{r}"
    );
    // A client claiming https itself is still redirected.
    let r = raw_http(
        p.http_addrs()[0],
        "strict.gw.test",
        "X-Forwarded-Proto: https\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 308"), "{r}");
}

/// Behind a trusted proxy that took the client's TLS and talks plain HTTP
/// to the hub, its `X-Forwarded-Proto: https` is served, not redirected
/// (which would send the client round for good); its plain HTTP clients
/// are still redirected.
#[tokio::test]
async fn redirect_to_https_behind_a_trusted_proxy_that_took_the_tls() {
    let pki = pki(&["strict.gw.test"]);
    let b = http_backend("be").await;
    let mut strict = terminate_route("strict", &pki, b);
    strict.redirect_https = true;
    let mut s = settings(vec![strict]);
    s.trusted_proxies = Some(access(&["127.0.0.0/8"], &[]));
    let p = Proxy::start(s).await.unwrap();
    let at = p.http_addrs()[0];
    let r = raw_http(at, "strict.gw.test", "X-Forwarded-Proto: https\r\n").await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("xfp=https "),
        "{r}"
    );
    let r = raw_http(at, "strict.gw.test", "X-Forwarded-Proto: http\r\n").await;
    assert!(r.starts_with("HTTP/1.1 308"), "{r}");
    let r = raw_http(at, "strict.gw.test", "").await;
    assert!(r.starts_with("HTTP/1.1 308"), "{r}");
}

/// A TCP connection to `to` from the loopback address `src` (any of 127/8).
async fn connect_from(src: &str, to: SocketAddr) -> TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(format!("{src}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

/// `GET /` for `host` from `src`; the whole response as text.
async fn http_from(src: &str, to: SocketAddr, host: &str) -> String {
    http_from_with(src, to, host, "").await
}

/// `GET /` for `host` from `src` with `extra` header lines; the whole
/// response as text.
async fn http_from_with(src: &str, to: SocketAddr, host: &str, extra: &str) -> String {
    let mut s = connect_from(src, to).await;
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends `msg` from a UDP socket and returns the reply, or `None` after 300 ms.
async fn udp_ask(c: &UdpSocket, to: SocketAddr, msg: &[u8]) -> Option<Vec<u8>> {
    c.send_to(msg, to).await.unwrap();
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_millis(300), c.recv_from(&mut buf)).await {
        Ok(r) => Some(buf[..r.unwrap().0].to_vec()),
        Err(_) => None,
    }
}

fn access(allow: &[&str], deny: &[&str]) -> gatewire::proxy::settings::Access {
    let s = |l: &[&str]| l.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    gatewire::proxy::settings::Access::parse(&s(allow), &s(deny)).unwrap()
}

fn denied(p: &Proxy, id: &str) -> u64 {
    let st = p.stats();
    let r = st.iter().find(|s| s.route == id).unwrap();
    r.errors.get("denied").copied().unwrap_or(0)
}

#[tokio::test]
async fn client_address_rules_on_routes_and_forwards() {
    let pki = pki(&["pt.gw.test"]);
    let (adm_b, pub_b) = (http_backend("adm").await, http_backend("pub").await);
    let tls_b = tls_backend(&pki).await;
    let (tcp_b, _) = tcp_backend(false).await;
    let echo_addr = udp_echo().await;
    let mut adm = route("adm", TlsMode::Terminate, vec![be(adm_b)]);
    adm.access = access(&["127.0.0.2"], &[]);
    let mut open = route("pub", TlsMode::Terminate, vec![be(pub_b)]);
    open.access = access(&[], &["127.0.0.1/32"]);
    let mut pt = route("pt", TlsMode::Passthrough, vec![be(tls_b)]);
    pt.access = access(&["127.0.0.0/8"], &["127.0.0.1"]);
    let mut s = settings(vec![adm.clone(), open, pt]);
    s.tcp = vec![TcpForwardSettings {
        access: access(&["127.0.0.2"], &[]),
        ..tcp_forward(tcp_b)
    }];
    s.udp = vec![UdpForwardSettings {
        access: access(&[], &["127.0.0.1"]),
        ..udp_forward(echo_addr)
    }];
    let p = Proxy::start(s.clone()).await.unwrap();
    let (http, https) = (p.http_addrs()[0], p.https_addrs()[0]);

    // Terminated routes: 403 for a refused address, the backend for others.
    let r = http_from("127.0.0.1", http, "adm.gw.test").await;
    assert!(
        r.starts_with("HTTP/1.1 403") && r.contains("may not use"),
        "{r}"
    );
    let r = http_from("127.0.0.2", http, "adm.gw.test").await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("xff=127.0.0.2"),
        "{r}"
    );
    let r = http_from("127.0.0.1", http, "pub.gw.test").await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    let r = http_from("127.0.0.3", http, "pub.gw.test").await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("xff=127.0.0.3"),
        "{r}"
    );
    // An unknown host is still a 404 for everyone (rules belong to routes).
    let r = http_from("127.0.0.1", http, "nope.gw.test").await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");

    // Passthrough: a refused client gets the access_denied alert; the most
    // specific rule (deny 127.0.0.1 inside allow 127/8) decides.
    let mut c = connect_from("127.0.0.1", https).await;
    c.write_all(&client_hello("pt.gw.test")).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, c.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out, [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31]);
    let r = tls_get_over(
        connect_from("127.0.0.2", https).await,
        "pt.gw.test",
        &pki.cert_der,
    )
    .await
    .unwrap();
    assert!(r.ends_with("pt:pt.gw.test"), "{r}");

    // TCP forward: a refused client is closed before any backend is contacted.
    let at = p.tcp_addrs()[0];
    let mut c = connect_from("127.0.0.1", at).await;
    let _ = c.write_all(b"hello").await;
    let mut out = Vec::new();
    let r = tokio::time::timeout(T, c.read_to_end(&mut out))
        .await
        .unwrap();
    assert!(out.is_empty(), "{r:?} {out:?}");
    let mut c = connect_from("127.0.0.2", at).await;
    assert_eq!(round_trip(&mut c, b"hello").await, b"hello");

    // UDP forward: datagrams of a refused client are dropped and counted.
    let u = p.udp_addrs()[0];
    let one = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let two = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    assert_eq!(udp_ask(&one, u, b"q1").await, None);
    assert_eq!(udp_ask(&two, u, b"q2").await.as_deref(), Some(&b"q2"[..]));

    assert_eq!(denied(&p, "name:adm"), 1);
    assert_eq!(denied(&p, "name:pub"), 1);
    assert_eq!(denied(&p, "name:pt"), 1);
    assert_eq!(denied(&p, &format!("tcp:{}", s.tcp[0].listen)), 1);
    assert_eq!(denied(&p, &format!("udp:{}", s.udp[0].listen)), 1);

    // A reload turns the rules around: the next request is judged by the new
    // rules, and the open UDP flow of a newly refused client ends.
    let mut s2 = s.clone();
    s2.routes[0].access = access(&["127.0.0.1"], &[]);
    s2.udp[0].access = access(&[], &["127.0.0.2"]);
    p.reload(s2).await.unwrap();
    let r = http_from("127.0.0.1", http, "adm.gw.test").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = http_from("127.0.0.2", http, "adm.gw.test").await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert_eq!(udp_ask(&two, u, b"q3").await, None);
    assert_eq!(udp_ask(&one, u, b"q4").await.as_deref(), Some(&b"q4"[..]));
    assert_eq!(denied(&p, "name:adm"), 2);
    assert_eq!(denied(&p, &format!("udp:{}", s.udp[0].listen)), 2);
}

/// The access log's lines as JSON, once it has at least `n` (within `T`).
async fn log_lines(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= n || tokio::time::Instant::now() > deadline {
            return text
                .lines()
                .map(|l| serde_json::from_str(l).expect("a JSON line"))
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn access_log_has_a_line_per_request_and_connection() {
    let blog_b = http_backend("blog").await;
    let (tcp_b, _) = tcp_backend(false).await;
    let mut adm = route("adm", TlsMode::Terminate, vec![be(blog_b)]);
    adm.access = access(&["127.0.0.2"], &[]);
    let mut s = settings(vec![
        route("blog", TlsMode::Terminate, vec![be(blog_b)]),
        adm,
    ]);
    s.tcp = vec![tcp_forward(tcp_b)];
    let dir = tmpdir("access-log");
    let path = dir.join("access.log");
    s.access_log = Some(path.clone());
    let p = Proxy::start(s.clone()).await.unwrap();
    let http = p.http_addrs()[0];

    let ok = raw_http(http, "blog.gw.test", "").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let body_len = ok.split_once("\r\n\r\n").unwrap().1.len() as u64;
    let r = raw_http(http, "nope.gw.test", "").await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    let r = raw_http(http, "adm.gw.test", "").await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    let mut c = TcpStream::connect(p.tcp_addrs()[0]).await.unwrap();
    assert_eq!(round_trip(&mut c, b"hello").await, b"hello");
    drop(c);

    let lines = log_lines(&path, 4).await;
    assert_eq!(lines.len(), 4, "{lines:?}");
    let find = |f: &dyn Fn(&serde_json::Value) -> bool| {
        lines
            .iter()
            .find(|l| f(l))
            .cloned()
            .unwrap_or_else(|| panic!("{lines:?}"))
    };
    let l = find(&|l| l["route"] == "name:blog");
    assert_eq!(l["kind"], "http");
    assert_eq!(l["status"], 200);
    assert_eq!(l["method"], "GET");
    assert_eq!(l["path"], "/hello", "no query string");
    assert_eq!(l["host"], "blog.gw.test");
    assert_eq!(l["proto"], "HTTP/1.1");
    assert_eq!(l["tls"], false);
    assert_eq!(l["backend"], blog_b.to_string());
    assert_eq!(l["bytes_out"], body_len);
    assert!(
        l["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{l}"
    );
    assert!(l["time"].as_str().unwrap().ends_with('Z'), "{l}");
    assert!(l["duration_ms"].as_f64().unwrap() >= 0.0, "{l}");
    assert!(l.get("error").is_none(), "{l}");
    let l = find(&|l| l["status"] == 404);
    assert_eq!(l["error"], "unknown_host");
    assert!(l.get("route").is_none(), "{l}");
    let l = find(&|l| l["route"] == "name:adm");
    assert_eq!(
        (l["status"].clone(), l["error"].clone()),
        (403.into(), "denied".into())
    );
    let l = find(&|l| l["kind"] == "tcp");
    assert_eq!(l["route"], format!("tcp:{}", s.tcp[0].listen));
    assert_eq!(
        (l["bytes_in"].clone(), l["bytes_out"].clone()),
        (5.into(), 5.into())
    );
    assert_eq!(l["backend"], tcp_b.to_string());
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        !text.contains("x=1"),
        "query strings are not logged: {text}"
    );

    // logrotate: the file is moved away; a reload reopens the path.
    std::fs::rename(&path, dir.join("access.log.1")).unwrap();
    p.reload(s.clone()).await.unwrap();
    let r = raw_http(http, "blog.gw.test", "").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let lines = log_lines(&path, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["route"], "name:blog");
}

/// A UDP forward on loopback to `backend`: 16 flows, 60 s idle, no rules.
fn tcp_forward(backend: SocketAddr) -> TcpForwardSettings {
    TcpForwardSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        backends: vec![be(backend)],
        proxy_protocol: ProxyProtocol::Off,
        balance: Balance::default(),
        tls: None,
        access: Default::default(),
        rate_limit: None,
        bandwidth: None,
    }
}

fn udp_forward(backend: SocketAddr) -> UdpForwardSettings {
    UdpForwardSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        backends: vec![be(backend)],
        max_flows: 16,
        max_flows_per_source: 16,
        flow_idle_timeout: Duration::from_secs(60),
        balance: Balance::default(),
        access: Default::default(),
        rate_limit: None,
        bandwidth: None,
        proxy_protocol: ProxyProtocol::Off,
    }
}

/// A UDP server that returns every datagram to its sender (up to the
/// largest a UDP datagram can be).
async fn udp_echo() -> SocketAddr {
    let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// A UDP server that answers every datagram with `tag` and the datagram.
async fn udp_tagged_echo(tag: &'static [u8]) -> SocketAddr {
    let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let reply = [tag, &buf[..n]].concat();
            let _ = echo.send_to(&reply, from).await;
        }
    });
    addr
}

/// A UDP server that answers every datagram with the source port it came
/// from (in decimal): which of the hub's sockets carries the flow.
async fn udp_port_echo() -> SocketAddr {
    let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(from.port().to_string().as_bytes(), from).await;
        }
    });
    addr
}

/// A UDP server that, once it heard from a client, sends it `tick` every
/// 200 ms for good (through the hub: to the flow's socket).
async fn udp_chatty_backend() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        let mut heard = None;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                r = sock.recv_from(&mut buf) => {
                    if let Ok((_, from)) = r {
                        heard = Some(from);
                    }
                }
                _ = tick.tick() => {
                    if let Some(to) = heard {
                        let _ = sock.send_to(b"tick", to).await;
                    }
                }
            }
        }
    });
    addr
}

/// A full flow table makes way for a new flow with flows never confirmed
/// (one datagram and its answer: what a forged source address gets) before
/// one whose client came back after its backend answered: a spray of new
/// sources does not move an established client to another hub-side port.
#[tokio::test]
async fn udp_spray_of_new_sources_keeps_confirmed_flows() {
    let echo = udp_port_echo().await;
    let mut s = settings(vec![]);
    s.udp = vec![UdpForwardSettings {
        max_flows: 4,
        ..udp_forward(echo)
    }];
    let p = Proxy::start(s).await.unwrap();
    let at = p.udp_addrs()[0];
    let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = udp_ask(&a, at, b"1").await.expect("an answer");
    assert_eq!(udp_ask(&a, at, b"2").await, Some(port.clone()), "one flow");
    // Three times the table's size of new sources, each answered.
    let mut spray = Vec::new();
    for i in 0..12 {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        assert!(udp_ask(&c, at, b"x").await.is_some(), "source {i}");
        spray.push(c);
    }
    assert_eq!(
        udp_ask(&a, at, b"3").await,
        Some(port),
        "the confirmed flow kept its socket"
    );
    let flows = |p: &Proxy| {
        let st = p.stats();
        st.iter()
            .find(|s| s.route.starts_with("udp:"))
            .unwrap()
            .requests
    };
    assert_eq!(flows(&p), 13);
    // The sprayed flows made way for each other: the first one is gone.
    assert!(udp_ask(&spray[0], at, b"y").await.is_some());
    assert_eq!(flows(&p), 14, "a new flow for the first sprayed source");
}

/// One host opening and confirming flow after flow from its ports makes its
/// own flows go (`max_flows_per_source`), not another client's, however
/// quiet that one is.
#[tokio::test]
async fn udp_flows_of_one_host_make_way_for_each_other_only() {
    let echo = udp_port_echo().await;
    let mut s = settings(vec![]);
    s.udp = vec![UdpForwardSettings {
        max_flows: 8,
        max_flows_per_source: 3,
        ..udp_forward(echo)
    }];
    let p = Proxy::start(s).await.unwrap();
    let at = p.udp_addrs()[0];
    let quiet = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let port = udp_ask(&quiet, at, b"1").await.expect("an answer");
    assert_eq!(udp_ask(&quiet, at, b"2").await, Some(port.clone()));
    // Another host confirms ten flows, one port after another.
    let mut host = Vec::new();
    for i in 0..10 {
        let c = UdpSocket::bind("127.0.0.3:0").await.unwrap();
        for _ in 0..2 {
            assert!(udp_ask(&c, at, b"x").await.is_some(), "port {i}");
        }
        host.push(c);
    }
    assert_eq!(
        udp_ask(&quiet, at, b"3").await,
        Some(port),
        "the quiet client's flow kept its socket"
    );
    let flows = || {
        let st = p.stats();
        let u = st.iter().find(|s| s.route.starts_with("udp:")).unwrap();
        (u.requests, u.errors.get("over_capacity").copied())
    };
    assert_eq!(flows(), (11, None));
    // The host's last three are kept, its first went.
    let before = udp_ask(&host[9], at, b"y").await;
    assert!(before.is_some());
    assert_eq!(flows(), (11, None), "the last port's flow was kept");
    assert!(udp_ask(&host[0], at, b"y").await.is_some());
    assert_eq!(flows(), (12, None), "the first port's flow had gone");
}

/// Only the client's datagrams keep a flow: a backend that keeps sending
/// (to a client that went away, or to a forged source address) stops
/// reaching it `flow_idle_timeout` after the client's last datagram.
#[tokio::test]
async fn udp_flow_expires_when_only_the_backend_sends() {
    let b = udp_chatty_backend().await;
    let mut s = settings(vec![]);
    s.udp = vec![UdpForwardSettings {
        flow_idle_timeout: Duration::from_secs(1),
        ..udp_forward(b)
    }];
    let p = Proxy::start(s).await.unwrap();
    let at = p.udp_addrs()[0];
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    c.send_to(b"hello", at).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(T, c.recv(&mut buf))
        .await
        .expect("the backend's datagrams reach the client")
        .unwrap();
    assert_eq!(&buf[..n], b"tick");
    // The flow ends 1 s (and at most a sweep) after the client's datagram.
    tokio::time::sleep(Duration::from_secs(2)).await;
    while c.try_recv(&mut buf).is_ok() {}
    let late = tokio::time::timeout(Duration::from_secs(1), c.recv(&mut buf)).await;
    assert!(
        late.is_err(),
        "the backend still reaches the client: {late:?}"
    );
}

/// Datagrams of the largest size UDP carries pass both ways.
#[tokio::test]
async fn udp_forward_carries_full_size_datagrams() {
    let echo = udp_echo().await;
    let mut s = settings(vec![]);
    s.udp = vec![udp_forward(echo)];
    let p = Proxy::start(s).await.unwrap();
    let at = p.udp_addrs()[0];
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let big: Vec<u8> = (0..65_507u32).map(|i| (i % 251) as u8).collect();
    let mut buf = vec![0u8; 65_536];
    for _ in 0..2 {
        c.send_to(&big, at).await.unwrap();
        let n = tokio::time::timeout(T, c.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, big.len());
        assert!(buf[..n] == big[..], "the datagram came back unchanged");
    }
    // With a PROXY v2 header in front it is over the UDP maximum: the
    // client's datagram is too large, not the hub over capacity.
    let mut s = settings(vec![]);
    s.udp = vec![UdpForwardSettings {
        proxy_protocol: ProxyProtocol::V2,
        ..udp_forward(echo)
    }];
    let p = Proxy::start(s).await.unwrap();
    c.send_to(&big, p.udp_addrs()[0]).await.unwrap();
    let mut counted = None;
    for _ in 0..100 {
        let st = p.stats();
        let u = st.iter().find(|s| s.route.starts_with("udp:")).unwrap();
        if !u.errors.is_empty() {
            counted = Some(u.errors.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = counted.expect("the refused send was counted");
    assert_eq!(e.get("body_too_large"), Some(&1), "{e:?}");
    assert_eq!(e.get("over_capacity"), None, "{e:?}");
}

/// `max_connections` on a UDP forward caps its flows: a new client
/// beyond it is dropped and counted while the open flows go on, and gets
/// in once a flow has ended (here, gone idle).
#[tokio::test]
async fn udp_max_connections_caps_flows() {
    let echo = udp_echo().await;
    let mut s = settings(vec![]);
    s.udp = vec![UdpForwardSettings {
        flow_idle_timeout: Duration::from_millis(600),
        balance: Balance {
            max_connections: Some(2),
            ..Balance::default()
        },
        ..udp_forward(echo)
    }];
    let p = Proxy::start(s).await.unwrap();
    let at = p.udp_addrs()[0];
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    // Two flows whose clients came back after the backend answered.
    for (c, m) in [(0, &b"one"[..]), (1, b"two")] {
        for _ in 0..2 {
            assert_eq!(udp_ask(&clients[c], at, m).await.as_deref(), Some(m));
        }
    }
    assert_eq!(
        udp_ask(&clients[2], at, b"three").await,
        None,
        "a third flow"
    );
    // The two open flows are not disturbed by the refusal.
    assert_eq!(
        udp_ask(&clients[0], at, b"one again").await.as_deref(),
        Some(&b"one again"[..])
    );
    let over = |p: &Proxy| {
        let st = p.stats();
        let u = st.iter().find(|s| s.route.starts_with("udp:")).unwrap();
        (u.requests, u.errors.get("over_capacity").copied())
    };
    assert_eq!(over(&p), (2, Some(1)));
    // Once both flows have gone idle and ended, the third client gets in.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(
        udp_ask(&clients[2], at, b"three").await.as_deref(),
        Some(&b"three"[..])
    );
    assert_eq!(over(&p), (3, Some(1)));
}

/// A reload that denies a client ends its flow within the table's sweep,
/// though the client stays silent: the backend's datagrams stop reaching it.
#[tokio::test]
async fn udp_flow_of_a_client_denied_by_a_reload_ends_while_it_is_silent() {
    // A backend that, once asked, keeps sending to the asker every 20 ms.
    let chatty = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let backend = chatty.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 64];
        let Ok((_, from)) = chatty.recv_from(&mut buf).await else {
            return;
        };
        loop {
            let _ = chatty.send_to(b"tick", from).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let mut s = settings(vec![]);
    s.udp = vec![udp_forward(backend)];
    let p = Proxy::start(s.clone()).await.unwrap();
    let at = p.udp_addrs()[0];
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_eq!(udp_ask(&c, at, b"hi").await.as_deref(), Some(&b"tick"[..]));
    s.udp[0].access = access(&[], &["127.0.0.0/8"]);
    p.reload(s).await.unwrap();
    // Within a sweep (250 ms) the ticks stop; none arrive after.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut buf = [0u8; 64];
    while c.try_recv(&mut buf).is_ok() {}
    let late = tokio::time::timeout(Duration::from_millis(300), c.recv(&mut buf)).await;
    assert!(
        late.is_err(),
        "the denied client still gets the backend's datagrams"
    );
    let st = p.stats();
    let u = st.iter().find(|s| s.route.starts_with("udp:")).unwrap();
    assert_eq!(u.errors.get("denied"), Some(&1));
}

/// Flows whose clients never came back (one-shot or forged sources) do not
/// hold the places of `max_connections`: a new client takes the place of the
/// one quiet longest.
#[tokio::test]
async fn udp_flows_never_confirmed_give_their_places_up() {
    let echo = udp_echo().await;
    let mut s = settings(vec![]);
    s.udp = vec![UdpForwardSettings {
        balance: Balance {
            max_connections: Some(2),
            ..Balance::default()
        },
        ..udp_forward(echo)
    }];
    let p = Proxy::start(s).await.unwrap();
    let at = p.udp_addrs()[0];
    let mut c = Vec::new();
    for _ in 0..4 {
        c.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    assert_eq!(udp_ask(&c[0], at, b"a").await.as_deref(), Some(&b"a"[..]));
    assert_eq!(udp_ask(&c[1], at, b"b").await.as_deref(), Some(&b"b"[..]));
    // Both places taken by flows never confirmed: the third gets one.
    assert_eq!(udp_ask(&c[2], at, b"c").await.as_deref(), Some(&b"c"[..]));
    // The second comes back (confirmed, kept); the fourth takes the place
    // of the third, not of the second.
    assert_eq!(udp_ask(&c[1], at, b"b").await.as_deref(), Some(&b"b"[..]));
    assert_eq!(udp_ask(&c[3], at, b"d").await.as_deref(), Some(&b"d"[..]));
    assert_eq!(udp_ask(&c[1], at, b"b").await.as_deref(), Some(&b"b"[..]));
    let st = p.stats();
    let u = st.iter().find(|s| s.route.starts_with("udp:")).unwrap();
    assert_eq!(u.requests, 4, "flows started: a, b, c, d");
    assert_eq!(u.errors.get("over_capacity"), None);
}

/// A client that keeps sending (well within the idle timeout) still leaves
/// a backend that a reload took out of the forward.
#[tokio::test]
async fn udp_flows_leave_a_backend_taken_out_of_the_forward() {
    let a = udp_tagged_echo(b"a:").await;
    let b = udp_tagged_echo(b"b:").await;
    let mut s = settings(vec![]);
    s.udp = vec![udp_forward(a)];
    let p = Proxy::start(s.clone()).await.unwrap();
    let at = p.udp_addrs()[0];
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_eq!(udp_ask(&c, at, b"1").await.as_deref(), Some(&b"a:1"[..]));
    s.udp[0].backends = vec![be(b)];
    p.reload(s).await.unwrap();
    assert_eq!(p.udp_addrs(), vec![at], "listener kept");
    let mut last = None;
    for _ in 0..20 {
        last = udp_ask(&c, at, b"2").await;
        if last.as_deref() == Some(&b"b:2"[..]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last.as_deref(), Some(&b"b:2"[..]), "the flow moved to b");
}

#[tokio::test]
async fn udp_forward_proxy_header_reply_address_and_log_line() {
    let echo_addr = udp_echo().await;
    let mut s = settings(vec![]);
    // A wildcard listener: the hub learns which of its addresses each
    // datagram was sent to.
    s.udp = vec![UdpForwardSettings {
        listen: "0.0.0.0:0".parse().unwrap(),
        flow_idle_timeout: Duration::from_secs(1),
        proxy_protocol: ProxyProtocol::V2,
        ..udp_forward(echo_addr)
    }];
    let path = tmpdir("udp-log").join("access.log");
    let _ = std::fs::remove_file(&path);
    s.access_log = Some(path.clone());
    let p = Proxy::start(s).await.unwrap();
    let port = p.udp_addrs()[0].port();
    // Sent to 127.0.0.2: the reply must come from 127.0.0.2 (a connected
    // socket drops anything else), and the header names it.
    let to: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    c.connect(to).await.unwrap();
    for (i, msg) in [&b"first"[..], b"second"].into_iter().enumerate() {
        c.send(msg).await.unwrap();
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(T, c.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no reply {i} from {to}"))
            .unwrap();
        // The echo returns the header the backend got, then the datagram.
        let d = decode_v2(&buf[..n]).unwrap();
        assert_eq!(
            d.command,
            Command::Proxy {
                transport: Transport::Udp,
                src: c.local_addr().unwrap(),
                dst: to,
            }
        );
        assert_eq!(&buf[d.len..n], msg, "datagram {i} after the header");
    }
    // The flow goes idle (1 s) and writes its line.
    let lines = log_lines(&path, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    let l = &lines[0];
    assert_eq!(l["kind"], "udp");
    assert_eq!(l["route"], "udp:0.0.0.0:0");
    assert_eq!(l["client"], c.local_addr().unwrap().to_string());
    assert_eq!(l["backend"], echo_addr.to_string());
    assert_eq!(l["bytes_in"], 11);
    assert_eq!(
        l["bytes_out"],
        11 + 2 * 28,
        "the echo sent the headers back"
    );
    assert!(l["duration_ms"].as_f64().unwrap() < 1000.0, "{l}");
}

#[tokio::test]
async fn basic_auth_asks_checks_and_keeps_the_credentials_from_the_backend() {
    use base64::Engine as _;
    let b = http_backend("sec").await;
    let dir = tmpdir("basic-auth");
    let users = dir.join("users");
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    std::fs::write(&users, format!("# the team\nalice:{hash}\n")).unwrap();
    let mut sec = route("sec", TlsMode::Terminate, vec![be(b)]);
    sec.basic_auth_file = Some(users.clone());
    let log = dir.join("access.log");
    let _ = std::fs::remove_file(&log);
    let mut s = settings(vec![sec, route("open", TlsMode::Terminate, vec![be(b)])]);
    s.access_log = Some(log.clone());
    let p = Proxy::start(s.clone()).await.unwrap();
    let http = p.http_addrs()[0];
    let basic = |u: &str, pw: &str| {
        format!(
            "Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{pw}"))
        )
    };

    let r = raw_http(http, "sec.gw.test", "").await;
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    assert!(
        r.to_ascii_lowercase()
            .contains("www-authenticate: basic realm=\"sec.gw.test\", charset=\"utf-8\""),
        "{r}"
    );
    assert!(!r.contains("sec /hello"), "no backend reached: {r}");
    let r = raw_http(http, "sec.gw.test", &basic("alice", "wrong")).await;
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    let r = raw_http(http, "sec.gw.test", &basic("bob", "s3cret")).await;
    assert!(r.starts_with("HTTP/1.1 401"), "unknown user: {r}");
    let r = raw_http(http, "sec.gw.test", "Authorization: Bearer abc\r\n").await;
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    for _ in 0..2 {
        let r = raw_http(http, "sec.gw.test", &basic("alice", "s3cret")).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(
            r.contains("auth=-"),
            "the backend never sees the credentials: {r}"
        );
    }
    // Another route on the same hub asks for nothing and passes the header on.
    let r = raw_http(http, "open.gw.test", "Authorization: Bearer abc\r\n").await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("auth=Bearer abc"),
        "{r}"
    );
    let st = p.stats();
    let c = st.iter().find(|s| s.route == "name:sec").unwrap();
    assert_eq!(c.errors.get("unauthorized"), Some(&4), "{:?}", c.errors);
    let lines = log_lines(&log, 7).await;
    let ok: Vec<_> = lines
        .iter()
        .filter(|l| l["status"] == 200 && l["route"] == "name:sec")
        .collect();
    assert_eq!(ok.len(), 2, "{lines:?}");
    assert!(ok.iter().all(|l| l["user"] == "alice"), "{ok:?}");
    assert!(
        lines
            .iter()
            .any(|l| l["status"] == 401 && l["error"] == "unauthorized" && l.get("user").is_none()),
        "{lines:?}"
    );

    // The file is read again on reload: a new password works, the old one not.
    let hash = bcrypt::hash("n3w", 4).unwrap();
    std::fs::write(&users, format!("alice:{hash}\n")).unwrap();
    p.reload(s.clone()).await.unwrap();
    let r = raw_http(http, "sec.gw.test", &basic("alice", "s3cret")).await;
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    let r = raw_http(http, "sec.gw.test", &basic("alice", "n3w")).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");

    // A broken file fails the reload, names the file and line, and keeps the
    // running routes.
    std::fs::write(&users, "alice:{SHA}abc\n").unwrap();
    let e = p.reload(s.clone()).await.unwrap_err().to_string();
    assert!(
        e.contains("name:sec") && e.contains("users") && e.contains("line 1"),
        "{e}"
    );
    let r = raw_http(http, "sec.gw.test", &basic("alice", "n3w")).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

/// An authentication service in the manner of oauth2-proxy's `/oauth2/auth`:
/// `Bearer good` passes as alice, anything else is sent to a login page.
/// Returns its address and the X-Forwarded-* headers of the checks it got.
async fn auth_service() -> (SocketAddr, Arc<parking_lot::Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let seen = s2.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let h = |n: &str| header(&req, n);
                        seen.lock().push(format!(
                            "{} {} method={} uri={} host={} proto={} for={} cl={}",
                            req.method(),
                            req.uri(),
                            h("x-forwarded-method"),
                            h("x-forwarded-uri"),
                            h("x-forwarded-host"),
                            h("x-forwarded-proto"),
                            h("x-forwarded-for"),
                            h("content-length"),
                        ));
                        let mut r = hyper::Response::new(Full::new(Bytes::new()));
                        if h("authorization") == "Bearer good" {
                            r.headers_mut()
                                .insert("x-auth-request-user", "alice".parse().unwrap());
                            r.headers_mut()
                                .insert("x-forwarded-user", "alice".parse().unwrap());
                            r.headers_mut().insert("x-other", "no".parse().unwrap());
                            // A refreshed session, for the client.
                            r.headers_mut()
                                .append("set-cookie", "_sso=fresh; Path=/".parse().unwrap());
                            r.headers_mut()
                                .append("set-cookie", "_csrf=x; Path=/".parse().unwrap());
                        } else {
                            *r.status_mut() = hyper::StatusCode::FOUND;
                            let to = format!("https://sso.test/login?rd={}", h("x-forwarded-uri"));
                            r.headers_mut().insert("location", to.parse().unwrap());
                            *r.body_mut() = Full::new(Bytes::from_static(b"log in first"));
                        }
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn forward_auth_asks_the_service_first() {
    use gatewire::proxy::forward_auth::AuthUrl;
    let b = http_backend("app").await;
    let (auth, seen) = auth_service().await;
    let user = http::HeaderName::from_static("x-auth-request-user");
    let mut app = route("app", TlsMode::Terminate, vec![be(b)]);
    app.forward_auth = Some((
        AuthUrl::parse(&format!("http://{auth}/oauth2/auth")).unwrap(),
        vec![user.clone()],
    ));
    // A service nobody listens on.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut gone = route("gone", TlsMode::Terminate, vec![be(b)]);
    gone.forward_auth = Some((
        AuthUrl::parse(&format!("http://{closed}/auth")).unwrap(),
        vec![],
    ));
    let p = Proxy::start(settings(vec![app, gone])).await.unwrap();
    let http = p.http_addrs()[0];

    // No credentials: the service's redirect to its login page, as it is.
    let r = raw_http(http, "app.gw.test", "").await;
    assert!(r.starts_with("HTTP/1.1 302"), "{r}");
    assert!(
        r.to_ascii_lowercase()
            .contains("location: https://sso.test/login?rd=/hello?x=1"),
        "{r}"
    );
    assert!(
        r.ends_with("log in first") && !r.contains("app /hello"),
        "{r}"
    );
    // Credentials the service accepts: the backend gets the user it named,
    // not the one the client claimed, and nothing else from the answer.
    for _ in 0..2 {
        let r = raw_http(
            http,
            "app.gw.test",
            "Authorization: Bearer good\r\nX-Auth-Request-User: mallory\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("user=alice"), "{r}");
        assert!(!r.contains("mallory") && !r.contains("x-other"), "{r}");
        // The service's cookies reach the client with the backend's answer.
        let lower = r.to_ascii_lowercase();
        assert!(
            lower.contains("set-cookie: _sso=fresh; path=/\r\n")
                && lower.contains("set-cookie: _csrf=x; path=/\r\n"),
            "{r}"
        );
    }
    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(
        seen[0],
        "GET /oauth2/auth method=GET uri=/hello?x=1 host=app.gw.test proto=http for=127.0.0.1 cl=-"
    );
    // A service that does not answer: 503, the backend is not reached.
    let r = raw_http(http, "gone.gw.test", "Authorization: Bearer good\r\n").await;
    assert!(
        r.starts_with("HTTP/1.1 503") && !r.contains("app /hello"),
        "{r}"
    );
    let st = p.stats();
    let get = |id: &str| st.iter().find(|s| s.route == id).unwrap().errors.clone();
    assert_eq!(get("name:app").get("unauthorized"), Some(&1));
    assert_eq!(get("name:gone").get("auth_unavailable"), Some(&1));
}

#[tokio::test]
async fn forward_auth_headers_named_x_forwarded_reach_the_backend() {
    use gatewire::proxy::forward_auth::AuthUrl;
    let (b, heads) = raw_backend(Some(b"HTTP/1.1 204 No Content\r\n\r\n")).await;
    let (auth, _) = auth_service().await;
    let mut app = route("app", TlsMode::Terminate, vec![be(b)]);
    app.forward_auth = Some((
        AuthUrl::parse(&format!("http://{auth}/oauth2/auth")).unwrap(),
        vec![http::HeaderName::from_static("x-forwarded-user")],
    ));
    let p = Proxy::start(settings(vec![app])).await.unwrap();
    let r = raw_http(
        p.http_addrs()[0],
        "app.gw.test",
        "Authorization: Bearer good\r\nX-Forwarded-User: mallory\r\nX_Forwarded_User: mallory\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 204"), "{r}");
    let head = heads.lock()[0].to_ascii_lowercase();
    assert!(head.contains("\r\nx-forwarded-user: alice\r\n"), "{head}");
    assert!(!head.contains("mallory"), "{head}");
}

#[tokio::test]
async fn forward_auth_refuses_dot_segments_before_asking() {
    use gatewire::proxy::forward_auth::AuthUrl;
    let b = http_backend("app").await;
    let (auth, seen) = auth_service().await;
    // No `paths`: the service is asked about the path as the client wrote
    // it, while a backend may resolve it to another.
    let mut app = route("app", TlsMode::Terminate, vec![be(b)]);
    app.forward_auth = Some((
        AuthUrl::parse(&format!("http://{auth}/oauth2/auth")).unwrap(),
        vec![],
    ));
    let p = Proxy::start(settings(vec![app])).await.unwrap();
    let http = p.http_addrs()[0];
    for target in ["/public/../admin", "/%2e%2e/admin", "/public/..;/admin"] {
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: app.gw.test\r\nAuthorization: Bearer good\r\nConnection: close\r\n\r\n"
        );
        let r = String::from_utf8_lossy(&exchange(http, req.as_bytes()).await).into_owned();
        assert!(r.starts_with("HTTP/1.1 400"), "{target}: {r}");
    }
    assert!(seen.lock().is_empty(), "{:?}", seen.lock());
    let st = p.stats();
    let app = st.iter().find(|s| s.route == "name:app").unwrap();
    assert_eq!(app.errors.get("bad_path"), Some(&3));
}

#[tokio::test]
async fn access_log_that_cannot_be_opened_is_an_error() {
    let mut s = settings(vec![]);
    s.access_log = Some(tmpdir("access-log-bad").join("no-such-dir/access.log"));
    let e = Proxy::start(s).await.err().expect("refused");
    let m = format!("{e:#}");
    assert!(m.contains("access_log") && m.contains("no-such-dir"), "{m}");
}

#[tokio::test]
async fn per_client_rate_limits() {
    let b = http_backend("rl").await;
    let (tcp_b, _) = tcp_backend(false).await;
    let mut r = route("rl", TlsMode::Terminate, vec![be(b)]);
    r.rate_limit = Some(gatewire::proxy::settings::RateLimit {
        per_second: 1,
        burst: 2,
    });
    let mut s = settings(vec![r]);
    s.tcp = vec![TcpForwardSettings {
        rate_limit: Some(gatewire::proxy::settings::RateLimit {
            per_second: 1,
            burst: 1,
        }),
        ..tcp_forward(tcp_b)
    }];
    let echo_addr = udp_echo().await;
    s.udp = vec![UdpForwardSettings {
        rate_limit: Some(gatewire::proxy::settings::RateLimit {
            per_second: 1,
            burst: 2,
        }),
        ..udp_forward(echo_addr)
    }];
    let p = Proxy::start(s.clone()).await.unwrap();
    let http = p.http_addrs()[0];
    // UDP: two datagrams at once, then drops (the flow stays for the next second).
    let u = p.udp_addrs()[0];
    let c = UdpSocket::bind("127.0.0.4:0").await.unwrap();
    assert_eq!(udp_ask(&c, u, b"d1").await.as_deref(), Some(&b"d1"[..]));
    assert_eq!(udp_ask(&c, u, b"d2").await.as_deref(), Some(&b"d2"[..]));
    assert_eq!(udp_ask(&c, u, b"d3").await, None);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(udp_ask(&c, u, b"d4").await.as_deref(), Some(&b"d4"[..]));
    // A burst of two, then 429 with Retry-After; another client is unaffected.
    for _ in 0..2 {
        let r = http_from("127.0.0.1", http, "rl.gw.test").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    let r = http_from("127.0.0.1", http, "rl.gw.test").await;
    assert!(r.starts_with("HTTP/1.1 429"), "{r}");
    assert!(r.to_lowercase().contains("retry-after: 1\r\n"), "{r}");
    let r = http_from("127.0.0.2", http, "rl.gw.test").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // A reload with the same limit keeps the buckets: still limited.
    p.reload(s.clone()).await.unwrap();
    let r = http_from("127.0.0.1", http, "rl.gw.test").await;
    assert!(r.starts_with("HTTP/1.1 429"), "{r}");
    // After a second, one more token.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = http_from("127.0.0.1", http, "rl.gw.test").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");

    // TCP: the second connection within the second is closed unanswered.
    let at = p.tcp_addrs()[0];
    let mut c = connect_from("127.0.0.3", at).await;
    assert_eq!(round_trip(&mut c, b"one").await, b"one");
    let mut c2 = connect_from("127.0.0.3", at).await;
    let _ = c2.write_all(b"two").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, c2.read_to_end(&mut out))
        .await
        .unwrap();
    assert!(out.is_empty(), "{out:?}");
    let st = p.stats();
    let n = |id: &str| {
        st.iter()
            .find(|s| s.route == id)
            .and_then(|s| s.errors.get("rate_limited").copied())
            .unwrap_or(0)
    };
    assert_eq!(n("name:rl"), 2);
    assert_eq!(n(&format!("tcp:{}", s.tcp[0].listen)), 1);
    assert_eq!(n(&format!("udp:{}", s.udp[0].listen)), 1);
}

/// A terminated route refuses the TLS handshake itself to a client its
/// `allow`/`deny` refuses or with no `rate_limit` token left (its bucket
/// looked at, no token taken), counted as its requests would be: such a
/// client gets no handshakes for the hub to compute. A trusted proxy, which
/// speaks for many clients, gets its handshake; its clients are judged per
/// request.
#[tokio::test]
async fn terminated_routes_refuse_the_handshake_first() {
    let pki = pki(&["rl.gw.test"]);
    let b = http_backend("rl").await;
    let mut r = terminate_route("rl", &pki, b);
    r.rate_limit = Some(gatewire::proxy::settings::RateLimit {
        per_second: 1,
        burst: 1,
    });
    r.access = access(&[], &["127.0.0.3", "127.0.0.9"]);
    let mut s = settings(vec![r]);
    s.trusted_proxies = Some(access(&["127.0.0.9"], &[]));
    let p = Proxy::start(s).await.unwrap();
    let at = p.https_addrs()[0];
    let errors = |kind: &str| {
        let st = p.stats();
        let r = st.iter().find(|s| s.route == "name:rl").unwrap();
        r.errors.get(kind).copied().unwrap_or(0)
    };
    let tls = tokio_rustls::TlsConnector::from(client_config(&pki.cert_der, &[b"http/1.1"]));
    let name = ServerName::try_from("rl.gw.test").unwrap();
    let handshake = |src: &'static str| {
        let (tls, name) = (tls.clone(), name.clone());
        async move {
            let tcp = connect_from(src, at).await;
            tokio::time::timeout(T, tls.connect(name, tcp))
                .await
                .unwrap()
        }
    };
    // One request takes the one token; a new connection at once gets no
    // handshake (an internal_error alert).
    let r = tls_get_over(
        connect_from("127.0.0.2", at).await,
        "rl.gw.test",
        &pki.cert_der,
    )
    .await
    .unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let e = handshake("127.0.0.2").await.expect_err("no handshake");
    assert!(e.to_string().contains("InternalError"), "{e}");
    assert_eq!(errors("rate_limited"), 1);
    // Looking took no token: after a second the client is served again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = tls_get_over(
        connect_from("127.0.0.2", at).await,
        "rl.gw.test",
        &pki.cert_der,
    )
    .await
    .unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // A refused address gets the access_denied alert, not a handshake.
    let e = handshake("127.0.0.3").await.expect_err("no handshake");
    assert!(e.to_string().contains("AccessDenied"), "{e}");
    assert_eq!(errors("denied"), 1);
    // A trusted proxy gets its handshakes, whatever its own address's
    // rules and bucket; the clients it forwards are judged per request.
    for (xff, status) in [
        ("192.0.2.7", "HTTP/1.1 200"),
        ("192.0.2.7", "HTTP/1.1 429"),
        ("127.0.0.3", "HTTP/1.1 403"),
    ] {
        let mut t = handshake("127.0.0.9").await.unwrap();
        let req = format!(
            "GET / HTTP/1.1\r\nHost: rl.gw.test\r\nX-Forwarded-For: {xff}\r\nConnection: close\r\n\r\n"
        );
        t.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(T, t.read_to_end(&mut out)).await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with(status), "{xff}: {out}");
    }
    assert_eq!(errors("rate_limited"), 2);
    assert_eq!(errors("denied"), 2);
    assert_eq!(errors("tls_handshake"), 0);
}

#[tokio::test]
async fn proxy_headers_from_a_balancer_in_front() {
    use gatewire::proxy::proxy_protocol::{encode_v1, encode_v2, encode_v2_local, Transport};
    let b = http_backend("lb").await;
    let (pp_b, mut seen) = tcp_backend(true).await;
    let mut r = route("lb", TlsMode::Terminate, vec![be(b)]);
    r.access = access(&[], &["198.51.100.66"]);
    let mut s = settings(vec![r]);
    s.tcp = vec![TcpForwardSettings {
        proxy_protocol: ProxyProtocol::V2,
        ..tcp_forward(pp_b)
    }];
    // The balancer is 127.0.0.1; 127.0.0.2 is an ordinary client.
    s.proxy_protocol_from = Some(access(&["127.0.0.1"], &[]));
    s.limits.max_connections_per_source = 2;
    let p = Proxy::start(s).await.unwrap();
    let http = p.http_addrs()[0];
    let get = |host: &str| format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let via = |head: Vec<u8>, host: &str| {
        let mut bytes = head;
        bytes.extend_from_slice(get(host).as_bytes());
        async move {
            let mut c = connect_from("127.0.0.1", http).await;
            c.write_all(&bytes).await.unwrap();
            let mut out = Vec::new();
            let _ = tokio::time::timeout(T, c.read_to_end(&mut out))
                .await
                .unwrap();
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    let client: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let mut v1 = Vec::new();
    encode_v1(&mut v1, client, http);
    let r = via(v1, "lb.gw.test").await;
    assert!(
        r.contains("xff=198.51.100.7 "),
        "v1: the header's client: {r}"
    );
    let mut v2 = Vec::new();
    encode_v2(
        &mut v2,
        Transport::Tcp,
        "[2001:db8::7]:1".parse().unwrap(),
        "[2001:db8::1]:80".parse().unwrap(),
    );
    let r = via(v2, "lb.gw.test").await;
    assert!(r.contains("xff=2001:db8::7 "), "v2: {r}");
    // LOCAL (the balancer's health check): the connection's own address.
    let mut local = Vec::new();
    encode_v2_local(&mut local);
    let r = via(local, "lb.gw.test").await;
    assert!(r.contains("xff=127.0.0.1 "), "{r}");
    // Rules apply to the real client.
    let mut v1 = Vec::new();
    encode_v1(&mut v1, "198.51.100.66:5".parse().unwrap(), http);
    let r = via(v1, "lb.gw.test").await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    // A header split over two writes is waited for.
    let mut c = connect_from("127.0.0.1", http).await;
    c.write_all(b"PROXY TCP4 198.51.100.8 127.0.0.1 ")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    c.write_all(format!("4000 80\r\n{}", get("lb.gw.test")).as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, c.read_to_end(&mut out))
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&out).contains("xff=198.51.100.8 "));
    // A v2 header in three pieces (inside the signature, inside the fixed
    // part, then the addresses with the request), and a v1 one byte by byte.
    let mut v2 = Vec::new();
    encode_v2(
        &mut v2,
        Transport::Tcp,
        "198.51.100.9:1".parse().unwrap(),
        "127.0.0.1:80".parse().unwrap(),
    );
    let mut v1 = Vec::new();
    encode_v1(&mut v1, "198.51.100.10:4000".parse().unwrap(), http);
    for (pieces, who) in [
        (
            vec![v2[..5].to_vec(), v2[5..14].to_vec(), v2[14..].to_vec()],
            "198.51.100.9",
        ),
        (v1.iter().map(|b| vec![*b]).collect(), "198.51.100.10"),
    ] {
        let mut c = connect_from("127.0.0.1", http).await;
        for p in pieces {
            c.write_all(&p).await.unwrap();
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        c.write_all(get("lb.gw.test").as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(T, c.read_to_end(&mut out))
            .await
            .unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(out.contains(&format!("xff={who} ")), "{who}: {out}");
    }
    // The balancer without a header is closed and counted; others need none.
    let r = via(Vec::new(), "lb.gw.test").await;
    assert!(r.is_empty(), "{r}");
    let r = via(b"PROXY TCP9 x\r\n".to_vec(), "lb.gw.test").await;
    assert!(r.is_empty(), "{r}");
    let r = http_from("127.0.0.2", http, "lb.gw.test").await;
    assert!(r.contains("xff=127.0.0.2 "), "{r}");
    // A TCP forward passes the header's client on in its own PROXY v2 header.
    let at = p.tcp_addrs()[0];
    let mut c = connect_from("127.0.0.1", at).await;
    let mut v1 = Vec::new();
    let balancer_front: SocketAddr = "192.0.2.80:5432".parse().unwrap();
    encode_v1(&mut v1, "203.0.113.9:7777".parse().unwrap(), balancer_front);
    c.write_all(&v1).await.unwrap();
    assert_eq!(round_trip(&mut c, b"hi").await, b"hi");
    let cmd = tokio::time::timeout(T, seen.recv()).await.unwrap().unwrap();
    let Command::Proxy { src, dst, .. } = cmd else {
        panic!("{cmd:?}")
    };
    assert_eq!(src, "203.0.113.9:7777".parse::<SocketAddr>().unwrap());
    assert_eq!(dst, balancer_front, "the address the client connected to");
    let st = p.stats();
    let l = st.iter().find(|s| s.route == "listener").unwrap();
    assert_eq!(l.errors.get("bad_proxy_header"), Some(&2));
    assert_eq!(l.errors.get("over_capacity"), None);
    // The client a header names holds its share of the slots, as one
    // connecting directly does: its third open connection is closed.
    let held = "198.51.100.50:1".parse().unwrap();
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut c = connect_from("127.0.0.1", http).await;
        let mut v1 = Vec::new();
        encode_v1(&mut v1, held, http);
        c.write_all(&v1).await.unwrap();
        open.push(c);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut v1 = Vec::new();
    encode_v1(&mut v1, held, http);
    let r = via(v1, "lb.gw.test").await;
    assert!(r.is_empty(), "a third connection of one client: {r}");
    let st = p.stats();
    let l = st.iter().find(|s| s.route == "listener").unwrap();
    assert_eq!(l.errors.get("over_capacity"), Some(&1));
    // Another client through the same balancer is served.
    let mut v1 = Vec::new();
    encode_v1(&mut v1, "198.51.100.51:1".parse().unwrap(), http);
    let r = via(v1, "lb.gw.test").await;
    assert!(r.contains("xff=198.51.100.51 "), "{r}");
    drop(open);
}

/// POSTs `len` bytes to `host` on `at` and returns the time until the
/// answer (which names the body size the backend saw) has arrived.
async fn timed_post(at: SocketAddr, host: &str, len: usize) -> Duration {
    let t0 = std::time::Instant::now();
    let mut s = TcpStream::connect(at).await.unwrap();
    s.write_all(
        format!("POST /u HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    s.write_all(&vec![b'z'; len]).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(T, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(out.contains(&format!("body={len}")), "{out}");
    t0.elapsed()
}

#[tokio::test]
async fn bandwidth_paces_a_route_and_forwards() {
    let b = http_backend("bw").await;
    let (tcp_b, _) = tcp_backend(false).await;
    let echo_addr = udp_echo().await;
    let mut slow = route("slow", TlsMode::Terminate, vec![be(b)]);
    // 200 kB/s each way; a burst of 20 kB.
    slow.bandwidth = Some(200_000);
    let mut s = settings(vec![slow, route("fast", TlsMode::Terminate, vec![be(b)])]);
    s.tcp = vec![TcpForwardSettings {
        // 100 kB/s each way; a burst of 16 KiB.
        bandwidth: Some(100_000),
        ..tcp_forward(tcp_b)
    }];
    s.udp = vec![UdpForwardSettings {
        // 8 kB/s; a burst of 16 KiB.
        bandwidth: Some(8_000),
        ..udp_forward(echo_addr)
    }];
    let p = Proxy::start(s).await.unwrap();
    let at = p.http_addrs()[0];

    // 300 kB up through the limited route: at least (300 - 20) / 200 s.
    let slow = timed_post(at, "slow.gw.test", 300_000).await;
    assert!(slow >= Duration::from_millis(1_350), "{slow:?}");
    // The other route is not held back by it.
    let fast = timed_post(at, "fast.gw.test", 300_000).await;
    assert!(fast < slow, "fast {fast:?}, slow {slow:?}");

    // 150 kB echoed through the TCP forward: both directions paced at
    // 100 kB/s (at the same time), so at least (150 - 16 - 8) / 100 s (the
    // last 8 KiB read may pass before its pause).
    let t0 = std::time::Instant::now();
    let mut c = TcpStream::connect(p.tcp_addrs()[0]).await.unwrap();
    let data: Vec<u8> = (0..150_000u32).map(|i| i as u8).collect();
    let (mut r, mut w) = c.split();
    let send = async {
        w.write_all(&data).await.unwrap();
    };
    let mut back = vec![0u8; data.len()];
    let recv = async {
        tokio::time::timeout(T, r.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
    };
    tokio::join!(send, recv);
    let took = t0.elapsed();
    assert_eq!(back, data);
    assert!(took >= Duration::from_millis(1_200), "{took:?}");

    // 40 datagrams of 1000 bytes at once through the UDP forward: about
    // the burst (16) pass, the rest are dropped and counted.
    let u = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for _ in 0..40 {
        u.send_to(&[7u8; 1000], p.udp_addrs()[0]).await.unwrap();
    }
    let mut got = 0;
    let mut buf = [0u8; 2048];
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(500), u.recv_from(&mut buf)).await
    {
        got += 1;
    }
    assert!((10..=20).contains(&got), "{got} echoed");

    let st = p.stats();
    let find = |r: &str| st.iter().find(|s| s.route.starts_with(r)).unwrap();
    assert_eq!(find("name:slow").bandwidth, Some(200_000));
    assert_eq!(find("name:fast").bandwidth, None);
    assert_eq!(find("name:slow").bytes_in, 300_000);
    assert_eq!(find("tcp:").bytes_out, 150_000);
    let udp = find("udp:");
    assert_eq!(udp.bandwidth, Some(8_000));
    let dropped = udp.errors.get("over_bandwidth").copied().unwrap_or(0);
    assert!(dropped >= 20, "{dropped} dropped; {udp:?}");
    assert_eq!(udp.bytes_out, got * 1000);
}

/// A backend that reads a request head, keeps it for the test and sends
/// `answer`, then closes; with `None` it reads nothing more and holds the
/// connection (an upload it never takes).
async fn raw_backend(
    answer: Option<&'static [u8]>,
) -> (SocketAddr, Arc<parking_lot::Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let heads = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let kept = heads.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                kept.lock()
                    .push(String::from_utf8_lossy(&head).into_owned());
                match answer {
                    Some(a) => {
                        let _ = s.write_all(a).await;
                    }
                    None => tokio::time::sleep(T * 6).await,
                }
            });
        }
    });
    (addr, heads)
}

#[tokio::test]
async fn framing_and_proxy_headers_stop_at_the_hub() {
    let (b, heads) = raw_backend(Some(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\
          Proxy-Authenticate: Basic realm=\"inner\"\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ))
    .await;
    let p = Proxy::start(settings(vec![route(
        "raw",
        TlsMode::Terminate,
        vec![be(b)],
    )]))
    .await
    .unwrap();
    let r = raw_http(
        p.http_addrs()[0],
        "raw.gw.test",
        "Proxy: http://192.0.2.66:8080\r\nProxy-Authorization: Basic eDp5\r\n\
         X_Forwarded_For: 192.0.2.66\r\nX_Real_IP: 192.0.2.66\r\n",
    )
    .await;
    // Chunked, as the backend sent it: not cut at its Content-Length.
    let lower = r.to_ascii_lowercase();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        !lower.contains("content-length") && !lower.contains("proxy-authenticate"),
        "{r}"
    );
    assert!(lower.contains("\r\n\r\n5\r\nhello\r\n0\r\n\r\n"), "{r}");
    let head = heads.lock()[0].to_ascii_lowercase();
    assert!(
        head.contains("\r\nx-forwarded-for: 127.0.0.1\r\n"),
        "{head}"
    );
    assert!(
        !head.contains("\r\nproxy:")
            && !head.contains("proxy-authorization")
            && !head.contains("192.0.2.66"),
        "{head}"
    );
}

/// A response body that gives five bytes of the hundred it announces, then
/// fails a moment later (hyper resets its HTTP/2 stream).
struct Broken(Option<std::pin::Pin<Box<tokio::time::Sleep>>>);

impl hyper::body::Body for Broken {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        let Some(wait) = &mut self.0 else {
            self.0 = Some(Box::pin(tokio::time::sleep(Duration::from_millis(50))));
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
                b"12345",
            )))));
        };
        std::task::ready!(std::future::Future::poll(wait.as_mut(), cx));
        std::task::Poll::Ready(Some(Err(std::io::Error::other("gone"))))
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(100)
    }
}

/// An HTTP/2 backend answering every request with a [`Broken`] body.
async fn broken_h2_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = service_fn(|_: hyper::Request<hyper::body::Incoming>| async {
                    Ok::<_, Infallible>(hyper::Response::new(Broken(None)))
                });
                let b =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                let _ = b.serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn responses_the_backend_breaks_off_are_counted_and_logged() {
    // An HTTP/1.1 backend that closes its connection mid-body, an HTTP/2
    // one that resets its stream.
    let (b1, _) = raw_backend(Some(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n12345")).await;
    let one = route("one", TlsMode::Terminate, vec![be(b1)]);
    let mut two = route(
        "two",
        TlsMode::Terminate,
        vec![be(broken_h2_backend().await)],
    );
    two.backend_protocol = BackendProtocol::Http2;
    let mut s = settings(vec![one, two]);
    let path = tmpdir("aborted-log").join("access.log");
    s.access_log = Some(path.clone());
    let p = Proxy::start(s).await.unwrap();
    for host in ["one.gw.test", "two.gw.test"] {
        let r = raw_http(p.http_addrs()[0], host, "").await;
        assert!(r.starts_with("HTTP/1.1 200") && r.contains("12345"), "{r}");
    }
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let st = p.stats();
        let aborted = |id: &str| {
            let s = st.iter().find(|s| s.route == id).unwrap();
            s.errors.get("backend_aborted").copied()
        };
        if aborted("name:one") == Some(1) && aborted("name:two") == Some(1) {
            let routes = st.iter().filter(|s| s.route.starts_with("name:"));
            assert!(routes.clone().count() == 2, "{st:?}");
            assert!(routes.into_iter().all(|s| s.errors.len() == 1), "{st:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lines = log_lines(&path, 2).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    for l in &lines {
        assert_eq!(
            (
                l["status"].clone(),
                l["error"].clone(),
                l["bytes_out"].clone()
            ),
            (200.into(), "backend_aborted".into(), 5.into()),
            "{l}"
        );
    }
}

#[tokio::test]
async fn a_backend_that_takes_no_upload_and_gives_no_answer_times_out() {
    let (b, heads) = raw_backend(None).await;
    let mut st = settings(vec![route("up", TlsMode::Terminate, vec![be(b)])]);
    st.limits.idle_timeout = Duration::from_millis(500);
    st.limits.response_timeout = Duration::from_millis(300);
    let p = Proxy::start(st).await.unwrap();
    // Far more than the socket buffers between client and backend hold.
    let len: usize = 64 << 20;
    let s = TcpStream::connect(p.http_addrs()[0]).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let head = format!("POST /up HTTP/1.1\r\nHost: up.gw.test\r\nContent-Length: {len}\r\n\r\n");
    wr.write_all(head.as_bytes()).await.unwrap();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..len / chunk.len() {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let t = tokio::time::Instant::now();
    let mut out = Vec::new();
    // The 504, or a reset that overtook it (the upload is cut off unread).
    let _ = tokio::time::timeout(T, rd.read_to_end(&mut out))
        .await
        .expect("the exchange never ended");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 504"), "{out}");
    writer.abort();
    assert_eq!(heads.lock().len(), 1);
    let st = p.stats();
    let s = st.iter().find(|s| s.route == "name:up").unwrap();
    assert_eq!(s.errors.get("backend_timeout"), Some(&1), "{s:?}");
    assert_eq!(s.errors.len(), 1, "{s:?}");
}
