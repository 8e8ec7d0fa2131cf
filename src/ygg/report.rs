//! The overlay state for `gatewire show`: the supervisor's status file plus a
//! live `getSelf`/`getPeers` over the daemon's admin socket.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::admin_client::AdminClient;
use super::supervisor::{status_path, State, Status};
use super::Version;

/// One link of the daemon.
#[derive(Debug, Clone, Serialize)]
pub struct PeerReport {
    /// Remote public key (hex).
    pub public_key: Option<String>,
    /// Remote 200::/7 address.
    pub address: Option<String>,
    /// Remote endpoint / URI.
    pub remote: Option<String>,
    /// Whether the link is up (0.4 lists live links only).
    pub up: bool,
    /// Link uptime, seconds.
    pub uptime: f64,
    /// Whether the peer dialled in (0.5 only).
    pub inbound: Option<bool>,
    /// Bytes received on the link.
    pub rx_bytes: u64,
    /// Bytes sent on the link.
    pub tx_bytes: u64,
}

/// The overlay as `gatewire show` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct OverlayReport {
    /// The daemon's TUN.
    pub interface: String,
    /// Own 200::/7 address.
    pub address: String,
    /// Own 300::/64.
    pub subnet: String,
    /// Own public key (hex).
    pub public_key: String,
    /// Daemon and supervisor state.
    pub daemon: DaemonReport,
    /// Links, from the admin socket (empty if it did not answer).
    pub peers: Vec<PeerReport>,
}

/// The supervisor's view of the daemon.
#[derive(Debug, Clone, Serialize)]
pub struct DaemonReport {
    /// `starting`, `running`, `unresponsive`, `backoff`, `stopped`, or
    /// `stale` when the supervising gatewire is gone.
    pub status: String,
    /// Daemon PID.
    pub pid: Option<u32>,
    /// Restarts since gatewire started.
    pub restarts: u64,
    /// Why the last run ended or could not start.
    pub last_error: Option<String>,
    /// Dialect.
    pub version: Option<String>,
    /// The executable.
    pub binary: String,
    /// Admin socket.
    pub admin_socket: String,
    /// Milliseconds until the next start, in backoff.
    pub retry_in_ms: Option<u64>,
    /// The admin socket's error, when it did not answer.
    pub admin_error: Option<String>,
}

fn alive(pid: u32) -> bool {
    let Ok(p) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(p, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

/// Reads every `ygg-*/status.json` under `state_dir`, sorted by interface.
pub fn collect(state_dir: &Path) -> Vec<OverlayReport> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(state_dir) else {
        return out;
    };
    let mut dirs: Vec<_> = rd
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("ygg-"))
        })
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for d in dirs {
        let Ok(bytes) = std::fs::read(status_path(&d)) else {
            continue;
        };
        let Ok(st) = serde_json::from_slice::<Status>(&bytes) else {
            continue;
        };
        out.push(report(st));
    }
    out
}

fn report(st: Status) -> OverlayReport {
    let live = alive(st.supervisor_pid);
    let status = if live {
        match st.state {
            State::Starting => "starting",
            State::Running => "running",
            State::Unresponsive => "unresponsive",
            State::Backoff => "backoff",
            State::Stopped => "stopped",
        }
    } else {
        "stale"
    };
    let mut r = OverlayReport {
        interface: st.interface.clone(),
        address: st.address.clone(),
        subnet: st.subnet.clone(),
        public_key: st.public_key.clone(),
        daemon: DaemonReport {
            status: status.to_string(),
            pid: st.pid,
            restarts: st.restarts,
            last_error: st.last_error.clone(),
            version: st.version.clone(),
            binary: st.binary.display().to_string(),
            admin_socket: st.admin_socket.display().to_string(),
            retry_in_ms: st.retry_in_ms,
            admin_error: None,
        },
        peers: Vec::new(),
    };
    if !live || !matches!(st.state, State::Running | State::Unresponsive) {
        return r;
    }
    let version = match st.version.as_deref() {
        Some("0.5") => Version::V0_5,
        _ => Version::V0_4,
    };
    let res = AdminClient::connect(&st.admin_socket, version, Duration::from_secs(2)).and_then(
        |mut c| {
            let me = c.get_self()?;
            let peers = c.get_peers()?;
            Ok((me, peers))
        },
    );
    match res {
        Ok((me, peers)) => {
            r.address = me.address.to_string();
            r.subnet = me.subnet.to_string();
            r.public_key = me.key.to_hex();
            r.peers = peers.into_iter().map(peer_report).collect();
        }
        Err(e) => r.daemon.admin_error = Some(e.to_string()),
    }
    r
}

/// One `getPeers` entry as shown; a SOCKS `user:pass@` or `password=` in
/// its remote URI is hidden.
fn peer_report(p: super::admin::PeerInfo) -> PeerReport {
    PeerReport {
        public_key: p.key.map(|k| k.to_hex()),
        address: p.address.map(|a| a.to_string()),
        remote: p.remote.as_deref().map(super::identity::redact_uri),
        up: p.up.unwrap_or(true),
        uptime: p.uptime,
        inbound: p.inbound,
        rx_bytes: p.bytes_recvd,
        tx_bytes: p.bytes_sent,
    }
}

/// Text form, in the style of `gatewire show`.
pub fn print_text(r: &OverlayReport) {
    println!("yggdrasil: {} ({})", r.interface, r.daemon.status);
    println!("  address: {}", r.address);
    println!("  subnet: {}", r.subnet);
    println!("  public key: {}", r.public_key);
    match r.daemon.pid {
        Some(p) => println!(
            "  daemon: pid {p}, version {}, restarts {}",
            r.daemon.version.as_deref().unwrap_or("?"),
            r.daemon.restarts
        ),
        None => println!("  daemon: not running, restarts {}", r.daemon.restarts),
    }
    if let Some(ms) = r.daemon.retry_in_ms {
        println!("  next start: in {:.1} s", ms as f64 / 1000.0);
    }
    if let Some(e) = &r.daemon.last_error {
        println!("  last error: {e}");
    }
    if let Some(e) = &r.daemon.admin_error {
        println!("  admin socket: {e}");
    }
    for p in &r.peers {
        println!();
        println!(
            "  peer: {} ({})",
            p.address.as_deref().unwrap_or("?"),
            if p.up { "up" } else { "down" }
        );
        if let Some(k) = &p.public_key {
            println!("    public key: {k}");
        }
        if let Some(rem) = &p.remote {
            println!("    remote: {rem}");
        }
        println!("    uptime: {:.0} s", p.uptime);
        println!(
            "    transfer: {} B received, {} B sent",
            p.rx_bytes, p.tx_bytes
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn peer_remote_hides_passwords() {
        let p: super::super::admin::PeerInfo = serde_json::from_value(serde_json::json!({
            "remote": "socks://alice:s3cret@proxy:1080/peer.example:443?password=pw2",
            "bytes_recvd": 5,
        }))
        .unwrap();
        let r = peer_report(p);
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("s3cret") && !json.contains("pw2"), "{json}");
        assert_eq!(
            r.remote.as_deref(),
            Some("socks://alice:***@proxy:1080/peer.example:443?password=***")
        );
        assert_eq!(r.rx_bytes, 5);
    }
}
