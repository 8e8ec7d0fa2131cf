//! Node mode: dials out to one or more hubs from behind NAT and keeps the
//! tunnels up. A hub that has gone silent for `dead_after` seconds (its
//! keepalives stopped: restarted, or the NAT mapping changed) gets a fresh
//! handshake at once, its name re-resolved, rather than after WireGuard's
//! default of up to two minutes. The node also runs its `[[service]]`
//! forwarders and declares the services to hubs with `control`
//! ([`crate::control::services`]).

use crate::config::{NodeConfig, NodeHub};
use crate::wg::api::ApiServer;
use crate::wg::device::{Device, DeviceConfig, Inner, Mode, PeerConfig};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Between two handshake attempts (WireGuard's REKEY_TIMEOUT).
const RETRY_MS: u64 = 5_000;

async fn resolve(endpoint: &str) -> Option<SocketAddr> {
    if let Ok(a) = endpoint.parse() {
        return Some(a);
    }
    match tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(endpoint)).await {
        Ok(Ok(mut addrs)) => addrs.next(),
        Ok(Err(e)) => {
            warn!(endpoint, error = %e, "cannot resolve hub");
            None
        }
        Err(_) => {
            warn!(endpoint, "resolving hub timed out");
            None
        }
    }
}

/// What the supervisor should do about one hub at time `now_ms`.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    Fine,
    /// Nothing heard for too long and no attempt in the last retry interval.
    Rehandshake,
    Waiting,
}

/// Pure decision: `last_rx_ms` is 0 when the hub was never heard from.
pub fn check(
    now_ms: u64,
    last_rx_ms: u64,
    last_attempt_ms: Option<u64>,
    dead_after_ms: u64,
) -> Check {
    let silent = last_rx_ms == 0 || now_ms.saturating_sub(last_rx_ms) >= dead_after_ms;
    if !silent {
        return Check::Fine;
    }
    match last_attempt_ms {
        Some(t) if now_ms.saturating_sub(t) < RETRY_MS && t >= last_rx_ms => Check::Waiting,
        _ => Check::Rehandshake,
    }
}

async fn supervise(dev: Arc<Inner>, hub: NodeHub, dead_after: u16) {
    let name = hub
        .name
        .clone()
        .unwrap_or_else(|| hub.public_key.to_base64());
    let mut last_attempt: Option<u64> = None;
    let mut down_logged = false;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let Some(peer) = dev.peer(&hub.public_key) else {
            // Removed at runtime through the API: nothing to supervise.
            return;
        };
        let now = dev.now_ms();
        let rx = peer.last_rx_ms();
        match check(now, rx, last_attempt, u64::from(dead_after) * 1000) {
            Check::Fine => {
                if down_logged {
                    info!(hub = %name, "hub reachable again");
                    down_logged = false;
                }
            }
            Check::Waiting => {}
            Check::Rehandshake => {
                if rx > 0 && !down_logged {
                    info!(hub = %name, silent_s = (now - rx) / 1000, "hub silent, handshaking again");
                    down_logged = true;
                }
                if let Some(addr) = resolve(&hub.endpoint).await {
                    if peer.endpoint() != Some(addr) {
                        info!(hub = %name, endpoint = %addr, "hub endpoint");
                    }
                    peer.set_endpoint(addr);
                }
                dev.force_handshake(&peer).await;
                last_attempt = Some(dev.now_ms());
            }
        }
    }
}

/// Runs the node until `shutdown` completes.
pub async fn run(cfg: NodeConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // The overlay sidecar never fails the node: it logs and retries on its own.
    let ygg = cfg
        .yggdrasil
        .clone()
        .map(crate::ygg::supervisor::Supervisor::start);
    if cfg.hubs.is_empty() {
        // Reachable only over Yggdrasil: no WireGuard device at all.
        info!("node ready (Yggdrasil only, no WireGuard hub)");
        shutdown.await;
        info!("node stopping");
        if let Some(y) = ygg {
            y.shutdown().await;
        }
        return Ok(());
    }
    let mut peers = Vec::new();
    for h in &cfg.hubs {
        peers.push(PeerConfig {
            name: h.name.clone(),
            public_key: h.public_key,
            preshared_key: h.preshared_key.clone(),
            endpoint: resolve(&h.endpoint).await,
            persistent_keepalive: Some(h.persistent_keepalive),
            allowed_ips: h.allowed_ips.clone(),
        });
    }
    let dev = Device::start(DeviceConfig {
        name: cfg.interface.clone(),
        mode: Mode::Node,
        private_key: Some(cfg.private_key.clone()),
        listen_port: cfg.listen_port,
        addresses: cfg.addresses.clone(),
        mtu: cfg.mtu,
        forward: false,
        keepalive: 0,
        peers,
        xlat: None,
        nat64: None,
        xlat_via_pool6: Vec::new(),
    })
    .await?;
    let api = ApiServer::start(dev.inner.clone()).await?;
    let sups: Vec<_> = cfg
        .hubs
        .iter()
        .map(|h| tokio::spawn(supervise(dev.inner.clone(), h.clone(), cfg.dead_after)))
        .collect();
    // `[[service]]` forwarders and their declaration to hubs with `control`.
    let services = crate::control::services::Services::start(&cfg, dev.inner.clone());
    info!(
        interface = %cfg.interface,
        public_key = %cfg.private_key.public_key(),
        hubs = cfg.hubs.len(),
        services = cfg.services.len(),
        "node ready"
    );
    shutdown.await;
    info!("node stopping");
    for s in sups {
        s.abort();
    }
    drop(services);
    if let Some(y) = ygg {
        y.shutdown().await;
    }
    drop(api);
    drop(dev);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supervisor_decisions() {
        // Never heard from: handshake at once, then wait the retry interval.
        assert_eq!(check(100, 0, None, 8000), Check::Rehandshake);
        assert_eq!(check(2000, 0, Some(100), 8000), Check::Waiting);
        assert_eq!(check(5200, 0, Some(100), 8000), Check::Rehandshake);
        // Heard recently: fine.
        assert_eq!(check(10_000, 9_000, None, 8000), Check::Fine);
        // Silent past dead_after: handshake even if an attempt was made before the silence.
        assert_eq!(
            check(20_000, 11_000, Some(10_000), 8000),
            Check::Rehandshake
        );
        assert_eq!(check(21_000, 11_000, Some(20_000), 8000), Check::Waiting);
    }
}
