//! The router's HTTP/1.1 server side: one task per client connection reads
//! each request, sends it to an instance through [`crate::upstream`] and
//! writes the response back.
//!
//! A request head is parsed in place (httparse) and written straight into
//! the instance's request head, hop-by-hop headers left out and
//! `X-Forwarded-*` added; the instance's response head goes back the same
//! way. No header map is built and nothing crosses to another task: under
//! load `perf` showed hyper's server (its dispatcher and the header maps of
//! both messages) as the largest part of the router's user time once the
//! client side was kiln's own.
//!
//! Bodies are framed per hop (RFC 9112 §6): a request body is read as its
//! client framed it and sent with its length, or chunked; a response body of
//! unknown length is chunked to an HTTP/1.1 client and close-delimited to an
//! HTTP/1.0 one.

use std::io::{self, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use hyper::StatusCode;
use hyper::body::{Body, Frame};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::router::{Inflight, RouteKey, Router, ServiceRoutes, Side};
use crate::upstream::{Outgoing, Pool, UpBody, UpHead, UpstreamError};
use crate::wire::{self, Decoder, Framing, MAX_HEAD, MAX_HEADERS, Step};

/// A body at most this large is copied behind its head into one write.
const COALESCE: usize = 16 * 1024;

/// A request head must come whole within this of the connection opening or
/// of the previous response: an idle keep-alive connection is then closed,
/// and a head still arriving gets 408 (nginx's `client_header_timeout` and
/// HAProxy's `timeout http-request` are of this kind).
pub(crate) const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// One client connection.
pub(crate) struct Client {
    router: Arc<Router>,
    service: RouteKey,
    pool: Arc<Pool>,
    /// The client's address, as `X-Forwarded-For` gets it.
    peer_ip: String,
    io: TcpStream,
    /// Read from the client and not used yet (pipelined requests wait here).
    buf: BytesMut,
    /// The request head for the instance, and what goes to the client:
    /// kept between requests so that neither allocates.
    up: Vec<u8>,
    out: Vec<u8>,
    head_timeout: std::time::Duration,
}

/// A request turned away before any instance saw it.
struct Reject(StatusCode, String);

/// What the router needs to know of a request once its head is parsed and
/// the instance's head is written.
struct Prepared {
    /// The length of the client's head.
    len: usize,
    head_method: bool,
    idempotent: bool,
    /// The client keeps the connection open after the response.
    keep_alive: bool,
    version10: bool,
    body: Framing,
    expect_continue: bool,
    upgrade: bool,
    /// `up` holds the head up to here; without `Host`, each attempt adds
    /// its instance's.
    head_len: usize,
    has_host: bool,
    side: Side,
    set_cookie: Option<String>,
}

impl Client {
    pub(crate) fn new(
        router: Arc<Router>,
        service: RouteKey,
        pool: Arc<Pool>,
        io: TcpStream,
        peer_ip: String,
    ) -> Self {
        Self {
            router,
            service,
            pool,
            peer_ip,
            io,
            buf: BytesMut::with_capacity(4096),
            up: Vec::with_capacity(512),
            out: Vec::with_capacity(512),
            head_timeout: HEAD_TIMEOUT,
        }
    }

    /// Serve the connection's requests until it closes or must be closed.
    pub(crate) async fn serve(mut self) {
        while self.exchange().await {}
    }

    /// Read one request, proxy it and answer it; whether the connection
    /// goes on.
    async fn exchange(&mut self) -> bool {
        let mut waiting = None;
        let (parsed, routes) = loop {
            if !self.buf.is_empty() {
                // The snapshot current when the request has come whole (not
                // when an idle connection began to wait for it).
                let routes = self.router.routes(&self.service);
                match prepare(&self.buf, &mut self.up, routes.as_deref(), &self.peer_ip) {
                    Ok(Some(p)) => break (p, routes),
                    Ok(None) => {}
                    Err(Reject(status, msg)) => {
                        return self.local(status, &msg, false, false).await;
                    }
                }
            }
            if self.buf.len() > MAX_HEAD {
                let msg = format!("request head larger than {MAX_HEAD} bytes\n");
                return self
                    .local(
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        &msg,
                        false,
                        false,
                    )
                    .await;
            }
            // The end of the stream (between requests, or in a head) ends
            // the connection. (A read that is ready never arms the timer.)
            let deadline = *waiting.get_or_insert_with(|| Instant::now() + self.head_timeout);
            let read = wire::read_buf(&mut self.io, &mut self.buf);
            match tokio::time::timeout_at(deadline.into(), read).await {
                Ok(Ok(1..)) => {}
                Ok(_) => return false,
                Err(_) if self.buf.is_empty() => return false,
                Err(_) => {
                    let msg = format!(
                        "request head not received within {}\n",
                        humantime::format_duration(self.head_timeout)
                    );
                    return self
                        .local(StatusCode::REQUEST_TIMEOUT, &msg, false, false)
                        .await;
                }
            }
        };
        let arrived = Instant::now();
        let _ = self.buf.split_to(parsed.len);
        // A body left unread in the connection ends it after the answer.
        let keep = parsed.keep_alive && parsed.body == Framing::Empty;
        let (backends, timeout) = match routes.as_deref() {
            Some(r) if !r.side(parsed.side).is_empty() => (r.side(parsed.side), r.timeout),
            r => {
                let msg = match r {
                    None => format!("no routes for {}\n", self.service),
                    Some(_) => format!("no ready instance of {}\n", self.service),
                };
                return self
                    .local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &msg,
                        keep,
                        parsed.version10,
                    )
                    .await;
            }
        };
        if parsed.expect_continue
            && parsed.body != Framing::Empty
            && self
                .io
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            return false;
        }
        let mut decoder = Decoder::new(parsed.body);
        // A request without a body can be sent again to another instance
        // if the first could not be connected to: nothing reached it.
        let bodyless = parsed.body == Framing::Empty;
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
            self.up.truncate(parsed.head_len);
            if !parsed.has_host {
                self.up.extend_from_slice(b"host: ");
                self.up.extend_from_slice(backend.host.as_bytes());
                self.up.extend_from_slice(b"\r\n");
            }
            self.up.extend_from_slice(b"\r\n");
            let guard = Inflight::new(backend.inflight.clone());
            let out = Outgoing {
                head: &self.up,
                head_method: parsed.head_method,
                idempotent: parsed.idempotent,
                upgrade: parsed.upgrade,
                chunked: matches!(parsed.body, Framing::Chunked(_)),
            };
            let body = (!bodyless).then_some(ClientBody {
                io: &mut self.io,
                buf: &mut self.buf,
                decoder: &mut decoder,
            });
            let sent = self.pool.send(backend.port, &out, body);
            // The deadline counts from arrival (and costs no clock read).
            let resp = match tokio::time::timeout_at((arrived + timeout).into(), sent).await {
                Err(_) => {
                    backend.metrics.timeout();
                    backend.metrics.observe(504, arrived.elapsed());
                    let msg = format!(
                        "instance {} did not answer within {}\n",
                        backend.instance,
                        humantime::format_duration(timeout)
                    );
                    let keep = parsed.keep_alive && decoder.is_done();
                    return self
                        .local(StatusCode::GATEWAY_TIMEOUT, &msg, keep, parsed.version10)
                        .await;
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
                    let msg = format!("instance {} failed the request: {e}\n", backend.instance);
                    let keep = parsed.keep_alive && decoder.is_done();
                    return self
                        .local(StatusCode::BAD_GATEWAY, &msg, keep, parsed.version10)
                        .await;
                }
                Ok(Ok(resp)) => resp,
            };
            backend.metrics.observe(resp.head.status, arrived.elapsed());
            if resp.head.status == 101 {
                return self.splice(&resp.head, resp.body, guard).await;
            }
            // Let the rest of this pass of the thread's tasks run first: the
            // responses ready in one pass then go out back to back, and a
            // client's event loop reads several per wakeup instead of one
            // (wrk's epoll_waits per request fell from ~1.0 to ~0.7; HAProxy
            // batches its sends too).
            tokio::task::yield_now().await;
            let keep = parsed.keep_alive && decoder.is_done();
            let keep = self.respond(&parsed, resp.head, resp.body, keep).await;
            drop(guard);
            return keep;
        }
        let msg = last.unwrap_or_else(|| "no instance could be reached\n".to_owned());
        self.local(StatusCode::BAD_GATEWAY, &msg, keep, parsed.version10)
            .await
    }

    /// Write an instance's response to the client; whether the connection
    /// goes on.
    async fn respond(
        &mut self,
        req: &Prepared,
        head: UpHead,
        mut body: UpBody,
        keep: bool,
    ) -> bool {
        // A body of unknown length is chunked to an HTTP/1.1 client; an
        // HTTP/1.0 one reads it to the end of the connection.
        let unknown = matches!(head.framing, Framing::Chunked(_) | Framing::Eof);
        let chunked = unknown && !req.version10;
        let keep = keep && !(unknown && req.version10);
        self.out.clear();
        encode_response(&mut self.out, &head, false);
        if chunked {
            self.out
                .extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        connection(&mut self.out, keep, req.version10);
        if let Some(cookie) = &req.set_cookie {
            self.out.extend_from_slice(b"set-cookie: ");
            self.out.extend_from_slice(cookie.as_bytes());
            self.out.extend_from_slice(b"\r\n");
        }
        self.out.extend_from_slice(b"\r\n");
        if let UpBody::Full(full) = &body {
            // Only a body of known length comes whole with its head.
            let full = full.as_deref().unwrap_or_default();
            if full.len() <= COALESCE {
                self.out.extend_from_slice(full);
                return self.io.write_all(&self.out).await.is_ok() && keep;
            }
            return self.io.write_all(&self.out).await.is_ok()
                && self.io.write_all(full).await.is_ok()
                && keep;
        }
        if self.io.write_all(&self.out).await.is_err() {
            return false;
        }
        loop {
            let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
            let data = match frame {
                None => break,
                // A body cut short cannot be told to the client but by
                // closing before its end.
                Some(Err(_)) => return false,
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(d) if !d.is_empty() => d,
                    _ => continue,
                },
            };
            let sent = if chunked {
                self.out.clear();
                wire::chunk_size_line(&mut self.out, data.len());
                if data.len() <= COALESCE {
                    self.out.extend_from_slice(&data);
                    self.out.extend_from_slice(b"\r\n");
                    self.io.write_all(&self.out).await
                } else {
                    match self.io.write_all(&self.out).await {
                        Ok(()) => match self.io.write_all(&data).await {
                            Ok(()) => self.io.write_all(b"\r\n").await,
                            e => e,
                        },
                        e => e,
                    }
                }
            } else {
                self.io.write_all(&data).await
            };
            if sent.is_err() {
                return false;
            }
        }
        if chunked && self.io.write_all(b"0\r\n\r\n").await.is_err() {
            return false;
        }
        keep
    }

    /// A 101: the client and the instance speak the new protocol to each
    /// other, through this task, until either closes.
    async fn splice(&mut self, head: &UpHead, body: UpBody, guard: Inflight) -> bool {
        let Some((mut upstream, early)) = body.into_upgraded() else {
            return false;
        };
        self.out.clear();
        encode_response(&mut self.out, head, true);
        self.out.extend_from_slice(b"\r\n");
        // What each side sent right after the handshake goes first.
        let ok = self.io.write_all(&self.out).await.is_ok()
            && self.io.write_all(&early).await.is_ok()
            && upstream.write_all(&self.buf).await.is_ok();
        if ok {
            self.buf.clear();
            let _ = tokio::io::copy_bidirectional(&mut self.io, &mut upstream).await;
        }
        drop(guard);
        false
    }

    /// The router's own answer; whether the connection goes on.
    async fn local(&mut self, status: StatusCode, msg: &str, keep: bool, version10: bool) -> bool {
        self.out.clear();
        let _ = write!(
            self.out,
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain\r\nx-kiln-router: 1\r\ncontent-length: {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or_default(),
            msg.len()
        );
        connection(&mut self.out, keep, version10);
        self.out.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(msg.as_bytes());
        self.io.write_all(&self.out).await.is_ok() && keep
    }
}

thread_local! {
    static ROUND_ROBIN: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// `Connection` for the client when the default does not say it: `close`
/// when this response ends the connection, `keep-alive` to an HTTP/1.0
/// client that asked to keep it.
fn connection(out: &mut Vec<u8>, keep: bool, version10: bool) {
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
}

/// Parse a request head at the front of `buf` and write the instance's
/// head into `up` (all but `Host` when the client sent none, and the final
/// empty line). `None` while the head is incomplete.
fn prepare(
    buf: &[u8],
    up: &mut Vec<u8>,
    routes: Option<&ServiceRoutes>,
    peer_ip: &str,
) -> Result<Option<Prepared>, Reject> {
    let bad = |msg: String| Reject(StatusCode::BAD_REQUEST, msg);
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Reject(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("more than {MAX_HEADERS} request headers\n"),
            ));
        }
        Err(e) => return Err(bad(format!("malformed request: {e}\n"))),
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(bad("malformed request\n".to_owned()));
    };
    if method == "CONNECT" {
        return Err(Reject(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported\n".to_owned(),
        ));
    }
    let version10 = minor == 0;
    let declared = wire::declared(req.headers).map_err(|e| bad(format!("{e}\n")))?;
    // RFC 9112 §6.1, §6.3: a request's body is chunked or has a length;
    // both at once is how requests are smuggled, and is refused.
    let body = match declared {
        wire::Declared {
            transfer_chunked: Some(_),
            length: Some(_),
        } => return Err(bad("both transfer-encoding and content-length\n".to_owned())),
        wire::Declared {
            transfer_chunked: Some(true),
            ..
        } if !version10 => Framing::CHUNKED,
        wire::Declared {
            transfer_chunked: Some(_),
            ..
        } => return Err(bad("unsupported transfer-encoding\n".to_owned())),
        wire::Declared {
            length: Some(n), ..
        } if n > 0 => Framing::Length(n),
        _ => Framing::Empty,
    };
    let keep_alive = if version10 {
        wire::connection_has(req.headers, b"keep-alive")
    } else {
        !wire::connection_has(req.headers, b"close")
    };
    let has = |name: &str| {
        req.headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case(name))
    };
    let upgrade = has("upgrade") && wire::connection_has(req.headers, b"upgrade");
    let expect_continue = req.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("expect") && h.value.eq_ignore_ascii_case(b"100-continue")
    });
    let (side, set_cookie) = match routes {
        Some(r) => r.choose(
            req.headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
                .map(|h| h.value),
        ),
        None => (Side::Stable, None),
    };

    up.clear();
    up.extend_from_slice(method.as_bytes());
    up.push(b' ');
    push_origin_form(up, target.as_bytes());
    up.extend_from_slice(b" HTTP/1.1\r\n");
    let named = wire::connection_named(req.headers.iter().map(|h| (h.name, h.value)));
    let mut host = None;
    let mut forwarded_for = None;
    for h in req.headers.iter() {
        let n = h.name;
        if (wire::is_hop_by_hop(n) && !(upgrade && n.eq_ignore_ascii_case("upgrade")))
            || named.iter().any(|t| t.eq_ignore_ascii_case(n.as_bytes()))
            // 100-continue is answered here; the instance gets the body.
            || n.eq_ignore_ascii_case("expect") && expect_continue
            // The router's own replace the client's.
            || n.eq_ignore_ascii_case("x-forwarded-proto")
            || n.eq_ignore_ascii_case("x-forwarded-host")
        {
            continue;
        }
        if n.eq_ignore_ascii_case("x-forwarded-for") {
            // Earlier hops, then this client.
            forwarded_for.get_or_insert_with(Vec::new).push(h.value);
            continue;
        }
        if n.eq_ignore_ascii_case("host") {
            host = Some(h.value);
        }
        push_header(up, n.as_bytes(), h.value);
    }
    up.extend_from_slice(b"x-forwarded-for: ");
    for prev in forwarded_for.iter().flatten() {
        up.extend_from_slice(prev);
        up.extend_from_slice(b", ");
    }
    up.extend_from_slice(peer_ip.as_bytes());
    up.extend_from_slice(b"\r\nx-forwarded-proto: http\r\n");
    if let Some(h) = host {
        push_header(up, b"x-forwarded-host", h);
    }
    if matches!(body, Framing::Chunked(_)) {
        up.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if upgrade {
        up.extend_from_slice(b"connection: upgrade\r\n");
    }
    Ok(Some(Prepared {
        len,
        head_method: method == "HEAD",
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        ),
        keep_alive,
        version10,
        body,
        expect_continue,
        upgrade,
        head_len: up.len(),
        has_host: host.is_some(),
        side,
        set_cookie,
    }))
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The target in origin-form (path and query), whatever form the client
/// used: an absolute-form target's scheme and authority are dropped.
fn push_origin_form(up: &mut Vec<u8>, target: &[u8]) {
    let path = match target.windows(3).position(|w| w == b"://") {
        Some(i) if target[..i].iter().all(u8::is_ascii_alphabetic) => {
            let rest = &target[i + 3..];
            &rest[rest
                .iter()
                .position(|&b| b == b'/' || b == b'?')
                .unwrap_or(rest.len())..]
        }
        _ => target,
    };
    if !(path.starts_with(b"/") || path == b"*") {
        up.push(b'/');
    }
    up.extend_from_slice(path);
}

/// The status line and the end-to-end headers of an instance's response
/// (a 101 keeps `Connection` and `Upgrade`: they are its answer). The
/// caller adds framing, `Connection` and the empty line.
fn encode_response(out: &mut Vec<u8>, head: &UpHead, switching: bool) {
    let _ = write!(out, "HTTP/1.1 {} ", head.status);
    out.extend_from_slice(head.reason());
    out.extend_from_slice(b"\r\n");
    let named = wire::connection_named(head.headers());
    // A length beside a chunked encoding is not the body's (RFC 9112 §6.3).
    let drop_length = matches!(head.framing, Framing::Chunked(_) | Framing::Eof);
    for (n, v) in head.headers() {
        let keep = switching
            && (n.eq_ignore_ascii_case("connection") || n.eq_ignore_ascii_case("upgrade"));
        if !keep
            && (wire::is_hop_by_hop(n)
                || named.iter().any(|t| t.eq_ignore_ascii_case(n.as_bytes()))
                || drop_length && n.eq_ignore_ascii_case("content-length"))
        {
            continue;
        }
        push_header(out, n.as_bytes(), v);
    }
}

/// A request body, read from the client as the instance's side sends it.
struct ClientBody<'a> {
    io: &'a mut TcpStream,
    buf: &'a mut BytesMut,
    decoder: &'a mut Decoder,
}

impl Body for ClientBody<'_> {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            match this.decoder.step(this.buf) {
                Err(e) => {
                    return Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::InvalidData, e))));
                }
                Ok(Step::Data(d)) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                Ok(Step::End) => return Poll::Ready(None),
                Ok(Step::More) => match ready!(wire::poll_read_buf(this.io, cx, this.buf)) {
                    Ok(0) => {
                        return Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the client closed before the end of its request body",
                        ))));
                    }
                    Ok(_) => {}
                    Err(e) => return Poll::Ready(Some(Err(e))),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::{Backend, RouteKey};
    use crate::testing::{Act, answers_early, scripted};
    use kiln_core::spec::ServiceName;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    const TOO_LARGE: &[u8] = b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 8\r\n\r\ntoo big!";

    /// A router listening on a free port, routing to the instance on `to`.
    async fn router_to(to: u16) -> (Arc<Router>, u16) {
        let router = Router::new();
        let svc = RouteKey::Service(ServiceName::try_from("web").unwrap());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        router
            .listen(&svc, ([127, 0, 0, 1], port).into())
            .await
            .unwrap();
        let backend = Backend::new("i1".into(), 1, to, Arc::default(), Arc::default());
        router.set_routes(
            &svc,
            ServiceRoutes::new(vec![Arc::new(backend)], Duration::from_secs(5)),
        );
        (router, port)
    }

    /// Send `bytes` on a new connection and read until the router closes it.
    async fn converse(port: u16, bytes: &[u8]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(bytes).await.unwrap();
        read_to_close(&mut s).await
    }

    async fn read_to_close(s: &mut TcpStream) -> String {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("the router closed the connection within 10 s")
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    fn seen(requests: &std::sync::Mutex<Vec<Vec<u8>>>) -> Vec<String> {
        let r = requests.lock().unwrap();
        r.iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn the_instance_gets_an_origin_form_head_with_forwarding_and_no_hop_by_hop_headers() {
        let (to, _, requests) = scripted(vec![Act::Answer(OK), Act::Answer(OK)]).await;
        let (router, port) = router_to(to).await;
        // Two pipelined requests in one write; the second is HTTP/1.0
        // without Host or keep-alive, so the connection ends after it.
        let out = converse(
            port,
            b"GET http://example.com/a?b=1 HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Secret\r\n\
              X-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nX-Forwarded-For: 10.0.0.1\r\n\
              X-Forwarded-Proto: https\r\nX-App: kept\r\n\r\n\
              GET /two HTTP/1.0\r\n\r\n",
        )
        .await;
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok\
             HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
        );
        assert_eq!(
            seen(&requests),
            [
                "GET /a?b=1 HTTP/1.1\r\nHost: h\r\nX-App: kept\r\nx-forwarded-for: 10.0.0.1, 127.0.0.1\r\n\
                 x-forwarded-proto: http\r\nx-forwarded-host: h\r\n\r\n"
                    .to_owned(),
                format!(
                    "GET /two HTTP/1.1\r\nx-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\n\
                     host: 127.0.0.1:{to}\r\n\r\n"
                ),
            ]
        );
        router.close().await;
    }

    #[tokio::test]
    async fn a_request_on_an_idle_connection_follows_the_routes_of_its_arrival() {
        let (a, _, seen_a) = scripted(vec![Act::Answer(OK)]).await;
        let (b, _, seen_b) = scripted(vec![Act::Answer(OK)]).await;
        let (router, port) = router_to(a).await;
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(b"GET /1 HTTP/1.1\r\nhost: h\r\n\r\n")
            .await
            .unwrap();
        let mut first = vec![0u8; OK.len()];
        s.read_exact(&mut first).await.unwrap();
        // The connection now waits for its next request; the routes move.
        let svc = RouteKey::Service(ServiceName::try_from("web").unwrap());
        let backend = Backend::new("i2".into(), 2, b, Arc::default(), Arc::default());
        router.set_routes(
            &svc,
            ServiceRoutes::new(vec![Arc::new(backend)], Duration::from_secs(5)),
        );
        s.write_all(b"GET /2 HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        assert!(read_to_close(&mut s).await.starts_with("HTTP/1.1 200 "));
        assert_eq!((seen(&seen_a).len(), seen(&seen_b).len()), (1, 1));
        assert!(seen(&seen_b)[0].starts_with("GET /2 "));
        router.close().await;
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_is_chunked_to_http11_and_close_delimited_to_http10() {
        let chunked: &[u8] = b"HTTP/1.1 200 OK\r\nConnection: X-Internal\r\nX-Internal: 1\r\n\
            Keep-Alive: timeout=5\r\ntransfer-encoding: chunked\r\ncontent-length: 99\r\n\
            x-app: kept\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let (to, _, _) = scripted(vec![
            Act::Answer(chunked),
            Act::Answer(chunked),
            Act::AnswerClose(b"HTTP/1.1 200 OK\r\n\r\nuntil the end"),
        ])
        .await;
        let (router, port) = router_to(to).await;
        // Hop-by-hop headers (and those Connection names) stay behind, and
        // the length beside a chunked encoding is not the body's.
        let out = converse(
            port,
            b"GET / HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nx-app: kept\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
             5\r\nhello\r\n0\r\n\r\n"
        );
        let out = converse(port, b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n").await;
        assert_eq!(
            out, "HTTP/1.1 200 OK\r\nx-app: kept\r\nconnection: close\r\n\r\nhello",
            "an HTTP/1.0 client reads to the end of the connection, keep-alive or not"
        );
        // A close-delimited body goes out chunked: the client's connection
        // outlives the instance's.
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: h\r\n\r\n")
            .await
            .unwrap();
        let mut got = BytesMut::new();
        let end = loop {
            if let Some(i) = got.windows(5).position(|w| w == b"0\r\n\r\n") {
                break i + 5;
            }
            let n = tokio::time::timeout(Duration::from_secs(10), s.read_buf(&mut got))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "the connection stays open: {got:?}");
        };
        let text = String::from_utf8_lossy(&got[..end]).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert_eq!(head, "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked");
        let mut decoder = Decoder::new(Framing::CHUNKED);
        let mut wire = BytesMut::from(body.as_bytes());
        let mut decoded = Vec::new();
        while let Step::Data(d) = decoder.step(&mut wire).unwrap() {
            decoded.extend_from_slice(&d);
        }
        assert_eq!(decoded, b"until the end");
        router.close().await;
    }

    #[tokio::test]
    async fn expect_100_continue_is_answered_and_a_chunked_body_goes_through() {
        let (to, _, requests) = scripted(vec![Act::Answer(OK)]).await;
        let (router, port) = router_to(to).await;
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(
            b"POST /up HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\
              Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut interim = [0u8; 25];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut interim))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            read_to_close(&mut s).await,
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
        );
        assert_eq!(
            seen(&requests),
            [
                "POST /up HTTP/1.1\r\nHost: h\r\nx-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\n\
              x-forwarded-host: h\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            ]
        );
        router.close().await;
    }

    #[tokio::test]
    async fn an_early_answer_to_an_upload_reaches_the_client() {
        let to = answers_early(TOO_LARGE).await;
        let (router, port) = router_to(to).await;
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (mut rd, mut wr) = s.into_split();
        // The client goes on sending its 64 MiB while the answer comes.
        let upload = tokio::spawn(async move {
            wr.write_all(b"POST /up HTTP/1.1\r\nhost: h\r\ncontent-length: 67108864\r\n\r\n")
                .await?;
            let chunk = vec![b'k'; 1 << 20];
            for _ in 0..64 {
                wr.write_all(&chunk).await?;
            }
            Ok::<_, io::Error>(())
        });
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut got)).await;
        let got = String::from_utf8_lossy(&got);
        assert!(
            got.starts_with("HTTP/1.1 413 ")
                && got.contains("connection: close")
                && got.ends_with("too big!"),
            "{got:?}"
        );
        upload.abort();
        router.close().await;
    }

    #[tokio::test]
    async fn a_head_late_gets_408_and_an_idle_connection_is_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new();
        let svc = RouteKey::Service(ServiceName::try_from("web").unwrap());
        let serve = |io| {
            let mut c = Client::new(
                router.clone(),
                svc.clone(),
                Arc::default(),
                io,
                "127.0.0.1".into(),
            );
            c.head_timeout = Duration::from_millis(200);
            tokio::spawn(c.serve());
        };
        let mut partial = TcpStream::connect(addr).await.unwrap();
        serve(listener.accept().await.unwrap().0);
        partial
            .write_all(b"GET / HTTP/1.1\r\nhost: h\r\n")
            .await
            .unwrap();
        let out = read_to_close(&mut partial).await;
        assert!(
            out.starts_with("HTTP/1.1 408 ") && out.ends_with("within 200ms\n"),
            "{out}"
        );
        let mut idle = TcpStream::connect(addr).await.unwrap();
        serve(listener.accept().await.unwrap().0);
        assert_eq!(read_to_close(&mut idle).await, "", "closed without a word");
    }

    #[tokio::test]
    async fn a_request_framed_ambiguously_or_unsupported_is_refused_and_the_connection_closed() {
        let (to, accepted, _) = scripted(Vec::new()).await;
        let (router, port) = router_to(to).await;
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        for (req, status) in [
            (
                "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                "400",
            ),
            (
                "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 6\r\n\r\n",
                "400",
            ),
            (
                "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n",
                "400",
            ),
            (
                "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                "400",
            ),
            ("GET /\x01 HTTP/1.1\r\nHost: h\r\n\r\n", "400"),
            ("CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", "405"),
            (&format!("GET / HTTP/1.1\r\n{many}\r\n"), "431"),
        ] {
            let out = converse(port, req.as_bytes()).await;
            assert!(
                out.starts_with(&format!("HTTP/1.1 {status} "))
                    && out.contains("connection: close"),
                "{req:?}: {out}"
            );
        }
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "none reached the instance"
        );
        router.close().await;
    }
}
