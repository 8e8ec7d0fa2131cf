//! Prometheus metrics of the hub, rendered at scrape time from snapshots: the
//! device's `show()` state, the proxy's per-route counters and the control
//! plane's counters. The admin API serves [`render`] at `GET /metrics` with
//! [`CONTENT_TYPE`].
//!
//! The format is the Prometheus text exposition format 0.0.4, written by the
//! small encoder below rather than by the `prometheus-client` crate: that crate
//! writes only OpenMetrics, whose counters (`# TYPE x counter` over samples
//! named `x_total`) the classic text parsers (Prometheus' own
//! `text/plain` parser, Python's `prometheus_client.parser`) do not read as
//! counters. Here a counter family is named with its `_total` suffix and its
//! samples carry that same name, as the text format has it.
//!
//! Every family starts with `# HELP` and `# TYPE`, all its samples follow
//! together, and a family without samples is left out. Label values escape `\`,
//! `"` and newline; values are integers.
//!
//! Families (`peer` is the base64 public key; `name` is present when set):
//!
//! | family | type | labels |
//! |---|---|---|
//! | `gatewire_info` | gauge (1) | `interface`, `mode`, `public_key` |
//! | `gatewire_peers`, `gatewire_peers_up` | gauge | |
//! | `gatewire_peer_up` | gauge (1/0) | `peer`, `name` |
//! | `gatewire_peer_receive_bytes_total`, `gatewire_peer_transmit_bytes_total` | counter | `peer`, `name` |
//! | `gatewire_peer_latest_handshake_seconds` | gauge (unix time, 0: never) | `peer`, `name` |
//! | `gatewire_peer_drops_total` | counter | `peer`, `name`, `reason` |
//! | `gatewire_handshakes_total` | counter | |
//! | `gatewire_drops_total`, `gatewire_xlat_drops_total` | counter | `reason` |
//! | `gatewire_nat64_sessions`, `gatewire_nat64_bindings`, `gatewire_nat64_fragment_flows`, `gatewire_nat64_held_fragments` | gauge | |
//! | `gatewire_nat64_early_fragments_total` | counter | |
//! | `gatewire_route_requests_total`, `gatewire_route_connections_total` | counter | `route` |
//! | `gatewire_route_in_bytes_total`, `gatewire_route_out_bytes_total` | counter | `route` |
//! | `gatewire_route_errors_total` | counter | `route`, `kind` |
//! | `gatewire_backend_up` | gauge (1/0) | `route`, `backend`; `path` for a path prefix's backends |
//! | `gatewire_backend_active_connections` | gauge | `route`, `backend`; `path` |
//! | `gatewire_backend_failures_total`, `gatewire_backend_checks_failed_total` | counter | `route`, `backend`; `path` |
//! | `gatewire_certificate_not_after_seconds` | gauge (unix time) | `host`, `source` (`file`, `acme`) |
//! | `gatewire_acme_order_failing` | gauge (1/0) | `host` |
//! | `gatewire_access_log_dropped_total` | counter (with `[proxy] access_log`) | |
//! | `gatewire_state_version`, `gatewire_services_active`, `gatewire_services_refused` | gauge | |
//! | `gatewire_api_requests_total`, `gatewire_api_errors_total`, `gatewire_joins_total` | counter | |
//! | `gatewire_config_reloads_total`, `gatewire_config_reload_failures_total` | counter | |
//! | `gatewire_config_last_reload_successful` | gauge (1/0; 1 before any reload) | |
//! | `gatewire_tls_tunnels_open` | gauge | |
//! | `gatewire_tls_tunnels_total`, `gatewire_tls_tunnels_failed_total`, `gatewire_tls_tunnels_bad_frames_total`, `gatewire_tls_tunnels_evicted_total`, `gatewire_tls_tunnels_superseded_total` | counter | |
//! | `gatewire_tls_tunnels_receive_bytes_total`, `gatewire_tls_tunnels_transmit_bytes_total` | counter | |
//! | `gatewire_mesh_etcd_connected` | gauge (1/0) | |
//! | `gatewire_mesh_hubs`, `gatewire_mesh_published_hosts` | gauge | |
//! | `gatewire_mesh_forwarded_total`, `gatewire_mesh_received_total`, `gatewire_mesh_bad_records_total` | counter | |
//! | `gatewire_mesh_refused_total`, `gatewire_mesh_unacknowledged_total`, `gatewire_mesh_declined_total` | counter | |
//! | `gatewire_mesh_acme_certificates`, `gatewire_mesh_acme_orders` | gauge | |
//! | `gatewire_mesh_acme_answered_total`, `gatewire_mesh_bad_seals_total` | counter | |
//! | `gatewire_mesh_name_claims`, `gatewire_mesh_name_conflicts` | gauge | |
//!
//! The bytes and errors of connections sent to other hubs are the route
//! families' samples with `route="mesh"`; the queries to the DNS listeners
//! (`[proxy.acme] dns_listen`) are the samples with `route="dns"`
//! (`requests_total` counts the queries answered).
//!
//! A peer is up when its latest handshake is at most [`UP_WINDOW`] seconds old.
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use crate::proxy::stats::{CertStatus, ErrorKind, RouteSnapshot};
use crate::wg::device::{Mode, ShowInterface, ShowPeer};
use std::fmt::Write as _;

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Seconds since its latest handshake within which a peer counts as up
/// (WireGuard's REJECT_AFTER_TIME: a session older than that is dead).
pub const UP_WINDOW: u64 = 180;

/// What one scrape renders.
pub struct MetricsInput<'a> {
    /// The hub's device, when it runs.
    pub device: Option<&'a ShowInterface>,
    /// The proxy's routes and forwards.
    pub routes: &'a [RouteSnapshot],
    /// The certificates the proxy serves or keeps.
    pub certificates: &'a [CertStatus],
    /// Entries the proxy's access log lost, when it has one.
    pub access_log_dropped: Option<u64>,
    /// The control plane's counters.
    pub control: ControlCounters,
    /// Nodes' tunnels carried over TLS, when the hub takes them.
    pub tls_tunnels: Option<crate::carrier::CountersSnapshot>,
    /// The hub mesh, when `[mesh]` is on.
    pub mesh: Option<crate::mesh::MeshView>,
}

/// Counters the control plane keeps.
#[derive(Debug, Default, Clone, Copy)]
pub struct ControlCounters {
    /// Version of the durable state.
    pub state_version: u64,
    /// Admin API requests served.
    pub api_requests: u64,
    /// Admin API requests answered with an error status.
    pub api_errors: u64,
    /// Nodes that joined with a token.
    pub joins: u64,
    /// Node-declared services now active.
    pub services_active: u64,
    /// Node-declared services now refused.
    pub services_refused: u64,
    /// Config reloads of the hub (a changed file, SIGHUP).
    pub config_reloads: u64,
    /// Config reloads that failed (and applied nothing).
    pub config_reload_failures: u64,
    /// Whether the last config reload failed (none yet: false).
    pub config_last_reload_failed: bool,
}

/// Renders every metric, judging peers up against the current time.
pub fn render(input: &MetricsInput) -> String {
    render_at(input, crate::clock::unix_secs())
}

/// Renders every metric, judging peers up against `now` (unix seconds).
pub fn render_at(input: &MetricsInput, now: u64) -> String {
    let mut w = Writer::default();
    if let Some(dev) = input.device {
        device(&mut w, dev, now);
    }
    routes(&mut w, input.routes);
    certificates(&mut w, input.certificates);
    if let Some(n) = input.access_log_dropped {
        w.family(
            "gatewire_access_log_dropped_total",
            "Access log entries lost: the writer fell behind, or the file refused them.",
            Kind::Counter,
            |f| f.sample(&[], n),
        );
    }
    control(&mut w, &input.control);
    if let Some(t) = &input.tls_tunnels {
        tls_tunnels(&mut w, t);
    }
    if let Some(m) = &input.mesh {
        mesh(&mut w, m);
    }
    w.out
}

fn mesh(w: &mut Writer, m: &crate::mesh::MeshView) {
    let families: [(&'static str, &'static str, Kind, u64); 15] = [
        (
            "gatewire_mesh_etcd_connected",
            "1 while the mesh's etcd session is up (else the last table serves).",
            Kind::Gauge,
            u64::from(m.etcd_connected),
        ),
        (
            "gatewire_mesh_hubs",
            "Other hubs in the mesh table.",
            Kind::Gauge,
            m.hubs.len() as u64,
        ),
        (
            "gatewire_mesh_published_hosts",
            "Hosts this hub publishes to the mesh.",
            Kind::Gauge,
            m.published_hosts as u64,
        ),
        (
            "gatewire_mesh_forwarded_total",
            "Connections sent to another hub that serves their host.",
            Kind::Counter,
            m.forwarded,
        ),
        (
            "gatewire_mesh_received_total",
            "Connections other hubs sent here.",
            Kind::Counter,
            m.received,
        ),
        (
            "gatewire_mesh_refused_total",
            "Tries of another hub that refused a connection (no route, paused, full): the next hub was tried.",
            Kind::Counter,
            m.refused,
        ),
        (
            "gatewire_mesh_unacknowledged_total",
            "Tries of another hub that closed a connection, or did not answer whether it took it in time.",
            Kind::Counter,
            m.unacknowledged,
        ),
        (
            "gatewire_mesh_declined_total",
            "Connections another hub sent that this hub refused (it tried the next).",
            Kind::Counter,
            m.declined,
        ),
        (
            "gatewire_mesh_bad_records_total",
            "Records of other hubs and shared ACME keys left out as malformed.",
            Kind::Counter,
            m.bad_records,
        ),
        (
            "gatewire_mesh_acme_certificates",
            "ACME certificates stored in the mesh.",
            Kind::Gauge,
            m.acme_certificates as u64,
        ),
        (
            "gatewire_mesh_acme_orders",
            "ACME orders running in the mesh now (one hub per host).",
            Kind::Gauge,
            m.acme_orders.len() as u64,
        ),
        (
            "gatewire_mesh_acme_answered_total",
            "ACME validations this hub answered for another hub's order.",
            Kind::Counter,
            m.acme_answered,
        ),
        (
            "gatewire_mesh_bad_seals_total",
            "Sealed PROXY headers refused (another secret, changed, or too old).",
            Kind::Counter,
            m.bad_seals,
        ),
        (
            "gatewire_mesh_name_claims",
            "Name claims this hub holds in the mesh (hosts of the names it grants).",
            Kind::Gauge,
            m.own_name_claims as u64,
        ),
        (
            "gatewire_mesh_name_conflicts",
            "Hosts granted here that the mesh holds for another node (their routes are off).",
            Kind::Gauge,
            m.name_conflicts.len() as u64,
        ),
    ];
    for (name, help, kind, v) in families {
        w.family(name, help, kind, |f| f.sample(&[], v));
    }
}

fn tls_tunnels(w: &mut Writer, t: &crate::carrier::CountersSnapshot) {
    let families: [(&'static str, &'static str, Kind, u64); 8] = [
        (
            "gatewire_tls_tunnels_open",
            "Nodes' tunnels carried over TLS open now.",
            Kind::Gauge,
            t.open,
        ),
        (
            "gatewire_tls_tunnels_total",
            "Tunnels carried over TLS set up (TLS handshake done).",
            Kind::Counter,
            t.streams,
        ),
        (
            "gatewire_tls_tunnels_failed_total",
            "Connections offering the tunnel ALPN that failed the TLS handshake.",
            Kind::Counter,
            t.failed,
        ),
        (
            "gatewire_tls_tunnels_bad_frames_total",
            "Carried tunnels closed for a broken frame.",
            Kind::Counter,
            t.bad_frames,
        ),
        (
            "gatewire_tls_tunnels_evicted_total",
            "Carried tunnels closed before carrying a session, to make room for a new one.",
            Kind::Counter,
            t.evicted,
        ),
        (
            "gatewire_tls_tunnels_superseded_total",
            "Carried tunnels closed because the peer they served moved on to newer ones.",
            Kind::Counter,
            t.superseded,
        ),
        (
            "gatewire_tls_tunnels_receive_bytes_total",
            "WireGuard datagram bytes received from carried tunnels.",
            Kind::Counter,
            t.bytes_in,
        ),
        (
            "gatewire_tls_tunnels_transmit_bytes_total",
            "WireGuard datagram bytes sent into carried tunnels.",
            Kind::Counter,
            t.bytes_out,
        ),
    ];
    for (name, help, kind, v) in families {
        w.family(name, help, kind, |f| f.sample(&[], v));
    }
}

/// A peer is up when it completed a handshake within [`UP_WINDOW`] of `now`.
fn peer_up(p: &ShowPeer, now: u64) -> bool {
    p.latest_handshake
        .is_some_and(|t| now.saturating_sub(t) <= UP_WINDOW)
}

fn device(w: &mut Writer, dev: &ShowInterface, now: u64) {
    let mode = match dev.mode {
        Mode::Hub => "hub",
        Mode::Node => "node",
        Mode::Wg => "wg",
    };
    w.family(
        "gatewire_info",
        "The WireGuard interface: its name, mode and public key.",
        Kind::Gauge,
        |f| {
            f.sample(
                &[
                    ("interface", &dev.name),
                    ("mode", mode),
                    ("public_key", dev.public_key.as_deref().unwrap_or("")),
                ],
                1,
            )
        },
    );
    w.family(
        "gatewire_peers",
        "Configured peers (tunnels).",
        Kind::Gauge,
        |f| f.sample(&[], dev.peers.len() as u64),
    );
    let up = dev.peers.iter().filter(|p| peer_up(p, now)).count();
    w.family(
        "gatewire_peers_up",
        "Peers whose latest handshake is at most 180 s old.",
        Kind::Gauge,
        |f| f.sample(&[], up as u64),
    );
    peer_family(
        w,
        dev,
        "gatewire_peer_up",
        "1 when the peer's latest handshake is at most 180 s old, else 0.",
        Kind::Gauge,
        |p| u64::from(peer_up(p, now)),
    );
    peer_family(
        w,
        dev,
        "gatewire_peer_receive_bytes_total",
        "Bytes received from the peer (authenticated datagrams).",
        Kind::Counter,
        |p| p.rx_bytes,
    );
    peer_family(
        w,
        dev,
        "gatewire_peer_transmit_bytes_total",
        "Bytes sent to the peer.",
        Kind::Counter,
        |p| p.tx_bytes,
    );
    peer_family(
        w,
        dev,
        "gatewire_peer_latest_handshake_seconds",
        "Unix time of the peer's latest handshake (0: never).",
        Kind::Gauge,
        |p| p.latest_handshake.unwrap_or(0),
    );
    w.family(
        "gatewire_peer_drops_total",
        "Packets from the peer dropped, by reason.",
        Kind::Counter,
        |f| {
            for p in &dev.peers {
                for (reason, n) in &p.drops {
                    f.sample(&peer_labels(p, Some(reason)), *n);
                }
            }
        },
    );
    w.family(
        "gatewire_handshakes_total",
        "Handshakes completed: initiations answered and responses accepted.",
        Kind::Counter,
        |f| f.sample(&[], dev.handshakes),
    );
    w.family(
        "gatewire_drops_total",
        "Packets the device dropped (cookie_sent: answered with a cookie), by reason.",
        Kind::Counter,
        |f| {
            for (reason, n) in &dev.drops {
                f.sample(&[("reason", reason)], *n);
            }
        },
    );
    if let Some(x) = &dev.xlat_drops {
        w.family(
            "gatewire_xlat_drops_total",
            "Packets the translator dropped or answered with an ICMP error, by reason.",
            Kind::Counter,
            |f| {
                for (reason, n) in x {
                    f.sample(&[("reason", reason)], *n);
                }
            },
        );
    }
    if let Some(n) = &dev.nat64 {
        w.family(
            "gatewire_nat64_sessions",
            "NAT64 sessions.",
            Kind::Gauge,
            |f| f.sample(&[], n.sessions as u64),
        );
        w.family(
            "gatewire_nat64_bindings",
            "NAT64 bindings (BIB entries).",
            Kind::Gauge,
            |f| f.sample(&[], n.bindings as u64),
        );
        w.family(
            "gatewire_nat64_fragment_flows",
            "Fragmented datagrams whose later fragments NAT64 expects.",
            Kind::Gauge,
            |f| f.sample(&[], n.fragments as u64),
        );
        w.family(
            "gatewire_nat64_held_fragments",
            "Later fragments NAT64 holds until their first fragment comes.",
            Kind::Gauge,
            |f| f.sample(&[], n.held_fragments as u64),
        );
        w.family(
            // Not `..._held_fragments_total`: readers that strip `_total`
            // (OpenMetrics) would take it for the gauge above.
            "gatewire_nat64_early_fragments_total",
            "Later fragments that came before their first fragment.",
            Kind::Counter,
            |f| f.sample(&[], n.held_fragments_total),
        );
    }
}

/// The `peer` and, when set, `name` labels, then `reason` when given.
fn peer_labels<'a>(p: &'a ShowPeer, reason: Option<&'a str>) -> Vec<(&'static str, &'a str)> {
    let mut l = vec![("peer", p.public_key.as_str())];
    if let Some(name) = &p.name {
        l.push(("name", name.as_str()));
    }
    if let Some(r) = reason {
        l.push(("reason", r));
    }
    l
}

/// A family with one sample per peer.
fn peer_family(
    w: &mut Writer,
    dev: &ShowInterface,
    name: &'static str,
    help: &'static str,
    kind: Kind,
    value: impl Fn(&ShowPeer) -> u64,
) {
    w.family(name, help, kind, |f| {
        for p in &dev.peers {
            f.sample(&peer_labels(p, None), value(p));
        }
    });
}

fn certificates(w: &mut Writer, certs: &[CertStatus]) {
    w.family(
        "gatewire_certificate_not_after_seconds",
        "Expiry (notAfter, unix time) of each certificate served; an ACME one not obtained yet has no sample.",
        Kind::Gauge,
        |f| {
            for c in certs {
                if let Some(na) = c.not_after {
                    f.sample(&[("host", &c.host), ("source", c.source)], na);
                }
            }
        },
    );
    w.family(
        "gatewire_acme_order_failing",
        "1 while the last ACME order for the host failed (it is retried with backoff).",
        Kind::Gauge,
        |f| {
            for c in certs.iter().filter(|c| c.source == "acme") {
                f.sample(&[("host", &c.host)], u64::from(c.error.is_some()));
            }
        },
    );
}

fn routes(w: &mut Writer, routes: &[RouteSnapshot]) {
    let per_route = |w: &mut Writer,
                     name: &'static str,
                     help: &'static str,
                     value: fn(&RouteSnapshot) -> u64| {
        w.family(name, help, Kind::Counter, |f| {
            for r in routes {
                f.sample(&[("route", &r.route)], value(r));
            }
        });
    };
    per_route(
        w,
        "gatewire_route_requests_total",
        "HTTP requests (UDP: flows) per route.",
        |r| r.requests,
    );
    per_route(
        w,
        "gatewire_route_connections_total",
        "Client connections routed, per route.",
        |r| r.connections,
    );
    per_route(
        w,
        "gatewire_route_in_bytes_total",
        "Bytes from clients towards backends, per route.",
        |r| r.bytes_in,
    );
    per_route(
        w,
        "gatewire_route_out_bytes_total",
        "Bytes from backends towards clients, per route.",
        |r| r.bytes_out,
    );
    w.family(
        "gatewire_route_errors_total",
        "Failed requests and connections per route, by kind.",
        Kind::Counter,
        |f| {
            for r in routes {
                // Every kind, zero included, so that rates exist from the start.
                for k in ErrorKind::ALL {
                    let kind = k.as_str();
                    let n = r.errors.get(kind).copied().unwrap_or(0);
                    f.sample(&[("route", &r.route), ("kind", kind)], n);
                }
                for (kind, n) in &r.errors {
                    if !ErrorKind::ALL.iter().any(|k| k.as_str() == *kind) {
                        f.sample(&[("route", &r.route), ("kind", kind)], *n);
                    }
                }
            }
        },
    );
    let per_backend =
        |w: &mut Writer,
         name: &'static str,
         help: &'static str,
         kind: Kind,
         value: fn(&crate::proxy::stats::BackendHealth) -> u64| {
            w.family(name, help, kind, |f| {
                for r in routes {
                    for b in &r.backends {
                        match &b.path {
                            // A path prefix's backends (the same address may
                            // also be one of the route's own).
                            Some(p) => f.sample(
                                &[("route", &r.route), ("path", p), ("backend", &b.backend)],
                                value(b),
                            ),
                            None => {
                                f.sample(&[("route", &r.route), ("backend", &b.backend)], value(b))
                            }
                        }
                    }
                }
            });
        };
    per_backend(
        w,
        "gatewire_backend_up",
        "1 while the proxy sends traffic to the backend, 0 while it skips it.",
        Kind::Gauge,
        |b| u64::from(b.up),
    );
    per_backend(
        w,
        "gatewire_backend_active_connections",
        "Open connections (HTTP: requests in flight) to the backend.",
        Kind::Gauge,
        |b| b.active_connections,
    );
    per_backend(
        w,
        "gatewire_backend_failures_total",
        "Failed connects to the backend.",
        Kind::Counter,
        |b| b.failures,
    );
    per_backend(
        w,
        "gatewire_backend_checks_failed_total",
        "Failed active health checks of the backend.",
        Kind::Counter,
        |b| b.checks_failed,
    );
}

fn control(w: &mut Writer, c: &ControlCounters) {
    let one = |w: &mut Writer, name: &'static str, help: &'static str, kind: Kind, v: u64| {
        w.family(name, help, kind, |f| f.sample(&[], v));
    };
    one(
        w,
        "gatewire_state_version",
        "Version of the control plane's durable state.",
        Kind::Gauge,
        c.state_version,
    );
    one(
        w,
        "gatewire_api_requests_total",
        "Admin API requests served.",
        Kind::Counter,
        c.api_requests,
    );
    one(
        w,
        "gatewire_api_errors_total",
        "Admin API requests answered with an error status.",
        Kind::Counter,
        c.api_errors,
    );
    one(
        w,
        "gatewire_joins_total",
        "Nodes that joined with a token.",
        Kind::Counter,
        c.joins,
    );
    one(
        w,
        "gatewire_services_active",
        "Node-declared services now active.",
        Kind::Gauge,
        c.services_active,
    );
    one(
        w,
        "gatewire_services_refused",
        "Node-declared services now refused.",
        Kind::Gauge,
        c.services_refused,
    );
    one(
        w,
        "gatewire_config_reloads_total",
        "Config reloads of the hub (a changed file, SIGHUP).",
        Kind::Counter,
        c.config_reloads,
    );
    one(
        w,
        "gatewire_config_reload_failures_total",
        "Config reloads that failed and applied nothing.",
        Kind::Counter,
        c.config_reload_failures,
    );
    one(
        w,
        "gatewire_config_last_reload_successful",
        "0 while the last config reload failed (the hub runs an older config than the file's), else 1.",
        Kind::Gauge,
        u64::from(!c.config_last_reload_failed),
    );
}

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// The text being built.
#[derive(Default)]
struct Writer {
    out: String,
}

impl Writer {
    /// Writes one family: `fill` adds its samples; nothing is written when it
    /// adds none.
    fn family(
        &mut self,
        name: &'static str,
        help: &'static str,
        kind: Kind,
        fill: impl FnOnce(&mut Family),
    ) {
        let mut f = Family {
            name,
            body: String::new(),
        };
        fill(&mut f);
        if f.body.is_empty() {
            return;
        }
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        self.out.push_str("# HELP ");
        self.out.push_str(name);
        self.out.push(' ');
        escape_help(&mut self.out, help);
        self.out.push('\n');
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        self.out.push_str(&f.body);
    }
}

/// The samples of one family.
struct Family {
    name: &'static str,
    body: String,
}

impl Family {
    fn sample(&mut self, labels: &[(&'static str, &str)], value: u64) {
        self.body.push_str(self.name);
        if !labels.is_empty() {
            self.body.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.body.push(',');
                }
                self.body.push_str(k);
                self.body.push_str("=\"");
                escape_label(&mut self.body, v);
                self.body.push('"');
            }
            self.body.push('}');
        }
        let _ = writeln!(self.body, " {value}");
    }
}

/// A label value: `\`, `"` and newline escaped.
fn escape_label(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A HELP text: `\` and newline escaped.
fn escape_help(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::proxy::stats::BackendHealth;
    use crate::wg::device::ShowNat64;
    use std::collections::{BTreeMap, HashMap, HashSet};

    const NOW: u64 = 1_700_000_000;

    fn peer(key: &str, name: Option<&str>, hs: Option<u64>, rx: u64) -> ShowPeer {
        ShowPeer {
            name: name.map(str::to_string),
            public_key: key.to_string(),
            endpoint: Some("192.0.2.7:51820".to_string()),
            allowed_ips: vec!["100.64.1.1/32".to_string()],
            latest_handshake: hs,
            rx_bytes: rx,
            tx_bytes: rx * 2,
            persistent_keepalive: None,
            drops: [("source_not_allowed".to_string(), 4)]
                .into_iter()
                .collect(),
        }
    }

    fn device() -> ShowInterface {
        ShowInterface {
            name: "gw0".to_string(),
            mode: Mode::Hub,
            public_key: Some("hubKey+/=".to_string()),
            listen_port: 51820,
            drops: [("no_route".to_string(), 3), ("replay".to_string(), 0)]
                .into_iter()
                .collect(),
            handshakes: 9,
            xlat_drops: Some([("no_pool4".to_string(), 2)].into_iter().collect()),
            nat64: Some(ShowNat64 {
                sessions: 5,
                bindings: 2,
                fragments: 1,
                held_fragments: 3,
                held_fragments_total: 11,
            }),
            peers: vec![
                peer("AAAA+/8=", Some("blog-node"), Some(NOW - 10), 100),
                peer("BBBB+/8=", None, Some(NOW - 1000), 200),
                peer("CCCC+/8=", Some("we\"ird\\name\nx"), None, 0),
            ],
        }
    }

    fn route() -> RouteSnapshot {
        RouteSnapshot {
            route: "name:blog".to_string(),
            hosts: vec!["blog.gw.example.org".to_string()],
            requests: 11,
            connections: 7,
            bytes_in: 1234,
            bytes_out: 5678,
            errors: [("backend_timeout", 2)].into_iter().collect(),
            bandwidth: None,
            backends: vec![
                BackendHealth {
                    backend: "[fd77:6777::1:1]:8080".to_string(),
                    up: true,
                    failures: 1,
                    active_connections: 3,
                    check: None,
                    checks_failed: 0,
                    tunnel: Some("up"),
                    path: None,
                },
                BackendHealth {
                    backend: "https://100.64.1.2:443".to_string(),
                    up: false,
                    failures: 6,
                    active_connections: 0,
                    check: Some("failing"),
                    checks_failed: 4,
                    tunnel: Some("down"),
                    path: None,
                },
                BackendHealth {
                    backend: "[fd77:6777::1:1]:8080".to_string(),
                    up: false,
                    failures: 9,
                    active_connections: 0,
                    check: None,
                    checks_failed: 0,
                    tunnel: Some("down"),
                    path: Some("/api".to_string()),
                },
            ],
        }
    }

    fn certs() -> Vec<CertStatus> {
        vec![
            CertStatus {
                host: "www.example.com".into(),
                source: "file",
                not_after: Some(NOW + 86_400),
                renew_at: None,
                error: None,
                retry_at: None,
                superseded: false,
            },
            CertStatus {
                host: "*.gw.example.org".into(),
                source: "acme",
                not_after: None,
                renew_at: None,
                error: Some("validation failed".into()),
                retry_at: Some(NOW + 5),
                superseded: false,
            },
        ]
    }

    fn control() -> ControlCounters {
        ControlCounters {
            state_version: 42,
            api_requests: 100,
            api_errors: 3,
            joins: 2,
            services_active: 5,
            services_refused: 1,
            config_reloads: 7,
            config_reload_failures: 2,
            config_last_reload_failed: true,
        }
    }

    /// One parsed sample.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: u64,
    }

    /// A parsed exposition: families' types and every sample.
    struct Parsed {
        types: HashMap<String, String>,
        samples: Vec<Sample>,
    }

    impl Parsed {
        fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
            let want: BTreeMap<String, String> = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let mut found = self
                .samples
                .iter()
                .filter(|s| s.name == name && s.labels == want);
            let v = found.next().map(|s| s.value);
            assert!(found.next().is_none(), "duplicate series {name} {labels:?}");
            v
        }
        fn count(&self, name: &str) -> usize {
            self.samples.iter().filter(|s| s.name == name).count()
        }
    }

    fn is_name(s: &str, colon: bool) -> bool {
        let mut cs = s.chars();
        let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':');
        cs.next().is_some_and(ok_first) && cs.all(|c| ok_first(c) || c.is_ascii_digit())
    }

    /// Strict parser of the subset of the text format `render` writes: every
    /// family is `# HELP`, then `# TYPE`, then at least one sample named like
    /// the family; a sample is `name{labels} value` or `name value`; label
    /// values use only the `\\`, `\"` and `\n` escapes; values are integers.
    fn parse(text: &str) -> Parsed {
        assert!(text.ends_with('\n'), "no final newline");
        let mut types = HashMap::new();
        let mut samples = Vec::new();
        let mut seen = HashSet::new();
        // (family, type, samples so far)
        let mut current: Option<(String, Option<String>, usize)> = None;
        let close = |c: &Option<(String, Option<String>, usize)>| {
            if let Some((name, _, n)) = c {
                assert!(*n > 0, "family {name} without samples");
            }
        };
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                close(&current);
                let (name, help) = rest.split_once(' ').expect("HELP without text");
                assert!(is_name(name, true), "bad family name {name:?}");
                assert!(!help.is_empty(), "empty HELP for {name}");
                assert!(seen.insert(name.to_string()), "family {name} twice");
                current = Some((name.to_string(), None, 0));
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').expect("TYPE without type");
                let cur = current.as_mut().expect("TYPE before HELP");
                assert_eq!(cur.0, name, "TYPE does not follow its HELP");
                assert!(cur.1.is_none(), "two TYPE lines for {name}");
                assert!(ty == "counter" || ty == "gauge", "type {ty}");
                if ty == "counter" {
                    assert!(name.ends_with("_total"), "counter {name} without _total");
                }
                cur.1 = Some(ty.to_string());
                types.insert(name.to_string(), ty.to_string());
            } else {
                assert!(!line.starts_with('#'), "stray comment {line:?}");
                let s = parse_sample(line);
                let cur = current.as_mut().expect("sample before HELP");
                assert!(cur.1.is_some(), "sample before TYPE: {line}");
                assert_eq!(s.name, cur.0, "sample outside its family: {line}");
                cur.2 += 1;
                samples.push(s);
            }
        }
        close(&current);
        Parsed { types, samples }
    }

    fn parse_sample(line: &str) -> Sample {
        let end = line.find(['{', ' ']).expect("sample without value");
        let name = &line[..end];
        assert!(is_name(name, true), "bad metric name {name:?}");
        let mut rest = &line[end..];
        let mut labels = BTreeMap::new();
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices();
            loop {
                // label name up to '='
                let mut lname = String::new();
                let mut after = None;
                for (i, c) in chars.by_ref() {
                    if c == '=' {
                        after = Some(i);
                        break;
                    }
                    lname.push(c);
                }
                after.expect("label without =");
                assert!(is_name(&lname, false), "bad label name {lname:?}");
                assert_eq!(chars.next().map(|x| x.1), Some('"'), "unquoted value");
                let mut value = String::new();
                loop {
                    match chars.next().expect("unterminated label value").1 {
                        '"' => break,
                        '\\' => match chars.next().expect("dangling backslash").1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            c => panic!("bad escape \\{c}"),
                        },
                        '\n' => panic!("raw newline in label value"),
                        c => value.push(c),
                    }
                }
                assert!(
                    labels.insert(lname.clone(), value).is_none(),
                    "label {lname} twice"
                );
                match chars.next().expect("unterminated labels") {
                    (_, ',') => continue,
                    (i, '}') => {
                        rest = &r[i + 1..];
                        break;
                    }
                    (_, c) => panic!("unexpected {c:?} after label value"),
                }
            }
        }
        let v = rest.strip_prefix(' ').expect("no space before value");
        assert!(
            !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()),
            "bad value {v:?} in {line:?}"
        );
        Sample {
            name: name.to_string(),
            labels,
            value: v.parse().unwrap(),
        }
    }

    fn render_sample(dev: &ShowInterface, routes: &[RouteSnapshot], c: ControlCounters) -> String {
        render_at(
            &MetricsInput {
                device: Some(dev),
                routes,
                certificates: &certs(),
                access_log_dropped: None,
                control: c,
                tls_tunnels: None,
                mesh: None,
            },
            NOW,
        )
    }

    #[test]
    fn renders_a_well_formed_exposition() {
        let dev = device();
        let routes = [route()];
        let text = render_sample(&dev, &routes, control());
        let p = parse(&text);

        assert_eq!(p.types["gatewire_peers"], "gauge");
        assert_eq!(p.types["gatewire_handshakes_total"], "counter");
        assert_eq!(
            p.get(
                "gatewire_certificate_not_after_seconds",
                &[("host", "www.example.com"), ("source", "file")]
            ),
            Some(NOW + 86_400)
        );
        // Not obtained yet: no expiry sample, and its order is failing.
        assert_eq!(
            p.get(
                "gatewire_certificate_not_after_seconds",
                &[("host", "*.gw.example.org"), ("source", "acme")]
            ),
            None
        );
        assert_eq!(
            p.get(
                "gatewire_acme_order_failing",
                &[("host", "*.gw.example.org")]
            ),
            Some(1)
        );
        assert_eq!(
            p.get(
                "gatewire_acme_order_failing",
                &[("host", "www.example.com")]
            ),
            None
        );
        assert_eq!(p.get("gatewire_peers", &[]), Some(3));
        assert_eq!(p.get("gatewire_peers_up", &[]), Some(1));
        assert_eq!(
            p.get(
                "gatewire_info",
                &[
                    ("interface", "gw0"),
                    ("mode", "hub"),
                    ("public_key", "hubKey+/=")
                ]
            ),
            Some(1)
        );
        let blog = [("peer", "AAAA+/8="), ("name", "blog-node")];
        assert_eq!(p.get("gatewire_peer_up", &blog), Some(1));
        assert_eq!(p.get("gatewire_peer_receive_bytes_total", &blog), Some(100));
        assert_eq!(
            p.get("gatewire_peer_transmit_bytes_total", &blog),
            Some(200)
        );
        assert_eq!(
            p.get("gatewire_peer_latest_handshake_seconds", &blog),
            Some(NOW - 10)
        );
        // No name: no `name` label.
        let b = [("peer", "BBBB+/8=")];
        assert_eq!(p.get("gatewire_peer_up", &b), Some(0));
        assert_eq!(p.get("gatewire_peer_receive_bytes_total", &b), Some(200));
        let c = [("peer", "CCCC+/8="), ("name", "we\"ird\\name\nx")];
        assert_eq!(p.get("gatewire_peer_latest_handshake_seconds", &c), Some(0));
        assert_eq!(
            p.get(
                "gatewire_peer_drops_total",
                &[("peer", "BBBB+/8="), ("reason", "source_not_allowed")]
            ),
            Some(4)
        );
        assert_eq!(p.get("gatewire_handshakes_total", &[]), Some(9));
        assert_eq!(
            p.get("gatewire_drops_total", &[("reason", "no_route")]),
            Some(3)
        );
        assert_eq!(
            p.get("gatewire_drops_total", &[("reason", "replay")]),
            Some(0)
        );
        assert_eq!(
            p.get("gatewire_xlat_drops_total", &[("reason", "no_pool4")]),
            Some(2)
        );
        assert_eq!(p.get("gatewire_nat64_sessions", &[]), Some(5));
        assert_eq!(p.get("gatewire_nat64_bindings", &[]), Some(2));
        assert_eq!(p.get("gatewire_nat64_fragment_flows", &[]), Some(1));
        assert_eq!(p.get("gatewire_nat64_held_fragments", &[]), Some(3));
        assert_eq!(p.get("gatewire_nat64_early_fragments_total", &[]), Some(11));

        let r = [("route", "name:blog")];
        assert_eq!(p.get("gatewire_route_requests_total", &r), Some(11));
        assert_eq!(p.get("gatewire_route_connections_total", &r), Some(7));
        assert_eq!(p.get("gatewire_route_in_bytes_total", &r), Some(1234));
        assert_eq!(p.get("gatewire_route_out_bytes_total", &r), Some(5678));
        assert_eq!(
            p.get(
                "gatewire_route_errors_total",
                &[("route", "name:blog"), ("kind", "backend_timeout")]
            ),
            Some(2)
        );
        assert_eq!(
            p.get(
                "gatewire_route_errors_total",
                &[("route", "name:blog"), ("kind", "unknown_host")]
            ),
            Some(0)
        );
        assert_eq!(p.count("gatewire_route_errors_total"), ErrorKind::ALL.len());
        let b1 = [("route", "name:blog"), ("backend", "[fd77:6777::1:1]:8080")];
        let b2 = [
            ("route", "name:blog"),
            ("backend", "https://100.64.1.2:443"),
        ];
        assert_eq!(p.get("gatewire_backend_up", &b1), Some(1));
        assert_eq!(p.get("gatewire_backend_up", &b2), Some(0));
        // The same address as a path prefix's backend: a series of its own.
        let b3 = [
            ("route", "name:blog"),
            ("path", "/api"),
            ("backend", "[fd77:6777::1:1]:8080"),
        ];
        assert_eq!(p.get("gatewire_backend_up", &b3), Some(0));
        assert_eq!(p.get("gatewire_backend_failures_total", &b3), Some(9));
        assert_eq!(p.get("gatewire_backend_active_connections", &b1), Some(3));
        assert_eq!(p.get("gatewire_backend_failures_total", &b2), Some(6));
        assert_eq!(p.get("gatewire_backend_checks_failed_total", &b2), Some(4));

        assert_eq!(p.get("gatewire_state_version", &[]), Some(42));
        assert_eq!(p.get("gatewire_api_requests_total", &[]), Some(100));
        assert_eq!(p.get("gatewire_api_errors_total", &[]), Some(3));
        assert_eq!(p.get("gatewire_joins_total", &[]), Some(2));
        assert_eq!(p.get("gatewire_services_active", &[]), Some(5));
        assert_eq!(p.get("gatewire_services_refused", &[]), Some(1));
        assert_eq!(p.types["gatewire_config_reloads_total"], "counter");
        assert_eq!(p.get("gatewire_config_reloads_total", &[]), Some(7));
        assert_eq!(p.get("gatewire_config_reload_failures_total", &[]), Some(2));
        assert_eq!(
            p.get("gatewire_config_last_reload_successful", &[]),
            Some(0)
        );

        // Every sample belongs to a typed family (checked by `parse`), and
        // every family the module doc lists appears in this full sample.
        for s in &p.samples {
            assert!(p.types.contains_key(&s.name));
        }
        assert_eq!(p.types.len(), 36);

        // GATEWIRE_METRICS_SAMPLE=<path> writes this sample there, for
        // checking it with other parsers.
        if let Ok(path) = std::env::var("GATEWIRE_METRICS_SAMPLE") {
            std::fs::write(path, &text).unwrap();
        }
    }

    #[test]
    fn escapes_label_values() {
        let text = render_sample(&device(), &[], ControlCounters::default());
        assert!(
            text.contains(r#"name="we\"ird\\name\nx""#),
            "label value not escaped:\n{text}"
        );
        // The raw newline never reaches the output inside a label.
        assert!(text.lines().all(|l| !l.ends_with("we\"ird\\name")));
        let mut s = String::new();
        escape_label(&mut s, "a\\b\"c\nd");
        assert_eq!(s, r#"a\\b\"c\nd"#);
        let mut h = String::new();
        escape_help(&mut h, "a\\b\"c\nd");
        assert_eq!(h, r#"a\\b"c\nd"#);
    }

    #[test]
    fn values_follow_the_inputs() {
        let mut dev = device();
        let mut routes = [route()];
        let c = control();
        let before = parse(&render_sample(&dev, &routes, c));

        dev.peers[0].rx_bytes += 50;
        dev.peers[1].latest_handshake = Some(NOW - 5);
        dev.handshakes += 1;
        *dev.drops.get_mut("no_route").unwrap() += 2;
        routes[0].requests += 1;
        routes[0].bytes_out += 10;
        routes[0].errors.insert("backend_refused", 1);
        routes[0].backends[1].up = true;
        let c2 = ControlCounters {
            state_version: c.state_version + 1,
            api_requests: c.api_requests + 3,
            joins: c.joins + 1,
            ..c
        };
        let after = parse(&render_sample(&dev, &routes, c2));

        let blog = [("peer", "AAAA+/8="), ("name", "blog-node")];
        let delta = |name: &str, labels: &[(&str, &str)]| {
            after.get(name, labels).unwrap() as i64 - before.get(name, labels).unwrap() as i64
        };
        assert_eq!(delta("gatewire_peer_receive_bytes_total", &blog), 50);
        assert_eq!(delta("gatewire_peers_up", &[]), 1);
        assert_eq!(delta("gatewire_peer_up", &[("peer", "BBBB+/8=")]), 1);
        assert_eq!(delta("gatewire_handshakes_total", &[]), 1);
        assert_eq!(delta("gatewire_drops_total", &[("reason", "no_route")]), 2);
        let r = [("route", "name:blog")];
        assert_eq!(delta("gatewire_route_requests_total", &r), 1);
        assert_eq!(delta("gatewire_route_out_bytes_total", &r), 10);
        assert_eq!(
            delta(
                "gatewire_route_errors_total",
                &[("route", "name:blog"), ("kind", "backend_refused")]
            ),
            1
        );
        assert_eq!(
            delta(
                "gatewire_backend_up",
                &[
                    ("route", "name:blog"),
                    ("backend", "https://100.64.1.2:443")
                ]
            ),
            1
        );
        assert_eq!(delta("gatewire_state_version", &[]), 1);
        assert_eq!(delta("gatewire_api_requests_total", &[]), 3);
        assert_eq!(delta("gatewire_joins_total", &[]), 1);
        assert_eq!(delta("gatewire_api_errors_total", &[]), 0);
    }

    #[test]
    fn peers_go_down_after_the_window() {
        let dev = device();
        let at = |now| {
            parse(&render_at(
                &MetricsInput {
                    device: Some(&dev),
                    routes: &[],
                    certificates: &[],
                    access_log_dropped: None,
                    control: ControlCounters::default(),
                    tls_tunnels: None,
                    mesh: None,
                },
                now,
            ))
            .get("gatewire_peers_up", &[])
        };
        // Handshakes at NOW - 10 and NOW - 1000.
        assert_eq!(at(NOW), Some(1));
        assert_eq!(at(NOW - 10 + UP_WINDOW), Some(1));
        assert_eq!(at(NOW - 10 + UP_WINDOW + 1), Some(0));
        assert_eq!(at(NOW - 1000 + UP_WINDOW), Some(2));
        // A handshake "in the future" (clock step) counts as up.
        assert_eq!(at(NOW - 2000), Some(2));
    }

    // The strict parser itself refuses what the format forbids.
    #[test]
    #[should_panic(expected = "bad escape")]
    fn parser_refuses_a_bad_escape() {
        parse("# HELP a_b x\n# TYPE a_b gauge\na_b{l=\"\\t\"} 1\n");
    }

    #[test]
    #[should_panic(expected = "sample before HELP")]
    fn parser_refuses_a_sample_without_help() {
        parse("a_b 1\n");
    }

    #[test]
    #[should_panic(expected = "sample before TYPE")]
    fn parser_refuses_a_sample_without_type() {
        parse("# HELP a_b x\na_b 1\n");
    }

    #[test]
    #[should_panic(expected = "without _total")]
    fn parser_refuses_a_counter_without_total() {
        parse("# HELP a_b x\n# TYPE a_b counter\na_b 1\n");
    }

    #[test]
    #[should_panic(expected = "unexpected")]
    fn parser_refuses_an_unescaped_quote() {
        parse("# HELP a_b x\n# TYPE a_b gauge\na_b{l=\"x\"y\"} 1\n");
    }

    #[test]
    #[should_panic(expected = "sample outside its family")]
    fn parser_refuses_a_sample_of_another_family() {
        parse("# HELP a_b x\n# TYPE a_b gauge\na_c 1\n");
    }

    #[test]
    fn without_a_device_only_proxy_and_control() {
        let text = render(&MetricsInput {
            device: None,
            routes: &[],
            certificates: &[],
            access_log_dropped: None,
            control: ControlCounters::default(),
            tls_tunnels: None,
            mesh: None,
        });
        let p = parse(&text);
        assert!(p.types.keys().all(|n| !n.starts_with("gatewire_peer")));
        assert!(p.types.keys().all(|n| !n.starts_with("gatewire_route")));
        assert!(p.types.keys().all(|n| !n.starts_with("gatewire_tls")));
        assert_eq!(p.get("gatewire_state_version", &[]), Some(0));
        assert_eq!(p.get("gatewire_joins_total", &[]), Some(0));
        assert_eq!(
            p.get("gatewire_config_last_reload_successful", &[]),
            Some(1)
        );
        assert_eq!(p.types.len(), 9);
        assert_eq!(p.get("gatewire_access_log_dropped_total", &[]), None);
        // With an access log, what it lost.
        let text = render(&MetricsInput {
            device: None,
            routes: &[],
            certificates: &[],
            access_log_dropped: Some(7),
            control: ControlCounters::default(),
            tls_tunnels: None,
            mesh: None,
        });
        let p = parse(&text);
        assert_eq!(p.get("gatewire_access_log_dropped_total", &[]), Some(7));
        assert_eq!(p.types.len(), 10);
    }

    #[test]
    fn tls_tunnel_counters() {
        let text = render(&MetricsInput {
            device: None,
            routes: &[],
            certificates: &[],
            access_log_dropped: None,
            control: ControlCounters::default(),
            tls_tunnels: Some(crate::carrier::CountersSnapshot {
                streams: 5,
                open: 2,
                failed: 3,
                bad_frames: 1,
                evicted: 4,
                superseded: 6,
                bytes_in: 1000,
                bytes_out: 2000,
            }),
            mesh: None,
        });
        let p = parse(&text);
        assert_eq!(p.types["gatewire_tls_tunnels_open"], "gauge");
        assert_eq!(p.types["gatewire_tls_tunnels_total"], "counter");
        assert_eq!(p.get("gatewire_tls_tunnels_open", &[]), Some(2));
        assert_eq!(p.get("gatewire_tls_tunnels_total", &[]), Some(5));
        assert_eq!(p.get("gatewire_tls_tunnels_failed_total", &[]), Some(3));
        assert_eq!(p.get("gatewire_tls_tunnels_bad_frames_total", &[]), Some(1));
        assert_eq!(p.get("gatewire_tls_tunnels_evicted_total", &[]), Some(4));
        assert_eq!(p.get("gatewire_tls_tunnels_superseded_total", &[]), Some(6));
        assert_eq!(
            p.get("gatewire_tls_tunnels_receive_bytes_total", &[]),
            Some(1000)
        );
        assert_eq!(
            p.get("gatewire_tls_tunnels_transmit_bytes_total", &[]),
            Some(2000)
        );
        assert_eq!(p.types.len(), 17);
    }

    #[test]
    fn mesh_families() {
        let text = render(&MetricsInput {
            device: None,
            routes: &[],
            certificates: &[],
            access_log_dropped: None,
            control: ControlCounters::default(),
            tls_tunnels: None,
            mesh: Some(crate::mesh::MeshView {
                name: "hub-a".into(),
                etcd_connected: true,
                last_error: None,
                published_hosts: 3,
                hubs: vec![crate::mesh::HubView {
                    name: "hub-b".into(),
                    hosts: 2,
                    http: vec![],
                    https: vec![],
                }],
                forwarded: 7,
                received: 5,
                refused: 8,
                unacknowledged: 9,
                declined: 10,
                bad_records: 1,
                acme_certificates: 2,
                acme_orders: vec![crate::mesh::AcmeOrder {
                    host: "blog.gw.test".into(),
                    hub: "hub-b".into(),
                }],
                acme_answered: 4,
                sealed: true,
                bad_seals: 6,
                name_claims: 5,
                own_name_claims: 3,
                name_conflicts: vec![crate::mesh::NameConflict {
                    host: "shop.gw.test".into(),
                    granted_to: "K1".into(),
                    held_by: "K2".into(),
                    hub: "hub-b".into(),
                }],
            }),
        });
        let p = parse(&text);
        assert_eq!(p.types["gatewire_mesh_etcd_connected"], "gauge");
        assert_eq!(p.types["gatewire_mesh_forwarded_total"], "counter");
        assert_eq!(p.get("gatewire_mesh_etcd_connected", &[]), Some(1));
        assert_eq!(p.get("gatewire_mesh_hubs", &[]), Some(1));
        assert_eq!(p.get("gatewire_mesh_published_hosts", &[]), Some(3));
        assert_eq!(p.get("gatewire_mesh_forwarded_total", &[]), Some(7));
        assert_eq!(p.get("gatewire_mesh_received_total", &[]), Some(5));
        assert_eq!(p.get("gatewire_mesh_refused_total", &[]), Some(8));
        assert_eq!(p.get("gatewire_mesh_unacknowledged_total", &[]), Some(9));
        assert_eq!(p.get("gatewire_mesh_declined_total", &[]), Some(10));
        assert_eq!(p.types["gatewire_mesh_declined_total"], "counter");
        assert_eq!(p.get("gatewire_mesh_bad_records_total", &[]), Some(1));
        assert_eq!(p.get("gatewire_mesh_acme_certificates", &[]), Some(2));
        assert_eq!(p.get("gatewire_mesh_acme_orders", &[]), Some(1));
        assert_eq!(p.get("gatewire_mesh_acme_answered_total", &[]), Some(4));
        assert_eq!(p.types["gatewire_mesh_acme_answered_total"], "counter");
        assert_eq!(p.get("gatewire_mesh_bad_seals_total", &[]), Some(6));
        assert_eq!(p.get("gatewire_mesh_name_claims", &[]), Some(3));
        assert_eq!(p.get("gatewire_mesh_name_conflicts", &[]), Some(1));
        assert_eq!(p.types.len(), 24);
    }
}
