//! Node mode: dials out to one or more hubs from behind NAT and keeps the
//! tunnels up. A hub that has gone silent for `dead_after` seconds (its
//! keepalives stopped: restarted, or the NAT mapping changed) gets a fresh
//! handshake at once, its name re-resolved, rather than after WireGuard's
//! default of up to two minutes. A hub address learnt after the node routed
//! its hubs' allowed IPs (the name resolved late, or to a new address) takes
//! out any of those routes that holds it, which would loop the tunnel's own
//! packets. A hub that UDP does not reach is reached over TLS on its HTTPS
//! port ([`crate::carrier`], `transport` in `[[hub]]`). The node also runs
//! its `[[service]]`
//! forwarders and declares the services to hubs with `control`
//! ([`crate::control::services`]).

use crate::backoff::Backoff;
use crate::carrier::path::{Path, Step, Transport, Via};
use crate::carrier::{self, Counters};
use crate::config::{NodeConfig, NodeHub};
use crate::wg::api::ApiServer;
use crate::wg::device::{Device, DeviceConfig, Inner, Mode, PeerConfig};
use ipnet::IpNet;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

/// Between two handshake attempts to a silent hub at first (WireGuard's
/// REKEY_TIMEOUT), each wait drawn within [`RETRY_JITTER_PCT`] of it.
const RETRY_MS: u64 = 5_000;
/// How far (in percent, either way) each wait is drawn from [`RETRY_MS`],
/// so that nodes that lost their hub at the same moment (it restarted) do
/// not come back in step.
const RETRY_JITTER_PCT: u64 = 20;
/// Attempts [`RETRY_MS`] apart (about two minutes of them) before the waits
/// grow ([`slow_retries`]).
const FAST_TRIES: u32 = 24;

/// The waits after [`FAST_TRIES`] attempts went unanswered: 15 s doubling
/// to 60 s, each drawn between half and all of that (7.5–15 s, 15–30 s,
/// then 30–60 s), for as long as the hub stays silent.
fn slow_retries() -> Backoff {
    Backoff::new(
        Duration::from_secs(15),
        Duration::from_secs(60),
        Duration::MAX,
    )
}

/// Resolves a hub's `host:port`. A name with several addresses gives the
/// one at `turn` (modulo their number): callers count their failed
/// attempts, so a dead first address (IPv6 routed but broken, a hub's
/// retired address) does not stop the node from trying the others.
async fn resolve(endpoint: &str, turn: usize) -> Option<SocketAddr> {
    let all = resolve_all(endpoint).await?;
    all.get(turn.checked_rem(all.len())?).copied()
}

/// Every address of a hub's `host:port` (at least one), in the resolver's
/// order; a failure is logged once per error.
async fn resolve_all(endpoint: &str) -> Option<Vec<SocketAddr>> {
    if let Ok(a) = endpoint.parse() {
        return Some(vec![a]);
    }
    let r = match tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(endpoint))
        .await
    {
        Ok(Ok(addrs)) => {
            let mut all: Vec<SocketAddr> = Vec::new();
            for a in addrs {
                if !all.contains(&a) {
                    all.push(a);
                }
            }
            if all.is_empty() {
                Err("no address".to_string())
            } else {
                Ok(all)
            }
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out after 5 s".to_string()),
    };
    let said = {
        let mut f = RESOLVE_FAILURES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        note_resolution(
            &mut f,
            endpoint,
            r.as_ref().map(|_| ()).map_err(String::as_str),
        )
    };
    match (&r, said) {
        (Err(e), Said::Warn) => {
            warn!(endpoint, error = %e, "cannot resolve hub (said again only when the error changes)")
        }
        (Err(e), _) => debug!(endpoint, error = %e, "cannot resolve hub"),
        (Ok(_), Said::Recovered) => info!(endpoint, "hub resolves again"),
        (Ok(_), _) => {}
    }
    r.ok()
}

/// The address of a hub's name to try next, from `all` (as resolved): the
/// one the peer has (`current`) on the first try after a silence, while the
/// name still has it (one lost keepalive must not move a working endpoint
/// to an address that may not work); else the one at `turn`, which then
/// moves on. After keeping `current`, the next try takes the address after
/// it.
fn next_endpoint(
    all: &[SocketAddr],
    current: Option<SocketAddr>,
    first_try: bool,
    turn: &mut usize,
) -> Option<SocketAddr> {
    if first_try {
        if let Some(i) = current.and_then(|c| all.iter().position(|a| *a == c)) {
            *turn = i.wrapping_add(1);
            return all.get(i).copied();
        }
    }
    let t = *turn;
    *turn = turn.wrapping_add(1);
    all.get(t.checked_rem(all.len())?).copied()
}

/// Hub names whose last resolution failed, with its error: a hub whose name
/// does not resolve is tried every few seconds, and the log says so once
/// per distinct error, not every time.
static RESOLVE_FAILURES: std::sync::Mutex<BTreeMap<String, String>> =
    std::sync::Mutex::new(BTreeMap::new());

#[derive(Debug, PartialEq, Eq)]
enum Said {
    /// A failure not said before: warn.
    Warn,
    /// The same failure as the last time, or a success after a success.
    Quiet,
    /// A success after failures: say so once.
    Recovered,
}

/// Records how resolving `endpoint` went and says what to log.
fn note_resolution(
    failures: &mut BTreeMap<String, String>,
    endpoint: &str,
    outcome: Result<(), &str>,
) -> Said {
    match outcome {
        Ok(()) => match failures.remove(endpoint) {
            Some(_) => Said::Recovered,
            None => Said::Quiet,
        },
        Err(e) => {
            if failures.get(endpoint).is_some_and(|last| last == e) {
                return Said::Quiet;
            }
            // Hub names come from the config: a handful, but bounded anyway.
            if failures.len() >= 256 && !failures.contains_key(endpoint) {
                failures.clear();
            }
            failures.insert(endpoint.to_string(), e.to_string());
            Said::Warn
        }
    }
}

/// What the supervisor should do about one hub at time `now_ms`.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    Fine,
    /// Nothing heard for too long and the wait after the last attempt over.
    Rehandshake,
    Waiting,
}

/// When the supervisor handshakes again with a silent hub [pure]: at once,
/// then [`RETRY_MS`] apart, ±[`RETRY_JITTER_PCT`]%, for [`FAST_TRIES`]
/// attempts, then further apart ([`slow_retries`]); from the start again
/// once the hub is heard. Every handshake the supervisor forces (a change
/// of path too) is an attempt.
#[derive(Debug, Clone)]
pub struct Retries {
    /// Attempts since the hub was last heard from.
    tries: u32,
    slow: Backoff,
    /// The last attempt, and the wait drawn after it.
    last: Option<(u64, u64)>,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            tries: 0,
            slow: slow_retries(),
            last: None,
        }
    }
}

impl Retries {
    /// The decision at `now_ms`; `last_rx_ms` is 0 when the hub was never
    /// heard from. A hub heard after the last attempt that falls silent
    /// again gets an attempt at once.
    pub fn check(&self, now_ms: u64, last_rx_ms: u64, dead_after_ms: u64) -> Check {
        let silent = last_rx_ms == 0 || now_ms.saturating_sub(last_rx_ms) >= dead_after_ms;
        if !silent {
            return Check::Fine;
        }
        match self.last {
            Some((t, wait)) if now_ms.saturating_sub(t) < wait && t >= last_rx_ms => Check::Waiting,
            _ => Check::Rehandshake,
        }
    }

    /// An attempt was made at `now_ms` (the hub last heard at
    /// `last_rx_ms`); `jitter` in `[0, 1]` draws the wait before the next.
    /// When the next is due.
    pub fn attempted(&mut self, now_ms: u64, last_rx_ms: u64, jitter: f64) -> u64 {
        if self.last.is_some_and(|(t, _)| last_rx_ms > t) {
            // Heard since the last attempt: a new silence.
            self.heard();
        }
        self.tries = self.tries.saturating_add(1);
        let j = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let wait = if self.tries < FAST_TRIES {
            let spread = RETRY_MS * RETRY_JITTER_PCT / 100;
            // Within ±spread of RETRY_MS.
            RETRY_MS - spread + (2.0 * spread as f64 * j) as u64
        } else {
            let d = self.slow.next_delay(Duration::ZERO, j);
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
        };
        self.last = Some((now_ms, wait));
        now_ms.saturating_add(wait)
    }

    /// The hub was heard: the next silence starts with short waits again.
    pub fn heard(&mut self) {
        if self.tries > 0 {
            *self = Retries {
                last: self.last,
                ..Retries::default()
            };
        }
    }

    /// Attempts since the hub was last heard from.
    pub fn tries(&self) -> u32 {
        self.tries
    }
}

/// The routes of the hubs' allowed IPs (for the endpoint guard).
#[derive(Default)]
struct Routes {
    /// In the TUN now.
    routed: Vec<IpNet>,
    /// Taken out, or never added, because they held a hub's first hop:
    /// routed again once none does.
    displaced: Vec<IpNet>,
    /// Each hub's first hops as last resolved, by hub and way (`udp`: its
    /// endpoint; `tls`: its TLS endpoint or proxy).
    hops: BTreeMap<(String, &'static str), IpAddr>,
}

/// The routes, and a lock that one hub's supervisor holds over a whole
/// change (deciding, then running `ip route`): two supervisors resolving at
/// once would otherwise interleave, one restoring a route while the other,
/// not seeing it listed yet, finds its hub's address inside it.
#[derive(Default)]
struct RouteState {
    routes: Mutex<Routes>,
    changing: tokio::sync::Mutex<()>,
}

impl RouteState {
    fn lock(&self) -> parking_lot::MutexGuard<'_, Routes> {
        self.routes.lock()
    }
}

type Routed = Arc<RouteState>;

/// Notes `endpoint` as `hub`'s first hop by way of `way` and removes the
/// routes that hold it, an address learnt after they were added: routed into
/// the tunnel, the tunnel's own packets to the hub would loop and the node
/// could never reach it. Routes removed so, which hold no hub's first hop
/// any more (the name resolved elsewhere: a captive portal's DNS answered
/// inside a routed prefix, then the real network came back), go back in.
async fn unroute_endpoint(
    dev: &Inner,
    routed: &Routed,
    endpoint: IpAddr,
    iface: &str,
    hub: &str,
    way: &'static str,
) {
    let _changing = routed.changing.lock().await;
    let (nets, back) = {
        let mut r = routed.lock();
        r.hops.insert((hub.to_string(), way), endpoint);
        let nets = crate::wg::route::holding(&r.routed, endpoint);
        r.routed.retain(|n| !nets.contains(n));
        let hops: Vec<IpAddr> = r.hops.values().copied().collect();
        let back = crate::wg::route::restorable(&r.displaced, &hops);
        r.displaced.retain(|n| !back.contains(n));
        (nets, back)
    };
    for net in back {
        let i = iface.to_string();
        let r = tokio::task::spawn_blocking(move || crate::wg::route::replace(&net, &i)).await;
        match r {
            Ok(Ok(())) => {
                dev.add_tun_routes([net]);
                routed.lock().routed.push(net);
                info!(hub, route = %net, interface = iface, "route restored: it holds no hub address any more");
            }
            Ok(Err(e)) => {
                routed.lock().displaced.push(net);
                warn!(hub, route = %net, error = %e, "cannot restore the route; trying again at the next resolution");
            }
            Err(e) => {
                routed.lock().displaced.push(net);
                warn!(hub, route = %net, error = %e, "route restoration did not run");
            }
        }
    }
    for net in nets {
        let i = iface.to_string();
        // A failed delete of a route that is gone anyway (removed by hand)
        // is a removal; one that is still there stays listed, to be tried
        // again at the next resolution.
        let r = tokio::task::spawn_blocking(move || {
            crate::wg::route::delete(&net, &i).or_else(|e| {
                match crate::wg::route::exists(&net, &i) {
                    Ok(false) => Ok(()),
                    _ => Err(e),
                }
            })
        })
        .await;
        match r {
            Ok(Ok(())) => {
                dev.remove_tun_route(&net);
                routed.lock().displaced.push(net);
                warn!(
                    hub,
                    route = %net,
                    interface = iface,
                    "route removed: it holds the hub endpoint {endpoint}: the tunnel's own packets would loop"
                )
            }
            Ok(Err(e)) => {
                routed.lock().routed.push(net);
                warn!(hub, route = %net, error = %e, "cannot remove the route holding the hub endpoint")
            }
            Err(e) => {
                routed.lock().routed.push(net);
                warn!(hub, route = %net, error = %e, "route removal did not run")
            }
        }
    }
}

/// How one hub is reached, for `gatewire show`.
pub struct HubPath {
    name: String,
    transport: Transport,
    tls_endpoint: String,
    tls_proxy: Option<String>,
    websocket: Option<String>,
    via: Mutex<Via>,
    counters: Arc<Counters>,
}

impl HubPath {
    fn new(hub: &NodeHub) -> Arc<HubPath> {
        Arc::new(HubPath {
            name: hub_name(hub),
            transport: hub.transport,
            tls_endpoint: hub.tls_endpoint.clone(),
            tls_proxy: hub.tls_proxy.clone(),
            websocket: hub.websocket.as_ref().map(|w| w.url.clone()),
            via: Mutex::new(Path::new(hub.transport, 0).via()),
            counters: Arc::default(),
        })
    }

    fn show(&self) -> serde_json::Value {
        serde_json::json!({
            "hub": self.name,
            "transport": self.transport,
            "via": *self.via.lock(),
            "tls_endpoint": self.tls_endpoint,
            "tls_proxy": self.tls_proxy,
            "websocket": self.websocket,
            "tls": self.counters.snapshot(),
        })
    }
}

fn hub_name(hub: &NodeHub) -> String {
    hub.name
        .clone()
        .unwrap_or_else(|| hub.public_key.to_base64())
}

/// A carried tunnel's relay task (aborted when dropped).
struct Relay(tokio::task::JoinHandle<carrier::End>);

impl Drop for Relay {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Connects the TLS carrier to `hub` and starts relaying it to the device;
/// returns the relay and its loopback address (the hub's endpoint from now).
async fn open_carrier(
    dev: &Inner,
    hub: &NodeHub,
    tls: Arc<rustls::ClientConfig>,
    counters: Arc<Counters>,
    routed: &Routed,
    iface: &str,
    turn: usize,
) -> anyhow::Result<(Relay, SocketAddr)> {
    let (host, _) = carrier::split_host_port(&hub.tls_endpoint).ok_or_else(|| {
        anyhow::anyhow!("tls_endpoint `{}`: expected host:port", hub.tls_endpoint)
    })?;
    // The first hop (the hub, or the proxy) must not be routed into the tunnel.
    let first = hub.tls_proxy.as_deref().unwrap_or(&hub.tls_endpoint);
    let addr = resolve(first, turn)
        .await
        .ok_or_else(|| anyhow::anyhow!("cannot resolve {first}"))?;
    unroute_endpoint(dev, routed, addr.ip(), iface, &hub_name(hub), "tls").await;
    let dial = match &hub.tls_proxy {
        None => carrier::Dial::Direct(addr),
        Some(_) => carrier::Dial::Proxy {
            proxy: addr,
            authority: hub.tls_endpoint.clone(),
            auth: hub.tls_proxy_auth.clone(),
        },
    };
    let udp = carrier::local_socket(dev.loopback()).await?;
    let local = udp.local_addr()?;
    let task = match &hub.websocket {
        None => {
            let stream = carrier::connect(tls, &dial, host, Duration::from_secs(5))
                .await
                .map_err(|e| anyhow::Error::new(e).context(first.to_string()))?;
            tokio::spawn(async move {
                carrier::relay_node(
                    stream,
                    &udp,
                    carrier::IDLE,
                    &counters,
                    carrier::Framing::Length,
                )
                .await
            })
        }
        Some(target) => {
            let stream = carrier::connect_ws(tls, &dial, host, target, Duration::from_secs(5))
                .await
                .map_err(|e| anyhow::Error::new(e).context(target.url.to_string()))?;
            tokio::spawn(async move {
                carrier::relay_node(
                    stream,
                    &udp,
                    carrier::IDLE,
                    &counters,
                    carrier::Framing::WsNode,
                )
                .await
            })
        }
    };
    Ok((Relay(task), local))
}

/// A draw in `[0, 1]` for the jitter of the waits between reconnects.
fn jitter() -> f64 {
    f64::from(rand_core::RngCore::next_u32(&mut rand_core::OsRng)) / f64::from(u32::MAX)
}

/// How long a UDP try waits for the hub's answer before a keepalive through
/// the stream claims the hub's endpoint for this node back.
const PROBE_ANSWER_MS: u64 = 500;

/// The TLS client settings of `hub`'s carrier (none on UDP only). A
/// `wss://` one reads the system's CA bundle unless it has `websocket_ca`.
fn carrier_client(hub: &NodeHub) -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
    let cfg = match (hub.transport, &hub.websocket) {
        (Transport::Udp, _) => return Ok(None),
        (_, Some(w)) if w.tls => carrier::ws_client_config(&w.trust),
        // (Unused: `ws://` has no TLS.)
        (_, Some(_)) => carrier::ws_client_config(&carrier::WsTrust::Off),
        (_, None) => carrier::client_config(),
    };
    cfg.map(Some)
        .map_err(|e| anyhow::anyhow!("hub {}: {e:#}", hub_name(hub)))
}

/// Waits after a proxy refused the credentials: 1 min doubling up to 1 h,
/// jittered (a proxy that checks them against a directory may lock the
/// account after a few failures; the same credentials rarely pass later).
fn proxy_auth_backoff() -> Backoff {
    Backoff::new(
        Duration::from_secs(60),
        Duration::from_secs(3600),
        Duration::MAX,
    )
}

async fn supervise(
    dev: Arc<Inner>,
    hub: NodeHub,
    tls: Option<Arc<rustls::ClientConfig>>,
    dead_after: u16,
    routed: Routed,
    iface: String,
    status: Arc<HubPath>,
) {
    let name = hub_name(&hub);
    let dead_after_ms = u64::from(dead_after) * 1000;
    // When to handshake again while the hub is silent.
    let mut retries = Retries::default();
    let mut down_logged = false;
    let mut path = Path::new(hub.transport, dev.now_ms())
        .with_udp_retry(hub.udp_retry * 1000)
        .with_jitter(jitter);
    let mut relay: Option<Relay> = None;
    // The relay's local address: the peer's endpoint while on TLS.
    let mut relay_local: Option<SocketAddr> = None;
    // The hub's last two-way time when the relay opened: a relay closed
    // with none later never reached a hub that knows this node.
    let mut relay_rx = 0u64;
    // A UDP try not answered yet: when it was sent.
    let mut probe_sent: Option<u64> = None;
    let mut tls_failing = false;
    // Failed attempts so far, to go through a name's addresses in turn.
    let mut udp_turn = 0usize;
    // Handshakes forced since the hub fell silent.
    let mut silent_tries = 0u32;
    // The last UDP endpoint set (kept when leaving TLS while the name does
    // not resolve, rather than the relay's address).
    let mut last_udp: Option<SocketAddr> = dev
        .peer(&hub.public_key)
        .and_then(|p| p.endpoint())
        .filter(|_| hub.transport != Transport::Tls);
    let mut tls_turn = 0usize;
    // A stream that carried the tunnel ended and the new one failed.
    let mut reconnect_failed = false;
    // The waiting reconnect last logged (when due).
    let mut reconnect_logged: Option<u64> = None;
    // The proxy in front refused the credentials: no TLS try before then.
    let mut proxy_hold: Option<u64> = None;
    let mut proxy_backoff = proxy_auth_backoff();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    // The peer was removed at runtime (`wg set ... remove`): supervised
    // afresh if it comes back.
    let mut gone = false;
    loop {
        tick.tick().await;
        let Some(peer) = dev.peer(&hub.public_key) else {
            if !gone {
                info!(hub = %name, "the hub's peer was removed; supervising it again if it comes back");
                gone = true;
                // (Dropping the relay closes the stream.)
                relay = None;
                relay_local = None;
                probe_sent = None;
            }
            continue;
        };
        if std::mem::take(&mut gone) {
            info!(hub = %name, "the hub's peer is back");
            path = Path::new(hub.transport, dev.now_ms())
                .with_udp_retry(hub.udp_retry * 1000)
                .with_jitter(jitter);
            *status.via.lock() = path.via();
            retries = Retries::default();
            peer.hold_initiations(0);
            down_logged = false;
            tls_failing = false;
        }
        let now = dev.now_ms();
        // Heard both ways: a hub's initiations alone (its answers to ours
        // lost, or ours to it) leave the path dead.
        let rx = peer.last_two_way_ms();
        // On TLS, the hub answered a UDP probe: the peer's endpoint moved off
        // the relay (only an authenticated datagram moves it). UDP it is.
        if path.via() == Via::Tls
            && relay.is_some()
            && peer.endpoint().is_some_and(|e| Some(e) != relay_local)
            && path.udp_answered(now)
        {
            info!(hub = %name, endpoint = ?peer.endpoint(), "the hub answers over UDP again; leaving TLS");
            *status.via.lock() = Via::Udp;
            // (Dropping the relay closes the stream.)
            relay = None;
            relay_local = None;
            probe_sent = None;
            continue;
        }
        // A UDP try that got no answer in PROBE_ANSWER_MS: the try itself
        // may have moved the hub's endpoint for this node to UDP (it moves on
        // any authenticated packet), where its answers may not come back. A
        // keepalive through the stream moves it back.
        if probe_sent.is_some_and(|t| now.saturating_sub(t) >= PROBE_ANSWER_MS) {
            probe_sent = None;
            if path.via() == Via::Tls && relay.is_some() {
                dev.send_keepalive(&peer).await;
            }
        }
        let up = relay.as_ref().is_some_and(|r| !r.0.is_finished());
        if let Some(l) = relay_local.filter(|_| relay.is_some() && !up) {
            // The relay's port is free for another relay (another hub's):
            // this hub's packets must not follow it there.
            peer.forget_endpoint_at(l);
        }
        // A stream killed moments after it carried, before a step saw it up.
        if relay.is_some() {
            path.stream_heard(rx);
        }
        let step = match &tls {
            Some(_) => path.step(now, rx, up, dead_after_ms),
            None => Step::Stay,
        };
        if let Some(at) = path
            .reconnect_at()
            .filter(|at| reconnect_logged != Some(*at))
        {
            reconnect_logged = Some(at);
            info!(hub = %name, wait_ms = at.saturating_sub(now), "the TLS carrier keeps ending soon after it opens; waiting before the next");
        }
        let had_relay = relay.is_some();
        if let Some(r) = relay
            .as_mut()
            .filter(|_| !matches!(step, Step::Stay | Step::ProbeUdp))
        {
            if r.0.is_finished() {
                if let Ok(end) = (&mut r.0).await {
                    info!(hub = %name, end = ?end, "TLS carrier closed");
                }
            } else {
                info!(hub = %name, "TLS carrier carries nothing; closing it");
            }
            if rx <= relay_rx {
                // Never heard through: the name's next address next time
                // (the first may be a host that takes the stream but is not
                // this node's hub).
                tls_turn = tls_turn.wrapping_add(1);
            }
            relay = None;
            relay_local = None;
        }
        match (step, &tls) {
            (Step::Stay, _) | (_, None) => {}
            (Step::ProbeUdp, _) => {
                // In the background: the stream keeps carrying the tunnel.
                if let Some(addr) = resolve(&hub.endpoint, udp_turn).await {
                    udp_turn = udp_turn.wrapping_add(1);
                    debug!(hub = %name, endpoint = %addr, "trying UDP to the hub while on TLS");
                    unroute_endpoint(&dev, &routed, addr.ip(), &iface, &name, "udp").await;
                    dev.probe_handshake(&peer, addr).await;
                    probe_sent = Some(dev.now_ms());
                }
            }
            (Step::UseUdp, _) => {
                // Quiet while the hub is unreachable either way (every
                // FALLBACK_MS); said when leaving a stream that worked.
                if had_relay || std::mem::take(&mut reconnect_failed) {
                    info!(hub = %name, endpoint = %hub.endpoint, "reaching the hub over UDP");
                } else {
                    debug!(hub = %name, endpoint = %hub.endpoint, "trying the hub over UDP again");
                }
                *status.via.lock() = Via::Udp;
                if let Some(addr) = resolve(&hub.endpoint, udp_turn).await.or(last_udp) {
                    unroute_endpoint(&dev, &routed, addr.ip(), &iface, &name, "udp").await;
                    peer.set_endpoint(addr);
                    last_udp = Some(addr);
                }
                dev.force_handshake(&peer).await;
                attempted(&mut retries, &peer, dev.now_ms(), rx);
                continue;
            }
            (Step::UseTls, Some(cfg)) => {
                *status.via.lock() = Via::Tls;
                if proxy_hold.is_some_and(|t| now < t) {
                    attempted(&mut retries, &peer, dev.now_ms(), rx);
                    continue;
                }
                match open_carrier(
                    &dev,
                    &hub,
                    cfg.clone(),
                    status.counters.clone(),
                    &routed,
                    &iface,
                    tls_turn,
                )
                .await
                {
                    Ok((r, local)) => {
                        info!(hub = %name, tls_endpoint = %hub.tls_endpoint, relay = %local, "reaching the hub over TLS");
                        tls_failing = false;
                        proxy_hold = None;
                        proxy_backoff = proxy_auth_backoff();
                        relay = Some(r);
                        relay_local = Some(local);
                        relay_rx = rx;
                        peer.set_endpoint(local);
                        dev.force_handshake(&peer).await;
                    }
                    Err(e) => {
                        tls_turn = tls_turn.wrapping_add(1);
                        reconnect_failed = had_relay;
                        status
                            .counters
                            .failed
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if carrier::is_proxy_auth_refused(&e) {
                            let wait = proxy_backoff.next_delay(Duration::ZERO, jitter());
                            let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
                            proxy_hold = Some(dev.now_ms().saturating_add(wait_ms));
                            warn!(hub = %name, error = %format!("{e:#}"), retry_in_s = wait.as_secs(),
                                  "the proxy refused the credentials; trying again later (set tls_proxy or tls_proxy_auth_file right and restart the node)");
                            tls_failing = true;
                        } else if tls_failing {
                            debug!(hub = %name, error = %format!("{e:#}"), "cannot reach the hub over TLS");
                        } else {
                            warn!(hub = %name, error = %format!("{e:#}"), "cannot reach the hub over TLS");
                            tls_failing = true;
                        }
                    }
                }
                attempted(&mut retries, &peer, dev.now_ms(), rx);
                continue;
            }
        }
        match retries.check(now, rx, dead_after_ms) {
            Check::Fine => {
                silent_tries = 0;
                if retries.tries() > 0 {
                    retries.heard();
                    peer.hold_initiations(0);
                }
                if down_logged {
                    info!(hub = %name, "hub reachable again");
                    down_logged = false;
                }
            }
            Check::Waiting => {}
            Check::Rehandshake => {
                if rx > 0 && !down_logged {
                    info!(hub = %name, silent_s = (now - rx) / 1000, "hub silent, handshaking again");
                    down_logged = true;
                }
                // Through the TLS carrier the endpoint is the relay's, fixed.
                if path.via() == Via::Udp {
                    // Each attempt after the first takes the name's next
                    // address (a name with one address: always it,
                    // re-resolved).
                    let first_try = silent_tries == 0;
                    let addr = match resolve_all(&hub.endpoint).await {
                        Some(all) => next_endpoint(&all, peer.endpoint(), first_try, &mut udp_turn),
                        None => None,
                    };
                    if let Some(addr) = addr {
                        if peer.endpoint() != Some(addr) {
                            info!(hub = %name, endpoint = %addr, "hub endpoint");
                        }
                        unroute_endpoint(&dev, &routed, addr.ip(), &iface, &name, "udp").await;
                        peer.set_endpoint(addr);
                        last_udp = Some(addr);
                    }
                }
                silent_tries = silent_tries.saturating_add(1);
                dev.force_handshake(&peer).await;
                attempted(&mut retries, &peer, dev.now_ms(), rx);
            }
        }
    }
}

/// Notes a handshake attempt at `now_ms` (the hub last heard at `rx`):
/// the peer's own timers send no initiation before the next is due, so
/// that the supervisor's jittered, backing-off waits are the node's.
fn attempted(retries: &mut Retries, peer: &crate::wg::device::Peer, now_ms: u64, rx: u64) {
    let next = retries.attempted(now_ms, rx, jitter());
    peer.hold_initiations(next);
}

/// What of a reloaded config the running node cannot take without a
/// restart (everything but `[[service]]`), for the warning.
pub fn needs_restart(old: &NodeConfig, new: &NodeConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.private_key.public_key() != new.private_key.public_key() {
        out.push("private_key");
    }
    if old.interface != new.interface {
        out.push("interface");
    }
    if old.listen_port != new.listen_port {
        out.push("listen_port");
    }
    if old.addresses != new.addresses {
        out.push("addresses");
    }
    if old.mtu != new.mtu {
        out.push("mtu");
    }
    if old.dead_after != new.dead_after {
        out.push("dead_after");
    }
    if old.routes != new.routes {
        out.push("routes");
    }
    if old.hubs != new.hubs {
        out.push("[[hub]]");
    }
    // The settings themselves, not their `Debug` text, which masks keys
    // and passwords.
    if old.yggdrasil != new.yggdrasil {
        out.push("[yggdrasil]");
    }
    out
}

/// Routes the hubs' allowed IPs into the TUN, as wg-quick does, except those
/// the node's own address prefixes already cover and default routes (which
/// would also capture the tunnel's packets to its hubs; logged instead).
fn add_routes(cfg: &NodeConfig, endpoints: &[IpAddr]) -> anyhow::Result<crate::wg::route::Plan> {
    crate::wg::route::install(
        &cfg.addresses,
        endpoints,
        cfg.hubs.iter().flat_map(|h| h.allowed_ips.iter()),
        &cfg.interface,
        "a hub's",
    )
}

/// Runs the node until `shutdown` completes.
pub async fn run(cfg: NodeConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_inner(cfg, None, shutdown).await
}

/// Like [`run`], and re-reads `path` when the file changes or on SIGHUP:
/// a changed `[[service]]` set is applied at once (forwarders and the
/// declaration to every hub, so a removed service's route is withdrawn);
/// other changes are reported as needing a restart.
pub async fn run_watching(
    cfg: NodeConfig,
    path: std::path::PathBuf,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_inner(cfg, Some(path), shutdown).await
}

/// When the node re-reads its configuration file: a change to it (seen by
/// polling, taken once two polls in a row read the same new bytes, so a file
/// being written in place is not applied half done) or SIGHUP.
struct Reloads {
    path: Option<std::path::PathBuf>,
    hup: Option<tokio::signal::unix::Signal>,
    /// The file as last loaded.
    stamp: Option<Vec<u8>>,
    /// The file at the last poll.
    seen: Option<Vec<u8>>,
    poll: tokio::time::Interval,
}

impl Reloads {
    /// Catches SIGHUP from now on (its default is to end the process): one
    /// sent while the node starts is a reload once it runs. A change of the
    /// file from now on is noticed.
    fn new(path: Option<std::path::PathBuf>) -> Reloads {
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let stamp = path.as_deref().and_then(crate::hub::file_stamp);
        Reloads {
            path,
            hup,
            seen: stamp.clone(),
            stamp,
            poll: tokio::time::interval(crate::hub::CONFIG_POLL),
        }
    }

    /// Waits for the next reload; why, and the file to read (none when the
    /// node runs without one: a SIGHUP is then taken and ignored).
    async fn next(&mut self) -> (&'static str, Option<&std::path::Path>) {
        loop {
            let why = tokio::select! {
                _ = self.poll.tick(), if self.path.is_some() => {
                    let now = self.path.as_deref().and_then(crate::hub::file_stamp);
                    let settled = now == self.seen;
                    self.seen.clone_from(&now);
                    if now.is_none() || now == self.stamp || !settled {
                        continue;
                    }
                    self.stamp = now;
                    "config file changed"
                }
                Some(_) = async {
                    match self.hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.stamp = self.path.as_deref().and_then(crate::hub::file_stamp);
                    "SIGHUP"
                }
            };
            if self.path.is_some() {
                return (why, self.path.as_deref());
            }
        }
    }
}

/// Reads `p` again for a reload (`why`); what changed but cannot be
/// applied live is logged. `None` when the file does not load (the running
/// configuration stays).
fn reread(cfg: &NodeConfig, p: &std::path::Path, why: &str) -> Option<NodeConfig> {
    match NodeConfig::load(p) {
        Err(e) => {
            warn!(config = %p.display(), error = %e, "{why}; reload refused, keeping the running services");
            None
        }
        Ok(new) => {
            let restart = needs_restart(cfg, &new);
            if !restart.is_empty() {
                warn!(config = %p.display(), changed = %restart.join(", "),
                      "{why}; these changes take effect on restart");
            }
            Some(new)
        }
    }
}

async fn run_inner(
    cfg: NodeConfig,
    path: Option<std::path::PathBuf>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut reloads = Reloads::new(path);
    let clients = cfg
        .hubs
        .iter()
        .map(carrier_client)
        .collect::<anyhow::Result<Vec<_>>>()?;
    // The overlay sidecar never fails the node: it logs and retries on its own.
    let ygg = cfg
        .yggdrasil
        .clone()
        .map(crate::ygg::supervisor::Supervisor::start);
    if cfg.hubs.is_empty() {
        // Reachable only over Yggdrasil: no WireGuard device at all. Ready
        // and reloads as below (every change but none needs a restart).
        info!("node ready (Yggdrasil only, no WireGuard hub)");
        crate::sd_notify::ready();
        let _watchdog = crate::sd_notify::spawn_watchdog();
        tokio::pin!(shutdown);
        loop {
            let (why, p) = tokio::select! {
                _ = &mut shutdown => break,
                r = reloads.next() => r,
            };
            let Some(p) = p else { continue };
            crate::sd_notify::reloading();
            if let Some(new) = reread(&cfg, p, why) {
                if needs_restart(&cfg, &new).is_empty() {
                    info!(config = %p.display(), "{why}; unchanged");
                }
            }
            crate::sd_notify::ready();
        }
        info!("node stopping");
        crate::sd_notify::stopping();
        if let Some(y) = ygg {
            y.shutdown().await;
        }
        return Ok(());
    }
    let mut peers = Vec::new();
    for h in &cfg.hubs {
        peers.push(PeerConfig {
            name: h.name.clone(),
            public_key: h.public_key,
            preshared_key: h.preshared_key.clone(),
            // Over TLS only, the supervisor sets the relay as the endpoint.
            endpoint: match h.transport {
                Transport::Tls => None,
                _ => resolve(&h.endpoint, 0).await,
            },
            persistent_keepalive: Some(h.persistent_keepalive),
            allowed_ips: h.allowed_ips.clone(),
        });
    }
    let peers_endpoints: Vec<Option<IpAddr>> =
        peers.iter().map(|p| p.endpoint.map(|e| e.ip())).collect();
    let endpoints: Vec<IpAddr> = peers_endpoints.iter().flatten().copied().collect();
    let dev = Device::start(DeviceConfig {
        name: cfg.interface.clone(),
        mode: Mode::Node,
        private_key: Some(cfg.private_key.clone()),
        listen_port: cfg.listen_port,
        addresses: cfg.addresses.clone(),
        mtu: cfg.mtu,
        forward: crate::wg::device::NodeToNode::Kernel,
        keepalive: 0,
        peers,
        xlat: None,
        nat64: None,
        xlat_via_pool6: Vec::new(),
        xlat_icmp_rate: 0,
    })
    .await?;
    let routes = if cfg.routes {
        let plan = add_routes(&cfg, &endpoints)?;
        Routes {
            routed: plan.add,
            displaced: plan
                .skipped
                .into_iter()
                .filter(|(_, why)| matches!(why, crate::wg::route::Skip::Endpoint(_)))
                .map(|(net, _)| net)
                .collect(),
            // The hubs' endpoints the plan was made with: a route they
            // kept out stays out while one holds it.
            hops: cfg
                .hubs
                .iter()
                .zip(&peers_endpoints)
                .filter_map(|(h, e)| Some(((hub_name(h), "udp"), (*e)?)))
                .collect(),
        }
    } else {
        Routes::default()
    };
    dev.inner.add_tun_routes(routes.routed.iter().copied());
    let routed: Routed = Arc::new(RouteState {
        routes: Mutex::new(routes),
        changing: tokio::sync::Mutex::new(()),
    });
    let api = ApiServer::start(dev.inner.clone()).await?;
    let paths: Vec<Arc<HubPath>> = cfg.hubs.iter().map(HubPath::new).collect();
    for h in cfg.hubs.iter().filter(|h| {
        h.websocket
            .as_ref()
            .is_some_and(carrier::WsTarget::query_in_clear)
    }) {
        warn!(
            hub = %hub_name(h),
            "the websocket URL's query (an intermediary's token?) goes in clear over ws://: use wss://"
        );
    }
    let shown = paths.clone();
    api.set_show_section(
        "hub_paths",
        Arc::new(move || serde_json::Value::Array(shown.iter().map(|p| p.show()).collect())),
    );
    let sups: Vec<_> = cfg
        .hubs
        .iter()
        .zip(&paths)
        .zip(clients)
        .map(|((h, p), tls)| {
            tokio::spawn(supervise(
                dev.inner.clone(),
                h.clone(),
                tls,
                cfg.dead_after,
                routed.clone(),
                cfg.interface.clone(),
                p.clone(),
            ))
        })
        .collect();
    // `[[service]]` forwarders and their declaration to hubs with `control`.
    let mut services = crate::control::services::Services::start(&cfg, dev.inner.clone());
    api.set_show_section("service_forwarders", Arc::new(services.show()));
    info!(
        interface = %cfg.interface,
        public_key = %cfg.private_key.public_key(),
        hubs = cfg.hubs.len(),
        services = cfg.services.len(),
        "node ready"
    );
    crate::sd_notify::ready();
    let _watchdog = crate::sd_notify::spawn_watchdog();
    tokio::pin!(shutdown);
    let mut ended = Ok(());
    loop {
        let (why, p) = tokio::select! {
            _ = &mut shutdown => break,
            () = dev.inner.lost() => {
                ended = Err(anyhow::anyhow!("the TUN interface {} is gone", cfg.interface));
                break;
            }
            r = reloads.next() => r,
        };
        let Some(p) = p else { continue };
        crate::sd_notify::reloading();
        if let Some(new) = reread(&cfg, p, why) {
            if services.current() == new.services {
                info!(config = %p.display(), "{why}; services unchanged");
            } else {
                info!(config = %p.display(), services = new.services.len(), "{why}; applying [[service]]");
                services.replace(new.services);
            }
        }
        crate::sd_notify::ready();
    }
    info!("node stopping");
    crate::sd_notify::stopping();
    for s in sups {
        s.abort();
    }
    drop(services);
    if let Some(y) = ygg {
        y.shutdown().await;
    }
    drop(api);
    drop(dev);
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hub_name_is_tried_address_after_address() {
        let mut all: Vec<SocketAddr> = Vec::new();
        for a in tokio::net::lookup_host("localhost:51820").await.unwrap() {
            if !all.contains(&a) {
                all.push(a);
            }
        }
        assert!(!all.is_empty());
        for turn in 0..2 * all.len() {
            assert_eq!(
                resolve("localhost:51820", turn).await,
                Some(all[turn % all.len()])
            );
        }
        let lit: SocketAddr = "192.0.2.7:51820".parse().unwrap();
        assert_eq!(resolve("192.0.2.7:51820", 5).await, Some(lit));
    }

    #[test]
    fn a_silence_keeps_the_working_address_for_its_first_try_only() {
        let a: SocketAddr = "[2001:db8::1]:51820".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let c: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        let all = [a, b, c];
        // The peer works on b: the first try after a silence stays on it,
        // the next ones go on from there.
        let mut turn = 0;
        assert_eq!(next_endpoint(&all, Some(b), true, &mut turn), Some(b));
        assert_eq!(next_endpoint(&all, Some(b), false, &mut turn), Some(c));
        assert_eq!(next_endpoint(&all, Some(c), false, &mut turn), Some(a));
        assert_eq!(next_endpoint(&all, Some(a), false, &mut turn), Some(b));
        // An address the name no longer has (or the TLS relay's): in turn.
        let gone: SocketAddr = "198.51.100.9:51820".parse().unwrap();
        let mut turn = 4;
        assert_eq!(next_endpoint(&all, Some(gone), true, &mut turn), Some(b));
        assert_eq!(next_endpoint(&all, None, true, &mut turn), Some(c));
        assert_eq!(next_endpoint(&[], Some(b), true, &mut turn), None);
    }

    #[test]
    fn a_failing_hub_name_is_said_once_per_error() {
        let mut f = BTreeMap::new();
        assert_eq!(note_resolution(&mut f, "h:1", Ok(())), Said::Quiet);
        assert_eq!(
            note_resolution(&mut f, "h:1", Err("no such host")),
            Said::Warn
        );
        assert_eq!(
            note_resolution(&mut f, "h:1", Err("no such host")),
            Said::Quiet
        );
        assert_eq!(
            note_resolution(&mut f, "g:1", Err("no such host")),
            Said::Warn
        );
        assert_eq!(note_resolution(&mut f, "h:1", Err("timed out")), Said::Warn);
        assert_eq!(note_resolution(&mut f, "h:1", Ok(())), Said::Recovered);
        assert_eq!(note_resolution(&mut f, "h:1", Ok(())), Said::Quiet);
        assert_eq!(note_resolution(&mut f, "h:1", Err("timed out")), Said::Warn);
        // Bounded: many names never grow the record past its cap.
        for i in 0..1000 {
            note_resolution(&mut f, &format!("n{i}:1"), Err("x"));
        }
        assert!(f.len() <= 256);
    }

    #[test]
    fn only_services_reload_live() {
        let k = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
        let hub = "[[hub]]\npublic_key = \"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\"\n\
                   endpoint = \"h.example:1\"\nallowed_ips = [\"100.64.0.0/10\"]\n";
        let parse = |extra: &str, hub: &str| {
            let text = format!(
                "[node]\nprivate_key = \"{k}\"\naddresses = [\"100.64.1.1/10\"]\n{extra}{hub}"
            );
            NodeConfig::parse("n.toml", &text, std::path::Path::new(".")).expect("config")
        };
        let base = parse("", hub);
        let svc = format!("{hub}[[service]]\nname = \"blog\"\nlocal = \"127.0.0.1:80\"\n");
        assert!(needs_restart(&base, &parse("", &svc)).is_empty());
        assert_eq!(needs_restart(&base, &parse("mtu = 1280\n", hub)), ["mtu"]);
        let other_hub = hub.replace("h.example:1", "h.example:2");
        assert_eq!(needs_restart(&base, &parse("", &other_hub)), ["[[hub]]"]);
        // A key change is seen although `Debug` masks keys.
        let psk = format!("{hub}preshared_key = \"{k}\"\n");
        assert_eq!(needs_restart(&base, &parse("", &psk)), ["[[hub]]"]);
        // So is a changed Yggdrasil peer password, although `Debug` masks it.
        let ygg = |pass: &str| {
            format!(
                "{hub}[yggdrasil]\nprivate_key = \"2fb6bcc83c6976e63c76f3286278c441af929b4902a0544cd6e1e401b2a5d3328988ec86fd70a116524ef24b11d0aed0ef374a69b1014ae93a82716a7fadca54\"\n\
                 peers = [\"socks://u:{pass}@127.0.0.1:1080/peer.example:1\"]\n"
            )
        };
        let with = parse("", &ygg("one"));
        assert!(needs_restart(&with, &parse("", &ygg("one"))).is_empty());
        assert_eq!(
            needs_restart(&with, &parse("", &ygg("two"))),
            ["[yggdrasil]"]
        );
    }

    #[test]
    fn supervisor_decisions() {
        // Never heard from: handshake at once, then wait the retry interval.
        let mut r = Retries::default();
        assert_eq!(r.check(100, 0, 8000), Check::Rehandshake);
        assert_eq!(r.attempted(100, 0, 0.5), 5100);
        assert_eq!(r.check(2000, 0, 8000), Check::Waiting);
        assert_eq!(r.check(5099, 0, 8000), Check::Waiting);
        assert_eq!(r.check(5100, 0, 8000), Check::Rehandshake);
        // Heard recently: fine.
        assert_eq!(r.check(10_000, 9_000, 8000), Check::Fine);
        // Silent past dead_after: handshake even if an attempt was made
        // before the silence.
        let mut r = Retries::default();
        r.attempted(10_000, 0, 0.5);
        assert_eq!(r.check(20_000, 11_000, 8000), Check::Rehandshake);
        r.attempted(20_000, 11_000, 0.5);
        assert_eq!(r.check(21_000, 11_000, 8000), Check::Waiting);
    }

    /// The supervisor's decisions for a hub that never answers, ticking
    /// every 500 ms as it does, with `jitter` drawn per attempt: the times
    /// of the first `n` handshakes.
    fn attempts(n: usize, mut jitter: impl FnMut() -> f64) -> Vec<u64> {
        let mut r = Retries::default();
        let mut at = Vec::new();
        let mut now = 1000;
        while at.len() < n {
            if r.check(now, 0, 8000) == Check::Rehandshake {
                at.push(now);
                r.attempted(now, 0, jitter());
            }
            now += 500;
        }
        at
    }

    /// A silent hub is retried about every 5 s, each wait drawn anew within
    /// ±20% (nodes that lost it together do not come back in step); after
    /// 24 attempts (about two minutes) the waits grow to 30–60 s.
    #[test]
    fn retries_to_a_silent_hub_are_jittered_and_back_off() {
        let mut draws = [0.0, 0.3, 1.0, 0.7, 0.5, 0.1].into_iter().cycle();
        let at = attempts(40, || draws.next().unwrap_or(0.5));
        let gaps: Vec<u64> = at.windows(2).map(|w| w[1] - w[0]).collect();
        // The first 24 attempts: 4–6 s apart (rounded up to the next tick).
        let fast = &gaps[..FAST_TRIES as usize - 1];
        assert!(fast.iter().all(|g| (4000..=6500).contains(g)), "{fast:?}");
        assert!(
            fast.iter().any(|g| *g != fast[0]),
            "waits all alike: {fast:?}"
        );
        let two_minutes = at[FAST_TRIES as usize - 1] - at[0];
        assert!((90_000..=150_000).contains(&two_minutes), "{two_minutes}");
        // Then further apart, whatever the draw.
        let slow = &gaps[FAST_TRIES as usize - 1..];
        assert!(slow.iter().all(|g| *g > RETRY_MS), "{slow:?}");
        assert!(
            slow[3..].iter().all(|g| (30_000..=60_500).contains(g)),
            "{slow:?}"
        );
        // The lowest draw and the highest alike.
        for j in [0.0, 1.0] {
            let at = attempts(FAST_TRIES as usize + 1, || j);
            let n = at.len();
            assert!(at[n - 1] - at[n - 2] > RETRY_MS, "draw {j}: {at:?}");
        }
    }

    /// Once the hub is heard, the next silence is retried at the short
    /// waits again: a node back from a long outage, whose hub goes away
    /// for a moment later, comes back within seconds.
    #[test]
    fn a_hub_heard_again_starts_the_retries_afresh() {
        let mut r = Retries::default();
        let mut now = 0;
        for _ in 0..40 {
            assert_eq!(r.check(now, 0, 8000), Check::Rehandshake);
            now = r.attempted(now, 0, 0.5);
        }
        assert!(r.attempted(now, 0, 0.5) - now > 20_000);
        // Answered: fine, and heard.
        let rx = now + 100;
        now += 200;
        assert_eq!(r.check(now, rx, 8000), Check::Fine);
        r.heard();
        assert_eq!(r.tries(), 0);
        // Silent again past dead_after: at once, then 4–6 s.
        now = rx + 8000;
        assert_eq!(r.check(now, rx, 8000), Check::Rehandshake);
        let next = r.attempted(now, rx, 1.0);
        assert_eq!(next - now, 6000);
        assert_eq!(r.check(next - 1, rx, 8000), Check::Waiting);
        assert_eq!(r.check(next, rx, 8000), Check::Rehandshake);
        // Heard between two attempts, without a look at the check (the
        // hub answered and fell silent again within a tick): afresh too.
        let mut r = Retries::default();
        for t in 0..30 {
            r.attempted(t * 60_000, 0, 0.5);
        }
        assert_eq!(r.attempted(2_000_000, 1_999_000, 0.0) - 2_000_000, 4000);
        assert_eq!(r.tries(), 1);
    }
}
