//! Hub mode: a WireGuard concentrator that forwards between its nodes and its
//! own network stack.

use crate::config::{HubConfig, HubPeer};
use crate::control::runtime::Control;
use crate::proxy::server::{PreparedProxy, PreparedReload, StatsHandle};
use crate::proxy::settings::ProxySettings;
use crate::proxy::upstream::TunnelLiveness;
use crate::proxy::Proxy;
use crate::wg::api::ApiServer;
use crate::wg::device::{Device, DeviceConfig, Inner, Mode, PeerConfig};
use crate::wg::uapi::{DeviceSet, PeerSet};
use ipnet::IpNet;
use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// How long open proxy connections get to finish when the hub stops.
pub const PROXY_DRAIN: Duration = Duration::from_secs(5);

/// How often the config file is checked for changes.
pub const CONFIG_POLL: Duration = Duration::from_secs(1);

/// Node liveness for the proxy: a backend inside a peer's allowed IPs counts as
/// down when nothing was received from that peer for `down_after` (or ever).
/// The owner is the device's own cryptokey-routing lookup (longest prefix, a
/// few hash probes whatever the number of peers), read live.
pub struct NodeTunnels {
    /// Weak: the proxy (and its draining connections) does not keep the
    /// device, and with it the TUN, alive.
    dev: std::sync::Weak<Inner>,
    down_after_ms: AtomicU64,
    /// Nodes' tunnels carried over TLS, when `[hub] tls_tunnels` is on.
    carrier: Option<Arc<crate::carrier::Hub>>,
}

impl NodeTunnels {
    fn new(
        down_after: Duration,
        dev: &Arc<Inner>,
        carrier: Option<Arc<crate::carrier::Hub>>,
    ) -> Arc<Self> {
        Arc::new(NodeTunnels {
            dev: Arc::downgrade(dev),
            down_after_ms: AtomicU64::new(down_after.as_millis() as u64),
            carrier,
        })
    }

    fn set_down_after(&self, d: Duration) {
        self.down_after_ms.store(d.as_millis() as u64, Relaxed);
    }
}

/// The address a peer's allowed IPs would hold: an IPv4-mapped IPv6 address
/// is its IPv4 address.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Whether a peer last heard both ways at `last_ms` (0: never) is up at
/// `now_ms`.
fn heard_within(now_ms: u64, last_ms: u64, down_after_ms: u64) -> bool {
    last_ms > 0 && now_ms.saturating_sub(last_ms) < down_after_ms
}

impl TunnelLiveness for NodeTunnels {
    fn tunnel_up(&self, ip: IpAddr) -> Option<bool> {
        let dev = self.dev.upgrade()?;
        let peer = dev.peer_for_ip(unmapped(ip))?;
        Some(heard_within(
            dev.now_ms(),
            // Not an initiation alone: a node whose return path is broken
            // initiates every few seconds and carries nothing.
            peer.last_two_way_ms(),
            self.down_after_ms.load(Relaxed),
        ))
    }

    fn carrier(&self) -> Option<Arc<crate::carrier::Hub>> {
        self.carrier.clone()
    }
}

/// Starts the reverse proxy if the config has one. Call after the TUN is up, so
/// the check against the host's addresses sees the overlay addresses too.
pub async fn start_proxy(cfg: &HubConfig) -> anyhow::Result<Option<Proxy>> {
    let Some(settings) = cfg.proxy.clone() else {
        return Ok(None);
    };
    crate::proxy::settings::check_host_addresses(&settings)
        .map_err(|e| anyhow::anyhow!("proxy: {e}"))?;
    Ok(Some(Proxy::start(settings).await?))
}

/// A change of the hub's proxy whose every step that can fail is done
/// ([`ProxySlot::prepare`]): nothing runs differently until
/// [`ProxySlot::commit`]; dropped, it changes nothing.
struct StagedProxy {
    /// The new `tunnel_down_after`, when the new settings have a proxy.
    tunnel_down_after: Option<Duration>,
    change: ProxyChange,
}

enum ProxyChange {
    /// The running proxy takes new settings.
    Reload(PreparedReload),
    /// A proxy starts (none runs), with the lock that keeps the control
    /// plane from checking ports against it until it is in the slot.
    Start(PreparedProxy, tokio::sync::OwnedMutexGuard<()>),
    /// The running proxy drains (`[proxy]` removed).
    Stop,
    /// No proxy before, none after.
    None,
}

/// The proxy of a running hub, swapped on reload.
struct ProxySlot {
    proxy: Option<Proxy>,
    stats: Arc<parking_lot::Mutex<Option<StatsHandle>>>,
    /// Held while a proxy is started (the control plane's
    /// [`Control::proxy_starting`]).
    starting: Arc<tokio::sync::Mutex<()>>,
    tunnels: Arc<NodeTunnels>,
    mesh: Option<Arc<crate::mesh::Mesh>>,
}

impl ProxySlot {
    fn set(&mut self, p: Option<Proxy>) {
        if let Some(p) = &p {
            p.set_mesh(self.mesh.clone());
        }
        *self.stats.lock() = p.as_ref().map(|p| p.stats_handle());
        self.proxy = p;
    }

    /// Starts a proxy with `settings` in the slot (none runs): its ports
    /// are its own from the first bind until it is in the slot.
    async fn start(&mut self, settings: Option<ProxySettings>) -> anyhow::Result<()> {
        let staged = self.prepare(settings).await?;
        self.commit(staged);
        Ok(())
    }

    /// Everything that can fail of going to the proxy `settings`: the
    /// check against the host's addresses, the new generation built
    /// (certificates, `basic_auth_file`s, the access log) and its new
    /// listeners bound. Nothing changes for the running proxy.
    async fn prepare(&self, settings: Option<ProxySettings>) -> anyhow::Result<StagedProxy> {
        let Some(s) = settings else {
            let change = match self.proxy {
                Some(_) => ProxyChange::Stop,
                None => ProxyChange::None,
            };
            return Ok(StagedProxy {
                tunnel_down_after: None,
                change,
            });
        };
        crate::proxy::settings::check_host_addresses(&s)
            .map_err(|e| anyhow::anyhow!("proxy: {e}"))?;
        let tunnel_down_after = Some(s.limits.tunnel_down_after);
        let change = match &self.proxy {
            Some(p) => ProxyChange::Reload(p.prepare_reload(s).await?),
            None => {
                let starting = self.starting.clone().lock_owned().await;
                let tunnels = Some(self.tunnels.clone() as Arc<dyn TunnelLiveness>);
                let p = Proxy::prepare(s, tunnels, self.mesh.clone()).await?;
                ProxyChange::Start(p, starting)
            }
        };
        Ok(StagedProxy {
            tunnel_down_after,
            change,
        })
    }

    /// Puts a prepared change in place (nothing here fails).
    fn commit(&mut self, staged: StagedProxy) {
        if let Some(d) = staged.tunnel_down_after {
            self.tunnels.set_down_after(d);
        }
        match staged.change {
            ProxyChange::Reload(r) => {
                r.commit();
            }
            ProxyChange::Start(p, _starting) => self.set(Some(p.start())),
            ProxyChange::Stop => {
                info!("proxy removed from the config; draining");
                if let Some(p) = self.proxy.take() {
                    *self.stats.lock() = None;
                    tokio::spawn(p.shutdown(PROXY_DRAIN));
                }
            }
            ProxyChange::None => {}
        }
    }

    /// Applies new proxy settings (the control plane's routes changed):
    /// reloads the running proxy, starts one, or drains it. Errors are
    /// logged and the running proxy is kept.
    async fn apply(&mut self, settings: Option<ProxySettings>) {
        match self.prepare(settings).await {
            Ok(staged) => self.commit(staged),
            Err(e) if self.proxy.is_some() => {
                warn!(error = %format!("{e:#}"), "proxy reload failed; keeping the running proxy")
            }
            Err(e) => warn!(error = %format!("{e:#}"), "proxy start on reload failed"),
        }
    }

    /// Re-reads `path` and applies it: the proxy sections, the `[[peer]]`s
    /// and the control plane's settings. What needs a restart is named in a
    /// warning and kept as it runs (`running`), so nothing, a joining node's
    /// answer included, sees a value the hub does not use.
    ///
    /// Everything that can fail comes first, with nothing changed: the file
    /// is loaded, the control plane checks it against its state (and makes
    /// the proxy settings its routes give with it), and the proxy it asks
    /// for is built and its new ports bound. Only then is any of it
    /// applied; an error (returned) leaves the hub as it ran.
    async fn reload(
        &mut self,
        path: &Path,
        running: &mut HubConfig,
        dev: &Arc<Inner>,
        control: Option<&Control>,
    ) -> anyhow::Result<()> {
        let mut cfg = HubConfig::load(path)?;
        let restart = needs_restart(running, &cfg);
        keep_running(&mut cfg, running);
        // The control plane checks the file's peers against its nodes and,
        // holding its writer's lock until it takes the file, gives the
        // proxy settings: no node added meanwhile slips between the two.
        let candidate = match control {
            Some(c) => Some(c.prepare_config(&cfg).await.map_err(anyhow::Error::msg)?),
            None => None,
        };
        let settings = match &candidate {
            Some(c) => c.proxy(),
            None => cfg.proxy.clone(),
        };
        let staged = self.prepare(settings).await?;
        // Nothing fails from here on.
        if let (Some(c), Some(candidate)) = (control, candidate) {
            c.adopt_config(candidate).await;
        }
        if !restart.is_empty() {
            warn!(
                changed = %restart.join(", "),
                "changed in the config file; these take effect when the hub restarts (until then the running values are kept)"
            );
        }
        apply_peers(dev, running, &cfg).await;
        if dev.node_to_node() != cfg.node_to_node {
            dev.set_node_to_node(cfg.node_to_node);
            info!(
                node_to_node = cfg.node_to_node.as_str(),
                "traffic between nodes: applied"
            );
            if let Some(why) = forwarding_warning(cfg.node_to_node) {
                warn!("{why}");
            }
        }
        *running = cfg;
        if let Some(c) = control {
            c.config_applied().await;
        }
        self.commit(staged);
        // Declared services checked again with the new proxy in place (its
        // ports are its own now); routes re-applied if that changed them.
        if let Some(c) = control {
            c.recheck("declared services changed with the reloaded config; re-applying routes");
        }
        Ok(())
    }
}

/// The config reloads of a running hub (a changed file, SIGHUP): how many,
/// how many failed, and the last one's outcome. In `gatewire show --json`
/// (`config_reload`) and, with `[control]`, in `/metrics`.
#[derive(Default)]
pub struct ReloadOutcomes {
    reloads: AtomicU64,
    failures: AtomicU64,
    last: parking_lot::Mutex<Option<LastReload>>,
}

/// The outcome of one config reload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LastReload {
    /// When it ended (unix seconds).
    pub at: u64,
    /// Whether it was applied (a failed one applied nothing).
    pub ok: bool,
    /// Why it failed.
    pub error: Option<String>,
}

impl ReloadOutcomes {
    /// Counts a reload that ended at `at` (unix seconds): applied, or
    /// failed for the reason given.
    pub fn note(&self, at: u64, outcome: Result<(), &str>) {
        self.reloads.fetch_add(1, Relaxed);
        if outcome.is_err() {
            self.failures.fetch_add(1, Relaxed);
        }
        *self.last.lock() = Some(LastReload {
            at,
            ok: outcome.is_ok(),
            error: outcome.err().map(str::to_string),
        });
    }

    /// Reloads so far.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Relaxed)
    }

    /// Reloads that failed so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Relaxed)
    }

    /// The last reload, if any.
    pub fn last(&self) -> Option<LastReload> {
        self.last.lock().clone()
    }

    /// `{"reloads": n, "failures": n, "last": {"at", "ok", "error"} or null}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "reloads": self.reloads(),
            "failures": self.failures(),
            "last": self.last(),
        })
    }
}

/// Logs and counts the outcome of a config reload and tells the service
/// manager the reload is over (with `STATUS=reload failed: …` when it
/// failed).
fn reloaded(outcomes: &ReloadOutcomes, r: anyhow::Result<()>) {
    let now = crate::clock::unix_secs();
    match r {
        Ok(()) => {
            outcomes.note(now, Ok(()));
            crate::sd_notify::reloaded(None);
        }
        Err(e) => {
            let why = format!("{e:#}");
            warn!(error = %why, "config reload failed; nothing applied");
            outcomes.note(now, Err(&why));
            crate::sd_notify::reloaded(Some(&why));
        }
    }
}

/// The settings a reload cannot change, by name, that differ between the
/// running config `old` and the file's `new`.
pub fn needs_restart(old: &HubConfig, new: &HubConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |changed: bool, name: &'static str| {
        if changed {
            out.push(name);
        }
    };
    check(
        old.private_key.public_key() != new.private_key.public_key(),
        "private_key",
    );
    check(old.interface != new.interface, "interface");
    check(old.listen_port != new.listen_port, "listen_port");
    check(old.addresses != new.addresses, "addresses");
    check(old.mtu != new.mtu, "mtu");
    check(old.keepalive != new.keepalive, "keepalive");
    check(old.routes != new.routes, "routes");
    check(old.tls_tunnels != new.tls_tunnels, "tls_tunnels");
    check(old.xlat != new.xlat, "[xlat]");
    // The settings themselves, not their `Debug` text, which masks keys
    // and passwords.
    check(old.yggdrasil != new.yggdrasil, "[yggdrasil]");
    check(old.mesh != new.mesh, "[mesh]");
    match (&old.control, &new.control) {
        (Some(a), Some(b)) => {
            check(a.state_dir != b.state_dir, "[control] state_dir");
            check(a.socket != b.socket, "[control] socket");
            check(a.listen != b.listen, "[control] listen");
            check(a.node_port != b.node_port, "[control] node_port");
            check(a.revalidate != b.revalidate, "[control] revalidate");
            check(a.grace != b.grace, "[control] grace");
        }
        (None, None) => {}
        _ => check(true, "[control]"),
    }
    out
}

/// Puts the running values of what [`needs_restart`] names into `new`.
fn keep_running(new: &mut HubConfig, old: &HubConfig) {
    new.private_key = old.private_key.clone();
    new.interface = old.interface.clone();
    new.listen_port = old.listen_port;
    new.addresses = old.addresses.clone();
    new.mtu = old.mtu;
    new.keepalive = old.keepalive;
    new.routes = old.routes;
    new.tls_tunnels = old.tls_tunnels;
    new.xlat = old.xlat.clone();
    new.yggdrasil = old.yggdrasil.clone();
    new.mesh = old.mesh.clone();
    match (&mut new.control, &old.control) {
        (Some(n), Some(o)) => {
            n.state_dir = o.state_dir.clone();
            n.socket = o.socket.clone();
            n.listen = o.listen.clone();
            n.node_port = o.node_port;
            n.revalidate = o.revalidate;
            n.grace = o.grace;
        }
        // The control plane keeps its settings when the section goes (and
        // does not start when it comes).
        (n, o) => *n = o.clone(),
    }
}

/// What the device must change for the `[[peer]]`s to go from `old` to
/// `new`: peers gone are removed, new and changed ones set whole, except for
/// the endpoint: a changed peer's is set only when its configured endpoint
/// changed, so a node that roamed (NAT rebinding) is not sent back to the
/// stale configured address when another of its settings changes. Allowed
/// IPs are compared as sets (reordering them changes nothing).
pub fn peer_diff(old: &[HubPeer], new: &[HubPeer]) -> Vec<PeerSet> {
    use std::collections::{HashMap, HashSet};
    let old_by_key: HashMap<_, &HubPeer> = old.iter().map(|o| (o.public_key, o)).collect();
    let new_keys: HashSet<_> = new.iter().map(|n| n.public_key).collect();
    let mut out = Vec::new();
    for o in old {
        if !new_keys.contains(&o.public_key) {
            let mut s = PeerSet::new(o.public_key);
            s.remove = true;
            out.push(s);
        }
    }
    let nets = |p: &HubPeer| p.allowed_ips.iter().copied().collect::<HashSet<IpNet>>();
    for n in new {
        let was = old_by_key.get(&n.public_key);
        let same = was.is_some_and(|o| {
            o.preshared_key == n.preshared_key
                && o.endpoint == n.endpoint
                && o.persistent_keepalive == n.persistent_keepalive
                && (o.allowed_ips == n.allowed_ips || nets(o) == nets(n))
        });
        if same {
            continue;
        }
        let mut s = PeerSet::new(n.public_key);
        s.preshared_key = Some(n.preshared_key.clone());
        if was.is_none_or(|o| o.endpoint != n.endpoint) {
            s.endpoint = n.endpoint;
        }
        s.persistent_keepalive = Some(n.persistent_keepalive.unwrap_or(0));
        s.replace_allowed_ips = true;
        s.allowed_ips = n.allowed_ips.clone();
        out.push(s);
    }
    out
}

/// Applies the `[[peer]]` changes of a reload to the device, with routes for
/// the new allowed IPs when `[hub] routes` is on, and without those of
/// prefixes the changed peers gave up (unless another peer still holds them).
async fn apply_peers(dev: &Arc<Inner>, old: &HubConfig, new: &HubConfig) {
    let peers = peer_diff(&old.peers, &new.peers);
    let named = |c: &HubConfig| -> Vec<_> {
        c.peers
            .iter()
            .map(|p| (p.public_key, p.name.clone()))
            .collect()
    };
    if peers.is_empty() {
        if named(old) != named(new) {
            set_peer_names(dev, new);
        }
        return;
    }
    let removed = peers.iter().filter(|p| p.remove).count();
    let set = peers.len() - removed;
    let fresh: Vec<&HubPeer> = new
        .peers
        .iter()
        .filter(|n| {
            peers
                .iter()
                .any(|p| !p.remove && p.public_key == n.public_key)
        })
        .collect();
    let _routes = dev.route_lock.lock().await;
    // What the changed peers held and hold no more (a removed peer all of
    // it), read before the device forgets it.
    let given_up = dev.given_up(&peers);
    let set_req = DeviceSet {
        peers,
        ..DeviceSet::default()
    };
    if let Err(e) = dev.apply(set_req).await {
        warn!(error = %format!("{e:#}"), "[[peer]] changes not applied to the device; they take effect when the hub restarts");
        return;
    }
    info!(removed, set, "[[peer]] changes applied");
    set_peer_names(dev, new);
    if new.routes {
        let endpoints: Vec<_> = new
            .peers
            .iter()
            .filter_map(|p| p.endpoint.map(|e| e.ip()))
            .collect();
        let (addresses, interface) = (new.addresses.clone(), new.interface.clone());
        let nets: Vec<IpNet> = fresh
            .iter()
            .flat_map(|p| p.allowed_ips.iter().copied())
            .collect();
        // iproute2 runs as a child process: off the async workers.
        // Still routed: what the peers hold, and the translator's prefixes.
        let held: Vec<IpNet> = dev
            .peer_prefixes()
            .into_iter()
            .chain(new.xlat.iter().flat_map(|x| x.routes.iter().copied()))
            .collect();
        let r = tokio::task::spawn_blocking(move || {
            let withdrawn = crate::wg::route::withdraw(
                &addresses,
                &endpoints,
                &given_up,
                &held,
                &interface,
                "a [[peer]]",
            );
            let plan = crate::wg::route::install(
                &addresses,
                &endpoints,
                nets.iter(),
                &interface,
                "a peer's",
            );
            (withdrawn, plan)
        })
        .await;
        match r {
            Ok(((gone, again), plan)) => {
                for net in &gone {
                    dev.remove_tun_route(net);
                }
                dev.add_tun_routes(again);
                match plan {
                    Ok(plan) => dev.add_tun_routes(plan.add),
                    Err(e) => {
                        warn!(error = %format!("{e:#}"), "routes for changed [[peer]]s not added")
                    }
                }
            }
            Err(e) => warn!(error = %e, "routes for changed [[peer]]s: task failed"),
        }
    }
}

fn set_peer_names(dev: &Inner, cfg: &HubConfig) {
    for p in &cfg.peers {
        if let Some(peer) = dev.peer(&p.public_key) {
            peer.set_name(p.name.clone());
        }
    }
}

/// The proxy settings the hub should run now.
fn wanted_proxy(cfg: &HubConfig, control: Option<&Control>) -> Option<ProxySettings> {
    match control {
        Some(c) => match c.effective_proxy() {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "control plane routes refused");
                cfg.proxy.clone()
            }
        },
        None => cfg.proxy.clone(),
    }
}

/// Why `[hub] keepalive` (seconds) is a poor choice, if it is: a node takes
/// a hub silent for its `dead_after` (8 s unless set) as gone and
/// handshakes again, so an idle node must hear the hub's keepalive at least
/// twice within it.
pub fn keepalive_warning(keepalive: u16) -> Option<String> {
    let dead = crate::config::DEFAULT_DEAD_AFTER;
    if keepalive == 0 {
        Some(format!(
            "[hub] keepalive = 0: idle nodes hear nothing from the hub, take it as gone after their dead_after ({dead} s unless set) and handshake again every time"
        ))
    } else if u32::from(keepalive) * 2 > u32::from(dead) {
        Some(format!(
            "[hub] keepalive = {keepalive}: nodes with the default dead_after ({dead} s) take the hub as gone between two keepalives and handshake again; set the nodes' dead_after to at least {} s",
            u32::from(keepalive) * 2
        ))
    } else {
        None
    }
}

/// Why `[hub] node_to_node = "kernel"` will not carry nodes' traffic to
/// each other, if it will not: the host's kernel must forward (what it reads
/// from `/proc/sys`, `None` when unreadable) for the packets the hub leaves
/// to it to come back into the TUN.
pub fn kernel_forwarding_warning(
    mode: crate::wg::device::NodeToNode,
    ipv4: Option<bool>,
    ipv6: Option<bool>,
) -> Option<String> {
    if mode != crate::wg::device::NodeToNode::Kernel {
        return None;
    }
    let off: Vec<&str> = [
        (ipv4, "net.ipv4.ip_forward"),
        (ipv6, "net.ipv6.conf.all.forwarding"),
    ]
    .into_iter()
    .filter(|(on, _)| *on == Some(false))
    .map(|(_, name)| name)
    .collect();
    if off.is_empty() {
        return None;
    }
    Some(format!(
        "[hub] node_to_node = \"kernel\" but {} {} 0: nodes cannot reach each other until the host forwards (sysctl -w {}; its firewall's forward chain then decides)",
        off.join(" and "),
        if off.len() > 1 { "are" } else { "is" },
        off.iter()
            .map(|n| format!("{n}=1"))
            .collect::<Vec<_>>()
            .join(" ")
    ))
}

/// [`kernel_forwarding_warning`] for `mode` on this host, read from
/// `/proc/sys` now.
pub fn forwarding_warning(mode: crate::wg::device::NodeToNode) -> Option<String> {
    let read = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim() != "0");
    kernel_forwarding_warning(
        mode,
        read("/proc/sys/net/ipv4/ip_forward"),
        read("/proc/sys/net/ipv6/conf/all/forwarding"),
    )
}

pub fn device_config(cfg: &HubConfig) -> DeviceConfig {
    DeviceConfig {
        name: cfg.interface.clone(),
        mode: Mode::Hub,
        private_key: Some(cfg.private_key.clone()),
        listen_port: cfg.listen_port,
        addresses: cfg.addresses.clone(),
        mtu: cfg.mtu,
        forward: cfg.node_to_node,
        keepalive: cfg.keepalive,
        peers: cfg
            .peers
            .iter()
            .map(|p| PeerConfig {
                name: p.name.clone(),
                public_key: p.public_key,
                preshared_key: p.preshared_key.clone(),
                endpoint: p.endpoint,
                persistent_keepalive: p.persistent_keepalive,
                allowed_ips: p.allowed_ips.clone(),
            })
            .collect(),
        xlat: cfg.xlat.as_ref().map(crate::wg::xlat::device_config),
        nat64: cfg.xlat.as_ref().and_then(|x| x.nat64.clone()),
        xlat_via_pool6: cfg
            .xlat
            .as_ref()
            .map(|x| x.via_pool6.clone())
            .unwrap_or_default(),
        xlat_icmp_rate: cfg.xlat.as_ref().map_or(0, |x| x.icmp_error_rate),
    }
}

/// Routes the `[[peer]]`s' allowed IPs into the TUN, as wg-quick does, except
/// those the hub's own address prefixes already cover, default routes and
/// prefixes holding a peer's configured endpoint (logged instead). Peers
/// added later through the control plane get theirs as they come
/// (`control::runtime`); peers set over UAPI get none, as with `wg set`.
fn add_peer_routes(cfg: &HubConfig) -> anyhow::Result<Vec<IpNet>> {
    let endpoints: Vec<_> = cfg
        .peers
        .iter()
        .filter_map(|p| p.endpoint.map(|e| e.ip()))
        .collect();
    crate::wg::route::install(
        &cfg.addresses,
        &endpoints,
        cfg.peers.iter().flat_map(|p| p.allowed_ips.iter()),
        &cfg.interface,
        "a peer's",
    )
    .map(|plan| plan.add)
}

/// Runs the hub until `shutdown` completes. The TUN and the API socket are
/// removed on return, on error too.
pub async fn run(cfg: HubConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_inner(cfg, None, shutdown).await
}

/// Like [`run`], and reloads the proxy sections of `path` when the file changes
/// or on SIGHUP, without dropping open connections.
pub async fn run_watching(
    cfg: HubConfig,
    path: PathBuf,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_inner(cfg, Some(path), shutdown).await
}

/// What the config watchers compare to notice a changed file (its bytes).
pub(crate) fn file_stamp(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

async fn run_inner(
    cfg: HubConfig,
    path: Option<PathBuf>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // Caught from now on (a SIGHUP's default is to end the process): one
    // sent while the hub starts is a reload once it runs.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    // The file as loaded: a change while the hub starts is noticed.
    let mut stamp = path.as_deref().and_then(file_stamp);
    let mut running = cfg.clone();
    let dev = Device::start(device_config(&cfg)).await?;
    if cfg.routes {
        dev.inner.add_tun_routes(add_peer_routes(&cfg)?);
    }
    crate::wg::xlat::add_routes(&cfg.interface, cfg.xlat.as_ref())?;
    let api = ApiServer::start(dev.inner.clone()).await?;
    // The overlay sidecar never fails the hub: it logs and retries on its own.
    let ygg = cfg
        .yggdrasil
        .clone()
        .map(crate::ygg::supervisor::Supervisor::start);
    let down_after = cfg
        .proxy
        .as_ref()
        .map_or(Duration::from_secs(40), |p| p.limits.tunnel_down_after);
    let carrier = if cfg.tls_tunnels {
        let d = dev.inner.clone();
        // The hooks hold the device weakly (the loopback closure, `d`, holds it already).
        let (w, w2) = (Arc::downgrade(&dev.inner), Arc::downgrade(&dev.inner));
        let hub = crate::carrier::Hub::new(move || d.loopback())?
            .on_relay_opened(move |relay, client| {
                if let Some(d) = w2.upgrade() {
                    d.relay_opened(relay, client);
                }
            })
            .on_relay_closed(move |relay| {
                if let Some(d) = w.upgrade() {
                    d.relay_closed(relay);
                }
            });
        // Which peer each relay serves (the hook holds no device).
        let moves = hub.moves();
        dev.inner
            .on_endpoint_moved(move |peer, to| moves.moved(peer.0, to));
        Some(Arc::new(hub))
    } else {
        None
    };
    let tunnels = NodeTunnels::new(down_after, &dev.inner, carrier.clone());
    let mesh = cfg.mesh.clone().map(crate::mesh::Mesh::new);
    let control = match &cfg.control {
        Some(_) => Some(Control::start(cfg.clone(), dev.inner.clone(), mesh.clone()).await?),
        None => None,
    };
    if let Some(c) = &control {
        *c.tls_tunnels.lock() = carrier.clone();
    }
    let mut slot = ProxySlot {
        proxy: None,
        stats: control
            .as_ref()
            .map(|c| c.proxy_stats.clone())
            .unwrap_or_default(),
        starting: control
            .as_ref()
            .map(|c| c.proxy_starting.clone())
            .unwrap_or_default(),
        tunnels: tunnels.clone(),
        mesh,
    };
    // The names the control plane grants are claimed across the mesh.
    if let (Some(c), Some(m)) = (&control, &slot.mesh) {
        m.use_claims_cache(c.settings().state_dir.join("mesh-claims.json"));
        let c = Arc::downgrade(c);
        m.set_claim_source(Arc::new(move |now| c.upgrade().map(|c| c.claim_wants(now))));
    }
    let names_changed = slot.mesh.as_ref().map(|m| m.names_changed());
    if let Err(e) = slot.start(wanted_proxy(&cfg, control.as_deref())).await {
        // A declared forward's port taken by another program since it was
        // checked: checked again and left out. The config file's own
        // listeners and forwards failing still fail the hub.
        match &control {
            Some(c) if c.reevaluate() => {
                warn!(error = %format!("{e:#}"), "proxy start failed; trying again without the declared forwards whose ports are taken");
                slot.start(wanted_proxy(&cfg, Some(c))).await?;
            }
            _ => return Err(e),
        }
    }
    // The APIs last: every request they serve finds the control plane
    // whole (its mesh, the running proxy's ports).
    let _control_api = match &control {
        Some(c) => Some((
            crate::control::api::ApiServer::start(c.clone()).await?,
            crate::control::node_api::NodeApi::start(c.clone())?,
        )),
        None => None,
    };
    let reloads = control
        .as_ref()
        .map(|c| c.config_reloads.clone())
        .unwrap_or_default();
    let shown = reloads.clone();
    api.set_show_section("config_reload", Arc::new(move || shown.to_json()));
    let stats = slot.stats.clone();
    api.set_show_section(
        "proxy",
        Arc::new(move || match stats.lock().as_ref() {
            Some(h) => serde_json::json!({
                "routes": h.stats(),
                "certificates": h.certificates(),
                "access_log_dropped": h.access_log_dropped(),
            }),
            None => serde_json::Value::Null,
        }),
    );
    let mesh_driver = slot.mesh.clone().map(|m| {
        let stats = slot.stats.clone();
        let me = m.clone();
        let local: crate::mesh::etcd::Local = Arc::new(move || {
            let ((hosts, http, https), dns) = stats
                .lock()
                .as_ref()
                .map(|h| (h.mesh_local(), h.dns_addrs()))
                .unwrap_or_default();
            let s = &me.settings;
            crate::mesh::table::HubRecord::local(&s.name, &s.advertise, &http, &https, hosts)
                .with_dns(&dns)
        });
        let view = m.clone();
        api.set_show_section("mesh", Arc::new(move || serde_json::json!(view.view())));
        crate::mesh::etcd::Driver::start(m, local)
    });
    if let Some(c) = carrier.clone() {
        api.set_show_section(
            "tls_tunnels",
            Arc::new(move || serde_json::json!(c.counters.snapshot())),
        );
    }
    info!(
        interface = %cfg.interface,
        public_key = %cfg.private_key.public_key(),
        "hub ready"
    );
    if let Some(why) = keepalive_warning(cfg.keepalive) {
        warn!(keepalive = cfg.keepalive, "{why}");
    }
    if let Some(why) = forwarding_warning(cfg.node_to_node) {
        warn!("{why}");
    }
    crate::sd_notify::ready();
    let _watchdog = crate::sd_notify::spawn_watchdog();
    let mut poll = tokio::time::interval(CONFIG_POLL);
    let mut seen = stamp.clone();
    let mut revalidate = tokio::time::interval(
        control
            .as_ref()
            .map_or(Duration::from_secs(3600), |c| c.settings().revalidate),
    );
    let no_control = tokio::sync::Notify::new();
    let apply = control.as_ref().map_or(&no_control, |c| &c.apply);
    tokio::pin!(shutdown);
    let mut ended = Ok(());
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            () = dev.inner.lost() => {
                ended = Err(anyhow::anyhow!("the TUN interface {} is gone", cfg.interface));
                break;
            }
            _ = apply.notified() => {
                if let Some(c) = &control {
                    let started = slot.proxy.is_none();
                    slot.apply(wanted_proxy(&c.hub_config(), Some(c))).await;
                    // Declared forwards checked while the proxy was being
                    // started were not tried against any port: checked now.
                    if started {
                        c.recheck("declared forwards checked against the hub's ports; re-applying routes");
                    }
                }
            }
            _ = async { match &names_changed { Some(n) => n.notified().await, None => std::future::pending().await } }, if control.is_some() => {
                if let Some(c) = &control {
                    c.recheck("name claims in the mesh changed; re-applying routes");
                }
            }
            _ = revalidate.tick(), if control.is_some() => {
                if let Some(c) = &control {
                    c.recheck("name ownership changed; re-applying routes");
                    let _ = c.mutate(|s, ctx| { s.prune_tokens(ctx.now); Ok(()) }).await;
                }
            }
            _ = poll.tick(), if path.is_some() => {
                let now = path.as_deref().and_then(file_stamp);
                // Taken when two polls in a row read the same new bytes: a
                // file being written in place is not applied half done.
                let settled = now == seen;
                seen.clone_from(&now);
                if now.is_some() && now != stamp && settled {
                    stamp = now;
                    if let Some(p) = &path {
                        info!(config = %p.display(), "config file changed; reloading");
                        crate::sd_notify::reloading();
                        let r = slot.reload(p, &mut running, &dev.inner, control.as_deref()).await;
                        reloaded(&reloads, r);
                    }
                }
            }
            Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                // The access log first, whatever the file holds now: a
                // rotation must not wait for a config that loads.
                if let Some(p) = &slot.proxy {
                    p.reopen_access_log();
                }
                if let Some(p) = &path {
                    info!(config = %p.display(), "SIGHUP; reloading");
                    stamp = file_stamp(p);
                    crate::sd_notify::reloading();
                    let r = slot.reload(p, &mut running, &dev.inner, control.as_deref()).await;
                    reloaded(&reloads, r);
                }
            }
        }
    }
    info!("hub stopping");
    crate::sd_notify::stopping();
    // Withdrawn first, so the other hubs stop sending connections here.
    if let (Some(d), Some(m)) = (mesh_driver, slot.mesh.as_ref()) {
        d.stop(m).await;
    }
    // Then the proxy's connections drain, while the tunnels and the overlay
    // they go through are still up.
    *slot.stats.lock() = None;
    if let Some(p) = slot.proxy.take() {
        p.shutdown(PROXY_DRAIN).await;
    }
    if let Some(c) = &carrier {
        c.close_all();
    }
    if let Some(y) = ygg {
        y.shutdown().await;
    }
    drop(_control_api);
    drop(control);
    drop(api);
    drop(dev);
    ended
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const K1: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const K2: &str = "6NXwZlc6pFHq5HsFgUgy0kCDVVqAozyM6CN5HmBvqUU=";
    const P1: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";
    const P2: &str = "yHzGsE1l0NSB1N56nyPUwsfD4nGmGdKrXfH9QewlLwA=";
    const P3: &str = "ORrDxCIfNZAREsI7WShoXYxP5gfTh1EqPUi0Tso/SyU=";
    /// A throw-away Yggdrasil key (docs/yggdrasil.md, test vectors).
    const YGG_PRIV: &str = "2fb6bcc83c6976e63c76f3286278c441af929b4902a0544cd6e1e401b2a5d3328988ec86fd70a116524ef24b11d0aed0ef374a69b1014ae93a82716a7fadca54";

    fn hub(key: &str, extra: &str) -> HubConfig {
        let text =
            format!("[hub]\nprivate_key = \"{key}\"\naddresses = [\"100.64.0.1/10\"]\n{extra}");
        HubConfig::parse("h.toml", &text, Path::new(".")).unwrap()
    }

    fn peer(key: &str, ip: &str) -> String {
        format!("[[peer]]\npublic_key = \"{key}\"\nallowed_ips = [\"{ip}\"]\n")
    }

    #[test]
    fn a_keepalive_nodes_cannot_hear_in_time_is_warned_about() {
        assert_eq!(
            keepalive_warning(crate::config::DEFAULT_HUB_KEEPALIVE),
            None
        );
        assert_eq!(keepalive_warning(1), None);
        assert!(keepalive_warning(0).is_some_and(|w| w.contains("keepalive = 0")));
        assert!(keepalive_warning(5).is_some_and(|w| w.contains("at least 10 s")));
        assert!(keepalive_warning(25).is_some_and(|w| w.contains("at least 50 s")));
    }

    #[test]
    fn kernel_node_to_node_warns_when_the_host_does_not_forward() {
        use crate::wg::device::NodeToNode;
        let w = |m, v4, v6| kernel_forwarding_warning(m, v4, v6);
        assert_eq!(w(NodeToNode::Direct, Some(false), Some(false)), None);
        assert_eq!(w(NodeToNode::Off, Some(false), Some(false)), None);
        assert_eq!(w(NodeToNode::Kernel, Some(true), Some(true)), None);
        assert_eq!(
            w(NodeToNode::Kernel, None, None),
            None,
            "unreadable: no guess"
        );
        let v4 = w(NodeToNode::Kernel, Some(false), Some(true)).unwrap();
        assert!(
            v4.contains("net.ipv4.ip_forward is 0") && !v4.contains("ipv6"),
            "{v4}"
        );
        let both = w(NodeToNode::Kernel, Some(false), Some(false)).unwrap();
        assert!(
            both.contains("net.ipv6.conf.all.forwarding are 0"),
            "{both}"
        );
        assert!(
            both.contains("sysctl -w net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1"),
            "{both}"
        );
    }

    #[test]
    fn node_to_node_is_taken_on_a_reload() {
        let old = hub(K1, "");
        let mut new = hub(K1, "node_to_node = \"off\"\n");
        assert!(needs_restart(&old, &new).is_empty());
        keep_running(&mut new, &old);
        assert_eq!(new.node_to_node, crate::wg::device::NodeToNode::Off);
        assert_eq!(
            device_config(&hub(K1, "node_to_node = \"kernel\"\n")).forward,
            crate::wg::device::NodeToNode::Kernel
        );
    }

    #[test]
    fn a_reload_names_and_keeps_what_needs_a_restart() {
        let old = hub(
            K1,
            "[control]\nstate_dir = \"/tmp/gw-hub-test\"\nnode_port = 7001\npools = [\"100.64.8.0/21\"]\n",
        );
        let mut new = hub(
            K2,
            "listen_port = 51999\n[control]\nstate_dir = \"/tmp/gw-hub-test\"\nnode_port = 7002\npools = [\"100.64.16.0/21\"]\n",
        );
        let changed = needs_restart(&old, &new);
        assert_eq!(
            changed,
            ["private_key", "listen_port", "[control] node_port"],
            "pools reload, so they are not named"
        );
        keep_running(&mut new, &old);
        assert!(needs_restart(&old, &new).is_empty());
        assert_eq!(new.private_key.public_key(), old.private_key.public_key());
        let c = new.control.as_ref().unwrap();
        assert_eq!(c.node_port, 7001, "the port the node API listens on");
        assert_eq!(c.pools, ["100.64.16.0/21".parse::<IpNet>().unwrap()]);
        // A section that comes or goes.
        let bare = hub(K1, "");
        assert_eq!(needs_restart(&old, &bare), ["[control]"]);
        let mut gone = bare.clone();
        keep_running(&mut gone, &old);
        assert!(gone.control.is_some());
        assert_eq!(needs_restart(&bare, &hub(K1, "[xlat]\n")), ["[xlat]"]);
        assert!(needs_restart(
            &old,
            &hub(
                K1,
                "[control]\nstate_dir = \"/tmp/gw-hub-test\"\nnode_port = 7001\npools = [\"100.64.8.0/21\"]\n"
            )
        )
        .is_empty());
    }

    #[test]
    fn a_changed_yggdrasil_peer_password_needs_a_restart() {
        let ygg = |pass: &str| {
            format!(
                "[yggdrasil]\nprivate_key = \"{YGG_PRIV}\"\n\
                 peers = [\"socks://u:{pass}@127.0.0.1:1080/peer.example:1\", \
                 \"quic://192.0.2.1:1?password={pass}\"]\nversion = \"0.5\"\n"
            )
        };
        let old = hub(K1, &ygg("one"));
        assert!(needs_restart(&old, &hub(K1, &ygg("one"))).is_empty());
        let new = hub(K1, &ygg("two"));
        assert_eq!(needs_restart(&old, &new), ["[yggdrasil]"]);
    }

    #[test]
    fn peer_changes_of_a_reload() {
        let old = hub(
            K1,
            &format!("{}{}", peer(P1, "100.64.1.1/32"), peer(P2, "100.64.1.2/32")),
        );
        // Unchanged: nothing to do.
        assert!(peer_diff(&old.peers, &old.peers).is_empty());
        // P1 gone (a revoked node), P2 with another address, P3 new.
        let new = hub(
            K1,
            &format!(
                "{}{}",
                peer(P2, "100.64.1.22/32"),
                peer(P3, "100.64.1.3/32")
            ),
        );
        let d = peer_diff(&old.peers, &new.peers);
        assert_eq!(d.len(), 3);
        let of = |k: &str| {
            let k = crate::keys::PublicKey::from_base64(k).unwrap();
            d.iter().find(|p| p.public_key == k).unwrap()
        };
        assert!(of(P1).remove);
        for (k, ip) in [(P2, "100.64.1.22/32"), (P3, "100.64.1.3/32")] {
            let p = of(k);
            assert!(!p.remove && p.replace_allowed_ips);
            assert_eq!(p.allowed_ips, [ip.parse::<IpNet>().unwrap()]);
            assert_eq!(p.persistent_keepalive, Some(0));
            assert_eq!(p.preshared_key, Some(None));
        }
    }

    #[test]
    fn a_reload_keeps_a_roamed_endpoint_unless_the_configured_one_changed() {
        let with = |ip: &str, ep: &str| hub(K1, &format!("{}endpoint = \"{ep}\"\n", peer(P1, ip)));
        let old = with("100.64.1.1/32", "192.0.2.1:51820");
        // Another setting changed: the peer is set, its endpoint left alone
        // (it follows the node's packets).
        let d = peer_diff(&old.peers, &with("100.64.1.11/32", "192.0.2.1:51820").peers);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].endpoint, None);
        assert!(d[0].replace_allowed_ips);
        // The configured endpoint itself changed: it is set.
        let d = peer_diff(&old.peers, &with("100.64.1.1/32", "192.0.2.2:51820").peers);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].endpoint, Some("192.0.2.2:51820".parse().unwrap()));
        // A new peer gets its configured endpoint.
        let d = peer_diff(&[], &old.peers);
        assert_eq!(d[0].endpoint, Some("192.0.2.1:51820".parse().unwrap()));
    }

    #[test]
    fn reordered_allowed_ips_change_nothing() {
        let two = |a: &str, b: &str| {
            hub(
                K1,
                &format!("[[peer]]\npublic_key = \"{P1}\"\nallowed_ips = [\"{a}\", \"{b}\"]\n"),
            )
        };
        let old = two("100.64.1.1/32", "10.1.0.0/16");
        assert!(peer_diff(&old.peers, &two("10.1.0.0/16", "100.64.1.1/32").peers).is_empty());
        // A real change is still one, and keeps the configured order.
        let new = two("10.2.0.0/16", "100.64.1.1/32");
        let d = peer_diff(&old.peers, &new.peers);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].allowed_ips, new.peers[0].allowed_ips);
    }

    #[test]
    fn mapped_addresses_are_looked_up_as_ipv4() {
        let v4: IpAddr = "100.64.1.1".parse().unwrap();
        assert_eq!(unmapped("::ffff:100.64.1.1".parse().unwrap()), v4);
        assert_eq!(unmapped(v4), v4);
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(unmapped(v6), v6);
        // Never heard is down; heard within `down_after` is up.
        assert!(!heard_within(50_000, 0, 40_000));
        assert!(heard_within(50_000, 10_001, 40_000));
        assert!(!heard_within(50_000, 10_000, 40_000));
    }
}
