//! Durable agent state behind [`StateStore`]: services, releases, live
//! instances and the append-only event log. [`SqliteState`] is the one-node
//! implementation (embedded, WAL); [`MemoryState`] keeps the same contract
//! in memory, for tests and benchmarks of what sits above the trait; a
//! cluster implementation (etcd) will sit behind it too, so nothing above
//! may assume SQL, and errors name no backend's types.
//!
//! Every change that must be atomic is one trait method (one transaction):
//! recording an apply writes the release, the service's new target and the
//! events together. `contract.rs` holds the tests every implementation
//! must pass.

#[cfg(test)]
mod contract;
// A fake for tests (and, exported behind a feature, the scale benchmark
// issue 11 asks for): the agent itself never uses it.
#[cfg(any(test, feature = "bench"))]
mod memory;
mod sqlite;

#[cfg(any(test, feature = "bench"))]
pub use memory::MemoryState;
pub use sqlite::SqliteState;

use kiln_core::auth::{TokenName, TokenRecord};
use kiln_core::event::{Actor, Change};
use kiln_core::release::{Outcome, Release, ServiceSettings};
use kiln_core::rollout::SavedRollout;
use kiln_core::secret::{Sealed, SecretValue};
use kiln_core::spec::ServiceName;
use serde::{Deserialize, Serialize};

/// A backend's own error, kept as the source (no backend's type shows in
/// the trait).
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database {path}: {source}")]
    Open { path: String, source: BackendError },
    #[error("state database {path}: cannot make it owner-only: {source}")]
    Private {
        path: String,
        source: std::io::Error,
    },
    /// A release with this revision is recorded already: the change that
    /// carried it was not made.
    #[error("release {revision} of {service} is already recorded")]
    ReleaseExists { service: ServiceName, revision: u64 },
    #[error("state database: {0}")]
    Backend(BackendError),
    #[error("state database holds a malformed secret key ({0} bytes, not 32)")]
    SecretKey(usize),
    #[error("state database holds an unreadable {what}: {source}")]
    Decode {
        what: &'static str,
        source: serde_json::Error,
    },
}

pub type Result<T, E = StateError> = std::result::Result<T, E>;

/// A service as the agent keeps it: its settings and the release it is on
/// (or moving to).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub name: ServiceName,
    pub settings: ServiceSettings,
    /// The release the reconciler drives the service to.
    pub target: u64,
}

/// A running instance, recorded so that an agent restarted after a crash
/// can find (and end) what the previous one started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub id: String,
    pub service: ServiceName,
    pub revision: u64,
    pub slot: u32,
    pub pid: u32,
    /// The process start time (field 22 of /proc/PID/stat), so a reused
    /// pid is never mistaken for the instance.
    pub start_ticks: u64,
    pub port: u16,
}

/// One event of the log (the ledger hash-chains these): a change and
/// its subject.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub time: String,
    /// Who made the change (none for events recorded before actors were).
    pub actor: Option<Actor>,
    pub service: Option<String>,
    pub revision: Option<u64>,
    pub instance: Option<String>,
    pub change: Change,
}

/// An event to append (its sequence number and time are assigned on write).
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub change: Change,
    pub actor: Actor,
    pub service: Option<ServiceName>,
    pub revision: Option<u64>,
    pub instance: Option<String>,
}

impl NewEvent {
    /// A change to `service` (and to its release `revision`, when given),
    /// made by the agent.
    pub fn service(change: Change, service: &ServiceName, revision: Option<u64>) -> Self {
        Self {
            change,
            actor: Actor::Agent,
            service: Some(service.clone()),
            revision,
            instance: None,
        }
    }

    /// A change with no service as its subject (tokens), made by `actor`.
    pub fn node(change: Change, actor: Actor) -> Self {
        Self {
            change,
            actor,
            service: None,
            revision: None,
            instance: None,
        }
    }

    /// The same change, made by `actor`.
    pub fn by(mut self, actor: Actor) -> Self {
        self.actor = actor;
        self
    }
}

/// The agent's durable state.
pub trait StateStore: Send + Sync {
    fn services(&self) -> Result<Vec<ServiceRecord>>;
    fn service(&self, name: &ServiceName) -> Result<Option<ServiceRecord>>;
    /// Every release of the service, by revision: its history (`kiln
    /// history`, a rollback's choice). Grows with every release: not for
    /// the paths that run all the time.
    fn releases(&self, service: &ServiceName) -> Result<Vec<Release>>;
    /// The releases that are not history yet, by revision: pending and
    /// active ones, the service's target (whatever its outcome) and its
    /// newest. A handful however long the history, read by every
    /// controller pass and every status.
    fn current_releases(&self, service: &ServiceName) -> Result<Vec<Release>>;
    fn release(&self, service: &ServiceName, revision: u64) -> Result<Option<Release>>;
    /// Every release of every service, removed ones included, by service
    /// then revision (what a collection of the store must keep).
    fn all_releases(&self) -> Result<Vec<Release>>;
    /// Record an apply of one service: a new release (if any) and the
    /// service's settings and target, with their events, atomically.
    fn record_apply(
        &self,
        service: &ServiceRecord,
        release: Option<&Release>,
        events: &[NewEvent],
    ) -> Result<()>;
    /// A rollback, as one change: the rollout it abandons (if any) marked
    /// failed with `reason`, the new release recorded and made the target.
    /// A crash can never leave the service pointing at the abandoned release.
    fn record_rollback(
        &self,
        service: &ServiceRecord,
        release: &Release,
        abandoned: Option<(u64, &str)>,
        events: &[NewEvent],
    ) -> Result<()>;
    /// Set a release's outcome (and the reason, for failures), with its event.
    fn set_outcome(
        &self,
        service: &ServiceName,
        revision: u64,
        outcome: Outcome,
        reason: Option<&str>,
        event: &NewEvent,
    ) -> Result<()>;
    /// A failed rollout, as one change: the release is marked failed with
    /// its reason and, when `return_to` says so, the service points back at
    /// that release (an automatic rollback), which is active again (it was
    /// superseded when the failure came in the failed release's watch).
    /// Nobody ever sees a failed release that the service is still moving
    /// to.
    fn fail_release(
        &self,
        service: &ServiceName,
        revision: u64,
        reason: &str,
        return_to: Option<u64>,
        events: &[NewEvent],
    ) -> Result<()>;
    /// Remove a service, with its event, as one change: its record goes
    /// (it is no longer reconciled); its releases and events stay.
    /// Removing what does not exist changes nothing but the event.
    fn remove_service(&self, name: &ServiceName, event: &NewEvent) -> Result<()>;
    /// The service's rollout as its controller last saved it (`None`: never
    /// saved, or the service is unknown).
    fn rollout(&self, service: &ServiceName) -> Result<Option<SavedRollout>>;
    /// Keep the service's rollout (a new agent process resumes from it);
    /// nothing for a service that does not exist.
    fn set_rollout(&self, service: &ServiceName, rollout: &SavedRollout) -> Result<()>;
    fn put_instance(&self, instance: &InstanceRecord, event: &NewEvent) -> Result<()>;
    fn remove_instance(&self, id: &str, event: &NewEvent) -> Result<()>;
    fn instances(&self) -> Result<Vec<InstanceRecord>>;
    fn append_event(&self, event: &NewEvent) -> Result<u64>;
    /// The node's key for sealing secrets: the one kept, or `fresh` (kept
    /// from now on) when there is none yet. The caller brings the
    /// randomness.
    fn secret_key(&self, fresh: [u8; 32]) -> Result<[u8; 32]>;
    /// Keep secret values under their sealed digests. A digest names one
    /// value for ever (same key, name and value), so keeping one twice
    /// changes nothing.
    fn put_secrets(&self, secrets: &[(Sealed, SecretValue)]) -> Result<()>;
    /// A secret's value, by its sealed digest.
    fn secret(&self, sealed: &Sealed) -> Result<Option<SecretValue>>;
    /// Keep a new API token's record with the event saying so, in one
    /// transaction; `false` (and nothing written) when the name is taken.
    fn put_token(&self, record: &TokenRecord, event: &NewEvent) -> Result<bool>;
    /// The record of the token `name`, if it exists (revoked ones do not).
    fn token(&self, name: &TokenName) -> Result<Option<TokenRecord>>;
    /// Every token's record, by name.
    fn tokens(&self) -> Result<Vec<TokenRecord>>;
    /// Forget a token with the event saying so; `false` when there was none.
    fn revoke_token(&self, name: &TokenName, event: &NewEvent) -> Result<bool>;
    /// The ledger's entries after sequence number `after` (each event
    /// with its place in the hash chain).
    fn ledger(&self, after: u64) -> Result<Vec<kiln_core::ledger::Entry>>;
    /// Every signed checkpoint, in order.
    fn checkpoints(&self) -> Result<Vec<kiln_core::ledger::Checkpoint>>;
    fn put_checkpoint(&self, checkpoint: &kiln_core::ledger::Checkpoint) -> Result<()>;
    /// The entry the last checkpoint signed (read every second by the
    /// agent: one row, not every checkpoint).
    fn last_checkpoint(&self) -> Result<Option<u64>>;
    /// The last entry's sequence number and hash.
    fn head(&self) -> Result<Option<(u64, String)>>;
    /// The events after sequence number `after`, in order (the read side
    /// of the log: the ledger and `kiln audit` will read it).
    fn events(&self, after: u64) -> Result<Vec<Event>>;
    /// The events of these kinds, in order (the drift detector's earlier
    /// findings, read at start without decoding the whole ledger).
    fn events_of(&self, kinds: &[&str]) -> Result<Vec<Event>> {
        let mut all = self.events(0)?;
        all.retain(|e| kinds.contains(&e.change.kind()));
        Ok(all)
    }
}

/// The time an event is written (RFC 3339, milliseconds).
/// An event as a ledger entry (not yet chained).
fn ledger_entry(seq: u64, time: String, e: &NewEvent, detail: String) -> kiln_core::ledger::Entry {
    kiln_core::ledger::Entry {
        seq,
        time,
        actor: Some(e.actor.to_string()),
        service: e.service.as_ref().map(|s| s.as_str().to_owned()),
        revision: e.revision,
        instance: e.instance.clone(),
        kind: e.change.kind().to_owned(),
        detail,
        prev: String::new(),
        hash: String::new(),
    }
}

fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
