//! Read-only trees: each image's root filesystem, unpacked once per digest
//! under `trees/<hex>/rootfs`, with its per-file manifest in
//! `trees/<hex>/manifest.json`. Instances run from these trees; the drift
//! detector and `kiln verify` compare them against the manifest.
//!
//! A tree appears only complete: it is unpacked and scanned under `tmp/`,
//! synced once (syncfs, not an fsync per file), then renamed into place.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_core::Digest;
use kiln_core::tree::{TreeDrift, TreeEntry, TreeManifest};
use rayon::prelude::*;

use crate::fsutil::{remove_tree, sync_dir, write_atomic};
use crate::store::{IoContext, Store, StoreError, hash_reader};
use crate::unpack::{UnpackError, UnpackOptions, unpack_image};

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("tree {image}: manifest.json is unreadable: {reason}")]
    BadManifest { image: Digest, reason: String },
}

pub type Result<T, E = TreeError> = std::result::Result<T, E>;

/// A materialized image tree.
#[derive(Clone, Debug)]
pub struct Tree {
    pub image: Digest,
    /// The root filesystem, read-only.
    pub rootfs: PathBuf,
    pub manifest: TreeManifest,
}

impl Store {
    fn tree_dir(&self, image: &Digest) -> PathBuf {
        self.root().join("trees").join(image.hex())
    }

    /// The tree of `image` if it was materialized.
    pub fn tree(&self, image: &Digest) -> Result<Option<Tree>> {
        let dir = self.tree_dir(image);
        let manifest_path = dir.join("manifest.json");
        let bytes = match fs::read(&manifest_path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StoreError::Io {
                    path: manifest_path,
                    source: e,
                }
                .into());
            }
        };
        let manifest = serde_json::from_slice(&bytes).map_err(|e| TreeError::BadManifest {
            image: image.clone(),
            reason: e.to_string(),
        })?;
        Ok(Some(Tree {
            image: image.clone(),
            rootfs: dir.join("rootfs"),
            manifest,
        }))
    }

    /// Digests of every materialized tree.
    pub fn trees(&self) -> Result<Vec<Digest>> {
        let dir = self.root().join("trees");
        let mut out: Vec<Digest> = fs::read_dir(&dir)
            .at(&dir)?
            .flatten()
            .filter_map(|e| Digest::from_hex(&e.file_name().to_string_lossy()).ok())
            .collect();
        out.sort();
        Ok(out)
    }

    /// The read-only tree of `image`, unpacking it the first time.
    pub fn materialize(&self, image: &Digest) -> Result<Tree> {
        if let Some(tree) = self.tree(image)? {
            return Ok(tree);
        }
        let manifest = self.manifest(image)?;
        let config = self.config(&manifest)?;
        let tmp_root = self.root().join("tmp");
        let staging = tempfile::Builder::new()
            .prefix("tree-")
            .tempdir_in(&tmp_root)
            .at(&tmp_root)?;
        let rootfs = staging.path().join("rootfs");
        fs::create_dir(&rootfs).at(&rootfs)?;
        let result = (|| -> Result<TreeManifest> {
            unpack_image(
                self,
                &manifest,
                &config,
                &rootfs,
                UnpackOptions { read_only: true },
            )?;
            let mut tree_manifest = scan_tree(&rootfs).at(&rootfs)?;
            tree_manifest.image = Some(image.clone());
            let bytes = serde_json::to_vec_pretty(&tree_manifest).unwrap_or_default();
            let mpath = staging.path().join("manifest.json");
            write_atomic(&mpath, &bytes).at(&mpath)?;
            // One sync for the whole tree instead of one per file.
            let f = File::open(&rootfs).at(&rootfs)?;
            rustix::fs::syncfs(&f)
                .map_err(io::Error::from)
                .at(&rootfs)?;
            Ok(tree_manifest)
        })();
        let tree_manifest = match result {
            Ok(m) => m,
            Err(e) => {
                let _ = remove_tree(staging.path());
                return Err(e);
            }
        };
        let staged = staging.keep();
        let dest = self.tree_dir(image);
        match fs::rename(&staged, &dest) {
            Ok(()) => {}
            // Another process materialized the same image meanwhile: theirs wins.
            Err(_) if dest.join("manifest.json").is_file() => {
                let _ = remove_tree(&staged);
            }
            Err(e) => {
                let _ = remove_tree(&staged);
                return Err(StoreError::Io {
                    path: dest,
                    source: e,
                }
                .into());
            }
        }
        let trees = self.root().join("trees");
        sync_dir(&trees).at(&trees)?;
        Ok(Tree {
            image: image.clone(),
            rootfs: dest.join("rootfs"),
            manifest: tree_manifest,
        })
    }

    /// Compare a materialized tree with its manifest.
    pub fn check_tree(&self, image: &Digest) -> Result<Vec<TreeDrift>> {
        let Some(tree) = self.tree(image)? else {
            return Ok(Vec::new());
        };
        let mut actual = scan_tree(&tree.rootfs).at(&tree.rootfs)?;
        actual.image = tree.manifest.image.clone();
        Ok(tree.manifest.diff(&actual))
    }

    /// Delete a materialized tree (its directories are read-only).
    pub fn remove_tree(&self, image: &Digest) -> Result<()> {
        let dir = self.tree_dir(image);
        remove_tree(&dir).at(&dir).map_err(Into::into)
    }
}

/// The manifest of whatever is at `root` now (files hashed on all cores).
pub fn scan_tree(root: &Path) -> io::Result<TreeManifest> {
    let mut paths: Vec<(String, fs::Metadata)> = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for name in names {
            let child = if rel.is_empty() {
                name.to_string_lossy().into_owned()
            } else {
                format!("{rel}/{}", name.to_string_lossy())
            };
            let meta = fs::symlink_metadata(root.join(&child))?;
            if meta.is_dir() {
                stack.push(child.clone());
            }
            paths.push((child, meta));
        }
    }
    let entries = paths
        .into_par_iter()
        .map(|(rel, meta)| {
            let ft = meta.file_type();
            let mode = meta.permissions().mode() & 0o7777;
            let entry = if ft.is_dir() {
                TreeEntry::Dir { mode }
            } else if ft.is_symlink() {
                TreeEntry::Symlink {
                    target: fs::read_link(root.join(&rel))?
                        .to_string_lossy()
                        .into_owned(),
                }
            } else if ft.is_file() {
                let (sha256, size) = hash_reader(&mut File::open(root.join(&rel))?)?;
                debug_assert_eq!(size, meta.size());
                TreeEntry::File { mode, size, sha256 }
            } else {
                TreeEntry::Special { mode }
            };
            Ok((rel, entry))
        })
        .collect::<io::Result<_>>()?;
    Ok(TreeManifest {
        image: None,
        entries,
    })
}
