//! The hub's `[proxy]`, `[[route]]`, `[[tcp]]` and `[[udp]]` configuration: raw
//! serde structs (strict, unknown keys are errors) validated into [`ProxySettings`].
//!
//! The runtime ([`crate::proxy::server::Proxy::start`]) takes [`ProxySettings`] as is;
//! every safety rule on backends (no loopback, link-local, unspecified, multicast or
//! hub-own addresses) is enforced here, at load time, and against the host's live
//! interface addresses by [`check_host_addresses`] when the hub starts.

pub use crate::proxy::access::Access;
use crate::proxy::bandwidth::parse_size;
use crate::proxy::names::{DomainName, Label};
pub use crate::proxy::ratelimit::RateLimit;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    #[serde(default)]
    pub domains: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub https_listen: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_source: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_timeout: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshake_timeout: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_timeout: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_header_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_down_for: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tunnel_down_after: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acme: Option<RawAcme>,
    /// JSON-lines access log file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log: Option<PathBuf>,
    /// Load balancers whose connections start with a PROXY header.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proxy_protocol_from: Vec<String>,
    /// Proxies in front of the hub whose `X-Forwarded-*` and `Forwarded`
    /// headers are kept (appended to); from anyone else they are replaced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
    /// The gateway zones' authoritative DNS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<RawDns>,
}

/// `[proxy.dns]`: the hub answers DNS for its gateway domains.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listen: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Name server name -> its addresses (none for one outside the gateway
    /// domains).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nameservers: BTreeMap<String, Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_burst: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAcme {
    pub directory: String,
    #[serde(default)]
    pub contact: Vec<String>,
    pub state_dir: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub directory_ca: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub challenge: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renew_before_days: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wildcard: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_listen: Vec<String>,
}

/// `proxy_protocol = true | false | "v1" | "v2"` (true is v2).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawPp {
    Bool(bool),
    Version(String),
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fqdn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    pub backends: Vec<String>,
    #[serde(default)]
    pub redirect_https: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<RawPp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_ca: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_server_name: Option<String>,
    #[serde(default)]
    pub backend_insecure_skip_verify: bool,
    /// `"http1"` (default) or `"http2"` (gRPC and other HTTP/2-only backends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_protocol: Option<String>,
    #[serde(default)]
    pub acme: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance: Option<String>,
    #[serde(default)]
    pub sticky: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_interval: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_timeout: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_fall: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_rise: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Client networks admitted (most specific rule wins; see `proxy::access`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Client networks refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// Requests (TCP: connections) per second per client; with `rate_burst`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<u32>,
    /// Most requests a client may send at once (default: `rate_limit`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_burst: Option<u32>,
    /// The route's (forward's) limit in each direction, all clients together
    /// (`"20 Mbit/s"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<String>,
    /// A paused route answers 503 (HTTP) or closes (passthrough).
    #[serde(default)]
    pub paused: bool,
    /// An htpasswd file (bcrypt entries): requests need one of its users.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub basic_auth_file: Option<PathBuf>,
    /// An authentication service asked before each request
    /// (`http://<ip>:<port>/<path>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_auth: Option<String>,
    /// Headers of the service's 2xx answer put on the request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forward_auth_headers: Vec<String>,
    /// Path prefixes with backends of their own (`[[route.paths]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<RawPath>,
    /// Largest request body (`"10 MB"`); beyond it 413.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_size: Option<String>,
    /// Headers set on requests to the backends (`""` removes one).
    #[serde(default, skip_serializing_if = "HeaderTable::is_empty")]
    pub request_headers: HeaderTable,
    /// Headers set on responses to clients (`""` removes one).
    #[serde(default, skip_serializing_if = "HeaderTable::is_empty")]
    pub response_headers: HeaderTable,
}

/// A `request_headers` or `response_headers` table as written: header names
/// and values. The values may be credentials for a backend (an
/// `Authorization` the route adds), so `Debug` shows the names only.
#[derive(Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(transparent)]
pub struct HeaderTable(pub BTreeMap<String, String>);

impl HeaderTable {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::ops::Deref for HeaderTable {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<const N: usize> From<[(String, String); N]> for HeaderTable {
    fn from(a: [(String, String); N]) -> Self {
        HeaderTable(a.into())
    }
}

impl fmt::Debug for HeaderTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "<value hidden>")))
            .finish()
    }
}

/// A `[[route.paths]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPath {
    pub prefix: String,
    pub backends: Vec<String>,
    #[serde(default)]
    pub strip_prefix: bool,
    /// The path of the route's `http` health checks for these backends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTcp {
    pub listen: String,
    pub backends: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<RawPp>,
    /// With `key`: the hub terminates TLS and forwards the plain stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Terminate TLS with an ACME certificate for this name (`[proxy.acme]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acme: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance: Option<String>,
    #[serde(default)]
    pub sticky: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_interval: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_timeout: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_fall: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_rise: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Client networks admitted (most specific rule wins; see `proxy::access`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Client networks refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// Requests (TCP: connections) per second per client; with `rate_burst`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<u32>,
    /// Most requests a client may send at once (default: `rate_limit`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_burst: Option<u32>,
    /// The route's (forward's) limit in each direction, all clients together
    /// (`"20 Mbit/s"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawUdp {
    pub listen: String,
    pub backends: Vec<String>,
    /// A PROXY v2 header before every datagram to the backend (v1 has no
    /// UDP form).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<RawPp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_flows: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_flows_per_source: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow_idle_timeout: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance: Option<String>,
    #[serde(default)]
    pub sticky: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_interval: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_timeout: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_fall: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_rise: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Client networks admitted (most specific rule wins; see `proxy::access`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Client networks refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// Datagrams per second per client; with `rate_burst`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<u32>,
    /// Most datagrams a client may send at once (default: `rate_limit`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_burst: Option<u32>,
    /// The forward's limit in each direction, all clients together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<String>,
}

/// PROXY protocol header sent to backends of passthrough routes and TCP forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProxyProtocol {
    /// No header.
    #[default]
    Off,
    /// Text header (`PROXY TCP4 ...\r\n`).
    V1,
    /// Binary header.
    V2,
}

/// How a backend is chosen among the healthy ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Each in turn.
    #[default]
    RoundRobin,
    /// The one with the fewest open connections (ties: round-robin).
    LeastConn,
}

/// What an active health check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthKind {
    /// A TCP connect succeeds.
    Tcp,
    /// `GET <path>` answers 2xx or 3xx (TLS for `https://` backends).
    Http {
        /// Request path, starting with `/`.
        path: String,
    },
}

/// An active health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// The probe.
    pub kind: HealthKind,
    /// Time between probes.
    pub interval: Duration,
    /// Time one probe may take.
    pub timeout: Duration,
    /// Consecutive failures that mark a backend down.
    pub fall: u32,
    /// Consecutive successes that mark it up again.
    pub rise: u32,
    /// What a probe sends besides the check itself, so that a backend sees
    /// it as it sees the route's own traffic.
    pub send: ProbeSend,
}

/// How a health probe speaks to a backend: as the route or forward does.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProbeSend {
    /// `Host` of HTTP checks: the route's public name (a backend with
    /// virtual hosts answers the probe as it answers the route); `None`
    /// (forwards): the backend's address.
    pub host: Option<String>,
    /// The headers the route sets on its requests (`request_headers`, the
    /// values marked sensitive), sent with HTTP checks.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// A PROXY header goes first (`LOCAL` in v2, `UNKNOWN` in v1: the
    /// connection is the hub's own) where the route sends one.
    pub proxy_protocol: ProxyProtocol,
    /// HTTP checks in TLS with `host` as the server name and no
    /// verification (passthrough routes: the certificate is the node's
    /// business, the check is whether the service answers).
    pub tls_unverified: bool,
}

/// Load balancing, health checks and the connection limit of a route or forward.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Balance {
    /// Backend choice.
    pub policy: Policy,
    /// The same client address goes to the same backend while it is healthy.
    pub sticky: bool,
    /// Active health check, if any (passive checks always apply).
    pub health: Option<HealthCheck>,
    /// Most connections (HTTP: requests in flight; UDP: flows) at once;
    /// `None`: no limit.
    pub max_connections: Option<usize>,
}

/// Which ACME challenge proves control of a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeChallenge {
    /// A token under `/.well-known/acme-challenge/` on port 80.
    Http01,
    /// A validation certificate for ALPN `acme-tls/1` on port 443.
    TlsAlpn01,
}

/// Automatic certificates (`[proxy.acme]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeSettings {
    /// ACME directory URL (https).
    pub directory: String,
    /// Contact URIs (`mailto:...`).
    pub contact: Vec<String>,
    /// Account and certificates are kept here.
    pub state_dir: PathBuf,
    /// CA certificates (PEM) that verify the ACME server; default: the system bundle.
    pub directory_ca: Option<PathBuf>,
    /// The challenge type.
    pub challenge: AcmeChallenge,
    /// Renew this long before expiry.
    pub renew_before: Duration,
    /// Name routes share one certificate per gateway domain, for
    /// `*.<domain>`, ordered with DNS-01.
    pub wildcard: bool,
    /// Where the hub answers DNS queries for `_acme-challenge.<domain>` of
    /// its gateway domains (UDP and TCP), the name the operator delegates to
    /// it with an NS record.
    pub dns_listen: Vec<SocketAddr>,
}

/// How a route treats TLS on :443.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// The hub holds the certificate, terminates TLS and proxies HTTP.
    Terminate,
    /// The TLS stream is routed on SNI and spliced to the backend untouched.
    Passthrough,
}

/// Backend protocol for HTTP routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP/1.1 over TCP.
    Http,
    /// HTTP/1.1 over TLS (rustls).
    Https,
}

/// The HTTP version a terminated route speaks to its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendProtocol {
    /// HTTP/1.1: keep-alive connections, one request at a time each.
    #[default]
    Http1,
    /// HTTP/2: one multiplexed connection per backend (prior knowledge on
    /// `http://` backends, ALPN `h2` on `https://` ones); carries trailers,
    /// so gRPC works end to end.
    Http2,
}

/// One backend: a scheme and an IP literal with a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    /// `http` unless written `https://`; ignored for passthrough/tcp/udp.
    pub scheme: Scheme,
    /// Where to connect.
    pub addr: SocketAddr,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scheme {
            Scheme::Http => write!(f, "{}", self.addr),
            Scheme::Https => write!(f, "https://{}", self.addr),
        }
    }
}

/// The host a route serves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RouteHost {
    /// `label.<domain>` for every gateway domain.
    Name(Label),
    /// A custom domain, matched exactly.
    Fqdn(DomainName),
}

impl fmt::Display for RouteHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteHost::Name(l) => write!(f, "name:{l}"),
            RouteHost::Fqdn(d) => write!(f, "fqdn:{d}"),
        }
    }
}

/// PEM files of a terminated route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1). Never logged.
    pub key: PathBuf,
}

/// TLS to `https://` backends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendTls {
    /// CA certificates (PEM) that verify the backend's certificate.
    pub ca: Option<PathBuf>,
    /// Server name to send and verify; default: the backend's IP address.
    pub server_name: Option<String>,
    /// Accept any backend certificate. Only for lab setups.
    pub insecure_skip_verify: bool,
}

/// A validated HTTP/TLS route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSettings {
    /// What it serves.
    pub host: RouteHost,
    /// Terminate or pass TLS through.
    pub tls: TlsMode,
    /// Certificate for terminated HTTPS; `None`: the route serves only HTTP.
    pub cert: Option<CertFiles>,
    /// Non-empty.
    pub backends: Vec<Backend>,
    /// Answer plain HTTP with a 308 to `https://`.
    pub redirect_https: bool,
    /// PROXY header to passthrough backends.
    pub proxy_protocol: ProxyProtocol,
    /// TLS settings for `https://` backends.
    pub backend_tls: BackendTls,
    /// HTTP/1.1 or HTTP/2 to the backends.
    pub backend_protocol: BackendProtocol,
    /// Load balancing, health checks, connection limit.
    pub balance: Balance,
    /// The certificate comes from ACME (`[proxy.acme]`).
    pub acme: bool,
    /// Answer 503 (HTTP) or close (passthrough) instead of proxying.
    pub paused: bool,
    /// Which client addresses may use the route (403, or a TLS alert on passthrough).
    pub access: Access,
    /// Requests (passthrough: connections) per second per client.
    pub rate_limit: Option<RateLimit>,
    /// Bytes per second in each direction, all the route's clients together.
    pub bandwidth: Option<u64>,
    /// An htpasswd file: terminated requests need one of its users (401
    /// otherwise). Read when the proxy starts or reloads.
    pub basic_auth_file: Option<PathBuf>,
    /// An authentication service asked before each terminated request, and
    /// the headers of its 2xx answers put on the request.
    pub forward_auth: Option<(crate::proxy::forward_auth::AuthUrl, Vec<http::HeaderName>)>,
    /// Terminated routes: path prefixes whose requests go to backends of
    /// their own (the longest matching prefix wins; `backends` takes the
    /// rest).
    pub paths: Vec<PathRoute>,
    /// Terminated routes: the largest request body in bytes (413 beyond).
    pub max_body_size: Option<u64>,
    /// Terminated routes: headers set (`Some`) or removed (`None`) on each
    /// request to a backend.
    pub request_headers: HeaderEdits,
    /// Terminated routes: headers set or removed on each backend response.
    pub response_headers: HeaderEdits,
}

/// Headers a route sets (a value) or removes (`None`), in name order.
pub type HeaderEdits = Vec<(http::HeaderName, Option<http::HeaderValue>)>;

/// Most headers one `request_headers` or `response_headers` table may name.
pub const MAX_HEADER_EDITS: usize = 32;

/// Validates a `request_headers`/`response_headers` table: names that would
/// break the message's framing or the hop's own headers are refused, and on
/// requests the headers that carry the client (the hub sets them).
fn header_edits(
    who: &str,
    key: &str,
    raw: BTreeMap<String, String>,
    request: bool,
) -> Result<HeaderEdits, String> {
    if raw.len() > MAX_HEADER_EDITS {
        return Err(format!(
            "{who}: {key}: more than {MAX_HEADER_EDITS} headers"
        ));
    }
    let mut out: HeaderEdits = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        let n = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            format!(
                "{who}: {key}: `{}` is not a header name",
                name.escape_default()
            )
        })?;
        let framing = [
            "connection",
            "content-length",
            "transfer-encoding",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "upgrade",
        ];
        let client = [
            "host",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "forwarded",
        ];
        if framing.contains(&n.as_str()) || (request && client.contains(&n.as_str())) {
            return Err(format!(
                "{who}: {key}: `{n}` is the hub's to set (it frames the message or names the client)"
            ));
        }
        if out.iter().any(|(o, _)| *o == n) {
            return Err(format!(
                "{who}: {key}: `{n}` is given twice (names are case-insensitive)"
            ));
        }
        // HTTP/2 refuses values with surrounding whitespace.
        let value = value.trim_matches([' ', '\t']);
        let v = if value.is_empty() {
            None
        } else {
            let mut v = http::HeaderValue::from_str(value).map_err(|_| {
                format!("{who}: {key}: the value of `{n}` holds a character a header may not have")
            })?;
            // It may be a credential for the backend: kept out of `Debug`
            // output (and out of HTTP/2 header compression tables).
            v.set_sensitive(true);
            Some(v)
        };
        out.push((n, v));
    }
    Ok(out)
}

/// Requests of a terminated route under one path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRoute {
    /// Which paths.
    pub prefix: crate::proxy::paths::PathPrefix,
    /// Non-empty; balanced, checked and limited as the route's own.
    pub backends: Vec<Backend>,
    /// Send the path without the prefix (`/api/v1` → `/v1`).
    pub strip_prefix: bool,
    /// The route's balancing, with the prefix's own `health_path` if given.
    pub balance: Balance,
}

/// Where a TLS-terminating TCP forward gets its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpTls {
    /// PEM files (`cert`, `key`).
    Files(CertFiles),
    /// An ACME certificate for this name (`acme = "db.example.org"`), obtained
    /// and renewed like the routes' (`[proxy.acme]`).
    Acme(DomainName),
}

/// A raw TCP port forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpForwardSettings {
    /// Public address.
    pub listen: SocketAddr,
    /// Non-empty.
    pub backends: Vec<Backend>,
    /// PROXY header before the client's bytes.
    pub proxy_protocol: ProxyProtocol,
    /// Load balancing, health checks, connection limit.
    pub balance: Balance,
    /// The hub terminates TLS with this certificate and forwards the
    /// decrypted stream; `None`: bytes are forwarded as they come.
    pub tls: Option<TcpTls>,
    /// Which client addresses may connect (others are closed at once).
    pub access: Access,
    /// Connections per second per client.
    pub rate_limit: Option<RateLimit>,
    /// Bytes per second in each direction, all clients together.
    pub bandwidth: Option<u64>,
}

/// A raw UDP port forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpForwardSettings {
    /// Public address.
    pub listen: SocketAddr,
    /// Non-empty.
    pub backends: Vec<Backend>,
    /// Flow table bound; the least recently active flow is evicted beyond it.
    pub max_flows: usize,
    /// Flows of one client (an IPv4 address, an IPv6 /56) at once: beyond
    /// it, its own flow quiet longest goes for its new one.
    pub max_flows_per_source: usize,
    /// A flow with no packet in either direction for this long is dropped.
    pub flow_idle_timeout: Duration,
    /// Load balancing (no active health checks for UDP).
    pub balance: Balance,
    /// Which client addresses may send (datagrams of others are dropped).
    pub access: Access,
    /// Datagrams per second per client (beyond it they are dropped).
    pub rate_limit: Option<RateLimit>,
    /// Bytes per second in each direction, all clients together (datagrams
    /// beyond it are dropped).
    pub bandwidth: Option<u64>,
    /// `Off` or `V2`: each datagram to the backend starts with a PROXY v2
    /// header naming the client.
    pub proxy_protocol: ProxyProtocol,
}

/// Timeouts and sizes.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Concurrent client connections over all listeners.
    pub max_connections: usize,
    /// Concurrent client connections from one address (IPv6: one /56),
    /// other than a trusted proxy's, a balancer's or another hub's.
    pub max_connections_per_source: usize,
    /// Time to read a request head (slowloris guard), and idle keep-alive time.
    pub header_timeout: Duration,
    /// Time to receive a complete ClientHello and finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Spliced connections (passthrough, tcp, upgrades) idle for this long
    /// are closed; also the longest silence inside an HTTP body, and the
    /// longest an HTTP client may take nothing of what it is sent.
    pub idle_timeout: Duration,
    /// TCP (and TLS) connect to one backend.
    pub connect_timeout: Duration,
    /// Time for a backend to send its response head.
    pub response_timeout: Duration,
    /// Largest request head accepted (HTTP/1 buffer, HTTP/2 header list).
    pub max_header_bytes: usize,
    /// How long a backend that refused a connection is skipped.
    pub backend_down_for: Duration,
    /// A backend inside a node's allowed IPs counts as down when nothing was
    /// received from that node for this long (or never).
    pub tunnel_down_after: Duration,
}

/// The default `max_flows_per_source` of a UDP forward for `max_flows`: a
/// sixteenth, at least 64 (all of them below 64).
pub fn default_flows_per_source(max_flows: usize) -> usize {
    (max_flows / 16).max(64).min(max_flows)
}

/// The default `max_connections_per_source` for `max_connections`: a
/// sixteenth of it (256 of the default 4096), so that it takes sixteen
/// clients to fill every slot, but at least 64 (or all of them, when fewer):
/// a NAT of browsers opening six HTTP/1.1 connections a host each still gets
/// in.
pub fn default_per_source(max_connections: usize) -> usize {
    (max_connections / 16).max(64).min(max_connections)
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            max_connections_per_source: default_per_source(4096),
            header_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(60),
            max_header_bytes: 16 * 1024,
            backend_down_for: Duration::from_secs(5),
            tunnel_down_after: Duration::from_secs(40),
        }
    }
}

/// Everything the proxy needs to run.
#[derive(Debug, Clone, Default)]
pub struct ProxySettings {
    /// Gateway domains for name routes.
    pub domains: Vec<DomainName>,
    /// Plain HTTP listeners.
    pub http_listen: Vec<SocketAddr>,
    /// TLS listeners (SNI routing).
    pub https_listen: Vec<SocketAddr>,
    /// HTTP/TLS routes.
    pub routes: Vec<RouteSettings>,
    /// TCP forwards.
    pub tcp: Vec<TcpForwardSettings>,
    /// UDP forwards.
    pub udp: Vec<UdpForwardSettings>,
    /// Limits.
    pub limits: Limits,
    /// Automatic certificates, if configured.
    pub acme: Option<AcmeSettings>,
    /// Access log file (one JSON object per request or connection).
    pub access_log: Option<PathBuf>,
    /// Addresses of load balancers in front of the hub whose TCP connections
    /// start with a PROXY header (v1 or v2) naming the real client; `None`:
    /// no connection is read that way.
    pub proxy_protocol_from: Option<Access>,
    /// Clients (proxies in front of the hub) whose `X-Forwarded-*` and
    /// `Forwarded` headers the hub keeps and appends to; `None`: no one's.
    pub trusted_proxies: Option<Access>,
    /// The gateway zones' authoritative DNS (`[proxy.dns]`), if configured.
    pub dns: Option<DnsSettings>,
}

/// `[proxy.dns]`: the hub is a name server of its gateway domains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Where it answers (UDP and TCP), besides `[proxy.acme] dns_listen`.
    pub listen: Vec<SocketAddr>,
    /// The hub's public addresses: the A and AAAA records of the names it serves.
    pub addresses: Vec<IpAddr>,
    /// The zones' name servers (NS records at each gateway domain), with
    /// the addresses of those inside a gateway domain.
    pub nameservers: Vec<(DomainName, Vec<IpAddr>)>,
    /// TTL of the A, AAAA and NS records, seconds.
    pub ttl: u32,
    /// UDP queries per second per client network (an IPv4 /24, an IPv6 /56:
    /// `dns_server::rate_key`) answered in full on every DNS listener; over
    /// it every other reply is truncated, the rest dropped.
    /// [`DNS_RATE_DEFAULT`] unless set; `None`: off (`rate_limit = 0`).
    pub rate_limit: Option<RateLimit>,
}

/// The UDP rate of the DNS listeners unless `[proxy.dns] rate_limit` says
/// otherwise: room for a busy resolver, little for a reflection.
pub const DNS_RATE_DEFAULT: RateLimit = RateLimit {
    per_second: 20,
    burst: 50,
};

/// Default TTL of the records `[proxy.dns]` serves, seconds: a minute, so a
/// hub taken out of a zone's name servers stops being named soon.
pub const DNS_TTL_DEFAULT: u64 = 60;

impl DnsSettings {
    /// Every DNS listener of `proxy`: `[proxy.dns] listen`, then
    /// `[proxy.acme] dns_listen`.
    pub fn listeners(proxy: &ProxySettings) -> Vec<SocketAddr> {
        proxy
            .dns
            .iter()
            .flat_map(|d| d.listen.iter().copied())
            .chain(proxy.acme.iter().flat_map(|a| a.dns_listen.iter().copied()))
            .collect()
    }

    /// The UDP rate of every DNS listener of `proxy`: `[proxy.dns]
    /// rate_limit`, [`DNS_RATE_DEFAULT`] without `[proxy.dns]` (the
    /// `[proxy.acme] dns_listen` ones alone); `None`: off.
    pub fn rate(proxy: &ProxySettings) -> Option<RateLimit> {
        proxy
            .dns
            .as_ref()
            .map_or(Some(DNS_RATE_DEFAULT), |d| d.rate_limit)
    }
}

/// `[proxy.dns] rate_limit` and `rate_burst`: [`DNS_RATE_DEFAULT`] (its
/// burst with a `rate_burst` alone) unless set, off with `rate_limit = 0`.
fn dns_rate_limit(rate: Option<u32>, burst: Option<u32>) -> Result<Option<RateLimit>, String> {
    match (rate, burst) {
        (Some(0), None) => Ok(None),
        (Some(0), Some(_)) => {
            Err("[proxy.dns]: rate_burst with rate_limit = 0 (no limit): leave one out".into())
        }
        (None, None) => Ok(Some(DNS_RATE_DEFAULT)),
        (None, b) => rate_limit("[proxy.dns]", Some(DNS_RATE_DEFAULT.per_second), b),
        (r, b) => rate_limit("[proxy.dns]", r, b),
    }
}

/// Addresses per name `[proxy.dns]` publishes at most (replies stay small).
pub const DNS_MAX_ADDRESSES: usize = 8;
/// Name servers `[proxy.dns]` lists at most.
pub const DNS_MAX_NAMESERVERS: usize = 13;

/// Addresses to publish in DNS: IP literals that can be reached from the
/// internet (no unspecified, loopback, multicast, broadcast or link-local
/// address), each once, at most [`DNS_MAX_ADDRESSES`].
fn public_addrs(who: &str, v: &[String]) -> Result<Vec<IpAddr>, String> {
    if v.len() > DNS_MAX_ADDRESSES {
        return Err(format!("{who}: at most {DNS_MAX_ADDRESSES} addresses"));
    }
    let mut out: Vec<IpAddr> = Vec::new();
    for s in v {
        let a: IpAddr = s
            .trim()
            .parse()
            .map_err(|_| format!("{who}: `{s}` is not an IP address"))?;
        let a = a.to_canonical();
        if let Some(why) = forbidden_reason(a) {
            return Err(format!(
                "{who}: `{s}` cannot be reached from the internet ({why})"
            ));
        }
        if out.contains(&a) {
            return Err(format!("{who}: `{s}` is listed twice"));
        }
        out.push(a);
    }
    Ok(out)
}

fn dns_settings(
    raw: RawDns,
    domains: &[DomainName],
    acme: Option<&AcmeSettings>,
) -> Result<DnsSettings, String> {
    if domains.is_empty() {
        return Err("[proxy.dns] needs at least one gateway domain in [proxy] domains".into());
    }
    let listen = parse_addrs("[proxy.dns] listen", raw.listen)?;
    let acme_listen = acme.map(|a| a.dns_listen.as_slice()).unwrap_or_default();
    if let Some(a) = listen.iter().find(|a| acme_listen.contains(a)) {
        return Err(format!(
            "[proxy.dns] listen `{a}` is also in [proxy.acme] dns_listen: list it once"
        ));
    }
    if listen.is_empty() && acme_listen.is_empty() {
        return Err(
            "[proxy.dns] needs listen: the addresses (ip:port, usually port 53) where this hub answers DNS queries"
                .into(),
        );
    }
    if raw.addresses.is_empty() {
        return Err("[proxy.dns] needs addresses: this hub's public IP addresses, the A and AAAA records of the names it serves".into());
    }
    let addresses = public_addrs("[proxy.dns] addresses", &raw.addresses)?;
    if raw.nameservers.is_empty() {
        return Err("[proxy.dns] needs nameservers: the zone's name servers (the NS records at each gateway domain), e.g. `[proxy.dns.nameservers]` with `\"ns1.gw.example.org\" = [\"203.0.113.10\"]`".into());
    }
    if raw.nameservers.len() > DNS_MAX_NAMESERVERS {
        return Err(format!(
            "[proxy.dns] nameservers: at most {DNS_MAX_NAMESERVERS}"
        ));
    }
    let mut nameservers = Vec::new();
    for (name, addrs) in &raw.nameservers {
        let who = format!("[proxy.dns] nameservers `{name}`");
        let n = DomainName::parse(name).map_err(|e| format!("{who}: {}", e.as_str()))?;
        if nameservers.iter().any(|(m, _)| *m == n) {
            return Err(format!("{who}: listed twice"));
        }
        if !n.as_str().contains('.') {
            return Err(format!("{who}: a name server needs a full domain name"));
        }
        if domains.contains(&n) {
            return Err(format!(
                "{who}: a gateway domain itself cannot be a name server's name (use `ns1.{name}`)"
            ));
        }
        let addrs = public_addrs(&who, addrs)?;
        let inside = domains.iter().any(|d| n.is_within(d));
        if inside && addrs.is_empty() {
            return Err(format!("{who}: inside a gateway domain, so this hub answers for it: give its addresses (`\"{name}\" = [\"203.0.113.10\"]`)"));
        }
        if !inside && !addrs.is_empty() {
            return Err(format!("{who}: outside the gateway domains, its addresses are not this hub's to answer: give none (`\"{name}\" = []`)"));
        }
        nameservers.push((n, addrs));
    }
    let ttl = raw.ttl.unwrap_or(DNS_TTL_DEFAULT);
    if ttl > 86_400 {
        return Err("[proxy.dns] ttl: 0 to 86400 seconds".into());
    }
    Ok(DnsSettings {
        rate_limit: dns_rate_limit(raw.rate_limit, raw.rate_burst)?,
        listen,
        addresses,
        nameservers,
        // (At most 86400.)
        ttl: u32::try_from(ttl).unwrap_or(u32::MAX),
    })
}

impl ProxySettings {
    /// Every backend with a description of who uses it.
    pub fn all_backends(&self) -> Vec<(String, Backend)> {
        let mut v = Vec::new();
        for r in &self.routes {
            v.extend(
                r.backends
                    .iter()
                    .map(|b| (format!("[[route]] {}", r.host), *b)),
            );
            for p in &r.paths {
                v.extend(
                    p.backends
                        .iter()
                        .map(|b| (format!("[[route]] {} path {}", r.host, p.prefix), *b)),
                );
            }
        }
        for t in &self.tcp {
            v.extend(
                t.backends
                    .iter()
                    .map(|b| (format!("[[tcp]] {}", t.listen), *b)),
            );
        }
        for u in &self.udp {
            v.extend(
                u.backends
                    .iter()
                    .map(|b| (format!("[[udp]] {}", u.listen), *b)),
            );
        }
        v
    }

    /// Refuses backends that are an address configured on this host (loops into
    /// the hub itself). `host` is the host's interface addresses.
    pub fn check_against(&self, host: &[IpAddr]) -> Result<(), String> {
        let own: HashSet<IpAddr> = host.iter().map(|ip| ip.to_canonical()).collect();
        for (who, b) in self.all_backends() {
            if own.contains(&b.addr.ip().to_canonical()) {
                return Err(format!(
                    "{who}: backend `{b}` is an address of this host (the hub itself)"
                ));
            }
        }
        Ok(())
    }
}

/// Checks every backend against the addresses configured on the host right now.
pub fn check_host_addresses(settings: &ProxySettings) -> Result<(), String> {
    let addrs: Vec<IpAddr> = match getifaddrs::getifaddrs() {
        Ok(it) => it.filter_map(|i| i.address.ip_addr()).collect(),
        Err(e) => return Err(format!("cannot list the host's addresses: {e}")),
    };
    settings.check_against(&addrs)
}

/// Why an address may never be a backend, if it may not.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_unspecified() || v4.octets()[0] == 0 {
                Some("unspecified")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.is_multicast() {
                Some("multicast")
            } else if v4.is_broadcast() {
                Some("broadcast")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.segments()[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

/// A time in whole seconds, 1 to 86400; errors name `what` (`[section] key`,
/// or an entry's label and the key).
fn secs(what: &str, v: Option<u64>, default: Duration) -> Result<Duration, String> {
    match v {
        None => Ok(default),
        Some(0) => Err(format!("{what}: must be at least 1 second")),
        Some(s) if s > 86_400 => Err(format!("{what}: at most 86400 seconds")),
        Some(s) => Ok(Duration::from_secs(s)),
    }
}

fn listen_addrs(what: &str, v: Option<Vec<String>>, port: u16) -> Result<Vec<SocketAddr>, String> {
    let v = v.unwrap_or_else(|| vec![format!("0.0.0.0:{port}"), format!("[::]:{port}")]);
    parse_addrs(&format!("[proxy] {what}"), v)
}

/// `ip:port` addresses, each once; errors name `what` (`[section] key`).
fn parse_addrs(what: &str, v: Vec<String>) -> Result<Vec<SocketAddr>, String> {
    let mut out = Vec::new();
    for s in v {
        let a: SocketAddr = s
            .parse()
            .map_err(|_| format!("{what}: `{s}` is not ip:port (IPv6 in brackets)"))?;
        if out.contains(&a) {
            return Err(format!("{what}: `{s}` is listed twice"));
        }
        out.push(a);
    }
    Ok(out)
}

/// Parses a backend. `schemes_ok`: HTTP routes accept `http://`/`https://`.
fn backend(who: &str, s: &str, schemes_ok: bool) -> Result<Backend, String> {
    let t = s.trim();
    let (scheme, rest, default_port) = if let Some(r) = t.strip_prefix("http://") {
        (Scheme::Http, r, Some(80))
    } else if let Some(r) = t.strip_prefix("https://") {
        (Scheme::Https, r, Some(443))
    } else if t.contains("://") {
        return Err(format!(
            "{who}: backend `{s}`: unknown scheme (use http:// or https://, or plain ip:port)"
        ));
    } else {
        (Scheme::Http, t, None)
    };
    if default_port.is_some() && !schemes_ok {
        return Err(format!(
            "{who}: backend `{s}`: a scheme is only allowed on terminated HTTP routes; write ip:port"
        ));
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') {
        return Err(format!("{who}: backend `{s}`: a path is not allowed"));
    }
    let addr = match rest.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            let ip = rest
                .strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .unwrap_or(rest);
            match (ip.parse::<IpAddr>(), default_port) {
                (Ok(ip), Some(p)) if !rest.contains(':') || rest.starts_with('[') => {
                    SocketAddr::new(ip, p)
                }
                _ => {
                    return Err(format!(
                        "{who}: backend `{s}`: expected an IP literal and a port, as \
                         `100.64.0.2:80` or `[fd77:6777::2]:8080` (host names are not allowed)"
                    ))
                }
            }
        }
    };
    if addr.port() == 0 {
        return Err(format!("{who}: backend `{s}`: port 0"));
    }
    if let Some(why) = forbidden_reason(addr.ip()) {
        return Err(format!(
            "{who}: backend `{s}`: {why} addresses are not allowed as backends"
        ));
    }
    Ok(Backend { scheme, addr })
}

fn backends(
    who: &str,
    v: &[String],
    schemes_ok: bool,
    own: &HashSet<IpAddr>,
) -> Result<Vec<Backend>, String> {
    if v.is_empty() {
        return Err(format!("{who}: `backends` must list at least one backend"));
    }
    let mut out: Vec<Backend> = Vec::new();
    for s in v {
        let b = backend(who, s, schemes_ok)?;
        if own.contains(&b.addr.ip().to_canonical()) {
            return Err(format!(
                "{who}: backend `{s}` is one of the hub's own addresses"
            ));
        }
        if out.iter().any(|o| o.addr == b.addr) {
            return Err(format!("{who}: backend `{s}` is listed twice"));
        }
        out.push(b);
    }
    Ok(out)
}

/// Checks a `health_path`.
fn health_path(who: &str, path: String) -> Result<String, String> {
    if !path.starts_with('/')
        || path.len() > 1024
        || path.bytes().any(|b| !(0x21..0x7f).contains(&b))
    {
        return Err(format!(
            "{who}: health_path `{path}`: expected a path starting with `/`, printable ASCII without spaces"
        ));
    }
    Ok(path)
}

/// Validates a route's `[[route.paths]]`; `bal` is the route's balancing.
fn route_paths(
    who: &str,
    raw: Vec<RawPath>,
    passthrough: bool,
    own: &HashSet<IpAddr>,
    bal: &Balance,
) -> Result<Vec<PathRoute>, String> {
    use crate::proxy::paths::{PathPrefix, MAX_PATHS};
    if raw.is_empty() {
        return Ok(Vec::new());
    }
    if passthrough {
        return Err(format!(
            "{who}: `paths` need tls = \"terminate\" (a passthrough route never sees the request)"
        ));
    }
    if raw.len() > MAX_PATHS {
        return Err(format!("{who}: more than {MAX_PATHS} `paths`"));
    }
    let mut out: Vec<PathRoute> = Vec::with_capacity(raw.len());
    for p in raw {
        let prefix = PathPrefix::parse(&p.prefix).map_err(|e| format!("{who}: paths: {e}"))?;
        if out.iter().any(|o| o.prefix == prefix) {
            return Err(format!(
                "{who}: paths: prefix `{}` is listed twice",
                p.prefix
            ));
        }
        let at = format!("{who} path {prefix}");
        let backends = backends(&at, &p.backends, true, own)?;
        let mut balance = bal.clone();
        if let Some(hp) = p.health_path {
            match balance.health.as_mut().map(|h| &mut h.kind) {
                Some(HealthKind::Http { path }) => *path = health_path(&at, hp)?,
                _ => {
                    return Err(format!(
                        "{at}: health_path needs the route's health_check = \"http\""
                    ))
                }
            }
        }
        out.push(PathRoute {
            prefix,
            backends,
            strip_prefix: p.strip_prefix,
            balance,
        });
    }
    Ok(out)
}

fn proxy_protocol(who: &str, v: Option<RawPp>) -> Result<ProxyProtocol, String> {
    match v {
        None | Some(RawPp::Bool(false)) => Ok(ProxyProtocol::Off),
        Some(RawPp::Bool(true)) => Ok(ProxyProtocol::V2),
        Some(RawPp::Version(s)) => match s.to_ascii_lowercase().as_str() {
            "v1" | "1" => Ok(ProxyProtocol::V1),
            "v2" | "2" => Ok(ProxyProtocol::V2),
            "off" | "none" => Ok(ProxyProtocol::Off),
            _ => Err(format!(
                "{who}: proxy_protocol = `{s}`: expected true, false, \"v1\" or \"v2\""
            )),
        },
    }
}

/// The load-balancing keys, as written in any of `[[route]]`, `[[tcp]]`, `[[udp]]`.
struct RawBal {
    balance: Option<String>,
    sticky: bool,
    health_check: Option<String>,
    health_path: Option<String>,
    health_interval: Option<u64>,
    health_timeout: Option<u64>,
    health_fall: Option<u32>,
    health_rise: Option<u32>,
    max_connections: Option<usize>,
}

macro_rules! raw_bal {
    ($r:expr) => {
        RawBal {
            balance: $r.balance,
            sticky: $r.sticky,
            health_check: $r.health_check,
            health_path: $r.health_path,
            health_interval: $r.health_interval,
            health_timeout: $r.health_timeout,
            health_fall: $r.health_fall,
            health_rise: $r.health_rise,
            max_connections: $r.max_connections,
        }
    };
}

fn balance(who: &str, r: RawBal, udp: bool) -> Result<Balance, String> {
    let policy = match r.balance.as_deref() {
        None | Some("round_robin") => Policy::RoundRobin,
        Some("least_conn") => Policy::LeastConn,
        Some(o) => {
            return Err(format!(
                "{who}: balance = `{o}`: expected `round_robin` or `least_conn`"
            ))
        }
    };
    let per = |what: &str, v: Option<u64>, d: u64| -> Result<Duration, String> {
        secs(&format!("{who}: {what}"), v, Duration::from_secs(d))
    };
    let health = match r.health_check.as_deref() {
        None | Some("none") => {
            if r.health_path.is_some()
                || r.health_interval.is_some()
                || r.health_timeout.is_some()
                || r.health_fall.is_some()
                || r.health_rise.is_some()
            {
                return Err(format!(
                    "{who}: health_path/interval/timeout/fall/rise need health_check = \"tcp\" or \"http\""
                ));
            }
            None
        }
        Some(k) if udp => {
            return Err(format!(
                "{who}: health_check = `{k}`: UDP forwards have no active health checks"
            ))
        }
        Some(k) => {
            let kind = match k {
                "tcp" => {
                    if r.health_path.is_some() {
                        return Err(format!("{who}: health_path needs health_check = \"http\""));
                    }
                    HealthKind::Tcp
                }
                "http" => HealthKind::Http {
                    path: health_path(who, r.health_path.unwrap_or_else(|| "/".into()))?,
                },
                o => {
                    return Err(format!(
                        "{who}: health_check = `{o}`: expected `tcp`, `http` or `none`"
                    ))
                }
            };
            let fall = r.health_fall.unwrap_or(2);
            let rise = r.health_rise.unwrap_or(1);
            if !(1..=100).contains(&fall) || !(1..=100).contains(&rise) {
                return Err(format!("{who}: health_fall and health_rise: 1 to 100"));
            }
            Some(HealthCheck {
                kind,
                interval: per("health_interval", r.health_interval, 2)?,
                timeout: per("health_timeout", r.health_timeout, 1)?,
                fall,
                rise,
                send: ProbeSend::default(),
            })
        }
    };
    if let Some(m) = r.max_connections {
        if !(1..=1_000_000).contains(&m) {
            return Err(format!("{who}: max_connections: must be 1 to 1000000"));
        }
    }
    Ok(Balance {
        policy,
        sticky: r.sticky,
        health,
        max_connections: r.max_connections,
    })
}

fn bandwidth(who: &str, b: Option<&str>) -> Result<Option<u64>, String> {
    b.map(|b| crate::proxy::bandwidth::parse_rate(b).map_err(|e| format!("{who}: bandwidth {e}")))
        .transpose()
}

fn rate_limit(
    who: &str,
    rate: Option<u32>,
    burst: Option<u32>,
) -> Result<Option<RateLimit>, String> {
    match (rate, burst) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(format!("{who}: rate_burst needs rate_limit")),
        (Some(r), b) => {
            let burst = b.unwrap_or(r);
            if !(1..=1_000_000).contains(&r) || !(1..=1_000_000).contains(&burst) {
                return Err(format!("{who}: rate_limit and rate_burst: 1 to 1000000"));
            }
            Ok(Some(RateLimit {
                per_second: r,
                burst,
            }))
        }
    }
}

fn access(who: &str, allow: &[String], deny: &[String]) -> Result<Access, String> {
    Access::parse(allow, deny).map_err(|e| format!("{who}: {e}"))
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_relative() {
        base.join(p)
    } else {
        p.to_path_buf()
    }
}

/// Checks `[proxy.acme]` as the file has it, once at load (not for each
/// route of the control plane): the CA certificates that check the ACME
/// server's can be read; and, without a `[mesh]` (`mesh`) whose hubs
/// answer too, `challenge` has a listener when some name would need it
/// (any name without `wildcard`, else one outside the gateway domains'
/// wildcards).
pub fn check_acme(settings: &ProxySettings, mesh: bool) -> Result<(), String> {
    let Some(a) = &settings.acme else {
        return Ok(());
    };
    crate::proxy::acme::acme_roots(a.directory_ca.as_deref())?;
    if mesh {
        return Ok(());
    }
    let (name, key, empty) = match a.challenge {
        AcmeChallenge::Http01 => ("http-01", "http_listen", settings.http_listen.is_empty()),
        AcmeChallenge::TlsAlpn01 => (
            "tls-alpn-01",
            "https_listen",
            settings.https_listen.is_empty(),
        ),
    };
    let needed = !a.wildcard
        || crate::proxy::server::acme_hosts(settings)
            .iter()
            .any(|h| !h.starts_with("*."));
    if empty && needed {
        return Err(format!(
            "[proxy.acme] challenge = `{name}` needs [proxy] {key}: with it empty (and no [mesh] \
             whose hubs answer), no order can be validated"
        ));
    }
    Ok(())
}

/// Validates the proxy sections of a hub file. `hub_addrs` are the `[hub]`
/// addresses; `base` resolves relative file names. Returns `None` when the file
/// has neither a `[proxy]` section nor any route or forward.
pub(crate) fn validate(
    proxy: Option<RawProxy>,
    routes: Vec<RawRoute>,
    tcp: Vec<RawTcp>,
    udp: Vec<RawUdp>,
    hub_addrs: &[IpNet],
    base: &Path,
) -> Result<Option<ProxySettings>, String> {
    if proxy.is_none() && routes.is_empty() && tcp.is_empty() && udp.is_empty() {
        return Ok(None);
    }
    let raw = proxy.unwrap_or_default();
    let d = Limits::default();
    let max_header_bytes = raw.max_header_bytes.unwrap_or(d.max_header_bytes);
    if !(1024..=1024 * 1024).contains(&max_header_bytes) {
        return Err("[proxy] max_header_bytes: must be 1024 to 1048576".into());
    }
    let max_connections = raw.max_connections.unwrap_or(d.max_connections);
    if !(1..=1_000_000).contains(&max_connections) {
        return Err("[proxy] max_connections: must be 1 to 1000000".into());
    }
    let max_connections_per_source = raw
        .max_connections_per_source
        .unwrap_or_else(|| default_per_source(max_connections));
    if !(1..=1_000_000).contains(&max_connections_per_source) {
        return Err("[proxy] max_connections_per_source: must be 1 to 1000000".into());
    }
    let limits = Limits {
        max_connections,
        max_connections_per_source,
        header_timeout: secs(
            "[proxy] header_timeout",
            raw.header_timeout,
            d.header_timeout,
        )?,
        handshake_timeout: secs(
            "[proxy] handshake_timeout",
            raw.handshake_timeout,
            d.handshake_timeout,
        )?,
        idle_timeout: secs("[proxy] idle_timeout", raw.idle_timeout, d.idle_timeout)?,
        connect_timeout: secs(
            "[proxy] connect_timeout",
            raw.connect_timeout,
            d.connect_timeout,
        )?,
        response_timeout: secs(
            "[proxy] response_timeout",
            raw.response_timeout,
            d.response_timeout,
        )?,
        max_header_bytes,
        backend_down_for: secs(
            "[proxy] backend_down_for",
            raw.backend_down_for,
            d.backend_down_for,
        )?,
        tunnel_down_after: secs(
            "[proxy] tunnel_down_after",
            raw.tunnel_down_after,
            d.tunnel_down_after,
        )?,
    };
    let mut domains: Vec<DomainName> = Vec::new();
    for s in &raw.domains {
        let dn = DomainName::parse(s).map_err(|e| format!("[proxy] domains: `{s}`: {e}"))?;
        if domains.contains(&dn) {
            return Err(format!("[proxy] domains: `{s}` is listed twice"));
        }
        domains.push(dn);
    }
    let acme = match raw.acme {
        None => None,
        Some(a) => {
            if !a.directory.starts_with("https://") {
                return Err(format!(
                    "[proxy.acme] directory `{}`: must be an https:// URL",
                    a.directory
                ));
            }
            let challenge = match a.challenge.as_deref() {
                None | Some("http-01") => AcmeChallenge::Http01,
                Some("tls-alpn-01") => AcmeChallenge::TlsAlpn01,
                Some(o) => {
                    return Err(format!(
                        "[proxy.acme] challenge = `{o}`: expected `http-01` or `tls-alpn-01`"
                    ))
                }
            };
            let days = a.renew_before_days.unwrap_or(30);
            if !(1..=365).contains(&days) {
                return Err("[proxy.acme] renew_before_days: 1 to 365".into());
            }
            let dns_listen = parse_addrs("[proxy.acme] dns_listen", a.dns_listen)?;
            let zone_listen = raw.dns.as_ref().is_some_and(|d| !d.listen.is_empty());
            if a.wildcard && dns_listen.is_empty() && !zone_listen {
                return Err("[proxy.acme] wildcard = true needs dns_listen: the addresses where this hub answers `_acme-challenge.<domain>` (delegated to it with an NS record) for DNS-01".into());
            }
            if a.wildcard && domains.is_empty() {
                return Err(
                    "[proxy.acme] wildcard = true needs at least one gateway domain in [proxy] domains"
                        .into(),
                );
            }
            Some(AcmeSettings {
                directory: a.directory,
                contact: a.contact,
                state_dir: resolve(base, &a.state_dir),
                directory_ca: a.directory_ca.map(|p| resolve(base, &p)),
                challenge,
                renew_before: Duration::from_secs(days * 86_400),
                wildcard: a.wildcard,
                dns_listen,
            })
        }
    };
    // A `[proxy]` list of networks; empty: `None`.
    let networks = |key: &str, list: &[String]| -> Result<Option<Access>, String> {
        if list.is_empty() {
            return Ok(None);
        }
        Access::parse(list, &[])
            .map(Some)
            .map_err(|e| format!("[proxy] {key}: {}", e.trim_start_matches("allow: ")))
    };
    let proxy_protocol_from = networks("proxy_protocol_from", &raw.proxy_protocol_from)?;
    let trusted_proxies = networks("trusted_proxies", &raw.trusted_proxies)?;
    let dns = raw
        .dns
        .map(|d| dns_settings(d, &domains, acme.as_ref()))
        .transpose()?;
    let http_listen = listen_addrs("http_listen", raw.http_listen, 80)?;
    let https_listen = listen_addrs("https_listen", raw.https_listen, 443)?;

    // The hub's own addresses: overlay addresses and specific listen addresses.
    let mut own: HashSet<IpAddr> = hub_addrs.iter().map(|n| n.addr().to_canonical()).collect();
    let tcp_listen: Vec<(String, SocketAddr)> = tcp
        .iter()
        .enumerate()
        .map(|(i, t)| {
            t.listen
                .parse::<SocketAddr>()
                .map(|a| (format!("[[tcp]] #{}", i + 1), a))
                .map_err(|_| format!("[[tcp]] #{}: listen `{}` is not ip:port", i + 1, t.listen))
        })
        .collect::<Result<_, _>>()?;
    let udp_listen: Vec<(String, SocketAddr)> = udp
        .iter()
        .enumerate()
        .map(|(i, u)| {
            u.listen
                .parse::<SocketAddr>()
                .map(|a| (format!("[[udp]] #{}", i + 1), a))
                .map_err(|_| format!("[[udp]] #{}: listen `{}` is not ip:port", i + 1, u.listen))
        })
        .collect::<Result<_, _>>()?;
    for a in http_listen
        .iter()
        .chain(&https_listen)
        .chain(tcp_listen.iter().map(|(_, a)| a))
        .chain(udp_listen.iter().map(|(_, a)| a))
    {
        if !a.ip().is_unspecified() {
            own.insert(a.ip().to_canonical());
        }
    }
    // TCP ports may not collide (HTTP, HTTPS and TCP forwards share the TCP space).
    let mut tcp_seen: Vec<SocketAddr> = http_listen.iter().chain(&https_listen).copied().collect();
    for (who, a) in &tcp_listen {
        if tcp_seen.contains(a) {
            return Err(format!(
                "{who}: listen `{a}` is already used by another listener"
            ));
        }
        tcp_seen.push(*a);
    }
    let mut udp_seen = Vec::new();
    for (who, a) in &udp_listen {
        if udp_seen.contains(a) {
            return Err(format!(
                "{who}: listen `{a}` is already used by another listener"
            ));
        }
        udp_seen.push(*a);
    }
    // The DNS listeners take their address on both.
    let dns_listen = dns
        .iter()
        .flat_map(|d| d.listen.iter().map(|a| ("[proxy.dns] listen", a)))
        .chain(
            acme.iter()
                .flat_map(|a| a.dns_listen.iter().map(|l| ("[proxy.acme] dns_listen", l))),
        );
    // (An unspecified address takes its port on every address of its family.)
    let overlaps = |a: &SocketAddr, b: &SocketAddr| {
        a.port() == b.port()
            && (a.ip() == b.ip()
                || (a.is_ipv4() == b.is_ipv4()
                    && (a.ip().is_unspecified() || b.ip().is_unspecified())))
    };
    let mut dns_seen: Vec<SocketAddr> = Vec::new();
    for (who, a) in dns_listen {
        if tcp_seen
            .iter()
            .chain(&udp_seen)
            .chain(&dns_seen)
            .any(|b| overlaps(a, b))
        {
            return Err(format!("{who} `{a}` is already used by another listener"));
        }
        dns_seen.push(*a);
        if !a.ip().is_unspecified() {
            own.insert(a.ip().to_canonical());
        }
    }
    // The public addresses the zone names are the hub's own too.
    own.extend(dns.iter().flat_map(|d| d.addresses.iter().copied()));

    let mut out_routes = Vec::new();
    let mut hosts = HashSet::new();
    for (i, mut r) in routes.into_iter().enumerate() {
        let label = r.name.as_deref().or(r.fqdn.as_deref()).unwrap_or("?");
        let who = format!("[[route]] #{} ({label})", i + 1);
        let host = match (&r.name, &r.fqdn) {
            (Some(n), None) => {
                let l = Label::parse(n).map_err(|e| format!("{who}: name: {e}"))?;
                if domains.is_empty() {
                    return Err(format!(
                        "{who}: a name route needs at least one gateway domain in [proxy] domains"
                    ));
                }
                for d in &domains {
                    if l.under(d).is_none() {
                        return Err(format!("{who}: `{l}.{d}` is longer than 253 characters"));
                    }
                }
                RouteHost::Name(l)
            }
            (None, Some(f)) => {
                let dn = DomainName::parse(f).map_err(|e| format!("{who}: fqdn: {e}"))?;
                if let Some(d) = domains.iter().find(|d| dn.is_within(d)) {
                    return Err(format!(
                        "{who}: fqdn `{dn}` is within the gateway domain `{d}`; use a name route"
                    ));
                }
                RouteHost::Fqdn(dn)
            }
            _ => return Err(format!("{who}: set exactly one of `name` and `fqdn`")),
        };
        if !hosts.insert(host.clone()) {
            return Err(format!("{who}: `{host}` is already routed"));
        }
        let tls = match r.tls.as_deref() {
            None | Some("terminate") => TlsMode::Terminate,
            Some("passthrough") => TlsMode::Passthrough,
            Some(o) => {
                return Err(format!(
                    "{who}: tls = `{o}`: expected `terminate` or `passthrough`"
                ))
            }
        };
        let cert = match (r.cert, r.key) {
            (Some(c), Some(k)) => Some(CertFiles {
                cert: resolve(base, &c),
                key: resolve(base, &k),
            }),
            (None, None) => None,
            _ => return Err(format!("{who}: set both `cert` and `key`, or neither")),
        };
        let passthrough = tls == TlsMode::Passthrough;
        if r.acme && (passthrough || cert.is_some()) {
            return Err(format!(
                "{who}: acme = true is for terminated routes without `cert`/`key`"
            ));
        }
        if r.acme && acme.is_none() {
            return Err(format!("{who}: acme = true needs a [proxy.acme] section"));
        }
        if passthrough && cert.is_some() {
            return Err(format!(
                "{who}: a passthrough route has no certificate on the hub (remove `cert`/`key`)"
            ));
        }
        let pp = proxy_protocol(&who, r.proxy_protocol.take())?;
        if !passthrough && pp != ProxyProtocol::Off {
            return Err(format!(
                "{who}: proxy_protocol applies to passthrough routes; terminated routes send X-Forwarded-For"
            ));
        }
        let backends = backends(&who, &r.backends, !passthrough, &own)?;
        let backend_protocol = match r.backend_protocol.as_deref() {
            None | Some("http1") => BackendProtocol::Http1,
            Some("http2") if passthrough => {
                return Err(format!(
                    "{who}: backend_protocol applies to terminated routes (passthrough splices TLS untouched)"
                ))
            }
            Some("http2") => BackendProtocol::Http2,
            Some(o) => {
                return Err(format!(
                    "{who}: backend_protocol = `{o}`: expected `http1` or `http2`"
                ))
            }
        };
        if passthrough && (r.basic_auth_file.is_some() || r.forward_auth.is_some()) {
            return Err(format!(
                "{who}: basic_auth_file and forward_auth need tls = \"terminate\" (a passthrough route never sees the request)"
            ));
        }
        let forward_auth = match r.forward_auth.as_deref() {
            None if !r.forward_auth_headers.is_empty() => {
                return Err(format!("{who}: forward_auth_headers needs forward_auth"))
            }
            None => None,
            Some(u) => {
                let url = crate::proxy::forward_auth::AuthUrl::parse(u)
                    .map_err(|e| format!("{who}: forward_auth {e}"))?;
                let mut names = Vec::new();
                for h in &r.forward_auth_headers {
                    let n = http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                        format!("{who}: forward_auth_headers: `{h}` is not a header name")
                    })?;
                    if names.contains(&n) {
                        return Err(format!("{who}: forward_auth_headers: `{h}` twice"));
                    }
                    names.push(n);
                }
                Some((url, names))
            }
        };
        if passthrough && !(r.request_headers.is_empty() && r.response_headers.is_empty()) {
            return Err(format!(
                "{who}: request_headers and response_headers need tls = \"terminate\" (a passthrough route never sees the request)"
            ));
        }
        let request_headers = header_edits(
            &who,
            "request_headers",
            std::mem::take(&mut r.request_headers).0,
            true,
        )?;
        let response_headers = header_edits(
            &who,
            "response_headers",
            std::mem::take(&mut r.response_headers).0,
            false,
        )?;
        let mut bal = balance(&who, raw_bal!(r), false)?;
        if let Some(h) = bal.health.as_mut() {
            h.send = ProbeSend {
                host: match &host {
                    RouteHost::Name(l) => domains.first().and_then(|d| l.under(d)),
                    RouteHost::Fqdn(f) => Some(f.clone()),
                }
                .map(|d| d.to_string()),
                headers: request_headers
                    .iter()
                    .filter_map(|(n, v)| Some((n.clone(), v.clone()?)))
                    .collect(),
                proxy_protocol: pp,
                tls_unverified: passthrough,
            };
        }
        let paths = route_paths(&who, std::mem::take(&mut r.paths), passthrough, &own, &bal)?;
        let max_body_size = match r.max_body_size.as_deref() {
            None => None,
            Some(_) if passthrough => {
                return Err(format!(
                    "{who}: max_body_size needs tls = \"terminate\" (a passthrough route never sees the request)"
                ))
            }
            Some(v) => Some(parse_size(v).map_err(|e| format!("{who}: max_body_size {e}"))?),
        };
        let has_https = backends
            .iter()
            .chain(paths.iter().flat_map(|p| &p.backends))
            .any(|b| b.scheme == Scheme::Https);
        let backend_tls = BackendTls {
            ca: r.backend_ca.map(|p| resolve(base, &p)),
            server_name: r.backend_server_name,
            insecure_skip_verify: r.backend_insecure_skip_verify,
        };
        if !has_https
            && (backend_tls.ca.is_some()
                || backend_tls.server_name.is_some()
                || backend_tls.insecure_skip_verify)
        {
            return Err(format!(
                "{who}: backend_ca/backend_server_name/backend_insecure_skip_verify need an https:// backend"
            ));
        }
        if has_https && backend_tls.ca.is_none() && !backend_tls.insecure_skip_verify {
            return Err(format!(
                "{who}: https:// backends need `backend_ca` (or backend_insecure_skip_verify = true)"
            ));
        }
        if let Some(sn) = &backend_tls.server_name {
            rustls_pki_types::ServerName::try_from(sn.as_str())
                .map_err(|_| format!("{who}: backend_server_name `{sn}` is not a valid name"))?;
        }
        out_routes.push(RouteSettings {
            host,
            tls,
            cert,
            backends,
            redirect_https: r.redirect_https,
            proxy_protocol: pp,
            backend_tls,
            backend_protocol,
            balance: bal,
            acme: r.acme,
            paused: r.paused,
            access: access(&who, &r.allow, &r.deny)?,
            rate_limit: rate_limit(&who, r.rate_limit, r.rate_burst)?,
            bandwidth: bandwidth(&who, r.bandwidth.as_deref())?,
            basic_auth_file: r.basic_auth_file.map(|p| resolve(base, &p)),
            forward_auth,
            paths,
            max_body_size,
            request_headers,
            response_headers,
        });
    }
    let mut out_tcp = Vec::new();
    for (mut t, (who, listen)) in tcp.into_iter().zip(tcp_listen) {
        let backends = backends(&who, &t.backends, false, &own)?;
        let proxy_protocol = proxy_protocol(&who, t.proxy_protocol.take())?;
        let tls = match (t.cert.take(), t.key.take(), t.acme.take()) {
            (Some(c), Some(k), None) => Some(TcpTls::Files(CertFiles {
                cert: resolve(base, &c),
                key: resolve(base, &k),
            })),
            (None, None, None) => None,
            (None, None, Some(name)) => {
                let dn =
                    DomainName::parse(&name).map_err(|e| format!("{who}: acme `{name}`: {e}"))?;
                if acme.is_none() {
                    return Err(format!("{who}: acme needs a [proxy.acme] section"));
                }
                Some(TcpTls::Acme(dn))
            }
            (_, _, Some(_)) => return Err(format!("{who}: set `acme` or `cert`/`key`, not both")),
            _ => return Err(format!("{who}: set both `cert` and `key`, or neither")),
        };
        let mut balance = balance(&who, raw_bal!(t), false)?;
        if let Some(h) = balance.health.as_mut() {
            h.send.proxy_protocol = proxy_protocol;
        }
        out_tcp.push(TcpForwardSettings {
            listen,
            backends,
            proxy_protocol,
            balance,
            tls,
            access: access(&who, &t.allow, &t.deny)?,
            rate_limit: rate_limit(&who, t.rate_limit, t.rate_burst)?,
            bandwidth: bandwidth(&who, t.bandwidth.as_deref())?,
        });
    }
    let mut out_udp = Vec::new();
    for (mut u, (who, listen)) in udp.into_iter().zip(udp_listen) {
        let proxy_protocol = proxy_protocol(&who, u.proxy_protocol.take())?;
        if proxy_protocol == ProxyProtocol::V1 {
            return Err(format!(
                "{who}: proxy_protocol = \"v1\": PROXY v1 has no UDP form; use true or \"v2\""
            ));
        }
        let max_flows = u.max_flows.unwrap_or(4096);
        if !(1..=1_000_000).contains(&max_flows) {
            return Err(format!("{who}: max_flows: must be 1 to 1000000"));
        }
        let max_flows_per_source = u
            .max_flows_per_source
            .unwrap_or_else(|| default_flows_per_source(max_flows));
        if !(1..=max_flows).contains(&max_flows_per_source) {
            return Err(format!(
                "{who}: max_flows_per_source: must be 1 to max_flows ({max_flows})"
            ));
        }
        let bal = balance(&who, raw_bal!(u), true)?;
        out_udp.push(UdpForwardSettings {
            listen,
            balance: bal,
            backends: backends(&who, &u.backends, false, &own)?,
            max_flows,
            max_flows_per_source,
            flow_idle_timeout: secs(
                &format!("{who}: flow_idle_timeout"),
                u.flow_idle_timeout,
                Duration::from_secs(60),
            )?,
            access: access(&who, &u.allow, &u.deny)?,
            rate_limit: rate_limit(&who, u.rate_limit, u.rate_burst)?,
            bandwidth: bandwidth(&who, u.bandwidth.as_deref())?,
            proxy_protocol,
        });
    }
    Ok(Some(ProxySettings {
        domains,
        http_listen,
        https_listen,
        routes: out_routes,
        tcp: out_tcp,
        udp: out_udp,
        limits,
        acme,
        access_log: raw.access_log.map(|p| resolve(base, &p)),
        proxy_protocol_from,
        trusted_proxies,
        dns,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn backend_grammar() {
        let ok = |s: &str| backend("r", s, true).unwrap();
        assert_eq!(ok("100.64.0.3:80").addr, "100.64.0.3:80".parse().unwrap());
        assert_eq!(
            ok("http://[fd77:6777::2]:8080").addr,
            "[fd77:6777::2]:8080".parse().unwrap()
        );
        assert_eq!(ok("http://100.64.0.3").addr.port(), 80);
        assert_eq!(ok("https://[200:1::2]").addr.port(), 443);
        assert_eq!(ok("https://[200:1::2]/").scheme, Scheme::Https);
        let bad = |s: &str, want: &str| {
            let e = backend("[[route]] #1 (blog)", s, true).unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
            assert!(e.contains("blog"), "{e}");
            assert!(e.contains(s), "{e}");
        };
        bad("127.0.0.1:80", "loopback");
        bad("http://[::1]:80", "loopback");
        bad("[::ffff:127.0.0.1]:80", "loopback");
        bad("169.254.1.1:80", "link-local");
        bad("[fe80::1]:80", "link-local");
        bad("0.0.0.0:80", "unspecified");
        bad("[::]:80", "unspecified");
        bad("224.0.0.1:80", "multicast");
        bad("[ff02::1]:80", "multicast");
        bad("localhost:80", "IP literal");
        bad("100.64.0.3", "IP literal");
        bad("fd77::1:80", "IP literal");
        bad("ftp://1.2.3.4:21", "scheme");
        bad("http://1.2.3.4:80/app", "path");
        bad("1.2.3.4:0", "port 0");
        assert!(backend("t", "http://1.2.3.4:80", false)
            .unwrap_err()
            .contains("scheme"));
    }

    fn v(proxy: Option<RawProxy>, routes: Vec<RawRoute>) -> Result<Option<ProxySettings>, String> {
        validate(
            proxy,
            routes,
            vec![],
            vec![],
            &[
                "100.64.0.1/10".parse().unwrap(),
                "fd77::1/48".parse().unwrap(),
            ],
            Path::new("/etc/gatewire"),
        )
    }

    fn route(name: &str, backends: &[&str]) -> RawRoute {
        RawRoute {
            name: Some(name.into()),
            fqdn: None,
            tls: None,
            cert: Some("c.pem".into()),
            key: Some("k.pem".into()),
            backends: backends.iter().map(|s| s.to_string()).collect(),
            redirect_https: false,
            proxy_protocol: None,
            backend_ca: None,
            backend_server_name: None,
            backend_insecure_skip_verify: false,
            backend_protocol: None,
            acme: false,
            balance: None,
            sticky: false,
            health_check: None,
            health_path: None,
            health_interval: None,
            health_timeout: None,
            health_fall: None,
            health_rise: None,
            max_connections: None,
            allow: vec![],
            deny: vec![],
            rate_limit: None,
            bandwidth: None,
            rate_burst: None,
            paused: false,
            basic_auth_file: None,
            forward_auth: None,
            forward_auth_headers: vec![],
            paths: vec![],
            max_body_size: None,
            request_headers: Default::default(),
            response_headers: Default::default(),
        }
    }

    fn px() -> Option<RawProxy> {
        Some(RawProxy {
            domains: vec!["GW.Example.org".into()],
            ..Default::default()
        })
    }

    #[test]
    fn validates_routes() {
        assert!(v(None, vec![]).unwrap().is_none());
        let s = v(px(), vec![route("Blog", &["100.64.1.1:80"])])
            .unwrap()
            .unwrap();
        assert_eq!(s.domains[0].as_str(), "gw.example.org");
        assert_eq!(
            s.routes[0].host,
            RouteHost::Name(Label::parse("blog").unwrap())
        );
        assert_eq!(
            s.routes[0].cert.as_ref().unwrap().cert,
            Path::new("/etc/gatewire/c.pem")
        );
        assert_eq!(s.http_listen.len(), 2);
        let e = v(None, vec![route("blog", &["100.64.1.1:80"])]).unwrap_err();
        assert!(e.contains("domain"), "{e}");
        let e = v(px(), vec![route("blog", &["100.64.0.1:80"])]).unwrap_err();
        assert!(
            e.contains("hub's own") && e.contains("100.64.0.1:80") && e.contains("blog"),
            "{e}"
        );
        let e = v(px(), vec![route("blog", &["[fd77::1]:80"])]).unwrap_err();
        assert!(e.contains("hub's own"), "{e}");
        let e = v(
            px(),
            vec![
                route("blog", &["100.64.1.1:80"]),
                route("BLOG", &["100.64.1.2:80"]),
            ],
        )
        .unwrap_err();
        assert!(e.contains("already routed"), "{e}");
        let mut both = route("blog", &["100.64.1.1:80"]);
        both.fqdn = Some("www.example.com".into());
        assert!(v(px(), vec![both]).unwrap_err().contains("exactly one"));
        let mut inside = route("x", &["100.64.1.1:80"]);
        inside.name = None;
        inside.fqdn = Some("a.gw.example.org".into());
        assert!(v(px(), vec![inside]).unwrap_err().contains("name route"));
        let mut pt = route("x", &["http://100.64.1.1:80"]);
        pt.tls = Some("passthrough".into());
        pt.cert = None;
        pt.key = None;
        assert!(v(px(), vec![pt]).unwrap_err().contains("scheme"));
        let mut hs = route("x", &["https://100.64.1.1"]);
        assert!(v(px(), vec![hs]).unwrap_err().contains("backend_ca"));
        hs = route("x", &["https://100.64.1.1"]);
        hs.backend_insecure_skip_verify = true;
        assert!(v(px(), vec![hs]).is_ok());
        let listen_self = Some(RawProxy {
            domains: vec!["gw.example.org".into()],
            http_listen: Some(vec!["203.0.113.1:80".into()]),
            ..Default::default()
        });
        let e = v(listen_self, vec![route("b", &["203.0.113.1:8080"])]).unwrap_err();
        assert!(e.contains("hub's own"), "{e}");
    }

    #[test]
    fn backend_protocol_key() {
        let s = v(px(), vec![route("a", &["100.64.1.1:80"])])
            .unwrap()
            .unwrap();
        assert_eq!(s.routes[0].backend_protocol, BackendProtocol::Http1);
        let mut r = route("a", &["100.64.1.1:50051"]);
        r.backend_protocol = Some("http2".into());
        let s = v(px(), vec![r]).unwrap().unwrap();
        assert_eq!(s.routes[0].backend_protocol, BackendProtocol::Http2);
        let mut r = route("a", &["100.64.1.1:80"]);
        r.backend_protocol = Some("h3".into());
        let e = v(px(), vec![r]).unwrap_err();
        assert!(e.contains("`h3`") && e.contains("http2"), "{e}");
        let mut r = route("a", &["100.64.1.1:443"]);
        r.tls = Some("passthrough".into());
        r.cert = None;
        r.key = None;
        r.backend_protocol = Some("http2".into());
        let e = v(px(), vec![r]).unwrap_err();
        assert!(e.contains("terminated routes"), "{e}");
    }

    #[test]
    fn host_check() {
        let s = v(px(), vec![route("blog", &["100.64.1.1:80"])])
            .unwrap()
            .unwrap();
        assert!(s.check_against(&["10.0.0.1".parse().unwrap()]).is_ok());
        let e = s
            .check_against(&["::ffff:100.64.1.1".parse().unwrap()])
            .unwrap_err();
        assert!(
            e.contains("100.64.1.1:80") && e.contains("name:blog"),
            "{e}"
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod toml_tests {
    use crate::config::HubConfig;
    use std::path::Path;

    const HUB: &str = "[hub]\nprivate_key = \"yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\"\naddresses = [\"100.64.0.1/10\", \"fd77:6777::1/48\"]\n";

    fn parse(extra: &str) -> Result<HubConfig, String> {
        HubConfig::parse("hub.toml", &format!("{HUB}{extra}"), Path::new("/etc/gw"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn full_example_parses() {
        let c = parse(
            "[proxy]\ndomains = [\"gw.example.org\"]\nhttp_listen = [\"0.0.0.0:80\"]\n\
             [[route]]\nname = \"blog\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
             backends = [\"http://[fd77:6777::2]:8080\", \"100.64.0.3:80\"]\n\
             [[route]]\nfqdn = \"WWW.Example.com\"\ntls = \"passthrough\"\nproxy_protocol = true\n\
             backends = [\"100.64.0.4:443\"]\n\
             [[tcp]]\nlisten = \"0.0.0.0:2222\"\nbackends = [\"100.64.0.2:22\"]\nproxy_protocol = true\n\
             [[udp]]\nlisten = \"0.0.0.0:5353\"\nbackends = [\"100.64.0.2:53\"]\n\
             [[udp]]\nlisten = \"0.0.0.0:5354\"\nbackends = [\"100.64.0.2:53\"]\nproxy_protocol = \"v2\"\n",
        )
        .unwrap();
        let p = c.proxy.unwrap();
        assert_eq!(p.routes.len(), 2);
        assert_eq!(p.routes[1].host.to_string(), "fqdn:www.example.com");
        assert_eq!(p.tcp.len(), 1);
        assert_eq!(p.udp[0].max_flows, 4096);
        assert_eq!(p.udp[0].max_flows_per_source, 256);
        assert_eq!(p.udp[0].proxy_protocol, super::ProxyProtocol::Off);
        assert_eq!(p.udp[1].proxy_protocol, super::ProxyProtocol::V2);
        let e = parse("[[udp]]\nlisten = \"0.0.0.0:53\"\nbackends = [\"100.64.0.9:53\"]\nproxy_protocol = \"v1\"\n")
            .unwrap_err();
        assert!(e.contains("[[udp]] #1") && e.contains("no UDP form"), "{e}");
        assert!(parse("").unwrap().proxy.is_none());
        let udp = |extra: &str| {
            parse(&format!(
                "[[udp]]\nlisten = \"0.0.0.0:53\"\nbackends = [\"100.64.0.9:53\"]\n{extra}"
            ))
            .map(|c| {
                let u = &c.proxy.unwrap().udp[0];
                (u.max_flows, u.max_flows_per_source)
            })
        };
        assert_eq!(udp("max_flows = 100\n"), Ok((100, 64)));
        assert_eq!(udp("max_flows = 10\n"), Ok((10, 10)));
        assert_eq!(udp("max_flows_per_source = 1\n"), Ok((4096, 1)));
        for bad in [
            "max_flows_per_source = 0\n",
            "max_flows = 10\nmax_flows_per_source = 11\n",
        ] {
            let e = udp(bad).unwrap_err();
            assert!(
                e.contains("max_flows_per_source: must be 1 to max_flows"),
                "{e}"
            );
        }
    }

    #[test]
    fn max_body_size() {
        assert_eq!(super::parse_size("10 MB"), Ok(10_000_000));
        assert_eq!(super::parse_size("512KiB"), Ok(524_288));
        assert_eq!(super::parse_size("1.5 GiB"), Ok(1_610_612_736));
        assert_eq!(super::parse_size("0 B"), Ok(0));
        for bad in ["10", "ten MB", "10 Mb", "2 TiB", "1e9 B", "-1 B", ""] {
            assert!(super::parse_size(bad).is_err(), "{bad}");
        }
        let c = parse(
            "[[route]]\nfqdn = \"a.example\"\nmax_body_size = \"1 MiB\"\nbackends = [\"100.64.0.9:80\"]\n",
        )
        .unwrap();
        assert_eq!(c.proxy.unwrap().routes[0].max_body_size, Some(1 << 20));
        let e = parse(
            "[[route]]\nfqdn = \"a.example\"\nmax_body_size = \"1 Mbit\"\nbackends = [\"100.64.0.9:80\"]\n",
        )
        .unwrap_err();
        assert!(
            e.contains("[[route]] #1") && e.contains("unknown unit `Mbit`"),
            "{e}"
        );
        let e = parse(
            "[[route]]\nfqdn = \"a.example\"\ntls = \"passthrough\"\nmax_body_size = \"1 MB\"\nbackends = [\"100.64.0.9:443\"]\n",
        )
        .unwrap_err();
        assert!(e.contains("needs tls = \"terminate\""), "{e}");
    }

    #[test]
    fn route_headers() {
        let r = |t: &str| {
            parse(&format!(
                "[[route]]\nfqdn = \"a.example\"\nbackends = [\"100.64.0.9:80\"]\n{t}"
            ))
        };
        let c = r("response_headers = { \"Strict-Transport-Security\" = \"max-age=63072000\", Server = \"\" }\n\
                   request_headers = { \"X-Env\" = \"prod\" }\n")
        .unwrap();
        let p = c.proxy.unwrap();
        let rh = &p.routes[0].response_headers;
        assert_eq!(rh.len(), 2);
        assert_eq!(rh[0].0.as_str(), "server");
        assert!(rh[0].1.is_none());
        assert_eq!(rh[1].0.as_str(), "strict-transport-security");
        assert_eq!(rh[1].1.as_ref().unwrap(), "max-age=63072000");
        assert_eq!(p.routes[0].request_headers[0].0.as_str(), "x-env");
        // The values may be credentials: not in `Debug`, raw or parsed.
        let raw =
            super::HeaderTable::from([("Authorization".to_string(), "Bearer s3cret".to_string())]);
        let shown = format!("{raw:?}");
        assert!(
            shown.contains("Authorization") && !shown.contains("s3cret"),
            "{shown}"
        );
        let c = r("request_headers = { Authorization = \"Bearer s3cret\" }\n").unwrap();
        let shown = format!("{:?}", c.proxy.unwrap().routes[0]);
        assert!(
            shown.contains("authorization") && !shown.contains("s3cret"),
            "{shown}"
        );
        assert!(!format!("{:?}", p.routes[0]).contains("prod"));
        // Surrounding blanks are not part of a value; blanks alone remove.
        let c = r("response_headers = { A = \" max-age=1 \", B = \"  \" }\n").unwrap();
        let rh = &c.proxy.unwrap().routes[0].response_headers;
        assert_eq!(rh[0].1.as_ref().unwrap(), "max-age=1");
        assert!(rh[1].1.is_none());
        for (t, want) in [
            (
                "request_headers = { Host = \"x\" }\n",
                "`host` is the hub's",
            ),
            (
                "request_headers = { \"X-Forwarded-For\" = \"1.2.3.4\" }\n",
                "names the client",
            ),
            (
                "response_headers = { \"Content-Length\" = \"1\" }\n",
                "frames the message",
            ),
            (
                "response_headers = { \"Transfer-Encoding\" = \"\" }\n",
                "frames the message",
            ),
            (
                "response_headers = { \"bad name\" = \"1\" }\n",
                "not a header name",
            ),
            ("response_headers = { X = \"a\\nb\" }\n", "may not have"),
            (
                "response_headers = { X = \"1\", x = \"2\" }\n",
                "given twice",
            ),
        ] {
            let e = r(t).unwrap_err();
            assert!(e.contains(want) && e.contains("[[route]] #1"), "{t}: {e}");
        }
        // A response header names the client only on requests: allowed.
        assert!(r("response_headers = { Forwarded = \"x\" }\n").is_ok());
        let e = parse(
            "[[route]]\nfqdn = \"a.example\"\ntls = \"passthrough\"\nbackends = [\"100.64.0.9:443\"]\n\
             response_headers = { X = \"1\" }\n",
        )
        .unwrap_err();
        assert!(e.contains("need tls = \"terminate\""), "{e}");
    }

    #[test]
    fn health_probes_speak_as_the_route() {
        let c = parse(
            "[proxy]\ndomains = [\"gw.example.org\", \"gw2.example.org\"]\n\
             [[route]]\nname = \"App\"\nbackends = [\"100.64.0.3:80\"]\nhealth_check = \"http\"\n\
             request_headers = { \"X-Key\" = \"s3cret\", Cookie = \"\" }\n\
             [[route.paths]]\nprefix = \"/api\"\nbackends = [\"100.64.0.4:80\"]\n\
             [[route]]\nfqdn = \"shop.example\"\ntls = \"passthrough\"\nproxy_protocol = \"v1\"\n\
             backends = [\"100.64.0.5:443\"]\nhealth_check = \"http\"\n\
             [[route]]\nname = \"plain\"\nbackends = [\"100.64.0.6:80\"]\n\
             [[tcp]]\nlisten = \"0.0.0.0:2222\"\nbackends = [\"100.64.0.7:22\"]\nproxy_protocol = true\n\
             health_check = \"tcp\"\n",
        )
        .unwrap();
        let p = c.proxy.unwrap();
        let app = p.routes[0].balance.health.as_ref().unwrap();
        assert_eq!(app.send.host.as_deref(), Some("app.gw.example.org"));
        // Set headers go along (a removal has nothing to send), their values
        // still kept out of `Debug`.
        assert_eq!(app.send.headers.len(), 1);
        assert_eq!(app.send.headers[0].0, "x-key");
        assert_eq!(app.send.headers[0].1, "s3cret");
        assert!(!format!("{app:?}").contains("s3cret"));
        assert_eq!(app.send.proxy_protocol, super::ProxyProtocol::Off);
        assert!(!app.send.tls_unverified);
        // A path prefix checks its backends the same way.
        let api = p.routes[0].paths[0].balance.health.as_ref().unwrap();
        assert_eq!(api.send, app.send);
        let shop = p.routes[1].balance.health.as_ref().unwrap();
        assert_eq!(shop.send.host.as_deref(), Some("shop.example"));
        assert_eq!(shop.send.proxy_protocol, super::ProxyProtocol::V1);
        assert!(shop.send.tls_unverified);
        assert!(p.routes[2].balance.health.is_none());
        let ssh = p.tcp[0].balance.health.as_ref().unwrap();
        assert_eq!(ssh.send.host, None);
        assert_eq!(ssh.send.proxy_protocol, super::ProxyProtocol::V2);
        assert!(!ssh.send.tls_unverified);
    }

    #[test]
    fn route_paths() {
        let r = |paths: &str| {
            parse(&format!(
                "[proxy]\ndomains = [\"gw.example.org\"]\n\
                 [[route]]\nname = \"app\"\nbackends = [\"100.64.0.3:80\"]\n{paths}"
            ))
        };
        let c = r("health_check = \"http\"\nhealth_path = \"/healthz\"\n\
                   [[route.paths]]\nprefix = \"/api/\"\nbackends = [\"http://[fd77:6777::4]:9000\"]\nstrip_prefix = true\n\
                   health_path = \"/status\"\n\
                   [[route.paths]]\nprefix = \"/static\"\nbackends = [\"100.64.0.5:80\", \"100.64.0.6:80\"]\n")
            .unwrap();
        let p = c.proxy.unwrap();
        let paths = &p.routes[0].paths;
        assert_eq!(paths.len(), 2);
        assert_eq!(paths[0].prefix.as_str(), "/api");
        assert!(paths[0].strip_prefix);
        assert_eq!(paths[0].backends[0].addr.to_string(), "[fd77:6777::4]:9000");
        assert!(!paths[1].strip_prefix);
        assert_eq!(paths[1].backends.len(), 2);
        // The route's checks, with the prefix's own path where given.
        let hp = |b: &super::Balance| match &b.health.as_ref().unwrap().kind {
            super::HealthKind::Http { path } => path.clone(),
            super::HealthKind::Tcp => "tcp".into(),
        };
        assert_eq!(hp(&paths[0].balance), "/status");
        assert_eq!(hp(&paths[1].balance), "/healthz");
        assert_eq!(paths[0].balance.policy, p.routes[0].balance.policy);
        // Every path backend is checked as the route's are.
        let all = p.all_backends();
        assert!(all
            .iter()
            .any(|(who, b)| who == "[[route]] name:app path /static"
                && b.addr.to_string() == "100.64.0.6:80"));
        for (paths, want) in [
            (
                "[[route.paths]]\nprefix = \"api\"\nbackends = [\"100.64.0.4:80\"]\n",
                "must start with `/`",
            ),
            (
                "[[route.paths]]\nprefix = \"/\"\nbackends = [\"100.64.0.4:80\"]\n",
                "route's own",
            ),
            (
                "[[route.paths]]\nprefix = \"/a?b\"\nbackends = [\"100.64.0.4:80\"]\n",
                "no query",
            ),
            (
                "[[route.paths]]\nprefix = \"/a/../b\"\nbackends = [\"100.64.0.4:80\"]\n",
                "`..`",
            ),
            (
                "[[route.paths]]\nprefix = \"/a\"\nbackends = []\n",
                "at least one backend",
            ),
            (
                "[[route.paths]]\nprefix = \"/a\"\nbackends = [\"127.0.0.1:80\"]\n",
                "127.0.0.1",
            ),
            (
                "[[route.paths]]\nprefix = \"/a\"\nbackends = [\"100.64.0.1:80\"]\n",
                "hub's own",
            ),
            (
                "[[route.paths]]\nprefix = \"/a\"\nbackends = [\"100.64.0.4:80\"]\n\
              [[route.paths]]\nprefix = \"/a/\"\nbackends = [\"100.64.0.5:80\"]\n",
                "listed twice",
            ),
            (
                "[[route.paths]]\nprefix = \"/a\"\nbackends = [\"https://100.64.0.4:443\"]\n",
                "backend_ca",
            ),
            (
                "[[route.paths]]\nprefix = \"/a\"\nbackend = [\"100.64.0.4:80\"]\n",
                "unknown field",
            ),
            (
                "[[route.paths]]\nprefix = \"/a\"\nbackends = [\"100.64.0.4:80\"]\nhealth_path = \"/h\"\n",
                "needs the route's health_check",
            ),
            (
                "health_check = \"http\"\n[[route.paths]]\nprefix = \"/a\"\nbackends = [\"100.64.0.4:80\"]\nhealth_path = \"h z\"\n",
                "expected a path",
            ),
        ] {
            let e = r(paths).unwrap_err();
            // serde's own errors name the line instead of the route.
            let named = e.contains("[[route]] #1 (app)") || want == "unknown field";
            assert!(e.contains(want) && named, "{paths}: {e}");
        }
        let e = parse(
            "[[route]]\nfqdn = \"a.example\"\ntls = \"passthrough\"\nbackends = [\"100.64.0.9:443\"]\n\
             [[route.paths]]\nprefix = \"/a\"\nbackends = [\"100.64.0.4:443\"]\n",
        )
        .unwrap_err();
        assert!(e.contains("need tls = \"terminate\""), "{e}");
        let many: String = (0..65)
            .map(|i| {
                format!("[[route.paths]]\nprefix = \"/p{i}\"\nbackends = [\"100.64.0.4:80\"]\n")
            })
            .collect();
        assert!(r(&many).unwrap_err().contains("more than 64"));
    }

    #[test]
    fn basic_auth_file_is_resolved_and_only_for_terminated_routes() {
        let c = parse(
            "[proxy]\ndomains = [\"gw.example.org\"]\n\
             [[route]]\nname = \"team\"\nbasic_auth_file = \"team.htpasswd\"\nbackends = [\"100.64.0.3:80\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.proxy.unwrap().routes[0].basic_auth_file.as_deref(),
            Some(Path::new("/etc/gw/team.htpasswd"))
        );
        let e = parse(
            "[[route]]\nfqdn = \"a.example\"\ntls = \"passthrough\"\nbasic_auth_file = \"/x\"\nbackends = [\"100.64.0.9:443\"]\n",
        )
        .unwrap_err();
        assert!(e.contains("forward_auth need tls = \"terminate\""), "{e}");
        let c = parse(
            "[proxy]\ndomains = [\"gw.example.org\"]\n\
             [[route]]\nname = \"app\"\nforward_auth = \"http://127.0.0.1:4180/oauth2/auth\"\n\
             forward_auth_headers = [\"X-Auth-Request-User\"]\nbackends = [\"100.64.0.3:80\"]\n",
        )
        .unwrap();
        let (url, names) = c.proxy.unwrap().routes[0].forward_auth.clone().unwrap();
        assert_eq!(url.to_string(), "http://127.0.0.1:4180/oauth2/auth");
        assert_eq!(names, ["x-auth-request-user"]);
        for (bad, want) in [
            (
                "forward_auth_headers = [\"x-user\"]\n",
                "forward_auth_headers needs forward_auth",
            ),
            (
                "forward_auth = \"http://sso.example/auth\"\n",
                "forward_auth `http://sso.example/auth`",
            ),
            (
                "forward_auth = \"http://10.0.0.1:1/\"\nforward_auth_headers = [\"bad header\"]\n",
                "`bad header` is not a header name",
            ),
        ] {
            let e = parse(&format!(
                "[[route]]\nfqdn = \"a.example\"\n{bad}backends = [\"100.64.0.9:80\"]\n"
            ))
            .unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn acme_challenge_needs_its_listener() {
        let acme = "[proxy.acme]\ndirectory = \"https://acme.example/dir\"\nstate_dir = \"acme\"\n";
        let px = "[proxy]\ndomains = [\"gw.example.org\"]\n";
        let e = parse(&format!("{px}http_listen = []\n{acme}")).unwrap_err();
        assert!(
            e.contains("[proxy.acme] challenge = `http-01`") && e.contains("http_listen"),
            "{e}"
        );
        let e = parse(&format!(
            "{px}https_listen = []\n{acme}challenge = \"tls-alpn-01\"\n"
        ))
        .unwrap_err();
        assert!(
            e.contains("[proxy.acme] challenge = `tls-alpn-01`") && e.contains("https_listen"),
            "{e}"
        );
        // The other listener is not needed.
        parse(&format!(
            "{px}http_listen = []\n{acme}challenge = \"tls-alpn-01\"\n"
        ))
        .unwrap();
        parse(&format!("{px}https_listen = []\n{acme}")).unwrap();
        // Another hub of the mesh answers.
        parse(&format!(
            "{px}http_listen = []\n{acme}[mesh]\nname = \"hub-a\"\n\
             etcd = [\"http://192.0.2.9:2379\"]\nadvertise = [\"198.51.100.1\"]\n"
        ))
        .unwrap();
        // With wildcard, names under the gateway domains use DNS-01; a name
        // outside them still needs the challenge.
        let wild = format!(
            "{px}http_listen = []\n{acme}wildcard = true\ndns_listen = [\"203.0.113.1:53\"]\n"
        );
        parse(&wild).unwrap();
        let e = parse(&format!(
            "{wild}[[route]]\nfqdn = \"a.example\"\nacme = true\nbackends = [\"100.64.0.9:80\"]\n"
        ))
        .unwrap_err();
        assert!(e.contains("http_listen"), "{e}");
    }

    #[test]
    fn acme_directory_ca_is_checked_at_load() {
        let acme = "[proxy.acme]\ndirectory = \"https://acme.example/dir\"\nstate_dir = \"acme\"\n";
        let dir = std::env::temp_dir().join(format!("gw-acme-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let e = parse(&format!("{acme}directory_ca = \"{}\"\n", missing.display())).unwrap_err();
        assert!(
            e.contains("[proxy.acme] directory_ca") && e.contains("missing.pem"),
            "{e}"
        );
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = parse(&format!("{acme}directory_ca = \"{}\"\n", empty.display())).unwrap_err();
        assert!(
            e.contains("[proxy.acme] directory_ca") && e.contains("no usable certificate"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn acme_wildcard_keys() {
        let acme = "[proxy.acme]\ndirectory = \"https://acme.example/dir\"\nstate_dir = \"acme\"\n";
        let c = parse(&format!(
            "[proxy]\ndomains = [\"gw.example.org\"]\n{acme}wildcard = true\n\
             dns_listen = [\"203.0.113.1:53\", \"[2001:db8::1]:53\"]\n"
        ))
        .unwrap();
        let a = c.proxy.unwrap().acme.unwrap();
        assert!(a.wildcard);
        assert_eq!(a.dns_listen.len(), 2);
        for (extra, want) in [
            ("wildcard = true\n", "wildcard = true needs dns_listen"),
            (
                "dns_listen = [\"203.0.113.1\"]\n",
                "dns_listen: `203.0.113.1` is not ip:port",
            ),
            (
                "dns_listen = [\"203.0.113.1:53\", \"203.0.113.1:53\"]\n",
                "listed twice",
            ),
            (
                "dns_listen = [\"0.0.0.0:53\"]\n[[udp]]\nlisten = \"0.0.0.0:53\"\nbackends = [\"100.64.0.9:53\"]\n",
                "dns_listen `0.0.0.0:53` is already used",
            ),
            (
                "dns_listen = [\"0.0.0.0:80\"]\n",
                "dns_listen `0.0.0.0:80` is already used",
            ),
        ] {
            let e = parse(&format!(
                "[proxy]\ndomains = [\"gw.example.org\"]\nhttp_listen = [\"0.0.0.0:80\"]\n{acme}{extra}"
            ))
            .unwrap_err();
            assert!(e.contains(want), "{extra}: {e}");
        }
        let e = parse(&format!(
            "{acme}wildcard = true\ndns_listen = [\"203.0.113.1:53\"]\n"
        ))
        .unwrap_err();
        assert!(e.contains("needs at least one gateway domain"), "{e}");
    }

    #[test]
    fn dns_zone_keys() {
        let head = "[proxy]\ndomains = [\"gw.example.org\"]\nhttp_listen = [\"0.0.0.0:80\"]\n";
        let c = parse(&format!(
            "{head}[proxy.dns]\nlisten = [\"203.0.113.1:53\"]\n\
             addresses = [\"203.0.113.1\", \"2001:DB8::1\"]\n\
             ttl = 300\n[proxy.dns.nameservers]\n\"NS1.gw.example.org.\" = [\"203.0.113.1\"]\n\"ns2.example.net\" = []\n"
        ))
        .unwrap();
        let p = c.proxy.unwrap();
        let d = p.dns.as_ref().unwrap();
        assert_eq!(
            d.listen,
            vec!["203.0.113.1:53".parse::<std::net::SocketAddr>().unwrap()]
        );
        assert_eq!(
            d.addresses[1],
            "2001:db8::1".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(d.nameservers[0].0.as_str(), "ns1.gw.example.org");
        assert_eq!(d.nameservers[0].1.len(), 1);
        assert!(d.nameservers[1].1.is_empty());
        assert_eq!(d.ttl, 300);
        assert_eq!(super::DnsSettings::listeners(&p).len(), 1);
        let ns = "nameservers = { \"ns.example.net\" = [] }\n";
        let c = parse(&format!(
            "{head}[proxy.dns]\nlisten = [\"203.0.113.1:53\"]\naddresses = [\"203.0.113.1\"]\n{ns}"
        ))
        .unwrap();
        let p = c.proxy.unwrap();
        let d = p.dns.as_ref().unwrap();
        assert_eq!(d.ttl, 60);
        // Rate limited unless told otherwise.
        assert_eq!(d.rate_limit, Some(super::DNS_RATE_DEFAULT));
        assert_eq!(super::DnsSettings::rate(&p), Some(super::DNS_RATE_DEFAULT));
        let rate = |keys: &str| {
            let c = parse(&format!(
                "{head}[proxy.dns]\nlisten = [\"203.0.113.1:53\"]\naddresses = [\"203.0.113.1\"]\n{keys}{ns}"
            ))
            .unwrap();
            let p = c.proxy.unwrap();
            assert_eq!(
                super::DnsSettings::rate(&p),
                p.dns.as_ref().unwrap().rate_limit
            );
            super::DnsSettings::rate(&p).map(|l| (l.per_second, l.burst))
        };
        assert_eq!(rate("rate_limit = 300\n"), Some((300, 300)));
        assert_eq!(
            rate("rate_limit = 300\nrate_burst = 600\n"),
            Some((300, 600))
        );
        assert_eq!(rate("rate_burst = 80\n"), Some((20, 80)));
        assert_eq!(rate("rate_limit = 0\n"), None, "0 turns it off");
        let ok = "listen = [\"203.0.113.1:53\"]\naddresses = [\"203.0.113.1\"]\n";
        let okn = format!("{ok}{ns}");
        for (body, want) in [
            (
                "addresses = [\"203.0.113.1\"]\n",
                "[proxy.dns] needs listen",
            ),
            (
                "listen = [\"203.0.113.1:53\"]\n",
                "[proxy.dns] needs addresses",
            ),
            (
                "listen = [\"203.0.113.1:53\"]\naddresses = [\"127.0.0.1\"]\n",
                "`127.0.0.1` cannot be reached",
            ),
            (
                "listen = [\"203.0.113.1:53\"]\naddresses = [\"fe80::1\"]\n",
                "`fe80::1` cannot be reached",
            ),
            (
                "listen = [\"203.0.113.1:53\"]\naddresses = [\"0.0.0.0\"]\n",
                "cannot be reached",
            ),
            (
                "listen = [\"203.0.113.1:53\"]\naddresses = [\"hub.example\"]\n",
                "`hub.example` is not an IP address",
            ),
            (
                "listen = [\"203.0.113.1:53\"]\naddresses = [\"192.0.2.1\", \"192.0.2.1\"]\n",
                "listed twice",
            ),
            (
                &format!("listen = [\"0.0.0.0:80\"]\naddresses = [\"192.0.2.1\"]\n{ns}"),
                "[proxy.dns] listen `0.0.0.0:80` is already used",
            ),
            (
                &format!("{ok}nameservers = {{ \"bad_name.example\" = [] }}\n"),
                "nameservers `bad_name.example`",
            ),
            (
                &format!("{ok}nameservers = {{ \"ns1.gw.example.org\" = [] }}\n"),
                "inside a gateway domain, so this hub answers for it",
            ),
            (
                &format!("{ok}nameservers = {{ \"ns.example.net\" = [\"192.0.2.1\"] }}\n"),
                "outside the gateway domains",
            ),
            (
                &format!("{ok}nameservers = {{ \"ns1.gw.example.org\" = [\"::1\"] }}\n"),
                "`::1` cannot be reached",
            ),
            (&format!("{okn}ttl = 86401\n"), "ttl: 0 to 86400"),
            (
                &format!("{okn}rate_limit = 0\nrate_burst = 5\n"),
                "[proxy.dns]: rate_burst with rate_limit = 0",
            ),
            (
                &format!("{okn}rate_burst = 0\n"),
                "rate_limit and rate_burst: 1 to 1000000",
            ),
            (
                &format!("{okn}rate_limit = 1000001\n"),
                "rate_limit and rate_burst: 1 to 1000000",
            ),
            (&format!("{okn}zone = \"x\"\n"), "unknown field"),
            (ok, "[proxy.dns] needs nameservers"),
            (
                &format!("{ok}nameservers = {{ \"gw.example.org\" = [\"192.0.2.1\"] }}\n"),
                "a gateway domain itself cannot be a name server",
            ),
            (
                &format!("{ok}nameservers = {{ \"ns1\" = [] }}\n"),
                "needs a full domain name",
            ),
            (
                &format!("listen = [\"203.0.113.1:53\"]\naddresses = [{}]\n{ns}", (1..=9).map(|i| format!("\"192.0.2.{i}\"")).collect::<Vec<_>>().join(", ")),
                "at most 8 addresses",
            ),
            (
                &format!("listen = [\"203.0.113.1:53\", \"0.0.0.0:53\"]\naddresses = [\"192.0.2.1\"]\n{ns}"),
                "`0.0.0.0:53` is already used",
            ),
        ] {
            let e = parse(&format!("{head}[proxy.dns]\n{body}")).unwrap_err();
            assert!(e.contains(want), "{body}: {e}");
        }
        let e = parse(&format!("[proxy.dns]\n{okn}")).unwrap_err();
        assert!(e.contains("needs at least one gateway domain"), "{e}");
        // The same listener in both places.
        let e = parse(&format!(
            "{head}[proxy.acme]\ndirectory = \"https://acme.example/dir\"\nstate_dir = \"acme\"\n\
             dns_listen = [\"203.0.113.1:53\"]\n[proxy.dns]\n{okn}"
        ))
        .unwrap_err();
        assert!(e.contains("also in [proxy.acme] dns_listen"), "{e}");
        // The acme listener alone serves the zone too.
        let c = parse(&format!(
            "{head}[proxy.acme]\ndirectory = \"https://acme.example/dir\"\nstate_dir = \"acme\"\n\
             dns_listen = [\"203.0.113.1:53\"]\n[proxy.dns]\naddresses = [\"203.0.113.1\"]\n{ns}"
        ))
        .unwrap();
        assert_eq!(super::DnsSettings::listeners(&c.proxy.unwrap()).len(), 1);
        // The DNS-01 listener without [proxy.dns] is rate limited too.
        let c = parse(&format!(
            "{head}[proxy.acme]\ndirectory = \"https://acme.example/dir\"\nstate_dir = \"acme\"\n\
             dns_listen = [\"203.0.113.1:53\"]\n"
        ))
        .unwrap();
        let p = c.proxy.unwrap();
        assert_eq!(super::DnsSettings::listeners(&p).len(), 1);
        assert_eq!(super::DnsSettings::rate(&p), Some(super::DNS_RATE_DEFAULT));
        // A wildcard certificate's challenge answered on [proxy.dns] listen alone.
        let c = parse(&format!(
            "{head}[proxy.acme]\ndirectory = \"https://acme.example/dir\"\nstate_dir = \"acme\"\n\
             wildcard = true\n[proxy.dns]\n{okn}"
        ))
        .unwrap();
        assert!(c.proxy.unwrap().acme.unwrap().wildcard);
        // The zone's addresses are the hub's own: no backend there.
        let e = parse(&format!(
            "{head}[proxy.dns]\nlisten = [\"0.0.0.0:53\"]\naddresses = [\"198.51.100.7\"]\n{ns}\
             [[route]]\nname = \"x\"\nbackends = [\"198.51.100.7:80\"]\n"
        ))
        .unwrap_err();
        assert!(e.contains("198.51.100.7"), "{e}");
    }

    #[test]
    fn acme_and_balancing_keys() {
        let c = parse(
            "[proxy]\ndomains = [\"gw.example.org\"]\n\
             [proxy.acme]\ndirectory = \"https://acme.example/dir\"\nstate_dir = \"acme\"\n\
             challenge = \"tls-alpn-01\"\n\
             [[route]]\nname = \"blog\"\nacme = true\nbackends = [\"100.64.0.3:80\", \"100.64.0.4:80\"]\n\
             balance = \"least_conn\"\nsticky = true\nhealth_check = \"http\"\nhealth_path = \"/hz\"\n\
             health_interval = 1\nmax_connections = 10\n\
             [[tcp]]\nlisten = \"0.0.0.0:2222\"\nbackends = [\"100.64.0.2:22\"]\nproxy_protocol = \"v1\"\n",
        )
        .unwrap();
        let p = c.proxy.unwrap();
        let a = p.acme.unwrap();
        assert_eq!(a.state_dir, Path::new("/etc/gw/acme"));
        assert_eq!(a.challenge, super::AcmeChallenge::TlsAlpn01);
        let r = &p.routes[0];
        assert!(r.acme);
        assert_eq!(r.balance.policy, super::Policy::LeastConn);
        assert!(r.balance.sticky);
        assert_eq!(r.balance.max_connections, Some(10));
        assert_eq!(
            r.balance.health.as_ref().unwrap().kind,
            super::HealthKind::Http { path: "/hz".into() }
        );
        assert_eq!(p.tcp[0].proxy_protocol, super::ProxyProtocol::V1);
        let e =
            parse("[[route]]\nfqdn = \"a.example\"\nacme = true\nbackends = [\"100.64.0.9:80\"]\n")
                .unwrap_err();
        assert!(e.contains("[proxy.acme]"), "{e}");
        let e = parse("[[udp]]\nlisten = \"0.0.0.0:53\"\nbackends = [\"100.64.0.9:53\"]\nhealth_check = \"tcp\"\n")
            .unwrap_err();
        assert!(e.contains("UDP"), "{e}");
        // A time out of range names the entry it is in, not `[proxy]`.
        let e = parse("[[udp]]\nlisten = \"0.0.0.0:53\"\nbackends = [\"100.64.0.9:53\"]\nflow_idle_timeout = 0\n")
            .unwrap_err();
        assert!(
            e.contains("[[udp]] #1: flow_idle_timeout: must be at least 1 second")
                && !e.contains("[proxy]"),
            "{e}"
        );
        let e = parse("[[tcp]]\nlisten = \"0.0.0.0:22\"\nbackends = [\"100.64.0.9:22\"]\nhealth_check = \"tcp\"\nhealth_interval = 90000\n")
            .unwrap_err();
        assert!(
            e.contains("[[tcp]] #1: health_interval: at most 86400 seconds")
                && !e.contains("[proxy]"),
            "{e}"
        );
        let e = parse("[proxy]\nidle_timeout = 0\n").unwrap_err();
        assert!(
            e.contains("[proxy] idle_timeout: must be at least 1 second"),
            "{e}"
        );
        let e = parse("[[tcp]]\nlisten = \"0.0.0.0:22\"\nbackends = [\"100.64.0.9:22\"]\nproxy_protocol = \"v3\"\n")
            .unwrap_err();
        assert!(e.contains("v3"), "{e}");
        let e = parse("[[tcp]]\nlisten = \"0.0.0.0:5432\"\nbackends = [\"100.64.0.9:5432\"]\ncert = \"c.pem\"\n")
            .unwrap_err();
        assert!(
            e.contains("[[tcp]] #1") && e.contains("`cert` and `key`"),
            "{e}"
        );
        let c = parse("[[tcp]]\nlisten = \"0.0.0.0:5432\"\nbackends = [\"100.64.0.9:5432\"]\ncert = \"c.pem\"\nkey = \"k.pem\"\n")
            .unwrap();
        let Some(super::TcpTls::Files(tls)) = c.proxy.unwrap().tcp[0].tls.clone() else {
            panic!("files")
        };
        assert!(
            tls.cert.is_absolute() && tls.key.ends_with("k.pem"),
            "{tls:?}"
        );
        // An ACME certificate for a TCP forward.
        const ACME: &str =
            "[proxy.acme]\ndirectory = \"https://acme.example/dir\"\nstate_dir = \"acme\"\n";
        let tcp = |extra: &str| {
            format!("[[tcp]]\nlisten = \"0.0.0.0:5432\"\nbackends = [\"100.64.0.9:5432\"]\n{extra}")
        };
        let c = parse(&format!("{ACME}{}", tcp("acme = \"DB.Example.org\"\n"))).unwrap();
        assert_eq!(
            c.proxy.unwrap().tcp[0].tls,
            Some(super::TcpTls::Acme(
                crate::proxy::names::DomainName::parse("db.example.org").unwrap()
            ))
        );
        let e = parse(&tcp("acme = \"db.example.org\"\n")).unwrap_err();
        assert!(
            e.contains("[[tcp]] #1") && e.contains("[proxy.acme]"),
            "{e}"
        );
        let e = parse(&format!(
            "{ACME}{}",
            tcp("acme = \"db.example.org\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n")
        ))
        .unwrap_err();
        assert!(e.contains("not both"), "{e}");
        let e = parse(&format!("{ACME}{}", tcp("acme = \"db..example\"\n"))).unwrap_err();
        assert!(e.contains("acme `db..example`"), "{e}");
    }

    #[test]
    fn rate_limit_keys() {
        let r = "[[route]]\nfqdn = \"a.example\"\nbackends = [\"100.64.0.9:80\"]\n";
        let c = parse(&format!("{r}rate_limit = 20\nrate_burst = 50\n")).unwrap();
        assert_eq!(
            c.proxy.unwrap().routes[0].rate_limit,
            Some(super::RateLimit {
                per_second: 20,
                burst: 50
            })
        );
        let c = parse(&format!("{r}rate_limit = 20\n")).unwrap();
        assert_eq!(c.proxy.unwrap().routes[0].rate_limit.unwrap().burst, 20);
        let c = parse(
            "[[tcp]]\nlisten = \"0.0.0.0:22\"\nbackends = [\"100.64.0.9:22\"]\nrate_limit = 1\n",
        )
        .unwrap();
        assert_eq!(c.proxy.unwrap().tcp[0].rate_limit.unwrap().per_second, 1);
        let e = parse(&format!("{r}rate_burst = 5\n")).unwrap_err();
        assert!(
            e.contains("a.example") && e.contains("rate_burst needs rate_limit"),
            "{e}"
        );
        let e = parse(&format!("{r}rate_limit = 0\n")).unwrap_err();
        assert!(e.contains("1 to 1000000"), "{e}");
        let c = parse(
            "[[udp]]\nlisten = \"0.0.0.0:53\"\nbackends = [\"100.64.0.9:53\"]\nrate_limit = 100\nrate_burst = 200\n",
        )
        .unwrap();
        assert_eq!(c.proxy.unwrap().udp[0].rate_limit.unwrap().burst, 200);
    }

    #[test]
    fn proxy_protocol_from_key() {
        let c =
            parse("[proxy]\nproxy_protocol_from = [\"10.0.0.0/8\", \"2001:db8::5\"]\n").unwrap();
        let a = c.proxy.unwrap().proxy_protocol_from.unwrap();
        assert!(a.permits("10.1.2.3".parse().unwrap()));
        assert!(a.permits("2001:db8::5".parse().unwrap()));
        assert!(!a.permits("192.0.2.1".parse().unwrap()));
        assert!(parse("[proxy]\n")
            .unwrap()
            .proxy
            .unwrap()
            .proxy_protocol_from
            .is_none());
        let e = parse("[proxy]\nproxy_protocol_from = [\"10.0.0.1/8\"]\n").unwrap_err();
        assert!(
            e.starts_with("hub.toml") || e.contains("[proxy] proxy_protocol_from: `10.0.0.1/8`"),
            "{e}"
        );
        assert!(
            e.contains("proxy_protocol_from") && e.contains("10.0.0.0/8"),
            "{e}"
        );
    }

    #[test]
    fn trusted_proxies_key() {
        let c = parse("[proxy]\ntrusted_proxies = [\"192.0.2.0/24\"]\n").unwrap();
        let a = c.proxy.unwrap().trusted_proxies.unwrap();
        assert!(a.permits("192.0.2.7".parse().unwrap()));
        assert!(!a.permits("198.51.100.1".parse().unwrap()));
        assert!(parse("[proxy]\n")
            .unwrap()
            .proxy
            .unwrap()
            .trusted_proxies
            .is_none());
        let e = parse("[proxy]\ntrusted_proxies = [\"proxy.example\"]\n").unwrap_err();
        assert!(e.contains("trusted_proxies"), "{e}");
    }

    #[test]
    fn per_source_connections_default_to_a_sixteenth() {
        let limits = |keys: &str| {
            let l = parse(&format!("[proxy]\n{keys}\n"))
                .unwrap()
                .proxy
                .unwrap()
                .limits;
            (l.max_connections, l.max_connections_per_source)
        };
        assert_eq!(limits(""), (4096, 256));
        assert_eq!(super::Limits::default().max_connections_per_source, 256);
        assert_eq!(limits("max_connections = 32000"), (32000, 2000));
        // At least 64, at most all of them.
        assert_eq!(limits("max_connections = 500"), (500, 64));
        assert_eq!(limits("max_connections = 10"), (10, 10));
        // A value of the operator's stands.
        assert_eq!(limits("max_connections_per_source = 1000"), (4096, 1000));
    }

    #[test]
    fn access_log_key_is_resolved() {
        let c = parse("[proxy]\naccess_log = \"log/access.log\"\n").unwrap();
        assert_eq!(
            c.proxy.unwrap().access_log.unwrap(),
            Path::new("/etc/gw/log/access.log")
        );
        let c = parse("[proxy]\n").unwrap();
        assert_eq!(c.proxy.unwrap().access_log, None);
    }

    #[test]
    fn allow_and_deny_keys() {
        let c = parse(
            "[[route]]\nfqdn = \"admin.example\"\nbackends = [\"100.64.0.9:80\"]\n\
             allow = [\"192.0.2.0/24\", \"2001:db8::/32\"]\ndeny = [\"192.0.2.9\"]\n\
             [[tcp]]\nlisten = \"0.0.0.0:5432\"\nbackends = [\"100.64.0.9:5432\"]\nallow = [\"198.51.100.0/24\"]\n\
             [[udp]]\nlisten = \"0.0.0.0:5353\"\nbackends = [\"100.64.0.9:53\"]\ndeny = [\"203.0.113.0/24\"]\n",
        )
        .unwrap();
        let p = c.proxy.unwrap();
        let r = &p.routes[0].access;
        assert!(r.permits("192.0.2.8".parse().unwrap()));
        assert!(!r.permits("192.0.2.9".parse().unwrap()));
        assert!(r.permits("2001:db8::1".parse().unwrap()));
        assert!(!r.permits("198.51.100.1".parse().unwrap()));
        assert!(p.tcp[0].access.permits("198.51.100.1".parse().unwrap()));
        assert!(!p.tcp[0].access.permits("192.0.2.8".parse().unwrap()));
        assert!(!p.udp[0].access.permits("203.0.113.1".parse().unwrap()));
        assert!(p.udp[0].access.permits("192.0.2.8".parse().unwrap()));
        // No keys: open.
        let c = parse("[[tcp]]\nlisten = \"0.0.0.0:5432\"\nbackends = [\"100.64.0.9:5432\"]\n")
            .unwrap();
        assert!(c.proxy.unwrap().tcp[0].access.is_open());
        // Errors name the route or forward and the entry.
        let e = parse("[[route]]\nfqdn = \"admin.example\"\nbackends = [\"100.64.0.9:80\"]\nallow = [\"192.0.2.1/24\"]\n")
            .unwrap_err();
        assert!(
            e.contains("admin.example") && e.contains("allow") && e.contains("192.0.2.0/24"),
            "{e}"
        );
        let e = parse("[[udp]]\nlisten = \"0.0.0.0:5353\"\nbackends = [\"100.64.0.9:53\"]\ndeny = [\"nowhere\"]\n")
            .unwrap_err();
        assert!(
            e.contains("[[udp]] #1") && e.contains("deny") && e.contains("nowhere"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_and_loopback_are_named() {
        let e = parse("[proxy]\ndomain = [\"gw.example.org\"]\n").unwrap_err();
        assert!(e.contains("domain") && e.contains("line"), "{e}");
        let e =
            parse("[[route]]\nfqdn = \"a.example\"\nbackends = [\"100.64.0.9:80\"]\nbackend = 1\n")
                .unwrap_err();
        assert!(e.contains("backend"), "{e}");
        let e = parse("[[route]]\nfqdn = \"a.example\"\nbackends = [\"http://127.0.0.1:8080\"]\n")
            .unwrap_err();
        assert!(
            e.contains("a.example") && e.contains("127.0.0.1:8080") && e.contains("loopback"),
            "{e}"
        );
    }
}
