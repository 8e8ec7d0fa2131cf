//! UDP forwards: a flow table keyed by client address, bounded in size (the
//! least recently active flow is evicted), with idle expiry. Each flow has its
//! own connected socket to a backend; replies leave from the listening socket.

use crate::proxy::io::Activity;
use crate::proxy::server::Forward;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::debug;

/// Finds the forward currently configured on this listener (it changes on reload).
pub(crate) type Lookup = Arc<dyn Fn() -> Option<Arc<Forward>> + Send + Sync>;

struct Flow {
    sock: Arc<UdpSocket>,
    activity: Activity,
    task: JoinHandle<()>,
    fwd: Arc<Forward>,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn new_flow(listen: Arc<UdpSocket>, fwd: &Arc<Forward>, client: SocketAddr) -> Option<Flow> {
    let Some((backend, lease)) = fwd.upstreams.pick(Some(client.ip())) else {
        fwd.counters
            .error(crate::proxy::stats::ErrorKind::NoHealthyBackend);
        return None;
    };
    let any: IpAddr = if backend.addr.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let sock = match UdpSocket::bind(SocketAddr::new(any, 0)).await {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "udp flow socket");
            return None;
        }
    };
    if let Err(e) = sock.connect(backend.addr).await {
        debug!(backend = %backend, error = %e, "udp connect");
        fwd.upstreams.mark_down(backend.addr);
        fwd.counters
            .error(crate::proxy::stats::ErrorKind::BackendRefused);
        return None;
    }
    let sock = Arc::new(sock);
    let activity = Activity::new();
    let (s2, a2, f2) = (sock.clone(), activity.clone(), fwd.clone());
    let task = tokio::spawn(async move {
        let _lease = lease;
        let mut buf = vec![0u8; 65535];
        loop {
            match s2.recv(&mut buf).await {
                Ok(n) => {
                    let Some(d) = buf.get(..n) else { continue };
                    a2.touch();
                    f2.counters.add_out(n as u64);
                    let _ = listen.send_to(d, client).await;
                }
                Err(e) => {
                    // ECONNREFUSED from an ICMP port unreachable: the backend is down.
                    debug!(backend = %backend, error = %e, "udp flow ended");
                    f2.upstreams.mark_down(backend.addr);
                    f2.counters
                        .error(crate::proxy::stats::ErrorKind::BackendRefused);
                    return;
                }
            }
        }
    });
    fwd.counters.request();
    Some(Flow {
        sock,
        activity,
        task,
        fwd: fwd.clone(),
    })
}

/// Runs one UDP forward until `stop`.
pub(crate) async fn udp_loop(
    listen: Arc<UdpSocket>,
    lookup: Lookup,
    mut stop: watch::Receiver<bool>,
) {
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut buf = vec![0u8; 65535];
    let mut sweep = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            r = listen.recv_from(&mut buf) => {
                let (n, client) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        debug!(error = %e, "udp recv");
                        continue;
                    }
                };
                let Some(data) = buf.get(..n) else { continue };
                let Some(fwd) = lookup() else { continue };
                let Some(cfg) = fwd.udp.clone() else { continue };
                // Checked per datagram against the current rules, so a reload
                // that denies a client also ends its open flow.
                if !fwd.access.permits(client.ip()) {
                    if flows.remove(&client).is_some() {
                        debug!(client = %client, "udp flow ended: client address denied");
                    }
                    fwd.counters.error(crate::proxy::stats::ErrorKind::Denied);
                    continue;
                }
                // A flood from one client (a reflection attempt through a
                // DNS backend, say) is cut to its rate; the flow stays.
                if crate::proxy::server::over_limit(&fwd.limiter, client.ip()).is_some() {
                    fwd.counters.error(crate::proxy::stats::ErrorKind::RateLimited);
                    continue;
                }
                let live = flows.get(&client).is_some_and(|f| !f.task.is_finished());
                if !live {
                    flows.remove(&client);
                    if flows.len() >= cfg.max_flows {
                        let oldest = flows
                            .iter()
                            .max_by_key(|(_, f)| f.activity.idle())
                            .map(|(k, _)| *k);
                        if let Some(k) = oldest {
                            flows.remove(&k);
                        }
                    }
                    match new_flow(listen.clone(), &fwd, client).await {
                        Some(f) => {
                            flows.insert(client, f);
                        }
                        None => continue,
                    }
                }
                if let Some(f) = flows.get(&client) {
                    f.activity.touch();
                    f.fwd.counters.add_in(n as u64);
                    if let Err(e) = f.sock.send(data).await {
                        debug!(error = %e, "udp send to backend");
                    }
                }
            }
            _ = sweep.tick() => {
                flows.retain(|_, f| {
                    let idle = f.fwd.udp.as_ref().map_or(Duration::ZERO, |u| u.flow_idle_timeout);
                    !f.task.is_finished() && f.activity.idle() < idle
                });
            }
            _ = stop.changed() => break,
        }
    }
}
