//! Images to and from OCI registries. Pulls go through kiln's own reader
//! of the distribution API ([`read`]: anonymous, basic and bearer-token
//! auth; every answer read whole has a cap, blobs stream), pushes through
//! `oci-client` (its auth flows likewise), with kiln's own checks on top:
//! every blob and manifest pulled is verified (digest and size) as it
//! streams and kept only once the whole image is, nothing is held whole in
//! memory, and the store's exact manifest bytes are pushed (the digest a
//! registry serves is the one the store has).
//!
//! - [`credentials`]: `kiln login`, Docker's config, insecure hosts.
//! - [`push`], [`pull`], [`read`].

pub mod credentials;
pub mod pin;
mod pull;
mod push;
pub mod read;

use std::sync::Arc;
use std::time::Duration;

use kiln_core::Digest;
use kiln_core::registry::{RegistryRef, Target};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::{
    Client, Reference, client::ClientConfig, client::ClientProtocol, secrets::RegistryAuth,
};

pub use credentials::{Auth, Credentials, Login};
pub use pull::{
    MEDIA_TYPE_DOCKER_MANIFEST, PULL_DEADLINE, PullReport, host_platform, pull, pull_within,
};
pub use push::{PushReport, push};

use crate::store::StoreError;

/// A manifest larger than this is refused (the distribution spec lets
/// registries refuse over 4 MiB; nothing kiln makes comes close).
pub const MAX_MANIFEST: usize = 4 << 20;

/// How long a registry may take to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a registry may send nothing on a connection.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Blobs moved at once.
const PARALLEL: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("login required for {host} (kiln login {host})")]
    LoginRequired { host: String },
    #[error("{host}: access to {repository} denied with the credentials from {from}")]
    Denied {
        host: String,
        repository: String,
        from: &'static str,
    },
    #[error("{reference}: not found in the registry")]
    NotFound { reference: String },
    #[error("cannot reach {host}: {detail}")]
    Unreachable { host: String, detail: String },
    #[error("{host}: {detail}")]
    Registry { host: String, detail: String },
    #[error(
        "blob {digest} from {host} does not match its digest (its bytes hash to {actual}); nothing was kept"
    )]
    BadBlob {
        host: String,
        digest: Digest,
        actual: Digest,
    },
    #[error(
        "blob {digest} from {host} has {got} bytes, not the {want} its descriptor says; nothing was kept"
    )]
    BadSize {
        host: String,
        digest: Digest,
        got: u64,
        want: u64,
    },
    #[error("the manifest of {reference} is over the 4 MiB limit")]
    ManifestTooBig { reference: String },
    #[error("{host}: its {what} is over the {limit} limit; nothing was kept")]
    TooBig {
        host: String,
        what: String,
        limit: String,
    },
    #[error(
        "pulling {reference} took longer than {after}; nothing was kept (a slow or endless registry answer; --timeout gives more time)",
        after = humantime::format_duration(*.after)
    )]
    Deadline { reference: String, after: Duration },
    #[error("the manifest of {reference} hashes to {actual}, not {expected}; nothing was kept")]
    ManifestDigest {
        reference: String,
        expected: String,
        actual: Digest,
    },
    #[error("the manifest of {reference} is not valid: {detail}")]
    BadManifest { reference: String, detail: String },
    #[error("{reference}: the index has no image for {platform}")]
    NoPlatform { reference: String, platform: String },
    #[error("{0}")]
    Destination(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Credentials(#[from] credentials::CredentialsError),
}

/// A connection to one registry, for one repository.
pub struct Registry {
    /// Pushes.
    client: Client,
    /// Pulls and the login check.
    reader: read::Reader,
    auth: RegistryAuth,
    /// Where the credentials came from (named when they are refused).
    from: &'static str,
    host: String,
}

impl Registry {
    /// A client for `host`: TLS with the system's roots, or plain HTTP if
    /// the user named the host insecure (`insecure`, or `kiln login
    /// --insecure`); never a silent fallback from one to the other.
    pub fn new(
        host: &str,
        credentials: &Credentials,
        insecure: bool,
    ) -> Result<Self, RegistryError> {
        // One crypto provider for rustls, installed once (a second install
        // is refused and changes nothing).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let plain = insecure || credentials.insecure(host);
        let protocol = if plain {
            ClientProtocol::HttpsExcept(vec![host.to_owned()])
        } else {
            ClientProtocol::Https
        };
        let config = ClientConfig {
            protocol,
            // Streams with its Content-Length: one PUT per blob, memory
            // bounded by the chunk, not the blob.
            use_monolithic_push: true,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            platform_resolver: None,
            ..ClientConfig::default()
        };
        let (auth, from) = match credentials.auth(host) {
            Auth::Anonymous => (RegistryAuth::Anonymous, "none (anonymous)"),
            Auth::Basic {
                username,
                password,
                from,
            } => (RegistryAuth::Basic(username, password), from),
        };
        let basic = match &auth {
            RegistryAuth::Basic(u, p) => Some((u.clone(), p.clone())),
            _ => None,
        };
        let scheme = if plain { "http" } else { "https" };
        Ok(Self {
            client: Client::new(config),
            reader: read::Reader::new(host, scheme, basic, from)?,
            auth,
            from,
            host: host.to_owned(),
        })
    }

    /// A client that pulls over TLS from a server whose certificate is
    /// the one of `fingerprint` (`sha256:HEX` of its DER), whatever its
    /// issuer: another node of a kiln cluster, whose fingerprint the
    /// cluster's state lists. Basic credentials as `credentials` has them.
    pub fn pinned(
        host: &str,
        credentials: &Credentials,
        fingerprint: &str,
    ) -> Result<Self, RegistryError> {
        let mut s = Self::new(host, credentials, false)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = Arc::new(pin::Pin::new(Some(fingerprint.to_owned()), provider))
            .client_config()
            .map_err(|e| RegistryError::Registry {
                host: host.to_owned(),
                detail: e.to_string(),
            })?;
        let basic = match &s.auth {
            RegistryAuth::Basic(u, p) => Some((u.clone(), p.clone())),
            _ => None,
        };
        s.reader = read::Reader::with_tls(host, "https", basic, s.from, Some(tls))?;
        Ok(s)
    }

    /// Whether the registry accepts these credentials, as `docker login`
    /// checks at once: a listing of a repository that likely does not exist
    /// needs them (not found means they were accepted).
    pub async fn check_login(&self) -> Result<(), RegistryError> {
        let probe =
            RegistryRef::parse(&format!("{}/kiln-login-check/probe", self.host)).map_err(|e| {
                RegistryError::Registry {
                    host: self.host.clone(),
                    detail: e.to_string(),
                }
            })?;
        match self.reader.get(&probe, "tags/list?n=1", &[]).await {
            Ok(_) | Err(RegistryError::NotFound { .. }) => Ok(()),
            Err(other) => Err(other),
        }
    }

    /// An error of the registry, named for users.
    fn error(&self, reference: &RegistryRef, e: OciDistributionError) -> RegistryError {
        let host = self.host.clone();
        let denied = || RegistryError::Denied {
            host: host.clone(),
            repository: reference.repository.clone(),
            from: self.from,
        };
        let login = || match self.auth {
            RegistryAuth::Anonymous => RegistryError::LoginRequired { host: host.clone() },
            _ => denied(),
        };
        match e {
            OciDistributionError::AuthenticationFailure(_)
            | OciDistributionError::UnauthorizedError { .. } => login(),
            OciDistributionError::ImageManifestNotFoundError(_) => RegistryError::NotFound {
                reference: reference.to_string(),
            },
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized))
                {
                    login()
                } else if codes.iter().any(|c| matches!(c, OciErrorCode::Denied)) {
                    denied()
                } else if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                            | OciErrorCode::BlobUnknown
                    )
                }) {
                    RegistryError::NotFound {
                        reference: reference.to_string(),
                    }
                } else {
                    RegistryError::Registry {
                        host,
                        detail: envelope
                            .errors
                            .iter()
                            .map(|e| format!("{:?}: {}", e.code, e.message))
                            .collect::<Vec<_>>()
                            .join("; "),
                    }
                }
            }
            OciDistributionError::ServerError { code, message, .. } => match code {
                401 => login(),
                403 => denied(),
                404 => RegistryError::NotFound {
                    reference: reference.to_string(),
                },
                _ => RegistryError::Registry {
                    host,
                    detail: format!("HTTP {code}: {}", message.trim()),
                },
            },
            OciDistributionError::RequestError(r) => match r.status().map(|s| s.as_u16()) {
                Some(401) => login(),
                Some(403) => denied(),
                Some(404) => RegistryError::NotFound {
                    reference: reference.to_string(),
                },
                _ => request_error(&host, &r),
            },
            // oci-client checks a manifest against the digest asked for
            // before kiln does: the same refusal.
            OciDistributionError::DigestError(
                oci_client::errors::DigestError::VerificationError { expected, actual },
            ) => match actual.parse::<Digest>() {
                Ok(actual) => RegistryError::ManifestDigest {
                    reference: reference.to_string(),
                    expected,
                    actual,
                },
                Err(_) => RegistryError::Registry {
                    host,
                    detail: format!("digest {actual} is not {expected}"),
                },
            },
            other => RegistryError::Registry {
                host,
                detail: other.to_string(),
            },
        }
    }
}

/// A request that got no answer (or a broken one) from `host`, named.
fn request_error(host: &str, r: &reqwest::Error) -> RegistryError {
    let host = host.to_owned();
    if !(r.is_connect() || r.is_timeout()) {
        return RegistryError::Registry {
            host,
            detail: describe(r),
        };
    }
    let mut detail = if r.is_timeout() {
        format!(
            "no answer within {} s",
            READ_TIMEOUT.as_secs().max(CONNECT_TIMEOUT.as_secs())
        )
    } else {
        describe(r)
    };
    if detail.contains("InvalidContentType") || detail.contains("corrupt message") {
        detail.push_str(&format!(
            " (it does not speak TLS; if {host} is a plain-HTTP registry, name it insecure: --insecure, or kiln login {host} --insecure)"
        ));
    }
    RegistryError::Unreachable { host, detail }
}

/// A reqwest error with its causes (its own message is often only "error
/// sending request").
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Where blobs were last seen on each registry: host → digest → the
/// repository that has it (`cache/registry-blobs.json`). A push to another
/// repository of the same registry mounts such a blob instead of uploading
/// it. A cache: a lost or wrong entry costs an upload, nothing more.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct KnownBlobs(std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>);

impl KnownBlobs {
    fn path(store: &crate::store::Store) -> std::path::PathBuf {
        store.root().join("cache/registry-blobs.json")
    }

    fn load(store: &crate::store::Store) -> Self {
        std::fs::read(Self::path(store))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn repository(&self, host: &str, digest: &Digest) -> Option<&str> {
        self.0
            .get(host)?
            .get(&digest.to_string())
            .map(String::as_str)
    }

    /// Remember that `repository` of `host` has `digests` (best effort).
    fn remember<'a>(
        store: &crate::store::Store,
        host: &str,
        repository: &str,
        digests: impl IntoIterator<Item = &'a Digest>,
    ) {
        let Ok(_lock) = store.lock() else { return };
        let mut known = Self::load(store);
        let entry = known.0.entry(host.to_owned()).or_default();
        for d in digests {
            entry.insert(d.to_string(), repository.to_owned());
        }
        if let Ok(bytes) = serde_json::to_vec(&known) {
            let _ = crate::fsutil::write_atomic(&Self::path(store), &bytes);
        }
    }
}

/// oci-client's reference for a registry reference.
fn reference(r: &RegistryRef) -> Reference {
    match &r.target {
        Some(Target::Tag(t)) => {
            Reference::with_tag(r.host.clone(), r.repository.clone(), t.to_string())
        }
        Some(Target::Digest(d)) => {
            Reference::with_digest(r.host.clone(), r.repository.clone(), d.to_string())
        }
        None => Reference::with_tag(r.host.clone(), r.repository.clone(), "latest".to_owned()),
    }
}
