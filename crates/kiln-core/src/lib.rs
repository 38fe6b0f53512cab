//! kiln's domain core: the words of VISION.md as types, and the pure decisions
//! made on them. Nothing here touches the filesystem, the network or the clock;
//! callers pass in what the outside world said (file contents, `SOURCE_DATE_EPOCH`).
//!
//! Start with [`spec`] (what the user wants), then [`digest`] and [`reference`]
//! (how images are named), then [`oci`] (the documents an image is made of) and
//! [`tree`] (the per-file manifest of an unpacked image).

pub mod acme;
pub mod api;
pub mod auth;
pub mod base;
pub mod cluster;
pub mod compress;
pub mod counters;
pub mod digest;
pub mod drift;
pub mod edge;
pub mod event;
pub mod health;
pub mod layer;
pub mod ledger;
pub mod logs;
pub mod names;
pub mod oci;
pub mod plan;
pub mod proxy;
pub mod reference;
pub mod registry;
pub mod release;
pub mod resources;
pub mod retention;
pub mod rollout;
pub mod secret;
pub mod service;
pub mod spec;
pub mod tree;
pub mod user;

pub use digest::Digest;
pub use reference::ImageRef;
