//! Images between the nodes of a cluster. Each agent of a cluster serves
//! its store's **read** side of the OCI distribution API (`/v2/`: ping,
//! manifests and blobs, by digest or tag; no upload, no listing of other
//! names) on its advertised address, at a port it registers with its
//! membership. A node that must start a release whose image it lacks pulls
//! it **by digest** from a member that has it ([`fetch`]), through the same
//! pull as `kiln pull` (every manifest and blob verified against its digest
//! as it streams; nothing kept of a pull that does not finish).
//!
//! Node to node, the endpoint speaks TLS with a certificate each agent
//! makes for its address when it starts ([`certificate`]); its fingerprint
//! is registered with the membership, and a fetching node accepts that
//! certificate only (the cluster's state is the trust anchor, as it is for
//! everything else). A request carries the cluster's pull credentials:
//! HTTP Basic with a password derived from the key that seals the
//! cluster's secrets ([`pull_token`]), which only a member (a reader of the
//! cluster's state) has.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::IntoResponse;
use base64::Engine as _;
use kiln_core::Digest;
use kiln_core::registry::{RegistryRef, Target};
use kiln_store::Store;
use kiln_store::registry::{Credentials, Login, Registry, RegistryError};

/// The user name a node sends (any is accepted: the password is the proof).
pub const USER: &str = "kiln-node";

/// How long a node may take to fetch an image from another.
pub const FETCH_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// The cluster's node-to-node pull password: an HMAC of a fixed label under
/// the cluster's secret key (shared through the state store by its
/// members, never sent anywhere else).
pub fn pull_token(secret_key: &[u8; 32]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret_key);
    let tag = ring::hmac::sign(&key, b"kiln node pull v1");
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot make the image endpoint's certificate: {0}")]
    Certificate(String),
    #[error("cannot fetch images from the other nodes: {0}")]
    Runtime(String),
    #[error("no other member has image {digest} ({tried})")]
    Nowhere { digest: Digest, tried: String },
}

/// Whether `authorization` (a request's header) carries `token` as its
/// Basic password. Compared as digests: no early exit on the secret.
fn authorized(authorization: Option<&HeaderValue>, token: &str) -> bool {
    let Some(given) = authorization
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|raw| String::from_utf8(raw).ok())
    else {
        return false;
    };
    let password = given.split_once(':').map_or("", |(_, p)| p);
    Digest::of(password.as_bytes()) == Digest::of(token.as_bytes())
}

/// `read` (the read side of `/v2/`, `oci::read_router`) behind the
/// cluster's pull credentials. (Given, not built here: the controller
/// fetches through this module, and the OCI endpoint knows the agent.)
pub fn router(read: Router, token: String) -> Router {
    let token = Arc::new(token);
    read.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let token = token.clone();
            async move {
                if authorized(req.headers().get(header::AUTHORIZATION), &token) {
                    next.run(req).await
                } else {
                    let mut resp = (
                        StatusCode::UNAUTHORIZED,
                        "a member's pull credentials are required\n",
                    )
                        .into_response();
                    resp.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Basic realm=\"kiln-node\""),
                    );
                    resp
                }
            }
        },
    ))
}

/// A self-signed certificate for this node's image endpoint at `ip` (made
/// at each start, never written), its TLS configuration and fingerprint.
pub fn certificate(ip: std::net::IpAddr) -> Result<(Arc<rustls::ServerConfig>, String), PeerError> {
    let fail = |e: &dyn std::fmt::Display| PeerError::Certificate(e.to_string());
    let key = rcgen::KeyPair::generate().map_err(|e| fail(&e))?;
    let params = rcgen::CertificateParams::new(vec![ip.to_string()]).map_err(|e| fail(&e))?;
    let cert = params.self_signed(&key).map_err(|e| fail(&e))?;
    let der = cert.der().clone();
    let fingerprint = kiln_core::auth::fingerprint(&der);
    let private = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| fail(&e))?
    .with_no_client_auth()
    .with_single_cert(vec![der], private)
    .map_err(|e| fail(&e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(config), fingerprint))
}

/// A member's image endpoint: its name, where, and its certificate's
/// fingerprint.
pub type Endpoint = (String, SocketAddr, String);

/// Pull image `digest` (named `name` in stores) into `store` from the
/// first of `members` that has it, verified by digest. The member it came
/// from.
pub async fn fetch(
    store: &Store,
    home: &std::path::Path,
    members: &[Endpoint],
    token: &str,
    (name, digest): (&str, &Digest),
) -> Result<String, PeerError> {
    let mut tried = Vec::new();
    for (node, addr, pin) in members {
        match fetch_from(store, home, (*addr, pin), token, (name, digest)).await {
            Ok(()) => return Ok(node.clone()),
            Err(e) => tried.push(format!("{node}: {e}")),
        }
    }
    Err(PeerError::Nowhere {
        digest: digest.clone(),
        tried: if tried.is_empty() {
            "no other member serves images".to_owned()
        } else {
            tried.join("; ")
        },
    })
}

async fn fetch_from(
    store: &Store,
    home: &std::path::Path,
    (addr, pin): (SocketAddr, &str),
    token: &str,
    (name, digest): (&str, &Digest),
) -> Result<(), RegistryError> {
    let host = addr.to_string();
    let credentials = Credentials::open(home)?.with(
        &host,
        Login {
            username: Some(USER.to_owned()),
            password: Some(token.to_owned()),
            insecure: false,
        },
    );
    let registry = Registry::pinned(&host, &credentials, pin)?;
    let src = RegistryRef {
        host,
        repository: name.to_owned(),
        target: Some(Target::Digest(digest.clone())),
    };
    let report =
        kiln_store::registry::pull_within(store, &registry, &src, &|_| {}, FETCH_DEADLINE).await?;
    // A hostile member could answer another image under this digest's
    // name: the pull verified every byte against the digests it read, and
    // the manifest it kept must be the one asked for.
    if report.digest != *digest {
        return Err(RegistryError::BadManifest {
            reference: src.to_string(),
            detail: format!("answered {} for {digest}", report.digest),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node accepts another's endpoint only with the certificate the
    /// cluster lists for it.
    #[tokio::test]
    async fn only_the_listed_certificate_is_accepted() {
        let ip: std::net::IpAddr = std::net::Ipv4Addr::LOCALHOST.into();
        let (tls, pin) = certificate(ip).unwrap();
        let (_, other) = certificate(ip).unwrap();
        assert_ne!(pin, other, "a fresh certificate at each start");
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                // The handshake, then nothing: the pin is what is tested.
                let _ = acceptor.accept(s).await;
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let digest = Digest::of(b"image");
        let wrong = fetch_from(&store, dir.path(), (addr, &other), "t", ("app", &digest))
            .await
            .unwrap_err()
            .to_string();
        assert!(wrong.contains("is not the pinned certificate"), "{wrong}");
        let right = fetch_from(&store, dir.path(), (addr, &pin), "t", ("app", &digest))
            .await
            .unwrap_err()
            .to_string();
        assert!(!right.contains("is not the pinned certificate"), "{right}");
    }

    #[test]
    fn only_the_clusters_token_passes() {
        let token = pull_token(&[7; 32]);
        assert_eq!(token.len(), 64);
        assert_ne!(token, pull_token(&[8; 32]), "another cluster's key");
        let basic = |user: &str, pass: &str| {
            HeaderValue::from_str(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
            ))
            .unwrap()
        };
        assert!(authorized(Some(&basic(USER, &token)), &token));
        assert!(authorized(Some(&basic("anyone", &token)), &token));
        assert!(!authorized(Some(&basic(USER, "guess")), &token));
        assert!(!authorized(Some(&basic(USER, "")), &token));
        assert!(!authorized(None, &token));
        let bearer = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
        assert!(!authorized(Some(&bearer), &token));
        let junk = HeaderValue::from_static("Basic !!!");
        assert!(!authorized(Some(&junk), &token));
    }
}
