//! The router's own measurements, per service and release: requests by
//! status class, upstream errors, a latency histogram, active connections.
//! Kept as plain atomics so the hot path is a few relaxed adds, and so the
//! canary analysis can read windows of them directly; rendered in the
//! Prometheus text format for `kiln serve --metrics ADDR`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use kiln_core::counters::{BUCKETS, Snapshot};
use kiln_core::spec::ServiceName;

/// One release's counters, sharded: each router thread adds to its own
/// cache line, so two threads never bounce a hot counter between cores;
/// reading sums the shards.
#[derive(Debug, Default)]
pub struct ReleaseMetrics {
    shards: [Shard; SHARDS],
}

const SHARDS: usize = 8;

#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    /// Responses by class: 1xx..5xx at index 0..4.
    responses: [AtomicU64; 5],
    connect_errors: AtomicU64,
    /// Connect errors after which the request went to another instance (the
    /// others end as a 502, counted in `responses`).
    retried: AtomicU64,
    timeouts: AtomicU64,
    /// Requests the client broke (a bad or stalled body, a hang-up, a
    /// response it stopped reading): answered 400/408 or cut, counted
    /// apart from `responses` so that no client can move a release's
    /// error rate (the canary analysis) either way.
    client_errors: AtomicU64,
    /// Counts per bucket, then +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

/// Requests in flight to one instance (until their response bodies are
/// sent), sharded like the counters: a request is counted in and out on its
/// router thread's own cache line, so counting costs no line shared between
/// cores; draining reads the sum.
#[derive(Debug, Default)]
pub struct InFlight {
    shards: [PaddedCount; SHARDS],
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct PaddedCount(std::sync::atomic::AtomicUsize);

impl InFlight {
    /// Count one request in; the shard it went to, for [`Self::leave`].
    pub fn enter(&self) -> usize {
        let i = SHARD.with(std::cell::Cell::get);
        self.shards[i].0.fetch_add(1, Ordering::SeqCst);
        i
    }

    pub fn leave(&self, shard: usize) {
        self.shards[shard].0.fetch_sub(1, Ordering::SeqCst);
    }

    pub fn get(&self) -> usize {
        self.shards.iter().map(|s| s.0.load(Ordering::SeqCst)).sum()
    }
}

thread_local! {
    static SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The shard this thread adds to (router threads take one each).
pub fn use_shard(i: usize) {
    SHARD.with(|s| s.set(i % SHARDS));
}

impl ReleaseMetrics {
    fn shard(&self) -> &Shard {
        &self.shards[SHARD.with(std::cell::Cell::get)]
    }

    pub fn observe(&self, status: u16, latency: Duration) {
        let s = self.shard();
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        s.responses[class].fetch_add(1, Ordering::Relaxed);
        let secs = latency.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        s.buckets[i].fetch_add(1, Ordering::Relaxed);
        s.sum_micros
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
    }

    /// An instance could not be connected to; `retried`: the request went
    /// on to another.
    pub fn connect_error(&self, retried: bool) {
        let s = self.shard();
        s.connect_errors.fetch_add(1, Ordering::Relaxed);
        if retried {
            s.retried.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn timeout(&self) {
        self.shard().timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// A request the client broke (see [`Shard::client_errors`]).
    pub fn client_error(&self) {
        self.shard().client_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The sum of the shards now (for windows: subtract two snapshots).
    pub fn snapshot(&self) -> Snapshot {
        let mut out = Snapshot::default();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for s in &self.shards {
            for (o, a) in out.responses.iter_mut().zip(&s.responses) {
                *o += load(a);
            }
            for (o, a) in out.buckets.iter_mut().zip(&s.buckets) {
                *o += load(a);
            }
            out.connect_errors += load(&s.connect_errors);
            out.retried += load(&s.retried);
            out.timeouts += load(&s.timeouts);
            out.client_errors += load(&s.client_errors);
            out.sum_micros += load(&s.sum_micros);
        }
        out
    }
}

/// How long a release's series stay once nothing routes to it: at least
/// one scrape window, so that a scraper sees their last values.
pub const SERIES_GRACE: Duration = Duration::from_secs(60);

/// Every release's metrics, plus connections per listener.
#[derive(Debug, Default)]
pub struct Metrics {
    releases: Mutex<BTreeMap<(ServiceName, u64), Arc<ReleaseMetrics>>>,
    /// Releases no backend holds any more, since when: their series go
    /// after [`SERIES_GRACE`] (the metrics would otherwise grow with every
    /// release, forever).
    unused: Mutex<BTreeMap<(ServiceName, u64), std::time::Instant>>,
    connections: Mutex<BTreeMap<String, Arc<AtomicI64>>>,
    answers: Mutex<BTreeMap<String, Arc<Answers>>>,
}

/// The answers a listener gave itself (no instance's response), by
/// status: refusals of bad requests, 503 with no ready instance, and the
/// 502/504 it wrote for an instance (which its release counts too).
#[derive(Debug, Default)]
pub struct Answers(Mutex<BTreeMap<u16, u64>>);

impl Answers {
    pub fn count(&self, status: u16) {
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(status)
            .or_default() += 1;
    }

    /// How many `status` answers so far.
    pub fn get(&self, status: u16) -> u64 {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&status)
            .copied()
            .unwrap_or(0)
    }
}

impl Metrics {
    /// A release's counters, made the first time (a backend of it holds
    /// them while it is routed).
    pub fn release(&self, service: &ServiceName, revision: u64) -> Arc<ReleaseMetrics> {
        let mut m = self.releases.lock().unwrap_or_else(|p| p.into_inner());
        m.entry((service.clone(), revision)).or_default().clone()
    }

    /// A release's counters as they are, without keeping any: zero for a
    /// release nothing counted (or whose series were dropped).
    pub fn peek(&self, service: &ServiceName, revision: u64) -> kiln_core::counters::Snapshot {
        self.releases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(service.clone(), revision))
            .map(|r| r.snapshot())
            .unwrap_or_default()
    }

    /// Drop the series of releases nothing has routed to for
    /// [`SERIES_GRACE`] by `now` (only this map holds their counters);
    /// how many went.
    pub fn prune(&self, now: std::time::Instant) -> usize {
        let mut releases = self.releases.lock().unwrap_or_else(|p| p.into_inner());
        let mut unused = self.unused.lock().unwrap_or_else(|p| p.into_inner());
        let mut gone = Vec::new();
        for (k, v) in releases.iter() {
            if Arc::strong_count(v) > 1 {
                unused.remove(k);
                continue;
            }
            let since = *unused.entry(k.clone()).or_insert(now);
            if now.saturating_duration_since(since) >= SERIES_GRACE {
                gone.push(k.clone());
            }
        }
        for k in &gone {
            releases.remove(k);
            unused.remove(k);
        }
        gone.len()
    }

    /// The answers a listener gives itself.
    pub fn answers(&self, listener: &str) -> Arc<Answers> {
        let mut m = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(listener.to_owned()).or_default().clone()
    }

    pub fn connections(&self, listener: &str) -> Arc<AtomicI64> {
        let mut m = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(listener.to_owned()).or_default().clone()
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self, out: &mut String) {
        // A scrape is when series of releases long unrouted go: each was
        // shown unused for a scrape window first.
        self.prune(std::time::Instant::now());
        let releases: Vec<_> = self
            .releases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.snapshot()))
            .collect();
        out.push_str("# HELP kiln_router_requests_total Responses sent by the router, by release and status class.\n# TYPE kiln_router_requests_total counter\n");
        for ((svc, rev), s) in &releases {
            for (i, n) in s.responses.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "kiln_router_requests_total{{service=\"{svc}\",release=\"{rev}\",class=\"{}xx\"}} {n}",
                    i + 1
                );
            }
        }
        out.push_str("# HELP kiln_router_upstream_errors_total Requests that failed to reach an instance (connect) or to get an answer in time (timeout).\n# TYPE kiln_router_upstream_errors_total counter\n");
        for ((svc, rev), s) in &releases {
            let _ = writeln!(
                out,
                "kiln_router_upstream_errors_total{{service=\"{svc}\",release=\"{rev}\",kind=\"connect\"}} {}",
                s.connect_errors
            );
            let _ = writeln!(
                out,
                "kiln_router_upstream_errors_total{{service=\"{svc}\",release=\"{rev}\",kind=\"timeout\"}} {}",
                s.timeouts
            );
        }
        out.push_str("# HELP kiln_router_client_errors_total Requests the client broke (a bad, stalled or abandoned body, a response not read): answered 400/408 or cut, and never counted against the release.\n# TYPE kiln_router_client_errors_total counter\n");
        for ((svc, rev), s) in &releases {
            let _ = writeln!(
                out,
                "kiln_router_client_errors_total{{service=\"{svc}\",release=\"{rev}\"}} {}",
                s.client_errors
            );
        }
        out.push_str("# HELP kiln_router_request_duration_seconds Time from a request's arrival to its response headers.\n# TYPE kiln_router_request_duration_seconds histogram\n");
        for ((svc, rev), s) in &releases {
            let mut cumulative = 0;
            for (i, c) in s.buckets.iter().enumerate() {
                cumulative += c;
                let le = BUCKETS.get(i).map_or("+Inf".to_owned(), |b| b.to_string());
                let _ = writeln!(
                    out,
                    "kiln_router_request_duration_seconds_bucket{{service=\"{svc}\",release=\"{rev}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "kiln_router_request_duration_seconds_sum{{service=\"{svc}\",release=\"{rev}\"}} {}",
                s.sum_micros as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "kiln_router_request_duration_seconds_count{{service=\"{svc}\",release=\"{rev}\"}} {cumulative}"
            );
        }
        out.push_str("# HELP kiln_router_local_responses_total Answers the router gave itself (no instance's response), by listener and status.\n# TYPE kiln_router_local_responses_total counter\n");
        for (listener, a) in self
            .answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            for (status, n) in a.0.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                let _ = writeln!(
                    out,
                    "kiln_router_local_responses_total{{listener=\"{listener}\",status=\"{status}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP kiln_router_active_connections Client connections open on each listener.\n# TYPE kiln_router_active_connections gauge\n");
        for (listener, n) in self
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "kiln_router_active_connections{{listener=\"{listener}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_rates_and_quantiles() {
        let m = ReleaseMetrics::default();
        for _ in 0..98 {
            m.observe(200, Duration::from_micros(800));
        }
        let before = m.snapshot();
        m.observe(503, Duration::from_millis(40));
        m.observe(200, Duration::from_millis(300));
        let all = m.snapshot();
        assert_eq!(all.requests(), 100);
        assert!((all.error_rate() - 0.01).abs() < 1e-9);
        assert_eq!(all.quantile(0.5), Some(Duration::from_secs_f64(0.001)));
        assert_eq!(all.quantile(0.99), Some(Duration::from_secs_f64(0.05)));
        let judged = all.window();
        m.client_error();
        let all = m.snapshot();
        assert_eq!(all.client_errors, 1);
        assert_eq!(
            all.window(),
            judged,
            "a client's error is not in the analysis' window"
        );
        assert_eq!(all.requests(), 100, "nor among the requests");
        let window = all.since(&before);
        assert_eq!((window.requests(), window.client_errors), (2, 1));
        assert!((window.error_rate() - 0.5).abs() < 1e-9);
        assert_eq!(window.quantile(1.0), Some(Duration::from_secs_f64(0.5)));
    }

    #[test]
    fn a_release_nothing_routes_to_loses_its_series_after_the_grace() {
        let m = Metrics::default();
        let svc = ServiceName::try_from("web").unwrap();
        let routed = m.release(&svc, 1);
        routed.observe(200, Duration::from_millis(1));
        m.release(&svc, 2).observe(500, Duration::from_millis(1));
        assert_eq!(m.peek(&svc, 2).responses[4], 1);
        let t0 = std::time::Instant::now();
        assert_eq!(m.prune(t0), 0, "seen unused now: kept for the grace");
        assert_eq!(m.prune(t0 + SERIES_GRACE - Duration::from_millis(1)), 0);
        assert_eq!(m.prune(t0 + SERIES_GRACE), 1);
        assert_eq!(
            m.peek(&svc, 2),
            kiln_core::counters::Snapshot::default(),
            "gone"
        );
        assert_eq!(m.peek(&svc, 1).responses[1], 1, "a routed release stays");
        // Unrouted, then routed again within the grace: its clock restarts.
        drop(routed);
        assert_eq!(m.prune(t0), 0);
        let again = m.release(&svc, 1);
        assert_eq!(m.prune(t0 + SERIES_GRACE * 2), 0);
        drop(again);
        assert_eq!(m.prune(t0 + SERIES_GRACE * 3), 0, "unused since now");
        assert_eq!(m.prune(t0 + SERIES_GRACE * 4), 1);
        // peek never keeps a series alive or makes one.
        assert_eq!(m.peek(&svc, 9), kiln_core::counters::Snapshot::default());
        let mut out = String::new();
        m.render(&mut out);
        assert!(!out.contains("release=\"9\""), "{out}");
    }

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        let svc = ServiceName::try_from("web").unwrap();
        m.release(&svc, 2).observe(200, Duration::from_millis(3));
        m.connections("web").fetch_add(1, Ordering::Relaxed);
        m.answers("web").count(503);
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains(
                "kiln_router_requests_total{service=\"web\",release=\"2\",class=\"2xx\"} 1\n"
            ),
            "{out}"
        );
        assert!(out.contains("kiln_router_request_duration_seconds_bucket{service=\"web\",release=\"2\",le=\"0.005\"} 1\n"), "{out}");
        assert!(
            out.contains(
                "kiln_router_request_duration_seconds_count{service=\"web\",release=\"2\"} 1\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("kiln_router_active_connections{listener=\"web\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("kiln_router_local_responses_total{listener=\"web\",status=\"503\"} 1\n"),
            "{out}"
        );
    }
}
