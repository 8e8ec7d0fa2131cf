//! The hub's DNS listeners (`[proxy.dns] listen`, `[proxy.acme]
//! dns_listen`), the driver of the pure responder [`crate::proxy::dns`]:
//! they answer for the gateway domains the operator delegates to the hub
//! with NS records (the whole zone with `[proxy.dns]`, else the TXT queries
//! of ACME DNS-01 validations for `_acme-challenge.<domain>`). What a name
//! holds comes from a [`DnsLookup`] the proxy gives. UDP replies leave from
//! the address the query was sent to; TCP carries one length-prefixed
//! message after another (RFC 7766).
//!
//! A TCP connection is closed without a complete first query within
//! [`TCP_FIRST_QUERY`], or a later one within [`TCP_IDLE`], after
//! [`MAX_TCP_QUERIES`] queries or [`TCP_LIFETIME`], whichever comes first; at
//! most [`MAX_TCP_CONNECTIONS`] are open per listener, [`MAX_TCP_PER_SOURCE`]
//! of them from one client (an IPv4 address, an IPv6 /64).
//!
//! Over UDP, a client over `[proxy.dns] rate_limit` gets every other reply
//! truncated (header and question, TC set: a real resolver asks again over
//! TCP, which is not rate limited) and the rest dropped, so a forged source
//! cannot use the hub as an amplifier.
//!
//! Queries answered count as requests of the `dns` entry in the proxy's
//! counters; unreadable messages as `bad_dns_query`, names outside the
//! hub's zones (REFUSED) as `unknown_host`, queries over the rate as
//! `rate_limited`, TCP connections refused over the caps as `over_capacity`.

use crate::per_source::{source_key, PerSource};
use crate::proxy::dns;
use crate::proxy::io::UdpListener;
use crate::proxy::stats::{Counters, ErrorKind};
use hickory_proto::op::ResponseCode;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, warn};

/// Open DNS-over-TCP connections per listener at most (more are closed).
pub const MAX_TCP_CONNECTIONS: usize = 64;
/// Of those, open from one client (an IPv4 address, an IPv6 /64) at most.
pub const MAX_TCP_PER_SOURCE: usize = 8;
/// A new TCP connection without a complete query this long is closed.
pub const TCP_FIRST_QUERY: Duration = Duration::from_secs(3);
/// A TCP connection idle this long after a query (no complete next one) is
/// closed.
pub const TCP_IDLE: Duration = Duration::from_secs(10);
/// Queries answered on one TCP connection at most.
pub const MAX_TCP_QUERIES: usize = 100;
/// A TCP connection is closed this long after it was accepted, however
/// busy (a client cannot hold the connection slots).
pub const TCP_LIFETIME: Duration = Duration::from_secs(30);

/// What a name holds (lowercase, no trailing dot), asked once per query.
pub type DnsLookup = Arc<dyn Fn(&str) -> dns::Lookup + Send + Sync>;
/// What to do with a UDP query from this client (takes a token).
pub type DnsLimit = Arc<dyn Fn(IpAddr) -> Rate + Send + Sync>;

/// A UDP query against its client's rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    /// Within it: answered.
    Within,
    /// Over it, an odd refusal of this client: a truncated reply.
    Slip,
    /// Over it, an even refusal: no reply.
    Drop,
}

/// The reply to a UDP query over its client's rate: a truncated one for a
/// slip, else none.
fn over_rate(counters: &Counters, query: &[u8], rate: Rate) -> Option<Vec<u8>> {
    counters.add_in(query.len() as u64);
    counters.error(ErrorKind::RateLimited);
    if rate != Rate::Slip {
        return None;
    }
    let reply = dns::respond_truncated(query).ok()?.bytes;
    counters.add_out(reply.len() as u64);
    Some(reply)
}

fn answer(lookup: &DnsLookup, counters: &Counters, query: &[u8], udp: bool) -> Option<Vec<u8>> {
    counters.add_in(query.len() as u64);
    match dns::respond(query, udp, |q| lookup(q)) {
        Ok(reply) => {
            counters.request();
            if reply.rcode == ResponseCode::Refused {
                counters.error(ErrorKind::UnknownHost);
            }
            counters.add_out(reply.bytes.len() as u64);
            Some(reply.bytes)
        }
        Err(e) => {
            counters.error(ErrorKind::BadDnsQuery);
            debug!(error = ?e, "DNS message dropped");
            None
        }
    }
}

/// Answers queries on a UDP DNS listener until `stop`.
pub async fn udp_loop(
    sock: Arc<UdpListener>,
    lookup: DnsLookup,
    limit: DnsLimit,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 65535];
    let mut meta = [quinn_udp::RecvMeta::default(); 1];
    loop {
        let n = tokio::select! {
            // (A stop first: a listener removed by a reload answers no more.)
            biased;
            _ = stop.changed() => return,
            r = async {
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                sock.recv(&mut iov, &mut meta).await
            } => match r {
                Ok(n) => n,
                Err(e) => {
                    warn!(error = %e, "DNS listener: receive failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        for m in meta.iter().take(n) {
            let data = buf.get(..m.len).unwrap_or_default();
            // A GRO train holds datagrams of `stride` bytes each.
            let stride = if m.stride == 0 { m.len } else { m.stride };
            for q in data.chunks(stride.max(1)) {
                let reply = match limit(m.addr.ip()) {
                    Rate::Within => answer(&lookup, &counters, q, true),
                    rate => over_rate(&counters, q, rate),
                };
                if let Some(reply) = reply {
                    if let Err(e) = sock.send(m.addr, m.dst_ip, &reply).await {
                        debug!(client = %m.addr, error = %e, "DNS reply not sent");
                    }
                }
            }
        }
    }
}

/// Answers queries on a TCP DNS listener until `stop`.
pub async fn tcp_loop(
    l: TcpListener,
    lookup: DnsLookup,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    let per_source = Arc::new(PerSource::default());
    loop {
        let (sock, peer) = tokio::select! {
            r = l.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "DNS listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Some(source) = per_source.take(source_key(peer.ip()), MAX_TCP_PER_SOURCE) else {
            counters.error(ErrorKind::OverCapacity);
            debug!(client = %peer, "DNS over TCP refused: too many connections from this client");
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            counters.error(ErrorKind::OverCapacity);
            continue;
        };
        counters.connection();
        let (lookup, counters, stop) = (lookup.clone(), counters.clone(), stop.clone());
        tokio::spawn(async move {
            let _slots = (slot, source);
            match tokio::time::timeout(TCP_LIFETIME, serve_tcp(sock, &lookup, &counters, stop))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(client = %peer, error = %e, "DNS over TCP ended"),
                Err(_) => debug!(client = %peer, "DNS over TCP closed after its lifetime"),
            }
        });
    }
}

async fn serve_tcp(
    mut sock: TcpStream,
    lookup: &DnsLookup,
    counters: &Counters,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut msg = Vec::new();
    for i in 0..MAX_TCP_QUERIES {
        let wait = if i == 0 { TCP_FIRST_QUERY } else { TCP_IDLE };
        let read = async {
            let len = sock.read_u16().await?;
            msg.resize(usize::from(len), 0);
            sock.read_exact(&mut msg).await?;
            Ok::<_, std::io::Error>(())
        };
        tokio::select! {
            r = tokio::time::timeout(wait, read) => match r {
                Ok(r) => r?,
                Err(_) => return Ok(()),
            },
            _ = stop.changed() => return Ok(()),
        }
        let Some(reply) = answer(lookup, counters, &msg, false) else {
            return Err(std::io::Error::other("not a DNS query"));
        };
        let len = u16::try_from(reply.len()).map_err(std::io::Error::other)?;
        let mut out = Vec::with_capacity(reply.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&reply);
        tokio::time::timeout(TCP_IDLE, sock.write_all(&out))
            .await
            .map_err(|_| std::io::Error::other("write timed out"))??;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::time::Instant;
    use tokio::net::TcpSocket;

    /// `x.test A`, length-prefixed for TCP.
    const QUERY: &[u8] = b"\x00\x18\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01x\x04test\x00\x00\x01\x00\x01";

    async fn connect(from: &str, to: SocketAddr) -> TcpStream {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::new(from.parse().unwrap(), 0)).unwrap();
        s.connect(to).await.unwrap()
    }

    /// Sends a query; true if a reply came, false if the connection closed.
    async fn ask(s: &mut TcpStream) -> bool {
        if s.write_all(QUERY).await.is_err() {
            return false;
        }
        let r = tokio::time::timeout(Duration::from_secs(2), s.read_u16()).await;
        let Ok(Ok(len)) = r else { return false };
        let mut reply = vec![0u8; usize::from(len)];
        s.read_exact(&mut reply).await.is_ok() && reply[..2] == QUERY[2..4]
    }

    /// Waits for the server to close `s`; how long that took.
    async fn closed(s: &mut TcpStream) -> Duration {
        let t0 = Instant::now();
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(8), s.read(&mut b)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
        t0.elapsed()
    }

    #[tokio::test]
    async fn one_client_cannot_hold_every_tcp_slot_nor_wait_long_for_its_first_query() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        let lookup: DnsLookup = Arc::new(|_| dns::Lookup::Outside);
        let counters = Arc::new(Counters::default());
        let (_stop, stop_rx) = watch::channel(false);
        tokio::spawn(tcp_loop(l, lookup, counters.clone(), stop_rx));

        let mut held = Vec::new();
        for _ in 0..MAX_TCP_PER_SOURCE {
            let mut s = connect("127.0.0.1", at).await;
            assert!(ask(&mut s).await);
            held.push(s);
        }
        // One more from that client is closed at once, and counted.
        let mut extra = connect("127.0.0.1", at).await;
        assert!(closed(&mut extra).await < Duration::from_secs(2));
        assert_eq!(counters.errors_of(ErrorKind::OverCapacity), 1);
        // Another client is served meanwhile.
        let mut other = connect("127.0.0.2", at).await;
        assert!(ask(&mut other).await);
        // A closed connection gives its client's place back.
        drop(held.pop());
        let mut served = false;
        for _ in 0..50 {
            let mut s = connect("127.0.0.1", at).await;
            if ask(&mut s).await {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(served);

        // A connection that sends nothing is closed after TCP_FIRST_QUERY.
        let mut quiet = connect("127.0.0.3", at).await;
        let waited = closed(&mut quiet).await;
        assert!(
            waited >= TCP_FIRST_QUERY - Duration::from_millis(500)
                && waited < TCP_FIRST_QUERY + Duration::from_secs(2),
            "{waited:?}"
        );
    }
}
