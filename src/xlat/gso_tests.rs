//! Tests of whole super-packet translation against the per-packet translator:
//! a super-packet is built by hand, translated, then cut into segments the way
//! Linux's `tcp_gso_segment` does; every segment must be what translating the
//! matching segment of the original alone gives.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::net::Ipv4Addr;

use proptest::prelude::*;

use super::super::{csum, translate_4to6, translate_6to4, Config, Eam, Outcome, Pool6};
use super::*;

const FIN: u8 = 0x01;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;
const CWR: u8 = 0x80;

const C4: [u8; 4] = [192, 0, 2, 2];
const S4: [u8; 4] = [198, 51, 100, 10];
const C6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0x64, 0, 0, 0, 0, 0, 0, 192, 0, 2, 2,
];
const S6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

/// The benchmark's mapping: pool6 2001:db8:64::/96, one EAM entry.
fn cfg() -> Config {
    Config {
        pool6: Some(Pool6::new("2001:db8:64::".parse().unwrap(), 96).unwrap()),
        eamt: vec![Eam::new(
            Ipv4Addr::from(S4),
            32,
            "2001:db8:6::2".parse().unwrap(),
            128,
        )
        .unwrap()],
        id_salt: 0x1234_5678,
        ..Config::default()
    }
}

/// A TCP header of `thl` bytes (options: NOPs then a timestamp when there is room).
fn tcp_header(thl: usize, seq: u32, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; thl];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&5201u16.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&0x0102_0304u32.to_be_bytes());
    t[12] = ((thl / 4) as u8) << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&502u16.to_be_bytes());
    for b in t.iter_mut().skip(20) {
        *b = 1;
    }
    if thl >= 32 {
        t[thl - 10..thl].copy_from_slice(&[8, 10, 0, 0, 1, 2, 0, 0, 3, 4]);
    }
    t
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn frame(v: VnetHdr, pkt: &[u8]) -> Vec<u8> {
    let mut f = v.to_bytes().to_vec();
    f.extend_from_slice(pkt);
    f
}

fn vnet(gso_type: u8, iph: usize, gso_size: u16) -> VnetHdr {
    VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type,
        // The kernel's hint may be anything; the translation must not use it.
        hdr_len: 1234,
        gso_size,
        csum_start: iph as u16,
        csum_offset: 16,
    }
}

/// An IPv4 TCP super-packet as the kernel hands it out: the checksum field
/// holds the folded pseudo-header sum with the full TCP length.
#[allow(clippy::too_many_arguments)]
fn v4_super(
    src: [u8; 4],
    dst: [u8; 4],
    tos: u8,
    ttl: u8,
    id: u16,
    df: bool,
    tcp: &[u8],
    data: &[u8],
) -> Vec<u8> {
    let total = 20 + tcp.len() + data.len();
    let mut p = vec![0x45, tos];
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&(if df { 0x4000u16 } else { 0 }).to_be_bytes());
    p.extend_from_slice(&[ttl, 6, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    let c = csum::checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(tcp);
    p.extend_from_slice(data);
    let partial = csum::fold(csum::pseudo_v4(&src, &dst, 6, (total - 20) as u32));
    p[36..38].copy_from_slice(&partial.to_be_bytes());
    p
}

fn v6_super(src: [u8; 16], dst: [u8; 16], tc: u8, hop: u8, tcp: &[u8], data: &[u8]) -> Vec<u8> {
    let plen = tcp.len() + data.len();
    let w0 = 0x6000_0000u32 | (u32::from(tc) << 20) | 0x0_abcd;
    let mut p = w0.to_be_bytes().to_vec();
    p.extend_from_slice(&(plen as u16).to_be_bytes());
    p.extend_from_slice(&[6, hop]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(tcp);
    p.extend_from_slice(data);
    let partial = csum::fold(csum::pseudo_v6(&src, &dst, 6, plen as u32));
    p[56..58].copy_from_slice(&partial.to_be_bytes());
    p
}

/// Ones'-complement `a - b + c` on 16-bit values.
fn adjust(a: u16, b: u16, c: u16) -> u16 {
    csum::fold(csum::add(
        csum::add(u32::from(a), u32::from(!b)),
        u32::from(c),
    ))
}

/// Cuts a super-packet (a frame: virtio-net header, then packet) into
/// segments as Linux does (`inet_gso_segment`/`ipv6_gso_segment` and
/// `tcp_gso_segment`), completing each segment's checksum from the partial one.
fn segment(frame: &[u8]) -> Vec<Vec<u8>> {
    let v = VnetHdr::decode(frame).unwrap();
    let pkt = &frame[VNET_HDR_LEN..];
    let v4 = pkt[0] >> 4 == 4;
    let iph = usize::from(v.csum_start);
    let thl = usize::from(pkt[iph + 12] >> 4) * 4;
    let hdr_len = iph + thl;
    let end = if v4 {
        usize::from(u16::from_be_bytes([pkt[2], pkt[3]]))
    } else {
        40 + usize::from(u16::from_be_bytes([pkt[4], pkt[5]]))
    };
    let data = &pkt[hdr_len..end];
    let mss = usize::from(v.gso_size);
    let partial = u16::from_be_bytes([pkt[iph + 16], pkt[iph + 17]]);
    let super_len = (end - iph) as u16;
    let seq = u32::from_be_bytes(pkt[iph + 4..iph + 8].try_into().unwrap());
    let n = data.len().div_ceil(mss);
    let mut out = Vec::new();
    for (i, chunk) in data.chunks(mss).enumerate() {
        let mut s = pkt[..hdr_len].to_vec();
        s.extend_from_slice(chunk);
        let len = s.len();
        if v4 {
            s[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            let id = u16::from_be_bytes([s[4], s[5]]).wrapping_add(i as u16);
            s[4..6].copy_from_slice(&id.to_be_bytes());
            s[10..12].fill(0);
            let c = csum::checksum(&s[..20]);
            s[10..12].copy_from_slice(&c.to_be_bytes());
        } else {
            s[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        }
        let t = &mut s[iph..];
        t[4..8].copy_from_slice(&seq.wrapping_add((i * mss) as u32).to_be_bytes());
        if i > 0 {
            t[13] &= !CWR;
        }
        if i + 1 < n {
            t[13] &= !(FIN | PSH);
        }
        let seg_partial = adjust(partial, super_len, (len - iph) as u16);
        t[16..18].fill(0);
        let c = csum::finish(csum::add(u32::from(seg_partial), csum::sum(t)));
        t[16..18].copy_from_slice(&c.to_be_bytes());
        out.push(s);
    }
    out
}

/// The TCP checksum of a plain segment is right.
fn tcp_ok(s: &[u8]) -> bool {
    if s[0] >> 4 == 4 {
        let pseudo = csum::pseudo_v4(
            &s[12..16].try_into().unwrap(),
            &s[16..20].try_into().unwrap(),
            6,
            (s.len() - 20) as u32,
        );
        csum::verify(0, &s[..20]) && csum::verify(pseudo, &s[20..])
    } else {
        let pseudo = csum::pseudo_v6(
            &s[8..24].try_into().unwrap(),
            &s[24..40].try_into().unwrap(),
            6,
            (s.len() - 40) as u32,
        );
        csum::verify(pseudo, &s[40..])
    }
}

/// Translates a frame whole (with headroom), returns the translated frame.
fn whole(cfg: &Config, f: &[u8]) -> Option<Vec<u8>> {
    let mut buf = vec![0xeeu8; HEADROOM];
    buf.extend_from_slice(f);
    let before = buf.clone();
    match translate(cfg, &mut buf, HEADROOM..HEADROOM + f.len()) {
        Some(r) => Some(buf[r].to_vec()),
        None => {
            assert_eq!(buf, before, "not eligible, yet the buffer changed");
            None
        }
    }
}

/// The original frame with the translated frame's `gso_size`, cut into segments.
fn original_segments(f: &[u8], translated: &[u8]) -> Vec<Vec<u8>> {
    let mut v = VnetHdr::decode(f).unwrap();
    v.gso_size = VnetHdr::decode(translated).unwrap().gso_size;
    let mut f2 = f.to_vec();
    f2[..VNET_HDR_LEN].copy_from_slice(&v.to_bytes());
    segment(&f2)
}

fn one(o: Outcome, out: &[u8]) -> Vec<u8> {
    match o {
        Outcome::Forward(p) => {
            assert_eq!(p.len(), 1, "{o:?}");
            p.iter(out).next().unwrap().to_vec()
        }
        o => panic!("per-packet translation: {o:?}"),
    }
}

/// Checks a 4→6 translation against the per-packet translator, segment by segment.
fn check_4to6(cfg: &Config, f: &[u8]) -> VnetHdr {
    let t = whole(cfg, f).expect("eligible");
    let tv = VnetHdr::decode(&t).unwrap();
    let orig = VnetHdr::decode(f).unwrap();
    assert_eq!(tv.gso_type & !GSO_ECN, GSO_TCPV6);
    assert_eq!(tv.gso_type & GSO_ECN, orig.gso_type & GSO_ECN);
    assert_eq!(tv.csum_start, 40);
    assert_eq!(t.len(), f.len() + 20);
    let ours = segment(&t);
    let theirs = original_segments(f, &t);
    assert_eq!(ours.len(), theirs.len());
    let mut out = vec![0u8; super::super::OUT_BUF_LEN];
    for (i, (o, s4)) in ours.iter().zip(&theirs).enumerate() {
        assert!(tcp_ok(s4), "original segment {i}");
        assert!(tcp_ok(o), "translated segment {i}");
        assert!(o.len() <= usize::from(cfg.ipv6_mtu), "segment {i} too big");
        let expect = one(translate_4to6(cfg, s4, &mut out), &out);
        assert_eq!(o, &expect, "segment {i} of {}", ours.len());
    }
    tv
}

/// Checks a 6→4 translation: segments equal the per-packet translation but
/// for the IPv4 identification, DF and header checksum, which the kernel's
/// segmentation sets from the super-packet.
fn check_6to4(cfg: &Config, f: &[u8]) -> VnetHdr {
    let t = whole(cfg, f).expect("eligible");
    let tv = VnetHdr::decode(&t).unwrap();
    assert_eq!(tv.gso_type & !GSO_ECN, GSO_TCPV4);
    assert_eq!(tv.csum_start, 20);
    assert_eq!(t.len() + 20, f.len());
    let sup = &t[VNET_HDR_LEN..];
    let ours = segment(&t);
    let theirs = original_segments(f, &t);
    assert_eq!(ours.len(), theirs.len());
    let mut out = vec![0u8; super::super::OUT_BUF_LEN];
    for (i, (o, s6)) in ours.iter().zip(&theirs).enumerate() {
        assert!(tcp_ok(s6), "original segment {i}");
        assert!(tcp_ok(o), "translated segment {i}");
        assert!(o.len() <= usize::from(cfg.ipv4_mtu), "segment {i} too big");
        let expect = one(translate_6to4(cfg, s6, &mut out), &out);
        assert_eq!(o.len(), expect.len());
        assert_eq!(o[..4], expect[..4], "segment {i}");
        assert_eq!(o[8..10], expect[8..10], "segment {i}");
        assert_eq!(o[12..], expect[12..], "segment {i}");
        // The kernel's IPv4 segmentation: flags copied, IDs counting up.
        assert_eq!(o[6..8], sup[6..8]);
        let id = u16::from_be_bytes([sup[4], sup[5]]).wrapping_add(i as u16);
        assert_eq!(o[4..6], id.to_be_bytes());
        // Full-sized segments get the DF the per-packet path gives them.
        if expect[6] & 0x40 != 0 {
            assert!(o[6] & 0x40 != 0, "segment {i}: DF");
        }
    }
    tv
}

#[test]
fn vnet_hdr_round_trip() {
    let v = VnetHdr {
        flags: 1,
        gso_type: GSO_TCPV4 | GSO_ECN,
        hdr_len: 52,
        gso_size: 1448,
        csum_start: 20,
        csum_offset: 16,
    };
    assert_eq!(VnetHdr::decode(&v.to_bytes()), Some(v));
    assert_eq!(VnetHdr::decode(&[0u8; 9]), None);
}

#[test]
fn v4_to_v6_benchmark_stream() {
    let cfg = Config {
        ipv6_mtu: 1500,
        ..cfg()
    };
    // A client with MTU 1500 and timestamps: 1448-byte segments, 45 of them.
    let tcp = tcp_header(32, 1_000_000, ACK | PSH);
    let data = payload(1448 * 44 + 700, 3);
    let p = v4_super(C4, S4, 0, 64, 0x1111, true, &tcp, &data);
    let f = frame(vnet(GSO_TCPV4, 20, 1448), &p);
    let v = check_4to6(&cfg, &f);
    // 40 + 32 + 1428 = 1500: 20 bytes less per segment.
    assert_eq!(v.gso_size, 1428);
    assert_eq!(v.hdr_len, 72);
}

#[test]
fn v4_to_v6_keeps_segments_that_fit() {
    let tcp = tcp_header(32, 7, ACK);
    let data = payload(1428 * 10, 9);
    let p = v4_super(C4, S4, 0x2e, 3, 1, true, &tcp, &data);
    let f = frame(vnet(GSO_TCPV4 | GSO_ECN, 20, 1428), &p);
    assert_eq!(check_4to6(&cfg(), &f).gso_size, 1428);
}

#[test]
fn v4_to_v6_flags_fin_cwr_and_pool6_source() {
    // Destination through pool6 (not EAM), FIN and CWR on the super-packet.
    let dst = [203, 0, 113, 9];
    let tcp = tcp_header(20, u32::MAX - 3000, ACK | PSH | FIN | CWR);
    let data = payload(5000, 1);
    let p = v4_super(C4, dst, 0x03, 64, 0xffff, true, &tcp, &data);
    check_4to6(&cfg(), &frame(vnet(GSO_TCPV4, 20, 1000), &p));
}

#[test]
fn v4_to_v6_without_df_fits_lowest_ipv6_mtu() {
    let tcp = tcp_header(20, 1, ACK);
    let data = payload(6000, 5);
    let p = v4_super(C4, S4, 0, 64, 9, false, &tcp, &data);
    let v = check_4to6(&cfg(), &frame(vnet(GSO_TCPV4, 20, 1460), &p));
    // lowest_ipv6_mtu 1280: 1280 - 40 - 20.
    assert_eq!(v.gso_size, 1220);
}

#[test]
fn v4_to_v6_single_segment() {
    let tcp = tcp_header(32, 1, ACK);
    let data = payload(100, 5);
    let p = v4_super(C4, S4, 0, 64, 9, true, &tcp, &data);
    check_4to6(&cfg(), &frame(vnet(GSO_TCPV4, 20, 1448), &p));
}

#[test]
fn v6_to_v4_stream() {
    let tcp = tcp_header(32, 42, ACK | PSH);
    let data = payload(1428 * 30 + 1, 7);
    let p = v6_super(S6, C6, 0xb8, 64, &tcp, &data);
    let v = check_6to4(&cfg(), &frame(vnet(GSO_TCPV6, 40, 1428), &p));
    assert_eq!(v.gso_size, 1428);
    assert_eq!(v.hdr_len, 52);
}

#[test]
fn v6_to_v4_shrinks_to_the_ipv4_mtu() {
    let cfg = Config {
        ipv4_mtu: 1400,
        ..cfg()
    };
    let tcp = tcp_header(20, 42, ACK);
    let data = payload(20_000, 7);
    let p = v6_super(S6, C6, 0, 2, &tcp, &data);
    let v = check_6to4(&cfg, &frame(vnet(GSO_TCPV6, 40, 1440), &p));
    assert_eq!(v.gso_size, 1360);
}

#[test]
fn v6_to_v4_small_segments_without_df() {
    let tcp = tcp_header(20, 42, ACK);
    let data = payload(3000, 7);
    let p = v6_super(S6, C6, 0, 64, &tcp, &data);
    let f = frame(vnet(GSO_TCPV6, 40, 536), &p);
    check_6to4(&cfg(), &f);
    let t = whole(&cfg(), &f).unwrap();
    assert_eq!(t[VNET_HDR_LEN + 6] & 0x40, 0, "no DF below 1260 bytes");
}

#[test]
fn not_eligible() {
    let c = cfg();
    let tcp = tcp_header(20, 1, ACK);
    let data = payload(3000, 1);
    let good4 = v4_super(C4, S4, 0, 64, 1, true, &tcp, &data);
    let good6 = v6_super(S6, C6, 0, 64, &tcp, &data);
    let v4 = vnet(GSO_TCPV4, 20, 1000);
    let v6 = vnet(GSO_TCPV6, 40, 1000);
    assert!(whole(&c, &frame(v4, &good4)).is_some());
    assert!(whole(&c, &frame(v6, &good6)).is_some());

    let with = |v: VnetHdr, p: &[u8], edit: &dyn Fn(&mut VnetHdr, &mut Vec<u8>)| {
        let mut v = v;
        let mut p = p.to_vec();
        edit(&mut v, &mut p);
        whole(&c, &frame(v, &p))
    };
    let fix4 = |p: &mut Vec<u8>| {
        p[10..12].fill(0);
        let s = csum::checksum(&p[..20]);
        p[10..12].copy_from_slice(&s.to_be_bytes());
    };
    // virtio-net header.
    assert!(with(v4, &good4, &|v, _| v.gso_type = 3).is_none());
    assert!(with(v4, &good4, &|v, _| v.gso_type = 5).is_none());
    assert!(with(v4, &good4, &|v, _| v.gso_type = GSO_NONE).is_none());
    assert!(with(v4, &good4, &|v, _| v.gso_type = GSO_TCPV6).is_none());
    assert!(with(v6, &good6, &|v, _| v.gso_type = GSO_TCPV4).is_none());
    assert!(with(v4, &good4, &|v, _| v.flags = 0).is_none());
    assert!(with(v4, &good4, &|v, _| v.flags = 2).is_none());
    assert!(with(v4, &good4, &|v, _| v.gso_size = 0).is_none());
    assert!(with(v4, &good4, &|v, _| v.csum_start = 24).is_none());
    assert!(with(v4, &good4, &|v, _| v.csum_offset = 6).is_none());
    // IPv4 header.
    assert!(with(v4, &good4, &|_, p| p[10] ^= 1).is_none());
    assert!(with(v4, &good4, &|_, p| {
        p[8] = 1;
        fix4(p)
    })
    .is_none());
    assert!(with(v4, &good4, &|_, p| {
        p[6] |= 0x20;
        fix4(p)
    })
    .is_none());
    assert!(with(v4, &good4, &|_, p| {
        p[7] = 1;
        fix4(p)
    })
    .is_none());
    assert!(with(v4, &good4, &|_, p| {
        p[9] = 17;
        fix4(p)
    })
    .is_none());
    assert!(with(v4, &good4, &|_, p| {
        p[16..20].copy_from_slice(&[224, 0, 0, 1]);
        fix4(p)
    })
    .is_none());
    assert!(with(v4, &good4, &|_, p| {
        let n = p.len() as u16 + 1;
        p[2..4].copy_from_slice(&n.to_be_bytes());
        fix4(p)
    })
    .is_none());
    // IPv4 options.
    let mut opt = good4.clone();
    opt[0] = 0x46;
    opt.splice(20..20, [1u8, 1, 1, 0]);
    let total = opt.len() as u16;
    opt[2..4].copy_from_slice(&total.to_be_bytes());
    fix4(&mut opt);
    assert!(whole(&c, &frame(vnet(GSO_TCPV4, 24, 1000), &opt)).is_none());
    // No payload after the TCP header, or a TCP header too short.
    let bare = v4_super(C4, S4, 0, 64, 1, true, &tcp, &[]);
    assert!(whole(&c, &frame(v4, &bare)).is_none());
    assert!(with(v4, &good4, &|_, p| p[32] = 0x40).is_none());
    // IPv6: extension header, hop limit, untranslatable source, hairpin.
    assert!(with(v6, &good6, &|_, p| p[6] = 0).is_none());
    assert!(with(v6, &good6, &|_, p| p[7] = 1).is_none());
    assert!(with(v6, &good6, &|_, p| p[8] = 0x30).is_none());
    let through_pool6 = cfg().pool6.unwrap().embed(S4);
    assert!(with(v6, &good6, &|_, p| {
        p[24..40].copy_from_slice(&through_pool6);
    })
    .is_none());
    assert!(with(v6, &good6, &|_, p| p[4] = 0xff).is_none());
    // Truncated frames.
    let f = frame(v4, &good4);
    for n in [0, 5, 10, 25, 45] {
        assert!(whole(&c, &f[..n]).is_none());
    }
    // No headroom for an IPv4 → IPv6 translation.
    let mut buf = f.clone();
    assert!(translate(&c, &mut buf, 0..f.len()).is_none());
    assert_eq!(buf, f);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn v4_to_v6_any_stream(
        data_len in 1usize..20_000,
        mss in 1u16..1600,
        thl_words in 5usize..=15,
        flags in any::<u8>(),
        tos in any::<u8>(),
        ttl in 2u8..=255,
        id in any::<u16>(),
        seq in any::<u32>(),
        df in any::<bool>(),
        ecn in any::<bool>(),
        ipv6_mtu in 1280u16..9000,
    ) {
        let cfg = Config { ipv6_mtu, ..cfg() };
        let tcp = tcp_header(thl_words * 4, seq, flags);
        let data = payload(data_len, flags);
        let p = v4_super(C4, S4, tos, ttl, id, df, &tcp, &data);
        let ty = GSO_TCPV4 | if ecn { GSO_ECN } else { 0 };
        let f = frame(vnet(ty, 20, mss), &p);
        if flags & 0x02 != 0 {
            // A SYN goes the per-packet way (MSS clamping).
            prop_assert!(whole(&cfg, &f).is_none());
        } else {
            check_4to6(&cfg, &f);
        }
    }

    #[test]
    fn v6_to_v4_any_stream(
        data_len in 1usize..20_000,
        mss in 1u16..1600,
        thl_words in 5usize..=15,
        flags in any::<u8>(),
        tc in any::<u8>(),
        hop in 2u8..=255,
        seq in any::<u32>(),
        ipv4_mtu in 576u16..9000,
    ) {
        let cfg = Config { ipv4_mtu, ..cfg() };
        let tcp = tcp_header(thl_words * 4, seq, flags);
        let data = payload(data_len, flags);
        let p = v6_super(S6, C6, tc, hop, &tcp, &data);
        let f = frame(vnet(GSO_TCPV6, 40, mss), &p);
        if flags & 0x02 != 0 {
            prop_assert!(whole(&cfg, &f).is_none());
        } else {
            check_6to4(&cfg, &f);
        }
    }

    #[test]
    fn arbitrary_frames_never_panic(f in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = whole(&cfg(), &f);
        let _ = plan(&cfg(), &f);
    }
}

/// Behind the Well-Known Prefix a non-global address is the per-packet
/// path's to drop and count (RFC 6052 §3.1): not planned, either way.
#[test]
fn well_known_prefix_non_global_is_not_planned() {
    let wkp = Pool6::new("64:ff9b::".parse().unwrap(), 96).unwrap();
    let c = Config {
        pool6: Some(wkp),
        ..cfg()
    };
    let tcp = tcp_header(20, 1, 0x10);
    let data = vec![7u8; 3000];
    let v4 = vnet(GSO_TCPV4, 20, 1000);
    let v6 = vnet(GSO_TCPV6, 40, 1000);
    // IPv4 client 10.0.0.2 (C4's place) to the EAM server, and back.
    let private = [10, 0, 0, 2];
    assert!(whole(
        &c,
        &frame(v4, &v4_super(private, S4, 0, 64, 1, true, &tcp, &data))
    )
    .is_none());
    let to_private = v6_super(S6, wkp.embed(private), 0, 64, &tcp, &data);
    assert!(whole(&c, &frame(v6, &to_private)).is_none());
    // A global client goes.
    let global = [8, 8, 8, 8];
    assert!(whole(
        &c,
        &frame(v4, &v4_super(global, S4, 0, 64, 1, true, &tcp, &data))
    )
    .is_some());
    let to_global = v6_super(S6, wkp.embed(global), 0, 64, &tcp, &data);
    assert!(whole(&c, &frame(v6, &to_global)).is_some());
}
