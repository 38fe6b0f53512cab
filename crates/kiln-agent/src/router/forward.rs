//! The half of a request that does not depend on how the client speaks:
//! send it to an instance of the side its route chose, retry another
//! instance when nothing reached the first, hold the deadline, count it in
//! the release's metrics. The HTTP/1.1 front ([`crate::router::downstream`])
//! and the HTTP/2 front ([`crate::router::h2`]) both end here, so a canary
//! weight, a drain or a timeout means the same over either.
//!
//! The request arrives as the instance's HTTP/1.1 head (written by
//! `downstream::prepare`, whichever front parsed it) and a body; what goes
//! back is the instance's response with the in-flight guard that keeps the
//! instance from being drained until the response body is sent, or the
//! router's own answer.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::StatusCode;
use hyper::body::Body;

use crate::router::routes::{Backend, Inflight};
use crate::router::upstream::{H2Out, Outgoing, Pool, ProtocolError, UpResponse, UpstreamError};
use crate::router::wire::{self, Framing};
use kiln_core::service::RouterSpec;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request ready for an instance.
pub(crate) struct Request<'a> {
    /// The instance's head up to `head_len`: all but `Host` when the
    /// client sent none, and the final empty line. Each attempt completes
    /// it for its instance.
    pub up: &'a mut Vec<u8>,
    pub head_len: usize,
    pub has_host: bool,
    pub head_method: bool,
    pub idempotent: bool,
    pub upgrade: bool,
    /// The body goes out chunk-encoded (the head says so).
    pub chunked: bool,
}

/// The request's body, as the instance's protocol takes it.
pub(crate) enum Outbound<B> {
    /// HTTP/1.1, streamed from the client as it is sent.
    H1(Option<B>),
    /// h2c: owned, sent by hyper's connection task.
    H2c(Option<H2Out>),
}

impl<B> Outbound<B> {
    fn is_none(&self) -> bool {
        match self {
            Self::H1(b) => b.is_none(),
            Self::H2c(b) => b.is_none(),
        }
    }
}

/// What became of a request.
pub(crate) enum Outcome<'r> {
    /// The instance answered. The guard counts the request in flight to
    /// `backend` until it is dropped, after the response body.
    Answered {
        resp: UpResponse,
        backend: &'r Arc<Backend>,
        guard: Inflight,
    },
    /// The router answers itself. `broken` when the client broke its own
    /// request (its body): the connection cannot go on.
    Local {
        status: StatusCode,
        msg: String,
        broken: bool,
    },
}

/// Send `req` to one of `backends` (round-robin per router thread), within
/// `timeout` of `arrived` plus what the client made the request wait for
/// its body. A request without a body that could not be connected goes to
/// the next instance (up to three): nothing reached the first.
pub(crate) async fn forward<'r, B>(
    pool: &Arc<Pool>,
    backends: &'r [Arc<Backend>],
    (timeout, arrived, waited): (Duration, Instant, &ClientWait),
    req: Request<'_>,
    mut body: Outbound<B>,
) -> Outcome<'r>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let n = backends.len();
    if n == 0 {
        return Outcome::Local {
            status: StatusCode::SERVICE_UNAVAILABLE,
            msg: "no ready instance\n".to_owned(),
            broken: false,
        };
    }
    // Round-robin per router thread: no counter shared between cores.
    let start = ROUND_ROBIN.with(|n| {
        let v = n.get();
        n.set(v.wrapping_add(1));
        v
    });
    let attempts = if body.is_none() { n.min(3) } else { 1 };
    let mut last = None;
    for attempt in 0..attempts {
        let backend = &backends[(start + attempt) % n];
        // An HTTP/1.0 request without Host gets the instance's.
        req.up.truncate(req.head_len);
        if !req.has_host {
            req.up.extend_from_slice(b"host: ");
            req.up.extend_from_slice(backend.host.as_bytes());
            req.up.extend_from_slice(b"\r\n");
        }
        req.up.extend_from_slice(b"\r\n");
        let guard = Inflight::new(backend.inflight.clone());
        let out = Outgoing {
            head: req.up,
            head_method: req.head_method,
            idempotent: req.idempotent,
            upgrade: req.upgrade,
            chunked: req.chunked,
        };
        // The deadline counts from arrival (and costs no clock read), plus
        // what the client made the request wait.
        let resp = {
            let mut sent = std::pin::pin!(async {
                match &mut body {
                    Outbound::H1(b) => pool.send(backend.addr, &out, b.take()).await,
                    Outbound::H2c(b) => pool.send_h2c(backend.addr, &out, b.take()).await,
                }
            });
            let mut deadline = arrived + timeout;
            loop {
                match tokio::time::timeout_at(deadline.into(), &mut sent).await {
                    Ok(r) => break Ok(r),
                    Err(_) => {
                        let later = arrived + timeout + waited.total(Instant::now());
                        if later <= deadline {
                            break Err(());
                        }
                        deadline = later;
                    }
                }
            }
        };
        let local = |status, msg| Outcome::Local {
            status,
            msg,
            broken: false,
        };
        return match resp {
            Err(()) => {
                backend.metrics.timeout();
                backend.metrics.observe(504, arrived.elapsed());
                let msg = format!(
                    "instance {} did not answer within {}\n",
                    backend.instance,
                    humantime::format_duration(timeout)
                );
                local(StatusCode::GATEWAY_TIMEOUT, msg)
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
            Ok(Err(UpstreamError::Request(ProtocolError::RequestBody(e)))) => {
                // The client broke its own request: its error, not the
                // instance's, and never in the release's numbers.
                backend.metrics.client_error();
                let (status, msg) = match e.downcast_ref::<ClientError>() {
                    Some(e @ ClientError::Stalled(_)) => {
                        (StatusCode::REQUEST_TIMEOUT, e.to_string())
                    }
                    Some(e @ ClientError::TooLarge(_)) => {
                        (StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
                    }
                    Some(e) => (StatusCode::BAD_REQUEST, e.to_string()),
                    None => (StatusCode::BAD_REQUEST, format!("request body: {e}")),
                };
                Outcome::Local {
                    status,
                    msg: format!("{msg}\n"),
                    broken: true,
                }
            }
            Ok(Err(UpstreamError::Request(e))) => {
                backend.metrics.observe(502, arrived.elapsed());
                let msg = format!("instance {} failed the request: {e}\n", backend.instance);
                local(StatusCode::BAD_GATEWAY, msg)
            }
            Ok(Ok(resp)) => {
                backend.metrics.observe(resp.head.status, arrived.elapsed());
                Outcome::Answered {
                    resp,
                    backend,
                    guard,
                }
            }
        };
    }
    Outcome::Local {
        status: StatusCode::BAD_GATEWAY,
        msg: last.unwrap_or_else(|| "no instance could be reached\n".to_owned()),
        broken: false,
    }
}

/// The router's 413 for a body whose declared length is over the
/// service's `router.max_body` (answered before anything is sent on).
pub(crate) fn too_large(body: Framing, limits: &RouterSpec) -> Option<String> {
    match (body, limits.max_body) {
        (Framing::Length(n), Some(max)) if n > max => Some(format!(
            "a request body of {n} bytes is larger than the service's limit of {}\n",
            kiln_core::resources::show_bytes(max)
        )),
        _ => None,
    }
}

thread_local! {
    static ROUND_ROBIN: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How a client broke its request's body.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("invalid request body: {0}")]
    Framing(#[from] wire::FramingError),
    #[error("the client closed before the end of its request body")]
    Closed,
    #[error("the request body sent nothing for {}", humantime::format_duration(*.0))]
    Stalled(Duration),
    #[error("reading the request body: {0}")]
    Io(#[from] io::Error),
    /// The HTTP/2 stream failed (reset by the client, or DATA that does
    /// not add up to its `content-length`).
    #[error("the request body's stream failed: {0}")]
    Stream(hyper::Error),
    #[error("the request body is larger than the service's limit of {}", kiln_core::resources::show_bytes(*.0))]
    TooLarge(u64),
}

impl ClientError {
    /// The router's answer to it.
    pub(crate) fn answer(&self) -> (StatusCode, String) {
        let status = match self {
            Self::Stalled(_) => StatusCode::REQUEST_TIMEOUT,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        (status, self.to_string())
    }
}

/// The time a request spent waiting for its client's body, shared between
/// the body (which measures it) and the exchange (which extends the
/// instance's deadline by it). Nanoseconds from the request's arrival.
pub(crate) struct ClientWait {
    arrived: Instant,
    /// Waits that ended.
    total: std::sync::atomic::AtomicU64,
    /// When the current wait began, plus one; 0 when not waiting.
    since: std::sync::atomic::AtomicU64,
}

impl ClientWait {
    pub(crate) fn new(arrived: Instant) -> Self {
        Self {
            arrived,
            total: 0.into(),
            since: 0.into(),
        }
    }

    fn nanos(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.arrived).as_nanos() as u64
    }

    pub(crate) fn begin(&self, now: Instant) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.since.load(Relaxed) == 0 {
            self.since.store(self.nanos(now) + 1, Relaxed);
        }
    }

    /// How long the wait that began at `since` (as stored) has lasted at
    /// `now`; 0 when none was under way.
    fn ongoing(&self, since: u64, now: Instant) -> u64 {
        if since == 0 {
            0
        } else {
            self.nanos(now).saturating_sub(since - 1)
        }
    }

    pub(crate) fn end(&self, now: Instant) {
        use std::sync::atomic::Ordering::Relaxed;
        let since = self.since.swap(0, Relaxed);
        self.total.fetch_add(self.ongoing(since, now), Relaxed);
    }

    /// All the waiting up to `now`, the current wait included.
    pub(crate) fn total(&self, now: Instant) -> Duration {
        use std::sync::atomic::Ordering::Relaxed;
        let current = self.ongoing(self.since.load(Relaxed), now);
        Duration::from_nanos(self.total.load(Relaxed) + current)
    }
}
