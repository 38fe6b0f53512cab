//! The OCI image-spec v1.1 documents kiln reads and writes.
//!
//! Hand-written rather than taken from `oci-spec` because a digest is only
//! reproducible if the JSON bytes are: every map here is a `BTreeMap` and every
//! struct has a fixed field order, so `serde_json::to_vec` is canonical by
//! construction (oci-spec keeps annotations in a `HashMap`). Reading foreign
//! documents tolerates unknown fields, as the spec requires.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_TYPE_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Docker's name for a gzip layer; accepted on read so foreign images unpack.
pub const MEDIA_TYPE_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker's name for an uncompressed layer; accepted on read.
pub const MEDIA_TYPE_DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// A zstd layer (image-spec 1.1); accepted on read.
pub const MEDIA_TYPE_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";
pub const ANNOTATION_REVISION: &str = "org.opencontainers.image.revision";
pub const ANNOTATION_SOURCE: &str = "org.opencontainers.image.source";
pub const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";
/// The image an image was baked on (OCI's pre-defined annotations).
pub const ANNOTATION_BASE_DIGEST: &str = "org.opencontainers.image.base.digest";
pub const ANNOTATION_BASE_NAME: &str = "org.opencontainers.image.base.name";
/// kiln's own name for a layer (from `[[images.NAME.layers]]`).
pub const ANNOTATION_LAYER_NAME: &str = "dev.kiln.layer.name";
/// On a referrer's entry in the store's own `index.json` (never in a
/// manifest, so never carried by a push): a bake of this store made it.
pub const ANNOTATION_MADE_HERE: &str = "dev.kiln.made-here";
/// Which part of its declared layer a layer is, `N/COUNT`, when the layer
/// was stored in parts (`kiln_core::layer::parts`).
pub const ANNOTATION_LAYER_PART: &str = "dev.kiln.layer.part";

/// How a layer blob is compressed, from its media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

impl LayerCompression {
    /// `None` for media types kiln cannot unpack (foreign formats, Docker's
    /// foreign layers).
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            MEDIA_TYPE_LAYER_TAR | MEDIA_TYPE_DOCKER_LAYER_TAR => Some(Self::None),
            MEDIA_TYPE_LAYER_GZIP | MEDIA_TYPE_DOCKER_LAYER_GZIP => Some(Self::Gzip),
            MEDIA_TYPE_LAYER_ZSTD => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// A pointer to a blob: what it is, its digest and size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Self {
        Self {
            media_type: media_type.to_owned(),
            digest,
            size,
            annotations: BTreeMap::new(),
        }
    }
}

/// An image manifest: one config and an ordered list of layers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// `index.json` of an OCI image layout.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

impl Index {
    pub fn empty() -> Self {
        Self {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_INDEX.to_owned()),
            manifests: Vec::new(),
        }
    }
}

/// The image configuration: how to run it and which layers make its root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub config: ExecConfig,
    pub rootfs: RootFs,
}

/// The `config` object of an image configuration (Docker-compatible casing).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExecConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exposed_ports: BTreeMap<String, EmptyObject>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub env: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub entrypoint: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub cmd: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub labels: BTreeMap<String, String>,
}

/// `{}`, the value of an `ExposedPorts` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmptyObject {}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<Digest>,
}

/// Docker writes `null` where the spec says "absent"; treat both the same.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// The OCI architecture name for a Rust `std::env::consts::ARCH`.
pub fn oci_architecture(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialization_is_canonical_regardless_of_insertion_order() {
        let mut a = Descriptor::new(MEDIA_TYPE_CONFIG, Digest::of(b"c"), 1);
        a.annotations.insert("b".into(), "2".into());
        a.annotations.insert("a".into(), "1".into());
        let mut b = Descriptor::new(MEDIA_TYPE_CONFIG, Digest::of(b"c"), 1);
        b.annotations.insert("a".into(), "1".into());
        b.annotations.insert("b".into(), "2".into());
        assert_eq!(
            serde_json::to_vec(&a).unwrap(),
            serde_json::to_vec(&b).unwrap()
        );
    }

    #[test]
    fn foreign_config_with_nulls_and_unknown_fields_parses() {
        let json = r#"{"architecture":"amd64","os":"linux","extra":1,
            "config":{"Env":null,"Cmd":["sh"],"Labels":null},
            "rootfs":{"type":"layers","diff_ids":[]}}"#;
        let cfg: ImageConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cfg.config.cmd, vec!["sh".to_owned()]);
        assert!(cfg.config.env.is_empty());
    }
}
