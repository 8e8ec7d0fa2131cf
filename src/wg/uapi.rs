//! The cross-platform WireGuard userspace API (`get=1` / `set=1` over a Unix socket),
//! as `wg` from wireguard-tools speaks it.
//!
//! Pure: the driver reads lines from the socket and feeds them to [`SetParser`];
//! [`format_get`] renders a device snapshot. Gatewire adds one operation of its
//! own, `show=json`, answered with the JSON that `gatewire show` prints.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use crate::keys::{PresharedKey, PrivateKey, PublicKey};
use ipnet::IpNet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

/// Longest line accepted on the socket.
pub const MAX_LINE: usize = 4096;

/// `errno` values reported to the client, as wireguard-go reports them.
pub const EINVAL: i32 = 22;
pub const EIO: i32 = 5;
pub const EPROTO: i32 = 71;

/// The operation a client asked for, from the first line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    Set,
    ShowJson,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UapiError {
    #[error("unknown operation `{0}`")]
    UnknownOp(String),
    /// Only the line's leading name is kept: the rest may be a key.
    #[error("line without `=` (starting `{0}`)")]
    NoEquals(String),
    #[error("invalid value for `{key}`: `{value}`")]
    BadValue { key: String, value: String },
    #[error("`{0}` must follow a `public_key` line")]
    NoPeer(String),
    #[error("unknown key `{0}`")]
    UnknownKey(String),
    #[error("unsupported protocol version `{0}`")]
    ProtocolVersion(String),
}

impl UapiError {
    pub fn errno(&self) -> i32 {
        match self {
            UapiError::UnknownOp(_) => EIO,
            UapiError::ProtocolVersion(_) => EPROTO,
            _ => EINVAL,
        }
    }
}

/// Parses the first line of a request.
pub fn parse_op(line: &str) -> Result<Op, UapiError> {
    match line {
        "get=1" => Ok(Op::Get),
        "set=1" => Ok(Op::Set),
        "show=json" => Ok(Op::ShowJson),
        other => Err(UapiError::UnknownOp(other.chars().take(64).collect())),
    }
}

/// Changes to one peer in a `set=1` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSet {
    pub public_key: PublicKey,
    pub remove: bool,
    pub update_only: bool,
    /// `Some(None)` clears the preshared key.
    pub preshared_key: Option<Option<PresharedKey>>,
    pub endpoint: Option<SocketAddr>,
    /// `Some(0)` turns persistent keepalive off.
    pub persistent_keepalive: Option<u16>,
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<IpNet>,
}

impl PeerSet {
    pub fn new(public_key: PublicKey) -> Self {
        Self {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }
}

/// A whole `set=1` request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceSet {
    /// `Some(None)`: the private key is removed (an all-zero key).
    pub private_key: Option<Option<PrivateKey>>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub replace_peers: bool,
    pub peers: Vec<PeerSet>,
}

/// Accumulates the `key=value` lines of a `set=1` request.
#[derive(Debug, Default)]
pub struct SetParser {
    set: DeviceSet,
}

fn bad(key: &str, value: &str) -> UapiError {
    UapiError::BadValue {
        key: key.to_string(),
        value: value.chars().take(64).collect(),
    }
}

/// A bad value of a secret's key: the error (which is logged and sent back)
/// never repeats it, even mistyped.
fn bad_secret(key: &str, value: &str) -> UapiError {
    UapiError::BadValue {
        key: key.to_string(),
        value: format!("(hidden, {} bytes)", value.len()),
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool, UapiError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(bad(key, value)),
    }
}

impl SetParser {
    pub fn new() -> Self {
        Self::default()
    }

    fn peer(&mut self, key: &str) -> Result<&mut PeerSet, UapiError> {
        self.set
            .peers
            .last_mut()
            .ok_or_else(|| UapiError::NoPeer(key.to_string()))
    }

    /// Feeds one non-empty line.
    pub fn feed(&mut self, line: &str) -> Result<(), UapiError> {
        let (key, value) = line.split_once('=').ok_or_else(|| {
            UapiError::NoEquals(
                line.chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .take(32)
                    .collect(),
            )
        })?;
        // Device keys come before the first peer's, as wireguard-go requires.
        if !self.set.peers.is_empty()
            && matches!(
                key,
                "private_key" | "listen_port" | "fwmark" | "replace_peers"
            )
        {
            return Err(UapiError::UnknownKey(key.to_string()));
        }
        match key {
            "private_key" => {
                let k = PrivateKey::from_hex(value).map_err(|_| bad_secret(key, value))?;
                self.set.private_key = Some(if k.is_zero() { None } else { Some(k) });
            }
            "listen_port" => {
                self.set.listen_port = Some(value.parse().map_err(|_| bad(key, value))?);
            }
            "fwmark" => {
                self.set.fwmark = Some(if value.is_empty() {
                    0
                } else {
                    value.parse().map_err(|_| bad(key, value))?
                });
            }
            "replace_peers" => self.set.replace_peers = parse_bool(key, value)?,
            "public_key" => {
                let k = PublicKey::from_hex(value).map_err(|_| bad(key, value))?;
                self.set.peers.push(PeerSet::new(k));
            }
            "remove" => {
                let v = parse_bool(key, value)?;
                self.peer(key)?.remove = v;
            }
            "update_only" => {
                let v = parse_bool(key, value)?;
                self.peer(key)?.update_only = v;
            }
            "preshared_key" => {
                let k = PresharedKey::from_hex(value).map_err(|_| bad_secret(key, value))?;
                self.peer(key)?.preshared_key = Some(if k.is_zero() { None } else { Some(k) });
            }
            "endpoint" => {
                let e: SocketAddr = value.parse().map_err(|_| bad(key, value))?;
                self.peer(key)?.endpoint = Some(e);
            }
            "persistent_keepalive_interval" => {
                let v: u16 = value.parse().map_err(|_| bad(key, value))?;
                self.peer(key)?.persistent_keepalive = Some(v);
            }
            "replace_allowed_ips" => {
                let v = parse_bool(key, value)?;
                self.peer(key)?.replace_allowed_ips = v;
            }
            "allowed_ip" => {
                let n: IpNet = value.parse().map_err(|_| bad(key, value))?;
                self.peer(key)?.allowed_ips.push(n);
            }
            "protocol_version" => {
                self.peer(key)?;
                if value != "1" {
                    return Err(UapiError::ProtocolVersion(value.chars().take(16).collect()));
                }
            }
            other => return Err(UapiError::UnknownKey(other.chars().take(64).collect())),
        }
        Ok(())
    }

    pub fn finish(self) -> DeviceSet {
        self.set
    }
}

/// What `get=1` reports about a peer.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub public_key: PublicKey,
    pub preshared_key: Option<PresharedKey>,
    pub endpoint: Option<SocketAddr>,
    /// Time since the UNIX epoch of the last completed handshake.
    pub last_handshake: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: u16,
    pub allowed_ips: Vec<IpNet>,
}

/// What `get=1` reports about the device.
#[derive(Debug, Clone, Default)]
pub struct DeviceInfo {
    pub private_key: Option<PrivateKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<PeerInfo>,
}

/// Renders the body of a `get=1` reply, ending with `errno=0` and the blank line.
pub fn format_get(d: &DeviceInfo) -> String {
    let mut s = String::with_capacity(128 + d.peers.len() * 256);
    if let Some(k) = &d.private_key {
        let _ = writeln!(s, "private_key={}", k.expose_hex());
    }
    let _ = writeln!(s, "listen_port={}", d.listen_port);
    if d.fwmark != 0 {
        let _ = writeln!(s, "fwmark={}", d.fwmark);
    }
    for p in &d.peers {
        let _ = writeln!(s, "public_key={}", p.public_key.to_hex());
        if let Some(psk) = &p.preshared_key {
            let _ = writeln!(s, "preshared_key={}", psk.expose_hex());
        }
        let _ = writeln!(s, "protocol_version=1");
        if let Some(e) = p.endpoint {
            let _ = writeln!(s, "endpoint={e}");
        }
        let (sec, nsec) = p
            .last_handshake
            .map(|t| (t.as_secs(), t.subsec_nanos()))
            .unwrap_or((0, 0));
        let _ = writeln!(s, "last_handshake_time_sec={sec}");
        let _ = writeln!(s, "last_handshake_time_nsec={nsec}");
        let _ = writeln!(s, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(s, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(
            s,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive
        );
        for n in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={n}");
        }
    }
    s.push_str("errno=0\n\n");
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_wg_setconf_sends() {
        let pk = PublicKey([7u8; 32]);
        let lines = [
            format!("private_key={}", hex::encode([1u8; 32])),
            "listen_port=51820".into(),
            "replace_peers=true".into(),
            format!("public_key={}", pk.to_hex()),
            "replace_allowed_ips=true".into(),
            "allowed_ip=100.64.0.2/32".into(),
            "allowed_ip=fd77::2/128".into(),
            "endpoint=[2001:db8::1]:51820".into(),
            "persistent_keepalive_interval=25".into(),
            "protocol_version=1".into(),
        ];
        let mut p = SetParser::new();
        for l in &lines {
            p.feed(l).unwrap();
        }
        let s = p.finish();
        assert_eq!(s.listen_port, Some(51820));
        assert!(s.replace_peers);
        assert_eq!(s.peers.len(), 1);
        let peer = &s.peers[0];
        assert_eq!(peer.public_key, pk);
        assert_eq!(peer.allowed_ips.len(), 2);
        assert_eq!(peer.persistent_keepalive, Some(25));
        assert_eq!(peer.endpoint, Some("[2001:db8::1]:51820".parse().unwrap()));
    }

    #[test]
    fn zero_private_key_removes_it() {
        let mut p = SetParser::new();
        p.feed(&format!("private_key={}", hex::encode([0u8; 32])))
            .unwrap();
        assert_eq!(p.finish().private_key, Some(None));
    }

    #[test]
    fn errors_name_the_problem() {
        let mut p = SetParser::new();
        assert_eq!(
            p.feed("allowed_ip=1.2.3.4/32"),
            Err(UapiError::NoPeer("allowed_ip".into()))
        );
        assert!(matches!(p.feed("bogus=1"), Err(UapiError::UnknownKey(_))));
        assert!(matches!(
            p.feed("listen_port=x"),
            Err(UapiError::BadValue { .. })
        ));
        assert!(matches!(p.feed("noequals"), Err(UapiError::NoEquals(_))));
        assert_eq!(parse_op("get=2").unwrap_err().errno(), EIO);
    }

    /// A device key after a peer's section began is refused, whatever its
    /// value, as wireguard-go refuses it: nothing of the request applies.
    #[test]
    fn device_keys_after_a_peer_are_refused() {
        let pk = format!("public_key={}", hex::encode([7u8; 32]));
        for line in [
            format!("private_key={}", hex::encode([1u8; 32])),
            "listen_port=51821".into(),
            "fwmark=7".into(),
            "replace_peers=true".into(),
        ] {
            let mut p = SetParser::new();
            p.feed(&pk).unwrap();
            let e = p.feed(&line).unwrap_err();
            assert!(matches!(e, UapiError::UnknownKey(_)), "{line}: {e:?}");
            assert_eq!(e.errno(), EINVAL);
            assert!(!e.to_string().contains(&hex::encode([1u8; 32])));
            let s = p.finish();
            assert_eq!(
                (s.private_key, s.listen_port, s.fwmark, s.replace_peers),
                (None, None, None, false)
            );
        }
        // Before the first peer, as ever.
        let mut p = SetParser::new();
        p.feed("listen_port=51821").unwrap();
        p.feed(&pk).unwrap();
        assert_eq!(p.finish().listen_port, Some(51821));
    }

    /// A mistyped key is never repeated in the error (logged, sent back).
    #[test]
    fn errors_never_repeat_a_key() {
        let secret = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a0";
        let mut p = SetParser::new();
        for line in [
            format!("private_key={secret}"),
            format!("private_key={secret}zz"),
            format!("private_key:{secret}"),
            format!("public_key={}", hex::encode([7u8; 32])),
            format!("preshared_key={secret}"),
            format!("preshared_key {secret}"),
        ] {
            match p.feed(&line) {
                Ok(()) => continue,
                Err(e) => {
                    let text = e.to_string();
                    assert!(!text.contains(&secret[..16]), "{text}");
                    assert!(!format!("{e:?}").contains(&secret[..16]), "{e:?}");
                }
            }
        }
        assert_eq!(
            p.feed(&format!("private_key:{secret}")),
            Err(UapiError::NoEquals("private_key".into()))
        );
        assert_eq!(parse_op("set=1"), Ok(Op::Set));
    }

    #[test]
    fn get_output_has_wg_fields() {
        let d = DeviceInfo {
            private_key: Some(PrivateKey::from_bytes([2u8; 32])),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![PeerInfo {
                public_key: PublicKey([3u8; 32]),
                preshared_key: None,
                endpoint: Some("203.0.113.5:4000".parse().unwrap()),
                last_handshake: Some(Duration::new(1_700_000_000, 5)),
                rx_bytes: 10,
                tx_bytes: 20,
                persistent_keepalive: 0,
                allowed_ips: vec!["100.64.0.2/32".parse().unwrap()],
            }],
        };
        let s = format_get(&d);
        assert!(s.starts_with(&format!("private_key={}\n", hex::encode([2u8; 32]))));
        assert!(s.contains("endpoint=203.0.113.5:4000\n"));
        assert!(s.contains("last_handshake_time_sec=1700000000\n"));
        assert!(s.contains("allowed_ip=100.64.0.2/32\n"));
        assert!(s.ends_with("errno=0\n\n"));
    }
}
