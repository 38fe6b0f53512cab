//! Pure rules about layer contents: how a baked entry is normalized, which
//! layer it lands in, the key that says two layers are identical, and the
//! path checks that keep a hostile layer inside its root.

use std::fmt::Write as _;

use globset::GlobSet;
use serde::Serialize;

use crate::digest::Digest;
use crate::spec::{Glob, LayerSpec};

/// Bumped whenever the bytes kiln writes for the same inputs change, so a
/// layer cache from an older kiln is never reused for a newer one.
/// 2: gzip members are cut at entry boundaries ([`cut_after`]), not every
/// 1 MiB of the stream.
pub const LAYER_FORMAT: u32 = 2;

/// gzip level of every kiln layer: fixed, because the level is part of the bytes.
pub const GZIP_LEVEL: u32 = 6;

/// Uncompressed bytes per gzip member. Layers are compressed in chunks of this
/// size on all cores and concatenated (a multi-member gzip stream, which every
/// OCI runtime reads). Fixed, because it is part of the bytes.
pub const GZIP_CHUNK: usize = 1 << 20;

/// Where a layer's gzip members are cut, so that a member's raw bytes
/// depend on the entries in it and nothing before them: an unchanged run
/// of files gives the same member in the next bake, which reuses it as
/// compressed (a one-file change re-compresses about one member, not the
/// layer).
///
/// - A file of at least [`GZIP_CHUNK`] bytes starts a member of its own
///   and is cut every [`GZIP_CHUNK`] bytes from its header on
///   ([`alone`]); the member after it starts with the next entry.
/// - After any other entry, the member is cut when the entry's identity
///   (path and content) hashes to one of 64 values — a content-defined
///   boundary that does not move when earlier files change — or when the
///   member has reached [`GZIP_CHUNK`] bytes.
pub fn alone(entry: &LayerEntry) -> bool {
    matches!(entry.kind, EntryKind::File { size, .. } if size >= GZIP_CHUNK as u64)
}

/// See [`alone`]: whether a member ends after `entry`, when it holds
/// `member_len` raw bytes so far.
pub fn cut_after(entry: &LayerEntry, member_len: usize) -> bool {
    if member_len >= GZIP_CHUNK {
        return true;
    }
    let id = match &entry.kind {
        EntryKind::File { sha256, .. } => format!("{}\0{sha256}", entry.path),
        EntryKind::Dir => format!("{}/", entry.path),
        EntryKind::Symlink { target } => format!("{}\0{target}", entry.path),
    };
    // One entry in 64, by the first byte of its identity's hash.
    let hex = Digest::of(id.as_bytes());
    u8::from_str_radix(&hex.hex()[..2], 16).is_ok_and(|b| b < 4)
}

/// What a layer entry is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum EntryKind {
    Dir,
    File { size: u64, sha256: Digest },
    Symlink { target: String },
}

/// One normalized entry of a layer being baked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LayerEntry {
    /// `/`-separated, relative, no `.` or `..` components.
    pub path: String,
    pub mode: u32,
    #[serde(flatten)]
    pub kind: EntryKind,
}

/// The mode a baked entry gets, whatever the source tree's umask was: only
/// the executable bit of a file is kept.
pub fn normalize_mode(kind: &EntryKind, source_mode: u32) -> u32 {
    match kind {
        EntryKind::Dir => 0o755,
        EntryKind::Symlink { .. } => 0o777,
        EntryKind::File { .. } if source_mode & 0o111 != 0 => 0o755,
        EntryKind::File { .. } => 0o644,
    }
}

/// The identity of the entries before a point of a layer, chained: the
/// seed (from the mtime every header carries), then one link per entry.
/// Equal chains mean byte-equal raw tar up to that point, so a re-bake may
/// resume a layer after it (see `kiln_store::gzip`).
pub fn chain_seed(mtime: u64) -> Digest {
    Digest::of(format!("kiln-entries/{LAYER_FORMAT}/{mtime}").as_bytes())
}

/// The chain after `entry` (see [`chain_seed`]).
pub fn chain(prev: &Digest, entry: &LayerEntry) -> Digest {
    let mut text = format!("{prev}\n");
    let _ = match &entry.kind {
        EntryKind::Dir => writeln!(text, "d {:o} {}", entry.mode, entry.path),
        EntryKind::File { size, sha256 } => {
            writeln!(text, "f {:o} {size} {sha256} {}", entry.mode, entry.path)
        }
        EntryKind::Symlink { target } => writeln!(text, "l {} -> {target}", entry.path),
    };
    Digest::of(text.as_bytes())
}

/// The identity of a layer's content and encoding: equal keys mean equal
/// blobs, so a layer whose key is cached is reused without re-compressing.
pub fn layer_key(entries: &[LayerEntry], mtime: u64) -> Digest {
    let mut text = format!("kiln-layer/{LAYER_FORMAT}/gzip-{GZIP_LEVEL}/{GZIP_CHUNK}/{mtime}\n");
    for e in entries {
        let _ = match &e.kind {
            EntryKind::Dir => writeln!(text, "d {:o} {}", e.mode, e.path),
            EntryKind::File { size, sha256 } => {
                writeln!(text, "f {:o} {size} {sha256} {}", e.mode, e.path)
            }
            EntryKind::Symlink { target } => writeln!(text, "l {} -> {target}", e.path),
        };
    }
    Digest::of(text.as_bytes())
}

/// Assigns each path to a layer: the first `[[layers]]` group with a matching
/// glob, else the final catch-all layer (index `groups.len()`).
pub struct LayerAssigner {
    groups: Vec<GlobSet>,
}

impl LayerAssigner {
    pub fn new(layers: &[LayerSpec]) -> Self {
        let groups = layers.iter().map(|l| glob_set(&l.paths)).collect();
        Self { groups }
    }

    /// Layer index of a path (a file's path, or any of its ancestors', matches).
    pub fn assign(&self, path: &str) -> usize {
        self.groups
            .iter()
            .position(|g| matches_path_or_ancestor(g, path))
            .unwrap_or(self.groups.len())
    }

    pub fn layer_count(&self) -> usize {
        self.groups.len() + 1
    }
}

/// A set of validated globs.
pub fn glob_set(globs: &[Glob]) -> GlobSet {
    let mut b = globset::GlobSetBuilder::new();
    for g in globs {
        b.add(g.compile());
    }
    // Every glob was validated at parse time; building the set cannot fail then.
    b.build().unwrap_or_else(|_| GlobSet::empty())
}

/// Whether `path` or one of its ancestor directories matches: `static` then
/// selects everything below `static/`.
pub fn matches_path_or_ancestor(set: &GlobSet, path: &str) -> bool {
    if set.is_match(path) {
        return true;
    }
    path.char_indices()
        .filter(|&(_, c)| c == '/')
        .any(|(i, _)| set.is_match(&path[..i]))
}

/// Why a path inside a layer is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("absolute path `{0}`")]
    Absolute(String),
    #[error("path `{0}` climbs out with `..`")]
    ParentComponent(String),
    #[error("path `{0}` is not valid UTF-8 or contains NUL")]
    Encoding(String),
}

/// The clean relative form of a path found in a tar (`./a//b` → `a/b`), or an
/// error if it is absolute or contains `..`. The empty string is the root.
pub fn clean_entry_path(raw: &[u8]) -> Result<String, PathError> {
    let s = std::str::from_utf8(raw)
        .ok()
        .filter(|s| !s.contains('\0'))
        .ok_or_else(|| PathError::Encoding(String::from_utf8_lossy(raw).into_owned()))?;
    if s.starts_with('/') {
        return Err(PathError::Absolute(s.to_owned()));
    }
    let mut parts = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(PathError::ParentComponent(s.to_owned())),
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

/// Whether a symlink at `link_path` (relative to the root) pointing at
/// `target` resolves outside the root, judged lexically. An absolute target
/// is outside when `absolute_escapes` (true while baking a host directory,
/// where `/x` means the host's `/x`; false inside an image, whose `/` is its root).
pub fn link_escapes(link_path: &str, target: &str, absolute_escapes: bool) -> bool {
    if target.starts_with('/') {
        if absolute_escapes {
            return true;
        }
        return climbs_out(std::iter::empty(), target);
    }
    let parent = link_path.rsplit_once('/').map_or("", |(p, _)| p);
    climbs_out(parent.split('/').filter(|c| !c.is_empty()), target)
}

fn climbs_out<'a>(start: impl Iterator<Item = &'a str>, target: &str) -> bool {
    let mut depth = start.count();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." if depth == 0 => return true,
            ".." => depth -= 1,
            _ => depth += 1,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_cut_by_content_about_one_entry_in_64_or_at_the_size_cap() {
        let file = |i: u32| LayerEntry {
            path: format!("lib/f{i}"),
            mode: 0o644,
            kind: EntryKind::File {
                size: 100,
                sha256: Digest::of(&i.to_le_bytes()),
            },
        };
        let cuts = (0..64_000).filter(|i| cut_after(&file(*i), 0)).count();
        assert!((700..1300).contains(&cuts), "{cuts} cuts in 64000 entries");
        // The same entry always decides the same; a full member is cut.
        assert_eq!(cut_after(&file(5), 10), cut_after(&file(5), 10));
        assert!(cut_after(&file(5), GZIP_CHUNK));
        let big = LayerEntry {
            path: "big".into(),
            mode: 0o644,
            kind: EntryKind::File {
                size: GZIP_CHUNK as u64,
                sha256: Digest::of(b"b"),
            },
        };
        assert!(alone(&big) && !alone(&file(1)));
    }

    fn glob(s: &str) -> Glob {
        Glob::try_from(s).unwrap()
    }

    #[test]
    fn modes_keep_only_the_exec_bit() {
        let f = EntryKind::File {
            size: 0,
            sha256: Digest::of(b""),
        };
        assert_eq!(normalize_mode(&f, 0o100700), 0o755);
        assert_eq!(normalize_mode(&f, 0o100600), 0o644);
        assert_eq!(normalize_mode(&f, 0o104777), 0o755);
        assert_eq!(normalize_mode(&EntryKind::Dir, 0o700), 0o755);
    }

    #[test]
    fn first_matching_layer_wins_and_the_rest_goes_last() {
        let a = LayerAssigner::new(&[
            LayerSpec {
                name: None,
                paths: vec![glob("vendor")],
            },
            LayerSpec {
                name: None,
                paths: vec![glob("**/*.css"), glob("vendor/**")],
            },
        ]);
        assert_eq!(a.assign("vendor/x/y.css"), 0);
        assert_eq!(a.assign("static/a.css"), 1);
        assert_eq!(a.assign("a.css"), 1);
        assert_eq!(a.assign("bin/app"), 2);
        assert_eq!(a.layer_count(), 3);
    }

    #[test]
    fn layer_key_changes_with_any_content() {
        let e = |sha: &[u8]| LayerEntry {
            path: "a".into(),
            mode: 0o644,
            kind: EntryKind::File {
                size: 1,
                sha256: Digest::of(sha),
            },
        };
        assert_eq!(layer_key(&[e(b"x")], 0), layer_key(&[e(b"x")], 0));
        assert_ne!(layer_key(&[e(b"x")], 0), layer_key(&[e(b"y")], 0));
        assert_ne!(layer_key(&[e(b"x")], 0), layer_key(&[e(b"x")], 1));
    }

    #[test]
    fn entry_paths_are_cleaned_or_refused() {
        assert_eq!(clean_entry_path(b"./a//b/").unwrap(), "a/b");
        assert_eq!(clean_entry_path(b"./").unwrap(), "");
        assert!(matches!(
            clean_entry_path(b"/etc/passwd"),
            Err(PathError::Absolute(_))
        ));
        assert!(matches!(
            clean_entry_path(b"a/../../x"),
            Err(PathError::ParentComponent(_))
        ));
        assert!(matches!(
            clean_entry_path(b"a\xff"),
            Err(PathError::Encoding(_))
        ));
    }

    #[test]
    fn link_escape_is_judged_from_the_link_location() {
        assert!(!link_escapes("a/b/l", "../c", false));
        assert!(!link_escapes("a/b/l", "../../c", false));
        assert!(link_escapes("a/b/l", "../../../c", false));
        assert!(link_escapes("l", "..", false));
        assert!(!link_escapes("l", "x/../y", false));
        assert!(!link_escapes("l", "/usr/lib", false));
        assert!(link_escapes("l", "/usr/lib", true));
        assert!(link_escapes("l", "/../x", false));
    }
}
