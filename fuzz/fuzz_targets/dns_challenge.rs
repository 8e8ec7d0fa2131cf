//! Fuzz target: the hub's DNS responder (`proxy::dns::respond`), fed any
//! bytes as a UDP and as a TCP message, twice: for the zone
//! `_acme-challenge.gw.test` of ACME DNS-01 challenges (its apex holds two
//! TXT values, one of them longer than a character-string; names below it do
//! not exist), and for the whole gateway zone `gw.test` (`zone_lookup`:
//! `blog.gw.test` served, with many addresses, so replies get truncated).
//!
//! Invariants checked beyond "no panic":
//! * `lookup` only ever sees lowercase names without a trailing dot;
//! * a message dropped as not a query has the QR bit set;
//! * every reply parses, has the query's id and opcode and QR set, and echoes
//!   at most one question;
//! * a UDP reply fits 512 bytes, or 1232 when the query carries EDNS;
//! * a UDP reply that is not truncated is the TCP reply, byte for byte;
//! * what is dropped over TCP is dropped over UDP; what only UDP drops gets
//!   a header-only FORMERR or NOTIMP over TCP (its question does not read).
#![no_main]

use gatewire::proxy::dns::{respond, zone_lookup, Dropped, Lookup, Reply, ZoneData};
use hickory_proto::op::{Message, MessageType, ResponseCode};
use libfuzzer_sys::fuzz_target;
use std::net::IpAddr;

const ZONE: &str = "_acme-challenge.gw.test";

fn lookup(name: &str) -> Lookup {
    assert!(!name.bytes().any(|b| b.is_ascii_uppercase()), "{name:?}");
    assert!(!name.ends_with('.'), "{name:?}");
    if name == ZONE {
        Lookup::Apex {
            zone: ZONE.to_string(),
            txt: vec!["challenge-value".to_string(), "x".repeat(300)],
        }
    } else if name
        .strip_suffix(ZONE)
        .is_some_and(|head| head.ends_with('.'))
    {
        Lookup::Below {
            zone: ZONE.to_string(),
        }
    } else {
        Lookup::Outside
    }
}

fn zone(name: &str) -> Lookup {
    assert!(!name.bytes().any(|b| b.is_ascii_uppercase()), "{name:?}");
    let data = ZoneData {
        domains: vec!["gw.test".into(), "eu.gw.test".into()],
        addrs: (0..40u8)
            .map(|i| IpAddr::from([192, 0, 2, i]))
            .chain((0..40u16).map(|i| IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, i])))
            .collect(),
        ns: vec![
            ("ns1.gw.test".into(), vec![IpAddr::from([192, 0, 2, 1])]),
            ("ns.example.net".into(), Vec::new()),
        ],
        ttl: 60,
        local: vec!["db.gw.test".into()],
    };
    zone_lookup(
        name,
        &data,
        |h| {
            matches!(h, "blog.gw.test" | "api.v2.gw.test")
                .then(|| vec![IpAddr::from([198, 51, 100, 7])])
        },
        |n| n == "v2.gw.test",
        |_| vec!["challenge-value".into()],
    )
}

fn check(data: &[u8], udp: bool, r: &Result<Reply, Dropped>) -> Option<Message> {
    match r {
        Ok(reply) => {
            let b = &reply.bytes;
            assert!(b.len() >= 12);
            assert_eq!(b.get(..2), data.get(..2), "id");
            assert_eq!(b.get(2).map(|f| f & 0x80), Some(0x80), "QR");
            // Opcode bits.
            assert_eq!(b.get(2).map(|f| f & 0x78), data.get(2).map(|f| f & 0x78));
            let Ok(m) = Message::from_vec(b) else {
                panic!("reply does not parse: {b:02x?}")
            };
            assert_eq!(m.metadata.message_type, MessageType::Response);
            assert!(m.queries.len() <= 1);
            if udp {
                let query_has_edns = Message::from_vec(data).is_ok_and(|q| q.edns.is_some());
                let max = if query_has_edns { 1232 } else { 512 };
                assert!(b.len() <= max, "{} bytes over UDP", b.len());
            }
            Some(m)
        }
        Err(Dropped::NotAQuery) => {
            assert_eq!(data.get(2).map(|f| f & 0x80), Some(0x80));
            None
        }
        Err(Dropped::Malformed) => None,
    }
}

fn run(data: &[u8], lookup: fn(&str) -> Lookup) {
    let over_udp = respond(data, true, lookup);
    let over_tcp = respond(data, false, lookup);
    let m = check(data, true, &over_udp);
    check(data, false, &over_tcp);
    match (&over_udp, &over_tcp) {
        (Ok(_), Ok(_)) | (Err(_), Err(_)) => {}
        (Err(Dropped::Malformed), Ok(t)) => {
            assert!(matches!(
                t.rcode,
                ResponseCode::FormErr | ResponseCode::NotImp
            ));
            assert_eq!(t.bytes.len(), 12, "header only");
        }
        _ => panic!("dropped over one transport only: {over_udp:?} {over_tcp:?}"),
    }
    if let (Some(m), Ok(u), Ok(t)) = (m, &over_udp, &over_tcp) {
        if !m.metadata.truncation {
            assert_eq!(u.bytes, t.bytes);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    run(data, lookup);
    run(data, zone);
});
