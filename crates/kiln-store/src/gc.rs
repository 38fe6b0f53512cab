//! Garbage collection: what no kept image needs goes — blobs, their index
//! entries, their materialized trees, stale layer-cache entries and `tmp/`
//! leftovers — and nothing that a concurrent bake or pull is using.
//!
//! Kept: every image in `roots` (the agent's kept releases: what a
//! rollback may return to), every image with a tag the user gave, and
//! every blob younger than `grace` (a bake or pull in progress writes new
//! blobs), and every blob a live [`Lease`] lists (the old blobs a bake or
//! pull reuses, taken under the store lock the sweep also holds): a blob a
//! bake took is never removed, and a bake that finds its blob gone writes
//! it anew.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use kiln_core::Digest;
use kiln_core::reference::Tag;
use serde::Serialize;

use crate::fsutil::remove_tree;
use crate::store::{IoContext, Result, Store};

/// What a collection removed (or, dry, would remove).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// Images (manifests) removed, as `NAME@sha256:…`.
    pub images: Vec<String>,
    pub blobs: usize,
    pub trees: usize,
    pub tmp: usize,
    /// Bytes freed (blobs, trees and `tmp/`).
    pub freed_bytes: u64,
    /// Images kept, and why: roots (releases), tagged, young.
    pub kept_images: usize,
    /// Log files of instances gone for longer than the grace period
    /// (the agent's collection; the store has none).
    #[serde(default)]
    pub logs: usize,
}

/// How to collect.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Images that must stay whatever else holds (kept releases).
    pub roots: BTreeSet<Digest>,
    /// Anything younger stays.
    pub grace: Duration,
    pub dry_run: bool,
    /// The clock (passed in: tests move it).
    pub now: SystemTime,
}

/// What a bake or pull in progress uses: a file `tmp/lease-*`, locked for
/// as long as the lease lives, listing the blobs it took from the store. A
/// collection keeps every blob a live lease lists, and while any lease is
/// live it leaves `tmp/` alone (the lessee's blobs wait there until it
/// publishes). A lease whose lock nobody holds is a crashed process's:
/// removed.
pub struct Lease {
    file: fs::File,
    path: PathBuf,
    store: Store,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

impl Lease {
    /// Take blob `digest` from the store for this lease: true if it is
    /// there (and now kept for the lease's life), false if a collection
    /// removed it (write it again). Under the store lock, so a sweep sees
    /// the lease's entry, or this sees the sweep's removal.
    pub fn hold(&mut self, digest: &Digest) -> Result<bool> {
        let _lock = self.store.lock()?;
        if !self.store.has_blob(digest) {
            return Ok(false);
        }
        std::io::Write::write_all(&mut self.file, format!("{digest}\n").as_bytes())
            .at(&self.path)?;
        Ok(true)
    }
}

impl Store {
    /// A lease for a bake or pull (see [`Lease`]).
    pub fn lease(&self) -> Result<Lease> {
        let tmp = self.root().join("tmp");
        let (file, path) = tempfile::Builder::new()
            .prefix("lease-")
            .tempfile_in(&tmp)
            .at(&tmp)?
            .keep()
            .map_err(|e| e.error)
            .at(&tmp)?;
        file.try_lock().map_err(std::io::Error::other).at(&path)?;
        Ok(Lease {
            file,
            path,
            store: self.clone(),
        })
    }

    /// The blobs live leases hold, and whether any lease is live; stale
    /// leases are removed (unless `dry_run`). Called under the store lock.
    fn leased(&self, dry_run: bool) -> Result<(BTreeSet<Digest>, bool)> {
        let tmp = self.root().join("tmp");
        let mut held = BTreeSet::new();
        let mut any = false;
        for e in fs::read_dir(&tmp).at(&tmp)?.flatten() {
            if !e.file_name().to_string_lossy().starts_with("lease-") {
                continue;
            }
            let path = e.path();
            let Ok(f) = fs::File::open(&path) else {
                continue;
            };
            if f.try_lock_shared().is_ok() {
                // Nobody holds it: its process is gone.
                drop(f);
                if !dry_run {
                    let _ = fs::remove_file(&path);
                }
                continue;
            }
            any = true;
            let text = fs::read_to_string(&path).unwrap_or_default();
            held.extend(text.lines().filter_map(|l| l.parse::<Digest>().ok()));
        }
        Ok((held, any))
    }

    /// Set a blob's time to now: it counts as young for a collection's
    /// grace period (an image just published).
    pub(crate) fn touch(&self, digest: &Digest) -> Result<()> {
        let path = self.blob_path(digest);
        fs::File::open(&path)
            .and_then(|f| f.set_modified(SystemTime::now()))
            .at(&path)
    }

    /// Collect: see the module's comment.
    pub fn gc(&self, options: &GcOptions) -> Result<GcReport> {
        let _lock = self.lock()?;
        let young = |p: &Path| -> bool {
            fs::symlink_metadata(p)
                .and_then(|m| m.modified())
                .map(|t| options.now.duration_since(t).unwrap_or_default() < options.grace)
                // Unreadable: keep it.
                .unwrap_or(true)
        };
        let mut index = self.index()?;
        // Which images stay.
        let mut keep: BTreeSet<Digest> = options.roots.clone();
        for d in &index.manifests {
            let user_tag = d
                .annotations
                .get(kiln_core::oci::ANNOTATION_REF_NAME)
                .and_then(|r| r.split_once(':'))
                .is_some_and(|(_, tag)| Tag::automatic(&d.digest).as_str() != tag);
            if user_tag || young(&self.blob_path(&d.digest)) {
                keep.insert(d.digest.clone());
            }
        }
        // The referrers of what stays stay (an image's signatures).
        let kept_images: Vec<Digest> = keep.iter().cloned().collect();
        for image in &kept_images {
            for (r, _) in self.referrers(image)? {
                keep.insert(r.digest);
            }
        }
        // What they need, and what bakes and pulls in progress hold.
        let (leased, leases_live) = self.leased(options.dry_run)?;
        let mut live: BTreeSet<Digest> = leased;
        for image in &keep {
            live.insert(image.clone());
            if let Ok(m) = self.manifest(image) {
                live.insert(m.config.digest.clone());
                live.extend(m.layers.iter().map(|l| l.digest.clone()));
            }
        }
        let mut report = GcReport {
            dry_run: options.dry_run,
            // Images only: their referrers (signatures, provenance: index
            // entries without a name) are kept with them, not counted.
            kept_images: keep
                .iter()
                .filter(|d| {
                    options.roots.contains(d)
                        || index.manifests.iter().any(|m| {
                            &m.digest == *d
                                && m.annotations
                                    .contains_key(kiln_core::oci::ANNOTATION_REF_NAME)
                        })
                })
                .count(),
            ..GcReport::default()
        };
        // Images that go: their index entries, then their trees.
        let gone: BTreeSet<Digest> = index
            .manifests
            .iter()
            .map(|d| d.digest.clone())
            .filter(|d| !keep.contains(d))
            .collect();
        for d in &index.manifests {
            // Images are listed; an untagged entry is a referrer (a
            // signature, a provenance statement) and goes with its image.
            let Some((name, _)) = d
                .annotations
                .get(kiln_core::oci::ANNOTATION_REF_NAME)
                .and_then(|r| r.split_once(':'))
            else {
                continue;
            };
            if gone.contains(&d.digest) {
                let pinned = format!("{name}@{}", d.digest);
                if !report.images.contains(&pinned) {
                    report.images.push(pinned);
                }
            }
        }
        if !options.dry_run && !gone.is_empty() {
            index.manifests.retain(|d| !gone.contains(&d.digest));
            self.write_index(&index)?;
        }
        for tree in self.trees()? {
            if keep.contains(&tree) {
                continue;
            }
            let dir = self.root().join("trees").join(tree.hex());
            report.trees += 1;
            report.freed_bytes += du(&dir);
            if !options.dry_run {
                self.remove_tree(&tree)?;
            }
        }
        // Trees the drift detector set aside, once past the grace period
        // (kept that long to be looked at).
        let quarantine = self.root().join("quarantine");
        if let Ok(entries) = fs::read_dir(&quarantine) {
            for e in entries.flatten() {
                let path = e.path();
                if young(&path) {
                    continue;
                }
                report.trees += 1;
                report.freed_bytes += du(&path);
                if !options.dry_run {
                    remove_tree(&path).at(&path)?;
                }
            }
        }
        // Blobs no kept image needs, unless young.
        let blobs = self.root().join("blobs/sha256");
        for e in fs::read_dir(&blobs).at(&blobs)?.flatten() {
            let Ok(digest) = Digest::from_hex(&e.file_name().to_string_lossy()) else {
                continue;
            };
            let path = e.path();
            if live.contains(&digest) || young(&path) {
                continue;
            }
            report.blobs += 1;
            report.freed_bytes += e.metadata().map_or(0, |m| m.len());
            if !options.dry_run {
                fs::remove_file(&path).at(&path)?;
            }
        }
        // `tmp/` leftovers of a crash (anything old there is no one's,
        // once no bake or pull is running: theirs wait there).
        let tmp = self.root().join("tmp");
        for e in fs::read_dir(&tmp).at(&tmp)?.flatten() {
            let path = e.path();
            if leases_live || young(&path) {
                continue;
            }
            report.tmp += 1;
            report.freed_bytes += du(&path);
            if !options.dry_run {
                if path.is_dir() {
                    remove_tree(&path).at(&path)?;
                } else {
                    fs::remove_file(&path).at(&path)?;
                }
            }
        }
        if !options.dry_run {
            self.prune_layer_cache()?;
            // Member lists of layers that are gone.
            let members = self.cache_dir().join("members");
            for e in fs::read_dir(&members).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let gone = name
                    .strip_suffix(".json")
                    .and_then(|h| Digest::from_hex(h).ok())
                    .is_none_or(|d| !self.has_blob(&d));
                if gone {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(report)
    }

    /// Drop the layer cache's entries whose blob is gone.
    fn prune_layer_cache(&self) -> Result<()> {
        let path = self.cache_dir().join("layers.json");
        let Ok(bytes) = fs::read(&path) else {
            return Ok(());
        };
        let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            return Ok(());
        };
        let Some(entries) = v.get_mut("layers").and_then(|l| l.as_object_mut()) else {
            return Ok(());
        };
        let before = entries.len();
        entries.retain(|_, e| {
            e.get("digest")
                .and_then(|d| d.as_str())
                .and_then(|d| d.parse::<Digest>().ok())
                .is_some_and(|d| self.has_blob(&d))
        });
        if entries.len() != before {
            let bytes = serde_json::to_vec(&v).unwrap_or_default();
            crate::fsutil::write_atomic(&path, &bytes).at(&path)?;
        }
        Ok(())
    }
}

/// Bytes under `path` (a file, or a tree walked without following links).
fn du(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    let mut total = 0;
    let mut stack: Vec<PathBuf> = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(_) => total += e.metadata().map_or(0, |m| m.len()),
                Err(_) => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bake::{BakeOptions, Quiet, bake_image};
    use kiln_core::reference::ImageName;

    /// Bake a one-file image named `name` from `content`; its digest.
    fn bake(store: &Store, dir: &Path, name: &str, content: &str, tags: &[&str]) -> Digest {
        let app = dir.join(name);
        fs::create_dir_all(&app).unwrap();
        fs::write(app.join("file"), content).unwrap();
        let spec: kiln_core::spec::ImageSpec =
            serde_json::from_value(serde_json::json!({ "context": name })).unwrap();
        let options = BakeOptions {
            tags: tags.iter().map(|t| Tag::try_from(*t).unwrap()).collect(),
            ..BakeOptions::default()
        };
        bake_image(
            store,
            dir,
            &ImageName::try_from(name).unwrap(),
            &spec,
            &options,
            &Quiet,
        )
        .unwrap()
        .digest
    }

    fn later() -> SystemTime {
        SystemTime::now() + Duration::from_secs(7200)
    }

    #[test]
    fn roots_and_tagged_images_stay_the_rest_goes_and_dry_runs_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let tagged = bake(&store, dir.path(), "tagged", "t", &["v1"]);
        let root = bake(&store, dir.path(), "root", "r", &[]);
        let junk = bake(&store, dir.path(), "junk", "j", &[]);
        store.materialize(&junk).unwrap();
        fs::write(store.root().join("tmp/blob-leftover"), b"x").unwrap();
        let options = |dry_run| GcOptions {
            roots: BTreeSet::from([root.clone()]),
            grace: Duration::from_secs(3600),
            dry_run,
            now: later(),
        };
        let dry = store.gc(&options(true)).unwrap();
        assert_eq!(dry.images, [format!("junk@{junk}")]);
        assert!(store.has_blob(&junk), "a dry run removes nothing");
        assert_eq!(store.trees().unwrap(), std::slice::from_ref(&junk));
        let done = store.gc(&options(false)).unwrap();
        assert_eq!(
            (done.images.clone(), done.trees, done.tmp),
            (dry.images.clone(), 1, 1)
        );
        assert_eq!(done.blobs, dry.blobs);
        assert_eq!(done.kept_images, 2, "{done:?}");
        assert!(
            done.blobs >= 2,
            "its manifest and config (and its layer): {done:?}"
        );
        assert!(!store.has_blob(&junk));
        assert!(store.trees().unwrap().is_empty());
        for kept in [&tagged, &root] {
            let m = store.manifest(kept).unwrap();
            assert!(store.has_blob(&m.config.digest));
            assert!(m.layers.iter().all(|l| store.has_blob(&l.digest)));
        }
        let names: Vec<String> = store
            .images()
            .unwrap()
            .iter()
            .map(|r| r.name.to_string())
            .collect();
        assert_eq!(names, ["tagged", "root"]);
        // Within the grace period nothing goes.
        let fresh = bake(&store, dir.path(), "fresh", "f", &[]);
        let r = store
            .gc(&GcOptions {
                roots: BTreeSet::new(),
                grace: Duration::from_secs(3600),
                dry_run: false,
                now: SystemTime::now(),
            })
            .unwrap();
        assert!(r.images.is_empty() && store.has_blob(&fresh), "{r:?}");
        // Images counted, not their provenance statements (young index
        // entries without a name, kept with them).
        assert!(
            !store.referrers(&fresh).unwrap().is_empty(),
            "a bake keeps a provenance referrer"
        );
        assert_eq!(r.kept_images, 3, "tagged, root and fresh: {r:?}");
    }

    /// A blob a lease holds survives any collection; once the lease is
    /// gone (its process ended), it is collected like any other.
    #[test]
    fn a_leased_blob_stays_until_its_lease_ends() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let old = bake(&store, dir.path(), "old", "o", &[]);
        let layer = store.manifest(&old).unwrap().layers[0].digest.clone();
        let mut lease = store.lease().unwrap();
        assert!(lease.hold(&layer).unwrap());
        let options = GcOptions {
            roots: BTreeSet::new(),
            grace: Duration::ZERO,
            dry_run: false,
            now: later(),
        };
        store.gc(&options).unwrap();
        assert!(!store.has_blob(&old), "the image went");
        assert!(store.has_blob(&layer), "the leased layer stayed");
        drop(lease);
        store.gc(&options).unwrap();
        assert!(!store.has_blob(&layer));
        // A held blob that is gone says so: the bake writes it again.
        let mut lease = store.lease().unwrap();
        assert!(!lease.hold(&layer).unwrap());
    }
}
