//! Moves one client connection to another hub of the mesh.

use super::table::PeerHub;
use super::Mesh;
use crate::clock::unix_secs;
use crate::proxy::io::{splice, Spliced};
use crate::proxy::proxy_protocol::{encode_v2, Transport};
use crate::proxy::settings::Limits;
use crate::proxy::stall::SendQueue;
use crate::proxy::stats::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tracing::debug;

/// Longest wait for another hub to accept a connection.
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
/// All the tries together take at most `connect_timeout` (each address at
/// most [`MAX_CONNECT`] of it, for the connect and again for writing the
/// header and `c.first`: a hub that accepts and does not read is left).
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
    for hub in hubs {
        let addrs = hub.addrs(tls);
        for &to in addrs {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                debug!(hub = %hub.name, "no time left to try more hubs");
                return Err((client, ErrorKind::BackendTimeout));
            }
            let timeout = left.min(MAX_CONNECT);
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
                )),
                None => encode_v2(&mut head, Transport::Tcp, peer, dest),
            }
            head.extend_from_slice(&first);
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
        // (A hub with no listener of this kind did not fail.)
        if !addrs.is_empty() {
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
