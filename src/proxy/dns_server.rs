//! The hub's DNS listeners (`[proxy.dns] listen`, `[proxy.acme]
//! dns_listen`), the driver of the pure responder [`crate::proxy::dns`]:
//! they answer for the gateway domains the operator delegates to the hub
//! with NS records (the whole zone with `[proxy.dns]`, else the TXT queries
//! of ACME DNS-01 validations for `_acme-challenge.<domain>`). What a name
//! holds comes from a [`DnsLookup`] the proxy gives. UDP replies leave from
//! the address the query was sent to; TCP carries one length-prefixed
//! message after another (RFC 7766).
//!
//! A TCP connection is closed after [`TCP_IDLE`] without a complete query,
//! after [`MAX_TCP_QUERIES`] queries or [`TCP_LIFETIME`], whichever comes
//! first; at most [`MAX_TCP_CONNECTIONS`] are open per listener.
//!
//! Over UDP, a client over `[proxy.dns] rate_limit` gets every other reply
//! truncated (header and question, TC set: a real resolver asks again over
//! TCP, which is not limited) and the rest dropped, so a forged source cannot
//! use the hub as an amplifier.
//!
//! Queries answered count as requests of the `dns` entry in the proxy's
//! counters; unreadable messages as `bad_dns_query`, names outside the
//! hub's zones (REFUSED) as `unknown_host`, queries over the rate as
//! `rate_limited`.

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
/// A TCP connection idle this long (no complete query) is closed.
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            counters.error(ErrorKind::OverCapacity);
            continue;
        };
        counters.connection();
        let (lookup, counters, stop) = (lookup.clone(), counters.clone(), stop.clone());
        tokio::spawn(async move {
            let _slot = slot;
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
    for _ in 0..MAX_TCP_QUERIES {
        let read = async {
            let len = sock.read_u16().await?;
            msg.resize(usize::from(len), 0);
            sock.read_exact(&mut msg).await?;
            Ok::<_, std::io::Error>(())
        };
        tokio::select! {
            r = tokio::time::timeout(TCP_IDLE, read) => match r {
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
