//! Hub mode: a WireGuard concentrator that forwards between its nodes and its
//! own network stack.

use crate::config::HubConfig;
use crate::proxy::Proxy;
use crate::wg::api::ApiServer;
use crate::wg::device::{Device, DeviceConfig, Mode, PeerConfig};
use std::future::Future;
use std::time::Duration;
use tracing::info;

/// How long open proxy connections get to finish when the hub stops.
pub const PROXY_DRAIN: Duration = Duration::from_secs(5);

/// Starts the reverse proxy if the config has one. Call after the TUN is up, so
/// the check against the host's addresses sees the overlay addresses too.
pub async fn start_proxy(cfg: &HubConfig) -> anyhow::Result<Option<Proxy>> {
    let Some(settings) = cfg.proxy.clone() else {
        return Ok(None);
    };
    crate::proxy::settings::check_host_addresses(&settings)
        .map_err(|e| anyhow::anyhow!("proxy: {e}"))?;
    Ok(Some(Proxy::start(settings).await?))
}

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
    let proxy = start_proxy(&cfg).await?;
    // The overlay sidecar never fails the hub: it logs and retries on its own.
    let ygg = cfg
        .yggdrasil
        .clone()
        .map(crate::ygg::supervisor::Supervisor::start);
    info!(
        interface = %cfg.interface,
        public_key = %cfg.private_key.public_key(),
        "hub ready"
    );
    shutdown.await;
    info!("hub stopping");
    if let Some(y) = ygg {
        y.shutdown().await;
    }
    if let Some(p) = proxy {
        p.shutdown(PROXY_DRAIN).await;
    }
    drop(api);
    drop(dev);
    Ok(())
}
