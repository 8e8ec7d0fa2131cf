//! The proxy's access log (`[proxy] access_log`): one JSON object per line for
//! every HTTP request, every spliced connection (passthrough, TCP forward) and
//! every UDP flow, when it ends.
//!
//! Formatting ([`Entry::write_line`], [`rfc3339_ms`]) is pure. The driver is a
//! writer thread fed through a bounded queue: the request path never waits for
//! the disk; when the queue is full, or the disk refuses a line (full, gone),
//! the entry is dropped and counted (and the count logged). Lines are buffered and written when the queue runs empty, so
//! a busy proxy writes them in batches and an idle one at once.
//! [`AccessLog::reopen`] reopens the file (on reload and SIGHUP, for
//! logrotate).
//!
//! Query strings are never logged (they often carry tokens), nor are headers.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// Entries waiting for the writer at most.
const QUEUE: usize = 16 * 1024;
/// Longest path logged; longer ones are cut (at a character boundary) and end
/// with `...`.
pub const MAX_PATH: usize = 1024;

/// What kind of traffic an entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// One HTTP request (terminated TLS or plain).
    Http,
    /// One TLS connection spliced by SNI.
    Passthrough,
    /// One TCP forward connection.
    Tcp,
    /// One UDP flow (a client's datagrams until it goes idle).
    Udp,
    /// One connection sent to another hub of the mesh (`route`:
    /// `mesh:<hub>`, `backend`: the address of that hub it went to).
    Mesh,
}

/// One line of the access log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    /// Start of the request or connection, milliseconds since the Unix epoch
    /// (written as `time`, RFC 3339 UTC).
    #[serde(skip)]
    pub unix_ms: u64,
    /// Client address and port.
    pub client: SocketAddr,
    /// The client a `trusted_proxies` proxy forwarded the request for (its
    /// `X-Forwarded-For`), when that is not `client` itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarded_for: Option<IpAddr>,
    /// Traffic kind.
    pub kind: Kind,
    /// Route or forward id (`name:blog`, `tcp:0.0.0.0:2222`); absent when no
    /// route matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Host asked for (HTTP `Host`, or the SNI of a passthrough connection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// HTTP method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The user of a route with `basic_auth_file` who passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Request path, without the query string.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `HTTP/1.1` or `HTTP/2`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proto: Option<&'static str>,
    /// The client spoke TLS to the hub (terminated or passed through).
    pub tls: bool,
    /// HTTP status sent to the client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why the proxy refused or failed (`denied`, `backend_refused`, ...; the
    /// error kinds of the counters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
    /// The backend that served it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<SocketAddr>,
    /// Bytes from the client to the backend (spliced connections).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_in: Option<u64>,
    /// Bytes to the client: the response body, or the spliced stream.
    pub bytes_out: u64,
    /// Time from the start to the end of the response body or connection.
    pub duration_ms: f64,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    #[serde(flatten)]
    entry: &'a Entry,
}

impl Entry {
    /// An entry with only the always-present fields set.
    pub fn new(unix_ms: u64, client: SocketAddr, kind: Kind, tls: bool) -> Entry {
        Entry {
            unix_ms,
            client,
            forwarded_for: None,
            kind,
            route: None,
            host: None,
            method: None,
            user: None,
            path: None,
            proto: None,
            tls,
            status: None,
            error: None,
            backend: None,
            bytes_in: None,
            bytes_out: 0,
            duration_ms: 0.0,
        }
    }

    /// Appends the entry as one JSON line (ending in `\n`) to `out`.
    pub fn write_line(&self, out: &mut Vec<u8>) {
        let line = Line {
            time: rfc3339_ms(self.unix_ms),
            entry: self,
        };
        // Strings, integers, finite floats and addresses always serialise.
        if serde_json::to_writer(&mut *out, &line).is_ok() {
            out.push(b'\n');
        }
    }
}

/// `path` cut to at most [`MAX_PATH`] bytes (at a character boundary).
pub fn clip_path(path: &str) -> String {
    if path.len() <= MAX_PATH {
        return path.to_string();
    }
    let mut end = MAX_PATH - 3;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", path.get(..end).unwrap_or_default())
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let (secs, ms) = (unix_ms / 1000, unix_ms % 1000);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (H. Hinnant's
/// `civil_from_days`, for non-negative day counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

enum Msg {
    Entry(Box<Entry>),
    Reopen,
}

/// A running access log.
pub struct AccessLog {
    path: PathBuf,
    /// Taken in `drop`, so the writer sees the end before it is waited for.
    tx: Option<SyncSender<Msg>>,
    /// Entries lost: the queue full, or a failed write. Shared with the
    /// writer thread.
    dropped: Arc<AtomicU64>,
    /// A reopen asked for: a flag the writer checks after every batch, so
    /// a full queue cannot lose it (the message only wakes the writer).
    reopen: Arc<AtomicBool>,
    /// Signalled when the writer has flushed its last line (in a mutex:
    /// a receiver is not `Sync`).
    done: std::sync::Mutex<Option<Receiver<()>>>,
}

impl Drop for AccessLog {
    /// Writes out what is queued (for at most 2 s) before the log goes: the
    /// last lines of a stopping hub are its connections' last records.
    fn drop(&mut self) {
        drop(self.tx.take());
        let done = match self.done.get_mut() {
            Ok(d) => d.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(done) = done {
            let _ = done.recv_timeout(Duration::from_secs(2));
        }
    }
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("path", &self.path)
            .field("dropped", &self.dropped.load(Relaxed))
            .finish()
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

impl AccessLog {
    /// Opens (creates, appends to) `path` and starts the writer thread, which
    /// ends when the log is dropped.
    pub fn open(path: &Path) -> io::Result<AccessLog> {
        let file = open_append(path)?;
        let (tx, rx) = sync_channel(QUEUE);
        let (done_tx, done) = sync_channel(1);
        let reopen = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let (p, flag, lost) = (path.to_path_buf(), reopen.clone(), dropped.clone());
        std::thread::Builder::new()
            .name("gatewire-access-log".into())
            .spawn(move || {
                writer(&p, file, &rx, &flag, &lost);
                let _ = done_tx.send(());
            })?;
        Ok(AccessLog {
            path: path.to_path_buf(),
            tx: Some(tx),
            dropped,
            reopen,
            done: std::sync::Mutex::new(Some(done)),
        })
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues `e`; drops and counts it when the queue is full.
    pub fn log(&self, e: Entry) {
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.try_send(Msg::Entry(Box::new(e))).is_ok());
        if !sent {
            let n = self.dropped.fetch_add(1, Relaxed) + 1;
            if n.is_power_of_two() {
                warn!(dropped = n, path = %self.path.display(), "access log queue full; entries dropped");
            }
        }
    }

    /// Entries dropped: the writer fell behind, or the file refused them.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }

    /// Reopens the file by its path (after logrotate moved it).
    pub fn reopen(&self) {
        self.reopen.store(true, Relaxed);
        // A wake-up only: a full queue is drained and the flag seen after it.
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(Msg::Reopen);
        }
    }
}

fn writer(path: &Path, file: File, rx: &Receiver<Msg>, reopen: &AtomicBool, lost: &AtomicU64) {
    let mut out = BufWriter::with_capacity(64 * 1024, file);
    let reopened = |out: &mut BufWriter<File>| {
        if !reopen.swap(false, Relaxed) {
            return;
        }
        let _ = out.flush();
        match open_append(path) {
            Ok(f) => *out = BufWriter::with_capacity(64 * 1024, f),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "access log reopen failed; writing to the old file")
            }
        }
    };
    let mut line = Vec::with_capacity(512);
    let mut failing = false;
    let mut handle = |m: Msg, out: &mut BufWriter<File>| match m {
        Msg::Entry(e) => {
            line.clear();
            e.write_line(&mut line);
            // A line that does not fit the buffer is written out with
            // what the buffer holds: an error is this line lost (what is
            // buffered stays for the next try).
            match out.write_all(&line) {
                Ok(()) => failing = false,
                Err(e) => {
                    lost.fetch_add(1, Relaxed);
                    if !failing {
                        failing = true;
                        warn!(path = %path.display(), error = %e, "access log write failed; entries dropped until a write succeeds");
                    }
                }
            }
        }
        // In order when its message made it into the queue; else after
        // the batch (below).
        Msg::Reopen => reopened(out),
    };
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(m) => handle(m, &mut out),
            Err(RecvTimeoutError::Timeout) => {
                reopened(&mut out);
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
        // Drain what is queued, then write the batch out.
        loop {
            match rx.try_recv() {
                Ok(m) => handle(m, &mut out),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        let _ = out.flush();
        reopened(&mut out);
    }
    let _ = out.flush();
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_868_799_999), "2000-02-29T23:59:59.999Z");
        assert_eq!(rfc3339_ms(1_796_342_400_123), "2026-12-04T00:00:00.123Z");
        assert_eq!(rfc3339_ms(4_107_542_400_000), "2100-03-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_709_164_800_000), "2024-02-29T00:00:00.000Z");
    }

    proptest! {
        #[test]
        fn dates_are_consecutive(days in 0u64..200_000) {
            // The day after `days` is the next date: same month and day + 1,
            // or the first of the next month, or of the next year.
            let (y, m, d) = civil_from_days(days);
            let (y2, m2, d2) = civil_from_days(days + 1);
            let next = (y2, m2, d2) == (y, m, d + 1)
                || ((y2, m2, d2) == (y, m + 1, 1) && d >= 28)
                || ((y2, m2, d2) == (y + 1, 1, 1) && (m, d) == (12, 31));
            prop_assert!(next, "{:?} -> {:?}", (y, m, d), (y2, m2, d2));
            prop_assert!((1..=12).contains(&m) && (1..=31).contains(&d));
        }
    }

    #[test]
    fn http_line() {
        let mut e = Entry::new(
            1_796_342_400_123,
            "203.0.113.10:51234".parse().unwrap(),
            Kind::Http,
            true,
        );
        e.route = Some("name:blog".into());
        e.host = Some("blog.gw.example.org".into());
        e.method = Some("GET".into());
        e.path = Some("/a \"b\"\n".into());
        e.proto = Some("HTTP/2");
        e.status = Some(200);
        e.backend = Some("[fd77:6777::2]:8080".parse().unwrap());
        e.bytes_out = 1234;
        e.duration_ms = 3.25;
        let mut out = Vec::new();
        e.write_line(&mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1, "one line");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "time": "2026-12-04T00:00:00.123Z",
                "client": "203.0.113.10:51234",
                "kind": "http",
                "route": "name:blog",
                "host": "blog.gw.example.org",
                "method": "GET",
                "path": "/a \"b\"\n",
                "proto": "HTTP/2",
                "tls": true,
                "status": 200,
                "backend": "[fd77:6777::2]:8080",
                "bytes_out": 1234,
                "duration_ms": 3.25,
            })
        );
    }

    #[test]
    fn refused_tcp_line_has_no_http_fields() {
        let mut e = Entry::new(0, "[2001:db8::10]:4000".parse().unwrap(), Kind::Tcp, false);
        e.route = Some("tcp:0.0.0.0:2222".into());
        e.error = Some("denied");
        e.bytes_in = Some(0);
        let mut out = Vec::new();
        e.write_line(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        let mut keys = keys;
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "bytes_in",
                "bytes_out",
                "client",
                "duration_ms",
                "error",
                "kind",
                "route",
                "time",
                "tls"
            ]
        );
        assert_eq!(v["kind"], "tcp");
        assert_eq!(v["client"], "[2001:db8::10]:4000");
    }

    #[test]
    fn long_paths_are_clipped_at_a_character() {
        assert_eq!(clip_path("/short"), "/short");
        let long = format!("/{}", "é".repeat(MAX_PATH));
        let c = clip_path(&long);
        assert!(c.len() <= MAX_PATH && c.ends_with("..."), "{}", c.len());
        assert!(c.starts_with("/éé"));
    }

    #[test]
    fn lines_the_file_refuses_are_counted() {
        // /dev/full takes the open and refuses every write (ENOSPC).
        let log = AccessLog::open(Path::new("/dev/full")).unwrap();
        let e = Entry::new(0, "192.0.2.1:1".parse().unwrap(), Kind::Tcp, false);
        // Enough lines to fill the 64 KiB buffer several times over.
        for _ in 0..2_000 {
            log.log(e.clone());
            if log.dropped() > 0 {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        for _ in 0..200 {
            if log.dropped() > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(log.dropped() > 0, "no line counted as dropped");
    }

    #[test]
    fn writes_reopens_and_counts_nothing_dropped() {
        let dir = std::env::temp_dir().join(format!("gw-alog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let _ = std::fs::remove_file(&path);
        let log = AccessLog::open(&path).unwrap();
        let e = Entry::new(0, "192.0.2.1:1".parse().unwrap(), Kind::Tcp, false);
        log.log(e.clone());
        let wait_lines = |p: &Path, n: usize| {
            for _ in 0..200 {
                let s = std::fs::read_to_string(p).unwrap_or_default();
                if s.lines().count() >= n {
                    return s;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            panic!("{} has fewer than {n} lines", p.display());
        };
        wait_lines(&path, 1);
        // logrotate: move the file away, reopen, and the next line goes to a new file.
        let moved = dir.join("access.log.1");
        std::fs::rename(&path, &moved).unwrap();
        log.reopen();
        log.log(e.clone());
        let s = wait_lines(&path, 1);
        assert_eq!(s.lines().count(), 1);
        assert_eq!(std::fs::read_to_string(&moved).unwrap().lines().count(), 1);
        assert_eq!(log.dropped(), 0);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o007, 0, "not world-readable: {mode:o}");
        // A reopen asked for while the queue is full is not lost: the flag
        // is seen once the writer has drained it.
        std::fs::rename(&path, &moved).unwrap();
        log.reopen.store(true, Relaxed);
        log.log(e.clone());
        for _ in 0..200 {
            if path.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(path.exists(), "reopened after the batch");
        // The last lines are written when the log goes, not later.
        for _ in 0..500 {
            log.log(e.clone());
        }
        drop(log);
        let n = std::fs::read_to_string(&path).unwrap().lines().count();
        assert_eq!(n, 500);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
