//! Loopback tests of the proxy's hot reload, balancing and health checks:
//! a reload adds a route while a large download over another route runs to the
//! end; removed listeners close; shutdown drains, then cuts what is left;
//! active health checks and tunnel liveness take backends out and back;
//! least-connections, stickiness, per-route limits and PROXY v1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use gatewire::proxy::names::{DomainName, Label};
use gatewire::proxy::settings::{
    Backend, BackendTls, Balance, HealthCheck, HealthKind, Limits, Policy, ProxyProtocol,
    ProxySettings, RouteHost, RouteSettings, Scheme, TcpForwardSettings, TlsMode,
};
use gatewire::proxy::upstream::TunnelLiveness;
use gatewire::proxy::Proxy;
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(20);

fn be(addr: SocketAddr) -> Backend {
    Backend {
        scheme: Scheme::Http,
        addr,
    }
}

fn route(name: &str, backends: Vec<Backend>) -> RouteSettings {
    RouteSettings {
        host: RouteHost::Name(Label::parse(name).unwrap()),
        tls: TlsMode::Terminate,
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
        https_listen: vec![],
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

/// A backend answering `<name>` on every path, except `/big/<n>`: `n` MiB,
/// streamed in 64 KiB chunks with a short pause every MiB, and `/slow`: an
/// answer after 1.5 s.
async fn backend(name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| async move {
                        let path = req.uri().path().to_string();
                        let body: http_body_util::combinators::BoxBody<Bytes, Infallible> =
                            if let Some(n) = path.strip_prefix("/big/") {
                                let mib: usize = n.parse().unwrap_or(1);
                                let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
                                tokio::spawn(async move {
                                    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                                    for i in 0..mib * 16 {
                                        if tx.send(chunk.clone()).await.is_err() {
                                            return;
                                        }
                                        if i % 16 == 15 {
                                            tokio::time::sleep(Duration::from_millis(40)).await;
                                        }
                                    }
                                });
                                ChanBody(rx).boxed()
                            } else if path == "/slow" {
                                tokio::time::sleep(Duration::from_millis(1500)).await;
                                http_body_util::Full::new(Bytes::from(name)).boxed()
                            } else {
                                http_body_util::Full::new(Bytes::from(name)).boxed()
                            };
                        Ok::<_, Infallible>(hyper::Response::new(body))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

/// A body fed by a channel.
struct ChanBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// GET over a fresh connection; returns (status line, body length, body prefix).
async fn get(addr: SocketAddr, host: &str, path: &str) -> (String, usize, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(out.len(), |p| p + 4);
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let body = &out[split..];
    let status = head.lines().next().unwrap_or("").to_string();
    // Chunked bodies: count payload bytes roughly by dechunking.
    let len = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk_len(body)
    } else {
        body.len()
    };
    let prefix = String::from_utf8_lossy(&body[..body.len().min(64)]).into_owned();
    (status, len, prefix)
}

fn dechunk_len(mut b: &[u8]) -> usize {
    let mut n = 0;
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return n;
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            return n;
        }
        n += size;
        b = &b[eol + 2 + size + 2..];
    }
}

async fn body_of(addr: SocketAddr, host: &str) -> String {
    let (st, _, body) = get(addr, host, "/").await;
    format!("{st} {body}")
}

#[tokio::test]
async fn reload_adds_a_route_while_a_download_runs() {
    let (a, _ta) = backend("alpha").await;
    let (b, _tb) = backend("beta").await;
    let p = Proxy::start(settings(vec![route("a", vec![be(a)])]))
        .await
        .unwrap();
    let at = p.http_addrs()[0];
    assert!(body_of(at, "b.gw.test").await.contains("404"));
    // 32 MiB with pauses: about 1.3 s.
    let dl = tokio::spawn(async move { get(at, "a.gw.test", "/big/32").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = p
        .reload(settings(vec![
            route("a", vec![be(a)]),
            route("b", vec![be(b)]),
        ]))
        .await
        .unwrap();
    assert_eq!(report.added, vec!["name:b".to_string()]);
    assert!(report.removed.is_empty() && report.changed.is_empty());
    assert!(report.listeners_added.is_empty() && report.listeners_removed.is_empty());
    assert!(
        body_of(at, "b.gw.test").await.contains("200 OK beta"),
        "new route serves"
    );
    assert!(!dl.is_finished(), "the download should still be running");
    let (st, len, _) = tokio::time::timeout(T, dl).await.unwrap().unwrap();
    assert!(st.contains("200"), "{st}");
    assert_eq!(len, 32 * 1024 * 1024, "the download ran to the end");
    // Counters of the unchanged route carried over the reload.
    let s = p.stats();
    let ra = s.iter().find(|r| r.route == "name:a").unwrap();
    assert_eq!(ra.requests, 1);
    assert!(ra.bytes_out >= 32 * 1024 * 1024);

    // Removing a route: 404 afterwards; a bad certificate path keeps the old config.
    let mut bad = route("c", vec![be(a)]);
    bad.cert = Some(gatewire::proxy::settings::CertFiles {
        cert: "/nonexistent/c.pem".into(),
        key: "/nonexistent/k.pem".into(),
    });
    let e = p
        .reload(settings(vec![route("b", vec![be(b)]), bad]))
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("name:c"), "{e:#}");
    assert!(body_of(at, "a.gw.test").await.contains("200 OK alpha"));
    let r = p
        .reload(settings(vec![route("b", vec![be(b)])]))
        .await
        .unwrap();
    assert_eq!(r.removed, vec!["name:a".to_string()]);
    assert!(body_of(at, "a.gw.test").await.contains("404"));
    p.shutdown(Duration::from_secs(1)).await;
}

/// A reload that changes a route's backends (here: adds one) keeps what is
/// known of those it keeps: a backend marked down stays down, its failures
/// stay counted, and requests do not go to it again.
#[tokio::test]
async fn reload_keeps_the_state_of_kept_backends() {
    let (a, _ta) = backend("alpha").await;
    let (b, _tb) = backend("beta").await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let p = Proxy::start(settings(vec![route("a", vec![be(dead), be(a)])]))
        .await
        .unwrap();
    let at = p.http_addrs()[0];
    // Round-robin: one of the first two requests tries `dead` first, is
    // refused and goes on to alpha.
    for _ in 0..2 {
        let (st, _, body) = get(at, "a.gw.test", "/").await;
        assert!(st.contains("200") && body == "alpha", "{st} {body}");
    }
    let health = |p: &Proxy, addr: SocketAddr| {
        let s = p.stats();
        let r = s.iter().find(|r| r.route == "name:a").unwrap();
        let h = r
            .backends
            .iter()
            .find(|h| h.backend == addr.to_string())
            .unwrap();
        (h.up, h.failures)
    };
    assert_eq!(health(&p, dead), (false, 1));
    let report = p
        .reload(settings(vec![route("a", vec![be(dead), be(a), be(b)])]))
        .await
        .unwrap();
    assert_eq!(report.changed, vec!["name:a".to_string()]);
    assert_eq!(health(&p, dead), (false, 1), "still down after the reload");
    for _ in 0..4 {
        let (st, _, body) = get(at, "a.gw.test", "/").await;
        assert!(st.contains("200"), "{st} {body}");
    }
    assert_eq!(health(&p, dead), (false, 1), "not tried again");
    p.shutdown(Duration::from_secs(1)).await;
}

/// Path prefixes come and go on reload; a prefix whose backends did not
/// change keeps its backend state (here a failed backend's count).
#[tokio::test]
async fn reload_adds_and_removes_path_prefixes() {
    let (a, _ta) = backend("alpha").await;
    let (b, _tb) = backend("beta").await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let path = |prefix: &str, to: SocketAddr| gatewire::proxy::settings::PathRoute {
        prefix: gatewire::proxy::paths::PathPrefix::parse(prefix).unwrap(),
        backends: vec![be(to)],
        strip_prefix: false,
        balance: Default::default(),
    };
    let with = |paths: Vec<gatewire::proxy::settings::PathRoute>| {
        let mut r = route("a", vec![be(a)]);
        r.paths = paths;
        settings(vec![r])
    };
    let p = Proxy::start(with(vec![path("/down", dead)])).await.unwrap();
    let at = p.http_addrs()[0];
    let (st, _, _) = get(at, "a.gw.test", "/down/x").await;
    assert!(st.contains("502"), "{st}");
    let failures = |p: &Proxy, prefix: &str| {
        let s = p.stats();
        let r = s.iter().find(|r| r.route == "name:a").unwrap();
        r.backends
            .iter()
            .find(|b| b.path.as_deref() == Some(prefix))
            .map(|b| b.failures)
    };
    assert_eq!(failures(&p, "/down"), Some(1));

    let report = p
        .reload(with(vec![path("/down", dead), path("/beta", b)]))
        .await
        .unwrap();
    assert_eq!(report.changed, vec!["name:a".to_string()]);
    let (st, _, body) = get(at, "a.gw.test", "/beta/x").await;
    assert!(st.contains("200") && body == "beta", "{st} {body}");
    assert_eq!(failures(&p, "/down"), Some(1), "kept across the reload");
    assert_eq!(failures(&p, "/beta"), Some(0));

    p.reload(with(vec![path("/beta", b)])).await.unwrap();
    let (st, _, body) = get(at, "a.gw.test", "/down/x").await;
    assert!(st.contains("200") && body == "alpha", "{st} {body}");
    assert_eq!(failures(&p, "/down"), None);
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn reload_binds_and_closes_listeners_and_drains_keepalive() {
    let (a, _ta) = backend("alpha").await;
    let (echo, _te) = backend("tcp-beta").await;
    let mut s1 = settings(vec![route("a", vec![be(a)])]);
    let p = Proxy::start(s1.clone()).await.unwrap();
    let at = p.http_addrs()[0];
    // A keep-alive connection opened before the reload.
    let mut ka = TcpStream::connect(at).await.unwrap();
    ka.write_all(b"GET /slow HTTP/1.1\r\nHost: a.gw.test\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Reload: same HTTP listener (by configured address), one new TCP forward.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_at = free.local_addr().unwrap();
    drop(free);
    s1.tcp = vec![TcpForwardSettings {
        listen: tcp_at,
        backends: vec![be(echo)],
        proxy_protocol: ProxyProtocol::Off,
        balance: Balance::default(),
        tls: None,
        access: Default::default(),
        rate_limit: None,
        bandwidth: None,
    }];
    let r = p.reload(s1.clone()).await.unwrap();
    assert_eq!(r.added, vec![format!("tcp:{tcp_at}")]);
    assert_eq!(r.listeners_added.len(), 1, "{r:?}");
    assert_eq!(p.http_addrs(), vec![at], "HTTP listener kept");
    // The request in flight on the old generation completes; then the server closes.
    let mut out = Vec::new();
    tokio::time::timeout(T, ka.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("alpha"),
        "{out}"
    );
    // The new TCP forward works (an HTTP backend behind a raw TCP forward).
    let (st, _, body) = get(tcp_at, "x", "/").await;
    assert!(st.contains("200") && body == "tcp-beta", "{st} {body}");
    // Removing it closes the port.
    s1.tcp.clear();
    let r = p.reload(s1).await.unwrap();
    assert_eq!(r.listeners_removed.len(), 1, "{r:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(TcpStream::connect(tcp_at).await.is_err());
}

/// Graceful drain on shutdown: listeners close at once, a download in flight
/// runs to its end within the grace period, and `shutdown` returns once the
/// last connection is gone, not before.
#[tokio::test]
async fn shutdown_drains_a_download_in_flight() {
    let (a, _ta) = backend("alpha").await;
    let p = Proxy::start(settings(vec![route("a", vec![be(a)])]))
        .await
        .unwrap();
    let at = p.http_addrs()[0];
    // 32 MiB with pauses: about 1.3 s.
    let dl = tokio::spawn(async move { get(at, "a.gw.test", "/big/32").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sd = tokio::spawn(p.shutdown(Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        TcpStream::connect(at).await.is_err(),
        "a draining proxy accepts no new connection"
    );
    assert!(!dl.is_finished(), "the download should still be running");
    assert!(!sd.is_finished(), "shutdown waits for the download");
    let (st, len, _) = tokio::time::timeout(T, dl).await.unwrap().unwrap();
    assert!(st.contains("200"), "{st}");
    assert_eq!(len, 32 * 1024 * 1024, "the download ran to the end");
    tokio::time::timeout(Duration::from_secs(2), sd)
        .await
        .expect("shutdown returns once the last connection is gone")
        .unwrap();
}

fn health(interval_ms: u64) -> HealthCheck {
    HealthCheck {
        kind: HealthKind::Http {
            path: "/health".into(),
        },
        interval: Duration::from_millis(interval_ms),
        timeout: Duration::from_millis(500),
        fall: 2,
        rise: 1,
        send: Default::default(),
    }
}

#[tokio::test]
async fn active_health_checks_fail_over_and_back() {
    let (a, ta) = backend("alpha").await;
    let (b, _tb) = backend("beta").await;
    let mut r = route("h", vec![be(a), be(b)]);
    r.balance.health = Some(health(200));
    let p = Proxy::start(settings(vec![r])).await.unwrap();
    let at = p.http_addrs()[0];
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        seen.insert(body_of(at, "h.gw.test").await);
    }
    assert_eq!(seen.len(), 2, "round-robin over both: {seen:?}");
    // alpha goes away (its listener closes: connects are refused).
    ta.abort();
    let _ = ta.await;
    let t0 = Instant::now();
    loop {
        let st = p.stats();
        let h = st.iter().find(|s| s.route == "name:h").unwrap();
        if !h.backends[0].up && h.backends[0].check == Some("failing") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", h.backends);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..6 {
        assert_eq!(body_of(at, "h.gw.test").await, "HTTP/1.1 200 OK beta");
    }
    // alpha comes back on the same port.
    let l = TcpListener::bind(a).await.unwrap();
    let back = serve_paths(l, |_| (hyper::StatusCode::OK, "alpha2"));
    let t0 = Instant::now();
    loop {
        let st = p.stats();
        let h = st.iter().find(|s| s.route == "name:h").unwrap();
        if h.backends[0].up {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", h.backends);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        seen.insert(body_of(at, "h.gw.test").await);
    }
    assert!(seen.contains("HTTP/1.1 200 OK alpha2"), "{seen:?}");
    back.abort();
}

/// Serves HTTP/1.1 on `l`: every request gets `answer(path)`.
fn serve_paths(
    l: TcpListener,
    answer: fn(&str) -> (hyper::StatusCode, &'static str),
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| async move {
                        let (status, body) = answer(req.uri().path());
                        let mut r =
                            hyper::Response::new(http_body_util::Full::new(Bytes::from(body)));
                        *r.status_mut() = status;
                        Ok::<_, Infallible>(r)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    })
}

/// Waits until backend 0 of `route` is `up` (with `check` as its check state).
async fn wait_backend(p: &Proxy, route: &str, up: bool, check: &str) {
    let t0 = Instant::now();
    loop {
        let st = p.stats();
        let h = st.iter().find(|s| s.route == route).unwrap();
        if h.backends[0].up == up && h.backends[0].check == Some(check) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{route}: {:?}",
            h.backends
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The two kinds of active check on one backend that accepts connections
/// but fails its HTTP health path: the HTTP check takes it out (503), the TCP
/// connect check keeps it in (200) until the backend stops listening.
#[tokio::test]
async fn tcp_and_http_health_checks_differ() {
    // A backend whose `/health` answers 500 and every other path 200 `sick`.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sick = l.local_addr().unwrap();
    let task = serve_paths(l, |path| match path {
        "/health" => (hyper::StatusCode::INTERNAL_SERVER_ERROR, "sick"),
        _ => (hyper::StatusCode::OK, "sick"),
    });
    let mut by_http = route("byhttp", vec![be(sick)]);
    by_http.balance.health = Some(health(100));
    let mut by_tcp = route("bytcp", vec![be(sick)]);
    by_tcp.balance.health = Some(HealthCheck {
        kind: HealthKind::Tcp,
        ..health(100)
    });
    let p = Proxy::start(settings(vec![by_http, by_tcp])).await.unwrap();
    let at = p.http_addrs()[0];
    wait_backend(&p, "name:byhttp", false, "failing").await;
    wait_backend(&p, "name:bytcp", true, "passing").await;
    assert!(body_of(at, "byhttp.gw.test")
        .await
        .starts_with("HTTP/1.1 503"));
    assert_eq!(body_of(at, "bytcp.gw.test").await, "HTTP/1.1 200 OK sick");
    task.abort();
    let _ = task.await;
    wait_backend(&p, "name:bytcp", false, "failing").await;
}

struct Fake(AtomicBool, IpAddr);
impl TunnelLiveness for Fake {
    fn tunnel_up(&self, ip: IpAddr) -> Option<bool> {
        (ip == self.1).then(|| self.0.load(Ordering::Relaxed))
    }
}

#[tokio::test]
async fn a_backend_behind_a_dead_tunnel_counts_as_down() {
    let (a, _ta) = backend("alpha").await;
    // beta listens on another loopback address, "behind a node".
    let l = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let b = l.local_addr().unwrap();
    drop(l);
    let lb = TcpListener::bind(b).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = lb.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(|_req: hyper::Request<hyper::body::Incoming>| async {
                    Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
                        Bytes::from("beta"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let fake = Arc::new(Fake(AtomicBool::new(false), b.ip()));
    let p = Proxy::start_with(
        settings(vec![route("t", vec![be(a), be(b)])]),
        Some(fake.clone()),
    )
    .await
    .unwrap();
    let at = p.http_addrs()[0];
    for _ in 0..4 {
        assert_eq!(body_of(at, "t.gw.test").await, "HTTP/1.1 200 OK alpha");
    }
    let st = p.stats();
    let t = st.iter().find(|s| s.route == "name:t").unwrap();
    assert_eq!(t.backends[1].tunnel, Some("down"));
    assert!(!t.backends[1].up && t.backends[0].up);
    assert_eq!(t.backends[0].tunnel, None);
    fake.0.store(true, Ordering::Relaxed);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(body_of(at, "t.gw.test").await);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[tokio::test]
async fn least_conn_sticky_and_route_limit() {
    let (a, _ta) = backend("alpha").await;
    let (b, _tb) = backend("beta").await;
    // least_conn: while a slow request holds one backend, quick ones go to the other.
    let mut lc = route("lc", vec![be(a), be(b)]);
    lc.balance.policy = Policy::LeastConn;
    let mut st = route("st", vec![be(a), be(b)]);
    st.balance.sticky = true;
    let mut lim = route("lim", vec![be(a)]);
    lim.balance.max_connections = Some(1);
    let p = Proxy::start(settings(vec![lc, st, lim])).await.unwrap();
    let at = p.http_addrs()[0];
    let slow = tokio::spawn(async move { get(at, "lc.gw.test", "/slow").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let busy = {
        let s = p.stats();
        let r = s.iter().find(|r| r.route == "name:lc").unwrap();
        assert_eq!(
            r.backends.iter().map(|b| b.active_connections).sum::<u64>(),
            1,
            "{:?}",
            r.backends
        );
        if r.backends[0].active_connections == 1 {
            "alpha"
        } else {
            "beta"
        }
    };
    for _ in 0..4 {
        let got = body_of(at, "lc.gw.test").await;
        assert!(!got.ends_with(busy), "{got} while {busy} is busy");
    }
    slow.await.unwrap();

    // sticky: one client address always lands on the same backend.
    let first = body_of(at, "st.gw.test").await;
    for _ in 0..5 {
        assert_eq!(body_of(at, "st.gw.test").await, first);
    }

    // A route limited to one connection: the second at once gets 503.
    let hold = tokio::spawn(async move { get(at, "lim.gw.test", "/slow").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s2, _, body) = get(at, "lim.gw.test", "/").await;
    assert!(s2.contains("503") && body.contains("limit"), "{s2} {body}");
    assert!(hold.await.unwrap().0.contains("200"));
    let s = p.stats();
    let r = s.iter().find(|r| r.route == "name:lim").unwrap();
    assert_eq!(r.errors.get("over_capacity"), Some(&1));
    assert!(body_of(at, "lim.gw.test").await.contains("200"));
}

#[tokio::test]
async fn tcp_forward_sends_proxy_v1() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = l.local_addr().unwrap();
    let got = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = vec![0u8; 256];
        let mut n = 0;
        while !buf[..n].ends_with(b"hello") {
            let k = s.read(&mut buf[n..]).await.unwrap();
            assert!(k > 0);
            n += k;
        }
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    let mut s = settings(vec![]);
    s.tcp = vec![TcpForwardSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        backends: vec![be(b)],
        proxy_protocol: ProxyProtocol::V1,
        balance: Balance::default(),
        tls: None,
        access: Default::default(),
        rate_limit: None,
        bandwidth: None,
    }];
    let p = Proxy::start(s).await.unwrap();
    let at = p.tcp_addrs()[0];
    let mut c = TcpStream::connect(at).await.unwrap();
    let me = c.local_addr().unwrap();
    c.write_all(b"hello").await.unwrap();
    let line = tokio::time::timeout(T, got).await.unwrap().unwrap();
    assert_eq!(
        line,
        format!(
            "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\nhello",
            me.port(),
            at.port()
        )
    );
}

#[tokio::test]
async fn backend_connections_are_pooled() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = l.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let acc = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            acc.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let svc = service_fn(|_req: hyper::Request<hyper::body::Incoming>| async {
                    Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
                        Bytes::from("pooled"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let p = Proxy::start(settings(vec![route("pool", vec![be(b)])]))
        .await
        .unwrap();
    let at = p.http_addrs()[0];
    for _ in 0..20 {
        assert_eq!(body_of(at, "pool.gw.test").await, "HTTP/1.1 200 OK pooled");
    }
    let n = accepted.load(Ordering::Relaxed);
    assert!(n <= 2, "{n} backend connections for 20 sequential requests");
}

/// Asks the proxy's DNS listener at `at` one question over UDP: the reply's
/// response code and the addresses it answers.
async fn dns_ask(
    at: SocketAddr,
    name: &str,
    qtype: hickory_proto::rr::RecordType,
) -> (hickory_proto::op::ResponseCode, Vec<IpAddr>, bool) {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RData};
    let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&m.to_vec().unwrap(), at).await.unwrap();
    let mut buf = vec![0u8; 1500];
    let n = tokio::time::timeout(T, sock.recv(&mut buf))
        .await
        .expect("a DNS reply")
        .unwrap();
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(r.metadata.id, 0x4242);
    let addrs = r
        .answers
        .iter()
        .filter_map(|a| match &a.data {
            RData::A(x) => Some(IpAddr::V4(x.0)),
            RData::AAAA(x) => Some(IpAddr::V6(x.0)),
            _ => None,
        })
        .collect();
    (r.metadata.response_code, addrs, r.metadata.authoritative)
}

/// `[proxy.dns]`: the hub answers its gateway zone, and the names in it
/// follow the routes across reloads (a route added is named at once, one
/// removed is NXDOMAIN); names outside are refused.
#[tokio::test]
async fn dns_zone_names_follow_routes_across_reloads() {
    use hickory_proto::op::ResponseCode;
    use hickory_proto::rr::RecordType;
    let (a, _ta) = backend("alpha").await;
    let public: Vec<IpAddr> = vec![
        "192.0.2.10".parse().unwrap(),
        "2001:db8::10".parse().unwrap(),
    ];
    let with = |names: &[&str]| {
        let mut s = settings(names.iter().map(|n| route(n, vec![be(a)])).collect());
        s.dns = Some(gatewire::proxy::settings::DnsSettings {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            addresses: public.clone(),
            nameservers: vec![(
                DomainName::parse("ns1.gw.test").unwrap(),
                vec!["192.0.2.53".parse().unwrap()],
            )],
            ttl: 30,
            rate_limit: None,
        });
        s
    };
    let p = Proxy::start(with(&["blog"])).await.unwrap();
    let at = p.dns_addrs()[0];
    let (rc, addrs, aa) = dns_ask(at, "blog.gw.test.", RecordType::A).await;
    assert_eq!((rc, aa), (ResponseCode::NoError, true));
    assert_eq!(addrs, vec![public[0]]);
    let (_, addrs, _) = dns_ask(at, "BLOG.gw.test.", RecordType::AAAA).await;
    assert_eq!(addrs, vec![public[1]]);
    let (rc, addrs, _) = dns_ask(at, "shop.gw.test.", RecordType::A).await;
    assert_eq!(rc, ResponseCode::NXDomain);
    assert!(addrs.is_empty());
    let (_, addrs, _) = dns_ask(at, "ns1.gw.test.", RecordType::A).await;
    assert_eq!(
        addrs,
        vec!["192.0.2.53".parse::<IpAddr>().unwrap()],
        "the in-zone name server"
    );
    let (rc, _, aa) = dns_ask(at, "example.org.", RecordType::A).await;
    assert_eq!((rc, aa), (ResponseCode::Refused, false));

    // The route is served over HTTP as the zone says.
    let (st, _, body) = get(p.http_addrs()[0], "blog.gw.test", "/").await;
    assert!(st.contains("200") && body.contains("alpha"), "{st} {body}");

    p.reload(with(&["shop"])).await.unwrap();
    assert_eq!(p.dns_addrs(), vec![at], "the DNS listener stays");
    let (rc, addrs, _) = dns_ask(at, "shop.gw.test.", RecordType::A).await;
    assert_eq!((rc, addrs), (ResponseCode::NoError, vec![public[0]]));
    let (rc, _, _) = dns_ask(at, "blog.gw.test.", RecordType::A).await;
    assert_eq!(rc, ResponseCode::NXDomain);

    // Without [proxy.dns] the listener goes.
    let mut plain = with(&["shop"]);
    plain.dns = None;
    p.reload(plain).await.unwrap();
    assert!(p.dns_addrs().is_empty());
    let served = p.stats().into_iter().any(|r| r.route == "dns");
    assert!(!served, "no dns entry without a DNS listener");
    // The socket is closed: no answer.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut m = hickory_proto::op::Message::new(
        9,
        hickory_proto::op::MessageType::Query,
        hickory_proto::op::OpCode::Query,
    );
    m.add_query(hickory_proto::op::Query::query(
        hickory_proto::rr::Name::from_ascii("shop.gw.test.").unwrap(),
        RecordType::A,
    ));
    sock.send_to(&m.to_vec().unwrap(), at).await.unwrap();
    let mut buf = [0u8; 512];
    let r = tokio::time::timeout(Duration::from_millis(500), sock.recv(&mut buf)).await;
    assert!(
        !matches!(r, Ok(Ok(_))),
        "the removed listener still answers"
    );

    // [proxy.dns] coming back with a reload opens a listener that answers.
    p.reload(with(&["shop"])).await.unwrap();
    let at = p.dns_addrs()[0];
    let (rc, addrs, _) = dns_ask(at, "shop.gw.test.", RecordType::A).await;
    assert_eq!((rc, addrs), (ResponseCode::NoError, vec![public[0]]));
}

/// `[proxy.dns] rate_limit`: over UDP a client over its rate gets truncated
/// replies (no larger than its query) or none, counted as `rate_limited`;
/// over TCP it is answered in full; the limit goes with a reload.
#[tokio::test]
async fn dns_rate_limit_truncates_then_drops_over_udp() {
    use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{Name, RecordType};
    let (a, _ta) = backend("alpha").await;
    // One port for UDP and TCP, as a real listener has (port 0 would give
    // each its own).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let with = |limit: Option<u32>| {
        let mut s = settings(vec![route("blog", vec![be(a)])]);
        s.dns = Some(gatewire::proxy::settings::DnsSettings {
            listen: vec![listen],
            addresses: vec!["192.0.2.10".parse().unwrap()],
            nameservers: vec![],
            ttl: 30,
            rate_limit: limit.map(|n| gatewire::proxy::settings::RateLimit {
                per_second: n,
                burst: n,
            }),
        });
        s
    };
    let p = Proxy::start(with(Some(1))).await.unwrap();
    let at = p.dns_addrs()[0];
    assert_eq!(at, listen);
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let query_with_id = |id: u16| {
        let mut q = Message::new(id, MessageType::Query, OpCode::Query);
        q.add_query(Query::query(
            Name::from_ascii("blog.gw.test.").unwrap(),
            RecordType::A,
        ));
        q.to_vec().unwrap()
    };
    let query = query_with_id(7);
    // Ten queries at once (well within a millisecond of a token's refill):
    // the burst's one token answers the first; the client's first, third,
    // fifth, seventh and ninth refusals get a truncated reply, the rest none.
    for id in 100..110 {
        sock.send_to(&query_with_id(id), at).await.unwrap();
    }
    let (mut full, mut truncated) = (Vec::new(), Vec::new());
    let mut buf = vec![0u8; 1500];
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(500), sock.recv(&mut buf)).await
    {
        let r = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        if r.metadata.truncation {
            assert!(r.answers.is_empty());
            assert!(
                n <= query.len(),
                "a truncated reply is no larger than the query"
            );
            truncated.push(r.metadata.id);
        } else {
            assert_eq!(r.answers.len(), 1);
            full.push(r.metadata.id);
        }
    }
    assert_eq!(full, vec![100]);
    assert_eq!(truncated, vec![101, 103, 105, 107, 109]);
    let dns = p.stats().into_iter().find(|r| r.route == "dns").unwrap();
    assert_eq!(dns.errors.get("rate_limited").copied(), Some(9), "{dns:?}");

    // TCP is not limited.
    let mut s = TcpStream::connect(at).await.unwrap();
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&query);
    s.write_all(&framed).await.unwrap();
    let len = s.read_u16().await.unwrap();
    let mut reply = vec![0u8; usize::from(len)];
    s.read_exact(&mut reply).await.unwrap();
    let r = Message::from_vec(&reply).unwrap();
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 1);

    // Without the limit every query is answered.
    p.reload(with(None)).await.unwrap();
    for _ in 0..5 {
        sock.send_to(&query, at).await.unwrap();
        let n = tokio::time::timeout(T, sock.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let r = Message::from_vec(&buf[..n]).unwrap();
        assert!(!r.metadata.truncation);
        assert_eq!(r.answers.len(), 1);
    }
}

/// A raw backend that echoes what each connection sends; a connection that
/// starts with an HTTP request (`GET `) gets `101` to `echo` first, and its
/// head is not echoed.
async fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut first = true;
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let mut data = &buf[..n];
                    if std::mem::take(&mut first) && data.starts_with(b"GET ") {
                        // The whole head, then the switch.
                        let mut head = data.to_vec();
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            let k = match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => k,
                            };
                            head.extend_from_slice(&buf[..k]);
                        }
                        let resp = "HTTP/1.1 101 Switching Protocols\r\n\
                                    Connection: upgrade\r\nUpgrade: echo\r\n\r\n";
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                        data = &[];
                    }
                    if s.write_all(data).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Sends `msg` on `s` and reads as many bytes back.
async fn echoed(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(T, s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    back
}

/// Whether `s` was closed by the proxy: a write then a read get an end
/// (or a reset), not an answer.
async fn closed(s: &mut TcpStream) -> bool {
    let _ = s.write_all(b"ping").await;
    let mut buf = [0u8; 16];
    match tokio::time::timeout(T, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => panic!("neither closed nor answering"),
    }
}

/// Shutdown cuts what is still open when its grace period is over (as
/// removing `[proxy]` from the config does): a TCP forward, an upgraded
/// connection and a download, which a reload before it left running.
#[tokio::test]
async fn shutdown_cuts_what_outlives_its_grace() {
    let echo = echo_backend().await;
    let (a, _ta) = backend("alpha").await;
    let mut s = settings(vec![route("a", vec![be(a)]), route("ws", vec![be(echo)])]);
    s.tcp = vec![TcpForwardSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        backends: vec![be(echo)],
        proxy_protocol: ProxyProtocol::Off,
        balance: Balance::default(),
        tls: None,
        access: Default::default(),
        rate_limit: None,
        bandwidth: None,
    }];
    let p = Proxy::start(s.clone()).await.unwrap();
    let (at, tcp_at) = (p.http_addrs()[0], p.tcp_addrs()[0]);
    let mut tcp = TcpStream::connect(tcp_at).await.unwrap();
    assert_eq!(echoed(&mut tcp, b"ping").await, b"ping");
    let mut ws = TcpStream::connect(at).await.unwrap();
    ws.write_all(
        b"GET /ws HTTP/1.1\r\nHost: ws.gw.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ws.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert_eq!(echoed(&mut ws, b"ping").await, b"ping");
    // 64 MiB with pauses: about 2.6 s, read as it comes.
    let dl = tokio::spawn(async move {
        let mut c = TcpStream::connect(at).await.unwrap();
        c.write_all(b"GET /big/64 HTTP/1.1\r\nHost: a.gw.test\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0usize;
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got += n,
            }
        }
    });
    // A reload cuts nothing.
    p.reload(s).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(echoed(&mut tcp, b"ping").await, b"ping");
    assert_eq!(echoed(&mut ws, b"ping").await, b"ping");
    assert!(!dl.is_finished(), "the download should still be running");
    let start = Instant::now();
    p.shutdown(Duration::from_millis(200)).await;
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(closed(&mut tcp).await, "the TCP forward was cut");
    assert!(closed(&mut ws).await, "the upgraded connection was cut");
    let got = tokio::time::timeout(T, dl).await.unwrap().unwrap();
    assert!(got < 64 * 1024 * 1024, "the download was cut ({got} bytes)");
}
