//! The API from other machines (`kiln serve --api ADDR`): the same
//! endpoints as the Unix socket, over TLS, behind API tokens and roles,
//! plus the dashboard ([`crate::ui`]) and the store as an OCI distribution
//! endpoint ([`crate::oci`]).
//!
//! The decisions (which role an endpoint needs, whether a token checks
//! out, how long a failing address waits) are [`kiln_core::auth`]'s; this
//! module only reads the clock, the headers and the network.
//!
//! The certificate is the user's (`--tls-cert`, `--tls-key`) or one made on
//! first start and kept in `$KILN_HOME/api/`; clients pin its fingerprint on
//! first use (`kiln login https://HOST:PORT`), as SSH does a host key.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use kiln_core::api::ErrorBody;
use kiln_core::auth::{self, Refusal, Role, Route};
use kiln_core::event::Actor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tower::ServiceExt;

use crate::agent::Agent;
use crate::api::{Caller, unix_now};

/// The cookie the dashboard keeps its token in (HttpOnly, Secure,
/// SameSite=Strict).
pub const COOKIE: &str = "kiln_token";
/// The header a dashboard request that changes something carries: the
/// anti-forgery value of its cookie's token ([`auth::csrf_value`]).
pub const CSRF_HEADER: &str = "x-kiln-csrf";

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
    write_private(key, made.signing_key.serialize_pem().as_bytes()).map_err(io(key))?;
    write_private(cert, made.cert.pem().as_bytes()).map_err(io(cert))?;
    tracing::info!(
        "made a self-signed certificate for the API in {}",
        dir.display()
    );
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// What the edge remembers between requests: failures by address.
pub struct Gate {
    agent: Arc<Agent>,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl Gate {
    pub fn new(agent: Arc<Agent>) -> Arc<Self> {
        Arc::new(Self {
            agent,
            failures: Mutex::new(HashMap::new()),
        })
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (u32, Instant)>> {
        // A counter map has no invariant a panic could break.
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count a failure from `ip`; how long to wait before answering it.
    fn failed(&self, ip: IpAddr, now: Instant) -> Duration {
        let mut map = self.failures();
        // Bounded: an address flood cannot grow the map without end.
        if map.len() > 10_000 {
            map.retain(|_, (_, last)| now.duration_since(*last) <= auth::FAILURE_MEMORY);
        }
        let e = map.entry(ip).or_insert((0, now));
        if now.duration_since(e.1) > auth::FAILURE_MEMORY {
            e.0 = 0;
        }
        let delay = auth::failure_delay(e.0);
        e.0 = e.0.saturating_add(1);
        e.1 = now;
        delay
    }

    /// A valid token from `ip`: its failures are forgotten.
    fn succeeded(&self, ip: IpAddr) {
        self.failures().remove(&ip);
    }

    /// Check a token as the login form presents it, slowed like any other.
    pub(crate) async fn login(&self, ip: IpAddr, token: &str) -> Result<Role, Refusal> {
        match self.agent.authenticate(token, unix_now()) {
            Ok((_, role)) => {
                self.succeeded(ip);
                Ok(role)
            }
            Err(e) => {
                tokio::time::sleep(self.failed(ip, Instant::now())).await;
                Err(e)
            }
        }
    }

    pub(crate) fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }
}

/// The token a request presents, and whether it came as the dashboard's
/// cookie: `Authorization: Bearer T`, `Authorization: Basic` with T as the
/// password (what registry clients send), or the cookie.
pub(crate) fn presented(headers: &HeaderMap) -> Option<(String, bool)> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(t) = v.strip_prefix("Bearer ") {
            return Some((t.trim().to_owned(), false));
        }
        if let Some(b) = v.strip_prefix("Basic ") {
            use base64::Engine as _;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()?;
            let pair = String::from_utf8(raw).ok()?;
            let (_, t) = pair.split_once(':')?;
            return Some((t.to_owned(), false));
        }
        return None;
    }
    cookie(headers, COOKIE).map(|t| (t, true))
}

/// A cookie's value from the `Cookie` headers.
pub(crate) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

pub(crate) fn refuse(status: StatusCode, error: impl Into<String>) -> Response {
    (
        status,
        axum::Json(ErrorBody {
            error: error.into(),
        }),
    )
        .into_response()
}

/// Every request on the TLS port passes here: 404 for what is not an
/// endpoint, 401 for a missing, wrong, revoked or expired token, 403 for a
/// role too low or a cookie-borne change without its anti-forgery value.
/// A refused request reaches no handler: it changes nothing. No token is
/// ever logged.
pub async fn gate(
    State(gate): State<Arc<Gate>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    mut req: Request,
    next: Next,
) -> Response {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let shown: String = path.chars().take(80).collect();
    let needs = match auth::route(&method, &path) {
        Route::Unknown => {
            return refuse(
                StatusCode::NOT_FOUND,
                format!("no such endpoint: {method} {shown}"),
            );
        }
        Route::Open => return next.run(req).await,
        Route::Needs(role) => role,
    };
    let ui = path == "/" || path.starts_with("/ui/");
    let registry = path.starts_with("/v2/");
    let unauthorized = |error: &str| {
        if ui && method == "GET" {
            return (StatusCode::SEE_OTHER, [(header::LOCATION, "/login")]).into_response();
        }
        let mut r = refuse(StatusCode::UNAUTHORIZED, error);
        if registry {
            // Registry clients (docker, skopeo) send credentials only when
            // challenged.
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"kiln\""),
            );
        }
        r
    };
    let Some((token, by_cookie)) = presented(req.headers()) else {
        return unauthorized(
            "login required: no API token (kiln login https://HOST:PORT, or KILN_TOKEN)",
        );
    };
    let ip = addr.ip();
    let (name, role) = match gate.agent.authenticate(&token, unix_now()) {
        Ok(ok) => {
            gate.succeeded(ip);
            ok
        }
        Err(refusal) => {
            // An address that keeps failing waits longer for each answer.
            tokio::time::sleep(gate.failed(ip, Instant::now())).await;
            tracing::warn!("{ip}: refused an API token ({method} {shown})");
            return unauthorized(match refusal {
                Refusal::Invalid => "invalid or revoked API token",
                Refusal::Expired => "expired API token",
            });
        }
    };
    if role < needs {
        return refuse(
            StatusCode::FORBIDDEN,
            format!("token {name} is a {role}: {method} {shown} needs {needs}"),
        );
    }
    if by_cookie && !matches!(method.as_str(), "GET" | "HEAD") {
        let want = auth::csrf_value(gate.agent.key(), &token);
        let given = req
            .headers()
            .get(CSRF_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !auth::constant_time_eq(given, want.as_bytes()) {
            return refuse(
                StatusCode::FORBIDDEN,
                "missing or wrong anti-forgery value: the dashboard's own buttons send it",
            );
        }
    }
    req.extensions_mut().insert(Caller {
        actor: Actor::Token { name },
        role,
    });
    req.extensions_mut().insert(Presented(token));
    next.run(req).await
}

/// The token that authenticated a request (the dashboard derives its
/// anti-forgery value from it). Never logged.
#[derive(Clone)]
pub(crate) struct Presented(pub String);

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
        .layer(axum::middleware::from_fn_with_state(gate, self::gate))
}
