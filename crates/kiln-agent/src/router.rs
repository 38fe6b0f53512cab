//! The router: one HTTP/1.1 reverse-proxy listener per service `listen`,
//! inside the agent, sending each request to a ready instance.
//!
//! The whole routing table is one immutable [`RouteTable`] behind an
//! `ArcSwap`: a request loads it once and uses that snapshot to the end, and
//! controllers publish a new table with a single atomic swap (read-copy-
//! update), so no request ever sees half an update. Instances are reached
//! through one shared keep-alive pool. Each backend counts its in-flight
//! requests (until the response body is fully sent), which is what draining
//! waits on.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kiln_core::spec::ServiceName;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use crate::upstream::{Pool, ProtocolError, UpBody, UpstreamError};

/// Every body the router answers with: an instance's (which keeps its
/// request counted in flight until it is fully sent), or the router's own.
struct ProxyBody {
    body: UpBody,
    _guard: Option<Inflight>,
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = ProtocolError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ProtocolError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// One ready instance that may receive traffic.
#[derive(Debug)]
pub struct Backend {
    pub instance: String,
    pub revision: u64,
    pub port: u16,
    /// `127.0.0.1:PORT`, made once: the `Host` of a request that has none.
    pub host: HeaderValue,
    /// Requests in flight to it, until their response bodies are sent.
    pub inflight: Arc<crate::metrics::InFlight>,
    /// Its release's measurements.
    pub metrics: Arc<crate::metrics::ReleaseMetrics>,
}

impl Backend {
    pub fn new(
        instance: String,
        revision: u64,
        port: u16,
        inflight: Arc<crate::metrics::InFlight>,
        metrics: Arc<crate::metrics::ReleaseMetrics>,
    ) -> Self {
        let host = HeaderValue::from_str(&format!("127.0.0.1:{port}"))
            .unwrap_or_else(|_| HeaderValue::from_static("127.0.0.1"));
        Self {
            instance,
            revision,
            port,
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
        }
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
    fn choose(&self, headers: &HeaderMap) -> (&[Arc<Backend>], Option<HeaderValue>) {
        let stable = (self.backends.as_slice(), None);
        let Some(c) = &self.canary else {
            return stable;
        };
        if c.backends.is_empty() || c.weight == 0 {
            return stable;
        }
        if self.backends.is_empty() || c.weight >= 100 {
            return (&c.backends, None);
        }
        let (bucket, set) = match &c.cookie {
            Some(name) => match sticky_bucket(headers, name, c.revision) {
                Some(b) => (b, None),
                None => {
                    let b = fastrand::u32(0..100);
                    let v = format!("{name}={}.{b}; Path=/; HttpOnly; SameSite=Lax", c.revision);
                    (b, HeaderValue::from_str(&v).ok())
                }
            },
            None => (fastrand::u32(0..100), None),
        };
        if bucket < c.weight {
            (&c.backends, set)
        } else {
            (&self.backends, set)
        }
    }
}

/// The bucket a client's cookie `name=REVISION.BUCKET` holds for canary
/// `revision`; none when absent, malformed or from another canary (the
/// client is then assigned afresh: a bad cookie never fails a request).
fn sticky_bucket(headers: &HeaderMap, name: &str, revision: u64) -> Option<u32> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
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
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RouteKey {
    Service(ServiceName),
    Preview(ServiceName),
}

impl std::fmt::Display for RouteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Service(s) => write!(f, "service {s}"),
            Self::Preview(s) => write!(f, "the preview of service {s}"),
        }
    }
}

/// The whole routing table: swapped as one value.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub services: HashMap<RouteKey, Arc<ServiceRoutes>>,
}

pub struct Router {
    table: ArcSwap<RouteTable>,
    pub metrics: Arc<crate::metrics::Metrics>,
    listeners: Mutex<HashMap<RouteKey, (SocketAddr, Workers)>>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for {service}: {source}")]
pub struct ListenError {
    pub service: RouteKey,
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

impl Router {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            table: ArcSwap::from_pointee(RouteTable::default()),
            metrics: Arc::default(),
            listeners: Mutex::new(HashMap::new()),
        })
    }

    /// The current snapshot.
    pub fn table(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// Publish a service's routes: one atomic swap of the whole table.
    pub fn set_routes(&self, service: &RouteKey, routes: ServiceRoutes) {
        let routes = Arc::new(routes);
        self.table.rcu(|old| {
            let mut services = old.services.clone();
            services.insert(service.clone(), routes.clone());
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
        let workers =
            Workers::start(self.clone(), service.clone(), addr).map_err(|source| ListenError {
                service: service.clone(),
                addr,
                source,
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

    /// Stop the listener of `key`, if it has one.
    pub async fn unlisten(&self, key: &RouteKey) {
        if let Some((_, workers)) = self.listeners.lock().await.remove(key) {
            workers.stop();
        }
    }

    /// Stop every listener (agent shutdown).
    pub async fn close(&self) {
        for (_, (_, workers)) in self.listeners.lock().await.drain() {
            workers.stop();
        }
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        service: RouteKey,
        client: Upstream,
    ) {
        let open = self.metrics.connections(&match &service {
            RouteKey::Service(s) => s.to_string(),
            RouteKey::Preview(s) => format!("{s}/preview"),
        });
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            // Everything a request needs from its connection, behind one
            // Arc: a request clones that, not each part.
            let conn = Arc::new(Conn {
                router: self.clone(),
                service: service.clone(),
                client: client.clone(),
                peer_ip: HeaderValue::from_str(&peer.ip().to_string())
                    .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            });
            let open = open.clone();
            tokio::spawn(async move {
                open.fetch_add(1, Ordering::Relaxed);
                let _open = Gauge(open);
                let svc = hyper::service::service_fn(move |req| {
                    let conn = conn.clone();
                    async move { Ok::<_, Infallible>(conn.proxy(req).await) }
                });
                // hyper answers unparsable requests with 400 itself.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    }
}

thread_local! {
    static ROUND_ROBIN: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// What the requests of one client connection share.
struct Conn {
    router: Arc<Router>,
    service: RouteKey,
    client: Upstream,
    /// The client's address, as `X-Forwarded-For` gets it.
    peer_ip: HeaderValue,
}

impl Conn {
    /// Send one request to an instance of its service and answer with the
    /// instance's response (or the router's own 502/503/504).
    async fn proxy(&self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let (client, service) = (&self.client, &self.service);
        let arrived = std::time::Instant::now();
        let routes = self.router.table.load().services.get(service).cloned();
        let Some(routes) = routes else {
            return local(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("no routes for {service}\n"),
            );
        };
        let (backends, set_cookie) = routes.choose(req.headers());
        if backends.is_empty() {
            return local(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("no ready instance of {service}\n"),
            );
        }
        let upgrade = is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let host = parts.headers.get(header::HOST).cloned();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        let xff = match parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) => self
                .peer_ip
                .to_str()
                .ok()
                .and_then(|ip| HeaderValue::from_str(&format!("{prev}, {ip}")).ok()),
            None => Some(self.peer_ip.clone()),
        };
        if let Some(v) = xff {
            parts
                .headers
                .insert(HeaderName::from_static("x-forwarded-for"), v);
        }
        parts.headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static("http"),
        );
        if let Some(h) = host {
            parts
                .headers
                .insert(HeaderName::from_static("x-forwarded-host"), h);
        }
        // A request without a body can be sent again to another instance
        // if the first could not be connected to: nothing reached it.
        let bodyless = body.is_end_stream();
        let mut body = (!bodyless).then_some(body);
        let has_host = parts.headers.contains_key(header::HOST);
        let n = backends.len();
        // Round-robin per router thread: no counter shared between cores.
        let start = ROUND_ROBIN.with(|n| {
            let v = n.get();
            n.set(v.wrapping_add(1));
            v
        });
        let attempts = if bodyless { n.min(3) } else { 1 };
        let mut last = None;
        for attempt in 0..attempts {
            let backend = &backends[(start + attempt) % n];
            // An HTTP/1.0 request without Host gets the instance's.
            if !has_host {
                parts.headers.insert(header::HOST, backend.host.clone());
            }
            let guard = Inflight::new(backend.inflight.clone());
            let sent = client.send(backend.port, &parts, body.take());
            // The deadline counts from arrival (and costs no clock read).
            match tokio::time::timeout_at((arrived + routes.timeout).into(), sent).await {
                Err(_) => {
                    backend.metrics.timeout();
                    backend.metrics.observe(504, arrived.elapsed());
                    return local(
                        StatusCode::GATEWAY_TIMEOUT,
                        &format!(
                            "instance {} did not answer within {}\n",
                            backend.instance,
                            humantime::format_duration(routes.timeout)
                        ),
                    );
                }
                Ok(Err(UpstreamError::Connect(e))) => {
                    let retried = attempt + 1 < attempts;
                    backend.metrics.connect_error(retried);
                    if !retried {
                        backend.metrics.observe(502, arrived.elapsed());
                    }
                    last = Some(format!(
                        "instance {} could not be reached: {e}\n",
                        backend.instance
                    ));
                    continue;
                }
                Ok(Err(UpstreamError::Request(e))) => {
                    backend.metrics.observe(502, arrived.elapsed());
                    return local(
                        StatusCode::BAD_GATEWAY,
                        &format!("instance {} failed the request: {e}\n", backend.instance),
                    );
                }
                Ok(Ok(resp)) => {
                    backend
                        .metrics
                        .observe(resp.status().as_u16(), arrived.elapsed());
                    let (mut parts, body) = resp.into_parts();
                    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
                        let (Some(client_up), Some((mut upstream, early))) =
                            (client_upgrade, body.into_upgraded())
                        else {
                            return local(
                                StatusCode::BAD_GATEWAY,
                                "an upgrade the client did not ask for\n",
                            );
                        };
                        tokio::spawn(async move {
                            let _guard = guard;
                            if let Ok(client) = client_up.await {
                                let mut client = TokioIo::new(client);
                                use tokio::io::AsyncWriteExt;
                                // What the instance sent right after its 101.
                                if client.write_all(&early).await.is_ok() {
                                    let _ =
                                        tokio::io::copy_bidirectional(&mut client, &mut upstream)
                                            .await;
                                }
                            }
                        });
                        return Response::from_parts(parts, empty());
                    }
                    strip_hop_by_hop(&mut parts.headers, false);
                    // Let the rest of this pass of the thread's tasks run
                    // first: the responses ready in one pass then go out back
                    // to back, and a client's event loop reads several per
                    // wakeup instead of one (wrk's epoll_waits per request
                    // fell from ~1.0 to ~0.7; HAProxy batches its sends too).
                    tokio::task::yield_now().await;
                    if let Some(cookie) = set_cookie {
                        parts.headers.append(header::SET_COOKIE, cookie);
                    }
                    return Response::from_parts(
                        parts,
                        ProxyBody {
                            body,
                            _guard: Some(guard),
                        },
                    );
                }
            }
        }
        local(
            StatusCode::BAD_GATEWAY,
            last.as_deref().unwrap_or("no instance could be reached\n"),
        )
    }
}

type Upstream = Arc<Pool>;

/// A listener served thread-per-core: each thread has its own SO_REUSEPORT
/// socket (the kernel spreads connections), its own current-thread runtime
/// and its own upstream pool, so a request never hops between threads.
/// (On a shared multi-thread runtime, ~40% of the router's CPU went to
/// waking tasks across threads.)
struct Workers {
    stop: tokio::sync::watch::Sender<bool>,
}

impl Workers {
    fn start(router: Arc<Router>, key: RouteKey, addr: SocketAddr) -> std::io::Result<Self> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        for i in 0..n {
            let (bound_tx, bound_rx) = std::sync::mpsc::channel();
            let router = router.clone();
            let key = key.clone();
            let mut stopped = stopped.clone();
            std::thread::Builder::new()
                .name(format!("kiln-router-{i}"))
                .spawn(move || {
                    crate::metrics::use_shard(i + 1);
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = bound_tx.send(Err(e));
                            return;
                        }
                    };
                    rt.block_on(async move {
                        let socket = match bind(addr) {
                            Ok(l) => l,
                            Err(e) => {
                                let _ = bound_tx.send(Err(e));
                                return;
                            }
                        };
                        let _ = bound_tx.send(Ok(()));
                        tokio::select! {
                            _ = router.accept_loop(socket, key, Upstream::default()) => {}
                            _ = stopped.wait_for(|s| *s) => {}
                        }
                    });
                })?;
            // The first bind tells whether the address is free; the others
            // share it through SO_REUSEPORT.
            match bound_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let _ = stop.send(true);
                    return Err(e);
                }
                Err(_) => {
                    let _ = stop.send(true);
                    return Err(std::io::Error::other("router thread ended"));
                }
            }
        }
        Ok(Self { stop })
    }

    fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseport(true)?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

fn empty() -> ProxyBody {
    ProxyBody {
        body: UpBody::Full(None),
        _guard: None,
    }
}

fn local(status: StatusCode, msg: &str) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody {
        body: UpBody::Full(Some(Bytes::from(msg.to_owned()))),
        _guard: None,
    });
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r.headers_mut().insert(
        HeaderName::from_static("x-kiln-router"),
        HeaderValue::from_static("1"),
    );
    r
}

fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Hop-by-hop headers belong to one connection, not to the request
/// (RFC 9110 §7.6.1); an upgrade keeps `Connection` and `Upgrade`.
fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none: one pass over the names instead of a
    // lookup per hop-by-hop name.
    const HOP: [&str; 7] = [
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "proxy-authenticate",
        "proxy-authorization",
    ];
    if !h
        .keys()
        .any(|k| k == header::CONNECTION || k == header::UPGRADE || HOP.contains(&k.as_str()))
    {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .filter(|n| !(upgrade && (n == header::UPGRADE)))
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP {
        h.remove(n);
    }
    if !upgrade {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

/// Decrements a gauge when dropped (an open connection).
struct Gauge(Arc<std::sync::atomic::AtomicI64>);

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a request as in flight from dispatch until dropped.
struct Inflight(Arc<crate::metrics::InFlight>, usize);

impl Inflight {
    fn new(c: Arc<crate::metrics::InFlight>) -> Self {
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

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn no_ready_instance_is_503_and_an_unreachable_one_502() {
        let r = Router::new();
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
                port,
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
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-app"));
    }

    #[test]
    fn a_swap_replaces_one_service_and_keeps_the_others() {
        let r = Router::new();
        let a = RouteKey::Service(ServiceName::try_from("a").unwrap());
        let b = RouteKey::Service(ServiceName::try_from("b").unwrap());
        let backend = |port| {
            Arc::new(Backend::new(
                format!("i{port}"),
                1,
                port,
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
        assert_eq!(after.services[&b].backends[0].port, 2);
    }

    fn backend(port: u16, revision: u64) -> Arc<Backend> {
        Arc::new(Backend::new(
            format!("i{port}"),
            revision,
            port,
            Arc::default(),
            Arc::default(),
        ))
    }

    fn cookie(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn a_sticky_cookie_is_read_only_when_well_formed_and_current() {
        let name = "kiln-canary-web";
        assert_eq!(
            sticky_bucket(&cookie("kiln-canary-web=7.42"), name, 7),
            Some(42)
        );
        assert_eq!(
            sticky_bucket(&cookie("a=b; kiln-canary-web=7.0; c=d"), name, 7),
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
            assert_eq!(sticky_bucket(&cookie(bad), name, 7), None, "{bad}");
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
        let empty = HeaderMap::new();
        let n = 10_000;
        let mut canary = 0;
        for _ in 0..n {
            let (side, set) = routes.choose(&empty);
            assert!(set.is_some(), "a client without a cookie gets one");
            canary += usize::from(side[0].revision == 2);
        }
        // sd of the share is 0.004: ±0.03 fails only on a real bias.
        let share = canary as f64 / f64::from(n);
        assert!((share - 0.2).abs() < 0.03, "{share}");
        // A bucket below the weight is the canary's, at or above stable's.
        let (side, set) = routes.choose(&cookie("kiln-canary-web=2.19"));
        assert_eq!((side[0].revision, set), (2, None));
        let (side, _) = routes.choose(&cookie("kiln-canary-web=2.20"));
        assert_eq!(side[0].revision, 1);
        // A canary with nothing ready, or no canary: all to stable.
        let none_ready = ServiceRoutes::new(vec![backend(1, 1)], Duration::from_secs(1))
            .with_canary(Vec::new(), 2, 50, None);
        assert!((0..100).all(|_| none_ready.choose(&empty).0[0].revision == 1));
        let full = ServiceRoutes::new(vec![backend(1, 1)], Duration::from_secs(1)).with_canary(
            vec![backend(2, 2)],
            2,
            100,
            None,
        );
        assert!((0..100).all(|_| full.choose(&empty).0[0].revision == 2));
    }
}
