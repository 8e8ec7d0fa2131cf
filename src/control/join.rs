//! `gatewire node join <TOKEN>`: enrolment of a node with a join token
//! (docs/control.md, "Node side").
//!
//! Decodes the token, generates the node's key, `POST`s
//! `{"token", "public_key", "name"?}` to `https://<api>/v1/join` over TLS that
//! accepts only the certificate the token pins, and writes the node config
//! from the hub's answer: the private key in a 0600 file next to it, the hub
//! with `control` set to the hub's node services API, and a commented
//! `[[service]]` for each name the token granted.

use crate::config::NodeConfig;
use crate::control::token::JoinToken;
use crate::keys::{PrivateKey, PublicKey};
use crate::proxy::names::{DomainName, Label};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use serde::Deserialize;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where `gatewire node join` writes the config by default.
pub const DEFAULT_CONFIG: &str = "/etc/gatewire/node.toml";
/// The key file's name next to the config, by default.
pub const DEFAULT_KEY_NAME: &str = "node.key";
const TIMEOUT: Duration = Duration::from_secs(30);
const MAX_ANSWER: usize = 256 * 1024;

/// Arguments of `gatewire node join`.
#[derive(clap::Args)]
pub struct JoinArgs {
    /// The join token (`gwj1.…`), or `-` to read it from stdin.
    pub token: String,
    /// The node config to write.
    #[arg(short, long, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Where to write the node's private key (default: node.key next to the config).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// The node's name on the hub (shown by `gatewire show` and the API).
    #[arg(long)]
    pub name: Option<String>,
    /// The node's TUN interface (default gwn0); give each node process on
    /// one machine its own, e.g. when joining a second hub.
    #[arg(long)]
    pub interface: Option<String>,
    /// Start the node with the written config once joined.
    #[arg(long)]
    pub run: bool,
    /// Overwrite an existing config and key file.
    #[arg(long)]
    pub force: bool,
}

/// Why a join failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("the token: {0}")]
    Token(#[from] crate::control::token::TokenError),
    #[error("{0}")]
    Local(String),
    #[error("cannot reach the hub's API at {api}: {message}")]
    Connect { api: String, message: String },
    /// The request went out; whether the hub took it is not known.
    #[error("no answer from the hub's API at {api}: {message}")]
    Lost { api: String, message: String },
    #[error("the hub refused the join ({status}{}): {message}", reason(*status))]
    Refused { status: u16, message: String },
    #[error("the hub's answer: {0}")]
    Answer(String),
}

/// The hub's answer to `POST /v1/join` (`Joined` in docs/control.md).
#[derive(Debug, Clone, Deserialize)]
pub struct Joined {
    pub hub_public_key: String,
    pub wg_endpoint: String,
    /// Where the hub takes tunnels over TLS, when not the endpoint's host on
    /// port 443.
    #[serde(default)]
    pub tls_endpoint: Option<String>,
    pub addresses: Vec<String>,
    pub allowed_ips: Vec<String>,
    #[serde(default)]
    pub node_api: Option<String>,
    #[serde(default)]
    pub names: Vec<String>,
    /// The hub's own overlay addresses (see [`crate::config::NodeHub`]).
    #[serde(default)]
    pub hub_addresses: Vec<String>,
}

/// A granted name: a label or a custom domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Granted {
    Name(Label),
    Fqdn(DomainName),
}

/// [`Joined`], checked.
#[derive(Debug, Clone)]
pub struct Enrolment {
    pub hub_public_key: PublicKey,
    pub wg_endpoint: String,
    /// `tls_endpoint` of the `[[hub]]`, when the hub named one.
    pub tls_endpoint: Option<String>,
    /// The node's addresses, each with the prefix of the hub network that
    /// holds it, so the kernel routes the overlay into the tunnel.
    pub addresses: Vec<IpNet>,
    pub allowed_ips: Vec<IpNet>,
    /// `None` when the hub gave none, or one outside `allowed_ips`.
    pub node_api: Option<SocketAddr>,
    pub names: Vec<Granted>,
    /// The hub's overlay addresses, those inside `allowed_ips`.
    pub hub_addresses: Vec<std::net::IpAddr>,
    /// Problems that did not stop the join (printed).
    pub warnings: Vec<String>,
}

fn endpoint_ok(ep: &str) -> bool {
    ep.rsplit_once(':').is_some_and(|(h, p)| {
        !h.is_empty()
            && p.parse::<u16>().is_ok_and(|p| p > 0)
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
    })
}

/// Checks the hub's answer. Everything in it ends up in a config file, so
/// nothing is taken unchecked.
pub fn check(j: &Joined) -> Result<Enrolment, String> {
    let hub_public_key =
        PublicKey::from_base64(&j.hub_public_key).map_err(|e| format!("hub_public_key: {e}"))?;
    let wg_endpoint = j.wg_endpoint.trim().to_string();
    if !endpoint_ok(&wg_endpoint) {
        return Err(format!("wg_endpoint `{wg_endpoint}`: expected host:port"));
    }
    let tls_endpoint = j.tls_endpoint.as_deref().map(str::trim).map(str::to_string);
    if let Some(t) = tls_endpoint.as_deref().filter(|t| !endpoint_ok(t)) {
        return Err(format!("tls_endpoint `{t}`: expected host:port"));
    }
    let allowed_ips = j
        .allowed_ips
        .iter()
        .map(|s| {
            s.parse::<IpNet>()
                .map(|n| n.trunc())
                .map_err(|_| format!("allowed_ips: `{s}` is not a prefix"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if allowed_ips.is_empty() {
        return Err("allowed_ips: empty".into());
    }
    let mut warnings = Vec::new();
    let mut addresses = Vec::new();
    for s in &j.addresses {
        let n: IpNet = s
            .parse()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
            .map_err(|_| format!("addresses: `{s}` is not an address/prefix"))?;
        let widest = allowed_ips
            .iter()
            .filter(|a| a.contains(&n.addr()))
            .map(|a| a.prefix_len())
            .min();
        let n = match widest {
            // A host prefix routes nothing: take the hub network's.
            Some(pl) if n.prefix_len() == n.max_prefix_len() => {
                IpNet::new(n.addr(), pl).unwrap_or(n)
            }
            Some(_) => n,
            None => {
                warnings.push(format!(
                    "address {n} lies outside the hub's networks ({}); only those are routed \
                     into the tunnel",
                    j.allowed_ips.join(", ")
                ));
                n
            }
        };
        addresses.push(n);
    }
    if addresses.is_empty() {
        return Err("addresses: empty".into());
    }
    let node_api = match j.node_api.as_deref() {
        None => {
            warnings.push(
                "the hub gave no node_api: services cannot be declared (no `control`)".into(),
            );
            None
        }
        Some(s) => {
            let a: SocketAddr = s
                .parse()
                .map_err(|_| format!("node_api `{s}`: expected ip:port"))?;
            if allowed_ips.iter().any(|n| n.contains(&a.ip())) && a.port() > 0 {
                Some(a)
            } else {
                warnings.push(format!(
                    "node_api {a} is outside the hub's networks: left out (no `control`)"
                ));
                None
            }
        }
    };
    let mut names = Vec::new();
    for n in &j.names {
        if let Ok(l) = Label::parse(n) {
            names.push(Granted::Name(l));
        } else if let Ok(d) = DomainName::parse(n) {
            names.push(Granted::Fqdn(d));
        } else {
            warnings.push(format!("granted name {n:?} is not a host name: left out"));
        }
    }
    let mut hub_addresses = Vec::new();
    for s in &j.hub_addresses {
        match s.parse::<std::net::IpAddr>() {
            Ok(a) if allowed_ips.iter().any(|n| n.contains(&a)) => hub_addresses.push(a),
            _ => warnings.push(format!(
                "hub address {s:?} is not an address in the hub's networks: left out"
            )),
        }
    }
    Ok(Enrolment {
        hub_public_key,
        wg_endpoint,
        tls_endpoint,
        addresses,
        allowed_ips,
        node_api,
        names,
        hub_addresses,
        warnings,
    })
}

/// A TOML string literal.
fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn list(v: &[IpNet]) -> String {
    let items: Vec<String> = v.iter().map(|n| q(&n.to_string())).collect();
    format!("[{}]", items.join(", "))
}

/// The node config for `e`. `key_file` is written as given (relative paths
/// are relative to the config file); `hub_name` names the hub.
pub fn render_config(
    e: &Enrolment,
    key_file: &str,
    hub_name: &str,
    token_id: &str,
    interface: Option<&str>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Written by `gatewire node join` (token {token_id}).");
    let _ = writeln!(s, "# Reference: docs/config.md.");
    let _ = writeln!(s);
    let _ = writeln!(s, "[node]");
    let _ = writeln!(s, "private_key_file = {}", q(key_file));
    if let Some(i) = interface {
        let _ = writeln!(s, "interface = {}", q(i));
    }
    let _ = writeln!(s, "addresses = {}", list(&e.addresses));
    let _ = writeln!(s);
    let _ = writeln!(s, "[[hub]]");
    let _ = writeln!(s, "name = {}", q(hub_name));
    let _ = writeln!(s, "public_key = {}", q(&e.hub_public_key.to_base64()));
    let _ = writeln!(s, "endpoint = {}", q(&e.wg_endpoint));
    if let Some(t) = &e.tls_endpoint {
        let _ = writeln!(s, "tls_endpoint = {}", q(t));
    }
    let _ = writeln!(s, "allowed_ips = {}", list(&e.allowed_ips));
    let _ = writeln!(
        s,
        "persistent_keepalive = {}",
        crate::config::DEFAULT_NODE_KEEPALIVE
    );
    if let Some(c) = e.node_api {
        let _ = writeln!(s, "control = {}", q(&c.to_string()));
    }
    if !e.hub_addresses.is_empty() {
        let items: Vec<String> = e.hub_addresses.iter().map(|a| q(&a.to_string())).collect();
        let _ = writeln!(s, "addresses = [{}]", items.join(", "));
    }
    if !e.names.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "# The hub granted this node the names below. To publish a service,"
        );
        let _ = writeln!(
            s,
            "# uncomment its entry and set `local` to where it listens on this node."
        );
        for n in &e.names {
            let _ = writeln!(s, "#");
            let _ = writeln!(s, "# [[service]]");
            match n {
                Granted::Name(l) => {
                    let _ = writeln!(s, "# name = {}", q(l.as_str()));
                }
                Granted::Fqdn(d) => {
                    let _ = writeln!(s, "# fqdn = {}", q(d.as_str()));
                }
            }
            let _ = writeln!(s, "# local = \"127.0.0.1:8080\"");
        }
    }
    s
}

/// ` Gone` for 410: the canonical reason after the code.
fn reason(status: u16) -> String {
    hyper::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .map(|r| format!(" {r}"))
        .unwrap_or_default()
}

fn local(e: impl std::fmt::Display) -> JoinError {
    JoinError::Local(e.to_string())
}

fn absolute(p: &Path) -> Result<PathBuf, JoinError> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .map_err(|e| local(format!("current directory: {e}")))
    }
}

/// `POST /v1/join` to the API the token names, pinned to its certificate.
pub async fn request(
    tok: &JoinToken,
    token: &str,
    key: &PublicKey,
    name: Option<&str>,
) -> Result<Joined, JoinError> {
    let mut body = serde_json::json!({ "token": token, "public_key": key.to_base64() });
    if let Some(n) = name {
        body["name"] = serde_json::Value::String(n.to_string());
    }
    let body = zeroize::Zeroizing::new(serde_json::to_vec(&body).unwrap_or_default());
    let connect = |m: String| JoinError::Connect {
        api: tok.api.clone(),
        message: m,
    };
    let lost = |m: String| JoinError::Lost {
        api: tok.api.clone(),
        message: m,
    };
    let sent = std::cell::Cell::new(false);
    let work = async {
        let tls = crate::control::pin::connect(&tok.api, tok.fp, TIMEOUT)
            .await
            .map_err(|e| connect(format!("{e:#}")))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tls))
                .await
                .map_err(|e| connect(format!("HTTP: {e}")))?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::builder()
            .method(hyper::Method::POST)
            .uri("/v1/join")
            .header(hyper::header::HOST, tok.api.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::copy_from_slice(&body)))
            .map_err(|e| local(format!("request: {e}")))?;
        sent.set(true);
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| lost(format!("request: {e}")))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| JoinError::Answer(e.to_string()))?
            .to_bytes();
        conn.abort();
        if status.is_success() {
            return serde_json::from_slice::<Joined>(&bytes)
                .map_err(|e| JoinError::Answer(format!("{status}: {e}")));
        }
        #[derive(Deserialize)]
        struct ErrorBody {
            error: String,
        }
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| {
                String::from_utf8_lossy(bytes.get(..200).unwrap_or(&bytes))
                    .trim()
                    .to_string()
            });
        Err(JoinError::Refused {
            status: status.as_u16(),
            message,
        })
    };
    match tokio::time::timeout(TIMEOUT * 2, work).await {
        Ok(r) => r,
        Err(_) if sent.get() => Err(lost("no answer in time".into())),
        Err(_) => Err(connect("no answer in time".into())),
    }
}

/// What a successful join wrote.
#[derive(Debug)]
pub struct Written {
    pub config: PathBuf,
    pub key_file: PathBuf,
    pub public_key: PublicKey,
    pub enrolment: Enrolment,
}

/// Checks that `dir` exists (creating it) and takes a file, before the token
/// is spent.
fn check_writable(dir: &Path) -> Result<(), JoinError> {
    std::fs::create_dir_all(dir).map_err(|e| local(format!("creating {}: {e}", dir.display())))?;
    let probe = dir.join(format!(".gatewire-join-{}", std::process::id()));
    std::fs::File::create(&probe)
        .map_err(|e| local(format!("cannot write in {}: {e}", dir.display())))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Joins the hub that `args.token` names and writes the config.
pub async fn join(args: &JoinArgs, token: &str) -> Result<Written, JoinError> {
    let tok = JoinToken::decode(token)?;
    // Checked before the token is spent on the hub.
    if let Some(i) = &args.interface {
        if !crate::config::interface_name_ok(i) {
            return Err(local(format!(
                "--interface `{i}`: 1 to 15 characters of letters, digits, `-`, `_`, `.`"
            )));
        }
    }
    let config = absolute(&args.config)?;
    let config_dir = config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    let key_file = match &args.key_file {
        Some(k) => absolute(k)?,
        None => config_dir.join(DEFAULT_KEY_NAME),
    };
    if key_file == config {
        return Err(local("the key file and the config are the same file"));
    }
    // The key is written before the hub is asked, to a file of its own
    // (`<key file>.pending`, so that a --force join that fails leaves the
    // node's key alone), and takes the key file's place once the hub has
    // answered: a lost answer does not lose a key the hub may now know. A
    // pending key left by a join that did not finish is used again; the hub
    // answers a token's own key again.
    let pending = {
        let mut p = key_file.clone().into_os_string();
        p.push(".pending");
        PathBuf::from(p)
    };
    let resume = pending.exists();
    for (p, what) in [(&config, "config"), (&key_file, "key file")] {
        if p.exists() && !args.force {
            return Err(local(format!(
                "{} exists; refusing to overwrite the {what} (--force to replace it)",
                p.display()
            )));
        }
    }
    check_writable(&config_dir)?;
    if let Some(d) = key_file.parent() {
        check_writable(d)?;
    }
    let key = if resume {
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(&pending)
                .map_err(|e| local(format!("reading {}: {e}", pending.display())))?,
        );
        let key = PrivateKey::from_base64(text.trim()).map_err(|e| {
            local(format!(
                "{} (left by an earlier join) does not hold a key: {e}; remove it",
                pending.display()
            ))
        })?;
        eprintln!(
            "gatewire: using the key in {} (an earlier join did not finish; remove it to start over)",
            pending.display()
        );
        key
    } else {
        let key = PrivateKey::generate();
        let mut key_text = zeroize::Zeroizing::new(key.expose_base64());
        key_text.push('\n');
        crate::control::pin::write_atomic(&pending, key_text.as_bytes(), 0o600)
            .map_err(|e| local(format!("writing {}: {e}", pending.display())))?;
        key
    };
    let public_key = key.public_key();
    let kept = |e: JoinError| match e {
        // Refused, or never asked: the hub holds nothing of this key, and a
        // key made for this join goes.
        JoinError::Refused { .. }
        | JoinError::Token(_)
        | JoinError::Local(_)
        | JoinError::Connect { .. } => {
            if !resume {
                let _ = std::fs::remove_file(&pending);
            }
            e
        }
        other => JoinError::Local(format!(
            "{other}\nthe key is kept in {}: run the same command again to finish the join",
            pending.display()
        )),
    };
    let joined = request(&tok, token.trim(), &public_key, args.name.as_deref())
        .await
        .map_err(kept)?;
    let enrolment = check(&joined).map_err(|e| kept(JoinError::Answer(e)))?;
    // Next to the config: a relative name, so the pair can move together.
    let key_ref = if key_file.parent() == Some(config_dir.as_path()) {
        key_file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        key_file.to_string_lossy().into_owned()
    };
    let hub_name = tok
        .api
        .rsplit_once(':')
        .map_or(tok.api.as_str(), |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let text = render_config(
        &enrolment,
        &key_ref,
        &hub_name,
        &tok.id,
        args.interface.as_deref(),
    );
    // A key this join replaces (--force) is set aside until the config is
    // written, and put back if it is not.
    let replaced = {
        let mut p = key_file.clone().into_os_string();
        p.push(".replaced");
        PathBuf::from(p)
    };
    let had_key = key_file.exists();
    if had_key {
        std::fs::rename(&key_file, &replaced).map_err(|e| {
            local(format!(
                "moving {} aside to {}: {e}",
                key_file.display(),
                replaced.display()
            ))
        })?;
    }
    // Undoes the moves: the new key back to pending (the same command then
    // finishes the join: the hub answers the token's own key again), the
    // replaced one back in place.
    let undo = |e: JoinError| {
        let back = std::fs::rename(&key_file, &pending);
        if had_key {
            let _ = std::fs::rename(&replaced, &key_file);
        }
        match back {
            Ok(()) => JoinError::Local(format!(
                "{e}\nthe key is kept in {}: run the same command again to finish the join",
                pending.display()
            )),
            Err(_) => e,
        }
    };
    if let Err(e) = std::fs::rename(&pending, &key_file) {
        if had_key {
            let _ = std::fs::rename(&replaced, &key_file);
        }
        return Err(local(format!(
            "moving {} to {}: {e}",
            pending.display(),
            key_file.display()
        )));
    }
    if let Err(e) = NodeConfig::parse(&config.display().to_string(), &text, &config_dir) {
        return Err(undo(JoinError::Answer(format!(
            "the config made from it does not load: {e}"
        ))));
    }
    crate::control::pin::write_atomic(&config, text.as_bytes(), 0o644)
        .map_err(|e| undo(local(format!("writing {}: {e}", config.display()))))?;
    if had_key {
        let _ = std::fs::remove_file(&replaced);
    }
    Ok(Written {
        config,
        key_file,
        public_key,
        enrolment,
    })
}

/// Reads the token argument (`-`: the first line on stdin).
pub fn token_arg(arg: &str) -> Result<zeroize::Zeroizing<String>, JoinError> {
    if arg != "-" {
        return Ok(zeroize::Zeroizing::new(arg.to_string()));
    }
    let mut s = zeroize::Zeroizing::new(String::new());
    use std::io::Read as _;
    std::io::stdin()
        .take(crate::control::token::MAX_TOKEN_LEN as u64 + 2)
        .read_to_string(&mut s)
        .map_err(|e| local(format!("reading the token on stdin: {e}")))?;
    Ok(s)
}

/// `gatewire node join`: joins, prints what was written; `Ok(Some(config))`
/// when the node should now run with that config.
pub fn main(args: &JoinArgs) -> Result<Option<PathBuf>, JoinError> {
    let token = token_arg(&args.token)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| local(format!("runtime: {e}")))?;
    let w = rt.block_on(join(args, &token))?;
    drop(rt);
    for m in &w.enrolment.warnings {
        eprintln!("gatewire: warning: {m}");
    }
    let addrs: Vec<String> = w
        .enrolment
        .addresses
        .iter()
        .map(|a| a.to_string())
        .collect();
    println!("joined: node public key {}", w.public_key);
    println!("  addresses: {}", addrs.join(", "));
    println!(
        "  hub: {} at {}",
        w.enrolment.hub_public_key, w.enrolment.wg_endpoint
    );
    if !w.enrolment.names.is_empty() {
        let names: Vec<String> = w
            .enrolment
            .names
            .iter()
            .map(|n| match n {
                Granted::Name(l) => l.to_string(),
                Granted::Fqdn(d) => d.to_string(),
            })
            .collect();
        println!("  names: {}", names.join(", "));
    }
    println!("  config: {}", w.config.display());
    println!("  key file: {}", w.key_file.display());
    if args.run {
        Ok(Some(w.config))
    } else {
        println!(
            "start it with: gatewire node --config {}",
            w.config.display()
        );
        Ok(None)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn joined() -> Joined {
        Joined {
            hub_public_key: "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=".into(),
            wg_endpoint: "203.0.113.1:51820".into(),
            tls_endpoint: None,
            addresses: vec!["100.64.1.2/32".into(), "fd77:6777:1::2/48".into()],
            allowed_ips: vec!["100.64.0.0/10".into(), "fd77:6777::/32".into()],
            node_api: Some("100.64.0.1:7001".into()),
            names: vec!["blog".into(), "shop.example.com".into()],
            hub_addresses: vec!["100.64.0.1".into(), "fd77:6777::1".into()],
        }
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "gatewire-join-{tag}-{}-{:?}",
            std::process::id(),
            crate::clock::unix_nanos()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn written_config_loads() {
        let e = check(&joined()).unwrap();
        assert!(e.warnings.is_empty(), "{:?}", e.warnings);
        // The host prefix took the hub network's; the /48 stayed.
        assert_eq!(e.addresses[0].to_string(), "100.64.1.2/10");
        assert_eq!(e.addresses[1].to_string(), "fd77:6777:1::2/48");
        let text = render_config(&e, "node.key", "hub.example.org", "0123456789abcdef", None);
        let d = tmpdir("cfg");
        let key = PrivateKey::generate();
        std::fs::write(d.join("node.key"), key.expose_base64()).unwrap();
        std::fs::write(d.join("node.toml"), &text).unwrap();
        let c = NodeConfig::load(&d.join("node.toml")).unwrap();
        assert_eq!(c.private_key, key);
        assert_eq!(c.addresses, e.addresses);
        assert_eq!(c.hubs.len(), 1);
        let h = &c.hubs[0];
        assert_eq!(h.name.as_deref(), Some("hub.example.org"));
        assert_eq!(h.public_key, e.hub_public_key);
        assert_eq!(h.endpoint, "203.0.113.1:51820");
        assert_eq!(h.allowed_ips, e.allowed_ips);
        assert_eq!(h.control, Some("100.64.0.1:7001".parse().unwrap()));
        assert_eq!(h.addresses, e.hub_addresses);
        assert_eq!(h.addresses.len(), 2);
        assert_eq!(
            h.persistent_keepalive,
            crate::config::DEFAULT_NODE_KEEPALIVE
        );
        assert!(c.services.is_empty());
        assert_eq!(h.tls_endpoint, "203.0.113.1:443");
        assert!(!text.contains("tls_endpoint"), "{text}");
        assert!(text.contains("# name = \"blog\""), "{text}");
        assert!(text.contains("# fqdn = \"shop.example.com\""), "{text}");
        // Uncommenting an example gives a valid service.
        let text2 = text
            .replacen("# [[service]]", "[[service]]", 1)
            .replacen("# name = \"blog\"", "name = \"blog\"", 1)
            .replacen("# local = ", "local = ", 1);
        std::fs::write(d.join("node.toml"), &text2).unwrap();
        let c = NodeConfig::load(&d.join("node.toml")).unwrap();
        assert_eq!(c.services.len(), 1);
        assert_eq!(c.services[0].host.to_string(), "blog");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_tls_endpoint_from_the_hub_goes_into_the_config() {
        let mut j = joined();
        j.tls_endpoint = Some("gw.example.org:8443".into());
        let e = check(&j).unwrap();
        let text = render_config(&e, "node.key", "hub", "0123456789abcdef", None);
        assert!(
            text.contains("tls_endpoint = \"gw.example.org:8443\""),
            "{text}"
        );
        let d = tmpdir("tls");
        std::fs::write(d.join("node.key"), PrivateKey::generate().expose_base64()).unwrap();
        std::fs::write(d.join("node.toml"), &text).unwrap();
        let c = NodeConfig::load(&d.join("node.toml")).unwrap();
        assert_eq!(c.hubs[0].tls_endpoint, "gw.example.org:8443");
        let _ = std::fs::remove_dir_all(&d);
        j.tls_endpoint = Some("x\"y:1".into());
        assert!(check(&j).unwrap_err().contains("tls_endpoint"));
        j.tls_endpoint = Some("gw.example.org".into());
        assert!(check(&j).unwrap_err().contains("tls_endpoint"));
    }

    #[test]
    fn answers_are_checked() {
        let bad = |f: &dyn Fn(&mut Joined)| {
            let mut j = joined();
            f(&mut j);
            check(&j)
        };
        assert!(bad(&|j| j.hub_public_key = "x".into())
            .unwrap_err()
            .contains("hub_public_key"));
        assert!(bad(&|j| j.wg_endpoint = "h\"x:1".into())
            .unwrap_err()
            .contains("wg_endpoint"));
        assert!(bad(&|j| j.wg_endpoint = "h:0".into()).is_err());
        assert!(bad(&|j| j.addresses = vec!["nope".into()])
            .unwrap_err()
            .contains("addresses"));
        assert!(bad(&|j| j.addresses.clear()).is_err());
        assert!(bad(&|j| j.allowed_ips = vec!["1.2.3.4/40".into()]).is_err());
        assert!(bad(&|j| j.node_api = Some("x".into()))
            .unwrap_err()
            .contains("node_api"));
        // Survivable problems become warnings.
        let e = bad(&|j| j.node_api = Some("10.0.0.1:7001".into())).unwrap();
        assert!(e.node_api.is_none() && e.warnings.len() == 1);
        let e = bad(&|j| j.names = vec!["blog".into(), "a\"\n[x]".into()]).unwrap();
        assert_eq!(e.names, vec![Granted::Name(Label::parse("blog").unwrap())]);
        assert_eq!(e.warnings.len(), 1);
        let e = bad(&|j| j.node_api = None).unwrap();
        assert!(e.node_api.is_none());
        let text = render_config(&e, "/var/lib/k", "h", "0123456789abcdef", Some("gwn1"));
        assert!(!text.contains("control"), "{text}");
        assert!(text.contains("\ninterface = \"gwn1\"\n"), "{text}");
    }

    /// Serves one join request on `tls` with a fixed answer; the public key
    /// it asked for.
    async fn answer_join(tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> String {
        use hyper::service::service_fn;
        let (tx, rx) = std::sync::mpsc::channel();
        let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let tx = tx.clone();
            async move {
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                tx.send(v["public_key"].as_str().unwrap().to_string())
                    .unwrap();
                let answer = serde_json::json!({
                    "hub_public_key": "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=",
                    "wg_endpoint": "203.0.113.1:51820",
                    "addresses": ["100.64.1.2/10"],
                    "allowed_ips": ["100.64.0.0/10"],
                });
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                    answer.to_string(),
                ))))
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(tls), svc)
            .await;
        rx.recv().unwrap()
    }

    /// The hub takes the join but its answer is lost: the key stays
    /// pending, and the same command again sends the same key and finishes.
    #[tokio::test]
    async fn a_lost_answer_keeps_the_key_for_the_next_try() {
        let d = tmpdir("lost");
        let cert = crate::control::pin::ApiCert::load_or_create(&d.join("state"), &[]).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = l.local_addr().unwrap().to_string();
        let tok = JoinToken::generate(api.clone(), cert.fingerprint());
        let token = tok.encode();
        let server_cfg = cert.server_config();
        let server = tokio::spawn(async move {
            let mut keys = Vec::new();
            for round in 0..2 {
                let (s, _) = l.accept().await.unwrap();
                let mut tls = tokio_rustls::TlsAcceptor::from(server_cfg.clone())
                    .accept(s)
                    .await
                    .unwrap();
                if round == 0 {
                    // Read the request, then go away without a word.
                    let mut buf = vec![0u8; 4096];
                    let n = tokio::io::AsyncReadExt::read(&mut tls, &mut buf)
                        .await
                        .unwrap();
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let v: serde_json::Value =
                        serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
                    keys.push(v["public_key"].as_str().unwrap().to_string());
                    drop(tls);
                    continue;
                }
                keys.push(answer_join(tls).await);
            }
            keys
        });
        let args = JoinArgs {
            token: token.clone(),
            config: d.join("etc/node.toml"),
            key_file: None,
            name: None,
            interface: None,
            run: false,
            force: false,
        };
        let e = join(&args, &token).await.unwrap_err().to_string();
        assert!(
            e.contains("no answer") && e.contains("node.key.pending") && e.contains("again"),
            "{e}"
        );
        assert!(d.join("etc/node.key.pending").exists());
        assert!(!d.join("etc/node.key").exists());
        let w = join(&args, &token).await.unwrap();
        let keys = server.await.unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0], keys[1], "the second try sends the same key");
        assert_eq!(w.public_key.to_base64(), keys[0]);
        assert!(!d.join("etc/node.key.pending").exists());
        let c = NodeConfig::load(&w.config).unwrap();
        assert_eq!(c.private_key.public_key(), w.public_key);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// The hub answers but the config cannot be written: the new key goes
    /// back to pending, the key it was to replace (--force) back in place,
    /// and the same command finishes the join once the config can be
    /// written.
    #[tokio::test]
    async fn a_config_not_written_keeps_both_keys() {
        let d = tmpdir("unwritten");
        let cert = crate::control::pin::ApiCert::load_or_create(&d.join("state"), &[]).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = l.local_addr().unwrap().to_string();
        let token = JoinToken::generate(api, cert.fingerprint()).encode();
        let server_cfg = cert.server_config();
        let server = tokio::spawn(async move {
            let mut keys = Vec::new();
            for _ in 0..2 {
                let (s, _) = l.accept().await.unwrap();
                let tls = tokio_rustls::TlsAcceptor::from(server_cfg.clone())
                    .accept(s)
                    .await
                    .unwrap();
                keys.push(answer_join(tls).await);
            }
            keys
        });
        // The config's path is a directory with something in it: the
        // config cannot take its place.
        std::fs::create_dir_all(d.join("etc/node.toml")).unwrap();
        std::fs::write(d.join("etc/node.toml/x"), "x").unwrap();
        let old = PrivateKey::generate();
        std::fs::write(d.join("etc/node.key"), format!("{}\n", old.expose_base64())).unwrap();
        let args = JoinArgs {
            token: token.clone(),
            config: d.join("etc/node.toml"),
            key_file: None,
            name: None,
            interface: None,
            run: false,
            force: true,
        };
        let e = join(&args, &token).await.unwrap_err().to_string();
        assert!(
            e.contains("writing") && e.contains("node.key.pending") && e.contains("again"),
            "{e}"
        );
        assert!(d.join("etc/node.key.pending").exists());
        assert!(!d.join("etc/node.key.replaced").exists());
        let kept = std::fs::read_to_string(d.join("etc/node.key")).unwrap();
        assert_eq!(
            kept.trim(),
            old.expose_base64().as_str(),
            "the old key is back"
        );
        std::fs::remove_dir_all(d.join("etc/node.toml")).unwrap();
        let w = join(&args, &token).await.unwrap();
        let keys = server.await.unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0], keys[1], "the second try sends the same key");
        assert_eq!(w.public_key.to_base64(), keys[0]);
        assert!(!d.join("etc/node.key.pending").exists());
        assert!(!d.join("etc/node.key.replaced").exists());
        let c = NodeConfig::load(&w.config).unwrap();
        assert_eq!(c.private_key.public_key(), w.public_key);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn join_against_a_fake_hub() {
        use hyper::service::service_fn;
        let d = tmpdir("hub");
        let cert = crate::control::pin::ApiCert::load_or_create(&d.join("state"), &[]).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = l.local_addr().unwrap().to_string();
        let tok = JoinToken::generate(api.clone(), cert.fingerprint());
        let token = tok.encode();
        let want_hash = tok.secret_hash();
        let server_cfg = cert.server_config();
        let server = tokio::spawn(async move {
            for round in 0..2 {
                let (s, _) = l.accept().await.unwrap();
                let tls = tokio_rustls::TlsAcceptor::from(server_cfg.clone())
                    .accept(s)
                    .await
                    .unwrap();
                let svc = service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| async move {
                        assert_eq!(req.method(), hyper::Method::POST);
                        assert_eq!(req.uri().path(), "/v1/join");
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        let t = JoinToken::decode(v["token"].as_str().unwrap()).unwrap();
                        assert_eq!(t.secret_hash(), want_hash);
                        assert!(PublicKey::from_base64(v["public_key"].as_str().unwrap()).is_ok());
                        assert_eq!(v["name"], "n1");
                        let (code, answer) = if round == 0 {
                            (
                                200,
                                serde_json::json!({
                                    "hub_public_key": "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=",
                                    "wg_endpoint": "203.0.113.1:51820",
                                    "addresses": ["100.64.1.2/10"],
                                    "allowed_ips": ["100.64.0.0/10"],
                                    "node_api": "100.64.0.1:7001",
                                    "names": ["blog"],
                                }),
                            )
                        } else {
                            (410, serde_json::json!({"error": "token already used"}))
                        };
                        let mut r =
                            hyper::Response::new(Full::new(Bytes::from(answer.to_string())));
                        *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
                        Ok::<_, std::convert::Infallible>(r)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            }
        });
        let args = JoinArgs {
            token: token.clone(),
            config: d.join("etc/node.toml"),
            key_file: None,
            name: Some("n1".into()),
            interface: None,
            run: false,
            force: false,
        };
        let w = join(&args, &token).await.unwrap();
        let c = NodeConfig::load(&w.config).unwrap();
        assert_eq!(c.private_key.public_key(), w.public_key);
        assert_eq!(c.hubs[0].name.as_deref(), Some("127.0.0.1"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&w.key_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(w.key_file, d.join("etc/node.key"));
        // Again without --force: refused before the hub is asked.
        let e = join(&args, &token).await.unwrap_err().to_string();
        assert!(e.contains("--force"), "{e}");
        // With --force the hub is asked, and its refusal is reported.
        let args = JoinArgs {
            force: true,
            ..args
        };
        let before = std::fs::read(&w.key_file).unwrap();
        let e = join(&args, &token).await.unwrap_err();
        assert!(matches!(e, JoinError::Refused { status: 410, .. }), "{e}");
        // The node's key is untouched, no pending key left.
        assert_eq!(std::fs::read(&w.key_file).unwrap(), before);
        assert!(!d.join("etc/node.key.pending").exists());
        assert_eq!(
            e.to_string(),
            "the hub refused the join (410 Gone): token already used"
        );
        server.await.unwrap();
        // A token pinning another certificate: the TLS handshake fails.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api2 = l.local_addr().unwrap().to_string();
        let server_cfg = cert.server_config();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let _ = tokio_rustls::TlsAcceptor::from(server_cfg).accept(s).await;
        });
        let other = JoinToken::generate(api2, [9; 32]).encode();
        let args = JoinArgs {
            token: other.clone(),
            config: d.join("etc2/node.toml"),
            ..args
        };
        let e = join(&args, &other).await.unwrap_err().to_string();
        assert!(e.contains("cannot reach") && e.contains("pinned"), "{e}");
        assert!(!d.join("etc2/node.key").exists());
        assert!(!d.join("etc2/node.key.pending").exists());
        let _ = std::fs::remove_dir_all(&d);
    }
}
