//! Replays Jool's graybox SIIT vectors (`shared/vectors/jool-graybox/`)
//! through a real TUN device: the real `gatewire hub` runs the translator on
//! TUN `xv0` with an `[xlat]` section mirroring the cases' configuration, and
//! packets are injected into (and captured from) that TUN with an AF_PACKET
//! socket, so they reach the hub's TUN loop with no kernel hop in between (no
//! extra TTL decrement, no kernel sanity checks). The hub is restarted with a
//! new configuration whenever a case's settings differ from the previous one's.
//!
//! Needs root, a fresh network namespace and `GATEWIRE` pointing at the
//! binary; `netns/tests/80-xlat-vectors.sh` provides all three:
//!
//! ```text
//! ip netns exec NS env GATEWIRE=target/release/gatewire \
//!     target/.../xlat_tun_vectors-HASH --ignored --nocapture
//! ```
//!
//! The namespace must drop what the translator writes to the TUN after the
//! socket has seen it (`ip rule add iif xv0 blackhole`, same for `-6`), so the
//! kernel never answers on its own.

mod siit;

use std::io;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const IFACE: &str = "xv0";
const KEY: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";

/// The `[xlat]` section for a case's settings (README "defaults" plus changes).
fn xlat_section(settings: &str) -> String {
    let mut pool6 = Some("2001:db8:100::/40".to_string());
    let mut eams = vec![
        ("1.0.0.0/24".to_string(), "2001:db8:3::/120".to_string()),
        ("10.0.0.0/24".to_string(), "2001:db8:2::/120".to_string()),
    ];
    let mut rfc6791_v4 = Some("203.0.113.8".to_string());
    let mut rfc6791_v6: Option<String> = None;
    let mut lowest = 1280u32;
    let mut amend = false;
    let mut mtu4 = 1500u32;
    let mut mtu6 = 1500u32;
    for kv in settings.split(';').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').expect("setting k=v");
        match k {
            "lowest-ipv6-mtu" => lowest = v.parse().expect("mtu"),
            "amend-udp-checksum-zero" => amend = matches!(v, "true" | "on" | "1"),
            "rfc6791v4-prefix" => rfc6791_v4 = (v != "null").then(|| v.to_string()),
            "rfc6791v6-prefix" => {
                rfc6791_v6 = (v != "null").then(|| v.split('/').next().unwrap_or(v).to_string())
            }
            "mtu:to_client_v4" => mtu4 = v.parse().expect("mtu"),
            "mtu:to_client_v6" => mtu6 = v.parse().expect("mtu"),
            // The sender's link: only what can be injected (the TUN takes 9000).
            "mtu:to_jool_v4" => {}
            "pool6" => pool6 = (v != "null").then(|| v.to_string()),
            "extra-eam" => {
                for e in v.split(',') {
                    let (a, b) = e.split_once('=').expect("eam a=b");
                    let (a4, a6) = if a.contains(':') { (b, a) } else { (a, b) };
                    eams.push((a4.to_string(), a6.to_string()));
                }
            }
            _ => panic!("unknown setting {k}"),
        }
    }
    // The cases assume Jool: no MSS clamping, every generated error sent.
    let mut s =
        String::from("[xlat]\nroutes = false\nmss_clamp = false\nicmp_error_rate = 1000000\n");
    match &pool6 {
        Some(p) => {
            s += &format!("pool6 = \"{p}\"\n");
            // Every IPv4 destination that is not an EAM goes through pool6.
            s += "ipv4_via_pool6 = [\"0.0.0.0/0\"]\n";
        }
        None => s += "pool6 = \"off\"\n",
    }
    s += "eam = [\n";
    for (a, b) in &eams {
        s += &format!("  {{ ipv4 = \"{a}\", ipv6 = \"{b}\" }},\n");
    }
    s += "]\n";
    if let Some(r) = rfc6791_v4 {
        s += &format!("rfc6791_ipv4 = \"{r}\"\n");
    }
    if let Some(r) = rfc6791_v6 {
        s += &format!("rfc6791_ipv6 = \"{r}\"\n");
    }
    s += &format!(
        "self_ipv4 = \"198.51.100.1\"\nself_ipv6 = \"2001:db8:1c0:2:1::\"\n\
         lowest_ipv6_mtu = {lowest}\nipv4_mtu = {mtu4}\nipv6_mtu = {mtu6}\n\
         amend_udp_checksum_zero = {amend}\n"
    );
    s
}

fn hub_config(settings: &str) -> String {
    format!(
        "[hub]\nprivate_key = \"{KEY}\"\ninterface = \"{IFACE}\"\nlisten_port = 0\n\
         addresses = [\"10.255.255.1/32\"]\nmtu = 9000\nkeepalive = 0\n\n{}",
        xlat_section(settings)
    )
}

/// A running `gatewire hub`; killed (and its TUN gone) on drop.
struct Hub {
    child: Child,
}

impl Hub {
    fn start(bin: &str, dir: &std::path::Path, settings: &str, n: usize) -> Hub {
        let conf = dir.join(format!("hub{n}.toml"));
        std::fs::write(&conf, hub_config(settings)).expect("write config");
        let log = std::fs::File::create(dir.join(format!("hub{n}.log"))).expect("log");
        let child = Command::new(bin)
            .args(["hub", "--config"])
            .arg(&conf)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start gatewire hub");
        let t0 = Instant::now();
        while ifindex(IFACE).is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no {IFACE} after 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("ip")
            .args(["link", "set", IFACE, "up"])
            .status();
        // Let the TUN loop start reading.
        std::thread::sleep(Duration::from_millis(300));
        Hub { child }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let t0 = Instant::now();
        while ifindex(IFACE).is_some() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn ifindex(name: &str) -> Option<i32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: c is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i as i32)
}

/// An AF_PACKET socket bound to the TUN: sending hands bytes to the
/// translator's fd; what the translator writes shows up as incoming.
struct PacketSock {
    fd: i32,
    ifindex: i32,
}

impl PacketSock {
    fn open(ifindex: i32) -> io::Result<PacketSock> {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2)/bind(2) calls with a zeroed sockaddr_ll.
        unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                i32::from(proto),
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex;
            let r = libc::bind(
                fd,
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            if r < 0 {
                let e = io::Error::last_os_error();
                libc::close(fd);
                return Err(e);
            }
            Ok(PacketSock { fd, ifindex })
        }
    }

    fn send(&self, pkt: &[u8]) -> io::Result<()> {
        let ethertype: u16 = if pkt.first().map(|b| b >> 4) == Some(6) {
            0x86dd
        } else {
            0x0800
        };
        // SAFETY: sendto(2) with a valid buffer and sockaddr_ll.
        unsafe {
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ethertype.to_be();
            sll.sll_ifindex = self.ifindex;
            let r = libc::sendto(
                self.fd,
                pkt.as_ptr() as *const libc::c_void,
                pkt.len(),
                0,
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Next packet the translator wrote (incoming on the TUN), within `until`.
    fn recv(&self, buf: &mut [u8], until: Instant) -> Option<usize> {
        loop {
            let left = until.checked_duration_since(Instant::now())?;
            let mut pfd = libc::pollfd {
                fd: self.fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll(2) on one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
            if r <= 0 {
                return None;
            }
            // SAFETY: recvfrom(2) into a buffer we own, with room for the address.
            let (n, sll) = unsafe {
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                let n = libc::recvfrom(
                    self.fd,
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                    &mut sll as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut len,
                );
                (n, sll)
            };
            if n < 0 {
                return None;
            }
            if sll.sll_pkttype == libc::PACKET_HOST {
                return Some(n as usize);
            }
            // Our own injections (PACKET_OUTGOING) and anything else: skip.
        }
    }

    fn drain(&self, buf: &mut [u8]) {
        while self
            .recv(buf, Instant::now() + Duration::from_millis(1))
            .is_some()
        {}
    }
}

impl Drop for PacketSock {
    fn drop(&mut self) {
        // SAFETY: closing the fd we opened.
        unsafe { libc::close(self.fd) };
    }
}

/// (source, destination) of an IP packet, as raw bytes.
fn addrs(p: &[u8]) -> Option<(&[u8], &[u8])> {
    match p.first()? >> 4 {
        4 => Some((p.get(12..16)?, p.get(16..20)?)),
        6 => Some((p.get(8..24)?, p.get(24..40)?)),
        _ => None,
    }
}

fn diff(got: &[u8], want: &[u8], ignored: &[usize]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("length {} != expected {}", got.len(), want.len()));
    }
    let bad: Vec<String> = (0..want.len())
        .filter(|i| !ignored.contains(i) && got.get(*i) != want.get(*i))
        .take(8)
        .map(|i| format!("@{i}: {:02x}!={:02x}", got[i], want[i]))
        .collect();
    (!bad.is_empty()).then(|| format!("bytes differ: {}", bad.join(" ")))
}

#[test]
#[ignore = "needs root, a fresh network namespace and GATEWIRE (netns/tests/80-xlat-vectors.sh)"]
fn graybox_siit_vectors_through_tun() {
    let bin = std::env::var("GATEWIRE").expect("GATEWIRE: path to the gatewire binary");
    let dir = std::env::temp_dir().join(format!("gw-xlat-tun.{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let tsv = std::fs::read_to_string(format!("{}/siit-cases.tsv", siit::vectors()))
        .expect("siit-cases.tsv");
    let mut buf = vec![0u8; 65536];
    let mut hub: Option<(String, Hub, PacketSock)> = None;
    let mut starts = 0;
    let (mut total, mut failures) = (0, Vec::<String>::new());
    for line in tsv
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let cols: Vec<&str> = line.split('\t').collect();
        let col = |i: usize| cols.get(i).copied().unwrap_or("");
        let (id, sent, expected, ignored, settings) = (col(0), col(3), col(4), col(5), col(6));
        total += 1;
        if hub.as_ref().map(|h| h.0.as_str()) != Some(settings) {
            // Old hub (and socket) first, so the TUN name is free.
            drop(hub.take());
            starts += 1;
            let h = Hub::start(&bin, &dir, settings, starts);
            let sock = PacketSock::open(ifindex(IFACE).expect("ifindex")).expect("AF_PACKET");
            hub = Some((settings.to_string(), h, sock));
        }
        let Some((_, _, sock)) = hub.as_ref() else {
            unreachable!()
        };
        let ignored: Vec<usize> = ignored
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().expect("offset"))
            .collect();
        let wants: Vec<Vec<u8>> = expected.split(',').map(siit::read).collect();
        sock.drain(&mut buf);
        if let Err(e) = sock.send(&siit::read(sent)) {
            failures.push(format!("{id} ({sent}): send: {e}"));
            continue;
        }
        // Graybox pairing: each expected packet takes the first arriving
        // packet with its addresses, in order; other traffic is ignored.
        let mut got: Vec<Option<Vec<u8>>> = vec![None; wants.len()];
        let until = Instant::now() + Duration::from_millis(500);
        while got.iter().any(Option::is_none) {
            let Some(n) = sock.recv(&mut buf, until) else {
                break;
            };
            let p = &buf[..n];
            if let Some(slot) = wants
                .iter()
                .zip(got.iter_mut())
                .find(|(w, g)| g.is_none() && addrs(w) == addrs(p))
                .map(|(_, g)| g)
            {
                *slot = Some(p.to_vec());
            }
        }
        for (k, (w, g)) in wants.iter().zip(&got).enumerate() {
            match g {
                None => failures.push(format!("{id} ({sent}) packet {k}: nothing arrived")),
                Some(g) => {
                    if let Some(d) = diff(g, w, &ignored) {
                        failures.push(format!("{id} ({sent}) packet {k}: {d}"));
                    }
                }
            }
        }
    }
    drop(hub);
    let failed: std::collections::BTreeSet<&str> = failures
        .iter()
        .filter_map(|f| f.split(' ').next())
        .collect();
    println!(
        "graybox SIIT vectors through TUN {IFACE}: {} of {total} cases pass ({starts} hub starts)",
        total - failed.len()
    );
    for f in &failures {
        println!("FAIL {f}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        failures.is_empty(),
        "{} of {total} cases failed",
        failed.len()
    );
}
