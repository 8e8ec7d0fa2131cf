//! Reverse-proxy building blocks.
pub mod detect;
pub mod names;
