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
    /// The rollout passed its progress deadline with no previous release to
    /// return to: it keeps trying, and `kiln apply` reports it as failed.
    #[serde(default)]
    pub stalled: bool,
    /// The canary rollout in progress, if any.
    #[serde(default)]
    pub canary: Option<CanaryStatus>,
    /// The newest release, when it failed and the service went back to an
    /// earlier one: which, and why (kept until the next release).
    #[serde(default)]
    pub failed_release: Option<FailedRelease>,
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

/// Requests a release answered over a window, as the analysis counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub requests: u64,
    /// 5xx answers plus connections that failed.
    pub errors: u64,
    pub error_rate: f64,
    /// The upper bound of the latency bucket holding the 99th percentile.
    pub p99_ms: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub id: String,
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
    pub target: u64,
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
