//! The agent's API: JSON bodies over HTTP on a Unix socket. Requests parse
//! strictly (unknown fields are refused); each endpoint is one variant of
//! the agent's closed command set.
//!
//! | method and path | body → answer |
//! |---|---|
//! | `POST /v1/apply` | [`ApplyRequest`] → [`ApplyResponse`] |
//! | `GET /v1/status` | → [`StatusResponse`] |
//! | `GET /v1/services/{name}/history` | → [`HistoryResponse`] |
//! | `POST /v1/services/{name}/rollback` | [`RollbackRequest`] → [`RollbackResponse`] |
//! | `POST /v1/services/{name}/promote` | → [`PromoteResponse`] |
//! | `POST /v1/services/{name}/abort` | → [`AbortResponse`] |
//! | `GET /v1/logs?service=S[&release=N][&instance=ID][&follow=true]` | → text lines |
//! | `POST /v1/records` | [`RecordRequest`] → [`RecordResponse`] |
//!
//! Errors answer `{"error": "..."}` with the status of their kind.

use serde::{Deserialize, Serialize};

use crate::plan::Plan;
use crate::release::{DesiredService, Outcome, Release};
use crate::service::RuntimeKind;
use crate::spec::ServiceName;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyRequest {
    pub services: Vec<DesiredService>,
    /// Only compute the plan (`kiln plan`).
    #[serde(default)]
    pub dry_run: bool,
    /// Whether each service named its runtime; if not, the agent picks
    /// `sandbox` when bubblewrap is installed, else `process`.
    #[serde(default)]
    pub explicit_runtime: Vec<ServiceName>,
    /// Remove the services the agent runs that are not in `services`
    /// (`kiln apply --prune`); else they are left running and listed.
    #[serde(default)]
    pub prune: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResponse {
    pub plan: Plan,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusResponse {
    pub agent: AgentInfo,
    pub services: Vec<ServiceStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub pid: u32,
    pub version: String,
    pub home: String,
    /// Whether bubblewrap is available (the `sandbox` runtime).
    pub sandbox_available: bool,
    /// Whether the embedded OCI runtime is (`oci`: the agent is root); the
    /// default where bubblewrap is missing.
    #[serde(default)]
    pub oci_available: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: ServiceName,
    pub replicas: u32,
    /// The release the service is on or moving to.
    pub revision: Option<u64>,
    pub outcome: Option<Outcome>,
    /// Instances of `revision` that are ready.
    pub ready: u32,
    /// Whether the service runs exactly `replicas` ready instances of
    /// `revision` and nothing else.
    pub converged: bool,
    pub instances: Vec<InstanceStatus>,
    /// Replica slots waiting out a crash-loop back-off.
    pub backoff: Vec<SlotBackoff>,
    /// Why the service is not converging, when known.
    pub message: Option<String>,
    /// The rollout failed with `auto_rollback = false` and is paused: old
    /// and new instances stay, nothing new starts; `kiln apply` reports it
    /// as failed.
    #[serde(default)]
    pub stalled: bool,
    /// The canary rollout in progress, if any.
    #[serde(default)]
    pub canary: Option<CanaryStatus>,
    /// The newest release, when it failed and the service went back to an
    /// earlier one: which, and why (kept until the next release).
    #[serde(default)]
    pub failed_release: Option<FailedRelease>,
    /// The release that gets the traffic when only one does (blue-green:
    /// the old fleet's until the switch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routed: Option<u64>,
    /// The instances of other releases are a blue-green fleet kept warm
    /// after the switch (so that a rollback is a route swap).
    #[serde(default)]
    pub warm: bool,
    /// The release went live and is watched until then (RFC 3339):
    /// crash-looping before it returns the service to the release before
    /// (`rollout.watch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watched_until: Option<String>,
    /// Where the router serves it (`https://0.0.0.0:443 example.com/api`,
    /// with `(acme)` or `(files)` for its certificate and its redirect);
    /// none for a worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serves: Option<String>,
    /// An ACME certificate's standing: issued and when it renews, or why
    /// its last order failed and when the next one goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// `kiln pause`: its requests wait at the router, at most this many
    /// milliseconds, until `kiln resume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_ms: Option<u64>,
}

/// Where the router serves a service, as status shows it.
pub fn serves(settings: &crate::release::ServiceSettings) -> Option<String> {
    let listen = settings.listen?;
    let mut out = match &settings.tls {
        None => format!("http://{} {}", listen.0, settings.route),
        Some(t) => {
            let source = if t.acme.is_some() { "acme" } else { "files" };
            format!(
                "https://{} {} ({source} certificate)",
                listen.0, settings.route
            )
        }
    };
    if let Some(from) = settings.tls.as_ref().and_then(|t| t.redirect_from) {
        out.push_str(&format!(", redirected from http://{}", from.0));
    }
    Some(out)
}

/// A cluster's instances of a service, counted over every node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FleetCounts {
    /// Of the target, not stopping, and ready.
    pub ready: u32,
    /// Of the target, not stopping.
    pub running: u32,
    /// Every instance, of any release.
    pub instances: u32,
}

/// What a service's controller saw at its last pass: what only it knows.
/// [`ServiceStatus::of`] joins it with what the state store says now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reconciled {
    /// The target release that pass reconciled towards.
    pub target: u64,
    /// In a cluster, the whole fleet's counts (every node's instances, as
    /// the store has them): what `ready` and `converged` say; `instances`
    /// stay this node's. `None`: on its own, this node's are the fleet.
    pub fleet: Option<FleetCounts>,
    pub instances: Vec<InstanceStatus>,
    pub backoff: Vec<SlotBackoff>,
    pub message: Option<String>,
    pub stalled: bool,
    pub canary: Option<CanaryStatus>,
    /// A blue-green fleet kept warm after its switch (expected beside the
    /// target, not a rollout in progress).
    pub warm: bool,
    /// The one release that gets the traffic, when only one does
    /// (blue-green: the old fleet's until the switch).
    pub routed: Option<u64>,
    /// The target is watched after it went live, until then (RFC 3339).
    pub watched_until: Option<String>,
    /// The settings that pass acted on (its routes' timeout and limits, its
    /// replicas): until a pass has seen the service's current settings, a
    /// settings change has not reached the router yet. `None`: not known.
    pub settings: Option<crate::release::ServiceSettings>,
}

impl ServiceStatus {
    /// The status of service `name` from one view: its settings and target
    /// and its current releases as stored now (at least the target and the
    /// newest: `ClusterState::current_releases`), and what its controller last saw
    /// (`None` before its first pass). `now` dates the instances' uptime.
    pub fn of(
        name: &ServiceName,
        settings: &crate::release::ServiceSettings,
        target: u64,
        releases: &[crate::release::Release],
        seen: Option<&Reconciled>,
        now: std::time::SystemTime,
    ) -> Self {
        let replicas = settings.replicas;
        let empty = Reconciled::default();
        let seen = seen.unwrap_or(&empty);
        // Just after an apply the controller has not reported on the new
        // target yet: what it said of its rollout (a pause, a stall, a
        // canary step) was about the release before.
        let current = seen.target == target;
        let mut instances = seen.instances.clone();
        for i in &mut instances {
            if let Ok(t) = humantime::parse_rfc3339(&i.started) {
                i.uptime_secs = now.duration_since(t).map_or(0.0, |d| d.as_secs_f64());
            }
        }
        let on_target =
            |i: &&InstanceStatus| i.revision == target && i.state != InstanceState::Stopping;
        let (ready, running, all) = match seen.fleet {
            Some(f) => (f.ready, f.running, f.instances as usize),
            None => (
                instances
                    .iter()
                    .filter(on_target)
                    .filter(|i| i.ready)
                    .count() as u32,
                instances.iter().filter(on_target).count() as u32,
                instances.len(),
            ),
        };
        // A settings change (a timeout) is converged once a pass acted on it.
        let settings_seen = seen.settings.as_ref().is_none_or(|s| s == settings);
        let converged = current
            && settings_seen
            && ready == replicas
            && running == replicas
            && (seen.warm || running as usize == all);
        Self {
            name: name.clone(),
            replicas,
            revision: Some(target),
            outcome: releases
                .iter()
                .find(|r| r.revision == target)
                .map(|r| r.outcome),
            ready,
            converged,
            instances,
            // Only the target's slots: a failed or scaled-away release's
            // back-off is no longer anyone's business.
            backoff: seen
                .backoff
                .iter()
                .filter(|b| current && b.revision == target && b.slot < replicas)
                .cloned()
                .collect(),
            message: seen.message.clone().filter(|_| current),
            stalled: current && seen.stalled,
            canary: seen.canary.clone().filter(|_| current),
            routed: seen.routed.filter(|_| current),
            warm: current && seen.warm,
            watched_until: seen.watched_until.clone().filter(|_| current),
            serves: serves(settings),
            paused_ms: None,
            certificate: None,
            failed_release: releases
                .iter()
                .max_by_key(|r| r.revision)
                .filter(|r| r.revision > target && r.outcome == Outcome::Failed)
                .map(|r| FailedRelease {
                    revision: r.revision,
                    reason: r.reason.clone().unwrap_or_default(),
                }),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedRelease {
    pub revision: u64,
    pub reason: String,
}

/// A canary rollout: where it is, and the numbers its analysis reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CanaryStatus {
    /// The canary release and the stable one it is compared with.
    pub revision: u64,
    pub stable: u64,
    /// The current step, 1-based, of `steps`.
    pub step: u32,
    pub steps: u32,
    /// The share of requests the router sends to the canary now (percent).
    pub weight: u32,
    /// What the step waits for: its fleet, its pause, requests, or promotion.
    pub waiting: String,
    /// This step's window so far, for the canary and for stable.
    pub canary_window: Window,
    pub stable_window: Window,
}

/// A canary's window, as status shows it (defined with the counters).
pub use crate::counters::Window;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub id: String,
    /// The node it runs on (in a cluster, the agent's own: each node shows
    /// its instances).
    #[serde(default)]
    pub node: String,
    pub revision: u64,
    pub slot: u32,
    pub pid: Option<u32>,
    pub port: u16,
    pub state: InstanceState,
    pub ready: bool,
    pub live: bool,
    /// How many instances this slot has replaced so far.
    pub replacements: u32,
    pub started: String,
    pub uptime_secs: f64,
    pub runtime: RuntimeKind,
    /// Whether the kernel enforces the read-only root (sandbox) or not (process).
    pub read_only_root: bool,
    /// It runs with the host's `/usr` and loader paths (its image has no
    /// userland of its own, or it is a plain process): the host's packages
    /// change what it runs.
    #[serde(default)]
    pub borrows_host: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    Starting,
    Running,
    Stopping,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotBackoff {
    pub revision: u64,
    pub slot: u32,
    pub failures: u32,
    pub retry_in_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryResponse {
    pub releases: Vec<Release>,
    /// The release the service is on or heading to, read after `releases`:
    /// a failed release seen here comes with the target its rollback set.
    /// (Of a removed service: the release it was on when removed.)
    pub target: u64,
    /// The service was removed (`kiln remove`); its history stays.
    #[serde(default)]
    pub removed: bool,
}

/// `POST /v1/tokens`: make a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCreateRequest {
    pub name: crate::auth::TokenName,
    pub role: crate::auth::Role,
    /// Seconds from now; `None`: never expires.
    #[serde(default)]
    pub expires_in: Option<u64>,
}

/// The token, shown this once, and what the agent keeps of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreateResponse {
    pub token: String,
    pub record: crate::auth::TokenRecord,
}

/// `GET /v1/tokens`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenListResponse {
    pub tokens: Vec<crate::auth::TokenRecord>,
}

/// `POST /v1/tokens/{name}/revoke`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRevokeResponse {
    pub name: crate::auth::TokenName,
}

/// `POST /v1/records`: a bake or a pull the CLI made into the agent's
/// store, for its ledger (the CLI never writes the state itself). Only
/// `image-baked` and `image-pulled`, of an image the store holds; the
/// actor is the caller.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordRequest {
    pub change: crate::event::Change,
}

/// `POST /v1/services/NAME/run` (`kiln run`): a command in a one-off
/// instance of a release (`None`: the active one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    #[serde(default)]
    pub release: Option<u64>,
    pub argv: Vec<String>,
    /// The rest of the request's body (after this JSON and its newline)
    /// is the command's standard input (`kiln run -i`).
    #[serde(default)]
    pub stdin: bool,
}

/// `POST /v1/instances/ID/exec` (`kiln exec`): a command inside a running
/// instance; `keep` (an admin's): it is not replaced afterwards.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub keep: bool,
    /// As [`RunRequest::stdin`] (`kiln exec -i`).
    #[serde(default)]
    pub stdin: bool,
}

/// One line of the answer to a [`RunRequest`] or an [`ExecRequest`]
/// (JSON, one per line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunFrame {
    /// The instance started.
    Started { id: String, revision: u64 },
    /// Output: `stream` 1 (stdout) or 2 (stderr), the bytes in base64.
    Output { stream: u8, data: String },
    /// It ended: how (`exit status: 3`), its exit code (128 + the signal
    /// for one ended by a signal), how long it ran.
    Exited {
        status: String,
        code: i32,
        duration_ms: u64,
    },
}

/// An exit code from a status as the runtime words it (`exit status: 3`,
/// `signal: 9 (SIGKILL)`): the code, or 128 + the signal (a shell's way);
/// 1 when it says neither.
pub fn exit_code(status: &str) -> i32 {
    let number = |after: &str| -> Option<i32> {
        let rest = &status[status.find(after)? + after.len()..];
        rest.trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    if let Some(code) = number("exit status:") {
        code
    } else if let Some(signal) = number("signal:") {
        128 + signal
    } else {
        1
    }
}

/// The ledger entry the record became.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordResponse {
    pub seq: u64,
}

/// `POST /v1/gc`: collect the agent's store (as `kiln gc` does locally).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcRequest {
    pub keep_releases: usize,
    pub grace_secs: u64,
    #[serde(default)]
    pub dry_run: bool,
}

/// `GET /v1/audit?after=N`: the ledger after entry N, every checkpoint,
/// and the node's public key (`ed25519 HEX`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditResponse {
    pub key: String,
    /// Every node key the state store lists (`ed25519 HEX`): in a cluster,
    /// each node signs the checkpoints it writes.
    #[serde(default)]
    pub keys: Vec<String>,
    pub entries: Vec<crate::ledger::Entry>,
    pub checkpoints: Vec<crate::ledger::Checkpoint>,
}

/// `GET /v1/drift[?service=NAME]`: what the drift detector watches, its
/// last full verification, and its latest findings (newest first).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DriftResponse {
    pub watching: DriftWatching,
    pub verification: Option<DriftVerification>,
    pub findings: Vec<DriftFinding>,
}

/// The trees watched for changes as they happen.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftWatching {
    pub trees: u64,
    pub directories: u64,
    pub files: u64,
    /// Directories that could not be watched (the verification covers
    /// them), e.g. past `fs.inotify.max_user_watches`.
    pub unwatched: u64,
}

/// The last periodic full verification of every tree.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DriftVerification {
    /// When it finished (RFC 3339).
    pub finished: String,
    pub trees: u64,
    pub files: u64,
    pub bytes: u64,
    pub seconds: f64,
    /// Trees found drifted.
    pub drifted: u64,
    /// How often it runs and how fast it may read (bytes a second, 0:
    /// unpaced).
    pub every: String,
    pub rate: u64,
}

/// One finding, as the ledger recorded it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftFinding {
    /// Its ledger entry.
    pub seq: u64,
    pub time: String,
    /// `tree` or `config`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<crate::digest::Digest>,
    /// The services it affected.
    pub services: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub found_by: Option<String>,
    /// A fresh tree was made (tree), or the instance is replaced (config).
    pub repaired: bool,
    /// Files that differed (tree), of which `files` names the first.
    pub count: usize,
    pub files: Vec<crate::drift::DriftedFile>,
    /// What differs (config).
    pub differs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /v1/whoami`: who the agent takes the caller for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoAmIResponse {
    /// As events record it (`token:NAME`, `uid:N`).
    pub actor: String,
    pub role: crate::auth::Role,
}

/// `POST /v1/services/{name}/remove`: what was removed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveResponse {
    pub service: ServiceName,
    /// The release it was on.
    pub revision: u64,
    /// Instances stopped.
    pub stopped: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `POST /v1/services/{name}/rollback`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The release whose content to return to; default: the latest earlier
    /// release that was active.
    #[serde(default)]
    pub to: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackResponse {
    /// The new release (its content is `to`'s).
    pub revision: u64,
    pub from: u64,
    pub to: u64,
}

/// `POST /v1/services/{name}/promote`: the release now getting traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromoteResponse {
    pub revision: u64,
    /// For a canary: the step (1-based) that was passed; the rollout goes on.
    #[serde(default)]
    pub canary_step: Option<u32>,
}

/// `POST /v1/services/{name}/abort`: the rollout of `revision` stopped, the
/// service back on `back_to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortResponse {
    pub revision: u64,
    pub back_to: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(revision: u64, ready: bool, state: InstanceState) -> InstanceStatus {
        InstanceStatus {
            node: String::new(),
            id: format!("web-r{revision}"),
            revision,
            slot: 0,
            pid: Some(1),
            port: 1,
            state,
            ready,
            live: true,
            replacements: 0,
            started: "2026-12-01T00:00:00Z".to_owned(),
            uptime_secs: 0.0,
            runtime: RuntimeKind::Process,
            read_only_root: false,
            borrows_host: false,
        }
    }

    fn release(revision: u64, outcome: Outcome) -> Release {
        let config: crate::release::ReleaseConfig = serde_json::from_value(serde_json::json!({
            "image": crate::Digest::of(b"x"), "image_name": "x", "command": ["/x"],
            "workdir": "/", "env": {}, "volumes": {}, "runtime": "process",
            "health": {}, "stop": {}
        }))
        .unwrap();
        Release {
            service: ServiceName::try_from("web").unwrap(),
            revision,
            hash: config.hash(),
            config,
            created: String::new(),
            cause: "apply".to_owned(),
            outcome,
            reason: (outcome == Outcome::Failed).then(|| "deadline".to_owned()),
        }
    }

    fn status(target: u64, releases: &[Release], seen: &Reconciled) -> ServiceStatus {
        let now = humantime::parse_rfc3339("2026-12-01T00:00:10Z").unwrap();
        let name = ServiceName::try_from("web").unwrap();
        let settings = crate::release::ServiceSettings {
            replicas: 1,
            listen: None,
            route: Default::default(),
            tls: None,
            rollout: crate::service::RolloutSpec::default(),
            timeout: crate::service::Duration::from_secs(30),
            router: crate::service::RouterSpec::default(),
            node_labels: Default::default(),
            error_pages: Default::default(),
        };
        ServiceStatus::of(&name, &settings, target, releases, Some(seen), now)
    }

    #[test]
    fn status_is_converged_only_on_the_target_with_nothing_else() {
        let releases = [release(1, Outcome::Superseded), release(2, Outcome::Active)];
        let mut seen = Reconciled {
            target: 2,
            instances: vec![inst(2, true, InstanceState::Running)],
            ..Reconciled::default()
        };
        let s = status(2, &releases, &seen);
        assert!(s.converged);
        assert_eq!((s.ready, s.outcome), (1, Some(Outcome::Active)));
        assert_eq!(s.instances[0].uptime_secs, 10.0, "uptime as of now");
        // An old instance still stopping: not converged, unless kept warm.
        seen.instances.push(inst(1, true, InstanceState::Stopping));
        assert!(!status(2, &releases, &seen).converged);
        seen.warm = true;
        assert!(status(2, &releases, &seen).converged);
        // In a cluster the fleet's counts decide, whatever this node runs.
        seen.warm = false;
        seen.fleet = Some(FleetCounts {
            ready: 1,
            running: 1,
            instances: 1,
        });
        assert!(status(2, &releases, &seen).converged);
        seen.instances.clear();
        seen.fleet = Some(FleetCounts {
            ready: 0,
            running: 1,
            instances: 1,
        });
        let s = status(2, &releases, &seen);
        assert!(!s.converged);
        assert_eq!(s.ready, 0);
        seen.fleet = Some(FleetCounts {
            ready: 1,
            running: 1,
            instances: 2,
        });
        assert!(
            !status(2, &releases, &seen).converged,
            "another release still runs"
        );
    }

    #[test]
    fn status_after_an_apply_the_controller_has_not_seen_says_nothing_stale() {
        let releases = [release(1, Outcome::Active), release(2, Outcome::Pending)];
        let seen = Reconciled {
            target: 1,
            instances: vec![inst(1, true, InstanceState::Running)],
            message: Some("about release 1".to_owned()),
            stalled: true,
            ..Reconciled::default()
        };
        let s = status(2, &releases, &seen);
        assert!(!s.converged);
        assert_eq!(s.revision, Some(2));
        assert_eq!(s.outcome, Some(Outcome::Pending));
        assert_eq!((s.message, s.stalled), (None, false));
    }

    /// Issue 13: "retry in 483 ms" stayed in status after the rollback
    /// finished, or after scaling to 0.
    #[test]
    fn status_shows_only_the_back_off_of_the_targets_slots() {
        let releases = [release(1, Outcome::Active), release(2, Outcome::Failed)];
        let b = |revision, slot| SlotBackoff {
            revision,
            slot,
            failures: 3,
            retry_in_ms: 483,
        };
        let seen = Reconciled {
            target: 1,
            backoff: vec![b(2, 0), b(1, 0), b(1, 5)],
            ..Reconciled::default()
        };
        let s = status(1, &releases, &seen);
        assert_eq!(
            s.backoff,
            vec![b(1, 0)],
            "not release 2's, not slot 5 of 1 replica"
        );
    }

    /// Issue 13: a blue-green service's status did not say which fleet
    /// gets the traffic and which is kept warm.
    #[test]
    fn status_says_which_release_is_routed_and_whether_the_rest_is_warm() {
        let releases = [release(1, Outcome::Superseded), release(2, Outcome::Active)];
        let seen = Reconciled {
            target: 2,
            routed: Some(2),
            warm: true,
            ..Reconciled::default()
        };
        let s = status(2, &releases, &seen);
        assert_eq!((s.routed, s.warm), (Some(2), true));
        // About a target the controller has not seen yet: nothing.
        let s = status(3, &releases, &seen);
        assert_eq!((s.routed, s.warm), (None, false));
    }

    #[test]
    fn status_names_a_newer_failed_release() {
        let releases = [release(1, Outcome::Active), release(2, Outcome::Failed)];
        let s = status(1, &releases, &Reconciled::default());
        assert_eq!(
            s.failed_release,
            Some(FailedRelease {
                revision: 2,
                reason: "deadline".to_owned()
            })
        );
    }
}

/// `GET /v1/nodes`: the cluster's members as this node sees them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodesResponse {
    /// A member of an etcd cluster (`kiln serve --etcd`); `false`: on its
    /// own, the only node.
    pub cluster: bool,
    /// The node that answered.
    pub this: String,
    /// The member that runs the fleet decisions, when one does.
    pub leader: Option<String>,
    /// The live members, by name.
    pub nodes: Vec<NodeStatus>,
}

/// One member.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    /// kiln's version on it.
    pub version: String,
    /// When its agent joined (RFC 3339).
    pub joined: String,
    pub leader: bool,
    /// Instances assigned to it (of every service, stopping ones aside).
    pub instances: u64,
    /// Its advertised address.
    #[serde(default)]
    pub address: String,
    /// Drained (`kiln drain`): it takes no new instance.
    #[serde(default)]
    pub drained: bool,
    /// Its labels (`kiln serve --label`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Seconds left of its lease, and the lease's TTL (in a cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<(i64, i64)>,
    /// Its capacity: CPUs and memory (MiB); 0 when unknown.
    #[serde(default)]
    pub cpus: u32,
    #[serde(default)]
    pub memory_mib: u64,
    /// What the instances assigned to it declared (`cpu` in thousandths,
    /// `memory` in bytes), stopping ones included: reserved.
    #[serde(default)]
    pub reserved: crate::resources::Resources,
}

/// `kiln drain NODE` / `kiln undrain NODE`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainResponse {
    pub node: String,
    pub drained: bool,
    /// Instances assigned to it when the change was made.
    pub instances: u64,
}

/// `kiln pause SERVICE [--timeout D]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PauseRequest {
    /// How long a request waits before it is answered 503.
    pub timeout_ms: u64,
}

/// `kiln pause` / `kiln resume`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseResponse {
    pub service: String,
    pub paused: bool,
    /// While paused: how long a request waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Whether this call changed anything (pausing a paused service with
    /// a new timeout does).
    pub changed: bool,
}

#[cfg(test)]
mod run_tests {
    use super::*;

    #[test]
    fn an_exit_code_is_read_from_the_runtimes_words() {
        assert_eq!(exit_code("exit status: 0"), 0);
        assert_eq!(exit_code("exit status: 3"), 3);
        assert_eq!(exit_code("signal: 9 (SIGKILL)"), 137);
        assert_eq!(exit_code("signal: 15 (SIGTERM) (core dumped)"), 143);
        assert_eq!(exit_code("something else"), 1);
        assert_eq!(exit_code("exit status: "), 1);
    }

    #[test]
    fn run_frames_are_one_json_object_each() {
        let f = RunFrame::Output {
            stream: 1,
            data: "aGk=".into(),
        };
        let text = serde_json::to_string(&f).unwrap_or_default();
        assert_eq!(text, r#"{"output":{"stream":1,"data":"aGk="}}"#);
        assert_eq!(serde_json::from_str::<RunFrame>(&text).ok(), Some(f));
    }
}
