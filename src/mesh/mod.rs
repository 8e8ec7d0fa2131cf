//! Hub mesh: any hub serves any name.
//!
//! Each hub with a `[mesh]` section publishes a [`table::HubRecord`] in etcd
//! (its name, its public HTTP and TLS listener addresses, the hosts of its own
//! routes) under a lease that it renews, and watches every other hub's record.
//! A connection for a host this hub has no route for, but another hub has,
//! is sent to that hub as it came: the proxy reads the SNI (TLS) or the
//! `Host` of the first request (plain HTTP), opens a TCP connection to the
//! other hub's listener from this hub's advertised address, writes a PROXY v2
//! header naming the client and the address it connected to, then the bytes
//! read so far, and splices. TLS stays end to end between the client and the
//! hub that holds the route (and its certificate, ACME challenges included).
//!
//! The receiving hub takes the PROXY header from addresses that other hubs'
//! records advertise, and, when the hubs share a secret (`secret_file`),
//! from any address if the header is sealed with it for this hub's name
//! ([`seal`]); it never
//! sends such a connection on again, so a stale record cannot make a loop. When etcd is unreachable each hub keeps
//! the last table it had; a hub that stops revokes its lease (its record goes
//! at once), one that dies loses it after `ttl`. Forwarding tries the hubs that
//! serve a host in turn, starting at a rotating point, and skips for a few
//! seconds a hub that did not answer. A hub whose record says so is asked
//! whether it takes the connection ([`ack`]) and answers before any byte to
//! the client: one that refuses (a stale table, a paused route), closes or
//! says nothing is left like one that did not answer, and the next hub gets
//! the same first bytes.
//!
//! ACME is coordinated through the same etcd ([`acme`], [`share`]): one hub
//! at a time orders a host's certificate, its challenge answers are
//! published so that any hub answers the validation, and (unless
//! `share_certificates = false`) the issued certificate is stored for the
//! other hubs that serve the host.
//!
//! Names granted by the hubs' control planes are claimed in the same etcd
//! ([`claims`]): the first hub to grant a host holds it for its node, so two
//! hubs cannot give one name to two nodes.
//!
//! [`table`], [`ack`], [`acme`] and [`claims`] are the pure cores; [`etcd`] publishes
//! and watches; [`forward`] moves a connection; [`share`] is the ACME side of
//! the store.

pub mod ack;
pub mod acme;
pub mod claims;
pub mod etcd;
pub mod forward;
pub mod seal;
pub mod settings;
pub mod share;
pub mod table;
pub mod vault;

use crate::clock::unix_secs;
use crate::proxy::names::DomainName;
use crate::proxy::stats::Counters;
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::Serialize;
use settings::MeshSettings;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use table::{PeerHub, Table};
use tracing::warn;

/// How long a hub that did not answer is tried only after the others.
pub const SKIP_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// The mesh as the proxy sees it: the current table, counters, status.
pub struct Mesh {
    pub settings: MeshSettings,
    table: ArcSwap<Table>,
    /// Bytes and errors of the connections sent to other hubs (the proxy's
    /// stats entry `mesh`).
    pub counters: Arc<Counters>,
    failed_at: Mutex<HashMap<String, Instant>>,
    status: Mutex<Status>,
    forwarded: AtomicU64,
    received: AtomicU64,
    /// Tries of another hub that refused a connection ([`ack`]), and of one
    /// that closed it, answered nothing in its time or something else.
    refused: AtomicU64,
    unacknowledged: AtomicU64,
    /// Connections another hub sent that this one refused.
    declined: AtomicU64,
    bad_records: AtomicU64,
    /// The etcd client and lease of the running session (for the ACME side).
    session: Mutex<Option<(etcd_client::Client, i64)>>,
    /// The shared ACME keys as last seen.
    acme: parking_lot::RwLock<acme::Shared>,
    /// Woken when a shared certificate or a lock changes.
    acme_kick: Mutex<Option<Arc<tokio::sync::Notify>>>,
    /// Validations answered with another hub's challenge answer.
    acme_answered: AtomicU64,
    /// The mesh secrets as keys (`[mesh] secret_file`), the sealing one first.
    seal: Vec<seal::SealKey>,
    /// The same secrets as keys for shared certificates' private keys.
    vault: Vec<vault::VaultKey>,
    /// Sealed headers refused: replayed, or from another hub's address
    /// with a bad MAC or time (strangers' bad seals are not news).
    bad_seals: AtomicU64,
    /// Seals taken lately (replays are refused).
    replay: Mutex<seal::ReplayGuard>,
    /// When this hub started remembering seals (Unix seconds): one made
    /// before is refused, since the seals taken then are forgotten.
    replay_since: u64,
    /// When the replay guard was last found full (Unix seconds; logged at
    /// most once a minute).
    replay_full: AtomicU64,
    /// The name claims as last seen.
    names: parking_lot::RwLock<claims::Claims>,
    /// Woken when a name claim changes (the control plane re-checks).
    names_kick: Arc<tokio::sync::Notify>,
    /// What this hub's grants ask for (set by the control plane; none: this
    /// hub grants no names).
    claim_source: Mutex<Option<ClaimSource>>,
    /// The claims have been read from etcd since the hub started.
    names_read: std::sync::atomic::AtomicBool,
    /// Hosts this hub grants that another hub's claim holds for another node.
    conflicts: Mutex<Vec<claims::Conflict>>,
    /// When another hub was last seen publishing under this hub's name.
    name_clash_at: Mutex<Option<Instant>>,
    /// Where the claims last seen are kept across restarts (the control
    /// plane's state directory), and whether they changed since written.
    claims_cache: Mutex<Option<std::path::PathBuf>>,
    names_dirty: std::sync::atomic::AtomicBool,
}

/// How long after another hub was seen under this hub's name no claim is
/// written (the two would rewrite each other's claims).
pub const NAME_CLASH_HOLD: Duration = Duration::from_secs(60);

/// What this hub's control plane grants, as wanted claims at the given
/// time. `None`: the control plane is gone (nothing is written then).
pub type ClaimSource = Arc<dyn Fn(u64) -> Option<claims::Wants> + Send + Sync>;

/// Most seals remembered per generation of the replay guard (about 2,000
/// sealed connections a second between hubs).
pub const REPLAY_CAP: usize = 262_144;

#[derive(Debug, Default, Clone, Serialize)]
struct Status {
    etcd_connected: bool,
    last_error: Option<String>,
    published_hosts: usize,
}

/// One other hub in `gatewire show`.
#[derive(Debug, Serialize)]
pub struct HubView {
    pub name: String,
    pub hosts: usize,
    pub http: Vec<SocketAddr>,
    pub https: Vec<SocketAddr>,
}

/// The mesh section of `gatewire show --json`.
#[derive(Debug, Serialize)]
pub struct MeshView {
    pub name: String,
    pub etcd_connected: bool,
    pub last_error: Option<String>,
    pub published_hosts: usize,
    pub hubs: Vec<HubView>,
    /// Connections sent to another hub.
    pub forwarded: u64,
    /// Connections another hub sent here.
    pub received: u64,
    /// Tries of another hub that answered it would not serve the
    /// connection (no route, paused, ...): the next hub was tried.
    pub refused: u64,
    /// Tries of another hub asked for an acknowledgement that closed the
    /// connection, answered nothing in its time, or something else.
    pub unacknowledged: u64,
    /// Connections another hub sent here that this hub refused.
    pub declined: u64,
    /// Records of other hubs that were not used (malformed).
    pub bad_records: u64,
    /// ACME certificates stored in the mesh.
    pub acme_certificates: usize,
    /// Hosts whose certificate a hub is ordering now, and that hub.
    pub acme_orders: Vec<AcmeOrder>,
    /// ACME validations this hub answered for another hub's order.
    pub acme_answered: u64,
    /// The hubs share a secret and seal their PROXY headers.
    pub sealed: bool,
    /// Sealed PROXY headers refused (another secret, changed, too old).
    pub bad_seals: u64,
    /// Name claims in the mesh, and how many this hub wrote.
    pub name_claims: usize,
    pub own_name_claims: usize,
    /// Hosts this hub grants that another hub's claim holds for another node.
    pub name_conflicts: Vec<NameConflict>,
}

/// A host granted here that the mesh holds for another node.
#[derive(Debug, Serialize)]
pub struct NameConflict {
    pub host: String,
    /// The node this hub grants it to.
    pub granted_to: String,
    /// The node the claim names, and the hub that wrote it.
    pub held_by: String,
    pub hub: String,
}

/// A certificate being ordered in the mesh.
#[derive(Debug, Serialize)]
pub struct AcmeOrder {
    pub host: String,
    pub hub: String,
}

impl Mesh {
    pub fn new(settings: MeshSettings) -> Arc<Mesh> {
        Arc::new(Mesh {
            table: ArcSwap::from_pointee(Table::default()),
            counters: Arc::new(Counters::default()),
            failed_at: Mutex::new(HashMap::new()),
            status: Mutex::new(Status::default()),
            forwarded: AtomicU64::new(0),
            received: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            unacknowledged: AtomicU64::new(0),
            declined: AtomicU64::new(0),
            bad_records: AtomicU64::new(0),
            session: Mutex::new(None),
            acme: parking_lot::RwLock::new(acme::Shared::default()),
            acme_kick: Mutex::new(None),
            acme_answered: AtomicU64::new(0),
            seal: settings
                .secret
                .iter()
                .flat_map(|s| &s.0)
                .filter_map(|k| seal::SealKey::new(k).ok())
                .collect(),
            vault: settings
                .secret
                .iter()
                .flat_map(|s| &s.0)
                .map(|k| vault::VaultKey::new(k))
                .collect(),
            bad_seals: AtomicU64::new(0),
            replay: Mutex::new(seal::ReplayGuard::new(REPLAY_CAP)),
            replay_since: unix_secs(),
            replay_full: AtomicU64::new(0),
            names: parking_lot::RwLock::new(claims::Claims::new()),
            names_kick: Arc::new(tokio::sync::Notify::new()),
            claim_source: Mutex::new(None),
            names_read: std::sync::atomic::AtomicBool::new(false),
            conflicts: Mutex::new(Vec::new()),
            name_clash_at: Mutex::new(None),
            claims_cache: Mutex::new(None),
            names_dirty: std::sync::atomic::AtomicBool::new(false),
            settings,
        })
    }

    /// Replaces the table (and forgets failures of hubs no longer in it).
    pub fn set_table(&self, t: Table) {
        self.failed_at
            .lock()
            .retain(|name, _| t.hubs().iter().any(|h| &h.name == name));
        self.table.store(Arc::new(t));
    }

    /// Whether `ip` is another hub's (its connections carry a PROXY header).
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.table.load().trusts(ip)
    }

    /// The key this hub seals with, when the hubs share a secret.
    pub fn seal_key(&self) -> Option<&seal::SealKey> {
        self.seal.first()
    }

    /// Checks a hub's sealed PROXY header against each secret, for this
    /// hub's name, and that it was not taken before. `known`: it came from another hub's advertised
    /// address. Counted in `bad_seals` when it was replayed, or came from a
    /// known address and does not hold, or the replay guard is full and it
    /// did not come from a known address (a seal that cannot be remembered
    /// could be a copy: only the hubs' own addresses are taken on trust).
    pub fn check_seal(&self, header: &[u8], known: bool) -> Result<(), String> {
        let now = unix_secs();
        let mut last = seal::SealError::Missing;
        let mut ok = false;
        for k in &self.seal {
            match seal::verify(k, &self.settings.name, header, now) {
                Ok(_) => {
                    ok = true;
                    break;
                }
                Err(e) => last = e,
            }
        }
        if !ok {
            if known {
                self.bad_seals.fetch_add(1, Relaxed);
            }
            return Err(last.to_string());
        }
        let id = seal::seal_id(header).ok_or("no seal")?;
        // A seal of the second before the start passes: the time has a
        // second's resolution, and a restart takes longer than that.
        let at = seal::sealed_at(header).ok_or("no seal")?;
        if at.saturating_add(1) < self.replay_since {
            self.bad_seals.fetch_add(1, Relaxed);
            return Err(seal::SealError::BeforeStart(at, self.replay_since).to_string());
        }
        // The clock is read again under the lock, so the guard sees times
        // in order (one read before it could predate a generation another
        // connection has just started).
        let admitted = {
            let mut guard = self.replay.lock();
            guard.admit(id, unix_secs())
        };
        match admitted {
            seal::Admit::New => Ok(()),
            seal::Admit::Full => {
                let last = self.replay_full.load(Relaxed);
                if now >= last.saturating_add(60)
                    && self
                        .replay_full
                        .compare_exchange(last, now, Relaxed, Relaxed)
                        .is_ok()
                {
                    tracing::warn!(
                        cap = REPLAY_CAP,
                        "mesh: more sealed connections than the replay guard holds; until it empties, only those from other hubs' addresses are taken"
                    );
                }
                if known {
                    Ok(())
                } else {
                    self.bad_seals.fetch_add(1, Relaxed);
                    Err("the replay guard is full".to_string())
                }
            }
            seal::Admit::Replayed => {
                self.bad_seals.fetch_add(1, Relaxed);
                Err(seal::SealError::Replayed.to_string())
            }
        }
    }

    /// True when no other hub serves anything (nothing to look up).
    pub fn is_empty(&self) -> bool {
        self.table.load().is_empty()
    }

    /// The public addresses of the other hubs that answer the gateway zones
    /// (`[proxy.dns]`), as their records last said.
    pub fn dns_addrs(&self) -> Vec<IpAddr> {
        self.table.load().dns_addrs().to_vec()
    }

    /// Whether another hub serves `host` (no side effects: the forwarding
    /// rotation stays where it is).
    pub fn serves(&self, host: &DomainName) -> bool {
        !self.table.load().lookup(host).is_empty()
    }

    /// Whether another hub serves a name strictly below `name` (lowercase,
    /// no trailing dot).
    pub fn serves_below(&self, name: &str) -> bool {
        self.table.load().has_below(name)
    }

    /// The hubs to try for `client`'s connection to `host`, in order: from
    /// the client's own hub ([`forward::first_hub`]: one client keeps going
    /// to one hub, clients spread over all), those that failed within
    /// [`SKIP_AFTER_FAILURE`] last.
    pub fn candidates(&self, host: &DomainName, client: IpAddr) -> Vec<Arc<PeerHub>> {
        let t = self.table.load();
        let hubs = t.lookup(host);
        if hubs.is_empty() {
            return Vec::new();
        }
        let start = forward::first_hub(hubs.len(), client);
        let mut v: Vec<Arc<PeerHub>> = hubs
            .iter()
            .cycle()
            .skip(start)
            .take(hubs.len())
            .cloned()
            .collect();
        let failed = self.failed_at.lock();
        if !failed.is_empty() {
            let recent = |h: &Arc<PeerHub>| {
                failed
                    .get(&h.name)
                    .is_some_and(|t| t.elapsed() < SKIP_AFTER_FAILURE)
            };
            v.sort_by_key(recent);
        }
        v
    }

    pub(crate) fn note_failure(&self, hub: &str) {
        self.failed_at
            .lock()
            .insert(hub.to_string(), Instant::now());
    }

    pub(crate) fn note_success(&self, hub: &str) {
        let mut f = self.failed_at.lock();
        if !f.is_empty() {
            f.remove(hub);
        }
        self.forwarded.fetch_add(1, Relaxed);
    }

    pub(crate) fn note_received(&self) {
        self.received.fetch_add(1, Relaxed);
    }

    /// A hub asked to acknowledge a connection did not take it.
    pub(crate) fn note_unaccepted(&self, f: ack::Failure) {
        if f.is_refusal() {
            self.refused.fetch_add(1, Relaxed);
        } else {
            self.unacknowledged.fetch_add(1, Relaxed);
        }
    }

    /// This hub refused a connection another hub sent.
    pub(crate) fn note_declined(&self) {
        self.declined.fetch_add(1, Relaxed);
    }

    pub(crate) fn note_bad_record(&self) {
        self.bad_records.fetch_add(1, Relaxed);
    }

    pub(crate) fn set_connected(&self, up: bool, error: Option<String>) {
        let mut s = self.status.lock();
        s.etcd_connected = up;
        if error.is_some() || up {
            s.last_error = error;
        }
    }

    pub(crate) fn etcd_connected(&self) -> bool {
        self.status.lock().etcd_connected
    }

    pub(crate) fn set_published(&self, hosts: usize) {
        self.status.lock().published_hosts = hosts;
    }

    pub(crate) fn note_name_clash(&self) {
        *self.name_clash_at.lock() = Some(Instant::now());
    }

    /// Another hub published under this hub's name within [`NAME_CLASH_HOLD`].
    pub(crate) fn name_clash_recent(&self) -> bool {
        self.name_clash_at
            .lock()
            .is_some_and(|t| t.elapsed() < NAME_CLASH_HOLD)
    }

    /// Claims this hub wrote.
    pub fn own_name_claims(&self) -> usize {
        let me = &self.settings.name;
        self.names
            .read()
            .values()
            .filter(|(c, _)| c.as_ref().is_some_and(|c| &c.hub == me))
            .count()
    }

    /// The control plane tells the driver what its grants ask for.
    pub fn set_claim_source(&self, f: ClaimSource) {
        *self.claim_source.lock() = Some(f);
    }

    pub(crate) fn claim_source(&self) -> Option<ClaimSource> {
        self.claim_source.lock().clone()
    }

    /// Notified when a claim changes or a conflict comes or goes.
    pub fn names_changed(&self) -> Arc<tokio::sync::Notify> {
        self.names_kick.clone()
    }

    /// Why `owner` may not serve the registry name `name` on this hub (with
    /// gateway `domains`), if another hub's claim holds one of its hosts for
    /// another node. See [`claims::refusal`].
    pub fn name_refusal(
        &self,
        name: &str,
        owner: &str,
        domains: &[DomainName],
        now: u64,
    ) -> Option<String> {
        let c = self.names.read();
        if c.is_empty() {
            return None;
        }
        claims::refusal(&self.settings.name, name, owner, domains, &c, now)
    }

    /// Whether the claims have been read from etcd since the hub started
    /// (before that, nothing is known to refuse).
    pub fn names_read(&self) -> bool {
        self.names_read.load(Relaxed)
    }

    /// The host of a key under `<prefix>names/`.
    fn name_host(&self, key: &[u8]) -> Result<DomainName, claims::ClaimError> {
        let prefix = self.settings.names_prefix();
        std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix(prefix.as_str()))
            .ok_or(claims::ClaimError::Key)
            .and_then(claims::decode_key)
    }

    /// One key and value under `<prefix>names/`: the host and its entry (a
    /// value that does not decode holds the host as unreadable).
    fn name_entry(
        &self,
        key: &[u8],
        value: &[u8],
    ) -> Result<(DomainName, claims::Entry), claims::ClaimError> {
        let host = self.name_host(key)?;
        match claims::decode(value) {
            Ok(c) => Ok((host, (Some(c), value.to_vec()))),
            Err(e) => {
                self.bad_name(key, &e);
                Ok((host, (None, value.to_vec())))
            }
        }
    }

    fn bad_name(&self, key: &[u8], e: &claims::ClaimError) {
        self.note_bad_record();
        warn!(key = %String::from_utf8_lossy(key), error = %e, "mesh: name claim not used");
    }

    /// Applies a put or delete under `<prefix>names/` read from the watch.
    /// Bad keys are counted and logged and left out; a bad value is counted
    /// and logged (never the value) and holds its host as unreadable.
    pub(crate) fn apply_name(&self, key: &[u8], value: Option<&[u8]>) {
        let changed = match value {
            Some(v) => match self.name_entry(key, v) {
                Ok((h, e)) => self.names.write().insert(h, e.clone()) != Some(e),
                Err(e) => {
                    self.bad_name(key, &e);
                    false
                }
            },
            None => self
                .name_host(key)
                .is_ok_and(|h| self.names.write().remove(&h).is_some()),
        };
        if changed {
            self.names_dirty.store(true, Relaxed);
            self.names_kick.notify_one();
        }
    }

    /// Keeps the claims in `path` across restarts, and loads the ones kept
    /// there now: until the claims are read from etcd again, the control
    /// plane's verdicts go by them (grants still wait for etcd). A missing
    /// or unreadable file loads nothing (logged when unreadable).
    pub fn use_claims_cache(&self, path: std::path::PathBuf) {
        match std::fs::read(&path) {
            Ok(bytes) => match claims::decode_cache(&bytes, &self.settings.prefix) {
                Ok(kvs) => {
                    let mut names = self.names.write();
                    if names.is_empty() {
                        let n = kvs.len();
                        *names = kvs;
                        tracing::info!(claims = n, file = %path.display(), "mesh: name claims of the last session loaded (until etcd is read)");
                    }
                }
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "mesh: saved name claims not used")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(file = %path.display(), error = %e, "mesh: saved name claims not read"),
        }
        *self.claims_cache.lock() = Some(path);
        self.names_kick.notify_one();
    }

    /// Writes the claims to the cache file when they changed since the
    /// last write (a temporary file synced and renamed over it).
    pub(crate) fn save_claims(&self) {
        let Some(path) = self.claims_cache.lock().clone() else {
            return;
        };
        if !self.names_dirty.swap(false, Relaxed) {
            return;
        }
        let bytes = claims::encode_cache(&self.names.read(), &self.settings.prefix);
        if let Err(e) = crate::control::pin::write_atomic(&path, &bytes, 0o644) {
            self.names_dirty.store(true, Relaxed);
            warn!(file = %path.display(), error = %e, "mesh: name claims not saved");
        }
    }

    /// Replaces the claims with those of a fresh read of the prefix.
    pub(crate) fn load_names<'a>(&self, kvs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) {
        let mut fresh = claims::Claims::new();
        for (k, v) in kvs {
            match self.name_entry(k, v) {
                Ok((h, e)) => {
                    fresh.insert(h, e);
                }
                Err(e) => self.bad_name(k, &e),
            }
        }
        *self.names.write() = fresh;
        self.names_read.store(true, Relaxed);
        self.names_dirty.store(true, Relaxed);
        self.names_kick.notify_one();
    }

    /// [`claims::plan`] for this hub's `wants` against the claims as last
    /// seen (read in place, not copied).
    pub(crate) fn plan_claims(
        &self,
        wants: &claims::Wants,
        now: u64,
    ) -> (Vec<(DomainName, claims::Action)>, Vec<claims::Conflict>) {
        claims::plan(&self.settings.name, wants, &self.names.read(), now)
    }

    /// Keeps the conflicts of the last plan; logs new ones, notifies on change.
    pub(crate) fn set_conflicts(&self, now: Vec<claims::Conflict>) {
        let mut cur = self.conflicts.lock();
        if *cur == now {
            return;
        }
        for c in now.iter().filter(|c| !cur.contains(c)) {
            match &c.held {
                Some(h) => warn!(
                    host = %c.host,
                    granted_to = %c.want,
                    held_by = %h.owner,
                    hub = %h.hub,
                    "mesh: a host granted here is held in the mesh for another node; its routes stay off on this hub"
                ),
                None => warn!(
                    host = %c.host,
                    granted_to = %c.want,
                    "mesh: a host granted here has a claim in the mesh that cannot be read; its routes stay off on this hub until it is deleted"
                ),
            }
        }
        *cur = now;
        drop(cur);
        self.names_kick.notify_one();
    }

    /// For `gatewire show`.
    pub fn view(&self) -> MeshView {
        let s = self.status.lock().clone();
        let t = self.table.load();
        let (acme_certificates, acme_orders) = {
            let a = self.acme.read();
            let orders = a
                .locks()
                .into_iter()
                .map(|(host, hub)| AcmeOrder { host, hub })
                .collect();
            (a.certs(), orders)
        };
        MeshView {
            name: self.settings.name.clone(),
            etcd_connected: s.etcd_connected,
            last_error: s.last_error,
            published_hosts: s.published_hosts,
            hubs: t
                .hubs()
                .iter()
                .map(|h| HubView {
                    name: h.name.clone(),
                    hosts: h.hosts,
                    http: h.http.clone(),
                    https: h.https.clone(),
                })
                .collect(),
            forwarded: self.forwarded.load(Relaxed),
            received: self.received.load(Relaxed),
            refused: self.refused.load(Relaxed),
            unacknowledged: self.unacknowledged.load(Relaxed),
            declined: self.declined.load(Relaxed),
            bad_records: self.bad_records.load(Relaxed),
            acme_certificates,
            acme_orders,
            acme_answered: self.acme_answered.load(Relaxed),
            sealed: !self.seal.is_empty(),
            bad_seals: self.bad_seals.load(Relaxed),
            name_claims: self.names.read().len(),
            own_name_claims: self.own_name_claims(),
            name_conflicts: self
                .conflicts
                .lock()
                .iter()
                .map(|c| NameConflict {
                    host: c.host.to_string(),
                    granted_to: c.want.clone(),
                    held_by: c.held.as_ref().map_or("?", |h| &h.owner).to_string(),
                    hub: c.held.as_ref().map_or("?", |h| &h.hub).to_string(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::table::HubRecord;
    use super::*;

    fn mesh() -> Arc<Mesh> {
        let raw: settings::RawMesh = toml::from_str(
            "name = \"a\"\netcd = [\"http://192.0.2.9:2379\"]\nadvertise = [\"198.51.100.1\"]\n",
        )
        .unwrap();
        Mesh::new(settings::validate(raw, std::path::Path::new("/"), true).unwrap())
    }

    /// A mesh named "a" with a secret, and the directory of its secret file.
    fn sealed_mesh(tag: &str) -> (Arc<Mesh>, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("gw-mesh-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("s.key"), "0123456789abcdef0123456789abcdef\n").unwrap();
        let raw: settings::RawMesh = toml::from_str(
            "name = \"a\"\netcd = [\"http://192.0.2.9:2379\"]\nadvertise = [\"198.51.100.1\"]\nsecret_file = \"s.key\"\n",
        )
        .unwrap();
        (Mesh::new(settings::validate(raw, &dir, true).unwrap()), dir)
    }

    #[test]
    fn a_seal_made_before_a_restart_is_refused_after_it() {
        let (m, dir) = sealed_mesh("restart");
        let at = |secs_ago: u64| {
            seal::seal(
                m.seal_key().unwrap(),
                "a",
                "192.0.2.1:5000".parse().unwrap(),
                "198.51.100.1:80".parse().unwrap(),
                unix_secs() - secs_ago,
                [7; 8],
                false,
            )
        };
        let old = at(30);
        // A hub that started before the seal was made takes it once.
        let mut was = Mesh::new(m.settings.clone());
        Arc::get_mut(&mut was).unwrap().replay_since -= 60;
        assert_eq!(was.check_seal(&old, true), Ok(()));
        assert!(was.check_seal(&old, true).is_err());
        // The restarted hub has forgotten it, but refuses it by its time.
        let e = m.check_seal(&old, true).unwrap_err();
        assert!(e.contains("before this hub started"), "{e}");
        assert_eq!(m.bad_seals.load(Relaxed), 1);
        // A fresh one (or one of the second before the start) is taken.
        assert_eq!(m.check_seal(&at(0), false), Ok(()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_replay_guard_takes_seals_only_from_hubs() {
        let (m, dir) = sealed_mesh("full");
        *m.replay.lock() = seal::ReplayGuard::new(1);
        let header = |n: u8| {
            seal::seal(
                m.seal_key().unwrap(),
                "a",
                "192.0.2.1:5000".parse().unwrap(),
                "198.51.100.1:80".parse().unwrap(),
                unix_secs(),
                [n; 8],
                false,
            )
        };
        let (h1, h2) = (header(1), header(2));
        assert_eq!(m.check_seal(&h1, false), Ok(()));
        assert!(m.check_seal(&h1, true).is_err(), "replayed");
        assert_eq!(m.bad_seals.load(Relaxed), 1);
        // Full: a stranger's seal could be a copy and is refused; a hub's
        // own address is taken (unremembered).
        assert!(m.check_seal(&h2, false).is_err());
        assert_eq!(m.bad_seals.load(Relaxed), 2);
        assert_eq!(m.check_seal(&h2, true), Ok(()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_seal_made_for_another_hub_is_refused() {
        let (m, dir) = sealed_mesh("other-hub");
        let header = |to: &str| {
            seal::seal(
                m.seal_key().unwrap(),
                to,
                "192.0.2.1:5000".parse().unwrap(),
                "198.51.100.1:80".parse().unwrap(),
                unix_secs(),
                [1; 8],
                false,
            )
        };
        // The same secret, the same time and nonce: only the name differs.
        let (for_b, for_a) = (header("b"), header("a"));
        let e = m.check_seal(&for_b, false).unwrap_err();
        assert_eq!(e, seal::SealError::Mac.to_string());
        // A stranger's is not news; one from a hub's address is counted.
        assert_eq!(m.bad_seals.load(Relaxed), 0);
        assert!(m.check_seal(&for_b, true).is_err());
        assert_eq!(m.bad_seals.load(Relaxed), 1);
        assert_eq!(m.check_seal(&for_a, false), Ok(()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn candidates_keep_a_client_on_its_hub_and_recent_failures_go_last() {
        let m = mesh();
        let rec = |n: &str, ip: &str| {
            HubRecord::local(
                n,
                &[ip.parse().unwrap()],
                &["0.0.0.0:80".parse().unwrap()],
                &[],
                ["x.gw.test".into()],
            )
        };
        let (b, c) = (rec("b", "198.51.100.2"), rec("c", "198.51.100.3"));
        m.set_table(Table::build("a", [&b, &c]));
        let host = DomainName::parse("x.gw.test").unwrap();
        let client = |i: u8| IpAddr::from([192, 0, 2, i]);
        // One client, one hub, every time; clients spread over both.
        let first = |i: u8| m.candidates(&host, client(i))[0].name.clone();
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..32 {
            let f = first(i);
            assert!((0..3).all(|_| first(i) == f), "client {i} moved");
            seen.insert(f);
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
        // A hub that just failed comes last for every client, those that
        // started at it included.
        m.note_failure("b");
        for i in 0..32 {
            let v = m.candidates(&host, client(i));
            assert_eq!(v.len(), 2);
            assert_eq!(v[0].name, "c", "client {i}");
            assert_eq!(v[1].name, "b");
        }
        m.note_success("b");
        assert_eq!(seen, (0..32).map(first).collect());
        assert!(m
            .candidates(&DomainName::parse("y.gw.test").unwrap(), client(1))
            .is_empty());
        assert!(m.trusts("198.51.100.3".parse().unwrap()));
        assert_eq!(m.view().hubs.len(), 2);
        assert_eq!(m.view().forwarded, 1);
    }
}
