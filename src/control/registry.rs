//! Name ownership: may this node key serve this name?
//!
//! [`NameRegistry`] is the seam where another source of truth plugs in (a
//! blockchain name contract, an HTTP service): an implementation answers from
//! what it knows, and the hub asks again every `[control] revalidate` seconds,
//! so an expired or transferred name loses its routes without a restart. A
//! registry that has to fetch should cache and refresh in the background; the
//! call itself must not block.
//!
//! [`LocalRegistry`], the default, answers from the names kept in the hub's own
//! durable state (`PUT /v1/names/{name}`, join tokens), with an expiry and a
//! grace period after it.

use crate::control::state::State;

/// The answer for one (name, key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// The reason, for the node's log and the API.
    Refused(String),
}

pub trait NameRegistry: Send + Sync {
    /// May `key` (base64) serve `name` (a label or an fqdn) at `now`?
    fn verdict(&self, state: &State, name: &str, key: &str, now: u64) -> Verdict;
}

/// Names from the hub's state: owners, replicas, expiry plus `grace` seconds.
#[derive(Debug, Clone, Copy)]
pub struct LocalRegistry {
    pub grace: u64,
}

impl NameRegistry for LocalRegistry {
    fn verdict(&self, state: &State, name: &str, key: &str, now: u64) -> Verdict {
        let Some(r) = state.names.get(name) else {
            return Verdict::Refused(format!(
                "name `{name}` is not granted to this node (ask the hub operator for a join token or `gatewire ctl name set`)"
            ));
        };
        if let Some(exp) = r.expires {
            if now >= exp.saturating_add(self.grace) {
                return Verdict::Refused(format!(
                    "name `{name}` expired at {exp} (grace period over)"
                ));
            }
        }
        match r.owners.iter().position(|o| o == key) {
            Some(0) => Verdict::Allowed,
            Some(_) if r.replicas => Verdict::Allowed,
            Some(_) => Verdict::Refused(format!(
                "name `{name}` is owned by {} and does not allow replicas",
                r.owners.first().map_or("?", |s| s.as_str())
            )),
            None => Verdict::Refused(format!(
                "name `{name}` is owned by {}{}",
                r.owners.first().map_or("?", |s| s.as_str()),
                if r.replicas {
                    "; its owner allows replicas, but this node is not one of them"
                } else {
                    " and does not allow replicas"
                }
            )),
        }
    }
}
