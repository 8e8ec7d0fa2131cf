//! The hub's `[mesh]` section: strict TOML validated into [`MeshSettings`].

use super::table::valid_name;
use serde::Deserialize;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default key prefix in etcd.
pub const DEFAULT_PREFIX: &str = "/gatewire/mesh/";
/// Default lease time of a hub's record, in seconds.
pub const DEFAULT_TTL: u64 = 10;

/// `[mesh]` as written in the file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct RawMesh {
    name: Option<String>,
    #[serde(default)]
    etcd: Vec<String>,
    #[serde(default)]
    advertise: Vec<String>,
    prefix: Option<String>,
    ttl: Option<u64>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    share_certificates: Option<bool>,
    secret_file: Option<PathBuf>,
}

/// Validated `[mesh]` settings. `Debug` leaves the password out.
#[derive(Clone, PartialEq, Eq)]
pub struct MeshSettings {
    /// This hub's name in the mesh.
    pub name: String,
    /// etcd endpoints (`http://host:port` or `https://host:port`).
    pub etcd: Vec<String>,
    /// This hub's public addresses: where the other hubs send it connections,
    /// and the source addresses it uses for the connections it sends them.
    pub advertise: Vec<IpAddr>,
    /// Key prefix; records live at `<prefix>hubs/<name>`.
    pub prefix: String,
    /// Lease of this hub's record: it disappears this long after the hub stops
    /// renewing it.
    pub ttl: Duration,
    /// etcd user and password, if etcd has authentication on.
    pub user: Option<(String, String)>,
    /// CA certificate (PEM) for `https://` endpoints.
    pub ca_pem: Option<Vec<u8>>,
    /// ACME certificates (with their keys) are stored in etcd and used by
    /// every hub that serves the name; off: each hub orders its own (one hub
    /// at a time still, and challenges are still shared).
    pub share_certificates: bool,
    /// The secrets every hub of the mesh shares (`secret_file`, one per
    /// line): the PROXY headers hubs send each other are sealed with the
    /// first, a header sealed with any of them is taken from any address.
    pub secret: Option<MeshSecret>,
}

/// The mesh secrets' bytes, the sealing one first. `Debug` shows nothing of
/// them.
#[derive(Clone, PartialEq, Eq)]
pub struct MeshSecret(pub Vec<Vec<u8>>);

impl std::fmt::Debug for MeshSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MeshSecret(..)")
    }
}

impl std::fmt::Debug for MeshSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshSettings")
            .field("name", &self.name)
            .field("etcd", &self.etcd)
            .field("advertise", &self.advertise)
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("share_certificates", &self.share_certificates)
            .field("secret", &self.secret.is_some())
            .finish_non_exhaustive()
    }
}

impl MeshSettings {
    /// The key prefix of every hub's record.
    pub fn hubs_prefix(&self) -> String {
        format!("{}hubs/", self.prefix)
    }

    /// The key of this hub's record.
    pub fn own_key(&self) -> String {
        format!("{}{}", self.hubs_prefix(), self.name)
    }

    /// The key prefix of the shared ACME keys (see [`crate::mesh::acme`]).
    pub fn acme_prefix(&self) -> String {
        format!("{}acme/", self.prefix)
    }

    /// The key prefix of the name claims (see [`crate::mesh::claims`]).
    pub fn names_prefix(&self) -> String {
        format!("{}names/", self.prefix)
    }
}

fn read_file(what: &str, p: &Path, base: &Path) -> Result<Vec<u8>, String> {
    let p = base.join(p);
    std::fs::read(&p).map_err(|e| format!("[mesh] {what} {}: {e}", p.display()))
}

/// [`read_file`] for the password and the secret (regular file, size cap).
fn read_secret(what: &str, p: &Path, base: &Path) -> Result<Vec<u8>, String> {
    let p = base.join(p);
    crate::keys::read_secret_bytes(&p).map_err(|e| format!("[mesh] {what} {}: {e}", p.display()))
}

/// Validates `[mesh]`. `has_listener`: the proxy has an HTTP or HTTPS
/// listener (the mesh forwards to and from those).
pub fn validate(raw: RawMesh, base: &Path, has_listener: bool) -> Result<MeshSettings, String> {
    if !has_listener {
        return Err(
            "[mesh] needs a [proxy] with an http_listen or https_listen address: the other hubs send their connections there".into(),
        );
    }
    let name = raw
        .name
        .ok_or("[mesh] name is required (unique among the hubs)")?;
    if !valid_name(&name) {
        return Err(format!(
            "[mesh] name `{name}`: use 1-63 of a-z, 0-9, `-`, `_`, `.`"
        ));
    }
    if raw.etcd.is_empty() {
        return Err("[mesh] etcd: at least one endpoint (http://host:port) is required".into());
    }
    let mut tls = false;
    for e in &raw.etcd {
        if e.contains('@') {
            // The etcd client ignores credentials in the URL (the mesh would
            // run without authentication), and the URL is logged.
            return Err(format!(
                "[mesh] etcd `{}`: credentials do not go in the URL; use username and password_file",
                crate::config::redact_url(e)
            ));
        }
        let rest = if let Some(r) = e.strip_prefix("https://") {
            tls = true;
            r
        } else if let Some(r) = e.strip_prefix("http://") {
            r
        } else {
            return Err(format!(
                "[mesh] etcd `{e}`: expected http://host:port or https://host:port"
            ));
        };
        if rest.is_empty() || rest.contains('/') || !rest.contains(':') {
            return Err(format!(
                "[mesh] etcd `{e}`: expected http://host:port or https://host:port"
            ));
        }
    }
    if tls && raw.etcd.iter().any(|e| e.starts_with("http://")) {
        return Err("[mesh] etcd: mix of http:// and https:// endpoints".into());
    }
    if raw.advertise.is_empty() {
        return Err("[mesh] advertise: at least one public address of this hub is required".into());
    }
    let mut advertise = Vec::new();
    for a in &raw.advertise {
        let ip: IpAddr = a
            .parse()
            .map_err(|_| format!("[mesh] advertise `{a}`: expected an IP address"))?;
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
            return Err(format!(
                "[mesh] advertise `{a}`: must be an address the other hubs can reach"
            ));
        }
        if !advertise.contains(&ip) {
            advertise.push(ip);
        }
    }
    // The other hubs drop a record with more (every peer would lose this hub).
    if advertise.len() > super::table::MAX_ADDRS {
        return Err(format!(
            "[mesh] advertise: at most {} addresses",
            super::table::MAX_ADDRS
        ));
    }
    let prefix = raw.prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_string());
    if !prefix.starts_with('/') || !prefix.ends_with('/') {
        return Err(format!(
            "[mesh] prefix `{prefix}`: must start and end with `/`"
        ));
    }
    let ttl = raw.ttl.unwrap_or(DEFAULT_TTL);
    if !(3..=300).contains(&ttl) {
        return Err(format!("[mesh] ttl {ttl}: expected 3 to 300 seconds"));
    }
    let user = match (raw.username, raw.password_file) {
        (Some(u), Some(p)) => {
            let pw = read_secret("password_file", &p, base)?;
            let pw =
                String::from_utf8(pw).map_err(|_| "[mesh] password_file: not UTF-8".to_string())?;
            Some((u, pw.trim_end_matches(['\r', '\n']).to_string()))
        }
        (None, None) => None,
        _ => return Err("[mesh] username and password_file go together".into()),
    };
    let ca_pem = raw
        .ca_file
        .map(|p| read_file("ca_file", &p, base))
        .transpose()?;
    if tls && ca_pem.is_none() {
        return Err("[mesh] ca_file is required with https:// endpoints".into());
    }
    Ok(MeshSettings {
        name,
        etcd: raw.etcd,
        advertise,
        prefix,
        ttl: Duration::from_secs(ttl),
        user,
        ca_pem,
        share_certificates: raw.share_certificates.unwrap_or(true),
        secret: raw
            .secret_file
            .map(|p| -> Result<MeshSecret, String> {
                let b = read_secret("secret_file", &p, base)?;
                let mut keys = Vec::new();
                for (i, line) in b.split(|&c| c == b'\n').enumerate() {
                    let line = line.trim_ascii();
                    if line.is_empty() {
                        continue;
                    }
                    crate::mesh::seal::SealKey::new(line).map_err(|e| {
                        format!("[mesh] secret_file {} line {}: {e}", p.display(), i + 1)
                    })?;
                    keys.push(line.to_vec());
                }
                if keys.is_empty() {
                    return Err(format!(
                        "[mesh] secret_file {}: no secret in it",
                        p.display()
                    ));
                }
                Ok(MeshSecret(keys))
            })
            .transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MeshSettings, String> {
        let raw: RawMesh = toml::from_str(text).map_err(|e| e.to_string())?;
        validate(raw, Path::new("/nonexistent"), true)
    }

    const OK: &str =
        "name = \"hub-a\"\netcd = [\"http://192.0.2.9:2379\"]\nadvertise = [\"198.51.100.1\"]\n";

    #[test]
    fn defaults() {
        let s = parse(OK).unwrap();
        assert_eq!(s.prefix, DEFAULT_PREFIX);
        assert_eq!(s.ttl, Duration::from_secs(DEFAULT_TTL));
        assert_eq!(s.own_key(), "/gatewire/mesh/hubs/hub-a");
        assert_eq!(s.acme_prefix(), "/gatewire/mesh/acme/");
        assert!(s.user.is_none());
        assert!(s.share_certificates);
        let off = parse(&format!("{OK}share_certificates = false\n")).unwrap();
        assert!(!off.share_certificates);
        assert!(parse(&format!("{OK}share_certificates = \"no\"\n")).is_err());
    }

    #[test]
    fn at_most_16_advertised_addresses() {
        let with = |ips: &[u8]| {
            let list: Vec<String> = ips.iter().map(|i| format!("\"198.51.100.{i}\"")).collect();
            parse(&format!(
                "name = \"hub-a\"\netcd = [\"http://192.0.2.9:2379\"]\nadvertise = [{}]\n",
                list.join(", ")
            ))
        };
        let sixteen: Vec<u8> = (1..=16).collect();
        assert_eq!(with(&sixteen).unwrap().advertise.len(), 16);
        let e = with(&(1..=17).collect::<Vec<u8>>()).unwrap_err();
        assert_eq!(e, "[mesh] advertise: at most 16 addresses");
        // Repeats do not count.
        let repeated = [sixteen.as_slice(), &[1]].concat();
        assert_eq!(with(&repeated).unwrap().advertise.len(), 16);
    }

    #[test]
    fn a_secret_file_holds_at_least_32_bytes_and_never_shows() {
        let dir = std::env::temp_dir().join(format!("gw-mesh-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ok.key"), "0123456789abcdef0123456789abcdef\n").unwrap();
        std::fs::write(dir.join("short.key"), "too-short\n").unwrap();
        std::fs::write(
            dir.join("two.key"),
            "\n0123456789abcdef0123456789abcdeX\r\n  0123456789abcdef0123456789abcdef \n",
        )
        .unwrap();
        std::fs::write(dir.join("empty.key"), "\n \n").unwrap();
        let with = |f: &str| {
            let raw: RawMesh = toml::from_str(&format!("{OK}secret_file = \"{f}\"\n")).unwrap();
            validate(raw, &dir, true)
        };
        let s = with("ok.key").unwrap();
        assert_eq!(
            s.secret.as_ref().map(|k| k.0.clone()),
            Some(vec![b"0123456789abcdef0123456789abcdef".to_vec()])
        );
        let two = with("two.key").unwrap().secret.unwrap().0;
        assert_eq!(two.len(), 2);
        assert_eq!(two[0], b"0123456789abcdef0123456789abcdeX");
        assert!(with("empty.key").unwrap_err().contains("no secret"));
        assert!(!format!("{s:?}").contains("0123456789"));
        let e = with("short.key").unwrap_err();
        assert!(
            e.contains("secret_file") && e.contains("line 1") && e.contains("at least 32"),
            "{e}"
        );
        assert!(with("missing.key").unwrap_err().contains("secret_file"));
        std::fs::write(dir.join("big.key"), vec![b'k'; 64 * 1024 + 1]).unwrap();
        let e = with("big.key").unwrap_err();
        assert!(
            e.contains("secret_file") && e.contains("larger than"),
            "{e}"
        );
        assert!(parse(OK).unwrap().secret.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("etcd = [\"http://a:1\"]\nadvertise = [\"198.51.100.1\"]\n", "name is required"),
            ("name = \"A\"\netcd = [\"http://a:1\"]\nadvertise = [\"198.51.100.1\"]\n", "name `A`"),
            ("name = \"a\"\nadvertise = [\"198.51.100.1\"]\n", "etcd: at least one"),
            ("name = \"a\"\netcd = [\"a:1\"]\nadvertise = [\"198.51.100.1\"]\n", "etcd `a:1`"),
            ("name = \"a\"\netcd = [\"http://a:1\"]\n", "advertise: at least one"),
            ("name = \"a\"\netcd = [\"http://a:1\"]\nadvertise = [\"0.0.0.0\"]\n", "advertise `0.0.0.0`"),
            ("name = \"a\"\netcd = [\"http://a:1\"]\nadvertise = [\"127.0.0.1\"]\n", "advertise `127.0.0.1`"),
            ("name = \"a\"\netcd = [\"http://a:1\"]\nadvertise = [\"x\"]\n", "advertise `x`"),
            ("name = \"a\"\netcd = [\"https://a:1\"]\nadvertise = [\"192.0.2.1\"]\n", "ca_file is required"),
            ("name = \"a\"\netcd = [\"http://a:1\"]\nadvertise = [\"192.0.2.1\"]\nttl = 1\n", "ttl 1"),
            ("name = \"a\"\netcd = [\"http://a:1\"]\nadvertise = [\"192.0.2.1\"]\nprefix = \"x\"\n", "prefix `x`"),
            ("name = \"a\"\netcd = [\"http://a:1\"]\nadvertise = [\"192.0.2.1\"]\nusername = \"u\"\n", "go together"),
            ("name = \"a\"\netcd = [\"http://a:1\"]\nadvertise = [\"192.0.2.1\"]\nusername = \"u\"\npassword_file = \"pw\"\n", "password_file /nonexistent/pw"),
            ("name = \"a\"\nbogus = 1\n", "unknown field `bogus`"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
        let raw: RawMesh = toml::from_str(OK).unwrap();
        let e = validate(raw, Path::new("/"), false).unwrap_err();
        assert!(e.contains("needs a [proxy]"), "{e}");
        // Credentials in an endpoint: refused, and not echoed.
        let e = parse(
            "name = \"a\"\netcd = [\"http://root:s3cret@192.0.2.9:2379\"]\nadvertise = [\"192.0.2.1\"]\n",
        )
        .unwrap_err();
        assert!(
            e.contains("password_file") && e.contains("192.0.2.9:2379"),
            "{e}"
        );
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn the_password_is_read_and_never_printed() {
        let dir = std::env::temp_dir().join(format!("gw-mesh-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pw"), "s3cret-value\n").unwrap();
        let raw: RawMesh =
            toml::from_str(&format!("{OK}username = \"gw\"\npassword_file = \"pw\"\n")).unwrap();
        let s = validate(raw, &dir, true).unwrap();
        assert_eq!(s.user, Some(("gw".into(), "s3cret-value".into())));
        assert!(!format!("{s:?}").contains("s3cret"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
