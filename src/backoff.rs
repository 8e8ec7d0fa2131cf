//! Retry delays [pure]: bounded exponential backoff with jitter, started
//! afresh after a run that lasted. Used by the Yggdrasil supervisor and the
//! mesh's etcd driver.

use std::time::Duration;

/// Retry delays [pure]: `base * 2^n` capped at `max`, with "equal jitter"
/// (a uniformly drawn value in the upper half of that), `n` counting the
/// consecutive short runs; a run of at least `stable` starts over from `base`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    stable: Duration,
    failures: u32,
}

impl Backoff {
    /// A policy; `base <= max`.
    pub fn new(base: Duration, max: Duration, stable: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            stable,
            failures: 0,
        }
    }

    /// Consecutive short runs so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The delay before the next start, after a run that lasted `ran_for`.
    /// `jitter` in `[0, 1]` (clamped) picks the point in `[d/2, d]`.
    pub fn next_delay(&mut self, ran_for: Duration, jitter: f64) -> Duration {
        if ran_for >= self.stable {
            self.failures = 0;
        }
        let exp = self.failures.min(30);
        self.failures = self.failures.saturating_add(1);
        let full = self
            .base
            .checked_mul(1u32 << exp)
            .unwrap_or(self.max)
            .min(self.max);
        let j = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        full / 2 + full.mul_f64(j) / 2
    }
}
