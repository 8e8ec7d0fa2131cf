//! Reverse-proxy building blocks.
//!
//! Pure cores: [`access`] (client address rules), [`basic_auth`] (htpasswd
//! files and `Authorization` values; the bcrypt check is a driver),
//! [`forward_auth`] (check URLs and headers; its client is a driver), [`detect`] (ClientHello
//! SNI, HTTP Host sniffing), [`names`] (host names, route table), [`paths`]
//! (path prefixes of a route),
//! [`proxy_protocol`] (PROXY v2 headers), [`ratelimit`] (per-client token
//! buckets), [`bandwidth`] (per-route byte pacing). Drivers: [`server`] (listeners and
//! connection routing), [`http`] (hyper proxying), [`upstream`] (backend
//! choice, passive health, backend TLS), [`forward`] (UDP flows), [`tls`]
//! (ClientHello reading, SNI cert resolver), [`stall`] (clients that stop
//! reading their responses), [`access_log`] (JSON lines; the
//! formatting is pure), [`io`]. [`settings`] validates the hub config's proxy
//! sections.
pub mod access;
pub mod access_log;
pub mod acme;
pub mod bandwidth;
pub mod basic_auth;
pub mod detect;
pub mod dns;
pub mod dns_server;
pub mod forward;
pub mod forward_auth;
pub mod http;
pub mod io;
pub mod names;
pub mod paths;
pub mod proxy_protocol;
pub mod ratelimit;
pub mod server;
pub mod settings;
pub mod stall;
pub mod stats;
pub mod tls;
pub mod upstream;

pub use server::Proxy;
