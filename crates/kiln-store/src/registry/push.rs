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
    let content_type = media_type
        .parse()
        .map_err(|_| RegistryError::Destination(format!("bad media type {media_type}")))?;
    let by_digest = reference(&dest.at(Target::Digest(manifest.digest.clone())));
    registry
        .client
        .push_manifest_raw(&by_digest, bytes.clone(), content_type)
        .await
        .map_err(err)?;
    let content_type = media_type
        .parse()
        .map_err(|_| RegistryError::Destination(format!("bad media type {media_type}")))?;
    registry
        .client
        .push_manifest_raw(&tagged, bytes, content_type)
        .await
        .map_err(err)?;
    super::KnownBlobs::remember(
        store,
        &dest.host,
        &dest.repository,
        blobs.iter().map(|b| &b.digest),
    );
    Ok(PushReport {
        destination: dest.to_string(),
        digest: manifest.digest.clone(),
        uploaded: uploaded.len(),
        uploaded_bytes: uploaded.iter().sum(),
        mounted,
        skipped: results.len() - uploaded.len() - mounted,
    })
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
