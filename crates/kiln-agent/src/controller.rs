//! The reconciler: one controller task per service, so passes over one
//! service never overlap. Level-triggered: every pass reads the desired
//! state (the service's target release and replicas, from the state store)
//! and the observed state (its instances), acts, and sets a timer for the
//! next time something is due. Messages only say "look again"; why a pass
//! ran never changes what it does.
//!
//! Instances are never modified: one that exits or fails liveness is
//! replaced by a new instance (new id) of the same release in the same
//! replica slot, at once the first time and with exponential back-off while
//! the slot keeps failing before it was stable.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use kiln_core::api::{CanaryStatus, InstanceState, InstanceStatus, ServiceStatus, SlotBackoff};
use kiln_core::event::{Actor, Change};
use kiln_core::release::{Outcome, Release};
use kiln_core::rollout::{Fleet, OldInstance, fleet_step};
use kiln_core::service::{Pause, Strategy};
use kiln_core::spec::ServiceName;
use tokio::sync::{mpsc, oneshot};

use crate::instance::{InstanceTask, Report, StopKind};
use crate::logs::LogFile;
use crate::metrics::Snapshot;
use crate::probe::ProbeKind;
use crate::router::{Backend, RouteKey, ServiceRoutes};
use crate::runtime::{DEFAULT_PATH, Launch, Runtime, runtime, start_ticks};
use crate::shared::Shared;
use crate::state::{InstanceRecord, NewEvent, StateError};
use kiln_core::rollout::canary::{Judgement, fleet, judge};

/// What a controller is told.
pub enum Msg {
    /// Something changed (an apply): reconcile.
    Wake,
    /// Stop every instance, then answer.
    Shutdown {
        kind: StopKind,
        done: oneshot::Sender<()>,
    },
    /// `kiln promote`: switch a blue-green rollout waiting for it, or pass
    /// a canary's current step.
    Promote {
        actor: Actor,
        done: oneshot::Sender<Result<(u64, Option<u32>), ControllerError>>,
    },
    /// `kiln abort`: fail the rollout in progress and return to the release
    /// before it; answers (aborted release, release returned to).
    Abort {
        actor: Actor,
        done: oneshot::Sender<Result<(u64, u64), ControllerError>>,
    },
}

/// Why the controller could not do what it was asked or needed. The
/// refusals of `promote` and `abort` reach the CLI as their messages.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("no service named {0}")]
    NoService(ServiceName),
    #[error("release {revision} of {service} is not recorded")]
    NoRelease { service: ServiceName, revision: u64 },
    #[error("cannot materialize {image}: {source}")]
    Materialize {
        image: kiln_core::Digest,
        source: Box<kiln_store::tree::TreeError>,
    },
    #[error("unpacking {image} stopped: {0}", image = .1)]
    Unpacker(tokio::task::JoinError, kiln_core::Digest),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
    #[error("volume {path}: {source}", path = .path.display())]
    Volume {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no rollout of {0} is waiting for promotion")]
    NotWaitingForPromotion(ServiceName),
    #[error(
        "no rollout of {service} is in progress (it is on release {revision}): nothing to abort"
    )]
    NothingToAbort { service: ServiceName, revision: u64 },
    #[error(
        "release {revision} is the first release of {service}: there is no earlier release to return to"
    )]
    FirstRelease { service: ServiceName, revision: u64 },
}

/// A canary rollout in progress.
struct CanaryRun {
    revision: u64,
    stable: u64,
    /// Index of the current step in `rollout.steps`.
    step: usize,
    /// The canary's share now: the previous step's while this step's
    /// fleet starts, 0 before the first.
    weight: u32,
    /// When this step's weight took effect, with both releases' counters
    /// then (the analysis window starts there).
    began: Option<(Instant, Snapshot, Snapshot)>,
    /// `kiln promote` asked to pass this step.
    promote: bool,
    /// What the step waits for, for `status`.
    waiting: String,
}

/// What was last published to the router for the service's listener.
#[derive(Default, PartialEq)]
struct Routed {
    stable: Vec<String>,
    canary: Vec<String>,
    weight: u32,
    timeout: std::time::Duration,
    limits: kiln_core::service::RouterSpec,
}

/// A release made ready to run: its tree and runtime.
struct Prepared {
    release: Release,
    rootfs: PathBuf,
    runtime: Arc<dyn Runtime>,
}

struct Inst {
    id: String,
    revision: u64,
    slot: u32,
    port: u16,
    pid: Option<u32>,
    stopping: bool,
    ready: bool,
    live: bool,
    started: Instant,
    started_wall: SystemTime,
    ready_since: Option<Instant>,
    stop: Option<oneshot::Sender<StopKind>>,
    /// Counted as a failure already (liveness), so its exit is not counted again.
    failure_counted: bool,
    read_only: bool,
    runtime: kiln_core::service::RuntimeKind,
    /// Requests the router has in flight to it.
    inflight: Arc<crate::metrics::InFlight>,
    /// Taken over by a release with the same content (warm rollback).
    adopted: bool,
}

#[derive(Default)]
struct Slot {
    failures: u32,
    retry_at: Option<Instant>,
    replacements: u32,
}

pub struct Controller {
    shared: Arc<Shared>,
    name: ServiceName,
    rx: mpsc::UnboundedReceiver<Msg>,
    reports_tx: mpsc::UnboundedSender<Report>,
    reports: mpsc::UnboundedReceiver<Report>,
    instances: BTreeMap<String, Inst>,
    slots: BTreeMap<(u64, u32), Slot>,
    prepared: BTreeMap<u64, Arc<Prepared>>,
    /// The rollout in progress: (target, when it began, its deadline).
    rollout_started: Option<(u64, Instant, std::time::Duration)>,
    shutdown: Option<(StopKind, Vec<oneshot::Sender<()>>)>,
    message: Option<String>,
    /// Past the deadline with nothing to return to, or paused by a failed
    /// rollout with `auto_rollback = false` (see `ServiceStatus::stalled`).
    stalled: bool,
    /// A failed rollout left paused: no new instance of the target starts.
    paused: bool,
    /// What was last published to the router.
    routed: Routed,
    /// canary: the rollout in progress.
    canary: Option<CanaryRun>,
    /// blue-green: the release that gets the service's traffic (the new
    /// fleet only gets it when promoted).
    routed_revision: Option<u64>,
    /// blue-green: `kiln promote` asked for the switch.
    promote_requested: bool,
    /// blue-green: the old fleet stays warm until then.
    warm_until: Option<Instant>,
    /// The preview instance ids last published.
    previewed: Vec<String>,
    /// The service as the last pass read it: its settings (min_ready,
    /// timeout, preview) serve the timers and route publishing until the
    /// next pass, without another read of the state store.
    service: Option<crate::state::ServiceRecord>,
}

impl Controller {
    pub fn new(shared: Arc<Shared>, name: ServiceName, rx: mpsc::UnboundedReceiver<Msg>) -> Self {
        let (reports_tx, reports) = mpsc::unbounded_channel();
        Self {
            shared,
            name,
            rx,
            reports_tx,
            reports,
            instances: BTreeMap::new(),
            slots: BTreeMap::new(),
            prepared: BTreeMap::new(),
            rollout_started: None,
            shutdown: None,
            message: None,
            stalled: false,
            paused: false,
            routed: Routed::default(),
            canary: None,
            routed_revision: None,
            promote_requested: false,
            warm_until: None,
            previewed: Vec::new(),
            service: None,
        }
    }

    pub async fn run(mut self) {
        loop {
            let due = self.next_due();
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some(Msg::Wake) => {}
                    Some(Msg::Promote { actor, done }) => {
                        let _ = done.send(self.request_promotion(actor));
                    }
                    Some(Msg::Abort { actor, done }) => {
                        let _ = done.send(self.request_abort(actor));
                    }
                    Some(Msg::Shutdown { kind, done }) => {
                        let escalate = match &mut self.shutdown {
                            Some((k, waiters)) => {
                                waiters.push(done);
                                // A second request may escalate graceful to kill.
                                let escalate = kind == StopKind::Kill && *k != StopKind::Kill;
                                *k = if escalate { StopKind::Kill } else { *k };
                                escalate
                            }
                            None => {
                                self.shutdown = Some((kind, vec![done]));
                                false
                            }
                        };
                        if escalate {
                            self.stop_all(StopKind::Kill, true);
                        }
                    }
                    None => return,
                },
                Some(report) = self.reports.recv() => self.on_report(report),
                _ = sleep_until(due) => {}
            }
            // Drain whatever else arrived, then one pass for all of it.
            while let Ok(report) = self.reports.try_recv() {
                self.on_report(report);
            }
            self.reconcile().await;
            self.publish_routes();
            if let Some(rec) = &self.service
                && rec.settings.rollout.preview_listen.is_some()
            {
                let (target, timeout, limits) =
                    (rec.target, rec.settings.timeout.0, rec.settings.router);
                self.publish_preview(target, timeout, limits);
            }
            self.publish();
            if let Some((_, waiters)) = &mut self.shutdown
                && self.instances.is_empty()
            {
                for w in waiters.drain(..) {
                    let _ = w.send(());
                }
                return;
            }
        }
    }

    fn event(&self, change: Change, revision: Option<u64>, instance: Option<&str>) -> NewEvent {
        NewEvent {
            change,
            actor: Actor::Agent,
            service: Some(self.name.clone()),
            revision,
            instance: instance.map(str::to_owned),
        }
    }

    /// Append an event of the service to the ledger; a failure to append is logged
    /// and shown in the service's status, not fatal.
    fn record_event(&mut self, change: Change, revision: Option<u64>, instance: Option<&str>) {
        let ev = self.event(change, revision, instance);
        if let Err(e) = self.shared.state.append_event(&ev) {
            self.log_state_error(e);
        }
    }

    fn log_state_error(&mut self, e: crate::state::StateError) {
        tracing::error!(service = %self.name, "state: {e}");
        self.message = Some(format!("state store error: {e}"));
    }

    fn on_report(&mut self, report: Report) {
        match report {
            Report::Started { id, pid } => {
                let Some(inst) = self.instances.get_mut(&id) else {
                    return;
                };
                inst.pid = Some(pid);
                let rec = InstanceRecord {
                    id: id.clone(),
                    service: self.name.clone(),
                    revision: inst.revision,
                    slot: inst.slot,
                    pid,
                    start_ticks: start_ticks(pid).unwrap_or(0),
                    port: inst.port,
                };
                let ev = self.event(
                    Change::InstanceStarted {
                        pid,
                        port: rec.port,
                        slot: rec.slot,
                    },
                    Some(rec.revision),
                    Some(&id),
                );
                if let Err(e) = self.shared.state.put_instance(&rec, &ev) {
                    self.log_state_error(e);
                }
            }
            Report::StartFailed { id, error } => {
                if let Some(inst) = self.instances.remove(&id) {
                    self.message = Some(format!("instance {id} failed to start: {error}"));
                    self.count_failure(inst.revision, inst.slot, None);
                    self.record_event(
                        Change::InstanceStartFailed {
                            error: error.clone(),
                        },
                        Some(inst.revision),
                        Some(&id),
                    );
                }
            }
            Report::Health { id, probe, healthy } => {
                let Some(inst) = self.instances.get_mut(&id) else {
                    return;
                };
                let revision = inst.revision;
                let kind = match (probe, healthy) {
                    (ProbeKind::Readiness, true) => {
                        inst.ready = true;
                        inst.ready_since = Some(Instant::now());
                        Change::InstanceReady {}
                    }
                    (ProbeKind::Readiness, false) => {
                        inst.ready = false;
                        inst.ready_since = None;
                        Change::InstanceUnready {}
                    }
                    (ProbeKind::Liveness, live) => {
                        inst.live = live;
                        if live {
                            Change::InstanceLive {}
                        } else {
                            Change::InstanceLivenessFailed {}
                        }
                    }
                    (ProbeKind::Startup, _) => Change::InstanceStartedUp {},
                };
                self.record_event(kind, Some(revision), Some(&id));
                if probe == ProbeKind::Liveness && !healthy {
                    // Replaced, never restarted in place: stop it and let the
                    // next pass start a new instance in its slot.
                    if let Some(inst) = self.instances.get_mut(&id) {
                        let (rev, slot, since) = (inst.revision, inst.slot, inst.ready_since);
                        inst.failure_counted = true;
                        self.stop_instance(&id, StopKind::Graceful, "liveness failed");
                        self.count_failure(rev, slot, since);
                    }
                }
            }
            Report::Exited {
                id,
                status,
                requested,
            } => {
                let Some(inst) = self.instances.remove(&id) else {
                    return;
                };
                if !requested && !inst.failure_counted {
                    self.message = Some(format!("instance {id} exited: {status}"));
                    self.count_failure(inst.revision, inst.slot, inst.ready_since);
                }
                let ev = self.event(
                    Change::InstanceExited {
                        status: status.clone(),
                        requested,
                    },
                    Some(inst.revision),
                    Some(&id),
                );
                if let Err(e) = self.shared.state.remove_instance(&id, &ev) {
                    self.log_state_error(e);
                }
            }
        }
    }

    /// A slot's instance failed: count it and schedule the replacement.
    fn count_failure(&mut self, revision: u64, slot: u32, ready_since: Option<Instant>) {
        let backoff = self.shared.backoff;
        let s = self.slots.entry((revision, slot)).or_default();
        let stable = ready_since.is_some_and(|t| t.elapsed() >= backoff.stable_after);
        s.failures = if stable { 1 } else { s.failures + 1 };
        s.replacements += 1;
        let delay = backoff.delay(s.failures);
        s.retry_at = (!delay.is_zero()).then(|| Instant::now() + delay);
    }

    fn next_due(&self) -> Option<Instant> {
        let mut due: Option<Instant> = None;
        let mut at = |t: Instant| due = Some(due.map_or(t, |d| d.min(t)));
        for s in self.slots.values() {
            if let Some(t) = s.retry_at {
                at(t);
            }
        }
        if let Some((_, started, deadline)) = self.rollout_started {
            at(started + deadline);
        }
        if let Some(t) = self.warm_until
            && t > Instant::now()
        {
            at(t);
        }
        if self.canary.is_some() {
            // The analysis judges the step as its numbers come in.
            at(Instant::now() + CANARY_TICK);
        }
        let stable_after = self.shared.backoff.stable_after;
        for i in self.instances.values() {
            // When a slot becomes stable, its failure count resets.
            if let Some(t) = i.ready_since
                && t.elapsed() < stable_after
            {
                at(t + stable_after);
            }
        }
        if let Some(min_ready) = self.min_ready() {
            for i in self.instances.values() {
                if let Some(t) = i.ready_since
                    && t.elapsed() < min_ready
                {
                    at(t + min_ready);
                }
            }
        }
        due.map(|d| d.max(Instant::now()))
    }

    fn min_ready(&self) -> Option<std::time::Duration> {
        self.service
            .as_ref()
            .map(|s| s.settings.rollout.min_ready.0)
    }

    async fn prepare(&mut self, revision: u64) -> Result<Arc<Prepared>, ControllerError> {
        if let Some(p) = self.prepared.get(&revision) {
            return Ok(p.clone());
        }
        let release = self
            .shared
            .state
            .release(&self.name, revision)?
            .ok_or_else(|| ControllerError::NoRelease {
                service: self.name.clone(),
                revision,
            })?;
        let store = self.shared.store.clone();
        let image = release.config.image.clone();
        let tree = tokio::task::spawn_blocking(move || store.materialize(&image))
            .await
            .map_err(|e| ControllerError::Unpacker(e, release.config.image.clone()))?
            .map_err(|source| ControllerError::Materialize {
                image: release.config.image.clone(),
                source: Box::new(source),
            })?;
        let rt: Arc<dyn Runtime> = Arc::from(runtime(release.config.runtime)?);
        for name in release.config.volumes.keys() {
            let path = self.volume_dir(name.as_str());
            std::fs::create_dir_all(&path)
                .map_err(|source| ControllerError::Volume { path, source })?;
        }
        let p = Arc::new(Prepared {
            release,
            rootfs: tree.rootfs,
            runtime: rt,
        });
        self.prepared.insert(revision, p.clone());
        Ok(p)
    }

    fn volume_dir(&self, volume: &str) -> PathBuf {
        self.shared
            .home
            .join("volumes")
            .join(self.name.as_str())
            .join(volume)
    }

    async fn start(&mut self, p: &Prepared, slot: u32) {
        let cfg = &p.release.config;
        let id = self.shared.new_instance_id(&self.name, p.release.revision);
        let port = match free_port() {
            Ok(port) => port,
            Err(e) => {
                self.message = Some(format!("no free port: {e}"));
                return;
            }
        };
        let mut env: std::collections::BTreeMap<String, String> = cfg
            .env
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        env.entry("PATH".to_owned())
            .or_insert_with(|| DEFAULT_PATH.to_owned());
        env.insert("PORT".to_owned(), port.to_string());
        env.insert("KILN_INSTANCE".to_owned(), id.clone());
        env.insert("KILN_SERVICE".to_owned(), self.name.to_string());
        env.insert("KILN_RELEASE".to_owned(), p.release.revision.to_string());
        let launch = Launch {
            rootfs: p.rootfs.clone(),
            argv: cfg.command.clone(),
            env,
            workdir: cfg.workdir.to_string(),
            volumes: cfg
                .volumes
                .iter()
                .map(|(name, v)| {
                    let dir = self.volume_dir(name.as_str());
                    (name.to_string(), dir, v.path.to_string())
                })
                .collect(),
        };
        let log_path = self
            .shared
            .home
            .join("logs")
            .join(self.name.as_str())
            .join(format!("{id}.log"));
        let log = match LogFile::create(log_path).await {
            Ok(l) => l,
            Err(e) => {
                self.message = Some(format!("cannot open the log of {id}: {e}"));
                return;
            }
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let inflight = Arc::<crate::metrics::InFlight>::default();
        let task = InstanceTask {
            inflight: inflight.clone(),
            id: id.clone(),
            launch,
            runtime: p.runtime.clone(),
            health: cfg.health.clone(),
            stop: cfg.stop.clone(),
            port,
            log,
        };
        tokio::spawn(task.run(self.reports_tx.clone(), stop_rx));
        self.instances.insert(
            id.clone(),
            Inst {
                id,
                revision: p.release.revision,
                slot,
                port,
                pid: None,
                stopping: false,
                ready: false,
                live: true,
                started: Instant::now(),
                started_wall: SystemTime::now(),
                ready_since: None,
                stop: Some(stop_tx),
                failure_counted: false,
                read_only: p.runtime.read_only_enforced(),
                runtime: p.runtime.kind(),
                inflight,
                adopted: false,
            },
        );
    }

    /// The ids of the instances `pick` selects, of those not stopping.
    fn running(&self, pick: impl Fn(&Inst) -> bool) -> Vec<String> {
        self.instances
            .values()
            .filter(|i| !i.stopping && pick(i))
            .map(|i| i.id.clone())
            .collect()
    }

    fn stop_instance(&mut self, id: &str, kind: StopKind, why: &str) {
        self.stop_instances(&[id.to_owned()], kind, why);
    }

    /// Stop instances together: all of them leave the routing table in one
    /// swap, then each drains in-flight requests before its stop signal.
    /// Returns when that swap was done, if any instance was stopped.
    fn stop_instances(&mut self, ids: &[String], kind: StopKind, why: &str) -> Option<Instant> {
        let mut stops = Vec::new();
        for id in ids {
            let Some(inst) = self.instances.get_mut(id) else {
                continue;
            };
            if inst.stopping && kind == StopKind::Graceful {
                continue;
            }
            inst.stopping = true;
            inst.ready = false;
            stops.push((id.clone(), inst.revision, inst.stop.take()));
        }
        if stops.is_empty() {
            return None;
        }
        self.publish_routes();
        let swapped = Instant::now();
        for (id, revision, stop) in stops {
            if let Some(tx) = stop {
                let _ = tx.send(kind);
            }
            self.record_event(
                Change::InstanceStopping {
                    reason: why.to_string(),
                },
                Some(revision),
                Some(&id),
            );
        }
        Some(swapped)
    }

    fn stop_all(&mut self, kind: StopKind, force: bool) {
        let ids: Vec<String> = self
            .instances
            .values()
            .filter(|i| force || !i.stopping)
            .map(|i| i.id.clone())
            .collect();
        for id in ids {
            if force {
                // Escalation: the stop channel is spent; kill directly.
                if let Some(pid) = self.instances.get(&id).and_then(|i| i.pid) {
                    crate::instance::kill_group(pid);
                }
            }
            self.stop_instance(&id, kind, "agent shutting down");
        }
    }

    async fn reconcile(&mut self) {
        if let Some((kind, _)) = &self.shutdown {
            let kind = *kind;
            self.stop_all(kind, false);
            return;
        }
        let rec = match self.shared.state.service(&self.name) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => return self.log_state_error(e),
        };
        self.service = Some(rec.clone());
        let target = rec.target;
        let replicas = rec.settings.replicas;
        let p = match self.prepare(target).await {
            Ok(p) => p,
            Err(e) => {
                self.message = Some(e.to_string());
                return;
            }
        };
        let outcome = match self.shared.state.release(&self.name, target) {
            Ok(Some(r)) => r.outcome,
            Ok(None) => return,
            Err(e) => return self.log_state_error(e),
        };
        if outcome == Outcome::Pending && self.rollout_started.map(|(r, ..)| r) != Some(target) {
            self.rollout_started = Some((
                target,
                Instant::now(),
                rec.settings.rollout.progress_deadline.0,
            ));
            self.stalled = false;
            self.paused = false;
        }
        let now = Instant::now();

        // Slots that stayed ready long enough forget their failures.
        let stable_after = self.shared.backoff.stable_after;
        for i in self.instances.values() {
            if i.ready_since.is_some_and(|t| t.elapsed() >= stable_after)
                && let Some(s) = self.slots.get_mut(&(i.revision, i.slot))
            {
                s.failures = 0;
            }
        }

        if outcome == Outcome::Pending {
            self.adopt_warm(&p, target, replicas);
        }
        // A canary needs a stable release to compare with and return to; a
        // first release, or one that took over warm instances, goes whole.
        // The run knows its stable release: the releases are read once per
        // canary, not on each of its 20 passes a second.
        let stable = (rec.settings.rollout.strategy == Strategy::Canary
            && outcome == Outcome::Pending
            && !self.adopted_target(target))
        .then(|| {
            self.canary
                .as_ref()
                .filter(|run| run.revision == target)
                .map(|run| run.stable)
                .or_else(|| self.previous_active(target))
        })
        .flatten();
        if let Some(stable) = stable {
            self.routed_revision = None;
            return self.reconcile_canary(&rec, &p, target, stable).await;
        }
        // A canary replaced by another release (a rollback taking over
        // stable's warm instances): its fleet goes below, with the routes
        // republished once at the end of the pass.
        self.canary = None;
        let blue_green = rec.settings.rollout.strategy == Strategy::BlueGreen;
        if blue_green {
            // Until promotion, traffic stays on the release it was on.
            let routed_alive = self.routed_revision.is_some_and(|r| {
                self.instances
                    .values()
                    .any(|i| i.revision == r && !i.stopping)
            });
            if !routed_alive {
                self.routed_revision = self
                    .instances
                    .values()
                    .filter(|i| i.revision != target && !i.stopping && i.ready)
                    .map(|i| i.revision)
                    .max()
                    .or(Some(target));
            }
        } else {
            self.routed_revision = None;
        }

        // Extra instances of the target (scaled down).
        self.stop_extras(target, replicas);

        let rollout = &rec.settings.rollout;
        let min_ready = rollout.min_ready.0;
        let counts_ready = |i: &Inst| {
            !i.stopping && i.ready && i.ready_since.is_some_and(|t| t.elapsed() >= min_ready)
        };
        let old: Vec<OldInstance<String>> = self
            .instances
            .values()
            .filter(|i| i.revision != target && !i.stopping)
            .map(|i| OldInstance {
                id: i.id.clone(),
                ready: counts_ready(i),
            })
            .collect();
        let (new_running, new_ready) = self
            .instances
            .values()
            .filter(|i| i.revision == target && !i.stopping)
            .fold((0, 0), |(n, r), i| (n + 1, r + u32::from(counts_ready(i))));
        let free = self.free_slots(target, replicas);
        // The decision is kiln-core's (pure, tested); this only carries it out.
        let step = fleet_step(&Fleet {
            strategy: rollout.strategy,
            replicas,
            max_surge: rollout.max_surge,
            max_unavailable: rollout.max_unavailable,
            free_slots: free.len() as u32,
            new_running,
            new_ready,
            old: &old,
            any_old_left: self.instances.values().any(|i| i.revision != target),
            may_start: outcome != Outcome::Failed && !self.paused,
        });
        let slots: Vec<u32> = free.into_iter().take(step.start as usize).collect();
        self.start_in_slots(&p, &slots, now).await;
        let why = if rollout.strategy == Strategy::Recreate {
            "recreate: replaced by the new release"
        } else {
            "replaced by the new release"
        };
        for id in &step.stop {
            self.stop_instance(id, StopKind::Graceful, why);
        }

        let ready = self.settled(target, min_ready);
        if blue_green
            && ready >= replicas
            && outcome == Outcome::Pending
            && self.routed_revision != Some(target)
        {
            if rollout.auto_promote || self.promote_requested || self.adopted_target(target) {
                // The switch: one swap of the routing table to the new fleet.
                self.routed_revision = Some(target);
                self.promote_requested = false;
                self.warm_until = Some(Instant::now() + rollout.scale_down_delay.0);
                self.publish_routes();
                self.record_event(
                    Change::Promoted {
                        warm_for: rollout.scale_down_delay.to_string(),
                    },
                    Some(target),
                    None,
                );
            } else {
                self.message = Some(format!(
                    "release {target} is ready: waiting for `kiln promote {}`",
                    self.name
                ));
                return;
            }
        }
        let warm = blue_green && self.warm_until.is_some_and(|t| t > Instant::now());
        if ready >= replicas && outcome != Outcome::Failed {
            // The target is whole: everything else goes (after the warm
            // period, for blue-green).
            if !warm {
                let old: Vec<String> = self.running(|i| i.revision != target);
                self.stop_instances(&old, StopKind::Graceful, "replaced by the new release");
            }
            if outcome == Outcome::Pending {
                self.complete_rollout(target);
            }
            self.message = None;
            self.stalled = false;
        } else if outcome == Outcome::Pending && !self.paused {
            self.check_progress(target, ready, replicas);
        } else if outcome == Outcome::Failed {
            // No instance of a failed release is left running.
            let failed: Vec<String> = self.running(|i| i.revision == target);
            self.stop_instances(&failed, StopKind::Graceful, "release failed");
        }
    }

    /// Start instances of `p`'s release in `slots`, skipping those still
    /// in their crash-loop back-off.
    async fn start_in_slots(&mut self, p: &Prepared, slots: &[u32], now: Instant) {
        let revision = p.release.revision;
        for &slot in slots {
            let s = self.slots.entry((revision, slot)).or_default();
            if s.retry_at.is_some_and(|t| t > now) {
                continue;
            }
            s.retry_at = None;
            self.start(p, slot).await;
        }
    }

    /// Slots 0..count with no running instance of `revision`.
    fn free_slots(&self, revision: u64, count: u32) -> Vec<u32> {
        (0..count)
            .filter(|slot| {
                !self
                    .instances
                    .values()
                    .any(|i| i.revision == revision && i.slot == *slot && !i.stopping)
            })
            .collect()
    }

    /// Stop the instances of `revision` in slots at or above `count`, in
    /// one route swap.
    fn stop_extras(&mut self, revision: u64, count: u32) {
        let extras = self.running(|i| i.revision == revision && i.slot >= count);
        self.stop_instances(&extras, StopKind::Graceful, "scaled down");
    }

    /// Keep exactly `count` instances of `p`'s release, in slots 0..count.
    async fn keep_fleet(&mut self, p: &Prepared, count: u32, now: Instant) {
        let revision = p.release.revision;
        self.stop_extras(revision, count);
        let free = self.free_slots(revision, count);
        self.start_in_slots(p, &free, now).await;
    }

    fn counters(&self, revision: u64) -> Snapshot {
        self.shared
            .router
            .metrics
            .release(&self.name, revision)
            .snapshot()
    }

    /// Instances of `revision`, not stopping, whose readiness probe has
    /// passed for at least `min_ready` (`ready_since` is set while it
    /// passes, cleared when it fails).
    fn settled(&self, revision: u64, min_ready: std::time::Duration) -> u32 {
        self.instances
            .values()
            .filter(|i| {
                i.revision == revision
                    && !i.stopping
                    && i.ready_since.is_some_and(|t| t.elapsed() >= min_ready)
            })
            .count() as u32
    }

    /// One pass of a canary rollout: stable keeps its whole fleet; the
    /// canary's fleet follows the current step's weight; once it is ready
    /// the step's weight takes effect (one swap) and its analysis window
    /// opens; the step ends when its pause is over (or `kiln promote`) and
    /// the analysis has enough requests; a failed analysis aborts at once.
    async fn reconcile_canary(
        &mut self,
        rec: &crate::state::ServiceRecord,
        p: &Arc<Prepared>,
        target: u64,
        stable: u64,
    ) {
        let now = Instant::now();
        let rollout = &rec.settings.rollout;
        let replicas = rec.settings.replicas;
        if self.canary.as_ref().is_none_or(|c| c.revision != target) {
            self.canary = Some(CanaryRun {
                revision: target,
                stable,
                step: 0,
                weight: 0,
                began: None,
                promote: false,
                waiting: String::new(),
            });
            self.rollout_started = Some((target, now, rollout.progress_deadline.0));
            self.record_event(
                Change::CanaryStarted {
                    stable,
                    steps: rollout.steps.clone(),
                },
                Some(target),
                None,
            );
        }
        // Anything neither stable nor canary goes (what earlier rollouts left).
        let strays: Vec<String> = self.running(|i| i.revision != target && i.revision != stable);
        self.stop_instances(
            &strays,
            StopKind::Graceful,
            "not part of the canary rollout",
        );
        // Stable is healed like any fleet while the canary runs beside it.
        match self.prepare(stable).await {
            Ok(sp) => self.keep_fleet(&sp, replicas, now).await,
            Err(e) => self.message = Some(e.to_string()),
        }
        let steps = rollout.steps.len();
        // The steps are settings: an apply may shorten them mid-canary,
        // which puts the canary on the new last step.
        if let Some(run) = self.canary.as_mut() {
            run.step = run.step.min(steps.saturating_sub(1));
        }
        let Some(step) = self
            .canary
            .as_ref()
            .and_then(|run| rollout.steps.get(run.step))
            .cloned()
        else {
            return;
        };
        let needed = fleet(replicas, step.weight);
        self.keep_fleet(p, needed, now).await;
        let min_ready = rollout.min_ready.0;
        let ready = self.settled(target, min_ready);
        // Both releases' counters now: a new step's baseline, or the end of
        // the current step's window.
        let counters = (self.counters(target), self.counters(stable));
        let Some(run) = self.canary.as_mut() else {
            return;
        };
        let index = run.step;
        let label = format!("step {}/{steps} (weight {}%)", index + 1, step.weight);
        if run.began.is_none() {
            if ready < needed {
                run.waiting = format!("canary fleet: {ready}/{needed} ready");
                // The fleet of a step must come up in time, and not crash-loop.
                let crash_loop = self
                    .slots
                    .iter()
                    .any(|((rev, _), s)| *rev == target && s.failures >= CRASH_LOOP_FAILURES);
                let late = self
                    .rollout_started
                    .is_some_and(|(_, t, deadline)| t.elapsed() >= deadline);
                if crash_loop || late {
                    let why = if crash_loop {
                        format!(
                            "canary instances keep crashing at {label}; last: {}",
                            self.message.clone().unwrap_or_default()
                        )
                    } else {
                        format!(
                            "{ready}/{needed} canary instances ready at {label} after the progress deadline of {}",
                            rollout.progress_deadline
                        )
                    };
                    self.abort_canary(target, stable, why, Actor::Agent);
                }
                return;
            }
            // The step's weight takes effect, in one swap.
            run.weight = step.weight;
            run.began = Some((now, counters.0, counters.1));
            self.rollout_started = None;
            self.publish_routes();
            self.record_event(
                Change::CanaryStep {
                    step: index + 1,
                    of: steps,
                    weight: step.weight,
                    pause: step.pause,
                },
                Some(target),
                None,
            );
        }
        let Some((began, base_canary, base_stable)) =
            self.canary.as_ref().and_then(|run| run.began)
        else {
            return;
        };
        let canary_window = counters.0.since(&base_canary).window();
        let stable_window = counters.1.since(&base_stable).window();
        let judgement = judge(rollout.analysis.as_ref(), &canary_window, &stable_window);
        if let Judgement::Fail(why) = judgement {
            return self.abort_canary(
                target,
                stable,
                format!("canary analysis failed at {label}: {why}"),
                Actor::Agent,
            );
        }
        let Some(run) = self.canary.as_mut() else {
            return;
        };
        let left = match step.pause {
            Pause::Manual => None,
            Pause::For(d) => Some(d.0.saturating_sub(began.elapsed())),
        };
        run.waiting = if run.promote {
            String::new()
        } else if left.is_none() {
            format!("manual pause: kiln promote {} to go on", self.name)
        } else if left.is_some_and(|l| !l.is_zero()) {
            // Worded to stay the same through the step: `apply` prints
            // each change.
            format!("pause of {}", step.pause)
        } else if let Judgement::TooFew { need, .. } = judgement {
            format!("waiting for {need} canary requests to judge")
        } else if ready < needed {
            format!("canary fleet: {ready}/{needed} ready")
        } else {
            String::new()
        };
        if !run.waiting.is_empty() {
            return;
        }
        let promoted = run.promote;
        self.record_event(
            Change::CanaryStepPassed {
                step: index + 1,
                weight: step.weight,
                promoted,
                canary: canary_window,
                stable: stable_window,
            },
            Some(target),
            None,
        );
        if index + 1 < steps
            && let Some(run) = self.canary.as_mut()
        {
            run.step += 1;
            run.began = None;
            run.promote = false;
            self.rollout_started = Some((target, now, rollout.progress_deadline.0));
            return;
        }
        // The last step had all traffic: the canary is the release now.
        self.complete_rollout(target);
        self.canary = None;
        let old: Vec<String> = self.running(|i| i.revision != target);
        self.stop_instances(&old, StopKind::Graceful, "replaced by the canary release");
        self.message = None;
    }

    /// Abort a canary: all traffic back on stable in one swap, the canary
    /// fleet stopped, and the release failed with `reason`.
    fn abort_canary(&mut self, target: u64, stable: u64, reason: String, actor: Actor) {
        let decided = Instant::now();
        self.canary = None;
        let fleet: Vec<String> = self.running(|i| i.revision == target);
        // Marks the whole canary fleet stopping and republishes once, with
        // no canary side: the swap. Draining and signals follow.
        let swapped = self
            .stop_instances(&fleet, StopKind::Graceful, "canary aborted")
            .unwrap_or_else(|| {
                self.publish_routes();
                Instant::now()
            });
        let swap = swapped.duration_since(decided);
        tracing::warn!(
            service = %self.name,
            "canary release {target} aborted: {reason}; all traffic on release {stable} (routes switched in {}us)",
            swap.as_micros()
        );
        self.record_failure(
            target,
            Some(stable),
            &reason,
            true,
            Some(swap.as_micros() as u64),
            actor,
        );
    }

    fn canary_status(&self) -> Option<CanaryStatus> {
        let run = self.canary.as_ref()?;
        let steps = self
            .service
            .as_ref()
            .map_or(0, |s| s.settings.rollout.steps.len());
        let (canary_window, stable_window) = match &run.began {
            Some((_, c, s)) => (
                self.counters(run.revision).since(c).window(),
                self.counters(run.stable).since(s).window(),
            ),
            None => Default::default(),
        };
        Some(CanaryStatus {
            revision: run.revision,
            stable: run.stable,
            step: run.step as u32 + 1,
            steps: steps as u32,
            weight: run.weight,
            waiting: run.waiting.clone(),
            canary_window,
            stable_window,
        })
    }

    fn complete_rollout(&mut self, target: u64) {
        self.rollout_started = None;
        let ev = self.event(Change::ReleaseActive {}, Some(target), None);
        if let Err(e) =
            self.shared
                .state
                .set_outcome(&self.name, target, Outcome::Active, None, &ev)
        {
            return self.log_state_error(e);
        }
        let releases = match self.shared.state.releases(&self.name) {
            Ok(r) => r,
            Err(e) => return self.log_state_error(e),
        };
        for r in releases {
            if r.revision != target && r.outcome == Outcome::Active {
                let ev = self.event(
                    Change::ReleaseSuperseded { by: target },
                    Some(r.revision),
                    None,
                );
                if let Err(e) = self.shared.state.set_outcome(
                    &self.name,
                    r.revision,
                    Outcome::Superseded,
                    None,
                    &ev,
                ) {
                    self.log_state_error(e);
                }
            }
        }
        // Prepared releases without instances are no longer needed (a warm
        // blue-green fleet keeps its own).
        let live: std::collections::BTreeSet<u64> =
            self.instances.values().map(|i| i.revision).collect();
        self.prepared
            .retain(|rev, _| *rev == target || live.contains(rev));
        self.slots
            .retain(|(rev, _), _| *rev == target || live.contains(rev));
    }

    /// A rollout that is not whole by its deadline, or whose instances keep
    /// crashing while a previous release can take over, has failed.
    fn check_progress(&mut self, target: u64, ready: u32, replicas: u32) {
        let Some((_, started, deadline)) = self.rollout_started else {
            return;
        };
        let previous = self.previous_active(target);
        let crash_loop = previous.is_some()
            && self
                .slots
                .iter()
                .any(|((rev, _), s)| *rev == target && s.failures >= CRASH_LOOP_FAILURES);
        let reason = if crash_loop {
            format!(
                "instances of release {target} keep crashing ({}); last: {}",
                CRASH_LOOP_FAILURES,
                self.message.clone().unwrap_or_default()
            )
        } else if started.elapsed() >= deadline {
            format!(
                "{ready}/{replicas} instances ready after the progress deadline of {}",
                humantime::format_duration(deadline)
            )
        } else {
            return;
        };
        self.fail_rollout(target, previous, reason);
    }

    fn previous_active(&self, target: u64) -> Option<u64> {
        self.shared
            .state
            .releases(&self.name)
            .ok()?
            .into_iter()
            .filter(|r| r.revision != target && r.outcome == Outcome::Active)
            .map(|r| r.revision)
            .max()
    }

    fn fail_rollout(&mut self, target: u64, previous: Option<u64>, reason: String) {
        tracing::warn!(service = %self.name, "release {target} failed: {reason}");
        self.rollout_started = None;
        let auto_rollback = self
            .shared
            .state
            .service(&self.name)
            .ok()
            .flatten()
            .is_none_or(|s| s.settings.rollout.auto_rollback);
        if !auto_rollback {
            // Paused: old and new stay as they are, nothing new starts.
            self.paused = true;
            self.stalled = true;
            self.message = Some(format!(
                "rollout of release {target} paused: {reason} (auto_rollback = false; kiln rollback {} to return)",
                self.name
            ));
            self.record_event(
                Change::RolloutPaused {
                    reason: reason.clone(),
                },
                Some(target),
                None,
            );
            return;
        }
        self.record_failure(target, previous, &reason, true, None, Actor::Agent);
    }

    /// Release `target` failed, and the service is back on `previous`, in
    /// one transaction.
    fn record_failure(
        &mut self,
        target: u64,
        previous: Option<u64>,
        reason: &str,
        automatic: bool,
        swap_us: Option<u64>,
        actor: Actor,
    ) {
        self.rollout_started = None;
        let mut events = vec![
            self.event(
                Change::ReleaseFailed {
                    reason: reason.to_owned(),
                },
                Some(target),
                None,
            )
            .by(actor),
        ];
        if let Some(prev) = previous {
            let rollback = Change::Rollback {
                from: target,
                to: None,
                automatic,
                reason: Some(reason.to_owned()),
                swap_us,
            };
            events.push(self.event(rollback, Some(prev), None).by(actor));
        }
        if let Err(e) = self
            .shared
            .state
            .fail_release(&self.name, target, reason, previous, &events)
        {
            return self.log_state_error(e);
        }
        self.message = Some(format!("release {target} failed: {reason}"));
    }

    /// The router backends of the ready, live instances that `pick` selects.
    fn backends(&self, pick: impl Fn(&Inst) -> bool) -> Vec<Arc<Backend>> {
        self.instances
            .values()
            .filter(|i| i.ready && i.live && !i.stopping && pick(i))
            .map(|i| {
                Arc::new(Backend::new(
                    i.id.clone(),
                    i.revision,
                    i.port,
                    i.inflight.clone(),
                    self.shared.router.metrics.release(&self.name, i.revision),
                ))
            })
            .collect()
    }

    /// Publish the ready instances to the router, when they changed: of any
    /// release during a rolling update (both serve), of the routed fleet
    /// for blue-green, split by weight between stable and canary.
    fn publish_routes(&mut self) {
        let (timeout, sticky, limits) = self.service.as_ref().map_or(
            (
                std::time::Duration::from_secs(30),
                false,
                Default::default(),
            ),
            |s| {
                (
                    s.settings.timeout.0,
                    s.settings.rollout.sticky,
                    s.settings.router,
                )
            },
        );
        let (stable, canary) = match &self.canary {
            Some(run) => (
                self.backends(|i| i.revision == run.stable),
                (run.weight > 0).then(|| {
                    (
                        self.backends(|i| i.revision == run.revision),
                        run.revision,
                        run.weight,
                    )
                }),
            ),
            None => {
                let routed = self.routed_revision;
                (
                    self.backends(|i| routed.is_none_or(|r| i.revision == r)),
                    None,
                )
            }
        };
        let ids = |b: &[Arc<Backend>]| b.iter().map(|b| b.instance.clone()).collect::<Vec<_>>();
        let routed = Routed {
            stable: ids(&stable),
            canary: canary.as_ref().map_or(Vec::new(), |(b, ..)| ids(b)),
            weight: canary.as_ref().map_or(0, |c| c.2),
            timeout,
            limits,
        };
        // A settings change (the timeout) republishes as much as new
        // instances do; an empty table is always (re)published.
        if routed == self.routed && !(routed.stable.is_empty() && routed.canary.is_empty()) {
            return;
        }
        let mut routes = ServiceRoutes::new(stable, timeout).with_limits(limits);
        if let Some((backends, revision, weight)) = canary {
            let cookie = sticky.then(|| format!("kiln-canary-{}", self.name));
            routes = routes.with_canary(backends, revision, weight, cookie);
        }
        self.shared
            .router
            .set_routes(&RouteKey::Service(self.name.clone()), routes);
        self.routed = routed;
    }

    /// blue-green's preview: the target's ready instances on `preview_listen`.
    fn publish_preview(
        &mut self,
        target: u64,
        timeout: std::time::Duration,
        limits: kiln_core::service::RouterSpec,
    ) {
        let backends = self.backends(|i| i.revision == target);
        let ids: Vec<String> = backends.iter().map(|b| b.instance.clone()).collect();
        if ids != self.previewed || ids.is_empty() {
            self.shared.router.set_routes(
                &RouteKey::Preview(self.name.clone()),
                ServiceRoutes::new(backends, timeout).with_limits(limits),
            );
            self.previewed = ids;
        }
    }

    /// The service as stored now (not as the last pass read it: a request
    /// answers for what `kiln` just recorded), and whether its target
    /// release is still being rolled out.
    fn target_pending(&self) -> Result<(crate::state::ServiceRecord, bool), ControllerError> {
        let rec = self
            .shared
            .state
            .service(&self.name)?
            .ok_or_else(|| ControllerError::NoService(self.name.clone()))?;
        let pending = self
            .shared
            .state
            .release(&self.name, rec.target)?
            .is_some_and(|r| r.outcome == Outcome::Pending);
        Ok((rec, pending))
    }

    /// `kiln promote`: only a blue-green rollout waiting for it can be promoted.
    fn request_promotion(&mut self, actor: Actor) -> Result<(u64, Option<u32>), ControllerError> {
        let (rec, pending) = self.target_pending()?;
        let step = if let Some(run) = &mut self.canary
            && pending
            && run.revision == rec.target
        {
            run.promote = true;
            Some(run.step as u32 + 1)
        } else if rec.settings.rollout.strategy == Strategy::BlueGreen && pending {
            self.promote_requested = true;
            None
        } else {
            return Err(ControllerError::NotWaitingForPromotion(self.name.clone()));
        };
        let ev = self
            .event(Change::PromoteRequested { step }, Some(rec.target), None)
            .by(actor);
        if let Err(e) = self.shared.state.append_event(&ev) {
            self.log_state_error(e);
        }
        Ok((rec.target, step))
    }

    /// `kiln abort`: only a rollout in progress with a release before it
    /// can be aborted.
    fn request_abort(&mut self, actor: Actor) -> Result<(u64, u64), ControllerError> {
        let (rec, pending) = self.target_pending()?;
        let target = rec.target;
        if !pending {
            return Err(ControllerError::NothingToAbort {
                service: self.name.clone(),
                revision: target,
            });
        }
        let Some(previous) = self.previous_active(target) else {
            return Err(ControllerError::FirstRelease {
                service: self.name.clone(),
                revision: target,
            });
        };
        let reason = "aborted by hand (kiln abort)".to_owned();
        if self.canary.as_ref().is_some_and(|r| r.revision == target) {
            self.abort_canary(target, previous, reason, actor);
        } else {
            // As an automatic rollback: the previous release takes over
            // as its fleet allows.
            self.paused = false;
            self.stalled = false;
            self.record_failure(target, Some(previous), &reason, false, None, actor);
        }
        Ok((target, previous))
    }

    /// Whether the target's instances were adopted (a warm rollback).
    fn adopted_target(&self, target: u64) -> bool {
        self.instances
            .values()
            .any(|i| i.revision == target && i.adopted)
    }

    /// A pending release with the same content as warm, ready instances of
    /// another release takes them over instead of starting new ones: this is
    /// what makes a rollback inside the warm window a route swap.
    fn adopt_warm(&mut self, p: &Prepared, target: u64, replicas: u32) {
        let have_target = self
            .instances
            .values()
            .any(|i| i.revision == target && !i.stopping);
        if have_target || replicas == 0 {
            return;
        }
        let hash = &p.release.hash;
        let candidates: Vec<String> = self
            .instances
            .values()
            .filter(|i| i.revision != target && i.ready && !i.stopping)
            .filter(|i| {
                self.prepared
                    .get(&i.revision)
                    .is_some_and(|q| &q.release.hash == hash)
            })
            .take(replicas as usize)
            .map(|i| i.id.clone())
            .collect();
        if candidates.len() < replicas as usize {
            return;
        }
        for (slot, id) in candidates.iter().enumerate() {
            let Some(inst) = self.instances.get_mut(id) else {
                continue;
            };
            let from = inst.revision;
            inst.revision = target;
            inst.slot = slot as u32;
            inst.adopted = true;
            let rec = InstanceRecord {
                id: id.clone(),
                service: self.name.clone(),
                revision: target,
                slot: slot as u32,
                pid: inst.pid.unwrap_or(0),
                start_ticks: inst.pid.and_then(start_ticks).unwrap_or(0),
                port: inst.port,
            };
            let ev = self.event(
                Change::InstanceAdopted {
                    from,
                    reason: "same content, still warm".to_owned(),
                },
                Some(target),
                Some(id),
            );
            if let Err(e) = self.shared.state.put_instance(&rec, &ev) {
                self.log_state_error(e);
            }
        }
    }

    fn publish(&self) {
        let rec = self.shared.state.service(&self.name).ok().flatten();
        let target = rec.as_ref().map(|r| r.target);
        let replicas = rec.as_ref().map_or(0, |r| r.settings.replicas);
        let outcome = target
            .and_then(|t| self.shared.state.release(&self.name, t).ok().flatten())
            .map(|r| r.outcome);
        let now = Instant::now();
        let instances: Vec<InstanceStatus> = self
            .instances
            .values()
            .map(|i| InstanceStatus {
                id: i.id.clone(),
                revision: i.revision,
                slot: i.slot,
                pid: i.pid,
                port: i.port,
                state: if i.stopping {
                    InstanceState::Stopping
                } else if i.pid.is_some() {
                    InstanceState::Running
                } else {
                    InstanceState::Starting
                },
                ready: i.ready,
                live: i.live,
                replacements: self
                    .slots
                    .get(&(i.revision, i.slot))
                    .map_or(0, |s| s.replacements),
                started: humantime::format_rfc3339_millis(i.started_wall).to_string(),
                uptime_secs: now.duration_since(i.started).as_secs_f64(),
                runtime: i.runtime,
                read_only_root: i.read_only,
            })
            .collect();
        let ready = instances
            .iter()
            .filter(|i| Some(i.revision) == target && i.ready && i.state != InstanceState::Stopping)
            .count() as u32;
        // A blue-green fleet kept warm after the switch is expected, not
        // a rollout still in progress.
        let warm = self.warm_until.is_some_and(|t| t > now) && self.routed_revision == target;
        let target_instances = instances
            .iter()
            .filter(|i| Some(i.revision) == target && i.state != InstanceState::Stopping)
            .count() as u32;
        let converged = ready == replicas
            && target_instances == replicas
            && (warm
                || instances
                    .iter()
                    .all(|i| Some(i.revision) == target && i.state != InstanceState::Stopping));
        let backoff = self
            .slots
            .iter()
            .filter_map(|((rev, slot), s)| {
                s.retry_at.filter(|t| *t > now).map(|t| SlotBackoff {
                    revision: *rev,
                    slot: *slot,
                    failures: s.failures,
                    retry_in_ms: t.duration_since(now).as_millis() as u64,
                })
            })
            .collect();
        let status = ServiceStatus {
            name: self.name.clone(),
            replicas,
            revision: target,
            outcome,
            ready,
            converged,
            instances,
            backoff,
            message: self.message.clone(),
            stalled: self.stalled,
            canary: self.canary_status(),
            failed_release: None,
        };
        let mut all = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
        all.insert(self.name.clone(), status);
    }
}

/// How often a canary step is judged while its numbers come in.
const CANARY_TICK: std::time::Duration = std::time::Duration::from_millis(50);

/// Consecutive failures of a slot that make a rollout a crash loop.
const CRASH_LOOP_FAILURES: u32 = 3;

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
