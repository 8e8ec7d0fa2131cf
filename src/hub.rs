//! Hub mode: a WireGuard concentrator that forwards between its nodes and its
//! own network stack.

use crate::config::HubConfig;
use crate::control::runtime::Control;
use crate::proxy::server::StatsHandle;
use crate::proxy::settings::ProxySettings;
use crate::proxy::upstream::TunnelLiveness;
use crate::proxy::Proxy;
use crate::wg::api::ApiServer;
use crate::wg::device::{Device, DeviceConfig, Inner, Mode, Peer, PeerConfig};
use arc_swap::ArcSwap;
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
/// The allowed-IP map is refreshed periodically; the receive times are read
/// live from the peers.
pub struct NodeTunnels {
    nets: ArcSwap<Vec<(IpNet, Arc<Peer>)>>,
    down_after_ms: AtomicU64,
    /// The device clock (`Inner::now_ms`) at `base`.
    base_ms: u64,
    base: std::time::Instant,
    /// Nodes' tunnels carried over TLS, when `[hub] tls_tunnels` is on.
    carrier: Option<Arc<crate::carrier::Hub>>,
}

impl NodeTunnels {
    fn new(
        down_after: Duration,
        dev: &Inner,
        carrier: Option<Arc<crate::carrier::Hub>>,
    ) -> Arc<Self> {
        let t = Arc::new(NodeTunnels {
            nets: ArcSwap::from_pointee(Vec::new()),
            down_after_ms: AtomicU64::new(down_after.as_millis() as u64),
            base_ms: dev.now_ms(),
            base: std::time::Instant::now(),
            carrier,
        });
        t.refresh(dev);
        t
    }

    fn set_down_after(&self, d: Duration) {
        self.down_after_ms.store(d.as_millis() as u64, Relaxed);
    }

    /// Re-reads which peer carries which allowed IPs.
    pub fn refresh(&self, dev: &Inner) {
        let mut v = Vec::new();
        for p in dev.info().peers {
            if let Some(peer) = dev.peer(&p.public_key) {
                v.extend(p.allowed_ips.into_iter().map(|n| (n, peer.clone())));
            }
        }
        self.nets.store(Arc::new(v));
    }
}

impl TunnelLiveness for NodeTunnels {
    fn tunnel_up(&self, ip: IpAddr) -> Option<bool> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        let nets = self.nets.load();
        let (_, peer) = nets
            .iter()
            .filter(|(n, _)| n.contains(&ip))
            .max_by_key(|(n, _)| n.prefix_len())?;
        let now = self.base_ms + self.base.elapsed().as_millis() as u64;
        let last = peer.last_rx_ms();
        Some(last > 0 && now.saturating_sub(last) < self.down_after_ms.load(Relaxed))
    }

    fn carrier(&self) -> Option<Arc<crate::carrier::Hub>> {
        self.carrier.clone()
    }
}

/// Starts the reverse proxy if the config has one. Call after the TUN is up, so
/// the check against the host's addresses sees the overlay addresses too.
pub async fn start_proxy(cfg: &HubConfig) -> anyhow::Result<Option<Proxy>> {
    start_proxy_with(cfg.proxy.clone(), None, None).await
}

async fn start_proxy_with(
    settings: Option<ProxySettings>,
    tunnels: Option<Arc<dyn TunnelLiveness>>,
    mesh: Option<Arc<crate::mesh::Mesh>>,
) -> anyhow::Result<Option<Proxy>> {
    let Some(settings) = settings else {
        return Ok(None);
    };
    crate::proxy::settings::check_host_addresses(&settings)
        .map_err(|e| anyhow::anyhow!("proxy: {e}"))?;
    Ok(Some(Proxy::start_meshed(settings, tunnels, mesh).await?))
}

/// The proxy of a running hub, swapped on reload.
struct ProxySlot {
    proxy: Option<Proxy>,
    stats: Arc<parking_lot::Mutex<Option<StatsHandle>>>,
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

    /// Applies new proxy settings: reloads the running proxy, starts one, or
    /// drains it. Errors are logged and the running proxy is kept.
    async fn apply(&mut self, settings: Option<ProxySettings>) {
        if let Some(s) = &settings {
            self.tunnels.set_down_after(s.limits.tunnel_down_after);
            if let Err(e) = crate::proxy::settings::check_host_addresses(s) {
                warn!(error = %e, "config reload refused; keeping the running proxy");
                return;
            }
        }
        match (settings, &self.proxy) {
            (Some(s), Some(p)) => {
                if let Err(e) = p.reload(s).await {
                    warn!(error = %format!("{e:#}"), "proxy reload failed; keeping the running proxy");
                }
            }
            (Some(s), None) => {
                match start_proxy_with(
                    Some(s),
                    Some(self.tunnels.clone() as Arc<dyn TunnelLiveness>),
                    self.mesh.clone(),
                )
                .await
                {
                    Ok(p) => self.set(p),
                    Err(e) => warn!(error = %format!("{e:#}"), "proxy start on reload failed"),
                }
            }
            (None, Some(_)) => {
                info!("proxy removed from the config; draining");
                if let Some(p) = self.proxy.take() {
                    *self.stats.lock() = None;
                    tokio::spawn(p.shutdown(PROXY_DRAIN));
                }
            }
            (None, None) => {}
        }
    }

    /// Re-reads `path` and applies it. A file that does not load is logged and
    /// the running proxy is kept.
    async fn reload(&mut self, path: &Path, control: Option<&Control>) {
        let cfg = match HubConfig::load(path) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "config reload failed; keeping the running proxy");
                return;
            }
        };
        if cfg.mesh.as_ref() != self.mesh.as_ref().map(|m| &m.settings) {
            warn!(
                "[mesh] changed in the config file; the change takes effect when the hub restarts"
            );
        }
        match control {
            // The control plane merges its routes and asks for an apply.
            Some(c) => c.set_config(cfg).await,
            None => self.apply(cfg.proxy).await,
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

pub fn device_config(cfg: &HubConfig) -> DeviceConfig {
    DeviceConfig {
        name: cfg.interface.clone(),
        mode: Mode::Hub,
        private_key: Some(cfg.private_key.clone()),
        listen_port: cfg.listen_port,
        addresses: cfg.addresses.clone(),
        mtu: cfg.mtu,
        forward: true,
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
        Some(Arc::new(crate::carrier::Hub::new(move || d.loopback())?))
    } else {
        None
    };
    let tunnels = NodeTunnels::new(down_after, &dev.inner, carrier.clone());
    let control = match &cfg.control {
        Some(_) => Some(Control::start(cfg.clone(), dev.inner.clone()).await?),
        None => None,
    };
    if let Some(c) = &control {
        *c.tls_tunnels.lock() = carrier.clone();
    }
    let _control_api = match &control {
        Some(c) => Some((
            crate::control::api::ApiServer::start(c.clone()).await?,
            crate::control::node_api::NodeApi::start(c.clone())?,
        )),
        None => None,
    };
    let mut slot = ProxySlot {
        proxy: None,
        stats: control
            .as_ref()
            .map(|c| c.proxy_stats.clone())
            .unwrap_or_default(),
        tunnels: tunnels.clone(),
        mesh: cfg.mesh.clone().map(crate::mesh::Mesh::new),
    };
    if let Some(c) = &control {
        *c.mesh.lock() = slot.mesh.clone();
    }
    // The names the control plane grants are claimed across the mesh.
    if let (Some(c), Some(m)) = (&control, &slot.mesh) {
        m.use_claims_cache(c.settings().state_dir.join("mesh-claims.json"));
        let c = Arc::downgrade(c);
        m.set_claim_source(Arc::new(move |now| c.upgrade().map(|c| c.claim_wants(now))));
    }
    let names_changed = slot.mesh.as_ref().map(|m| m.names_changed());
    slot.set(
        start_proxy_with(
            wanted_proxy(&cfg, control.as_deref()),
            Some(tunnels.clone() as Arc<dyn TunnelLiveness>),
            slot.mesh.clone(),
        )
        .await?,
    );
    let stats = slot.stats.clone();
    api.set_show_section(
        "proxy",
        Arc::new(move || match stats.lock().as_ref() {
            Some(h) => serde_json::json!({ "routes": h.stats(), "certificates": h.certificates() }),
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
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut stamp = path.as_deref().and_then(file_stamp);
    let mut poll = tokio::time::interval(CONFIG_POLL);
    let mut live = tokio::time::interval(Duration::from_secs(1));
    let mut revalidate = tokio::time::interval(
        control
            .as_ref()
            .map_or(Duration::from_secs(3600), |c| c.settings().revalidate),
    );
    let no_control = tokio::sync::Notify::new();
    let apply = control.as_ref().map_or(&no_control, |c| &c.apply);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = live.tick() => tunnels.refresh(&dev.inner),
            _ = apply.notified() => {
                if let Some(c) = &control {
                    slot.apply(wanted_proxy(&c.hub_config(), Some(c))).await;
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
                if now.is_some() && now != stamp {
                    stamp = now;
                    if let Some(p) = &path {
                        info!(config = %p.display(), "config file changed; reloading the proxy");
                        slot.reload(p, control.as_deref()).await;
                    }
                }
            }
            Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                if let Some(p) = &path {
                    info!(config = %p.display(), "SIGHUP; reloading the proxy");
                    stamp = file_stamp(p);
                    slot.reload(p, control.as_deref()).await;
                }
            }
        }
    }
    info!("hub stopping");
    // Withdrawn first, so the other hubs stop sending connections here.
    if let (Some(d), Some(m)) = (mesh_driver, slot.mesh.as_ref()) {
        d.stop(m).await;
    }
    if let Some(c) = &carrier {
        c.close_all();
    }
    if let Some(y) = ygg {
        y.shutdown().await;
    }
    *slot.stats.lock() = None;
    if let Some(p) = slot.proxy.take() {
        p.shutdown(PROXY_DRAIN).await;
    }
    drop(_control_api);
    drop(control);
    drop(api);
    drop(dev);
    Ok(())
}
