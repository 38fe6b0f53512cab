//! Events: every change the agent records, as one closed enum. The ledger
//! hash-chains these, so their encoding is fixed here.
//!
//! **Encoding, version 1.** A change is a JSON object: `"kind"` (the
//! variant's name in kebab-case) first, then the variant's fields in the
//! order they are declared below, compact, as `serde_json` writes a typed
//! value ([`Change::canonical`]). Its subject (service, release, instance)
//! is recorded beside it, not inside. A field is only ever added at the end
//! of a variant, as an `Option` omitted when `None`, so that what was
//! written before still reads; anything else is a new variant. The state
//! store keeps `kind` in a column of its own and the other fields as the
//! event's detail.

use serde::{Deserialize, Serialize};

use crate::counters::Window;
use crate::digest::Digest;
use crate::service::{CanaryStep, Pause};

/// Who made a change: the user whose command it was, or the agent on its
/// own (reconciling, healing, a rollout's analysis). Written as `uid:1000`
/// or `agent`, or `token:NAME` for a remote caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Actor {
    /// A local user, by the uid the API socket's peer credentials give.
    Local {
        uid: u32,
    },
    /// A remote caller, by the name of the API token it presented.
    Token {
        name: crate::auth::TokenName,
    },
    Agent,
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local { uid } => write!(f, "uid:{uid}"),
            Self::Token { name } => write!(f, "token:{name}"),
            Self::Agent => f.write_str("agent"),
        }
    }
}

impl std::str::FromStr for Actor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(name) = s.strip_prefix("token:") {
            return crate::auth::TokenName::try_from(name)
                .map(|name| Self::Token { name })
                .map_err(|_| format!("invalid actor `{s}`"));
        }
        match s.strip_prefix("uid:") {
            Some(uid) => uid
                .parse()
                .map(|uid| Self::Local { uid })
                .map_err(|_| format!("invalid actor `{s}`")),
            None if s == "agent" => Ok(Self::Agent),
            None => Err(format!("invalid actor `{s}`")),
        }
    }
}

impl Serialize for Actor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Actor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One change the agent made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Change {
    /// `kiln apply` recorded a new release (the subject's revision).
    ReleaseCreated {
        image: Digest,
        hash: Digest,
        /// What differs from the release before (env keys, never values).
        changes: Vec<String>,
        /// Who signed the image, as checked by the apply (`SHA256:…`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signed_by: Option<Vec<String>>,
    },
    /// `kiln apply` changed settings (replicas, listen, rollout, router)
    /// without a new release.
    ServiceSettings {
        changes: Vec<String>,
    },
    /// The release is what the service runs now.
    ReleaseActive {},
    /// A later release took over.
    ReleaseSuperseded {
        by: u64,
    },
    /// The release's rollout failed, or was abandoned.
    ReleaseFailed {
        reason: String,
    },
    /// The rollout failed and `auto_rollback = false` left it where it was.
    RolloutPaused {
        reason: String,
    },
    /// The service returns to an earlier release's content: by hand (`kiln
    /// rollback`, with `to`), or after a failed rollout (with its reason;
    /// a canary's abort also says how long the route swap took).
    Rollback {
        from: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<u64>,
        automatic: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        swap_us: Option<u64>,
    },
    /// Blue-green: traffic moved to the release; the old fleet stays warm
    /// for `warm_for`.
    Promoted {
        warm_for: String,
    },
    CanaryStarted {
        stable: u64,
        steps: Vec<CanaryStep>,
    },
    /// A canary step took its weight (`step` of `of`, 1-based).
    CanaryStep {
        step: usize,
        of: usize,
        weight: u32,
        pause: Pause,
    },
    /// A canary step passed its analysis (or was promoted by hand).
    CanaryStepPassed {
        step: usize,
        weight: u32,
        promoted: bool,
        canary: Window,
        stable: Window,
    },
    InstanceStarted {
        pid: u32,
        port: u16,
        slot: u32,
    },
    InstanceStartFailed {
        error: String,
    },
    /// Its startup probe passed.
    InstanceStartedUp {},
    InstanceReady {},
    InstanceUnready {},
    InstanceLive {},
    InstanceLivenessFailed {},
    InstanceStopping {
        reason: String,
    },
    /// `requested`: the agent stopped it (else it exited on its own).
    InstanceExited {
        status: String,
        requested: bool,
    },
    /// A warm instance of release `from` with the same content now serves
    /// the subject's release (a rollback as a route swap).
    InstanceAdopted {
        from: u64,
        reason: String,
    },
    /// Found by an agent after a crash of the one that ran it.
    InstanceLost {
        reason: String,
        killed: bool,
    },
    /// `kiln promote`: a blue-green rollout may switch, or a canary's
    /// current step (`step`, 1-based) may pass.
    PromoteRequested {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<u32>,
    },
    /// `kiln remove` or `kiln apply --prune`: the service was removed (its
    /// instances stopped, its routes and listener gone); `release` is the
    /// one it was on. Its releases and events stay.
    ServiceRemoved {
        release: u64,
    },
    /// `kiln token create`: an API token was made (its hash kept, never
    /// the token).
    TokenCreated {
        name: crate::auth::TokenName,
        role: crate::auth::Role,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires: Option<u64>,
    },
    /// `kiln token revoke`: an API token no longer authenticates.
    TokenRevoked {
        name: crate::auth::TokenName,
    },
    /// `kiln drain NODE` (`drained`) or `kiln undrain NODE`: the node takes
    /// no new instance and the leader moves its instances to the others,
    /// or it takes them again.
    NodeDrain {
        node: String,
        drained: bool,
    },
    /// `kiln pause SERVICE`: its new requests wait at the router (at most
    /// `timeout_ms`, then 503) until `kiln resume`.
    ServicePaused {
        timeout_ms: u64,
    },
    /// `kiln resume SERVICE`: the requests waiting go on.
    ServiceResumed {},
    /// A bake (`kiln bake`, or the bake of an apply) wrote an image:
    /// its name, digest and tags, and its provenance annotations (commit,
    /// dirty flag, source).
    ImageBaked {
        image: String,
        digest: Digest,
        tags: Vec<String>,
        #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        provenance: std::collections::BTreeMap<String, String>,
    },
    /// `kiln run`: a one-off instance of a release ran a command (its
    /// argv, how it ended, how long it took, and the digest of its output,
    /// stdout and stderr as they came).
    CommandRun {
        argv: Vec<String>,
        status: String,
        duration_ms: u64,
        output: Digest,
    },
    /// A release task ran (`pre_deploy`, `pre_rollback`) as a one-off
    /// instance of the release it belongs to: its argv, how it ended, how
    /// long it took, the digest of its output (kept in its log).
    HookRun {
        hook: String,
        argv: Vec<String>,
        status: String,
        duration_ms: u64,
        output: Digest,
    },
    /// `kiln exec`: a command ran inside a running instance (break-glass);
    /// unless `kept` (an admin's `--keep`), the instance is then tainted
    /// and replaced from its image.
    InstanceExec {
        argv: Vec<String>,
        status: String,
        kept: bool,
    },
    /// `kiln pull` (or an apply) brought an image from a registry.
    ImagePulled {
        image: String,
        digest: Digest,
        from: String,
    },
    /// The drift detector found an image's tree differing from its
    /// manifest: `count` files, the first of them named with how each
    /// differs; `found_by` is `watch` (a change as it happened) or
    /// `verification` (the periodic full check). `repaired`: the tree was
    /// moved to `quarantine` and a fresh one made from the verified blobs,
    /// and the instances of `services` that ran it are replaced.
    TreeDrift {
        image: Digest,
        files: Vec<crate::drift::DriftedFile>,
        count: usize,
        found_by: crate::drift::FoundBy,
        repaired: bool,
        services: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quarantine: Option<String>,
        /// Why no fresh tree could be made.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// An instance's root process no longer has the command line or
    /// environment its release launched (names only, never values): it is
    /// replaced.
    ConfigDrift {
        differs: Vec<String>,
    },
    /// The agent started with a trust policy (`kiln serve --trust FILE`)
    /// other than the last one recorded: what it now enforces (`none`:
    /// it enforces none). Signers are fingerprints.
    TrustPolicy {
        file: String,
        require_signed: bool,
        allowed_signers: Vec<String>,
    },
    /// The agent found its own ledger broken (at start, or at its periodic
    /// verification): the first bad entry when one can be named, and why.
    /// It keeps serving; every later `kiln audit verify` fails on this.
    LedgerBroken {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        reason: String,
    },
}

impl Change {
    /// Whether the change moves what its service should run (its
    /// settings, or the release it is driven to): what wakes the service's
    /// controller when it comes through the state store's watch.
    pub fn moves_target(&self) -> bool {
        matches!(
            self,
            Self::ReleaseCreated { .. } | Self::ServiceSettings { .. } | Self::Rollback { .. }
        )
    }

    /// The `kind` of its encoding.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ReleaseCreated { .. } => "release-created",
            Self::ServiceSettings { .. } => "service-settings",
            Self::ReleaseActive {} => "release-active",
            Self::ReleaseSuperseded { .. } => "release-superseded",
            Self::ReleaseFailed { .. } => "release-failed",
            Self::RolloutPaused { .. } => "rollout-paused",
            Self::Rollback { .. } => "rollback",
            Self::Promoted { .. } => "promoted",
            Self::CanaryStarted { .. } => "canary-started",
            Self::CanaryStep { .. } => "canary-step",
            Self::CanaryStepPassed { .. } => "canary-step-passed",
            Self::InstanceStarted { .. } => "instance-started",
            Self::InstanceStartFailed { .. } => "instance-start-failed",
            Self::InstanceStartedUp {} => "instance-started-up",
            Self::InstanceReady {} => "instance-ready",
            Self::InstanceUnready {} => "instance-unready",
            Self::InstanceLive {} => "instance-live",
            Self::InstanceLivenessFailed {} => "instance-liveness-failed",
            Self::InstanceStopping { .. } => "instance-stopping",
            Self::InstanceExited { .. } => "instance-exited",
            Self::InstanceAdopted { .. } => "instance-adopted",
            Self::InstanceLost { .. } => "instance-lost",
            Self::PromoteRequested { .. } => "promote-requested",
            Self::ServiceRemoved { .. } => "service-removed",
            Self::TokenCreated { .. } => "token-created",
            Self::TokenRevoked { .. } => "token-revoked",
            Self::NodeDrain { .. } => "node-drain",
            Self::ServicePaused { .. } => "service-paused",
            Self::ServiceResumed {} => "service-resumed",
            Self::ImageBaked { .. } => "image-baked",
            Self::ImagePulled { .. } => "image-pulled",
            Self::CommandRun { .. } => "command-run",
            Self::HookRun { .. } => "hook-run",
            Self::InstanceExec { .. } => "instance-exec",
            Self::TreeDrift { .. } => "tree-drift",
            Self::ConfigDrift { .. } => "config-drift",
            Self::TrustPolicy { .. } => "trust-policy",
            Self::LedgerBroken { .. } => crate::ledger::BROKEN,
        }
    }

    /// The canonical encoding (version 1, see the module's doc).
    pub fn canonical(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The fields without `kind`: the detail a store keeps beside the kind.
    pub fn detail(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(fields) = v.as_object_mut() {
            fields.remove("kind");
        }
        v
    }

    /// A change from a stored kind and detail.
    pub fn from_parts(kind: &str, detail: serde_json::Value) -> Result<Self, serde_json::Error> {
        let mut fields = match detail {
            serde_json::Value::Object(m) => m,
            // Events recorded before details were typed had `{}` at least.
            _ => serde_json::Map::new(),
        };
        fields.insert("kind".to_owned(), serde_json::Value::from(kind));
        serde_json::from_value(serde_json::Value::Object(fields))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Duration;

    #[test]
    fn only_a_new_release_new_settings_or_a_rollback_move_a_services_target() {
        // `every()` holds each kind at least once (some twice, in both
        // shapes).
        let moving: std::collections::BTreeSet<&str> = every()
            .iter()
            .filter(|c| c.moves_target())
            .map(Change::kind)
            .collect();
        assert_eq!(
            moving,
            ["release-created", "rollback", "service-settings"].into()
        );
    }

    fn every() -> Vec<Change> {
        let w = Window {
            requests: 100,
            errors: 1,
            error_rate: 0.01,
            p99_ms: Some(2.5),
        };
        vec![
            Change::ReleaseCreated {
                image: Digest::of(b"i"),
                hash: Digest::of(b"h"),
                changes: vec!["env A".into()],
                signed_by: None,
            },
            Change::ReleaseCreated {
                image: Digest::of(b"i"),
                hash: Digest::of(b"h"),
                changes: vec![],
                signed_by: Some(vec!["SHA256:abc".into()]),
            },
            Change::ServiceSettings {
                changes: vec!["replicas 1 -> 2".into()],
            },
            Change::ReleaseActive {},
            Change::ReleaseSuperseded { by: 3 },
            Change::ReleaseFailed {
                reason: "crash loop".into(),
            },
            Change::RolloutPaused {
                reason: "deadline".into(),
            },
            Change::Rollback {
                from: 3,
                to: Some(1),
                automatic: false,
                reason: None,
                swap_us: None,
            },
            Change::Rollback {
                from: 3,
                to: None,
                automatic: true,
                reason: Some("canary failed".into()),
                swap_us: Some(11),
            },
            Change::Promoted {
                warm_for: "5m".into(),
            },
            Change::CanaryStarted {
                stable: 1,
                steps: vec![CanaryStep {
                    weight: 10,
                    pause: Pause::Manual,
                }],
            },
            Change::CanaryStep {
                step: 1,
                of: 2,
                weight: 10,
                pause: Pause::For(Duration::from_secs(30)),
            },
            Change::CanaryStepPassed {
                step: 1,
                weight: 10,
                promoted: false,
                canary: w,
                stable: w,
            },
            Change::InstanceStarted {
                pid: 7,
                port: 8080,
                slot: 0,
            },
            Change::InstanceStartFailed { error: "x".into() },
            Change::InstanceStartedUp {},
            Change::InstanceReady {},
            Change::InstanceUnready {},
            Change::InstanceLive {},
            Change::InstanceLivenessFailed {},
            Change::InstanceStopping {
                reason: "scale down".into(),
            },
            Change::InstanceExited {
                status: "exit status: 0".into(),
                requested: true,
            },
            Change::InstanceAdopted {
                from: 1,
                reason: "same content, still warm".into(),
            },
            Change::InstanceLost {
                reason: "agent gone".into(),
                killed: true,
            },
            Change::PromoteRequested { step: Some(2) },
            Change::PromoteRequested { step: None },
            Change::ServiceRemoved { release: 4 },
            Change::TokenCreated {
                name: crate::auth::TokenName::try_from("ci").unwrap(),
                role: crate::auth::Role::Deployer,
                expires: Some(1_800_000_000),
            },
            Change::TokenRevoked {
                name: crate::auth::TokenName::try_from("ci").unwrap(),
            },
            Change::NodeDrain {
                node: "n2".into(),
                drained: true,
            },
            Change::ServicePaused { timeout_ms: 30_000 },
            Change::ServiceResumed {},
            Change::ImageBaked {
                image: "app".into(),
                digest: Digest::of(b"m"),
                tags: vec!["v1".into()],
                provenance: [(
                    "org.opencontainers.image.revision".to_owned(),
                    "abc".to_owned(),
                )]
                .into(),
            },
            Change::ImagePulled {
                image: "app".into(),
                digest: Digest::of(b"m"),
                from: "registry.example/app:v1".into(),
            },
            Change::HookRun {
                hook: "pre_deploy".into(),
                argv: vec!["migrate".into()],
                status: "exit status: 0".into(),
                duration_ms: 40,
                output: Digest::of(b"o"),
            },
            Change::InstanceExec {
                argv: vec!["sh".into()],
                status: "exit status: 0".into(),
                kept: false,
            },
            Change::CommandRun {
                argv: vec!["migrate".into(), "--up".into()],
                status: "exit status: 0".into(),
                duration_ms: 12,
                output: Digest::of(b"o"),
            },
            Change::TreeDrift {
                image: Digest::of(b"m"),
                files: vec![crate::drift::DriftedFile {
                    path: "app/main.py".into(),
                    how: "content changed".into(),
                }],
                count: 1,
                found_by: crate::drift::FoundBy::Watch,
                repaired: true,
                services: vec!["web".into()],
                quarantine: Some("quarantine/abc-1".into()),
                error: None,
            },
            Change::TreeDrift {
                image: Digest::of(b"m"),
                files: vec![],
                count: 0,
                found_by: crate::drift::FoundBy::Verification,
                repaired: false,
                services: vec![],
                quarantine: None,
                error: Some("blob corrupt".into()),
            },
            Change::ConfigDrift {
                differs: vec!["environment: A changed".into()],
            },
        ]
    }

    #[test]
    fn every_change_round_trips_through_its_stored_parts_and_names_its_kind() {
        for c in every() {
            let encoded: serde_json::Value = serde_json::from_slice(&c.canonical()).unwrap();
            assert_eq!(encoded["kind"], c.kind(), "{c:?}");
            assert!(c.detail().get("kind").is_none());
            assert_eq!(Change::from_parts(c.kind(), c.detail()).unwrap(), c);
        }
    }

    /// The encoding is what the ledger chains: a change here is a new
    /// version, on purpose.
    #[test]
    fn the_canonical_encoding_is_pinned() {
        let c = Change::InstanceStarted {
            pid: 7,
            port: 8080,
            slot: 0,
        };
        assert_eq!(
            String::from_utf8(c.canonical()).unwrap(),
            r#"{"kind":"instance-started","pid":7,"port":8080,"slot":0}"#
        );
        let r = Change::Rollback {
            from: 3,
            to: Some(1),
            automatic: false,
            reason: None,
            swap_us: None,
        };
        assert_eq!(
            String::from_utf8(r.canonical()).unwrap(),
            r#"{"kind":"rollback","from":3,"to":1,"automatic":false}"#
        );
        assert_eq!(
            String::from_utf8(Change::ReleaseActive {}.canonical()).unwrap(),
            r#"{"kind":"release-active"}"#
        );
    }

    #[test]
    fn an_actor_is_written_and_read_back() {
        for a in [
            Actor::Local { uid: 1000 },
            Actor::Local { uid: 0 },
            Actor::Token {
                name: crate::auth::TokenName::try_from("ci-deploy").unwrap(),
            },
            Actor::Agent,
        ] {
            assert_eq!(a.to_string().parse::<Actor>().unwrap(), a);
        }
        assert_eq!(Actor::Local { uid: 1000 }.to_string(), "uid:1000");
        for bad in ["uid:", "uid:-1", "root", "", "token:", "token:A B"] {
            assert!(bad.parse::<Actor>().is_err(), "{bad}");
        }
    }

    /// Details as the agent wrote them before they were typed still read.
    #[test]
    fn details_recorded_before_typing_still_read() {
        let old = serde_json::json!({"from": 2, "automatic": true, "reason": "deadline"});
        assert_eq!(
            Change::from_parts("rollback", old).unwrap(),
            Change::Rollback {
                from: 2,
                to: None,
                automatic: true,
                reason: Some("deadline".into()),
                swap_us: None
            }
        );
        assert_eq!(
            Change::from_parts("release-active", serde_json::json!({})).unwrap(),
            Change::ReleaseActive {}
        );
        assert!(Change::from_parts("no-such-kind", serde_json::json!({})).is_err());
    }
}
