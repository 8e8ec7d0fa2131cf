//! The mesh's driver: publishes this hub's record in etcd under a lease and
//! keeps the table of the other hubs' records up to date from a watch.

use super::table::{decode_record, valid_name, HubRecord, Table};
use super::Mesh;
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
/// Longest wait between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

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

    /// Stops sending connections to other hubs, revokes the lease (waits at
    /// most 2 s for etcd) and ends the driver.
    pub async fn stop(self, mesh: &Mesh) {
        mesh.set_table(Table::default());
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(3), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

async fn run(mesh: Arc<Mesh>, local: Local, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_secs(1);
    let mut last_error = String::new();
    // The other hubs' records, kept across sessions (the table serves on).
    let mut records = BTreeMap::new();
    // The last session's lease: the next session takes it on while etcd
    // still holds it, so this hub's record, ACME lock and challenge answers
    // outlive a dropped connection or watch.
    let mut lease = None;
    loop {
        let r = session(&mesh, &local, &mut stop, &mut records, &mut lease).await;
        mesh.set_session(None);
        // What the session read is kept for a restart without etcd.
        mesh.save_claims();
        let e = match r {
            Ok(()) => return,
            Err(e) => format!("{e:#}"),
        };
        // A session that got going starts the next one's wait afresh.
        if mesh.etcd_connected() {
            backoff = Duration::from_secs(1);
        }
        mesh.set_connected(false, Some(e.clone()));
        if e != last_error {
            warn!(error = %e, etcd = ?mesh.settings.etcd, "mesh: etcd session ended; keeping the last table, retrying");
            last_error = e;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn options(mesh: &Mesh) -> ConnectOptions {
    let s = &mesh.settings;
    let mut o = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
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

async fn session(
    mesh: &Arc<Mesh>,
    local: &Local,
    stop: &mut watch::Receiver<bool>,
    records: &mut BTreeMap<String, HubRecord>,
    last_lease: &mut Option<i64>,
) -> anyhow::Result<()> {
    let s = &mesh.settings;
    let prefix = s.hubs_prefix();
    let own_key = s.own_key();
    let mut client = Client::connect(&s.etcd, Some(options(mesh))).await?;
    let ttl = s.ttl.as_secs() as i64;
    let lease = take_lease(&mut client, last_lease, ttl).await?;
    let (keeper, alive) = client.lease_keep_alive(lease).await?;
    let every = (s.ttl / 3).max(Duration::from_secs(1));
    let mut keep = AbortOnDrop(tokio::spawn(keep_lease(keeper, alive, lease, every)));

    let mut published: Option<Vec<u8>> = None;
    let mut last_rewrite: Option<std::time::Instant> = None;
    // A rewrite asked for inside the REWRITE_EVERY window, made once it ends.
    let mut rewrite_pending = false;
    publish(mesh, &mut client, &own_key, lease, local(), &mut published).await?;

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
    mesh.set_connected(true, None);
    info!(hubs = records.len(), etcd = ?s.etcd, "mesh: connected to etcd");

    let _claims = AbortOnDrop(tokio::spawn(keep_claims(Arc::clone(mesh), client.clone())));
    let mut check = tokio::time::interval(PUBLISH_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => {
                let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await;
                *last_lease = None;
                info!("mesh: record withdrawn");
                return Ok(());
            }
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
                publish(mesh, &mut client, &own_key, lease, local(), &mut published).await?;
            }
            m = stream.message() => {
                let Some(r) = m? else { anyhow::bail!("watch ended") };
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
    let now = crate::control::runtime::now();
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

    fn rec(name: &str, hosts: usize) -> HubRecord {
        HubRecord::local(
            name,
            &["198.51.100.2".parse().unwrap()],
            &["0.0.0.0:80".parse().unwrap()],
            &[],
            (0..hosts).map(|i| format!("host-{i:08}.example.org")),
        )
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
