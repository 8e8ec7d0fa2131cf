//! Yggdrasil identity and daemon configuration [pure].
//!
//! * [`PublicKey`] / [`PrivateKey`] / [`Identity`]: ed25519 keys in the
//!   encodings yggdrasil's config uses (docs/yggdrasil.md 2.1): `PrivateKey`
//!   is 128 hex chars (32-byte seed followed by the 32-byte public key, Go's
//!   `ed25519.PrivateKey` layout) in both 0.4.x and 0.5.x; `PublicKey` is
//!   64 hex chars and only present in 0.4.x configs.
//! * [`LinkUri`]: validation of `Listen` / `Peers` / `addPeer` URIs
//!   (docs/yggdrasil.md 2.2, 3.1).
//! * [`DaemonSettings::render`]: the daemon's JSON config (valid HJSON).
//!
//! Randomness is an input: key generation takes a `CryptoRngCore`.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use ed25519_dalek::{SigningKey, VerifyingKey};
use rand_core::CryptoRngCore;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::addr::{addr_for_key, subnet_for_key, YggSubnet, KEY_LEN};
use super::Version;

/// Errors decoding key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Not hexadecimal.
    #[error("{what}: not a hex string")]
    Hex {
        /// Which key was being decoded.
        what: &'static str,
    },
    /// Wrong decoded length.
    #[error("{what}: expected {expected} bytes, got {got}")]
    Length {
        /// Which key was being decoded.
        what: &'static str,
        /// Expected byte length.
        expected: usize,
        /// Actual byte length.
        got: usize,
    },
    /// The public half stored after the seed is not the one derived from it.
    #[error("PrivateKey: stored public half does not match the seed")]
    PublicMismatch,
    /// `PublicKey` in a config does not belong to `PrivateKey`.
    #[error("PublicKey {found} does not belong to PrivateKey (expected {expected})")]
    ConfigPublicMismatch {
        /// Public key derived from the private key.
        expected: PublicKey,
        /// Public key found in the config.
        found: PublicKey,
    },
}

fn decode_hex<const N: usize>(s: &str, what: &'static str) -> Result<[u8; N], KeyError> {
    let v = hex::decode(s.trim()).map_err(|_| KeyError::Hex { what })?;
    let got = v.len();
    v.try_into().map_err(|_| KeyError::Length {
        what,
        expected: N,
        got,
    })
}

/// An ed25519 public key, the node identity (`key` in admin responses).
///
/// Displayed, parsed and (de)serialised as 64 lower-case hex chars.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    /// Wraps raw key bytes (not checked to be a valid curve point: yggdrasil
    /// itself derives addresses from any 32 bytes).
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Parses 64 hex chars.
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        decode_hex(s, "PublicKey").map(Self)
    }

    /// 64 lower-case hex chars.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The node's 200::/7 address.
    pub fn address(&self) -> Ipv6Addr {
        addr_for_key(&self.0)
    }

    /// The node's routed 300::/64 subnet.
    pub fn subnet(&self) -> YggSubnet {
        subnet_for_key(&self.0)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_hex())
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_hex(s)
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// An ed25519 private key. `Debug` prints a mask, never the secret; the
/// secret leaves this type only through [`PrivateKey::to_config_hex`].
#[derive(Clone)]
pub struct PrivateKey(SigningKey);

impl PrivateKey {
    /// A fresh random key.
    pub fn generate<R: CryptoRngCore + ?Sized>(rng: &mut R) -> Self {
        Self(SigningKey::generate(rng))
    }

    /// The key for a 32-byte seed (RFC 8032 secret key).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(seed))
    }

    /// Parses a config `PrivateKey`: 128 hex chars, seed followed by public
    /// key. Unlike `yggdrasil -address` (which trusts the stored public
    /// half), this checks that the public half matches the seed.
    pub fn from_config_hex(s: &str) -> Result<Self, KeyError> {
        let mut raw: [u8; 64] = decode_hex(s, "PrivateKey")?;
        let r = SigningKey::from_keypair_bytes(&raw).map_err(|_| KeyError::PublicMismatch);
        raw.iter_mut().for_each(|b| *b = 0);
        r.map(Self)
    }

    /// The config `PrivateKey` encoding (128 hex chars: seed ‖ public key).
    /// The returned string holds the secret; do not log it.
    pub fn to_config_hex(&self) -> String {
        let mut raw = self.0.to_keypair_bytes();
        let s = hex::encode(raw);
        raw.iter_mut().for_each(|b| *b = 0);
        s
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    /// The underlying signing key (for callers that need to sign).
    pub fn signing_key(&self) -> &SigningKey {
        &self.0
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(<masked>, public {})", self.public_key())
    }
}

/// A node identity: private key plus its derived public key.
#[derive(Clone, Debug)]
pub struct Identity {
    private: PrivateKey,
    public: PublicKey,
}

impl Identity {
    /// A fresh random identity.
    pub fn generate<R: CryptoRngCore + ?Sized>(rng: &mut R) -> Self {
        Self::from_private(PrivateKey::generate(rng))
    }

    /// The identity of a private key.
    pub fn from_private(private: PrivateKey) -> Self {
        let public = private.public_key();
        Self { private, public }
    }

    /// The private key.
    pub fn private_key(&self) -> &PrivateKey {
        &self.private
    }

    /// The public key.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// The node's 200::/7 address.
    pub fn address(&self) -> Ipv6Addr {
        self.public.address()
    }

    /// The node's routed 300::/64 subnet.
    pub fn subnet(&self) -> YggSubnet {
        self.public.subnet()
    }
}

/// Whether `key` is a valid ed25519 point (useful for `AllowedPublicKeys`).
pub fn is_valid_point(key: &PublicKey) -> bool {
    VerifyingKey::from_bytes(key.as_bytes()).is_ok()
}

// ---------------------------------------------------------------------------
// Link URIs
// ---------------------------------------------------------------------------

/// Link transports (the URI scheme).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Scheme {
    /// `tcp://host:port`
    Tcp,
    /// `tls://host:port`
    Tls,
    /// `unix:///path`
    Unix,
    /// `socks://[user:pass@]proxy:port/target:port` (dial only)
    Socks,
    /// `sockstls://…` like socks, TLS to the target (0.5 only, dial only)
    SocksTls,
    /// `quic://host:port` (0.5 only)
    Quic,
    /// `ws://host:port[/path]` (0.5 only)
    Ws,
    /// `wss://host:port[/path]` (0.5 only, dial only)
    Wss,
}

impl Scheme {
    fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "tcp" => Self::Tcp,
            "tls" => Self::Tls,
            "unix" => Self::Unix,
            "socks" => Self::Socks,
            "sockstls" => Self::SocksTls,
            "quic" => Self::Quic,
            "ws" => Self::Ws,
            "wss" => Self::Wss,
            _ => return None,
        })
    }

    /// The scheme as written in URIs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Tls => "tls",
            Self::Unix => "unix",
            Self::Socks => "socks",
            Self::SocksTls => "sockstls",
            Self::Quic => "quic",
            Self::Ws => "ws",
            Self::Wss => "wss",
        }
    }

    fn supported(&self, v: Version, role: UriRole) -> bool {
        let in_04 = matches!(self, Self::Tcp | Self::Tls | Self::Unix | Self::Socks);
        let dial_only = matches!(self, Self::Socks | Self::SocksTls | Self::Wss);
        (v == Version::V0_5 || in_04) && !(role == UriRole::Listen && dial_only)
    }

    fn uses_tls(&self) -> bool {
        matches!(self, Self::Tls | Self::SocksTls | Self::Quic | Self::Wss)
    }
}

/// Whether a URI is for `Listen` or for `Peers` / `addPeer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UriRole {
    /// A listener (`Listen`): port 0 allowed, no `key=` pinning, no SOCKS.
    Listen,
    /// An outbound peer (`Peers`, `InterfacePeers`, admin `addPeer`).
    Peer,
}

/// What is wrong with a link URI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UriErrorKind {
    /// Missing `scheme://`.
    #[error("missing scheme (expected e.g. tls://host:port)")]
    NoScheme,
    /// Scheme unknown to any version.
    #[error("unknown scheme `{0}`")]
    UnknownScheme(String),
    /// Scheme not available in this version / role.
    #[error("scheme `{scheme}` is not usable for {role:?} with yggdrasil {version}")]
    Unsupported {
        /// The scheme.
        scheme: &'static str,
        /// The target version.
        version: Version,
        /// Listen or peer.
        role: UriRole,
    },
    /// Empty, whitespace, control characters or a fragment.
    #[error("empty URI or forbidden character (whitespace, control, '#')")]
    BadCharacter,
    /// Host or port malformed.
    #[error("bad host:port `{0}`")]
    BadAuthority(String),
    /// Port 0 on an outbound peer, or not a number.
    #[error("bad port `{0}`")]
    BadPort(String),
    /// A path where none is allowed, or a missing one.
    #[error("bad path `{0}`")]
    BadPath(String),
    /// Malformed query (`?a=b&c=d`).
    #[error("bad query parameter `{0}`")]
    BadQuery(String),
    /// Query option not known for this scheme/version.
    #[error("unknown or unsupported option `{0}`")]
    UnknownOption(String),
    /// `key=` is not 64 hex chars.
    #[error("bad key= pin: {0}")]
    BadKey(KeyError),
    /// `priority=` not in 0..=254.
    #[error("bad priority `{0}` (expected 0..=254)")]
    BadPriority(String),
    /// `password=` longer than 64 bytes.
    #[error("password= longer than 64 bytes")]
    PasswordTooLong,
}

/// A malformed link URI. The URI is shown with any password redacted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid link URI `{uri}`: {kind}")]
pub struct UriError {
    /// The offending URI, passwords replaced by `***`.
    pub uri: String,
    /// What is wrong with it.
    pub kind: UriErrorKind,
}

/// A validated link URI (`Listen`, `Peers`, admin `addPeer`/`removePeer`).
///
/// Keeps the original text (emitted unchanged into configs and admin
/// requests) plus the parsed parts.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkUri {
    raw: String,
    scheme: Scheme,
    host: String,
    port: u16,
    path: String,
    keys: Vec<PublicKey>,
    priority: Option<u8>,
    sni: Option<String>,
}

/// Hides passwords (`password=` values, SOCKS `user:pass@`) in a URI string.
pub fn redact_uri(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    // userinfo: between "://" and the last '@', since a password may hold
    // '/', '?' or '@'; an '@' further on only hides more.
    let rest = match s.split_once("://") {
        Some((scheme, rest)) => {
            out.push_str(scheme);
            out.push_str("://");
            match rest.rsplit_once('@') {
                Some((user, host)) => {
                    let user = user.split_once(':').map_or(user, |(u, _)| u);
                    out.push_str(user);
                    out.push_str(":***@");
                    host
                }
                None => rest,
            }
        }
        None => s,
    };
    let (head, query) = match rest.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (rest, None),
    };
    out.push_str(head);
    if let Some(q) = query {
        out.push('?');
        let parts: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect();
        out.push_str(&parts.join("&"));
    }
    out
}

/// Longest Unix socket path in bytes (`sun_path` holds 108 with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Whether `p` is a Unix socket path both Go's `net/url` (in a `unix://`
/// URI) and the kernel take as written: absolute, at most
/// [`MAX_SOCKET_PATH`] bytes, without whitespace, control characters, `%`,
/// `?` or `#`.
pub fn valid_socket_path(p: &str) -> bool {
    p.starts_with('/')
        && p.len() >= 2
        && p.len() <= MAX_SOCKET_PATH
        && !p
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '%' | '?' | '#'))
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').enumerate().all(|(i, label)| {
            // allow one trailing dot (empty last label)
            (label.is_empty() && i > 0 && h.ends_with('.') && h.len() > 1)
                || (label.len() <= 63
                    && !label.is_empty()
                    && !label.starts_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        })
}

/// Parses `host:port` / `[v6%zone]:port`; returns (host, port text).
fn split_authority(auth: &str) -> Result<(String, &str), UriErrorKind> {
    let bad = || UriErrorKind::BadAuthority(auth.to_owned());
    if let Some(rest) = auth.strip_prefix('[') {
        let (inner, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = after.strip_prefix(':').ok_or_else(bad)?;
        // A zone is written `%25<zone>` (RFC 6874), as Go's `net/url`
        // requires; a bare `%eth0` is an invalid escape there, and the
        // daemon would drop the link.
        let (ip, zone) = match inner.split_once('%') {
            Some((ip, zone)) => (ip, Some(zone.strip_prefix("25").ok_or_else(bad)?)),
            None => (inner, None),
        };
        ip.parse::<Ipv6Addr>().map_err(|_| bad())?;
        if let Some(z) = zone {
            if z.is_empty()
                || !z
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            {
                return Err(bad());
            }
        }
        Ok((inner.to_owned(), port))
    } else {
        let (host, port) = auth.rsplit_once(':').ok_or_else(bad)?;
        if host.contains(':') {
            return Err(bad()); // bare IPv6 needs brackets
        }
        if host.parse::<Ipv4Addr>().is_err() && !valid_hostname(host) {
            return Err(bad());
        }
        Ok((host.to_owned(), port))
    }
}

fn parse_port(p: &str, role: UriRole) -> Result<u16, UriErrorKind> {
    let bad = || UriErrorKind::BadPort(p.to_owned());
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let port: u16 = p.parse().map_err(|_| bad())?;
    if port == 0 && role == UriRole::Peer {
        return Err(bad());
    }
    Ok(port)
}

impl LinkUri {
    /// Validates `s` as a link URI for `version` and `role`.
    ///
    /// Accepted: `tcp|tls://host:port`, `unix:///path`,
    /// `socks://[user:pass@]proxy:port/target:port` (peers only), and in 0.5
    /// also `quic://`, `ws://`, `wss://` (peers only, optional path) and
    /// `sockstls://`. Options: `key=<64 hex>` (peers, repeatable),
    /// `priority=0..254`, `sni=<name>` (TLS-based schemes), and in 0.5
    /// `password=` (≤ 64 bytes) and `maxbackoff=`. Unknown options are
    /// rejected so typos do not silently disable key pinning.
    pub fn parse(s: &str, version: Version, role: UriRole) -> Result<Self, UriError> {
        Self::parse_inner(s, version, role).map_err(|kind| {
            let uri = redact_uri(s);
            // The part an error quotes may hold a piece of a password (one
            // holding '/', '?' or '@' is cut anywhere): a URI with one
            // quotes none of itself.
            let secret = uri != s;
            let hide = |t: String| {
                if secret {
                    "(hidden: the URI holds a password)".to_owned()
                } else {
                    t
                }
            };
            let kind = match kind {
                UriErrorKind::BadAuthority(t) => UriErrorKind::BadAuthority(hide(t)),
                UriErrorKind::BadPath(t) => UriErrorKind::BadPath(hide(t)),
                UriErrorKind::BadPort(t) => UriErrorKind::BadPort(hide(t)),
                UriErrorKind::BadQuery(t) => UriErrorKind::BadQuery(hide(t)),
                UriErrorKind::UnknownOption(t) => UriErrorKind::UnknownOption(hide(t)),
                UriErrorKind::BadPriority(t) => UriErrorKind::BadPriority(hide(t)),
                UriErrorKind::UnknownScheme(t) => UriErrorKind::UnknownScheme(hide(t)),
                k => k,
            };
            UriError { uri, kind }
        })
    }

    /// Shorthand for [`LinkUri::parse`] with [`UriRole::Peer`].
    pub fn parse_peer(s: &str, version: Version) -> Result<Self, UriError> {
        Self::parse(s, version, UriRole::Peer)
    }

    fn parse_inner(s: &str, version: Version, role: UriRole) -> Result<Self, UriErrorKind> {
        if s.is_empty()
            || s.len() > 4096
            || s.chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '#')
        {
            return Err(UriErrorKind::BadCharacter);
        }
        let (scheme_str, rest) = s.split_once("://").ok_or(UriErrorKind::NoScheme)?;
        let scheme = Scheme::parse(scheme_str)
            .ok_or_else(|| UriErrorKind::UnknownScheme(scheme_str.to_owned()))?;
        if !scheme.supported(version, role) {
            return Err(UriErrorKind::Unsupported {
                scheme: scheme.as_str(),
                version,
                role,
            });
        }
        let (body, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let (host, port, path) = match scheme {
            Scheme::Unix => {
                // `unix:///absolute/path` only: Go's `net/url` reads
                // `unix://@name` as a host with an empty path, and decodes
                // `%` escapes the daemon would then see differently.
                if !valid_socket_path(body) {
                    return Err(UriErrorKind::BadPath(body.to_owned()));
                }
                (String::new(), 0, body.to_owned())
            }
            Scheme::Socks | Scheme::SocksTls => {
                let (proxy, target) = body
                    .split_once('/')
                    .ok_or_else(|| UriErrorKind::BadPath(body.to_owned()))?;
                let proxy_auth = match proxy.rsplit_once('@') {
                    Some((user, host)) => {
                        if user.split_once(':').map_or(user, |(u, _)| u).is_empty() {
                            return Err(UriErrorKind::BadAuthority(proxy.to_owned()));
                        }
                        host
                    }
                    None => proxy,
                };
                let (ph, pp) = split_authority(proxy_auth)?;
                let pport = parse_port(pp, UriRole::Peer)?;
                let (th, tp) = split_authority(target)?;
                parse_port(tp, UriRole::Peer)?;
                let _ = th;
                (ph, pport, target.to_owned())
            }
            _ => {
                let (auth, path) = match body.find('/') {
                    Some(i) => body.split_at(i),
                    None => (body, ""),
                };
                let path_ok = match scheme {
                    Scheme::Ws | Scheme::Wss => true,
                    _ => path.is_empty() || path == "/",
                };
                if !path_ok {
                    return Err(UriErrorKind::BadPath(path.to_owned()));
                }
                let (h, p) = split_authority(auth)?;
                (h, parse_port(p, role)?, path.to_owned())
            }
        };
        let mut uri = LinkUri {
            raw: s.to_owned(),
            scheme,
            host,
            port,
            path,
            keys: Vec::new(),
            priority: None,
            sni: None,
        };
        if let Some(q) = query {
            for kv in q.split('&').filter(|kv| !kv.is_empty()) {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| UriErrorKind::BadQuery(kv.to_owned()))?;
                match (k, version) {
                    ("key", _) if role == UriRole::Peer => {
                        uri.keys
                            .push(PublicKey::from_hex(v).map_err(UriErrorKind::BadKey)?);
                    }
                    ("priority", _) => {
                        let p: u8 = v
                            .parse()
                            .ok()
                            .filter(|p| *p <= 254)
                            .ok_or_else(|| UriErrorKind::BadPriority(v.to_owned()))?;
                        uri.priority = Some(p);
                    }
                    ("sni", _) if scheme.uses_tls() && role == UriRole::Peer => {
                        if !valid_hostname(v) {
                            return Err(UriErrorKind::BadQuery(kv.to_owned()));
                        }
                        uri.sni = Some(v.to_owned());
                    }
                    ("password", Version::V0_5) => {
                        if v.len() > 64 {
                            return Err(UriErrorKind::PasswordTooLong);
                        }
                    }
                    ("maxbackoff", Version::V0_5) if role == UriRole::Peer => {
                        if v.is_empty() {
                            return Err(UriErrorKind::BadQuery(kv.to_owned()));
                        }
                    }
                    _ => return Err(UriErrorKind::UnknownOption(k.to_owned())),
                }
            }
        }
        Ok(uri)
    }

    /// The URI text as given.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The scheme.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Host (for SOCKS: the proxy host; empty for unix). IPv6 without
    /// brackets, zone kept.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Port (for SOCKS: the proxy port; 0 for unix, or a listener's
    /// "any port").
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Path: unix socket path, SOCKS `target:port`, or ws path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Pinned remote keys (`key=`), checked by the daemon after the handshake.
    pub fn pinned_keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// Link priority (`priority=`), lower is preferred.
    pub fn priority(&self) -> Option<u8> {
        self.priority
    }

    /// TLS server name override (`sni=`).
    pub fn sni(&self) -> Option<&str> {
        self.sni.as_deref()
    }
}

impl fmt::Display for LinkUri {
    /// Shows the URI with passwords redacted; use [`LinkUri::as_str`] for
    /// the exact text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_uri(&self.raw))
    }
}

impl fmt::Debug for LinkUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LinkUri({})", redact_uri(&self.raw))
    }
}

// ---------------------------------------------------------------------------
// Daemon config
// ---------------------------------------------------------------------------

/// Errors building or reading a daemon config.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A `Listen`/`Peers` entry is invalid for the target version.
    #[error("{field}: {source}")]
    Uri {
        /// `Listen` or `Peers`.
        field: &'static str,
        /// The URI error (names the URI).
        source: UriError,
    },
    /// `IfName` is not `auto`, `none` or a 1..=15 character interface name.
    #[error("IfName `{0}` is not \"auto\", \"none\" or a valid interface name (1-15 chars [A-Za-z0-9_.-])")]
    IfName(String),
    /// `IfMTU` outside 1280..=65535.
    #[error("IfMTU {0} outside 1280..=65535")]
    IfMtu(u64),
    /// `AdminListen` unix path is not an absolute UTF-8 socket path.
    #[error("AdminListen path `{0}` must be absolute UTF-8 of at most 107 bytes without whitespace, `%`, `?` or `#`")]
    AdminPath(String),
    /// `NodeInfo` too large (yggdrasil caps it at 16384 bytes).
    #[error("NodeInfo is {0} bytes, more than 16384")]
    NodeInfoTooLarge(usize),
    /// Config text is not JSON (HJSON-only syntax is not supported here).
    #[error("config is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A field is missing or has the wrong type.
    #[error("config field {0} missing or not a string")]
    Field(&'static str),
    /// `PrivateKeyPath` (0.5, PEM file) is not supported by this module.
    #[error("PrivateKeyPath is not supported; put the key in PrivateKey")]
    PrivateKeyPath,
    /// Key material invalid.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Where the daemon serves its admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminListen {
    /// `"none"`: no admin socket.
    None,
    /// `unix:///path`: a Unix socket (mode 0660).
    Unix(PathBuf),
    /// `tcp://addr:port` (unauthenticated; keep it on loopback).
    Tcp(SocketAddr),
}

impl AdminListen {
    fn render(&self) -> Result<String, ConfigError> {
        Ok(match self {
            AdminListen::None => "none".to_owned(),
            AdminListen::Tcp(a) => format!("tcp://{a}"),
            AdminListen::Unix(p) => {
                let s = p
                    .to_str()
                    .filter(|s| valid_socket_path(s))
                    .ok_or_else(|| ConfigError::AdminPath(p.display().to_string()))?;
                format!("unix://{s}")
            }
        })
    }
}

/// Typed settings for the sidecar daemon's config file.
///
/// `MulticastInterfaces` is always `[]` and `InterfacePeers` `{}`: the
/// gateway peers explicitly and never beacons on the host's LAN.
#[derive(Debug, Clone)]
pub struct DaemonSettings {
    /// The node key.
    pub private_key: PrivateKey,
    /// `Listen` URIs (validated with [`UriRole::Listen`]).
    pub listen: Vec<LinkUri>,
    /// `Peers` URIs (validated with [`UriRole::Peer`]).
    pub peers: Vec<LinkUri>,
    /// `AdminListen`.
    pub admin_listen: AdminListen,
    /// `IfName`: `"auto"`, `"none"` (no TUN) or an interface name.
    pub if_name: String,
    /// `IfMTU` (1280..=65535; the TUN gets min(IfMTU, 53049)).
    pub if_mtu: u64,
    /// `AllowedPublicKeys` (empty = allow all inbound).
    pub allowed_public_keys: Vec<PublicKey>,
    /// `NodeInfoPrivacy`: hide build name/version/platform from peers.
    pub node_info_privacy: bool,
    /// `NodeInfo` (`null` when `None`).
    pub node_info: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct RawConfig<'a> {
    peers: Vec<&'a str>,
    interface_peers: serde_json::Map<String, serde_json::Value>,
    listen: Vec<&'a str>,
    admin_listen: String,
    multicast_interfaces: [(); 0],
    allowed_public_keys: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    public_key: Option<String>,
    private_key: String,
    if_name: &'a str,
    #[serde(rename = "IfMTU")]
    if_mtu: u64,
    node_info_privacy: bool,
    node_info: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

/// Whether `n` is a valid `IfName` (`auto`, `none` or an interface name).
pub fn valid_if_name(n: &str) -> bool {
    n == "auto"
        || n == "none"
        || (!n.is_empty()
            && n.len() <= 15
            && n != "."
            && n != ".."
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.'))
}

impl DaemonSettings {
    /// Settings with safe sidecar defaults: no listeners, no peers, no admin
    /// socket, `IfName: "none"`, `IfMTU: 65535`, node-info privacy on.
    pub fn new(private_key: PrivateKey) -> Self {
        Self {
            private_key,
            listen: Vec::new(),
            peers: Vec::new(),
            admin_listen: AdminListen::None,
            if_name: "none".to_owned(),
            if_mtu: 65535,
            allowed_public_keys: Vec::new(),
            node_info_privacy: true,
            node_info: None,
        }
    }

    /// Renders the config as pretty JSON (valid HJSON) for `version`.
    ///
    /// 0.4.x gets `PublicKey` as well as `PrivateKey`; 0.5.x has no
    /// `PublicKey` field. Every URI is re-validated for `version`, so a
    /// `quic://` peer fails for 0.4. The result contains the private key.
    pub fn render(&self, version: Version) -> Result<String, ConfigError> {
        let check = |uris: &[LinkUri], role, field| -> Result<(), ConfigError> {
            for u in uris {
                LinkUri::parse(u.as_str(), version, role)
                    .map_err(|source| ConfigError::Uri { field, source })?;
            }
            Ok(())
        };
        check(&self.listen, UriRole::Listen, "Listen")?;
        check(&self.peers, UriRole::Peer, "Peers")?;
        if !valid_if_name(&self.if_name) {
            return Err(ConfigError::IfName(self.if_name.clone()));
        }
        if !(1280..=65535).contains(&self.if_mtu) {
            return Err(ConfigError::IfMtu(self.if_mtu));
        }
        if let Some(ni) = &self.node_info {
            let n = serde_json::to_vec(ni)?.len();
            if n > 16384 {
                return Err(ConfigError::NodeInfoTooLarge(n));
            }
        }
        let raw = RawConfig {
            peers: self.peers.iter().map(LinkUri::as_str).collect(),
            interface_peers: serde_json::Map::new(),
            listen: self.listen.iter().map(LinkUri::as_str).collect(),
            admin_listen: self.admin_listen.render()?,
            multicast_interfaces: [],
            allowed_public_keys: self
                .allowed_public_keys
                .iter()
                .map(|k| k.to_hex())
                .collect(),
            public_key: (version == Version::V0_4).then(|| self.private_key.public_key().to_hex()),
            private_key: self.private_key.to_config_hex(),
            if_name: &self.if_name,
            if_mtu: self.if_mtu,
            node_info_privacy: self.node_info_privacy,
            node_info: self.node_info.as_ref(),
        };
        let mut s = serde_json::to_string_pretty(&raw)?;
        s.push('\n');
        Ok(s)
    }
}

/// Reads the private key from a daemon config in JSON form (e.g.
/// `yggdrasil -genconf -json`). Checks `PublicKey` (0.4) if present.
/// HJSON-only syntax (comments, unquoted keys) is not supported; convert
/// with `yggdrasil -useconffile F -normaliseconf -json` first.
pub fn private_key_from_config(json: &str) -> Result<PrivateKey, ConfigError> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    if v.get("PrivateKeyPath")
        .and_then(|p| p.as_str())
        .is_some_and(|p| !p.is_empty())
    {
        return Err(ConfigError::PrivateKeyPath);
    }
    let pk = v
        .get("PrivateKey")
        .and_then(|p| p.as_str())
        .ok_or(ConfigError::Field("PrivateKey"))?;
    let key = PrivateKey::from_config_hex(pk)?;
    if let Some(p) = v.get("PublicKey") {
        let found = PublicKey::from_hex(p.as_str().ok_or(ConfigError::Field("PublicKey"))?)?;
        let expected = key.public_key();
        if found != expected {
            return Err(KeyError::ConfigPublicMismatch { expected, found }.into());
        }
    }
    Ok(key)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PRIV_A: &str = "2fb6bcc83c6976e63c76f3286278c441af929b4902a0544cd6e1e401b2a5d3328988ec86fd70a116524ef24b11d0aed0ef374a69b1014ae93a82716a7fadca54";
    const PRIV_D: &str = "b137bf8bd0cb189da6daa0a5d609c33f6f93435fc97095e992dcefb03403798800006c79ac6a064244c5fb6da649dd1824dd1120767c7844eb10ce243f39205c";

    #[test]
    fn doc_private_keys_derive_public_and_address() {
        let a = PrivateKey::from_config_hex(PRIV_A).unwrap();
        assert_eq!(
            a.public_key().to_hex(),
            "8988ec86fd70a116524ef24b11d0aed0ef374a69b1014ae93a82716a7fadca54"
        );
        assert_eq!(
            a.public_key().address().to_string(),
            "200:ecee:26f2:51e:bdd3:5b62:1b69:dc5e"
        );
        assert_eq!(a.to_config_hex(), PRIV_A);
        let d = Identity::from_private(PrivateKey::from_config_hex(PRIV_D).unwrap());
        assert_eq!(
            d.address().to_string(),
            "211:4e19:4e57:e6f6:ece8:1249:66d8:8b9f"
        );
        assert_eq!(d.subnet().to_string(), "311:4e19:4e57:e6f6::/64");
    }

    #[test]
    fn private_key_debug_is_masked() {
        let a = PrivateKey::from_config_hex(PRIV_A).unwrap();
        let dbg = format!("{a:?} {:?}", Identity::from_private(a.clone()));
        assert!(dbg.contains("<masked>"));
        assert!(!dbg.contains(&PRIV_A[..64]), "seed leaked: {dbg}");
        let s = DaemonSettings::new(a);
        assert!(!format!("{s:?}").contains(&PRIV_A[..64]));
    }

    #[test]
    fn private_key_errors() {
        assert!(matches!(
            PrivateKey::from_config_hex("zz"),
            Err(KeyError::Hex { .. })
        ));
        assert!(matches!(
            PrivateKey::from_config_hex(&PRIV_A[..64]),
            Err(KeyError::Length { got: 32, .. })
        ));
        let mut wrong = PRIV_A.to_owned();
        wrong.replace_range(127.., "5");
        assert_eq!(
            PrivateKey::from_config_hex(&wrong).unwrap_err(),
            KeyError::PublicMismatch
        );
    }

    #[test]
    fn peer_uris_valid() {
        let k = "8988ec86fd70a116524ef24b11d0aed0ef374a69b1014ae93a82716a7fadca54";
        LinkUri::parse_peer("tcp://10.99.0.1:12345", Version::V0_4).unwrap();
        LinkUri::parse_peer("tls://example.com:443", Version::V0_4).unwrap();
        let u = LinkUri::parse_peer(
            &format!("TLS://[2001:db8::1]:443?key={k}&priority=3"),
            Version::V0_4,
        )
        .unwrap();
        assert_eq!(
            (u.scheme(), u.port(), u.priority()),
            (Scheme::Tls, 443, Some(3))
        );
        assert_eq!(u.pinned_keys()[0].to_hex(), k);
        let u = LinkUri::parse_peer(
            &format!("tls://[fe80::1%25eth0]:1?key={k}&key={k}&sni=a.example"),
            Version::V0_4,
        )
        .unwrap();
        assert_eq!(u.pinned_keys().len(), 2);
        assert_eq!(u.sni(), Some("a.example"));
        assert_eq!(u.host(), "fe80::1%25eth0");
        let u = LinkUri::parse_peer("socks://u:p@127.0.0.1:1080/peer.example:443", Version::V0_4)
            .unwrap();
        assert_eq!(
            (u.host(), u.port(), u.path()),
            ("127.0.0.1", 1080, "peer.example:443")
        );
        assert_eq!(
            u.to_string(),
            "socks://u:***@127.0.0.1:1080/peer.example:443"
        );
        LinkUri::parse_peer("unix:///run/ygg.sock", Version::V0_4).unwrap();
        LinkUri::parse_peer(
            "quic://1.2.3.4:443?password=x&maxbackoff=30s",
            Version::V0_5,
        )
        .unwrap();
        LinkUri::parse_peer("wss://h.example:443/ygg", Version::V0_5).unwrap();
        LinkUri::parse("tls://[::]:0", Version::V0_4, UriRole::Listen).unwrap();
        LinkUri::parse("ws://0.0.0.0:0", Version::V0_5, UriRole::Listen).unwrap();
    }

    #[test]
    fn peer_uris_invalid_name_the_uri() {
        let cases: &[(&str, Version)] = &[
            ("", Version::V0_4),
            ("10.0.0.1:1", Version::V0_4),
            ("http://a:1", Version::V0_4),
            ("quic://a:1", Version::V0_4),
            ("tcp://a", Version::V0_4),
            ("tcp://a:0", Version::V0_4),
            ("tcp://a:70000", Version::V0_4),
            ("tcp://2001:db8::1:1", Version::V0_4),
            ("tcp://[2001:db8::zz]:1", Version::V0_4),
            ("tcp://a:1/path", Version::V0_4),
            ("tcp://a:1?key=abc", Version::V0_4),
            ("tcp://a:1?priority=255", Version::V0_4),
            ("tcp://a:1?prio=1", Version::V0_4),
            ("tcp://a:1?password=x", Version::V0_4),
            ("tcp://a:1?sni=x", Version::V0_4),
            ("tls://a b:1", Version::V0_4),
            ("tls://-a:1", Version::V0_4),
            ("unix://rel", Version::V0_4),
            ("socks://1.2.3.4:1080", Version::V0_4),
            ("socks://:p@1.2.3.4:1080/a:1", Version::V0_4),
            ("tcp://a:1#frag", Version::V0_4),
        ];
        for (s, v) in cases {
            let e = LinkUri::parse_peer(s, *v).unwrap_err();
            assert!(
                e.to_string().contains(&format!("`{}`", redact_uri(s))),
                "{e}"
            );
        }
        let e =
            LinkUri::parse_peer("quic://a:1?password=secret&prio=1", Version::V0_5).unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
        assert!(e.to_string().contains("password=***"), "{e}");
        // Nor in the part of the URI an error quotes.
        for s in [
            "socks://alice:s3cret@proxy:1080",
            "socks://:s3cret@p:1080/t:1",
            "tls://u:s3cret@h:1",
            "sockstls://bob:s3cret@[2001:db8::zz]:1080/t:1",
            // A password holding a separator, cut where it stands.
            "socks://u:s3c/ret@proxy:1080/t:1",
            "socks://u:s3c?ret@proxy:1080/t:1",
            "socks://u:s3c@ret@proxy:x/t:1",
            "socks://u:s3cret@proxy:1080/t:1?password=s3cret&priority=999",
        ] {
            let e = LinkUri::parse_peer(s, Version::V0_4).unwrap_err();
            assert!(!e.to_string().contains("s3c"), "{e}");
        }
        let long = format!("quic://a:1?password={}", "x".repeat(65));
        assert_eq!(
            LinkUri::parse_peer(&long, Version::V0_5).unwrap_err().kind,
            UriErrorKind::PasswordTooLong
        );
        assert!(LinkUri::parse("socks://a:1/b:2", Version::V0_4, UriRole::Listen).is_err());
    }

    #[test]
    fn uris_go_reads_otherwise_are_refused() {
        // A zone must be escaped as `%25`: Go's `net/url` refuses `%eth0`.
        for s in [
            "tcp://[fe80::1%eth0]:1",
            "tls://[fe80::1%]:1",
            "tcp://[fe80::1%25]:1",
            "tcp://[fe80::1%25eth%0]:1",
            "tcp://[fe80::1%25et/h0]:1",
            "socks://127.0.0.1:1080/[fe80::1%eth0]:1",
        ] {
            assert!(LinkUri::parse_peer(s, Version::V0_4).is_err(), "{s}");
        }
        let u = LinkUri::parse_peer("tcp://[fe80::1%25eth0]:1", Version::V0_4).unwrap();
        assert_eq!(u.host(), "fe80::1%25eth0");
        LinkUri::parse(
            "tcp://[fe80::1%25br-lan.2]:0",
            Version::V0_4,
            UriRole::Listen,
        )
        .unwrap();
        // `unix://@x` is a host to Go, with an empty path; only
        // `unix:///absolute/path` names a socket.
        for s in [
            "unix://@x",
            "unix://x/y",
            "unix:///",
            "unix:///a%41",
            &format!("unix:///{}", "s".repeat(MAX_SOCKET_PATH)),
        ] {
            assert!(
                LinkUri::parse(s, Version::V0_4, UriRole::Listen).is_err(),
                "{s}"
            );
        }
        LinkUri::parse(
            &format!("unix:///{}", "s".repeat(MAX_SOCKET_PATH - 1)),
            Version::V0_4,
            UriRole::Listen,
        )
        .unwrap();
    }

    #[test]
    fn admin_paths_are_socket_paths() {
        let mut s = DaemonSettings::new(PrivateKey::from_config_hex(PRIV_A).unwrap());
        for bad in [
            format!("/{}", "a".repeat(119)),
            "/run/a?b.sock".to_owned(),
            "/run/a%41.sock".to_owned(),
            "/run/a#b.sock".to_owned(),
        ] {
            s.admin_listen = AdminListen::Unix(bad.clone().into());
            assert!(
                matches!(s.render(Version::V0_4), Err(ConfigError::AdminPath(_))),
                "{bad}"
            );
        }
        s.admin_listen = AdminListen::Unix(format!("/{}", "a".repeat(106)).into());
        s.render(Version::V0_4).unwrap();
    }

    #[test]
    fn redact_uri_hides_passwords_holding_separators() {
        for s in [
            "socks://u:pa/ss@proxy:1080/t:1",
            "socks://u:pa?ss@proxy:1080/t:1",
            "socks://u:pa@ss@proxy:1080/t:1",
        ] {
            let r = redact_uri(s);
            assert_eq!(r, "socks://u:***@proxy:1080/t:1", "{s}");
            assert!(!r.contains("ss"), "{r}");
        }
        assert_eq!(
            redact_uri("quic://h:1?key=ab&password=secret"),
            "quic://h:1?key=ab&password=***"
        );
        assert_eq!(
            redact_uri("socks://u:p@h:1/t:2?password=x"),
            "socks://u:***@h:1/t:2?password=***"
        );
        assert_eq!(redact_uri("tcp://h:1"), "tcp://h:1");
    }

    #[test]
    fn render_config_04_and_05() {
        let key = PrivateKey::from_config_hex(PRIV_A).unwrap();
        let mut s = DaemonSettings::new(key.clone());
        s.listen =
            vec![LinkUri::parse("tls://127.0.0.1:0", Version::V0_4, UriRole::Listen).unwrap()];
        s.peers = vec![LinkUri::parse_peer("tcp://10.0.0.1:1234", Version::V0_4).unwrap()];
        s.admin_listen = AdminListen::Unix("/tmp/x/admin.sock".into());
        s.if_name = "ygg-gw0".into();
        s.if_mtu = 9000;
        let mut ni = serde_json::Map::new();
        ni.insert("name".into(), "gw".into());
        s.node_info = Some(ni);
        let t = s.render(Version::V0_4).unwrap();
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        assert_eq!(v["PrivateKey"], PRIV_A);
        assert_eq!(v["PublicKey"], &PRIV_A[64..]);
        assert_eq!(v["AdminListen"], "unix:///tmp/x/admin.sock");
        assert_eq!(v["Listen"][0], "tls://127.0.0.1:0");
        assert_eq!(v["Peers"][0], "tcp://10.0.0.1:1234");
        assert_eq!(v["MulticastInterfaces"], serde_json::json!([]));
        assert_eq!(v["IfName"], "ygg-gw0");
        assert_eq!(v["IfMTU"], 9000);
        assert_eq!(v["NodeInfoPrivacy"], true);
        assert_eq!(v["NodeInfo"]["name"], "gw");
        assert_eq!(
            private_key_from_config(&t).unwrap().public_key(),
            key.public_key()
        );

        let t5 = s.render(Version::V0_5).unwrap();
        let v5: serde_json::Value = serde_json::from_str(&t5).unwrap();
        assert!(v5.get("PublicKey").is_none());
        assert_eq!(v5["PrivateKey"], PRIV_A);

        s.peers
            .push(LinkUri::parse_peer("quic://10.0.0.1:1234", Version::V0_5).unwrap());
        assert!(s.render(Version::V0_5).is_ok());
        let e = s.render(Version::V0_4).unwrap_err();
        assert!(e.to_string().contains("quic://10.0.0.1:1234"), "{e}");
        s.peers.pop();
        s.if_name = "much-too-long-name".into();
        assert!(matches!(
            s.render(Version::V0_4),
            Err(ConfigError::IfName(_))
        ));
        s.if_name = "none".into();
        s.if_mtu = 1000;
        assert!(matches!(
            s.render(Version::V0_4),
            Err(ConfigError::IfMtu(1000))
        ));
        s.if_mtu = 1280;
        s.admin_listen = AdminListen::Unix("relative.sock".into());
        assert!(matches!(
            s.render(Version::V0_4),
            Err(ConfigError::AdminPath(_))
        ));
    }

    #[test]
    fn config_key_mismatch_detected() {
        let cfg = format!(
            r#"{{"PrivateKey":"{PRIV_A}","PublicKey":"{}"}}"#,
            &PRIV_D[64..]
        );
        assert!(matches!(
            private_key_from_config(&cfg),
            Err(ConfigError::Key(KeyError::ConfigPublicMismatch { .. }))
        ));
        assert!(matches!(
            private_key_from_config(r#"{"PrivateKeyPath":"/k.pem"}"#),
            Err(ConfigError::PrivateKeyPath)
        ));
        assert!(matches!(
            private_key_from_config("{}"),
            Err(ConfigError::Field("PrivateKey"))
        ));
    }

    proptest! {
        #[test]
        fn seeds_round_trip(seed in any::<[u8; 32]>()) {
            let k = PrivateKey::from_seed(&seed);
            let h = k.to_config_hex();
            prop_assert_eq!(h.len(), 128);
            let back = PrivateKey::from_config_hex(&h).unwrap();
            prop_assert_eq!(back.public_key(), k.public_key());
        }

        #[test]
        fn uri_parser_never_panics(s in "\\PC{0,64}", v in any::<bool>(), l in any::<bool>()) {
            let v = if v { Version::V0_5 } else { Version::V0_4 };
            let r = if l { UriRole::Listen } else { UriRole::Peer };
            let _ = LinkUri::parse(&s, v, r);
            let _ = redact_uri(&s);
        }

        #[test]
        fn uri_parser_structured(scheme in "(tcp|tls|quic|unix|socks|ws|x)", host in "[a-z0-9.:\\[\\]%-]{0,12}",
                                 port in "[0-9]{0,6}", q in "[a-z=&0-9]{0,20}") {
            let s = format!("{scheme}://{host}:{port}?{q}");
            let _ = LinkUri::parse(&s, Version::V0_5, UriRole::Peer);
        }
    }
}
