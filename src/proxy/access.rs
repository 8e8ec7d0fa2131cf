//! Client address rules of a route or forward: `allow` and `deny` lists of
//! networks.
//!
//! Pure: no I/O. The most specific network that contains the client's address
//! decides (so `allow = ["10.0.0.0/8"]` with `deny = ["10.9.0.0/16"]` admits
//! 10.1.2.3 and refuses 10.9.2.3, and `deny = ["0.0.0.0/0", "::/0"]` with
//! `allow = ["192.0.2.7"]` admits only that one address). An address no rule
//! contains is admitted when `allow` is empty and refused otherwise. IPv4
//! clients that reach a dual-stack listener (`::ffff:a.b.c.d`) are matched as
//! IPv4. A lookup costs one hash probe per distinct prefix length in the lists
//! (the table behind WireGuard's allowed IPs).

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use crate::wg::allowed_ips::AllowedIps;
use ipnet::IpNet;
use std::fmt;
use std::net::IpAddr;

/// Most networks in one route's lists together.
pub const MAX_RULES: usize = 100_000;

/// The `allow` and `deny` rules of one route or forward.
#[derive(Clone, Default)]
pub struct Access {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    table: AllowedIps<bool>,
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Access")
            .field("allow", &self.allow)
            .field("deny", &self.deny)
            .finish()
    }
}

impl PartialEq for Access {
    fn eq(&self, other: &Self) -> bool {
        self.allow == other.allow && self.deny == other.deny
    }
}

impl Eq for Access {}

/// One network of an `allow` or `deny` list: a CIDR network or a single
/// address. A network with host bits set is refused (it is most often a typo
/// for the address or for the network, and the two mean different things).
fn network(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip.to_canonical()));
    }
    let net: IpNet = s
        .parse()
        .map_err(|_| format!("`{s}` is not an address or a network (a.b.c.d/n, x::/n)"))?;
    if net.trunc() != net {
        return Err(format!(
            "`{s}` has bits set after the prefix: write `{}` for the network, or the address alone",
            net.trunc()
        ));
    }
    // `::ffff:a.b.c.d/n` (n >= 96) means the IPv4 network; clients are matched as IPv4.
    if let IpNet::V6(v6) = net {
        if let (Some(v4), true) = (v6.addr().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            if let Ok(n) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96) {
                return Ok(IpNet::V4(n));
            }
        }
    }
    Ok(net)
}

impl Access {
    /// Parses the `allow` and `deny` lists; errors name the entry.
    pub fn parse(allow: &[String], deny: &[String]) -> Result<Access, String> {
        if allow.len() + deny.len() > MAX_RULES {
            return Err(format!(
                "allow and deny: at most {MAX_RULES} networks together"
            ));
        }
        let mut a = Access::default();
        for (list, admit) in [(allow, true), (deny, false)] {
            for s in list {
                let net = network(s)
                    .map_err(|e| format!("{}: {e}", if admit { "allow" } else { "deny" }))?;
                match a.table.insert(net, admit) {
                    None => {}
                    Some(prev) if prev == admit => {
                        return Err(format!(
                            "{}: `{net}` is listed twice",
                            if admit { "allow" } else { "deny" }
                        ))
                    }
                    Some(_) => return Err(format!("`{net}` is in both allow and deny")),
                }
                if admit {
                    a.allow.push(net);
                } else {
                    a.deny.push(net);
                }
            }
        }
        Ok(a)
    }

    /// True if there are no rules: every client is admitted.
    pub fn is_open(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Whether a client at `ip` may use the route.
    pub fn permits(&self, ip: IpAddr) -> bool {
        if self.is_open() {
            return true;
        }
        match self.table.lookup(ip.to_canonical()) {
            Some(admit) => *admit,
            None => self.allow.is_empty(),
        }
    }

    /// The lists as sorted strings in canonical form (`192.0.2.7/32`), so
    /// that two spellings of the same rules compare equal.
    pub fn canonical(&self) -> (Vec<String>, Vec<String>) {
        let s = |l: &[IpNet]| {
            let mut v: Vec<IpNet> = l.to_vec();
            v.sort_unstable();
            v.iter().map(|n| n.to_string()).collect()
        };
        (s(&self.allow), s(&self.deny))
    }

    /// The `allow` networks, as parsed.
    pub fn allow(&self) -> &[IpNet] {
        &self.allow
    }

    /// The `deny` networks, as parsed.
    pub fn deny(&self) -> &[IpNet] {
        &self.deny
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn acc(allow: &[&str], deny: &[&str]) -> Access {
        let s = |l: &[&str]| l.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        Access::parse(&s(allow), &s(deny)).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn no_rules_admit_everyone() {
        let a = acc(&[], &[]);
        assert!(a.is_open());
        assert!(a.permits(ip("192.0.2.1")));
        assert!(a.permits(ip("2001:db8::1")));
    }

    #[test]
    fn allow_list_admits_only_its_networks() {
        let a = acc(&["192.0.2.0/24", "2001:db8:1::/48", "198.51.100.7"], &[]);
        assert!(a.permits(ip("192.0.2.200")));
        assert!(a.permits(ip("198.51.100.7")));
        assert!(a.permits(ip("2001:db8:1:2::3")));
        assert!(!a.permits(ip("198.51.100.8")));
        assert!(!a.permits(ip("192.0.3.1")));
        assert!(!a.permits(ip("2001:db8:2::1")));
        // A dual-stack listener sees IPv4 clients as mapped addresses.
        assert!(a.permits(ip("::ffff:192.0.2.9")));
        assert!(!a.permits(ip("::ffff:192.0.3.9")));
    }

    #[test]
    fn deny_list_refuses_only_its_networks() {
        let a = acc(&[], &["203.0.113.0/24"]);
        assert!(!a.permits(ip("203.0.113.9")));
        assert!(!a.permits(ip("::ffff:203.0.113.9")));
        assert!(a.permits(ip("203.0.114.9")));
        assert!(a.permits(ip("2001:db8::1")));
    }

    #[test]
    fn most_specific_rule_wins() {
        let a = acc(&["10.0.0.0/8"], &["10.9.0.0/16"]);
        assert!(a.permits(ip("10.1.2.3")));
        assert!(!a.permits(ip("10.9.2.3")));
        assert!(!a.permits(ip("11.0.0.1")));
        let b = acc(&["192.0.2.7", "2001:db8::7"], &["0.0.0.0/0", "::/0"]);
        assert!(b.permits(ip("192.0.2.7")));
        assert!(b.permits(ip("2001:db8::7")));
        assert!(!b.permits(ip("192.0.2.8")));
        assert!(!b.permits(ip("2001:db8::8")));
        let c = acc(&["10.9.1.0/24"], &["10.9.0.0/16"]);
        assert!(c.permits(ip("10.9.1.1")));
        assert!(!c.permits(ip("10.9.2.1")));
    }

    #[test]
    fn mapped_networks_are_ipv4() {
        let a = acc(&["::ffff:192.0.2.0/120"], &[]);
        assert_eq!(a.allow(), &["192.0.2.0/24".parse::<IpNet>().unwrap()]);
        assert!(a.permits(ip("192.0.2.1")));
        let b = acc(&["::ffff:192.0.2.1"], &[]);
        assert_eq!(b.allow(), &["192.0.2.1/32".parse::<IpNet>().unwrap()]);
    }

    #[test]
    fn bad_rules_are_named() {
        let e = |allow: &[&str], deny: &[&str]| {
            let s = |l: &[&str]| l.iter().map(|x| x.to_string()).collect::<Vec<_>>();
            Access::parse(&s(allow), &s(deny)).unwrap_err()
        };
        let m = e(&["10.0.0.1/8"], &[]);
        assert!(m.contains("allow") && m.contains("`10.0.0.0/8`"), "{m}");
        let m = e(&[], &["example.org"]);
        assert!(m.starts_with("deny: `example.org`"), "{m}");
        let m = e(&["10.0.0.0/33"], &[]);
        assert!(m.contains("10.0.0.0/33"), "{m}");
        let m = e(&["10.0.0.0/8"], &["10.0.0.0/8"]);
        assert!(m.contains("both"), "{m}");
        let m = e(&["10.0.0.0/8", "10.0.0.0/8"], &[]);
        assert!(m.contains("twice"), "{m}");
        let m = e(&["192.0.2.1"], &["::ffff:192.0.2.1"]);
        assert!(m.contains("both"), "{m}");
    }

    #[test]
    fn canonical_lists_are_sorted_and_spelled_alike() {
        let a = acc(
            &["198.51.100.7", "::ffff:192.0.2.0/120", "2001:DB8::/32"],
            &["192.0.2.9"],
        );
        let (allow, deny) = a.canonical();
        assert_eq!(allow, ["192.0.2.0/24", "198.51.100.7/32", "2001:db8::/32"]);
        assert_eq!(deny, ["192.0.2.9/32"]);
        let b = Access::parse(&allow, &deny).unwrap();
        assert_eq!(b.canonical(), (allow, deny));
    }

    #[test]
    fn debug_and_equality_show_the_lists() {
        let a = acc(&["192.0.2.0/24"], &["192.0.2.9"]);
        let d = format!("{a:?}");
        assert!(
            d.contains("192.0.2.0/24") && d.contains("192.0.2.9/32"),
            "{d}"
        );
        assert_eq!(a, acc(&["192.0.2.0/24"], &["192.0.2.9"]));
        assert_ne!(a, acc(&["192.0.2.0/24"], &[]));
    }

    /// The reference: the longest matching network by a linear scan.
    fn model(rules: &[(IpNet, bool)], ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        rules
            .iter()
            .filter(|(n, _)| n.contains(&ip))
            .max_by_key(|(n, _)| n.prefix_len())
            .map_or(!rules.iter().any(|(_, a)| *a), |(_, a)| *a)
    }

    proptest! {
        #[test]
        fn agrees_with_a_linear_scan(
            nets in proptest::collection::vec((any::<u32>(), 0u8..=32, any::<bool>()), 0..12),
            probes in proptest::collection::vec(any::<u32>(), 1..32),
        ) {
            let mut seen = std::collections::HashSet::new();
            let mut rules = Vec::new();
            for (a, len, admit) in nets {
                let n = IpNet::V4(ipnet::Ipv4Net::new(a.into(), len).unwrap().trunc());
                if seen.insert(n) {
                    rules.push((n, admit));
                }
            }
            let allow: Vec<String> = rules.iter().filter(|r| r.1).map(|r| r.0.to_string()).collect();
            let deny: Vec<String> = rules.iter().filter(|r| !r.1).map(|r| r.0.to_string()).collect();
            let a = Access::parse(&allow, &deny).unwrap();
            for p in probes {
                // Probe inside the rules' networks too, not only at random.
                let inside = rules.get(p as usize % rules.len().max(1)).map(|(n, _)| match n {
                    IpNet::V4(n) => u32::from(n.addr()) | (p & !u32::from(n.netmask())),
                    IpNet::V6(_) => p,
                });
                for x in [p, inside.unwrap_or(p)] {
                    let v4 = IpAddr::V4(x.into());
                    prop_assert_eq!(a.permits(v4), model(&rules, v4));
                    let mapped = IpAddr::V6(std::net::Ipv4Addr::from(x).to_ipv6_mapped());
                    prop_assert_eq!(a.permits(mapped), model(&rules, v4));
                }
            }
        }
    }
}
