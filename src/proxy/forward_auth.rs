//! Forward authentication (`forward_auth` on terminated routes): before a
//! request goes to a backend, the hub asks an authentication service (an
//! oauth2-proxy, an SSO gateway, any HTTP service) with a `GET` that carries
//! the request's headers and where it was going (`X-Forwarded-Method`,
//! `-Proto`, `-Host`, `-Uri`, `-For`). A 2xx answer lets the request through,
//! with the headers `forward_auth_headers` names copied from the answer (the
//! user's name or groups, say; the client's own copies of them are removed
//! first, so a client cannot claim them). Any other answer goes to the client
//! as it is: a 401, a 403, or a 302 to a login page. A service that cannot be
//! reached or does not answer in time gets the client a 503.
//!
//! [`AuthUrl::parse`] and [`auth_request_headers`] are pure; [`ForwardAuth`]
//! is the driver (keep-alive connections to the service, a few kept idle).

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Limited};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Most bytes of an authentication service's answer passed to the client.
pub const MAX_BODY: usize = 64 * 1024;
/// Idle connections to the service kept per route.
const IDLE: usize = 16;
/// Checks in flight to the service per route: past it a request waits for
/// one to end (within `response_timeout`), so a flood of requests opens at
/// most this many connections to the service instead of one each.
pub const MAX_CHECKS: usize = 256;
/// A kept connection idle longer than this is closed rather than used: a
/// service (or a server in front of it) closes its idle keep-alive
/// connections on timers of its own, as short as 5 s (Node.js).
const IDLE_AGE: Duration = Duration::from_secs(4);

/// Where the authentication service listens: `http://<ip>:<port><path>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthUrl {
    /// Its address.
    pub addr: SocketAddr,
    /// Path and query asked for.
    pub path: String,
}

impl AuthUrl {
    /// Parses `http://192.0.2.1:4180/auth` or `http://[2001:db8::1]:4180/`.
    /// The address is an IP literal with a port (as backends are); the
    /// hub's own loopback is allowed (an authentication service next to it),
    /// unspecified and multicast addresses are not.
    pub fn parse(s: &str) -> Result<AuthUrl, String> {
        let rest = s
            .strip_prefix("http://")
            .ok_or_else(|| format!("`{s}`: expected http://<ip>:<port>/<path>"))?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        let addr: SocketAddr = hostport
            .parse()
            .map_err(|_| format!("`{s}`: `{hostport}` is not ip:port"))?;
        if addr.port() == 0 {
            return Err(format!("`{s}`: port 0"));
        }
        let ip = addr.ip().to_canonical();
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(format!("`{s}`: {ip} is not an address to connect to"));
        }
        if path.bytes().any(|b| b <= b' ' || b == 0x7f || b == b'#') {
            return Err(format!(
                "`{s}`: the path holds spaces, controls or a fragment"
            ));
        }
        http::uri::PathAndQuery::try_from(path).map_err(|_| format!("`{s}`: bad path"))?;
        Ok(AuthUrl {
            addr,
            path: path.to_string(),
        })
    }
}

impl std::fmt::Display for AuthUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.addr, self.path)
    }
}

/// Headers of the request body, not passed to the authentication service
/// (the check has none), besides the hop-by-hop ones.
const BODY_HEADERS: [HeaderName; 4] = [
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::EXPECT,
    header::TRAILER,
];

/// The headers of the check for a request with `headers`, `method` and `uri`
/// (path and query) to `host`, from `client`, over TLS or not, from a
/// trusted proxy or not: its hop-by-hop headers (also those its
/// `Connection` names) go, an HTTP/2 client's cookies are joined, and the
/// forwarding headers are the ones its backend gets.
pub fn auth_request_headers(
    headers: &HeaderMap,
    method: &str,
    uri: &str,
    host: &str,
    client: IpAddr,
    tls: bool,
    trusted: bool,
) -> HeaderMap {
    use crate::proxy::http::{add_forwarding, join_cookies, strip_hop_by_hop};
    let mut h = headers.clone();
    strip_hop_by_hop(&mut h, None);
    for n in BODY_HEADERS {
        h.remove(n);
    }
    join_cookies(&mut h);
    add_forwarding(&mut h, client, tls, host, trusted);
    // Where the request goes is the hub's to say, also to a trusted proxy.
    let set = |h: &mut HeaderMap, name: &'static str, v: &str| {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(HeaderName::from_static(name), v);
        }
    };
    set(&mut h, "x-forwarded-method", method);
    set(&mut h, "x-forwarded-uri", uri);
    // The host the hub routes by, not a trusted proxy's `X-Forwarded-Host`:
    // the service must judge the route the request goes to.
    set(&mut h, "x-forwarded-host", host);
    if let Ok(v) = HeaderValue::from_str(host) {
        h.insert(header::HOST, v);
    }
    h
}

/// What the service said.
#[derive(Debug)]
pub enum Verdict {
    /// 2xx: `headers` (the configured names) go on the request, `cookies`
    /// (the answer's `Set-Cookie`s: a refreshed session) on the response to
    /// the client.
    Allow {
        headers: Vec<(HeaderName, HeaderValue)>,
        cookies: Vec<HeaderValue>,
    },
    /// Anything else: this answer goes to the client.
    Deny(Response<Bytes>),
    /// The service failed (unreachable, timed out, a broken answer).
    Failed(String),
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// A route's authentication service and the connections kept to it.
pub struct ForwardAuth {
    url: AuthUrl,
    copy: Vec<HeaderName>,
    idle: parking_lot::Mutex<Vec<(Sender, std::time::Instant)>>,
    checks: tokio::sync::Semaphore,
    max_checks: usize,
}

impl std::fmt::Debug for ForwardAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardAuth")
            .field("url", &self.url.to_string())
            .field("copy", &self.copy)
            .finish()
    }
}

impl ForwardAuth {
    /// Asks `url`, copying the `copy` headers of a 2xx answer.
    pub fn new(url: AuthUrl, copy: Vec<HeaderName>) -> ForwardAuth {
        Self::with_max_checks(url, copy, MAX_CHECKS)
    }

    /// Like [`Self::new`], with at most `max` checks in flight.
    pub fn with_max_checks(url: AuthUrl, copy: Vec<HeaderName>, max: usize) -> ForwardAuth {
        ForwardAuth {
            url,
            copy,
            idle: parking_lot::Mutex::new(Vec::new()),
            checks: tokio::sync::Semaphore::new(max),
            max_checks: max,
        }
    }

    /// The headers a client may not send on this route (they come from the
    /// service).
    pub fn copied(&self) -> &[HeaderName] {
        &self.copy
    }

    /// A connection to the service: a kept one (unless `fresh`), and whether
    /// it was.
    async fn sender(
        &self,
        connect_timeout: Duration,
        fresh: bool,
    ) -> Result<(Sender, bool), String> {
        if !fresh {
            while let Some((s, since)) = self.idle.lock().pop() {
                if s.is_ready() && since.elapsed() < IDLE_AGE {
                    return Ok((s, true));
                }
            }
        }
        let tcp = tokio::time::timeout(
            connect_timeout,
            tokio::net::TcpStream::connect(self.url.addr),
        )
        .await
        .map_err(|_| "connect: timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, Empty<Bytes>>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok((sender, false))
    }

    /// Asks the service about a request with `headers` (already prepared by
    /// [`auth_request_headers`]), within the timeouts.
    pub async fn check(
        &self,
        headers: HeaderMap,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Verdict {
        let mut req = Request::new(Empty::new());
        *req.uri_mut() = match self.url.path.parse() {
            Ok(u) => u,
            Err(_) => return Verdict::Failed("bad path".into()),
        };
        *req.headers_mut() = headers;
        let deadline = tokio::time::Instant::now() + response_timeout;
        let Ok(Ok(_check)) = tokio::time::timeout_at(deadline, self.checks.acquire()).await else {
            return Verdict::Failed(format!(
                "{} checks already waiting for the service",
                self.max_checks
            ));
        };
        // A kept connection the service closed just before the request went
        // out gives the request back: once more on a fresh one.
        let mut fresh = false;
        let (resp, sender) = loop {
            let (mut sender, kept) = match self.sender(connect_timeout, fresh).await {
                Ok(s) => s,
                Err(e) => return Verdict::Failed(e),
            };
            match tokio::time::timeout_at(deadline, sender.try_send_request(req)).await {
                Err(_) => return Verdict::Failed("no answer in time".into()),
                Ok(Ok(resp)) => break (resp, sender),
                Ok(Err(mut e)) => match e.take_message() {
                    Some(back) if kept => {
                        req = back;
                        fresh = true;
                    }
                    _ => return Verdict::Failed(format!("request: {}", e.into_error())),
                },
            }
        };
        let asked = async {
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("answer body: {e}"))?
                .to_bytes();
            Ok::<_, String>(Response::from_parts(parts, body))
        };
        let resp = match tokio::time::timeout_at(deadline, asked).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Verdict::Failed(e),
            Err(_) => return Verdict::Failed("no answer in time".into()),
        };
        if sender.is_ready() {
            let mut idle = self.idle.lock();
            if idle.len() < IDLE {
                idle.push((sender, std::time::Instant::now()));
            }
        }
        verdict(resp, &self.copy)
    }
}

/// The verdict on the service's answer `resp`.
pub fn verdict(resp: Response<Bytes>, copy: &[HeaderName]) -> Verdict {
    if resp.status().is_success() {
        let mut out = Vec::new();
        for n in copy {
            for v in resp.headers().get_all(n) {
                out.push((n.clone(), v.clone()));
            }
        }
        let cookies = resp
            .headers()
            .get_all(header::SET_COOKIE)
            .iter()
            .cloned()
            .collect();
        return Verdict::Allow {
            headers: out,
            cookies,
        };
    }
    if resp.status().is_informational() {
        return Verdict::Failed(format!("status {}", resp.status()));
    }
    let (mut parts, body) = resp.into_parts();
    // Hop-by-hop headers (also those its `Connection` names) are the
    // service's connection's; the length is set again for the body as
    // passed on. The content type stays. HTTP/1.1, as the hub speaks it: a
    // service's HTTP/1.0 would cost the client its keep-alive.
    crate::proxy::http::strip_hop_by_hop(&mut parts.headers, None);
    for n in [header::CONTENT_LENGTH, header::TRAILER] {
        parts.headers.remove(n);
    }
    parts.version = http::Version::HTTP_11;
    Verdict::Deny(Response::from_parts(parts, body))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn urls() {
        let u = AuthUrl::parse("http://100.64.1.2:4180/oauth2/auth?x=1").unwrap();
        assert_eq!(u.addr, "100.64.1.2:4180".parse().unwrap());
        assert_eq!(u.path, "/oauth2/auth?x=1");
        assert_eq!(u.to_string(), "http://100.64.1.2:4180/oauth2/auth?x=1");
        let u = AuthUrl::parse("http://[fd77:6777::1:2]:9091").unwrap();
        assert_eq!(u.path, "/");
        assert!(
            AuthUrl::parse("http://127.0.0.1:4180/auth").is_ok(),
            "loopback is allowed"
        );
        for (bad, why) in [
            ("https://10.0.0.1:1/", "expected http://"),
            ("http://auth.example:4180/", "not ip:port"),
            ("http://10.0.0.1/", "not ip:port"),
            ("http://10.0.0.1:0/", "port 0"),
            ("http://0.0.0.0:80/", "not an address"),
            ("http://[ff02::1]:80/", "not an address"),
            ("http://10.0.0.1:80/a b", "spaces"),
            ("http://10.0.0.1:80/a#b", "fragment"),
        ] {
            let e = AuthUrl::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn checks_in_flight_are_bounded() {
        // A service that takes connections and never answers.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = AuthUrl::parse(&format!("http://{}/auth", l.local_addr().unwrap())).unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(s);
            }
        });
        let fa = std::sync::Arc::new(ForwardAuth::with_max_checks(url, Vec::new(), 2));
        let ask = |fa: std::sync::Arc<ForwardAuth>| async move {
            fa.check(
                HeaderMap::new(),
                Duration::from_secs(2),
                Duration::from_millis(600),
            )
            .await
        };
        let (a, b, c) = tokio::join!(ask(fa.clone()), ask(fa.clone()), ask(fa.clone()));
        let failed = |v: &Verdict| match v {
            Verdict::Failed(e) => e.clone(),
            _ => panic!("an answer from a silent service"),
        };
        let mut why: Vec<String> = [a, b, c].iter().map(failed).collect();
        why.sort();
        // Two asked and timed out; the third never got to ask.
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert!(why[0].contains("2 checks already waiting"), "{why:?}");
        assert_eq!(&why[1..], ["no answer in time", "no answer in time"]);
        // The places come back: the next check asks again.
        let d = ask(fa.clone()).await;
        assert_eq!(failed(&d), "no answer in time");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[test]
    fn check_headers_carry_the_request_and_not_its_body() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "_oauth2_proxy=abc".parse().unwrap());
        h.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        h.insert(header::CONNECTION, "keep-alive".parse().unwrap());
        h.insert("x-forwarded-uri", "/spoofed".parse().unwrap());
        h.insert("x-real-ip", "192.0.2.1".parse().unwrap());
        h.insert("forwarded", "for=192.0.2.1".parse().unwrap());
        let out = auth_request_headers(
            &h,
            "POST",
            "/app?q=1",
            "app.gw.example.org",
            "::ffff:203.0.113.9".parse().unwrap(),
            true,
            false,
        );
        assert_eq!(out[header::COOKIE], "_oauth2_proxy=abc");
        assert_eq!(out["x-forwarded-method"], "POST");
        assert_eq!(out["x-forwarded-proto"], "https");
        assert_eq!(out["x-forwarded-host"], "app.gw.example.org");
        assert_eq!(out["x-forwarded-uri"], "/app?q=1");
        assert_eq!(out["x-forwarded-for"], "203.0.113.9");
        assert_eq!(out[header::HOST], "app.gw.example.org");
        assert!(out.get(header::CONTENT_LENGTH).is_none());
        assert!(out.get(header::CONNECTION).is_none());
        assert!(out.get("x-real-ip").is_none());
        assert_eq!(
            out["forwarded"],
            "for=203.0.113.9;host=\"app.gw.example.org\";proto=https"
        );
    }

    #[test]
    fn check_headers_drop_what_connection_names_and_join_cookies() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1".parse().unwrap());
        h.append(header::COOKIE, "b=2".parse().unwrap());
        h.insert(header::CONNECTION, "x-secret, close".parse().unwrap());
        h.insert("x-secret", "s".parse().unwrap());
        let ip = "203.0.113.9".parse().unwrap();
        let out = auth_request_headers(&h, "GET", "/", "a.b", ip, false, false);
        let cookies: Vec<_> = out.get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2"]);
        assert!(out.get("x-secret").is_none(), "{out:?}");
    }

    #[test]
    fn check_headers_keep_a_trusted_proxys_forwarding() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "192.0.2.9".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        h.insert("x-forwarded-uri", "/spoofed".parse().unwrap());
        h.insert("x-forwarded-method", "PUT".parse().unwrap());
        h.insert("x-forwarded-host", "public.example".parse().unwrap());
        let ip = "10.0.0.1".parse().unwrap();
        let out = auth_request_headers(&h, "GET", "/app", "a.b", ip, false, true);
        assert_eq!(out["x-forwarded-for"], "192.0.2.9, 10.0.0.1");
        assert_eq!(out["x-forwarded-proto"], "https");
        // Where the request goes is still the hub's to say: the route's
        // host, whatever host the proxy in front names.
        assert_eq!(out["x-forwarded-uri"], "/app");
        assert_eq!(out["x-forwarded-method"], "GET");
        assert_eq!(out["x-forwarded-host"], "a.b");
        assert_eq!(out.get_all("x-forwarded-host").iter().count(), 1);
        // From anyone else, the hub's own.
        let out = auth_request_headers(&h, "GET", "/app", "a.b", ip, false, false);
        assert_eq!(out["x-forwarded-for"], "10.0.0.1");
        assert_eq!(out["x-forwarded-proto"], "http");
    }

    #[test]
    fn verdicts() {
        let user = HeaderName::from_static("x-auth-request-user");
        let mut ok = Response::new(Bytes::new());
        ok.headers_mut().insert(&user, "alice".parse().unwrap());
        ok.headers_mut().insert("x-other", "1".parse().unwrap());
        ok.headers_mut()
            .append(header::SET_COOKIE, "_sso=a; Secure".parse().unwrap());
        ok.headers_mut()
            .append(header::SET_COOKIE, "_csrf=b".parse().unwrap());
        match verdict(ok, std::slice::from_ref(&user)) {
            Verdict::Allow { headers, cookies } => {
                assert_eq!(headers, vec![(user.clone(), "alice".parse().unwrap())]);
                assert_eq!(cookies, vec!["_sso=a; Secure", "_csrf=b"]);
            }
            v => panic!("{v:?}"),
        }
        let mut login = Response::new(Bytes::from_static(b"go log in"));
        *login.status_mut() = StatusCode::FOUND;
        login
            .headers_mut()
            .insert(header::LOCATION, "https://sso.example/".parse().unwrap());
        login
            .headers_mut()
            .insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        login
            .headers_mut()
            .insert(header::CONTENT_TYPE, "text/html".parse().unwrap());
        // What the service's `Connection` names is its connection's too.
        login
            .headers_mut()
            .insert(header::CONNECTION, "x-hop".parse().unwrap());
        login.headers_mut().insert("x-hop", "1".parse().unwrap());
        *login.version_mut() = http::Version::HTTP_10;
        match verdict(login, &[user]) {
            Verdict::Deny(r) => {
                assert_eq!(r.status(), StatusCode::FOUND);
                assert_eq!(r.version(), http::Version::HTTP_11);
                assert!(r.headers().get("x-hop").is_none());
                assert!(r.headers().get(header::CONNECTION).is_none());
                assert_eq!(r.headers()[header::LOCATION], "https://sso.example/");
                assert!(r.headers().get(header::TRANSFER_ENCODING).is_none());
                assert_eq!(r.headers()[header::CONTENT_TYPE], "text/html");
                assert_eq!(r.body(), "go log in");
            }
            v => panic!("{v:?}"),
        }
    }
}
