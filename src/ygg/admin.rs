//! Yggdrasil admin API messages [pure] (docs/yggdrasil.md 2.9 and 3).
//!
//! The admin socket carries a stream of JSON objects. A request is
//! `{"request":"<name>","arguments":{…},"keepalive":true}` (the name is
//! case-insensitive; `arguments` is omitted when empty); the daemon answers
//! each with one pretty-printed object
//! `{"status":"success"|"error","error":"…","request":…,"response":{…}}`
//! and, unless `keepalive` was set, closes the connection. The envelope is
//! the same in 0.4.7 and 0.5.x; the commands differ (`getDHT` exists only in
//! 0.4, `getTree` only in 0.5) and several response shapes grew fields in
//! 0.5 (`getPeers`: `up`, `inbound`, `latency_ms`, `cost`, `last_error`…;
//! `getSelf`: `routing_entries` instead of `coords`).
//!
//! This module only turns requests into bytes and bytes into typed
//! responses; [`next_message`] splits a byte stream into messages so a
//! driver (blocking in `admin_client`, or async) can stay trivial. Unknown
//! response fields are ignored.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::Ipv6Addr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::addr::YggSubnet;
use super::identity::{LinkUri, PublicKey, UriError, UriRole};
use super::Version;

/// Largest single admin message accepted by [`next_message`] (bytes).
pub const MAX_MESSAGE: usize = 4 << 20;

/// Errors from encoding requests or decoding responses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The command does not exist in this daemon version.
    #[error("admin command {request} is not available in yggdrasil {version}")]
    Unsupported {
        /// The command name.
        request: &'static str,
        /// The daemon version.
        version: Version,
    },
    /// A peer URI argument is invalid for this version.
    #[error(transparent)]
    Uri(#[from] UriError),
    /// An `interface` argument is empty or contains control characters.
    #[error("bad interface name `{0}`")]
    Interface(String),
    /// The bytes are not a JSON object.
    #[error("admin response is not valid JSON: {0}")]
    Json(String),
    /// The message exceeded [`MAX_MESSAGE`] without completing.
    #[error("admin message larger than {MAX_MESSAGE} bytes")]
    TooLarge,
    /// The daemon answered `"status":"error"`.
    #[error("yggdrasil admin error for {request}: {message}")]
    Daemon {
        /// The request name echoed by the daemon, or `?`.
        request: String,
        /// The daemon's error text.
        message: String,
    },
    /// `status` is neither `success` nor `error`, or missing.
    #[error("admin response has unexpected status {0:?}")]
    Status(String),
    /// The `response` object does not have the expected shape.
    #[error("unexpected {request} response: {detail}")]
    Shape {
        /// The command whose response was being parsed.
        request: &'static str,
        /// What did not match.
        detail: String,
    },
}

/// An admin request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AdminRequest {
    /// `list`: the available commands (use it to detect the dialect).
    List,
    /// `getSelf`: own key, address, subnet, build.
    GetSelf,
    /// `getPeers`: links.
    GetPeers,
    /// `getSessions`: end-to-end sessions.
    GetSessions,
    /// `getDHT` (0.4 only).
    GetDht,
    /// `getTree` (0.5 only).
    GetTree,
    /// `getPaths`.
    GetPaths,
    /// `addPeer`: dial a peer now (not persisted in the config).
    AddPeer {
        /// Peer URI.
        uri: LinkUri,
        /// Source interface (`InterfacePeers`-style), if any.
        interface: Option<String>,
    },
    /// `removePeer`: drop a peer added with the same URI/interface.
    RemovePeer {
        /// Peer URI.
        uri: LinkUri,
        /// Source interface, if any.
        interface: Option<String>,
    },
}

#[derive(Serialize)]
struct PeerArgs<'a> {
    uri: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    interface: Option<&'a str>,
}

#[derive(Serialize)]
struct RawRequest<'a> {
    request: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<PeerArgs<'a>>,
    keepalive: bool,
}

impl AdminRequest {
    /// The wire name of the command.
    pub fn name(&self) -> &'static str {
        match self {
            Self::List => "list",
            Self::GetSelf => "getSelf",
            Self::GetPeers => "getPeers",
            Self::GetSessions => "getSessions",
            Self::GetDht => "getDHT",
            Self::GetTree => "getTree",
            Self::GetPaths => "getPaths",
            Self::AddPeer { .. } => "addPeer",
            Self::RemovePeer { .. } => "removePeer",
        }
    }

    /// Encodes the request for `version` as one JSON object followed by
    /// `\n`. With `keepalive` the daemon keeps the connection open for the
    /// next request. Fails for a command the version lacks, and re-validates
    /// peer URIs for the version.
    pub fn encode(&self, version: Version, keepalive: bool) -> Result<Vec<u8>, AdminError> {
        let unsupported = |request| AdminError::Unsupported { request, version };
        let arguments = match (self, version) {
            (Self::GetDht, Version::V0_5) => return Err(unsupported("getDHT")),
            (Self::GetTree, Version::V0_4) => return Err(unsupported("getTree")),
            (Self::AddPeer { uri, interface } | Self::RemovePeer { uri, interface }, _) => {
                LinkUri::parse(uri.as_str(), version, UriRole::Peer)?;
                if let Some(i) = interface {
                    if i.is_empty() || i.len() > 64 || i.chars().any(|c| c.is_control()) {
                        return Err(AdminError::Interface(i.clone()));
                    }
                }
                Some(PeerArgs {
                    uri: uri.as_str(),
                    interface: interface.as_deref(),
                })
            }
            _ => None,
        };
        let raw = RawRequest {
            request: self.name(),
            arguments,
            keepalive,
        };
        let mut out = serde_json::to_vec(&raw).map_err(|e| AdminError::Json(e.to_string()))?;
        out.push(b'\n');
        Ok(out)
    }
}

/// Splits the first complete JSON value off `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, or the value and the
/// number of bytes consumed (including leading whitespace). Fails on
/// malformed JSON, or when an incomplete message already exceeds
/// [`MAX_MESSAGE`].
pub fn next_message(buf: &[u8]) -> Result<Option<(Value, usize)>, AdminError> {
    let mut it = serde_json::Deserializer::from_slice(buf).into_iter::<Value>();
    match it.next() {
        None => {
            if buf.len() > MAX_MESSAGE {
                Err(AdminError::TooLarge)
            } else {
                Ok(None)
            }
        }
        Some(Ok(v)) => Ok(Some((v, it.byte_offset()))),
        Some(Err(e)) if e.is_eof() => {
            if buf.len() > MAX_MESSAGE {
                Err(AdminError::TooLarge)
            } else {
                Ok(None)
            }
        }
        Some(Err(e)) => Err(AdminError::Json(e.to_string())),
    }
}

fn request_name(v: &Value) -> String {
    match v.get("request") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("request")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned(),
        _ => "?".to_owned(),
    }
}

/// Checks the envelope of one admin reply and returns its `response` value.
///
/// `"status":"error"` becomes [`AdminError::Daemon`] with the message taken
/// from the top-level `error` (0.4.7, 0.5) or from `response.error` (older
/// builds).
pub fn response_value(reply: Value) -> Result<Value, AdminError> {
    let Value::Object(mut obj) = reply else {
        return Err(AdminError::Json("admin reply is not a JSON object".into()));
    };
    let status = obj.get("status").and_then(Value::as_str).unwrap_or("");
    match status {
        "success" => Ok(obj.remove("response").unwrap_or(Value::Null)),
        "error" => {
            let message = obj
                .get("error")
                .and_then(Value::as_str)
                .or_else(|| {
                    obj.get("response")
                        .and_then(|r| r.get("error"))
                        .and_then(Value::as_str)
                })
                .unwrap_or("(no error text)")
                .to_owned();
            Err(AdminError::Daemon {
                request: request_name(&Value::Object(obj)),
                message,
            })
        }
        other => Err(AdminError::Status(other.to_owned())),
    }
}

/// Parses one complete admin reply (bytes of a single JSON object) and
/// returns its `response` value.
pub fn decode_response(bytes: &[u8]) -> Result<Value, AdminError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| AdminError::Json(e.to_string()))?;
    response_value(v)
}

fn shape<T: DeserializeOwned>(request: &'static str, v: Value) -> Result<T, AdminError> {
    serde_json::from_value(v).map_err(|e| AdminError::Shape {
        request,
        detail: e.to_string(),
    })
}

/// Accepts a list, or a map keyed by address (pre-0.4 layout), as a list of
/// objects; map keys are inserted as `address` when absent.
fn entries(request: &'static str, v: Option<Value>, field: &str) -> Result<Vec<Value>, AdminError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => Ok(a),
        Some(Value::Object(m)) => Ok(m
            .into_iter()
            .map(|(k, mut e)| {
                if let Value::Object(o) = &mut e {
                    o.entry("address").or_insert(Value::String(k));
                }
                e
            })
            .collect()),
        Some(_) => Err(AdminError::Shape {
            request,
            detail: format!("`{field}` is neither a list nor an object"),
        }),
    }
}

fn list_of<T: DeserializeOwned>(
    request: &'static str,
    field: &'static str,
    response: Value,
) -> Result<Vec<T>, AdminError> {
    let Value::Object(mut o) = response else {
        return Err(AdminError::Shape {
            request,
            detail: "response is not an object".into(),
        });
    };
    entries(request, o.remove(field), field)?
        .into_iter()
        .map(|e| shape(request, e))
        .collect()
}

// ---- lenient field decoders ------------------------------------------------

/// u64 from a JSON number (integer or non-negative float) or numeric string.
fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = Value::deserialize(d)?;
    as_u64(&v).ok_or_else(|| serde::de::Error::custom(format!("expected a count, got {v}")))
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Null => Some(0),
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0 && *f < 1.8e19)
                .map(|f| f as u64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = Value::deserialize(d)?;
    match &v {
        Value::Null => Some(0.0),
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| serde::de::Error::custom(format!("expected a number, got {v}")))
}

fn opt_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    lenient_f64(d).map(Some)
}

fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    lenient_u64(d).map(Some)
}

/// Empty string or null → `None` (0.5 reports `"key": ""` for links that
/// are not up yet).
fn opt_key<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PublicKey>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) => PublicKey::from_hex(&s)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

fn opt_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv6Addr>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("bad IPv6 address `{s}`"))),
    }
}

fn subnet<'de, D: Deserializer<'de>>(d: D) -> Result<YggSubnet, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

fn coords<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u64>>, D::Error> {
    let v = Value::deserialize(d)?;
    match &v {
        Value::Null => Ok(None),
        Value::Array(a) => a
            .iter()
            .map(as_u64)
            .collect::<Option<Vec<_>>>()
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom("coords must be numbers")),
        // very old builds printed coords as a string "[1 2 3]"
        Value::String(s) => s
            .trim_matches(|c| c == '[' || c == ']')
            .split_whitespace()
            .map(|p| p.parse().ok())
            .collect::<Option<Vec<_>>>()
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom("bad coords string")),
        _ => Err(serde::de::Error::custom("coords must be a list")),
    }
}

// ---- typed responses ---------------------------------------------------------

/// `getSelf`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct SelfInfo {
    /// `build_name` (Debian's 0.4.7 says `unknown`).
    #[serde(default)]
    pub build_name: String,
    /// `build_version` (Debian's 0.4.7 says `unknown`).
    #[serde(default)]
    pub build_version: String,
    /// Own public key.
    pub key: PublicKey,
    /// Own 200::/7 address.
    pub address: Ipv6Addr,
    /// Own routed /64.
    #[serde(deserialize_with = "subnet")]
    pub subnet: YggSubnet,
    /// Tree coordinates (0.4 only).
    #[serde(default, deserialize_with = "coords")]
    pub coords: Option<Vec<u64>>,
    /// Routing table size (0.5 only).
    #[serde(default, deserialize_with = "opt_u64")]
    pub routing_entries: Option<u64>,
}

/// One `getPeers` entry (one link; several links to one node are listed
/// separately).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct PeerInfo {
    /// Remote key (`None` for 0.5 links that are not up).
    #[serde(default, deserialize_with = "opt_key")]
    pub key: Option<PublicKey>,
    /// Remote 200::/7 address.
    #[serde(default, deserialize_with = "opt_addr")]
    pub address: Option<Ipv6Addr>,
    /// Link URI / remote endpoint (`remote`).
    #[serde(default)]
    pub remote: Option<String>,
    /// Local port number of the link.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub port: u64,
    /// Link priority.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub priority: u64,
    /// Bytes received.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub bytes_recvd: u64,
    /// Bytes sent.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub bytes_sent: u64,
    /// Link uptime in seconds.
    #[serde(default, deserialize_with = "lenient_f64")]
    pub uptime: f64,
    /// Tree coordinates of the peer (0.4 only).
    #[serde(default, deserialize_with = "coords")]
    pub coords: Option<Vec<u64>>,
    /// Whether the link is established (0.5; 0.4 lists only live links).
    #[serde(default)]
    pub up: Option<bool>,
    /// Whether the peer dialled us (0.5).
    #[serde(default)]
    pub inbound: Option<bool>,
    /// `latency_ms` as reported (0.5). Some 0.5 builds put a Go
    /// `time.Duration` (nanoseconds) under this name; kept raw.
    #[serde(default, rename = "latency_ms", deserialize_with = "opt_f64")]
    pub latency_raw: Option<f64>,
    /// Link cost (later 0.5 builds).
    #[serde(default, deserialize_with = "opt_u64")]
    pub cost: Option<u64>,
    /// Last link error (0.5).
    #[serde(default)]
    pub last_error: Option<String>,
}

/// One `getSessions` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct SessionInfo {
    /// Remote key.
    pub key: PublicKey,
    /// Remote address.
    #[serde(default, deserialize_with = "opt_addr")]
    pub address: Option<Ipv6Addr>,
    /// Bytes received.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub bytes_recvd: u64,
    /// Bytes sent.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub bytes_sent: u64,
    /// Session uptime in seconds.
    #[serde(default, deserialize_with = "lenient_f64")]
    pub uptime: f64,
}

/// One `getDHT` entry (0.4).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct DhtEntry {
    /// Key of the DHT neighbour.
    pub key: PublicKey,
    /// Its address.
    #[serde(default, deserialize_with = "opt_addr")]
    pub address: Option<Ipv6Addr>,
    /// Local port towards it.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub port: u64,
    /// Next hop port beyond it (`rest`).
    #[serde(default, deserialize_with = "lenient_u64")]
    pub rest: u64,
}

/// One `getTree` entry (0.5).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct TreeEntry {
    /// Node key.
    pub key: PublicKey,
    /// Node address.
    #[serde(default, deserialize_with = "opt_addr")]
    pub address: Option<Ipv6Addr>,
    /// Parent key (the root is its own parent).
    #[serde(default, deserialize_with = "opt_key")]
    pub parent: Option<PublicKey>,
    /// Announcement sequence number.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub sequence: u64,
}

/// Parses a `getSelf` reply.
pub fn parse_get_self(bytes: &[u8]) -> Result<SelfInfo, AdminError> {
    shape("getSelf", decode_response(bytes)?)
}

/// Parses a `getPeers` reply.
pub fn parse_get_peers(bytes: &[u8]) -> Result<Vec<PeerInfo>, AdminError> {
    list_of("getPeers", "peers", decode_response(bytes)?)
}

/// Parses a `getSessions` reply.
pub fn parse_get_sessions(bytes: &[u8]) -> Result<Vec<SessionInfo>, AdminError> {
    list_of("getSessions", "sessions", decode_response(bytes)?)
}

/// Parses a `getDHT` reply (0.4).
pub fn parse_get_dht(bytes: &[u8]) -> Result<Vec<DhtEntry>, AdminError> {
    list_of("getDHT", "dht", decode_response(bytes)?)
}

/// Parses a `getTree` reply (0.5).
pub fn parse_get_tree(bytes: &[u8]) -> Result<Vec<TreeEntry>, AdminError> {
    list_of("getTree", "tree", decode_response(bytes)?)
}

/// Parses an `addPeer` / `removePeer` reply (success carries no data).
pub fn parse_ack(bytes: &[u8]) -> Result<(), AdminError> {
    decode_response(bytes).map(|_| ())
}

/// Parses a `list` reply into command names (0.4.7/0.5: a list of
/// `{command, …}` objects; older: a map keyed by command).
pub fn parse_list(bytes: &[u8]) -> Result<Vec<String>, AdminError> {
    list_names(decode_response(bytes)?)
}

fn list_names(response: Value) -> Result<Vec<String>, AdminError> {
    let bad = |detail: &str| AdminError::Shape {
        request: "list",
        detail: detail.to_owned(),
    };
    match response.get("list") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|e| {
                e.get("command")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| bad("entry without `command`"))
            })
            .collect(),
        Some(Value::Object(m)) => Ok(m.keys().cloned().collect()),
        _ => Err(bad("missing `list`")),
    }
}

/// Guesses the dialect from `list` command names: `gettree` means 0.5,
/// `getdht` means 0.4 (the build version may read `unknown`).
pub fn detect_version(commands: &[String]) -> Option<Version> {
    let has = |n: &str| commands.iter().any(|c| c.eq_ignore_ascii_case(n));
    if has("getTree") {
        Some(Version::V0_5)
    } else if has("getDHT") {
        Some(Version::V0_4)
    } else {
        None
    }
}

/// Typed form of any reply, for drivers that dispatch on the request.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum AdminResponse {
    /// `list`.
    List(Vec<String>),
    /// `getSelf`.
    SelfInfo(SelfInfo),
    /// `getPeers`.
    Peers(Vec<PeerInfo>),
    /// `getSessions`.
    Sessions(Vec<SessionInfo>),
    /// `getDHT`.
    Dht(Vec<DhtEntry>),
    /// `getTree`.
    Tree(Vec<TreeEntry>),
    /// `getPaths` (kept untyped).
    Paths(Value),
    /// `addPeer` / `removePeer`.
    Ack,
}

/// Interprets one reply value (as returned by [`next_message`]) for
/// `request`.
pub fn parse_reply(request: &AdminRequest, reply: Value) -> Result<AdminResponse, AdminError> {
    let r = response_value(reply)?;
    Ok(match request {
        AdminRequest::List => AdminResponse::List(list_names(r)?),
        AdminRequest::GetSelf => AdminResponse::SelfInfo(shape("getSelf", r)?),
        AdminRequest::GetPeers => AdminResponse::Peers(list_of("getPeers", "peers", r)?),
        AdminRequest::GetSessions => {
            AdminResponse::Sessions(list_of("getSessions", "sessions", r)?)
        }
        AdminRequest::GetDht => AdminResponse::Dht(list_of("getDHT", "dht", r)?),
        AdminRequest::GetTree => AdminResponse::Tree(list_of("getTree", "tree", r)?),
        AdminRequest::GetPaths => AdminResponse::Paths(r),
        AdminRequest::AddPeer { .. } | AdminRequest::RemovePeer { .. } => AdminResponse::Ack,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY_A: &str = "8988ec86fd70a116524ef24b11d0aed0ef374a69b1014ae93a82716a7fadca54";
    const KEY_B: &str = "a9427f83263cb29bf09d979f4fcffdc2692fca21a04ddab180ef025198938e58";

    #[test]
    fn encode_requests() {
        let r = AdminRequest::GetSelf.encode(Version::V0_4, true).unwrap();
        assert_eq!(r, b"{\"request\":\"getSelf\",\"keepalive\":true}\n");
        let uri = LinkUri::parse_peer("tls://10.99.0.1:12346?priority=3", Version::V0_4).unwrap();
        let r = AdminRequest::AddPeer {
            uri: uri.clone(),
            interface: None,
        }
        .encode(Version::V0_5, false)
        .unwrap();
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "{\"request\":\"addPeer\",\"arguments\":{\"uri\":\"tls://10.99.0.1:12346?priority=3\"},\"keepalive\":false}\n"
        );
        let r = AdminRequest::RemovePeer {
            uri,
            interface: Some("eth0".into()),
        }
        .encode(Version::V0_4, true)
        .unwrap();
        let v: Value = serde_json::from_slice(&r).unwrap();
        assert_eq!(v["arguments"]["interface"], "eth0");
        assert_eq!(
            AdminRequest::GetDht
                .encode(Version::V0_5, true)
                .unwrap_err(),
            AdminError::Unsupported {
                request: "getDHT",
                version: Version::V0_5
            }
        );
        assert!(AdminRequest::GetTree.encode(Version::V0_4, true).is_err());
        assert!(AdminRequest::GetTree.encode(Version::V0_5, true).is_ok());
        let quic = LinkUri::parse_peer("quic://1.2.3.4:5", Version::V0_5).unwrap();
        let e = AdminRequest::AddPeer {
            uri: quic,
            interface: None,
        }
        .encode(Version::V0_4, true)
        .unwrap_err();
        assert!(e.to_string().contains("quic://1.2.3.4:5"), "{e}");
    }

    /// Shaped like 0.4.7's pretty-printed replies (docs/yggdrasil.md 2.9).
    fn self_04() -> String {
        format!(
            r#"{{
  "status": "success",
  "request": null,
  "response": {{
    "build_name": "unknown",
    "build_version": "unknown",
    "key": "{KEY_A}",
    "address": "200:ecee:26f2:51e:bdd3:5b62:1b69:dc5e",
    "coords": [],
    "subnet": "300:ecee:26f2:51e::/64"
  }}
}}
"#
        )
    }

    #[test]
    fn parse_self_04_and_05() {
        let s = parse_get_self(self_04().as_bytes()).unwrap();
        assert_eq!(s.key.to_hex(), KEY_A);
        assert_eq!(s.address, s.key.address());
        assert_eq!(s.subnet, s.key.subnet());
        assert_eq!(s.coords, Some(vec![]));
        let five = format!(
            r#"{{"status":"success","request":{{"request":"getSelf","keepalive":true}},
            "response":{{"build_name":"yggdrasil","build_version":"0.5.14","key":"{KEY_A}",
            "address":"200:ecee:26f2:51e:bdd3:5b62:1b69:dc5e","routing_entries":7,
            "subnet":"300:ecee:26f2:51e::/64","future_field":{{"x":1}}}}}}"#
        );
        let s = parse_get_self(five.as_bytes()).unwrap();
        assert_eq!(s.routing_entries, Some(7));
        assert_eq!(s.coords, None);
    }

    #[test]
    fn parse_peers_04_and_05() {
        let p04 = format!(
            r#"{{"status":"success","request":null,"response":{{"peers":[{{
            "address":"200:ad7b:f9:b386:9ac8:1ec4:d0c1:6060","key":"{KEY_B}","port":1,
            "priority":0,"coords":[1],"remote":"tcp://10.99.0.2:51572",
            "bytes_recvd":1234,"bytes_sent":5678,"uptime":12.5}}]}}}}"#
        );
        let p = parse_get_peers(p04.as_bytes()).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].key.unwrap().to_hex(), KEY_B);
        assert_eq!(p[0].coords, Some(vec![1]));
        assert_eq!((p[0].bytes_recvd, p[0].bytes_sent), (1234, 5678));
        let p05 = r#"{"status":"success","request":{"request":"getPeers"},"response":{"peers":[
            {"remote":"tls://a.example:443","up":false,"inbound":false,"key":"","port":0,
             "priority":0,"last_error":"connection refused","last_error_time":3000000000},
            {"remote":"tls://b.example:443","up":true,"inbound":true,
             "address":"200:ad7b:f9:b386:9ac8:1ec4:d0c1:6060",
             "key":"a9427f83263cb29bf09d979f4fcffdc2692fca21a04ddab180ef025198938e58",
             "port":2,"priority":1,"cost":3,"bytes_recvd":10.0,"bytes_sent":"20",
             "rate_recvd":1,"uptime":3.25,"latency_ms":12000000}]}}"#;
        let p = parse_get_peers(p05.as_bytes()).unwrap();
        assert_eq!(p[0].key, None);
        assert_eq!(p[0].up, Some(false));
        assert_eq!(p[0].last_error.as_deref(), Some("connection refused"));
        assert_eq!(p[1].cost, Some(3));
        assert_eq!((p[1].bytes_recvd, p[1].bytes_sent), (10, 20));
        assert_eq!(p[1].latency_raw, Some(12_000_000.0));
    }

    #[test]
    fn parse_tables() {
        let s = format!(
            r#"{{"status":"success","response":{{"sessions":[{{"address":"200:ad7b:f9:b386:9ac8:1ec4:d0c1:6060","key":"{KEY_B}","bytes_recvd":1,"bytes_sent":2,"uptime":3.5}}]}}}}"#
        );
        assert_eq!(parse_get_sessions(s.as_bytes()).unwrap()[0].bytes_sent, 2);
        let d = format!(
            r#"{{"status":"success","response":{{"dht":[{{"address":"200:ecee:26f2:51e:bdd3:5b62:1b69:dc5e","key":"{KEY_A}","port":0,"rest":0}}]}}}}"#
        );
        assert_eq!(parse_get_dht(d.as_bytes()).unwrap()[0].key.to_hex(), KEY_A);
        let t = format!(
            r#"{{"status":"success","response":{{"tree":[{{"address":"200:ecee:26f2:51e:bdd3:5b62:1b69:dc5e","key":"{KEY_A}","parent":"{KEY_A}","sequence":42}}]}}}}"#
        );
        let t = parse_get_tree(t.as_bytes()).unwrap();
        assert_eq!(
            (t[0].sequence, t[0].parent.unwrap().to_hex()),
            (42, KEY_A.to_owned())
        );
        // empty / null lists
        let e = br#"{"status":"success","response":{"sessions":null}}"#;
        assert!(parse_get_sessions(e).unwrap().is_empty());
        let e = br#"{"status":"success","response":{}}"#;
        assert!(parse_get_peers(e).unwrap().is_empty());
        // pre-0.4 map layout
        let m = format!(
            r#"{{"status":"success","response":{{"sessions":{{"200:ad7b:f9:b386:9ac8:1ec4:d0c1:6060":{{"key":"{KEY_B}"}}}}}}}}"#
        );
        let m = parse_get_sessions(m.as_bytes()).unwrap();
        assert_eq!(
            m[0].address,
            Some("200:ad7b:f9:b386:9ac8:1ec4:d0c1:6060".parse().unwrap())
        );
    }

    #[test]
    fn errors_are_clear() {
        let e = br#"{"status":"error","error":"Unknown action 'nope', try 'list' for help","request":null,"response":null}"#;
        let err = parse_get_self(e).unwrap_err();
        assert_eq!(
            err,
            AdminError::Daemon {
                request: "?".into(),
                message: "Unknown action 'nope', try 'list' for help".into()
            }
        );
        let old =
            br#"{"status":"error","request":{"request":"addPeer"},"response":{"error":"bad uri"}}"#;
        assert!(
            matches!(parse_ack(old), Err(AdminError::Daemon { request, message })
            if request == "addPeer" && message == "bad uri")
        );
        assert!(matches!(parse_ack(b"{nope"), Err(AdminError::Json(_))));
        assert!(matches!(parse_ack(b"[1]"), Err(AdminError::Json(_))));
        assert!(matches!(
            parse_ack(br#"{"status":"weird"}"#),
            Err(AdminError::Status(_))
        ));
        let bad_key = br#"{"status":"success","response":{"key":"xyz","address":"200::","subnet":"300::/64"}}"#;
        let e = parse_get_self(bad_key).unwrap_err();
        assert!(
            matches!(
                &e,
                AdminError::Shape {
                    request: "getSelf",
                    ..
                }
            ),
            "{e}"
        );
        let missing = br#"{"status":"success","response":{"address":"200::"}}"#;
        assert!(parse_get_self(missing)
            .unwrap_err()
            .to_string()
            .contains("key"));
    }

    #[test]
    fn list_and_dialect() {
        let l04 = br#"{"status":"success","request":null,"response":{"list":[
            {"command":"getDHT","description":"x","fields":[]},
            {"command":"getSelf","description":"y","fields":[]}]}}"#;
        let names = parse_list(l04).unwrap();
        assert_eq!(detect_version(&names), Some(Version::V0_4));
        let l05 = br#"{"status":"success","response":{"list":{"gettree":{"fields":[]}}}}"#;
        assert_eq!(
            detect_version(&parse_list(l05).unwrap()),
            Some(Version::V0_5)
        );
        assert_eq!(detect_version(&[]), None);
    }

    #[test]
    fn stream_splitting() {
        let one = self_04();
        let two = format!("{one}{one}");
        let bytes = two.as_bytes();
        // every strict prefix of the first message is incomplete
        for cut in 0..one.trim_end().len() {
            assert_eq!(next_message(&bytes[..cut]).unwrap(), None, "cut {cut}");
        }
        let (v, used) = next_message(bytes).unwrap().unwrap();
        assert!(matches!(
            parse_reply(&AdminRequest::GetSelf, v).unwrap(),
            AdminResponse::SelfInfo(_)
        ));
        let (_, used2) = next_message(&bytes[used..]).unwrap().unwrap();
        assert!(next_message(&bytes[used + used2..]).unwrap().is_none());
        assert!(next_message(b"} garbage").is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = next_message(&b);
            let _ = parse_get_self(&b);
            let _ = parse_get_peers(&b);
            let _ = parse_list(&b);
        }

        #[test]
        fn mutated_replies_never_panic(cut in 0usize..400, byte in any::<u8>()) {
            let mut b = self_04().into_bytes();
            if let Some(x) = b.get_mut(cut) { *x = byte; }
            let _ = parse_get_self(&b);
            let _ = next_message(&b);
        }
    }
}
