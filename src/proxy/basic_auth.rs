//! HTTP Basic authentication at the edge, for terminated routes
//! (`basic_auth_file`): an htpasswd file of bcrypt entries (`htpasswd -B`),
//! checked before a request reaches any backend.
//!
//! Parsing ([`Htpasswd::parse`], [`credentials`]) is pure. Checking is bcrypt,
//! slow on purpose (cost 5, `htpasswd -B`'s default, takes about 2 ms; cost
//! 10 about 60 ms), so [`BasicAuth::check`] runs it on tokio's blocking pool,
//! at most [`VERIFY_SLOTS`] at a time over the whole hub, and remembers a
//! success (a SHA-256 of user, password and hash, in a bounded set) so a
//! client's following requests cost one hash. A user the file does not know
//! is checked against a real hash all the same, so response times do not tell
//! which users exist. Failures are never remembered. At most
//! [`MAX_WAITING`] checks wait for a slot at once; more are answered
//! [`Checked::Busy`] at once (a flood of wrong passwords would otherwise
//! queue every user behind it, on every route).
//!
//! The hashes never appear in `Debug` output or logs.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use base64::Engine as _;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

/// bcrypt checks running at once, over every route.
pub const VERIFY_SLOTS: usize = 4;
/// Remembered successes per route; the set is emptied when full.
const CACHE: usize = 4096;
/// Highest bcrypt cost accepted: each step doubles the time of a check.
pub const MAX_COST: u32 = 14;
/// Longest header value looked at.
const MAX_HEADER: usize = 4096;

/// bcrypt checks waiting for a slot at most, over every route: at cost 10,
/// about a second of work for the four slots.
pub const MAX_WAITING: usize = 64;

static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(VERIFY_SLOTS);
static WAITING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// What [`BasicAuth::check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// The user, with the right password.
    User(String),
    /// No credentials, an unknown user or a wrong password.
    Denied,
    /// Too many checks wait already: try again shortly.
    Busy,
}

/// A place among the checks waiting or running, given back when dropped
/// (also when the request is cancelled).
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl Waiting<'_> {
    fn take(count: &std::sync::atomic::AtomicUsize) -> Option<Waiting<'_>> {
        use std::sync::atomic::Ordering::Relaxed;
        count
            .fetch_update(Relaxed, Relaxed, |n| {
                (n < MAX_WAITING + VERIFY_SLOTS).then_some(n + 1)
            })
            .ok()
            .map(|_| Waiting(count))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The users of an htpasswd file: name → bcrypt hash.
#[derive(Clone, PartialEq, Eq)]
pub struct Htpasswd {
    users: HashMap<String, String>,
    /// Any one of the hashes, checked for unknown users.
    decoy: String,
}

impl fmt::Debug for Htpasswd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&str> = self.users.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("Htpasswd").field("users", &names).finish()
    }
}

impl Htpasswd {
    /// Parses `user:hash` lines (blank lines and `#` comments skipped). Only
    /// bcrypt hashes (`$2y$`, `$2b$`, `$2a$`) of cost at most [`MAX_COST`]
    /// are accepted; errors name the line, never its hash.
    pub fn parse(text: &str) -> Result<Htpasswd, String> {
        let mut users = HashMap::new();
        let mut decoy = None;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(format!("line {n}: expected `user:hash`"));
            };
            if user.is_empty() {
                return Err(format!("line {n}: empty user name"));
            }
            let parts: bcrypt::HashParts = hash.parse().map_err(|_| {
                format!(
                    "line {n} (user `{user}`): not a bcrypt hash (make one with `htpasswd -nB {user}`)"
                )
            })?;
            if !(4..=MAX_COST).contains(&parts.get_cost()) {
                return Err(format!(
                    "line {n} (user `{user}`): bcrypt cost {} (use 4 to {MAX_COST}; every step doubles the time of each check)",
                    parts.get_cost()
                ));
            }
            if users.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(format!("line {n}: user `{user}` appears twice"));
            }
            // The costliest hash: an unknown user's check takes as long as
            // the slowest known one's, so timing does not tell them apart.
            if decoy.as_ref().is_none_or(|(c, _)| parts.get_cost() > *c) {
                decoy = Some((parts.get_cost(), hash.to_string()));
            }
        }
        let Some((_, decoy)) = decoy else {
            return Err("no users".into());
        };
        Ok(Htpasswd { users, decoy })
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True when there are no users (never, for a parsed file).
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// Reads and parses an htpasswd file; errors name the file.
pub fn load(path: &std::path::Path) -> Result<Htpasswd, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("basic_auth_file {}: {e}", path.display()))?;
    Htpasswd::parse(&text).map_err(|e| format!("basic_auth_file {}: {e}", path.display()))
}

/// The user and password of an `Authorization: Basic ...` header value;
/// `None` for any other scheme or a malformed value.
pub fn credentials(value: &[u8]) -> Option<(String, String)> {
    if value.len() > MAX_HEADER {
        return None;
    }
    let s = std::str::from_utf8(value).ok()?.trim();
    let (scheme, rest) = s.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_string(), pass.to_string()))
}

/// A route's users and its remembered successes.
pub struct BasicAuth {
    file: Arc<Htpasswd>,
    seen: parking_lot::Mutex<HashSet<[u8; 32]>>,
}

impl fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BasicAuth")
            .field("users", &self.file.len())
            .finish()
    }
}

fn fingerprint(user: &str, pass: &str, hash: &str) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [user, pass, hash] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part.as_bytes());
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

impl BasicAuth {
    /// Checks against `file`'s users.
    pub fn new(file: Htpasswd) -> BasicAuth {
        BasicAuth {
            file: Arc::new(file),
            seen: parking_lot::Mutex::new(HashSet::new()),
        }
    }

    /// Whether `header` (the request's `Authorization` value) names a user
    /// of the file with the right password.
    pub async fn check(&self, header: Option<&[u8]>) -> Checked {
        self.check_counted(header, &WAITING).await
    }

    /// [`BasicAuth::check`], counting the checks waiting or running in
    /// `waiting`.
    async fn check_counted(
        &self,
        header: Option<&[u8]>,
        waiting: &'static std::sync::atomic::AtomicUsize,
    ) -> Checked {
        let Some((user, pass)) = header.and_then(credentials) else {
            return Checked::Denied;
        };
        let (hash, known) = match self.file.users.get(&user) {
            Some(h) => (h.clone(), true),
            None => (self.file.decoy.clone(), false),
        };
        let fp = fingerprint(&user, &pass, &hash);
        if known && self.seen.lock().contains(&fp) {
            return Checked::User(user);
        }
        let Some(waiting) = Waiting::take(waiting) else {
            return Checked::Busy;
        };
        let Ok(slot) = SLOTS.acquire().await else {
            return Checked::Busy;
        };
        // The places go with the check, not with the request: a client
        // that hangs up does not free them while bcrypt still runs.
        let ok = tokio::task::spawn_blocking(move || {
            let _held = (waiting, slot);
            bcrypt::verify(pass, &hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        if ok && known {
            let mut seen = self.seen.lock();
            if seen.len() >= CACHE {
                seen.clear();
            }
            seen.insert(fp);
        }
        if ok && known {
            Checked::User(user)
        } else {
            Checked::Denied
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // `htpasswd -nbB alice wonderland` (cost 5).
    const ALICE: &str = "alice:$2y$05$VF4CIya8FRgqVkubU2o/eORL8tXwoh1e4dqgFYa1NiJETnqr9KMPe";

    fn file(extra: &str) -> String {
        format!("# users\n\n{ALICE}\n{extra}")
    }

    #[test]
    fn the_decoy_is_the_costliest_hash() {
        let cheap = bcrypt::hash("a", 4).unwrap();
        let dear = bcrypt::hash("b", 6).unwrap();
        let h = Htpasswd::parse(&format!("x:{cheap}\ny:{dear}\nz:{cheap}\n")).unwrap();
        assert_eq!(h.decoy, dear);
        let h = Htpasswd::parse(&format!("y:{dear}\nx:{cheap}\n")).unwrap();
        assert_eq!(h.decoy, dear);
    }

    #[test]
    fn parses_and_hides_hashes() {
        let bob = bcrypt::hash("builder", 4).unwrap();
        let h = Htpasswd::parse(&file(&format!("bob:{bob}\n"))).unwrap();
        assert_eq!(h.len(), 2);
        let dbg = format!("{h:?} {:?}", BasicAuth::new(h.clone()));
        assert!(dbg.contains("alice") && dbg.contains("bob"), "{dbg}");
        assert!(!dbg.contains("$2"), "no hash in Debug: {dbg}");
    }

    #[test]
    fn bad_files_name_the_line_not_the_hash() {
        for (text, want) in [
            ("", "no users"),
            ("# only a comment\n", "no users"),
            ("alice\n", "line 1: expected `user:hash`"),
            (
                ":$2y$05$VF4CIya8FRgqVkubU2o/eORL8tXwoh1e4dqgFYa1NiJETnqr9KMPe",
                "empty user",
            ),
            (
                "\ncarol:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n",
                "line 2 (user `carol`): not a bcrypt hash",
            ),
            ("dave:$apr1$abc$def\n", "not a bcrypt hash"),
            (
                "erin:$2y$31$VF4CIya8FRgqVkubU2o/eORL8tXwoh1e4dqgFYa1NiJETnqr9KMPe\n",
                "bcrypt cost 31",
            ),
        ] {
            let e = Htpasswd::parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains("$2y$"), "{e}");
        }
        let e = Htpasswd::parse(&file(&format!("{ALICE}\n"))).unwrap_err();
        assert!(e.contains("line 4: user `alice` appears twice"), "{e}");
    }

    #[test]
    fn header_values() {
        let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let basic = format!("Basic {}", enc("alice:won:der"));
        assert_eq!(
            credentials(basic.as_bytes()),
            Some(("alice".into(), "won:der".into())),
            "the password may hold colons"
        );
        let lower = format!("basic   {}  ", enc("a:"));
        assert_eq!(credentials(lower.as_bytes()), Some(("a".into(), "".into())));
        for bad in [
            format!("Bearer {}", enc("a:b")),
            "Basic".to_string(),
            "Basic !!!".to_string(),
            format!("Basic {}", enc("no-colon")),
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode([0xff, b':'])
            ),
            format!("Basic {}", "A".repeat(MAX_HEADER)),
        ] {
            assert_eq!(credentials(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_flood_of_checks_is_told_to_wait_not_queued() {
        let a = BasicAuth::new(Htpasswd::parse(&file("")).unwrap());
        let hdr = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("alice:wonderland")
        );
        static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let count = &COUNT;
        let held: Vec<_> = (0..MAX_WAITING + VERIFY_SLOTS)
            .map(|_| Waiting::take(count).unwrap())
            .collect();
        assert!(Waiting::take(count).is_none());
        assert_eq!(
            a.check_counted(Some(hdr.as_bytes()), count).await,
            Checked::Busy
        );
        drop(held);
        assert_eq!(
            a.check_counted(Some(hdr.as_bytes()), count).await,
            Checked::User("alice".into())
        );
        // Remembered: no bcrypt, no place needed.
        let held: Vec<_> = (0..MAX_WAITING + VERIFY_SLOTS)
            .map(|_| Waiting::take(count).unwrap())
            .collect();
        assert_eq!(
            a.check_counted(Some(hdr.as_bytes()), count).await,
            Checked::User("alice".into())
        );
        drop(held);
        assert_eq!(count.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn checks_and_remembers_only_successes() {
        let a = BasicAuth::new(Htpasswd::parse(&file("")).unwrap());
        let hdr = |u: &str, p: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        };
        let alice = Checked::User("alice".to_string());
        assert_eq!(
            a.check(Some(hdr("alice", "wonderland").as_bytes())).await,
            alice
        );
        assert_eq!(a.seen.lock().len(), 1);
        assert_eq!(
            a.check(Some(hdr("alice", "wonderland").as_bytes())).await,
            alice
        );
        assert_eq!(
            a.check(Some(hdr("alice", "wonderlanD").as_bytes())).await,
            Checked::Denied
        );
        // Alice's password under another name: the decoy hash matches, the
        // user is unknown, so no.
        assert_eq!(
            a.check(Some(hdr("mallory", "wonderland").as_bytes())).await,
            Checked::Denied
        );
        assert_eq!(a.check(None).await, Checked::Denied);
        assert_eq!(a.seen.lock().len(), 1, "failures are not remembered");
    }

    proptest! {
        #[test]
        fn credentials_round_trip(user in "[^:\\x00]{0,40}", pass in "\\PC{0,60}") {
            let v = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
            );
            prop_assert_eq!(credentials(v.as_bytes()), Some((user, pass)));
        }

        #[test]
        fn credentials_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = credentials(&bytes);
        }
    }
}
