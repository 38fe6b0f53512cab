//! Releases: a service's revision N = image digest + fully resolved config,
//! recorded once and never changed. Config is part of the release: a changed
//! env var is a new release exactly like changed code.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::names::{AbsolutePath, EnvName, ServiceName};
use crate::secret::{Sealed, SecretValue};
use crate::service::{
    HealthSpec, ListenAddr, RolloutSpec, RuntimeKind, StopSpec, VolumeName, VolumeSpec,
};

/// Everything an instance is made from. Two releases with equal configs are
/// the same content (a rollback creates a new release with an old config).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseConfig {
    pub image: Digest,
    /// The image's name, for people (`hello`).
    pub image_name: String,
    /// argv: the service's `command`, else the image's entrypoint + cmd.
    pub command: Vec<String>,
    /// Working directory inside the image (validated: the process runtime
    /// joins it onto the image's tree).
    pub workdir: AbsolutePath,
    /// The image's env, overridden by the service's. Names are validated
    /// here too: this arrives through the API, not only from a spec.
    pub env: BTreeMap<EnvName, String>,
    /// Secret env vars, sealed: the agent's keyed digest of each value (the
    /// value itself is in the agent's state store, never in a release).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<EnvName, Sealed>,
    /// Volume name → mount. A name is a path component under
    /// `$KILN_HOME/volumes/SERVICE/`: validated, so none escapes it.
    pub volumes: BTreeMap<VolumeName, VolumeSpec>,
    pub runtime: RuntimeKind,
    /// Who the instances run as: the service's `user`, else the image's
    /// `USER`; `None`: `nobody`. Omitted when unset, so releases made
    /// before it existed keep their hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub health: HealthSpec,
    pub stop: StopSpec,
    /// What each instance reserves on its node and is held to (`cpu`,
    /// `memory`). Omitted when nothing is declared, so releases made before
    /// it existed keep their hash.
    #[serde(default, skip_serializing_if = "crate::resources::Resources::is_none")]
    pub resources: crate::resources::Resources,
    /// Its release tasks (`pre_deploy`, `pre_rollback`).
    #[serde(default, skip_serializing_if = "crate::service::HooksSpec::is_empty")]
    pub hooks: crate::service::HooksSpec,
}

/// How an image is named for people: `NAME@SHORT` (`hello@1a2b3c4d5e6f`),
/// or the name alone when it already pins the digest (a digest-pinned
/// registry reference, `host/repo@sha256:…`): never the digest twice.
pub fn image_label(image_name: &str, image: &Digest, short: bool) -> String {
    if image_name.contains("@sha256:") {
        image_name.to_owned()
    } else if short {
        format!("{image_name}@{}", image.short())
    } else {
        format!("{image_name}@{image}")
    }
}

impl ReleaseConfig {
    /// [`image_label`] of this release's image, short.
    pub fn image_label(&self) -> String {
        image_label(&self.image_name, &self.image, true)
    }

    /// The content hash recorded with the release.
    pub fn hash(&self) -> Digest {
        Digest::of(&serde_json::to_vec(self).unwrap_or_default())
    }
}

/// Service settings that change without a new release.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSettings {
    pub replicas: u32,
    pub listen: Option<ListenAddr>,
    /// Its hosts and path prefix on `listen` (recorded before they existed:
    /// every host and path).
    #[serde(default, skip_serializing_if = "crate::edge::RouteSpec::is_default")]
    pub route: crate::edge::RouteSpec,
    /// HTTPS on `listen`, from certificate files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::service::TlsSpec>,
    pub rollout: RolloutSpec,
    /// The router's request timeout.
    pub timeout: crate::service::Duration,
    /// The router's limits (settings recorded before they existed read as
    /// the defaults).
    #[serde(default)]
    pub router: crate::service::RouterSpec,
    /// In a cluster, the labels a node needs to run its instances.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_labels: BTreeMap<String, String>,
    /// The router's own answers for the service, by status (`error_pages`:
    /// the HTML of `503.html`, …), read from the spec's directory at apply.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub error_pages: BTreeMap<u16, String>,
}

/// What `kiln apply` asks for one service: its settings and the release
/// config resolved from the spec (images resolved to digests).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredService {
    pub name: ServiceName,
    pub settings: ServiceSettings,
    pub config: ReleaseConfig,
    /// The secrets' values, read by the client; the agent seals them into
    /// `config.secrets` and keeps them (never printed: see
    /// [`SecretValue`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_values: BTreeMap<EnvName, SecretValue>,
    /// The allowed signers (`SHA256:…`) whose valid signatures the client
    /// checked on the image (the ledger records them with the release).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signed_by: Vec<String>,
}

/// How a release ended up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Being rolled out.
    Pending,
    /// What the service runs now.
    Active,
    /// Replaced by a later release.
    Superseded,
    /// Its rollout failed (the reason is recorded).
    Failed,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Superseded => "superseded",
            Self::Failed => "failed",
        })
    }
}

/// A recorded release.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub service: ServiceName,
    pub revision: u64,
    pub config: ReleaseConfig,
    pub hash: Digest,
    /// RFC 3339.
    pub created: String,
    /// Why it exists: `apply`, `rollback to 3`, …
    pub cause: String,
    pub outcome: Outcome,
    /// Why it failed, when it did.
    pub reason: Option<String>,
}

impl Release {
    /// A new release about to be rolled out; its hash is its config's.
    /// `created` (RFC 3339) comes from the caller: the core reads no clock.
    pub fn pending(
        service: ServiceName,
        revision: u64,
        config: ReleaseConfig,
        cause: String,
        created: String,
    ) -> Self {
        Self {
            service,
            revision,
            hash: config.hash(),
            config,
            created,
            cause,
            outcome: Outcome::Pending,
            reason: None,
        }
    }
}

#[cfg(test)]
mod label_tests {
    use super::*;

    #[test]
    fn outcomes_read_as_the_api_writes_them() {
        for (o, text) in [
            (Outcome::Pending, "pending"),
            (Outcome::Active, "active"),
            (Outcome::Superseded, "superseded"),
            (Outcome::Failed, "failed"),
        ] {
            assert_eq!(o.to_string(), text);
            assert_eq!(serde_json::to_value(o).unwrap_or_default(), text);
        }
    }

    #[test]
    fn a_release_without_resources_keeps_its_hash() {
        // A config as recorded before resources existed.
        let old = serde_json::json!({
            "image": Digest::of(b"x"),
            "image_name": "hello",
            "command": ["/bin/hello"],
            "workdir": "/",
            "env": {},
            "volumes": {},
            "runtime": "process",
            "health": crate::service::HealthSpec::default(),
            "stop": crate::service::StopSpec::default(),
        });
        let config: ReleaseConfig = serde_json::from_value(old.clone()).unwrap();
        assert!(config.resources.is_none());
        // Written back exactly as it was read: the same bytes, the same hash.
        assert_eq!(serde_json::to_value(&config).unwrap(), old);
        assert!(
            !serde_json::to_string(&config)
                .unwrap()
                .contains("resources")
        );
        let mut more = config.clone();
        more.resources.cpu_millis = 500;
        assert_ne!(more.hash(), config.hash(), "resources are content");
    }

    #[test]
    fn a_pinned_name_is_not_followed_by_its_digest_again() {
        let d = Digest::of(b"x");
        let short = d.short().to_owned();
        assert_eq!(image_label("hello", &d, true), format!("hello@{short}"));
        assert_eq!(image_label("hello", &d, false), format!("hello@{d}"));
        let pinned = format!("127.0.0.1:5000/team/hello@{d}");
        assert_eq!(image_label(&pinned, &d, true), pinned);
        assert_eq!(image_label(&pinned, &d, false), pinned);
    }
}

/// The most pages a service may bring, and the largest one.
pub const MAX_ERROR_PAGES: usize = 20;
pub const MAX_ERROR_PAGE: usize = 64 * 1024;

/// A service's error pages are error statuses, few and small (they live in
/// the state store, and every node holds them).
pub fn check_error_pages(pages: &BTreeMap<u16, String>) -> Result<(), String> {
    if pages.len() > MAX_ERROR_PAGES {
        return Err(format!(
            "error_pages: {} pages, at most {MAX_ERROR_PAGES}",
            pages.len()
        ));
    }
    for (status, page) in pages {
        if !(400..=599).contains(status) {
            return Err(format!(
                "error_pages: {status} is not an error status (400 to 599)"
            ));
        }
        if page.len() > MAX_ERROR_PAGE {
            return Err(format!(
                "error_pages: the page for {status} is {} bytes, at most {MAX_ERROR_PAGE}",
                page.len()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod error_page_tests {
    use super::*;

    #[test]
    fn error_pages_are_error_statuses_few_and_small() {
        let page = |n: usize| "x".repeat(n);
        let ok: BTreeMap<u16, String> = [(400, page(10)), (599, page(MAX_ERROR_PAGE))].into();
        assert_eq!(check_error_pages(&ok), Ok(()));
        for (status, len, why) in [
            (399, 1, "not an error status"),
            (600, 1, "not an error status"),
            (503, MAX_ERROR_PAGE + 1, "at most 65536"),
        ] {
            let err = check_error_pages(&[(status, page(len))].into()).unwrap_err();
            assert!(err.contains(why), "{status}: {err}");
        }
        let many: BTreeMap<u16, String> = (400..400 + MAX_ERROR_PAGES as u16 + 1)
            .map(|s| (s, page(1)))
            .collect();
        assert!(check_error_pages(&many).unwrap_err().contains("at most 20"));
        let just: BTreeMap<u16, String> = (400..400 + MAX_ERROR_PAGES as u16)
            .map(|s| (s, page(1)))
            .collect();
        assert_eq!(check_error_pages(&just), Ok(()));
    }
}
