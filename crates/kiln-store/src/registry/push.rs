//! `kiln push REF DEST`: the store's image to a registry, blobs first
//! (each checked, uploaded only if the registry lacks it, streamed from its
//! file, several at once), then the store's exact manifest bytes by digest,
//! then the tag.

use futures_util::{StreamExt, TryStreamExt};
use kiln_core::Digest;
use kiln_core::oci::{Descriptor, MEDIA_TYPE_MANIFEST};
use kiln_core::registry::{RegistryRef, Target};
use oci_client::RegistryOperation;
use serde::Serialize;

use super::{PARALLEL, Registry, RegistryError, reference};
use crate::store::Store;

/// What a push did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PushReport {
    /// Where it went, with its tag.
    pub destination: String,
    /// The manifest's digest: the one the store has.
    pub digest: Digest,
    /// Blobs uploaded, and their bytes.
    pub uploaded: usize,
    pub uploaded_bytes: u64,
    /// Blobs mounted from another repository of the registry (no upload).
    pub mounted: usize,
    /// Blobs the registry had already.
    pub skipped: usize,
    /// Referrers pushed with it (signatures, attestations).
    pub referrers: usize,
}

/// What became of one blob.
enum Sent {
    There,
    Mounted,
    Uploaded(u64),
}

/// Push image `manifest` (its descriptor, from the store) to `dest`.
/// `progress` hears of each blob as it is done.
pub async fn push(
    store: &Store,
    registry: &Registry,
    manifest: &Descriptor,
    dest: &RegistryRef,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<PushReport, RegistryError> {
    let Some(Target::Tag(_)) = &dest.target else {
        return Err(RegistryError::Destination(format!(
            "{dest}: a push destination names a tag (HOST/REPO:TAG)"
        )));
    };
    let tagged = reference(dest);
    let err = |e| registry.error(dest, e);
    registry
        .client
        .auth(&tagged, &registry.auth, RegistryOperation::Push)
        .await
        .map_err(err)?;
    let bytes = store.read_blob(&manifest.digest)?;
    let parsed = store.manifest(&manifest.digest)?;
    let mut blobs: Vec<Descriptor> = vec![parsed.config.clone()];
    blobs.extend(parsed.layers.iter().cloned());
    // Every blob is in the store before anything is sent.
    for b in &blobs {
        if !store.has_blob(&b.digest) {
            return Err(crate::store::StoreError::MissingBlob(b.digest.clone()).into());
        }
    }
    let known = super::KnownBlobs::load(store);
    let results: Vec<Sent> = futures_util::stream::iter(blobs.iter())
        .map(|b| push_blob(store, registry, dest, b, &known, progress))
        .buffer_unordered(PARALLEL)
        .try_collect()
        .await?;
    let uploaded: Vec<u64> = results
        .iter()
        .filter_map(|s| match s {
            Sent::Uploaded(n) => Some(*n),
            _ => None,
        })
        .collect();
    let mounted = results
        .iter()
        .filter(|s| matches!(s, Sent::Mounted))
        .count();
    // By digest first, then the tag: a tag never names a manifest the
    // registry does not have whole.
    let media_type = parsed
        .media_type
        .clone()
        .unwrap_or_else(|| MEDIA_TYPE_MANIFEST.to_owned());
    let content_type = content_type(&media_type)?;
    // Nothing to send when the tag names this manifest already (a repeated
    // push); a registry that cannot say costs the two PUTs.
    let there = uploaded.is_empty()
        && registry
            .client
            .fetch_manifest_digest(&tagged, &registry.auth)
            .await
            .is_ok_and(|d| d == manifest.digest.to_string());
    if !there {
        let by_digest = reference(&dest.at(Target::Digest(manifest.digest.clone())));
        registry
            .client
            .push_manifest_raw(&by_digest, bytes.clone(), content_type.clone())
            .await
            .map_err(err)?;
        registry
            .client
            .push_manifest_raw(&tagged, bytes, content_type)
            .await
            .map_err(err)?;
    }
    super::KnownBlobs::remember(
        store,
        &dest.host,
        &dest.repository,
        blobs.iter().map(|b| &b.digest),
    );
    let referrers =
        push_referrers(store, registry, dest, &manifest.digest, &known, progress).await?;
    Ok(PushReport {
        destination: dest.to_string(),
        digest: manifest.digest.clone(),
        uploaded: uploaded.len(),
        uploaded_bytes: uploaded.iter().sum(),
        mounted,
        skipped: results.len() - uploaded.len() - mounted,
        referrers,
    })
}

/// The image's referrers: each one's blobs and manifest (by digest; a
/// registry with the referrers API indexes it by its `subject`), then the
/// referrers tag (`sha256-HEX`, the distribution spec's fallback, which
/// registries without the API, like distribution 2.8, need) listing them
/// with what was there.
async fn push_referrers(
    store: &Store,
    registry: &Registry,
    dest: &RegistryRef,
    subject: &kiln_core::Digest,
    known: &super::KnownBlobs,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<usize, RegistryError> {
    let referrers = store.referrers(subject)?;
    if referrers.is_empty() {
        return Ok(0);
    }
    let err = |e| registry.error(dest, e);
    let mut listed = Vec::new();
    for (r, kind) in &referrers {
        let m = store.manifest(&r.digest)?;
        let mut blobs = vec![m.config.clone()];
        blobs.extend(m.layers.iter().cloned());
        for b in &blobs {
            push_blob(store, registry, dest, b, known, progress).await?;
        }
        let bytes = store.read_blob(&r.digest)?;
        let content_type = content_type(&r.media_type)?;
        registry
            .client
            .push_manifest_raw(
                &reference(&dest.at(Target::Digest(r.digest.clone()))),
                bytes,
                content_type,
            )
            .await
            .map_err(err)?;
        progress(&format!(
            "referrer {} ({})",
            r.digest.short(),
            kind.as_deref().unwrap_or("?")
        ));
        listed.push(serde_json::json!({
            "mediaType": r.media_type,
            "digest": r.digest,
            "size": r.size,
            "artifactType": kind,
        }));
    }
    // The fallback tag: what it lists already, and these.
    let at_subject = reference(&dest.at(Target::Digest(subject.clone())));
    let existing = registry
        .client
        .pull_referrers(&at_subject, None)
        .await
        .map_err(err)?;
    for e in existing.manifests {
        if !listed.iter().any(|l| l["digest"] == e.digest.as_str()) {
            listed.push(serde_json::json!({
                "mediaType": e.media_type,
                "digest": e.digest,
                "size": e.size,
                "artifactType": e.artifact_type,
            }));
        }
    }
    // No `"artifactType": null`: absent is what the spec knows.
    for l in &mut listed {
        if let Some(o) = l.as_object_mut() {
            o.retain(|_, v| !v.is_null());
        }
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": kiln_core::oci::MEDIA_TYPE_INDEX,
        "manifests": listed,
    });
    let tag = kiln_core::reference::Tag::try_from(format!("sha256-{}", subject.hex()).as_str())
        .map_err(|e| RegistryError::Destination(e.to_string()))?;
    let content_type = content_type(kiln_core::oci::MEDIA_TYPE_INDEX)?;
    registry
        .client
        .push_manifest_raw(
            &reference(&dest.at(Target::Tag(tag))),
            serde_json::to_vec(&index).unwrap_or_default(),
            content_type,
        )
        .await
        .map_err(err)?;
    Ok(referrers.len())
}

/// One blob: there already, mounted from another repository of the same
/// registry that has it, or uploaded (its size).
async fn push_blob(
    store: &Store,
    registry: &Registry,
    dest: &RegistryRef,
    blob: &Descriptor,
    known: &super::KnownBlobs,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Sent, RegistryError> {
    let image = reference(dest);
    let digest = blob.digest.to_string();
    let err = |e| registry.error(dest, e);
    if registry
        .client
        .blob_exists(&image, &digest)
        .await
        .map_err(err)?
    {
        progress(&format!("{} already there", blob.digest.short()));
        return Ok(Sent::There);
    }
    if let Some(from) = known
        .repository(&dest.host, &blob.digest)
        .filter(|r| *r != dest.repository)
    {
        let source = reference(&RegistryRef {
            host: dest.host.clone(),
            repository: from.to_owned(),
            target: None,
        });
        // A registry that does not mount answers with an upload session
        // (an error here): the blob is uploaded instead.
        if registry
            .client
            .mount_blob(&image, &source, &digest)
            .await
            .is_ok()
        {
            progress(&format!("{} mounted from {from}", blob.digest.short()));
            return Ok(Sent::Mounted);
        }
    }
    let path = store.blob_path(&blob.digest);
    let file =
        tokio::fs::File::open(&path)
            .await
            .map_err(|source| crate::store::StoreError::Io {
                path: path.clone(),
                source,
            })?;
    let size = file
        .metadata()
        .await
        .map_err(|source| crate::store::StoreError::Io {
            path: path.clone(),
            source,
        })?
        .len();
    // 1 MiB reads: memory stays bounded whatever the blob's size.
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20)
        .map_err(oci_client::errors::OciDistributionError::IoError);
    registry
        .client
        .push_blob_stream(&image, stream, &digest, Some(size))
        .await
        .map_err(err)?;
    progress(&format!("{} uploaded ({size} bytes)", blob.digest.short()));
    Ok(Sent::Uploaded(size))
}

/// A media type as a `Content-Type` header value.
fn content_type(media_type: &str) -> Result<http::HeaderValue, RegistryError> {
    media_type
        .parse()
        .map_err(|_| RegistryError::Destination(format!("bad media type {media_type}")))
}
