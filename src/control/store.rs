//! Where the control plane's [`State`] lives between restarts.
//!
//! [`Store`] loads and saves the whole state. A save returns only once the new
//! state is durable, and a crash at any moment leaves either the old state or
//! the new one, never a mix. [`FileStore`] keeps `state.json` in the hub's state
//! directory: it writes a temporary file, syncs it, renames it over the old one
//! and syncs the directory. The trait leaves room for other stores (the hub
//! mesh shares only which hub serves which host, in etcd: `crate::mesh`).

use crate::control::state::State;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub trait Store: Send + Sync {
    /// The saved state, or `None` when nothing was ever saved.
    fn load(&self) -> BoxFuture<'_, anyhow::Result<Option<State>>>;
    /// Makes `state` durable. On error the previous state is still the saved one.
    fn save<'a>(&'a self, state: &'a State) -> BoxFuture<'a, anyhow::Result<()>>;
    /// Where the state lives, for logs.
    fn describe(&self) -> String;
}

/// `state.json` in a directory, written crash-safe.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

pub const STATE_FILE: &str = "state.json";

/// The number of this process's next temporary file: a save's name of its
/// own, so two saves never write one file (the writer lock orders saves,
/// but a save outlives a cancelled caller).
static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl FileStore {
    /// Creates the directory (mode 0700) if it does not exist.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| anyhow::anyhow!("state directory {}: {e}", dir.display()))?;
        remove_stale_temps(dir);
        Ok(FileStore {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    fn load_sync(&self) -> anyhow::Result<Option<State>> {
        let p = self.path();
        let text = match std::fs::read(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(anyhow::anyhow!("{}: {e}", p.display())),
        };
        let s: State = serde_json::from_slice(&text)
            .map_err(|e| anyhow::anyhow!("{}: not a valid state file: {e}", p.display()))?;
        Ok(Some(s))
    }

    fn save_sync(&self, state: &State) -> anyhow::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let body = serde_json::to_vec_pretty(state)?;
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!("{STATE_FILE}.{}.{n}.tmp", std::process::id()));
        let ctx = |e: std::io::Error| anyhow::anyhow!("{}: {e}", tmp.display());
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(ctx)?;
            f.write_all(&body).map_err(ctx)?;
            f.write_all(b"\n").map_err(ctx)?;
            f.sync_all().map_err(ctx)?;
            drop(f);
            std::fs::rename(&tmp, self.path())
                .map_err(|e| anyhow::anyhow!("{}: {e}", self.path().display()))
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        // Renamed: the new state is the one a restart reads, so the change
        // is made. A directory that cannot be synced only leaves the rename
        // less durable against a power cut; reporting the change as not
        // made would part the running state from the file's.
        if let Err(e) = std::fs::File::open(&self.dir).and_then(|d| d.sync_all()) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "state saved, but its directory could not be synced");
        }
        Ok(())
    }
}

/// Removes the temporary files of saves that a process which is gone
/// (killed between writing and renaming) left behind: each is a whole copy
/// of the state. One named with this process's PID and a number it has not
/// given out yet is an earlier process's (the PID used again after a
/// crash): left, it would fail the save that comes to its number.
fn remove_stale_temps(dir: &Path) {
    let issued = SEQ.load(std::sync::atomic::Ordering::Relaxed);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some((pid, seq)) = name
            .to_str()
            .and_then(|n| n.strip_prefix(STATE_FILE)?.strip_prefix('.'))
            .and_then(|n| n.strip_suffix(".tmp"))
            .and_then(|n| n.split_once('.'))
            .and_then(|(pid, seq)| Some((pid.parse::<u32>().ok()?, seq.parse::<u64>().ok()?)))
        else {
            continue;
        };
        // A live process's save may be under way; this one's only under a
        // number it gave out.
        let live = if pid == std::process::id() {
            seq < issued
        } else {
            Path::new(&format!("/proc/{pid}")).exists()
        };
        if live {
            continue;
        }
        match std::fs::remove_file(e.path()) {
            Ok(()) => {
                tracing::info!(file = %e.path().display(), "removed a state file an interrupted save left")
            }
            Err(err) => {
                tracing::warn!(file = %e.path().display(), error = %err, "cannot remove a state file an interrupted save left")
            }
        }
    }
}

impl Store for FileStore {
    fn load(&self) -> BoxFuture<'_, anyhow::Result<Option<State>>> {
        let me = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || me.load_sync())
                .await
                .map_err(|e| anyhow::anyhow!("state load task: {e}"))?
        })
    }

    fn save<'a>(&'a self, state: &'a State) -> BoxFuture<'a, anyhow::Result<()>> {
        let me = self.clone();
        let state = state.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || me.save_sync(&state))
                .await
                .map_err(|e| anyhow::anyhow!("state save task: {e}"))?
        })
    }

    fn describe(&self) -> String {
        self.path().display().to_string()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);
    impl TempDir {
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn tempdir() -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "gatewire-store-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    #[tokio::test]
    async fn round_trip_and_atomic_replace() {
        let d = tempdir();
        let s = FileStore::open(&d.path().join("st")).unwrap();
        assert!(s.load().await.unwrap().is_none());
        let mut st = State {
            version: 7,
            ..State::default()
        };
        s.save(&st).await.unwrap();
        assert_eq!(s.load().await.unwrap().unwrap(), st);
        st.version = 8;
        s.save(&st).await.unwrap();
        assert_eq!(s.load().await.unwrap().unwrap().version, 8);
        // A leftover temp file from a crash mid-write is ignored.
        std::fs::write(d.path().join("st").join("state.json.tmp"), b"{garbage").unwrap();
        assert_eq!(s.load().await.unwrap().unwrap().version, 8);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(s.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0);
        // The next start removes what interrupted saves of processes that
        // are gone left, and nothing else (this process gave out number 0:
        // a save of its own may be under it).
        let st_dir = d.path().join("st");
        let dead = st_dir.join("state.json.4294967295.3.tmp");
        let own = st_dir.join(format!("state.json.{}.0.tmp", std::process::id()));
        let other = st_dir.join("state.json.notes.tmp");
        for f in [&dead, &own, &other] {
            std::fs::write(f, b"{}").unwrap();
        }
        let s = FileStore::open(&st_dir).unwrap();
        assert!(!dead.exists(), "a dead process's temp file is removed");
        assert!(own.exists() && other.exists());
        assert_eq!(s.load().await.unwrap().unwrap().version, 8);
    }

    /// Saves running at once (a save outlives a cancelled caller, so the
    /// writer lock does not always order them) each write a file of their
    /// own: every one succeeds, the file read back is one of them whole, and
    /// no temp file is left.
    #[tokio::test]
    async fn saves_at_once_do_not_mix() {
        let d = tempdir();
        let s = FileStore::open(&d.path().join("st")).unwrap();
        let saves: Vec<_> = (1..=16u64)
            .map(|v| {
                let s = s.clone();
                tokio::spawn(async move {
                    let mut st = State {
                        version: v,
                        ..State::default()
                    };
                    for i in 0..50 {
                        st.last_allocated
                            .insert(format!("10.{v}.{i}.0/24"), "10.0.0.1".parse().unwrap());
                    }
                    s.save(&st).await
                })
            })
            .collect();
        for t in saves {
            t.await.unwrap().unwrap();
        }
        let got = s.load().await.unwrap().unwrap();
        assert!((1..=16).contains(&got.version));
        assert_eq!(got.last_allocated.len(), 50);
        assert!(got
            .last_allocated
            .keys()
            .all(|k| k.starts_with(&format!("10.{}.", got.version))));
        let names: Vec<String> = std::fs::read_dir(d.path().join("st"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["state.json".to_string()], "{names:?}");
    }

    /// Temp files an earlier process of the same PID left (a crash, the
    /// PID used again) are removed at open: the saves that come to their
    /// numbers succeed.
    #[tokio::test]
    async fn an_earlier_process_of_this_pid_fails_no_save() {
        use std::sync::atomic::Ordering::Relaxed;
        let d = tempdir();
        let dir = d.path().join("st");
        std::fs::create_dir_all(&dir).unwrap();
        // Every number the saves below may get, other tests' saves
        // running at once taking some.
        let from = SEQ.load(Relaxed);
        let left: Vec<(u64, PathBuf)> = (from..from + 256)
            .map(|n| {
                (
                    n,
                    dir.join(format!("state.json.{}.{n}.tmp", std::process::id())),
                )
            })
            .collect();
        for (_, f) in &left {
            std::fs::write(f, b"{").unwrap();
        }
        let s = FileStore::open(&dir).unwrap();
        let next = SEQ.load(Relaxed);
        for (n, f) in &left {
            assert!(*n < next || !f.exists(), "{} kept", f.display());
        }
        for v in 1..=4 {
            let st = State {
                version: v,
                ..State::default()
            };
            s.save(&st).await.unwrap();
        }
        assert_eq!(s.load().await.unwrap().unwrap().version, 4);
    }

    #[tokio::test]
    async fn corrupt_file_is_an_error_not_an_empty_state() {
        let d = tempdir();
        let s = FileStore::open(d.path()).unwrap();
        std::fs::write(s.path(), b"{\"version\": 1, \"bogus\": 2}").unwrap();
        let e = s.load().await.unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
    }
}
