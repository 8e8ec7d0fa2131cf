//! Hub and node configuration: strict TOML (an unknown key is an error naming it
//! and its line) parsed into raw structs, then validated into settings.

use crate::keys::{PresharedKey, PrivateKey, PublicKey};
use ipnet::IpNet;
use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};

/// A configuration error, with the file it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// A base64 private key, or a file holding one. Never printed.
#[derive(Clone, Default)]
struct KeySource {
    private_key: Option<String>,
    private_key_file: Option<PathBuf>,
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySource")
            .field(
                "private_key",
                &self.private_key.as_ref().map(|_| "<redacted>"),
            )
            .field("private_key_file", &self.private_key_file)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHubFile {
    hub: RawHub,
    #[serde(default)]
    peer: Vec<RawPeer>,
    // Reverse proxy (src/proxy/settings.rs validates these).
    proxy: Option<crate::proxy::settings::RawProxy>,
    #[serde(default)]
    route: Vec<crate::proxy::settings::RawRoute>,
    #[serde(default)]
    tcp: Vec<crate::proxy::settings::RawTcp>,
    #[serde(default)]
    udp: Vec<crate::proxy::settings::RawUdp>,
    // The supervised Yggdrasil daemon (src/ygg/settings.rs validates it).
    yggdrasil: Option<crate::ygg::settings::RawYggdrasil>,
    // IPv4/IPv6 translation (src/xlat/settings.rs validates it).
    xlat: Option<crate::xlat::settings::RawXlat>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHub {
    private_key: Option<String>,
    private_key_file: Option<PathBuf>,
    interface: Option<String>,
    listen_port: Option<u16>,
    addresses: Vec<String>,
    mtu: Option<u16>,
    keepalive: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: Option<String>,
    public_key: String,
    allowed_ips: Vec<String>,
    preshared_key: Option<String>,
    endpoint: Option<String>,
    persistent_keepalive: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNodeFile {
    node: RawNode,
    #[serde(default)]
    hub: Vec<RawNodeHub>,
    yggdrasil: Option<crate::ygg::settings::RawYggdrasil>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    private_key: Option<String>,
    private_key_file: Option<PathBuf>,
    interface: Option<String>,
    listen_port: Option<u16>,
    addresses: Vec<String>,
    mtu: Option<u16>,
    dead_after: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNodeHub {
    name: Option<String>,
    public_key: String,
    endpoint: String,
    allowed_ips: Vec<String>,
    preshared_key: Option<String>,
    persistent_keepalive: Option<u16>,
}

/// A peer of the hub.
#[derive(Debug, Clone)]
pub struct HubPeer {
    pub name: Option<String>,
    pub public_key: PublicKey,
    pub allowed_ips: Vec<IpNet>,
    pub preshared_key: Option<PresharedKey>,
    pub endpoint: Option<std::net::SocketAddr>,
    pub persistent_keepalive: Option<u16>,
}

/// Validated hub settings.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub private_key: PrivateKey,
    pub interface: String,
    pub listen_port: u16,
    pub addresses: Vec<IpNet>,
    pub mtu: u16,
    pub keepalive: u16,
    pub peers: Vec<HubPeer>,
    /// The reverse proxy, if the file has a `[proxy]` section or any route/forward.
    pub proxy: Option<crate::proxy::settings::ProxySettings>,
    /// The supervised Yggdrasil daemon, if the file has `[yggdrasil]`.
    pub yggdrasil: Option<crate::ygg::settings::YggSettings>,
    /// SIIT / NAT64 on the TUN, if the file has an `[xlat]` section.
    pub xlat: Option<crate::xlat::settings::XlatSettings>,
}

/// A hub as a node sees it.
#[derive(Debug, Clone)]
pub struct NodeHub {
    pub name: Option<String>,
    pub public_key: PublicKey,
    /// `host:port`; the host may be a DNS name, re-resolved when the hub goes silent.
    pub endpoint: String,
    pub allowed_ips: Vec<IpNet>,
    pub preshared_key: Option<PresharedKey>,
    pub persistent_keepalive: u16,
}

/// Validated node settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub private_key: PrivateKey,
    pub interface: String,
    pub listen_port: u16,
    pub addresses: Vec<IpNet>,
    pub mtu: u16,
    pub dead_after: u16,
    /// Empty only with `[yggdrasil]`: then the node runs no WireGuard device.
    pub hubs: Vec<NodeHub>,
    /// The supervised Yggdrasil daemon, if the file has `[yggdrasil]`.
    pub yggdrasil: Option<crate::ygg::settings::YggSettings>,
}

pub const DEFAULT_PORT: u16 = 51820;
pub const DEFAULT_MTU: u16 = 1420;
pub const DEFAULT_HUB_KEEPALIVE: u16 = 4;
pub const DEFAULT_NODE_KEEPALIVE: u16 = 15;
pub const DEFAULT_DEAD_AFTER: u16 = 8;

struct Ctx<'a> {
    path: &'a str,
}

impl Ctx<'_> {
    fn err(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_string(),
            message: message.into(),
        }
    }

    fn private_key(
        &self,
        section: &str,
        k: &KeySource,
        base: &Path,
    ) -> Result<PrivateKey, ConfigError> {
        match (&k.private_key, &k.private_key_file) {
            (Some(_), Some(_)) => Err(self.err(format!(
                "[{section}]: set either `private_key` or `private_key_file`, not both"
            ))),
            (None, None) => Err(self.err(format!(
                "[{section}]: `private_key` or `private_key_file` is required"
            ))),
            (Some(s), None) => PrivateKey::from_base64(s)
                .map_err(|e| self.err(format!("[{section}] private_key: {e}"))),
            (None, Some(f)) => {
                let f = if f.is_relative() {
                    base.join(f)
                } else {
                    f.clone()
                };
                let s = std::fs::read_to_string(&f).map_err(|e| {
                    self.err(format!("[{section}] private_key_file {}: {e}", f.display()))
                })?;
                PrivateKey::from_base64(&s).map_err(|e| {
                    self.err(format!("[{section}] private_key_file {}: {e}", f.display()))
                })
            }
        }
    }

    fn public_key(&self, what: &str, s: &str) -> Result<PublicKey, ConfigError> {
        PublicKey::from_base64(s).map_err(|e| self.err(format!("{what} public_key `{s}`: {e}")))
    }

    fn psk(&self, what: &str, s: &Option<String>) -> Result<Option<PresharedKey>, ConfigError> {
        s.as_deref()
            .map(|s| {
                PresharedKey::from_base64(s)
                    .map_err(|e| self.err(format!("{what} preshared_key: {e}")))
            })
            .transpose()
    }

    fn nets(&self, what: &str, v: &[String], host_ok: bool) -> Result<Vec<IpNet>, ConfigError> {
        v.iter()
            .map(|s| {
                let n: IpNet = s
                    .parse()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| self.err(format!("{what}: `{s}` is not an address/prefix")))?;
                if !host_ok && n.trunc() != n {
                    return Err(self.err(format!(
                        "{what}: `{s}` has host bits set (did you mean `{}`?)",
                        n.trunc()
                    )));
                }
                Ok(n)
            })
            .collect()
    }

    fn interface(
        &self,
        section: &str,
        name: Option<String>,
        default: &str,
    ) -> Result<String, ConfigError> {
        let n = name.unwrap_or_else(|| default.to_string());
        if n.is_empty()
            || n.len() > 15
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(self.err(format!(
                "[{section}] interface `{n}`: 1 to 15 characters of letters, digits, `-`, `_`, `.`"
            )));
        }
        Ok(n)
    }

    fn mtu(&self, section: &str, m: Option<u16>) -> Result<u16, ConfigError> {
        let m = m.unwrap_or(DEFAULT_MTU);
        if !(1280..=9000).contains(&m) {
            return Err(self.err(format!("[{section}] mtu {m}: must be 1280 to 9000")));
        }
        Ok(m)
    }
}

fn read(path: &Path) -> Result<(String, String), ConfigError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: p.clone(),
        source,
    })?;
    Ok((p, text))
}

fn parse_err(path: &str, e: toml::de::Error) -> ConfigError {
    ConfigError::Parse {
        path: path.to_string(),
        message: e.to_string().trim_end().to_string(),
    }
}

fn check_unique_keys<'a>(
    ctx: &Ctx,
    keys: impl Iterator<Item = &'a PublicKey>,
) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    for k in keys {
        if !seen.insert(*k) {
            return Err(ctx.err(format!("public key {k} is listed twice")));
        }
    }
    Ok(())
}

impl HubConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (p, text) = read(path)?;
        Self::parse(&p, &text, path.parent().unwrap_or(Path::new(".")))
    }

    /// Parses and validates `text`; `path` names it in errors, `base` resolves
    /// relative key files.
    pub fn parse(path: &str, text: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawHubFile = toml::from_str(text).map_err(|e| parse_err(path, e))?;
        let ctx = Ctx { path };
        let private_key = ctx.private_key(
            "hub",
            &KeySource {
                private_key: raw.hub.private_key.clone(),
                private_key_file: raw.hub.private_key_file.clone(),
            },
            base,
        )?;
        let addresses = ctx.nets("[hub] addresses", &raw.hub.addresses, true)?;
        if addresses.is_empty() {
            return Err(ctx.err("[hub] addresses: at least one overlay address is required"));
        }
        let mut peers = Vec::new();
        for (i, rp) in raw.peer.iter().enumerate() {
            let what = format!(
                "[[peer]] #{} ({})",
                i + 1,
                rp.name.as_deref().unwrap_or("unnamed")
            );
            let public_key = ctx.public_key(&what, &rp.public_key)?;
            let allowed_ips = ctx.nets(&format!("{what} allowed_ips"), &rp.allowed_ips, false)?;
            let endpoint = rp
                .endpoint
                .as_deref()
                .map(|e| {
                    e.parse()
                        .map_err(|_| ctx.err(format!("{what} endpoint `{e}`: expected ip:port")))
                })
                .transpose()?;
            peers.push(HubPeer {
                name: rp.name.clone(),
                public_key,
                allowed_ips,
                preshared_key: ctx.psk(&what, &rp.preshared_key)?,
                endpoint,
                persistent_keepalive: rp.persistent_keepalive,
            });
        }
        check_unique_keys(&ctx, peers.iter().map(|p| &p.public_key))?;
        let own = private_key.public_key();
        if peers.iter().any(|p| p.public_key == own) {
            return Err(ctx.err("a [[peer]] has the hub's own public key"));
        }
        let proxy = crate::proxy::settings::validate(
            raw.proxy, raw.route, raw.tcp, raw.udp, &addresses, base,
        )
        .map_err(|m| ctx.err(m))?;
        let yggdrasil = raw
            .yggdrasil
            .map(|y| crate::ygg::settings::validate(y, base))
            .transpose()
            .map_err(|m| ctx.err(m))?;
        let mtu = ctx.mtu("hub", raw.hub.mtu)?;
        let xlat = raw
            .xlat
            .map(|x| crate::xlat::settings::validate(x, &addresses, mtu))
            .transpose()
            .map_err(|m| ctx.err(m))?;
        Ok(HubConfig {
            interface: ctx.interface("hub", raw.hub.interface, "gw0")?,
            listen_port: raw.hub.listen_port.unwrap_or(DEFAULT_PORT),
            mtu,
            keepalive: raw.hub.keepalive.unwrap_or(DEFAULT_HUB_KEEPALIVE),
            private_key,
            addresses,
            peers,
            proxy,
            yggdrasil,
            xlat,
        })
    }
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (p, text) = read(path)?;
        Self::parse(&p, &text, path.parent().unwrap_or(Path::new(".")))
    }

    pub fn parse(path: &str, text: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawNodeFile = toml::from_str(text).map_err(|e| parse_err(path, e))?;
        let ctx = Ctx { path };
        let private_key = ctx.private_key(
            "node",
            &KeySource {
                private_key: raw.node.private_key.clone(),
                private_key_file: raw.node.private_key_file.clone(),
            },
            base,
        )?;
        let addresses = ctx.nets("[node] addresses", &raw.node.addresses, true)?;
        if raw.hub.is_empty() && raw.yggdrasil.is_none() {
            return Err(ctx.err(
                "at least one [[hub]] is required (or a [yggdrasil] section, for a node reachable only over Yggdrasil)",
            ));
        }
        let mut hubs = Vec::new();
        for (i, rh) in raw.hub.iter().enumerate() {
            let what = format!(
                "[[hub]] #{} ({})",
                i + 1,
                rh.name.as_deref().unwrap_or("unnamed")
            );
            let public_key = ctx.public_key(&what, &rh.public_key)?;
            let ep = rh.endpoint.trim();
            let port_ok = ep
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !port_ok {
                return Err(ctx.err(format!("{what} endpoint `{ep}`: expected host:port")));
            }
            hubs.push(NodeHub {
                name: rh.name.clone(),
                public_key,
                endpoint: ep.to_string(),
                allowed_ips: ctx.nets(&format!("{what} allowed_ips"), &rh.allowed_ips, false)?,
                preshared_key: ctx.psk(&what, &rh.preshared_key)?,
                persistent_keepalive: rh.persistent_keepalive.unwrap_or(DEFAULT_NODE_KEEPALIVE),
            });
        }
        check_unique_keys(&ctx, hubs.iter().map(|h| &h.public_key))?;
        let dead_after = raw.node.dead_after.unwrap_or(DEFAULT_DEAD_AFTER);
        if dead_after < 2 {
            return Err(ctx.err("[node] dead_after: at least 2 seconds"));
        }
        let yggdrasil = raw
            .yggdrasil
            .map(|y| crate::ygg::settings::validate(y, base))
            .transpose()
            .map_err(|m| ctx.err(m))?;
        Ok(NodeConfig {
            interface: ctx.interface("node", raw.node.interface, "gwn0")?,
            listen_port: raw.node.listen_port.unwrap_or(0),
            mtu: ctx.mtu("node", raw.node.mtu)?,
            dead_after,
            private_key,
            addresses,
            hubs,
            yggdrasil,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const P1: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
    const P2: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn hub(text: &str) -> Result<HubConfig, ConfigError> {
        HubConfig::parse("hub.toml", text, Path::new("."))
    }

    #[test]
    fn good_hub() {
        let c = hub(&format!(
            "[hub]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.0.1/10\", \"fd77::1/48\"]\n\
             [[peer]]\nname = \"n1\"\npublic_key = \"{P2}\"\nallowed_ips = [\"100.64.0.2/32\"]\n"
        ))
        .unwrap();
        assert_eq!(c.listen_port, DEFAULT_PORT);
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.interface, "gw0");
        assert_eq!(c.private_key.public_key().to_base64(), P1);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = hub(&format!(
            "[hub]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.0.1/10\"]\nlisten_prot = 5\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("listen_prot"), "{e}");
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = hub("[hub]\nprivate_key = \"nope\"\naddresses = [\"100.64.0.1/10\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("private_key"), "{e}");
        let e = hub(&format!(
            "[hub]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.0.1/10\"]\n\
             [[peer]]\npublic_key = \"{P2}\"\nallowed_ips = [\"100.64.0.2/24\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("host bits"), "{e}");
        let e = hub(&format!(
            "[hub]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.0.1/10\"]\n\
             [[peer]]\npublic_key = \"{P2}\"\nallowed_ips = []\n\
             [[peer]]\npublic_key = \"{P2}\"\nallowed_ips = []\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn debug_never_shows_the_key() {
        let c = hub(&format!(
            "[hub]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.0.1/10\"]\n"
        ))
        .unwrap();
        assert!(!format!("{c:?}").contains(K1));
    }

    #[test]
    fn node_needs_hub_with_port() {
        let base = format!("[node]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.0.2/10\"]\n");
        let e = NodeConfig::parse("n.toml", &base, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[[hub]]"), "{e}");
        let e = NodeConfig::parse(
            "n.toml",
            &format!("{base}[[hub]]\npublic_key = \"{P2}\"\nendpoint = \"hub.example\"\nallowed_ips = [\"100.64.0.0/10\"]\n"),
            Path::new("."),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("host:port"), "{e}");
        let c = NodeConfig::parse(
            "n.toml",
            &format!("{base}[[hub]]\npublic_key = \"{P2}\"\nendpoint = \"hub.example:51820\"\nallowed_ips = [\"100.64.0.0/10\"]\n"),
            Path::new("."),
        )
        .unwrap();
        assert_eq!(c.hubs[0].persistent_keepalive, DEFAULT_NODE_KEEPALIVE);
        assert_eq!(c.dead_after, DEFAULT_DEAD_AFTER);
    }

    const YGG_KEY: &str = "2fb6bcc83c6976e63c76f3286278c441af929b4902a0544cd6e1e401b2a5d3328988ec86fd70a116524ef24b11d0aed0ef374a69b1014ae93a82716a7fadca54";

    #[test]
    fn node_with_only_yggdrasil() {
        let text = format!(
            "[node]\nprivate_key = \"{K1}\"\naddresses = []\n\
             [yggdrasil]\nprivate_key = \"{YGG_KEY}\"\npeers = [\"tcp://203.0.113.1:12345\"]\n"
        );
        let c = NodeConfig::parse("n.toml", &text, Path::new(".")).unwrap();
        assert!(c.hubs.is_empty());
        let y = c.yggdrasil.as_ref().unwrap();
        assert_eq!(y.peers.len(), 1);
        assert!(!format!("{c:?}").contains(YGG_KEY));
    }

    #[test]
    fn yggdrasil_errors_name_the_key() {
        let base = format!("[hub]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.0.1/10\"]\n");
        let e = hub(&format!("{base}[yggdrasil]\nprivate_key = \"00zz\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[yggdrasil] private_key") && e.contains("hub.toml"),
            "{e}"
        );
        let e = hub(&format!(
            "{base}[yggdrasil]\nprivate_key = \"{YGG_KEY}\"\npeers = [\"tcp:/203.0.113.1:1\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("peers") && e.contains("tcp:/203.0.113.1:1"),
            "{e}"
        );
        let e = hub(&format!(
            "{base}[yggdrasil]\nprivate_key = \"{YGG_KEY}\"\nlisten_on = []\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("listen_on"), "{e}");
    }

    #[test]
    fn yggdrasil_backends_are_accepted_by_the_proxy() {
        let c = hub(&format!(
            "[hub]\nprivate_key = \"{K1}\"\naddresses = [\"100.64.0.1/10\"]\n\
             [proxy]\ndomains = [\"gw.example.org\"]\n\
             [[route]]\nname = \"site\"\nbackends = [\"http://[200:ecee:26f2:51e:bdd3:5b62:1b69:dc5e]:8080\"]\n\
             [[route]]\nname = \"sub\"\nbackends = [\"http://[300:ecee:26f2:51e::1]:80\"]\n\
             [yggdrasil]\nprivate_key = \"{YGG_KEY}\"\n"
        ))
        .unwrap();
        assert!(c.proxy.is_some());
        assert!(c.yggdrasil.is_some());
    }
}
