//! The supervised `yggdrasil` sidecar (docs/yggdrasil.md 6.A): gatewire
//! writes the daemon's config (mode 0600, in a private 0700 directory),
//! starts `yggdrasil -useconffile`, waits for its admin socket, probes that
//! socket every `PROBE_INTERVAL` (`Liveness`, pure), and restarts the
//! daemon with a bounded, jittered exponential backoff ([`Backoff`], pure)
//! when it dies, will not start or leaves `PROBE_FAILS` probes in a row
//! unanswered (a hung process is stopped first). The daemon's TUN carries
//! 200::/7 (yggdrasil gives it `<address>/7`).
//!
//! The daemon never outlives gatewire: it runs in its own process group with
//! `PR_SET_PDEATHSIG` (SIGTERM) set before `exec`, the child handle is
//! `kill_on_drop`, and [`Supervisor::shutdown`] stops it (SIGTERM, then
//! SIGKILL). Nothing here can fail the caller: every problem is logged,
//! recorded in the status file (`gatewire show`) and retried, so the
//! WireGuard side is never taken down by the overlay.

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::unix_secs;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use super::admin_client::AdminClient;
use super::settings::YggSettings;
use super::Version;

/// First restart delay.
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest delay between two starts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A daemon that ran this long resets the backoff.
pub const BACKOFF_STABLE: Duration = Duration::from_secs(30);
/// How long the admin socket gets to answer after a start.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Between two liveness probes (one `getSelf`) of a started daemon's admin
/// socket.
const PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// Failed probes in a row after which the daemon is restarted.
const PROBE_FAILS: u32 = 3;
/// Between SIGTERM and SIGKILL at shutdown.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Daemon output lines kept for the failure report.
const TAIL_LINES: usize = 12;
/// Of those, how many go into the failure message.
const REPORT_LINES: usize = 4;
/// Longest daemon output line read; the rest of a longer one is dropped.
const LINE_MAX: usize = 4096;

pub use crate::backoff::Backoff;

/// The supervisor's waits: [`Timing::default`] in service, shorter in tests.
#[derive(Debug, Clone, Copy)]
struct Timing {
    ready: Duration,
    probe_interval: Duration,
    probe_fails: u32,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            ready: READY_TIMEOUT,
            probe_interval: PROBE_INTERVAL,
            probe_fails: PROBE_FAILS,
        }
    }
}

/// What one liveness probe's result calls for ([`Liveness::on_probe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeAction {
    /// Nothing changes.
    Keep,
    /// The admin socket answers, first or again: the state is `running`.
    Answering,
    /// It stopped answering: the state is `unresponsive`.
    Silent,
    /// It did not answer the allowed number of probes in a row: the daemon
    /// is restarted.
    Restart,
}

/// Liveness of a started daemon's admin socket [pure]: counts the failed
/// probes in a row and tells when the state changes and when to restart.
/// The caller does the probing and the waiting.
#[derive(Debug, Clone)]
struct Liveness {
    limit: u32,
    fails: u32,
    answering: bool,
}

impl Liveness {
    /// `limit` failed probes in a row restart the daemon (at least one);
    /// `answering`: whether the socket answered at the start.
    fn new(limit: u32, answering: bool) -> Self {
        Self {
            limit: limit.max(1),
            fails: 0,
            answering,
        }
    }

    /// Failed probes in a row so far.
    fn fails(&self) -> u32 {
        self.fails
    }

    /// The allowed failed probes in a row.
    fn limit(&self) -> u32 {
        self.limit
    }

    /// Takes the result of one probe.
    fn on_probe(&mut self, ok: bool) -> ProbeAction {
        if ok {
            self.fails = 0;
            if self.answering {
                return ProbeAction::Keep;
            }
            self.answering = true;
            return ProbeAction::Answering;
        }
        self.fails = self.fails.saturating_add(1);
        if self.fails >= self.limit {
            return ProbeAction::Restart;
        }
        if self.answering {
            self.answering = false;
            return ProbeAction::Silent;
        }
        ProbeAction::Keep
    }
}

/// Where the supervisor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Detecting the version, writing the config, waiting for the admin socket.
    Starting,
    /// The daemon runs and its admin socket answered.
    Running,
    /// The daemon runs but its admin socket did not answer in time after
    /// the start, or did not answer the last probe; it is restarted after
    /// `PROBE_FAILS` failed probes in a row.
    Unresponsive,
    /// Waiting before the next start.
    Backoff,
    /// Shut down.
    Stopped,
}

/// What the supervisor publishes (also written to `status.json` in the
/// daemon's directory for `gatewire show`). Holds no secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The daemon's TUN.
    pub interface: String,
    /// Its admin socket.
    pub admin_socket: PathBuf,
    /// The executable.
    pub binary: PathBuf,
    /// The dialect in use (configured or detected), once known.
    pub version: Option<String>,
    /// Supervisor state.
    pub state: State,
    /// Daemon PID while it runs.
    pub pid: Option<u32>,
    /// Starts after the first one.
    pub restarts: u64,
    /// Why the last run ended or could not start.
    pub last_error: Option<String>,
    /// Unix time of the last state change.
    pub since: u64,
    /// Milliseconds until the next start (in `backoff`).
    pub retry_in_ms: Option<u64>,
    /// Own public key (hex).
    pub public_key: String,
    /// Own 200::/7 address.
    pub address: String,
    /// Own 300::/64 subnet.
    pub subnet: String,
    /// PID of the supervising gatewire.
    pub supervisor_pid: u32,
}

/// The status file of a daemon directory.
pub fn status_path(dir: &Path) -> PathBuf {
    dir.join("status.json")
}

struct Shared {
    settings: YggSettings,
    timing: Timing,
    status: Mutex<Status>,
    tail: Mutex<VecDeque<String>>,
    /// Whether this supervisor holds the lock of the daemon directory;
    /// until then (and without it) the status is not written there.
    owns_dir: AtomicBool,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut Status)) {
        let snapshot = {
            let mut s = self.status.lock();
            f(&mut s);
            s.clone()
        };
        if !self.owns_dir.load(Ordering::Acquire) {
            return;
        }
        let dir = self.settings.dir();
        let write = || -> std::io::Result<()> {
            let tmp = dir.join("status.json.tmp");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(&snapshot).unwrap_or_default())?;
            std::fs::rename(&tmp, status_path(&dir))
        };
        if let Err(e) = write() {
            debug!(error = %e, "cannot write yggdrasil status file");
        }
    }

    fn set_state(&self, state: State) {
        self.update(|s| {
            s.state = state;
            s.since = unix_secs();
        });
    }

    /// The daemon's last few output lines, for a failure report.
    fn tail_text(&self) -> String {
        let t = self.tail.lock();
        let skip = t.len().saturating_sub(REPORT_LINES);
        t.iter().skip(skip).cloned().collect::<Vec<_>>().join(" | ")
    }
}

/// A running supervisor. Dropping it aborts the task, which kills the daemon
/// (`kill_on_drop`) and removes its files; [`Supervisor::shutdown`] stops
/// it gracefully.
pub struct Supervisor {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Supervisor {
    /// Starts supervising in the background. Never fails: problems are
    /// logged and retried.
    pub fn start(settings: YggSettings) -> Supervisor {
        Self::start_with(settings, Timing::default())
    }

    fn start_with(settings: YggSettings, timing: Timing) -> Supervisor {
        let pk = settings.private_key.public_key();
        let status = Status {
            interface: settings.interface.clone(),
            admin_socket: settings.admin_socket.clone(),
            binary: settings.binary.clone(),
            version: settings.version.map(|v| v.to_string()),
            state: State::Starting,
            pid: None,
            restarts: 0,
            last_error: None,
            since: unix_secs(),
            retry_in_ms: None,
            public_key: pk.to_hex(),
            address: pk.address().to_string(),
            subnet: pk.subnet().to_string(),
            supervisor_pid: std::process::id(),
        };
        let shared = Arc::new(Shared {
            settings,
            timing,
            status: Mutex::new(status),
            tail: Mutex::new(VecDeque::new()),
            owns_dir: AtomicBool::new(false),
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(shared.clone(), stop_rx));
        Supervisor {
            shared,
            stop,
            task: Some(task),
        }
    }

    /// A snapshot of the status.
    pub fn status(&self) -> Status {
        self.shared.status.lock().clone()
    }

    /// Stops the daemon (SIGTERM, SIGKILL after a grace period) and waits.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(mut t) = self.task.take() {
            if tokio::time::timeout(STOP_GRACE + Duration::from_secs(2), &mut t)
                .await
                .is_err()
            {
                warn!("yggdrasil supervisor did not stop in time; aborting it");
                // Dropping its state kills the daemon and removes its files.
                t.abort();
                let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
            }
        }
    }
}

/// Resolves once a stop was requested (or the sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}

/// `f`'s output, or `None` if a stop was requested first.
async fn unless_stopped<T>(
    stop: &mut watch::Receiver<bool>,
    f: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        v = f => Some(v),
        _ = stopped(stop) => None,
    }
}

/// Removes the daemon's files however the supervisor ends (stop, abort,
/// panic): the config holds the private key and the status is stale. The
/// socket stays if another daemon answers on it. The directory lock is
/// released (its file closed) only after the files are gone.
struct Cleanup {
    dir: PathBuf,
    socket: PathBuf,
    _lock: std::fs::File,
}

/// Takes the exclusive lock of a daemon directory (`<dir>/lock`), held
/// while the returned file stays open. Two supervisors with the same
/// `interface` (a hub and a node on one host both default to `ygg0`) would
/// otherwise overwrite and remove each other's config and status.
fn lock_dir(dir: &Path) -> Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    let path = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor `f` owns; no memory is passed.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.kind() == std::io::ErrorKind::WouldBlock {
            format!(
                "another gatewire supervises Yggdrasil in {}; set a different [yggdrasil] interface",
                dir.display()
            )
        } else {
            format!("cannot lock {}: {e}", path.display())
        });
    }
    Ok(f)
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("yggdrasil.conf"));
        let _ = std::fs::remove_file(status_path(&self.dir));
        let _ = clear_stale_socket(&self.socket);
    }
}

/// Removes a socket file left by a killed daemon. One that answers belongs
/// to another live yggdrasil (a hub and a node on one host both default to
/// `ygg0`) and is an error.
fn clear_stale_socket(path: &Path) -> Result<(), String> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(format!(
            "admin socket {} is in use by another yggdrasil; set a different [yggdrasil] interface",
            path.display()
        ));
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

enum Outcome {
    Stopped,
    Failed(String),
}

async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let s = &shared.settings;
    let dir = s.dir();
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
    {
        error!(dir = %dir.display(), error = %e, "yggdrasil: cannot create the state directory");
    }
    // Without the directory's lock nothing is started, written or removed:
    // the files there belong to the supervisor that holds it.
    let lock = match lock_dir(&dir) {
        Ok(f) => f,
        Err(e) => {
            error!(interface = %s.interface, "yggdrasil not started: {e}");
            shared.update(|st| {
                st.state = State::Stopped;
                st.since = unix_secs();
                st.last_error = Some(e);
            });
            return;
        }
    };
    shared.owns_dir.store(true, Ordering::Release);
    if let Err(e) = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)) {
        error!(dir = %dir.display(), error = %e, "yggdrasil: cannot restrict the state directory");
    }
    let cleanup = Cleanup {
        dir: dir.clone(),
        socket: s.admin_socket.clone(),
        _lock: lock,
    };
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX, BACKOFF_STABLE);
    let mut first = true;
    loop {
        if !first {
            shared.update(|st| st.restarts += 1);
        }
        first = false;
        shared.update(|st| {
            st.state = State::Starting;
            st.since = unix_secs();
            st.retry_in_ms = None;
            st.pid = None;
        });
        let t0 = Instant::now();
        let reason = match run_once(&shared, &mut stop).await {
            Outcome::Stopped => break,
            Outcome::Failed(r) => r,
        };
        let jitter =
            f64::from(rand_core::RngCore::next_u32(&mut rand_core::OsRng)) / f64::from(u32::MAX);
        let delay = backoff.next_delay(t0.elapsed(), jitter);
        let restarts = shared.status.lock().restarts;
        error!(
            interface = %s.interface,
            retry_in_s = %format!("{:.2}", delay.as_secs_f64()),
            restarts,
            "yggdrasil: {reason}"
        );
        shared.update(|st| {
            st.state = State::Backoff;
            st.since = unix_secs();
            st.pid = None;
            st.last_error = Some(reason);
            st.retry_in_ms = Some(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(&mut stop) => break,
        }
    }
    shared.update(|st| {
        st.state = State::Stopped;
        st.since = unix_secs();
        st.pid = None;
    });
    drop(cleanup);
    info!(interface = %s.interface, "yggdrasil stopped");
}

/// Asks `binary -version`, then (Debian builds say `unknown`) whether
/// `-genconf -json` has a `PublicKey` field, which only 0.4 writes.
pub async fn detect_version(binary: &Path) -> Result<Version, String> {
    let out = |args: &'static [&'static str]| async move {
        let o = tokio::time::timeout(
            Duration::from_secs(10),
            Command::new(binary)
                .args(args)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| format!("`{} {}` timed out", binary.display(), args.join(" ")))?
        .map_err(|e| spawn_error(binary, &e))?;
        if !out_ok(&o) {
            return Err(format!(
                "`{} {}` failed ({}){}",
                binary.display(),
                args.join(" "),
                o.status,
                first_line(&o.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let v = out(&["-version"]).await?;
    if let Some(version) = version_from_text(&v) {
        return Ok(version);
    }
    let conf = out(&["-genconf", "-json"]).await?;
    let j: serde_json::Value = serde_json::from_str(&conf)
        .map_err(|e| format!("`{} -genconf -json` is not JSON: {e}", binary.display()))?;
    Ok(if j.get("PublicKey").is_some() {
        Version::V0_4
    } else {
        Version::V0_5
    })
}

fn out_ok(o: &std::process::Output) -> bool {
    o.status.success()
}

fn first_line(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    match s.lines().map(str::trim).find(|l| !l.is_empty()) {
        Some(l) => format!(": {l}"),
        None => String::new(),
    }
}

/// The release line in `-version` output ("Build version: 0.5.14").
pub fn version_from_text(s: &str) -> Option<Version> {
    s.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case("build version"))
        .find_map(|(_, v)| {
            let v = v.trim().trim_start_matches('v');
            if v.starts_with("0.4.") || v == "0.4" {
                Some(Version::V0_4)
            } else if v.starts_with("0.5.") || v == "0.5" {
                Some(Version::V0_5)
            } else {
                None
            }
        })
}

fn spawn_error(binary: &Path, e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "daemon binary {} not found (install yggdrasil or set [yggdrasil] binary)",
            binary.display()
        ),
        std::io::ErrorKind::PermissionDenied => {
            format!("daemon binary {} is not executable", binary.display())
        }
        _ => format!("cannot start {}: {e}", binary.display()),
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn spawn_daemon(binary: &Path, conf: &Path) -> std::io::Result<Child> {
    let mut cmd = Command::new(binary);
    for v in crate::sd_notify::ENV {
        cmd.env_remove(v);
    }
    cmd.arg("-useconffile")
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own group: a terminal's ^C reaches gatewire only, which then
        // stops the daemon in order.
        .process_group(0);
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls (prctl, getppid, kill) between fork
    // and exec. PDEATHSIG fires when the forking thread ends; tokio's worker
    // threads live as long as the runtime, i.e. as long as gatewire.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // gatewire died between fork and prctl: do not start orphaned.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// The next line of `r` without its line end, at most `max` bytes of it
/// (the rest up to the newline is read and dropped), invalid UTF-8
/// replaced; `None` at the end of the stream.
async fn next_line_capped<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut any = false;
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            break;
        }
        any = true;
        let (part, used, end) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (buf.get(..i).unwrap_or_default(), i + 1, true),
            None => (buf, buf.len(), false),
        };
        let room = max.saturating_sub(line.len());
        line.extend_from_slice(part.get(..room).unwrap_or(part));
        r.consume(used);
        if end {
            break;
        }
    }
    if !any {
        return Ok(None);
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

fn forward_lines(
    shared: Arc<Shared>,
    r: impl AsyncRead + Unpin + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut r = BufReader::new(r);
        // Read to the end whatever comes: a closed pipe kills the daemon
        // (SIGPIPE) on its next line.
        while let Ok(Some(line)) = next_line_capped(&mut r, LINE_MAX).await {
            let line: String = line.chars().take(400).collect();
            // Kernel link-local chatter the daemon complains about.
            if line.contains("incorrect source address") {
                debug!(target: "yggdrasil", "{line}");
            } else {
                info!(target: "yggdrasil", "{line}");
            }
            let mut t = shared.tail.lock();
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line);
        }
    })
}

async fn admin_self(sock: PathBuf, version: Version) -> Result<super::admin::SelfInfo, String> {
    tokio::task::spawn_blocking(move || {
        AdminClient::connect(&sock, version, Duration::from_secs(2))
            .and_then(|mut c| c.get_self())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Whether `iface` holds `addr` (then the kernel routes the /7 prefix, i.e.
/// 200::/7, through it).
fn tun_has_address(iface: &str, addr: std::net::Ipv6Addr) -> bool {
    getifaddrs::getifaddrs().is_ok_and(|mut it| {
        it.any(|i| i.name == iface && i.address.ip_addr() == Some(std::net::IpAddr::V6(addr)))
    })
}

async fn stop_child(child: &mut Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: signalling our own child by PID. A stopped daemon
        // (SIGSTOP) acts on the SIGTERM only once continued.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
            libc::kill(pid, libc::SIGCONT);
        }
        if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok() {
            return;
        }
        warn!(pid, "yggdrasil did not stop on SIGTERM; killing it");
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}

fn exit_reason(
    shared: &Shared,
    status: std::io::Result<std::process::ExitStatus>,
    ran: Duration,
) -> String {
    use std::os::unix::process::ExitStatusExt;
    let how = match status {
        Ok(st) => match (st.code(), st.signal()) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => format!("ended ({st})"),
        },
        Err(e) => format!("could not be waited for: {e}"),
    };
    let tail = shared.tail_text();
    let mut r = format!(
        "daemon {} {how} after {:.1} s",
        shared.settings.binary.display(),
        ran.as_secs_f64()
    );
    if !tail.is_empty() {
        r.push_str("; last output: ");
        r.push_str(&tail);
    }
    r
}

async fn run_once(shared: &Arc<Shared>, stop: &mut watch::Receiver<bool>) -> Outcome {
    let s = &shared.settings;
    if *stop.borrow() {
        return Outcome::Stopped;
    }
    let version = match s.version {
        Some(v) => v,
        None => match unless_stopped(stop, detect_version(&s.binary)).await {
            None => return Outcome::Stopped,
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                return Outcome::Failed(format!(
                    "cannot tell the daemon's version: {e} (or set [yggdrasil] version)"
                ))
            }
        },
    };
    shared.update(|st| st.version = Some(version.to_string()));
    let text = match s.daemon_settings().render(version) {
        Ok(t) => t,
        Err(e) => {
            return Outcome::Failed(format!("bad daemon config for yggdrasil {version}: {e}"))
        }
    };
    if let Some(parent) = s.admin_socket.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    // A file left by a killed daemon would only delay the new one.
    if let Err(e) = clear_stale_socket(&s.admin_socket) {
        return Outcome::Failed(e);
    }
    let conf = s.dir().join("yggdrasil.conf");
    if let Err(e) = write_private(&conf, &text) {
        return Outcome::Failed(format!("cannot write {}: {e}", conf.display()));
    }
    shared.tail.lock().clear();
    let t0 = Instant::now();
    let mut child = match spawn_daemon(&s.binary, &conf) {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(spawn_error(&s.binary, &e)),
    };
    let pid = child.id();
    let mut fwd = Vec::new();
    if let Some(o) = child.stdout.take() {
        fwd.push(forward_lines(shared.clone(), o));
    }
    if let Some(e) = child.stderr.take() {
        fwd.push(forward_lines(shared.clone(), e));
    }
    shared.update(|st| st.pid = pid);
    info!(
        interface = %s.interface,
        pid = pid.unwrap_or(0),
        version = %version,
        config = %conf.display(),
        "yggdrasil started"
    );
    let mut daemon = Daemon {
        shared,
        child,
        fwd,
        t0,
    };
    match supervise(&mut daemon, stop, version).await {
        Err(outcome) => outcome,
        Ok(never) => match never {},
    }
}

/// One started daemon and the readers of its output.
struct Daemon<'a> {
    shared: &'a Shared,
    child: Child,
    fwd: Vec<JoinHandle<()>>,
    t0: Instant,
}

impl Daemon<'_> {
    /// `f`'s output, unless the daemon exits first (then why) or a stop is
    /// requested (then the daemon is stopped).
    async fn watch<T>(
        &mut self,
        stop: &mut watch::Receiver<bool>,
        f: impl std::future::Future<Output = T>,
    ) -> Result<T, Outcome> {
        tokio::select! {
            v = f => Ok(v),
            st = self.child.wait() => {
                // Let the output readers drain so the reason shows the daemon's words.
                for f in self.fwd.drain(..) {
                    let _ = tokio::time::timeout(Duration::from_millis(500), f).await;
                }
                Err(Outcome::Failed(exit_reason(self.shared, st, self.t0.elapsed())))
            }
            _ = stopped(stop) => {
                stop_child(&mut self.child).await;
                Err(Outcome::Stopped)
            }
        }
    }
}

/// Waits for the admin socket, then probes it every `probe_interval` until
/// the daemon exits, a stop is requested or too many probes in a row fail
/// (then the daemon is stopped). Always ends in `Err`, with how the run
/// ended.
async fn supervise(
    d: &mut Daemon<'_>,
    stop: &mut watch::Receiver<bool>,
    version: Version,
) -> Result<std::convert::Infallible, Outcome> {
    let shared = d.shared;
    let s = &shared.settings;
    let t = shared.timing;
    let probe = || admin_self(s.admin_socket.clone(), version);

    // Readiness: the admin socket answers getSelf.
    let deadline = tokio::time::Instant::now() + t.ready;
    let mut last_err = String::new();
    let ready = loop {
        d.watch(stop, tokio::time::sleep(Duration::from_millis(200)))
            .await?;
        match d.watch(stop, probe()).await? {
            Ok(me) => break Some(me),
            Err(e) => last_err = e,
        }
        if tokio::time::Instant::now() >= deadline {
            break None;
        }
    };
    let mut live = Liveness::new(t.probe_fails, ready.is_some());
    let mut announced = ready.is_some();
    match ready {
        Some(me) => {
            // yggdrasil gives its TUN <address>/7: the kernel then routes
            // 200::/7 (node addresses and 300::/8 subnets) through it.
            let mut routed = false;
            for _ in 0..25 {
                if tun_has_address(&s.interface, me.address) {
                    routed = true;
                    break;
                }
                d.watch(stop, tokio::time::sleep(Duration::from_millis(200)))
                    .await?;
            }
            announce(s, &me, routed);
            shared.set_state(State::Running);
        }
        None => {
            warn!(
                interface = %s.interface,
                socket = %s.admin_socket.display(),
                error = %last_err,
                "yggdrasil runs but its admin socket does not answer"
            );
            shared.set_state(State::Unresponsive);
        }
    }

    // Liveness: a daemon that hangs keeps its process but stops answering.
    loop {
        d.watch(stop, tokio::time::sleep(t.probe_interval)).await?;
        let res = d.watch(stop, probe()).await?;
        match (live.on_probe(res.is_ok()), res) {
            (ProbeAction::Answering, Ok(me)) => {
                if announced {
                    info!(
                        interface = %s.interface,
                        socket = %s.admin_socket.display(),
                        "yggdrasil's admin socket answers again"
                    );
                } else {
                    announce(s, &me, tun_has_address(&s.interface, me.address));
                    announced = true;
                }
                shared.set_state(State::Running);
            }
            (ProbeAction::Restart, Err(e)) => {
                warn!(
                    interface = %s.interface,
                    socket = %s.admin_socket.display(),
                    error = %e,
                    "yggdrasil's admin socket did not answer {} probes in a row; restarting the daemon",
                    live.fails()
                );
                stop_child(&mut d.child).await;
                return Err(Outcome::Failed(format!(
                    "admin socket {} did not answer {} probes in a row (last: {e}); daemon {} stopped after {:.1} s",
                    s.admin_socket.display(),
                    live.fails(),
                    s.binary.display(),
                    d.t0.elapsed().as_secs_f64()
                )));
            }
            (action, Err(e)) => {
                warn!(
                    interface = %s.interface,
                    socket = %s.admin_socket.display(),
                    error = %e,
                    "yggdrasil's admin socket did not answer a probe ({} of {} in a row before a restart)",
                    live.fails(),
                    live.limit()
                );
                if action == ProbeAction::Silent {
                    shared.set_state(State::Unresponsive);
                }
            }
            (_, Ok(_)) => {}
        }
    }
}

/// Logs that the daemon answers: a key other than the configured one, and
/// whether its TUN carries its address (then 200::/7 is routed there).
fn announce(s: &YggSettings, me: &super::admin::SelfInfo, routed: bool) {
    if me.key != s.private_key.public_key() {
        warn!(
            interface = %s.interface,
            "yggdrasil reports key {} but the config has {}",
            me.key,
            s.private_key.public_key()
        );
    }
    if routed {
        info!(
            interface = %s.interface,
            address = %me.address,
            subnet = %me.subnet,
            peers = s.peers.len(),
            "yggdrasil running; 200::/7 routed through {}",
            s.interface
        );
    } else {
        warn!(
            interface = %s.interface,
            address = %me.address,
            "yggdrasil running but {} does not carry {}/7; 200::/7 is not routed (no CAP_NET_ADMIN or /dev/net/tun?)",
            s.interface,
            me.address
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn b() -> Backoff {
        Backoff::new(
            Duration::from_millis(500),
            Duration::from_secs(60),
            Duration::from_secs(30),
        )
    }

    #[test]
    fn backoff_doubles_and_is_bounded() {
        let mut p = b();
        let short = Duration::from_millis(10);
        let full: Vec<Duration> = (0..12).map(|_| p.next_delay(short, 1.0)).collect();
        assert_eq!(full[0], Duration::from_millis(500));
        assert_eq!(full[1], Duration::from_secs(1));
        assert_eq!(full[2], Duration::from_secs(2));
        assert_eq!(full[7], Duration::from_secs(60));
        assert!(full.iter().all(|d| *d <= BACKOFF_MAX));
        // Many failures never overflow.
        for _ in 0..100 {
            assert!(p.next_delay(short, 1.0) <= BACKOFF_MAX);
        }
        assert_eq!(p.next_delay(short, 1.0), Duration::from_secs(60));
    }

    #[test]
    fn backoff_jitter_stays_in_upper_half() {
        let mut p = b();
        let d = p.next_delay(Duration::ZERO, 0.0);
        assert_eq!(d, Duration::from_millis(250));
        let mut p = b();
        assert_eq!(
            p.next_delay(Duration::ZERO, 0.5),
            Duration::from_millis(375)
        );
        let mut p = b();
        assert_eq!(
            p.next_delay(Duration::ZERO, 7.0),
            Duration::from_millis(500)
        );
        let mut p = b();
        assert_eq!(
            p.next_delay(Duration::ZERO, f64::NAN),
            Duration::from_millis(250)
        );
        for j in 0..=100 {
            let mut p = b();
            for _ in 0..5 {
                p.next_delay(Duration::ZERO, 1.0);
            }
            let d = p.next_delay(Duration::ZERO, f64::from(j) / 100.0);
            assert!(
                d >= Duration::from_secs(8) && d <= Duration::from_secs(16),
                "{d:?}"
            );
        }
    }

    #[test]
    fn backoff_resets_after_a_stable_run() {
        let mut p = b();
        for _ in 0..6 {
            p.next_delay(Duration::from_secs(1), 1.0);
        }
        assert_eq!(p.failures(), 6);
        assert_eq!(
            p.next_delay(Duration::from_secs(30), 1.0),
            Duration::from_millis(500)
        );
        assert_eq!(
            p.next_delay(Duration::from_secs(29), 1.0),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn probes_that_fail_in_a_row_restart_and_one_answer_recovers() {
        use ProbeAction::*;
        let mut l = Liveness::new(3, true);
        assert_eq!(l.on_probe(true), Keep);
        assert_eq!(l.on_probe(false), Silent);
        assert_eq!(l.fails(), 1);
        assert_eq!(l.on_probe(false), Keep);
        assert_eq!(l.fails(), 2);
        // One answer sets `running` again and starts the count over.
        assert_eq!(l.on_probe(true), Answering);
        assert_eq!(l.fails(), 0);
        assert_eq!(l.on_probe(true), Keep);
        assert_eq!(l.on_probe(false), Silent);
        assert_eq!(l.on_probe(false), Keep);
        assert_eq!(l.on_probe(false), Restart);
        assert_eq!(l.fails(), 3);
        // Failures that never come three in a row never restart.
        let mut l = Liveness::new(3, true);
        for _ in 0..50 {
            assert_ne!(l.on_probe(false), Restart);
            assert_ne!(l.on_probe(false), Restart);
            assert_ne!(l.on_probe(true), Restart);
        }
    }

    #[test]
    fn a_socket_that_never_answered_is_restarted_after_as_many_probes() {
        use ProbeAction::*;
        let mut l = Liveness::new(3, false);
        assert_eq!(l.on_probe(false), Keep);
        assert_eq!(l.on_probe(false), Keep);
        assert_eq!(l.on_probe(false), Restart);
        // A late first answer is `running`.
        let mut l = Liveness::new(3, false);
        assert_eq!(l.on_probe(false), Keep);
        assert_eq!(l.on_probe(true), Answering);
        assert_eq!(l.on_probe(true), Keep);
        assert_eq!(l.fails(), 0);
    }

    #[test]
    fn a_probe_limit_of_one_restarts_at_the_first_failure() {
        let mut l = Liveness::new(0, true);
        assert_eq!(l.limit(), 1);
        assert_eq!(l.on_probe(false), ProbeAction::Restart);
        let mut l = Liveness::new(1, true);
        assert_eq!(l.on_probe(true), ProbeAction::Keep);
        assert_eq!(l.on_probe(false), ProbeAction::Restart);
    }

    #[test]
    fn version_text() {
        assert_eq!(
            version_from_text("Build name: yggdrasil\nBuild version: 0.5.14\n"),
            Some(Version::V0_5)
        );
        assert_eq!(
            version_from_text("Build name: yggdrasil\nBuild version: v0.4.7\n"),
            Some(Version::V0_4)
        );
        assert_eq!(
            version_from_text("Build name: unknown\nBuild version: unknown\n"),
            None
        );
        assert_eq!(version_from_text(""), None);
    }

    fn settings(dir: &Path, binary: &str) -> YggSettings {
        let raw: super::super::settings::RawYggdrasil = toml::from_str(&format!(
            "private_key = \"2fb6bcc83c6976e63c76f3286278c441af929b4902a0544cd6e1e401b2a5d3328988ec86fd70a116524ef24b11d0aed0ef374a69b1014ae93a82716a7fadca54\"\n\
             binary = \"{binary}\"\nversion = \"0.4\"\nadmin_socket = \"{}/a.sock\"\n",
            dir.display()
        ))
        .unwrap();
        let mut s = super::super::settings::validate(raw, dir).unwrap();
        s.state_dir = dir.to_path_buf();
        s
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("gw-ygg-sup-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_daemon_that_will_not_start_is_retried_and_reported() {
        let d = tmp("false");
        let sup = Supervisor::start(settings(&d, "/bin/false"));
        let t0 = Instant::now();
        while sup.status().restarts < 2 && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let st = sup.status();
        assert!(st.restarts >= 2, "{st:?}");
        let err = st.last_error.clone().unwrap();
        assert!(
            err.contains("/bin/false") && err.contains("status 1"),
            "{err}"
        );
        // The config was written privately.
        let conf = d.join("ygg-ygg0").join("yggdrasil.conf");
        let mode = std::fs::metadata(&conf).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let file: Status =
            serde_json::from_slice(&std::fs::read(status_path(&d.join("ygg-ygg0"))).unwrap())
                .unwrap();
        assert_eq!(file.address, "200:ecee:26f2:51e:bdd3:5b62:1b69:dc5e");
        assert!(!std::fs::read_to_string(status_path(&d.join("ygg-ygg0")))
            .unwrap()
            .contains("2fb6bcc8"));
        sup.shutdown().await;
        assert!(
            !conf.exists(),
            "the config with the key is removed at shutdown"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_binary_is_named() {
        let d = tmp("missing");
        let sup = Supervisor::start(settings(&d, "/nonexistent/yggdrasil"));
        let t0 = Instant::now();
        while sup.status().last_error.is_none() && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let st = sup.status();
        let err = st.last_error.unwrap_or_default();
        assert!(
            err.contains("/nonexistent/yggdrasil") && err.contains("not found"),
            "{err}"
        );
        assert_eq!(st.state, State::Backoff);
        sup.shutdown().await;
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_stops_a_running_child() {
        // A stand-in daemon that just sleeps: shutdown must end it.
        let d = tmp("sleep");
        let script = d.join("fake-ygg");
        std::fs::write(&script, "#!/bin/sh\necho fake daemon up\nexec sleep 60\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let sup = Supervisor::start(settings(&d, script.to_str().unwrap()));
        let t0 = Instant::now();
        while sup.status().pid.is_none() && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pid = i32::try_from(sup.status().pid.unwrap()).unwrap();
        sup.shutdown().await;
        // SAFETY: probing a PID we started.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "daemon {pid} survived shutdown");
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Answers every request on `sock` with a 0.4.7-shaped `getSelf` reply
    /// for the test key until `quit` is set; then the socket is gone.
    fn fake_admin(
        sock: PathBuf,
        quit: Arc<AtomicBool>,
    ) -> (
        std::thread::JoinHandle<()>,
        Arc<std::sync::atomic::AtomicU32>,
    ) {
        use std::io::{BufRead, BufReader as StdBufReader};
        let served = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let count = served.clone();
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        l.set_nonblocking(true).unwrap();
        let reply = r#"{"status":"success","request":null,"response":{
            "build_name":"unknown","build_version":"unknown",
            "key":"8988ec86fd70a116524ef24b11d0aed0ef374a69b1014ae93a82716a7fadca54",
            "address":"200:ecee:26f2:51e:bdd3:5b62:1b69:dc5e","coords":[],
            "subnet":"300:ecee:26f2:51e::/64"}}
"#;
        let t = std::thread::spawn(move || {
            while !quit.load(Ordering::Acquire) {
                let Ok((c, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                c.set_nonblocking(false).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                let mut w = c.try_clone().unwrap();
                let mut r = StdBufReader::new(c);
                let mut line = String::new();
                while matches!(r.read_line(&mut line), Ok(n) if n > 0) {
                    if w.write_all(reply.as_bytes()).is_err() {
                        break;
                    }
                    count.fetch_add(1, Ordering::AcqRel);
                    line.clear();
                }
            }
            drop(l);
            let _ = std::fs::remove_file(&sock);
        });
        (t, served)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_admin_socket_is_probed_recovers_and_is_restarted() {
        // A stand-in daemon that never opens its admin socket; the test
        // answers on it for a while instead.
        let d = tmp("probe");
        let script = d.join("fake-ygg");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 60\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let s = settings(&d, script.to_str().unwrap());
        let sock = s.admin_socket.clone();
        let timing = Timing {
            ready: Duration::from_millis(300),
            probe_interval: Duration::from_millis(100),
            probe_fails: 3,
        };
        let sup = Supervisor::start_with(s, timing);
        let wait = |what: &'static str, f: &dyn Fn(&Status) -> bool| {
            let t0 = Instant::now();
            loop {
                let st = sup.status();
                if f(&st) {
                    return st;
                }
                assert!(t0.elapsed() < Duration::from_secs(10), "{what}: {st:?}");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        let st = wait("unresponsive after the start", &|st| {
            st.state == State::Unresponsive
        });
        let first = st.pid.unwrap();
        assert_eq!(st.restarts, 0);
        // A late answer: running, same daemon.
        let quit = Arc::new(AtomicBool::new(false));
        let (server, served) = fake_admin(sock.clone(), quit.clone());
        let st = wait("running once the socket answers", &|st| {
            st.state == State::Running
        });
        assert_eq!((st.pid, st.restarts), (Some(first), 0));
        // It keeps being probed and stays running.
        let n = served.load(Ordering::Acquire);
        wait("probed again", &|_| served.load(Ordering::Acquire) >= n + 3);
        assert_eq!(sup.status().state, State::Running);
        // Silent: restarted after three probes.
        quit.store(true, Ordering::Release);
        server.join().unwrap();
        let st = wait("restarted", &|st| st.restarts == 1);
        let err = st.last_error.clone().unwrap_or_default();
        assert!(
            err.contains(&sock.display().to_string())
                && err.contains("did not answer 3 probes in a row"),
            "{err}"
        );
        // SAFETY: probing a PID we started.
        let alive = unsafe { libc::kill(i32::try_from(first).unwrap(), 0) } == 0;
        assert!(!alive, "the silent daemon {first} was not stopped");
        // The new one never answers: restarted again rather than left.
        let st = wait("a new daemon", &|st| st.pid.is_some_and(|p| p != first));
        assert_eq!(st.restarts, 1);
        wait("restarted again", &|st| st.restarts == 2);
        sup.shutdown().await;
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn output_lines_are_capped_lossy_and_read_to_the_end() {
        let mut text = b"bad \xff byte\r\nnext line\n".to_vec();
        text.extend(std::iter::repeat_n(b'x', 10_000));
        text.extend_from_slice(b"\nlast without newline");
        // A small buffer: lines span several reads.
        let mut r = BufReader::with_capacity(7, text.as_slice());
        let mut got = Vec::new();
        while let Some(l) = next_line_capped(&mut r, 4096).await.unwrap() {
            got.push(l);
        }
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[0], "bad \u{fffd} byte");
        assert_eq!(got[1], "next line");
        assert_eq!(got[2], "x".repeat(4096));
        assert_eq!(got[3], "last without newline");
        let mut empty = BufReader::new(&b""[..]);
        assert_eq!(next_line_capped(&mut empty, 4096).await.unwrap(), None);
    }

    #[test]
    fn a_socket_another_daemon_answers_on_is_left_alone() {
        let d = tmp("sockcheck");
        let p = d.join("a.sock");
        let l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        let e = clear_stale_socket(&p).unwrap_err();
        assert!(
            e.contains(&p.display().to_string()) && e.contains("in use by another yggdrasil"),
            "{e}"
        );
        assert!(p.exists());
        // Nobody listens any more: a stale file is removed.
        drop(l);
        clear_stale_socket(&p).unwrap();
        assert!(!p.exists());
        clear_stale_socket(&p).unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_socket_in_use_fails_the_start_and_survives_shutdown() {
        let d = tmp("sockbusy");
        let s = settings(&d, "/bin/false");
        let _l = std::os::unix::net::UnixListener::bind(&s.admin_socket).unwrap();
        let sock = s.admin_socket.clone();
        let sup = Supervisor::start(s);
        let t0 = Instant::now();
        while sup.status().last_error.is_none() && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let err = sup.status().last_error.unwrap_or_default();
        assert!(err.contains("in use by another yggdrasil"), "{err}");
        assert!(!d.join("ygg-ygg0").join("yggdrasil.conf").exists());
        sup.shutdown().await;
        assert!(sock.exists(), "the other daemon's socket was removed");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_supervisor_of_one_directory_leaves_the_first_ones_files() {
        let d = tmp("twice");
        let script = d.join("fake-ygg");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 60\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let first = Supervisor::start(settings(&d, script.to_str().unwrap()));
        let t0 = Instant::now();
        while first.status().pid.is_none() && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let dir = d.join("ygg-ygg0");
        let conf = dir.join("yggdrasil.conf");
        let status = status_path(&dir);
        assert!(conf.exists() && status.exists());
        let written =
            || -> Status { serde_json::from_slice(&std::fs::read(&status).unwrap()).unwrap() };
        // The same interface, so the same directory (another admin socket).
        let mut s = settings(&d, script.to_str().unwrap());
        s.admin_socket = d.join("b.sock");
        let second = Supervisor::start(s);
        let t0 = Instant::now();
        while second.status().last_error.is_none() && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let st = second.status();
        let err = st.last_error.clone().unwrap_or_default();
        assert!(
            err.contains("another gatewire supervises Yggdrasil in")
                && err.contains(&dir.display().to_string()),
            "{err}"
        );
        assert_eq!(st.state, State::Stopped);
        assert_eq!(st.pid, None, "the second one started a daemon");
        assert_eq!(written().admin_socket, d.join("a.sock"));
        second.shutdown().await;
        assert!(
            conf.exists(),
            "the second one removed the first one's config"
        );
        assert!(
            status.exists(),
            "the second one removed the first one's status"
        );
        assert!(first.status().pid.is_some());
        first.shutdown().await;
        assert!(!conf.exists() && !status.exists());
        // Free again: a new supervisor may take the directory.
        let third = Supervisor::start(settings(&d, script.to_str().unwrap()));
        let t0 = Instant::now();
        while third.status().pid.is_none() && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(third.status().pid.is_some());
        third.shutdown().await;
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_during_version_detection_is_prompt_and_cleans_up() {
        // `-version` never answers: the stop must not wait for its timeout.
        let d = tmp("slowversion");
        let script = d.join("fake-ygg");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 60\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut s = settings(&d, script.to_str().unwrap());
        s.version = None;
        let sup = Supervisor::start(s);
        let status = status_path(&d.join("ygg-ygg0"));
        let t0 = Instant::now();
        while !status.exists() && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = Instant::now();
        sup.shutdown().await;
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert!(!status.exists(), "the status file outlived shutdown");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_supervisor_removes_the_key_file() {
        let d = tmp("drop");
        let script = d.join("fake-ygg");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 60\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let sup = Supervisor::start(settings(&d, script.to_str().unwrap()));
        let t0 = Instant::now();
        while sup.status().pid.is_none() && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let conf = d.join("ygg-ygg0").join("yggdrasil.conf");
        assert!(conf.exists());
        drop(sup);
        let t0 = Instant::now();
        while conf.exists() && t0.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !conf.exists(),
            "the config with the key outlived the supervisor"
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
