//! A release's request counters at one moment, as the router counts them:
//! answers by status class, connection errors, a latency histogram. A plain
//! value: the canary's analysis windows are differences of two of them, and
//! the rollout decisions take them as input.

use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Requests a release answered over a window, as the analysis counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Window {
    pub requests: u64,
    /// 5xx answers plus connections that failed.
    pub errors: u64,
    pub error_rate: f64,
    /// The upper bound of the latency bucket holding the 99th percentile.
    pub p99_ms: Option<f64>,
}

/// Counters at one moment. In a cluster each node's router counts its
/// own, publishes them, and the leader judges their sum ([`Self::plus`]).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Snapshot {
    pub responses: [u64; 5],
    pub connect_errors: u64,
    pub retried: u64,
    pub timeouts: u64,
    /// Not part of [`Self::requests`] nor of the canary's window.
    pub client_errors: u64,
    pub buckets: [u64; BUCKETS.len() + 1],
    pub sum_micros: u64,
}

impl Snapshot {
    pub fn requests(&self) -> u64 {
        self.responses.iter().sum()
    }

    /// 5xx answers (which include the router's own 502/504) over all.
    pub fn error_rate(&self) -> f64 {
        let n = self.requests();
        if n == 0 {
            0.0
        } else {
            self.responses[4] as f64 / n as f64
        }
    }

    /// What the canary analysis counts: every attempt (answers plus
    /// connections that failed and were retried elsewhere) and its errors
    /// (5xx, including the router's own 502/504, plus those connections).
    pub fn window(&self) -> Window {
        let requests = self.requests() + self.retried;
        let errors = self.responses[4] + self.retried;
        Window {
            requests,
            errors,
            error_rate: if requests == 0 {
                0.0
            } else {
                errors as f64 / requests as f64
            },
            p99_ms: self.quantile(0.99).map(|d| d.as_secs_f64() * 1000.0),
        }
    }

    /// The upper bound of the bucket holding the q-quantile (e.g. 0.99).
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let n: u64 = self.buckets.iter().sum();
        if n == 0 {
            return None;
        }
        let rank = (q * n as f64).ceil() as u64;
        let mut seen = 0;
        for (i, c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                // Past the last bucket: report an hour, "more than we measure".
                return Some(Duration::from_secs_f64(
                    BUCKETS.get(i).copied().unwrap_or(3600.0),
                ));
            }
        }
        None
    }

    /// `self - earlier`: what happened in between.
    /// Two routers' counters as one.
    pub fn plus(&self, other: &Snapshot) -> Snapshot {
        Snapshot {
            responses: std::array::from_fn(|i| {
                self.responses[i].saturating_add(other.responses[i])
            }),
            connect_errors: self.connect_errors.saturating_add(other.connect_errors),
            retried: self.retried.saturating_add(other.retried),
            timeouts: self.timeouts.saturating_add(other.timeouts),
            client_errors: self.client_errors.saturating_add(other.client_errors),
            buckets: std::array::from_fn(|i| self.buckets[i].saturating_add(other.buckets[i])),
            sum_micros: self.sum_micros.saturating_add(other.sum_micros),
        }
    }

    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot {
            responses: std::array::from_fn(|i| {
                self.responses[i].saturating_sub(earlier.responses[i])
            }),
            connect_errors: self.connect_errors.saturating_sub(earlier.connect_errors),
            retried: self.retried.saturating_sub(earlier.retried),
            timeouts: self.timeouts.saturating_sub(earlier.timeouts),
            client_errors: self.client_errors.saturating_sub(earlier.client_errors),
            buckets: std::array::from_fn(|i| self.buckets[i].saturating_sub(earlier.buckets[i])),
            sum_micros: self.sum_micros.saturating_sub(earlier.sum_micros),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_routers_counters_add_up_field_by_field() {
        let one = |k: u64| Snapshot {
            responses: [k, 2 * k, 3 * k, 4 * k, 5 * k],
            connect_errors: 6 * k,
            retried: 7 * k,
            timeouts: 8 * k,
            client_errors: 9 * k,
            buckets: std::array::from_fn(|i| k * (i as u64 + 10)),
            sum_micros: 100 * k,
        };
        assert_eq!(one(1).plus(&one(2)), one(3));
        assert_eq!(one(3).since(&one(1)), one(2));
        assert_eq!(Snapshot::default().plus(&one(1)), one(1));
        let full = Snapshot {
            sum_micros: u64::MAX,
            ..one(1)
        };
        assert_eq!(full.plus(&one(1)).sum_micros, u64::MAX, "saturates");
        // It is kept as JSON in the state store.
        let text = serde_json::to_string(&one(4)).unwrap();
        assert_eq!(serde_json::from_str::<Snapshot>(&text).unwrap(), one(4));
    }

    #[test]
    fn past_the_last_bucket_is_an_hour_more_than_measured() {
        let mut s = Snapshot::default();
        // One bucket per bound, and one past the last.
        assert_eq!(s.buckets.len(), BUCKETS.len() + 1);
        s.buckets[BUCKETS.len()] = 1;
        assert_eq!(s.quantile(0.99), Some(Duration::from_secs(3600)));
        s.buckets[0] = 99;
        assert_eq!(s.quantile(0.5), Some(Duration::from_secs_f64(BUCKETS[0])));
        assert_eq!(Snapshot::default().quantile(0.99), None);
    }

    fn snapshot() -> Snapshot {
        // 60 answers: 30 2xx, 10 4xx, 20 5xx; 20 retried connections.
        let mut s = Snapshot {
            responses: [0, 30, 0, 10, 20],
            retried: 20,
            client_errors: 7,
            ..Snapshot::default()
        };
        // Latencies: 50 in the first bucket, 40 in the third, 10 in the fifth.
        s.buckets[0] = 50;
        s.buckets[2] = 40;
        s.buckets[4] = 10;
        s.sum_micros = 1_000;
        s
    }

    #[test]
    fn rates_windows_and_quantiles_are_exact() {
        let s = snapshot();
        assert_eq!(s.requests(), 60);
        assert_eq!(s.error_rate(), 20.0 / 60.0);
        assert_eq!(Snapshot::default().error_rate(), 0.0);
        let w = s.window();
        // Attempts: answers plus retried connections; errors: 5xx plus those.
        assert_eq!((w.requests, w.errors), (80, 40));
        assert_eq!(w.error_rate, 0.5);
        assert_eq!(w.p99_ms, Some(BUCKETS[4] * 1000.0));
        assert_eq!(Snapshot::default().window(), Window::default());
        // The q-quantile is the upper bound of the bucket holding rank
        // ceil(q × n).
        assert_eq!(s.quantile(0.5), Some(Duration::from_secs_f64(BUCKETS[0])));
        assert_eq!(s.quantile(0.51), Some(Duration::from_secs_f64(BUCKETS[2])));
        assert_eq!(s.quantile(0.9), Some(Duration::from_secs_f64(BUCKETS[2])));
        assert_eq!(s.quantile(0.91), Some(Duration::from_secs_f64(BUCKETS[4])));
    }

    #[test]
    fn since_is_what_happened_in_between() {
        let later = snapshot();
        let mut earlier = Snapshot {
            retried: 5,
            sum_micros: 400,
            ..Snapshot::default()
        };
        earlier.responses[1] = 10;
        earlier.buckets[0] = 20;
        let d = later.since(&earlier);
        assert_eq!(d.responses, [0, 20, 0, 10, 20]);
        assert_eq!((d.retried, d.client_errors, d.sum_micros), (15, 7, 600));
        assert_eq!(d.buckets[0], 30);
        // Counters that went back (a new process) read as nothing since.
        assert_eq!(earlier.since(&later).requests(), 0);
    }
}
