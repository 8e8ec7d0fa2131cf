//! Yggdrasil identity, addressing, daemon configuration and admin-socket
//! messages, for running the official `yggdrasil` daemon as a sidecar
//! (docs/yggdrasil.md sections 2.1, 2.9, 3 and 6.A).
//!
//! Everything here except [`admin_client`] is pure (no sockets, no clock):
//!
//! * [`addr`]: the 200::/7 node address, the 300::/64 routed subnet and the
//!   partial key recovered from either (identical in 0.4.x and 0.5.x);
//! * [`identity`]: ed25519 keys in the daemon's config encodings, link URI
//!   validation and daemon config generation;
//! * [`admin`]: admin API request encoding and response parsing for both the
//!   0.4.7 and the 0.5.x dialects;
//! * [`admin_client`]: a small blocking Unix-socket client over [`admin`];
//! * [`settings`]: the `[yggdrasil]` config section;
//! * [`supervisor`]: the async driver that runs and restarts the daemon;
//! * [`report`]: the overlay state for `gatewire show`.
#![warn(missing_docs)]

pub mod addr;
pub mod admin;
pub mod admin_client;
pub mod identity;
pub mod report;
pub mod settings;
pub mod supervisor;

pub use addr::{addr_for_key, is_ygg, partial_key, subnet_for_key, PartialKey, YggSubnet};
pub use admin::{AdminError, AdminRequest};
pub use identity::{Identity, PrivateKey, PublicKey};

/// The yggdrasil-go release line a configuration or admin conversation is
/// meant for.
///
/// 0.4.x and 0.5.x use different link protocols (they cannot peer with each
/// other), slightly different config fields and different admin commands
/// (`getDHT` in 0.4, `getTree` in 0.5). The address scheme is the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// yggdrasil-go 0.4.x (Debian bookworm ships 0.4.7).
    V0_4,
    /// yggdrasil-go 0.5.x (the public network).
    V0_5,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Version::V0_4 => f.write_str("0.4"),
            Version::V0_5 => f.write_str("0.5"),
        }
    }
}
