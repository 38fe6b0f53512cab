//! `kiln pull SRC`: a registry's image into the store. The tag is resolved
//! to a digest once; an index is narrowed to this host's platform; each
//! blob the store lacks streams into `tmp/`, its digest and size checked as
//! it comes; the image becomes visible only once every part of it is.

use std::io::Write;

use futures_util::{StreamExt, TryStreamExt};
use kiln_core::Digest;
use kiln_core::oci::{Descriptor, MEDIA_TYPE_INDEX, MEDIA_TYPE_MANIFEST, Manifest};
use kiln_core::reference::Tag;
use kiln_core::registry::{RegistryRef, Target};
use serde::Serialize;

use super::{MAX_MANIFEST, PARALLEL, Registry, RegistryError, read};
use crate::store::{PendingBlob, Store, StoreError};

pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_TYPE_DOCKER_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";

/// What a pull did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PullReport {
    pub source: String,
    /// What the reference resolved to (an index's digest, for a
    /// multi-platform image).
    pub resolved: Digest,
    /// The image manifest kept: `resolved`, or the index's entry for this
    /// platform.
    pub digest: Digest,
    /// `NAME:TAG` in the store (the tag only when it was free).
    pub name: String,
    pub tags: Vec<String>,
    pub downloaded: usize,
    pub downloaded_bytes: u64,
    /// Blobs the store had already.
    pub skipped: usize,
    /// Referrers pulled with it (signatures, attestations).
    pub referrers: usize,
}

/// This host's platform as OCI names it.
pub fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    ("linux", arch)
}

/// How long a whole pull may take by default: every answer of the
/// registry, however slowly it trickles, ends by then.
pub const PULL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// Pull `src` into `store` within `deadline` (the image, its blobs and its
/// referrers; nothing is kept of a pull that does not finish).
pub async fn pull_within(
    store: &Store,
    registry: &Registry,
    src: &RegistryRef,
    progress: &(dyn Fn(&str) + Sync),
    deadline: std::time::Duration,
) -> Result<PullReport, RegistryError> {
    tokio::time::timeout(deadline, pull(store, registry, src, progress))
        .await
        .unwrap_or_else(|_| {
            Err(RegistryError::Deadline {
                reference: src.to_string(),
                after: deadline,
            })
        })
}

pub async fn pull(
    store: &Store,
    registry: &Registry,
    src: &RegistryRef,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<PullReport, RegistryError> {
    let (bytes, resolved) = manifest(registry, src, src.target.clone()).await?;
    let media = media_type(&bytes, src)?;
    let (bytes, digest) = if media == MEDIA_TYPE_INDEX || media == MEDIA_TYPE_DOCKER_LIST {
        let index: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| RegistryError::BadManifest {
                reference: src.to_string(),
                detail: e.to_string(),
            })?;
        let (os, arch) = host_platform();
        let entry = index
            .get("manifests")
            .and_then(|m| m.as_array())
            .into_iter()
            .flatten()
            .find(|m| {
                m.pointer("/platform/os").and_then(|v| v.as_str()) == Some(os)
                    && m.pointer("/platform/architecture").and_then(|v| v.as_str()) == Some(arch)
            })
            .and_then(|m| m.get("digest")?.as_str()?.parse::<Digest>().ok())
            .ok_or_else(|| RegistryError::NoPlatform {
                reference: src.to_string(),
                platform: format!("{os}/{arch}"),
            })?;
        let (b, d) = manifest(registry, src, Some(Target::Digest(entry))).await?;
        (b, d)
    } else {
        (bytes, resolved.clone())
    };
    let media = media_type(&bytes, src)?;
    if media != MEDIA_TYPE_MANIFEST && media != MEDIA_TYPE_DOCKER_MANIFEST {
        return Err(RegistryError::BadManifest {
            reference: src.to_string(),
            detail: format!("unsupported media type {media}"),
        });
    }
    let parsed = parse_manifest(&bytes, src.to_string())?;
    let wanted: Vec<Descriptor> = std::iter::once(&parsed.config)
        .chain(&parsed.layers)
        .cloned()
        .collect();
    let mut lease = store.lease()?;
    let (pending, skipped) =
        fetch_blobs(store, registry, src, &wanted, &mut lease, progress).await?;
    let downloaded_bytes = pending.iter().map(|p| p.size).sum();
    let downloaded = pending.len();
    // The manifest last: the image is visible once all of it is kept, in
    // one index update under the store lock.
    let mut blobs = pending;
    let staged = store.stage_blob(&bytes)?;
    blobs.push(staged);
    let name = src.image_name();
    let descriptor = Descriptor::new(&media, digest.clone(), bytes.len() as u64);
    // The registry's tag, unless the store's tag of that name names
    // another image (store tags never move): then only the automatic one.
    let mut tags = Vec::new();
    if let Some(Target::Tag(t)) = &src.target
        && tag_free(store, &name, t, &digest)?
    {
        tags.push(t.clone());
    }
    store.publish_image(&name, blobs, &descriptor, &tags)?;
    super::KnownBlobs::remember(
        store,
        &src.host,
        &src.repository,
        wanted.iter().map(|d| &d.digest),
    );
    let referrers = pull_referrers(store, registry, src, &digest, progress).await?;
    let mut all = vec![Tag::automatic(&digest).to_string()];
    all.extend(tags.iter().map(ToString::to_string));
    Ok(PullReport {
        source: src.to_string(),
        resolved,
        digest,
        name: name.to_string(),
        tags: all,
        downloaded,
        downloaded_bytes,
        skipped,
        referrers,
    })
}

/// The image's referrers (the referrers API, else the `sha256-HEX` tag):
/// each manifest checked against its digest, its blobs checked as they
/// stream, then kept with the image.
async fn pull_referrers(
    store: &Store,
    registry: &Registry,
    src: &RegistryRef,
    subject: &Digest,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<usize, RegistryError> {
    let listed = referrers_index(registry, src, subject).await?;
    let mut n = 0;
    for digest in listed {
        let (bytes, _) = manifest(registry, src, Some(Target::Digest(digest.clone()))).await?;
        // A referrers index is the registry's word: a hostile one lists
        // another image's signature or provenance under this one. Only a
        // manifest whose own `subject` is this image is kept.
        if !refers_to(&bytes, subject) {
            progress(&format!(
                "referrer {} skipped: its subject is not {}",
                digest.short(),
                subject.short()
            ));
            continue;
        }
        let parsed = parse_manifest(&bytes, format!("{src}@{digest}"))?;
        let wanted: Vec<Descriptor> = std::iter::once(&parsed.config)
            .chain(&parsed.layers)
            .cloned()
            .collect();
        let mut lease = store.lease()?;
        let (mut pending, _) =
            fetch_blobs(store, registry, src, &wanted, &mut lease, progress).await?;
        pending.push(store.stage_blob(&bytes)?);
        let media = media_type(&bytes, src)?;
        store.add_referrer(
            pending,
            &Descriptor::new(&media, digest.clone(), bytes.len() as u64),
        )?;
        progress(&format!("referrer {}", digest.short()));
        n += 1;
    }
    Ok(n)
}

/// The digests a registry lists as `subject`'s referrers: its referrers
/// API, else (a registry without it answers 404) the `sha256-HEX` tag of
/// the tag schema, else none. Read with the manifest's cap.
async fn referrers_index(
    registry: &Registry,
    src: &RegistryRef,
    subject: &Digest,
) -> Result<Vec<Digest>, RegistryError> {
    let at = src.at(Target::Digest(subject.clone()));
    let tag = subject.to_string().replace(':', "-");
    for path in [format!("referrers/{subject}"), format!("manifests/{tag}")] {
        match registry.reader.get(&at, &path, &[MEDIA_TYPE_INDEX]).await {
            Ok(resp) => {
                let bytes = registry
                    .reader
                    .body(resp, MAX_MANIFEST, "referrers list")
                    .await?;
                return Ok(listed_digests(&bytes));
            }
            // No referrers API: the tag schema; no tag either: none.
            Err(RegistryError::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(Vec::new())
}

/// The digests of an index's `manifests` (an unreadable index lists none,
/// as the distribution spec says of a referrers tag that is not one).
fn listed_digests(bytes: &[u8]) -> Vec<Digest> {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| {
            Some(
                v.get("manifests")?
                    .as_array()?
                    .iter()
                    .filter_map(|m| m.get("digest")?.as_str()?.parse().ok())
                    .collect(),
            )
        })
        .unwrap_or_default()
}

/// Whether manifest `bytes` names `subject` as its `subject`.
fn refers_to(bytes: &[u8], subject: &Digest) -> bool {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| {
            v.get("subject")?
                .get("digest")?
                .as_str()
                .map(|d| d == subject.to_string())
        })
        .unwrap_or(false)
}

fn parse_manifest(bytes: &[u8], reference: String) -> Result<Manifest, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::BadManifest {
        reference,
        detail: e.to_string(),
    })
}

/// The blobs of `wanted` into `tmp/`, several at once: those the store has
/// are held by `lease` (see `gc`), the others stream in, checked. The
/// pending blobs, and how many the store had.
async fn fetch_blobs(
    store: &Store,
    registry: &Registry,
    src: &RegistryRef,
    wanted: &[Descriptor],
    lease: &mut crate::gc::Lease,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<(Vec<PendingBlob>, usize), RegistryError> {
    let mut missing: Vec<&Descriptor> = Vec::new();
    for d in wanted {
        if !lease.hold(&d.digest)? {
            missing.push(d);
        }
    }
    let skipped = wanted.len() - missing.len();
    let pending = futures_util::stream::iter(missing)
        .map(|d| pull_blob(store, registry, src, d, progress))
        .buffer_unordered(PARALLEL)
        .try_collect()
        .await?;
    Ok((pending, skipped))
}

fn tag_free(
    store: &Store,
    name: &kiln_core::reference::ImageName,
    tag: &Tag,
    digest: &Digest,
) -> Result<bool, StoreError> {
    Ok(!store
        .images()?
        .iter()
        .any(|r| &r.name == name && r.tags.contains(tag) && &r.digest != digest))
}

/// A manifest by `target`: its bytes (at most 4 MiB) and its digest, the
/// bytes checked against the digest asked for (or the one the registry
/// says, for a tag).
async fn manifest(
    registry: &Registry,
    src: &RegistryRef,
    target: Option<Target>,
) -> Result<(Vec<u8>, Digest), RegistryError> {
    let at = match &target {
        Some(t) => src.at(t.clone()),
        None => src.clone(),
    };
    let accepted = [
        MEDIA_TYPE_MANIFEST,
        MEDIA_TYPE_INDEX,
        MEDIA_TYPE_DOCKER_MANIFEST,
        MEDIA_TYPE_DOCKER_LIST,
    ];
    let name = match &at.target {
        Some(Target::Tag(t)) => t.to_string(),
        Some(Target::Digest(d)) => d.to_string(),
        None => "latest".to_owned(),
    };
    let resp = registry
        .reader
        .get(&at, &format!("manifests/{name}"), &accepted)
        .await?;
    let said = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = match read::read_capped(resp, MAX_MANIFEST).await {
        Ok(b) => b,
        Err(read::Capped::Over) => {
            return Err(RegistryError::ManifestTooBig {
                reference: at.to_string(),
            });
        }
        Err(read::Capped::Request(e)) => return Err(super::request_error(&registry.host, &e)),
    };
    let actual = Digest::of(&bytes);
    // A tag: the digest the registry says it has, if it says one.
    let expected = match &target {
        Some(Target::Digest(d)) => d.to_string(),
        _ => said.unwrap_or_else(|| actual.to_string()),
    };
    if actual.to_string() != expected {
        return Err(RegistryError::ManifestDigest {
            reference: at.to_string(),
            expected,
            actual,
        });
    }
    Ok((bytes.to_vec(), actual))
}

/// The `mediaType` a manifest says it is.
fn media_type(bytes: &[u8], src: &RegistryRef) -> Result<String, RegistryError> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| RegistryError::BadManifest {
            reference: src.to_string(),
            detail: e.to_string(),
        })?;
    Ok(v.get("mediaType")
        .and_then(|m| m.as_str())
        // An OCI manifest may leave its media type out.
        .map_or_else(
            || {
                if v.get("manifests").is_some() {
                    MEDIA_TYPE_INDEX.to_owned()
                } else {
                    MEDIA_TYPE_MANIFEST.to_owned()
                }
            },
            str::to_owned,
        ))
}

/// One blob into `tmp/`, checked against its descriptor as it streams.
async fn pull_blob(
    store: &Store,
    registry: &Registry,
    src: &RegistryRef,
    d: &Descriptor,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<PendingBlob, RegistryError> {
    let resp = registry
        .reader
        .get(src, &format!("blobs/{}", d.digest), &[])
        .await?;
    if resp.content_length().is_some_and(|n| n > d.size) {
        return Err(RegistryError::BadSize {
            host: registry.host.clone(),
            digest: d.digest.clone(),
            got: resp.content_length().unwrap_or_default(),
            want: d.size,
        });
    }
    let mut stream = std::pin::pin!(registry.reader.stream(resp));
    let mut w = store.blob_writer()?;
    let tmp = store.root().join("tmp");
    let mut got: u64 = 0;
    let bad_size = |got| RegistryError::BadSize {
        host: registry.host.clone(),
        digest: d.digest.clone(),
        got,
        want: d.size,
    };
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        got += chunk.len() as u64;
        if got > d.size {
            return Err(bad_size(got));
        }
        w.write_all(&chunk).map_err(|source| StoreError::Io {
            path: tmp.clone(),
            source,
        })?;
    }
    let blob = w.finish_unsynced()?;
    if blob.size() != d.size {
        return Err(bad_size(blob.size()));
    }
    if blob.digest() != &d.digest {
        return Err(RegistryError::BadBlob {
            host: registry.host.clone(),
            digest: d.digest.clone(),
            actual: blob.digest().clone(),
        });
    }
    // The fsync runs on a blocking thread: the other blobs, streaming in
    // on this task, do not wait for it.
    let pending = tokio::task::spawn_blocking(move || blob.sync())
        .await
        .map_err(|e| RegistryError::Registry {
            host: registry.host.clone(),
            detail: format!("blob {}: {e}", d.digest),
        })??;
    progress(&format!(
        "{} downloaded ({} bytes)",
        d.digest.short(),
        d.size
    ));
    Ok(pending)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_referrer_counts_only_for_its_own_subject() {
        let a = Digest::of(b"image a");
        let b = Digest::of(b"image b");
        let of = |d: &Digest| {
            format!(
                r#"{{"schemaVersion":2,"config":{{}},"layers":[],"subject":{{"digest":"{d}"}}}}"#
            )
        };
        assert!(refers_to(of(&a).as_bytes(), &a));
        assert!(
            !refers_to(of(&b).as_bytes(), &a),
            "image b's referrer under a"
        );
        assert!(
            !refers_to(br#"{"schemaVersion":2,"config":{},"layers":[]}"#, &a),
            "no subject"
        );
        assert!(!refers_to(br#"{"subject":{"digest":7}}"#, &a));
        assert!(!refers_to(b"not json", &a));
    }
}
