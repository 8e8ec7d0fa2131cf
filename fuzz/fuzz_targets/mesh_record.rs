//! Fuzz target: hub mesh records (`mesh::table::decode_record`), the JSON
//! another hub writes in etcd, read back under a key whose last part is chosen
//! by the first input byte; a record that decodes goes into a `Table` built
//! for hub `hub-x`.
//!
//! Invariants checked beyond "no panic":
//! * a decoded record carries the key's name and the record version, at most
//!   `MAX_ADDRS` addresses per listener kind, no port 0, and its hosts are
//!   normalised DNS names, sorted and without repeats; its public (`dns`)
//!   addresses are at most `MAX_ADDRS`, unicast, reachable from the
//!   internet, in their plain form and without repeats, and the table
//!   names each of them;
//! * it encodes to bytes that decode to the same record, and the same bytes
//!   under another key are refused as `KeyMismatch`;
//! * the table (the record given twice) holds one hub, which serves every host
//!   of the record (`lookup`) and no other, and trusts every listed address's
//!   IP (also as or without an IPv4-mapped IPv6 form) and no other probed IP;
//! * a record under this hub's own name (`hub-x`) leaves the table empty.
#![no_main]

use gatewire::mesh::table::{
    decode_record, HubRecord, RecordError, Table, MAX_ADDRS, MAX_HOSTS, RECORD_VERSION,
};
use gatewire::proxy::names::DomainName;
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const KEYS: [&str; 5] = ["hub-a", "hub-b", "hub-x", "a", "eu1.gw_2"];
const OWN: &str = "hub-x";

/// Addresses no record can make trusted by themselves, or ones a record may list.
fn probes(rec: &HubRecord) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = vec![
        Ipv4Addr::UNSPECIFIED.into(),
        Ipv6Addr::UNSPECIFIED.into(),
        Ipv4Addr::new(192, 0, 2, 1).into(),
        "2001:db8::1".parse().expect("literal"),
    ];
    for a in rec.http.iter().chain(&rec.https) {
        // A neighbour of every listed address.
        v.push(match a.ip() {
            IpAddr::V4(x) => Ipv4Addr::from(u32::from(x) ^ 1).into(),
            IpAddr::V6(x) => Ipv6Addr::from(u128::from(x) ^ 1).into(),
        });
    }
    v
}

fn check_table(rec: &HubRecord) {
    let t = Table::build(OWN, [rec, rec]);
    let listed: Vec<IpAddr> = rec
        .http
        .iter()
        .chain(&rec.https)
        .map(|a| a.ip().to_canonical())
        .collect();
    if rec.name == OWN {
        assert!(t.hubs().is_empty(), "own record in the table");
        assert!(t.is_empty());
        for a in rec.http.iter().chain(&rec.https) {
            assert!(!t.trusts(a.ip()), "own address {a} trusted");
        }
        for h in &rec.hosts {
            let n = DomainName::parse(h).expect("decoded host parses");
            assert!(
                t.lookup(&n).is_empty(),
                "own host {h} reached through the mesh"
            );
        }
        return;
    }
    assert_eq!(t.hubs().len(), 1, "a record given twice makes one hub");
    let hub = t.hubs().first().expect("one hub");
    assert_eq!(hub.name, rec.name);
    assert_eq!(hub.hosts, rec.hosts.len());
    assert_eq!(hub.addrs(false), rec.http.as_slice());
    assert_eq!(hub.addrs(true), rec.https.as_slice());
    assert_eq!(t.is_empty(), rec.hosts.is_empty());
    for h in &rec.hosts {
        let n = DomainName::parse(h).expect("decoded host parses");
        let found = t.lookup(&n);
        assert_eq!(found.len(), 1, "host {h}");
        assert_eq!(
            found.first().map(|p| p.name.as_str()),
            Some(rec.name.as_str())
        );
        // The name as a client may write it (SNI, Host) finds the same hub.
        let upper = DomainName::parse(&format!("{}.", h.to_ascii_uppercase()))
            .expect("upper-case form parses");
        assert_eq!(t.lookup(&upper).len(), 1, "host {h} in upper case");
    }
    let other = DomainName::parse("not-listed.mesh.invalid").expect("literal");
    assert_eq!(
        t.lookup(&other).is_empty(),
        !rec.hosts.iter().any(|h| h == other.as_str())
    );
    for a in rec.http.iter().chain(&rec.https) {
        let ip = a.ip();
        assert!(t.trusts(ip), "listed address {a} not trusted");
        let plain = ip.to_canonical();
        assert!(t.trusts(plain), "listed address {a} not trusted as {plain}");
        if let IpAddr::V4(v4) = plain {
            let mapped = IpAddr::V6(v4.to_ipv6_mapped());
            assert!(
                t.trusts(mapped),
                "listed address {a} not trusted as {mapped}"
            );
        }
    }
    for p in probes(rec) {
        assert_eq!(t.trusts(p), listed.contains(&p.to_canonical()), "probe {p}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&k, bytes)) = data.split_first() else {
        return;
    };
    let key = KEYS
        .get(usize::from(k) % KEYS.len())
        .copied()
        .unwrap_or("hub-a");
    let rec = match decode_record(key, bytes) {
        Ok(r) => r,
        Err(RecordError::TooLarge(n)) => {
            assert_eq!(n, bytes.len());
            return;
        }
        Err(_) => return,
    };
    // What a decoded record is.
    assert_eq!(rec.v, RECORD_VERSION);
    assert_eq!(rec.name, key);
    assert!(rec.http.len() <= MAX_ADDRS && rec.https.len() <= MAX_ADDRS);
    assert!(rec.hosts.len() <= MAX_HOSTS);
    assert!(rec.dns.len() <= MAX_ADDRS);
    for (i, a) in rec.dns.iter().enumerate() {
        assert_eq!(*a, a.to_canonical());
        assert!(
            gatewire::proxy::settings::forbidden_reason(*a).is_none(),
            "{a}"
        );
        assert!(
            !rec.dns.get(..i).unwrap_or_default().contains(a),
            "{a} twice"
        );
    }
    if key != OWN {
        assert_eq!(Table::build(OWN, [&rec]).dns_addrs(), rec.dns);
    }
    for a in rec.http.iter().chain(&rec.https) {
        assert_ne!(a.port(), 0, "{a}");
        // Unicast, also behind an IPv4-mapped form: no address a hub could
        // not be, so none the table would wrongly trust.
        let ip = a.ip().to_canonical();
        assert!(
            !ip.is_unspecified() && !ip.is_multicast() && !ip.is_loopback(),
            "{a}"
        );
        assert_ne!(
            ip,
            std::net::IpAddr::V4(std::net::Ipv4Addr::BROADCAST),
            "{a}"
        );
    }
    for h in &rec.hosts {
        let n = DomainName::parse(h).expect("decoded host parses");
        assert_eq!(n.as_str(), h, "decoded host not normalised");
    }
    assert!(
        rec.hosts.windows(2).all(|w| w.first() < w.get(1)),
        "hosts not sorted or repeated"
    );
    // Encoding round trip.
    let again = decode_record(key, &rec.encode());
    assert_eq!(again.as_ref(), Ok(&rec), "re-encoded record differs");
    // The same bytes under another key.
    let other = if key == "hub-a" { "hub-b" } else { "hub-a" };
    assert_eq!(
        decode_record(other, bytes),
        Err(RecordError::KeyMismatch {
            name: key.to_string(),
            key: other.to_string(),
        })
    );
    check_table(&rec);
});
