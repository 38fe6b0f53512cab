//! kiln's store and baker.
//!
//! - [`store`]: the OCI image layout under `$KILN_HOME`, atomic blob writes,
//!   immutable tags, reference resolution.
//! - [`bake`]: a spec's `[images.NAME]` → a reproducible OCI image, incrementally.
//! - [`unpack`]: layers → a directory, treating every layer as hostile.
//! - [`tree`]: read-only trees materialized once per digest, with their
//!   per-file manifest, and checks of a tree against it.
//! - [`verify`], [`export`]: whole-store checks and interop with other tools.
//! - [`registry`]: push and pull (pulls read with caps), credentials.
//! - [`sign`], [`provenance`]: signatures and in-toto provenance as OCI
//!   referrers.
//! - [`gc`]: collecting what no image, release or lease keeps;
//!   [`fsutil`], [`gzip`]: atomic writes, deterministic gzip.

pub mod bake;
pub mod base;
pub mod export;
pub mod fsutil;
pub mod gc;
pub mod gzip;
pub mod provenance;
pub mod registry;
pub mod sign;
pub mod store;
pub mod tree;
pub mod unpack;
pub mod verify;

pub use store::{ImageRecord, Store, StoreError};
