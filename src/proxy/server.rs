//! The proxy runtime: binds the listeners, routes connections, owns the tasks.
//!
//! [`Proxy::start`] takes validated [`ProxySettings`]; [`Proxy::reload`] swaps in
//! new settings without dropping open connections: routes, certificates and
//! forwards are rebuilt (counters and backend health of unchanged routes carry
//! over), listeners are diffed (new ones bound, removed ones closed), and HTTP
//! connections of the old generation finish their request in flight and close.
//! Both come in two steps for a caller that has more to change at once (the
//! hub's config reload): [`Proxy::prepare`] and [`Proxy::prepare_reload`] do
//! everything that can fail, without effect on what runs, and
//! [`PreparedProxy::start`] and [`PreparedReload::commit`] cannot fail.
//! [`Proxy::shutdown`] stops accepting, drains, and cuts the connections still
//! open at the end of its grace period; dropping the [`Proxy`] stops accepting
//! at once. Either stops the ACME manager.

use crate::proxy::access::Access;
use crate::proxy::access_log::{AccessLog, Entry, Kind as LogKind};
use crate::proxy::acme::AcmeState;
use crate::proxy::basic_auth::BasicAuth;
use crate::proxy::forward;
use crate::proxy::http::{handle, ConnInfo, Streams, TrackedBody};
use crate::proxy::io::{bind_tcp, bind_udp, splice, Prefixed, Throttle};
use crate::proxy::names::{DomainName, NameTable};
use crate::proxy::proxy_protocol::{encode_v1, encode_v2, Transport};
use crate::proxy::ratelimit::{Limiter, RateLimit};
use crate::proxy::settings::{
    Limits, ProxyProtocol, ProxySettings, RouteHost, RouteSettings, TcpTls, TlsMode,
    UdpForwardSettings,
};
use crate::proxy::stall::{SendQueue, StreamExec, WatchedIo};
use crate::proxy::stats::{CertStatus, Counters, ErrorKind, RouteSnapshot};
use crate::proxy::tls::{self, Hello, SniResolver};
use crate::proxy::upstream::{BackendTlsClient, Lease, TunnelLiveness, UpstreamError, Upstreams};
use anyhow::Context as _;
use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
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
    pub upstreams: Arc<Upstreams>,
    /// Its counters.
    pub counters: Arc<Counters>,
    /// TLS client for `https://` backends.
    pub backend_tls: Option<Arc<BackendTlsClient>>,
    /// True if a certificate is loaded (terminated HTTPS works).
    pub has_cert: bool,
    /// Per-client rate limit, if set.
    pub limiter: Option<Arc<Mutex<Limiter>>>,
    /// The route's `bandwidth` (a rate of 0 when it has none).
    pub bandwidth: Arc<Throttle>,
    /// Users of `basic_auth_file`, if set.
    pub auth: Option<Arc<BasicAuth>>,
    /// The `forward_auth` service, if set.
    pub forward_auth: Option<Arc<crate::proxy::forward_auth::ForwardAuth>>,
    /// Path prefixes with backends of their own (`settings.paths`, in order).
    pub paths: Vec<PathUpstreams>,
}

/// The backends of one path prefix of a route at run time.
pub struct PathUpstreams {
    pub prefix: crate::proxy::paths::PathPrefix,
    pub strip_prefix: bool,
    pub upstreams: Arc<Upstreams>,
}

impl Route {
    /// The backends for a request to `path` and the prefix to strip from it:
    /// the longest matching prefix's, or the route's own.
    pub fn backends_for(&self, path: &str) -> (&Arc<Upstreams>, Option<&PathUpstreams>) {
        if self.paths.is_empty() {
            return (&self.upstreams, None);
        }
        match crate::proxy::paths::longest_match(self.paths.iter().map(|p| &p.prefix), path)
            .and_then(|i| self.paths.get(i))
        {
            Some(p) => (&p.upstreams, Some(p)),
            None => (&self.upstreams, None),
        }
    }

    /// Every backend set of the route: its own, then its paths'.
    pub fn all_upstreams(&self) -> impl Iterator<Item = &Arc<Upstreams>> + '_ {
        std::iter::once(&self.upstreams).chain(self.paths.iter().map(|p| &p.upstreams))
    }
}

/// A TCP or UDP forward at run time.
pub(crate) struct Forward {
    pub id: String,
    /// The configured listen address (the key across reloads).
    pub listen: SocketAddr,
    pub upstreams: Arc<Upstreams>,
    pub counters: Arc<Counters>,
    pub proxy_protocol: ProxyProtocol,
    /// UDP settings; `None` for TCP.
    pub udp: Option<UdpForwardSettings>,
    /// TCP with `cert`/`key`: TLS is terminated here.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Which clients may connect or send.
    pub access: Access,
    /// Per-client connection rate limit, if set.
    pub limiter: Option<Arc<Mutex<Limiter>>>,
    /// The forward's `bandwidth` (a rate of 0 when it has none).
    pub bandwidth: Arc<Throttle>,
    /// The access log (UDP flows write their own lines).
    pub access_log: Option<Arc<AccessLog>>,
}

/// The limiter for `limit`: the old one (its buckets) while the limit stays.
fn limiter_for(
    old: Option<&Arc<Mutex<Limiter>>>,
    limit: Option<RateLimit>,
) -> Option<Arc<Mutex<Limiter>>> {
    let limit = limit?;
    match old {
        Some(l) if l.lock().limit() == limit => Some(l.clone()),
        _ => Some(Arc::new(Mutex::new(Limiter::new(limit)))),
    }
}

/// Milliseconds on the proxy's monotonic clock (for the rate limiters).
fn now_ms() -> u64 {
    crate::proxy::io::mono_ns() / 1_000_000
}

/// A route's or forward's rate-limit client: an IPv4 address, or an IPv6 /56
/// (as `max_connections_per_source` counts one: spreading over the
/// subscriber's 256 /64s gets no more).
use crate::per_source::subscriber_key;

/// Takes a token of `limiter` for `ip`: `None` if within the limit, else the
/// milliseconds until the client's next token.
pub(crate) fn over_limit(
    limiter: &Option<Arc<Mutex<Limiter>>>,
    ip: std::net::IpAddr,
) -> Option<u64> {
    let l = limiter.as_ref()?;
    let r = l.lock().check(subscriber_key(ip), now_ms());
    r.err()
}

/// Whether `ip` has no token of `limiter` left (its next request would be
/// refused), taking none.
pub(crate) fn limited(limiter: &Option<Arc<Mutex<Limiter>>>, ip: std::net::IpAddr) -> bool {
    limiter
        .as_ref()
        .is_some_and(|l| l.lock().is_limited(subscriber_key(ip), now_ms()))
}

/// One generation of routing state, shared by every connection accepted under it.
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
    /// Set when a reload or shutdown replaces this generation: its HTTP
    /// connections finish the request in flight and close.
    retired: watch::Sender<bool>,
    /// ACME challenges and certificates (shared by every generation).
    pub acme: Arc<AcmeState>,
    /// The access log, if configured (kept across reloads while its path stays).
    pub access_log: Option<Arc<AccessLog>>,
    /// Load balancers whose connections start with a PROXY header.
    proxy_protocol_from: Option<Access>,
    /// Clients whose forwarding headers are kept (`[proxy] trusted_proxies`).
    trusted_proxies: Option<Access>,
    /// Nodes' tunnels carried over TLS (ALPN [`crate::carrier::ALPN`]).
    pub(crate) carrier: Option<Arc<crate::carrier::Hub>>,
    /// The certificates from files this generation serves.
    file_certs: Vec<CertStatus>,
}

impl Shared {
    /// Whether `client` is a trusted proxy whose forwarding headers are kept.
    pub(crate) fn trusts_forwarding(&self, client: std::net::IpAddr) -> bool {
        self.trusted_proxies
            .as_ref()
            .is_some_and(|a| a.permits(client))
    }
}

/// The access-log entry of one connection or request; written when dropped,
/// so every way out of a handler logs it.
pub(crate) struct Record {
    log: Arc<AccessLog>,
    entry: Option<Entry>,
    start: std::time::Instant,
}

impl Record {
    /// A record if `shared` logs, else `None`.
    pub(crate) fn start(
        shared: &Shared,
        client: SocketAddr,
        kind: LogKind,
        tls: bool,
    ) -> Option<Record> {
        let log = shared.access_log.clone()?;
        Some(Record {
            log,
            entry: Some(Entry::new(crate::clock::unix_ms(), client, kind, tls)),
            start: std::time::Instant::now(),
        })
    }

    /// Changes the entry.
    pub(crate) fn note(rec: &mut Option<Record>, f: impl FnOnce(&mut Entry)) {
        if let Some(e) = rec.as_mut().and_then(|r| r.entry.as_mut()) {
            f(e);
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if let Some(mut e) = self.entry.take() {
            e.duration_ms = (self.start.elapsed().as_micros() as f64) / 1000.0;
            self.log.log(e);
        }
    }
}

/// Which listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Http,
    Https,
    Tcp,
    Udp,
    /// `[proxy.dns] listen` and `[proxy.acme] dns_listen`, UDP.
    DnsUdp,
    /// `[proxy.dns] listen` and `[proxy.acme] dns_listen`, TCP.
    DnsTcp,
}

/// A listener's identity across reloads: its kind, configured address, and
/// rank among listeners of that kind and address (only port-0 tests have more
/// than one).
type Key = (Kind, SocketAddr, usize);

struct Listening {
    kind: Kind,
    conf: SocketAddr,
    nth: usize,
    bound: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

struct Runtime {
    acme: Arc<AcmeState>,
    /// Counters of the DNS listeners.
    dns: Arc<Counters>,
    /// The gateway zones the DNS listeners answer whole (`[proxy.dns]`).
    zone: arc_swap::ArcSwapOption<crate::proxy::dns::ZoneData>,
    /// The UDP rate of all DNS listeners (`[proxy.dns] rate_limit`).
    dns_limiter: arc_swap::ArcSwapOption<Mutex<Limiter>>,
    current: ArcSwap<Shared>,
    conns: Arc<ConnCount>,
    /// Open client connections per source address (IPv6: per /64).
    per_source: Arc<crate::per_source::PerSource>,
    tunnels: Option<Arc<dyn TunnelLiveness>>,
    listeners: Mutex<Vec<Listening>>,
    /// Held from a reload's build to its commit: the generation it was
    /// built from stays the running one.
    reload_lock: Arc<tokio::sync::Mutex<()>>,
    /// The hub mesh, when `[mesh]` is on: hosts other hubs serve.
    mesh: arc_swap::ArcSwapOption<crate::mesh::Mesh>,
}

impl Runtime {
    /// Whether a connection for `host` (lowercase, no trailing dot) would
    /// be served (a route of this hub's, or one another hub of the mesh
    /// serves), and if so the public addresses of the mesh's other hubs
    /// that answer the gateway zones.
    fn served(&self, host: &str) -> Option<Vec<std::net::IpAddr>> {
        let host = DomainName::parse(host).ok()?;
        let mesh = self.mesh.load();
        let mesh = mesh.as_ref();
        let ours = self.current.load().table.lookup(&host).is_some();
        if !ours && !mesh.is_some_and(|m| m.serves(&host)) {
            return None;
        }
        Some(mesh.map(|m| m.dns_addrs()).unwrap_or_default())
    }

    /// Whether another hub of the mesh serves a name strictly below `name`
    /// (this hub's own routes are one label under a gateway domain, and its
    /// fqdn routes lie outside them).
    fn served_below(&self, name: &str) -> bool {
        self.mesh
            .load()
            .as_ref()
            .is_some_and(|m| m.serves_below(name))
    }

    /// What the DNS listeners answer for `qname`: the gateway zones whole
    /// with `[proxy.dns]`, else the ACME challenge names alone.
    fn dns_lookup(&self, qname: &str) -> crate::proxy::dns::Lookup {
        match self.zone.load().as_ref() {
            Some(zone) => crate::proxy::dns::zone_lookup(
                qname,
                zone,
                |h| self.served(h),
                |n| self.served_below(n),
                |d| self.acme.challenge_values(d),
            ),
            None => self.acme.dns_lookup(qname),
        }
    }

    fn stats(&self) -> Vec<RouteSnapshot> {
        let mut v = snapshot(&self.current.load());
        if self.listeners.lock().iter().any(|l| l.kind == Kind::DnsUdp) {
            v.push(RouteSnapshot::new(
                "dns".into(),
                Vec::new(),
                &self.dns,
                Vec::new(),
            ));
        }
        if let Some(m) = self.mesh.load().as_ref() {
            v.push(RouteSnapshot::new(
                "mesh".into(),
                Vec::new(),
                &m.counters,
                Vec::new(),
            ));
        }
        v
    }
}

/// Why a forward could not listen on `port` (UDP or TCP) on all
/// addresses: another program holds it, or the hub may not bind it. `None`
/// when it could. Tried with a bind that is let go at once.
pub fn try_port(udp: bool, port: u16) -> Option<String> {
    let addr = SocketAddr::from(([0, 0, 0, 0], port));
    crate::proxy::io::try_bind(addr, udp)
        .err()
        .map(|e| e.to_string())
}

/// A running proxy.
pub struct Proxy {
    rt: Arc<Runtime>,
}

/// A cheap handle that reads a running proxy's counters.
#[derive(Clone)]
pub struct StatsHandle(Arc<Runtime>);

impl StatsHandle {
    /// Same as [`Proxy::stats`].
    pub fn stats(&self) -> Vec<RouteSnapshot> {
        self.0.stats()
    }

    /// Entries the access log lost (queue full, write failed); `None`
    /// without `[proxy] access_log`.
    pub fn access_log_dropped(&self) -> Option<u64> {
        self.0
            .current
            .load()
            .access_log
            .as_ref()
            .map(|l| l.dropped())
    }

    /// Every certificate the proxy serves or keeps: from files, and from
    /// ACME (with its renewal time and a failing order's error).
    pub fn certificates(&self) -> Vec<CertStatus> {
        let mut v = self.0.current.load().file_certs.clone();
        v.extend(self.0.acme.status());
        v
    }

    /// The public addresses the hub names in its gateway zones
    /// (`[proxy.dns] addresses`), published to the mesh; none without
    /// `[proxy.dns]`.
    pub fn dns_addrs(&self) -> Vec<std::net::IpAddr> {
        self.0
            .zone
            .load()
            .as_ref()
            .map(|z| z.addrs.clone())
            .unwrap_or_default()
    }

    /// Why this proxy could not listen on `port` (UDP or TCP) for a forward
    /// on all addresses: another program holds it, or the hub may not bind
    /// it. `None` when it could, or already does (a forward of its own).
    /// Tried with a bind that is let go at once.
    pub fn port_busy(&self, udp: bool, port: u16) -> Option<String> {
        let kind = if udp { Kind::Udp } else { Kind::Tcp };
        let ours = self
            .0
            .listeners
            .lock()
            .iter()
            .any(|l| l.kind == kind && l.conf.port() == port);
        if ours {
            return None;
        }
        try_port(udp, port)
    }

    /// What the mesh publishes: the hosts of every route, and the bound
    /// addresses of the plain HTTP and of the TLS listeners.
    pub fn mesh_local(&self) -> (Vec<String>, Vec<SocketAddr>, Vec<SocketAddr>) {
        let cur = self.0.current.load();
        let hosts = cur
            .routes
            .iter()
            .flat_map(|r| r.hosts.iter().map(|h| h.as_str().to_string()))
            .collect();
        let ls = self.0.listeners.lock();
        let bound = |k: Kind| ls.iter().filter(|l| l.kind == k).map(|l| l.bound).collect();
        (hosts, bound(Kind::Http), bound(Kind::Https))
    }
}

/// What a reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Routes and forwards that appeared.
    pub added: Vec<String>,
    /// Routes and forwards that went away.
    pub removed: Vec<String>,
    /// Routes and forwards whose settings changed.
    pub changed: Vec<String>,
    /// Listeners bound.
    pub listeners_added: Vec<String>,
    /// Listeners closed.
    pub listeners_removed: Vec<String>,
}

impl ReloadReport {
    /// True if nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.listeners_added.is_empty()
            && self.listeners_removed.is_empty()
    }
}

fn backend_tls_for(id: &str, rs: &RouteSettings) -> anyhow::Result<Option<Arc<BackendTlsClient>>> {
    if rs
        .backends
        .iter()
        .chain(rs.paths.iter().flat_map(|p| &p.backends))
        .any(crate::proxy::upstream::is_tls)
    {
        Ok(Some(Arc::new(
            BackendTlsClient::new(&rs.backend_tls, rs.backend_protocol)
                .map_err(|e| anyhow::anyhow!("[[route]] {id}: {e}"))?,
        )))
    } else {
        Ok(None)
    }
}

/// Builds a generation. Counters (by id) and upstreams (by id, when backends
/// and balancing are unchanged) are taken over from `prev`, which serves on
/// unchanged: what a reload changes of them (a kept throttle's staged rate,
/// kept upstreams' `backend_down_for`, a kept access log's reopening) takes
/// effect when it is committed ([`PreparedReload::commit`]). New backend sets
/// start their health checks here; those end with them, if the build is
/// dropped.
fn build(
    settings: &ProxySettings,
    prev: Option<&Shared>,
    tunnels: &Option<Arc<dyn TunnelLiveness>>,
    acme: &Arc<AcmeState>,
) -> anyhow::Result<Shared> {
    let limits = settings.limits.clone();
    let mut table = NameTable::new();
    let mut resolver = SniResolver::default().with_acme(acme.clone());
    let mut file_certs = Vec::new();
    let mut routes = Vec::new();
    let old_routes: HashMap<&str, &Arc<Route>> = prev
        .map(|p| p.routes.iter().map(|r| (r.id.as_str(), r)).collect())
        .unwrap_or_default();
    let old_fwds: HashMap<&str, &Arc<Forward>> = prev
        .map(|p| p.forwards.iter().map(|f| (f.id.as_str(), f)).collect())
        .unwrap_or_default();
    let reuse = |old: Option<&Arc<Upstreams>>,
                 backends: &[crate::proxy::settings::Backend],
                 bal: &crate::proxy::settings::Balance,
                 proto: crate::proxy::settings::BackendProtocol|
     -> Option<Arc<Upstreams>> {
        old.filter(|u| u.backends() == backends && u.balance() == bal && u.protocol() == proto)
            .cloned()
    };
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
        let backend_tls = backend_tls_for(&id, rs)?;
        let auth = match &rs.basic_auth_file {
            Some(path) => {
                let users = crate::proxy::basic_auth::load(path)
                    .map_err(|e| anyhow::anyhow!("[[route]] {id}: {e}"))?;
                Some(Arc::new(BasicAuth::new(users)))
            }
            None => None,
        };
        let old = old_routes.get(id.as_str());
        // Health checks keep the TLS client they started with: new backend
        // sets when the backend TLS settings change.
        let same_tls = old.filter(|r| r.settings.backend_tls == rs.backend_tls);
        let upstreams = match reuse(
            same_tls.map(|r| &r.upstreams),
            &rs.backends,
            &rs.balance,
            rs.backend_protocol,
        ) {
            Some(u) => u,
            None => {
                let u = Arc::new(
                    Upstreams::new(&rs.backends, &rs.balance, &limits, tunnels.clone())
                        .speaking(rs.backend_protocol)
                        .inheriting(old.map(|r| &*r.upstreams)),
                );
                u.spawn_checks(backend_tls.clone(), id.clone());
                u
            }
        };
        let mut paths = Vec::with_capacity(rs.paths.len());
        for p in &rs.paths {
            // Kept only while it still shares the route's connection limit.
            let old_up = same_tls
                .and_then(|r| r.paths.iter().find(|o| o.prefix == p.prefix))
                .map(|o| &o.upstreams)
                .filter(|u| u.shares_limit(&upstreams));
            let path_up = match reuse(old_up, &p.backends, &p.balance, rs.backend_protocol) {
                Some(u) => u,
                None => {
                    let before = old
                        .and_then(|r| r.paths.iter().find(|o| o.prefix == p.prefix))
                        .map(|o| &*o.upstreams);
                    let u = Arc::new(
                        Upstreams::new(&p.backends, &p.balance, &limits, tunnels.clone())
                            .speaking(rs.backend_protocol)
                            .inheriting(before)
                            .sharing_limit(&upstreams),
                    );
                    u.spawn_checks(backend_tls.clone(), format!("{id} path {}", p.prefix));
                    u
                }
            };
            paths.push(PathUpstreams {
                prefix: p.prefix.clone(),
                strip_prefix: p.strip_prefix,
                upstreams: path_up,
            });
        }
        let route = Arc::new(Route {
            id: id.clone(),
            hosts: hosts.clone(),
            settings: rs.clone(),
            upstreams,
            counters: old.map(|r| r.counters.clone()).unwrap_or_default(),
            backend_tls,
            has_cert: key.is_some() || rs.acme,
            limiter: limiter_for(old.and_then(|r| r.limiter.as_ref()), rs.rate_limit),
            bandwidth: Throttle::keep_or_new(old.map(|r| &r.bandwidth), rs.bandwidth),
            auth,
            forward_auth: rs.forward_auth.as_ref().map(|(url, copy)| {
                Arc::new(crate::proxy::forward_auth::ForwardAuth::new(
                    url.clone(),
                    copy.clone(),
                ))
            }),
            paths,
        });
        for h in &hosts {
            if let Some(k) = &key {
                resolver.insert(h, k.clone());
                file_certs.push(file_cert(h.as_str(), k));
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
    let access_log = match &settings.access_log {
        None => None,
        Some(path) => match prev
            .and_then(|p| p.access_log.as_ref())
            .filter(|l| l.path() == path.as_path())
        {
            // Reopened when the reload is committed.
            Some(l) => Some(l.clone()),
            None => Some(Arc::new(AccessLog::open(path).map_err(|e| {
                anyhow::anyhow!("[proxy] access_log {}: {e}", path.display())
            })?)),
        },
    };
    let mut forwards = Vec::new();
    let mut fwd = |id: String,
                   listen: SocketAddr,
                   backends: &[crate::proxy::settings::Backend],
                   bal: &crate::proxy::settings::Balance,
                   pp: ProxyProtocol,
                   udp: Option<UdpForwardSettings>,
                   tls: Option<tokio_rustls::TlsAcceptor>,
                   access: &Access,
                   rate: Option<RateLimit>,
                   bandwidth: Option<u64>| {
        let old = old_fwds.get(id.as_str());
        let upstreams = match reuse(
            old.map(|f| &f.upstreams),
            backends,
            bal,
            crate::proxy::settings::BackendProtocol::Http1,
        ) {
            Some(u) => u,
            None => {
                let u = Arc::new(
                    Upstreams::new(backends, bal, &limits, tunnels.clone())
                        .inheriting(old.map(|f| &*f.upstreams)),
                );
                u.spawn_checks(None, id.clone());
                u
            }
        };
        forwards.push(Arc::new(Forward {
            counters: old.map(|f| f.counters.clone()).unwrap_or_default(),
            id,
            listen,
            upstreams,
            proxy_protocol: pp,
            udp,
            tls,
            access: access.clone(),
            limiter: limiter_for(old.and_then(|f| f.limiter.as_ref()), rate),
            bandwidth: Throttle::keep_or_new(old.map(|f| &f.bandwidth), bandwidth),
            access_log: access_log.clone(),
        }));
    };
    for t in &settings.tcp {
        let id = format!("tcp:{}", t.listen);
        let config = match &t.tls {
            Some(TcpTls::Files(files)) => Some(tls::load_certified_key(files).and_then(|k| {
                let status = file_cert(&id, &k);
                let c = tls::single_cert_config(Arc::new(k))?;
                file_certs.push(status);
                Ok(c)
            })),
            Some(TcpTls::Acme(name)) => Some(tls::acme_cert_config(acme.clone(), name)),
            None => None,
        };
        let tls = match config {
            Some(c) => {
                let c = c.map_err(|e| anyhow::anyhow!("[[tcp]] {}: {e}", t.listen))?;
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(c)))
            }
            None => None,
        };
        fwd(
            id,
            t.listen,
            &t.backends,
            &t.balance,
            t.proxy_protocol,
            None,
            tls,
            &t.access,
            t.rate_limit,
            t.bandwidth,
        );
    }
    for u in &settings.udp {
        fwd(
            format!("udp:{}", u.listen),
            u.listen,
            &u.backends,
            &u.balance,
            u.proxy_protocol,
            Some(u.clone()),
            None,
            &u.access,
            u.rate_limit,
            u.bandwidth,
        );
    }
    Ok(Shared {
        access_log,
        proxy_protocol_from: settings.proxy_protocol_from.clone(),
        trusted_proxies: settings.trusted_proxies.clone(),
        table,
        limits: limits.clone(),
        listener: prev.map(|p| p.listener.clone()).unwrap_or_default(),
        tls,
        routes,
        forwards,
        retired: watch::channel(false).0,
        acme: acme.clone(),
        carrier: tunnels.as_ref().and_then(|t| t.carrier()),
        file_certs,
    })
}

/// The status of a certificate from files, served for `host`.
fn file_cert(host: &str, key: &rustls::sign::CertifiedKey) -> CertStatus {
    CertStatus {
        host: host.to_string(),
        source: "file",
        not_after: key
            .cert
            .first()
            .and_then(|c| crate::proxy::acme::cert_not_after(c)),
        renew_at: None,
        error: None,
        retry_at: None,
        superseded: false,
    }
}

/// Host names whose certificates ACME should keep (with `wildcard`, one
/// `*.<domain>` for the names under each gateway domain).
pub(crate) fn acme_hosts(settings: &ProxySettings) -> Vec<String> {
    let wildcard = settings.acme.as_ref().is_some_and(|a| a.wildcard);
    // A name one label under a gateway domain, and that domain.
    let gateway_domain = |h: &str| {
        let (_, parent) = h.split_once('.')?;
        settings.domains.iter().find(|d| d.as_str() == parent)
    };
    let mut v = Vec::new();
    let mut push = |h: String| match gateway_domain(&h).filter(|_| wildcard) {
        Some(d) => v.push(format!("*.{}", d.as_str())),
        None => v.push(h),
    };
    for r in settings.routes.iter().filter(|r| r.acme) {
        match &r.host {
            RouteHost::Name(l) => settings
                .domains
                .iter()
                .filter_map(|d| l.under(d))
                .for_each(|h| push(h.to_string())),
            RouteHost::Fqdn(f) => push(f.to_string()),
        }
    }
    for t in &settings.tcp {
        if let Some(TcpTls::Acme(name)) = &t.tls {
            push(name.to_string());
        }
    }
    v.sort_unstable();
    v.dedup();
    v
}

/// The UDP rate of the DNS listeners (a default one unless turned off).
fn dns_rate(settings: &ProxySettings) -> Option<RateLimit> {
    crate::proxy::settings::DnsSettings::rate(settings)
}

/// The gateway zones the DNS listeners answer whole (`[proxy.dns]`).
fn zone_data(settings: &ProxySettings) -> Option<crate::proxy::dns::ZoneData> {
    let dns = settings.dns.as_ref()?;
    let names = |v: &[DomainName]| v.iter().map(|d| d.as_str().to_string()).collect();
    Some(crate::proxy::dns::ZoneData {
        domains: names(&settings.domains),
        addrs: dns.addresses.clone(),
        ns: dns
            .nameservers
            .iter()
            .map(|(n, a)| (n.as_str().to_string(), a.clone()))
            .collect(),
        ttl: dns.ttl,
        // TLS forwards' names (clients and ACME validations must reach this
        // hub: other hubs do not forward raw TCP).
        local: settings
            .tcp
            .iter()
            .filter_map(|t| match &t.tls {
                Some(TcpTls::Acme(name)) => Some(name.as_str().to_string()),
                _ => None,
            })
            .collect(),
    })
}

/// The gateway domains whose `_acme-challenge` name the DNS listeners answer.
fn dns_zones(settings: &ProxySettings) -> Vec<String> {
    match &settings.acme {
        Some(a) if a.wildcard => settings
            .domains
            .iter()
            .map(|d| d.as_str().to_string())
            .collect(),
        _ => Vec::new(),
    }
}

fn wanted(settings: &ProxySettings) -> Vec<Key> {
    let mut v: Vec<(Kind, SocketAddr)> = Vec::new();
    v.extend(settings.http_listen.iter().map(|a| (Kind::Http, *a)));
    v.extend(settings.https_listen.iter().map(|a| (Kind::Https, *a)));
    v.extend(settings.tcp.iter().map(|t| (Kind::Tcp, t.listen)));
    v.extend(settings.udp.iter().map(|u| (Kind::Udp, u.listen)));
    for a in crate::proxy::settings::DnsSettings::listeners(settings) {
        v.push((Kind::DnsUdp, a));
        v.push((Kind::DnsTcp, a));
    }
    let mut out: Vec<Key> = Vec::new();
    for (k, a) in v {
        let nth = out
            .iter()
            .filter(|(k2, a2, _)| *k2 == k && *a2 == a)
            .count();
        out.push((k, a, nth));
    }
    out
}

fn what(kind: Kind) -> &'static str {
    match kind {
        Kind::Http => "http_listen",
        Kind::Https => "https_listen",
        Kind::Tcp => "[[tcp]] listen",
        Kind::Udp => "[[udp]] listen",
        Kind::DnsUdp => "DNS listener (UDP)",
        Kind::DnsTcp => "DNS listener (TCP)",
    }
}

enum Bound {
    Tcp(TcpListener),
    Udp(crate::proxy::io::UdpListener),
}

fn bind(kind: Kind, addr: SocketAddr) -> anyhow::Result<(Bound, SocketAddr)> {
    let ctx = || format!("proxy: cannot listen on {} {addr}", what(kind));
    if matches!(kind, Kind::Udp | Kind::DnsUdp) {
        let s = bind_udp(addr)
            .and_then(crate::proxy::io::UdpListener::new)
            .with_context(ctx)?;
        let a = s.local_addr()?;
        Ok((Bound::Udp(s), a))
    } else {
        let l = bind_tcp(addr).with_context(ctx)?;
        let a = l.local_addr()?;
        Ok((Bound::Tcp(l), a))
    }
}

/// What the DNS listeners answer (through a `Weak`: a listener's task must
/// not keep the runtime alive).
fn dns_lookup(rt: &Arc<Runtime>) -> crate::proxy::dns_server::DnsLookup {
    let weak = Arc::downgrade(rt);
    Arc::new(move |q| {
        weak.upgrade()
            .map_or(crate::proxy::dns::Lookup::Outside, |rt| rt.dns_lookup(q))
    })
}

/// The UDP rate of the DNS listeners ([`dns_rate`]): every other refusal
/// of a client slips (a truncated reply), the others drop.
fn dns_limit(rt: &Arc<Runtime>) -> crate::proxy::dns_server::DnsLimit {
    use crate::proxy::dns_server::Rate;
    let weak = Arc::downgrade(rt);
    Arc::new(move |ip| {
        let Some(limiter) = weak.upgrade().and_then(|rt| rt.dns_limiter.load_full()) else {
            return Rate::Within;
        };
        let mut l = limiter.lock();
        match l.check(ip, now_ms()) {
            Ok(()) => Rate::Within,
            Err(_) if l.refusals_odd(ip) => Rate::Slip,
            Err(_) => Rate::Drop,
        }
    })
}

fn spawn_listener(rt: &Arc<Runtime>, key: Key, b: Bound, bound: SocketAddr) -> Listening {
    let (kind, conf, nth) = key;
    let (stop, stop_rx) = watch::channel(false);
    let task = match b {
        Bound::Tcp(l) if kind == Kind::DnsTcp => tokio::spawn(
            crate::proxy::dns_server::tcp_loop(l, dns_lookup(rt), rt.dns.clone(), stop_rx)
                .instrument(info_span!("dns", listen = %conf)),
        ),
        Bound::Udp(s) if kind == Kind::DnsUdp => tokio::spawn(
            crate::proxy::dns_server::udp_loop(
                Arc::new(s),
                dns_lookup(rt),
                dns_limit(rt),
                rt.dns.clone(),
                stop_rx,
            )
            .instrument(info_span!("dns", listen = %conf)),
        ),
        Bound::Tcp(l) => tokio::spawn(accept_loop(l, key, rt.clone(), stop_rx)),
        Bound::Udp(s) => {
            let rt2 = rt.clone();
            let lookup: forward::Lookup = Arc::new(move || {
                rt2.current
                    .load()
                    .forwards
                    .iter()
                    .filter(|f| f.udp.is_some() && f.listen == conf)
                    .nth(nth)
                    .cloned()
            });
            let span = info_span!("udp", listen = %conf);
            tokio::spawn(forward::udp_loop(Arc::new(s), lookup, stop_rx).instrument(span))
        }
    };
    Listening {
        kind,
        conf,
        nth,
        bound,
        stop,
        task,
    }
}

fn snapshot(s: &Shared) -> Vec<RouteSnapshot> {
    let mut v: Vec<RouteSnapshot> = s
        .routes
        .iter()
        .map(|r| {
            let mut health = r.upstreams.health();
            for p in &r.paths {
                health.extend(p.upstreams.health().into_iter().map(|mut h| {
                    h.path = Some(p.prefix.to_string());
                    h
                }));
            }
            RouteSnapshot::new(
                r.id.clone(),
                r.hosts.iter().map(|h| h.to_string()).collect(),
                &r.counters,
                health,
            )
            .with_bandwidth(&r.bandwidth)
        })
        .collect();
    v.extend(s.forwards.iter().map(|f| {
        RouteSnapshot::new(f.id.clone(), Vec::new(), &f.counters, f.upstreams.health())
            .with_bandwidth(&f.bandwidth)
    }));
    v.push(RouteSnapshot::new(
        "listener".into(),
        Vec::new(),
        &s.listener,
        Vec::new(),
    ));
    v
}

impl Proxy {
    /// Loads certificates, binds every listener and starts accepting. Settings are
    /// taken as validated (see [`crate::proxy::settings`]); backends are not
    /// re-checked here.
    pub async fn start(settings: ProxySettings) -> anyhow::Result<Proxy> {
        Self::start_with(settings, None).await
    }

    /// Like [`Proxy::start`]; backends inside a node's allowed IPs count as down
    /// while `tunnels` says that node's tunnel is down.
    pub async fn start_with(
        settings: ProxySettings,
        tunnels: Option<Arc<dyn TunnelLiveness>>,
    ) -> anyhow::Result<Proxy> {
        Self::start_meshed(settings, tunnels, None).await
    }

    /// Like [`Proxy::start_with`], in `mesh`: connections for hosts other hubs
    /// serve go there, and ACME orders are coordinated with those hubs from
    /// the start.
    pub async fn start_meshed(
        settings: ProxySettings,
        tunnels: Option<Arc<dyn TunnelLiveness>>,
        mesh: Option<Arc<crate::mesh::Mesh>>,
    ) -> anyhow::Result<Proxy> {
        Ok(Self::prepare(settings, tunnels, mesh).await?.start())
    }

    /// What can fail of [`Proxy::start_meshed`]: loads certificates and
    /// the other files the settings name, opens the access log and binds
    /// every listener. Nothing accepts (connections wait in the listen
    /// queues), and no ACME order runs nor is the mesh told of this proxy,
    /// until [`PreparedProxy::start`]; dropping it closes the sockets.
    pub async fn prepare(
        settings: ProxySettings,
        tunnels: Option<Arc<dyn TunnelLiveness>>,
        mesh: Option<Arc<crate::mesh::Mesh>>,
    ) -> anyhow::Result<PreparedProxy> {
        let acme = Arc::new(AcmeState::default());
        let shared = build(&settings, None, &tunnels, &acme)?;
        let mut bound = Vec::new();
        for key in wanted(&settings) {
            let (b, a) = bind(key.0, key.1)?;
            bound.push((key, b, a));
        }
        Ok(PreparedProxy {
            settings,
            tunnels,
            mesh,
            acme,
            shared,
            bound,
        })
    }
}

/// A proxy ready to start ([`Proxy::prepare`]).
pub struct PreparedProxy {
    settings: ProxySettings,
    tunnels: Option<Arc<dyn TunnelLiveness>>,
    mesh: Option<Arc<crate::mesh::Mesh>>,
    acme: Arc<AcmeState>,
    shared: Shared,
    bound: Vec<(Key, Bound, SocketAddr)>,
}

impl PreparedProxy {
    /// Starts accepting on the bound listeners, and the ACME manager.
    pub fn start(self) -> Proxy {
        let PreparedProxy {
            settings,
            tunnels,
            mesh,
            acme,
            shared,
            bound,
        } = self;
        acme.set_share(
            mesh.clone()
                .map(|m| m as Arc<dyn crate::proxy::acme::AcmeShare>),
        );
        let max = settings.limits.max_connections;
        acme.set_wanted(
            settings.acme.clone(),
            acme_hosts(&settings),
            dns_zones(&settings),
        );
        crate::proxy::acme::spawn_manager(&acme);
        let rt = Arc::new(Runtime {
            acme,
            dns: Arc::default(),
            zone: arc_swap::ArcSwapOption::from(zone_data(&settings).map(Arc::new)),
            dns_limiter: arc_swap::ArcSwapOption::from(limiter_for(None, dns_rate(&settings))),
            current: ArcSwap::from_pointee(shared),
            conns: Arc::new(ConnCount::new(max)),
            per_source: Arc::default(),
            tunnels,
            listeners: Mutex::new(Vec::new()),
            reload_lock: Arc::default(),
            mesh: arc_swap::ArcSwapOption::new(mesh),
        });
        let ls: Vec<Listening> = bound
            .into_iter()
            .map(|(key, b, a)| spawn_listener(&rt, key, b, a))
            .collect();
        *rt.listeners.lock() = ls;
        let p = Proxy { rt };
        info!(
            routes = settings.routes.len(),
            http = ?p.http_addrs(),
            https = ?p.https_addrs(),
            tcp = ?p.tcp_addrs(),
            udp = ?p.udp_addrs(),
            "proxy listening"
        );
        p
    }
}

impl Proxy {
    fn addrs(&self, kind: Kind) -> Vec<SocketAddr> {
        self.rt
            .listeners
            .lock()
            .iter()
            .filter(|l| l.kind == kind)
            .map(|l| l.bound)
            .collect()
    }

    /// Bound HTTP listener addresses (useful with port 0).
    pub fn http_addrs(&self) -> Vec<SocketAddr> {
        self.addrs(Kind::Http)
    }
    /// Bound HTTPS listener addresses.
    pub fn https_addrs(&self) -> Vec<SocketAddr> {
        self.addrs(Kind::Https)
    }
    /// Bound TCP forward addresses, in `[[tcp]]` order.
    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.addrs(Kind::Tcp)
    }
    /// Bound UDP forward addresses, in `[[udp]]` order.
    pub fn udp_addrs(&self) -> Vec<SocketAddr> {
        self.addrs(Kind::Udp)
    }
    /// Bound DNS listener addresses (UDP; TCP is on the same port when
    /// the configured one was not 0).
    pub fn dns_addrs(&self) -> Vec<SocketAddr> {
        self.addrs(Kind::DnsUdp)
    }

    /// Per-route counters and backend health; the entry `listener` counts
    /// traffic that matched no route.
    pub fn stats(&self) -> Vec<RouteSnapshot> {
        self.rt.stats()
    }

    /// Same as [`StatsHandle::certificates`].
    pub fn certificates(&self) -> Vec<CertStatus> {
        StatsHandle(self.rt.clone()).certificates()
    }

    /// Sends connections for hosts without a route here to the hubs of
    /// `mesh` that serve them; takes PROXY headers from those hubs.
    pub fn set_mesh(&self, mesh: Option<Arc<crate::mesh::Mesh>>) {
        let same = match (self.rt.mesh.load().as_ref(), mesh.as_ref()) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            self.rt.acme.set_share(
                mesh.clone()
                    .map(|m| m as Arc<dyn crate::proxy::acme::AcmeShare>),
            );
        }
        self.rt.mesh.store(mesh);
    }

    /// A handle for reading the stats from elsewhere (the API socket).
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle(self.rt.clone())
    }

    /// Reopens the access log (after logrotate moved it), with no reload.
    pub fn reopen_access_log(&self) {
        if let Some(l) = &self.rt.current.load().access_log {
            l.reopen();
        }
    }

    /// Applies new settings without dropping open connections:
    /// [`Proxy::prepare_reload`], then [`PreparedReload::commit`]. On error
    /// (a certificate that does not load, a port that cannot be bound)
    /// nothing changes and the old settings keep running.
    pub async fn reload(&self, settings: ProxySettings) -> anyhow::Result<ReloadReport> {
        Ok(self.prepare_reload(settings).await?.commit())
    }

    /// What can fail of a reload, with no effect on the running proxy:
    /// builds the new generation (certificates, `basic_auth_file`s and a
    /// new access log loaded) and binds the listeners it adds. Until the
    /// [`PreparedReload`] is committed or dropped, other reloads wait.
    pub async fn prepare_reload(&self, settings: ProxySettings) -> anyhow::Result<PreparedReload> {
        let rt = &self.rt;
        let lock = rt.reload_lock.clone().lock_owned().await;
        let old = rt.current.load_full();
        let new = build(&settings, Some(&old), &rt.tunnels, &rt.acme)?;

        // Listeners: bind the new ones first, so a failure changes nothing.
        let want = wanted(&settings);
        let have: Vec<Key> = rt
            .listeners
            .lock()
            .iter()
            .map(|l| (l.kind, l.conf, l.nth))
            .collect();
        let mut fresh = Vec::new();
        for key in want.iter().filter(|w| !have.contains(w)) {
            let (b, a) = bind(key.0, key.1)?;
            fresh.push((*key, b, a));
        }
        Ok(PreparedReload {
            rt: rt.clone(),
            settings,
            old,
            new,
            want,
            fresh,
            _lock: lock,
        })
    }
}

/// A reload whose every step that can fail is done ([`Proxy::prepare_reload`]):
/// the running proxy is untouched until [`PreparedReload::commit`]. Dropped
/// instead, it changes nothing: the listeners it bound close.
pub struct PreparedReload {
    rt: Arc<Runtime>,
    settings: ProxySettings,
    /// The running generation it was built from.
    old: Arc<Shared>,
    new: Shared,
    /// Every listener of the new settings.
    want: Vec<Key>,
    /// The listeners it adds, bound.
    fresh: Vec<(Key, Bound, SocketAddr)>,
    _lock: tokio::sync::OwnedMutexGuard<()>,
}

impl PreparedReload {
    /// Puts the new generation in place (nothing here fails): new
    /// connections see it, HTTP connections of the old one finish the
    /// request in flight, the added listeners start accepting and the
    /// removed ones close.
    pub fn commit(self) -> ReloadReport {
        let PreparedReload {
            rt,
            settings,
            old,
            new,
            want,
            fresh,
            _lock,
        } = self;
        let rt = &rt;
        let mut report = ReloadReport::default();
        let ids = |s: &Shared| -> Vec<String> {
            s.routes
                .iter()
                .map(|r| r.id.clone())
                .chain(s.forwards.iter().map(|f| f.id.clone()))
                .collect()
        };
        let (old_ids, new_ids) = (ids(&old), ids(&new));
        report.added = new_ids
            .iter()
            .filter(|i| !old_ids.contains(i))
            .cloned()
            .collect();
        report.removed = old_ids
            .iter()
            .filter(|i| !new_ids.contains(i))
            .cloned()
            .collect();
        for r in &new.routes {
            if let Some(o) = old.routes.iter().find(|o| o.id == r.id) {
                if o.settings != r.settings {
                    report.changed.push(r.id.clone());
                }
            }
        }
        for f in &new.forwards {
            if let Some(o) = old.forwards.iter().find(|o| o.id == f.id) {
                if o.udp != f.udp
                    || o.proxy_protocol != f.proxy_protocol
                    || !Arc::ptr_eq(&o.upstreams, &f.upstreams)
                {
                    report.changed.push(f.id.clone());
                }
            }
        }
        // Upstreams not carried over stop their health checks.
        let kept: Vec<*const Upstreams> = new
            .routes
            .iter()
            .flat_map(|r| r.all_upstreams())
            .chain(new.forwards.iter().map(|f| &f.upstreams))
            .map(Arc::as_ptr)
            .collect();
        for u in old
            .routes
            .iter()
            .flat_map(|r| r.all_upstreams())
            .chain(old.forwards.iter().map(|f| &f.upstreams))
        {
            if !kept.contains(&Arc::as_ptr(u)) {
                u.retire();
            }
        }

        // Global connection limit: a lower one refuses new connections
        // until the open ones are under it; none is cut.
        rt.conns.set_max(settings.limits.max_connections);

        // Upstreams kept from the old generation take this one's
        // `backend_down_for` (new ones were made with it).
        for u in new
            .routes
            .iter()
            .flat_map(|r| r.all_upstreams())
            .chain(new.forwards.iter().map(|f| &f.upstreams))
        {
            u.set_down_for(new.limits.backend_down_for);
        }
        // A kept access log is reopened, for logrotate.
        if let (Some(n), Some(o)) = (&new.access_log, &old.access_log) {
            if Arc::ptr_eq(n, o) {
                n.reopen();
            }
        }

        // Rates staged by `build` on throttles the old routes share.
        for t in new
            .routes
            .iter()
            .map(|r| &r.bandwidth)
            .chain(new.forwards.iter().map(|f| &f.bandwidth))
        {
            t.commit();
        }
        rt.current.store(Arc::new(new));
        old.retired.send_replace(true);
        rt.zone.store(zone_data(&settings).map(Arc::new));
        let old = rt.dns_limiter.load_full();
        rt.dns_limiter
            .store(limiter_for(old.as_ref(), dns_rate(&settings)));
        rt.acme.set_wanted(
            settings.acme.clone(),
            acme_hosts(&settings),
            dns_zones(&settings),
        );

        let mut ls = rt.listeners.lock();
        let mut keep = Vec::new();
        for l in ls.drain(..) {
            if want.contains(&(l.kind, l.conf, l.nth)) {
                keep.push(l);
            } else {
                report
                    .listeners_removed
                    .push(format!("{} {}", what(l.kind), l.conf));
                let _ = l.stop.send(true);
            }
        }
        for (key, b, a) in fresh {
            report
                .listeners_added
                .push(format!("{} {}", what(key.0), key.1));
            keep.push(spawn_listener(rt, key, b, a));
        }
        *ls = keep;
        drop(ls);
        info!(
            added = ?report.added,
            removed = ?report.removed,
            changed = ?report.changed,
            listeners_added = ?report.listeners_added,
            listeners_removed = ?report.listeners_removed,
            "proxy reloaded"
        );
        report
    }
}

impl Proxy {
    /// Stops accepting and ordering certificates, asks HTTP connections to
    /// finish, waits up to `grace` for open connections to end, then cuts
    /// those still open (downloads, WebSockets and other upgraded
    /// connections, TLS passthrough, TCP forwards, connections sent to
    /// another hub). Tunnels carried over TLS are the hub's: not cut.
    pub async fn shutdown(self, grace: Duration) {
        let rt = self.rt.clone();
        rt.acme.stop();
        let ls: Vec<Listening> = rt.listeners.lock().drain(..).collect();
        for l in &ls {
            let _ = l.stop.send(true);
        }
        for l in ls {
            let _ = l.task.await;
        }
        rt.current.load().retired.send_replace(true);
        let _ = tokio::time::timeout(grace, async {
            while rt.conns.open() > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let left = rt.conns.open();
        if left > 0 {
            info!(
                connections = left,
                "proxy drain over; cutting the connections still open"
            );
        }
        rt.conns.cut_all();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // The connections still open hold the ACME state: its manager
        // would go on ordering for a proxy that is gone.
        self.rt.acme.stop();
        for l in self.rt.listeners.lock().drain(..) {
            let _ = l.stop.send(true);
            l.task.abort();
        }
        self.rt.current.load().retired.send_replace(true);
        let cur = self.rt.current.load();
        for u in cur
            .routes
            .iter()
            .flat_map(|r| r.all_upstreams())
            .chain(cur.forwards.iter().map(|f| &f.upstreams))
        {
            u.retire();
        }
    }
}

async fn accept_loop(
    l: TcpListener,
    (kind, conf, nth): Key,
    rt: Arc<Runtime>,
    mut stop: watch::Receiver<bool>,
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
        let shared = rt.current.load_full();
        let mesh = rt.mesh.load_full();
        // One client (an IPv4 address, an IPv6 /56) holds at most
        // `max_connections_per_source` of the slots, so one client cannot
        // shut all the others out; not a balancer, a trusted proxy or
        // another hub, which speak for many.
        let speaks_for_many = shared.trusts_forwarding(peer.ip())
            || shared
                .proxy_protocol_from
                .as_ref()
                .is_some_and(|a| a.permits(peer.ip()))
            || mesh.as_ref().is_some_and(|m| m.trusts(peer.ip()));
        let source = if speaks_for_many {
            None
        } else {
            let key = crate::per_source::subscriber_key(peer.ip());
            match rt
                .per_source
                .take(key, shared.limits.max_connections_per_source)
            {
                Some(s) => Some(s),
                None => {
                    shared.listener.error(ErrorKind::OverCapacity);
                    drop(sock);
                    continue;
                }
            }
        };
        let Some((slot, made_room)) = rt.conns.try_take(source) else {
            shared.listener.error(ErrorKind::OverCapacity);
            drop(sock);
            continue;
        };
        if made_room {
            shared.listener.error(ErrorKind::Evicted);
        }
        let eviction = Arc::clone(&slot.eviction);
        let _ = sock.set_nodelay(true);
        let cut = slot.cut();
        let retired = shared.retired.subscribe();
        let per_source = Arc::clone(&rt.per_source);
        let span = info_span!("conn", client = %peer);
        let fut = async move {
            let mut sock = sock;
            let mut peer = peer;
            // The address the client connected to, when a balancer names it.
            let mut dest = None;
            // Another hub of the mesh sent it: its PROXY header names the
            // client, and it is never sent on to another hub.
            // (Only on the HTTP and TLS listeners: TCP forwards are per hub.)
            let web = matches!(kind, Kind::Http | Kind::Https);
            let trusts = |ip| web && mesh.as_ref().is_some_and(|m| m.trusts(ip));
            // With a mesh secret, a hub this one does not know (its record
            // gone with its etcd session, or not here yet) is known by the
            // sealed PROXY header it starts with.
            let sealed = web && mesh.as_ref().is_some_and(|m| m.seal_key().is_some());
            let limit = shared.limits.handshake_timeout;
            let mut from_hub = false;
            // The hub that sent it asked to be told whether this hub serves
            // it (`mesh::ack`).
            let mut ack_asked = false;
            // A `proxy_protocol_from` balancer's header named the client.
            let mut via_balancer = false;
            // The next header is a hub's.
            let mut hub_next = trusts(peer.ip());
            let mut expect = hub_next
                || shared
                    .proxy_protocol_from
                    .as_ref()
                    .is_some_and(|a| a.permits(peer.ip()));
            // One wait for everything before the request or the ClientHello
            // (PROXY headers, the first bytes): as long as the listener waits
            // for those, so no stage starts a fresh wait for a slow client.
            let first_wait = match kind {
                Kind::Http => shared.limits.header_timeout,
                _ => limit,
            };
            let until = tokio::time::Instant::now() + first_wait;
            let left = move || until.saturating_duration_since(tokio::time::Instant::now());
            let silent = matches!(kind, Kind::Https).then_some(&*shared.listener);
            if sealed && !expect {
                match starts_with_proxy_v2(&sock, left(), silent).await {
                    Some(true) => (hub_next, expect) = (true, true),
                    Some(false) => {}
                    None => return,
                }
            }
            while expect {
                expect = false;
                let (addrs, raw) = match read_proxy_header(&mut sock, left()).await {
                    Ok(x) => x,
                    Err(e) => {
                        debug!(error = %e, "no valid PROXY header from a proxy_protocol_from address or another hub");
                        shared.listener.error(ErrorKind::BadProxyHeader);
                        return;
                    }
                };
                if hub_next {
                    // A sealed header must hold; an address-trusted hub's
                    // may come without a seal.
                    let known = trusts(peer.ip());
                    if let Some(m) = mesh.as_ref().filter(|_| sealed) {
                        if !known || crate::mesh::seal::carries_seal(&raw) {
                            if let Err(e) = m.check_seal(&raw, known) {
                                if known {
                                    warn!(from = %peer, error = %e, "mesh: a hub's sealed PROXY header refused (is its secret_file the same?)");
                                } else {
                                    debug!(from = %peer, error = %e, "mesh: sealed PROXY header refused");
                                }
                                shared.listener.error(ErrorKind::BadProxyHeader);
                                return;
                            }
                        }
                    }
                    match crate::mesh::ack::requested(&raw) {
                        Ok(asked) => ack_asked = asked,
                        Err(e) => {
                            debug!(from = %peer, error = %e, "mesh: a hub's PROXY header asks for an answer this hub cannot give");
                            shared.listener.error(ErrorKind::BadProxyHeader);
                            return;
                        }
                    }
                    from_hub = true;
                    if let Some(m) = &mesh {
                        m.note_received();
                    }
                }
                // LOCAL (the balancer's own health check) or UNKNOWN: the
                // connection's own addresses stand.
                let Some((client, to)) = addrs else { continue };
                debug!(client = %client, "PROXY header");
                peer = client;
                dest = Some(to);
                if hub_next {
                    continue;
                }
                via_balancer = true;
                let another = trusts(client.ip())
                    || (sealed
                        && match starts_with_proxy_v2(&sock, left(), silent).await {
                            Some(b) => b,
                            None => return,
                        });
                if another {
                    // A balancer in front of this hub passed on another
                    // hub's connection: that hub's own header follows.
                    (hub_next, expect) = (true, true);
                }
            }
            // The client a balancer named is held to its share of the
            // slots as one connecting directly is (the balancer itself is
            // not: it speaks for many).
            let _client_slot = if via_balancer && !from_hub {
                let key = crate::per_source::subscriber_key(peer.ip());
                match per_source.take(key, shared.limits.max_connections_per_source) {
                    Some(s) => Some(s),
                    None => {
                        debug!(client = %peer, "over max_connections_per_source (through a balancer)");
                        shared.listener.error(ErrorKind::OverCapacity);
                        return;
                    }
                }
            } else {
                None
            };
            let mut ack = mesh.clone().filter(|_| from_hub && ack_asked);
            let mesh = mesh.filter(|m| !from_hub && !m.is_empty());
            match kind {
                Kind::Http => {
                    if let Some((first, h2c)) = sniff_h2c(&shared, &mut sock, left()).await {
                        let (sock, first) = match &mesh {
                            Some(m) if !h2c => {
                                match http_via_mesh(
                                    &shared,
                                    m,
                                    sock,
                                    first,
                                    peer,
                                    dest,
                                    left(),
                                    &slot,
                                )
                                .await
                                {
                                    Some(x) => x,
                                    None => return,
                                }
                            }
                            _ => (sock, first),
                        };
                        let (sock, first) = if ack.is_some() {
                            match http_answer_hub(&shared, sock, first, h2c, left(), &mut ack).await
                            {
                                Some(x) => x,
                                None => return,
                            }
                        } else {
                            (sock, first)
                        };
                        let trusted = shared.trusts_forwarding(peer.ip());
                        let queue = Some(SendQueue::of(&sock));
                        let info =
                            Arc::new(ConnInfo::new(peer, false, None, !h2c, trusted, slot, queue));
                        // The first request's head is due when the first
                        // bytes were: the client's time runs from the accept.
                        // (HTTP/2 has its idle rule: a GOAWAY, not a cut.)
                        let io = Prefixed::new(first, sock);
                        let head_by = (!h2c).then_some(until);
                        serve_http(shared, io, info, h2c, retired, head_by).await;
                    }
                }
                Kind::Https => {
                    let hub = (mesh, ack);
                    serve_tls(shared, sock, peer, dest, retired, hub, left(), slot).await
                }
                Kind::Tcp => {
                    let fwd = shared
                        .forwards
                        .iter()
                        .filter(|f| f.udp.is_none() && f.listen == conf)
                        .nth(nth)
                        .cloned();
                    if let Some(fwd) = fwd {
                        // Spliced as it is: never idle to the count.
                        slot.hold();
                        serve_tcp(&shared, fwd, sock, peer, dest).await;
                    }
                }
                Kind::Udp | Kind::DnsUdp | Kind::DnsTcp => {}
            }
        };
        // Whatever the connection is doing when the proxy's drain is over
        // (see `Proxy::shutdown`) ends there: its sockets are closed.
        let fut = async move {
            tokio::select! {
                () = fut => {}
                () = eviction.cut() => debug!("closed to make room for a new connection"),
                () = cut => debug!("connection cut: the proxy's drain is over"),
            }
        };
        tokio::spawn(fut.instrument(span));
    }
}

/// Open client connections against `[limits] max_connections`. When that
/// many are open, a new connection takes the place of the one idle longest
/// (an HTTP connection with no request in flight, between requests or
/// before its first one, a TLS handshake included), which is closed (see
/// [`Eviction`]); only when none is idle is the new one refused. So clients
/// that open connections and leave them silent cannot lock others out. A
/// count, not a semaphore: a reload that lowers the limit takes effect at
/// once (until the open ones are under it, a new connection takes an idle
/// one's place or is refused; no busy one is cut), and the drain on
/// shutdown waits for the connections really open, then cuts those left
/// ([`ConnSlot::cut`]).
pub(crate) struct ConnCount {
    max: AtomicUsize,
    table: Mutex<ConnTable>,
    /// Set once the proxy's drain is over: whatever holds a slot ends.
    cut: watch::Sender<bool>,
}

/// The open connections, and since when the idle ones are idle [pure].
#[derive(Default)]
struct ConnTable {
    /// Ticks: the ids of new connections, and the order connections went
    /// idle in.
    clock: u64,
    open: HashMap<u64, OpenConn>,
    /// The idle connections by the tick they went idle at, longest idle
    /// first: `tick -> id`.
    idle: std::collections::BTreeMap<u64, u64>,
}

struct OpenConn {
    /// Requests in flight and other work that must not be cut (0: idle).
    busy: usize,
    /// While idle, the tick it went idle at (its key in `idle`).
    idle_at: u64,
    eviction: Arc<Eviction>,
}

impl ConnTable {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Opens a connection (idle, the newest): its id, and the connection
    /// idle longest when `max` were open and it had to make room (that one
    /// is forgotten here). `None` when `max` are open and none is idle.
    fn open(
        &mut self,
        max: usize,
        eviction: Arc<Eviction>,
    ) -> Option<(u64, Option<Arc<Eviction>>)> {
        let mut evicted = None;
        if self.open.len() >= max {
            let (_, oldest) = self.idle.pop_first()?;
            evicted = self.open.remove(&oldest).map(|c| c.eviction);
        }
        let id = self.tick();
        self.idle.insert(id, id);
        self.open.insert(
            id,
            OpenConn {
                busy: 0,
                idle_at: id,
                eviction,
            },
        );
        Some((id, evicted))
    }

    /// One more request (or other work) in flight on `id`.
    fn busy(&mut self, id: u64) {
        if let Some(c) = self.open.get_mut(&id) {
            if c.busy == 0 {
                self.idle.remove(&c.idle_at);
            }
            c.busy += 1;
        }
    }

    /// One less in flight on `id`: idle, as of now, when none is left.
    fn done(&mut self, id: u64) {
        let now = self.tick();
        if let Some(c) = self.open.get_mut(&id) {
            c.busy = c.busy.saturating_sub(1);
            if c.busy == 0 {
                c.idle_at = now;
                self.idle.insert(now, id);
            }
        }
    }

    /// Forgets `id` (its connection ended).
    fn close(&mut self, id: u64) {
        if let Some(c) = self.open.remove(&id) {
            if c.busy == 0 {
                self.idle.remove(&c.idle_at);
            }
        }
    }
}

/// How a connection learns that it was closed to make room for a new one.
#[derive(Default)]
pub(crate) struct Eviction {
    evicted: AtomicBool,
    wake: tokio::sync::Notify,
    /// Set once the connection is served as HTTP: from then on it closes
    /// itself (hyper's graceful shutdown: a request that crosses the
    /// eviction still gets its answer) instead of being cut.
    http: AtomicBool,
}

impl Eviction {
    fn evict(&self) {
        self.evicted.store(true, SeqCst);
        self.wake.notify_waiters();
    }

    /// Completes once the connection has been closed to make room.
    async fn evicted(&self) {
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.evicted.load(SeqCst) {
                return;
            }
            woken.await;
        }
    }

    /// Completes when the connection is to be cut: closed to make room
    /// before it was served as HTTP (reading PROXY headers, its first bytes,
    /// its ClientHello, in its TLS handshake).
    async fn cut(&self) {
        self.evicted().await;
        if self.http.load(SeqCst) {
            std::future::pending::<()>().await;
        }
    }
}

/// One open client connection's place in [`ConnCount`], given back when the
/// last holder drops it: the connection's task, and an upgraded connection's
/// splice (a WebSocket outlives the HTTP connection that started it). Both
/// end when the proxy's drain is over ([`ConnSlot::cut`]).
pub struct ConnSlot {
    count: Arc<ConnCount>,
    id: u64,
    eviction: Arc<Eviction>,
    /// Its source's place, given back with it.
    _source: Option<crate::per_source::SourceSlot>,
}

impl ConnSlot {
    /// Marks the connection busy (a request in flight) until the guard is
    /// dropped: it is not closed to make room meanwhile.
    pub(crate) fn busy(&self) -> Busy {
        self.count.table.lock().busy(self.id);
        Busy {
            count: Arc::clone(&self.count),
            id: self.id,
        }
    }

    /// Marks the connection busy for good (spliced to a backend or another
    /// hub: nothing tells its idle times).
    pub(crate) fn hold(&self) {
        self.count.table.lock().busy(self.id);
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.count.table.lock().close(self.id);
    }
}

/// A request in flight on a connection ([`ConnSlot::busy`]).
pub(crate) struct Busy {
    count: Arc<ConnCount>,
    id: u64,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.count.table.lock().done(self.id);
    }
}

impl ConnCount {
    fn new(max: usize) -> Self {
        ConnCount {
            max: AtomicUsize::new(max),
            table: Mutex::new(ConnTable::default()),
            cut: watch::channel(false).0,
        }
    }

    /// Ends the drain: every holder of a slot, now and later, is cut.
    fn cut_all(&self) {
        self.cut.send_replace(true);
    }

    fn set_max(&self, max: usize) {
        self.max.store(max, Relaxed);
    }

    fn open(&self) -> usize {
        self.table.lock().open.len()
    }

    /// A place for one more connection, holding its source's place
    /// (`source`) as long as it holds its own; and whether the connection
    /// idle longest was closed to make room for it. `None` when all are
    /// open and none is idle.
    fn try_take(
        self: &Arc<Self>,
        source: Option<crate::per_source::SourceSlot>,
    ) -> Option<(Arc<ConnSlot>, bool)> {
        let max = self.max.load(Relaxed);
        let eviction = Arc::new(Eviction::default());
        let (id, evicted) = self.table.lock().open(max, Arc::clone(&eviction))?;
        if let Some(old) = &evicted {
            old.evict();
        }
        let slot = Arc::new(ConnSlot {
            count: self.clone(),
            id,
            eviction,
            _source: source,
        });
        Some((slot, evicted.is_some()))
    }
}

impl ConnSlot {
    /// Completes once the proxy's drain is over (at once if it is): the
    /// holder of the slot stops what it does and lets its sockets go.
    pub(crate) fn cut(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.count.cut.subscribe();
        async move {
            if rx.wait_for(|cut| *cut).await.is_err() {
                // The count goes with its last slot: no drain to end.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Longest PROXY header accepted (v2 with TLVs, as cloud balancers send).
const MAX_PROXY_HEADER: usize = 4096;

/// What a PROXY header says (`None`: `LOCAL`/`UNKNOWN`), and its bytes.
type ProxyHeader = (Option<(SocketAddr, SocketAddr)>, Vec<u8>);

/// Whether the connection starts with what may be a PROXY v2 header (its
/// first byte, `\r`: no HTTP request or TLS record starts so), waiting for a
/// first byte at most `deadline`; `None` when none came (closed, or silent).
/// A silent client is counted on `silent` as a TLS listener counts one that
/// sends no ClientHello (`handshake_timeout`); the HTTP listener counts none
/// (`None`), as it counts no connection that never sent a byte.
async fn starts_with_proxy_v2(
    sock: &TcpStream,
    deadline: Duration,
    silent: Option<&Counters>,
) -> Option<bool> {
    let mut b = [0u8; 1];
    match tokio::time::timeout(deadline, sock.peek(&mut b)).await {
        Ok(Ok(1)) => Some(b[0] == 0x0D),
        Ok(_) => None,
        Err(_) => {
            if let Some(c) = silent {
                c.error(ErrorKind::HandshakeTimeout);
            }
            None
        }
    }
}

/// Reads the PROXY header (v1 or v2) at the start of `sock`, consuming it and
/// nothing after it: the client it names and the address that client
/// connected to, or `None` for `LOCAL`/`UNKNOWN` (use the connection's own
/// addresses). Peeks at what arrived; a header that is not complete yet
/// is all header so far, so that much is consumed and the next peek waits
/// for new bytes (no polling).
async fn read_proxy_header(
    sock: &mut TcpStream,
    deadline: Duration,
) -> Result<ProxyHeader, String> {
    use crate::proxy::proxy_protocol::{decode, Command, DecodeError};
    let work = async {
        // `buf[..had]`: consumed; `buf[had..had + n]`: peeked.
        let mut buf = vec![0u8; MAX_PROXY_HEADER];
        let mut had = 0;
        loop {
            let room = buf.get_mut(had..).unwrap_or_default();
            if room.is_empty() {
                return Err("PROXY header too long".to_string());
            }
            let n = sock.peek(room).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed before a PROXY header".to_string());
            }
            match decode(buf.get(..had + n).unwrap_or_default()) {
                Ok(d) => {
                    let rest = buf.get_mut(had..d.len).ok_or("header longer than read")?;
                    sock.read_exact(rest).await.map_err(|e| e.to_string())?;
                    let addrs = match d.command {
                        Command::Proxy { src, dst, .. } => Some((src, dst)),
                        Command::Local | Command::ProxyUnspec => None,
                    };
                    buf.truncate(d.len);
                    return Ok((addrs, buf));
                }
                Err(DecodeError::Incomplete) => {
                    let part = buf.get_mut(had..had + n).unwrap_or_default();
                    sock.read_exact(part).await.map_err(|e| e.to_string())?;
                    had += n;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    tokio::time::timeout(deadline, work)
        .await
        .unwrap_or_else(|_| Err("no complete PROXY header in time".to_string()))
}

/// The HTTP/2 connection preface a client with prior knowledge (h2c) sends.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether `first` (the first bytes of a plain connection) is the HTTP/2
/// preface (`Some(true)`), cannot be (`Some(false)`), or may still become it.
fn is_h2_preface(first: &[u8]) -> Option<bool> {
    let n = first.len().min(H2_PREFACE.len());
    if first.get(..n) != H2_PREFACE.get(..n) {
        Some(false)
    } else if n == H2_PREFACE.len() {
        Some(true)
    } else {
        None
    }
}

/// Reads the first bytes of a plain HTTP connection until they show whether
/// it is HTTP/2 with prior knowledge (h2c, as gRPC clients without TLS
/// speak) or HTTP/1; returns them (to be replayed) and the verdict. An
/// HTTP/1 request differs from the preface by its first or second byte.
/// `None` (the connection is closed): the client closed, or sent too little
/// to tell within `deadline` (the header timeout: a slowloris).
async fn sniff_h2c(
    shared: &Shared,
    sock: &mut TcpStream,
    deadline: Duration,
) -> Option<(Vec<u8>, bool)> {
    let mut first = Vec::with_capacity(H2_PREFACE.len());
    let read = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        loop {
            let want = H2_PREFACE.len().saturating_sub(first.len());
            let chunk = buf.get_mut(..want)?;
            match sock.read(chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => first.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            }
            if let Some(v) = is_h2_preface(&first) {
                return Some(v);
            }
        }
    };
    let h2c = match tokio::time::timeout(deadline, read).await {
        Ok(r) => r?,
        Err(_) => {
            if !first.is_empty() {
                head_late(shared);
            }
            return None;
        }
    };
    Some((first, h2c))
}

/// On a plain HTTP listener with a mesh: reads the first request's head
/// (after `first`, what the h2c sniff read) until its `Host` shows; a host
/// with no route here that another hub serves has the connection sent to that
/// hub (`None`: done, answered 502 when no hub took it). Otherwise the socket
/// and everything read, to be served here (`None` too when the client closed
/// or stalled past `wait`, what is left of the header timeout, as hyper would
/// have closed it).
#[allow(clippy::too_many_arguments)] // what the accept loop learnt of the connection
async fn http_via_mesh(
    shared: &Arc<Shared>,
    mesh: &crate::mesh::Mesh,
    mut sock: TcpStream,
    mut first: Vec<u8>,
    peer: SocketAddr,
    dest: Option<SocketAddr>,
    wait: Duration,
    slot: &ConnSlot,
) -> Option<(TcpStream, Vec<u8>)> {
    let host = read_head_host(shared, &mut sock, &mut first, wait).await?;
    let hubs = host
        .as_ref()
        .map_or_else(Vec::new, |h| mesh_hubs(shared, mesh, h, peer.ip()));
    let (Some(host), false) = (host, hubs.is_empty()) else {
        return Some((sock, first));
    };
    let conn = (sock, peer, dest, first);
    via_mesh(shared.clone(), mesh, &hubs, &host, false, conn, slot).await;
    None
}

/// Reads the first request's head (after `first`, what was read already,
/// which takes what comes) until its `Host` shows: `Some(Some(host))`;
/// `Some(None)` when the connection is this hub's whatever the host (a
/// node's WebSocket tunnel) or the head is one hyper answers (unreadable);
/// `None` when the client closed or stalled past `wait`, as hyper would have
/// closed it.
async fn read_head_host(
    shared: &Shared,
    sock: &mut TcpStream,
    first: &mut Vec<u8>,
    wait: Duration,
) -> Option<Option<DomainName>> {
    use crate::proxy::detect::{sniff_http_host_capped, SniffError};
    let limits = &shared.limits;
    let cap = limits.max_header_bytes.max(1024);
    let read = async {
        let mut buf = [0u8; 4096];
        // Parsed again only when the head may have ended (a blank line came
        // in) or grown past the cap: a client sending a line, or a byte, at
        // a time costs no more than one sending it all (the head is read
        // once more per blank line, not once per line).
        let mut scan = true;
        loop {
            if scan {
                match sniff_http_host_capped(first, cap) {
                    Err(SniffError::Incomplete) => {}
                    // A node's WebSocket tunnel is this hub's, whatever
                    // the host.
                    Ok(h) if crate::carrier::ws::is_tunnel_target(h.target) => return Some(None),
                    Ok(h) => return Some(h.host_name().cloned()),
                    // Hyper answers what it cannot parse.
                    Err(_) => return Some(None),
                }
            }
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => {
                    let chunk = buf.get(..n).unwrap_or_default();
                    // The two bytes before the chunk may begin its blank line.
                    let from = first.len().saturating_sub(2);
                    first.extend_from_slice(chunk);
                    scan = first.len() > cap || blank_line(first.get(from..).unwrap_or_default());
                }
            }
        }
    };
    match tokio::time::timeout(wait, read).await {
        Ok(h) => h,
        Err(_) => {
            head_late(shared);
            None
        }
    }
}

/// On a plain HTTP listener, a connection another hub sent asking to be
/// told whether this hub serves it: reads the first request's head as far
/// as the sending hub did (its `Host`) and answers for this hub's route for
/// that host ([`answer_hub`]). The socket and what was read, to be served
/// here; `None` when refused, or when the client closed or stalled.
async fn http_answer_hub(
    shared: &Shared,
    mut sock: TcpStream,
    mut first: Vec<u8>,
    h2c: bool,
    wait: Duration,
    ack: &mut Option<Arc<crate::mesh::Mesh>>,
) -> Option<(TcpStream, Vec<u8>)> {
    use crate::mesh::ack::{verdict, RouteState};
    // (A hub sends on no h2c connection; one that comes is served here.)
    let v = if h2c {
        Ok(())
    } else {
        match read_head_host(shared, &mut sock, &mut first, wait).await? {
            Some(host) => verdict(shared.table.lookup(&host).map(|r| RouteState {
                servable: true,
                paused: r.settings.paused,
            })),
            None => Ok(()),
        }
    };
    answer_hub(&mut sock, ack, v).await.then_some((sock, first))
}

/// Tells the hub that sent this connection whether this hub serves it
/// (`v`), when it asked (`ack`, taken: one answer a connection), before any
/// byte of the client's answer. Whether this hub goes on with the
/// connection: not when it refused (the sending hub tries the next hub
/// that serves the host, and answers the client), nor when the answer
/// could not be written (the sending hub is gone). Without a request,
/// always: the client gets this hub's answer, refusal or not.
async fn answer_hub(
    sock: &mut TcpStream,
    ack: &mut Option<Arc<crate::mesh::Mesh>>,
    v: crate::mesh::ack::Verdict,
) -> bool {
    let Some(m) = ack.take() else {
        return true;
    };
    if let Err(r) = v {
        m.note_declined();
        debug!(
            why = r.as_str(),
            "mesh: not served here; the sending hub tries the next"
        );
    }
    match sock.write_all(&crate::mesh::ack::encode(v)).await {
        Ok(()) => v.is_ok(),
        Err(e) => {
            debug!(error = %e, "mesh: the sending hub went before its answer");
            false
        }
    }
}

/// Whether `bytes` hold the end of an HTTP/1 head (`\n\n` or `\n\r\n`).
fn blank_line(bytes: &[u8]) -> bool {
    bytes
        .windows(2)
        .enumerate()
        .any(|(i, w)| w == b"\n\n" || (w == b"\n\r" && bytes.get(i + 2) == Some(&b'\n')))
}

/// The hubs to send `client`'s connection for `host` to, in order: none
/// when this hub has a route for it (its own routes win) or no other hub
/// serves it.
fn mesh_hubs(
    shared: &Shared,
    mesh: &crate::mesh::Mesh,
    host: &DomainName,
    client: std::net::IpAddr,
) -> Vec<Arc<crate::mesh::table::PeerHub>> {
    if shared.table.lookup(host).is_some() {
        return Vec::new();
    }
    mesh.candidates(host, client)
}

/// Sends a connection for `host` (`conn`: the socket, the client, the
/// address it connected to when a balancer named it, and the bytes already
/// read) to the first of `hubs`
/// that takes it, over their TLS listeners when `tls`; when none does,
/// answers a plain HTTP client 502 and a TLS client an `internal_error`
/// alert. Holds no generation of the routes meanwhile; logs one `mesh`
/// access-log line. The connection (its `slot`) is busy from here on.
async fn via_mesh(
    shared: Arc<Shared>,
    mesh: &crate::mesh::Mesh,
    hubs: &[Arc<crate::mesh::table::PeerHub>],
    host: &DomainName,
    tls: bool,
    conn: (TcpStream, SocketAddr, Option<SocketAddr>, Vec<u8>),
    slot: &ConnSlot,
) {
    slot.hold();
    let (sock, peer, dest, first) = conn;
    let mut rec = Record::start(&shared, peer, LogKind::Mesh, tls);
    let limits = shared.limits.clone();
    drop(shared);
    let Some(local) = dest.or_else(|| sock.local_addr().ok()) else {
        return;
    };
    Record::note(&mut rec, |e| e.host = Some(host.as_str().to_string()));
    let first_len = first.len() as u64;
    let c = crate::mesh::forward::Client {
        sock,
        peer,
        dest: local,
        first,
    };
    match crate::mesh::forward::forward(mesh, hubs, tls, c, &limits).await {
        Ok(sent) => {
            debug!(host = %host, hub = %sent.hub, result = ?sent.spliced, "sent to another hub");
            Record::note(&mut rec, |e| e.route = Some(format!("mesh:{}", sent.hub)));
            note_spliced(&mut rec, sent.to, &sent.spliced);
            Record::note(&mut rec, |e| {
                e.bytes_in = e.bytes_in.map(|n| n + first_len);
            });
        }
        Err((mut sock, kind)) => {
            debug!(host = %host, error = kind.as_str(), "no hub that serves this host answered");
            Record::note(&mut rec, |e| e.error = Some(kind.as_str()));
            if tls {
                tls::send_alert(&mut sock, &tls::ALERT_INTERNAL_ERROR).await;
            } else {
                Record::note(&mut rec, |e| e.status = Some(502));
                let _ = sock.write_all(crate::mesh::forward::HTTP_502).await;
                let _ = sock.shutdown().await;
            }
        }
    }
}

async fn serve_http<IO>(
    shared: Arc<Shared>,
    io: IO,
    info: Arc<ConnInfo>,
    h2: bool,
    mut stop: watch::Receiver<bool>,
    head_by: Option<tokio::time::Instant>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = shared.limits.clone();
    // A client that takes nothing of what it is sent for `idle_timeout` is
    // cut off: on the whole connection here, per HTTP/2 stream by the
    // streams' executor.
    let stall = Arc::clone(info.stall());
    let io = TokioIo::new(WatchedIo::new(
        io,
        limits.idle_timeout,
        Arc::clone(&stall),
        info.queue(),
    ));
    let listener = Arc::clone(&shared);
    // Closed to make room for a new connection while no request is in
    // flight (each request keeps it busy until its response has gone to
    // hyper): from here on it closes itself.
    let eviction = Arc::clone(&info.slot().eviction);
    eviction.http.store(true, SeqCst);
    if h2 {
        let streams = Streams::new();
        let open = Arc::clone(&streams);
        let svc = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            // A WebSocket over HTTP/2 keeps its stream open past its
            // response, for as long as its splice runs.
            if req.method() == hyper::Method::CONNECT {
                req.extensions_mut().insert(Arc::clone(&open));
            }
            let open = open.open();
            let busy = info.slot().busy();
            let r = handle(shared.clone(), info.clone(), req);
            async move {
                let resp = r.await?;
                Ok::<_, std::convert::Infallible>(
                    resp.map(|b| BusyBody::new(TrackedBody::new(b, open), busy)),
                )
            }
        });
        let exec = StreamExec::new(Arc::clone(&stall), limits.idle_timeout);
        {
            let conn = hyper::server::conn::http2::Builder::new(exec)
                .timer(TokioTimer::new())
                .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
                .max_concurrent_streams(H2_MAX_STREAMS)
                // WebSocket over HTTP/2 (RFC 8441).
                .enable_connect_protocol()
                // A client gone without a word (its streams open, nothing
                // moving) is noticed by the PINGs it leaves unanswered.
                .keep_alive_interval(H2_PING_EVERY)
                .keep_alive_timeout(H2_PING_TIMEOUT)
                .serve_connection(io, svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!(error = %e, "h2 connection ended") },
                _ = retired(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
                _ = idle(&streams, limits.header_timeout) => {
                    // GOAWAY: a request that crosses it still gets its answer.
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(limits.header_timeout, conn).await;
                }
                () = eviction.evicted() => {
                    debug!("closed to make room for a new connection");
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(limits.header_timeout, conn).await;
                }
            }
        }
        // Streams open when the connection was cut count it as their
        // bodies go; with none, the listener does.
        if stall.uncounted_cut() && streams.idle_for().is_some() {
            listener.listener.error(ErrorKind::ClientNotReading);
        }
    } else {
        // `head_by`: when the first request must have come (a plain HTTP/1
        // connection's `header_timeout` from its accept, which the wait for
        // its first bytes already used part of; hyper's own timer would
        // start afresh, giving a slow client twice the time).
        let asked = Arc::new(AtomicBool::new(false));
        let served = Arc::clone(&asked);
        let first_late = {
            let asked = Arc::clone(&asked);
            async move {
                if let Some(t) = head_by {
                    tokio::time::sleep_until(t).await;
                    if !asked.load(Relaxed) {
                        return;
                    }
                }
                std::future::pending::<()>().await
            }
        };
        let svc = service_fn(move |req| {
            asked.store(true, Relaxed);
            let busy = info.slot().busy();
            let r = handle(shared.clone(), info.clone(), req);
            async move {
                let resp = r.await?;
                Ok::<_, std::convert::Infallible>(resp.map(|b| BusyBody::new(b, busy)))
            }
        });
        {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(limits.max_header_bytes.max(8192))
                .serve_connection(io, svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                // The connection first: a head completed in the same wake-up
                // as the deadline is served.
                biased;
                r = conn.as_mut() => if let Err(e) = r {
                    debug!(error = %e, "http/1 connection ended");
                    // A head the parser refused (hyper answered 400 or
                    // 431 itself): a smuggling probe is seen in the counts.
                    if e.is_parse() || e.is_parse_too_large() {
                        listener.listener.error(ErrorKind::BadRequest);
                    }
                },
                _ = retired(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
                () = first_late => head_late(&listener),
                () = eviction.evicted() => {
                    debug!("closed to make room for a new connection");
                    // Before its first request it is cut (hyper's graceful
                    // shutdown would wait for a head begun); between
                    // requests hyper closes it at once, or after the one
                    // that crossed the eviction.
                    if served.load(Relaxed) {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            }
        }
        // Dropped with the connection, a response body that was going out
        // has counted the cut on its route; a response all in hyper's
        // buffers by then counts on the listener.
        if stall.uncounted_cut() {
            listener.listener.error(ErrorKind::ClientNotReading);
        }
    }
}

/// A response body that keeps its connection busy ([`ConnSlot::busy`]) until
/// it has gone to hyper (or is dropped).
struct BusyBody<B> {
    inner: B,
    _busy: Busy,
}

impl<B> BusyBody<B> {
    fn new(inner: B, busy: Busy) -> Self {
        BusyBody { inner, _busy: busy }
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for BusyBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A plain HTTP connection that sent part of a request head but no complete
/// one within `header_timeout` of its accept: closed without an answer,
/// counted on the listener. (One that sent nothing is closed uncounted:
/// browsers open connections they may never use.)
fn head_late(shared: &Shared) {
    debug!("no complete request head within header_timeout of the accept: closed");
    shared.listener.error(ErrorKind::HeaderTimeout);
}

/// Streams an HTTP/2 client may have open at once on one connection (hyper's
/// default is 200, nginx's 128): each open stream can hold a backend
/// connection, a lease and a place under the route's `max_connections`.
const H2_MAX_STREAMS: u32 = 100;

/// PINGs on an HTTP/2 client connection, and how long one may go unanswered.
const H2_PING_EVERY: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Completes once an HTTP/2 connection has had no request open for `limit`
/// (from its start, or since its last request ended): the keep-alive idle
/// time of HTTP/1.1 connections, `header_timeout`.
async fn idle(streams: &Streams, limit: Duration) {
    loop {
        let wait = match streams.idle_for() {
            Some(d) if d >= limit => return,
            Some(d) => limit - d,
            None => limit,
        };
        tokio::time::sleep(wait).await;
    }
}

/// Completes when the generation is retired (at once if it already is).
async fn retired(rx: &mut watch::Receiver<bool>) {
    if *rx.borrow_and_update() {
        return;
    }
    while rx.changed().await.is_ok() {
        if *rx.borrow() {
            return;
        }
    }
    std::future::pending::<()>().await;
}

/// A TLS-ALPN-01 validation for a name this hub passes through, with no
/// challenge of the hub's own for it: the backend holds the name's
/// certificate and answers its own challenges, so the ClientHello goes to it
/// like any other.
fn backend_alpn01(shared: &Shared, sni: Option<&DomainName>) -> bool {
    let Some(name) = sni else {
        return false;
    };
    shared.acme.alpn01(name.as_str()).is_none()
        && shared
            .table
            .lookup(name)
            .is_some_and(|r| r.settings.tls == TlsMode::Passthrough)
}

fn upstream_error(c: &Counters, e: &UpstreamError) -> ErrorKind {
    let kind = match e {
        UpstreamError::NoHealthy => ErrorKind::NoHealthyBackend,
        UpstreamError::Refused(..) => ErrorKind::BackendRefused,
        UpstreamError::Timeout(_) => ErrorKind::BackendTimeout,
        UpstreamError::Local(..) => ErrorKind::OverCapacity,
        UpstreamError::Tls(..) => ErrorKind::BackendTls,
    };
    c.error(kind);
    kind
}

/// Connects to a backend of `up`, sends the PROXY header if asked, then `first`.
async fn open_backend(
    up: &Arc<Upstreams>,
    c: &Counters,
    limits: &Limits,
    pp: ProxyProtocol,
    client: SocketAddr,
    local: SocketAddr,
    first: &[u8],
) -> Result<(TcpStream, Lease, SocketAddr), ErrorKind> {
    let (mut b, backend, lease) = match up.connect(limits.connect_timeout, Some(client.ip())).await
    {
        Ok(x) => x,
        Err(e) => {
            debug!(error = %e, "no backend connection");
            return Err(upstream_error(c, &e));
        }
    };
    let mut head = Vec::with_capacity(first.len() + 108);
    match pp {
        ProxyProtocol::Off => {}
        ProxyProtocol::V1 => encode_v1(&mut head, client, local),
        ProxyProtocol::V2 => encode_v2(&mut head, Transport::Tcp, client, local),
    }
    head.extend_from_slice(first);
    if !head.is_empty() {
        if let Err(e) = b.write_all(&head).await {
            debug!(backend = %backend, error = %e, "backend write failed");
            c.error(ErrorKind::BackendRefused);
            return Err(ErrorKind::BackendRefused);
        }
        c.add_in(first.len() as u64);
    }
    Ok((b, lease, backend.addr))
}

/// Counts `kind` on `c` and notes it in the access-log record.
fn refuse(c: &Counters, rec: &mut Option<Record>, kind: ErrorKind) {
    c.error(kind);
    Record::note(rec, |e| e.error = Some(kind.as_str()));
}

/// `dest`: the address the client connected to, if a balancer's PROXY header
/// named it (else the listener's), for the PROXY header to the backend.
async fn serve_tcp(
    shared: &Shared,
    fwd: Arc<Forward>,
    sock: TcpStream,
    peer: SocketAddr,
    dest: Option<SocketAddr>,
) {
    let c = fwd.counters.clone();
    c.connection();
    let mut rec = Record::start(shared, peer, LogKind::Tcp, fwd.tls.is_some());
    Record::note(&mut rec, |e| e.route = Some(fwd.id.clone()));
    if !fwd.access.permits(peer.ip()) {
        refuse(&c, &mut rec, ErrorKind::Denied);
        debug!(forward = %fwd.id, client = %peer, "client address denied");
        return;
    }
    if over_limit(&fwd.limiter, peer.ip()).is_some() {
        refuse(&c, &mut rec, ErrorKind::RateLimited);
        return;
    }
    let Ok(_slot) = fwd.upstreams.admit() else {
        refuse(&c, &mut rec, ErrorKind::OverCapacity);
        return;
    };
    let Some(local) = dest.or_else(|| sock.local_addr().ok()) else {
        return;
    };
    let queue = Some(SendQueue::of(&sock));
    let Some(acceptor) = &fwd.tls else {
        relay_tcp(shared, &fwd, sock, queue, peer, local, &mut rec).await;
        return;
    };
    // The client's handshake first: nothing reaches a backend before it.
    match tokio::time::timeout(shared.limits.handshake_timeout, acceptor.accept(sock)).await {
        Ok(Ok(tls)) => relay_tcp(shared, &fwd, tls, queue, peer, local, &mut rec).await,
        Ok(Err(e)) => {
            refuse(&c, &mut rec, ErrorKind::TlsHandshake);
            debug!(forward = %fwd.id, error = %e, "tls handshake failed");
        }
        Err(_) => refuse(&c, &mut rec, ErrorKind::HandshakeTimeout),
    }
}

/// Notes how a splice went in the access-log record.
fn note_spliced(rec: &mut Option<Record>, backend: SocketAddr, s: &crate::proxy::io::Spliced) {
    Record::note(rec, |e| {
        e.backend = Some(backend);
        e.bytes_in = Some(s.bytes_in);
        e.bytes_out = s.bytes_out;
    });
}

/// Connects a backend of `fwd` and splices `client` (on the socket `queue`'s)
/// to it.
async fn relay_tcp<S>(
    shared: &Shared,
    fwd: &Forward,
    client: S,
    queue: Option<SendQueue>,
    peer: SocketAddr,
    local: SocketAddr,
    rec: &mut Option<Record>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let c = fwd.counters.clone();
    let (b, _lease, backend) = match open_backend(
        &fwd.upstreams,
        &c,
        &shared.limits,
        fwd.proxy_protocol,
        peer,
        local,
        &[],
    )
    .await
    {
        Ok(x) => x,
        Err(kind) => {
            Record::note(rec, |e| e.error = Some(kind.as_str()));
            return;
        }
    };
    let r = splice(
        client,
        b,
        c,
        shared.limits.idle_timeout,
        Some(fwd.bandwidth.clone()),
        queue,
    )
    .await;
    note_spliced(rec, backend, &r);
    debug!(forward = %fwd.id, result = ?r, "tcp forward ended");
}

#[allow(clippy::too_many_arguments)] // what the accept loop learnt of the connection
async fn serve_tls(
    shared: Arc<Shared>,
    mut sock: TcpStream,
    peer: SocketAddr,
    dest: Option<SocketAddr>,
    stop: watch::Receiver<bool>,
    // The mesh to send the connection on through, when it came from a
    // client; the hub that sent it, when that hub asked for an answer.
    (mesh, mut ack): (
        Option<Arc<crate::mesh::Mesh>>,
        Option<Arc<crate::mesh::Mesh>>,
    ),
    hello_wait: Duration,
    slot: Arc<ConnSlot>,
) {
    use crate::mesh::ack::{verdict, Refusal, RouteState};
    let limits = shared.limits.clone();
    // One wait for the whole handshake, ClientHello included: no stage
    // starts a fresh one for a slow client.
    let until = tokio::time::Instant::now() + hello_wait;
    let left = move || until.saturating_duration_since(tokio::time::Instant::now());
    let (bytes, sni) = match tls::read_client_hello(&mut sock, hello_wait).await {
        Hello::Ok {
            bytes,
            sni,
            acme_alpn: true,
            ..
        } if !backend_alpn01(&shared, sni.as_ref()) => {
            // A TLS-ALPN-01 validation: answer with the challenge certificate.
            let key = sni.as_ref().and_then(|s| shared.acme.alpn01(s.as_str()));
            match key.map(tls::acme_alpn_config) {
                Some(Ok(cfg)) => {
                    if !answer_hub(&mut sock, &mut ack, Ok(())).await {
                        return;
                    }
                    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
                    let io = Prefixed::new(bytes, sock);
                    if let Ok(Ok(mut t)) = tokio::time::timeout(left(), acceptor.accept(io)).await {
                        let _ = t.shutdown().await;
                    }
                }
                _ => {
                    // Not this hub's challenge: another hub's, for a name
                    // it serves and this one does not?
                    if let (Some(m), Some(h)) = (&mesh, &sni) {
                        let hubs = mesh_hubs(&shared, m, h, peer.ip());
                        if !hubs.is_empty() {
                            let conn = (sock, peer, dest, bytes);
                            via_mesh(shared, m, &hubs, h, true, conn, &slot).await;
                            return;
                        }
                    }
                    // Perhaps another hub that serves the name has it.
                    if !answer_hub(&mut sock, &mut ack, Err(Refusal::NoRoute)).await {
                        return;
                    }
                    shared.listener.error(ErrorKind::UnknownSni);
                    tls::send_alert(&mut sock, &tls::ALERT_UNRECOGNIZED_NAME).await;
                }
            }
            return;
        }
        Hello::Ok {
            bytes,
            carrier: true,
            ..
        } if shared.carrier.is_some() => {
            // Long-lived: hold no generation of the routes meanwhile, nor
            // the listener's connection slot (as a WebSocket tunnel does
            // not): the carrier's own limits bound these, and the hub
            // closes them when it stops, so the drain need not wait, nor
            // cut them (a task of its own, which the connection's cut does
            // not reach).
            let hub = shared.carrier.clone();
            drop(shared);
            drop(slot);
            if let Some(hub) = hub {
                if !answer_hub(&mut sock, &mut ack, Ok(())).await {
                    return;
                }
                let wait = left();
                let io = Prefixed::new(bytes, sock);
                tokio::spawn(async move { hub.serve(io, peer, wait).await }.in_current_span());
            }
            return;
        }
        Hello::Ok { bytes, sni, .. } => (bytes, sni),
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
    if let (None, Some(m), Some(host)) = (&route, &mesh, &sni) {
        let hubs = mesh_hubs(&shared, m, host, peer.ip());
        if !hubs.is_empty() {
            let conn = (sock, peer, dest, bytes);
            via_mesh(shared, m, &hubs, host, true, conn, &slot).await;
            return;
        }
    }
    // Refused here, another hub that serves the host may take it; taken,
    // the sending hub hears so before the client's answer (below).
    let v = verdict(route.as_ref().map(|r| RouteState {
        servable: r.settings.tls == TlsMode::Passthrough || r.has_cert,
        paused: r.settings.paused,
    }));
    if v.is_err() && !answer_hub(&mut sock, &mut ack, v).await {
        return;
    }
    let Some(route) = route.filter(|r| r.settings.tls == TlsMode::Passthrough || r.has_cert) else {
        debug!(sni = ?sni.as_ref().map(|s| s.as_str()), "unknown SNI");
        shared.listener.error(ErrorKind::UnknownSni);
        tls::send_alert(&mut sock, &tls::ALERT_UNRECOGNIZED_NAME).await;
        return;
    };
    let c = route.counters.clone();
    c.connection();
    // Terminated routes log per request (in `http`); passthrough per connection.
    let mut rec = match route.settings.tls {
        TlsMode::Passthrough => Record::start(&shared, peer, LogKind::Passthrough, true),
        TlsMode::Terminate => None,
    };
    Record::note(&mut rec, |e| {
        e.route = Some(route.id.clone());
        e.host = sni.as_ref().map(|s| s.as_str().to_string());
    });
    match route.settings.tls {
        // Terminated routes answer 403 per request (the same on :80 and
        // :443); on :443 they refuse the handshake first (below).
        // (A client the route refuses gets its answer from this hub: the
        // route is served here.)
        TlsMode::Passthrough if !route.settings.access.permits(peer.ip()) => {
            if !answer_hub(&mut sock, &mut ack, Ok(())).await {
                return;
            }
            refuse(&c, &mut rec, ErrorKind::Denied);
            tls::send_alert(&mut sock, &tls::ALERT_ACCESS_DENIED).await;
        }
        // The guard takes a token (after the address rules: refused clients
        // take none).
        TlsMode::Passthrough if over_limit(&route.limiter, peer.ip()).is_some() => {
            if !answer_hub(&mut sock, &mut ack, Ok(())).await {
                return;
            }
            refuse(&c, &mut rec, ErrorKind::RateLimited);
            tls::send_alert(&mut sock, &tls::ALERT_INTERNAL_ERROR).await;
        }
        TlsMode::Passthrough if route.settings.paused => {
            refuse(&c, &mut rec, ErrorKind::Paused);
            tls::send_alert(&mut sock, &tls::ALERT_INTERNAL_ERROR).await;
        }
        TlsMode::Passthrough => {
            // Spliced as it is: never idle to the count.
            slot.hold();
            let Ok(_slot) = route.upstreams.admit() else {
                if !answer_hub(&mut sock, &mut ack, Err(Refusal::Full)).await {
                    return;
                }
                refuse(&c, &mut rec, ErrorKind::OverCapacity);
                tls::send_alert(&mut sock, &tls::ALERT_INTERNAL_ERROR).await;
                return;
            };
            let Some(local) = dest.or_else(|| sock.local_addr().ok()) else {
                return;
            };
            if !answer_hub(&mut sock, &mut ack, Ok(())).await {
                return;
            }
            let (b, _lease, backend) = match open_backend(
                &route.upstreams,
                &c,
                &limits,
                route.settings.proxy_protocol,
                peer,
                local,
                &bytes,
            )
            .await
            {
                Ok(x) => x,
                Err(kind) => {
                    Record::note(&mut rec, |e| e.error = Some(kind.as_str()));
                    tls::send_alert(&mut sock, &tls::ALERT_INTERNAL_ERROR).await;
                    return;
                }
            };
            let queue = Some(SendQueue::of(&sock));
            let r = splice(
                sock,
                b,
                c,
                limits.idle_timeout,
                Some(route.bandwidth.clone()),
                queue,
            )
            .await;
            // The ClientHello went to the backend before the splice.
            note_spliced(&mut rec, backend, &r);
            Record::note(&mut rec, |e| {
                e.bytes_in = e.bytes_in.map(|n| n + bytes.len() as u64);
            });
            debug!(route = %route.id, result = ?r, "passthrough ended");
        }
        TlsMode::Terminate => {
            // The handshake costs the hub: a client the route refuses, or
            // one with no token left, gets none (refused as its requests
            // would be, and counted alike; its bucket is only looked at,
            // the requests take the tokens). Not a trusted proxy: it
            // speaks for many, each judged per request.
            if !shared.trusts_forwarding(peer.ip()) {
                if !route.settings.access.permits(peer.ip()) {
                    if !answer_hub(&mut sock, &mut ack, Ok(())).await {
                        return;
                    }
                    c.error(ErrorKind::Denied);
                    debug!(route = %route.id, "client address denied: no TLS handshake");
                    tls::send_alert(&mut sock, &tls::ALERT_ACCESS_DENIED).await;
                    return;
                }
                if limited(&route.limiter, peer.ip()) {
                    if !answer_hub(&mut sock, &mut ack, Ok(())).await {
                        return;
                    }
                    c.error(ErrorKind::RateLimited);
                    debug!(route = %route.id, "client over the rate limit: no TLS handshake");
                    tls::send_alert(&mut sock, &tls::ALERT_INTERNAL_ERROR).await;
                    return;
                }
            }
            let Some(cfg) = shared.tls.clone() else {
                return;
            };
            if !answer_hub(&mut sock, &mut ack, Ok(())).await {
                return;
            }
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
            let queue = Some(SendQueue::of(&sock));
            let io = Prefixed::new(bytes, sock);
            let tls = match tokio::time::timeout(left(), acceptor.accept(io)).await {
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
            let trusted = shared.trusts_forwarding(peer.ip());
            let info = Arc::new(ConnInfo::new(
                peer,
                true,
                Some(route),
                !h2,
                trusted,
                slot,
                queue,
            ));
            serve_http(shared, tls, info, h2, stop, None).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_a_head_is_found_across_reads() {
        assert!(blank_line(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(blank_line(b"\n\n"));
        assert!(blank_line(b"\n\r\n"));
        assert!(!blank_line(b"GET / HTTP/1.1\r\nHost: a\r\n"));
        assert!(!blank_line(b"\r\n\r"));
        assert!(!blank_line(b""));
        // As `http_via_mesh` reads: the two bytes before each chunk with it.
        let head = b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n\r\nbody";
        for split in 1..head.len() {
            let (a, b) = head.split_at(split);
            let mut seen = Vec::new();
            let mut found = None;
            for chunk in [a, b] {
                let from = seen.len().saturating_sub(2);
                seen.extend_from_slice(chunk);
                if found.is_none() && blank_line(&seen[from..]) {
                    found = Some(seen.len());
                }
            }
            assert!(found.is_some(), "split at {split}");
        }
    }

    /// A route's rate limit counts an IPv6 client by its /56: another /64
    /// of the same subscriber shares its bucket; another /56 does not.
    #[test]
    fn rate_limits_count_an_ipv6_subscriber_by_its_slash_56() {
        use crate::proxy::ratelimit::RateLimit;
        let l = Some(Arc::new(Mutex::new(Limiter::new(RateLimit {
            per_second: 1,
            burst: 1,
        }))));
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(over_limit(&l, ip("2001:db8:0:400::1")), None);
        assert!(limited(&l, ip("2001:db8:0:4ff::9")));
        assert!(over_limit(&l, ip("2001:db8:0:401::1")).is_some());
        assert_eq!(over_limit(&l, ip("2001:db8:0:500::1")), None);
        assert_eq!(over_limit(&l, ip("192.0.2.1")), None);
        assert!(over_limit(&l, ip("::ffff:192.0.2.1")).is_some());
    }

    /// A reload that keeps a route's upstreams applies a new
    /// `backend_down_for` to them; one that fails (a port it cannot bind)
    /// leaves it as it was, with the rest.
    #[tokio::test]
    async fn kept_upstreams_take_backend_down_for_only_from_a_reload_that_works() {
        use crate::proxy::settings::{RawProxy, RawRoute};
        let proxy: RawProxy = toml::from_str(
            "domains = [\"gw.test\"]\nhttp_listen = [\"127.0.0.1:0\"]\nhttps_listen = []\n",
        )
        .unwrap();
        let route = RawRoute {
            name: Some("app".into()),
            tls: Some("passthrough".into()),
            backends: vec!["192.0.2.1:443".into()],
            ..RawRoute::default()
        };
        let hub: [ipnet::IpNet; 1] = ["100.64.0.1/10".parse().unwrap()];
        let mut settings = crate::proxy::settings::validate(
            Some(proxy),
            vec![route],
            vec![],
            vec![],
            &hub,
            std::path::Path::new("/etc/gatewire"),
        )
        .unwrap()
        .unwrap();
        let p = Proxy::start(settings.clone()).await.unwrap();
        let up = || p.rt.current.load().routes[0].upstreams.clone();
        let first = up();
        let was = first.down_for();
        assert_ne!(was, Duration::from_secs(42));
        settings.limits.backend_down_for = Duration::from_secs(42);
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut bad = settings.clone();
        bad.http_listen.push(taken.local_addr().unwrap());
        assert!(p.reload(bad).await.is_err());
        assert!(Arc::ptr_eq(&first, &up()));
        assert_eq!(up().down_for(), was, "a failed reload changed it");
        assert_eq!(p.http_addrs().len(), 1);
        p.reload(settings).await.unwrap();
        assert!(Arc::ptr_eq(&first, &up()), "the upstreams are kept");
        assert_eq!(up().down_for(), Duration::from_secs(42));
    }

    /// A prepared reload changes nothing until it is committed: dropped,
    /// the listener it bound closes and the running routes stay; committed,
    /// its route and listener are in place.
    #[tokio::test]
    async fn a_prepared_reload_takes_effect_only_when_committed() {
        use crate::proxy::settings::{RawProxy, RawRoute};
        let proxy: RawProxy = toml::from_str(
            "domains = [\"gw.test\"]\nhttp_listen = [\"127.0.0.1:0\"]\nhttps_listen = []\n",
        )
        .unwrap();
        let route = |name: &str| RawRoute {
            name: Some(name.into()),
            tls: Some("passthrough".into()),
            backends: vec!["192.0.2.1:443".into()],
            ..RawRoute::default()
        };
        let hub: [ipnet::IpNet; 1] = ["100.64.0.1/10".parse().unwrap()];
        let settings = |routes: Vec<RawRoute>| {
            crate::proxy::settings::validate(
                Some(proxy.clone()),
                routes,
                vec![],
                vec![],
                &hub,
                std::path::Path::new("/etc/gatewire"),
            )
            .unwrap()
            .unwrap()
        };
        let p = Proxy::start(settings(vec![route("a")])).await.unwrap();
        let ids = || -> Vec<String> {
            p.rt.current
                .load()
                .routes
                .iter()
                .map(|r| r.id.clone())
                .collect()
        };
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let mut more = settings(vec![route("a"), route("b")]);
        more.http_listen.push(port);
        let prepared = p.prepare_reload(more.clone()).await.unwrap();
        assert!(
            std::net::TcpListener::bind(port).is_err(),
            "the new listener is bound when prepared"
        );
        assert_eq!(ids(), ["name:a"]);
        assert_eq!(p.http_addrs().len(), 1);
        drop(prepared);
        assert_eq!(ids(), ["name:a"]);
        assert_eq!(p.http_addrs().len(), 1);
        drop(std::net::TcpListener::bind(port).expect("closed when dropped"));
        let report = p.prepare_reload(more).await.unwrap().commit();
        assert_eq!(report.added, ["name:b"]);
        assert_eq!(ids(), ["name:a", "name:b"]);
        assert_eq!(p.http_addrs().len(), 2);
    }

    #[test]
    fn a_lower_connection_limit_holds_at_once_and_slots_come_back() {
        let c = Arc::new(ConnCount::new(3));
        // Busy connections (spliced): none makes room for another.
        let take = || {
            let (slot, made_room) = c.try_take(None)?;
            assert!(!made_room);
            slot.hold();
            Some(slot)
        };
        let mut open: Vec<_> = (0..3).map(|_| take().unwrap()).collect();
        assert!(c.try_take(None).is_none());
        // Shared by an upgraded connection's splice: given back by the last.
        let splice = open[0].clone();
        drop(open.remove(0));
        assert_eq!(c.open(), 3);
        drop(splice);
        assert_eq!(c.open(), 2);
        // A reload lowers the limit under what is open: nothing is cut, and
        // nothing new comes in until the open ones are under it.
        c.set_max(1);
        assert!(c.try_take(None).is_none());
        open.pop();
        assert!(c.try_take(None).is_none());
        open.pop();
        assert_eq!(c.open(), 0);
        let one = take().unwrap();
        assert!(c.try_take(None).is_none());
        c.set_max(2);
        assert!(take().is_some());
        drop(one);
        assert_eq!(c.open(), 0);
        assert!(c.table.lock().idle.is_empty());
    }

    #[test]
    fn full_connections_make_room_by_closing_the_one_idle_longest() {
        let e = || Arc::new(Eviction::default());
        let mut t = ConnTable::default();
        let (a, none) = t.open(3, e()).unwrap();
        assert!(none.is_none());
        let (b, _) = t.open(3, e()).unwrap();
        let (c, _) = t.open(3, e()).unwrap();
        // a busy (a request in flight), then b busy and idle again: c is
        // the one idle longest.
        t.busy(a);
        t.busy(b);
        t.done(b);
        let ce = t.open.get(&c).map(|o| Arc::clone(&o.eviction)).unwrap();
        let (d, gone) = t.open(3, e()).unwrap();
        assert!(Arc::ptr_eq(&gone.unwrap(), &ce));
        assert!(!t.open.contains_key(&c));
        // Then b, then (a done with its request) d, the newest's elder.
        assert!(t.open.contains_key(&b));
        let (_, gone) = t.open(3, e()).unwrap();
        assert!(gone.is_some() && !t.open.contains_key(&b));
        t.done(a);
        let (_, gone) = t.open(3, e()).unwrap();
        assert!(gone.is_some() && !t.open.contains_key(&d));
        assert!(t.open.contains_key(&a));
        // Two requests in flight on one (HTTP/2) connection: busy until both
        // are done. With every connection busy, a new one is refused.
        let ids: Vec<u64> = t.open.keys().copied().collect();
        for &id in &ids {
            t.busy(id);
        }
        t.busy(a);
        assert!(t.open(3, e()).is_none());
        t.done(a);
        assert!(t.open(3, e()).is_none());
        t.done(a);
        let (_, gone) = t.open(3, e()).unwrap();
        assert!(gone.is_some() && !t.open.contains_key(&a));
        // Closed connections are forgotten, idle or busy; a request ending
        // on one closed to make room changes nothing.
        t.done(a);
        for id in t.open.keys().copied().collect::<Vec<_>>() {
            t.close(id);
        }
        assert!(t.open.is_empty() && t.idle.is_empty());
    }

    /// An evicted connection learns it whether or not it is waiting yet; a
    /// connection served as HTTP is not cut from outside.
    #[tokio::test]
    async fn evicted_connections_are_told() {
        let c = Arc::new(ConnCount::new(1));
        let (old, _) = c.try_take(None).unwrap();
        let early = Arc::clone(&old.eviction);
        let waiting = tokio::spawn(async move { early.cut().await });
        tokio::task::yield_now().await;
        let (new, made_room) = c.try_take(None).unwrap();
        assert!(made_room);
        let t = Duration::from_secs(5);
        tokio::time::timeout(t, waiting).await.unwrap().unwrap();
        // Told after the fact too.
        tokio::time::timeout(t, old.eviction.evicted())
            .await
            .unwrap();
        assert_eq!(c.open(), 1);
        drop(old);
        assert_eq!(c.open(), 1, "the evicted slot was given up once");
        new.eviction.http.store(true, SeqCst);
        let (_, made_room) = c.try_take(None).unwrap();
        assert!(made_room);
        new.eviction.evicted().await;
        let cut = tokio::time::timeout(Duration::from_millis(100), new.eviction.cut()).await;
        assert!(cut.is_err(), "an HTTP connection closes itself");
    }

    /// A carried TLS tunnel gives the listener's connection slot back once
    /// the carrier has it: it counts not against `max_connections`, and the
    /// shutdown drain does not wait for it.
    #[tokio::test]
    async fn a_carried_tls_tunnel_holds_no_connection_slot() {
        use crate::carrier;
        struct Carrier(Arc<carrier::Hub>);
        impl TunnelLiveness for Carrier {
            fn tunnel_up(&self, _: std::net::IpAddr) -> Option<bool> {
                None
            }
            fn carrier(&self) -> Option<Arc<carrier::Hub>> {
                Some(self.0.clone())
            }
        }
        let dev = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let dev_addr = dev.local_addr().unwrap();
        let hub = Arc::new(carrier::Hub::new(move || dev_addr).unwrap());
        let settings = crate::proxy::settings::ProxySettings {
            domains: vec![],
            http_listen: vec![],
            https_listen: vec!["127.0.0.1:0".parse().unwrap()],
            routes: vec![],
            tcp: vec![],
            udp: vec![],
            limits: crate::proxy::settings::Limits {
                max_connections: 1,
                ..Default::default()
            },
            acme: None,
            access_log: None,
            proxy_protocol_from: None,
            trusted_proxies: None,
            dns: None,
        };
        let p = Proxy::start_with(settings, Some(Arc::new(Carrier(hub.clone()))))
            .await
            .unwrap();
        let at = carrier::Dial::Direct(p.https_addrs()[0]);
        let open = |n: u64| {
            let hub = hub.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(10), async {
                    while hub.counters.open.load(Relaxed) < n {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
                .await
                .expect("the carrier runs the tunnel");
            }
        };
        let cfg = carrier::client_config().unwrap();
        let t = Duration::from_secs(5);
        let one = carrier::connect(cfg.clone(), &at, "hub.example", t)
            .await
            .unwrap();
        open(1).await;
        assert_eq!(p.rt.conns.open(), 0);
        // A second one gets in too, though `max_connections` is 1.
        let two = carrier::connect(cfg, &at, "hub.example", t).await.unwrap();
        open(2).await;
        assert_eq!(p.rt.conns.open(), 0);
        let start = std::time::Instant::now();
        p.shutdown(Duration::from_secs(5)).await;
        assert!(start.elapsed() < Duration::from_secs(2));
        drop((one, two));
    }

    #[test]
    fn h2_preface_is_told_from_http1() {
        assert_eq!(is_h2_preface(&H2_PREFACE[..]), Some(true));
        assert_eq!(
            is_h2_preface(&[&H2_PREFACE[..], b"\0\0\x12\x04"].concat()),
            Some(true)
        );
        assert_eq!(is_h2_preface(b""), None);
        assert_eq!(is_h2_preface(b"PRI * HTTP/2"), None);
        for http1 in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /",
            b"PUT /",
            b"PATCH",
            b"PRI * HTTP/1.1\r\n",
        ] {
            assert_eq!(is_h2_preface(http1), Some(false), "{http1:?}");
        }
    }
}
