//! The CLI's side of the agent API: HTTP/1.1 over the Unix socket, or
//! over TLS to a remote agent (`--agent URL` / `KILN_AGENT`) with a token
//! and the certificate pinned by `kiln login https://HOST:PORT`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use kiln_core::api::ErrorBody;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

pub struct Client {
    target: Target,
}

enum Target {
    Local(PathBuf),
    Remote(Arc<crate::remote::Remote>),
}

impl Client {
    /// The agent of `home`, or the remote agent the command line named.
    pub fn new(home: &Path) -> Self {
        match crate::remote::chosen() {
            Some(r) => Self {
                target: Target::Remote(r),
            },
            None => Self {
                target: Target::Local(kiln_agent::socket_path(home)),
            },
        }
    }

    /// The agent of `home` on its socket (never a remote one).
    pub fn local(home: &Path) -> Self {
        Self {
            target: Target::Local(kiln_agent::socket_path(home)),
        }
    }

    /// Whether an agent answers on this client's socket (a remote one is
    /// taken to).
    pub async fn reachable(&self) -> bool {
        match &self.target {
            Target::Local(sock) => UnixStream::connect(sock).await.is_ok(),
            Target::Remote(_) => true,
        }
    }

    /// A client of one remote agent.
    pub fn remote(remote: Arc<crate::remote::Remote>) -> Self {
        Self {
            target: Target::Remote(remote),
        }
    }

    async fn send(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        self.send_body(
            method,
            path,
            Full::new(Bytes::from(body.unwrap_or_default())),
        )
        .await
    }

    /// [`send`](Self::send) with any body (a stream: `kiln run -i`'s
    /// stdin follows its request).
    async fn send_body<B>(
        &self,
        method: hyper::Method,
        path: &str,
        body: B,
    ) -> Result<hyper::Response<hyper::body::Incoming>>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json");
        match &self.target {
            Target::Local(sock) => {
                let stream = UnixStream::connect(sock).await.map_err(|e| {
                    anyhow!(
                        "cannot reach the agent at {}: {e} (is `kiln serve` running with this home?)",
                        sock.display()
                    )
                })?;
                let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .context("cannot talk to the agent")?;
                tokio::spawn(conn);
                send.send_request(req.header("host", "kiln").body(body)?)
                    .await
                    .context("the agent did not answer")
            }
            Target::Remote(r) => r.send(req, body).await,
        }
    }

    /// The body of a successful answer; an error answer as the agent's
    /// one line.
    async fn answer(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::body::Incoming> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let body = resp.into_body();
        if !status.is_success() {
            let bytes = body.collect().await?.to_bytes();
            bail!("{}", error_text(&bytes));
        }
        Ok(body)
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T> {
        let bytes = self
            .answer(method, path, body)
            .await?
            .collect()
            .await?
            .to_bytes();
        serde_json::from_slice(&bytes)
            .with_context(|| format!("unexpected answer from the agent to {path}"))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.json(hyper::Method::GET, path, None).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.json(hyper::Method::POST, path, Some(serde_json::to_vec(body)?))
            .await
    }

    /// Stream a text answer to stdout.
    pub async fn stream(&self, path: &str) -> Result<()> {
        self.stream_with(path, |out, data| out.write_all(data))
            .await
    }

    /// Stream a text response, each chunk through `write` (which gets whole
    /// lines only: a chunk's unfinished last line waits for the next).
    pub async fn stream_lines(
        &self,
        path: &str,
        mut line: impl FnMut(&mut dyn std::io::Write, &[u8]) -> std::io::Result<()>,
    ) -> Result<()> {
        let mut lines = Lines::default();
        self.stream_with(path, |out, data| lines.feed(data, |l| line(out, l)))
            .await
    }

    /// POST `body` and take the answer's lines as they come, each through
    /// `line` (without its newline). With `stdin`, this process's standard
    /// input follows the request's JSON line, as it comes, until it ends.
    pub async fn post_lines<B: Serialize>(
        &self,
        path: &str,
        body: &B,
        stdin: bool,
        mut line: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        use hyper::body::Frame;
        type Chunk = Result<Frame<Bytes>, std::io::Error>;
        let mut first = serde_json::to_vec(body)?;
        first.push(b'\n');
        let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(8);
        tx.send(Ok(Frame::data(Bytes::from(first))))
            .await
            .map_err(|_| anyhow!("cannot send the request"))?;
        if stdin {
            // Read on a thread of its own: stdin blocks.
            std::thread::spawn(move || {
                use std::io::Read;
                let mut input = std::io::stdin().lock();
                let mut buf = vec![0u8; 16 << 10];
                loop {
                    match input.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let chunk = Frame::data(Bytes::copy_from_slice(&buf[..n]));
                            if tx.blocking_send(Ok(chunk)).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        } else {
            drop(tx);
        }
        let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
            let chunk = rx.recv().await?;
            Some((chunk, rx))
        });
        let body = http_body_util::StreamBody::new(Box::pin(chunks));
        let resp = self.send_body(hyper::Method::POST, path, body).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body.collect().await?.to_bytes();
            bail!("{}", error_text(&bytes));
        }
        let mut lines = Lines::default();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                lines.feed(&data, |l| line(l))?;
            }
        }
        Ok(())
    }

    async fn stream_with(
        &self,
        path: &str,
        mut write: impl FnMut(&mut dyn std::io::Write, &[u8]) -> std::io::Result<()>,
    ) -> Result<()> {
        use std::io::Write;
        let mut body = self.answer(hyper::Method::GET, path, None).await?;
        let mut out = std::io::stdout().lock();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                write(&mut out, &data)?;
                out.flush()?;
            }
        }
        Ok(())
    }
}

/// An error answer's one line: the agent's `error`, else the body as text.
fn error_text(bytes: &[u8]) -> String {
    serde_json::from_slice::<ErrorBody>(bytes)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned())
}

/// Whole lines out of chunks: a chunk's unfinished last line waits for
/// the next.
#[derive(Default)]
struct Lines {
    rest: Vec<u8>,
}

impl Lines {
    /// Take in `data`; each line it completes (without its newline)
    /// through `line`.
    fn feed<E>(
        &mut self,
        data: &[u8],
        mut line: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.rest.extend_from_slice(data);
        while let Some(end) = self.rest.iter().position(|b| *b == b'\n') {
            let l: Vec<u8> = self.rest.drain(..=end).collect();
            line(&l[..l.len() - 1])?;
        }
        Ok(())
    }
}

/// The runtime a command's async work runs on (one thread: the CLI waits
/// on the network, it computes little).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The user running this command, as the ledger names them.
pub fn local_actor() -> kiln_core::event::Actor {
    kiln_core::event::Actor::Local {
        uid: rustix::process::getuid().as_raw(),
    }
}

/// Record a change this command made in the home's ledger: through the
/// home's agent when one runs (it owns the state), else through the state
/// store's API. A failure is said, not fatal (what was made is made).
pub fn record(home: &Path, change: kiln_core::event::Change) {
    let recorded = runtime().and_then(|rt| {
        rt.block_on(async {
            let agent = Client::local(home);
            if agent.reachable().await {
                let _: kiln_core::api::RecordResponse = agent
                    .post("/v1/records", &kiln_core::api::RecordRequest { change })
                    .await?;
                return Ok(());
            }
            kiln_agent::record(home, change, local_actor()).await?;
            Ok(())
        })
    });
    if let Err(e) = recorded {
        eprintln!("warning: not recorded in the ledger: {e}");
    }
}
