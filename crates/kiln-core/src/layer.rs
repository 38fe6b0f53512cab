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

/// A declared layer bigger than its part size is stored as several OCI
/// layers, its *parts*: a change to one file then writes one part, not the
/// whole layer, and a push or pull moves that part only. The parts are
/// disjoint runs of the layer's sorted entries (each carries the
/// directories above its entries, so it unpacks on its own); where they
/// are cut depends on the entries alone, so the same tree gives the same
/// parts and the same digest on every machine.
///
/// A part ends after an entry once it holds at least `min` raw tar bytes,
/// with a chance proportional to the entry's size read from the hash of
/// its path (a content-defined boundary: it does not move when a file
/// before it or the entry's own content changes), so a part holds about
/// `2 × min` on average; at `4 × min` it ends whatever the entry. A layer
/// has at most [`MAX_PARTS`] parts (the last takes the rest). `min = 0`
/// keeps each declared layer whole.
pub fn parts(entries: &[LayerEntry], min: u64) -> Vec<Vec<LayerEntry>> {
    if min == 0 || entries.is_empty() {
        return vec![entries.to_vec()];
    }
    let mut out = Vec::new();
    let mut part: std::collections::BTreeMap<&str, LayerEntry> = Default::default();
    let mut bytes = 0u64;
    for (i, e) in entries.iter().enumerate() {
        // The directories above an entry whose own entries are in an
        // earlier part.
        for dir in ancestors(&e.path) {
            part.entry(dir).or_insert_with(|| LayerEntry::dir(dir));
        }
        part.insert(&e.path, e.clone());
        bytes += raw_size(e);
        let last = i + 1 == entries.len();
        if !last && out.len() + 1 < MAX_PARTS && ends_part(e, bytes, min) {
            out.push(std::mem::take(&mut part).into_values().collect());
            bytes = 0;
        }
    }
    out.push(part.into_values().collect());
    out
}

/// Parts per declared layer at most: runtimes cap an image's layers
/// (Docker's overlay2 at about 125), and a few declared layers of parts
/// must stay under that.
pub const MAX_PARTS: usize = 32;

/// See [`parts`]: whether a part holding `bytes` ends after `entry`.
fn ends_part(entry: &LayerEntry, bytes: u64, min: u64) -> bool {
    if bytes < min {
        return false;
    }
    if bytes >= min.saturating_mul(4) {
        return true;
    }
    // A uniform draw in [0, 1) from the path, against size / min.
    let h = Digest::of(format!("kiln-part\0{}", entry.path).as_bytes());
    let draw = u64::from_str_radix(&h.hex()[..16], 16).unwrap_or(u64::MAX);
    u128::from(draw) * u128::from(min) < u128::from(raw_size(entry)) << 64
}

/// The directories above a `/`-separated path, outermost first.
pub fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

/// The bytes an entry takes in an uncompressed tar: a header, and a file's
/// content padded to 512.
pub fn raw_size(entry: &LayerEntry) -> u64 {
    match entry.kind {
        EntryKind::File { size, .. } => 512 + size.div_ceil(512) * 512,
        _ => 512,
    }
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

impl LayerEntry {
    /// The entry a layer carries for a directory above its entries, with
    /// the mode every baked directory gets.
    pub fn dir(path: &str) -> Self {
        Self {
            path: path.to_owned(),
            mode: normalize_mode(&EntryKind::Dir, 0),
            kind: EntryKind::Dir,
        }
    }
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

/// The first of `globs` that matches none of `paths`: an `include` that
/// takes nothing is a mistake (a misspelt path), not an empty image.
pub fn unmatched<'a, 'p>(
    globs: &'a [Glob],
    paths: impl Iterator<Item = &'p str>,
) -> Option<&'a Glob> {
    let set = glob_set(globs);
    let mut hit = vec![false; globs.len()];
    for p in paths {
        for i in set.matches(p) {
            hit[i] = true;
        }
        if hit.iter().all(|h| *h) {
            return None;
        }
    }
    globs.iter().zip(hit).find(|(_, h)| !h).map(|(g, _)| g)
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
    fn an_include_that_takes_nothing_is_named() {
        let globs = [glob("bin"), glob("static/**/*.css"), glob("nope")];
        let paths = ["bin", "bin/app", "static", "static/css/site.css"];
        assert_eq!(
            unmatched(&globs, paths.iter().copied()).map(Glob::as_str),
            Some("nope")
        );
        assert_eq!(unmatched(&globs[..2], paths.iter().copied()), None);
        assert_eq!(
            unmatched(&globs[..2], ["bin"].into_iter()).map(Glob::as_str),
            Some("static/**/*.css")
        );
        assert_eq!(unmatched(&[], std::iter::empty()), None, "no include: all");
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

    /// Entries as a bake lists them: sorted, each file's directories first.
    fn layer_of(files: &[(String, u64, u8)]) -> Vec<LayerEntry> {
        let mut map = std::collections::BTreeMap::new();
        for (path, size, content) in files {
            for dir in ancestors(path) {
                map.entry(dir.to_owned())
                    .or_insert_with(|| LayerEntry::dir(dir));
            }
            map.insert(
                path.clone(),
                LayerEntry {
                    path: path.clone(),
                    mode: 0o644,
                    kind: EntryKind::File {
                        size: *size,
                        sha256: Digest::of(&[*content]),
                    },
                },
            );
        }
        map.into_values().collect()
    }

    fn files() -> impl proptest::strategy::Strategy<Value = Vec<(String, u64, u8)>> {
        use proptest::prelude::*;
        // Names that sort around `/` (`a-x` sorts between `a` and `a/…`).
        let name = prop::sample::select(vec!["a", "a-x", "b", "c.d", "e"]);
        let path = prop::collection::vec(name, 1..5).prop_map(|p| p.join("/"));
        prop::collection::vec((path, 0u64..20_000, any::<u8>()), 1..150).prop_map(|v| {
            // A path is a file or a directory, not both.
            let dirs: std::collections::BTreeSet<String> = v
                .iter()
                .flat_map(|(p, _, _)| ancestors(p).map(str::to_owned).collect::<Vec<_>>())
                .collect();
            let mut seen = std::collections::BTreeSet::new();
            v.into_iter()
                .filter(|(p, _, _)| !dirs.contains(p) && seen.insert(p.clone()))
                .collect()
        })
    }

    proptest::proptest! {
        #[test]
        fn parts_are_sorted_runs_of_the_layer_that_each_carry_their_directories(
            files in files(), min in 1_000u64..40_000,
        ) {
            let layer = layer_of(&files);
            let parts = parts(&layer, min);
            proptest::prop_assert!(!parts.is_empty() && parts.len() <= MAX_PARTS);
            // Every entry is in exactly one part, in order; the parts add only
            // directories that are entries of the layer before the part.
            let mut next = 0;
            for (n, part) in parts.iter().enumerate() {
                let mut own = 0u64;
                for (i, e) in part.iter().enumerate() {
                    if i > 0 {
                        proptest::prop_assert!(part[i - 1].path < e.path, "unsorted");
                    }
                    for dir in ancestors(&e.path) {
                        proptest::prop_assert!(part.iter().any(|d| d.path == dir && d.kind == EntryKind::Dir));
                    }
                    if next < layer.len() && layer[next] == *e {
                        next += 1;
                        own += raw_size(e);
                    } else {
                        proptest::prop_assert!(e.kind == EntryKind::Dir && e.mode == 0o755);
                        proptest::prop_assert!(layer[..next].contains(e), "{} added but not before", e.path);
                    }
                }
                if n + 1 < parts.len() {
                    proptest::prop_assert!(own >= min, "part {n} of {own} bytes");
                    let last = part.last().map(raw_size).unwrap_or(0);
                    proptest::prop_assert!(own < 4 * min + last, "part {n} of {own} bytes");
                }
            }
            proptest::prop_assert_eq!(next, layer.len());
            proptest::prop_assert_eq!(super::parts(&layer, 0), vec![layer.clone()]);
        }

        #[test]
        fn a_file_changed_in_place_changes_only_its_own_part(
            files in files(), min in 1_000u64..40_000, pick in 0usize..1000,
        ) {
            let before = parts(&layer_of(&files), min);
            let mut changed = files.clone();
            let i = pick % changed.len();
            changed[i].2 = changed[i].2.wrapping_add(1);
            let after = parts(&layer_of(&changed), min);
            proptest::prop_assert_eq!(before.len(), after.len());
            let differ: Vec<usize> = (0..before.len()).filter(|&n| before[n] != after[n]).collect();
            proptest::prop_assert_eq!(differ.len(), 1);
            proptest::prop_assert!(after[differ[0]].iter().any(|e| e.path == changed[i].0));
        }
    }

    #[test]
    fn parts_hold_about_twice_their_minimum() {
        // 4,000 files of 0–100 KiB, as the bench tree has, in parts of 4 MiB or more.
        let files: Vec<(String, u64, u8)> = (0..4_000u64)
            .map(|i| (format!("d{}/f{i:05}", i % 37), (i * 7919) % 100_000, 0))
            .collect();
        let layer = layer_of(&files);
        let min = 4 << 20;
        let parts = parts(&layer, min);
        let whole = &parts[..parts.len() - 1];
        let bytes: u64 = whole.iter().flatten().map(raw_size).sum();
        let mean = bytes / whole.len() as u64;
        assert!(whole.len() >= 10, "{} parts", parts.len());
        assert!(
            (3 * min / 2..5 * min / 2).contains(&mean),
            "{} parts, mean {mean}",
            parts.len()
        );
        // Big layers stop at MAX_PARTS; the last takes the rest.
        assert_eq!(super::parts(&layer, 4096).len(), MAX_PARTS);
    }
}
