//! I/O helpers for the proxy drivers: dual-stack listener binding, a stream that
//! replays bytes already read (the peeked ClientHello), and a counted splice with
//! an idle timeout.

use crate::proxy::bandwidth::Pacer;
use crate::proxy::stall::SendQueue;
use crate::proxy::stats::Counters;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UdpSocket};
use tokio::time::Instant;

fn socket_for(addr: SocketAddr, ty: socket2::Type) -> io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
    if addr.is_ipv6() {
        // `0.0.0.0:80` and `[::]:80` are two listeners, as the config says.
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Binds a TCP listener (SO_REUSEADDR, IPV6_V6ONLY on IPv6).
pub fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = socket_for(addr, socket2::Type::STREAM)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// Whether `addr` could be bound as [`bind_tcp`] or [`bind_udp`] would:
/// a socket bound and let go at once (no runtime needed).
pub fn try_bind(addr: SocketAddr, udp: bool) -> io::Result<()> {
    let ty = if udp {
        socket2::Type::DGRAM
    } else {
        socket2::Type::STREAM
    };
    let s = socket_for(addr, ty)?;
    if !udp {
        s.set_reuse_address(true)?;
    }
    s.bind(&addr.into())
}

/// Binds a UDP socket (IPV6_V6ONLY on IPv6).
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = socket_for(addr, socket2::Type::DGRAM)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// Datagrams received in one call at most (each buffer holds a GRO train).
pub const UDP_BATCH: usize = 4;

/// A UDP forward's public socket. It learns the address each datagram was
/// sent to (`IP_PKTINFO`/`IPV6_RECVPKTINFO`, through quinn-udp), so that on a
/// wildcard listener of a hub with several public addresses a reply leaves
/// from the address the client sent to (a client drops replies from any
/// other), and PROXY headers can name it. Receives are batched (`recvmmsg`,
/// UDP GRO: a buffer may hold several datagrams of `stride` bytes each).
pub struct UdpListener {
    sock: UdpSocket,
    state: quinn_udp::UdpSocketState,
}

impl UdpListener {
    /// Wraps a bound socket.
    pub fn new(sock: UdpSocket) -> io::Result<UdpListener> {
        let state = quinn_udp::UdpSocketState::new((&sock).into())?;
        let v6 = sock.local_addr()?.is_ipv6();
        // A UDP forward carries whatever its clients and backends send (a
        // 4 KiB DNS answer, say): the kernel may fragment it again.
        crate::sockopt::allow_fragments(&sock, v6)?;
        Ok(UdpListener { sock, state })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Receives a batch: returns how many of `meta` were filled.
    pub async fn recv(
        &self,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [quinn_udp::RecvMeta],
    ) -> io::Result<usize> {
        self.sock
            .async_io(tokio::io::Interest::READABLE, || {
                self.state.recv((&self.sock).into(), bufs, meta)
            })
            .await
    }

    /// Sends `data` to `to`, from `from` when given (the address the client
    /// sent to).
    pub async fn send(&self, to: SocketAddr, from: Option<IpAddr>, data: &[u8]) -> io::Result<()> {
        let t = quinn_udp::Transmit {
            destination: to,
            ecn: None,
            contents: data,
            segment_size: None,
            src_ip: from,
        };
        self.sock
            .async_io(tokio::io::Interest::WRITABLE, || {
                self.state.try_send((&self.sock).into(), &t)
            })
            .await
    }
}

/// A stream that first yields `prefix`, then reads from `inner`.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// `prefix` is returned by reads before anything from `inner`.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(rest) = this.prefix.get(this.pos..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.remaining());
            if let Some(chunk) = rest.get(..n) {
                buf.put_slice(chunk);
            }
            this.pos += n;
            if this.pos >= this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Last-activity clock shared by both sides of a splice.
#[derive(Clone)]
pub struct Activity {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    /// Now is the last activity.
    pub fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }
    /// Marks activity now.
    pub fn touch(&self) {
        self.touch_until(Duration::ZERO);
    }
    /// Marks activity until `ahead` from now (a stream that waits for its
    /// route's `bandwidth` is not idle).
    pub fn touch_until(&self, ahead: Duration) {
        let ms = u64::try_from((self.start.elapsed() + ahead).as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Relaxed);
    }
    /// Time from the start to the last activity.
    pub fn active_for(&self) -> Duration {
        Duration::from_millis(self.last_ms.load(Relaxed))
    }
    /// When the last activity was (no clock read).
    pub fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Relaxed))
    }
    /// Time since the last activity.
    pub fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// Makes room for one more flow in `flows`: at `max` or more, the flows idle
/// longest (by `activity`) are dropped, a sixteenth of `max` at once (at
/// least one, and enough to get under `max`), so that a spray of new flows
/// at a full table costs one scan per sixteenth of the table, not one each.
pub fn make_room<K, V>(
    flows: &mut std::collections::HashMap<K, V>,
    max: usize,
    activity: impl Fn(&V) -> &Activity,
) where
    K: Copy + Eq + std::hash::Hash,
{
    if flows.len() < max {
        return;
    }
    let n = (flows.len() + 1 - max).max(max / 16).max(1);
    let mut ages: Vec<(Instant, K)> = flows
        .iter()
        .map(|(k, f)| (activity(f).last(), *k))
        .collect();
    if n < ages.len() {
        ages.select_nth_unstable_by_key(n - 1, |(t, _)| *t);
        ages.truncate(n);
    }
    for (_, k) in ages {
        flows.remove(&k);
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// What a flow table's eviction order ([`FlowOrder`]) reads of a flow.
#[derive(Clone, Copy, Debug)]
pub struct Standing {
    /// The flow's number from [`FlowOrder::next_id`] (a later flow of the
    /// same key has another).
    pub id: u64,
    /// The flow is confirmed: its client sent again after its backend
    /// answered (a sender of forged source addresses never sees the
    /// answers: one datagram per address never confirms a flow).
    pub confirmed: bool,
    /// The client's last datagram.
    pub last: Instant,
}

/// A flow's place in a [`FlowOrder`] queue, and its last activity then.
#[derive(Clone, Copy)]
struct Queued<K> {
    key: K,
    id: u64,
    last: Instant,
}

/// The order in which a full flow table lets flows go to make room for a
/// new one: first flows not confirmed (see [`Standing::confirmed`]; a spray
/// of datagrams from forged sources starts only such flows), and a confirmed
/// flow only when none is left, as conntrack spares its "assured"
/// connections. Each class is a queue in the order the flows came (for a
/// confirmed flow: when it was found confirmed), and a queue's first flow
/// whose client sent since it was queued goes to the back instead of going
/// (a second chance, as the CLOCK cache algorithm gives): the flow that goes
/// is about the least recently active of its class. Amortized, a new flow
/// costs constant work (the table is never scanned), and exactly as many
/// flows go as the table must lose.
pub struct FlowOrder<K> {
    /// Flows not confirmed (or not yet seen to be), and entries of flows
    /// already gone (dropped as met).
    fresh: std::collections::VecDeque<Queued<K>>,
    /// Flows found confirmed.
    confirmed: std::collections::VecDeque<Queued<K>>,
    ids: u64,
}

impl<K> Default for FlowOrder<K> {
    fn default() -> Self {
        FlowOrder {
            fresh: Default::default(),
            confirmed: Default::default(),
            ids: 0,
        }
    }
}

impl<K: Copy + Eq + std::hash::Hash> FlowOrder<K> {
    /// A number for a new flow (its [`Standing::id`]).
    pub fn next_id(&mut self) -> u64 {
        self.ids += 1;
        self.ids
    }

    /// Inserts `flow` into `flows` under `key` (a key not there; every flow
    /// of `flows` comes in through here), once flows have gone (in this
    /// order) until fewer than `max` are left.
    pub fn insert<V>(
        &mut self,
        flows: &mut std::collections::HashMap<K, V>,
        max: usize,
        key: K,
        flow: V,
        standing: impl Fn(&V) -> Standing,
    ) {
        while flows.len() >= max && self.evict_one(flows, &standing) {}
        let s = standing(&flow);
        flows.insert(key, flow);
        self.fresh.push_back(Queued {
            key,
            id: s.id,
            last: s.last,
        });
        // Entries of flows that went otherwise (idle, ended, replaced) are
        // let go once they outnumber the flows: constant work per flow.
        if self.fresh.len() + self.confirmed.len() > 2 * flows.len() + 64 {
            let live = |q: &Queued<K>| flows.get(&q.key).is_some_and(|f| standing(f).id == q.id);
            self.fresh.retain(live);
            self.confirmed.retain(live);
        }
    }

    /// Removes one flow from `flows`: `false` if none is queued.
    fn evict_one<V>(
        &mut self,
        flows: &mut std::collections::HashMap<K, V>,
        standing: &impl Fn(&V) -> Standing,
    ) -> bool {
        self.evict_unconfirmed(flows, standing) || self.evict_confirmed(flows, standing)
    }

    /// Removes one flow whose client never came back after its backend
    /// answered (quiet longest first): `false` if there is none, every flow
    /// left being confirmed.
    pub fn evict_unconfirmed<V>(
        &mut self,
        flows: &mut std::collections::HashMap<K, V>,
        standing: &impl Fn(&V) -> Standing,
    ) -> bool {
        // A flow queued again has its last activity as its mark: met again
        // in this pass, it goes. One found confirmed keeps its mark (its
        // activity since counts in the other queue).
        while let Some(q) = self.fresh.pop_front() {
            let Some(s) = flows.get(&q.key).map(standing).filter(|s| s.id == q.id) else {
                continue;
            };
            if s.confirmed {
                self.confirmed.push_back(q);
            } else if s.last > q.last {
                self.fresh.push_back(Queued { last: s.last, ..q });
            } else {
                flows.remove(&q.key);
                return true;
            }
        }
        false
    }

    fn evict_confirmed<V>(
        &mut self,
        flows: &mut std::collections::HashMap<K, V>,
        standing: &impl Fn(&V) -> Standing,
    ) -> bool {
        while let Some(q) = self.confirmed.pop_front() {
            let Some(s) = flows.get(&q.key).map(standing).filter(|s| s.id == q.id) else {
                continue;
            };
            if s.last > q.last {
                self.confirmed.push_back(Queued { last: s.last, ..q });
            } else {
                flows.remove(&q.key);
                return true;
            }
        }
        false
    }
}

/// Nanoseconds on the proxy's monotonic clock (the bandwidth pacers and
/// rate limiters).
pub(crate) fn mono_ns() -> u64 {
    static T0: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    u64::try_from(T0.get_or_init(std::time::Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A route's or forward's `bandwidth`: a pacer for each direction, shared by
/// all its connections (see [`crate::proxy::bandwidth`]). A reload changes
/// its rate in place, so connections already open follow the new limit; a
/// rate of 0 (the limit removed) lets everything through.
#[derive(Debug)]
pub struct Throttle {
    rate: AtomicU64,
    /// The rate a reload being built wants; applied by [`Throttle::commit`]
    /// once the reload is in place, so that a reload that fails changes
    /// nothing.
    staged: AtomicU64,
    /// Client to backend.
    up: parking_lot::Mutex<Pacer>,
    /// Backend to client.
    down: parking_lot::Mutex<Pacer>,
}

impl Throttle {
    /// Pacers for `rate` bytes per second each way (0: no limit).
    pub fn new(rate: u64) -> Throttle {
        let now = mono_ns();
        Throttle {
            rate: AtomicU64::new(rate),
            staged: AtomicU64::new(rate),
            up: parking_lot::Mutex::new(Pacer::new(rate, now)),
            down: parking_lot::Mutex::new(Pacer::new(rate, now)),
        }
    }

    /// The rate each way, in bytes per second; 0: no limit (removed by a
    /// reload).
    pub fn rate(&self) -> u64 {
        self.rate.load(Relaxed)
    }

    fn set_rate(&self, rate: u64) {
        if self.rate.swap(rate, Relaxed) != rate && rate > 0 {
            let now = mono_ns();
            self.up.lock().set_rate(rate, now);
            self.down.lock().set_rate(rate, now);
        }
    }

    fn pacer(&self, up: bool) -> &parking_lot::Mutex<Pacer> {
        if up {
            &self.up
        } else {
            &self.down
        }
    }

    /// A stream passed `n` bytes (`up`: from the client): how long it waits
    /// before passing more.
    pub fn take(&self, up: bool, n: u64) -> Duration {
        if self.rate() == 0 {
            return Duration::ZERO;
        }
        self.pacer(up).lock().take(n, mono_ns())
    }

    /// A datagram of `n` bytes: `false` if it must be dropped.
    pub fn admit(&self, up: bool, n: u64) -> bool {
        self.rate() == 0 || self.pacer(up).lock().admit(n, mono_ns())
    }

    /// The throttle of a route or forward after a (re)load: the old one,
    /// to be set to the new rate (0: no limit) by [`Throttle::commit`] once
    /// the reload is in place, so that its open connections and UDP flows
    /// follow; a new one for a new route. Every route has one, so a limit
    /// added by a reload reaches connections already open.
    pub fn keep_or_new(old: Option<&Arc<Throttle>>, rate: Option<u64>) -> Arc<Throttle> {
        let rate = rate.unwrap_or(0);
        match old {
            Some(t) => {
                t.staged.store(rate, Relaxed);
                t.clone()
            }
            None => Arc::new(Throttle::new(rate)),
        }
    }

    /// Applies the rate the last [`Throttle::keep_or_new`] staged.
    pub fn commit(&self) {
        self.set_rate(self.staged.load(Relaxed));
    }
}

/// A pending pause of a throttled stream.
pub type Pause = Option<Pin<Box<tokio::time::Sleep>>>;

/// Polls `pause` (a throttled stream's wait before its next bytes):
/// `Pending` while it runs.
pub fn poll_pause(pause: &mut Pause, cx: &mut Context<'_>) -> Poll<()> {
    if let Some(p) = pause.as_mut() {
        std::task::ready!(std::future::Future::poll(p.as_mut(), cx));
        *pause = None;
    }
    Poll::Ready(())
}

/// After `n` bytes passed: the pause `throttle` asks for, if any.
pub fn pause_after(throttle: &Throttle, up: bool, n: u64) -> Pause {
    let w = throttle.take(up, n);
    (!w.is_zero()).then(|| Box::pin(tokio::time::sleep(w)))
}

/// Counts bytes read from the client side into `bytes_in` (or `bytes_out` when
/// wrapping the backend side), records activity, and paces reads to the
/// route's `bandwidth`.
pub struct Counted<S> {
    inner: S,
    counters: Arc<Counters>,
    client_side: bool,
    activity: Activity,
    /// Bytes read through this side.
    read: u64,
    throttle: Option<Arc<Throttle>>,
    pause: Pause,
}

impl<S> Counted<S> {
    /// Wraps one side of a splice. `client_side`: reads are client bytes.
    pub fn new(inner: S, counters: Arc<Counters>, client_side: bool, activity: Activity) -> Self {
        Counted {
            inner,
            counters,
            client_side,
            activity,
            read: 0,
            throttle: None,
            pause: None,
        }
    }

    /// Paces this side's reads to `throttle`.
    pub fn throttled(mut self, throttle: Option<Arc<Throttle>>) -> Self {
        self.throttle = throttle;
        self
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        std::task::ready!(poll_pause(&mut self.pause, cx));
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.activity.touch();
            self.read += n;
            if self.client_side {
                self.counters.add_in(n);
            } else {
                self.counters.add_out(n);
            }
            let up = self.client_side;
            let wait = self
                .throttle
                .as_deref()
                .map_or(Duration::ZERO, |t| t.take(up, n));
            if !wait.is_zero() {
                self.activity.touch_until(wait);
                self.pause = Some(Box::pin(tokio::time::sleep(wait)));
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How a splice ended.
#[derive(Debug)]
pub struct Spliced {
    /// Bytes read from the client (towards the backend).
    pub bytes_in: u64,
    /// Bytes read from the backend (towards the client).
    pub bytes_out: u64,
    /// `Ok` when both directions ended; the error (or the idle timeout) otherwise.
    pub result: io::Result<()>,
}

/// Splices `client` and `backend` until both directions end, an error, or
/// `idle` without a byte either way. Bytes are counted as they pass, and
/// paced to `throttle` (the route's `bandwidth`) when there is one. A byte
/// the client acknowledged counts too (`queue`, the client's socket, asked
/// while the splice waits: a slow reader drains a large send buffer for
/// longer than `idle` before its socket takes another write).
pub async fn splice<C, B>(
    client: C,
    backend: B,
    counters: Arc<Counters>,
    idle: Duration,
    throttle: Option<Arc<Throttle>>,
    queue: Option<SendQueue>,
) -> Spliced
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let act = Activity::new();
    let mut c =
        Counted::new(client, counters.clone(), true, act.clone()).throttled(throttle.clone());
    let mut b = Counted::new(backend, counters, false, act.clone()).throttled(throttle);
    let result = {
        let copy = tokio::io::copy_bidirectional(&mut c, &mut b);
        tokio::pin!(copy);
        let tick = (idle / 4).max(Duration::from_millis(100));
        let mut queued = None;
        loop {
            tokio::select! {
                r = &mut copy => break r.map(|_| ()),
                _ = tokio::time::sleep(tick) => {
                    if act.idle() >= tick {
                        // Quiet for a tick: what the client's socket still
                        // holds; less than at the last tick is progress.
                        let now = queue.and_then(SendQueue::bytes);
                        if matches!((queued, now), (Some(a), Some(n)) if n < a) {
                            act.touch();
                        }
                        queued = now;
                    } else {
                        queued = None;
                    }
                    if act.idle() >= idle {
                        break Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"));
                    }
                }
            }
        }
    };
    Spliced {
        bytes_in: c.read,
        bytes_out: b.read,
        result,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A splice of an endless backend to a client that takes 256 KiB every
    /// half `idle` from behind a large send buffer, for five `idle`s: how
    /// it ended, if it did.
    async fn splice_to_slow_reader(with_queue: bool, idle: Duration) -> Option<io::Result<()>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut reader, client) = crate::proxy::stall::slow_reader_pair().await;
        let queue = with_queue.then(|| SendQueue::of(&client));
        let (backend, mut source) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let chunk = [5u8; 16384];
            while source.write_all(&chunk).await.is_ok() {}
        });
        let mut spliced = tokio::spawn(async move {
            let c = Arc::new(Counters::default());
            splice(client, backend, c, idle, None, queue).await.result
        });
        let mut buf = vec![0u8; 256 << 10];
        for _ in 0..10 {
            tokio::select! {
                r = &mut spliced => return Some(r.unwrap()),
                _ = tokio::time::sleep(idle / 2) => {}
            }
            if reader.read_exact(&mut buf).await.is_err() {
                break;
            }
        }
        tokio::time::timeout(Duration::from_millis(10), spliced)
            .await
            .ok()
            .map(Result::unwrap)
    }

    #[tokio::test]
    async fn a_splice_to_a_slow_reader_lives_while_the_client_takes_bytes() {
        let idle = Duration::from_millis(800);
        // Without the socket's queue the splice sees no byte move (the
        // socket takes no write until a third of its buffer drained).
        let ended = splice_to_slow_reader(false, idle).await;
        assert!(
            matches!(&ended, Some(Err(e)) if e.kind() == io::ErrorKind::TimedOut),
            "{ended:?}"
        );
        assert!(splice_to_slow_reader(true, idle).await.is_none());
    }

    #[test]
    fn a_full_flow_table_drops_its_oldest_sixteenth() {
        let start = Instant::now();
        let at = |ms: u64| Activity {
            start,
            last_ms: Arc::new(AtomicU64::new(ms)),
        };
        // Keys in an order the ages do not follow.
        let mut flows: std::collections::HashMap<u32, Activity> = (0..64u32)
            .map(|k| (k, at(u64::from((k * 37) % 64) * 10)))
            .collect();
        make_room(&mut flows, 65, |a| a);
        assert_eq!(flows.len(), 64, "room left: nothing dropped");
        make_room(&mut flows, 64, |a| a);
        assert_eq!(flows.len(), 60, "a sixteenth of 64");
        let oldest_left = flows.values().map(|a| a.last()).min().unwrap();
        assert_eq!(oldest_left, start + Duration::from_millis(40));
        // A small table drops one; a table over its limit (lowered by a
        // reload) gets under it at once.
        let mut small: std::collections::HashMap<u32, Activity> =
            (0..2u32).map(|k| (k, at(u64::from(k)))).collect();
        make_room(&mut small, 2, |a| a);
        assert_eq!(small.keys().copied().collect::<Vec<_>>(), vec![1]);
        make_room(&mut flows, 10, |a| a);
        assert_eq!(flows.len(), 9);
    }

    /// A flow as [`FlowOrder`] sees it.
    #[derive(Clone, Copy)]
    struct F(Standing);

    fn standing(f: &F) -> Standing {
        f.0
    }

    /// Starts flow `k`, its client last seen at `last`, in a table of `max`.
    fn start(
        order: &mut FlowOrder<u32>,
        flows: &mut std::collections::HashMap<u32, F>,
        max: usize,
        k: u32,
        last: Instant,
    ) {
        let id = order.next_id();
        let f = F(Standing {
            id,
            confirmed: false,
            last,
        });
        order.insert(flows, max, k, f, standing);
    }

    fn keys(flows: &std::collections::HashMap<u32, F>) -> Vec<u32> {
        let mut k: Vec<u32> = flows.keys().copied().collect();
        k.sort_unstable();
        k
    }

    #[test]
    fn a_full_flow_table_lets_unconfirmed_flows_go_first() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut order = FlowOrder::default();
        let mut flows = std::collections::HashMap::new();
        for k in 1..=4 {
            start(&mut order, &mut flows, 4, k, at(k.into()));
        }
        // 1 and 2 confirmed (1 active since), 3 active but not confirmed.
        let touch = |flows: &mut std::collections::HashMap<u32, F>, k, confirmed, ms| {
            let f = flows.get_mut(&k).unwrap();
            f.0.confirmed |= confirmed;
            f.0.last = at(ms);
        };
        touch(&mut flows, 1, true, 10);
        touch(&mut flows, 2, true, 2);
        touch(&mut flows, 3, false, 11);
        start(&mut order, &mut flows, 4, 5, at(12));
        assert_eq!(keys(&flows), [1, 2, 3, 5], "4, idle and unconfirmed");
        start(&mut order, &mut flows, 4, 6, at(13));
        assert_eq!(keys(&flows), [1, 2, 5, 6], "3, idle since 11");
        // A spray of new flows only ever takes the place of its own kind.
        for k in 7..40 {
            start(&mut order, &mut flows, 4, k, at(k.into()));
        }
        assert_eq!(keys(&flows), [1, 2, 38, 39]);
        // No unconfirmed flow left: the confirmed one idle longest goes (2;
        // 1 was active after it came).
        touch(&mut flows, 38, true, 50);
        touch(&mut flows, 39, true, 51);
        start(&mut order, &mut flows, 4, 40, at(52));
        assert_eq!(keys(&flows), [1, 38, 39, 40]);
        start(&mut order, &mut flows, 4, 41, at(53));
        assert_eq!(keys(&flows), [1, 38, 39, 41], "the new unconfirmed one");
        // A table over a lowered limit gets under it at once, confirmed
        // flows least recently active first.
        start(&mut order, &mut flows, 2, 42, at(54));
        assert_eq!(keys(&flows), [39, 42]);
    }

    #[test]
    fn a_flow_order_skips_and_forgets_flows_gone_otherwise() {
        let t0 = Instant::now();
        let mut order = FlowOrder::default();
        let mut flows = std::collections::HashMap::new();
        start(&mut order, &mut flows, 2, 1, t0);
        start(&mut order, &mut flows, 2, 2, t0);
        // 1 ends and comes back: its old entry does not stand for the new
        // flow, which is the newest.
        flows.remove(&1);
        start(&mut order, &mut flows, 2, 1, t0);
        start(&mut order, &mut flows, 2, 3, t0);
        assert_eq!(keys(&flows), [1, 3]);
        // Flows that end by themselves (idle) leave no growing queue.
        for k in 10..10_000 {
            start(&mut order, &mut flows, 100, k, t0);
            flows.remove(&k);
        }
        // (at most as many as the last flow's insert left)
        let queued = order.fresh.len() + order.confirmed.len();
        assert!(queued <= 2 * (flows.len() + 1) + 64, "{queued}");
        start(&mut order, &mut flows, 3, 4, t0);
        start(&mut order, &mut flows, 3, 5, t0);
        assert_eq!(keys(&flows), [3, 4, 5]);
    }

    #[test]
    fn a_reload_changes_the_rate_of_the_same_throttle() {
        // No limit: one throttle all the same, which lets everything by.
        let t = Throttle::keep_or_new(None, None);
        assert_eq!(t.rate(), 0);
        assert_eq!(t.take(true, 10_000_000), Duration::ZERO);
        assert!(t.admit(false, 60_000));
        // A limit added by a reload reaches whoever holds it.
        let held = t.clone();
        let t2 = Throttle::keep_or_new(Some(&t), Some(1_000));
        assert!(Arc::ptr_eq(&t2, &held));
        // Not before the reload is in place (one that fails changes nothing).
        assert_eq!(held.rate(), 0);
        t2.commit();
        assert_eq!(held.rate(), 1_000);
        assert_eq!(held.take(true, 16_384), Duration::ZERO);
        // (less what refilled since, on the real clock)
        let w = held.take(true, 1_000).as_millis();
        assert!((900..=1_000).contains(&w), "{w}");
        // The other direction has its own bucket.
        assert_eq!(held.take(false, 1_000), Duration::ZERO);
        // Removed again: no waits.
        Throttle::keep_or_new(Some(&t2), None).commit();
        assert_eq!(held.rate(), 0);
        assert_eq!(held.take(true, 1_000_000), Duration::ZERO);
    }
}
