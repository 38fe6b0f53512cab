//! HTTP/1.1 on the wire, as both sides of the router need it: how a
//! message's body is framed (RFC 9112 §6), the chunked decoder, header
//! tokens, hop-by-hop names, and reading a socket into a buffer.
//!
//! Parsing heads is httparse's (the parser hyper uses); the router's server
//! side ([`crate::router::downstream`]) and its client side ([`crate::router::upstream`])
//! share everything after that here.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

/// A head larger than this is refused (hyper's default is ~400 KiB of
/// buffer; no client or instance has a reason to send more than a few KiB).
pub const MAX_HEAD: usize = 64 * 1024;
/// At most this many headers in a head.
pub const MAX_HEADERS: usize = 100;
/// A chunk-size line or a trailer section longer than this is refused.
const MAX_LINE: usize = 4096;
const MAX_TRAILERS: usize = 64 * 1024;
/// How much is read at a time.
const READ_SIZE: usize = 16 * 1024;

/// A body whose framing is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("invalid content-length")]
    ContentLength,
    #[error("invalid chunked body")]
    Chunked,
}

/// How a message's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunk),
    /// Until the sender closes the connection (responses only).
    Eof,
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

impl Framing {
    pub const CHUNKED: Self = Self::Chunked(Chunk::Size);
}

/// What `Transfer-Encoding` says, all its fields taken together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// `chunked` alone: the one coding the router decodes and re-encodes.
    Chunked,
    /// `chunked` last, after other codings (`gzip, chunked`): the body
    /// is framed, but the router would forward codings it does not apply
    /// (RFC 9112 §6.1: 501 for a request).
    Unsupported,
    /// The last coding is not `chunked`, or `chunked` is applied twice, or
    /// the field is empty: a request's length cannot be known (400), and a
    /// response's body would reach the client still encoded.
    NotChunked,
}

/// What a head says about its body: `Transfer-Encoding` and
/// `Content-Length`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Declared {
    pub transfer: Option<Coding>,
    pub length: Option<u64>,
}

/// Read `Transfer-Encoding` and `Content-Length` from a parsed head. Several
/// `Content-Length` values must agree (RFC 9110 §8.6); the router always
/// writes the one value itself, never the client's or the instance's field.
pub fn declared(headers: &[httparse::Header<'_>]) -> Result<Declared, FramingError> {
    let mut d = Declared::default();
    // Codings across every Transfer-Encoding field, in order.
    let (mut codings, mut chunked, mut last_chunked) = (0usize, 0usize, false);
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Codings are tokens between commas and spaces; anything else
            // (a tab, quotes, parameters) is refused outright, as nginx
            // does, rather than read one way here and another behind.
            if !h
                .value
                .iter()
                .all(|&b| b == b',' || b == b' ' || is_tchar(b))
            {
                codings += 1;
                last_chunked = false;
                continue;
            }
            // Empty list elements are allowed by the list syntax; a field
            // with no coding at all is not.
            let before = codings;
            for t in tokens(h.value) {
                codings += 1;
                last_chunked = t.eq_ignore_ascii_case(b"chunked");
                chunked += usize::from(last_chunked);
            }
            if codings == before {
                // `Transfer-Encoding:` with no coding frames nothing.
                codings += 1;
                last_chunked = false;
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            for part in h.value.split(|&b| b == b',') {
                let part = part.trim_ascii();
                if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                    return Err(FramingError::ContentLength);
                }
                let n = part.iter().fold(0u64, |n, &b| n * 10 + u64::from(b - b'0'));
                if d.length.is_some_and(|l| l != n) {
                    return Err(FramingError::ContentLength);
                }
                d.length = Some(n);
            }
        }
    }
    if codings > 0 {
        d.transfer = Some(match (last_chunked, chunked, codings) {
            (true, 1, 1) => Coding::Chunked,
            (true, 1, _) => Coding::Unsupported,
            _ => Coding::NotChunked,
        });
    }
    Ok(d)
}

/// A token character (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Headers that frame a message or name its target: whatever a
/// `Connection` field lists, these are never removed on its word (the
/// router writes the framing itself, and `Host` is the request's).
fn is_protected(name: &[u8]) -> bool {
    [&b"content-length"[..], b"transfer-encoding", b"host"]
        .iter()
        .any(|p| p.eq_ignore_ascii_case(name))
}

/// The comma-separated tokens of a header value, trimmed, empty ones skipped.
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Whether a `Connection` header among `headers` lists `token`.
pub fn connection_has(headers: &[httparse::Header<'_>], token: &[u8]) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .any(|h| tokens(h.value).any(|t| t.eq_ignore_ascii_case(token)))
}

/// The tokens of `Connection` that name other headers of this hop (RFC 9110
/// §7.6.1); `close`, `keep-alive` and `upgrade` name none that stay, and
/// the framing headers and `Host` are never removed on a peer's word
/// (`Connection: content-length` once let a client smuggle a request).
pub fn connection_named<'h>(
    headers: impl IntoIterator<Item = (&'h str, &'h [u8])>,
) -> Vec<&'h [u8]> {
    let mut named = Vec::new();
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("connection") {
            named.extend(tokens(value).filter(|t| {
                !(t.eq_ignore_ascii_case(b"close")
                    || t.eq_ignore_ascii_case(b"keep-alive")
                    || t.eq_ignore_ascii_case(b"upgrade")
                    || is_protected(t))
            }));
        }
    }
    named
}

/// Headers that belong to one connection, not to the message (RFC 9110
/// §7.6.1): never forwarded as they are.
pub fn is_hop_by_hop(name: &str) -> bool {
    const HOP: [&str; 9] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    ];
    HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// What one decoding step made of the buffered bytes.
pub enum Step {
    Data(Bytes),
    More,
    End,
}

/// Decodes a body from the bytes that arrive, framing by framing.
#[derive(Debug)]
pub struct Decoder {
    framing: Framing,
    trailers: usize,
}

impl Decoder {
    pub fn new(framing: Framing) -> Self {
        Self {
            framing,
            trailers: 0,
        }
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Whether the whole body has been decoded.
    pub fn is_done(&self) -> bool {
        matches!(self.framing, Framing::Empty | Framing::Length(0))
    }

    /// Decode what is buffered; `More` when the socket must be read.
    pub fn step(&mut self, buf: &mut BytesMut) -> Result<Step, FramingError> {
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
                        // Hex digits only: `from_str_radix` also takes a
                        // leading `+`, which nginx (and RFC 9112) refuse.
                        .filter(|s| {
                            !s.is_empty()
                                && s.len() <= 16
                                && s.bytes().all(|b| b.is_ascii_hexdigit())
                        })
                        .and_then(|s| u64::from_str_radix(s, 16).ok())
                        .ok_or(FramingError::Chunked)?;
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
                        Some(_) => return Err(FramingError::Chunked),
                    }
                    *c = Chunk::Size;
                }
                Framing::Chunked(Chunk::Trailers) => {
                    // Trailers are read past, not forwarded.
                    let Some(line) = take_line(buf)? else {
                        return Ok(Step::More);
                    };
                    if line.is_empty() {
                        self.framing = Framing::Empty;
                        return Ok(Step::End);
                    }
                    self.trailers += line.len();
                    if self.trailers > MAX_TRAILERS {
                        return Err(FramingError::Chunked);
                    }
                }
            }
        }
    }
}

/// One line (without its CRLF or LF) from the front of `buf`.
fn take_line(buf: &mut BytesMut) -> Result<Option<Bytes>, FramingError> {
    let Some(i) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > MAX_LINE {
            Err(FramingError::Chunked)
        } else {
            Ok(None)
        };
    };
    if i > MAX_LINE {
        return Err(FramingError::Chunked);
    }
    let mut line = buf.split_to(i + 1);
    line.truncate(i);
    if line.last() == Some(&b'\r') {
        line.truncate(i - 1);
    }
    Ok(Some(line.freeze()))
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
pub fn poll_read_buf<R: AsyncRead + Unpin>(
    io: &mut R,
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

/// [`poll_read_buf`] as a future.
pub async fn read_buf<R: AsyncRead + Unpin>(io: &mut R, buf: &mut BytesMut) -> io::Result<usize> {
    std::future::poll_fn(|cx| poll_read_buf(io, cx, buf)).await
}

/// `{len:x}\r\n`, a chunk's size line.
pub fn chunk_size_line(out: &mut Vec<u8>, len: usize) {
    use std::io::Write;
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{len:x}\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunked_body_decodes_whatever_the_reads_cut() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n";
        for cut in 1..wire.len() {
            let mut s = Decoder::new(Framing::CHUNKED);
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
            assert!(s.is_done(), "cut {cut}");
        }
        for bad in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"\r\n",
            b"+5\r\nhello\r\n",
            b"-5\r\nhello\r\n",
            b"0x5\r\nhello\r\n",
        ] {
            let mut s = Decoder::new(Framing::CHUNKED);
            let mut buf = BytesMut::from(bad);
            let res = loop {
                match s.step(&mut buf) {
                    Ok(Step::Data(_)) => continue,
                    other => break other,
                }
            };
            assert!(matches!(res, Err(FramingError::Chunked)), "{bad:?}");
        }
    }

    fn head(fields: &[(&'static str, &'static str)]) -> Vec<httparse::Header<'static>> {
        fields
            .iter()
            .map(|(n, v)| httparse::Header {
                name: n,
                value: v.as_bytes(),
            })
            .collect()
    }

    #[test]
    fn framing_headers_are_read_strictly() {
        fn d(f: &[(&'static str, &'static str)]) -> Result<Declared, FramingError> {
            declared(&head(f))
        }
        assert_eq!(d(&[("Content-Length", "12")]).unwrap().length, Some(12));
        assert_eq!(
            d(&[("content-length", "7, 7"), ("content-length", "7")])
                .unwrap()
                .length,
            Some(7)
        );
        for bad in ["1, 2", "", "-1", "0x10", "+5", "99999999999999999999"] {
            assert_eq!(
                d(&[("content-length", bad)]),
                Err(FramingError::ContentLength),
                "{bad:?}"
            );
        }
        let te = |v: &[(&'static str, &'static str)]| d(v).unwrap().transfer;
        assert_eq!(
            te(&[("transfer-encoding", "Chunked")]),
            Some(Coding::Chunked)
        );
        assert_eq!(
            te(&[("transfer-encoding", " , chunked,")]),
            Some(Coding::Chunked)
        );
        assert_eq!(
            te(&[("transfer-encoding", "gzip, Chunked")]),
            Some(Coding::Unsupported)
        );
        assert_eq!(
            te(&[
                ("transfer-encoding", "gzip"),
                ("transfer-encoding", "chunked")
            ]),
            Some(Coding::Unsupported)
        );
        for bad in [
            &[("transfer-encoding", "chunked, gzip")][..],
            &[("transfer-encoding", "chunked, chunked")],
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
            &[("transfer-encoding", "")],
            &[("transfer-encoding", "xchunked")],
            &[("transfer-encoding", "\"chunked\"")],
            &[("transfer-encoding", "gzip,\tchunked")],
            &[("transfer-encoding", "chunked;x=1")],
        ] {
            assert_eq!(te(bad), Some(Coding::NotChunked), "{bad:?}");
        }
        assert_eq!(te(&[("content-length", "3")]), None);
        let h = head(&[
            (
                "Connection",
                "keep-alive, X-Secret,upgrade, Content-Length, transfer-encoding, HOST",
            ),
            ("x", "y"),
        ]);
        assert!(connection_has(&h, b"Upgrade"));
        assert!(!connection_has(&h, b"close"));
        assert_eq!(
            connection_named(h.iter().map(|h| (h.name, h.value))),
            vec![&b"X-Secret"[..]]
        );
    }
}
