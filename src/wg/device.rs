//! The userspace WireGuard device: one TUN, one UDP socket per address family,
//! and a table of peers each driven by boringtun's sans-IO `Tunn`.
//!
//! The peer table is immutable once published and swapped atomically on change
//! (`ArcSwap`), so the per-packet path takes no table lock: it loads the table,
//! finds the peer by receiver index (incoming) or by longest-prefix match over
//! allowed IPs (outgoing), and locks only that peer's `Tunn`. Buffers are owned
//! by each loop and reused; nothing is allocated per packet.

use crate::keys::{PresharedKey, PrivateKey, PublicKey};
use crate::wg::allowed_ips::AllowedIps;
use crate::wg::handshake_limit::{self, HandshakeLimiter};
use crate::wg::liveness;
use crate::wg::packet::{self, Hop};
use crate::wg::staged::{self, Staged};
use crate::wg::stamp;
use crate::wg::uapi::{DeviceInfo, DeviceSet, PeerInfo, PeerSet};
use crate::wg::xlat::{peer_owner, Return, XlatPath};
use crate::xlat;
use arc_swap::ArcSwap;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use ipnet::IpNet;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

/// Largest datagram or IP packet handled.
pub const MAX_PACKET: usize = 65536;
/// WireGuard adds at most this much to a packet.
const OVERHEAD: usize = 32;
/// Handshake checks per second before the device answers with cookies. An
/// initiation is checked twice (here, before the Diffie-Hellman that finds its
/// peer, and again inside boringtun's `Tunn`), so this is 100 initiations a
/// second, boringtun's own device's limit.
const HANDSHAKE_RATE_LIMIT: u64 = 200;
/// Receive buffers per recvmmsg call (each may hold several GRO-coalesced datagrams).
const RECV_BUFS: usize = 8;
/// Most bytes in one GSO send (the UDP length field's limit, less headers).
const GSO_MAX: usize = 65_000;
/// Most datagrams in one GSO send (Linux's UDP_MAX_SEGMENTS on older kernels).
const GSO_MAX_SEGMENTS: usize = 64;

/// Consecutive datagrams for one peer, encrypted back to back in the send buffer.
#[derive(Default)]
struct Group {
    peer: Option<Arc<Peer>>,
    segment: Option<usize>,
    len: usize,
    count: usize,
}
/// Packets for the TUN, written as a batch after each read: `bufs[..*n]`,
/// each at `TUN_HEADROOM` in its buffer.
struct TunSink<'a> {
    bufs: &'a mut Vec<Vec<u8>>,
    n: &'a mut usize,
}

impl TunSink<'_> {
    /// Queues `p` (at `TUN_HEADROOM`); false when there is no room, or
    /// nothing to write (an empty buffer fails the offload TUN's whole
    /// batch).
    fn push(&mut self, p: &[u8]) -> bool {
        if p.is_empty() {
            return false;
        }
        if self.bufs.len() <= *self.n {
            self.bufs.push(Vec::with_capacity(2048));
        }
        let Some(b) = self.bufs.get_mut(*self.n) else {
            return false;
        };
        *self.n += 1;
        b.clear();
        b.resize(TUN_HEADROOM, 0);
        b.extend_from_slice(p);
        true
    }
}

/// Room in front of a packet for the virtio-net header of an offload TUN.
const TUN_HEADROOM: usize = 16;
/// Timer resolution: how often every peer's timers are updated.
const TICK: Duration = Duration::from_millis(250);

/// Why a packet was dropped (or, for `CookieSent`, answered with a cookie).
/// Each is a counter in `gatewire show`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    InvalidPacket,
    UnknownIndex,
    UnknownPeer,
    InvalidMac,
    DecryptFailed,
    /// A data packet for a session this side does not have (expired, or
    /// replaced by newer handshakes or a new `Tunn`: a peer still sending
    /// on a session this side let go), or a handshake response or cookie
    /// reply for a handshake this side is not waiting for (late or
    /// repeated). Refused before any decryption.
    StaleSession,
    Replay,
    /// A handshake initiation whose timestamp is not later than the last
    /// one accepted from its peer: the peer's clock is behind (or the
    /// initiation is replayed).
    StaleTimestamp,
    UnderLoad,
    CookieSent,
    /// A handshake carrying a cookie from a source past its share
    /// ([`handshake_limit`]): dropped before any Diffie-Hellman.
    HandshakeRateLimited,
    /// A decrypted packet whose source is not one of its peer's allowed IPs,
    /// or is one of the device's own addresses.
    SourceNotAllowed,
    NoRoute,
    NoEndpoint,
    /// A packet for a peer without a session that could not be held until
    /// a handshake gives it one ([`staged`]), or was held and given up.
    NoSession,
    NoKey,
    MalformedIp,
    TtlExpired,
    /// A packet from one peer for another, larger than the device's MTU.
    TooBig,
    TunWrite,
    /// A failed TUN read (the interface gone or broken), not a packet.
    TunRead,
    UdpSend,
    /// A failed receive on a UDP socket, not a packet.
    UdpRecv,
    /// Not a dropped packet but a refused roam: an authenticated datagram
    /// came from an address inside its peer's own allowed IPs.
    EndpointLoop,
    /// A packet from one peer for another that the device does not forward
    /// between peers (`[hub] node_to_node = "off"`).
    NodeToNode,
    Other,
}

impl DropReason {
    pub const ALL: [DropReason; 26] = [
        DropReason::InvalidPacket,
        DropReason::UnknownIndex,
        DropReason::UnknownPeer,
        DropReason::InvalidMac,
        DropReason::DecryptFailed,
        DropReason::StaleSession,
        DropReason::Replay,
        DropReason::StaleTimestamp,
        DropReason::UnderLoad,
        DropReason::CookieSent,
        DropReason::HandshakeRateLimited,
        DropReason::SourceNotAllowed,
        DropReason::NoRoute,
        DropReason::NoEndpoint,
        DropReason::NoSession,
        DropReason::NoKey,
        DropReason::MalformedIp,
        DropReason::TtlExpired,
        DropReason::TooBig,
        DropReason::TunWrite,
        DropReason::TunRead,
        DropReason::UdpSend,
        DropReason::UdpRecv,
        DropReason::EndpointLoop,
        DropReason::NodeToNode,
        DropReason::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::InvalidPacket => "invalid_packet",
            DropReason::UnknownIndex => "unknown_index",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::InvalidMac => "invalid_mac",
            DropReason::DecryptFailed => "decrypt_failed",
            DropReason::StaleSession => "stale_session",
            DropReason::Replay => "replay",
            DropReason::StaleTimestamp => "stale_timestamp",
            DropReason::UnderLoad => "under_load",
            DropReason::CookieSent => "cookie_sent",
            DropReason::HandshakeRateLimited => "handshake_rate_limited",
            DropReason::SourceNotAllowed => "source_not_allowed",
            DropReason::NoRoute => "no_route",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::NoSession => "no_session",
            DropReason::NoKey => "no_key",
            DropReason::MalformedIp => "malformed_ip",
            DropReason::TtlExpired => "ttl_expired",
            DropReason::TooBig => "too_big",
            DropReason::TunWrite => "tun_write",
            DropReason::TunRead => "tun_read",
            DropReason::UdpSend => "udp_send",
            DropReason::UdpRecv => "udp_recv",
            DropReason::EndpointLoop => "endpoint_loop",
            DropReason::NodeToNode => "node_to_node",
            DropReason::Other => "other",
        }
    }

    fn from_wg(e: &WireGuardError) -> Self {
        match e {
            WireGuardError::InvalidMac => DropReason::InvalidMac,
            WireGuardError::InvalidCounter | WireGuardError::DuplicateCounter => DropReason::Replay,
            WireGuardError::UnderLoad => DropReason::UnderLoad,
            WireGuardError::InvalidPacket | WireGuardError::IncorrectPacketLength => {
                DropReason::InvalidPacket
            }
            // An initiation whose static key is not the peer's.
            WireGuardError::WrongKey => DropReason::UnknownPeer,
            WireGuardError::WrongTai64nTimestamp => DropReason::StaleTimestamp,
            // Data whose session's slot is empty, or holds a newer session;
            // a response to no initiation in flight; a cookie reply for
            // an earlier handshake.
            WireGuardError::NoCurrentSession
            | WireGuardError::WrongIndex
            | WireGuardError::UnexpectedPacket => DropReason::StaleSession,
            WireGuardError::InvalidAeadTag
            | WireGuardError::InvalidTai64nTimestamp
            | WireGuardError::WrongPacketType => DropReason::DecryptFailed,
            _ => DropReason::Other,
        }
    }
}

/// Drop counters, one atomic per reason.
#[derive(Default)]
pub struct DropCounters([AtomicU64; DropReason::ALL.len()]);

impl DropCounters {
    #[inline]
    pub fn inc(&self, r: DropReason) {
        self.add(r, 1);
    }
    #[inline]
    pub fn add(&self, r: DropReason, n: u64) {
        if let Some(c) = self.0.get(r as usize) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }
    pub fn get(&self, r: DropReason) -> u64 {
        self.0
            .get(r as usize)
            .map(|c| c.load(Ordering::Relaxed))
            .unwrap_or(0)
    }
    pub fn snapshot(&self) -> std::collections::BTreeMap<String, u64> {
        DropReason::ALL
            .iter()
            .map(|r| (r.as_str().to_string(), self.get(*r)))
            .collect()
    }
}

/// What kind of daemon owns the device (reported by `gatewire show`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Hub,
    Node,
    Wg,
}

/// What the device does with a decrypted packet from one peer whose
/// destination belongs to another (`[hub] node_to_node`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum NodeToNode {
    /// Encrypted again and sent to that peer inside the device: the host's
    /// kernel never sees it (a hub's default).
    #[default]
    Direct,
    /// Written to the TUN like any other packet: the kernel routes it back
    /// into the TUN (when it forwards) and its firewall decides. A node's
    /// and a `wg` device's choice, as they do not forward between peers.
    Kernel,
    /// Dropped and counted (`node_to_node`).
    Off,
}

impl NodeToNode {
    /// The names `[hub] node_to_node` takes.
    pub const NAMES: [&'static str; 3] = ["direct", "kernel", "off"];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "direct" => Some(NodeToNode::Direct),
            "kernel" => Some(NodeToNode::Kernel),
            "off" => Some(NodeToNode::Off),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NodeToNode::Direct => "direct",
            NodeToNode::Kernel => "kernel",
            NodeToNode::Off => "off",
        }
    }

    fn to_u8(self) -> u8 {
        self as u8
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => NodeToNode::Kernel,
            2 => NodeToNode::Off,
            _ => NodeToNode::Direct,
        }
    }
}

/// The host parts of the device's own TUN addresses: packets for them are
/// the host's, whatever a peer's allowed IPs say, and no peer may send from
/// them. A handful at most, so a linear scan.
#[derive(Debug, Default)]
struct OwnAddrs(Vec<IpAddr>);

impl OwnAddrs {
    fn new(nets: &[IpNet]) -> Self {
        let mut v: Vec<IpAddr> = nets.iter().map(|n| n.addr()).collect();
        v.sort_unstable();
        v.dedup();
        OwnAddrs(v)
    }

    #[inline]
    fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip)
    }
}

/// Relays remembered at most in [`Carried`] (a hub's carrier holds far
/// fewer open at once).
const MAX_RELAYS: usize = 65_536;

/// The clients of a hub's carried tunnels (TLS, WebSocket) by their relays'
/// loopback addresses, as the carrier tells them ([`Inner::relay_opened`]):
/// a handshake through a relay counts as its client's ([`Carried::source`]).
#[derive(Debug, Default)]
struct Carried(RwLock<HashMap<SocketAddr, IpAddr>>);

/// A relay's address as [`Carried`] knows it (an IPv4-mapped address is its
/// IPv4 one).
fn relay_key(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

impl Carried {
    fn opened(&self, relay: SocketAddr, client: IpAddr) {
        let relay = relay_key(relay);
        let mut m = self.0.write();
        if m.len() < MAX_RELAYS || m.contains_key(&relay) {
            m.insert(relay, client.to_canonical());
        }
    }

    fn closed(&self, relay: SocketAddr) {
        self.0.write().remove(&relay_key(relay));
    }

    /// The source a datagram from `from` counts as in the handshake checks
    /// (its bucket, and the address its cookie binds to): for an initiation
    /// or a response through a carried tunnel's relay, the tunnel's client
    /// (with the relay's port), so that one client's carried connections
    /// share one bucket and a cookie given through one relay proves that
    /// client's address, not loopback's; else `from`. Other messages take
    /// no look.
    fn source(&self, datagram: &[u8], from: SocketAddr) -> SocketAddr {
        if !matches!(datagram.first(), Some(1 | 2)) || !from.ip().to_canonical().is_loopback() {
            return from;
        }
        match self.0.read().get(&relay_key(from)) {
            Some(client) => SocketAddr::new(*client, from.port()),
            None => from,
        }
    }
}

/// Where a decrypted packet from a peer goes ([`place`]).
enum Place<'t> {
    Tun,
    /// Another peer's, written to the TUN for the kernel to route back
    /// (`NodeToNode::Kernel`) as it is: not for the translator.
    Kernel,
    Peer(&'t Arc<Peer>),
    Drop(DropReason),
}

/// Whose packet the translator made its output from ([`place_translated`]).
#[derive(Clone, Copy)]
struct Origin<'a> {
    /// The peer's; `None`: one read from the TUN.
    peer: Option<&'a Arc<Peer>>,
    /// `[hub] node_to_node`, as read for that packet.
    forward: NodeToNode,
}

/// Decides where a decrypted packet from `from` with source `src` and
/// destination `dst` goes: cryptokey routing first (the source must be one
/// of `from`'s allowed IPs and none of the device's own addresses), then
/// the device's own addresses (always the TUN's), then another peer's as
/// `forward` says. `dst` is `None` for an IPv4 packet whose total length
/// leaves no whole header (the tunnel cuts a packet to that length, down
/// to nothing): it is dropped.
fn place<'t>(
    table: &'t Table,
    own: &OwnAddrs,
    forward: NodeToNode,
    from: &Arc<Peer>,
    src: IpAddr,
    dst: Option<IpAddr>,
) -> Place<'t> {
    let owner = table.routes.lookup(src);
    if !owner.is_some_and(|o| Arc::ptr_eq(o, from)) || own.contains(src) {
        return Place::Drop(DropReason::SourceNotAllowed);
    }
    let Some(dst) = dst else {
        return Place::Drop(DropReason::MalformedIp);
    };
    if own.contains(dst) {
        return Place::Tun;
    }
    match table.routes.lookup(dst) {
        Some(to) if !Arc::ptr_eq(to, from) => between_peers(forward, to),
        _ => Place::Tun,
    }
}

/// A packet from one peer for another peer `to`, as `forward` says.
#[inline]
fn between_peers(forward: NodeToNode, to: &Arc<Peer>) -> Place<'_> {
    match forward {
        NodeToNode::Off => Place::Drop(DropReason::NodeToNode),
        NodeToNode::Kernel => Place::Kernel,
        NodeToNode::Direct => Place::Peer(to),
    }
}

/// Decides where a packet the translator made, for `dst`, goes. `from`:
/// the peer whose packet it was made from ([`place`] let that one through,
/// to the translator), or `None` for one read from the TUN (the host's
/// kernel routed it, and has decided). The TUN's own addresses are the
/// TUN's; the peer it came from takes its own (an ICMP error back to it, a
/// hairpin); for another peer, the translated packet goes where an
/// untranslated one would ([`place`]), `Kernel` handing it to the TUN in
/// its translated form. Anything else goes to the TUN.
fn place_translated<'t>(
    table: &'t Table,
    own: &OwnAddrs,
    forward: NodeToNode,
    from: Option<&Arc<Peer>>,
    dst: Option<IpAddr>,
) -> Place<'t> {
    let Some(dst) = dst else {
        return Place::Tun;
    };
    if own.contains(dst) {
        return Place::Tun;
    }
    match (table.routes.lookup(dst), from) {
        (None, _) => Place::Tun,
        (Some(to), Some(f)) if !Arc::ptr_eq(to, f) => between_peers(forward, to),
        (Some(to), _) => Place::Peer(to),
    }
}

/// Whether a packet from the peer `from` that goes to the TUN would come
/// back out of it through the translator to another peer: the translated
/// ranges are routed onto the TUN, so the host's kernel hands it straight
/// back (`back`: where the translator then sends it, from
/// [`XlatPath::returns`]). Pool4 counts as another peer's: its NAT64
/// sessions are opened by nodes (or hosts on the hub's side, which reach
/// nodes directly), and what a node sends there can only be for one of
/// them. The device asks with `node_to_node = "off"` only.
fn returns_to_another(table: &Table, from: &Arc<Peer>, back: Option<Return>) -> bool {
    match back {
        None => false,
        Some(Return::Pool4) => true,
        Some(Return::To(a)) => table
            .routes
            .lookup(IpAddr::V6(a))
            .is_some_and(|to| !Arc::ptr_eq(to, from)),
    }
}

/// A peer as configured.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub name: Option<String>,
    pub public_key: PublicKey,
    pub preshared_key: Option<PresharedKey>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    pub allowed_ips: Vec<IpNet>,
}

/// Everything needed to bring a device up.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub name: String,
    pub mode: Mode,
    pub private_key: Option<PrivateKey>,
    pub listen_port: u16,
    /// Addresses (with their prefixes) put on the TUN; the prefixes become routes.
    pub addresses: Vec<IpNet>,
    pub mtu: u16,
    /// What becomes of packets between peers: a hub forwards them inside the
    /// device (`Direct`) unless configured otherwise; a node leaves them to
    /// the kernel (`Kernel`).
    pub forward: NodeToNode,
    /// Keepalive the device sends to every peer it has heard from recently, in
    /// seconds (0: off). Unlike WireGuard's persistent keepalive it does not make
    /// the device initiate handshakes towards peers that are gone.
    pub keepalive: u16,
    pub peers: Vec<PeerConfig>,
    /// SIIT translation on the data path (hub mode), see `wg::xlat`.
    pub xlat: Option<Arc<xlat::Config>>,
    /// Stateful NAT64 behind the translator (needs `xlat`).
    pub nat64: Option<xlat::nat64::Settings>,
    /// IPv4 destinations, besides the EAM ranges, that the translator takes
    /// from the TUN and maps through pool6.
    pub xlat_via_pool6: Vec<ipnet::Ipv4Net>,
    /// Most ICMP errors the translator generates per second (0: none).
    pub xlat_icmp_rate: u32,
}

/// Where a peer is, and which of this side's addresses it last reached
/// (`local`, kept on a hub only): replies leave from that address, as kernel
/// WireGuard's do, so that a peer behind a NAT or a stateful firewall that reached a hub's
/// second address gets its answers from that address, not the one the
/// kernel would pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Endpoint {
    addr: SocketAddr,
    local: Option<IpAddr>,
}

/// One peer: its `Tunn`, endpoint and counters.
pub struct Peer {
    name: Mutex<Option<String>>,
    pub public_key: PublicKey,
    index: u32,
    tunn: Mutex<Tunn>,
    /// The clocks when `tunn` was made: its handshake timestamps are the
    /// wall clock then plus the monotonic time since (see `wg::stamp`).
    /// Written with `tunn` locked.
    stamp_base: Mutex<stamp::Base>,
    /// Handshake initiations sent since the peer was last heard from (an
    /// authenticated datagram) or `tunn` was made.
    unanswered: AtomicU32,
    /// `tunn` replaced another ([`Peer::install`]) and the peer has not
    /// proved itself to it since (see [`Peer::receive`]). Written with
    /// `tunn` locked.
    replaced: AtomicBool,
    endpoint: RwLock<Option<Endpoint>>,
    preshared_key: Mutex<Option<PresharedKey>>,
    persistent_keepalive: AtomicU32,
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
    /// Milliseconds since device start of the last authenticated packet received.
    last_rx_ms: AtomicU64,
    /// Milliseconds since device start of the last authenticated packet
    /// received that proves the path works both ways (see
    /// [`Peer::last_two_way_ms`]).
    last_two_way_ms: AtomicU64,
    /// This side's answers to the peer's initiations, until it uses one.
    answers: liveness::Answers,
    /// Milliseconds since device start of the last packet sent.
    last_tx_ms: AtomicU64,
    /// Milliseconds since device start of the last device keepalive tried
    /// (sent or not).
    keepalive_tried_ms: AtomicU64,
    /// Packets waiting for a session (see [`Peer::seal`]).
    staged: Staged,
    /// Packets from this peer whose source was outside its allowed IPs.
    src_not_allowed: AtomicU64,
    /// A refused roam into its own allowed IPs has been logged (since the
    /// last roam that was not refused).
    loop_warned: AtomicBool,
    /// Initiations from this peer refused as stale (`stale_timestamp`).
    stale_timestamp: AtomicU64,
    /// Milliseconds since device start of the last warning about a stale
    /// initiation from this peer, plus one (0: never).
    stale_warned_ms: AtomicU64,
    /// Until then (milliseconds since device start) the initiations the
    /// peer's timers make are not sent ([`Peer::hold_initiations`]).
    initiations_held_until_ms: AtomicU64,
}

impl Peer {
    fn new(
        public_key: PublicKey,
        index: u32,
        tunn: Tunn,
        stamp_base: stamp::Base,
        preshared_key: Option<PresharedKey>,
        persistent_keepalive: u16,
        pool: Arc<staged::Pool>,
    ) -> Self {
        Peer {
            name: Mutex::new(None),
            public_key,
            index,
            tunn: Mutex::new(tunn),
            stamp_base: Mutex::new(stamp_base),
            unanswered: AtomicU32::new(0),
            replaced: AtomicBool::new(false),
            endpoint: RwLock::new(None),
            preshared_key: Mutex::new(preshared_key),
            persistent_keepalive: AtomicU32::new(u32::from(persistent_keepalive)),
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            last_rx_ms: AtomicU64::new(0),
            last_two_way_ms: AtomicU64::new(0),
            answers: liveness::Answers::default(),
            last_tx_ms: AtomicU64::new(0),
            keepalive_tried_ms: AtomicU64::new(0),
            staged: Staged::new(pool),
            src_not_allowed: AtomicU64::new(0),
            loop_warned: AtomicBool::new(false),
            stale_timestamp: AtomicU64::new(0),
            stale_warned_ms: AtomicU64::new(0),
            initiations_held_until_ms: AtomicU64::new(0),
        }
    }
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint.read().map(|e| e.addr)
    }
    /// Sets a configured endpoint: the local address is the kernel's
    /// choice until the peer is heard.
    pub fn set_endpoint(&self, e: SocketAddr) {
        if self.endpoint() != Some(e) {
            *self.endpoint.write() = Some(Endpoint {
                addr: e,
                local: None,
            });
        }
    }
    /// Where an authenticated datagram came from and the address it was
    /// sent to (the caller has seen that they changed).
    fn set_route(&self, e: Endpoint) {
        *self.endpoint.write() = Some(e);
    }
    /// The local address is no longer this side's (it was removed): the
    /// kernel chooses again.
    fn forget_local(&self) {
        if let Some(e) = self.endpoint.write().as_mut() {
            e.local = None;
        }
    }
    fn route(&self) -> Option<Endpoint> {
        *self.endpoint.read()
    }
    /// Forgets the endpoint if it is still `addr` (an IPv4-mapped address
    /// is its IPv4 one): whether it was.
    pub fn forget_endpoint_at(&self, addr: SocketAddr) -> bool {
        let same = |e: &SocketAddr| {
            e.port() == addr.port() && e.ip().to_canonical() == addr.ip().to_canonical()
        };
        // Every peer is asked when a relay closes: a write lock only for
        // the one (if any) at that address.
        if !self.endpoint.read().as_ref().is_some_and(|e| same(&e.addr)) {
            return false;
        }
        let mut ep = self.endpoint.write();
        if ep.as_ref().is_some_and(|e| same(&e.addr)) {
            *ep = None;
            true
        } else {
            false
        }
    }
    pub fn name(&self) -> Option<String> {
        self.name.lock().clone()
    }
    pub fn set_name(&self, name: Option<String>) {
        *self.name.lock() = name;
    }
    fn keepalive(&self) -> u16 {
        self.persistent_keepalive.load(Ordering::Relaxed) as u16
    }
    /// Milliseconds since the device started at which the last authenticated
    /// packet arrived (0: never).
    pub fn last_rx_ms(&self) -> u64 {
        self.last_rx_ms.load(Ordering::Relaxed)
    }
    /// Milliseconds since the device started at which the last authenticated
    /// packet arrived that shows the path works both ways (0: never, or
    /// while the peer leaves this side's answers to its initiations unused,
    /// or this side's initiations unanswered):
    /// a handshake response or a session datagram, not an initiation (see
    /// `wg::liveness`). What liveness checks read.
    pub fn last_two_way_ms(&self) -> u64 {
        if !self.answers.confirmed() {
            return 0;
        }
        self.last_two_way_ms.load(Ordering::Relaxed)
    }
    /// Holds back the handshake initiations the peer's timers make
    /// (boringtun retries one 5 s after the last, for 90 s, and a
    /// persistent keepalive starts a new handshake) until `until_ms`
    /// (milliseconds since device start; 0: none held): a node's supervisor
    /// paces its own retries to a silent hub, jittered and backing off,
    /// sends them itself ([`Inner::force_handshake`], never held), and
    /// holds the timers' until its next. An initiation the peer's data
    /// starts (at most one per handshake boringtun starts) is not held; the
    /// supervisor ends the hold when the hub is heard, so a live session's
    /// rekeys go as ever.
    pub fn hold_initiations(&self, until_ms: u64) {
        self.initiations_held_until_ms
            .store(until_ms, Ordering::Relaxed);
    }

    /// Whether `datagram`, which the peer's timers made at `now_ms`, is an
    /// initiation held back ([`Peer::hold_initiations`]).
    fn held(&self, datagram: &[u8], now_ms: u64) -> bool {
        now_ms < self.initiations_held_until_ms.load(Ordering::Relaxed)
            && stamp::is_initiation(datagram)
    }

    /// Counts the handshake initiations among `datagrams`, just sent; how
    /// many there were.
    fn count_initiations<'a>(&self, datagrams: impl Iterator<Item = &'a [u8]>) -> u32 {
        let n = u32::try_from(datagrams.filter(|d| stamp::is_initiation(d)).count())
            .unwrap_or(u32::MAX);
        if n > 0 {
            self.unanswered.fetch_add(n, Ordering::Relaxed);
        }
        n
    }
    /// Puts `tunn`, made when the clocks read `base`, in place of the
    /// `Tunn` the caller holds locked as `slot`.
    fn install(&self, slot: &mut Tunn, tunn: Tunn, base: stamp::Base) {
        *slot = tunn;
        *self.stamp_base.lock() = base;
        self.replaced.store(true, Ordering::Relaxed);
        self.unanswered.store(0, Ordering::Relaxed);
        self.answers.reset();
    }
    /// Hands `datagram` to the peer's `Tunn` (`source`: the address a
    /// handshake's cookie binds to), what it gives written into `out`: the
    /// outcome, whether the datagram authenticates ([`authenticates`]), and
    /// whether it may move the peer's endpoint. An answered initiation may
    /// not while the `Tunn` is a replacement the peer has not proved itself
    /// to: a new `Tunn` forgot the last timestamp accepted, so it answers
    /// an initiation recorded long ago, sent again from anywhere. A
    /// response or a session datagram (`liveness::proves_two_way`) proves
    /// the peer.
    fn receive(&self, datagram: &[u8], source: IpAddr, out: &mut [u8]) -> (Out, bool, bool) {
        let mut t = self.tunn.lock();
        let base = out.as_ptr() as usize;
        let r = classify(base, t.decapsulate(Some(source), datagram, out));
        let authenticated = authenticates(datagram, &r, out);
        // Under the lock `install` takes: a datagram of the old `Tunn`
        // proves nothing to the new one.
        let roams = authenticated
            && if liveness::proves_two_way(datagram) {
                if self.replaced.load(Ordering::Relaxed) {
                    self.replaced.store(false, Ordering::Relaxed);
                }
                true
            } else {
                !self.replaced.load(Ordering::Relaxed)
            };
        drop(t);
        (r, authenticated, roams)
    }
    /// Encrypts `pkt` into `dst` on the current session of `t`, the
    /// peer's `Tunn` (locked by the caller). Without one, `Tunn::encapsulate`
    /// would keep a copy of the packet itself, uncounted (up to 256 of
    /// them, of any size, let go without a word 90 s later): instead the
    /// packet is staged here, bounded, or counted as `no_session`
    /// ([`staged`]), and a handshake starts (its initiation is what `dst`
    /// then holds; nothing when one is under way, as `encapsulate` does). A
    /// keepalive (empty) is not staged: the handshake stands for it.
    fn seal<'a>(&self, t: &mut Tunn, pkt: &[u8], dst: &'a mut [u8], now_ms: u64) -> TunnResult<'a> {
        // The test `encapsulate` makes: the current session's slot is filled.
        if t.time_since_last_handshake().is_some() {
            return t.encapsulate(pkt, dst);
        }
        if !pkt.is_empty() {
            self.staged.push(pkt, now_ms);
        }
        t.format_handshake_initiation(dst, false)
    }
    /// The oldest staged packet, encrypted into `dst` on the current
    /// session of `t` (the peer's `Tunn`, locked by the caller); `None`
    /// without a session, or with nothing staged.
    fn unstage<'a>(&self, t: &mut Tunn, dst: &'a mut [u8]) -> Option<TunnResult<'a>> {
        if !self.staged.pending() || t.time_since_last_handshake().is_none() {
            return None;
        }
        let p = self.staged.pop()?;
        // Never the case (a staged packet came from a buffer no larger
        // than the device's), but `encapsulate` would panic.
        if p.len() + OVERHEAD > dst.len() {
            return Some(TunnResult::Err(WireGuardError::DestinationBufferTooSmall));
        }
        Some(t.encapsulate(&p, dst))
    }
    /// Whether the device keepalive (one every `every_ms`) is due at
    /// `now_ms`: the peer was heard from within the session lifetime (so
    /// the device never chases peers that left), and nothing was sent to it,
    /// nor a keepalive tried, for `every_ms`. A due keepalive counts as tried,
    /// whether it goes out or not (the peer may have no endpoint).
    fn keepalive_due(&self, now_ms: u64, every_ms: u64) -> bool {
        let rx = self.last_rx_ms();
        let since = |t: &AtomicU64| now_ms.saturating_sub(t.load(Ordering::Relaxed));
        let due = every_ms > 0
            && rx > 0
            && now_ms.saturating_sub(rx) < 180_000
            && since(&self.last_tx_ms) >= every_ms
            && since(&self.keepalive_tried_ms) >= every_ms;
        if due {
            self.keepalive_tried_ms.store(now_ms, Ordering::Relaxed);
        }
        due
    }
    fn last_handshake(&self) -> Option<Duration> {
        let (since, ..) = self.tunn.lock().stats();
        let since = since?;
        crate::clock::since_epoch()?.checked_sub(since)
    }
}

/// The immutable peer table, replaced as a whole on every change.
#[derive(Default, Clone)]
struct Table {
    by_key: HashMap<PublicKey, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    /// Written only through [`Table::claim`] and [`Table::clear_routes`],
    /// which keep `owned` in step.
    routes: AllowedIps<Arc<Peer>>,
    /// The prefixes of `routes` each peer holds, so that replacing or
    /// removing one peer's touches only those (not the whole table).
    owned: HashMap<PublicKey, Arc<[IpNet]>>,
}

/// The static key and what derives from it.
struct KeyState {
    private: PrivateKey,
    secret: x25519_dalek::StaticSecret,
    public: x25519_dalek::PublicKey,
    rate_limiter: Arc<RateLimiter>,
}

impl KeyState {
    fn new(private: PrivateKey) -> Self {
        let secret = private.secret();
        let public = x25519_dalek::PublicKey::from(&secret);
        let rate_limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        Self {
            private,
            secret,
            public,
            rate_limiter,
        }
    }
}

/// A UDP socket with its segmentation offload state (GSO on send, GRO on receive).
pub(crate) struct Udp {
    sock: UdpSocket,
    state: quinn_udp::UdpSocketState,
}

impl Udp {
    fn new(sock: UdpSocket) -> io::Result<Udp> {
        let state = quinn_udp::UdpSocketState::new((&sock).into())?;
        // As kernel WireGuard does: a full-size datagram on a path with a
        // smaller MTU (PPPoE, 1460-byte clouds) is fragmented, not lost.
        crate::sockopt::allow_fragments(&sock, sock.local_addr()?.is_ipv6())?;
        Ok(Udp { sock, state })
    }

    /// Sends `contents` to `to`, as datagrams of `segment` bytes each (the last
    /// may be shorter) when `segment` is given.
    async fn send(&self, to: Endpoint, contents: &[u8], segment: Option<usize>) -> io::Result<()> {
        let t = quinn_udp::Transmit {
            destination: to.addr,
            ecn: None,
            contents,
            segment_size: segment.filter(|s| *s < contents.len()),
            src_ip: to.local,
        };
        loop {
            let r = self.sock.try_io(tokio::io::Interest::WRITABLE, || {
                self.state.try_send((&self.sock).into(), &t)
            });
            match r {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.sock.writable().await?,
                r => return r,
            }
        }
    }

    /// Sends one datagram to `to` now, or fails with `WouldBlock` when the
    /// socket's buffer is full: for cookie replies, which must not hold up
    /// the receive loop. When `to.local` is no longer this side's address,
    /// it goes once more from the kernel's choice.
    fn try_send(&self, to: Endpoint, contents: &[u8]) -> io::Result<()> {
        let once = |to: Endpoint| {
            let t = quinn_udp::Transmit {
                destination: to.addr,
                ecn: None,
                contents,
                segment_size: None,
                src_ip: to.local,
            };
            self.sock.try_io(tokio::io::Interest::WRITABLE, || {
                self.state.try_send((&self.sock).into(), &t)
            })
        };
        match once(to) {
            Err(e)
                if to.local.is_some()
                    && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EADDRNOTAVAIL)) =>
            {
                once(Endpoint { local: None, ..to })
            }
            r => r,
        }
    }
}

/// Sends on `udp` to `ep`. When the local address `ep` names is no longer
/// this side's (the send fails with EINVAL or EADDRNOTAVAIL), `peer` forgets
/// it and the datagrams go once more, from the kernel's choice.
async fn send_from(
    peer: &Peer,
    udp: &Udp,
    ep: Endpoint,
    contents: &[u8],
    segment: Option<usize>,
) -> io::Result<()> {
    match udp.send(ep, contents, segment).await {
        Err(e)
            if ep.local.is_some()
                && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EADDRNOTAVAIL)) =>
        {
            debug!(local = ?ep.local, error = %e, "sending from the peer's local address failed: the kernel chooses");
            peer.forget_local();
            let ep = Endpoint { local: None, ..ep };
            udp.send(ep, contents, segment).await
        }
        r => r,
    }
}

struct Sockets {
    v4: Option<Arc<Udp>>,
    v6: Option<Arc<Udp>>,
    port: u16,
}

impl Sockets {
    /// Marks what both sockets send with `mark` (0: no mark).
    fn set_mark(&self, mark: u32) -> io::Result<()> {
        for u in [&self.v4, &self.v6].into_iter().flatten() {
            crate::sockopt::set_mark(&u.sock, mark)?;
        }
        Ok(())
    }

    fn for_addr(&self, a: &SocketAddr) -> Option<&Arc<Udp>> {
        match a {
            SocketAddr::V4(_) => self.v4.as_ref(),
            SocketAddr::V6(_) => self.v6.as_ref(),
        }
    }
}

/// Shared state of a running device.
pub struct Inner {
    pub name: String,
    pub mode: Mode,
    /// [`NodeToNode`], changed on a reload.
    forward: AtomicU8,
    /// The TUN's own addresses (they change only with a restart).
    own: Arc<OwnAddrs>,
    keepalive: AtomicU32,
    tun: tun_rs::AsyncDevice,
    /// The TUN was opened with virtio-net headers: reads may be TSO super-packets
    /// (split in userspace) and writes are GRO-coalesced.
    offload: bool,
    table: ArcSwap<Table>,
    key: ArcSwap<Option<KeyState>>,
    sockets: ArcSwap<Sockets>,
    recv_tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Serialises configuration changes (readers never wait on it).
    config_lock: tokio::sync::Mutex<()>,
    next_index: AtomicU32,
    fwmark: AtomicU32,
    pub drops: Arc<DropCounters>,
    /// The bytes the peers' staged packets may take, together.
    staging: Arc<staged::Pool>,
    /// The TUN's MTU: a packet from one peer for another is no larger.
    mtu: usize,
    /// Handshakes carrying a cookie, per source and in all
    /// ([`handshake_limit`]).
    handshake_limit: Mutex<HandshakeLimiter>,
    /// Milliseconds since start of the last warning that the device's
    /// handshake budget was spent, plus one (0: never).
    budget_warned_ms: AtomicU64,
    /// The clients of the carried tunnels' relays.
    carried: Carried,
    /// Handshakes completed: initiations answered and responses accepted.
    handshakes: AtomicU64,
    start: Instant,
    /// The translator, when the device runs one.
    xlat: Option<XlatPath>,
    /// Prefixes the kernel routes into this TUN, as far as the daemon knows
    /// (its address prefixes, the routes it added); empty in `wg` mode.
    tun_routes: RwLock<Vec<IpNet>>,
    /// Set when the TUN interface is gone (deleted under the daemon): the
    /// device can do nothing more, and the daemon ends ([`Inner::lost`]).
    tun_lost: tokio::sync::watch::Sender<bool>,
    /// Held while a peer change and the kernel routes that follow it are
    /// made (a config reload's, the control plane's): one's view of the
    /// routed prefixes is not overtaken by the other's.
    pub route_lock: tokio::sync::Mutex<()>,
    /// Told of each move of a peer's endpoint ([`Inner::on_endpoint_moved`]).
    endpoint_moved: std::sync::OnceLock<EndpointMoved>,
}

/// What [`Inner::on_endpoint_moved`] calls.
type EndpointMoved = Box<dyn Fn(&PublicKey, SocketAddr) + Send + Sync>;

/// A running device. Dropping it stops its tasks and removes the TUN.
pub struct Device {
    pub inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Device {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.inner.recv_tasks.lock().iter() {
            t.abort();
        }
    }
}

/// Receive and send buffer asked for on the WireGuard UDP sockets.
const UDP_BUFFER: usize = 4 << 20;

fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let domain = match addr {
        SocketAddr::V4(_) => socket2::Domain::IPV4,
        SocketAddr::V6(_) => socket2::Domain::IPV6,
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    // Room for bursts: a full TCP window of datagrams in each direction.
    let (rx, tx) = crate::sockopt::grow_buffers(&s, UDP_BUFFER);
    // The kernel reports twice what it granted.
    if rx / 2 < UDP_BUFFER || tx / 2 < UDP_BUFFER {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            warn!(
                receive = rx / 2,
                send = tx / 2,
                wanted = UDP_BUFFER,
                "UDP socket buffers smaller than wanted: bursts may be dropped (without CAP_NET_ADMIN, raise net.core.rmem_max and wmem_max)"
            );
        });
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// Binds IPv4 and IPv6 sockets on `port` (0: a random port, the same for both).
/// At least one family must succeed.
fn bind_pair(port: u16) -> io::Result<Sockets> {
    let v4 = bind_udp(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    let port = match &v4 {
        Ok(s) => s.local_addr()?.port(),
        Err(_) => port,
    };
    let v6 = bind_udp(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port));
    let port = match (&v4, &v6) {
        (Err(e), Err(_)) => return Err(io::Error::new(e.kind(), e.to_string())),
        (Err(_), Ok(s)) => s.local_addr()?.port(),
        _ => port,
    };
    if let Err(e) = &v6 {
        debug!(error = %e, "no IPv6 UDP socket");
    }
    Ok(Sockets {
        v4: v4.ok().map(Udp::new).transpose()?.map(Arc::new),
        v6: v6.ok().map(Udp::new).transpose()?.map(Arc::new),
        port,
    })
}

/// Splits what one read from an offload TUN returned (virtio-net header, then
/// the packet) into plain packets in `bufs`, as tun-rs's `recv_multiple` does
/// after its read: completes a partial checksum, cuts a super-packet into
/// segments (with tun-rs's own `gso_split`, public though left out of its
/// documentation).
fn split_virtio(frame: &mut [u8], bufs: &mut [Vec<u8>], sizes: &mut [usize]) -> io::Result<usize> {
    use xlat::gso::{F_NEEDS_CSUM, GSO_ECN, GSO_NONE, VNET_HDR_LEN};
    let bad = |what: &'static str| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut hdr = tun_rs::VirtioNetHdr::decode(frame)?;
    let pkt = frame
        .get_mut(VNET_HDR_LEN..)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| bad("TUN read shorter than its virtio-net header"))?;
    let start = usize::from(hdr.csum_start);
    if hdr.gso_type == GSO_NONE {
        if hdr.flags & F_NEEDS_CSUM != 0 {
            // The field holds the pseudo-header sum: add the rest, complement.
            let at = start + usize::from(hdr.csum_offset);
            let field = pkt
                .get_mut(at..at + 2)
                .ok_or_else(|| bad("checksum field beyond the packet"))?;
            let mut partial = [0u8; 2];
            partial.copy_from_slice(field);
            field.fill(0);
            let sum = xlat::csum::sum(pkt.get(start..).unwrap_or(&[]));
            let c = !xlat::csum::fold(xlat::csum::add(u16::from_be_bytes(partial).into(), sum));
            if let Some(field) = pkt.get_mut(at..at + 2) {
                field.copy_from_slice(&c.to_be_bytes());
            }
        }
        let (Some(b), Some(s)) = (bufs.first_mut(), sizes.first_mut()) else {
            return Ok(0);
        };
        b.get_mut(..pkt.len())
            .ok_or_else(|| bad("TUN packet larger than the buffer"))?
            .copy_from_slice(pkt);
        *s = pkt.len();
        return Ok(1);
    }
    let is_v6 = match pkt.first().map(|b| b >> 4) {
        Some(4) => false,
        Some(6) => true,
        _ => return Err(bad("GSO packet is neither IPv4 nor IPv6")),
    };
    // The kernel's hdr_len is only a hint (the whole first segment when it
    // forwards): take the transport header's length instead.
    let l4 = if hdr.gso_type & !GSO_ECN == tun_rs::VIRTIO_NET_HDR_GSO_UDP_L4 {
        8
    } else {
        let doff = pkt
            .get(start + 12)
            .ok_or_else(|| bad("GSO packet too short"))?;
        let thl = usize::from(doff >> 4) * 4;
        if !(20..=60).contains(&thl) {
            return Err(bad("GSO packet with a bad TCP header length"));
        }
        thl
    };
    hdr.hdr_len = u16::try_from(start + l4).map_err(|_| bad("GSO header too long"))?;
    if pkt.len() < usize::from(hdr.hdr_len) {
        return Err(bad("GSO packet shorter than its headers"));
    }
    tun_rs::gso_split(pkt, hdr, bufs, sizes, 0, is_v6)
}

/// Opens the TUN with offloads when the kernel allows it, plainly otherwise.
fn build_tun(cfg: &DeviceConfig) -> io::Result<(tun_rs::AsyncDevice, bool)> {
    match build_tun_with(cfg, true) {
        Ok(d) => Ok((d, true)),
        Err(e) => {
            debug!(error = %e, "TUN offload unavailable");
            build_tun_with(cfg, false).map(|d| (d, false))
        }
    }
}

fn build_tun_with(cfg: &DeviceConfig, offload: bool) -> io::Result<tun_rs::AsyncDevice> {
    let mut b = tun_rs::DeviceBuilder::new()
        .name(&cfg.name)
        .mtu(cfg.mtu)
        .offload(offload);
    let mut v4_done = false;
    for a in &cfg.addresses {
        match a {
            IpNet::V4(n) if !v4_done => {
                b = b.ipv4(n.addr(), n.prefix_len(), None);
                v4_done = true;
            }
            IpNet::V6(n) => b = b.ipv6(n.addr(), n.prefix_len()),
            IpNet::V4(_) => {}
        }
    }
    let dev = b.build_async()?;
    for a in &cfg.addresses {
        if let IpNet::V4(n) = a {
            if v4_done && Some(a) != cfg.addresses.iter().find(|x| x.addr().is_ipv4()) {
                dev.add_address_v4(n.addr(), n.prefix_len())?;
            }
        }
    }
    Ok(dev)
}

impl Device {
    /// Creates the TUN and sockets, installs the peers and starts the loops.
    /// Nothing is left behind on error.
    pub async fn start(cfg: DeviceConfig) -> anyhow::Result<Device> {
        use anyhow::Context as _;
        let (tun, offload) =
            build_tun(&cfg).with_context(|| format!("creating TUN device {}", cfg.name))?;
        let sockets = bind_pair(cfg.listen_port)
            .with_context(|| format!("binding UDP port {}", cfg.listen_port))?;
        let key = cfg.private_key.clone().map(KeyState::new);
        let drops = Arc::new(DropCounters::default());
        let staging = Arc::new(staged::Pool::for_mtu(cfg.mtu, Arc::clone(&drops)));
        let inner = Arc::new(Inner {
            name: cfg.name.clone(),
            mode: cfg.mode,
            forward: AtomicU8::new(cfg.forward.to_u8()),
            own: Arc::new(OwnAddrs::new(&cfg.addresses)),
            keepalive: AtomicU32::new(u32::from(cfg.keepalive)),
            tun,
            offload,
            table: ArcSwap::from_pointee(Table::default()),
            key: ArcSwap::from_pointee(key),
            sockets: ArcSwap::from_pointee(sockets),
            recv_tasks: Mutex::new(Vec::new()),
            config_lock: tokio::sync::Mutex::new(()),
            next_index: AtomicU32::new(rand_index()),
            fwmark: AtomicU32::new(0),
            drops,
            staging,
            mtu: usize::from(cfg.mtu),
            handshake_limit: Mutex::new(HandshakeLimiter::default()),
            budget_warned_ms: AtomicU64::new(0),
            carried: Carried::default(),
            handshakes: AtomicU64::new(0),
            start: Instant::now(),
            xlat: cfg.xlat.clone().map(|c| {
                XlatPath::new(
                    c,
                    cfg.nat64.clone(),
                    cfg.xlat_via_pool6.clone(),
                    cfg.xlat_icmp_rate,
                )
            }),
            tun_routes: RwLock::new(Vec::new()),
            tun_lost: tokio::sync::watch::channel(false).0,
            route_lock: tokio::sync::Mutex::new(()),
            endpoint_moved: std::sync::OnceLock::new(),
        });
        let mut set = DeviceSet::default();
        for p in &cfg.peers {
            set.peers.push(PeerSet {
                public_key: p.public_key,
                remove: false,
                update_only: false,
                preshared_key: Some(p.preshared_key.clone()),
                endpoint: p.endpoint,
                persistent_keepalive: p.persistent_keepalive,
                replace_allowed_ips: true,
                allowed_ips: p.allowed_ips.clone(),
            });
        }
        inner.apply(set).await?;
        for p in &cfg.peers {
            if let Some(peer) = inner.peer(&p.public_key) {
                peer.set_name(p.name.clone());
            }
        }
        // The kernel routes the TUN's address prefixes into it.
        inner.add_tun_routes(cfg.addresses.iter().copied());
        inner.spawn_receivers();
        let tasks = vec![
            tokio::spawn(Arc::clone(&inner).tun_loop()),
            tokio::spawn(Arc::clone(&inner).timer_loop()),
        ];
        let port = inner.sockets.load().port;
        info!(interface = %cfg.name, port, mode = ?cfg.mode, peers = cfg.peers.len(), "device up");
        Ok(Device { inner, tasks })
    }
}

fn rand_index() -> u32 {
    use rand_core::RngCore;
    rand_core::OsRng.next_u32() & 0x00ff_ffff
}

/// Where the result of an operation on a `Tunn` ended up in the output buffer.
enum Out {
    Nothing,
    Network(usize, usize),
    Tunnel(usize, usize, IpAddr),
    Error(WireGuardError),
}

fn locate(base: usize, p: &[u8]) -> (usize, usize) {
    let off = (p.as_ptr() as usize).saturating_sub(base);
    (off, off + p.len())
}

/// Whether `endpoint`, made a peer's endpoint, would send the peer's packets
/// back into this device for the same peer: the kernel routes it into the
/// TUN (it lies in `into_tun`) and it lies inside the peer's own allowed IPs,
/// so each encrypted datagram would be encrypted for the peer again, and
/// again. (Kernel WireGuard notices this when sending; here the roam is
/// refused.) Allowed IPs alone do not decide it: a peer allowed 0.0.0.0/0
/// whose prefix is not routed into the TUN (a default route is never added;
/// wg-quick puts it in a table of its own) roams freely.
fn loops_back<T>(
    into_tun: &[IpNet],
    routes: &AllowedIps<T>,
    endpoint: IpAddr,
    is_peer: impl Fn(&T) -> bool,
) -> bool {
    // A dual-stack socket names an IPv4 sender as ::ffff:a.b.c.d.
    let endpoint = endpoint.to_canonical();
    into_tun.iter().any(|n| n.contains(&endpoint)) && routes.lookup(endpoint).is_some_and(is_peer)
}

/// Turns a `TunnResult` into offsets into the buffer whose address is `base`,
/// so the buffer's borrow (and the peer lock) can end before the I/O.
/// A new handshake initiation of `peer` (sent even while one is pending).
fn initiation(peer: &Peer) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    let out = {
        let mut t = peer.tunn.lock();
        let base = buf.as_ptr() as usize;
        let r = t.format_handshake_initiation(&mut buf, true);
        classify(base, r)
    };
    let Out::Network(a, b) = out else {
        return None;
    };
    buf.get(a..b).map(<[u8]>::to_vec)
}

/// Whether a datagram's outcome proves that its sender holds the peer's keys,
/// so that it may move the peer's endpoint and counts as a sign of life: an
/// initiation answered with a response, a response accepted (a keepalive or
/// queued data follow, or nothing), a data packet decrypted. A cookie reply
/// (type 3) proves nothing: anyone who saw a handshake go by can make one. Nor
/// does a handshake answered with a cookie (the device under load): only its
/// mac1 was checked, and mac1 takes nothing but this device's public key.
fn authenticates(datagram: &[u8], result: &Out, out: &[u8]) -> bool {
    match (datagram.first(), result) {
        (_, Out::Error(_)) => false,
        (Some(3), _) => false,
        (_, Out::Network(a, _)) => out.get(*a) != Some(&3),
        (_, Out::Nothing | Out::Tunnel(..)) => true,
    }
}

fn classify(base: usize, r: TunnResult<'_>) -> Out {
    match r {
        TunnResult::Done => Out::Nothing,
        TunnResult::Err(e) => Out::Error(e),
        TunnResult::WriteToNetwork(p) => {
            let (a, b) = locate(base, p);
            Out::Network(a, b)
        }
        TunnResult::WriteToTunnelV4(p, src) => {
            let (a, b) = locate(base, p);
            Out::Tunnel(a, b, IpAddr::V4(src))
        }
        TunnResult::WriteToTunnelV6(p, src) => {
            let (a, b) = locate(base, p);
            Out::Tunnel(a, b, IpAddr::V6(src))
        }
    }
}

impl Inner {
    /// Records prefixes the kernel routes into this TUN (the daemon's own
    /// address prefixes, the routes it adds): a peer's endpoint never roams
    /// to an address in one of them that the peer's allowed IPs hold.
    pub fn add_tun_routes(&self, nets: impl IntoIterator<Item = IpNet>) {
        let mut r = self.tun_routes.write();
        for n in nets {
            let n = n.trunc();
            if !r.contains(&n) {
                r.push(n);
            }
        }
    }

    /// Completes once the TUN interface is gone (someone deleted it): every
    /// read fails from then on, so the daemon should end (and its supervisor
    /// start it again, with a new interface). Never completes otherwise.
    pub async fn lost(&self) {
        let mut rx = self.tun_lost.subscribe();
        if rx.wait_for(|gone| *gone).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// What the peers `set` changes hold now and will not after it is
    /// applied (a removed peer's all), read before the device forgets it.
    pub fn given_up(&self, set: &[PeerSet]) -> Vec<IpNet> {
        let info = self.info();
        set.iter()
            .filter_map(|p| {
                let i = info.peers.iter().find(|i| i.public_key == p.public_key)?;
                Some(
                    i.allowed_ips
                        .iter()
                        .filter(|n| p.remove || !p.allowed_ips.contains(n))
                        .copied()
                        .collect::<Vec<_>>(),
                )
            })
            .flatten()
            .collect()
    }

    /// Every prefix the device's peers hold.
    pub fn peer_prefixes(&self) -> Vec<IpNet> {
        self.info()
            .peers
            .into_iter()
            .flat_map(|p| p.allowed_ips)
            .collect()
    }

    /// Forgets a prefix no longer routed into this TUN.
    pub fn remove_tun_route(&self, net: &IpNet) {
        let net = net.trunc();
        self.tun_routes.write().retain(|n| *n != net);
    }

    /// Milliseconds since the device started.
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// The peer with this public key.
    pub fn peer(&self, key: &PublicKey) -> Option<Arc<Peer>> {
        self.table.load().by_key.get(key).cloned()
    }

    /// The peer whose allowed IPs hold `ip` (longest prefix: cryptokey
    /// routing's own lookup).
    pub fn peer_for_ip(&self, ip: IpAddr) -> Option<Arc<Peer>> {
        self.table.load().routes.lookup(ip).cloned()
    }

    /// All peers.
    pub fn peers(&self) -> Vec<Arc<Peer>> {
        self.table.load().by_key.values().cloned().collect()
    }

    /// What becomes of packets between peers from now on.
    pub fn set_node_to_node(&self, n: NodeToNode) {
        self.forward.store(n.to_u8(), Ordering::Relaxed);
    }

    /// What becomes of packets between peers.
    pub fn node_to_node(&self) -> NodeToNode {
        NodeToNode::from_u8(self.forward.load(Ordering::Relaxed))
    }

    /// A carried tunnel's relay at `addr` (on loopback) has closed: every
    /// peer whose endpoint is still that address forgets it, so that the
    /// device does not send into a closed socket, nor, once the port is
    /// another relay's, down another node's stream. A peer that roamed
    /// elsewhere meanwhile keeps its endpoint. How many forgot it.
    pub fn forget_endpoint(&self, addr: SocketAddr) -> usize {
        let n = self.table.load().forget_endpoint(addr);
        if n > 0 {
            debug!(relay = %addr, peers = n, "a closed relay's address is no peer's endpoint any more");
        }
        n
    }

    /// A carried tunnel's relay opened at `addr` (on loopback) for a client
    /// at `client` (behind a trusted proxy, the forwarded address): the
    /// relay's handshakes count as that client's, against its bucket and
    /// with cookies bound to its address, as its UDP datagrams would.
    pub fn relay_opened(&self, addr: SocketAddr, client: IpAddr) {
        self.carried.opened(addr, client);
    }

    /// A carried tunnel's relay at `addr` has closed: its client is
    /// forgotten, and so is the address as any peer's endpoint
    /// ([`Inner::forget_endpoint`]). How many peers forgot it.
    pub fn relay_closed(&self, addr: SocketAddr) -> usize {
        self.carried.closed(addr);
        self.forget_endpoint(addr)
    }

    /// Calls `f` with a peer's public key and its new endpoint whenever an
    /// authenticated datagram moves the peer's endpoint to another address
    /// (not per datagram: `f` may take a lock), as the hub's carrier needs
    /// to tell which peer each relay serves. The first `f` given holds;
    /// whether this one did.
    pub fn on_endpoint_moved(
        &self,
        f: impl Fn(&PublicKey, SocketAddr) + Send + Sync + 'static,
    ) -> bool {
        self.endpoint_moved.set(Box::new(f)).is_ok()
    }

    /// The device's WireGuard port on loopback (IPv4 when it has an IPv4
    /// socket): where a carried tunnel's relay sends.
    pub fn loopback(&self) -> SocketAddr {
        let s = self.sockets.load();
        let ip = if s.v4.is_some() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        };
        SocketAddr::new(ip, s.port)
    }

    pub fn listen_port(&self) -> u16 {
        self.sockets.load().port
    }

    pub fn public_key(&self) -> Option<PublicKey> {
        self.key
            .load()
            .as_ref()
            .as_ref()
            .map(|k| PublicKey(k.public.to_bytes()))
    }

    fn new_tunn(
        &self,
        public_key: PublicKey,
        psk: Option<PresharedKey>,
        keepalive: u16,
        index: u32,
    ) -> Tunn {
        let key = self.key.load();
        let (secret, rl) = match key.as_ref() {
            Some(k) => (k.secret.clone(), Some(Arc::clone(&k.rate_limiter))),
            // Without a private key the peer exists but cannot talk; a throwaway key
            // keeps the Tunn valid until one is set.
            None => (PrivateKey::generate().secret(), None),
        };
        Tunn::new(
            secret,
            public_key.as_x25519(),
            psk.map(|p| p.0),
            (keepalive > 0).then_some(keepalive),
            index,
            rl,
        )
    }

    /// The clocks now, as a `Tunn` made now reads them.
    fn stamp_base(&self) -> stamp::Base {
        stamp::Base {
            wall_ms: crate::clock::unix_ms(),
            mono_ms: self.now_ms(),
        }
    }

    /// Gives `peer` a new `Tunn` (same index, keys, preshared key and
    /// keepalive) when its handshake timestamps lag the wall clock `wall_ms`
    /// and its initiations go unanswered while it has no session
    /// ([`stamp::renew`]), and sends the new `Tunn`'s initiation. Left for a
    /// later tick while a configuration change runs (it may be replacing
    /// the `Tunn`, or the keys, itself).
    async fn renew_if_stale(&self, peer: &Peer, wall_ms: u64) {
        let unanswered = peer.unanswered.load(Ordering::Relaxed);
        // Every peer, every tick: the lock only for the few unanswered.
        if unanswered < stamp::UNANSWERED {
            return;
        }
        let lag = stamp::lag_ms(*peer.stamp_base.lock(), wall_ms, self.now_ms());
        // The session is looked at under the `Tunn`'s lock, below.
        if !stamp::renew(false, unanswered, lag) {
            return;
        }
        {
            let Ok(_config) = self.config_lock.try_lock() else {
                return;
            };
            let psk = peer.preshared_key.lock().clone();
            let tunn = self.new_tunn(peer.public_key, psk, peer.keepalive(), peer.index);
            let base = self.stamp_base();
            let mut slot = peer.tunn.lock();
            // An answer may have come since.
            let live = slot.time_since_last_handshake().is_some();
            if !stamp::renew(live, peer.unanswered.load(Ordering::Relaxed), lag) {
                return;
            }
            peer.install(&mut slot, tunn, base);
        }
        info!(peer = %peer.public_key, name = peer.name().as_deref().unwrap_or(""), lag_s = lag / 1000, unanswered,
            "handshake timestamps behind the wall clock (it was set forward) and initiations unanswered: handshaking again with the clock's time");
        if peer.endpoint().is_some() {
            self.force_handshake(peer).await;
        }
    }

    /// Counts an initiation from `peer` refused as stale, and says so now
    /// and then.
    fn stale_initiation(&self, peer: &Peer, from: SocketAddr) {
        peer.stale_timestamp.fetch_add(1, Ordering::Relaxed);
        if stamp::claim_warning(&peer.stale_warned_ms, self.now_ms()) {
            warn!(peer = %peer.public_key, name = peer.name().as_deref().unwrap_or(""), from = %from,
                "handshake initiation older than the last one accepted: is the peer's clock behind?");
        }
    }

    fn spawn_receivers(self: &Arc<Self>) {
        let socks = self.sockets.load();
        let mut tasks = self.recv_tasks.lock();
        for t in tasks.drain(..) {
            t.abort();
        }
        for s in [&socks.v4, &socks.v6].into_iter().flatten() {
            tasks.push(tokio::spawn(Arc::clone(self).udp_loop(Arc::clone(s))));
        }
    }

    /// Sends what the TUN gives us to the peer that owns its destination. With
    /// offloads, one read returns a TCP super-packet already split into
    /// MTU-sized segments (except one the translator takes whole: `recv_xlat`).
    async fn tun_loop(self: Arc<Self>) {
        let batch = if self.offload {
            tun_rs::IDEAL_BATCH_SIZE
        } else {
            1
        };
        // Room in front for a super-packet translated whole, in place.
        let mut original = vec![0u8; xlat::gso::HEADROOM + tun_rs::VIRTIO_NET_HDR_LEN + MAX_PACKET];
        let mut bufs: Vec<Vec<u8>> = (0..batch).map(|_| vec![0u8; MAX_PACKET]).collect();
        let mut sizes = vec![0usize; batch];
        let mut tx = vec![0u8; MAX_PACKET + OVERHEAD];
        // Translator output, and translated packets for the TUN.
        let mut xout = vec![
            0u8;
            if self.xlat.is_some() {
                xlat::OUT_BUF_LEN
            } else {
                0
            }
        ];
        let mut to_tun: Vec<Vec<u8>> = Vec::new();
        let mut gro = tun_rs::GROTable::new();
        loop {
            let r = if self.offload {
                match &self.xlat {
                    Some(x) => {
                        self.recv_xlat(x, &mut original, &mut bufs, &mut sizes)
                            .await
                    }
                    None => {
                        self.tun
                            .recv_multiple(&mut original, &mut bufs, &mut sizes, 0)
                            .await
                    }
                }
            } else {
                match bufs.first_mut() {
                    Some(b) => self.tun.recv(b).await.map(|n| {
                        if let Some(s) = sizes.first_mut() {
                            *s = n;
                        }
                        1
                    }),
                    None => return,
                }
            };
            let n = match r {
                Ok(n) => n,
                Err(e) => {
                    match e.kind() {
                        io::ErrorKind::WouldBlock => {}
                        // One packet the read returned could not be split
                        // (a super-packet of more segments than the batch
                        // holds, a bad virtio-net header): it is dropped,
                        // the loop goes on at once.
                        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => {
                            self.drops.inc(DropReason::MalformedIp);
                            debug!(error = %e, "TUN packet dropped: cannot be split");
                        }
                        // The interface was deleted: the queue is detached
                        // for good.
                        _ if e.raw_os_error() == Some(libc::EBADFD) => {
                            self.drops.inc(DropReason::TunRead);
                            error!(interface = %self.name, "the TUN interface is gone (deleted under the daemon)");
                            self.tun_lost.send_replace(true);
                            return;
                        }
                        _ => {
                            self.drops.inc(DropReason::TunRead);
                            debug!(error = %e, "TUN read failed");
                            // A TUN that is gone fails every read: do not spin.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                    continue;
                }
            };
            let table = self.table.load_full();
            let now = self.now_ms();
            let mut group = Group::default();
            let mut ntun = 0;
            for (buf, &len) in bufs.iter().zip(sizes.iter()).take(n) {
                let Some(mut pkt) = buf.get(..len) else {
                    continue;
                };
                if let Some(x) = &self.xlat {
                    let owns = |a: Ipv6Addr| table.routes.lookup(IpAddr::V6(a)).is_some();
                    // No peer: NAT64 bounds the sessions per source address.
                    if let Some(o) = x.on_tun(pkt, &mut xout, self.now_ms() / 1000, owns) {
                        // One translated packet for a peer joins the group below;
                        // anything else is sent from here.
                        match self.xlat_single_peer(&table, &o, &xout) {
                            Some(p) => pkt = p,
                            None => {
                                self.flush_group(&mut group, &mut tx).await;
                                let mut sink = TunSink {
                                    bufs: &mut to_tun,
                                    n: &mut ntun,
                                };
                                // Read from the TUN: the kernel routed it.
                                let origin = Origin {
                                    peer: None,
                                    forward: NodeToNode::Direct,
                                };
                                self.xlat_emit(&table, origin, &o, &xout, &mut tx, &mut sink)
                                    .await;
                                continue;
                            }
                        }
                    }
                }
                let len = pkt.len();
                let Some(dst) = packet::dst(pkt) else {
                    self.drops.inc(DropReason::MalformedIp);
                    continue;
                };
                let Some(peer) = table.routes.lookup(dst) else {
                    self.drops.inc(DropReason::NoRoute);
                    continue;
                };
                if group.peer.as_ref().is_some_and(|p| !Arc::ptr_eq(p, peer))
                    || group.len + len + OVERHEAD > GSO_MAX
                    || group.count >= GSO_MAX_SEGMENTS
                {
                    self.flush_group(&mut group, &mut tx).await;
                }
                group.peer = Some(Arc::clone(peer));
                let off = group.len;
                let Some(dst_buf) = tx.get_mut(off..) else {
                    continue;
                };
                let base = dst_buf.as_ptr() as usize;
                let out = {
                    let mut t = peer.tunn.lock();
                    let r = peer.seal(&mut t, pkt, dst_buf, now);
                    classify(base, r)
                };
                match out {
                    Out::Network(0, l) => {
                        match group.segment {
                            None => group.segment = Some(l),
                            Some(seg) if l > seg => {
                                // Larger than the group's segments: send the group
                                // alone, then start again with this datagram.
                                let prev = group.len;
                                group.len = off;
                                self.flush_group(&mut group, &mut tx).await;
                                tx.copy_within(prev..prev + l, 0);
                                group.peer = Some(Arc::clone(peer));
                                group.segment = Some(l);
                                group.len = 0;
                            }
                            Some(_) => {}
                        }
                        group.len += l;
                        group.count += 1;
                        // A shorter datagram can only end a group.
                        if group.segment.is_some_and(|seg| l < seg) {
                            self.flush_group(&mut group, &mut tx).await;
                        }
                    }
                    Out::Network(a, b) => {
                        // Not expected from boringtun; send it on its own.
                        if let Some(d) = tx.get(off + a..off + b) {
                            let d = d.to_vec();
                            self.send_net(peer, &d).await;
                        }
                    }
                    Out::Error(e) => self.drops.inc(DropReason::from_wg(&e)),
                    _ => {}
                }
            }
            self.flush_group(&mut group, &mut tx).await;
            if self.xlat.is_some() {
                let mut sink = TunSink {
                    bufs: &mut to_tun,
                    n: &mut ntun,
                };
                let forward = NodeToNode::from_u8(self.forward.load(Ordering::Relaxed));
                self.xlat_released(
                    &table,
                    forward,
                    &mut xout,
                    &mut tx,
                    &mut sink,
                    self.now_ms() / 1000,
                )
                .await;
            }
            if let Some(b) = to_tun.get_mut(..ntun) {
                if !b.is_empty() {
                    self.write_tun(&mut gro, b).await;
                }
            }
        }
    }

    /// One read from an offload TUN when the device translates. A TCP
    /// super-packet that the translator turns into one for the TUN is
    /// translated whole, in place, and written back with one write (0 packets
    /// are returned); anything else is split into `bufs` as `recv_multiple`
    /// does.
    async fn recv_xlat(
        &self,
        x: &XlatPath,
        raw: &mut [u8],
        bufs: &mut [Vec<u8>],
        sizes: &mut [usize],
    ) -> io::Result<usize> {
        let head = xlat::gso::HEADROOM;
        let Some(rx) = raw.get_mut(head..) else {
            return Ok(0);
        };
        let frame = head..head + self.tun.recv(rx).await?;
        let whole = {
            let table = self.table.load();
            x.on_tun_gso(raw, frame.clone(), |a| table.routes.lookup(a).is_some())
        };
        if let Some(out) = whole {
            if let Some(f) = raw.get(out) {
                if let Err(e) = self.tun.send(f).await {
                    self.drops.inc(DropReason::TunWrite);
                    debug!(error = %e, "TUN write failed");
                }
            }
            return Ok(0);
        }
        match raw.get_mut(frame) {
            Some(f) => split_virtio(f, bufs, sizes),
            None => Ok(0),
        }
    }

    /// The translated packet, when the outcome is exactly one packet for a peer.
    fn xlat_single_peer<'a>(
        &self,
        table: &Table,
        o: &xlat::Outcome,
        out: &'a [u8],
    ) -> Option<&'a [u8]> {
        let xlat::Outcome::Forward(p) = o else {
            return None;
        };
        let &[len] = p.lens() else {
            return None;
        };
        let pkt = out.get(..len as usize)?;
        table.routes.lookup(packet::dst(pkt)?)?;
        Some(pkt)
    }

    /// Sends what the translator made of `origin`'s packet: each packet where
    /// [`place_translated`] puts it (to a peer, or to the TUN through
    /// `sink`), or drops and counts it.
    async fn xlat_emit(
        &self,
        table: &Table,
        origin: Origin<'_>,
        o: &xlat::Outcome,
        out: &[u8],
        tx: &mut [u8],
        sink: &mut TunSink<'_>,
    ) {
        let Some(packets) = o.packets() else {
            return;
        };
        for p in packets.iter(out) {
            let dst = packet::dst(p);
            match place_translated(table, &self.own, origin.forward, origin.peer, dst) {
                Place::Peer(to) => self.send_to_peer(to, p, tx).await,
                Place::Drop(r) => self.drops.inc(r),
                Place::Tun | Place::Kernel => {
                    if self.refused_return(table, origin, dst) {
                        continue;
                    }
                    if !sink.push(p) {
                        self.drops.inc(DropReason::TunWrite);
                    }
                }
            }
        }
    }

    /// With `node_to_node = "off"`: whether a packet of `origin`'s peer for
    /// `dst`, on its way to the TUN, is refused (and counted) because the
    /// kernel would route it straight back to the translator, and the
    /// translator on to another peer ([`returns_to_another`]). Only IPv4
    /// destinations come back that way: the translator takes an IPv6 packet
    /// from a peer itself, and another peer's IPv6 address is [`place`]'s.
    fn refused_return(&self, table: &Table, origin: Origin<'_>, dst: Option<IpAddr>) -> bool {
        let (NodeToNode::Off, Some(from), Some(x), Some(IpAddr::V4(d))) =
            (origin.forward, origin.peer, &self.xlat, dst)
        else {
            return false;
        };
        let refused = returns_to_another(table, from, x.returns(d));
        if refused {
            self.drops.inc(DropReason::NodeToNode);
        }
        refused
    }

    /// Sends the held NAT64 fragments that the last translation released, as
    /// [`Self::xlat_emit`] sends an outcome. One going out is placed as its
    /// sender's packet (the peer that owns its datagram's source, if any),
    /// whichever loop releases it; one coming in was read from the TUN.
    async fn xlat_released(
        &self,
        table: &Table,
        forward: NodeToNode,
        xout: &mut [u8],
        tx: &mut [u8],
        sink: &mut TunSink<'_>,
        now: u64,
    ) {
        let Some(x) = &self.xlat else {
            return;
        };
        while let Some((o, from)) = x.released(xout, now) {
            let peer = from.and_then(|a| table.routes.lookup(IpAddr::V6(a)));
            let origin = Origin { peer, forward };
            self.xlat_emit(table, origin, &o, xout, tx, sink).await;
        }
    }

    /// Sends a group of datagrams for one peer with one system call (UDP GSO).
    async fn flush_group(&self, g: &mut Group, tx: &mut [u8]) {
        let (Some(peer), Some(seg)) = (g.peer.take(), g.segment.take()) else {
            *g = Group::default();
            return;
        };
        let len = std::mem::take(&mut g.len);
        let count = std::mem::take(&mut g.count);
        let Some(contents) = tx.get(..len) else {
            return;
        };
        // Counted per datagram, as the group's packets would have been.
        let datagrams = count.max(1) as u64;
        let Some(ep) = peer.route() else {
            self.drops.add(DropReason::NoEndpoint, datagrams);
            return;
        };
        let socks = self.sockets.load();
        let Some(udp) = socks.for_addr(&ep.addr) else {
            self.drops.add(DropReason::NoEndpoint, datagrams);
            return;
        };
        // One system call for the group when the socket can segment it,
        // otherwise one datagram at a time.
        let gso = count > 1 && count <= udp.state.max_gso_segments();
        let mut r = if gso || count <= 1 {
            send_from(&peer, udp, ep, contents, gso.then_some(seg)).await
        } else {
            Err(io::Error::new(io::ErrorKind::Unsupported, "no GSO"))
        };
        let (mut sent, mut failed) = match r {
            Ok(()) => (len, 0),
            Err(_) => (0, datagrams),
        };
        if let Err(e) = &r {
            if count > 1 {
                debug!(error = %e, "sending the group one datagram at a time");
                r = Ok(());
                failed = 0;
                // The local address the group failed from may be forgotten.
                let ep = peer.route().unwrap_or(ep);
                for c in contents.chunks(seg) {
                    match send_from(&peer, udp, ep, c, None).await {
                        Ok(()) => sent += c.len(),
                        Err(e) => {
                            r = Err(e);
                            failed += 1;
                        }
                    }
                }
            }
        }
        if sent > 0 {
            peer.tx_bytes.fetch_add(sent as u64, Ordering::Relaxed);
            peer.last_tx_ms.store(self.now_ms(), Ordering::Relaxed);
            let n = peer.count_initiations(contents.chunks(seg));
            peer.answers.initiated(n);
        }
        if let Err(e) = r {
            self.drops.add(DropReason::UdpSend, failed);
            debug!(error = %e, endpoint = %ep.addr, "UDP send failed");
        }
    }

    /// Encapsulates `pkt` for `peer` and sends it to the peer's endpoint
    /// (or stages it and starts a handshake: [`Peer::seal`]).
    async fn send_to_peer(&self, peer: &Peer, pkt: &[u8], tx: &mut [u8]) {
        let now = self.now_ms();
        let out = {
            let mut t = peer.tunn.lock();
            let base = tx.as_ptr() as usize;
            let r = peer.seal(&mut t, pkt, tx, now);
            classify(base, r)
        };
        self.send_sealed(peer, out, tx).await;
    }

    /// Sends what sealing into `buf` gave for `peer` (a datagram), or
    /// counts its error.
    async fn send_sealed(&self, peer: &Peer, out: Out, buf: &[u8]) {
        match out {
            Out::Network(a, b) => {
                if let Some(d) = buf.get(a..b) {
                    self.send_net(peer, d).await;
                }
            }
            Out::Error(e) => self.drops.inc(DropReason::from_wg(&e)),
            _ => {}
        }
    }

    /// Sends what was staged for `peer` while it had no session, once it
    /// has one (an authenticated datagram came: the handshake may be
    /// complete), through `buf`.
    async fn release_staged(&self, peer: &Peer, buf: &mut [u8]) {
        while peer.staged.pending() {
            let out = {
                let mut t = peer.tunn.lock();
                let base = buf.as_ptr() as usize;
                let Some(r) = peer.unstage(&mut t, buf) else {
                    return;
                };
                classify(base, r)
            };
            self.send_sealed(peer, out, buf).await;
        }
    }

    async fn send_net(&self, peer: &Peer, data: &[u8]) {
        let Some(ep) = peer.route() else {
            self.drops.inc(DropReason::NoEndpoint);
            return;
        };
        self.send_to(peer, ep, data, false).await;
    }

    /// Sends `data` of `peer` to `ep`: its endpoint, or where a try of
    /// another path goes (`probe`; not counted by the tunnel's liveness).
    async fn send_to(&self, peer: &Peer, ep: Endpoint, data: &[u8], probe: bool) {
        let socks = self.sockets.load();
        let Some(sock) = socks.for_addr(&ep.addr) else {
            self.drops.inc(DropReason::NoEndpoint);
            return;
        };
        match send_from(peer, sock, ep, data, None).await {
            Ok(()) => {
                peer.tx_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                peer.last_tx_ms.store(self.now_ms(), Ordering::Relaxed);
                let n = peer.count_initiations(std::iter::once(data));
                if !probe {
                    peer.answers.initiated(n);
                }
            }
            Err(e) => {
                self.drops.inc(DropReason::UdpSend);
                debug!(error = %e, endpoint = %ep.addr, "UDP send failed");
            }
        }
    }

    /// Receives datagrams in batches (recvmmsg, with UDP GRO coalescing), and
    /// writes what they carry to the TUN in one go so the kernel can coalesce
    /// TCP segments (GRO) on the way in.
    async fn udp_loop(self: Arc<Self>, udp: Arc<Udp>) {
        let mut rx: Vec<Vec<u8>> = (0..RECV_BUFS).map(|_| vec![0u8; MAX_PACKET]).collect();
        let mut meta = vec![quinn_udp::RecvMeta::default(); RECV_BUFS];
        let mut out = vec![0u8; MAX_PACKET + OVERHEAD];
        let mut fwd = vec![0u8; MAX_PACKET + OVERHEAD];
        let mut xout = vec![
            0u8;
            if self.xlat.is_some() {
                xlat::OUT_BUF_LEN
            } else {
                0
            }
        ];
        let mut batch: Vec<Vec<u8>> = Vec::new();
        let mut gro = tun_rs::GROTable::new();
        // The last receive failed.
        let mut failed = false;
        loop {
            let r = {
                let mut iovs: Vec<std::io::IoSliceMut<'_>> =
                    rx.iter_mut().map(|b| std::io::IoSliceMut::new(b)).collect();
                udp.sock
                    .async_io(tokio::io::Interest::READABLE, || {
                        udp.state.recv((&udp.sock).into(), &mut iovs, &mut meta)
                    })
                    .await
            };
            let msgs = match r {
                Ok(n) => {
                    failed = false;
                    n
                }
                Err(e) => {
                    // Not fatal, but the socket stays readable: a second
                    // failure in a row waits a little, so one that
                    // persists does not spin.
                    self.drops.inc(DropReason::UdpRecv);
                    debug!(error = %e, "UDP receive error");
                    if std::mem::replace(&mut failed, true) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    continue;
                }
            };
            // One table snapshot per batch, as in the TUN loop: no shared
            // reference count touched per datagram.
            let table = self.table.load_full();
            let own = &*self.own;
            let mut k = 0;
            let mut sink = TunSink {
                bufs: &mut batch,
                n: &mut k,
            };
            for (buf, m) in rx.iter().zip(meta.iter()).take(msgs) {
                let Some(data) = buf.get(..m.len) else {
                    continue;
                };
                let stride = if m.stride == 0 {
                    m.len.max(1)
                } else {
                    m.stride
                };
                // A hub answers from the address each peer sent to (it may
                // have several). A node or a `wg` device leaves the source
                // to the kernel, so that it follows its own routes when it
                // roams (kernel WireGuard drops its cached source when the
                // route leaves by another interface; this is simpler).
                let local = if self.mode == Mode::Hub {
                    m.dst_ip
                } else {
                    None
                };
                for datagram in data.chunks(stride) {
                    let from = Endpoint {
                        addr: m.addr,
                        local,
                    };
                    self.handle_datagram(
                        &table, own, &udp, datagram, from, &mut out, &mut fwd, &mut xout, &mut sink,
                    )
                    .await;
                }
            }
            if k > 0 {
                if let Some(b) = batch.get_mut(..k) {
                    self.write_tun(&mut gro, b).await;
                }
            }
        }
    }

    /// Writes packets that sit at `TUN_HEADROOM` in their buffers.
    async fn write_tun(&self, gro: &mut tun_rs::GROTable, bufs: &mut [Vec<u8>]) {
        if self.offload {
            if let Err(e) = self.tun.send_multiple(gro, bufs, TUN_HEADROOM).await {
                // Coalescing refused the batch, or a write failed: each
                // packet counts. (tun-rs writes the rest after a failed
                // write and returns only the last error, not what went,
                // so a batch lost in part counts whole.)
                self.drops.add(DropReason::TunWrite, bufs.len() as u64);
                debug!(error = %e, "TUN write failed");
            }
            return;
        }
        for b in bufs.iter() {
            let Some(p) = b.get(TUN_HEADROOM..) else {
                continue;
            };
            if let Err(e) = self.tun.send(p).await {
                self.drops.inc(DropReason::TunWrite);
                debug!(error = %e, "TUN write failed");
            }
        }
    }

    /// Finds the peer a datagram belongs to, without doing any expensive work
    /// for packets that fail cheap checks. `source`: where a handshake
    /// counts as coming from ([`Carried::source`]).
    fn find_peer(
        &self,
        sock: &Udp,
        table: &Table,
        datagram: &[u8],
        at: Endpoint,
        source: SocketAddr,
        out: &mut [u8],
    ) -> Option<Arc<Peer>> {
        let parsed = match Tunn::parse_incoming_packet(datagram) {
            Ok(p) => p,
            Err(_) => {
                self.drops.inc(DropReason::InvalidPacket);
                return None;
            }
        };
        let key = self.key.load();
        let Some(key) = key.as_ref() else {
            self.drops.inc(DropReason::NoKey);
            return None;
        };
        // mac1, under load mac2, and for a handshake carrying a cookie its
        // source's share and the device's, before any Diffie-Hellman. A
        // response without a cookie is checked once, inside its Tunn (as it
        // always was).
        let checked = match &parsed {
            Packet::HandshakeInit(_) => true,
            Packet::HandshakeResponse(_) => handshake_limit::carries_cookie(datagram),
            _ => false,
        };
        if checked {
            let gate = gate_handshake(
                &key.rate_limiter,
                &self.handshake_limit,
                datagram,
                source,
                self.now_ms(),
                out,
            );
            match gate {
                Gate::Pass => {}
                Gate::Cookie(cookie) => {
                    self.send_cookie(sock, cookie, at);
                    return None;
                }
                g => {
                    if let Some(r) = g.dropped() {
                        self.drops.inc(r);
                    }
                    if matches!(g, Gate::Spent) {
                        self.budget_spent();
                    }
                    return None;
                }
            }
        }
        let idx = match &parsed {
            Packet::HandshakeInit(init) => {
                // Failing to decrypt the initiator's static key: not a real
                // initiation for this device (forged, or for another key).
                let Ok(half) = parse_handshake_anon(&key.secret, &key.public, init) else {
                    self.drops.inc(DropReason::DecryptFailed);
                    return None;
                };
                let peer = table.by_key.get(&PublicKey(half.peer_static_public));
                if peer.is_none() {
                    self.drops.inc(DropReason::UnknownPeer);
                }
                return peer.cloned();
            }
            Packet::HandshakeResponse(p) => p.receiver_idx,
            Packet::PacketCookieReply(p) => p.receiver_idx,
            Packet::PacketData(p) => p.receiver_idx,
        };
        let peer = table.by_index.get(&(idx >> 8));
        if peer.is_none() {
            self.drops.inc(DropReason::UnknownIndex);
        }
        peer.cloned()
    }

    /// Says, once a minute at most, that handshakes were dropped for the
    /// device's budget.
    fn budget_spent(&self) {
        if stamp::claim_warning(&self.budget_warned_ms, self.now_ms()) {
            warn!(
                per_second = handshake_limit::DEVICE_PER_SECOND,
                "handshakes carrying a cookie past the device's budget: dropped (handshake_rate_limited) to keep the data of established sessions flowing; nodes retry"
            );
        }
    }

    /// Sends a cookie reply from the address the handshake it answers came
    /// to (as every reply of a hub goes), without waiting for the socket:
    /// counted as `cookie_sent` when it went, as `udp_send` when not.
    fn send_cookie(&self, sock: &Udp, cookie: &[u8], at: Endpoint) {
        match sock.try_send(at, cookie) {
            Ok(()) => self.drops.inc(DropReason::CookieSent),
            Err(e) => {
                self.drops.inc(DropReason::UdpSend);
                debug!(error = %e, endpoint = %at.addr, "cookie reply not sent");
            }
        }
    }

    /// Handles one datagram; packets it leaves for the TUN go to `sink`.
    #[allow(clippy::too_many_arguments)] // the loop's buffers, passed down
    async fn handle_datagram(
        &self,
        table: &Table,
        own: &OwnAddrs,
        sock: &Udp,
        datagram: &[u8],
        at: Endpoint,
        out: &mut [u8],
        fwd: &mut [u8],
        xout: &mut [u8],
        sink: &mut TunSink<'_>,
    ) {
        let from = at.addr;
        let source = self.carried.source(datagram, from);
        let Some(peer) = self.find_peer(sock, table, datagram, at, source, out) else {
            return;
        };
        let (result, authenticated, roams) = peer.receive(datagram, source.ip(), out);
        if let (false, Out::Network(a, b)) = (authenticated, &result) {
            // A cookie for an unproven handshake goes back where it came
            // from; the peer's endpoint stays.
            if let Some(d) = out.get(*a..*b) {
                self.send_cookie(sock, d, at);
            }
            return;
        }
        if authenticated {
            // One look at the endpoint per datagram; a write only on a change.
            // An initiation a replaced `Tunn` answered moves nothing
            // ([`Peer::receive`]): the answer goes back where it came from.
            let seen = peer.route();
            if roams && seen.map(|e| e.addr) != Some(from) {
                let into_tun = self.tun_routes.read();
                let loops = loops_back(&into_tun, &table.routes, from.ip(), |o| {
                    Arc::ptr_eq(o, &peer)
                });
                drop(into_tun);
                if loops {
                    // Keep the endpoint it had; the payload still goes in.
                    self.drops.inc(DropReason::EndpointLoop);
                    if !peer.loop_warned.swap(true, Ordering::Relaxed) {
                        warn!(peer = %peer.public_key, from = %from, "not moving a peer's endpoint inside its own allowed IPs routed into this tunnel: its packets would loop");
                    }
                } else {
                    peer.set_route(at);
                    // A later loop is news again.
                    peer.loop_warned.store(false, Ordering::Relaxed);
                    if let Some(f) = self.endpoint_moved.get() {
                        f(&peer.public_key, from);
                    }
                }
            } else if roams && seen != Some(at) {
                // Same peer address, another of this side's.
                peer.set_route(at);
            }
            let now = self.now_ms();
            peer.last_rx_ms.store(now, Ordering::Relaxed);
            if liveness::proves_two_way(datagram) {
                peer.last_two_way_ms.store(now, Ordering::Relaxed);
                peer.answers.received(datagram);
            }
            peer.unanswered.store(0, Ordering::Relaxed);
            peer.rx_bytes
                .fetch_add(datagram.len() as u64, Ordering::Relaxed);
        }
        // What was staged for the peer goes once a datagram brings it a
        // session: after any answer of this side's, before what the
        // datagram carries is forwarded (through `fwd`, free till then).
        match result {
            Out::Nothing => self.release_staged(&peer, fwd).await,
            Out::Error(e) => {
                let r = DropReason::from_wg(&e);
                self.drops.inc(r);
                if r == DropReason::StaleTimestamp {
                    self.stale_initiation(&peer, from);
                }
            }
            Out::Network(a, b) => {
                // An answered initiation or an accepted response (a cookie
                // reply, message type 3, completes nothing).
                if out.get(a) != Some(&3) {
                    self.handshakes.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(d) = out.get(a..b) {
                    peer.answers.answered(d);
                    if roams {
                        self.send_net(&peer, d).await;
                    } else {
                        self.send_to(&peer, at, d, false).await;
                    }
                }
                // A completed handshake may release what boringtun queued:
                // only keepalives its timers made without a session (the
                // device stages packets itself, `Peer::seal`).
                loop {
                    let r = {
                        let mut t = peer.tunn.lock();
                        let base = out.as_ptr() as usize;
                        let r = t.decapsulate(None, &[], out);
                        classify(base, r)
                    };
                    match r {
                        Out::Network(a, b) => {
                            if let Some(d) = out.get(a..b) {
                                self.send_net(&peer, d).await;
                            }
                        }
                        _ => break,
                    }
                }
                self.release_staged(&peer, fwd).await;
            }
            Out::Tunnel(a, b, src) => {
                self.release_staged(&peer, fwd).await;
                let Some(pkt) = out.get_mut(a..b) else {
                    return;
                };
                let forward = NodeToNode::from_u8(self.forward.load(Ordering::Relaxed));
                let dst = packet::dst(pkt);
                match place(table, own, forward, &peer, src, dst) {
                    Place::Tun => {}
                    Place::Kernel => {
                        if !sink.push(pkt) {
                            self.drops.inc(DropReason::TunWrite);
                        }
                        return;
                    }
                    Place::Peer(to) => {
                        if self.forward_to_peer(to, pkt, fwd).await {
                            return;
                        }
                    }
                    Place::Drop(r) => {
                        self.drops.inc(r);
                        if r == DropReason::SourceNotAllowed {
                            peer.src_not_allowed.fetch_add(1, Ordering::Relaxed);
                        }
                        return;
                    }
                }
                if let Some(x) = &self.xlat {
                    let now = self.now_ms() / 1000;
                    let owns = |a: Ipv6Addr| table.routes.lookup(IpAddr::V6(a)).is_some();
                    // NAT64 bounds the peer's sessions, from whatever
                    // addresses its allowed IPs give it.
                    let owner = peer_owner(&peer.public_key);
                    // What it becomes is placed as this peer's packet.
                    let origin = Origin {
                        peer: Some(&peer),
                        forward,
                    };
                    if let Some(o) = x.on_peer(pkt, xout, now, owner, owns) {
                        self.xlat_emit(table, origin, &o, xout, fwd, sink).await;
                        self.xlat_released(table, forward, xout, fwd, sink, now)
                            .await;
                        return;
                    }
                    if self.refused_return(table, origin, dst) {
                        return;
                    }
                }
                if !sink.push(pkt) {
                    self.drops.inc(DropReason::TunWrite);
                }
            }
        }
    }

    /// Forwards a decrypted packet to the peer `to` ([`place`] chose it).
    /// Returns false when the packet is for the TUN after all (its hop
    /// limit ran out: the kernel answers).
    async fn forward_to_peer(&self, to: &Peer, pkt: &mut [u8], fwd: &mut [u8]) -> bool {
        // A peer's inner packets may be up to 64 KiB; no larger than the
        // MTU goes on (nor would the kernel route one back into the TUN).
        if pkt.len() > self.mtu {
            self.drops.inc(DropReason::TooBig);
            return true;
        }
        match packet::decrement_hop_limit(pkt) {
            Hop::Forward => {
                self.send_to_peer(to, pkt, fwd).await;
                true
            }
            // The kernel answers with Time Exceeded.
            Hop::Expired => {
                self.drops.inc(DropReason::TtlExpired);
                false
            }
            Hop::Malformed => {
                self.drops.inc(DropReason::MalformedIp);
                true
            }
        }
    }

    /// Drives every peer's timers, the device keepalive and the rate limiter.
    async fn timer_loop(self: Arc<Self>) {
        let mut buf = vec![0u8; MAX_PACKET + OVERHEAD];
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reset = Instant::now();
        loop {
            tick.tick().await;
            if last_reset.elapsed() >= Duration::from_secs(1) {
                if let Some(k) = self.key.load().as_ref() {
                    k.rate_limiter.reset_count();
                }
                last_reset = Instant::now();
            }
            let table = self.table.load_full();
            let now = self.now_ms();
            let wall = crate::clock::unix_ms();
            let keepalive_ms = u64::from(self.keepalive.load(Ordering::Relaxed)) * 1000;
            for peer in table.by_key.values() {
                if peer.staged.pending() {
                    // Sent if a session came (the datagram that brought
                    // it released them already, as a rule), else given up
                    // once held too long.
                    self.release_staged(peer, &mut buf).await;
                    peer.staged.expire(now);
                }
                self.renew_if_stale(peer, wall).await;
                let out = {
                    let mut t = peer.tunn.lock();
                    let base = buf.as_ptr() as usize;
                    let r = t.update_timers(&mut buf);
                    classify(base, r)
                };
                match out {
                    Out::Network(a, b) => {
                        if let Some(d) = buf.get(a..b).filter(|d| !peer.held(d, now)) {
                            self.send_net(peer, d).await;
                        }
                        continue;
                    }
                    Out::Error(WireGuardError::ConnectionExpired) | Out::Nothing => {}
                    Out::Error(e) => debug!(error = ?e, "timer error"),
                    Out::Tunnel(..) => {}
                }
                // Device keepalive: once an interval, even when it cannot
                // go (no endpoint yet, a failed send).
                if peer.keepalive_due(now, keepalive_ms) {
                    self.send_to_peer(peer, &[], &mut buf).await;
                }
            }
        }
    }

    /// Sends a new handshake initiation for `peer` to `to` instead of its
    /// endpoint (a node on TLS trying UDP): if an answer comes back from
    /// there, the endpoint moves there as for any authenticated datagram.
    pub async fn probe_handshake(&self, peer: &Peer, to: SocketAddr) {
        if let Some(d) = initiation(peer) {
            let to = Endpoint {
                addr: to,
                local: None,
            };
            self.send_to(peer, to, &d, true).await;
        }
    }

    /// Sends `peer` a keepalive (an empty data packet of the current
    /// session) at its endpoint: the peer moves its endpoint for this side
    /// back to where it comes from.
    pub async fn send_keepalive(&self, peer: &Peer) {
        let mut buf = vec![0u8; 256];
        self.send_to_peer(peer, &[], &mut buf).await;
    }

    /// Forces a new handshake with `peer` now (used when a hub went silent).
    pub async fn force_handshake(&self, peer: &Peer) {
        if let Some(d) = initiation(peer) {
            self.send_net(peer, &d).await;
        }
    }

    /// Applies a configuration change atomically: readers see the old table or
    /// the new one, never a mix.
    pub async fn apply(self: &Arc<Self>, set: DeviceSet) -> anyhow::Result<()> {
        let _guard = self.config_lock.lock().await;
        if let Some(port) = set.listen_port {
            if port != self.sockets.load().port || port == 0 {
                let s = bind_pair(port)?;
                let mark = set
                    .fwmark
                    .unwrap_or_else(|| self.fwmark.load(Ordering::Relaxed));
                if mark != 0 {
                    s.set_mark(mark)
                        .map_err(|e| anyhow::anyhow!("setting fwmark {mark}: {e}"))?;
                }
                self.sockets.store(Arc::new(s));
                self.spawn_receivers();
            }
        }
        if let Some(m) = set.fwmark {
            // Applied to the sockets before it is reported, so `errno=0`
            // means the device's own packets carry it (wg-quick's policy
            // routing of a full tunnel relies on it).
            self.sockets
                .load()
                .set_mark(m)
                .map_err(|e| anyhow::anyhow!("setting fwmark {m}: {e}"))?;
            self.fwmark.store(m, Ordering::Relaxed);
        }
        let mut t = (**self.table.load()).clone();
        if let Some(pk) = set.private_key {
            let same = self
                .key
                .load()
                .as_ref()
                .as_ref()
                .is_some_and(|k| Some(&k.private) == pk.as_ref());
            if !same {
                let ks = pk.map(KeyState::new);
                // A new static key invalidates every session.
                for p in t.by_key.values() {
                    let mut tunn = p.tunn.lock();
                    match &ks {
                        Some(k) => tunn.set_static_private(
                            k.secret.clone(),
                            k.public,
                            Some(Arc::clone(&k.rate_limiter)),
                        ),
                        None => {
                            let g = PrivateKey::generate().secret();
                            let gp = x25519_dalek::PublicKey::from(&g);
                            tunn.set_static_private(g, gp, None)
                        }
                    }
                }
                self.key.store(Arc::new(ks));
            }
        }
        if set.replace_peers {
            t = Table::default();
        }
        let mut renew = Vec::new();
        let own = self.public_key();
        for ps in set.peers {
            if Some(ps.public_key) == own || ps.remove {
                // WireGuard ignores a peer that has the device's own key.
                t.remove(&ps.public_key);
                continue;
            }
            let existed = t.by_key.contains_key(&ps.public_key);
            let peer = match t.by_key.get(&ps.public_key) {
                Some(p) => Arc::clone(p),
                None if ps.update_only => continue,
                None => {
                    // Made whole: its `Tunn` fixes the preshared key and
                    // keepalive, so it is built once with them.
                    let index = self.next_free_index(&t);
                    let psk = ps.preshared_key.clone().flatten();
                    let keepalive = ps.persistent_keepalive.unwrap_or(0);
                    let tunn = self.new_tunn(ps.public_key, psk.clone(), keepalive, index);
                    let peer = Arc::new(Peer::new(
                        ps.public_key,
                        index,
                        tunn,
                        self.stamp_base(),
                        psk,
                        keepalive,
                        Arc::clone(&self.staging),
                    ));
                    t.by_index.insert(index, Arc::clone(&peer));
                    t.by_key.insert(ps.public_key, Arc::clone(&peer));
                    peer
                }
            };
            if let Some(e) = ps.endpoint {
                peer.set_endpoint(e);
            }
            let psk_changed = ps
                .preshared_key
                .as_ref()
                .is_some_and(|p| *p != *peer.preshared_key.lock());
            let ka_changed = ps
                .persistent_keepalive
                .is_some_and(|k| k != peer.keepalive());
            if existed && (psk_changed || ka_changed) {
                // `Tunn` fixes both at creation: a new one, same index (a
                // peer made above has them already).
                if let Some(p) = ps.preshared_key {
                    *peer.preshared_key.lock() = p;
                }
                if let Some(k) = ps.persistent_keepalive {
                    peer.persistent_keepalive
                        .store(u32::from(k), Ordering::Relaxed);
                }
                let psk = peer.preshared_key.lock().clone();
                let tunn = self.new_tunn(peer.public_key, psk, peer.keepalive(), peer.index);
                let base = self.stamp_base();
                peer.install(&mut peer.tunn.lock(), tunn, base);
                // Its sessions went with the old `Tunn`: a handshake now,
                // not when the next packet finds none (the peer would send
                // on its old session for up to two minutes).
                renew.push(Arc::clone(&peer));
            }
            if ps.replace_allowed_ips {
                t.clear_routes(&ps.public_key);
            }
            t.claim(&peer, &ps.allowed_ips);
        }
        self.table.store(Arc::new(t));
        for peer in renew {
            if peer.endpoint().is_some() {
                self.force_handshake(&peer).await;
            }
        }
        Ok(())
    }

    fn next_free_index(&self, t: &Table) -> u32 {
        loop {
            let i = self.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
            if !t.by_index.contains_key(&i) {
                return i;
            }
        }
    }

    /// The state `get=1` reports.
    pub fn info(&self) -> DeviceInfo {
        let table = self.table.load();
        let mut peers: Vec<_> = table.by_key.values().collect();
        peers.sort_by_key(|p| p.index);
        let mut allowed: HashMap<PublicKey, Vec<IpNet>> = HashMap::new();
        for (n, p) in table.routes.iter() {
            allowed.entry(p.public_key).or_default().push(n);
        }
        DeviceInfo {
            private_key: self.key.load().as_ref().as_ref().map(|k| k.private.clone()),
            listen_port: self.listen_port(),
            fwmark: self.fwmark.load(Ordering::Relaxed),
            peers: peers
                .into_iter()
                .map(|p| PeerInfo {
                    public_key: p.public_key,
                    preshared_key: p.preshared_key.lock().clone(),
                    endpoint: p.endpoint(),
                    last_handshake: p.last_handshake(),
                    rx_bytes: p.rx_bytes.load(Ordering::Relaxed),
                    tx_bytes: p.tx_bytes.load(Ordering::Relaxed),
                    persistent_keepalive: p.keepalive(),
                    allowed_ips: allowed.remove(&p.public_key).unwrap_or_default(),
                })
                .collect(),
        }
    }

    /// The state `gatewire show --json` reports.
    pub fn show(&self) -> ShowInterface {
        let info = self.info();
        let table = self.table.load();
        ShowInterface {
            name: self.name.clone(),
            mode: self.mode,
            public_key: self.public_key().map(|k| k.to_base64()),
            listen_port: info.listen_port,
            drops: self.drops.snapshot(),
            handshakes: self.handshakes.load(Ordering::Relaxed),
            xlat_drops: self.xlat.as_ref().map(|x| x.drops()),
            nat64: self.xlat.as_ref().and_then(|x| x.nat64_counts()),
            peers: info
                .peers
                .into_iter()
                .map(|p| {
                    let peer = table.by_key.get(&p.public_key);
                    ShowPeer {
                        name: peer.and_then(|x| x.name()),
                        public_key: p.public_key.to_base64(),
                        endpoint: p.endpoint.map(|e| e.to_string()),
                        allowed_ips: p.allowed_ips.iter().map(|n| n.to_string()).collect(),
                        latest_handshake: p.last_handshake.map(|d| d.as_secs()),
                        rx_bytes: p.rx_bytes,
                        tx_bytes: p.tx_bytes,
                        persistent_keepalive: (p.persistent_keepalive > 0)
                            .then_some(p.persistent_keepalive),
                        drops: [
                            (
                                "source_not_allowed".to_string(),
                                peer.map(|x| x.src_not_allowed.load(Ordering::Relaxed))
                                    .unwrap_or(0),
                            ),
                            (
                                "stale_timestamp".to_string(),
                                peer.map(|x| x.stale_timestamp.load(Ordering::Relaxed))
                                    .unwrap_or(0),
                            ),
                        ]
                        .into_iter()
                        .collect(),
                    }
                })
                .collect(),
        }
    }
}

impl Table {
    /// Every peer whose endpoint is still `addr` forgets it: how many.
    fn forget_endpoint(&self, addr: SocketAddr) -> usize {
        self.by_key
            .values()
            .filter(|p| p.forget_endpoint_at(addr))
            .count()
    }

    fn remove(&mut self, key: &PublicKey) {
        if let Some(old) = self.by_key.remove(key) {
            self.by_index.remove(&old.index);
            self.clear_routes(key);
        }
    }

    /// Removes the allowed IPs `key` holds (its own prefixes only: no scan
    /// of the table).
    fn clear_routes(&mut self, key: &PublicKey) {
        if let Some(nets) = self.owned.remove(key) {
            for n in nets.iter() {
                self.routes.remove(n);
            }
        }
    }

    /// Gives `peer` the prefixes `nets` (host bits ignored). A prefix
    /// belongs to one peer: the newest claim wins, as in WireGuard, and the
    /// peer that held it loses it.
    fn claim(&mut self, peer: &Arc<Peer>, nets: &[IpNet]) {
        if nets.is_empty() {
            return;
        }
        let key = peer.public_key;
        let mut mine: Vec<IpNet> = self.owned.get(&key).map(|a| a.to_vec()).unwrap_or_default();
        let mut lost: HashMap<PublicKey, std::collections::HashSet<IpNet>> = HashMap::new();
        for n in nets {
            let n = n.trunc();
            match self.routes.insert(n, Arc::clone(peer)) {
                Some(old) if old.public_key == key => {}
                Some(old) => {
                    lost.entry(old.public_key).or_default().insert(n);
                    mine.push(n);
                }
                None => mine.push(n),
            }
        }
        for (k, gone) in lost {
            if let Some(held) = self.owned.get(&k) {
                let left: Vec<IpNet> = held.iter().filter(|n| !gone.contains(n)).copied().collect();
                if left.is_empty() {
                    self.owned.remove(&k);
                } else {
                    self.owned.insert(k, left.into());
                }
            }
        }
        self.owned.insert(key, mine.into());
    }
}

/// One interface in `gatewire show --json`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ShowInterface {
    pub name: String,
    pub mode: Mode,
    pub public_key: Option<String>,
    pub listen_port: u16,
    pub drops: std::collections::BTreeMap<String, u64>,
    /// Handshakes completed since the device started.
    #[serde(default)]
    pub handshakes: u64,
    /// Packets the translator dropped (or answered with an ICMP error), by reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xlat_drops: Option<std::collections::BTreeMap<String, u64>>,
    /// NAT64 table occupancy, when the translator runs NAT64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat64: Option<ShowNat64>,
    pub peers: Vec<ShowPeer>,
}

/// NAT64 table occupancy in `gatewire show --json`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ShowNat64 {
    pub sessions: usize,
    pub bindings: usize,
    /// Fragmented datagrams whose later fragments are expected.
    #[serde(default)]
    pub fragments: usize,
    /// Later fragments held for a first fragment that has not come.
    #[serde(default)]
    pub held_fragments: usize,
    /// Later fragments that came before their first, since start.
    #[serde(default)]
    pub held_fragments_total: u64,
}

/// One peer in `gatewire show --json`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ShowPeer {
    pub name: Option<String>,
    pub public_key: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    pub latest_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: Option<u16>,
    pub drops: std::collections::BTreeMap<String, u64>,
}

/// What the checks before any Diffie-Hellman make of a handshake message.
#[derive(Debug)]
enum Gate<'a> {
    /// On to the Diffie-Hellman.
    Pass,
    /// Under load without a valid cookie: answer with this cookie reply.
    Cookie(&'a [u8]),
    Drop(DropReason),
    /// A handshake carrying a cookie within its source's share, past the
    /// device's ([`handshake_limit::DEVICE_PER_SECOND`]): dropped and
    /// counted as `handshake_rate_limited`, and said now and then.
    Spent,
}

impl Gate<'_> {
    /// What a dropped handshake is counted as (`None`: not dropped).
    fn dropped(&self) -> Option<DropReason> {
        match self {
            Gate::Pass | Gate::Cookie(_) => None,
            Gate::Drop(r) => Some(*r),
            Gate::Spent => Some(DropReason::HandshakeRateLimited),
        }
    }
}

/// The checks of a handshake initiation or response, cheapest first, as
/// kernel WireGuard makes them: mac1 and, under load, mac2 (`RateLimiter`,
/// which counts it towards the load); then, if it carries a cookie, a token
/// from its source's bucket and one from the device's. `from` is the
/// source as the device counts it (a carried tunnel's client,
/// [`Carried::source`]): mac2 proves a cookie for its address. A cookie
/// reply is written to `out`.
fn gate_handshake<'o>(
    rate_limiter: &RateLimiter,
    limits: &Mutex<HandshakeLimiter>,
    datagram: &[u8],
    from: SocketAddr,
    now_ms: u64,
    out: &'o mut [u8],
) -> Gate<'o> {
    // The load is counted per second: ended here as well as by the timer
    // task, which a slow tick would otherwise leave "under load" for
    // longer (`reset_count` does nothing within a second of the last).
    rate_limiter.reset_count();
    match rate_limiter.verify_packet(Some(from.ip()), datagram, out) {
        Ok(_) => {}
        Err(TunnResult::WriteToNetwork(cookie)) => return Gate::Cookie(cookie),
        Err(TunnResult::Err(e)) => return Gate::Drop(DropReason::from_wg(&e)),
        Err(_) => return Gate::Drop(DropReason::Other),
    }
    if !handshake_limit::carries_cookie(datagram) {
        return Gate::Pass;
    }
    match limits.lock().check(from, now_ms) {
        Ok(()) => Gate::Pass,
        Err(handshake_limit::Refused::Source) => Gate::Drop(DropReason::HandshakeRateLimited),
        Err(handshake_limit::Refused::Device) => Gate::Spent,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn routes() -> AllowedIps<u8> {
        let mut r = AllowedIps::new();
        r.insert("10.64.0.0/16".parse().unwrap(), 1); // peer 1: the overlay
        r.insert("10.64.7.0/24".parse().unwrap(), 2); // peer 2: a subnet in it
        r.insert("fd00:64::/48".parse().unwrap(), 1);
        r
    }

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn only_proven_packets_move_an_endpoint() {
        let kind = |t: u8| [t, 0, 0, 0];
        let mut out = [0u8; 8];
        out[4] = 2; // a response at 4..8
                    // An initiation answered with a response; a response answered with a
                    // keepalive; data that decrypted; a keepalive.
        assert!(authenticates(&kind(1), &Out::Network(4, 8), &out));
        out[4] = 4;
        assert!(authenticates(&kind(2), &Out::Network(4, 8), &out));
        assert!(authenticates(
            &kind(4),
            &Out::Tunnel(0, 4, [10, 0, 0, 1].into()),
            &out
        ));
        assert!(authenticates(&kind(4), &Out::Nothing, &out));
        // Handshakes answered with a cookie (only mac1 checked), cookie
        // replies however they end, anything that failed.
        out[4] = 3;
        assert!(!authenticates(&kind(1), &Out::Network(4, 8), &out));
        assert!(!authenticates(&kind(2), &Out::Network(4, 8), &out));
        assert!(!authenticates(&kind(3), &Out::Nothing, &out));
        assert!(!authenticates(
            &kind(4),
            &Out::Error(WireGuardError::InvalidAeadTag),
            &out
        ));
    }

    /// Through boringtun itself: a genuine handshake response replayed from
    /// another address while the device is under load is answered with a
    /// cookie, and does not count as proof; the same response without load
    /// does.
    #[test]
    fn a_replayed_response_under_load_is_not_proof() {
        let hub = PrivateKey::generate();
        let node = PrivateKey::generate();
        let hub_pub = hub.public_key();
        let run = |limit: u64| {
            let rl = Arc::new(RateLimiter::new(&hub_pub.as_x25519(), limit));
            let mut h = Tunn::new(
                hub.secret(),
                node.public_key().as_x25519(),
                None,
                None,
                1 << 8,
                Some(rl),
            );
            let mut n = Tunn::new(node.secret(), hub_pub.as_x25519(), None, None, 2 << 8, None);
            let mut init = vec![0u8; 256];
            let init = match h.format_handshake_initiation(&mut init, false) {
                TunnResult::WriteToNetwork(p) => p.to_vec(),
                _ => panic!("no initiation"),
            };
            let mut resp = vec![0u8; 256];
            let resp = match n.decapsulate(Some([192, 0, 2, 1].into()), &init, &mut resp) {
                TunnResult::WriteToNetwork(p) => p.to_vec(),
                _ => panic!("no response"),
            };
            assert_eq!(resp[0], 2);
            let mut out = vec![0u8; 256];
            let base = out.as_ptr() as usize;
            let r = classify(
                base,
                h.decapsulate(Some([203, 0, 113, 9].into()), &resp, &mut out),
            );
            authenticates(&resp, &r, &out)
        };
        assert!(!run(0), "under load: a cookie, not proof");
        assert!(run(1000));
    }

    #[test]
    fn a_roam_into_the_peers_own_routed_allowed_ips_loops() {
        let r = routes();
        let tun = nets(&["10.64.0.0/16", "fd00:64::/48"]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(loops_back(&tun, &r, ip("10.64.0.9"), |p| *p == 1));
        assert!(loops_back(&tun, &r, ip("fd00:64::9"), |p| *p == 1));
        // As a dual-stack socket reports an IPv4 sender.
        assert!(loops_back(&tun, &r, ip("::ffff:10.64.0.9"), |p| *p == 1));
        // Inside another peer's prefix (the longest match): WireGuard in
        // WireGuard through that peer, not a loop.
        assert!(!loops_back(&tun, &r, ip("10.64.7.1"), |p| *p == 1));
        assert!(loops_back(&tun, &r, ip("10.64.7.1"), |p| *p == 2));
        // Outside every allowed IP: an ordinary roam.
        assert!(!loops_back(&tun, &r, ip("192.0.2.1"), |p| *p == 1));
        assert!(!loops_back(&tun, &r, ip("::ffff:192.0.2.1"), |p| *p == 1));
        // Allowed but not routed into the TUN (`wg` mode, a prefix holding a
        // configured endpoint): the kernel sends it out the wan, no loop.
        assert!(!loops_back(&[], &r, ip("10.64.0.9"), |p| *p == 1));
        let only_v6 = nets(&["fd00:64::/48"]);
        assert!(!loops_back(&only_v6, &r, ip("10.64.0.9"), |p| *p == 1));
    }

    #[test]
    fn a_peer_allowed_everything_roams_where_nothing_routes_it_into_the_tun() {
        let mut r = AllowedIps::new();
        r.insert("0.0.0.0/0".parse().unwrap(), 1u8);
        r.insert("::/0".parse().unwrap(), 1u8);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // The device's own overlay prefix is routed into the TUN; the peer's
        // new wan address is not.
        let tun = nets(&["100.64.0.0/10"]);
        assert!(!loops_back(&tun, &r, ip("198.51.100.7"), |p| *p == 1));
        assert!(!loops_back(&tun, &r, ip("2001:db8::7"), |p| *p == 1));
        assert!(loops_back(&tun, &r, ip("100.64.3.3"), |p| *p == 1));
    }

    use crate::wg::liveness::tests::initiation;

    /// Through boringtun: an IPv4 packet whose total length says 0 (or
    /// less than a header) comes out of the tunnel cut to that length, with
    /// the sender's source; it is dropped as malformed, and never queued
    /// for the TUN (whose offload batch an empty packet would fail whole).
    #[test]
    fn a_packet_cut_to_less_than_a_header_is_dropped() {
        use crate::wg::liveness::tests::{exchange, pair};
        let (mut h, mut n) = pair();
        let init = initiation(&mut n);
        let resp = exchange(&mut h, &init);
        let mut out = vec![0u8; 2048];
        // The node's first data packet confirms the session.
        let _ = n.decapsulate(None, &resp, &mut out);
        let (t, own, [a, ..]) = hub_table();
        for total in [0u16, 12, 19] {
            let mut ip = [0u8; 28];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&total.to_be_bytes());
            ip[8] = 64;
            ip[12..16].copy_from_slice(&[100, 64, 0, 2]);
            ip[16..20].copy_from_slice(&[100, 64, 0, 1]);
            let mut enc = vec![0u8; 2048];
            let d = match n.encapsulate(&ip, &mut enc) {
                TunnResult::WriteToNetwork(d) => d.to_vec(),
                other => panic!("{other:?}"),
            };
            let (pkt, src) = match h.decapsulate(None, &d, &mut out) {
                TunnResult::WriteToTunnelV4(p, src) => (p.to_vec(), IpAddr::V4(src)),
                other => panic!("{other:?}"),
            };
            assert_eq!(pkt.len(), usize::from(total));
            assert_eq!(src, IpAddr::from([100, 64, 0, 2]));
            for f in [NodeToNode::Direct, NodeToNode::Kernel, NodeToNode::Off] {
                assert!(matches!(
                    place(&t, &own, f, &a, src, packet::dst(&pkt)),
                    Place::Drop(DropReason::MalformedIp)
                ));
            }
        }
        let (mut bufs, mut n) = (Vec::new(), 0);
        let mut sink = TunSink {
            bufs: &mut bufs,
            n: &mut n,
        };
        assert!(!sink.push(&[]));
        assert!(sink.push(&[0x45; 20]));
        assert_eq!(n, 1);
    }

    /// Through boringtun: an initiation whose timestamp is older than one
    /// the responder accepted from the same key is refused, and counted as
    /// `stale_timestamp`, not as a decryption failure.
    #[test]
    fn an_older_initiation_is_a_stale_timestamp() {
        let hub = PrivateKey::generate();
        let node = PrivateKey::generate();
        let hub_pub = hub.public_key().as_x25519();
        let mut h = Tunn::new(
            hub.secret(),
            node.public_key().as_x25519(),
            None,
            None,
            1 << 8,
            None,
        );
        let mut n = Tunn::new(node.secret(), hub_pub, None, None, 2 << 8, None);
        let older = initiation(&mut n);
        std::thread::sleep(Duration::from_millis(2));
        let newer = initiation(&mut n);
        assert!(stamp::is_initiation(&older));
        let from = Some(IpAddr::from([192, 0, 2, 1]));
        let mut out = vec![0u8; 256];
        assert!(matches!(
            h.decapsulate(from, &newer, &mut out),
            TunnResult::WriteToNetwork(_)
        ));
        match h.decapsulate(from, &older, &mut out) {
            TunnResult::Err(e) => assert_eq!(DropReason::from_wg(&e), DropReason::StaleTimestamp),
            _ => panic!("an older initiation was accepted"),
        }
        // A new Tunn for the same key stamps the time now: accepted.
        let mut renewed = Tunn::new(node.secret(), hub_pub, None, None, 2 << 8, None);
        std::thread::sleep(Duration::from_millis(2));
        let fresh = initiation(&mut renewed);
        assert!(matches!(
            h.decapsulate(from, &fresh, &mut out),
            TunnResult::WriteToNetwork(_)
        ));
    }

    /// Through boringtun: a replaced `Tunn` forgot the last timestamp
    /// accepted, so it answers an initiation recorded before; sent again
    /// from another address, that moves no endpoint. The node's use of an
    /// answer proves it, and from then on what it sends moves the endpoint
    /// (a roam). A new peer's first initiation moves it at once.
    #[test]
    fn a_replayed_initiation_to_a_replaced_tunn_moves_no_endpoint() {
        use crate::wg::liveness::tests::exchange;
        let hub = PrivateKey::generate();
        let node = PrivateKey::generate();
        let tunn = || {
            let k = node.public_key().as_x25519();
            Tunn::new(hub.secret(), k, None, None, 1 << 8, None)
        };
        let base = stamp::Base {
            wall_ms: 0,
            mono_ms: 0,
        };
        let pool = Arc::new(staged::Pool::for_mtu(1420, Arc::default()));
        let peer = Peer::new(node.public_key(), 1, tunn(), base, None, 0, pool);
        let hub_pub = hub.public_key().as_x25519();
        let mut n = Tunn::new(node.secret(), hub_pub, None, None, 2 << 8, None);
        let (home, away): (IpAddr, IpAddr) = ([192, 0, 2, 1].into(), [203, 0, 113, 9].into());
        let mut out = vec![0u8; 2048];
        let mut answer = |d: &[u8], from: IpAddr| {
            let (r, authenticated, roams) = peer.receive(d, from, &mut out);
            let resp = match r {
                Out::Network(a, b) => out[a..b].to_vec(),
                _ => Vec::new(),
            };
            (resp, authenticated, roams)
        };
        // First contact.
        let recorded = initiation(&mut n);
        let (resp, auth, roams) = answer(&recorded, home);
        assert!(auth && roams);
        let ka = exchange(&mut n, &resp);
        assert_eq!(answer(&ka, home), (Vec::new(), true, true));
        // A new `Tunn` (a preshared key changed, say); a recorded
        // initiation sent again from elsewhere.
        peer.install(&mut peer.tunn.lock(), tunn(), base);
        let (resp, auth, roams) = answer(&recorded, away);
        assert_eq!(resp.first(), Some(&2), "the replay is answered");
        assert!(auth);
        assert!(!roams, "a replay moved the endpoint");
        // The node, roamed, handshakes anew: answered, unproven till it
        // uses the answer.
        std::thread::sleep(Duration::from_millis(2));
        let (resp, auth, roams) = answer(&initiation(&mut n), away);
        assert!(auth && !roams);
        let ka = exchange(&mut n, &resp);
        assert_eq!(answer(&ka, away), (Vec::new(), true, true));
        // Proved: the recorded one is stale again, a new one roams.
        assert!(!answer(&recorded, home).1);
        std::thread::sleep(Duration::from_millis(2));
        let (_, auth, roams) = answer(&initiation(&mut n), home);
        assert!(auth && roams);
    }

    /// Through boringtun: under load, an initiation carrying a valid cookie
    /// gets its source's share (5 at once, then 20 a second) and no more,
    /// whatever the replays; one without a cookie gets a cookie reply; and
    /// without load, initiations without a cookie are not limited per source.
    #[test]
    fn a_cookie_under_load_buys_a_share_not_a_flood() {
        let hub = PrivateKey::generate();
        let node = PrivateKey::generate();
        let hub_pub = hub.public_key().as_x25519();
        let loaded = RateLimiter::new(&hub_pub, 0);
        let limits = Mutex::new(HandshakeLimiter::default());
        let mut n = Tunn::new(node.secret(), hub_pub, None, None, 2 << 8, None);
        let from: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let mut out = vec![0u8; 256];
        let plain = initiation(&mut n);
        assert!(!handshake_limit::carries_cookie(&plain));
        let cookie = match gate_handshake(&loaded, &limits, &plain, from, 0, &mut out) {
            Gate::Cookie(c) => c.to_vec(),
            g => panic!("under load without a cookie: {g:?}"),
        };
        let mut sink = vec![0u8; 256];
        assert!(matches!(
            n.decapsulate(Some(from.ip()), &cookie, &mut sink),
            TunnResult::Done
        ));
        let with = initiation(&mut n);
        assert!(handshake_limit::carries_cookie(&with));
        // The cookie is bound to its address: from another, a cookie reply
        // (and no token taken anywhere).
        let elsewhere: SocketAddr = "192.0.2.9:51820".parse().unwrap();
        assert!(matches!(
            gate_handshake(&loaded, &limits, &with, elsewhere, 0, &mut out),
            Gate::Cookie(_)
        ));
        // Replayed from its own address: the burst, then dropped before
        // any Diffie-Hellman.
        // What the gate made of it: passed, or dropped for this reason (a
        // cookie reply: none).
        let mut gate = |now: u64| match gate_handshake(&loaded, &limits, &with, from, now, &mut out)
        {
            Gate::Pass => Ok(()),
            g => Err(g.dropped()),
        };
        let passed = (0..100).filter(|_| gate(1000).is_ok()).count();
        assert_eq!(passed, handshake_limit::BURST as usize);
        let limited = Err(Some(DropReason::HandshakeRateLimited));
        assert_eq!(gate(1000), limited);
        assert_eq!(gate(1050), Ok(()), "a token every 50 ms");
        assert_eq!(gate(1050), limited);
        // A forged initiation (mac1 wrong) is refused before the limiter.
        let mut forged = with.clone();
        forged[20] ^= 1;
        assert!(matches!(
            gate_handshake(&loaded, &limits, &forged, from, 1050, &mut out),
            Gate::Drop(DropReason::InvalidMac)
        ));
        // Not under load: initiations without a cookie pass, however many.
        let idle = RateLimiter::new(&hub_pub, 1000);
        for _ in 0..50 {
            assert!(matches!(
                gate_handshake(&idle, &limits, &plain, from, 1050, &mut out),
                Gate::Pass
            ));
        }
    }

    /// A node's initiation carrying a cookie for `from`, fetched through
    /// the gate of a device under load (`loaded`).
    fn with_cookie(
        n: &mut Tunn,
        loaded: &RateLimiter,
        limits: &Mutex<HandshakeLimiter>,
        from: SocketAddr,
    ) -> Vec<u8> {
        let mut out = vec![0u8; 256];
        let plain = initiation(n);
        let cookie = match gate_handshake(loaded, limits, &plain, from, 0, &mut out) {
            Gate::Cookie(c) => c.to_vec(),
            g => panic!("under load without a cookie: {g:?}"),
        };
        let mut sink = vec![0u8; 256];
        assert!(matches!(
            n.decapsulate(Some(from.ip()), &cookie, &mut sink),
            TunnResult::Done
        ));
        let with = initiation(n);
        assert!(handshake_limit::carries_cookie(&with));
        with
    }

    /// Under load, handshakes with a valid cookie from many sources, each
    /// well within its own share, get through only as far as the device's
    /// budget: past it, fresh sources' are dropped (counted as
    /// `handshake_rate_limited`) before any Diffie-Hellman, until the
    /// budget refills.
    #[test]
    fn past_the_devices_budget_cookies_from_fresh_sources_are_refused() {
        let hub = PrivateKey::generate();
        let node = PrivateKey::generate();
        let hub_pub = hub.public_key().as_x25519();
        let loaded = RateLimiter::new(&hub_pub, 0);
        let limits = Mutex::new(HandshakeLimiter::with_limits(
            handshake_limit::MAX_SOURCES,
            crate::proxy::ratelimit::RateLimit {
                per_second: 10,
                burst: 4,
            },
        ));
        let mut n = Tunn::new(node.secret(), hub_pub, None, None, 2 << 8, None);
        let fresh = |i: u32| SocketAddr::from((Ipv4Addr::from(0xc633_6400 + i), 51820));
        let mut out = vec![0u8; 256];
        let mut seen = Vec::new();
        for i in 0..8 {
            let with = with_cookie(&mut n, &loaded, &limits, fresh(i));
            let g = gate_handshake(&loaded, &limits, &with, fresh(i), 0, &mut out);
            seen.push((matches!(g, Gate::Pass), g.dropped()));
        }
        let passed = (true, None);
        let refused = (false, Some(DropReason::HandshakeRateLimited));
        assert_eq!(seen, [[passed; 4], [refused; 4]].concat());
        // A tenth of a second on: one more, one source's at a time.
        let with = with_cookie(&mut n, &loaded, &limits, fresh(100));
        let g = gate_handshake(&loaded, &limits, &with, fresh(100), 100, &mut out);
        assert!(matches!(g, Gate::Pass), "{g:?}");
        let g = gate_handshake(&loaded, &limits, &with, fresh(100), 100, &mut out);
        assert!(matches!(g, Gate::Spent), "{g:?}");
        assert_eq!(g.dropped(), Some(DropReason::HandshakeRateLimited));
        // The default budget: a few thousand at most in any second.
        const { assert!(handshake_limit::DEVICE_PER_SECOND <= 5000) };
    }

    /// A hub's carried tunnels: the handshakes through every relay of one
    /// client share that client's bucket, and a cookie fetched through one
    /// of them is bound to the client's address: valid through its other
    /// relays, not through another client's, nor through a loopback
    /// socket the device was not told of. Other messages keep their
    /// source.
    #[test]
    fn carried_handshakes_count_as_their_clients() {
        let hub = PrivateKey::generate();
        let node = PrivateKey::generate();
        let hub_pub = hub.public_key().as_x25519();
        let loaded = RateLimiter::new(&hub_pub, 0);
        let limits = Mutex::new(HandshakeLimiter::default());
        let carried = Carried::default();
        let relay = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let x: IpAddr = "198.51.100.7".parse().unwrap();
        let y: IpAddr = "2001:db8:1:2::9".parse().unwrap();
        for p in 40_000..40_016 {
            carried.opened(relay(p), x);
        }
        carried.opened(relay(41_000), y);
        let mut n = Tunn::new(node.secret(), hub_pub, None, None, 2 << 8, None);
        let first = relay(40_000);
        let plain = initiation(&mut n);
        assert_eq!(carried.source(&plain, first), SocketAddr::new(x, 40_000));
        let with = with_cookie(&mut n, &loaded, &limits, carried.source(&plain, first));
        let mut out = vec![0u8; 256];
        let mut gate = |from: SocketAddr| {
            let source = carried.source(&with, from);
            match gate_handshake(&loaded, &limits, &with, source, 0, &mut out) {
                Gate::Pass => "pass",
                Gate::Cookie(_) => "cookie",
                g => g.dropped().map_or("?", DropReason::as_str),
            }
        };
        // Sixteen connections of one client: its burst, no more.
        let through_x: Vec<&str> = (40_000..40_016).map(|p| gate(relay(p))).collect();
        let burst = handshake_limit::BURST as usize;
        assert!(through_x[..burst].iter().all(|g| *g == "pass"));
        assert!(
            through_x[burst..]
                .iter()
                .all(|g| *g == "handshake_rate_limited"),
            "{through_x:?}"
        );
        // The cookie proves x's address, not y's nor loopback's.
        assert_eq!(gate(relay(41_000)), "cookie");
        assert_eq!(gate(relay(42_000)), "cookie");
        // A closed relay's port is loopback's again.
        carried.closed(relay(40_003));
        assert_eq!(carried.source(&with, relay(40_003)), relay(40_003));
        // Data keeps its source (and takes no look); so does an address
        // off loopback.
        let data = [4u8, 0, 0, 0, 1, 0, 0, 0];
        assert_eq!(carried.source(&data, relay(40_001)), relay(40_001));
        let off: SocketAddr = "192.0.2.1:40001".parse().unwrap();
        assert_eq!(carried.source(&with, off), off);
        // As a dual-stack socket names a relay.
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:40001".parse().unwrap();
        assert_eq!(carried.source(&with, mapped), SocketAddr::new(x, 40_001));
    }

    /// A held peer's timers send no initiation until the hold's end; other
    /// messages go, and so does everything once the hold is over.
    #[test]
    fn a_hold_keeps_back_the_timers_initiations_only() {
        let p = test_peer(1);
        let mut init = vec![0u8; 148];
        init[0] = 1;
        let keepalive = [4u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(!p.held(&init, 0), "nothing held at first");
        p.hold_initiations(5000);
        assert!(p.held(&init, 0));
        assert!(p.held(&init, 4999));
        assert!(!p.held(&init, 5000));
        assert!(!p.held(&keepalive, 100));
        p.hold_initiations(0);
        assert!(!p.held(&init, 100));
    }

    /// A cookie reply leaves from the address the handshake came to, not
    /// the kernel's choice.
    #[tokio::test]
    async fn a_cookie_reply_leaves_from_the_address_dialled() {
        let any = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        any.set_nonblocking(true).unwrap();
        let udp = Udp::new(UdpSocket::from_std(any).unwrap()).unwrap();
        let node = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = Endpoint {
            addr: node.local_addr().unwrap(),
            local: Some([127, 0, 0, 2].into()),
        };
        // Readiness as the running device knows it (tokio learns it from
        // the reactor: a socket never polled is not yet known writable).
        udp.sock.writable().await.unwrap();
        udp.try_send(to, b"cookie").unwrap();
        let mut b = [0u8; 16];
        let (n, src) = tokio::time::timeout(Duration::from_secs(5), node.recv_from(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&b[..n], b"cookie");
        assert_eq!(src.ip(), IpAddr::from([127, 0, 0, 2]));
    }

    /// An IPv4 packet of `len` bytes (a valid total length), marked `id`.
    fn ipv4(len: usize, id: u16) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[8] = 64;
        p
    }

    /// Through boringtun: packets for a peer without a session never go
    /// into its `Tunn` (whose `encapsulate` would copy each into a queue of
    /// up to 256, uncounted). The first starts a handshake and the others
    /// start none; each is staged, within the bound, or counted
    /// `no_session`; once the handshake completes, the `Tunn` has nothing
    /// old to release, and the staged packets, the newest, go on the new
    /// session in order.
    #[test]
    fn packets_without_a_session_are_staged_within_bounds_or_counted() {
        use crate::wg::liveness::tests::{exchange, pair};
        let (h, mut n) = pair();
        let drops = Arc::new(DropCounters::default());
        let pool = Arc::new(staged::Pool::for_mtu(1420, Arc::clone(&drops)));
        let base = stamp::Base {
            wall_ms: 0,
            mono_ms: 0,
        };
        let hub = Peer::new(PublicKey([7; 32]), 1, h, base, None, 0, Arc::clone(&pool));
        const N: u16 = 1000;
        let mut dst = vec![0u8; MAX_PACKET + OVERHEAD];
        let mut inits = Vec::new();
        for id in 0..N {
            let mut t = hub.tunn.lock();
            match hub.seal(&mut t, &ipv4(1400, id), &mut dst, 0) {
                TunnResult::WriteToNetwork(d) => inits.push(d.to_vec()),
                TunnResult::Done => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(inits.len(), 1, "one handshake, not one per packet");
        assert!(stamp::is_initiation(&inits[0]));
        assert_eq!(hub.staged.packets(), staged::PACKETS);
        assert_eq!(pool.used(), staged::PACKETS * 1400);
        assert_eq!(
            drops.get(DropReason::NoSession),
            u64::from(N) - staged::PACKETS as u64
        );
        // A keepalive without a session: no handshake more (one is under
        // way), nothing staged, nothing counted.
        {
            let mut t = hub.tunn.lock();
            assert!(matches!(
                hub.seal(&mut t, &[], &mut dst, 0),
                TunnResult::Done
            ));
            assert!(hub.unstage(&mut t, &mut dst).is_none(), "no session yet");
        }
        assert_eq!(hub.staged.packets(), staged::PACKETS);
        let resp = exchange(&mut n, &inits[0]);
        let mut t = hub.tunn.lock();
        let keepalive = match t.decapsulate(None, &resp, &mut dst) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("{other:?}"),
        };
        assert!(matches!(
            n.decapsulate(None, &keepalive, &mut vec![0u8; 2048]),
            TunnResult::Done
        ));
        assert!(
            matches!(t.decapsulate(None, &[], &mut dst), TunnResult::Done),
            "boringtun kept nothing"
        );
        let mut got = Vec::new();
        while let Some(r) = hub.unstage(&mut t, &mut dst) {
            let d = match r {
                TunnResult::WriteToNetwork(d) => d.to_vec(),
                other => panic!("{other:?}"),
            };
            let mut out = vec![0u8; 2048];
            match n.decapsulate(None, &d, &mut out) {
                TunnResult::WriteToTunnelV4(p, _) => {
                    got.push(u16::from_be_bytes([p[4], p[5]]));
                }
                other => panic!("{other:?}"),
            }
        }
        let newest: Vec<u16> = (N - staged::PACKETS as u16..N).collect();
        assert_eq!(got, newest);
        assert_eq!(pool.used(), 0);
        assert_eq!(
            drops.get(DropReason::NoSession),
            u64::from(N) - staged::PACKETS as u64
        );
        // With the session, packets go at once.
        assert!(matches!(
            hub.seal(&mut t, &ipv4(100, 1), &mut dst, 0),
            TunnResult::WriteToNetwork(_)
        ));
        assert!(!hub.staged.pending());
    }

    /// Through boringtun: a handshake response the receiver no longer
    /// waits for, and data on a session it no longer has, are stale, not
    /// forged.
    #[test]
    fn data_on_a_session_let_go_is_stale_not_forged() {
        use crate::wg::liveness::tests::{exchange, pair};
        let (mut h, mut n) = pair();
        let init = initiation(&mut n);
        let resp = exchange(&mut h, &init);
        let keepalive = exchange(&mut n, &resp);
        let mut out = vec![0u8; 2048];
        assert!(matches!(
            h.decapsulate(None, &keepalive, &mut out),
            TunnResult::Done
        ));
        // The same response again: its handshake is complete.
        match n.decapsulate(None, &resp, &mut out) {
            TunnResult::Err(e) => assert_eq!(DropReason::from_wg(&e), DropReason::StaleSession),
            other => panic!("{other:?}"),
        }
        let data = match n.encapsulate(&ipv4(60, 1), &mut out) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("{other:?}"),
        };
        // A `Tunn` made again (a preshared key changed, handshake
        // timestamps renewed) has no session at that index.
        let (mut fresh, _) = pair();
        match fresh.decapsulate(None, &data, &mut out) {
            TunnResult::Err(e) => assert_eq!(DropReason::from_wg(&e), DropReason::StaleSession),
            other => panic!("{other:?}"),
        }
    }

    /// A device keepalive that cannot go (no endpoint) is tried once an
    /// interval, not at every tick until it goes; never towards a peer
    /// not heard from, or heard from too long ago, or when off.
    #[test]
    fn a_keepalive_that_cannot_go_is_tried_once_an_interval() {
        let p = test_peer(1);
        let every = 4_000;
        let ticks = |p: &Peer, from: u64, to: u64| -> Vec<u64> {
            (from / 250..to / 250)
                .map(|i| i * 250)
                .filter(|&now| p.keepalive_due(now, every))
                .collect()
        };
        assert!(ticks(&p, 0, 20_000).is_empty(), "never heard from");
        p.last_rx_ms.store(1_000, Ordering::Relaxed);
        assert_eq!(ticks(&p, 1_000, 12_000), [4_000, 8_000]);
        // Something sent meanwhile puts the next one off.
        p.last_tx_ms.store(13_000, Ordering::Relaxed);
        assert_eq!(ticks(&p, 12_000, 20_000), [17_000]);
        assert!(!p.keepalive_due(30_000, 0), "off");
        assert!(ticks(&p, 181_000, 200_000).is_empty(), "heard too long ago");
    }

    #[test]
    fn every_drop_reason_has_its_own_name() {
        let names: std::collections::HashSet<&str> =
            DropReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), DropReason::ALL.len());
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{} out of place in ALL", r.as_str());
        }
    }

    fn test_peer(n: u32) -> Arc<Peer> {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&n.to_be_bytes());
        let public_key = PublicKey(k);
        let tunn = Tunn::new(
            PrivateKey::generate().secret(),
            public_key.as_x25519(),
            None,
            None,
            n,
            None,
        );
        let base = stamp::Base {
            wall_ms: 0,
            mono_ms: 0,
        };
        let pool = staged::Pool::for_mtu(1420, Arc::default());
        Arc::new(Peer::new(
            public_key,
            n,
            tunn,
            base,
            None,
            0,
            Arc::new(pool),
        ))
    }

    fn add(t: &mut Table, p: &Arc<Peer>) {
        t.by_key.insert(p.public_key, Arc::clone(p));
        t.by_index.insert(p.index, Arc::clone(p));
    }

    /// A closed relay's address is forgotten by the peers still at it, and
    /// only by them.
    #[test]
    fn a_closed_relays_address_is_no_endpoint() {
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let mut t = Table::default();
        let (a, b, c, d) = (test_peer(1), test_peer(2), test_peer(3), test_peer(4));
        for p in [&a, &b, &c, &d] {
            add(&mut t, p);
        }
        a.set_endpoint(sa("127.0.0.1:40001"));
        // Roamed back to UDP meanwhile; another relay; another loopback
        // port; none.
        b.set_endpoint(sa("192.0.2.7:51820"));
        c.set_endpoint(sa("127.0.0.1:40002"));
        d.set_route(Endpoint {
            addr: sa("[::ffff:127.0.0.1]:40001"),
            local: Some("127.0.0.1".parse().unwrap()),
        });
        assert_eq!(t.forget_endpoint(sa("127.0.0.1:40001")), 2);
        assert_eq!(a.endpoint(), None);
        assert_eq!(d.endpoint(), None, "as a dual-stack socket saw it");
        assert_eq!(b.endpoint(), Some(sa("192.0.2.7:51820")));
        assert_eq!(c.endpoint(), Some(sa("127.0.0.1:40002")));
        assert_eq!(t.forget_endpoint(sa("127.0.0.1:40001")), 0);
        assert_eq!(t.forget_endpoint(sa("127.0.0.2:40002")), 0);
        assert_eq!(c.endpoint(), Some(sa("127.0.0.1:40002")));
    }

    /// `owned` holds exactly what `routes` gives each peer.
    fn consistent(t: &Table) {
        let mut from_routes: HashMap<PublicKey, std::collections::BTreeSet<IpNet>> = HashMap::new();
        for (n, p) in t.routes.iter() {
            from_routes.entry(p.public_key).or_default().insert(n);
        }
        let owned: HashMap<PublicKey, std::collections::BTreeSet<IpNet>> = t
            .owned
            .iter()
            .map(|(k, v)| (*k, v.iter().copied().collect()))
            .collect();
        assert_eq!(from_routes, owned);
        for v in t.owned.values() {
            let set: std::collections::BTreeSet<_> = v.iter().collect();
            assert_eq!(set.len(), v.len(), "a prefix listed twice");
        }
    }

    /// Where [`place`] sends a packet, by peer index (`Some(0)`: to the
    /// TUN for the kernel, past the translator).
    fn placed(
        t: &Table,
        own: &OwnAddrs,
        forward: NodeToNode,
        from: &Arc<Peer>,
        src: &str,
        dst: &str,
    ) -> Result<Option<u32>, DropReason> {
        match place(
            t,
            own,
            forward,
            from,
            src.parse().unwrap(),
            Some(dst.parse().unwrap()),
        ) {
            Place::Tun => Ok(None),
            Place::Kernel => Ok(Some(0)),
            Place::Peer(p) => Ok(Some(p.index)),
            Place::Drop(r) => Err(r),
        }
    }

    /// Node 1 at 100.64.0.2, node 2 at 100.64.0.3, and node 3 holding a
    /// prefix around the hub's own 100.64.0.1 and fd77::1 (as a peer set
    /// over UAPI or by an older state may).
    fn hub_table() -> (Table, OwnAddrs, [Arc<Peer>; 3]) {
        let peers = [test_peer(1), test_peer(2), test_peer(3)];
        let mut t = Table::default();
        for p in &peers {
            add(&mut t, p);
        }
        t.claim(&peers[0], &nets(&["100.64.0.2/32"]));
        t.claim(&peers[1], &nets(&["100.64.0.3/32"]));
        t.claim(&peers[2], &nets(&["100.64.0.0/30", "fd77::/64"]));
        let own = OwnAddrs::new(&nets(&["100.64.0.1/10", "fd77::1/48", "100.64.0.1/32"]));
        (t, own, peers)
    }

    #[test]
    fn the_hubs_own_addresses_are_never_a_peers() {
        let (t, own, [a, _, c]) = hub_table();
        assert_eq!(own.0.len(), 2, "host parts, once each");
        for forward in [NodeToNode::Direct, NodeToNode::Off, NodeToNode::Kernel] {
            // For the hub: the TUN, though node 3's prefix holds it.
            assert_eq!(
                placed(&t, &own, forward, &a, "100.64.0.2", "100.64.0.1"),
                Ok(None)
            );
            // From the hub's address: dropped, though node 3 may send from
            // its prefix.
            assert_eq!(
                placed(&t, &own, forward, &c, "100.64.0.1", "100.64.0.2"),
                Err(DropReason::SourceNotAllowed)
            );
            assert_eq!(
                placed(&t, &own, forward, &c, "fd77::1", "fd77::5"),
                Err(DropReason::SourceNotAllowed)
            );
        }
        // The rest of node 3's prefix is still its own.
        assert_eq!(
            placed(&t, &own, NodeToNode::Direct, &a, "100.64.0.2", "100.64.0.0"),
            Ok(Some(3))
        );
        assert_eq!(
            placed(&t, &own, NodeToNode::Direct, &c, "fd77::2", "100.64.0.2"),
            Ok(Some(1))
        );
        // Cryptokey routing as before: a source that is another peer's.
        assert_eq!(
            placed(&t, &own, NodeToNode::Direct, &a, "100.64.0.3", "100.64.0.1"),
            Err(DropReason::SourceNotAllowed)
        );
    }

    #[test]
    fn node_to_node_traffic_goes_where_the_setting_says() {
        let (t, own, [a, b, _]) = hub_table();
        let to_b = |f| placed(&t, &own, f, &a, "100.64.0.2", "100.64.0.3");
        assert_eq!(to_b(NodeToNode::Direct), Ok(Some(2)));
        // To the kernel as it is: not through the translator.
        assert_eq!(to_b(NodeToNode::Kernel), Ok(Some(0)));
        assert_eq!(to_b(NodeToNode::Off), Err(DropReason::NodeToNode));
        for f in [NodeToNode::Direct, NodeToNode::Kernel, NodeToNode::Off] {
            // Elsewhere (no peer's) and back to the sender: the TUN's.
            assert_eq!(placed(&t, &own, f, &a, "100.64.0.2", "192.0.2.1"), Ok(None));
            assert_eq!(
                placed(&t, &own, f, &b, "100.64.0.3", "100.64.0.3"),
                Ok(None)
            );
        }
        for n in NodeToNode::NAMES {
            assert_eq!(NodeToNode::parse(n).map(NodeToNode::as_str), Some(n));
            let m = NodeToNode::parse(n).unwrap();
            assert_eq!(NodeToNode::from_u8(m.to_u8()), m);
        }
        assert_eq!(NodeToNode::parse("Direct"), None);
    }

    /// The drop a packet that [`place`] refuses is counted under.
    #[test]
    fn refused_node_to_node_packets_have_a_counter() {
        let d = DropCounters::default();
        let (t, own, [a, _, _]) = hub_table();
        if let Err(r) = placed(&t, &own, NodeToNode::Off, &a, "100.64.0.2", "100.64.0.3") {
            d.inc(r);
        }
        assert_eq!(d.get(DropReason::NodeToNode), 1);
        assert_eq!(d.snapshot().get("node_to_node"), Some(&1));
    }

    /// Where [`place_translated`] sends a packet the translator made, as
    /// [`placed`] says it.
    fn translated(
        t: &Table,
        own: &OwnAddrs,
        forward: NodeToNode,
        from: Option<&Arc<Peer>>,
        dst: &str,
    ) -> Result<Option<u32>, DropReason> {
        match place_translated(t, own, forward, from, Some(dst.parse().unwrap())) {
            Place::Tun => Ok(None),
            Place::Kernel => Ok(Some(0)),
            Place::Peer(p) => Ok(Some(p.index)),
            Place::Drop(r) => Err(r),
        }
    }

    #[test]
    fn translated_node_to_node_traffic_goes_where_the_setting_says() {
        let (t, own, [a, b, c]) = hub_table();
        let modes = [NodeToNode::Direct, NodeToNode::Kernel, NodeToNode::Off];
        for f in modes {
            // From node 1 to node 2 (node 1's IPv6 through pool6 to node
            // 2's IPv4, say): as an untranslated packet would go, `Kernel`
            // to the TUN in its translated form.
            let to_b = translated(&t, &own, f, Some(&a), "100.64.0.3");
            assert_eq!(
                to_b,
                placed(&t, &own, f, &a, "100.64.0.2", "100.64.0.3"),
                "{f:?}"
            );
            assert_eq!(
                translated(&t, &own, f, Some(&b), "fd77::9"),
                placed(&t, &own, f, &b, "100.64.0.3", "fd77::9"),
                "{f:?}: to node 3's prefix"
            );
            // Back to the sender (an ICMP error, a hairpin): its own.
            assert_eq!(translated(&t, &own, f, Some(&a), "100.64.0.2"), Ok(Some(1)));
            assert_eq!(translated(&t, &own, f, Some(&c), "fd77::9"), Ok(Some(3)));
            // No peer's, or the hub's own (though node 3's prefix holds
            // it): the TUN's.
            assert_eq!(translated(&t, &own, f, Some(&a), "192.0.2.1"), Ok(None));
            assert_eq!(translated(&t, &own, f, Some(&a), "100.64.0.1"), Ok(None));
            assert_eq!(translated(&t, &own, f, Some(&a), "fd77::1"), Ok(None));
            // Read from the TUN: the kernel has decided, the owner takes it.
            assert_eq!(translated(&t, &own, f, None, "100.64.0.3"), Ok(Some(2)));
            assert_eq!(translated(&t, &own, f, None, "192.0.2.1"), Ok(None));
            assert!(matches!(
                place_translated(&t, &own, f, Some(&a), None),
                Place::Tun
            ));
        }
        assert_eq!(
            translated(&t, &own, NodeToNode::Direct, Some(&a), "100.64.0.3"),
            Ok(Some(2))
        );
        assert_eq!(
            translated(&t, &own, NodeToNode::Kernel, Some(&a), "100.64.0.3"),
            Ok(Some(0))
        );
        assert_eq!(
            translated(&t, &own, NodeToNode::Off, Some(&a), "100.64.0.3"),
            Err(DropReason::NodeToNode)
        );
    }

    /// A UDP packet from `src` to `dst`, checksum right.
    fn udp6(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, 12, 17, 64];
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0, 12, 0, 0, 1, 2, 3, 4]);
        let acc = xlat::csum::add(
            xlat::csum::pseudo_v6(&src.octets(), &dst.octets(), 17, 12),
            xlat::csum::sum(&p[40..]),
        );
        let c = xlat::csum::finish(acc).to_be_bytes();
        p[46] = c[0];
        p[47] = c[1];
        p
    }

    /// Node 1 (fd77:1::2) sends through a network-specific pool6 to node
    /// 2's IPv4 address: NAT64 makes it a packet from pool4 that the hub
    /// places as node 1's.
    #[test]
    fn nat64_to_another_node_is_node_to_node_traffic() {
        let (mut t, own, [a, b, _]) = hub_table();
        t.claim(&a, &nets(&["fd77:1::2/128"]));
        let pool6 = xlat::Pool6::new("2001:db8:64::".parse().unwrap(), 96).unwrap();
        let cfg = xlat::Config {
            pool6: Some(pool6),
            ..xlat::Config::default()
        };
        let nat = xlat::nat64::Settings {
            pool4: "100.64.0.64".parse().unwrap(),
            ..xlat::nat64::Settings::default()
        };
        let x = XlatPath::new(Arc::new(cfg), Some(nat), Vec::new(), 10);
        let to_b: Ipv6Addr = pool6.embed([100, 64, 0, 3]).into();
        let pkt = udp6("fd77:1::2".parse().unwrap(), to_b);
        let mut out = vec![0u8; xlat::OUT_BUF_LEN];
        let o = x.on_peer(&pkt, &mut out, 10, peer_owner(&a.public_key), |_| false);
        let Some(xlat::Outcome::Forward(p)) = o else {
            panic!("translated: {o:?}");
        };
        let v4 = p.iter(&out).next().unwrap();
        let (src, dst) = packet::addrs(v4).unwrap();
        assert_eq!(src, "100.64.0.64".parse::<IpAddr>().unwrap(), "from pool4");
        for f in [NodeToNode::Direct, NodeToNode::Kernel, NodeToNode::Off] {
            let to = match place_translated(&t, &own, f, Some(&a), Some(dst)) {
                Place::Tun => Ok(None),
                Place::Kernel => Ok(Some(0)),
                Place::Peer(p) => Ok(Some(p.index)),
                Place::Drop(r) => Err(r),
            };
            assert_eq!(to, translated(&t, &own, f, Some(&a), "100.64.0.3"));
        }
        // What node 2 sends back to pool4 goes through the TUN (the
        // kernel routes pool4 back to the translator) to its session's
        // node: another node, refused when nodes do not reach each other.
        assert_eq!(
            x.returns("100.64.0.64".parse().unwrap()),
            Some(Return::Pool4)
        );
        assert!(returns_to_another(&t, &b, Some(Return::Pool4)));
    }

    #[test]
    fn what_comes_back_through_the_translator_to_another_node_is_refused() {
        let (t, _, [a, b, c]) = hub_table();
        let to = |s: &str| Some(Return::To(s.parse().unwrap()));
        // Not the translator's, or for nobody: the kernel's routes decide.
        assert!(!returns_to_another(&t, &a, None));
        assert!(!returns_to_another(&t, &a, to("fd99::5")));
        // Mapped onto node 3's IPv6 prefix: another node's, unless node 3
        // sent it.
        assert!(returns_to_another(&t, &a, to("fd77::5")));
        assert!(returns_to_another(&t, &b, to("fd77::5")));
        assert!(!returns_to_another(&t, &c, to("fd77::5")));
        // Pool4: some NAT64 session's.
        assert!(returns_to_another(&t, &c, Some(Return::Pool4)));
    }

    #[test]
    fn the_table_tracks_each_peers_prefixes() {
        let (a, b) = (test_peer(1), test_peer(2));
        let mut t = Table::default();
        add(&mut t, &a);
        add(&mut t, &b);
        t.claim(&a, &nets(&["10.0.0.1/24", "10.1.0.0/16", "10.0.0.0/24"]));
        consistent(&t);
        assert_eq!(t.owned[&a.public_key].len(), 2);
        // The newest claim wins; the loser keeps the rest.
        t.claim(&b, &nets(&["10.0.0.0/24", "fd00::/64"]));
        consistent(&t);
        let owner = |ip: &str| t.routes.lookup(ip.parse().unwrap()).map(|p| p.index);
        assert_eq!(owner("10.0.0.5"), Some(2));
        assert_eq!(owner("10.1.2.3"), Some(1));
        // Replacing: only the peer's own prefixes go.
        t.clear_routes(&a.public_key);
        consistent(&t);
        assert_eq!(
            t.routes
                .lookup("10.1.2.3".parse().unwrap())
                .map(|p| p.index),
            None
        );
        assert_eq!(
            t.routes
                .lookup("10.0.0.5".parse().unwrap())
                .map(|p| p.index),
            Some(2)
        );
        // A peer that lost everything it held has no entry.
        t.claim(&a, &nets(&["10.9.0.0/16"]));
        t.claim(&b, &nets(&["10.9.0.0/16"]));
        consistent(&t);
        assert!(!t.owned.contains_key(&a.public_key));
        t.remove(&b.public_key);
        consistent(&t);
        assert!(t.routes.is_empty() && t.owned.is_empty());
    }
}
