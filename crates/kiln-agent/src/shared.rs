//! What the agent and its controllers share: the home, the store, the
//! state, the router and the status board. A module of its own so that
//! `agent` (which starts controllers) and `controller` (which uses these)
//! do not import each other.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_core::api::Reconciled;
use kiln_core::health::Backoff;
use kiln_core::spec::ServiceName;
use kiln_store::Store;
use sha2::{Digest as _, Sha256};

use kiln_core::service::RuntimeKind;

use crate::runtime::{Runtime, RuntimeError};
use crate::state::{ClusterState, Guard, NodeState, StateStore};

/// What controllers share with the agent.
pub struct Shared {
    pub home: PathBuf,
    pub store: Store,
    /// What the cluster shares (services, releases, rollouts, the ledger).
    pub state: Arc<dyn ClusterState>,
    /// What only this node knows (its instances' pids).
    pub node: Arc<dyn NodeState>,
    /// This node's name in assignments and observations: its host name
    /// (`kiln serve --node NAME` will set it in a cluster).
    pub node_name: String,
    /// The cluster as this node sees it: the members, whether this node
    /// leads, and its leadership's fence (every write of a fleet decision
    /// carries it, so a deposed leader's late writes fail). On its own, a
    /// node is the only member and always leads.
    pub membership: crate::cluster::Membership,
    /// The drained nodes (`kiln drain`), as the state store last said
    /// (read at start and again on each drain event of the ledger).
    pub drained: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// The cluster's node-to-node pull password ([`crate::peers`]), set
    /// once the cluster's secret key is read.
    pub pull_token: std::sync::OnceLock<String>,
    pub backoff: Backoff,
    /// What each controller saw at its last pass.
    pub status: std::sync::Mutex<BTreeMap<ServiceName, Reconciled>>,
    pub router: Arc<crate::router::Router>,
    pub runtimes: Runtimes,
    /// Holds instances' output pipes (and the listeners) across agent
    /// processes.
    pub keeper: Arc<crate::keeper::Keeper>,
    /// What the drift detector found (which instances are stale).
    pub drift: Arc<crate::drift::Board>,
    /// Whether services may run as plain, unconfined processes
    /// (`kiln serve --allow-runtime process`).
    pub allow_process: bool,
    /// Which images may run (`kiln serve --trust FILE`); `None`: any, with
    /// the signers it has recorded.
    pub trust: Option<crate::trust::TrustPolicy>,
    /// What the agent's verifications of its own ledger found.
    pub ledger: Arc<crate::ledger::Health>,
    /// How long a worker without a readiness probe runs before it counts
    /// ([`kiln_core::service::WORKER_MIN_READY`]; none for the fake
    /// runtime, whose instances never exit on their own).
    pub worker_min_ready: std::time::Duration,
    /// What each service's instances declared they use, by node (`cpu`,
    /// `memory`), as its controller last read or wrote its assignments:
    /// the leader places one service's instances within what the others
    /// left ([`kiln_core::resources::Room`]).
    pub reserved:
        std::sync::Mutex<BTreeMap<ServiceName, Vec<(String, kiln_core::resources::Resources)>>>,
    ids: AtomicU64,
    seed: u64,
}

impl Shared {
    pub fn new(
        home: PathBuf,
        store: Store,
        state: Arc<dyn StateStore>,
        backoff: Backoff,
        router: Arc<crate::router::Router>,
        seed: u64,
    ) -> Self {
        let runtimes_home = home.clone();
        Self {
            home,
            store,
            node: state.clone(),
            state: state as Arc<dyn ClusterState>,
            membership: crate::cluster::Membership::solo(&node_name(), Default::default()),
            node_name: node_name(),
            drained: std::sync::Mutex::default(),
            pull_token: std::sync::OnceLock::new(),
            backoff,
            status: std::sync::Mutex::default(),
            router,
            runtimes: Runtimes::Node(runtimes_home),
            keeper: Arc::new(crate::keeper::Keeper::none()),
            drift: Arc::default(),
            allow_process: false,
            trust: None,
            ledger: Arc::default(),
            worker_min_ready: kiln_core::service::WORKER_MIN_READY,
            reserved: Default::default(),
            ids: AtomicU64::new(0),
            seed,
        }
    }

    /// The guard of a fleet decision's write: this agent's leadership.
    pub fn fenced(&self) -> Guard {
        Guard {
            version: None,
            fence: self.membership.fence(),
        }
    }

    /// What this agent inherited, and where it keeps what it opens.
    pub fn with_keeper(mut self, keeper: Arc<crate::keeper::Keeper>) -> Self {
        self.keeper = keeper;
        self
    }

    /// Every release runs on `runtime`, whatever kind it names (the
    /// fake, in tests and the scale benchmark).
    #[cfg(test)]
    pub fn with_runtime(mut self, runtime: Arc<dyn Runtime>) -> Self {
        // The fake runs nothing: any kind is allowed, and its "workers"
        // never exit on their own.
        self.allow_process = true;
        self.worker_min_ready = std::time::Duration::ZERO;
        self.runtimes = Runtimes::Only(runtime);
        self
    }

    /// `SERVICE-rN-` and 64 bits (16 hex digits) of this agent's seed and
    /// counter: unique across a cluster's nodes and agent processes (at
    /// the 24 bits it had, two nodes starting a thousand instances each
    /// would share an id in about one cluster in eight), and names its
    /// release.
    /// The part of its instances' cgroup names that is this agent's
    /// (`kiln/SCOPE/ID`): a digest of its home, the same for every agent
    /// process of it (one that adopts an instance finds its cgroup).
    pub fn cgroup_scope(&self) -> String {
        let d = Sha256::digest(self.home.as_os_str().as_encoded_bytes());
        kiln_core::digest::hex(&d[..6])
    }

    pub fn new_instance_id(&self, service: &ServiceName, revision: u64) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        let mut h = Sha256::new();
        h.update(self.seed.to_le_bytes());
        h.update(n.to_le_bytes());
        let hex = kiln_core::digest::hex(&h.finalize()[..8]);
        format!("{service}-r{revision}-{hex}")
    }
}

/// The host's name, or `local` when it has none.
pub(crate) fn node_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    match name.trim() {
        "" => "local".to_owned(),
        name => name.to_owned(),
    }
}

/// Where controllers get the runtime a release names.
pub enum Runtimes {
    /// This node's, by kind (bubblewrap found on `PATH`, the embedded OCI
    /// runtime keeping its bundles under the home, or plain processes).
    Node(std::path::PathBuf),
    /// One for every kind.
    #[cfg(test)]
    Only(Arc<dyn Runtime>),
}

impl Runtimes {
    pub fn get(&self, kind: RuntimeKind) -> Result<Arc<dyn Runtime>, RuntimeError> {
        match self {
            Self::Node(home) => crate::runtime::runtime(kind, home).map(Arc::from),
            #[cfg(test)]
            Self::Only(rt) => Ok(rt.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(seed: u64) -> Shared {
        Shared::new(
            std::path::PathBuf::from("/nonexistent"),
            Store::open(tempfile::tempdir().unwrap().path()).unwrap(),
            Arc::new(crate::state::MemoryState::new()),
            Backoff::default(),
            crate::router::Router::with_budget(10),
            seed,
        )
    }

    #[test]
    fn instance_ids_carry_64_bits_and_differ_across_agents() {
        let web = ServiceName::try_from("web").unwrap();
        let (a, b) = (shared(1), shared(2));
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..5000 {
            for s in [&a, &b] {
                let id = s.new_instance_id(&web, 3);
                let hex = id.strip_prefix("web-r3-").unwrap();
                assert_eq!(hex.len(), 16, "{id}");
                assert!(hex.bytes().all(|c| c.is_ascii_hexdigit()), "{id}");
                assert!(seen.insert(id.clone()), "{id} twice");
            }
        }
    }
}
