//! The router's HTTP/1.1 client to instances: one router thread's pool of
//! keep-alive connections, driven inside the request's own task.
//!
//! hyper's client runs each connection as a separate task and hands every
//! request and response across it through channels; under load `perf`
//! showed that hand-off (task wakeups, channel pushes, the body channel) as
//! the largest part of the router's user time. Here the request's task
//! writes the request, reads the response head and, when the whole body
//! came with it (the common case), returns the connection to the pool at
//! once: no second task, no channel. Larger bodies stream from the socket
//! as the client side asks for them.
//!
//! The request head arrives encoded (the server side writes it straight
//! from the client's bytes), and the response head goes back as its bytes
//! and where each header lies in them: no header map is built either way.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::router::wire::{
    self, Coding, Decoder, Framing, FramingError, MAX_HEAD, MAX_HEADERS, Step,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why an instance did not answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made: nothing was sent, another instance may
    /// take the request.
    #[error("{0}")]
    Connect(io::Error),
    /// The request was sent (or partly sent) and failed.
    #[error("{0}")]
    Request(#[from] ProtocolError),
}

/// What went wrong on an established connection.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    #[error("the connection closed before a complete response")]
    Closed,
    /// The instance had closed a pooled connection before the request went
    /// out on it: nothing was processed, the request may go out again.
    #[error("the instance closed an idle connection")]
    Stale,
    #[error("invalid response head: {0}")]
    Parse(httparse::Error),
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// A transfer coding other than `chunked`: the router cannot forward
    /// the body faithfully (it would reach the client still encoded).
    #[error("unsupported transfer-encoding in the response")]
    Coding,
    #[error(transparent)]
    Framing(#[from] FramingError),
    #[error("the request body failed: {0}")]
    RequestBody(BoxError),
    #[error("101 Switching Protocols to a request that asked for no upgrade")]
    UnexpectedUpgrade,
    /// The instance's HTTP/2 stream or connection failed.
    #[error("HTTP/2: {0}")]
    Stream(hyper::Error),
}

/// A request as it goes out: its head, encoded by the caller, and what the
/// client must know about it.
pub struct Outgoing<'a> {
    /// `METHOD TARGET HTTP/1.1`, the headers and the empty line.
    pub head: &'a [u8],
    /// A response to HEAD has no body, whatever its headers say.
    pub head_method: bool,
    /// The request may be sent twice (RFC 9110 §9.2.2).
    pub idempotent: bool,
    /// It asks for a protocol upgrade: a 101 is expected, not an error.
    pub upgrade: bool,
    /// The body goes out chunk-encoded (the head says so).
    pub chunked: bool,
}

/// One kept-alive connection to an instance, with what was read past the
/// last response (nothing, on a well-behaved instance).
pub struct UpConn {
    io: TcpStream,
    buf: BytesMut,
    /// It has served a request before: a close before any answer may mean
    /// the instance closed it while idle, and the request may go out again.
    reused: bool,
    /// When it last went back to the pool.
    idle_since: Instant,
}

impl UpConn {
    /// Whether the instance has closed it (or written to it unasked) while
    /// it was idle: it is then readable.
    fn closed_while_idle(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => false,
            // Readiness may be left over from the last read: a read tells
            // whether anything is really there.
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                !matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Poll::Ready(Err(_)) => true,
        }
    }
}

/// A pooled connection idle longer than this is closed (nginx's upstream
/// `keepalive_timeout` is 60 s too).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// One router thread's idle connections to instances, by address. Only its
/// thread uses it (the lock is never contended).
#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<UpConn>>>,
    /// One multiplexed HTTP/2 connection per h2c instance (hyper's client:
    /// its connection task runs on this thread).
    h2c: Mutex<HashMap<SocketAddr, H2Sender>>,
}

/// A request body as it goes to an h2c instance (hyper's client sends it
/// from the connection's task: owned, not borrowed).
pub type H2Out = http_body_util::combinators::BoxBody<Bytes, BoxError>;

type H2Sender = hyper::client::conn::http2::SendRequest<H2Out>;

impl Pool {
    /// An idle connection to `addr` that is still open. One the instance
    /// closed (or wrote to, unasked) while idle is readable: it is dropped.
    fn checkout(&self, addr: SocketAddr) -> Option<UpConn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(&addr)?;
        while let Some(c) = list.pop() {
            if !c.closed_while_idle() {
                return Some(c);
            }
        }
        None
    }

    /// Close the idle connections the instances closed, and those idle
    /// longer than [`IDLE_TIMEOUT`] at `now`; forget instances with none
    /// left (their addresses are gone once they are).
    pub fn reap(&self, now: Instant) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|_, list| {
            list.retain(|c| {
                now.saturating_duration_since(c.idle_since) < IDLE_TIMEOUT && !c.closed_while_idle()
            });
            !list.is_empty()
        });
        let mut h2c = self.h2c.lock().unwrap_or_else(|p| p.into_inner());
        h2c.retain(|_, s| !s.is_closed());
    }

    /// How many idle connections it holds.
    #[cfg(test)]
    fn idle(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.values().map(Vec::len).sum()
    }

    /// A response has been read to its end: the connection goes back to the
    /// pool if it may carry another request and nothing stray follows the
    /// response; otherwise it is closed.
    fn done(&self, addr: SocketAddr, mut conn: UpConn, keep_alive: bool) {
        if keep_alive && conn.buf.is_empty() {
            conn.reused = true;
            conn.idle_since = Instant::now();
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.entry(addr).or_default().push(conn);
        }
    }

    async fn connect(addr: SocketAddr) -> io::Result<UpConn> {
        let io = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        io.set_nodelay(true)?;
        Ok(UpConn {
            io,
            buf: BytesMut::new(),
            reused: false,
            idle_since: Instant::now(),
        })
    }

    /// Send a request to the instance at `addr` and read its response head.
    ///
    /// A request without a body that meets a pooled connection the instance
    /// had closed goes out again on a new connection.
    pub async fn send<B>(
        self: &Arc<Self>,
        addr: SocketAddr,
        req: &Outgoing<'_>,
        body: Option<B>,
    ) -> Result<UpResponse, UpstreamError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        if let Some(conn) = self.checkout(addr) {
            if body.is_some() {
                return self.exchange(addr, conn, req, body).await;
            }
            match self.exchange(addr, conn, req, None::<B>).await {
                Err(UpstreamError::Request(ProtocolError::Stale)) => {}
                other => return other,
            }
        }
        let conn = Self::connect(addr).await.map_err(UpstreamError::Connect)?;
        self.exchange(addr, conn, req, body).await
    }

    async fn exchange<B>(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut conn: UpConn,
        req: &Outgoing<'_>,
        body: Option<B>,
    ) -> Result<UpResponse, UpstreamError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let reused = conn.reused;
        // A write that fails on a reused connection: the instance had
        // closed it while it was idle.
        let stale = |e: ProtocolError| match e {
            ProtocolError::Io(_) if reused => ProtocolError::Stale,
            e => e,
        };
        let head = match body {
            None => {
                conn.io
                    .write_all(req.head)
                    .await
                    .map_err(|e| stale(e.into()))?;
                read_final_head(&mut conn.io, &mut conn.buf, reused && req.idempotent, req).await?
            }
            Some(body) => {
                // The instance may answer before it has read the whole body
                // (a 413, a redirect): its answer is read while the body goes
                // out, and wins; the rest of the body is not sent, and the
                // connection is not reused.
                let (mut rd, mut wr) = conn.io.split();
                let send = std::pin::pin!(async {
                    wr.write_all(req.head).await?;
                    send_body(&mut wr, body, req.chunked).await
                });
                let mut read = std::pin::pin!(read_final_head(&mut rd, &mut conn.buf, false, req));
                tokio::select! {
                    sent = send => match sent {
                        Ok(()) => read.await?,
                        // The client's body failed: the instance would wait
                        // for the rest of it.
                        Err(e @ ProtocolError::RequestBody(_)) => return Err(e.into()),
                        // It may have answered and closed: the answer is
                        // still there to read.
                        Err(e) => match read.await {
                            Ok(mut head) => {
                                head.keep_alive = false;
                                head
                            }
                            Err(_) => return Err(stale(e).into()),
                        },
                    },
                    head = &mut read => {
                        let mut head = head?;
                        head.keep_alive = false;
                        head
                    }
                }
            }
        };
        if head.status == 101 {
            if !req.upgrade {
                return Err(ProtocolError::UnexpectedUpgrade.into());
            }
            return Ok(UpResponse {
                head,
                body: UpBody::Upgrade(Box::new(conn)),
            });
        }
        let body = match head.framing {
            Framing::Length(n) if conn.buf.len() as u64 >= n => {
                // The whole body is here (n fits: it is at most buf.len()).
                let body = conn.buf.split_to(n as usize).freeze();
                self.done(addr, conn, head.keep_alive);
                UpBody::Full(Some(body))
            }
            Framing::Empty => {
                self.done(addr, conn, head.keep_alive);
                UpBody::Full(None)
            }
            framing => UpBody::Stream(Box::new(Streaming {
                conn: Some(conn),
                decoder: Decoder::new(framing),
                keep_alive: head.keep_alive,
                addr,
                pool: self.clone(),
            })),
        };
        Ok(UpResponse { head, body })
    }
}

impl Pool {
    /// Send a request to the h2c instance at `addr` over its multiplexed
    /// connection (made when there is none, or it has closed) and read its
    /// response head. The head arrives as the HTTP/1.1 front wrote it for
    /// an HTTP/1.1 instance; it goes out as HTTP/2 with `te: trailers`
    /// (gRPC servers ask for it: the router passes trailers on to HTTP/2
    /// clients).
    pub async fn send_h2c(
        self: &Arc<Self>,
        addr: SocketAddr,
        req: &Outgoing<'_>,
        body: Option<H2Out>,
    ) -> Result<UpResponse, UpstreamError> {
        let request = h2_request(req.head, body)?;
        let cached = {
            let mut h2c = self.h2c.lock().unwrap_or_else(|p| p.into_inner());
            match h2c.get(&addr) {
                Some(s) if !s.is_closed() => Some(s.clone()),
                Some(_) => {
                    h2c.remove(&addr);
                    None
                }
                None => None,
            }
        };
        let mut sender = match cached {
            Some(s) => s,
            None => {
                let s = connect_h2c(addr).await.map_err(UpstreamError::Connect)?;
                let mut h2c = self.h2c.lock().unwrap_or_else(|p| p.into_inner());
                h2c.insert(addr, s.clone());
                s
            }
        };
        if sender.ready().await.is_err() {
            // It closed before this request went out: nothing was sent.
            self.h2c
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&addr);
            return Err(UpstreamError::Connect(io::Error::other(
                "the HTTP/2 connection closed",
            )));
        }
        let resp = sender.send_request(request).await.map_err(|e| {
            if broke_its_body(&e) {
                ProtocolError::RequestBody(Box::new(e))
            } else {
                ProtocolError::Stream(e)
            }
        })?;
        let (parts, body) = resp.into_parts();
        // The response head as HTTP/1.1 would have brought it: the rest of
        // the router reads one kind of head.
        let mut head = BytesMut::with_capacity(256);
        head.extend_from_slice(
            format!(
                "HTTP/1.1 {} {}\r\n",
                parts.status.as_u16(),
                parts.status.canonical_reason().unwrap_or("Unknown")
            )
            .as_bytes(),
        );
        for (name, value) in &parts.headers {
            if wire::is_hop_by_hop(name.as_str()) {
                continue;
            }
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        let head = parse_head(&mut head, req.head_method)?.ok_or(ProtocolError::Closed)?;
        Ok(UpResponse {
            head,
            body: UpBody::H2(body),
        })
    }
}

/// Whether hyper's error is the request body's (the client's) failure.
fn broke_its_body(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<crate::router::forward::ClientError>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// An HTTP/2 request from the instance's HTTP/1.1 head (which the front
/// wrote, checked, from the client's request).
fn h2_request(head: &[u8], body: Option<H2Out>) -> Result<hyper::Request<H2Out>, ProtocolError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS + 8];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(head).map_err(ProtocolError::Parse)?;
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return Err(ProtocolError::Parse(httparse::Error::Token));
    };
    let host = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("host"))
        .map(|h| String::from_utf8_lossy(h.value).into_owned())
        .unwrap_or_default();
    let mut out = hyper::Request::builder()
        .method(method)
        .version(hyper::Version::HTTP_2)
        .uri(format!("http://{host}{path}"));
    for h in req.headers.iter() {
        // HTTP/2 has its own framing and no connection-specific fields.
        if h.name.eq_ignore_ascii_case("host") || wire::is_hop_by_hop(h.name) {
            continue;
        }
        out = out.header(h.name, h.value);
    }
    out = out.header(hyper::header::TE, "trailers");
    let body = body.unwrap_or_else(|| {
        use http_body_util::BodyExt;
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed()
    });
    out.body(body)
        .map_err(|_| ProtocolError::Parse(httparse::Error::Token))
}

/// A new HTTP/2 connection (prior knowledge) to an h2c instance.
async fn connect_h2c(addr: SocketAddr) -> io::Result<H2Sender> {
    let io = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    io.set_nodelay(true)?;
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// Stream a request body, chunk-encoded when its length is not known.
async fn send_body<B, W>(io: &mut W, mut body: B, chunked: bool) -> Result<(), ProtocolError>
where
    W: tokio::io::AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut line = Vec::with_capacity(18);
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| ProtocolError::RequestBody(e.into()))?;
        // Request trailers are not forwarded.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            line.clear();
            wire::chunk_size_line(&mut line, data.len());
            io.write_all(&line).await?;
            io.write_all(&data).await?;
            io.write_all(b"\r\n").await?;
        } else {
            io.write_all(&data).await?;
        }
    }
    if chunked {
        io.write_all(b"0\r\n\r\n").await?;
    }
    Ok(())
}

/// An instance's response: its head, and its body on the way.
pub struct UpResponse {
    pub head: UpHead,
    pub body: UpBody,
}

/// A parsed response head. Names and values are where they lie in its
/// bytes; nothing is copied.
pub struct UpHead {
    pub status: u16,
    bytes: Bytes,
    reason: Range<usize>,
    headers: Vec<(Range<usize>, Range<usize>)>,
    /// How its body is framed (`Empty` for a response to HEAD).
    pub framing: Framing,
    /// The one `Content-Length` value it declared, if any: what a response
    /// to HEAD, or a 304, says of the body it has not.
    pub length: Option<u64>,
    keep_alive: bool,
}

impl UpHead {
    pub fn reason(&self) -> &[u8] {
        &self.bytes[self.reason.clone()]
    }

    /// Each header's name and value, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers.iter().map(|(n, v)| {
            // httparse accepted the name as a token: ASCII.
            let name = std::str::from_utf8(&self.bytes[n.clone()]).unwrap_or_default();
            (name, &self.bytes[v.clone()])
        })
    }
}

/// Read and parse the final response head (past any 100 Continue or 103
/// Early Hints) from `io` into `buf`.
///
/// When `repeatable`, the request went out on a reused connection and may
/// be sent again: an end (or reset) before any byte of an answer means the
/// instance had closed the connection while it was idle (`Stale`).
async fn read_final_head<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    repeatable: bool,
    req: &Outgoing<'_>,
) -> Result<UpHead, ProtocolError> {
    let stale = |received: bool| repeatable && !received;
    let mut received = false;
    loop {
        if !buf.is_empty()
            && let Some(head) = parse_head(buf, req.head_method)?
        {
            if (100..200).contains(&head.status) && head.status != 101 {
                continue; // the answer follows
            }
            return Ok(head);
        }
        if buf.len() > MAX_HEAD {
            return Err(ProtocolError::HeadTooLarge);
        }
        match wire::read_buf(io, buf).await {
            Ok(0) if stale(received) => return Err(ProtocolError::Stale),
            Ok(0) => return Err(ProtocolError::Closed),
            Ok(_) => received = true,
            Err(_) if stale(received) => return Err(ProtocolError::Stale),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Parse a complete head at the front of `buf` (consuming it), or `None`
/// when more bytes are needed.
pub(crate) fn parse_head(
    buf: &mut BytesMut,
    head_method: bool,
) -> Result<Option<UpHead>, ProtocolError> {
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    );
    let len = match parsed {
        // The limit holds however the head arrived.
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
            return Err(ProtocolError::HeadTooLarge);
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ProtocolError::Parse(e)),
    };
    let status = resp
        .code
        .filter(|c| (100..1000).contains(c))
        .ok_or(ProtocolError::Parse(httparse::Error::Status))?;
    let declared = wire::declared(resp.headers)?;
    // Whether the connection may carry another request after this response.
    let mut keep_alive = if resp.version == Some(0) {
        wire::connection_has(resp.headers, b"keep-alive")
    } else {
        !wire::connection_has(resp.headers, b"close")
    };
    // RFC 9112 §6.3.
    let framing = if head_method || (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Empty
    } else {
        match declared.transfer {
            Some(Coding::Chunked) => {
                // A length beside it is not the body's, and may be an
                // attempt at splitting: the connection is not reused.
                if declared.length.is_some() {
                    keep_alive = false;
                }
                Framing::CHUNKED
            }
            Some(Coding::Unsupported | Coding::NotChunked) => return Err(ProtocolError::Coding),
            None => match declared.length {
                Some(n) => Framing::Length(n),
                None => Framing::Eof,
            },
        }
    };
    // Offsets into the head, so it can be split off the buffer and shared.
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| {
        let i = s.as_ptr() as usize - base;
        i..i + s.len()
    };
    let reason = at(resp.reason.unwrap_or_default().as_bytes());
    let headers = resp
        .headers
        .iter()
        .map(|h| (at(h.name.as_bytes()), at(h.value)))
        .collect();
    Ok(Some(UpHead {
        status,
        bytes: buf.split_to(len).freeze(),
        reason,
        headers,
        framing,
        length: declared.length,
        // Close-delimited bodies end with the connection.
        keep_alive: keep_alive && framing != Framing::Eof,
    }))
}

/// A response body on its way from an instance.
pub enum UpBody {
    /// All of it (or none) came with the head; the connection is back in
    /// the pool already.
    Full(Option<Bytes>),
    /// Read from the connection as the client side asks for it.
    Stream(Box<Streaming>),
    /// A 101: the connection belongs to the upgraded protocol.
    Upgrade(Box<UpConn>),
    /// An h2c instance's stream: its DATA, then its trailers.
    H2(hyper::body::Incoming),
}

impl UpBody {
    /// The connection of a 101, and the bytes the instance sent after it.
    pub fn into_upgraded(self) -> Option<(TcpStream, Bytes)> {
        match self {
            Self::Upgrade(c) => Some((c.io, c.buf.freeze())),
            _ => None,
        }
    }
}

pub struct Streaming {
    conn: Option<UpConn>,
    decoder: Decoder,
    keep_alive: bool,
    addr: SocketAddr,
    pool: Arc<Pool>,
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = ProtocolError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ProtocolError>>> {
        let s = match self.get_mut() {
            Self::Full(b) => return Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Self::Upgrade(_) => return Poll::Ready(None),
            Self::H2(b) => {
                return Pin::new(b).poll_frame(cx).map_err(ProtocolError::Stream);
            }
            Self::Stream(s) => s,
        };
        let Some(mut conn) = s.conn.take() else {
            return Poll::Ready(None);
        };
        loop {
            match s.decoder.step(&mut conn.buf) {
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
                Ok(Step::Data(d)) => {
                    s.conn = Some(conn);
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Ok(Step::End) => {
                    s.pool.done(s.addr, conn, s.keep_alive);
                    return Poll::Ready(None);
                }
                Ok(Step::More) => match wire::poll_read_buf(&mut conn.io, cx, &mut conn.buf) {
                    Poll::Pending => {
                        s.conn = Some(conn);
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                    Poll::Ready(Ok(0)) if s.decoder.framing() == Framing::Eof => {
                        return Poll::Ready(None);
                    }
                    Poll::Ready(Ok(0)) => return Poll::Ready(Some(Err(ProtocolError::Closed))),
                    Poll::Ready(Ok(_)) => {}
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(b) => b.is_none(),
            Self::Upgrade(_) => true,
            Self::H2(b) => b.is_end_stream(),
            Self::Stream(s) => s.conn.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Upgrade(_) => SizeHint::with_exact(0),
            Self::H2(b) => b.size_hint(),
            Self::Stream(s) => match s.decoder.framing() {
                Framing::Length(n) => SizeHint::with_exact(n),
                _ => SizeHint::default(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::testing::{Act, answers_early, scripted};
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::sync::atomic::Ordering;

    /// A request as the server side would hand it over.
    struct Req {
        head: Vec<u8>,
        method: &'static str,
        chunked: bool,
    }

    impl Req {
        fn out(&self) -> Outgoing<'_> {
            Outgoing {
                head: &self.head,
                head_method: self.method == "HEAD",
                idempotent: matches!(self.method, "GET" | "HEAD" | "PUT" | "DELETE"),
                upgrade: false,
                chunked: self.chunked,
            }
        }
    }

    fn request(method: &'static str, path: &str) -> Req {
        Req {
            head: format!("{method} {path} HTTP/1.1\r\nhost: x\r\n\r\n").into_bytes(),
            method,
            chunked: false,
        }
    }

    fn loopback(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    async fn fetch(pool: &Arc<Pool>, port: u16, req: &Req) -> Result<(u16, Bytes), UpstreamError> {
        // A framing read wrong waits for bytes that never come: fail instead.
        tokio::time::timeout(Duration::from_secs(10), async {
            let resp = pool
                .send(loopback(port), &req.out(), None::<Full<Bytes>>)
                .await?;
            let body = resp.body.collect().await?.to_bytes();
            Ok((resp.head.status, body))
        })
        .await
        .expect("the response ended within 10 s")
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    #[tokio::test]
    async fn a_connection_is_reused_and_one_the_instance_closed_is_replaced() {
        use Act::*;
        let (port, accepted, _) = scripted(vec![
            Answer(OK),
            AnswerClose(OK),
            Answer(OK),
            AnswerClose(OK),
        ])
        .await;
        let pool = Arc::new(Pool::default());
        for _ in 0..4 {
            let (status, body) = fetch(&pool, port, &request("GET", "/")).await.unwrap();
            assert_eq!((status, &body[..]), (200, &b"ok"[..]));
            // Let the pool see the instance close the connection, when it does.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "two requests per connection: four requests, two connections"
        );
    }

    #[tokio::test]
    async fn reaping_closes_what_the_instance_closed_and_what_idled_too_long() {
        use Act::*;
        let (port, _, _) = scripted(vec![Answer(OK), AnswerClose(OK)]).await;
        let (other, _, _) = scripted(vec![Answer(OK)]).await;
        let pool = Arc::new(Pool::default());
        // The first instance answers twice on one connection, then closes it.
        fetch(&pool, port, &request("GET", "/")).await.unwrap();
        fetch(&pool, port, &request("GET", "/")).await.unwrap();
        fetch(&pool, other, &request("GET", "/")).await.unwrap();
        assert_eq!(pool.idle(), 2);
        tokio::time::sleep(Duration::from_millis(50)).await;
        pool.reap(Instant::now());
        assert_eq!(pool.idle(), 1, "the closed one is gone, the open one kept");
        pool.reap(Instant::now() + IDLE_TIMEOUT);
        assert_eq!(pool.idle(), 0, "and an idle one times out");
        assert!(
            pool.idle.lock().unwrap().is_empty(),
            "instances without connections are forgotten"
        );
    }

    #[tokio::test]
    async fn a_request_dropped_on_a_reused_connection_goes_out_again_if_repeatable() {
        use Act::*;
        let (port, accepted, _) = scripted(vec![Answer(OK), Drop, Answer(OK), Drop]).await;
        let pool = Arc::new(Pool::default());
        fetch(&pool, port, &request("GET", "/")).await.unwrap();
        // The instance reads the second request and closes: as if it had
        // closed the idle connection just as the request went out.
        let (status, _) = fetch(&pool, port, &request("GET", "/")).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // A POST may have been acted on: it is not sent twice.
        let err = fetch(&pool, port, &request("POST", "/")).await.unwrap_err();
        assert!(
            matches!(err, UpstreamError::Request(ProtocolError::Closed)),
            "{err}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn every_framing_is_read_to_its_end_on_one_connection() {
        use Act::*;
        let big: &'static [u8] = {
            let mut v = b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n".to_vec();
            v.resize(v.len() + (1 << 20), b'b');
            v.leak()
        };
        let (port, accepted, _) = scripted(vec![
            // HEAD: a length, but no body follows.
            Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            Answer(b"HTTP/1.1 204 No Content\r\n\r\n"),
            Answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 3\r\n\r\nnew"),
            Answer(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n"),
            Answer(big),
            AnswerClose(b"HTTP/1.1 200 OK\r\n\r\nuntil the end"),
            Answer(OK),
        ])
        .await;
        let pool = Arc::new(Pool::default());
        let (status, body) = fetch(&pool, port, &request("HEAD", "/")).await.unwrap();
        assert_eq!((status, body.len()), (200, 0));
        let (status, body) = fetch(&pool, port, &request("GET", "/")).await.unwrap();
        assert_eq!((status, body.len()), (204, 0));
        let (status, body) = fetch(&pool, port, &request("GET", "/")).await.unwrap();
        assert_eq!((status, &body[..]), (201, &b"new"[..]));
        let (_, body) = fetch(&pool, port, &request("GET", "/")).await.unwrap();
        assert_eq!(&body[..], b"hello world");
        let (_, body) = fetch(&pool, port, &request("GET", "/")).await.unwrap();
        assert!(body.len() == 1 << 20 && body.iter().all(|&b| b == b'b'));
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "all on one connection");
        let (_, body) = fetch(&pool, port, &request("GET", "/")).await.unwrap();
        assert_eq!(&body[..], b"until the end");
        // A close-delimited body ends its connection.
        let (_, body) = fetch(&pool, port, &request("GET", "/")).await.unwrap();
        assert_eq!(&body[..], b"ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_response_that_breaks_the_protocol_is_an_error() {
        use Act::*;
        let (port, _, _) = scripted(vec![
            AnswerClose(b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\nx"),
            AnswerClose(b"nonsense\r\n\r\n"),
            AnswerClose(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n"),
            AnswerClose(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"),
        ])
        .await;
        let pool = Arc::new(Pool::default());
        let get = request("GET", "/");
        let err = |r: Result<_, UpstreamError>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(fetch(&pool, port, &get).await).contains("content-length"));
        assert!(err(fetch(&pool, port, &get).await).contains("invalid response head"));
        assert!(err(fetch(&pool, port, &get).await).contains("101"));
        let resp = pool
            .send(loopback(port), &get.out(), None::<Full<Bytes>>)
            .await
            .unwrap();
        let cut = resp.body.collect().await.map(|_| ()).unwrap_err();
        assert!(matches!(cut, ProtocolError::Closed), "{cut}");
    }

    #[tokio::test]
    async fn an_answer_before_the_whole_body_is_sent_wins() {
        use tokio_stream::StreamExt;
        let port =
            answers_early(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 8\r\n\r\ntoo big!")
                .await;
        let pool = Arc::new(Pool::default());
        let mut post = request("POST", "/up");
        post.head = b"POST /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        post.chunked = true;
        // A body that never ends.
        let first = tokio_stream::iter([Ok::<_, std::convert::Infallible>(Frame::data(
            Bytes::from("part"),
        ))]);
        let body = StreamBody::new(first.chain(tokio_stream::pending()));
        let resp = tokio::time::timeout(
            Duration::from_secs(10),
            pool.send(loopback(port), &post.out(), Some(body)),
        )
        .await
        .expect("the early answer came through")
        .unwrap();
        assert_eq!(resp.head.status, 413);
        assert_eq!(
            &resp.body.collect().await.unwrap().to_bytes()[..],
            b"too big!"
        );
        assert_eq!(
            pool.idle(),
            0,
            "a connection whose request was cut is not reused"
        );
    }

    #[tokio::test]
    async fn a_request_body_that_fails_ends_the_exchange_at_once() {
        use tokio_stream::StreamExt;
        // An instance that reads and never answers.
        let (port, _, _) = scripted(Vec::new()).await;
        let pool = Arc::new(Pool::default());
        let mut post = request("POST", "/up");
        post.head = b"POST /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        post.chunked = true;
        let frames =
            tokio_stream::iter([Ok(Frame::data(Bytes::from("part")))]).chain(tokio_stream::iter([
                Err(io::Error::other("the client went away")),
            ]));
        let sent = tokio::time::timeout(
            Duration::from_secs(10),
            pool.send(loopback(port), &post.out(), Some(StreamBody::new(frames))),
        )
        .await
        .expect("no wait for an answer to a request cut short");
        assert!(
            matches!(
                sent,
                Err(UpstreamError::Request(ProtocolError::RequestBody(_)))
            ),
            "{:?}",
            sent.err()
        );
    }

    #[tokio::test]
    async fn a_body_goes_out_chunk_encoded_when_asked_and_as_is_otherwise() {
        use Act::*;
        let (port, _, requests) = scripted(vec![Answer(OK), Answer(OK)]).await;
        let pool = Arc::new(Pool::default());
        let frames = ["ab", "", "cde"]
            .map(|s| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(s))));
        let body = StreamBody::new(tokio_stream::iter(frames));
        let mut post = request("POST", "/up?x=1");
        post.head =
            b"POST /up?x=1 HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        post.chunked = true;
        let resp = pool
            .send(loopback(port), &post.out(), Some(body))
            .await
            .unwrap();
        assert_eq!(resp.head.status, 200);
        let mut put = request("PUT", "/up");
        put.head = b"PUT /up HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\n".to_vec();
        let resp = pool
            .send(
                loopback(port),
                &put.out(),
                Some(Full::new(Bytes::from("fixed"))),
            )
            .await
            .unwrap();
        assert_eq!(resp.head.status, 200);
        let seen = requests.lock().unwrap().clone();
        assert_eq!(
            String::from_utf8_lossy(&seen[0]),
            "POST /up?x=1 HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"
        );
        assert_eq!(
            String::from_utf8_lossy(&seen[1]),
            "PUT /up HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nfixed"
        );
    }

    /// Two instances on one port at two addresses (instances of two nodes
    /// will be): each request reaches its own, and a pooled connection to
    /// one is never used for the other.
    #[tokio::test]
    async fn the_pool_is_keyed_by_address_not_port() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let first = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = first.local_addr().unwrap().port();
        let second = tokio::net::TcpListener::bind(("127.0.0.2", port))
            .await
            .unwrap();
        for (listener, name) in [(first, b"a"), (second, b"b")] {
            tokio::spawn(async move {
                while let Ok((mut s, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        let mut buf = [0u8; 1024];
                        // One answer per request head, on a kept-alive connection.
                        while let Ok(n) = s.read(&mut buf).await {
                            if n == 0 {
                                return;
                            }
                            let mut out = b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n".to_vec();
                            out.extend_from_slice(name);
                            if s.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
        }
        let pool = Arc::new(Pool::default());
        let (a, b) = (
            SocketAddr::from(([127, 0, 0, 1], port)),
            SocketAddr::from(([127, 0, 0, 2], port)),
        );
        for (addr, want) in [(a, "a"), (b, "b"), (a, "a"), (b, "b")] {
            let resp = pool
                .send(addr, &request("GET", "/").out(), None::<Full<Bytes>>)
                .await
                .unwrap();
            let body = resp.body.collect().await.unwrap().to_bytes();
            assert_eq!(body, want, "{addr}");
        }
        assert_eq!(pool.idle(), 2, "one kept-alive connection per address");
    }
}
