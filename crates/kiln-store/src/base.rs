//! The base an image is baked on (`[images.NAME] base = "REF"`,
//! [`kiln_core::base::BaseRef`]): its manifest, config and layers, read
//! from the store, or taken in from an OCI image layout or a `docker save`
//! archive — every blob checked against its digest as it is read (and a
//! docker archive's layers against the config's `diff_ids`). A layout or
//! an archive is hostile input like any registry answer: nothing of it is
//! kept unless the bake on it is published, and then only its verified
//! blobs.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use kiln_core::Digest;
use kiln_core::oci::{
    self, ANNOTATION_REF_NAME, Descriptor, ImageConfig, LayerCompression, Manifest,
};

use crate::store::{PendingBlob, Store, StoreError, hash_reader};

/// The largest manifest, index or config taken in (they are read whole).
const MAX_DOCUMENT: u64 = 4 << 20;
/// What a docker archive may hold in memory at once (its small files).
const MAX_IN_MEMORY: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error("base {base}: {message}")]
    Invalid { base: String, message: String },
    #[error("base {base}: {path}: {source}", path = .path.display())]
    Io {
        base: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("base {base}: blob {digest} does not match its digest (its content is {actual})")]
    Corrupt {
        base: String,
        digest: Digest,
        actual: Digest,
    },
    #[error("base {base}: {source}")]
    Store { base: String, source: StoreError },
}

pub type Result<T, E = BaseError> = std::result::Result<T, E>;

/// A base, read and verified.
pub struct Base {
    /// As the spec names it.
    pub name: String,
    /// Its manifest's digest: what pins it.
    pub digest: Digest,
    pub manifest: Manifest,
    pub config: ImageConfig,
    /// Its blobs the store does not have yet: committed with the image
    /// baked on it, dropped (deleted) otherwise.
    pub pending: Vec<PendingBlob>,
}

impl Base {
    /// The image `digest` of the store.
    pub fn from_store(store: &Store, name: &str, digest: &Digest) -> Result<Self> {
        let st = |source| BaseError::Store {
            base: name.to_owned(),
            source,
        };
        let manifest = store.manifest(digest).map_err(st)?;
        let config = store.config(&manifest).map_err(st)?;
        for layer in &manifest.layers {
            if !store.has_blob(&layer.digest) {
                return Err(st(StoreError::MissingBlob(layer.digest.clone())));
            }
        }
        Self::checked(name, digest.clone(), manifest, config, Vec::new())
    }

    /// The image of an OCI image layout at `dir` tagged `tag` there (its
    /// only image when `tag` is `None`); an index is narrowed to this
    /// host's platform.
    pub fn from_oci_layout(
        store: &Store,
        name: &str,
        dir: &Path,
        tag: Option<&str>,
    ) -> Result<Self> {
        let invalid = |message: String| BaseError::Invalid {
            base: name.to_owned(),
            message,
        };
        if !dir.join("oci-layout").is_file() {
            return Err(invalid(format!(
                "{} is not an OCI image layout (it has no oci-layout file)",
                dir.display()
            )));
        }
        let index_path = dir.join("index.json");
        let index: serde_json::Value = serde_json::from_slice(&read_small(name, &index_path)?)
            .map_err(|e| invalid(format!("index.json: {e}")))?;
        let entries = index["manifests"].as_array().cloned().unwrap_or_default();
        let chosen: Vec<&serde_json::Value> = entries
            .iter()
            .filter(|m| {
                tag.is_none_or(|t| {
                    m.pointer(&format!(
                        "/annotations/{}",
                        ANNOTATION_REF_NAME.replace('/', "~1")
                    ))
                    .and_then(|v| v.as_str())
                        == Some(t)
                })
            })
            .collect();
        let entry = match (chosen.as_slice(), tag) {
            ([one], _) => *one,
            ([], Some(t)) => {
                return Err(invalid(format!(
                    "no image tagged `{t}` in {}",
                    dir.display()
                )));
            }
            (many, _) => {
                return Err(invalid(format!(
                    "{} holds {} images: name one, oci:DIR:TAG",
                    dir.display(),
                    many.len()
                )));
            }
        };
        let mut pending = Vec::new();
        let mut desc: Descriptor = serde_json::from_value(entry.clone())
            .map_err(|e| invalid(format!("index.json: {e}")))?;
        if desc.media_type == oci::MEDIA_TYPE_INDEX {
            let bytes = read_blob(name, dir, &desc.digest)?;
            let nested: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| invalid(format!("index {}: {e}", desc.digest)))?;
            let (os, arch) = crate::registry::host_platform();
            let m = nested["manifests"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| {
                    m.pointer("/platform/os").and_then(|v| v.as_str()) == Some(os)
                        && m.pointer("/platform/architecture").and_then(|v| v.as_str())
                            == Some(arch)
                })
                .ok_or_else(|| invalid(format!("its index has no image for {os}/{arch}")))?;
            desc = serde_json::from_value(m.clone())
                .map_err(|e| invalid(format!("index {}: {e}", desc.digest)))?;
        }
        let manifest_bytes = read_blob(name, dir, &desc.digest)?;
        let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| invalid(format!("manifest {}: {e}", desc.digest)))?;
        let config_bytes = read_blob(name, dir, &manifest.config.digest)?;
        let config: ImageConfig = serde_json::from_slice(&config_bytes)
            .map_err(|e| invalid(format!("config {}: {e}", manifest.config.digest)))?;
        for layer in &manifest.layers {
            if !store.has_blob(&layer.digest) {
                pending.push(copy_blob(store, name, dir, &layer.digest)?);
            }
        }
        let stage = |bytes: &[u8]| {
            store.stage_blob(bytes).map_err(|source| BaseError::Store {
                base: name.to_owned(),
                source,
            })
        };
        pending.push(stage(&manifest_bytes)?);
        pending.push(stage(&config_bytes)?);
        Self::checked(name, desc.digest, manifest, config, pending)
    }

    /// The image of a `docker save` archive (of one image). Its layers are
    /// taken as they are (uncompressed tars, or compressed as their first
    /// bytes say), each checked against the config's `diff_ids`; the
    /// manifest is made for them, so the same archive is the same base.
    pub fn from_docker_archive(store: &Store, name: &str, file: &Path) -> Result<Self> {
        let invalid = |message: String| BaseError::Invalid {
            base: name.to_owned(),
            message,
        };
        let io_err = |source| BaseError::Io {
            base: name.to_owned(),
            path: file.to_owned(),
            source,
        };
        let st = |source| BaseError::Store {
            base: name.to_owned(),
            source,
        };
        // One pass over the tar: small files kept, large ones spooled into
        // the store's temporary blobs (hashed as they go).
        let mut small: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut large: BTreeMap<String, PendingBlob> = BTreeMap::new();
        let mut held = 0u64;
        let mut archive = tar::Archive::new(File::open(file).map_err(io_err)?);
        for entry in archive.entries().map_err(io_err)? {
            let mut entry = entry.map_err(io_err)?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let path = entry.path().map_err(io_err)?.to_string_lossy().into_owned();
            let path = path.trim_start_matches("./").to_owned();
            let size = entry.header().size().map_err(io_err)?;
            if size <= MAX_DOCUMENT {
                held += size;
                if held > MAX_IN_MEMORY {
                    return Err(invalid("too many small files".to_owned()));
                }
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).map_err(io_err)?;
                small.insert(path, bytes);
            } else {
                let mut w = store.blob_writer().map_err(st)?;
                io::copy(&mut entry, &mut w).map_err(io_err)?;
                large.insert(path, w.finish().map_err(st)?);
            }
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Entry {
            config: String,
            layers: Vec<String>,
        }
        let entries: Vec<Entry> = serde_json::from_slice(
            small
                .get("manifest.json")
                .ok_or_else(|| invalid(format!("{} has no manifest.json", file.display())))?,
        )
        .map_err(|e| invalid(format!("manifest.json: {e}")))?;
        let [entry] = entries.as_slice() else {
            return Err(invalid(format!(
                "{} holds {} images: kiln takes an archive of one",
                file.display(),
                entries.len()
            )));
        };
        let config_bytes = small
            .get(entry.config.as_str())
            .ok_or_else(|| invalid(format!("its config {} is missing", entry.config)))?
            .clone();
        let config: ImageConfig = serde_json::from_slice(&config_bytes)
            .map_err(|e| invalid(format!("config {}: {e}", entry.config)))?;
        if entry.layers.len() != config.rootfs.diff_ids.len() {
            return Err(invalid(format!(
                "{} layers for {} diff_ids in its config",
                entry.layers.len(),
                config.rootfs.diff_ids.len()
            )));
        }
        let mut pending = Vec::new();
        let mut layers = Vec::new();
        for (path, diff_id) in entry.layers.iter().zip(&config.rootfs.diff_ids) {
            let blob = match (small.remove(path.as_str()), large.remove(path.as_str())) {
                (Some(bytes), _) => store.stage_blob(&bytes).map_err(st)?,
                (None, Some(blob)) => blob,
                (None, None) => return Err(invalid(format!("its layer {path} is missing"))),
            };
            let (media_type, compression) = sniff(&store_tmp_reader(&blob)?)?;
            // What the layer unpacks to must be what the config says.
            let reader = store_tmp_reader(&blob)?;
            let mut plain = crate::unpack::decompress(compression, reader).map_err(io_err)?;
            let (actual, _) = hash_reader(&mut plain).map_err(io_err)?;
            if &actual != diff_id {
                return Err(BaseError::Corrupt {
                    base: name.to_owned(),
                    digest: diff_id.clone(),
                    actual,
                });
            }
            layers.push(Descriptor::new(media_type, blob.digest.clone(), blob.size));
            pending.push(blob);
        }
        let config_blob = store.stage_blob(&config_bytes).map_err(st)?;
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(oci::MEDIA_TYPE_MANIFEST.to_owned()),
            config: Descriptor::new(
                oci::MEDIA_TYPE_CONFIG,
                config_blob.digest.clone(),
                config_blob.size,
            ),
            layers,
            annotations: BTreeMap::new(),
        };
        let manifest_blob = store
            .stage_blob(&serde_json::to_vec(&manifest).unwrap_or_default())
            .map_err(st)?;
        let digest = manifest_blob.digest.clone();
        pending.push(config_blob);
        pending.push(manifest_blob);
        Self::checked(name, digest, manifest, config, pending)
    }

    /// A base kiln can bake on: as many layers as `diff_ids`, each of a
    /// kind the unpacker takes, made for this host.
    fn checked(
        name: &str,
        digest: Digest,
        manifest: Manifest,
        config: ImageConfig,
        pending: Vec<PendingBlob>,
    ) -> Result<Self> {
        let invalid = |message: String| BaseError::Invalid {
            base: name.to_owned(),
            message,
        };
        if manifest.layers.len() != config.rootfs.diff_ids.len() {
            return Err(invalid(format!(
                "{} layers for {} diff_ids in its config",
                manifest.layers.len(),
                config.rootfs.diff_ids.len()
            )));
        }
        if let Some(l) = manifest
            .layers
            .iter()
            .find(|l| LayerCompression::from_media_type(&l.media_type).is_none())
        {
            return Err(invalid(format!(
                "layer {} has media type `{}`, which kiln cannot unpack",
                l.digest, l.media_type
            )));
        }
        let (os, arch) = crate::registry::host_platform();
        if config.os != os || config.architecture != arch {
            return Err(invalid(format!(
                "it is made for {}/{}, this host is {os}/{arch}",
                config.os, config.architecture
            )));
        }
        Ok(Self {
            name: name.to_owned(),
            digest,
            manifest,
            config,
            pending,
        })
    }
}

/// Whether image `digest` has a userland of its own: it was baked on a
/// base, or it carries its own `/usr`. Such an image gets nothing of the
/// host's bound in (`sandbox`); another borrows the host's `/usr` and
/// loader paths, and what it runs changes when the host's packages do.
/// The layers are read only when the manifest does not say (their tar
/// headers, up to the first entry under `usr/`).
pub fn is_self_contained(store: &Store, digest: &Digest) -> Result<bool, StoreError> {
    let manifest = store.manifest(digest)?;
    if manifest
        .annotations
        .contains_key(oci::ANNOTATION_BASE_DIGEST)
    {
        return Ok(true);
    }
    for layer in &manifest.layers {
        let Some(compression) = LayerCompression::from_media_type(&layer.media_type) else {
            continue;
        };
        let blob = io::BufReader::new(store.open_blob(&layer.digest)?);
        let at = |source| StoreError::Io {
            path: store.blob_path(&layer.digest),
            source,
        };
        let reader = crate::unpack::decompress(compression, blob).map_err(at)?;
        let mut archive = tar::Archive::new(reader);
        for entry in archive.entries().map_err(at)? {
            let entry = entry.map_err(at)?;
            let path = entry.path().map_err(at)?;
            let path = path.to_string_lossy();
            let path = path.trim_start_matches("./").trim_start_matches('/');
            if path == "usr" || path.starts_with("usr/") {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// A layer's media type and compression, from its first bytes.
fn sniff(r: &File) -> Result<(&'static str, LayerCompression), BaseError> {
    let mut head = [0u8; 4];
    let mut r = r;
    let n = r.read(&mut head).unwrap_or(0);
    Ok(match &head[..n] {
        [0x1f, 0x8b, ..] => (oci::MEDIA_TYPE_LAYER_GZIP, LayerCompression::Gzip),
        [0x28, 0xb5, 0x2f, 0xfd] => (oci::MEDIA_TYPE_LAYER_ZSTD, LayerCompression::Zstd),
        _ => (oci::MEDIA_TYPE_LAYER_TAR, LayerCompression::None),
    })
}

/// A staged blob's bytes, from its start.
fn store_tmp_reader(blob: &PendingBlob) -> Result<File, BaseError> {
    blob.reopen().map_err(|source| BaseError::Io {
        base: String::new(),
        path: PathBuf::from("(staged blob)"),
        source,
    })
}

/// A whole file of at most [`MAX_DOCUMENT`] bytes.
fn read_small(name: &str, path: &Path) -> Result<Vec<u8>> {
    let io_err = |source| BaseError::Io {
        base: name.to_owned(),
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    File::open(path)
        .map_err(io_err)?
        .take(MAX_DOCUMENT + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > MAX_DOCUMENT {
        return Err(BaseError::Invalid {
            base: name.to_owned(),
            message: format!("{} is larger than {MAX_DOCUMENT} bytes", path.display()),
        });
    }
    Ok(bytes)
}

/// Blob `digest` of the layout at `dir`, whole, checked.
fn read_blob(name: &str, dir: &Path, digest: &Digest) -> Result<Vec<u8>> {
    let bytes = read_small(name, &dir.join("blobs/sha256").join(digest.hex()))?;
    let actual = Digest::of(&bytes);
    if &actual != digest {
        return Err(BaseError::Corrupt {
            base: name.to_owned(),
            digest: digest.clone(),
            actual,
        });
    }
    Ok(bytes)
}

/// Blob `digest` of the layout at `dir`, streamed into the store's
/// temporary blobs, checked.
fn copy_blob(store: &Store, name: &str, dir: &Path, digest: &Digest) -> Result<PendingBlob> {
    let path = dir.join("blobs/sha256").join(digest.hex());
    let io_err = |source| BaseError::Io {
        base: name.to_owned(),
        path: path.clone(),
        source,
    };
    let st = |source| BaseError::Store {
        base: name.to_owned(),
        source,
    };
    let mut from = File::open(&path).map_err(io_err)?;
    let mut w = store.blob_writer().map_err(st)?;
    io::copy(&mut from, &mut w).map_err(io_err)?;
    w.flush().map_err(io_err)?;
    let blob = w.finish().map_err(st)?;
    if &blob.digest != digest {
        return Err(BaseError::Corrupt {
            base: name.to_owned(),
            digest: digest.clone(),
            actual: blob.digest.clone(),
        });
    }
    Ok(blob)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn a_layers_kind_is_read_from_its_first_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let kind = |bytes: &[u8]| {
            let p = dir.path().join("x");
            fs::write(&p, bytes).unwrap();
            sniff(&File::open(&p).unwrap()).unwrap().0
        };
        assert_eq!(kind(&[0x1f, 0x8b, 8, 0]), oci::MEDIA_TYPE_LAYER_GZIP);
        assert_eq!(kind(&[0x28, 0xb5, 0x2f, 0xfd]), oci::MEDIA_TYPE_LAYER_ZSTD);
        assert_eq!(kind(b"bin/"), oci::MEDIA_TYPE_LAYER_TAR);
        assert_eq!(kind(b""), oci::MEDIA_TYPE_LAYER_TAR);
    }
}
