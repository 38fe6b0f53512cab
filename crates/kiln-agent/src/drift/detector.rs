//! The drift detector: one task for the node.
//!
//! - **Watch**: every tree in the store is watched (see `watch`); the
//!   paths an event names are checked against the tree's manifest a few
//!   milliseconds later (the changes of one edit come together), hashing
//!   only those files. A change is found within the second.
//! - **Verify**: every `verify_every` (and once at start: a change made
//!   while no agent ran has no event), every tree is checked in full, one
//!   file at a time, paced to `verify_rate` bytes a second on one thread.
//! - **Config**: every [`CONFIG_EVERY`], each instance's root process is
//!   read from `/proc` (command line, environment) and compared with how it
//!   was launched.
//!
//! On tree drift: the ledger records the files and how they differ, the
//! tree is swapped for a fresh one made from the verified blobs (the old
//! one kept in `quarantine/`), and the board marks the instances that
//! started before as stale: their controllers replace them. A tree that
//! cannot be made again (a blob failed its check) is recorded as
//! unrepaired and its instances are left running: replacing them would
//! start them on the same drifted files.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use kiln_core::Digest;
use kiln_core::api::{DriftFinding, DriftVerification, DriftWatching};
use kiln_core::drift::{FoundBy, Pace, config_drift, named_files, repair_backoff};
use kiln_core::event::{Actor, Change};
use kiln_core::tree::TreeDrift;
use kiln_store::Store;

use super::Board;
use super::watch::{Seen, Watcher};
use crate::state::{ClusterState, Event, NewEvent, NodeState};

/// How often each instance's command line and environment are read.
pub const CONFIG_EVERY: Duration = Duration::from_secs(2);

/// How long after a change's first event its paths are checked: the
/// events of one edit (open, write, close, chmod) arrive together.
const SETTLE: Duration = Duration::from_millis(25);

/// `kiln serve --verify-every`, `--verify-rate`.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub verify_every: Duration,
    /// Bytes a second; 0: unpaced.
    pub verify_rate: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            verify_every: Duration::from_secs(15 * 60),
            verify_rate: 64 << 20,
        }
    }
}

pub struct Detector {
    store: Store,
    state: Arc<dyn ClusterState>,
    /// This node's instances (which services an image's drift touches).
    node: Arc<dyn NodeState>,
    board: Arc<Board>,
    options: Options,
    /// Drift found in a tree that could not be made again: not recorded
    /// again while it stays the same.
    unrepaired: HashMap<Digest, Vec<TreeDrift>>,
    /// Each tree's last repair and the wait before the next.
    repairs: HashMap<Digest, (Instant, Duration)>,
    /// Drift found during that wait: the paths to check again at its end.
    deferred: BTreeMap<Digest, (Instant, BTreeSet<String>)>,
    /// Each release's last replacement for config drift and the wait
    /// before the next: an app that changes its own command line or
    /// environment (one that re-execs itself) is replaced ever more
    /// rarely, as a drifting tree is repaired, not every few seconds.
    config_repairs: HashMap<(kiln_core::spec::ServiceName, u64), (Instant, Duration)>,
}

impl Detector {
    pub fn new(
        store: Store,
        state: Arc<dyn ClusterState>,
        node: Arc<dyn NodeState>,
        board: Arc<Board>,
        options: Options,
    ) -> Self {
        Self {
            store,
            state,
            node,
            board,
            options,
            unrepaired: HashMap::new(),
            repairs: HashMap::new(),
            deferred: BTreeMap::new(),
            config_repairs: HashMap::new(),
        }
    }

    /// Until the agent ends.
    pub async fn run(mut self) {
        self.restore().await;
        let mut watcher = match Watcher::new(self.store.root()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(
                    "drift: cannot watch the trees ({e}): only the full verification finds drift"
                );
                None
            }
        };
        if let Some(w) = &mut watcher {
            self.sync(w).await;
        }
        let mut pending: BTreeMap<Digest, BTreeSet<String>> = BTreeMap::new();
        let mut settle_at: Option<tokio::time::Instant> = None;
        let mut config = tokio::time::interval(CONFIG_EVERY);
        config.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut verify_at = tokio::time::Instant::now();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut verifying = false;
        loop {
            let settle = async {
                match settle_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            let deferred_at = self.deferred.values().map(|(at, _)| *at).min();
            let deferred = async {
                match deferred_at {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            let events = async {
                match &mut watcher {
                    Some(w) => w.read().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                seen = events => match seen {
                    Ok(seen) => {
                        let mut trees = false;
                        for s in seen {
                            match s {
                                Seen::Path(image, path) => {
                                    pending.entry(image).or_default().insert(path);
                                }
                                Seen::Trees => trees = true,
                                // Events were lost: check everything now.
                                Seen::Overflow => verify_at = tokio::time::Instant::now(),
                            }
                        }
                        if trees && let Some(w) = &mut watcher {
                            self.sync(w).await;
                        }
                        if !pending.is_empty() && settle_at.is_none() {
                            settle_at = Some(tokio::time::Instant::now() + SETTLE);
                        }
                    }
                    Err(e) => {
                        tracing::error!("drift: reading the watch failed ({e}): only the full verification finds drift now");
                        watcher = None;
                    }
                },
                () = settle => {
                    settle_at = None;
                    for (image, paths) in std::mem::take(&mut pending) {
                        let store = self.store.clone();
                        let img = image.clone();
                        let found = tokio::task::spawn_blocking(move || store.check_paths(&img, &paths)).await;
                        match found {
                            Ok(Ok(drift)) if !drift.is_empty() => {
                                self.drifted(&image, drift, FoundBy::Watch, watcher.as_mut()).await;
                            }
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => tracing::warn!("drift: checking {image}: {e}"),
                            Err(e) => tracing::warn!("drift: checking {image}: {e}"),
                        }
                    }
                }
                () = deferred => {
                    let now = Instant::now();
                    let due: Vec<Digest> = self
                        .deferred
                        .iter()
                        .filter(|(_, (at, _))| *at <= now)
                        .map(|(image, _)| image.clone())
                        .collect();
                    for image in due {
                        if let Some((_, paths)) = self.deferred.remove(&image) {
                            pending.entry(image).or_default().extend(paths);
                        }
                    }
                    settle_at.get_or_insert_with(tokio::time::Instant::now);
                }
                _ = config.tick() => self.check_config().await,
                () = tokio::time::sleep_until(verify_at), if !verifying => {
                    verifying = true;
                    verify_at = tokio::time::Instant::now() + self.options.verify_every;
                    let (store, tx, rate) = (self.store.clone(), done_tx.clone(), self.options.verify_rate);
                    tokio::task::spawn_blocking(move || {
                        let _ = tx.send(verify_all(&store, rate));
                    });
                }
                Some(result) = done_rx.recv() => {
                    verifying = false;
                    self.verified(result, watcher.as_mut()).await;
                }
            }
        }
    }

    /// What earlier agent processes found, from the ledger: the findings
    /// `kiln drift` shows, and when each image's tree was replaced (an
    /// instance adopted from before then is still stale).
    async fn restore(&self) {
        // An index by kind: the ledger may be long, these are few.
        let kinds = ["tree-drift", "config-drift"];
        let events = match self.state.events_of(&kinds).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("drift: reading earlier findings: {e}");
                return;
            }
        };
        for ev in events {
            let Some(f) = finding(&ev) else {
                continue;
            };
            if let Change::TreeDrift {
                image,
                repaired: true,
                ..
            } = &ev.change
                && let Ok(at) = humantime::parse_rfc3339(&ev.time)
            {
                self.board.quarantined(image.clone(), at);
            }
            self.board.found(f);
        }
    }

    /// Watch every tree the store has (and only those).
    async fn sync(&mut self, w: &mut Watcher) {
        let trees = match self.store.trees() {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("drift: listing {}: {e}", w.trees_dir().display());
                return;
            }
        };
        for gone in w.images().into_iter().filter(|i| !trees.contains(i)) {
            w.unwatch_tree(&gone);
        }
        let new: Vec<Digest> = trees.into_iter().filter(|i| !w.watches(i)).collect();
        for image in &new {
            self.watch(w, image).await;
        }
        self.publish_counts(w);
    }

    /// Watch one tree; a directory already gone is drift.
    async fn watch(&mut self, w: &mut Watcher, image: &Digest) {
        let tree = match self.store.tree(image) {
            Ok(Some(t)) => t,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("drift: tree {image}: {e}");
                return;
            }
        };
        let gone = w.watch_tree(image, &tree.rootfs, &tree.manifest);
        if !gone.is_empty() {
            let store = self.store.clone();
            let img = image.clone();
            let paths: BTreeSet<String> = gone.into_iter().collect();
            if let Ok(Ok(drift)) =
                tokio::task::spawn_blocking(move || store.check_paths(&img, &paths)).await
                && !drift.is_empty()
            {
                self.drifted(image, drift, FoundBy::Watch, Some(w)).await;
            }
        }
    }

    fn publish_counts(&self, w: &Watcher) {
        let (trees, directories, files, unwatched) = w.counts();
        self.board.set_watching(DriftWatching {
            trees,
            directories,
            files,
            unwatched,
        });
    }

    /// `image`'s tree differs: record it, make it again, mark its
    /// instances stale.
    async fn drifted(
        &mut self,
        image: &Digest,
        drift: Vec<TreeDrift>,
        found_by: FoundBy,
        mut watcher: Option<&mut Watcher>,
    ) {
        if self.unrepaired.get(image) == Some(&drift) {
            return;
        }
        // A tree that keeps drifting is repaired ever more rarely.
        let wait = match repair_backoff(self.repairs.get(image).copied(), Instant::now()) {
            Ok(wait) => wait,
            Err(at) => {
                self.defer(image, at, &drift, found_by).await;
                return;
            }
        };
        for d in &drift {
            tracing::warn!("drift: tree of {image}: {d}");
        }
        if let Some(w) = watcher.as_deref_mut() {
            w.unwatch_tree(image);
        }
        let now = SystemTime::now();
        let store = self.store.clone();
        let img = image.clone();
        let replaced = tokio::task::spawn_blocking(move || store.replace_tree(&img, now))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let services = self.services_of(image).await;
        let counts = &self.board.counts;
        counts.tree.fetch_add(1, Ordering::Relaxed);
        counts
            .files
            .fetch_add(drift.len() as u64, Ordering::Relaxed);
        let (repaired, quarantine, error) = match replaced {
            Ok(q) => {
                self.unrepaired.remove(image);
                self.repairs.insert(image.clone(), (Instant::now(), wait));
                let q = q.map(|p| {
                    p.strip_prefix(self.store.root())
                        .unwrap_or(&p)
                        .display()
                        .to_string()
                });
                (true, q, None)
            }
            Err(e) => {
                tracing::error!(
                    "drift: the tree of {image} cannot be made again: {e}; its instances keep running"
                );
                counts.unrepaired.fetch_add(1, Ordering::Relaxed);
                self.unrepaired.insert(image.clone(), drift.clone());
                (false, None, Some(e))
            }
        };
        let change = Change::TreeDrift {
            image: image.clone(),
            files: named_files(&drift),
            count: drift.len(),
            found_by,
            repaired,
            services,
            quarantine,
            error,
        };
        self.record(NewEvent::node(change, Actor::Agent)).await;
        if repaired {
            self.board.quarantined(image.clone(), now);
        }
        if let Some(w) = watcher {
            self.watch_again(w, image);
        }
    }

    /// Drift found while the tree's repair waits: checked again at `at`.
    async fn defer(&mut self, image: &Digest, at: Instant, drift: &[TreeDrift], found_by: FoundBy) {
        let (_, paths) = self
            .deferred
            .entry(image.clone())
            .or_insert((at, BTreeSet::new()));
        let first = paths.is_empty();
        paths.extend(drift.iter().map(|d| d.path().to_owned()));
        if first {
            let wait = at.saturating_duration_since(Instant::now()).as_secs();
            tracing::warn!(
                "drift: tree of {image} drifted again soon after its repair: the next repair waits {wait}s"
            );
            // Recorded now, not only at the deferred check: a change undone
            // before it would otherwise leave no trace in the ledger.
            let change = Change::TreeDrift {
                image: image.clone(),
                files: named_files(drift),
                count: drift.len(),
                found_by,
                repaired: false,
                services: self.services_of(image).await,
                quarantine: None,
                error: Some(format!(
                    "drifted again within its repair back-off: repaired in {wait}s if it still differs then"
                )),
            };
            self.record(NewEvent::node(change, Actor::Agent)).await;
        }
    }

    /// Watch the (fresh) tree of `image` again.
    fn watch_again(&self, w: &mut Watcher, image: &Digest) {
        if let Ok(Some(tree)) = self.store.tree(image) {
            // A directory gone from a fresh tree cannot be: nothing to check.
            let _ = w.watch_tree(image, &tree.rootfs, &tree.manifest);
        }
        self.publish_counts(w);
    }

    /// Append to the ledger and show it in `kiln drift`.
    async fn record(&self, ev: NewEvent) {
        match self.state.append_event(&ev).await {
            Ok(seq) => {
                if let Ok(recorded) = self.state.events(seq.saturating_sub(1)).await
                    && let Some(f) = recorded.iter().find(|e| e.seq == seq).and_then(finding)
                {
                    self.board.found(f);
                }
            }
            Err(e) => tracing::error!("drift: recording a finding: {e}"),
        }
    }

    /// The services with an instance of `image` now.
    async fn services_of(&self, image: &Digest) -> Vec<String> {
        // Each release read once, however many instances it has.
        let releases: BTreeSet<_> = self
            .node
            .instances()
            .unwrap_or_default()
            .into_iter()
            .map(|rec| (rec.service, rec.revision))
            .collect();
        let mut out = BTreeSet::new();
        for (service, revision) in releases {
            if let Ok(Some(r)) = self.state.release(&service, revision).await
                && r.config.image == *image
            {
                out.insert(service.to_string());
            }
        }
        out.into_iter().collect()
    }

    /// Compare each instance's process with how it was launched.
    async fn check_config(&mut self) {
        for (id, e) in self.board.expected() {
            // A pid that is not this instance's process any more is not
            // drift: the instance is gone, which its task reports.
            if crate::runtime::start_ticks(e.pid) != Some(e.start_ticks) {
                continue;
            }
            let Some(live) = super::as_it_runs(e.pid) else {
                continue;
            };
            let differs = config_drift(&e.launched, &live);
            if differs.is_empty() {
                continue;
            }
            // Within the release's back-off the instance runs on; it is
            // found again (and replaced) once the wait is over.
            let key = (e.service.clone(), e.revision);
            let wait = match repair_backoff(self.config_repairs.get(&key).copied(), Instant::now())
            {
                Ok(wait) => wait,
                Err(_) => continue,
            };
            // The app's own process (below the sandbox) counts for its
            // instance.
            let id = super::instance_of(&id).to_owned();
            if !self.board.config_drifted(&id, differs.clone()) {
                continue;
            }
            self.config_repairs.insert(key, (Instant::now(), wait));
            tracing::warn!(
                "drift: instance {id}: {} differ from its launch",
                differs.join(", ")
            );
            self.board.counts.config.fetch_add(1, Ordering::Relaxed);
            self.record(NewEvent {
                change: Change::ConfigDrift { differs },
                actor: Actor::Agent,
                service: Some(e.service.clone()),
                revision: Some(e.revision),
                instance: Some(id.clone()),
            })
            .await;
        }
    }

    /// A full verification ended.
    async fn verified(&mut self, result: Verified, mut watcher: Option<&mut Watcher>) {
        let counts = &self.board.counts;
        counts.verifications.fetch_add(1, Ordering::Relaxed);
        counts
            .verified_bytes
            .fetch_add(result.bytes, Ordering::Relaxed);
        self.board.set_verification(DriftVerification {
            finished: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            trees: result.trees,
            files: result.files,
            bytes: result.bytes,
            seconds: result.took.as_secs_f64(),
            drifted: result.drifted.len() as u64,
            every: kiln_core::service::Duration(self.options.verify_every).to_string(),
            rate: self.options.verify_rate,
        });
        for (image, drift) in result.drifted {
            self.drifted(&image, drift, FoundBy::Verification, watcher.as_deref_mut())
                .await;
        }
    }
}

/// What a full verification found.
struct Verified {
    trees: u64,
    files: u64,
    bytes: u64,
    took: Duration,
    drifted: Vec<(Digest, Vec<TreeDrift>)>,
}

/// Every tree in full, one file at a time, paced (a blocking thread).
fn verify_all(store: &Store, rate: u64) -> Verified {
    let started = Instant::now();
    let mut pace = Pace::new(rate, started);
    let mut out = Verified {
        trees: 0,
        files: 0,
        bytes: 0,
        took: Duration::ZERO,
        drifted: Vec::new(),
    };
    for image in store.trees().unwrap_or_default() {
        let mut paced = |n: u64| {
            let wait = pace.wait(n, Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        };
        match store.verify_tree_paced(&image, &mut paced) {
            Ok(Some(check)) => {
                out.trees += 1;
                out.files += check.files;
                if !check.drift.is_empty() {
                    out.drifted.push((image, check.drift));
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("drift: verifying {image}: {e}"),
        }
    }
    out.bytes = pace.bytes();
    out.took = started.elapsed();
    out
}

/// A ledger entry as `kiln drift` shows it.
fn finding(ev: &Event) -> Option<DriftFinding> {
    let mut f = DriftFinding {
        seq: ev.seq,
        time: ev.time.clone(),
        instance: ev.instance.clone(),
        release: ev.revision,
        ..DriftFinding::default()
    };
    match &ev.change {
        Change::TreeDrift {
            image,
            files,
            count,
            found_by,
            repaired,
            services,
            quarantine,
            error,
        } => {
            f.kind = "tree".to_owned();
            f.image = Some(image.clone());
            f.files = files.clone();
            f.count = *count;
            f.found_by = Some(found_by.to_string());
            f.repaired = *repaired;
            f.services = services.clone();
            f.quarantine = quarantine.clone();
            f.error = error.clone();
        }
        Change::ConfigDrift { differs } => {
            f.kind = "config".to_owned();
            f.differs = differs.clone();
            f.repaired = true;
            f.services = ev.service.iter().cloned().collect();
            f.found_by = Some("proc".to_owned());
        }
        _ => return None,
    }
    Some(f)
}
