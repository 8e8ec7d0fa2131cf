//! The admin API: HTTP/1.1 and JSON on a Unix socket (no token; the socket is
//! root's, mode 0600) and optionally on TCP with TLS and a bearer token. The
//! routes are in `docs/control.md` and `docs/openapi.json`.
//!
//! Request handling is [`handle`]: method, path and body in, status and JSON
//! out, with every state change going through [`Control::mutate`].

use crate::control::runtime::Control;
use crate::control::state::{self, api_key, NameRecord, ServiceStatus};
use crate::per_source::{subscriber_key, PerSource, SourceSlot};
use crate::proxy::settings::RawRoute;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;
use tracing::{debug, info};

/// Largest request body.
pub const MAX_BODY: usize = 1 << 20;
/// Largest `POST /v1/join` body, which needs no admin token: a token
/// (at most [`crate::control::token::MAX_TOKEN_LEN`] characters), a key
/// and a name, with room for JSON's escapes.
const MAX_JOIN_BODY: usize = 8 * 1024;
/// Time a client has to send a request's body once its head arrived.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to read a request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections served at once per listener.
const MAX_CONNS: usize = 256;
/// Connections open at once from one source (an IPv4 address, an IPv6 /56,
/// as the proxy counts a subscriber) on a TCP listener: sixteen sources
/// are needed to take every slot. A refused join or admin token closes its
/// connection at once.
const MAX_CONNS_PER_SOURCE: usize = MAX_CONNS / 16;
/// Longest life of an API connection, and the time it then has to finish
/// the request in flight (see [`serve_bounded`]).
pub(crate) const CONN_LIFE: Duration = Duration::from_secs(120);
pub(crate) const CONN_GRACE: Duration = Duration::from_secs(10);

/// The listening sockets; the Unix socket file is removed on drop.
pub struct ApiServer {
    tasks: Vec<JoinHandle<()>>,
    socket: PathBuf,
    pub tcp_addrs: Vec<SocketAddr>,
    pub fingerprint: Option<String>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Which listener a request came in on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Transport {
    Unix,
    Tcp,
}

/// A JSON answer.
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
    /// Raw text (for `/metrics`) instead of JSON.
    pub text: Option<(String, &'static str)>,
}

impl Answer {
    fn json(status: StatusCode, body: Value) -> Self {
        Answer {
            status,
            body,
            text: None,
        }
    }
    fn ok(body: Value) -> Self {
        Self::json(StatusCode::OK, body)
    }
    fn err(e: state::Error) -> Self {
        Self::json(
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            json!({ "error": e.message }),
        )
    }
    fn no_content() -> Self {
        Self::json(StatusCode::NO_CONTENT, Value::Null)
    }
}

impl From<state::Error> for Answer {
    fn from(e: state::Error) -> Self {
        Answer::err(e)
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, state::Error> {
    if body.is_empty() {
        return Err(state::Error::bad("a JSON body is required"));
    }
    serde_json::from_slice(body).map_err(|e| state::Error::bad(format!("body: {e}")))
}

fn decode_segment(s: &str) -> Result<String, state::Error> {
    percent_decode(s)
        .ok_or_else(|| state::Error::bad(format!("path segment `{s}`: bad %-encoding")))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b.get(i)? {
            b'%' => {
                let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 3;
            }
            c => {
                out.push(*c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddPeer {
    public_key: String,
    name: Option<String>,
    allowed_ips: Option<Vec<ipnet::IpNet>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutRoute {
    spec: RawRoute,
    version: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    names: Vec<String>,
    ttl: Option<u64>,
    #[serde(default)]
    replicas: bool,
    bandwidth: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Join {
    token: String,
    public_key: String,
    name: Option<String>,
}

fn route_json(c: &Control, id: &str) -> Option<Value> {
    let st = c.state();
    let health = c.health();
    let backends = |id: &str| {
        health
            .get(id)
            .map(|h| serde_json::to_value(&h.backends).unwrap_or(Value::Null))
            .unwrap_or(Value::Array(vec![]))
    };
    if let Some(r) = st.routes.get(id) {
        return Some(json!({
            "id": id, "version": r.version, "paused": r.spec.paused, "origin": "api",
            "spec": r.spec, "updated": r.updated, "backends": backends(id),
        }));
    }
    let ev = c.evaluation();
    if let Some(i) = ev.hosts.iter().position(|h| h == id) {
        let owners: Vec<&String> = ev
            .statuses
            .iter()
            .filter(|(_, v)| v.iter().any(|s| s.host == id && s.status == "active"))
            .map(|(k, _)| k)
            .collect();
        let spec = if let Some(r) = ev
            .routes
            .iter()
            .find(|r| state::route_id(r).ok().as_deref() == Some(id))
        {
            serde_json::to_value(r).unwrap_or(Value::Null)
        } else {
            // `tcp:2002` is the forward listening on port 2002, not 12002.
            let port = id.get(4..).map(|p| format!(":{p}")).unwrap_or_default();
            let on = |listen: &str| !port.is_empty() && listen.ends_with(&port);
            if id.starts_with("tcp:") {
                ev.tcp
                    .iter()
                    .find(|t| on(&t.listen))
                    .map(|t| serde_json::to_value(t).unwrap_or(Value::Null))
                    .unwrap_or(Value::Null)
            } else {
                ev.udp
                    .iter()
                    .find(|t| on(&t.listen))
                    .map(|t| serde_json::to_value(t).unwrap_or(Value::Null))
                    .unwrap_or(Value::Null)
            }
        };
        let _ = i;
        return Some(json!({
            "id": id, "version": 0, "paused": false, "origin": "node",
            "owners": owners, "spec": spec, "backends": backends(id),
        }));
    }
    let cfg = c.hub_config();
    let p = cfg.proxy.as_ref()?;
    let r = p.routes.iter().find(|r| r.host.to_string() == id)?;
    let mut spec = json!({
        "backends": r.backends.iter().map(|b| b.to_string()).collect::<Vec<_>>(),
        "tls": match r.tls { crate::proxy::settings::TlsMode::Terminate => "terminate", crate::proxy::settings::TlsMode::Passthrough => "passthrough" },
    });
    if !r.paths.is_empty() {
        spec["paths"] = r
            .paths
            .iter()
            .map(|p| {
                json!({
                    "prefix": p.prefix.as_str(),
                    "backends": p.backends.iter().map(|b| b.to_string()).collect::<Vec<_>>(),
                    "strip_prefix": p.strip_prefix,
                })
            })
            .collect();
    }
    Some(json!({
        "id": id, "version": 0, "paused": r.paused, "origin": "config",
        "spec": spec,
        "backends": backends(id),
    }))
}

fn route_ids(c: &Control) -> Vec<String> {
    let mut ids: Vec<String> = c
        .hub_config()
        .proxy
        .as_ref()
        .map(|p| p.routes.iter().map(|r| r.host.to_string()).collect())
        .unwrap_or_default();
    ids.extend(c.state().routes.keys().cloned());
    ids.extend(c.evaluation().hosts.iter().cloned());
    ids
}

fn peers_json(c: &Control, only: Option<&str>) -> Vec<Value> {
    let st = c.state();
    let show = c.dev.show();
    show.peers
        .into_iter()
        .filter(|p| only.is_none_or(|k| k == p.public_key))
        .map(|p| {
            let origin = match st.nodes.get(&p.public_key) {
                Some(n) => serde_json::to_value(n.origin).unwrap_or(Value::Null),
                None => json!("config"),
            };
            let mut v = serde_json::to_value(&p).unwrap_or(Value::Null);
            if let Some(o) = v.as_object_mut() {
                o.insert("origin".into(), origin);
                o.insert(
                    "services".into(),
                    serde_json::to_value(c.statuses_of(&p.public_key)).unwrap_or(Value::Null),
                );
            }
            v
        })
        .collect()
}

/// The endpoint template a path matches, with the methods it takes.
pub fn endpoint(segs: &[&str]) -> Option<(&'static str, &'static [&'static str])> {
    Some(match segs {
        ["metrics"] => ("/metrics", &["GET"]),
        ["v1", "status"] => ("/v1/status", &["GET"]),
        ["v1", "peers"] => ("/v1/peers", &["GET", "POST"]),
        ["v1", "peers", _] => ("/v1/peers/{key}", &["GET", "DELETE"]),
        ["v1", "routes"] => ("/v1/routes", &["GET", "POST"]),
        ["v1", "routes", _] => ("/v1/routes/{id}", &["GET", "PUT", "DELETE"]),
        ["v1", "routes", _, "pause"] => ("/v1/routes/{id}/pause", &["POST"]),
        ["v1", "routes", _, "resume"] => ("/v1/routes/{id}/resume", &["POST"]),
        ["v1", "names"] => ("/v1/names", &["GET"]),
        ["v1", "names", _] => ("/v1/names/{name}", &["PUT", "DELETE"]),
        ["v1", "tokens"] => ("/v1/tokens", &["GET", "POST"]),
        ["v1", "tokens", _] => ("/v1/tokens/{id}", &["DELETE"]),
        ["v1", "join"] => ("/v1/join", &["POST"]),
        ["v1", "certificates"] => ("/v1/certificates", &["GET"]),
        _ => return None,
    })
}

/// Serves one request.
pub async fn handle(c: &Control, t: Transport, method: &Method, path: &str, body: &[u8]) -> Answer {
    let segs: Vec<&str> = path
        .trim_start_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let r = route(c, t, method, &segs, body).await;
    match r {
        Ok(a) => a,
        Err(e) => Answer::err(e),
    }
}

async fn route(
    c: &Control,
    t: Transport,
    m: &Method,
    segs: &[&str],
    body: &[u8],
) -> Result<Answer, state::Error> {
    let nf = || state::Error::not_found(format!("no such endpoint: /{}", segs.join("/")));
    let method_err = || state::Error {
        status: 405,
        message: format!("method {m} is not allowed on /{}", segs.join("/")),
    };
    match endpoint(segs) {
        None => return Err(nf()),
        Some((_, methods)) if !methods.contains(&m.as_str()) => return Err(method_err()),
        Some(_) => {}
    }
    match segs {
        ["metrics"] => {
            if m != Method::GET {
                return Err(method_err());
            }
            let show = c.dev.show();
            let routes: Vec<_> = c.health().into_values().collect();
            let ev = c.evaluation();
            let (mut active, mut refused) = (0, 0);
            for s in ev.statuses.values().flatten() {
                if s.status == "active" {
                    active += 1;
                } else {
                    refused += 1;
                }
            }
            let text = crate::control::metrics::render(&crate::control::metrics::MetricsInput {
                device: Some(&show),
                routes: &routes,
                certificates: &c.certificates(),
                access_log_dropped: c.access_log_dropped(),
                control: crate::control::metrics::ControlCounters {
                    state_version: c.state().version,
                    api_requests: c.counters.api_requests.load(Relaxed),
                    api_errors: c.counters.api_errors.load(Relaxed),
                    joins: c.counters.joins.load(Relaxed),
                    services_active: active,
                    services_refused: refused,
                    config_reloads: c.config_reloads.reloads(),
                    config_reload_failures: c.config_reloads.failures(),
                    config_last_reload_failed: c
                        .config_reloads
                        .last()
                        .is_some_and(|l| !l.ok),
                },
                tls_tunnels: c.tls_tunnels.lock().as_ref().map(|t| t.counters.snapshot()),
                mesh: c.mesh.as_ref().map(|m| m.view()),
            });
            Ok(Answer {
                status: StatusCode::OK,
                body: Value::Null,
                text: Some((text, crate::control::metrics::CONTENT_TYPE)),
            })
        }
        ["v1", "certificates"] => Ok(Answer::ok(json!(c.certificates()))),
        ["v1", "status"] => {
            if m != Method::GET {
                return Err(method_err());
            }
            let st = c.state();
            let show = c.dev.show();
            Ok(Answer::ok(json!({
                "interface": show.name,
                "public_key": show.public_key,
                "state_version": st.version,
                "peers": show.peers.len(),
                "routes": route_ids(c).len(),
                // The served certificate's, not one read again from disk.
                "api_fingerprint": (!c.settings().listen.is_empty())
                    .then(|| c.api_fingerprint.lock().map(hex::encode))
                    .flatten(),
            })))
        }
        ["v1", "peers"] => match *m {
            Method::GET => Ok(Answer::ok(Value::Array(peers_json(c, None)))),
            Method::POST => {
                let a: AddPeer = parse(body)?;
                let key = api_key(&a.public_key)?;
                c.mutate(|s, ctx| s.add_node(ctx, &a.public_key, a.name, a.allowed_ips))
                    .await?;
                let p = peers_json(c, Some(&key)).into_iter().next().unwrap_or(Value::Null);
                Ok(Answer::json(StatusCode::CREATED, p))
            }
            _ => Err(method_err()),
        },
        ["v1", "peers", key] => {
            let key = api_key(&decode_segment(key)?)?;
            match *m {
                Method::GET => peers_json(c, Some(&key))
                    .into_iter()
                    .next()
                    .map(Answer::ok)
                    .ok_or_else(|| state::Error::not_found(format!("no peer {key}"))),
                Method::DELETE => {
                    let freed = c.mutate(|s, _| s.remove_node(&key)).await?;
                    if !freed.is_empty() {
                        info!(peer = %key, names = ?freed, "names freed with their peer");
                    }
                    Ok(Answer::no_content())
                }
                _ => Err(method_err()),
            }
        }
        ["v1", "routes"] => match *m {
            Method::GET => Ok(Answer::ok(Value::Array(
                route_ids(c).iter().filter_map(|id| route_json(c, id)).collect(),
            ))),
            Method::POST => {
                let spec: RawRoute = parse(body)?;
                let (id, created) = c.mutate(|s, ctx| s.create_route(ctx, spec)).await?;
                let v = route_json(c, &id).unwrap_or(Value::Null);
                Ok(Answer::json(
                    if created { StatusCode::CREATED } else { StatusCode::OK },
                    v,
                ))
            }
            _ => Err(method_err()),
        },
        ["v1", "routes", id] => {
            let id = decode_segment(id)?;
            match *m {
                Method::GET => route_json(c, &id)
                    .map(Answer::ok)
                    .ok_or_else(|| state::Error::not_found(format!("no route `{id}`"))),
                Method::PUT => {
                    let p: PutRoute = parse(body)?;
                    c.mutate(|s, ctx| s.update_route(ctx, &id, p.spec, p.version))
                        .await?;
                    Ok(Answer::ok(route_json(c, &id).unwrap_or(Value::Null)))
                }
                Method::DELETE => {
                    c.mutate(|s, _| s.delete_route(&id)).await?;
                    Ok(Answer::no_content())
                }
                _ => Err(method_err()),
            }
        }
        ["v1", "routes", id, action @ ("pause" | "resume")] => {
            if m != Method::POST {
                return Err(method_err());
            }
            let id = decode_segment(id)?;
            let paused = *action == "pause";
            c.mutate(|s, ctx| s.set_paused(ctx.now, &id, paused)).await?;
            Ok(Answer::ok(route_json(c, &id).unwrap_or(Value::Null)))
        }
        ["v1", "names"] => match *m {
            Method::GET => Ok(Answer::ok(
                c.state()
                    .names
                    .iter()
                    .map(|(n, r)| {
                        json!({"name": n, "owners": r.owners, "replicas": r.replicas, "expires": r.expires, "bandwidth": r.bandwidth})
                    })
                    .collect(),
            )),
            _ => Err(method_err()),
        },
        ["v1", "names", name] => {
            let name = decode_segment(name)?;
            match *m {
                Method::PUT => {
                    let rec: NameRecord = parse(body)?;
                    c.mutate(|s, ctx| s.set_name(ctx, &name, rec)).await?;
                    let st = c.state();
                    let r = st.names.get(&name);
                    Ok(Answer::ok(json!({"name": name, "owners": r.map(|r| &r.owners), "replicas": r.map(|r| r.replicas), "expires": r.and_then(|r| r.expires), "bandwidth": r.and_then(|r| r.bandwidth.as_ref())})))
                }
                Method::DELETE => {
                    c.mutate(|s, _| s.delete_name(&name)).await?;
                    Ok(Answer::no_content())
                }
                _ => Err(method_err()),
            }
        }
        ["v1", "tokens"] => match *m {
            Method::GET => Ok(Answer::ok(
                c.state()
                    .tokens
                    .iter()
                    .map(|(id, t)| {
                        json!({"id": id, "names": t.names, "replicas": t.replicas, "created": t.created,
                               "expires": t.expires, "used_by": t.used_by, "used_at": t.used_at,
                               "bandwidth": t.bandwidth})
                    })
                    .collect(),
            )),
            Method::POST => {
                let req: NewToken = parse(body)?;
                let settings = c.settings();
                let api = settings.api_endpoint.clone().ok_or_else(|| {
                    state::Error::bad("the hub has no [control] api_endpoint; join tokens need it")
                })?;
                if settings.wg_endpoint.is_none() {
                    return Err(state::Error::bad(
                        "the hub has no [control] wg_endpoint; join tokens need it",
                    ));
                }
                if settings.listen.is_empty() {
                    return Err(state::Error::bad(
                        "the hub has no [control] listen address; nodes join over the TCP API",
                    ));
                }
                // The certificate the listener serves: a token pinning one
                // read again from disk would fail every join if the files
                // changed under the running listener.
                let fp = (*c.api_fingerprint.lock()).ok_or_else(|| state::Error {
                    status: 503,
                    message: "the TCP API listener is not running; join tokens pin its certificate".into(),
                })?;
                let tok = crate::control::token::JoinToken::generate(api, fp);
                let ttl = req.ttl.unwrap_or(3600);
                let id = tok.id.clone();
                let h = tok.secret_hash();
                let rec = c
                    .mutate(|s, ctx| {
                        let grant = state::TokenGrant {
                            names: req.names,
                            ttl,
                            replicas: req.replicas,
                            bandwidth: req.bandwidth,
                        };
                        s.create_token(ctx.now, &id, h, grant)
                    })
                    .await?;
                Ok(Answer::json(
                    StatusCode::CREATED,
                    json!({"id": id, "token": tok.encode(), "expires": rec.expires, "names": rec.names}),
                ))
            }
            _ => Err(method_err()),
        },
        ["v1", "tokens", id] => {
            if m != Method::DELETE {
                return Err(method_err());
            }
            let id = decode_segment(id)?;
            c.mutate(|s, _| s.revoke_token(&id)).await?;
            Ok(Answer::no_content())
        }
        ["v1", "join"] => {
            if m != Method::POST {
                return Err(method_err());
            }
            let j: Join = parse(body)?;
            let tok = crate::control::token::JoinToken::decode(j.token.trim())
                .map_err(|e| state::Error::bad(format!("token: {e}")))?;
            let key = api_key(&j.public_key)?;
            let h = tok.secret_hash();
            // A made-up token is refused before the writer's lock (held
            // through a save) and the state's copy: a flood of them holds
            // up no real change.
            if !c.state().token_matches(&tok.id, h) {
                return Err(state::Error::unauthorized("the join token is not valid"));
            }
            // The joining node is not told other nodes' keys (who spent the
            // token, who holds a name); `GET /v1/tokens` and `/v1/names` show
            // them to the operator.
            let (rec, names, repeat) = c
                .mutate(|s, ctx| s.join(ctx, &tok.id, h, &key, j.name))
                .await
                .map_err(|e| e.for_node(&key))?;
            if !repeat {
                c.counters.joins.fetch_add(1, Relaxed);
            }
            let settings = c.settings();
            let cfg = c.hub_config();
            let mut hub_v = cfg.addresses.iter().map(|n| n.trunc().to_string()).collect::<Vec<_>>();
            // A hub with NAT64 gives its pool6 too: the node routes it into the
            // tunnel, and IPv4 destinations (from DNS64, or written by hand)
            // work from the node's IPv6 address.
            if let Some(p) = cfg
                .xlat
                .as_ref()
                .filter(|x| x.nat64.is_some())
                .and_then(|x| x.config.pool6.as_ref())
            {
                hub_v.push(format!("{}/{}", p.prefix(), p.prefix_len()));
            }
            let node_api = node_api_addr(&cfg.addresses, &rec.allowed_ips)
                .map(|a| SocketAddr::new(a, settings.node_port).to_string());
            // The node's addresses carry the hub network's prefix length, so its
            // kernel routes the whole overlay into the tunnel.
            let addrs: Vec<String> = rec
                .allowed_ips
                .iter()
                .map(|n| {
                    let pl = cfg
                        .addresses
                        .iter()
                        .find(|h| h.trunc().contains(&n.addr()))
                        .map_or(n.prefix_len(), |h| h.prefix_len());
                    format!("{}/{pl}", n.addr())
                })
                .collect();
            if repeat {
                info!(node = %key, "node asked for its join answer again");
            } else {
                info!(node = %key, addresses = ?addrs, names = ?names, "node joined");
            }
            let _ = t;
            let mut answer = json!({
                "hub_public_key": cfg.private_key.public_key().to_base64(),
                "wg_endpoint": settings.wg_endpoint,
                "addresses": addrs,
                "allowed_ips": hub_v,
                "node_api": node_api,
                "names": names,
                "hub_addresses": cfg.addresses.iter().map(|n| n.addr().to_string()).collect::<Vec<_>>(),
            });
            if let (Some(t), Some(o)) = (&settings.tls_endpoint, answer.as_object_mut()) {
                o.insert("tls_endpoint".into(), json!(t));
            }
            Ok(Answer::ok(answer))
        }
        _ => Err(nf()),
    }
}

/// The hub overlay address a node is told to reach the node services API
/// at: one in a network that holds one of the node's addresses, else one
/// of the same family as them, else none (the node could send from no
/// address the hub takes from it, and it is told there is no API rather
/// than one it cannot reach).
fn node_api_addr(hub: &[IpNet], node: &[IpNet]) -> Option<IpAddr> {
    let same_net = hub
        .iter()
        .find(|h| node.iter().any(|n| h.trunc().contains(&n.addr())));
    let same_family = || {
        hub.iter().find(|h| {
            node.iter()
                .any(|n| n.addr().is_ipv4() == h.addr().is_ipv4())
        })
    };
    same_net.or_else(same_family).map(IpNet::addr)
}

fn respond(a: Answer) -> Response<Full<Bytes>> {
    let (body, ct) = match a.text {
        Some((t, ct)) => (Bytes::from(t), ct),
        None if a.status == StatusCode::NO_CONTENT => (Bytes::new(), "application/json"),
        None => {
            let mut v = serde_json::to_vec_pretty(&a.body).unwrap_or_default();
            v.push(b'\n');
            (Bytes::from(v), "application/json")
        }
    };
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = a.status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ct) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// `r` saying `Connection: close`: hyper closes the connection once it is
/// written.
fn closing(mut r: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    r.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    r
}

/// The answer to a request without the admin token. It closes the
/// connection, so a client without the token cannot keep a slot open with
/// a refused request every few seconds.
fn unauthorized() -> Response<Full<Bytes>> {
    let mut r = respond(Answer::json(
        StatusCode::UNAUTHORIZED,
        json!({"error": "this API needs `Authorization: Bearer <admin token>`"}),
    ));
    r.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        hyper::header::HeaderValue::from_static("Bearer"),
    );
    closing(r)
}

/// Whether a request is a join: it needs no admin token.
fn is_join(method: &Method, path: &str) -> bool {
    method == Method::POST && path == "/v1/join"
}

/// The answer as sent. A refused join closes its connection, as a request
/// without the admin token does (hyper gives every request of a connection
/// its own header timeout, so refused joins one after another would keep
/// a slot); so does a body too large or too slow, left unread.
fn finish(join: bool, a: Answer) -> Response<Full<Bytes>> {
    let close = (join && a.status.is_client_error())
        || matches!(
            a.status,
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT
        );
    let r = respond(a);
    if close {
        closing(r)
    } else {
        r
    }
}

/// A request's body, read within [`BODY_TIMEOUT`] and its limit
/// ([`MAX_JOIN_BODY`] for a join, else [`MAX_BODY`]), or the answer that
/// refuses it.
async fn read_body(body: Incoming, join: bool) -> Result<Bytes, Answer> {
    let limit = if join { MAX_JOIN_BODY } else { MAX_BODY };
    // The head had its timeout (hyper's header_read_timeout); the body gets
    // one too, or a client that stops mid-body (`POST /v1/join` needs no
    // token) would hold a connection slot for good.
    match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, limit).collect()).await {
        Err(_) => Err(Answer::json(
            StatusCode::REQUEST_TIMEOUT,
            json!({"error": format!("the body did not arrive within {} s", BODY_TIMEOUT.as_secs())}),
        )),
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(Answer::json(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": format!("the body is larger than {limit} bytes")}),
            ))
        }
        Ok(Err(e)) => Err(Answer::json(
            StatusCode::BAD_REQUEST,
            json!({"error": format!("body: {e}")}),
        )),
    }
}

/// A slot for one more TCP connection from `peer`, or `None` when its
/// source (an IPv4 address, an IPv6 /56) has [`MAX_CONNS_PER_SOURCE`] open.
fn admit(per_source: &Arc<PerSource>, peer: SocketAddr) -> Option<SourceSlot> {
    per_source.take(subscriber_key(peer.ip()), MAX_CONNS_PER_SOURCE)
}

async fn serve_req(
    c: Arc<Control>,
    t: Transport,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    c.counters.api_requests.fetch_add(1, Relaxed);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let join = is_join(&method, &path);
    if t == Transport::Tcp && !join {
        let ok = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .zip(c.settings().admin_token)
            .is_some_and(|(given, tok)| tok.matches(given.trim()));
        if !ok {
            c.counters.api_errors.fetch_add(1, Relaxed);
            return Ok(unauthorized());
        }
    }
    let body = match read_body(req.into_body(), join).await {
        Ok(b) => b,
        Err(a) => {
            c.counters.api_errors.fetch_add(1, Relaxed);
            return Ok(finish(join, a));
        }
    };
    // A task of its own, run to the end even when the client goes away
    // (hyper drops a request's future when its connection closes): a change
    // cut off half made (saved but not published, published but not
    // applied) would part the running state from the file's.
    let a = {
        let (c, method, path) = (c.clone(), method.clone(), path.clone());
        tokio::spawn(async move { handle(&c, t, &method, &path, &body).await })
            .await
            .unwrap_or_else(|e| {
                Answer::json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": format!("the request's task failed: {e}")}),
                )
            })
    };
    if a.status.is_client_error() || a.status.is_server_error() {
        c.counters.api_errors.fetch_add(1, Relaxed);
        debug!(%method, %path, status = a.status.as_u16(), "API error");
    }
    Ok(finish(join, a))
}

async fn serve_conn<S>(c: Arc<Control>, t: Transport, io: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| serve_req(c.clone(), t, req));
    let bounds = (CONN_LIFE, CONN_GRACE);
    if let Err(e) = serve_bounded(TokioIo::new(io), svc, 64 * 1024, bounds).await {
        debug!(error = %e, "API connection ended");
    }
}

/// Serves one HTTP/1.1 connection for at most `life`; then asks it to close
/// after the request in flight and drops it `grace` later. hyper has
/// no write timeout: without this a client that sends requests and never
/// reads the answers would hold its connection slot for good.
pub(crate) async fn serve_bounded<I, S, B>(
    io: I,
    svc: S,
    max_buf: usize,
    (life, grace): (Duration, Duration),
) -> Result<(), hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(max_buf)
        .serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        _ = tokio::time::sleep(life) => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(grace, conn).await.unwrap_or(Ok(()))
        }
    }
}

impl ApiServer {
    pub async fn start(c: Arc<Control>) -> anyhow::Result<ApiServer> {
        use std::os::unix::fs::PermissionsExt;
        let settings = c.settings();
        let sock = settings.socket.clone();
        if let Some(dir) = sock.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if sock.exists() {
            if tokio::net::UnixStream::connect(&sock).await.is_ok() {
                anyhow::bail!("{} is served by another running process", sock.display());
            }
            std::fs::remove_file(&sock)?;
        }
        let ul = UnixListener::bind(&sock)
            .map_err(|e| anyhow::anyhow!("control socket {}: {e}", sock.display()))?;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
        let sem = Arc::new(tokio::sync::Semaphore::new(MAX_CONNS));
        let mut tasks = Vec::new();
        {
            let c = c.clone();
            let sem = sem.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((s, _)) = ul.accept().await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    // The socket needs no token: only root and this process's
                    // own user, whatever the file's mode.
                    let (owner, uid) = crate::sockopt::peer_is_owner(&s);
                    if !owner {
                        debug!(?uid, "control socket connection from another user refused");
                        continue;
                    }
                    let Ok(permit) = sem.clone().try_acquire_owned() else {
                        continue;
                    };
                    let c = c.clone();
                    tokio::spawn(async move {
                        serve_conn(c, Transport::Unix, s).await;
                        drop(permit);
                    });
                }
            }));
        }
        let mut tcp_addrs = Vec::new();
        let mut fingerprint = None;
        if !settings.listen.is_empty() {
            let cert = crate::control::pin::ApiCert::load_or_create(&settings.state_dir, &[])?;
            fingerprint = Some(cert.fingerprint_hex());
            *c.api_fingerprint.lock() = Some(cert.fingerprint());
            let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config());
            for a in &settings.listen {
                let l = TcpListener::bind(a)
                    .await
                    .map_err(|e| anyhow::anyhow!("[control] listen {a}: {e}"))?;
                tcp_addrs.push(l.local_addr()?);
                let c = c.clone();
                let acceptor = acceptor.clone();
                let sem = Arc::new(tokio::sync::Semaphore::new(MAX_CONNS));
                let per_source = Arc::new(PerSource::default());
                tasks.push(tokio::spawn(async move {
                    loop {
                        let Ok((s, peer)) = l.accept().await else {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        };
                        // One source cannot hold every slot (the listener
                        // takes joins, which need no token).
                        let Some(slot) = admit(&per_source, peer) else {
                            debug!(%peer, "API connection refused: too many from this source");
                            continue;
                        };
                        let Ok(permit) = sem.clone().try_acquire_owned() else {
                            continue;
                        };
                        let c = c.clone();
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(s)).await {
                                Ok(Ok(tls)) => serve_conn(c, Transport::Tcp, tls).await,
                                Ok(Err(e)) => debug!(%peer, error = %e, "API TLS handshake failed"),
                                Err(_) => debug!(%peer, "API TLS handshake timed out"),
                            }
                            drop(permit);
                            drop(slot);
                        });
                    }
                }));
            }
            info!(listen = ?tcp_addrs, fingerprint = fingerprint.as_deref().unwrap_or(""), "admin API on TCP (TLS, bearer token)");
        }
        info!(socket = %sock.display(), "admin API on the control socket");
        Ok(ApiServer {
            tasks,
            socket: sock,
            tcp_addrs,
            fingerprint,
        })
    }
}

/// Statuses as the node services API returns them.
pub fn services_json(v: &[ServiceStatus]) -> Value {
    json!({ "services": v })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::control::client::ENDPOINTS;

    /// A client that sends requests and reads none of the answers (their
    /// bytes fill the connection) loses the connection after its life.
    #[tokio::test]
    async fn a_connection_that_never_reads_is_dropped() {
        use tokio::io::AsyncWriteExt;
        let (server, mut client) = tokio::io::duplex(4096);
        let svc = hyper::service::service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(vec![
                b'x';
                65536
            ]))))
        });
        let serving = tokio::spawn(serve_bounded(
            TokioIo::new(server),
            svc,
            64 * 1024,
            (Duration::from_millis(300), Duration::from_millis(300)),
        ));
        for _ in 0..4 {
            let _ = tokio::time::timeout(
                Duration::from_millis(10),
                client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            )
            .await;
        }
        let ended = tokio::time::timeout(Duration::from_secs(5), serving).await;
        assert!(ended.is_ok(), "the connection outlived its life");
        drop(client);
    }

    /// Sends `request` to a connection served by `svc` and reads until the
    /// server closes it (or `wait` passes): the bytes read and whether it
    /// closed.
    async fn exchange<S>(svc: S, request: &[u8], wait: Duration) -> (String, bool)
    where
        S: hyper::service::Service<
                Request<Incoming>,
                Response = Response<Full<Bytes>>,
                Error = std::convert::Infallible,
            > + Send
            + 'static,
        S::Future: Send + 'static,
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (server, mut client) = tokio::io::duplex(64 * 1024);
        let serving = tokio::spawn(serve_bounded(
            TokioIo::new(server),
            svc,
            64 * 1024,
            (Duration::from_secs(60), Duration::from_secs(1)),
        ));
        client.write_all(request).await.unwrap();
        let mut got = Vec::new();
        let closed = tokio::time::timeout(wait, client.read_to_end(&mut got))
            .await
            .is_ok();
        serving.abort();
        (String::from_utf8_lossy(&got).into_owned(), closed)
    }

    /// Sends one keep-alive request to a connection served by `answer`: see
    /// [`exchange`].
    async fn one_request(answer: fn() -> Response<Full<Bytes>>, wait: Duration) -> (String, bool) {
        let svc = hyper::service::service_fn(move |_req| async move {
            Ok::<_, std::convert::Infallible>(answer())
        });
        let req = b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n";
        exchange(svc, req, wait).await
    }

    /// A keep-alive `POST` of `body` to `path` on a connection whose
    /// requests are read as the API reads them and answered as it answers:
    /// a join that gets its body is refused 401 (a token not valid), any
    /// other request 200.
    async fn post(path: &str, body: &[u8], wait: Duration) -> (String, bool) {
        let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
            let join = is_join(req.method(), req.uri().path());
            let a = match read_body(req.into_body(), join).await {
                Err(a) => a,
                Ok(_) if join => {
                    Answer::err(state::Error::unauthorized("the join token is not valid"))
                }
                Ok(_) => Answer::ok(json!({})),
            };
            Ok::<_, std::convert::Infallible>(finish(join, a))
        });
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        exchange(svc, &req, wait).await
    }

    /// A refused join loses its connection, as a request without the admin
    /// token does: refused joins one after another cannot keep a slot.
    #[tokio::test]
    async fn a_refused_join_closes_its_connection() {
        let join = br#"{"token": "gwj1.x", "public_key": "k"}"#;
        let (text, closed) = post("/v1/join", join, Duration::from_secs(5)).await;
        assert!(text.starts_with("HTTP/1.1 401"), "{text}");
        assert!(text.to_lowercase().contains("connection: close"), "{text}");
        assert!(closed, "the connection stayed open after a refused join");
        // Another request's answer keeps its connection.
        let (text, closed) = post("/v1/peers", b"{}", Duration::from_millis(300)).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(!closed, "a keep-alive connection was closed after a 200");
    }

    /// A join's body is small: one over [`MAX_JOIN_BODY`] is refused with
    /// 413 and its connection closed, while other requests take up to
    /// [`MAX_BODY`].
    #[tokio::test]
    async fn an_oversized_join_body_is_refused() {
        let big = vec![b' '; MAX_JOIN_BODY + 1];
        let (text, closed) = post("/v1/join", &big, Duration::from_secs(5)).await;
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
        assert!(
            text.contains(&format!("larger than {MAX_JOIN_BODY} bytes")),
            "{text}"
        );
        assert!(closed, "the connection stayed open after a 413");
        let (text, _) = post("/v1/peers", &big, Duration::from_millis(300)).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        let (text, _) = post("/v1/join", &big[..MAX_JOIN_BODY], Duration::from_secs(5)).await;
        assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    }

    /// A request without the admin token gets 401 and loses its connection,
    /// so it cannot hold a slot; an answered one keeps its connection.
    #[tokio::test]
    async fn a_request_without_the_token_closes_its_connection() {
        let (text, closed) = one_request(unauthorized, Duration::from_secs(5)).await;
        assert!(text.starts_with("HTTP/1.1 401"), "{text}");
        assert!(text.to_lowercase().contains("connection: close"), "{text}");
        assert!(text.contains("Bearer"), "{text}");
        assert!(closed, "the connection stayed open after a 401");
        let ok = || respond(Answer::ok(json!({})));
        let (text, closed) = one_request(ok, Duration::from_millis(300)).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(!closed, "a keep-alive connection was closed after a 200");
    }

    /// The per-source cap counts an IPv6 client's /56 as one source, and
    /// takes sixteen sources to fill the listener.
    #[test]
    fn addresses_in_one_ipv6_56_share_the_cap() {
        assert_eq!(MAX_CONNS_PER_SOURCE * 16, MAX_CONNS);
        let p = Arc::new(PerSource::default());
        let at = |ip: &str| SocketAddr::new(ip.parse().unwrap(), 40000);
        // Spread over the /64s of one /56.
        let held: Vec<_> = (0..MAX_CONNS_PER_SOURCE)
            .map(|i| admit(&p, at(&format!("2001:db8:1:2{i:02x}::1"))).unwrap())
            .collect();
        assert!(admit(&p, at("2001:db8:1:2ff:ffff::9")).is_none());
        assert!(admit(&p, at("2001:db8:1:300::1")).is_some(), "another /56");
        assert!(admit(&p, at("192.0.2.7")).is_some());
        drop(held);
        assert!(admit(&p, at("2001:db8:1:200::1")).is_some());
    }

    fn segs(template: &str) -> Vec<String> {
        template
            .trim_start_matches('/')
            .split('/')
            .map(|s| match s {
                "{key}" => "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg%3D".to_string(),
                "{id}" => "name:blog".to_string(),
                "{name}" => "blog".to_string(),
                s => s.to_string(),
            })
            .collect()
    }

    /// The server's routes and the documented ones (`docs/openapi.json`,
    /// checked against `ENDPOINTS` in `client.rs`) are the same set.
    #[test]
    fn server_serves_exactly_the_documented_endpoints() {
        let mut served = Vec::new();
        for (m, t) in ENDPOINTS {
            let s = segs(t);
            let v: Vec<&str> = s.iter().map(String::as_str).collect();
            let (tmpl, methods) = endpoint(&v).unwrap_or_else(|| panic!("{m} {t} not served"));
            assert_eq!(tmpl, *t);
            assert!(methods.contains(m), "{m} {t} not served");
            served.push((*m, tmpl));
        }
        // And nothing more: every (method, template) the server has is documented.
        let mut all = Vec::new();
        for (_, t) in ENDPOINTS {
            let s = segs(t);
            let v: Vec<&str> = s.iter().map(String::as_str).collect();
            let (tmpl, methods) = endpoint(&v).unwrap();
            all.extend(methods.iter().map(|m| (*m, tmpl)));
        }
        all.sort();
        all.dedup();
        served.sort();
        served.dedup();
        assert_eq!(all, served);
        assert!(endpoint(&["v1", "nope"]).is_none());
        assert!(endpoint(&["v1", "routes", "a", "b"]).is_none());
    }

    /// A node is told a node API address it can reach: of the family of
    /// its own addresses, in its own network when the hub has one there.
    #[test]
    fn a_node_is_told_a_node_api_of_its_own_family() {
        let nets = |s: &[&str]| -> Vec<IpNet> { s.iter().map(|n| n.parse().unwrap()).collect() };
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let hub = nets(&["fd77:6777::1/48", "100.64.0.1/10", "10.77.0.1/16"]);
        // IPv4 only: not the hub's first (IPv6) address.
        assert_eq!(
            node_api_addr(&hub, &nets(&["100.64.1.2/32"])),
            Some(ip("100.64.0.1"))
        );
        // In the hub's second IPv4 network: the hub's address there.
        assert_eq!(
            node_api_addr(&hub, &nets(&["10.77.1.2/32"])),
            Some(ip("10.77.0.1"))
        );
        assert_eq!(
            node_api_addr(&hub, &nets(&["100.64.1.2/32", "fd77:6777::1:2/128"])),
            Some(ip("fd77:6777::1"))
        );
        assert_eq!(
            node_api_addr(&hub, &nets(&["fd77:6777::1:2/128"])),
            Some(ip("fd77:6777::1"))
        );
        // Outside every hub network, of a family the hub has: that family.
        assert_eq!(
            node_api_addr(&hub, &nets(&["192.0.2.9/32"])),
            Some(ip("100.64.0.1"))
        );
        // A family the hub has no address of: none the node could reach.
        assert_eq!(
            node_api_addr(&nets(&["fd77:6777::1/48"]), &nets(&["100.64.1.2/32"])),
            None
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb%2B%3D").unwrap(), "a/b+=");
        assert!(percent_decode("%zz").is_none());
        assert!(percent_decode("%2").is_none());
        assert!(percent_decode("%ff").is_none(), "not UTF-8");
    }
}
