//! Baking: one `[images.NAME]` of a spec → a reproducible OCI image in the store.
//!
//! 1. Walk the context (sorted, `.kilnignore`, `include`/`exclude`, never a
//!    `.git` directory), refusing
//!    what cannot be baked faithfully: special files, escaping symlinks.
//! 2. Find each file's sha256, from the stat cache when its (size, mtime,
//!    ctime, inode, device) are unchanged, else by reading it (on all cores).
//! 3. Assign entries to layers, normalize them (mode, owner, mtime) and key
//!    each layer by its content; a layer whose key is cached reuses its blob.
//! 4. Write the other layers as tar → parallel gzip, then config and
//!    manifest, and publish everything at once under the store lock.
//!
//! Nothing is visible in the store until step 4 succeeds: every blob waits
//! in `tmp/` and is deleted if the bake fails.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_core::Digest;
use kiln_core::layer::{
    EntryKind, LayerAssigner, LayerEntry, glob_set, layer_key, link_escapes,
    matches_path_or_ancestor, normalize_mode,
};
use kiln_core::oci::{self, Descriptor, EmptyObject, ExecConfig, ImageConfig, Manifest, RootFs};
use kiln_core::reference::{ImageName, Tag};
use kiln_core::spec::ImageSpec;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::fsutil::write_atomic;
use crate::gzip::ParallelGzip;
use crate::store::{PendingBlob, Store, StoreError};

/// Why a bake failed. The store is unchanged whenever one of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum BakeError {
    #[error("context {path}: {source}")]
    Context { path: PathBuf, source: io::Error },
    #[error("context {path} is not a directory")]
    ContextNotDir { path: PathBuf },
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("symlink {path} points outside the context (to `{target}`)")]
    SymlinkEscapes { path: PathBuf, target: String },
    #[error("{path} is a {kind}: only files, directories and symlinks can be baked")]
    SpecialFile { path: PathBuf, kind: &'static str },
    #[error("include `{pattern}` matches nothing in the context {context}")]
    IncludeMatchesNothing { pattern: String, context: PathBuf },
    #[error("{path}: file name is not valid UTF-8")]
    NonUtf8Path { path: PathBuf },
    #[error("{path} changed while it was being baked; bake again")]
    Changed { path: PathBuf },
    #[error("{path}: {message}")]
    Ignore { path: PathBuf, message: String },
    #[error("writing layer {layer} of image {image}: {source}")]
    WriteLayer {
        image: String,
        layer: String,
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type Result<T, E = BakeError> = std::result::Result<T, E>;

/// Settings from outside the spec.
#[derive(Clone, Debug, Default)]
pub struct BakeOptions {
    /// `SOURCE_DATE_EPOCH`: every mtime and the `created` time; 0 when unset.
    pub source_date_epoch: Option<u64>,
    /// Extra immutable tags, beside the automatic one.
    pub tags: Vec<Tag>,
    /// The kiln version, recorded as an annotation.
    pub kiln_version: String,
}

/// Told about a bake's progress (the CLI draws a bar from it).
pub trait BakeObserver: Sync {
    /// A phase begins; `total` is the bytes it will process.
    fn phase(&self, _name: &str, _total: u64) {}
    /// `bytes` more were processed in the current phase.
    fn advance(&self, _bytes: u64) {}
}

/// An observer that ignores everything.
pub struct Quiet;
impl BakeObserver for Quiet {}

/// What a bake did.
#[derive(Clone, Debug, Serialize)]
pub struct BakeReport {
    pub image: ImageName,
    /// The base it was baked on, `REF@DIGEST` (none: on nothing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    pub digest: Digest,
    pub tags: Vec<Tag>,
    pub layers: Vec<LayerReport>,
    /// Files in the image.
    pub files: usize,
    /// Files whose content had to be read because the stat cache missed.
    pub files_hashed: usize,
    pub bytes_hashed: u64,
    /// Compressed bytes of the layers written by this bake (not reused).
    pub bytes_written: u64,
    /// gzip members of the written layers copied from the previous bake of
    /// the image (unchanged runs of files), not compressed again.
    pub members_reused: usize,
    /// Total compressed size of the image's layers.
    pub size: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    /// The declared layer's name.
    pub name: String,
    /// Which of the declared layer's parts this is (1-based), of how many
    /// (`kiln_core::layer::parts`).
    pub part: usize,
    pub parts: usize,
    pub digest: Digest,
    pub size: u64,
    pub entries: usize,
    pub reused: bool,
}

/// Bake `name` as described by `spec`, whose paths are relative to `spec_dir`.
pub fn bake_image(
    store: &Store,
    spec_dir: &Path,
    name: &ImageName,
    spec: &ImageSpec,
    options: &BakeOptions,
    observer: &dyn BakeObserver,
) -> Result<BakeReport> {
    bake_image_on(store, spec_dir, name, spec, None, options, observer)
}

/// [`bake_image`] on `base` (read by the caller, who resolves the spec's
/// `base`): its layers first, then the image's own; its config with the
/// spec's over it ([`kiln_core::base::merge`]); pinned by its digest in
/// the manifest's annotations (so that the same spec on the same base is
/// the same digest, and another base another) and in the provenance.
pub fn bake_image_on(
    store: &Store,
    spec_dir: &Path,
    name: &ImageName,
    spec: &ImageSpec,
    base: Option<crate::base::Base>,
    options: &BakeOptions,
    observer: &dyn BakeObserver,
) -> Result<BakeReport> {
    let context = spec_dir.join(spec.context.as_str());
    let meta = fs::metadata(&context).map_err(|source| BakeError::Context {
        path: context.clone(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(BakeError::ContextNotDir { path: context });
    }
    // Read access is checked up front so that an unreadable context is one
    // clear error rather than a failure deep in the walk.
    fs::read_dir(&context).map_err(|source| BakeError::Context {
        path: context.clone(),
        source,
    })?;
    let context = fs::canonicalize(&context).map_err(|source| BakeError::Context {
        path: context.clone(),
        source,
    })?;
    let mtime = options.source_date_epoch.unwrap_or(0);

    let started = SystemTime::now();
    let walked = walk(&context, spec)?;

    // Content hashes: from the stat cache, else by reading (in parallel).
    let cache_path = stat_cache_path(store, &context);
    let mut cache = StatCache::load(&cache_path);
    let mut hashes: Vec<Option<Digest>> = walked
        .iter()
        .map(|w| match &w.kind {
            WalkKind::File(stat) => cache.lookup(&w.rel, stat),
            _ => None,
        })
        .collect();
    let misses: Vec<usize> = walked
        .iter()
        .enumerate()
        .filter(|(i, w)| matches!(w.kind, WalkKind::File(_)) && hashes[*i].is_none())
        .map(|(i, _)| i)
        .collect();
    let bytes_hashed: u64 = misses
        .iter()
        .map(|&i| match &walked[i].kind {
            WalkKind::File(s) => s.size,
            _ => 0,
        })
        .sum();
    observer.phase("hashing", bytes_hashed);
    let computed: Vec<(usize, Digest)> = misses
        .par_iter()
        .map(|&i| {
            let path = context.join(&walked[i].rel);
            let (digest, size) = hash_file(&path)?;
            observer.advance(size);
            Ok((i, digest))
        })
        .collect::<Result<_>>()?;
    for (i, d) in computed {
        if let WalkKind::File(stat) = &walked[i].kind {
            cache.insert(&walked[i].rel, stat, &d);
        }
        hashes[i] = Some(d);
    }

    // Layers.
    let assigner = LayerAssigner::new(&spec.layers);
    let mut layers: Vec<BTreeMap<String, LayerEntry>> = (0..assigner.layer_count())
        .map(|_| BTreeMap::new())
        .collect();
    let has_children: BTreeSet<&str> = walked
        .iter()
        .filter_map(|w| w.rel.rsplit_once('/').map(|(p, _)| p))
        .collect();
    for (w, hash) in walked.iter().zip(&hashes) {
        let kind = match (&w.kind, hash) {
            (WalkKind::Dir, _) if has_children.contains(w.rel.as_str()) => continue,
            (WalkKind::Dir, _) => EntryKind::Dir,
            (WalkKind::File(stat), Some(sha256)) => EntryKind::File {
                size: stat.size,
                sha256: sha256.clone(),
            },
            (WalkKind::File(_), None) => unreachable!("every file was hashed"),
            (WalkKind::Symlink(target), _) => EntryKind::Symlink {
                target: target.clone(),
            },
        };
        let layer = &mut layers[assigner.assign(&w.rel)];
        // Each layer carries the directories above its entries, so it
        // unpacks on its own with normalized modes.
        for dir in kiln_core::layer::ancestors(&w.rel) {
            layer
                .entry(dir.to_owned())
                .or_insert_with(|| LayerEntry::dir(dir));
        }
        let mode = normalize_mode(&kind, w.mode);
        layer.insert(
            w.rel.clone(),
            LayerEntry {
                path: w.rel.clone(),
                mode,
                kind,
            },
        );
    }

    // What this bake takes from the store stays until it has published.
    let mut lease = store.lease().map_err(BakeError::Store)?;
    // The members of the previous bake of this image: a layer that changed
    // copies those of its unchanged runs of files instead of compressing.
    let reuse = std::sync::Arc::new(previous_members(store, name, &mut lease));
    let mut layer_members: Vec<(Digest, Vec<crate::gzip::Member>)> = Vec::new();
    let mut members_reused = 0;
    let layer_cache_path = store.cache_dir().join("layers.json");
    let layer_cache = LayerCache::load(&layer_cache_path);
    let mut new_layers = BTreeMap::new();
    let mut pending: Vec<PendingBlob> = Vec::new();
    let mut reports = Vec::new();
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    let mut bytes_written = 0;
    // The base's layers come first, held like the image's own until it is
    // published (the store's copies; what it lacked is pending).
    let mut base = base;
    if let Some(b) = &mut base {
        for (layer, diff_id) in b.manifest.layers.iter().zip(&b.config.rootfs.diff_ids) {
            let ours = b.pending.iter().any(|p| p.digest == layer.digest);
            if !ours && !lease.hold(&layer.digest)? {
                return Err(BakeError::Store(StoreError::MissingBlob(
                    layer.digest.clone(),
                )));
            }
            descriptors.push(layer.clone());
            diff_ids.push(diff_id.clone());
        }
        pending.append(&mut b.pending);
    }
    for (index, entries) in layers.iter().enumerate() {
        if entries.is_empty() {
            continue;
        }
        let entries: Vec<LayerEntry> = entries.values().cloned().collect();
        let layer_name = spec
            .layers
            .get(index)
            .and_then(|l| l.name.clone())
            .unwrap_or_else(|| {
                if index == spec.layers.len() {
                    "app".to_owned()
                } else {
                    format!("layer-{}", index + 1)
                }
            });
        // A big layer is stored as parts (OCI layers of their own): a
        // change writes only the part it falls in.
        let parts = kiln_core::layer::parts(&entries, spec.part_size.0);
        let count = parts.len();
        for (part, entries) in parts.into_iter().enumerate() {
            let label = if count > 1 {
                format!("{layer_name} {}/{count}", part + 1)
            } else {
                layer_name.clone()
            };
            let key = layer_key(&entries, mtime);
            let (cached, reused) = match layer_cache.get(&key) {
                // Held as it is taken: a collection running meanwhile keeps
                // it (or removed it already, and the layer is written anew).
                Some(c) if lease.hold(&c.digest).unwrap_or(false) => (c.clone(), true),
                _ => {
                    let raw: u64 = entries.iter().map(kiln_core::layer::raw_size).sum();
                    observer.phase(&format!("layer {label}"), raw);
                    let (blob, diff_id, members, reused) =
                        write_layer(store, &context, &entries, mtime, observer, reuse.clone())
                            .map_err(|e| match e {
                                LayerWriteError::Io(source) => BakeError::WriteLayer {
                                    image: name.to_string(),
                                    layer: label.clone(),
                                    source,
                                },
                                LayerWriteError::Bake(b) => b,
                            })?;
                    let c = CachedLayer {
                        digest: blob.digest.clone(),
                        diff_id,
                        size: blob.size,
                    };
                    members_reused += reused;
                    layer_members.push((blob.digest.clone(), members));
                    bytes_written += blob.size;
                    pending.push(blob);
                    (c, false)
                }
            };
            if !reused {
                new_layers.insert(key, cached.clone());
            }
            let mut d = Descriptor::new(
                oci::MEDIA_TYPE_LAYER_GZIP,
                cached.digest.clone(),
                cached.size,
            );
            d.annotations
                .insert(oci::ANNOTATION_LAYER_NAME.to_owned(), layer_name.clone());
            if count > 1 {
                d.annotations.insert(
                    oci::ANNOTATION_LAYER_PART.to_owned(),
                    format!("{}/{count}", part + 1),
                );
            }
            descriptors.push(d);
            diff_ids.push(cached.diff_id.clone());
            reports.push(LayerReport {
                name: layer_name.clone(),
                part: part + 1,
                parts: count,
                digest: cached.digest,
                size: cached.size,
                entries: entries.len(),
                reused,
            });
        }
    }

    // Config and manifest: canonical JSON, so equal inputs give equal bytes.
    let created =
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(mtime)).to_string();
    let own = ExecConfig {
        user: spec.user.clone(),
        exposed_ports: spec
            .port
            .map(|p| (format!("{}/tcp", p.0), EmptyObject {}))
            .into_iter()
            .collect(),
        env: spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        entrypoint: spec.entrypoint.clone(),
        cmd: spec.cmd.clone(),
        working_dir: spec.workdir.as_ref().map(|w| w.as_str().to_owned()),
        labels: spec.labels.clone(),
    };
    let config = ImageConfig {
        created: Some(created.clone()),
        architecture: oci::oci_architecture(std::env::consts::ARCH).to_owned(),
        os: "linux".to_owned(),
        config: match &base {
            Some(b) => kiln_core::base::merge(&b.config.config, &own),
            None => own,
        },
        rootfs: RootFs {
            kind: "layers".to_owned(),
            diff_ids,
        },
    };
    let config_blob = store.stage_blob(&to_json(&config))?;
    // Content and config only: where the bake came from is beside the
    // image (its provenance statement), so it never changes the digest.
    let mut annotations = BTreeMap::new();
    annotations.insert(oci::ANNOTATION_CREATED.to_owned(), created);
    annotations.insert(oci::ANNOTATION_TITLE.to_owned(), name.to_string());
    if let Some(b) = &base {
        annotations.insert(oci::ANNOTATION_BASE_DIGEST.to_owned(), b.digest.to_string());
        annotations.insert(oci::ANNOTATION_BASE_NAME.to_owned(), b.name.clone());
    }
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(oci::MEDIA_TYPE_MANIFEST.to_owned()),
        config: Descriptor::new(
            oci::MEDIA_TYPE_CONFIG,
            config_blob.digest.clone(),
            config_blob.size,
        ),
        layers: descriptors,
        annotations,
    };
    let manifest_blob = store.stage_blob(&to_json(&manifest))?;
    let manifest_desc = Descriptor::new(
        oci::MEDIA_TYPE_MANIFEST,
        manifest_blob.digest.clone(),
        manifest_blob.size,
    );
    pending.push(config_blob);
    pending.push(manifest_blob);

    store.publish_image(name, pending, &manifest_desc, &options.tags)?;
    let statement = crate::provenance::statement(
        name.as_str(),
        &manifest_desc.digest,
        &crate::provenance::source(&context),
        base.as_ref().map(|b| (b.name.as_str(), &b.digest)),
        &options.kiln_version,
    );
    crate::provenance::attach(store, &manifest_desc, &statement)?;

    // Caches only speed up the next bake; failing to save them is not an
    // error. Unchanged caches are not rewritten: a no-op re-bake writes nothing.
    let file_count = walked
        .iter()
        .filter(|w| matches!(w.kind, WalkKind::File(_)))
        .count();
    if !misses.is_empty() || cache.entries.len() != file_count {
        cache.retain_paths(walked.iter().map(|w| w.rel.as_str()));
        let _ = cache.save(&cache_path, started);
    }
    for (digest, members) in &layer_members {
        save_members(store, digest, members);
    }
    if !new_layers.is_empty() {
        let _lock = store.lock()?;
        let mut merged = LayerCache::load(&layer_cache_path);
        merged.layers.extend(new_layers);
        let _ = merged.save(&layer_cache_path);
    }

    let mut tags = vec![Tag::automatic(&manifest_desc.digest)];
    tags.extend(options.tags.iter().cloned());
    Ok(BakeReport {
        image: name.clone(),
        base: base.map(|b| format!("{}@{}", b.name, b.digest)),
        digest: manifest_desc.digest,
        tags,
        files: file_count,
        files_hashed: misses.len(),
        bytes_hashed,
        bytes_written,
        members_reused,
        size: reports.iter().map(|l| l.size).sum(),
        layers: reports,
    })
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// A file's identity for the stat cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct StatKey {
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
    ino: u64,
    dev: u64,
}

impl StatKey {
    fn of(m: &fs::Metadata) -> Self {
        Self {
            size: m.size(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
            ino: m.ino(),
            dev: m.dev(),
        }
    }
}

enum WalkKind {
    Dir,
    File(StatKey),
    Symlink(String),
}

struct Walked {
    rel: String,
    mode: u32,
    kind: WalkKind,
}

/// The context's entries, filtered, in sorted order.
/// `.git`, at any depth (a submodule's too).
fn name_is_git(rel: &str) -> bool {
    rel.rsplit('/').next() == Some(".git")
}

fn walk(context: &Path, spec: &ImageSpec) -> Result<Vec<Walked>> {
    let ignore_file = context.join(".kilnignore");
    let mut builder = ignore::gitignore::GitignoreBuilder::new(context);
    if ignore_file.exists()
        && let Some(e) = builder.add(&ignore_file)
    {
        return Err(BakeError::Ignore {
            path: ignore_file,
            message: e.to_string(),
        });
    }
    let ignore = builder.build().map_err(|e| BakeError::Ignore {
        path: ignore_file.clone(),
        message: e.to_string(),
    })?;
    let include = glob_set(&spec.include);
    let exclude = glob_set(&spec.exclude);

    let mut out = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(dir_rel) = stack.pop() {
        let dir = context.join(&dir_rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .and_then(|rd| {
                rd.map(|e| e.map(|e| e.file_name()))
                    .collect::<io::Result<Vec<_>>>()
            })
            .map_err(|source| BakeError::Read {
                path: dir.clone(),
                source,
            })?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let path = dir.join(&name);
            let name = name
                .into_string()
                .map_err(|_| BakeError::NonUtf8Path { path: path.clone() })?;
            let rel = if dir_rel.is_empty() {
                name
            } else {
                format!("{dir_rel}/{name}")
            };
            let meta = fs::symlink_metadata(&path).map_err(|source| BakeError::Read {
                path: path.clone(),
                source,
            })?;
            let ft = meta.file_type();
            // A git directory is never part of an image: two clones of one
            // commit must bake the same digest.
            if (name_is_git(&rel) && ft.is_dir())
                || ignore.matched(&rel, ft.is_dir()).is_ignore()
                || exclude.is_match(&rel)
            {
                continue;
            }
            let included = spec.include.is_empty() || matches_path_or_ancestor(&include, &rel);
            let kind = if ft.is_dir() {
                subdirs.push(rel.clone());
                if !included {
                    continue;
                }
                WalkKind::Dir
            } else if !included {
                continue;
            } else if ft.is_file() {
                WalkKind::File(StatKey::of(&meta))
            } else if ft.is_symlink() {
                let target = fs::read_link(&path).map_err(|source| BakeError::Read {
                    path: path.clone(),
                    source,
                })?;
                let target = target
                    .into_os_string()
                    .into_string()
                    .map_err(|_| BakeError::NonUtf8Path { path: path.clone() })?;
                if link_escapes(&rel, &target, true) {
                    return Err(BakeError::SymlinkEscapes { path, target });
                }
                WalkKind::Symlink(target)
            } else {
                let kind = if ft.is_socket() {
                    "socket"
                } else if ft.is_fifo() {
                    "named pipe"
                } else if ft.is_block_device() || ft.is_char_device() {
                    "device node"
                } else {
                    "special file"
                };
                return Err(BakeError::SpecialFile { path, kind });
            };
            out.push(Walked {
                rel,
                mode: meta.mode(),
                kind,
            });
        }
        // Depth-first, in name order: push in reverse so the first pops first.
        stack.extend(subdirs.into_iter().rev());
    }
    if let Some(g) = kiln_core::layer::unmatched(&spec.include, out.iter().map(|w| w.rel.as_str()))
    {
        return Err(BakeError::IncludeMatchesNothing {
            pattern: g.as_str().to_owned(),
            context: context.to_path_buf(),
        });
    }
    Ok(out)
}

fn hash_file(path: &Path) -> Result<(Digest, u64)> {
    let mut f = File::open(path).map_err(|source| BakeError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    crate::store::hash_reader(&mut f).map_err(|source| BakeError::Read {
        path: path.to_path_buf(),
        source,
    })
}

enum LayerWriteError {
    Io(io::Error),
    Bake(BakeError),
}

impl From<io::Error> for LayerWriteError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// Write one layer: normalized tar → parallel gzip → a pending blob.
/// A written layer: its blob, `diff_id`, members, and how many of them
/// were copied from an earlier layer.
type Written = (PendingBlob, Digest, Vec<crate::gzip::Member>, usize);

fn write_layer(
    store: &Store,
    context: &Path,
    entries: &[LayerEntry],
    mtime: u64,
    observer: &dyn BakeObserver,
    reuse: std::sync::Arc<crate::gzip::Reuse>,
) -> std::result::Result<Written, LayerWriteError> {
    // The chain of the entries after each point: where an earlier layer's
    // chain is the same, its bytes up to there are this layer's.
    let mut chains = Vec::with_capacity(entries.len() + 1);
    chains.push(kiln_core::layer::chain_seed(mtime));
    for e in entries {
        let next = kiln_core::layer::chain(&chains[chains.len() - 1], e);
        chains.push(next);
    }
    let bake_err = |e: StoreError| LayerWriteError::Bake(e.into());
    let cuts_before = |i: usize| entries.get(i).is_some_and(kiln_core::layer::alone);
    let (gz, start) = match reuse.prefix(&chains, cuts_before) {
        // The longest prefix an earlier layer shares: its blob's bytes are
        // copied (in the kernel) and both hashes resume; nothing of those
        // entries is read or compressed.
        Some((path, members, resume)) => {
            let len = members.last().map_or(0, |m| m.offset + m.len);
            let state = crate::gzip::unhex(&resume.out_state)
                .and_then(|b| crate::gzip::sha256_from_state(&b))
                .ok_or_else(|| io::Error::other("a member cache entry has a bad hash state"))?;
            let blob = store
                .blob_writer_from(&path, len, state)
                .map_err(bake_err)?;
            let skipped: u64 = entries[..resume.entries]
                .iter()
                .map(|e| match e.kind {
                    EntryKind::File { size, .. } => size + 512,
                    _ => 512,
                })
                .sum();
            observer.advance(skipped);
            let gz =
                ParallelGzip::resumed(blob, Box::new(|_| {}), reuse.clone(), members, &resume)?;
            (gz, resume.entries)
        }
        None => {
            let blob = store.blob_writer().map_err(bake_err)?;
            (ParallelGzip::reusing(blob, Box::new(|_| {}), reuse), 0)
        }
    };
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    for (i, e) in entries.iter().enumerate().skip(start) {
        // Members are cut at entry boundaries (`kiln_core::layer::alone`,
        // `cut_after`): unchanged runs of files give unchanged members.
        let alone = kiln_core::layer::alone(e);
        if alone {
            tar.get_mut().cut_at(i, chains[i].clone(), false)?;
            tar.get_mut().split(true);
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(e.mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        match &e.kind {
            EntryKind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                tar.append_data(&mut h, format!("{}/", e.path), io::empty())?;
                observer.advance(512);
            }
            EntryKind::Symlink { target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                tar.append_link(&mut h, &e.path, target)?;
                observer.advance(512);
            }
            EntryKind::File { size, sha256 } => {
                let path = context.join(&e.path);
                let file = File::open(&path).map_err(|source| {
                    LayerWriteError::Bake(BakeError::Read {
                        path: path.clone(),
                        source,
                    })
                })?;
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(*size);
                // Hash what actually goes into the layer: if the file changed
                // since it was hashed, the layer key would lie.
                let mut reader = HashingReader {
                    inner: file.take(*size),
                    hasher: Sha256::new(),
                    count: 0,
                    observer,
                };
                tar.append_data(&mut h, &e.path, &mut reader)?;
                if reader.count != *size || Digest::from_hasher(reader.hasher) != *sha256 {
                    return Err(LayerWriteError::Bake(BakeError::Changed { path }));
                }
            }
        }
        let gz = tar.get_mut();
        if alone {
            // After a big entry the cut is its own: it holds whatever follows.
            gz.split(false);
            gz.cut_at(i + 1, chains[i + 1].clone(), true)?;
        } else if kiln_core::layer::cut_after(e, gz.member_len()) {
            gz.cut_at(i + 1, chains[i + 1].clone(), true)?;
        }
    }
    let gz = tar.into_inner()?;
    let done = gz.finish()?;
    let pending = done.out.finish().map_err(|e| match e {
        StoreError::Io { source, .. } => LayerWriteError::Io(source),
        other => LayerWriteError::Bake(other.into()),
    })?;
    Ok((pending, done.diff_id, done.members, done.reused))
}

/// Where a layer blob's members are listed (`cache/members/HEX.json`).
fn members_path(store: &Store, layer: &Digest) -> std::path::PathBuf {
    store
        .cache_dir()
        .join("members")
        .join(format!("{}.json", layer.hex()))
}

fn save_members(store: &Store, layer: &Digest, members: &[crate::gzip::Member]) {
    let path = members_path(store, layer);
    if let Some(dir) = path.parent() {
        let _ = fs::create_dir_all(dir);
    }
    let _ = write_atomic(&path, &to_json(&members));
}

/// The members of the layers of the newest image named `name`, each layer
/// blob held by `lease` while this bake may copy from it.
fn previous_members(
    store: &Store,
    name: &ImageName,
    lease: &mut crate::gc::Lease,
) -> crate::gzip::Reuse {
    let mut reuse = crate::gzip::Reuse::default();
    let Ok(image) = store.resolve(&kiln_core::reference::ImageRef::Bare(name.to_string())) else {
        return reuse;
    };
    let Ok(manifest) = store.manifest(&image.digest) else {
        return reuse;
    };
    for layer in &manifest.layers {
        let Ok(bytes) = fs::read(members_path(store, &layer.digest)) else {
            continue;
        };
        let Ok(members) = serde_json::from_slice::<Vec<crate::gzip::Member>>(&bytes) else {
            continue;
        };
        if lease.hold(&layer.digest).unwrap_or(false) {
            reuse.add(store.blob_path(&layer.digest), &members);
        }
    }
    reuse
}

struct HashingReader<'a, R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    observer: &'a dyn BakeObserver,
}

impl<R: Read> Read for HashingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        self.observer.advance(n as u64);
        Ok(n)
    }
}

fn stat_cache_path(store: &Store, context: &Path) -> PathBuf {
    let key = Digest::of(context.as_os_str().as_encoded_bytes());
    store.cache_dir().join(format!("stat-{}.json", key.short()))
}

/// path → (stat identity, sha256) for one context directory.
#[derive(Default, Serialize, Deserialize)]
struct StatCache {
    version: u32,
    entries: BTreeMap<String, (StatKey, Digest)>,
}

const STAT_CACHE_VERSION: u32 = 1;

impl StatCache {
    fn load(path: &Path) -> Self {
        fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Self>(&b).ok())
            .filter(|c| c.version == STAT_CACHE_VERSION)
            .unwrap_or_default()
    }

    fn lookup(&self, rel: &str, stat: &StatKey) -> Option<Digest> {
        self.entries
            .get(rel)
            .filter(|(k, _)| k == stat)
            .map(|(_, d)| d.clone())
    }

    /// Forget files that are no longer in the context.
    fn retain_paths<'a>(&mut self, paths: impl Iterator<Item = &'a str>) {
        let keep: BTreeSet<&str> = paths.collect();
        self.entries.retain(|p, _| keep.contains(p.as_str()));
    }

    fn insert(&mut self, rel: &str, stat: &StatKey, digest: &Digest) {
        self.entries
            .insert(rel.to_owned(), (stat.clone(), digest.clone()));
    }

    /// Save, dropping entries too recent to trust: a file written within a
    /// clock tick of the bake's start could change again without its mtime
    /// or ctime moving ("racy git"). File times come from the kernel's coarse
    /// clock (a few ms per tick), so a 100 ms margin is safe.
    fn save(&mut self, path: &Path, bake_started: SystemTime) -> io::Result<()> {
        let limit = bake_started
            .checked_sub(Duration::from_millis(100))
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as i128);
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        self.entries.retain(|_, (k, _)| {
            ns(k.mtime, k.mtime_nsec) < limit && ns(k.ctime, k.ctime_nsec) < limit
        });
        self.version = STAT_CACHE_VERSION;
        write_atomic(path, &to_json(self))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct CachedLayer {
    digest: Digest,
    diff_id: Digest,
    size: u64,
}

/// layer key → the blob that holds exactly that content.
#[derive(Default, Serialize, Deserialize)]
struct LayerCache {
    layers: BTreeMap<Digest, CachedLayer>,
}

impl LayerCache {
    fn load(path: &Path) -> Self {
        fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn get(&self, key: &Digest) -> Option<&CachedLayer> {
        self.layers.get(key)
    }

    fn save(&self, path: &Path) -> io::Result<()> {
        write_atomic(path, &to_json(self))
    }
}
