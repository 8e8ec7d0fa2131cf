//! The proxy runtime: binds the listeners, routes connections, owns the tasks.
//!
//! [`Proxy::start`] takes validated [`ProxySettings`]; dropping the [`Proxy`] (or
//! [`Proxy::shutdown`]) stops accepting. Connections in flight are asked to finish
//! (HTTP graceful shutdown) and are otherwise left to end by themselves.

use crate::proxy::forward;
use crate::proxy::http::{handle, ConnInfo};
use crate::proxy::io::{bind_tcp, bind_udp, splice, Prefixed};
use crate::proxy::names::{DomainName, NameTable};
use crate::proxy::proxy_protocol::{encode_v2, Transport};
use crate::proxy::settings::{Limits, ProxySettings, RouteHost, RouteSettings, TlsMode};
use crate::proxy::stats::{Counters, ErrorKind, RouteSnapshot};
use crate::proxy::tls::{self, Hello, SniResolver};
use crate::proxy::upstream::{BackendTlsClient, UpstreamError, Upstreams};
use anyhow::Context as _;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info, info_span, warn, Instrument};

/// One HTTP/TLS route at run time.
pub struct Route {
    /// `name:blog` or `fqdn:www.example.com`.
    pub id: String,
    /// Hosts it serves.
    pub hosts: Vec<DomainName>,
    /// Its settings.
    pub settings: RouteSettings,
    /// Its backends.
    pub upstreams: Upstreams,
    /// Its counters.
    pub counters: Arc<Counters>,
    /// TLS client for `https://` backends.
    pub backend_tls: Option<BackendTlsClient>,
    /// True if a certificate is loaded (terminated HTTPS works).
    pub has_cert: bool,
}

/// A TCP or UDP forward at run time.
pub(crate) struct Forward {
    pub id: String,
    pub upstreams: Upstreams,
    pub counters: Arc<Counters>,
    pub proxy_protocol: bool,
}

/// State shared by every connection.
pub struct Shared {
    /// Host -> route.
    pub table: NameTable<Arc<Route>>,
    /// Limits.
    pub limits: Limits,
    /// Counters for traffic that matched no route.
    pub listener: Arc<Counters>,
    tls: Option<Arc<rustls::ServerConfig>>,
    routes: Vec<Arc<Route>>,
    forwards: Vec<Arc<Forward>>,
}

/// A running proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    conns: Arc<Semaphore>,
    http_addrs: Vec<SocketAddr>,
    https_addrs: Vec<SocketAddr>,
    tcp_addrs: Vec<SocketAddr>,
    udp_addrs: Vec<SocketAddr>,
}

fn build(settings: &ProxySettings) -> anyhow::Result<Shared> {
    let limits = settings.limits.clone();
    let mut table = NameTable::new();
    let mut resolver = SniResolver::default();
    let mut routes = Vec::new();
    for rs in &settings.routes {
        let id = rs.host.to_string();
        let hosts: Vec<DomainName> = match &rs.host {
            RouteHost::Name(l) => settings.domains.iter().filter_map(|d| l.under(d)).collect(),
            RouteHost::Fqdn(f) => vec![f.clone()],
        };
        let key = match &rs.cert {
            Some(files) => Some(Arc::new(
                tls::load_certified_key(files)
                    .map_err(|e| anyhow::anyhow!("[[route]] {id}: {e}"))?,
            )),
            None => None,
        };
        let backend_tls = if rs.backends.iter().any(crate::proxy::upstream::is_tls) {
            Some(
                BackendTlsClient::new(&rs.backend_tls)
                    .map_err(|e| anyhow::anyhow!("[[route]] {id}: {e}"))?,
            )
        } else {
            None
        };
        let route = Arc::new(Route {
            id: id.clone(),
            hosts: hosts.clone(),
            settings: rs.clone(),
            upstreams: Upstreams::new(&rs.backends, limits.backend_down_for),
            counters: Arc::new(Counters::default()),
            backend_tls,
            has_cert: key.is_some(),
        });
        for h in &hosts {
            if let Some(k) = &key {
                resolver.insert(h, k.clone());
            }
        }
        match &rs.host {
            RouteHost::Name(l) => {
                for d in &settings.domains {
                    table.insert_name(d.clone(), l.clone(), route.clone());
                }
            }
            RouteHost::Fqdn(f) => {
                table.insert_fqdn(f.clone(), route.clone());
            }
        }
        routes.push(route);
    }
    let tls = if routes.iter().any(|r| r.has_cert) {
        Some(Arc::new(
            tls::server_config(resolver).map_err(|e| anyhow::anyhow!("TLS setup: {e}"))?,
        ))
    } else {
        None
    };
    let mut forwards = Vec::new();
    for t in &settings.tcp {
        forwards.push(Arc::new(Forward {
            id: format!("tcp:{}", t.listen),
            upstreams: Upstreams::new(&t.backends, limits.backend_down_for),
            counters: Arc::new(Counters::default()),
            proxy_protocol: t.proxy_protocol,
        }));
    }
    for u in &settings.udp {
        forwards.push(Arc::new(Forward {
            id: format!("udp:{}", u.listen),
            upstreams: Upstreams::new(&u.backends, limits.backend_down_for),
            counters: Arc::new(Counters::default()),
            proxy_protocol: false,
        }));
    }
    Ok(Shared {
        table,
        limits,
        listener: Arc::new(Counters::default()),
        tls,
        routes,
        forwards,
    })
}

#[derive(Clone, Copy)]
enum Kind {
    Http,
    Https,
    Tcp(usize),
}

impl Proxy {
    /// Loads certificates, binds every listener and starts accepting. Settings are
    /// taken as validated (see [`crate::proxy::settings`]); backends are not
    /// re-checked here.
    pub async fn start(settings: ProxySettings) -> anyhow::Result<Proxy> {
        let shared = Arc::new(build(&settings)?);
        let (stop, stop_rx) = watch::channel(false);
        let conns = Arc::new(Semaphore::new(settings.limits.max_connections));
        let mut tasks = Vec::new();
        let bound = |addr: SocketAddr, what: &str| -> anyhow::Result<(TcpListener, SocketAddr)> {
            let l =
                bind_tcp(addr).with_context(|| format!("proxy: cannot listen on {what} {addr}"))?;
            let a = l.local_addr()?;
            Ok((l, a))
        };
        let mut listeners = Vec::new();
        let (mut http_addrs, mut https_addrs, mut tcp_addrs, mut udp_addrs) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for a in &settings.http_listen {
            let (l, a) = bound(*a, "http_listen")?;
            http_addrs.push(a);
            listeners.push((l, Kind::Http));
        }
        for a in &settings.https_listen {
            let (l, a) = bound(*a, "https_listen")?;
            https_addrs.push(a);
            listeners.push((l, Kind::Https));
        }
        for (i, t) in settings.tcp.iter().enumerate() {
            let (l, a) = bound(t.listen, "[[tcp]] listen")?;
            tcp_addrs.push(a);
            listeners.push((l, Kind::Tcp(i)));
        }
        let mut udp_socks = Vec::new();
        for u in &settings.udp {
            let s = bind_udp(u.listen)
                .with_context(|| format!("proxy: cannot listen on [[udp]] {}", u.listen))?;
            udp_addrs.push(s.local_addr()?);
            udp_socks.push((s, u.clone()));
        }
        for (l, kind) in listeners {
            let shared = shared.clone();
            let stop = stop_rx.clone();
            let conns = conns.clone();
            tasks.push(tokio::spawn(accept_loop(l, kind, shared, stop, conns)));
        }
        let ntcp = settings.tcp.len();
        for (i, (s, u)) in udp_socks.into_iter().enumerate() {
            if let Some(fwd) = shared.forwards.get(ntcp + i).cloned() {
                let stop = stop_rx.clone();
                let span = info_span!("udp", listen = %u.listen);
                tasks.push(tokio::spawn(
                    forward::udp_loop(Arc::new(s), fwd, u, stop).instrument(span),
                ));
            }
        }
        info!(
            routes = shared.routes.len(),
            http = ?http_addrs,
            https = ?https_addrs,
            tcp = ?tcp_addrs,
            udp = ?udp_addrs,
            "proxy listening"
        );
        Ok(Proxy {
            shared,
            stop,
            tasks,
            conns,
            http_addrs,
            https_addrs,
            tcp_addrs,
            udp_addrs,
        })
    }

    /// Bound HTTP listener addresses (useful with port 0).
    pub fn http_addrs(&self) -> &[SocketAddr] {
        &self.http_addrs
    }
    /// Bound HTTPS listener addresses.
    pub fn https_addrs(&self) -> &[SocketAddr] {
        &self.https_addrs
    }
    /// Bound TCP forward addresses, in `[[tcp]]` order.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp_addrs
    }
    /// Bound UDP forward addresses, in `[[udp]]` order.
    pub fn udp_addrs(&self) -> &[SocketAddr] {
        &self.udp_addrs
    }

    /// Per-route counters and backend health; the entry `listener` counts
    /// traffic that matched no route.
    pub fn stats(&self) -> Vec<RouteSnapshot> {
        let s = &self.shared;
        let mut v: Vec<RouteSnapshot> = s
            .routes
            .iter()
            .map(|r| {
                RouteSnapshot::new(
                    r.id.clone(),
                    r.hosts.iter().map(|h| h.to_string()).collect(),
                    &r.counters,
                    r.upstreams.health(),
                )
            })
            .collect();
        v.extend(s.forwards.iter().map(|f| {
            RouteSnapshot::new(f.id.clone(), Vec::new(), &f.counters, f.upstreams.health())
        }));
        v.push(RouteSnapshot::new(
            "listener".into(),
            Vec::new(),
            &s.listener,
            Vec::new(),
        ));
        v
    }

    /// Stops accepting, asks HTTP connections to finish, and waits up to `grace`
    /// for open connections to end.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        let max = self.shared.limits.max_connections;
        let _ = tokio::time::timeout(grace, async {
            while self.conns.available_permits() < max {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn accept_loop(
    l: TcpListener,
    kind: Kind,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    conns: Arc<Semaphore>,
) {
    let local = l.local_addr().ok();
    loop {
        let (sock, peer) = tokio::select! {
            r = l.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(listener = ?local, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            shared.listener.error(ErrorKind::OverCapacity);
            drop(sock);
            continue;
        };
        let _ = sock.set_nodelay(true);
        let shared = shared.clone();
        let stop = stop.clone();
        let span = info_span!("conn", client = %peer);
        let fut = async move {
            match kind {
                Kind::Http => {
                    let info = Arc::new(ConnInfo {
                        client: peer,
                        tls: false,
                        sni_route: None,
                    });
                    serve_http(shared, sock, info, false, stop).await;
                }
                Kind::Https => serve_tls(shared, sock, peer, stop).await,
                Kind::Tcp(i) => {
                    if let Some(fwd) = shared.forwards.get(i).cloned() {
                        serve_tcp(&shared, fwd, sock, peer).await;
                    }
                }
            }
            drop::<OwnedSemaphorePermit>(permit);
        };
        tokio::spawn(fut.instrument(span));
    }
}

async fn serve_http<IO>(
    shared: Arc<Shared>,
    io: IO,
    info: Arc<ConnInfo>,
    h2: bool,
    mut stop: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = shared.limits.clone();
    let svc = service_fn(move |req| handle(shared.clone(), info.clone(), req));
    let io = TokioIo::new(io);
    if h2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .serve_connection(io, svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => if let Err(e) = r { debug!(error = %e, "h2 connection ended") },
            _ = stop.changed() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    } else {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(limits.max_header_bytes.max(8192))
            .serve_connection(io, svc)
            .with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => if let Err(e) = r { debug!(error = %e, "http/1 connection ended") },
            _ = stop.changed() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }
}

fn upstream_error(c: &Counters, e: &UpstreamError) {
    c.error(match e {
        UpstreamError::NoHealthy => ErrorKind::NoHealthyBackend,
        UpstreamError::Refused(..) => ErrorKind::BackendRefused,
        UpstreamError::Timeout(_) => ErrorKind::BackendTimeout,
    });
}

/// Connects to a backend of `up`, sends the PROXY v2 header if asked, then `first`.
async fn open_backend(
    up: &Upstreams,
    c: &Counters,
    limits: &Limits,
    proxy_protocol: bool,
    client: SocketAddr,
    local: SocketAddr,
    first: &[u8],
) -> Option<TcpStream> {
    let (mut b, backend) = match up.connect(limits.connect_timeout).await {
        Ok(x) => x,
        Err(e) => {
            debug!(error = %e, "no backend connection");
            upstream_error(c, &e);
            return None;
        }
    };
    let mut head = Vec::with_capacity(first.len() + 52);
    if proxy_protocol {
        encode_v2(&mut head, Transport::Tcp, client, local);
    }
    head.extend_from_slice(first);
    if !head.is_empty() {
        if let Err(e) = b.write_all(&head).await {
            debug!(backend = %backend, error = %e, "backend write failed");
            c.error(ErrorKind::BackendRefused);
            return None;
        }
        c.add_in(first.len() as u64);
    }
    Some(b)
}

async fn serve_tcp(shared: &Shared, fwd: Arc<Forward>, sock: TcpStream, peer: SocketAddr) {
    let c = fwd.counters.clone();
    c.connection();
    let Ok(local) = sock.local_addr() else { return };
    let Some(b) = open_backend(
        &fwd.upstreams,
        &c,
        &shared.limits,
        fwd.proxy_protocol,
        peer,
        local,
        &[],
    )
    .await
    else {
        return;
    };
    let r = splice(sock, b, c, shared.limits.idle_timeout).await;
    debug!(forward = %fwd.id, result = ?r, "tcp forward ended");
}

async fn serve_tls(
    shared: Arc<Shared>,
    mut sock: TcpStream,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
) {
    let limits = shared.limits.clone();
    let (bytes, sni) = match tls::read_client_hello(&mut sock, limits.handshake_timeout).await {
        Hello::Ok { bytes, sni } => (bytes, sni),
        Hello::Bad(e) => {
            debug!(error = %e, "bad ClientHello");
            shared.listener.error(ErrorKind::BadClientHello);
            if e != crate::proxy::detect::SniError::NotTls {
                tls::send_alert(&mut sock, &tls::ALERT_DECODE_ERROR).await;
            }
            return;
        }
        Hello::Timeout => {
            shared.listener.error(ErrorKind::HandshakeTimeout);
            return;
        }
        Hello::Closed => return,
    };
    let route = sni.as_ref().and_then(|s| shared.table.lookup(s).cloned());
    let Some(route) = route.filter(|r| r.settings.tls == TlsMode::Passthrough || r.has_cert) else {
        debug!(sni = ?sni.as_ref().map(|s| s.as_str()), "unknown SNI");
        shared.listener.error(ErrorKind::UnknownSni);
        tls::send_alert(&mut sock, &tls::ALERT_UNRECOGNIZED_NAME).await;
        return;
    };
    let c = route.counters.clone();
    c.connection();
    match route.settings.tls {
        TlsMode::Passthrough => {
            let Ok(local) = sock.local_addr() else { return };
            let Some(b) = open_backend(
                &route.upstreams,
                &c,
                &limits,
                route.settings.proxy_protocol,
                peer,
                local,
                &bytes,
            )
            .await
            else {
                tls::send_alert(&mut sock, &tls::ALERT_INTERNAL_ERROR).await;
                return;
            };
            let r = splice(sock, b, c, limits.idle_timeout).await;
            debug!(route = %route.id, result = ?r, "passthrough ended");
        }
        TlsMode::Terminate => {
            let Some(cfg) = shared.tls.clone() else {
                return;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
            let io = Prefixed::new(bytes, sock);
            let tls =
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(io)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        debug!(error = %e, "TLS handshake failed");
                        c.error(ErrorKind::TlsHandshake);
                        return;
                    }
                    Err(_) => {
                        c.error(ErrorKind::HandshakeTimeout);
                        return;
                    }
                };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let info = Arc::new(ConnInfo {
                client: peer,
                tls: true,
                sni_route: Some(route),
            });
            serve_http(shared, tls, info, h2, stop).await;
        }
    }
}
