//! A TLS server accepted by its certificate's fingerprint (`sha256:HEX` of
//! its DER) rather than by an issuer, after the handshake proved it holds
//! the certificate's key: how `kiln login` and `--agent` trust an agent's
//! self-signed API certificate, and how a kiln node trusts another node's
//! image endpoint, whose certificate the cluster's state lists.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Accepts the pinned certificate only — any, when there is no pin yet
/// (`kiln login`'s first look) — and remembers the one it was shown.
#[derive(Debug)]
pub struct Pin {
    want: Option<String>,
    seen: Mutex<Option<String>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl Pin {
    pub fn new(want: Option<String>, provider: Arc<rustls::crypto::CryptoProvider>) -> Self {
        Self {
            want,
            seen: Mutex::new(None),
            provider,
        }
    }

    /// The fingerprint it accepts, if any.
    pub fn want(&self) -> Option<&str> {
        self.want.as_deref()
    }

    /// The fingerprint the server presented on the last handshake.
    pub fn seen(&self) -> Option<String> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A client configuration that trusts this pin only.
    pub fn client_config(self: &Arc<Self>) -> Result<rustls::ClientConfig, rustls::Error> {
        Ok(
            rustls::ClientConfig::builder_with_provider(self.provider.clone())
                .with_safe_default_protocol_versions()?
                .dangerous()
                .with_custom_certificate_verifier(self.clone())
                .with_no_client_auth(),
        )
    }
}

impl ServerCertVerifier for Pin {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = kiln_core::auth::fingerprint(end_entity);
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(seen.clone());
        match &self.want {
            None => Ok(ServerCertVerified::assertion()),
            Some(w) if kiln_core::auth::constant_time_eq(w.as_bytes(), seen.as_bytes()) => {
                Ok(ServerCertVerified::assertion())
            }
            Some(w) => Err(rustls::Error::General(format!(
                "certificate {seen} is not the pinned certificate {w}"
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
