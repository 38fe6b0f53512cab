//! Canary decisions that need no I/O: how big the canary fleet is at a
//! weight, and whether a step's measurements pass its analysis.
//!
//! The agent's controller owns the step machine; the numbers
//! come from the router's own per-release counters, windowed from the
//! moment the step's weight took effect.

use crate::counters::Window;
use crate::service::AnalysisSpec;

/// Instances of the canary at `weight` percent of `replicas`: in proportion,
/// rounded up, at least one; all of them at 100.
pub fn fleet(replicas: u32, weight: u32) -> u32 {
    if replicas == 0 {
        return 0;
    }
    if weight >= 100 {
        return replicas;
    }
    (replicas * weight).div_ceil(100).clamp(1, replicas)
}

/// What the analysis says about a step so far.
#[derive(Clone, Debug, PartialEq)]
pub enum Judgement {
    /// Not enough canary requests yet to judge.
    TooFew {
        have: u64,
        need: u64,
    },
    Pass,
    /// A limit is broken; the text names the numbers.
    Fail(String),
}

/// Judge the canary's window against the limits and against stable over
/// the same window. Without analysis every step passes.
pub fn judge(analysis: Option<&AnalysisSpec>, canary: &Window, stable: &Window) -> Judgement {
    let Some(a) = analysis else {
        return Judgement::Pass;
    };
    if canary.requests < a.min_requests {
        return Judgement::TooFew {
            have: canary.requests,
            need: a.min_requests,
        };
    }
    let rate = |w: &Window| {
        format!(
            "{:.1}% ({} of {} requests)",
            w.error_rate * 100.0,
            w.errors,
            w.requests
        )
    };
    if let Some(max) = a.max_error_rate
        && canary.error_rate > max.as_f64()
    {
        return Judgement::Fail(format!(
            "error rate {} above max_error_rate {max}; stable {}",
            rate(canary),
            rate(stable)
        ));
    }
    if let Some(max) = a.max_p99
        && let Some(p99) = canary.p99_ms
        && p99 > max.0.as_secs_f64() * 1000.0
    {
        return Judgement::Fail(format!(
            "p99 latency {p99}ms above max_p99 {max} over {} requests; stable p99 {}",
            canary.requests,
            stable
                .p99_ms
                .map_or("unmeasured".to_owned(), |p| format!("{p}ms"))
        ));
    }
    // Compared with stable only when stable was measured as well as the
    // canary (at weight 100 it gets no traffic).
    if let Some(max) = a.max_error_rate_increase
        && stable.requests >= a.min_requests
        && canary.error_rate - stable.error_rate > max.as_f64()
    {
        return Judgement::Fail(format!(
            "error rate {} is {:.1} points above stable's {}, more than max_error_rate_increase {max}",
            rate(canary),
            (canary.error_rate - stable.error_rate) * 100.0,
            rate(stable)
        ));
    }
    Judgement::Pass
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{Duration, Ratio};

    fn window(requests: u64, errors: u64, p99_ms: f64) -> Window {
        Window {
            requests,
            errors,
            error_rate: errors as f64 / requests.max(1) as f64,
            p99_ms: Some(p99_ms),
        }
    }

    fn analysis() -> AnalysisSpec {
        AnalysisSpec {
            max_error_rate: Some(Ratio(50_000)),
            max_p99: Some(Duration::from_millis(250)),
            max_error_rate_increase: Some(Ratio(10_000)),
            min_requests: 50,
            last_step_needs_traffic: false,
        }
    }

    #[test]
    fn the_fleet_follows_the_weight() {
        assert_eq!(fleet(3, 10), 1);
        assert_eq!(fleet(3, 34), 2);
        assert_eq!(fleet(3, 50), 2);
        assert_eq!(fleet(3, 99), 3);
        assert_eq!(fleet(3, 100), 3);
        assert_eq!(fleet(10, 25), 3);
        assert_eq!(fleet(1, 1), 1);
        assert_eq!(fleet(0, 50), 0);
    }

    #[test]
    fn each_limit_fails_a_step_and_names_its_numbers() {
        let a = analysis();
        let calm = window(1000, 0, 5.0);
        assert_eq!(
            judge(Some(&a), &window(49, 49, 5.0), &calm),
            Judgement::TooFew { have: 49, need: 50 }
        );
        assert_eq!(judge(Some(&a), &window(100, 3, 5.0), &calm), Judgement::Fail(
            "error rate 3.0% (3 of 100 requests) is 3.0 points above stable's 0.0% (0 of 1000 requests), more than max_error_rate_increase 1%".to_owned()
        ));
        let Judgement::Fail(why) = judge(Some(&a), &window(100, 20, 5.0), &calm) else {
            panic!("20% errors pass");
        };
        assert!(
            why.starts_with("error rate 20.0% (20 of 100 requests) above max_error_rate 5%"),
            "{why}"
        );
        let Judgement::Fail(why) = judge(Some(&a), &window(100, 0, 500.0), &calm) else {
            panic!("a slow canary passes");
        };
        assert!(
            why.contains("p99 latency 500ms above max_p99 250ms"),
            "{why}"
        );
        // Stable as bad as the canary: no increase to blame on it.
        assert_eq!(
            judge(Some(&a), &window(100, 3, 5.0), &window(1000, 30, 5.0)),
            Judgement::Pass
        );
        // Stable unmeasured (weight 100): only the absolute limits apply.
        assert_eq!(
            judge(Some(&a), &window(100, 3, 5.0), &Window::default()),
            Judgement::Pass
        );
        assert_eq!(judge(None, &window(1, 1, 9e9), &calm), Judgement::Pass);
    }

    proptest::proptest! {
        /// The canary's fleet is in proportion to its weight (rounded up),
        /// never empty while there are replicas, never more than them, all
        /// of them at 100, and grows with the weight, never shrinks.
        #[test]
        fn the_canary_fleet_follows_its_weight(replicas in 0u32..=1000, weight in 1u32..=100) {
            let n = fleet(replicas, weight);
            proptest::prop_assert!(n <= replicas);
            proptest::prop_assert_eq!(n == 0, replicas == 0);
            if weight == 100 {
                proptest::prop_assert_eq!(n, replicas);
            } else if replicas > 0 {
                proptest::prop_assert_eq!(n, (replicas * weight).div_ceil(100).max(1));
            }
            if weight < 100 {
                proptest::prop_assert!(fleet(replicas, weight + 1) >= n);
            }
        }
    }
}
