//! Interop tests against Debian's `yggdrasil` 0.4.7 (docs/yggdrasil.md
//! section 5).
//!
//! Skipped with a notice when `/usr/sbin/yggdrasil` is absent, unless
//! `CI=true`, where its absence fails the test. The live tests start
//! daemons with `IfName: "none"` (no TUN, no root needed, nothing routed on
//! the host), `MulticastInterfaces: []`, loopback-only listeners and admin
//! sockets in a private temp dir; every daemon is killed by PID on drop,
//! including when an assertion fails.

use std::net::{Ipv6Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gatewire::ygg::admin::AdminError;
use gatewire::ygg::admin_client::{AdminClient, ClientError};
use gatewire::ygg::identity::{
    private_key_from_config, AdminListen, DaemonSettings, LinkUri, UriRole,
};
use gatewire::ygg::{partial_key, AdminRequest, Identity, Version, YggSubnet};
use rand_core::OsRng;

const BIN: &str = "/usr/sbin/yggdrasil";

/// Whether the daemon binary is present; fails under `CI=true` if not.
fn daemon_available() -> bool {
    if Path::new(BIN).exists() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{BIN} is missing but CI=true: install Debian's yggdrasil package");
    }
    eprintln!("NOTICE: {BIN} not found, skipping yggdrasil interop test");
    false
}

/// A private directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "gatewire-ygg-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the binary to completion and returns trimmed stdout.
fn run(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run yggdrasil");
    assert!(
        out.status.success(),
        "yggdrasil {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8 output")
        .trim()
        .to_owned()
}

#[test]
fn address_and_subnet_match_daemon_for_fresh_keys() {
    if !daemon_available() {
        return;
    }
    let dir = TempDir::new("addr");
    for i in 0..5 {
        let id = Identity::generate(&mut OsRng);
        let conf = DaemonSettings::new(id.private_key().clone())
            .render(Version::V0_4)
            .expect("render config");
        let f = dir.path(&format!("key{i}.conf"));
        std::fs::write(&f, conf).expect("write config");
        let f = f.to_str().expect("utf-8 path");

        let addr: Ipv6Addr = run(&["-useconffile", f, "-address"])
            .parse()
            .expect("daemon printed an IPv6 address");
        let subnet: YggSubnet = run(&["-useconffile", f, "-subnet"])
            .parse()
            .expect("daemon printed a /64");
        let pk = id.public_key();
        assert_eq!(addr, id.address(), "address of {pk}");
        assert_eq!(subnet, id.subnet(), "subnet of {pk}");
        let partial = partial_key(&addr).expect("200::/7");
        assert!(partial.matches(pk.as_bytes()), "partial key of {addr}");
        assert!(partial_key(&subnet.network())
            .expect("300::/8")
            .matches(pk.as_bytes()));
    }
}

#[test]
fn daemon_generated_config_keys_are_understood() {
    if !daemon_available() {
        return;
    }
    let dir = TempDir::new("genconf");
    let conf = run(&["-genconf", "-json"]);
    let key = private_key_from_config(&conf).expect("parse -genconf -json output");
    let f = dir.path("gen.conf");
    std::fs::write(&f, &conf).expect("write config");
    let addr: Ipv6Addr = run(&["-useconffile", f.to_str().expect("utf-8"), "-address"])
        .parse()
        .expect("IPv6");
    assert_eq!(addr, key.public_key().address());
}

/// A running daemon, killed by PID when dropped. Prints its log if the
/// test is failing.
struct Daemon {
    child: Child,
    log: PathBuf,
    name: &'static str,
}

impl Daemon {
    fn start(name: &'static str, dir: &TempDir, settings: &DaemonSettings) -> Daemon {
        let conf = dir.path(&format!("{name}.conf"));
        std::fs::write(&conf, settings.render(Version::V0_4).expect("render"))
            .expect("write config");
        let log = dir.path(&format!("{name}.log"));
        let child = Command::new(BIN)
            .arg("-useconffile")
            .arg(&conf)
            .arg("-logto")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn yggdrasil");
        Daemon { child, log, name }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // kill(2) on this child's PID only, then reap it
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- log of daemon {} ---\n{log}", self.name);
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind loopback")
        .port()
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn connect(sock: &Path) -> AdminClient {
    wait_for("admin socket", || {
        AdminClient::connect(sock, Version::V0_4, Duration::from_secs(10)).ok()
    })
}

#[test]
fn live_daemons_answer_admin_requests() {
    if !daemon_available() {
        return;
    }
    let dir = TempDir::new("live");
    let a_id = Identity::generate(&mut OsRng);
    let b_id = Identity::generate(&mut OsRng);
    let port = free_port();

    let mut a = DaemonSettings::new(a_id.private_key().clone());
    a.listen = vec![LinkUri::parse(
        &format!("tcp://127.0.0.1:{port}"),
        Version::V0_4,
        UriRole::Listen,
    )
    .expect("listen uri")];
    let a_sock = dir.path("a.sock");
    a.admin_listen = AdminListen::Unix(a_sock.clone());

    let mut b = DaemonSettings::new(b_id.private_key().clone());
    b.peers = vec![LinkUri::parse_peer(
        &format!("tcp://127.0.0.1:{port}?key={}", a_id.public_key()),
        Version::V0_4,
    )
    .expect("peer uri")];
    let b_sock = dir.path("b.sock");
    b.admin_listen = AdminListen::Unix(b_sock.clone());

    let _da = Daemon::start("A", &dir, &a);
    // A listens before its admin socket answers; starting B only then keeps
    // B's first dials from failing on a loaded machine (after three quick
    // retries the daemon waits a minute).
    let mut ca = connect(&a_sock);
    let _db = Daemon::start("B", &dir, &b);

    // A: dialect detection, getSelf, and an unsupported command
    assert_eq!(ca.detect_version().expect("list"), Some(Version::V0_4));
    let me = ca.get_self().expect("getSelf");
    assert_eq!(me.key, a_id.public_key());
    assert_eq!(me.address, a_id.address());
    assert_eq!(me.subnet, a_id.subnet());
    // getTree is 0.5-only: refused locally for 0.4 ...
    assert!(matches!(
        AdminRequest::GetTree.encode(Version::V0_4, true),
        Err(AdminError::Unsupported { .. })
    ));
    // ... and the daemon's own error for an unknown command is parsed
    let mut raw5 =
        AdminClient::connect(&a_sock, Version::V0_5, Duration::from_secs(10)).expect("connect");
    match raw5.request(&AdminRequest::GetTree) {
        Err(ClientError::Admin(AdminError::Daemon { message, .. })) => {
            assert!(message.contains("Unknown action"), "{message}")
        }
        other => panic!("expected a daemon error, got {other:?}"),
    }

    // B: peers with A over TCP with a pinned key
    let mut cb = connect(&b_sock);
    let b_self = cb.get_self().expect("getSelf B");
    assert_eq!(b_self.address, b_id.address());
    let peers = wait_for("B to list A in getPeers", || {
        let p = cb.get_peers().expect("getPeers");
        p.iter()
            .any(|p| p.key == Some(a_id.public_key()))
            .then_some(p)
    });
    let pa = peers
        .iter()
        .find(|p| p.key == Some(a_id.public_key()))
        .expect("A listed");
    assert_eq!(pa.address, Some(a_id.address()));
    assert!(pa.port >= 1);
    assert!(pa.coords.is_some());

    // A sees B too; DHT and sessions parse
    let pb = wait_for("A to list B", || {
        ca.get_peers()
            .expect("getPeers A")
            .into_iter()
            .find(|p| p.key == Some(b_id.public_key()))
    });
    assert_eq!(pb.address, Some(b_id.address()));
    match ca.request(&AdminRequest::GetDht).expect("getDHT") {
        gatewire::ygg::admin::AdminResponse::Dht(d) => {
            assert!(d.iter().all(|e| e.address == Some(e.key.address())))
        }
        other => panic!("unexpected {other:?}"),
    }
    let sessions = ca.get_sessions().expect("getSessions");
    assert!(sessions
        .iter()
        .all(|s| s.address.is_none() || s.address == Some(s.key.address())));

    // addPeer / removePeer round trip on B (target port is closed)
    let extra = LinkUri::parse_peer(
        &format!("tls://127.0.0.1:{}?priority=3", free_port()),
        Version::V0_4,
    )
    .expect("uri");
    cb.add_peer(&extra, None).expect("addPeer");
    cb.remove_peer(&extra, None).expect("removePeer");
}
