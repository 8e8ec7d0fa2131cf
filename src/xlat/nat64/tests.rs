use super::*;
use crate::xlat::{translate_4to6, translate_6to4, Config, Outcome, OUT_BUF_LEN};
use proptest::prelude::*;
use std::net::Ipv6Addr;

const NODE: [u8; 16] = [0xfd, 0x77, 0x67, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1];
const REMOTE: [u8; 4] = [203, 0, 113, 10];
const POOL4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 200);

/// A network-specific prefix: the documentation addresses here are not
/// global, which the Well-Known Prefix would refuse (RFC 6052 §3.1).
fn pool6() -> Pool6 {
    Pool6::new(Ipv6Addr::new(0x2001, 0xdb8, 0x64, 0, 0, 0, 0, 0), 96).unwrap()
}

fn table(max: usize) -> Table {
    Table::new(Settings {
        pool4: POOL4,
        port_min: 2000,
        port_max: 2003,
        max_sessions: max,
        max_sessions_per_host: max,
    })
}

/// A table of `max` sessions, at most `per_host` for one IPv6 address, and
/// enough ports.
fn table_per_host(max: usize, per_host: usize) -> Table {
    Table::new(Settings {
        pool4: POOL4,
        port_min: 2000,
        port_max: 2099,
        max_sessions: max,
        max_sessions_per_host: per_host,
    })
}

/// Another node than [`NODE`].
fn node(n: u8) -> [u8; 16] {
    let mut a = NODE;
    a[15] = n;
    a
}

impl Table {
    /// [`Table::outbound`] with the packet's source address as its owner (as
    /// for a packet from the hub's own TUN).
    fn outbound_by_source(
        &mut self,
        pkt: &mut [u8],
        pool6: &Pool6,
        now: u64,
    ) -> Result<Step, DropReason> {
        let owner = pkt
            .get(8..24)
            .and_then(|s| s.try_into().ok())
            .unwrap_or([0; 16]);
        self.outbound(pkt, pool6, owner, now)
    }
}

/// The sessions per owner, counted afresh from the sessions: those the
/// owner opened itself, and those IPv4 hosts opened on its mappings (every
/// session has its binding, and a stranger's counts against the binding's
/// owner).
type Recount = (HashMap<Owner, u32>, HashMap<Owner, u32>);
fn recount_owners(t: &Table) -> Recount {
    let (mut own, mut strangers) = (HashMap::new(), HashMap::new());
    for (k, s) in &t.sessions {
        let b = t.bib4.get(&V4Key {
            proto: k.proto,
            port: k.port4,
        });
        let b = b.expect("a session without its binding");
        match s.counted {
            Counted::Own(o) => *own.entry(o).or_insert(0) += 1,
            Counted::Stranger(o) => {
                assert_eq!(o, b.owner, "a stranger's session off its mapping's owner");
                *strangers.entry(o).or_insert(0) += 1;
            }
        }
    }
    (own, strangers)
}

/// A datagram from `host:sport` to the pool4 port `port4` (UDP), as the
/// translator hands it to the table.
fn stranger_udp(host: [u8; 4], sport: u16, port4: u16) -> Vec<u8> {
    let from = pool6().embed(host);
    let to = pool6().embed(POOL4.octets());
    v6_packet(from, to, 17, &udp(sport, port4, b"s"))
}

/// An IPv6 packet with a correct transport checksum.
fn v6_packet(src: [u8; 16], dst: [u8; 16], nh: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
    p[6] = nh;
    p[7] = 64;
    p[8..24].copy_from_slice(&src);
    p[24..40].copy_from_slice(&dst);
    p.extend_from_slice(l4);
    let coff = 40
        + match nh {
            6 => 16,
            17 => 6,
            _ => 2,
        };
    p[coff] = 0;
    p[coff + 1] = 0;
    let mut c = csum::finish(csum::add(
        csum::pseudo_v6(&src, &dst, nh, l4.len() as u32),
        csum::sum(&p[40..]),
    ));
    // A computed UDP checksum of zero is sent as 0xffff (zero means none).
    if nh == 17 && c == 0 {
        c = 0xffff;
    }
    p[coff..coff + 2].copy_from_slice(&c.to_be_bytes());
    p
}

fn tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14] = 0xff;
    t.extend_from_slice(payload);
    t
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(payload);
    u
}

fn v6_csum_ok(p: &[u8]) -> bool {
    let Headers { nh, off, .. } = find_l4(p).unwrap();
    let src: [u8; 16] = p[8..24].try_into().unwrap();
    let dst: [u8; 16] = p[24..40].try_into().unwrap();
    csum::verify(
        csum::pseudo_v6(&src, &dst, nh, (p.len() - off) as u32),
        &p[off..],
    )
}

fn v4_csum_ok(p: &[u8]) -> bool {
    let ihl = usize::from(p[0] & 15) * 4;
    let src: [u8; 4] = p[12..16].try_into().unwrap();
    let dst: [u8; 4] = p[16..20].try_into().unwrap();
    let extra = if p[9] == 1 {
        0
    } else {
        csum::pseudo_v4(&src, &dst, p[9], (p.len() - ihl) as u32)
    };
    csum::verify(extra, &p[ihl..])
}

fn cfg() -> Config {
    Config {
        pool6: Some(pool6()),
        ..Config::default()
    }
}

/// Node → remote: NAT64 outbound then stateless 6→4; returns the IPv4 packet.
/// The owner is the packet's source address.
fn out_v4(t: &mut Table, pkt: &mut [u8], now: u64) -> Result<Vec<u8>, DropReason> {
    let owner = pkt
        .get(8..24)
        .and_then(|s| s.try_into().ok())
        .unwrap_or([0; 16]);
    out_v4_owned(t, pkt, owner, now)
}

/// [`out_v4`] for the node `owner`.
fn out_v4_owned(
    t: &mut Table,
    pkt: &mut [u8],
    owner: Owner,
    now: u64,
) -> Result<Vec<u8>, DropReason> {
    t.outbound(pkt, &pool6(), owner, now)?;
    let mut out = vec![0u8; OUT_BUF_LEN];
    match translate_6to4(&cfg(), pkt, &mut out) {
        Outcome::Forward(p) => Ok(p.iter(&out).next().unwrap().to_vec()),
        o => panic!("{o:?}"),
    }
}

/// An IPv4 reply turned into IPv6 for the node.
fn in_v6(t: &mut Table, v4: &[u8], now: u64) -> Result<Vec<u8>, DropReason> {
    let mut out = vec![0u8; OUT_BUF_LEN];
    let mut p = match translate_4to6(&cfg(), v4, &mut out) {
        Outcome::Forward(p) => p.iter(&out).next().unwrap().to_vec(),
        o => panic!("{o:?}"),
    };
    t.inbound(&mut p, &pool6(), now)?;
    Ok(p)
}

/// Swaps an IPv4 packet's addresses and ports, keeping checksums right.
fn v4_reply(p: &[u8], flags: Option<u8>) -> Vec<u8> {
    let mut r = p.to_vec();
    r[12..16].copy_from_slice(&p[16..20]);
    r[16..20].copy_from_slice(&p[12..16]);
    r[20..22].copy_from_slice(&p[22..24]);
    r[22..24].copy_from_slice(&p[20..22]);
    if let Some(f) = flags {
        r[33] = f;
    }
    let coff = if p[9] == 6 { 36 } else { 26 };
    r[coff] = 0;
    r[coff + 1] = 0;
    let c = csum::finish(csum::add(
        csum::pseudo_v4(
            &r[12..16].try_into().unwrap(),
            &r[16..20].try_into().unwrap(),
            p[9],
            (r.len() - 20) as u32,
        ),
        csum::sum(&r[20..]),
    ));
    r[coff..coff + 2].copy_from_slice(&c.to_be_bytes());
    r[10] = 0;
    r[11] = 0;
    let h = crate::wg::packet::ipv4_header_checksum(&r[..20]);
    r[10..12].copy_from_slice(&h.to_be_bytes());
    r
}

#[test]
fn drop_reason_indices_match() {
    for (i, r) in DropReason::ALL.iter().enumerate() {
        assert_eq!(r.index(), i);
    }
}

#[test]
fn tcp_round_trip() {
    let mut t = table(16);
    let dst = pool6().embed(REMOTE);
    let mut syn = v6_packet(NODE, dst, 6, &tcp(40000, 80, SYN, b""));
    let v4 = out_v4(&mut t, &mut syn, 100).unwrap();
    assert_eq!(&v4[12..16], &POOL4.octets());
    assert_eq!(&v4[16..20], &REMOTE);
    let port4 = u16::from_be_bytes([v4[20], v4[21]]);
    assert!((2000..=2003).contains(&port4));
    assert!(v4_csum_ok(&v4));
    let s = t.lookup(Proto::Tcp, port4, REMOTE.into(), 80).unwrap();
    assert_eq!(s.tcp, TcpState::V6Init);
    assert_eq!(s.expires, 100 + TCP_TRANS_TIMEOUT);

    let synack = v4_reply(&v4, Some(SYN | 0x10));
    let back = in_v6(&mut t, &synack, 101).unwrap();
    assert_eq!(&back[24..40], &NODE);
    assert_eq!(u16::from_be_bytes([back[42], back[43]]), 40000);
    assert_eq!(&back[8..24], &dst);
    assert!(v6_csum_ok(&back));
    let s = t.lookup(Proto::Tcp, port4, REMOTE.into(), 80).unwrap();
    assert_eq!(s.tcp, TcpState::Established);
    assert_eq!(s.expires, 101 + TCP_EST_TIMEOUT);
}

#[test]
fn tcp_needs_syn_to_start() {
    let mut t = table(16);
    let mut ack = v6_packet(NODE, pool6().embed(REMOTE), 6, &tcp(40000, 80, 0x10, b"x"));
    assert_eq!(
        t.outbound_by_source(&mut ack, &pool6(), 0),
        Err(DropReason::Nat64NoSession)
    );
}

#[test]
fn udp_round_trip_and_expiry() {
    let mut t = table(16);
    let mut p = v6_packet(NODE, pool6().embed(REMOTE), 17, &udp(5353, 53, b"hello"));
    let v4 = out_v4(&mut t, &mut p, 10).unwrap();
    assert!(v4_csum_ok(&v4));
    let back = in_v6(&mut t, &v4_reply(&v4, None), 20).unwrap();
    assert!(v6_csum_ok(&back));
    assert_eq!(u16::from_be_bytes([back[42], back[43]]), 5353);
    // Refreshed at 20: alive until 20 + 300.
    t.expire(20 + UDP_TIMEOUT - 1);
    assert_eq!(t.sessions(), 1);
    t.expire(20 + UDP_TIMEOUT);
    assert_eq!(t.sessions(), 0);
    assert_eq!(t.bindings(), 0);
    assert_eq!(
        in_v6(&mut t, &v4_reply(&v4, None), 400),
        Err(DropReason::Nat64NoSession)
    );
}

#[test]
fn udp_endpoint_independent() {
    let mut t = table(16);
    let mut p = v6_packet(NODE, pool6().embed(REMOTE), 17, &udp(5353, 53, b"x"));
    let v4 = out_v4(&mut t, &mut p, 0).unwrap();
    let mut other = v4_reply(&v4, None);
    other[12..16].copy_from_slice(&[192, 0, 2, 99]);
    let other = v4_reply(&v4_reply(&other, None), None);
    // Same mapping from another remote: allowed for UDP.
    let back = in_v6(&mut t, &other, 1).unwrap();
    assert_eq!(&back[24..40], &NODE);
    assert_eq!(t.sessions(), 2);
    assert_eq!(t.bindings(), 1);
}

/// Strangers' datagrams to a node's UDP mapping open sessions only while
/// the table is under three quarters full: the rest stays for the nodes' own
/// flows, and a full table is swept at most once a second.
#[test]
fn strangers_cannot_fill_the_table() {
    let mut t = table(8);
    let mut p = v6_packet(NODE, pool6().embed(REMOTE), 17, &udp(5353, 53, b"x"));
    let v4 = out_v4(&mut t, &mut p, 0).unwrap();
    let mut opened = 0;
    for i in 0..20u8 {
        let mut other = v4_reply(&v4, None);
        other[12..16].copy_from_slice(&[192, 0, 2, 100 + i]);
        let other = v4_reply(&v4_reply(&other, None), None);
        match in_v6(&mut t, &other, 1) {
            Ok(_) => opened += 1,
            Err(e) => assert_eq!(e, DropReason::Nat64TableFull),
        }
    }
    // 1 of the node's own + 5 strangers' = 6 = 8 * 3/4.
    assert_eq!(opened, 5);
    assert_eq!(t.sessions(), 6);
    // The node's own flows still get the last quarter.
    for port in [5354u16, 5355] {
        let mut p = v6_packet(NODE, pool6().embed(REMOTE), 17, &udp(port, 53, b"x"));
        assert!(out_v4(&mut t, &mut p, 2).is_ok(), "{port}");
    }
    assert_eq!(t.sessions(), 8);
    // A stranger's datagram on an existing session still passes.
    let back = in_v6(&mut t, &v4_reply(&v4, None), 3).unwrap();
    assert_eq!(&back[24..40], &NODE);
}

#[test]
fn icmp_echo_round_trip() {
    let mut t = table(16);
    let mut echo = vec![128u8, 0, 0, 0, 0x12, 0x34, 0, 1];
    echo.extend_from_slice(b"ping");
    let mut p = v6_packet(NODE, pool6().embed(REMOTE), 58, &echo);
    let v4 = out_v4(&mut t, &mut p, 0).unwrap();
    assert_eq!(v4[20], 8);
    assert!(v4_csum_ok(&v4));
    let id4 = u16::from_be_bytes([v4[24], v4[25]]);
    // Echo reply.
    let mut r = v4.clone();
    r[12..16].copy_from_slice(&v4[16..20]);
    r[16..20].copy_from_slice(&v4[12..16]);
    r[20] = 0;
    r[22] = 0;
    r[23] = 0;
    let c = csum::checksum(&r[20..]);
    r[22..24].copy_from_slice(&c.to_be_bytes());
    let back = in_v6(&mut t, &r, 1).unwrap();
    assert_eq!(back[40], 129);
    assert_eq!(&back[44..46], &[0x12, 0x34]);
    assert!(v6_csum_ok(&back));
    assert!(t.lookup(Proto::Icmp, id4, REMOTE.into(), 0).is_some());
    t.expire(1 + ICMP_TIMEOUT);
    assert_eq!(t.sessions(), 0);
}

#[test]
fn icmp_error_maps_inner_packet() {
    let mut t = table(16);
    let mut p = v6_packet(NODE, pool6().embed(REMOTE), 17, &udp(7000, 9, b"probe"));
    let v4 = out_v4(&mut t, &mut p, 0).unwrap();
    // Port unreachable from the remote, quoting the packet.
    let mut e = vec![0x45u8, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0];
    e.extend_from_slice(&REMOTE);
    e.extend_from_slice(&POOL4.octets());
    e.extend_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]);
    e.extend_from_slice(&v4);
    let len = e.len() as u16;
    e[2..4].copy_from_slice(&len.to_be_bytes());
    let c = csum::checksum(&e[20..]);
    e[22..24].copy_from_slice(&c.to_be_bytes());
    let h = crate::wg::packet::ipv4_header_checksum(&e[..20]);
    e[10..12].copy_from_slice(&h.to_be_bytes());
    let back = in_v6(&mut t, &e, 1).unwrap();
    assert_eq!(back[40], 1);
    assert_eq!(&back[24..40], &NODE);
    assert_eq!(&back[48 + 8..48 + 24], &NODE);
    assert_eq!(u16::from_be_bytes([back[88], back[89]]), 7000);
    assert!(v6_csum_ok(&back));
}

#[test]
fn a_nodes_icmp_error_about_an_inbound_packet_reaches_the_remote() {
    let mut t = table(16);
    let mut p = v6_packet(NODE, pool6().embed(REMOTE), 17, &udp(7000, 53, b"query"));
    let v4 = out_v4(&mut t, &mut p, 0).unwrap();
    let port4 = u16::from_be_bytes([v4[20], v4[21]]);
    // What the node received: the remote's answer.
    let inbound = in_v6(&mut t, &v4_reply(&v4, None), 1).unwrap();
    let error = |typ: u8, code: u8, mtu: u32, src: [u8; 16]| {
        let mut m = vec![typ, code, 0, 0];
        m.extend_from_slice(&mtu.to_be_bytes());
        m.extend_from_slice(&inbound);
        v6_packet(src, pool6().embed(REMOTE), 58, &m)
    };
    // Port unreachable, quoting it: an ICMPv4 error from pool4 to the remote,
    // quoting the packet as the remote sent it.
    let mut e = error(1, 4, 0, NODE);
    let v4e = out_v4(&mut t, &mut e, 2).unwrap();
    assert_eq!(&v4e[12..16], &POOL4.octets());
    assert_eq!(&v4e[16..20], &REMOTE);
    assert_eq!((v4e[20], v4e[21]), (3, 3));
    assert_eq!(&v4e[28 + 12..28 + 16], &REMOTE);
    assert_eq!(&v4e[28 + 16..28 + 20], &POOL4.octets());
    assert_eq!(u16::from_be_bytes([v4e[48], v4e[49]]), 53);
    assert_eq!(u16::from_be_bytes([v4e[50], v4e[51]]), port4);
    assert!(v4_csum_ok(&v4e));
    // Packet Too Big: Fragmentation Needed with the MTU less the 20 bytes
    // IPv4's header is shorter.
    let mut e = error(2, 0, 1280, NODE);
    let v4e = out_v4(&mut t, &mut e, 2).unwrap();
    assert_eq!((v4e[20], v4e[21]), (3, 4));
    assert_eq!(u16::from_be_bytes([v4e[26], v4e[27]]), 1260);
    assert!(v4_csum_ok(&v4e));
    // Another node cannot send one about this node's flow.
    let mut other = NODE;
    other[15] = 9;
    let mut e = error(1, 4, 0, other);
    assert_eq!(
        t.outbound_by_source(&mut e, &pool6(), 3),
        Err(DropReason::Nat64NoSession)
    );
    // Errors start no session, and one about a flow that has none is dropped.
    assert_eq!(t.sessions(), 1);
    t.expire(2 + UDP_TIMEOUT);
    let mut e = error(1, 4, 0, NODE);
    assert_eq!(
        t.outbound_by_source(&mut e, &pool6(), 3 + UDP_TIMEOUT),
        Err(DropReason::Nat64NoSession)
    );
}

/// A node's ICMPv6 error whose checksum is wrong is dropped, not made into
/// an ICMPv4 error with a right one (the table recomputes the checksum after
/// its rewrite); nor is a fragmented one, whose checksum cannot be checked.
#[test]
fn a_nodes_damaged_icmp_error_stays_dropped() {
    let mut t = table(16);
    let mut p = v6_packet(NODE, pool6().embed(REMOTE), 17, &udp(7000, 53, b"query"));
    let v4 = out_v4(&mut t, &mut p, 0).unwrap();
    let inbound = in_v6(&mut t, &v4_reply(&v4, None), 1).unwrap();
    let mut m = vec![1u8, 4, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&inbound);
    let error = v6_packet(NODE, pool6().embed(REMOTE), 58, &m);
    let mut damaged = error.clone();
    *damaged.last_mut().unwrap() ^= 0x55;
    assert_eq!(
        t.outbound_by_source(&mut damaged, &pool6(), 2),
        Err(DropReason::BadChecksum)
    );
    let [mut first, _] = v6_fragments(&error, 9, 48);
    assert_eq!(
        t.outbound_by_source(&mut first, &pool6(), 2),
        Err(DropReason::FragmentedIcmp)
    );
    // The intact one goes on.
    let v4e = out_v4(&mut t, &mut error.clone(), 2).unwrap();
    assert_eq!((v4e[20], v4e[21]), (3, 3));
    assert!(v4_csum_ok(&v4e));
}

#[test]
fn bounded_and_ports_exhausted() {
    let mut t = table(3);
    for i in 0..3u16 {
        let mut p = v6_packet(NODE, pool6().embed(REMOTE), 17, &udp(100 + i, 53, b""));
        t.outbound_by_source(&mut p, &pool6(), 0).unwrap();
    }
    let mut p = v6_packet(NODE, pool6().embed(REMOTE), 17, &udp(200, 53, b""));
    assert_eq!(
        t.outbound_by_source(&mut p, &pool6(), 0),
        Err(DropReason::Nat64TableFull)
    );
    // Once they expire there is room again.
    assert!(t
        .outbound_by_source(&mut p, &pool6(), UDP_TIMEOUT + 1)
        .is_ok());

    let mut t = table(100);
    for i in 0..4u16 {
        let mut p = v6_packet(NODE, pool6().embed(REMOTE), 17, &udp(100 + i, 53, b""));
        t.outbound_by_source(&mut p, &pool6(), 0).unwrap();
    }
    let mut p = v6_packet(NODE, pool6().embed(REMOTE), 17, &udp(200, 53, b""));
    assert_eq!(
        t.outbound_by_source(&mut p, &pool6(), 0),
        Err(DropReason::Nat64PortsExhausted)
    );
}

/// A protocol whose ports are all bound fails new bindings at once, without
/// looking at each port again; another protocol's ports are its own, and a
/// binding that expires frees its port.
#[test]
fn used_up_ports_are_not_scanned() {
    let mut t = table(100);
    let dst = pool6().embed(REMOTE);
    for i in 0..4u16 {
        let mut p = v6_packet(NODE, dst, 17, &udp(100 + i, 53, b""));
        t.outbound_by_source(&mut p, &pool6(), 0).unwrap();
    }
    let probes = t.probes;
    for i in 0..100u16 {
        let mut p = v6_packet(NODE, dst, 17, &udp(200 + i, 53, b""));
        assert_eq!(
            t.outbound_by_source(&mut p, &pool6(), 0),
            Err(DropReason::Nat64PortsExhausted)
        );
    }
    assert_eq!(t.probes, probes, "a used-up range scanned again");
    let mut p = v6_packet(NODE, dst, 6, &tcp(100, 80, SYN, b""));
    assert_eq!(
        t.outbound_by_source(&mut p, &pool6(), UDP_TIMEOUT - 10),
        Ok(Step::Mapped)
    );
    assert_eq!(t.bound, [1, 4, 0]);
    t.expire(UDP_TIMEOUT);
    assert_eq!(t.bound, [1, 0, 0]);
    let mut p = v6_packet(NODE, dst, 17, &udp(300, 53, b""));
    assert_eq!(
        t.outbound_by_source(&mut p, &pool6(), UDP_TIMEOUT),
        Ok(Step::Mapped)
    );
    assert_eq!(t.bound, [1, 1, 0]);
}

/// One node at its bound gets no new session (whatever the protocol, and no
/// binding is made for it), while another node still does and the first
/// node's sessions go on; as its sessions expire it opens new ones again.
#[test]
fn a_host_at_its_bound_leaves_room_for_the_others() {
    let mut t = table_per_host(16, 3);
    let dst = pool6().embed(REMOTE);
    let mut a = v6_packet(NODE, dst, 17, &udp(5353, 53, b"a"));
    let v4a = out_v4(&mut t, &mut a, 0).unwrap();
    let mut b = v6_packet(NODE, dst, 17, &udp(5353, 54, b"b"));
    out_v4(&mut t, &mut b, 0).unwrap();
    let mut c = v6_packet(NODE, dst, 6, &tcp(40000, 80, SYN, b""));
    out_v4(&mut t, &mut c, 0).unwrap();
    assert_eq!(t.owner_sessions(NODE), 3);
    assert_eq!((t.sessions(), t.bindings(), t.owners()), (3, 2, 1));

    let mut d = v6_packet(NODE, dst, 17, &udp(6000, 53, b"d"));
    assert_eq!(
        t.outbound_by_source(&mut d.clone(), &pool6(), 0),
        Err(DropReason::Nat64HostLimit)
    );
    let mut echo = v6_packet(NODE, dst, 58, &[128, 0, 0, 0, 0x12, 0x34, 0, 1]);
    assert_eq!(
        t.outbound_by_source(&mut echo, &pool6(), 0),
        Err(DropReason::Nat64HostLimit)
    );
    // On an existing binding too (another remote port).
    let mut b2 = v6_packet(NODE, dst, 17, &udp(5353, 55, b"b"));
    assert_eq!(
        t.outbound_by_source(&mut b2, &pool6(), 0),
        Err(DropReason::Nat64HostLimit)
    );
    assert_eq!((t.sessions(), t.bindings()), (3, 2), "no binding left over");

    // Another node is not held back.
    let other = node(2);
    let mut o = v6_packet(other, dst, 17, &udp(5353, 53, b"o"));
    assert!(out_v4(&mut t, &mut o, 0).is_ok());
    assert_eq!(t.owner_sessions(other), 1);
    assert_eq!(t.owner_sessions(NODE), 3);
    assert_eq!(t.owners(), 2);

    // The first node's sessions still translate, both ways.
    let mut a = v6_packet(NODE, dst, 17, &udp(5353, 53, b"again"));
    let again = out_v4(&mut t, &mut a, 1).unwrap();
    assert_eq!(&again[20..22], &v4a[20..22], "the same port");
    let back = in_v6(&mut t, &v4_reply(&v4a, None), 1).unwrap();
    assert_eq!(&back[24..40], &NODE);
    assert_eq!(u16::from_be_bytes([back[42], back[43]]), 5353);

    // The TCP session (transitory: never answered) expires first, and its
    // room is the node's again.
    assert!(out_v4(&mut t, &mut d, TCP_TRANS_TIMEOUT).is_ok());
    assert_eq!(t.owner_sessions(NODE), 3);
    assert_eq!(
        t.outbound_by_source(&mut b2.clone(), &pool6(), TCP_TRANS_TIMEOUT),
        Err(DropReason::Nat64HostLimit)
    );
    // Once all of them have expired, the node has its whole bound again.
    t.expire(TCP_TRANS_TIMEOUT + UDP_TIMEOUT);
    assert_eq!((t.sessions(), t.owners()), (0, 0));
    assert_eq!(t.owner_sessions(NODE), 0);
    let now = TCP_TRANS_TIMEOUT + UDP_TIMEOUT + 1;
    for port in [7000u16, 7001, 7002] {
        let mut p = v6_packet(NODE, dst, 17, &udp(port, 53, b"x"));
        assert!(out_v4(&mut t, &mut p, now).is_ok(), "{port}");
    }
    let mut p = v6_packet(NODE, dst, 17, &udp(7003, 53, b"x"));
    assert_eq!(
        t.outbound_by_source(&mut p, &pool6(), now),
        Err(DropReason::Nat64HostLimit)
    );
    assert_eq!(t.owner_sessions(NODE), 3);
}

/// Sessions IPv4 hosts open on a node's UDP mapping do not count against
/// that node's own bound: it keeps its own room up to its bound, and the
/// sessions it has still pass.
#[test]
fn strangers_sessions_leave_a_hosts_bound_alone() {
    let mut t = table_per_host(64, 2);
    let dst = pool6().embed(REMOTE);
    let mut p = v6_packet(NODE, dst, 17, &udp(5353, 53, b"x"));
    let v4 = out_v4(&mut t, &mut p, 0).unwrap();
    let stranger = |last: u8| {
        let mut s = v4_reply(&v4, None);
        s[12..16].copy_from_slice(&[192, 0, 2, last]);
        v4_reply(&v4_reply(&s, None), None)
    };
    // Strangers open sessions on the node's UDP mapping, up to their own
    // bound: they reach the node and do not count against its own.
    for last in 100..102 {
        let back = in_v6(&mut t, &stranger(last), 1).unwrap();
        assert_eq!(&back[24..40], &NODE);
    }
    assert_eq!(
        in_v6(&mut t, &stranger(102), 1),
        Err(DropReason::Nat64InboundLimit)
    );
    assert_eq!((t.sessions(), t.owner_sessions(NODE)), (3, 1));
    assert_eq!(t.stranger_sessions(NODE), 2);
    // The node still has its own room: one more, then its bound.
    let mut q = v6_packet(NODE, dst, 17, &udp(5354, 53, b"x"));
    assert!(t.outbound_by_source(&mut q, &pool6(), 1).is_ok());
    let mut r = v6_packet(NODE, dst, 17, &udp(5355, 53, b"x"));
    assert_eq!(
        t.outbound_by_source(&mut r, &pool6(), 1),
        Err(DropReason::Nat64HostLimit)
    );
    // The sessions it has still pass, the strangers' too.
    assert!(in_v6(&mut t, &stranger(100), 2).is_ok());
    assert!(in_v6(&mut t, &v4_reply(&v4, None), 2).is_ok());
    assert_eq!(t.owner_sessions(NODE), 2);
    assert_eq!(t.stranger_sessions(NODE), 2);
    // When they expire, the counts stay right.
    t.expire(10_000);
    assert_eq!(
        (t.sessions(), t.owner_sessions(NODE), t.owners()),
        (0, 0, 0)
    );
    assert_eq!(t.stranger_sessions(NODE), 0);
}

/// One node's mappings, however many, take at most its bound of the
/// sessions IPv4 hosts open: a host spraying datagrams at them from port
/// after port is refused past it, while another node's mapping still takes
/// a new flow from it and the first node still opens its own flows.
#[test]
fn one_nodes_mappings_take_at_most_its_bound_of_strangers() {
    let mut t = table_per_host(64, 8);
    let (a, b): (Owner, Owner) = ([0xa; 16], [0xb; 16]);
    let dst = pool6().embed(REMOTE);
    let mut ports = Vec::new();
    for sport in 5000..5006 {
        let mut p = v6_packet(NODE, dst, 17, &udp(sport, 53, b"x"));
        let v4 = out_v4_owned(&mut t, &mut p, a, 0).unwrap();
        ports.push(u16::from_be_bytes([v4[20], v4[21]]));
    }
    assert_eq!(t.owner_sessions(a), 6);
    // A host sprays the mappings from port after port, two more hosts too.
    let mut opened = 0;
    for i in 0..120u16 {
        let host = [192, 0, 2, 1 + (i % 3) as u8];
        let mut s = stranger_udp(host, 10_000 + i, ports[usize::from(i) % 6]);
        match t.inbound(&mut s, &pool6(), 1) {
            Ok(_) => opened += 1,
            Err(e) => assert_eq!(e, DropReason::Nat64InboundLimit, "{i}"),
        }
    }
    assert_eq!(opened, 8);
    assert_eq!((t.stranger_sessions(a), t.owner_sessions(a)), (8, 6));
    assert_eq!(t.sessions(), 6 + 8);
    // Another node's mapping still takes a new flow, from the same host.
    let mut p = v6_packet(node(2), dst, 17, &udp(5353, 53, b"x"));
    let v4 = out_v4_owned(&mut t, &mut p, b, 1).unwrap();
    let port_b = u16::from_be_bytes([v4[20], v4[21]]);
    let mut s = stranger_udp([192, 0, 2, 1], 20_000, port_b);
    assert_eq!(t.inbound(&mut s, &pool6(), 1), Ok(Step::Mapped));
    assert_eq!(&s[24..40], &node(2));
    assert_eq!((t.stranger_sessions(b), t.stranger_sessions(a)), (1, 8));
    // The first node still opens its own flows, up to its own bound.
    for sport in 6000..6002 {
        let mut p = v6_packet(NODE, dst, 17, &udp(sport, 53, b"x"));
        assert_eq!(t.outbound(&mut p, &pool6(), a, 2), Ok(Step::Mapped));
        ports.push(u16::from_be_bytes([p[40], p[41]]));
    }
    let mut p = v6_packet(NODE, dst, 17, &udp(6002, 53, b"x"));
    assert_eq!(
        t.outbound(&mut p, &pool6(), a, 2),
        Err(DropReason::Nat64HostLimit)
    );
    // Its new mappings take no stranger past the bound either, and the
    // strangers' sessions it has still pass.
    let mut s = stranger_udp([192, 0, 2, 9], 30_000, ports[7]);
    assert_eq!(
        t.inbound(&mut s, &pool6(), 2),
        Err(DropReason::Nat64InboundLimit)
    );
    let mut s = stranger_udp([192, 0, 2, 1], 10_000, ports[0]);
    assert_eq!(t.inbound(&mut s, &pool6(), 2), Ok(Step::Mapped));
    assert_eq!(&s[24..40], &NODE);
    assert_eq!(t.stranger_sessions(a), 8);
}

/// The strangers' sessions leave their node's count as they expire: the
/// counts come back to zero, and the node's mappings take new flows again.
#[test]
fn strangers_counts_come_back_to_zero_as_they_expire() {
    let mut t = table_per_host(64, 3);
    let a: Owner = [0xa; 16];
    let dst = pool6().embed(REMOTE);
    let mut p = v6_packet(NODE, dst, 17, &udp(5353, 53, b"x"));
    let v4 = out_v4_owned(&mut t, &mut p, a, 0).unwrap();
    let port4 = u16::from_be_bytes([v4[20], v4[21]]);
    for (sport, now) in [(1, 10), (2, 20), (3, 30)] {
        let mut s = stranger_udp([192, 0, 2, 1], sport, port4);
        assert_eq!(t.inbound(&mut s, &pool6(), now), Ok(Step::Mapped));
    }
    let mut s = stranger_udp([192, 0, 2, 1], 4, port4);
    assert_eq!(
        t.inbound(&mut s, &pool6(), 30),
        Err(DropReason::Nat64InboundLimit)
    );
    // The node's own session (from 0) goes first, then the strangers' one
    // by one; the binding lasts while any holds it.
    t.expire(UDP_TIMEOUT);
    assert_eq!((t.owner_sessions(a), t.stranger_sessions(a)), (0, 3));
    t.expire(10 + UDP_TIMEOUT);
    assert_eq!((t.stranger_sessions(a), t.bindings()), (2, 1));
    // Room again, within the same bound.
    let mut s = stranger_udp([192, 0, 2, 2], 5, port4);
    assert_eq!(
        t.inbound(&mut s, &pool6(), 10 + UDP_TIMEOUT),
        Ok(Step::Mapped)
    );
    assert_eq!(t.stranger_sessions(a), 3);
    t.expire(10 + 2 * UDP_TIMEOUT);
    assert_eq!((t.sessions(), t.bindings()), (0, 0));
    assert_eq!((t.stranger_sessions(a), t.owner_sessions(a)), (0, 0));
    assert!(t.strangers.is_empty() && t.owners.is_empty());
    assert_eq!(recount_owners(&t), (HashMap::new(), HashMap::new()));
}

/// A mapping stays its maker's while it lasts: once that node's own
/// sessions on it have ended (strangers' hold it), and when another node
/// sends from its address (a reload gave it to another peer), strangers'
/// sessions on it still count against the node that made it, and its
/// bound stays the same.
#[test]
fn a_mapping_keeps_the_owner_that_made_it() {
    let mut t = table_per_host(64, 2);
    let (a, b): (Owner, Owner) = ([0xa; 16], [0xb; 16]);
    let dst = pool6().embed(REMOTE);
    let mut p = v6_packet(NODE, dst, 17, &udp(5353, 53, b"x"));
    let v4 = out_v4_owned(&mut t, &mut p, a, 0).unwrap();
    let port4 = u16::from_be_bytes([v4[20], v4[21]]);
    let mut s = stranger_udp([192, 0, 2, 1], 1, port4);
    assert_eq!(t.inbound(&mut s, &pool6(), 100), Ok(Step::Mapped));
    t.expire(UDP_TIMEOUT);
    assert_eq!((t.owner_sessions(a), t.owners(), t.bindings()), (0, 0, 1));
    // Another node now sends from the address: a session of its own on
    // the same mapping.
    let mut p = v6_packet(NODE, dst, 17, &udp(5353, 54, b"x"));
    assert_eq!(
        t.outbound(&mut p, &pool6(), b, UDP_TIMEOUT),
        Ok(Step::Mapped)
    );
    assert_eq!(&p[40..42], &port4.to_be_bytes(), "the same mapping");
    assert_eq!((t.owner_sessions(b), t.stranger_sessions(b)), (1, 0));
    // Strangers still count against the node that made it, to its bound.
    let mut s = stranger_udp([192, 0, 2, 2], 2, port4);
    assert_eq!(t.inbound(&mut s, &pool6(), UDP_TIMEOUT), Ok(Step::Mapped));
    let info = t
        .lookup(Proto::Udp, port4, [192, 0, 2, 2].into(), 2)
        .unwrap();
    assert_eq!(info.counted, Counted::Stranger(a));
    assert_eq!((t.stranger_sessions(a), t.stranger_sessions(b)), (2, 0));
    let mut s = stranger_udp([192, 0, 2, 3], 3, port4);
    assert_eq!(
        t.inbound(&mut s, &pool6(), UDP_TIMEOUT),
        Err(DropReason::Nat64InboundLimit)
    );
}

/// `2001:db8:1::n`: an address in a prefix one node routes.
fn in_prefix(n: u16) -> [u8; 16] {
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, n).octets()
}

/// The bound is the owner's, not the address's: a node sending from one
/// address after another of its prefix reaches it as it would from one,
/// while another owner still opens sessions; as the first owner's sessions
/// expire, it has its room again.
#[test]
fn an_owner_is_bounded_whatever_addresses_it_sends_from() {
    let mut t = table_per_host(64, 4);
    let (a, b): (Owner, Owner) = ([0xa; 16], [0xb; 16]);
    let dst = pool6().embed(REMOTE);
    for n in 1..=4 {
        let mut p = v6_packet(in_prefix(n), dst, 17, &udp(5353, 53, b"x"));
        assert_eq!(t.outbound(&mut p, &pool6(), a, 0), Ok(Step::Mapped), "{n}");
    }
    assert_eq!((t.owner_sessions(a), t.owners()), (4, 1));
    for n in 5..=20 {
        let mut p = v6_packet(in_prefix(n), dst, 17, &udp(5353, 53, b"x"));
        assert_eq!(
            t.outbound(&mut p, &pool6(), a, 1),
            Err(DropReason::Nat64HostLimit),
            "{n}"
        );
    }
    // No binding was left for the refused addresses.
    assert_eq!((t.sessions(), t.bindings()), (4, 4));
    // Another owner is not held back, from new addresses or from one the
    // first sent from (another remote: a new session on its binding).
    let mut p = v6_packet(in_prefix(100), dst, 17, &udp(5353, 53, b"y"));
    assert_eq!(t.outbound(&mut p, &pool6(), b, 1), Ok(Step::Mapped));
    let other = pool6().embed([203, 0, 113, 11]);
    let mut p = v6_packet(in_prefix(1), other, 17, &udp(5353, 53, b"y"));
    assert_eq!(t.outbound(&mut p, &pool6(), b, 1), Ok(Step::Mapped));
    assert_eq!((t.owner_sessions(a), t.owner_sessions(b)), (4, 2));
    // The first owner's sessions still pass.
    let mut p = v6_packet(in_prefix(2), dst, 17, &udp(5353, 53, b"z"));
    assert_eq!(t.outbound(&mut p, &pool6(), a, 2), Ok(Step::Mapped));
    // Once its sessions have expired it opens new ones again, from any of
    // its addresses, up to its bound.
    let later = 2 + UDP_TIMEOUT;
    for n in 21..=24 {
        let mut p = v6_packet(in_prefix(n), dst, 17, &udp(5353, 53, b"x"));
        assert_eq!(
            t.outbound(&mut p, &pool6(), a, later),
            Ok(Step::Mapped),
            "{n}"
        );
    }
    let mut p = v6_packet(in_prefix(25), dst, 17, &udp(5353, 53, b"x"));
    assert_eq!(
        t.outbound(&mut p, &pool6(), a, later),
        Err(DropReason::Nat64HostLimit)
    );
    assert_eq!((t.owner_sessions(a), t.owner_sessions(b)), (4, 0));
    t.expire(later + UDP_TIMEOUT);
    assert_eq!((t.sessions(), t.owners(), t.owner_sessions(a)), (0, 0, 0));
}

/// A session keeps the owner it was opened under: when its address later
/// comes from another owner (a reload gave it to another peer), packets on
/// it do not move it, new sessions count against the new owner, and each
/// leaves its own owner's count when it expires.
#[test]
fn a_session_keeps_the_owner_it_was_opened_under() {
    let mut t = table_per_host(64, 2);
    let (a, b): (Owner, Owner) = ([0xa; 16], [0xb; 16]);
    let dst = pool6().embed(REMOTE);
    let mut p = v6_packet(NODE, dst, 17, &udp(5353, 53, b"x"));
    let v4 = out_v4_owned(&mut t, &mut p, a, 0).unwrap();
    let port4 = u16::from_be_bytes([v4[20], v4[21]]);
    // The same flow, now from `b`: still `a`'s session.
    let mut p = v6_packet(NODE, dst, 17, &udp(5353, 53, b"x"));
    assert_eq!(t.outbound(&mut p, &pool6(), b, 100), Ok(Step::Mapped));
    let s = t.lookup(Proto::Udp, port4, REMOTE.into(), 53).unwrap();
    assert_eq!(s.counted, Counted::Own(a));
    assert_eq!((t.owner_sessions(a), t.owner_sessions(b)), (1, 0));
    // A new flow from that address counts against `b`.
    let mut p = v6_packet(NODE, dst, 17, &udp(5353, 54, b"x"));
    assert_eq!(t.outbound(&mut p, &pool6(), b, 200), Ok(Step::Mapped));
    assert_eq!((t.owner_sessions(a), t.owner_sessions(b)), (1, 1));
    let s = t.lookup(Proto::Udp, port4, REMOTE.into(), 54).unwrap();
    assert_eq!(s.counted, Counted::Own(b));
    // `a`'s session (last refreshed at 100) expires first, from `a`'s count.
    t.expire(100 + UDP_TIMEOUT);
    assert_eq!((t.owner_sessions(a), t.owner_sessions(b)), (0, 1));
    assert_eq!(t.owners(), 1);
    t.expire(200 + UDP_TIMEOUT);
    assert_eq!((t.sessions(), t.owners()), (0, 0));
    // A stranger's session on a node's UDP mapping counts among the
    // strangers' of the node the mapping belongs to, not its own.
    let mut p = v6_packet(NODE, dst, 17, &udp(5353, 53, b"x"));
    let v4 = out_v4_owned(&mut t, &mut p, a, 1000).unwrap();
    let mut s = v4_reply(&v4, None);
    s[12..16].copy_from_slice(&[192, 0, 2, 99]);
    let s = v4_reply(&v4_reply(&s, None), None);
    assert!(in_v6(&mut t, &s, 1000).is_ok());
    let port4 = u16::from_be_bytes([v4[20], v4[21]]);
    let info = t
        .lookup(Proto::Udp, port4, [192, 0, 2, 99].into(), 53)
        .unwrap();
    assert_eq!(info.counted, Counted::Stranger(a));
    assert_eq!((t.sessions(), t.owner_sessions(a)), (2, 1));
    assert_eq!(t.stranger_sessions(a), 1);
}

#[test]
fn tcp_fin_and_rst_are_transitory() {
    let mut t = table(16);
    let mut syn = v6_packet(NODE, pool6().embed(REMOTE), 6, &tcp(1, 80, SYN, b""));
    let v4 = out_v4(&mut t, &mut syn, 0).unwrap();
    let port4 = u16::from_be_bytes([v4[20], v4[21]]);
    in_v6(&mut t, &v4_reply(&v4, Some(SYN | 0x10)), 0).unwrap();
    in_v6(&mut t, &v4_reply(&v4, Some(FIN | 0x10)), 10).unwrap();
    let mut fin = v6_packet(NODE, pool6().embed(REMOTE), 6, &tcp(1, 80, FIN | 0x10, b""));
    t.outbound_by_source(&mut fin, &pool6(), 20).unwrap();
    let s = t.lookup(Proto::Tcp, port4, REMOTE.into(), 80).unwrap();
    assert_eq!(s.tcp, TcpState::FinBoth);
    assert_eq!(s.expires, 20 + TCP_TRANS_TIMEOUT);
    let mut rst = v6_packet(NODE, pool6().embed(REMOTE), 6, &tcp(1, 80, RST, b""));
    t.outbound_by_source(&mut rst, &pool6(), 30).unwrap();
    let s = t.lookup(Proto::Tcp, port4, REMOTE.into(), 80).unwrap();
    assert_eq!(s.tcp, TcpState::Trans);
    assert!(s.expires <= 30 + TCP_TRANS_TIMEOUT);
}

#[test]
fn later_fragment_without_its_first_held_then_counted_at_expiry() {
    let mut t = table(16);
    let mut p = v6_packet(
        NODE,
        pool6().embed(REMOTE),
        44,
        &[17, 0, 0, 8, 0, 0, 0, 1, 0, 0],
    );
    assert_eq!(t.outbound_by_source(&mut p, &pool6(), 0), Ok(Step::Held));
    assert_eq!(t.held_fragments(), (1, p.len()));
    assert_eq!(t.take_expired_held(), 0);
    t.expire(FRAG_TIMEOUT - 1);
    assert_eq!(t.held_fragments().0, 1, "still waiting");
    t.expire(FRAG_TIMEOUT);
    assert_eq!(t.held_fragments(), (0, 0));
    assert_eq!(t.take_expired_held(), 1);
    assert_eq!(t.take_expired_held(), 0, "counted once");
    assert_eq!(t.take_released(), None);
}

proptest! {
    #[test]
    fn never_panics_on_garbage(data in proptest::collection::vec(any::<u8>(), 0..200), now in 0u64..1000) {
        let mut t = table(8);
        let mut a = data.clone();
        let _ = t.outbound_by_source(&mut a, &pool6(), now);
        let mut b = data;
        let _ = t.inbound(&mut b, &pool6(), now);
    }

    /// Packets from three nodes (owners) sending from five addresses (most
    /// of the time each address its node's, as for peers routing prefixes;
    /// sometimes another node's, as after a reload gives an address to
    /// another peer), and strangers' datagrams to the pool4 ports, at
    /// advancing times (mostly close together, so that the bounds are
    /// reached, sometimes far apart, so that sessions expire): the table and
    /// every owner stay within their bounds, whatever addresses they use,
    /// and so do the strangers' sessions on each owner's mappings; they
    /// refuse only at them, the per-owner counts (own and strangers') always
    /// match the sessions, and the rewritten checksums hold.
    #[test]
    fn bounded_and_checksums_stay_valid(
        ops in proptest::collection::vec(
            (
                0u8..4,
                1u8..6,
                0u8..4,
                any::<u16>(),
                any::<u16>(),
                prop_oneof![20 => 0u64..5, 1 => 0u64..2000],
                proptest::collection::vec(any::<u8>(), 0..40),
            ),
            1..100,
        )
    ) {
        let mut t = Table::new(Settings {
            pool4: POOL4,
            port_min: 1024,
            port_max: 1100,
            max_sessions: 12,
            max_sessions_per_host: 5,
        });
        let addrs = [node(1), node(2), node(3), node(4), node(5)];
        let owners: [Owner; 3] = [[1; 16], [2; 16], [3; 16]];
        let mut now = 0;
        for (kind, host, who, sport, dport, dt, payload) in ops {
            now += dt;
            let src = node(host);
            // Addresses 1, 2-3 and 4-5 are the three nodes'; one time in
            // four the next node sends from it instead.
            let mine = usize::from(host / 2);
            let owner = owners[if who < 3 { mine } else { (mine + 1) % 3 }];
            let dst = pool6().embed(REMOTE);
            if kind == 3 {
                // A stranger's datagram to a pool4 port: most of the time a
                // UDP mapping's, sometimes one of the lowest (a mapping's or
                // none).
                let from = pool6().embed([192, 0, 2, (sport % 200) as u8 + 1]);
                let to = pool6().embed(POOL4.octets());
                let mut mapped: Vec<u16> = t
                    .bib4
                    .keys()
                    .filter(|k| k.proto == Proto::Udp)
                    .map(|k| k.port)
                    .collect();
                mapped.sort_unstable();
                let port4 = match mapped.get(usize::from(dport / 8) % mapped.len().max(1)) {
                    Some(&p) if dport % 8 != 0 => p,
                    _ => 1024 + dport % 8,
                };
                let mut p = v6_packet(from, to, 17, &udp(sport, port4, &payload));
                let mapping = t.bib4.get(&V4Key { proto: Proto::Udp, port: port4 }).map(|b| b.owner);
                match t.inbound(&mut p, &pool6(), now) {
                    Ok(_) => {
                        prop_assert!(v6_csum_ok(&p));
                        prop_assert!(addrs.iter().any(|n| p[24..40] == n[..]));
                    }
                    // Strangers' sessions never count against a node's own.
                    Err(DropReason::Nat64HostLimit) => prop_assert!(false, "a stranger hit a node's bound"),
                    // Only at the strangers' bound of the mapping's node.
                    Err(DropReason::Nat64InboundLimit) => {
                        let o = mapping.expect("refused on no mapping");
                        prop_assert_eq!(t.stranger_sessions(o), 5);
                    }
                    // Strangers open sessions only under three quarters full.
                    Err(DropReason::Nat64TableFull) => {
                        prop_assert!(t.sessions() >= 9);
                    }
                    Err(_) => {}
                }
            } else {
                let mut p = match kind {
                    0 => v6_packet(src, dst, 17, &udp(sport, dport, &payload)),
                    1 => v6_packet(src, dst, 6, &tcp(sport, dport, SYN, &payload)),
                    _ => {
                        let mut e = vec![128u8, 0, 0, 0];
                        e.extend_from_slice(&sport.to_be_bytes());
                        e.extend_from_slice(&[0, 1]);
                        e.extend_from_slice(&payload);
                        v6_packet(src, dst, 58, &e)
                    }
                };
                match t.outbound(&mut p, &pool6(), owner, now) {
                    Ok(_) => {
                        prop_assert!(v6_csum_ok(&p));
                        prop_assert_eq!(&p[8..24], &pool6().embed(POOL4.octets()));
                    }
                    Err(DropReason::Nat64HostLimit) => {
                        prop_assert_eq!(t.owner_sessions(owner), 5);
                    }
                    Err(DropReason::Nat64TableFull) => {
                        prop_assert_eq!(t.sessions(), 12);
                    }
                    Err(_) => {}
                }
            }
            prop_assert!(t.sessions() <= 12);
            prop_assert!(t.bindings() <= t.sessions());
            // The per-owner counts are the sessions, counted afresh.
            let (own_counts, stranger_counts) = recount_owners(&t);
            prop_assert_eq!(&own_counts, &t.owners);
            prop_assert_eq!(&stranger_counts, &t.strangers);
            let per_owner: Vec<usize> = owners.iter().map(|&o| t.owner_sessions(o)).collect();
            let per_owner_strangers: Vec<usize> =
                owners.iter().map(|&o| t.stranger_sessions(o)).collect();
            let own = t.sessions.values().filter(|s| matches!(s.counted, Counted::Own(_))).count();
            prop_assert_eq!(per_owner.iter().sum::<usize>(), own);
            prop_assert_eq!(per_owner_strangers.iter().sum::<usize>(), t.sessions() - own);
            prop_assert!(per_owner.iter().all(|&n| n <= 5), "{:?}", per_owner);
            prop_assert!(per_owner_strangers.iter().all(|&n| n <= 5), "{:?}", per_owner_strangers);
            prop_assert!(t.owners.values().all(|&n| n > 0));
            prop_assert!(t.strangers.values().all(|&n| n > 0));
        }
    }
}

/// Splits a whole IPv6 packet (no extension headers) into two fragments at
/// `at` bytes of its payload (a multiple of 8), with identification `id`.
fn v6_fragments(whole: &[u8], id: u32, at: usize) -> [Vec<u8>; 2] {
    let len = whole.len() - 40;
    [
        v6_piece(whole, id, 0, at, true),
        v6_piece(whole, id, at, len - at, false),
    ]
}

/// The fragment of a whole IPv6 packet (no extension headers) that carries
/// `len` bytes of its payload from `offset`, with identification `id`.
fn v6_piece(whole: &[u8], id: u32, offset: usize, len: usize, more: bool) -> Vec<u8> {
    let data = &whole[40 + offset..40 + offset + len];
    let mut p = whole[..40].to_vec();
    p[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    p[6] = 44;
    p.push(whole[6]);
    p.push(0);
    p.extend_from_slice(&((offset as u16) | u16::from(more)).to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(data);
    p
}

/// Splits a whole IPv4 packet (20-byte header) into two fragments at `at`
/// bytes of its payload (a multiple of 8).
fn v4_fragments(whole: &[u8], id: u16, at: usize) -> [Vec<u8>; 2] {
    let payload = &whole[20..];
    let piece = |data: &[u8], offset: usize, more: bool| {
        let mut p = whole[..20].to_vec();
        p[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
        p[4..6].copy_from_slice(&id.to_be_bytes());
        let flags = ((offset / 8) as u16) | if more { 0x2000 } else { 0 };
        p[6..8].copy_from_slice(&flags.to_be_bytes());
        p.extend_from_slice(data);
        p[10] = 0;
        p[11] = 0;
        let h = crate::wg::packet::ipv4_header_checksum(&p[..20]);
        p[10..12].copy_from_slice(&h.to_be_bytes());
        p
    };
    [
        piece(&payload[..at], 0, true),
        piece(&payload[at..], at, false),
    ]
}

/// The upper-layer bytes of IPv4 fragments, reassembled in order.
fn v4_reassemble(frags: &[Vec<u8>]) -> Vec<u8> {
    frags.iter().flat_map(|f| f[20..].to_vec()).collect()
}

/// The upper-layer bytes of IPv6 fragments (40-byte header, then a Fragment
/// header), reassembled in order.
fn v6_reassemble(frags: &[Vec<u8>]) -> Vec<u8> {
    frags.iter().flat_map(|f| f[48..].to_vec()).collect()
}

fn translate_one_6to4(pkt: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; OUT_BUF_LEN];
    match translate_6to4(&cfg(), pkt, &mut out) {
        Outcome::Forward(p) => {
            assert_eq!(p.len(), 1);
            p.iter(&out).next().unwrap().to_vec()
        }
        o => panic!("{o:?}"),
    }
}

fn translate_one_4to6(pkt: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; OUT_BUF_LEN];
    match translate_4to6(&cfg(), pkt, &mut out) {
        Outcome::Forward(p) => {
            assert_eq!(p.len(), 1);
            p.iter(&out).next().unwrap().to_vec()
        }
        o => panic!("{o:?}"),
    }
}

#[test]
fn outbound_later_fragments_follow_their_first() {
    let mut t = table(16);
    let dst = pool6().embed(REMOTE);
    let data: Vec<u8> = (0..200u8).collect();
    let whole = v6_packet(NODE, dst, 17, &udp(5353, 53, &data));
    let [mut first, mut later] = v6_fragments(&whole, 0x1234_5678, 104);
    t.outbound_by_source(&mut first, &pool6(), 10).unwrap();
    assert_eq!(t.fragment_flows(), 1);
    t.outbound_by_source(&mut later, &pool6(), 11).unwrap();
    assert_eq!(&later[8..24], &first[8..24], "same source as the first");
    let v4 = [translate_one_6to4(&first), translate_one_6to4(&later)];
    for f in &v4 {
        assert_eq!(&f[12..16], &POOL4.octets());
        assert_eq!(&f[16..20], &REMOTE);
        assert_eq!(u16::from_be_bytes([f[4], f[5]]), 0x5678);
    }
    // The reassembled datagram's checksum holds for pool4 and the new port.
    let l4 = v4_reassemble(&v4);
    assert_eq!(l4.len(), 8 + data.len());
    assert!(csum::verify(
        csum::pseudo_v4(&POOL4.octets(), &REMOTE, 17, l4.len() as u32),
        &l4
    ));
    let port4 = u16::from_be_bytes([l4[0], l4[1]]);
    assert!(t.lookup(Proto::Udp, port4, REMOTE.into(), 53).is_some());
    // Another datagram's later fragment (other identification): not this
    // one's mapping; held for a first of its own.
    let [_, mut stray] = v6_fragments(&whole, 0x1234_5679, 104);
    let before = stray.clone();
    assert_eq!(
        t.outbound_by_source(&mut stray, &pool6(), 11),
        Ok(Step::Held)
    );
    assert_eq!(stray, before, "a held fragment is not rewritten");
    // The mapping does not outlive FRAG_TIMEOUT: a fragment after it is not
    // mapped (it waits for a first that will not come, and expires).
    let [_, mut late] = v6_fragments(&whole, 0x1234_5678, 104);
    let before = late.clone();
    assert_eq!(
        t.outbound_by_source(&mut late, &pool6(), 10 + FRAG_TIMEOUT),
        Ok(Step::Held)
    );
    assert_eq!(late, before);
    assert_eq!(t.fragment_flows(), 0);
    t.expire(11 + 2 * FRAG_TIMEOUT);
    assert_eq!(t.held_fragments(), (0, 0));
    assert_eq!(t.take_expired_held(), 2, "the stray and the late one");
}

#[test]
fn inbound_later_fragments_follow_their_first() {
    let mut t = table(16);
    let dst = pool6().embed(REMOTE);
    let mut q = v6_packet(NODE, dst, 17, &udp(5353, 53, b"query"));
    let v4q = out_v4(&mut t, &mut q, 10).unwrap();
    // A large answer, fragmented by the IPv4 server.
    let mut big = v4_reply(&v4q, None);
    let answer: Vec<u8> = (0..300u16).map(|i| i as u8).collect();
    big.truncate(28);
    big.extend_from_slice(&answer);
    let total = big.len() as u16;
    big[2..4].copy_from_slice(&total.to_be_bytes());
    big[24..26].copy_from_slice(&((8 + answer.len()) as u16).to_be_bytes());
    let big = v4_reply(&v4_reply(&big, None), None); // checksums recomputed
    let [f1, f2] = v4_fragments(&big, 0x4242, 160);
    let mut v6 = [translate_one_4to6(&f1), translate_one_4to6(&f2)];
    for f in v6.iter_mut() {
        t.inbound(f, &pool6(), 11).unwrap();
        assert_eq!(&f[24..40], &NODE, "to the node");
        assert_eq!(&f[8..24], &dst);
    }
    let l4 = v6_reassemble(&v6);
    assert_eq!(u16::from_be_bytes([l4[2], l4[3]]), 5353);
    assert!(csum::verify(
        csum::pseudo_v6(&dst, &NODE, 17, l4.len() as u32),
        &l4
    ));
    assert_eq!(&l4[8..], &answer[..]);
}

/// The age orders of the tracked datagrams match the table.
fn assert_frag_orders(t: &Table) {
    assert_eq!(t.frag_age.len(), t.frags.len());
    let per_sender: usize = t.frag_senders.values().map(|s| s.len()).sum();
    assert_eq!(per_sender, t.frags.len());
    for (k, f) in &t.frags {
        assert_eq!(t.frag_age.get(&f.seq), Some(k));
        assert!(t.frag_senders[&f.sender].contains(&f.seq));
    }
}

/// One node sending first fragments of more datagrams than the table holds
/// keeps only its share, its newest; another node's datagram is still
/// tracked. Once they expire, the table is empty.
#[test]
fn a_node_past_its_share_of_fragment_flows_gives_up_its_own_oldest() {
    let mut t = table_per_host(64, 64);
    let dst = pool6().embed(REMOTE);
    let whole = v6_packet(NODE, dst, 17, &udp(5353, 53, &[7u8; 64]));
    let n = MAX_FRAG_FLOWS as u32 + 10;
    for id in 0..n {
        let [mut first, _] = v6_fragments(&whole, id, 32);
        t.outbound_by_source(&mut first, &pool6(), 1).unwrap();
    }
    assert_eq!(t.fragment_flows(), MAX_FRAG_FLOWS_PER_SENDER);
    assert_frag_orders(&t);
    let [_, mut newest] = v6_fragments(&whole, n - 1, 32);
    assert_eq!(
        t.outbound_by_source(&mut newest, &pool6(), 1),
        Ok(Step::Mapped)
    );
    let [_, mut oldest] = v6_fragments(&whole, 0, 32);
    assert_eq!(
        t.outbound_by_source(&mut oldest, &pool6(), 1),
        Ok(Step::Held)
    );
    let other = v6_packet(node(2), dst, 17, &udp(5353, 53, &[8u8; 64]));
    let [mut first, mut later] = v6_fragments(&other, 0, 32);
    t.outbound_by_source(&mut first, &pool6(), 1).unwrap();
    assert_eq!(
        t.outbound_by_source(&mut later, &pool6(), 1),
        Ok(Step::Mapped)
    );
    assert_eq!(&later[8..24], &pool6().embed(POOL4.octets()));
    // A first seen again is tracked once.
    let [mut again, _] = v6_fragments(&other, 0, 32);
    t.outbound_by_source(&mut again, &pool6(), 1).unwrap();
    assert_eq!(t.fragment_flows(), MAX_FRAG_FLOWS_PER_SENDER + 1);
    assert_frag_orders(&t);
    t.expire(1 + FRAG_TIMEOUT);
    assert_eq!(t.fragment_flows(), 0);
    assert_frag_orders(&t);
    assert!(t.frag_senders.is_empty());
}

/// An IPv4 host sending first fragments to a node's UDP mapping, datagram
/// after datagram, keeps only its share: the server the node talks to still
/// gets its fragmented answers through.
#[test]
fn an_ipv4_host_past_its_share_of_fragment_flows_leaves_the_others_room() {
    let mut t = table_per_host(64, 64);
    let mut q = v6_packet(NODE, pool6().embed(REMOTE), 17, &udp(5353, 53, b"q"));
    let v4q = out_v4(&mut t, &mut q, 1).unwrap();
    let port4 = u16::from_be_bytes([v4q[20], v4q[21]]);
    let to = pool6().embed(POOL4.octets());
    let answer =
        |from: [u8; 4]| v6_packet(pool6().embed(from), to, 17, &udp(53, port4, &[5u8; 64]));
    let stranger = answer([192, 0, 2, 66]);
    for id in 0..(MAX_FRAG_FLOWS as u32 + 10) {
        let [mut first, _] = v6_fragments(&stranger, id, 32);
        t.inbound(&mut first, &pool6(), 1).unwrap();
    }
    assert_eq!(t.fragment_flows(), MAX_FRAG_FLOWS_PER_SENDER);
    let [mut first, mut later] = v6_fragments(&answer(REMOTE), 7, 32);
    t.inbound(&mut first, &pool6(), 1).unwrap();
    assert_eq!(t.inbound(&mut later, &pool6(), 1), Ok(Step::Mapped));
    assert_eq!(&later[24..40], &NODE);
    assert_frag_orders(&t);
}

/// A table full of many senders' datagrams, each within its share, tracks a
/// new one in place of the oldest of all.
#[test]
fn a_full_fragment_table_gives_up_its_oldest() {
    let mut t = table_per_host(64, 64);
    let dst = pool6().embed(REMOTE);
    let whole = |n: u8| v6_packet(node(n), dst, 17, &udp(5353, 53, &[n; 64]));
    let senders = (MAX_FRAG_FLOWS / MAX_FRAG_FLOWS_PER_SENDER) as u8;
    for n in 1..=senders {
        let w = whole(n);
        for id in 0..MAX_FRAG_FLOWS_PER_SENDER as u32 {
            let [mut first, _] = v6_fragments(&w, id, 32);
            t.outbound_by_source(&mut first, &pool6(), 1).unwrap();
        }
    }
    assert_eq!(t.fragment_flows(), MAX_FRAG_FLOWS);
    let [mut first, mut later] = v6_fragments(&whole(senders + 1), 0, 32);
    t.outbound_by_source(&mut first, &pool6(), 2).unwrap();
    assert_eq!(
        t.outbound_by_source(&mut later, &pool6(), 2),
        Ok(Step::Mapped)
    );
    assert_eq!(t.fragment_flows(), MAX_FRAG_FLOWS);
    assert_frag_orders(&t);
    // The first node's first datagram made way; its second did not.
    let [_, mut gone] = v6_fragments(&whole(1), 0, 32);
    assert_eq!(t.outbound_by_source(&mut gone, &pool6(), 2), Ok(Step::Held));
    let [_, mut kept] = v6_fragments(&whole(1), 1, 32);
    assert_eq!(
        t.outbound_by_source(&mut kept, &pool6(), 2),
        Ok(Step::Mapped)
    );
}

#[test]
fn outbound_out_of_order_later_fragment_held_until_its_first() {
    let mut t = table(16);
    let dst = pool6().embed(REMOTE);
    let data: Vec<u8> = (0..200u8).collect();
    let whole = v6_packet(NODE, dst, 17, &udp(5353, 53, &data));
    let [mut first, mut later] = v6_fragments(&whole, 0x0bad_cafe, 104);
    assert_eq!(
        t.outbound_by_source(&mut later, &pool6(), 10),
        Ok(Step::Held)
    );
    assert_eq!(t.released_len(), 0);
    assert_eq!(
        t.outbound_by_source(&mut first, &pool6(), 11),
        Ok(Step::Mapped)
    );
    assert_eq!(t.held_fragments(), (0, 0));
    let r = t.take_released().expect("released with its first");
    assert!(r.outbound);
    assert_eq!(r.source, NODE, "the node it came from");
    assert_eq!(t.take_released(), None);
    assert_eq!(&r.packet[8..24], &first[8..24], "the first's new source");
    let v4 = [translate_one_6to4(&first), translate_one_6to4(&r.packet)];
    let l4 = v4_reassemble(&v4);
    assert_eq!(&l4[8..], &data[..]);
    assert!(csum::verify(
        csum::pseudo_v4(&POOL4.octets(), &REMOTE, 17, l4.len() as u32),
        &l4
    ));
    assert_eq!(t.take_expired_held(), 0);
}

#[test]
fn inbound_out_of_order_later_fragment_held_until_its_first() {
    let mut t = table(16);
    let dst = pool6().embed(REMOTE);
    let mut q = v6_packet(NODE, dst, 17, &udp(5353, 53, b"query"));
    let v4q = out_v4(&mut t, &mut q, 10).unwrap();
    let mut big = v4_reply(&v4q, None);
    let answer: Vec<u8> = (0..300u16).map(|i| (i * 7) as u8).collect();
    big.truncate(28);
    big.extend_from_slice(&answer);
    let total = big.len() as u16;
    big[2..4].copy_from_slice(&total.to_be_bytes());
    big[24..26].copy_from_slice(&((8 + answer.len()) as u16).to_be_bytes());
    let big = v4_reply(&v4_reply(&big, None), None);
    let [f1, f2] = v4_fragments(&big, 0x4343, 160);
    let mut later = translate_one_4to6(&f2);
    let mut first = translate_one_4to6(&f1);
    assert_eq!(t.inbound(&mut later, &pool6(), 11), Ok(Step::Held));
    assert_eq!(t.inbound(&mut first, &pool6(), 11), Ok(Step::Mapped));
    let r = t.take_released().expect("released with its first");
    assert!(!r.outbound);
    assert_eq!(r.source, pool6().embed(REMOTE), "from the IPv4 sender");
    assert_eq!(&r.packet[24..40], &NODE, "to the node");
    let l4 = v6_reassemble(&[first, r.packet]);
    assert_eq!(&l4[8..], &answer[..]);
    assert!(csum::verify(
        csum::pseudo_v6(&dst, &NODE, 17, l4.len() as u32),
        &l4
    ));
}

#[test]
fn held_fragments_are_bounded() {
    let mut t = table(16);
    let dst = pool6().embed(REMOTE);
    let whole = v6_packet(NODE, dst, 17, &udp(5353, 53, &[9u8; 1024]));
    // One datagram: at most MAX_HELD_PER_DATAGRAM later fragments.
    let [_, later] = v6_fragments(&whole, 1, 16);
    for _ in 0..MAX_HELD_PER_DATAGRAM {
        assert_eq!(
            t.outbound_by_source(&mut later.clone(), &pool6(), 0),
            Ok(Step::Held)
        );
    }
    assert_eq!(
        t.outbound_by_source(&mut later.clone(), &pool6(), 0),
        Err(DropReason::Fragment)
    );
    // All datagrams: at most MAX_HELD_BYTES.
    let mut id = 2u32;
    loop {
        let [_, mut l] = v6_fragments(&whole, id, 16);
        match t.outbound_by_source(&mut l, &pool6(), 0) {
            Ok(Step::Held) => id += 1,
            Err(DropReason::Fragment) => break,
            r => panic!("{r:?}"),
        }
        assert!(id < 10_000, "no byte bound");
    }
    let (n, bytes) = t.held_fragments();
    assert!(bytes <= MAX_HELD_BYTES && bytes + later.len() > MAX_HELD_BYTES);
    // Expiry frees the room and counts every held fragment once.
    t.expire(FRAG_TIMEOUT);
    assert_eq!(t.held_fragments(), (0, 0));
    assert_eq!(t.take_expired_held(), n as u64);
    let [_, mut l] = v6_fragments(&whole, 1, 16);
    assert_eq!(
        t.outbound_by_source(&mut l, &pool6(), FRAG_TIMEOUT),
        Ok(Step::Held)
    );
}

/// Splits a whole IPv6 packet (no extension headers) into fragments of
/// `size` payload bytes (a multiple of 8; the last may be shorter).
fn v6_fragments_n(whole: &[u8], id: u32, size: usize) -> Vec<Vec<u8>> {
    let len = whole.len() - 40;
    (0..len)
        .step_by(size)
        .map(|offset| {
            let n = size.min(len - offset);
            v6_piece(whole, id, offset, n, offset + n < len)
        })
        .collect()
}

#[test]
fn released_fragments_not_taken_count_against_the_bound() {
    let mut t = table(16);
    let dst = pool6().embed(REMOTE);
    let whole = v6_packet(NODE, dst, 17, &udp(5353, 53, &[3u8; 1024]));
    // Datagram after datagram, later fragment first, then its first; the
    // released fragments are never taken.
    let mut id = 0u32;
    loop {
        let [mut first, mut later] = v6_fragments(&whole, id, 16);
        match t.outbound_by_source(&mut later, &pool6(), 0) {
            Ok(Step::Held) => {}
            Err(DropReason::Fragment) => break,
            r => panic!("{r:?}"),
        }
        t.outbound_by_source(&mut first, &pool6(), 0).unwrap();
        id += 1;
        assert!(id < 10_000, "released fragments grow without bound");
    }
    assert_eq!(t.held_fragments(), (0, 0));
    assert!(t.released_len() * later_len(&whole) <= MAX_HELD_BYTES);
    // Taking them makes room again.
    while t.take_released().is_some() {}
    let [_, mut later] = v6_fragments(&whole, id, 16);
    assert_eq!(
        t.outbound_by_source(&mut later, &pool6(), 0),
        Ok(Step::Held)
    );
}

fn later_len(whole: &[u8]) -> usize {
    v6_fragments(whole, 0, 16)[1].len()
}

proptest! {
    /// Whatever order a datagram's fragments arrive in, every one of them
    /// comes out exactly once (at once, or released with its first), from
    /// pool4, and the reassembled datagram's checksum holds.
    #[test]
    fn fragments_in_any_order_all_come_out_mapped(
        len in 24usize..900,
        size8 in 1usize..40,
        order in Just((0..64usize).collect::<Vec<_>>()).prop_shuffle(),
        id in any::<u32>(),
    ) {
        let size = size8 * 8;
        let mut t = table(16);
        let dst = pool6().embed(REMOTE);
        let data: Vec<u8> = (0..len).map(|i| (i * 31) as u8).collect();
        let whole = v6_packet(NODE, dst, 17, &udp(40000, 53, &data));
        let frags = v6_fragments_n(&whole, id, size);
        prop_assume!(frags.len() >= 2 && frags.len() <= 64);
        let mut out: Vec<Vec<u8>> = Vec::new();
        for &i in order.iter().filter(|&&i| i < frags.len()) {
            let mut f = frags[i].clone();
            match t.outbound_by_source(&mut f, &pool6(), 7) {
                Ok(Step::Mapped) => out.push(f),
                Ok(Step::Held) => {}
                Err(e) => return Err(TestCaseError::fail(format!("fragment {i}: {e:?}"))),
            }
            while let Some(r) = t.take_released() {
                prop_assert!(r.outbound);
                out.push(r.packet);
            }
        }
        prop_assert_eq!(out.len(), frags.len());
        prop_assert_eq!(t.held_fragments(), (0, 0));
        let src = pool6().embed(POOL4.octets());
        for f in &out {
            prop_assert_eq!(&f[8..24], &src[..]);
        }
        out.sort_by_key(|f| u16::from_be_bytes([f[42], f[43]]) & !7);
        let l4 = v6_reassemble(&out);
        prop_assert_eq!(l4.len(), 8 + data.len());
        prop_assert_eq!(&l4[8..], &data[..]);
        prop_assert!(csum::verify(
            csum::pseudo_v6(&src, &dst, 17, l4.len() as u32),
            &l4
        ));
    }
}

/// No session for a remote the translator would refuse: loopback, link-local
/// and the like always, and (RFC 6052 §3.1) a non-global one behind the
/// Well-Known Prefix; such a remote cannot open one from the IPv4 side on a
/// UDP mapping either. A global one can, pool4 itself being non-global.
#[test]
fn no_session_for_refused_remotes() {
    let mut t = table(16);
    let wkp = Pool6::new(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96).unwrap();
    for (pool, remote) in [
        (pool6(), [127, 0, 0, 1]),
        (pool6(), [169, 254, 169, 254]),
        (wkp, [10, 0, 0, 1]),
        (wkp, REMOTE),
    ] {
        let mut p = v6_packet(NODE, pool.embed(remote), 17, &udp(5353, 53, b"q"));
        assert_eq!(
            t.outbound_by_source(&mut p, &pool, 1),
            Err(DropReason::IllegalAddress),
            "{remote:?}"
        );
    }
    assert_eq!(t.sessions(), 0);
    let mut p = v6_packet(NODE, wkp.embed([8, 8, 8, 8]), 17, &udp(5353, 53, b"q"));
    assert_eq!(t.outbound_by_source(&mut p, &wkp, 1), Ok(Step::Mapped));
    assert_eq!(t.sessions(), 1);
    let port4 = u16::from_be_bytes([p[40], p[41]]);
    let to_pool4 = wkp.embed(POOL4.octets());
    let mut stranger = v6_packet(
        wkp.embed([10, 0, 0, 1]),
        to_pool4,
        17,
        &udp(53, port4, b"a"),
    );
    assert_eq!(
        t.inbound(&mut stranger, &wkp, 2),
        Err(DropReason::IllegalAddress)
    );
    assert_eq!(t.sessions(), 1);
    let mut global = v6_packet(wkp.embed([8, 8, 4, 4]), to_pool4, 17, &udp(53, port4, b"a"));
    assert_eq!(t.inbound(&mut global, &wkp, 2), Ok(Step::Mapped));
    assert_eq!(t.sessions(), 2);
}
