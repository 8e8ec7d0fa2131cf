//! Fuzz target for whole super-packet translation (`xlat::gso`): the input is
//! a frame (virtio-net header, then packet), tried as it is and once more with
//! its IPv4 header checksum and length fields made consistent, so the fuzzer
//! gets past the cheap checks. The translation must never panic, must leave
//! the buffer alone when the frame is not eligible, and what it produces must
//! be a consistent frame of the other family; translated back, the addresses,
//! the TCP header and payload and the partial checksum come out unchanged.
#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use gatewire::xlat::gso::{self, VnetHdr, GSO_ECN, GSO_TCPV4, GSO_TCPV6, HEADROOM, VNET_HDR_LEN};
use gatewire::xlat::{csum, Config, Eam, Pool6};
use libfuzzer_sys::fuzz_target;

fn config() -> &'static Config {
    static CFG: OnceLock<Config> = OnceLock::new();
    CFG.get_or_init(|| {
        let mut cfg = Config {
            pool6: Pool6::new(Ipv6Addr::new(0x2001, 0xdb8, 0x64, 0, 0, 0, 0, 0), 96).ok(),
            ipv6_mtu: 1500,
            ipv4_mtu: 1500,
            id_salt: 7,
            ..Config::default()
        };
        if let Ok(e) = Eam::new(
            Ipv4Addr::new(198, 51, 100, 0),
            24,
            Ipv6Addr::new(0x2001, 0xdb8, 6, 0, 0, 0, 0, 0),
            120,
        ) {
            cfg.eamt.push(e);
        }
        cfg
    })
}

/// Translates `frame` with headroom; checks what the translator promises and
/// returns the translated frame.
fn run(cfg: &Config, frame: &[u8]) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; HEADROOM + frame.len()];
    buf[HEADROOM..].copy_from_slice(frame);
    let before = buf.clone();
    let Some(r) = gso::translate(cfg, &mut buf, HEADROOM..HEADROOM + frame.len()) else {
        assert_eq!(buf, before, "not eligible, yet the buffer changed");
        return None;
    };
    let out = buf.get(r).expect("range inside the buffer").to_vec();
    let vin = VnetHdr::decode(frame).expect("input header");
    let v = VnetHdr::decode(&out).expect("output header");
    let pkt = &out[VNET_HDR_LEN..];
    assert_eq!(v.gso_type & GSO_ECN, vin.gso_type & GSO_ECN);
    assert!(v.gso_size > 0 && v.gso_size <= vin.gso_size);
    let thl = usize::from(pkt[usize::from(v.csum_start) + 12] >> 4) * 4;
    assert_eq!(usize::from(v.hdr_len), usize::from(v.csum_start) + thl);
    assert!(usize::from(v.hdr_len) < pkt.len(), "no payload");
    match pkt[0] >> 4 {
        6 => {
            assert_eq!(v.gso_type & !GSO_ECN, GSO_TCPV6);
            assert_eq!(v.csum_start, 40);
            assert_eq!(
                usize::from(u16::from_be_bytes([pkt[4], pkt[5]])) + 40,
                pkt.len()
            );
            assert!(40 + thl + usize::from(v.gso_size) <= usize::from(cfg.ipv6_mtu));
        }
        4 => {
            assert_eq!(v.gso_type & !GSO_ECN, GSO_TCPV4);
            assert_eq!(v.csum_start, 20);
            assert_eq!(usize::from(u16::from_be_bytes([pkt[2], pkt[3]])), pkt.len());
            assert!(csum::verify(0, &pkt[..20]), "IPv4 header checksum");
            assert!(20 + thl + usize::from(v.gso_size) <= usize::from(cfg.ipv4_mtu));
        }
        _ => panic!("translated into neither IPv4 nor IPv6"),
    }
    Some(out)
}

/// Makes an IPv4 frame's total length and header checksum consistent.
fn fix_v4(frame: &mut [u8]) {
    let Some(pkt) = frame.get_mut(VNET_HDR_LEN..) else {
        return;
    };
    if pkt.len() < 20 || pkt[0] >> 4 != 4 {
        return;
    }
    let Ok(total) = u16::try_from(pkt.len()) else {
        return;
    };
    pkt[2..4].copy_from_slice(&total.to_be_bytes());
    let ihl = (usize::from(pkt[0] & 0x0f) * 4).clamp(20, pkt.len().min(60));
    pkt[10..12].fill(0);
    let c = csum::checksum(&pkt[..ihl]);
    pkt[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Sum of the addresses of a packet (the part of the pseudo-header that
/// translation changes).
fn addr_sum(p: &[u8]) -> u32 {
    if p[0] >> 4 == 4 {
        csum::sum(&p[12..20])
    } else {
        csum::sum(&p[8..40])
    }
}

/// Translated there and back again: the same TCP bytes, and a partial
/// checksum that differs exactly by the address change (ones'-complement,
/// where 0 and 0xffff are the same). IPv4 addresses come back unchanged.
fn round_trip(cfg: &Config, orig: &[u8], there: &[u8]) {
    let Some(back) = run(cfg, there) else { return };
    let (a, b) = (&orig[VNET_HDR_LEN..], &back[VNET_HDR_LEN..]);
    assert_eq!(a[0] >> 4, b[0] >> 4);
    let (ih, end) = if a[0] >> 4 == 4 {
        assert_eq!(a[12..20], b[12..20]);
        (20, usize::from(u16::from_be_bytes([a[2], a[3]])))
    } else {
        (40, 40 + usize::from(u16::from_be_bytes([a[4], a[5]])))
    };
    let (ta, tb) = (&a[ih..end], &b[ih..]);
    assert_eq!(ta.len(), tb.len());
    assert_eq!(ta[..16], tb[..16]);
    assert_eq!(ta[18..], tb[18..]);
    let base = |t: &[u8], p: &[u8]| {
        let c = u32::from(u16::from_be_bytes([t[16], t[17]]));
        csum::fold(csum::add(c, u32::from(!csum::fold(addr_sum(p))))) % 0xffff
    };
    assert_eq!(base(ta, a), base(tb, b), "partial checksum");
}

fuzz_target!(|data: &[u8]| {
    let cfg = config();
    if let Some(t) = run(cfg, data) {
        round_trip(cfg, data, &t);
    }
    let mut fixed = data.to_vec();
    fix_v4(&mut fixed);
    if let Some(t) = run(cfg, &fixed) {
        round_trip(cfg, &fixed, &t);
    }
    let _ = gso::plan(cfg, data);
});
