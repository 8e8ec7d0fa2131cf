//! Backend selection and connection: round-robin or least-connections over a
//! route's healthy backends, optional stickiness by client address, passive
//! health (a failed connect skips the backend for a while), active health checks
//! (TCP connect or HTTP GET), tunnel liveness (a backend behind a node whose
//! tunnel is silent counts as down), a per-route connection limit, TLS to
//! `https://` backends, and for HTTP/2 backends one shared connection each.

use crate::proxy::http::BackendCut;
use crate::proxy::settings::{
    Backend, BackendProtocol, BackendTls, Balance, HealthCheck, HealthKind, Limits, Policy,
    ProxyProtocol, Scheme,
};
use crate::proxy::stats::BackendHealth;
use parking_lot::Mutex;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use std::hash::{Hash, Hasher};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{debug, info, warn};

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
    /// The hub could not open a connection of its own (out of file
    /// descriptors, memory or local ports): no backend is blamed (503).
    #[error("no connection to backend {0}: {1}")]
    Local(SocketAddr, io::Error),
    /// TLS to the last backend tried failed after its TCP connect (502).
    #[error("TLS to backend {0} failed: {1}")]
    Tls(SocketAddr, TlsFailure),
}

/// Why the step after the TCP connect to a backend (TLS for `https://`
/// backends) failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsFailure {
    /// The handshake failed (the certificate did not verify, the backend
    /// closed or spoke something else).
    #[error("{0}")]
    Handshake(io::Error),
    /// The backend did not offer ALPN `h2` to an `http2` route.
    #[error("the backend did not agree to HTTP/2 (ALPN h2)")]
    NoH2,
}

/// How a failed TCP connect to one backend is taken.
#[derive(Debug, PartialEq, Eq)]
enum ConnectFailure {
    /// The hub's own shortage (file descriptors, buffers, memory): another
    /// backend would fail alike, so the plan stops and none is blamed.
    Hub,
    /// No local address to reach this backend from (`EADDRNOTAVAIL`: an
    /// address family or route the hub lacks, or its ports for this
    /// destination are all taken): the next backend may still be reached,
    /// and this one is not blamed.
    NoLocalAddress,
    /// The backend's (refused, unreachable): it is marked down.
    Backend,
}

fn connect_failure(e: &io::Error) -> ConnectFailure {
    match e.raw_os_error() {
        Some(libc::EADDRNOTAVAIL) => ConnectFailure::NoLocalAddress,
        _ if hub_side(e) => ConnectFailure::Hub,
        _ => ConnectFailure::Backend,
    }
}

/// Errors of a connect that are the hub's own (its limits), not the backend's.
fn hub_side(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// Which nodes' tunnels are alive; the hub implements it from its WireGuard peers.
pub trait TunnelLiveness: Send + Sync {
    /// `Some(false)` when `ip` is behind a node whose tunnel is down, `Some(true)`
    /// when it is up, `None` when no node carries `ip`.
    fn tunnel_up(&self, ip: IpAddr) -> Option<bool>;
    /// Where the HTTPS listeners hand nodes' tunnels carried over TLS, if the
    /// hub takes them.
    fn carrier(&self) -> Option<Arc<crate::carrier::Hub>> {
        None
    }
}

struct State {
    backend: Backend,
    down_until: Mutex<Option<Instant>>,
    failures: AtomicU64,
    /// Result of the active checks (true until a check says otherwise).
    check_ok: AtomicBool,
    checks_failed: AtomicU64,
    /// Open connections (HTTP: requests in flight); shared with the
    /// backend's state in the generations before and after a reload.
    active: Arc<AtomicUsize>,
    /// Idle HTTP/1.1 connections (keep-alive), newest last.
    idle: Mutex<Vec<(Instant, Pooled)>>,
    /// The shared HTTP/2 connections (`backend_protocol = "http2"`), oldest
    /// first: a new one is made only when every one is at the streams its
    /// peer allows (long gRPC streams hold theirs), up to [`H2_CONNS`].
    h2: Mutex<Vec<H2Conn>>,
    /// Held while a new HTTP/2 connection is being made, so that a burst of
    /// requests after an idle spell makes one connection, not one each.
    h2_connecting: tokio::sync::Mutex<()>,
    /// Connections held by client connections between their requests.
    held: AtomicUsize,
    /// When the backend last answered a request (ms since `Upstreams::epoch`).
    last_ok_ms: AtomicU64,
}

/// A keep-alive HTTP/1.1 connection to a backend: its sender, and how its
/// task is told to drop it (see [`BackendCut`]).
pub struct Pooled {
    /// Sends the connection's requests.
    pub sender: hyper::client::conn::http1::SendRequest<crate::proxy::http::ProxyBody>,
    /// Cuts the connection while it still carries a given exchange.
    pub cut: Arc<BackendCut>,
}

impl Pooled {
    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Whether the connection is idle: it can take a request now.
    pub fn is_ready(&self) -> bool {
        self.sender.is_ready()
    }

    /// Waits until the connection is idle (an error once it has closed).
    pub async fn ready(&mut self) -> hyper::Result<()> {
        self.sender.ready().await
    }
}

/// A handle on a backend's multiplexed HTTP/2 connection (cloned per request).
pub type H2Sender = hyper::client::conn::http2::SendRequest<crate::proxy::http::ProxyBody>;

/// Most HTTP/2 connections kept per backend; beyond them requests wait for a
/// stream on the least busy one.
pub const H2_CONNS: usize = 8;

/// A new HTTP/2 connection to a backend.
pub struct H2Link {
    /// Sends requests on it.
    pub sender: H2Sender,
    /// Streams the peer allows at once (its `SETTINGS_MAX_CONCURRENT_STREAMS`,
    /// kept current by the connection's task; 100 until it says).
    pub max_streams: Arc<AtomicUsize>,
}

/// One of a backend's shared HTTP/2 connections.
struct H2Conn {
    /// When it was made (ms since `Upstreams::epoch`).
    made_ms: u64,
    sender: H2Sender,
    max_streams: Arc<AtomicUsize>,
    /// Requests whose response has not ended (held by their leases).
    streams: Arc<AtomicUsize>,
}

impl H2Conn {
    fn has_room(&self) -> bool {
        self.streams.load(Relaxed) < self.max_streams.load(Relaxed).max(1)
    }
}

/// HTTP/2 PING interval on backend connections: a connection whose peer
/// stopped answering (a node gone without a FIN) is closed after this plus
/// `H2_PING_TIMEOUT`, even while idle.
const H2_PING_INTERVAL: Duration = Duration::from_secs(10);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// An HTTP/2 client connection over `io` (prior knowledge, or after ALPN
/// `h2`); the connection runs in its own task until every handle is dropped
/// and its streams have ended.
pub async fn h2_handshake<IO>(io: IO) -> Result<H2Link, hyper::Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .adaptive_window(true)
            .keep_alive_interval(H2_PING_INTERVAL)
            .keep_alive_timeout(H2_PING_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake::<_, crate::proxy::http::ProxyBody>(hyper_util::rt::TokioIo::new(io))
            .await?;
    let max_streams = Arc::new(AtomicUsize::new(conn.current_max_send_streams()));
    let max = max_streams.clone();
    let mut conn = Box::pin(conn);
    tokio::spawn(async move {
        // The peer's SETTINGS are read by a task of hyper's own; the limit
        // is copied out whenever this task runs (as requests go out) and on
        // a timer: every 25 ms at first (the SETTINGS arrive within the first
        // round trip), backing off to once a second.
        let mut period = Duration::from_millis(25);
        let mut tick = Box::pin(tokio::time::sleep(period));
        let done = std::future::poll_fn(|cx| {
            while std::future::Future::poll(tick.as_mut(), cx).is_ready() {
                period = (period * 2).min(Duration::from_secs(1));
                let at = tokio::time::Instant::now() + period;
                tick.as_mut().reset(at);
            }
            let p = std::future::Future::poll(conn.as_mut(), cx);
            max.store(conn.current_max_send_streams(), Relaxed);
            p
        });
        if let Err(e) = done.await {
            debug!(error = %e, "backend HTTP/2 connection ended");
        }
    });
    Ok(H2Link {
        sender,
        max_streams,
    })
}

/// Most idle connections kept per backend.
const POOL_MAX: usize = 1024;
/// An idle connection older than this is not reused (backends close idle
/// keep-alive connections on their own schedule).
const POOL_AGE: Duration = Duration::from_secs(15);
/// Idle connections are only reused while the backend answered within this
/// long: a pooled connection to a node that just died would wait for the
/// response timeout, a fresh connect fails over after the connect timeout.
const POOL_RECENT_MS: u64 = 1000;

/// A backend keep-alive connection held by one client connection between its
/// requests (HTTP/1.1: the last one; HTTP/2: one per finished stream): a later
/// request on that client connection reuses it without going through the
/// shared pool (no pool lock, no task to watch it).
pub struct Held {
    up: Arc<Upstreams>,
    addr: SocketAddr,
    sender: Pooled,
    at_ms: u64,
    slot: Option<HeldSlot>,
}

/// One of a backend's held connections (at most `POOL_MAX` per backend, so idle
/// client connections cannot pin an unbounded number of backend connections).
struct HeldSlot {
    up: Arc<Upstreams>,
    index: usize,
}

impl Drop for HeldSlot {
    fn drop(&mut self) {
        if let Some(s) = self.up.states.get(self.index) {
            s.held.fetch_sub(1, Relaxed);
        }
    }
}

impl Held {
    /// True when the client connection may keep it (the backend's held
    /// connections are under their bound).
    pub fn may_keep(&self) -> bool {
        self.slot.is_some()
    }

    /// Gives the connection to its backend's shared pool: at once when it is
    /// idle, else from a task once its response has been read to the end.
    pub fn release(self) {
        let Held {
            up,
            addr,
            sender,
            slot,
            ..
        } = self;
        drop(slot);
        if sender.is_closed() {
            return;
        }
        if sender.is_ready() {
            up.put_idle(addr, sender);
        } else if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let mut sender = sender;
            rt.spawn(async move {
                if sender.ready().await.is_ok() {
                    up.put_idle(addr, sender);
                }
            });
        }
    }
}

/// A route's (or forward's) backends.
pub struct Upstreams {
    states: Vec<State>,
    next: AtomicUsize,
    /// `backend_down_for` in milliseconds (a reload that keeps these
    /// upstreams sets it anew).
    down_for_ms: AtomicU64,
    balance: Balance,
    tunnels: Option<Arc<dyn TunnelLiveness>>,
    limit: Option<Arc<Semaphore>>,
    retired: AtomicBool,
    epoch: Instant,
    protocol: BackendProtocol,
}

/// One open connection to a backend; counts for least-connections until dropped.
pub struct Lease {
    up: Arc<Upstreams>,
    index: usize,
    /// The stream count of the HTTP/2 connection the request went on.
    stream: Option<Arc<AtomicUsize>>,
}

impl Lease {
    /// Counts a stream on `conn` until the lease is dropped.
    fn on_stream(mut self, streams: &Arc<AtomicUsize>) -> Lease {
        streams.fetch_add(1, Relaxed);
        self.stream = Some(streams.clone());
        self
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(s) = self.up.states.get(self.index) {
            s.active.fetch_sub(1, Relaxed);
        }
        if let Some(n) = &self.stream {
            n.fetch_sub(1, Relaxed);
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("index", &self.index).finish()
    }
}

fn sticky_score(client: IpAddr, b: &Backend) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    client.hash(&mut h);
    b.addr.hash(&mut h);
    h.finish()
}

impl Upstreams {
    /// `backends` must be non-empty for connects to succeed.
    pub fn new(
        backends: &[Backend],
        balance: &Balance,
        limits: &Limits,
        tunnels: Option<Arc<dyn TunnelLiveness>>,
    ) -> Self {
        Upstreams {
            states: backends
                .iter()
                .map(|b| State {
                    backend: *b,
                    down_until: Mutex::new(None),
                    failures: AtomicU64::new(0),
                    check_ok: AtomicBool::new(true),
                    checks_failed: AtomicU64::new(0),
                    active: Arc::new(AtomicUsize::new(0)),
                    idle: Mutex::new(Vec::new()),
                    h2: Mutex::new(Vec::new()),
                    h2_connecting: tokio::sync::Mutex::new(()),
                    held: AtomicUsize::new(0),
                    last_ok_ms: AtomicU64::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
            down_for_ms: AtomicU64::new(duration_ms(limits.backend_down_for)),
            balance: balance.clone(),
            tunnels,
            limit: balance.max_connections.map(|m| Arc::new(Semaphore::new(m))),
            retired: AtomicBool::new(false),
            epoch: Instant::now(),
            protocol: BackendProtocol::Http1,
        }
    }

    /// The same, speaking `protocol` to HTTP backends (health checks and
    /// connection sharing follow it).
    pub fn speaking(mut self, protocol: BackendProtocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// The same, carrying over from `old` (these backends before a reload
    /// changed their list or balancing) what is known of each backend it
    /// keeps, by address: marked down until when, failures, the active
    /// checks' verdict (when checks still run), and its open connections,
    /// counted together from now on so that least-connections and the limit
    /// see those opened before. The connection limit itself is kept when
    /// its size did not change. A reload that adds a backend thus does not
    /// send traffic again to one known to be down.
    pub fn inheriting(mut self, old: Option<&Upstreams>) -> Self {
        let Some(old) = old else {
            return self;
        };
        let checked = self.balance.health.is_some();
        for s in &mut self.states {
            let Some(o) = old.states.iter().find(|o| o.backend.addr == s.backend.addr) else {
                continue;
            };
            *s.down_until.get_mut() = *o.down_until.lock();
            *s.failures.get_mut() = o.failures.load(Relaxed);
            if checked {
                *s.check_ok.get_mut() = o.check_ok.load(Relaxed);
            }
            *s.checks_failed.get_mut() = o.checks_failed.load(Relaxed);
            s.active = Arc::clone(&o.active);
        }
        if old.balance.max_connections == self.balance.max_connections {
            self.limit = old.limit.clone();
        }
        self
    }

    /// The same, counting its connections against `other`'s limit (a
    /// route's path prefixes share the route's `max_connections`).
    pub fn sharing_limit(mut self, other: &Upstreams) -> Self {
        self.limit = other.limit.clone();
        self
    }

    /// Whether this counts against the same connection limit as `other`.
    pub fn shares_limit(&self, other: &Upstreams) -> bool {
        match (&self.limit, &other.limit) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// How long a backend that failed a connect is skipped.
    pub fn down_for(&self) -> Duration {
        Duration::from_millis(self.down_for_ms.load(Relaxed))
    }

    /// Sets how long a backend that failed a connect is skipped from now on
    /// (a reload kept these upstreams but changed `backend_down_for`).
    pub fn set_down_for(&self, d: Duration) {
        self.down_for_ms.store(duration_ms(d), Relaxed);
    }

    /// The HTTP version spoken to the backends.
    pub fn protocol(&self) -> BackendProtocol {
        self.protocol
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The backend `addr` just answered a request.
    pub fn note_ok(&self, addr: SocketAddr) {
        if let Some(s) = self.states.iter().find(|s| s.backend.addr == addr) {
            s.last_ok_ms.store(self.now_ms().max(1), Relaxed);
        }
    }

    /// The backends, in config order.
    pub fn backends(&self) -> Vec<Backend> {
        self.states.iter().map(|s| s.backend).collect()
    }

    /// The balancing settings this was built with.
    pub fn balance(&self) -> &Balance {
        &self.balance
    }

    /// Stops the active checks (the route left the config) and lets go of
    /// the shared HTTP/2 connections (each closes once its streams end) and
    /// of the idle HTTP/1.1 ones (closed now; connections that are busy or
    /// held by a client connection are not pooled again once done).
    pub fn retire(&self) {
        self.retired.store(true, Relaxed);
        for s in &self.states {
            s.h2.lock().clear();
            s.idle.lock().clear();
        }
    }

    /// A slot under the route's connection limit: `Err(())` when it is full,
    /// `Ok(None)` when there is no limit.
    #[allow(clippy::result_unit_err)]
    pub fn admit(&self) -> Result<Option<OwnedSemaphorePermit>, ()> {
        match &self.limit {
            None => Ok(None),
            Some(s) => s.clone().try_acquire_owned().map(Some).map_err(|_| ()),
        }
    }

    fn tunnel_ok(&self, s: &State) -> Option<bool> {
        self.tunnels
            .as_ref()
            .and_then(|t| t.tunnel_up(s.backend.addr.ip()))
    }

    fn usable(&self, s: &State, now: Instant) -> bool {
        s.down_until.lock().is_none_or(|t| t <= now)
            && s.check_ok.load(Relaxed)
            && self.tunnel_ok(s) != Some(false)
    }

    /// Healthy backends in the order to try them for one attempt: the
    /// healthy ones in turn, so that a backend that is down leaves its share
    /// to the others evenly.
    fn candidates(&self, client: Option<IpAddr>, now: Instant) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.states.len())
            .filter(|&i| self.states.get(i).is_some_and(|s| self.usable(s, now)))
            .collect();
        if v.is_empty() {
            return v;
        }
        let start = self.next.fetch_add(1, Relaxed) % v.len();
        v.rotate_left(start);
        match (self.balance.sticky, client) {
            (true, Some(ip)) => {
                v.sort_by_key(|&i| {
                    std::cmp::Reverse(
                        self.states
                            .get(i)
                            .map_or(0, |s| sticky_score(ip, &s.backend)),
                    )
                });
            }
            _ => {
                if self.balance.policy == Policy::LeastConn {
                    // Stable sort: ties keep the round-robin order.
                    v.sort_by_key(|&i| self.states.get(i).map_or(0, |s| s.active.load(Relaxed)));
                }
            }
        }
        v
    }

    fn lease(self: &Arc<Self>, index: usize) -> Lease {
        if let Some(s) = self.states.get(index) {
            s.active.fetch_add(1, Relaxed);
        }
        Lease {
            up: self.clone(),
            index,
            stream: None,
        }
    }

    /// Picks the next healthy backend without connecting (UDP).
    pub fn pick(self: &Arc<Self>, client: Option<IpAddr>) -> Option<(Backend, Lease)> {
        let c = self.candidates(client, Instant::now());
        let i = *c.first()?;
        let s = self.states.get(i)?;
        Some((s.backend, self.lease(i)))
    }

    /// Marks `addr` down (a failed connect or an ICMP refusal).
    pub fn mark_down(&self, addr: SocketAddr) {
        if let Some(s) = self.states.iter().find(|s| s.backend.addr == addr) {
            *s.down_until.lock() = Some(Instant::now() + self.down_for());
            s.failures.fetch_add(1, Relaxed);
            s.idle.lock().clear();
            s.h2.lock().clear();
        }
    }

    /// `addr` took a request and sent no response head within
    /// `response_timeout` (a backend that hangs but still accepts
    /// connections): skipped for `backend_down_for`, as after a failed
    /// connect, when another backend is usable now. One slow answer never
    /// takes out the last usable backend (a route with one backend keeps
    /// trying it). True when it was marked down.
    pub fn note_timeout(&self, addr: SocketAddr) -> bool {
        let now = Instant::now();
        let others = self
            .states
            .iter()
            .any(|s| s.backend.addr != addr && self.usable(s, now));
        if others {
            self.mark_down(addr);
        }
        others
    }

    /// Whether `addr` is one of these backends and usable now (not marked
    /// down, its check passing, its node's tunnel not down).
    pub fn serves(&self, addr: SocketAddr) -> bool {
        let now = Instant::now();
        self.states
            .iter()
            .any(|s| s.backend.addr == addr && self.usable(s, now))
    }

    fn mark_up(&self, i: usize) {
        if let Some(s) = self.states.get(i) {
            *s.down_until.lock() = None;
        }
    }

    /// Drops from `plan` the backends that are down now.
    pub fn keep_usable(&self, plan: &mut Vec<usize>) {
        let now = Instant::now();
        plan.retain(|&i| self.states.get(i).is_some_and(|s| self.usable(s, now)));
    }

    /// The backends to try for one request, best first.
    pub fn plan(&self, client: Option<IpAddr>) -> Vec<usize> {
        self.candidates(client, Instant::now())
    }

    /// An idle keep-alive connection to the first backend of `plan`, if any.
    pub fn take_idle(self: &Arc<Self>, plan: &[usize]) -> Option<(Pooled, Backend, Lease)> {
        let i = *plan.first()?;
        let s = self.states.get(i)?;
        let last = s.last_ok_ms.load(Relaxed);
        if last == 0 || self.now_ms().saturating_sub(last) > POOL_RECENT_MS {
            return None;
        }
        let mut idle = s.idle.lock();
        while let Some((at, sender)) = idle.pop() {
            if at.elapsed() < POOL_AGE && !sender.is_closed() && sender.is_ready() {
                drop(idle);
                return Some((sender, s.backend, self.lease(i)));
            }
        }
        None
    }

    /// A connection that just carried a request to `addr`, to be held by the
    /// client connection that sent it until that client's next request.
    pub fn hold(self: &Arc<Self>, addr: SocketAddr, sender: Pooled) -> Held {
        let slot = self
            .states
            .iter()
            .position(|s| s.backend.addr == addr)
            .and_then(|index| {
                let s = self.states.get(index)?;
                if s.held.fetch_add(1, Relaxed) >= POOL_MAX {
                    s.held.fetch_sub(1, Relaxed);
                    return None;
                }
                Some(HeldSlot {
                    up: self.clone(),
                    index,
                })
            });
        Held {
            up: self.clone(),
            addr,
            sender,
            at_ms: self.now_ms(),
            slot,
        }
    }

    /// Reuses `held` for the next request of the same client connection when it
    /// goes where `plan` would send the request anyway (same route generation,
    /// same first backend), is fresh and is idle; gives it back otherwise.
    pub fn reuse_held(
        self: &Arc<Self>,
        plan: &[usize],
        held: Held,
    ) -> Result<(Pooled, Backend, Lease), Held> {
        let Some(&i) = plan.first() else {
            return Err(held);
        };
        if !self.fits(plan, &held) {
            return Err(held);
        }
        let Some(s) = self.states.get(i) else {
            return Err(held);
        };
        let Held { sender, slot, .. } = held;
        drop(slot);
        Ok((sender, s.backend, self.lease(i)))
    }

    /// Whether `held` can carry a request planned as `plan` now (see
    /// `reuse_held`).
    pub fn fits(self: &Arc<Self>, plan: &[usize], held: &Held) -> bool {
        let Some(s) = plan.first().and_then(|&i| self.states.get(i)) else {
            return false;
        };
        let now = self.now_ms();
        let last = s.last_ok_ms.load(Relaxed);
        let fresh = now.saturating_sub(held.at_ms) < POOL_AGE.as_millis() as u64
            && last != 0
            && now.saturating_sub(last) <= POOL_RECENT_MS;
        Arc::ptr_eq(&held.up, self)
            && s.backend.addr == held.addr
            && fresh
            && !held.sender.is_closed()
            && held.sender.is_ready()
    }

    /// A shared HTTP/2 connection to the first backend of `plan` with a free
    /// stream (the oldest such), when it has one that is live and the backend
    /// answered within the last second; `None` when a new connection should be
    /// made. When every connection is full and there are [`H2_CONNS`], the
    /// least busy one (the request waits there for a stream). As for idle
    /// HTTP/1.1 connections, a request on a connection to a node that just
    /// died would wait for the response timeout; a fresh connect fails over.
    pub fn shared_h2(self: &Arc<Self>, plan: &[usize]) -> Option<(H2Sender, Backend, Lease)> {
        let i = *plan.first()?;
        let s = self.states.get(i)?;
        let last = s.last_ok_ms.load(Relaxed);
        let now = self.now_ms();
        let (sender, streams) = {
            let mut h2 = s.h2.lock();
            h2.retain(|c| !c.sender.is_closed());
            let recent = |c: &&H2Conn| now.saturating_sub(last.max(c.made_ms)) <= POOL_RECENT_MS;
            let pick = match h2.iter().filter(recent).find(|c| c.has_room()) {
                Some(c) => c,
                None if h2.len() < H2_CONNS => return None,
                None => h2
                    .iter()
                    .filter(recent)
                    .min_by_key(|c| c.streams.load(Relaxed))?,
            };
            (pick.sender.clone(), pick.streams.clone())
        };
        Some((sender, s.backend, self.lease(i).on_stream(&streams)))
    }

    /// Waits for the turn to make a new HTTP/2 connection to the first
    /// backend of `plan` (one at a time per backend).
    pub async fn h2_connect_turn(&self, plan: &[usize]) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        let s = self.states.get(*plan.first()?)?;
        Some(s.h2_connecting.lock().await)
    }

    /// Adds `link` to the shared HTTP/2 connections of the backend `lease`
    /// is on, and counts the lease's request on it. With [`H2_CONNS`]
    /// already, the oldest is let go (it closes once its streams end).
    pub fn add_h2(&self, link: &H2Link, lease: Lease) -> Lease {
        let streams = Arc::new(AtomicUsize::new(0));
        let lease = lease.on_stream(&streams);
        if self.retired.load(Relaxed) {
            return lease;
        }
        if let Some(s) = self.states.get(lease.index) {
            let mut h2 = s.h2.lock();
            if h2.len() >= H2_CONNS {
                h2.remove(0);
            }
            h2.push(H2Conn {
                made_ms: self.now_ms(),
                sender: link.sender.clone(),
                max_streams: link.max_streams.clone(),
                streams,
            });
        }
        lease
    }

    /// Forgets the shared HTTP/2 connection `lease`'s request went on (a
    /// request on it failed).
    pub fn drop_h2(&self, lease: &Lease) {
        let (Some(s), Some(n)) = (self.states.get(lease.index), &lease.stream) else {
            return;
        };
        s.h2.lock().retain(|c| !Arc::ptr_eq(&c.streams, n));
    }

    /// Keeps an idle keep-alive connection to `addr` for reuse.
    pub fn put_idle(&self, addr: SocketAddr, sender: Pooled) {
        if self.retired.load(Relaxed) {
            return;
        }
        if let Some(s) = self.states.iter().find(|s| s.backend.addr == addr) {
            let mut idle = s.idle.lock();
            idle.retain(|(at, p)| at.elapsed() < POOL_AGE && !p.is_closed());
            if idle.len() < POOL_MAX {
                idle.push((Instant::now(), sender));
            }
        }
    }

    /// Connects to the best healthy backend, trying the others on failure.
    pub async fn connect(
        self: &Arc<Self>,
        timeout: Duration,
        client: Option<IpAddr>,
    ) -> Result<(TcpStream, Backend, Lease), UpstreamError> {
        let plan = self.plan(client);
        self.connect_plan(&plan, timeout).await
    }

    /// Connects to the backends of `plan` in order until one accepts.
    pub async fn connect_plan(
        self: &Arc<Self>,
        plan: &[usize],
        timeout: Duration,
    ) -> Result<(TcpStream, Backend, Lease), UpstreamError> {
        self.connect_plan_with(plan, timeout, |tcp, _| std::future::ready(Ok(tcp)))
            .await
    }

    /// Connects to the backends of `plan` in order, running `step` (TLS) on
    /// each new connection, until one connects and passes `step`. Each
    /// backend gets `timeout` for the connect and `step` together; one that
    /// refuses, fails `step` or runs out of time is marked down and the next
    /// is tried.
    pub async fn connect_plan_with<T, F, Fut>(
        self: &Arc<Self>,
        plan: &[usize],
        timeout: Duration,
        mut step: F,
    ) -> Result<(T, Backend, Lease), UpstreamError>
    where
        F: FnMut(TcpStream, Backend) -> Fut,
        Fut: std::future::Future<Output = Result<T, TlsFailure>>,
    {
        /// Where one backend's attempt failed.
        enum Failed {
            Connect(io::Error),
            Step(TlsFailure),
        }
        let mut last = UpstreamError::NoHealthy;
        for &i in plan {
            let Some(s) = self.states.get(i) else {
                continue;
            };
            let addr = s.backend.addr;
            let lease = self.lease(i);
            let attempt = async {
                let tcp = TcpStream::connect(addr).await.map_err(Failed::Connect)?;
                let _ = tcp.set_nodelay(true);
                step(tcp, s.backend).await.map_err(Failed::Step)
            };
            match tokio::time::timeout(timeout, attempt).await {
                Ok(Ok(conn)) => {
                    self.mark_up(i);
                    return Ok((conn, s.backend, lease));
                }
                Ok(Err(Failed::Connect(e))) => match connect_failure(&e) {
                    ConnectFailure::Hub => {
                        // Another backend would fail alike: none is marked
                        // down for the hub's own shortage.
                        debug!(backend = %addr, error = %e, "no connection to the backend: the hub is out of resources");
                        return Err(UpstreamError::Local(addr, e));
                    }
                    ConnectFailure::NoLocalAddress => {
                        debug!(backend = %addr, error = %e, "no local address for the backend");
                        last = UpstreamError::Local(addr, e);
                    }
                    ConnectFailure::Backend => {
                        debug!(backend = %addr, error = %e, "backend connect failed");
                        self.mark_down(addr);
                        last = UpstreamError::Refused(addr, e);
                    }
                },
                Ok(Err(Failed::Step(e))) => {
                    debug!(backend = %addr, error = %e, "backend TLS failed");
                    self.mark_down(addr);
                    last = UpstreamError::Tls(addr, e);
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
                up: self.usable(s, now),
                failures: s.failures.load(Relaxed),
                active_connections: s.active.load(Relaxed) as u64,
                check: self.balance.health.as_ref().map(|_| {
                    if s.check_ok.load(Relaxed) {
                        "passing"
                    } else {
                        "failing"
                    }
                }),
                checks_failed: s.checks_failed.load(Relaxed),
                tunnel: self.tunnel_ok(s).map(|up| if up { "up" } else { "down" }),
                path: None,
            })
            .collect()
    }

    /// Starts the active health checks, if configured. The task ends when the
    /// upstreams are dropped or retired.
    pub fn spawn_checks(self: &Arc<Self>, tls: Option<Arc<BackendTlsClient>>, who: String) {
        let Some(hc) = self.balance.health.clone() else {
            return;
        };
        let weak: Weak<Upstreams> = Arc::downgrade(self);
        // Passthrough routes: the probe's own TLS, named as the route.
        let tls = match (&hc.kind, hc.send.tls_unverified) {
            (HealthKind::Http { .. }, true) => {
                let own = BackendTls {
                    ca: None,
                    server_name: hc.send.host.clone(),
                    insecure_skip_verify: true,
                };
                match BackendTlsClient::new(&own, BackendProtocol::Http1) {
                    Ok(c) => Some(Arc::new(c)),
                    Err(e) => {
                        warn!(route = %who, error = %e, "health checks not started");
                        return;
                    }
                }
            }
            _ => tls,
        };
        tokio::spawn(async move {
            let mut streak: Vec<i64> = Vec::new();
            let mut tick = tokio::time::interval(hc.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(up) = weak.upgrade() else { return };
                if up.retired.load(Relaxed) {
                    return;
                }
                streak.resize(up.states.len(), 0);
                let to = hc.timeout;
                let proto = up.protocol;
                let probes = up.states.iter().map(|s| {
                    let tls = tls.clone();
                    let hc = hc.clone();
                    let b = s.backend;
                    async move { probe(b, &hc, proto, tls.as_deref(), to).await }
                });
                let results = futures_join_all(probes).await;
                for ((s, ok), st) in up.states.iter().zip(results).zip(streak.iter_mut()) {
                    let was = s.check_ok.load(Relaxed);
                    match &ok {
                        Ok(()) => *st = if *st > 0 { *st + 1 } else { 1 },
                        Err(ProbeError::Hub(e)) => {
                            // Neither a success nor a failure of the backend.
                            debug!(route = %who, backend = %s.backend, error = %e, "health probe not made");
                            continue;
                        }
                        Err(ProbeError::Backend(_)) => {
                            *st = if *st < 0 { *st - 1 } else { -1 };
                            s.checks_failed.fetch_add(1, Relaxed);
                        }
                    }
                    if was && *st <= -i64::from(hc.fall) {
                        s.check_ok.store(false, Relaxed);
                        s.idle.lock().clear();
                        s.h2.lock().clear();
                        let e = ok.err().map(|e| e.to_string()).unwrap_or_default();
                        warn!(route = %who, backend = %s.backend, error = %e, "backend down (health check)");
                    } else if !was && *st >= i64::from(hc.rise) {
                        s.check_ok.store(true, Relaxed);
                        *s.down_until.lock() = None;
                        info!(route = %who, backend = %s.backend, "backend up (health check)");
                    }
                }
            }
        });
    }
}

/// `d` in whole milliseconds (saturating).
fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs futures concurrently and collects their outputs in order.
async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(v) => out.push(v),
            Err(_) => return out,
        }
    }
    out
}

/// The bytes an HTTP/1.1 health probe sends: `GET path`, the `Host`, the
/// route's own request headers.
fn probe_request(
    path: &str,
    host: &str,
    headers: &[(http::HeaderName, http::HeaderValue)],
) -> Vec<u8> {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n").into_bytes();
    for (n, v) in headers {
        req.extend_from_slice(n.as_str().as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(v.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    if !headers.iter().any(|(n, _)| n == http::header::USER_AGENT) {
        req.extend_from_slice(b"User-Agent: gatewire-health\r\n");
    }
    req.extend_from_slice(b"Connection: close\r\n\r\n");
    req
}

/// The PROXY header a probe starts with, if the route sends them: the
/// connection is the hub's own, so it names no client.
fn probe_proxy_header(pp: ProxyProtocol) -> Option<Vec<u8>> {
    match pp {
        ProxyProtocol::Off => None,
        ProxyProtocol::V1 => Some(b"PROXY UNKNOWN\r\n".to_vec()),
        ProxyProtocol::V2 => {
            let mut out = Vec::with_capacity(16);
            crate::proxy::proxy_protocol::encode_v2_local(&mut out);
            Some(out)
        }
    }
}

/// One health probe.
async fn probe(
    b: Backend,
    hc: &HealthCheck,
    proto: BackendProtocol,
    tls: Option<&BackendTlsClient>,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let work = async {
        let tcp = match TcpStream::connect(b.addr).await {
            Ok(t) => t,
            Err(e) if hub_side(&e) => return Err(ProbeError::Hub(format!("connect: {e}"))),
            Err(e) => return Err(ProbeError::Backend(format!("connect: {e}"))),
        };
        converse(b, hc, proto, tls, tcp)
            .await
            .map_err(ProbeError::Backend)
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(ProbeError::Backend("timed out".into())))
}

/// Why a probe failed.
#[derive(Debug, PartialEq, Eq)]
enum ProbeError {
    /// The backend did not answer as it should.
    Backend(String),
    /// The hub could not open a connection of its own (out of file
    /// descriptors, ports or memory): nothing is learnt of the backend.
    Hub(String),
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeError::Backend(e) => f.write_str(e),
            ProbeError::Hub(e) => write!(f, "{e} (the hub's own limit)"),
        }
    }
}

/// A probe's exchange on its connection.
async fn converse(
    b: Backend,
    hc: &HealthCheck,
    proto: BackendProtocol,
    tls: Option<&BackendTlsClient>,
    mut tcp: TcpStream,
) -> Result<(), String> {
    if let Some(h) = probe_proxy_header(hc.send.proxy_protocol) {
        tcp.write_all(&h)
            .await
            .map_err(|e| format!("proxy header: {e}"))?;
    }
    let HealthKind::Http { path } = &hc.kind else {
        return Ok(());
    };
    let host = match (&hc.send.host, b.addr) {
        (Some(h), _) => h.clone(),
        (None, SocketAddr::V4(a)) => a.to_string(),
        (None, SocketAddr::V6(a)) => format!("[{}]:{}", a.ip(), a.port()),
    };
    if proto == BackendProtocol::Http2 {
        return probe_h2(b, tcp, &host, path, &hc.send.headers, tls).await;
    }
    let req = probe_request(path, &host, &hc.send.headers);
    let mut head = [0u8; 16];
    let n = match (tls, b.scheme == Scheme::Https || hc.send.tls_unverified) {
        (Some(t), true) => {
            let mut s = t
                .connect(tcp, b.addr)
                .await
                .map_err(|e| format!("tls: {e}"))?;
            s.write_all(&req).await.map_err(|e| e.to_string())?;
            read_head(&mut s, &mut head).await?
        }
        _ => {
            let mut s = tcp;
            s.write_all(&req).await.map_err(|e| e.to_string())?;
            read_head(&mut s, &mut head).await?
        }
    };
    let line = head.get(..n).unwrap_or_default();
    // "HTTP/1.x NNN"
    match line.get(9) {
        Some(b'2') | Some(b'3') if line.starts_with(b"HTTP/1.") => Ok(()),
        _ => Err(format!(
            "answered `{}`",
            String::from_utf8_lossy(line).trim()
        )),
    }
}

/// An HTTP/2 health GET (prior knowledge, or ALPN `h2` on `https://`).
async fn probe_h2(
    b: Backend,
    tcp: TcpStream,
    host: &str,
    path: &str,
    headers: &[(http::HeaderName, http::HeaderValue)],
    tls: Option<&BackendTlsClient>,
) -> Result<(), String> {
    let mut link = match (tls, b.scheme) {
        (Some(t), Scheme::Https) => {
            let s = t
                .connect(tcp, b.addr)
                .await
                .map_err(|e| format!("tls: {e}"))?;
            if !speaks_h2(&s) {
                return Err("tls: the backend did not agree to HTTP/2 (ALPN h2)".into());
            }
            h2_handshake(s).await
        }
        _ => h2_handshake(tcp).await,
    }
    .map_err(|e| format!("http/2: {e}"))?;
    let sender = &mut link.sender;
    let scheme = if b.scheme == Scheme::Https {
        "https"
    } else {
        "http"
    };
    let mut req = http::Request::get(format!("{scheme}://{host}{path}"))
        .version(http::Version::HTTP_2)
        .header(http::header::USER_AGENT, "gatewire-health")
        .body(crate::proxy::http::empty_body())
        .map_err(|e| e.to_string())?;
    for (n, v) in headers {
        req.headers_mut().insert(n.clone(), v.clone());
    }
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("http/2: {e}"))?;
    let st = resp.status();
    if st.is_success() || st.is_redirection() {
        Ok(())
    } else {
        Err(format!("answered `{st}`"))
    }
}

/// True when TLS to a backend negotiated HTTP/2 (ALPN `h2`).
pub fn speaks_h2(s: &tokio_rustls::client::TlsStream<TcpStream>) -> bool {
    s.get_ref().1.alpn_protocol() == Some(b"h2")
}

async fn read_head<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut [u8; 16],
) -> Result<usize, String> {
    let mut n = 0;
    while n < 12 {
        let Some(rest) = buf.get_mut(n..) else { break };
        match s.read(rest).await {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(n)
}

/// The ring crypto provider every TLS config here uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts any server certificate: `backend_insecure_skip_verify = true`.
#[derive(Debug)]
pub(crate) struct DangerNoVerify(pub(crate) Arc<rustls::crypto::CryptoProvider>);

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

/// The PEM certificates in `path` (at least one); errors name the file.
pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
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
    /// `protocol` sets the ALPN offer: `http/1.1`, or `h2` alone.
    pub fn new(tls: &BackendTls, protocol: BackendProtocol) -> Result<Self, String> {
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
        cfg.alpn_protocols = match protocol {
            BackendProtocol::Http1 => vec![b"http/1.1".to_vec()],
            BackendProtocol::Http2 => vec![b"h2".to_vec()],
        };
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::proxy::http::ProxyBody;
    use crate::proxy::settings::Scheme;
    use hyper_util::rt::TokioIo;

    fn ups(ports: &[u16]) -> Arc<Upstreams> {
        let addrs: Vec<SocketAddr> = ports
            .iter()
            .map(|p| SocketAddr::from(([192, 0, 2, 1], *p)))
            .collect();
        ups_at(&addrs)
    }

    #[test]
    fn path_prefixes_share_the_route_limit() {
        let b = |p: u16| Backend {
            scheme: Scheme::Http,
            addr: SocketAddr::from(([192, 0, 2, 1], p)),
        };
        let bal = Balance {
            max_connections: Some(2),
            ..Balance::default()
        };
        let l = Limits::default();
        let route = Upstreams::new(&[b(1)], &bal, &l, None);
        let path = Upstreams::new(&[b(2)], &bal, &l, None).sharing_limit(&route);
        let alone = Upstreams::new(&[b(3)], &bal, &l, None);
        assert!(path.shares_limit(&route) && !alone.shares_limit(&route));
        let one = route.admit().unwrap();
        let two = path.admit().unwrap();
        assert!(route.admit().is_err() && path.admit().is_err());
        // Another route's limit is its own.
        assert!(alone.admit().is_ok());
        drop(one);
        assert!(path.admit().is_ok());
        drop(two);
        let none = Upstreams::new(&[b(4)], &Balance::default(), &l, None);
        let none_path = Upstreams::new(&[b(5)], &Balance::default(), &l, None).sharing_limit(&none);
        assert!(none_path.shares_limit(&none) && none_path.admit().unwrap().is_none());
    }

    /// An HTTP/1.1 client connection over an in-memory pipe (the far end
    /// stays open and silent).
    async fn sender() -> (Pooled, tokio::io::DuplexStream) {
        let (a, b) = tokio::io::duplex(4096);
        let (s, conn) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, ProxyBody>(TokioIo::new(a))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut s = Pooled {
            sender: s,
            cut: Arc::default(),
        };
        s.ready().await.unwrap();
        (s, b)
    }

    #[tokio::test]
    async fn held_connection_is_reused_only_where_the_plan_goes() {
        let up = ups(&[80, 81]);
        let a0 = SocketAddr::from(([192, 0, 2, 1], 80));
        let (s, _far) = sender().await;
        // The backend never answered: not reused (a dead node's connection
        // would wait for the response timeout).
        let h = up.hold(a0, s);
        assert!(h.may_keep());
        assert_eq!(up.states[0].held.load(Relaxed), 1);
        let h = up.reuse_held(&[0, 1], h).err().unwrap();
        up.note_ok(a0);
        // Another backend first in the plan: given back.
        let h = up.reuse_held(&[1, 0], h).err().unwrap();
        // Another generation of the route: given back.
        let other = ups(&[80, 81]);
        other.note_ok(a0);
        let h = other.reuse_held(&[0, 1], h).err().unwrap();
        // Same route, same backend, idle: reused, and counted as a connection.
        let (s, b, _lease) = up.reuse_held(&[0, 1], h).ok().unwrap();
        assert_eq!(b.addr, a0);
        assert_eq!(up.health()[0].active_connections, 1);
        assert_eq!(up.states[0].held.load(Relaxed), 0);
        // Released while idle: straight into the pool, taken from there.
        up.hold(a0, s).release();
        assert!(up.take_idle(&[0]).is_some());
    }

    #[tokio::test]
    async fn closed_held_connection_is_dropped() {
        let up = ups(&[80]);
        let a0 = SocketAddr::from(([192, 0, 2, 1], 80));
        up.note_ok(a0);
        let (s, far) = sender().await;
        drop(far);
        // Let the connection task see the close.
        for _ in 0..100 {
            if s.is_closed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(s.is_closed());
        let h = up.hold(a0, s);
        let h = up.reuse_held(&[0], h).err().unwrap();
        h.release();
        assert!(up.take_idle(&[0]).is_none());
        assert_eq!(up.states[0].held.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn held_connections_are_bounded_per_backend() {
        let up = ups(&[80]);
        let a0 = SocketAddr::from(([192, 0, 2, 1], 80));
        up.states[0].held.store(POOL_MAX, Relaxed);
        let (s, _far) = sender().await;
        let h = up.hold(a0, s);
        assert!(!h.may_keep());
        drop(h);
        assert_eq!(up.states[0].held.load(Relaxed), POOL_MAX);
    }

    /// A backend that reads one probe, records its bytes and answers with
    /// `status` when it carries `needle`, 404 otherwise.
    async fn probe_target(
        needle: &'static str,
        status: &'static str,
    ) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return got;
                }
                got.extend_from_slice(&buf[..n]);
            }
            let text = String::from_utf8_lossy(&got).to_string();
            let line = if text.contains(needle) {
                status
            } else {
                "404 Not Found"
            };
            let _ = s
                .write_all(format!("HTTP/1.1 {line}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                .await;
            got
        });
        (at, task)
    }

    fn http_check(send: crate::proxy::settings::ProbeSend) -> HealthCheck {
        HealthCheck {
            kind: HealthKind::Http { path: "/hz".into() },
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            fall: 1,
            rise: 1,
            send,
        }
    }

    #[tokio::test]
    async fn probes_carry_the_routes_host_headers_and_proxy_header() {
        let mut v = http::HeaderValue::from_static("s3cret");
        v.set_sensitive(true);
        let send = crate::proxy::settings::ProbeSend {
            host: Some("app.gw.example".into()),
            headers: vec![(http::HeaderName::from_static("x-key"), v)],
            proxy_protocol: ProxyProtocol::V2,
            tls_unverified: false,
        };
        let hc = http_check(send);
        let (at, task) = probe_target("Host: app.gw.example\r\n", "200 OK").await;
        let b = Backend {
            scheme: Scheme::Http,
            addr: at,
        };
        let r = probe(b, &hc, BackendProtocol::Http1, None, hc.timeout).await;
        assert_eq!(r, Ok(()));
        let got = task.await.unwrap();
        let mut local = Vec::new();
        crate::proxy::proxy_protocol::encode_v2_local(&mut local);
        assert!(got.starts_with(&local), "{got:?}");
        let text = String::from_utf8_lossy(&got[local.len()..]).to_string();
        assert!(text.starts_with("GET /hz HTTP/1.1\r\n"), "{text}");
        assert!(text.contains("\r\nx-key: s3cret\r\n"), "{text}");
        assert!(text.contains("User-Agent: gatewire-health"), "{text}");

        // A virtual host that is not the route's answers 404: the probe fails
        // and says what it heard.
        let (at, task) = probe_target("Host: other.example\r\n", "200 OK").await;
        let b = Backend {
            scheme: Scheme::Http,
            addr: at,
        };
        let r = probe(b, &hc, BackendProtocol::Http1, None, hc.timeout).await;
        let Err(ProbeError::Backend(e)) = r else {
            panic!("{r:?}")
        };
        assert!(e.starts_with("answered `HTTP/1.1 404"), "{e}");
        drop(task);

        // Forwards: no name, the backend's address is the host; v1 says UNKNOWN.
        let hc = http_check(crate::proxy::settings::ProbeSend {
            proxy_protocol: ProxyProtocol::V1,
            ..Default::default()
        });
        let (at, task) = probe_target("\r\nHost: 127.0.0.1:", "204 No Content").await;
        let b = Backend {
            scheme: Scheme::Http,
            addr: at,
        };
        let r = probe(b, &hc, BackendProtocol::Http1, None, hc.timeout).await;
        assert_eq!(r, Ok(()));
        let got = task.await.unwrap();
        assert!(
            got.starts_with(b"PROXY UNKNOWN\r\nGET /hz HTTP/1.1\r\n"),
            "{got:?}"
        );
    }

    /// Upstreams over `addrs` (plain HTTP).
    fn ups_at(addrs: &[SocketAddr]) -> Arc<Upstreams> {
        let backends: Vec<Backend> = addrs
            .iter()
            .map(|a| Backend {
                scheme: Scheme::Http,
                addr: *a,
            })
            .collect();
        Arc::new(Upstreams::new(
            &backends,
            &Balance::default(),
            &Limits::default(),
            None,
        ))
    }

    #[tokio::test]
    async fn a_backend_failing_or_stalling_its_tls_step_is_marked_down_and_the_next_tried() {
        let la = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let lb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
        let t = Duration::from_millis(300);
        // The step fails on the first backend.
        let up = ups_at(&[a, b]);
        let fails_on_a = |tcp: TcpStream, be: Backend| async move {
            if be.addr == a {
                Err(TlsFailure::Handshake(io::Error::other("bad certificate")))
            } else {
                Ok(tcp)
            }
        };
        let (_, got, _lease) = up.connect_plan_with(&[0, 1], t, fails_on_a).await.unwrap();
        assert_eq!(got.addr, b);
        let h = up.health();
        assert!(!h[0].up && h[1].up, "{h:?}");
        assert_eq!((h[0].failures, h[1].failures), (1, 0));
        // The step never ends on the first backend: its time runs out (the
        // connect and the step share it), then the next one is tried.
        let up = ups_at(&[a, b]);
        let stalls_on_a = |tcp: TcpStream, be: Backend| async move {
            if be.addr == a {
                std::future::pending::<()>().await;
            }
            Ok(tcp)
        };
        let (_, got, _lease) = up.connect_plan_with(&[0, 1], t, stalls_on_a).await.unwrap();
        assert_eq!(got.addr, b);
        assert!(!up.health()[0].up);
        // Every backend fails the step: the last failure is the answer.
        let up = ups_at(&[a, b]);
        let r = up
            .connect_plan_with(&[0, 1], t, |_, _| async {
                Err::<TcpStream, _>(TlsFailure::NoH2)
            })
            .await;
        assert!(
            matches!(r, Err(UpstreamError::Tls(at, TlsFailure::NoH2)) if at == b),
            "{r:?}"
        );
        assert!(up.health().iter().all(|h| !h.up));
    }

    #[test]
    fn round_robin_shares_a_down_backends_turn_evenly() {
        for policy in [Policy::RoundRobin, Policy::LeastConn] {
            let up = ups(&[80, 81, 82]);
            let up = Arc::new(Upstreams::new(
                &up.backends(),
                &Balance {
                    policy,
                    ..Balance::default()
                },
                &Limits::default(),
                None,
            ));
            up.mark_down(SocketAddr::from(([192, 0, 2, 1], 81)));
            let mut firsts = [0; 3];
            for _ in 0..300 {
                let plan = up.plan(None);
                assert_eq!(plan.len(), 2);
                firsts[plan[0]] += 1;
            }
            assert_eq!(firsts, [150, 0, 150], "{policy:?}");
        }
    }

    #[tokio::test]
    async fn retiring_closes_the_idle_pool() {
        let up = ups(&[80]);
        let a0 = SocketAddr::from(([192, 0, 2, 1], 80));
        let (s, mut far) = sender().await;
        up.put_idle(a0, s);
        assert_eq!(up.states[0].idle.lock().len(), 1);
        up.retire();
        assert!(up.states[0].idle.lock().is_empty());
        // The connection is closed: its far end reads the end.
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), far.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn backend_down_for_can_change_on_kept_upstreams() {
        let up = ups(&[80]);
        assert_eq!(up.down_for(), Limits::default().backend_down_for);
        up.set_down_for(Duration::from_secs(60));
        let before = Instant::now();
        up.mark_down(SocketAddr::from(([192, 0, 2, 1], 80)));
        let until = up.states[0].down_until.lock().unwrap();
        assert!(until >= before + Duration::from_secs(60), "{until:?}");
    }

    #[test]
    fn only_the_hubs_own_shortage_stops_a_plan() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(connect_failure(&e(libc::EMFILE)), ConnectFailure::Hub);
        assert_eq!(connect_failure(&e(libc::ENOBUFS)), ConnectFailure::Hub);
        assert_eq!(
            connect_failure(&e(libc::EADDRNOTAVAIL)),
            ConnectFailure::NoLocalAddress
        );
        assert_eq!(
            connect_failure(&e(libc::ECONNREFUSED)),
            ConnectFailure::Backend
        );
        assert_eq!(
            connect_failure(&e(libc::EHOSTUNREACH)),
            ConnectFailure::Backend
        );
    }

    #[test]
    fn a_route_user_agent_replaces_the_probes() {
        let ua = (
            http::header::USER_AGENT,
            http::HeaderValue::from_static("monitor/1"),
        );
        let req = String::from_utf8(probe_request("/", "a.example", &[ua])).unwrap();
        assert_eq!(
            req,
            "GET / HTTP/1.1\r\nHost: a.example\r\nuser-agent: monitor/1\r\nConnection: close\r\n\r\n"
        );
    }
}
