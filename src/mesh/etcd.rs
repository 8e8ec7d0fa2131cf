//! The mesh's driver: publishes this hub's record in etcd under a lease and
//! keeps the table of the other hubs' records up to date from a watch.

use super::table::{decode_record, valid_name, HubRecord, Table};
use super::Mesh;
use crate::backoff::Backoff;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// What this hub publishes now: called every [`PUBLISH_EVERY`], the record
/// is written when it changed.
pub type Local = Arc<dyn Fn() -> HubRecord + Send + Sync>;

/// How often this hub's own record is compared with what it published.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// Longest wait between reconnection attempts, and between attempts to
/// write this hub's record within a session.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A session up at least this long starts the next one's wait afresh.
pub const SESSION_STABLE: Duration = Duration::from_secs(60);
/// How often the watch is asked for its progress (etcd answers at once).
pub const WATCH_PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// A watch that sent nothing for this long, progress asked for meanwhile,
/// ends the session (a member cut off from its cluster, a stalled stream).
pub const WATCH_SILENCE: Duration = Duration::from_secs(15);
/// Longest wait for etcd to revoke the lease when the driver stops.
pub const REVOKE_WAIT: Duration = Duration::from_secs(2);

/// The running driver; [`Driver::stop`] revokes the lease (the record goes at once).
pub struct Driver {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Driver {
    /// Starts publishing and watching; reconnects on its own.
    pub fn start(mesh: Arc<Mesh>, local: Local) -> Driver {
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(run(mesh, local, rx));
        Driver { stop, task }
    }

    /// Revokes the lease (waits at most [`REVOKE_WAIT`] for etcd), ends the
    /// driver, then stops sending connections to other hubs.
    pub async fn stop(self, mesh: &Mesh) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(REVOKE_WAIT + Duration::from_secs(1), &mut task)
            .await
            .is_err()
        {
            task.abort();
            let _ = task.await;
        }
        // (After the driver ended: nothing sets a table after this.)
        mesh.set_table(Table::default());
    }
}

/// A draw in `[0, 1]` for the retry delays' jitter.
fn jitter() -> f64 {
    f64::from(rand_core::RngCore::next_u32(&mut rand_core::OsRng)) / f64::from(u32::MAX)
}

/// The session retry delays: 1 s doubling to [`MAX_BACKOFF`], jittered,
/// afresh after a session up for [`SESSION_STABLE`].
fn session_backoff() -> Backoff {
    Backoff::new(Duration::from_secs(1), MAX_BACKOFF, SESSION_STABLE)
}

async fn run(mesh: Arc<Mesh>, local: Local, mut stop: watch::Receiver<bool>) {
    let mut backoff = session_backoff();
    let mut last_error = String::new();
    // The other hubs' records, kept across sessions (the table serves on).
    let mut records = BTreeMap::new();
    // The last session's lease: the next session takes it on while etcd
    // still holds it, so this hub's record, ACME lock and challenge answers
    // outlive a dropped connection or watch.
    let mut lease = None;
    // The last session's client: revokes the lease when the driver stops.
    let mut client = None;
    loop {
        let mut up_since = None;
        let r = tokio::select! {
            // (A stop first, also in the middle of a session's setup.)
            biased;
            _ = stop.changed() => None,
            e = session(&mesh, &local, &mut records, &mut lease, &mut client, &mut up_since) => Some(e),
        };
        mesh.set_session(None);
        // What the session read is kept for a restart without etcd.
        mesh.save_claims();
        let Some(e) = r else { break };
        let e = format!("{e:#}");
        mesh.set_connected(false, Some(e.clone()));
        let up_for = up_since.map_or(Duration::ZERO, |t: std::time::Instant| t.elapsed());
        let delay = backoff.next_delay(up_for, jitter());
        if e != last_error {
            warn!(error = %e, etcd = ?mesh.settings.etcd, retry_in = ?delay, "mesh: etcd session ended; keeping the last table, retrying");
            last_error = e;
        }
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    withdraw(client, lease).await;
}

/// Revokes `lease` through `client` (the record, an ACME lock and challenge
/// answers go at once), waiting at most [`REVOKE_WAIT`]; else they go after
/// `ttl`.
async fn withdraw(client: Option<Client>, lease: Option<i64>) {
    let (Some(mut client), Some(lease)) = (client, lease) else {
        return;
    };
    match tokio::time::timeout(REVOKE_WAIT, client.lease_revoke(lease)).await {
        Ok(Ok(_)) => info!("mesh: record withdrawn"),
        // Expired meanwhile: gone already.
        Ok(Err(e)) if e.to_string().contains("lease not found") => {
            info!("mesh: record withdrawn")
        }
        Ok(Err(e)) => {
            warn!(error = %e, "mesh: lease not revoked; this hub's record goes after ttl")
        }
        Err(_) => warn!(
            "mesh: lease not revoked: etcd did not answer in time; this hub's record goes after ttl"
        ),
    }
}

fn options(mesh: &Mesh) -> ConnectOptions {
    let s = &mesh.settings;
    let mut o = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
        // A member cut off from its cluster fails requests and ends watches
        // instead of answering from what it had.
        .with_require_leader(true);
    if let Some((u, p)) = &s.user {
        // etcd's auth tokens expire (5 minutes by default) and are checked
        // on each request, not on the lease's keep-alives or an open watch:
        // a quiet hub would find its next lock or publish refused for good.
        o = o
            .with_user(u.clone(), p.clone())
            .with_auto_token_refresh(true);
    }
    if let Some(ca) = &s.ca_pem {
        o = o.with_tls(TlsOptions::new().ca_certificate(Certificate::from_pem(ca.clone())));
    }
    o
}

/// What one key-value of the store says.
struct Kv<'a> {
    key: &'a [u8],
    /// `None`: deleted.
    value: Option<&'a [u8]>,
    /// The lease it was written with.
    lease: i64,
}

/// Applies `kv` to the records by hub name (bad ones are counted, logged and
/// left out; `quiet`: no log of hubs joining and leaving). True when it
/// deleted or overwrote this hub's own record (to be written again).
fn apply(
    mesh: &Mesh,
    records: &mut BTreeMap<String, HubRecord>,
    prefix: &str,
    kv: Kv<'_>,
    own_lease: i64,
    quiet: bool,
) -> bool {
    let Kv { key, value, lease } = kv;
    let Some(name) = std::str::from_utf8(key)
        .ok()
        .and_then(|k| k.strip_prefix(prefix))
        .filter(|n| valid_name(n))
    else {
        mesh.note_bad_record();
        warn!(key = %String::from_utf8_lossy(key), "mesh: a key under the prefix that names no hub; ignored");
        return false;
    };
    let own = name == mesh.settings.name;
    let Some(value) = value else {
        if own {
            warn!(hub = %name, "mesh: this hub's record was deleted; writing it again");
            return true;
        }
        if records.remove(name).is_some() && !quiet {
            info!(hub = %name, "mesh: hub left");
        }
        return false;
    };
    if own {
        if lease != own_lease {
            warn!(hub = %name, "mesh: another hub publishes under this hub's name; give each hub its own [mesh] name");
            mesh.note_name_clash();
            return true;
        }
        return false;
    }
    match decode_record(name, value) {
        Ok(r) => {
            let old = records.insert(name.to_string(), r);
            if old.is_none() && !quiet {
                info!(hub = %name, "mesh: hub joined");
            }
        }
        Err(e) => {
            mesh.note_bad_record();
            records.remove(name);
            warn!(hub = %name, error = %e, "mesh: record not used");
        }
    }
    false
}

/// Longest record this hub writes (etcd refuses requests over 1.5 MiB by
/// default): beyond it, hosts are left out, and that is logged.
pub const MAX_PUBLISH: usize = 1024 * 1024;

/// Largest answer read from etcd (the records of every hub at once).
pub const MAX_READ: usize = 256 * 1024 * 1024;

/// Least time between two rewrites of this hub's record after someone else
/// wrote or deleted it.
pub const REWRITE_EVERY: Duration = Duration::from_secs(10);

/// `rec` cut down to at most [`MAX_PUBLISH`] bytes and
/// [`crate::mesh::table::MAX_HOSTS`] hosts by leaving out hosts from the end:
/// its encoding, the record, and the number left out.
fn fit(mut rec: HubRecord) -> (Vec<u8>, HubRecord, usize) {
    let all = rec.hosts.len();
    rec.hosts.truncate(crate::mesh::table::MAX_HOSTS);
    loop {
        let bytes = rec.encode();
        if bytes.len() <= MAX_PUBLISH || rec.hosts.is_empty() {
            let left_out = all - rec.hosts.len();
            return (bytes, rec, left_out);
        }
        // Keep the share that fits, a little less.
        let keep = rec.hosts.len() * MAX_PUBLISH / bytes.len();
        rec.hosts.truncate(keep.saturating_sub(1));
    }
}

/// Writes `rec` under `key` with `lease` unless it is what was published last.
async fn publish(
    mesh: &Mesh,
    client: &mut Client,
    key: &str,
    lease: i64,
    rec: HubRecord,
    published: &mut Option<Vec<u8>>,
) -> anyhow::Result<()> {
    let (bytes, rec, left_out) = fit(rec);
    if published.as_deref() == Some(bytes.as_slice()) {
        return Ok(());
    }
    if left_out > 0 {
        warn!(
            published = rec.hosts.len(),
            left_out,
            "mesh: too many hosts for one record; the rest are not served through other hubs"
        );
    }
    client
        .put(
            key,
            bytes.clone(),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
    *published = Some(bytes);
    mesh.set_published(rec.hosts.len());
    Ok(())
}

/// A task aborted when this is dropped: it lives no longer than the session
/// that started it (a keep-alive outliving its session would hold the old
/// lease, and the keys under it, for ever).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps `lease` alive every `every` until a keep-alive fails or etcd says
/// the lease is gone; returns why. A task of its own, so that nothing else
/// the session waits for (a slow read or write) delays a keep-alive.
async fn keep_lease(
    mut keeper: LeaseKeeper,
    mut alive: LeaseKeepAliveStream,
    lease: i64,
    every: Duration,
) -> anyhow::Error {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = keeper.keep_alive().await {
                    return e.into();
                }
            }
            m = alive.message() => match m {
                Ok(Some(r)) if r.ttl() > 0 => {}
                Ok(_) => return anyhow::anyhow!("lease {lease:x} expired"),
                Err(e) => return e.into(),
            },
        }
    }
}

/// Writes the name claims every [`PUBLISH_EVERY`] and saves them to the
/// cache file, for as long as the session runs. A failed write (a slow or
/// throttled etcd, a role without write access to `names/`) is logged, once
/// per distinct error, and tried again; it does not end the session.
async fn keep_claims(mesh: Arc<Mesh>, mut client: Client) {
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error = String::new();
    loop {
        tick.tick().await;
        match claim_names(&mesh, &mut client).await {
            Ok(()) => last_error.clear(),
            Err(e) => {
                let e = format!("{e:#}");
                if e != last_error {
                    warn!(error = %e, "mesh: name claims not written; trying again");
                    last_error = e;
                }
            }
        }
        let m = Arc::clone(&mesh);
        let _ = tokio::task::spawn_blocking(move || m.save_claims()).await;
    }
}

/// A lease for a new session: `last` while etcd still holds it, else a new
/// one (stored in `last`).
async fn take_lease(client: &mut Client, last: &mut Option<i64>, ttl: i64) -> anyhow::Result<i64> {
    if let Some(old) = *last {
        match client.lease_time_to_live(old, None).await {
            Ok(r) if r.ttl() > 0 => {
                info!(lease = %format_args!("{old:x}"), "mesh: lease still held; carrying on with it");
                return Ok(old);
            }
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let lease = client.lease_grant(ttl, None).await?.id();
    *last = Some(lease);
    Ok(lease)
}

/// When this hub's record is written again after a failed write [pure]: its
/// own delays (1 s doubling to [`MAX_BACKOFF`], jittered), within the
/// session.
struct PublishRetry {
    backoff: Backoff,
    at: Option<std::time::Instant>,
}

impl PublishRetry {
    fn new() -> Self {
        PublishRetry {
            backoff: Backoff::new(Duration::from_secs(1), MAX_BACKOFF, Duration::MAX),
            at: None,
        }
    }

    /// Whether a write may be tried at `now`.
    fn due(&self, now: std::time::Instant) -> bool {
        self.at.is_none_or(|t| now >= t)
    }

    /// A write failed at `now`: the wait before the next one.
    fn failed(&mut self, now: std::time::Instant, jitter: f64) -> Duration {
        let d = self.backoff.next_delay(Duration::ZERO, jitter);
        self.at = Some(now + d);
        d
    }

    /// A write went through: the next failure waits the least again.
    fn succeeded(&mut self) {
        if self.at.take().is_some() {
            *self = PublishRetry::new();
        }
    }
}

/// Whether the watch still answers [pure]: every response counts, events
/// and the progress asked for every [`WATCH_PROGRESS_EVERY`] alike.
struct WatchLiveness {
    heard: std::time::Instant,
}

impl WatchLiveness {
    fn new(now: std::time::Instant) -> Self {
        WatchLiveness { heard: now }
    }

    fn heard(&mut self, now: std::time::Instant) {
        self.heard = now;
    }

    /// How long the watch has been silent at `now`, once that reaches
    /// [`WATCH_SILENCE`].
    fn silent(&self, now: std::time::Instant) -> Option<Duration> {
        let d = now.saturating_duration_since(self.heard);
        (d >= WATCH_SILENCE).then_some(d)
    }
}

/// Writes this hub's record if `retry` allows; a failure is logged (once
/// per distinct error), shown as the mesh's `last_error` and retried after
/// a wait, without ending the session.
#[allow(clippy::too_many_arguments)]
async fn try_publish(
    mesh: &Mesh,
    client: &mut Client,
    key: &str,
    lease: i64,
    rec: HubRecord,
    published: &mut Option<Vec<u8>>,
    retry: &mut PublishRetry,
    last_error: &mut String,
) {
    let now = std::time::Instant::now();
    if !retry.due(now) {
        return;
    }
    match publish(mesh, client, key, lease, rec, published).await {
        Ok(()) => {
            if !last_error.is_empty() {
                info!("mesh: this hub's record written");
                last_error.clear();
                mesh.set_connected(true, None);
            }
            retry.succeeded();
        }
        Err(e) => {
            let e = format!("{e:#}");
            let wait = retry.failed(now, jitter());
            if e != *last_error {
                warn!(error = %e, retry_in = ?wait, "mesh: this hub's record not written; trying again");
                *last_error = e.clone();
            }
            mesh.set_connected(
                mesh.etcd_connected(),
                Some(format!("writing this hub's record: {e}")),
            );
        }
    }
}

/// One session: runs until something fails (why, returned) or it is
/// dropped. `client` and `up_since`: its client once connected, and when it
/// was up (for the caller's revocation and retry delay).
async fn session(
    mesh: &Arc<Mesh>,
    local: &Local,
    records: &mut BTreeMap<String, HubRecord>,
    last_lease: &mut Option<i64>,
    last_client: &mut Option<Client>,
    up_since: &mut Option<std::time::Instant>,
) -> anyhow::Error {
    match session_inner(mesh, local, records, last_lease, last_client, up_since).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

async fn session_inner(
    mesh: &Arc<Mesh>,
    local: &Local,
    records: &mut BTreeMap<String, HubRecord>,
    last_lease: &mut Option<i64>,
    last_client: &mut Option<Client>,
    up_since: &mut Option<std::time::Instant>,
) -> anyhow::Result<std::convert::Infallible> {
    let s = &mesh.settings;
    let prefix = s.hubs_prefix();
    let own_key = s.own_key();
    let mut client = Client::connect(&s.etcd, Some(options(mesh))).await?;
    *last_client = Some(client.clone());
    let ttl = s.ttl.as_secs() as i64;
    let lease = take_lease(&mut client, last_lease, ttl).await?;
    let (keeper, alive) = client.lease_keep_alive(lease).await?;
    let every = (s.ttl / 3).max(Duration::from_secs(1));
    let mut keep = AbortOnDrop(tokio::spawn(keep_lease(keeper, alive, lease, every)));

    let mut published: Option<Vec<u8>> = None;
    let mut last_rewrite: Option<std::time::Instant> = None;
    // A rewrite asked for inside the REWRITE_EVERY window, made once it ends.
    let mut rewrite_pending = false;
    let mut retry = PublishRetry::new();
    let mut publish_error = String::new();
    try_publish(
        mesh,
        &mut client,
        &own_key,
        lease,
        local(),
        &mut published,
        &mut retry,
        &mut publish_error,
    )
    .await;

    // One read and one watch of the whole prefix: the hubs' records
    // (`hubs/`) and the shared ACME keys (`acme/`). Every record may be up
    // to MAX_PUBLISH: room for many hubs' at once.
    let acme_prefix = s.acme_prefix();
    let names_prefix = s.names_prefix();
    let resp = client
        .kv_client()
        .max_decoding_message_size(MAX_READ)
        .get(s.prefix.clone(), Some(GetOptions::new().with_prefix()))
        .await?;
    let rev = resp.header().map_or(0, |h| h.revision());
    let mut fresh = BTreeMap::new();
    mesh.clear_acme();
    for kv in resp.kvs() {
        if kv.key().starts_with(prefix.as_bytes()) {
            let kv = Kv {
                key: kv.key(),
                value: Some(kv.value()),
                lease: kv.lease(),
            };
            apply(mesh, &mut fresh, &prefix, kv, lease, true);
        } else if kv.key().starts_with(acme_prefix.as_bytes()) {
            mesh.apply_acme(kv.key(), Some(kv.value()));
        }
    }
    mesh.load_names(
        resp.kvs()
            .iter()
            .filter(|kv| kv.key().starts_with(names_prefix.as_bytes()))
            .map(|kv| (kv.key(), kv.value())),
    );
    for name in records.keys().filter(|n| !fresh.contains_key(*n)) {
        info!(hub = %name, "mesh: hub left");
    }
    for name in fresh.keys().filter(|n| !records.contains_key(*n)) {
        info!(hub = %name, "mesh: hub joined");
    }
    *records = fresh;
    mesh.set_table(Table::build(&s.name, records.values()));
    let mut stream = client
        .watch_client()
        .max_decoding_message_size(MAX_READ)
        .watch(
            s.prefix.clone(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(rev + 1),
            ),
        )
        .await?;
    mesh.set_session(Some((client.clone(), lease)));
    let error =
        (!publish_error.is_empty()).then(|| format!("writing this hub's record: {publish_error}"));
    mesh.set_connected(true, error);
    *up_since = Some(std::time::Instant::now());
    info!(hubs = records.len(), etcd = ?s.etcd, "mesh: connected to etcd");

    let _claims = AbortOnDrop(tokio::spawn(keep_claims(Arc::clone(mesh), client.clone())));
    let mut check = tokio::time::interval(PUBLISH_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut progress = tokio::time::interval_at(
        tokio::time::Instant::now() + WATCH_PROGRESS_EVERY,
        WATCH_PROGRESS_EVERY,
    );
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut liveness = WatchLiveness::new(std::time::Instant::now());
    loop {
        tokio::select! {
            // (`last_lease` stays: the next session asks etcd whether the
            // lease is still there.)
            r = &mut keep.0 => {
                return Err(r.unwrap_or_else(|e| anyhow::anyhow!("lease keep-alive: {e}")));
            }
            _ = check.tick() => {
                if rewrite_pending && last_rewrite.is_none_or(|t| t.elapsed() >= REWRITE_EVERY) {
                    rewrite_pending = false;
                    published = None;
                    last_rewrite = Some(std::time::Instant::now());
                }
                try_publish(
                    mesh,
                    &mut client,
                    &own_key,
                    lease,
                    local(),
                    &mut published,
                    &mut retry,
                    &mut publish_error,
                )
                .await;
            }
            _ = progress.tick() => {
                if let Some(d) = liveness.silent(std::time::Instant::now()) {
                    anyhow::bail!("watch silent for {} s", d.as_secs());
                }
                // (A full request queue is a stalled stream: the silence
                // ends the session.)
                if let Ok(r) = tokio::time::timeout(Duration::from_secs(1), stream.request_progress()).await {
                    r?;
                }
            }
            m = stream.message() => {
                let Some(r) = m? else { anyhow::bail!("watch ended") };
                liveness.heard(std::time::Instant::now());
                if r.canceled() {
                    anyhow::bail!("watch canceled: {}", r.cancel_reason());
                }
                let mut hubs_changed = false;
                for ev in r.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let value = match ev.event_type() {
                        EventType::Put => Some(kv.value()),
                        EventType::Delete => None,
                    };
                    if kv.key().starts_with(acme_prefix.as_bytes()) {
                        mesh.apply_acme(kv.key(), value);
                        continue;
                    }
                    if kv.key().starts_with(names_prefix.as_bytes()) {
                        mesh.apply_name(kv.key(), value);
                        continue;
                    }
                    if !kv.key().starts_with(prefix.as_bytes()) {
                        continue;
                    }
                    hubs_changed = true;
                    let kv = Kv {
                        key: kv.key(),
                        value,
                        lease: kv.lease(),
                    };
                    // Written again at the next check; when two hubs share
                    // a name, at most every REWRITE_EVERY.
                    if apply(mesh, records, &prefix, kv, lease, false) {
                        if last_rewrite.is_none_or(|t| t.elapsed() >= REWRITE_EVERY) {
                            published = None;
                            last_rewrite = Some(std::time::Instant::now());
                        } else {
                            // Not dropped: made when the window ends.
                            rewrite_pending = true;
                        }
                    }
                }
                if hubs_changed {
                    mesh.set_table(Table::build(&s.name, records.values()));
                }
            }
        }
    }
}

/// Most claim writes per check (one a second), so a hub granting thousands
/// of names claims them over a few checks and each check's plan is fresh.
pub const CLAIMS_PER_CHECK: usize = 64;

/// Makes the name claims match this hub's grants ([`super::claims::plan`]):
/// each write is a transaction that holds only if the key is as last seen,
/// so two hubs writing at once cannot both win; the loser sees the winner's
/// claim through the watch and plans again at the next check.
async fn claim_names(mesh: &Mesh, client: &mut Client) -> anyhow::Result<()> {
    use super::claims::Action;
    let Some(source) = mesh.claim_source() else {
        return Ok(());
    };
    // Two hubs under one name would each take the other's claims for its
    // own and rewrite them in turn: no claim is written meanwhile.
    if mesh.name_clash_recent() {
        return Ok(());
    }
    let now = crate::clock::unix_secs();
    let Some(wants) = source(now) else {
        return Ok(());
    };
    let (actions, conflicts) = mesh.plan_claims(&wants, now);
    mesh.set_conflicts(conflicts);
    let prefix = mesh.settings.names_prefix();
    for (host, action) in actions.into_iter().take(CLAIMS_PER_CHECK) {
        let key = format!("{prefix}{host}");
        let (txn, what) = match action {
            Action::Create(c) => (
                Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.clone(), c.encode(), None)]),
                "claimed",
            ),
            Action::Replace { old, claim } => (
                Txn::new()
                    .when([Compare::value(key.clone(), CompareOp::Equal, old)])
                    .and_then([TxnOp::put(key.clone(), claim.encode(), None)]),
                "claim renewed",
            ),
            Action::Release { old } => (
                Txn::new()
                    .when([Compare::value(key.clone(), CompareOp::Equal, old)])
                    .and_then([TxnOp::delete(key.clone(), None)]),
                "claim released",
            ),
        };
        if client.txn(txn).await?.succeeded() {
            info!(host = %host, "mesh: name {what}");
        } else {
            // Someone else wrote it first; the watch brings what they wrote.
            tracing::debug!(host = %host, "mesh: name claim changed meanwhile; planning again");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh() -> Arc<Mesh> {
        let raw: crate::mesh::settings::RawMesh = toml::from_str(
            "name = \"a\"\netcd = [\"http://192.0.2.9:2379\"]\nadvertise = [\"198.51.100.1\"]\n",
        )
        .unwrap();
        Mesh::new(crate::mesh::settings::validate(raw, std::path::Path::new("/"), true).unwrap())
    }

    pub(super) fn rec(name: &str, hosts: usize) -> HubRecord {
        HubRecord::local(
            name,
            &["198.51.100.2".parse().unwrap()],
            &["0.0.0.0:80".parse().unwrap()],
            &[],
            (0..hosts).map(|i| format!("host-{i:08}.example.org")),
        )
    }

    #[test]
    fn requests_need_a_leader() {
        // A member cut off from its cluster refuses them (and ends the
        // watch) instead of answering from what it had.
        let o = format!("{:?}", options(&mesh()));
        assert!(o.contains("require_leader: true"), "{o}");
    }

    #[test]
    fn a_silent_watch_is_noticed() {
        let t0 = std::time::Instant::now();
        let mut w = WatchLiveness::new(t0);
        assert_eq!(w.silent(t0 + WATCH_PROGRESS_EVERY), None);
        assert_eq!(
            w.silent(t0 + WATCH_SILENCE - Duration::from_millis(1)),
            None
        );
        assert_eq!(w.silent(t0 + WATCH_SILENCE), Some(WATCH_SILENCE));
        // Any response, progress included, starts the wait again.
        w.heard(t0 + Duration::from_secs(12));
        assert_eq!(w.silent(t0 + Duration::from_secs(20)), None);
        assert!(w.silent(t0 + Duration::from_secs(27)).is_some());
        // A clock that goes backwards is no silence.
        assert_eq!(w.silent(t0), None);
        // Progress is asked for several times before the session ends.
        const { assert!(WATCH_SILENCE.as_secs() >= 3 * WATCH_PROGRESS_EVERY.as_secs()) };
    }

    #[test]
    fn a_failed_publish_waits_longer_each_time_and_afresh_after_a_success() {
        let t0 = std::time::Instant::now();
        let s = Duration::from_secs(1);
        let mut r = PublishRetry::new();
        assert!(r.due(t0));
        assert_eq!(r.failed(t0, 1.0), s);
        assert!(!r.due(t0 + s / 2));
        assert!(r.due(t0 + s));
        assert_eq!(r.failed(t0 + s, 1.0), 2 * s);
        assert_eq!(r.failed(t0 + 3 * s, 1.0), 4 * s);
        assert!(!r.due(t0 + 6 * s));
        for _ in 0..10 {
            assert!(r.failed(t0, 1.0) <= MAX_BACKOFF);
        }
        assert_eq!(r.failed(t0, 1.0), MAX_BACKOFF);
        // Jittered: in the upper half.
        assert_eq!(r.failed(t0, 0.0), MAX_BACKOFF / 2);
        r.succeeded();
        assert!(r.due(t0));
        assert_eq!(r.failed(t0, 1.0), s);
    }

    #[test]
    fn sessions_retry_sooner_only_after_one_that_lasted() {
        let mut b = session_backoff();
        let short = Duration::from_secs(5);
        let d: Vec<_> = (0..5).map(|_| b.next_delay(short, 1.0)).collect();
        assert_eq!(d, [1, 2, 4, 8, 10].map(Duration::from_secs));
        // A session up for a few seconds does not start the waits afresh
        // (every session re-reads the whole prefix)...
        assert_eq!(b.next_delay(short, 1.0), MAX_BACKOFF);
        // ...one up for SESSION_STABLE does.
        assert_eq!(b.next_delay(SESSION_STABLE, 1.0), Duration::from_secs(1));
        // Jittered, so hubs cut off together do not come back together.
        let mut b = session_backoff();
        assert_eq!(b.next_delay(short, 0.0), Duration::from_millis(500));
    }

    #[test]
    fn a_record_too_large_for_etcd_leaves_hosts_out() {
        let (bytes, small, left_out) = fit(rec("a", 10));
        assert_eq!((small.hosts.len(), left_out), (10, 0));
        assert_eq!(bytes, rec("a", 10).encode());
        let (bytes, big, left_out) = fit(rec("a", 60_000));
        assert!(bytes.len() <= MAX_PUBLISH, "{}", bytes.len());
        assert!(left_out > 0 && big.hosts.len() > 30_000);
        assert_eq!(big.hosts.len() + left_out, 60_000);
        assert_eq!(decode_record("a", &bytes).unwrap(), big);
    }

    #[test]
    fn records_come_and_go_and_this_hubs_own_is_written_again_when_deleted() {
        let m = mesh();
        let p = "/gatewire/mesh/hubs/";
        let mut recs = BTreeMap::new();
        let b = rec("b", 2).encode();
        let kv = |key: &'static str, value: Option<&'static [u8]>, lease| Kv {
            key: key.as_bytes(),
            value,
            lease,
        };
        let b: &'static [u8] = Box::leak(b.into_boxed_slice());
        assert!(!apply(
            &m,
            &mut recs,
            p,
            kv("/gatewire/mesh/hubs/b", Some(b), 9),
            1,
            false
        ));
        assert_eq!(recs["b"].hosts.len(), 2);
        // A malformed record is counted and drops the hub's old one.
        assert!(!apply(
            &m,
            &mut recs,
            p,
            kv("/gatewire/mesh/hubs/b", Some(b"{"), 9),
            1,
            false
        ));
        assert!(recs.is_empty());
        assert_eq!(m.view().bad_records, 1);
        // A key that names no hub.
        assert!(!apply(
            &m,
            &mut recs,
            p,
            kv("/gatewire/mesh/hubs/B/x", Some(b), 9),
            1,
            false
        ));
        assert_eq!(m.view().bad_records, 2);
        assert!(!apply(
            &m,
            &mut recs,
            p,
            kv("/gatewire/mesh/hubs/b", Some(b), 9),
            1,
            false
        ));
        assert!(!apply(
            &m,
            &mut recs,
            p,
            kv("/gatewire/mesh/hubs/b", None, 0),
            1,
            false
        ));
        assert!(recs.is_empty());
        // This hub's own record: not in the table; deleted, written again.
        let a: &'static [u8] = Box::leak(rec("a", 1).encode().into_boxed_slice());
        assert!(!apply(
            &m,
            &mut recs,
            p,
            kv("/gatewire/mesh/hubs/a", Some(a), 1),
            1,
            false
        ));
        assert!(!m.name_clash_recent());
        // Written by someone else (another lease): to be written again, and
        // no name claim is written for a while.
        assert!(apply(
            &m,
            &mut recs,
            p,
            kv("/gatewire/mesh/hubs/a", Some(a), 7),
            1,
            false
        ));
        assert!(m.name_clash_recent());
        assert!(recs.is_empty());
        assert!(apply(
            &m,
            &mut recs,
            p,
            kv("/gatewire/mesh/hubs/a", None, 0),
            1,
            false
        ));
    }
}

/// Against an etcd of its own on loopback (Debian's etcd-server; skipped
/// without it, except in CI), reached through a relay that can cut every
/// connection.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod etcd_tests {
    use super::tests::rec;
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    struct Etcd {
        child: std::process::Child,
        dir: std::path::PathBuf,
        url: String,
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// A one-member etcd refusing requests over `max_request` bytes; `None`
    /// when there is no etcd binary (outside CI).
    async fn etcd(max_request: usize) -> Option<Etcd> {
        if std::process::Command::new("etcd")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "etcd (etcd-server) is missing"
            );
            eprintln!("etcd not found: skipped");
            return None;
        }
        let (client, peer) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!(
            "gatewire-etcd-test-{}-{client}",
            std::process::id()
        ));
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = std::process::Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(&dir)
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("t={peer_url}")])
            .args(["--max-request-bytes", &max_request.to_string()])
            .args(["--log-level", "error"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let e = Etcd { child, dir, url };
        for _ in 0..100 {
            if let Ok(Ok(mut c)) =
                tokio::time::timeout(Duration::from_secs(1), Client::connect([&e.url], None)).await
            {
                if c.get("x", None).await.is_ok() {
                    return Some(e);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("etcd did not start");
    }

    /// Relays TCP connections on loopback to `to`; `cut` closes every one
    /// open (new ones are still relayed).
    struct Relay {
        url: String,
        open: Arc<parking_lot::Mutex<Vec<tokio::task::AbortHandle>>>,
        _accept: AbortOnDrop<()>,
    }

    impl Relay {
        async fn new(to: &str) -> Relay {
            let to = to.trim_start_matches("http://").to_string();
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", l.local_addr().unwrap());
            let open = Arc::new(parking_lot::Mutex::new(Vec::new()));
            let o = open.clone();
            let accept = tokio::spawn(async move {
                while let Ok((mut a, _)) = l.accept().await {
                    let to = to.clone();
                    let t = tokio::spawn(async move {
                        if let Ok(mut b) = tokio::net::TcpStream::connect(&to).await {
                            let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                        }
                    });
                    o.lock().push(t.abort_handle());
                }
            });
            Relay {
                url,
                open,
                _accept: AbortOnDrop(accept),
            }
        }

        fn cut(&self) {
            for t in self.open.lock().drain(..) {
                t.abort();
            }
        }
    }

    fn mesh_at(etcd: &str, name: &str) -> Arc<Mesh> {
        let raw: crate::mesh::settings::RawMesh = toml::from_str(&format!(
            "name = \"{name}\"\netcd = [\"{etcd}\"]\nadvertise = [\"198.51.100.1\"]\nprefix = \"/t-{name}/\"\n"
        ))
        .unwrap();
        Mesh::new(crate::mesh::settings::validate(raw, std::path::Path::new("/"), true).unwrap())
    }

    async fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
        for _ in 0..secs * 20 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{what}: not within {secs} s");
    }

    async fn own_record(c: &mut Client, m: &Mesh) -> Option<HubRecord> {
        let r = c.get(m.settings.own_key(), None).await.unwrap();
        let kv = r.kvs().first()?;
        Some(decode_record(&m.settings.name, kv.value()).unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_publish_keeps_the_session_and_a_stop_between_sessions_revokes() {
        let Some(etcd) = etcd(16 * 1024).await else {
            return;
        };
        let mut direct = Client::connect([&etcd.url], None).await.unwrap();

        // A record over etcd's request limit: refused, and the session
        // stays up (the table is read, the lease kept) while it is retried.
        let m = mesh_at(&etcd.url, "a");
        let hosts = Arc::new(AtomicUsize::new(2_000));
        let h = hosts.clone();
        let local: Local = Arc::new(move || rec("a", h.load(Relaxed)));
        let d = Driver::start(m.clone(), local);
        wait_for("session up", 10, || m.etcd_connected()).await;
        let err = m.view().last_error.unwrap_or_default();
        assert!(err.contains("writing this hub's record"), "{err}");
        for _ in 0..30 {
            assert!(m.etcd_connected(), "the session ended");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(own_record(&mut direct, &m).await.is_none());
        // Small enough again: written at the next try.
        hosts.store(3, Relaxed);
        for _ in 0..150 {
            if own_record(&mut direct, &m).await.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(own_record(&mut direct, &m).await.unwrap().hosts.len(), 3);
        assert!(m.etcd_connected());
        assert_eq!(m.view().last_error, None);
        d.stop(&m).await;
        assert!(
            own_record(&mut direct, &m).await.is_none(),
            "revoked at stop"
        );

        // A stop while waiting to reconnect, the lease still alive: revoked.
        let relay = Relay::new(&etcd.url).await;
        let m = mesh_at(&relay.url, "b");
        let d = Driver::start(m.clone(), Arc::new(|| rec("b", 1)));
        wait_for("session up", 10, || m.etcd_connected()).await;
        wait_for("record written", 10, || m.view().published_hosts == 1).await;
        assert!(own_record(&mut direct, &m).await.is_some());
        relay.cut();
        wait_for("session ended", 10, || !m.etcd_connected()).await;
        let t0 = std::time::Instant::now();
        d.stop(&m).await;
        assert!(t0.elapsed() < REVOKE_WAIT + Duration::from_secs(1));
        assert!(
            own_record(&mut direct, &m).await.is_none(),
            "the record outlived the hub"
        );
        assert!(m.is_empty());
    }
}
