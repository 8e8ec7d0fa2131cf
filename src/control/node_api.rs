//! The node services API on the hub's overlay addresses (`[control]
//! node_port`), bound to the hub's TUN so that only tunnel traffic reaches it.
//!
//! The caller is known by its source address: cryptokey routing has already
//! checked that a packet from that address came from the one peer whose
//! allowed IPs hold it. Plain HTTP is enough; the tunnel authenticates and
//! encrypts.

use crate::control::api::services_json;
use crate::control::runtime::Control;
use crate::control::state::{self, hide_other_keys, ServiceDecl};
use crate::per_source::{PerSource, SourceSlot};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

const MAX_BODY: usize = 256 * 1024;
/// Connections open at once over all the listeners: in all, and from one
/// node (whatever its source addresses: a node that routes a subnet has
/// many), so that one node cannot hold every slot and shut the others out.
const MAX_CONNS: usize = 256;
const MAX_CONNS_PER_NODE: usize = 8;
/// A node's refused declaration is logged at warn at most once in this
/// time (the others at debug), so a node cannot fill the hub's log.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
/// Most characters of a node's text in the hub's log.
const LOGGED_CHARS: usize = 200;

/// Whom a connection is counted under.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Caller {
    /// The peer whose allowed IPs hold the source (the node's public key).
    Node(String),
    /// A source of no peer (it gets 403).
    Address(IpAddr),
}

impl Caller {
    fn of(peer: Option<String>, ip: IpAddr) -> Self {
        match peer {
            Some(k) => Caller::Node(k),
            None => Caller::Address(ip),
        }
    }
}

/// A slot for one more connection of `caller`, or `None` when it has
/// [`MAX_CONNS_PER_NODE`] open.
fn admit(per_node: &Arc<PerSource<Caller>>, caller: Caller) -> Option<SourceSlot<Caller>> {
    per_node.take(caller, MAX_CONNS_PER_NODE)
}

/// Per node: whether a message may be logged at warn now (at most one every
/// `every`). Pure: the caller gives the time.
pub(crate) struct LogLimit {
    every: Duration,
    last: HashMap<String, std::time::Instant>,
}

impl LogLimit {
    pub(crate) fn new(every: Duration) -> Self {
        LogLimit {
            every,
            last: HashMap::new(),
        }
    }

    pub(crate) fn allow(&mut self, key: &str, now: std::time::Instant) -> bool {
        let every = self.every;
        let quiet = |t: &std::time::Instant| now.saturating_duration_since(*t) >= every;
        if let Some(t) = self.last.get_mut(key) {
            if !quiet(t) {
                return false;
            }
            *t = now;
            return true;
        }
        if self.last.len() >= 4096 {
            // Keys are peers, so this is many peers: forget the quiet ones.
            self.last.retain(|_, t| !quiet(t));
        }
        self.last.insert(key.to_string(), now);
        true
    }
}

/// Node-chosen text as the hub logs it: at most [`LOGGED_CHARS`]
/// characters, control characters shown as `?`.
fn loggable(s: &str) -> String {
    let mut t: String = s.chars().take(LOGGED_CHARS).collect();
    if t.len() < s.len() {
        t.push_str("...");
    }
    crate::control::client::printable(&t)
}

/// Declarations that change a node's services: each one saves the state and
/// reloads the proxy's routes, so one node may make [`CHANGES_BURST`] at once
/// and one more every [`CHANGE_EVERY`] after (a node sends its set when it
/// starts, when its config changes and every 30 s unchanged, which costs
/// nothing). More get 429 and the node retries with backoff.
const CHANGES_BURST: u32 = 10;
const CHANGE_EVERY: Duration = Duration::from_secs(6);

/// Per node: how many changing declarations it may make now (a token
/// bucket). Pure: the caller gives the time.
pub(crate) struct ChangeBudget {
    burst: u32,
    every: Duration,
    nodes: std::collections::HashMap<String, (u32, std::time::Instant)>,
}

impl ChangeBudget {
    pub(crate) fn new(burst: u32, every: Duration) -> Self {
        ChangeBudget {
            burst,
            every,
            nodes: std::collections::HashMap::new(),
        }
    }

    /// Spends one change of `key`'s; when none is left, how long until one
    /// is.
    pub(crate) fn take(&mut self, key: &str, now: std::time::Instant) -> Result<(), Duration> {
        let (burst, every) = (self.burst, self.every);
        let refilled = |(left, since): (u32, std::time::Instant)| {
            let gained = now.saturating_duration_since(since).as_nanos() / every.as_nanos().max(1);
            let gained = u32::try_from(gained).unwrap_or(u32::MAX);
            if left.saturating_add(gained) >= burst {
                (burst, now)
            } else {
                (left + gained, since + every * gained)
            }
        };
        if !self.nodes.contains_key(key) && self.nodes.len() >= 4096 {
            // Keys are peers, so this is many peers: forget the full ones.
            self.nodes.retain(|_, b| refilled(*b).0 < burst);
        }
        let b = self.nodes.entry(key.to_string()).or_insert((burst, now));
        let (left, since) = refilled(*b);
        if left == 0 {
            *b = (0, since);
            return Err((since + every).saturating_duration_since(now));
        }
        *b = (left - 1, since);
        Ok(())
    }

    /// Returns a change [`take`](Self::take) spent on one that was not
    /// made (it changed nothing after all, was refused, or the state could
    /// not be saved).
    pub(crate) fn give_back(&mut self, key: &str) {
        if let Some(b) = self.nodes.get_mut(key) {
            b.0 = b.0.saturating_add(1).min(self.burst);
        }
    }
}

/// Time a node has to send a request's body once its head arrived.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Declare {
    services: Vec<ServiceDecl>,
}

pub struct NodeApi {
    tasks: Vec<JoinHandle<()>>,
    pub addrs: Vec<SocketAddr>,
}

impl Drop for NodeApi {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn answer(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut b = serde_json::to_vec_pretty(&v).unwrap_or_default();
    b.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(b)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(e: state::Error) -> Response<Full<Bytes>> {
    answer(
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        json!({ "error": e.message }),
    )
}

/// An error for the node `key`: naming no other node.
fn error_to(key: &str, e: state::Error) -> Response<Full<Bytes>> {
    error(e.for_node(key))
}

/// The statuses of `key`'s services, as the node is told them: naming no
/// other node (the admin API shows them as they are).
fn statuses_to(c: &Control, key: &str) -> Response<Full<Bytes>> {
    let mut v = c.statuses_of(key);
    for s in &mut v {
        if let Some(e) = &mut s.error {
            *e = hide_other_keys(e, key);
        }
    }
    answer(StatusCode::OK, services_json(&v))
}

/// Changes of one node's services waiting for the writer's lock or being
/// made at once: a node sends its set and waits for the answer, so a second
/// one is a node that hung up and sent again (it gets 429 and retries
/// later). Without a bound, a node hanging up on every request would queue
/// changes that outlive it and hold up the operator's and other nodes'.
const MAX_PENDING_CHANGES: usize = 1;

/// What the node API's requests share across its listeners.
struct Shared {
    budget: parking_lot::Mutex<ChangeBudget>,
    refusals: parking_lot::Mutex<LogLimit>,
    /// Each node's changes in progress.
    pending: Arc<PerSource<String>>,
}

impl Shared {
    fn new() -> Self {
        Shared {
            budget: parking_lot::Mutex::new(ChangeBudget::new(CHANGES_BURST, CHANGE_EVERY)),
            refusals: parking_lot::Mutex::new(LogLimit::new(REFUSAL_LOG_EVERY)),
            pending: Arc::new(PerSource::default()),
        }
    }

    /// Lets one change of `key`'s services go on to the writer's lock: it
    /// spends one of the node's changes and holds its place among its
    /// changes in progress (given back when the slot is dropped). 429 when
    /// the node has a change in progress or none left to spend; the lock
    /// and the state are not touched for it.
    fn begin_change(
        &self,
        key: &str,
        now: std::time::Instant,
    ) -> state::Result<SourceSlot<String>> {
        let slot = self
            .pending
            .take(key.to_string(), MAX_PENDING_CHANGES)
            .ok_or_else(|| state::Error {
                status: 429,
                message: "a change of this node's services is still being made; \
                          send the set again once it is done"
                    .into(),
            })?;
        self.budget
            .lock()
            .take(key, now)
            .map_err(|wait| state::Error {
                status: 429,
                message: format!(
                    "too many changes of this node's services; \
                 the next is possible in {} s",
                    wait.as_secs() + 1
                ),
            })?;
        Ok(slot)
    }

    /// Ends a change [`Shared::begin_change`] let through: when it changed
    /// nothing (the same set was saved meanwhile), was refused, or could not
    /// be saved, the node gets its change back.
    fn end_change(&self, key: &str, slot: SourceSlot<String>, outcome: &state::Result<bool>) {
        if !matches!(outcome, Ok(true)) {
            self.budget.lock().give_back(key);
        }
        drop(slot);
    }
}

/// Logs a refused declaration of `key`'s: at warn once in
/// [`REFUSAL_LOG_EVERY`], at debug in between.
fn log_refusal(shared: &Shared, key: &str, e: &state::Error) {
    let why = loggable(&e.message);
    if shared.refusals.lock().allow(key, std::time::Instant::now()) {
        warn!(node = %key, status = e.status, error = %why, "node's service declaration refused");
    } else {
        debug!(node = %key, status = e.status, error = %why, "node's service declaration refused");
    }
}

async fn serve(
    c: Arc<Control>,
    shared: Arc<Shared>,
    from: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let ip = from.ip();
    let Some(key) = c.peer_of(ip) else {
        return Ok(error(state::Error {
            status: 403,
            message: format!("{ip} is not an address of any peer"),
        }));
    };
    if req.uri().path() != "/v1/services" {
        return Ok(error(state::Error::not_found(format!(
            "no such endpoint: {}",
            req.uri().path()
        ))));
    }
    match *req.method() {
        Method::GET => Ok(statuses_to(&c, &key)),
        Method::PUT => {
            // The head had its timeout; the body gets one too, or a node
            // gone mid-request would hold a connection slot for good.
            let body = Limited::new(req.into_body(), MAX_BODY).collect();
            let body = match tokio::time::timeout(BODY_TIMEOUT, body).await {
                Ok(Ok(b)) => b.to_bytes(),
                Ok(Err(e)) => {
                    // Too large, or the body broke off (a reset, a bad chunk).
                    let status = if e.is::<http_body_util::LengthLimitError>() {
                        413
                    } else {
                        400
                    };
                    return Ok(error(state::Error {
                        status,
                        message: format!("body: {e}"),
                    }));
                }
                Err(_) => {
                    return Ok(error(state::Error {
                        status: 408,
                        message: format!("body: not received within {BODY_TIMEOUT:?}"),
                    }))
                }
            };
            let d: Declare = match serde_json::from_slice(&body) {
                Ok(d) => d,
                Err(e) => return Ok(error(state::Error::bad(format!("body: {e}")))),
            };
            let n = d.services.len();
            // The set the hub has (the node's refresh every 30 s) or an
            // invalid one is answered from the published state, without the
            // writer's lock; the lock's holder checks again.
            match c.declaration_changes(&key, ip, d.services.clone()) {
                Ok(true) => {}
                Ok(false) => return Ok(statuses_to(&c, &key)),
                Err(e) => {
                    log_refusal(&shared, &key, &e);
                    return Ok(error_to(&key, e));
                }
            }
            // The node's budget is spent before the writer's lock is waited
            // for: a node over it gets 429 having queued nothing.
            let slot = match shared.begin_change(&key, std::time::Instant::now()) {
                Ok(s) => s,
                Err(e) => {
                    log_refusal(&shared, &key, &e);
                    return Ok(error_to(&key, e));
                }
            };
            // Run to the end even when the node goes away (see the admin
            // API's `serve_req`).
            let commit = {
                let (c, key, shared) = (c.clone(), key.clone(), shared.clone());
                tokio::spawn(async move {
                    let r = c
                        .mutate(|s, ctx| s.declare_services(ctx, &key, ip, d.services))
                        .await;
                    shared.end_change(&key, slot, &r);
                    r
                })
            };
            let r = commit.await.unwrap_or_else(|e| {
                // The task ended before it could give the change back (its
                // place in progress went with it): nothing was made.
                shared.budget.lock().give_back(&key);
                Err(state::Error {
                    status: 500,
                    message: format!("the declaration's task failed: {e}"),
                })
            });
            match r {
                Ok(changed) => {
                    if changed {
                        info!(node = %key, from = %ip, services = n, "node declared its services");
                    }
                    Ok(statuses_to(&c, &key))
                }
                Err(e) => {
                    log_refusal(&shared, &key, &e);
                    Ok(error_to(&key, e))
                }
            }
        }
        _ => Ok(error(state::Error {
            status: 405,
            message: format!("method {} is not allowed", req.method()),
        })),
    }
}

fn bind(addr: SocketAddr, iface: &str) -> anyhow::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind_device(Some(iface.as_bytes()))?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(256)?;
    Ok(TcpListener::from_std(s.into())?)
}

impl NodeApi {
    /// Listens on every hub overlay address at `[control] node_port`; the
    /// connection caps are over all these listeners together.
    pub fn start(c: Arc<Control>) -> anyhow::Result<NodeApi> {
        let cfg = c.hub_config();
        let port = c.settings().node_port;
        let mut tasks = Vec::new();
        let mut addrs = Vec::new();
        let shared = Arc::new(Shared::new());
        let sem = Arc::new(tokio::sync::Semaphore::new(MAX_CONNS));
        let per_node: Arc<PerSource<Caller>> = Arc::new(PerSource::default());
        for a in &cfg.addresses {
            let sa = SocketAddr::new(a.addr(), port);
            let l = bind(sa, &cfg.interface)
                .map_err(|e| anyhow::anyhow!("node services API on {sa}: {e}"))?;
            addrs.push(sa);
            let (c, shared, sem, per_node) =
                (c.clone(), shared.clone(), sem.clone(), per_node.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((s, from)) = l.accept().await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let caller = Caller::of(c.peer_of(from.ip()), from.ip());
                    let Some(slot) = admit(&per_node, caller) else {
                        debug!(%from, "node API: the node has {MAX_CONNS_PER_NODE} connections open already");
                        continue;
                    };
                    let Ok(permit) = sem.clone().try_acquire_owned() else {
                        continue;
                    };
                    let (c, shared) = (c.clone(), shared.clone());
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            serve(c.clone(), shared.clone(), from, req)
                        });
                        let conn = crate::control::api::serve_bounded(
                            TokioIo::new(s),
                            svc,
                            64 * 1024,
                            (crate::control::api::CONN_LIFE, crate::control::api::CONN_GRACE),
                        );
                        if let Err(e) = conn.await {
                            debug!(%from, error = %e, "node API connection ended");
                        }
                        drop((permit, slot));
                    });
                }
            }));
        }
        info!(listen = ?addrs, "node services API");
        Ok(NodeApi { tasks, addrs })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_node_changing_its_services_too_often_waits() {
        let t0 = std::time::Instant::now();
        let s = Duration::from_secs(1);
        let mut b = ChangeBudget::new(3, Duration::from_secs(6));
        for _ in 0..3 {
            b.take("k1", t0).unwrap();
        }
        assert_eq!(b.take("k1", t0), Err(6 * s));
        assert_eq!(b.take("k1", t0 + 4 * s), Err(2 * s));
        // Another node has its own budget.
        b.take("k2", t0).unwrap();
        // One change back every 6 s; the time in between is not lost.
        b.take("k1", t0 + 7 * s).unwrap();
        assert_eq!(b.take("k1", t0 + 7 * s), Err(5 * s));
        b.take("k1", t0 + 12 * s).unwrap();
        // A long quiet spell refills to the burst, no further.
        for _ in 0..3 {
            b.take("k1", t0 + 600 * s).unwrap();
        }
        assert!(b.take("k1", t0 + 600 * s).is_err());
        // A clock that goes backwards gains nothing and breaks nothing.
        assert!(b.take("k1", t0).is_err());
        // A change that was not saved is given back, up to the burst.
        b.give_back("k1");
        b.take("k1", t0 + 600 * s).unwrap();
        assert!(b.take("k1", t0 + 600 * s).is_err());
        for _ in 0..5 {
            b.give_back("k2");
        }
        for _ in 0..3 {
            b.take("k2", t0).unwrap();
        }
        assert!(b.take("k2", t0).is_err(), "no more than the burst");
        b.give_back("unknown");
    }

    /// A changing declaration spends the node's budget before it waits for
    /// the writer's lock, and a node has one change in progress at most:
    /// one that hangs up and sends again queues nothing more, and one over
    /// its budget gets 429 without a place in the queue.
    #[test]
    fn a_nodes_changes_are_counted_before_they_queue() {
        let refused = |r: state::Result<SourceSlot<String>>| match r {
            Ok(_) => panic!("let through"),
            Err(e) => e,
        };
        let t0 = std::time::Instant::now();
        let shared = Shared::new();
        let first = shared.begin_change("k1", t0).unwrap();
        // In progress: the next one waits for it, and spends nothing.
        let e = refused(shared.begin_change("k1", t0));
        assert_eq!(e.status, 429);
        assert!(e.message.contains("still being made"), "{e}");
        // Another node is not held up.
        let other = shared.begin_change("k2", t0).unwrap();
        shared.end_change("k2", other, &Ok(true));
        // A change made: spent for good.
        shared.end_change("k1", first, &Ok(true));
        // One that changed nothing after all, was refused, or was not
        // saved: given back.
        for r in [
            Ok(false),
            Err(state::Error::bad("services #1: port 0")),
            Err(state::Error {
                status: 500,
                message: "the state could not be saved".into(),
            }),
        ] {
            let s = shared.begin_change("k1", t0).unwrap();
            shared.end_change("k1", s, &r);
        }
        // So 9 of the burst of 10 are left.
        for _ in 1..CHANGES_BURST {
            let s = shared.begin_change("k1", t0).unwrap();
            shared.end_change("k1", s, &Ok(true));
        }
        let e = refused(shared.begin_change("k1", t0));
        assert_eq!(e.status, 429);
        assert!(e.message.contains("too many changes"), "{e}");
        // Refused for its budget: holds no place in progress.
        assert_eq!(shared.pending.open(&"k1".to_string()), 0);
        assert!(shared.begin_change("k1", t0 + CHANGE_EVERY).is_ok());
    }

    /// A node is counted as one caller whatever address it connects from
    /// (a node that routes a subnet has many); sources of no peer by
    /// address.
    #[test]
    fn connections_are_counted_per_node_not_per_address() {
        let per_node: Arc<PerSource<Caller>> = Arc::new(PerSource::default());
        let k1 = || Some("k1".to_string());
        let ip = |i: u8| IpAddr::from([100, 64, 9, i]);
        let held: Vec<_> = (0..MAX_CONNS_PER_NODE)
            .map(|i| admit(&per_node, Caller::of(k1(), ip(i as u8))).unwrap())
            .collect();
        assert!(admit(&per_node, Caller::of(k1(), ip(200))).is_none());
        assert!(admit(&per_node, Caller::of(Some("k2".into()), ip(201))).is_some());
        assert!(admit(&per_node, Caller::of(None, ip(1))).is_some());
        drop(held);
        assert!(admit(&per_node, Caller::of(k1(), ip(200))).is_some());
    }

    #[test]
    fn refusals_are_logged_at_warn_once_in_a_while_per_node() {
        let t0 = std::time::Instant::now();
        let s = Duration::from_secs(1);
        let mut l = LogLimit::new(10 * s);
        assert!(l.allow("k1", t0));
        assert!(!l.allow("k1", t0 + 9 * s));
        assert!(l.allow("k2", t0 + 9 * s), "another node has its own");
        assert!(l.allow("k1", t0 + 10 * s));
        assert!(!l.allow("k1", t0 + 19 * s));
        // A clock that goes backwards logs nothing more.
        assert!(!l.allow("k1", t0));
        // Many nodes: the quiet ones are forgotten.
        for i in 0..4096 {
            assert!(l.allow(&format!("n{i}"), t0 + 100 * s));
        }
        assert_eq!(l.last.len(), 4096);
        assert!(l.allow("k1", t0 + 200 * s));
        assert_eq!(l.last.len(), 1);
    }

    #[test]
    fn node_text_is_logged_short_and_printable() {
        assert_eq!(loggable("a\nb\u{1b}[31m"), "a?b?[31m");
        let long = "x".repeat(256 * 1024);
        let l = loggable(&long);
        assert_eq!(l, format!("{}...", "x".repeat(LOGGED_CHARS)));
        assert_eq!(
            loggable(&"é".repeat(LOGGED_CHARS)),
            "é".repeat(LOGGED_CHARS)
        );
    }
}
