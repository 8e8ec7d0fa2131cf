//! WireGuard over TLS, for nodes whose network lets no UDP out: the node
//! opens a TLS connection to the hub's HTTPS port offering ALPN
//! [`ALPN`], and both ends carry their WireGuard datagrams on it, framed by
//! [`frame`]. The hub's :443 listener tells these connections from web
//! clients by that ALPN (before any SNI routing), so one public port serves
//! both.
//!
//! Neither WireGuard device knows: each end relays between the stream and a
//! UDP socket on loopback connected to its own device's port, so the device
//! sees its peer at that socket's address (its endpoint roams there and back
//! like any other). WireGuard inside authenticates and encrypts end to end as
//! over UDP; the TLS layer is only a carrier through firewalls that pass
//! HTTPS, so the node accepts the hub's (self-signed) certificate as it is.
//! A `wss://` WebSocket carrier checks its server's certificate
//! ([`WsTrust`]): its URL's query may hold an intermediary's access token.
//!
//! [`path`] decides when a node uses it; this module holds the drivers.

pub mod connect;
pub mod frame;
pub mod path;
pub mod peers;
pub mod pool;
pub mod ws;

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use serde::Serialize;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tracing::{debug, info};

/// The ALPN protocol name a node offers for a carried tunnel.
pub const ALPN: &[u8] = b"gatewire-wg";
/// A stream on which its end's device sent no session datagram
/// ([`carries_session`]) for this long is closed. Only what the device sends
/// counts: a stranger chooses what comes from the stream (junk frames,
/// pings, the bytes of an unfinished frame), not what the device answers.
/// A live tunnel has some well within it. From a hub: its keepalive (`[hub]
/// keepalive`, every 4 s by default), a passive keepalive within 10 s of a
/// node's data, and at the latest a new session's handshake response or
/// confirming keepalive when the old one is rekeyed (120 s) or expires
/// (180 s; a node that sends only keepalives handshakes again at its next
/// one). From a node: its persistent keepalive. 300 s leaves room for that
/// and a few handshake retries (5 s apart).
pub const IDLE: Duration = Duration::from_secs(300);
/// A hub closes a stream that has not carried a datagram from the stream
/// and a session datagram ([`carries_session`]) from the device this long
/// after its TLS handshake: a node's handshake initiation is answered at
/// once with a response, while the WireGuard device answers no stranger so,
/// whatever it sends (at most with a cookie reply, under load, which does not
/// count).
pub const FIRST: Duration = Duration::from_secs(15);
/// Most proven carried tunnels (ones that carried a session,
/// [`carries_session`]) a hub holds at once, over TLS and WebSocket
/// together; a stream that proves itself when they are all taken is closed
/// (counted as failed). Each holds a task, a loopback socket and its
/// buffers for as long as it lives, which a WebSocket one does after its
/// HTTP connection has ended. (Neither holds a slot of the proxy's
/// `max_connections` once the carrier has it.) Streams not yet proven
/// live apart, within [`MAX_UNPROVEN`], so strangers cannot take these.
pub const MAX_CARRIED: usize = 8192;
/// Proven carried tunnels open at once from one client address (an IPv6
/// client's /64): a few hundred nodes behind one NAT fit.
pub const MAX_CARRIED_PER_SOURCE: usize = 256;
/// Carried tunnels at once that serve one WireGuard peer (whose endpoint
/// an authenticated datagram through them moved there, [`peers`]): the one
/// its endpoint is at, and the one it left while reconnecting, until the
/// hub sees that end. When the peer's endpoint moves to one more, the one
/// it moved to least recently is closed (counted as superseded), so one
/// node's keys hold no more of [`MAX_CARRIED`] than that, from however
/// many addresses.
pub const MAX_CARRIED_PER_PEER: usize = 2;
/// Most carried streams a hub holds at once that have not yet carried a
/// session (from their TLS handshake, or WebSocket upgrade, to the
/// device's first session datagram through them; at most [`FIRST`]). When
/// they are all taken, the oldest is closed to make room (counted as
/// evicted): a real node proves itself within one round trip of its
/// stream opening (its device starts a handshake at once, which the hub's
/// answers), so whoever holds the pool with idle streams has to open new
/// ones faster than that, hundreds a second and each a TLS handshake, to
/// shut anyone out; holding them costs nothing. 512 lets that many nodes
/// come back at once (after the hub restarts, say) with no eviction, and
/// their handshakes, answered in a round trip, empty it again at once.
pub const MAX_UNPROVEN: usize = 512;
/// Unproven streams at once from one client address (an IPv6 client's
/// /64); beyond, new ones are refused (counted as failed). Nodes behind one
/// NAT that come back together take a round trip each; 16 is room for
/// that, and takes a stranger 32 sources to fill [`MAX_UNPROVEN`] (which
/// then evicts their own oldest streams first).
pub const MAX_UNPROVEN_PER_SOURCE: usize = 16;

/// The limits of a hub's carried tunnels.
const LIMITS: pool::Limits = pool::Limits {
    unproven: MAX_UNPROVEN,
    unproven_per_source: MAX_UNPROVEN_PER_SOURCE,
    proven: MAX_CARRIED,
    proven_per_source: MAX_CARRIED_PER_SOURCE,
};

/// A hub's places of carried tunnels, by client address key
/// ([`crate::per_source::source_key`]), each unproven one holding what
/// stops it when evicted.
type Places = parking_lot::Mutex<pool::Pool<IpAddr, Arc<tokio::sync::Notify>>>;

/// A hub's open relays by loopback address ([`relay_key`]), and the peer
/// (its public key) each serves, each holding what stops it when
/// superseded.
type Serving = parking_lot::Mutex<peers::Relays<SocketAddr, [u8; 32], Arc<tokio::sync::Notify>>>;

/// A relay's address as [`Serving`] knows it (an IPv4-mapped address is
/// its IPv4 one).
fn relay_key(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Tells a hub's carrier where its device moved a peer's endpoint
/// ([`Hub::moves`]).
#[derive(Clone)]
pub struct Moves(Arc<Serving>);

impl std::fmt::Debug for Moves {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("carrier::Moves")
    }
}

impl Moves {
    /// An authenticated datagram moved the endpoint of the peer with public
    /// key `peer` to `to`. When `to` is a relay's, the relay serves that
    /// peer, and the peer's relay it moved to least recently beyond
    /// [`MAX_CARRIED_PER_PEER`] is closed. Called at moves only, never per
    /// datagram.
    pub fn moved(&self, peer: [u8; 32], to: SocketAddr) {
        let to = relay_key(to);
        // Every relay is on loopback: another address needs no look.
        if !to.ip().is_loopback() {
            return;
        }
        let stop = self.0.lock().moved(peer, &to);
        if let Some(s) = stop {
            // Kept for the relay if it is not waiting yet.
            s.notify_one();
        }
    }
}

/// A relay's entry in [`Serving`], forgotten when dropped.
struct ServingEntry<'a> {
    serving: &'a Serving,
    at: SocketAddr,
}

impl<'a> ServingEntry<'a> {
    fn new(serving: &'a Serving, at: SocketAddr, stop: Arc<tokio::sync::Notify>) -> Self {
        let at = relay_key(at);
        serving.lock().open(at, stop);
        ServingEntry { serving, at }
    }
}

impl Drop for ServingEntry<'_> {
    fn drop(&mut self) {
        self.serving.lock().close(&self.at);
    }
}

/// One carried tunnel's place in the hub's [`pool`]: unproven first (one
/// of [`MAX_UNPROVEN`] and of its source's [`MAX_UNPROVEN_PER_SOURCE`]),
/// then, proven, one of [`MAX_CARRIED`] and of its source's
/// [`MAX_CARRIED_PER_SOURCE`]; given back when dropped.
pub struct CarrySlot {
    places: Arc<Places>,
    id: u64,
    /// The client address it counts against (behind a trusted proxy, the
    /// forwarded one): the device counts the tunnel's handshakes as its.
    source: IpAddr,
    /// Notified when the stream is evicted to make room.
    evicted: Arc<tokio::sync::Notify>,
    /// It was evicted before it could prove itself (it had no place left
    /// when it carried a session).
    gone: std::sync::atomic::AtomicBool,
}

impl CarrySlot {
    /// The stream carried a session: moves it to the proven pool, or
    /// `false` when there is no room there, or it was evicted meanwhile
    /// (the stream is to be closed).
    fn prove(&self) -> bool {
        match self.places.lock().promote(self.id) {
            Ok(()) => true,
            Err(pool::Refused::Gone) => {
                self.gone.store(true, Relaxed);
                false
            }
            Err(_) => false,
        }
    }
}

impl Drop for CarrySlot {
    fn drop(&mut self) {
        self.places.lock().release(self.id);
    }
}
/// Most bytes of datagrams gathered into one write to the stream.
const BATCH: usize = 64 * 1024;
/// The largest datagram read from a device: a WireGuard message of a
/// packet up to the largest MTU a device takes (9000) and then some. The
/// relay's socket does not coalesce (no GRO), so each read is one message.
const MAX_MESSAGE: usize = 16 * 1024;
/// What a stream's buffers start at; they grow with bursts.
const START: usize = 4 * 1024;

/// Counters of carried tunnels, at one end.
#[derive(Debug, Default)]
pub struct Counters {
    /// Streams set up (TLS done).
    pub streams: AtomicU64,
    /// Streams open now.
    pub open: AtomicU64,
    /// Connections that offered the ALPN but failed the TLS handshake, or
    /// (on a node) attempts that did not connect.
    pub failed: AtomicU64,
    /// Streams closed for a broken frame.
    pub bad_frames: AtomicU64,
    /// Unproven streams closed to make room for a new one
    /// ([`MAX_UNPROVEN`]).
    pub evicted: AtomicU64,
    /// Streams closed because the peer they served moved on to newer ones
    /// ([`MAX_CARRIED_PER_PEER`]).
    pub superseded: AtomicU64,
    /// Datagram bytes received from the stream and sent to the stream.
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct CountersSnapshot {
    pub streams: u64,
    pub open: u64,
    pub failed: u64,
    pub bad_frames: u64,
    #[serde(default)]
    pub evicted: u64,
    #[serde(default)]
    pub superseded: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Counters {
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            streams: self.streams.load(Relaxed),
            open: self.open.load(Relaxed),
            failed: self.failed.load(Relaxed),
            bad_frames: self.bad_frames.load(Relaxed),
            evicted: self.evicted.load(Relaxed),
            superseded: self.superseded.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
        }
    }
}

/// Counts one open stream while alive.
struct OpenGuard<'a>(&'a Counters);

impl<'a> OpenGuard<'a> {
    fn new(c: &'a Counters) -> Self {
        c.streams.fetch_add(1, Relaxed);
        c.open.fetch_add(1, Relaxed);
        OpenGuard(c)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

/// Whether a datagram from a relay's device shows a WireGuard session with
/// the peer at the stream's far end: a handshake response (message type 2,
/// the answer to an initiation that came through the stream) or transport
/// data (type 4, keepalives included; the device sends it only to a peer's
/// endpoint, which an authenticated datagram put on this relay). Not a
/// cookie reply (type 3): the device sends one under load to whoever sent
/// an initiation with a valid mac1, which takes only its public key. Nor an
/// initiation (type 1): the device sends them to a peer that is gone as
/// well (retrying, and again whenever it has data for it), while a live
/// peer's answer to one brings the session's confirming keepalive (type 4).
/// A message's type is its first byte, the next three zero.
pub fn carries_session(datagram: &[u8]) -> bool {
    matches!(datagram.get(..4), Some([2 | 4, 0, 0, 0]))
}

/// How datagrams are framed on a carried stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// A two-byte length before each ([`frame`]): the TLS carrier.
    Length,
    /// WebSocket binary messages ([`ws`]), as the node sends them (masked).
    WsNode,
    /// WebSocket binary messages, as the hub sends them.
    WsHub,
}

/// Why a relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The stream closed or failed.
    Closed,
    /// A broken frame arrived.
    BadFrame(frame::FrameError),
    /// A broken WebSocket frame arrived.
    BadWsFrame(ws::WsError),
    /// No session datagram from the device for [`IDLE`] (or the given idle
    /// time).
    Idle,
    /// Nothing came from the stream, or no session datagram from the
    /// device, in its first moments.
    Silent,
    /// The loopback socket failed.
    Local(io::ErrorKind),
    /// Its end is stopping.
    Stopped,
    /// Closed unproven to make room for a new stream ([`MAX_UNPROVEN`]).
    Evicted,
    /// Closed because the peer it served moved on to newer streams
    /// ([`MAX_CARRIED_PER_PEER`]).
    Superseded,
    /// It carried a session, but every proven slot ([`MAX_CARRIED`], or
    /// its source's [`MAX_CARRIED_PER_SOURCE`]) was taken.
    Full,
}

/// A UDP socket on loopback connected to `device` (a device's port on
/// loopback): the carried side of a relay.
pub async fn local_socket(device: SocketAddr) -> io::Result<UdpSocket> {
    let any = match device {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0),
    };
    let s = UdpSocket::bind(any).await?;
    s.connect(device).await?;
    Ok(s)
}

/// Relays between `stream` and `udp` (connected) until either ends, the
/// device sends no session datagram ([`carries_session`]) for `idle`, or
/// within `first` of the start nothing came from the stream or no session
/// datagram from the device (a connection that carries no WireGuard session
/// holds no slot long). Every datagram is relayed either way; only what the
/// device sends keeps a stream open. Reading and writing the stream run
/// apart, so a slow stream only holds back its own direction; datagrams the
/// stream cannot take in time wait in the socket's buffer and past that are
/// dropped by the kernel, as on any UDP path (WireGuard and what it carries
/// recover).
pub async fn relay<S>(
    stream: S,
    udp: &UdpSocket,
    idle: Duration,
    first: Duration,
    c: &Counters,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    relay_framed(stream, udp, idle, first, c, Framing::Length).await
}

/// [`relay`] with the given framing.
pub async fn relay_framed<S>(
    stream: S,
    udp: &UdpSocket,
    idle: Duration,
    first: Duration,
    c: &Counters,
    framing: Framing,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    relay_ends(stream, udp, idle, first, c, framing, false, &|| true).await
}

/// [`relay_framed`] on a node's end, where the stream is the node's own
/// connection to its hub: the hub's session datagrams through it keep it
/// open as well as the node device's (a node with no persistent keepalive
/// and no traffic still hears its hub's keepalives).
pub async fn relay_node<S>(
    stream: S,
    udp: &UdpSocket,
    idle: Duration,
    c: &Counters,
    framing: Framing,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    relay_ends(stream, udp, idle, idle, c, framing, true, &|| true).await
}

/// `prove`: asked at the device's first session datagram, before it goes
/// into the stream; `false` ends the relay ([`End::Full`]).
#[allow(clippy::too_many_arguments)]
async fn relay_ends<S>(
    stream: S,
    udp: &UdpSocket,
    idle: Duration,
    first: Duration,
    c: &Counters,
    framing: Framing,
    stream_keeps: bool,
    prove: &(dyn Fn() -> bool + Sync),
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _open = OpenGuard::new(c);
    let start = Instant::now();
    // When the device last sent a session datagram (ms after `start`).
    let last = AtomicU64::new(0);
    // A datagram from the stream, and a session datagram from the device.
    let heard = std::sync::atomic::AtomicBool::new(false);
    let answered = std::sync::atomic::AtomicBool::new(false);
    let touch = || last.store(start.elapsed().as_millis() as u64, Relaxed);
    let (mut rd, mut wr) = tokio::io::split(stream);
    // Pings from the other end (or an intermediary), answered by the
    // writer; a close, answered by the writer before the relay ends.
    let (pong_tx, mut pong_rx) = tokio::sync::mpsc::channel::<Option<bytes::Bytes>>(4);
    let down = async {
        let mut buf = BytesMut::with_capacity(START);
        let mut wsd = ws::Decoder::new(framing == Framing::WsHub);
        loop {
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return End::Closed,
                Ok(_) => {}
            }
            loop {
                let d = match framing {
                    Framing::Length => match frame::decode(&mut buf) {
                        Ok(Some(d)) => d.freeze(),
                        Ok(None) => break,
                        Err(e) => {
                            c.bad_frames.fetch_add(1, Relaxed);
                            return End::BadFrame(e);
                        }
                    },
                    Framing::WsNode | Framing::WsHub => match wsd.decode(&mut buf) {
                        Ok(Some(ws::Msg::Data(d))) => d,
                        Ok(Some(ws::Msg::Ping(p))) => {
                            // A full queue of pongs: this one is not needed.
                            let _ = pong_tx.try_send(Some(p));
                            continue;
                        }
                        Ok(Some(ws::Msg::Close)) => {
                            // The writer answers and ends the relay; if it
                            // cannot within a second, the relay ends anyway.
                            if pong_tx.send(None).await.is_ok() {
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                            return End::Closed;
                        }
                        Ok(None) => break,
                        Err(e) => {
                            c.bad_frames.fetch_add(1, Relaxed);
                            return End::BadWsFrame(e);
                        }
                    },
                };
                heard.store(true, Relaxed);
                if stream_keeps && carries_session(&d) {
                    touch();
                }
                c.bytes_in.fetch_add(d.len() as u64, Relaxed);
                if let Err(e) = udp.send(&d).await {
                    return End::Local(e.kind());
                }
            }
            if buf.capacity() - buf.len() < 2048 {
                buf.reserve(START.max(buf.len()).min(BATCH));
            }
        }
    };
    let up = async {
        let mut dgram = vec![0u8; MAX_MESSAGE];
        let mut out = BytesMut::with_capacity(START);
        let mut masks = Masks::new(framing == Framing::WsNode);
        loop {
            let n = tokio::select! {
                r = udp.recv(&mut dgram) => match r {
                    Ok(n) => Some(n),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                    Err(e) => return End::Local(e.kind()),
                },
                Some(ctrl) = pong_rx.recv() => {
                    match ctrl {
                        Some(p) => ws::pong(&p, masks.next(), &mut out),
                        None => {
                            ws::close(masks.next(), &mut out);
                            let _ = wr.write_all(&out).await;
                            let _ = wr.flush().await;
                            return End::Closed;
                        }
                    }
                    None
                }
            };
            // A pong, an initiation or a cookie reply is no sign of a session.
            let mut session = false;
            if let Some(n) = n {
                let d = dgram.get(..n).unwrap_or_default();
                session |= carries_session(d);
                push(d, &mut out, c, framing, &mut masks);
            }
            // Whatever else is queued goes in the same write.
            while out.len() < BATCH {
                match udp.try_recv(&mut dgram) {
                    Ok(n) => {
                        let d = dgram.get(..n).unwrap_or_default();
                        session |= carries_session(d);
                        push(d, &mut out, c, framing, &mut masks)
                    }
                    Err(_) => break,
                }
            }
            if session && !answered.load(Relaxed) && !prove() {
                return End::Full;
            }
            if wr.write_all(&out).await.is_err() || wr.flush().await.is_err() {
                return End::Closed;
            }
            out.clear();
            if session {
                answered.store(true, Relaxed);
                touch();
            }
        }
    };
    let watch = async {
        let step = (idle.min(first) / 4).max(Duration::from_millis(50));
        loop {
            tokio::time::sleep(step).await;
            let both = heard.load(Relaxed) && answered.load(Relaxed);
            if !both && start.elapsed() >= first {
                return End::Silent;
            }
            let quiet = (start.elapsed().as_millis() as u64).saturating_sub(last.load(Relaxed));
            if quiet >= idle.as_millis() as u64 {
                return End::Idle;
            }
        }
    };
    tokio::select! {
        e = down => e,
        e = up => e,
        e = watch => e,
    }
}

/// Frames one datagram from the device into `out` (an empty one, which no
/// WireGuard message is, is left out).
fn push(d: &[u8], out: &mut BytesMut, c: &Counters, framing: Framing, masks: &mut Masks) {
    let ok = match framing {
        Framing::Length => frame::encode(d, out).is_ok(),
        Framing::WsNode | Framing::WsHub => ws::encode(d, masks.next(), out),
    };
    if ok {
        c.bytes_out.fetch_add(d.len() as u64, Relaxed);
    }
}

/// WebSocket masking keys for a node's frames: unpredictable (RFC 6455
/// 5.3), drawn from the system's random source 64 at a time. Off at the
/// hub, which does not mask.
struct Masks {
    on: bool,
    pool: [u8; 256],
    at: usize,
}

impl Masks {
    fn new(on: bool) -> Masks {
        Masks {
            on,
            pool: [0; 256],
            at: 256,
        }
    }

    fn next(&mut self) -> Option<[u8; 4]> {
        use ring::rand::SecureRandom as _;
        if !self.on {
            return None;
        }
        if self.at + 4 > self.pool.len() {
            // The system's source does not fail on Linux; were it to, the
            // old pool is used again (masking is no secret, only a guard
            // against caches in intermediaries).
            let _ = ring::rand::SystemRandom::new().fill(&mut self.pool);
            self.at = 0;
        }
        let k = self
            .pool
            .get(self.at..self.at + 4)
            .and_then(|s| <[u8; 4]>::try_from(s).ok());
        self.at += 4;
        k.or(Some([0x5a, 0xa5, 0x3c, 0xc3]))
    }
}

/// The hub's side: a TLS acceptor for carried tunnels and the device port
/// their datagrams go to.
pub struct Hub {
    acceptor: tokio_rustls::TlsAcceptor,
    /// The device's WireGuard port on loopback, asked at each stream (the
    /// port may be changed over UAPI).
    device: Box<dyn Fn() -> SocketAddr + Send + Sync>,
    pub counters: Counters,
    /// Set when the hub stops: every carried tunnel closes.
    stop: tokio::sync::watch::Sender<bool>,
    /// Carried tunnels, unproven and proven ([`pool`]).
    places: Arc<Places>,
    /// Open relays and the peers they serve ([`peers`]).
    serving: Arc<Serving>,
    /// Told a relay's loopback address and its client's address when the
    /// relay opens, before it carries anything.
    on_relay_opened: Option<Box<dyn Fn(SocketAddr, IpAddr) + Send + Sync>>,
    /// Told a relay's loopback address when the relay has ended (its
    /// socket still open, so the address is not yet anyone else's).
    on_relay_closed: Option<Box<dyn Fn(SocketAddr) + Send + Sync>>,
}

/// Tells a hub's hooks that a relay opened, and when dropped that it
/// ended (before its socket is closed, the caller making sure of that).
struct Told<'a> {
    hub: &'a Hub,
    relay: SocketAddr,
}

impl<'a> Told<'a> {
    fn new(hub: &'a Hub, relay: SocketAddr, client: IpAddr) -> Self {
        if let Some(f) = &hub.on_relay_opened {
            f(relay, client);
        }
        Told { hub, relay }
    }
}

impl Drop for Told<'_> {
    fn drop(&mut self) {
        if let Some(f) = &self.hub.on_relay_closed {
            f(self.relay);
        }
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("carrier::Hub")
            .field("device", &(self.device)())
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// `device`: the hub's WireGuard port on loopback. The certificate is
    /// made anew at every start (nodes do not check it; see the module).
    pub fn new(device: impl Fn() -> SocketAddr + Send + Sync + 'static) -> anyhow::Result<Hub> {
        use crate::proxy::tls::{one_cert_config, self_signed};
        let cfg = self_signed("gatewire-hub", Vec::new())
            .and_then(|key| one_cert_config(key, ALPN))
            .map_err(|e| anyhow::anyhow!("tunnels over TLS: {e}"))?;
        Ok(Hub {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
            device: Box::new(device),
            counters: Counters::default(),
            stop: tokio::sync::watch::channel(false).0,
            places: Arc::new(parking_lot::Mutex::new(pool::Pool::new(LIMITS))),
            serving: Arc::new(parking_lot::Mutex::new(peers::Relays::new(
                MAX_CARRIED_PER_PEER,
            ))),
            on_relay_opened: None,
            on_relay_closed: None,
        })
    }

    /// What the device tells of each move of a peer's endpoint
    /// ([`Moves::moved`]). It holds this hub's relays, not the hub (which
    /// holds the device).
    pub fn moves(&self) -> Moves {
        Moves(self.serving.clone())
    }

    /// Calls `f` with a relay's loopback address and its client's address
    /// (behind a trusted proxy, the forwarded one) when the relay opens,
    /// before it relays anything: the device is to count the handshakes
    /// from that address as the client's.
    pub fn on_relay_opened(
        mut self,
        f: impl Fn(SocketAddr, IpAddr) + Send + Sync + 'static,
    ) -> Hub {
        self.on_relay_opened = Some(Box::new(f));
        self
    }

    /// Calls `f` with a relay's loopback address when the relay has ended:
    /// the device is to forget it as a peer's endpoint (the next stream
    /// given the same port may be another node's).
    pub fn on_relay_closed(mut self, f: impl Fn(SocketAddr) + Send + Sync + 'static) -> Hub {
        self.on_relay_closed = Some(Box::new(f));
        self
    }

    /// An unproven place for one more carried tunnel from `client`, or
    /// `None` (counted as failed) when [`MAX_UNPROVEN_PER_SOURCE`] from its
    /// address are unproven. When [`MAX_UNPROVEN`] are, the oldest of them
    /// is closed to make room (counted as evicted).
    pub fn try_slot(&self, client: std::net::IpAddr) -> Option<CarrySlot> {
        let evicted = Arc::new(tokio::sync::Notify::new());
        let admitted = self
            .places
            .lock()
            .admit(crate::per_source::source_key(client), evicted.clone());
        match admitted {
            Ok((id, old)) => {
                if let Some(old) = old {
                    self.counters.evicted.fetch_add(1, Relaxed);
                    // Kept for the stream if it is not waiting yet.
                    old.notify_one();
                }
                Some(CarrySlot {
                    places: self.places.clone(),
                    id,
                    source: client.to_canonical(),
                    evicted,
                    gone: std::sync::atomic::AtomicBool::new(false),
                })
            }
            Err(_) => {
                self.counters.failed.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// Closes every carried tunnel (the hub is stopping).
    pub fn close_all(&self) {
        self.stop.send_replace(true);
    }

    /// Serves one connection whose ClientHello offered [`ALPN`] (`io` replays
    /// the bytes already read) until it ends.
    pub async fn serve<IO>(&self, io: IO, client: SocketAddr, handshake: Duration)
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let Some(slot) = self.try_slot(client.ip()) else {
            debug!(client = %client, "carried tunnel refused: this address's unproven streams are at their limit");
            return;
        };
        let accept = tokio::time::timeout(handshake, self.acceptor.accept(io));
        let tls = tokio::select! {
            r = accept => r,
            _ = slot.evicted.notified() => {
                debug!(client = %client, "carried tunnel closed in its TLS handshake to make room");
                return;
            }
        };
        let tls = match tls {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                self.counters.failed.fetch_add(1, Relaxed);
                debug!(client = %client, error = %e, "carried tunnel: TLS handshake failed");
                return;
            }
            Err(_) => {
                self.counters.failed.fetch_add(1, Relaxed);
                debug!(client = %client, "carried tunnel: TLS handshake timed out");
                return;
            }
        };
        self.carry(tls, client, Framing::Length, &slot).await;
    }

    /// Serves one WebSocket carried tunnel (the hub's HTTP listener
    /// answered the opening request with 101, holding `slot` from
    /// [`Hub::try_slot`]) until it ends.
    pub async fn serve_ws<IO>(&self, io: IO, client: SocketAddr, slot: CarrySlot)
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        self.carry(io, client, Framing::WsHub, &slot).await;
    }

    async fn carry<IO>(&self, stream: IO, client: SocketAddr, framing: Framing, slot: &CarrySlot)
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let udp = match local_socket((self.device)()).await {
            Ok(u) => u,
            Err(e) => {
                self.counters.failed.fetch_add(1, Relaxed);
                info!(client = %client, error = %e, "carried tunnel: no loopback socket");
                return;
            }
        };
        let local = udp.local_addr().ok();
        debug!(client = %client, relay = ?local, ?framing, "carried tunnel open");
        // Dropped before the socket (declared after it), however the
        // relay ends.
        let told = local.map(|a| Told::new(self, a, slot.source));
        // Told when the peer it serves has moved on to newer relays.
        let superseded = Arc::new(tokio::sync::Notify::new());
        let serving = local.map(|a| ServingEntry::new(&self.serving, a, superseded.clone()));
        let mut stop = self.stop.subscribe();
        let t = Instant::now();
        let prove = || slot.prove();
        let relay = relay_ends(
            stream,
            &udp,
            IDLE,
            FIRST,
            &self.counters,
            framing,
            false,
            &prove,
        );
        let mut end = tokio::select! {
            e = relay => e,
            _ = stop.wait_for(|s| *s) => End::Stopped,
            // Only an unproven stream is ever evicted.
            _ = slot.evicted.notified() => End::Evicted,
            _ = superseded.notified() => End::Superseded,
        };
        if end == End::Full {
            if slot.gone.load(Relaxed) {
                // Evicted (and counted so) as its session came up.
                end = End::Evicted;
            } else {
                self.counters.failed.fetch_add(1, Relaxed);
            }
        }
        if end == End::Superseded {
            self.counters.superseded.fetch_add(1, Relaxed);
        }
        // No peer's move makes it serve one any more; the device forgets
        // the address while the socket still holds it.
        drop(serving);
        drop(told);
        drop(udp);
        let secs = t.elapsed().as_secs();
        // Connections that never carried a message (or were made room of)
        // are not worth a line each.
        if matches!(end, End::Silent | End::Evicted) {
            debug!(client = %client, relay = ?local, end = ?end, secs, "carried tunnel closed");
        } else {
            info!(client = %client, relay = ?local, ?framing, end = ?end, secs, "carried tunnel closed");
        }
    }
}

/// The node's side: TLS client settings for carried tunnels (TLS 1.3,
/// ALPN [`ALPN`]).
pub fn client_config() -> anyhow::Result<Arc<rustls::ClientConfig>> {
    unverified_client(&[&rustls::version::TLS13], ALPN)
}

/// The system's CA bundle: what checks a `wss://` carrier's certificate
/// unless its hub has `websocket_ca`.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Where systems keep their CA bundle, in the order looked at: Debian and
/// Ubuntu, RHEL and Fedora, openSUSE, Alpine.
pub const SYSTEM_BUNDLES: [&str; 4] = [
    SYSTEM_ROOTS,
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The first of [`SYSTEM_BUNDLES`] there: what checks the ACME server's
/// certificate without `directory_ca`.
pub fn system_bundle() -> Option<&'static str> {
    SYSTEM_BUNDLES
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
}

/// How a node checks the certificate of a `wss://` carrier's server.
#[derive(Clone, PartialEq, Eq)]
pub enum WsTrust {
    /// Against the system's CA bundle ([`SYSTEM_ROOTS`]), read at start.
    System,
    /// Against these CA certificates (`websocket_ca`).
    Ca(Vec<rustls::pki_types::CertificateDer<'static>>),
    /// Not at all (`websocket_verify = false`; never with a query in the
    /// URL).
    Off,
}

impl std::fmt::Debug for WsTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WsTrust::System => f.write_str("System"),
            WsTrust::Ca(c) => write!(f, "Ca({} certificates)", c.len()),
            WsTrust::Off => f.write_str("Off"),
        }
    }
}

/// The node's side: TLS client settings for WebSocket carriers (ALPN
/// `http/1.1`, which TLS-terminating intermediaries speak; TLS 1.2 too),
/// checking the server's certificate as `trust` says.
pub fn ws_client_config(trust: &WsTrust) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let alpn = b"http/1.1";
    let certs = match trust {
        WsTrust::Off => return unverified_client(rustls::DEFAULT_VERSIONS, alpn),
        WsTrust::Ca(c) => c.clone(),
        // A bundle may hold certificates this TLS library cannot use:
        // those are skipped.
        WsTrust::System => CertificateDer::pem_file_iter(SYSTEM_ROOTS)
            .map_err(|e| {
                anyhow::anyhow!(
                    "the system's CA bundle {SYSTEM_ROOTS}, which checks the wss:// certificate: \
                     {e} (install the CA certificates, or set websocket_ca)"
                )
            })?
            .filter_map(Result::ok)
            .collect(),
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(certs);
    if roots.is_empty() {
        anyhow::bail!(match trust {
            WsTrust::System =>
                format!("the system's CA bundle {SYSTEM_ROOTS}: no usable certificate"),
            _ => "websocket_ca: no usable certificate".to_string(),
        });
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(crate::proxy::upstream::provider())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(cfg))
}

/// A TLS client that does not check the server's certificate (WireGuard
/// inside authenticates the hub) offering `alpn`.
fn unverified_client(
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[u8],
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = crate::proxy::upstream::provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(crate::proxy::upstream::DangerNoVerify(
            provider,
        )))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(cfg))
}

/// The TLS server name for `host` (a DNS name or an IP literal).
fn server_name(host: &str) -> io::Result<ServerName<'static>> {
    match host.parse::<IpAddr>() {
        Ok(ip) => Ok(ServerName::IpAddress(ip.into())),
        Err(_) => ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e)),
    }
}

/// Reads a reply header from `stream` (a proxy's to `CONNECT`, the hub's
/// to the WebSocket request) until `parse` decides: its value and the
/// bytes read after the header (`parse` returns the header's length). The
/// parsers bound the header's size.
async fn read_reply<S, T>(
    stream: &mut S,
    closed: &str,
    mut parse: impl FnMut(&[u8]) -> io::Result<Option<(T, usize)>>,
) -> io::Result<(T, Vec<u8>)>
where
    S: AsyncRead + Unpin + ?Sized,
{
    let mut reply = Vec::new();
    loop {
        let mut chunk = [0u8; 2048];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                closed.to_string(),
            ));
        }
        reply.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if let Some((v, len)) = parse(&reply)? {
            let rest = reply.split_off(len.min(reply.len()));
            return Ok((v, rest));
        }
    }
}

/// Splits a `host:port` endpoint (host a name, an IPv4 or a bracketed IPv6
/// literal) into the host and the port.
pub fn split_host_port(ep: &str) -> Option<(&str, u16)> {
    let (h, p) = ep.rsplit_once(':')?;
    let port = p.parse::<u16>().ok().filter(|p| *p > 0)?;
    let h = h
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(h);
    (!h.is_empty()).then_some((h, port))
}

/// How a node's connection for the carrier leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dial {
    /// Straight to the hub's listener.
    Direct(SocketAddr),
    /// Through a web proxy at `proxy`, asked for a tunnel to `authority`
    /// (`host:port` of the hub's listener, resolved by the proxy).
    Proxy {
        proxy: SocketAddr,
        authority: String,
        /// For a proxy that asks for them.
        auth: Option<connect::Credentials>,
    },
}

/// The proxy in front (`tls_proxy`) refused the node's credentials, or asks
/// for some and the node has none: trying again with the same ones cannot
/// help (and a proxy that checks them against a directory may lock the
/// account after a few), so the node waits longer before the next try.
#[derive(Debug)]
pub struct ProxyAuthRefused(String);

impl std::fmt::Display for ProxyAuthRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProxyAuthRefused {}

/// Whether `e`, or an error it wraps, is a [`ProxyAuthRefused`].
pub fn is_proxy_auth_refused(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<ProxyAuthRefused>().is_some()
            || c.downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.downcast_ref::<ProxyAuthRefused>().is_some())
    })
}

/// Connects `dial`, asking the proxy for its tunnel first if it names one.
async fn dial_tcp(dial: &Dial) -> io::Result<TcpStream> {
    let (to, authority, auth) = match dial {
        Dial::Direct(a) => (*a, None, None),
        Dial::Proxy {
            proxy,
            authority,
            auth,
        } => (*proxy, Some(authority), auth.as_ref()),
    };
    let mut tcp = TcpStream::connect(to).await?;
    let _ = tcp.set_nodelay(true);
    let Some(authority) = authority else {
        return Ok(tcp);
    };
    tcp.write_all(&connect::request(authority, auth)).await?;
    // `parse_reply` accepts a reply with nothing after it: all of it is
    // the header.
    read_reply(&mut tcp, "the proxy closed the connection", |r| {
        match connect::parse_reply(r) {
            Ok(done) => Ok(done.map(|()| ((), r.len()))),
            // Some proxies (tinyproxy) answer wrong credentials with 401.
            Err(connect::ConnectError::Refused(code @ (401 | 407), _))
                if code == 407 || auth.is_some() =>
            {
                Err(io::Error::other(ProxyAuthRefused(match auth {
                    None => "the proxy asks for credentials (407): set them in tls_proxy \
                             (http://user:password@host:port) or tls_proxy_auth_file"
                        .to_string(),
                    Some(a) => format!(
                        "the proxy refused the credentials of user `{}` ({code})",
                        a.user()
                    ),
                })))
            }
            Err(e) => Err(io::Error::other(e)),
        }
    })
    .await?;
    Ok(tcp)
}

/// Opens a carried tunnel (TCP as `dial` says, then TLS naming `host`),
/// within `timeout`.
pub async fn connect(
    cfg: Arc<rustls::ClientConfig>,
    dial: &Dial,
    host: &str,
    timeout: Duration,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = server_name(host)?;
    let work = async {
        let tcp = dial_tcp(dial).await?;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await?;
        if tls.get_ref().1.alpn_protocol() != Some(ALPN) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the hub does not carry tunnels over TLS (no ALPN agreed)",
            ));
        }
        Ok(tls)
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")))
}

/// A byte stream of any kind (plain TCP or TLS), for a WebSocket carrier.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where a WebSocket carrier goes: `ws://` or `wss://`, the `Host` header
/// and the path. `Debug` shows the URL without its query.
#[derive(Clone, PartialEq, Eq)]
pub struct WsTarget {
    /// `wss://`: TLS first, its certificate checked as `trust` says.
    pub tls: bool,
    pub trust: WsTrust,
    /// The URL's authority, sent as `Host`.
    pub host_header: String,
    /// The URL's path.
    pub path: String,
    /// The URL as written, for `gatewire show` and logs, its query (which
    /// may hold a token) left out.
    pub url: String,
}

impl WsTarget {
    /// A `ws://` URL with a query: what the query holds (an intermediary's
    /// token, as a rule) crosses the network unencrypted, in the WebSocket
    /// upgrade request.
    pub fn query_in_clear(&self) -> bool {
        !self.tls && self.path.contains('?')
    }
}

impl std::fmt::Debug for WsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsTarget")
            .field("url", &self.url)
            .field("trust", &self.trust)
            .finish()
    }
}

/// A TLS error that is the server's certificate failing its check, said
/// so with what to set; others as they are.
fn refused_certificate(e: io::Error) -> io::Error {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(c)) => io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the server's certificate is refused: {c} (websocket_ca names the CA that \
                 signs it)"
            ),
        ),
        _ => e,
    }
}

/// Opens a WebSocket carried tunnel: TCP as `dial` says, TLS naming `host`
/// for `wss://`, then the opening handshake for `target`; within
/// `timeout`. Frames the hub sent right after its answer are kept.
pub async fn connect_ws(
    cfg: Arc<rustls::ClientConfig>,
    dial: &Dial,
    host: &str,
    target: &WsTarget,
    timeout: Duration,
) -> io::Result<crate::proxy::io::Prefixed<Box<dyn Io>>> {
    use ring::rand::SecureRandom as _;
    let work = async {
        let tcp = dial_tcp(dial).await?;
        let mut stream: Box<dyn Io> = if target.tls {
            Box::new(
                tokio_rustls::TlsConnector::from(cfg)
                    .connect(server_name(host)?, tcp)
                    .await
                    .map_err(refused_certificate)?,
            )
        } else {
            Box::new(tcp)
        };
        let mut random = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut random)
            .map_err(|_| io::Error::other("no random bytes for the WebSocket key"))?;
        let key = ws::client_key(random);
        stream
            .write_all(&ws::request(&target.host_header, &target.path, &key))
            .await?;
        stream.flush().await?;
        let ((), rest) = read_reply(
            &mut stream,
            "closed before answering the WebSocket request",
            |r| match ws::parse_response(r, &key) {
                Ok(len) => Ok(len.map(|len| ((), len))),
                Err(e) => Err(io::Error::other(e)),
            },
        )
        .await?;
        // Frames the hub sent right after its answer come first.
        Ok(crate::proxy::io::Prefixed::new(rest, stream))
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A proxy that answers every request with `status`.
    async fn proxy_answering(status: &'static str) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        at
    }

    #[tokio::test]
    async fn refused_proxy_credentials_are_told_from_other_failures() {
        let dial = |proxy, auth: Option<&str>| Dial::Proxy {
            proxy,
            authority: "hub.example:443".into(),
            auth: auth.map(|a| connect::Credentials::parse(a).unwrap()),
        };
        let wrapped = |e: io::Error| anyhow::Error::new(e).context("proxy.example:8080");
        let p407 = proxy_answering("407 Proxy Authentication Required").await;
        let p401 = proxy_answering("401 Unauthorized").await;
        let p502 = proxy_answering("502 Bad Gateway").await;
        for (at, auth) in [(p407, None), (p407, Some("gw:old")), (p401, Some("gw:old"))] {
            let e = wrapped(dial_tcp(&dial(at, auth)).await.unwrap_err());
            assert!(is_proxy_auth_refused(&e), "{e:#}");
            let text = format!("{e:#}");
            assert!(text.starts_with("proxy.example:8080: the proxy"), "{text}");
            assert!(!text.contains("old"), "the password is not told: {text}");
        }
        // A 401 without credentials is the hub's business, not the proxy's
        // refusal; a 502 is the proxy's failure to reach the hub.
        for (at, auth) in [(p401, None), (p502, Some("gw:old"))] {
            let e = wrapped(dial_tcp(&dial(at, auth)).await.unwrap_err());
            assert!(!is_proxy_auth_refused(&e), "{e:#}");
        }
    }

    async fn device() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").await.unwrap()
    }

    /// A node's side of a carried tunnel to the hub listening at `at`: its
    /// device, the address of its relay's socket, the relay's counters.
    async fn node_over_tls(at: SocketAddr) -> (UdpSocket, SocketAddr, Arc<Counters>) {
        let tls = connect(
            client_config().unwrap(),
            &Dial::Direct(at),
            "hub.example",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let node_dev = device().await;
        let udp = local_socket(node_dev.local_addr().unwrap()).await.unwrap();
        let node_relay = udp.local_addr().unwrap();
        let c = Arc::new(Counters::default());
        let c2 = c.clone();
        tokio::spawn(async move { relay(tls, &udp, IDLE, IDLE, &c2).await });
        (node_dev, node_relay, c)
    }

    /// A node's and a hub's WebSocket relays joined by a stream carry
    /// datagrams both ways; a ping from an intermediary is answered with a
    /// pong; an unmasked frame towards the hub ends its relay.
    #[tokio::test]
    async fn websocket_relays_carry_datagrams_and_answer_pings() {
        let node_dev = device().await;
        let hub_dev = device().await;
        let nu = local_socket(node_dev.local_addr().unwrap()).await.unwrap();
        let hu = local_socket(hub_dev.local_addr().unwrap()).await.unwrap();
        let (n_addr, h_addr) = (nu.local_addr().unwrap(), hu.local_addr().unwrap());
        let (a, b) = tokio::io::duplex(4096);
        let c = Arc::new(Counters::default());
        let (c1, c2) = (c.clone(), c.clone());
        let node =
            tokio::spawn(
                async move { relay_framed(a, &nu, IDLE, IDLE, &c1, Framing::WsNode).await },
            );
        let hub =
            tokio::spawn(
                async move { relay_framed(b, &hu, IDLE, IDLE, &c2, Framing::WsHub).await },
            );
        let mut d = [0u8; 2048];
        for (from, from_addr, to, to_addr) in [
            (&node_dev, n_addr, &hub_dev, h_addr),
            (&hub_dev, h_addr, &node_dev, n_addr),
        ] {
            for msg in [&b"handshake"[..], &[7u8; 1400]] {
                from.send_to(msg, from_addr).await.unwrap();
                let (n, src) = to.recv_from(&mut d).await.unwrap();
                assert_eq!((&d[..n], src), (msg, to_addr));
            }
        }
        node.abort();
        hub.abort();

        // A hub relay and a raw client: ping, then an unmasked frame.
        let dev = device().await;
        let udp = local_socket(dev.local_addr().unwrap()).await.unwrap();
        let (near, mut far) = tokio::io::duplex(4096);
        let c = Arc::new(Counters::default());
        let c3 = c.clone();
        let task =
            tokio::spawn(
                async move { relay_framed(near, &udp, IDLE, IDLE, &c3, Framing::WsHub).await },
            );
        // A masked ping "hi" (mask 0).
        far.write_all(&[0x89, 0x82, 0, 0, 0, 0, b'h', b'i'])
            .await
            .unwrap();
        let mut buf = [0u8; 4];
        far.read_exact(&mut buf).await.unwrap();
        assert_eq!(
            buf,
            [0x8A, 0x02, b'h', b'i'],
            "an unmasked pong from the hub"
        );
        far.write_all(&[0x82, 0x01, 1]).await.unwrap();
        assert_eq!(
            task.await.unwrap(),
            End::BadWsFrame(ws::WsError::Frame("an unmasked frame from a node"))
        );
        assert_eq!(c.snapshot().bad_frames, 1);
    }

    /// Datagrams cross a relay both ways, batched writes split back into
    /// the same datagrams; a broken frame ends it, counted.
    #[tokio::test]
    async fn relay_carries_datagrams_both_ways_and_stops_on_a_bad_frame() {
        let dev = device().await;
        let udp = local_socket(dev.local_addr().unwrap()).await.unwrap();
        let relay_addr = udp.local_addr().unwrap();
        let (near, mut far) = tokio::io::duplex(4096);
        let c = Arc::new(Counters::default());
        let c2 = c.clone();
        let task = tokio::spawn(async move { relay(near, &udp, IDLE, IDLE, &c2).await });
        // Device to stream: three datagrams, maybe in one write.
        for d in [&b"one"[..], b"two", &[9u8; 1400]] {
            dev.send_to(d, relay_addr).await.unwrap();
        }
        let mut got = Vec::new();
        let mut buf = BytesMut::new();
        while got.len() < 3 {
            far.read_buf(&mut buf).await.unwrap();
            while let Some(d) = frame::decode(&mut buf).unwrap() {
                got.push(d.to_vec());
            }
        }
        assert_eq!(got, vec![b"one".to_vec(), b"two".to_vec(), vec![9u8; 1400]]);
        // Stream to device: two frames in one write, then one split in two.
        let mut out = BytesMut::new();
        frame::encode(b"alpha", &mut out).unwrap();
        frame::encode(b"beta", &mut out).unwrap();
        frame::encode(b"gamma", &mut out).unwrap();
        far.write_all(&out[..out.len() - 3]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        far.write_all(&out[out.len() - 3..]).await.unwrap();
        let mut d = [0u8; 64];
        for want in [&b"alpha"[..], b"beta", b"gamma"] {
            let (n, from) = dev.recv_from(&mut d).await.unwrap();
            assert_eq!((&d[..n], from), (want, relay_addr));
        }
        assert_eq!(c.open.load(Relaxed), 1);
        far.write_all(b"\x00\x00").await.unwrap();
        assert_eq!(task.await.unwrap(), End::BadFrame(frame::FrameError::Empty));
        let s = c.snapshot();
        assert_eq!((s.streams, s.open, s.bad_frames), (1, 0, 1));
        assert_eq!((s.bytes_out, s.bytes_in), (1406, 14));
    }

    /// A WireGuard message of type `t`, `len` bytes long.
    fn message(t: u8, len: usize) -> Vec<u8> {
        let mut m = vec![0u8; len];
        m[0] = t;
        m
    }

    #[test]
    fn only_responses_and_transport_data_carry_a_session() {
        assert!(carries_session(&message(2, 92)));
        assert!(carries_session(&message(4, 32)));
        let mut odd = message(4, 32);
        odd[2] = 1;
        for d in [
            message(1, 148),
            message(3, 64),
            message(0, 32),
            message(5, 32),
            odd,
            vec![4, 0, 0],
            vec![],
        ] {
            assert!(!carries_session(&d), "{:?}", d.get(..4));
        }
    }

    /// What a stranger can make the device send (cookie replies, to
    /// initiations with a valid mac1 while it is under load) neither lets a
    /// stream past `first` nor keeps one open, however much it sends; a
    /// stream the device sends keepalives on stays open.
    #[tokio::test]
    async fn only_the_devices_session_datagrams_keep_a_stream_open() {
        let dev = Arc::new(device().await);
        let udp = local_socket(dev.local_addr().unwrap()).await.unwrap();
        let c = Counters::default();
        // The device: a handshake response to the first datagram when
        // `respond`, then a cookie reply to each.
        let answer = |respond: bool| {
            let dev = dev.clone();
            tokio::spawn(async move {
                let mut d = [0u8; 256];
                let mut first = respond;
                loop {
                    let (_, from) = dev.recv_from(&mut d).await.unwrap();
                    let reply = if std::mem::take(&mut first) {
                        message(2, 92)
                    } else {
                        message(3, 64)
                    };
                    dev.send_to(&reply, from).await.unwrap();
                }
            })
        };
        // A stranger: initiations, then junk, every 20 ms; what comes back
        // is read and dropped.
        let stranger = |far: tokio::io::DuplexStream| async move {
            let (mut rd, mut wr) = tokio::io::split(far);
            tokio::spawn(async move {
                let mut b = [0u8; 1024];
                while rd.read(&mut b).await.is_ok_and(|n| n > 0) {}
            });
            let mut out = BytesMut::new();
            frame::encode(&message(1, 148), &mut out).unwrap();
            frame::encode(&[0xee; 100], &mut out).unwrap();
            loop {
                if wr.write_all(&out).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        // (A relay that would stay open fails the test instead of hanging it.)
        async fn bounded<F: std::future::Future>(f: F) -> Option<F::Output> {
            tokio::time::timeout(Duration::from_secs(10), f).await.ok()
        }
        let short = Duration::from_millis(300);
        // Cookie replies only: silent after `first`.
        let device_task = answer(false);
        let (near, far) = tokio::io::duplex(4096);
        let t = Instant::now();
        tokio::select! {
            e = bounded(relay(near, &udp, IDLE, short, &c)) => assert_eq!(e, Some(End::Silent)),
            _ = stranger(far) => unreachable!(),
        }
        assert!(t.elapsed() >= short && t.elapsed() < IDLE);
        device_task.abort();
        // One response, then cookie replies: past `first`, but closed
        // `idle` after the response, junk and cookies flowing all along.
        let device_task = answer(true);
        let (near, far) = tokio::io::duplex(4096);
        let idle = Duration::from_millis(600);
        let t = Instant::now();
        tokio::select! {
            e = bounded(relay(near, &udp, idle, short, &c)) => assert_eq!(e, Some(End::Idle)),
            _ = stranger(far) => unreachable!(),
        }
        assert!(t.elapsed() >= idle && t.elapsed() < IDLE);
        device_task.abort();
        // A live peer: one datagram from the stream, the device's
        // keepalives every 50 ms, nothing more from the stream.
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut out = BytesMut::new();
        frame::encode(&message(4, 32), &mut out).unwrap();
        far.write_all(&out).await.unwrap();
        let at = udp.local_addr().unwrap();
        let keepalives = async {
            loop {
                dev.send_to(&message(4, 32), at).await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let live =
            async { tokio::time::timeout(idle * 3, relay(near, &udp, idle, short, &c)).await };
        tokio::select! {
            r = live => assert!(r.is_err(), "closed while the device sent keepalives: {r:?}"),
            _ = keepalives => unreachable!(),
        }
    }

    #[tokio::test]
    async fn on_a_nodes_end_the_hubs_keepalives_keep_the_stream_open() {
        let dev = device().await;
        let udp = local_socket(dev.local_addr().unwrap()).await.unwrap();
        let c = Counters::default();
        let idle = Duration::from_millis(400);
        // The node's device says nothing after its first datagram; the hub
        // sends keepalives through the stream every 50 ms.
        let at = udp.local_addr().unwrap();
        dev.send_to(&message(4, 32), at).await.unwrap();
        let hub = |far: tokio::io::DuplexStream| async move {
            let (mut rd, mut wr) = tokio::io::split(far);
            tokio::spawn(async move {
                let mut b = [0u8; 1024];
                while rd.read(&mut b).await.is_ok_and(|n| n > 0) {}
            });
            let mut out = BytesMut::new();
            frame::encode(&message(4, 32), &mut out).unwrap();
            loop {
                if wr.write_all(&out).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let (near, far) = tokio::io::duplex(1 << 20);
        let live = async {
            tokio::time::timeout(idle * 3, relay_node(near, &udp, idle, &c, Framing::Length)).await
        };
        tokio::select! {
            r = live => assert!(r.is_err(), "a node's stream closed under its hub's keepalives: {r:?}"),
            _ = hub(far) => unreachable!(),
        }
        // The same on a hub's end closes it: a stream's datagrams are a
        // stranger's to choose there.
        let (near, far) = tokio::io::duplex(1 << 20);
        tokio::select! {
            e = relay_framed(near, &udp, idle, idle * 10, &c, Framing::Length) => assert_eq!(e, End::Idle),
            _ = hub(far) => unreachable!(),
        }
    }

    #[tokio::test]
    async fn relay_ends_when_idle_or_closed() {
        let dev = device().await;
        let udp = local_socket(dev.local_addr().unwrap()).await.unwrap();
        let (near, _far) = tokio::io::duplex(64);
        let c = Counters::default();
        let short = Duration::from_millis(200);
        let t = Instant::now();
        assert_eq!(relay(near, &udp, short, IDLE, &c).await, End::Idle);
        assert!(t.elapsed() >= short);
        // Nothing from the stream within `first`, though the device sends.
        let (near, mut far) = tokio::io::duplex(4096);
        let relay_addr = udp.local_addr().unwrap();
        let chatter = async {
            loop {
                dev.send_to(b"keepalive", relay_addr).await.unwrap();
                let mut b = [0u8; 64];
                let _ = far.read(&mut b).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let t = Instant::now();
        tokio::select! {
            e = relay(near, &udp, IDLE, short, &c) => assert_eq!(e, End::Silent),
            _ = chatter => unreachable!(),
        }
        assert!(t.elapsed() >= short && t.elapsed() < IDLE);
        // A stranger's datagrams the device never answers, an unfinished
        // frame trickling in, or pings: none of them keeps a stream open.
        let (near, mut far) = tokio::io::duplex(4096);
        let junk = async {
            let mut out = BytesMut::new();
            frame::encode(&[1u8; 148], &mut out).unwrap();
            loop {
                far.write_all(&out).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let t = Instant::now();
        tokio::select! {
            e = relay(near, &udp, IDLE, short, &c) => assert_eq!(e, End::Silent),
            _ = junk => unreachable!(),
        }
        assert!(t.elapsed() >= short && t.elapsed() < IDLE);
        let (near, mut far) = tokio::io::duplex(4096);
        let trickle = async {
            far.write_all(&[0xff, 0xff]).await.unwrap();
            loop {
                far.write_all(&[7]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            e = relay(near, &udp, short, IDLE, &c) => assert_eq!(e, End::Idle),
            _ = trickle => unreachable!(),
        }
        let (near, mut far) = tokio::io::duplex(4096);
        let pings = async {
            loop {
                // A masked ping, as a node would send it.
                far.write_all(&[0x89, 0x80, 1, 2, 3, 4]).await.unwrap();
                let mut b = [0u8; 64];
                let _ = far.read(&mut b).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            e = relay_framed(near, &udp, short, IDLE, &c, Framing::WsHub) => assert_eq!(e, End::Idle),
            _ = pings => unreachable!(),
        }
        let (near, far) = tokio::io::duplex(64);
        drop(far);
        assert_eq!(relay(near, &udp, IDLE, IDLE, &c).await, End::Closed);
    }

    /// The hub's acceptor and the node's connector agree on TLS and the ALPN,
    /// and the two relays join the two "devices".
    #[tokio::test]
    async fn hub_and_node_carry_a_tunnel_over_tls() {
        let hub_dev = device().await;
        let hub_addr = hub_dev.local_addr().unwrap();
        let hub = Arc::new(Hub::new(move || hub_addr).unwrap());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        let h = hub.clone();
        tokio::spawn(async move {
            let (s, peer) = l.accept().await.unwrap();
            h.serve(s, peer, Duration::from_secs(5)).await;
        });
        let (node_dev, node_relay, c) = node_over_tls(at).await;
        node_dev.send_to(b"initiation", node_relay).await.unwrap();
        let mut d = [0u8; 64];
        let (n, hub_relay) = hub_dev.recv_from(&mut d).await.unwrap();
        assert_eq!(&d[..n], b"initiation");
        assert!(hub_relay.ip().is_loopback());
        hub_dev.send_to(b"response", hub_relay).await.unwrap();
        let (n, from) = node_dev.recv_from(&mut d).await.unwrap();
        assert_eq!((&d[..n], from), (&b"response"[..], node_relay));
        assert_eq!(hub.counters.open.load(Relaxed), 1);
        hub.close_all();
        tokio::time::timeout(Duration::from_secs(5), async {
            while hub.counters.open.load(Relaxed) != 0 || c.open.load(Relaxed) != 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("both ends close when the hub stops");
    }

    /// A `wss://` carrier takes a server whose certificate its CA signed
    /// for the URL's host, or any with the check off; not one another CA
    /// signed, nor one for another name.
    #[tokio::test]
    async fn wss_checks_the_server_certificate() {
        let ca = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.distinguished_name
                .push(rcgen::DnType::CommonName, name.to_string());
            (p.self_signed(&key).unwrap(), key)
        };
        let (ours, ours_key) = ca("ours");
        let (theirs, _) = ca("theirs");
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["hub.example".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ours, &ours_key)
            .unwrap();
        let mut server =
            rustls::ServerConfig::builder_with_provider(crate::proxy::upstream::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![leaf.der().clone()],
                    rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
                )
                .unwrap();
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        // Answers each opening request with 101.
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let a = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut t) = a.accept(s).await else { return };
                    let mut req = Vec::new();
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut b = [0u8; 1024];
                        match t.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&b[..n]),
                        }
                    }
                    let req = String::from_utf8(req).unwrap();
                    let key = req
                        .lines()
                        .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                        .unwrap();
                    let answer = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                         Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                        ws::accept_for(key)
                    );
                    t.write_all(answer.as_bytes()).await.unwrap();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                });
            }
        });
        let target = WsTarget {
            tls: true,
            trust: WsTrust::System,
            host_header: "hub.example".into(),
            path: ws::PATH.into(),
            url: "wss://hub.example".into(),
        };
        let open = |trust: WsTrust, host: &'static str| {
            let target = target.clone();
            async move {
                let cfg = ws_client_config(&trust).unwrap();
                connect_ws(
                    cfg,
                    &Dial::Direct(at),
                    host,
                    &target,
                    Duration::from_secs(5),
                )
                .await
            }
        };
        let signed = WsTrust::Ca(vec![ours.der().clone()]);
        assert!(open(signed.clone(), "hub.example").await.is_ok());
        assert!(open(WsTrust::Off, "hub.example").await.is_ok());
        let e = open(WsTrust::Ca(vec![theirs.der().clone()]), "hub.example")
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("certificate is refused") && e.contains("UnknownIssuer"),
            "{e}"
        );
        let e = open(signed, "other.example")
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("certificate is refused") && e.contains("other.example"),
            "{e}"
        );
        // A CA of no one's in the system bundle either.
        if std::path::Path::new(SYSTEM_ROOTS).exists() {
            let e = open(WsTrust::System, "hub.example")
                .await
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("UnknownIssuer"), "{e}");
        }
    }

    /// One address (an IPv6 client's /64) holds at most
    /// `MAX_CARRIED_PER_SOURCE` proven slots and `MAX_UNPROVEN_PER_SOURCE`
    /// unproven ones; others still get theirs, and a dropped slot is given
    /// back.
    #[tokio::test]
    async fn one_source_cannot_take_every_slot() {
        let hub = Hub::new(|| "127.0.0.1:9".parse().unwrap()).unwrap();
        let a: std::net::IpAddr = "2001:db8:1:2::9".parse().unwrap();
        let mut held: Vec<CarrySlot> = (0..MAX_CARRIED_PER_SOURCE)
            .map(|_| {
                let s = hub.try_slot(a).unwrap();
                assert!(s.prove());
                s
            })
            .collect();
        // Another address in the same /64 is the same source.
        let more = hub.try_slot("2001:db8:1:2::77".parse().unwrap()).unwrap();
        assert!(!more.prove());
        drop(more);
        let unproven: Vec<CarrySlot> = (0..MAX_UNPROVEN_PER_SOURCE)
            .map(|_| hub.try_slot(a).unwrap())
            .collect();
        assert!(hub.try_slot(a).is_none());
        assert_eq!(hub.counters.failed.load(Relaxed), 1);
        let other = hub.try_slot("2001:db8:1:3::9".parse().unwrap()).unwrap();
        assert!(other.prove());
        assert!(hub.try_slot("198.51.100.7".parse().unwrap()).is_some());
        drop(unproven);
        held.pop();
        assert!(hub.try_slot(a).unwrap().prove());
    }

    /// A source's unproven streams are bounded; a full unproven pool makes
    /// room by evicting its oldest (counted, the stream told); a proven
    /// stream leaves it; a dropped slot gives its place back.
    #[tokio::test]
    async fn unproven_streams_make_room_oldest_first() {
        let hub = Hub::new(|| "127.0.0.1:9".parse().unwrap()).unwrap();
        let src = |i: usize| -> IpAddr { format!("2001:db8:{i:x}::9").parse().unwrap() };
        let per = MAX_UNPROVEN_PER_SOURCE;
        let mut held: Vec<CarrySlot> = (0..MAX_UNPROVEN)
            .map(|i| hub.try_slot(src(i / per)).unwrap())
            .collect();
        // A source at its limit is refused; nothing is evicted for it.
        assert!(hub.try_slot("2001:db8:0::77".parse().unwrap()).is_none());
        assert_eq!(hub.counters.failed.load(Relaxed), 1);
        assert_eq!(hub.counters.evicted.load(Relaxed), 0);
        // A new source gets in: the oldest stream is told to stop, and its
        // place is gone.
        let new = hub.try_slot("198.51.100.7".parse().unwrap()).unwrap();
        assert_eq!(hub.counters.evicted.load(Relaxed), 1);
        let told = |s: &CarrySlot| {
            let n = s.evicted.clone();
            async move {
                tokio::time::timeout(Duration::from_millis(50), n.notified())
                    .await
                    .is_ok()
            }
        };
        assert!(told(&held[0]).await);
        assert!(!told(&held[1]).await);
        assert!(!held[0].prove(), "an evicted stream has no place to prove");
        assert!(held[0].gone.load(Relaxed), "evicted, not full");
        assert!(!held[1].gone.load(Relaxed));
        assert_eq!(hub.places.lock().len(), (MAX_UNPROVEN, 0));
        // Its source has room again.
        held.push(hub.try_slot(src(0)).unwrap());
        assert_eq!(hub.counters.evicted.load(Relaxed), 2);
        // A proven stream leaves the unproven pool and is never evicted.
        assert!(new.prove());
        assert!(new.prove(), "twice: still proven");
        assert_eq!(hub.places.lock().len(), (MAX_UNPROVEN - 1, 1));
        held.push(hub.try_slot(src(99)).unwrap());
        assert_eq!(hub.counters.evicted.load(Relaxed), 2, "room was made");
        held.push(hub.try_slot(src(99)).unwrap());
        assert_eq!(hub.counters.evicted.load(Relaxed), 3);
        assert!(!told(&new).await);
        drop(new);
        drop(held);
        assert!(hub.places.lock().is_empty(), "every place given back");
    }

    /// A stream that proves itself while every proven slot of its source,
    /// or of the hub, is taken is closed, counted as failed.
    #[tokio::test]
    async fn a_proven_stream_needs_a_proven_slot() {
        let dev = device().await;
        let dev_addr = dev.local_addr().unwrap();
        let hub = Hub::new(move || dev_addr).unwrap();
        let src = |i: usize| -> IpAddr { format!("2001:db8:{i:x}::9").parse().unwrap() };
        let prove = |ip: IpAddr| {
            let s = hub.try_slot(ip).unwrap();
            s.prove().then_some(s)
        };
        let mut held: Vec<CarrySlot> = (0..MAX_CARRIED_PER_SOURCE)
            .map(|_| prove(src(0)).unwrap())
            .collect();
        assert!(
            prove(src(0)).is_none(),
            "its source's proven slots are taken"
        );
        for i in 1..MAX_CARRIED / MAX_CARRIED_PER_SOURCE {
            held.extend((0..MAX_CARRIED_PER_SOURCE).map(|_| prove(src(i)).unwrap()));
        }
        assert!(prove(src(4000)).is_none(), "the hub's are");
        // Through a relay: the device's first session datagram closes it.
        let (near, mut far) = tokio::io::duplex(4096);
        let slot = hub.try_slot(src(4000)).unwrap();
        let relay = hub.carry(
            near,
            "[2001:db8:4000::9]:443".parse().unwrap(),
            Framing::Length,
            &slot,
        );
        let node = async {
            let mut out = BytesMut::new();
            frame::encode(&message(1, 148), &mut out).unwrap();
            far.write_all(&out).await.unwrap();
            let mut d = [0u8; 256];
            let (_, from) = dev.recv_from(&mut d).await.unwrap();
            dev.send_to(&message(2, 92), from).await.unwrap();
            std::future::pending::<()>().await
        };
        tokio::select! {
            () = relay => {}
            () = node => unreachable!(),
        }
        // The relay's (a slot that cannot prove is no failure by itself).
        assert_eq!(hub.counters.failed.load(Relaxed), 1);
        let mut b = [0u8; 16];
        assert_eq!(
            far.read(&mut b).await.unwrap(),
            0,
            "the response was not sent"
        );
        held.pop();
        assert!(prove(src(4000)).is_some());
    }

    /// A node's tunnel over TLS comes up while idle streams from other
    /// sources fill the unproven pool (one of them evicted for it, counted);
    /// once proven it is not evicted by newer ones; a relay's end is told
    /// with its loopback address.
    #[tokio::test]
    async fn a_node_comes_up_while_strangers_fill_the_unproven_pool() {
        // The hub's device: a response to an initiation, a keepalive back
        // for data.
        let hub_dev = Arc::new(device().await);
        let hub_addr = hub_dev.local_addr().unwrap();
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let dev = hub_dev.clone();
        let seen2 = seen.clone();
        tokio::spawn(async move {
            let mut d = [0u8; 2048];
            while let Ok((n, from)) = dev.recv_from(&mut d).await {
                seen2.lock().push(from);
                let reply = match d[..n].first() {
                    Some(1) => message(2, 92),
                    _ => message(4, 32),
                };
                let _ = dev.send_to(&reply, from).await;
            }
        });
        let closed = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let closed2 = closed.clone();
        let hub = Arc::new(
            Hub::new(move || hub_addr)
                .unwrap()
                .on_relay_closed(move |a| closed2.lock().push(a)),
        );
        // Strangers: idle WebSocket streams from 32 /64s, 16 each.
        let mut strangers = Vec::new();
        let stranger = |i: usize| {
            let client: SocketAddr = format!("[2001:db8:{i:x}::9]:40000").parse().unwrap();
            let slot = hub.try_slot(client.ip()).unwrap();
            let (near, far) = tokio::io::duplex(64);
            let h = hub.clone();
            (
                tokio::spawn(async move { h.serve_ws(near, client, slot).await }),
                far,
            )
        };
        for i in 0..MAX_UNPROVEN {
            strangers.push(stranger(i / MAX_UNPROVEN_PER_SOURCE));
        }
        let open = |n: u64| {
            let hub = hub.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(10), async {
                    while hub.counters.open.load(Relaxed) != n {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
                .await
                .is_ok()
            }
        };
        assert!(open(MAX_UNPROVEN as u64).await);
        // The node, over TLS.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        let h = hub.clone();
        tokio::spawn(async move {
            while let Ok((s, peer)) = l.accept().await {
                let h = h.clone();
                tokio::spawn(async move { h.serve(s, peer, Duration::from_secs(5)).await });
            }
        });
        let (node_dev, node_relay, _) = node_over_tls(at).await;
        let mut d = [0u8; 256];
        node_dev
            .send_to(&message(1, 148), node_relay)
            .await
            .unwrap();
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), node_dev.recv_from(&mut d))
            .await
            .expect("the node's handshake is answered")
            .unwrap();
        assert_eq!(&d[..n], &message(2, 92)[..]);
        assert_eq!(hub.counters.evicted.load(Relaxed), 1);
        assert!(
            open(MAX_UNPROVEN as u64).await,
            "the oldest stranger is closed"
        );
        assert_eq!(hub.places.lock().len(), (MAX_UNPROVEN - 1, 1));
        // Newer strangers evict other strangers, not the proven node.
        for i in 0..MAX_UNPROVEN_PER_SOURCE {
            strangers.push(stranger(1000 + i));
        }
        // The node's promotion left one place free.
        assert_eq!(
            hub.counters.evicted.load(Relaxed),
            MAX_UNPROVEN_PER_SOURCE as u64
        );
        node_dev.send_to(&message(4, 32), node_relay).await.unwrap();
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), node_dev.recv_from(&mut d))
            .await
            .expect("the node's tunnel still carries")
            .unwrap();
        assert_eq!(&d[..n], &message(4, 32)[..]);
        // Every evicted stranger's relay was told closed; then the node's.
        tokio::time::timeout(Duration::from_secs(5), async {
            while closed.lock().len() < MAX_UNPROVEN_PER_SOURCE {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("evicted relays end");
        let hub_relay = seen.lock()[0];
        assert!(!closed.lock().contains(&hub_relay));
        hub.close_all();
        assert!(open(0).await);
        assert!(closed.lock().contains(&hub_relay));
        assert_eq!(
            closed.lock().len(),
            MAX_UNPROVEN + MAX_UNPROVEN_PER_SOURCE + 1
        );
        drop(strangers);
    }

    /// Each relay is told when it opens, with its client's address (the one
    /// its slot counts against: behind a trusted proxy, the forwarded
    /// one), and told again when it ends, before its socket closes.
    #[tokio::test]
    async fn each_relay_is_told_with_its_client() {
        let hub_dev = device().await;
        let hub_addr = hub_dev.local_addr().unwrap();
        let opened = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let closed = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (o2, c2) = (opened.clone(), closed.clone());
        let hub = Arc::new(
            Hub::new(move || hub_addr)
                .unwrap()
                .on_relay_opened(move |relay, client| o2.lock().push((relay, client)))
                .on_relay_closed(move |relay| c2.lock().push(relay)),
        );
        // Straight from its client, and through a proxy on the host that
        // forwarded its client's (IPv4-mapped) address.
        let direct: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let forwarded: IpAddr = "::ffff:203.0.113.9".parse().unwrap();
        let proxy: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        let mut ends = Vec::new();
        for (client, source) in [(direct, direct.ip()), (proxy, forwarded)] {
            let slot = hub.try_slot(source).unwrap();
            let (near, far) = tokio::io::duplex(64);
            let h = hub.clone();
            tokio::spawn(async move { h.serve_ws(near, client, slot).await });
            ends.push(far);
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while opened.lock().len() < 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("both relays open");
        let mut told = opened.lock().clone();
        told.sort_by_key(|(_, c)| *c);
        let clients: Vec<IpAddr> = told.iter().map(|(_, c)| *c).collect();
        assert_eq!(
            clients,
            [direct.ip(), "203.0.113.9".parse::<IpAddr>().unwrap()]
        );
        assert!(told.iter().all(|(r, _)| r.ip().is_loopback()));
        assert_ne!(told[0].0, told[1].0);
        assert!(closed.lock().is_empty());
        hub.close_all();
        tokio::time::timeout(Duration::from_secs(5), async {
            while closed.lock().len() < 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("both relays end");
        let mut ended = closed.lock().clone();
        ended.sort();
        let mut relays: Vec<SocketAddr> = told.iter().map(|(r, _)| *r).collect();
        relays.sort();
        assert_eq!(ended, relays);
        drop(ends);
    }

    /// A peer whose endpoint moves to a third relay loses the one it
    /// moved to least recently (closed, counted as superseded, its address
    /// told); a move to an address that is no relay's closes nothing; other
    /// peers' relays stay; every relay is forgotten once closed.
    #[tokio::test]
    async fn a_peer_keeps_at_most_its_limit_of_relays() {
        // The hub's device: the peer a datagram's fifth byte names moves to
        // where it came from (as an authenticated datagram moves a peer's
        // endpoint, told once per move), and it is answered with transport
        // data (which proves the stream).
        let hub_dev = Arc::new(device().await);
        let hub_addr = hub_dev.local_addr().unwrap();
        let closed = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let closed2 = closed.clone();
        let hub = Arc::new(
            Hub::new(move || hub_addr)
                .unwrap()
                .on_relay_closed(move |a| closed2.lock().push(a)),
        );
        let moves = hub.moves();
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (dev, seen2, moves2) = (hub_dev.clone(), seen.clone(), moves.clone());
        tokio::spawn(async move {
            let mut at = std::collections::HashMap::new();
            let mut d = [0u8; 2048];
            while let Ok((n, from)) = dev.recv_from(&mut d).await {
                let peer = d[..n].get(4).copied().unwrap_or(0);
                if at.insert(peer, from) != Some(from) {
                    seen2.lock().push((peer, from));
                    moves2.moved([peer; 32], from);
                }
                let _ = dev.send_to(&message(4, 32), from).await;
            }
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        let h = hub.clone();
        tokio::spawn(async move {
            while let Ok((s, peer)) = l.accept().await {
                let h = h.clone();
                tokio::spawn(async move { h.serve(s, peer, Duration::from_secs(5)).await });
            }
        });
        // A datagram of `peer` through a node's stream is answered.
        async fn carries(node: &(UdpSocket, SocketAddr, Arc<Counters>), peer: u8) -> bool {
            let mut m = message(4, 32);
            m[4] = peer;
            node.0.send_to(&m, node.1).await.unwrap();
            let mut d = [0u8; 256];
            tokio::time::timeout(Duration::from_secs(5), node.0.recv_from(&mut d))
                .await
                .is_ok()
        }
        async fn until(what: &str, f: impl Fn() -> bool) {
            let done = tokio::time::timeout(Duration::from_secs(5), async {
                while !f() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
            assert!(done.await.is_ok(), "{what}");
        }
        let a1 = node_over_tls(at).await;
        assert!(carries(&a1, 1).await);
        let a2 = node_over_tls(at).await;
        assert!(carries(&a2, 1).await);
        let b1 = node_over_tls(at).await;
        assert!(carries(&b1, 2).await);
        assert_eq!(hub.places.lock().len(), (0, 3), "all proven");
        assert_eq!(hub.serving.lock().serving(&[1; 32]), 2);
        // Peer 1 on UDP, then back on its first stream: nothing closes.
        moves.moved([1; 32], "192.0.2.7:51820".parse().unwrap());
        assert!(carries(&a1, 1).await);
        assert_eq!(hub.counters.superseded.load(Relaxed), 0);
        // A third stream: the second, the one it was at least recently, is
        // closed.
        let a3 = node_over_tls(at).await;
        assert!(carries(&a3, 1).await);
        until("the second stream is closed", || {
            a2.2.open.load(Relaxed) == 0 && hub.counters.open.load(Relaxed) == 3
        })
        .await;
        assert_eq!(hub.counters.superseded.load(Relaxed), 1);
        let a2_relay = seen.lock()[1];
        assert_eq!(a2_relay.0, 1);
        until("its address is told", || {
            closed.lock().contains(&a2_relay.1)
        })
        .await;
        assert_eq!(hub.serving.lock().serving(&[1; 32]), 2);
        assert_eq!(hub.serving.lock().serving(&[2; 32]), 1);
        for (node, peer) in [(&a1, 1), (&a3, 1), (&b1, 2)] {
            assert_eq!(node.2.open.load(Relaxed), 1);
            assert!(carries(node, peer).await, "the others still carry");
        }
        assert_eq!(hub.places.lock().len(), (0, 3));
        hub.close_all();
        until("every relay ends", || hub.counters.open.load(Relaxed) == 0).await;
        assert!(hub.serving.lock().is_empty(), "every relay forgotten");
        assert_eq!(hub.counters.superseded.load(Relaxed), 1);
    }

    /// A TLS server without the ALPN is not taken for a hub.
    #[tokio::test]
    async fn a_server_without_the_alpn_is_refused() {
        let hub = Hub::new(|| "127.0.0.1:9".parse().unwrap()).unwrap();
        let mut cfg = (*hub.acceptor.config().clone()).clone();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let _ = acceptor.accept(s).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let e = connect(
            client_config().unwrap(),
            &Dial::Direct(at),
            "127.0.0.1",
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(
            e.to_string().contains("ALPN") || e.kind() == io::ErrorKind::InvalidData,
            "{e}"
        );
    }

    #[test]
    fn host_port() {
        assert_eq!(
            split_host_port("hub.example:443"),
            Some(("hub.example", 443))
        );
        assert_eq!(
            split_host_port("[2001:db8::1]:8443"),
            Some(("2001:db8::1", 8443))
        );
        assert_eq!(split_host_port("192.0.2.1:443"), Some(("192.0.2.1", 443)));
        assert_eq!(split_host_port("hub.example"), None);
        assert_eq!(split_host_port(":443"), None);
        assert_eq!(split_host_port("h:0"), None);
        assert_eq!(split_host_port("h:70000"), None);
    }
}
