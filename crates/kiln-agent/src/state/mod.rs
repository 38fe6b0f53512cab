//! Durable agent state, in two parts. [`ClusterState`]: what every node of
//! a cluster shares — services, releases, saved rollouts, the append-only
//! event log and its ledger, tokens, secrets. [`NodeState`]: what only
//! this node knows — the instances it runs, with their pids.
//! [`SqliteState`] implements both on one node (embedded, WAL, one file);
//! [`EtcdState`] implements `ClusterState` on etcd (one etcd transaction a
//! change, an etcd watch), with a `NodeState` beside it (`kiln serve
//! --etcd`); [`MemoryState`] keeps the same contract in memory, for tests
//! and benchmarks of what sits above the traits. Nothing above may assume
//! SQL, and errors name no backend's types.
//!
//! Every change that must be atomic is one trait method (one transaction):
//! recording an apply writes the release, the service's new target and the
//! events together, and only if its [`Guard`] holds (the service's version
//! the writer read, the writer's leadership). [`ClusterState::watch`] tells
//! watchers what was written after a sequence number. `contract.rs` holds
//! the tests every implementation must pass.

#[cfg(test)]
mod contract;
mod etcd;
// A fake for tests (and, exported behind a feature, the scale benchmark
// issue 11 asks for): the agent itself never uses it.
#[cfg(any(test, feature = "bench"))]
mod memory;
mod sqlite;

pub(crate) use etcd::Etcd;
pub use etcd::{DEFAULT_PREFIX as ETCD_PREFIX, EtcdState};
#[cfg(any(test, feature = "bench"))]
pub use memory::MemoryState;
pub use sqlite::SqliteState;

use std::collections::BTreeMap;

use kiln_core::auth::{TokenName, TokenRecord};
use kiln_core::event::{Actor, Change};
use kiln_core::release::{Outcome, Release, ServiceSettings};
use kiln_core::rollout::assign::{Assignment, Observation};
use kiln_core::rollout::{Routing, SavedRollout};
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
    /// The cluster's state store failed or cannot be reached: what needs it
    /// waits (applies, rollbacks, token changes); instances and routers
    /// keep serving what they had.
    #[error(
        "the cluster's state (etcd at {endpoints}) failed: {source}; changes wait until it answers (instances keep serving)"
    )]
    Cluster {
        endpoints: String,
        source: BackendError,
    },
    /// A conditional change whose service moved on since it was read.
    #[error(
        "service {service} changed while this change was prepared (version {expected}, now {found}): another apply, rollback or removal came first; read it again"
    )]
    Conflict {
        service: ServiceName,
        expected: u64,
        found: u64,
    },
    /// A write by a leader that is not the newest any more.
    #[error("a newer leader holds the state (fence {newest}, this writer's {fence}): the write is refused", fence = .fence.0, newest = .newest.0)]
    Fenced { fence: Fence, newest: Fence },
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
    /// Which change of the service this is: the sequence number of the
    /// event of its last apply, rollback or automatic return (set by the
    /// store; what a [`Guard`] compares). 0 in a record not read from a
    /// store.
    #[serde(default)]
    pub version: u64,
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

/// A leader's fencing token: [`ClusterState::lead`] hands out a larger
/// one each time, and a write that carries one is refused once a larger
/// one exists (a deposed leader's late writes fail instead of undoing its
/// successor's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Fence(pub u64);

/// What a compound change is conditional on: it is made only if every
/// condition holds when it is written, or not at all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Guard {
    /// The version of the service's record the writer read
    /// ([`ServiceRecord::version`]; 0: the service did not exist).
    pub version: Option<u64>,
    /// The writer's leadership.
    pub fence: Option<Fence>,
}

impl Guard {
    /// Unconditional.
    pub const NONE: Self = Self {
        version: None,
        fence: None,
    };

    /// Only if the service's record is still at `version`.
    pub fn version(version: u64) -> Self {
        Self {
            version: Some(version),
            fence: None,
        }
    }

    /// Only while `fence` is the newest leadership.
    pub fn fence(fence: Fence) -> Self {
        Self {
            version: None,
            fence: Some(fence),
        }
    }

    /// Whether a write under this guard may be made, given the record's
    /// version now (0: absent) and the newest fence handed out. Every
    /// backend decides with this one function, inside its transaction.
    pub fn check(&self, service: &ServiceName, version: u64, newest: Fence) -> Result<()> {
        if let Some(fence) = self.fence
            && fence < newest
        {
            return Err(StateError::Fenced { fence, newest });
        }
        match self.version {
            Some(expected) if expected != version => Err(StateError::Conflict {
                service: service.clone(),
                expected,
                found: version,
            }),
            _ => Ok(()),
        }
    }
}

/// A node's router's counters of a service, by release.
pub type NodeCounters = BTreeMap<u64, kiln_core::counters::Snapshot>;

/// A service's assignments as the leader wrote them, and the routing it
/// decided with them: every node's router sends where the leader's does.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Assigned {
    pub list: Vec<Assignment>,
    /// `None` until a leader that keeps it wrote the assignments.
    pub routing: Option<Routing>,
}

/// The state every node of a cluster shares: services, releases, their
/// rollouts, the ledger, tokens, secrets and the trust policy's record.
/// Async (a cluster backend answers over the network); every compound
/// change is one transaction, conditional on a [`Guard`]; [`watch`]
/// (Self::watch) tells what changed after a sequence number.
#[async_trait::async_trait]
pub trait ClusterState: Send + Sync {
    async fn services(&self) -> Result<Vec<ServiceRecord>>;
    async fn service(&self, name: &ServiceName) -> Result<Option<ServiceRecord>>;
    /// Every release of the service, by revision: its history (`kiln
    /// history`, a rollback's choice). Grows with every release: not for
    /// the paths that run all the time.
    async fn releases(&self, service: &ServiceName) -> Result<Vec<Release>>;
    /// The releases that are not history yet, by revision: pending and
    /// active ones, the service's target (whatever its outcome) and its
    /// newest. A handful however long the history, read by every
    /// controller pass and every status.
    async fn current_releases(&self, service: &ServiceName) -> Result<Vec<Release>>;
    async fn release(&self, service: &ServiceName, revision: u64) -> Result<Option<Release>>;
    /// Every release of every service, removed ones included, by service
    /// then revision (what a collection of the store must keep).
    async fn all_releases(&self) -> Result<Vec<Release>>;
    /// Record an apply of one service: a new release (if any) and the
    /// service's settings and target, with their events, atomically.
    async fn record_apply(
        &self,
        service: &ServiceRecord,
        release: Option<&Release>,
        events: &[NewEvent],
        guard: Guard,
    ) -> Result<()>;
    /// A rollback, as one change: the rollout it abandons (if any) marked
    /// failed with `reason`, the new release recorded and made the target.
    /// A crash can never leave the service pointing at the abandoned release.
    async fn record_rollback(
        &self,
        service: &ServiceRecord,
        release: &Release,
        abandoned: Option<(u64, &str)>,
        events: &[NewEvent],
        guard: Guard,
    ) -> Result<()>;
    /// Set a release's outcome (and the reason, for failures), with its event.
    async fn set_outcome(
        &self,
        service: &ServiceName,
        revision: u64,
        outcome: Outcome,
        reason: Option<&str>,
        event: &NewEvent,
        guard: Guard,
    ) -> Result<()>;
    /// A failed rollout, as one change: the release is marked failed with
    /// its reason and, when `return_to` says so, the service points back at
    /// that release (an automatic rollback), which is active again (it was
    /// superseded when the failure came in the failed release's watch).
    /// Nobody ever sees a failed release that the service is still moving
    /// to.
    async fn fail_release(
        &self,
        service: &ServiceName,
        revision: u64,
        reason: &str,
        return_to: Option<u64>,
        events: &[NewEvent],
        guard: Guard,
    ) -> Result<()>;
    /// Remove a service, with its event, as one change: its record goes
    /// (it is no longer reconciled); its releases and events stay.
    /// Removing what does not exist changes nothing but the event.
    async fn remove_service(
        &self,
        name: &ServiceName,
        event: &NewEvent,
        guard: Guard,
    ) -> Result<()>;
    /// The service's rollout as its controller last saved it (`None`: never
    /// saved, or the service is unknown).
    async fn rollout(&self, service: &ServiceName) -> Result<Option<SavedRollout>>;
    /// Keep the service's rollout (a new agent process resumes from it);
    /// nothing for a service that does not exist. Not a change of the
    /// service's version (an apply does not conflict with it).
    async fn set_rollout(
        &self,
        service: &ServiceName,
        rollout: &SavedRollout,
        guard: Guard,
    ) -> Result<()>;
    /// The service's assignments as the leader last wrote them, with its
    /// routing, read together (`None`: never written, a service recorded
    /// before assignments were).
    async fn assignments(&self, service: &ServiceName) -> Result<Option<Assigned>>;
    /// The leader's decisions for the service, as one change: its
    /// assignments and (when given) its routing and its rollout. Nothing
    /// for a service that does not exist.
    async fn assign(
        &self,
        service: &ServiceName,
        assignments: &[Assignment],
        routing: Option<Routing>,
        rollout: Option<&SavedRollout>,
        guard: Guard,
    ) -> Result<()>;
    /// A node's router's counters of the service's releases (in a cluster
    /// the leader judges a canary on their sum), replacing what it
    /// published before. Nothing for a service that does not exist.
    async fn publish_counters(
        &self,
        service: &ServiceName,
        node: &str,
        counters: &BTreeMap<u64, kiln_core::counters::Snapshot>,
    ) -> Result<()>;
    /// What every node last published of its counters, by node.
    async fn counters(&self, service: &ServiceName) -> Result<BTreeMap<String, NodeCounters>>;
    /// What every node last published of the service's instances.
    async fn observations(&self, service: &ServiceName) -> Result<Vec<Observation>>;
    /// What `node` sees of the service's instances, replacing what it
    /// published before. Nothing for a service that does not exist.
    async fn publish(
        &self,
        service: &ServiceName,
        node: &str,
        observations: &[Observation],
    ) -> Result<()>;
    /// Take the leadership: a fence larger than any handed out before.
    async fn lead(&self) -> Result<Fence>;
    async fn append_event(&self, event: &NewEvent) -> Result<u64>;
    /// The events after sequence number `after`, as soon as there is at
    /// least one: at once when some were written meanwhile (a watcher that
    /// fell behind resumes where it was), else when the next is written.
    async fn watch(&self, after: u64) -> Result<Vec<Event>>;
    /// The cluster's key for sealing secrets: the one kept, or `fresh`
    /// (kept from now on) when there is none yet. The caller brings the
    /// randomness.
    async fn secret_key(&self, fresh: [u8; 32]) -> Result<[u8; 32]>;
    /// Keep secret values under their sealed digests. A digest names one
    /// value for ever (same key, name and value), so keeping one twice
    /// changes nothing.
    async fn put_secrets(&self, secrets: &[(Sealed, SecretValue)]) -> Result<()>;
    /// A secret's value, by its sealed digest.
    async fn secret(&self, sealed: &Sealed) -> Result<Option<SecretValue>>;
    /// Keep a new API token's record with the event saying so, in one
    /// transaction; `false` (and nothing written) when the name is taken.
    async fn put_token(&self, record: &TokenRecord, event: &NewEvent) -> Result<bool>;
    /// The record of the token `name`, if it exists (revoked ones do not).
    async fn token(&self, name: &TokenName) -> Result<Option<TokenRecord>>;
    /// Every token's record, by name.
    async fn tokens(&self) -> Result<Vec<TokenRecord>>;
    /// Forget a token with the event saying so; `false` when there was none.
    async fn revoke_token(&self, name: &TokenName, event: &NewEvent) -> Result<bool>;
    /// Drain `node` (`kiln drain`) or undrain it, with its event; `false`
    /// when it already was (nothing recorded).
    async fn set_drained(&self, node: &str, drained: bool, event: &NewEvent) -> Result<bool>;
    /// The drained nodes.
    async fn drained(&self) -> Result<std::collections::BTreeSet<String>>;
    /// Pause `service` (`kiln pause`: its requests wait at the router at
    /// most `timeout_ms`) or resume it (`None`), with its event; `false`
    /// when it already was so (nothing recorded).
    async fn set_paused(
        &self,
        service: &ServiceName,
        timeout_ms: Option<u64>,
        event: &NewEvent,
    ) -> Result<bool>;
    /// The paused services, and how long their requests wait.
    async fn paused(&self) -> Result<BTreeMap<ServiceName, u64>>;
    /// The ledger's entries after sequence number `after` (each event
    /// with its place in the hash chain).
    async fn ledger(&self, after: u64) -> Result<Vec<kiln_core::ledger::Entry>>;
    /// Every signed checkpoint, in order.
    async fn checkpoints(&self) -> Result<Vec<kiln_core::ledger::Checkpoint>>;
    async fn put_checkpoint(&self, checkpoint: &kiln_core::ledger::Checkpoint) -> Result<()>;
    /// List a node's public key (`ed25519 HEX`, as `node.pub` says it)
    /// among those whose checkpoints the ledger accepts; a key listed
    /// already stays listed under its first node's name.
    async fn put_node_key(&self, node: &str, key: &str) -> Result<()>;
    /// Every node key listed, as (key, node), by key.
    async fn node_keys(&self) -> Result<Vec<(String, String)>>;
    /// The entry the last checkpoint signed (read every second by the
    /// agent: one row, not every checkpoint).
    async fn last_checkpoint(&self) -> Result<Option<u64>>;
    /// The last entry's sequence number and hash.
    async fn head(&self) -> Result<Option<(u64, String)>>;
    /// The events after sequence number `after`, in order (the read side
    /// of the log: the ledger and `kiln audit` read it).
    async fn events(&self, after: u64) -> Result<Vec<Event>>;
    /// In a cluster, each live member's lease: seconds left of its TTL, and
    /// the TTL (what `kiln nodes` shows). None on its own.
    async fn member_leases(&self) -> Result<BTreeMap<String, (i64, i64)>> {
        Ok(BTreeMap::new())
    }

    /// The events of these kinds, in order (the drift detector's earlier
    /// findings, read at start without decoding the whole ledger).
    async fn events_of(&self, kinds: &[&str]) -> Result<Vec<Event>> {
        let mut all = self.events(0).await?;
        all.retain(|e| kinds.contains(&e.change.kind()));
        Ok(all)
    }
}

/// What only this node knows: the instances it runs, with their pids and
/// start times (so an agent restarted after a crash finds, and ends or
/// adopts, what the previous one started). The node's signing key is a
/// file beside it ([`crate::ledger::NodeKey`]). Synchronous: it is local
/// to the node by definition. Their events go to the cluster's ledger, in
/// a second write (a record without its event is found and reported by
/// the next agent; an event without its record cannot happen: the record
/// is written first).
pub trait NodeState: Send + Sync {
    fn put_instance(&self, instance: &InstanceRecord) -> Result<()>;
    fn remove_instance(&self, id: &str) -> Result<()>;
    fn instances(&self) -> Result<Vec<InstanceRecord>>;
}

/// A whole state store: the cluster's state and this node's, as the
/// agent opens it (SQLite for both on one node; etcd with this node's
/// SQLite beside it in a cluster).
pub trait StateStore: ClusterState + NodeState {}

impl<T: ClusterState + NodeState + ?Sized> StateStore for T {}

/// The last event's sequence number as a backend's own writes move it:
/// what its watchers wait on. One piece for every backend, so that they
/// wake and re-read alike.
pub(crate) struct Head(tokio::sync::watch::Sender<u64>);

impl Default for Head {
    fn default() -> Self {
        Self(tokio::sync::watch::Sender::new(0))
    }
}

impl Head {
    /// A write committed with the log at `seq`: its watchers wake (only
    /// if it moved).
    fn moved(&self, seq: u64) {
        self.0
            .send_if_modified(|h| std::mem::replace(h, seq) != seq);
    }

    /// [`ClusterState::watch`] on `state`: the events after `after`, read
    /// again whenever this head moves, and every `poll` too when another
    /// process may write the same store.
    async fn watch<S: ClusterState + ?Sized>(
        &self,
        state: &S,
        after: u64,
        poll: Option<std::time::Duration>,
    ) -> Result<Vec<Event>> {
        let mut head = self.0.subscribe();
        loop {
            // Marked seen before the read: a write after it wakes the wait.
            head.borrow_and_update();
            let events = state.events(after).await?;
            if !events.is_empty() {
                return Ok(events);
            }
            // The sender lives as long as the store.
            match poll {
                Some(poll) => {
                    let _ = tokio::time::timeout(poll, head.changed()).await;
                }
                None => {
                    let _ = head.changed().await;
                }
            }
        }
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
