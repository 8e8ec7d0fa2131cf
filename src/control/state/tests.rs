use super::*;
use crate::control::registry::LocalRegistry;
use proptest::prelude::*;

const K1: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
const K2: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
const K3: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";

struct Env {
    file_hosts: BTreeSet<String>,
    file_keys: BTreeSet<String>,
    used: Vec<IpNet>,
    pools: Vec<IpNet>,
    file_ports: BTreeSet<(Protocol, u16)>,
}

fn env() -> Env {
    Env {
        file_hosts: ["name:static".to_string()].into(),
        file_keys: BTreeSet::new(),
        used: vec![
            "100.64.1.1/32".parse().unwrap(),
            "fd77:6777:1::1/128".parse().unwrap(),
        ],
        pools: vec![
            "100.64.1.0/29".parse().unwrap(),
            "fd77:6777:1::/64".parse().unwrap(),
        ],
        file_ports: [(Protocol::Tcp, 20001)].into(),
    }
}

fn check(r: &RawRoute) -> std::result::Result<(), String> {
    if r.name.as_deref() == Some("unfit") {
        return Err("[[route]] #1 (unfit): `unfit.<domain>` is longer than 253 characters".into());
    }
    if r.backends.iter().any(|b| b.contains("127.0.0.1")) {
        return Err("[[route]] #1 (x): backend `127.0.0.1:80`: loopback addresses are not allowed as backends".into());
    }
    Ok(())
}

fn ctx(e: &Env, now: u64) -> Context<'_> {
    Context {
        now,
        check_route: &check,
        file_hosts: &e.file_hosts,
        file_keys: &e.file_keys,
        used_ips: &e.used,
        pools: &e.pools,
        ports: 20000..=20999,
        file_ports: &e.file_ports,
        max_ports_per_node: 4,
        port_busy: &|_, _| None,
        held_elsewhere: &|_, _| Ok(()),
    }
}

fn spec(name: &str, backend: &str) -> RawRoute {
    RawRoute {
        name: Some(name.into()),
        backends: vec![backend.into()],
        ..RawRoute::default()
    }
}

fn http(name: &str, port: u16) -> ServiceDecl {
    ServiceDecl {
        name: Some(name.into()),
        fqdn: None,
        protocol: Protocol::Http,
        port,
        tls: None,
        public_port: None,
        proxy_protocol: false,
        http2: false,
        allow: vec![],
        deny: vec![],
    }
}

#[test]
fn create_is_idempotent_and_conflicts_are_409() {
    let e = env();
    let mut s = State::default();
    let (id, created) = s
        .create_route(&ctx(&e, 1), spec("blog", "100.64.0.2:80"))
        .unwrap();
    assert_eq!((id.as_str(), created), ("name:blog", true));
    assert_eq!(s.version, 1);
    let (_, created) = s
        .create_route(&ctx(&e, 2), spec("blog", "100.64.0.2:80"))
        .unwrap();
    assert!(!created);
    assert_eq!(s.version, 1, "the same spec again changes nothing");
    let err = s
        .create_route(&ctx(&e, 3), spec("blog", "100.64.0.3:80"))
        .unwrap_err();
    assert_eq!(err.status, 409);
    let err = s
        .create_route(&ctx(&e, 3), spec("static", "100.64.0.3:80"))
        .unwrap_err();
    assert_eq!(err.status, 409);
    assert!(err.message.contains("config file"), "{err}");
}

#[test]
fn update_in_place_is_versioned() {
    let e = env();
    let mut s = State::default();
    s.create_route(&ctx(&e, 1), spec("blog", "100.64.0.2:80"))
        .unwrap();
    assert!(s
        .update_route(
            &ctx(&e, 2),
            "name:blog",
            spec("blog", "100.64.0.3:80"),
            Some(1)
        )
        .unwrap());
    assert_eq!(s.routes["name:blog"].version, 2);
    let err = s
        .update_route(
            &ctx(&e, 3),
            "name:blog",
            spec("blog", "100.64.0.4:80"),
            Some(1),
        )
        .unwrap_err();
    assert_eq!(err.status, 409);
    assert!(err.message.contains("version 2"), "{err}");
    // Same spec: no bump.
    assert!(!s
        .update_route(
            &ctx(&e, 4),
            "name:blog",
            spec("blog", "100.64.0.3:80"),
            None
        )
        .unwrap());
    assert_eq!(s.routes["name:blog"].version, 2);
    let err = s
        .update_route(
            &ctx(&e, 4),
            "name:blog",
            spec("shop", "100.64.0.3:80"),
            None,
        )
        .unwrap_err();
    assert_eq!(err.status, 400);
    assert!(s.set_paused(5, "name:blog", true).unwrap());
    assert!(!s.set_paused(5, "name:blog", true).unwrap());
    assert!(s.routes["name:blog"].spec.paused);
    assert_eq!(s.routes["name:blog"].version, 3);
    assert_eq!(s.delete_route("name:nope").unwrap_err().status, 404);
}

#[test]
fn bad_names_and_backends_are_400_and_change_nothing() {
    let e = env();
    let mut s = State::default();
    for (n, want) in [
        ("Blog", "lowercase"),
        ("a.b", "name"),
        (&"x".repeat(64)[..], "name"),
        ("-x", "name"),
    ] {
        let err = s
            .create_route(&ctx(&e, 1), spec(n, "100.64.0.2:80"))
            .unwrap_err();
        assert_eq!(err.status, 400, "{n}");
        assert!(err.message.contains(want), "{n}: {err}");
    }
    let err = s
        .create_route(&ctx(&e, 1), spec("blog", "127.0.0.1:80"))
        .unwrap_err();
    assert_eq!(err.status, 400);
    assert!(
        err.message.starts_with("name:blog: backend `127.0.0.1:80`"),
        "{err}"
    );
    assert_eq!(s, State::default());
}

fn grant(names: &[&str], replicas: bool, bandwidth: Option<&str>) -> TokenGrant {
    TokenGrant {
        names: names.iter().map(|s| s.to_string()).collect(),
        ttl: 3600,
        replicas,
        bandwidth: bandwidth.map(str::to_string),
    }
}

fn token(s: &mut State, id: &str, names: &[&str], replicas: bool, now: u64) -> [u8; 32] {
    let h = [id.as_bytes()[0]; 32];
    s.create_token(now, id, h, grant(names, replicas, None))
        .unwrap();
    h
}

#[test]
fn a_token_gives_its_new_names_its_bandwidth() {
    let e = env();
    let mut s = State::default();
    let err = s
        .create_token(10, "t0", [7; 32], grant(&["blog"], true, Some("fast")))
        .unwrap_err();
    assert_eq!(err.status, 400);
    assert!(err.message.contains("bandwidth"), "{err}");
    assert!(s.tokens.is_empty());
    let h = [8; 32];
    s.create_token(10, "t1", h, grant(&["blog"], true, Some("2 Mbit/s")))
        .unwrap();
    assert_eq!(s.tokens["t1"].bandwidth.as_deref(), Some("2 Mbit/s"));
    s.join(&ctx(&e, 11), "t1", h, K1, None).unwrap();
    assert_eq!(s.names["blog"].bandwidth.as_deref(), Some("2 Mbit/s"));
    // A replica's token does not change the bandwidth of a name that exists.
    let h2 = [9; 32];
    s.create_token(12, "t2", h2, grant(&["blog"], true, Some("50 Mbit/s")))
        .unwrap();
    s.join(&ctx(&e, 13), "t2", h2, K2, None).unwrap();
    assert_eq!(s.names["blog"].owners.len(), 2);
    assert_eq!(s.names["blog"].bandwidth.as_deref(), Some("2 Mbit/s"));
}

#[test]
fn join_spends_the_token_once() {
    let e = env();
    let mut s = State::default();
    let h = token(&mut s, "a1", &["blog"], false, 10);
    let err = s.join(&ctx(&e, 11), "a1", [0; 32], K1, None).unwrap_err();
    assert_eq!(err.status, 401);
    // The check made before the writer's lock agrees with join's own.
    assert!(s.token_matches("a1", h));
    assert!(!s.token_matches("a1", [0; 32]));
    assert!(!s.token_matches("a2", h));
    let (rec, names, repeat) = s
        .join(&ctx(&e, 11), "a1", h, K1, Some("n1".into()))
        .unwrap();
    assert!(!repeat);
    assert_eq!(names, vec!["blog".to_string()]);
    assert_eq!(
        rec.allowed_ips,
        vec![
            "100.64.1.2/32".parse::<IpNet>().unwrap(),
            "fd77:6777:1::2/128".parse().unwrap()
        ]
    );
    assert_eq!(s.names["blog"].owners, vec![K1.to_string()]);
    // The key that spent it asks again (its answer was lost): the same
    // answer, nothing changed, even after the token's expiry.
    let before = s.clone();
    let again = s.join(&ctx(&e, 12 + 3600), "a1", h, K1, None).unwrap();
    assert_eq!(again, (rec.clone(), names.clone(), true));
    assert_eq!(s, before);
    assert_eq!(s.names["blog"].owners, vec![K1.to_string()]);
    // Not with a wrong secret.
    let err = s.join(&ctx(&e, 12), "a1", [0; 32], K1, None).unwrap_err();
    assert_eq!(err.status, 401);
    let err = s.join(&ctx(&e, 12), "a1", h, K2, None).unwrap_err();
    assert_eq!(err.status, 410);
    assert!(err.message.contains("already used"), "{err}");
    assert!(
        err.message
            .contains(&format!("by {K1} at 1970-01-01T00:00:11Z")),
        "{err}"
    );
    // The joining node is not told who spent it.
    assert_eq!(
        hide_other_keys(&err.message, K2),
        "the join token was already used (by another node at 1970-01-01T00:00:11Z)"
    );
    let h2 = token(&mut s, "b2", &[], false, 20);
    let err = s.join(&ctx(&e, 20 + 3600), "b2", h2, K2, None).unwrap_err();
    assert_eq!(err.status, 410);
    assert!(err.message.contains("expired"), "{err}");
    // A token for a name owned without replicas cannot be made.
    let err = s
        .create_token(30, "c3", [9; 32], grant(&["blog"], false, None))
        .unwrap_err();
    assert_eq!(err.status, 409);
}

#[test]
fn a_removed_peer_frees_its_names_and_declares_nothing_more() {
    let e = env();
    let mut s = State::default();
    let h1 = token(&mut s, "a1", &["blog", "shop"], true, 1);
    s.join(&ctx(&e, 1), "a1", h1, K1, None).unwrap();
    let h2 = token(&mut s, "b2", &["shop"], true, 1);
    s.join(&ctx(&e, 1), "b2", h2, K2, None).unwrap();
    let ip1: IpAddr = "100.64.1.2".parse().unwrap();
    s.declare_services(&ctx(&e, 2), K1, ip1, vec![http("blog", 80)])
        .unwrap();
    let freed = s.remove_node(K1).unwrap();
    assert_eq!(freed, vec!["blog".to_string()]);
    assert!(!s.names.contains_key("blog"));
    assert_eq!(s.names["shop"].owners, vec![K2.to_string()]);
    assert!(!s.services.contains_key(K1));
    // A token for the freed name can be made again, even without replicas.
    s.create_token(3, "c3", [3; 32], grant(&["blog"], false, None))
        .unwrap();
    // A declaration that arrives after the removal stores nothing.
    let before = s.clone();
    let err = s
        .declare_services(&ctx(&e, 4), K1, ip1, vec![http("blog", 80)])
        .unwrap_err();
    assert_eq!(err.status, 403);
    assert_eq!(s, before);
}

#[test]
fn a_name_given_to_a_key_before_it_joins_is_its_own() {
    let e = env();
    let mut s = State::default();
    let own = |replicas| NameRecord {
        owners: vec![K1.into()],
        replicas,
        expires: None,
        bandwidth: None,
    };
    s.set_name(&ctx(&e, 1), "blog", own(false)).unwrap();
    s.set_name(&ctx(&e, 1), "shop", own(true)).unwrap();
    // The token is made for a name that allows replicas, then the operator
    // gives both to K1 alone: K1 joins and is an owner once.
    let h = token(&mut s, "a1", &["shop"], true, 1);
    s.set_name(&ctx(&e, 2), "shop", own(false)).unwrap();
    s.join(&ctx(&e, 3), "a1", h, K1, None).unwrap();
    assert_eq!(s.names["shop"].owners, vec![K1.to_string()]);
    assert_eq!(s.names["blog"].owners, vec![K1.to_string()]);
    // Another key with a token made before is still refused.
    s.set_name(&ctx(&e, 4), "shop", own(true)).unwrap();
    let h2 = token(&mut s, "b2", &["shop"], true, 4);
    s.set_name(&ctx(&e, 5), "shop", own(false)).unwrap();
    let err = s.join(&ctx(&e, 6), "b2", h2, K2, None).unwrap_err();
    assert_eq!(err.status, 409);
    assert!(err.message.contains("has been taken"), "{err}");
}

#[test]
fn a_name_the_mesh_holds_for_another_node_is_not_granted() {
    let e = env();
    let mut s = State::default();
    // The mesh holds `blog` for K2.
    let held = |name: &str, owner: &str| match name == "blog" && owner != K2 {
        true => Err(Error::conflict(format!(
            "name `{name}`: held in the hub mesh by node K2"
        ))),
        false => Ok(()),
    };
    let c = |now| Context {
        held_elsewhere: &held,
        ..ctx(&e, now)
    };
    let rec = |owner: &str| NameRecord {
        owners: vec![owner.into()],
        replicas: false,
        expires: None,
        bandwidth: None,
    };
    let err = s.set_name(&c(1), "blog", rec(K1)).unwrap_err();
    assert_eq!(err.status, 409);
    assert!(
        err.message.contains("name `blog`: held in the hub mesh"),
        "{err}"
    );
    assert!(s.names.is_empty());
    s.set_name(&c(1), "blog", rec(K2)).unwrap();
    s.set_name(&c(1), "shop", rec(K1)).unwrap();
    // A join that would make K1 the owner of `news`... fine; of `blog`: refused.
    s.delete_name("blog").unwrap();
    let h = token(&mut s, "a1", &["news", "blog"], false, 2);
    let err = s.join(&c(3), "a1", h, K1, None).unwrap_err();
    assert_eq!(err.status, 409);
    assert!(err.message.contains("name `blog`"), "{err}");
    assert!(!s.names.contains_key("news"));
    assert!(s.tokens["a1"].used_by.is_none());
    // K2 may join with it.
    s.join(&c(3), "a1", h, K2, None).unwrap();
    assert_eq!(s.names["blog"].owners, vec![K2.to_string()]);
}

#[test]
fn pools_run_out_cleanly() {
    let e = env();
    let mut s = State::default();
    // 100.64.1.0/29: hosts .1-.6, .1 in use.
    for i in 0..5u8 {
        let k = crate::keys::PrivateKey::from_bytes([i + 1; 32])
            .public_key()
            .to_base64();
        s.add_node(&ctx(&e, 1), &k, None, None).unwrap();
    }
    let k = crate::keys::PrivateKey::from_bytes([99; 32])
        .public_key()
        .to_base64();
    let err = s.add_node(&ctx(&e, 1), &k, None, None).unwrap_err();
    assert_eq!(err.status, 409);
    assert!(err.message.contains("full"), "{err}");
}

#[test]
fn a_removed_nodes_address_goes_to_no_one_until_the_pool_comes_round() {
    let e = env();
    let mut s = State::default();
    let key = |i: u8| {
        crate::keys::PrivateKey::from_bytes([i; 32])
            .public_key()
            .to_base64()
    };
    let v4 = |r: &NodeRecord| r.allowed_ips[0].to_string();
    // An empty list is refused, not a peer that can send from nothing.
    let err = s
        .add_node(&ctx(&e, 1), &key(1), None, Some(Vec::new()))
        .unwrap_err();
    assert_eq!(err.status, 400);
    assert!(err.message.contains("empty"), "{err}");
    // 100.64.1.0/29: hosts .1-.6, .1 the hub's.
    let a = s.add_node(&ctx(&e, 1), &key(1), None, None).unwrap();
    assert_eq!(v4(&a), "100.64.1.2/32");
    s.remove_node(&key(1)).unwrap();
    let b = s.add_node(&ctx(&e, 2), &key(2), None, None).unwrap();
    assert_eq!(
        v4(&b),
        "100.64.1.3/32",
        "the removed node's .2 was handed out again"
    );
    assert_eq!(b.allowed_ips[1].to_string(), "fd77:6777:1::3/128");
    // Kept across a restart (the state file).
    let mut s: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    for (i, want) in [(3, ".4"), (4, ".5"), (5, ".6"), (6, ".2")] {
        let r = s.add_node(&ctx(&e, 3), &key(i), None, None).unwrap();
        assert_eq!(v4(&r), format!("100.64.1{want}/32"), "node {i}");
    }
    // Full now; a pool that is no longer configured is forgotten.
    assert_eq!(
        s.add_node(&ctx(&e, 4), &key(7), None, None)
            .unwrap_err()
            .status,
        409
    );
    let mut e2 = env();
    e2.pools = vec!["100.64.2.0/29".parse().unwrap()];
    let r = s.add_node(&ctx(&e2, 5), &key(8), None, None).unwrap();
    assert_eq!(v4(&r), "100.64.2.1/32");
    assert_eq!(
        s.last_allocated.keys().collect::<Vec<_>>(),
        vec!["100.64.2.0/29"]
    );
    // The last address of a pool: the next search starts at its beginning.
    let pool: IpNet = "100.64.3.0/30".parse().unwrap();
    assert!(hosts_after(&pool, "100.64.3.2".parse().unwrap()).is_none());
    assert_eq!(
        hosts_after(&pool, "100.64.3.1".parse().unwrap())
            .unwrap()
            .collect::<Vec<_>>(),
        vec!["100.64.3.2".parse::<IpAddr>().unwrap()]
    );
}

#[test]
fn a_peers_whole_prefix_is_taken_not_just_its_first_address() {
    let e = env();
    let mut s = State::default();
    // 100.64.1.4/30 holds .4 to .7; the pool (a /29, .1 the hub's) has
    // .2 and .3 left, then nothing.
    s.add_node(
        &ctx(&e, 1),
        K1,
        None,
        Some(vec![
            "100.64.1.4/30".parse().unwrap(),
            "fd77:6777:1::100/120".parse().unwrap(),
        ]),
    )
    .unwrap();
    let a = s.add_node(&ctx(&e, 2), K2, None, None).unwrap();
    assert_eq!(a.allowed_ips[0], "100.64.1.2/32".parse::<IpNet>().unwrap());
    let b = s.add_node(&ctx(&e, 3), K3, None, None).unwrap();
    assert_eq!(b.allowed_ips[0], "100.64.1.3/32".parse::<IpNet>().unwrap());
    let k4 = crate::keys::PrivateKey::from_bytes([7; 32])
        .public_key()
        .to_base64();
    let err = s.add_node(&ctx(&e, 4), &k4, None, None).unwrap_err();
    assert_eq!(err.status, 409);
    assert!(err.message.contains("full"), "{err}");
    // A prefix around a taken address, or inside a taken prefix: refused.
    for n in ["100.64.1.0/29", "100.64.1.6/31", "fd77:6777:1::180/121"] {
        let err = s
            .add_node(&ctx(&e, 5), &k4, None, Some(vec![n.parse().unwrap()]))
            .unwrap_err();
        assert_eq!(err.status, 409, "{n}: {err}");
    }
    let mut t = Taken::default();
    t.add(&"10.0.0.0/26".parse().unwrap());
    t.add(&"10.0.1.9/32".parse().unwrap());
    assert!(t.holds(&"10.0.0.63".parse().unwrap()));
    assert!(!t.holds(&"10.0.0.64".parse().unwrap()));
    assert!(t.overlaps(&"10.0.0.0/25".parse().unwrap()));
    assert!(t.overlaps(&"10.0.0.8/29".parse().unwrap()));
    assert!(t.overlaps(&"10.0.1.8/30".parse().unwrap()));
    assert!(!t.overlaps(&"10.0.1.0/29".parse().unwrap()));
    assert!(!t.overlaps(&"10.0.0.64/26".parse().unwrap()));
}

#[test]
fn only_a_granted_declaration_holds_a_name_against_the_operator() {
    let e = env();
    let mut s = State::default();
    let h = token(&mut s, "a1", &["blog"], false, 1);
    s.join(&ctx(&e, 1), "a1", h, K1, None).unwrap();
    s.add_node(&ctx(&e, 1), K2, None, None).unwrap();
    let ip1: IpAddr = "100.64.1.2".parse().unwrap();
    let ip2: IpAddr = "100.64.1.3".parse().unwrap();
    s.declare_services(&ctx(&e, 2), K1, ip1, vec![http("blog", 80)])
        .unwrap();
    // K2 declares a name nobody gave it: refused at evaluation, and it
    // does not stand in the operator's way.
    s.declare_services(&ctx(&e, 2), K2, ip2, vec![http("shop", 80)])
        .unwrap();
    let err = s
        .create_route(&ctx(&e, 3), spec("blog", "100.64.0.2:80"))
        .unwrap_err();
    assert_eq!(err.status, 409);
    assert!(err.message.contains("served by node"), "{err}");
    let (id, created) = s
        .create_route(&ctx(&e, 3), spec("shop", "100.64.0.2:80"))
        .unwrap();
    assert!(created, "{id}");
}

/// A service the proxy would not take is refused with the proxy's reason,
/// not reported active; the node's other services are not affected.
#[test]
fn a_service_the_proxy_refuses_is_not_active() {
    let e = env();
    let mut s = State::default();
    let reg = LocalRegistry { grace: 100 };
    let h = token(&mut s, "a1", &["unfit", "blog"], false, 1);
    s.join(&ctx(&e, 1), "a1", h, K1, None).unwrap();
    let ip1: IpAddr = "100.64.1.2".parse().unwrap();
    s.declare_services(
        &ctx(&e, 2),
        K1,
        ip1,
        vec![http("unfit", 80), http("blog", 80)],
    )
    .unwrap();
    let ev = s.evaluate(&ctx(&e, 3), &reg, false);
    assert_eq!(ev.routes.len(), 1);
    assert_eq!(ev.routes[0].name.as_deref(), Some("blog"));
    let st = &ev.statuses[K1];
    let unfit = st.iter().find(|x| x.host == "name:unfit").unwrap();
    assert_eq!(unfit.status, "refused");
    assert!(
        unfit.error.as_deref().unwrap().contains("longer than 253"),
        "{unfit:?}"
    );
    let blog = st.iter().find(|x| x.host == "name:blog").unwrap();
    assert_eq!(blog.status, "active");
}

#[test]
fn services_follow_ownership_and_replicas() {
    let e = env();
    let mut s = State::default();
    let reg = LocalRegistry { grace: 100 };
    let h = token(&mut s, "a1", &["blog"], false, 1);
    s.join(&ctx(&e, 1), "a1", h, K1, None).unwrap();
    s.add_node(&ctx(&e, 1), K2, None, None).unwrap();
    let ip1: IpAddr = "100.64.1.2".parse().unwrap();
    let ip2: IpAddr = "100.64.1.3".parse().unwrap();
    s.declare_services(&ctx(&e, 2), K1, ip1, vec![http("blog", 80)])
        .unwrap();
    s.declare_services(&ctx(&e, 3), K2, ip2, vec![http("blog", 80)])
        .unwrap();
    let ev = s.evaluate(&ctx(&e, 4), &reg, false);
    assert_eq!(ev.routes.len(), 1);
    assert_eq!(ev.routes[0].backends, vec!["100.64.1.2:80".to_string()]);
    let st2 = &ev.statuses[K2][0];
    assert_eq!(st2.status, "refused");
    let why = st2.error.as_deref().unwrap();
    assert!(why.contains("does not allow replicas"), "{st2:?}");
    // The hub's text names the owner; the node is told no key but its own.
    assert!(why.contains(K1), "{why}");
    assert_eq!(
        hide_other_keys(why, K2),
        "name `blog` is owned by another node and does not allow replicas"
    );
    // The owner allows replicas and lists K2: two backends.
    s.set_name(
        &ctx(&e, 5),
        "blog",
        NameRecord {
            owners: vec![K1.into(), K2.into()],
            replicas: true,
            expires: None,
            bandwidth: Some("20 Mbit/s".into()),
        },
    )
    .unwrap();
    let ev = s.evaluate(&ctx(&e, 5), &reg, false);
    assert_eq!(ev.routes[0].backends.len(), 2);
    // The grant's bandwidth goes to the route of its services.
    assert_eq!(ev.routes[0].bandwidth.as_deref(), Some("20 Mbit/s"));
    let bad = s.set_name(
        &ctx(&e, 5),
        "blog",
        NameRecord {
            owners: vec![K1.into()],
            replicas: false,
            expires: None,
            bandwidth: Some("fast".into()),
        },
    );
    let bad = bad.unwrap_err();
    assert_eq!(bad.status, 400);
    assert!(bad.message.contains("bandwidth `fast`"), "{bad}");
    assert!(ev.statuses[K2].iter().all(|s| s.status == "active"));
    // Expiry with grace.
    s.set_name(
        &ctx(&e, 5),
        "blog",
        NameRecord {
            owners: vec![K1.into(), K2.into()],
            replicas: true,
            expires: Some(10),
            bandwidth: None,
        },
    )
    .unwrap();
    assert_eq!(s.evaluate(&ctx(&e, 109), &reg, false).routes.len(), 1);
    assert!(s.evaluate(&ctx(&e, 110), &reg, false).routes.is_empty());
    // An HTTP/2 (gRPC) service: the route speaks HTTP/2 to it; replicas
    // must agree.
    let h2 = ServiceDecl {
        http2: true,
        ..http("blog", 80)
    };
    s.declare_services(&ctx(&e, 7), K1, ip1, vec![h2.clone()])
        .unwrap();
    s.declare_services(&ctx(&e, 7), K2, ip2, vec![h2]).unwrap();
    let ev = s.evaluate(&ctx(&e, 8), &reg, false);
    assert_eq!(ev.routes[0].backend_protocol.as_deref(), Some("http2"));
    assert_eq!(ev.routes[0].backends.len(), 2);
    s.declare_services(&ctx(&e, 9), K2, ip2, vec![http("blog", 80)])
        .unwrap();
    let ev = s.evaluate(&ctx(&e, 10), &reg, false);
    assert_eq!(ev.routes[0].backends.len(), 1);
    let refused: Vec<_> = ev
        .statuses
        .values()
        .flatten()
        .filter(|st| st.status == "refused")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0]
        .error
        .as_deref()
        .is_some_and(|e| e.contains("http2")));
    let bad = ServiceDecl {
        http2: true,
        tls: Some("passthrough".into()),
        ..http("blog", 80)
    };
    let err = s
        .declare_services(&ctx(&e, 11), K1, ip1, vec![bad])
        .unwrap_err();
    assert!(err.message.contains("http2"), "{err:?}");
    // Client address rules travel to the route in canonical form, and
    // replicas must declare the same ones (however spelled).
    let ruled = |allow: &[&str]| ServiceDecl {
        allow: allow.iter().map(|a| a.to_string()).collect(),
        deny: vec!["192.0.2.9".into()],
        ..http("blog", 80)
    };
    s.declare_services(
        &ctx(&e, 12),
        K1,
        ip1,
        vec![ruled(&["192.0.2.0/24", "2001:db8::/32"])],
    )
    .unwrap();
    s.declare_services(
        &ctx(&e, 12),
        K2,
        ip2,
        vec![ruled(&["2001:DB8::/32", "::ffff:192.0.2.0/120"])],
    )
    .unwrap();
    let ev = s.evaluate(&ctx(&e, 13), &reg, false);
    assert_eq!(ev.routes[0].allow, ["192.0.2.0/24", "2001:db8::/32"]);
    assert_eq!(ev.routes[0].deny, ["192.0.2.9/32"]);
    assert_eq!(
        ev.routes[0].backends.len(),
        2,
        "the same rules: both replicas serve"
    );
    s.declare_services(&ctx(&e, 14), K2, ip2, vec![ruled(&["192.0.2.0/24"])])
        .unwrap();
    let ev = s.evaluate(&ctx(&e, 15), &reg, false);
    assert_eq!(ev.routes[0].backends.len(), 1);
    assert!(ev
        .statuses
        .values()
        .flatten()
        .any(|st| st.status == "refused"
            && st
                .error
                .as_deref()
                .is_some_and(|e| e.contains("allow/deny"))));
    let err = s
        .declare_services(&ctx(&e, 16), K1, ip1, vec![ruled(&["192.0.2.1/24"])])
        .unwrap_err();
    assert!(
        err.message.contains("allow") && err.message.contains("192.0.2.0/24"),
        "{err:?}"
    );
    // Withdrawal: an empty declaration removes the node's services.
    assert!(s.declare_services(&ctx(&e, 6), K1, ip1, vec![]).unwrap());
    assert!(!s.services.contains_key(K1));
}

#[test]
fn operator_routes_win_over_declared_services_and_ports_are_checked() {
    let e = env();
    let mut s = State::default();
    let reg = LocalRegistry { grace: 0 };
    s.add_node(&ctx(&e, 1), K3, None, None).unwrap();
    s.add_node(&ctx(&e, 1), K2, None, None).unwrap();
    s.set_name(
        &ctx(&e, 1),
        "shop",
        NameRecord {
            owners: vec![K3.into()],
            replicas: false,
            expires: None,
            bandwidth: None,
        },
    )
    .unwrap();
    s.create_route(&ctx(&e, 1), spec("shop", "100.64.0.9:80"))
        .unwrap();
    let ip: IpAddr = "100.64.1.2".parse().unwrap();
    let tcp = |p| ServiceDecl {
        name: None,
        fqdn: None,
        protocol: Protocol::Tcp,
        port: 22,
        tls: None,
        public_port: Some(p),
        proxy_protocol: false,
        http2: false,
        allow: vec![],
        deny: vec![],
    };
    s.declare_services(
        &ctx(&e, 2),
        K3,
        ip,
        vec![http("shop", 80), tcp(20022), tcp(20001)],
    )
    .unwrap();
    let ev = s.evaluate(&ctx(&e, 3), &reg, false);
    let st = &ev.statuses[K3];
    assert_eq!(st[0].status, "refused");
    assert!(st[0].error.as_deref().unwrap().contains("operator"));
    assert_eq!(st[1].status, "active");
    assert_eq!(ev.tcp.len(), 1);
    assert_eq!(ev.tcp[0].listen, "0.0.0.0:20022");
    assert!(st[2].error.as_deref().unwrap().contains("used by the hub"));
    // A UDP service may ask for PROXY v2 headers; the forward carries it.
    let dns = ServiceDecl {
        protocol: Protocol::Udp,
        port: 53,
        proxy_protocol: true,
        ..tcp(20053)
    };
    s.declare_services(&ctx(&e, 3), K3, ip, vec![tcp(20022), dns])
        .unwrap();
    let ev = s.evaluate(&ctx(&e, 3), &reg, false);
    assert_eq!(ev.udp.len(), 1);
    assert_eq!(ev.udp[0].listen, "0.0.0.0:20053");
    assert_eq!(ev.udp[0].backends, ["100.64.1.2:53"]);
    assert_eq!(ev.udp[0].proxy_protocol, Some(RawPp::Bool(true)));
    assert_eq!(ev.tcp[0].proxy_protocol, None);
    // A node holds at most `max_ports_per_node` public ports (4 here), its
    // oldest declarations first; other nodes are not affected.
    let ip2: IpAddr = "100.64.1.3".parse().unwrap();
    s.declare_services(&ctx(&e, 4), K2, ip2, (20100..20106).map(tcp).collect())
        .unwrap();
    let ev = s.evaluate(&ctx(&e, 4), &reg, false);
    let st = &ev.statuses[K2];
    let active = |st: &[ServiceStatus]| st.iter().filter(|x| x.status == "active").count();
    assert_eq!(active(st), 4, "{st:?}");
    assert!(st[4]
        .error
        .as_deref()
        .unwrap()
        .contains("max_ports_per_node"));
    assert!(st[5]
        .error
        .as_deref()
        .unwrap()
        .contains("holds 4 public ports"));
    assert_eq!(active(&ev.statuses[K3]), 2);
    assert_eq!(ev.tcp.len() + ev.udp.len(), 6);
    // UDP counts too; a refused port goes to the next node that asks.
    s.declare_services(&ctx(&e, 5), K3, ip, vec![tcp(20022), tcp(20105)])
        .unwrap();
    let ev = s.evaluate(&ctx(&e, 5), &reg, false);
    assert_eq!(ev.statuses[K3][1].status, "active");
    assert!(ev
        .tcp
        .iter()
        .any(|t| t.listen == "0.0.0.0:20105" && t.backends == ["100.64.1.2:22"]));
    // Invalid declarations fail the call and change nothing.
    let v = s.version;
    let err = s
        .declare_services(&ctx(&e, 4), K3, ip, vec![http("Shop", 80)])
        .unwrap_err();
    assert_eq!(err.status, 400);
    assert!(err.message.contains("services #1"), "{err}");
    assert_eq!(s.version, v);
    // A port the hub's proxy cannot listen on (another program holds it)
    // is refused, naming why; the same port over the other protocol, and
    // the node's other ports, are not.
    let busy = |p: Protocol, port: u16| {
        (p == Protocol::Tcp && port == 20105).then(|| "Address already in use".to_string())
    };
    let c = Context {
        port_busy: &busy,
        ..ctx(&e, 6)
    };
    let udp = |p| ServiceDecl {
        protocol: Protocol::Udp,
        ..tcp(p)
    };
    s.declare_services(&c, K3, ip, vec![tcp(20022), tcp(20105), udp(20105)])
        .unwrap();
    let ev = s.evaluate(&c, &reg, false);
    let st = &ev.statuses[K3];
    assert_eq!(st[0].status, "active");
    assert_eq!(st[1].status, "refused");
    let why = st[1].error.as_deref().unwrap();
    assert!(
        why.contains("public_port 20105 cannot be listened on at the hub: Address already in use"),
        "{why}"
    );
    assert_eq!(st[2].status, "active");
    assert!(!ev.tcp.iter().any(|t| t.listen == "0.0.0.0:20105"));
    assert!(ev.udp.iter().any(|u| u.listen == "0.0.0.0:20105"));
}

#[derive(Debug, Clone)]
enum Op {
    Create(u8, u8),
    Update(u8, u8, Option<u64>),
    Pause(u8, bool),
    Delete(u8),
    Token(u8),
    Join(u8, u8),
    Declare(u8, u8),
    Remove(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..4u8, 0..4u8).prop_map(|(a, b)| Op::Create(a, b)),
        (0..4u8, 0..4u8, proptest::option::of(0..5u64)).prop_map(|(a, b, v)| Op::Update(a, b, v)),
        (0..4u8, any::<bool>()).prop_map(|(a, b)| Op::Pause(a, b)),
        (0..4u8).prop_map(Op::Delete),
        (0..4u8).prop_map(Op::Token),
        (0..4u8, 0..3u8).prop_map(|(a, b)| Op::Join(a, b)),
        (0..3u8, 0..4u8).prop_map(|(a, b)| Op::Declare(a, b)),
        (0..3u8).prop_map(Op::Remove),
    ]
}

proptest! {
    /// Whatever the sequence: failed operations change nothing, successful
    /// ones bump the version at most once, and the state survives JSON.
    #[test]
    fn operations_keep_the_state_consistent(ops in proptest::collection::vec(op(), 1..40)) {
        let e = env();
        let keys = [K1, K2, K3];
        let mut s = State::default();
        for (t, o) in ops.into_iter().enumerate() {
            let now = t as u64 + 1;
            let before = s.clone();
            let c = ctx(&e, now);
            let name = |i: u8| format!("r{i}");
            let r: Result<()> = match o {
                Op::Create(i, b) => s.create_route(&c, spec(&name(i), &format!("100.64.0.{}:80", b + 2))).map(|_| ()),
                Op::Update(i, b, v) => s.update_route(&c, &format!("name:{}", name(i)), spec(&name(i), &format!("100.64.0.{}:80", b + 2)), v).map(|_| ()),
                Op::Pause(i, p) => s.set_paused(now, &format!("name:{}", name(i)), p).map(|_| ()),
                Op::Delete(i) => s.delete_route(&format!("name:{}", name(i))),
                Op::Token(i) => s.create_token(now, &format!("t{i}"), [i; 32], TokenGrant { names: vec![name(i)], ttl: 3600, replicas: true, bandwidth: None }).map(|_| ()),
                Op::Join(i, k) => s.join(&c, &format!("t{i}"), [i; 32], keys[k as usize], None).map(|_| ()),
                Op::Declare(k, i) => s.declare_services(&c, keys[k as usize], "100.64.1.2".parse().unwrap(), vec![http(&name(i), 80)]).map(|_| ()),
                Op::Remove(k) => s.remove_node(keys[k as usize]).map(|_| ()),
            };
            match r {
                Err(_) => prop_assert_eq!(&s, &before),
                Ok(()) => prop_assert!(s.version == before.version || s.version == before.version + 1),
            }
            let back: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
            prop_assert_eq!(&back, &s);
            let ev = s.evaluate(&c, &LocalRegistry { grace: 0 }, false);
            // Every active route's host is unique and no operator route is shadowed.
            let mut hosts = ev.hosts.clone();
            hosts.sort();
            hosts.dedup();
            prop_assert_eq!(hosts.len(), ev.hosts.len());
            for h in &ev.hosts { prop_assert!(!s.routes.contains_key(h)); }
            // Only peers have declarations; every name has owners, each once.
            for k in s.services.keys() { prop_assert!(s.nodes.contains_key(k)); }
            for r in s.names.values() {
                prop_assert!(!r.owners.is_empty());
                let mut o = r.owners.clone();
                o.sort();
                o.dedup();
                prop_assert_eq!(o.len(), r.owners.len());
            }
        }
    }
}

#[test]
fn texts_for_a_node_name_no_other_node() {
    let h = |t: &str| hide_other_keys(t, K2);
    assert_eq!(
        h(&format!("`name:blog` is taken by node {K1}")),
        "`name:blog` is taken by another node"
    );
    assert_eq!(
        h(&format!(
            "held in the hub mesh by node {K1} (granted through hub `a`)"
        )),
        "held in the hub mesh by another node (granted through hub `a`)"
    );
    assert_eq!(
        h(&format!("{K1}, {K3}; {K2}")),
        format!("another node, another node; {K2}"),
        "several keys, the node's own kept"
    );
    // Not a key: longer or shorter words, a key's prefix, padding twice.
    for t in [
        format!("x{K1}"),
        format!("{K1}x"),
        format!("{K1}="),
        K1[1..].to_string(),
        "name `blog` is not granted to this node".to_string(),
        String::new(),
    ] {
        assert_eq!(h(&t), t);
    }
    // Any text: no panic, and what is not a key is kept.
    assert_eq!(h("é ünïcode `€` node "), "é ünïcode `€` node ");
}

#[test]
fn a_declaration_is_checked_against_the_published_state_without_changing_it() {
    let e = env();
    let mut s = State::default();
    s.add_node(&ctx(&e, 1), K1, None, None).unwrap();
    let ip1: IpAddr = "100.64.1.2".parse().unwrap();
    let set = vec![http("blog", 80)];
    let before = s.clone();
    // New: what would be stored; the state is as it was.
    let out = s.declared(2, &e.file_keys, K1, ip1, set.clone()).unwrap();
    assert_eq!(out.unwrap().len(), 1);
    assert_eq!(s, before);
    assert!(s
        .declare_services(&ctx(&e, 2), K1, ip1, set.clone())
        .unwrap());
    // The same set again (later, and after a restart): unchanged.
    assert_eq!(s.declared(50, &e.file_keys, K1, ip1, set.clone()), Ok(None));
    // From another address: the backend changes.
    let ip9: IpAddr = "100.64.1.9".parse().unwrap();
    assert!(s
        .declared(50, &e.file_keys, K1, ip9, set.clone())
        .unwrap()
        .is_some());
    // Invalid: the error declare_services gives.
    let bad = vec![http("Blog", 80)];
    let err = s
        .declared(50, &e.file_keys, K1, ip1, bad.clone())
        .unwrap_err();
    assert_eq!(
        Err(err),
        s.clone().declare_services(&ctx(&e, 50), K1, ip1, bad)
    );
    assert_eq!(
        s.declared(50, &e.file_keys, K2, ip1, set)
            .unwrap_err()
            .status,
        403
    );
}

#[test]
fn utc_times() {
    assert_eq!(utc(0), "1970-01-01T00:00:00Z");
    assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(utc(1_796_290_335), "2026-12-03T09:32:15Z");
    assert_eq!(utc(4_102_444_799), "2099-12-31T23:59:59Z");
}

/// A `[[peer]]` listing a prefix a joined node holds is refused, naming both;
/// a nested prefix, or the node's own key in the file, is not a conflict.
#[test]
fn a_file_peer_cannot_take_a_joined_nodes_prefix() {
    let e = env();
    let mut s = State::default();
    s.add_node(&ctx(&e, 1), K1, None, None).unwrap();
    let held = s.nodes[K1].allowed_ips.clone();
    let peer = |key: &str, nets: Vec<IpNet>| {
        vec![("[[peer]] #1 (office)".to_string(), key.to_string(), nets)]
    };
    let err = s.file_peer_conflict(&peer(K2, held.clone())).unwrap_err();
    assert!(err.contains("[[peer]] #1 (office)"), "{err}");
    assert!(err.contains(K1), "{err}");
    assert!(err.contains(&held[0].trunc().to_string()), "{err}");
    // Not truncated in the file: the same prefix all the same.
    let host = held[0].addr();
    let loose: IpNet = format!("{host}/32").parse().unwrap();
    assert!(s.file_peer_conflict(&peer(K2, vec![loose])).is_err());
    // The node's pool around it: nested, the longest match decides.
    let wide: IpNet = "100.64.0.0/16".parse().unwrap();
    assert!(s.file_peer_conflict(&peer(K2, vec![wide])).is_ok());
    // The node's own key in the file: the file's peer, no conflict.
    assert!(s.file_peer_conflict(&peer(K1, held)).is_ok());
    assert!(State::default()
        .file_peer_conflict(&peer(K2, vec![loose]))
        .is_ok());
}

/// A config-file peer taken out of the file leaves no declared services
/// behind to hold their hosts against the operator; a joined node's and
/// a remaining file peer's stay.
#[test]
fn a_file_peer_gone_from_the_file_leaves_no_services() {
    let mut e = env();
    e.file_keys.insert(K2.to_string());
    let mut s = State::default();
    s.add_node(&ctx(&e, 1), K1, None, None).unwrap();
    s.set_name(
        &ctx(&e, 1),
        "shop",
        NameRecord {
            owners: vec![K2.to_string()],
            replicas: false,
            expires: None,
            bandwidth: None,
        },
    )
    .unwrap();
    let ip1: IpAddr = "100.64.1.2".parse().unwrap();
    let ip2: IpAddr = "100.64.7.2".parse().unwrap();
    s.declare_services(&ctx(&e, 2), K1, ip1, vec![http("blog", 80)])
        .unwrap();
    s.declare_services(&ctx(&e, 2), K2, ip2, vec![http("shop", 80)])
        .unwrap();
    // Still in the file: nothing goes.
    let before = s.clone();
    assert!(s.drop_services_of_non_peers(&e.file_keys).is_empty());
    assert_eq!(s, before);
    let err = s
        .create_route(&ctx(&e, 3), spec("shop", "100.64.0.2:80"))
        .unwrap_err();
    assert_eq!(err.status, 409, "{err}");
    // Taken out of the file: its services go, the node's stay, and the
    // operator may route the host.
    e.file_keys.clear();
    assert_eq!(
        s.drop_services_of_non_peers(&e.file_keys),
        vec![K2.to_string()]
    );
    assert!(!s.services.contains_key(K2));
    assert!(s.services.contains_key(K1));
    assert_eq!(s.version, before.version + 1);
    let (_, created) = s
        .create_route(&ctx(&e, 3), spec("shop", "100.64.0.2:80"))
        .unwrap();
    assert!(created);
    // Nothing more to drop: no change, no bump.
    let v = s.version;
    assert!(s.drop_services_of_non_peers(&e.file_keys).is_empty());
    assert_eq!(s.version, v);
}

/// A peer's allowed IPs are routed into its tunnel: loopback, link-local,
/// multicast, unspecified and broadcast prefixes (or any holding one) are
/// refused with 400 naming the prefix, and nothing is stored.
#[test]
fn special_prefixes_are_no_peers() {
    let e = env();
    let mut s = State::default();
    for (n, why) in [
        ("169.254.169.254/32", "link-local"),
        ("127.0.0.0/8", "loopback"),
        ("127.0.0.1/32", "loopback"),
        ("0.0.0.0/0", "unspecified"),
        ("0.0.0.0/1", "unspecified"),
        ("64.0.0.0/2", "loopback"),
        ("160.0.0.0/3", "link-local"),
        ("239.1.2.0/24", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("fe80::/64", "link-local"),
        ("::1/128", "loopback"),
        ("::/0", "unspecified"),
        ("ff02::1/128", "multicast"),
        ("::ffff:169.254.0.0/112", "link-local"),
    ] {
        let err = s
            .add_node(&ctx(&e, 1), K1, None, Some(vec![n.parse().unwrap()]))
            .unwrap_err();
        assert_eq!(err.status, 400, "{n}: {err}");
        assert!(err.message.contains(&format!("`{n}`")), "{n}: {err}");
        assert!(err.message.contains(why), "{n}: {err}");
    }
    assert!(s.nodes.is_empty());
    assert_eq!(s.version, 0);
    // Next to them, ordinary prefixes are taken.
    for (k, n) in [
        (K1, "192.0.2.0/24"),
        (K2, "2001:db8::/48"),
        (K3, "169.253.0.0/16"),
    ] {
        s.add_node(&ctx(&e, 2), k, None, Some(vec![n.parse().unwrap()]))
            .unwrap();
    }
}

/// A node's client address rules are capped per service and over all of
/// its services: beyond, the call is refused with 400 naming the limit.
#[test]
fn a_nodes_allow_and_deny_rules_are_capped() {
    let e = env();
    let mut s = State::default();
    let ip1 = s.add_node(&ctx(&e, 1), K1, None, None).unwrap().allowed_ips[0].addr();
    // Distinct networks: 10.a.b.0/24.
    let nets = |from: usize, n: usize| -> Vec<String> {
        (from..from + n)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
            .collect()
    };
    let ruled = |name: &str, allow: Vec<String>, deny: Vec<String>| ServiceDecl {
        allow,
        deny,
        ..http(name, 80)
    };
    let full = ruled(
        "a",
        nets(0, MAX_SERVICE_RULES - 1),
        nets(MAX_SERVICE_RULES, 1),
    );
    assert!(s
        .declare_services(&ctx(&e, 2), K1, ip1, vec![full.clone()])
        .unwrap());
    let over = ruled("a", nets(0, MAX_SERVICE_RULES), nets(MAX_SERVICE_RULES, 1));
    let err = s
        .declare_services(&ctx(&e, 3), K1, ip1, vec![over])
        .unwrap_err();
    assert_eq!(err.status, 400);
    assert!(
        err.message.contains(&MAX_SERVICE_RULES.to_string()),
        "{err}"
    );
    // Four full services fit; a fifth rule more does not.
    let per = MAX_NODE_RULES / MAX_SERVICE_RULES;
    let mut set: Vec<ServiceDecl> = (0..per)
        .map(|i| {
            ruled(
                &format!("s{i}"),
                nets(i * MAX_SERVICE_RULES, MAX_SERVICE_RULES),
                vec![],
            )
        })
        .collect();
    assert!(s
        .declare_services(&ctx(&e, 4), K1, ip1, set.clone())
        .unwrap());
    set.push(ruled("more", vec![], nets(MAX_NODE_RULES, 1)));
    let err = s.declare_services(&ctx(&e, 5), K1, ip1, set).unwrap_err();
    assert_eq!(err.status, 400);
    assert!(err.message.contains(&MAX_NODE_RULES.to_string()), "{err}");
    assert_eq!(
        s.services[K1].len(),
        per,
        "the refused call changed nothing"
    );
}
