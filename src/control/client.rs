//! `gatewire ctl`: the admin API client (docs/control.md, "The ctl client").
//!
//! Each subcommand maps onto one request of the admin API ([`request_for`], a
//! pure function); `route update` is a read-modify-write: `GET` the route, apply
//! the given options to its spec ([`update_request`]) and `PUT` it back with the
//! version that was read, so a concurrent change answers 409 instead of being
//! overwritten. Transports: the hub's Unix socket (no token), or TLS on TCP with
//! a bearer token and the API certificate pinned by its SHA-256.
//!
//! The bearer token never appears in `Debug` output, logs or error messages.

use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// The interface whose socket is used when neither `--socket` nor `--interface`
/// is given.
pub const DEFAULT_INTERFACE: &str = "gw0";
/// Where the hub puts its control socket, `<interface>.ctl.sock`.
pub const SOCKET_DIR: &str = "/run/gatewire";
/// Largest answer body read.
pub const BODY_LIMIT: usize = 16 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Every endpoint of the admin API as `(method, path template)`, as in
/// `docs/openapi.json`. `gatewire ctl` uses all of them but `POST /v1/join`,
/// which `gatewire node join` calls.
pub const ENDPOINTS: &[(&str, &str)] = &[
    ("GET", "/v1/status"),
    ("GET", "/v1/peers"),
    ("POST", "/v1/peers"),
    ("GET", "/v1/peers/{key}"),
    ("DELETE", "/v1/peers/{key}"),
    ("GET", "/v1/routes"),
    ("POST", "/v1/routes"),
    ("GET", "/v1/routes/{id}"),
    ("PUT", "/v1/routes/{id}"),
    ("DELETE", "/v1/routes/{id}"),
    ("POST", "/v1/routes/{id}/pause"),
    ("POST", "/v1/routes/{id}/resume"),
    ("GET", "/v1/names"),
    ("PUT", "/v1/names/{name}"),
    ("DELETE", "/v1/names/{name}"),
    ("GET", "/v1/tokens"),
    ("POST", "/v1/tokens"),
    ("DELETE", "/v1/tokens/{id}"),
    ("POST", "/v1/join"),
    ("GET", "/v1/certificates"),
    ("GET", "/metrics"),
];

/// The node services API (over the tunnel), as in `docs/openapi.json`.
pub const NODE_ENDPOINTS: &[(&str, &str)] = &[("GET", "/v1/services"), ("PUT", "/v1/services")];

/// The control socket of an interface.
pub fn socket_path(interface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{interface}.ctl.sock"))
}

// ------------------------------------------------------------ command line

/// `gatewire ctl`: options and subcommand.
#[derive(Args, Debug, Clone)]
pub struct CtlArgs {
    /// The hub's control socket [default: /run/gatewire/<interface>.ctl.sock].
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        value_name = "PATH",
        conflicts_with = "url"
    )]
    pub socket: Option<PathBuf>,
    /// The hub interface whose socket is used.
    #[arg(long, global = true, help_heading = "Connection", value_name = "NAME", default_value = DEFAULT_INTERFACE)]
    pub interface: String,
    /// The API over TLS on TCP instead of the socket: https://host:port.
    #[arg(long, global = true, help_heading = "Connection", value_name = "URL")]
    pub url: Option<String>,
    /// File holding the admin bearer token (with --url; else $GATEWIRE_TOKEN).
    #[arg(long, global = true, help_heading = "Connection", value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// SHA-256 of the API certificate, hex (with --url).
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        value_name = "SHA256"
    )]
    pub pin: Option<String>,
    /// Print the raw JSON answer.
    #[arg(long, global = true, help_heading = "Output")]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: CtlCommand,
}

/// The subcommands; each maps onto one API request.
#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum CtlCommand {
    /// The hub: interface, public key, state version, counts.
    Status,
    /// List peers (config peers and joined nodes).
    Peers,
    /// One peer: show, add, remove.
    Peer {
        #[command(subcommand)]
        cmd: PeerCmd,
    },
    /// List routes.
    Routes,
    /// One route: show, create, update, pause, resume, delete.
    Route {
        #[command(subcommand)]
        cmd: Box<RouteCmd>,
    },
    /// List names and their owners.
    Names,
    /// One name: set, delete.
    Name {
        #[command(subcommand)]
        cmd: NameCmd,
    },
    /// List join tokens (never their secrets).
    Tokens,
    /// Join tokens: create, revoke.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// List the certificates the hub serves: expiry, renewal, failing ACME
    /// orders.
    Certs,
    /// Print the Prometheus metrics.
    Metrics,
}

#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum PeerCmd {
    /// Show one peer.
    Show {
        /// Public key (base64, standard or url-safe).
        key: String,
    },
    /// Add a peer; without --allowed-ips its addresses come from the pools.
    Add {
        /// Public key (base64).
        key: String,
        #[arg(long)]
        name: Option<String>,
        /// Comma-separated prefixes.
        #[arg(long, value_delimiter = ',', value_name = "PREFIXES")]
        allowed_ips: Option<Vec<String>>,
    },
    /// Remove a peer; its declared services are withdrawn.
    Remove { key: String },
}

/// Route options shared by `route create` and `route update`.
#[derive(Args, Debug, Clone, PartialEq, Default)]
pub struct RouteOpts {
    /// A name route: one label under every gateway domain.
    #[arg(long, value_name = "LABEL", conflicts_with = "fqdn")]
    pub name: Option<String>,
    /// A custom domain.
    #[arg(long, value_name = "DOMAIN")]
    pub fqdn: Option<String>,
    /// A backend (repeat, or comma-separated); given ones replace the list.
    #[arg(long = "backend", value_name = "BACKEND", value_delimiter = ',')]
    pub backends: Vec<String>,
    #[arg(long, value_parser = ["terminate", "passthrough"])]
    pub tls: Option<String>,
    /// Certificate from ACME (`--acme=false` turns it off).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub acme: Option<bool>,
    /// PROXY protocol header to passthrough backends.
    #[arg(long, value_parser = ["off", "v1", "v2"])]
    pub proxy_protocol: Option<String>,
    /// Redirect plain HTTP to https:// (`--redirect-https=false` turns it off).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub redirect_https: Option<bool>,
    #[arg(long, value_parser = ["round_robin", "least_conn"])]
    pub balance: Option<String>,
    /// HTTP version to the backends (`http2` for gRPC).
    #[arg(long, value_parser = ["http1", "http2"])]
    pub backend_protocol: Option<String>,
    /// Client networks admitted (repeat, or comma-separated; `--allow ''`
    /// clears the list); given ones replace the list.
    #[arg(long, value_name = "CIDR", value_delimiter = ',')]
    pub allow: Option<Vec<String>>,
    /// Client networks refused, as `--allow`.
    #[arg(long, value_name = "CIDR", value_delimiter = ',')]
    pub deny: Option<Vec<String>>,
    /// Requests per second per client (passthrough: connections).
    #[arg(long, value_name = "N")]
    pub rate_limit: Option<u32>,
    /// Most requests a client may send at once (default: the rate).
    #[arg(long, value_name = "N")]
    pub rate_burst: Option<u32>,
    /// The route's limit in each direction, all clients together
    /// (`"20 Mbit/s"`, `"5 MB/s"`; `--bandwidth ''` removes it).
    #[arg(long, value_name = "RATE")]
    pub bandwidth: Option<String>,
    /// The largest request body (`"10 MB"`, `"512 KiB"`; 413 beyond;
    /// `--max-body-size ''` removes it).
    #[arg(long, value_name = "SIZE")]
    pub max_body_size: Option<String>,
    /// An htpasswd file (bcrypt) on the hub: requests need one of its users
    /// (`--basic-auth-file ''` removes it).
    #[arg(long, value_name = "PATH")]
    pub basic_auth_file: Option<String>,
    /// An authentication service asked before each request,
    /// `http://<ip>:<port>/<path>` (`--forward-auth ''` removes it).
    #[arg(long, value_name = "URL")]
    pub forward_auth: Option<String>,
    /// Headers of the service's 2xx answer put on the request (repeat, or
    /// comma-separated; given ones replace the list).
    #[arg(long, value_name = "NAME", value_delimiter = ',')]
    pub forward_auth_header: Option<Vec<String>>,
    /// A RouteSpec as JSON (the `[[route]]` keys); the options above override it.
    #[arg(long, value_name = "FILE.json")]
    pub spec_file: Option<PathBuf>,
}

impl RouteOpts {
    fn changes_nothing(&self) -> bool {
        self.name.is_none()
            && self.fqdn.is_none()
            && self.backends.is_empty()
            && self.tls.is_none()
            && self.acme.is_none()
            && self.proxy_protocol.is_none()
            && self.redirect_https.is_none()
            && self.balance.is_none()
            && self.backend_protocol.is_none()
            && self.allow.is_none()
            && self.deny.is_none()
            && self.rate_limit.is_none()
            && self.rate_burst.is_none()
            && self.basic_auth_file.is_none()
            && self.bandwidth.is_none()
            && self.max_body_size.is_none()
            && self.forward_auth.is_none()
            && self.forward_auth_header.is_none()
            && self.spec_file.is_none()
    }
}

#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum RouteCmd {
    /// Show one route. ID: `name:<label>`, `fqdn:<domain>`, or a bare label or domain.
    Show { id: String },
    /// Create a route.
    Create {
        #[command(flatten)]
        opts: RouteOpts,
    },
    /// Change the given options of a route (read, modify, write back).
    Update {
        id: String,
        #[command(flatten)]
        opts: RouteOpts,
        /// Expected current version (default: the version just read).
        #[arg(long, value_name = "N")]
        version: Option<u64>,
    },
    /// Pause a route: it answers 503.
    Pause { id: String },
    /// Resume a paused route.
    Resume { id: String },
    /// Delete a route.
    Delete { id: String },
}

#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum NameCmd {
    /// Set the owners of a name.
    Set {
        name: String,
        /// An owner's public key (repeat for several).
        #[arg(
            long = "owner",
            value_name = "KEY",
            required = true,
            value_delimiter = ','
        )]
        owners: Vec<String>,
        /// Further keys may join as replicas (`--replicas=false`: no).
        #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
        replicas: Option<bool>,
        /// Expiry, Unix seconds.
        #[arg(long, value_name = "UNIX")]
        expires: Option<u64>,
        /// The bandwidth limit of the name's services (`"20 Mbit/s"`).
        #[arg(long, value_name = "RATE")]
        bandwidth: Option<String>,
    },
    /// Delete a name.
    Delete { name: String },
}

#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum TokenCmd {
    /// Create a join token; prints the token alone on stdout.
    Create {
        /// Names the joining node will own (comma-separated).
        #[arg(long, value_delimiter = ',', required = true)]
        names: Vec<String>,
        /// Lifetime: seconds, or with a unit (30m, 1h, 2d).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
        /// The names may already have an owner that allows replicas.
        #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
        replicas: Option<bool>,
        /// The bandwidth limit of the names the token creates (`"20 Mbit/s"`).
        #[arg(long, value_name = "RATE")]
        bandwidth: Option<String>,
    },
    /// Revoke a join token.
    Revoke { id: String },
}

/// `3600`, `90s`, `30m`, `1h`, `2d` as seconds.
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(format!("`{s}`: the unit is s, m, h or d")),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}`: expected seconds or a number with s, m, h or d"))?;
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("`{s}`: out of range"))
}

// ------------------------------------------------------------ errors

/// What went wrong; decides the exit code.
#[derive(Debug, Clone, PartialEq)]
pub enum CtlError {
    /// Bad arguments or local files: exit 2.
    Usage(String),
    /// A non-2xx answer: exit 2 for 4xx, 1 otherwise.
    Http { status: u16, msg: String },
    /// Connection, TLS, timeout or a malformed answer: exit 1.
    Transport(String),
}

impl fmt::Display for CtlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CtlError::Usage(m) | CtlError::Transport(m) => f.write_str(m),
            CtlError::Http { status, msg } => write!(f, "{msg} (HTTP {status})"),
        }
    }
}

impl CtlError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Usage(_) => 2,
            CtlError::Http { status, .. } if (400..500).contains(status) => 2,
            _ => 1,
        }
    }
}

/// Text from the server or a file, safe to print on a terminal.
pub(crate) fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The error for a non-2xx answer: `{"error": msg}`, else the body's first
/// line, else the status's reason.
pub fn http_error(status: u16, body: &[u8]) -> CtlError {
    let from_json = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(printable));
    let msg = from_json.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        let line = text.trim().lines().next().unwrap_or("").trim();
        if line.is_empty() {
            http::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("error")
                .to_lowercase()
        } else {
            printable(&line.chars().take(200).collect::<String>())
        }
    });
    CtlError::Http { status, msg }
}

// ------------------------------------------------------------ requests

/// One API request: method, path (segments percent-encoded), JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub method: &'static str,
    pub path: String,
    pub body: Option<Value>,
}

impl Request {
    fn new(method: &'static str, path: String, body: Option<Value>) -> Self {
        Request { method, path, body }
    }
    fn get(path: String) -> Self {
        Self::new("GET", path, None)
    }
}

/// A path segment, percent-encoded: everything but unreserved characters, `:`
/// and `@` (so base64's `/`, `+` and `=` become `%2F`, `%2B`, `%3D`).
pub fn segment(s: &str) -> String {
    let dots = s == "." || s == "..";
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if !dots && (b.is_ascii_alphanumeric() || b"-._~:@".contains(&b)) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A route id: `name:<label>`, `fqdn:<domain>` (and the `tcp:`/`udp:` ids of
/// node-declared forwards) as given; a bare argument is a domain when it has a
/// dot, a label otherwise.
pub fn route_id(arg: &str) -> String {
    if arg.contains(':') {
        arg.to_string()
    } else if arg.contains('.') {
        format!("fqdn:{arg}")
    } else {
        format!("name:{arg}")
    }
}

fn route_path(id: &str) -> String {
    format!("/v1/routes/{}", segment(&route_id(id)))
}

fn strings(v: &[String]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.clone())).collect())
}

/// The spec in `--spec-file`, a JSON object.
fn spec_file(path: &Path) -> Result<Map<String, Value>, CtlError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CtlError::Usage(format!("--spec-file {}: {e}", path.display())))?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(CtlError::Usage(format!(
            "--spec-file {}: expected a JSON object (a RouteSpec)",
            path.display()
        ))),
        Err(e) => Err(CtlError::Usage(format!(
            "--spec-file {}: {e}",
            path.display()
        ))),
    }
}

/// Applies the given route options to a spec; absent options leave it alone.
pub fn apply_route_opts(spec: &mut Map<String, Value>, o: &RouteOpts) {
    if let Some(n) = &o.name {
        spec.remove("fqdn");
        spec.insert("name".into(), n.clone().into());
    }
    if let Some(f) = &o.fqdn {
        spec.remove("name");
        spec.insert("fqdn".into(), f.clone().into());
    }
    if !o.backends.is_empty() {
        spec.insert("backends".into(), strings(&o.backends));
    }
    if let Some(t) = &o.tls {
        spec.insert("tls".into(), t.clone().into());
    }
    if let Some(a) = o.acme {
        spec.insert("acme".into(), a.into());
    }
    if let Some(p) = &o.proxy_protocol {
        let v = match p.as_str() {
            "off" => Value::Bool(false),
            other => other.into(),
        };
        spec.insert("proxy_protocol".into(), v);
    }
    if let Some(r) = o.redirect_https {
        spec.insert("redirect_https".into(), r.into());
    }
    if let Some(b) = &o.balance {
        spec.insert("balance".into(), b.clone().into());
    }
    if let Some(p) = &o.backend_protocol {
        spec.insert("backend_protocol".into(), p.clone().into());
    }
    for (key, v) in [
        ("basic_auth_file", &o.basic_auth_file),
        ("forward_auth", &o.forward_auth),
        ("bandwidth", &o.bandwidth),
        ("max_body_size", &o.max_body_size),
    ] {
        match v.as_deref() {
            Some("") => {
                spec.remove(key);
            }
            Some(p) => {
                spec.insert(key.into(), p.into());
            }
            None => {}
        }
    }
    if let Some(l) = &o.forward_auth_header {
        let names: Vec<String> = l.iter().filter(|s| !s.is_empty()).cloned().collect();
        spec.insert("forward_auth_headers".into(), strings(&names));
    }
    for (key, n) in [("rate_limit", o.rate_limit), ("rate_burst", o.rate_burst)] {
        if let Some(n) = n {
            spec.insert(key.into(), n.into());
        }
    }
    for (key, list) in [("allow", &o.allow), ("deny", &o.deny)] {
        if let Some(l) = list {
            let nets: Vec<String> = l.iter().filter(|s| !s.is_empty()).cloned().collect();
            spec.insert(key.into(), strings(&nets));
        }
    }
}

fn create_spec(o: &RouteOpts) -> Result<Value, CtlError> {
    let mut spec = match &o.spec_file {
        Some(p) => spec_file(p)?,
        None => Map::new(),
    };
    apply_route_opts(&mut spec, o);
    if !spec.contains_key("name") && !spec.contains_key("fqdn") {
        return Err(CtlError::Usage(
            "route create: give --name LABEL or --fqdn DOMAIN".into(),
        ));
    }
    if !spec.contains_key("backends") {
        return Err(CtlError::Usage(
            "route create: give at least one --backend".into(),
        ));
    }
    Ok(Value::Object(spec))
}

/// The request for a subcommand. For `route update` this is the `GET` of the
/// current route; [`update_request`] makes the `PUT` from its answer.
pub fn request_for(cmd: &CtlCommand) -> Result<Request, CtlError> {
    Ok(match cmd {
        CtlCommand::Status => Request::get("/v1/status".into()),
        CtlCommand::Peers => Request::get("/v1/peers".into()),
        CtlCommand::Peer { cmd } => match cmd {
            PeerCmd::Show { key } => Request::get(format!("/v1/peers/{}", segment(key))),
            PeerCmd::Add {
                key,
                name,
                allowed_ips,
            } => {
                let mut body = Map::new();
                body.insert("public_key".into(), key.clone().into());
                if let Some(n) = name {
                    body.insert("name".into(), n.clone().into());
                }
                if let Some(a) = allowed_ips {
                    body.insert("allowed_ips".into(), strings(a));
                }
                Request::new("POST", "/v1/peers".into(), Some(Value::Object(body)))
            }
            PeerCmd::Remove { key } => {
                Request::new("DELETE", format!("/v1/peers/{}", segment(key)), None)
            }
        },
        CtlCommand::Routes => Request::get("/v1/routes".into()),
        CtlCommand::Route { cmd } => match cmd.as_ref() {
            RouteCmd::Show { id } => Request::get(route_path(id)),
            RouteCmd::Create { opts } => {
                Request::new("POST", "/v1/routes".into(), Some(create_spec(opts)?))
            }
            RouteCmd::Update { id, opts, .. } => {
                if opts.changes_nothing() {
                    return Err(CtlError::Usage(
                        "route update: no option given, nothing to change".into(),
                    ));
                }
                Request::get(route_path(id))
            }
            RouteCmd::Pause { id } => Request::new("POST", route_path(id) + "/pause", None),
            RouteCmd::Resume { id } => Request::new("POST", route_path(id) + "/resume", None),
            RouteCmd::Delete { id } => Request::new("DELETE", route_path(id), None),
        },
        CtlCommand::Names => Request::get("/v1/names".into()),
        CtlCommand::Name { cmd } => match cmd {
            NameCmd::Set {
                name,
                owners,
                replicas,
                expires,
                bandwidth,
            } => {
                let mut body = Map::new();
                body.insert("owners".into(), strings(owners));
                if let Some(b) = bandwidth {
                    body.insert("bandwidth".into(), b.clone().into());
                }
                if let Some(r) = replicas {
                    body.insert("replicas".into(), (*r).into());
                }
                if let Some(e) = expires {
                    body.insert("expires".into(), (*e).into());
                }
                Request::new(
                    "PUT",
                    format!("/v1/names/{}", segment(name)),
                    Some(Value::Object(body)),
                )
            }
            NameCmd::Delete { name } => {
                Request::new("DELETE", format!("/v1/names/{}", segment(name)), None)
            }
        },
        CtlCommand::Tokens => Request::get("/v1/tokens".into()),
        CtlCommand::Token { cmd } => match cmd {
            TokenCmd::Create {
                names,
                ttl,
                replicas,
                bandwidth,
            } => {
                let mut body = Map::new();
                body.insert("names".into(), strings(names));
                if let Some(t) = ttl {
                    body.insert("ttl".into(), (*t).into());
                }
                if let Some(r) = replicas {
                    body.insert("replicas".into(), (*r).into());
                }
                if let Some(b) = bandwidth {
                    body.insert("bandwidth".into(), b.clone().into());
                }
                Request::new("POST", "/v1/tokens".into(), Some(Value::Object(body)))
            }
            TokenCmd::Revoke { id } => {
                Request::new("DELETE", format!("/v1/tokens/{}", segment(id)), None)
            }
        },
        CtlCommand::Certs => Request::get("/v1/certificates".into()),
        CtlCommand::Metrics => Request::get("/metrics".into()),
    })
}

/// The `PUT` of `route update ID`: the current route's spec (or the
/// `--spec-file`) with the given options applied, and the expected version
/// (`--version`, else the version of `current`).
pub fn update_request(
    id: &str,
    opts: &RouteOpts,
    version: Option<u64>,
    current: &Value,
) -> Result<Request, CtlError> {
    let mut spec = match &opts.spec_file {
        Some(p) => {
            // A whole new spec; the pause state is not a route option here.
            let mut m = spec_file(p)?;
            if let (false, Some(x)) = (
                m.contains_key("paused"),
                current.get("spec").and_then(|s| s.get("paused")),
            ) {
                m.insert("paused".into(), x.clone());
            }
            m
        }
        None => match current.get("spec") {
            Some(Value::Object(m)) => m.clone(),
            _ => {
                return Err(CtlError::Transport(
                    "the route in the answer has no spec".into(),
                ))
            }
        },
    };
    apply_route_opts(&mut spec, opts);
    let version = match version {
        Some(v) => v,
        None => current
            .get("version")
            .and_then(Value::as_u64)
            .ok_or_else(|| CtlError::Transport("the route in the answer has no version".into()))?,
    };
    let mut body = Map::new();
    body.insert("spec".into(), Value::Object(spec));
    body.insert("version".into(), version.into());
    Ok(Request::new(
        "PUT",
        route_path(id),
        Some(Value::Object(body)),
    ))
}

/// Whether `path` (a concrete, encoded path) matches the template `tpl`.
pub fn path_matches(tpl: &str, path: &str) -> bool {
    let t: Vec<&str> = tpl.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    t.len() == p.len()
        && t.iter().zip(&p).all(|(t, p)| {
            if t.starts_with('{') && t.ends_with('}') {
                !p.is_empty()
            } else {
                t == p
            }
        })
}

// ------------------------------------------------------------ transport

/// The admin bearer token. Never printed: `Debug` is masked and the header
/// value is marked sensitive.
struct Token(zeroize::Zeroizing<String>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    fn from_text(text: zeroize::Zeroizing<String>, what: &str) -> Result<Token, CtlError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(CtlError::Usage(format!("{what}: the token is empty")));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(CtlError::Usage(format!(
                "{what}: the token has characters a bearer token cannot have"
            )));
        }
        Ok(Token(zeroize::Zeroizing::new(t.to_string())))
    }

    fn header(&self) -> Result<http::HeaderValue, CtlError> {
        let s = zeroize::Zeroizing::new(format!("Bearer {}", self.0.as_str()));
        let mut v = http::HeaderValue::from_str(&s)
            .map_err(|_| CtlError::Usage("the token is not a valid header value".into()))?;
        v.set_sensitive(true);
        Ok(v)
    }
}

fn read_token(file: Option<&Path>) -> Result<Token, CtlError> {
    if let Some(p) = file {
        let text = std::fs::read_to_string(p)
            .map_err(|e| CtlError::Usage(format!("--token-file {}: {e}", p.display())))?;
        return Token::from_text(
            zeroize::Zeroizing::new(text),
            &format!("--token-file {}", p.display()),
        );
    }
    match std::env::var("GATEWIRE_TOKEN") {
        Ok(t) => Token::from_text(zeroize::Zeroizing::new(t), "GATEWIRE_TOKEN"),
        Err(_) => Err(CtlError::Usage(
            "--url needs the admin token: --token-file PATH or GATEWIRE_TOKEN".into(),
        )),
    }
}

/// A certificate fingerprint: 64 hex digits, `:` between bytes allowed.
pub fn parse_pin(s: &str) -> Result<[u8; 32], CtlError> {
    let clean: String = s.trim().chars().filter(|c| *c != ':').collect();
    let v = hex::decode(&clean)
        .map_err(|_| CtlError::Usage("--pin: expected the SHA-256 in hex".into()))?;
    let n = v.len();
    v.try_into().map_err(|_| {
        CtlError::Usage(format!(
            "--pin: a SHA-256 is 32 bytes (64 hex digits), this is {n}"
        ))
    })
}

/// `https://host[:port]` as (host for connecting and SNI, port, Host header).
/// Errors show the URL without user information or query (a token someone
/// put there).
pub fn parse_url(s: &str) -> Result<(String, u16, String), CtlError> {
    let shown = printable(&crate::config::redact_url(s));
    let bad = |why: &str| CtlError::Usage(format!("--url {shown}: {why}"));
    let uri: http::Uri = s.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad(
            "expected https://host:port (the API on TCP is always TLS)",
        ));
    }
    let auth = uri.authority().ok_or_else(|| bad("no host"))?;
    if auth.as_str().contains('@') {
        return Err(bad("user information is not allowed"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("expected no path"));
    }
    let host = auth.host().trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("no host"));
    }
    // `http::Uri` reads a port it cannot parse (`:99999`, a bare `:`) as
    // none: that is a mistake to report, not 443.
    let raw = auth.as_str();
    let port_given = match raw.rsplit_once(']') {
        Some((_, rest)) => rest.starts_with(':'),
        None => raw.contains(':'),
    };
    let port = match uri.port_u16() {
        Some(0) => return Err(bad("port 0")),
        Some(p) => p,
        None if port_given => return Err(bad("the port is not a number from 1 to 65535")),
        None => 443,
    };
    Ok((host.to_string(), port, auth.as_str().to_string()))
}

/// The TLS client configuration that accepts only the pinned certificate.
fn pinned_tls(fp: [u8; 32]) -> Arc<rustls::ClientConfig> {
    super::pin::pinned_client_config(fp)
}

enum Target {
    Unix(PathBuf),
    Tls {
        host: String,
        port: u16,
        authority: String,
        token: Token,
        config: Arc<rustls::ClientConfig>,
    },
}

impl Target {
    fn from_args(a: &CtlArgs) -> Result<Target, CtlError> {
        let Some(url) = &a.url else {
            let path = a
                .socket
                .clone()
                .unwrap_or_else(|| socket_path(&a.interface));
            return Ok(Target::Unix(path));
        };
        let (host, port, authority) = parse_url(url)?;
        let pin = a.pin.as_deref().ok_or_else(|| {
            CtlError::Usage("--url needs --pin <SHA-256 of the API certificate>".into())
        })?;
        let fp = parse_pin(pin)?;
        let token = read_token(a.token_file.as_deref())?;
        Ok(Target::Tls {
            host,
            port,
            authority,
            token,
            config: pinned_tls(fp),
        })
    }

    fn describe(&self) -> String {
        match self {
            Target::Unix(p) => p.display().to_string(),
            Target::Tls { authority, .. } => format!("https://{authority}"),
        }
    }

    /// Sends one request on a new connection; the body of a 2xx answer, else
    /// the error it carries.
    async fn send(&self, req: &Request) -> Result<Bytes, CtlError> {
        let work = async {
            match self {
                Target::Unix(path) => {
                    let s = connect(self, tokio::net::UnixStream::connect(path)).await?;
                    exchange(TokioIo::new(s), build(req, "localhost", None)?).await
                }
                Target::Tls {
                    host,
                    port,
                    authority,
                    token,
                    config,
                } => {
                    let tcp = connect(self, tokio::net::TcpStream::connect((host.as_str(), *port)))
                        .await?;
                    let _ = tcp.set_nodelay(true);
                    let name = super::pin::server_name(&format!("{host}:{port}"));
                    let tls = tokio_rustls::TlsConnector::from(config.clone())
                        .connect(name, tcp)
                        .await
                        .map_err(|e| {
                            CtlError::Transport(format!("TLS with {}: {e}", self.describe()))
                        })?;
                    exchange(TokioIo::new(tls), build(req, authority, Some(token))?).await
                }
            }
        };
        let (status, body) =
            tokio::time::timeout(REQUEST_TIMEOUT, work)
                .await
                .map_err(|_| {
                    CtlError::Transport(format!(
                        "{}: no answer within {} s",
                        self.describe(),
                        REQUEST_TIMEOUT.as_secs()
                    ))
                })??;
        if status.is_success() {
            Ok(body)
        } else {
            Err(http_error(status.as_u16(), &body))
        }
    }
}

async fn connect<S>(
    t: &Target,
    fut: impl std::future::Future<Output = std::io::Result<S>>,
) -> Result<S, CtlError> {
    let hint = match t {
        Target::Unix(_) => " (is the hub running with [control]? are you root?)",
        Target::Tls { .. } => "",
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, fut).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(CtlError::Transport(format!(
            "cannot connect to {}: {e}{hint}",
            t.describe()
        ))),
        Err(_) => Err(CtlError::Transport(format!(
            "cannot connect to {}: timed out",
            t.describe()
        ))),
    }
}

fn build(
    req: &Request,
    host: &str,
    token: Option<&Token>,
) -> Result<http::Request<Full<Bytes>>, CtlError> {
    use http::header;
    let method = http::Method::from_bytes(req.method.as_bytes())
        .map_err(|_| CtlError::Usage(format!("bad method {}", req.method)))?;
    let mut b = http::Request::builder()
        .method(method)
        .uri(req.path.as_str())
        .header(header::HOST, host)
        .header(header::ACCEPT, "application/json")
        .header(
            header::USER_AGENT,
            concat!("gatewire-ctl/", env!("CARGO_PKG_VERSION")),
        );
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, t.header()?);
    }
    let body = match &req.body {
        Some(v) => {
            b = b.header(header::CONTENT_TYPE, "application/json");
            Bytes::from(serde_json::to_vec(v).map_err(|e| CtlError::Usage(e.to_string()))?)
        }
        None => Bytes::new(),
    };
    b.body(Full::new(body))
        .map_err(|e| CtlError::Usage(format!("request {} {}: {e}", req.method, req.path)))
}

async fn exchange<T>(
    io: T,
    req: http::Request<Full<Bytes>>,
) -> Result<(http::StatusCode, Bytes), CtlError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let err = |e: hyper::Error| CtlError::Transport(format!("HTTP: {e}"));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(err)?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await.map_err(err)?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), BODY_LIMIT)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                CtlError::Transport(format!(
                    "the answer is larger than {} MiB",
                    BODY_LIMIT >> 20
                ))
            } else {
                CtlError::Transport(format!("reading the answer: {e}"))
            }
        })?
        .to_bytes();
    driver.abort();
    Ok((status, body))
}

// ------------------------------------------------------------ output

/// `42s`, `5m3s`, `2h10m`, `3d4h`.
pub fn duration(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{}s", secs / 60, secs % 60),
        3600..=86_399 => format!("{}h{}m", secs / 3600, (secs % 3600) / 60),
        _ => format!("{}d{}h", secs / 86_400, (secs % 86_400) / 3600),
    }
}

/// A Unix time relative to `now`: `in 1h0m`, `5m3s ago`.
fn relative(t: u64, now: u64) -> String {
    if t >= now {
        format!("in {}", duration(t - now))
    } else {
        format!("{} ago", duration(now - t))
    }
}

/// `512 B`, `1.5 KiB`, `3.2 GiB`.
pub fn bytes_human(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// A JSON value as table text.
fn text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => printable(s),
        Some(Value::Bool(b)) => if *b { "yes" } else { "no" }.into(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Array(a)) if a.is_empty() => "-".into(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| text(Some(x)))
            .collect::<Vec<_>>()
            .join(","),
        Some(o @ Value::Object(_)) => printable(&o.to_string()),
    }
}

fn time_field(v: Option<&Value>, now: u64, never: &str) -> String {
    match v.and_then(Value::as_u64) {
        None | Some(0) => never.into(),
        Some(t) => relative(t, now),
    }
}

fn bytes_field(v: Option<&Value>) -> String {
    v.and_then(Value::as_u64)
        .map(bytes_human)
        .unwrap_or_else(|| "-".into())
}

/// Columns padded to their widest cell, two spaces apart.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    // Every cell, whatever built it: text from the hub (an ACME server's
    // error, a name) never reaches the terminal as control characters.
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| printable(c)).collect())
        .collect();
    let rows = rows.as_slice();
    let mut w: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(x) = w.get_mut(i) {
                *x = (*x).max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let head: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for r in std::iter::once(&head).chain(rows) {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(c);
            if i + 1 < r.len() {
                let width = w.get(i).copied().unwrap_or(0);
                line.extend(std::iter::repeat_n(
                    ' ',
                    width.saturating_sub(c.chars().count()),
                ));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn items(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(a) => a.iter().collect(),
        Value::Null => Vec::new(),
        one => vec![one],
    }
}

fn peer_key(p: &Value) -> Option<&Value> {
    p.get("public_key").or_else(|| p.get("key"))
}

/// Peers: name, key, allowed ips, latest handshake age, rx/tx.
pub fn peers_table(v: &Value, now: u64) -> String {
    let rows: Vec<Vec<String>> = items(v)
        .into_iter()
        .map(|p| {
            vec![
                text(p.get("name")),
                text(peer_key(p)),
                text(p.get("allowed_ips")),
                time_field(p.get("latest_handshake"), now, "never"),
                bytes_field(p.get("rx_bytes")),
                bytes_field(p.get("tx_bytes")),
            ]
        })
        .collect();
    table(
        &["NAME", "KEY", "ALLOWED IPS", "HANDSHAKE", "RX", "TX"],
        &rows,
    )
}

fn backends_text(r: &Value) -> String {
    match r.get("backends").and_then(Value::as_array) {
        Some(bs) if !bs.is_empty() => bs
            .iter()
            .map(|b| {
                let state = match b.get("up").and_then(Value::as_bool) {
                    Some(true) => " up",
                    Some(false) => " DOWN",
                    None => "",
                };
                // A path prefix's backends carry their prefix.
                let path = match b.get("path").and_then(Value::as_str) {
                    Some(p) => format!("{}: ", printable(p)),
                    None => String::new(),
                };
                // `addr` per the contract; `backend` as the proxy's health names it.
                format!(
                    "{path}{}{state}",
                    text(b.get("addr").or_else(|| b.get("backend")))
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
        _ => text(r.get("spec").and_then(|s| s.get("backends"))),
    }
}

/// Routes: id, version, paused, origin, backends with up/down.
pub fn routes_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = items(v)
        .into_iter()
        .map(|r| {
            vec![
                text(r.get("id")),
                text(r.get("version")),
                text(r.get("paused")),
                text(r.get("origin")),
                backends_text(r),
            ]
        })
        .collect();
    table(&["ID", "VERSION", "PAUSED", "ORIGIN", "BACKENDS"], &rows)
}

/// Names: name, owners, replicas, expiry.
pub fn names_table(v: &Value, now: u64) -> String {
    let rows: Vec<Vec<String>> = items(v)
        .into_iter()
        .map(|n| {
            vec![
                text(n.get("name")),
                text(n.get("owners")),
                text(n.get("replicas")),
                time_field(n.get("expires"), now, "never"),
                text(n.get("bandwidth")),
            ]
        })
        .collect();
    table(
        &["NAME", "OWNERS", "REPLICAS", "EXPIRES", "BANDWIDTH"],
        &rows,
    )
}

/// Tokens: id, names, replicas, bandwidth, expiry.
pub fn tokens_table(v: &Value, now: u64) -> String {
    let rows: Vec<Vec<String>> = items(v)
        .into_iter()
        .map(|t| {
            vec![
                text(t.get("id")),
                text(t.get("names")),
                text(t.get("replicas")),
                text(t.get("bandwidth")),
                time_field(t.get("expires"), now, "-"),
            ]
        })
        .collect();
    table(&["ID", "NAMES", "REPLICAS", "BANDWIDTH", "EXPIRES"], &rows)
}

/// `key: value` lines, the named keys first in their order, then the rest;
/// null and empty values are left out.
fn fields(v: &Value, first: &[&str], indent: &str) -> String {
    let mut out = String::new();
    let Some(m) = v.as_object() else {
        return format!("{indent}{}\n", text(Some(v)));
    };
    let rest = m.keys().filter(|k| !first.contains(&k.as_str()));
    for k in first.iter().copied().chain(rest.map(String::as_str)) {
        if let Some(x) = m.get(k).filter(|x| !x.is_null() && x.as_str() != Some("")) {
            out.push_str(&format!(
                "{indent}{}: {}\n",
                printable(&k.replace('_', " ")),
                text(Some(x))
            ));
        }
    }
    out
}

/// `ctl status`.
pub fn status_text(v: &Value) -> String {
    let mut c = v.clone();
    if let Some(m) = c.as_object_mut() {
        for k in ["peers", "routes"] {
            if let Some(Value::Array(a)) = m.get(k) {
                let n = a.len();
                m.insert(k.into(), n.into());
            }
        }
    }
    fields(
        &c,
        &[
            "interface",
            "public_key",
            "state_version",
            "peers",
            "routes",
        ],
        "",
    )
}

/// `ctl peer show`.
pub fn peer_text(p: &Value, now: u64) -> String {
    let mut out = format!("peer: {}", text(peer_key(p)));
    if let Some(n) = p.get("name").and_then(Value::as_str) {
        out.push_str(&format!(" ({})", printable(n)));
    }
    out.push('\n');
    let mut rest = p.clone();
    if let Some(m) = rest.as_object_mut() {
        for k in ["public_key", "key", "name"] {
            m.remove(k);
        }
        if let Some(h) = m.get("latest_handshake") {
            let s = time_field(Some(h), now, "never");
            m.insert("latest_handshake".into(), s.into());
        }
        for k in ["rx_bytes", "tx_bytes"] {
            if let Some(b) = m.get(k) {
                let s = bytes_field(Some(b));
                m.insert(k.into(), s.into());
            }
        }
        // Drop counters: the non-zero ones.
        if let Some(Value::Object(d)) = m.get("drops") {
            let nz: Vec<String> = d
                .iter()
                .filter(|(_, n)| n.as_u64().is_some_and(|n| n > 0))
                .map(|(k, n)| format!("{k}={n}"))
                .collect();
            m.insert("drops".into(), nz.join(" ").into());
        }
        // Declared services: `host status`, with the hub's reason when refused.
        if let Some(Value::Array(list)) = m.get("services") {
            let v: Vec<String> = list
                .iter()
                .map(|x| {
                    let head = format!("{} {}", text(x.get("host")), text(x.get("status")));
                    match x.get("error").and_then(Value::as_str) {
                        Some(e) if !e.is_empty() => format!("{head} ({e})"),
                        _ => head,
                    }
                })
                .collect();
            m.insert("services".into(), v.join(", ").into());
        }
    }
    out + &fields(
        &rest,
        &[
            "origin",
            "allowed_ips",
            "endpoint",
            "latest_handshake",
            "rx_bytes",
            "tx_bytes",
            "services",
        ],
        "  ",
    )
}

/// `ctl route show` and the answer of route changes.
pub fn route_text(r: &Value) -> String {
    let mut out = format!("route: {}\n", text(r.get("id")));
    for k in ["version", "paused", "origin", "owner", "owners"] {
        if let Some(x) = r.get(k) {
            out.push_str(&format!("  {k}: {}\n", text(Some(x))));
        }
    }
    out.push_str(&format!("  backends: {}\n", backends_text(r)));
    if let Some(Value::Object(spec)) = r.get("spec") {
        out.push_str("  spec:\n");
        for (k, x) in spec {
            out.push_str(&format!(
                "    {} = {}\n",
                printable(k),
                printable(&x.to_string())
            ));
        }
    }
    out
}

/// The human output for a command's (2xx, JSON) answer.
pub fn render(cmd: &CtlCommand, v: &Value, now: u64) -> String {
    match cmd {
        CtlCommand::Status => status_text(v),
        CtlCommand::Peers => peers_table(v, now),
        CtlCommand::Peer { cmd } => match cmd {
            PeerCmd::Show { .. } | PeerCmd::Add { .. } => peer_text(v, now),
            PeerCmd::Remove { .. } => String::new(),
        },
        CtlCommand::Routes => routes_table(v),
        CtlCommand::Route { cmd } => match cmd.as_ref() {
            RouteCmd::Delete { .. } => String::new(),
            _ => route_text(v),
        },
        CtlCommand::Names => names_table(v, now),
        CtlCommand::Name { cmd } => match cmd {
            NameCmd::Set { .. } => names_table(v, now),
            NameCmd::Delete { .. } => String::new(),
        },
        CtlCommand::Tokens => tokens_table(v, now),
        CtlCommand::Token { cmd } => match cmd {
            TokenCmd::Create { .. } => format!("{}\n", text(v.get("token"))),
            TokenCmd::Revoke { .. } => String::new(),
        },
        CtlCommand::Certs => certs_table(v, now),
        CtlCommand::Metrics => String::new(),
    }
}

/// Certificates: host, source, expiry, renewal, and a failing order.
pub fn certs_table(v: &Value, now: u64) -> String {
    let rows: Vec<Vec<String>> = items(v)
        .into_iter()
        .map(|c| {
            let state = match (
                c.get("error").and_then(Value::as_str),
                c.get("not_after").is_some_and(Value::is_null),
                c.get("superseded"),
            ) {
                (Some(e), _, _) => format!("failing: {e}"),
                (None, true, _) => "not issued yet".to_string(),
                (None, false, Some(Value::Bool(true))) => "superseded".to_string(),
                _ => "ok".to_string(),
            };
            vec![
                text(c.get("host")),
                text(c.get("source")),
                time_field(c.get("not_after"), now, "-"),
                time_field(c.get("renew_at"), now, "-"),
                state,
            ]
        })
        .collect();
    table(&["HOST", "SOURCE", "EXPIRES", "RENEWS", "STATE"], &rows)
}

fn parse_json(body: &[u8]) -> Result<Value, CtlError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body)
        .map_err(|e| CtlError::Transport(format!("the answer is not JSON: {e}")))
}

/// Sends the request(s) of a command; the body of the (last) answer.
async fn execute(target: &Target, cmd: &CtlCommand) -> Result<Bytes, CtlError> {
    let req = request_for(cmd)?;
    let body = target.send(&req).await?;
    match cmd {
        CtlCommand::Route { cmd } => match cmd.as_ref() {
            RouteCmd::Update { id, opts, version } => {
                let current = parse_json(&body)?;
                target
                    .send(&update_request(id, opts, *version, &current)?)
                    .await
            }
            _ => Ok(body),
        },
        _ => Ok(body),
    }
}

async fn run(args: &CtlArgs) -> Result<(), CtlError> {
    // Arguments first, so a usage error needs no connection.
    request_for(&args.cmd)?;
    let target = Target::from_args(args)?;
    let body = execute(&target, &args.cmd).await?;
    let mut out = std::io::stdout().lock();
    let w = |out: &mut std::io::StdoutLock, s: &[u8]| {
        out.write_all(s)
            .and_then(|_| out.flush())
            .map_err(|e| CtlError::Transport(format!("stdout: {e}")))
    };
    if matches!(args.cmd, CtlCommand::Metrics) {
        return w(&mut out, &body);
    }
    if args.json {
        if body.is_empty() {
            return Ok(());
        }
        w(&mut out, &body)?;
        return if body.ends_with(b"\n") {
            Ok(())
        } else {
            w(&mut out, b"\n")
        };
    }
    let v = parse_json(&body)?;
    let now = crate::clock::unix_secs();
    if let CtlCommand::Token {
        cmd: TokenCmd::Create { .. },
    } = &args.cmd
    {
        let mut details = format!("token {}", text(v.get("id")));
        if let Some(e) = v.get("expires").and_then(Value::as_u64) {
            details.push_str(&format!(", expires {} ({e})", relative(e, now)));
        }
        eprintln!("{details}");
    }
    w(&mut out, render(&args.cmd, &v, now).as_bytes())
}

/// `gatewire ctl`: exit 0 on success, 2 for usage errors and 4xx answers, 1
/// otherwise; errors print as `error: <msg> (HTTP <status>)`.
pub fn main(args: CtlArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use serde_json::json;

    #[derive(Parser, Debug)]
    struct TestCli {
        #[command(flatten)]
        args: CtlArgs,
    }

    fn parse(line: &[&str]) -> CtlArgs {
        let argv = std::iter::once("ctl").chain(line.iter().copied());
        match TestCli::try_parse_from(argv) {
            Ok(c) => c.args,
            Err(e) => panic!("{line:?}: {e}"),
        }
    }

    fn req(line: &[&str]) -> Request {
        let a = parse(line);
        match request_for(&a.cmd) {
            Ok(r) => r,
            Err(e) => panic!("{line:?}: {e}"),
        }
    }

    const KEY: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const KEY2: &str = "ab/c++f8AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBk=";

    fn openapi() -> Value {
        match serde_json::from_str(include_str!("../../docs/openapi.json")) {
            Ok(v) => v,
            Err(e) => panic!("docs/openapi.json: {e}"),
        }
    }

    #[test]
    fn clap_definitions_are_consistent() {
        use clap::CommandFactory;
        TestCli::command().debug_assert();
    }

    #[test]
    fn openapi_has_every_endpoint() {
        let doc = openapi();
        assert!(doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")));
        let paths = doc["paths"].as_object().expect("paths");
        for (method, path) in ENDPOINTS.iter().chain(NODE_ENDPOINTS) {
            let op = &paths
                .get(*path)
                .unwrap_or_else(|| panic!("{path} missing from docs/openapi.json"))
                [method.to_lowercase()];
            assert!(
                op.is_object(),
                "{method} {path} missing from docs/openapi.json"
            );
            let responses = op["responses"].as_object().expect("responses");
            assert!(!responses.is_empty(), "{method} {path}: no responses");
        }
    }

    #[test]
    fn openapi_paths_have_operations_and_are_known() {
        let doc = openapi();
        let paths = doc["paths"].as_object().expect("paths");
        let methods = ["get", "put", "post", "delete", "patch", "head", "options"];
        for (path, item) in paths {
            let ops: Vec<&str> = methods
                .iter()
                .copied()
                .filter(|m| item.get(*m).is_some())
                .collect();
            assert!(
                ops.iter().any(|m| item[*m]["responses"]
                    .as_object()
                    .is_some_and(|r| !r.is_empty())),
                "{path}: no operation with responses"
            );
            for m in ops {
                let up = m.to_uppercase();
                assert!(
                    ENDPOINTS
                        .iter()
                        .chain(NODE_ENDPOINTS)
                        .any(|(em, ep)| *em == up && ep == path),
                    "{up} {path} is in docs/openapi.json but not in ENDPOINTS"
                );
            }
        }
        // Every schema reference resolves.
        let text = include_str!("../../docs/openapi.json");
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        let responses = doc["components"]["responses"]
            .as_object()
            .expect("responses");
        for part in text.split("\"$ref\": \"").skip(1) {
            let r = part.split('"').next().unwrap_or("");
            let ok = match r.strip_prefix("#/components/schemas/") {
                Some(n) => schemas.contains_key(n),
                None => r
                    .strip_prefix("#/components/responses/")
                    .is_some_and(|n| responses.contains_key(n)),
            };
            assert!(ok, "dangling $ref {r}");
        }
    }

    #[test]
    fn route_spec_schema_has_every_route_key() {
        // The `[[route]]` keys (RawRoute) plus `paused`, as serialized.
        let spec = crate::proxy::settings::RawRoute {
            name: Some("x".into()),
            fqdn: Some("x.example".into()),
            tls: Some("terminate".into()),
            cert: Some("c".into()),
            key: Some("k".into()),
            backends: vec!["100.64.1.2:80".into()],
            proxy_protocol: Some(crate::proxy::settings::RawPp::Bool(true)),
            backend_ca: Some("ca".into()),
            backend_server_name: Some("b".into()),
            backend_protocol: Some("http2".into()),
            balance: Some("least_conn".into()),
            health_check: Some("tcp".into()),
            health_path: Some("/".into()),
            health_interval: Some(1),
            health_timeout: Some(1),
            health_fall: Some(1),
            health_rise: Some(1),
            max_connections: Some(1),
            allow: vec!["192.0.2.0/24".into()],
            deny: vec!["192.0.2.9".into()],
            rate_limit: Some(10),
            rate_burst: Some(20),
            bandwidth: Some("20 Mbit/s".into()),
            basic_auth_file: Some("users.htpasswd".into()),
            forward_auth: Some("http://100.64.1.9:4180/auth".into()),
            forward_auth_headers: vec!["x-auth-request-user".into()],
            paths: vec![crate::proxy::settings::RawPath {
                prefix: "/api".into(),
                backends: vec!["100.64.1.3:80".into()],
                strip_prefix: true,
                health_path: Some("/status".into()),
            }],
            max_body_size: Some("10 MB".into()),
            request_headers: [("X-Env".to_string(), "prod".to_string())].into(),
            response_headers: [("Server".to_string(), String::new())].into(),
            ..Default::default()
        };
        let v = serde_json::to_value(&spec).expect("serialize");
        let doc = openapi();
        let props = doc["components"]["schemas"]["RouteSpec"]["properties"]
            .as_object()
            .expect("RouteSpec");
        for k in v.as_object().expect("object").keys() {
            assert!(props.contains_key(k), "RouteSpec lacks `{k}`");
        }
        for k in props.keys() {
            assert!(v.get(k).is_some(), "RouteSpec has `{k}`, RawRoute does not");
        }
    }

    #[test]
    fn every_request_is_an_endpoint() {
        let lines: &[&[&str]] = &[
            &["status"],
            &["peers"],
            &["peer", "show", KEY],
            &["peer", "add", KEY],
            &["peer", "remove", KEY],
            &["routes"],
            &["route", "show", "blog"],
            &[
                "route",
                "create",
                "--name",
                "blog",
                "--backend",
                "100.64.1.2:80",
            ],
            &["route", "update", "blog", "--tls", "passthrough"],
            &["route", "pause", "blog"],
            &["route", "resume", "fqdn:shop.example.com"],
            &["route", "delete", "blog"],
            &["names"],
            &["name", "set", "blog", "--owner", KEY],
            &["name", "delete", "blog"],
            &["tokens"],
            &["token", "create", "--names", "blog"],
            &["token", "revoke", "0123456789abcdef"],
            &["certs"],
            &["metrics"],
        ];
        for l in lines {
            let r = req(l);
            assert!(
                ENDPOINTS
                    .iter()
                    .any(|(m, p)| *m == r.method && path_matches(p, &r.path)),
                "{l:?}: {} {} is not in ENDPOINTS",
                r.method,
                r.path
            );
        }
    }

    #[test]
    fn peers_map_onto_requests() {
        assert_eq!(req(&["peers"]), Request::get("/v1/peers".into()));
        assert_eq!(
            req(&["peer", "show", KEY2]),
            Request::get("/v1/peers/ab%2Fc%2B%2Bf8AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBk%3D".into())
        );
        assert_eq!(
            req(&[
                "peer",
                "add",
                KEY,
                "--name",
                "n1",
                "--allowed-ips",
                "100.64.1.5/32,fd77::5/128"
            ]),
            Request::new(
                "POST",
                "/v1/peers".into(),
                Some(
                    json!({"public_key": KEY, "name": "n1", "allowed_ips": ["100.64.1.5/32", "fd77::5/128"]})
                )
            )
        );
        // Without --allowed-ips the hub takes addresses from its pools.
        assert_eq!(
            req(&["peer", "add", KEY]).body,
            Some(json!({"public_key": KEY}))
        );
        let r = req(&["peer", "remove", KEY]);
        assert_eq!(r.method, "DELETE");
        assert_eq!(
            r.path,
            "/v1/peers/xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg%3D"
        );
        assert_eq!(r.body, None);
    }

    #[test]
    fn routes_map_onto_requests() {
        assert_eq!(req(&["routes"]), Request::get("/v1/routes".into()));
        assert_eq!(req(&["route", "show", "blog"]).path, "/v1/routes/name:blog");
        assert_eq!(
            req(&["route", "show", "shop.example.com"]).path,
            "/v1/routes/fqdn:shop.example.com"
        );
        assert_eq!(
            req(&["route", "show", "name:blog"]).path,
            "/v1/routes/name:blog"
        );
        assert_eq!(
            req(&[
                "route",
                "create",
                "--fqdn",
                "shop.example.com",
                "--backend",
                "[fd77:6777::1:2]:443",
                "--backend",
                "100.64.1.2:443",
                "--tls",
                "passthrough",
                "--proxy-protocol",
                "v2",
                "--balance",
                "least_conn"
            ]),
            Request::new(
                "POST",
                "/v1/routes".into(),
                Some(json!({
                    "fqdn": "shop.example.com",
                    "backends": ["[fd77:6777::1:2]:443", "100.64.1.2:443"],
                    "tls": "passthrough",
                    "proxy_protocol": "v2",
                    "balance": "least_conn",
                }))
            )
        );
        assert_eq!(
            req(&[
                "route",
                "create",
                "--name",
                "blog",
                "--backend",
                "a:1,b:2",
                "--acme",
                "--redirect-https",
                "--backend-protocol",
                "http2"
            ])
            .body,
            Some(
                json!({"name": "blog", "backends": ["a:1", "b:2"], "acme": true, "redirect_https": true, "backend_protocol": "http2"})
            )
        );
        assert_eq!(
            req(&[
                "route",
                "create",
                "--name",
                "admin",
                "--backend",
                "a:1",
                "--allow",
                "192.0.2.0/24,2001:db8::/32",
                "--allow",
                "198.51.100.7",
                "--deny",
                "192.0.2.9",
                "--rate-limit",
                "10",
                "--rate-burst",
                "30",
                "--basic-auth-file",
                "/etc/gatewire/admin.htpasswd",
                "--forward-auth",
                "http://100.64.1.9:4180/auth",
                "--forward-auth-header",
                "x-auth-request-user,x-auth-request-email",
                "--bandwidth",
                "20 Mbit/s",
                "--max-body-size",
                "10 MB"
            ])
            .body,
            Some(json!({"name": "admin", "backends": ["a:1"],
                "allow": ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7"], "deny": ["192.0.2.9"],
                "rate_limit": 10, "rate_burst": 30, "bandwidth": "20 Mbit/s", "max_body_size": "10 MB",
                "basic_auth_file": "/etc/gatewire/admin.htpasswd",
                "forward_auth": "http://100.64.1.9:4180/auth",
                "forward_auth_headers": ["x-auth-request-user", "x-auth-request-email"]}))
        );
        assert_eq!(
            req(&[
                "route",
                "create",
                "--name",
                "admin",
                "--backend",
                "a:1",
                "--allow",
                ""
            ])
            .body,
            Some(json!({"name": "admin", "backends": ["a:1"], "allow": []}))
        );
        assert_eq!(
            req(&[
                "route",
                "create",
                "--name",
                "blog",
                "--backend",
                "a:1",
                "--acme=false",
                "--proxy-protocol",
                "off"
            ])
            .body,
            Some(
                json!({"name": "blog", "backends": ["a:1"], "acme": false, "proxy_protocol": false})
            )
        );
        assert_eq!(
            req(&["route", "pause", "blog"]),
            Request::new("POST", "/v1/routes/name:blog/pause".into(), None)
        );
        assert_eq!(
            req(&["route", "resume", "blog"]),
            Request::new("POST", "/v1/routes/name:blog/resume".into(), None)
        );
        assert_eq!(
            req(&["route", "delete", "fqdn:shop.example.com"]),
            Request::new("DELETE", "/v1/routes/fqdn:shop.example.com".into(), None)
        );
        // Update starts with a GET of the current route.
        assert_eq!(
            req(&["route", "update", "blog", "--backend", "c:3"]),
            Request::get("/v1/routes/name:blog".into())
        );
    }

    #[test]
    fn route_argument_errors() {
        let e = |l: &[&str]| request_for(&parse(l).cmd).err();
        assert!(
            matches!(e(&["route", "create", "--backend", "a:1"]), Some(CtlError::Usage(m)) if m.contains("--name"))
        );
        assert!(
            matches!(e(&["route", "create", "--name", "blog"]), Some(CtlError::Usage(m)) if m.contains("--backend"))
        );
        assert!(
            matches!(e(&["route", "update", "blog"]), Some(CtlError::Usage(m)) if m.contains("nothing to change"))
        );
        let argv = [
            "ctl",
            "route",
            "create",
            "--name",
            "a",
            "--fqdn",
            "b.c",
            "--backend",
            "a:1",
        ];
        assert!(TestCli::try_parse_from(argv).is_err(), "--name with --fqdn");
        let argv = [
            "ctl",
            "route",
            "create",
            "--name",
            "a",
            "--backend",
            "a:1",
            "--tls",
            "both",
        ];
        assert!(TestCli::try_parse_from(argv).is_err(), "--tls both");
        let argv = ["ctl", "--socket", "/s", "--url", "https://h:1", "status"];
        assert!(
            TestCli::try_parse_from(argv).is_err(),
            "--socket with --url"
        );
    }

    fn temp_path(tag: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        std::env::temp_dir().join(format!(
            "gatewire-ctl-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }

    #[test]
    fn spec_file_is_the_base_and_options_override_it() {
        let p = temp_path("spec.json");
        std::fs::write(
            &p,
            r#"{"name": "blog", "backends": ["a:1"], "sticky": true, "health_check": "http"}"#,
        )
        .expect("write");
        let ps = p.to_string_lossy().to_string();
        assert_eq!(
            req(&["route", "create", "--spec-file", &ps, "--backend", "b:2"]).body,
            Some(
                json!({"name": "blog", "backends": ["b:2"], "sticky": true, "health_check": "http"})
            )
        );
        assert_eq!(
            req(&[
                "route",
                "create",
                "--spec-file",
                &ps,
                "--fqdn",
                "blog.example.com"
            ])
            .body,
            Some(
                json!({"fqdn": "blog.example.com", "backends": ["a:1"], "sticky": true, "health_check": "http"})
            )
        );
        std::fs::write(&p, "[1]").expect("write");
        let e = request_for(&parse(&["route", "create", "--spec-file", &ps]).cmd);
        assert!(matches!(e, Err(CtlError::Usage(m)) if m.contains("JSON object")));
        let _ = std::fs::remove_file(&p);
        let e = request_for(&parse(&["route", "create", "--spec-file", &ps]).cmd);
        assert!(matches!(e, Err(CtlError::Usage(_))));
    }

    fn current_route() -> Value {
        json!({
            "id": "name:blog", "version": 4, "paused": true, "origin": "api",
            "spec": {"name": "blog", "backends": ["a:1"], "tls": "terminate", "acme": true, "paused": true},
            "backends": [{"addr": "a:1", "up": true}],
        })
    }

    #[test]
    fn update_changes_only_the_given_options() {
        let a = parse(&[
            "route",
            "update",
            "blog",
            "--backend",
            "b:2",
            "--backend",
            "c:3",
            "--acme=false",
            "--balance",
            "least_conn",
        ]);
        let CtlCommand::Route { cmd } = &a.cmd else {
            panic!("not a route command")
        };
        let RouteCmd::Update { id, opts, version } = cmd.as_ref() else {
            panic!("not an update")
        };
        let r = update_request(id, opts, *version, &current_route()).expect("request");
        assert_eq!(r.method, "PUT");
        assert_eq!(r.path, "/v1/routes/name:blog");
        assert_eq!(
            r.body,
            Some(json!({
                "spec": {"name": "blog", "backends": ["b:2", "c:3"], "tls": "terminate", "acme": false, "paused": true, "balance": "least_conn"},
                "version": 4,
            }))
        );
        // An explicit --version wins over the one read.
        let a = parse(&[
            "route",
            "update",
            "blog",
            "--redirect-https",
            "--version",
            "2",
        ]);
        let CtlCommand::Route { cmd } = &a.cmd else {
            panic!("not a route command")
        };
        let RouteCmd::Update { id, opts, version } = cmd.as_ref() else {
            panic!("not an update")
        };
        let r = update_request(id, opts, *version, &current_route()).expect("request");
        assert_eq!(
            r.body.as_ref().map(|b| b["version"].clone()),
            Some(json!(2))
        );
        assert_eq!(
            r.body.as_ref().map(|b| b["spec"]["redirect_https"].clone()),
            Some(json!(true))
        );
        // A spec file replaces the spec but keeps the pause state.
        let p = temp_path("update.json");
        std::fs::write(&p, r#"{"name": "blog", "backends": ["d:4"]}"#).expect("write");
        let ps = p.to_string_lossy().to_string();
        let a = parse(&["route", "update", "blog", "--spec-file", &ps]);
        let CtlCommand::Route { cmd } = &a.cmd else {
            panic!("not a route command")
        };
        let RouteCmd::Update { id, opts, version } = cmd.as_ref() else {
            panic!("not an update")
        };
        let r = update_request(id, opts, *version, &current_route()).expect("request");
        let _ = std::fs::remove_file(&p);
        assert_eq!(
            r.body,
            Some(
                json!({"spec": {"name": "blog", "backends": ["d:4"], "paused": true}, "version": 4})
            )
        );
        // An answer without a spec is the server's fault.
        let e = update_request(
            id,
            &RouteOpts {
                tls: Some("terminate".into()),
                ..Default::default()
            },
            None,
            &json!({"version": 1}),
        );
        assert!(matches!(e, Err(CtlError::Transport(_))));
    }

    #[test]
    fn names_and_tokens_map_onto_requests() {
        assert_eq!(req(&["names"]), Request::get("/v1/names".into()));
        assert_eq!(
            req(&[
                "name",
                "set",
                "blog",
                "--owner",
                KEY,
                "--owner",
                KEY2,
                "--replicas",
                "--expires",
                "1900000000"
            ]),
            Request::new(
                "PUT",
                "/v1/names/blog".into(),
                Some(json!({"owners": [KEY, KEY2], "replicas": true, "expires": 1_900_000_000u64}))
            )
        );
        assert_eq!(
            req(&["name", "set", "shop.example.com", "--owner", KEY]),
            Request::new(
                "PUT",
                "/v1/names/shop.example.com".into(),
                Some(json!({"owners": [KEY]}))
            )
        );
        assert_eq!(
            req(&[
                "name",
                "set",
                "blog",
                "--owner",
                KEY,
                "--bandwidth",
                "5 MB/s"
            ]),
            Request::new(
                "PUT",
                "/v1/names/blog".into(),
                Some(json!({"owners": [KEY], "bandwidth": "5 MB/s"}))
            )
        );
        assert!(
            TestCli::try_parse_from(["ctl", "name", "set", "blog"]).is_err(),
            "--owner required"
        );
        assert_eq!(
            req(&["name", "delete", "blog"]),
            Request::new("DELETE", "/v1/names/blog".into(), None)
        );
        assert_eq!(req(&["tokens"]), Request::get("/v1/tokens".into()));
        assert_eq!(
            req(&[
                "token",
                "create",
                "--names",
                "blog,shop.example.com",
                "--ttl",
                "30m",
                "--replicas",
                "--bandwidth",
                "10 Mbit/s"
            ]),
            Request::new(
                "POST",
                "/v1/tokens".into(),
                Some(
                    json!({"names": ["blog", "shop.example.com"], "ttl": 1800, "replicas": true,
                           "bandwidth": "10 Mbit/s"})
                )
            )
        );
        assert_eq!(
            req(&["token", "create", "--names", "blog"]).body,
            Some(json!({"names": ["blog"]}))
        );
        assert_eq!(
            req(&["token", "revoke", "0123456789abcdef"]),
            Request::new("DELETE", "/v1/tokens/0123456789abcdef".into(), None)
        );
        assert_eq!(req(&["status"]), Request::get("/v1/status".into()));
        assert_eq!(req(&["metrics"]), Request::get("/metrics".into()));
    }

    #[test]
    fn global_options_go_anywhere() {
        let a = parse(&["route", "show", "blog", "--json", "--interface", "gw1"]);
        assert!(a.json);
        assert_eq!(a.interface, "gw1");
        let a = parse(&["--socket", "/tmp/x.sock", "status"]);
        assert_eq!(a.socket, Some(PathBuf::from("/tmp/x.sock")));
        let a = parse(&["status"]);
        assert_eq!(a.interface, DEFAULT_INTERFACE);
        assert_eq!(
            socket_path(&a.interface),
            PathBuf::from("/run/gatewire/gw0.ctl.sock")
        );
    }

    #[test]
    fn segments_and_ids() {
        assert_eq!(segment("a/b+c="), "a%2Fb%2Bc%3D");
        assert_eq!(segment("name:blog"), "name:blog");
        assert_eq!(segment("x y?#%"), "x%20y%3F%23%25");
        assert_eq!(segment(".."), "%2E%2E");
        assert_eq!(segment("ä"), "%C3%A4");
        assert_eq!(route_id("blog"), "name:blog");
        assert_eq!(route_id("shop.example.com"), "fqdn:shop.example.com");
        assert_eq!(route_id("fqdn:x.y"), "fqdn:x.y");
        assert_eq!(route_id("tcp:0.0.0.0:2222"), "tcp:0.0.0.0:2222");
        assert_eq!(segment("udp:[::]:53"), "udp:%5B::%5D:53");
        assert!(path_matches(
            "/v1/routes/{id}/pause",
            "/v1/routes/name:a/pause"
        ));
        assert!(!path_matches("/v1/routes/{id}", "/v1/routes/name:a/pause"));
        assert!(!path_matches("/v1/routes/{id}", "/v1/routes/"));
    }

    #[test]
    fn ttl_pin_and_url() {
        assert_eq!(parse_ttl("3600"), Ok(3600));
        assert_eq!(parse_ttl("90s"), Ok(90));
        assert_eq!(parse_ttl("30m"), Ok(1800));
        assert_eq!(parse_ttl("1h"), Ok(3600));
        assert_eq!(parse_ttl("2d"), Ok(172_800));
        for bad in ["", "0", "h", "1w", "-1", "1.5h", "99999999999999999999d"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
        let hex = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let fp = parse_pin(hex).expect("pin");
        assert_eq!(fp[1], 0x11);
        assert_eq!(fp[31], 0xff);
        let colons: Vec<String> = fp.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(parse_pin(&colons.join(":")), Ok(fp));
        assert!(parse_pin(&hex[2..]).is_err());
        assert!(parse_pin("zz").is_err());
        assert_eq!(
            parse_url("https://hub.example.org:7443"),
            Ok((
                "hub.example.org".into(),
                7443,
                "hub.example.org:7443".into()
            ))
        );
        assert_eq!(
            parse_url("https://[2001:db8::1]:7443/"),
            Ok(("2001:db8::1".into(), 7443, "[2001:db8::1]:7443".into()))
        );
        assert_eq!(parse_url("https://10.0.0.1").map(|u| u.1), Ok(443));
        assert_eq!(parse_url("https://[2001:db8::1]").map(|u| u.1), Ok(443));
        for bad in [
            "http://h:1",
            "h:1",
            "https://u:p@h:1",
            "https://h:1/v1",
            "https://h:1?x",
            "https://:1",
            "https://h:74430",
            "https://h:",
            "https://h:0",
            "https://[2001:db8::1]:99999",
            "https://[2001:db8::1]:",
        ] {
            assert!(matches!(parse_url(bad), Err(CtlError::Usage(_))), "{bad}");
        }
    }

    #[test]
    fn url_errors_keep_credentials_and_query_out() {
        for (bad, shown) in [
            (
                "https://admin:hunter2@hub:7443",
                "https://<redacted>@hub:7443",
            ),
            (
                "https://admin:hun/ter2@hub:7443",
                "https://<redacted>@hub:7443",
            ),
            ("https://admin:hun?ter2@hub:7443", "https://<redacted>:"),
            ("https://hub:7443/?t=hunter2", "https://hub:7443/?…"),
            (
                "http://admin:hunter2@hub:7443",
                "http://<redacted>@hub:7443",
            ),
        ] {
            let e = parse_url(bad).expect_err(bad).to_string();
            assert!(!e.contains("hun") && !e.contains("ter2"), "{bad}: {e}");
            assert!(e.contains(shown), "{bad}: {e}");
        }
    }

    #[test]
    fn errors_and_exit_codes() {
        let e = http_error(409, br#"{"error": "version 3 is not the current one (4)"}"#);
        assert_eq!(
            e.to_string(),
            "version 3 is not the current one (4) (HTTP 409)"
        );
        assert_eq!(e.exit_code(), 2);
        let e = http_error(500, br#"{"error": "saving state: disk full"}"#);
        assert_eq!(e.to_string(), "saving state: disk full (HTTP 500)");
        assert_eq!(e.exit_code(), 1);
        assert_eq!(http_error(404, b"").to_string(), "not found (HTTP 404)");
        assert_eq!(
            http_error(502, b"bad gateway\nmore").to_string(),
            "bad gateway (HTTP 502)"
        );
        assert_eq!(
            http_error(400, b"{\"error\": \"a\\u001b[31mb\"}").to_string(),
            "a?[31mb (HTTP 400)"
        );
        assert_eq!(CtlError::Usage("x".into()).exit_code(), 2);
        assert_eq!(CtlError::Transport("x".into()).exit_code(), 1);
    }

    #[test]
    fn token_never_shows() {
        let t = Token::from_text(zeroize::Zeroizing::new(" s3cret-token\n".into()), "t")
            .expect("token");
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
        let h = t.header().expect("header");
        assert!(h.is_sensitive());
        assert_eq!(h.to_str().ok(), Some("Bearer s3cret-token"));
        assert!(format!("{h:?}").contains("Sensitive"));
        let e = Token::from_text(zeroize::Zeroizing::new("zq zq".into()), "f").expect_err("space");
        assert!(!e.to_string().contains("zq"));
        assert!(Token::from_text(zeroize::Zeroizing::new(" \n".into()), "f").is_err());
    }

    const NOW: u64 = 1_700_000_000;

    #[test]
    fn peers_table_renders() {
        let v = json!([
            {"name": "blog-node", "public_key": KEY, "allowed_ips": ["100.64.1.1/32", "fd77:6777::1:1/128"],
             "latest_handshake": NOW - 75, "rx_bytes": 1536, "tx_bytes": 10, "origin": "config"},
            {"public_key": KEY2, "allowed_ips": [], "latest_handshake": null, "rx_bytes": 0, "tx_bytes": 0},
        ]);
        let t = peers_table(&v, NOW);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("NAME       KEY"), "{t}");
        assert_eq!(
            lines[1],
            format!("blog-node  {KEY}  100.64.1.1/32,fd77:6777::1:1/128  1m15s ago  1.5 KiB  10 B")
        );
        assert_eq!(
            lines[2],
            format!("-          {KEY2}  -                                 never      0 B      0 B")
        );
        // Columns line up: every cell of a column starts at the same offset.
        let off = lines[0].find("HANDSHAKE").expect("col");
        assert_eq!(lines[1].find("1m15s"), Some(off));
        assert_eq!(lines[2].find("never"), Some(off));
    }

    #[test]
    fn routes_table_renders() {
        let v = json!([
            {"id": "name:blog", "version": 3, "paused": false, "origin": "api",
             "spec": {"name": "blog", "backends": ["100.64.1.2:80", "100.64.1.3:80"]},
             "backends": [{"addr": "100.64.1.2:80", "up": true}, {"addr": "100.64.1.3:80", "up": false}]},
            {"id": "fqdn:shop.example.com", "version": 1, "paused": true, "origin": "node", "owner": KEY,
             "spec": {"fqdn": "shop.example.com", "backends": ["[fd77::2]:443"]}, "backends": []},
        ]);
        let t = routes_table(&v);
        assert_eq!(
            t,
            "ID                     VERSION  PAUSED  ORIGIN  BACKENDS\n\
             name:blog              3        no      api     100.64.1.2:80 up, 100.64.1.3:80 DOWN\n\
             fqdn:shop.example.com  1        yes     node    [fd77::2]:443\n"
        );
        assert_eq!(
            routes_table(&json!([])),
            "ID  VERSION  PAUSED  ORIGIN  BACKENDS\n"
        );
        // Backend health as the proxy names it (`backend`) renders the same.
        let v2 = json!([{"id": "name:a", "version": 1, "paused": false, "origin": "config",
                        "backends": [{"backend": "100.64.1.2:80", "up": false, "failures": 3},
                                     {"backend": "100.64.1.3:80", "up": true, "path": "/api"}]}]);
        assert!(
            routes_table(&v2).ends_with("config  100.64.1.2:80 DOWN, /api: 100.64.1.3:80 up\n"),
            "{}",
            routes_table(&v2)
        );
        let d = route_text(&v[1]);
        assert!(
            d.starts_with(
                "route: fqdn:shop.example.com\n  version: 1\n  paused: yes\n  origin: node\n"
            ),
            "{d}"
        );
        assert!(d.contains(&format!("  owner: {KEY}\n")), "{d}");
        assert!(d.contains("    fqdn = \"shop.example.com\"\n"), "{d}");
    }

    #[test]
    fn names_tokens_status_render() {
        let v = json!([{"name": "blog", "owners": [KEY, KEY2], "replicas": true, "expires": NOW + 3600,
                        "bandwidth": "20 Mbit/s"},
                       {"name": "shop.example.com", "owners": [KEY], "replicas": false}]);
        let t = names_table(&v, NOW);
        assert!(
            t.contains(&format!(
                "blog              {KEY},{KEY2}  yes       in 1h0m  20 Mbit/s"
            )),
            "{t}"
        );
        assert!(
            t.lines()
                .nth(2)
                .is_some_and(|l| l.ends_with("no        never    -")),
            "{t}"
        );
        let v = json!([
            {"host": "www.example.net", "source": "file", "not_after": NOW + 3600},
            {"host": "*.gw.test", "source": "acme", "not_after": NOW + 7200, "renew_at": NOW - 10},
            {"host": "shop.example.com", "source": "acme", "not_after": null, "error": "validation failed", "retry_at": NOW + 5},
            {"host": "new.example.com", "source": "acme", "not_after": null},
            {"host": "blog.gw.test", "source": "acme", "not_after": NOW + 60, "superseded": true}
        ]);
        let t = certs_table(&v, NOW);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].starts_with("HOST") && lines[0].ends_with("STATE"),
            "{t}"
        );
        assert!(
            lines[1].starts_with("www.example.net") && lines[1].ends_with("ok"),
            "{t}"
        );
        assert!(lines[2].contains("acme") && lines[2].ends_with("ok"), "{t}");
        assert!(lines[3].ends_with("failing: validation failed"), "{t}");
        assert!(lines[4].ends_with("not issued yet"), "{t}");
        assert!(lines[5].ends_with("superseded"), "{t}");
        // An ACME server's error with terminal escapes is printed tamed.
        let v = json!([{"host": "x.gw.test", "source": "acme", "not_after": null,
            "error": "bad\u{1b}]0;owned\u{7}\u{1b}[2J"}]);
        let t = certs_table(&v, NOW);
        assert!(!t.contains('\u{1b}') && !t.contains('\u{7}'), "{t:?}");
        assert!(t.contains("failing: bad?]0;owned??[2J"), "{t:?}");
        let v = json!([{"id": "0123456789abcdef", "names": ["blog"], "replicas": false, "created": NOW - 10, "expires": NOW - 5}]);
        assert_eq!(
            tokens_table(&v, NOW),
            "ID                NAMES  REPLICAS  BANDWIDTH  EXPIRES\n0123456789abcdef  blog   no        -          5s ago\n"
        );
        let v = json!({"interface": "gw0", "public_key": KEY, "state_version": 7, "peers": 2, "routes": [1, 2, 3]});
        assert_eq!(
            status_text(&v),
            format!("interface: gw0\npublic key: {KEY}\nstate version: 7\npeers: 2\nroutes: 3\n")
        );
        let p = json!({"public_key": KEY, "name": "n1", "allowed_ips": ["100.64.1.2/32"], "latest_handshake": NOW - 3, "rx_bytes": 5, "tx_bytes": 3 << 20});
        assert_eq!(
            peer_text(&p, NOW),
            format!("peer: {KEY} (n1)\n  allowed ips: 100.64.1.2/32\n  latest handshake: 3s ago\n  rx bytes: 5 B\n  tx bytes: 3.0 MiB\n")
        );
        let p = json!({"public_key": KEY, "origin": "join", "allowed_ips": [], "rx_bytes": 0, "tx_bytes": 0,
                       "endpoint": null, "drops": {"bad_source": 2, "unknown_peer": 0},
                       "services": [{"host": "name:blog", "status": "active"}, {"host": "fqdn:x.y", "status": "refused", "error": "taken"}]});
        assert_eq!(
            peer_text(&p, NOW),
            format!("peer: {KEY}\n  origin: join\n  allowed ips: -\n  rx bytes: 0 B\n  tx bytes: 0 B\n  services: name:blog active, fqdn:x.y refused (taken)\n  drops: bad_source=2\n")
        );
        let c = parse(&["token", "create", "--names", "blog"]).cmd;
        assert_eq!(
            render(
                &c,
                &json!({"id": "x", "token": "gwj1.abc", "expires": NOW}),
                NOW
            ),
            "gwj1.abc\n"
        );
        let c = parse(&["route", "delete", "blog"]).cmd;
        assert_eq!(render(&c, &Value::Null, NOW), "");
        assert_eq!(duration(86_400 * 2 + 3600), "2d1h");
    }

    // ------------------------------------------------ over a socket

    type Seen = Arc<parking_lot::Mutex<Vec<(String, String, Option<String>, Value)>>>;

    /// A stand-in API on a Unix socket: records every request (method, path,
    /// authorization, body) and answers with `answer`.
    fn fake_api(
        answer: fn(&str, &str, &Value) -> (u16, String),
    ) -> (PathBuf, Seen, tokio::task::JoinHandle<()>) {
        let path = temp_path("api.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let seen: Seen = Arc::default();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                serve(TokioIo::new(stream), s.clone(), answer);
            }
        });
        (path, seen, task)
    }

    fn serve<T>(io: T, seen: Seen, answer: fn(&str, &str, &Value) -> (u16, String))
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let seen = seen.clone();
            async move {
                let method = req.method().to_string();
                let path = req.uri().path().to_string();
                let auth = req
                    .headers()
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .map(String::from);
                let body = req.into_body().collect().await?.to_bytes();
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let (status, text) = answer(&method, &path, &body);
                seen.lock().push((method, path, auth, body));
                let mut resp = http::Response::new(Full::new(Bytes::from(text)));
                *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
                Ok::<_, hyper::Error>(resp)
            }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }

    fn answers(method: &str, path: &str, body: &Value) -> (u16, String) {
        match (method, path) {
            ("GET", "/v1/status") => (
                200,
                r#"{"interface":"gw0","public_key":"k","state_version":1,"peers":0,"routes":0}"#
                    .into(),
            ),
            ("GET", "/v1/routes/name:blog") => (200, current_route().to_string()),
            ("PUT", "/v1/routes/name:blog") if body["version"] == json!(4) => {
                let mut r = current_route();
                r["spec"] = body["spec"].clone();
                r["version"] = json!(5);
                (200, r.to_string())
            }
            ("PUT", "/v1/routes/name:blog") => {
                (409, r#"{"error":"route name:blog is at version 4"}"#.into())
            }
            ("DELETE", "/v1/routes/name:blog") => (204, String::new()),
            ("GET", "/metrics") => (200, "gatewire_up 1\n".repeat(2)),
            ("GET", "/v1/names") => (200, "[".to_string() + &"0,".repeat(9 << 20) + "0]"),
            _ => (404, r#"{"error":"no such thing"}"#.into()),
        }
    }

    fn cmd(line: &[&str]) -> CtlCommand {
        parse(line).cmd
    }

    #[tokio::test]
    async fn unix_socket_round_trips() {
        let (path, seen, task) = fake_api(answers);
        let t = Target::Unix(path.clone());
        let body = execute(&t, &cmd(&["status"])).await.expect("status");
        assert_eq!(parse_json(&body).expect("json")["interface"], "gw0");
        let body = execute(&t, &cmd(&["metrics"])).await.expect("metrics");
        assert_eq!(&body[..], b"gatewire_up 1\ngatewire_up 1\n");
        let body = execute(&t, &cmd(&["route", "delete", "blog"]))
            .await
            .expect("delete");
        assert!(body.is_empty());
        // Read, modify, write back with the version read.
        let body = execute(&t, &cmd(&["route", "update", "blog", "--backend", "z:9"]))
            .await
            .expect("update");
        let v = parse_json(&body).expect("json");
        assert_eq!(v["version"], 5);
        assert_eq!(v["spec"]["backends"], json!(["z:9"]));
        // A stale --version is the server's 409, exit code 2.
        let e = execute(
            &t,
            &cmd(&[
                "route",
                "update",
                "blog",
                "--tls",
                "passthrough",
                "--version",
                "3",
            ]),
        )
        .await
        .expect_err("conflict");
        assert_eq!(
            e,
            CtlError::Http {
                status: 409,
                msg: "route name:blog is at version 4".into()
            }
        );
        assert_eq!(e.exit_code(), 2);
        let e = execute(&t, &cmd(&["peer", "show", KEY]))
            .await
            .expect_err("404");
        assert_eq!(e.to_string(), "no such thing (HTTP 404)");
        // Answers beyond the limit are refused.
        let e = execute(&t, &cmd(&["names"])).await.expect_err("too large");
        assert!(
            matches!(&e, CtlError::Transport(m) if m.contains("larger than 16 MiB")),
            "{e}"
        );
        let seen = seen.lock().clone();
        let log: Vec<(&str, &str)> = seen
            .iter()
            .map(|(m, p, _, _)| (m.as_str(), p.as_str()))
            .collect();
        assert_eq!(
            log,
            [
                ("GET", "/v1/status"),
                ("GET", "/metrics"),
                ("DELETE", "/v1/routes/name:blog"),
                ("GET", "/v1/routes/name:blog"),
                ("PUT", "/v1/routes/name:blog"),
                ("GET", "/v1/routes/name:blog"),
                ("PUT", "/v1/routes/name:blog"),
                (
                    "GET",
                    "/v1/peers/xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg%3D"
                ),
                ("GET", "/v1/names"),
            ]
        );
        // No token on the socket.
        assert!(seen.iter().all(|(_, _, auth, _)| auth.is_none()));
        let mut spec = current_route()["spec"].clone();
        spec["tls"] = json!("passthrough");
        assert_eq!(seen[6].3, json!({"spec": spec, "version": 3}));
        task.abort();
        let _ = std::fs::remove_file(&path);
        let e = execute(&t, &cmd(&["status"])).await.expect_err("gone");
        assert!(
            matches!(&e, CtlError::Transport(m) if m.starts_with("cannot connect to ")),
            "{e}"
        );
        assert_eq!(e.exit_code(), 1);
    }

    #[tokio::test]
    async fn tls_with_pin_and_token() {
        let dir = temp_path("state");
        let cert = crate::control::pin::ApiCert::load_or_create(&dir, &["127.0.0.1".into()])
            .expect("api cert");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen: Seen = Arc::default();
        let s = seen.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    serve(TokioIo::new(tls), s.clone(), answers);
                }
            }
        });
        let token_file = temp_path("token");
        std::fs::write(&token_file, "s3cret\n").expect("write");
        let url = format!("https://127.0.0.1:{port}");
        let good = hex::encode(cert.fingerprint());
        let a = parse(&[
            "--url",
            &url,
            "--pin",
            &good,
            "--token-file",
            &token_file.to_string_lossy(),
            "status",
        ]);
        let t = Target::from_args(&a).expect("target");
        let body = execute(&t, &a.cmd).await.expect("status over TLS");
        assert_eq!(parse_json(&body).expect("json")["state_version"], 1);
        assert_eq!(seen.lock()[0].2.as_deref(), Some("Bearer s3cret"));
        // Another certificate is refused before any request is sent.
        let bad = hex::encode([7u8; 32]);
        let a = parse(&[
            "--url",
            &url,
            "--pin",
            &bad,
            "--token-file",
            &token_file.to_string_lossy(),
            "status",
        ]);
        let t = Target::from_args(&a).expect("target");
        let e = execute(&t, &a.cmd).await.expect_err("wrong pin");
        assert!(
            matches!(&e, CtlError::Transport(m) if m.starts_with("TLS with https://127.0.0.1:")),
            "{e}"
        );
        assert!(!e.to_string().contains("s3cret"));
        assert_eq!(seen.lock().len(), 1);
        // --url needs a pin and a token.
        let a = parse(&["--url", &url, "status"]);
        assert!(matches!(Target::from_args(&a), Err(CtlError::Usage(m)) if m.contains("--pin")));
        let a = parse(&[
            "--url",
            &url,
            "--pin",
            &good,
            "--token-file",
            "/nonexistent/token",
            "status",
        ]);
        assert!(
            matches!(Target::from_args(&a), Err(CtlError::Usage(m)) if m.contains("--token-file"))
        );
        task.abort();
        let _ = std::fs::remove_file(&token_file);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
