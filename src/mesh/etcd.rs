//! The mesh's driver: publishes this hub's record in etcd under a lease and
//! keeps the table of the other hubs' records up to date from a watch.

use super::table::{decode_record, valid_name, HubRecord, Table};
use super::Mesh;
use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, PutOptions, TlsOptions,
    WatchOptions,
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

    /// Revokes the lease (waits at most 2 s for etcd) and ends the driver.
    pub async fn stop(self) {
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
    loop {
        let r = session(&mesh, &local, &mut stop).await;
        let e = match r {
            Ok(()) => return,
            Err(e) => format!("{e:#}"),
        };
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
        o = o.with_user(u.clone(), p.clone());
    }
    if let Some(ca) = &s.ca_pem {
        o = o.with_tls(TlsOptions::new().ca_certificate(Certificate::from_pem(ca.clone())));
    }
    o
}

/// The records under the prefix, by hub name; bad ones are counted, logged
/// and left out.
fn apply(
    mesh: &Mesh,
    records: &mut BTreeMap<String, HubRecord>,
    prefix: &str,
    key: &[u8],
    value: Option<&[u8]>,
    published: &Option<Vec<u8>>,
) {
    let Some(name) = std::str::from_utf8(key)
        .ok()
        .and_then(|k| k.strip_prefix(prefix))
        .filter(|n| valid_name(n))
    else {
        mesh.note_bad_record();
        warn!(key = %String::from_utf8_lossy(key), "mesh: a key under the prefix that names no hub; ignored");
        return;
    };
    let Some(value) = value else {
        if records.remove(name).is_some() {
            info!(hub = %name, "mesh: hub left");
        }
        return;
    };
    if name == mesh.settings.name {
        if published.as_deref().is_some_and(|p| p != value) {
            warn!(hub = %name, "mesh: another hub publishes under this hub's name; give each hub its own [mesh] name");
        }
        return;
    }
    match decode_record(name, value) {
        Ok(r) => {
            let old = records.insert(name.to_string(), r);
            if old.is_none() {
                info!(hub = %name, "mesh: hub joined");
            }
        }
        Err(e) => {
            mesh.note_bad_record();
            records.remove(name);
            warn!(hub = %name, error = %e, "mesh: record not used");
        }
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
    let bytes = rec.encode();
    if published.as_deref() == Some(bytes.as_slice()) {
        return Ok(());
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

async fn session(
    mesh: &Mesh,
    local: &Local,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let s = &mesh.settings;
    let prefix = s.hubs_prefix();
    let own_key = s.own_key();
    let mut client = Client::connect(&s.etcd, Some(options(mesh))).await?;
    let ttl = s.ttl.as_secs() as i64;
    let lease = client.lease_grant(ttl, None).await?.id();
    let (mut keeper, mut alive) = client.lease_keep_alive(lease).await?;

    let mut published: Option<Vec<u8>> = None;
    publish(mesh, &mut client, &own_key, lease, local(), &mut published).await?;

    let resp = client
        .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
        .await?;
    let rev = resp.header().map_or(0, |h| h.revision());
    let mut records = BTreeMap::new();
    for kv in resp.kvs() {
        apply(
            mesh,
            &mut records,
            &prefix,
            kv.key(),
            Some(kv.value()),
            &published,
        );
    }
    mesh.set_table(Table::build(&s.name, records.values()));
    let mut stream = client
        .watch(
            prefix.clone(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(rev + 1),
            ),
        )
        .await?;
    mesh.set_connected(true, None);
    info!(hubs = records.len(), etcd = ?s.etcd, "mesh: connected to etcd");

    let mut renew = tokio::time::interval((s.ttl / 3).max(Duration::from_secs(1)));
    let mut check = tokio::time::interval(PUBLISH_EVERY);
    loop {
        tokio::select! {
            _ = stop.changed() => {
                let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await;
                info!("mesh: record withdrawn");
                return Ok(());
            }
            _ = renew.tick() => keeper.keep_alive().await?,
            m = alive.message() => match m? {
                Some(r) if r.ttl() > 0 => {}
                _ => anyhow::bail!("lease {lease:x} expired"),
            },
            _ = check.tick() => publish(mesh, &mut client, &own_key, lease, local(), &mut published).await?,
            m = stream.message() => {
                let Some(r) = m? else { anyhow::bail!("watch ended") };
                if r.canceled() {
                    anyhow::bail!("watch canceled: {}", r.cancel_reason());
                }
                for ev in r.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let value = match ev.event_type() {
                        EventType::Put => Some(kv.value()),
                        EventType::Delete => None,
                    };
                    apply(mesh, &mut records, &prefix, kv.key(), value, &published);
                }
                mesh.set_table(Table::build(&s.name, records.values()));
            }
        }
    }
}
