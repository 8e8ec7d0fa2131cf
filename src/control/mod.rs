//! The hub's control plane (see `docs/control.md`): durable state, the admin
//! API, enrollment by join token, node-declared services, name ownership and
//! Prometheus metrics; and the node side of enrollment and service declaration.
//!
//! Pure cores: [`state`] (every operation on the durable state), [`token`].
//! Drivers: [`store`], [`api`], [`node_api`], [`client`], [`services`], [`join`].
pub mod api;
pub mod client;
pub mod join;
pub mod metrics;
pub mod node_api;
pub mod pin;
pub mod registry;
pub mod runtime;
pub mod services;
pub mod settings;
pub mod state;
pub mod store;
pub mod token;
