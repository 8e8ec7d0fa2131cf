//! Fuzz target: admin and node API bodies through the control plane's pure
//! core (`control::state`): a route spec (`POST /v1/routes`), a service
//! declaration (`PUT /v1/services`) and a name (`PUT /v1/names/{name}`),
//! parsed as the API parses them and applied to a state with two nodes.
//!
//! Invariants beyond "no panic": a refused call leaves the state as it was;
//! an accepted one keeps the state serialisable and equal after a JSON round
//! trip (what the store writes is what it reads back); every declaration of
//! an evaluated node gets a status, and every evaluated route has a backend.
#![no_main]

use gatewire::control::registry::LocalRegistry;
use gatewire::control::state::{Context, NameRecord, Protocol, ServiceDecl, State};
use gatewire::proxy::settings::RawRoute;
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeSet;

const K1: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
const K2: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

fn check(r: &RawRoute) -> Result<(), String> {
    if r.backends.iter().any(|b| b.contains("127.")) {
        return Err("loopback backend".into());
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct Declare {
    services: Vec<ServiceDecl>,
}

fn round_trips(s: &State) {
    let text = serde_json::to_string(s).expect("state serialises");
    let back: State = serde_json::from_str(&text).expect("state parses back");
    assert_eq!(&back, s);
}

fuzz_target!(|data: &[u8]| {
    let Some((&op, body)) = data.split_first() else {
        return;
    };
    let file_hosts: BTreeSet<String> = ["name:static".to_string()].into();
    let file_keys = BTreeSet::new();
    let used: Vec<IpNet> = vec!["100.64.1.1/32".parse().unwrap()];
    let pools: Vec<IpNet> = vec![
        "100.64.1.0/29".parse().unwrap(),
        "fd77:6777:1::/64".parse().unwrap(),
    ];
    let file_ports: BTreeSet<(Protocol, u16)> = [(Protocol::Tcp, 20001)].into();
    let ctx = Context {
        now: 1000,
        check_route: &check,
        file_hosts: &file_hosts,
        file_keys: &file_keys,
        used_ips: &used,
        pools: &pools,
        ports: 20000..=20999,
        file_ports: &file_ports,
        max_ports_per_node: 4,
        port_busy: &|_, _| None,
        held_elsewhere: &|_, _| Ok(()),
    };
    let mut s = State::default();
    let n1 = s
        .add_node(&ctx, K1, Some("n1".into()), None)
        .expect("first node");
    s.add_node(&ctx, K2, None, None).expect("second node");
    s.set_name(
        &ctx,
        "blog",
        NameRecord {
            owners: vec![K1.into()],
            replicas: false,
            expires: None,
            bandwidth: Some("20 Mbit/s".into()),
        },
    )
    .expect("name");
    let before = s.clone();
    let ok = match op % 3 {
        0 => match serde_json::from_slice::<RawRoute>(body) {
            Ok(spec) => s.create_route(&ctx, spec).is_ok(),
            Err(_) => false,
        },
        1 => match serde_json::from_slice::<Declare>(body) {
            Ok(d) => {
                let from = n1.allowed_ips.first().map(|n| n.addr()).expect("address");
                let n = d.services.len();
                let r = s.declare_services(&ctx, K1, from, d.services).is_ok();
                if r {
                    let ev = s.evaluate(&ctx, &LocalRegistry { grace: 100 }, false);
                    let got = ev.statuses.get(K1).map_or(0, Vec::len);
                    assert!(n == 0 || got > 0, "{n} declared, {got} statuses");
                    assert!(ev.routes.iter().all(|r| !r.backends.is_empty()));
                    assert_eq!(
                        ev.hosts.len(),
                        ev.routes.len() + ev.tcp.len() + ev.udp.len()
                    );
                }
                r
            }
            Err(_) => false,
        },
        _ => {
            let (name, rest) = match body.iter().position(|&b| b == 0) {
                Some(i) => (&body[..i], &body[i + 1..]),
                None => (body, &[][..]),
            };
            let Ok(name) = std::str::from_utf8(name) else {
                return;
            };
            match serde_json::from_slice::<NameRecord>(rest) {
                Ok(rec) => s.set_name(&ctx, name, rec).is_ok(),
                Err(_) => false,
            }
        }
    };
    if ok {
        round_trips(&s);
    } else {
        assert_eq!(s, before, "a refused call changed the state");
    }
});
