//! Pure rules of instance health: probe hysteresis and crash-loop back-off.

use std::time::{Duration, Instant};

/// Consecutive probe results → health, flipping only after a threshold
/// (pingora's health check does the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeState {
    pub healthy: bool,
    successes: u32,
    failures: u32,
}

impl ProbeState {
    /// Readiness and startup start unhealthy; liveness starts healthy.
    pub fn new(healthy: bool) -> Self {
        Self {
            healthy,
            successes: 0,
            failures: 0,
        }
    }

    /// Record one result. Returns the new health when it flipped.
    pub fn record(
        &mut self,
        ok: bool,
        success_threshold: u32,
        failure_threshold: u32,
    ) -> Option<bool> {
        if ok {
            self.successes += 1;
            self.failures = 0;
            if !self.healthy && self.successes >= success_threshold {
                self.healthy = true;
                return Some(true);
            }
        } else {
            self.failures += 1;
            self.successes = 0;
            if self.healthy && self.failures >= failure_threshold {
                self.healthy = false;
                return Some(false);
            }
        }
        None
    }
}

/// Crash-loop back-off for one replica slot: the first failure is replaced
/// at once (a killed instance comes back as fast as the app starts); each
/// further failure before the slot was stable doubles the wait, up to `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// An instance ready this long resets the count.
    pub stable_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(30),
            stable_after: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The wait before replacing after `failures` consecutive failures.
    pub fn delay(&self, failures: u32) -> Duration {
        if failures <= 1 {
            return Duration::ZERO;
        }
        let factor = 1u32 << (failures - 2).min(16);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// What a controller remembers of one replica slot of a release: how
/// often its instance failed in a row, when the next may start, and how
/// many replacements it had (shown in `status`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotHistory {
    /// Consecutive failures before the slot was stable.
    pub failures: u32,
    /// No new instance starts in the slot before then.
    pub retry_at: Option<Instant>,
    pub replacements: u32,
}

impl SlotHistory {
    /// The slot's instance failed (exited on its own or failed liveness)
    /// at `now`, after being ready since `ready_since`: one ready for
    /// `stable_after` starts the count again.
    pub fn failed(&mut self, now: Instant, ready_since: Option<Instant>, backoff: &Backoff) {
        let stable =
            ready_since.is_some_and(|t| now.saturating_duration_since(t) >= backoff.stable_after);
        self.failures = if stable { 1 } else { self.failures + 1 };
        self.replacements += 1;
        let delay = backoff.delay(self.failures);
        self.retry_at = (!delay.is_zero()).then(|| now + delay);
    }

    /// Whether a new instance must still wait at `now`.
    pub fn backing_off(&self, now: Instant) -> bool {
        self.retry_at.is_some_and(|t| t > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_flips_only_after_the_threshold() {
        let mut s = ProbeState::new(true);
        assert_eq!(s.record(false, 1, 3), None);
        assert_eq!(s.record(false, 1, 3), None);
        assert_eq!(s.record(true, 1, 3), None, "a success resets the failures");
        assert_eq!(s.record(false, 1, 3), None);
        assert_eq!(s.record(false, 1, 3), None);
        assert_eq!(s.record(false, 1, 3), Some(false));
        assert_eq!(s.record(true, 2, 3), None);
        assert_eq!(s.record(true, 2, 3), Some(true));
    }

    #[test]
    fn backoff_is_immediate_then_doubles_to_a_cap() {
        let b = Backoff::default();
        assert_eq!(b.delay(0), Duration::ZERO);
        assert_eq!(b.delay(1), Duration::ZERO);
        assert_eq!(b.delay(2), Duration::from_millis(250));
        assert_eq!(b.delay(3), Duration::from_millis(500));
        assert_eq!(b.delay(6), Duration::from_secs(4));
        assert_eq!(b.delay(40), Duration::from_secs(30));
    }
}
