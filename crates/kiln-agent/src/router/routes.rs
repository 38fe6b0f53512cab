//! The routing table: which ready instances (backends) each listener sends
//! to, split between stable and canary, with the service's timeouts and
//! limits. One immutable [`RouteTable`] is swapped whole by the
//! [`crate::router::Router`]; a connection reads it through a
//! [`RouteSource`]. A module of its own so that the router (which owns the
//! listeners) and the server side of each connection
//! ([`crate::router::downstream`]) both use it without importing each other.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::header::HeaderValue;
use kiln_core::service::RouterSpec;
use kiln_core::spec::ServiceName;

/// One ready instance that may receive traffic.
#[derive(Debug)]
pub struct Backend {
    pub instance: String,
    pub revision: u64,
    /// Where it listens (the upstream pool is keyed by it).
    pub addr: std::net::SocketAddr,
    /// Its address, made once: the `Host` of a request that has none.
    pub host: HeaderValue,
    /// Requests in flight to it, until their response bodies are sent.
    pub inflight: Arc<crate::router::metrics::InFlight>,
    /// Its release's measurements.
    pub metrics: Arc<crate::router::metrics::ReleaseMetrics>,
}

impl Backend {
    pub fn new(
        instance: String,
        revision: u64,
        addr: std::net::SocketAddr,
        inflight: Arc<crate::router::metrics::InFlight>,
        metrics: Arc<crate::router::metrics::ReleaseMetrics>,
    ) -> Self {
        let host = HeaderValue::from_str(&addr.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Self {
            instance,
            revision,
            addr,
            host,
            inflight,
            metrics,
        }
    }
}

/// A service's routes: the instances to balance over (the stable side,
/// when a canary takes a share), and its timeout.
#[derive(Debug, Default)]
pub struct ServiceRoutes {
    pub backends: Vec<Arc<Backend>>,
    pub canary: Option<Split>,
    pub timeout: Duration,
    /// What the listener allows its peers (timeouts, connections).
    pub limits: RouterSpec,
    /// Its access log, when `router.access_log` asks for one.
    pub access: Option<Arc<crate::router::access::AccessLog>>,
    /// Its pages for the router's own answers, by status (`error_pages`).
    pub pages: Option<Arc<std::collections::BTreeMap<u16, String>>>,
}

/// A canary's share of a service's requests.
#[derive(Debug, Default)]
pub struct Split {
    pub backends: Vec<Arc<Backend>>,
    /// The canary release (a sticky cookie names it, so an older canary's
    /// cookie is not honoured).
    pub revision: u64,
    /// Percent of requests, 0 to 100.
    pub weight: u32,
    /// The cookie that keeps a client on one side, when sticky.
    pub cookie: Option<String>,
}

impl ServiceRoutes {
    pub fn new(backends: Vec<Arc<Backend>>, timeout: Duration) -> Self {
        Self {
            backends,
            canary: None,
            timeout,
            limits: RouterSpec::default(),
            access: None,
            pages: None,
        }
    }

    /// With pages for the router's own answers.
    pub fn with_pages(mut self, pages: &std::collections::BTreeMap<u16, String>) -> Self {
        self.pages = (!pages.is_empty()).then(|| Arc::new(pages.clone()));
        self
    }

    /// With an access log.
    pub fn with_access(mut self, log: Option<Arc<crate::router::access::AccessLog>>) -> Self {
        self.access = log;
        self
    }

    /// With the service's `[router]` settings.
    pub fn with_limits(mut self, limits: RouterSpec) -> Self {
        self.limits = limits;
        self
    }

    /// Send `weight` percent of requests to `backends` of release `revision`.
    pub fn with_canary(
        mut self,
        backends: Vec<Arc<Backend>>,
        revision: u64,
        weight: u32,
        cookie: Option<String>,
    ) -> Self {
        self.canary = Some(Split {
            backends,
            revision,
            weight,
            cookie,
        });
        self
    }

    /// The side a request goes to, and the `Set-Cookie` to send when a
    /// sticky client was (re)assigned.
    ///
    /// Each client draws a bucket from 0 to 99 and is on the canary side
    /// while its bucket is below the weight: as the weight grows, clients
    /// only ever move from stable to the canary, never back and forth.
    pub(crate) fn choose<'h>(
        &self,
        cookies: impl Iterator<Item = &'h [u8]>,
    ) -> (Side, Option<String>) {
        let stable = (Side::Stable, None);
        let Some(c) = &self.canary else {
            return stable;
        };
        if c.backends.is_empty() || c.weight == 0 {
            return stable;
        }
        if self.backends.is_empty() || c.weight >= 100 {
            return (Side::Canary, None);
        }
        let (bucket, set) = match &c.cookie {
            Some(name) => match sticky_bucket(cookies, name, c.revision) {
                Some(b) => (b, None),
                None => {
                    let b = fastrand::u32(0..100);
                    let v = format!("{name}={}.{b}; Path=/; HttpOnly; SameSite=Lax", c.revision);
                    (b, Some(v))
                }
            },
            None => (fastrand::u32(0..100), None),
        };
        if bucket < c.weight {
            (Side::Canary, set)
        } else {
            (Side::Stable, set)
        }
    }

    /// The instances of one side.
    pub(crate) fn side(&self, side: Side) -> &[Arc<Backend>] {
        match (side, &self.canary) {
            (Side::Canary, Some(c)) => &c.backends,
            _ => &self.backends,
        }
    }
}

/// Which release a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Stable,
    Canary,
}

/// The bucket a client's cookie `name=REVISION.BUCKET` holds for canary
/// `revision`; none when absent, malformed or from another canary (the
/// client is then assigned afresh: a bad cookie never fails a request).
fn sticky_bucket<'h>(
    cookies: impl Iterator<Item = &'h [u8]>,
    name: &str,
    revision: u64,
) -> Option<u32> {
    cookies
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(n, _)| *n == name)
        .find_map(|(_, v)| {
            let (rev, bucket) = v.trim().split_once('.')?;
            let bucket: u32 = bucket.parse().ok()?;
            (rev.parse::<u64>().ok()? == revision && bucket < 100).then_some(bucket)
        })
}

/// What a listener routes for: a service's traffic, or the preview of the
/// release it is rolling out (blue-green's `preview_listen`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKey {
    Service(ServiceName),
    Preview(ServiceName),
    /// The plain-HTTP address of an HTTPS service (`tls.redirect_from`):
    /// every request is redirected.
    Redirect(ServiceName),
}

impl std::fmt::Display for RouteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Service(s) => write!(f, "service {s}"),
            Self::Preview(s) => write!(f, "the preview of service {s}"),
            Self::Redirect(s) => write!(f, "the HTTPS redirect of service {s}"),
        }
    }
}

/// Where a listener's route leads: a key's service, and what the route
/// itself adds to its answers (fixed when the route is attached, so a
/// rollout never touches it).
#[derive(Clone, Debug)]
pub struct Target {
    pub key: RouteKey,
    /// Answer every request with a 308 to `https://HOST:PORT` (the
    /// service's HTTPS port; omitted when 443).
    pub redirect_to: Option<u16>,
    /// `Strict-Transport-Security` for its responses over TLS.
    pub hsts: Option<HeaderValue>,
}

impl Target {
    pub fn plain(key: RouteKey) -> Self {
        Self {
            key,
            redirect_to: None,
            hsts: None,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.key.fmt(f)
    }
}

/// The table's maps are read on every request, with keys from the spec,
/// never from a client: a fast hash (foldhash) over SipHash.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The whole routing table: swapped as one value.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub services: FastMap<RouteKey, Arc<ServiceRoutes>>,
    /// Each listener's routes (which key answers which host and path), by
    /// its address. A rollout swaps `services` only: the listeners' routes
    /// are the same `Arc`s in the new table.
    pub listeners: FastMap<std::net::SocketAddr, Arc<kiln_core::edge::Routes<Target>>>,
    /// The TLS set-up of each HTTPS listener (its certificates are swapped
    /// inside it when their files change).
    pub tls: FastMap<std::net::SocketAddr, Arc<rustls::ServerConfig>>,
    /// The plain listeners that also take HTTP/2 with prior knowledge.
    pub h2c: Arc<Vec<std::net::SocketAddr>>,
    /// Paused services (`kiln pause`): their requests wait at the gate.
    pub paused: Arc<FastMap<RouteKey, Arc<Gate>>>,
    /// The listeners with trusted proxies in front, and whether those
    /// send a PROXY protocol header.
    pub peers: Arc<FastMap<std::net::SocketAddr, Arc<Peers>>>,
    /// ACME HTTP-01 answers being asked for: token → key authorization,
    /// served on any plain listener at `/.well-known/acme-challenge/TOKEN`.
    pub challenges: Arc<FastMap<String, String>>,
}

/// A listener's trusted proxies (the union of its services').
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Peers {
    pub trusted: Vec<kiln_core::proxy::Cidr>,
    pub proxy_protocol: bool,
}

impl Peers {
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }
}

/// The most requests that wait at one paused service's gate; more are
/// answered 503 at once.
pub const MAX_WAITING: usize = 10_000;

/// A paused service's gate: its requests wait until it opens (`kiln
/// resume`), at most its timeout.
#[derive(Debug)]
pub struct Gate {
    open: tokio::sync::watch::Sender<bool>,
    timeout_ms: std::sync::atomic::AtomicU64,
    waiting: std::sync::atomic::AtomicUsize,
}

/// Why a request stopped waiting at a gate without it opening.
#[derive(Debug, PartialEq, Eq)]
pub enum GateError {
    TimedOut(Duration),
    Full,
}

impl Gate {
    pub fn new(timeout_ms: u64) -> Self {
        Self {
            open: tokio::sync::watch::Sender::new(false),
            timeout_ms: timeout_ms.into(),
            waiting: 0.into(),
        }
    }

    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_timeout_ms(&self, ms: u64) {
        self.timeout_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Let every waiting request go on.
    pub fn open(&self) {
        self.open.send_replace(true);
    }

    /// How many requests wait now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Wait until the gate opens.
    pub async fn wait(&self) -> Result<(), GateError> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.waiting.fetch_add(1, Relaxed) >= MAX_WAITING {
            self.waiting.fetch_sub(1, Relaxed);
            return Err(GateError::Full);
        }
        let timeout = Duration::from_millis(self.timeout_ms());
        let mut open = self.open.subscribe();
        let waited = tokio::time::timeout(timeout, open.wait_for(|o| *o)).await;
        self.waiting.fetch_sub(1, Relaxed);
        match waited {
            Ok(Ok(_)) => Ok(()),
            _ => Err(GateError::TimedOut(timeout)),
        }
    }
}

/// Where a connection reads the current routing table: the router's own
/// `ArcSwap`, shared (one atomic load per request).
#[derive(Clone)]
pub(crate) struct RouteSource(
    pub(crate) Arc<ArcSwap<RouteTable>>,
    /// Set when this process hands its listeners over to a successor:
    /// connections end after their current exchange.
    pub(crate) Arc<tokio::sync::watch::Sender<bool>>,
);

impl Default for RouteSource {
    fn default() -> Self {
        Self(
            Arc::default(),
            Arc::new(tokio::sync::watch::Sender::new(false)),
        )
    }
}

/// How long a connection may stay idle once its process is draining (a
/// client in a steady loop sends its next request well within it, and
/// gets it answered with `connection: close`; a slow machine must not turn
/// a short pause into a closed connection).
pub(crate) const DRAIN_IDLE: Duration = Duration::from_secs(5);

impl RouteSource {
    /// Whether this process is handing its listeners over.
    pub(crate) fn draining(&self) -> bool {
        *self.1.borrow()
    }

    /// Resolves [`DRAIN_IDLE`] after draining began (never, until then).
    pub(crate) async fn drained(&self) {
        let mut rx = self.1.subscribe();
        if rx.wait_for(|d| *d).await.is_err() {
            return std::future::pending().await;
        }
        tokio::time::sleep(DRAIN_IDLE).await;
    }
}

/// Counts a request as in flight from dispatch until dropped.
pub(crate) struct Inflight(Arc<crate::router::metrics::InFlight>, usize);

impl Inflight {
    pub(crate) fn new(c: Arc<crate::router::metrics::InFlight>) -> Self {
        let shard = c.enter();
        Self(c, shard)
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.leave(self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(port: u16, revision: u64) -> Arc<Backend> {
        Arc::new(Backend::new(
            format!("i{port}"),
            revision,
            (std::net::Ipv4Addr::LOCALHOST, port).into(),
            Arc::default(),
            Arc::default(),
        ))
    }

    fn cookie(v: &str) -> std::iter::Once<&[u8]> {
        std::iter::once(v.as_bytes())
    }

    #[test]
    fn a_sticky_cookie_is_read_only_when_well_formed_and_current() {
        let name = "kiln-canary-web";
        assert_eq!(
            sticky_bucket(cookie("kiln-canary-web=7.42"), name, 7),
            Some(42)
        );
        assert_eq!(
            sticky_bucket(cookie("a=b; kiln-canary-web=7.0; c=d"), name, 7),
            Some(0)
        );
        for bad in [
            "kiln-canary-web=6.42",
            "kiln-canary-web=7.100",
            "kiln-canary-web=7",
            "kiln-canary-web=x.y",
            "kiln-canary-web=",
            "kiln-canary-other=7.1",
            "garbage",
        ] {
            assert_eq!(sticky_bucket(cookie(bad), name, 7), None, "{bad}");
        }
    }

    #[test]
    fn the_split_sends_the_weight_to_the_canary() {
        let routes = ServiceRoutes::new(vec![backend(1, 1)], Duration::from_secs(1)).with_canary(
            vec![backend(2, 2)],
            2,
            20,
            Some("kiln-canary-web".to_owned()),
        );
        let empty = || std::iter::empty::<&[u8]>();
        let n = 10_000;
        let mut canary = 0;
        for _ in 0..n {
            let (side, set) = routes.choose(empty());
            let side = routes.side(side);
            assert!(set.is_some(), "a client without a cookie gets one");
            canary += usize::from(side[0].revision == 2);
        }
        // sd of the share is 0.004: ±0.03 fails only on a real bias.
        let share = canary as f64 / f64::from(n);
        assert!((share - 0.2).abs() < 0.03, "{share}");
        // A bucket below the weight is the canary's, at or above stable's.
        let (side, set) = routes.choose(cookie("kiln-canary-web=2.19"));
        let side = routes.side(side);
        assert_eq!((side[0].revision, set), (2, None));
        let (side, _) = routes.choose(cookie("kiln-canary-web=2.20"));
        let side = routes.side(side);
        assert_eq!(side[0].revision, 1);
        // A canary with nothing ready, or no canary: all to stable.
        let none_ready = ServiceRoutes::new(vec![backend(1, 1)], Duration::from_secs(1))
            .with_canary(Vec::new(), 2, 50, None);
        assert!((0..100).all(|_| none_ready.side(none_ready.choose(empty()).0)[0].revision == 1));
        let full = ServiceRoutes::new(vec![backend(1, 1)], Duration::from_secs(1)).with_canary(
            vec![backend(2, 2)],
            2,
            100,
            None,
        );
        assert!((0..100).all(|_| full.side(full.choose(empty()).0)[0].revision == 2));
    }
}
