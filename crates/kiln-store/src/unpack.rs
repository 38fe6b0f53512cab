//! Unpacking image layers into a directory, treating every layer as hostile.
//!
//! Refused: absolute paths, `..` components, symlinks whose target climbs
//! out of the root, hardlinks to anything but a regular file already in the
//! tree, device nodes, pipes and sockets. Stripped: setuid, setgid and sticky
//! bits, ownership, xattrs. Parent directories are resolved inside the root
//! (symlinks followed lexically and clamped at the root, as `securejoin`
//! does), so no write ever lands outside it. Every layer is checked against
//! its digest and its `diff_id` as it streams. OCI whiteouts are applied;
//! a whiteout whose target is empty, `.` or `..` is refused. Directory modes
//! are applied last through descriptors opened one component at a time with
//! `O_NOFOLLOW`, and a pending mode is forgotten when its path is replaced,
//! so a later symlink at a directory's path cannot redirect its `chmod` out
//! of the root. A layer may unpack to at most [`layer_limit`] bytes of tar
//! (a decompression bomb is refused, not written).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_core::Digest;
use kiln_core::layer::{PathError, clean_entry_path, link_escapes};
use kiln_core::oci::{ImageConfig, LayerCompression, Manifest};

use crate::store::{HashingReader, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer {layer}: refused entry: {source}")]
    Path { layer: Digest, source: PathError },
    #[error("layer {layer}: refused entry `{path}`: {kind} entries are not allowed")]
    Forbidden {
        layer: Digest,
        path: String,
        kind: &'static str,
    },
    #[error("layer {layer}: refused symlink `{path}`: its target `{target}` is outside the root")]
    LinkEscapes {
        layer: Digest,
        path: String,
        target: String,
    },
    #[error(
        "layer {layer}: refused hardlink `{path}`: its target `{target}` is not a regular file already in the image"
    )]
    BadHardlink {
        layer: Digest,
        path: String,
        target: String,
    },
    #[error("layer {layer}: `{path}` needs a directory where the image has a non-directory")]
    NotADirectory { layer: Digest, path: String },
    #[error("layer {layer} has media type `{media_type}`, which kiln cannot unpack")]
    MediaType { layer: Digest, media_type: String },
    #[error("layer {layer} does not match its digest: its content hashes to {actual}")]
    LayerDigest { layer: Digest, actual: Digest },
    #[error("layer {layer} does not match its diff_id {expected}: it unpacks to {actual}")]
    DiffId {
        layer: Digest,
        expected: Digest,
        actual: Digest,
    },
    #[error("layer {layer}: refused whiteout `{path}`: it names no entry of a lower layer")]
    Whiteout { layer: Digest, path: String },
    #[error(
        "layer {layer} unpacks to more than {limit} bytes ({ratio}× its compressed size, at least {floor} MiB): refused as a decompression bomb",
        ratio = LAYER_RATIO, floor = LAYER_FLOOR >> 20
    )]
    TooLarge { layer: Digest, limit: u64 },
    #[error("image manifest lists {layers} layers but its config lists {diff_ids} diff_ids")]
    LayerCount { layers: usize, diff_ids: usize },
    #[error("layer {layer}: {source}")]
    Read { layer: Digest, source: io::Error },
    #[error("{path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type Result<T, E = UnpackError> = std::result::Result<T, E>;

/// How many times its compressed size a layer may expand to. gzip cannot
/// exceed about 1,032×; real layers are 2–10×, and a layer of zero-filled
/// files a few hundred.
pub const LAYER_RATIO: u64 = 256;
/// The least any layer may expand to, whatever its compressed size.
pub const LAYER_FLOOR: u64 = 256 << 20;

/// The most bytes of tar a layer of `compressed` bytes may unpack to.
pub fn layer_limit(compressed: u64) -> u64 {
    compressed.saturating_mul(LAYER_RATIO).max(LAYER_FLOOR)
}

/// Directory modes waiting to be applied once every layer is unpacked, by
/// host path (as resolved inside the root when the directory was made).
#[derive(Debug, Default)]
pub struct DirModes(BTreeMap<PathBuf, u32>);

impl DirModes {
    fn set(&mut self, path: PathBuf, mode: u32) {
        self.0.insert(path, mode);
    }

    /// Forget `path` and everything below it: it was removed or replaced,
    /// and its mode must not land on whatever takes its place.
    fn forget(&mut self, path: &Path) {
        // Path order is by component, so `path`'s descendants follow it.
        let gone: Vec<PathBuf> = self
            .0
            .range(path.to_path_buf()..)
            .take_while(|(p, _)| p.starts_with(path))
            .map(|(p, _)| p.clone())
            .collect();
        for p in gone {
            self.0.remove(&p);
        }
    }

    /// Apply every mode, deepest first (a read-only directory cannot
    /// receive its children), never following a symlink: a directory whose
    /// path now crosses one is skipped.
    pub fn apply(&self, root: &Path, read_only: bool) -> Result<()> {
        for (path, mode) in self.0.iter().rev() {
            let mode = if read_only { mode & !0o222 } else { *mode };
            chmod_dir_no_follow(root, path, mode).map_err(|source| UnpackError::Write {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

/// `chmod` the directory at `path` (under `root`) through a descriptor
/// reached one component at a time with `O_NOFOLLOW`; a path that crosses a
/// symlink or no longer names a directory is left alone.
fn chmod_dir_no_follow(root: &Path, path: &Path, mode: u32) -> io::Result<()> {
    use rustix::fs::{Mode, OFlags, fchmod, open, openat};
    use rustix::io::Errno;
    let rel = path
        .strip_prefix(root)
        .map_err(|_| io::Error::other("a directory outside the root"))?;
    let walk = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut dir = open(root, walk, Mode::empty())?;
    let mut parts = rel.components().peekable();
    while let Some(c) = parts.next() {
        let last = parts.peek().is_none();
        let flags = if last {
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
        } else {
            walk
        };
        dir = match openat(&dir, c.as_os_str(), flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::LOOP | Errno::NOTDIR | Errno::NOENT) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
    }
    fchmod(&dir, Mode::from_raw_mode(mode)).map_err(io::Error::from)
}

/// A reader that fails once more than `limit` bytes went through it.
struct Capped<R> {
    inner: R,
    left: u64,
}

/// The error a [`Capped`] reader fails with, found again by downcasting.
#[derive(Debug, thiserror::Error)]
#[error("layer expands past its limit")]
struct Expanded;

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self
            .left
            .checked_sub(n as u64)
            .ok_or_else(|| io::Error::other(Expanded))?;
        Ok(n)
    }
}

fn expanded(e: &UnpackError) -> bool {
    let io = match e {
        UnpackError::Read { source, .. } | UnpackError::Write { source, .. } => source,
        _ => return false,
    };
    io.get_ref().is_some_and(|inner| inner.is::<Expanded>())
}

#[derive(Clone, Copy, Debug, Default)]
pub struct UnpackOptions {
    /// Clear every write bit (files and directories) once unpacked.
    pub read_only: bool,
}

/// Unpack every layer of an image into `dest`, an existing empty directory.
pub fn unpack_image(
    store: &Store,
    manifest: &Manifest,
    config: &ImageConfig,
    dest: &Path,
    options: UnpackOptions,
) -> Result<()> {
    if manifest.layers.len() != config.rootfs.diff_ids.len() {
        return Err(UnpackError::LayerCount {
            layers: manifest.layers.len(),
            diff_ids: config.rootfs.diff_ids.len(),
        });
    }
    let mut dir_modes = DirModes::default();
    for (layer, diff_id) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
        let compression =
            LayerCompression::from_media_type(&layer.media_type).ok_or_else(|| {
                UnpackError::MediaType {
                    layer: layer.digest.clone(),
                    media_type: layer.media_type.clone(),
                }
            })?;
        let blob = store.open_blob(&layer.digest)?;
        let size = blob
            .metadata()
            .map_err(|source| UnpackError::Read {
                layer: layer.digest.clone(),
                source,
            })?
            .len();
        apply_layer(
            blob,
            compression,
            &layer.digest,
            diff_id,
            dest,
            options,
            layer_limit(size),
            &mut dir_modes,
        )?;
    }
    dir_modes.apply(dest, options.read_only)
}

/// Apply one layer (a tar stream, maybe gzip-compressed) onto `root`,
/// reading at most `limit` bytes of tar.
#[allow(clippy::too_many_arguments)]
pub fn apply_layer(
    blob: impl Read,
    compression: LayerCompression,
    digest: &Digest,
    diff_id: &Digest,
    root: &Path,
    options: UnpackOptions,
    limit: u64,
    dir_modes: &mut DirModes,
) -> Result<()> {
    apply_layer_capped(
        blob,
        compression,
        digest,
        diff_id,
        root,
        options,
        limit,
        dir_modes,
    )
    .map_err(|e| {
        if expanded(&e) {
            UnpackError::TooLarge {
                layer: digest.clone(),
                limit,
            }
        } else {
            e
        }
    })
}

#[allow(clippy::too_many_arguments)]
fn apply_layer_capped(
    blob: impl Read,
    compression: LayerCompression,
    digest: &Digest,
    diff_id: &Digest,
    root: &Path,
    options: UnpackOptions,
    limit: u64,
    dir_modes: &mut DirModes,
) -> Result<()> {
    let read_err = |source| UnpackError::Read {
        layer: digest.clone(),
        source,
    };
    let mut compressed = HashingReader::new(blob);
    {
        let decoder = decompress(compression, &mut compressed).map_err(read_err)?;
        let mut raw = HashingReader::new(Capped {
            inner: decoder,
            left: limit,
        });
        {
            let mut archive = tar::Archive::new(&mut raw);
            let mut layer = LayerApplier {
                root,
                digest,
                options,
                created: HashSet::new(),
                dir_modes,
            };
            for entry in archive.entries().map_err(read_err)? {
                let entry = entry.map_err(read_err)?;
                layer.apply(entry)?;
            }
        }
        // The tar reader stops at the end marker; hash the rest too.
        io::copy(&mut raw, &mut io::sink()).map_err(read_err)?;
        let actual = raw.digest();
        if &actual != diff_id {
            return Err(UnpackError::DiffId {
                layer: digest.clone(),
                expected: diff_id.clone(),
                actual,
            });
        }
    }
    io::copy(&mut compressed, &mut io::sink()).map_err(read_err)?;
    let actual = compressed.digest();
    if &actual != digest {
        return Err(UnpackError::LayerDigest {
            layer: digest.clone(),
            actual,
        });
    }
    Ok(())
}

struct LayerApplier<'a> {
    root: &'a Path,
    digest: &'a Digest,
    options: UnpackOptions,
    /// Paths this layer wrote: whiteouts apply only to lower layers.
    created: HashSet<String>,
    dir_modes: &'a mut DirModes,
}

impl LayerApplier<'_> {
    fn apply<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<()> {
        let raw_path = entry.path_bytes().into_owned();
        let rel = clean_entry_path(&raw_path).map_err(|source| UnpackError::Path {
            layer: self.digest.clone(),
            source,
        })?;
        let kind = entry.header().entry_type();
        let forbidden = |kind: &'static str| UnpackError::Forbidden {
            layer: self.digest.clone(),
            path: rel.clone(),
            kind,
        };
        match kind {
            tar::EntryType::Char | tar::EntryType::Block => return Err(forbidden("device node")),
            tar::EntryType::Fifo => return Err(forbidden("named pipe")),
            tar::EntryType::GNUSparse => return Err(forbidden("sparse file")),
            _ => {}
        }
        if rel.is_empty() {
            return Ok(()); // the root itself
        }
        let (parent_rel, name) = rel.rsplit_once('/').unwrap_or(("", rel.as_str()));

        // Whiteouts.
        if let Some(hidden) = name.strip_prefix(".wh.") {
            // `.wh.`, `.wh..` and `.wh...` would remove the directory
            // itself or the one above it: above the root, that is the
            // caller's.
            if matches!(hidden, "" | "." | "..") {
                return Err(UnpackError::Whiteout {
                    layer: self.digest.clone(),
                    path: rel,
                });
            }
            let parent = self.resolve_dir(parent_rel, true)?;
            if hidden == ".wh..opq" {
                let children = fs::read_dir(&parent).map_err(|e| self.write_err(&parent, e))?;
                for child in children.flatten() {
                    let child_rel = join_rel(parent_rel, &child.file_name().to_string_lossy());
                    if !self.created.contains(&child_rel) {
                        self.remove(&child.path())?;
                    }
                }
            } else {
                let target_rel = join_rel(parent_rel, hidden);
                if !self.created.contains(&target_rel) {
                    self.remove(&parent.join(hidden))?;
                }
            }
            return Ok(());
        }

        let parent = self.resolve_dir(parent_rel, true)?;
        let dest = parent.join(name);
        let existing = fs::symlink_metadata(&dest).ok();
        let mode = entry.header().mode().map_err(|source| UnpackError::Read {
            layer: self.digest.clone(),
            source,
        })?;
        match kind {
            tar::EntryType::Directory => {
                match existing {
                    Some(m) if m.is_dir() => {}
                    Some(_) => {
                        self.remove(&dest)?;
                        self.mkdir(&dest)?;
                    }
                    None => self.mkdir(&dest)?,
                }
                // setuid/setgid are dropped; the sticky bit is kept for
                // directories like /tmp.
                self.dir_modes.set(dest, mode & 0o1777);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if existing.is_some() {
                    self.remove(&dest)?;
                }
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&dest)
                    .map_err(|e| self.write_err(&dest, e))?;
                io::copy(&mut entry, &mut f).map_err(|e| self.write_err(&dest, e))?;
                let mut mode = mode & 0o777;
                if self.options.read_only {
                    mode &= !0o222;
                }
                f.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(|e| self.write_err(&dest, e))?;
            }
            tar::EntryType::Symlink => {
                let target = link_target(&entry)
                    .ok_or_else(|| forbidden("symlink without a UTF-8 target"))?;
                if link_escapes(&rel, &target, false) {
                    return Err(UnpackError::LinkEscapes {
                        layer: self.digest.clone(),
                        path: rel,
                        target,
                    });
                }
                if existing.is_some() {
                    self.remove(&dest)?;
                }
                std::os::unix::fs::symlink(&target, &dest).map_err(|e| self.write_err(&dest, e))?;
            }
            tar::EntryType::Link => {
                let bad = |target: String| UnpackError::BadHardlink {
                    layer: self.digest.clone(),
                    path: rel.clone(),
                    target,
                };
                let raw = entry
                    .link_name_bytes()
                    .map(|b| b.into_owned())
                    .unwrap_or_default();
                let target_rel = clean_entry_path(&raw)
                    .map_err(|_| bad(String::from_utf8_lossy(&raw).into_owned()))?;
                let (tp, tn) = target_rel
                    .rsplit_once('/')
                    .unwrap_or(("", target_rel.as_str()));
                let source = self
                    .resolve_dir(tp, false)
                    .map_err(|_| bad(target_rel.clone()))?
                    .join(tn);
                match fs::symlink_metadata(&source) {
                    Ok(m) if m.is_file() && !tn.is_empty() => {}
                    _ => return Err(bad(target_rel)),
                }
                if existing.is_some() {
                    self.remove(&dest)?;
                }
                fs::hard_link(&source, &dest).map_err(|e| self.write_err(&dest, e))?;
            }
            // PAX and GNU long-name headers are consumed by the tar reader;
            // anything else left is unknown and refused.
            _ => return Err(forbidden("unknown")),
        }
        self.created.insert(rel);
        Ok(())
    }

    /// Remove whatever is at `path` (never following a symlink there) and
    /// forget the modes pending for it and below it.
    fn remove(&mut self, path: &Path) -> Result<()> {
        self.dir_modes.forget(path);
        remove_any(path).map_err(|e| self.write_err(path, e))
    }

    fn mkdir(&self, path: &Path) -> Result<()> {
        fs::DirBuilder::new()
            .mode(0o755)
            .create(path)
            .map_err(|e| self.write_err(path, e))
    }

    fn write_err(&self, path: &Path, source: io::Error) -> UnpackError {
        UnpackError::Write {
            path: path.to_path_buf(),
            source,
        }
    }

    /// The host path of directory `rel` inside the root, following symlinks
    /// as the image would see them (absolute targets from the image root, `..`
    /// clamped at the root). Missing directories are created when `create`.
    fn resolve_dir(&self, rel: &str, create: bool) -> Result<PathBuf> {
        let mut resolved: Vec<String> = Vec::new();
        let mut queue: VecDeque<String> = rel
            .split('/')
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect();
        let mut links = 0;
        let not_dir = || UnpackError::NotADirectory {
            layer: self.digest.clone(),
            path: rel.to_owned(),
        };
        while let Some(c) = queue.pop_front() {
            match c.as_str() {
                "" | "." => continue,
                ".." => {
                    resolved.pop();
                    continue;
                }
                _ => {}
            }
            let here = self.root.join(resolved.join("/")).join(&c);
            match fs::symlink_metadata(&here) {
                Ok(m) if m.file_type().is_symlink() => {
                    links += 1;
                    if links > 40 {
                        return Err(not_dir());
                    }
                    let target = fs::read_link(&here).map_err(|e| self.write_err(&here, e))?;
                    let target = target.to_string_lossy();
                    if target.starts_with('/') {
                        resolved.clear();
                    }
                    for part in target.split('/').rev() {
                        queue.push_front(part.to_owned());
                    }
                }
                Ok(m) if m.is_dir() => resolved.push(c),
                Ok(_) => return Err(not_dir()),
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    self.mkdir(&here)?;
                    resolved.push(c);
                }
                Err(e) => return Err(self.write_err(&here, e)),
            }
        }
        Ok(self.root.join(resolved.join("/")))
    }
}

fn link_target<R: Read>(entry: &tar::Entry<'_, R>) -> Option<String> {
    let raw = entry.link_name_bytes()?;
    let s = std::str::from_utf8(&raw).ok()?;
    (!s.is_empty() && !s.contains('\0')).then(|| s.to_owned())
}

fn join_rel(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}/{name}")
    }
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => crate::fsutil::remove_tree(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Convenience for tests and tools: unpack a single uncompressed tar whose
/// digest is not known in advance, with the same checks.
pub fn unpack_tar(tar: &[u8], root: &Path, options: UnpackOptions) -> Result<()> {
    let digest = Digest::of(tar);
    let mut dir_modes = DirModes::default();
    apply_layer(
        tar,
        LayerCompression::None,
        &digest,
        &digest,
        root,
        options,
        layer_limit(tar.len() as u64),
        &mut dir_modes,
    )?;
    dir_modes.apply(root, options.read_only)
}

/// A layer's bytes decompressed as its media type says (gzip members,
/// zstd frames, or plain tar).
pub fn decompress<'a, R: Read + 'a>(
    compression: LayerCompression,
    r: R,
) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match compression {
        LayerCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
        LayerCompression::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
        LayerCompression::None => Box::new(r),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A raw tar entry: the name is written as-is (the `tar` builder refuses
    /// `..` and absolute paths, which is exactly what these tests need).
    fn entry(
        out: &mut Vec<u8>,
        name: &str,
        kind: tar::EntryType,
        mode: u32,
        link: &str,
        data: &[u8],
    ) {
        let mut h = tar::Header::new_gnu();
        {
            let raw = h.as_old_mut();
            raw.name[..name.len()].copy_from_slice(name.as_bytes());
            raw.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }

    fn finish(mut tar: Vec<u8>) -> Vec<u8> {
        tar.extend_from_slice(&[0u8; 1024]);
        tar
    }

    fn file(out: &mut Vec<u8>, name: &str, data: &[u8]) {
        entry(out, name, tar::EntryType::Regular, 0o644, "", data);
    }

    fn unpack(tar: Vec<u8>) -> (tempfile::TempDir, Result<()>) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let r = unpack_tar(&finish(tar), &root, UnpackOptions::default());
        (dir, r)
    }

    #[test]
    fn refuses_parent_components() {
        let mut t = Vec::new();
        file(&mut t, "a/../../escaped", b"x");
        let (dir, r) = unpack(t);
        assert!(
            matches!(
                r,
                Err(UnpackError::Path {
                    source: PathError::ParentComponent(_),
                    ..
                })
            ),
            "{r:?}"
        );
        assert!(!dir.path().join("escaped").exists());
    }

    #[test]
    fn refuses_absolute_paths() {
        let mut t = Vec::new();
        file(&mut t, "/tmp/kiln-absolute-escape", b"x");
        let (_dir, r) = unpack(t);
        assert!(
            matches!(
                r,
                Err(UnpackError::Path {
                    source: PathError::Absolute(_),
                    ..
                })
            ),
            "{r:?}"
        );
        assert!(!Path::new("/tmp/kiln-absolute-escape").exists());
    }

    #[test]
    fn refuses_symlinks_that_escape() {
        let mut t = Vec::new();
        entry(
            &mut t,
            "a/link",
            tar::EntryType::Symlink,
            0o777,
            "../../outside",
            b"",
        );
        let (dir, r) = unpack(t);
        assert!(matches!(r, Err(UnpackError::LinkEscapes { .. })), "{r:?}");
        assert!(fs::symlink_metadata(dir.path().join("root/a/link")).is_err());
    }

    #[test]
    fn refuses_hardlinks_that_escape() {
        let mut t = Vec::new();
        entry(&mut t, "h", tar::EntryType::Link, 0o644, "../outside", b"");
        let (_dir, r) = unpack(t);
        assert!(matches!(r, Err(UnpackError::BadHardlink { .. })), "{r:?}");
        let mut t = Vec::new();
        entry(&mut t, "h", tar::EntryType::Link, 0o644, "/etc/passwd", b"");
        let (_dir, r) = unpack(t);
        assert!(matches!(r, Err(UnpackError::BadHardlink { .. })), "{r:?}");
    }

    #[test]
    fn refuses_hardlinks_through_a_symlink_out_of_the_root() {
        // `l` → `/` is fine inside an image (its own root), and a hardlink to
        // `l/etc/passwd` must resolve inside the image root, not the host's.
        let mut t = Vec::new();
        entry(&mut t, "l", tar::EntryType::Symlink, 0o777, "/", b"");
        entry(
            &mut t,
            "h",
            tar::EntryType::Link,
            0o644,
            "l/etc/passwd",
            b"",
        );
        let (_dir, r) = unpack(t);
        assert!(matches!(r, Err(UnpackError::BadHardlink { .. })), "{r:?}");
    }

    #[test]
    fn writes_through_symlinked_directories_stay_inside() {
        let mut t = Vec::new();
        entry(&mut t, "up", tar::EntryType::Symlink, 0o777, "/", b"");
        file(&mut t, "up/tmp/kiln-through-link", b"x");
        let (dir, r) = unpack(t);
        r.unwrap();
        assert!(dir.path().join("root/tmp/kiln-through-link").is_file());
        assert!(!Path::new("/tmp/kiln-through-link").exists());
    }

    #[test]
    fn refuses_device_nodes() {
        for kind in [tar::EntryType::Char, tar::EntryType::Block] {
            let mut t = Vec::new();
            entry(&mut t, "dev/null", kind, 0o666, "", b"");
            let (_dir, r) = unpack(t);
            assert!(
                matches!(
                    r,
                    Err(UnpackError::Forbidden {
                        kind: "device node",
                        ..
                    })
                ),
                "{r:?}"
            );
        }
    }

    #[test]
    fn refuses_named_pipes() {
        let mut t = Vec::new();
        entry(&mut t, "fifo", tar::EntryType::Fifo, 0o644, "", b"");
        let (_dir, r) = unpack(t);
        assert!(
            matches!(
                r,
                Err(UnpackError::Forbidden {
                    kind: "named pipe",
                    ..
                })
            ),
            "{r:?}"
        );
    }

    #[test]
    fn strips_setuid_and_setgid() {
        let mut t = Vec::new();
        entry(
            &mut t,
            "suid",
            tar::EntryType::Regular,
            0o6755,
            "",
            b"#!/bin/sh\n",
        );
        entry(
            &mut t,
            "sgid-dir",
            tar::EntryType::Directory,
            0o2775,
            "",
            b"",
        );
        let (dir, r) = unpack(t);
        r.unwrap();
        let m = fs::metadata(dir.path().join("root/suid")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o755);
        let m = fs::metadata(dir.path().join("root/sgid-dir")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o775);
    }

    #[test]
    fn read_only_clears_write_bits() {
        let mut t = Vec::new();
        entry(&mut t, "d", tar::EntryType::Directory, 0o755, "", b"");
        file(&mut t, "d/f", b"x");
        let dir = tempfile::tempdir().unwrap();
        let mut modes = DirModes::default();
        let tar = finish(t);
        let digest = Digest::of(&tar);
        apply_layer(
            &tar[..],
            LayerCompression::None,
            &digest,
            &digest,
            dir.path(),
            UnpackOptions { read_only: true },
            1 << 20,
            &mut modes,
        )
        .unwrap();
        assert_eq!(
            fs::metadata(dir.path().join("d/f")).unwrap().mode() & 0o777,
            0o444
        );
    }

    #[test]
    fn whiteouts_remove_lower_layer_entries_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut lower = Vec::new();
        file(&mut lower, "keep", b"1");
        file(&mut lower, "gone", b"1");
        file(&mut lower, "opq/old", b"1");
        unpack_tar(&finish(lower), root, UnpackOptions::default()).unwrap();
        let mut upper = Vec::new();
        file(&mut upper, "opq/new", b"2");
        file(&mut upper, ".wh.gone", b"");
        file(&mut upper, "opq/.wh..wh..opq", b"");
        unpack_tar(&finish(upper), root, UnpackOptions::default()).unwrap();
        assert!(root.join("keep").exists());
        assert!(!root.join("gone").exists());
        assert!(!root.join("opq/old").exists());
        assert!(
            root.join("opq/new").exists(),
            "same-layer entries survive an opaque whiteout"
        );
        assert!(!root.join(".wh.gone").exists());
    }

    #[test]
    fn a_wrong_diff_id_is_refused() {
        let mut t = Vec::new();
        file(&mut t, "a", b"x");
        let tar = finish(t);
        let dir = tempfile::tempdir().unwrap();
        let r = apply_layer(
            &tar[..],
            LayerCompression::None,
            &Digest::of(&tar),
            &Digest::of(b"other"),
            dir.path(),
            UnpackOptions::default(),
            1 << 20,
            &mut DirModes::default(),
        );
        assert!(matches!(r, Err(UnpackError::DiffId { .. })), "{r:?}");
    }

    #[test]
    fn a_directory_mode_never_follows_a_symlink_put_at_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"secret").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let mut t = Vec::new();
        entry(&mut t, "x", tar::EntryType::Directory, 0o777, "", b"");
        // An absolute target is legal inside an image (its own root).
        let target = victim.to_str().unwrap();
        entry(&mut t, "x", tar::EntryType::Symlink, 0o777, target, b"");
        unpack_tar(&finish(t), &root, UnpackOptions::default()).unwrap();
        assert_eq!(fs::metadata(&victim).unwrap().mode() & 0o7777, 0o600);
        assert!(fs::symlink_metadata(root.join("x")).unwrap().is_symlink());
    }

    #[test]
    fn a_pending_mode_below_a_replaced_directory_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir_all(outside.join("b")).unwrap();
        fs::set_permissions(outside.join("b"), fs::Permissions::from_mode(0o700)).unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        // One image, two layers: `a/b` 0777, then `a` whited out and made a
        // symlink to a host directory that has a `b`.
        let mut lower = Vec::new();
        entry(&mut lower, "a", tar::EntryType::Directory, 0o755, "", b"");
        entry(&mut lower, "a/b", tar::EntryType::Directory, 0o777, "", b"");
        let mut upper = Vec::new();
        file(&mut upper, ".wh.a", b"");
        let target = outside.to_str().unwrap();
        entry(&mut upper, "a", tar::EntryType::Symlink, 0o777, target, b"");
        let mut modes = DirModes::default();
        for tar in [finish(lower), finish(upper)] {
            let d = Digest::of(&tar);
            let opts = UnpackOptions::default();
            apply_layer(
                &tar[..],
                LayerCompression::None,
                &d,
                &d,
                &root,
                opts,
                1 << 20,
                &mut modes,
            )
            .unwrap();
        }
        assert!(modes.0.is_empty(), "{modes:?}");
        modes.apply(&root, false).unwrap();
        let m = fs::metadata(outside.join("b")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o700);
    }

    #[test]
    fn a_mode_whose_path_now_crosses_a_symlink_is_skipped() {
        // Even a mode the applier did not forget (a path changed behind its
        // back) is never applied through a symlink.
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir_all(outside.join("b")).unwrap();
        fs::set_permissions(outside.join("b"), fs::Permissions::from_mode(0o700)).unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("a")).unwrap();
        let mut modes = DirModes::default();
        modes.set(root.join("a/b"), 0o777);
        modes.set(root.join("a"), 0o777);
        modes.apply(&root, false).unwrap();
        let m = fs::metadata(outside.join("b")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o700);
        assert_eq!(fs::metadata(&outside).unwrap().mode() & 0o7777, 0o755);
        // A real directory still gets its mode.
        fs::create_dir(root.join("d")).unwrap();
        let mut modes = DirModes::default();
        modes.set(root.join("d"), 0o711);
        modes.apply(&root, false).unwrap();
        assert_eq!(fs::metadata(root.join("d")).unwrap().mode() & 0o7777, 0o711);
    }

    #[test]
    fn whiteouts_of_the_directory_itself_or_above_are_refused() {
        for name in [".wh...", ".wh..", ".wh.", "sub/.wh...", "sub/.wh."] {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join("precious"), b"keep").unwrap();
            let root = dir.path().join("root");
            fs::create_dir(&root).unwrap();
            fs::write(root.join("lower"), b"1").unwrap();
            let mut t = Vec::new();
            file(&mut t, name, b"");
            let r = unpack_tar(&finish(t), &root, UnpackOptions::default());
            assert!(
                matches!(r, Err(UnpackError::Whiteout { .. })),
                "{name}: {r:?}"
            );
            assert!(dir.path().join("precious").exists(), "{name}");
            assert!(root.join("lower").exists(), "{name}");
        }
    }

    #[test]
    fn a_layer_expanding_past_its_limit_is_refused() {
        let mut t = Vec::new();
        file(&mut t, "zeros", &vec![0u8; 64 << 10]);
        let tar = finish(t);
        let dir = tempfile::tempdir().unwrap();
        let d = Digest::of(&tar);
        let opts = UnpackOptions::default();
        let mut modes = DirModes::default();
        let r = apply_layer(
            &tar[..],
            LayerCompression::None,
            &d,
            &d,
            dir.path(),
            opts,
            16 << 10,
            &mut modes,
        );
        assert!(
            matches!(r, Err(UnpackError::TooLarge { limit, .. }) if limit == 16 << 10),
            "{r:?}"
        );
        let written = fs::metadata(dir.path().join("zeros"))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(written <= 16 << 10, "{written}");
        // Under the limit, the same layer unpacks.
        let dir = tempfile::tempdir().unwrap();
        apply_layer(
            &tar[..],
            LayerCompression::None,
            &d,
            &d,
            dir.path(),
            opts,
            tar.len() as u64,
            &mut modes,
        )
        .unwrap();
        assert_eq!(layer_limit(1), LAYER_FLOOR);
        assert_eq!(layer_limit(10 << 20), 2560 << 20);
        assert_eq!(layer_limit(u64::MAX), u64::MAX);
    }
}
