//! Pulling an image into the store for a command that needs it (`kiln
//! pull`, `apply` for a registry image, a bake on a registry base): a leaf
//! the commands that pull share, so none of them imports another.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{Context, Result};
use kiln_core::registry::RegistryRef;
use kiln_store::registry::{Credentials, Registry};
use kiln_store::store::Store;

/// The runtime of a push or pull: several threads, so that reading the
/// store, hashing and the network overlap on every core.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Progress lines on stderr while a terminal watches (or always with
/// `--verbose`-like callers); silent for scripts reading `--json`.
pub fn progress(json: bool) -> impl Fn(&str) + Sync {
    let show = !json && std::io::stderr().is_terminal();
    move |line: &str| {
        if show {
            eprintln!("  {line}");
        }
    }
}

/// Pull `src` into `store` (also what `apply` does for an image it lacks).
pub fn pull_into(
    home: &Path,
    store: &Store,
    src: &RegistryRef,
    insecure: bool,
    json: bool,
    deadline: std::time::Duration,
) -> Result<kiln_store::registry::PullReport> {
    let credentials = Credentials::open(home)?;
    let registry = Registry::new(&src.host, &credentials, insecure)?;
    let show = progress(json);
    let report = runtime()?
        .block_on(kiln_store::registry::pull_within(
            store, &registry, src, &show, deadline,
        ))
        .with_context(|| format!("cannot pull {src}"))?;
    if report.downloaded > 0 {
        crate::client::record(
            home,
            kiln_core::event::Change::ImagePulled {
                image: report.name.clone(),
                digest: report.digest.clone(),
                from: report.source.clone(),
            },
        );
    }
    Ok(report)
}
