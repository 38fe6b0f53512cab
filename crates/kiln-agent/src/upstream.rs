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
//! Parsing is httparse's (the parser hyper uses); what this module adds is
//! framing (RFC 9112 §6): `Content-Length`, `chunked`, close-delimited,
//! and the bodiless cases (HEAD, 1xx, 204, 304).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request;
use hyper::{Method, Response, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// A response head larger than this is refused (hyper's default is ~400 KiB
/// of buffer; instances have no reason to send more than a few KiB).
const MAX_HEAD: usize = 64 * 1024;
/// At most this many response headers.
const MAX_HEADERS: usize = 100;
/// A chunk-size line or a trailer section longer than this is refused.
const MAX_LINE: usize = 4096;
const MAX_TRAILERS: usize = 64 * 1024;
/// How much is read at a time.
const READ_SIZE: usize = 16 * 1024;

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
    #[error("invalid response header {0:?}")]
    Header(String),
    #[error("invalid content-length")]
    ContentLength,
    #[error("invalid chunked body")]
    Chunked,
    #[error("the request body failed: {0}")]
    RequestBody(BoxError),
    #[error("101 Switching Protocols to a request that asked for no upgrade")]
    UnexpectedUpgrade,
}

/// One kept-alive connection to an instance, with what was read past the
/// last response (nothing, on a well-behaved instance).
pub struct UpConn {
    io: TcpStream,
    buf: BytesMut,
    /// Kept between requests so a request allocates neither: the request
    /// head being written, and where each response header lies in its head.
    out: Vec<u8>,
    spans: Vec<HeaderSpan>,
    /// It has served a request before: a close before any answer may mean
    /// the instance closed it while idle, and the request may go out again.
    reused: bool,
}

/// One router thread's idle connections to instances, by port. Only its
/// thread uses it (the lock is never contended).
#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<u16, Vec<UpConn>>>,
}

impl Pool {
    /// An idle connection to `port` that is still open. One the instance
    /// closed (or wrote to, unasked) while idle is readable: it is dropped.
    fn checkout(&self, port: u16) -> Option<UpConn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(&port)?;
        while let Some(c) = list.pop() {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            match c.io.poll_read_ready(&mut cx) {
                Poll::Pending => return Some(c),
                // Readiness may be left over from the last read: a read
                // tells whether anything is really there.
                Poll::Ready(Ok(())) => {
                    let mut probe = [0u8; 1];
                    if let Err(e) = c.io.try_read(&mut probe)
                        && e.kind() == io::ErrorKind::WouldBlock
                    {
                        return Some(c);
                    }
                }
                Poll::Ready(Err(_)) => {}
            }
        }
        None
    }

    /// A response has been read to its end: the connection goes back to the
    /// pool if it may carry another request and nothing stray follows the
    /// response; otherwise it is closed.
    fn done(&self, port: u16, mut conn: UpConn, keep_alive: bool) {
        if keep_alive && conn.buf.is_empty() {
            conn.reused = true;
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.entry(port).or_default().push(conn);
        }
    }

    async fn connect(port: u16) -> io::Result<UpConn> {
        let io = tokio::time::timeout(
            Duration::from_secs(2),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        io.set_nodelay(true)?;
        Ok(UpConn {
            io,
            buf: BytesMut::new(),
            out: Vec::with_capacity(512),
            spans: Vec::new(),
            reused: false,
        })
    }

    /// Send a request to the instance on `port` and read its response head.
    ///
    /// `head` is borrowed, so a caller can send it again elsewhere. A
    /// request without a body that meets a pooled connection the instance
    /// had closed goes out again on a new connection.
    pub async fn send<B>(
        self: &Arc<Self>,
        port: u16,
        head: &request::Parts,
        body: Option<B>,
    ) -> Result<Response<UpBody>, UpstreamError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let upgrade = head.headers.contains_key(header::UPGRADE);
        if let Some(conn) = self.checkout(port) {
            if body.is_some() {
                return self.exchange(port, conn, head, body, upgrade).await;
            }
            match self.exchange(port, conn, head, None::<B>, upgrade).await {
                Err(UpstreamError::Request(ProtocolError::Stale)) => {}
                other => return other,
            }
        }
        let conn = Self::connect(port).await.map_err(UpstreamError::Connect)?;
        self.exchange(port, conn, head, body, upgrade).await
    }

    async fn exchange<B>(
        self: &Arc<Self>,
        port: u16,
        mut conn: UpConn,
        head: &request::Parts,
        body: Option<B>,
        upgrade: bool,
    ) -> Result<Response<UpBody>, UpstreamError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let reused = conn.reused;
        let chunked = body.is_some() && !head.headers.contains_key(header::CONTENT_LENGTH);
        let mut out = std::mem::take(&mut conn.out);
        out.clear();
        encode_head(&mut out, head, chunked);
        let sent = async {
            conn.io.write_all(&out).await?;
            if let Some(body) = body {
                send_body(&mut conn.io, body, chunked, &mut out).await?;
            }
            Ok::<_, ProtocolError>(())
        }
        .await;
        conn.out = out;
        if let Err(e) = sent {
            // A reused connection the instance had closed fails the write.
            return Err(match e {
                ProtocolError::Io(_) if reused => ProtocolError::Stale,
                e => e,
            }
            .into());
        }
        let (parts, framing, keep_alive) = loop {
            let head = read_head(&mut conn, &head.method).await?;
            let status = head.0.status;
            if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
                continue; // 100 Continue, 103 Early Hints: the answer follows
            }
            break head;
        };
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            if !upgrade {
                return Err(ProtocolError::UnexpectedUpgrade.into());
            }
            return Ok(Response::from_parts(parts, UpBody::Upgrade(Box::new(conn))));
        }
        let body = match framing {
            Framing::Length(n) if conn.buf.len() as u64 >= n => {
                // The whole body is here (n fits: it is at most buf.len()).
                let body = conn.buf.split_to(n as usize).freeze();
                self.done(port, conn, keep_alive);
                UpBody::Full(Some(body))
            }
            Framing::Empty => {
                self.done(port, conn, keep_alive);
                UpBody::Full(None)
            }
            framing => UpBody::Stream(Box::new(Streaming {
                conn: Some(conn),
                framing,
                keep_alive,
                port,
                pool: self.clone(),
                trailers: 0,
            })),
        };
        Ok(Response::from_parts(parts, body))
    }
}

/// `METHOD TARGET HTTP/1.1`, the headers, and `Transfer-Encoding: chunked`
/// when a body of unknown length follows. The target is origin-form (path
/// and query) whatever form the client used.
fn encode_head(out: &mut Vec<u8>, head: &request::Parts, chunked: bool) {
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    match head.uri.path_and_query() {
        Some(pq) => out.extend_from_slice(pq.as_str().as_bytes()),
        None => out.push(b'/'),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &head.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Stream a request body, chunk-encoded when its length is not known.
async fn send_body<B>(
    io: &mut TcpStream,
    mut body: B,
    chunked: bool,
    scratch: &mut Vec<u8>,
) -> Result<(), ProtocolError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
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
            scratch.clear();
            scratch.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            io.write_all(scratch).await?;
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

/// How a response's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunk),
    /// Until the instance closes the connection.
    Eof,
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// Read and parse one response head from `conn`.
async fn read_head(conn: &mut UpConn, method: &Method) -> Result<Head, ProtocolError> {
    // A reused connection that ends (or resets) before any byte of an
    // answer is one the instance closed while it was idle. The request went
    // out, though: only one that may be repeated (RFC 9110 §9.2.2) is.
    let reused = conn.reused && method.is_idempotent();
    let stale = |received: bool| reused && !received;
    let mut received = false;
    loop {
        if !conn.buf.is_empty()
            && let Some(head) = parse_head(&mut conn.buf, &mut conn.spans, method)?
        {
            return Ok(head);
        }
        if conn.buf.len() > MAX_HEAD {
            return Err(ProtocolError::HeadTooLarge);
        }
        match std::future::poll_fn(|cx| poll_read_buf(&mut conn.io, cx, &mut conn.buf)).await {
            Ok(0) if stale(received) => return Err(ProtocolError::Stale),
            Ok(0) => return Err(ProtocolError::Closed),
            Ok(_) => received = true,
            Err(_) if stale(received) => return Err(ProtocolError::Stale),
            Err(e) => return Err(e.into()),
        }
    }
}

/// A parsed response head, how its body is framed, and whether the
/// connection may carry another request after it.
type Head = (hyper::http::response::Parts, Framing, bool);

/// Where a header's name and value lie in a response head.
type HeaderSpan = (std::ops::Range<usize>, std::ops::Range<usize>);

/// Parse a complete head at the front of `buf` (consuming it), or `None`
/// when more bytes are needed.
fn parse_head(
    buf: &mut BytesMut,
    spans: &mut Vec<HeaderSpan>,
    method: &Method,
) -> Result<Option<Head>, ProtocolError> {
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ProtocolError::Parse(e)),
    };
    let status = StatusCode::from_u16(resp.code.unwrap_or(0))
        .map_err(|_| ProtocolError::Parse(httparse::Error::Status))?;
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Offsets into the head, so the values can share its bytes once it is
    // split off the buffer.
    let base = buf.as_ptr() as usize;
    spans.clear();
    spans.extend(resp.headers.iter().map(|h| {
        let n = h.name.as_ptr() as usize - base;
        let v = h.value.as_ptr() as usize - base;
        (n..n + h.name.len(), v..v + h.value.len())
    }));
    let head = buf.split_to(len).freeze();
    let mut map = HeaderMap::with_capacity(spans.len());
    for (name, value) in spans.drain(..) {
        let name = HeaderName::from_bytes(&head[name.clone()])
            .map_err(|_| ProtocolError::Header(String::from_utf8_lossy(&head[name]).into()))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value))
            .map_err(|_| ProtocolError::Header(name.to_string()))?;
        map.append(name, value);
    }
    let keep_alive = keep_alive(version, &map);
    let framing = framing(method, status, &map)?;
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = status;
    parts.version = version;
    parts.headers = map;
    // Close-delimited bodies end with the connection.
    let keep_alive = keep_alive && framing != Framing::Eof;
    Ok(Some((parts, framing, keep_alive)))
}

/// Whether the connection may carry another request after this response.
fn keep_alive(version: Version, headers: &HeaderMap) -> bool {
    let has = |token: &str| {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if version == Version::HTTP_10 {
        has("keep-alive")
    } else {
        !has("close")
    }
}

/// RFC 9112 §6.3, for a response to `method`.
fn framing(
    method: &Method,
    status: StatusCode,
    headers: &HeaderMap,
) -> Result<Framing, ProtocolError> {
    if method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    if let Some(te) = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
    {
        let last = te
            .to_str()
            .ok()
            .and_then(|v| v.rsplit(',').next())
            .map(str::trim);
        return Ok(if last.is_some_and(|c| c.eq_ignore_ascii_case("chunked")) {
            Framing::Chunked(Chunk::Size)
        } else {
            Framing::Eof
        });
    }
    let mut length = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v
            .to_str()
            .map_err(|_| ProtocolError::ContentLength)?
            .split(',')
        {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ProtocolError::ContentLength);
            }
            let n: u64 = part.parse().map_err(|_| ProtocolError::ContentLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(ProtocolError::ContentLength);
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::Eof, Framing::Length))
}

thread_local! {
    /// Each router thread reads into one buffer and copies what came into
    /// the connection's: a read into initialised memory needs no `unsafe`,
    /// and tokio's own read (unlike `try_read`) notes a short read as "all
    /// read", so the next wait costs no extra `recv`.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; READ_SIZE].into_boxed_slice());
}

/// Read what the socket has into `buf`; 0 at the end of the stream.
fn poll_read_buf(
    io: &mut TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    SCRATCH.with_borrow_mut(|scratch| {
        let mut rb = ReadBuf::new(scratch);
        ready!(Pin::new(io).poll_read(cx, &mut rb))?;
        // Grow in steps, not by each read's few bytes.
        if buf.capacity() - buf.len() < rb.filled().len() {
            buf.reserve(rb.filled().len().max(READ_SIZE / 2));
        }
        buf.extend_from_slice(rb.filled());
        Poll::Ready(Ok(rb.filled().len()))
    })
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
    framing: Framing,
    keep_alive: bool,
    port: u16,
    pool: Arc<Pool>,
    trailers: usize,
}

/// What one decoding step made of the buffered bytes.
enum Step {
    Data(Bytes),
    More,
    End,
}

impl Streaming {
    /// Decode what is buffered; `More` when the socket must be read.
    fn step(&mut self, buf: &mut BytesMut) -> Result<Step, ProtocolError> {
        loop {
            match &mut self.framing {
                Framing::Empty | Framing::Length(0) => return Ok(Step::End),
                Framing::Length(n) | Framing::Chunked(Chunk::Data(n)) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let k = (*n).min(buf.len() as u64);
                    *n -= k;
                    let data = buf.split_to(k as usize).freeze();
                    if let Framing::Chunked(c @ Chunk::Data(0)) = &mut self.framing {
                        *c = Chunk::DataEnd;
                    }
                    return Ok(Step::Data(data));
                }
                Framing::Eof => {
                    return Ok(if buf.is_empty() {
                        Step::More
                    } else {
                        Step::Data(buf.split().freeze())
                    });
                }
                Framing::Chunked(c @ Chunk::Size) => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Step::More);
                    };
                    let size = line.split(|&b| b == b';').next().unwrap_or_default();
                    let size = std::str::from_utf8(size)
                        .ok()
                        .map(|s| s.trim_matches([' ', '\t']))
                        .filter(|s| !s.is_empty() && s.len() <= 16)
                        .and_then(|s| u64::from_str_radix(s, 16).ok())
                        .ok_or(ProtocolError::Chunked)?;
                    *c = if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    };
                }
                Framing::Chunked(c @ Chunk::DataEnd) => {
                    match buf.first() {
                        None => return Ok(Step::More),
                        Some(b'\n') => buf.advance(1),
                        Some(b'\r') if buf.len() < 2 => return Ok(Step::More),
                        Some(b'\r') if buf[1] == b'\n' => buf.advance(2),
                        Some(_) => return Err(ProtocolError::Chunked),
                    }
                    *c = Chunk::Size;
                }
                Framing::Chunked(Chunk::Trailers) => {
                    // Trailers are read past, not forwarded.
                    let Some(line) = take_line(buf)? else {
                        return Ok(Step::More);
                    };
                    if line.is_empty() {
                        return Ok(Step::End);
                    }
                    self.trailers += line.len();
                    if self.trailers > MAX_TRAILERS {
                        return Err(ProtocolError::Chunked);
                    }
                }
            }
        }
    }
}

/// One line (without its CRLF or LF) from the front of `buf`.
fn take_line(buf: &mut BytesMut) -> Result<Option<Bytes>, ProtocolError> {
    let Some(i) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > MAX_LINE {
            Err(ProtocolError::Chunked)
        } else {
            Ok(None)
        };
    };
    if i > MAX_LINE {
        return Err(ProtocolError::Chunked);
    }
    let mut line = buf.split_to(i + 1);
    line.truncate(i);
    if line.last() == Some(&b'\r') {
        line.truncate(i - 1);
    }
    Ok(Some(line.freeze()))
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
            Self::Stream(s) => s,
        };
        let Some(mut conn) = s.conn.take() else {
            return Poll::Ready(None);
        };
        loop {
            match s.step(&mut conn.buf) {
                Err(e) => return Poll::Ready(Some(Err(e))),
                Ok(Step::Data(d)) => {
                    s.conn = Some(conn);
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Ok(Step::End) => {
                    s.pool.done(s.port, conn, s.keep_alive);
                    return Poll::Ready(None);
                }
                Ok(Step::More) => match poll_read_buf(&mut conn.io, cx, &mut conn.buf) {
                    Poll::Pending => {
                        s.conn = Some(conn);
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                    Poll::Ready(Ok(0)) if s.framing == Framing::Eof => {
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
            Self::Stream(s) => s.conn.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Upgrade(_) => SizeHint::with_exact(0),
            Self::Stream(s) => match s.framing {
                Framing::Length(n) => SizeHint::with_exact(n),
                _ => SizeHint::default(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;

    /// What the scripted instance does with the next request it reads.
    #[derive(Clone, Copy)]
    enum Act {
        Answer(&'static [u8]),
        /// Answer, then close the connection.
        AnswerClose(&'static [u8]),
        /// Close the connection without answering.
        Drop,
    }

    /// An instance that answers the requests it reads, across all its
    /// connections, with `script` in order. It counts its connections and
    /// keeps every request's bytes.
    async fn scripted(script: Vec<Act>) -> (u16, Arc<AtomicUsize>, Arc<Mutex<Vec<Vec<u8>>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(script.into_iter()));
        let (count, seen) = (accepted.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let (script, seen) = (script.clone(), seen.clone());
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    loop {
                        let Some(req) = read_request(&mut s, &mut got).await else {
                            return;
                        };
                        seen.lock().unwrap().push(req);
                        let Some(act) = script.lock().unwrap().next() else {
                            return;
                        };
                        match act {
                            Act::Answer(a) => s.write_all(a).await.unwrap(),
                            Act::AnswerClose(a) => {
                                s.write_all(a).await.unwrap();
                                return;
                            }
                            Act::Drop => return,
                        }
                    }
                });
            }
        });
        (port, accepted, requests)
    }

    /// One request (head, and a body by content-length or up to the last
    /// chunk) from `got` and the socket.
    async fn read_request(s: &mut TcpStream, got: &mut Vec<u8>) -> Option<Vec<u8>> {
        let mut buf = [0u8; 4096];
        let complete = |got: &[u8]| {
            let end = got.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
            let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
            let len = if head.contains("transfer-encoding: chunked") {
                got.windows(5).position(|w| w == b"0\r\n\r\n")? + 5
            } else {
                let n = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |n| n.trim().parse::<usize>().unwrap());
                (got.len() >= end + n).then_some(end + n)?
            };
            Some(len)
        };
        loop {
            if let Some(len) = complete(got) {
                return Some(got.drain(..len).collect());
            }
            let n = s.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            got.extend_from_slice(&buf[..n]);
        }
    }

    fn request(method: &str, path: &str) -> request::Parts {
        let mut r = hyper::Request::new(());
        *r.method_mut() = method.parse().unwrap();
        *r.uri_mut() = path.parse().unwrap();
        r.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("x"));
        r.into_parts().0
    }

    async fn fetch(
        pool: &Arc<Pool>,
        port: u16,
        head: &request::Parts,
    ) -> Result<(StatusCode, Bytes), UpstreamError> {
        // A framing read wrong waits for bytes that never come: fail instead.
        tokio::time::timeout(Duration::from_secs(10), async {
            let resp = pool.send(port, head, None::<Full<Bytes>>).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok((status, body))
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
            assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
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
    async fn a_request_dropped_on_a_reused_connection_goes_out_again_if_repeatable() {
        use Act::*;
        let (port, accepted, _) = scripted(vec![Answer(OK), Drop, Answer(OK), Drop]).await;
        let pool = Arc::new(Pool::default());
        fetch(&pool, port, &request("GET", "/")).await.unwrap();
        // The instance reads the second request and closes: as if it had
        // closed the idle connection just as the request went out.
        let (status, _) = fetch(&pool, port, &request("GET", "/")).await.unwrap();
        assert_eq!(status, StatusCode::OK);
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
        assert_eq!((status, body.len()), (StatusCode::OK, 0));
        let (status, body) = fetch(&pool, port, &request("GET", "/")).await.unwrap();
        assert_eq!((status, body.len()), (StatusCode::NO_CONTENT, 0));
        let (status, body) = fetch(&pool, port, &request("GET", "/")).await.unwrap();
        assert_eq!((status, &body[..]), (StatusCode::CREATED, &b"new"[..]));
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

    /// A chunked body's decoder, with no connection under it.
    fn chunked_decoder() -> Streaming {
        Streaming {
            conn: None,
            framing: Framing::Chunked(Chunk::Size),
            keep_alive: true,
            port: 0,
            pool: Arc::default(),
            trailers: 0,
        }
    }

    #[test]
    fn a_chunked_body_decodes_whatever_the_reads_cut() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n";
        for cut in 1..wire.len() {
            let mut s = chunked_decoder();
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            let mut fed = 0;
            loop {
                match s.step(&mut buf).unwrap() {
                    Step::Data(d) => out.extend_from_slice(&d),
                    Step::End => break,
                    Step::More => {
                        let next = (fed + cut).min(wire.len());
                        assert!(next > fed, "ran out of input at cut {cut}");
                        buf.extend_from_slice(&wire[fed..next]);
                        fed = next;
                    }
                }
            }
            assert_eq!(out, b"hello world", "cut {cut}");
            assert!(buf.is_empty() && fed == wire.len(), "cut {cut}");
        }
        for bad in [&b"zz\r\n"[..], b"5\r\nhelloXX", b"\r\n"] {
            let mut s = chunked_decoder();
            let mut buf = BytesMut::from(bad);
            let res = loop {
                match s.step(&mut buf) {
                    Ok(Step::Data(_)) => continue,
                    other => break other,
                }
            };
            assert!(matches!(res, Err(ProtocolError::Chunked)), "{bad:?}");
        }
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
        let resp = pool.send(port, &get, None::<Full<Bytes>>).await.unwrap();
        let cut = resp.into_body().collect().await.map(|_| ()).unwrap_err();
        assert!(matches!(cut, ProtocolError::Closed), "{cut}");
    }

    #[test]
    fn the_target_goes_out_in_origin_form() {
        for (target, line) in [
            ("http://example.com/a?b=1", "GET /a?b=1 HTTP/1.1\r\n"),
            ("http://example.com", "GET / HTTP/1.1\r\n"),
            ("/c", "GET /c HTTP/1.1\r\n"),
        ] {
            let mut out = Vec::new();
            encode_head(&mut out, &request("GET", target), false);
            let out = String::from_utf8(out).unwrap();
            assert!(out.starts_with(line), "{target}: {out}");
        }
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_goes_out_chunked_and_a_known_one_as_is() {
        use Act::*;
        let (port, _, requests) = scripted(vec![Answer(OK), Answer(OK)]).await;
        let pool = Arc::new(Pool::default());
        let frames = ["ab", "", "cde"]
            .map(|s| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(s))));
        let body = StreamBody::new(tokio_stream::iter(frames));
        let resp = pool
            .send(port, &request("POST", "/up?x=1"), Some(body))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut head = request("PUT", "/up");
        head.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        let resp = pool
            .send(port, &head, Some(Full::new(Bytes::from("fixed"))))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
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
}
