//! The hub's `[xlat]` configuration section: raw TOML structs and their
//! validation into a translator [`Config`], optional NAT64 settings and the
//! routes the hub puts on its TUN. Errors name the offending key.
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use super::nat64;
use super::{Config, Eam, Pool6};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// RFC 7600's IPv4 dummy address: the default source of the translator's
/// own ICMPv4 errors without NAT64 (Linux uses it too, for ICMP errors from
/// an interface without an IPv4 address).
pub const IPV4_DUMMY: Ipv4Addr = Ipv4Addr::new(192, 0, 0, 8);

/// `[xlat]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawXlat {
    pool6: Option<String>,
    wkp_strict: Option<bool>,
    #[serde(default)]
    eam: Vec<RawEam>,
    rfc6791_ipv4: Option<String>,
    rfc6791_ipv6: Option<String>,
    self_ipv4: Option<String>,
    self_ipv6: Option<String>,
    lowest_ipv6_mtu: Option<u16>,
    ipv4_mtu: Option<u16>,
    ipv6_mtu: Option<u16>,
    amend_udp_checksum_zero: Option<bool>,
    icmp_error_rate: Option<u32>,
    mss_clamp: Option<bool>,
    routes: Option<bool>,
    #[serde(default)]
    ipv4_via_pool6: Vec<String>,
    nat64: Option<RawNat64>,
}

/// One `eam = [{ ipv4 = "...", ipv6 = "..." }]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEam {
    ipv4: String,
    ipv6: String,
}

/// `[xlat.nat64]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNat64 {
    pool4: String,
    ports: Option<String>,
    max_sessions: Option<usize>,
    max_sessions_per_host: Option<usize>,
}

/// Validated translation settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XlatSettings {
    pub config: Config,
    pub nat64: Option<nat64::Settings>,
    /// IPv4 destinations, besides the EAM ranges, translated through pool6.
    pub via_pool6: Vec<Ipv4Net>,
    /// Routes to put on the hub's TUN (empty when `routes = false`).
    pub routes: Vec<IpNet>,
    /// Most ICMP errors the translator generates per second (0: none).
    pub icmp_error_rate: u32,
}

fn v4net(key: &str, s: &str) -> Result<Ipv4Net, String> {
    s.parse::<Ipv4Net>()
        .or_else(|_| s.parse::<Ipv4Addr>().map(Ipv4Net::from))
        .map_err(|_| format!("[xlat] {key}: `{s}` is not an IPv4 address or prefix"))
}

fn v6net(key: &str, s: &str) -> Result<Ipv6Net, String> {
    s.parse::<Ipv6Net>()
        .or_else(|_| s.parse::<Ipv6Addr>().map(Ipv6Net::from))
        .map_err(|_| format!("[xlat] {key}: `{s}` is not an IPv6 address or prefix"))
}

fn v4addr(key: &str, s: &str) -> Result<Ipv4Addr, String> {
    s.parse()
        .map_err(|_| format!("[xlat] {key}: `{s}` is not an IPv4 address"))
}

fn v6addr(key: &str, s: &str) -> Result<Ipv6Addr, String> {
    s.parse()
        .map_err(|_| format!("[xlat] {key}: `{s}` is not an IPv6 address"))
}

/// Validates `[xlat]`. `hub_addresses` supply the default error sources and
/// `hub_mtu` the default IPv6-side MTU (the tunnels').
pub fn validate(
    raw: RawXlat,
    hub_addresses: &[IpNet],
    hub_mtu: u16,
) -> Result<XlatSettings, String> {
    let mut cfg = Config::default();
    let mut routes = Vec::new();
    match raw.pool6.as_deref() {
        Some("off") => cfg.pool6 = None,
        Some(s) => {
            let n = v6net("pool6", s)?;
            if n.trunc() != n {
                return Err(format!("[xlat] pool6: `{s}` has host bits set"));
            }
            cfg.pool6 = Some(
                Pool6::new(n.network(), n.prefix_len())
                    .map_err(|e| format!("[xlat] pool6: `{s}`: {e}"))?,
            );
        }
        None => {}
    }
    // RFC 6052 §3.1 for 64:ff9b::/96 unless turned off (labs numbered from
    // documentation ranges); no effect on other prefixes.
    cfg.pool6 = cfg
        .pool6
        .map(|p| p.with_wkp_strict(raw.wkp_strict.unwrap_or(true)));
    if let Some(p) = &cfg.pool6 {
        if let Ok(n) = Ipv6Net::new(p.prefix(), p.prefix_len()) {
            routes.push(IpNet::V6(n));
        }
    }
    for (i, e) in raw.eam.iter().enumerate() {
        let key = format!("eam #{}", i + 1);
        let a = v4net(&format!("{key} ipv4"), &e.ipv4)?;
        let b = v6net(&format!("{key} ipv6"), &e.ipv6)?;
        let eam = Eam::new(a.network(), a.prefix_len(), b.network(), b.prefix_len())
            .map_err(|err| format!("[xlat] {key} ({} = {}): {err}", e.ipv4, e.ipv6))?;
        if a.trunc() != a || b.trunc() != b {
            return Err(format!(
                "[xlat] {key}: `{}` / `{}` has host bits set",
                e.ipv4, e.ipv6
            ));
        }
        if cfg.eamt.iter().any(|x| x.v4() == eam.v4()) {
            return Err(format!("[xlat] {key}: ipv4 `{}` is listed twice", e.ipv4));
        }
        cfg.eamt.push(eam);
        routes.push(IpNet::V4(a));
    }
    if let Some(s) = &raw.rfc6791_ipv4 {
        let n = v4net("rfc6791_ipv4", s)?;
        cfg.rfc6791_v4 = Some((n.network(), n.prefix_len()));
    }
    if let Some(s) = &raw.rfc6791_ipv6 {
        cfg.rfc6791_v6 = Some(v6addr("rfc6791_ipv6", s)?);
    }
    cfg.self_v6 = match &raw.self_ipv6 {
        Some(s) => Some(v6addr("self_ipv6", s)?),
        None => hub_addresses.iter().find_map(|a| match a.addr() {
            IpAddr::V6(v) => Some(v),
            IpAddr::V4(_) => None,
        }),
    };
    cfg.lowest_ipv6_mtu = raw.lowest_ipv6_mtu.unwrap_or(1280);
    if cfg.lowest_ipv6_mtu < 1280 {
        return Err(format!(
            "[xlat] lowest_ipv6_mtu {}: must be at least 1280",
            cfg.lowest_ipv6_mtu
        ));
    }
    cfg.ipv4_mtu = raw.ipv4_mtu.unwrap_or(1500);
    if cfg.ipv4_mtu < 576 {
        return Err(format!(
            "[xlat] ipv4_mtu {}: must be at least 576",
            cfg.ipv4_mtu
        ));
    }
    cfg.ipv6_mtu = raw.ipv6_mtu.unwrap_or(hub_mtu);
    if cfg.ipv6_mtu < 1280 {
        return Err(format!(
            "[xlat] ipv6_mtu {}: must be at least 1280",
            cfg.ipv6_mtu
        ));
    }
    cfg.amend_udp_checksum_zero = raw.amend_udp_checksum_zero.unwrap_or(false);
    cfg.mss_clamp = raw.mss_clamp.unwrap_or(true);
    let icmp_error_rate = raw
        .icmp_error_rate
        .unwrap_or(super::budget::DEFAULT_PER_SECOND);
    if icmp_error_rate > 1_000_000 {
        return Err(format!(
            "[xlat] icmp_error_rate {icmp_error_rate}: at most 1000000 per second (0 sends none)"
        ));
    }
    let nat64 = match raw.nat64 {
        None => None,
        Some(n) => {
            let pool4 = v4addr("nat64.pool4", &n.pool4)?;
            if cfg.pool6.is_none() {
                return Err("[xlat.nat64] needs a pool6 (pool6 = \"off\" is set)".into());
            }
            if super::addr::eam_lookup_v4(&cfg.eamt, pool4.octets()).is_some() {
                return Err(format!(
                    "[xlat.nat64] pool4 `{pool4}` lies inside an eam ipv4 range"
                ));
            }
            let (port_min, port_max) = match n.ports.as_deref() {
                None => (1024, 65535),
                Some(s) => {
                    let bad = || {
                        format!("[xlat.nat64] ports `{s}`: expected FIRST-LAST, e.g. 1024-65535")
                    };
                    let (a, b) = s.split_once('-').ok_or_else(bad)?;
                    let a: u16 = a.trim().parse().map_err(|_| bad())?;
                    let b: u16 = b.trim().parse().map_err(|_| bad())?;
                    if a == 0 || a > b {
                        return Err(bad());
                    }
                    (a, b)
                }
            };
            let max_sessions = n.max_sessions.unwrap_or(65536);
            if max_sessions == 0 || max_sessions > 4_000_000 {
                return Err(format!(
                    "[xlat.nat64] max_sessions {max_sessions}: must be 1 to 4000000"
                ));
            }
            // A quarter by default: one node cannot take the table (and the
            // pool4 ports) from the others.
            let max_sessions_per_host =
                n.max_sessions_per_host.unwrap_or((max_sessions / 4).max(1));
            if max_sessions_per_host == 0 || max_sessions_per_host > max_sessions {
                return Err(format!(
                    "[xlat.nat64] max_sessions_per_host {max_sessions_per_host}: must be 1 to \
                     max_sessions ({max_sessions})"
                ));
            }
            routes.push(IpNet::V4(Ipv4Net::from(pool4)));
            Some(nat64::Settings {
                pool4,
                port_min,
                port_max,
                max_sessions,
                max_sessions_per_host,
            })
        }
    };
    // The translator's own ICMPv4 errors reach the hub's stack from the TUN,
    // where Linux drops a packet whose source is one of its own addresses (a
    // martian): the hub's addresses may not be their source. By default they
    // come from pool4, which is routed onto the TUN, or else from RFC 7600's
    // IPv4 dummy address.
    let hub_v4 = |a: Ipv4Addr| hub_addresses.iter().any(|n| n.addr() == IpAddr::V4(a));
    cfg.self_v4 = Some(match &raw.self_ipv4 {
        Some(s) => {
            let a = v4addr("self_ipv4", s)?;
            if hub_v4(a) {
                return Err(format!(
                    "[xlat] self_ipv4: `{a}` is one of the hub's own addresses; the kernel \
                     drops packets from the TUN with a local source, so the translator's \
                     ICMP errors would never arrive: pick an address the host does not have \
                     (or leave self_ipv4 out to use nat64.pool4, else {IPV4_DUMMY})"
                ));
            }
            a
        }
        None => nat64
            .as_ref()
            .map(|n| n.pool4)
            .filter(|&p| !hub_v4(p))
            .unwrap_or(IPV4_DUMMY),
    });
    // The RFC 6791 pool is a source of the same ICMPv4 errors: none of it may
    // be the hub's (a hashed pick from the pool would be lost as a martian).
    if let Some((net, len)) = cfg.rfc6791_v4 {
        let pool = Ipv4Net::new(net, len).map_err(|e| format!("[xlat] rfc6791_ipv4: {e}"))?;
        if let Some(own) = hub_addresses.iter().find_map(|n| match n.addr() {
            IpAddr::V4(a) if pool.contains(&a) => Some(a),
            _ => None,
        }) {
            return Err(format!(
                "[xlat] rfc6791_ipv4: `{pool}` holds `{own}`, one of the hub's own addresses; \
                 the kernel drops packets from the TUN with a local source, so ICMP errors \
                 sent from it would never arrive: pick addresses the host does not have"
            ));
        }
    }
    let mut via_pool6 = Vec::new();
    for s in &raw.ipv4_via_pool6 {
        let n = v4net("ipv4_via_pool6", s)?;
        if n.trunc() != n {
            return Err(format!("[xlat] ipv4_via_pool6: `{s}` has host bits set"));
        }
        let Some(pool6) = &cfg.pool6 else {
            return Err("[xlat] ipv4_via_pool6 needs a pool6".into());
        };
        // Every packet to such a range would be dropped (RFC 6052 §3.1).
        if pool6.refuses(n.network().octets()) && pool6.refuses(n.broadcast().octets()) {
            return Err(format!(
                "[xlat] ipv4_via_pool6: `{s}` is not global, and the well-known prefix \
                 64:ff9b::/96 may not carry it (RFC 6052 §3.1): use a network-specific \
                 pool6, or wkp_strict = false"
            ));
        }
        via_pool6.push(n);
        routes.push(IpNet::V4(n));
    }
    if raw.routes == Some(false) {
        routes.clear();
    }
    Ok(XlatSettings {
        config: cfg,
        via_pool6,
        nat64,
        routes,
        icmp_error_rate,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<XlatSettings, String> {
        let raw: RawXlat = toml::from_str(s).map_err(|e| e.to_string())?;
        validate(
            raw,
            &[
                "100.64.0.1/10".parse().unwrap(),
                "fd77::1/48".parse().unwrap(),
            ],
            1420,
        )
    }

    #[test]
    fn defaults() {
        let x = parse("").unwrap();
        assert_eq!(x.config.pool6, Config::default().pool6);
        assert_eq!(x.config.self_v4, Some(IPV4_DUMMY));
        assert_eq!(x.config.ipv6_mtu, 1420);
        assert_eq!(x.routes, vec!["64:ff9b::/96".parse::<IpNet>().unwrap()]);
        assert!(x.nat64.is_none());
        assert_eq!(x.icmp_error_rate, 100);
        assert!(x.config.pool6.unwrap().refuses([10, 0, 0, 1]));
        let lab = parse("wkp_strict = false").unwrap();
        assert!(!lab.config.pool6.unwrap().refuses([10, 0, 0, 1]));
        assert_eq!(
            lab.config.pool6.map(|p| p.prefix()),
            x.config.pool6.map(|p| p.prefix())
        );
        assert_eq!(parse("icmp_error_rate = 0").unwrap().icmp_error_rate, 0);
        // A non-global range through the well-known prefix would be dropped
        // whole: refused at load, unless strictness is off or the prefix is
        // network-specific; a range with global addresses in it is taken.
        let e = parse("ipv4_via_pool6 = [\"10.1.0.0/16\"]").unwrap_err();
        assert!(e.contains("10.1.0.0/16") && e.contains("wkp_strict"), "{e}");
        assert!(parse("ipv4_via_pool6 = [\"10.1.0.0/16\"]\nwkp_strict = false").is_ok());
        assert!(parse("pool6 = \"2001:db8:100::/40\"\nipv4_via_pool6 = [\"10.1.0.0/16\"]").is_ok());
        assert!(parse("ipv4_via_pool6 = [\"198.51.0.0/16\"]").is_ok());
        assert!(parse("icmp_error_rate = 2000000")
            .unwrap_err()
            .contains("icmp_error_rate"));
    }

    #[test]
    fn full() {
        let x = parse(
            r#"pool6 = "2001:db8:100::/40"
eam = [{ ipv4 = "198.51.100.10/32", ipv6 = "fd77:6777::1:1/128" }, { ipv4 = "10.0.0.0/24", ipv6 = "2001:db8:2::/120" }]
rfc6791_ipv4 = "203.0.113.8/32"
self_ipv4 = "198.51.100.1"
ipv4_mtu = 1400
amend_udp_checksum_zero = true
[nat64]
pool4 = "198.51.100.200"
ports = "2000-3000"
max_sessions = 10
"#,
        )
        .unwrap();
        assert_eq!(x.config.eamt.len(), 2);
        assert_eq!(
            x.config.rfc6791_v4,
            Some((Ipv4Addr::new(203, 0, 113, 8), 32))
        );
        let n = x.nat64.unwrap();
        assert_eq!((n.port_min, n.port_max, n.max_sessions), (2000, 3000, 10));
        assert_eq!(n.max_sessions_per_host, 2, "a quarter of max_sessions");
        assert_eq!(x.routes.len(), 4);
    }

    #[test]
    fn nat64_max_sessions_per_host() {
        let nat = |extra: &str| {
            parse(&format!("[nat64]\npool4 = \"198.51.100.200\"\n{extra}"))
                .map(|x| x.nat64.unwrap().max_sessions_per_host)
        };
        // Default: a quarter of max_sessions, at least 1.
        assert_eq!(nat(""), Ok(16384));
        assert_eq!(nat("max_sessions = 1000"), Ok(250));
        assert_eq!(nat("max_sessions = 3"), Ok(1));
        assert_eq!(nat("max_sessions = 1"), Ok(1));
        // Explicit, up to max_sessions.
        assert_eq!(nat("max_sessions_per_host = 100"), Ok(100));
        assert_eq!(nat("max_sessions = 10\nmax_sessions_per_host = 10"), Ok(10));
        assert_eq!(nat("max_sessions_per_host = 1"), Ok(1));
        // Out of range: the error names the key and the bound.
        for (text, bound) in [
            ("max_sessions_per_host = 0", "65536"),
            ("max_sessions = 10\nmax_sessions_per_host = 11", "10"),
            ("max_sessions_per_host = 70000", "65536"),
        ] {
            let e = nat(text).unwrap_err();
            assert!(
                e.contains("max_sessions_per_host") && e.contains(&format!("({bound})")),
                "{text}: {e}"
            );
        }
    }

    /// The translator's own ICMPv4 errors never come from one of the hub's
    /// addresses (Linux would drop them as martians): by default from pool4,
    /// else the dummy address; one of the hub's addresses is refused.
    #[test]
    fn self_ipv4_is_not_the_hubs_own() {
        let self_v4 = |text: &str| parse(text).map(|x| x.config.self_v4);
        assert_eq!(self_v4(""), Ok(Some(IPV4_DUMMY)));
        assert_eq!(
            self_v4("[nat64]\npool4 = \"198.51.100.200\""),
            Ok(Some(Ipv4Addr::new(198, 51, 100, 200)))
        );
        assert_eq!(
            self_v4("[nat64]\npool4 = \"100.64.0.1\""),
            Ok(Some(IPV4_DUMMY))
        );
        assert_eq!(
            self_v4("self_ipv4 = \"198.51.100.1\"\n[nat64]\npool4 = \"198.51.100.200\""),
            Ok(Some(Ipv4Addr::new(198, 51, 100, 1)))
        );
        assert_eq!(
            self_v4("self_ipv4 = \"100.64.0.2\""),
            Ok(Some(Ipv4Addr::new(100, 64, 0, 2)))
        );
        let e = self_v4("self_ipv4 = \"100.64.0.1\"").unwrap_err();
        assert!(
            e.contains("self_ipv4") && e.contains("100.64.0.1") && e.contains("own addresses"),
            "{e}"
        );
        // Nor from an RFC 6791 pool that holds one of them.
        let pool = |text: &str| parse(text).map(|x| x.config.rfc6791_v4);
        assert_eq!(
            pool("rfc6791_ipv4 = \"100.64.1.0/24\""),
            Ok(Some((Ipv4Addr::new(100, 64, 1, 0), 24)))
        );
        let e = pool("rfc6791_ipv4 = \"100.64.0.0/30\"").unwrap_err();
        assert!(
            e.contains("rfc6791_ipv4") && e.contains("100.64.0.1") && e.contains("own addresses"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_the_key() {
        for (text, key) in [
            ("pool6 = \"64:ff9b::/33\"", "pool6"),
            ("pool6 = \"nope\"", "pool6"),
            (
                "eam = [{ ipv4 = \"1.2.3.0/24\", ipv6 = \"2001:db8::/130\" }]",
                "eam #1",
            ),
            (
                "eam = [{ ipv4 = \"1.2.0.0/16\", ipv6 = \"2001:db8::/120\" }]",
                "eam #1",
            ),
            ("lowest_ipv6_mtu = 1000", "lowest_ipv6_mtu"),
            ("self_ipv4 = \"::1\"", "self_ipv4"),
            ("[nat64]\npool4 = \"x\"", "pool4"),
            ("[nat64]\npool4 = \"1.2.3.4\"\nports = \"9-3\"", "ports"),
            ("bogus = 1", "bogus"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(key), "{text}: {e}");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod hub_file_tests {
    const K1: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";

    fn hub(extra: &str) -> Result<crate::config::HubConfig, String> {
        crate::config::HubConfig::parse(
            "hub.toml",
            &format!("[hub]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.0.1/10\"]\n{extra}"),
            std::path::Path::new("."),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn hub_file_section() {
        let c = hub("[xlat]\neam = [{ ipv4 = \"198.51.100.10/32\", ipv6 = \"fd77:6777::1:1/128\" }]\n[xlat.nat64]\npool4 = \"198.51.100.200\"\n").unwrap();
        let x = c.xlat.unwrap();
        assert_eq!(x.config.eamt.len(), 1);
        assert!(x.nat64.is_some());
        assert!(hub("").unwrap().xlat.is_none());
        let e = hub("[xlat]\npool_6 = \"64:ff9b::/96\"\n").unwrap_err();
        assert!(e.contains("pool_6") && e.contains("line 5"), "{e}");
        let e = hub("[xlat.nat64]\npool4 = \"198.51.100.200\"\nport = \"1-2\"\n").unwrap_err();
        assert!(e.contains("port"), "{e}");
    }
}
