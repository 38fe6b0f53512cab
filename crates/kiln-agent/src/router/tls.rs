//! HTTPS on a listener: the certificates of the services on it, chosen by
//! the client's SNI, read from PEM files and read again when they change.
//!
//! One `rustls::ServerConfig` per listener, for its life (its session
//! cache and ticket keys survive a reload); what changes is the
//! [`Certs`] its resolver holds, swapped whole. TLS 1.2 and 1.3 only, with
//! rustls's default suites (it has no weak ones).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use kiln_core::edge::HostPattern;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path} for {owner}: {reason}")]
    File {
        owner: String,
        path: PathBuf,
        reason: String,
    },
    #[error("{path} for {owner} holds no certificate")]
    NoCertificate { owner: String, path: PathBuf },
    #[error("the key {key} is not the key of the certificate {cert} (for {owner})")]
    NotAPair {
        owner: String,
        cert: PathBuf,
        key: PathBuf,
    },
    #[error("TLS set-up: {0}")]
    Rustls(#[from] rustls::Error),
}

/// One service's certificate on a listener: the hosts it is for (none:
/// any, the default) and its files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// Who names it, for errors (`service web`).
    pub owner: String,
    pub hosts: Vec<HostPattern>,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Files that may not exist yet (a certificate ACME has still to
    /// issue): skipped until they do.
    pub optional: bool,
}

/// The certificates of one listener, by the host a client names.
#[derive(Debug, Default)]
pub struct Certs {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `.suffix`, longest first.
    wildcards: Vec<(String, Arc<CertifiedKey>)>,
    /// For a client that names no host, or one no certificate covers: the
    /// certificate of a service that names no host, if one does.
    default: Option<Arc<CertifiedKey>>,
}

impl Certs {
    /// The certificate for `sni` (already lower case, as rustls gives it).
    fn find(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let by_name = sni.and_then(|name| {
            self.exact.get(name).cloned().or_else(|| {
                self.wildcards
                    .iter()
                    .find(|(suffix, _)| name.ends_with(suffix.as_str()))
                    .map(|(_, c)| c.clone())
            })
        });
        by_name.or_else(|| self.default.clone())
    }

    /// The certificates of `sources` (the first to name a host keeps it).
    fn build(sources: &[Source]) -> Result<Self, TlsError> {
        let mut certs = Self::default();
        for s in sources {
            if s.optional && !(s.cert.exists() && s.key.exists()) {
                continue;
            }
            let key = Arc::new(load(s)?);
            if s.hosts.is_empty() {
                certs.default.get_or_insert(key.clone());
            }
            for h in &s.hosts {
                match h {
                    HostPattern::Exact(name) => {
                        certs.exact.entry(name.clone()).or_insert(key.clone());
                    }
                    HostPattern::Wildcard(suffix) => {
                        if !certs.wildcards.iter().any(|(x, _)| x == suffix) {
                            certs.wildcards.push((suffix.clone(), key.clone()));
                        }
                    }
                    HostPattern::Any => {
                        certs.default.get_or_insert(key.clone());
                    }
                }
            }
        }
        certs
            .wildcards
            .sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        Ok(certs)
    }
}

/// Read one certificate chain and its key, and check that they pair.
fn load(s: &Source) -> Result<CertifiedKey, TlsError> {
    let file = |path: &PathBuf, reason: String| TlsError::File {
        owner: s.owner.clone(),
        path: path.clone(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&s.cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| file(&s.cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            owner: s.owner.clone(),
            path: s.cert.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&s.key).map_err(|e| file(&s.key, e.to_string()))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::NotAPair {
            owner: s.owner.clone(),
            cert: s.cert.clone(),
            key: s.key.clone(),
        },
        e => file(&s.key, e.to_string()),
    })?;
    Ok(certified)
}

/// The ALPN protocol of ACME's TLS-ALPN-01 validation (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// TLS-ALPN-01 answers being asked for, shared by every HTTPS listener:
/// the name being validated → its challenge certificate.
pub type AlpnChallenges = Arc<ArcSwap<HashMap<String, Arc<CertifiedKey>>>>;

/// Picks a listener's certificate by SNI from the current [`Certs`]; a
/// CA validating a name by TLS-ALPN-01 (it offers only `acme-tls/1`) gets
/// that name's challenge certificate, and the connection ends after the
/// handshake.
#[derive(Debug)]
struct Resolver(ArcSwap<Certs>, AlpnChallenges);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // Only a client that offers nothing else (RFC 8737 §3): one that
        // also offers HTTP gets the name's real certificate.
        let mut offered = false;
        if let Some(mut alpn) = hello.alpn()
            && alpn.all(|p| {
                offered = true;
                p == ACME_TLS_ALPN
            })
            && offered
        {
            return hello
                .server_name()
                .and_then(|name| self.1.load().get(name).cloned());
        }
        self.0.load().find(hello.server_name())
    }
}

/// When a file last changed, as far as a reload cares (a renewal that
/// swaps a symlink changes what it points at: followed).
fn stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// A listener's TLS: its config (for the acceptor), and where its
/// certificates come from.
pub struct TlsListener {
    pub config: Arc<rustls::ServerConfig>,
    resolver: Arc<Resolver>,
    sources: Vec<Source>,
    stamps: Vec<Option<(SystemTime, u64)>>,
}

impl TlsListener {
    /// Read every certificate first: a file that is missing or wrong
    /// refuses the listener, naming it.
    pub fn new(sources: Vec<Source>, challenges: AlpnChallenges) -> Result<Self, TlsError> {
        let resolver = Arc::new(Resolver(
            ArcSwap::from_pointee(Certs::build(&sources)?),
            challenges,
        ));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
        Ok(Self {
            config: Arc::new(config),
            resolver,
            stamps: Self::stamps(&sources),
            sources,
        })
    }

    fn stamps(sources: &[Source]) -> Vec<Option<(SystemTime, u64)>> {
        sources
            .iter()
            .flat_map(|s| [stamp(&s.cert), stamp(&s.key)])
            .collect()
    }

    /// Serve `sources` from now on (a service came, went or changed its
    /// files); on an error nothing changes.
    pub fn set(&mut self, sources: Vec<Source>) -> Result<(), TlsError> {
        if sources == self.sources {
            return Ok(());
        }
        self.resolver.0.store(Arc::new(Certs::build(&sources)?));
        self.stamps = Self::stamps(&sources);
        self.sources = sources;
        Ok(())
    }

    /// Read the files again if any changed since they were read; whether
    /// the certificates were swapped. A renewal caught half-written (a
    /// certificate without its new key) fails to pair: the old ones stay,
    /// and the next look tries again.
    pub fn reload_if_changed(&mut self) -> Result<bool, TlsError> {
        let now = Self::stamps(&self.sources);
        if now == self.stamps {
            return Ok(false);
        }
        let certs = Certs::build(&self.sources)?;
        self.resolver.0.store(Arc::new(certs));
        self.stamps = now;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source with a fresh self-signed certificate for `hosts`, in `dir`.
    fn source(dir: &std::path::Path, name: &str, hosts: &[&str]) -> Source {
        let names: Vec<String> = if hosts.is_empty() {
            vec!["default.test".to_owned()]
        } else {
            hosts
                .iter()
                .map(|h| h.trim_start_matches("*.").to_owned())
                .collect()
        };
        let made = rcgen::generate_simple_self_signed(names).expect("certificate");
        let (cert, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, made.cert.pem()).expect("write");
        std::fs::write(&key, made.signing_key.serialize_pem()).expect("write");
        Source {
            owner: format!("service {name}"),
            hosts: hosts
                .iter()
                .map(|h| HostPattern::parse(h).expect("host"))
                .collect(),
            cert,
            key,
            optional: false,
        }
    }

    fn leaf(c: Option<Arc<CertifiedKey>>) -> Option<Vec<u8>> {
        c.map(|c| c.cert[0].to_vec())
    }

    #[test]
    fn the_certificate_is_the_most_specific_for_the_name_else_the_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sources = vec![
            source(dir.path(), "app", &["app.test"]),
            source(dir.path(), "tenants", &["*.app.test"]),
            source(dir.path(), "eu", &["*.eu.app.test"]),
        ];
        let certs = Certs::build(&sources).expect("build");
        let of = |i: usize| leaf(Some(Arc::new(load(&sources[i]).expect("load"))));
        assert_eq!(leaf(certs.find(Some("app.test"))), of(0));
        assert_eq!(leaf(certs.find(Some("a.app.test"))), of(1));
        assert_eq!(leaf(certs.find(Some("x.eu.app.test"))), of(2));
        // No default: a name no certificate covers, or none, gets nothing.
        assert!(certs.find(Some("other.test")).is_none());
        assert!(certs.find(None).is_none());
        let with_default = [sources, vec![source(dir.path(), "rest", &[])]].concat();
        let certs = Certs::build(&with_default).expect("build");
        let rest = leaf(Some(Arc::new(load(&with_default[3]).expect("load"))));
        assert_eq!(leaf(certs.find(Some("other.test"))), rest);
        assert_eq!(leaf(certs.find(None)), rest);
    }

    #[test]
    fn files_are_read_again_only_when_they_change_and_a_bad_pair_keeps_the_old() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = source(dir.path(), "a", &["a.test"]);
        let mut listener =
            TlsListener::new(vec![a.clone()], AlpnChallenges::default()).expect("listener");
        let before = leaf(listener.resolver.0.load().find(Some("a.test")));
        assert!(!listener.reload_if_changed().expect("reload"));
        // A certificate whose key is not written yet: refused, old one kept.
        let other = rcgen::generate_simple_self_signed(vec!["a.test".to_owned()]).expect("cert");
        std::fs::write(&a.cert, format!("{}\n", other.cert.pem())).expect("write");
        let err = listener.reload_if_changed().unwrap_err();
        assert!(matches!(err, TlsError::NotAPair { .. }), "{err}");
        assert_eq!(
            leaf(listener.resolver.0.load().find(Some("a.test"))),
            before
        );
        // Then its key: the new pair is served.
        std::fs::write(&a.key, other.signing_key.serialize_pem()).expect("write");
        assert!(listener.reload_if_changed().expect("reload"));
        assert_eq!(
            leaf(listener.resolver.0.load().find(Some("a.test"))),
            Some(other.cert.der().to_vec())
        );
        // A file that is gone names itself.
        let missing = Source {
            cert: dir.path().join("nope.pem"),
            ..a
        };
        let err = TlsListener::new(vec![missing], AlpnChallenges::default())
            .err()
            .expect("refused");
        assert!(err.to_string().contains("nope.pem"), "{err}");
    }
}
