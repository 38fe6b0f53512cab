//! The store: an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/`)
//! under `$KILN_HOME`, plus read-only unpacked trees (see [`crate::tree`]).
//!
//! Invariants:
//! - a file under `blobs/sha256/` is named by the sha256 of its bytes; it
//!   appears there only complete and fsync'd (written to `tmp/`, renamed in);
//! - `index.json` is replaced atomically under the store lock, so concurrent
//!   bakes serialize their index updates and never lose one another's;
//! - a tag, once in the index, names one digest forever.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use kiln_core::Digest;
use kiln_core::oci::{ANNOTATION_REF_NAME, Descriptor, ImageConfig, Index, Manifest};
use kiln_core::reference::{ImageName, ImageRef, Tag, is_hex_prefix};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest as _, Sha256};

use crate::fsutil::{sync_dir, write_atomic};

/// The config of an artifact that has none (OCI 1.1).
const MEDIA_TYPE_EMPTY: &str = "application/vnd.oci.empty.v1+json";

/// Errors of the store. Each names the object it is about.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a kiln store: {reason}")]
    NotAStore { path: PathBuf, reason: String },
    #[error("no image matches `{0}` (see `kiln images`)")]
    UnknownRef(String),
    #[error("`{reference}` is ambiguous: it matches {}", candidates.join(", "))]
    AmbiguousRef {
        reference: String,
        candidates: Vec<String>,
    },
    #[error(
        "tag {name}:{tag} already names {existing}; tags are immutable, so the new image {new} was not tagged (bake with another --tag)"
    )]
    TagTaken {
        name: ImageName,
        tag: Tag,
        existing: Digest,
        new: Digest,
    },
    #[error("blob {0} is missing from the store")]
    MissingBlob(Digest),
    #[error("blob {digest} is corrupt: its content hashes to {actual}")]
    CorruptBlob { digest: Digest, actual: Digest },
    #[error("blob {digest} is not a valid {what}: {source}")]
    BadDocument {
        digest: Digest,
        what: &'static str,
        source: serde_json::Error,
    },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Attach the path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// One image in the store: a name, a manifest digest and the tags naming it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImageRecord {
    pub name: ImageName,
    pub digest: Digest,
    pub tags: Vec<Tag>,
    /// Size of the manifest blob (what the index descriptor records).
    #[serde(skip)]
    pub manifest_size: u64,
}

impl ImageRecord {
    /// `NAME@sha256:…`, the exact and stable way to name this image.
    pub fn pinned(&self) -> String {
        format!("{}@{}", self.name, self.digest)
    }
}

/// A handle on a store directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Open the store at `root`, creating an empty one if the directory is
    /// empty or missing.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        let store = Self { root };
        for dir in ["blobs/sha256", "trees", "cache", "tmp"] {
            let p = store.root.join(dir);
            fs::create_dir_all(&p).at(&p)?;
        }
        let layout = store.root.join("oci-layout");
        match fs::read(&layout) {
            Ok(bytes) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::NotAStore {
                        path: store.root.clone(),
                        reason: format!("oci-layout: {e}"),
                    })?;
                if v.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
                    return Err(StoreError::NotAStore {
                        path: store.root.clone(),
                        reason: "oci-layout has no imageLayoutVersion 1.0.0".into(),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#).at(&layout)?;
            }
            Err(e) => return Err(e).at(&layout),
        }
        let index = store.index_path();
        if !index.exists() {
            let _lock = store.lock()?;
            if !index.exists() {
                store.write_index(&Index::empty())?;
            }
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub(crate) fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    /// Take the store-wide lock (blocking). Held while `index.json` or a
    /// cache file is read, changed and written back.
    pub fn lock(&self) -> Result<StoreLock> {
        let path = self.root.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .at(&path)?;
        file.lock().at(&path)?;
        Ok(StoreLock { _file: file })
    }

    /// Start writing a blob. Nothing is visible in the store until
    /// [`PendingBlob::commit`].
    pub fn blob_writer(&self) -> Result<BlobWriter> {
        let dir = self.tmp_dir();
        let file = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(&dir)
            .at(&dir)?;
        Ok(BlobWriter {
            file: io::BufWriter::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Start writing a blob whose first `len` bytes are those of the blob
    /// file at `prefix` (copied in the kernel), with `state` the SHA-256
    /// state of those bytes (see `gzip::Resume`).
    pub fn blob_writer_from(&self, prefix: &Path, len: u64, state: Sha256) -> Result<BlobWriter> {
        let dir = self.tmp_dir();
        let mut file = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(&dir)
            .at(&dir)?;
        let source = File::open(prefix).at(prefix)?;
        let copied = io::copy(&mut source.take(len), file.as_file_mut()).at(prefix)?;
        if copied != len {
            return Err(StoreError::Io {
                path: prefix.to_path_buf(),
                source: io::Error::other(format!("{copied} bytes, not {len}")),
            });
        }
        Ok(BlobWriter {
            file: io::BufWriter::with_capacity(1 << 20, file),
            hasher: state,
            size: len,
        })
    }

    /// Write a whole blob from memory (configs, manifests).
    pub fn stage_blob(&self, bytes: &[u8]) -> Result<PendingBlob> {
        let mut w = self.blob_writer()?;
        w.write_all(bytes).at(&self.tmp_dir())?;
        w.finish()
    }

    /// Read a blob and check that its content matches its name.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::MissingBlob(digest.clone()));
            }
            Err(e) => return Err(e).at(&path),
        };
        let actual = Digest::of(&bytes);
        if &actual != digest {
            return Err(StoreError::CorruptBlob {
                digest: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Open a blob for streaming; the caller verifies the digest as it reads
    /// (see [`crate::unpack`]).
    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        let path = self.blob_path(digest);
        File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::MissingBlob(digest.clone()),
            _ => StoreError::Io { path, source: e },
        })
    }

    /// Hash a blob file and compare with its name.
    pub fn check_blob(&self, digest: &Digest) -> Result<()> {
        let mut f = self.open_blob(digest)?;
        let actual = hash_reader(&mut f).at(&self.blob_path(digest))?.0;
        if &actual == digest {
            Ok(())
        } else {
            Err(StoreError::CorruptBlob {
                digest: digest.clone(),
                actual,
            })
        }
    }

    fn read_json<T: DeserializeOwned>(&self, digest: &Digest, what: &'static str) -> Result<T> {
        let bytes = self.read_blob(digest)?;
        serde_json::from_slice(&bytes).map_err(|source| StoreError::BadDocument {
            digest: digest.clone(),
            what,
            source,
        })
    }

    pub fn manifest(&self, digest: &Digest) -> Result<Manifest> {
        self.read_json(digest, "image manifest")
    }

    pub fn config(&self, manifest: &Manifest) -> Result<ImageConfig> {
        self.read_json(&manifest.config.digest, "image config")
    }

    /// The current `index.json`.
    pub fn index(&self) -> Result<Index> {
        let path = self.index_path();
        let bytes = fs::read(&path).at(&path)?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::NotAStore {
            path: self.root.clone(),
            reason: format!("index.json: {e}"),
        })
    }

    pub(crate) fn write_index(&self, index: &Index) -> Result<()> {
        let path = self.index_path();
        let mut bytes = serde_json::to_vec_pretty(index).unwrap_or_default();
        bytes.push(b'\n');
        write_atomic(&path, &bytes).at(&path)
    }

    /// Record a baked image: its automatic tag plus `tags`. Refuses (and
    /// changes nothing) if any tag already names another digest. The image's
    /// blobs must already be committed.
    pub fn add_image(&self, name: &ImageName, manifest: &Descriptor, tags: &[Tag]) -> Result<()> {
        self.publish_image(name, Vec::new(), manifest, tags)
    }

    /// Commit `blobs` and record the image, all under the store lock and only
    /// after every tag was checked: a refused tag leaves the store as it was.
    pub fn publish_image(
        &self,
        name: &ImageName,
        blobs: Vec<PendingBlob>,
        manifest: &Descriptor,
        tags: &[Tag],
    ) -> Result<()> {
        let _lock = self.lock()?;
        let mut index = self.index()?;
        let mut all_tags = vec![Tag::automatic(&manifest.digest)];
        all_tags.extend(tags.iter().cloned());
        for tag in &all_tags {
            if let Some(existing) = find_tag(&index, name, tag)
                && existing != manifest.digest
            {
                return Err(StoreError::TagTaken {
                    name: name.clone(),
                    tag: tag.clone(),
                    existing,
                    new: manifest.digest.clone(),
                });
            }
        }
        self.commit_blobs(blobs, &manifest.digest)?;
        // Published now: young for a collection's grace period, even when
        // the same bytes were there before (a re-bake).
        self.touch(&manifest.digest)?;
        let before = index.clone();
        // Re-baking an image makes it the newest of its name: move its
        // entries to the end, where `NAME` resolves.
        let (mut mine, rest): (Vec<_>, Vec<_>) = index.manifests.into_iter().partition(|d| {
            d.digest == manifest.digest && parse_ref_name(d).is_some_and(|(n, _)| &n == name)
        });
        index.manifests = rest;
        for tag in &all_tags {
            if !mine
                .iter()
                .any(|d| parse_ref_name(d).is_some_and(|(_, t)| &t == tag))
            {
                let mut d =
                    Descriptor::new(&manifest.media_type, manifest.digest.clone(), manifest.size);
                d.annotations
                    .insert(ANNOTATION_REF_NAME.to_owned(), format!("{name}:{tag}"));
                mine.push(d);
            }
        }
        index.manifests.extend(mine);
        if index != before {
            self.write_index(&index)?;
        }
        Ok(())
    }

    /// The referrers of `subject` in the store (signatures, attestations):
    /// the manifests of the index whose `subject` is it (OCI 1.1), with
    /// their `artifactType` when they say one.
    pub fn referrers(&self, subject: &Digest) -> Result<Vec<(Descriptor, Option<String>)>> {
        let mut out = Vec::new();
        for d in self.index()?.manifests {
            if parse_ref_name(&d).is_some() {
                continue;
            }
            let Ok(bytes) = self.read_blob(&d.digest) else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                continue;
            };
            let of = v
                .pointer("/subject/digest")
                .and_then(|s| s.as_str())
                .and_then(|s| s.parse::<Digest>().ok());
            if of.as_ref() == Some(subject) {
                let kind = v
                    .get("artifactType")
                    .or_else(|| v.pointer("/config/mediaType"))
                    .and_then(|t| t.as_str())
                    .map(str::to_owned);
                out.push((d, kind));
            }
        }
        Ok(out)
    }

    /// Record a referrer: commit its blobs and add its manifest to the
    /// index (no tag: it is found by its `subject`), under the store lock.
    pub fn add_referrer(&self, blobs: Vec<PendingBlob>, manifest: &Descriptor) -> Result<()> {
        self.add_referrer_made(blobs, manifest, false)
    }

    /// [`Self::add_referrer`]; `made_here`: this store's own bake made it
    /// (its index entry says so, which no push or pull can).
    fn add_referrer_made(
        &self,
        blobs: Vec<PendingBlob>,
        manifest: &Descriptor,
        made_here: bool,
    ) -> Result<()> {
        let _lock = self.lock()?;
        self.commit_blobs(blobs, &manifest.digest)?;
        let mut index = self.index()?;
        let at = index
            .manifests
            .iter()
            .position(|d| d.digest == manifest.digest);
        let (at, added) = match at {
            Some(i) => (i, false),
            None => {
                index.manifests.push(Descriptor::new(
                    &manifest.media_type,
                    manifest.digest.clone(),
                    manifest.size,
                ));
                (index.manifests.len() - 1, true)
            }
        };
        let entry = &mut index.manifests[at];
        let mark = made_here
            && !entry
                .annotations
                .contains_key(kiln_core::oci::ANNOTATION_MADE_HERE);
        if mark {
            entry.annotations.insert(
                kiln_core::oci::ANNOTATION_MADE_HERE.to_owned(),
                "bake".to_owned(),
            );
        }
        if mark || added {
            self.write_index(&index)?;
        }
        Ok(())
    }

    /// Keep `payload` as a one-layer OCI 1.1 artifact of `artifact_type`
    /// whose `subject` is `subject` (a referrer: a signature, a provenance
    /// statement); its layer carries `annotations` when there are any. The
    /// same artifact kept twice is one (the same bytes, one digest).
    pub fn add_artifact(
        &self,
        subject: &Descriptor,
        artifact_type: &str,
        payload: &[u8],
        annotations: &BTreeMap<String, String>,
    ) -> Result<Descriptor> {
        self.add_artifact_made(subject, artifact_type, payload, annotations, false)
    }

    /// [`Self::add_artifact`], marked as made by this store (a bake's own
    /// provenance statement) when `made_here`.
    pub fn add_artifact_made(
        &self,
        subject: &Descriptor,
        artifact_type: &str,
        payload: &[u8],
        annotations: &BTreeMap<String, String>,
        made_here: bool,
    ) -> Result<Descriptor> {
        let config = self.stage_blob(b"{}")?;
        let layer = self.stage_blob(payload)?;
        let mut layer_desc = serde_json::json!({
            "mediaType": artifact_type,
            "digest": layer.digest.to_string(),
            "size": layer.size,
        });
        if !annotations.is_empty() {
            layer_desc["annotations"] = serde_json::json!(annotations);
        }
        // serde_json's map is ordered by key: the same artifact always
        // makes the same manifest bytes.
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": kiln_core::oci::MEDIA_TYPE_MANIFEST,
            "artifactType": artifact_type,
            "config": {
                "mediaType": MEDIA_TYPE_EMPTY,
                "digest": config.digest.to_string(),
                "size": config.size
            },
            "layers": [layer_desc],
            "subject": {
                "mediaType": subject.media_type,
                "digest": subject.digest.to_string(),
                "size": subject.size
            }
        });
        let staged = self.stage_blob(&serde_json::to_vec(&body).unwrap_or_default())?;
        let descriptor = Descriptor::new(
            kiln_core::oci::MEDIA_TYPE_MANIFEST,
            staged.digest.clone(),
            staged.size,
        );
        self.add_referrer_made(vec![config, layer, staged], &descriptor, made_here)?;
        Ok(descriptor)
    }

    /// The payloads of `subject`'s referrers of `artifact_type`, each with
    /// its manifest's digest (`None`: its layer cannot be read).
    pub fn artifacts(
        &self,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Vec<(Digest, Option<Vec<u8>>)>> {
        let mut out = Vec::new();
        for (d, kind) in self.referrers(subject)? {
            if kind.as_deref() != Some(artifact_type) {
                continue;
            }
            let payload = self
                .read_blob(&d.digest)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|m| {
                    m.pointer("/layers/0/digest")?
                        .as_str()?
                        .parse::<Digest>()
                        .ok()
                })
                .and_then(|l| self.read_blob(&l).ok());
            out.push((d.digest, payload));
        }
        Ok(out)
    }

    /// Commit `blobs`, then require the manifest among what the store has
    /// (the store lock held).
    fn commit_blobs(&self, blobs: Vec<PendingBlob>, manifest: &Digest) -> Result<()> {
        for blob in blobs {
            blob.commit(self)?;
        }
        if !self.has_blob(manifest) {
            return Err(StoreError::MissingBlob(manifest.clone()));
        }
        Ok(())
    }

    /// Every image, oldest bake first.
    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        let index = self.index()?;
        let mut out: Vec<ImageRecord> = Vec::new();
        for d in &index.manifests {
            let Some((name, tag)) = parse_ref_name(d) else {
                continue;
            };
            match out
                .iter_mut()
                .find(|r| r.name == name && r.digest == d.digest)
            {
                Some(r) => r.tags.push(tag),
                None => out.push(ImageRecord {
                    name,
                    digest: d.digest.clone(),
                    tags: vec![tag],
                    manifest_size: d.size,
                }),
            }
        }
        // An image's position is that of its newest entry.
        let mut last_pos = BTreeMap::new();
        for (i, d) in index.manifests.iter().enumerate() {
            if let Some((name, _)) = parse_ref_name(d) {
                last_pos.insert((name, d.digest.clone()), i);
            }
        }
        out.sort_by_key(|r| last_pos.get(&(r.name.clone(), r.digest.clone())).copied());
        Ok(out)
    }

    /// Find the one image `reference` names.
    pub fn resolve(&self, reference: &ImageRef) -> Result<ImageRecord> {
        let images = self.images()?;
        let unknown = || StoreError::UnknownRef(reference.to_string());
        match reference {
            ImageRef::Tagged(name, tag) => images
                .into_iter()
                .find(|r| &r.name == name && r.tags.contains(tag))
                .ok_or_else(unknown),
            ImageRef::Pinned(name, digest) => images
                .into_iter()
                .find(|r| &r.name == name && &r.digest == digest)
                .ok_or_else(unknown),
            ImageRef::Bare(word) => {
                if let Some(r) = images.iter().rev().find(|r| r.name.as_str() == word) {
                    return Ok(r.clone());
                }
                if is_hex_prefix(word) {
                    by_prefix(images, word, reference)
                } else {
                    Err(unknown())
                }
            }
            ImageRef::DigestPrefix(prefix) => by_prefix(images, prefix, reference),
        }
    }
}

fn by_prefix(images: Vec<ImageRecord>, prefix: &str, reference: &ImageRef) -> Result<ImageRecord> {
    let mut hits: Vec<ImageRecord> = images
        .into_iter()
        .filter(|r| r.digest.hex().starts_with(prefix))
        .collect();
    // The same digest under two names is still one image's content, but a
    // name is needed to pick a record: the newest wins.
    let distinct: std::collections::BTreeSet<_> = hits.iter().map(|r| r.digest.clone()).collect();
    match distinct.len() {
        0 => Err(StoreError::UnknownRef(reference.to_string())),
        1 => Ok(hits
            .pop()
            .unwrap_or_else(|| unreachable!("one digest matched"))),
        _ => Err(StoreError::AmbiguousRef {
            reference: reference.to_string(),
            candidates: hits.iter().map(ImageRecord::pinned).collect(),
        }),
    }
}

fn find_tag(index: &Index, name: &ImageName, tag: &Tag) -> Option<Digest> {
    index
        .manifests
        .iter()
        .find(|d| parse_ref_name(d).is_some_and(|(n, t)| &n == name && &t == tag))
        .map(|d| d.digest.clone())
}

/// `NAME:TAG` from an index entry's `org.opencontainers.image.ref.name`.
/// Entries kiln did not write (another tool's tag) are skipped.
fn parse_ref_name(d: &Descriptor) -> Option<(ImageName, Tag)> {
    let (name, tag) = d.annotations.get(ANNOTATION_REF_NAME)?.split_once(':')?;
    Some((ImageName::try_from(name).ok()?, Tag::try_from(tag).ok()?))
}

/// Held while the store lock is taken; released on drop.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

/// A blob being written: hashes and counts as it goes.
pub struct BlobWriter {
    file: io::BufWriter<tempfile::NamedTempFile>,
    hasher: Sha256,
    size: u64,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl crate::gzip::Checkpoint for BlobWriter {
    fn checkpoint(&self) -> Option<Vec<u8>> {
        Some(crate::gzip::sha256_state(&self.hasher))
    }
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.size
    }

    /// Flush and fsync; the blob is complete but not yet in the store.
    pub fn finish(self) -> Result<PendingBlob> {
        self.finish_unsynced()?.sync()
    }

    /// Flush, and name the bytes; the fsync is [`UnsyncedBlob::sync`]'s, so
    /// a caller streaming several blobs can run it off its task.
    pub fn finish_unsynced(self) -> Result<UnsyncedBlob> {
        let tmp = self
            .file
            .into_inner()
            .map_err(|e| e.into_error())
            .at(Path::new("<blob>"))?;
        Ok(UnsyncedBlob(PendingBlob {
            tmp,
            digest: Digest::from_hasher(self.hasher),
            size: self.size,
        }))
    }
}

/// A complete blob in `tmp/` that is not yet on disk: only
/// [`UnsyncedBlob::sync`] makes it a [`PendingBlob`] that can be committed.
#[derive(Debug)]
pub struct UnsyncedBlob(PendingBlob);

impl UnsyncedBlob {
    pub fn digest(&self) -> &Digest {
        &self.0.digest
    }

    pub fn size(&self) -> u64 {
        self.0.size
    }

    /// fsync (blocking).
    pub fn sync(self) -> Result<PendingBlob> {
        self.0.tmp.as_file().sync_all().at(self.0.tmp.path())?;
        Ok(self.0)
    }
}

/// A complete, fsync'd blob waiting in `tmp/`. Dropped without commit, it is
/// deleted: a failed bake leaves nothing behind.
#[derive(Debug)]
pub struct PendingBlob {
    tmp: tempfile::NamedTempFile,
    pub digest: Digest,
    pub size: u64,
}

impl PendingBlob {
    /// Its bytes, read from the start (it is not published yet).
    pub fn reopen(&self) -> io::Result<File> {
        self.tmp.reopen()
    }

    /// Publish under `blobs/sha256/<hex>` (a no-op if it is already there).
    pub fn commit(self, store: &Store) -> Result<()> {
        let dest = store.blob_path(&self.digest);
        if dest.is_file() {
            return Ok(());
        }
        self.tmp.persist(&dest).map_err(|e| e.error).at(&dest)?;
        let dir = store.root.join("blobs/sha256");
        sync_dir(&dir).at(&dir)
    }
}

/// A reader that hashes everything it yields: wrap a blob (or a decoder
/// over it) and compare [`HashingReader::digest`] with what it must be.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R> HashingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
        }
    }

    /// The sha256 of what was read so far.
    pub(crate) fn digest(self) -> Digest {
        Digest::from_hasher(self.hasher)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// sha256 and length of everything `r` yields.
pub fn hash_reader(r: &mut impl Read) -> io::Result<(Digest, u64)> {
    hash_reader_paced(r, &mut |_| {})
}

/// [`hash_reader`], calling `pace` with the size of each read (a paced
/// verification sleeps there).
pub fn hash_reader_paced(
    r: &mut impl Read,
    pace: &mut dyn FnMut(u64),
) -> io::Result<(Digest, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
        pace(n as u64);
    }
    Ok((Digest::from_hasher(hasher), total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::oci::MEDIA_TYPE_MANIFEST;

    fn name(s: &str) -> ImageName {
        ImageName::try_from(s).unwrap()
    }

    fn image(store: &Store, content: &[u8]) -> Descriptor {
        let blob = store.stage_blob(content).unwrap();
        let d = Descriptor::new(MEDIA_TYPE_MANIFEST, blob.digest.clone(), blob.size);
        blob.commit(store).unwrap();
        d
    }

    #[test]
    fn a_new_store_is_an_oci_layout() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(dir.path().join("oci-layout").is_file());
        assert_eq!(store.index().unwrap(), Index::empty());
        // Opening again keeps it.
        Store::open(dir.path()).unwrap();
    }

    #[test]
    fn an_uncommitted_blob_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let pending = store.stage_blob(b"x").unwrap();
        let digest = pending.digest.clone();
        drop(pending);
        assert!(!store.has_blob(&digest));
        assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn tags_are_immutable_and_refs_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let v1 = image(&store, b"one");
        let v2 = image(&store, b"two");
        let tag = Tag::try_from("stable").unwrap();
        store
            .add_image(&name("app"), &v1, std::slice::from_ref(&tag))
            .unwrap();
        let before = store.index().unwrap();
        let err = store
            .add_image(&name("app"), &v2, std::slice::from_ref(&tag))
            .unwrap_err();
        assert!(matches!(err, StoreError::TagTaken { .. }), "{err}");
        assert_eq!(
            store.index().unwrap(),
            before,
            "a refused tag changes nothing"
        );
        store.add_image(&name("app"), &v2, &[]).unwrap();

        let resolve = |s: &str| store.resolve(&ImageRef::parse(s).unwrap());
        assert_eq!(resolve("app").unwrap().digest, v2.digest, "newest wins");
        assert_eq!(resolve("app:stable").unwrap().digest, v1.digest);
        let auto = format!("app:{}", v1.digest.short());
        assert_eq!(resolve(&auto).unwrap().digest, v1.digest);
        assert_eq!(
            resolve(&format!("app@{}", v2.digest)).unwrap().digest,
            v2.digest
        );
        assert_eq!(resolve(&v1.digest.hex()[..10]).unwrap().digest, v1.digest);
        assert!(matches!(resolve("nope"), Err(StoreError::UnknownRef(_))));
        assert!(matches!(
            resolve("app:nope"),
            Err(StoreError::UnknownRef(_))
        ));
        // Re-adding v1 makes it the newest again.
        store.add_image(&name("app"), &v1, &[]).unwrap();
        assert_eq!(resolve("app").unwrap().digest, v1.digest);
    }

    #[test]
    fn an_ambiguous_prefix_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // Find two contents whose digests share a first hex digit.
        let mut seen: BTreeMap<char, Descriptor> = BTreeMap::new();
        for i in 0.. {
            let d = image(&store, format!("{i}").as_bytes());
            let first = d.digest.hex().chars().next().unwrap();
            if let Some(other) = seen.insert(first, d.clone()) {
                store.add_image(&name("a"), &other, &[]).unwrap();
                store.add_image(&name("b"), &d, &[]).unwrap();
                let prefix = ImageRef::DigestPrefix(first.to_string());
                // A one-character prefix is not accepted by the parser, but
                // the resolver must still refuse ambiguity.
                assert!(matches!(
                    store.resolve(&prefix),
                    Err(StoreError::AmbiguousRef { .. })
                ));
                break;
            }
        }
    }

    #[test]
    fn a_corrupt_blob_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = image(&store, b"content");
        fs::write(store.blob_path(&d.digest), b"tampered").unwrap();
        assert!(matches!(
            store.read_blob(&d.digest),
            Err(StoreError::CorruptBlob { .. })
        ));
        assert!(matches!(
            store.check_blob(&d.digest),
            Err(StoreError::CorruptBlob { .. })
        ));
    }
}
