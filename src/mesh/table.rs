//! The mesh's pure core: what one hub publishes about itself (a [`HubRecord`]),
//! how a record read back from the store is checked ([`decode_record`]), and the
//! [`Table`] a hub builds from every other hub's record: which hubs serve a
//! host, and which addresses may send this hub connections that start with a
//! PROXY header. No I/O, no clock.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use crate::proxy::names::DomainName;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// The record format this code writes and reads.
pub const RECORD_VERSION: u32 = 1;
/// Longest record accepted (etcd's default request limit is 1.5 MiB).
pub const MAX_RECORD_BYTES: usize = 2 * 1024 * 1024;
/// Most addresses a record may list per listener kind.
pub const MAX_ADDRS: usize = 16;
/// Most hosts a record may list.
pub const MAX_HOSTS: usize = 65_536;

/// What a hub tells the others: its name, where to send it the connections of
/// the hosts it serves (its plain HTTP and its TLS listeners), and those hosts.
///
/// Fields this version does not know are ignored (a newer hub's record
/// still routes here); those it knows are checked ([`decode_record`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubRecord {
    /// Always [`RECORD_VERSION`].
    pub v: u32,
    /// The hub's mesh name (`[mesh] name`), unique in the mesh.
    pub name: String,
    /// Its plain HTTP listeners, reachable by the other hubs.
    #[serde(default)]
    pub http: Vec<SocketAddr>,
    /// Its TLS listeners (terminated and passthrough routes alike).
    #[serde(default)]
    pub https: Vec<SocketAddr>,
    /// The hosts of its own routes (never the ones it reaches through the mesh).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Its public addresses, when it is a name server of the gateway zones
    /// (`[proxy.dns] addresses`): the other hubs name it too. Left out when
    /// empty, so a hub without `[proxy.dns]` writes what older hubs read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<IpAddr>,
    /// The addresses it connects to the other hubs from (`[mesh]
    /// advertise`, also those no listener takes): the other hubs take
    /// PROXY headers from them as from its listeners' addresses. Left out
    /// when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<IpAddr>,
    /// The version of acknowledgements it answers ([`super::ack`]), when it
    /// answers them: 0 (a hub of an older release writes none) is asked for
    /// none, and its connections count as taken once the header is written.
    #[serde(default)]
    pub ack: u8,
}

impl HubRecord {
    /// The record of this hub: each advertised address with the port of a
    /// listener (of `http` or `https`, the bound addresses) that takes
    /// connections to it, one bound to that address or to the unspecified
    /// address of its family (IPv6 listeners are IPv6-only); an address no
    /// listener takes is left out. The hosts are sorted and without repeats.
    pub fn local(
        name: &str,
        advertise: &[IpAddr],
        http: &[SocketAddr],
        https: &[SocketAddr],
        hosts: impl IntoIterator<Item = String>,
    ) -> HubRecord {
        let with = |listeners: &[SocketAddr]| -> Vec<SocketAddr> {
            advertise
                .iter()
                .filter_map(|ip| {
                    listeners
                        .iter()
                        .find(|l| {
                            l.ip() == *ip
                                || (l.ip().is_unspecified() && l.is_ipv4() == ip.is_ipv4())
                        })
                        .map(|l| SocketAddr::new(*ip, l.port()))
                })
                .collect()
        };
        let mut hosts: Vec<String> = hosts.into_iter().collect();
        hosts.sort();
        hosts.dedup();
        let mut from: Vec<IpAddr> = Vec::with_capacity(advertise.len());
        for ip in advertise.iter().map(|ip| ip.to_canonical()) {
            if !from.contains(&ip) && from.len() < MAX_ADDRS {
                from.push(ip);
            }
        }
        HubRecord {
            v: RECORD_VERSION,
            name: name.to_string(),
            http: with(http),
            https: with(https),
            hosts,
            dns: Vec::new(),
            from,
            ack: super::ack::VERSION,
        }
    }

    /// The record with `dns`, the hub's public addresses in the zones it
    /// answers (`[proxy.dns] addresses`).
    pub fn with_dns(mut self, dns: &[IpAddr]) -> HubRecord {
        self.dns = dns.to_vec();
        self
    }

    /// The record as stored.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Why a stored record was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record of {0} bytes is larger than {MAX_RECORD_BYTES}")]
    TooLarge(usize),
    #[error("not a hub record: {0}")]
    Json(String),
    #[error("record version {0} is not {RECORD_VERSION}")]
    Version(u32),
    #[error("hub name `{0}` is not 1-63 of a-z, 0-9, `-`, `_`, `.`")]
    Name(String),
    #[error("record of `{name}` is stored under another key (`{key}`)")]
    KeyMismatch { name: String, key: String },
    #[error("too many addresses or hosts")]
    TooMany,
    #[error("address {0} is not a unicast address with a port")]
    Address(SocketAddr),
    #[error("public address {0} is not one the internet reaches")]
    DnsAddress(IpAddr),
    #[error("source address {0} is not a unicast address")]
    Source(IpAddr),
    #[error("host `{0}` is not a DNS name")]
    Host(String),
}

/// Whether another hub may be reached at (or connect from) `ip`: not
/// unspecified, multicast, loopback or broadcast.
fn unicast(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    !(ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() || broadcast)
}

/// Whether `s` may name a hub (it is also the last part of its store key).
pub fn valid_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && s != "."
        && s != ".."
}

/// Checks a record read from the store under the key whose last part is
/// `key_name`. Every address must be a unicast address with a port, every
/// host a DNS name (normalised here).
pub fn decode_record(key_name: &str, bytes: &[u8]) -> Result<HubRecord, RecordError> {
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(RecordError::TooLarge(bytes.len()));
    }
    let mut r: HubRecord =
        serde_json::from_slice(bytes).map_err(|e| RecordError::Json(e.to_string()))?;
    if r.v != RECORD_VERSION {
        return Err(RecordError::Version(r.v));
    }
    if !valid_name(&r.name) {
        return Err(RecordError::Name(r.name));
    }
    if r.name != key_name {
        return Err(RecordError::KeyMismatch {
            name: r.name,
            key: key_name.to_string(),
        });
    }
    if r.http.len() > MAX_ADDRS
        || r.https.len() > MAX_ADDRS
        || r.dns.len() > MAX_ADDRS
        || r.from.len() > MAX_ADDRS
        || r.hosts.len() > MAX_HOSTS
    {
        return Err(RecordError::TooMany);
    }
    for a in &mut r.dns {
        *a = a.to_canonical();
        if crate::proxy::settings::forbidden_reason(*a).is_some() {
            return Err(RecordError::DnsAddress(*a));
        }
    }
    let mut seen = Vec::with_capacity(r.dns.len());
    r.dns.retain(|a| {
        let new = !seen.contains(a);
        seen.push(*a);
        new
    });
    for a in r.http.iter().chain(&r.https) {
        if a.port() == 0 || !unicast(a.ip()) {
            return Err(RecordError::Address(*a));
        }
    }
    for a in &mut r.from {
        *a = a.to_canonical();
        if !unicast(*a) {
            return Err(RecordError::Source(*a));
        }
    }
    r.from.dedup();
    let mut hosts = Vec::with_capacity(r.hosts.len());
    for h in &r.hosts {
        let n = DomainName::parse(h).map_err(|_| RecordError::Host(h.clone()))?;
        hosts.push(n.as_str().to_string());
    }
    hosts.sort();
    hosts.dedup();
    r.hosts = hosts;
    Ok(r)
}

/// Another hub, as this one sends it connections.
#[derive(Debug, PartialEq, Eq)]
pub struct PeerHub {
    pub name: String,
    pub http: Vec<SocketAddr>,
    pub https: Vec<SocketAddr>,
    /// How many hosts it serves.
    pub hosts: usize,
    /// It answers whether it takes a connection ([`super::ack`]).
    pub ack: bool,
}

impl PeerHub {
    /// Where to send a connection: its TLS or its plain HTTP listeners.
    pub fn addrs(&self, tls: bool) -> &[SocketAddr] {
        if tls {
            &self.https
        } else {
            &self.http
        }
    }
}

/// Who serves what, built from the other hubs' records.
#[derive(Debug, Default)]
pub struct Table {
    hosts: HashMap<String, Vec<Arc<PeerHub>>>,
    /// Every proper ancestor of a host in `hosts` (but the root).
    parents: std::collections::HashSet<String>,
    hubs: Vec<Arc<PeerHub>>,
    trusted: Vec<IpAddr>,
    dns: Vec<IpAddr>,
}

impl Table {
    /// The table from `records`, leaving out the one named `own` (this hub).
    /// A host served by several hubs lists them by name, so every hub tries
    /// them in the same order after its own starting point.
    pub fn build<'a>(own: &str, records: impl IntoIterator<Item = &'a HubRecord>) -> Table {
        let mut recs: Vec<&HubRecord> = records.into_iter().filter(|r| r.name != own).collect();
        recs.sort_by(|a, b| a.name.cmp(&b.name));
        recs.dedup_by(|a, b| a.name == b.name);
        let mut t = Table::default();
        for r in recs {
            let hub = Arc::new(PeerHub {
                name: r.name.clone(),
                http: r.http.clone(),
                https: r.https.clone(),
                hosts: r.hosts.len(),
                // (A newer version's hub answers this one's too.)
                ack: r.ack >= super::ack::VERSION,
            });
            let listeners = r.http.iter().chain(&r.https).map(|a| a.ip());
            for ip in listeners.chain(r.from.iter().copied()) {
                let ip = ip.to_canonical();
                if !t.trusted.contains(&ip) {
                    t.trusted.push(ip);
                }
            }
            for h in &r.hosts {
                t.hosts.entry(h.clone()).or_default().push(hub.clone());
                let mut rest = h.as_str();
                while let Some((_, tail)) = rest.split_once('.') {
                    if !t.parents.insert(tail.to_owned()) {
                        break;
                    }
                    rest = tail;
                }
            }
            for a in &r.dns {
                if !t.dns.contains(a) {
                    t.dns.push(*a);
                }
            }
            t.hubs.push(hub);
        }
        t
    }

    /// The hubs that serve `host`, by name; empty when none does.
    pub fn lookup(&self, host: &DomainName) -> &[Arc<PeerHub>] {
        self.hosts.get(host.as_str()).map_or(&[], |v| v.as_slice())
    }

    /// Whether another hub serves a name strictly below `name` (lowercase,
    /// no trailing dot): `name` then exists in DNS terms (an empty
    /// non-terminal) even when no hub serves it.
    pub fn has_below(&self, name: &str) -> bool {
        self.parents.contains(name)
    }

    /// Whether a connection from `ip` comes from another hub of the mesh
    /// (and so starts with a PROXY header naming the real client).
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.contains(&ip.to_canonical())
    }

    /// The public addresses of the other hubs that are name servers of the
    /// gateway zones, by hub name, each once.
    pub fn dns_addrs(&self) -> &[IpAddr] {
        &self.dns
    }

    /// The other hubs, by name.
    pub fn hubs(&self) -> &[Arc<PeerHub>] {
        &self.hubs
    }

    /// True when no other hub serves anything.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn wildcard(port: u16) -> Vec<SocketAddr> {
        vec![
            SocketAddr::new("0.0.0.0".parse().unwrap(), port),
            SocketAddr::new("::".parse().unwrap(), port),
        ]
    }

    fn rec(name: &str, ip: &str, hosts: &[&str]) -> HubRecord {
        HubRecord::local(
            name,
            &[ip.parse().unwrap()],
            &wildcard(80),
            &wildcard(443),
            hosts.iter().map(|s| s.to_string()),
        )
    }

    #[test]
    fn names_above_served_hosts_exist() {
        let a = rec("a", "198.51.100.1", &["x.y.shop.example", "blog.gw.test"]);
        let b = rec("b", "198.51.100.2", &["z.y.shop.example"]);
        let me = rec("me", "198.51.100.3", &["deep.own.example"]);
        let t = Table::build("me", [&a, &b, &me]);
        for name in [
            "y.shop.example",
            "shop.example",
            "example",
            "gw.test",
            "test",
        ] {
            assert!(t.has_below(name), "{name}");
        }
        // Not the hosts themselves, not siblings, not this hub's own names.
        for name in [
            "x.y.shop.example",
            "q.shop.example",
            "blog.gw.test",
            "own.example",
            "",
        ] {
            assert!(!t.has_below(name), "{name}");
        }
    }

    #[test]
    fn a_hub_is_trusted_from_every_advertised_address() {
        // IPv4 listeners only: the IPv6 address takes no connections, but
        // the hub connects from it to the others' IPv6 listeners.
        let http: Vec<SocketAddr> = vec!["0.0.0.0:80".parse().unwrap()];
        let v4: IpAddr = "198.51.100.1".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let a = HubRecord::local("a", &[v4, v6], &http, &[], []);
        assert_eq!(a.http, vec![SocketAddr::new(v4, 80)]);
        assert_eq!(a.from, vec![v4, v6]);
        let back = decode_record("a", &a.encode()).unwrap();
        assert_eq!(back, a);
        let t = Table::build("me", [&back]);
        assert!(t.trusts(v4) && t.trusts(v6));
        assert!(!t.trusts("2001:db8::2".parse().unwrap()));
        // A record without the field (an older hub's) trusts its listeners.
        let old = decode_record("a", br#"{"v":1,"name":"a","http":["198.51.100.1:80"]}"#).unwrap();
        assert!(old.from.is_empty());
        assert!(Table::build("me", [&old]).trusts(v4));
        // Such a hub answers no acknowledgements; this release's does.
        assert_eq!(old.ack, 0);
        assert!(!Table::build("me", [&old]).hubs()[0].ack);
        assert_eq!(a.ack, super::super::ack::VERSION);
        assert!(String::from_utf8(a.encode()).unwrap().contains("\"ack\":1"));
        assert!(Table::build("me", [&back]).hubs()[0].ack);
        for bad in ["127.0.0.1", "::", "ff02::1", "255.255.255.255"] {
            let json = format!(r#"{{"v":1,"name":"a","from":["{bad}"]}}"#);
            assert!(
                matches!(
                    decode_record("a", json.as_bytes()),
                    Err(RecordError::Source(_))
                ),
                "{bad}"
            );
        }
        let many: Vec<String> = (1..=MAX_ADDRS + 1)
            .map(|i| format!("\"198.51.100.{i}\""))
            .collect();
        let json = format!(r#"{{"v":1,"name":"a","from":[{}]}}"#, many.join(","));
        assert_eq!(
            decode_record("a", json.as_bytes()),
            Err(RecordError::TooMany)
        );
    }

    #[test]
    fn public_dns_addresses_travel_in_the_record() {
        let http: Vec<SocketAddr> = vec!["0.0.0.0:80".parse().unwrap()];
        let adv: Vec<IpAddr> = vec!["198.51.100.1".parse().unwrap()];
        // Without [proxy.dns] the record is what older hubs read.
        let plain = HubRecord::local("a", &adv, &http, &[], ["x.gw.test".into()]);
        assert!(!String::from_utf8(plain.encode()).unwrap().contains("dns"));
        let pubs: Vec<IpAddr> = vec![
            "203.0.113.10".parse().unwrap(),
            "2001:db8::10".parse().unwrap(),
        ];
        let r = plain.clone().with_dns(&pubs);
        let back = decode_record("a", &r.encode()).unwrap();
        assert_eq!(back.dns, pubs);
        let other = HubRecord::local("b", &["198.51.100.2".parse().unwrap()], &http, &[], [])
            .with_dns(&[
                "192.0.2.20".parse().unwrap(),
                "203.0.113.10".parse().unwrap(),
            ]);
        let t = Table::build("me", [&back, &other, &plain]);
        // By hub name, each once; hubs without [proxy.dns] add nothing.
        assert_eq!(
            t.dns_addrs(),
            ["203.0.113.10", "2001:db8::10", "192.0.2.20"].map(|a| a.parse::<IpAddr>().unwrap())
        );
        assert!(Table::build("me", [&plain]).dns_addrs().is_empty());
        // Addresses the internet does not reach are refused; mapped ones and
        // repeats normalised.
        for bad in [
            "127.0.0.1",
            "0.0.0.0",
            "fe80::1",
            "ff02::1",
            "255.255.255.255",
        ] {
            let json = format!(r#"{{"v":1,"name":"a","dns":["{bad}"]}}"#);
            assert!(
                matches!(
                    decode_record("a", json.as_bytes()),
                    Err(RecordError::DnsAddress(_))
                ),
                "{bad}"
            );
        }
        let json = r#"{"v":1,"name":"a","dns":["::ffff:192.0.2.1","192.0.2.1"]}"#;
        assert_eq!(
            decode_record("a", json.as_bytes()).unwrap().dns,
            vec!["192.0.2.1".parse::<IpAddr>().unwrap()]
        );
        let many: Vec<String> = (1..=MAX_ADDRS + 1)
            .map(|i| format!("\"192.0.2.{i}\""))
            .collect();
        let json = format!(r#"{{"v":1,"name":"a","dns":[{}]}}"#, many.join(","));
        assert_eq!(
            decode_record("a", json.as_bytes()),
            Err(RecordError::TooMany)
        );
    }

    #[test]
    fn advertised_addresses_take_the_port_of_a_listener_that_accepts_them() {
        let adv: Vec<IpAddr> = vec![
            "198.51.100.1".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
            "198.51.100.2".parse().unwrap(),
        ];
        // IPv4 only, one on a specific address; TLS on both families.
        let http = vec![
            "198.51.100.2:8080".parse().unwrap(),
            "0.0.0.0:80".parse().unwrap(),
        ];
        let https = wildcard(443);
        let r = HubRecord::local("h", &adv, &http, &https, []);
        let want: Vec<SocketAddr> = vec![
            "198.51.100.1:80".parse().unwrap(),
            "198.51.100.2:8080".parse().unwrap(),
        ];
        assert_eq!(r.http, want);
        assert_eq!(r.https.len(), 3);
        assert!(r.https.contains(&"[2001:db8::1]:443".parse().unwrap()));
        // No listener: no address.
        assert!(HubRecord::local("h", &adv, &[], &https, []).http.is_empty());
    }

    #[test]
    fn a_record_survives_encoding() {
        let r = rec(
            "hub-a",
            "198.51.100.1",
            &["b.gw.test", "a.gw.test", "a.gw.test"],
        );
        assert_eq!(r.hosts, vec!["a.gw.test", "b.gw.test"]);
        let back = decode_record("hub-a", &r.encode()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.https, vec!["198.51.100.1:443".parse().unwrap()]);
    }

    #[test]
    fn hosts_are_normalised_and_bad_ones_refuse_the_record() {
        let raw = br#"{"v":1,"name":"h","hosts":["Blog.GW.test.","blog.gw.test"]}"#;
        assert_eq!(decode_record("h", raw).unwrap().hosts, vec!["blog.gw.test"]);
        let raw = br#"{"v":1,"name":"h","hosts":["bad host"]}"#;
        assert_eq!(
            decode_record("h", raw),
            Err(RecordError::Host("bad host".into()))
        );
    }

    #[test]
    fn bad_records_are_refused_with_the_reason() {
        assert!(matches!(
            decode_record("h", b"{"),
            Err(RecordError::Json(_))
        ));
        assert_eq!(
            decode_record("h", br#"{"v":2,"name":"h"}"#),
            Err(RecordError::Version(2))
        );
        assert_eq!(
            decode_record("h", br#"{"v":1,"name":"H"}"#),
            Err(RecordError::Name("H".into()))
        );
        assert!(matches!(
            decode_record("other", br#"{"v":1,"name":"h"}"#),
            Err(RecordError::KeyMismatch { .. })
        ));
        assert_eq!(
            decode_record("h", br#"{"v":1,"name":"h","http":["0.0.0.0:80"]}"#),
            Err(RecordError::Address("0.0.0.0:80".parse().unwrap()))
        );
        assert_eq!(
            decode_record("h", br#"{"v":1,"name":"h","https":["192.0.2.1:0"]}"#),
            Err(RecordError::Address("192.0.2.1:0".parse().unwrap()))
        );
        for bad in [
            "[::ffff:0.0.0.0]:80",
            "127.0.0.1:80",
            "[::1]:80",
            "[::ffff:127.0.0.1]:80",
            "255.255.255.255:80",
            "224.0.0.1:80",
        ] {
            let raw = format!(r#"{{"v":1,"name":"h","http":["{bad}"]}}"#);
            assert!(
                matches!(
                    decode_record("h", raw.as_bytes()),
                    Err(RecordError::Address(_))
                ),
                "{bad}"
            );
        }
        // A field a later version adds is ignored, not a reason to drop
        // the hub.
        let r = decode_record(
            "h",
            br#"{"v":1,"name":"h","hosts":["a.gw.test"],"extra":1}"#,
        )
        .unwrap();
        assert_eq!(r.hosts, ["a.gw.test"]);
        assert!(matches!(
            decode_record("h", br#"{"v":1,"name":"h","hosts":"a.gw.test"}"#),
            Err(RecordError::Json(_))
        ));
        let big = vec![b' '; MAX_RECORD_BYTES + 1];
        assert_eq!(
            decode_record("h", &big),
            Err(RecordError::TooLarge(MAX_RECORD_BYTES + 1))
        );
    }

    #[test]
    fn names() {
        for ok in ["hub-a", "a", "eu1.gw_2"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "Hub", "a/b", "..", ".", "a b", &"x".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_table_leaves_out_this_hub_and_orders_by_name() {
        let a = rec("hub-a", "198.51.100.1", &["a.gw.test", "shared.gw.test"]);
        let c = rec("hub-c", "198.51.100.3", &["shared.gw.test"]);
        let b = rec("hub-b", "198.51.100.2", &["shared.gw.test", "b.gw.test"]);
        let t = Table::build("hub-a", [&a, &c, &b]);
        let names = |h: &str| -> Vec<String> {
            t.lookup(&DomainName::parse(h).unwrap())
                .iter()
                .map(|p| p.name.clone())
                .collect()
        };
        assert_eq!(names("shared.gw.test"), vec!["hub-b", "hub-c"]);
        assert_eq!(names("b.gw.test"), vec!["hub-b"]);
        // Its own hosts are not reached through the mesh.
        assert!(names("a.gw.test").is_empty());
        assert!(names("nowhere.gw.test").is_empty());
        assert!(t.trusts("198.51.100.2".parse().unwrap()));
        assert!(t.trusts("::ffff:198.51.100.3".parse().unwrap()));
        assert!(!t.trusts("198.51.100.1".parse().unwrap()));
        assert_eq!(t.hubs().len(), 2);
        assert!(!t.is_empty());
        assert!(Table::build("hub-a", [&a]).is_empty());
    }

    #[test]
    fn a_hub_without_http_listener_has_no_http_addresses() {
        let r = HubRecord::local(
            "h",
            &["2001:db8::1".parse().unwrap()],
            &[],
            &["[::]:8443".parse().unwrap()],
            [],
        );
        let t = Table::build("x", [&r]);
        let hub = &t.hubs()[0];
        assert!(hub.addrs(false).is_empty());
        assert_eq!(hub.addrs(true), &["[2001:db8::1]:8443".parse().unwrap()]);
    }

    proptest! {
        #[test]
        fn decode_never_panics(name in "[a-z]{1,8}", bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_record(&name, &bytes);
        }

        #[test]
        fn every_listed_host_is_found(hosts in proptest::collection::vec("[a-z]{1,10}\\.gw\\.test", 0..20)) {
            let r = rec("hub-b", "192.0.2.2", &hosts.iter().map(|s| s.as_str()).collect::<Vec<_>>());
            let back = decode_record("hub-b", &r.encode()).unwrap();
            let t = Table::build("hub-a", [&back]);
            for h in &hosts {
                let found = t.lookup(&DomainName::parse(h).unwrap());
                prop_assert_eq!(found.len(), 1);
                prop_assert_eq!(&found[0].name, "hub-b");
            }
        }
    }
}
