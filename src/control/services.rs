//! Node side of the services API (docs/control.md, "Node side").
//!
//! * **Forwarders**: a `[[service]]` whose `local` address is neither an
//!   overlay address of the node nor unspecified is not reachable from the
//!   hub; the node listens on each of its overlay addresses at the service's
//!   `port` and forwards TCP connections (or UDP flows) to `local`.
//! * **Registration**: for each `[[hub]]` with `control`, a task declares the
//!   whole service set with `PUT http://<control>/v1/services` when the tunnel
//!   comes up, again every 30 s, and at once when the set changes; it retries
//!   failures with backoff and logs each service's status once per change.
//!
//! Pure parts, unit-tested: [`declaration`] (the JSON body), [`plan`] (which
//! forwarders), [`changes`] (what to log), [`Schedule`] (when to try).

use crate::config::{NodeConfig, NodeHub, NodeService, ServiceHost, ServiceProtocol, ServiceTls};
use crate::keys::PublicKey;
use crate::proxy::io::Activity;
use crate::proxy::stats::{Counters, ErrorKind};
use crate::wg::device::Inner;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Between declarations that succeeded.
pub const REFRESH_MS: u64 = 30_000;
/// First retry after a failure; doubles up to [`MAX_BACKOFF_MS`].
pub const RETRY_MS: u64 = 5_000;
pub const MAX_BACKOFF_MS: u64 = 60_000;
/// One declaration (connect, request, answer) may take this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest answer read from the hub.
const MAX_ANSWER: usize = 1024 * 1024;
/// Forwarders: connect to `local` within this, close after this long idle.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const TCP_IDLE: Duration = Duration::from_secs(3600);
const MAX_CONNECTIONS: usize = 1024;
const MAX_UDP_FLOWS: usize = 1024;
const UDP_IDLE: Duration = Duration::from_secs(120);

// ------------------------------------------------------------ wire

/// A service as the node declares it (`Service` in docs/control.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceDecl {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fqdn: Option<String>,
    pub protocol: ServiceProtocol,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServiceTls>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_port: Option<u16>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub proxy_protocol: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub http2: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

impl From<&NodeService> for ServiceDecl {
    fn from(s: &NodeService) -> Self {
        let (name, fqdn) = match &s.host {
            ServiceHost::Name(l) => (Some(l.as_str().to_string()), None),
            ServiceHost::Fqdn(d) => (None, Some(d.as_str().to_string())),
        };
        ServiceDecl {
            name,
            fqdn,
            protocol: s.protocol,
            port: s.port,
            tls: s.tls,
            public_port: s.public_port,
            proxy_protocol: s.proxy_protocol,
            http2: s.http2,
            allow: s.allow.clone(),
            deny: s.deny.clone(),
        }
    }
}

#[derive(Serialize)]
struct Declaration {
    services: Vec<ServiceDecl>,
}

/// The body of `PUT /v1/services`: `{"services": [Service]}`.
pub fn declaration(services: &[NodeService]) -> Vec<u8> {
    let d = Declaration {
        services: services.iter().map(ServiceDecl::from).collect(),
    };
    // Plain strings, integers and booleans always serialise.
    serde_json::to_vec(&d).unwrap_or_default()
}

/// The hub's view of one declared service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ServiceStatus {
    pub host: String,
    /// `active` or `refused`.
    pub status: String,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub backend: Option<String>,
}

#[derive(Deserialize)]
struct Statuses {
    services: Vec<ServiceStatus>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

// ------------------------------------------------------------ what to log

/// A change in what the hub says about one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Active {
        host: String,
        backend: Option<String>,
    },
    Refused {
        host: String,
        error: String,
    },
    /// A status this node does not know (a newer hub).
    Other {
        host: String,
        status: String,
    },
    /// The hub no longer lists it.
    Gone {
        host: String,
    },
}

/// What changed between the statuses last logged (`old`, by host) and the
/// hub's latest answer; `old` becomes the latest answer.
pub fn changes(old: &mut BTreeMap<String, ServiceStatus>, new: &[ServiceStatus]) -> Vec<Event> {
    let mut out = Vec::new();
    let mut next = BTreeMap::new();
    for s in new {
        if old.get(&s.host) != Some(s) && !next.contains_key(&s.host) {
            out.push(match s.status.as_str() {
                "active" => Event::Active {
                    host: s.host.clone(),
                    backend: s.backend.clone(),
                },
                "refused" => Event::Refused {
                    host: s.host.clone(),
                    error: s
                        .error
                        .clone()
                        .unwrap_or_else(|| "no reason given".to_string()),
                },
                other => Event::Other {
                    host: s.host.clone(),
                    status: other.to_string(),
                },
            });
        }
        next.insert(s.host.clone(), s.clone());
    }
    for host in old.keys() {
        if !next.contains_key(host) {
            out.push(Event::Gone { host: host.clone() });
        }
    }
    *old = next;
    out
}

fn log_event(hub: &str, e: &Event) {
    match e {
        Event::Active { host, backend } => {
            info!(hub, service = %host, backend = backend.as_deref().unwrap_or("-"), "service active")
        }
        Event::Refused { host, error } => {
            warn!(hub, service = %host, error = %error, "hub refused service")
        }
        Event::Other { host, status } => {
            info!(hub, service = %host, status = %status, "service status")
        }
        Event::Gone { host } => info!(hub, service = %host, "service no longer listed by the hub"),
    }
}

// ------------------------------------------------------------ when to declare

/// When the next declaration is due. Times are milliseconds on any
/// monotonic clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    next_ms: u64,
    backoff_ms: u64,
}

impl Schedule {
    /// Due at once.
    pub fn new(now_ms: u64) -> Self {
        Schedule {
            next_ms: now_ms,
            backoff_ms: RETRY_MS,
        }
    }
    pub fn due(&self, now_ms: u64) -> bool {
        now_ms >= self.next_ms
    }
    /// The hub took the declaration: refresh in [`REFRESH_MS`].
    pub fn succeeded(&mut self, now_ms: u64) {
        self.next_ms = now_ms.saturating_add(REFRESH_MS);
        self.backoff_ms = RETRY_MS;
    }
    /// It failed: retry after the backoff, which doubles up to [`MAX_BACKOFF_MS`].
    pub fn failed(&mut self, now_ms: u64) {
        self.next_ms = now_ms.saturating_add(self.backoff_ms);
        self.backoff_ms = (self.backoff_ms * 2).min(MAX_BACKOFF_MS);
    }
    /// The tunnel came up or the services changed: declare now.
    pub fn now(&mut self, now_ms: u64) {
        self.next_ms = now_ms;
        self.backoff_ms = RETRY_MS;
    }
    /// Milliseconds until due.
    pub fn wait_ms(&self, now_ms: u64) -> u64 {
        self.next_ms.saturating_sub(now_ms)
    }
}

/// Whether the tunnel to a hub is up: something arrived within `dead_after_ms`.
pub fn tunnel_up(now_ms: u64, last_rx_ms: u64, dead_after_ms: u64) -> bool {
    last_rx_ms > 0 && now_ms.saturating_sub(last_rx_ms) < dead_after_ms
}

// ------------------------------------------------------------ the request

/// Declares `body` to the services API at `control`; the statuses on success,
/// a message naming the problem otherwise.
pub async fn put_services(
    control: SocketAddr,
    body: Vec<u8>,
) -> Result<Vec<ServiceStatus>, String> {
    let work = async {
        let tcp = TcpStream::connect(control)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
                .await
                .map_err(|e| format!("HTTP: {e}"))?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::builder()
            .method(hyper::Method::PUT)
            .uri("/v1/services")
            .header(hyper::header::HOST, control.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        conn.abort();
        if status.is_success() {
            serde_json::from_slice::<Statuses>(&bytes)
                .map(|s| s.services)
                .map_err(|e| format!("answer ({status}): {e}"))
        } else {
            let msg = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| {
                    String::from_utf8_lossy(bytes.get(..200).unwrap_or(&bytes)).into_owned()
                });
            Err(format!("{status}: {msg}"))
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}s", REQUEST_TIMEOUT.as_secs())))
}

async fn register(
    dev: Arc<Inner>,
    hub_key: PublicKey,
    hub: String,
    control: SocketAddr,
    mut services: watch::Receiver<Vec<NodeService>>,
    dead_after_ms: u64,
) {
    let mut sched = Schedule::new(dev.now_ms());
    let mut statuses = BTreeMap::new();
    let mut was_up = false;
    let mut last_error: Option<String> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = services.changed() => {
                if r.is_err() {
                    return;
                }
                sched.now(dev.now_ms());
            }
        }
        let now = dev.now_ms();
        let up = dev
            .peer(&hub_key)
            .is_some_and(|p| tunnel_up(now, p.last_two_way_ms(), dead_after_ms));
        if up && !was_up {
            sched.now(now);
        }
        was_up = up;
        if !sched.due(now) {
            continue;
        }
        let body = declaration(&services.borrow_and_update());
        match put_services(control, body).await {
            Ok(st) => {
                sched.succeeded(dev.now_ms());
                if last_error.take().is_some() {
                    info!(hub = %hub, %control, "services declared");
                }
                for e in changes(&mut statuses, &st) {
                    log_event(&hub, &e);
                }
            }
            Err(e) => {
                sched.failed(dev.now_ms());
                let retry_s = sched.wait_ms(dev.now_ms()) / 1000;
                if last_error.as_deref() != Some(e.as_str()) {
                    warn!(hub = %hub, %control, error = %e, retry_s, "cannot declare services");
                } else {
                    debug!(hub = %hub, %control, error = %e, retry_s, "cannot declare services");
                }
                last_error = Some(e);
            }
        }
    }
}

// ------------------------------------------------------------ forwarders

/// One forwarder: listen on `listen`, forward to `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardPlan {
    pub listen: SocketAddr,
    pub target: SocketAddr,
    pub udp: bool,
    /// The service's name, for logs.
    pub service: String,
    /// Which sources it takes (`None`: every one).
    pub admit: Option<Arc<Admit>>,
}

/// Which sources a forwarder takes. A forwarded service listens where only
/// the node reaches it (loopback, say): on the overlay it answers its hubs,
/// whose proxies connect to it, and not the other nodes a hub routes to this
/// one, which would reach a service its owner kept local. The overlay is
/// the node's own networks and each hub's: the longest prefix of a hub's
/// `allowed_ips` that holds one of its addresses (a hub with two overlay
/// networks has both, also the one the node has no address in; a default
/// route is no network). Sources outside it (IPv4 clients translated on the
/// hub, from its NAT64 `pool6`, say) are taken. So are
/// other nodes' packets that a hub's translator carries (from its NAT64
/// pool4, or an EAM IPv4 address), which the node is not told apart: the
/// hub's `node_to_node` ("off", or "kernel" and its firewall) keeps those
/// away, as it does untranslated ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admit {
    /// The overlay networks: the node's own and its hubs'.
    overlay: Vec<IpNet>,
    /// The hubs' addresses in them.
    hubs: Vec<IpAddr>,
}

impl Admit {
    /// `None` (every source) while a `[[hub]]` lists no `addresses`: its
    /// proxy's source address is then unknown.
    pub fn of(cfg: &NodeConfig) -> Option<Arc<Admit>> {
        if cfg.hubs.is_empty() || cfg.hubs.iter().any(|h| h.addresses.is_empty()) {
            return None;
        }
        let mut hubs: Vec<IpAddr> = Vec::new();
        let mut overlay: Vec<IpNet> = cfg.addresses.iter().map(IpNet::trunc).collect();
        for h in &cfg.hubs {
            for a in h.addresses.iter().copied().chain(h.control.map(|c| c.ip())) {
                let a = a.to_canonical();
                hubs.push(a);
                let net = h
                    .allowed_ips
                    .iter()
                    .map(IpNet::trunc)
                    .filter(|n| n.prefix_len() > 0 && n.contains(&a))
                    .max_by_key(IpNet::prefix_len);
                if let Some(n) = net {
                    if !overlay.contains(&n) {
                        overlay.push(n);
                    }
                }
            }
        }
        Some(Arc::new(Admit { overlay, hubs }))
    }

    pub fn admits(&self, from: IpAddr) -> bool {
        let from = from.to_canonical();
        self.hubs.contains(&from) || !self.overlay.iter().any(|n| n.contains(&from))
    }
}

/// Whether the forwarder takes `from`; a refused source is counted
/// (`denied`).
fn admitted(p: &ForwardPlan, from: SocketAddr, counters: &Counters) -> bool {
    let ok = p.admit.as_ref().is_none_or(|a| a.admits(from.ip()));
    if !ok {
        counters.error(ErrorKind::Denied);
        debug!(service = %p.service, %from, "forwarder refuses a source that is not a hub");
    }
    ok
}

/// Whether `s` needs a forwarder: its `local` address is neither unspecified
/// nor one of the node's overlay addresses.
pub fn needs_forwarder(s: &NodeService, overlay: &[IpNet]) -> bool {
    let ip = s.local.ip();
    !ip.is_unspecified() && !overlay.iter().any(|n| n.addr() == ip)
}

/// The forwarders for `services` on the overlay addresses `overlay`, one per
/// (address, port, transport).
pub fn plan(
    services: &[NodeService],
    overlay: &[IpNet],
    admit: Option<&Arc<Admit>>,
) -> Vec<ForwardPlan> {
    let mut out: Vec<ForwardPlan> = Vec::new();
    for s in services.iter().filter(|s| needs_forwarder(s, overlay)) {
        let udp = s.protocol == ServiceProtocol::Udp;
        for a in overlay {
            let listen = SocketAddr::new(a.addr(), s.port);
            if out.iter().any(|p| p.listen == listen && p.udp == udp) {
                continue;
            }
            out.push(ForwardPlan {
                listen,
                target: s.local,
                udp,
                service: s.host.to_string(),
                admit: admit.cloned(),
            });
        }
    }
    out
}

/// Binds on an overlay address that may not be configured yet (the TUN is
/// new, IPv6 may still be tentative): IP_FREEBIND.
fn bind(addr: SocketAddr, udp: bool) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    let ty = if udp { Type::DGRAM } else { Type::STREAM };
    let s = Socket::new(Domain::for_address(addr), ty, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
        let _ = s.set_freebind_ipv6(true);
    } else {
        let _ = s.set_freebind(true);
    }
    if !udp {
        s.set_reuse_address(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    if !udp {
        s.listen(1024)?;
    }
    Ok(s)
}

/// Binds, retrying with backoff (the port may be held briefly by a previous
/// run); logs the first failure and the recovery.
async fn bind_retrying(p: &ForwardPlan) -> socket2::Socket {
    let mut delay = Duration::from_secs(1);
    let mut warned = false;
    loop {
        match bind(p.listen, p.udp) {
            Ok(s) => {
                info!(service = %p.service, listen = %p.listen, target = %p.target,
                      proto = if p.udp { "udp" } else { "tcp" }, "service forwarder");
                return s;
            }
            Err(e) => {
                if !warned {
                    warn!(service = %p.service, listen = %p.listen, error = %e,
                          "cannot listen for the service forwarder; retrying");
                    warned = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Forwards the TCP connections the plan's listener takes. Each connection
/// ends with the forwarder: when `stop`'s sender (held by [`Forwarder`]) is
/// dropped, the service was removed or changed.
async fn tcp_forwarder(p: ForwardPlan, counters: Arc<Counters>, stop: watch::Receiver<()>) {
    let s = bind_retrying(&p).await;
    let l = match TcpListener::from_std(s.into()) {
        Ok(l) => l,
        Err(e) => {
            warn!(service = %p.service, listen = %p.listen, error = %e, "service forwarder");
            return;
        }
    };
    let sem = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (client, from) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                debug!(listen = %p.listen, error = %e, "accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !admitted(&p, from, &counters) {
            continue;
        }
        let Ok(permit) = sem.clone().try_acquire_owned() else {
            counters.error(ErrorKind::OverCapacity);
            debug!(listen = %p.listen, "forwarder at its connection limit");
            continue;
        };
        counters.connection();
        let (target, service, counters) = (p.target, p.service.clone(), counters.clone());
        let mut stop = stop.clone();
        let conn = async move {
            let backend = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
                .await
            {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    counters.error(ErrorKind::BackendRefused);
                    debug!(service, %from, %target, error = %e, "forwarder cannot reach the service");
                    return;
                }
                Err(_) => {
                    counters.error(ErrorKind::BackendTimeout);
                    debug!(service, %from, %target, "forwarder connect timed out");
                    return;
                }
            };
            let _ = client.set_nodelay(true);
            let _ = backend.set_nodelay(true);
            let queue = Some(crate::proxy::stall::SendQueue::of(&client));
            if let Err(e) =
                crate::proxy::io::splice(client, backend, counters, TCP_IDLE, None, queue)
                    .await
                    .result
            {
                debug!(service, %from, error = %e, "forwarded connection ended");
            }
        };
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                () = conn => {}
                _ = stop.changed() => debug!(%from, "forwarder stopped: its connection closed"),
            }
        });
    }
}

struct Flow {
    sock: Arc<UdpSocket>,
    activity: Activity,
    task: JoinHandle<()>,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn new_flow(
    listen: Arc<UdpSocket>,
    target: SocketAddr,
    client: SocketAddr,
    counters: Arc<Counters>,
) -> std::io::Result<Flow> {
    let any: IpAddr = if target.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let sock = UdpSocket::bind(SocketAddr::new(any, 0)).await?;
    sock.connect(target).await?;
    let sock = Arc::new(sock);
    let activity = Activity::new();
    let (s2, a2) = (sock.clone(), activity.clone());
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        loop {
            match s2.recv(&mut buf).await {
                Ok(n) => {
                    let Some(d) = buf.get(..n) else { continue };
                    a2.touch();
                    counters.add_out(n as u64);
                    if listen.send_to(d, client).await.is_err() {
                        counters.error(ErrorKind::ClientAborted);
                    }
                }
                // ECONNREFUSED (nothing listens on `local`) ends the flow.
                Err(_) => return,
            }
        }
    });
    Ok(Flow {
        sock,
        activity,
        task,
    })
}

async fn udp_forwarder(p: ForwardPlan, counters: Arc<Counters>) {
    let s = bind_retrying(&p).await;
    let listen = match UdpSocket::from_std(s.into()) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            warn!(service = %p.service, listen = %p.listen, error = %e, "service forwarder");
            return;
        }
    };
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut buf = vec![0u8; 65535];
    let mut sweep = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            r = listen.recv_from(&mut buf) => {
                let Ok((n, client)) = r else { continue };
                let Some(data) = buf.get(..n) else { continue };
                if !flows.contains_key(&client) && !admitted(&p, client, &counters) {
                    continue;
                }
                if flows.get(&client).is_none_or(|f| f.task.is_finished()) {
                    flows.remove(&client);
                    let before = flows.len();
                    crate::proxy::io::make_room(&mut flows, MAX_UDP_FLOWS, |f| &f.activity);
                    for _ in flows.len()..before {
                        counters.error(ErrorKind::Evicted);
                    }
                    match new_flow(listen.clone(), p.target, client, counters.clone()).await {
                        Ok(f) => {
                            counters.request();
                            flows.insert(client, f);
                        }
                        Err(e) => {
                            counters.error(ErrorKind::BackendRefused);
                            debug!(service = %p.service, target = %p.target, error = %e, "udp flow");
                            continue;
                        }
                    }
                }
                if let Some(f) = flows.get(&client) {
                    f.activity.touch();
                    counters.add_in(n as u64);
                    if f.sock.send(data).await.is_err() {
                        // (The service refused it: the flow ends, and the
                        // next datagram opens a new one.)
                        counters.error(ErrorKind::BackendRefused);
                    }
                }
            }
            _ = sweep.tick() => {
                flows.retain(|_, f| !f.task.is_finished() && f.activity.idle() < UDP_IDLE);
            }
        }
    }
}

// ------------------------------------------------------------ the whole

/// The node's forwarders and registration tasks; stopped when dropped.
pub struct Services {
    /// Registration tasks, one per hub with `control`.
    tasks: Vec<JoinHandle<()>>,
    /// Running forwarders; [`Services::replace`] diffs against their plans.
    /// Shared with `gatewire show` ([`Services::show`]).
    forwarders: Arc<parking_lot::Mutex<Vec<Forwarder>>>,
    overlay: Vec<IpNet>,
    admit: Option<Arc<Admit>>,
    /// Replacing the list re-declares it to every hub at once.
    list: watch::Sender<Vec<NodeService>>,
}

impl Drop for Services {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.forwarders.lock().clear();
    }
}

/// A running forwarder: its plan, its task (aborted when dropped) and what
/// it counted. Dropped, it also ends the connections it forwards (TCP: each
/// waits on `_stop`; UDP flows are its task's own).
struct Forwarder {
    plan: ForwardPlan,
    task: JoinHandle<()>,
    counters: Arc<Counters>,
    _stop: watch::Sender<()>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Forwarder {
    fn spawn(p: ForwardPlan) -> Forwarder {
        let counters = Arc::new(Counters::default());
        let (stop, stopped) = watch::channel(());
        let task = if p.udp {
            tokio::spawn(udp_forwarder(p.clone(), counters.clone()))
        } else {
            tokio::spawn(tcp_forwarder(p.clone(), counters.clone(), stopped))
        };
        Forwarder {
            plan: p,
            task,
            counters,
            _stop: stop,
        }
    }

    /// As `gatewire show` prints it: where it listens, where it forwards to,
    /// and its counters (TCP connections, UDP flows as `requests`, bytes,
    /// errors: `denied` sources that are not hubs, `over_capacity`,
    /// `backend_refused` and `backend_timeout` for a service that does not
    /// answer, `evicted` UDP flows).
    fn show(&self) -> serde_json::Value {
        let mut v = self.counters.show();
        if let Some(o) = v.as_object_mut() {
            o.insert("service".into(), self.plan.service.clone().into());
            o.insert(
                "protocol".into(),
                if self.plan.udp { "udp" } else { "tcp" }.into(),
            );
            o.insert("listen".into(), self.plan.listen.to_string().into());
            o.insert("local".into(), self.plan.target.to_string().into());
        }
        v
    }
}

/// What a new service set changes in the running forwarders: the indexes of
/// `old` to stop and the plans of `new` to start. Unchanged plans keep
/// running (with their open connections).
pub fn forwarder_diff(old: &[ForwardPlan], new: &[ForwardPlan]) -> (Vec<usize>, Vec<ForwardPlan>) {
    let stop = (0..old.len())
        .filter(|&i| old.get(i).is_some_and(|o| !new.contains(o)))
        .collect();
    let start = new.iter().filter(|n| !old.contains(n)).cloned().collect();
    (stop, start)
}

impl Services {
    /// Starts the forwarders for `cfg.services` and one registration task
    /// per hub with `control`.
    pub fn start(cfg: &NodeConfig, dev: Arc<Inner>) -> Services {
        let admit = Admit::of(cfg);
        let forwarders: Vec<Forwarder> = plan(&cfg.services, &cfg.addresses, admit.as_ref())
            .into_iter()
            .map(Forwarder::spawn)
            .collect();
        let (list, rx) = watch::channel(cfg.services.clone());
        let dead_after_ms = u64::from(cfg.dead_after) * 1000;
        let mut tasks = Vec::new();
        for h in &cfg.hubs {
            if let Some(control) = h.control {
                tasks.push(tokio::spawn(register(
                    dev.clone(),
                    h.public_key,
                    hub_label(h),
                    control,
                    rx.clone(),
                    dead_after_ms,
                )));
            }
        }
        if admit.is_none() && !forwarders.is_empty() {
            warn!(
                "service forwarders take connections from every overlay address, other nodes' \
                 included: list each [[hub]]'s own `addresses` to take only the hubs'"
            );
        }
        if !cfg.services.is_empty() && cfg.hubs.iter().all(|h| h.control.is_none()) {
            info!(
                services = cfg.services.len(),
                "no [[hub]] has `control`: services are forwarded but not declared"
            );
        }
        Services {
            tasks,
            forwarders: Arc::new(parking_lot::Mutex::new(forwarders)),
            overlay: cfg.addresses.clone(),
            admit,
            list,
        }
    }

    /// The forwarders and their counters, for `gatewire show`
    /// (`service_forwarders`); follows [`Services::replace`].
    pub fn show(&self) -> impl Fn() -> serde_json::Value + Send + Sync + 'static {
        let f = Arc::clone(&self.forwarders);
        move || serde_json::Value::Array(f.lock().iter().map(Forwarder::show).collect())
    }

    /// The declared set now.
    pub fn current(&self) -> Vec<NodeService> {
        self.list.borrow().clone()
    }

    /// Replaces the service set (a config reload): stops the forwarders no
    /// longer planned, starts the new ones, and re-declares the set to every
    /// hub at once, which withdraws the routes of removed services.
    pub fn replace(&mut self, services: Vec<NodeService>) {
        if *self.list.borrow() == services {
            return;
        }
        let new_plan = plan(&services, &self.overlay, self.admit.as_ref());
        let mut running = self.forwarders.lock();
        let old: Vec<ForwardPlan> = running.iter().map(|f| f.plan.clone()).collect();
        let (stop, start) = forwarder_diff(&old, &new_plan);
        let mut kept = Vec::new();
        for (i, f) in std::mem::take(&mut *running).into_iter().enumerate() {
            if stop.contains(&i) {
                info!(service = %f.plan.service, listen = %f.plan.listen, "service forwarder stopped");
            } else {
                kept.push(f);
            }
        }
        kept.extend(start.into_iter().map(Forwarder::spawn));
        *running = kept;
        drop(running);
        info!(
            services = services.len(),
            "service set changed; declaring it again"
        );
        self.list.send_replace(services);
    }
}

fn hub_label(h: &NodeHub) -> String {
    h.name.clone().unwrap_or_else(|| h.public_key.to_base64())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use std::path::Path;

    const K1: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const P2: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn cfg(services: &str) -> NodeConfig {
        let text = format!(
            "[node]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.1.1/10\", \"fd77:6777::1:1/48\"]\n\
             [[hub]]\npublic_key = \"{P2}\"\nendpoint = \"h.example:1\"\n\
             allowed_ips = [\"100.64.0.0/10\", \"fd77:6777::/48\"]\ncontrol = \"100.64.0.1:7001\"\n{services}"
        );
        NodeConfig::parse("n.toml", &text, Path::new(".")).unwrap()
    }

    #[test]
    fn declaration_follows_the_contract() {
        let c = cfg("[[service]]\nname = \"blog\"\nlocal = \"127.0.0.1:8080\"\n\
             [[service]]\nfqdn = \"shop.example.com\"\nlocal = \"[::]:8443\"\ntls = \"passthrough\"\nproxy_protocol = true\n\
             [[service]]\nname = \"ssh\"\nlocal = \"127.0.0.1:22\"\nport = 2222\nprotocol = \"tcp\"\npublic_port = 20022\n\
             allow = [\"198.51.100.0/24\"]\ndeny = [\"198.51.100.9\"]\n");
        let v: serde_json::Value = serde_json::from_slice(&declaration(&c.services)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"services": [
                {"name": "blog", "protocol": "http", "port": 8080, "tls": "terminate"},
                {"fqdn": "shop.example.com", "protocol": "http", "port": 8443, "tls": "passthrough", "proxy_protocol": true},
                {"name": "ssh", "protocol": "tcp", "port": 2222, "public_port": 20022,
                 "allow": ["198.51.100.0/24"], "deny": ["198.51.100.9/32"]},
            ]})
        );
        let empty: serde_json::Value = serde_json::from_slice(&declaration(&[])).unwrap();
        assert_eq!(empty, serde_json::json!({"services": []}));
    }

    #[test]
    fn forwarders_take_overlay_sources_only_from_hubs() {
        // No hub addresses known: every source, as before.
        assert!(Admit::of(&cfg("")).is_none());
        let mut c = cfg("");
        c.hubs[0].addresses = vec!["fd77:6777::1".parse().unwrap()];
        let a = Admit::of(&c).unwrap();
        // The hub: its listed address and its control address.
        assert!(a.admits("fd77:6777::1".parse().unwrap()));
        assert!(a.admits("100.64.0.1".parse().unwrap()));
        assert!(a.admits("::ffff:100.64.0.1".parse().unwrap()));
        // Other nodes on the overlay: refused.
        assert!(!a.admits("100.64.1.9".parse().unwrap()));
        assert!(!a.admits("fd77:6777::1:9".parse().unwrap()));
        // Outside the overlay (a client translated on the hub): taken.
        assert!(a.admits("64:ff9b::c633:640a".parse().unwrap()));
        assert!(a.admits("198.51.100.10".parse().unwrap()));
        // A hub network the node has no address in is the overlay too:
        // its peers (a site behind the hub) are refused like other nodes.
        let mut c = cfg("");
        c.hubs[0].allowed_ips = [
            "100.64.0.0/10",
            "fd77:6777::/48",
            "10.77.0.0/16",
            "64:ff9b::/96",
        ]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
        c.hubs[0].addresses = vec![
            "fd77:6777::1".parse().unwrap(),
            "10.77.0.1".parse().unwrap(),
        ];
        let b = Admit::of(&c).unwrap();
        assert!(b.admits("10.77.0.1".parse().unwrap()));
        assert!(!b.admits("10.77.5.9".parse().unwrap()));
        assert!(!b.admits("::ffff:10.77.5.9".parse().unwrap()));
        assert!(!b.admits("100.64.1.9".parse().unwrap()));
        // The NAT64 pool6 holds no hub address: translated clients are
        // taken, as is what the hub does not route to the node.
        assert!(b.admits("64:ff9b::c633:640a".parse().unwrap()));
        assert!(b.admits("198.51.100.10".parse().unwrap()));
        // A default route is no overlay network: a hub the node sends
        // everything to still lets translated clients through.
        c.hubs[0].allowed_ips = vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
        let d = Admit::of(&c).unwrap();
        assert!(d.admits("198.51.100.10".parse().unwrap()));
        assert!(
            !d.admits("100.64.1.9".parse().unwrap()),
            "the node's own network"
        );
        // Every plan carries it.
        let c2 = cfg("[[service]]\nname = \"a\"\nlocal = \"127.0.0.1:8080\"\n");
        let p = plan(&c2.services, &c2.addresses, Some(&a));
        assert!(p.iter().all(|p| p.admit.as_ref() == Some(&a)));
    }

    #[test]
    fn a_changed_set_restarts_only_changed_forwarders() {
        let a = cfg("[[service]]\nname = \"a\"\nlocal = \"127.0.0.1:8080\"\n\
             [[service]]\nname = \"b\"\nlocal = \"127.0.0.1:8081\"\n");
        let b = cfg("[[service]]\nname = \"a\"\nlocal = \"127.0.0.1:8080\"\n\
             [[service]]\nname = \"c\"\nlocal = \"127.0.0.1:9000\"\nport = 8081\n");
        let old = plan(&a.services, &a.addresses, None);
        let new = plan(&b.services, &b.addresses, None);
        assert_eq!(old.len(), 4, "two services on two overlay addresses");
        let (stop, start) = forwarder_diff(&old, &new);
        // `a` is untouched; `b`'s two listeners stop, `c` starts two on the same port.
        let stopped: Vec<&str> = stop.iter().map(|&i| old[i].service.as_str()).collect();
        assert_eq!(stopped, ["b", "b"]);
        assert_eq!(start.len(), 2);
        assert!(start
            .iter()
            .all(|p| p.service == "c" && p.listen.port() == 8081));
        let (stop, start) = forwarder_diff(&new, &new);
        assert!(stop.is_empty() && start.is_empty());
        let (stop, start) = forwarder_diff(&old, &[]);
        assert_eq!((stop.len(), start.len()), (4, 0));
    }

    #[test]
    fn forwarders_only_where_needed() {
        let c = cfg("[[service]]\nname = \"a\"\nlocal = \"127.0.0.1:8080\"\n\
             [[service]]\nname = \"b\"\nlocal = \"0.0.0.0:8081\"\n\
             [[service]]\nname = \"c\"\nlocal = \"100.64.1.1:8082\"\n\
             [[service]]\nname = \"d\"\nlocal = \"192.168.1.5:53\"\nport = 5353\nprotocol = \"udp\"\npublic_port = 53\n\
             [[service]]\nname = \"e\"\nlocal = \"127.0.0.1:8080\"\n");
        let p = plan(&c.services, &c.addresses, None);
        let got: Vec<(String, bool, String)> = p
            .iter()
            .map(|p| (p.listen.to_string(), p.udp, p.target.to_string()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "100.64.1.1:8080".to_string(),
                    false,
                    "127.0.0.1:8080".to_string()
                ),
                (
                    "[fd77:6777::1:1]:8080".to_string(),
                    false,
                    "127.0.0.1:8080".to_string()
                ),
                (
                    "100.64.1.1:5353".to_string(),
                    true,
                    "192.168.1.5:53".to_string()
                ),
                (
                    "[fd77:6777::1:1]:5353".to_string(),
                    true,
                    "192.168.1.5:53".to_string()
                ),
            ]
        );
        assert_eq!(p[0].service, "a");
    }

    fn st(host: &str, status: &str, error: Option<&str>) -> ServiceStatus {
        ServiceStatus {
            host: host.into(),
            status: status.into(),
            error: error.map(String::from),
            backend: (status == "active").then(|| "[fd77:6777::1:1]:8080".to_string()),
        }
    }

    #[test]
    fn each_change_is_logged_once() {
        let mut old = BTreeMap::new();
        let a = st("name:blog", "active", None);
        let r = st(
            "name:shop",
            "refused",
            Some("name `shop` is owned by another node"),
        );
        let ev = changes(&mut old, &[a.clone(), r.clone()]);
        assert_eq!(
            ev,
            vec![
                Event::Active {
                    host: "name:blog".into(),
                    backend: a.backend.clone()
                },
                Event::Refused {
                    host: "name:shop".into(),
                    error: "name `shop` is owned by another node".into()
                },
            ]
        );
        // The same answer again: nothing to log.
        assert!(changes(&mut old, &[a.clone(), r.clone()]).is_empty());
        // A different refusal reason is logged; the other service is gone.
        let r2 = st("name:shop", "refused", Some("expired"));
        assert_eq!(
            changes(&mut old, &[r2]),
            vec![
                Event::Refused {
                    host: "name:shop".into(),
                    error: "expired".into()
                },
                Event::Gone {
                    host: "name:blog".into()
                },
            ]
        );
        // Refused becomes active; unknown statuses pass through; no reason given.
        let ev = changes(
            &mut old,
            &[
                st("name:shop", "active", None),
                st("tcp:20022", "pending", None),
                st("udp:53", "refused", None),
            ],
        );
        assert!(matches!(&ev[0], Event::Active { host, .. } if host == "name:shop"));
        assert_eq!(
            ev[1],
            Event::Other {
                host: "tcp:20022".into(),
                status: "pending".into()
            }
        );
        assert_eq!(
            ev[2],
            Event::Refused {
                host: "udp:53".into(),
                error: "no reason given".into()
            }
        );
    }

    #[test]
    fn schedule() {
        let mut s = Schedule::new(1000);
        assert!(s.due(1000));
        s.failed(1000);
        assert!(!s.due(5999) && s.due(6000));
        s.failed(6000);
        assert_eq!(s.wait_ms(6000), 10_000);
        for _ in 0..10 {
            s.failed(0);
        }
        assert_eq!(s.wait_ms(0), MAX_BACKOFF_MS);
        s.succeeded(100_000);
        assert_eq!(s.wait_ms(100_000), REFRESH_MS);
        s.failed(130_000);
        assert_eq!(s.wait_ms(130_000), RETRY_MS);
        s.now(131_000);
        assert!(s.due(131_000));
        assert!(tunnel_up(10_000, 9_000, 8_000));
        assert!(!tunnel_up(10_000, 1_000, 8_000));
        assert!(!tunnel_up(10_000, 0, 8_000));
    }

    #[tokio::test]
    async fn put_against_a_fake_hub() {
        use hyper::service::service_fn;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for round in 0..2 {
                let (s, _) = l.accept().await.unwrap();
                let svc = service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| async move {
                        assert_eq!(req.method(), hyper::Method::PUT);
                        assert_eq!(req.uri().path(), "/v1/services");
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        let (code, answer) = if round == 0 {
                            assert_eq!(v["services"][0]["name"], "blog");
                            (
                                200,
                                r#"{"services":[{"host":"name:blog","status":"active","backend":"[fd77::2]:8080"}]}"#,
                            )
                        } else {
                            (400, r#"{"error":"services #1: port 0"}"#)
                        };
                        let mut r = hyper::Response::new(Full::new(Bytes::from(answer)));
                        *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
                        Ok::<_, std::convert::Infallible>(r)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            }
        });
        let c = cfg("[[service]]\nname = \"blog\"\nlocal = \"127.0.0.1:8080\"\n");
        let got = put_services(addr, declaration(&c.services)).await.unwrap();
        assert_eq!(
            got,
            vec![ServiceStatus {
                host: "name:blog".into(),
                status: "active".into(),
                error: None,
                backend: Some("[fd77::2]:8080".into()),
            }]
        );
        let e = put_services(addr, declaration(&c.services))
            .await
            .unwrap_err();
        assert_eq!(e, "400 Bad Request: services #1: port 0");
        server.await.unwrap();
        // Nobody listening: a connection error.
        let e = put_services(addr, b"{}".to_vec()).await.unwrap_err();
        assert!(e.starts_with("connecting"), "{e}");
    }

    #[tokio::test]
    async fn tcp_and_udp_forwarders() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Targets on loopback; "overlay" is 127.0.0.2 here.
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut b = [0u8; 5];
            s.read_exact(&mut b).await.unwrap();
            s.write_all(&b).await.unwrap();
        });
        let probe = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        let listen = probe.local_addr().unwrap();
        drop(probe);
        // The "hub" is 127.0.0.1; 127.0.0.5 is another node on the overlay.
        let admit = Some(Arc::new(Admit {
            overlay: vec!["127.0.0.0/8".parse().unwrap()],
            hubs: vec!["127.0.0.1".parse().unwrap()],
        }));
        let tc = Arc::new(Counters::default());
        let (_stop, stopped) = watch::channel(());
        let t = tokio::spawn(tcp_forwarder(
            ForwardPlan {
                listen,
                target,
                udp: false,
                service: "t".into(),
                admit: admit.clone(),
            },
            tc.clone(),
            stopped,
        ));
        // Another node is accepted and closed at once, never forwarded.
        let mut other = loop {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind("127.0.0.5:0".parse().unwrap()).unwrap();
            if let Ok(c) = s.connect(listen).await {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let _ = other.write_all(b"hello").await;
        let mut b = [0u8; 5];
        let r = tokio::time::timeout(Duration::from_secs(5), other.read(&mut b))
            .await
            .unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        let mut c = loop {
            if let Ok(c) = TcpStream::connect(listen).await {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        c.write_all(b"hello").await.unwrap();
        let mut b = [0u8; 5];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"hello");
        // The other node's connection was counted as refused, this one as
        // taken; the echo server is gone, so the next one finds nothing.
        assert_eq!(tc.errors_of(ErrorKind::Denied), 1);
        let mut c2 = TcpStream::connect(listen).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), c2.read(&mut b))
            .await
            .unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        assert_eq!(tc.errors_of(ErrorKind::BackendRefused), 1);
        let shown = tc.show();
        assert_eq!(shown["connections"], 2, "{shown}");
        assert_eq!(shown["errors"]["denied"], 1, "{shown}");
        t.abort();

        let uecho = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let utarget = uecho.local_addr().unwrap();
        tokio::spawn(async move {
            let mut b = [0u8; 100];
            loop {
                let (n, from) = uecho.recv_from(&mut b).await.unwrap();
                uecho.send_to(&b[..n], from).await.unwrap();
            }
        });
        let probe = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
        let ulisten = probe.local_addr().unwrap();
        drop(probe);
        let uc = Arc::new(Counters::default());
        let u = tokio::spawn(udp_forwarder(
            ForwardPlan {
                listen: ulisten,
                target: utarget,
                udp: true,
                service: "u".into(),
                admit,
            },
            uc.clone(),
        ));
        let other = UdpSocket::bind("127.0.0.5:0").await.unwrap();
        let mut got = [0u8; 100];
        for _ in 0..5 {
            other.send_to(b"ping", ulisten).await.unwrap();
        }
        let r = tokio::time::timeout(Duration::from_millis(500), other.recv_from(&mut got)).await;
        assert!(
            r.is_err(),
            "another node got an answer through the forwarder"
        );
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut ok = false;
        for _ in 0..50 {
            client.send_to(b"ping", ulisten).await.unwrap();
            if let Ok(Ok((n, from))) =
                tokio::time::timeout(Duration::from_millis(100), client.recv_from(&mut got)).await
            {
                assert_eq!(&got[..n], b"ping");
                assert_eq!(from, ulisten);
                ok = true;
                break;
            }
        }
        assert!(ok, "no UDP echo through the forwarder");
        // Five datagrams of the other node refused, one flow for the hub's.
        assert_eq!(uc.errors_of(ErrorKind::Denied), 5);
        let shown = uc.show();
        assert_eq!(shown["requests"], 1, "{shown}");
        assert!(shown["bytes_out"].as_u64().unwrap() >= 4, "{shown}");
        u.abort();
    }

    /// A forwarder dropped (its service removed or changed on reload) ends
    /// the connections it forwards, not only its listener.
    #[tokio::test]
    async fn a_stopped_forwarder_ends_its_connections() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut b = [0u8; 64];
            while let Ok(n) = s.read(&mut b).await {
                if n == 0 || s.write_all(&b[..n]).await.is_err() {
                    break;
                }
            }
        });
        let probe = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        let listen = probe.local_addr().unwrap();
        drop(probe);
        let f = Forwarder::spawn(ForwardPlan {
            listen,
            target,
            udp: false,
            service: "t".into(),
            admit: None,
        });
        let mut c = loop {
            if let Ok(c) = TcpStream::connect(listen).await {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut b = [0u8; 5];
        c.write_all(b"hello").await.unwrap();
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"hello");
        drop(f);
        let r = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = c.write_all(b"again").await;
            c.read(&mut b).await
        })
        .await
        .expect("the connection outlived its forwarder");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    }
}
