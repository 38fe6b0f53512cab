//! Provenance beside the image, not in it: where a bake came from (git
//! commit, dirty flag, `origin`, kiln's version) as an in-toto Statement
//! with a SLSA v1 provenance predicate, kept as an OCI referrer of the
//! image (so supply-chain tools read it, and it travels with the image).
//!
//! The image's digest depends on its content and config only: two clones
//! of one commit with different remotes, or an untracked file beside the
//! context, bake the same digest; each source adds its own statement.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use kiln_core::Digest;
use kiln_core::oci::Descriptor;
use serde::Serialize;

use crate::store::{Store, StoreError};

/// The `artifactType` of a provenance referrer, and its layer's media type.
pub const ARTIFACT_TYPE: &str = "application/vnd.in-toto+json";
const BUILD_TYPE: &str = "https://kiln.dev/bake/v1";

/// Where a bake's context came from, as git says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Source {
    pub commit: Option<String>,
    pub dirty: Option<bool>,
    pub origin: Option<String>,
}

/// Ask git about the context (nothing when it is not in a work tree).
pub fn source(context: &Path) -> Source {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .arg("-C")
            .arg(context)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let Some(commit) = git(&["rev-parse", "--verify", "HEAD"]) else {
        return Source::default();
    };
    Source {
        dirty: git(&["status", "--porcelain", "--", "."]).map(|s| !s.is_empty()),
        origin: git(&["remote", "get-url", "origin"]).filter(|u| !u.is_empty()),
        commit: Some(commit),
    }
}

/// The in-toto Statement of a bake (no time in it: the same source and
/// kiln make the same statement, kept once).
pub fn statement(
    image: &str,
    digest: &Digest,
    source: &Source,
    base: Option<(&str, &Digest)>,
    kiln_version: &str,
) -> serde_json::Value {
    let mut deps = Vec::new();
    if let Some(commit) = &source.commit {
        let mut annotations = BTreeMap::new();
        if let Some(d) = source.dirty {
            annotations.insert("dirty", d.to_string());
        }
        deps.push(serde_json::json!({
            "uri": source.origin.as_deref().map(|o| format!("git+{o}")).unwrap_or_else(|| "git".into()),
            "digest": { "gitCommit": commit },
            "annotations": annotations,
        }));
    }
    if let Some((name, digest)) = base {
        deps.push(serde_json::json!({
            "uri": name,
            "digest": { "sha256": digest.hex() },
            "annotations": { "role": "base" },
        }));
    }
    serde_json::json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{ "name": image, "digest": { "sha256": digest.hex() } }],
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": { "image": image },
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": { "id": format!("https://kiln.dev/kiln@{kiln_version}") },
            },
        },
    })
}

/// Keep `statement` as a referrer of `manifest` (a no-op when the same
/// statement is there already).
pub fn attach(
    store: &Store,
    manifest: &Descriptor,
    statement: &serde_json::Value,
) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(statement).unwrap_or_default();
    // Marked as this store's own: a statement that arrived any other way
    // (pushed by a deployer, pulled from a registry) is shown unverified.
    store.add_artifact_made(manifest, ARTIFACT_TYPE, &bytes, &BTreeMap::new(), true)?;
    Ok(())
}

/// What a kept statement says, read back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Provenance {
    pub commit: Option<String>,
    pub dirty: Option<bool>,
    pub source: Option<String>,
    pub builder: Option<String>,
    /// The base it was baked on, `REF@sha256:…`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// The statement's subject is this image (it is about what it says).
    pub subject_matches: bool,
    /// A bake of this store made it (and it is about this image): what
    /// counts as provenance. Anything else (pushed by a deployer, pulled
    /// from a registry) is what someone claims.
    pub verified: bool,
}

/// Every provenance statement kept for `digest`.
pub fn statements(store: &Store, digest: &Digest) -> Result<Vec<Provenance>, StoreError> {
    let made: std::collections::BTreeSet<Digest> = store
        .referrers(digest)?
        .into_iter()
        .filter(|(d, _)| {
            d.annotations
                .contains_key(kiln_core::oci::ANNOTATION_MADE_HERE)
        })
        .map(|(d, _)| d.digest)
        .collect();
    let mut out = Vec::new();
    for (manifest, payload) in store.artifacts(digest, ARTIFACT_TYPE)? {
        let Some(s) = payload.and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        else {
            continue;
        };
        let deps = s
            .pointer("/predicate/buildDefinition/resolvedDependencies")
            .and_then(|d| d.as_array())
            .cloned()
            .unwrap_or_default();
        let is_base = |d: &&serde_json::Value| {
            d.pointer("/annotations/role").and_then(|r| r.as_str()) == Some("base")
        };
        let dep = deps.iter().find(|d| !is_base(d));
        let base = deps.iter().find(is_base);
        let text = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).map(str::to_owned);
        out.push(Provenance {
            commit: text(dep.and_then(|d| d.pointer("/digest/gitCommit"))),
            dirty: text(dep.and_then(|d| d.pointer("/annotations/dirty"))).map(|d| d == "true"),
            source: text(dep.and_then(|d| d.get("uri")))
                .map(|u| u.trim_start_matches("git+").to_owned())
                .filter(|u| u != "git"),
            builder: text(s.pointer("/predicate/runDetails/builder/id")),
            base: base.and_then(|b| {
                Some(format!(
                    "{}@sha256:{}",
                    b.get("uri")?.as_str()?,
                    b.pointer("/digest/sha256")?.as_str()?
                ))
            }),
            subject_matches: s
                .pointer("/subject/0/digest/sha256")
                .and_then(|v| v.as_str())
                == Some(digest.hex()),
            verified: false,
        });
        if let Some(p) = out.last_mut() {
            p.verified = p.subject_matches && made.contains(&manifest);
        }
    }
    Ok(out)
}
