//! `kiln verify`: re-hash blobs and compare materialized trees with their
//! manifests, naming every object that is not what it claims to be.

use std::fmt;
use std::fs;

use kiln_core::Digest;
use kiln_core::tree::TreeDrift;
use rayon::prelude::*;
use serde::Serialize;

use crate::store::{ImageRecord, IoContext, Store, StoreError};
use crate::tree::TreeError;

/// One thing found wrong.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "problem", rename_all = "kebab-case")]
pub enum Problem {
    CorruptBlob {
        digest: Digest,
        actual: Digest,
    },
    MissingBlob {
        digest: Digest,
        needed_by: String,
    },
    BadDocument {
        digest: Digest,
        reason: String,
    },
    StrayBlob {
        file: String,
    },
    TreeDrift {
        image: Digest,
        drift: Vec<TreeDrift>,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CorruptBlob { digest, actual } => {
                write!(
                    f,
                    "blob {digest} is corrupt: its content hashes to {actual}"
                )
            }
            Self::MissingBlob { digest, needed_by } => {
                write!(f, "blob {digest} is missing (needed by {needed_by})")
            }
            Self::BadDocument { digest, reason } => write!(f, "blob {digest}: {reason}"),
            Self::StrayBlob { file } => {
                write!(f, "blobs/sha256/{file} is not named by a sha256 digest")
            }
            Self::TreeDrift { image, drift } => {
                let list: Vec<String> = drift.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "tree of {image} differs from its manifest: {}",
                    list.join("; ")
                )
            }
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub blobs_checked: usize,
    pub trees_checked: usize,
    pub problems: Vec<Problem>,
}

/// Every blob in the store, every image's references, every tree.
pub fn verify_store(store: &Store) -> Result<VerifyReport, TreeError> {
    let dir = store.root().join("blobs/sha256");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .at(&dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut report = VerifyReport::default();
    let results: Vec<Option<Problem>> = names
        .par_iter()
        .map(|name| match Digest::from_hex(name) {
            Err(_) => Some(Problem::StrayBlob { file: name.clone() }),
            Ok(d) => blob_problem(store, &d, "the store"),
        })
        .collect();
    report.blobs_checked = names.len();
    report.problems.extend(results.into_iter().flatten());
    for image in store.images()? {
        references(store, &image, &mut report, false);
    }
    for tree in store.trees()? {
        check_tree(store, &tree, &mut report)?;
    }
    Ok(report)
}

/// The blobs one image needs, and its tree if materialized.
pub fn verify_image(store: &Store, image: &ImageRecord) -> Result<VerifyReport, TreeError> {
    let mut report = VerifyReport::default();
    references(store, image, &mut report, true);
    check_tree(store, &image.digest, &mut report)?;
    Ok(report)
}

fn blob_problem(store: &Store, digest: &Digest, needed_by: &str) -> Option<Problem> {
    match store.check_blob(digest) {
        Ok(()) => None,
        Err(StoreError::CorruptBlob { digest, actual }) => {
            Some(Problem::CorruptBlob { digest, actual })
        }
        Err(StoreError::MissingBlob(digest)) => Some(Problem::MissingBlob {
            digest,
            needed_by: needed_by.to_owned(),
        }),
        Err(e) => Some(Problem::BadDocument {
            digest: digest.clone(),
            reason: e.to_string(),
        }),
    }
}

/// Check that an image's manifest, config and layers exist (and, when
/// `rehash`, that their content matches). A whole-store run re-hashed every
/// blob already.
fn references(store: &Store, image: &ImageRecord, report: &mut VerifyReport, rehash: bool) {
    let who = image.pinned();
    let check = |digest: &Digest, report: &mut VerifyReport| {
        if rehash {
            report.blobs_checked += 1;
            if let Some(p) = blob_problem(store, digest, &who) {
                report.problems.push(p);
                return false;
            }
        } else if !store.has_blob(digest) {
            report.problems.push(Problem::MissingBlob {
                digest: digest.clone(),
                needed_by: who.clone(),
            });
            return false;
        }
        true
    };
    if !check(&image.digest, report) {
        return;
    }
    let manifest = match store.manifest(&image.digest) {
        Ok(m) => m,
        Err(e) => {
            if !matches!(e, StoreError::CorruptBlob { .. }) {
                report.problems.push(Problem::BadDocument {
                    digest: image.digest.clone(),
                    reason: e.to_string(),
                });
            }
            return;
        }
    };
    check(&manifest.config.digest, report);
    for layer in &manifest.layers {
        check(&layer.digest, report);
    }
}

fn check_tree(store: &Store, image: &Digest, report: &mut VerifyReport) -> Result<(), TreeError> {
    if store.tree(image)?.is_none() {
        return Ok(());
    }
    report.trees_checked += 1;
    let drift = store.check_tree(image)?;
    if !drift.is_empty() {
        report.problems.push(Problem::TreeDrift {
            image: image.clone(),
            drift,
        });
    }
    Ok(())
}
