//! Store collection for the agent: the roots are the images its kept
//! releases name (`kiln_core::retention`), the sweep is the store's
//! (`kiln_store::gc`). `kiln gc` runs it by hand; `kiln serve --gc-above
//! SIZE` runs it whenever the store's blobs pass SIZE.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use kiln_core::Digest;
use kiln_store::Store;
use kiln_store::gc::{GcOptions, GcReport};

use crate::state::{StateError, StateStore};

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

/// The images the agent's kept releases name.
pub(crate) fn roots(
    state: &dyn StateStore,
    keep_releases: usize,
) -> Result<BTreeSet<Digest>, StateError> {
    let releases = state.all_releases()?;
    let targets: BTreeMap<_, _> = state
        .services()?
        .into_iter()
        .map(|s| (s.name, s.target))
        .collect();
    let mut kept = kiln_core::retention::kept_images(&releases, &targets, keep_releases);
    // Whatever an instance runs from (a blue-green fleet kept warm, one
    // still draining), however many releases ago.
    for i in state.instances()? {
        if let Some(r) = releases
            .iter()
            .find(|r| r.service == i.service && r.revision == i.revision)
        {
            kept.insert(r.config.image.clone());
        }
    }
    Ok(kept)
}

/// Collect `store`, keeping what `state`'s releases need, and the logs of
/// instances gone for longer than `grace`.
pub(crate) fn collect(
    store: &Store,
    state: &dyn StateStore,
    keep_releases: usize,
    grace: Duration,
    dry_run: bool,
) -> Result<GcReport, GcError> {
    let mut report = sweep(store, roots(state, keep_releases)?, grace, dry_run)?;
    collect_logs(
        store.root(),
        state,
        grace,
        SystemTime::now(),
        dry_run,
        &mut report,
    )?;
    Ok(report)
}

/// Remove (unless `dry_run`) the logs under `home/logs/` of instances that
/// do not run any more and whose log was last written more than `grace`
/// before `now` (a crash-looping slot leaves one log per start).
fn collect_logs(
    home: &std::path::Path,
    state: &dyn StateStore,
    grace: Duration,
    now: SystemTime,
    dry_run: bool,
    report: &mut GcReport,
) -> Result<(), GcError> {
    let running: BTreeSet<String> = state.instances()?.into_iter().map(|i| i.id).collect();
    let Ok(services) = std::fs::read_dir(home.join("logs")) else {
        return Ok(());
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
    Ok(())
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
/// its state database need (none recorded yet: only tagged and young
/// images stay). The agent may be running: SQLite's WAL lets both read.
pub fn collect_home(
    home: &std::path::Path,
    keep_releases: usize,
    grace: Duration,
    dry_run: bool,
) -> Result<GcReport, GcError> {
    let store = Store::open(home)?;
    let db = home.join("state.db");
    if !db.exists() {
        return sweep(&store, BTreeSet::new(), grace, dry_run);
    }
    let state = crate::state::SqliteState::open(&db)?;
    collect(&store, &state, keep_releases, grace, dry_run)
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
pub async fn run(store: Store, state: std::sync::Arc<dyn StateStore>, auto: AutoGc) {
    let mut wait = Duration::from_secs(1);
    loop {
        tokio::time::sleep(wait).await;
        wait = EVERY;
        let (store, state) = (store.clone(), state.clone());
        let done = tokio::task::spawn_blocking(move || {
            let size = blob_bytes(&store);
            if size <= auto.above {
                return None;
            }
            Some((
                size,
                collect(&store, &*state, auto.keep_releases, auto.grace, false),
            ))
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
