//! The agent's trust policy: which images may run here. It belongs to the
//! agent (`kiln serve --trust FILE`), never to the client that asks: on
//! every apply and every hand rollback the agent reads the image's
//! signatures from its own store, verifies them itself, and records the
//! signers **it** verified. A spec's own `[trust]` is checked by the CLI
//! before it sends anything; it can only add to this, never lift it.

use std::path::{Path, PathBuf};

use kiln_core::Digest;
use kiln_core::reference::ImageRef;
use kiln_core::registry::{RegistryRef, Target};
use kiln_core::spec::TrustSpec;
use kiln_store::Store;

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("trust policy {path}: {1}", path = .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0}")]
    Parse(#[from] kiln_core::spec::SpecError),
    #[error("trust policy {path}: {1}", path = .0.display())]
    Signers(PathBuf, String),
}

/// Why an image that borrows the host's userland is refused where the
/// policy asks for self-contained ones.
pub(crate) const NOT_SELF_CONTAINED: &str = "it has no userland of its own and would borrow the host's /usr (require_self_contained): bake it on a base ([images.NAME] base = …)";

/// What `--trust FILE` says, with the allowed signers as fingerprints.
#[derive(Clone, Debug)]
pub struct TrustPolicy {
    pub file: PathBuf,
    pub require_signed: bool,
    /// `SHA256:…` fingerprints of the allowed keys.
    pub allowed: Vec<String>,
    /// Only images with a userland of their own run here.
    pub require_self_contained: bool,
}

impl TrustPolicy {
    pub fn load(path: &Path) -> Result<Self, TrustError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| TrustError::Read(path.to_owned(), e))?;
        let spec = TrustSpec::parse_file(&text, &path.display().to_string())?;
        let allowed = kiln_store::sign::allowed(&spec.allowed_signers)
            .map_err(|e| TrustError::Signers(path.to_owned(), e))?;
        Ok(Self {
            file: path.to_owned(),
            require_signed: spec.require_signed,
            allowed,
            require_self_contained: spec.require_self_contained,
        })
    }
}

/// Why an image may not run, for the one-line refusal.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It may: these are the signers the agent verified (valid signatures
    /// by keys its policy allows, or by keys the client named).
    Allowed(Vec<String>),
    /// It may not: what was found.
    Refused(String),
}

/// Decide whether `digest` may run under `policy`, from the signatures in
/// `store`. `claimed` are the signers the client says it checked: only
/// those the agent finds valid are recorded.
pub fn decide(
    store: &Store,
    policy: Option<&TrustPolicy>,
    digest: &Digest,
    claimed: &[String],
) -> Result<Verdict, kiln_store::sign::SignError> {
    let found: Vec<(String, bool)> = kiln_store::sign::signatures(store, digest)?
        .into_iter()
        .map(|f| (f.signer, f.valid))
        .collect();
    Ok(judge(
        policy.map(|p| (p.require_signed, p.allowed.as_slice())),
        &found,
        claimed,
    ))
}

/// [`decide`] on what was found: `(signer, valid)` pairs.
fn judge(
    policy: Option<(bool, &[String])>,
    found: &[(String, bool)],
    claimed: &[String],
) -> Verdict {
    let allowed = policy.map(|(_, a)| a).unwrap_or_default();
    let verified: Vec<String> = found
        .iter()
        .filter(|(s, valid)| *valid && (allowed.contains(s) || claimed.contains(s)))
        .map(|(s, _)| s.clone())
        .collect();
    match policy {
        Some((true, allowed)) => match kiln_core::spec::trusted_signers(allowed, found) {
            Ok(_) => Verdict::Allowed(verified),
            Err(why) => Verdict::Refused(why),
        },
        _ => Verdict::Allowed(verified),
    }
}

/// Whether `image_name` (as a release records it) names `digest` in
/// `store`: a store reference that resolves to it, or a registry reference
/// whose image the store keeps under that name (and whose digest, when it
/// pins one, is this one).
pub fn names_digest(store: &Store, image_name: &str, digest: &Digest) -> bool {
    let Ok(images) = store.images() else {
        return false;
    };
    let of_digest: Vec<_> = images.iter().filter(|r| &r.digest == digest).collect();
    if RegistryRef::looks_like(image_name) {
        let Ok(r) = RegistryRef::parse(image_name) else {
            return false;
        };
        if let Some(Target::Digest(d)) = &r.target
            && d != digest
        {
            return false;
        }
        let name = r.image_name();
        return of_digest.iter().any(|rec| rec.name == name);
    }
    match ImageRef::parse(image_name) {
        Ok(ImageRef::Bare(word)) => of_digest.iter().any(|rec| rec.name.as_str() == word),
        Ok(ImageRef::Tagged(name, tag)) => of_digest
            .iter()
            .any(|rec| rec.name == name && rec.tags.contains(&tag)),
        Ok(ImageRef::Pinned(name, d)) => &d == digest && of_digest.iter().any(|r| r.name == name),
        Ok(ImageRef::DigestPrefix(p)) => digest.hex().starts_with(p.trim_start_matches("sha256:")),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str, valid: bool) -> (String, bool) {
        (s.to_owned(), valid)
    }

    #[test]
    fn without_a_policy_only_valid_claimed_signers_are_recorded() {
        let found = [f("A", true), f("B", false)];
        assert_eq!(judge(None, &found, &[]), Verdict::Allowed(vec![]));
        let claimed = ["A".to_owned(), "B".to_owned(), "C".to_owned()];
        assert_eq!(
            judge(None, &found, &claimed),
            Verdict::Allowed(vec!["A".into()]),
            "B is invalid and C signed nothing: a client's claim records neither"
        );
    }

    #[test]
    fn a_required_signature_must_be_valid_and_allowed_by_the_agent() {
        let allowed = ["A".to_owned()];
        let policy = Some((true, &allowed[..]));
        assert_eq!(
            judge(policy, &[f("A", true)], &[]),
            Verdict::Allowed(vec!["A".into()])
        );
        assert!(matches!(judge(policy, &[], &[]), Verdict::Refused(w) if w == "no signature"));
        assert!(matches!(
            judge(policy, &[f("A", false)], &["A".into()]),
            Verdict::Refused(w) if w.contains("A (invalid)")
        ));
        // A signer the client trusts but the agent does not is not enough.
        assert!(matches!(
            judge(policy, &[f("Z", true)], &["Z".into()]),
            Verdict::Refused(w) if w.contains("Z (not an allowed signer)")
        ));
        // A policy that does not require signatures still records them.
        let lax = Some((false, &allowed[..]));
        assert_eq!(
            judge(lax, &[f("A", true)], &[]),
            Verdict::Allowed(vec!["A".into()])
        );
        assert_eq!(judge(lax, &[], &[]), Verdict::Allowed(vec![]));
    }
}
