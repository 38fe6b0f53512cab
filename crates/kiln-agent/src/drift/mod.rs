//! Drift: what runs must stay what was released. The [`detector`] watches
//! every image tree (inotify, one watch per directory) and checks the paths
//! a change touched within the second, verifies every tree in full now and
//! then (paced, so it never starves the instances), and reads each
//! instance's command line and environment from `/proc`. What it finds goes
//! on the [`Board`], which controllers read: an instance that started
//! before its image's tree was replaced, or whose process no longer looks
//! as launched, is *stale*, and `kiln_core::rollout` replaces it as a
//! rolling update.
//!
//! The board is shared (the agent, the controllers, the detector) and
//! imports none of them; the detector takes the store, the state and the
//! board, not the agent.

pub mod detector;
mod watch;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use kiln_core::Digest;
use kiln_core::api::{DriftFinding, DriftResponse, DriftVerification, DriftWatching};
use kiln_core::drift::Launched;
use kiln_core::spec::ServiceName;

/// How process `pid` looks now (command line and environment), if it can
/// be read.
pub fn as_it_runs(pid: u32) -> Option<Launched> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    Some(Launched::from_proc(&cmdline, &environ))
}

/// The key under which the app below a launcher (the sandbox's) is
/// expected, beside its instance's own.
pub fn app_key(instance: &str) -> String {
    format!("{instance}#app")
}

/// The instance an expected key belongs to (its own, or its app's).
pub fn instance_of(key: &str) -> &str {
    key.split_once('#').map_or(key, |(id, _)| id)
}

/// How many findings `kiln drift` shows (the ledger keeps them all).
const FINDINGS_KEPT: usize = 100;

/// What an instance's root process must look like, registered by its
/// controller once it has a pid.
#[derive(Clone, Debug)]
pub struct Expected {
    pub service: ServiceName,
    pub revision: u64,
    pub pid: u32,
    /// The process's start time in clock ticks: a pid reused by another
    /// process is not this instance.
    pub start_ticks: u64,
    pub launched: Arc<Launched>,
}

/// Counters for `kiln_drift_*`.
#[derive(Debug, Default)]
pub struct Counts {
    pub tree: AtomicU64,
    pub config: AtomicU64,
    pub files: AtomicU64,
    pub unrepaired: AtomicU64,
    pub replaced: AtomicU64,
    pub verifications: AtomicU64,
    pub verified_bytes: AtomicU64,
}

/// What the detector found and what controllers read.
pub struct Board {
    /// When each image's tree was last replaced because it drifted: an
    /// instance of it started before then runs the drifted tree.
    quarantined: Mutex<HashMap<Digest, SystemTime>>,
    /// Instances whose process no longer looks as launched, and how.
    config: Mutex<HashMap<String, Vec<String>>>,
    expected: Mutex<BTreeMap<String, Expected>>,
    findings: Mutex<VecDeque<DriftFinding>>,
    watching: Mutex<DriftWatching>,
    verification: Mutex<Option<DriftVerification>>,
    pub counts: Counts,
    /// Bumped on every finding: controllers look again.
    wake: tokio::sync::watch::Sender<u64>,
}

impl Default for Board {
    fn default() -> Self {
        Self {
            quarantined: Mutex::default(),
            config: Mutex::default(),
            expected: Mutex::default(),
            findings: Mutex::default(),
            watching: Mutex::default(),
            verification: Mutex::default(),
            counts: Counts::default(),
            wake: tokio::sync::watch::channel(0).0,
        }
    }
}

/// A poisoned lock still holds consistent data here (plain maps and
/// values, each written in one statement).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Board {
    /// Changes whenever a finding may make an instance stale.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.wake.subscribe()
    }

    fn wake(&self) {
        self.wake.send_modify(|n| *n += 1);
    }

    /// Whether instance `id` of `image`, started at `started`, must be
    /// replaced: its image's tree was replaced after it started, or its
    /// process no longer looks as launched.
    pub fn stale(&self, image: &Digest, started: SystemTime, id: &str) -> bool {
        lock(&self.quarantined)
            .get(image)
            .is_some_and(|q| started < *q)
            || lock(&self.config).contains_key(id)
    }

    /// The tree of `image` was replaced at `at`.
    pub fn quarantined(&self, image: Digest, at: SystemTime) {
        let mut q = lock(&self.quarantined);
        let t = q.entry(image).or_insert(at);
        *t = (*t).max(at);
        drop(q);
        self.wake();
    }

    /// Instance `id` differs from its launch in `differs`. False when it
    /// was already known.
    pub fn config_drifted(&self, id: &str, differs: Vec<String>) -> bool {
        let fresh = lock(&self.config).insert(id.to_owned(), differs).is_none();
        if fresh {
            self.wake();
        }
        fresh
    }

    pub fn expect(&self, id: &str, e: Expected) {
        lock(&self.expected).insert(id.to_owned(), e);
    }

    /// Instance `id` is gone.
    pub fn forget(&self, id: &str) {
        let app = app_key(id);
        let mut expected = lock(&self.expected);
        expected.remove(id);
        expected.remove(&app);
        drop(expected);
        lock(&self.config).remove(id);
    }

    /// Every instance to check, with what it must look like.
    pub fn expected(&self) -> Vec<(String, Expected)> {
        lock(&self.expected)
            .iter()
            .map(|(id, e)| (id.clone(), e.clone()))
            .collect()
    }

    /// Instances stopped because they drifted.
    pub fn replaced(&self, n: usize) {
        self.counts.replaced.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn found(&self, f: DriftFinding) {
        let mut all = lock(&self.findings);
        all.push_front(f);
        all.truncate(FINDINGS_KEPT);
    }

    pub fn set_watching(&self, w: DriftWatching) {
        *lock(&self.watching) = w;
    }

    pub fn set_verification(&self, v: DriftVerification) {
        *lock(&self.verification) = Some(v);
    }

    /// `kiln drift [SERVICE]`.
    pub fn report(&self, service: Option<&str>) -> DriftResponse {
        DriftResponse {
            watching: lock(&self.watching).clone(),
            verification: lock(&self.verification).clone(),
            findings: lock(&self.findings)
                .iter()
                .filter(|f| service.is_none_or(|s| f.services.iter().any(|x| x == s)))
                .cloned()
                .collect(),
        }
    }

    /// `kiln_drift_*`, in Prometheus text.
    pub fn render(&self, out: &mut String) {
        let c = &self.counts;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP kiln_drift_detected_total Drift found, by kind: an image tree that differs from its manifest, or an instance whose command line or environment differs from its launch.\n# TYPE kiln_drift_detected_total counter\nkiln_drift_detected_total{{kind=\"tree\"}} {}\nkiln_drift_detected_total{{kind=\"config\"}} {}",
            get(&c.tree),
            get(&c.config)
        );
        let w = lock(&self.watching).clone();
        for (kind, name, help, v) in [
            (
                "counter",
                "kiln_drift_files_total",
                "Files found differing from their image.",
                get(&c.files),
            ),
            (
                "counter",
                "kiln_drift_unrepaired_total",
                "Drifted trees that could not be made again (a blob failed its check).",
                get(&c.unrepaired),
            ),
            (
                "counter",
                "kiln_drift_instances_replaced_total",
                "Instances stopped because they drifted (a fresh one took each's place).",
                get(&c.replaced),
            ),
            (
                "counter",
                "kiln_drift_verifications_total",
                "Full verifications of every tree.",
                get(&c.verifications),
            ),
            (
                "counter",
                "kiln_drift_verified_bytes_total",
                "Bytes read and hashed by full verifications.",
                get(&c.verified_bytes),
            ),
            (
                "gauge",
                "kiln_drift_watched_trees",
                "Image trees watched.",
                w.trees,
            ),
            (
                "gauge",
                "kiln_drift_watched_directories",
                "Directories under an inotify watch.",
                w.directories,
            ),
            (
                "gauge",
                "kiln_drift_watched_files",
                "Files in the watched trees.",
                w.files,
            ),
            (
                "gauge",
                "kiln_drift_unwatched_directories",
                "Directories that could not be watched (the verification covers them).",
                w.unwatched,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
    }
}
