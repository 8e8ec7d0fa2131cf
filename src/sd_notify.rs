//! The service manager's readiness protocol (systemd's `sd_notify`): with
//! `Type=notify` (or `notify-reload`) in the unit, the daemon says when it is
//! ready (its interface, sockets and listeners up), when it reloads and when
//! it stops, and pings the watchdog when the unit sets `WatchdogSec=`.
//! Without `NOTIFY_SOCKET` in the environment every call does nothing.
//! Programs the daemons start (the Yggdrasil daemon) do not get these
//! variables ([`ENV`]): their own notifications would speak for gatewire's unit.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// The protocol's environment variables.
pub const ENV: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// Where `NOTIFY_SOCKET` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A socket file.
    Path(std::path::PathBuf),
    /// A Linux abstract socket (written `@name`).
    Abstract(Vec<u8>),
}

/// Reads a `NOTIFY_SOCKET` value: an absolute path or `@` and an abstract
/// name; anything else (empty, relative, `vsock:`) is not supported here.
pub fn target(value: &str) -> Option<Target> {
    if let Some(name) = value.strip_prefix('@') {
        return (!name.is_empty()).then(|| Target::Abstract(name.as_bytes().to_vec()));
    }
    value
        .starts_with('/')
        .then(|| Target::Path(std::path::PathBuf::from(value)))
}

/// How long a change of state (ready, reloading, stopping) waits for room in
/// the service manager's queue, as libsystemd's `sd_notify` does: a lost
/// `READY=1` gets the daemon killed at the start timeout, a lost one after a
/// reload leaves the unit "reloading".
const STATE_WAIT: Duration = Duration::from_secs(2);

/// Sends `state` (newline-separated `KEY=value` lines) to `to`. With `wait`,
/// a full socket queue is waited on for up to that long; without, it is an
/// error at once (the watchdog's pings, sent again soon anyway).
pub fn send_to(to: &Target, state: &str, wait: Option<Duration>) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    match wait {
        Some(w) => sock.set_write_timeout(Some(w))?,
        None => sock.set_nonblocking(true)?,
    }
    match to {
        Target::Path(p) => sock.send_to(state.as_bytes(), p).map(drop),
        Target::Abstract(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr).map(drop)
        }
    }
}

/// Sends `state` to the service manager, if the process runs under one that
/// asked; a failure is logged, never fatal.
pub fn notify(state: &str) {
    notify_with(state, Some(STATE_WAIT));
}

fn notify_with(state: &str, wait: Option<Duration>) {
    let Ok(value) = std::env::var("NOTIFY_SOCKET") else {
        return;
    };
    let Some(to) = target(&value) else {
        tracing::warn!(
            notify_socket = %value,
            "NOTIFY_SOCKET is not a path or an abstract socket: no readiness notification"
        );
        return;
    };
    if let Err(e) = send_to(&to, state, wait) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// The daemon is up.
pub fn ready() {
    notify("READY=1");
}

/// The daemon starts a reload ([`reloaded`] once it is done).
pub fn reloading() {
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
}

/// The reload [`reloading`] announced is over: ready again, with its
/// outcome in the status text `systemctl status` shows.
pub fn reloaded(error: Option<&str>) {
    notify(&reloaded_message(error));
}

/// `READY=1` with `STATUS=reload failed: <why>` (on one line) after a
/// failed reload, and an empty `STATUS=` (no status text) after one that
/// worked.
fn reloaded_message(error: Option<&str>) -> String {
    match error {
        None => "READY=1\nSTATUS=".to_string(),
        Some(why) => {
            let why: String = why
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            format!("READY=1\nSTATUS=reload failed: {why}")
        }
    }
}

/// The daemon is stopping.
pub fn stopping() {
    notify("STOPPING=1");
}

/// `CLOCK_MONOTONIC` in microseconds, as the protocol's `MONOTONIC_USEC`.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if r != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000).saturating_add(nanos / 1_000)
}

/// How often to ping the watchdog: half the interval the unit set
/// (`WATCHDOG_USEC`), when it is meant for this process (`WATCHDOG_PID`
/// absent or ours).
pub fn watchdog_every(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(p) = pid {
        if p.trim().parse::<u32>().ok()? != me {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// The watchdog's pinging task; stopped when dropped.
pub struct Watchdog(tokio::task::JoinHandle<()>);

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Pings the watchdog from the async runtime while the returned guard lives:
/// a runtime that stops running tasks stops the pings, and the service
/// manager restarts the daemon. Nothing when the unit has no `WatchdogSec=`.
pub fn spawn_watchdog() -> Option<Watchdog> {
    let every = watchdog_every(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )?;
    Some(Watchdog(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            notify_with("WATCHDOG=1", None);
        }
    })))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn notify_socket_values() {
        assert_eq!(
            target("/run/systemd/notify"),
            Some(Target::Path("/run/systemd/notify".into()))
        );
        assert_eq!(target("@sd-1"), Some(Target::Abstract(b"sd-1".to_vec())));
        assert_eq!(target("@"), None);
        assert_eq!(target(""), None);
        assert_eq!(target("run/notify"), None);
        assert_eq!(target("vsock:2:1234"), None);
    }

    #[test]
    fn watchdog_interval_is_half_and_only_for_this_process() {
        assert_eq!(
            watchdog_every(Some("20000000"), None, 7),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            watchdog_every(Some("20000000"), Some("7"), 7),
            Some(Duration::from_secs(10))
        );
        assert_eq!(watchdog_every(Some("20000000"), Some("8"), 7), None);
        assert_eq!(watchdog_every(Some("0"), None, 7), None);
        // Never a zero period (a timer cannot tick that fast).
        assert_eq!(
            watchdog_every(Some("1"), None, 7),
            Some(Duration::from_millis(1))
        );
        assert_eq!(watchdog_every(Some("soon"), None, 7), None);
        assert_eq!(watchdog_every(None, None, 7), None);
        assert_eq!(watchdog_every(Some("20000000"), Some("x"), 7), None);
    }

    #[test]
    fn messages_reach_a_path_and_an_abstract_socket() {
        let dir = std::env::temp_dir().join(format!("gw-sdn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        send_to(&Target::Path(path.clone()), "READY=1", None).unwrap();
        let mut buf = [0u8; 128];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("gw-sdn-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx2 = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(&Target::Abstract(name.into_bytes()), "STOPPING=1", None).unwrap();
        let n = rx2.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");

        // Nobody listening: an error, not a panic.
        drop(rx);
        assert!(send_to(&Target::Path(path.clone()), "READY=1", None).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_change_of_state_waits_for_room_in_a_full_queue() {
        let dir = std::env::temp_dir().join(format!("gw-sdn-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        let to = Target::Path(path.clone());
        let mut queued = 0;
        while send_to(&to, "STATUS=filler", None).is_ok() {
            queued += 1;
            assert!(queued < 100_000, "the queue never filled");
        }
        // Full: a ping without a wait fails; READY=1 waits until the
        // manager reads.
        assert!(send_to(&to, "WATCHDOG=1", None).is_err());
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let mut buf = [0u8; 64];
            let mut last = Vec::new();
            for _ in 0..=queued {
                let n = rx.recv(&mut buf).unwrap();
                last = buf[..n].to_vec();
            }
            last
        });
        send_to(&to, "READY=1", Some(STATE_WAIT)).unwrap();
        assert_eq!(reader.join().unwrap(), b"READY=1");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_reload_says_why_on_one_status_line() {
        assert_eq!(reloaded_message(None), "READY=1\nSTATUS=");
        let m = reloaded_message(Some("[[route]] name:blog: cert\n  line 2"));
        assert_eq!(
            m,
            "READY=1\nSTATUS=reload failed: [[route]] name:blog: cert   line 2"
        );
        assert_eq!(
            m.lines().count(),
            2,
            "no variable of its own for the reason"
        );
    }

    #[test]
    fn the_monotonic_clock_moves() {
        let a = monotonic_usec();
        std::thread::sleep(Duration::from_millis(2));
        assert!(monotonic_usec() > a);
    }
}
