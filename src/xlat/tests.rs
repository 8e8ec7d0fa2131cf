//! Unit tests and property tests (with oracles) for the translator.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::net::{Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;

use super::addr::map_6to4;
use super::{
    csum, icmp, translate, translate_4to6, translate_6to4, Config, DropReason, Eam, Outcome, Pool6,
};

const OUT: usize = super::OUT_BUF_LEN;

fn cfg_with(pool6: Pool6) -> Config {
    Config {
        pool6: Some(pool6),
        eamt: vec![Eam::new(
            Ipv4Addr::new(192, 0, 2, 0),
            24,
            "2001:db8:e::".parse().unwrap(),
            120,
        )
        .unwrap()],
        rfc6791_v4: None,
        rfc6791_v6: None,
        self_v4: Some(Ipv4Addr::new(198, 51, 100, 1)),
        self_v6: Some("2001:db8:ffff::1".parse().unwrap()),
        ..Config::default()
    }
}

/// A network-specific prefix: the documentation addresses used here are
/// not global, which the Well-Known Prefix refuses (RFC 6052 §3.1).
fn cfg() -> Config {
    cfg_with(Pool6::new("2001:db8:64::".parse().unwrap(), 96).unwrap())
}

/// Builds an IPv4 packet with a correct header checksum.
#[allow(clippy::too_many_arguments)]
fn ipv4(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    ttl: u8,
    id: u16,
    flags_frag: u16,
    tos: u8,
    payload: &[u8],
) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut p = vec![0x45, tos];
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&flags_frag.to_be_bytes());
    p.extend_from_slice(&[ttl, proto, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    let c = csum::checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// Sets a correct TCP/UDP checksum for an unfragmented IPv4 packet.
fn fix_l4_v4(p: &mut [u8]) {
    let proto = p[9];
    let src: [u8; 4] = p[12..16].try_into().unwrap();
    let dst: [u8; 4] = p[16..20].try_into().unwrap();
    let off = match proto {
        6 => 16,
        17 => 6,
        _ => return,
    };
    let l4 = &mut p[20..];
    l4[off] = 0;
    l4[off + 1] = 0;
    let mut c = csum::finish(csum::add(
        csum::pseudo_v4(&src, &dst, proto, l4.len() as u32),
        csum::sum(l4),
    ));
    if c == 0 && proto == 17 {
        c = 0xffff;
    }
    l4[off..off + 2].copy_from_slice(&c.to_be_bytes());
}

fn single(o: Outcome, out: &[u8]) -> Vec<u8> {
    match o {
        Outcome::Forward(p) => {
            assert_eq!(p.len(), 1, "{o:?}");
            p.iter(out).next().unwrap().to_vec()
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn ttl_expired_gets_time_exceeded() {
    let c = cfg();
    let p = ipv4(
        [203, 0, 113, 5],
        [198, 51, 100, 7],
        17,
        1,
        7,
        0,
        0,
        &[0, 1, 0, 2, 0, 8, 0x12, 0x34],
    );
    let mut out = vec![0; OUT];
    match translate_4to6(&c, &p, &mut out) {
        Outcome::Reply { packets, cause } => {
            assert_eq!(cause, DropReason::TtlExpired);
            let r = packets.iter(&out).next().unwrap();
            assert_eq!(r[9], 1);
            assert_eq!(&r[12..16], &[198, 51, 100, 1]);
            assert_eq!(&r[16..20], &[203, 0, 113, 5]);
            assert_eq!((r[20], r[21]), (11, 0));
            assert_eq!(&r[28..], &p[..]);
            assert!(csum::verify(0, &r[20..]));
        }
        o => panic!("{o:?}"),
    }
}

/// No ICMP error about a fragment other than the first (RFC 1812
/// §4.3.2.7): the first fragment's error is enough.
#[test]
fn a_later_fragment_gets_no_error() {
    let c = cfg();
    let p = ipv4(
        [203, 0, 113, 5],
        [198, 51, 100, 7],
        17,
        1,
        7,
        0x0010,
        0,
        &[0u8; 16],
    );
    let mut out = vec![0; OUT];
    assert_eq!(
        translate_4to6(&c, &p, &mut out),
        Outcome::Drop(DropReason::TtlExpired)
    );
}

#[test]
fn no_self_address_means_silent_drop() {
    let c = Config {
        self_v4: None,
        ..cfg()
    };
    let p = ipv4(
        [203, 0, 113, 5],
        [198, 51, 100, 7],
        17,
        1,
        7,
        0,
        0,
        &[0, 1, 0, 2, 0, 8, 0x12, 0x34],
    );
    let mut out = vec![0; OUT];
    assert_eq!(
        translate_4to6(&c, &p, &mut out),
        Outcome::Drop(DropReason::TtlExpired)
    );
}

#[test]
fn unexpired_lsrr_is_rejected() {
    let c = cfg();
    // IHL 7: LSRR with pointer 4 (unexpired) + EOL padding.
    let mut p = ipv4([203, 0, 113, 5], [198, 51, 100, 7], 17, 64, 7, 0, 0, &[]);
    p[0] = 0x47;
    let opts = [131, 7, 4, 10, 0, 0, 1, 0];
    p.splice(20..20, opts);
    p.extend_from_slice(&[0, 1, 0, 2, 0, 8, 0x12, 0x34]);
    let total = p.len() as u16;
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[10] = 0;
    p[11] = 0;
    let c2 = csum::checksum(&p[..28]);
    p[10..12].copy_from_slice(&c2.to_be_bytes());
    let mut out = vec![0; OUT];
    match translate_4to6(&c, &p, &mut out) {
        Outcome::Reply { cause, .. } => assert_eq!(cause, DropReason::SourceRoute),
        o => panic!("{o:?}"),
    }
}

#[test]
fn bad_ipv4_header_checksum() {
    let c = cfg();
    let mut p = ipv4(
        [203, 0, 113, 5],
        [198, 51, 100, 7],
        17,
        64,
        7,
        0,
        0,
        &[0, 1, 0, 2, 0, 8, 0x12, 0x34],
    );
    p[10] ^= 1;
    let mut out = vec![0; OUT];
    assert_eq!(
        translate_4to6(&c, &p, &mut out),
        Outcome::Drop(DropReason::BadChecksum)
    );
}

#[test]
fn ipv6_only_protocols_are_not_passed() {
    let c = cfg();
    for proto in [0u8, 43, 44, 58, 60] {
        let p = ipv4(
            [203, 0, 113, 5],
            [198, 51, 100, 7],
            proto,
            64,
            7,
            0,
            0,
            &[0; 8],
        );
        let mut out = vec![0; OUT];
        assert_eq!(
            translate_4to6(&c, &p, &mut out),
            Outcome::Drop(DropReason::UnsupportedProtocol)
        );
    }
}

#[test]
fn big_nodf_packet_is_fragmented_at_lowest_mtu() {
    let c = cfg();
    let mut p = ipv4(
        [203, 0, 113, 5],
        [198, 51, 100, 7],
        17,
        64,
        0x1234,
        0,
        0,
        &vec![7u8; 65_000],
    );
    fix_l4_v4(&mut p);
    let mut out = vec![0; OUT];
    match translate_4to6(&c, &p, &mut out) {
        Outcome::Forward(pk) => {
            assert_eq!(pk.len(), 65_000usize.div_ceil(1232));
            let mut expect_off = 0usize;
            for (i, f) in pk.iter(&out).enumerate() {
                assert!(f.len() <= 1280);
                assert_eq!(f[6], 44);
                let fo = u16::from_be_bytes([f[42], f[43]]);
                assert_eq!(usize::from(fo >> 3) * 8, expect_off);
                assert_eq!(fo & 1 == 1, i + 1 < pk.len());
                assert_eq!(&f[44..48], &[0, 0, 0x12, 0x34]);
                expect_off += f.len() - 48;
            }
            assert_eq!(expect_off, 65_000);
        }
        o => panic!("{o:?}"),
    }
}

#[test]
fn df_packet_too_big_gets_frag_needed() {
    let c = Config {
        ipv6_mtu: 1280,
        ..cfg()
    };
    let mut p = ipv4(
        [203, 0, 113, 5],
        [198, 51, 100, 7],
        17,
        64,
        1,
        0x4000,
        0,
        &vec![7u8; 1241],
    );
    fix_l4_v4(&mut p);
    let mut out = vec![0; OUT];
    match translate_4to6(&c, &p, &mut out) {
        Outcome::Reply { packets, cause } => {
            assert_eq!(cause, DropReason::PacketTooBig);
            let r = packets.iter(&out).next().unwrap();
            assert_eq!(r.len(), 576);
            assert_eq!((r[20], r[21]), (3, 4));
            assert_eq!(u16::from_be_bytes([r[26], r[27]]), 1260);
        }
        o => panic!("{o:?}"),
    }
}

#[test]
fn small_output_buffer_is_an_error_not_a_panic() {
    let c = cfg();
    let mut p = ipv4(
        [203, 0, 113, 5],
        [198, 51, 100, 7],
        17,
        64,
        1,
        0,
        0,
        &[1u8; 200],
    );
    fix_l4_v4(&mut p);
    for n in [0usize, 10, 40, 100, 239] {
        let mut out = vec![0; n];
        assert_eq!(
            translate_4to6(&c, &p, &mut out),
            Outcome::Drop(DropReason::OutputTooSmall)
        );
    }
}

#[test]
fn pointer_tables() {
    assert_eq!(icmp::pointer_4to6(9), Some(6));
    assert_eq!(icmp::pointer_4to6(13), Some(8));
    assert_eq!(icmp::pointer_4to6(5), None);
    assert_eq!(icmp::pointer_6to4(7), Some(8));
    assert_eq!(icmp::pointer_6to4(30), Some(16));
    assert_eq!(icmp::pointer_6to4(40), None);
    assert_eq!(icmp::plateau(1500), 1492);
    assert_eq!(icmp::plateau(60), 68);
}

#[test]
fn drop_reason_labels_are_unique() {
    use DropReason::*;
    let all = [
        Truncated,
        BadHeader,
        BadChecksum,
        Untranslatable,
        IllegalAddress,
        UnsupportedProtocol,
        UnsupportedIcmp,
        NestedIcmpError,
        TtlExpired,
        FragmentedIcmp,
        ExtensionAfterFragment,
        Fragment,
        SourceRoute,
        UdpZeroChecksum,
        PacketTooBig,
        OutputTooSmall,
    ];
    let set: std::collections::HashSet<&str> = all.iter().map(|r| r.as_str()).collect();
    assert_eq!(set.len(), all.len());
}

fn pool6_strategy() -> impl Strategy<Value = Pool6> {
    (
        prop::sample::select(vec![32u8, 40, 48, 56, 64, 96]),
        any::<u128>(),
    )
        .prop_map(|(len, bits)| {
            let mask = u128::MAX << (128 - u32::from(len));
            // Bits 64..71 (the u octet) must be zero in a /96.
            let u = if len == 96 {
                !(0xffu128 << 56)
            } else {
                u128::MAX
            };
            Pool6::new(Ipv6Addr::from(bits & mask & u), len).unwrap()
        })
}

/// Unicast IPv4 addresses that are translatable in normal packets both
/// ways (not link-local: no IPv6 packet goes there), not in the test EAM
/// prefix.
fn v4_strategy() -> impl Strategy<Value = [u8; 4]> {
    (1u8..=222, any::<[u8; 3]>())
        .prop_filter("legal", |(a, rest)| {
            *a != 127
                && !(*a == 169 && rest[0] == 254)
                && !(*a == 192 && rest[0] == 0 && rest[1] == 2)
        })
        .prop_map(|(a, [b, c, d])| [a, b, c, d])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// RFC 6052: embed then extract gives the address back, for every length.
    #[test]
    fn rfc6052_roundtrip(pool in pool6_strategy(), a in any::<[u8; 4]>()) {
        let v6 = pool.embed(a);
        prop_assert_eq!(pool.extract(&v6), Some(a));
        if pool.prefix_len() < 96 {
            prop_assert_eq!(v6[8], 0, "u octet must be zero");
        }
        prop_assert_eq!(map_6to4(&[], Some(&pool), &v6), Some(a));
    }

    /// Incremental update equals a full recomputation.
    #[test]
    fn incremental_checksum(data in prop::collection::vec(any::<u8>(), 2..200), at in 0usize..100, new in any::<[u8; 2]>()) {
        let mut data = data;
        let at = (at % (data.len() / 2)) * 2;
        let c = csum::checksum(&data);
        let old = csum::sum(&data[at..at + 2]);
        data[at..at + 2].copy_from_slice(&new);
        let inc = csum::update(c, old, csum::sum(&new));
        let full = csum::checksum(&data);
        // 0x0000 and 0xffff are both "zero" in ones'-complement.
        prop_assert!(inc == full || (inc | full) == 0xffff && (inc & full) == 0, "{inc:04x} vs {full:04x}");
    }

    /// v4 -> v6 -> v4 gives back the input (TTL - 2; ID/DF/header checksum
    /// excepted for unfragmented packets, whose ID the 6->4 side regenerates).
    #[test]
    fn roundtrip_4_6_4(
        pool in pool6_strategy(),
        src in v4_strategy(),
        src_in_eam in any::<bool>(),
        eam_host in any::<u8>(),
        dst in v4_strategy(),
        kind in 0u8..4,
        ttl in 3u8..=255,
        tos in any::<u8>(),
        id in any::<u16>(),
        frag in 0u8..3,
        body in prop::collection::vec(any::<u8>(), 8..1200),
    ) {
        let c = cfg_with(pool);
        let src = if src_in_eam { [192, 0, 2, eam_host] } else { src };
        let mut body = body;
        let proto = match kind {
            0 => 17,
            1 => 6,
            2 => { body[0] = 8; body[1] = 0; 1 }
            _ => 33,
        };
        if proto == 17 && body[6] == 0 && body[7] == 0 { body[7] = 1; }
        if proto == 6 && body.len() < 20 { body.resize(20, 0); }
        // frag: 0 = unfragmented, 1 = first fragment, 2 = later fragment.
        let ff: u16 = match frag { 0 => 0, 1 => 0x2000, _ => 0x2000 | 100 };
        if proto == 1 && frag != 0 { return Ok(()); }
        let p = ipv4(src, dst, proto, ttl, id, ff, tos, &body);
        let mut out6 = vec![0; OUT];
        let v6 = single(translate_4to6(&c, &p, &mut out6), &out6);
        prop_assert_eq!(v6.len(), p.len() + 20 + if frag != 0 { 8 } else { 0 });
        let mut out4 = vec![0; OUT];
        let back = single(translate_6to4(&c, &v6, &mut out4), &out4);
        prop_assert_eq!(back.len(), p.len());
        prop_assert_eq!(&back[..4], &p[..4]);
        if frag != 0 {
            prop_assert_eq!(&back[4..8], &p[4..8]);
        }
        prop_assert_eq!(back[8], ttl - 2);
        prop_assert_eq!(&back[9..10], &p[9..10]);
        prop_assert_eq!(&back[12..], &p[12..]);
        prop_assert!(csum::verify(0, &back[..20]));
    }

    /// A valid TCP/UDP/ICMP checksum stays valid in both directions.
    #[test]
    fn checksums_stay_valid(
        pool in pool6_strategy(),
        src in v4_strategy(),
        dst in v4_strategy(),
        kind in 0u8..3,
        body in prop::collection::vec(any::<u8>(), 20..600),
    ) {
        let c = cfg_with(pool);
        let mut body = body;
        let proto = match kind { 0 => 17, 1 => 6, _ => { body[0] = 8; body[1] = 0; 1 } };
        if proto == 17 {
            let l = body.len() as u16;
            body[4..6].copy_from_slice(&l.to_be_bytes());
        }
        let mut p = ipv4(src, dst, proto, 64, 1, 0, 0, &body);
        if proto == 1 {
            p[22] = 0; p[23] = 0;
            let cs = csum::checksum(&p[20..]);
            p[22..24].copy_from_slice(&cs.to_be_bytes());
        } else {
            fix_l4_v4(&mut p);
        }
        let mut out6 = vec![0; OUT];
        let v6 = single(translate_4to6(&c, &p, &mut out6), &out6);
        let s6: [u8; 16] = v6[8..24].try_into().unwrap();
        let d6: [u8; 16] = v6[24..40].try_into().unwrap();
        let nh = v6[6];
        let l = (v6.len() - 40) as u32;
        prop_assert!(csum::verify(csum::pseudo_v6(&s6, &d6, nh, l), &v6[40..]));
        let mut out4 = vec![0; OUT];
        let back = single(translate_6to4(&c, &v6, &mut out4), &out4);
        if proto == 1 {
            prop_assert!(csum::verify(0, &back[20..]));
        } else {
            let s4: [u8; 4] = back[12..16].try_into().unwrap();
            let d4: [u8; 4] = back[16..20].try_into().unwrap();
            prop_assert!(csum::verify(csum::pseudo_v4(&s4, &d4, proto, (back.len() - 20) as u32), &back[20..]));
        }
    }

    /// Random bytes never panic, in either direction, with or without a
    /// plausible IP header in front.
    #[test]
    fn random_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..1600), v in 0u8..3, out_len in 0usize..3000) {
        let c = Config { eamt: cfg().eamt, rfc6791_v4: Some((Ipv4Addr::new(203, 0, 113, 0), 24)), ..cfg() };
        let mut data = data;
        if let Some(b) = data.first_mut() {
            match v { 0 => *b = 0x45, 1 => *b = 0x60, _ => {} }
        }
        if v == 1 && data.len() >= 40 {
            let pl = (data.len() - 40) as u16;
            data[4..6].copy_from_slice(&pl.to_be_bytes());
        }
        let mut out = vec![0; OUT];
        let _ = translate_4to6(&c, &data, &mut out);
        let _ = translate_6to4(&c, &data, &mut out);
        let _ = translate(&c, &data, &mut out);
        let mut small = vec![0; out_len];
        let _ = translate(&c, &data, &mut small);
    }

    /// Mutating valid ICMP errors (the deepest code path) never panics.
    #[test]
    fn mutated_errors_never_panic(
        inner_body in prop::collection::vec(any::<u8>(), 8..700),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        ext_len in 0u8..200,
        ty in prop::sample::select(vec![3u8, 11, 12]),
        code in 0u8..16,
    ) {
        let c = cfg();
        let inner = ipv4([198, 51, 100, 7], [203, 0, 113, 5], 17, 63, 9, 0, 0, &inner_body);
        let mut icmp4 = vec![ty, code, 0, 0, 0, ext_len, 0, 0];
        icmp4.extend_from_slice(&inner);
        icmp4.extend_from_slice(&[0u8; 40]);
        let cs = csum::checksum(&icmp4);
        icmp4[2..4].copy_from_slice(&cs.to_be_bytes());
        let mut p = ipv4([203, 0, 113, 9], [198, 51, 100, 7], 1, 64, 3, 0, 0, &icmp4);
        let mut out = vec![0; OUT];
        let r = translate_4to6(&c, &p, &mut out);
        if let Outcome::Forward(pk) = r {
            let v6 = pk.iter(&out).next().unwrap().to_vec();
            let mut out4 = vec![0; OUT];
            let _ = translate_6to4(&c, &v6, &mut out4);
            let mut v6m = v6.clone();
            for (i, b) in &flips {
                let n = v6m.len();
                v6m[i % n] ^= b;
            }
            let _ = translate_6to4(&c, &v6m, &mut out4);
        }
        for (i, b) in &flips {
            let n = p.len();
            p[i % n] ^= b;
        }
        let _ = translate_4to6(&c, &p, &mut out);
    }
}

/// Builds an IPv6 packet.
fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, nh: u8, hop: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[nh, hop]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

#[test]
fn routing_header_with_segments_left_is_rejected() {
    let c = cfg();
    // Routing header (type 0 style), Segments Left = 1, then 8 bytes of UDP.
    let mut payload = vec![17, 0, 0, 1, 0, 0, 0, 0];
    payload.extend_from_slice(&[0, 1, 0, 2, 0, 8, 0x12, 0x34]);
    let p = ipv6(
        "2001:db8:e::5".parse().unwrap(),
        "2001:db8:64::cb00:7105".parse().unwrap(),
        43,
        64,
        &payload,
    );
    let mut out = vec![0; OUT];
    match translate_6to4(&c, &p, &mut out) {
        Outcome::Reply { packets, cause } => {
            assert_eq!(cause, DropReason::SourceRoute);
            let r = packets.iter(&out).next().unwrap();
            assert_eq!((r[40], r[41]), (4, 0));
            assert_eq!(u32::from_be_bytes([r[44], r[45], r[46], r[47]]), 43);
        }
        o => panic!("{o:?}"),
    }
}

#[test]
fn six_to_four_refuses_what_four_to_six_refuses() {
    let c = cfg();
    // UDP, 8 bytes, to pool6-embedded IPv4 destinations no node may reach
    // through the translator: broadcast, multicast (mDNS), loopback, 0/8,
    // link-local (a cloud's metadata service).
    for dst in [
        "2001:db8:64::ffff:ffff",
        "2001:db8:64::e000:fb",
        "2001:db8:64::7f00:1",
        "2001:db8:64::1:2",
        "2001:db8:64::a9fe:a9fe",
    ] {
        let p = ipv6(
            "2001:db8:e::5".parse().unwrap(),
            dst.parse().unwrap(),
            17,
            64,
            &[0, 1, 0, 2, 0, 8, 0, 0],
        );
        let mut out = vec![0; OUT];
        assert_eq!(
            translate_6to4(&c, &p, &mut out),
            Outcome::Drop(DropReason::IllegalAddress),
            "{dst}"
        );
    }
    // Nor from a multicast source (an EAM into 224/4 would be one).
    let mut c2 = cfg();
    c2.eamt.push(
        Eam::new(
            Ipv4Addr::new(224, 0, 0, 0),
            24,
            "2001:db8:f::".parse().unwrap(),
            120,
        )
        .unwrap(),
    );
    let p = ipv6(
        "2001:db8:f::5".parse().unwrap(),
        "2001:db8:64::cb00:7105".parse().unwrap(),
        17,
        64,
        &[0, 1, 0, 2, 0, 8, 0, 0],
    );
    let mut out = vec![0; OUT];
    assert_eq!(
        translate_6to4(&c2, &p, &mut out),
        Outcome::Drop(DropReason::IllegalAddress)
    );
    // An ordinary destination still goes.
    let p = ipv6(
        "2001:db8:e::5".parse().unwrap(),
        "2001:db8:64::cb00:7105".parse().unwrap(),
        17,
        64,
        &[0, 1, 0, 2, 0, 8, 0, 0],
    );
    let mut out = vec![0; OUT];
    assert_eq!(single(translate_6to4(&c, &p, &mut out), &out).len(), 28);
}

/// On an IPv4 link narrower than 1260 bytes, a packet that goes out with
/// DF clear is sent on (to be fragmented) instead of asking the sender for
/// less than IPv6's minimum MTU, which would never end; a larger one still
/// gets a Packet Too Big of 1280.
#[test]
fn a_narrow_ipv4_link_takes_small_packets_with_df_clear() {
    let c = Config {
        ipv4_mtu: 1000,
        ..cfg()
    };
    let p = ipv6(
        "2001:db8:e::5".parse().unwrap(),
        "2001:db8:64::cb00:7105".parse().unwrap(),
        17,
        64,
        &udp_payload(1232),
    );
    let mut out = vec![0; OUT];
    let v4 = single(translate_6to4(&c, &p, &mut out), &out);
    assert_eq!(v4.len(), 20 + 1232);
    assert_eq!(v4[6] & 0x40, 0, "DF clear");
    let p = ipv6(
        "2001:db8:e::5".parse().unwrap(),
        "2001:db8:64::cb00:7105".parse().unwrap(),
        17,
        64,
        &udp_payload(1300),
    );
    let mut out = vec![0; OUT];
    match translate_6to4(&c, &p, &mut out) {
        Outcome::Reply { packets, cause } => {
            assert_eq!(cause, DropReason::PacketTooBig);
            let r = packets.iter(&out).next().unwrap();
            assert_eq!((r[40], r[41]), (2, 0));
            assert_eq!(u32::from_be_bytes([r[44], r[45], r[46], r[47]]), 1280);
        }
        o => panic!("{o:?}"),
    }
}

/// A UDP header and `len - 8` zero bytes (checksum left 0: not checked
/// on the way to IPv4).
fn udp_payload(len: usize) -> Vec<u8> {
    let mut u = vec![0u8; len];
    u[0..2].copy_from_slice(&1000u16.to_be_bytes());
    u[2..4].copy_from_slice(&53u16.to_be_bytes());
    u[4..6].copy_from_slice(&(len as u16).to_be_bytes());
    u
}

#[test]
fn df_follows_the_1260_rule() {
    let c = cfg();
    for (len, df) in [(1240usize, false), (1241, true)] {
        let p = ipv6(
            "2001:db8:e::5".parse().unwrap(),
            "2001:db8:64::cb00:7105".parse().unwrap(),
            33,
            64,
            &vec![0u8; len],
        );
        let mut out = vec![0; OUT];
        let v4 = single(translate_6to4(&c, &p, &mut out), &out);
        assert_eq!(v4.len(), 20 + len);
        assert_eq!(v4[6] & 0x40 != 0, df, "len {len}");
        if !df {
            assert_ne!(
                u16::from_be_bytes([v4[4], v4[5]]),
                0,
                "DF=0 needs a usable ID"
            );
        }
    }
}

#[test]
fn hairpinning_translates_twice() {
    let c = cfg();
    // EAM host 192.0.2.5 talks to 192.0.2.9 through pool6.
    let mut udp = vec![0, 1, 0, 2, 0, 12, 0, 0, 1, 2, 3, 4];
    let s: Ipv6Addr = "2001:db8:e::5".parse().unwrap();
    let d: Ipv6Addr = "2001:db8:64::c000:209".parse().unwrap();
    let cs = csum::finish(csum::add(
        csum::pseudo_v6(&s.octets(), &d.octets(), 17, 12),
        csum::sum(&udp),
    ));
    udp[6..8].copy_from_slice(&cs.to_be_bytes());
    let p = ipv6(s, d, 17, 64, &udp);
    let mut out = vec![0; OUT];
    match translate_6to4(&c, &p, &mut out) {
        Outcome::Hairpin(pk) => {
            let r = pk.iter(&out).next().unwrap();
            let rs: Ipv6Addr = <[u8; 16]>::try_from(&r[8..24]).unwrap().into();
            let rd: Ipv6Addr = <[u8; 16]>::try_from(&r[24..40]).unwrap().into();
            assert_eq!(rs, "2001:db8:64::c000:205".parse::<Ipv6Addr>().unwrap());
            assert_eq!(rd, "2001:db8:e::9".parse::<Ipv6Addr>().unwrap());
            assert_eq!(r[7], 63);
            assert!(csum::verify(
                csum::pseudo_v6(&rs.octets(), &rd.octets(), 17, 12),
                &r[40..]
            ));
        }
        o => panic!("{o:?}"),
    }
}

/// A TCP header with `flags` and the options `opts` (padded to 4 bytes).
fn tcp_with_options(flags: u8, opts: &[u8]) -> Vec<u8> {
    let mut o = opts.to_vec();
    while !o.len().is_multiple_of(4) {
        o.push(1); // NOP
    }
    let doff = (20 + o.len()) / 4;
    let mut t = vec![0x9c, 0x40, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0];
    t.push((doff as u8) << 4);
    t.push(flags);
    t.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(&o);
    t
}

const SYN: u8 = 0x02;
/// MSS 1460, SACK permitted, window scale 7 (as Linux sends them, no timestamps).
const SYN_OPTS: [u8; 12] = [2, 4, 0x05, 0xb4, 1, 1, 4, 2, 1, 3, 3, 7];

fn mss_of(tcp: &[u8]) -> Option<u16> {
    super::v4_to_v6::tcp_syn_mss(tcp).map(|(_, v)| v)
}

/// Whether the TCP checksum of an IPv6 packet verifies.
fn tcp6_ok(p: &[u8]) -> bool {
    let src: [u8; 16] = p[8..24].try_into().unwrap();
    let dst: [u8; 16] = p[24..40].try_into().unwrap();
    csum::verify(
        csum::pseudo_v6(&src, &dst, 6, (p.len() - 40) as u32),
        &p[40..],
    )
}

fn tcp4_ok(p: &[u8]) -> bool {
    let src: [u8; 4] = p[12..16].try_into().unwrap();
    let dst: [u8; 4] = p[16..20].try_into().unwrap();
    csum::verify(
        csum::pseudo_v4(&src, &dst, 6, (p.len() - 20) as u32),
        &p[20..],
    )
}

#[test]
fn syn_mss_is_clamped_to_the_ipv6_mtu() {
    let c = Config {
        ipv6_mtu: 1420,
        ..cfg()
    };
    let mut p = ipv4(
        [203, 0, 113, 5],
        [192, 0, 2, 9],
        6,
        64,
        1,
        0x4000,
        0,
        &tcp_with_options(SYN, &SYN_OPTS),
    );
    fix_l4_v4(&mut p);
    let mut out = vec![0u8; OUT];
    let q = single(translate_4to6(&c, &p, &mut out), &out);
    assert_eq!(mss_of(&q[40..]), Some(1360), "1420 - 40 - 20");
    assert!(tcp6_ok(&q), "checksum follows the MSS change");
    // The other options are untouched.
    assert_eq!(&q[40 + 24..40 + 32], &SYN_OPTS[4..]);
    // Off: untouched.
    let off = Config {
        mss_clamp: false,
        ..c.clone()
    };
    let q = single(translate_4to6(&off, &p, &mut out), &out);
    assert_eq!(mss_of(&q[40..]), Some(1460));
    assert!(tcp6_ok(&q));
    // Already small enough, or not a SYN: untouched.
    let small = [2, 4, 0x04, 0x00];
    let mut p2 = ipv4(
        [203, 0, 113, 5],
        [192, 0, 2, 9],
        6,
        64,
        1,
        0x4000,
        0,
        &tcp_with_options(SYN, &small),
    );
    fix_l4_v4(&mut p2);
    let q = single(translate_4to6(&c, &p2, &mut out), &out);
    assert_eq!(mss_of(&q[40..]), Some(1024));
    let mut ack = ipv4(
        [203, 0, 113, 5],
        [192, 0, 2, 9],
        6,
        64,
        1,
        0x4000,
        0,
        &tcp_with_options(0x10, &SYN_OPTS),
    );
    fix_l4_v4(&mut ack);
    let q = single(translate_4to6(&c, &ack, &mut out), &out);
    assert_eq!(
        &q[40 + 20..40 + 24],
        &SYN_OPTS[..4],
        "MSS bytes of a non-SYN stay"
    );
    // A wrong checksum stays wrong.
    let mut bad = p.clone();
    bad[20 + 16] ^= 0x55;
    let q = single(translate_4to6(&c, &bad, &mut out), &out);
    assert_eq!(mss_of(&q[40..]), Some(1360));
    assert!(!tcp6_ok(&q));
}

#[test]
fn syn_mss_is_clamped_to_the_ipv4_mtu() {
    let c = Config {
        ipv4_mtu: 1400,
        ..cfg()
    };
    let src: Ipv6Addr = "2001:db8:e::9".parse().unwrap();
    let dst: Ipv6Addr = "2001:db8:64::cb00:7105".parse().unwrap();
    let mut opts = SYN_OPTS;
    opts[2..4].copy_from_slice(&1440u16.to_be_bytes());
    let mut tcp = tcp_with_options(SYN | 0x10, &opts);
    let acc = csum::add(
        csum::pseudo_v6(&src.octets(), &dst.octets(), 6, tcp.len() as u32),
        csum::sum(&tcp),
    );
    tcp[16..18].copy_from_slice(&csum::finish(acc).to_be_bytes());
    let p = ipv6(src, dst, 6, 64, &tcp);
    let mut out = vec![0u8; OUT];
    let q = single(translate_6to4(&c, &p, &mut out), &out);
    assert_eq!(mss_of(&q[20..]), Some(1360), "1400 - 20 - 20");
    assert!(tcp4_ok(&q));
}

/// An MSS option after one NOP has its value at an odd offset: the checksum
/// edit takes the value's bytes as they fall in the 16-bit words.
#[test]
fn syn_mss_at_an_odd_offset_keeps_the_checksum_right() {
    let c = Config {
        ipv6_mtu: 1420,
        ..cfg()
    };
    let opts = [1, 2, 4, 0x05, 0xb4, 1, 1, 1];
    let mut p = ipv4(
        [203, 0, 113, 5],
        [192, 0, 2, 9],
        6,
        64,
        1,
        0x4000,
        0,
        &tcp_with_options(SYN, &opts),
    );
    fix_l4_v4(&mut p);
    assert_eq!(
        super::v4_to_v6::tcp_syn_mss(&p[20..]),
        Some((23, 1460)),
        "the value at an odd offset"
    );
    let mut out = vec![0u8; OUT];
    let q = single(translate_4to6(&c, &p, &mut out), &out);
    assert_eq!(mss_of(&q[40..]), Some(1360));
    assert!(tcp6_ok(&q), "checksum follows the MSS change");
}

#[test]
fn syn_mss_option_walk() {
    // MSS after NOPs and another option; none at all; malformed lengths.
    let t = tcp_with_options(SYN, &[1, 1, 4, 2, 2, 4, 0x05, 0x78]);
    assert_eq!(super::v4_to_v6::tcp_syn_mss(&t), Some((26, 1400)));
    assert_eq!(mss_of(&tcp_with_options(SYN, &[4, 2])), None);
    assert_eq!(
        mss_of(&tcp_with_options(SYN, &[3, 0, 2, 4, 5, 0])),
        None,
        "length 0"
    );
    assert_eq!(
        mss_of(&tcp_with_options(SYN, &[0, 0, 2, 4, 5, 0])),
        None,
        "end of options first"
    );
    assert_eq!(
        mss_of(&tcp_with_options(SYN, &[1, 1, 2, 4])),
        None,
        "cut short by the data offset"
    );
    let mut t = tcp_with_options(SYN, &SYN_OPTS);
    t[12] = 0xf0; // data offset 60 > header
    assert_eq!(mss_of(&t), None);
    t[12] = 0x30; // data offset 12 < 20
    assert_eq!(mss_of(&t), None);
}

proptest! {
    /// Any bytes: the option walk never panics, and a value it finds lies
    /// inside the header the data offset gives.
    #[test]
    fn syn_mss_never_panics(t in prop::collection::vec(any::<u8>(), 0..80)) {
        if let Some((off, _)) = super::v4_to_v6::tcp_syn_mss(&t) {
            let doff = usize::from(t[12] >> 4) * 4;
            prop_assert!(off + 2 <= doff && off >= 22);
        }
    }
}

/// An IPv4 UDP datagram from `src` to `dst`, checksum right.
fn udp4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut p = ipv4(
        src,
        dst,
        17,
        64,
        1,
        0,
        0,
        &[0, 1, 0, 2, 0, 12, 0, 0, 1, 2, 3, 4],
    );
    fix_l4_v4(&mut p);
    p
}

/// RFC 6052 §3.1: behind the Well-Known Prefix only global IPv4 addresses,
/// both ways; an ICMP error's source excepted (any router may send one).
/// Not for a network-specific prefix, nor with the check turned off.
#[test]
fn well_known_prefix_carries_global_addresses_only() {
    let wkp = Pool6::new("64:ff9b::".parse().unwrap(), 96).unwrap();
    let c = cfg_with(wkp);
    let node: Ipv6Addr = "2001:db8:e::5".parse().unwrap(); // EAM: 192.0.2.5
    let wkp6 = |a: [u8; 4]| Ipv6Addr::from(wkp.embed(a));
    let udp6 = [0, 1, 0, 2, 0, 8, 0, 0];
    let mut out = vec![0; OUT];
    for a in [
        [10, 0, 0, 1],
        [100, 64, 0, 1],
        [172, 16, 0, 1],
        [192, 168, 1, 1],
        [192, 0, 0, 170],
        [198, 18, 0, 1],
        [198, 51, 100, 7],
        [203, 0, 113, 5],
    ] {
        // To it, and from it.
        let p = ipv6(node, wkp6(a), 17, 64, &udp6);
        assert_eq!(
            translate_6to4(&c, &p, &mut out),
            Outcome::Drop(DropReason::IllegalAddress),
            "to {a:?}"
        );
        let p = ipv6(wkp6(a), node, 17, 64, &udp6);
        assert_eq!(
            translate_6to4(&c, &p, &mut out),
            Outcome::Drop(DropReason::IllegalAddress),
            "from {a:?}"
        );
        assert_eq!(
            translate_4to6(&c, &udp4(a, [192, 0, 2, 5]), &mut out),
            Outcome::Drop(DropReason::IllegalAddress),
            "IPv4 from {a:?}"
        );
        assert_eq!(
            translate_4to6(&c, &udp4([192, 0, 2, 5], a), &mut out),
            Outcome::Drop(DropReason::IllegalAddress),
            "IPv4 to {a:?}"
        );
        // A network-specific prefix carries them; so does the Well-Known
        // Prefix with the check off.
        for lax in [cfg(), cfg_with(wkp.with_wkp_strict(false))] {
            let pool = lax.pool6.unwrap();
            let p = ipv6(node, pool.embed(a).into(), 17, 64, &udp6);
            let v4 = single(translate_6to4(&lax, &p, &mut out), &out);
            assert_eq!(&v4[16..20], &a);
        }
    }
    // Global ones go.
    let p = ipv6(node, wkp6([8, 8, 8, 8]), 17, 64, &udp6);
    let v4 = single(translate_6to4(&c, &p, &mut out), &out);
    assert_eq!(&v4[16..20], &[8, 8, 8, 8]);
    let v6 = single(
        translate_4to6(&c, &udp4([8, 8, 8, 8], [192, 0, 2, 5]), &mut out),
        &out,
    );
    assert_eq!(&v6[8..24], &wkp6([8, 8, 8, 8]).octets());
    // A Time Exceeded from a router numbered 10.0.0.1 still reaches the node.
    let inner = udp4([192, 0, 2, 5], [8, 8, 8, 8]);
    let mut icmp4 = vec![11, 0, 0, 0, 0, 0, 0, 0];
    icmp4.extend_from_slice(&inner[..28]);
    let cs = csum::checksum(&icmp4);
    icmp4[2..4].copy_from_slice(&cs.to_be_bytes());
    let err = ipv4([10, 0, 0, 1], [192, 0, 2, 5], 1, 64, 2, 0, 0, &icmp4);
    let v6 = single(translate_4to6(&c, &err, &mut out), &out);
    assert_eq!(&v6[8..24], &wkp6([10, 0, 0, 1]).octets());
    assert_eq!(&v6[24..40], &node.octets());
}

/// An ICMPv6 error (type 1 code 4) from `src` to `dst` about `inner`.
fn icmp6_error(src: Ipv6Addr, dst: Ipv6Addr, inner: &[u8]) -> Vec<u8> {
    let mut m = vec![1, 4, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(inner);
    let cs = csum::finish(csum::add(
        csum::pseudo_v6(&src.octets(), &dst.octets(), 58, m.len() as u32),
        csum::sum(&m),
    ));
    m[2..4].copy_from_slice(&cs.to_be_bytes());
    ipv6(src, dst, 58, 64, &m)
}

/// RFC 7757 Appendix B: only a destination mapped through pool6 onto an
/// EAM address hairpins. One inside an EAM IPv6 range is an IPv6 node: the
/// packet goes out as IPv4 (hairpinning it would send it back to the same
/// address, the source rewritten, round and round). For an ICMPv6 error
/// the source of the packet it carries decides.
#[test]
fn only_a_destination_through_pool6_hairpins() {
    let c = cfg();
    let mut out = vec![0; OUT];
    let pool6_client: Ipv6Addr = "2001:db8:64::c633:6402".parse().unwrap();
    let eam_node: Ipv6Addr = "2001:db8:e::9".parse().unwrap();
    let p = ipv6(pool6_client, eam_node, 17, 64, &[0, 1, 0, 2, 0, 8, 0, 0]);
    let v4 = single(translate_6to4(&c, &p, &mut out), &out);
    assert_eq!(&v4[12..16], &[198, 51, 100, 2]);
    assert_eq!(&v4[16..20], &[192, 0, 2, 9]);

    // EAM node 192.0.2.9 answers a hairpinned packet from EAM node
    // 192.0.2.5 (seen as pool6 + 192.0.2.5) with an error: hairpinned.
    let peer_via_pool6: Ipv6Addr = "2001:db8:64::c000:205".parse().unwrap();
    let inner = ipv6(peer_via_pool6, eam_node, 17, 63, &[0, 1, 0, 2, 0, 8, 0, 0]);
    let err = icmp6_error(eam_node, peer_via_pool6, &inner);
    match translate_6to4(&c, &err, &mut out) {
        Outcome::Hairpin(pk) => {
            let r = pk.iter(&out).next().unwrap();
            assert_eq!(
                &r[24..40],
                &"2001:db8:e::5".parse::<Ipv6Addr>().unwrap().octets()
            );
        }
        o => panic!("{o:?}"),
    }
    // The same error about a packet from a pool6 client that is no EAM
    // address goes out as IPv4.
    let inner = ipv6(pool6_client, eam_node, 17, 63, &[0, 1, 0, 2, 0, 8, 0, 0]);
    let err = icmp6_error(eam_node, peer_via_pool6, &inner);
    assert!(matches!(
        translate_6to4(&c, &err, &mut out),
        Outcome::Forward(_)
    ));
}

/// RFC 7915 §5.1: no extension header may follow the Fragment header, AH,
/// Mobility, HIP and Shim6 included; answered like the others.
#[test]
fn ah_and_others_after_the_fragment_header_are_refused() {
    let c = cfg();
    let mut out = vec![0; OUT];
    for nh in [51u8, 135, 139, 140] {
        // Fragment header (offset 0, no more), then 16 bytes of that header.
        let mut payload = vec![nh, 0, 0, 0, 0, 0, 0, 9];
        payload.extend_from_slice(&[17, 2, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0]);
        let p = ipv6(
            "2001:db8:e::5".parse().unwrap(),
            "2001:db8:64::cb00:7105".parse().unwrap(),
            44,
            64,
            &payload,
        );
        match translate_6to4(&c, &p, &mut out) {
            Outcome::Reply { cause, .. } => {
                assert_eq!(cause, DropReason::ExtensionAfterFragment, "{nh}")
            }
            o => panic!("{nh}: {o:?}"),
        }
    }
}

/// A UDP checksum computed for a zero one covers the datagram the UDP Length
/// gives, not the padding an IPv4 payload may carry after it.
#[test]
fn amended_udp_checksum_ignores_ipv4_padding() {
    let c = Config {
        amend_udp_checksum_zero: true,
        ..cfg()
    };
    let mut payload = vec![0, 1, 0, 2, 0, 12, 0, 0, 1, 2, 3, 4];
    payload.extend_from_slice(&[0xaa; 8]);
    let p = ipv4([203, 0, 113, 5], [192, 0, 2, 9], 17, 64, 1, 0, 0, &payload);
    let mut out = vec![0; OUT];
    let v6 = single(translate_4to6(&c, &p, &mut out), &out);
    let s6: [u8; 16] = v6[8..24].try_into().unwrap();
    let d6: [u8; 16] = v6[24..40].try_into().unwrap();
    assert_ne!(&v6[46..48], &[0, 0]);
    assert!(csum::verify(csum::pseudo_v6(&s6, &d6, 17, 12), &v6[40..52]));
    // A UDP Length beyond the payload: not a datagram to checksum.
    let mut long = payload.clone();
    long[5] = 40;
    let p = ipv4([203, 0, 113, 5], [192, 0, 2, 9], 17, 64, 1, 0, 0, &long);
    assert_eq!(
        translate_4to6(&c, &p, &mut out),
        Outcome::Drop(DropReason::Truncated)
    );
}

/// A fragment of an ICMP error is counted as a fragmented ICMP packet, not
/// as a bad checksum (the checksum covers the whole message), both ways.
#[test]
fn a_fragmented_icmp_error_is_fragmented_icmp() {
    let c = cfg();
    let mut out = vec![0; OUT];
    let inner = udp4([192, 0, 2, 9], [203, 0, 113, 5]);
    let mut icmp4 = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp4.extend_from_slice(&inner);
    let cs = csum::checksum(&icmp4);
    icmp4[2..4].copy_from_slice(&cs.to_be_bytes());
    // The first 24 bytes, MF set.
    let p = ipv4(
        [203, 0, 113, 5],
        [192, 0, 2, 9],
        1,
        64,
        5,
        0x2000,
        0,
        &icmp4[..24],
    );
    assert_eq!(
        translate_4to6(&c, &p, &mut out),
        Outcome::Drop(DropReason::FragmentedIcmp)
    );

    let src: Ipv6Addr = "2001:db8:e::9".parse().unwrap();
    let dst: Ipv6Addr = "2001:db8:64::cb00:7105".parse().unwrap();
    let inner = ipv6(dst, src, 17, 63, &[0, 1, 0, 2, 0, 12, 0, 0, 1, 2, 3, 4]);
    let whole = icmp6_error(src, dst, &inner);
    // Fragment header (offset 0, more), then the first 24 bytes.
    let mut payload = vec![58, 0, 0, 1, 0, 0, 0, 7];
    payload.extend_from_slice(&whole[40..64]);
    let p = ipv6(src, dst, 44, 64, &payload);
    assert_eq!(
        translate_6to4(&c, &p, &mut out),
        Outcome::Drop(DropReason::FragmentedIcmp)
    );
}

/// RFC 4443 §2.4 (e): an ICMPv6 error behind extension headers gets no
/// error either; an echo request behind them does.
#[test]
fn an_icmpv6_error_behind_extension_headers_gets_no_error() {
    let c = cfg();
    let mut out = vec![0; OUT];
    let src: Ipv6Addr = "2001:db8:e::5".parse().unwrap();
    let dst: Ipv6Addr = "2001:db8:64::cb00:7105".parse().unwrap();
    for (ty, answered) in [(1u8, false), (128, true)] {
        // Destination Options (empty), then a Routing header with Segments
        // Left = 1, then ICMPv6.
        let mut payload = vec![43, 0, 1, 4, 0, 0, 0, 0];
        payload.extend_from_slice(&[58, 0, 0, 1, 0, 0, 0, 0]);
        payload.extend_from_slice(&[ty, 0, 0, 0, 0, 0, 0, 0]);
        let p = ipv6(src, dst, 60, 64, &payload);
        match translate_6to4(&c, &p, &mut out) {
            Outcome::Reply { cause, .. } if answered => assert_eq!(cause, DropReason::SourceRoute),
            Outcome::Drop(cause) if !answered => assert_eq!(cause, DropReason::SourceRoute),
            o => panic!("type {ty}: {o:?}"),
        }
    }
}
