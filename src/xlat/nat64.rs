//! Stateful NAT64 (RFC 6146): the binding information base (BIB) and session
//! table, pure and sans-IO.
//!
//! gatewire implements NAT64 as NAPT on the IPv6 side in front of the
//! stateless translator:
//!
//! * **Outbound** (IPv6 node → IPv4 server): [`Table::outbound`] rewrites the
//!   IPv6 source to `pool6 + pool4` and the source port (or ICMP echo
//!   identifier) to the allocated IPv4 port, updating the checksum
//!   incrementally; [`super::translate_6to4`] then turns the packet into IPv4
//!   with source `pool4:port`.
//! * **Inbound** (IPv4 server → pool4): the IPv4 packet is translated to IPv6
//!   first (its destination becomes `pool6 + pool4`), then [`Table::inbound`]
//!   finds the session and rewrites the destination back to the node's address
//!   and port. ICMP errors about a NAT64 session get their inner packet mapped
//!   back too; so do ICMPv6 errors a node sends about a packet it received
//!   through NAT64 ([`Table::outbound`]), from the session's node only.
//!
//! Mappings are endpoint-independent (one IPv4 port per IPv6 transport address,
//! whatever the remote); filtering is address-and-port-dependent for TCP and
//! ICMP and endpoint-independent for UDP (RFC 6146 §3.5.1.1 allows both).
//! Timers are RFC 6146's: UDP 5 min, TCP established 2 h 4 min, TCP transitory
//! 4 min, ICMP query 60 s. The table never reads a clock: every call takes
//! `now` in seconds from an arbitrary origin. Its size is bounded
//! ([`Settings::max_sessions`]); when full, new sessions are refused with
//! [`DropReason::Nat64TableFull`] after expired ones are swept. So that one
//! node cannot take the whole table (and, each binding holding at least one
//! session, every pool4 port), the sessions one node opens are bounded too,
//! all protocols together ([`Settings::max_sessions_per_host`]). A node is
//! what the caller names with the [`Owner`] it passes to [`Table::outbound`]
//! (on a hub: a peer, whatever source addresses its allowed IPs give it, so
//! that a peer routing a prefix cannot open sessions from address after
//! address in it; for packets from the hub's own side, one source address).
//! Each session keeps the owner it was opened under and leaves that owner's
//! count when it expires, whoever sends on it meanwhile. A new session for an
//! owner at its bound is refused with [`DropReason::Nat64HostLimit`] after
//! expired sessions are swept; its existing sessions go on. Sessions IPv4
//! hosts open on a node's UDP mapping (endpoint-independent filtering) are
//! counted apart, against the node the mapping belongs to (the owner whose
//! session made the binding), at most [`Settings::max_sessions_per_host`]
//! on all of one node's mappings together: anyone can send those, so they
//! must not use up the node's own room, and one node's mappings, however
//! many it opens, must not take the other nodes' room for them. Past that
//! bound such a session is refused with [`DropReason::Nat64InboundLimit`].
//! They are also opened only while the table is under three quarters full,
//! and at most [`MAX_INBOUND_PER_MAPPING`] on one mapping.
//! Fragments other than the first carry no port: the mapping a first
//! fragment gets is kept for [`FRAG_TIMEOUT`] seconds under its addresses,
//! protocol and fragment identification, and the later fragments of that
//! datagram get the same address (RFC 6146 §3.4 tracks fragments the same
//! way). A later fragment that arrives before its first is held (RFC 6146
//! §3.5: a NAT64 MUST handle fragments arriving out of order, with bounded
//! resources): the call answers [`Step::Held`], and once the first fragment
//! has been mapped the held ones come out of [`Table::take_released`]
//! rewritten. At most [`MAX_HELD_PER_DATAGRAM`] fragments per datagram and
//! [`MAX_HELD_BYTES`] bytes in all are held, each for [`FRAG_TIMEOUT`]
//! seconds; past those bounds, or after its first's mapping expired, a later
//! fragment is dropped with [`DropReason::Fragment`], and held fragments that
//! expire are counted ([`Table::take_expired_held`]). At most
//! [`MAX_FRAG_FLOWS`] datagrams are tracked at once, and at most
//! [`MAX_FRAG_FLOWS_PER_SENDER`] of one sender's (a node's outbound, an IPv4
//! host's inbound): a sender past its share makes room from its own oldest
//! datagrams, and a new datagram in a full table from the oldest of all, so
//! that first fragments from one sender (or a few) cannot stop the others'
//! fragmented datagrams being tracked.
//!
//! Remote addresses the stateless translator refuses (0/8, loopback,
//! multicast, ...; with the Well-Known Prefix, RFC 6052 §3.1, any non-global
//! one, see [`Pool6::refuses`]) get no session either way. `pool6 + pool4`
//! itself never leaves the hub as an address, so pool4 may be non-global:
//! translate the table's packets with a [`super::Config`] whose pool6 has
//! that check off ([`Pool6::with_wkp_strict`]).
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use super::addr;
use super::buf;
use super::csum;
use super::{DropReason, Pool6};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

/// RFC 6146 §4: UDP session lifetime (seconds).
pub const UDP_TIMEOUT: u64 = 5 * 60;
/// RFC 6146 §4: established TCP session lifetime (seconds).
pub const TCP_EST_TIMEOUT: u64 = 2 * 3600 + 4 * 60;
/// RFC 6146 §4: transitory TCP session lifetime (seconds).
pub const TCP_TRANS_TIMEOUT: u64 = 4 * 60;
/// RFC 6146 §4: ICMP query session lifetime (seconds).
pub const ICMP_TIMEOUT: u64 = 60;
/// How long a first fragment's mapping serves the later fragments of its
/// datagram (seconds; RFC 6146's FRAGMENT_MIN is 2, `now` counts whole seconds).
pub const FRAG_TIMEOUT: u64 = 5;
/// Most fragmented datagrams tracked at once.
pub const MAX_FRAG_FLOWS: usize = 4096;
/// Most fragmented datagrams of one sender tracked at once (a node's
/// outbound, an IPv4 host's inbound): a sixteenth of the table, so that it
/// takes many senders to fill it. A sender past it loses its own oldest:
/// each of its datagrams is still tracked until it has started 256 more,
/// ample for fragments that travel together.
pub const MAX_FRAG_FLOWS_PER_SENDER: usize = MAX_FRAG_FLOWS / 16;
/// Most later fragments held for one datagram whose first has not come.
pub const MAX_HELD_PER_DATAGRAM: usize = 64;
/// Most bytes of later fragments held, all datagrams together (counting the
/// released ones not yet taken).
pub const MAX_HELD_BYTES: usize = 256 * 1024;
/// Sessions an IPv4 host's packets may open on one mapping by themselves
/// (endpoint-independent filtering: a node's UDP mapping takes datagrams
/// from anyone), beyond which only the node's own packets open more.
pub const MAX_INBOUND_PER_MAPPING: u32 = 1024;

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP6: u8 = 58;
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;

/// The node a session counts against ([`Settings::max_sessions_per_host`]),
/// as the caller of [`Table::outbound`] names it. The table only compares
/// owners; on a hub, a peer's is the first 16 bytes of its public key (the
/// same across reloads, whatever addresses the peer sends from), and the
/// owner of a packet from the hub's own TUN is its IPv6 source address.
pub type Owner = [u8; 16];

/// NAT64 settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The IPv4 address sessions are mapped to.
    pub pool4: Ipv4Addr,
    /// Lowest port (and ICMP identifier) to allocate.
    pub port_min: u16,
    /// Highest port (and ICMP identifier) to allocate.
    pub port_max: u16,
    /// Most sessions (all protocols together).
    pub max_sessions: usize,
    /// Most sessions one node opens with its own packets, all protocols
    /// together: the sessions of one [`Owner`] (on a hub, one peer, whatever
    /// addresses it sends from; for packets from the hub's own TUN, one
    /// source address), not those IPv4 hosts open on its UDP mappings;
    /// and, counted apart, most sessions IPv4 hosts open on its UDP
    /// mappings.
    pub max_sessions_per_host: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            pool4: Ipv4Addr::new(192, 0, 2, 1),
            port_min: 1024,
            port_max: 65535,
            max_sessions: 65536,
            max_sessions_per_host: 65536 / 4,
        }
    }
}

/// Transport protocol of a BIB entry or session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    /// ICMP queries (echo); the "port" is the identifier.
    Icmp,
}

impl Proto {
    fn idx(self) -> usize {
        match self {
            Proto::Tcp => 0,
            Proto::Udp => 1,
            Proto::Icmp => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct V6Key {
    proto: Proto,
    addr: [u8; 16],
    port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct V4Key {
    proto: Proto,
    port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SessKey {
    proto: Proto,
    port4: u16,
    remote: [u8; 4],
    rport: u16,
}

/// A fragmented datagram in flight, as its fragments name it (the addresses
/// as they reach the table, before rewriting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FragKey {
    outbound: bool,
    proto: u8,
    src: [u8; 16],
    dst: [u8; 16],
    id: u32,
}

/// Who a tracked datagram counts against ([`MAX_FRAG_FLOWS_PER_SENDER`]):
/// outbound the node that sent it, inbound the IPv4 host (anyone can send
/// first fragments to a node's UDP mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum FragSender {
    Node(Owner),
    Host([u8; 4]),
}

/// The address the first fragment was rewritten to (source outbound,
/// destination inbound).
#[derive(Debug, Clone, Copy)]
struct FragFlow {
    addr: [u8; 16],
    expires: u64,
    sender: FragSender,
    /// When its first came, in [`Table::frag_seq`]'s order (its key in
    /// [`Table::frag_age`]).
    seq: u64,
}

/// Later fragments waiting for their first.
#[derive(Debug)]
struct Held {
    pkts: Vec<Vec<u8>>,
    expires: u64,
}

/// What [`Table::outbound`] and [`Table::inbound`] did with a packet they did
/// not drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Rewritten in place: translate and send it.
    Mapped,
    /// A later fragment whose first has not come: the table keeps a copy and
    /// gives it back, rewritten, from [`Table::take_released`] once the first
    /// is mapped. Send nothing now.
    Held,
}

/// A held fragment whose first has been mapped: rewritten, ready to go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// True for the outbound direction (IPv6 node → IPv4: translate it to
    /// IPv4 next); false for inbound (already IPv6, for the node).
    pub outbound: bool,
    /// The source address its datagram reached the table with: outbound,
    /// the node's (the packet's own source is `pool6 + pool4` by now);
    /// inbound, `pool6 +` the IPv4 sender.
    pub source: [u8; 16],
    /// The IPv6 packet.
    pub packet: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
struct Bib {
    v6: V6Key,
    sessions: u32,
    /// The node whose session made the binding: sessions IPv4 hosts open on
    /// it count against that node's strangers' bound. A binding keeps it
    /// for as long as it lasts, also once that node's own sessions on it
    /// have ended (strangers' sessions hold it) or another node sends from
    /// its address (after a reload): so no change of hands resets the count.
    owner: Owner,
}

/// Simplified RFC 6146 §3.5.2 TCP states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    /// SYN seen from IPv6 only.
    V6Init,
    /// SYN seen both ways (or data after a reset).
    Established,
    /// FIN seen from one side.
    FinOne { from_v6: bool },
    /// FIN seen from both sides.
    FinBoth,
    /// RST seen.
    Trans,
}

/// Which count a session is in, and whose, from when it is opened until it
/// expires (whoever sends on it meanwhile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Opened by the node's own packet: one of its
    /// [`Settings::max_sessions_per_host`].
    Own(Owner),
    /// Opened by an IPv4 host's datagram on a UDP mapping of the node's:
    /// one of the strangers' sessions bounded for it, apart from its own.
    Stranger(Owner),
}

#[derive(Debug, Clone, Copy)]
struct Session {
    expires: u64,
    tcp: TcpState,
    counted: Counted,
}

/// What [`Table::lookup`] reports about a session (for tests and `show`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionInfo {
    pub v6_addr: [u8; 16],
    pub v6_port: u16,
    pub port4: u16,
    pub expires: u64,
    pub tcp: TcpState,
    /// Whose count it is in, and which.
    pub counted: Counted,
}

/// The BIB and session table.
#[derive(Debug)]
pub struct Table {
    settings: Settings,
    bib6: HashMap<V6Key, u16>,
    bib4: HashMap<V4Key, Bib>,
    sessions: HashMap<SessKey, Session>,
    /// Sessions each owner opened itself (no entry for 0).
    owners: HashMap<Owner, u32>,
    /// Sessions IPv4 hosts opened on each owner's UDP mappings (no entry
    /// for 0).
    strangers: HashMap<Owner, u32>,
    frags: HashMap<FragKey, FragFlow>,
    /// Every tracked datagram, oldest first (the one a full table gives up).
    frag_age: BTreeMap<u64, FragKey>,
    /// Each sender's tracked datagrams, by age (none empty).
    frag_senders: HashMap<FragSender, BTreeSet<u64>>,
    frag_seq: u64,
    held: HashMap<FragKey, Held>,
    held_bytes: usize,
    released: std::collections::VecDeque<Released>,
    released_bytes: usize,
    expired_held: u64,
    held_total: u64,
    cursor: [u16; 3],
    /// Bindings per protocol ([`Proto::idx`]): a range used up is known
    /// without scanning it.
    bound: [u32; 3],
    next_sweep: u64,
    /// Ports [`Self::alloc_port`] has looked at, for the tests.
    #[cfg(test)]
    probes: u64,
}

/// Where the transport header is and what it is.
struct L4 {
    proto: Proto,
    off: usize,
    /// ICMPv6 type (0 for TCP/UDP).
    icmp_type: u8,
    /// The fragment identification when the packet is a first fragment.
    frag_id: Option<u32>,
}

/// What an IPv6 packet holds for the table.
enum Parsed {
    /// A whole packet or a first fragment: its transport header.
    L4(L4),
    /// A later fragment: its upper-layer protocol and identification.
    Later { proto: u8, id: u32 },
}

/// Headers found before the upper-layer data.
pub(super) struct Headers {
    pub(super) nh: u8,
    pub(super) off: usize,
    /// Fragment identification and whether this is a later fragment.
    pub(super) frag: Option<(u32, bool)>,
}

/// Finds the upper-layer header of an IPv6 packet, skipping Hop-by-Hop,
/// Routing and Destination Options headers and noting a Fragment header.
pub(super) fn find_l4(pkt: &[u8]) -> Result<Headers, DropReason> {
    if buf::u8at(pkt, 0)? >> 4 != 6 {
        return Err(DropReason::BadHeader);
    }
    let mut nh = buf::u8at(pkt, 6)?;
    let mut off = 40usize;
    let mut frag = None;
    for _ in 0..8 {
        match nh {
            0 | 43 | 60 => {
                let next = buf::u8at(pkt, off)?;
                let len = (usize::from(buf::u8at(pkt, off + 1)?) + 1) * 8;
                nh = next;
                off += len;
            }
            44 => {
                if frag.is_some() {
                    // Two Fragment headers: not a packet any sender makes.
                    return Err(DropReason::BadHeader);
                }
                let next = buf::u8at(pkt, off)?;
                let offset = buf::u16at(pkt, off + 2)? & 0xfff8;
                frag = Some((buf::u32at(pkt, off + 4)?, offset != 0));
                nh = next;
                off += 8;
            }
            _ => return Ok(Headers { nh, off, frag }),
        }
    }
    Err(DropReason::BadHeader)
}

fn classify(pkt: &[u8]) -> Result<Parsed, DropReason> {
    let h = find_l4(pkt)?;
    let (nh, off) = (h.nh, h.off);
    let frag_id = match h.frag {
        Some((id, true)) => return Ok(Parsed::Later { proto: nh, id }),
        Some((id, false)) => Some(id),
        None => None,
    };
    let (proto, need) = match nh {
        TCP => (Proto::Tcp, 20),
        UDP => (Proto::Udp, 8),
        ICMP6 => (Proto::Icmp, 8),
        _ => return Err(DropReason::UnsupportedProtocol),
    };
    buf::get(pkt, off, need)?;
    let icmp_type = if proto == Proto::Icmp {
        buf::u8at(pkt, off)?
    } else {
        0
    };
    Ok(Parsed::L4(L4 {
        proto,
        off,
        icmp_type,
        frag_id,
    }))
}

/// The protocol number of a table protocol, as a Fragment header names it.
fn proto_number(p: Proto) -> u8 {
    match p {
        Proto::Tcp => TCP,
        Proto::Udp => UDP,
        Proto::Icmp => ICMP6,
    }
}

/// Offset of the transport checksum from the start of the transport header.
fn csum_off(proto: Proto) -> usize {
    match proto {
        Proto::Tcp => 16,
        Proto::Udp => 6,
        Proto::Icmp => 2,
    }
}

/// Rewrites an IPv6 address at `addr_off` and a 16-bit port/identifier at
/// `port_off`, both covered by the transport checksum at `csum_at` (when the
/// checksum lies inside `pkt`), incrementally (RFC 1624).
fn rewrite(
    pkt: &mut [u8],
    addr_off: usize,
    new_addr: &[u8; 16],
    port_off: usize,
    new_port: u16,
    csum_at: Option<usize>,
    udp: bool,
) -> Result<(), DropReason> {
    let old_addr = buf::arr16(pkt, addr_off)?;
    let old_port = buf::u16at(pkt, port_off)?;
    if let Some(c) = csum_at {
        if let Ok(old) = buf::u16at(pkt, c) {
            // A zero UDP checksum means "none": leave it.
            if !(udp && old == 0) {
                let removed = csum::add(csum::sum(&old_addr), u32::from(old_port));
                let added = csum::add(csum::sum(new_addr), u32::from(new_port));
                let mut n = csum::update(old, removed, added);
                if udp && n == 0 {
                    n = 0xffff;
                }
                buf::put16(pkt, c, n)?;
            }
        }
    }
    buf::put(pkt, addr_off, new_addr)?;
    buf::put16(pkt, port_off, new_port)?;
    Ok(())
}

impl Table {
    pub fn new(settings: Settings) -> Self {
        let min = settings.port_min;
        Table {
            settings,
            bib6: HashMap::new(),
            bib4: HashMap::new(),
            sessions: HashMap::new(),
            owners: HashMap::new(),
            strangers: HashMap::new(),
            frags: HashMap::new(),
            frag_age: BTreeMap::new(),
            frag_senders: HashMap::new(),
            frag_seq: 0,
            held: HashMap::new(),
            held_bytes: 0,
            released: std::collections::VecDeque::new(),
            released_bytes: 0,
            expired_held: 0,
            held_total: 0,
            cursor: [min; 3],
            bound: [0; 3],
            next_sweep: 0,
            #[cfg(test)]
            probes: 0,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Number of live sessions (expired ones count until swept).
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Number of BIB entries.
    pub fn bindings(&self) -> usize {
        self.bib4.len()
    }

    /// Sessions `owner` opened itself, from whatever addresses (expired
    /// ones count until swept).
    pub fn owner_sessions(&self, owner: Owner) -> usize {
        self.owners.get(&owner).map_or(0, |&n| n as usize)
    }

    /// Owners with at least one session of their own.
    pub fn owners(&self) -> usize {
        self.owners.len()
    }

    /// Sessions IPv4 hosts opened on `owner`'s UDP mappings (expired ones
    /// count until swept).
    pub fn stranger_sessions(&self, owner: Owner) -> usize {
        self.strangers.get(&owner).map_or(0, |&n| n as usize)
    }

    /// Fragmented datagrams whose first fragment's mapping is kept.
    pub fn fragment_flows(&self) -> usize {
        self.frags.len()
    }

    /// Later fragments held for a first that has not come, and their bytes.
    pub fn held_fragments(&self) -> (usize, usize) {
        (
            self.held.values().map(|h| h.pkts.len()).sum(),
            self.held_bytes,
        )
    }

    /// Later fragments held since the table was made (each came before its
    /// first: the network reordered them).
    pub fn held_total(&self) -> u64 {
        self.held_total
    }

    /// The next held fragment whose first has been mapped, rewritten.
    pub fn take_released(&mut self) -> Option<Released> {
        let r = self.released.pop_front()?;
        self.released_bytes = self.released_bytes.saturating_sub(r.packet.len());
        Some(r)
    }

    /// Held fragments ready in [`Self::take_released`].
    pub fn released_len(&self) -> usize {
        self.released.len()
    }

    /// Held fragments dropped because their first never came in time, since
    /// the last call (the caller counts them under [`DropReason::Fragment`]).
    pub fn take_expired_held(&mut self) -> u64 {
        std::mem::take(&mut self.expired_held)
    }

    /// When `l4` is a first fragment (from `src` to `dst` as it reached the
    /// table, sent by `sender`: a node's outbound, an IPv4 host's inbound),
    /// keeps the address it was given for the later fragments of its
    /// datagram.
    fn remember_first(
        &mut self,
        l4: &L4,
        src: [u8; 16],
        dst: [u8; 16],
        sender: FragSender,
        addr: [u8; 16],
        now: u64,
    ) {
        if let Some(id) = l4.frag_id {
            let k = FragKey {
                outbound: matches!(sender, FragSender::Node(_)),
                proto: proto_number(l4.proto),
                src,
                dst,
                id,
            };
            self.remember_fragment(k, sender, addr, now);
        }
    }

    /// Keeps the address a first fragment was given, for the later fragments
    /// of its datagram. A sender at [`MAX_FRAG_FLOWS_PER_SENDER`] gives up its
    /// own oldest datagram, and a full table its oldest of all (their later
    /// fragments, if any still come, are then held for a first that does not
    /// come, and counted when they expire): a new datagram is always tracked,
    /// and one sender's cannot push out the others'. Expired flows leave with
    /// the once-a-second sweep, never with a scan per packet.
    fn remember_fragment(&mut self, k: FragKey, sender: FragSender, addr: [u8; 16], now: u64) {
        if let Some(h) = self.held.remove(&k) {
            let at = if k.outbound { 8 } else { 24 };
            for mut packet in h.pkts {
                self.held_bytes = self.held_bytes.saturating_sub(packet.len());
                if buf::put(&mut packet, at, &addr).is_ok() {
                    self.released_bytes = self.released_bytes.saturating_add(packet.len());
                    self.released.push_back(Released {
                        outbound: k.outbound,
                        source: k.src,
                        packet,
                    });
                }
            }
        }
        // A first seen again (a duplicate, or its identification reused)
        // starts afresh, as the newest.
        self.forget_fragment(&k);
        let oldest_own = self
            .frag_senders
            .get(&sender)
            .filter(|s| s.len() >= MAX_FRAG_FLOWS_PER_SENDER)
            .and_then(|s| s.first());
        let oldest = match oldest_own {
            Some(seq) => Some(seq),
            None if self.frags.len() >= MAX_FRAG_FLOWS => self.frag_age.keys().next(),
            None => None,
        };
        if let Some(old) = oldest.and_then(|seq| self.frag_age.get(seq)).copied() {
            self.forget_fragment(&old);
        }
        let seq = self.frag_seq;
        self.frag_seq = seq.wrapping_add(1);
        self.frags.insert(
            k,
            FragFlow {
                addr,
                expires: now.saturating_add(FRAG_TIMEOUT),
                sender,
                seq,
            },
        );
        self.frag_age.insert(seq, k);
        self.frag_senders.entry(sender).or_default().insert(seq);
    }

    /// Stops tracking a datagram, in the table and in both orders.
    fn forget_fragment(&mut self, k: &FragKey) {
        if let Some(f) = self.frags.remove(k) {
            unlink_fragment(&mut self.frag_age, &mut self.frag_senders, &f);
        }
    }

    /// A later fragment: gets the address its first fragment got (the source
    /// outbound, the destination inbound); or, when the first has not come,
    /// is held for it within the bounds; or is dropped.
    fn later_fragment(
        &mut self,
        pkt: &mut [u8],
        outbound: bool,
        proto: u8,
        id: u32,
        now: u64,
    ) -> Result<Step, DropReason> {
        let k = FragKey {
            outbound,
            proto,
            src: buf::arr16(pkt, 8)?,
            dst: buf::arr16(pkt, 24)?,
            id,
        };
        match self.frags.get(&k) {
            Some(flow) if flow.expires > now => {
                buf::put(pkt, if outbound { 8 } else { 24 }, &flow.addr)?;
                Ok(Step::Mapped)
            }
            // Its first came and its mapping has expired: too late.
            Some(_) => Err(DropReason::Fragment),
            None => self.hold(k, pkt, now),
        }
    }

    /// Keeps a copy of a later fragment until its first comes, within
    /// [`MAX_HELD_PER_DATAGRAM`] and [`MAX_HELD_BYTES`] (released fragments
    /// the caller has not taken yet count too, so the table stays bounded
    /// whatever the caller does).
    fn hold(&mut self, k: FragKey, pkt: &[u8], now: u64) -> Result<Step, DropReason> {
        let in_use = self.held_bytes.saturating_add(self.released_bytes);
        if in_use.saturating_add(pkt.len()) > MAX_HELD_BYTES {
            return Err(DropReason::Fragment);
        }
        let h = self.held.entry(k).or_insert_with(|| Held {
            pkts: Vec::new(),
            expires: now.saturating_add(FRAG_TIMEOUT),
        });
        if h.pkts.len() >= MAX_HELD_PER_DATAGRAM {
            return Err(DropReason::Fragment);
        }
        h.pkts.push(pkt.to_vec());
        self.held_bytes = self.held_bytes.saturating_add(pkt.len());
        self.held_total = self.held_total.saturating_add(1);
        Ok(Step::Held)
    }

    /// Removes every session that expired at or before `now`, and the BIB
    /// entries left without a session.
    pub fn expire(&mut self, now: u64) {
        let (bib4, owners, strangers) = (&mut self.bib4, &mut self.owners, &mut self.strangers);
        self.sessions.retain(|k, s| {
            if s.expires > now {
                return true;
            }
            if let Some(b) = bib4.get_mut(&V4Key {
                proto: k.proto,
                port: k.port4,
            }) {
                b.sessions = b.sessions.saturating_sub(1);
            }
            // The count it was opened in, whoever sent on it since.
            match &s.counted {
                Counted::Own(o) => leave(owners, o),
                Counted::Stranger(o) => leave(strangers, o),
            }
            false
        });
        let (frag_age, frag_senders) = (&mut self.frag_age, &mut self.frag_senders);
        self.frags.retain(|_, f| {
            if f.expires > now {
                return true;
            }
            unlink_fragment(frag_age, frag_senders, f);
            false
        });
        let (held_bytes, expired_held) = (&mut self.held_bytes, &mut self.expired_held);
        self.held.retain(|_, h| {
            if h.expires > now {
                return true;
            }
            for p in &h.pkts {
                *held_bytes = held_bytes.saturating_sub(p.len());
            }
            *expired_held = expired_held.saturating_add(h.pkts.len() as u64);
            false
        });
        let (bib6, bound) = (&mut self.bib6, &mut self.bound);
        bib4.retain(|_, b| {
            if b.sessions == 0 {
                bib6.remove(&b.v6);
                if let Some(n) = bound.get_mut(b.v6.proto.idx()) {
                    *n = n.saturating_sub(1);
                }
                false
            } else {
                true
            }
        });
        self.next_sweep = now.saturating_add(1);
    }

    fn maybe_sweep(&mut self, now: u64) {
        if now >= self.next_sweep {
            self.expire(now);
        }
    }

    /// The session for an IPv4-side 5-tuple, if any (expired or not).
    pub fn lookup(
        &self,
        proto: Proto,
        port4: u16,
        remote: Ipv4Addr,
        rport: u16,
    ) -> Option<SessionInfo> {
        let k = SessKey {
            proto,
            port4,
            remote: remote.octets(),
            rport,
        };
        let s = self.sessions.get(&k)?;
        let b = self.bib4.get(&V4Key { proto, port: port4 })?;
        Some(SessionInfo {
            v6_addr: b.v6.addr,
            v6_port: b.v6.port,
            port4,
            expires: s.expires,
            tcp: s.tcp,
            counted: s.counted,
        })
    }

    fn alloc_port(&mut self, proto: Proto, preferred: u16) -> Result<u16, DropReason> {
        let (min, max) = (self.settings.port_min, self.settings.port_max);
        if min > max {
            return Err(DropReason::Nat64PortsExhausted);
        }
        if (min..=max).contains(&preferred)
            && !self.bib4.contains_key(&V4Key {
                proto,
                port: preferred,
            })
        {
            return Ok(preferred);
        }
        let span = u32::from(max - min) + 1;
        // Every port taken: say so at once rather than look at each of them
        // (for every new flow, under the table's lock).
        let bound = self.bound.get(proto.idx()).copied().unwrap_or(0);
        if bound >= span {
            return Err(DropReason::Nat64PortsExhausted);
        }
        let cur = self
            .cursor
            .get_mut(proto.idx())
            .ok_or(DropReason::BadHeader)?;
        for _ in 0..span {
            #[cfg(test)]
            {
                self.probes += 1;
            }
            let p = *cur;
            *cur = if p >= max { min } else { p + 1 };
            if p >= min && p <= max && !self.bib4.contains_key(&V4Key { proto, port: p }) {
                return Ok(p);
            }
        }
        Err(DropReason::Nat64PortsExhausted)
    }

    /// Finds or creates the BIB entry and session for an outbound packet;
    /// returns the IPv4 port. A new session counts against `owner`.
    fn outbound_session(
        &mut self,
        v6: V6Key,
        owner: Owner,
        remote: [u8; 4],
        rport: u16,
        creates: bool,
        now: u64,
    ) -> Result<(u16, SessKey), DropReason> {
        if let Some(&port4) = self.bib6.get(&v6) {
            let k = SessKey {
                proto: v6.proto,
                port4,
                remote,
                rport,
            };
            if self.sessions.contains_key(&k) {
                return Ok((port4, k));
            }
        }
        if !creates {
            return Err(DropReason::Nat64NoSession);
        }
        // Room for the session first, in the table and within the owner's
        // bound, so no binding is left without one.
        self.room(now)?;
        self.owner_room(owner, now)?;
        let port4 = match self.bib6.get(&v6) {
            Some(&p) => p,
            None => {
                let p = self.alloc_port(v6.proto, v6.port)?;
                self.bib6.insert(v6, p);
                self.bib4.insert(
                    V4Key {
                        proto: v6.proto,
                        port: p,
                    },
                    Bib {
                        v6,
                        sessions: 0,
                        owner,
                    },
                );
                if let Some(n) = self.bound.get_mut(v6.proto.idx()) {
                    *n = n.saturating_add(1);
                }
                p
            }
        };
        let k = SessKey {
            proto: v6.proto,
            port4,
            remote,
            rport,
        };
        self.insert_session(k, now, Counted::Own(owner))?;
        Ok((port4, k))
    }

    /// Adds a new session on the binding its key names, counting it on the
    /// binding and in the count `counted` names (kept in the session, so
    /// that it leaves the same count). Every session is added here, and
    /// [`Self::expire`] is the only place one leaves, so the counts always
    /// match the sessions. A session already there stays as it is, in the
    /// count it was opened in.
    fn insert_session(&mut self, k: SessKey, now: u64, counted: Counted) -> Result<(), DropReason> {
        let b = self
            .bib4
            .get_mut(&V4Key {
                proto: k.proto,
                port: k.port4,
            })
            .ok_or(DropReason::Nat64NoSession)?;
        if let std::collections::hash_map::Entry::Vacant(v) = self.sessions.entry(k) {
            v.insert(Session {
                expires: now,
                tcp: TcpState::V6Init,
                counted,
            });
            b.sessions = b.sessions.saturating_add(1);
            match counted {
                Counted::Own(o) => join(&mut self.owners, o),
                Counted::Stranger(o) => join(&mut self.strangers, o),
            }
        }
        Ok(())
    }

    /// Whether a datagram from the IPv4 side may not open a session on the
    /// mapping `v4k` by itself: the table is three quarters full, or the
    /// mapping has [`MAX_INBOUND_PER_MAPPING`] sessions.
    fn inbound_crowded(&self, v4k: &V4Key) -> bool {
        let max = self.settings.max_sessions;
        self.sessions.len() >= max - max / 4
            || self
                .bib4
                .get(v4k)
                .is_some_and(|b| b.sessions >= MAX_INBOUND_PER_MAPPING)
    }

    /// Whether `owner` has [`Settings::max_sessions_per_host`] sessions.
    fn owner_full(&self, owner: Owner) -> bool {
        self.owner_sessions(owner) >= self.settings.max_sessions_per_host
    }

    /// Whether IPv4 hosts have opened as many sessions on `owner`'s UDP
    /// mappings as the node may open itself
    /// ([`Settings::max_sessions_per_host`]). The same bound, because a
    /// node's inbound flows (replies on its mappings from servers it did
    /// not write to first, peers reaching a service of its) may be as many
    /// as its outbound ones; and with the default bound, a quarter of the
    /// table, one node and the strangers on its mappings hold at most half
    /// of it, short of the three quarters at which no mapping takes a
    /// stranger's session: the other nodes' mappings still do.
    fn strangers_full(&self, owner: Owner) -> bool {
        self.stranger_sessions(owner) >= self.settings.max_sessions_per_host
    }

    /// Refuses a new session for `owner` at its bound (after a sweep, at most
    /// one a second as for [`Self::room`]).
    fn owner_room(&mut self, owner: Owner, now: u64) -> Result<(), DropReason> {
        if self.owner_full(owner) {
            self.maybe_sweep(now);
            if self.owner_full(owner) {
                return Err(DropReason::Nat64HostLimit);
            }
        }
        Ok(())
    }

    fn room(&mut self, now: u64) -> Result<(), DropReason> {
        if self.sessions.len() >= self.settings.max_sessions {
            // At most one sweep a second: a full table under a flood of new
            // flows would otherwise walk every entry for every packet.
            self.maybe_sweep(now);
            if self.sessions.len() >= self.settings.max_sessions {
                return Err(DropReason::Nat64TableFull);
            }
        }
        Ok(())
    }

    /// Updates a session's state and expiry for a packet.
    fn touch(&mut self, k: &SessKey, from_v6: bool, tcp_flags: u8, now: u64) {
        let Some(s) = self.sessions.get_mut(k) else {
            return;
        };
        let timeout = match k.proto {
            Proto::Udp => UDP_TIMEOUT,
            Proto::Icmp => ICMP_TIMEOUT,
            Proto::Tcp => {
                s.tcp = next_tcp(s.tcp, from_v6, tcp_flags);
                match s.tcp {
                    TcpState::Established => TCP_EST_TIMEOUT,
                    TcpState::FinOne { .. } => TCP_EST_TIMEOUT,
                    TcpState::V6Init | TcpState::FinBoth | TcpState::Trans => TCP_TRANS_TIMEOUT,
                }
            }
        };
        // Packets in a closing session never extend it (RFC 6146 §3.5.2.2).
        let closing = k.proto == Proto::Tcp && matches!(s.tcp, TcpState::FinBoth | TcpState::Trans);
        if closing {
            if s.expires <= now {
                s.expires = now.saturating_add(timeout);
            }
            s.expires = s.expires.min(now.saturating_add(timeout));
        } else {
            s.expires = now.saturating_add(timeout);
        }
    }

    /// Maps an IPv6 packet from a node to `pool6 + remote` onto the pool4
    /// address: rewrites its source address and port (or echo identifier) in
    /// place. The caller then translates it with [`super::translate_6to4`].
    /// `owner` names the node that sent it: a session the packet opens
    /// counts against that owner's [`Settings::max_sessions_per_host`] until
    /// it expires (packets on existing sessions are not checked against it),
    /// and a binding it makes is that owner's: the sessions IPv4 hosts open
    /// on it count against that owner's strangers' bound.
    pub fn outbound(
        &mut self,
        pkt: &mut [u8],
        pool6: &Pool6,
        owner: Owner,
        now: u64,
    ) -> Result<Step, DropReason> {
        self.maybe_sweep(now);
        let l4 = match classify(pkt)? {
            Parsed::L4(l4) => l4,
            Parsed::Later { proto, id } => return self.later_fragment(pkt, true, proto, id, now),
        };
        let src = buf::arr16(pkt, 8)?;
        let dst = buf::arr16(pkt, 24)?;
        let remote = pool6.extract(&dst).ok_or(DropReason::Untranslatable)?;
        // No session for a remote the translator would refuse: 0/8,
        // loopback, link-local, multicast, broadcast, or (RFC 6052 §3.1) a
        // non-global one behind the Well-Known Prefix.
        if addr::is_illegal_v4_dst(remote) || pool6.refuses(remote) {
            return Err(DropReason::IllegalAddress);
        }
        let (sport_off, rport, flags) = match l4.proto {
            Proto::Tcp => (
                l4.off,
                buf::u16at(pkt, l4.off + 2)?,
                buf::u8at(pkt, l4.off + 13)?,
            ),
            Proto::Udp => (l4.off, buf::u16at(pkt, l4.off + 2)?, 0),
            Proto::Icmp => {
                if (1..=4).contains(&l4.icmp_type) {
                    // Before its checksum, which a fragment cannot verify
                    // (the translator drops fragmented ICMP anyway).
                    if l4.frag_id.is_some() {
                        return Err(DropReason::FragmentedIcmp);
                    }
                    return self
                        .outbound_error(pkt, l4.off, pool6)
                        .map(|()| Step::Mapped);
                }
                if l4.icmp_type != 128 {
                    // Echo replies towards IPv4 have no session to start;
                    // echo request is the only query RFC 7915 translates.
                    return Err(DropReason::UnsupportedIcmp);
                }
                (l4.off + 4, 0, 0)
            }
        };
        let v6 = V6Key {
            proto: l4.proto,
            addr: src,
            port: buf::u16at(pkt, sport_off)?,
        };
        // TCP sessions start with a SYN (RFC 6146 §3.5.2.1).
        let creates = l4.proto != Proto::Tcp || flags & SYN != 0;
        let (port4, k) = self.outbound_session(v6, owner, remote, rport, creates, now)?;
        self.touch(&k, true, flags, now);
        let new_src = pool6.embed(self.settings.pool4.octets());
        rewrite(
            pkt,
            8,
            &new_src,
            sport_off,
            port4,
            Some(l4.off + csum_off(l4.proto)),
            l4.proto == Proto::Udp,
        )?;
        self.remember_first(&l4, src, dst, FragSender::Node(owner), new_src, now);
        Ok(Step::Mapped)
    }

    /// Maps an IPv6 packet translated from IPv4 (destination `pool6 + pool4`)
    /// back to the node: rewrites the destination address and port (or echo
    /// identifier); for an ICMPv6 error, the inner packet's source too.
    pub fn inbound(&mut self, pkt: &mut [u8], pool6: &Pool6, now: u64) -> Result<Step, DropReason> {
        self.maybe_sweep(now);
        let l4 = match classify(pkt)? {
            Parsed::L4(l4) => l4,
            Parsed::Later { proto, id } => return self.later_fragment(pkt, false, proto, id, now),
        };
        let src = buf::arr16(pkt, 8)?;
        let dst = buf::arr16(pkt, 24)?;
        let remote = pool6.extract(&src).ok_or(DropReason::Untranslatable)?;
        match (l4.proto, l4.icmp_type) {
            // An error's source may be any router's (RFC 7915 lets it
            // through); its inner packet names the session.
            (Proto::Icmp, 1..=4) => {
                return self
                    .inbound_error(pkt, l4.off, pool6)
                    .map(|()| Step::Mapped)
            }
            (Proto::Icmp, 129) => {}
            (Proto::Icmp, _) => return Err(DropReason::UnsupportedIcmp),
            _ => {}
        }
        // As outbound: nothing from a remote no node may talk to (a UDP
        // mapping would otherwise open a session for it).
        if addr::is_illegal_v4(remote) || pool6.refuses(remote) {
            return Err(DropReason::IllegalAddress);
        }
        let (dport_off, rport, flags) = match l4.proto {
            Proto::Tcp => (
                l4.off + 2,
                buf::u16at(pkt, l4.off)?,
                buf::u8at(pkt, l4.off + 13)?,
            ),
            Proto::Udp => (l4.off + 2, buf::u16at(pkt, l4.off)?, 0),
            Proto::Icmp => (l4.off + 4, 0, 0),
        };
        let port4 = buf::u16at(pkt, dport_off)?;
        let k = SessKey {
            proto: l4.proto,
            port4,
            remote,
            rport,
        };
        let v4k = V4Key {
            proto: l4.proto,
            port: port4,
        };
        let bib = *self.bib4.get(&v4k).ok_or(DropReason::Nat64NoSession)?;
        if !self.sessions.contains_key(&k) {
            // Endpoint-independent filtering for UDP only.
            if l4.proto != Proto::Udp {
                return Err(DropReason::Nat64NoSession);
            }
            // Strangers' datagrams (any source port, any host, to a mapping
            // port they guessed) must not fill the table the nodes' own
            // flows need: they open sessions only while it is under three
            // quarters full, and at most MAX_INBOUND_PER_MAPPING a mapping.
            if self.inbound_crowded(&v4k) {
                self.maybe_sweep(now);
                if self.inbound_crowded(&v4k) {
                    return Err(DropReason::Nat64TableFull);
                }
            }
            // Nor take the other nodes' share of those three quarters
            // through one node's mappings, however many it opens: they
            // count against the node the mapping belongs to, apart from its
            // own sessions (anyone can send these, from any address and
            // port: they must not shut the node out of its own flows).
            if self.strangers_full(bib.owner) {
                self.maybe_sweep(now);
                if self.strangers_full(bib.owner) {
                    return Err(DropReason::Nat64InboundLimit);
                }
            }
            self.room(now)?;
            // A sweep just now may have ended the mapping (its last session
            // expired): then there is nothing to open a session on.
            if !self.bib4.contains_key(&v4k) {
                return Err(DropReason::Nat64NoSession);
            }
            self.insert_session(k, now, Counted::Stranger(bib.owner))?;
        }
        self.touch(&k, false, flags, now);
        rewrite(
            pkt,
            24,
            &bib.v6.addr,
            dport_off,
            bib.v6.port,
            Some(l4.off + csum_off(l4.proto)),
            l4.proto == Proto::Udp,
        )?;
        self.remember_first(&l4, src, dst, FragSender::Host(remote), bib.v6.addr, now);
        Ok(Step::Mapped)
    }

    /// An ICMPv6 error (translated from ICMPv4) about a packet the node sent
    /// through NAT64: the inner packet goes from `pool6 + pool4 : port4` to the
    /// remote. Maps the outer destination and the inner source back, then
    /// recomputes the ICMPv6 checksum.
    fn inbound_error(
        &mut self,
        pkt: &mut [u8],
        icmp_off: usize,
        pool6: &Pool6,
    ) -> Result<(), DropReason> {
        let inner = icmp_off + 8;
        let inner_pkt = buf::tail(pkt, inner)?;
        let nh = buf::u8at(inner_pkt, 6)?;
        let inner_dst = buf::arr16(inner_pkt, 24)?;
        let remote = pool6
            .extract(&inner_dst)
            .ok_or(DropReason::Untranslatable)?;
        let l4 = inner + 40;
        let (proto, sport_off, rport, csum_at) = match nh {
            TCP => (Proto::Tcp, l4, buf::u16at(pkt, l4 + 2)?, l4 + 16),
            UDP => (Proto::Udp, l4, buf::u16at(pkt, l4 + 2)?, l4 + 6),
            ICMP6 => {
                if buf::u8at(pkt, l4)? != 128 {
                    return Err(DropReason::NestedIcmpError);
                }
                (Proto::Icmp, l4 + 4, 0, l4 + 2)
            }
            _ => return Err(DropReason::UnsupportedProtocol),
        };
        let port4 = buf::u16at(pkt, sport_off)?;
        let k = SessKey {
            proto,
            port4,
            remote,
            rport,
        };
        if !self.sessions.contains_key(&k) {
            return Err(DropReason::Nat64NoSession);
        }
        let bib = *self
            .bib4
            .get(&V4Key { proto, port: port4 })
            .ok_or(DropReason::Nat64NoSession)?;
        // Inner source (checksum of the inner transport header when present).
        rewrite(
            pkt,
            inner + 8,
            &bib.v6.addr,
            sport_off,
            bib.v6.port,
            Some(csum_at),
            proto == Proto::Udp,
        )?;
        buf::put(pkt, 24, &bib.v6.addr)?;
        icmp6_checksum(pkt, icmp_off)
    }

    /// An ICMPv6 error from a node about a packet it received through NAT64
    /// (RFC 6146 §3.5.1: errors about a session are translated): the inner
    /// packet went from `pool6 + remote` to the node's address and port.
    /// Maps the inner destination and the outer source to `pool6 + pool4`
    /// and the session's IPv4 port, so that the translator makes of it the
    /// ICMPv4 error the remote expects (a Packet Too Big becomes a
    /// Fragmentation Needed: path MTU discovery works across NAT64). Only the
    /// node the session belongs to may send one (outer source = inner
    /// destination): a node cannot reset or throttle another's flows. Errors
    /// never refresh a session. The checksum is recomputed after the
    /// rewrite, so the node's is checked first: a damaged error is dropped
    /// ([`DropReason::BadChecksum`]) rather than sent on as a valid one.
    fn outbound_error(
        &mut self,
        pkt: &mut [u8],
        icmp_off: usize,
        pool6: &Pool6,
    ) -> Result<(), DropReason> {
        let inner = icmp_off + 8;
        let inner_pkt = buf::tail(pkt, inner)?;
        if buf::u8at(inner_pkt, 0)? >> 4 != 6 {
            return Err(DropReason::BadHeader);
        }
        let nh = buf::u8at(inner_pkt, 6)?;
        let inner_src = buf::arr16(inner_pkt, 8)?;
        let inner_dst = buf::arr16(inner_pkt, 24)?;
        let remote = pool6
            .extract(&inner_src)
            .ok_or(DropReason::Untranslatable)?;
        if buf::arr16(pkt, 8)? != inner_dst {
            return Err(DropReason::Nat64NoSession);
        }
        let l4 = inner + 40;
        let (proto, dport_off, rport, csum_at) = match nh {
            TCP => (Proto::Tcp, l4 + 2, buf::u16at(pkt, l4)?, l4 + 16),
            UDP => (Proto::Udp, l4 + 2, buf::u16at(pkt, l4)?, l4 + 6),
            ICMP6 => {
                // Only echo replies reach a node through NAT64.
                if buf::u8at(pkt, l4)? != 129 {
                    return Err(DropReason::NestedIcmpError);
                }
                (Proto::Icmp, l4 + 4, 0, l4 + 2)
            }
            _ => return Err(DropReason::UnsupportedProtocol),
        };
        let v6 = V6Key {
            proto,
            addr: inner_dst,
            port: buf::u16at(pkt, dport_off)?,
        };
        let port4 = *self.bib6.get(&v6).ok_or(DropReason::Nat64NoSession)?;
        let k = SessKey {
            proto,
            port4,
            remote,
            rport,
        };
        if !self.sessions.contains_key(&k) {
            return Err(DropReason::Nat64NoSession);
        }
        if !icmp6_checksum_ok(pkt, icmp_off)? {
            return Err(DropReason::BadChecksum);
        }
        let mapped = pool6.embed(self.settings.pool4.octets());
        rewrite(
            pkt,
            inner + 24,
            &mapped,
            dport_off,
            port4,
            Some(csum_at),
            proto == Proto::Udp,
        )?;
        buf::put(pkt, 8, &mapped)?;
        icmp6_checksum(pkt, icmp_off)
    }
}

/// Counts one more session for `o` in `counts`.
fn join(counts: &mut HashMap<Owner, u32>, o: Owner) {
    let n = counts.entry(o).or_insert(0);
    *n = n.saturating_add(1);
}

/// Counts one session fewer for `o` in `counts`, leaving no entry at 0.
fn leave(counts: &mut HashMap<Owner, u32>, o: &Owner) {
    if let Some(n) = counts.get_mut(o) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(o);
        }
    }
}

/// Removes a tracked datagram `f` from the age orders (the caller removes it
/// from the table).
fn unlink_fragment(
    age: &mut BTreeMap<u64, FragKey>,
    senders: &mut HashMap<FragSender, BTreeSet<u64>>,
    f: &FragFlow,
) {
    age.remove(&f.seq);
    if let Some(s) = senders.get_mut(&f.sender) {
        s.remove(&f.seq);
        if s.is_empty() {
            senders.remove(&f.sender);
        }
    }
}

/// The sum of `pkt`'s ICMPv6 message (at `icmp_off`, to the end the
/// payload length gives) with its pseudo-header, checksum field included.
fn icmp6_sum(pkt: &[u8], icmp_off: usize) -> Result<u32, DropReason> {
    let plen = usize::from(buf::u16at(pkt, 4)?);
    let end = 40usize.checked_add(plen).ok_or(DropReason::Truncated)?;
    let src = buf::arr16(pkt, 8)?;
    let dst = buf::arr16(pkt, 24)?;
    let icmp_len = end.checked_sub(icmp_off).ok_or(DropReason::BadHeader)?;
    let body = buf::get(pkt, icmp_off, icmp_len)?;
    let len32 = u32::try_from(icmp_len).map_err(|_| DropReason::BadHeader)?;
    Ok(csum::add(
        csum::pseudo_v6(&src, &dst, ICMP6, len32),
        csum::sum(body),
    ))
}

/// Whether the ICMPv6 checksum of `pkt` (its message at `icmp_off`) holds.
fn icmp6_checksum_ok(pkt: &[u8], icmp_off: usize) -> Result<bool, DropReason> {
    Ok(csum::fold(icmp6_sum(pkt, icmp_off)?) == 0xffff)
}

/// Computes the ICMPv6 checksum of `pkt` (its message at `icmp_off`) from
/// scratch.
fn icmp6_checksum(pkt: &mut [u8], icmp_off: usize) -> Result<(), DropReason> {
    buf::put16(pkt, icmp_off + 2, 0)?;
    let c = csum::finish(icmp6_sum(pkt, icmp_off)?);
    buf::put16(pkt, icmp_off + 2, c)
}

fn next_tcp(s: TcpState, from_v6: bool, flags: u8) -> TcpState {
    if flags & RST != 0 {
        return TcpState::Trans;
    }
    match s {
        TcpState::V6Init if !from_v6 && flags & SYN != 0 => TcpState::Established,
        TcpState::V6Init => TcpState::V6Init,
        TcpState::Trans => TcpState::Established,
        TcpState::Established if flags & FIN != 0 => TcpState::FinOne { from_v6 },
        TcpState::Established => TcpState::Established,
        TcpState::FinOne { from_v6: f } if flags & FIN != 0 && f != from_v6 => TcpState::FinBoth,
        s @ (TcpState::FinOne { .. } | TcpState::FinBoth) => s,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests;
