//! Hub and node configuration files.
#![no_main]
use gatewire::config::{HubConfig, NodeConfig};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = HubConfig::parse("fuzz.toml", text, Path::new("/nonexistent"));
        let _ = NodeConfig::parse("fuzz.toml", text, Path::new("/nonexistent"));
    }
});
