//! The router: HTTP/1.1 reverse-proxy listeners inside the agent, one per
//! address, sending each request to a ready instance of the service whose
//! route (host, path prefix: [`kiln_core::edge`]) it matches.
//!
//! The whole routing table is one immutable [`RouteTable`] behind an
//! `ArcSwap`: a request loads it once and uses that snapshot to the end, and
//! controllers publish a new table with a single atomic swap (read-copy-
//! update), so no request ever sees half an update. Each listener is served
//! by one thread per core ([`Workers`]); a connection's requests are read
//! and answered by [`downstream`], and reach instances through the
//! thread's keep-alive pool ([`upstream`]). Each backend counts its
//! in-flight requests (until the response body is fully sent), which is
//! what draining waits on.
//!
//! - [`routes`]: the table (backends, splits) and where it is published.
//! - [`downstream`]: the client side of a connection (the server).
//! - [`upstream`]: the instance side (the pooled client).
//! - [`wire`]: HTTP/1.1 framing both sides share (RFC 9112).
//! - [`metrics`]: the router's own counters per release.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub mod access;
pub(crate) mod compress;
pub(crate) mod downstream;
pub(crate) mod forward;
pub(crate) mod h2;
pub(crate) mod metrics;
pub(crate) mod routes;
#[cfg(test)]
pub(crate) mod testing;
pub mod tls;
pub(crate) mod upstream;
pub(crate) mod wire;

use tokio::net::TcpListener;
use tokio::sync::Mutex;

use self::downstream::Client;
use self::routes::RouteSource;
pub use self::routes::{Backend, RouteKey, RouteTable, ServiceRoutes, Split, Target};
use self::upstream::Pool;
use kiln_core::edge::{RouteError, RouteSpec, Routes};

pub struct Router {
    table: RouteSource,
    pub metrics: Arc<self::metrics::Metrics>,
    listeners: Mutex<Listeners>,
    /// Client connections open on all listeners together, and how many
    /// they may be: traffic never takes the descriptors the API, probes
    /// and instances need.
    open: Arc<std::sync::atomic::AtomicI64>,
    budget: i64,
    /// Holds the listening sockets across agent processes.
    keeper: Arc<crate::keeper::Keeper>,
    /// ACME TLS-ALPN-01 answers, read by every HTTPS listener's resolver.
    alpn_challenges: self::tls::AlpnChallenges,
    /// What holds requests: services paused (`kiln pause`) and keys held
    /// by their rollouts; the table's gates are made from both.
    gates: std::sync::Mutex<Gates>,
    /// Where access logs go (`$KILN_HOME/logs/access`), and those open.
    access_dir: std::sync::Mutex<Option<std::path::PathBuf>>,
    access_logs: std::sync::Mutex<HashMap<String, Arc<self::access::AccessLog>>>,
}

/// Paused services and held keys, each with how long a request waits (ms).
type Gates = (
    std::collections::BTreeMap<RouteKey, u64>,
    std::collections::BTreeMap<RouteKey, u64>,
);

/// Descriptors left to the rest of the agent (the API, probes, instances'
/// pipes and logs, the state database), whatever the traffic: at least
/// this many, or a tenth of the limit.
pub const RESERVED_FDS: u64 = 256;

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the HTTPS listeners look whether their certificate files
/// changed.
pub const CERT_CHECK: Duration = Duration::from_secs(2);

/// How long a listener stops accepting when it is at its cap, or when the
/// process or system is out of descriptors (nginx waits 500 ms on
/// `EMFILE`); meanwhile new clients wait in the kernel's accept queue.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
const OUT_OF_FDS_PAUSE: Duration = Duration::from_millis(500);

/// The client connections all listeners may hold with `limit` descriptors:
/// each may use two (itself, and one to an instance), after the reserve.
pub fn connection_budget(limit: u64) -> i64 {
    let reserve = RESERVED_FDS.max(limit / 10);
    i64::try_from(limit.saturating_sub(reserve) / 2)
        .unwrap_or(i64::MAX)
        .max(1)
}

/// The process's descriptor limit (soft) now.
fn nofile_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

/// Where a route key is attached, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub addr: SocketAddr,
    pub route: RouteSpec,
    /// HTTPS, with the service's certificate files.
    pub tls: Option<kiln_core::service::TlsSpec>,
    /// A redirect to HTTPS on this port, for every request.
    pub redirect_to: Option<u16>,
    /// The listener also takes HTTP/2 with prior knowledge (plain only).
    pub h2c: bool,
}

impl Attachment {
    /// Plain HTTP, every host and path (a `listen` alone, a preview).
    pub fn plain(addr: SocketAddr) -> Self {
        Self {
            addr,
            route: RouteSpec::default(),
            tls: None,
            redirect_to: None,
            h2c: false,
        }
    }

    fn target(&self, key: &RouteKey) -> Target {
        let hsts = self.tls.as_ref().and_then(|t| t.hsts).and_then(|d| {
            hyper::header::HeaderValue::from_str(&format!("max-age={}", d.0.as_secs())).ok()
        });
        Target {
            key: key.clone(),
            redirect_to: self.redirect_to,
            hsts,
        }
    }
}

/// The listeners, by address, and where each route key is attached.
#[derive(Default)]
struct Listeners {
    workers: HashMap<SocketAddr, Workers>,
    attached: HashMap<RouteKey, Attachment>,
    /// The HTTPS listeners' certificates.
    tls: HashMap<SocketAddr, self::tls::TlsListener>,
}

impl Listeners {
    /// The routes on `addr` as `attached` has them.
    fn routes_on(
        attached: &HashMap<RouteKey, Attachment>,
        addr: SocketAddr,
    ) -> Result<Routes<Target>, RouteError> {
        let mut list: Vec<_> = attached
            .iter()
            .filter(|(_, a)| a.addr == addr)
            .flat_map(|(k, a)| a.route.routes(a.target(k)))
            .collect();
        // A stable order, so that a conflict names the services the same
        // way each time.
        list.sort_by_key(|r| r.target.to_string());
        Routes::build(list).map_err(|e| match e {
            RouteError::Conflict {
                first,
                second,
                host,
                prefix,
                ..
            } => RouteError::Conflict {
                first,
                second,
                host,
                prefix,
                on: format!(" on {addr}"),
            },
            e => e,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr} for {service}: {source}")]
    Bind {
        service: RouteKey,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Another service already answers the same host and path there.
    #[error(transparent)]
    Conflict(#[from] Box<RouteError>),
    #[error(transparent)]
    Tls(#[from] self::tls::TlsError),
}

impl Router {
    /// A router whose connection budget comes from the process's
    /// descriptor limit (raise it first: see [`raise_nofile_limit`]).
    pub fn new(keeper: Arc<crate::keeper::Keeper>) -> Arc<Self> {
        Self::with(connection_budget(nofile_limit()), keeper)
    }

    /// A router that holds at most `budget` client connections at once.
    pub fn with_budget(budget: i64) -> Arc<Self> {
        Self::with(budget, Arc::new(crate::keeper::Keeper::none()))
    }

    fn with(budget: i64, keeper: Arc<crate::keeper::Keeper>) -> Arc<Self> {
        Arc::new(Self {
            keeper,
            table: RouteSource::default(),
            metrics: Arc::default(),
            listeners: Mutex::new(Listeners::default()),
            open: Arc::default(),
            budget,
            alpn_challenges: Default::default(),
            gates: Default::default(),
            access_dir: Default::default(),
            access_logs: Default::default(),
        })
    }

    /// Whether the listener on `addr`, holding `open` connections, must
    /// wait before it accepts another: at its cap (the smallest
    /// `max_connections` of the services on it), or at the budget.
    fn at_capacity(&self, addr: &SocketAddr, open: i64) -> bool {
        if self.open.load(Ordering::Relaxed) >= self.budget {
            return true;
        }
        let table = self.table.0.load();
        let Some(routes) = table.listeners.get(addr) else {
            return false;
        };
        let cap = routes
            .iter()
            .filter_map(|r| table.services.get(&r.target.key))
            .filter_map(|r| r.limits.max_connections)
            .min()
            .map_or(i64::MAX, i64::from);
        open >= cap
    }

    /// Where connections read the routes (a test serves one by hand).
    #[cfg(test)]
    pub(crate) fn source(&self) -> RouteSource {
        self.table.clone()
    }

    /// The current snapshot.
    pub fn table(&self) -> Arc<RouteTable> {
        self.table.0.load_full()
    }

    /// Publish a service's routes: one atomic swap of the whole table.
    pub fn set_routes(&self, service: &RouteKey, routes: ServiceRoutes) {
        let routes = Arc::new(routes);
        self.table.0.rcu(|old| {
            let mut services = old.services.clone();
            services.insert(service.clone(), routes.clone());
            RouteTable {
                services,
                listeners: old.listeners.clone(),
                tls: old.tls.clone(),
                h2c: old.h2c.clone(),
                paused: old.paused.clone(),
                peers: old.peers.clone(),
                challenges: old.challenges.clone(),
            }
        });
    }

    /// Keep access logs in `dir`.
    pub fn set_access_dir(&self, dir: std::path::PathBuf) {
        *self.access_dir.lock().unwrap_or_else(|p| p.into_inner()) = Some(dir);
    }

    /// `service`'s access log, opened the first time it is asked for (none
    /// without a directory, or when it cannot be opened: logged).
    pub fn access_log(&self, service: &str) -> Option<Arc<self::access::AccessLog>> {
        let mut logs = self.access_logs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(log) = logs.get(service) {
            return Some(log.clone());
        }
        let dir = self
            .access_dir
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        match self::access::AccessLog::open(&dir, service) {
            Ok(log) => {
                logs.insert(service.to_owned(), log.clone());
                Some(log)
            }
            Err(e) => {
                tracing::warn!("access log of {service} in {}: {e}", dir.display());
                None
            }
        }
    }

    /// Pause exactly the services in `wanted` (`kiln pause`, from the
    /// state store: name → how long a request waits, in milliseconds).
    pub fn set_paused(
        &self,
        wanted: &std::collections::BTreeMap<kiln_core::spec::ServiceName, u64>,
    ) {
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        gates.0 = wanted
            .iter()
            .map(|(n, ms)| (RouteKey::Service(n.clone()), *ms))
            .collect();
        self.publish_gates(&gates);
    }

    /// Hold `key`'s requests for at most `ms` (`Some`) or stop holding them
    /// (`None`), beside any `kiln pause`: a `recreate` rollout holds its
    /// service while no instance is ready, so that its swap answers no 503.
    pub fn hold(&self, key: &RouteKey, ms: Option<u64>) {
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        let changed = match ms {
            Some(ms) => gates.1.insert(key.clone(), ms) != Some(ms),
            None => gates.1.remove(key).is_some(),
        };
        if changed {
            self.publish_gates(&gates);
        }
    }

    /// Publish a gate for each key paused or held (the longer wait when
    /// both): a key newly held gets a closed gate; one no longer held has
    /// its gate opened, after the table without it is published, so the
    /// requests it lets go find the routes of now.
    fn publish_gates(&self, (paused, held): &Gates) {
        let mut wanted = paused.clone();
        for (k, ms) in held {
            let w = wanted.entry(k.clone()).or_insert(*ms);
            *w = (*w).max(*ms);
        }
        let mut opened = Vec::new();
        self.table.0.rcu(|old| {
            opened.clear();
            let mut gates = routes::FastMap::default();
            for (key, ms) in &wanted {
                let gate = match old.paused.get(key) {
                    Some(g) => {
                        g.set_timeout_ms(*ms);
                        g.clone()
                    }
                    None => Arc::new(routes::Gate::new(*ms)),
                };
                gates.insert(key.clone(), gate);
            }
            for (key, gate) in old.paused.iter() {
                if !gates.contains_key(key) {
                    opened.push(gate.clone());
                }
            }
            RouteTable {
                services: old.services.clone(),
                listeners: old.listeners.clone(),
                tls: old.tls.clone(),
                h2c: old.h2c.clone(),
                paused: Arc::new(gates),
                peers: old.peers.clone(),
                challenges: old.challenges.clone(),
            }
        });
        for gate in opened {
            gate.open();
        }
    }

    /// Answer ACME's TLS-ALPN-01 validation of `name` with `cert` (or stop
    /// answering it: `None`) on every HTTPS listener.
    pub fn set_alpn_challenge(&self, name: &str, cert: Option<Arc<rustls::sign::CertifiedKey>>) {
        self.alpn_challenges.rcu(|old| {
            let mut all = (**old).clone();
            match &cert {
                Some(c) => all.insert(name.to_owned(), c.clone()),
                None => all.remove(name),
            };
            all
        });
    }

    /// Answer the ACME HTTP-01 challenge `token` with `value` (or stop
    /// answering it: `None`).
    pub fn set_challenge(&self, token: &str, value: Option<&str>) {
        self.table.0.rcu(|old| {
            let mut challenges = (*old.challenges).clone();
            match value {
                Some(v) => challenges.insert(token.to_owned(), v.to_owned()),
                None => challenges.remove(token),
            };
            RouteTable {
                services: old.services.clone(),
                listeners: old.listeners.clone(),
                tls: old.tls.clone(),
                h2c: old.h2c.clone(),
                paused: old.paused.clone(),
                peers: old.peers.clone(),
                challenges: Arc::new(challenges),
            }
        });
    }

    /// Forget a service's routes (it was removed): one atomic swap.
    pub fn remove_routes(&self, service: &RouteKey) {
        self.table.0.rcu(|old| {
            let mut services = old.services.clone();
            services.remove(service);
            RouteTable {
                services,
                listeners: old.listeners.clone(),
                tls: old.tls.clone(),
                h2c: old.h2c.clone(),
                paused: old.paused.clone(),
                peers: old.peers.clone(),
                challenges: old.challenges.clone(),
            }
        });
    }

    /// Publish the routes of the listeners on `addrs` as `attached` has
    /// them (a listener left with none is dropped from the table).
    fn publish_listeners(
        &self,
        attached: &HashMap<RouteKey, Attachment>,
        tls: &HashMap<SocketAddr, self::tls::TlsListener>,
        addrs: &[SocketAddr],
    ) -> Result<(), RouteError> {
        let mut built = Vec::new();
        for &addr in addrs {
            let routes = Listeners::routes_on(attached, addr)?;
            let used = routes.iter().next().is_some();
            built.push((addr, used.then(|| Arc::new(routes))));
        }
        let h2c_on = |addr: &SocketAddr| attached.values().any(|a| a.addr == *addr && a.h2c);
        let peers_of = |addr: &SocketAddr| {
            let mut p = routes::Peers::default();
            for a in attached.values().filter(|a| a.addr == *addr) {
                p.proxy_protocol |= a.route.proxy_protocol;
                for c in &a.route.trusted_proxies {
                    if !p.trusted.contains(c) {
                        p.trusted.push(*c);
                    }
                }
            }
            (!p.trusted.is_empty()).then(|| Arc::new(p))
        };
        self.table.0.rcu(|old| {
            let mut peers = (*old.peers).clone();
            for addr in addrs {
                match peers_of(addr) {
                    Some(p) => peers.insert(*addr, p),
                    None => peers.remove(addr),
                };
            }
            let mut listeners = old.listeners.clone();
            let mut configs = old.tls.clone();
            let mut h2c: Vec<SocketAddr> = old
                .h2c
                .iter()
                .filter(|a| !addrs.contains(a))
                .copied()
                .collect();
            h2c.extend(addrs.iter().filter(|a| h2c_on(a)));
            for (addr, routes) in &built {
                match routes {
                    Some(r) => listeners.insert(*addr, r.clone()),
                    None => listeners.remove(addr),
                };
                match tls.get(addr) {
                    Some(t) => configs.insert(*addr, t.config.clone()),
                    None => configs.remove(addr),
                };
            }
            RouteTable {
                services: old.services.clone(),
                listeners,
                tls: configs,
                h2c: Arc::new(h2c),
                paused: old.paused.clone(),
                peers: Arc::new(peers),
                challenges: old.challenges.clone(),
            }
        });
        Ok(())
    }

    /// The certificates of the HTTPS services attached on `addr`.
    fn tls_sources(
        attached: &HashMap<RouteKey, Attachment>,
        addr: SocketAddr,
    ) -> Vec<self::tls::Source> {
        let mut on: Vec<(&RouteKey, &Attachment)> =
            attached.iter().filter(|(_, a)| a.addr == addr).collect();
        on.sort_by_key(|(k, _)| k.to_string());
        on.into_iter()
            .filter_map(|(k, a)| {
                let t = a.tls.as_ref()?;
                Some(self::tls::Source {
                    owner: k.to_string(),
                    hosts: a.route.hosts.clone(),
                    cert: t.cert.clone()?.into(),
                    key: t.key.clone()?.into(),
                    optional: t.acme.is_some(),
                })
            })
            .collect()
    }

    /// Read again the certificate files that changed, on every HTTPS
    /// listener (every [`CERT_CHECK`]; see `Agent`).
    pub async fn reload_certificates(&self) {
        let mut listeners = self.listeners.lock().await;
        for (addr, t) in listeners.tls.iter_mut() {
            match t.reload_if_changed() {
                Ok(true) => tracing::info!("listener {addr}: certificates read again"),
                Ok(false) => {}
                Err(e) => tracing::warn!("listener {addr}: {e}; the certificates served stay"),
            }
        }
    }

    /// Route `key`'s requests for `route` (its hosts and path prefix) on
    /// `addr`, opening a listener there if there is none, and moving it
    /// from where it was. A route that another key already has there is
    /// refused, naming both, with nothing changed; so is an address this
    /// process cannot bind.
    pub async fn attach(
        self: &Arc<Self>,
        key: &RouteKey,
        to: Attachment,
    ) -> Result<(), ListenError> {
        let addr = to.addr;
        let mut listeners = self.listeners.lock().await;
        let before = listeners.attached.get(key).cloned();
        if before.as_ref() == Some(&to) {
            return Ok(());
        }
        let mut attached = listeners.attached.clone();
        attached.insert(key.clone(), to);
        Listeners::routes_on(&attached, addr).map_err(Box::new)?;
        kiln_core::edge::check_tls(
            attached
                .iter()
                .map(|(k, a)| (a.addr, k.to_string(), a.tls.is_some())),
        )
        .map_err(Box::new)?;
        // The certificates are read before anything changes: a file
        // missing or wrong refuses the attachment.
        let sources = Self::tls_sources(&attached, addr);
        let mut fresh_tls = None;
        match listeners.tls.get_mut(&addr) {
            _ if sources.is_empty() => {}
            Some(t) => t.set(sources)?,
            None => {
                fresh_tls = Some(self::tls::TlsListener::new(
                    sources,
                    self.alpn_challenges.clone(),
                )?)
            }
        }
        let name = format!("listen:{addr}");
        let bind_error = |source| ListenError::Bind {
            service: key.clone(),
            addr,
            source,
        };
        // The address first: one this process cannot have refuses the
        // attachment with nothing published. Sockets an agent of the
        // previous version kept under the service's name serve as well as
        // those kept under the address.
        let sockets = if listeners.workers.contains_key(&addr) {
            None
        } else {
            Some(
                self.inherited(&name, addr)
                    .or_else(|| self.inherited(&format!("listen:{}", key_name(key)), addr))
                    .map_or_else(|| bind_group(addr), Ok)
                    .map_err(bind_error)?,
            )
        };
        if let Some(t) = fresh_tls {
            listeners.tls.insert(addr, t);
        }
        let mut touched = vec![addr];
        touched.extend(before.map(|a| a.addr).filter(|a| *a != addr));
        for a in &touched {
            if Self::tls_sources(&attached, *a).is_empty() {
                listeners.tls.remove(a);
            }
        }
        // The routes before the first accept: a client waiting in the
        // queue of sockets taken over from a previous agent is routed at
        // once, never answered "no routes yet".
        self.publish_listeners(&attached, &listeners.tls, &touched)
            .map_err(Box::new)?;
        if let Some(sockets) = sockets {
            // The supervisor holds them too: if this process dies, clients
            // wait in the accept queues for the next one instead of being
            // refused.
            self.keeper.keep(&name, &crate::keeper::borrowed(&sockets));
            match Workers::start(self.clone(), addr, sockets) {
                Ok(w) => {
                    listeners.workers.insert(addr, w);
                }
                Err(e) => {
                    // As it was: the routes published a moment ago go.
                    if !listeners.attached.values().any(|a| a.addr == addr) {
                        listeners.tls.remove(&addr);
                    }
                    let _ = self.publish_listeners(&listeners.attached, &listeners.tls, &touched);
                    self.keeper.forget(&name);
                    return Err(bind_error(e));
                }
            }
        }
        listeners.attached = attached;
        for a in &touched[1..] {
            listeners.close_if_unused(*a, &self.keeper);
        }
        Ok(())
    }

    /// The services whose certificates come from an ACME directory: their
    /// names, hosts and TLS settings.
    pub async fn acme_services(
        &self,
    ) -> Vec<(
        kiln_core::spec::ServiceName,
        Vec<kiln_core::edge::HostPattern>,
        kiln_core::service::TlsSpec,
    )> {
        let listeners = self.listeners.lock().await;
        let mut out: Vec<_> = listeners
            .attached
            .iter()
            .filter_map(|(k, a)| match (k, &a.tls) {
                (RouteKey::Service(name), Some(t)) if t.acme.is_some() => {
                    Some((name.clone(), a.route.hosts.clone(), t.clone()))
                }
                _ => None,
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The route keys attached to `addr`.
    #[cfg(test)]
    pub(crate) async fn attached_to(&self, addr: SocketAddr) -> Vec<RouteKey> {
        let mut keys: Vec<RouteKey> = self
            .listeners
            .lock()
            .await
            .attached
            .iter()
            .filter(|(_, a)| a.addr == addr)
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort_by_key(ToString::to_string);
        keys
    }

    /// The sockets a previous agent left for `name`, if they are still
    /// bound to `addr` (else they are closed).
    fn inherited(&self, name: &str, addr: SocketAddr) -> Option<Vec<std::net::TcpListener>> {
        let sockets: Vec<std::net::TcpListener> = self
            .keeper
            .take(name)?
            .into_iter()
            .map(std::net::TcpListener::from)
            .collect();
        let same = !sockets.is_empty()
            && sockets
                .iter()
                .all(|s| s.local_addr().is_ok_and(|a| a == addr));
        same.then_some(sockets)
    }

    /// `key` routes nothing any more; its listener closes for good when
    /// no other key is attached to it.
    pub async fn detach(&self, key: &RouteKey) {
        let mut listeners = self.listeners.lock().await;
        let Some(Attachment { addr, .. }) = listeners.attached.remove(key) else {
            return;
        };
        let sources = Self::tls_sources(&listeners.attached, addr);
        if sources.is_empty() {
            listeners.tls.remove(&addr);
        } else if let Some(t) = listeners.tls.get_mut(&addr) {
            // Fewer certificates: each was read before.
            if let Err(e) = t.set(sources) {
                tracing::warn!("listener {addr}: {e}");
            }
        }
        // Removing routes cannot make a conflict.
        let _ = self.publish_listeners(&listeners.attached, &listeners.tls, &[addr]);
        listeners.close_if_unused(addr, &self.keeper);
    }

    /// Stop every listener (agent shutdown).
    pub async fn close(&self) {
        for (addr, workers) in self.listeners.lock().await.workers.drain() {
            workers.stop();
            self.keeper.forget(&format!("listen:{addr}"));
        }
    }

    /// Hand the listeners over to a successor: stop accepting (the
    /// sockets stay open in the supervisor and the successor) and end each
    /// connection after its current exchange ([`Self::drain`] waits).
    pub async fn stop_accepting(&self) {
        self.table.1.send_replace(true);
        for workers in self.listeners.lock().await.workers.values() {
            workers.stop_accepting();
        }
    }

    /// Until no client connection is left (at most `limit`).
    pub async fn drain(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.open.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Accept connections on this thread's socket and serve them, or hand
    /// one to the thread serving the fewest (see [`Spread`]).
    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        addr: SocketAddr,
        pool: Upstream,
        spread: Arc<Spread>,
        me: usize,
        (mut handed, mut stopped): (Handed, tokio::sync::watch::Receiver<Stop>),
    ) {
        // Handing over: no new connection, the ones this thread has (and
        // any handed to it meanwhile) finish, then the loop ends.
        let mut draining: Option<tokio::time::Instant> = None;
        let label = addr.to_string();
        let open = self.metrics.connections(&label);
        let answers = self.metrics.answers(&label);
        loop {
            if let Some(deadline) = draining
                && (spread.serving[me].load(Ordering::Relaxed) <= 0
                    || tokio::time::Instant::now() >= deadline)
            {
                return;
            }
            let accepting = draining.is_none();
            let full = self.at_capacity(&addr, open.load(Ordering::Relaxed));
            let (stream, peer, was_handed) = tokio::select! {
                stop = until(&mut stopped, |s| s != Stop::No), if accepting => {
                    if stop == Stop::All {
                        return;
                    }
                    draining = Some(tokio::time::Instant::now() + HAND_OVER_LIMIT);
                    continue;
                }
                () = tokio::time::sleep(Duration::from_millis(10)), if !accepting => continue,
                accepted = listener.accept(), if !full && accepting => {
                    let (stream, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of descriptors: retrying at once would
                            // spin both cores; the client waits in the
                            // accept queue instead.
                            if is_out_of_resources(&e) {
                                tracing::warn!("listener {addr}: cannot accept: {e}; pausing");
                                tokio::time::sleep(OUT_OF_FDS_PAUSE).await;
                            }
                            continue;
                        }
                    };
                    // The check above may be older than this accept (a
                    // thread waits in accept with room it no longer has):
                    // the connection waits, unread, until there is room, as
                    // it would have in the accept queue. The budget is
                    // thus passed by at most one connection per thread.
                    while self.at_capacity(&addr, open.load(Ordering::Relaxed)) {
                        tokio::time::sleep(ACCEPT_PAUSE).await;
                    }
                    match spread.fewer_than(me).filter(|_| draining.is_none()) {
                        Some(other) => {
                            if let Ok(std) = stream.into_std() {
                                spread.hand(other, std, peer);
                            }
                            continue;
                        }
                        None => (stream, peer, false),
                    }
                }
                Some((std, peer)) = handed.recv() => {
                    let Ok(stream) = tokio::net::TcpStream::from_std(std) else {
                        spread.serving[me].fetch_sub(1, Ordering::Relaxed);
                        continue;
                    };
                    (stream, peer, true)
                }
                // At the cap: look again in a moment (a connection that
                // closes makes room).
                () = tokio::time::sleep(ACCEPT_PAUSE), if full => continue,
            };
            let _ = stream.set_nodelay(true);
            let (tls, h2c, peers) = {
                let table = self.table.0.load();
                (
                    table.tls.get(&addr).cloned(),
                    table.h2c.contains(&addr),
                    table.peers.get(&addr).cloned(),
                )
            };
            let (table, pool, answers) = (self.table.clone(), pool.clone(), answers.clone());
            // Counted before the task runs, so a burst sees its own count.
            open.fetch_add(1, Ordering::Relaxed);
            self.open.fetch_add(1, Ordering::Relaxed);
            let counted = (Gauge(open.clone()), Gauge(self.open.clone()));
            let served = spread.serving(me, was_handed);
            tokio::spawn(async move {
                let _counted = counted;
                let _served = served;
                let mut stream = stream;
                let mut client = peer.ip();
                // A trusted load balancer's PROXY header names the client;
                // a connection from one that sends none is closed.
                if peers.is_some_and(|p| p.proxy_protocol && p.trusts(peer.ip())) {
                    match proxy_header(&mut stream).await {
                        Some(kiln_core::proxy::Header::Proxied { source, .. }) => {
                            client = source.ip()
                        }
                        Some(kiln_core::proxy::Header::Local) => {}
                        None => return,
                    }
                }
                let peer_ip = client.to_canonical().to_string();
                let Some(config) = tls else {
                    if h2c {
                        match self::h2::prior_knowledge(&stream).await {
                            None => return,
                            Some(true) => {
                                let conn =
                                    self::h2::Conn::new(table, addr, pool, peer_ip, answers, false);
                                return self::h2::serve(stream, conn).await;
                            }
                            Some(false) => {}
                        }
                    }
                    let client = Client::new(table, addr, pool, (stream, false), peer_ip, answers);
                    return client.serve().await;
                };
                // A client that does not finish its handshake in time is
                // closed, as one that sends no head is.
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                let Ok(Ok(stream)) =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                else {
                    return;
                };
                // The client's choice in the handshake (ALPN) decides the
                // front; a CA's TLS-ALPN-01 validation ends at the handshake.
                let alpn = stream.get_ref().1.alpn_protocol();
                if alpn == Some(self::tls::ACME_TLS_ALPN) {
                    return;
                }
                if alpn == Some(b"h2") {
                    let conn = self::h2::Conn::new(table, addr, pool, peer_ip, answers, true);
                    return self::h2::serve(stream, conn).await;
                }
                Client::new(table, addr, pool, (stream, true), peer_ip, answers)
                    .serve()
                    .await;
            });
        }
    }
}

impl Listeners {
    /// Close the listener on `addr` for good if nothing is attached to it.
    fn close_if_unused(&mut self, addr: SocketAddr, keeper: &crate::keeper::Keeper) {
        if self.attached.values().any(|a| a.addr == addr) {
            return;
        }
        if let Some(workers) = self.workers.remove(&addr) {
            workers.close();
            keeper.forget(&format!("listen:{addr}"));
        }
    }
}

/// A listener's name among the descriptors earlier agents kept (one
/// listener per service then).
fn key_name(key: &RouteKey) -> String {
    match key {
        RouteKey::Service(s) => format!("service:{s}"),
        RouteKey::Preview(s) => format!("preview:{s}"),
        RouteKey::Redirect(s) => format!("redirect:{s}"),
    }
}

/// One listening socket per router thread on `addr`, sharing it through
/// `SO_REUSEPORT` (the first bind tells whether the address is free).
fn bind_group(addr: SocketAddr) -> std::io::Result<Vec<std::net::TcpListener>> {
    (0..router_threads()).map(|_| bind(addr)).collect()
}

fn router_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Read the PROXY protocol header at the start of `stream` (and nothing
/// after it): `None` when there is none, it is invalid, or it has not come
/// whole within the head timeout.
async fn proxy_header(stream: &mut tokio::net::TcpStream) -> Option<kiln_core::proxy::Header> {
    use tokio::io::AsyncReadExt;
    let parsed = downstream::peek_first::<_, { kiln_core::proxy::MAX_HEADER }>(stream, |b| {
        match kiln_core::proxy::parse(b) {
            Ok(None) => None,
            decided => Some(decided),
        }
    })
    .await?;
    match parsed {
        Ok(Some((header, len))) => {
            let mut consumed = [0u8; kiln_core::proxy::MAX_HEADER];
            stream.read_exact(&mut consumed[..len]).await.ok()?;
            Some(header)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::debug!("a trusted proxy's connection: {e}");
            None
        }
    }
}

/// Whether an accept failed for want of descriptors or memory (the
/// process's or the system's), rather than for one connection's sake.
fn is_out_of_resources(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    e.raw_os_error().is_some_and(|n| {
        [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM]
            .iter()
            .any(|x| x.raw_os_error() == n)
    })
}

/// Raise the process's descriptor limit to its hard limit (the agent does
/// this at start, as nginx's `worker_rlimit_nofile` would); the new soft
/// limit.
pub fn raise_nofile_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!("cannot raise the descriptor limit: {e}");
        }
    }
    nofile_limit()
}

/// Keeps a listener's connections even across its threads.
///
/// `SO_REUSEPORT` spreads connections by a hash of their addresses: 50
/// connections often split 29/21, and the busier thread's clients then wait
/// longer (the tail of the latency). A thread that accepts a connection
/// while it serves more than another thread (by two or more) hands it over;
/// this costs one channel send per connection, nothing per request.
struct Spread {
    serving: Vec<Arc<std::sync::atomic::AtomicI64>>,
    inbox: Vec<tokio::sync::mpsc::UnboundedSender<(std::net::TcpStream, SocketAddr)>>,
}

impl Spread {
    /// The thread to hand a new connection to, when `me` serves two or more
    /// than it.
    fn fewer_than(&self, me: usize) -> Option<usize> {
        let mine = self.serving[me].load(Ordering::Relaxed);
        let (other, least) = self
            .serving
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .enumerate()
            .min_by_key(|&(_, n)| n)?;
        (other != me && least + 2 <= mine).then_some(other)
    }

    fn hand(&self, to: usize, stream: std::net::TcpStream, peer: SocketAddr) {
        // Counted as the receiver's at once, so a burst of connections
        // spreads instead of all going to the same thread.
        self.serving[to].fetch_add(1, Ordering::Relaxed);
        if self.inbox[to].send((stream, peer)).is_err() {
            self.serving[to].fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Count a connection `me` serves until the guard drops. A handed-over
    /// one was counted when it was handed.
    fn serving(&self, me: usize, handed: bool) -> Gauge {
        if !handed {
            self.serving[me].fetch_add(1, Ordering::Relaxed);
        }
        Gauge(self.serving[me].clone())
    }
}

type Upstream = Arc<Pool>;

/// Connections other router threads hand to this one.
type Handed = tokio::sync::mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>;

/// A listener served thread-per-core: each thread has its own SO_REUSEPORT
/// socket (the kernel spreads connections), its own current-thread runtime
/// and its own upstream pool, so a request never hops between threads.
/// (On a shared multi-thread runtime, ~40% of the router's CPU went to
/// waking tasks across threads.)
struct Workers {
    stop: tokio::sync::watch::Sender<Stop>,
    /// The listening sockets themselves (duplicates of the threads'
    /// descriptors): shutting one down stops it listening for every
    /// holder, the supervisor's copy included.
    sockets: Vec<std::os::fd::OwnedFd>,
}

impl Workers {
    /// Serve `sockets` (one per router thread).
    fn start(
        router: Arc<Router>,
        addr: SocketAddr,
        sockets: Vec<std::net::TcpListener>,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = tokio::sync::watch::channel(Stop::No);
        let n = sockets.len();
        let dups = sockets
            .iter()
            .map(|s| s.try_clone().map(std::os::fd::OwnedFd::from))
            .collect::<std::io::Result<Vec<_>>>()?;
        let (inbox, mut handed): (Vec<_>, Vec<_>) = (0..n)
            .map(|_| tokio::sync::mpsc::unbounded_channel())
            .unzip();
        let spread = Arc::new(Spread {
            serving: (0..n).map(|_| Arc::default()).collect(),
            inbox,
        });
        for (i, (handed, socket)) in handed.drain(..).zip(sockets).enumerate() {
            socket.set_nonblocking(true)?;
            let spread = spread.clone();
            let router = router.clone();
            let mut stopped = stopped.clone();
            std::thread::Builder::new()
                .name(format!("kiln-router-{i}"))
                .spawn(move || {
                    self::metrics::use_shard(i + 1);
                    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    else {
                        tracing::error!("listener {addr}: router thread {i} has no runtime");
                        return;
                    };
                    rt.block_on(async move {
                        let socket = match TcpListener::from_std(socket) {
                            Ok(l) => l,
                            Err(e) => {
                                tracing::error!("listener {addr}: router thread {i}: {e}");
                                return;
                            }
                        };
                        let pool = Upstream::default();
                        let stop = stopped.clone();
                        tokio::select! {
                            _ = router.accept_loop(socket, addr, pool.clone(), spread, i, (handed, stop)) => {}
                            _ = housekeeping(&pool) => {}
                            _ = until(&mut stopped, |s| s == Stop::All) => {}
                        }
                    });
                })?;
        }
        Ok(Self {
            stop,
            sockets: dups,
        })
    }

    /// Stop listening for good, now (a removed service): the kernel
    /// refuses new connections from this moment, whoever else holds the
    /// sockets; then the threads end.
    fn close(&self) {
        for s in &self.sockets {
            let _ = rustix::net::shutdown(s, rustix::net::Shutdown::Both);
        }
        self.stop();
    }

    fn stop(&self) {
        let _ = self.stop.send(Stop::All);
    }

    fn stop_accepting(&self) {
        let _ = self.stop.send(Stop::Accepting);
    }
}

/// How a listener's threads stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    No,
    /// Everything now (the agent stops).
    All,
    /// Accepting only: connections finish (a successor takes over).
    Accepting,
}

/// The first stop that `want` says is the one; a listener whose sender is
/// gone (its `Workers` dropped) waits for nothing more.
async fn until(
    stopped: &mut tokio::sync::watch::Receiver<Stop>,
    want: impl Fn(Stop) -> bool,
) -> Stop {
    match stopped.wait_for(|s| want(*s)).await {
        Ok(s) => *s,
        Err(_) => std::future::pending().await,
    }
}

/// How long connections may take to finish when their process hands over.
const HAND_OVER_LIMIT: Duration = Duration::from_secs(30);

/// A router thread's chores, once a second: close the pooled connections
/// that instances closed or that sat idle too long.
///
/// The tick also keeps a timer armed on the thread at all times, earlier
/// than any request's deadline (unless a service's timeout is under a
/// second). tokio wakes its driver (an eventfd write) when a timer is set
/// earlier than the driver's next wake, or when no timer was armed as it
/// parked: without the tick, every request arriving at a thread that had
/// none in flight paid that write (`perf` counted ~0.26 per request).
async fn housekeeping(pool: &Pool) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        pool.reap(std::time::Instant::now());
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, sockopt};
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    sockopt::set_socket_reuseport(&fd, true)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    rustix::net::bind(&fd, &addr)?;
    rustix::net::listen(&fd, 1024)?;
    Ok(std::net::TcpListener::from(fd))
}

/// Decrements a gauge when dropped (an open connection, or one a router
/// thread serves).
struct Gauge(Arc<std::sync::atomic::AtomicI64>);

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::testing::free_port;
    use kiln_core::spec::ServiceName;

    async fn get(port: u16) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        (
            out[9..12].parse().unwrap(),
            out.split_once("\r\n\r\n").unwrap().1.to_owned(),
        )
    }

    #[tokio::test]
    async fn no_ready_instance_is_503_and_an_unreachable_one_502() {
        let r = Router::new(std::sync::Arc::new(crate::keeper::Keeper::none()));
        let svc = RouteKey::Service(ServiceName::try_from("web").unwrap());
        let port = free_port();
        r.attach(&svc, Attachment::plain(([127, 0, 0, 1], port).into()))
            .await
            .unwrap();
        let (status, body) = get(port).await;
        assert_eq!(status, 503, "{body}");
        r.set_routes(&svc, ServiceRoutes::new(Vec::new(), Duration::from_secs(1)));
        let (status, body) = get(port).await;
        assert_eq!(status, 503);
        assert!(body.contains("no ready instance of service web"), "{body}");
        // Two backends with nothing listening: retried, then 502.
        let dead = |port| {
            Arc::new(Backend::new(
                format!("i{port}"),
                1,
                (std::net::Ipv4Addr::LOCALHOST, port).into(),
                Arc::default(),
                Arc::default(),
            ))
        };
        r.set_routes(
            &svc,
            ServiceRoutes::new(
                vec![dead(free_port()), dead(free_port())],
                Duration::from_secs(1),
            ),
        );
        let (status, body) = get(port).await;
        assert_eq!(status, 502);
        assert!(body.contains("could not be reached"), "{body}");
        // Every answer the router gave itself is counted.
        let answers = r.metrics.answers(&format!("127.0.0.1:{port}"));
        assert_eq!((answers.get(503), answers.get(502)), (2, 1));
        let mut text = String::new();
        r.metrics.render(&mut text);
        assert!(
            text.contains(&format!(
                "kiln_router_local_responses_total{{listener=\"127.0.0.1:{port}\",status=\"503\"}} 2\n"
            )),
            "{text}"
        );
        // The same route on the same address cannot be taken twice.
        let other = RouteKey::Service(ServiceName::try_from("other").unwrap());
        let err = r
            .attach(&other, Attachment::plain(([127, 0, 0, 1], port).into()))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("service other and service web both route any host / on 127.0.0.1:{port}")
        );
        r.close().await;
    }

    /// `GET /` with `host` on a new connection: the status, or `None` when
    /// nothing accepts the connection.
    async fn status_for(port: u16, host: &str) -> Option<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let req = format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        out.get(9..12)?.parse().ok()
    }

    #[tokio::test]
    async fn services_attach_to_one_listener_which_closes_with_the_last() {
        let r = Router::new(std::sync::Arc::new(crate::keeper::Keeper::none()));
        let key = |n: &str| RouteKey::Service(ServiceName::try_from(n).unwrap());
        let (a, b) = (key("a"), key("b"));
        let route = |h: &str| RouteSpec {
            hosts: vec![kiln_core::edge::HostPattern::parse(h).unwrap()],
            ..RouteSpec::default()
        };
        let on = |addr, h: &str| Attachment {
            route: route(h),
            ..Attachment::plain(addr)
        };
        let port = free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        r.attach(&a, on(addr, "a.test")).await.unwrap();
        r.attach(&b, on(addr, "b.test")).await.unwrap();
        // Neither has an instance yet: each host is its own service's 503;
        // another host is no one's (404).
        assert_eq!(status_for(port, "a.test").await, Some(503));
        assert_eq!(status_for(port, "b.test").await, Some(503));
        assert_eq!(status_for(port, "c.test").await, Some(404));
        // A conflict changes nothing: b keeps its route.
        let err = r.attach(&a, on(addr, "b.test")).await.unwrap_err();
        assert!(matches!(err, ListenError::Conflict(_)), "{err}");
        assert_eq!(r.attached_to(addr).await, [a.clone(), b.clone()]);
        assert_eq!(r.table().listeners[&addr].iter().count(), 2);
        // One goes: the other still answers on the same listener.
        r.detach(&a).await;
        assert_eq!(status_for(port, "a.test").await, Some(404));
        assert_eq!(status_for(port, "b.test").await, Some(503));
        // b moves to another address: the first closes with its last route.
        let port2 = free_port();
        r.attach(&b, on(([127, 0, 0, 1], port2).into(), "b.test"))
            .await
            .unwrap();
        assert_eq!(status_for(port2, "b.test").await, Some(503));
        assert_eq!(status_for(port, "b.test").await, None, "closed");
        assert!(!r.table().listeners.contains_key(&addr));
        r.close().await;
    }

    #[test]
    fn a_thread_serving_two_more_than_another_hands_it_the_connection() {
        let (inbox, mut rx): (Vec<_>, Vec<_>) = (0..3)
            .map(|_| tokio::sync::mpsc::unbounded_channel())
            .unzip();
        let spread = Spread {
            serving: (0..3).map(|_| Arc::default()).collect(),
            inbox,
        };
        let set = |counts: [i64; 3]| {
            for (n, c) in spread.serving.iter().zip(counts) {
                n.store(c, Ordering::Relaxed);
            }
        };
        set([3, 1, 2]);
        assert_eq!(spread.fewer_than(0), Some(1));
        assert_eq!(spread.fewer_than(2), None, "one more is even enough");
        assert_eq!(spread.fewer_than(1), None);
        // Handing counts the connection as the receiver's at once, so a
        // burst does not all go to the same thread.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = std::net::TcpStream::connect(addr).unwrap();
        spread.hand(1, stream, addr);
        assert_eq!(spread.serving[1].load(Ordering::Relaxed), 2);
        assert!(rx[1].try_recv().is_ok(), "the receiver gets it");
        assert_eq!(spread.fewer_than(0), None, "now 3, 2, 2");
        // A connection served here is counted until its guard drops.
        let served = spread.serving(2, false);
        assert_eq!(spread.serving[2].load(Ordering::Relaxed), 3);
        drop(served);
        assert_eq!(spread.serving[2].load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_swap_replaces_one_service_and_keeps_the_others() {
        let r = Router::new(std::sync::Arc::new(crate::keeper::Keeper::none()));
        let a = RouteKey::Service(ServiceName::try_from("a").unwrap());
        let b = RouteKey::Service(ServiceName::try_from("b").unwrap());
        let backend = |port| {
            Arc::new(Backend::new(
                format!("i{port}"),
                1,
                (std::net::Ipv4Addr::LOCALHOST, port).into(),
                Arc::default(),
                Arc::default(),
            ))
        };
        r.set_routes(
            &a,
            ServiceRoutes::new(vec![backend(1)], Duration::from_secs(1)),
        );
        r.set_routes(
            &b,
            ServiceRoutes::new(vec![backend(2)], Duration::from_secs(1)),
        );
        let before = r.table();
        r.set_routes(
            &a,
            ServiceRoutes::new(vec![backend(3), backend(4)], Duration::from_secs(1)),
        );
        let after = r.table();
        assert_eq!(
            before.services[&a].backends.len(),
            1,
            "an old snapshot never changes"
        );
        assert_eq!(after.services[&a].backends.len(), 2);
        assert_eq!(after.services[&b].backends[0].addr.port(), 2);
    }
}
