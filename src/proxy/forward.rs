//! UDP forwards: a flow table keyed by client address and the public address
//! it sent to, bounded in size (a full table lets a flow go for a new one:
//! one its client never came back to after its backend answered, then the
//! others; see [`FlowOrder`]), with expiry once the client has been quiet
//! for a while (the backend's datagrams do not keep a flow: they may be
//! going to a forged source address). Each flow has its own connected socket
//! to a backend;
//! replies leave from the listening socket, from the address the client sent
//! to. With `proxy_protocol`, every datagram to the backend starts with a
//! PROXY v2 header (`DGRAM`) naming the client and that address. A flow that
//! ends writes one access-log line. With `max_connections`, a forward holds
//! at most that many flows at once: a datagram that would start one more
//! takes the place of a flow whose client never came back after its backend
//! answered (quiet longest first; a forged or one-shot source holds no place
//! for long), else it is dropped and counted as `over_capacity`. One client
//! (an IPv4 address, an IPv6 /56) holds at most `max_flows_per_source`
//! flows: beyond, its new flow takes the place of its own flow quiet
//! longest, never of another client's.

use crate::per_source::{subscriber_key, PerSource, SourceSlot};
use crate::proxy::access_log::{AccessLog, Entry, Kind as LogKind};
use crate::proxy::io::{Activity, FlowOrder, Standing, UdpListener, UDP_BATCH};
use crate::proxy::proxy_protocol::{encode_v2, Transport};
use crate::proxy::server::Forward;
use crate::proxy::settings::ProxyProtocol;
use crate::proxy::stats::ErrorKind;
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::debug;

/// Finds the forward currently configured on this listener (it changes on reload).
pub(crate) type Lookup = Arc<dyn Fn() -> Option<Arc<Forward>> + Send + Sync>;

/// A flow: the client's address and the hub address it sent to (`None` when
/// the kernel did not say; then the listener's own).
type FlowKey = (SocketAddr, Option<IpAddr>);

/// What the reply task counts for the flow's log line and standing.
#[derive(Default)]
struct FlowTally {
    bytes_out: AtomicU64,
    refused: AtomicBool,
    /// A datagram from the backend reached the client.
    answered: AtomicBool,
}

thread_local! {
    /// Where a flow's reply task takes a datagram in: one buffer per
    /// thread, not one per flow (a flow waiting for its backend holds
    /// none); the datagram is copied out at its size.
    static REPLY_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; 65535]);
}

struct Flow {
    /// The flow's number, for the table's [`FlowOrder`].
    id: u64,
    sock: Arc<UdpSocket>,
    /// Datagrams passed either way (the log line's duration).
    activity: Activity,
    /// The client's last datagram passed on: only the client keeps its
    /// flow (idle expiry, the order in which a full table lets flows go).
    seen: Instant,
    /// The client sent again after its backend answered.
    confirmed: bool,
    task: JoinHandle<()>,
    fwd: Arc<Forward>,
    backend: SocketAddr,
    /// The PROXY v2 header that starts every datagram to the backend (empty
    /// without `proxy_protocol`).
    header: Vec<u8>,
    bytes_in: u64,
    tally: Arc<FlowTally>,
    /// The log line's fixed part, when the access log is on.
    log: Option<(Arc<AccessLog>, Entry)>,
    /// The flow's place under the forward's `max_connections`, given back
    /// when the flow ends.
    _slot: Option<OwnedSemaphorePermit>,
    /// The flow's place among its client's (`max_flows_per_source`).
    _source: SourceSlot,
}

impl Flow {
    fn standing(&self) -> Standing {
        Standing {
            id: self.id,
            confirmed: self.confirmed,
            last: self.seen,
        }
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.task.abort();
        if let Some((log, mut e)) = self.log.take() {
            e.bytes_in = Some(self.bytes_in);
            e.bytes_out = self.tally.bytes_out.load(Relaxed);
            e.duration_ms = self.activity.active_for().as_micros() as f64 / 1000.0;
            if self.tally.refused.load(Relaxed) {
                e.error = Some(ErrorKind::BackendRefused.as_str());
            }
            log.log(e);
        }
    }
}

/// A place for one more flow of `client` among its own: when it holds
/// `max` (a port after port from one host), one of its flows gives its
/// place up: one never confirmed if it has any, quiet longest. (A scan of
/// the table, made only for a client at its cap.)
fn admit_source(table: &mut Table, client: IpAddr, max: usize) -> Option<SourceSlot> {
    let key = subscriber_key(client);
    if let Some(s) = table.sources.take(key, max) {
        return Some(s);
    }
    let oldest = table
        .flows
        .iter()
        .filter(|(k, _)| subscriber_key(k.0.ip()) == key)
        .min_by_key(|(_, f)| (f.confirmed, f.seen))
        .map(|(k, _)| *k)?;
    table.flows.remove(&oldest);
    table.sources.take(key, max)
}

/// A place for one more flow under the forward's `max_connections` (which
/// counts flows): when they are all taken, an unconfirmed flow of `table`
/// gives its place up (one per datagram: bounded work), else `None`, the
/// datagram dropped and counted.
fn admit_flow(fwd: &Forward, table: &mut Table) -> Option<Option<OwnedSemaphorePermit>> {
    if let Ok(slot) = fwd.upstreams.admit() {
        return Some(slot);
    }
    if table
        .order
        .evict_unconfirmed(&mut table.flows, &Flow::standing)
    {
        if let Ok(slot) = fwd.upstreams.admit() {
            return Some(slot);
        }
    }
    fwd.counters.error(ErrorKind::OverCapacity);
    None
}

async fn new_flow(
    listen: Arc<UdpListener>,
    fwd: &Arc<Forward>,
    (client, local_ip): FlowKey,
    id: u64,
    (slot, source): (Option<OwnedSemaphorePermit>, SourceSlot),
) -> Option<Flow> {
    let Some((backend, lease)) = fwd.upstreams.pick(Some(client.ip())) else {
        fwd.counters.error(ErrorKind::NoHealthyBackend);
        return None;
    };
    let any: IpAddr = if backend.addr.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let sock = match UdpSocket::bind(SocketAddr::new(any, 0)).await {
        Ok(s) => s,
        Err(e) => {
            // The hub's own limit (open files, memory), not the backend's.
            debug!(error = %e, "udp flow socket");
            fwd.counters.error(ErrorKind::OverCapacity);
            return None;
        }
    };
    if let Err(e) = sock.connect(backend.addr).await {
        debug!(backend = %backend, error = %e, "udp connect");
        fwd.upstreams.mark_down(backend.addr);
        fwd.counters.error(ErrorKind::BackendRefused);
        return None;
    }
    let mut header = Vec::new();
    if fwd.proxy_protocol != ProxyProtocol::Off {
        let bound = listen.local_addr().unwrap_or(fwd.listen);
        let dst = SocketAddr::new(local_ip.unwrap_or(bound.ip()), bound.port());
        encode_v2(&mut header, Transport::Udp, client, dst);
    }
    let sock = Arc::new(sock);
    let activity = Activity::new();
    let tally = Arc::new(FlowTally::default());
    let (s2, a2, f2, t2) = (sock.clone(), activity.clone(), fwd.clone(), tally.clone());
    let task = tokio::spawn(async move {
        let _lease = lease;
        loop {
            let got = match s2.readable().await {
                Ok(()) => REPLY_BUF.with_borrow_mut(|buf| {
                    s2.try_recv(buf).map(|n| buf.get(..n).map(<[u8]>::to_vec))
                }),
                Err(e) => Err(e),
            };
            let d = match got {
                Ok(Some(d)) => d,
                Ok(None) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    // ECONNREFUSED from an ICMP port unreachable: the backend is down.
                    debug!(backend = %backend, error = %e, "udp flow ended");
                    f2.upstreams.mark_down(backend.addr);
                    f2.counters.error(ErrorKind::BackendRefused);
                    t2.refused.store(true, Relaxed);
                    return;
                }
            };
            let n = d.len() as u64;
            // Dropped for the forward's `bandwidth`: no activity either.
            if !f2.bandwidth.admit(false, n) {
                f2.counters.error(ErrorKind::OverBandwidth);
                continue;
            }
            match listen.send(client, local_ip, &d).await {
                Ok(()) => {
                    a2.touch();
                    t2.answered.store(true, Relaxed);
                    f2.counters.add_out(n);
                    t2.bytes_out.fetch_add(n, Relaxed);
                }
                Err(e) => {
                    debug!(client = %client, error = %e, "udp send to client");
                    f2.counters.error(ErrorKind::ClientAborted);
                }
            }
        }
    });
    fwd.counters.request();
    let log = fwd.access_log.as_ref().map(|l| {
        let mut e = Entry::new(crate::clock::unix_ms(), client, LogKind::Udp, false);
        e.route = Some(fwd.id.clone());
        e.backend = Some(backend.addr);
        (l.clone(), e)
    });
    Some(Flow {
        id,
        sock,
        activity,
        seen: Instant::now(),
        confirmed: false,
        task,
        fwd: fwd.clone(),
        backend: backend.addr,
        header,
        bytes_in: 0,
        tally,
        log,
        _slot: slot,
        _source: source,
    })
}

/// A listener's flows.
#[derive(Default)]
struct Table {
    flows: HashMap<FlowKey, Flow>,
    /// The order in which a full table lets flows go.
    order: FlowOrder<FlowKey>,
    /// Flows per client (`max_flows_per_source`).
    sources: Arc<PerSource>,
    /// A datagram to a backend behind its PROXY header (one buffer for all
    /// flows).
    out: Vec<u8>,
}

/// Handles one datagram from `key.0` for the forward `fwd`.
async fn on_datagram(
    listen: &Arc<UdpListener>,
    fwd: &Arc<Forward>,
    table: &mut Table,
    key: FlowKey,
    data: &[u8],
) {
    let flows = &mut table.flows;
    let client = key.0;
    let Some(cfg) = fwd.udp.as_ref() else { return };
    // Checked per datagram against the current rules, so a reload that
    // denies a client also ends its open flow.
    if !fwd.access.permits(client.ip()) {
        if flows.remove(&key).is_some() {
            debug!(client = %client, "udp flow ended: client address denied");
        }
        fwd.counters.error(ErrorKind::Denied);
        return;
    }
    // A flood from one client (a reflection attempt through a DNS backend,
    // say) is cut to its rate; the flow stays.
    if crate::proxy::server::over_limit(&fwd.limiter, client.ip()).is_some() {
        fwd.counters.error(ErrorKind::RateLimited);
        return;
    }
    let live = flows.get(&key).is_some_and(|f| !f.task.is_finished());
    if !live {
        flows.remove(&key);
    }
    // Beyond the forward's `bandwidth` (all clients together): dropped, as
    // a full link would (before a flow is started for it).
    if !fwd.bandwidth.admit(true, data.len() as u64) {
        fwd.counters.error(ErrorKind::OverBandwidth);
        return;
    }
    if !live {
        let Some(source) = admit_source(table, client.ip(), cfg.max_flows_per_source) else {
            fwd.counters.error(ErrorKind::OverCapacity);
            return;
        };
        let Some(slot) = admit_flow(fwd, table) else {
            return;
        };
        let id = table.order.next_id();
        let Some(f) = new_flow(listen.clone(), fwd, key, id, (slot, source)).await else {
            return;
        };
        // Only a datagram that does start a flow (let in, a backend
        // picked, its socket set up) makes another flow go.
        table
            .order
            .insert(&mut table.flows, cfg.max_flows, key, f, Flow::standing);
    }
    let flows = &mut table.flows;
    let Some(f) = flows.get_mut(&key) else { return };
    f.activity.touch();
    f.seen = Instant::now();
    f.confirmed |= f.tally.answered.load(Relaxed);
    let sent = if f.header.is_empty() {
        f.sock.send(data).await
    } else {
        let out = &mut table.out;
        out.clear();
        out.extend_from_slice(&f.header);
        out.extend_from_slice(data);
        f.sock.send(out).await
    };
    match sent {
        Ok(_) => {
            f.fwd.counters.add_in(data.len() as u64);
            f.bytes_in += data.len() as u64;
        }
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            // An ICMP refusal, reported on this send: the backend is down;
            // the client's next datagram starts a flow to another.
            debug!(backend = %f.backend, error = %e, "udp send to backend refused");
            f.fwd.upstreams.mark_down(f.backend);
            f.fwd.counters.error(ErrorKind::BackendRefused);
            f.tally.refused.store(true, Relaxed);
            flows.remove(&key);
        }
        Err(e) => {
            debug!(backend = %f.backend, error = %e, "udp send to backend");
            f.fwd.counters.error(send_error_kind(&e));
        }
    }
}

/// How a failed send to a backend is counted: a datagram too large to go
/// (with its PROXY header, over the UDP maximum) is the client's; a path to
/// the backend gone is the backend's; only the hub's own lack of buffers is
/// `over_capacity`.
fn send_error_kind(e: &std::io::Error) -> ErrorKind {
    match e.raw_os_error() {
        Some(libc::EMSGSIZE) => ErrorKind::BodyTooLarge,
        Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN | libc::ENETDOWN) => {
            ErrorKind::BackendRefused
        }
        _ => ErrorKind::OverCapacity,
    }
}

/// Runs one UDP forward until `stop`.
pub(crate) async fn udp_loop(
    listen: Arc<UdpListener>,
    lookup: Lookup,
    mut stop: watch::Receiver<bool>,
) {
    let mut table = Table::default();
    let mut bufs: [Vec<u8>; UDP_BATCH] = std::array::from_fn(|_| vec![0u8; 65535]);
    let mut meta = [quinn_udp::RecvMeta::default(); UDP_BATCH];
    let mut sweep = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            r = async {
                let mut iovs = bufs.each_mut().map(|b| std::io::IoSliceMut::new(b));
                listen.recv(&mut iovs, &mut meta).await
            } => {
                let n = match r {
                    Ok(n) => n,
                    Err(e) => {
                        // Never a spin on a socket that keeps failing.
                        debug!(error = %e, "udp recv");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // One look at the current config per batch.
                let Some(fwd) = lookup() else { continue };
                for (buf, m) in bufs.iter().zip(meta.iter()).take(n) {
                    let Some(data) = buf.get(..m.len) else { continue };
                    // UDP GRO hands over a train of datagrams of `stride`
                    // bytes each (the last may be shorter).
                    let key = (m.addr, m.dst_ip);
                    if data.is_empty() {
                        on_datagram(&listen, &fwd, &mut table, key, data).await;
                        continue;
                    }
                    let stride = if m.stride == 0 { m.len } else { m.stride };
                    for d in data.chunks(stride) {
                        on_datagram(&listen, &fwd, &mut table, key, d).await;
                    }
                }
            }
            _ = sweep.tick() => {
                // A flow whose backend went down (its check, its node's
                // tunnel) or left the forward in a reload ends, though its
                // client keeps sending: the client's next datagram starts a
                // flow to a backend that is up. The backend's datagrams do
                // not keep a flow whose client went quiet: they may be going
                // to a forged address, or to one that went away.
                // Nor does a flow whose client a reload denied: the
                // backend's datagrams stop reaching it now, not at its next.
                let current = lookup();
                table.flows.retain(|(client, _), f| {
                    let idle = f.fwd.udp.as_ref().map_or(Duration::ZERO, |u| u.flow_idle_timeout);
                    let served = current.as_ref().is_none_or(|c| c.upstreams.serves(f.backend));
                    if !served {
                        debug!(backend = %f.backend, "udp flow moved off its backend");
                    }
                    let permitted = current.as_ref().is_none_or(|c| c.access.permits(client.ip()));
                    if !permitted {
                        debug!(client = %client, "udp flow ended: client address denied");
                        f.fwd.counters.error(ErrorKind::Denied);
                    }
                    served && permitted && !f.task.is_finished() && f.seen.elapsed() < idle
                });
            }
            _ = stop.changed() => break,
        }
    }
}
