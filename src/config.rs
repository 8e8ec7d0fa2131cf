//! Hub and node configuration: strict TOML (an unknown key is an error naming it
//! and its line) parsed into raw structs, then validated into settings.

use crate::keys::{PresharedKey, PrivateKey, PublicKey};
use ipnet::IpNet;
use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};

/// A configuration error, with the file it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// A base64 private key, or a file holding one. Never printed.
#[derive(Clone, Default)]
struct KeySource {
    private_key: Option<String>,
    private_key_file: Option<PathBuf>,
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySource")
            .field(
                "private_key",
                &self.private_key.as_ref().map(|_| "<redacted>"),
            )
            .field("private_key_file", &self.private_key_file)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHubFile {
    hub: RawHub,
    #[serde(default)]
    peer: Vec<RawPeer>,
    // Reverse proxy (src/proxy/settings.rs validates these).
    proxy: Option<crate::proxy::settings::RawProxy>,
    #[serde(default)]
    route: Vec<crate::proxy::settings::RawRoute>,
    #[serde(default)]
    tcp: Vec<crate::proxy::settings::RawTcp>,
    #[serde(default)]
    udp: Vec<crate::proxy::settings::RawUdp>,
    // The supervised Yggdrasil daemon (src/ygg/settings.rs validates it).
    yggdrasil: Option<crate::ygg::settings::RawYggdrasil>,
    // IPv4/IPv6 translation (src/xlat/settings.rs validates it).
    xlat: Option<crate::xlat::settings::RawXlat>,
    // The control plane (src/control/settings.rs validates it).
    control: Option<crate::control::settings::RawControl>,
    // The hub mesh (src/mesh/settings.rs validates it).
    mesh: Option<crate::mesh::settings::RawMesh>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHub {
    private_key: Option<String>,
    private_key_file: Option<PathBuf>,
    interface: Option<String>,
    listen_port: Option<u16>,
    addresses: Vec<String>,
    mtu: Option<u16>,
    keepalive: Option<u16>,
    routes: Option<bool>,
    tls_tunnels: Option<bool>,
    node_to_node: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: Option<String>,
    public_key: String,
    allowed_ips: Vec<String>,
    preshared_key: Option<String>,
    endpoint: Option<String>,
    persistent_keepalive: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNodeFile {
    node: RawNode,
    #[serde(default)]
    hub: Vec<RawNodeHub>,
    yggdrasil: Option<crate::ygg::settings::RawYggdrasil>,
    // Services the node declares to its hubs (validated below, `services`).
    #[serde(default)]
    service: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    private_key: Option<String>,
    private_key_file: Option<PathBuf>,
    interface: Option<String>,
    listen_port: Option<u16>,
    addresses: Vec<String>,
    mtu: Option<u16>,
    dead_after: Option<u16>,
    routes: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNodeHub {
    name: Option<String>,
    public_key: String,
    endpoint: String,
    allowed_ips: Vec<String>,
    preshared_key: Option<String>,
    persistent_keepalive: Option<u16>,
    control: Option<String>,
    addresses: Option<Vec<String>>,
    transport: Option<crate::carrier::path::Transport>,
    tls_endpoint: Option<String>,
    tls_proxy: Option<String>,
    tls_proxy_auth_file: Option<PathBuf>,
    websocket: Option<String>,
    websocket_ca: Option<PathBuf>,
    websocket_verify: Option<bool>,
    udp_retry: Option<u64>,
}

/// A peer of the hub.
#[derive(Debug, Clone)]
pub struct HubPeer {
    pub name: Option<String>,
    pub public_key: PublicKey,
    pub allowed_ips: Vec<IpNet>,
    pub preshared_key: Option<PresharedKey>,
    pub endpoint: Option<std::net::SocketAddr>,
    pub persistent_keepalive: Option<u16>,
}

/// Validated hub settings.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub private_key: PrivateKey,
    pub interface: String,
    pub listen_port: u16,
    pub addresses: Vec<IpNet>,
    pub mtu: u16,
    pub keepalive: u16,
    /// Install kernel routes into the TUN for the `[[peer]]`s' allowed IPs
    /// that the addresses' prefixes do not cover.
    pub routes: bool,
    /// Take nodes' tunnels carried over TLS on the proxy's HTTPS listeners
    /// (ALPN `gatewire-wg`), for nodes whose network blocks UDP.
    pub tls_tunnels: bool,
    /// What becomes of packets from one node for another: forwarded inside
    /// the hub's device, left to the host's kernel (and its firewall), or
    /// dropped.
    pub node_to_node: crate::wg::device::NodeToNode,
    pub peers: Vec<HubPeer>,
    /// The reverse proxy, if the file has a `[proxy]` section or any route/forward.
    pub proxy: Option<crate::proxy::settings::ProxySettings>,
    /// The supervised Yggdrasil daemon, if the file has `[yggdrasil]`.
    pub yggdrasil: Option<crate::ygg::settings::YggSettings>,
    /// SIIT / NAT64 on the TUN, if the file has an `[xlat]` section.
    pub xlat: Option<crate::xlat::settings::XlatSettings>,
    /// The control plane, if the file has a `[control]` section.
    pub control: Option<crate::control::settings::ControlSettings>,
    /// The hub mesh, if the file has a `[mesh]` section.
    pub mesh: Option<crate::mesh::settings::MeshSettings>,
    /// The proxy sections as written, for merging routes from the control plane.
    pub proxy_raw: ProxyRaw,
    /// The directory relative file names resolve against.
    pub base: PathBuf,
}

/// The proxy sections of a hub file before validation.
#[derive(Debug, Clone, Default)]
pub struct ProxyRaw {
    pub proxy: Option<crate::proxy::settings::RawProxy>,
    pub route: Vec<crate::proxy::settings::RawRoute>,
    pub tcp: Vec<crate::proxy::settings::RawTcp>,
    pub udp: Vec<crate::proxy::settings::RawUdp>,
}

impl ProxyRaw {
    /// Validates these sections plus `extra` routes and forwards.
    pub fn validate_with(
        &self,
        extra: &ProxyRaw,
        hub_addrs: &[IpNet],
        base: &Path,
    ) -> Result<Option<crate::proxy::settings::ProxySettings>, String> {
        fn cat<T: Clone>(a: &[T], b: &[T]) -> Vec<T> {
            a.iter().chain(b).cloned().collect()
        }
        crate::proxy::settings::validate(
            self.proxy.clone().or_else(|| extra.proxy.clone()),
            cat(&self.route, &extra.route),
            cat(&self.tcp, &extra.tcp),
            cat(&self.udp, &extra.udp),
            hub_addrs,
            base,
        )
    }
}

/// A hub as a node sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeHub {
    pub name: Option<String>,
    pub public_key: PublicKey,
    /// `host:port`; the host may be a DNS name, re-resolved when the hub goes silent.
    pub endpoint: String,
    pub allowed_ips: Vec<IpNet>,
    pub preshared_key: Option<PresharedKey>,
    pub persistent_keepalive: u16,
    /// The hub's node services API (`ip:port` on its overlay address), where
    /// the node declares its `[[service]]`s.
    pub control: Option<std::net::SocketAddr>,
    /// The hub's own overlay addresses, from which its proxy connects to the
    /// node's services: a service forwarder takes overlay sources only from
    /// these (not from the other nodes the hub routes to this one).
    pub addresses: Vec<std::net::IpAddr>,
    /// UDP, WireGuard carried over TLS, or UDP first and TLS when UDP gets
    /// no answer (the default).
    pub transport: crate::carrier::path::Transport,
    /// `host:port` of the hub's HTTPS listener for the TLS carrier; by
    /// default the endpoint's host, port 443.
    pub tls_endpoint: String,
    /// `host:port` of a web proxy the TLS carrier goes through (HTTP
    /// `CONNECT`), for networks that let nothing else out.
    pub tls_proxy: Option<String>,
    /// The user and password for that proxy, when it asks for them.
    pub tls_proxy_auth: Option<crate::carrier::connect::Credentials>,
    /// Carry the tunnel as WebSocket messages to this URL (through HTTP
    /// intermediaries) instead of the TLS carrier's own protocol;
    /// `tls_endpoint` is then the URL's host and port. A `wss://` one checks
    /// the server's certificate (`websocket_ca`, `websocket_verify`).
    pub websocket: Option<crate::carrier::WsTarget>,
    /// With `transport = "auto"`, while on TLS: the longest wait, in
    /// seconds, between two tries of UDP (which go on in the background);
    /// 0: stay on TLS while it works.
    pub udp_retry: u64,
}

/// Validated node settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub private_key: PrivateKey,
    pub interface: String,
    pub listen_port: u16,
    pub addresses: Vec<IpNet>,
    pub mtu: u16,
    pub dead_after: u16,
    /// Install kernel routes into the TUN for the hubs' allowed IPs that the
    /// addresses' prefixes do not cover.
    pub routes: bool,
    /// Empty only with `[yggdrasil]`: then the node runs no WireGuard device.
    pub hubs: Vec<NodeHub>,
    /// The supervised Yggdrasil daemon, if the file has `[yggdrasil]`.
    pub yggdrasil: Option<crate::ygg::settings::YggSettings>,
    /// Services declared to every hub with `control`.
    pub services: Vec<NodeService>,
}

pub const DEFAULT_PORT: u16 = 51820;
pub const DEFAULT_MTU: u16 = 1420;
pub const DEFAULT_HUB_KEEPALIVE: u16 = 4;
pub const DEFAULT_NODE_KEEPALIVE: u16 = 15;
pub const DEFAULT_DEAD_AFTER: u16 = 8;

/// A TUN interface name: 1 to 15 characters of letters, digits, `-`, `_`, `.`.
pub fn interface_name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 15
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

struct Ctx<'a> {
    path: &'a str,
}

impl Ctx<'_> {
    fn err(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_string(),
            message: message.into(),
        }
    }

    fn private_key(
        &self,
        section: &str,
        k: &KeySource,
        base: &Path,
    ) -> Result<PrivateKey, ConfigError> {
        match (&k.private_key, &k.private_key_file) {
            (Some(_), Some(_)) => Err(self.err(format!(
                "[{section}]: set either `private_key` or `private_key_file`, not both"
            ))),
            (None, None) => Err(self.err(format!(
                "[{section}]: `private_key` or `private_key_file` is required"
            ))),
            (Some(s), None) => PrivateKey::from_base64(s)
                .map_err(|e| self.err(format!("[{section}] private_key: {e}"))),
            (None, Some(f)) => {
                let f = if f.is_relative() {
                    base.join(f)
                } else {
                    f.clone()
                };
                let s = crate::keys::read_secret_file(&f)
                    .map(zeroize::Zeroizing::new)
                    .map_err(|e| {
                        self.err(format!("[{section}] private_key_file {}: {e}", f.display()))
                    })?;
                PrivateKey::from_base64(&s).map_err(|e| {
                    self.err(format!("[{section}] private_key_file {}: {e}", f.display()))
                })
            }
        }
    }

    fn public_key(&self, what: &str, s: &str) -> Result<PublicKey, ConfigError> {
        PublicKey::from_base64(s).map_err(|e| self.err(format!("{what} public_key `{s}`: {e}")))
    }

    fn psk(&self, what: &str, s: &Option<String>) -> Result<Option<PresharedKey>, ConfigError> {
        s.as_deref()
            .map(|s| {
                PresharedKey::from_base64(s)
                    .map_err(|e| self.err(format!("{what} preshared_key: {e}")))
            })
            .transpose()
    }

    fn nets(&self, what: &str, v: &[String], host_ok: bool) -> Result<Vec<IpNet>, ConfigError> {
        v.iter()
            .map(|s| {
                let n: IpNet = s
                    .parse()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| self.err(format!("{what}: `{s}` is not an address/prefix")))?;
                if !host_ok && n.trunc() != n {
                    return Err(self.err(format!(
                        "{what}: `{s}` has host bits set (did you mean `{}`?)",
                        n.trunc()
                    )));
                }
                Ok(n)
            })
            .collect()
    }

    fn interface(
        &self,
        section: &str,
        name: Option<String>,
        default: &str,
    ) -> Result<String, ConfigError> {
        let n = name.unwrap_or_else(|| default.to_string());
        if !interface_name_ok(&n) {
            return Err(self.err(format!(
                "[{section}] interface `{n}`: 1 to 15 characters of letters, digits, `-`, `_`, `.`"
            )));
        }
        Ok(n)
    }

    fn mtu(&self, section: &str, m: Option<u16>) -> Result<u16, ConfigError> {
        let m = m.unwrap_or(DEFAULT_MTU);
        if !(1280..=9000).contains(&m) {
            return Err(self.err(format!("[{section}] mtu {m}: must be 1280 to 9000")));
        }
        Ok(m)
    }
}

/// Warns when a config file that holds a secret itself (an inline
/// `private_key` or `preshared_key`) is readable by group or others, as a
/// key file would be warned about.
fn warn_open_secrets(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let open = std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0);
    if !open {
        return;
    }
    fn holds(v: &toml::Value) -> bool {
        match v {
            toml::Value::Table(t) => t
                .iter()
                .any(|(k, v)| matches!(k.as_str(), "private_key" | "preshared_key") || holds(v)),
            toml::Value::Array(a) => a.iter().any(holds),
            _ => false,
        }
    }
    if text
        .parse::<toml::Table>()
        .is_ok_and(|t| holds(&toml::Value::Table(t)))
    {
        tracing::warn!(
            path = %path.display(),
            "the config file holds a private or preshared key and is readable by group or others; chmod 600 (or move the key to a private_key_file)"
        );
    }
}

fn read(path: &Path) -> Result<(String, String), ConfigError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: p.clone(),
        source,
    })?;
    Ok((p, text))
}

/// A TOML error as a line and column, the key the line sets and what is
/// wrong, without the quoted source line toml's own message carries: that
/// line may be a mistyped or unterminated `private_key`, and the message
/// reaches the logs.
fn parse_err(path: &str, text: &str, e: toml::de::Error) -> ConfigError {
    let message = match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let start = before.rfind('\n').map_or(0, |i| i + 1);
            let column = before.get(start..).map_or(0, |l| l.chars().count()) + 1;
            let key = text
                .get(start..)
                .and_then(|l| l.split_once('='))
                .map(|(k, _)| k.trim())
                .filter(|k| {
                    !k.is_empty()
                        && k.len() <= 64
                        && k.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"_-.\"".contains(&b))
                })
                .map_or(String::new(), |k| format!(" (`{k}`)"));
            format!(
                "line {line}, column {column}{key}: {}",
                e.message().trim_end()
            )
        }
        None => e.message().trim_end().to_string(),
    };
    ConfigError::Parse {
        path: path.to_string(),
        message,
    }
}

fn check_unique_keys<'a>(
    ctx: &Ctx,
    keys: impl Iterator<Item = &'a PublicKey>,
) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    for k in keys {
        if !seen.insert(*k) {
            return Err(ctx.err(format!("public key {k} is listed twice")));
        }
    }
    Ok(())
}

/// The hub's own addresses are the hub's: a `[[peer]]` whose allowed IPs,
/// inside the hub's network, hold one is a mistake (the data path keeps the
/// address the hub's anyway: packets for it go to the TUN, packets from it
/// are dropped).
fn check_own_addresses(
    ctx: &Ctx,
    addresses: &[IpNet],
    peers: &[HubPeer],
) -> Result<(), ConfigError> {
    for (i, p) in peers.iter().enumerate() {
        for net in &p.allowed_ips {
            // Inside the hub's own network: a slip (a node given a range
            // around the hub). A wider prefix (`0.0.0.0/0`, an exit through
            // a peer) is fine: the hub's addresses stay its own whatever a
            // peer's allowed IPs hold (`wg::device`).
            if let Some(a) = addresses
                .iter()
                .find(|a| net.contains(&a.addr()) && net.prefix_len() >= a.prefix_len())
            {
                return Err(ctx.err(format!(
                    "[[peer]] #{} ({}) allowed_ips {}: holds the hub's own address {}; a peer's allowed IPs inside the hub's network must leave out the hub's addresses",
                    i + 1,
                    p.name.as_deref().unwrap_or("unnamed"),
                    net.trunc(),
                    a.addr()
                )));
            }
        }
    }
    Ok(())
}

/// A prefix is one peer's: two `[[peer]]`s listing the same one would each
/// take it from the other whenever a reload touched one of them, and the
/// hub's traffic for it would go to whichever did last. (Nested prefixes
/// are fine: the longest match decides.) A node's `[[hub]]`s are only
/// warned about (`refuse` false): its device gives a shared prefix to the
/// last hub listed, which is what a node of two NAT64 hubs (both giving
/// `64:ff9b::/96`) wants, but a shared overlay prefix leaves the other hubs
/// unreachable there. `table` is `peer` or `hub`; `entries` the names and
/// allowed IPs in file order.
fn check_unique_prefixes(
    ctx: &Ctx,
    table: &str,
    entries: &[(Option<&str>, &[IpNet])],
    refuse: bool,
) -> Result<(), ConfigError> {
    let mut owner: std::collections::HashMap<ipnet::IpNet, usize> = Default::default();
    let label = |i: usize| {
        let name = entries.get(i).and_then(|e| e.0).unwrap_or("unnamed");
        format!("[[{table}]] #{} ({name})", i + 1)
    };
    for (i, (_, nets)) in entries.iter().enumerate() {
        for net in nets.iter() {
            match owner.entry(net.trunc()) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(i);
                }
                std::collections::hash_map::Entry::Occupied(o) if *o.get() != i => {
                    let m = format!(
                        "{} allowed_ips {}: also {}'s; a prefix belongs to one {table}",
                        label(i),
                        net.trunc(),
                        label(*o.get())
                    );
                    if refuse {
                        return Err(ctx.err(m));
                    }
                    tracing::warn!(
                        "{m}: the last listed gets the traffic for it (the others' packets from it are dropped)"
                    );
                }
                std::collections::hash_map::Entry::Occupied(_) => {}
            }
        }
    }
    Ok(())
}

/// A `[[hub]]`'s `name` is how logs, `gatewire show` and the service
/// declarations tell it apart: two hubs by one name could not be.
fn check_unique_names(ctx: &Ctx, hubs: &[NodeHub]) -> Result<(), ConfigError> {
    let mut first: std::collections::HashMap<&str, usize> = Default::default();
    for (i, h) in hubs.iter().enumerate() {
        let Some(name) = h.name.as_deref() else {
            continue;
        };
        if let Some(j) = first.insert(name, i) {
            return Err(ctx.err(format!(
                "[[hub]] #{} name `{name}`: also [[hub]] #{}'s; each hub needs a name of its own",
                i + 1,
                j + 1
            )));
        }
    }
    Ok(())
}

impl HubConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (p, text) = read(path)?;
        let cfg = Self::parse(&p, &text, path.parent().unwrap_or(Path::new(".")))?;
        warn_open_secrets(path, &text);
        Ok(cfg)
    }

    /// Parses and validates `text`; `path` names it in errors, `base` resolves
    /// relative key files.
    pub fn parse(path: &str, text: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawHubFile = toml::from_str(text).map_err(|e| parse_err(path, text, e))?;
        let ctx = Ctx { path };
        let private_key = ctx.private_key(
            "hub",
            &KeySource {
                private_key: raw.hub.private_key.clone(),
                private_key_file: raw.hub.private_key_file.clone(),
            },
            base,
        )?;
        let addresses = ctx.nets("[hub] addresses", &raw.hub.addresses, true)?;
        if addresses.is_empty() {
            return Err(ctx.err("[hub] addresses: at least one overlay address is required"));
        }
        let mut peers = Vec::new();
        for (i, rp) in raw.peer.iter().enumerate() {
            let what = format!(
                "[[peer]] #{} ({})",
                i + 1,
                rp.name.as_deref().unwrap_or("unnamed")
            );
            let public_key = ctx.public_key(&what, &rp.public_key)?;
            let allowed_ips = ctx.nets(&format!("{what} allowed_ips"), &rp.allowed_ips, false)?;
            let endpoint = rp
                .endpoint
                .as_deref()
                .map(|e| {
                    e.parse()
                        .map_err(|_| ctx.err(format!("{what} endpoint `{e}`: expected ip:port")))
                })
                .transpose()?;
            peers.push(HubPeer {
                name: rp.name.clone(),
                public_key,
                allowed_ips,
                preshared_key: ctx.psk(&what, &rp.preshared_key)?,
                endpoint,
                persistent_keepalive: rp.persistent_keepalive,
            });
        }
        check_unique_keys(&ctx, peers.iter().map(|p| &p.public_key))?;
        let prefixes: Vec<_> = peers
            .iter()
            .map(|p| (p.name.as_deref(), p.allowed_ips.as_slice()))
            .collect();
        check_unique_prefixes(&ctx, "peer", &prefixes, true)?;
        check_own_addresses(&ctx, &addresses, &peers)?;
        let node_to_node = match raw.hub.node_to_node.as_deref() {
            None => crate::wg::device::NodeToNode::default(),
            Some(s) => crate::wg::device::NodeToNode::parse(s).ok_or_else(|| {
                ctx.err(format!(
                    "[hub] node_to_node `{s}`: expected one of {}",
                    crate::wg::device::NodeToNode::NAMES
                        .map(|n| format!("\"{n}\""))
                        .join(", ")
                ))
            })?,
        };
        let own = private_key.public_key();
        if peers.iter().any(|p| p.public_key == own) {
            return Err(ctx.err("a [[peer]] has the hub's own public key"));
        }
        let proxy_raw = ProxyRaw {
            proxy: raw.proxy,
            route: raw.route,
            tcp: raw.tcp,
            udp: raw.udp,
        };
        let proxy = proxy_raw
            .validate_with(&ProxyRaw::default(), &addresses, base)
            .map_err(|m| ctx.err(m))?;
        let yggdrasil = raw
            .yggdrasil
            .map(|y| crate::ygg::settings::validate(y, base))
            .transpose()
            .map_err(|m| ctx.err(m))?;
        let mtu = ctx.mtu("hub", raw.hub.mtu)?;
        let xlat = raw
            .xlat
            .map(|x| crate::xlat::settings::validate(x, &addresses, mtu))
            .transpose()
            .map_err(|m| ctx.err(m))?;
        let interface = ctx.interface("hub", raw.hub.interface, "gw0")?;
        let control = raw
            .control
            .map(|c| crate::control::settings::validate(c, &interface, &addresses, base))
            .transpose()
            .map_err(|m| ctx.err(m))?;
        let has_listener = proxy
            .as_ref()
            .is_some_and(|p| !p.http_listen.is_empty() || !p.https_listen.is_empty());
        let mesh = raw
            .mesh
            .map(|m| crate::mesh::settings::validate(m, base, has_listener))
            .transpose()
            .map_err(|m| ctx.err(m))?;
        if let Some(p) = &proxy {
            crate::proxy::settings::check_acme(p, mesh.is_some()).map_err(|m| ctx.err(m))?;
        }
        Ok(HubConfig {
            interface,
            listen_port: raw.hub.listen_port.unwrap_or(DEFAULT_PORT),
            mtu,
            keepalive: raw.hub.keepalive.unwrap_or(DEFAULT_HUB_KEEPALIVE),
            routes: raw.hub.routes.unwrap_or(true),
            tls_tunnels: raw.hub.tls_tunnels.unwrap_or(true),
            node_to_node,
            private_key,
            addresses,
            peers,
            proxy,
            yggdrasil,
            xlat,
            control,
            mesh,
            proxy_raw,
            base: base.to_path_buf(),
        })
    }
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (p, text) = read(path)?;
        let cfg = Self::parse(&p, &text, path.parent().unwrap_or(Path::new(".")))?;
        warn_open_secrets(path, &text);
        Ok(cfg)
    }

    pub fn parse(path: &str, text: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawNodeFile = toml::from_str(text).map_err(|e| parse_err(path, text, e))?;
        let ctx = Ctx { path };
        let private_key = ctx.private_key(
            "node",
            &KeySource {
                private_key: raw.node.private_key.clone(),
                private_key_file: raw.node.private_key_file.clone(),
            },
            base,
        )?;
        let addresses = ctx.nets("[node] addresses", &raw.node.addresses, true)?;
        // Only a node reachable over Yggdrasil alone (no `[[hub]]`) has no
        // overlay address.
        if addresses.is_empty() && !raw.hub.is_empty() {
            return Err(ctx
                .err("[node] addresses: at least one overlay address is required with a [[hub]]"));
        }
        if raw.hub.is_empty() && raw.yggdrasil.is_none() {
            return Err(ctx.err(
                "at least one [[hub]] is required (or a [yggdrasil] section, for a node reachable only over Yggdrasil)",
            ));
        }
        let mut hubs = Vec::new();
        for (i, rh) in raw.hub.iter().enumerate() {
            let what = format!(
                "[[hub]] #{} ({})",
                i + 1,
                rh.name.as_deref().unwrap_or("unnamed")
            );
            let public_key = ctx.public_key(&what, &rh.public_key)?;
            let ep = rh.endpoint.trim();
            if crate::carrier::split_host_port(ep).is_none() {
                return Err(ctx.err(format!("{what} endpoint `{ep}`: expected host:port")));
            }
            let websocket = rh
                .websocket
                .as_deref()
                .map(|u| {
                    ws_url(u)
                        .map_err(|m| ctx.err(format!("{what} websocket `{}`: {m}", redact_url(u))))
                })
                .transpose()?
                .map(|(mut w, ep)| {
                    w.trust = ws_trust(&w, &rh.websocket_ca, rh.websocket_verify, base)
                        .map_err(|m| ctx.err(format!("{what}: {m}")))?;
                    Ok::<_, ConfigError>((w, ep))
                })
                .transpose()?;
            if websocket.is_none() && (rh.websocket_ca.is_some() || rh.websocket_verify.is_some()) {
                return Err(ctx.err(format!(
                    "{what}: websocket_ca and websocket_verify need a websocket URL"
                )));
            }
            let tls_endpoint = match rh.tls_endpoint.as_deref().map(str::trim) {
                Some(_) if websocket.is_some() => {
                    return Err(ctx.err(format!(
                    "{what}: set websocket or tls_endpoint, not both (the URL names the endpoint)"
                )))
                }
                None if websocket.is_some() => websocket
                    .as_ref()
                    .map(|(_, ep)| ep.clone())
                    .unwrap_or_default(),
                Some(t) if crate::carrier::split_host_port(t).is_some() => t.to_string(),
                Some(t) => {
                    return Err(ctx.err(format!("{what} tls_endpoint `{t}`: expected host:port")))
                }
                // The endpoint's host as written (an IPv6 one keeps its brackets).
                None => format!("{}:443", ep.rsplit_once(':').map_or(ep, |(h, _)| h)),
            };
            let allowed_ips = ctx.nets(&format!("{what} allowed_ips"), &rh.allowed_ips, false)?;
            let control = rh
                .control
                .as_deref()
                .map(|c| node_control(&what, c, &allowed_ips).map_err(|m| ctx.err(m)))
                .transpose()?;
            let hub_addrs = rh
                .addresses
                .iter()
                .flatten()
                .map(|a| {
                    a.trim().parse::<std::net::IpAddr>().map_err(|_| {
                        ctx.err(format!("{what} addresses: `{a}` is not an IP address"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if websocket.is_some() && rh.transport == Some(crate::carrier::path::Transport::Udp) {
                return Err(ctx.err(format!(
                    "{what}: websocket needs transport \"tls\" or \"auto\", not \"udp\""
                )));
            }
            let (tls_proxy, tls_proxy_auth) = node_tls_proxy(
                &ctx,
                &what,
                rh.tls_proxy.as_deref(),
                &rh.tls_proxy_auth_file,
                base,
            )?;
            hubs.push(NodeHub {
                name: rh.name.clone(),
                public_key,
                endpoint: ep.to_string(),
                allowed_ips,
                preshared_key: ctx.psk(&what, &rh.preshared_key)?,
                persistent_keepalive: rh.persistent_keepalive.unwrap_or(DEFAULT_NODE_KEEPALIVE),
                control,
                addresses: hub_addrs,
                transport: rh.transport.unwrap_or_default(),
                tls_endpoint,
                tls_proxy,
                tls_proxy_auth,
                websocket: websocket.map(|(w, _)| w),
                udp_retry: match rh.udp_retry {
                    None => crate::carrier::path::DEFAULT_UDP_RETRY_MS / 1000,
                    Some(n) if n == 0 || (5..=86_400).contains(&n) => n,
                    Some(n) => {
                        return Err(ctx.err(format!(
                            "{what} udp_retry {n}: expected 0 (never) or 5 to 86400 seconds"
                        )))
                    }
                },
            });
        }
        check_unique_keys(&ctx, hubs.iter().map(|h| &h.public_key))?;
        check_unique_names(&ctx, &hubs)?;
        let prefixes: Vec<_> = hubs
            .iter()
            .map(|h| (h.name.as_deref(), h.allowed_ips.as_slice()))
            .collect();
        check_unique_prefixes(&ctx, "hub", &prefixes, false)?;
        let own = private_key.public_key();
        if let Some((i, h)) = hubs.iter().enumerate().find(|(_, h)| h.public_key == own) {
            return Err(ctx.err(format!(
                "[[hub]] #{} ({}) has the node's own public key",
                i + 1,
                h.name.as_deref().unwrap_or("unnamed")
            )));
        }
        let dead_after = raw.node.dead_after.unwrap_or(DEFAULT_DEAD_AFTER);
        if dead_after < 2 {
            return Err(ctx.err("[node] dead_after: at least 2 seconds"));
        }
        let yggdrasil = raw
            .yggdrasil
            .map(|y| crate::ygg::settings::validate(y, base))
            .transpose()
            .map_err(|m| ctx.err(m))?;
        let services = node_services(&raw.service, &addresses).map_err(|m| ctx.err(m))?;
        Ok(NodeConfig {
            interface: ctx.interface("node", raw.node.interface, "gwn0")?,
            listen_port: raw.node.listen_port.unwrap_or(0),
            mtu: ctx.mtu("node", raw.node.mtu)?,
            dead_after,
            routes: raw.node.routes.unwrap_or(true),
            private_key,
            addresses,
            hubs,
            yggdrasil,
            services,
        })
    }
}

/// A node's `tls_proxy` and `tls_proxy_auth_file`: the proxy's `host:port`
/// and its credentials, from the URL or the file (not both). Messages never
/// carry a password.
fn node_tls_proxy(
    ctx: &Ctx,
    what: &str,
    url: Option<&str>,
    auth_file: &Option<PathBuf>,
    base: &Path,
) -> Result<(Option<String>, Option<crate::carrier::connect::Credentials>), ConfigError> {
    let Some(url) = url else {
        return match auth_file {
            Some(_) => Err(ctx.err(format!("{what} tls_proxy_auth_file needs tls_proxy"))),
            None => Ok((None, None)),
        };
    };
    let (hp, in_url) = tls_proxy(url)
        .map_err(|m| ctx.err(format!("{what} tls_proxy `{}`: {m}", redact_url(url))))?;
    let from_file = match auth_file {
        None => None,
        Some(_) if in_url.is_some() => {
            return Err(ctx.err(format!(
                "{what}: credentials in both tls_proxy and tls_proxy_auth_file"
            )))
        }
        Some(f) => {
            let f = if f.is_relative() {
                base.join(f)
            } else {
                f.clone()
            };
            let s = crate::keys::read_secret_file(&f)
                .map(zeroize::Zeroizing::new)
                .map_err(|e| ctx.err(format!("{what} tls_proxy_auth_file {}: {e}", f.display())))?;
            let line = s.lines().next().unwrap_or("");
            let c = crate::carrier::connect::Credentials::parse(line)
                .map_err(|m| ctx.err(format!("{what} tls_proxy_auth_file {}: {m}", f.display())))?;
            Some(c)
        }
    };
    Ok((Some(hp), in_url.or(from_file)))
}

/// `url` without its query (which may carry an access token), for logs,
/// errors and `gatewire show`: `wss://h/wg?…`.
fn redact_query(url: &str) -> String {
    match url.split_once('?') {
        Some((head, _)) => format!("{head}?…"),
        None => url.to_string(),
    }
}

/// A URL as written (maybe malformed), for messages: user information
/// masked as [`redact_userinfo`] does and the query cut as
/// [`redact_query`] does. A `?` before the last `@` leaves unsure which is
/// which (a password may hold a `?`, a query a `@`): then all after the
/// scheme is masked.
pub(crate) fn redact_url(url: &str) -> String {
    let Some(at) = url.rfind('@') else {
        return redact_query(url);
    };
    let start = userinfo_start(url, at);
    if url.get(start..at).is_some_and(|u| u.contains('?')) {
        return format!("{}<redacted>", url.get(..start).unwrap_or(""));
    }
    redact_query(&redact_userinfo(url))
}

/// How a node's `wss://` carrier checks the server's certificate:
/// `websocket_ca` (relative to `base`), none with `websocket_verify =
/// false`, else the system's CAs. Refused: either with `ws://`, both
/// together, and no check with a query in the URL (a token it may hold would
/// go to whoever answers).
fn ws_trust(
    target: &crate::carrier::WsTarget,
    ca: &Option<PathBuf>,
    verify: Option<bool>,
    base: &Path,
) -> Result<crate::carrier::WsTrust, String> {
    use crate::carrier::WsTrust;
    if !target.tls && (ca.is_some() || verify.is_some()) {
        return Err(
            "websocket_ca and websocket_verify are for wss:// URLs (ws:// has no TLS)".into(),
        );
    }
    match (ca, verify) {
        (Some(_), Some(false)) => {
            Err("websocket_ca with websocket_verify = false: set one or the other".into())
        }
        (None, Some(false)) if target.path.contains('?') => Err(
            "websocket_verify = false with a query in the websocket URL: whoever answers the \
             connection would get the query (an access token); check the certificate \
             (websocket_ca for a CA of your own) or take the query out of the URL"
                .into(),
        ),
        (None, Some(false)) => Ok(WsTrust::Off),
        (Some(f), _) => {
            let f = if f.is_relative() {
                base.join(f)
            } else {
                f.clone()
            };
            let certs =
                crate::proxy::upstream::load_certs(&f).map_err(|e| format!("websocket_ca {e}"))?;
            let mut roots = rustls::RootCertStore::empty();
            for c in &certs {
                roots
                    .add(c.clone())
                    .map_err(|e| format!("websocket_ca {}: {e}", f.display()))?;
            }
            Ok(WsTrust::Ca(certs))
        }
        (None, _) => Ok(WsTrust::System),
    }
}

/// A node's `websocket` URL, `ws://host[:port][/path]` or `wss://...`
/// (default port 80 or 443, default path the hub's tunnel path): the target
/// and the `host:port` to dial.
fn ws_url(u: &str) -> Result<(crate::carrier::WsTarget, String), String> {
    let u = u.trim();
    let (tls, rest) = if let Some(r) = u.strip_prefix("wss://") {
        (true, r)
    } else if let Some(r) = u.strip_prefix("ws://") {
        (false, r)
    } else {
        return Err("expected ws://host[:port][/path] or wss://...".into());
    };
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => (rest.get(..i).unwrap_or(""), rest.get(i..).unwrap_or("/")),
        None => (rest, crate::carrier::ws::PATH),
    };
    if authority.contains('@') {
        return Err("no user information in the URL".into());
    }
    if !path.starts_with('/') {
        return Err("a query or fragment without a path".into());
    }
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) || path.contains('#') {
        return Err("the path holds spaces, control characters or a fragment".into());
    }
    // host, [v6], host:port or [v6]:port; the port 1 to 65535.
    let bracketed = authority.starts_with('[');
    let (host, port) = match authority.strip_prefix('[') {
        Some(r) => match r.split_once(']') {
            Some((h, "")) => (h, None),
            Some((h, p)) => match p.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None => return Err("expected [address]:port".into()),
            },
            None => return Err("an IPv6 address without its `]`".into()),
        },
        None => match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    let bad = |c: char| c.is_whitespace() || c.is_control() || matches!(c, '[' | ']' | '/');
    if bracketed {
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err("not an IPv6 address between the brackets".into());
        }
    } else if host.is_empty() || host.chars().any(bad) {
        return Err("expected a host, and a port if not the default".into());
    }
    let port = match port {
        None => {
            if tls {
                443
            } else {
                80
            }
        }
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            // Not echoed: a malformed URL's "port" may be part of a password.
            _ => return Err("the port is not a number from 1 to 65535".into()),
        },
    };
    let endpoint = if bracketed {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok((
        crate::carrier::WsTarget {
            tls,
            trust: crate::carrier::WsTrust::System,
            host_header: authority.to_string(),
            path: path.to_string(),
            url: redact_query(u),
        },
        endpoint,
    ))
}

/// `http://[user:password@]host:port` (a trailing `/` allowed) as
/// `host:port` and the credentials.
fn tls_proxy(p: &str) -> Result<(String, Option<crate::carrier::connect::Credentials>), String> {
    let Some(rest) = p.trim().strip_prefix("http://") else {
        return Err("expected http://host:port".into());
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (auth, hp) = match rest.rsplit_once('@') {
        Some((userinfo, hp)) => (
            Some(crate::carrier::connect::Credentials::parse(userinfo)?),
            hp,
        ),
        None => (None, rest),
    };
    if hp.contains('/') || crate::carrier::split_host_port(hp).is_none() {
        return Err("expected http://host:port".into());
    }
    Ok((hp.to_string(), auth))
}

/// `p` with what comes before its last `@` (after `://`, if any) masked,
/// for messages: a password written without the scheme is masked too.
fn redact_userinfo(p: &str) -> String {
    let Some(at) = p.rfind('@') else {
        return p.to_string();
    };
    let start = userinfo_start(p, at);
    format!(
        "{}<redacted>{}",
        p.get(..start).unwrap_or(""),
        p.get(at..).unwrap_or("")
    )
}

/// Where the user information ending at `at` (a `@`) starts: after the
/// scheme's `://`, or at the start when none comes before `at`.
fn userinfo_start(p: &str, at: usize) -> usize {
    p.find("://").filter(|&s| s < at).map_or(0, |s| s + 3)
}

// ------------------------------------------------------------ node services

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Option<String>,
    fqdn: Option<String>,
    local: String,
    port: Option<u16>,
    protocol: Option<String>,
    tls: Option<String>,
    public_port: Option<u16>,
    proxy_protocol: Option<bool>,
    http2: Option<bool>,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

/// The host a service is published under: one label under the hub's gateway
/// domains, or a custom domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceHost {
    Name(crate::proxy::names::Label),
    Fqdn(crate::proxy::names::DomainName),
}

impl fmt::Display for ServiceHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceHost::Name(l) => f.write_str(l.as_str()),
            ServiceHost::Fqdn(d) => f.write_str(d.as_str()),
        }
    }
}

/// How the hub carries a service (`protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceProtocol {
    Http,
    Tcp,
    Udp,
}

/// Who holds the certificate of an HTTP service (`tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceTls {
    /// The hub terminates TLS and proxies HTTP to the node.
    Terminate,
    /// The hub splices the TLS stream to the node, chosen by SNI.
    Passthrough,
}

/// A validated `[[service]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeService {
    pub host: ServiceHost,
    /// Where the service listens on the node.
    pub local: std::net::SocketAddr,
    /// The port the hub connects to on the node's overlay address.
    pub port: u16,
    pub protocol: ServiceProtocol,
    /// HTTP only (default `terminate`); `None` for tcp and udp.
    pub tls: Option<ServiceTls>,
    /// The hub's public port; tcp and udp only, required there.
    pub public_port: Option<u16>,
    /// Passthrough HTTP and tcp only.
    pub proxy_protocol: bool,
    /// The service speaks HTTP/2 only (gRPC): the hub speaks HTTP/2 to it.
    /// Terminated HTTP only.
    pub http2: bool,
    /// Client networks the hub admits to this service (`proxy::access`).
    pub allow: Vec<String>,
    /// Client networks the hub refuses.
    pub deny: Vec<String>,
}

/// `[[hub]] control`: `ip:port` inside the hub's `allowed_ips`, so requests
/// go down that hub's tunnel.
fn node_control(
    what: &str,
    s: &str,
    allowed_ips: &[IpNet],
) -> Result<std::net::SocketAddr, String> {
    let a: std::net::SocketAddr = s.trim().parse().map_err(|_| {
        format!("{what} control `{s}`: expected ip:port, e.g. `[fd77:6777::1]:7001`")
    })?;
    if a.port() == 0 {
        return Err(format!("{what} control `{s}`: port 0"));
    }
    if !allowed_ips.iter().any(|n| n.contains(&a.ip())) {
        return Err(format!(
            "{what} control `{s}`: not inside this hub's allowed_ips, so it would not \
             go through the tunnel"
        ));
    }
    Ok(a)
}

/// Validates the `[[service]]` entries; `overlay` is `[node] addresses`.
fn node_services(raw: &[RawService], overlay: &[IpNet]) -> Result<Vec<NodeService>, String> {
    use crate::proxy::names::{DomainName, Label};
    let mut out: Vec<NodeService> = Vec::new();
    // What makes two entries the same, with the entry that holds it.
    let mut hosts: std::collections::HashMap<ServiceHost, String> =
        std::collections::HashMap::new();
    let mut publics: std::collections::HashMap<(ServiceProtocol, u16), String> =
        std::collections::HashMap::new();
    let mut listens: std::collections::HashMap<(bool, u16), (std::net::SocketAddr, String)> =
        std::collections::HashMap::new();
    for (i, r) in raw.iter().enumerate() {
        let what = format!(
            "[[service]] #{} ({})",
            i + 1,
            r.name.as_deref().or(r.fqdn.as_deref()).unwrap_or("unnamed")
        );
        let host = match (&r.name, &r.fqdn) {
            (Some(n), None) => ServiceHost::Name(
                Label::parse(n).map_err(|e| format!("{what} name: {e} (one DNS label)"))?,
            ),
            (None, Some(f)) => {
                ServiceHost::Fqdn(DomainName::parse(f).map_err(|e| format!("{what} fqdn: {e}"))?)
            }
            (Some(_), Some(_)) => return Err(format!("{what}: set `name` or `fqdn`, not both")),
            (None, None) => return Err(format!("{what}: `name` or `fqdn` is required")),
        };
        let local: std::net::SocketAddr = r
            .local
            .trim()
            .parse()
            .map_err(|_| format!("{what} local `{}`: expected ip:port", r.local))?;
        if local.port() == 0 {
            return Err(format!("{what} local `{local}`: port 0"));
        }
        let port = r.port.unwrap_or(local.port());
        if port == 0 {
            return Err(format!("{what} port: 0 is not a port"));
        }
        let on_overlay =
            local.ip().is_unspecified() || overlay.iter().any(|n| n.addr() == local.ip());
        if on_overlay && port != local.port() {
            return Err(format!(
                "{what} port {port}: `local` {local} already listens on the overlay address, \
                 so the hub connects to port {}; drop `port`, or point `local` at another \
                 address (127.0.0.1:{}) to forward",
                local.port(),
                local.port()
            ));
        }
        let protocol = match r.protocol.as_deref().unwrap_or("http") {
            "http" => ServiceProtocol::Http,
            "tcp" => ServiceProtocol::Tcp,
            "udp" => ServiceProtocol::Udp,
            p => {
                return Err(format!(
                    "{what} protocol `{p}`: expected `http`, `tcp` or `udp`"
                ))
            }
        };
        let tls = match (protocol, r.tls.as_deref()) {
            (ServiceProtocol::Http, None | Some("terminate")) => Some(ServiceTls::Terminate),
            (ServiceProtocol::Http, Some("passthrough")) => Some(ServiceTls::Passthrough),
            (ServiceProtocol::Http, Some(t)) => {
                return Err(format!(
                    "{what} tls `{t}`: expected `terminate` or `passthrough`"
                ))
            }
            (_, None) => None,
            (_, Some(_)) => return Err(format!("{what} tls: only for protocol = \"http\"")),
        };
        let public_port = match (protocol, r.public_port) {
            (ServiceProtocol::Http, None) => None,
            (ServiceProtocol::Http, Some(_)) => {
                return Err(format!(
                    "{what} public_port: only for tcp and udp (http is routed by host name)"
                ))
            }
            (_, None) => {
                return Err(format!(
                    "{what} public_port: required for tcp and udp (the hub's public port)"
                ))
            }
            (_, Some(0)) => return Err(format!("{what} public_port: 0 is not a port")),
            (_, Some(p)) => Some(p),
        };
        let proxy_protocol = r.proxy_protocol.unwrap_or(false);
        let pp_ok = matches!(protocol, ServiceProtocol::Tcp | ServiceProtocol::Udp)
            || tls == Some(ServiceTls::Passthrough);
        if r.proxy_protocol.is_some() && !pp_ok {
            return Err(format!(
                "{what} proxy_protocol: only for tls = \"passthrough\" and protocol = \"tcp\" or \"udp\""
            ));
        }
        let http2 = r.http2.unwrap_or(false);
        if r.http2.is_some() && tls != Some(ServiceTls::Terminate) {
            return Err(format!(
                "{what} http2: only for protocol = \"http\" with tls = \"terminate\""
            ));
        }
        let rules = crate::proxy::access::Access::parse(&r.allow, &r.deny)
            .map_err(|e| format!("{what} {e}"))?;
        let (allow, deny) = rules.canonical();
        // The hub knows an HTTP service by its host, tcp and udp by public port.
        let host_taken = match protocol {
            ServiceProtocol::Http => hosts.insert(host.clone(), what.clone()),
            _ => None,
        };
        if let Some(other) = host_taken {
            return Err(format!(
                "{what}: {} is already declared by {other}",
                match &host {
                    ServiceHost::Name(n) => format!("name `{n}`"),
                    ServiceHost::Fqdn(f) => format!("fqdn `{f}`"),
                }
            ));
        }
        if let Some(p) = public_port {
            if let Some(other) = publics.insert((protocol, p), what.clone()) {
                return Err(format!(
                    "{what}: public_port {p} is already claimed by {other}"
                ));
            }
        }
        let udp = protocol == ServiceProtocol::Udp;
        if let Some((other_local, other)) = listens.get(&(udp, port)) {
            if *other_local != local {
                return Err(format!(
                    "{what}: port {port} is also used by {other}, which points at {other_local}, \
                     not {local}"
                ));
            }
        } else {
            listens.insert((udp, port), (local, what.clone()));
        }
        out.push(NodeService {
            host,
            local,
            port,
            protocol,
            tls,
            public_port,
            proxy_protocol,
            http2,
            allow,
            deny,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod service_tests {
    use super::*;

    const K1: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const P2: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    pub(super) fn node(extra: &str) -> Result<NodeConfig, String> {
        let text = format!(
            "[node]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.1.1/10\", \"fd77:6777::1:1/48\"]\n\
             [[hub]]\nname = \"hub1\"\npublic_key = \"{P2}\"\nendpoint = \"hub.example:51820\"\n\
             allowed_ips = [\"100.64.0.0/10\", \"fd77:6777::/48\"]\ncontrol = \"[fd77:6777::1]:7001\"\n{extra}"
        );
        NodeConfig::parse("n.toml", &text, Path::new(".")).map_err(|e| e.to_string())
    }

    #[test]
    fn services_and_control() {
        let c = node(
            "[[service]]\nname = \"Blog\"\nlocal = \"127.0.0.1:8080\"\n\
             [[service]]\nfqdn = \"shop.example.com\"\nlocal = \"[::]:8443\"\ntls = \"passthrough\"\nproxy_protocol = true\n\
             [[service]]\nname = \"ssh\"\nlocal = \"127.0.0.1:22\"\nport = 2222\nprotocol = \"tcp\"\npublic_port = 20022\n\
             [[service]]\nname = \"dns\"\nlocal = \"100.64.1.1:53\"\nprotocol = \"udp\"\npublic_port = 20053\nproxy_protocol = true\n\
             [[service]]\nname = \"api\"\nlocal = \"127.0.0.1:50051\"\nhttp2 = true\n\
             allow = [\"2001:DB8::/32\", \"192.0.2.0/24\"]\ndeny = [\"192.0.2.9\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.hubs[0].control,
            Some("[fd77:6777::1]:7001".parse().unwrap())
        );
        let s = &c.services;
        assert_eq!(s.len(), 5);
        assert!(s[4].http2 && !s[0].http2);
        assert_eq!(s[4].allow, ["192.0.2.0/24", "2001:db8::/32"]);
        assert_eq!(s[4].deny, ["192.0.2.9/32"]);
        assert!(s[0].allow.is_empty() && s[0].deny.is_empty());
        assert_eq!(s[0].host.to_string(), "blog");
        assert_eq!(s[0].port, 8080);
        assert_eq!(s[0].protocol, ServiceProtocol::Http);
        assert_eq!(s[0].tls, Some(ServiceTls::Terminate));
        assert!(!s[0].proxy_protocol);
        assert!(matches!(s[1].host, ServiceHost::Fqdn(_)));
        assert_eq!(s[1].tls, Some(ServiceTls::Passthrough));
        assert!(s[1].proxy_protocol);
        assert!(s[3].proxy_protocol && !s[2].proxy_protocol);
        assert_eq!(
            (s[2].port, s[2].public_port, s[2].tls),
            (2222, Some(20022), None)
        );
        assert_eq!(s[3].protocol, ServiceProtocol::Udp);
        // No services, no control: still fine.
        let c = NodeConfig::parse(
            "n.toml",
            &format!(
                "[node]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.1.1/10\"]\n\
                 [[hub]]\npublic_key = \"{P2}\"\nendpoint = \"h.example:1\"\nallowed_ips = [\"100.64.0.0/10\"]\n"
            ),
            Path::new("."),
        )
        .unwrap();
        assert!(c.services.is_empty() && c.hubs[0].control.is_none());
    }

    #[test]
    fn service_errors_name_the_entry() {
        let cases: &[(&str, &str)] = &[
            ("[[service]]\nname = \"a\"\nlocal = \"127.0.0.1:1\"\nlisten = 3\n", "listen"),
            ("[[service]]\nlocal = \"127.0.0.1:1\"\n", "#1 (unnamed): `name` or `fqdn` is required"),
            ("[[service]]\nname = \"a\"\nfqdn = \"a.example\"\nlocal = \"127.0.0.1:1\"\n", "not both"),
            ("[[service]]\nname = \"a.b\"\nlocal = \"127.0.0.1:1\"\n", "#1 (a.b) name: label `a.b` contains `.`"),
            ("[[service]]\nfqdn = \"bad_name.example\"\nlocal = \"127.0.0.1:1\"\n", "fqdn"),
            ("[[service]]\nname = \"a\"\nlocal = \"localhost:1\"\n", "local `localhost:1`"),
            ("[[service]]\nname = \"a\"\nlocal = \"127.0.0.1:0\"\n", "port 0"),
            ("[[service]]\nname = \"a\"\nlocal = \"127.0.0.1:1\"\nprotocol = \"quic\"\n", "protocol `quic`"),
            ("[[service]]\nname = \"a\"\nlocal = \"127.0.0.1:1\"\ntls = \"yes\"\n", "tls `yes`"),
            ("[[service]]\nname = \"a\"\nlocal = \"127.0.0.1:1\"\nprotocol = \"tcp\"\n", "public_port: required"),
            ("[[service]]\nname = \"a\"\nlocal = \"127.0.0.1:1\"\nprotocol = \"tcp\"\npublic_port = 5\ntls = \"terminate\"\n", "tls: only"),
            ("[[service]]\nname = \"a\"\nlocal = \"127.0.0.1:1\"\npublic_port = 5\n", "public_port: only"),
            ("[[service]]\nname = \"a\"\nlocal = \"127.0.0.1:1\"\nproxy_protocol = true\n", "proxy_protocol"),
            ("[[service]]\nname = \"a\"\nlocal = \"127.0.0.1:1\"\ntls = \"passthrough\"\nhttp2 = true\n", "http2: only"),
            ("[[service]]\nname = \"a\"\nlocal = \"127.0.0.1:1\"\nprotocol = \"tcp\"\npublic_port = 5\nhttp2 = true\n", "http2: only"),
            ("[[service]]\nname = \"a\"\nlocal = \"127.0.0.1:1\"\ntls = \"terminate\"\nproxy_protocol = false\n", "proxy_protocol"),
            ("[[service]]\nname = \"a\"\nlocal = \"0.0.0.0:80\"\nport = 81\n", "drop `port`"),
            ("[[service]]\nname = \"a\"\nlocal = \"127.0.0.1:1\"\nallow = [\"10.0.0.1/8\"]\n", "[[service]] #1 (a) allow: `10.0.0.1/8`"),
            ("[[service]]\nname = \"a\"\nlocal = \"127.0.0.1:1\"\nallow = [\"10.0.0.0/8\"]\ndeny = [\"10.0.0.0/8\"]\n", "in both allow and deny"),
            ("[[service]]\nname = \"a\"\nlocal = \"100.64.1.1:80\"\nport = 81\n", "drop `port`"),
            ("[[service]]\nname = \"a\"\nlocal = \"127.0.0.1:1\"\n[[service]]\nname = \"A\"\nlocal = \"127.0.0.1:2\"\n",
             "[[service]] #2 (A): name `a` is already declared by [[service]] #1 (a)"),
            ("[[service]]\nname = \"a\"\nlocal = \"127.0.0.1:1\"\nprotocol = \"tcp\"\npublic_port = 9\n\
              [[service]]\nname = \"b\"\nlocal = \"127.0.0.1:2\"\nprotocol = \"tcp\"\npublic_port = 9\n", "public_port 9 is already claimed"),
            ("[[service]]\nname = \"a\"\nlocal = \"127.0.0.1:1\"\nport = 80\n\
              [[service]]\nname = \"b\"\nlocal = \"127.0.0.1:2\"\nport = 80\n", "port 80 is also used by [[service]] #1 (a)"),
        ];
        for (extra, want) in cases {
            let e = node(extra).unwrap_err();
            assert!(e.contains(want), "{extra}: {e}");
        }
        // The same port for tcp and udp, two names on the same local, or one
        // name for several tcp ports, is fine.
        node(
            "[[service]]\nname = \"a\"\nlocal = \"127.0.0.1:53\"\nprotocol = \"tcp\"\npublic_port = 53\n\
             [[service]]\nname = \"a\"\nlocal = \"127.0.0.1:53\"\nprotocol = \"udp\"\npublic_port = 53\n\
             [[service]]\nname = \"b\"\nlocal = \"127.0.0.1:53\"\n\
             [[service]]\nname = \"a\"\nlocal = \"127.0.0.1:54\"\nprotocol = \"tcp\"\npublic_port = 54\n",
        )
        .unwrap();
    }

    #[test]
    fn control_must_go_through_the_hub() {
        let base = format!(
            "[node]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.1.1/10\"]\n\
             [[hub]]\nname = \"h\"\npublic_key = \"{P2}\"\nendpoint = \"h.example:1\"\nallowed_ips = [\"100.64.0.0/10\"]\n"
        );
        for (c, want) in [
            ("10.0.0.1:7001", "not inside this hub's allowed_ips"),
            ("100.64.0.1", "expected ip:port"),
            ("100.64.0.1:0", "port 0"),
        ] {
            let e = NodeConfig::parse(
                "n.toml",
                &format!("{base}control = \"{c}\"\n"),
                Path::new("."),
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("[[hub]] #1 (h) control") && e.contains(want),
                "{e}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const P1: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
    const P2: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn hub(text: &str) -> Result<HubConfig, ConfigError> {
        HubConfig::parse("hub.toml", text, Path::new("."))
    }

    #[test]
    fn good_hub() {
        let c = hub(&format!(
            "[hub]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.0.1/10\", \"fd77::1/48\"]\n\
             [[peer]]\nname = \"n1\"\npublic_key = \"{P2}\"\nallowed_ips = [\"100.64.0.2/32\"]\n"
        ))
        .unwrap();
        assert_eq!(c.listen_port, DEFAULT_PORT);
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.interface, "gw0");
        assert_eq!(c.private_key.public_key().to_base64(), P1);
    }

    #[test]
    fn a_prefix_belongs_to_one_peer() {
        const P3: &str = "DCUMhIEOU9pahhcGab2GIw4Ua7WvG8PyBFDvZNDPiQE=";
        let two = |a: &str, b: &str| {
            hub(&format!(
                "[hub]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.0.1/10\"]\n\
                 [[peer]]\nname = \"a\"\npublic_key = \"{P2}\"\nallowed_ips = [{a}]\n\
                 [[peer]]\nname = \"b\"\npublic_key = \"{P3}\"\nallowed_ips = [{b}]\n"
            ))
        };
        // The same prefix: refused, naming both.
        let e = two("\"10.77.0.0/24\"", "\"100.64.0.9/32\", \"10.77.0.0/24\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[[peer]] #2 (b) allowed_ips 10.77.0.0/24")
                && e.contains("[[peer]] #1 (a)'s"),
            "{e}"
        );
        // Nested prefixes are fine (the longest match decides), and so is
        // one peer listing a prefix twice.
        assert!(two("\"10.77.0.0/16\"", "\"10.77.0.0/24\"").is_ok());
        assert!(two("\"10.77.0.0/24\", \"10.77.0.0/24\"", "\"10.78.0.0/24\"").is_ok());
    }

    #[test]
    fn a_peer_holding_the_hubs_own_address_is_refused() {
        let with = |allowed: &str| {
            hub(&format!(
                "[hub]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.0.1/10\", \"fd77::1/48\"]\n\
                 [[peer]]\nname = \"n1\"\npublic_key = \"{P2}\"\nallowed_ips = [\"100.64.0.2/32\"]\n\
                 [[peer]]\nname = \"wide\"\npublic_key = \"DCUMhIEOU9pahhcGab2GIw4Ua7WvG8PyBFDvZNDPiQE=\"\n\
                 allowed_ips = [{allowed}]\n"
            ))
        };
        for (allowed, net, addr) in [
            ("\"100.64.0.1/32\"", "100.64.0.1/32", "100.64.0.1"),
            (
                "\"10.9.0.0/16\", \"100.64.0.0/24\"",
                "100.64.0.0/24",
                "100.64.0.1",
            ),
            ("\"fd77::/64\"", "fd77::/64", "fd77::1"),
            ("\"100.64.0.0/10\"", "100.64.0.0/10", "100.64.0.1"),
        ] {
            let e = with(allowed).unwrap_err().to_string();
            assert!(
                e.contains(&format!("[[peer]] #2 (wide) allowed_ips {net}"))
                    && e.contains(&format!("hub's own address {addr}")),
                "{allowed}: {e}"
            );
        }
        // Beside the hub's address, in its network: fine.
        assert!(with("\"100.64.0.4/30\", \"fd77::2/128\"").is_ok());
        // Wider than the hub's network (an exit through the peer): fine.
        assert!(with("\"0.0.0.0/0\", \"::/0\"").is_ok());
        assert!(with("\"100.0.0.0/8\"").is_ok());
    }

    #[test]
    fn node_to_node_takes_three_values() {
        use crate::wg::device::NodeToNode;
        let with = |extra: &str| {
            hub(&format!(
                "[hub]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.0.1/10\"]\n{extra}"
            ))
        };
        assert_eq!(with("").unwrap().node_to_node, NodeToNode::Direct);
        for (v, want) in [
            ("direct", NodeToNode::Direct),
            ("kernel", NodeToNode::Kernel),
            ("off", NodeToNode::Off),
        ] {
            let c = with(&format!("node_to_node = \"{v}\"\n")).unwrap();
            assert_eq!(c.node_to_node, want);
        }
        for bad in ["\"Off\"", "\"forward\"", "\"\""] {
            let e = with(&format!("node_to_node = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("[hub] node_to_node") && e.contains("\"direct\", \"kernel\", \"off\""),
                "{bad}: {e}"
            );
        }
        let e = with("node_to_node = false\n").unwrap_err().to_string();
        assert!(e.contains("node_to_node"), "{e}");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = hub(&format!(
            "[hub]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.0.1/10\"]\nlisten_prot = 5\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("listen_prot"), "{e}");
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn parse_errors_never_quote_a_key() {
        for text in [
            format!("[hub]\nprivat_key = \"{K1}\"\naddresses = [\"100.64.0.1/10\"]\n"),
            format!("[hub]\nprivate_key = \"{K1}\naddresses = [\"100.64.0.1/10\"]\n"),
            format!("[hub]\nprivate_key = {K1}\n"),
        ] {
            let e = hub(&text).unwrap_err().to_string();
            assert!(!e.contains(&K1[..12]), "{e}");
            assert!(e.contains("line 2"), "{e}");
        }
    }

    #[test]
    fn bad_values_are_named() {
        let e = hub("[hub]\nprivate_key = \"nope\"\naddresses = [\"100.64.0.1/10\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("private_key"), "{e}");
        let e = hub(&format!(
            "[hub]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.0.1/10\"]\n\
             [[peer]]\npublic_key = \"{P2}\"\nallowed_ips = [\"100.64.0.2/24\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("host bits"), "{e}");
        let e = hub(&format!(
            "[hub]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.0.1/10\"]\n\
             [[peer]]\npublic_key = \"{P2}\"\nallowed_ips = []\n\
             [[peer]]\npublic_key = \"{P2}\"\nallowed_ips = []\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn debug_never_shows_the_key() {
        let c = hub(&format!(
            "[hub]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.0.1/10\"]\n"
        ))
        .unwrap();
        assert!(!format!("{c:?}").contains(K1));
    }

    #[test]
    fn tls_carrier_keys() {
        use super::service_tests::node;
        use crate::carrier::path::Transport;
        let c = node("").unwrap();
        assert_eq!(c.hubs[0].transport, Transport::Auto);
        assert_eq!(c.hubs[0].tls_endpoint, "hub.example:443");
        assert_eq!(c.hubs[0].tls_proxy, None);
        assert_eq!(c.hubs[0].udp_retry, 300);
        assert_eq!(node("udp_retry = 0\n").unwrap().hubs[0].udp_retry, 0);
        assert_eq!(node("udp_retry = 5\n").unwrap().hubs[0].udp_retry, 5);
        let e = node("udp_retry = 2\n").unwrap_err().to_string();
        assert!(
            e.contains("udp_retry 2: expected 0 (never) or 5 to 86400"),
            "{e}"
        );
        let c = node(
            "transport = \"tls\"\ntls_endpoint = \"[2001:db8::1]:8443\"\ntls_proxy = \"http://proxy.corp:3128/\"\n",
        )
        .unwrap();
        assert_eq!(c.hubs[0].transport, Transport::Tls);
        assert_eq!(c.hubs[0].tls_endpoint, "[2001:db8::1]:8443");
        assert_eq!(c.hubs[0].tls_proxy.as_deref(), Some("proxy.corp:3128"));
        assert_eq!(c.hubs[0].tls_proxy_auth, None);
        assert_eq!(c.hubs[0].websocket, None);
        let c = node("transport = \"tls\"\nwebsocket = \"wss://edge.example.org\"\n").unwrap();
        let w = c.hubs[0].websocket.as_ref().unwrap();
        assert!(w.tls);
        assert_eq!(w.host_header, "edge.example.org");
        assert_eq!(w.path, crate::carrier::ws::PATH);
        assert_eq!(c.hubs[0].tls_endpoint, "edge.example.org:443");
        let c = node("websocket = \"ws://[2001:db8::7]:8080/tunnel/wg\"\n").unwrap();
        let w = c.hubs[0].websocket.as_ref().unwrap();
        assert!(!w.tls);
        assert_eq!(w.host_header, "[2001:db8::7]:8080");
        assert_eq!(w.path, "/tunnel/wg");
        assert_eq!(c.hubs[0].tls_endpoint, "[2001:db8::7]:8080");
        assert_eq!(
            node("websocket = \"ws://10.0.0.1\"\n").unwrap().hubs[0].tls_endpoint,
            "10.0.0.1:80"
        );
        let c = node("websocket = \"wss://[2001:db8::7]/wg?t=s3cret\"\n").unwrap();
        assert_eq!(c.hubs[0].tls_endpoint, "[2001:db8::7]:443");
        let w = c.hubs[0].websocket.as_ref().unwrap();
        assert_eq!(w.path, "/wg?t=s3cret");
        assert!(!w.query_in_clear(), "wss:// encrypts the query");
        let clear = node("websocket = \"ws://edge/wg?t=s3cret\"\n").unwrap();
        assert!(clear.hubs[0].websocket.as_ref().unwrap().query_in_clear());
        let plain = node("websocket = \"ws://edge/wg\"\n").unwrap();
        assert!(!plain.hubs[0].websocket.as_ref().unwrap().query_in_clear());
        // The query (a token, maybe) stays out of what is shown and logged.
        assert_eq!(w.url, "wss://[2001:db8::7]/wg?…");
        assert!(!format!("{c:?}").contains("s3cret"), "{c:?}");
        let e = node("websocket = \"wss://[2001:db8::7]wg?t=s3cret\"\n").unwrap_err();
        assert!(e.contains("websocket") && !e.contains("s3cret"), "{e}");
        let c = node("tls_proxy = \"http://gw:s%40cret@proxy.corp:3128\"\n").unwrap();
        assert_eq!(c.hubs[0].tls_proxy.as_deref(), Some("proxy.corp:3128"));
        let auth = c.hubs[0].tls_proxy_auth.as_ref().unwrap();
        assert_eq!(
            auth,
            &crate::carrier::connect::Credentials::parse("gw:s@cret").unwrap()
        );
        assert!(!format!("{c:?}").contains("cret"), "{c:?}");
        let dir = std::env::temp_dir().join(format!("gw-proxy-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("proxy.auth"), "gw:from file\n").unwrap();
        let c = node(&format!(
            "tls_proxy = \"http://proxy.corp:3128\"\ntls_proxy_auth_file = \"{}\"\n",
            dir.join("proxy.auth").display()
        ))
        .unwrap();
        assert_eq!(
            c.hubs[0].tls_proxy_auth,
            Some(crate::carrier::connect::Credentials::parse("gw:from file").unwrap())
        );
        std::fs::write(dir.join("bad.auth"), "gw\n").unwrap();
        let e = node(&format!(
            "tls_proxy = \"http://proxy.corp:3128\"\ntls_proxy_auth_file = \"{}\"\n",
            dir.join("bad.auth").display()
        ))
        .unwrap_err();
        assert!(e.contains("bad.auth: expected user:password"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            node("transport = \"udp\"\n").unwrap().hubs[0].transport,
            Transport::Udp
        );
        for (extra, says) in [
            ("transport = \"quic\"\n", "transport"),
            (
                "tls_endpoint = \"hub.example\"\n",
                "tls_endpoint `hub.example`: expected host:port",
            ),
            ("tls_proxy = \"proxy:3128\"\n", "expected http://host:port"),
            (
                "tls_proxy = \"https://proxy:3128\"\n",
                "expected http://host:port",
            ),
            (
                "tls_proxy = \"gw:s3cret@proxy:3128\"\n",
                "tls_proxy `<redacted>@proxy:3128`: expected http://host:port",
            ),
            (
                "tls_proxy = \"http://u@proxy:3128\"\n",
                "tls_proxy `http://<redacted>@proxy:3128`: expected user:password",
            ),
            (
                "tls_proxy = \"http://:secret@proxy:3128/x\"\n",
                "tls_proxy `http://<redacted>@proxy:3128/x`: the user is empty",
            ),
            (
                "tls_proxy_auth_file = \"/nonexistent\"\n",
                "tls_proxy_auth_file needs tls_proxy",
            ),
            (
                "tls_proxy = \"http://u:secret@proxy:3128\"\ntls_proxy_auth_file = \"/x\"\n",
                "credentials in both tls_proxy and tls_proxy_auth_file",
            ),
            (
                "tls_proxy = \"http://proxy:3128/x\"\n",
                "expected http://host:port",
            ),
            ("websocket = \"https://edge\"\n", "expected ws://host"),
            ("websocket = \"wss://u:p@edge\"\n", "no user information"),
            ("websocket = \"wss://edge/a b\"\n", "spaces"),
            ("websocket = \"wss:///x\"\n", "expected a host"),
            ("websocket = \"wss://:443\"\n", "expected a host"),
            (
                "websocket = \"wss://edge:0\"\n",
                "`wss://edge:0`: the port is not a number",
            ),
            (
                "websocket = \"wss://edge:99999\"\n",
                "`wss://edge:99999`: the port",
            ),
            ("websocket = \"wss://edge:\"\n", "`wss://edge:`: the port"),
            (
                "websocket = \"wss://edge?t=x\"\n",
                "a query or fragment without a path",
            ),
            ("websocket = \"wss://[::1\"\n", "without its `]`"),
            ("websocket = \"wss://[edge]:443\"\n", "not an IPv6 address"),
            ("websocket = \"wss://a:b:c\"\n", "`wss://a:b:c`: the port"),
            (
                "websocket = \"wss://edge\"\ntls_endpoint = \"edge:443\"\n",
                "not both",
            ),
            (
                "websocket = \"wss://edge\"\ntransport = \"udp\"\n",
                "websocket needs transport",
            ),
        ] {
            let e = node(extra).unwrap_err();
            assert!(e.contains(says), "{extra}: {e}");
        }
    }

    #[test]
    fn url_errors_keep_credentials_and_query_out() {
        use super::service_tests::node;
        for (extra, says) in [
            (
                "websocket = \"wss://gw:pa55w0rd@edge/wg\"\n",
                "websocket `wss://<redacted>@edge/wg`: no user information",
            ),
            (
                "websocket = \"wss://gw:pa55/w0rd@edge/wg?t=x\"\n",
                "websocket `wss://<redacted>@edge/wg?…`: the port is not a number",
            ),
            (
                "websocket = \"wss://gw:pa55?w0rd@edge/wg\"\n",
                "websocket `wss://<redacted>`: a query or fragment without a path",
            ),
            (
                "websocket = \"wss://gw:pa55/x?w0rd@edge/wg\"\n",
                "websocket `wss://<redacted>`: the port is not a number",
            ),
            (
                "websocket = \"wss://edge:0/wg?t=pa55w0rd\"\n",
                "websocket `wss://edge:0/wg?…`: the port",
            ),
            (
                "tls_proxy = \"http://gw:pa55/w0rd@proxy\"\n",
                "tls_proxy `http://<redacted>@proxy`: expected http://host:port",
            ),
            (
                "tls_proxy = \"http://proxy:3128/?t=pa55w0rd\"\n",
                "tls_proxy `http://proxy:3128/?…`: expected http://host:port",
            ),
        ] {
            let e = node(extra).unwrap_err();
            assert!(e.contains(says), "{extra}: {e}");
            assert!(!e.contains("pa55") && !e.contains("w0rd"), "{extra}: {e}");
        }
        assert_eq!(
            redact_url("http://u:p@h:1/?next=http://x"),
            "http://<redacted>@h:1/?…"
        );
        assert_eq!(redact_url("u:p@h:1"), "<redacted>@h:1");
        assert_eq!(redact_url("wss://edge/wg"), "wss://edge/wg");
    }

    #[test]
    fn node_hubs_are_told_apart() {
        use super::service_tests::node;
        const P3: &str = "DCUMhIEOU9pahhcGab2GIw4Ua7WvG8PyBFDvZNDPiQE=";
        let second = |name: &str, key: &str, ips: &str| {
            format!(
                "[[hub]]\n{name}public_key = \"{key}\"\nendpoint = \"hub2.example:51820\"\n\
                 allowed_ips = [{ips}]\n"
            )
        };
        // Nested prefixes, and two hubs without a name, are fine.
        let c = node(&second("", P3, "\"100.64.0.2/32\", \"fd77:6777::2/128\"")).unwrap();
        assert_eq!(c.hubs.len(), 2);
        // Two NAT64 hubs both giving the well-known prefix: the last one
        // gets it (warned about, not refused).
        let c = node(&second("", P3, "\"64:ff9b::/96\", \"fd77:6777::/48\"")).unwrap();
        assert_eq!(c.hubs.len(), 2);
        let text = format!(
            "[node]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.1.1/10\"]\n{}{}",
            second("", P2, "\"100.64.0.0/10\""),
            second("", P3, "\"100.64.0.2/32\"")
        );
        assert!(NodeConfig::parse("n.toml", &text, Path::new(".")).is_ok());
        for (extra, says) in [
            (
                second("name = \"hub1\"\n", P3, "\"100.64.0.2/32\""),
                "[[hub]] #2 name `hub1`: also [[hub]] #1's",
            ),
            (
                second("name = \"self\"\n", P1, "\"100.64.0.2/32\""),
                "[[hub]] #2 (self) has the node's own public key",
            ),
        ] {
            let e = node(&extra).unwrap_err();
            assert!(e.contains(says), "{extra}: {e}");
        }
        let text = format!(
            "[node]\nprivate_key = \"{K1}\"\naddresses = []\n{}",
            second("", P2, "\"100.64.0.0/10\"")
        );
        let e = NodeConfig::parse("n.toml", &text, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[node] addresses: at least one overlay address"),
            "{e}"
        );
    }

    #[test]
    fn websocket_certificate_check() {
        use super::service_tests::node;
        use crate::carrier::WsTrust;
        let trust = |extra: &str| {
            node(extra)
                .map(|c| c.hubs[0].websocket.as_ref().map(|w| w.trust.clone()))
                .unwrap()
        };
        assert_eq!(
            trust("websocket = \"wss://edge/wg?t=s3cret\"\n"),
            Some(WsTrust::System)
        );
        assert_eq!(
            trust("websocket = \"wss://edge/wg\"\nwebsocket_verify = true\n"),
            Some(WsTrust::System)
        );
        assert_eq!(
            trust("websocket = \"wss://edge/wg\"\nwebsocket_verify = false\n"),
            Some(WsTrust::Off)
        );
        let dir = std::env::temp_dir().join(format!("gw-ws-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = p.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("empty.pem"), "").unwrap();
        let with_ca = |file: &str| {
            // Relative to the config file's directory.
            let text = format!(
                "[node]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.1.1/10\"]\n\
                 [[hub]]\npublic_key = \"{P2}\"\nendpoint = \"hub.example:51820\"\n\
                 allowed_ips = [\"100.64.0.0/10\"]\nwebsocket = \"wss://edge/wg?t=s3cret\"\n\
                 websocket_ca = \"{file}\"\n"
            );
            NodeConfig::parse("n.toml", &text, &dir).map_err(|e| e.to_string())
        };
        let c = with_ca("ca.pem").unwrap();
        let w = c.hubs[0].websocket.as_ref().unwrap();
        assert_eq!(w.trust, WsTrust::Ca(vec![ca.der().clone()]));
        assert!(format!("{c:?}").contains("Ca(1 certificates)"), "{c:?}");
        let e = with_ca("empty.pem").unwrap_err();
        assert!(
            e.contains("websocket_ca") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = with_ca("missing.pem").unwrap_err();
        assert!(
            e.contains("websocket_ca") && e.contains("missing.pem"),
            "{e}"
        );
        assert!(!e.contains("s3cret"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        for (extra, says) in [
            (
                "websocket = \"wss://edge/wg?t=s3cret\"\nwebsocket_verify = false\n",
                "websocket_verify = false with a query in the websocket URL",
            ),
            (
                "websocket = \"wss://edge/wg\"\nwebsocket_verify = false\nwebsocket_ca = \"ca.pem\"\n",
                "websocket_ca with websocket_verify = false",
            ),
            (
                "websocket = \"ws://edge/wg\"\nwebsocket_verify = false\n",
                "are for wss:// URLs",
            ),
            (
                "websocket = \"ws://edge/wg\"\nwebsocket_ca = \"ca.pem\"\n",
                "are for wss:// URLs",
            ),
            ("websocket_verify = false\n", "need a websocket URL"),
            ("websocket_ca = \"ca.pem\"\n", "need a websocket URL"),
        ] {
            let e = node(extra).unwrap_err();
            assert!(e.contains(says), "{extra}: {e}");
            assert!(!e.contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn node_needs_hub_with_port() {
        let base = format!("[node]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.0.2/10\"]\n");
        let e = NodeConfig::parse("n.toml", &base, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[[hub]]"), "{e}");
        let e = NodeConfig::parse(
            "n.toml",
            &format!("{base}[[hub]]\npublic_key = \"{P2}\"\nendpoint = \"hub.example\"\nallowed_ips = [\"100.64.0.0/10\"]\n"),
            Path::new("."),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("host:port"), "{e}");
        let c = NodeConfig::parse(
            "n.toml",
            &format!("{base}[[hub]]\npublic_key = \"{P2}\"\nendpoint = \"hub.example:51820\"\nallowed_ips = [\"100.64.0.0/10\"]\n"),
            Path::new("."),
        )
        .unwrap();
        assert_eq!(c.hubs[0].persistent_keepalive, DEFAULT_NODE_KEEPALIVE);
        assert_eq!(c.dead_after, DEFAULT_DEAD_AFTER);
        assert!(c.routes, "routes are installed unless turned off");
        let off = NodeConfig::parse(
            "n.toml",
            &format!("{}routes = false\n[[hub]]\npublic_key = \"{P2}\"\nendpoint = \"hub.example:51820\"\nallowed_ips = [\"100.64.0.0/10\"]\n", base),
            Path::new("."),
        )
        .unwrap();
        assert!(!off.routes);
    }

    const YGG_KEY: &str = "2fb6bcc83c6976e63c76f3286278c441af929b4902a0544cd6e1e401b2a5d3328988ec86fd70a116524ef24b11d0aed0ef374a69b1014ae93a82716a7fadca54";

    #[test]
    fn node_with_only_yggdrasil() {
        let text = format!(
            "[node]\nprivate_key = \"{K1}\"\naddresses = []\n\
             [yggdrasil]\nprivate_key = \"{YGG_KEY}\"\npeers = [\"tcp://203.0.113.1:12345\"]\n"
        );
        let c = NodeConfig::parse("n.toml", &text, Path::new(".")).unwrap();
        assert!(c.hubs.is_empty());
        let y = c.yggdrasil.as_ref().unwrap();
        assert_eq!(y.peers.len(), 1);
        assert!(!format!("{c:?}").contains(YGG_KEY));
    }

    #[test]
    fn mesh_needs_a_proxy_listener() {
        let base = format!("[hub]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.0.1/10\"]\n");
        let mesh = "[mesh]\nname = \"hub-a\"\netcd = [\"http://192.0.2.9:2379\"]\nadvertise = [\"198.51.100.1\"]\n";
        let e = hub(&format!("{base}{mesh}")).unwrap_err().to_string();
        assert!(
            e.contains("[mesh] needs a [proxy]") && e.contains("hub.toml"),
            "{e}"
        );
        let c = hub(&format!(
            "{base}[proxy]\ndomains = [\"gw.test\"]\nhttp_listen = [\"0.0.0.0:80\"]\n{mesh}"
        ))
        .unwrap();
        let m = c.mesh.unwrap();
        assert_eq!(m.name, "hub-a");
        assert_eq!(
            m.advertise,
            vec!["198.51.100.1".parse::<std::net::IpAddr>().unwrap()]
        );
    }

    #[test]
    fn yggdrasil_errors_name_the_key() {
        let base = format!("[hub]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.0.1/10\"]\n");
        let e = hub(&format!("{base}[yggdrasil]\nprivate_key = \"00zz\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[yggdrasil] private_key") && e.contains("hub.toml"),
            "{e}"
        );
        let e = hub(&format!(
            "{base}[yggdrasil]\nprivate_key = \"{YGG_KEY}\"\npeers = [\"tcp:/203.0.113.1:1\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("peers") && e.contains("tcp:/203.0.113.1:1"),
            "{e}"
        );
        let e = hub(&format!(
            "{base}[yggdrasil]\nprivate_key = \"{YGG_KEY}\"\nlisten_on = []\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("listen_on"), "{e}");
    }

    #[test]
    fn yggdrasil_backends_are_accepted_by_the_proxy() {
        let c = hub(&format!(
            "[hub]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.0.1/10\"]\n\
             [proxy]\ndomains = [\"gw.example.org\"]\n\
             [[route]]\nname = \"site\"\nbackends = [\"http://[200:ecee:26f2:51e:bdd3:5b62:1b69:dc5e]:8080\"]\n\
             [[route]]\nname = \"sub\"\nbackends = [\"http://[300:ecee:26f2:51e::1]:80\"]\n\
             [yggdrasil]\nprivate_key = \"{YGG_KEY}\"\n"
        ))
        .unwrap();
        assert!(c.proxy.is_some());
        assert!(c.yggdrasil.is_some());
    }
}
