//! The per-file manifest of a materialized image tree: path → kind, mode, size,
//! sha256. The store writes one beside every read-only tree; `kiln verify` (and
//! later the drift detector) compares what is on disk against it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// One entry of a tree, keyed by its path relative to the root (`/`-separated,
/// no leading slash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum TreeEntry {
    File {
        mode: u32,
        size: u64,
        sha256: Digest,
    },
    Dir {
        mode: u32,
    },
    Symlink {
        target: String,
    },
    /// A device node, socket or pipe: never part of an image, so only ever
    /// seen as drift.
    Special {
        mode: u32,
    },
}

/// The whole tree, sorted by path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeManifest {
    pub image: Option<Digest>,
    pub entries: BTreeMap<String, TreeEntry>,
}

impl TreeManifest {
    pub fn file_count(&self) -> usize {
        self.entries
            .values()
            .filter(|e| matches!(e, TreeEntry::File { .. }))
            .count()
    }

    /// What differs between this (expected) manifest and `actual`, path by path.
    pub fn diff(&self, actual: &TreeManifest) -> Vec<TreeDrift> {
        let mut out = Vec::new();
        for (path, want) in &self.entries {
            match actual.entries.get(path) {
                None => out.push(TreeDrift::Missing { path: path.clone() }),
                Some(got) if got != want => out.push(TreeDrift::Changed {
                    path: path.clone(),
                    what: describe_change(want, got),
                }),
                Some(_) => {}
            }
        }
        for path in actual.entries.keys() {
            if !self.entries.contains_key(path) {
                out.push(TreeDrift::Added { path: path.clone() });
            }
        }
        out.sort_by(|a, b| a.path().cmp(b.path()));
        out
    }
}

fn describe_change(want: &TreeEntry, got: &TreeEntry) -> &'static str {
    match (want, got) {
        (TreeEntry::File { sha256: a, .. }, TreeEntry::File { sha256: b, .. }) if a != b => {
            "content"
        }
        (TreeEntry::File { .. }, TreeEntry::File { .. })
        | (TreeEntry::Dir { .. }, TreeEntry::Dir { .. }) => "mode",
        (TreeEntry::Symlink { .. }, TreeEntry::Symlink { .. }) => "link target",
        _ => "type",
    }
}

/// One difference between a tree on disk and its manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "drift", rename_all = "lowercase")]
pub enum TreeDrift {
    Missing { path: String },
    Added { path: String },
    Changed { path: String, what: &'static str },
}

impl TreeDrift {
    pub fn path(&self) -> &str {
        match self {
            Self::Missing { path } | Self::Added { path } | Self::Changed { path, .. } => path,
        }
    }
}

impl fmt::Display for TreeDrift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing { path } => write!(f, "{path}: missing"),
            Self::Added { path } => write!(f, "{path}: not in the image"),
            Self::Changed { path, what } => write!(f, "{path}: {what} changed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(content: &[u8], mode: u32) -> TreeEntry {
        TreeEntry::File {
            mode,
            size: content.len() as u64,
            sha256: Digest::of(content),
        }
    }

    #[test]
    fn diff_names_every_kind_of_drift() {
        let mut want = TreeManifest::default();
        want.entries.insert("a".into(), file(b"a", 0o644));
        want.entries.insert("b".into(), file(b"b", 0o644));
        want.entries.insert("c".into(), file(b"c", 0o644));
        want.entries
            .insert("d".into(), TreeEntry::Dir { mode: 0o755 });
        let mut got = want.clone();
        got.entries.insert("a".into(), file(b"A", 0o644));
        got.entries.insert("b".into(), file(b"b", 0o755));
        got.entries.remove("c");
        got.entries.insert("d".into(), file(b"", 0o644));
        got.entries.insert("e".into(), file(b"e", 0o644));
        let drift: Vec<String> = want.diff(&got).iter().map(ToString::to_string).collect();
        assert_eq!(
            drift,
            [
                "a: content changed",
                "b: mode changed",
                "c: missing",
                "d: type changed",
                "e: not in the image"
            ]
        );
        assert!(want.diff(&want).is_empty());
    }
}
