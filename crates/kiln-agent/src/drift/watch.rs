//! The inotify side of the detector: one watch per directory of every
//! image tree (inotify does not recurse), plus one on the store's `trees/`
//! so that a tree materialized later is watched too. Reads turn the
//! kernel's events into paths of trees to check.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_core::Digest;
use kiln_core::tree::{TreeEntry, TreeManifest};
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::io::Errno;
use tokio::sync::mpsc;

/// What a read saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// Something at this path of an image's tree changed (a file written,
    /// its mode or owner changed, an entry created, removed or moved).
    Path(Digest, String),
    /// A tree appeared in or left the store.
    Trees,
    /// The kernel's queue overflowed: events were lost.
    Overflow,
}

/// One event as the kernel gave it: its watch, flags and entry name.
type Raw = (i32, ReadFlags, Option<String>);

pub struct Watcher {
    fd: Arc<OwnedFd>,
    /// Events from the reading thread.
    events: mpsc::UnboundedReceiver<std::io::Result<Raw>>,
    trees_dir: PathBuf,
    trees_wd: Option<i32>,
    /// Each watch: its tree and the directory (relative to the tree's root).
    wds: HashMap<i32, (Digest, String)>,
    by_tree: HashMap<Digest, TreeWatch>,
}

struct TreeWatch {
    wds: Vec<i32>,
    files: u64,
    unwatched: u64,
}

/// What a tree's directories are watched for: any change to an entry or to
/// the directory itself. Reads and opens are not watched (they change
/// nothing), so a busy instance costs the detector nothing.
fn mask() -> WatchFlags {
    WatchFlags::MODIFY
        | WatchFlags::ATTRIB
        | WatchFlags::CLOSE_WRITE
        | WatchFlags::CREATE
        | WatchFlags::DELETE
        | WatchFlags::DELETE_SELF
        | WatchFlags::MOVED_FROM
        | WatchFlags::MOVED_TO
        | WatchFlags::MOVE_SELF
        | WatchFlags::ONLYDIR
        | WatchFlags::DONT_FOLLOW
}

impl Watcher {
    /// An inotify instance watching `store_root/trees`, read by a thread
    /// of its own (a blocking read: no unsafe registration with the
    /// reactor, and nothing to poll).
    pub fn new(store_root: &Path) -> std::io::Result<Self> {
        let fd = inotify::init(CreateFlags::CLOEXEC)?;
        let trees_dir = store_root.join("trees");
        let trees_wd = inotify::add_watch(
            &fd,
            &trees_dir,
            WatchFlags::CREATE
                | WatchFlags::MOVED_TO
                | WatchFlags::MOVED_FROM
                | WatchFlags::DELETE
                | WatchFlags::ONLYDIR,
        )
        .ok();
        let fd = Arc::new(fd);
        let (tx, events) = mpsc::unbounded_channel();
        let reading = fd.clone();
        std::thread::Builder::new()
            .name("kiln-drift-watch".to_owned())
            .spawn(move || read_events(&reading, &tx))?;
        Ok(Self {
            fd,
            events,
            trees_dir,
            trees_wd,
            wds: HashMap::new(),
            by_tree: HashMap::new(),
        })
    }

    pub fn watches(&self, image: &Digest) -> bool {
        self.by_tree.contains_key(image)
    }

    pub fn images(&self) -> Vec<Digest> {
        self.by_tree.keys().cloned().collect()
    }

    /// Watch every directory of the tree at `rootfs` that its manifest
    /// lists. A directory that cannot be watched (gone: drift, which the
    /// returned path says; or past the user's watch limit) is counted and
    /// left to the full verification.
    pub fn watch_tree(
        &mut self,
        image: &Digest,
        rootfs: &Path,
        manifest: &TreeManifest,
    ) -> Vec<String> {
        self.unwatch_tree(image);
        let dirs = std::iter::once("").chain(
            manifest
                .entries
                .iter()
                .filter(|(_, e)| matches!(e, TreeEntry::Dir { .. }))
                .map(|(p, _)| p.as_str()),
        );
        let mut tw = TreeWatch {
            wds: Vec::new(),
            files: manifest.file_count() as u64,
            unwatched: 0,
        };
        let mut gone = Vec::new();
        for dir in dirs {
            match inotify::add_watch(&*self.fd, rootfs.join(dir), mask()) {
                Ok(wd) => {
                    self.wds.insert(wd, (image.clone(), dir.to_owned()));
                    tw.wds.push(wd);
                }
                Err(e) => {
                    if e == Errno::NOENT || e == Errno::NOTDIR {
                        gone.push(dir.to_owned());
                    } else {
                        tracing::warn!(
                            "drift: cannot watch {}: {e} (the full verification covers it)",
                            rootfs.join(dir).display()
                        );
                    }
                    tw.unwatched += 1;
                }
            }
        }
        self.by_tree.insert(image.clone(), tw);
        gone
    }

    pub fn unwatch_tree(&mut self, image: &Digest) {
        if let Some(tw) = self.by_tree.remove(image) {
            for wd in tw.wds {
                self.wds.remove(&wd);
                // Already gone with its directory: nothing to undo.
                let _ = inotify::remove_watch(&*self.fd, wd);
            }
        }
    }

    /// Trees, directories and files watched, and directories not.
    pub fn counts(&self) -> (u64, u64, u64, u64) {
        self.by_tree
            .values()
            .fold((0, 0, 0, 0), |(t, d, f, u), tw| {
                (
                    t + 1,
                    d + tw.wds.len() as u64,
                    f + tw.files,
                    u + tw.unwatched,
                )
            })
    }

    /// Wait for events, then take every one queued.
    pub async fn read(&mut self) -> std::io::Result<Vec<Seen>> {
        let Some(first) = self.events.recv().await else {
            return Err(std::io::Error::other("the watch's thread ended"));
        };
        let mut raw = vec![first?];
        while let Ok(more) = self.events.try_recv() {
            raw.push(more?);
        }
        let mut out = Vec::new();
        for (wd, flags, name) in raw {
            if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
                out.push(Seen::Overflow);
                continue;
            }
            if Some(wd) == self.trees_wd {
                out.push(Seen::Trees);
                continue;
            }
            let Some((image, dir)) = self.wds.get(&wd) else {
                continue;
            };
            let path = match name {
                Some(name) if dir.is_empty() => name,
                Some(name) => format!("{dir}/{name}"),
                None => dir.clone(),
            };
            out.push(Seen::Path(image.clone(), path));
            if flags.contains(ReadFlags::IGNORED) {
                // The kernel dropped the watch (its directory is gone).
                self.wds.remove(&wd);
            }
        }
        Ok(out)
    }

    pub fn trees_dir(&self) -> &Path {
        &self.trees_dir
    }
}

/// The reading thread: every event, until the detector is gone.
fn read_events(fd: &OwnedFd, tx: &mpsc::UnboundedSender<std::io::Result<Raw>>) {
    let mut buf = [MaybeUninit::<u8>::uninit(); 16 * 1024];
    let mut reader = inotify::Reader::new(fd, &mut buf);
    loop {
        let raw = match reader.next() {
            Ok(ev) => Ok((
                ev.wd(),
                ev.events(),
                ev.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .filter(|n| !n.is_empty()),
            )),
            Err(Errno::INTR) => continue,
            Err(e) => Err(e.into()),
        };
        let failed = raw.is_err();
        if tx.send(raw).is_err() || failed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    /// A store root with one tree (`trees/HEX/rootfs`: `a`, `d/b`) and its
    /// manifest, as the store scans it.
    fn tree(dir: &Path) -> (Digest, PathBuf, TreeManifest) {
        let image = Digest::of(b"image");
        let rootfs = dir.join("trees").join(image.hex()).join("rootfs");
        std::fs::create_dir_all(rootfs.join("d")).unwrap();
        std::fs::write(rootfs.join("a"), "a").unwrap();
        std::fs::write(rootfs.join("d/b"), "b").unwrap();
        let manifest = kiln_store::tree::scan_tree(&rootfs).unwrap();
        (image, rootfs, manifest)
    }

    /// Read until `want` is seen (or 5 s pass).
    async fn until(w: &mut Watcher, want: &Seen) -> Vec<Seen> {
        let mut all = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !all.contains(want) {
            match tokio::time::timeout_at(deadline, w.read()).await {
                Ok(seen) => all.extend(seen.unwrap()),
                Err(_) => panic!("{want:?} not seen; saw {all:?}"),
            }
        }
        all
    }

    #[tokio::test]
    async fn changes_anywhere_in_a_tree_are_seen_as_its_paths() {
        let dir = tempfile::tempdir().unwrap();
        let (image, rootfs, manifest) = tree(dir.path());
        let mut w = Watcher::new(dir.path()).unwrap();
        assert!(w.watch_tree(&image, &rootfs, &manifest).is_empty());
        assert_eq!(w.counts(), (1, 2, 2, 0));
        std::fs::write(rootfs.join("d/b"), "edited").unwrap();
        until(&mut w, &Seen::Path(image.clone(), "d/b".into())).await;
        std::fs::set_permissions(rootfs.join("a"), std::fs::Permissions::from_mode(0o600)).unwrap();
        until(&mut w, &Seen::Path(image.clone(), "a".into())).await;
        std::fs::write(rootfs.join("new"), "").unwrap();
        until(&mut w, &Seen::Path(image.clone(), "new".into())).await;
        std::fs::rename(rootfs.join("d/b"), rootfs.join("moved")).unwrap();
        until(&mut w, &Seen::Path(image.clone(), "d/b".into())).await;
        // A tree appearing in the store is news too.
        std::fs::create_dir(dir.path().join("trees/another")).unwrap();
        until(&mut w, &Seen::Trees).await;
        // Unwatched, a tree's changes are not seen.
        w.unwatch_tree(&image);
        assert_eq!(w.counts(), (0, 0, 0, 0));
        std::fs::write(rootfs.join("a"), "again").unwrap();
        std::fs::create_dir(dir.path().join("trees/more")).unwrap();
        let seen = until(&mut w, &Seen::Trees).await;
        assert!(
            !seen.iter().any(|s| matches!(s, Seen::Path(..))),
            "{seen:?}"
        );
    }

    #[tokio::test]
    async fn a_directory_already_gone_is_reported_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (image, rootfs, manifest) = tree(dir.path());
        std::fs::remove_dir_all(rootfs.join("d")).unwrap();
        let mut w = Watcher::new(dir.path()).unwrap();
        assert_eq!(w.watch_tree(&image, &rootfs, &manifest), ["d"]);
        assert_eq!(w.counts(), (1, 1, 2, 1));
    }
}
