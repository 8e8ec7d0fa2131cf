//! The UAPI socket, `/var/run/wireguard/<iface>.sock`: the driver around
//! [`crate::wg::uapi`]. `wg show`, `wg set` and `wg setconf` talk to it, and
//! `gatewire show` uses its `show=json` extension.

use crate::wg::device::Inner;
use crate::wg::uapi::{self, Op, SetParser};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// The directory `wg` looks in.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// Most concurrent API clients served at once.
const MAX_CLIENTS: usize = 64;
/// A client that sends nothing for this long is dropped.
const IDLE: Duration = Duration::from_secs(30);

pub fn socket_path(iface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{iface}.sock"))
}

/// Extra top-level objects in `show=json` (e.g. `proxy`), by name.
pub type ShowSection = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;
type ShowSections = Arc<parking_lot::RwLock<Vec<(String, ShowSection)>>>;

/// The listening socket; removes its file when dropped.
pub struct ApiServer {
    path: PathBuf,
    task: JoinHandle<()>,
    sections: ShowSections,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ApiServer {
    /// Binds the socket for `dev`. Refuses to take over a socket another live
    /// process is serving.
    pub async fn start(dev: Arc<Inner>) -> anyhow::Result<ApiServer> {
        let path = socket_path(&dev.name);
        std::fs::create_dir_all(SOCKET_DIR)?;
        let _ = std::fs::set_permissions(SOCKET_DIR, std::fs::Permissions::from_mode(0o755));
        if path.exists() {
            if UnixStream::connect(&path).await.is_ok() {
                anyhow::bail!("{} is served by another running process", path.display());
            }
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let sem = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
        let sections: ShowSections = Arc::default();
        let secs = sections.clone();
        let task = tokio::spawn(async move {
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(v) => v,
                    Err(e) => {
                        warn!(error = %e, "UAPI accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // The socket hands out the private key (`get=1`) and takes
                // new ones: only root and this process's own user, whatever
                // the file's mode was between `bind` and `chmod`.
                let (owner, uid) = crate::sockopt::peer_is_owner(&stream);
                if !owner {
                    debug!(?uid, "UAPI connection from another user refused");
                    continue;
                }
                let Ok(permit) = Arc::clone(&sem).acquire_owned().await else {
                    return;
                };
                let dev = Arc::clone(&dev);
                let secs = secs.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(dev, stream, secs).await {
                        debug!(error = %e, "UAPI client");
                    }
                    drop(permit);
                });
            }
        });
        Ok(ApiServer {
            path,
            task,
            sections,
        })
    }

    /// Adds (or replaces) a top-level object `name` in `show=json`.
    pub fn set_show_section(&self, name: &str, f: ShowSection) {
        let mut v = self.sections.write();
        v.retain(|(n, _)| n != name);
        v.push((name.to_string(), f));
    }

    /// Removes the object `name` from `show=json`.
    pub fn remove_show_section(&self, name: &str) {
        self.sections.write().retain(|(n, _)| n != name);
    }
}

async fn read_line(
    r: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    line: &mut String,
) -> io::Result<bool> {
    line.clear();
    let mut limited = (&mut *r).take(uapi::MAX_LINE as u64 + 1);
    let n = tokio::time::timeout(IDLE, limited.read_line(line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "idle client"))??;
    if n == 0 {
        return Ok(false);
    }
    if line.len() > uapi::MAX_LINE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
    }
    while line.ends_with('\n') || line.ends_with('\r') {
        line.pop();
    }
    Ok(true)
}

use tokio::io::AsyncReadExt as _;

async fn serve(dev: Arc<Inner>, stream: UnixStream, sections: ShowSections) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    loop {
        if !read_line(&mut r, &mut line).await? {
            return Ok(());
        }
        if line.is_empty() {
            continue;
        }
        let op = match uapi::parse_op(&line) {
            Ok(op) => op,
            Err(e) => {
                w.write_all(format!("errno={}\n\n", e.errno()).as_bytes())
                    .await?;
                return Ok(());
            }
        };
        match op {
            Op::Get | Op::ShowJson => {
                // The request ends with a blank line.
                if !read_line(&mut r, &mut line).await? {
                    return Ok(());
                }
                let body = if op == Op::Get {
                    uapi::format_get(&dev.info())
                } else {
                    let mut v = serde_json::to_value(dev.show()).unwrap_or_default();
                    if let Some(obj) = v.as_object_mut() {
                        let secs: Vec<(String, ShowSection)> = sections.read().clone();
                        for (name, f) in secs {
                            obj.insert(name, f());
                        }
                    }
                    let j = serde_json::to_string(&v).unwrap_or_else(|_| "{}".into());
                    format!("{j}\nerrno=0\n\n")
                };
                w.write_all(body.as_bytes()).await?;
            }
            Op::Set => {
                let mut p = SetParser::new();
                let mut err = None;
                loop {
                    if !read_line(&mut r, &mut line).await? {
                        return Ok(());
                    }
                    if line.is_empty() {
                        break;
                    }
                    if err.is_none() {
                        if let Err(e) = p.feed(&line) {
                            err = Some(e);
                        }
                    }
                }
                let errno = match err {
                    Some(e) => {
                        warn!(interface = %dev.name, error = %e, "UAPI set refused");
                        e.errno()
                    }
                    None => match dev.apply(p.finish()).await {
                        Ok(()) => 0,
                        Err(e) => {
                            warn!(interface = %dev.name, error = %e, "UAPI set failed");
                            uapi::EIO
                        }
                    },
                };
                w.write_all(format!("errno={errno}\n\n").as_bytes()).await?;
            }
        }
    }
}

/// A client for the `show=json` extension: what `gatewire show` prints.
pub async fn query_show(iface: &str) -> anyhow::Result<crate::wg::device::ShowInterface> {
    Ok(serde_json::from_value(query_show_value(iface).await?)?)
}

/// `show=json` as raw JSON: the interface plus any extra objects (`proxy`, ...).
pub async fn query_show_value(iface: &str) -> anyhow::Result<serde_json::Value> {
    let mut s = UnixStream::connect(socket_path(iface)).await?;
    s.write_all(b"show=json\n\n").await?;
    let mut r = BufReader::new(s);
    let mut first = String::new();
    r.read_line(&mut first).await?;
    if first.starts_with("errno=") {
        anyhow::bail!("{iface} is not a gatewire interface ({})", first.trim());
    }
    Ok(serde_json::from_str(first.trim())?)
}
