//! Release tasks (`[services.NAME.hooks]`): a hook runs as a one-off
//! instance of the release it belongs to — made as its instances are
//! ([`prepare_release`], [`launch_for`]), with its argv — to its end (at
//! most [`HOOK_LIMIT`]); its output goes to its log
//! (`NAME-rREV-hook-HOOK.log`, what `kiln logs --hook` shows) and the run
//! to the ledger (`hook-run`). The agent runs `pre_deploy` (an apply) and
//! `pre_rollback` (a rollback); the controller runs `post_deploy` once a
//! release is active.

use std::sync::Arc;

use kiln_core::event::{Actor, Change};
use kiln_core::release::Release;
use kiln_core::spec::ServiceName;

use super::ControllerError;
use super::instances::{LaunchError, free_port, launch_for, prepare_release};
use crate::shared::Shared;
use crate::state::{NewEvent, StateError};

/// The longest a release task may run.
pub const HOOK_LIMIT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// Why a release task did not pass.
#[derive(Debug)]
pub enum HookError {
    /// It ran and did not exit 0: how it ended.
    Failed(String),
    /// It could not be started.
    Refused(ControllerError),
    State(StateError),
}

/// Run `hook` (`argv`) of `release` of service `name` to its end.
pub async fn run(
    shared: &Shared,
    name: &ServiceName,
    release: Release,
    hook: &'static str,
    argv: Vec<String>,
    actor: Actor,
) -> Result<(), HookError> {
    let revision = release.revision;
    let p = prepare_release(shared, name, release)
        .await
        .map_err(HookError::Refused)?;
    let id = format!("{name}-r{revision}-hook-{hook}");
    let port = free_port(shared.membership.address)
        .map_err(|e| HookError::Refused(crate::runtime::RuntimeError::Spawn(e).into()))?;
    let mut launch = launch_for(shared, name, &p, &id, port)
        .await
        .map_err(|e| match e {
            LaunchError::State(e) => HookError::State(e),
            LaunchError::Secret(secret) => HookError::Refused(ControllerError::MissingSecret {
                name: secret,
                revision,
            }),
        })?;
    launch.argv = argv.clone();
    let rt = p.runtime.clone();
    rt.prepare(&id, &launch)
        .map_err(|e| HookError::Refused(e.into()))?;
    let mut running = match rt.spawn(&id, &launch) {
        Ok(r) => r,
        Err(e) => {
            rt.clean_up(&id, &launch);
            return Err(HookError::Refused(e.into()));
        }
    };
    let started = std::time::Instant::now();
    // Its output into its log, stamped as an instance's is.
    let log_path = shared
        .home
        .join("logs")
        .join(name.as_str())
        .join(format!("{id}.log"));
    let log = Arc::new(
        crate::instance::logs::LogFile::create(log_path.clone())
            .await
            .map_err(|e| HookError::Refused(crate::runtime::RuntimeError::Spawn(e).into()))?,
    );
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let pumps: Vec<_> = running
        .output()
        .into_iter()
        .filter_map(|fd| tokio::net::unix::pipe::Receiver::from_owned_fd(fd).ok())
        .map(|out| {
            let (log, stopped) = (log.clone(), stopped.clone());
            tokio::spawn(async move { log.pump(out, stopped).await })
        })
        .collect();
    let status = match tokio::time::timeout(HOOK_LIMIT, running.wait()).await {
        Ok(s) => s,
        Err(_) => {
            running.kill();
            format!(
                "{} (killed after {}s)",
                running.wait().await,
                HOOK_LIMIT.as_secs()
            )
        }
    };
    running.kill();
    for p in pumps {
        let _ = tokio::time::timeout(std::time::Duration::from_millis(500), p).await;
    }
    log.note(&format!("{hook} exited ({status})")).await;
    drop(running);
    rt.clean_up(&id, &launch);
    let output = kiln_core::Digest::of(&tokio::fs::read(&log_path).await.unwrap_or_default());
    let event = NewEvent {
        change: Change::HookRun {
            hook: hook.to_owned(),
            argv,
            status: status.clone(),
            duration_ms: started.elapsed().as_millis() as u64,
            output,
        },
        actor,
        service: Some(name.clone()),
        revision: Some(revision),
        instance: Some(id),
    };
    shared
        .state
        .append_event(&event)
        .await
        .map_err(HookError::State)?;
    if kiln_core::api::exit_code(&status) == 0 && status.starts_with("exit status") {
        Ok(())
    } else {
        Err(HookError::Failed(status))
    }
}
