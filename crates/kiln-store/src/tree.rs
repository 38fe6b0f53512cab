//! Read-only trees: each image's root filesystem, unpacked once per digest
//! under `trees/<hex>/rootfs`, with its per-file manifest in
//! `trees/<hex>/manifest.json`. Instances run from these trees; the drift
//! detector and `kiln verify` compare them against the manifest.
//!
//! A tree appears only complete: it is unpacked and scanned under `tmp/`,
//! synced once (syncfs, not an fsync per file), then renamed into place.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use kiln_core::Digest;
use kiln_core::tree::{TreeDrift, TreeEntry, TreeManifest};
use rayon::prelude::*;

use crate::fsutil::{remove_tree, sync_dir, write_atomic};
use crate::store::{IoContext, Store, StoreError, hash_reader_paced};
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
    pub fn trees(&self) -> Result<Vec<Digest>, StoreError> {
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
        let (staged, tree_manifest) = self.stage_tree(image)?;
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

    /// Unpack `image` into a staged directory under `tmp/` (its `rootfs`
    /// and `manifest.json`, synced), ready to be renamed into place.
    fn stage_tree(&self, image: &Digest) -> Result<(PathBuf, TreeManifest)> {
        let manifest = self.manifest(image)?;
        let config = self.config(&manifest)?;
        let tmp_root = self.root().join("tmp");
        let staging = tempfile::Builder::new()
            .prefix("tree-")
            .tempdir_in(&tmp_root)
            .at(&tmp_root)?;
        // Searchable by everyone (not listable): instances run as other
        // users than the agent and must reach `rootfs`.
        fs::set_permissions(staging.path(), fs::Permissions::from_mode(0o711)).at(staging.path())?;
        let rootfs = staging.path().join("rootfs");
        fs::create_dir(&rootfs).at(&rootfs)?;
        fs::set_permissions(&rootfs, fs::Permissions::from_mode(0o755)).at(&rootfs)?;
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
        match result {
            Ok(m) => Ok((staging.keep(), m)),
            Err(e) => {
                let _ = remove_tree(staging.path());
                Err(e)
            }
        }
    }

    /// Replace the tree of `image` (found drifted) with a fresh one made
    /// from its blobs, each checked against its digest first: the fresh
    /// tree is staged whole, then swapped in with one `RENAME_EXCHANGE`, so
    /// an instance starting meanwhile binds one tree or the other, never a
    /// missing one. The old tree is kept for inspection in
    /// `quarantine/HEX-UNIXTIME`, which this returns (`None` when there was
    /// no tree to replace). Instances already running keep what they have
    /// open or bound: their replacement is the agent's.
    pub fn replace_tree(&self, image: &Digest, now: SystemTime) -> Result<Option<PathBuf>> {
        let manifest = self.manifest(image)?;
        for d in std::iter::once(image)
            .chain(std::iter::once(&manifest.config.digest))
            .chain(manifest.layers.iter().map(|l| &l.digest))
        {
            self.check_blob(d)?;
        }
        let (staged, _) = self.stage_tree(image)?;
        let dest = self.tree_dir(image);
        if !dest.exists() {
            if let Err(e) = fs::rename(&staged, &dest) {
                let _ = remove_tree(&staged);
                return Err(StoreError::Io {
                    path: dest,
                    source: e,
                }
                .into());
            }
            return Ok(None);
        }
        if let Err(e) = rustix::fs::renameat_with(
            rustix::fs::CWD,
            &staged,
            rustix::fs::CWD,
            &dest,
            rustix::fs::RenameFlags::EXCHANGE,
        ) {
            let _ = remove_tree(&staged);
            return Err(StoreError::Io {
                path: dest,
                source: e.into(),
            }
            .into());
        }
        // `staged` now holds the drifted tree.
        let qdir = self.root().join("quarantine");
        fs::create_dir_all(&qdir).at(&qdir)?;
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut kept = qdir.join(format!("{}-{secs}", image.hex()));
        let mut n = 1;
        while kept.exists() {
            n += 1;
            kept = qdir.join(format!("{}-{secs}.{n}", image.hex()));
        }
        fs::rename(&staged, &kept).at(&kept)?;
        let trees = self.root().join("trees");
        sync_dir(&trees).at(&trees)?;
        Ok(Some(kept))
    }

    /// Compare only `paths` of the tree of `image` with its manifest (what
    /// a watch saw change): each path, and under a path that is a
    /// directory on one side only, everything below it. Quick: it hashes
    /// only the files named.
    pub fn check_paths(&self, image: &Digest, paths: &BTreeSet<String>) -> Result<Vec<TreeDrift>> {
        let Some(tree) = self.tree(image)? else {
            return Ok(Vec::new());
        };
        let mut want = TreeManifest::default();
        let mut got = TreeManifest::default();
        for path in paths.iter().filter(|p| !p.is_empty()) {
            let expected = tree.manifest.entries.get(path);
            let actual = entry_at(&tree.rootfs, path).at(&tree.rootfs)?;
            let is_dir = |e: Option<&TreeEntry>| matches!(e, Some(TreeEntry::Dir { .. }));
            if let Some(e) = expected {
                want.entries.insert(path.clone(), e.clone());
            }
            if is_dir(expected) && !is_dir(actual.as_ref()) {
                let below = format!("{path}/");
                for (p, e) in tree.manifest.entries.range(below.clone()..) {
                    if !p.starts_with(&below) {
                        break;
                    }
                    want.entries.insert(p.clone(), e.clone());
                }
            }
            if is_dir(actual.as_ref()) && !is_dir(expected) {
                let sub = scan_tree(&tree.rootfs.join(path)).at(&tree.rootfs)?;
                for (p, e) in sub.entries {
                    got.entries.insert(format!("{path}/{p}"), e);
                }
            }
            if let Some(e) = actual {
                got.entries.insert(path.clone(), e);
            }
        }
        Ok(want.diff(&got))
    }

    /// The whole tree of `image` against its manifest, one file after
    /// another, calling `pace` with each read's size (the agent's
    /// periodic verification sleeps there). `None`: not materialized.
    pub fn verify_tree_paced(
        &self,
        image: &Digest,
        pace: &mut dyn FnMut(u64),
    ) -> Result<Option<TreeCheck>> {
        let Some(tree) = self.tree(image)? else {
            return Ok(None);
        };
        let mut bytes = 0u64;
        let mut counted = |n: u64| {
            bytes += n;
            pace(n);
        };
        let mut actual = scan_tree_paced(&tree.rootfs, &mut counted).at(&tree.rootfs)?;
        actual.image = tree.manifest.image.clone();
        Ok(Some(TreeCheck {
            files: actual.file_count() as u64,
            drift: tree.manifest.diff(&actual),
            bytes,
        }))
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

    /// Delete a materialized tree (its directories are read-only). It
    /// leaves `trees/` in one rename first, so that the drift detector,
    /// which sees the deletions, finds no tree there to call drifted.
    pub fn remove_tree(&self, image: &Digest) -> Result<(), StoreError> {
        let dir = self.tree_dir(image);
        let tmp = self.root().join("tmp");
        let gone = tempfile::Builder::new()
            .prefix("gone-")
            .tempdir_in(&tmp)
            .at(&tmp)?
            .keep();
        let moved = gone.join("tree");
        match fs::rename(&dir, &moved) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                let _ = fs::remove_dir(&gone);
                return Err(StoreError::Io {
                    path: dir,
                    source: e,
                });
            }
        }
        remove_tree(&gone).at(&gone)
    }
}

/// What a full check of one tree found.
#[derive(Clone, Debug, Default)]
pub struct TreeCheck {
    pub drift: Vec<TreeDrift>,
    pub files: u64,
    pub bytes: u64,
}

/// The entry at `rel` under `root` now, if anything is there.
fn entry_at(root: &Path, rel: &str) -> io::Result<Option<TreeEntry>> {
    match fs::symlink_metadata(root.join(rel)) {
        Ok(meta) => entry_of(root, rel, &meta, &mut |_| {}).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The entry of `rel`, whose metadata is `meta` (a file hashed, `pace`
/// called with each read).
fn entry_of(
    root: &Path,
    rel: &str,
    meta: &fs::Metadata,
    pace: &mut dyn FnMut(u64),
) -> io::Result<TreeEntry> {
    let ft = meta.file_type();
    let mode = meta.permissions().mode() & 0o7777;
    Ok(if ft.is_dir() {
        TreeEntry::Dir { mode }
    } else if ft.is_symlink() {
        TreeEntry::Symlink {
            target: fs::read_link(root.join(rel))?
                .to_string_lossy()
                .into_owned(),
        }
    } else if ft.is_file() {
        let (sha256, size) = hash_reader_paced(&mut File::open(root.join(rel))?, pace)?;
        TreeEntry::File { mode, size, sha256 }
    } else {
        TreeEntry::Special { mode }
    })
}

/// [`scan_tree`] one file at a time, `pace` called with each read's size.
pub fn scan_tree_paced(root: &Path, pace: &mut dyn FnMut(u64)) -> io::Result<TreeManifest> {
    let mut entries = std::collections::BTreeMap::new();
    for (rel, meta) in walk(root)? {
        let entry = entry_of(root, &rel, &meta, pace)?;
        entries.insert(rel, entry);
    }
    Ok(TreeManifest {
        image: None,
        entries,
    })
}

/// Every path under `root` (relative, `/`-separated) with its metadata.
fn walk(root: &Path) -> io::Result<Vec<(String, fs::Metadata)>> {
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
    Ok(paths)
}

/// The manifest of whatever is at `root` now (files hashed on all cores).
pub fn scan_tree(root: &Path) -> io::Result<TreeManifest> {
    let entries = walk(root)?
        .into_par_iter()
        .map(|(rel, meta)| {
            let entry = entry_of(root, &rel, &meta, &mut |_| {})?;
            Ok((rel, entry))
        })
        .collect::<io::Result<_>>()?;
    Ok(TreeManifest {
        image: None,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bake::{BakeOptions, Quiet, bake_image};
    use kiln_core::reference::ImageName;

    /// A store with a materialized image of `app/a`, `app/b`, `app/sub/c`.
    fn tree() -> (tempfile::TempDir, Store, Digest, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let ctx = dir.path().join("ctx/app");
        fs::create_dir_all(ctx.join("sub")).unwrap();
        fs::write(ctx.join("a"), "a").unwrap();
        fs::write(ctx.join("b"), "b").unwrap();
        fs::write(ctx.join("sub/c"), "c").unwrap();
        let spec: kiln_core::spec::ImageSpec =
            serde_json::from_value(serde_json::json!({ "context": "ctx" })).unwrap();
        let image = bake_image(
            &store,
            dir.path(),
            &ImageName::try_from("app").unwrap(),
            &spec,
            &BakeOptions::default(),
            &Quiet,
        )
        .unwrap()
        .digest;
        let rootfs = store.materialize(&image).unwrap().rootfs;
        (dir, store, image, rootfs)
    }

    fn paths(p: &[&str]) -> BTreeSet<String> {
        p.iter().map(|s| (*s).to_owned()).collect()
    }

    fn listed(d: &[TreeDrift]) -> Vec<String> {
        d.iter().map(ToString::to_string).collect()
    }

    fn writable(p: &Path) {
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn a_targeted_check_names_what_changed_at_the_paths_given() {
        let (_dir, store, image, rootfs) = tree();
        let app = rootfs.join("app");
        assert!(
            store
                .check_paths(&image, &paths(&["app/a", "app/sub"]))
                .unwrap()
                .is_empty()
        );
        writable(&app);
        writable(&app.join("sub"));
        fs::set_permissions(app.join("a"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(app.join("a"), "edited").unwrap();
        fs::remove_file(app.join("b")).unwrap();
        fs::create_dir(app.join("new")).unwrap();
        fs::write(app.join("new/x"), "x").unwrap();
        // A directory moved away: everything under it is missing.
        fs::rename(app.join("sub"), rootfs.join("../moved")).unwrap();
        let found = store
            .check_paths(
                &image,
                &paths(&["app/a", "app/b", "app/new", "app/sub", "app"]),
            )
            .unwrap();
        assert_eq!(
            listed(&found),
            [
                "app: mode changed",
                "app/a: content changed",
                "app/b: missing",
                "app/new: not in the image",
                "app/new/x: not in the image",
                "app/sub: missing",
                "app/sub/c: missing",
            ]
        );
        // Only the paths given are looked at.
        assert_eq!(
            listed(&store.check_paths(&image, &paths(&["app/b"])).unwrap()),
            ["app/b: missing"]
        );
        // The paced full check finds the same, and counts what it read.
        let mut read = 0;
        let check = store
            .verify_tree_paced(&image, &mut |n| read += n)
            .unwrap()
            .unwrap();
        assert_eq!(listed(&check.drift), listed(&found));
        assert_eq!(check.bytes, read);
        assert_eq!(check.bytes, "edited".len() as u64 + 1);
    }

    #[test]
    fn a_drifted_tree_is_swapped_for_a_fresh_one_and_kept_in_quarantine() {
        let (_dir, store, image, rootfs) = tree();
        let app = rootfs.join("app");
        writable(&app);
        fs::set_permissions(app.join("a"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(app.join("a"), "edited").unwrap();
        let kept = store
            .replace_tree(
                &image,
                SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(7),
            )
            .unwrap()
            .unwrap();
        assert!(
            kept.ends_with(format!("quarantine/{}-7", image.hex())),
            "{kept:?}"
        );
        assert_eq!(fs::read(kept.join("rootfs/app/a")).unwrap(), b"edited");
        // The same path holds the fresh tree, as the image says.
        assert_eq!(fs::read(rootfs.join("app/a")).unwrap(), b"a");
        assert!(store.check_tree(&image).unwrap().is_empty());
        // A second quarantine in the same second gets a name of its own.
        let again = store
            .replace_tree(
                &image,
                SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(7),
            )
            .unwrap()
            .unwrap();
        assert_ne!(again, kept);
        assert!(fs::read_dir(store.root().join("tmp")).unwrap().all(|e| {
            !e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("tree-")
        }));
    }

    #[test]
    fn no_fresh_tree_is_made_from_a_corrupt_blob() {
        let (_dir, store, image, rootfs) = tree();
        let manifest = store.manifest(&image).unwrap();
        let layer = store
            .root()
            .join("blobs/sha256")
            .join(manifest.layers[0].digest.hex());
        let mut bytes = fs::read(&layer).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::set_permissions(&layer, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&layer, bytes).unwrap();
        let err = store.replace_tree(&image, SystemTime::now()).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
        // The tree there stays (the instances' replacement waits).
        assert_eq!(fs::read(rootfs.join("app/a")).unwrap(), b"a");
        assert!(!store.root().join("quarantine").exists());
    }
}
