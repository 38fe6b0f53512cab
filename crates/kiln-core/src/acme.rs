//! Automatic certificates (ACME, RFC 8555): the decisions, pure. The agent
//! speaks the protocol; this says when to renew and how long to wait after
//! a failure.
//!
//! Renewal is at one third of the lifetime left (a 90-day certificate after
//! 60 days, a 45-day one after 30), or inside the window the CA's ACME
//! Renewal Information (RFC 9773) gives, when it gives one: never "30 days
//! before expiry", which loops on certificates shorter than that.

use std::time::{Duration, SystemTime};

/// The shortest and longest waits after a failed order.
pub const BACKOFF_MIN: Duration = Duration::from_secs(60);
pub const BACKOFF_MAX: Duration = Duration::from_secs(24 * 3600);

/// When to renew a certificate valid from `not_before` to `not_after`:
/// inside the CA's renewal window when it gives one (at `jitter`, 0 to 1,
/// of the way through it, so that many nodes or certificates do not all
/// ask at once), else when a third of its lifetime is left.
pub fn renew_at(
    not_before: SystemTime,
    not_after: SystemTime,
    window: Option<(SystemTime, SystemTime)>,
    jitter: f64,
) -> SystemTime {
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    if let Some((start, end)) = window
        && let Ok(span) = end.duration_since(start)
    {
        return start + span.mul_f64(jitter);
    }
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    not_before + lifetime * 2 / 3
}

/// How long to wait before trying again after `failures` failed orders in
/// a row (1 or more): a minute, doubling, at most a day, less up to a
/// quarter by `jitter` (0 to 1); a CA's `Retry-After` wins when longer.
pub fn backoff(failures: u32, jitter: f64, retry_after: Option<Duration>) -> Duration {
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let doublings = failures.saturating_sub(1).min(20);
    let base = BACKOFF_MIN
        .saturating_mul(1u32 << doublings)
        .min(BACKOFF_MAX);
    let wait = base.mul_f64(1.0 - jitter / 4.0).max(BACKOFF_MIN);
    retry_after.map_or(wait, |r| r.min(BACKOFF_MAX).max(wait))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DAY: Duration = Duration::from_secs(86400);

    fn t(days: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(86400 * days)
    }

    #[test]
    fn a_certificate_is_renewed_with_a_third_of_its_life_left() {
        assert_eq!(renew_at(t(100), t(190), None, 0.5), t(160));
        assert_eq!(renew_at(t(100), t(145), None, 0.0), t(130));
        // Shorter than 30 days: still before it ends, never in a loop.
        assert_eq!(renew_at(t(100), t(106), None, 1.0), t(104));
        // A certificate that ends before it starts: renewed at once.
        assert_eq!(renew_at(t(100), t(90), None, 0.3), t(100));
    }

    #[test]
    fn the_cas_window_wins_and_jitter_spreads_inside_it() {
        let window = Some((t(150), t(152)));
        assert_eq!(renew_at(t(100), t(190), window, 0.0), t(150));
        assert_eq!(renew_at(t(100), t(190), window, 0.5), t(151));
        assert_eq!(renew_at(t(100), t(190), window, 1.0), t(152));
        assert_eq!(renew_at(t(100), t(190), window, 7.0), t(152), "clamped");
        assert_eq!(renew_at(t(100), t(190), window, f64::NAN), t(150));
        // A window that ends before it starts is no window.
        assert_eq!(
            renew_at(t(100), t(190), Some((t(152), t(150))), 0.5),
            t(160)
        );
    }

    #[test]
    fn failures_back_off_from_a_minute_to_a_day() {
        let m = |n: u64| Duration::from_secs(60 * n);
        assert_eq!(backoff(1, 0.0, None), m(1));
        assert_eq!(backoff(2, 0.0, None), m(2));
        assert_eq!(backoff(5, 0.0, None), m(16));
        assert_eq!(backoff(11, 0.0, None), m(1024));
        assert_eq!(backoff(12, 0.0, None), DAY);
        assert_eq!(backoff(u32::MAX, 0.0, None), DAY);
        // Jitter takes off up to a quarter, never below a minute.
        assert_eq!(backoff(5, 1.0, None), m(12));
        assert_eq!(backoff(3, 0.5, None), Duration::from_secs(210));
        assert_eq!(backoff(1, 1.0, None), m(1));
        assert_eq!(backoff(0, 0.0, None), m(1));
        // The CA's Retry-After, when longer (at most a day).
        assert_eq!(backoff(1, 0.0, Some(m(30))), m(30));
        assert_eq!(backoff(5, 0.0, Some(m(3))), m(16));
        assert_eq!(backoff(1, 0.0, Some(DAY * 3)), DAY);
    }

    proptest! {
        #[test]
        fn renewal_is_always_inside_the_lifetime_or_the_window(
            start in 0u64..10_000, life in 0u64..400, jitter in -1.0f64..2.0, w in proptest::option::of((0u64..10_000, 0u64..10)),
        ) {
            let (nb, na) = (t(start), t(start + life));
            let at = renew_at(nb, na, w.map(|(s, l)| (t(s), t(s + l))), jitter);
            match w {
                Some((s, l)) => prop_assert!(at >= t(s) && at <= t(s + l)),
                None => prop_assert!(at >= nb && at <= na),
            }
        }

        #[test]
        fn the_wait_grows_with_failures_and_stays_in_bounds(n in 1u32..40, jitter in 0.0f64..1.0) {
            let (a, b) = (backoff(n, 0.0, None), backoff(n + 1, 0.0, None));
            prop_assert!(a <= b);
            let j = backoff(n, jitter, None);
            prop_assert!(j >= BACKOFF_MIN && j <= BACKOFF_MAX && j <= a);
        }
    }
}
