//! Exporting an image for other tools: an OCI image layout (skopeo, umoci,
//! any registry client) or a `docker save`-style archive (`docker load`).
//! Both are written beside the destination and renamed into place, so a
//! failed export leaves nothing half-written.

use std::fs;
use std::io::{self, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use kiln_core::Digest;
use kiln_core::oci::{
    ANNOTATION_REF_NAME, Descriptor, Index, LayerCompression, MEDIA_TYPE_MANIFEST,
};
use kiln_core::reference::Tag;
use serde::Serialize;

use crate::fsutil::{sync_dir, write_atomic};
use crate::store::{HashingReader, ImageRecord, IoContext, Store, StoreError, hash_reader};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path} exists and is not an OCI image layout; choose an empty or new directory")]
    NotALayout { path: PathBuf },
    #[error("{path} already exists; choose a new file name")]
    FileExists { path: PathBuf },
    #[error("{path} already has tag `{tag}` for another image")]
    TagTaken { path: PathBuf, tag: String },
    #[error(
        "layer {layer} has media type `{media_type}`, which kiln cannot export to a docker archive"
    )]
    MediaType { layer: Digest, media_type: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type Result<T, E = ExportError> = std::result::Result<T, E>;

/// Copy the image into an OCI layout at `dir`, tagged `tag` there (the
/// layout's `org.opencontainers.image.ref.name`, so `skopeo inspect
/// oci:DIR:TAG` finds it). `dir` may be new, empty, or an existing layout.
pub fn export_oci(store: &Store, image: &ImageRecord, dir: &Path, tag: &Tag) -> Result<()> {
    let existing_layout = dir.join("oci-layout").is_file();
    let empty_or_missing = match fs::read_dir(dir) {
        Ok(mut rd) => rd.next().is_none(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(e) => {
            return Err(StoreError::Io {
                path: dir.to_path_buf(),
                source: e,
            }
            .into());
        }
    };
    if !existing_layout && !empty_or_missing {
        return Err(ExportError::NotALayout {
            path: dir.to_path_buf(),
        });
    }
    let manifest = store.manifest(&image.digest)?;
    let mut digests = vec![image.digest.clone(), manifest.config.digest.clone()];
    digests.extend(manifest.layers.iter().map(|l| l.digest.clone()));

    // A new layout is built in a sibling directory and renamed into place.
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).at(parent)?;
    let staging;
    let target = if existing_layout {
        dir.to_path_buf()
    } else {
        staging = tempfile::Builder::new()
            .prefix(".kiln-export-")
            .tempdir_in(parent)
            .at(parent)?;
        staging.path().to_path_buf()
    };
    let blobs = target.join("blobs/sha256");
    fs::create_dir_all(&blobs).at(&blobs)?;
    for d in &digests {
        let dest = blobs.join(d.hex());
        if dest.is_file() {
            continue;
        }
        copy_verified(store, d, &dest)?;
    }
    let mut index = if existing_layout {
        let p = target.join("index.json");
        let bytes = fs::read(&p).at(&p)?;
        serde_json::from_slice(&bytes).map_err(|_| ExportError::NotALayout {
            path: dir.to_path_buf(),
        })?
    } else {
        write_atomic(
            &target.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .at(&target)?;
        Index::empty()
    };
    let same_tag = |d: &Descriptor| {
        d.annotations.get(ANNOTATION_REF_NAME).map(String::as_str) == Some(tag.as_str())
    };
    if let Some(other) = index.manifests.iter().find(|d| same_tag(d)) {
        if other.digest != image.digest {
            return Err(ExportError::TagTaken {
                path: dir.to_path_buf(),
                tag: tag.to_string(),
            });
        }
    } else {
        let mut d = Descriptor::new(
            MEDIA_TYPE_MANIFEST,
            image.digest.clone(),
            image.manifest_size,
        );
        d.annotations
            .insert(ANNOTATION_REF_NAME.to_owned(), tag.to_string());
        index.manifests.push(d);
    }
    let index_path = target.join("index.json");
    write_atomic(
        &index_path,
        &serde_json::to_vec_pretty(&index).unwrap_or_default(),
    )
    .at(&index_path)?;
    if !existing_layout {
        // rename(2) replaces an empty directory, so an empty `dir` is fine.
        let staged = target;
        fs::rename(&staged, dir).at(dir)?;
        sync_dir(parent).at(parent)?;
    }
    Ok(())
}

/// Copy a blob, re-hashing it: a corrupt store must not spread.
fn copy_verified(store: &Store, digest: &Digest, dest: &Path) -> Result<()> {
    let mut src = store.open_blob(digest)?;
    let dir = dest.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .at(dir)?;
    let mut tee = Tee {
        inner: &mut src,
        out: tmp.as_file_mut(),
    };
    let (actual, _) = hash_reader(&mut tee).at(dest)?;
    if &actual != digest {
        return Err(StoreError::CorruptBlob {
            digest: digest.clone(),
            actual,
        }
        .into());
    }
    tmp.as_file().sync_all().at(dest)?;
    tmp.persist(dest).map_err(|e| e.error).at(dest)?;
    Ok(())
}

struct Tee<'a, R, W> {
    inner: &'a mut R,
    out: &'a mut W,
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    repo_tags: Vec<String>,
    layers: Vec<String>,
}

/// Write a `docker save`-style tarball (what `docker load` and
/// `skopeo copy docker-archive:` accept), tagged `repo_tag` (`NAME:TAG`).
pub fn export_docker_archive(
    store: &Store,
    image: &ImageRecord,
    file: &Path,
    repo_tag: &str,
) -> Result<()> {
    if fs::symlink_metadata(file).is_ok() {
        return Err(ExportError::FileExists {
            path: file.to_path_buf(),
        });
    }
    let manifest = store.manifest(&image.digest)?;
    let config = store.config(&manifest)?;
    let config_bytes = store.read_blob(&manifest.config.digest)?;
    let parent = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).at(parent)?;
    let out = tempfile::Builder::new()
        .prefix(".kiln-export-")
        .tempfile_in(parent)
        .at(parent)?;
    let mut tar = tar::Builder::new(BufWriter::new(out));
    tar.mode(tar::HeaderMode::Deterministic);
    let mut layer_names = Vec::new();
    for (layer, diff_id) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
        let compression =
            LayerCompression::from_media_type(&layer.media_type).ok_or_else(|| {
                ExportError::MediaType {
                    layer: layer.digest.clone(),
                    media_type: layer.media_type.clone(),
                }
            })?;
        // Docker archives carry uncompressed layers named by diff_id. The
        // size must be known for the tar header, so spool to a temp file,
        // checking both digests on the way.
        let mut spool = tempfile::tempfile_in(store.root().join("tmp")).at(store.root())?;
        let mut hasher_in = HashingReader::new(store.open_blob(&layer.digest)?);
        {
            let mut reader = crate::unpack::decompress(compression, &mut hasher_in).at(file)?;
            let mut tee = Tee {
                inner: &mut reader,
                out: &mut spool,
            };
            let (actual, _) = hash_reader(&mut tee).at(file)?;
            if &actual != diff_id {
                return Err(StoreError::CorruptBlob {
                    digest: layer.digest.clone(),
                    actual,
                }
                .into());
            }
        }
        io::copy(&mut hasher_in, &mut io::sink()).at(file)?;
        let actual = hasher_in.digest();
        if actual != layer.digest {
            return Err(StoreError::CorruptBlob {
                digest: layer.digest.clone(),
                actual,
            }
            .into());
        }
        spool.rewind().at(file)?;
        let name = format!("{}/layer.tar", diff_id.hex());
        let mut h = header(spool.metadata().at(file)?.len());
        tar.append_data(&mut h, &name, &mut spool).at(file)?;
        layer_names.push(name);
    }
    let config_name = format!("{}.json", manifest.config.digest.hex());
    append_bytes(&mut tar, &config_name, &config_bytes).at(file)?;
    let docker_manifest = vec![DockerManifestEntry {
        config: config_name,
        repo_tags: vec![repo_tag.to_owned()],
        layers: layer_names,
    }];
    append_bytes(
        &mut tar,
        "manifest.json",
        &serde_json::to_vec(&docker_manifest).unwrap_or_default(),
    )
    .at(file)?;
    let out = tar
        .into_inner()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .at(file)?;
    out.as_file().sync_all().at(file)?;
    // persist_noclobber: never replace a file that appeared meanwhile.
    out.persist_noclobber(file).map_err(|e| e.error).at(file)?;
    sync_dir(parent).at(parent)?;
    Ok(())
}

fn header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

fn append_bytes<W: Write>(tar: &mut tar::Builder<W>, name: &str, bytes: &[u8]) -> io::Result<()> {
    let mut h = header(bytes.len() as u64);
    tar.append_data(&mut h, name, bytes)
}
