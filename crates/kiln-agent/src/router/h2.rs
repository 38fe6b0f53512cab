//! The router's HTTP/2 front: clients that chose `h2` in the TLS handshake.
//!
//! HTTP/2 itself (framing, HPACK, flow control, stream states) is hyper's
//! server on the `h2` crate, which carries the fixes and the caps for that
//! protocol's attacks (HPACK bombs, rapid reset, CONTINUATION floods); the
//! caps are set here, below. Each request is then turned into the HTTP/1.1
//! head an instance gets by the very checks of the HTTP/1.1 front
//! ([`downstream::prepare`]: the route, hop-by-hop and router-set headers,
//! the host, the framing) and sent on by the shared forwarding core
//! ([`forward`]): a canary weight, a sticky cookie, a drain or a timeout
//! means the same over either front.
//!
//! h2 → h1 is where requests are smuggled (RFC 9113 §8.2): the `h2` crate
//! refuses connection-specific fields, `te` other than `trailers`, names
//! with uppercase, values with CR, LF or NUL, and pseudo-headers repeated,
//! unknown or after a regular field, and it holds the DATA of a stream to
//! its `content-length`; [`h1_head`] checks again what it writes (a name
//! must be a token, a value must not break a line), refuses a `host` that
//! disagrees with `:authority`, and the instance's framing is the router's
//! own (`content-length` as declared, else chunked), never a client field.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::router::downstream::{self, HEAD_TIMEOUT, Prepared, Reject, Stream};
use crate::router::forward::{self, ClientError, ClientWait};
use crate::router::metrics::Answers;
use crate::router::routes::{Backend, Inflight, RouteSource};
use crate::router::upstream::{Pool, ProtocolError, UpBody, UpResponse};
use crate::router::wire::{self, Framing, MAX_HEAD};
use kiln_core::service::{BackendProtocol, RouterSpec};

/// Streams a client may have open at once on one connection (nginx's
/// `http2_max_concurrent_streams` is 128 too).
pub(crate) const MAX_STREAMS: u32 = 128;

/// Streams a client may open and reset before the router has answered
/// them, at once; past it the connection ends with GOAWAY (rapid reset,
/// CVE-2023-44487).
pub(crate) const MAX_PENDING_RESETS: usize = 20;

/// Streams the router may reset for a client's protocol errors before it
/// ends the connection.
pub(crate) const MAX_ERROR_RESETS: usize = 64;

/// A connection with no stream open for this long is closed (GOAWAY), as
/// an idle HTTP/1.1 connection is.
pub(crate) const IDLE_TIMEOUT: Duration = HEAD_TIMEOUT;

/// What every request of one client connection shares.
pub(crate) struct Conn {
    pub routes: RouteSource,
    pub listener: std::net::SocketAddr,
    pub pool: Arc<Pool>,
    pub peer_ip: String,
    pub answers: Arc<Answers>,
    /// Over TLS (`X-Forwarded-Proto`, HSTS), or h2c.
    pub tls: bool,
    /// Streams being answered now, and streams begun so far: the idle
    /// check reads both.
    active: AtomicUsize,
    begun: AtomicU64,
}

impl Conn {
    pub(crate) fn new(
        routes: RouteSource,
        listener: std::net::SocketAddr,
        pool: Arc<Pool>,
        peer_ip: String,
        answers: Arc<Answers>,
        tls: bool,
    ) -> Self {
        Self {
            tls,
            routes,
            listener,
            pool,
            peer_ip,
            answers,
            active: AtomicUsize::new(0),
            begun: AtomicU64::new(0),
        }
    }
}

/// Serve one HTTP/2 connection until it closes, is idle for
/// [`IDLE_TIMEOUT`], or this process hands its listeners over (then it
/// ends gracefully: GOAWAY, the streams under way finish).
pub(crate) async fn serve<S: Stream + 'static>(io: S, conn: Conn) {
    let conn = Arc::new(conn);
    let routes = conn.routes.clone();
    let shared = conn.clone();
    let service = hyper::service::service_fn(move |req| {
        let conn = shared.clone();
        async move { Ok::<_, Infallible>(handle(conn, req).await) }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEAD as u32)
        .max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
        .max_local_error_reset_streams(Some(MAX_ERROR_RESETS))
        // A peer that stops answering pings is gone.
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let served = builder.serve_connection(TokioIo::new(io), service);
    let mut served = std::pin::pin!(served);
    let mut handing_over = routes.1.subscribe();
    tokio::select! {
        _ = served.as_mut() => return,
        _ = handing_over.wait_for(|d| *d) => {}
        () = idle(&conn) => {}
    }
    served.as_mut().graceful_shutdown();
    let _ = served.await;
}

/// What an HTTP/2 client with prior knowledge sends first (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a plain connection opens with the HTTP/2 preface, looked at
/// without reading it (the front that serves it reads it again); the start
/// of an HTTP/1.1 request is the HTTP/1.1 front's. `None` when the client
/// sent nothing within the head timeout, or closed: the connection ends.
pub(crate) async fn prior_knowledge(stream: &tokio::net::TcpStream) -> Option<bool> {
    downstream::peek_first::<_, { PREFACE.len() }>(stream, |seen| {
        if seen != &PREFACE[..seen.len()] {
            Some(false)
        } else {
            (seen.len() == PREFACE.len()).then_some(true)
        }
    })
    .await
}

/// Resolves once the connection has had no stream open, and begun none,
/// for [`IDLE_TIMEOUT`] (checked every half of it).
async fn idle(conn: &Conn) {
    let mut quiet = 0;
    let mut seen = u64::MAX;
    loop {
        tokio::time::sleep(IDLE_TIMEOUT / 2).await;
        let begun = conn.begun.load(Ordering::Relaxed);
        if conn.active.load(Ordering::Relaxed) == 0 && begun == seen {
            quiet += 1;
            if quiet >= 2 {
                return;
            }
        } else {
            quiet = 0;
        }
        seen = begun;
    }
}

/// Counts a stream as being answered until dropped (with its response
/// body, or earlier when the router answers itself).
struct Active(Arc<Conn>);

impl Active {
    fn new(conn: Arc<Conn>) -> Self {
        conn.active.fetch_add(1, Ordering::Relaxed);
        conn.begun.fetch_add(1, Ordering::Relaxed);
        Self(conn)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One request: its HTTP/1.1 head, its route, the instance's answer.
async fn handle(conn: Arc<Conn>, req: hyper::Request<Incoming>) -> Response<Answer> {
    let arrived = Instant::now();
    let active = Active::new(conn.clone());
    let answer = |status: StatusCode, msg: &str| {
        conn.answers.count(status.as_u16());
        local(status, msg)
    };
    let (parts, body) = req.into_parts();
    let mut head = Vec::with_capacity(512);
    if let Err(msg) = h1_head(&parts, body.is_end_stream(), &mut head) {
        return answer(StatusCode::BAD_REQUEST, &format!("{msg}\n"));
    }
    let table = conn.routes.0.load();
    let mut up = Vec::with_capacity(512);
    let parsed = match downstream::prepare(
        &head,
        &mut up,
        (&table, &conn.listener, conn.tls),
        &conn.peer_ip,
    ) {
        Ok(Some(p)) => p,
        Ok(None) => return answer(StatusCode::BAD_REQUEST, "malformed request\n"),
        Err(Reject(status, msg)) => return answer(status, &msg),
    };
    drop(table);
    let mut parsed = parsed;
    if let Some((gate, key)) = parsed.paused.take() {
        parsed.routes = downstream::wait_at(&conn.routes, &gate, &key).await;
    }
    let routes = match &parsed.routes {
        Ok(r) => r.clone(),
        Err((StatusCode::PERMANENT_REDIRECT, location)) => {
            conn.answers.count(308);
            let mut r = local(StatusCode::PERMANENT_REDIRECT, "");
            if let Ok(v) = HeaderValue::from_str(location) {
                r.headers_mut().insert(hyper::header::LOCATION, v);
            }
            return r;
        }
        Err((status, msg)) => {
            let me = (conn.peer_ip.as_str(), "HTTP/2");
            return answer(
                *status,
                downstream::own_answer(&parsed, me, *status, msg, arrived),
            );
        }
    };
    let (backends, timeout, limits) = (routes.side(parsed.side), routes.timeout, routes.limits);
    let me = (conn.peer_ip.as_str(), "HTTP/2");
    if let Some(msg) = forward::too_large(parsed.body, &limits) {
        let status = StatusCode::PAYLOAD_TOO_LARGE;
        return answer(
            status,
            downstream::own_answer(&parsed, me, status, &msg, arrived),
        );
    }
    let waited = Arc::new(ClientWait::new(arrived));
    let body = (parsed.body != Framing::Empty).then(|| Upload {
        inner: body,
        stall: limits.body_timeout.0,
        timer: None,
        waited: waited.clone(),
        max: limits.max_body.unwrap_or(u64::MAX),
        taken: 0,
    });
    let body = match limits.backend_protocol {
        BackendProtocol::Http1 => forward::Outbound::H1(body),
        BackendProtocol::H2c => forward::Outbound::H2c(body.map(|b| {
            use http_body_util::BodyExt;
            b.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                .boxed()
        })),
    };
    let req = forward::Request {
        up: &mut up,
        head_len: parsed.head_len,
        has_host: parsed.has_host,
        head_method: parsed.head_method,
        idempotent: parsed.idempotent,
        upgrade: false,
        chunked: matches!(parsed.body, Framing::Chunked(_)),
    };
    match forward::forward(
        &conn.pool,
        backends,
        (timeout, arrived, &*waited),
        req,
        body,
    )
    .await
    {
        forward::Outcome::Local { status, msg, .. } => answer(
            status,
            downstream::own_answer(&parsed, me, status, &msg, arrived),
        ),
        forward::Outcome::Answered {
            resp,
            backend,
            guard,
        } => {
            let status = resp.head.status;
            downstream::log_access(&parsed, me, status, Some(backend), arrived);
            response(resp, &parsed, (backend.clone(), guard, active), limits)
        }
    }
}

/// The instance's HTTP/1.1 head for an HTTP/2 request, as a client would
/// have written it: what [`downstream::prepare`] then reads. `end_stream`
/// when the request has no body (its HEADERS ended the stream).
pub(crate) fn h1_head(
    parts: &hyper::http::request::Parts,
    end_stream: bool,
    out: &mut Vec<u8>,
) -> Result<(), &'static str> {
    let target = match parts.uri.path_and_query() {
        Some(p) => p.as_str(),
        None if parts.method == hyper::Method::OPTIONS => "*",
        None => return Err("a request without :path"),
    };
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // RFC 9113 §8.3.1: `:authority` is the host; a `host` field beside it
    // must say the same.
    let authority = parts.uri.authority().map(|a| a.as_str());
    let mut host_field = None;
    for v in parts.headers.get_all(hyper::header::HOST) {
        if host_field.is_some() {
            return Err("more than one host header");
        }
        host_field = Some(v.as_bytes());
    }
    match (authority, host_field) {
        (Some(a), Some(h)) if !a.as_bytes().eq_ignore_ascii_case(h) => {
            return Err(":authority and host disagree");
        }
        (Some(a), _) => header(out, b"host", a.as_bytes())?,
        (None, Some(h)) => header(out, b"host", h)?,
        (None, None) => {}
    }
    // RFC 9113 §8.2.3: cookies may come split over many fields; HTTP/1.1
    // has one.
    let mut cookies = parts.headers.get_all(hyper::header::COOKIE).iter();
    if let Some(first) = cookies.next() {
        let mut joined = first.as_bytes().to_vec();
        for c in cookies {
            joined.extend_from_slice(b"; ");
            joined.extend_from_slice(c.as_bytes());
        }
        header(out, b"cookie", &joined)?;
    }
    let mut length = false;
    for (name, value) in &parts.headers {
        if name == hyper::header::HOST || name == hyper::header::COOKIE {
            continue;
        }
        if name == hyper::header::TRANSFER_ENCODING {
            // The h2 crate refuses it already; never let it frame a body.
            return Err("transfer-encoding in an HTTP/2 request");
        }
        length |= name == hyper::header::CONTENT_LENGTH;
        header(out, name.as_str().as_bytes(), value.as_bytes())?;
    }
    // The body's framing for the instance: the declared length (the h2
    // crate holds the DATA to it), else chunked.
    if !length && !end_stream {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// Write one field, refusing what would not read back as that one field.
fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) -> Result<(), &'static str> {
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b) && !b.is_ascii_uppercase()) {
        return Err("an invalid header name");
    }
    if value.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0)) {
        return Err("a header value with CR, LF or NUL");
    }
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// RFC 9110 §5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The router's own answer.
fn local(status: StatusCode, msg: &str) -> Response<Answer> {
    let mut r = Response::new(Answer::Local(
        (!msg.is_empty()).then(|| Bytes::copy_from_slice(msg.as_bytes())),
    ));
    *r.status_mut() = status;
    let h = r.headers_mut();
    if !msg.is_empty() {
        h.insert(
            hyper::header::CONTENT_TYPE,
            HeaderValue::from_static(downstream::content_type(msg)),
        );
    }
    h.insert("x-kiln-router", HeaderValue::from_static("1"));
    r
}

/// The client's response from the instance's: its status and end-to-end
/// fields, the length as parsed (never the instance's framing fields), the
/// sticky cookie and HSTS.
fn response(
    resp: UpResponse,
    req: &Prepared,
    (backend, guard, active): (Arc<Backend>, Inflight, Active),
    limits: RouterSpec,
) -> Response<Answer> {
    let head = &resp.head;
    let mut r = Response::new(Answer::Local(None));
    *r.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let h = r.headers_mut();
    let named = wire::connection_named(head.headers());
    for (n, v) in head.headers() {
        if wire::is_hop_by_hop(n)
            || n.eq_ignore_ascii_case("content-length")
            || named.iter().any(|t| t.eq_ignore_ascii_case(n.as_bytes()))
        {
            continue;
        }
        // httparse accepted both; a name HTTP/2 cannot carry is dropped.
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            h.append(name, value);
        }
    }
    let coding = crate::router::compress::coding_for(req.accept, head);
    let length = match head.framing {
        _ if coding.is_some() => None,
        Framing::Length(n) => Some(n),
        // What a response to HEAD (or a 304) says of the body it has not.
        Framing::Empty if head.status >= 200 && head.status != 204 => head.length,
        _ => None,
    };
    if let Some(n) = length {
        h.insert(hyper::header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    if let Some(cookie) = req
        .set_cookie
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        h.append(hyper::header::SET_COOKIE, cookie);
    }
    if let Some(v) = &req.hsts {
        h.insert(hyper::header::STRICT_TRANSPORT_SECURITY, v.clone());
    }
    let encoder = coding.and_then(|c| {
        h.insert(
            hyper::header::CONTENT_ENCODING,
            HeaderValue::from_static(c.name()),
        );
        h.append(
            hyper::header::VARY,
            HeaderValue::from_static("accept-encoding"),
        );
        crate::router::compress::Encoder::new(c).ok()
    });
    *r.body_mut() = Answer::Instance(Box::new(Proxied {
        body: resp.body,
        guard: Some((guard, active)),
        backend,
        stall: limits.read_timeout.0,
        timer: None,
        encoder,
    }));
    r
}

/// A response body: the router's own, or the instance's on its way.
pub(crate) enum Answer {
    Local(Option<Bytes>),
    Instance(Box<Proxied>),
}

/// An instance's response body. An instance that sends nothing of it for
/// the read timeout is cut off (the stream is reset); the request counts
/// in flight until the body ends or the client resets the stream.
pub(crate) struct Proxied {
    body: UpBody,
    guard: Option<(Inflight, Active)>,
    backend: Arc<Backend>,
    stall: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Compressing its body (`router.compress`); trailers are then not
    /// passed on.
    encoder: Option<crate::router::compress::Encoder>,
}

impl Body for Answer {
    type Data = Bytes;
    type Error = ProtocolError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ProtocolError>>> {
        let p = match self.get_mut() {
            Self::Local(b) => return Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Self::Instance(p) => p,
        };
        loop {
            match Pin::new(&mut p.body).poll_frame(cx) {
                Poll::Ready(None) => {
                    // What the encoder still holds goes last.
                    if let Some(enc) = p.encoder.take() {
                        match enc.finish() {
                            Ok(rest) if !rest.is_empty() => {
                                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                            }
                            Ok(_) => {}
                            Err(e) => return Poll::Ready(Some(Err(e.into()))),
                        }
                    }
                    p.guard = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e))) => {
                    p.guard = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    p.timer = None;
                    let Some(enc) = p.encoder.as_mut() else {
                        return Poll::Ready(Some(Ok(frame)));
                    };
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    match enc.push(&data) {
                        Ok(out) if out.is_empty() => continue,
                        Ok(out) => return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out))))),
                        Err(e) => return Poll::Ready(Some(Err(e.into()))),
                    }
                }
                Poll::Pending => {
                    let stall = p.stall;
                    let timer = p
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
                    ready!(timer.as_mut().poll(cx));
                    p.backend.metrics.timeout();
                    p.guard = None;
                    return Poll::Ready(Some(Err(ProtocolError::Io(
                        std::io::ErrorKind::TimedOut.into(),
                    ))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Local(b) => b.is_none(),
            Self::Instance(p) => p.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            // Compressed, its length is not the instance's.
            Self::Instance(p) if p.encoder.is_some() => SizeHint::default(),
            Self::Instance(p) => p.body.size_hint(),
        }
    }
}

impl Drop for Proxied {
    fn drop(&mut self) {
        // Dropped before its end: the client reset the stream (or the
        // connection went); the instance did nothing wrong.
        if self.guard.is_some() && !self.body.is_end_stream() {
            self.backend.metrics.client_error();
        }
    }
}

/// An HTTP/2 request body as the instance's side sends it: held to the
/// service's `max_body`, and a client that sends nothing of it for `stall`
/// is cut off.
struct Upload {
    inner: Incoming,
    stall: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    waited: Arc<ClientWait>,
    max: u64,
    taken: u64,
}

impl Body for Upload {
    type Data = Bytes;
    type Error = ClientError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        let this = self.get_mut();
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(got) => {
                    if this.timer.take().is_some() {
                        this.waited.end(Instant::now());
                    }
                    let frame = match got {
                        None => return Poll::Ready(None),
                        Some(Err(e)) => return Poll::Ready(Some(Err(ClientError::Stream(e)))),
                        Some(Ok(frame)) => frame,
                    };
                    // Request trailers are not forwarded to HTTP/1.1.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    this.taken = this.taken.saturating_add(data.len() as u64);
                    if this.taken > this.max {
                        return Poll::Ready(Some(Err(ClientError::TooLarge(this.max))));
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
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
        self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::Router;
    use crate::router::testing::{Act, router_to_instance, scripted};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    /// A router whose plain listener takes h2c, routing to the instance
    /// on `to`; its port and the backend.
    async fn h2c_router(to: u16) -> (Arc<Router>, u16, Arc<Backend>) {
        let router = Router::new(Arc::new(crate::keeper::Keeper::none()));
        router_to_instance(to, RouterSpec::default(), router, true).await
    }

    /// hyper's HTTP/2 client on a new connection (prior knowledge).
    async fn client(port: u16) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        send
    }

    fn seen(requests: &std::sync::Mutex<Vec<Vec<u8>>>) -> Vec<String> {
        let r = requests.lock().unwrap();
        r.iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn an_h2_request_reaches_the_instance_as_one_http11_head_with_the_routers_fields() {
        let (to, _, requests) = scripted(vec![Act::Answer(OK)]).await;
        let (_router, port, _) = h2c_router(to).await;
        let mut send = client(port).await;
        let req = hyper::Request::builder()
            .uri(format!("http://app.test:{port}/x?y=1"))
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .header("x-forwarded-proto", "https")
            .header("te", "trailers")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        let got = seen(&requests);
        assert_eq!(got.len(), 1);
        let head = &got[0];
        assert!(head.starts_with("GET /x?y=1 HTTP/1.1\r\n"), "{head}");
        assert!(
            head.contains(&format!("host: app.test:{port}\r\n")),
            "{head}"
        );
        // Cookies split over fields are one field to HTTP/1.1.
        assert!(head.contains("cookie: a=1; b=2\r\n"), "{head}");
        assert_eq!(head.matches("cookie:").count(), 1, "{head}");
        // The client's claim of HTTPS is not the router's.
        assert!(head.contains("x-forwarded-proto: http\r\n"), "{head}");
        assert!(!head.contains("https"), "{head}");
        assert!(!head.contains("te: trailers"), "{head}");
    }

    #[tokio::test]
    async fn bodies_go_through_with_their_length_or_chunked_and_streams_share_one_connection() {
        let script = vec![Act::Answer(OK); 40];
        let (to, accepted, requests) = scripted(script).await;
        let (_router, port, backend) = h2c_router(to).await;
        let send = client(port).await;
        let mut all = Vec::new();
        for i in 0..20 {
            let mut send = send.clone();
            all.push(tokio::spawn(async move {
                let body = format!("body number {i}");
                let req = hyper::Request::post(format!("http://app.test:{port}/up"))
                    .header("content-length", body.len())
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                send.send_request(req).await.unwrap().status()
            }));
        }
        for t in all {
            assert_eq!(t.await.unwrap(), 200);
        }
        // A body of unknown length (no content-length) goes out chunked.
        let stream = futures_util::stream::iter(vec![
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"part one, "))),
            Ok(Frame::data(Bytes::from_static(b"part two"))),
        ]);
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (mut send2, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::post(format!("http://app.test:{port}/stream"))
            .body(http_body_util::StreamBody::new(stream))
            .unwrap();
        assert_eq!(send2.send_request(req).await.unwrap().status(), 200);
        let got = seen(&requests);
        assert_eq!(got.len(), 21);
        for i in 0..20 {
            let body = format!("body number {i}");
            assert!(
                got.iter().any(
                    |r| r.contains(&format!("content-length: {}\r\n", body.len()))
                        && r.ends_with(&format!("\r\n\r\n{body}"))
                ),
                "{body} not seen whole in {got:?}"
            );
        }
        let chunked = got.iter().find(|r| r.starts_with("POST /stream")).unwrap();
        assert!(
            chunked.contains("transfer-encoding: chunked\r\n"),
            "{chunked}"
        );
        assert!(
            chunked.contains("part one, ") && chunked.ends_with("0\r\n\r\n"),
            "{chunked}"
        );
        // Twenty streams of one client connection, on the router's pooled
        // connections: nothing stays in flight once the bodies are sent.
        assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) >= 1);
        assert_eq!(backend.inflight.get(), 0);
    }

    /// An h2c instance (hyper's server): answers each request with the
    /// method, path and body length it got, and a trailer.
    async fn h2c_instance() -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                let service =
                    hyper::service::service_fn(|req: hyper::Request<Incoming>| async move {
                        let what = format!("{} {}", req.method(), req.uri().path());
                        let te = req.headers().get("te").cloned();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let text = format!("{what} {} te={te:?}", body.len());
                        let mut trailers = hyper::HeaderMap::new();
                        trailers.insert("x-trailer", HeaderValue::from_static("end"));
                        let frames = vec![
                            Ok::<_, Infallible>(Frame::data(Bytes::from(text))),
                            Ok(Frame::trailers(trailers)),
                        ];
                        Ok::<_, Infallible>(Response::new(http_body_util::StreamBody::new(
                            futures_util::stream::iter(frames),
                        )))
                    });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), service),
                );
            }
        });
        port
    }

    #[tokio::test]
    async fn an_h2c_instance_gets_h2_from_either_front_and_its_trailers_reach_h2_clients() {
        let to = h2c_instance().await;
        let limits = RouterSpec {
            backend_protocol: BackendProtocol::H2c,
            ..RouterSpec::default()
        };
        let router = Router::new(Arc::new(crate::keeper::Keeper::none()));
        let (_router, port, _) = router_to_instance(to, limits, router, true).await;
        // HTTP/2 in, HTTP/2 out: the trailer comes through.
        let mut send = client(port).await;
        let req = hyper::Request::post(format!("http://app.test:{port}/rpc"))
            .body(Full::new(Bytes::from_static(b"12345")))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let all = resp.into_body().collect().await.unwrap();
        let trailers = all.trailers().cloned().expect("trailers");
        assert_eq!(trailers["x-trailer"], "end");
        let text = String::from_utf8_lossy(&all.to_bytes()).into_owned();
        assert!(
            text.starts_with("POST /rpc 5 te=Some(\"trailers\")"),
            "{text}"
        );
        // HTTP/1.1 in (a chunked body, read whole first): HTTP/2 out.
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(
            b"POST /up HTTP/1.1\r\nhost: app.test\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("POST /up 7 "), "{out}");
    }

    /// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1).
    fn int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
        let max = (1usize << n) - 1;
        if v < max {
            out.push(first | v as u8);
            return;
        }
        out.push(first | max as u8);
        v -= max;
        while v >= 128 {
            out.push((v % 128) as u8 | 0x80);
            v /= 128;
        }
        out.push(v as u8);
    }

    /// A header field as a literal without indexing, name and value raw:
    /// whatever the bytes, as a hostile client would send them.
    fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
        out.push(0);
        int(out, 0, 7, name.len());
        out.extend_from_slice(name);
        int(out, 0, 7, value.len());
        out.extend_from_slice(value);
    }

    fn block(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, v) in fields {
            literal(&mut out, n, v);
        }
        out
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    const DATA: u8 = 0;
    const HEADERS: u8 = 1;
    const RST_STREAM: u8 = 3;
    const SETTINGS: u8 = 4;
    const GOAWAY: u8 = 7;
    const CONTINUATION: u8 = 9;
    const END_STREAM: u8 = 1;
    const END_HEADERS: u8 = 4;

    /// A connection of raw frames, as a hostile client writes them.
    async fn raw(port: u16) -> TcpStream {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(PREFACE).await.unwrap();
        s.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        s
    }

    /// How the router ended stream 1 (or the connection).
    #[derive(Debug, PartialEq)]
    enum End {
        /// A response, and the text of its DATA.
        Answered(String),
        Reset(u32),
        GoAway(u32),
        Closed,
        /// Nothing more within 10 s.
        Silent,
    }

    async fn outcome(s: &mut TcpStream, stream: u32) -> End {
        let mut data = Vec::new();
        let mut answered = false;
        loop {
            let mut head = [0u8; 9];
            let read = tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head));
            match read.await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return End::Closed,
                Err(_) => return End::Silent,
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            if s.read_exact(&mut payload).await.is_err() {
                return End::Closed;
            }
            let code = |at: usize| u32::from_be_bytes(payload[at..at + 4].try_into().unwrap());
            match kind {
                SETTINGS if flags & 1 == 0 => {
                    let _ = s.write_all(&frame(SETTINGS, 1, 0, &[])).await;
                }
                GOAWAY => return End::GoAway(code(4)),
                RST_STREAM if id == stream => return End::Reset(code(0)),
                HEADERS if id == stream => {
                    answered = true;
                    if flags & END_STREAM != 0 {
                        return End::Answered(String::new());
                    }
                }
                DATA if id == stream => {
                    data.extend_from_slice(&payload);
                    if flags & END_STREAM != 0 && answered {
                        return End::Answered(String::from_utf8_lossy(&data).into_owned());
                    }
                }
                _ => {}
            }
        }
    }

    /// Header fields as raw names and values.
    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    /// A request's fields with `extra` among them, on stream 1.
    fn request(port: u16, extra: &[(&[u8], &[u8])]) -> Fields {
        let authority = format!("app.test:{port}");
        let mut fields: Fields = vec![
            (b":method".to_vec(), b"GET".to_vec()),
            (b":scheme".to_vec(), b"http".to_vec()),
            (b":path".to_vec(), b"/".to_vec()),
            (b":authority".to_vec(), authority.into_bytes()),
        ];
        fields.extend(extra.iter().map(|(n, v)| (n.to_vec(), v.to_vec())));
        fields
    }

    async fn send_fields(port: u16, fields: &[(Vec<u8>, Vec<u8>)], flags: u8) -> TcpStream {
        let mut s = raw(port).await;
        let refs: Vec<(&[u8], &[u8])> = fields.iter().map(|(n, v)| (&n[..], &v[..])).collect();
        s.write_all(&frame(HEADERS, flags | END_HEADERS, 1, &block(&refs)))
            .await
            .unwrap();
        s
    }

    #[tokio::test]
    async fn h2_fields_that_would_smuggle_or_lie_in_http11_never_reach_an_instance() {
        let (to, _, requests) = scripted(vec![Act::Answer(OK); 4]).await;
        let (router, port, _) = h2c_router(to).await;
        let cases: Vec<(&str, Fields)> = vec![
            (
                "CR LF in a value",
                request(port, &[(b"x-a", b"1\r\nx-injected: 1")]),
            ),
            (
                "LF in a value",
                request(port, &[(b"x-a", b"1\nx-injected: 1")]),
            ),
            ("NUL in a value", request(port, &[(b"x-a", b"1\0")])),
            ("an uppercase name", request(port, &[(b"X-Upper", b"1")])),
            ("a colon in a name", request(port, &[(b"x-a:b", b"1")])),
            (
                "transfer-encoding",
                request(port, &[(b"transfer-encoding", b"chunked")]),
            ),
            ("connection", request(port, &[(b"connection", b"close")])),
            ("keep-alive", request(port, &[(b"keep-alive", b"1")])),
            ("upgrade", request(port, &[(b"upgrade", b"websocket")])),
            ("te other than trailers", request(port, &[(b"te", b"gzip")])),
            (
                "a repeated pseudo-header",
                request(port, &[(b":path", b"/other")]),
            ),
            (
                "an unknown pseudo-header",
                request(port, &[(b":smuggle", b"1")]),
            ),
            ("a pseudo-header after a field", {
                let mut f = request(port, &[(b"x-a", b"1")]);
                let path = f.remove(2);
                f.push(path);
                f
            }),
            ("no :path", {
                let mut f = request(port, &[]);
                f.remove(2);
                f
            }),
            (
                "host disagreeing with :authority",
                request(port, &[(b"host", b"other.test")]),
            ),
        ];
        for (what, fields) in cases {
            let mut s = send_fields(port, &fields, END_STREAM).await;
            let end = outcome(&mut s, 1).await;
            // The h2 crate's PROTOCOL_ERROR (the stream's, or the
            // connection's when HPACK itself is bad); the disagreeing host
            // is the router's own 400.
            if what.starts_with("host") {
                assert_eq!(end, End::Answered(":authority and host disagree\n".into()));
            } else {
                assert!(
                    matches!(end, End::Reset(1) | End::GoAway(1)),
                    "{what}: {end:?}"
                );
            }
            assert!(
                seen(&requests).is_empty(),
                "{what}: reached the instance: {:?}",
                seen(&requests)
            );
        }
        // The router still serves a well-formed request afterwards.
        let mut s = send_fields(port, &request(port, &[]), END_STREAM).await;
        assert_eq!(outcome(&mut s, 1).await, End::Answered("ok".into()));
        drop(router);
    }

    #[tokio::test]
    async fn data_that_disagrees_with_content_length_is_never_read_as_another_request() {
        // The body smuggles a second request if the instance were framed
        // by the DATA and not by the length.
        let smuggled = b"GET /admin HTTP/1.1\r\nhost: x\r\n\r\n";
        let (to, _, requests) = scripted(vec![Act::Answer(OK); 4]).await;
        let (_router, port, _) = h2c_router(to).await;
        for declared in [b"0".as_slice(), b"3"] {
            let mut f = request(port, &[(b"content-length", declared)]);
            f[0].1 = b"POST".to_vec();
            let mut s = send_fields(port, &f, 0).await;
            let mut body = b"abc".to_vec();
            body.extend_from_slice(smuggled);
            s.write_all(&frame(DATA, END_STREAM, 1, &body))
                .await
                .unwrap();
            // PROTOCOL_ERROR on the stream, before its end.
            assert_eq!(outcome(&mut s, 1).await, End::Reset(1));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        for r in seen(&requests) {
            assert!(!r.contains("/admin"), "smuggled: {r}");
        }
        // At most the declared bytes went out to the instance, on a
        // connection that is then closed.
        assert!(seen(&requests).iter().all(|r| !r.starts_with("GET")));
    }

    #[tokio::test]
    async fn a_header_list_past_the_cap_and_a_continuation_flood_end_without_reaching_an_instance()
    {
        let (to, _, requests) = scripted(vec![Act::Answer(OK); 4]).await;
        let (_router, port, _) = h2c_router(to).await;
        // An HPACK bomb: one large field indexed once, then referenced
        // again and again (each reference counts its full size).
        let mut s = raw(port).await;
        let mut block = Vec::new();
        for (n, v) in request(port, &[]) {
            literal(&mut block, &n, &v);
        }
        // Literal with incremental indexing: index 62 afterwards.
        block.push(0x40);
        int(&mut block, 0, 7, 5);
        block.extend_from_slice(b"x-big");
        int(&mut block, 0, 7, 3000);
        block.extend_from_slice(&[b'a'; 3000]);
        for _ in 0..2000 {
            int(&mut block, 0x80, 7, 62);
        }
        s.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &block))
            .await
            .unwrap();
        // ENHANCE_YOUR_CALM: the list is far past the cap.
        assert_eq!(outcome(&mut s, 1).await, End::GoAway(11));
        // CONTINUATION without end: the router must stop reading it.
        let mut s = raw(port).await;
        let first = self::block(&[(b":method", b"GET")]);
        s.write_all(&frame(HEADERS, END_STREAM, 1, &first))
            .await
            .unwrap();
        let filler = self::block(&[(b"x-filler", &[b'b'; 4000])]);
        let mut sent = 0usize;
        let mut ended = false;
        for _ in 0..10_000 {
            if s.write_all(&frame(CONTINUATION, 0, 1, &filler))
                .await
                .is_err()
            {
                ended = true;
                break;
            }
            sent += filler.len();
        }
        if !ended {
            let end = outcome(&mut s, 1).await;
            assert!(
                matches!(end, End::GoAway(_) | End::Closed),
                "{end:?} after {sent} bytes"
            );
        }
        assert!(seen(&requests).is_empty());
    }

    #[tokio::test]
    async fn a_rapid_reset_flood_ends_the_connection() {
        let (to, _, _) = scripted(vec![Act::Answer(OK); 100_000]).await;
        let (_router, port, _) = h2c_router(to).await;
        let mut s = raw(port).await;
        let fields = request(port, &[]);
        let refs: Vec<(&[u8], &[u8])> = fields.iter().map(|(n, v)| (&n[..], &v[..])).collect();
        let block = block(&refs);
        let mut burst = Vec::new();
        let mut ended = false;
        for i in 0..5_000u32 {
            let id = 2 * i + 1;
            burst.extend_from_slice(&frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
            burst.extend_from_slice(&frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
            if burst.len() > 64 * 1024 {
                if s.write_all(&burst).await.is_err() {
                    ended = true;
                    break;
                }
                burst.clear();
            }
        }
        if !ended {
            let _ = s.write_all(&burst).await;
            // Stream 0 never answers: only the connection's end comes.
            let end = outcome(&mut s, 0).await;
            assert!(matches!(end, End::GoAway(_) | End::Closed), "{end:?}");
        }
    }
}
