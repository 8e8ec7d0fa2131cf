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
//! The first claim of a host holds it (etcd's create-if-absent transaction
//! decides between two hubs granting at once). A hub whose grant names the
//! claim's owner serves the name (a node on several hubs keeps its name on
//! all of them); a hub whose grant names another node refuses that node's
//! routes for the name, and its API refuses the grant with 409. A claim
//! stays without a lease (a hub's restart does not free its names); the hub
//! that wrote it rewrites it when its grant changes (owner, expiry) and
//! deletes it when the grant goes; a claim past its expiry and the grace
//! period may be taken over by any hub.
//!
//! This file is the pure core: the value's format, the hosts of a name, the
//! plan (what to write, what is in conflict) and the verdict. The driver
//! ([`super::etcd`]) runs the plan; [`crate::control`] asks for verdicts.

use crate::proxy::names::{DomainName, Label};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Longest claim value taken from etcd.
pub const MAX_CLAIM: usize = 1024;

/// One host's claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    /// The node key (base64) the host belongs to.
    pub owner: String,
    /// The mesh name of the hub that wrote the claim.
    pub hub: String,
    /// Unix seconds; the claim may be taken over after this plus the grace
    /// period. `None`: no expiry.
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

    /// Whether `now` is past the expiry and `grace` seconds after it.
    pub fn lapsed(&self, now: u64, grace: u64) -> bool {
        self.expires.is_some_and(|e| now >= e.saturating_add(grace))
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

/// What this hub's grants ask for: host → (owner, expiry).
pub type Wants = BTreeMap<DomainName, (String, Option<u64>)>;

/// The claims as read from etcd: host → (claim, its exact bytes, which the
/// transactions compare against).
pub type Claims = BTreeMap<DomainName, (Claim, Vec<u8>)>;

/// `grants`: (registry name, owner, expiry) of each name this hub grants.
/// A host two names stand for goes to the first.
pub fn wants<'a>(
    grants: impl IntoIterator<Item = (&'a str, &'a str, Option<u64>)>,
    domains: &[DomainName],
) -> Wants {
    let mut w = Wants::new();
    for (name, owner, expires) in grants {
        for h in hosts_of(name, domains) {
            w.entry(h).or_insert_with(|| (owner.to_string(), expires));
        }
    }
    w
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
/// another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub host: DomainName,
    pub want: String,
    pub held: Claim,
}

/// What this hub (`me`) has to write to make the claims match its grants,
/// and where another hub's claim is in the way.
pub fn plan(
    me: &str,
    wants: &Wants,
    claims: &Claims,
    now: u64,
    grace: u64,
) -> (Vec<(DomainName, Action)>, Vec<Conflict>) {
    let mut actions = Vec::new();
    let mut conflicts = Vec::new();
    for (host, (owner, expires)) in wants {
        let mine = Claim {
            owner: owner.clone(),
            hub: me.to_string(),
            expires: *expires,
        };
        let Some((held, raw)) = claims.get(host) else {
            actions.push((host.clone(), Action::Create(mine)));
            continue;
        };
        let replace = || Action::Replace {
            old: raw.clone(),
            claim: mine.clone(),
        };
        if held.owner == *owner {
            // Ours to keep up to date; another hub's for the same node
            // stands until it lapses (then this hub's grant carries it on).
            let stale = held.hub == me && held.expires != *expires;
            let carry = held.hub != me && held.lapsed(now, grace) && !mine.lapsed(now, grace);
            if stale || carry {
                actions.push((host.clone(), replace()));
            }
        } else if held.hub == me || held.lapsed(now, grace) {
            // This hub's grant changed hands, or the holder's claim lapsed.
            actions.push((host.clone(), replace()));
        } else {
            conflicts.push(Conflict {
                host: host.clone(),
                want: owner.clone(),
                held: held.clone(),
            });
        }
    }
    for (host, (held, raw)) in claims {
        if held.hub == me && !wants.contains_key(host) {
            actions.push((host.clone(), Action::Release { old: raw.clone() }));
        }
    }
    (actions, conflicts)
}

/// Why `owner` may not serve `name` here, if another hub's claim on one of
/// its hosts names another node (claims this hub wrote itself are about to
/// be rewritten, and lapsed claims may be taken over).
pub fn refusal(
    me: &str,
    name: &str,
    owner: &str,
    domains: &[DomainName],
    claims: &Claims,
    now: u64,
    grace: u64,
) -> Option<String> {
    hosts_of(name, domains).into_iter().find_map(|h| {
        let (c, _) = claims.get(&h)?;
        (c.owner != owner && c.hub != me && !c.lapsed(now, grace)).then(|| {
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
            .map(|(h, c)| (d(h), (c.clone(), c.encode())))
            .collect()
    }

    #[test]
    fn a_claim_reads_back_and_bad_ones_are_refused_without_their_value() {
        let c = claim(K1, "hub-a", Some(5));
        assert_eq!(decode(&c.encode()).unwrap(), c);
        assert_eq!(
            String::from_utf8(claim(K1, "hub-a", None).encode()).unwrap(),
            format!("{{\"owner\":\"{K1}\",\"hub\":\"hub-a\"}}")
        );
        assert_eq!(
            decode(&claim("nope", "hub-a", None).encode()),
            Err(ClaimError::Owner)
        );
        assert_eq!(
            decode(&claim(K1, "Hub A", None).encode()),
            Err(ClaimError::Hub)
        );
        let e = decode(b"{\"owner\":\"secret-looking\",\"hub\":\"a\",\"x\":1}").unwrap_err();
        assert!(matches!(e, ClaimError::Format(_)));
        assert!(!e.to_string().contains("secret-looking"), "{e}");
        assert_eq!(decode(&[b' '; 2000]), Err(ClaimError::TooLong(2000)));
        assert_eq!(decode_key("blog.gw.test"), Ok(d("blog.gw.test")));
        assert_eq!(decode_key("Blog.gw.test"), Err(ClaimError::Key));
        assert_eq!(decode_key(""), Err(ClaimError::Key));
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
    fn the_first_claim_holds_and_the_same_node_is_served_through_any_hub() {
        let doms = [d("gw.test")];
        let w = wants([("blog", K1, None)], &doms);
        // Nothing claimed: create.
        let (a, c) = plan("hub-a", &w, &Claims::new(), 0, 60);
        assert_eq!(
            a,
            vec![(d("blog.gw.test"), Action::Create(claim(K1, "hub-a", None)))]
        );
        assert!(c.is_empty());
        // Hub B holds it for the same node: nothing to do, no refusal.
        let held = claims(&[("blog.gw.test", claim(K1, "hub-b", None))]);
        assert_eq!(plan("hub-a", &w, &held, 0, 60), (vec![], vec![]));
        assert_eq!(refusal("hub-a", "blog", K1, &doms, &held, 0, 60), None);
        // For another node: a conflict, and that node's routes are refused.
        let w2 = wants([("blog", K2, None)], &doms);
        let (a, c) = plan("hub-a", &w2, &held, 0, 60);
        assert!(a.is_empty());
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].held.hub, "hub-b");
        let r = refusal("hub-a", "blog", K2, &doms, &held, 0, 60).unwrap();
        assert!(
            r.contains("blog.gw.test") && r.contains("hub-b") && r.contains(K1),
            "{r}"
        );
    }

    #[test]
    fn this_hubs_own_claims_follow_its_grants() {
        let doms = [d("gw.test")];
        let held = claims(&[("blog.gw.test", claim(K1, "hub-a", Some(10)))]);
        let raw = claim(K1, "hub-a", Some(10)).encode();
        // Renewed expiry: rewrite.
        let (a, _) = plan(
            "hub-a",
            &wants([("blog", K1, Some(20))], &doms),
            &held,
            0,
            60,
        );
        assert_eq!(
            a,
            vec![(
                d("blog.gw.test"),
                Action::Replace {
                    old: raw.clone(),
                    claim: claim(K1, "hub-a", Some(20))
                }
            )]
        );
        // Granted to another node here: rewrite, and no refusal from our own claim.
        let (a, c) = plan(
            "hub-a",
            &wants([("blog", K2, Some(10))], &doms),
            &held,
            0,
            60,
        );
        assert!(matches!(&a[0].1, Action::Replace { claim, .. } if claim.owner == K2));
        assert!(c.is_empty());
        assert_eq!(refusal("hub-a", "blog", K2, &doms, &held, 0, 60), None);
        // Grant gone: release.
        let (a, _) = plan("hub-a", &Wants::new(), &held, 0, 60);
        assert_eq!(a, vec![(d("blog.gw.test"), Action::Release { old: raw })]);
        // Another hub's claims are never released by this one.
        let other = claims(&[("blog.gw.test", claim(K1, "hub-b", None))]);
        assert!(plan("hub-a", &Wants::new(), &other, 0, 60).0.is_empty());
    }

    #[test]
    fn a_lapsed_claim_is_taken_over() {
        let doms = [d("gw.test")];
        let held = claims(&[("blog.gw.test", claim(K1, "hub-b", Some(100)))]);
        let w = wants([("blog", K2, None)], &doms);
        // Within the grace period: held.
        assert_eq!(plan("hub-a", &w, &held, 159, 60).1.len(), 1);
        assert!(refusal("hub-a", "blog", K2, &doms, &held, 159, 60).is_some());
        // After it: taken over.
        let (a, c) = plan("hub-a", &w, &held, 160, 60);
        assert!(c.is_empty());
        assert!(
            matches!(&a[0].1, Action::Replace { claim, .. } if claim.owner == K2 && claim.hub == "hub-a")
        );
        assert_eq!(refusal("hub-a", "blog", K2, &doms, &held, 160, 60), None);
        // The same node, renewed here: this hub carries the claim on.
        let (a, _) = plan(
            "hub-a",
            &wants([("blog", K1, Some(500))], &doms),
            &held,
            160,
            60,
        );
        assert!(matches!(&a[0].1, Action::Replace { claim, .. } if claim.hub == "hub-a"));
    }

    fn key() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just(K1), Just(K2)]
    }

    fn hub() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just("hub-a"), Just("hub-b"), Just("hub-c")]
    }

    proptest! {
        /// After the plan's writes, every host this hub wants is either held
        /// for the wanted node or reported as a conflict, never both, and no
        /// other hub's live claim is touched.
        #[test]
        fn the_plan_settles(
            grants in proptest::collection::vec((0usize..4, key(), proptest::option::of(0u64..300)), 0..6),
            held in proptest::collection::vec((0usize..4, key(), hub(), proptest::option::of(0u64..300)), 0..6),
            now in 0u64..400,
        ) {
            let names = ["a", "b", "c", "d"];
            let doms = [d("gw.test")];
            let w = wants(grants.iter().map(|(n, k, e)| (names[*n], *k, *e)), &doms);
            let mut cl = Claims::new();
            for (n, k, h, e) in &held {
                let c = claim(k, h, *e);
                cl.insert(d(&format!("{}.gw.test", names[*n])), (c.clone(), c.encode()));
            }
            let (actions, conflicts) = plan("hub-a", &w, &cl, now, 60);
            let mut after = cl.clone();
            for (h, a) in &actions {
                match a {
                    Action::Create(c) => {
                        prop_assert!(!cl.contains_key(h));
                        after.insert(h.clone(), (c.clone(), c.encode()));
                    }
                    Action::Replace { old, claim } => {
                        let (prev, raw) = &cl[h];
                        prop_assert_eq!(raw, old);
                        prop_assert!(prev.hub == "hub-a" || prev.lapsed(now, 60) || prev.owner == claim.owner);
                        after.insert(h.clone(), (claim.clone(), claim.encode()));
                    }
                    Action::Release { old } => {
                        let (prev, raw) = &cl[h];
                        prop_assert_eq!(raw, old);
                        prop_assert_eq!(prev.hub.as_str(), "hub-a");
                        after.remove(h);
                    }
                }
            }
            for (h, (owner, _)) in &w {
                let held_for_us = after.get(h).is_some_and(|(c, _)| &c.owner == owner);
                let conflict = conflicts.iter().any(|c| &c.host == h);
                prop_assert!(held_for_us != conflict, "{h}: held {held_for_us} conflict {conflict}");
            }
            // A second plan on the result has nothing left to write.
            let (again, _) = plan("hub-a", &w, &after, now, 60);
            prop_assert!(again.is_empty(), "{:?}", again);
        }
    }
}
