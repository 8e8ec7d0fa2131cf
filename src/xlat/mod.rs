//! Stateless IP/ICMP translation (SIIT, RFC 7915) between IPv4 and IPv6.
//!
//! # Design
//!
//! This module is a *pure* translator core in the sans-IO style: it performs no
//! I/O, reads no clock, draws no randomness and allocates nothing per packet.
//! A driver (TUN reader, test harness, fuzzer) hands it one raw L3 packet and a
//! caller-owned output buffer and gets back an [`Outcome`]:
//!
//! * [`Outcome::Forward`]: one or more translated packets (more than one when an
//!   IPv4 packet without DF has to be fragmented for the IPv6 side), to be sent
//!   out on the *other* address family's side.
//! * [`Outcome::Reply`]: an ICMP error the translator generated itself (Time
//!   Exceeded, Fragmentation Needed / Packet Too Big, Destination Unreachable,
//!   Parameter Problem), to be sent back out on the side the input came from.
//! * [`Outcome::Hairpin`]: an IPv6 packet addressed through pool6 to an IPv4
//!   address that is itself mapped back into IPv6 by an EAM entry (RFC 7757
//!   hairpinning; for an ICMPv6 error, the source of the packet it carries);
//!   it is translated twice and goes back out on the IPv6 side.
//! * [`Outcome::Drop`]: the packet is discarded; [`DropReason::as_str`] gives a
//!   stable metric label.
//!
//! All output packets are written back to back at the start of `out`; use
//! [`Packets::iter`] to get them as slices. `out` should be at least
//! [`OUT_BUF_LEN`] bytes; a smaller buffer only causes
//! [`DropReason::OutputTooSmall`] for packets that do not fit.
//!
//! The translator decrements the TTL / hop limit exactly once, like a router.
//! IPv4 identification values for unfragmented IPv6→IPv4 packets with DF=0 are
//! derived from a keyed hash of the packet ([`Config::id_salt`] is the key),
//! so identical retransmissions get identical IDs.
//!
//! Addresses: RFC 6052 prefix ([`addr::Pool6`], any of the six lengths), RFC
//! 7757 EAM table ([`addr::Eam`], longest match, takes precedence over the
//! prefix), RFC 6791 pools for ICMP errors whose source has no mapping, and the
//! translator's own addresses for the errors it originates.
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

pub mod addr;
pub mod budget;
mod buf;
pub mod csum;
pub mod gso;
mod icmp;
pub mod nat64;
pub mod settings;
mod v4_to_v6;
mod v6_to_v4;

#[cfg(test)]
mod tests;

use std::net::{Ipv4Addr, Ipv6Addr};

pub use addr::{AddrError, Eam, Pool6};

/// Maximum number of packets a single translation can emit.
///
/// An IPv4 datagram carries at most 65515 payload bytes; with
/// `lowest_ipv6_mtu` >= 1280 each IPv6 fragment carries at least 1232 of them,
/// so 54 fragments are the worst case.
pub const MAX_PACKETS: usize = 64;

/// Recommended size of the output buffer: enough for every input (including
/// the intermediate packet of a hairpinned translation).
pub const OUT_BUF_LEN: usize = 2 * 65_536 + 8 * 1024;

/// Translator settings. Build once, share by reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// RFC 6052 translation prefix ("pool6"). `None` disables it (EAM only).
    /// The Well-Known Prefix refuses non-global IPv4 addresses (RFC 6052
    /// §3.1) unless built with [`Pool6::with_wkp_strict`]`(false)`.
    pub pool6: Option<Pool6>,
    /// RFC 7757 explicit address mappings (longest match wins, EAM before pool6).
    pub eamt: Vec<Eam>,
    /// RFC 6791 IPv4 pool (address, prefix length) used as the source of ICMPv6
    /// errors whose source has no IPv4 mapping. `None`: use `self_v4`.
    pub rfc6791_v4: Option<(Ipv4Addr, u8)>,
    /// Same for ICMPv4 errors translated to IPv6. `None`: use `self_v6`.
    pub rfc6791_v6: Option<Ipv6Addr>,
    /// Source of ICMPv4 errors the translator originates. `None`: never send them.
    pub self_v4: Option<Ipv4Addr>,
    /// Source of ICMPv6 errors the translator originates. `None`: never send them.
    pub self_v6: Option<Ipv6Addr>,
    /// RFC 7915 `lowest-ipv6-mtu`: DF=0 IPv4 packets are fragmented so that each
    /// IPv6 piece is at most this big (values below 1280 are treated as 1280).
    pub lowest_ipv6_mtu: u16,
    /// Compute a checksum for unfragmented IPv4 UDP packets whose checksum is
    /// zero (otherwise they are rejected with ICMPv4 3/13).
    pub amend_udp_checksum_zero: bool,
    /// MTU of the IPv4-side link.
    pub ipv4_mtu: u16,
    /// MTU of the IPv6-side link.
    pub ipv6_mtu: u16,
    /// Key of the hash that derives IPv4 identification values; set it from a
    /// random source at startup.
    pub id_salt: u32,
    /// Lower the MSS option of translated TCP SYNs to what fits the other
    /// side's MTU (`ipv6_mtu` − 60 towards IPv6, `ipv4_mtu` − 40 towards
    /// IPv4), so TCP works even where ICMP errors are filtered. Not part of
    /// RFC 7915; on by default.
    pub mss_clamp: bool,
}

impl Default for Config {
    /// The well-known prefix `64:ff9b::/96`, no EAM, no error sources,
    /// `lowest-ipv6-mtu` 1280, MTU 1500 on both sides.
    fn default() -> Self {
        Config {
            pool6: Pool6::new(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96).ok(),
            eamt: Vec::new(),
            rfc6791_v4: None,
            rfc6791_v6: None,
            self_v4: None,
            self_v6: None,
            lowest_ipv6_mtu: 1280,
            amend_udp_checksum_zero: false,
            ipv4_mtu: 1500,
            ipv6_mtu: 1500,
            id_salt: 0,
            mss_clamp: true,
        }
    }
}

/// Why a packet was dropped (or why the translator answered with an error).
/// Small and `Copy`, usable as a metric label via [`DropReason::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DropReason {
    /// Shorter than its headers or its length fields say.
    Truncated,
    /// Malformed header (version, IHL, lengths, misplaced extension header).
    BadHeader,
    /// IPv4 header checksum (or incoming ICMP error checksum) is wrong.
    BadChecksum,
    /// An address has no mapping (no EAM, outside pool6).
    Untranslatable,
    /// Source or destination that must not be translated (0/8, 127/8,
    /// multicast, ...; a non-global one behind the Well-Known Prefix).
    IllegalAddress,
    /// Protocol that cannot be translated (IPv6-only protocol numbers in IPv4, ...).
    UnsupportedProtocol,
    /// ICMP type/code with no translation (redirects, ND, MLD, ...).
    UnsupportedIcmp,
    /// ICMP error inside an ICMP error.
    NestedIcmpError,
    /// TTL or hop limit expired.
    TtlExpired,
    /// Fragmented ICMP packet.
    FragmentedIcmp,
    /// Extension header after the IPv6 Fragment header.
    ExtensionAfterFragment,
    /// Other fragment problem (too many pieces; for NAT64, a later fragment
    /// whose first was not seen or whose mapping expired).
    Fragment,
    /// Routing header with Segments Left != 0, or an unexpired IPv4 source route.
    SourceRoute,
    /// IPv4 UDP with checksum zero that policy does not allow to translate.
    UdpZeroChecksum,
    /// Too big for the next-hop MTU and not allowed to fragment.
    PacketTooBig,
    /// The caller's output buffer is too small.
    OutputTooSmall,
    /// NAT64: no session (or binding) for the packet, and it may not create one.
    Nat64NoSession,
    /// NAT64: the session table is full.
    Nat64TableFull,
    /// NAT64: no free port (or ICMP identifier) left on the pool4 address.
    Nat64PortsExhausted,
    /// NAT64: the node the new session would count against (a peer,
    /// whatever addresses it sends from; from the hub's own side, a source
    /// address) has its most sessions (`max_sessions_per_host`).
    Nat64HostLimit,
    /// NAT64: a datagram from the IPv4 side would open a session on a node's
    /// UDP mapping, and IPv4 hosts already have as many sessions on that
    /// node's mappings as it may open itself (`max_sessions_per_host`).
    Nat64InboundLimit,
    /// Hub: to an address in an EAM IPv6 range that no peer owns. It has
    /// nowhere to go (translated, it would come back to the TUN).
    EamNoPeer,
}

impl DropReason {
    /// Stable snake_case label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::BadHeader => "bad_header",
            DropReason::BadChecksum => "bad_checksum",
            DropReason::Untranslatable => "untranslatable",
            DropReason::IllegalAddress => "illegal_address",
            DropReason::UnsupportedProtocol => "unsupported_protocol",
            DropReason::UnsupportedIcmp => "unsupported_icmp",
            DropReason::NestedIcmpError => "nested_icmp_error",
            DropReason::TtlExpired => "ttl_expired",
            DropReason::FragmentedIcmp => "fragmented_icmp",
            DropReason::ExtensionAfterFragment => "extension_after_fragment",
            DropReason::Fragment => "fragment",
            DropReason::SourceRoute => "source_route",
            DropReason::UdpZeroChecksum => "udp_zero_checksum",
            DropReason::PacketTooBig => "packet_too_big",
            DropReason::OutputTooSmall => "output_too_small",
            DropReason::Nat64NoSession => "nat64_no_session",
            DropReason::Nat64TableFull => "nat64_table_full",
            DropReason::Nat64PortsExhausted => "nat64_ports_exhausted",
            DropReason::Nat64HostLimit => "nat64_host_limit",
            DropReason::Nat64InboundLimit => "nat64_inbound_limit",
            DropReason::EamNoPeer => "eam_no_peer",
        }
    }

    /// Every reason, in a fixed order (see [`DropReason::index`]).
    pub const ALL: [DropReason; 22] = [
        DropReason::Truncated,
        DropReason::BadHeader,
        DropReason::BadChecksum,
        DropReason::Untranslatable,
        DropReason::IllegalAddress,
        DropReason::UnsupportedProtocol,
        DropReason::UnsupportedIcmp,
        DropReason::NestedIcmpError,
        DropReason::TtlExpired,
        DropReason::FragmentedIcmp,
        DropReason::ExtensionAfterFragment,
        DropReason::Fragment,
        DropReason::SourceRoute,
        DropReason::UdpZeroChecksum,
        DropReason::PacketTooBig,
        DropReason::OutputTooSmall,
        DropReason::Nat64NoSession,
        DropReason::Nat64TableFull,
        DropReason::Nat64PortsExhausted,
        DropReason::Nat64HostLimit,
        DropReason::Nat64InboundLimit,
        DropReason::EamNoPeer,
    ];

    /// Position in [`DropReason::ALL`] (for counter arrays).
    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lengths of the packets written back to back at the start of the output buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packets {
    count: usize,
    lens: [u32; MAX_PACKETS],
}

impl Packets {
    fn new() -> Self {
        Packets {
            count: 0,
            lens: [0; MAX_PACKETS],
        }
    }

    pub(crate) fn one(len: usize) -> Result<Self, DropReason> {
        let mut p = Packets::new();
        p.push(len)?;
        Ok(p)
    }

    fn push(&mut self, len: usize) -> Result<(), DropReason> {
        let slot = self.lens.get_mut(self.count).ok_or(DropReason::Fragment)?;
        *slot = u32::try_from(len).map_err(|_| DropReason::OutputTooSmall)?;
        self.count += 1;
        Ok(())
    }

    /// Number of packets.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when there is no packet (never the case in a returned [`Outcome`]).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Length of each packet, in order.
    pub fn lens(&self) -> &[u32] {
        self.lens.get(..self.count).unwrap_or(&[])
    }

    /// Total bytes used at the start of the output buffer.
    pub fn total_len(&self) -> usize {
        self.lens().iter().map(|&l| l as usize).sum()
    }

    /// The packets as slices of the output buffer they were written to.
    pub fn iter<'a>(&'a self, out: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        let mut start = 0usize;
        self.lens().iter().filter_map(move |&l| {
            let end = start.checked_add(l as usize)?;
            let s = out.get(start..end)?;
            start = end;
            Some(s)
        })
    }
}

/// Result of translating one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Translated packet(s), to be sent on the other address family's side.
    Forward(Packets),
    /// An ICMP error generated by the translator, to be sent back toward the
    /// sender (same address family as the input). `cause` says why the input
    /// was not translated.
    Reply {
        /// The error packet (always exactly one).
        packets: Packets,
        /// Why the input packet was rejected.
        cause: DropReason,
    },
    /// RFC 7757 hairpinning: the IPv6 input was translated to IPv4 and back to
    /// IPv6; send it back out on the IPv6 side.
    Hairpin(Packets),
    /// Dropped without answer.
    Drop(DropReason),
    /// Kept by the NAT64 table: a later fragment that came before its first.
    /// Nothing to send now; it comes out once its first has been mapped.
    Held,
}

impl Outcome {
    /// The emitted packets, if any.
    pub fn packets(&self) -> Option<&Packets> {
        match self {
            Outcome::Forward(p) | Outcome::Hairpin(p) => Some(p),
            Outcome::Reply { packets, .. } => Some(packets),
            Outcome::Drop(_) | Outcome::Held => None,
        }
    }
}

/// Internal result of one direction.
enum Res {
    Forward(Packets),
    Reply(Packets, DropReason),
    Hairpin(Packets),
}

impl From<Result<Res, DropReason>> for Outcome {
    fn from(r: Result<Res, DropReason>) -> Self {
        match r {
            Ok(Res::Forward(p)) => Outcome::Forward(p),
            Ok(Res::Reply(packets, cause)) => Outcome::Reply { packets, cause },
            Ok(Res::Hairpin(p)) => Outcome::Hairpin(p),
            Err(e) => Outcome::Drop(e),
        }
    }
}

/// Translates one IPv4 packet (raw bytes starting at the IPv4 header) to IPv6.
///
/// Output packets are written back to back at the start of `out`.
pub fn translate_4to6(cfg: &Config, input: &[u8], out: &mut [u8]) -> Outcome {
    v4_to_v6::translate(cfg, input, out, false, false).into()
}

/// [`translate_4to6`] with the source mapped through pool6 only, never into
/// an EAM IPv6 range: for packets from the IPv4 side, whose sources are no
/// IPv6 node's (an EAM IPv6 address is a node's identity).
pub fn translate_4to6_pool6_src(cfg: &Config, input: &[u8], out: &mut [u8]) -> Outcome {
    v4_to_v6::translate(cfg, input, out, false, true).into()
}

/// Translates one IPv6 packet (raw bytes starting at the IPv6 header) to IPv4.
///
/// Output packets are written back to back at the start of `out`.
pub fn translate_6to4(cfg: &Config, input: &[u8], out: &mut [u8]) -> Outcome {
    v6_to_v4::translate(cfg, input, out).into()
}

/// Turns an ICMPv6 error the translator made about `rewritten` (`reply`,
/// exactly that packet) into one about `orig`, the packet as its sender sent
/// it: `rewritten` is `orig` with its source changed in place (NAT64), of
/// the same length. The error goes to `orig`'s source and quotes `orig`.
pub fn requote_v6_error(reply: &mut [u8], orig: &[u8]) -> Result<(), DropReason> {
    use buf::{arr16, get, put, put16, u8at};
    let quoted = reply.len().checked_sub(48).ok_or(DropReason::Truncated)?;
    if reply.first().map(|b| b >> 4) != Some(6) || u8at(reply, 6)? != 58 {
        return Err(DropReason::BadHeader);
    }
    let src = arr16(reply, 8)?;
    let dst = arr16(orig, 8)?;
    put(reply, 24, &dst)?;
    put(reply, 48, get(orig, 0, quoted)?)?;
    put16(reply, 42, 0)?;
    let len = u32::try_from(8 + quoted).map_err(|_| DropReason::BadHeader)?;
    let c = csum::finish(csum::add(
        csum::pseudo_v6(&src, &dst, 58, len),
        csum::sum(get(reply, 40, 8 + quoted)?),
    ));
    put16(reply, 42, c)
}

/// Translates a packet of either family, dispatching on the version nibble.
pub fn translate(cfg: &Config, input: &[u8], out: &mut [u8]) -> Outcome {
    match input.first().map(|b| b >> 4) {
        Some(4) => translate_4to6(cfg, input, out),
        Some(6) => translate_6to4(cfg, input, out),
        Some(_) => Outcome::Drop(DropReason::BadHeader),
        None => Outcome::Drop(DropReason::Truncated),
    }
}
