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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_LIMIT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(addr));
                    app.clone().oneshot(req.map(axum::body::Body::new))
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
