//! What the agent and its controllers share: the home, the store, the
//! state, the router and the status board. A module of its own so that
//! `agent` (which starts controllers) and `controller` (which uses these)
//! do not import each other.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_core::api::ServiceStatus;
use kiln_core::health::Backoff;
use kiln_core::spec::ServiceName;
use kiln_store::Store;
use sha2::{Digest as _, Sha256};

use crate::state::StateStore;

/// What controllers share with the agent.
pub struct Shared {
    pub home: PathBuf,
    pub store: Store,
    pub state: Arc<dyn StateStore>,
    pub backoff: Backoff,
    pub status: std::sync::Mutex<BTreeMap<ServiceName, ServiceStatus>>,
    pub router: Arc<crate::router::Router>,
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
        Self {
            home,
            store,
            state,
            backoff,
            status: std::sync::Mutex::default(),
            router,
            ids: AtomicU64::new(0),
            seed,
        }
    }

    /// `SERVICE-rN-xxxxxx`: unique, and names its release.
    pub fn new_instance_id(&self, service: &ServiceName, revision: u64) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        let mut h = Sha256::new();
        h.update(self.seed.to_le_bytes());
        h.update(n.to_le_bytes());
        let hex = kiln_core::digest::hex(&h.finalize()[..3]);
        format!("{service}-r{revision}-{hex}")
    }
}
