//! Store collection for the agent: the roots are the images its kept
//! releases name (`kiln_core::retention`), the sweep is the store's
//! (`kiln_store::gc`). `kiln gc` runs it by hand; `kiln serve --gc-above
//! SIZE` runs it whenever the store's blobs pass SIZE.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use kiln_core::Digest;
use kiln_store::Store;
use kiln_store::gc::{GcOptions, GcReport};

use crate::state::{ClusterState, NodeState, StateError};

/// How often the agent looks at the store's size.
const EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Store(#[from] kiln_store::store::StoreError),
}

/// `kiln serve --gc-above SIZE [--keep-releases N] [--gc-grace D]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AutoGc {
    pub above: u64,
    pub keep_releases: usize,
    pub grace: Duration,
}

/// What a collection keeps, read from the state stores before it starts
/// (the sweep itself runs off the async threads).
pub(crate) struct Keep {
    /// The images the kept releases name, and what instances run from.
    roots: BTreeSet<Digest>,
    /// The instances that run on this node (their logs stay).
    running: BTreeSet<String>,
}

/// What the agent's state keeps: the images its kept releases name, and
/// whatever this node's instances run from.
pub(crate) async fn keep(
    state: &dyn ClusterState,
    node: &dyn NodeState,
    keep_releases: usize,
) -> Result<Keep, StateError> {
    let releases = state.all_releases().await?;
    let targets: BTreeMap<_, _> = state
        .services()
        .await?
        .into_iter()
        .map(|s| (s.name, s.target))
        .collect();
    let mut kept = kiln_core::retention::kept_images(&releases, &targets, keep_releases);
    // Whatever an instance runs from (a blue-green fleet kept warm, one
    // still draining), however many releases ago.
    let instances = node.instances()?;
    for i in &instances {
        if let Some(r) = releases
            .iter()
            .find(|r| r.service == i.service && r.revision == i.revision)
        {
            kept.insert(r.config.image.clone());
        }
    }
    Ok(Keep {
        roots: kept,
        running: instances.into_iter().map(|i| i.id).collect(),
    })
}

/// Collect `store`, keeping what `keep` says, and the logs of instances
/// gone for longer than `grace`. Blocking.
pub(crate) fn collect(
    store: &Store,
    keep: Keep,
    grace: Duration,
    dry_run: bool,
) -> Result<GcReport, GcError> {
    let mut report = sweep(store, keep.roots, grace, dry_run)?;
    collect_logs(
        store.root(),
        &keep.running,
        grace,
        SystemTime::now(),
        dry_run,
        &mut report,
    );
    Ok(report)
}

/// Remove (unless `dry_run`) the logs under `home/logs/` of instances that
/// do not run any more and whose log was last written more than `grace`
/// before `now` (a crash-looping slot leaves one log per start).
fn collect_logs(
    home: &std::path::Path,
    running: &BTreeSet<String>,
    grace: Duration,
    now: SystemTime,
    dry_run: bool,
    report: &mut GcReport,
) {
    let Ok(services) = std::fs::read_dir(home.join("logs")) else {
        return;
    };
    for service in services.flatten() {
        let Ok(files) = std::fs::read_dir(service.path()) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let Some(id) = name
                .strip_suffix(".log")
                .or_else(|| name.strip_suffix(".log.1"))
            else {
                continue;
            };
            let Ok(meta) = f.metadata() else {
                continue;
            };
            let old = meta
                .modified()
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age >= grace);
            if running.contains(id) || !old {
                continue;
            }
            report.logs += 1;
            report.freed_bytes += meta.len();
            if !dry_run {
                let _ = std::fs::remove_file(f.path());
            }
        }
    }
}

fn sweep(
    store: &Store,
    roots: BTreeSet<Digest>,
    grace: Duration,
    dry_run: bool,
) -> Result<GcReport, GcError> {
    Ok(store.gc(&GcOptions {
        roots,
        grace,
        dry_run,
        now: SystemTime::now(),
    })?)
}

/// `kiln gc`: collect the store of `home`, keeping what the releases in
/// its state store (its database, or its cluster's) need (none recorded yet: only tagged and young
/// images stay). The agent may be running: SQLite's WAL lets both read.
pub async fn collect_home(
    home: &std::path::Path,
    keep_releases: usize,
    grace: Duration,
    dry_run: bool,
) -> Result<GcReport, GcError> {
    let store = Store::open(home)?;
    let cluster = crate::cluster_of(home)?;
    if cluster.is_none() && !home.join("state.db").exists() {
        return sweep(&store, BTreeSet::new(), grace, dry_run);
    }
    // In a cluster, the releases are the cluster's (in etcd).
    let state = crate::open_state(home, cluster.as_ref()).await?;
    let keep = keep(&*state, &*state, keep_releases).await?;
    collect(&store, keep, grace, dry_run)
}

/// Bytes of the store's blobs.
pub fn blob_bytes(store: &Store) -> u64 {
    std::fs::read_dir(store.root().join("blobs/sha256"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Soon after start, then every minute: collect when the blobs pass
/// `auto.above`.
pub async fn run(
    store: Store,
    state: std::sync::Arc<dyn ClusterState>,
    node: std::sync::Arc<dyn NodeState>,
    auto: AutoGc,
) {
    let mut wait = Duration::from_secs(1);
    loop {
        tokio::time::sleep(wait).await;
        wait = EVERY;
        let measured = store.clone();
        let size = match tokio::task::spawn_blocking(move || blob_bytes(&measured)).await {
            Ok(size) if size > auto.above => size,
            Ok(_) => continue,
            Err(e) => {
                tracing::error!("store collection stopped: {e}");
                continue;
            }
        };
        let keep = match keep(&*state, &*node, auto.keep_releases).await {
            Ok(keep) => keep,
            Err(e) => {
                tracing::error!("store collection: {e}");
                continue;
            }
        };
        let store = store.clone();
        let done = tokio::task::spawn_blocking(move || {
            Some((size, collect(&store, keep, auto.grace, false)))
        })
        .await;
        match done {
            Ok(Some((size, Ok(r)))) => tracing::info!(
                "store at {size} bytes, over {}: collected {} images, {} blobs, {} trees, {} tmp leftovers, {} bytes freed",
                auto.above,
                r.images.len(),
                r.blobs,
                r.trees,
                r.tmp,
                r.freed_bytes
            ),
            Ok(Some((_, Err(e)))) => tracing::error!("store collection: {e}"),
            Ok(None) => {}
            Err(e) => tracing::error!("store collection stopped: {e}"),
        }
    }
}
