//! The running control plane of a hub: the state behind a writer lock, its
//! store, the device peers it manages, and the routes it hands the proxy.
//!
//! Every change goes through [`Control::mutate`]: one writer at a time applies
//! a pure operation ([`crate::control::state`]) to a copy, saves the copy, and
//! only then publishes it, syncs the device's peers and asks the hub to
//! re-apply the proxy's routes. Readers load the published state without
//! locks.

use crate::clock::unix_secs;
use crate::config::{HubConfig, ProxyRaw};
use crate::control::registry::{LocalRegistry, NameRegistry, Verdict};
use crate::control::settings::ControlSettings;
use crate::control::state::{Context, Error, Evaluation, Protocol, ServiceStatus, State};
use crate::control::store::{FileStore, Store};
use crate::proxy::server::StatsHandle;
use crate::proxy::settings::{ProxySettings, RawRoute};
use crate::wg::device::Inner;
use crate::wg::uapi::{DeviceSet, PeerSet};
use arc_swap::ArcSwap;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tracing::{info, warn};

/// Facts taken from the hub's config file.
struct FileEnv {
    cfg: HubConfig,
    /// `[control]` of `cfg`, or the running one if the file lost its section
    /// (the control plane keeps going until the hub restarts).
    settings: ControlSettings,
    file_hosts: BTreeSet<String>,
    file_keys: BTreeSet<String>,
    used_ips: Vec<IpNet>,
    file_ports: BTreeSet<(Protocol, u16)>,
}

/// The registry with the hub mesh's word on top: a name the mesh holds for
/// another node is refused even when this hub's own state grants it.
struct MeshAware<'a> {
    local: &'a dyn NameRegistry,
    held: &'a (dyn Fn(&str, &str) -> Option<String> + Sync),
}

impl NameRegistry for MeshAware<'_> {
    fn verdict(&self, state: &State, name: &str, key: &str, now: u64) -> Verdict {
        let v = self.local.verdict(state, name, key, now);
        if v != Verdict::Allowed {
            return v;
        }
        let owner = state
            .names
            .get(name)
            .and_then(|r| r.owners.first())
            .map_or(key, |o| o.as_str());
        match (self.held)(name, owner) {
            Some(why) => Verdict::Refused(format!("name `{name}`: {why}")),
            None => Verdict::Allowed,
        }
    }
}

impl FileEnv {
    /// The gateway domains of the config file's `[proxy]`.
    fn domains(&self) -> Vec<crate::proxy::names::DomainName> {
        self.cfg
            .proxy
            .as_ref()
            .map(|p| p.domains.clone())
            .unwrap_or_default()
    }

    fn new(cfg: HubConfig, running: &ControlSettings) -> Self {
        let mut file_hosts = BTreeSet::new();
        let mut file_ports = BTreeSet::new();
        if let Some(p) = &cfg.proxy {
            for r in &p.routes {
                file_hosts.insert(r.host.to_string());
            }
            for a in p.http_listen.iter().chain(&p.https_listen) {
                file_ports.insert((Protocol::Tcp, a.port()));
            }
            file_ports.extend(p.tcp.iter().map(|t| (Protocol::Tcp, t.listen.port())));
            file_ports.extend(p.udp.iter().map(|u| (Protocol::Udp, u.listen.port())));
            // DNS listeners take their port on both.
            for a in crate::proxy::settings::DnsSettings::listeners(p) {
                file_ports.insert((Protocol::Tcp, a.port()));
                file_ports.insert((Protocol::Udp, a.port()));
            }
        }
        let mut file_keys: BTreeSet<String> =
            cfg.peers.iter().map(|p| p.public_key.to_base64()).collect();
        file_keys.insert(cfg.private_key.public_key().to_base64());
        let mut used_ips: Vec<IpNet> = cfg
            .addresses
            .iter()
            .map(|n| IpNet::from(n.addr()))
            .collect();
        for p in &cfg.peers {
            used_ips.extend(p.allowed_ips.iter().copied());
        }
        // The tunnel's own UDP port.
        file_ports.insert((Protocol::Udp, cfg.listen_port));
        if let Some(c) = &cfg.control {
            file_ports.insert((Protocol::Tcp, c.node_port));
            file_ports.extend(c.listen.iter().map(|a| (Protocol::Tcp, a.port())));
        }
        FileEnv {
            settings: cfg.control.clone().unwrap_or_else(|| running.clone()),
            cfg,
            file_hosts,
            file_keys,
            used_ips,
            file_ports,
        }
    }

    fn settings(&self) -> &ControlSettings {
        &self.settings
    }

    /// Checks one route spec the way the config file's routes are checked.
    fn check_route(&self, spec: &RawRoute) -> Result<(), String> {
        let raw = ProxyRaw {
            proxy: self.cfg.proxy_raw.proxy.clone(),
            route: vec![spec.clone()],
            tcp: vec![],
            udp: vec![],
        };
        let s = raw.validate_with(&ProxyRaw::default(), &self.cfg.addresses, &self.cfg.base)?;
        if let Some(s) = s {
            crate::proxy::settings::check_host_addresses(&s)?;
            // A file the proxy could not read would fail the hub's next reload.
            for r in &s.routes {
                if let Some(p) = &r.basic_auth_file {
                    crate::proxy::basic_auth::load(p).map_err(|e| format!("route: {e}"))?;
                }
            }
        }
        Ok(())
    }
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Counters {
    pub api_requests: AtomicU64,
    pub api_errors: AtomicU64,
    pub joins: AtomicU64,
}

pub struct Control {
    pub dev: Arc<Inner>,
    store: Box<dyn Store>,
    registry: Box<dyn NameRegistry>,
    writer: tokio::sync::Mutex<()>,
    state: ArcSwap<State>,
    env: ArcSwap<FileEnv>,
    /// Peers this control plane added to the device, with the allowed IPs
    /// it gave them.
    managed: parking_lot::Mutex<Managed>,
    /// The last evaluation of declared services.
    evaluation: ArcSwap<Evaluation>,
    /// Tells the hub to re-apply the proxy's routes.
    pub apply: tokio::sync::Notify,
    pub counters: Counters,
    /// The running proxy's counters, for route health and `/metrics`.
    pub proxy_stats: Arc<parking_lot::Mutex<Option<StatsHandle>>>,
    /// Nodes' tunnels carried over TLS, for `/metrics` (set by the hub).
    pub tls_tunnels: parking_lot::Mutex<Option<Arc<crate::carrier::Hub>>>,
    /// The hub mesh: its claims are checked before a name is granted, and
    /// it is shown in `/metrics`. Given at the start, so no request can be
    /// served without it.
    pub mesh: Option<Arc<crate::mesh::Mesh>>,
    /// Held by the hub while it starts a proxy (none running): the ports
    /// the new proxy binds are not yet known as its own, so declared
    /// forwards are not checked against them meanwhile.
    pub proxy_starting: Arc<tokio::sync::Mutex<()>>,
    /// SHA-256 of the certificate the TCP API listener serves (set when it
    /// starts): what join tokens pin and `GET /v1/status` shows.
    pub api_fingerprint: parking_lot::Mutex<Option<[u8; 32]>>,
    /// Serialises `sync_peers`.
    sync_lock: tokio::sync::Mutex<()>,
    /// Serialises `reevaluate`.
    eval_lock: parking_lot::Mutex<()>,
    /// The hub's config reloads, for `/metrics` (counted by the hub).
    pub config_reloads: Arc<crate::hub::ReloadOutcomes>,
}

/// A config file checked against the control plane, not taken yet
/// ([`Control::prepare_config`]). Holds the writer's lock.
pub struct ConfigCandidate<'a> {
    _writer: tokio::sync::MutexGuard<'a, ()>,
    env: FileEnv,
    /// The state without the declared services of peers the file no
    /// longer lists, and those peers, when there are any.
    next: Option<(State, Vec<String>)>,
    /// The declared services checked against the file's facts.
    evaluation: Evaluation,
    proxy: Option<ProxySettings>,
}

impl ConfigCandidate<'_> {
    /// The proxy settings the hub should run with the file: its sections,
    /// the operator's routes and the active declared services.
    pub fn proxy(&self) -> Option<ProxySettings> {
        self.proxy.clone()
    }
}

impl Control {
    /// Loads the state and adds its peers to the device. `mesh` is the hub
    /// mesh, when the hub is in one.
    pub async fn start(
        cfg: HubConfig,
        dev: Arc<Inner>,
        mesh: Option<Arc<crate::mesh::Mesh>>,
    ) -> anyhow::Result<Arc<Control>> {
        let settings = cfg
            .control
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no [control] section"))?;
        let store = FileStore::open(&settings.state_dir)?;
        let mut state: State = store.load().await?.unwrap_or_default();
        state
            .file_peer_conflict(&file_peers(&cfg))
            .map_err(|e| anyhow::anyhow!("config file against the control plane's state: {e}"))?;
        let env = FileEnv::new(cfg, &settings);
        // Peers taken out of the file while the hub was down.
        let mut next = state.clone();
        let gone = next.drop_services_of_non_peers(&env.file_keys);
        if !gone.is_empty() {
            match store.save(&next).await {
                Ok(()) => {
                    info!(peers = ?gone, "declared services of peers no longer in the config file dropped");
                    state = next;
                }
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "saving the control plane state failed; the declared services of peers no longer in the config file are kept for now")
                }
            }
        }
        info!(
            state = %store.describe(),
            version = state.version,
            nodes = state.nodes.len(),
            routes = state.routes.len(),
            "control plane state loaded"
        );
        let c = Arc::new(Control {
            dev,
            store: Box::new(store),
            registry: Box::new(LocalRegistry {
                grace: settings.grace,
            }),
            writer: tokio::sync::Mutex::new(()),
            state: ArcSwap::from_pointee(state),
            env: ArcSwap::from_pointee(env),
            managed: parking_lot::Mutex::new(Managed::new()),
            evaluation: ArcSwap::from_pointee(Evaluation::default()),
            apply: tokio::sync::Notify::new(),
            counters: Counters::default(),
            proxy_stats: Arc::default(),
            tls_tunnels: parking_lot::Mutex::new(None),
            mesh,
            proxy_starting: Arc::default(),
            api_fingerprint: parking_lot::Mutex::new(None),
            sync_lock: tokio::sync::Mutex::new(()),
            eval_lock: parking_lot::Mutex::new(()),
            config_reloads: Arc::default(),
        });
        c.sync_peers().await;
        c.reevaluate();
        Ok(c)
    }

    pub fn settings(&self) -> ControlSettings {
        self.env.load().settings().clone()
    }

    pub fn hub_config(&self) -> HubConfig {
        self.env.load().cfg.clone()
    }

    /// The published state.
    pub fn state(&self) -> Arc<State> {
        self.state.load_full()
    }

    pub fn evaluation(&self) -> Arc<Evaluation> {
        self.evaluation.load_full()
    }

    /// What became of `key`'s declared services.
    pub fn statuses_of(&self, key: &str) -> Vec<ServiceStatus> {
        self.evaluation
            .load()
            .statuses
            .get(key)
            .cloned()
            .unwrap_or_default()
    }

    /// Whether `key`'s declaration `decls` from `from` would change the
    /// published state, or the error [`Control::mutate`] would give it,
    /// without the writer's lock: a node's refresh of an unchanged set, or
    /// an invalid one, holds up no change.
    pub fn declaration_changes(
        &self,
        key: &str,
        from: IpAddr,
        decls: Vec<crate::control::state::ServiceDecl>,
    ) -> crate::control::state::Result<bool> {
        let env = self.env.load();
        self.state
            .load()
            .declared(unix_secs(), &env.file_keys, key, from, decls)
            .map(|out| out.is_some())
    }

    /// A new config file, step one: refused, with nothing changed, when its
    /// `[[peer]]`s list a prefix a joined node holds (see
    /// [`State::file_peer_conflict`]); otherwise the proxy settings it
    /// gives with the control plane's routes ([`ConfigCandidate::proxy`]),
    /// made from the file's facts, the state without the declared services
    /// of peers the file no longer lists, and the declared services checked
    /// against both. Nothing is taken yet: the candidate holds the writer's
    /// lock until [`Control::adopt_config`] takes it (or it is dropped, when
    /// the hub cannot build that proxy), so a node added while the file is
    /// being applied is checked against the new file's peers, never slips
    /// in between.
    pub async fn prepare_config(&self, cfg: &HubConfig) -> Result<ConfigCandidate<'_>, String> {
        let w = self.writer.lock().await;
        self.state.load().file_peer_conflict(&file_peers(cfg))?;
        let env = FileEnv::new(cfg.clone(), &self.settings());
        let cur = self.state.load_full();
        let mut next = (*cur).clone();
        let gone = next.drop_services_of_non_peers(&env.file_keys);
        let evaluation = self.evaluate(&env, &next);
        let proxy = match Self::effective(&env, &next, &evaluation) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "control plane routes refused");
                env.cfg.proxy.clone()
            }
        };
        Ok(ConfigCandidate {
            _writer: w,
            env,
            next: (!gone.is_empty()).then_some((next, gone)),
            evaluation,
            proxy,
        })
    }

    /// A new config file, step two, once the proxy it asks for is ready:
    /// its facts are what every later change is checked against, and the
    /// declared services of peers it no longer lists are dropped (saved
    /// first, as any change). Step three, once the file's peers are on the
    /// device: [`Control::config_applied`].
    pub async fn adopt_config(&self, c: ConfigCandidate<'_>) {
        if c.env.cfg.control.is_none() {
            warn!("the config file lost its [control] section; the control plane keeps its settings until the hub restarts");
        }
        self.env.store(Arc::new(c.env));
        // A peer taken out of the file takes its declared services with
        // it, as a removed node does; with the writer's lock still held, no
        // declaration of its slips in between.
        let published = match c.next {
            None => true,
            Some((next, gone)) => match self.store.save(&next).await {
                Ok(()) => {
                    info!(peers = ?gone, "declared services of peers no longer in the config file dropped");
                    self.state.store(Arc::new(next));
                    true
                }
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "saving the control plane state failed; the declared services of peers no longer in the config file are kept until the next change of the file");
                    false
                }
            },
        };
        // The evaluation the proxy was built with, when it is of the
        // published state.
        if published {
            let _one = self.eval_lock.lock();
            self.publish_evaluation(c.evaluation);
        }
    }

    /// A new config file, step three: the control plane's peers are synced
    /// with it. The hub then puts the proxy in place and asks for a
    /// [`Control::recheck`].
    pub async fn config_applied(&self) {
        self.sync_peers().await;
    }

    /// Runs `op` on a copy of the state with the current facts; saves and
    /// publishes the copy if it changed. The answer is given only after that.
    pub async fn mutate<T>(
        &self,
        op: impl FnOnce(&mut State, &Context) -> crate::control::state::Result<T>,
    ) -> crate::control::state::Result<T> {
        let _w = self.writer.lock().await;
        let cur = self.state.load_full();
        let mut next = (*cur).clone();
        let out = {
            let env = self.env.load_full();
            let st = env.settings();
            let check = |r: &RawRoute| env.check_route(r);
            let now = unix_secs();
            let held = |name: &str, owner: &str| self.may_grant(&env, name, owner, now);
            let ctx = Context {
                now,
                check_route: &check,
                file_hosts: &env.file_hosts,
                file_keys: &env.file_keys,
                used_ips: &env.used_ips,
                pools: &st.pools,
                ports: st.ports.clone(),
                file_ports: &env.file_ports,
                max_ports_per_node: st.max_ports_per_node,
                // Ports are checked where declarations are evaluated.
                port_busy: &|_, _| None,
                held_elsewhere: &held,
            };
            op(&mut next, &ctx)?
        };
        if next != *cur {
            if let Err(e) = self.store.save(&next).await {
                warn!(error = %format!("{e:#}"), "saving the control plane state failed; change not made");
                return Err(crate::control::state::Error {
                    status: 500,
                    message: format!("the state could not be saved: {e:#}"),
                });
            }
            self.state.store(Arc::new(next));
            drop(_w);
            self.sync_peers().await;
            self.reevaluate();
            self.apply.notify_one();
        }
        Ok(out)
    }

    /// Whether `owner` may be granted the registry name `name` here: not
    /// when the hub mesh holds one of its hosts for another node (409), nor
    /// before the mesh's claims were first read (503: nothing to check
    /// against yet).
    fn may_grant(&self, env: &FileEnv, name: &str, owner: &str, now: u64) -> Result<(), Error> {
        let Some(mesh) = &self.mesh else {
            return Ok(());
        };
        if !mesh.names_read() {
            return Err(Error {
                status: 503,
                message: format!(
                    "name `{name}`: the hub mesh's name claims have not been read from etcd yet; try again when the mesh is connected"
                ),
            });
        }
        match self.held_elsewhere(env, name, owner, now) {
            Some(why) => Err(Error::conflict(format!("name `{name}`: {why}"))),
            None => Ok(()),
        }
    }

    /// Why `owner` may not serve the registry name `name` here: the hub
    /// mesh holds one of its hosts for another node (nothing before the
    /// claims were first read).
    fn held_elsewhere(&self, env: &FileEnv, name: &str, owner: &str, now: u64) -> Option<String> {
        let mesh = self.mesh.as_ref()?;
        mesh.name_refusal(name, owner, &env.domains(), now)
    }

    /// What this hub's grants ask the mesh to claim at `now`: every host of
    /// every granted name that has not lapsed, for its first owner.
    pub fn claim_wants(&self, now: u64) -> crate::mesh::claims::Wants {
        let env = self.env.load_full();
        let state = self.state.load_full();
        let grants = state.names.iter().filter_map(|(n, r)| {
            r.owners
                .first()
                .map(|o| (n.as_str(), o.as_str(), r.expires))
        });
        crate::mesh::claims::wants(grants, &env.domains(), now, env.settings().grace)
    }

    /// [`Control::reevaluate`], and when the outcome changed, logs `why` and
    /// asks the hub to re-apply the routes.
    pub fn recheck(&self, why: &str) {
        if self.reevaluate() {
            info!("{why}");
            self.apply.notify_one();
        }
    }

    /// Re-checks declared services against the registry; tells the hub when
    /// the outcome changed. Returns whether it did.
    pub fn reevaluate(&self) -> bool {
        // One at a time, each from the state as it is then: the evaluation
        // stored last is of the newest state, never an older one that lost
        // a race.
        let _one = self.eval_lock.lock();
        let env = self.env.load_full();
        let ev = self.evaluate(&env, &self.state.load());
        self.publish_evaluation(ev)
    }

    /// Checks the declared services of `state` against the registry, with
    /// the facts of `env`.
    fn evaluate(&self, env: &FileEnv, state: &State) -> Evaluation {
        let st = env.settings();
        let check = |r: &RawRoute| env.check_route(r);
        let now = unix_secs();
        let grant = |name: &str, owner: &str| self.may_grant(env, name, owner, now);
        let held = |name: &str, owner: &str| self.held_elsewhere(env, name, owner, now);
        // Held to the end: no proxy starts while ports are tried here.
        let no_start = self.proxy_starting.try_lock().ok();
        let proxy = self.proxy_stats.lock().clone();
        let busy = |p: Protocol, port: u16| -> Option<String> {
            let udp = match p {
                Protocol::Udp => true,
                Protocol::Tcp => false,
                Protocol::Http => return None,
            };
            forward_port_busy(proxy.as_ref(), no_start.is_none(), udp, port)
        };
        let ctx = Context {
            now,
            check_route: &check,
            file_hosts: &env.file_hosts,
            file_keys: &env.file_keys,
            used_ips: &env.used_ips,
            pools: &st.pools,
            ports: st.ports.clone(),
            file_ports: &env.file_ports,
            max_ports_per_node: st.max_ports_per_node,
            port_busy: &busy,
            held_elsewhere: &grant,
        };
        let acme = env.cfg.proxy.as_ref().is_some_and(|p| p.acme.is_some());
        let registry = MeshAware {
            local: self.registry.as_ref(),
            held: &held,
        };
        state.evaluate(&ctx, &registry, acme)
    }

    /// Stores `ev` as the evaluation of declared services (call with
    /// `eval_lock` held), logging the refused ones when it changed.
    /// Returns whether it did.
    fn publish_evaluation(&self, ev: Evaluation) -> bool {
        let changed = *self.evaluation.load_full() != ev;
        if changed {
            for (key, sts) in &ev.statuses {
                for s in sts {
                    if s.status != "active" {
                        info!(node = %key, host = %s.host, error = s.error.as_deref().unwrap_or(""), "declared service refused");
                    }
                }
            }
            self.evaluation.store(Arc::new(ev));
        }
        changed
    }

    /// The proxy settings: the config file's sections plus the operator's
    /// routes and the active declared services. A route that does not fit (for
    /// example, a name route after the file lost its gateway domains) is left
    /// out and logged; it never takes the others down.
    pub fn effective_proxy(&self) -> Result<Option<ProxySettings>, String> {
        Self::effective(
            &self.env.load(),
            &self.state.load(),
            &self.evaluation.load(),
        )
    }

    /// [`Control::effective_proxy`] from `env`, `state` and its evaluation
    /// `ev`.
    fn effective(
        env: &FileEnv,
        state: &State,
        ev: &Evaluation,
    ) -> Result<Option<ProxySettings>, String> {
        let cfg = &env.cfg;
        let file = &cfg.proxy_raw;
        let mut extra = ProxyRaw::default();
        if file.proxy.is_none() {
            extra.proxy = Some(Default::default());
        }
        let fits = |e: &ProxyRaw| file.validate_with(e, &cfg.addresses, &cfg.base).is_ok();
        for (id, r) in &state.routes {
            let one = ProxyRaw {
                proxy: extra.proxy.clone(),
                route: vec![r.spec.clone()],
                ..Default::default()
            };
            if fits(&one) {
                extra.route.push(r.spec.clone());
            } else {
                warn!(route = %id, "route does not fit the current config; left out");
            }
        }
        for r in &ev.routes {
            let one = ProxyRaw {
                proxy: extra.proxy.clone(),
                route: vec![r.clone()],
                ..Default::default()
            };
            if fits(&one) {
                extra.route.push(r.clone());
            } else {
                warn!(name = ?r.name.as_ref().or(r.fqdn.as_ref()), "declared service does not fit the current config; left out");
            }
        }
        // Forwards one at a time too: one that does not fit is left out, not
        // every route with it.
        for t in &ev.tcp {
            let one = ProxyRaw {
                proxy: extra.proxy.clone(),
                tcp: vec![t.clone()],
                ..Default::default()
            };
            if fits(&one) {
                extra.tcp.push(t.clone());
            } else {
                warn!(listen = %t.listen, "declared TCP forward does not fit the current config; left out");
            }
        }
        for u in &ev.udp {
            let one = ProxyRaw {
                proxy: extra.proxy.clone(),
                udp: vec![u.clone()],
                ..Default::default()
            };
            if fits(&one) {
                extra.udp.push(u.clone());
            } else {
                warn!(listen = %u.listen, "declared UDP forward does not fit the current config; left out");
            }
        }
        if extra.route.is_empty() && extra.tcp.is_empty() && extra.udp.is_empty() {
            return file.validate_with(&ProxyRaw::default(), &cfg.addresses, &cfg.base);
        }
        match file.validate_with(&extra, &cfg.addresses, &cfg.base) {
            Ok(s) => Ok(s),
            Err(e) => {
                warn!(error = %e, "control plane routes do not fit together; serving the config file's routes only");
                file.validate_with(&ProxyRaw::default(), &cfg.addresses, &cfg.base)
            }
        }
    }

    /// Makes the device's control-plane peers match the state.
    async fn sync_peers(&self) {
        // One at a time: two syncs reading `managed` before either wrote it
        // back could leave a deleted peer on the device.
        let _one = self.sync_lock.lock().await;
        let _routes = self.dev.route_lock.lock().await;
        let state = self.state.load_full();
        let env = self.env.load_full();
        let mut managed = self.managed.lock().clone();
        let set = peer_changes(&state, &env.file_keys, &mut managed, |k| {
            self.dev.peer(k).is_some()
        });
        if set.peers.is_empty() {
            return;
        }
        // With `[hub] routes`, prefixes outside the hub's own networks get a
        // route while a peer owns them.
        let routes = env.cfg.routes;
        let (added, removed): (Vec<IpNet>, Vec<IpNet>) = if routes {
            let added = set
                .peers
                .iter()
                .filter(|p| !p.remove)
                .flat_map(|p| p.allowed_ips.iter().copied())
                .collect();
            // What a removed peer held, and what a re-added one held and
            // holds no more.
            let removed = self.dev.given_up(&set.peers);
            (added, removed)
        } else {
            (Vec::new(), Vec::new())
        };
        match self.dev.apply(set).await {
            Ok(()) => {
                *self.managed.lock() = managed;
                if routes {
                    // iproute2 runs as a child process: off the async workers.
                    // Still routed: what the peers hold, and the
                    // translator's prefixes.
                    let held: Vec<IpNet> = self
                        .dev
                        .peer_prefixes()
                        .into_iter()
                        .chain(env.cfg.xlat.iter().flat_map(|x| x.routes.iter().copied()))
                        .collect();
                    let cfg = env.cfg.clone();
                    let dev = self.dev.clone();
                    let r = tokio::task::spawn_blocking(move || {
                        sync_routes(&cfg, &dev, &added, &removed, &held)
                    });
                    if let Err(e) = r.await {
                        warn!(error = %e, "control-plane peer routes: task failed");
                    }
                }
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "adding control-plane peers to the device failed")
            }
        }
        for (k, n) in &state.nodes {
            if let (Some(name), Ok(key)) = (&n.name, crate::keys::PublicKey::from_base64(k)) {
                if let Some(p) = self.dev.peer(&key) {
                    p.set_name(Some(name.clone()));
                }
            }
        }
    }

    /// The peer whose allowed IPs hold `ip` (longest prefix), if any.
    pub fn peer_of(&self, ip: IpAddr) -> Option<String> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        // One lookup in the routing table, not a walk over every peer: the
        // node API asks this on every request.
        self.dev.peer_for_ip(ip).map(|p| p.public_key.to_base64())
    }

    /// The certificates the running proxy serves or keeps.
    pub fn certificates(&self) -> Vec<crate::proxy::stats::CertStatus> {
        self.proxy_stats
            .lock()
            .as_ref()
            .map(|h| h.certificates())
            .unwrap_or_default()
    }

    /// Entries the running proxy's access log lost; `None` without one.
    pub fn access_log_dropped(&self) -> Option<u64> {
        self.proxy_stats
            .lock()
            .as_ref()
            .and_then(|h| h.access_log_dropped())
    }

    /// The running proxy's counters and backend health, by route id.
    pub fn health(&self) -> BTreeMap<String, crate::proxy::stats::RouteSnapshot> {
        let mut out = BTreeMap::new();
        if let Some(h) = self.proxy_stats.lock().as_ref() {
            for r in h.stats() {
                out.insert(r.route.clone(), r);
            }
        }
        out
    }
}

/// Why a declared forward could not listen on `port` (UDP or TCP): asked of
/// the running proxy, which knows its own forwards' ports; with none running
/// (at the hub's start, say), a bind tried at once, so a port another
/// program holds is refused instead of failing the proxy's start. Nothing
/// while a proxy is being started (`starting`): it holds ports it has not
/// handed over yet, and would be refused its own.
fn forward_port_busy(
    running: Option<&StatsHandle>,
    starting: bool,
    udp: bool,
    port: u16,
) -> Option<String> {
    match running {
        Some(p) => p.port_busy(udp, port),
        None if starting => None,
        None => crate::proxy::server::try_port(udp, port),
    }
}

/// The endpoints of the config file's `[[peer]]`s: a control-plane peer's
/// prefix that holds one gets no route, as a `[[peer]]`'s gets none
/// (`hub::add_peer_routes`).
fn file_endpoints(cfg: &HubConfig) -> Vec<IpAddr> {
    cfg.peers
        .iter()
        .filter_map(|p| p.endpoint.map(|e| e.ip()))
        .collect()
}

/// The routes for the prefixes of added control-plane peers, and those
/// skipped (default routes, prefixes holding a [`file_endpoints`] address).
fn plan_routes(cfg: &HubConfig, added: &[IpNet]) -> crate::wg::route::Plan {
    crate::wg::route::plan(&cfg.addresses, &file_endpoints(cfg), added)
}

/// Routes the off-link prefixes of added peers into the TUN, and takes
/// away those of removed peers that no remaining peer (`held`) holds.
fn sync_routes(cfg: &HubConfig, dev: &Inner, added: &[IpNet], removed: &[IpNet], held: &[IpNet]) {
    use crate::wg::route;
    let plan = plan_routes(cfg, added);
    for (net, why) in &plan.skipped {
        warn!(route = %net, interface = %cfg.interface, "a control-plane peer's allowed_ips prefix gets no route: {why}");
    }
    for net in plan.add {
        match route::replace(&net, &cfg.interface) {
            Ok(()) => {
                dev.add_tun_routes([net]);
                info!(route = %net, interface = %cfg.interface, "route added for a control-plane peer")
            }
            Err(e) => {
                warn!(route = %net, error = %e, "cannot route a control-plane peer's prefix")
            }
        }
    }
    let (gone, added) = route::withdraw(
        &cfg.addresses,
        &file_endpoints(cfg),
        removed,
        held,
        &cfg.interface,
        "a control-plane peer",
    );
    for net in &gone {
        dev.remove_tun_route(net);
    }
    dev.add_tun_routes(added);
}

/// A config's `[[peer]]`s as [`State::file_peer_conflict`] takes them.
fn file_peers(cfg: &HubConfig) -> Vec<(String, String, Vec<IpNet>)> {
    cfg.peers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let name = p.name.as_deref().unwrap_or("unnamed");
            (
                format!("[[peer]] #{} ({name})", i + 1),
                p.public_key.to_base64(),
                p.allowed_ips.clone(),
            )
        })
        .collect()
}

/// Peers the control plane put on the device: key → the allowed IPs it gave.
type Managed = BTreeMap<String, Vec<IpNet>>;

/// What to tell the device so that its control-plane peers are `state`'s
/// nodes: a node the device lacks, or holds with other allowed IPs than the
/// ones given (removed and added again between two syncs), is set whole; a
/// managed peer that is no node any more is removed. Config-file peers are
/// left alone. `managed` becomes what the device will hold once `set` is
/// applied.
fn peer_changes(
    state: &State,
    file_keys: &BTreeSet<String>,
    managed: &mut Managed,
    on_device: impl Fn(&crate::keys::PublicKey) -> bool,
) -> DeviceSet {
    let mut set = DeviceSet::default();
    for (k, n) in &state.nodes {
        if file_keys.contains(k) {
            continue;
        }
        let Ok(key) = crate::keys::PublicKey::from_base64(k) else {
            continue;
        };
        if managed.get(k) == Some(&n.allowed_ips) && on_device(&key) {
            continue;
        }
        let mut p = PeerSet::new(key);
        p.replace_allowed_ips = true;
        p.allowed_ips = n.allowed_ips.clone();
        set.peers.push(p);
        managed.insert(k.clone(), n.allowed_ips.clone());
    }
    let gone: Vec<String> = managed
        .keys()
        .filter(|k| !state.nodes.contains_key(*k))
        .cloned()
        .collect();
    for k in gone {
        managed.remove(&k);
        if file_keys.contains(&k) {
            continue;
        }
        if let Ok(key) = crate::keys::PublicKey::from_base64(&k) {
            let mut p = PeerSet::new(key);
            p.remove = true;
            set.peers.push(p);
        }
    }
    set
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dns_listeners_hold_their_port_on_both_protocols() {
        let text = "[hub]\nprivate_key = \"yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\"\n\
                    addresses = [\"100.64.0.1/10\"]\n\
                    [proxy]\ndomains = [\"gw.example.org\"]\n\
                    [proxy.dns]\nlisten = [\"0.0.0.0:53\"]\naddresses = [\"203.0.113.1\"]\n\
                    [proxy.dns.nameservers]\n\"ns1.gw.example.org\" = [\"203.0.113.1\"]\n\
                    [control]\nstate_dir = \"/var/lib/gw\"\n";
        let cfg = HubConfig::parse("hub.toml", text, std::path::Path::new("/etc/gw")).unwrap();
        let running = cfg.control.clone().unwrap();
        let env = FileEnv::new(cfg, &running);
        assert!(env.file_ports.contains(&(Protocol::Udp, 53)));
        assert!(env.file_ports.contains(&(Protocol::Tcp, 53)));
        assert!(env.file_ports.contains(&(Protocol::Tcp, 80)));
    }

    /// The hub's own addresses are in use: never handed out from a pool,
    /// never taken by a peer that asks for them.
    #[test]
    fn the_hubs_own_addresses_go_to_no_node() {
        let text = "[hub]\nprivate_key = \"yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\"\n\
                    addresses = [\"100.64.0.1/10\", \"fd77:6777::1/48\"]\n\
                    [control]\nstate_dir = \"/var/lib/gw\"\n\
                    pools = [\"100.64.0.0/29\", \"fd77:6777::/125\"]\n";
        let cfg = HubConfig::parse("hub.toml", text, std::path::Path::new("/etc/gw")).unwrap();
        let running = cfg.control.clone().unwrap();
        let env = FileEnv::new(cfg, &running);
        let check = |_: &RawRoute| Ok(());
        let held = |_: &str, _: &str| Ok(());
        let ctx = Context {
            now: 1,
            check_route: &check,
            file_hosts: &env.file_hosts,
            file_keys: &env.file_keys,
            used_ips: &env.used_ips,
            pools: &running.pools,
            ports: running.ports.clone(),
            file_ports: &env.file_ports,
            max_ports_per_node: running.max_ports_per_node,
            port_busy: &|_, _| None,
            held_elsewhere: &held,
        };
        let key = |i: u8| {
            crate::keys::PrivateKey::from_bytes([i; 32])
                .public_key()
                .to_base64()
        };
        let mut s = State::default();
        for n in ["100.64.0.1/32", "100.64.0.0/30", "fd77:6777::1/128"] {
            let e = s
                .add_node(&ctx, &key(1), None, Some(vec![n.parse().unwrap()]))
                .unwrap_err();
            assert_eq!(e.status, 409, "{n}: {e}");
        }
        // Round the whole pool: .2 to .6 (and ::2 to ::6), never .1 or ::1.
        let mut given = Vec::new();
        for i in 1..=5u8 {
            let r = s.add_node(&ctx, &key(i), None, None).unwrap();
            given.extend(r.allowed_ips.iter().map(|n| n.addr()));
        }
        assert_eq!(given.len(), 10);
        for own in ["100.64.0.1", "fd77:6777::1"] {
            assert!(!given.contains(&own.parse().unwrap()), "{own} handed out");
        }
        assert_eq!(
            s.add_node(&ctx, &key(9), None, None).unwrap_err().status,
            409
        );
    }

    /// A control-plane peer's prefix that holds a config-file peer's
    /// endpoint gets no route, as a `[[peer]]`'s gets none: the tunnel's
    /// own packets to that peer would go into a node's tunnel.
    #[test]
    fn a_control_plane_prefix_holding_a_file_peers_endpoint_is_not_routed() {
        let text = "[hub]\nprivate_key = \"yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\"\n\
                    addresses = [\"100.64.0.1/10\"]\n\
                    [control]\nstate_dir = \"/var/lib/gw\"\n\
                    [[peer]]\npublic_key = \"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\"\n\
                    allowed_ips = [\"100.64.2.0/24\"]\nendpoint = \"198.51.100.7:51820\"\n\
                    [[peer]]\npublic_key = \"TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=\"\n\
                    allowed_ips = [\"100.64.3.0/24\"]\nendpoint = \"[2001:db8:7::9]:51820\"\n";
        let cfg = HubConfig::parse("hub.toml", text, std::path::Path::new("/etc/gw")).unwrap();
        let nets = |s: &[&str]| -> Vec<IpNet> { s.iter().map(|n| n.parse().unwrap()).collect() };
        let added = nets(&[
            "198.51.100.0/24",
            "2001:db8:7::/48",
            "192.0.2.0/24",
            "2001:db8:8::/48",
            "100.64.1.2/32",
        ]);
        let plan = plan_routes(&cfg, &added);
        assert_eq!(plan.add, nets(&["192.0.2.0/24", "2001:db8:8::/48"]));
        let skipped: Vec<IpNet> = plan.skipped.iter().map(|(n, _)| *n).collect();
        assert_eq!(skipped, nets(&["198.51.100.0/24", "2001:db8:7::/48"]));
        assert_eq!(
            plan.skipped[0].1,
            crate::wg::route::Skip::Endpoint("198.51.100.7".parse().unwrap())
        );
    }

    /// With no proxy running (the hub's start), a declared forward's port
    /// another program holds is found busy, so the forward is refused
    /// instead of failing the proxy's start; while a proxy is being
    /// started, its own ports are not held against it.
    #[test]
    fn a_taken_port_is_busy_with_no_proxy_running() {
        let tcp = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        let why = forward_port_busy(None, false, false, port).expect("busy");
        assert!(!why.is_empty());
        assert_eq!(forward_port_busy(None, true, false, port), None);
        let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        assert!(forward_port_busy(None, false, true, port).is_some());
        assert_eq!(forward_port_busy(None, true, true, port), None);
        drop(udp);
        assert_eq!(
            forward_port_busy(None, false, true, port),
            None,
            "free again"
        );
    }

    /// The evaluation the hub starts its proxy with: a saved TCP forward on
    /// a port another program took is refused, the others stay active.
    #[test]
    fn a_saved_forward_on_a_taken_port_is_refused_at_start() {
        use crate::control::state::ServiceDecl;
        const K1: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
        let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let check = |_: &RawRoute| Ok(());
        let held = |_: &str, _: &str| Ok(());
        let files = BTreeSet::new();
        let busy =
            |p: Protocol, port: u16| forward_port_busy(None, false, p == Protocol::Udp, port);
        let mut s = State::default();
        s.nodes.insert(
            K1.into(),
            crate::control::state::NodeRecord {
                name: None,
                allowed_ips: vec!["100.64.1.2/32".parse().unwrap()],
                origin: crate::control::state::NodeOrigin::Api,
                created: 1,
            },
        );
        for n in ["ssh", "git"] {
            s.names.insert(
                n.into(),
                crate::control::state::NameRecord {
                    owners: vec![K1.into()],
                    replicas: false,
                    expires: None,
                    bandwidth: None,
                },
            );
        }
        let fwd = |name: &str, public_port: u16| ServiceDecl {
            name: Some(name.into()),
            fqdn: None,
            protocol: Protocol::Tcp,
            port: 22,
            tls: None,
            public_port: Some(public_port),
            proxy_protocol: false,
            http2: false,
            allow: vec![],
            deny: vec![],
        };
        let free = {
            let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let file_ports = BTreeSet::new();
        let c = Context {
            now: 1,
            check_route: &check,
            file_hosts: &files,
            file_keys: &files,
            used_ips: &[],
            pools: &[],
            ports: 1..=65535,
            file_ports: &file_ports,
            max_ports_per_node: 8,
            port_busy: &busy,
            held_elsewhere: &held,
        };
        s.declare_services(
            &c,
            K1,
            "100.64.1.2".parse().unwrap(),
            vec![fwd("ssh", port), fwd("git", free)],
        )
        .unwrap();
        let ev = s.evaluate(&c, &LocalRegistry { grace: 0 }, false);
        drop(taken);
        let st = &ev.statuses[K1];
        let of = |p: u16| st.iter().find(|x| x.host == format!("tcp:{p}")).unwrap();
        assert_eq!(of(port).status, "refused", "{:?}", of(port));
        assert!(of(port)
            .error
            .as_deref()
            .unwrap_or("")
            .contains("cannot be listened on"));
        assert_eq!(of(free).status, "active", "{:?}", of(free));
        assert_eq!(ev.tcp.len(), 1);
    }

    #[test]
    fn a_peer_removed_and_added_again_gets_its_new_addresses() {
        use crate::control::state::{NodeOrigin, NodeRecord};
        const K1: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
        const K2: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
        let node = |ip: &str| NodeRecord {
            name: None,
            allowed_ips: vec![ip.parse().unwrap()],
            origin: NodeOrigin::Api,
            created: 1,
        };
        let files = BTreeSet::from([K2.to_string()]);
        let mut s = State::default();
        s.nodes.insert(K1.into(), node("100.64.1.2/32"));
        s.nodes.insert(K2.into(), node("100.64.1.9/32"));
        let mut managed = Managed::new();
        let set = peer_changes(&s, &files, &mut managed, |_| false);
        assert_eq!(set.peers.len(), 1, "the config file's peer is left alone");
        assert_eq!(set.peers[0].allowed_ips, s.nodes[K1].allowed_ips);
        assert!(set.peers[0].replace_allowed_ips);
        // On the device now: nothing more to do.
        assert!(peer_changes(&s, &files, &mut managed, |_| true)
            .peers
            .is_empty());
        // Removed and added again with another address before the next
        // sync: the device is told the new one.
        s.nodes.insert(K1.into(), node("100.64.1.3/32"));
        let set = peer_changes(&s, &files, &mut managed, |_| true);
        assert_eq!(set.peers.len(), 1);
        assert!(!set.peers[0].remove);
        assert_eq!(set.peers[0].allowed_ips, s.nodes[K1].allowed_ips);
        assert_eq!(managed[K1], s.nodes[K1].allowed_ips);
        // Gone from the state: removed from the device.
        s.nodes.remove(K1);
        let set = peer_changes(&s, &files, &mut managed, |_| true);
        assert_eq!(set.peers.len(), 1);
        assert!(set.peers[0].remove);
        assert!(managed.is_empty());
    }
}
