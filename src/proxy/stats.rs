//! Per-route counters: requests, bytes in and out (what a gateway bills), errors
//! by kind, backend health. Lock-free atomics, read as a [`RouteSnapshot`].

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a request or connection failed. `as_str` is the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No route for the Host (404).
    UnknownHost,
    /// No route for the SNI (TLS alert).
    UnknownSni,
    /// A ClientHello that could not be parsed, or not TLS at all.
    BadClientHello,
    /// The client did not finish its ClientHello or handshake in time.
    HandshakeTimeout,
    /// The TLS handshake with the client failed.
    TlsHandshake,
    /// The Host does not belong to the route chosen by SNI (421).
    Misdirected,
    /// Every backend is marked down (503).
    NoHealthyBackend,
    /// Backend refused or reset the connection (502).
    BackendRefused,
    /// Backend did not accept or answer in time (504).
    BackendTimeout,
    /// TLS to an https backend failed (502).
    BackendTls,
    /// The backend broke the HTTP exchange (502).
    BackendProtocol,
    /// The backend broke off a response it had begun (a reset or close
    /// mid-body, an HTTP/2 `RST_STREAM`): the client's answer is cut off.
    BackendAborted,
    /// The connection limit was reached; the connection was closed at once.
    OverCapacity,
    /// An idle client connection (an HTTP one between requests or before
    /// its first, a TLS handshake included) closed to make room for a new
    /// one when `max_connections` were open.
    Evicted,
    /// The route is paused (503, or a closed passthrough connection).
    Paused,
    /// The client's address is not admitted by the route's `allow`/`deny`
    /// rules (403, a TLS alert, a closed connection or a dropped datagram).
    Denied,
    /// The client went over the route's `rate_limit` (429, or a closed
    /// connection).
    RateLimited,
    /// A connection from a `proxy_protocol_from` address without a valid
    /// PROXY header in time (closed).
    BadProxyHeader,
    /// No or wrong credentials on a route with `basic_auth_file` (401), or
    /// a refusal from its `forward_auth` service (its answer).
    Unauthorized,
    /// The `forward_auth` service could not be reached or did not answer (503).
    AuthUnavailable,
    /// A UDP datagram beyond the forward's `bandwidth` (dropped).
    OverBandwidth,
    /// A message to the DNS listeners that is not a readable DNS query
    /// (dropped, or the TCP connection closed), or a UDP one from the port
    /// of a service that answers anything, such as chargen (dropped: its
    /// reply would start a loop).
    BadDnsQuery,
    /// A request path with a dot-segment on a route with `paths` (400).
    BadPath,
    /// A request body over the route's `max_body_size` (413).
    BodyTooLarge,
    /// A client's request body that gave nothing for `idle_timeout` (408).
    ClientTimeout,
    /// A client's request body that broke off (the client went away).
    ClientAborted,
    /// A plain HTTP connection with no complete request head within
    /// `header_timeout` of its accept (closed; a slowloris).
    HeaderTimeout,
    /// A request the hub does not pass on: more than one `Host`, none on
    /// HTTP/1.1, a `Host` that disagrees with an HTTP/2 request's authority
    /// (400), a `CONNECT` (405), a transfer coding other than `chunked`
    /// (501 or 400), an HTTP/1 head the parser refuses (400, 431).
    BadRequest,
    /// A client that took nothing of its response for `idle_timeout` (its
    /// TCP window, or its HTTP/2 stream's window, stayed shut): the
    /// connection, or the HTTP/2 stream, was cut off with the backend's
    /// answer.
    ClientNotReading,
}

impl ErrorKind {
    /// All kinds, in label order.
    pub const ALL: [ErrorKind; 29] = [
        ErrorKind::UnknownHost,
        ErrorKind::UnknownSni,
        ErrorKind::BadClientHello,
        ErrorKind::HandshakeTimeout,
        ErrorKind::TlsHandshake,
        ErrorKind::Misdirected,
        ErrorKind::NoHealthyBackend,
        ErrorKind::BackendRefused,
        ErrorKind::BackendTimeout,
        ErrorKind::BackendTls,
        ErrorKind::BackendProtocol,
        ErrorKind::BackendAborted,
        ErrorKind::OverCapacity,
        ErrorKind::Evicted,
        ErrorKind::Paused,
        ErrorKind::Denied,
        ErrorKind::RateLimited,
        ErrorKind::BadProxyHeader,
        ErrorKind::Unauthorized,
        ErrorKind::AuthUnavailable,
        ErrorKind::OverBandwidth,
        ErrorKind::BadDnsQuery,
        ErrorKind::BadPath,
        ErrorKind::BodyTooLarge,
        ErrorKind::ClientTimeout,
        ErrorKind::ClientAborted,
        ErrorKind::HeaderTimeout,
        ErrorKind::BadRequest,
        ErrorKind::ClientNotReading,
    ];

    /// Stable metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::UnknownHost => "unknown_host",
            ErrorKind::UnknownSni => "unknown_sni",
            ErrorKind::BadClientHello => "bad_client_hello",
            ErrorKind::HandshakeTimeout => "handshake_timeout",
            ErrorKind::TlsHandshake => "tls_handshake",
            ErrorKind::Misdirected => "misdirected",
            ErrorKind::NoHealthyBackend => "no_healthy_backend",
            ErrorKind::BackendRefused => "backend_refused",
            ErrorKind::BackendTimeout => "backend_timeout",
            ErrorKind::BackendTls => "backend_tls",
            ErrorKind::BackendProtocol => "backend_protocol",
            ErrorKind::BackendAborted => "backend_aborted",
            ErrorKind::OverCapacity => "over_capacity",
            ErrorKind::Evicted => "evicted",
            ErrorKind::Paused => "paused",
            ErrorKind::Denied => "denied",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::BadProxyHeader => "bad_proxy_header",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::AuthUnavailable => "auth_unavailable",
            ErrorKind::OverBandwidth => "over_bandwidth",
            ErrorKind::BadDnsQuery => "bad_dns_query",
            ErrorKind::BadPath => "bad_path",
            ErrorKind::BodyTooLarge => "body_too_large",
            ErrorKind::ClientTimeout => "client_timeout",
            ErrorKind::ClientAborted => "client_aborted",
            ErrorKind::HeaderTimeout => "header_timeout",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::ClientNotReading => "client_not_reading",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A certificate the hub serves, for `gatewire show --json` and the metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertStatus {
    /// The host it is for (`*.<domain>` for a wildcard).
    pub host: String,
    /// `file` (a route's or forward's `cert`/`key`) or `acme`.
    pub source: &'static str,
    /// The leaf's `notAfter`, Unix seconds (`None`: an ACME certificate
    /// not obtained yet).
    pub not_after: Option<u64>,
    /// ACME: when it is due for renewal, Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renew_at: Option<u64>,
    /// ACME: why the last order failed, while it has not succeeded since.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// ACME: when the failed order is tried again, Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<u64>,
    /// ACME: a certificate no longer wanted for itself, still served while
    /// the wildcard that replaces it (or the per-name certificate that
    /// replaces a wildcard) is not there yet; not renewed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub superseded: bool,
}

/// Counters of one route or forward (or of the listeners, for traffic no route took).
#[derive(Debug, Default)]
pub struct Counters {
    requests: AtomicU64,
    connections: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    errors: [AtomicU64; ErrorKind::ALL.len()],
}

impl Counters {
    /// One HTTP request (or one UDP flow).
    pub fn request(&self) {
        self.requests.fetch_add(1, Relaxed);
    }
    /// One accepted connection routed here.
    pub fn connection(&self) {
        self.connections.fetch_add(1, Relaxed);
    }
    /// Bytes from the client towards the backend.
    pub fn add_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Relaxed);
    }
    /// Bytes from the backend towards the client.
    pub fn add_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Relaxed);
    }
    /// One error of `kind`.
    pub fn error(&self, kind: ErrorKind) {
        if let Some(c) = self.errors.get(kind.index()) {
            c.fetch_add(1, Relaxed);
        }
    }
    /// Current count of `kind`.
    pub fn errors_of(&self, kind: ErrorKind) -> u64 {
        self.errors.get(kind.index()).map_or(0, |c| c.load(Relaxed))
    }

    /// The counters as `gatewire show` prints them: `requests` (UDP:
    /// flows), `connections`, `bytes_in`, `bytes_out`, and `errors` by kind
    /// (only non-zero kinds).
    pub fn show(&self) -> serde_json::Value {
        let (requests, connections, bytes_in, bytes_out, errors) = self.snapshot();
        serde_json::json!({
            "requests": requests,
            "connections": connections,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "errors": errors,
        })
    }

    fn snapshot(&self) -> (u64, u64, u64, u64, BTreeMap<&'static str, u64>) {
        let errors = ErrorKind::ALL
            .iter()
            .filter_map(|k| {
                let n = self.errors_of(*k);
                (n > 0).then_some((k.as_str(), n))
            })
            .collect();
        (
            self.requests.load(Relaxed),
            self.connections.load(Relaxed),
            self.bytes_in.load(Relaxed),
            self.bytes_out.load(Relaxed),
            errors,
        )
    }
}

/// Health of one backend as the proxy sees it (passive checks).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BackendHealth {
    /// `ip:port` (with `https://` for TLS backends).
    pub backend: String,
    /// False while the backend is skipped: a failed connect (for a while), a
    /// failing active check, or its node's tunnel down.
    pub up: bool,
    /// Failed connects so far.
    pub failures: u64,
    /// Open connections (HTTP: requests in flight) to it.
    pub active_connections: u64,
    /// Active check state: `passing`, `failing`; absent without active checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<&'static str>,
    /// Failed active checks so far.
    pub checks_failed: u64,
    /// Its node's tunnel: `up`, `down`; absent when no node carries it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<&'static str>,
    /// The route's path prefix it serves (`[[route.paths]]`); absent for
    /// the route's own backends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// A point-in-time copy of one route's counters.
#[derive(Debug, Clone, Serialize)]
pub struct RouteSnapshot {
    /// `name:blog`, `fqdn:www.example.com`, `tcp:0.0.0.0:2222`, `udp:...`,
    /// `listener` for traffic that matched no route, `mesh` for traffic
    /// sent to other hubs, or `dns` for the DNS listeners.
    pub route: String,
    /// Hosts served (`blog.gw.example.org`, ...), empty for forwards.
    pub hosts: Vec<String>,
    /// HTTP requests (UDP: flows).
    pub requests: u64,
    /// Client connections routed here.
    pub connections: u64,
    /// Client-to-backend bytes.
    pub bytes_in: u64,
    /// Backend-to-client bytes.
    pub bytes_out: u64,
    /// Errors by kind (only non-zero kinds).
    pub errors: BTreeMap<&'static str, u64>,
    /// Backends and their health.
    pub backends: Vec<BackendHealth>,
    /// The route's `bandwidth` in bytes per second each way, if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<u64>,
}

impl RouteSnapshot {
    /// Notes the route's `bandwidth` limit.
    pub(crate) fn with_bandwidth(mut self, t: &crate::proxy::io::Throttle) -> Self {
        self.bandwidth = Some(t.rate()).filter(|r| *r > 0);
        self
    }

    pub(crate) fn new(
        route: String,
        hosts: Vec<String>,
        c: &Counters,
        backends: Vec<BackendHealth>,
    ) -> Self {
        let (requests, connections, bytes_in, bytes_out, errors) = c.snapshot();
        RouteSnapshot {
            route,
            hosts,
            requests,
            connections,
            bytes_in,
            bytes_out,
            errors,
            bandwidth: None,
            backends,
        }
    }
}
