//! The router: one HTTP/1.1 reverse-proxy listener per service `listen`,
//! inside the agent, sending each request to a ready instance.
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

pub(crate) mod downstream;
pub(crate) mod metrics;
pub(crate) mod routes;
#[cfg(test)]
pub(crate) mod testing;
pub(crate) mod upstream;
pub(crate) mod wire;

use tokio::net::TcpListener;
use tokio::sync::Mutex;

use self::downstream::Client;
use self::routes::RouteSource;
pub use self::routes::{Backend, RouteKey, RouteTable, ServiceRoutes, Split};
use self::upstream::Pool;

pub struct Router {
    table: RouteSource,
    pub metrics: Arc<self::metrics::Metrics>,
    listeners: Mutex<HashMap<RouteKey, (SocketAddr, Workers)>>,
    /// Client connections open on all listeners together, and how many
    /// they may be: traffic never takes the descriptors the API, probes
    /// and instances need.
    open: Arc<std::sync::atomic::AtomicI64>,
    budget: i64,
    /// Holds the listening sockets across agent processes.
    keeper: Arc<crate::keeper::Keeper>,
}

/// Descriptors left to the rest of the agent (the API, probes, instances'
/// pipes and logs, the state database), whatever the traffic: at least
/// this many, or a tenth of the limit.
pub const RESERVED_FDS: u64 = 256;

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

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for {service}: {source}")]
pub struct ListenError {
    pub service: RouteKey,
    pub addr: SocketAddr,
    pub source: std::io::Error,
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
            listeners: Mutex::new(HashMap::new()),
            open: Arc::default(),
            budget,
        })
    }

    /// Whether a listener holding `open` connections (of `service`) must
    /// wait before it accepts another: at its own cap, or at the budget.
    fn at_capacity(&self, service: &RouteKey, open: i64) -> bool {
        let cap = self
            .routes(service)
            .and_then(|r| r.limits.max_connections)
            .map_or(i64::MAX, i64::from);
        open >= cap || self.open.load(Ordering::Relaxed) >= self.budget
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

    /// A service's current routes.
    pub(crate) fn routes(&self, key: &RouteKey) -> Option<Arc<ServiceRoutes>> {
        self.table.routes(key)
    }

    /// Publish a service's routes: one atomic swap of the whole table.
    pub fn set_routes(&self, service: &RouteKey, routes: ServiceRoutes) {
        let routes = Arc::new(routes);
        self.table.0.rcu(|old| {
            let mut services = old.services.clone();
            services.insert(service.clone(), routes.clone());
            RouteTable { services }
        });
    }

    /// Forget a service's routes (it was removed): one atomic swap.
    pub fn remove_routes(&self, service: &RouteKey) {
        self.table.0.rcu(|old| {
            let mut services = old.services.clone();
            services.remove(service);
            RouteTable { services }
        });
    }

    /// Make sure `service` has a listener on `addr` (moving it if it had
    /// another). Binding is the check that the address is free.
    pub async fn listen(
        self: &Arc<Self>,
        service: &RouteKey,
        addr: SocketAddr,
    ) -> Result<(), ListenError> {
        let mut listeners = self.listeners.lock().await;
        if listeners.get(service).is_some_and(|(a, _)| *a == addr) {
            return Ok(());
        }
        // SO_REUSEPORT would let this process bind the address twice: refuse
        // an address another listener of ours holds.
        if listeners
            .iter()
            .any(|(k, (a, _))| *a == addr && k != service)
        {
            return Err(ListenError {
                service: service.clone(),
                addr,
                source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
            });
        }
        let name = format!("listen:{}", key_name(service));
        let sockets = self
            .inherited(&name, addr)
            .map_or_else(|| bind_group(addr), Ok)
            .map_err(|source| ListenError {
                service: service.clone(),
                addr,
                source,
            })?;
        // The supervisor holds them too: if this process dies, clients wait
        // in the accept queues for the next one instead of being refused.
        self.keeper.keep(&name, &crate::keeper::borrowed(&sockets));
        let workers = Workers::start(self.clone(), service.clone(), sockets).map_err(|source| {
            ListenError {
                service: service.clone(),
                addr,
                source,
            }
        })?;
        if let Some((_, old)) = listeners.remove(service) {
            old.stop();
        }
        listeners.insert(service.clone(), (addr, workers));
        Ok(())
    }

    /// Whether `service` (or nobody) holds `addr` already.
    pub async fn listening_on(&self, addr: SocketAddr) -> Option<RouteKey> {
        self.listeners
            .lock()
            .await
            .iter()
            .find(|(_, (a, _))| *a == addr)
            .map(|(s, _)| s.clone())
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

    /// Stop the listener of `key`, if it has one, for good.
    pub async fn unlisten(&self, key: &RouteKey) {
        if let Some((_, workers)) = self.listeners.lock().await.remove(key) {
            workers.close();
            self.keeper.forget(&format!("listen:{}", key_name(key)));
        }
    }

    /// Stop every listener (agent shutdown).
    pub async fn close(&self) {
        for (key, (_, workers)) in self.listeners.lock().await.drain() {
            workers.stop();
            self.keeper.forget(&format!("listen:{}", key_name(&key)));
        }
    }

    /// Hand the listeners over to a successor: stop accepting (the
    /// sockets stay open in the supervisor and the successor) and end each
    /// connection after its current exchange ([`Self::drain`] waits).
    pub async fn stop_accepting(&self) {
        self.table.1.send_replace(true);
        for (_, (_, workers)) in self.listeners.lock().await.iter() {
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
        service: RouteKey,
        pool: Upstream,
        spread: Arc<Spread>,
        me: usize,
        (mut handed, mut stopped): (Handed, tokio::sync::watch::Receiver<Stop>),
    ) {
        // Handing over: no new connection, the ones this thread has (and
        // any handed to it meanwhile) finish, then the loop ends.
        let mut draining: Option<tokio::time::Instant> = None;
        let label = match &service {
            RouteKey::Service(s) => s.to_string(),
            RouteKey::Preview(s) => format!("{s}/preview"),
        };
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
            let full = self.at_capacity(&service, open.load(Ordering::Relaxed));
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
                                tracing::warn!("{service}: cannot accept: {e}; pausing");
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
                    while self.at_capacity(&service, open.load(Ordering::Relaxed)) {
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
            let client = Client::new(
                self.table.clone(),
                service.clone(),
                pool.clone(),
                stream,
                peer.ip().to_string(),
                answers.clone(),
            );
            // Counted before the task runs, so a burst sees its own count.
            open.fetch_add(1, Ordering::Relaxed);
            self.open.fetch_add(1, Ordering::Relaxed);
            let counted = (Gauge(open.clone()), Gauge(self.open.clone()));
            let served = spread.serving(me, was_handed);
            tokio::spawn(async move {
                let _counted = counted;
                let _served = served;
                client.serve().await;
            });
        }
    }
}

/// A listener's name among the kept descriptors.
fn key_name(key: &RouteKey) -> String {
    match key {
        RouteKey::Service(s) => format!("service:{s}"),
        RouteKey::Preview(s) => format!("preview:{s}"),
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
        key: RouteKey,
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
            let key = key.clone();
            let mut stopped = stopped.clone();
            std::thread::Builder::new()
                .name(format!("kiln-router-{i}"))
                .spawn(move || {
                    self::metrics::use_shard(i + 1);
                    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    else {
                        tracing::error!("{key}: router thread {i} has no runtime");
                        return;
                    };
                    rt.block_on(async move {
                        let socket = match TcpListener::from_std(socket) {
                            Ok(l) => l,
                            Err(e) => {
                                tracing::error!("{key}: router thread {i}: {e}");
                                return;
                            }
                        };
                        let pool = Upstream::default();
                        let stop = stopped.clone();
                        tokio::select! {
                            _ = router.accept_loop(socket, key, pool.clone(), spread, i, (handed, stop)) => {}
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
        r.listen(&svc, ([127, 0, 0, 1], port).into()).await.unwrap();
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
        let answers = r.metrics.answers("web");
        assert_eq!((answers.get(503), answers.get(502)), (2, 1));
        let mut text = String::new();
        r.metrics.render(&mut text);
        assert!(
            text.contains("kiln_router_local_responses_total{listener=\"web\",status=\"503\"} 2\n"),
            "{text}"
        );
        // A listening address cannot be taken twice.
        let other = RouteKey::Service(ServiceName::try_from("other").unwrap());
        assert!(
            r.listen(&other, ([127, 0, 0, 1], port).into())
                .await
                .is_err()
        );
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
