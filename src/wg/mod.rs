//! Userspace WireGuard: the pure cores (allowed-IPs table, UAPI text protocol,
//! IP header views) and the drivers (device loops, UAPI socket).

pub mod allowed_ips;
pub mod api;
pub mod device;
pub mod handshake_limit;
pub mod liveness;
pub mod packet;
pub mod route;
pub mod staged;
pub mod stamp;
pub mod uapi;
pub mod xlat;
