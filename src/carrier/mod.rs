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
/// Most carried tunnels a hub holds at once (over TLS and WebSocket
/// together); beyond, new ones are refused (counted as failed). Each holds a
/// task, a loopback socket and its buffers for as long as it lives, which
/// a WebSocket one does after its HTTP connection has ended. (Neither holds
/// a slot of the proxy's `max_connections` once the carrier has it.)
pub const MAX_CARRIED: usize = 8192;
/// Carried tunnels open at once from one client address (an IPv6 client's
/// /64): a stranger cannot take every slot and shut out the nodes whose
/// networks let only TLS out, while a few hundred nodes behind one NAT still
/// fit.
pub const MAX_CARRIED_PER_SOURCE: usize = 256;

/// One carried tunnel's place: a slot of [`MAX_CARRIED`] and one of its
/// source's [`MAX_CARRIED_PER_SOURCE`], both given back when dropped.
pub struct CarrySlot {
    _all: tokio::sync::OwnedSemaphorePermit,
    _source: crate::per_source::SourceSlot,
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
    relay_ends(stream, udp, idle, first, c, framing, false).await
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
    relay_ends(stream, udp, idle, idle, c, framing, true).await
}

async fn relay_ends<S>(
    stream: S,
    udp: &UdpSocket,
    idle: Duration,
    first: Duration,
    c: &Counters,
    framing: Framing,
    stream_keeps: bool,
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
    /// One permit per carried tunnel ([`MAX_CARRIED`]).
    slots: Arc<tokio::sync::Semaphore>,
    /// Open tunnels per source ([`MAX_CARRIED_PER_SOURCE`]).
    per_source: Arc<crate::per_source::PerSource>,
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
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_CARRIED)),
            per_source: Arc::default(),
        })
    }

    /// A slot for one more carried tunnel from `client`, or `None` (counted
    /// as failed) when [`MAX_CARRIED`] are open, or
    /// [`MAX_CARRIED_PER_SOURCE`] from its address.
    pub fn try_slot(&self, client: std::net::IpAddr) -> Option<CarrySlot> {
        let s = self
            .per_source
            .take(
                crate::per_source::source_key(client),
                MAX_CARRIED_PER_SOURCE,
            )
            .and_then(|source| {
                let all = self.slots.clone().try_acquire_owned().ok()?;
                Some(CarrySlot {
                    _all: all,
                    _source: source,
                })
            });
        if s.is_none() {
            self.counters.failed.fetch_add(1, Relaxed);
        }
        s
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
        let Some(_slot) = self.try_slot(client.ip()) else {
            debug!(client = %client, "carried tunnel refused: the hub's or this address's limit is reached");
            return;
        };
        let tls = match tokio::time::timeout(handshake, self.acceptor.accept(io)).await {
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
        self.carry(tls, client, Framing::Length).await;
    }

    /// Serves one WebSocket carried tunnel (the hub's HTTP listener
    /// answered the opening request with 101, holding `slot` from
    /// [`Hub::try_slot`]) until it ends.
    pub async fn serve_ws<IO>(&self, io: IO, client: SocketAddr, slot: CarrySlot)
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        self.carry(io, client, Framing::WsHub).await;
        drop(slot);
    }

    async fn carry<IO>(&self, stream: IO, client: SocketAddr, framing: Framing)
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
        let mut stop = self.stop.subscribe();
        let t = Instant::now();
        let end = tokio::select! {
            e = relay_framed(stream, &udp, IDLE, FIRST, &self.counters, framing) => e,
            _ = stop.wait_for(|s| *s) => End::Stopped,
        };
        let secs = t.elapsed().as_secs();
        // Connections that never carried a message are not worth a line each.
        if end == End::Silent {
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
/// unless its hub has `websocket_ca`, and the ACME server's without
/// `directory_ca`.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

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
    /// `MAX_CARRIED_PER_SOURCE` slots; others still get theirs, and a
    /// dropped slot is given back.
    #[tokio::test]
    async fn one_source_cannot_take_every_slot() {
        let hub = Hub::new(|| "127.0.0.1:9".parse().unwrap()).unwrap();
        let a: std::net::IpAddr = "2001:db8:1:2::9".parse().unwrap();
        let mut held: Vec<CarrySlot> = (0..MAX_CARRIED_PER_SOURCE)
            .map(|_| hub.try_slot(a).unwrap())
            .collect();
        assert!(hub.try_slot(a).is_none());
        // Another address in the same /64 is the same source.
        assert!(hub.try_slot("2001:db8:1:2::77".parse().unwrap()).is_none());
        assert_eq!(hub.counters.failed.load(Relaxed), 2);
        let other = hub.try_slot("2001:db8:1:3::9".parse().unwrap());
        assert!(other.is_some());
        assert!(hub.try_slot("198.51.100.7".parse().unwrap()).is_some());
        held.pop();
        assert!(hub.try_slot(a).is_some());
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
