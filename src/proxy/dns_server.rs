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
//! most [`MAX_TCP_PER_SOURCE`] are open from one client (an IPv4 address, an
//! IPv6 /64), and at most [`MAX_TCP_CONNECTIONS`] per listener: when all of
//! those are open, a new connection takes the place of the one idle longest
//! (waiting for its next query or part-way through reading it, since its
//! last reply or since it opened; not one answering a complete query: RFC
//! 7766, section 6.2.3), which is closed; only when all are answering is the
//! new one closed. So connections that stay silent, or send the first bytes
//! of a query and stall, cannot lock out the resolvers that the UDP rate
//! limit sends to TCP.
//!
//! Over UDP, a client over `[proxy.dns] rate_limit` (counted by its IPv4
//! /24 or IPv6 /56, [`rate_key`]) gets every other reply truncated (header
//! and question, TC set: a real resolver asks again over TCP, which is not
//! rate limited) and the rest dropped, so a forged source cannot use the hub
//! as an amplifier. Datagrams from the ports of UDP services that answer
//! whatever they get (echo, daytime, chargen, memcached...:
//! [`reply_loop_port`]) are dropped: a query forged from one would start a
//! loop of replies.
//!
//! Queries answered count as requests of the `dns` entry in the proxy's
//! counters; unreadable messages and datagrams from those ports as
//! `bad_dns_query`, names outside the hub's zones (REFUSED) as
//! `unknown_host` (not the zone transfers and classes refused whatever the
//! name, which are requests only), queries over the rate as `rate_limited`,
//! TCP connections refused over the caps as `over_capacity`.

use crate::per_source::{source_key, PerSource};
use crate::proxy::dns;
use crate::proxy::io::UdpListener;
use crate::proxy::stats::{Counters, ErrorKind};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tracing::{debug, warn};

/// Open DNS-over-TCP connections per listener at most (each holds at most
/// a 64 KiB message); a new one over it takes the place of the one idle
/// longest, or is closed when none is idle.
pub const MAX_TCP_CONNECTIONS: usize = 1024;
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
/// What to do with a UDP query from this client (takes a token); the UDP
/// listener gives it the client's network ([`rate_key`]).
pub type DnsLimit = Arc<dyn Fn(IpAddr) -> Rate + Send + Sync>;

/// Source ports of UDP services that answer any datagram (echo, daytime,
/// quote of the day, chargen, time; memcached, with an error for what it
/// cannot read) and port 0: a query forged from one of them would have the
/// hub and that service answer each other without end.
pub const REPLY_LOOP_PORTS: [u16; 7] = [0, 7, 13, 17, 19, 37, 11211];

/// Whether a UDP datagram from source port `port` is dropped unanswered
/// ([`REPLY_LOOP_PORTS`]). Resolvers ask from any other port.
pub fn reply_loop_port(port: u16) -> bool {
    REPLY_LOOP_PORTS.contains(&port)
}

/// The client a UDP query counts against in the rate limit: its IPv4 /24 or
/// its IPv6 /56 (as response rate limiting usually keys it), so forged
/// sources spread over a victim's network share one rate.
pub fn rate_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => Ipv4Addr::from(u32::from(v4) & !0xff).into(),
        IpAddr::V6(v6) => Ipv6Addr::from(u128::from(v6) & !((1u128 << 72) - 1)).into(),
    }
}

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
            // A name outside the zones; zone transfers and other classes are
            // refused whatever the name, and count as requests only.
            if reply.refused == Some(dns::Refusal::Outside) {
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
                if reply_loop_port(m.addr.port()) {
                    counters.add_in(q.len() as u64);
                    counters.error(ErrorKind::BadDnsQuery);
                    continue;
                }
                let reply = match limit(rate_key(m.addr.ip())) {
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

/// The TCP connections of one listener, for choosing which one a new
/// connection may take the place of when all are open [pure]: each has a
/// last-activity stamp (a counter, no clock) and is idle (waiting for its
/// next query or reading it: stamped when its last reply went out, or when
/// it opened) or busy (answering a complete query, writing the reply).
/// `C` is what closes a connection (the driver's [`Notify`]).
struct Slots<C> {
    cap: usize,
    /// Stamps of activity: the last one given, and the last id.
    clock: u64,
    next_id: u64,
    open: HashMap<u64, Slot<C>>,
}

struct Slot<C> {
    last: u64,
    busy: bool,
    close: C,
}

impl<C> Slots<C> {
    fn new(cap: usize) -> Slots<C> {
        Slots {
            cap,
            clock: 0,
            next_id: 0,
            open: HashMap::new(),
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// A slot for a new connection (idle, the newest): its id, and the
    /// closer of the connection idle longest when it had to make room (that
    /// one is forgotten here). `None` when all `cap` are open and busy.
    fn open(&mut self, close: C) -> Option<(u64, Option<C>)> {
        let mut evicted = None;
        if self.open.len() >= self.cap {
            let oldest = self
                .open
                .iter()
                .filter(|(_, s)| !s.busy)
                .min_by_key(|(_, s)| s.last)
                .map(|(id, _)| *id)?;
            evicted = self.open.remove(&oldest).map(|s| s.close);
        }
        self.next_id += 1;
        let id = self.next_id;
        let last = self.tick();
        self.open.insert(
            id,
            Slot {
                last,
                busy: false,
                close,
            },
        );
        Some((id, evicted))
    }

    /// Marks `id` busy or idle again, as of now; false if it was closed to
    /// make room (the connection must end).
    fn set_busy(&mut self, id: u64, busy: bool) -> bool {
        let now = self.tick();
        match self.open.get_mut(&id) {
            Some(s) => {
                s.busy = busy;
                s.last = now;
                true
            }
            None => false,
        }
    }

    /// Forgets `id` (its connection ended).
    fn close(&mut self, id: u64) {
        self.open.remove(&id);
    }
}

/// One connection's place in its listener's [`Slots`], given back when
/// dropped.
struct TcpSlot {
    slots: Arc<Mutex<Slots<Arc<Notify>>>>,
    id: u64,
    /// Notified when the listener closes this connection for a new one.
    evicted: Arc<Notify>,
}

impl TcpSlot {
    /// A slot for a new connection, closing the one idle longest if all are
    /// taken; `None` if all are busy.
    fn take(slots: &Arc<Mutex<Slots<Arc<Notify>>>>) -> Option<TcpSlot> {
        let evicted = Arc::new(Notify::new());
        let (id, old) = slots.lock().open(evicted.clone())?;
        if let Some(old) = old {
            // A stored permit: the connection ends even if it is not
            // waiting on it yet.
            old.notify_one();
        }
        Some(TcpSlot {
            slots: slots.clone(),
            id,
            evicted,
        })
    }

    /// Marks the connection busy (answering a complete query) or idle;
    /// false if it has been closed for a new one.
    fn set_busy(&self, busy: bool) -> bool {
        self.slots.lock().set_busy(self.id, busy)
    }
}

impl Drop for TcpSlot {
    fn drop(&mut self) {
        self.slots.lock().close(self.id);
    }
}

/// Answers queries on a TCP DNS listener until `stop`.
pub async fn tcp_loop(
    l: TcpListener,
    lookup: DnsLookup,
    counters: Arc<Counters>,
    stop: watch::Receiver<bool>,
) {
    tcp_loop_within(l, lookup, counters, stop, MAX_TCP_CONNECTIONS).await;
}

/// [`tcp_loop`] with at most `cap` connections open.
async fn tcp_loop_within(
    l: TcpListener,
    lookup: DnsLookup,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
    cap: usize,
) {
    let slots = Arc::new(Mutex::new(Slots::new(cap)));
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
        let Some(slot) = TcpSlot::take(&slots) else {
            counters.error(ErrorKind::OverCapacity);
            debug!(client = %peer, "DNS over TCP refused: every connection is busy");
            continue;
        };
        counters.connection();
        let (lookup, counters, stop) = (lookup.clone(), counters.clone(), stop.clone());
        tokio::spawn(async move {
            let _source = source;
            match tokio::time::timeout(
                TCP_LIFETIME,
                serve_tcp(sock, &slot, &lookup, &counters, stop),
            )
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(client = %peer, error = %e, "DNS over TCP ended"),
                Err(_) => debug!(client = %peer, "DNS over TCP closed after its lifetime"),
            }
        });
    }
}

/// Serves one TCP connection. It is busy, and never closed for a new
/// connection, only from the moment a query is read whole until its reply
/// is written: waiting for a query or part-way through one, it may be.
async fn serve_tcp(
    mut sock: TcpStream,
    slot: &TcpSlot,
    lookup: &DnsLookup,
    counters: &Counters,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut msg = Vec::new();
    for i in 0..MAX_TCP_QUERIES {
        let wait = if i == 0 { TCP_FIRST_QUERY } else { TCP_IDLE };
        let by = tokio::time::Instant::now() + wait;
        let read = async {
            let len = sock.read_u16().await?;
            msg.resize(usize::from(len), 0);
            sock.read_exact(&mut msg).await?;
            Ok::<_, std::io::Error>(())
        };
        tokio::select! {
            r = tokio::time::timeout_at(by, read) => match r {
                Ok(r) => r?,
                Err(_) => return Ok(()),
            },
            _ = slot.evicted.notified() => {
                debug!("DNS over TCP closed for a new connection");
                return Ok(());
            }
            _ = stop.changed() => return Ok(()),
        }
        if !slot.set_busy(true) {
            return Ok(());
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
        if !slot.set_busy(false) {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
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

    #[test]
    fn full_slots_make_room_by_closing_the_connection_idle_longest() {
        let mut s = Slots::new(3);
        let (a, none) = s.open("a").unwrap();
        assert!(none.is_none());
        let (b, _) = s.open("b").unwrap();
        let (c, _) = s.open("c").unwrap();
        // `a` answers a query: busy, so `b` is the one idle longest.
        assert!(s.set_busy(a, true));
        let (d, evicted) = s.open("d").unwrap();
        assert_eq!(evicted, Some("b"));
        assert!(!s.set_busy(b, true), "an evicted connection must end");
        // `c` answered a query since: `d`, opened before that, goes next.
        assert!(s.set_busy(c, true) && s.set_busy(c, false));
        let (_, evicted) = s.open("e").unwrap();
        assert_eq!(evicted, Some("d"));
        assert!(!s.set_busy(d, false));
        // All busy: no room.
        let ids: Vec<u64> = s.open.keys().copied().collect();
        for id in ids {
            assert!(s.set_busy(id, true));
        }
        assert!(s.open("f").is_none());
        assert_eq!(s.open.len(), 3);
        // A connection that ends gives its slot back.
        s.close(a);
        assert_eq!(s.open("g").unwrap().1, None);
        // No slots at all: nothing is admitted.
        assert!(Slots::new(0).open(()).is_none());
    }

    /// A TCP listener with `cap` connections at most; its address and
    /// counters.
    async fn tcp_listener(cap: usize) -> (SocketAddr, Arc<Counters>, watch::Sender<bool>) {
        tcp_listener_with(cap, Arc::new(|_| dns::Lookup::Outside)).await
    }

    /// [`tcp_listener`] asking `lookup`.
    async fn tcp_listener_with(
        cap: usize,
        lookup: DnsLookup,
    ) -> (SocketAddr, Arc<Counters>, watch::Sender<bool>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        let counters = Arc::new(Counters::default());
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(tcp_loop_within(l, lookup, counters.clone(), stop_rx, cap));
        (at, counters, stop)
    }

    #[tokio::test]
    async fn silent_connections_cannot_lock_out_a_new_client() {
        let (at, counters, _stop) = tcp_listener(4).await;
        // A client connected first, and every other slot held by silent
        // connections of several clients.
        let mut active = connect("127.0.0.10", at).await;
        let mut silent = Vec::new();
        for i in 11..14 {
            silent.push(connect(&format!("127.0.0.{i}"), at).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The first client asks: the silent ones are idle longer now.
        assert!(ask(&mut active).await);
        // A new client is answered: the silent connection idle longest
        // made room.
        let mut newcomer = connect("127.0.0.20", at).await;
        assert!(ask(&mut newcomer).await, "the new client was not answered");
        assert!(closed(&mut silent[0]).await < Duration::from_secs(2));
        assert_eq!(counters.errors_of(ErrorKind::OverCapacity), 0);
        // The other silent ones are still open (one more newcomer closes
        // the next in line, not the first client nor the newcomer).
        let mut second = connect("127.0.0.21", at).await;
        assert!(ask(&mut second).await);
        assert!(closed(&mut silent[1]).await < Duration::from_secs(2));
        assert!(ask(&mut active).await);
        assert!(ask(&mut newcomer).await);
    }

    #[tokio::test]
    async fn connections_stalled_in_a_query_cannot_lock_out_a_new_client() {
        let (at, counters, _stop) = tcp_listener(2).await;
        // Both slots held by clients that sent the first byte of a query
        // (of its length), or ten, and stall.
        let mut stalled = Vec::new();
        for (i, sent) in [(11, 1), (12, 10)] {
            let mut s = connect(&format!("127.0.0.{i}"), at).await;
            s.write_all(&QUERY[..sent]).await.unwrap();
            stalled.push((s, Instant::now()));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A new client is answered: the one stalled longest made room.
        let mut newcomer = connect("127.0.0.20", at).await;
        assert!(ask(&mut newcomer).await, "the new client was not answered");
        assert!(closed(&mut stalled[0].0).await < Duration::from_secs(2));
        assert_eq!(counters.errors_of(ErrorKind::OverCapacity), 0);
        // The other one is closed by its query's deadline, counted from
        // when it connected.
        let (s, connected) = &mut stalled[1];
        closed(s).await;
        let waited = connected.elapsed();
        assert!(
            waited >= TCP_FIRST_QUERY - Duration::from_millis(500)
                && waited < TCP_FIRST_QUERY + Duration::from_secs(2),
            "{waited:?}"
        );
        assert!(ask(&mut newcomer).await);
    }

    /// A lookup that holds every query (up to 5 s) until the gate opens,
    /// counting those it holds. (It blocks its thread, handing the
    /// runtime's other tasks to another first.)
    fn gated(gate: &Arc<(std::sync::Mutex<bool>, std::sync::Condvar, AtomicUsize)>) -> DnsLookup {
        let gate = gate.clone();
        Arc::new(move |_| {
            let (open, cv, held) = &*gate;
            held.fetch_add(1, Ordering::SeqCst);
            tokio::task::block_in_place(|| {
                let open = open.lock().unwrap();
                drop(cv.wait_timeout_while(open, Duration::from_secs(5), |o| !*o));
            });
            dns::Lookup::Outside
        })
    }

    // (The held queries block two threads of the runtime.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn busy_connections_are_not_closed_for_a_newcomer() {
        let gate = Arc::new((
            std::sync::Mutex::new(false),
            std::sync::Condvar::new(),
            AtomicUsize::new(0),
        ));
        let (at, counters, _stop) = tcp_listener_with(2, gated(&gate)).await;
        // Both slots held by connections whose query is being answered.
        let mut held = Vec::new();
        for i in 11..13 {
            let mut s = connect(&format!("127.0.0.{i}"), at).await;
            s.write_all(QUERY).await.unwrap();
            held.push(s);
        }
        for _ in 0..200 {
            if gate.2.load(Ordering::SeqCst) == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(gate.2.load(Ordering::SeqCst), 2, "queries held");
        let mut refused = connect("127.0.0.20", at).await;
        assert!(closed(&mut refused).await < Duration::from_secs(2));
        assert_eq!(counters.errors_of(ErrorKind::OverCapacity), 1);
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        for s in &mut held {
            assert_eq!(s.read_u16().await.unwrap() as usize, QUERY.len() - 2);
        }
    }

    #[test]
    fn no_replies_to_the_ports_of_services_that_answer_anything() {
        for port in [0, 7, 13, 17, 19, 37, 11211] {
            assert!(reply_loop_port(port), "{port}");
        }
        for port in [53, 1024, 5353, 33_000, 65_535] {
            assert!(!reply_loop_port(port), "{port}");
        }
    }

    /// A query from (privileged) port 19 is dropped and counted; one from
    /// an ordinary port answered. Skipped where port 19 cannot be bound.
    #[tokio::test]
    async fn udp_query_from_chargen_port_is_dropped() {
        let Ok(chargen) = tokio::net::UdpSocket::bind("127.0.0.1:19").await else {
            return;
        };
        let sock = crate::proxy::io::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let sock = Arc::new(UdpListener::new(sock).unwrap());
        let at = sock.local_addr().unwrap();
        let lookup: DnsLookup = Arc::new(|_| dns::Lookup::Outside);
        let limit: DnsLimit = Arc::new(|_| Rate::Within);
        let counters = Arc::new(Counters::default());
        let (_stop, stop_rx) = watch::channel(false);
        tokio::spawn(udp_loop(sock, lookup, limit, counters.clone(), stop_rx));
        let mut buf = [0u8; 512];
        chargen.send_to(&QUERY[2..], at).await.unwrap();
        let r = tokio::time::timeout(Duration::from_millis(300), chargen.recv(&mut buf)).await;
        assert!(r.is_err(), "a reply to port 19");
        assert_eq!(counters.errors_of(ErrorKind::BadDnsQuery), 1);
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(&QUERY[2..], at).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(buf[..2], QUERY[2..4]);
        assert!(n >= 12);
    }

    #[test]
    fn udp_rate_is_kept_per_ipv4_24_and_ipv6_56() {
        let k = |s: &str| rate_key(s.parse().unwrap());
        assert_eq!(k("192.0.2.7"), k("192.0.2.250"));
        assert_eq!(k("192.0.2.7"), "192.0.2.0".parse::<IpAddr>().unwrap());
        assert_ne!(k("192.0.2.7"), k("192.0.3.7"));
        assert_eq!(k("::ffff:192.0.2.7"), k("192.0.2.9"));
        assert_eq!(k("2001:db8:0:12ff:1::1"), k("2001:db8:0:1200::9"));
        assert_eq!(
            k("2001:db8:0:12ab::1"),
            "2001:db8:0:1200::".parse::<IpAddr>().unwrap()
        );
        assert_ne!(k("2001:db8:0:1200::1"), k("2001:db8:0:1300::1"));
    }

    /// A query in the wire format, of `qtype` for `x.test` (class IN).
    fn wire(qtype: u16, class: u16) -> Vec<u8> {
        let mut q = QUERY[2..].to_vec();
        let n = q.len();
        q[n - 4..n - 2].copy_from_slice(&qtype.to_be_bytes());
        q[n - 2..].copy_from_slice(&class.to_be_bytes());
        q
    }

    #[test]
    fn only_names_outside_the_zones_count_as_unknown_host() {
        let lookup: DnsLookup = Arc::new(|name| {
            if name == "x.test" {
                dns::Lookup::Name {
                    zone: "test".into(),
                    records: dns::Records::default(),
                }
            } else {
                dns::Lookup::Outside
            }
        });
        let counters = Counters::default();
        // AXFR (252) and IXFR (251) of a name in the zone, a CH class query:
        // refused, but not unknown names.
        for q in [wire(252, 1), wire(251, 1), wire(16, 3)] {
            let reply = answer(&lookup, &counters, &q, false).unwrap();
            assert_eq!(reply[3] & 0x0f, 5, "REFUSED");
        }
        assert_eq!(counters.errors_of(ErrorKind::UnknownHost), 0);
        let outside: DnsLookup = Arc::new(|_| dns::Lookup::Outside);
        let reply = answer(&outside, &counters, &wire(1, 1), true).unwrap();
        assert_eq!(reply[3] & 0x0f, 5);
        assert_eq!(counters.errors_of(ErrorKind::UnknownHost), 1);
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
