//! Automatic certificates: for each HTTPS service whose `tls.acme` names a
//! directory, an order to that CA when its certificate is missing, due
//! ([`kiln_core::acme::renew_at`]) or for other names, the HTTP-01
//! challenge answered by the router on the service's `redirect_from`
//! address; failures back off ([`kiln_core::acme::backoff`]).
//!
//! The certificate and its key go to `$KILN_HOME/certs/acme/SERVICE.pem`
//! and `.key` (0600, each complete before it is visible, the key first),
//! where the HTTPS listener reads them as it reads any certificate file.
//! The account's credentials are kept in `$KILN_HOME/certs/acme/` per
//! directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use kiln_core::edge::HostPattern;
use kiln_core::service::TlsSpec;
use kiln_core::spec::ServiceName;
use sha2::Digest as _;

use crate::router::Router;

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("the CA {directory}: {source}")]
    Ca {
        directory: String,
        source: instant_acme::Error,
    },
    #[error("the CA refused the order for {names}: {status:?}{detail}")]
    Refused {
        names: String,
        status: OrderStatus,
        detail: String,
    },
    #[error("the CA offers no {0} challenge for {1}")]
    NoChallenge(&'static str, String),
    #[error("the DNS hook {hook} for {name}: {reason}")]
    Hook {
        hook: String,
        name: String,
        reason: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a key or request for the certificate: {0}")]
    Key(#[from] rcgen::Error),
    #[error("the TLS-ALPN-01 challenge certificate: {0}")]
    Certificate(String),
}

/// Where a service's ACME certificate and key are kept.
pub fn cert_paths(home: &Path, service: &ServiceName) -> (PathBuf, PathBuf) {
    let dir = home.join("certs").join("acme");
    (
        dir.join(format!("{service}.pem")),
        dir.join(format!("{service}.key")),
    )
}

/// The names a service's certificate is for: its hosts (`*.example.com`
/// for a wildcard), sorted.
fn names(hosts: &[HostPattern]) -> Vec<String> {
    let mut names: Vec<String> = hosts
        .iter()
        .filter_map(|h| match h {
            HostPattern::Exact(n) => Some(n.clone()),
            HostPattern::Wildcard(suffix) => Some(format!("*{suffix}")),
            HostPattern::Any => None,
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// What the certificate on disk is: its validity and names, if it can be
/// read.
fn on_disk(cert: &Path) -> Option<(SystemTime, SystemTime, Vec<String>)> {
    let pem = std::fs::read(cert).ok()?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
    let x509 = pem.parse_x509().ok()?;
    let to_time = |t: x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).ok()?;
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
    };
    let validity = x509.validity();
    let mut sans: Vec<String> = x509
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    x509_parser::extensions::GeneralName::DNSName(n) => Some(n.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    sans.sort();
    Some((
        to_time(validity.not_before)?,
        to_time(validity.not_after)?,
        sans,
    ))
}

/// Write `bytes` to `path` (0600, complete before it is visible) in a
/// directory only the agent reads (0700, made if missing).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AcmeError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| AcmeError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    kiln_store::fsutil::write_private(path, bytes).map_err(io)
}

/// One service's standing with its CA.
#[derive(Clone, Debug, Default)]
pub struct Standing {
    /// Failed orders in a row.
    pub failures: u32,
    /// Not before this (a back-off after a failure).
    pub not_before: Option<SystemTime>,
    pub last_error: Option<String>,
    /// When its certificate is due for renewal.
    pub renew_at: Option<SystemTime>,
}

impl Standing {
    /// As `kiln status` shows it.
    pub fn describe(&self) -> String {
        let at = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        match (&self.last_error, self.renew_at) {
            (Some(e), _) => format!(
                "ordering failed ({} in a row): {e}; next try at {}",
                self.failures,
                self.not_before.map_or_else(|| "once due".to_owned(), at)
            ),
            (None, Some(r)) => format!("issued; renewal due at {}", at(r)),
            (None, None) => "not issued yet".to_owned(),
        }
    }
}

/// The services' standings, for `kiln status` and the next pass.
pub type Standings = std::sync::Mutex<HashMap<ServiceName, Standing>>;

/// One pass: order what is missing or due. Each service's order runs to
/// its end before the next (a CA's rate limits are per account).
pub async fn pass(
    home: &Path,
    router: &Arc<Router>,
    services: Vec<(ServiceName, Vec<HostPattern>, TlsSpec)>,
    standings: &Standings,
    now: SystemTime,
) {
    for (name, hosts, tls) in services {
        let Some(directory) = tls.acme.clone() else {
            continue;
        };
        let want = names(&hosts);
        let (cert, key) = cert_paths(home, &name);
        let standing = standings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
            .cloned()
            .unwrap_or_default();
        if standing.not_before.is_some_and(|t| now < t) {
            continue;
        }
        let jitter = jitter_of(&name);
        let due = match on_disk(&cert) {
            Some((nb, na, sans)) if sans == want => {
                let at = kiln_core::acme::renew_at(nb, na, None, jitter);
                set(standings, &name, |s| s.renew_at = Some(at));
                now >= at
            }
            _ => true,
        };
        if !due {
            continue;
        }
        tracing::info!(
            "service {name}: ordering a certificate for {} from {directory}",
            want.join(", ")
        );
        match order(home, router, &directory, &tls, &want, (&cert, &key)).await {
            Ok(()) => {
                tracing::info!("service {name}: certificate issued for {}", want.join(", "));
                let renew = on_disk(&cert)
                    .map(|(nb, na, _)| kiln_core::acme::renew_at(nb, na, None, jitter));
                set(standings, &name, |s| {
                    s.failures = 0;
                    s.not_before = None;
                    s.last_error = None;
                    s.renew_at = renew;
                });
                router.reload_certificates().await;
            }
            Err(e) => {
                let failures = standing.failures.saturating_add(1);
                let wait = kiln_core::acme::backoff(failures, jitter, None);
                tracing::warn!(
                    "service {name}: {e}; trying again in {}",
                    humantime::format_duration(wait)
                );
                set(standings, &name, |s| {
                    s.failures = failures;
                    s.not_before = Some(now + wait);
                    s.last_error = Some(e.to_string());
                });
            }
        }
    }
}

fn set(standings: &Standings, name: &ServiceName, f: impl FnOnce(&mut Standing)) {
    f(standings
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(name.clone())
        .or_default());
}

/// A fraction from 0 to 1 fixed per service, so that its renewals and
/// retries land at the same place in their windows on every pass (and
/// differ between services).
fn jitter_of(name: &ServiceName) -> f64 {
    let h = sha2::Sha256::digest(name.as_str().as_bytes());
    f64::from(u16::from_be_bytes([h[0], h[1]])) / f64::from(u16::MAX)
}

/// One order, from account to certificate on disk.
async fn order(
    home: &Path,
    router: &Arc<Router>,
    directory: &str,
    tls: &TlsSpec,
    names: &[String],
    (cert_path, key_path): (&Path, &Path),
) -> Result<(), AcmeError> {
    let ca = |source| AcmeError::Ca {
        directory: directory.to_owned(),
        source,
    };
    let account = account(home, directory, tls).await?;
    let ids: Vec<Identifier> = names.iter().map(|n| Identifier::Dns(n.clone())).collect();
    let mut order = account.new_order(&NewOrder::new(&ids)).await.map_err(ca)?;
    let mut tokens = Vec::new();
    let mut alpn_names = Vec::new();
    // DNS-01's records set: (name, value), cleaned up whatever happens.
    let mut records = Vec::new();
    let dns = !tls.dns_hook.is_empty();
    let answered = async {
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(ca)?;
            if authz.status == AuthorizationStatus::Valid {
                continue;
            }
            let Identifier::Dns(domain) = authz.identifier().identifier.clone() else {
                continue;
            };
            // DNS-01 through the hook; HTTP-01 where the router has a
            // plain address for the names; else TLS-ALPN-01 on the HTTPS
            // one itself.
            let (kind, what) = if dns {
                (ChallengeType::Dns01, "DNS-01")
            } else if tls.redirect_from.is_some() {
                (ChallengeType::Http01, "HTTP-01")
            } else {
                (ChallengeType::TlsAlpn01, "TLS-ALPN-01")
            };
            let mut challenge = authz
                .challenge(kind.clone())
                .ok_or_else(|| AcmeError::NoChallenge(what, domain.clone()))?;
            let answer = challenge.key_authorization();
            tracing::info!("proving {domain} to {directory} by {what}");
            if kind == ChallengeType::TlsAlpn01 {
                router
                    .set_alpn_challenge(&domain, Some(alpn_certificate(&domain, answer.digest())?));
                alpn_names.push(domain.clone());
            } else if dns {
                // A wildcard's record is its base name's.
                let name = format!("_acme-challenge.{}", domain.trim_start_matches("*."));
                let value = answer.dns_value();
                hook(&tls.dns_hook, "present", &name, &value).await?;
                records.push((name, value));
            } else {
                router.set_challenge(&challenge.token, Some(answer.as_str()));
                tokens.push(challenge.token.clone());
            }
            challenge.set_ready().await.map_err(ca)?;
        }
        Ok::<_, AcmeError>(())
    }
    .await;
    let ready = match answered {
        Ok(()) => order.poll_ready(&retries()).await.map_err(ca),
        Err(e) => Err(e),
    };
    for t in &tokens {
        router.set_challenge(t, None);
    }
    for name in &alpn_names {
        router.set_alpn_challenge(name, None);
    }
    for (name, value) in &records {
        if let Err(e) = hook(&tls.dns_hook, "cleanup", name, value).await {
            tracing::warn!("{e}");
        }
    }
    let status = ready?;
    if status != OrderStatus::Ready {
        let detail = order
            .state()
            .error
            .as_ref()
            .map(|p| format!(": {}", p.detail.clone().unwrap_or_default()))
            .unwrap_or_default();
        return Err(AcmeError::Refused {
            names: names.join(", "),
            status,
            detail,
        });
    }
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::new(names.to_vec())?.serialize_request(&key)?;
    order.finalize_csr(csr.der()).await.map_err(ca)?;
    let chain = order.poll_certificate(&retries()).await.map_err(ca)?;
    // The key first: a reload that sees the new certificate sees its key.
    write_private(key_path, key.serialize_pem().as_bytes())?;
    write_private(cert_path, chain.as_bytes())
}

/// The self-signed certificate that answers TLS-ALPN-01 for `name`
/// (RFC 8737 §3): the name, and the SHA-256 of the key authorization in
/// the critical `acmeIdentifier` extension.
fn alpn_certificate(
    name: &str,
    digest: impl AsRef<[u8]>,
) -> Result<Arc<rustls::sign::CertifiedKey>, AcmeError> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest.as_ref())];
    let cert = params.self_signed(&key)?;
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| AcmeError::Certificate(e.to_string()))?;
    // Not `CertifiedKey::from_der`: its check that the key is the
    // certificate's parses the certificate, and refuses the critical
    // extension only ACME understands.
    let signing = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| AcmeError::Certificate(e.to_string()))?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

/// Run the DNS hook: `HOOK... ACTION NAME VALUE`, at most a minute.
async fn hook(argv: &[String], action: &str, name: &str, value: &str) -> Result<(), AcmeError> {
    let fail = |reason: String| AcmeError::Hook {
        hook: argv.join(" "),
        name: name.to_owned(),
        reason,
    };
    let Some((program, args)) = argv.split_first() else {
        return Err(fail("no command".to_owned()));
    };
    let run = tokio::process::Command::new(program)
        .args(args)
        .args([action, name, value])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .map_err(|_| fail(format!("{action} did not end within 60s")))?
        .map_err(|e| fail(format!("cannot run it: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(fail(format!(
            "{action} failed ({}): {}",
            out.status,
            err.trim()
        )));
    }
    Ok(())
}

/// How long an order may take once its challenges are answered.
fn retries() -> RetryPolicy {
    RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(2.0)
        .timeout(Duration::from_secs(60))
}

/// The account with this directory: created the first time, its
/// credentials kept (0600) for the next orders.
async fn account(home: &Path, directory: &str, tls: &TlsSpec) -> Result<Account, AcmeError> {
    let ca = |source| AcmeError::Ca {
        directory: directory.to_owned(),
        source,
    };
    let digest = sha2::Sha256::digest(directory.as_bytes());
    let id: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let path = home
        .join("certs")
        .join("acme")
        .join(format!("account-{id}.json"));
    let builder = match &tls.acme_root {
        Some(root) => Account::builder_with_root(root).map_err(ca)?,
        None => Account::builder().map_err(ca)?,
    };
    if let Ok(bytes) = std::fs::read(&path)
        && let Ok(credentials) = serde_json::from_slice::<AccountCredentials>(&bytes)
    {
        return builder.from_credentials(credentials).await.map_err(ca);
    }
    let contact = tls.acme_email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, credentials) = builder
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            directory.to_owned(),
            None,
        )
        .await
        .map_err(ca)?;
    let json = serde_json::to_vec(&credentials).map_err(|e| AcmeError::Io {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    write_private(&path, &json)?;
    Ok(account)
}
