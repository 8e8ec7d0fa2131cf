//! gatewire: hidden nodes serve the public internet through hubs, over
//! userspace WireGuard tunnels.
//!
//! Pure protocol cores (no sockets, no clock) live beside thin drivers:
//! [`wg::allowed_ips`], [`wg::uapi`] and [`wg::packet`] are pure;
//! [`wg::device`] and [`wg::api`] drive them with tokio, a TUN and UDP sockets.
//! [`hub`] and [`node`] are the two daemon modes; [`cli`] is the command line.

pub mod backoff;
pub mod carrier;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod hub;
pub mod keys;
pub mod mesh;
pub mod node;
pub mod per_source;
pub mod proxy;
pub mod sd_notify;
pub mod sockopt;
pub mod wg;
pub mod xlat;
pub mod ygg;
