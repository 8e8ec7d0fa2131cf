//! The control plane's durable state and every operation on it: a pure core.
//!
//! Operations take the current time (unix seconds) and whatever outside facts
//! they need as arguments, change the state or return a typed [`Error`], and do
//! no I/O. The driver (`api.rs`) applies an operation to a copy, saves the copy
//! through a [`crate::control::store::Store`], and only then swaps it in and
//! answers: an acknowledged change is a durable one.
//!
//! Routes come from two places: the operator's API (`routes`) and nodes'
//! declared services (`services`). [`State::evaluate`] turns the declarations
//! into routes and forwards, checking each against the name registry, and says
//! which declarations were refused and why.

use crate::control::registry::{NameRegistry, Verdict};
use crate::proxy::names::{DomainName, Label};
use crate::proxy::settings::{RawPp, RawRoute, RawTcp, RawUdp};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A failed operation: an HTTP status and a message naming the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub status: u16,
    pub message: String,
}

impl Error {
    pub fn bad(m: impl Into<String>) -> Self {
        Error {
            status: 400,
            message: m.into(),
        }
    }
    pub fn unauthorized(m: impl Into<String>) -> Self {
        Error {
            status: 401,
            message: m.into(),
        }
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Error {
            status: 404,
            message: m.into(),
        }
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Error {
            status: 409,
            message: m.into(),
        }
    }
    pub fn gone(m: impl Into<String>) -> Self {
        Error {
            status: 410,
            message: m.into(),
        }
    }
    /// The error as the node `own` is told it: naming no other node (see
    /// [`hide_other_keys`]).
    pub fn for_node(self, own: &str) -> Self {
        Error {
            status: self.status,
            message: hide_other_keys(&self.message, own),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// How a node came to be a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeOrigin {
    /// `POST /v1/peers`.
    Api,
    /// `POST /v1/join` with a token.
    Join,
}

/// A peer added through the control plane (config-file peers are not stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub allowed_ips: Vec<IpNet>,
    pub origin: NodeOrigin,
    pub created: u64,
}

/// An operator route: a `[[route]]` table kept as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRecord {
    pub spec: RawRoute,
    /// Starts at 1; bumped by every change that alters the spec.
    pub version: u64,
    pub updated: u64,
}

/// Who may serve a name (a label under the gateway domains, or an fqdn).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameRecord {
    /// Node keys (base64). The first is the owner; more only with `replicas`.
    pub owners: Vec<String>,
    #[serde(default)]
    pub replicas: bool,
    /// Unix seconds; routes outlive it by the registry's grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
    /// The `bandwidth` of the routes and forwards the name's services get
    /// (`"20 Mbit/s"`): what the name's plan allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<String>,
}

/// A join token as the hub keeps it: the secret only as a hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    pub names: Vec<String>,
    #[serde(default)]
    pub replicas: bool,
    pub created: u64,
    pub expires: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_at: Option<u64>,
    /// The `bandwidth` a name the token creates gets (`"20 Mbit/s"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<String>,
}

/// What a join token grants (`POST /v1/tokens`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenGrant {
    /// The names the joining node will own (or serve as a replica).
    pub names: Vec<String>,
    /// Lifetime, seconds (60 s to 30 days).
    pub ttl: u64,
    /// The names may already have an owner that allows replicas.
    pub replicas: bool,
    /// The `bandwidth` the names the join creates get.
    pub bandwidth: Option<String>,
}

/// The protocol of a declared service.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http,
    Tcp,
    Udp,
}

/// A service as a node declares it (`PUT /v1/services`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceDecl {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fqdn: Option<String>,
    #[serde(default)]
    pub protocol: Protocol,
    /// Where the hub connects, on the node's overlay address.
    pub port: u16,
    /// `terminate` (default) or `passthrough`; HTTP only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    /// The public port of a TCP or UDP service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_port: Option<u16>,
    #[serde(default)]
    pub proxy_protocol: bool,
    /// The service speaks HTTP/2 only (gRPC); terminated HTTP only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub http2: bool,
    /// Client networks admitted (`[[route]] allow`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Client networks refused (`[[route]] deny`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

impl ServiceDecl {
    /// The registry key: the label, or the fqdn.
    pub fn registry_name(&self) -> Option<&str> {
        self.name.as_deref().or(self.fqdn.as_deref())
    }

    /// `name:blog`, `fqdn:shop.example.com`, `tcp:20022`, `udp:20053`.
    pub fn host(&self) -> String {
        match (self.protocol, &self.name, &self.fqdn) {
            (Protocol::Tcp, ..) => format!("tcp:{}", self.public_port.unwrap_or(0)),
            (Protocol::Udp, ..) => format!("udp:{}", self.public_port.unwrap_or(0)),
            (Protocol::Http, Some(n), _) => format!("name:{n}"),
            (Protocol::Http, None, Some(f)) => format!("fqdn:{f}"),
            (Protocol::Http, None, None) => "?".into(),
        }
    }
}

/// One node's declaration of one service, with the backend the hub derived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRecord {
    pub decl: ServiceDecl,
    /// The node's overlay address the declaration came from, with `decl.port`.
    pub backend: SocketAddr,
    /// When this node first declared it: older declarations win conflicts.
    pub since: u64,
}

/// What became of one declared service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub host: String,
    /// `active` or `refused`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
}

/// Everything the control plane keeps across restarts.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Bumped by every committed change.
    pub version: u64,
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeRecord>,
    #[serde(default)]
    pub routes: BTreeMap<String, RouteRecord>,
    #[serde(default)]
    pub names: BTreeMap<String, NameRecord>,
    #[serde(default)]
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Declared services by node key.
    #[serde(default)]
    pub services: BTreeMap<String, Vec<ServiceRecord>>,
    /// The address last handed out from each pool (by the pool's CIDR):
    /// the next node gets the first free one after it, so the address of a
    /// node just removed goes to no one until the pool has been gone round
    /// once (a route or firewall rule still naming it reaches no newcomer).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub last_allocated: BTreeMap<String, IpAddr>,
}

/// Facts from outside the state that operations check against.
pub struct Context<'a> {
    pub now: u64,
    /// Validates a route spec against the hub's proxy configuration
    /// (domains, listeners, own addresses, backend rules).
    pub check_route: &'a dyn Fn(&RawRoute) -> std::result::Result<(), String>,
    /// Hosts routed by the config file (`name:blog`), which the API cannot take.
    pub file_hosts: &'a BTreeSet<String>,
    /// Public keys of config-file peers and the hub's own key.
    pub file_keys: &'a BTreeSet<String>,
    /// Prefixes in use outside the state: the hub's addresses (host
    /// prefixes), the config-file peers' allowed IPs.
    pub used_ips: &'a [IpNet],
    /// Address pools for joined nodes.
    pub pools: &'a [IpNet],
    /// Public ports nodes may claim for TCP/UDP services.
    pub ports: std::ops::RangeInclusive<u16>,
    /// Ports the config file already listens on (TCP and UDP).
    pub file_ports: &'a BTreeSet<(Protocol, u16)>,
    /// Most public ports (`tcp` and `udp` services) one node holds.
    pub max_ports_per_node: usize,
    /// Why a public port cannot be listened on by the hub's proxy (another
    /// program holds it, the hub's own sockets, no permission): `None` when
    /// it can, or already does. A forward whose port cannot be bound would
    /// fail every reload of the proxy after it, for every route.
    pub port_busy: &'a dyn Fn(Protocol, u16) -> Option<String>,
    /// Whether a name (registry name, owner key) may be granted here: not
    /// when the hub mesh holds one of its hosts for another node. Always
    /// `Ok` without a mesh.
    pub held_elsewhere: &'a dyn Fn(&str, &str) -> Result<()>,
}

/// The route of an http service declaration `d` with `backends`.
fn http_route(
    d: &ServiceDecl,
    backends: Vec<String>,
    bandwidth: Option<String>,
    acme: bool,
) -> RawRoute {
    let passthrough = d.tls.as_deref() == Some("passthrough");
    RawRoute {
        name: d.name.clone(),
        fqdn: d.fqdn.clone(),
        tls: d.tls.clone(),
        backends,
        proxy_protocol: (passthrough && d.proxy_protocol).then_some(RawPp::Bool(true)),
        backend_protocol: d.http2.then(|| "http2".to_string()),
        acme: acme && !passthrough,
        allow: d.allow.clone(),
        deny: d.deny.clone(),
        bandwidth,
        ..RawRoute::default()
    }
}

/// A DNS label as the API accepts it: already lowercase.
pub fn api_label(s: &str) -> Result<Label> {
    let l = Label::parse(s).map_err(|e| Error::bad(format!("name `{s}`: {e}")))?;
    if l.as_str() != s {
        return Err(Error::bad(format!(
            "name `{s}`: must be lowercase (`{}`)",
            l.as_str()
        )));
    }
    Ok(l)
}

/// A domain as the API accepts it: already lowercase, no trailing dot.
pub fn api_fqdn(s: &str) -> Result<DomainName> {
    let d = DomainName::parse(s).map_err(|e| Error::bad(format!("fqdn `{s}`: {e}")))?;
    if d.as_str() != s {
        return Err(Error::bad(format!(
            "fqdn `{s}`: must be lowercase without a trailing dot (`{}`)",
            d.as_str()
        )));
    }
    Ok(d)
}

/// A registry name: a label, or (with a dot) an fqdn.
pub fn api_name(s: &str) -> Result<String> {
    if s.contains('.') {
        Ok(api_fqdn(s)?.as_str().to_string())
    } else {
        Ok(api_label(s)?.as_str().to_string())
    }
}

/// The route id for a spec: `name:<label>` or `fqdn:<domain>`.
pub fn route_id(spec: &RawRoute) -> Result<String> {
    match (&spec.name, &spec.fqdn) {
        (Some(n), None) => Ok(format!("name:{}", api_label(n)?)),
        (None, Some(f)) => Ok(format!("fqdn:{}", api_fqdn(f)?)),
        _ => Err(Error::bad("set exactly one of `name` and `fqdn`")),
    }
}

/// A public key as the API accepts it (standard or url-safe base64), in
/// standard base64.
pub fn api_key(s: &str) -> Result<String> {
    let std: String = s
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    crate::keys::PublicKey::from_base64(&std)
        .map(|k| k.to_base64())
        .map_err(|e| Error::bad(format!("public key `{s}`: {e}")))
}

/// `text` with every WireGuard public key in it but `own` (and a `node `
/// before it) replaced by `another node`: what the hub tells a node (its
/// services' statuses, a join's refusal) names no other node. The hub's log
/// and the admin API keep the keys.
pub fn hide_other_keys(text: &str, own: &str) -> String {
    let b = text.as_bytes();
    let b64 = |c: &u8| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/';
    let mut out = String::with_capacity(text.len());
    // Copied up to `last`; looking at `i`.
    let (mut last, mut i) = (0, 0);
    while i < b.len() {
        let run = b
            .get(i..)
            .unwrap_or_default()
            .iter()
            .take_while(|c| b64(c))
            .count();
        if run == 0 {
            i += 1;
            continue;
        }
        let end = i + run;
        // A key is 43 base64 characters and `=`, not part of a longer word.
        let after = b.get(end + 1);
        if run == 43 && b.get(end) == Some(&b'=') && !after.is_some_and(|c| b64(c) || *c == b'=') {
            let key = text.get(i..=end).unwrap_or_default();
            if key != own {
                let before = text.get(last..i).unwrap_or_default();
                out.push_str(before.strip_suffix("node ").unwrap_or(before));
                out.push_str("another node");
                last = end + 1;
            }
        }
        i = end;
    }
    out.push_str(text.get(last..).unwrap_or_default());
    out
}

fn strip_who(e: String) -> String {
    // The proxy validator prefixes `[[route]] #1 (blog): `; the API names the
    // route by its id already.
    match e.split_once("): ") {
        Some((head, rest)) if head.starts_with("[[route]]") => rest.to_string(),
        _ => e,
    }
}

/// Addresses taken: single ones (the usual /32 and /128 of a node) in an
/// ordered set, wider prefixes (a peer routing a subnet) in a list, so that
/// an address inside a peer's /26 is as taken as its first.
#[derive(Default)]
struct Taken {
    hosts: BTreeSet<IpAddr>,
    wide: Vec<IpNet>,
}

impl Taken {
    fn add(&mut self, n: &IpNet) {
        if n.prefix_len() == n.max_prefix_len() {
            self.hosts.insert(n.addr());
        } else {
            self.wide.push(n.trunc());
        }
    }

    fn holds(&self, ip: &IpAddr) -> bool {
        self.hosts.contains(ip) || self.wide.iter().any(|w| w.contains(ip))
    }

    /// Whether any taken address lies in `n`, or `n` in a taken prefix.
    fn overlaps(&self, n: &IpNet) -> bool {
        self.hosts
            .range(n.network()..=n.broadcast())
            .next()
            .is_some()
            || self.wide.iter().any(|w| w.contains(n) || n.contains(w))
    }
}

impl State {
    fn bump(&mut self) {
        self.version += 1;
    }

    /// Why config-file peers (`(label, public key, allowed IPs)`) cannot be
    /// set next to this state's nodes: a prefix that a file peer and a
    /// joined node both list (the one set last would take it, and the
    /// other's traffic with it, silently). Nested prefixes are fine (the
    /// longest match decides), and a node whose key is a file peer's is the
    /// file's anyway.
    pub fn file_peer_conflict(
        &self,
        file: &[(String, String, Vec<IpNet>)],
    ) -> std::result::Result<(), String> {
        let keys: BTreeSet<&str> = file.iter().map(|(_, k, _)| k.as_str()).collect();
        let mut held: BTreeMap<IpNet, &str> = BTreeMap::new();
        for (k, n) in &self.nodes {
            if keys.contains(k.as_str()) {
                continue;
            }
            for net in &n.allowed_ips {
                held.insert(net.trunc(), k);
            }
        }
        for (label, _, nets) in file {
            for net in nets.iter() {
                if let Some(node) = held.get(&net.trunc()) {
                    return Err(format!(
                        "{label} allowed_ips {}: node {node} holds it through the control plane (remove that node with `gatewire ctl peer remove`, or give the peer another prefix)",
                        net.trunc()
                    ));
                }
            }
        }
        Ok(())
    }

    fn check_spec(&self, ctx: &Context, spec: &RawRoute) -> Result<String> {
        let id = route_id(spec)?;
        if ctx.file_hosts.contains(&id) {
            return Err(Error::conflict(format!(
                "`{id}` is routed by the hub's config file"
            )));
        }
        (ctx.check_route)(spec).map_err(|e| Error::bad(format!("{id}: {}", strip_who(e))))?;
        Ok(id)
    }

    /// The node that serves `id` by a declared service whose name is granted
    /// to it (a declaration of a name it was never given takes nothing from
    /// the operator).
    fn node_serves(&self, id: &str) -> Option<&str> {
        self.services.iter().find_map(|(k, v)| {
            v.iter()
                .any(|s| {
                    s.decl.protocol == Protocol::Http
                        && s.decl.host() == id
                        && s.decl
                            .registry_name()
                            .and_then(|n| self.names.get(n))
                            .is_some_and(|r| r.owners.iter().any(|o| o == k))
                })
                .then_some(k.as_str())
        })
    }

    /// `POST /v1/routes`: creates a route; the same spec again is a no-op.
    /// Returns the record and whether it was created.
    pub fn create_route(&mut self, ctx: &Context, spec: RawRoute) -> Result<(String, bool)> {
        let id = self.check_spec(ctx, &spec)?;
        if let Some(r) = self.routes.get(&id) {
            if r.spec == spec {
                return Ok((id, false));
            }
            return Err(Error::conflict(format!(
                "route `{id}` exists (version {}) with another spec; update it with PUT",
                r.version
            )));
        }
        if let Some(k) = self.node_serves(&id) {
            return Err(Error::conflict(format!(
                "`{id}` is served by node {k} (a declared service)"
            )));
        }
        self.routes.insert(
            id.clone(),
            RouteRecord {
                spec,
                version: 1,
                updated: ctx.now,
            },
        );
        self.bump();
        Ok((id, true))
    }

    /// `PUT /v1/routes/{id}`: replaces the spec in place. With `expect`, the
    /// current version must equal it. The same spec again changes nothing.
    pub fn update_route(
        &mut self,
        ctx: &Context,
        id: &str,
        spec: RawRoute,
        expect: Option<u64>,
    ) -> Result<bool> {
        let new_id = self.check_spec(ctx, &spec)?;
        if new_id != id {
            return Err(Error::bad(format!(
                "the spec is for `{new_id}`, not `{id}`; a route's host cannot change"
            )));
        }
        let r = self
            .routes
            .get_mut(id)
            .ok_or_else(|| Error::not_found(format!("no route `{id}`")))?;
        if let Some(v) = expect {
            if v != r.version {
                return Err(Error::conflict(format!(
                    "route `{id}` is at version {}, not {v}",
                    r.version
                )));
            }
        }
        if r.spec == spec {
            return Ok(false);
        }
        r.spec = spec;
        r.version += 1;
        r.updated = ctx.now;
        self.bump();
        Ok(true)
    }

    /// Pause or resume a route. Returns whether anything changed.
    pub fn set_paused(&mut self, now: u64, id: &str, paused: bool) -> Result<bool> {
        let r = self
            .routes
            .get_mut(id)
            .ok_or_else(|| Error::not_found(format!("no route `{id}`")))?;
        if r.spec.paused == paused {
            return Ok(false);
        }
        r.spec.paused = paused;
        r.version += 1;
        r.updated = now;
        self.bump();
        Ok(true)
    }

    pub fn delete_route(&mut self, id: &str) -> Result<()> {
        self.routes
            .remove(id)
            .ok_or_else(|| Error::not_found(format!("no route `{id}`")))?;
        self.bump();
        Ok(())
    }

    /// Everything taken: outside the state and by the state's nodes.
    fn used_ips(&self, ctx: &Context) -> Taken {
        let mut t = Taken::default();
        for n in ctx
            .used_ips
            .iter()
            .chain(self.nodes.values().flat_map(|r| &r.allowed_ips))
        {
            t.add(n);
        }
        t
    }

    /// One free host address from each pool (a /32 or /128): the first
    /// after the pool's last handed out, going round to the pool's start.
    /// Record the result with [`State::note_allocated`].
    fn allocate(&self, ctx: &Context) -> Result<Vec<IpNet>> {
        let used = self.used_ips(ctx);
        let mut out = Vec::new();
        for pool in ctx.pools {
            let after = self
                .last_allocated
                .get(&pool.to_string())
                .filter(|ip| pool.contains(*ip))
                .and_then(|ip| hosts_after(pool, *ip));
            let found = after
                .into_iter()
                .flatten()
                .chain(pool.hosts())
                .take(1 << 20)
                .find(|ip| !used.holds(ip) && !is_subnet_anycast(pool, *ip));
            match found {
                Some(ip) => out.push(IpNet::from(ip)),
                None => return Err(Error::conflict(format!("address pool {pool} is full"))),
            }
        }
        if out.is_empty() {
            return Err(Error::bad(
                "no address pools: set [control] pools or give allowed_ips",
            ));
        }
        Ok(out)
    }

    /// Records addresses [`State::allocate`] chose, as their pools' last.
    fn note_allocated(&mut self, ctx: &Context, addrs: &[IpNet]) {
        // Pools no longer configured are forgotten.
        self.last_allocated
            .retain(|k, _| ctx.pools.iter().any(|p| p.to_string() == *k));
        for (pool, a) in ctx.pools.iter().zip(addrs) {
            self.last_allocated.insert(pool.to_string(), a.addr());
        }
    }

    fn check_new_key(&self, ctx: &Context, key: &str) -> Result<()> {
        if ctx.file_keys.contains(key) {
            return Err(Error::conflict(format!(
                "public key {key} is the hub's own or a config-file peer"
            )));
        }
        if self.nodes.contains_key(key) {
            return Err(Error::conflict(format!(
                "public key {key} is already a peer"
            )));
        }
        Ok(())
    }

    /// `POST /v1/peers`.
    pub fn add_node(
        &mut self,
        ctx: &Context,
        key: &str,
        name: Option<String>,
        allowed_ips: Option<Vec<IpNet>>,
    ) -> Result<NodeRecord> {
        let key = api_key(key)?;
        self.check_new_key(ctx, &key)?;
        if let Some(n) = &name {
            check_peer_name(n)?;
        }
        let allowed_ips = match allowed_ips {
            // A peer that may send from no address could never be used.
            Some(v) if v.is_empty() => {
                return Err(Error::bad(
                    "allowed_ips: empty (leave it out to get addresses from the pool)",
                ))
            }
            Some(v) => {
                let used = self.used_ips(ctx);
                for n in &v {
                    if n.trunc() != *n {
                        return Err(Error::bad(format!("allowed_ips: `{n}` has host bits set")));
                    }
                    if let Some(why) = special_prefix(n) {
                        return Err(Error::bad(format!(
                            "allowed_ips: `{n}` holds {why} addresses, which are no node's"
                        )));
                    }
                    if used.overlaps(n) {
                        return Err(Error::conflict(format!(
                            "allowed_ips: `{n}` overlaps an address in use"
                        )));
                    }
                    let overlaps = self
                        .nodes
                        .values()
                        .flat_map(|r| &r.allowed_ips)
                        .any(|o| o.contains(n) || n.contains(o));
                    if overlaps {
                        return Err(Error::conflict(format!(
                            "allowed_ips: `{n}` overlaps another peer's"
                        )));
                    }
                }
                v
            }
            None => {
                let a = self.allocate(ctx)?;
                self.note_allocated(ctx, &a);
                a
            }
        };
        let rec = NodeRecord {
            name,
            allowed_ips,
            origin: NodeOrigin::Api,
            created: ctx.now,
        };
        self.nodes.insert(key, rec.clone());
        self.bump();
        Ok(rec)
    }

    /// `DELETE /v1/peers/{key}`: the node and its declared services go, and
    /// its names with them: the key leaves every name's owners, and a name
    /// left with no owner is free again (for a token or `PUT /v1/names`).
    /// Returns the names freed.
    pub fn remove_node(&mut self, key: &str) -> Result<Vec<String>> {
        let key = api_key(key)?;
        self.nodes
            .remove(&key)
            .ok_or_else(|| Error::not_found(format!("no peer {key} in the control plane's state (config-file peers are edited in the file)")))?;
        self.services.remove(&key);
        let mut freed = Vec::new();
        self.names.retain(|name, r| {
            r.owners.retain(|o| *o != key);
            if r.owners.is_empty() {
                freed.push(name.clone());
            }
            !r.owners.is_empty()
        });
        self.bump();
        Ok(freed)
    }

    /// Drops the declared services of every key that is neither a node nor
    /// one of `file_keys` (a config-file peer taken out of the file: its
    /// declarations would otherwise hold their hosts against the operator
    /// for good, with no peer to remove). Returns the keys whose services
    /// went.
    pub fn drop_services_of_non_peers(&mut self, file_keys: &BTreeSet<String>) -> Vec<String> {
        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|k| !self.nodes.contains_key(*k) && !file_keys.contains(*k))
            .cloned()
            .collect();
        if !gone.is_empty() {
            for k in &gone {
                self.services.remove(k);
            }
            self.bump();
        }
        gone
    }

    /// `PUT /v1/names/{name}`.
    pub fn set_name(&mut self, ctx: &Context, name: &str, rec: NameRecord) -> Result<()> {
        let name = api_name(name)?;
        if rec.owners.is_empty() {
            return Err(Error::bad("owners: at least one public key"));
        }
        let mut owners = Vec::new();
        for o in &rec.owners {
            let k = api_key(o)?;
            if owners.contains(&k) {
                return Err(Error::bad(format!("owners: {k} is listed twice")));
            }
            owners.push(k);
        }
        if owners.len() > 1 && !rec.replicas {
            return Err(Error::bad("owners: several owners need `replicas: true`"));
        }
        if let Some(b) = &rec.bandwidth {
            crate::proxy::bandwidth::parse_rate(b)
                .map_err(|e| Error::bad(format!("bandwidth {e}")))?;
        }
        let rec = NameRecord { owners, ..rec };
        if self.names.get(&name) == Some(&rec) {
            return Ok(());
        }
        (ctx.held_elsewhere)(&name, &rec.owners[0])?;
        self.names.insert(name, rec);
        self.bump();
        Ok(())
    }

    pub fn delete_name(&mut self, name: &str) -> Result<()> {
        self.names
            .remove(name)
            .ok_or_else(|| Error::not_found(format!("no name `{name}`")))?;
        self.bump();
        Ok(())
    }

    /// `POST /v1/tokens`: stores a token; the caller made `id` and the secret.
    pub fn create_token(
        &mut self,
        now: u64,
        id: &str,
        secret_sha256: [u8; 32],
        grant: TokenGrant,
    ) -> Result<TokenRecord> {
        let TokenGrant {
            names,
            ttl,
            replicas,
            bandwidth,
        } = grant;
        if !(60..=30 * 86_400).contains(&ttl) {
            return Err(Error::bad("ttl: 60 seconds to 30 days"));
        }
        if let Some(b) = &bandwidth {
            crate::proxy::bandwidth::parse_rate(b)
                .map_err(|e| Error::bad(format!("bandwidth {e}")))?;
        }
        let mut checked = Vec::new();
        for n in &names {
            let n = api_name(n)?;
            if checked.contains(&n) {
                return Err(Error::bad(format!("names: `{n}` is listed twice")));
            }
            if let Some(r) = self.names.get(&n) {
                if !r.replicas {
                    return Err(Error::conflict(format!(
                        "name `{n}` is owned by {} and does not allow replicas",
                        r.owners.first().map_or("?", |s| s.as_str())
                    )));
                }
            }
            checked.push(n);
        }
        if self.tokens.contains_key(id) {
            return Err(Error::conflict(format!("token id {id} exists")));
        }
        let rec = TokenRecord {
            secret_sha256: hex(&secret_sha256),
            names: checked,
            replicas,
            created: now,
            expires: now + ttl,
            used_by: None,
            used_at: None,
            bandwidth,
        };
        self.tokens.insert(id.to_string(), rec.clone());
        self.bump();
        Ok(rec)
    }

    pub fn revoke_token(&mut self, id: &str) -> Result<()> {
        self.tokens
            .remove(id)
            .ok_or_else(|| Error::not_found(format!("no token `{id}`")))?;
        self.bump();
        Ok(())
    }

    /// `POST /v1/join`: spends the token, adds the node with fresh addresses
    /// and gives it the token's names. The same token with the key that
    /// spent it gets the same answer again, changing nothing (a node whose
    /// first answer was lost on the way asks again); the third value says
    /// so.
    /// Whether `id` names a token whose secret hashes to `secret_sha256`
    /// (used or not): the check [`State::join`] begins with, which an API
    /// makes before it takes the writer's lock for a join.
    pub fn token_matches(&self, id: &str, secret_sha256: [u8; 32]) -> bool {
        self.tokens
            .get(id)
            .is_some_and(|t| ct_eq(t.secret_sha256.as_bytes(), hex(&secret_sha256).as_bytes()))
    }

    pub fn join(
        &mut self,
        ctx: &Context,
        id: &str,
        secret_sha256: [u8; 32],
        key: &str,
        name: Option<String>,
    ) -> Result<(NodeRecord, Vec<String>, bool)> {
        let invalid = || Error::unauthorized("the join token is not valid");
        let t = self.tokens.get(id).ok_or_else(invalid)?;
        if !ct_eq(t.secret_sha256.as_bytes(), hex(&secret_sha256).as_bytes()) {
            return Err(invalid());
        }
        if let (Some(by), Ok(k)) = (&t.used_by, api_key(key)) {
            if *by == k {
                if let Some(rec) = self.nodes.get(&k) {
                    return Ok((rec.clone(), t.names.clone(), true));
                }
            }
        }
        if let Some(by) = &t.used_by {
            let at = t.used_at.map_or_else(|| "an unknown time".to_string(), utc);
            return Err(Error::gone(format!(
                "the join token was already used (by {by} at {at})"
            )));
        }
        if ctx.now >= t.expires {
            return Err(Error::gone(format!(
                "the join token expired {} s ago",
                ctx.now - t.expires
            )));
        }
        let key = api_key(key)?;
        self.check_new_key(ctx, &key)?;
        if let Some(n) = &name {
            check_peer_name(n)?;
        }
        let names = t.names.clone();
        let replicas = t.replicas;
        let bandwidth = t.bandwidth.clone();
        for n in &names {
            match self.names.get(n) {
                // Given to this key before it joined (`PUT /v1/names`).
                Some(r) if r.owners.contains(&key) => {}
                Some(r) if !r.replicas => {
                    return Err(Error::conflict(format!(
                        "name `{n}` has been taken by {} since the token was made",
                        r.owners.first().map_or("?", |s| s.as_str())
                    )));
                }
                Some(_) => {}
                // A new grant: this node would own it.
                None => (ctx.held_elsewhere)(n, &key)?,
            }
        }
        let allowed_ips = self.allocate(ctx)?;
        self.note_allocated(ctx, &allowed_ips);
        let rec = NodeRecord {
            name,
            allowed_ips,
            origin: NodeOrigin::Join,
            created: ctx.now,
        };
        for n in &names {
            match self.names.get_mut(n) {
                Some(r) if r.owners.contains(&key) => {}
                Some(r) => r.owners.push(key.clone()),
                None => {
                    self.names.insert(
                        n.clone(),
                        NameRecord {
                            owners: vec![key.clone()],
                            replicas,
                            expires: None,
                            // A name that exists keeps its own.
                            bandwidth: bandwidth.clone(),
                        },
                    );
                }
            }
        }
        if let Some(t) = self.tokens.get_mut(id) {
            t.used_by = Some(key.clone());
            t.used_at = Some(ctx.now);
        }
        self.nodes.insert(key, rec.clone());
        self.bump();
        Ok((rec, names, false))
    }

    /// `PUT /v1/services` from `key`, calling from `from`: replaces the node's
    /// declarations (validated one by one; an invalid one fails the call).
    /// Returns whether anything changed. A key that is no peer (removed
    /// while its request was on the way) stores nothing.
    pub fn declare_services(
        &mut self,
        ctx: &Context,
        key: &str,
        from: IpAddr,
        decls: Vec<ServiceDecl>,
    ) -> Result<bool> {
        let Some(out) = self.declared(ctx.now, ctx.file_keys, key, from, decls)? else {
            return Ok(false);
        };
        if out.is_empty() {
            self.services.remove(key);
        } else {
            self.services.insert(key.to_string(), out);
        }
        self.bump();
        Ok(true)
    }

    /// What [`State::declare_services`] would store for `key`, or `None`
    /// when that is what it has (the same error for an invalid call). The
    /// node API asks this of the published state before it takes the
    /// writer's lock.
    pub fn declared(
        &self,
        now: u64,
        file_keys: &BTreeSet<String>,
        key: &str,
        from: IpAddr,
        decls: Vec<ServiceDecl>,
    ) -> Result<Option<Vec<ServiceRecord>>> {
        if !self.nodes.contains_key(key) && !file_keys.contains(key) {
            return Err(Error {
                status: 403,
                message: format!("{key} is not a peer of this hub"),
            });
        }
        if decls.len() > 256 {
            return Err(Error::bad("at most 256 services per node"));
        }
        let rules: usize = decls.iter().map(|d| d.allow.len() + d.deny.len()).sum();
        if rules > MAX_NODE_RULES {
            return Err(Error::bad(format!(
                "allow and deny: at most {MAX_NODE_RULES} networks over all of a node's services"
            )));
        }
        let old = self.services.get(key).map_or(&[][..], Vec::as_slice);
        let mut out: Vec<ServiceRecord> = Vec::new();
        for (i, d) in decls.into_iter().enumerate() {
            let d = check_decl(i, d)?;
            let host = d.host();
            if out.iter().any(|o| o.decl.host() == host) {
                return Err(Error::bad(format!(
                    "services #{}: `{host}` is declared twice",
                    i + 1
                )));
            }
            if d.port == 0 {
                return Err(Error::bad(format!("services #{}: port 0", i + 1)));
            }
            let backend = SocketAddr::new(from, d.port);
            let since = old
                .iter()
                .find(|o| o.decl == d && o.backend == backend)
                .map_or(now, |o| o.since);
            out.push(ServiceRecord {
                decl: d,
                backend,
                since,
            });
        }
        Ok((out != old).then_some(out))
    }

    /// Drops used and expired tokens older than a week. Returns whether any went.
    pub fn prune_tokens(&mut self, now: u64) -> bool {
        let before = self.tokens.len();
        self.tokens
            .retain(|_, t| now < t.expires.saturating_add(7 * 86_400));
        let changed = self.tokens.len() != before;
        if changed {
            self.bump();
        }
        changed
    }

    /// Turns declared services into routes and forwards. Older declarations
    /// win conflicts; each declaration gets a status. An http service the
    /// proxy would not take (`ctx.check_route`) is refused with its reason.
    pub fn evaluate(&self, ctx: &Context, registry: &dyn NameRegistry, acme: bool) -> Evaluation {
        let mut all: Vec<(&String, &ServiceRecord)> = self
            .services
            .iter()
            .flat_map(|(k, v)| v.iter().map(move |s| (k, s)))
            .collect();
        all.sort_by(|a, b| (a.1.since, a.0).cmp(&(b.1.since, b.0)));
        let mut ev = Evaluation::default();
        // host -> (first decl, backends, node keys)
        let mut groups: BTreeMap<String, (ServiceDecl, Vec<SocketAddr>, Vec<String>)> =
            BTreeMap::new();
        // Public ports each node holds so far (its oldest declarations first).
        let mut ports_held: BTreeMap<&String, usize> = BTreeMap::new();
        for (key, s) in all {
            let host = s.decl.host();
            let refuse = |ev: &mut Evaluation, why: String| {
                ev.statuses
                    .entry(key.clone())
                    .or_default()
                    .push(ServiceStatus {
                        host: host.clone(),
                        status: "refused".into(),
                        error: Some(why),
                        backend: None,
                    });
            };
            if !self.nodes.contains_key(key) && !ctx.file_keys.contains(key) {
                refuse(&mut ev, "the node is not a peer of this hub".into());
                continue;
            }
            if let Some(name) = s.decl.registry_name() {
                match registry.verdict(self, name, key, ctx.now) {
                    Verdict::Allowed => {}
                    Verdict::Refused(why) => {
                        refuse(&mut ev, why);
                        continue;
                    }
                }
            } else if s.decl.protocol == Protocol::Http {
                refuse(&mut ev, "an http service needs `name` or `fqdn`".into());
                continue;
            }
            match s.decl.protocol {
                Protocol::Http => {
                    if ctx.file_hosts.contains(&host) || self.routes.contains_key(&host) {
                        refuse(&mut ev, format!("`{host}` is routed by the hub operator"));
                        continue;
                    }
                    // What the proxy would refuse (a name too long under
                    // one of its domains, an fqdn inside one, a backend it
                    // takes for none) is refused here, not reported active.
                    let alone = http_route(&s.decl, vec![s.backend.to_string()], None, acme);
                    if let Err(why) = (ctx.check_route)(&alone) {
                        refuse(&mut ev, why);
                        continue;
                    }
                }
                p @ (Protocol::Tcp | Protocol::Udp) => {
                    let port = s.decl.public_port.unwrap_or(0);
                    if !ctx.ports.contains(&port) {
                        refuse(
                            &mut ev,
                            format!(
                                "public_port {port} is outside the hub's range {}-{}",
                                ctx.ports.start(),
                                ctx.ports.end()
                            ),
                        );
                        continue;
                    }
                    if ctx.file_ports.contains(&(p, port)) {
                        refuse(&mut ev, format!("public_port {port} is used by the hub"));
                        continue;
                    }
                    if let Some(why) = (ctx.port_busy)(p, port) {
                        refuse(
                            &mut ev,
                            format!("public_port {port} cannot be listened on at the hub: {why}"),
                        );
                        continue;
                    }
                    if ports_held.get(key).copied().unwrap_or(0) >= ctx.max_ports_per_node {
                        refuse(
                            &mut ev,
                            format!(
                                "the node holds {} public ports already (max_ports_per_node)",
                                ctx.max_ports_per_node
                            ),
                        );
                        continue;
                    }
                }
            }
            match groups.get_mut(&host) {
                None => {
                    groups.insert(
                        host.clone(),
                        (s.decl.clone(), vec![s.backend], vec![key.clone()]),
                    );
                }
                Some((first, backends, keys)) => {
                    if keys.contains(key) {
                        // The same node twice cannot happen (declare_services).
                        continue;
                    }
                    let same_name = first.registry_name().is_some()
                        && first.registry_name() == s.decl.registry_name();
                    if !same_name {
                        refuse(&mut ev, format!("`{host}` is taken by node {}", keys[0]));
                        continue;
                    }
                    if first.tls != s.decl.tls
                        || first.proxy_protocol != s.decl.proxy_protocol
                        || first.http2 != s.decl.http2
                        || first.allow != s.decl.allow
                        || first.deny != s.decl.deny
                    {
                        refuse(
                            &mut ev,
                            format!(
                                "`{host}` is served by node {} with other tls/proxy_protocol/http2/allow/deny settings",
                                keys[0]
                            ),
                        );
                        continue;
                    }
                    backends.push(s.backend);
                    keys.push(key.clone());
                }
            }
            if s.decl.protocol != Protocol::Http {
                *ports_held.entry(key).or_default() += 1;
            }
            ev.statuses
                .entry(key.clone())
                .or_default()
                .push(ServiceStatus {
                    host: host.clone(),
                    status: "active".into(),
                    error: None,
                    backend: Some(s.backend.to_string()),
                });
        }
        for (host, (d, backends, _keys)) in groups {
            let list: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
            // The grant's limit, for every service under the name.
            let bandwidth = d
                .registry_name()
                .and_then(|n| self.names.get(n))
                .and_then(|r| r.bandwidth.clone());
            match d.protocol {
                Protocol::Http => ev.routes.push(http_route(&d, list, bandwidth, acme)),
                Protocol::Tcp => ev.tcp.push(RawTcp {
                    listen: format!("0.0.0.0:{}", d.public_port.unwrap_or(0)),
                    backends: list,
                    proxy_protocol: d.proxy_protocol.then_some(RawPp::Bool(true)),
                    allow: d.allow.clone(),
                    deny: d.deny.clone(),
                    bandwidth,
                    ..RawTcp::default()
                }),
                Protocol::Udp => ev.udp.push(RawUdp {
                    listen: format!("0.0.0.0:{}", d.public_port.unwrap_or(0)),
                    backends: list,
                    proxy_protocol: d.proxy_protocol.then_some(RawPp::Bool(true)),
                    allow: d.allow.clone(),
                    deny: d.deny.clone(),
                    bandwidth,
                    ..RawUdp::default()
                }),
            }
            ev.hosts.push(host);
        }
        ev
    }
}

/// What the declared services amount to.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Evaluation {
    /// HTTP routes, one per host, backends from every node serving it.
    pub routes: Vec<RawRoute>,
    pub tcp: Vec<RawTcp>,
    pub udp: Vec<RawUdp>,
    /// The hosts of `routes`, `tcp` and `udp`, in the same order.
    pub hosts: Vec<String>,
    /// Per node key, what became of each declaration.
    pub statuses: BTreeMap<String, Vec<ServiceStatus>>,
}

fn check_peer_name(n: &str) -> Result<()> {
    if n.is_empty()
        || n.len() > 64
        || !n
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(Error::bad(format!(
            "name `{n}`: 1 to 64 letters, digits, `-`, `_`, `.`"
        )));
    }
    Ok(())
}

/// Client address rules (`allow` and `deny` together) of one declared
/// service, and of all of a node's: the state file holds them, and every
/// change writes it whole.
pub const MAX_SERVICE_RULES: usize = 1024;
pub const MAX_NODE_RULES: usize = 4096;

/// Prefixes no node's allowed IPs may touch: routed into a node's tunnel,
/// they would take the hub's own traffic there (`ip route replace`).
const SPECIAL: [IpNet; 9] = [
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 8)),
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8)),
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 0, 0), 16)),
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 4)),
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::BROADCAST, 32)),
    IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 128)),
    IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128)),
    IpNet::V6(Ipv6Net::new_assert(
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        10,
    )),
    IpNet::V6(Ipv6Net::new_assert(
        Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0),
        8,
    )),
];

/// What special addresses `n` holds (loopback, link-local, multicast,
/// unspecified, broadcast: as [`crate::proxy::settings::forbidden_reason`]
/// names them), if any. An IPv4-mapped IPv6 prefix is its IPv4 one.
fn special_prefix(n: &IpNet) -> Option<&'static str> {
    let n = match n {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => v6
            .addr()
            .to_ipv4_mapped()
            .and_then(|a| Ipv4Net::new(a, v6.prefix_len() - 96).ok())
            .map_or(*n, IpNet::V4),
        _ => *n,
    }
    .trunc();
    SPECIAL
        .iter()
        .find(|s| s.contains(&n) || n.contains(*s))
        .map(|s| crate::proxy::settings::forbidden_reason(s.network()).unwrap_or("special"))
}

fn check_decl(i: usize, mut d: ServiceDecl) -> Result<ServiceDecl> {
    let who = |m: String| Error::bad(format!("services #{}: {m}", i + 1));
    match (&d.name, &d.fqdn) {
        (Some(n), None) => {
            api_label(n).map_err(|e| who(e.message))?;
        }
        (None, Some(f)) => {
            api_fqdn(f).map_err(|e| who(e.message))?;
        }
        (None, None) if d.protocol != Protocol::Http => {}
        _ => return Err(who("set exactly one of `name` and `fqdn`".into())),
    }
    match d.protocol {
        Protocol::Http => {
            match d.tls.as_deref() {
                None | Some("terminate") => d.tls = None,
                Some("passthrough") => {}
                Some(o) => {
                    return Err(who(format!(
                        "tls = `{o}`: expected `terminate` or `passthrough`"
                    )))
                }
            }
            if d.public_port.is_some() {
                return Err(who("public_port is for tcp and udp services".into()));
            }
            if d.proxy_protocol && d.tls.is_none() {
                return Err(who(
                    "proxy_protocol is for passthrough (terminated routes send X-Forwarded-For)"
                        .into(),
                ));
            }
            if d.http2 && d.tls.is_some() {
                return Err(who(
                    "http2 is for terminated services (passthrough splices TLS untouched)".into(),
                ));
            }
        }
        Protocol::Tcp | Protocol::Udp => {
            if d.tls.is_some() {
                return Err(who("tls is for http services".into()));
            }
            if d.public_port.is_none() {
                return Err(who("a tcp or udp service needs public_port".into()));
            }
            if d.http2 {
                return Err(who("http2 is for http services".into()));
            }
        }
    }
    if d.allow.len() + d.deny.len() > MAX_SERVICE_RULES {
        return Err(who(format!(
            "allow and deny: at most {MAX_SERVICE_RULES} networks together"
        )));
    }
    // Canonical lists, so replicas that spell the same rules differently agree.
    let rules = crate::proxy::access::Access::parse(&d.allow, &d.deny).map_err(who)?;
    (d.allow, d.deny) = rules.canonical();
    Ok(d)
}

/// The host addresses of `pool` after `ip` (`None` when `ip` is its last).
fn hosts_after(pool: &IpNet, ip: IpAddr) -> Option<ipnet::IpAddrRange> {
    let last = pool.hosts().last()?;
    let next = match ip {
        IpAddr::V4(a) => IpAddr::V4(u32::from(a).checked_add(1)?.into()),
        IpAddr::V6(a) => IpAddr::V6(u128::from(a).checked_add(1)?.into()),
    };
    match (next, last) {
        (IpAddr::V4(n), IpAddr::V4(l)) if n <= l => Some(ipnet::Ipv4AddrRange::new(n, l).into()),
        (IpAddr::V6(n), IpAddr::V6(l)) if n <= l => Some(ipnet::Ipv6AddrRange::new(n, l).into()),
        _ => None,
    }
}

/// Whether `ip` is the all-zeros host of an IPv6 pool (the subnet-router
/// anycast address), which `hosts()` includes for IPv6.
fn is_subnet_anycast(pool: &IpNet, ip: IpAddr) -> bool {
    matches!(pool, IpNet::V6(_)) && ip == pool.network()
}

/// Unix seconds as an RFC 3339 UTC time (`2026-12-03T09:32:15Z`), for
/// messages people read.
pub fn utc(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian calendar),
    // counted in 400-year eras that start on March 1st.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Constant-time equality of two byte strings of equal length.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests;
