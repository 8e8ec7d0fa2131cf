//! Name claims across the mesh: one node per host, whichever hub grants it.
//!
//! Each hub's control plane grants names to node keys (`PUT /v1/names`, join
//! tokens). Without a mesh-wide record two hubs could grant the same name to
//! two different nodes, and every hub would then send that host's
//! connections to either. With a `[mesh]`, every host a granted name stands
//! for (a label under each of the hub's gateway domains, or the fqdn) is
//! claimed in etcd at `<prefix>names/<host>`:
//!
//! ```text
//! {"owner": "<node key, base64>", "hub": "<mesh name of the hub that wrote it>", "expires": 1767225600}
//! ```
//!
//! `expires` is when the claim lapses: the grant's expiry plus the writing
//! hub's grace period, so every hub reads the same time from it.
//!
//! The first claim of a host holds it (etcd's create-if-absent transaction
//! decides between two hubs granting at once). A hub whose grant names the
//! claim's owner serves the name (a node on several hubs keeps its name on
//! all of them); a hub whose grant names another node refuses that node's
//! routes for the name, and its API refuses the grant with 409. A claim
//! stays without a lease (a hub's restart does not free its names); the hub
//! that wrote it rewrites it when its grant changes (owner, expiry) and
//! deletes it when the grant goes or lapses; a lapsed claim may be taken
//! over by any hub. A claim that cannot be read holds its host against
//! every grant until it is deleted.
//!
//! This file is the pure core: the value's format, the hosts of a name, the
//! plan (what to write, what is in conflict) and the verdict. The driver
//! ([`super::etcd`]) runs the plan; [`crate::control`] asks for verdicts.

use crate::proxy::names::{DomainName, Label};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Longest claim value taken from etcd.
pub const MAX_CLAIM: usize = 1024;

/// One host's claim. Unknown fields are ignored, so that a later version
/// may add some without older hubs losing the claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The node key (base64) the host belongs to.
    pub owner: String,
    /// The mesh name of the hub that wrote the claim.
    pub hub: String,
    /// Unix seconds from which the claim may be taken over (the grant's
    /// expiry plus the writing hub's grace period). `None`: no expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error("the key names no host")]
    Key,
    #[error("the value is {0} bytes, more than {MAX_CLAIM}")]
    TooLong(usize),
    #[error("the value is not a claim: {0}")]
    Format(String),
    #[error("the owner is not a node key")]
    Owner,
    #[error("the hub is not a mesh name")]
    Hub,
}

impl Claim {
    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings and a number: serde_json cannot fail on it.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Whether the claim may be taken over at `now`.
    pub fn lapsed(&self, now: u64) -> bool {
        self.expires.is_some_and(|e| now >= e)
    }
}

/// The host of a claim key's path (the part after `<prefix>names/`).
pub fn decode_key(path: &str) -> Result<DomainName, ClaimError> {
    let d = DomainName::parse(path).map_err(|_| ClaimError::Key)?;
    // Only the normalised spelling: one host, one key.
    if d.as_str() != path {
        return Err(ClaimError::Key);
    }
    Ok(d)
}

/// A claim value read from etcd. Error messages never quote the value.
pub fn decode(value: &[u8]) -> Result<Claim, ClaimError> {
    if value.len() > MAX_CLAIM {
        return Err(ClaimError::TooLong(value.len()));
    }
    let c: Claim = serde_json::from_slice(value).map_err(|e| {
        // serde's message can quote the input; keep only where it broke.
        ClaimError::Format(format!("line {} column {}", e.line(), e.column()))
    })?;
    if crate::keys::PublicKey::from_base64(&c.owner).is_err() {
        return Err(ClaimError::Owner);
    }
    if !super::table::valid_name(&c.hub) {
        return Err(ClaimError::Hub);
    }
    Ok(c)
}

/// The hosts a registry name stands for on a hub with `domains`: a label
/// under each gateway domain, or the fqdn itself. Empty when the name is
/// neither (or a label on a hub without gateway domains).
pub fn hosts_of(name: &str, domains: &[DomainName]) -> Vec<DomainName> {
    if name.contains('.') {
        return DomainName::parse(name).into_iter().collect();
    }
    match Label::parse(name) {
        Ok(l) => domains.iter().filter_map(|d| l.under(d)).collect(),
        Err(_) => Vec::new(),
    }
}

/// What this hub's grants ask for: host → (owner, when the claim lapses).
pub type Wants = BTreeMap<DomainName, (String, Option<u64>)>;

/// The claims as read from etcd: host → (the claim, `None` when it cannot
/// be read; its exact bytes, which the transactions compare against).
pub type Claims = BTreeMap<DomainName, Entry>;

/// A claim as read (`None`: it cannot be read) and its exact bytes.
pub type Entry = (Option<Claim>, Vec<u8>);

/// `grants`: (registry name, owner, expiry) of each name this hub grants;
/// a claim lapses `grace` seconds after the expiry. Grants whose claim
/// would have lapsed at `now` ask for nothing. A host two names stand for
/// goes to the first.
pub fn wants<'a>(
    grants: impl IntoIterator<Item = (&'a str, &'a str, Option<u64>)>,
    domains: &[DomainName],
    now: u64,
    grace: u64,
) -> Wants {
    let mut w = Wants::new();
    for (name, owner, expires) in grants {
        let until = expires.map(|e| e.saturating_add(grace));
        if until.is_some_and(|u| now >= u) {
            continue;
        }
        for h in hosts_of(name, domains) {
            w.entry(h).or_insert_with(|| (owner.to_string(), until));
        }
    }
    w
}

/// The file a hub keeps the claims in across restarts: JSON, host to the
/// claim's stored bytes in base64 (unreadable ones included), and the mesh
/// (its etcd prefix) they were read from.
#[derive(Serialize, Deserialize)]
struct Cache {
    v: u32,
    /// Absent in files of older releases: taken as this mesh's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    claims: BTreeMap<String, String>,
}

/// Longest cache file read.
pub const MAX_CACHE: usize = 64 * 1024 * 1024;

pub fn encode_cache(claims: &Claims, prefix: &str) -> Vec<u8> {
    use base64::Engine as _;
    let c = Cache {
        v: 1,
        prefix: Some(prefix.to_string()),
        claims: claims
            .iter()
            .map(|(h, (_, raw))| {
                (
                    h.to_string(),
                    base64::engine::general_purpose::STANDARD.encode(raw),
                )
            })
            .collect(),
    };
    serde_json::to_vec(&c).unwrap_or_default()
}

/// The claims of a cache file written for the mesh at `prefix`: each key
/// and value checked as if read from etcd (bad keys left out, bad values
/// kept as unreadable).
pub fn decode_cache(bytes: &[u8], prefix: &str) -> Result<Claims, String> {
    use base64::Engine as _;
    if bytes.len() > MAX_CACHE {
        return Err(format!("{} bytes, more than {MAX_CACHE}", bytes.len()));
    }
    let c: Cache = serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "not a claims file (line {} column {})",
            e.line(),
            e.column()
        )
    })?;
    if c.v != 1 {
        return Err(format!("version {} (this hub reads 1)", c.v));
    }
    if let Some(p) = c.prefix.as_deref().filter(|p| *p != prefix) {
        return Err(format!(
            "the claims of the mesh at prefix {p}, not of this one ({prefix})"
        ));
    }
    let mut out = Claims::new();
    for (h, b64) in c.claims {
        let (Ok(host), Ok(raw)) = (
            decode_key(&h),
            base64::engine::general_purpose::STANDARD.decode(b64),
        ) else {
            continue;
        };
        out.insert(host, (decode(&raw).ok(), raw));
    }
    Ok(out)
}

/// One write the plan asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write `claim` if the key does not exist.
    Create(Claim),
    /// Write `claim` if the key still holds `old`.
    Replace { old: Vec<u8>, claim: Claim },
    /// Delete the key if it still holds `old`.
    Release { old: Vec<u8> },
}

/// A host this hub grants to `want` that another hub's claim holds for
/// another node (`held`), or that a claim nobody can read holds (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub host: DomainName,
    pub want: String,
    pub held: Option<Claim>,
}

/// What this hub (`me`) has to write to make the claims match its grants,
/// and where another hub's claim (or an unreadable one) is in the way.
pub fn plan(
    me: &str,
    wants: &Wants,
    claims: &Claims,
    now: u64,
) -> (Vec<(DomainName, Action)>, Vec<Conflict>) {
    let mut actions = Vec::new();
    let mut conflicts = Vec::new();
    for (host, (owner, until)) in wants {
        let mine = Claim {
            owner: owner.clone(),
            hub: me.to_string(),
            expires: *until,
        };
        let Some((held, raw)) = claims.get(host) else {
            actions.push((host.clone(), Action::Create(mine)));
            continue;
        };
        let conflict = |held: Option<&Claim>| Conflict {
            host: host.clone(),
            want: owner.clone(),
            held: held.cloned(),
        };
        let Some(held) = held else {
            conflicts.push(conflict(None));
            continue;
        };
        let write = if held.owner == *owner {
            // Ours to keep up to date; another hub's for the same node
            // stands until it lapses (then this hub's grant carries it on).
            (held.hub == me && held.expires != *until) || (held.hub != me && held.lapsed(now))
        } else if held.hub == me || held.lapsed(now) {
            // This hub's grant changed hands, or the holder's claim lapsed.
            true
        } else {
            conflicts.push(conflict(Some(held)));
            false
        };
        if write {
            let old = raw.clone();
            actions.push((host.clone(), Action::Replace { old, claim: mine }));
        }
    }
    for (host, (held, raw)) in claims {
        if held.as_ref().is_some_and(|c| c.hub == me) && !wants.contains_key(host) {
            actions.push((host.clone(), Action::Release { old: raw.clone() }));
        }
    }
    (actions, conflicts)
}

/// Why `owner` may not serve `name` here: another hub's live claim on one
/// of its hosts names another node, or a claim on one cannot be read.
/// Claims this hub wrote itself are about to be rewritten, and lapsed ones
/// may be taken over: neither stands in the way.
pub fn refusal(
    me: &str,
    name: &str,
    owner: &str,
    domains: &[DomainName],
    claims: &Claims,
    now: u64,
) -> Option<String> {
    hosts_of(name, domains).into_iter().find_map(|h| {
        let (c, _) = claims.get(&h)?;
        let Some(c) = c else {
            return Some(format!(
                "`{h}` has a claim in the hub mesh that cannot be read (delete it from etcd)"
            ));
        };
        (c.owner != owner && c.hub != me && !c.lapsed(now)).then(|| {
            format!(
                "`{h}` is held in the hub mesh by node {} (granted through hub `{}`)",
                c.owner, c.hub
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const K1: &str = "ACb8VKRYVDsQLlaM/lmNBlPbVxHPJ+OmXSrSqJ1Pt3I=";
    const K2: &str = "BxZ2Jlx9tRmU1GTQfeWfTBSgDRxKkvq3mOs7q1L0pWY=";

    fn d(s: &str) -> DomainName {
        DomainName::parse(s).unwrap()
    }

    fn claim(owner: &str, hub: &str, expires: Option<u64>) -> Claim {
        Claim {
            owner: owner.into(),
            hub: hub.into(),
            expires,
        }
    }

    fn claims(v: &[(&str, Claim)]) -> Claims {
        v.iter()
            .map(|(h, c)| (d(h), (Some(c.clone()), c.encode())))
            .collect()
    }

    /// Carries out one action the way etcd's transaction would: only when
    /// the key is as the plan saw it. Whether it was written.
    fn run(claims: &mut Claims, host: &DomainName, a: &Action) -> bool {
        match a {
            Action::Create(c) if !claims.contains_key(host) => {
                claims.insert(host.clone(), (Some(c.clone()), c.encode()));
                true
            }
            Action::Replace { old, claim } if claims.get(host).is_some_and(|(_, r)| r == old) => {
                claims.insert(host.clone(), (Some(claim.clone()), claim.encode()));
                true
            }
            Action::Release { old } if claims.get(host).is_some_and(|(_, r)| r == old) => {
                claims.remove(host);
                true
            }
            _ => false,
        }
    }

    #[test]
    fn a_claim_reads_back_and_bad_ones_are_refused_without_their_value() {
        let c = claim(K1, "hub-a", Some(5));
        assert_eq!(decode(&c.encode()).unwrap(), c);
        assert_eq!(
            String::from_utf8(claim(K1, "hub-a", None).encode()).unwrap(),
            format!("{{\"owner\":\"{K1}\",\"hub\":\"hub-a\"}}")
        );
        // A later version's extra field is ignored.
        let later = format!("{{\"owner\":\"{K1}\",\"hub\":\"hub-a\",\"since\":3}}");
        assert_eq!(decode(later.as_bytes()).unwrap(), claim(K1, "hub-a", None));
        assert_eq!(
            decode(&claim("nope", "hub-a", None).encode()),
            Err(ClaimError::Owner)
        );
        assert_eq!(
            decode(&claim(K1, "Hub A", None).encode()),
            Err(ClaimError::Hub)
        );
        let e = decode(b"{\"owner\":\"secret-looking\",\"hub\":7}").unwrap_err();
        assert!(matches!(e, ClaimError::Format(_)));
        assert!(!e.to_string().contains("secret-looking"), "{e}");
        assert_eq!(decode(&[b' '; 2000]), Err(ClaimError::TooLong(2000)));
        assert_eq!(decode_key("blog.gw.test"), Ok(d("blog.gw.test")));
        assert_eq!(decode_key("Blog.gw.test"), Err(ClaimError::Key));
        assert_eq!(decode_key(""), Err(ClaimError::Key));
    }

    #[test]
    fn the_cache_file_keeps_the_claims_as_read() {
        let mut c = claims(&[
            ("blog.gw.test", claim(K1, "hub-a", Some(9))),
            ("shop.gw.test", claim(K2, "hub-b", None)),
        ]);
        c.insert(d("bad.gw.test"), (None, b"\xffnot a claim".to_vec()));
        let p = "/gatewire/mesh/";
        let bytes = encode_cache(&c, p);
        assert_eq!(decode_cache(&bytes, p).unwrap(), c);
        assert!(decode_cache(b"{}", p).is_err());
        assert!(decode_cache(b"{\"v\":2,\"claims\":{}}", p)
            .unwrap_err()
            .contains("version 2"));
        // Another mesh's claims are not this one's.
        let e = decode_cache(&bytes, "/other/").unwrap_err();
        assert!(
            e.contains("/gatewire/mesh/") && e.contains("/other/"),
            "{e}"
        );
        // A bad host is left out; a file of an older release (no prefix)
        // is taken.
        let odd = br#"{"v":1,"claims":{"Not A Host":"e30="}}"#;
        assert!(decode_cache(odd, p).unwrap().is_empty());
    }

    #[test]
    fn a_label_stands_for_a_host_under_each_gateway_domain() {
        let doms = [d("gw.test"), d("gw2.test")];
        assert_eq!(
            hosts_of("blog", &doms),
            vec![d("blog.gw.test"), d("blog.gw2.test")]
        );
        assert_eq!(
            hosts_of("shop.example.com", &doms),
            vec![d("shop.example.com")]
        );
        assert!(hosts_of("blog", &[]).is_empty());
        assert!(hosts_of("bad label", &doms).is_empty());
    }

    #[test]
    fn a_grant_asks_for_its_hosts_until_it_lapses() {
        let doms = [d("gw.test")];
        let w = wants([("blog", K1, Some(100)), ("shop", K2, None)], &doms, 50, 60);
        assert_eq!(w[&d("blog.gw.test")], (K1.to_string(), Some(160)));
        assert_eq!(w[&d("shop.gw.test")], (K2.to_string(), None));
        // Expired and past the grace period: nothing asked.
        let w = wants([("blog", K1, Some(100))], &doms, 160, 60);
        assert!(w.is_empty());
    }

    #[test]
    fn the_first_claim_holds_and_the_same_node_is_served_through_any_hub() {
        let doms = [d("gw.test")];
        let w = wants([("blog", K1, None)], &doms, 0, 60);
        // Nothing claimed: create.
        let (a, c) = plan("hub-a", &w, &Claims::new(), 0);
        assert_eq!(
            a,
            vec![(d("blog.gw.test"), Action::Create(claim(K1, "hub-a", None)))]
        );
        assert!(c.is_empty());
        // Hub B holds it for the same node: nothing to do, no refusal.
        let held = claims(&[("blog.gw.test", claim(K1, "hub-b", None))]);
        assert_eq!(plan("hub-a", &w, &held, 0), (vec![], vec![]));
        assert_eq!(refusal("hub-a", "blog", K1, &doms, &held, 0), None);
        // For another node: a conflict, and that node's routes are refused.
        let w2 = wants([("blog", K2, None)], &doms, 0, 60);
        let (a, c) = plan("hub-a", &w2, &held, 0);
        assert!(a.is_empty());
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].held.as_ref().unwrap().hub, "hub-b");
        let r = refusal("hub-a", "blog", K2, &doms, &held, 0).unwrap();
        assert!(
            r.contains("blog.gw.test") && r.contains("hub-b") && r.contains(K1),
            "{r}"
        );
    }

    #[test]
    fn an_unreadable_claim_holds_its_host_against_everyone() {
        let doms = [d("gw.test")];
        let held: Claims = [(d("blog.gw.test"), (None, b"garbage".to_vec()))].into();
        let w = wants([("blog", K1, None)], &doms, 0, 60);
        let (a, c) = plan("hub-a", &w, &held, 0);
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(c[0].held, None);
        let r = refusal("hub-a", "blog", K1, &doms, &held, 0).unwrap();
        assert!(r.contains("cannot be read"), "{r}");
        // Nor is it released by anyone.
        assert!(plan("hub-a", &Wants::new(), &held, 0).0.is_empty());
    }

    #[test]
    fn this_hubs_own_claims_follow_its_grants() {
        let doms = [d("gw.test")];
        let held = claims(&[("blog.gw.test", claim(K1, "hub-a", Some(70)))]);
        let raw = claim(K1, "hub-a", Some(70)).encode();
        // Renewed expiry: rewrite.
        let (a, _) = plan(
            "hub-a",
            &wants([("blog", K1, Some(20))], &doms, 0, 60),
            &held,
            0,
        );
        assert_eq!(
            a,
            vec![(
                d("blog.gw.test"),
                Action::Replace {
                    old: raw.clone(),
                    claim: claim(K1, "hub-a", Some(80))
                }
            )]
        );
        // Granted to another node here: rewrite, and no refusal from our own claim.
        let (a, c) = plan(
            "hub-a",
            &wants([("blog", K2, Some(10))], &doms, 0, 60),
            &held,
            0,
        );
        assert!(matches!(&a[0].1, Action::Replace { claim, .. } if claim.owner == K2));
        assert!(c.is_empty());
        assert_eq!(refusal("hub-a", "blog", K2, &doms, &held, 0), None);
        // Grant gone, or lapsed: release.
        for w in [Wants::new(), wants([("blog", K1, Some(10))], &doms, 70, 60)] {
            let (a, _) = plan("hub-a", &w, &held, 70);
            assert_eq!(
                a,
                vec![(d("blog.gw.test"), Action::Release { old: raw.clone() })]
            );
        }
        // Another hub's claims are never released by this one.
        let other = claims(&[("blog.gw.test", claim(K1, "hub-b", None))]);
        assert!(plan("hub-a", &Wants::new(), &other, 0).0.is_empty());
    }

    #[test]
    fn a_lapsed_claim_is_taken_over() {
        let doms = [d("gw.test")];
        let held = claims(&[("blog.gw.test", claim(K1, "hub-b", Some(160)))]);
        let w = wants([("blog", K2, None)], &doms, 0, 60);
        // Before it lapses: held.
        assert_eq!(plan("hub-a", &w, &held, 159).1.len(), 1);
        assert!(refusal("hub-a", "blog", K2, &doms, &held, 159).is_some());
        // After: taken over.
        let (a, c) = plan("hub-a", &w, &held, 160);
        assert!(c.is_empty());
        assert!(
            matches!(&a[0].1, Action::Replace { claim, .. } if claim.owner == K2 && claim.hub == "hub-a")
        );
        assert_eq!(refusal("hub-a", "blog", K2, &doms, &held, 160), None);
        // The same node, renewed here: this hub carries the claim on.
        let w = wants([("blog", K1, Some(500))], &doms, 160, 60);
        let (a, _) = plan("hub-a", &w, &held, 160);
        assert!(matches!(&a[0].1, Action::Replace { claim, .. } if claim.hub == "hub-a"));
    }

    fn key() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just(K1), Just(K2)]
    }

    fn hub() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just("hub-a"), Just("hub-b"), Just("hub-c")]
    }

    type Grants = Vec<(usize, &'static str, Option<u64>)>;

    fn grants() -> impl Strategy<Value = Grants> {
        proptest::collection::vec((0usize..4, key(), proptest::option::of(0u64..300)), 0..6)
    }

    proptest! {
        /// Two hubs with their own grants plan in turn against a store that
        /// starts with arbitrary claims: within three rounds each nothing is
        /// left to write, a write never replaced another hub's live claim,
        /// and no host is served for two nodes (each hub either holds a
        /// wanted host for its node, or has it in conflict and refuses it).
        #[test]
        fn two_hubs_settle_and_never_serve_one_host_for_two_nodes(
            ga in grants(),
            gb in grants(),
            held in proptest::collection::vec((0usize..4, key(), hub(), proptest::option::of(0u64..400)), 0..6),
            now in 0u64..400,
        ) {
            let names = ["a", "b", "c", "d"];
            let doms = [d("gw.test")];
            let want = |g: &Grants| wants(g.iter().map(|(n, k, e)| (names[*n], *k, *e)), &doms, now, 60);
            let hubs = [("hub-a", want(&ga)), ("hub-b", want(&gb))];
            let mut store = Claims::new();
            for (n, k, h, e) in &held {
                let c = claim(k, h, *e);
                store.insert(d(&format!("{}.gw.test", names[*n])), (Some(c.clone()), c.encode()));
            }
            for round in 0..4 {
                for (me, w) in &hubs {
                    let (actions, _) = plan(me, w, &store, now);
                    if round == 3 {
                        prop_assert!(actions.is_empty(), "{me} still writes {:?}", actions);
                    }
                    for (h, a) in &actions {
                        let before = store.get(h).and_then(|(c, _)| c.clone());
                        if run(&mut store, h, a) {
                            if let Some(b) = before {
                                prop_assert!(
                                    b.hub == *me || b.lapsed(now) || matches!(a, Action::Replace { claim, .. } if claim.owner == b.owner && b.lapsed(now)),
                                    "{me} overwrote {b:?}"
                                );
                            }
                        }
                    }
                }
            }
            for (me, w) in &hubs {
                let (_, conflicts) = plan(me, w, &store, now);
                for (h, (owner, _)) in w {
                    let served_for_us = store.get(h).is_some_and(|(c, _)| c.as_ref().is_some_and(|c| &c.owner == owner));
                    let conflict = conflicts.iter().any(|c| &c.host == h);
                    prop_assert!(served_for_us != conflict, "{me} {h}: held {served_for_us} conflict {conflict}");
                    let name = h.as_str().split('.').next().unwrap_or("");
                    let refused = refusal(me, name, owner, &doms, &store, now).is_some();
                    prop_assert_eq!(refused, conflict, "{} {}", me, h);
                }
            }
        }
    }
}
