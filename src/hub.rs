//! Hub mode: a WireGuard concentrator that forwards between its nodes and its
//! own network stack.

use crate::config::HubConfig;
use crate::wg::api::ApiServer;
use crate::wg::device::{Device, DeviceConfig, Mode, PeerConfig};
use std::future::Future;
use tracing::info;

pub fn device_config(cfg: &HubConfig) -> DeviceConfig {
    DeviceConfig {
        name: cfg.interface.clone(),
        mode: Mode::Hub,
        private_key: Some(cfg.private_key.clone()),
        listen_port: cfg.listen_port,
        addresses: cfg.addresses.clone(),
        mtu: cfg.mtu,
        forward: true,
        keepalive: cfg.keepalive,
        peers: cfg
            .peers
            .iter()
            .map(|p| PeerConfig {
                name: p.name.clone(),
                public_key: p.public_key,
                preshared_key: p.preshared_key.clone(),
                endpoint: p.endpoint,
                persistent_keepalive: p.persistent_keepalive,
                allowed_ips: p.allowed_ips.clone(),
            })
            .collect(),
    }
}

/// Runs the hub until `shutdown` completes. The TUN and the API socket are
/// removed on return, on error too.
pub async fn run(cfg: HubConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let dev = Device::start(device_config(&cfg)).await?;
    let api = ApiServer::start(dev.inner.clone()).await?;
    info!(
        interface = %cfg.interface,
        public_key = %cfg.private_key.public_key(),
        "hub ready"
    );
    shutdown.await;
    info!("hub stopping");
    drop(api);
    drop(dev);
    Ok(())
}
