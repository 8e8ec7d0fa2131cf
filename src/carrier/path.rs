//! Which way a node reaches one hub: plain UDP, or WireGuard carried over a
//! TLS stream to the hub's HTTPS port when UDP does not get through (pure:
//! the supervisor passes `now` and what it observed, and gets a step back).

use crate::backoff::Backoff;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The configured choice (`transport` in a node's `[[hub]]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// UDP first; TLS when nothing comes back over UDP.
    #[default]
    Auto,
    /// UDP only (plain WireGuard).
    Udp,
    /// TLS only.
    Tls,
}

/// The way in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Udp,
    Tls,
}

/// What the supervisor should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Stay,
    /// Close any TLS stream and send to the hub's UDP endpoint.
    UseUdp,
    /// (Re)connect the TLS stream and send through it.
    UseTls,
    /// On TLS: send a handshake initiation to the hub's UDP endpoint as well,
    /// leaving the stream in use. If the hub's answer comes back over UDP,
    /// the peer's endpoint moves there and [`Path::udp_answered`] is called.
    ProbeUdp,
}

/// How long a way is tried, once it is known dead (or from its first
/// attempt), before the other is: two handshake attempts.
pub const FALLBACK_MS: u64 = 10_000;
/// Between two connection attempts when TLS is the only way.
pub const RECONNECT_MS: u64 = 5_000;
/// On TLS in `auto`, the first UDP probe comes this long after the stream
/// was taken; each next one waits twice as long, up to the hub's
/// `udp_retry` (by default [`DEFAULT_UDP_RETRY_MS`]).
pub const FIRST_PROBE_MS: u64 = 30_000;
/// Longest wait between two UDP probes unless configured.
pub const DEFAULT_UDP_RETRY_MS: u64 = 300_000;
/// Back on TLS within this long of leaving it for an answered probe (UDP
/// passed the handshake but not the traffic): the probes keep their longer
/// wait instead of starting again from [`FIRST_PROBE_MS`], so a path like
/// that costs an outage at most every `udp_retry`.
pub const BOUNCE_MS: u64 = 120_000;
/// A stream that carried the tunnel and lasted less than this ended soon;
/// one that lasted longer starts the reconnects' count and waits afresh.
pub const QUICK_MS: u64 = 60_000;
/// Reconnects made at once after streams that ended soon, within
/// [`QUICK_MS`]: past them (an intermediary that cuts every connection
/// once the hub has answered on it?), each next one waits
/// ([`reconnect_backoff`]) until a stream lasts.
pub const QUICK_RECONNECTS: usize = 3;

/// The waits between reconnects once they come too fast: 1 s doubling up
/// to 60 s, jittered.
fn reconnect_backoff() -> Backoff {
    Backoff::new(
        Duration::from_secs(1),
        Duration::from_secs(60),
        Duration::from_millis(QUICK_MS),
    )
}

#[derive(Debug, Clone)]
pub struct Path {
    transport: Transport,
    via: Via,
    /// When the current way was taken (or last reconnected).
    since_ms: u64,
    /// Whether `Step::UseTls` was asked for and not yet answered.
    started: bool,
    /// The stream in use was seen open after the hub was heard from on it:
    /// when it ends, it is reconnected once before UDP is tried.
    carried: bool,
    /// Longest wait between UDP probes while on TLS in `auto` (0: none).
    udp_retry_ms: u64,
    /// The next UDP probe, and the wait before it.
    probe_at_ms: u64,
    probe_wait_ms: u64,
    /// When an answered probe took this node off TLS, and the wait then.
    left_tls: Option<(u64, u64)>,
    /// When the last reconnects after streams that ended soon were made (at
    /// most [`QUICK_RECONNECTS`], within [`QUICK_MS`]).
    quick: Vec<u64>,
    /// The waits once reconnects come too fast.
    backoff: Backoff,
    /// A reconnect that waits, due then.
    reconnect_at: Option<u64>,
    /// Draws the waits' jitter, in `[0, 1]`.
    jitter: fn() -> f64,
}

impl Path {
    /// The way to start on at `now_ms`: the first step is `UseTls` when TLS
    /// is the only way.
    pub fn new(transport: Transport, now_ms: u64) -> Path {
        Path {
            transport,
            via: if transport == Transport::Tls {
                Via::Tls
            } else {
                Via::Udp
            },
            since_ms: now_ms,
            started: false,
            carried: false,
            udp_retry_ms: DEFAULT_UDP_RETRY_MS,
            probe_at_ms: 0,
            probe_wait_ms: 0,
            left_tls: None,
            quick: Vec::new(),
            backoff: reconnect_backoff(),
            reconnect_at: None,
            jitter: || 1.0,
        }
    }

    /// Sets what draws the jitter of the waits between reconnects (without
    /// it, each wait is the longest).
    pub fn with_jitter(mut self, jitter: fn() -> f64) -> Path {
        self.jitter = jitter;
        self
    }

    /// When a reconnect that waits (streams kept ending soon) is due.
    pub fn reconnect_at(&self) -> Option<u64> {
        self.reconnect_at
    }

    /// Sets the longest wait between UDP probes on TLS (`auto` only; 0:
    /// never probe, stay on TLS while it works).
    pub fn with_udp_retry(mut self, ms: u64) -> Path {
        self.udp_retry_ms = ms;
        self
    }

    /// The hub answered over UDP while this node was on TLS (after a
    /// [`Step::ProbeUdp`]): UDP is the way from `now_ms`. False when this
    /// changes nothing (not `auto`, or already on UDP).
    pub fn udp_answered(&mut self, now_ms: u64) -> bool {
        if self.transport != Transport::Auto || self.via != Via::Tls {
            return false;
        }
        self.via = Via::Udp;
        self.since_ms = now_ms;
        self.started = false;
        self.carried = false;
        self.reconnect_at = None;
        self.forget_quick_ends();
        self.left_tls = Some((now_ms, self.probe_wait_ms));
        true
    }

    /// A change of path starts the count of streams that ended soon afresh.
    fn forget_quick_ends(&mut self) {
        self.quick.clear();
        self.backoff = reconnect_backoff();
    }

    pub fn via(&self) -> Via {
        self.via
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The next step at `now_ms`. `last_rx_ms` is when the hub was last heard
    /// from (0: never); `carrier_up` whether the TLS stream is open (ignored
    /// on UDP); `dead_after_ms` the node's silence limit.
    /// A stream was open since this way was taken, whatever it is now: the
    /// hub heard after `since` (`last_rx_ms`) was heard through it (a
    /// datagram from elsewhere would have moved the peer off the relay). So
    /// a stream that carried and ended between two steps counts as one that
    /// carried.
    pub fn stream_heard(&mut self, last_rx_ms: u64) {
        if self.via == Via::Tls && last_rx_ms > self.since_ms {
            self.carried = true;
        }
    }

    pub fn step(
        &mut self,
        now_ms: u64,
        last_rx_ms: u64,
        carrier_up: bool,
        dead_after_ms: u64,
    ) -> Step {
        let alive = last_rx_ms > 0 && now_ms.saturating_sub(last_rx_ms) < dead_after_ms;
        // The moment this way was known not to work: when it was taken if
        // nothing was heard on it since, else when the hub fell silent.
        let dead_from = if last_rx_ms <= self.since_ms {
            self.since_ms
        } else {
            self.since_ms.max(last_rx_ms.saturating_add(dead_after_ms))
        };
        let given_up = !alive && now_ms >= dead_from.saturating_add(FALLBACK_MS);
        if self.via == Via::Tls && carrier_up && last_rx_ms > self.since_ms {
            self.carried = true;
        }
        match (self.transport, self.via) {
            (Transport::Udp, _) => Step::Stay,
            (Transport::Auto, Via::Udp) if given_up => self.take(Via::Tls, now_ms),
            (Transport::Auto, Via::Udp) => Step::Stay,
            (_, Via::Tls) if !self.started => self.take(Via::Tls, now_ms),
            // A stream that carried the tunnel ended (the hub restarted, an
            // intermediary recycled the connection): UDP was dead when this
            // way was taken, and the probes tell when it is not.
            (_, Via::Tls) if !carrier_up && self.carried => self.carried_ended(now_ms),
            // The stream could not be opened (again), or ended before it
            // carried anything, or carries nothing.
            (Transport::Auto, Via::Tls) if !carrier_up || given_up => self.take(Via::Udp, now_ms),
            (Transport::Auto, Via::Tls) if self.udp_retry_ms > 0 && now_ms >= self.probe_at_ms => {
                self.probe_wait_ms = (self.probe_wait_ms * 2).min(self.udp_retry_ms);
                self.probe_at_ms = now_ms.saturating_add(self.probe_wait_ms);
                Step::ProbeUdp
            }
            (Transport::Auto, Via::Tls) => Step::Stay,
            (Transport::Tls, Via::Tls) => {
                let retry = now_ms.saturating_sub(self.since_ms) >= RECONNECT_MS;
                if (!carrier_up && retry) || given_up {
                    self.take(Via::Tls, now_ms)
                } else {
                    Step::Stay
                }
            }
            (Transport::Tls, Via::Udp) => self.take(Via::Tls, now_ms),
        }
    }

    /// The stream that carried the tunnel has ended (seen at `now_ms`): a new
    /// one at once, unless [`QUICK_RECONNECTS`] were made so within
    /// [`QUICK_MS`] after streams that ended soon; then (and for each next
    /// one, until a stream lasts [`QUICK_MS`]) after a wait, longer each time.
    fn carried_ended(&mut self, now_ms: u64) -> Step {
        if let Some(at) = self.reconnect_at {
            if now_ms < at {
                return Step::Stay;
            }
            return self.reconnect(now_ms);
        }
        let lasted = now_ms.saturating_sub(self.since_ms);
        if lasted >= QUICK_MS {
            self.forget_quick_ends();
        }
        self.quick.retain(|t| now_ms.saturating_sub(*t) < QUICK_MS);
        if self.backoff.failures() == 0 && self.quick.len() < QUICK_RECONNECTS {
            self.quick.push(now_ms);
            return self.reconnect(now_ms);
        }
        let wait = self
            .backoff
            .next_delay(Duration::from_millis(lasted), (self.jitter)());
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        self.reconnect_at = Some(now_ms.saturating_add(wait_ms));
        Step::Stay
    }

    /// A new stream in place of one that carried the tunnel: the UDP probes
    /// keep their wait, the next one no sooner than a new stream's first.
    fn reconnect(&mut self, now_ms: u64) -> Step {
        self.since_ms = now_ms;
        self.carried = false;
        self.reconnect_at = None;
        self.probe_at_ms = self
            .probe_at_ms
            .max(now_ms.saturating_add(FIRST_PROBE_MS.min(self.udp_retry_ms)));
        Step::UseTls
    }

    fn take(&mut self, via: Via, now_ms: u64) -> Step {
        self.via = via;
        self.since_ms = now_ms;
        self.started = via == Via::Tls;
        self.carried = false;
        self.reconnect_at = None;
        self.forget_quick_ends();
        self.probe_wait_ms = match self.left_tls {
            Some((t, wait)) if via == Via::Tls && now_ms.saturating_sub(t) < BOUNCE_MS => {
                wait.saturating_mul(2).min(self.udp_retry_ms)
            }
            _ => FIRST_PROBE_MS.min(self.udp_retry_ms),
        };
        self.probe_at_ms = now_ms.saturating_add(self.probe_wait_ms);
        match via {
            Via::Udp => Step::UseUdp,
            Via::Tls => Step::UseTls,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEAD: u64 = 8_000;

    #[test]
    fn udp_only_never_moves() {
        let mut p = Path::new(Transport::Udp, 0);
        for t in (0..100_000).step_by(500) {
            assert_eq!(p.step(t, 0, false, DEAD), Step::Stay);
        }
        assert_eq!(p.via(), Via::Udp);
    }

    #[test]
    fn auto_falls_back_when_udp_never_answers() {
        let mut p = Path::new(Transport::Auto, 1_000);
        assert_eq!(p.step(1_000, 0, false, DEAD), Step::Stay);
        assert_eq!(p.step(10_999, 0, false, DEAD), Step::Stay);
        assert_eq!(p.step(11_000, 0, false, DEAD), Step::UseTls);
        assert_eq!(p.via(), Via::Tls);
        // The stream opened and the hub answers through it: stay (trying
        // UDP on the side now and then).
        assert_eq!(p.step(11_500, 0, true, DEAD), Step::Stay);
        assert_eq!(p.step(12_000, 11_800, true, DEAD), Step::Stay);
        assert_eq!(p.step(600_000, 599_000, true, DEAD), Step::ProbeUdp);
        assert_eq!(p.step(600_500, 600_400, true, DEAD), Step::Stay);
        assert_eq!(p.via(), Via::Tls);
    }

    #[test]
    fn auto_stays_on_udp_while_the_hub_answers() {
        let mut p = Path::new(Transport::Auto, 0);
        for t in (500..200_000).step_by(500) {
            assert_eq!(p.step(t, t - 400, false, DEAD), Step::Stay);
        }
    }

    #[test]
    fn auto_falls_back_when_udp_stops_midway() {
        let mut p = Path::new(Transport::Auto, 0);
        assert_eq!(p.step(50_000, 49_000, false, DEAD), Step::Stay);
        // Last heard at 50 s: dead at 58 s, given up at 68 s.
        assert_eq!(p.step(67_999, 50_000, false, DEAD), Step::Stay);
        assert_eq!(p.step(68_000, 50_000, false, DEAD), Step::UseTls);
    }

    #[test]
    fn auto_returns_to_udp_when_the_stream_fails() {
        let mut p = Path::new(Transport::Auto, 0);
        assert_eq!(p.step(10_000, 0, false, DEAD), Step::UseTls);
        // The connection was refused (the hub takes no TLS): back to UDP at once,
        // and TLS again only after another full try of UDP.
        assert_eq!(p.step(10_500, 0, false, DEAD), Step::UseUdp);
        assert_eq!(p.via(), Via::Udp);
        assert_eq!(p.step(20_000, 0, false, DEAD), Step::Stay);
        assert_eq!(p.step(20_500, 0, false, DEAD), Step::UseTls);
        // Up and carrying, then the stream ends: one reconnect at once; it
        // fails, so UDP again.
        assert_eq!(p.step(21_000, 20_800, true, DEAD), Step::Stay);
        assert_eq!(p.step(40_000, 39_900, false, DEAD), Step::UseTls);
        assert_eq!(p.via(), Via::Tls);
        assert_eq!(p.step(40_500, 39_900, false, DEAD), Step::UseUdp);
        // UDP works now: it stays.
        assert_eq!(p.step(41_000, 40_900, false, DEAD), Step::Stay);
        assert_eq!(p.step(90_000, 89_900, false, DEAD), Step::Stay);
    }

    #[test]
    fn auto_reconnects_a_stream_that_carried_the_tunnel_at_once() {
        let mut p = Path::new(Transport::Auto, 0);
        assert_eq!(p.step(10_000, 0, false, DEAD), Step::UseTls);
        assert_eq!(p.step(10_500, 10_300, true, DEAD), Step::Stay);
        // The stream ends (the hub restarts, an intermediary recycles it):
        // a new one at once, not UDP first.
        assert_eq!(p.step(25_000, 24_900, false, DEAD), Step::UseTls);
        assert_eq!(p.via(), Via::Tls);
        // It carries the tunnel too; it ends as well: again at once.
        assert_eq!(p.step(25_500, 25_200, true, DEAD), Step::Stay);
        assert_eq!(p.step(26_000, 25_900, true, DEAD), Step::Stay);
        assert_eq!(p.step(26_500, 25_900, false, DEAD), Step::UseTls);
        // This one opens but ends before the hub is heard on it: UDP.
        assert_eq!(p.step(27_000, 25_900, true, DEAD), Step::Stay);
        assert_eq!(p.step(27_500, 25_900, false, DEAD), Step::UseUdp);
        assert_eq!(p.via(), Via::Udp);
        // Heard while the stream was seen closed (a late UDP answer) is no
        // stream that carried: UDP, not another reconnect.
        let mut q = Path::new(Transport::Auto, 0);
        assert_eq!(q.step(10_000, 0, false, DEAD), Step::UseTls);
        assert_eq!(q.step(10_500, 10_400, false, DEAD), Step::UseUdp);
        // Open but silent for FALLBACK_MS after the hub was heard on it:
        // UDP, not a reconnect.
        let mut r = Path::new(Transport::Auto, 0);
        assert_eq!(r.step(10_000, 0, false, DEAD), Step::UseTls);
        assert_eq!(r.step(10_500, 10_400, true, DEAD), Step::Stay);
        assert_eq!(r.step(28_399, 10_400, true, DEAD), Step::Stay);
        assert_eq!(r.step(28_400, 10_400, true, DEAD), Step::UseUdp);
    }

    /// Streams cut soon after the hub answered on them (an intermediary that
    /// does so to every connection): three reconnects at once, then each
    /// next one after a wait twice as long as the last, until a stream
    /// lasts a minute.
    #[test]
    fn streams_that_keep_ending_soon_are_reconnected_after_a_growing_wait() {
        for transport in [Transport::Tls, Transport::Auto] {
            let mut p = Path::new(transport, 0);
            let mut now = 0;
            if transport == Transport::Auto {
                now = 10_000;
            }
            assert_eq!(p.step(now, 0, false, DEAD), Step::UseTls);
            // The stream opened at `now` carries, and is cut after `lasts`:
            // the steps from then until the next stream is asked for.
            let cut = |p: &mut Path, now: &mut u64, lasts: u64| {
                let opened = *now;
                assert_eq!(p.step(opened + 500, opened + 300, true, DEAD), Step::Stay);
                *now = opened + lasts;
                let rx = *now - 100;
                let mut waited = 0;
                loop {
                    match p.step(*now, rx, false, DEAD) {
                        Step::UseTls => return waited,
                        Step::Stay => {
                            assert!(p.reconnect_at().is_some_and(|at| at > *now));
                            *now += 500;
                            waited += 500;
                        }
                        s => panic!("{s:?} at {now}"),
                    }
                }
            };
            let waits: Vec<u64> = (0..7).map(|_| cut(&mut p, &mut now, 1_000)).collect();
            assert_eq!(
                waits,
                [0, 0, 0, 1_000, 2_000, 4_000, 8_000],
                "{transport:?}"
            );
            assert_eq!(p.via(), Via::Tls);
            // One that lasts a minute starts afresh.
            let waits: Vec<u64> = [60_000, 1_000, 1_000, 1_000]
                .map(|lasts| cut(&mut p, &mut now, lasts))
                .to_vec();
            assert_eq!(waits, [0, 0, 0, 1_000], "{transport:?}");
            // Streams that end sooner than a minute but not three in a
            // minute are all replaced at once.
            let mut q = Path::new(transport, 0);
            let mut now = 20_000;
            assert_eq!(q.step(now, 0, false, DEAD), Step::UseTls);
            for _ in 0..10 {
                assert_eq!(cut(&mut q, &mut now, 30_000), 0, "{transport:?}");
            }
        }
        // The waits are jittered (the upper half of each).
        let mut p = Path::new(Transport::Tls, 0).with_jitter(|| 0.0);
        assert_eq!(p.step(0, 0, false, DEAD), Step::UseTls);
        let mut now = 0;
        for i in 0..4 {
            assert_eq!(p.step(now + 500, now + 300, true, DEAD), Step::Stay);
            now += 1_000;
            let s = p.step(now, now - 100, false, DEAD);
            if i < 3 {
                assert_eq!(s, Step::UseTls);
            } else {
                assert_eq!((s, p.reconnect_at()), (Step::Stay, Some(now + 500)));
            }
        }
    }

    #[test]
    fn a_stream_that_carried_and_ended_between_two_steps_is_replaced_at_once() {
        let mut p = Path::new(Transport::Auto, 0);
        assert_eq!(p.step(10_000, 0, false, DEAD), Step::UseTls);
        // The hub was heard through the stream at 10.2 s; the stream is
        // gone by the next step at 10.5 s.
        p.stream_heard(10_200);
        assert_eq!(p.step(10_500, 10_200, false, DEAD), Step::UseTls);
        // Unheard, a stream that ends is a way that does not work.
        let mut q = Path::new(Transport::Auto, 0);
        assert_eq!(q.step(10_000, 0, false, DEAD), Step::UseTls);
        q.stream_heard(9_000);
        assert_eq!(q.step(10_500, 9_000, false, DEAD), Step::UseUdp);
    }

    #[test]
    fn a_new_path_forgets_the_streams_that_ended_soon() {
        let mut p = Path::new(Transport::Auto, 0);
        let mut now = 10_000;
        assert_eq!(p.step(now, 0, false, DEAD), Step::UseTls);
        // Four streams that end a second after they carried: the fourth
        // replacement waits.
        for i in 0..4 {
            assert_eq!(p.step(now + 500, now + 300, true, DEAD), Step::Stay);
            now += 1_000;
            let s = p.step(now, now - 100, false, DEAD);
            assert_eq!(s, if i < 3 { Step::UseTls } else { Step::Stay }, "{i}");
        }
        assert!(p.reconnect_at().is_some());
        // Back on UDP, then on TLS again: the first stream that ends soon
        // is replaced at once.
        assert!(p.udp_answered(now));
        assert_eq!(p.via(), Via::Udp);
        assert!(p.reconnect_at().is_none());
        assert_eq!(p.take(Via::Tls, now + 1_000), Step::UseTls);
        now += 1_000;
        assert_eq!(p.step(now + 500, now + 300, true, DEAD), Step::Stay);
        now += 1_000;
        assert_eq!(p.step(now, now - 100, false, DEAD), Step::UseTls);
    }

    #[test]
    fn a_reconnect_keeps_the_probe_wait() {
        let mut p = Path::new(Transport::Auto, 0);
        assert_eq!(p.step(10_000, 0, false, DEAD), Step::UseTls);
        assert_eq!(p.step(40_000, 39_900, true, DEAD), Step::ProbeUdp);
        // Next probe due at 100 s (60 s wait); the stream ends at 95 s and a
        // new one carries: the probe waits for the new stream's first 30 s.
        assert_eq!(p.step(95_000, 94_900, false, DEAD), Step::UseTls);
        assert_eq!(p.step(95_500, 95_400, true, DEAD), Step::Stay);
        assert_eq!(p.step(124_999, 124_900, true, DEAD), Step::Stay);
        assert_eq!(p.step(125_000, 124_900, true, DEAD), Step::ProbeUdp);
        // And the wait after it goes on doubling: 120 s.
        assert_eq!(p.step(244_999, 244_900, true, DEAD), Step::Stay);
        assert_eq!(p.step(245_000, 244_900, true, DEAD), Step::ProbeUdp);
        // A reconnect long before the next probe leaves it where it was.
        assert_eq!(p.step(250_000, 249_900, false, DEAD), Step::UseTls);
        assert_eq!(p.step(250_500, 250_400, true, DEAD), Step::Stay);
        assert_eq!(p.step(484_999, 484_900, true, DEAD), Step::Stay);
        assert_eq!(p.step(485_000, 484_900, true, DEAD), Step::ProbeUdp);
    }

    #[test]
    fn auto_leaves_a_stream_that_carries_nothing() {
        let mut p = Path::new(Transport::Auto, 0);
        assert_eq!(p.step(10_000, 0, false, DEAD), Step::UseTls);
        // Open but silent since it was taken: given up after FALLBACK_MS.
        assert_eq!(p.step(19_999, 0, true, DEAD), Step::Stay);
        assert_eq!(p.step(20_000, 0, true, DEAD), Step::UseUdp);
    }

    #[test]
    fn auto_on_tls_probes_udp_less_and_less_often_and_leaves_tls_when_it_answers() {
        let mut p = Path::new(Transport::Auto, 0);
        assert_eq!(p.step(10_000, 0, false, DEAD), Step::UseTls);
        // The stream works: probes at 30 s, then 60, 120, 240, 300, 300 s apart.
        let mut probes = Vec::new();
        for t in (10_500..1_500_000).step_by(500) {
            match p.step(t, t - 300, true, DEAD) {
                Step::Stay => {}
                Step::ProbeUdp => probes.push(t),
                s => panic!("{s:?} at {t}"),
            }
        }
        let gaps: Vec<u64> = probes.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(probes[0], 40_000);
        assert_eq!(gaps[..5], [60_000, 120_000, 240_000, 300_000, 300_000]);
        assert_eq!(p.via(), Via::Tls);
        // The hub answers over UDP: UDP from now on, and it stays.
        assert!(p.udp_answered(1_500_000));
        assert_eq!(p.via(), Via::Udp);
        assert!(!p.udp_answered(1_500_100));
        assert_eq!(p.step(1_500_500, 1_500_400, false, DEAD), Step::Stay);
        assert_eq!(p.step(1_600_000, 1_599_900, false, DEAD), Step::Stay);
        // Back on TLS later: probes start again from 30 s.
        assert_eq!(p.step(1_700_000, 1_600_000, false, DEAD), Step::UseTls);
        assert_eq!(p.step(1_700_500, 1_700_400, true, DEAD), Step::Stay);
        assert_eq!(p.step(1_730_000, 1_729_900, true, DEAD), Step::ProbeUdp);
    }

    #[test]
    fn a_quick_bounce_back_to_tls_keeps_the_longer_probe_wait() {
        let mut p = Path::new(Transport::Auto, 0);
        assert_eq!(p.step(10_000, 0, false, DEAD), Step::UseTls);
        assert_eq!(p.step(40_000, 39_900, true, DEAD), Step::ProbeUdp);
        // Answered: UDP. But UDP carries nothing, so TLS again 10 s later.
        assert!(p.udp_answered(40_500));
        assert_eq!(p.step(50_499, 40_500, false, DEAD), Step::Stay);
        assert_eq!(p.step(50_500, 40_500, false, DEAD), Step::UseTls);
        // The next probe waits 2 x 60 s, not 30 s.
        assert_eq!(p.step(51_000, 50_900, true, DEAD), Step::Stay);
        assert_eq!(p.step(170_499, 170_400, true, DEAD), Step::Stay);
        assert_eq!(p.step(170_500, 170_400, true, DEAD), Step::ProbeUdp);
    }

    #[test]
    fn udp_retry_caps_the_probe_wait_and_zero_turns_probes_off() {
        let mut p = Path::new(Transport::Auto, 0).with_udp_retry(5_000);
        assert_eq!(p.step(10_000, 0, false, DEAD), Step::UseTls);
        assert_eq!(p.step(14_999, 14_900, true, DEAD), Step::Stay);
        assert_eq!(p.step(15_000, 14_900, true, DEAD), Step::ProbeUdp);
        assert_eq!(p.step(19_999, 19_900, true, DEAD), Step::Stay);
        assert_eq!(p.step(20_000, 19_900, true, DEAD), Step::ProbeUdp);
        let mut off = Path::new(Transport::Auto, 0).with_udp_retry(0);
        assert_eq!(off.step(10_000, 0, false, DEAD), Step::UseTls);
        for t in (10_500..2_000_000).step_by(500) {
            assert_eq!(off.step(t, t - 100, true, DEAD), Step::Stay);
        }
        // Only `auto` probes, and only on TLS.
        let mut tls = Path::new(Transport::Tls, 0);
        assert_eq!(tls.step(0, 0, false, DEAD), Step::UseTls);
        for t in (500..2_000_000).step_by(500) {
            assert_eq!(tls.step(t, t - 100, true, DEAD), Step::Stay);
        }
        assert!(!tls.udp_answered(2_000_000));
        assert_eq!(tls.via(), Via::Tls);
    }

    #[test]
    fn tls_only_connects_first_and_retries_paced() {
        let mut p = Path::new(Transport::Tls, 0);
        assert_eq!(p.via(), Via::Tls);
        assert_eq!(p.step(0, 0, false, DEAD), Step::UseTls);
        assert_eq!(p.step(500, 0, false, DEAD), Step::Stay);
        assert_eq!(p.step(4_999, 0, false, DEAD), Step::Stay);
        assert_eq!(p.step(5_000, 0, false, DEAD), Step::UseTls);
        assert_eq!(p.step(6_000, 5_900, true, DEAD), Step::Stay);
        // Open but the hub went silent: reconnect, never UDP.
        assert_eq!(p.step(23_899, 5_900, true, DEAD), Step::Stay);
        assert_eq!(p.step(23_900, 5_900, true, DEAD), Step::UseTls);
        assert_eq!(p.via(), Via::Tls);
        // A stream that carried and ends within 5 s of its start: a new one
        // at once; one that fails waits the 5 s.
        assert_eq!(p.step(24_000, 23_950, true, DEAD), Step::Stay);
        assert_eq!(p.step(24_500, 23_950, false, DEAD), Step::UseTls);
        assert_eq!(p.step(25_000, 23_950, false, DEAD), Step::Stay);
        assert_eq!(p.step(29_499, 23_950, false, DEAD), Step::Stay);
        assert_eq!(p.step(29_500, 23_950, false, DEAD), Step::UseTls);
    }

    proptest::proptest! {
        /// Whatever is observed, the way stays within what is configured, and
        /// a step that moves always says where to.
        #[test]
        fn steps_respect_the_transport(
            t in 0usize..3,
            obs in proptest::collection::vec((0u64..5_000, 0u64..3, proptest::bool::ANY), 1..200),
        ) {
            let transport = [Transport::Auto, Transport::Udp, Transport::Tls][t];
            let mut p = Path::new(transport, 0);
            let mut now = 0u64;
            let mut rx = 0u64;
            for (dt, heard, up) in obs {
                now += dt;
                if heard == 0 {
                    rx = now;
                }
                let before = p.via();
                let s = p.step(now, rx, up, DEAD);
                match transport {
                    Transport::Udp => proptest::prop_assert_eq!(s, Step::Stay),
                    Transport::Tls => proptest::prop_assert!(
                        s != Step::UseUdp && s != Step::ProbeUdp && p.via() == Via::Tls
                    ),
                    Transport::Auto => {}
                }
                match s {
                    Step::Stay => proptest::prop_assert_eq!(p.via(), before),
                    Step::ProbeUdp => proptest::prop_assert!(before == Via::Tls && p.via() == Via::Tls),
                    Step::UseUdp => proptest::prop_assert_eq!(p.via(), Via::Udp),
                    Step::UseTls => proptest::prop_assert_eq!(p.via(), Via::Tls),
                }
            }
        }
    }
}
