//! The hub's `[control]` section (see docs/control.md and docs/config.md).

use ipnet::IpNet;
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawControl {
    state_dir: PathBuf,
    socket: Option<PathBuf>,
    #[serde(default)]
    listen: Vec<String>,
    admin_token_file: Option<PathBuf>,
    api_endpoint: Option<String>,
    wg_endpoint: Option<String>,
    tls_endpoint: Option<String>,
    node_port: Option<u16>,
    pools: Option<Vec<String>>,
    ports: Option<String>,
    max_ports_per_node: Option<usize>,
    revalidate: Option<u64>,
    grace: Option<u64>,
}

/// The admin bearer token. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// Constant-time comparison with what a client sent: of the SHA-256
    /// digests, so that neither the time nor an early return tells the
    /// token's length.
    pub fn matches(&self, given: &str) -> bool {
        use crate::control::pin::sha256;
        crate::control::state::ct_eq(&sha256(self.0.as_bytes()), &sha256(given.as_bytes()))
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Validated `[control]`.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub listen: Vec<SocketAddr>,
    pub admin_token: Option<AdminToken>,
    pub api_endpoint: Option<String>,
    pub wg_endpoint: Option<String>,
    /// host:port where joined nodes reach the hub's tunnels over TLS, when
    /// not the `wg_endpoint` host on port 443 (the nodes' default).
    pub tls_endpoint: Option<String>,
    pub node_port: u16,
    pub pools: Vec<IpNet>,
    pub ports: RangeInclusive<u16>,
    /// Most of `ports` one node holds with its `tcp` and `udp` services.
    pub max_ports_per_node: usize,
    pub revalidate: Duration,
    pub grace: u64,
}

pub const DEFAULT_NODE_PORT: u16 = 7001;

/// Default of `[control] max_ports_per_node`: enough for a node's few
/// services, so that one node cannot take the whole `ports` range.
pub const DEFAULT_MAX_PORTS_PER_NODE: usize = 16;

/// `/run/gatewire/<interface>.ctl.sock`.
pub fn default_socket(interface: &str) -> PathBuf {
    Path::new("/run/gatewire").join(format!("{interface}.ctl.sock"))
}

fn host_port(what: &str, s: &str) -> Result<String, String> {
    let ok = s
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
    if !ok || s.contains(char::is_whitespace) {
        return Err(format!("[control] {what} `{s}`: expected host:port"));
    }
    Ok(s.to_string())
}

pub fn validate(
    raw: RawControl,
    interface: &str,
    hub_addrs: &[IpNet],
    base: &Path,
) -> Result<ControlSettings, String> {
    let resolve = |p: &Path| {
        if p.is_relative() {
            base.join(p)
        } else {
            p.to_path_buf()
        }
    };
    let mut listen = Vec::new();
    for s in &raw.listen {
        let a: SocketAddr = s
            .parse()
            .map_err(|_| format!("[control] listen: `{s}` is not ip:port"))?;
        listen.push(a);
    }
    let admin_token = match &raw.admin_token_file {
        None => None,
        Some(f) => {
            let f = resolve(f);
            let t = crate::keys::read_secret_file(&f)
                .map(zeroize::Zeroizing::new)
                .map_err(|e| format!("[control] admin_token_file {}: {e}", f.display()))?;
            let t = t.trim().to_string();
            if t.len() < 16 || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!(
                    "[control] admin_token_file {}: the token must be at least 16 printable characters without spaces",
                    f.display()
                ));
            }
            Some(AdminToken(t))
        }
    };
    if !listen.is_empty() && admin_token.is_none() {
        return Err(
            "[control] listen: the TCP API needs admin_token_file (it is never open without a token)"
                .into(),
        );
    }
    let pools = match &raw.pools {
        Some(v) => v
            .iter()
            .map(|s| {
                s.parse::<IpNet>()
                    .map_err(|_| format!("[control] pools: `{s}` is not a prefix"))
                    .and_then(|n| {
                        if n.trunc() == n {
                            Ok(n)
                        } else {
                            Err(format!("[control] pools: `{s}` has host bits set"))
                        }
                    })
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => hub_addrs.iter().map(|n| n.trunc()).collect(),
    };
    for p in &pools {
        if !hub_addrs.iter().any(|h| h.trunc().contains(p)) {
            return Err(format!(
                "[control] pools: `{p}` is outside the hub's overlay networks"
            ));
        }
    }
    let ports = match raw.ports.as_deref() {
        None => 20000..=20999,
        Some(s) => {
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            match (a.trim().parse::<u16>(), b.trim().parse::<u16>()) {
                (Ok(a), Ok(b)) if a > 0 && a <= b => a..=b,
                _ => {
                    return Err(format!(
                        "[control] ports `{s}`: expected a range like 20000-20999"
                    ))
                }
            }
        }
    };
    let max_ports_per_node = raw.max_ports_per_node.unwrap_or(DEFAULT_MAX_PORTS_PER_NODE);
    if !(1..=65_535).contains(&max_ports_per_node) {
        return Err("[control] max_ports_per_node: 1 to 65535".into());
    }
    let revalidate = raw.revalidate.unwrap_or(60);
    if !(1..=86_400).contains(&revalidate) {
        return Err("[control] revalidate: 1 to 86400 seconds".into());
    }
    let node_port = raw.node_port.unwrap_or(DEFAULT_NODE_PORT);
    if node_port == 0 {
        return Err("[control] node_port: must not be 0".into());
    }
    Ok(ControlSettings {
        state_dir: resolve(&raw.state_dir),
        socket: raw
            .socket
            .as_deref()
            .map(resolve)
            .unwrap_or_else(|| default_socket(interface)),
        listen,
        admin_token,
        api_endpoint: raw
            .api_endpoint
            .as_deref()
            .map(|s| host_port("api_endpoint", s))
            .transpose()?,
        wg_endpoint: raw
            .wg_endpoint
            .as_deref()
            .map(|s| host_port("wg_endpoint", s))
            .transpose()?,
        tls_endpoint: raw
            .tls_endpoint
            .as_deref()
            .map(|s| host_port("tls_endpoint", s))
            .transpose()?,
        node_port,
        pools,
        ports,
        max_ports_per_node,
        revalidate: Duration::from_secs(revalidate),
        grace: raw.grace.unwrap_or(86_400),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn admin_token_file_is_read_as_a_secret() {
        let dir = std::env::temp_dir().join(format!("gw-control-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ok"), "0123456789abcdef0123\n").unwrap();
        std::fs::write(dir.join("big"), vec![b't'; 64 * 1024 + 1]).unwrap();
        let with = |f: &str| {
            let raw: RawControl =
                toml::from_str(&format!("state_dir = \"s\"\nadmin_token_file = \"{f}\"\n"))
                    .unwrap();
            validate(raw, "wg0", &[], &dir)
        };
        let s = with("ok").unwrap();
        let t = s.admin_token.unwrap();
        assert!(t.matches("0123456789abcdef0123"));
        for wrong in [
            "",
            "0123456789abcdef012",
            "0123456789abcdef01234",
            "1123456789abcdef0123",
        ] {
            assert!(!t.matches(wrong), "{wrong:?}");
        }
        let e = with("big").err().unwrap();
        assert!(
            e.contains("admin_token_file") && e.contains("larger than"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn max_ports_per_node_defaults_to_16_and_is_bounded() {
        let with = |extra: &str| {
            let raw: RawControl = toml::from_str(&format!("state_dir = \"s\"\n{extra}")).unwrap();
            validate(raw, "wg0", &[], Path::new("/"))
        };
        assert_eq!(with("").unwrap().max_ports_per_node, 16);
        assert_eq!(
            with("max_ports_per_node = 100\n")
                .unwrap()
                .max_ports_per_node,
            100
        );
        for bad in ["0", "65536"] {
            let e = with(&format!("max_ports_per_node = {bad}\n")).unwrap_err();
            assert!(e.contains("max_ports_per_node"), "{e}");
        }
    }
}
