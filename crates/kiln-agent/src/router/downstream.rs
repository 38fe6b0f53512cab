//! The router's HTTP/1.1 server side: one task per client connection reads
//! each request, sends it to an instance through [`crate::router::upstream`] and
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

use crate::router::forward::{self, ClientError, ClientWait};
use crate::router::routes::{
    Gate, GateError, Inflight, MAX_WAITING, RouteKey, RouteSource, RouteTable, ServiceRoutes, Side,
};
use crate::router::upstream::{Pool, UpBody, UpHead};
use crate::router::wire::{self, Coding, Decoder, Framing, MAX_HEAD, MAX_HEADERS, Step};
use kiln_core::service::{BackendProtocol, RouterSpec};

/// A body at most this large is copied behind its head into one write.
const COALESCE: usize = 16 * 1024;

/// A request head must come whole within this of the connection opening or
/// of the previous response: an idle keep-alive connection is then closed,
/// and a head still arriving gets 408 (nginx's `client_header_timeout` and
/// HAProxy's `timeout http-request` are of this kind).
pub(crate) const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The most an HTTP/1.1 request body to an h2c instance may be: it is
/// read whole before it is sent (beyond, 413).
const H2C_BUFFERED: u64 = 16 * 1024 * 1024;

/// A whole body as an h2c instance takes it.
fn boxed(b: Bytes) -> crate::router::upstream::H2Out {
    use http_body_util::BodyExt;
    http_body_util::Full::new(b)
        .map_err(|never| match never {})
        .boxed()
}

/// Look at a new connection's first bytes without reading them, until
/// `decide` can tell (`None` while it needs more): at most `N` bytes,
/// within the head timeout. `None` when the peer closed, sent nothing in
/// time, or `N` bytes did not decide.
pub(crate) async fn peek_first<T, const N: usize>(
    stream: &tokio::net::TcpStream,
    decide: impl Fn(&[u8]) -> Option<T>,
) -> Option<T> {
    let mut buf = [0u8; N];
    let deadline = Instant::now() + HEAD_TIMEOUT;
    loop {
        let n = match tokio::time::timeout_at(deadline.into(), stream.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return None,
        };
        if let Some(decided) = decide(&buf[..n]) {
            return Some(decided);
        }
        if n == N {
            return None;
        }
        // It came in pieces: a peek returns at once while any byte is
        // unread, so wait a little for the rest.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// What a client connection runs over: TCP, or TLS over TCP. Generic, not
/// boxed: the plain path compiles to what it was before TLS existed.
pub(crate) trait Stream:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send
{
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for S {}

/// One client connection.
pub(crate) struct Client<S> {
    /// The router's table, read once per request.
    routes: RouteSource,
    /// The listener's address: its routes in the table.
    listener: std::net::SocketAddr,
    pool: Arc<Pool>,
    /// The client's address, as `X-Forwarded-For` gets it.
    peer_ip: String,
    /// Whether the client came over TLS (`X-Forwarded-Proto`, HSTS).
    tls: bool,
    io: S,
    /// Read from the client and not used yet (pipelined requests wait here).
    buf: BytesMut,
    /// The request head for the instance, and what goes to the client:
    /// kept between requests so that neither allocates.
    up: Vec<u8>,
    out: Vec<u8>,
    head_timeout: std::time::Duration,
    /// The listener's count of the answers the router gives itself.
    answers: Arc<crate::router::metrics::Answers>,
    /// The current request's service's send timeout (its router's own
    /// answers use it too).
    send_timeout: std::time::Duration,
}

/// A request turned away before any instance saw it.
pub(crate) struct Reject(pub(crate) StatusCode, pub(crate) String);

/// What the router needs to know of a request once its head is parsed and
/// the instance's head is written.
pub(crate) struct Prepared {
    /// The length of the client's head.
    pub(crate) len: usize,
    pub(crate) head_method: bool,
    pub(crate) idempotent: bool,
    /// The client keeps the connection open after the response.
    pub(crate) keep_alive: bool,
    version10: bool,
    pub(crate) body: Framing,
    pub(crate) expect_continue: bool,
    pub(crate) upgrade: bool,
    /// `up` holds the head up to here; without `Host`, each attempt adds
    /// its instance's.
    pub(crate) head_len: usize,
    pub(crate) has_host: bool,
    pub(crate) side: Side,
    pub(crate) set_cookie: Option<String>,
    /// The service its host and path route to, or the router's answer
    /// when none can take it (no route, nothing ready; a redirect to HTTPS,
    /// whose message is the location).
    pub(crate) routes: Result<Arc<ServiceRoutes>, (StatusCode, String)>,
    /// `Strict-Transport-Security` for the response (over TLS only).
    pub(crate) hsts: Option<hyper::header::HeaderValue>,
    /// The service is paused: wait at its gate first.
    pub(crate) paused: Option<(Arc<Gate>, RouteKey)>,
    /// `X-Request-Id` as the instance got it.
    pub(crate) request_id: [u8; 32],
    /// For the access log, when the service keeps one.
    pub(crate) log: Option<Box<LogHead>>,
    /// The coding the client takes, when the service compresses.
    pub(crate) accept: Option<kiln_core::compress::Coding>,
    /// The service the request routes to, ready or not: its access log
    /// and its pages serve the router's own answers too.
    pub(crate) known: Option<Arc<ServiceRoutes>>,
}

impl<S: Stream> Client<S> {
    pub(crate) fn new(
        routes: RouteSource,
        listener: std::net::SocketAddr,
        pool: Arc<Pool>,
        (io, tls): (S, bool),
        peer_ip: String,
        answers: Arc<crate::router::metrics::Answers>,
    ) -> Self {
        Self {
            tls,
            answers,
            routes,
            listener,
            pool,
            peer_ip,
            io,
            buf: BytesMut::with_capacity(4096),
            up: Vec::with_capacity(512),
            out: Vec::with_capacity(512),
            head_timeout: HEAD_TIMEOUT,
            send_timeout: RouterSpec::default().send_timeout.0,
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
        let parsed = loop {
            if !self.buf.is_empty() {
                // The snapshot current when the request has come whole (not
                // when an idle connection began to wait for it).
                let table = self.routes.0.load();
                match prepare(
                    &self.buf,
                    &mut self.up,
                    (&table, &self.listener, self.tls),
                    &self.peer_ip,
                ) {
                    Ok(Some(p)) => break p,
                    Ok(None) => {}
                    Err(Reject(status, msg)) => {
                        return self.local(status, &msg, false, false).await;
                    }
                }
            }
            if self.buf.len() > MAX_HEAD {
                let Reject(status, msg) = head_too_large();
                return self.local(status, &msg, false, false).await;
            }
            // The end of the stream (between requests, or in a head) ends
            // the connection. (A read that is ready never arms the timer.)
            let deadline = *waiting.get_or_insert_with(|| Instant::now() + self.head_timeout);
            let idle = self.buf.is_empty();
            let read = wire::read_buf(&mut self.io, &mut self.buf);
            // A process handing over closes an idle connection once it has
            // stayed idle a while (a busy one ends after its exchange), but
            // never one whose next request has arrived meanwhile: the timer
            // and the request can be ready at once, and the request wins.
            let drained = self.routes.drained();
            let got = tokio::select! {
                biased;
                got = tokio::time::timeout_at(deadline.into(), read) => got,
                () = drained, if idle => match read_now(&mut self.io, &mut self.buf) {
                    Some(Ok(n)) if n > 0 => Ok(Ok(n)),
                    _ => return false,
                },
            };
            match got {
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
        // Handing over: this exchange is the connection's last.
        let mut parsed = parsed;
        parsed.keep_alive &= !self.routes.draining();
        // A body left unread in the connection ends it after the answer.
        let keep = parsed.keep_alive && parsed.body == Framing::Empty;
        if let Some((gate, key)) = parsed.paused.take() {
            parsed.routes = wait_at(&self.routes, &gate, &key).await;
        }
        let routes =
            match std::mem::replace(&mut parsed.routes, Err((StatusCode::OK, String::new()))) {
                Ok(r) => r,
                Err((StatusCode::PERMANENT_REDIRECT, location)) => {
                    return self.redirect(&location, keep, parsed.version10).await;
                }
                Err((status, msg)) => {
                    let me = (self.peer_ip.as_str(), "HTTP/1.1");
                    let body = own_answer(&parsed, me, status, &msg, arrived);
                    return self.local(status, body, keep, parsed.version10).await;
                }
            };
        let (backends, timeout, limits) = (routes.side(parsed.side), routes.timeout, routes.limits);
        self.send_timeout = limits.send_timeout.0;
        if let Some(msg) = forward::too_large(parsed.body, &limits) {
            // The body stays unread: the connection ends after the answer.
            let me = (self.peer_ip.as_str(), "HTTP/1.1");
            let status = StatusCode::PAYLOAD_TOO_LARGE;
            let body = own_answer(&parsed, me, status, &msg, arrived);
            return self.local(status, body, false, parsed.version10).await;
        }
        if parsed.expect_continue
            && parsed.body != Framing::Empty
            && !self.send(b"HTTP/1.1 100 Continue\r\n\r\n").await
        {
            return false;
        }
        let mut decoder = Decoder::new(parsed.body);
        // The time the request spent waiting for its client's body: it does
        // not count against the instance's timeout.
        let waited = ClientWait::new(arrived);
        let body = (parsed.body != Framing::Empty).then(|| ClientBody {
            io: &mut self.io,
            buf: &mut self.buf,
            decoder: &mut decoder,
            stall: limits.body_timeout.0,
            timer: None,
            waited: &waited,
            max: match limits.backend_protocol {
                BackendProtocol::Http1 => limits.max_body.unwrap_or(u64::MAX),
                BackendProtocol::H2c => limits.max_body.unwrap_or(u64::MAX).min(H2C_BUFFERED),
            },
            taken: 0,
        });
        let body = match limits.backend_protocol {
            BackendProtocol::Http1 => forward::Outbound::H1(body),
            // An h2c instance's body is sent from hyper's connection task,
            // which cannot borrow this connection: it is read whole first.
            BackendProtocol::H2c => match body {
                None => forward::Outbound::H2c(None),
                Some(b) => match http_body_util::BodyExt::collect(b).await {
                    Ok(all) => forward::Outbound::H2c(Some(boxed(all.to_bytes()))),
                    Err(e) => {
                        let (status, msg) = e.answer();
                        return self
                            .local(status, &format!("{msg}\n"), false, parsed.version10)
                            .await;
                    }
                },
            },
        };
        let req = forward::Request {
            up: &mut self.up,
            head_len: parsed.head_len,
            has_host: parsed.has_host,
            head_method: parsed.head_method,
            idempotent: parsed.idempotent,
            upgrade: parsed.upgrade,
            chunked: matches!(parsed.body, Framing::Chunked(_)),
        };
        let outcome =
            forward::forward(&self.pool, backends, (timeout, arrived, &waited), req, body).await;
        let (resp, backend, guard) = match outcome {
            forward::Outcome::Answered {
                resp,
                backend,
                guard,
            } => (resp, backend, guard),
            forward::Outcome::Local {
                status,
                msg,
                broken,
            } => {
                // A body left unread (or broken) ends the connection.
                let keep = !broken && parsed.keep_alive && decoder.is_done();
                let me = (self.peer_ip.as_str(), "HTTP/1.1");
                let body = own_answer(&parsed, me, status, &msg, arrived);
                return self.local(status, body, keep, parsed.version10).await;
            }
        };
        log_access(
            &parsed,
            (&self.peer_ip, "HTTP/1.1"),
            resp.head.status,
            Some(backend),
            arrived,
        );
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
        let keep = match self
            .respond(&parsed, resp.head, resp.body, keep, limits)
            .await
        {
            Ok(keep) => keep,
            Err(Cut::Client) => {
                backend.metrics.client_error();
                false
            }
            Err(Cut::Instance(stalled)) => {
                if stalled {
                    backend.metrics.timeout();
                }
                false
            }
        };
        drop(guard);
        keep
    }

    /// Write `bytes` to the client (see [`send_to`]).
    async fn send(&mut self, bytes: &[u8]) -> bool {
        send_to(&mut self.io, bytes, self.send_timeout).await
    }

    /// Write an instance's response to the client; whether the connection
    /// goes on, or who cut the response short.
    async fn respond(
        &mut self,
        req: &Prepared,
        head: UpHead,
        mut body: UpBody,
        keep: bool,
        limits: RouterSpec,
    ) -> Result<bool, Cut> {
        if let Some(coding) = crate::router::compress::coding_for(req.accept, &head) {
            return self
                .respond_compressed(req, head, body, (keep, coding), limits)
                .await;
        }
        let within = limits.send_timeout.0;
        self.out.clear();
        let (chunked, keep) = response_head(
            &mut self.out,
            &head,
            req.version10,
            keep,
            (req.set_cookie.as_deref(), req.hsts.as_ref()),
        );
        let io = &mut self.io;
        let client = |ok: bool| if ok { Ok(()) } else { Err(Cut::Client) };
        if let UpBody::Full(full) = &body {
            // Only a body of known length comes whole with its head.
            let full = full.as_deref().unwrap_or_default();
            if full.len() <= COALESCE {
                self.out.extend_from_slice(full);
                client(send_to(io, &self.out, within).await)?;
            } else {
                client(send_to(io, &self.out, within).await)?;
                client(send_to(io, full, within).await)?;
            }
            return Ok(keep);
        }
        client(send_to(io, &self.out, within).await)?;
        loop {
            // An instance that sends nothing for the read timeout is cut
            // off (nginx's `proxy_read_timeout`).
            let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx));
            let data = match tokio::time::timeout(limits.read_timeout.0, frame).await {
                Err(_) => return Err(Cut::Instance(true)),
                Ok(None) => break,
                // A body cut short cannot be told to the client but by
                // closing before its end.
                Ok(Some(Err(_))) => return Err(Cut::Instance(false)),
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(d) if !d.is_empty() => d,
                    _ => continue,
                },
            };
            if chunked {
                self.out.clear();
                wire::chunk_size_line(&mut self.out, data.len());
                if data.len() <= COALESCE {
                    self.out.extend_from_slice(&data);
                    self.out.extend_from_slice(b"\r\n");
                    client(send_to(io, &self.out, within).await)?;
                } else {
                    client(send_to(io, &self.out, within).await)?;
                    client(send_to(io, &data, within).await)?;
                    client(send_to(io, b"\r\n", within).await)?;
                }
            } else {
                client(send_to(io, &data, within).await)?;
            }
        }
        if chunked {
            client(send_to(io, b"0\r\n\r\n", within).await)?;
        }
        Ok(keep)
    }

    /// Write an instance's response compressed with `coding`: its length
    /// is then unknown (chunked to HTTP/1.1, to the connection's end to
    /// HTTP/1.0).
    async fn respond_compressed(
        &mut self,
        req: &Prepared,
        head: UpHead,
        mut body: UpBody,
        (keep, coding): (bool, kiln_core::compress::Coding),
        limits: RouterSpec,
    ) -> Result<bool, Cut> {
        let within = limits.send_timeout.0;
        let version10 = req.version10;
        let keep = keep && !version10;
        self.out.clear();
        encode_response(&mut self.out, &head, false);
        if !version10 {
            self.out
                .extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        connection(&mut self.out, keep, version10);
        push_header(&mut self.out, b"content-encoding", coding.name().as_bytes());
        self.out.extend_from_slice(b"vary: accept-encoding\r\n");
        router_fields(
            &mut self.out,
            (req.set_cookie.as_deref(), req.hsts.as_ref()),
        );
        self.out.extend_from_slice(b"\r\n");
        let client = |ok: bool| if ok { Ok(()) } else { Err(Cut::Client) };
        client(send_to(&mut self.io, &self.out, within).await)?;
        let mut encoder =
            Some(crate::router::compress::Encoder::new(coding).map_err(|_| Cut::Instance(false))?);
        while let Some(enc) = encoder.as_mut() {
            let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx));
            let data = match tokio::time::timeout(limits.read_timeout.0, frame).await {
                Err(_) => return Err(Cut::Instance(true)),
                Ok(Some(Err(_))) => return Err(Cut::Instance(false)),
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(d) if !d.is_empty() => enc.push(&d),
                    _ => continue,
                },
                // The end: what the encoder still holds.
                Ok(None) => match encoder.take() {
                    Some(enc) => enc.finish(),
                    None => break,
                },
            };
            let Ok(data) = data else {
                return Err(Cut::Instance(false));
            };
            if data.is_empty() {
                continue;
            }
            self.out.clear();
            if version10 {
                self.out.extend_from_slice(&data);
            } else {
                wire::chunk_size_line(&mut self.out, data.len());
                self.out.extend_from_slice(&data);
                self.out.extend_from_slice(b"\r\n");
            }
            client(send_to(&mut self.io, &self.out, within).await)?;
        }
        if !version10 {
            client(send_to(&mut self.io, b"0\r\n\r\n", within).await)?;
        }
        Ok(keep)
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
        let ok = send_to(&mut self.io, &self.out, self.send_timeout).await
            && send_to(&mut self.io, &early, self.send_timeout).await
            && upstream.write_all(&self.buf).await.is_ok();
        if ok {
            self.buf.clear();
            let _ = tokio::io::copy_bidirectional(&mut self.io, &mut upstream).await;
        }
        drop(guard);
        false
    }

    /// A redirect to HTTPS (308: the method and body stay as they were);
    /// whether the connection goes on.
    async fn redirect(&mut self, location: &str, keep: bool, version10: bool) -> bool {
        self.answers.count(308);
        self.out.clear();
        let _ = write!(
            self.out,
            "HTTP/1.1 308 Permanent Redirect\r\nlocation: {location}\r\nx-kiln-router: 1\r\ncontent-length: 0\r\n"
        );
        connection(&mut self.out, keep, version10);
        self.out.extend_from_slice(b"\r\n");
        send_to(&mut self.io, &self.out, self.send_timeout).await && keep
    }

    /// The router's own answer; whether the connection goes on.
    async fn local(&mut self, status: StatusCode, msg: &str, keep: bool, version10: bool) -> bool {
        // Every answer the router gives is counted, its own too.
        self.answers.count(status.as_u16());
        self.out.clear();
        let _ = write!(
            self.out,
            "HTTP/1.1 {} {}\r\ncontent-type: {}\r\nx-kiln-router: 1\r\ncontent-length: {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or_default(),
            content_type(msg),
            msg.len()
        );
        connection(&mut self.out, keep, version10);
        self.out.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(msg.as_bytes());
        send_to(&mut self.io, &self.out, self.send_timeout).await && keep
    }
}

/// The client's response head from the instance's: status line, end-to-end
/// headers, then the router's own framing (from what was parsed, never the
/// instance's fields), `Connection`, the sticky cookie and the empty line.
/// Whether the body goes out chunked, and whether the connection goes on.
///
/// A body of unknown length is chunked to an HTTP/1.1 client; an HTTP/1.0
/// one reads it to the end of the connection.
fn response_head(
    out: &mut Vec<u8>,
    head: &UpHead,
    version10: bool,
    keep: bool,
    (set_cookie, hsts): (Option<&str>, Option<&hyper::header::HeaderValue>),
) -> (bool, bool) {
    let unknown = matches!(head.framing, Framing::Chunked(_) | Framing::Eof);
    let chunked = unknown && !version10;
    let keep = keep && !(unknown && version10);
    encode_response(out, head, false);
    match head.framing {
        Framing::Length(n) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        _ if chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        // What a response to HEAD (or a 304) says of the body it has not;
        // 1xx and 204 have no length at all (RFC 9110 §8.6).
        Framing::Empty if head.status >= 200 && head.status != 204 => {
            if let Some(n) = head.length {
                let _ = write!(out, "content-length: {n}\r\n");
            }
        }
        _ => {}
    }
    connection(out, keep, version10);
    router_fields(out, (set_cookie, hsts));
    out.extend_from_slice(b"\r\n");
    (chunked, keep)
}

/// The fields the router adds to an instance's response: the sticky
/// cookie, and `Strict-Transport-Security` when the service asks
/// (`tls.hsts`).
fn router_fields(
    out: &mut Vec<u8>,
    (set_cookie, hsts): (Option<&str>, Option<&hyper::header::HeaderValue>),
) {
    if let Some(cookie) = set_cookie {
        push_header(out, b"set-cookie", cookie.as_bytes());
    }
    if let Some(v) = hsts {
        push_header(out, b"strict-transport-security", v.as_bytes());
    }
}

/// Write `bytes` to the client; false when that failed or the client read
/// nothing for `within` (nginx's `send_timeout`). The timer is armed only
/// when the socket's buffer is full: a write that goes at once costs one
/// clock read, no timer.
async fn send_to<S: Stream>(io: &mut S, bytes: &[u8], within: std::time::Duration) -> bool {
    matches!(
        tokio::time::timeout(within, io.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

/// What the client has sent already, read without waiting: `None` when
/// nothing is there yet.
fn read_now<S: Stream>(io: &mut S, buf: &mut BytesMut) -> Option<io::Result<usize>> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match wire::poll_read_buf(io, &mut cx, buf) {
        Poll::Ready(r) => Some(r),
        Poll::Pending => None,
    }
}

/// Who cut a response short.
enum Cut {
    /// The client went away or stopped reading.
    Client,
    /// The instance's body failed; `true` when it stalled past the read
    /// timeout.
    Instance(bool),
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
///
/// Everything here is the client's, and hostile: the instance's head is
/// written from what was parsed, never copied where it frames the message.
/// The body's framing (`Content-Length` or `Transfer-Encoding: chunked`) is
/// the router's own, from the framing it will decode; the client's framing
/// fields, the headers the router sets about the client, and anything the
/// client's `Connection` names are left out.
pub(crate) fn prepare(
    buf: &[u8],
    up: &mut Vec<u8>,
    (table, listener, tls): (&RouteTable, &std::net::SocketAddr, bool),
    peer_ip: &str,
) -> Result<Option<Prepared>, Reject> {
    let bad = |msg: &str| Reject(StatusCode::BAD_REQUEST, format!("{msg}\n"));
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        buf,
        &mut headers,
    ) {
        // The limit holds however the head arrived (in one read or many).
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => return Err(head_too_large()),
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Reject(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("more than {MAX_HEADERS} request headers\n"),
            ));
        }
        Err(e) => return Err(bad(&format!("malformed request: {e}"))),
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(bad("malformed request"));
    };
    if method == "CONNECT" {
        return Err(Reject(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported\n".to_owned(),
        ));
    }
    let version10 = minor == 0;
    let target = Target::parse(method, target.as_bytes()).map_err(bad)?;
    let declared = wire::declared(req.headers).map_err(|e| bad(&e.to_string()))?;
    // RFC 9112 §6.1, §6.3: a request's body is chunked or has a length;
    // both at once is how requests are smuggled, and is refused, as is any
    // transfer coding in HTTP/1.0 (which has none).
    let body = match (declared.transfer, declared.length) {
        (Some(_), Some(_)) => return Err(bad("both transfer-encoding and content-length")),
        (Some(_), None) if version10 => {
            return Err(bad("transfer-encoding in an HTTP/1.0 request"));
        }
        (Some(Coding::Chunked), None) => Framing::CHUNKED,
        (Some(Coding::Unsupported), None) => {
            return Err(Reject(
                StatusCode::NOT_IMPLEMENTED,
                "unsupported transfer-encoding: only chunked is implemented\n".to_owned(),
            ));
        }
        (Some(Coding::NotChunked), None) => {
            return Err(bad("transfer-encoding whose last coding is not chunked"));
        }
        (None, Some(n)) if n > 0 => Framing::Length(n),
        (None, _) => Framing::Empty,
    };
    // RFC 9112 §3.2: exactly one Host, a valid authority; an absolute-form
    // target's authority replaces it (§3.2.2).
    let mut host = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Err(bad("more than one host header"));
            }
            check_authority(h.value).map_err(|e| bad(&format!("invalid host header: {e}")))?;
            host = Some(h.value);
        }
    }
    if host.is_none() && !version10 {
        return Err(bad("an HTTP/1.1 request needs a host header"));
    }
    if let Some(authority) = target.authority {
        host = Some(authority);
    }
    let keep_alive = if version10 {
        wire::connection_has(req.headers, b"keep-alive")
    } else {
        !wire::connection_has(req.headers, b"close")
    };
    let upgrade = req
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("upgrade"))
        && wire::connection_has(req.headers, b"upgrade");
    let expects_continue = req.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("expect") && h.value.eq_ignore_ascii_case(b"100-continue")
    });
    // httparse hands the target over as text: its slices are too.
    let path = std::str::from_utf8(target.origin).map_err(|_| bad("invalid request target"))?;
    let Routed {
        service: routes,
        path,
        stripped,
        hsts,
        paused,
        known,
    } = route(table, listener, host, path)?;
    let hsts = hsts.filter(|_| tls);
    let (side, set_cookie) = match &routes {
        Ok(r) => r.choose(
            req.headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
                .map(|h| h.value),
        ),
        Err(_) => (Side::Stable, None),
    };

    up.clear();
    up.extend_from_slice(method.as_bytes());
    up.push(b' ');
    up.extend_from_slice(path.as_bytes());
    up.extend_from_slice(b" HTTP/1.1\r\n");
    let named = wire::connection_named(req.headers.iter().map(|h| (h.name, h.value)));
    let mut forwarded_for = None;
    let mut host_written = false;
    for h in req.headers.iter() {
        let n = h.name;
        if n.eq_ignore_ascii_case("host") {
            // In its place, as the client wrote its name; the authority of
            // an absolute-form target wins.
            push_header(up, n.as_bytes(), host.unwrap_or(h.value));
            host_written = true;
            continue;
        }
        if (wire::is_hop_by_hop(n) && !(upgrade && n.eq_ignore_ascii_case("upgrade")))
            || named.iter().any(|t| t.eq_ignore_ascii_case(n.as_bytes()))
            // The router writes the framing of what it forwards.
            || n.eq_ignore_ascii_case("content-length")
            // 100-continue is answered here (or, from HTTP/1.0, ignored).
            || n.eq_ignore_ascii_case("expect") && expects_continue
            || is_set_by_router(n)
        {
            continue;
        }
        if n.eq_ignore_ascii_case("x-forwarded-for") {
            // Earlier hops, then this client.
            forwarded_for.get_or_insert_with(Vec::new).push(h.value);
            continue;
        }
        push_header(up, n.as_bytes(), h.value);
    }
    if let Some(h) = host.filter(|_| !host_written) {
        push_header(up, b"host", h);
    }
    up.extend_from_slice(b"x-forwarded-for: ");
    for prev in forwarded_for.iter().flatten() {
        up.extend_from_slice(prev);
        up.extend_from_slice(b", ");
    }
    up.extend_from_slice(peer_ip.as_bytes());
    up.extend_from_slice(if tls {
        b"\r\nx-forwarded-proto: https\r\n"
    } else {
        b"\r\nx-forwarded-proto: http\r\n"
    });
    if let Some(h) = host {
        push_header(up, b"x-forwarded-host", h);
    }
    if let Some(prefix) = stripped {
        push_header(up, b"x-forwarded-prefix", prefix.as_bytes());
    }
    // The coding the client takes, for a service that compresses.
    let accept = match &known {
        Some(r) if r.limits.compress => kiln_core::compress::choose(
            req.headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("accept-encoding"))
                .map(|h| h.value),
        ),
        _ => None,
    };
    // Each request's own id, for the instance's logs and the access log.
    let request_id = new_request_id();
    push_header(up, b"x-request-id", &request_id);
    let log = match &known {
        Some(r) if r.access.is_some() => Some(Box::new(LogHead {
            method: method.to_owned(),
            host: host
                .map(|h| String::from_utf8_lossy(h).into_owned())
                .unwrap_or_default(),
            path: path.clone().into_owned(),
            user_agent: req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("user-agent"))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
                .unwrap_or_default(),
        })),
        _ => None,
    };
    match body {
        Framing::Chunked(_) => up.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Length(n) => {
            let _ = write!(up, "content-length: {n}\r\n");
        }
        // A POST with an empty body still says so (some apps want 411
        // otherwise).
        _ if declared.length == Some(0) => up.extend_from_slice(b"content-length: 0\r\n"),
        _ => {}
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
        // RFC 9110 §10.1.1: an HTTP/1.0 client's expectation is ignored.
        expect_continue: expects_continue && !version10,
        upgrade,
        head_len: up.len(),
        has_host: host.is_some(),
        side,
        set_cookie,
        routes,
        hsts,
        paused,
        request_id,
        log,
        accept,
        known,
    }))
}

/// The router's own answer to a request routed to a service: logged when
/// the service keeps an access log; the body to send is the service's page
/// for `status` when it has one, else `msg`.
pub(crate) fn own_answer<'a>(
    req: &'a Prepared,
    client: (&str, &'static str),
    status: StatusCode,
    msg: &'a str,
    arrived: Instant,
) -> &'a str {
    log_access(req, client, status.as_u16(), None, arrived);
    req.known
        .as_ref()
        .and_then(|r| r.pages.as_ref())
        .and_then(|p| p.get(&status.as_u16()))
        .map_or(msg, String::as_str)
}

/// A page is HTML; the router's own messages are one line of text.
pub(crate) fn content_type(body: &str) -> &'static str {
    if body.trim_start().starts_with('<') {
        "text/html; charset=utf-8"
    } else {
        "text/plain"
    }
}

/// 128 random bits in hex: a request's id.
fn new_request_id() -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    let mut out = [0u8; 32];
    for i in 0..16 {
        out[i] = HEX[((a >> (60 - 4 * i)) & 0xf) as usize];
        out[16 + i] = HEX[((b >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// What an access log line says of a request, kept only for a service
/// that logs.
pub(crate) struct LogHead {
    pub(crate) method: String,
    pub(crate) host: String,
    pub(crate) path: String,
    pub(crate) user_agent: String,
}

/// Log a request's answer when its service keeps an access log.
pub(crate) fn log_access(
    req: &Prepared,
    (client, protocol): (&str, &'static str),
    status: u16,
    backend: Option<&crate::router::Backend>,
    arrived: Instant,
) {
    let (Some(log), Some(head)) = (req.known.as_ref().and_then(|r| r.access.as_ref()), &req.log)
    else {
        return;
    };
    log.record(&crate::router::access::Entry {
        time: crate::router::access::now(),
        service: &log.service,
        request_id: std::str::from_utf8(&req.request_id).unwrap_or_default(),
        client,
        protocol,
        method: &head.method,
        host: &head.host,
        path: &head.path,
        status,
        duration_ms: arrived.elapsed().as_secs_f64() * 1000.0,
        instance: backend.map(|b| b.instance.as_str()),
        release: backend.map(|b| b.revision),
        user_agent: &head.user_agent,
    });
}

/// What answers a request, once its host and path are looked up.
pub(crate) struct Routed<'t, 'p> {
    /// The service's routes, or the router's own answer (no route 404,
    /// nothing ready 503; a redirect to HTTPS 308, whose message is the
    /// location; an ACME challenge's answer 200).
    pub(crate) service: Result<Arc<ServiceRoutes>, (StatusCode, String)>,
    /// The path the instance gets, and the prefix stripped from it.
    pub(crate) path: std::borrow::Cow<'p, str>,
    pub(crate) stripped: Option<&'t str>,
    pub(crate) hsts: Option<hyper::header::HeaderValue>,
    /// The service is paused: its gate, and its key to look its routes up
    /// again once the gate opens.
    pub(crate) paused: Option<(Arc<Gate>, RouteKey)>,
    /// The service it routes to, whether an instance is ready or not
    /// (when its access log, pages or compression may be needed).
    pub(crate) known: Option<Arc<ServiceRoutes>>,
}

impl<'p> Routed<'_, 'p> {
    fn answer(status: StatusCode, msg: String, path: &'p str) -> Self {
        Self {
            service: Err((status, msg)),
            path: path.into(),
            stripped: None,
            hsts: None,
            paused: None,
            known: None,
        }
    }
}

/// What answers a request for `host` and `path` on `listener`.
fn route<'t, 'p>(
    table: &'t RouteTable,
    listener: &std::net::SocketAddr,
    host: Option<&[u8]>,
    path: &'p str,
) -> Result<Routed<'t, 'p>, Reject> {
    let Some(routes) = table.listeners.get(listener) else {
        let msg = format!("no service routes on {listener} yet\n");
        return Ok(Routed::answer(StatusCode::SERVICE_UNAVAILABLE, msg, path));
    };
    // A CA checking a name this agent asked it to certify (before any
    // route: the redirect to HTTPS would hide it).
    if !table.challenges.is_empty()
        && let Some(answer) = path
            .strip_prefix("/.well-known/acme-challenge/")
            .and_then(|token| table.challenges.get(token))
    {
        return Ok(Routed::answer(StatusCode::OK, answer.clone(), path));
    }
    if routes.by_path() && kiln_core::edge::has_dot_segment(path) {
        return Err(Reject(
            StatusCode::BAD_REQUEST,
            "a path with a . or .. segment\n".to_owned(),
        ));
    }
    // Only a listener that routes by host reads it (and a host that is
    // not a name, an IP address say, is answered by the any-host routes).
    let name = routes
        .by_host()
        .then(|| host.and_then(|h| std::str::from_utf8(h).ok()))
        .flatten()
        .and_then(kiln_core::edge::normalize_host);
    let Some(found) = routes.lookup(name.as_deref().unwrap_or(""), path) else {
        let msg = match name {
            Some(h) => format!("no service answers host {h} with this path here\n"),
            None => "no service answers this request here\n".to_owned(),
        };
        return Ok(Routed::answer(StatusCode::NOT_FOUND, msg, path));
    };
    if let Some(port) = found.target.redirect_to {
        let Some(authority) = host.and_then(|h| std::str::from_utf8(h).ok()) else {
            return Err(Reject(
                StatusCode::BAD_REQUEST,
                "a redirect to HTTPS needs a host header\n".to_owned(),
            ));
        };
        // The host without its port (an IPv6 literal keeps its brackets).
        let host = match authority.rsplit_once(':') {
            Some((h, p)) if !p.contains(']') => h,
            _ => authority,
        };
        let location = match port {
            443 => format!("https://{host}{path}"),
            p => format!("https://{host}:{p}{path}"),
        };
        return Ok(Routed::answer(
            StatusCode::PERMANENT_REDIRECT,
            location,
            path,
        ));
    }
    let key = &found.target.key;
    let paused = if table.paused.is_empty() {
        None
    } else {
        table.paused.get(key).map(|g| (g.clone(), key.clone()))
    };
    let known = table.services.get(key);
    let service = ready(known, key);
    // Kept even with no instance ready (a 503 is what a page is for), but
    // only when the router may answer itself or the service asks more of
    // it: the common request takes one reference to its routes, not two.
    let known = known
        .filter(|r| {
            service.is_err() || r.access.is_some() || r.pages.is_some() || r.limits.compress
        })
        .cloned();
    Ok(Routed {
        service,
        path: found.path,
        stripped: found.stripped,
        hsts: found.target.hsts.clone(),
        paused,
        known,
    })
}

/// The routes of `key`, or 503 when it has none or no ready instance.
fn ready(
    routes: Option<&Arc<ServiceRoutes>>,
    key: &RouteKey,
) -> Result<Arc<ServiceRoutes>, (StatusCode, String)> {
    match routes {
        // Neither side has a ready instance (`choose` only picks an empty
        // side when both are).
        Some(r)
            if r.backends.is_empty() && r.canary.as_ref().is_none_or(|c| c.backends.is_empty()) =>
        {
            Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no ready instance of {key}\n"),
            ))
        }
        Some(r) => Ok(r.clone()),
        None => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no routes for {key}\n"),
        )),
    }
}

/// A request's wait at its paused service's gate: the service's routes of
/// the moment it opens, or the router's 503.
pub(crate) async fn wait_at(
    source: &RouteSource,
    gate: &Gate,
    key: &RouteKey,
) -> Result<Arc<ServiceRoutes>, (StatusCode, String)> {
    match gate.wait().await {
        Ok(()) => ready(source.0.load().services.get(key), key),
        Err(GateError::TimedOut(t)) if t.is_zero() => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{key} is in maintenance (kiln resume)\n"),
        )),
        Err(GateError::TimedOut(t)) => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{key} is paused (kiln resume): not resumed within {}\n",
                humantime::format_duration(t)
            ),
        )),
        Err(GateError::Full) => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{key} is paused and {MAX_WAITING} requests wait already\n"),
        )),
    }
}

fn head_too_large() -> Reject {
    Reject(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        format!("request head larger than {MAX_HEAD} bytes\n"),
    )
}

/// Headers that say something about the client which only the router may
/// say: the client's are dropped, whatever their spelling (a backend that
/// maps names CGI-style reads `X_Forwarded_For` as `X-Forwarded-For`).
/// `X-Forwarded-For` itself is kept as the earlier hops and appended to.
fn is_set_by_router(name: &str) -> bool {
    const SET: [&str; 7] = [
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-prefix",
        "forwarded",
        "x-real-ip",
        "x-forwarded-port",
        "x-request-id",
    ];
    if SET.iter().any(|s| s.eq_ignore_ascii_case(name)) {
        return true;
    }
    // An underscore spelling of any header the router sets or frames with.
    name.contains('_') && {
        let dashed = name.replace('_', "-");
        SET.iter()
            .chain(&[
                "x-forwarded-for",
                "content-length",
                "transfer-encoding",
                "host",
                "connection",
            ])
            .any(|s| s.eq_ignore_ascii_case(&dashed))
    }
}

/// A request target (RFC 9112 §3.2), as the instance gets it.
struct Target<'a> {
    /// Origin-form: the path and query, or `*`.
    origin: &'a [u8],
    /// The authority of an absolute-form target.
    authority: Option<&'a [u8]>,
}

impl<'a> Target<'a> {
    fn parse(method: &str, target: &'a [u8]) -> Result<Self, &'static str> {
        if target.starts_with(b"/") {
            return Ok(Self {
                origin: target,
                authority: None,
            });
        }
        if target == b"*" {
            return if method == "OPTIONS" {
                Ok(Self {
                    origin: target,
                    authority: None,
                })
            } else {
                Err("the target * is only for OPTIONS")
            };
        }
        let rest = [&b"http://"[..], b"https://"]
            .iter()
            .find(|scheme| {
                target.len() > scheme.len() && target[..scheme.len()].eq_ignore_ascii_case(scheme)
            })
            .map(|scheme| &target[scheme.len()..])
            .ok_or("invalid request target")?;
        let end = rest
            .iter()
            .position(|&b| b == b'/' || b == b'?')
            .unwrap_or(rest.len());
        let authority = &rest[..end];
        check_authority(authority).map_err(|_| "invalid authority in the request target")?;
        let path = &rest[end..];
        Ok(Self {
            // An empty path is `/`; `http://h?q` (an empty path with a
            // query) is refused rather than rewritten: no client sends it.
            origin: if path.starts_with(b"/") {
                path
            } else if path.is_empty() {
                b"/"
            } else {
                return Err("an absolute-form target with a query needs a path");
            },
            authority: Some(authority),
        })
    }
}

/// A `Host` value or a target's authority: `host[:port]` of a reg-name, an
/// IPv4 or a bracketed IP literal; no userinfo, no whitespace, no path.
fn check_authority(a: &[u8]) -> Result<(), &'static str> {
    if a.is_empty() {
        return Err("empty");
    }
    if a.contains(&b'@') {
        return Err("userinfo is not allowed");
    }
    let (host, port) = if a.starts_with(b"[") {
        let close = a.iter().position(|&b| b == b']').ok_or("unclosed [")?;
        let literal = &a[1..close];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return Err("invalid IP literal");
        }
        match &a[close + 1..] {
            [] => (&a[..=close], None),
            [b':', port @ ..] => (&a[..=close], Some(port)),
            _ => return Err("invalid characters after the IP literal"),
        }
    } else {
        match a.iter().rposition(|&b| b == b':') {
            Some(i) => (&a[..i], Some(&a[i + 1..])),
            None => (a, None),
        }
    };
    if !host.starts_with(b"[")
        && !host
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&b))
    {
        return Err("invalid characters");
    }
    if host.is_empty() {
        return Err("no host");
    }
    if let Some(port) = port
        && (port.len() > 5 || !port.iter().all(u8::is_ascii_digit))
    {
        return Err("invalid port");
    }
    Ok(())
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The status line and the end-to-end headers of an instance's response
/// (a 101 keeps `Connection` and `Upgrade`: they are its answer). The
/// instance's framing fields are never copied: the caller writes the
/// framing from what was parsed, then `Connection` and the empty line.
fn encode_response(out: &mut Vec<u8>, head: &UpHead, switching: bool) {
    let _ = write!(out, "HTTP/1.1 {} ", head.status);
    out.extend_from_slice(head.reason());
    out.extend_from_slice(b"\r\n");
    let named = wire::connection_named(head.headers());
    for (n, v) in head.headers() {
        let keep = switching
            && (n.eq_ignore_ascii_case("connection") || n.eq_ignore_ascii_case("upgrade"));
        if !keep
            && (wire::is_hop_by_hop(n)
                || n.eq_ignore_ascii_case("content-length")
                || named.iter().any(|t| t.eq_ignore_ascii_case(n.as_bytes())))
        {
            continue;
        }
        push_header(out, n.as_bytes(), v);
    }
}

/// A request body, read from the client as the instance's side sends it.
/// A client that sends nothing of it for `stall` is cut off (nginx's
/// `client_body_timeout`).
struct ClientBody<'a, S> {
    io: &'a mut S,
    buf: &'a mut BytesMut,
    decoder: &'a mut Decoder,
    stall: std::time::Duration,
    /// The most bytes the body may bring (`router.max_body`), and how
    /// many it brought so far.
    max: u64,
    taken: u64,
    /// Armed while the body waits for the client.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    waited: &'a ClientWait,
}

impl<S: Stream> Body for ClientBody<'_, S> {
    type Data = Bytes;
    type Error = ClientError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        let this = self.get_mut();
        loop {
            match this.decoder.step(this.buf) {
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
                Ok(Step::Data(d)) => {
                    this.taken = this.taken.saturating_add(d.len() as u64);
                    if this.taken > this.max {
                        return Poll::Ready(Some(Err(ClientError::TooLarge(this.max))));
                    }
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Ok(Step::End) => return Poll::Ready(None),
                Ok(Step::More) => {}
            }
            match wire::poll_read_buf(this.io, cx, this.buf) {
                Poll::Ready(read) => {
                    if this.timer.is_some() {
                        this.waited.end(Instant::now());
                        this.timer = None;
                    }
                    match read {
                        Ok(0) => return Poll::Ready(Some(Err(ClientError::Closed))),
                        Ok(_) => {}
                        Err(e) => return Poll::Ready(Some(Err(e.into()))),
                    }
                }
                Poll::Pending => {
                    let timer = this.timer.get_or_insert_with(|| {
                        let now = Instant::now();
                        this.waited.begin(now);
                        Box::pin(tokio::time::sleep_until((now + this.stall).into()))
                    });
                    ready!(timer.as_mut().poll(cx));
                    return Poll::Ready(Some(Err(ClientError::Stalled(this.stall))));
                }
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
    use crate::router::testing::{Act, answers_early, scripted};
    use crate::router::{Backend, RouteKey, Router};
    use kiln_core::spec::ServiceName;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    const TOO_LARGE: &[u8] = b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 8\r\n\r\ntoo big!";

    /// A router listening on a free port, routing to the instance on `to`.
    async fn router_to(to: u16) -> (Arc<Router>, u16) {
        let (router, port, _) = router_with(
            to,
            RouterSpec::default(),
            Router::new(std::sync::Arc::new(crate::keeper::Keeper::none())),
        )
        .await;
        (router, port)
    }

    /// `router` listening on a free port with `limits`, routing to the
    /// instance on `to` (HTTP/1.1 only); its backend, whose counts tests read.
    pub(super) async fn router_with(
        to: u16,
        limits: RouterSpec,
        router: Arc<Router>,
    ) -> (Arc<Router>, u16, Arc<Backend>) {
        crate::router::testing::router_to_instance(to, limits, router, false).await
    }

    fn ms(n: u64) -> kiln_core::service::Duration {
        kiln_core::service::Duration::from_millis(n)
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
            .map(|b| without_request_id(&String::from_utf8_lossy(b)))
            .collect()
    }

    /// A request head as the instance got it, but for the router's one
    /// `x-request-id` (checked here: 32 hex digits, right after the
    /// forwarding fields), which differs each time.
    fn without_request_id(req: &str) -> String {
        let Some((head, body)) = req.split_once("\r\n\r\n") else {
            return req.to_owned();
        };
        let ids: Vec<&str> = head
            .split("\r\n")
            .filter_map(|l| l.strip_prefix("x-request-id: "))
            .collect();
        assert_eq!(ids.len(), 1, "one x-request-id in {head}");
        assert!(
            ids[0].len() == 32 && ids[0].bytes().all(|b| b.is_ascii_hexdigit()),
            "{head}"
        );
        let kept: Vec<&str> = head
            .split("\r\n")
            .filter(|l| !l.starts_with("x-request-id: "))
            .collect();
        format!("{}\r\n\r\n{body}", kept.join("\r\n"))
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
                "GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nX-App: kept\r\nx-forwarded-for: 10.0.0.1, 127.0.0.1\r\n\
                 x-forwarded-proto: http\r\nx-forwarded-host: example.com\r\n\r\n"
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
        let backend = Backend::new(
            "i2".into(),
            2,
            (std::net::Ipv4Addr::LOCALHOST, b).into(),
            Arc::default(),
            Arc::default(),
        );
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
        let router = Router::new(std::sync::Arc::new(crate::keeper::Keeper::none()));
        let serve = |io| {
            let mut c = Client::new(
                router.source(),
                addr,
                Arc::default(),
                (io, false),
                "127.0.0.1".into(),
                Arc::default(),
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
            // A coding the router would drop on the way: 501, not silence.
            (
                "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                "501",
            ),
            (
                "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                "400",
            ),
            // RFC 9112 §3.2: one valid Host on HTTP/1.1.
            ("GET / HTTP/1.1\r\n\r\n", "400"),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "400"),
            ("GET / HTTP/1.1\r\nHost: user:pw@h\r\n\r\n", "400"),
            ("GET / HTTP/1.1\r\nHost: h/x\r\n\r\n", "400"),
            ("GET http://u@h/ HTTP/1.1\r\nHost: h\r\n\r\n", "400"),
            ("GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", "400"),
            ("GET * HTTP/1.1\r\nHost: h\r\n\r\n", "400"),
            ("GET x HTTP/1.1\r\nHost: h\r\n\r\n", "400"),
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

    /// A request whose framing the client names in `Connection`: the body
    /// must still reach the instance framed, never as a second request.
    #[tokio::test]
    async fn connection_content_length_cannot_unframe_a_body_into_a_smuggled_request() {
        let (to, _, requests) = scripted(vec![Act::Answer(OK), Act::Answer(OK)]).await;
        let (router, port) = router_to(to).await;
        let smuggled = "GET /admin HTTP/1.1\r\nHost: internal\r\n\r\n";
        let req = format!(
            "POST / HTTP/1.1\r\nHost: h\r\nConnection: content-length, close\r\n\
             Content-Length: {}\r\n\r\n{smuggled}",
            smuggled.len()
        );
        let out = converse(port, req.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
        // The scripted instance reads a second request if the body comes
        // unframed; give it the time to.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let seen = seen(&requests);
        assert_eq!(seen.len(), 1, "one request reached the instance: {seen:?}");
        assert!(
            seen[0].ends_with(&format!(
                "content-length: {}\r\n\r\n{smuggled}",
                smuggled.len()
            )),
            "{:?}",
            seen[0]
        );
        // Nor does `Connection` remove Host or Transfer-Encoding.
        let out = converse(
            port,
            b"POST /c HTTP/1.1\r\nHost: h\r\nConnection: host, transfer-encoding, close\r\n\
              Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
        let seen = self::seen(&requests);
        assert_eq!(
            seen[1],
            "POST /c HTTP/1.1\r\nHost: h\r\nx-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: h\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        );
        router.close().await;
    }

    /// The same from the instance's side: its `Connection: content-length`
    /// must not leave an unframed response on a kept-alive connection.
    #[tokio::test]
    async fn an_instance_naming_its_framing_in_connection_still_gets_a_framed_response() {
        let (to, _, _) = scripted(vec![
            Act::Answer(
                b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello",
            ),
            Act::Answer(
                b"HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
            ),
            Act::Answer(OK),
        ])
        .await;
        let (router, port) = router_to(to).await;
        let out = converse(
            port,
            b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n\
              GET /3 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello\
             HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n\
             HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
        );
        router.close().await;
    }

    #[tokio::test]
    async fn framing_is_written_once_by_the_router_and_codings_it_cannot_forward_are_refused() {
        let (to, _, requests) = scripted(vec![
            Act::Answer(OK),
            Act::Answer(OK),
            Act::AnswerClose(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxxxx"),
        ])
        .await;
        let (router, port, backend) = router_with(
            to,
            RouterSpec::default(),
            Router::new(std::sync::Arc::new(crate::keeper::Keeper::none())),
        )
        .await;
        // `5, 5` is one length: forwarded as one value, never verbatim.
        let out = converse(
            port,
            b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\
              Connection: close\r\n\r\nhello",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
        // An empty body declared is still declared.
        let out = converse(
            port,
            b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
        let seen = seen(&requests);
        assert!(
            seen[0].ends_with("\r\ncontent-length: 5\r\n\r\nhello")
                && seen[0].matches("ontent-").count() == 1,
            "{:?}",
            seen[0]
        );
        assert!(
            seen[1].ends_with("\r\ncontent-length: 0\r\n\r\n"),
            "{:?}",
            seen[1]
        );
        // A response in a coding the router would strip: 502, not a body
        // the client cannot decode.
        let out = converse(
            port,
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            out.starts_with("HTTP/1.1 502 ") && out.contains("transfer-encoding"),
            "{out}"
        );
        assert_eq!(
            backend.metrics.snapshot().responses[4],
            1,
            "the instance's fault"
        );
        router.close().await;
    }

    #[tokio::test]
    async fn an_http10_client_never_gets_100_continue() {
        let (to, _, requests) = scripted(vec![Act::Answer(OK)]).await;
        let (router, port) = router_to(to).await;
        let out = converse(
            port,
            b"POST /up HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
        )
        .await;
        assert!(
            out.starts_with("HTTP/1.1 200 ") && !out.contains("100 Continue"),
            "{out}"
        );
        let seen = seen(&requests);
        assert!(
            seen[0].contains("\r\ncontent-length: 3\r\n") && seen[0].ends_with("\r\n\r\nabc"),
            "{:?}",
            seen[0]
        );
        assert!(!seen[0].to_lowercase().contains("expect"), "{:?}", seen[0]);
        router.close().await;
    }

    #[tokio::test]
    async fn the_head_limit_holds_however_the_head_arrives() {
        let big: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 2\r\n\r\nok",
                "b".repeat(72 * 1024)
            )
            .into_boxed_str(),
        );
        let (to, accepted, _) = scripted(vec![Act::AnswerClose(big.as_bytes())]).await;
        let (router, port) = router_to(to).await;
        // A 72 KiB request head in one write.
        let req = format!(
            "GET / HTTP/1.1\r\nHost: h\r\nx-big: {}\r\n\r\n",
            "a".repeat(72 * 1024)
        );
        let out = converse(port, req.as_bytes()).await;
        assert!(
            out.starts_with("HTTP/1.1 431 "),
            "{}",
            &out[..out.len().min(200)]
        );
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
        // And a 72 KiB response head, written at once by the instance.
        let out = converse(
            port,
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            out.starts_with("HTTP/1.1 502 ") && out.contains("larger than"),
            "{}",
            &out[..out.len().min(200)]
        );
        router.close().await;
    }

    #[tokio::test]
    async fn headers_that_speak_for_the_router_come_from_the_router() {
        let (to, _, requests) = scripted(vec![Act::Answer(OK)]).await;
        let (router, port) = router_to(to).await;
        converse(
            port,
            b"GET / HTTP/1.1\r\nHost: h\r\nForwarded: for=1.2.3.4;proto=https\r\n\
              X-Real-IP: 1.2.3.4\r\nX_Forwarded_For: 1.2.3.4\r\nX-Forwarded_Host: evil\r\n\
              X_Real_IP: 1.2.3.4\r\nX-Forwarded-Port: 443\r\nX-Request-Id: forged\r\nX_Request_Id: x\r\n\
              x-app_id: kept\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(
            seen(&requests)[0],
            "GET / HTTP/1.1\r\nHost: h\r\nx-app_id: kept\r\nx-forwarded-for: 127.0.0.1\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: h\r\n\r\n"
        );
        router.close().await;
    }

    /// Errors a client causes are its own: answered 400/408, counted apart,
    /// and never in the numbers a canary is judged by.
    #[tokio::test]
    async fn a_client_breaking_its_body_is_answered_4xx_and_never_counted_against_the_release() {
        let (to, _, _) = scripted(Vec::new()).await;
        let limits = RouterSpec {
            body_timeout: ms(300),
            ..RouterSpec::default()
        };
        let (router, port, backend) = router_with(
            to,
            limits,
            Router::new(std::sync::Arc::new(crate::keeper::Keeper::none())),
        )
        .await;
        // A broken chunked body.
        let out = converse(
            port,
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
        // A body that stalls.
        let out = converse(
            port,
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc",
        )
        .await;
        assert!(
            out.starts_with("HTTP/1.1 408 ") && out.contains("sent nothing for 300ms"),
            "{out}"
        );
        // A client that hangs up mid-body.
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap();
        drop(s);
        let m = &backend.metrics;
        wait_until(|| m.snapshot().client_errors == 3).await;
        let snap = m.snapshot();
        assert_eq!(snap.requests(), 0, "{snap:?}");
        assert_eq!(snap.timeouts, 0, "{snap:?}");
        assert_eq!(snap.window().errors, 0);
        assert_eq!(backend.inflight.get(), 0);
        router.close().await;
    }

    /// A slow upload is not the instance's timeout: the instance's clock
    /// runs only while the router is not waiting for the client.
    #[tokio::test]
    async fn a_slow_upload_does_not_count_against_the_instances_timeout() {
        let (to, _, requests) = scripted(vec![Act::Answer(OK)]).await;
        let svc = RouteKey::Service(ServiceName::try_from("web").unwrap());
        let (router, port, backend) = router_with(
            to,
            RouterSpec::default(),
            Router::new(std::sync::Arc::new(crate::keeper::Keeper::none())),
        )
        .await;
        router.set_routes(
            &svc,
            ServiceRoutes::new(vec![backend.clone()], Duration::from_millis(300)),
        );
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        for b in [b"a", b"b", b"c", b"d"] {
            tokio::time::sleep(Duration::from_millis(200)).await;
            s.write_all(b).await.unwrap();
        }
        let out = read_to_close(&mut s).await;
        assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
        assert!(seen(&requests)[0].ends_with("abcd"));
        assert_eq!(backend.metrics.snapshot().timeouts, 0);
        router.close().await;
    }

    #[tokio::test]
    async fn an_instance_that_stops_mid_body_is_cut_off_after_the_read_timeout() {
        let (to, _, _) = scripted(vec![Act::AnswerHold(
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part",
        )])
        .await;
        let limits = RouterSpec {
            read_timeout: ms(300),
            ..RouterSpec::default()
        };
        let (router, port, backend) = router_with(
            to,
            limits,
            Router::new(std::sync::Arc::new(crate::keeper::Keeper::none())),
        )
        .await;
        let out = converse(port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").await;
        assert!(out.ends_with("only part"), "cut, and closed: {out}");
        assert_eq!(
            backend.inflight.get(),
            0,
            "the request is no longer in flight"
        );
        assert_eq!(backend.metrics.snapshot().timeouts, 1);
        router.close().await;
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_closed_after_the_send_timeout() {
        let huge: &'static [u8] = {
            let mut v = b"HTTP/1.1 200 OK\r\ncontent-length: 33554432\r\n\r\n".to_vec();
            v.resize(v.len() + (32 << 20), b'x');
            v.leak()
        };
        let (to, _, _) = scripted(vec![Act::AnswerHold(huge)]).await;
        let limits = RouterSpec {
            send_timeout: ms(300),
            ..RouterSpec::default()
        };
        let (router, port, backend) = router_with(
            to,
            limits,
            Router::new(std::sync::Arc::new(crate::keeper::Keeper::none())),
        )
        .await;
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        // Never read: the router gives up, and frees the in-flight count.
        let m = &backend;
        wait_until(|| m.metrics.snapshot().client_errors == 1 && m.inflight.get() == 0).await;
        router.close().await;
    }

    /// At its cap a listener stops accepting: new clients wait in the
    /// kernel's queue (not refused) and are served once a connection ends.
    #[tokio::test]
    async fn at_the_connection_cap_new_clients_wait_instead_of_being_refused() {
        let (to, _, _) = scripted(vec![Act::Answer(OK); 4]).await;
        let (router, port, _) =
            router_with(to, RouterSpec::default(), Router::with_budget(2)).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                .await
                .unwrap();
            let mut got = vec![0u8; OK.len()];
            s.read_exact(&mut got).await.unwrap();
            held.push(s);
        }
        let mut third = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        third
            .write_all(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let waited =
            tokio::time::timeout(Duration::from_millis(500), third.read_to_end(&mut got)).await;
        assert!(waited.is_err(), "not served while at the cap: {got:?}");
        drop(held.pop());
        let out = read_to_close(&mut third).await;
        assert!(
            out.starts_with("HTTP/1.1 200 "),
            "served once room was made: {out}"
        );
        router.close().await;
    }

    /// Poll `cond` for up to 10 s.
    async fn wait_until(mut cond: impl FnMut() -> bool) {
        for _ in 0..1000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not met within 10 s");
    }
}

/// Property tests of the request side: random header order, duplicates,
/// case, whitespace, framings and body splits.
#[cfg(test)]
mod props {
    use super::*;
    use crate::router::Router;
    use proptest::prelude::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    /// A listener the table has no routes for: `prepare` writes the head
    /// as it would for any service, and the answer is the router's 503.
    const UNROUTED: std::net::SocketAddr = std::net::SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::LOCALHOST,
        9,
    ));

    /// A generated request: what it means, and its bytes.
    #[derive(Debug, Clone)]
    struct Gen {
        bytes: Vec<u8>,
        /// Where the head ends in `bytes`.
        head_len: usize,
        body: Vec<u8>,
        /// It is well-formed: one Host, consistent framing, no noise.
        clean: bool,
        /// Tokens of its Connection headers.
        named: Vec<String>,
    }

    fn casing(name: &str, mask: u32) -> String {
        name.chars()
            .enumerate()
            .map(|(i, c)| {
                if mask >> (i % 32) & 1 == 1 {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect()
    }

    fn chunked(body: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = 0;
        for &c in cuts {
            let end = (at + c).min(body.len());
            if end > at {
                out.extend_from_slice(format!("{:x}\r\n", end - at).as_bytes());
                out.extend_from_slice(&body[at..end]);
                out.extend_from_slice(b"\r\n");
                at = end;
            }
        }
        if at < body.len() {
            out.extend_from_slice(format!("{:x}\r\n", body.len() - at).as_bytes());
            out.extend_from_slice(&body[at..]);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    /// Noise: headers that try to confuse framing, Host or the router's
    /// own headers.
    fn noise() -> impl Strategy<Value = (String, String)> {
        prop_oneof![
            Just(("Content-Length".to_owned(), "5".to_owned())),
            Just(("Content-Length".to_owned(), "5, 5".to_owned())),
            Just(("Content-Length".to_owned(), "+5".to_owned())),
            Just(("Transfer-Encoding".to_owned(), "chunked".to_owned())),
            Just(("Transfer-Encoding".to_owned(), "gzip, chunked".to_owned())),
            Just((
                "Transfer-Encoding".to_owned(),
                "chunked, identity".to_owned()
            )),
            Just(("Host".to_owned(), "other".to_owned())),
            Just(("Host".to_owned(), "u@h".to_owned())),
            Just(("X-Forwarded-Proto".to_owned(), "https".to_owned())),
            Just(("X_Forwarded_For".to_owned(), "6.6.6.6".to_owned())),
            Just(("Expect".to_owned(), "100-continue".to_owned())),
        ]
    }

    fn request() -> impl Strategy<Value = Gen> {
        (
            prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH"]),
            "[a-z0-9/]{0,12}",
            prop::collection::vec(any::<u8>(), 0..200),
            0u8..3,
            prop::collection::vec(1usize..40, 0..6),
            prop::collection::vec(
                (
                    prop::sample::select(vec!["x-a", "accept", "cookie", "user-agent", "x-b"]),
                    "[ -~]{0,16}",
                ),
                0..5,
            ),
            prop::collection::vec(
                prop::sample::select(vec![
                    "close",
                    "keep-alive",
                    "content-length",
                    "transfer-encoding",
                    "host",
                    "x-a",
                    "cookie",
                ]),
                0..3,
            ),
            prop::option::weighted(0.3, noise()),
            any::<u32>(),
            0usize..8,
            prop::sample::select(vec!["", " ", "  "]),
        )
            .prop_map(
                |(method, path, body, framing, cuts, mut fields, named, noise, mask, at, ws)| {
                    let head = format!("{method} /{path} HTTP/1.1\r\n");
                    // Host, the framing, Connection and the noise go in
                    // among the other fields, at random places.
                    let (body, framed) = match framing {
                        0 => (Vec::new(), Vec::new()),
                        1 => {
                            fields.push(("content-length", format!("{ws}{}{ws}", body.len())));
                            (body.clone(), body)
                        }
                        _ => {
                            fields.push(("transfer-encoding", format!("{ws}chunked")));
                            let wire = chunked(&body, &cuts);
                            (body, wire)
                        }
                    };
                    let host = ("host", "example.com:8080".to_owned());
                    fields.insert(at.min(fields.len()), host);
                    if !named.is_empty() {
                        fields.push(("connection", named.join(", ")));
                    }
                    let clean = noise.is_none();
                    let noise_name = noise.as_ref().map(|(n, _)| n.to_ascii_lowercase());
                    if let (Some(n), Some((_, v))) = (&noise_name, &noise) {
                        fields.insert(at % (fields.len() + 1), (n, v.clone()));
                    }
                    build(head, &fields, &framed, body, clean, &named, mask)
                },
            )
    }

    /// Each field as `Name: value` in a random casing, then the empty line.
    fn write_fields(out: &mut Vec<u8>, fields: &[(&str, String)], mask: u32) {
        for (i, (n, v)) in fields.iter().enumerate() {
            out.extend_from_slice(casing(n, mask.rotate_left(i as u32)).as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }

    fn build(
        head: String,
        fields: &[(&str, String)],
        framed: &[u8],
        body: Vec<u8>,
        clean: bool,
        named: &[&str],
        mask: u32,
    ) -> Gen {
        let mut bytes = head.into_bytes();
        write_fields(&mut bytes, fields, mask);
        let head_len = bytes.len();
        bytes.extend_from_slice(framed);
        Gen {
            bytes,
            head_len,
            body,
            clean,
            named: named.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// Decode a body of `framing` from `wire`, fed in pieces of `step`.
    fn decode(framing: Framing, wire: &[u8], step: usize) -> Option<(Vec<u8>, usize)> {
        let mut d = Decoder::new(framing);
        let mut buf = BytesMut::new();
        let (mut fed, mut out) = (0, Vec::new());
        loop {
            match d.step(&mut buf).ok()? {
                Step::Data(b) => out.extend_from_slice(&b),
                Step::End => return Some((out, fed - buf.len())),
                Step::More => {
                    if fed == wire.len() {
                        return None;
                    }
                    let next = (fed + step).min(wire.len());
                    buf.extend_from_slice(&wire[fed..next]);
                    fed = next;
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever the client sent, an accepted request reaches the
        /// instance framed by the router alone, with its exact body, one
        /// Host, and none of the headers its Connection named.
        #[test]
        fn an_accepted_request_is_framed_once_and_keeps_its_exact_body(
            g in request(),
            step in 1usize..64,
        ) {
            let mut up = Vec::new();
            let prepared = prepare(&g.bytes, &mut up, (&RouteTable::default(), &UNROUTED, false), "192.0.2.1");
            let p = match prepared {
                Ok(Some(p)) => p,
                Ok(None) => {
                    prop_assert!(false, "a whole head is never incomplete");
                    unreachable!()
                }
                Err(Reject(status, _)) => {
                    prop_assert!(!g.clean, "a clean request was refused: {status}");
                    prop_assert!(status.is_client_error() || status == StatusCode::NOT_IMPLEMENTED);
                    return Ok(());
                }
            };
            prop_assert_eq!(p.len, g.head_len);
            up.extend_from_slice(b"\r\n");
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            prop_assert!(matches!(req.parse(&up), Ok(httparse::Status::Complete(n)) if n == up.len()));
            let count = |name: &str| req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).count();
            prop_assert_eq!(count("host"), 1);
            prop_assert!(count("content-length") + count("transfer-encoding") <= 1);
            for t in &g.named {
                if !["close", "keep-alive", "content-length", "transfer-encoding", "host"].contains(&t.as_str()) {
                    prop_assert_eq!(count(t), 0, "{} was named in Connection", t);
                }
            }
            for own in ["x-forwarded-proto", "x-forwarded-host", "x-forwarded-for"] {
                prop_assert_eq!(count(own), 1);
            }
            let value = |name: &str| req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value.to_vec());
            match p.body {
                Framing::Length(n) => prop_assert_eq!(value("content-length"), Some(n.to_string().into_bytes())),
                Framing::Chunked(_) => prop_assert_eq!(value("transfer-encoding"), Some(b"chunked".to_vec())),
                _ => prop_assert!(count("transfer-encoding") == 0 && value("content-length").is_none_or(|v| v == b"0")),
            }
            // The body, decoded however the reads cut it, is the client's,
            // and no byte of it is left to be read as another request.
            if g.clean {
                let decoded = decode(p.body, &g.bytes[p.len..], step);
                prop_assert!(decoded.is_some(), "the body decodes");
                let (body, used) = decoded.unwrap_or_default();
                prop_assert_eq!(&body, &g.body);
                prop_assert_eq!(p.len + used, g.bytes.len());
            }
        }

        /// Any bytes at all: never a panic, and never a head the
        /// instance could read as anything but one request.
        #[test]
        fn arbitrary_bytes_never_yield_an_ambiguous_head(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut up = Vec::new();
            if let Ok(Some(p)) = prepare(&bytes, &mut up, (&RouteTable::default(), &UNROUTED, false), "192.0.2.1") {
                prop_assert!(p.len <= bytes.len());
                up.extend_from_slice(b"\r\n");
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS + 8];
                let mut req = httparse::Request::new(&mut headers);
                prop_assert!(matches!(req.parse(&up), Ok(httparse::Status::Complete(n)) if n == up.len()));
            }
        }
    }

    /// One client's request, all of whose bytes carry its marker `m`.
    fn shape(kind: u8, m: &str, len: usize) -> String {
        let body = m.repeat(len.max(1));
        let smuggled = format!("GET /{m}/smuggled HTTP/1.1\r\nX-Client: {m}\r\n");
        match kind % 7 {
            0 => format!("GET /{m}/get HTTP/1.1\r\nHost: {m}\r\nX-Client: {m}\r\n\r\n"),
            1 => format!(
                "POST /{m}/cl HTTP/1.1\r\nHost: {m}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
            2 => format!(
                "POST /{m}/te HTTP/1.1\r\nHost: {m}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                body.len()
            ),
            3 => format!(
                "POST /{m}/conn HTTP/1.1\r\nHost: {m}\r\nConnection: content-length\r\nContent-Length: {}\r\n\r\n{smuggled}",
                smuggled.len()
            ),
            4 => format!(
                "POST /{m}/clte HTTP/1.1\r\nHost: {m}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            5 => format!(
                "POST /{m}/short HTTP/1.1\r\nHost: {m}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len() + 7
            ),
            _ => format!(
                "POST /{m}/badchunk HTTP/1.1\r\nHost: {m}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}XX{smuggled}",
                body.len()
            ),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Two clients at once, each sending a well-formed request and
        /// then a random mix (smuggling attempts, cut bodies, broken
        /// chunks among them) through the real router: no request an
        /// instance receives ever holds a byte of both, and each client's
        /// first request does reach it (a router that forwarded nothing
        /// would pass the first check alone).
        #[test]
        fn no_byte_of_one_client_reaches_another_clients_request(
            a in prop::collection::vec((any::<u8>(), 1usize..40), 1..5),
            b in prop::collection::vec((any::<u8>(), 1usize..40), 1..5),
        ) {
            let (mut a, mut b) = (a, b);
            a.insert(0, (0, 1));
            b.insert(0, (0, 1));
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime");
            let mixed = rt.block_on(async move {
                let (to, _, requests) = crate::router::testing::scripted(
                    vec![crate::router::testing::Act::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"); 64],
                )
                .await;
                let limits = RouterSpec {
                    body_timeout: kiln_core::service::Duration::from_millis(300),
                    ..RouterSpec::default()
                };
                let (router, port, _) = super::tests::router_with(to, limits, Router::new(std::sync::Arc::new(crate::keeper::Keeper::none()))).await;
                let client = |reqs: Vec<(u8, usize)>, m: &'static str| async move {
                    let mut s = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
                    for (kind, len) in reqs {
                        if s.write_all(shape(kind, m, len).as_bytes()).await.is_err() {
                            break;
                        }
                    }
                    let mut sink = Vec::new();
                    let _ = tokio::time::timeout(Duration::from_millis(600), s.read_to_end(&mut sink)).await;
                };
                tokio::join!(client(a, "qa"), client(b, "zb"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                router.close().await;
                let seen: Vec<String> = requests
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .map(|r| String::from_utf8_lossy(r).into_owned())
                    .collect();
                seen
            });
            let both: Vec<&String> = mixed.iter().filter(|r| r.contains("qa") && r.contains("zb")).collect();
            prop_assert!(both.is_empty(), "{:?}", both);
            for m in ["qa", "zb"] {
                let first = format!("GET /{m}/get ");
                prop_assert!(mixed.iter().any(|r| r.starts_with(&first)), "{} never reached the instance: {:?}", m, mixed);
            }
        }
    }

    /// An instance's response: its bytes, what its body is, and whether it
    /// is well-formed.
    #[derive(Debug, Clone)]
    struct GenResponse {
        bytes: Vec<u8>,
        head_method: bool,
        body: Vec<u8>,
        clean: bool,
        named: Vec<String>,
    }

    fn response() -> impl Strategy<Value = GenResponse> {
        (
            prop::sample::select(vec![200u16, 201, 204, 304, 404, 500]),
            any::<bool>(),
            prop::collection::vec(any::<u8>(), 0..200),
            0u8..3,
            prop::collection::vec(1usize..40, 0..6),
            prop::collection::vec(
                (
                    prop::sample::select(vec!["x-a", "set-cookie", "cache-control", "etag"]),
                    "[ -~]{0,16}",
                ),
                0..5,
            ),
            prop::collection::vec(
                prop::sample::select(vec![
                    "close",
                    "keep-alive",
                    "content-length",
                    "transfer-encoding",
                    "x-a",
                    "etag",
                ]),
                0..3,
            ),
            prop::option::weighted(
                0.3,
                prop::sample::select(vec![
                    ("content-length", "7"),
                    ("content-length", "1, 2"),
                    ("transfer-encoding", "gzip"),
                    ("transfer-encoding", "chunked, chunked"),
                ]),
            ),
            any::<u32>(),
        )
            .prop_map(
                |(status, head_method, body, framing, cuts, mut fields, named, noise, mask)| {
                    let bodiless = head_method || status == 204 || status == 304;
                    let body = if status == 204 || status == 304 {
                        Vec::new()
                    } else {
                        body
                    };
                    let wire = match framing {
                        _ if status == 204 || status == 304 => Vec::new(),
                        0 => {
                            fields.push(("content-length", body.len().to_string()));
                            body.clone()
                        }
                        1 => {
                            fields.push(("transfer-encoding", "chunked".to_owned()));
                            chunked(&body, &cuts)
                        }
                        // Close-delimited.
                        _ => body.clone(),
                    };
                    let wire = if bodiless { Vec::new() } else { wire };
                    if !named.is_empty() {
                        fields.push(("connection", named.join(", ")));
                    }
                    if let Some((n, v)) = noise {
                        fields.insert(mask as usize % (fields.len() + 1), (n, v.to_owned()));
                    }
                    let mut bytes = format!("HTTP/1.1 {status} R\r\n").into_bytes();
                    write_fields(&mut bytes, &fields, mask);
                    bytes.extend_from_slice(&wire);
                    GenResponse {
                        bytes,
                        head_method,
                        body: if bodiless { Vec::new() } else { body },
                        clean: noise.is_none(),
                        named: named.iter().map(|s| (*s).to_owned()).collect(),
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever an instance sends, a response the router accepts goes
        /// to the client with the router's framing alone (consistent with
        /// the body that follows), none of the headers its Connection
        /// named, and its exact body, however the reads cut it.
        #[test]
        fn an_accepted_response_is_framed_once_and_keeps_its_exact_body(
            g in response(),
            version10 in any::<bool>(),
            step in 1usize..64,
        ) {
            let mut buf = BytesMut::from(&g.bytes[..]);
            let head = match crate::router::upstream::parse_head(&mut buf, g.head_method) {
                Ok(Some(h)) => h,
                Ok(None) => {
                    prop_assert!(false, "a whole head is never incomplete");
                    unreachable!()
                }
                Err(e) => {
                    prop_assert!(!g.clean, "a clean response was refused: {e}");
                    return Ok(());
                }
            };
            let mut out = Vec::new();
            let (chunked, keep) = response_head(&mut out, &head, version10, true, (None, None));
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS + 8];
            let mut resp = httparse::Response::new(&mut headers);
            prop_assert!(matches!(resp.parse(&out), Ok(httparse::Status::Complete(n)) if n == out.len()));
            let count = |name: &str| resp.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).count();
            let value = |name: &str| resp.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value.to_vec());
            prop_assert!(count("content-length") + count("transfer-encoding") <= 1);
            prop_assert!(count("connection") <= 1);
            for t in &g.named {
                if !["close", "keep-alive", "content-length", "transfer-encoding"].contains(&t.as_str()) {
                    prop_assert_eq!(count(t), 0, "{} was named in Connection", t);
                }
            }
            match head.framing {
                Framing::Length(n) => prop_assert_eq!(value("content-length"), Some(n.to_string().into_bytes())),
                Framing::Chunked(_) | Framing::Eof if !version10 => {
                    prop_assert!(chunked);
                    prop_assert_eq!(value("transfer-encoding"), Some(b"chunked".to_vec()));
                }
                Framing::Chunked(_) | Framing::Eof => {
                    prop_assert!(!chunked && !keep, "an HTTP/1.0 client reads to the close");
                    prop_assert_eq!(count("content-length") + count("transfer-encoding"), 0);
                }
                Framing::Empty => prop_assert_eq!(count("transfer-encoding"), 0),
            }
            if g.clean {
                let rest = buf.to_vec();
                let body = if head.framing == Framing::Eof {
                    rest
                } else {
                    let decoded = decode(head.framing, &rest, step);
                    prop_assert!(decoded.is_some(), "the body decodes");
                    let (body, used) = decoded.unwrap_or_default();
                    prop_assert_eq!(used, rest.len(), "nothing stray follows the body");
                    body
                };
                prop_assert_eq!(body, g.body);
            }
        }
    }
}
