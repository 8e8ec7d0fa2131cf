//! Fuzz target for the NAT64 session table: a sequence of packets, each fed
//! outbound (IPv6 node → IPv4) or inbound (translated from IPv4), at advancing
//! times, into a small table so that full-table, host-limit, port exhaustion
//! and expiry paths are reached. Outbound packets come from one of four
//! owners (nodes), whatever their source address. The table must never panic
//! nor exceed its bounds (sessions, sessions per owner, strangers' sessions
//! per owner, tracked datagrams, held fragment bytes).
#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr};

use gatewire::xlat::nat64::{Owner, Settings, Table};
use gatewire::xlat::Pool6;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A network-specific prefix: the Well-Known Prefix would refuse the
    // documentation addresses below (RFC 6052 §3.1) before the table.
    let Ok(pool6) = Pool6::new(Ipv6Addr::new(0x2001, 0xdb8, 0x64, 0, 0, 0, 0, 0), 96) else {
        return;
    };
    let mut t = Table::new(Settings {
        pool4: Ipv4Addr::new(198, 51, 100, 200),
        port_min: 1000,
        port_max: 1015,
        max_sessions: 8,
        max_sessions_per_host: 3,
    });
    let mut now = 0u64;
    let mut buf = [0u8; 2048];
    let owners: [Owner; 4] = [[0; 16], [1; 16], [2; 16], [3; 16]];
    // Records: [control][len][bytes...]; control bit 0 = direction, bits 1..7 = time step;
    // the low two bits of len choose the owner of an outbound packet.
    let mut rest = data;
    while let [ctl, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (pkt, next) = tail.split_at(n);
        rest = next;
        now += u64::from(ctl >> 1) * 7;
        let Some(b) = buf.get_mut(..pkt.len()) else {
            return;
        };
        b.copy_from_slice(pkt);
        // Make the prefix plausible often enough to reach the table.
        if b.len() >= 40 && ctl & 0x80 != 0 {
            if let Some(h) = b.get_mut(0) {
                *h = 0x60;
            }
            let p = pool6.embed([203, 0, 113, b.get(39).copied().unwrap_or(0)]);
            let off = if ctl & 1 == 0 { 24 } else { 8 };
            if let Some(d) = b.get_mut(off..off + 16) {
                d.copy_from_slice(&p);
            }
        }
        let owner = owners
            .get(usize::from(*len & 3))
            .copied()
            .unwrap_or_default();
        let _ = if ctl & 1 == 0 {
            t.outbound(b, &pool6, owner, now)
        } else {
            t.inbound(b, &pool6, now)
        };
        assert!(t.sessions() <= 8);
        assert!(t.bindings() <= t.sessions());
        // Every owner with a session holds at most 3 of its own, and at
        // most 3 strangers' on its UDP mappings; every session is in one
        // of those counts.
        assert!(t.owners() <= t.sessions());
        assert!(owners.iter().all(|&o| t.owner_sessions(o) <= 3));
        assert!(owners.iter().all(|&o| t.stranger_sessions(o) <= 3));
        let counted: usize = owners
            .iter()
            .map(|&o| t.owner_sessions(o) + t.stranger_sessions(o))
            .sum();
        assert_eq!(counted, t.sessions());
        assert!(t.fragment_flows() <= gatewire::xlat::nat64::MAX_FRAG_FLOWS);
        let (held, bytes) = t.held_fragments();
        assert!(bytes <= gatewire::xlat::nat64::MAX_HELD_BYTES);
        assert!(held <= bytes);
        // Held fragments released by a first come out rewritten, once.
        while let Some(r) = t.take_released() {
            assert!(r.packet.len() >= 48);
        }
    }
});
