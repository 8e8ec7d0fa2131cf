//! Kernel routes into a device: which prefixes need one (a pure plan) and the
//! iproute2 call that installs it. Routes through a TUN go away with it; one
//! is removed while the device runs only when a hub endpoint turns out to lie
//! inside it ([`holding`]) or its peer leaves or gives it up ([`stale`]).

use ipnet::IpNet;
use std::net::IpAddr;

/// The routes a device needs for the prefixes its peers own.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Prefixes to route into the device, normalised, without duplicates and
    /// without any that another of them already covers.
    pub add: Vec<IpNet>,
    /// Prefixes asked for and not installed, with why.
    pub skipped: Vec<(IpNet, Skip)>,
}

/// Why a prefix gets no route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// A default route (`0.0.0.0/0`, `::/0`).
    Default,
    /// The prefix holds this hub endpoint: routed into the tunnel, the
    /// tunnel's own packets to that hub would loop.
    Endpoint(IpAddr),
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::Default => f.write_str(
                "a default route would also capture the tunnel's own packets to its hubs",
            ),
            Skip::Endpoint(a) => write!(
                f,
                "it holds the hub endpoint {a}: the tunnel's own packets would loop"
            ),
        }
    }
}

/// Plans the routes for `allowed` (the peers' allowed IPs) on a device whose
/// own addresses are `addresses`: a prefix inside the network of one of the
/// addresses is already on-link through the device and needs nothing. A
/// prefix holding one of the hubs' `endpoints` is skipped.
pub fn plan<'a>(
    addresses: &[IpNet],
    endpoints: &[IpAddr],
    allowed: impl IntoIterator<Item = &'a IpNet>,
) -> Plan {
    let on_link: Vec<IpNet> = addresses.iter().map(IpNet::trunc).collect();
    let mut want: Vec<IpNet> = Vec::new();
    let mut skipped: Vec<(IpNet, Skip)> = Vec::new();
    for net in allowed.into_iter().map(IpNet::trunc) {
        let skip = if net.prefix_len() == 0 {
            Some(Skip::Default)
        } else {
            endpoints
                .iter()
                .map(IpAddr::to_canonical)
                .find(|e| net.contains(e))
                .map(Skip::Endpoint)
        };
        if let Some(why) = skip {
            if !skipped.iter().any(|(n, _)| *n == net) {
                skipped.push((net, why));
            }
            continue;
        }
        if on_link.iter().any(|l| l.contains(&net)) {
            continue;
        }
        want.push(net);
    }
    want.sort();
    want.dedup();
    let add = want
        .iter()
        .filter(|n| !want.iter().any(|o| o != *n && o.contains(*n)))
        .copied()
        .collect();
    Plan { add, skipped }
}

/// The installed routes in `routed` that hold `endpoint`: a hub address
/// learnt after the routes were planned (its name resolved late, or to a new
/// address). Routed into the tunnel, the tunnel's own packets to it would
/// loop, so these must go.
pub fn holding(routed: &[IpNet], endpoint: IpAddr) -> Vec<IpNet> {
    // A dual-stack socket names an IPv4 hub as ::ffff:a.b.c.d.
    let endpoint = endpoint.to_canonical();
    routed
        .iter()
        .filter(|n| n.contains(&endpoint))
        .copied()
        .collect()
}

/// The prefixes of `displaced` (routes taken out, or never added, because
/// they held a hub's address) that hold none of the hubs' addresses now
/// (`hops`): they can be routed into the tunnel again.
pub fn restorable(displaced: &[IpNet], hops: &[IpAddr]) -> Vec<IpNet> {
    displaced
        .iter()
        .filter(|n| !hops.iter().any(|h| n.contains(&h.to_canonical())))
        .copied()
        .collect()
}

/// The routes to take away once peers gave up the prefixes `removed` (the
/// peers left, or hold other allowed IPs now): each of them, normalised,
/// that could have a route (not a default route, not on-link through the
/// device's own `addresses`) and that is not routed for another reason now:
/// `held`, what the device's peers hold and what else is routed into it (the
/// translator's prefixes). A wider prefix still routed carries what a removed
/// narrower one did; one that was never installed is skipped where the
/// kernel is asked.
pub fn stale(addresses: &[IpNet], removed: &[IpNet], held: &[IpNet]) -> Vec<IpNet> {
    let on_link: Vec<IpNet> = addresses.iter().map(IpNet::trunc).collect();
    let mut out: Vec<IpNet> = removed
        .iter()
        .map(IpNet::trunc)
        .filter(|n| n.prefix_len() != 0)
        .filter(|n| !on_link.iter().any(|l| l.contains(n)))
        .filter(|n| !held.iter().any(|h| h.trunc() == *n))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Of the routes `plan` gives for the prefixes held now (`held`), those
/// inside a route about to be taken away (`gone`): a plan leaves out a prefix
/// another covers, so a peer's narrower prefix had no route of its own while
/// a removed peer's wider one was routed, and needs one now.
pub fn uncovered(
    addresses: &[IpNet],
    endpoints: &[IpAddr],
    held: &[IpNet],
    gone: &[IpNet],
) -> Vec<IpNet> {
    plan(addresses, endpoints, held)
        .add
        .into_iter()
        .filter(|h| gone.iter().any(|g| g.contains(h)))
        .collect()
}

/// Plans the routes for `allowed` (see [`plan`]) and installs them into
/// `iface`, logging what is skipped and why, and returns the plan (what
/// was added, what was skipped).
/// `whose` names the owners in the messages ("a hub's", "a peer's").
pub fn install<'a>(
    addresses: &[IpNet],
    endpoints: &[IpAddr],
    allowed: impl IntoIterator<Item = &'a IpNet>,
    iface: &str,
    whose: &str,
) -> anyhow::Result<Plan> {
    let plan = plan(addresses, endpoints, allowed);
    for (net, why) in &plan.skipped {
        tracing::warn!(route = %net, interface = %iface, "{whose} allowed_ips prefix gets no route: {why}");
    }
    for net in &plan.add {
        replace(net, iface)
            .map_err(|e| anyhow::anyhow!("routing {whose} allowed_ips into the tunnel: {e}"))?;
    }
    if !plan.add.is_empty() {
        let routes: Vec<String> = plan.add.iter().map(|r| r.to_string()).collect();
        tracing::info!(?routes, interface = %iface, "routes added");
    }
    Ok(plan)
}

/// Takes away the [`stale`] routes of `iface` and routes the [`uncovered`]
/// prefixes again; returns the prefixes no longer routed and those routed
/// anew, for the device's record. `whose` names the peers that gave the
/// prefixes up in the messages ("a [[peer]]", "a control-plane peer").
pub fn withdraw(
    addresses: &[IpNet],
    endpoints: &[IpAddr],
    removed: &[IpNet],
    held: &[IpNet],
    iface: &str,
    whose: &str,
) -> (Vec<IpNet>, Vec<IpNet>) {
    // A prefix skipped when it was planned (it held an endpoint then) has
    // no route to take away.
    let going: Vec<IpNet> = stale(addresses, removed, held)
        .into_iter()
        .filter(|n| exists(n, iface).unwrap_or(true))
        .collect();
    // The narrower routes first, so their traffic never falls through to
    // the main table between the two changes.
    let mut added = Vec::new();
    for net in uncovered(addresses, endpoints, held, &going) {
        match replace(&net, iface) {
            Ok(()) => {
                tracing::info!(route = %net, interface = %iface, "route added: a wider route around it goes");
                added.push(net);
            }
            Err(e) => {
                tracing::warn!(route = %net, error = %e, "cannot route a prefix a removed route covered")
            }
        }
    }
    let mut gone = Vec::new();
    for net in going {
        match delete(&net, iface) {
            Ok(()) => {
                tracing::info!(route = %net, interface = %iface, "route removed: {whose} gave it up");
                gone.push(net);
            }
            Err(e) => {
                tracing::warn!(route = %net, error = %e, "cannot remove the route {whose} gave up")
            }
        }
    }
    (gone, added)
}

/// `ip route replace NET dev IFACE`.
pub fn replace(net: &IpNet, iface: &str) -> anyhow::Result<()> {
    ip_route("replace", net, iface)
}

/// `ip route del NET dev IFACE`.
pub fn delete(net: &IpNet, iface: &str) -> anyhow::Result<()> {
    ip_route("del", net, iface)
}

/// Whether the kernel holds the route `net dev iface` (as the node added it).
pub fn exists(net: &IpNet, iface: &str) -> anyhow::Result<bool> {
    let n = net.to_string();
    let out = std::process::Command::new("ip")
        .args(["route", "show", "exact", &n, "dev", iface])
        .output()
        .map_err(|e| anyhow::anyhow!("running `ip route show exact {n} dev {iface}`: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "`ip route show exact {n} dev {iface}` failed ({})",
            out.status
        );
    }
    Ok(!out.stdout.iter().all(u8::is_ascii_whitespace))
}

fn ip_route(verb: &str, net: &IpNet, iface: &str) -> anyhow::Result<()> {
    let net = net.to_string();
    let st = std::process::Command::new("ip")
        .args(["route", verb, &net, "dev", iface])
        .status()
        .map_err(|e| anyhow::anyhow!("running `ip route {verb} {net} dev {iface}`: {e}"))?;
    if !st.success() {
        anyhow::bail!("`ip route {verb} {net} dev {iface}` failed ({st})");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn routes_given_up_go_unless_still_routed_for_another() {
        let addresses = nets(&["10.7.0.1/24", "fd07::1/64"]);
        let removed = nets(&[
            "10.7.0.2/32",
            "10.9.0.0/16",
            "172.16.0.0/12",
            "fd99::1/64",
            "0.0.0.0/0",
            "192.0.2.0/24",
        ]);
        // 10.7.0.2 is on-link (never routed), a default route never is;
        // 172.16.0.0/12 is held by a remaining peer, 192.0.2.0/24 routed for
        // the translator.
        let held = nets(&[
            "10.7.0.3/32",
            "172.16.0.0/12",
            "10.9.4.0/24",
            "192.0.2.0/24",
        ]);
        assert_eq!(
            stale(&addresses, &removed, &held),
            nets(&["10.9.0.0/16", "fd99::/64"])
        );
        // A wider held prefix does not keep a narrower route: its own
        // route carries the traffic.
        let wider = nets(&["10.0.0.0/8"]);
        assert_eq!(
            stale(&addresses, &removed, &wider),
            nets(&["10.9.0.0/16", "172.16.0.0/12", "192.0.2.0/24", "fd99::/64"])
        );
        // The narrower 10.9.4.0/24 had no route of its own under 10.9.0.0/16:
        // it needs one now; what was never under a removed route does not.
        let going = stale(&addresses, &removed, &held);
        assert_eq!(
            uncovered(&addresses, &[], &held, &going),
            nets(&["10.9.4.0/24"])
        );
        // Unless it holds a hub endpoint, or a wider held prefix routes it.
        let ep: IpAddr = "10.9.4.9".parse().unwrap();
        assert!(uncovered(&addresses, &[ep], &held, &going).is_empty());
        let mut both = held.clone();
        both.extend(wider);
        assert!(uncovered(&addresses, &[], &both, &going).is_empty());
    }

    #[test]
    fn a_displaced_prefix_comes_back_once_no_hub_address_is_in_it() {
        let displaced = nets(&["10.0.0.0/8", "192.168.0.0/16", "fd00::/8"]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // A captive portal's DNS answered 10.0.0.1 for a hub's name.
        assert_eq!(
            restorable(&displaced, &[ip("10.0.0.1"), ip("fd00::5")]),
            nets(&["192.168.0.0/16"])
        );
        // Back on a normal network: every prefix comes back.
        assert_eq!(
            restorable(&displaced, &[ip("203.0.113.1"), ip("::ffff:198.51.100.1")]),
            displaced
        );
        // A mapped address counts as its IPv4 one.
        assert_eq!(
            restorable(&displaced, &[ip("::ffff:192.168.1.1")]),
            nets(&["10.0.0.0/8", "fd00::/8"])
        );
        assert!(restorable(&[], &[ip("10.0.0.1")]).is_empty());
    }

    #[test]
    fn on_link_prefixes_need_no_route() {
        let addrs = nets(&["100.64.1.1/10", "fd77:6777::1:1/48"]);
        let p = plan(
            &addrs,
            &[],
            &nets(&["100.64.0.0/10", "fd77:6777::/48", "100.64.0.1/32"]),
        );
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn other_prefixes_are_routed_once_and_normalised() {
        let addrs = nets(&["100.64.1.1/10", "fd77:6777::1:1/48"]);
        let p = plan(
            &addrs,
            &["203.0.113.1".parse().unwrap()],
            &nets(&[
                "fd77:6777::/48",
                "64:ff9b::/96",
                "64:ff9b::c000:201/128",
                "10.9.8.7/16",
                "64:ff9b::/96",
                "200::/7",
            ]),
        );
        assert_eq!(p.add, nets(&["10.9.0.0/16", "64:ff9b::/96", "200::/7"]));
        assert!(p.skipped.is_empty());
    }

    #[test]
    fn default_routes_are_reported_not_planned() {
        let p = plan(
            &nets(&["100.64.1.1/10"]),
            &[],
            &nets(&["0.0.0.0/0", "::/0", "0.0.0.0/0"]),
        );
        assert!(p.add.is_empty());
        let d: Vec<IpNet> = p.skipped.iter().map(|(n, _)| *n).collect();
        assert_eq!(d, nets(&["0.0.0.0/0", "::/0"]));
        assert!(p.skipped.iter().all(|(_, w)| *w == Skip::Default));
    }

    #[test]
    fn a_prefix_holding_a_hub_endpoint_is_not_routed() {
        let hub: IpAddr = "2001:db8:1::1".parse().unwrap();
        let p = plan(
            &nets(&["100.64.1.1/10"]),
            &["203.0.113.1".parse().unwrap(), hub],
            &nets(&["2001:db8:1::/64", "2001:db8:2::/64"]),
        );
        assert_eq!(p.add, nets(&["2001:db8:2::/64"]));
        assert_eq!(
            p.skipped,
            vec![("2001:db8:1::/64".parse().unwrap(), Skip::Endpoint(hub))]
        );
        assert!(p.skipped[0].1.to_string().contains("2001:db8:1::1"));
    }

    #[test]
    fn a_wider_prefix_than_the_address_is_routed() {
        // The address's /24 does not cover the hub's /10.
        let p = plan(&nets(&["100.64.1.1/24"]), &[], &nets(&["100.64.0.0/10"]));
        assert_eq!(p.add, nets(&["100.64.0.0/10"]));
    }

    #[test]
    fn holding_finds_the_routes_an_endpoint_lies_in() {
        let routed = nets(&["203.0.113.0/24", "198.51.100.0/24", "2001:db8::/32"]);
        let ep: IpAddr = "203.0.113.1".parse().unwrap();
        assert_eq!(holding(&routed, ep), nets(&["203.0.113.0/24"]));
        let ep6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(holding(&routed, ep6), nets(&["2001:db8::/32"]));
        let elsewhere: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(holding(&routed, elsewhere).is_empty());
        // An IPv4 hub as a dual-stack socket names it.
        let mapped: IpAddr = "::ffff:203.0.113.1".parse().unwrap();
        assert_eq!(holding(&routed, mapped), nets(&["203.0.113.0/24"]));
    }
}
