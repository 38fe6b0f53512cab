//! The API from other machines (`kiln serve --api ADDR`): the same
//! endpoints as the Unix socket, over TLS, behind API tokens and roles,
//! plus the dashboard ([`crate::ui`]) and the store as an OCI distribution
//! endpoint ([`crate::oci`]).
//!
//! The decisions (which role an endpoint needs, whether a token checks
//! out, how long a failing address waits) are [`kiln_core::auth`]'s; this
//! module serves TLS; [`crate::gate`] reads the clock and the headers.
//!
//! The certificate is the user's (`--tls-cert`, `--tls-key`) or one made on
//! first start and kept in `$KILN_HOME/api/`; clients pin its fingerprint on
//! first use (`kiln login https://HOST:PORT`), as SSH does a host key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use hyper_util::rt::{TokioIo, TokioTimer};
use kiln_core::auth;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tower::ServiceExt;

use crate::agent::Agent;
use crate::gate::{Gate, refuse};

/// At most this many connections at once; more are closed on accept.
const MAX_CONNECTIONS: usize = 1024;
/// Connections one address may hold at once: one client cannot take every
/// slot of [`MAX_CONNECTIONS`].
const MAX_PER_ADDRESS: usize = 64;

/// A request body may send nothing for this long before the request is
/// failed (and its connection with it): a client that opens an upload and
/// then trickles nothing holds no slot for ever.
const BODY_IDLE: Duration = Duration::from_secs(30);

/// A request body that fails once nothing of it arrived for `idle`.
struct IdleBody<B> {
    inner: B,
    idle: Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl<B> IdleBody<B> {
    fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl<B> hyper::body::Body for IdleBody<B>
where
    B: hyper::body::Body + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::future::Future as _;
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = tokio::time::Instant::now() + this.idle;
                this.sleep.as_mut().reset(next);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                    "the request body sent nothing for {} s",
                    this.idle.as_secs()
                )
                .into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Connections held, by address; a [`Held`] gives its place back.
#[derive(Default)]
struct PerAddress(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

impl PerAddress {
    /// A place for one more connection from `ip`, unless it holds
    /// [`MAX_PER_ADDRESS`] already.
    fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<Held> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= MAX_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(Held(self.clone(), ip))
    }
}

struct Held(Arc<PerAddress>, std::net::IpAddr);

impl Drop for Held {
    fn drop(&mut self) {
        let mut m = (self.0).0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}
/// A client has this long for its TLS handshake and for each request's
/// headers.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    BadPem { path: PathBuf, reason: String },
    #[error("cannot make the API's certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the API's certificate and key do not make a TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("API listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The certificate the API serves, and its fingerprint (what clients pin).
pub struct ApiTls {
    pub config: Arc<rustls::ServerConfig>,
    pub fingerprint: String,
}

/// Where `--tls-cert` and `--tls-key` point, when the user gives them.
#[derive(Clone, Debug)]
pub struct GivenCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The user's certificate, or the one kept in `$KILN_HOME/api/`, made on
/// first start for `localhost`, the loopback addresses, the listen address
/// and the host's name.
pub fn tls(
    home: &Path,
    given: Option<&GivenCert>,
    addr: SocketAddr,
) -> Result<ApiTls, RemoteError> {
    let (cert, key) = match given {
        Some(g) => (g.cert.clone(), g.key.clone()),
        None => {
            let dir = home.join("api");
            let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
            if !cert.exists() || !key.exists() {
                make_cert(&dir, &cert, &key, addr)?;
            }
            (cert, key)
        }
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| RemoteError::BadPem {
            path: cert.clone(),
            reason: e.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(RemoteError::BadPem {
            path: cert,
            reason: "no certificate in it".into(),
        });
    };
    let fingerprint = auth::fingerprint(leaf);
    let private = PrivateKeyDer::from_pem_file(&key).map_err(|e| RemoteError::BadPem {
        path: key.clone(),
        reason: e.to_string(),
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, private)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(ApiTls {
        config: Arc::new(config),
        fingerprint,
    })
}

fn make_cert(dir: &Path, cert: &Path, key: &Path, addr: SocketAddr) -> Result<(), RemoteError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RemoteError::Io { path, source }
    };
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if !addr.ip().is_unspecified() {
        names.push(addr.ip().to_string());
    }
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() {
            names.push(host.to_owned());
        }
    }
    names.dedup();
    let made = rcgen::generate_simple_self_signed(names)?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // The key first, owner-only, each file complete before it is visible.
    kiln_store::fsutil::write_private(key, made.signing_key.serialize_pem().as_bytes())
        .map_err(io(key))?;
    kiln_store::fsutil::write_private(cert, made.cert.pem().as_bytes()).map_err(io(cert))?;
    tracing::info!(
        "made a self-signed certificate for the API in {}",
        dir.display()
    );
    Ok(())
}

/// Serve `app` over TLS on `listener` until the task is aborted.
pub async fn serve(listener: tokio::net::TcpListener, tls: Arc<rustls::ServerConfig>, app: Router) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_address = Arc::new(PerAddress::default());
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, most likely: wait, rather than spin.
                tracing::warn!("API accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(held) = per_address.take(addr.ip()) else {
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let _slot = (slot, held);
            let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_LIMIT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(addr));
                    app.clone()
                        .oneshot(req.map(|b| axum::body::Body::new(IdleBody::new(b, BODY_IDLE))))
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_LIMIT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Everything the TLS port answers, behind [`gate`].
pub fn router(agent: Arc<Agent>) -> Router {
    let gate = Gate::new(agent.clone());
    crate::api::router(agent.clone())
        .merge(crate::ui::router(gate.clone()))
        .merge(crate::oci::router(agent))
        .fallback(|| async { refuse(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(axum::middleware::from_fn_with_state(
            gate,
            crate::gate::gate,
        ))
        .layer(axum::middleware::map_response(
            crate::gate::security_headers,
        ))
}

#[cfg(test)]
mod per_address_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_body_that_sends_nothing_fails_after_its_idle_time() {
        use futures_util::StreamExt as _;
        use http_body_util::BodyExt as _;
        let chunks = futures_util::stream::iter(vec![Ok::<_, std::io::Error>(
            hyper::body::Frame::data(bytes::Bytes::from_static(b"ab")),
        )])
        .chain(futures_util::stream::pending());
        let body = http_body_util::StreamBody::new(chunks);
        let mut b = IdleBody::new(body, Duration::from_secs(30));
        let first = b
            .frame()
            .await
            .and_then(|f| f.ok())
            .and_then(|f| f.into_data().ok());
        assert_eq!(first.as_deref(), Some(&b"ab"[..]));
        let started = tokio::time::Instant::now();
        let err = b.frame().await.and_then(|f| f.err()).map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("the request body sent nothing for 30 s")
        );
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(30),
            "measured from the last frame"
        );
    }

    #[test]
    fn one_address_holds_at_most_its_share_and_gives_it_back() {
        let p = Arc::new(PerAddress::default());
        let a: std::net::IpAddr = "127.0.0.1".parse().unwrap_or_else(|_| unreachable!());
        let b: std::net::IpAddr = "127.0.0.2".parse().unwrap_or_else(|_| unreachable!());
        let held: Vec<Held> = (0..MAX_PER_ADDRESS).filter_map(|_| p.take(a)).collect();
        assert_eq!(held.len(), MAX_PER_ADDRESS);
        assert!(p.take(a).is_none(), "one more from the same address");
        assert!(p.take(b).is_some(), "another address still gets in");
        drop(held);
        assert!(p.take(a).is_some(), "places are given back");
        assert!(p.0.lock().unwrap_or_else(|e| e.into_inner()).len() <= 1);
    }
}
