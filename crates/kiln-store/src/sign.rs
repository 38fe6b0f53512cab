//! Signed images: SSH signatures (`sshsig`, the format git uses for signed
//! commits) over an image's manifest digest, namespace `kiln`, checkable
//! without kiln: `ssh-keygen -Y verify -n kiln -f allowed_signers -I WHO -s
//! SIG` with the digest (`sha256:…`, no newline) on stdin. Users sign with
//! an ed25519 key kiln made (`kiln key generate`) or one they have.
//!
//! A signature is kept in the store as an OCI 1.1 artifact whose `subject`
//! is the image's manifest (a referrer), so it travels with the image to a
//! registry and back.

use std::path::{Path, PathBuf};

use kiln_core::Digest;
use kiln_core::oci::Descriptor;
use ssh_key::{HashAlg, LineEnding, PrivateKey, PublicKey, SshSig};

use crate::store::{Store, StoreError};

/// The sshsig namespace of kiln's image signatures.
pub const NAMESPACE: &str = "kiln";
/// The `artifactType` of a signature referrer, and its layer's media type.
pub const ARTIFACT_TYPE: &str = "application/vnd.kiln.signature.sshsig.v1";

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not an OpenSSH private key ({detail})", path.display())]
    NotAKey { path: PathBuf, detail: String },
    #[error("{}: the key is encrypted: add it to your SSH agent (ssh-add) and sign with its public key (--key {}.pub)", path.display(), path.display())]
    Encrypted { path: PathBuf },
    #[error("{}: a {algorithm} key: kiln signs with ed25519 keys", path.display())]
    Algorithm { path: PathBuf, algorithm: String },
    #[error("{0} exists: choose another name")]
    Exists(PathBuf),
    #[error("signing: {0}")]
    Sign(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `$KILN_HOME/keys/NAME`, or NAME itself when it is a path to a key.
pub fn key_path(home: &Path, name: &str) -> PathBuf {
    let named = home.join("keys").join(name);
    if name.contains('/') || (!named.exists() && Path::new(name).exists()) {
        PathBuf::from(name)
    } else {
        named
    }
}

/// Make an ed25519 key `$KILN_HOME/keys/NAME` (0600) and `NAME.pub`.
pub fn generate(home: &Path, name: &str) -> Result<(PathBuf, PublicKey), SignError> {
    let dir = home.join("keys");
    let path = dir.join(name);
    if path.exists() {
        return Err(SignError::Exists(path));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SignError::Io { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let mut key = PrivateKey::random(&mut ssh_key::rand_core::OsRng, ssh_key::Algorithm::Ed25519)
        .map_err(|e| SignError::Sign(e.to_string()))?;
    key.set_comment(name);
    // Written owner-only by ssh-key, then the public half beside it.
    key.write_openssh_file(&path, LineEnding::LF)
        .map_err(|e| SignError::Io {
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
    let public = key.public_key().clone();
    let pub_path = path.with_extension("pub");
    let text = public
        .to_openssh()
        .map_err(|e| SignError::Sign(e.to_string()))?;
    std::fs::write(&pub_path, format!("{text}\n")).map_err(io(&pub_path))?;
    Ok((path, public))
}

/// Read a private key to sign with: OpenSSH format, ed25519, unencrypted.
pub fn load(path: &Path) -> Result<PrivateKey, SignError> {
    let bytes = std::fs::read(path).map_err(|source| SignError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let key = PrivateKey::from_openssh(&bytes).map_err(|e| SignError::NotAKey {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    if key.is_encrypted() {
        return Err(SignError::Encrypted {
            path: path.to_path_buf(),
        });
    }
    if key.algorithm() != ssh_key::Algorithm::Ed25519 {
        return Err(SignError::Algorithm {
            path: path.to_path_buf(),
            algorithm: key.algorithm().to_string(),
        });
    }
    Ok(key)
}

/// The fingerprint of the OpenSSH public key in `path`, if it holds one
/// (signing with it is then the SSH agent's).
pub fn public_key_fingerprint(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    PublicKey::from_openssh(text.trim())
        .ok()
        .map(|k| fingerprint(&k))
}

/// A key's fingerprint as `ssh-keygen -l` prints it (`SHA256:…`).
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Sign the image `manifest` with `key` and keep the signature as a
/// referrer of it. Returns the signature's PEM and the referrer's
/// descriptor.
pub fn sign_image(
    store: &Store,
    manifest: &Descriptor,
    key: &PrivateKey,
) -> Result<(String, Descriptor), SignError> {
    let sig = key
        .sign(
            NAMESPACE,
            HashAlg::Sha512,
            manifest.digest.to_string().as_bytes(),
        )
        .map_err(|e| SignError::Sign(e.to_string()))?;
    let pem = sig
        .to_pem(LineEnding::LF)
        .map_err(|e| SignError::Sign(e.to_string()))?;
    let descriptor = keep_signature(store, manifest, &pem)?;
    Ok((pem, descriptor))
}

/// Keep a signature made elsewhere (by `ssh-keygen -Y sign` with a key
/// the SSH agent holds, as git's SSH signing does) as a referrer of
/// `manifest`, once it checks out: an SSH signature in namespace `kiln`
/// of that digest. Returns the referrer's descriptor.
pub fn keep_signature(
    store: &Store,
    manifest: &Descriptor,
    pem: &str,
) -> Result<Descriptor, SignError> {
    let sig = SshSig::from_pem(pem.trim())
        .map_err(|e| SignError::Sign(format!("not an SSH signature: {e}")))?;
    let public = PublicKey::from(sig.public_key().clone());
    if sig.namespace() != NAMESPACE {
        return Err(SignError::Sign(format!(
            "the signature's namespace is `{}`, not `{NAMESPACE}`",
            sig.namespace()
        )));
    }
    public
        .verify(NAMESPACE, manifest.digest.to_string().as_bytes(), &sig)
        .map_err(|_| SignError::Sign(format!("the signature does not sign {}", manifest.digest)))?;
    let signer = [("dev.kiln.signer".to_owned(), fingerprint(&public))].into();
    Ok(store.add_artifact(manifest, ARTIFACT_TYPE, pem.as_bytes(), &signer)?)
}

/// One signature found on an image.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Found {
    /// `SHA256:…` of the key that made it (as the signature says).
    pub signer: String,
    /// The key, OpenSSH format (`ssh-ed25519 AAAA…`).
    pub key: String,
    /// The signature checks out against the image's digest and that key.
    pub valid: bool,
    /// Why it does not, when it does not.
    pub problem: Option<String>,
}

/// Every signature referrer of `digest`, each checked (cryptographically:
/// whether its signer is trusted is the caller's policy).
pub fn signatures(store: &Store, digest: &Digest) -> Result<Vec<Found>, SignError> {
    let mut out = Vec::new();
    for (d, payload) in store.artifacts(digest, ARTIFACT_TYPE)? {
        let Some(sig) = payload.and_then(|p| SshSig::from_pem(p).ok()) else {
            out.push(Found {
                signer: "?".into(),
                key: String::new(),
                valid: false,
                problem: Some(format!("signature {} is not an SSH signature", d.short())),
            });
            continue;
        };
        let public = PublicKey::from(sig.public_key().clone());
        let problem = if sig.namespace() != NAMESPACE {
            Some(format!(
                "namespace `{}`, not `{NAMESPACE}`",
                sig.namespace()
            ))
        } else {
            public
                .verify(NAMESPACE, digest.to_string().as_bytes(), &sig)
                .err()
                .map(|_| format!("does not sign {}", digest.short()))
        };
        out.push(Found {
            signer: fingerprint(&public),
            key: public.to_openssh().unwrap_or_default(),
            valid: problem.is_none(),
            problem,
        });
    }
    Ok(out)
}

/// Public keys from a `[trust] allowed_signers` list: each `ssh-ed25519
/// AAAA… [comment]`, or an `allowed_signers` line (`principal ssh-ed25519
/// AAAA…`). Their fingerprints.
pub fn allowed(lines: &[String]) -> Result<Vec<String>, String> {
    lines
        .iter()
        .map(|l| {
            let l = l.trim();
            let key = PublicKey::from_openssh(l).or_else(|_| {
                // `principal keytype base64 [comment]`
                let rest = l.split_once(char::is_whitespace).map(|x| x.1).unwrap_or("");
                PublicKey::from_openssh(rest.trim())
            });
            key.map(|k| fingerprint(&k))
                .map_err(|_| format!("[trust] allowed_signers: `{l}` is not an SSH public key"))
        })
        .collect()
}
