//! Moves one client connection to another hub of the mesh.

use super::ack;
use super::table::PeerHub;
use super::Mesh;
use crate::clock::unix_secs;
use crate::proxy::io::{splice, Spliced};
use crate::proxy::proxy_protocol::{encode_v2, push_tlv, Transport};
use crate::proxy::settings::Limits;
use crate::proxy::stall::SendQueue;
use crate::proxy::stats::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tracing::debug;

/// Longest time one other hub gets to take a connection, over all its
/// addresses.
pub const MAX_CONNECT: Duration = Duration::from_secs(3);

/// The answer a plain HTTP client gets when no hub that serves its host answered.
pub const HTTP_502: &[u8] = b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain\r\ncontent-length: 38\r\nconnection: close\r\n\r\nno hub that serves this host answered\n";

/// Opens a connection to `to` from this hub's advertised address of the same
/// family (so the other hub knows it as a hub); from any address when that one
/// cannot be bound here (a hub behind 1:1 NAT advertises its public address).
async fn connect(mesh: &Mesh, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let sock = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = mesh
        .settings
        .advertise
        .iter()
        .find(|ip| ip.is_ipv4() == to.is_ipv4())
    {
        if let Err(e) = sock.bind(SocketAddr::new(*ip, 0)) {
            debug!(source = %ip, error = %e, "advertised address not bindable here");
        }
    }
    match tokio::time::timeout(timeout, sock.connect(to)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        )),
    }
}

/// Whether `to` may be tried: without a secret the other hub knows this one
/// only by its advertised addresses, and from a family this hub advertises
/// none of, the kernel's source would be a stranger's (its PROXY header read
/// as a client's first bytes).
fn may_try(mesh: &Mesh, to: SocketAddr) -> bool {
    mesh.seal_key().is_some()
        || mesh
            .settings
            .advertise
            .iter()
            .any(|ip| ip.is_ipv4() == to.is_ipv4())
}

/// Reads a hub's answer ([`ack::ANSWER_LEN`] bytes) within `timeout`, and
/// not a byte more: what follows is the client's.
async fn answer(up: &mut TcpStream, timeout: Duration) -> ack::Reply {
    let mut b = [0u8; ack::ANSWER_LEN];
    match tokio::time::timeout(timeout, up.read_exact(&mut b)).await {
        Ok(Ok(_)) => ack::Reply::Bytes(b),
        Ok(Err(_)) => ack::Reply::Closed,
        Err(_) => ack::Reply::TimedOut,
    }
}

/// Where a connection went, and what the splice moved.
#[derive(Debug)]
pub struct Sent {
    pub hub: String,
    pub to: SocketAddr,
    pub spliced: Spliced,
}

/// A client connection on its way to another hub.
pub struct Client {
    pub sock: TcpStream,
    /// Where it came from (from the PROXY header of a balancer, if any).
    pub peer: SocketAddr,
    /// The address it connected to.
    pub dest: SocketAddr,
    /// What was read of it already (the ClientHello, or the request head);
    /// freed once it is written.
    pub first: Vec<u8>,
}

/// Where a client from `ip` starts in a list of `n` hubs: spread over them
/// by the client's address (so the load on a name several other hubs serve
/// is shared, and one client keeps going to the same hub while it is up).
pub(crate) fn first_hub(n: usize, ip: std::net::IpAddr) -> usize {
    use std::hash::{Hash, Hasher};
    if n < 2 {
        return 0;
    }
    // Fixed keys: the same client starts at the same hub after a restart.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ip.to_canonical().hash(&mut h);
    (h.finish() % n as u64) as usize
}

/// Sends `c` to the first of `hubs` that accepts, over their TLS listeners
/// when `tls`: a PROXY v2 header, `c.first`, then both directions spliced
/// until they end or the idle timeout passes without a byte. Returns the hub
/// that took it and what the splice moved, or the error to count when none
/// accepted (the client is then still open, for the caller to answer).
///
/// A hub whose record says it answers ([`PeerHub::ack`]) is asked to
/// ([`super::ack`]) and has taken the connection only once its acceptance
/// is read: a refusal, a close, anything else or nothing in its time, and
/// the next hub gets the same first bytes (the client has had nothing yet).
/// A hub that does not answer has taken it once the header and `c.first`
/// are written.
///
/// All the tries together take at most `connect_timeout`; each hub at most
/// [`MAX_CONNECT`] of it over all its addresses (the connects, writing the
/// header and `c.first`, and its answer: a hub that accepts and does not
/// read, or does not answer, is left), and at most half of what is left
/// while other hubs follow. Without a secret, addresses of a family this hub
/// advertises none of are not tried ([`may_try`]). A hub that fails is tried
/// after the others for a while ([`Mesh::candidates`]).
pub async fn forward(
    mesh: &Mesh,
    hubs: &[Arc<PeerHub>],
    tls: bool,
    c: Client,
    limits: &Limits,
) -> Result<Sent, (TcpStream, ErrorKind)> {
    let Client {
        sock: client,
        peer,
        dest,
        first,
    } = c;
    let deadline = tokio::time::Instant::now() + limits.connect_timeout;
    let idle = limits.idle_timeout;
    let mut kind = ErrorKind::NoHealthyBackend;
    let reachable = |h: &PeerHub| h.addrs(tls).iter().any(|&a| may_try(mesh, a));
    let mut rest = hubs.iter().filter(|h| reachable(h)).count();
    for hub in hubs {
        // (A hub with no listener of this kind, or none this hub may try,
        // did not fail.)
        if !reachable(hub) {
            if !hub.addrs(tls).is_empty() {
                debug!(hub = %hub.name, "no address of a family this hub advertises");
            }
            continue;
        }
        rest -= 1;
        let now = tokio::time::Instant::now();
        let left = deadline.saturating_duration_since(now);
        let share = if rest > 0 { left / 2 } else { left };
        let hub_deadline = now + share.min(MAX_CONNECT);
        let mut tried = false;
        for &to in hub.addrs(tls) {
            if !may_try(mesh, to) {
                continue;
            }
            let timeout = hub_deadline.saturating_duration_since(tokio::time::Instant::now());
            if timeout.is_zero() {
                debug!(hub = %hub.name, "no time left for more of its addresses");
                kind = ErrorKind::BackendTimeout;
                break;
            }
            tried = true;
            let mut up = match connect(mesh, to, timeout).await {
                Ok(s) => s,
                Err(e) => {
                    debug!(hub = %hub.name, to = %to, error = %e, "hub did not answer");
                    kind = if e.kind() == std::io::ErrorKind::TimedOut {
                        ErrorKind::BackendTimeout
                    } else {
                        ErrorKind::BackendRefused
                    };
                    continue;
                }
            };
            let _ = up.set_nodelay(true);
            let mut head = Vec::with_capacity(128 + first.len());
            match mesh.seal_key() {
                Some(k) => head.extend_from_slice(&super::seal::seal(
                    k,
                    &hub.name,
                    peer,
                    dest,
                    unix_secs(),
                    rand_core::RngCore::next_u64(&mut rand_core::OsRng).to_be_bytes(),
                    hub.ack,
                )),
                None => {
                    encode_v2(&mut head, Transport::Tcp, peer, dest);
                    if hub.ack {
                        push_tlv(&mut head, ack::TLV_TYPE, &[ack::VERSION]);
                    }
                }
            }
            head.extend_from_slice(&first);
            let timeout = hub_deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(timeout, up.write_all(&head)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    debug!(hub = %hub.name, to = %to, error = %e, "hub closed at once");
                    kind = ErrorKind::BackendRefused;
                    continue;
                }
                Err(_) => {
                    debug!(hub = %hub.name, to = %to, "hub took the connection but not its first bytes");
                    kind = ErrorKind::BackendTimeout;
                    continue;
                }
            }
            // Not held for the life of the connection.
            drop(head);
            if hub.ack {
                let timeout = hub_deadline.saturating_duration_since(tokio::time::Instant::now());
                if let Err(f) = ack::outcome(answer(&mut up, timeout).await) {
                    debug!(hub = %hub.name, to = %to, why = f.as_str(), "hub did not take the connection; trying the next");
                    mesh.note_unaccepted(f);
                    kind = f.kind();
                    // Its other addresses reach the same hub.
                    break;
                }
            }
            mesh.note_success(&hub.name);
            mesh.counters.connection();
            mesh.counters.add_in(first.len() as u64);
            drop(first);
            // The hub that has the route applies its `bandwidth`.
            let queue = Some(SendQueue::of(&client));
            let spliced = splice(client, up, mesh.counters.clone(), idle, None, queue).await;
            return Ok(Sent {
                hub: hub.name.clone(),
                to,
                spliced,
            });
        }
        if tried {
            mesh.note_failure(&hub.name);
        }
    }
    mesh.counters.error(kind);
    Err((client, kind))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    fn mesh(extra: &str, dir: &std::path::Path) -> Arc<Mesh> {
        let raw: super::super::settings::RawMesh = toml::from_str(&format!(
            "name = \"a\"\netcd = [\"http://192.0.2.9:2379\"]\n{extra}"
        ))
        .unwrap();
        Mesh::new(super::super::settings::validate(raw, dir, true).unwrap())
    }

    fn hub(name: &str, http: Vec<SocketAddr>) -> Arc<PeerHub> {
        Arc::new(PeerHub {
            name: name.into(),
            http,
            https: Vec::new(),
            hosts: 1,
            ack: false,
        })
    }

    /// A client connection (the hub's end) and the client's own end.
    async fn client(first: Vec<u8>) -> (Client, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let own = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (sock, peer) = l.accept().await.unwrap();
        let c = Client {
            sock,
            peer,
            dest: "198.51.100.1:80".parse().unwrap(),
            first,
        };
        (c, own)
    }

    /// A hub that takes connections and never reads them.
    async fn deaf() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    fn failed(m: &Mesh) -> Vec<String> {
        let mut v: Vec<String> = m.failed_at.lock().keys().cloned().collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn a_hub_that_hangs_leaves_time_for_the_next_and_is_marked() {
        let m = mesh(
            "advertise = [\"198.51.100.1\"]\n",
            std::path::Path::new("/"),
        );
        let limits = Limits {
            connect_timeout: Duration::from_secs(2),
            ..Limits::default()
        };
        // More than the sockets of a connection nobody reads hold.
        let first = vec![b'x'; 16 << 20];
        let (_b1, b1) = deaf().await;
        let (_b2, b2) = deaf().await;
        let c = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c_addr = c.local_addr().unwrap();
        let want = first.len();
        let reader = tokio::spawn(async move {
            let (mut s, _) = c.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap()
        });
        let hubs = [hub("b", vec![b1, b2]), hub("c", vec![c_addr])];
        let (cl, own) = client(first).await;
        drop(own);
        let started = tokio::time::Instant::now();
        let sent = forward(&m, &hubs, false, cl, &limits).await.unwrap();
        assert_eq!(sent.hub, "c");
        assert!(
            reader.await.unwrap() > want,
            "the header and the first bytes"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(failed(&m), ["b"]);

        // When every hub hangs, each is marked and the error counted.
        m.failed_at.lock().clear();
        let (_c1, c1) = deaf().await;
        let hubs = [hub("b", vec![b1, b2]), hub("c", vec![c1])];
        let (cl, _own) = client(vec![b'x'; 16 << 20]).await;
        let started = tokio::time::Instant::now();
        let Err((_, kind)) = forward(&m, &hubs, false, cl, &limits).await else {
            panic!("a deaf hub took it");
        };
        assert_eq!(kind, ErrorKind::BackendTimeout);
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(m.counters.errors_of(ErrorKind::BackendTimeout), 1);
        assert_eq!(failed(&m), ["b", "c"]);
    }

    /// What a fake hub does once it has read the PROXY header and the first
    /// bytes.
    #[derive(Clone, Copy)]
    enum Then {
        /// Writes these bytes and closes.
        Write(&'static [u8]),
        /// Closes.
        Close,
        /// Says nothing and keeps the connection open.
        Hold,
    }

    /// A hub that takes one connection, reads its PROXY header and
    /// `first_len` bytes, then does `then`; gives back the header and the
    /// bytes.
    async fn fake_hub(
        first_len: usize,
        then: Then,
    ) -> (SocketAddr, tokio::task::JoinHandle<(Vec<u8>, Vec<u8>)>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut head = vec![0u8; 16];
            s.read_exact(&mut head).await.unwrap();
            let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
            head.resize(16 + len, 0);
            s.read_exact(&mut head[16..]).await.unwrap();
            let mut first = vec![0u8; first_len];
            s.read_exact(&mut first).await.unwrap();
            match then {
                Then::Write(b) => s.write_all(b).await.unwrap(),
                Then::Close => {}
                Then::Hold => tokio::time::sleep(Duration::from_secs(30)).await,
            }
            (head, first)
        });
        (a, task)
    }

    fn acking(name: &str, to: SocketAddr) -> Arc<PeerHub> {
        Arc::new(PeerHub {
            name: name.into(),
            http: vec![to],
            https: Vec::new(),
            hosts: 1,
            ack: true,
        })
    }

    #[tokio::test]
    async fn a_hub_that_refuses_is_left_for_the_next_with_the_same_first_bytes() {
        let m = mesh(
            "advertise = [\"198.51.100.1\"]\n",
            std::path::Path::new("/"),
        );
        let first = b"GET / HTTP/1.1\r\nHost: x.gw.test\r\n\r\n".to_vec();
        let n = first.len();
        let no_route = ack::encode(Err(ack::Refusal::NoRoute));
        let no_route: &'static [u8] = Box::leak(Box::new(no_route));
        let (b, b_got) = fake_hub(n, Then::Write(no_route)).await;
        let (c, c_got) = fake_hub(n, Then::Write(b"GW\x01\x00served by c")).await;
        let hubs = [acking("b", b), acking("c", c)];
        let (cl, mut own) = client(first.clone()).await;
        let limits = Limits::default();
        let m2 = m.clone();
        let sent = tokio::spawn(async move { forward(&m2, &hubs, false, cl, &limits).await });
        // The client reads c's answer, and nothing of the acknowledgements.
        let mut got = Vec::new();
        own.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"served by c");
        drop(own);
        let sent = sent.await.unwrap().unwrap();
        assert_eq!(sent.hub, "c");
        // Both got the header with the request, and the same first bytes.
        for (hub, got) in [("b", b_got.await.unwrap()), ("c", c_got.await.unwrap())] {
            assert_eq!(ack::requested(&got.0), Ok(true), "{hub}");
            assert_eq!(got.1, first, "{hub}");
        }
        assert_eq!(failed(&m), ["b"]);
        let v = m.view();
        assert_eq!((v.forwarded, v.refused, v.unacknowledged), (1, 1, 0));
        assert_eq!(m.counters.errors_of(ErrorKind::BackendRefused), 0);
    }

    #[tokio::test]
    async fn a_hub_that_closes_says_nothing_or_something_else_is_left() {
        let m = mesh(
            "advertise = [\"198.51.100.1\"]\n",
            std::path::Path::new("/"),
        );
        let limits = Limits {
            connect_timeout: Duration::from_secs(2),
            ..Limits::default()
        };
        let first = b"GET / HTTP/1.1\r\nHost: x.gw.test\r\n\r\n".to_vec();
        let n = first.len();
        let (b, _b) = fake_hub(n, Then::Close).await;
        let (c, c_task) = fake_hub(n, Then::Hold).await;
        // A hub of another release: its client's answer comes first.
        let (d, _d) = fake_hub(n, Then::Write(b"HTTP/1.1 404 Not Found\r\n\r\n")).await;
        let hubs = [acking("b", b), acking("c", c), acking("d", d)];
        let (cl, _own) = client(first).await;
        let started = tokio::time::Instant::now();
        let Err((_, kind)) = forward(&m, &hubs, false, cl, &limits).await else {
            panic!("a hub that did not accept took it");
        };
        assert!(started.elapsed() < Duration::from_secs(3));
        // c, which held it, had its share of the time and no more; d then
        // had the rest.
        assert_eq!(kind, ErrorKind::BackendProtocol);
        assert_eq!(m.counters.errors_of(ErrorKind::BackendProtocol), 1);
        assert_eq!(failed(&m), ["b", "c", "d"]);
        let v = m.view();
        assert_eq!((v.forwarded, v.refused, v.unacknowledged), (0, 0, 3));
        c_task.abort();
    }

    #[tokio::test]
    async fn a_hub_that_does_not_answer_is_not_asked() {
        let m = mesh(
            "advertise = [\"198.51.100.1\"]\n",
            std::path::Path::new("/"),
        );
        let first = b"GET / HTTP/1.1\r\nHost: x.gw.test\r\n\r\n".to_vec();
        let (b, b_got) = fake_hub(first.len(), Then::Write(b"HTTP/1.1 200 OK\r\n\r\n")).await;
        let (cl, mut own) = client(first).await;
        let m2 = m.clone();
        let sent = tokio::spawn(async move {
            forward(&m2, &[hub("b", vec![b])], false, cl, &Limits::default()).await
        });
        let mut got = Vec::new();
        own.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"HTTP/1.1 200 OK\r\n\r\n");
        drop(own);
        assert_eq!(sent.await.unwrap().unwrap().hub, "b");
        assert_eq!(ack::requested(&b_got.await.unwrap().0), Ok(false));
        assert_eq!(m.view().forwarded, 1);
    }

    #[tokio::test]
    async fn without_a_secret_no_address_of_a_family_this_hub_does_not_advertise() {
        let m = mesh("advertise = [\"2001:db8::1\"]\n", std::path::Path::new("/"));
        let (l, to) = deaf().await;
        assert!(!may_try(&m, to));
        let (cl, _own) = client(b"GET / HTTP/1.1\r\n\r\n".to_vec()).await;
        let Err((_, kind)) =
            forward(&m, &[hub("b", vec![to])], false, cl, &Limits::default()).await
        else {
            panic!("sent from an address b does not know");
        };
        assert_eq!(kind, ErrorKind::NoHealthyBackend);
        assert_eq!(m.counters.errors_of(ErrorKind::NoHealthyBackend), 1);
        assert!(failed(&m).is_empty());
        let nothing = tokio::time::timeout(Duration::from_millis(100), l.accept()).await;
        assert!(nothing.is_err(), "b got a connection");
        // With a secret the seal vouches for any source.
        let dir = std::env::temp_dir().join(format!("gw-fwd-family-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("s.key"), "0123456789abcdef0123456789abcdef\n").unwrap();
        let sealed = mesh(
            "advertise = [\"2001:db8::1\"]\nsecret_file = \"s.key\"\n",
            &dir,
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(may_try(&sealed, to));
        assert!(may_try(&m, "[2001:db8::2]:443".parse().unwrap()));
    }

    #[test]
    fn clients_are_spread_over_the_hubs_and_each_keeps_its_own() {
        assert_eq!(first_hub(0, "192.0.2.1".parse().unwrap()), 0);
        assert_eq!(first_hub(1, "192.0.2.1".parse().unwrap()), 0);
        let mut seen = [0usize; 3];
        for i in 0..=255u8 {
            let ip = std::net::IpAddr::from([198, 51, 100, i]);
            let k = first_hub(3, ip);
            assert!(k < 3);
            assert_eq!(k, first_hub(3, ip), "one client, one hub");
            seen[k] += 1;
        }
        // 256 clients over 3 hubs: each gets a fair share, not all of them.
        assert!(seen.iter().all(|&n| (40..=130).contains(&n)), "{seen:?}");
        // An IPv4 client over IPv6 (mapped) is the same client.
        assert_eq!(
            first_hub(3, "::ffff:198.51.100.7".parse().unwrap()),
            first_hub(3, "198.51.100.7".parse().unwrap())
        );
    }
}
