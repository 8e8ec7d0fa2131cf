//! The `[yggdrasil]` section of hub and node configs: strict TOML (unknown
//! keys are refused by serde, naming the key and its line) validated through
//! the pure [`super::identity`] checks into [`YggSettings`], which the
//! [`super::supervisor`] turns into a daemon config.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::identity::{
    private_key_from_config, valid_if_name, valid_socket_path, DaemonSettings, LinkUri, PrivateKey,
    PublicKey, UriRole, MAX_SOCKET_PATH,
};
use super::Version;

/// Where the supervisor keeps the daemon config and its status, and where
/// the admin socket goes by default (private per namespace in the netns lab).
pub const DEFAULT_STATE_DIR: &str = "/run/gatewire";
/// Debian's (and upstream's) path of the daemon.
pub const DEFAULT_BINARY: &str = "/usr/sbin/yggdrasil";
/// The daemon's TUN interface.
pub const DEFAULT_INTERFACE: &str = "ygg0";
/// The daemon's own default `IfMTU` (the TUN gets min(IfMTU, 53049)).
pub const DEFAULT_MTU: u64 = 65535;

/// `[yggdrasil]` as written in the file.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawYggdrasil {
    private_key: Option<String>,
    private_key_file: Option<PathBuf>,
    #[serde(default)]
    listen: Vec<String>,
    #[serde(default)]
    peers: Vec<String>,
    #[serde(default)]
    allowed_public_keys: Vec<String>,
    admin_socket: Option<PathBuf>,
    interface: Option<String>,
    mtu: Option<u64>,
    binary: Option<PathBuf>,
    version: Option<String>,
}

// Never print the inline key.
impl std::fmt::Debug for RawYggdrasil {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawYggdrasil")
            .field("private_key_file", &self.private_key_file)
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

/// Validated `[yggdrasil]` settings. `Debug` masks the private key.
#[derive(Debug, Clone)]
pub struct YggSettings {
    /// The node identity (daemon `PrivateKey`).
    pub private_key: PrivateKey,
    /// `Listen` URIs.
    pub listen: Vec<LinkUri>,
    /// `Peers` URIs.
    pub peers: Vec<LinkUri>,
    /// `AllowedPublicKeys` (empty: any peer may connect).
    pub allowed_public_keys: Vec<PublicKey>,
    /// The daemon's admin Unix socket.
    pub admin_socket: PathBuf,
    /// The daemon's TUN (`IfName`), which carries 200::/7.
    pub interface: String,
    /// `IfMTU`.
    pub mtu: u64,
    /// The daemon executable.
    pub binary: PathBuf,
    /// The dialect; `None`: detected from the binary at each start.
    pub version: Option<Version>,
    /// Directory for the generated config and the status file
    /// (`<state_dir>/ygg-<interface>/`). Not a config key: `gatewire show`
    /// looks in [`DEFAULT_STATE_DIR`].
    pub state_dir: PathBuf,
}

/// Equal when every setting is, the exact URI text included (`Debug` hides
/// passwords, so it cannot tell a changed one); the private keys compare by
/// their public halves, which they determine.
impl PartialEq for YggSettings {
    fn eq(&self, other: &Self) -> bool {
        self.private_key.public_key() == other.private_key.public_key()
            && self.listen == other.listen
            && self.peers == other.peers
            && self.allowed_public_keys == other.allowed_public_keys
            && self.admin_socket == other.admin_socket
            && self.interface == other.interface
            && self.mtu == other.mtu
            && self.binary == other.binary
            && self.version == other.version
            && self.state_dir == other.state_dir
    }
}

impl YggSettings {
    /// The per-daemon private directory.
    pub fn dir(&self) -> PathBuf {
        self.state_dir.join(format!("ygg-{}", self.interface))
    }

    /// The daemon settings for the pure renderer.
    pub fn daemon_settings(&self) -> DaemonSettings {
        let mut d = DaemonSettings::new(self.private_key.clone());
        d.listen = self.listen.clone();
        d.peers = self.peers.clone();
        d.allowed_public_keys = self.allowed_public_keys.clone();
        d.admin_listen = super::identity::AdminListen::Unix(self.admin_socket.clone());
        d.if_name = self.interface.clone();
        d.if_mtu = self.mtu;
        d
    }
}

fn patch_of(v: &str, minor: &str) -> bool {
    v.strip_prefix(minor)
        .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Parses a `version` value.
pub fn parse_version(s: &str) -> Result<Option<Version>, String> {
    match s.trim() {
        "auto" => Ok(None),
        "0.4" | "0.4.x" => Ok(Some(Version::V0_4)),
        "0.5" | "0.5.x" => Ok(Some(Version::V0_5)),
        v if patch_of(v, "0.4.") => Ok(Some(Version::V0_4)),
        v if patch_of(v, "0.5.") => Ok(Some(Version::V0_5)),
        v => Err(format!(
            "[yggdrasil] version `{v}`: expected \"auto\", \"0.4\" or \"0.5\""
        )),
    }
}

fn read_key(s: &str, what: &str) -> Result<PrivateKey, String> {
    let t = s.trim();
    if t.starts_with('{') {
        return private_key_from_config(t).map_err(|e| format!("{what}: {e}"));
    }
    PrivateKey::from_config_hex(t).map_err(|e| {
        format!("{what}: {e} (expected the daemon's 128 hex character PrivateKey, as printed by `gatewire ygg keygen`)")
    })
}

/// Validates `[yggdrasil]`. `base` resolves a relative key file and binary;
/// errors name the key (never the secret).
pub fn validate(raw: RawYggdrasil, base: &Path) -> Result<YggSettings, String> {
    let resolve = |p: &Path| {
        if p.is_relative() {
            base.join(p)
        } else {
            p.to_path_buf()
        }
    };
    let version = match &raw.version {
        Some(v) => parse_version(v)?,
        None => None,
    };
    let private_key = match (&raw.private_key, &raw.private_key_file) {
        (Some(_), Some(_)) => {
            return Err(
                "[yggdrasil]: set either `private_key` or `private_key_file`, not both".into(),
            )
        }
        (None, None) => {
            return Err(
                "[yggdrasil]: `private_key` or `private_key_file` is required (make one with `gatewire ygg keygen`)"
                    .into(),
            )
        }
        (Some(s), None) => read_key(s, "[yggdrasil] private_key")?,
        (None, Some(f)) => {
            let f = resolve(f);
            let what = format!("[yggdrasil] private_key_file {}", f.display());
            let s = crate::keys::read_secret_file(&f)
                .map(zeroize::Zeroizing::new)
                .map_err(|e| format!("{what}: {e}"))?;
            read_key(&s, &what)?
        }
    };
    // With "auto", accept what some version accepts (0.5 is the superset);
    // the URIs are checked again for the detected version before each start.
    let check_version = version.unwrap_or(Version::V0_5);
    let uris = |field: &str, v: &[String], role| -> Result<Vec<LinkUri>, String> {
        let mut out: Vec<LinkUri> = Vec::new();
        for s in v {
            let u = LinkUri::parse(s.trim(), check_version, role)
                .map_err(|e| format!("[yggdrasil] {field}: {e}"))?;
            if out.iter().any(|o| o.as_str() == u.as_str()) {
                return Err(format!(
                    "[yggdrasil] {field}: `{}` is listed twice",
                    super::identity::redact_uri(s)
                ));
            }
            out.push(u);
        }
        Ok(out)
    };
    let listen = uris("listen", &raw.listen, UriRole::Listen)?;
    let peers = uris("peers", &raw.peers, UriRole::Peer)?;
    let mut allowed_public_keys = Vec::new();
    for k in &raw.allowed_public_keys {
        allowed_public_keys.push(
            PublicKey::from_hex(k.trim())
                .map_err(|e| format!("[yggdrasil] allowed_public_keys `{k}`: {e}"))?,
        );
    }
    let interface = raw
        .interface
        .unwrap_or_else(|| DEFAULT_INTERFACE.to_string());
    if !valid_if_name(&interface) || interface == "auto" || interface == "none" {
        return Err(format!(
            "[yggdrasil] interface `{interface}`: 1 to 15 characters of letters, digits, `-`, `_`, `.` (the daemon's TUN, e.g. \"ygg0\")"
        ));
    }
    let mtu = raw.mtu.unwrap_or(DEFAULT_MTU);
    if !(1280..=65535).contains(&mtu) {
        return Err(format!("[yggdrasil] mtu {mtu}: must be 1280 to 65535"));
    }
    let state_dir = PathBuf::from(DEFAULT_STATE_DIR);
    let admin_socket = match raw.admin_socket {
        Some(p) => {
            // The daemon reads it from a `unix://` URI (Go's `net/url`
            // cuts at `?` and `#`, decodes `%`) and binds it (the kernel
            // takes 107 bytes at most).
            if !p.to_str().is_some_and(valid_socket_path) {
                return Err(format!(
                    "[yggdrasil] admin_socket `{}`: must be an absolute path of at most {MAX_SOCKET_PATH} bytes without whitespace, `%`, `?` or `#`",
                    p.display()
                ));
            }
            p
        }
        None => state_dir.join(format!("ygg-{interface}.sock")),
    };
    let binary = resolve(&raw.binary.unwrap_or_else(|| PathBuf::from(DEFAULT_BINARY)));
    let s = YggSettings {
        private_key,
        listen,
        peers,
        allowed_public_keys,
        admin_socket,
        interface,
        mtu,
        binary,
        version,
        state_dir,
    };
    // Everything the renderer checks, checked now.
    s.daemon_settings()
        .render(check_version)
        .map_err(|e| format!("[yggdrasil]: {e}"))?;
    Ok(s)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    const PRIV: &str = "2fb6bcc83c6976e63c76f3286278c441af929b4902a0544cd6e1e401b2a5d3328988ec86fd70a116524ef24b11d0aed0ef374a69b1014ae93a82716a7fadca54";

    fn parse(extra: &str) -> Result<YggSettings, String> {
        let raw: RawYggdrasil = toml::from_str(extra).map_err(|e| e.to_string())?;
        validate(raw, Path::new("/etc/gatewire"))
    }

    #[test]
    fn defaults() {
        let s = parse(&format!("private_key = \"{PRIV}\"\n")).unwrap();
        assert_eq!(s.interface, "ygg0");
        assert_eq!(s.admin_socket, Path::new("/run/gatewire/ygg-ygg0.sock"));
        assert_eq!(s.binary, Path::new(DEFAULT_BINARY));
        assert_eq!(s.version, None);
        assert_eq!(s.mtu, 65535);
        assert_eq!(
            s.private_key.public_key().address().to_string(),
            "200:ecee:26f2:51e:bdd3:5b62:1b69:dc5e"
        );
        assert!(!format!("{s:?}").contains(PRIV));
    }

    #[test]
    fn full() {
        let s = parse(&format!(
            "private_key = \"{PRIV}\"\nlisten = [\"tcp://0.0.0.0:12345\", \"tls://[::]:12346\"]\n\
             peers = [\"tls://203.0.113.1:12346?key=a9427f83263cb29bf09d979f4fcffdc2692fca21a04ddab180ef025198938e58\"]\n\
             interface = \"yggx\"\nmtu = 9000\nversion = \"0.4\"\nbinary = \"bin/ygg\"\n\
             admin_socket = \"/tmp/a.sock\"\n"
        ))
        .unwrap();
        assert_eq!(s.listen.len(), 2);
        assert_eq!(s.peers.len(), 1);
        assert_eq!(s.version, Some(Version::V0_4));
        assert_eq!(s.binary, Path::new("/etc/gatewire/bin/ygg"));
        assert_eq!(s.admin_socket, Path::new("/tmp/a.sock"));
        let conf = s.daemon_settings().render(Version::V0_4).unwrap();
        assert!(conf.contains("\"IfName\": \"yggx\""), "{conf}");
        assert!(conf.contains("unix:///tmp/a.sock"), "{conf}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("private_key = \"abcd\"\n").unwrap_err();
        assert!(e.contains("[yggdrasil] private_key"), "{e}");
        assert!(!e.contains("abcd"), "{e}");
        let e = parse(&format!(
            "private_key = \"{PRIV}\"\npeers = [\"tcp://host\"]\n"
        ))
        .unwrap_err();
        assert!(e.contains("peers") && e.contains("tcp://host"), "{e}");
        let e = parse(&format!(
            "private_key = \"{PRIV}\"\npeers = [\"quic://h:1\"]\nversion = \"0.4\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("peers") && e.contains("quic"), "{e}");
        let e = parse(&format!(
            "private_key = \"{PRIV}\"\nlisten = [\"socks://a:1/b:2\"]\n"
        ))
        .unwrap_err();
        assert!(e.contains("listen"), "{e}");
        let e = parse(&format!("private_key = \"{PRIV}\"\nversion = \"0.6\"\n")).unwrap_err();
        assert!(e.contains("version"), "{e}");
        let e = parse(&format!("private_key = \"{PRIV}\"\nmtu = 100\n")).unwrap_err();
        assert!(e.contains("mtu"), "{e}");
        let e = parse(&format!("private_key = \"{PRIV}\"\ninterface = \"none\"\n")).unwrap_err();
        assert!(e.contains("interface"), "{e}");
        let e = parse(&format!(
            "private_key = \"{PRIV}\"\nadmin_socket = \"rel.sock\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("admin_socket"), "{e}");
        let e = parse(&format!(
            "private_key = \"{PRIV}\"\nallowed_public_keys = [\"xx\"]\n"
        ))
        .unwrap_err();
        assert!(e.contains("allowed_public_keys"), "{e}");
        let e = parse(&format!("private_key = \"{PRIV}\"\npeer = []\n")).unwrap_err();
        assert!(e.contains("peer"), "{e}");
        let e = parse("").unwrap_err();
        assert!(e.contains("required"), "{e}");
    }

    #[test]
    fn admin_socket_paths_the_daemon_would_misread_are_refused() {
        let long = format!("/{}", "a".repeat(119));
        assert_eq!(long.len(), 120);
        for p in [
            long.as_str(),
            "/run/a?b.sock",
            "/run/a%41.sock",
            "/run/a#b.sock",
        ] {
            let e = parse(&format!(
                "private_key = \"{PRIV}\"\nadmin_socket = \"{p}\"\n"
            ))
            .unwrap_err();
            assert!(e.contains("admin_socket") && e.contains(p), "{e}");
        }
        let ok = format!("/{}", "a".repeat(106));
        let s = parse(&format!(
            "private_key = \"{PRIV}\"\nadmin_socket = \"{ok}\"\n"
        ))
        .unwrap();
        assert_eq!(s.admin_socket, Path::new(&ok));
        // A zone written as Go wants it, and one it refuses.
        parse(&format!(
            "private_key = \"{PRIV}\"\npeers = [\"tcp://[fe80::1%25eth0]:1\"]\n"
        ))
        .unwrap();
        let e = parse(&format!(
            "private_key = \"{PRIV}\"\npeers = [\"tcp://[fe80::1%eth0]:1\"]\n"
        ))
        .unwrap_err();
        assert!(e.contains("peers") && e.contains("fe80::1%eth0"), "{e}");
    }

    #[test]
    fn key_file_hex_or_daemon_json() {
        let dir = std::env::temp_dir().join(format!("gw-ygg-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("k.hex"), format!("{PRIV}\n")).unwrap();
        std::fs::write(
            dir.join("k.json"),
            format!("{{\"PrivateKey\": \"{PRIV}\", \"Peers\": []}}"),
        )
        .unwrap();
        for f in ["k.hex", "k.json"] {
            let raw: RawYggdrasil =
                toml::from_str(&format!("private_key_file = \"{f}\"\n")).unwrap();
            let s = validate(raw, &dir).unwrap();
            assert_eq!(
                s.private_key.public_key().to_hex(),
                "8988ec86fd70a116524ef24b11d0aed0ef374a69b1014ae93a82716a7fadca54"
            );
        }
        let raw: RawYggdrasil = toml::from_str("private_key_file = \"missing\"\n").unwrap();
        let e = validate(raw, &dir).unwrap_err();
        assert!(e.contains("private_key_file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_fifo_key_file_is_an_error_not_a_hang() {
        let dir = std::env::temp_dir().join(format!("gw-ygg-fifo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("k.fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let (tx, rx) = std::sync::mpsc::channel();
        let d = dir.clone();
        std::thread::spawn(move || {
            let raw: RawYggdrasil = toml::from_str("private_key_file = \"k.fifo\"\n").unwrap();
            let _ = tx.send(validate(raw, &d).map(|_| ()));
        });
        // A timeout here: the FIFO blocked the config load.
        let e = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .unwrap()
            .unwrap_err();
        assert!(
            e.contains("private_key_file") && e.contains("not a regular file"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
