//! The controller's instances: starting one (its release prepared, its
//! environment, its log, its task), stopping some in one route swap, and
//! what their tasks report (started, health, exited), kept as bookkeeping
//! for the next pass to decide on.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use kiln_core::event::Change;
use kiln_core::release::Release;
use kiln_core::rollout::StopReason;
use tokio::sync::mpsc;

use super::{Controller, ControllerError, now};
use crate::instance::logs::LogFile;
use crate::instance::probe::ProbeKind;
use crate::instance::{InstanceTask, Report, StopKind};
use crate::runtime::{DEFAULT_PATH, Launch, Runtime, start_ticks};
use crate::state::{InstanceRecord, NewEvent};
use kiln_core::rollout::assign::{self, Assignment, Running};

/// A release made ready to run: its tree and runtime.
pub(crate) struct Prepared {
    pub release: Release,
    pub rootfs: PathBuf,
    pub runtime: Arc<dyn Runtime>,
    /// Who its instances run as (`None`: the agent is not root and cannot
    /// choose).
    pub user: Option<kiln_core::user::Identity>,
    /// Its image has a userland of its own (baked on a base, or with its
    /// own `/usr`): nothing of the host's is bound in.
    pub self_contained: bool,
}

/// Why an instance's launch could not be made.
#[derive(Debug)]
pub(crate) enum LaunchError {
    /// A secret of its release is not in the state store.
    Secret(String),
    State(crate::state::StateError),
}

/// How long a stopping instance waits, out of this router's table, for a
/// request that read the table just before to be counted in flight.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(10);

/// The same in a cluster: the other nodes' routers read the leader's stop
/// at their next pass (every [`super::FOLLOW_EVERY`]); two of those and a
/// margin.
const CLUSTER_SETTLE: std::time::Duration = std::time::Duration::from_millis(600);

/// Where an instance on this node listens: the node's address (loopback
/// on its own, the advertised one in a cluster), on its port. The routers
/// and the probes reach it by this address.
pub(super) fn instance_addr(ip: std::net::IpAddr, port: u16) -> std::net::SocketAddr {
    (ip, port).into()
}

pub(super) struct Inst {
    pub id: String,
    pub revision: u64,
    pub slot: u32,
    pub port: u16,
    pub pid: Option<u32>,
    pub stopping: bool,
    pub ready: bool,
    pub live: bool,
    pub started_wall: SystemTime,
    pub ready_since: Option<Instant>,
    /// The same, as wall-clock milliseconds (what its observation says).
    pub ready_ms: Option<u64>,
    /// Tells its task to stop (graceful, or a kill that escalates one).
    pub stop: mpsc::UnboundedSender<StopKind>,
    pub read_only: bool,
    /// It runs with the host's `/usr` (and loader paths) in it.
    pub borrows_host: bool,
    pub runtime: kiln_core::service::RuntimeKind,
    /// Requests the router has in flight to it.
    pub inflight: Arc<crate::router::metrics::InFlight>,
    /// Taken over by a release with the same content (warm rollback).
    pub adopted: bool,
    /// The image whose tree it runs.
    pub image: kiln_core::Digest,
    /// What its root process was started as (for the drift detector).
    pub launched: Option<Arc<kiln_core::drift::Launched>>,
    /// The app below a launcher (the sandbox's) is watched too, from how it
    /// looked when first ready.
    pub app_watched: bool,
}

impl Controller {
    pub(super) async fn on_report(&mut self, report: Report) {
        match report {
            Report::Hook { revision, failed } => {
                if let Some(why) = failed {
                    tracing::warn!(service = %self.name, "post_deploy of release {revision} failed: {why}");
                    self.post_deploy_failed = Some((revision, why));
                }
            }
            Report::Started { id, pid } => {
                let Some(inst) = self.instances.get_mut(&id) else {
                    return;
                };
                inst.pid = Some(pid);
                let ticks = start_ticks(pid);
                let launched = inst.launched.clone();
                let rec = InstanceRecord {
                    id: id.clone(),
                    service: self.name.clone(),
                    revision: inst.revision,
                    slot: inst.slot,
                    pid,
                    start_ticks: ticks.unwrap_or(0),
                    port: inst.port,
                };
                self.expect(&id, rec.revision, pid, ticks, launched);
                let ev = self.event(
                    Change::InstanceStarted {
                        pid,
                        port: rec.port,
                        slot: rec.slot,
                    },
                    Some(rec.revision),
                    Some(&id),
                );
                self.keep_instance(&rec, &ev).await;
            }
            Report::StartFailed { id, error } => {
                self.shared.drift.forget(&id);
                if let Some(inst) = self.instances.remove(&id) {
                    self.message = Some(format!("instance {id} failed to start: {error}"));
                    self.report_gone(&inst, true);
                    self.record_event(
                        Change::InstanceStartFailed {
                            error: error.clone(),
                        },
                        Some(inst.revision),
                        Some(&id),
                    )
                    .await;
                }
            }
            Report::Health {
                id,
                probe,
                healthy,
                why,
            } => {
                let Some(inst) = self.instances.get_mut(&id) else {
                    return;
                };
                let revision = inst.revision;
                if probe == ProbeKind::Readiness
                    && healthy
                    && inst.launched.is_none()
                    && inst.runtime == kiln_core::service::RuntimeKind::Process
                    && let Some(pid) = inst.pid
                    && let Some(seen) = crate::drift::as_it_runs(pid)
                {
                    // A plain process may have `exec`ed on its way up (an
                    // entrypoint script): how it looks once ready is what
                    // must not change.
                    let seen = Arc::new(seen);
                    inst.launched = Some(seen.clone());
                    self.expect(&id, revision, pid, start_ticks(pid), Some(seen));
                }
                // Inside a sandbox, the app itself (not only bubblewrap as
                // kiln started it): how it looks once ready must not change.
                if probe == ProbeKind::Readiness
                    && healthy
                    && let Some(inst) = self.instances.get(&id)
                    && !inst.app_watched
                    && let Some(pid) = inst.pid
                    && let Some(p) = self.prepared.get(&revision)
                    && let Some(app) = p.runtime.app_pid(pid)
                    && let Some(seen) = crate::drift::as_it_runs(app)
                {
                    let key = crate::drift::app_key(&id);
                    self.expect(&key, revision, app, start_ticks(app), Some(Arc::new(seen)));
                    if let Some(inst) = self.instances.get_mut(&id) {
                        inst.app_watched = true;
                    }
                }
                let Some(inst) = self.instances.get_mut(&id) else {
                    return;
                };
                let kind = match (probe, healthy) {
                    (ProbeKind::Readiness, true) => {
                        inst.ready = true;
                        // On tokio's clock, as every other instant of the controller.
                        inst.ready_since = Some(super::now());
                        inst.ready_ms = Some(super::clock().wall_ms);
                        Change::InstanceReady {}
                    }
                    (ProbeKind::Readiness, false) => {
                        inst.ready = false;
                        inst.ready_since = None;
                        inst.ready_ms = None;
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
                self.record_event(kind, Some(revision), Some(&id)).await;
                if probe == ProbeKind::Liveness && !healthy {
                    // Named in the failure of a rollout that crash-loops.
                    self.message = Some(format!(
                        "instance {id} failed its {}",
                        why.as_deref().unwrap_or("liveness probe")
                    ));
                    // The leader counts it from the next observation; the
                    // pass replaces it (never restarted in place): `decide`
                    // stops an instance that is not live.
                }
            }
            // Left running for a successor; its record stays for it.
            Report::Detached { id } => {
                self.shared.drift.forget(&id);
                self.instances.remove(&id);
            }
            Report::Exited {
                id,
                status,
                requested,
            } => {
                self.shared.drift.forget(&id);
                let Some(inst) = self.instances.remove(&id) else {
                    return;
                };
                if !requested {
                    self.message = Some(format!("instance {id} exited: {status}"));
                }
                // An end asked for is no failure (the leader counts the
                // others, once).
                self.report_gone(&inst, !requested);
                let ev = self.event(
                    Change::InstanceExited {
                        status: status.clone(),
                        requested,
                    },
                    Some(inst.revision),
                    Some(&id),
                );
                self.forget_instance(&id, &ev).await;
            }
        }
    }

    /// Record an instance on this node (first: a crash after it leaves
    /// a record the next agent finds), then its event in the ledger.
    pub(super) async fn keep_instance(&mut self, rec: &InstanceRecord, ev: &NewEvent) {
        if let Err(e) = self.shared.node.put_instance(rec) {
            return self.log_state_error(e);
        }
        if let Err(e) = self.shared.state.append_event(ev).await {
            self.log_state_error(e);
        }
    }

    /// Forget an instance of this node, then record its event.
    pub(super) async fn forget_instance(&mut self, id: &str, ev: &NewEvent) {
        if let Err(e) = self.shared.node.remove_instance(id) {
            return self.log_state_error(e);
        }
        if let Err(e) = self.shared.state.append_event(ev).await {
            self.log_state_error(e);
        }
    }

    /// Report an instance of this node gone to the leader (`failed`: it
    /// ended unasked, or never started), until the leader dropped its
    /// assignment; it is never started again.
    pub(super) fn report_gone(&mut self, inst: &Inst, failed: bool) {
        let mut gone = self.observed(inst).map_id(str::to_owned);
        gone.gone = Some(failed);
        self.report(gone);
    }

    /// A slot's instance failed: count it and schedule the replacement.
    pub(super) fn count_failure(&mut self, revision: u64, slot: u32, ready_since: Option<Instant>) {
        let backoff = self.shared.backoff;
        self.slots
            .entry((revision, slot))
            .or_default()
            .failed(now(), ready_since, &backoff);
    }

    /// Pull image `digest` from another member ([`crate::peers::fetch`]),
    /// recorded as a pull in the ledger.
    async fn fetch_image(
        &mut self,
        name: String,
        digest: kiln_core::Digest,
    ) -> Result<(), ControllerError> {
        let members = self.shared.membership.image_endpoints();
        let token = self.shared.pull_token.get().cloned().unwrap_or_default();
        tracing::info!(service = %self.name, "fetching image {digest} from another node");
        let (store, home) = (self.shared.store.clone(), self.shared.home.clone());
        let (n, d) = (name.clone(), digest.clone());
        // The registry client's pull is not a `Send` future for every
        // lifetime it borrows: it runs on a runtime of its own, on a
        // blocking thread (as `kiln pull` runs it).
        let from = tokio::task::spawn_blocking(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| crate::peers::PeerError::Runtime(e.to_string()))?
                .block_on(crate::peers::fetch(
                    &store,
                    &home,
                    &members,
                    &token,
                    (&n, &d),
                ))
        })
        .await
        .map_err(|e| ControllerError::Unpacker(e, digest.clone()))??;
        let ev = kiln_core::event::Change::ImagePulled {
            image: name,
            digest,
            from: format!("node {from}"),
        };
        self.record_event(ev, None, None).await;
        Ok(())
    }

    pub(super) async fn prepare(
        &mut self,
        revision: u64,
    ) -> Result<Arc<Prepared>, ControllerError> {
        if let Some(p) = self.prepared.get(&revision) {
            return Ok(p.clone());
        }
        let release = self
            .shared
            .state
            .release(&self.name, revision)
            .await?
            .ok_or_else(|| ControllerError::NoRelease {
                service: self.name.clone(),
                revision,
            })?;
        // This agent's own policy, whichever member recorded the release:
        // an unconfined process runs only where its agent allows it.
        if release.config.runtime == kiln_core::service::RuntimeKind::Process
            && !self.shared.allow_process
        {
            return Err(ControllerError::ProcessNotAllowed {
                node: self.shared.node_name.clone(),
            });
        }
        // In a cluster, an image this node lacks comes from a member that
        // has it, by digest.
        if !self.shared.membership.is_solo() && !self.shared.store.has_blob(&release.config.image) {
            let (name, digest) = (
                release.config.image_name.clone(),
                release.config.image.clone(),
            );
            self.fetch_image(name, digest).await?;
        }
        // A release of an image already prepared (a rollback makes a new
        // release of an old one) runs on the same tree as that user: no
        // trip to the blocking pool on a rollback's path.
        if let Some(q) = self.prepared.values().find(|q| {
            let (a, b) = (&q.release.config, &release.config);
            (&a.image, &a.user, a.runtime, &a.volumes) == (&b.image, &b.user, b.runtime, &b.volumes)
        }) {
            let p = Arc::new(Prepared {
                release,
                rootfs: q.rootfs.clone(),
                runtime: q.runtime.clone(),
                user: q.user,
                self_contained: q.self_contained,
            });
            self.prepared.insert(revision, p.clone());
            return Ok(p);
        }
        let p = Arc::new(prepare_release(&self.shared, &self.name, release).await?);
        self.prepared.insert(revision, p.clone());
        Ok(p)
    }

    /// Start the instance the leader assigned as `id`.
    pub(super) async fn start(&mut self, p: &Prepared, id: String, slot: u32) {
        let port = match free_port(self.shared.membership.address) {
            Ok(port) => port,
            Err(e) => {
                self.message = Some(format!("no free port: {e}"));
                return;
            }
        };
        self.launch_task(p, id, slot, port, None).await;
    }

    /// Take over an instance an earlier agent process started and
    /// recorded: it keeps its id, slot, port, pid and output pipes; its
    /// probes start again (it serves once they pass).
    pub(super) async fn adopt_running(
        &mut self,
        rec: InstanceRecord,
        output: Vec<std::os::fd::OwnedFd>,
    ) {
        let p = match self.prepare(rec.revision).await {
            Ok(p) => p,
            Err(e) => {
                self.message = Some(format!("cannot adopt {}: {e}", rec.id));
                crate::runtime::kill_group(rec.pid);
                return;
            }
        };
        self.record_event(
            Change::InstanceAdopted {
                from: rec.revision,
                reason: "taken over by a new agent process".to_owned(),
            },
            Some(rec.revision),
            Some(&rec.id),
        )
        .await;
        // Tainted by a `kiln exec` before this agent process (the taint
        // is in the ledger, not only in the last process's memory): still
        // replaced.
        if let Ok(execs) = self.shared.state.events_of(&["instance-exec"]).await
            && let Some(by) = execs.iter().rev().find_map(|e| match &e.change {
                Change::InstanceExec { kept: false, .. }
                    if e.instance.as_deref() == Some(rec.id.as_str()) =>
                {
                    Some(e.actor.as_ref().map_or("?".to_owned(), ToString::to_string))
                }
                _ => None,
            })
        {
            self.shared
                .drift
                .config_drifted(&rec.id, vec![format!("tainted: kiln exec by {by}")]);
        }
        let (id, slot, port, pid) = (rec.id, rec.slot, rec.port, rec.pid);
        self.launch_task(&p, id, slot, port, Some((pid, output)))
            .await;
    }

    /// How instance `id` of release `p` starts, listening on `port`: its
    /// release's command, environment (its secrets unsealed, `PORT`,
    /// `HOST`, `KILN_*`), volumes, user, limits and cgroup.
    pub(super) async fn launch_of(
        &self,
        p: &Prepared,
        id: &str,
        port: u16,
    ) -> Result<Launch, LaunchError> {
        launch_for(&self.shared, &self.name, p, id, port).await
    }

    /// The instance's task and bookkeeping: started fresh, or adopted
    /// (`adopt`: its pid and output pipes).
    async fn launch_task(
        &mut self,
        p: &Prepared,
        id: String,
        slot: u32,
        port: u16,
        adopt: Option<(u32, Vec<std::os::fd::OwnedFd>)>,
    ) {
        let cfg = &p.release.config;
        let launch = match self.launch_of(p, &id, port).await {
            Ok(l) => l,
            Err(LaunchError::Secret(name)) => {
                self.message = Some(format!(
                    "cannot start {id}: secret {name} of release {} is not in the state store",
                    p.release.revision
                ));
                return;
            }
            Err(LaunchError::State(e)) => {
                self.log_state_error(e);
                return;
            }
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
        let pid = adopt.as_ref().map(|(pid, _)| *pid);
        let launched = p.runtime.launched(&launch).map(Arc::new);
        if let Some(pid) = pid {
            self.expect(
                &id,
                p.release.revision,
                pid,
                start_ticks(pid),
                launched.clone(),
            );
        }
        let (stop_tx, stop_rx) = mpsc::unbounded_channel();
        let inflight = Arc::<crate::router::metrics::InFlight>::default();
        let task = InstanceTask {
            inflight: inflight.clone(),
            id: id.clone(),
            launch,
            runtime: p.runtime.clone(),
            health: cfg.health.clone(),
            stop: cfg.stop.clone(),
            addr: instance_addr(self.shared.membership.address, port),
            serves: self.serves().await,
            log,
            keeper: self.shared.keeper.clone(),
            settle: if self.shared.membership.is_solo() {
                SETTLE
            } else {
                CLUSTER_SETTLE
            },
            adopt,
        };
        tokio::spawn(task.run(self.reports_tx.clone(), stop_rx));
        self.instances.insert(
            id.clone(),
            Inst {
                id,
                revision: p.release.revision,
                slot,
                port,
                pid,
                stopping: false,
                ready: false,
                live: true,
                // An adopted instance's uptime counts from its own start.
                started_wall: pid
                    .and_then(crate::runtime::started_at)
                    .unwrap_or_else(SystemTime::now),
                ready_since: None,
                ready_ms: None,
                stop: stop_tx,
                read_only: p.runtime.read_only_enforced(),
                borrows_host: p.runtime.kind() == kiln_core::service::RuntimeKind::Process
                    || !p.self_contained,
                runtime: p.runtime.kind(),
                inflight,
                adopted: false,
                image: cfg.image.clone(),
                launched,
                app_watched: false,
            },
        );
    }

    /// Have the drift detector compare instance `id`'s process `pid`
    /// (started at `ticks`) with how it was launched.
    fn expect(
        &self,
        id: &str,
        revision: u64,
        pid: u32,
        ticks: Option<u64>,
        launched: Option<Arc<kiln_core::drift::Launched>>,
    ) {
        let (Some(launched), Some(start_ticks)) = (launched, ticks) else {
            return;
        };
        self.shared.drift.expect(
            id,
            crate::drift::Expected {
                service: self.name.clone(),
                revision,
                pid,
                start_ticks,
                launched,
            },
        );
    }

    /// Whether the router sends the service traffic (it has a `listen`);
    /// read from the store when no pass has run yet (adopting).
    async fn serves(&self) -> bool {
        match &self.service {
            Some(rec) => rec.settings.listen.is_some(),
            None => match self.shared.state.service(&self.name).await {
                Ok(Some(rec)) => rec.settings.listen.is_some(),
                // Unknown: the stricter default (its port must accept).
                Ok(None) | Err(_) => true,
            },
        }
    }

    /// The node worker: make what this node runs match its assignments as
    /// stored — start what is assigned (with the leader's ids), relabel
    /// a warm instance taken over, stop what is to stop and what runs with
    /// no assignment. Returns when a stop swapped the routes, if one did.
    /// `read`: the assignments as the caller just read them from the store
    /// (a member that does not lead), so that they are not read twice.
    pub(super) async fn work(&mut self, read: Option<Vec<Assignment>>) -> Option<Instant> {
        // What the leader just wrote is what the store holds (on one node
        // the worker takes it from the leader's hands); after a failed
        // write, what the store holds is read.
        let given = read;
        let read;
        let assignments: &[Assignment] = match self.stored {
            Some(Some(_)) => {
                // The same assignments and the same instances as when it
                // last carried them out: nothing new to do (a steady
                // fleet's pass).
                let now = (self.fleet.generation(), self.sees);
                if self.worked == Some(now) {
                    return None;
                }
                self.worked = Some(now);
                self.fleet.assigned()
            }
            Some(None) => return None,
            None => {
                read = match given {
                    Some(list) => list,
                    None => match self.shared.state.assignments(&self.name).await {
                        Ok(Some(a)) => a.list,
                        // Nothing was ever assigned: nothing to do.
                        Ok(None) => return None,
                        Err(e) => {
                            self.log_state_error(e);
                            return None;
                        }
                    },
                };
                &read
            }
        };
        let running: Vec<Running<'_>> = self
            .instances
            .values()
            .map(|i| Running {
                id: &i.id,
                revision: i.revision,
                slot: i.slot,
                stopping: i.stopping,
            })
            .collect();
        let node = self.shared.node_name.clone();
        let w = assign::work(&node, assignments, &running, &self.ended);
        drop(running);
        // Reports stay until the leader dropped their assignments (there
        // are few: those of a pass or two).
        let kept = |id: &String| assignments.iter().any(|a| a.id == *id);
        self.gone.retain(|o| kept(&o.id));
        self.ended.retain(|id| kept(id));
        for a in w.relabel {
            let from = self.instances.get(&a.id).map_or(a.revision, |i| i.revision);
            self.adopt(&a.id, from, a.revision, a.slot).await;
        }
        for a in w.start {
            match self.prepare(a.revision).await {
                Ok(p) => self.start(&p, a.id, a.slot).await,
                Err(e) => {
                    // It cannot start here: reported refused (its slot goes
                    // to another node when there is one, and backs off),
                    // and never tried again under this id.
                    self.message = Some(e.to_string());
                    self.report(a.refused());
                }
            }
        }
        let mut by_reason: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (id, reason) in w.stop {
            if reason == StopReason::Drifted {
                self.shared.drift.replaced(1);
            }
            by_reason.entry(reason.to_string()).or_default().push(id);
        }
        if !w.orphans.is_empty() {
            by_reason.insert(
                "no assignment: the leader does not know it".to_owned(),
                w.orphans,
            );
        }
        let mut swapped = None;
        for (reason, ids) in by_reason {
            let at = self.stop_instances(&ids, StopKind::Graceful, &reason).await;
            swapped = swapped.or(at);
        }
        swapped
    }

    /// A warm instance of release `from` now serves `target` in `slot`.
    pub(super) async fn adopt(&mut self, id: &str, from: u64, target: u64, slot: u32) {
        let Some(inst) = self.instances.get_mut(id) else {
            return;
        };
        inst.revision = target;
        inst.slot = slot;
        inst.adopted = true;
        let rec = InstanceRecord {
            id: id.to_owned(),
            service: self.name.clone(),
            revision: target,
            slot,
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
        self.keep_instance(&rec, &ev).await;
    }

    /// Stop instances together: all of them leave the routing table in one
    /// swap, then each drains in-flight requests before its stop signal.
    /// Returns when that swap was done, if any instance was stopped.
    pub(super) async fn stop_instances(
        &mut self,
        ids: &[String],
        kind: StopKind,
        why: &str,
    ) -> Option<Instant> {
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
            stops.push((id.clone(), inst.revision, inst.stop.clone()));
        }
        if stops.is_empty() {
            return None;
        }
        self.publish_routes();
        let swapped = now();
        for (id, revision, stop) in stops {
            let _ = stop.send(kind);
            self.record_event(
                Change::InstanceStopping {
                    reason: why.to_string(),
                },
                Some(revision),
                Some(&id),
            )
            .await;
        }
        Some(swapped)
    }

    pub(super) async fn stop_all(&mut self, kind: StopKind, force: bool) {
        // `force`: an escalation reaches the instances already stopping.
        let ids: Vec<String> = self
            .instances
            .values()
            .filter(|i| force || !i.stopping)
            .map(|i| i.id.clone())
            .collect();
        let reason = if self.removing {
            StopReason::Removed
        } else {
            StopReason::Shutdown
        };
        self.stop_instances(&ids, kind, &reason.to_string()).await;
    }
}

pub(crate) fn free_port(ip: std::net::IpAddr) -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

/// Resolve a release's `user` against the image's `/etc/passwd` and
/// `/etc/group`, then the host's.
fn identity(
    user: Option<&str>,
    rootfs: &std::path::Path,
) -> Result<kiln_core::user::Identity, kiln_core::user::UserError> {
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    let passwd = [read(rootfs.join("etc/passwd")), read("/etc/passwd".into())];
    let group = [read(rootfs.join("etc/group")), read("/etc/group".into())];
    kiln_core::user::resolve(
        user,
        &[passwd[0].as_str(), passwd[1].as_str()],
        &[group[0].as_str(), group[1].as_str()],
    )
}

/// The first directory above `path` that `id` cannot search (its runtime,
/// started as `id`, could not reach the tree), if any.
fn unsearchable_above(path: &std::path::Path, id: kiln_core::user::Identity) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    if id.is_root() {
        return None;
    }
    path.ancestors().skip(1).find_map(|dir| {
        let m = std::fs::metadata(dir).ok()?;
        let bit = if m.uid() == id.uid {
            0o100
        } else if m.gid() == id.gid {
            0o010
        } else {
            0o001
        };
        (m.mode() & bit == 0).then(|| dir.to_path_buf())
    })
}

/// Everything instances of `release` of service `name` need on this node:
/// its image's tree materialized, its runtime, its volumes made, who its
/// instances run as — under this agent's policies (the trust policy's
/// `require_self_contained`). The image must be in the store.
pub(crate) async fn prepare_release(
    shared: &crate::shared::Shared,
    name: &kiln_core::spec::ServiceName,
    release: Release,
) -> Result<Prepared, ControllerError> {
    let store = shared.store.clone();
    let image = release.config.image.clone();
    let tree = tokio::task::spawn_blocking(move || store.materialize(&image))
        .await
        .map_err(|e| ControllerError::Unpacker(e, release.config.image.clone()))?
        .map_err(|source| ControllerError::Materialize {
            image: release.config.image.clone(),
            source: Box::new(source),
        })?;
    let rt = shared.runtimes.get(release.config.runtime)?;
    for vol in release.config.volumes.keys() {
        let path = volume_dir(shared, name, vol.as_str());
        std::fs::create_dir_all(&path)
            .map_err(|source| ControllerError::Volume { path, source })?;
    }
    let user = if rustix::process::geteuid().is_root() {
        let id = identity(release.config.user.as_deref(), &tree.rootfs).map_err(|source| {
            ControllerError::User {
                service: name.clone(),
                source,
            }
        })?;
        if let Some(dir) = unsearchable_above(&tree.rootfs, id) {
            return Err(ControllerError::Unreachable {
                service: name.clone(),
                user: id,
                dir,
            });
        }
        Some(id)
    } else {
        None
    };
    // A userland of its own: baked on a base, or its own /usr (read
    // from the tree, not from the layers again).
    let self_contained = tree.rootfs.join("usr").is_dir()
        || shared.store.manifest(&release.config.image).is_ok_and(|m| {
            m.annotations
                .contains_key(kiln_core::oci::ANNOTATION_BASE_DIGEST)
        });
    // This agent's policy, whoever recorded the release.
    if !self_contained
        && shared
            .trust
            .as_ref()
            .is_some_and(|t| t.require_self_contained)
    {
        return Err(ControllerError::NotSelfContained {
            image: release.config.image_label(),
        });
    }
    Ok(Prepared {
        release,
        rootfs: tree.rootfs,
        runtime: rt,
        user,
        self_contained,
    })
}

/// Where volume `volume` of service `name` lives on this node.
pub(crate) fn volume_dir(
    shared: &crate::shared::Shared,
    name: &kiln_core::spec::ServiceName,
    volume: &str,
) -> PathBuf {
    shared.home.join("volumes").join(name.as_str()).join(volume)
}

/// How instance `id` of release `p` of service `name` starts, listening
/// on `port` (see [`Controller::launch_of`]).
pub(crate) async fn launch_for(
    shared: &crate::shared::Shared,
    service: &kiln_core::spec::ServiceName,
    p: &Prepared,
    id: &str,
    port: u16,
) -> Result<Launch, LaunchError> {
    let cfg = &p.release.config;
    let mut env: std::collections::BTreeMap<String, String> = cfg
        .env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    for (name, sealed) in &cfg.secrets {
        match shared.state.secret(sealed).await {
            Ok(Some(value)) => {
                env.insert(name.to_string(), value.expose().to_owned());
            }
            Ok(None) => return Err(LaunchError::Secret(name.to_string())),
            Err(e) => return Err(LaunchError::State(e)),
        }
    }
    env.entry("PATH".to_owned())
        .or_insert_with(|| DEFAULT_PATH.to_owned());
    env.insert("PORT".to_owned(), port.to_string());
    // Where to listen: the node's advertised address (in a cluster the
    // other nodes' routers reach the instance there), else loopback.
    env.insert("HOST".to_owned(), shared.membership.address.to_string());
    env.insert("KILN_INSTANCE".to_owned(), id.to_owned());
    env.insert("KILN_SERVICE".to_owned(), service.to_string());
    env.insert("KILN_RELEASE".to_owned(), p.release.revision.to_string());
    Ok(Launch {
        id: id.to_owned(),
        rootfs: p.rootfs.clone(),
        argv: cfg.command.clone(),
        env,
        workdir: cfg.workdir.to_string(),
        volumes: cfg
            .volumes
            .iter()
            .map(|(name, v)| {
                let dir = volume_dir(shared, service, name.as_str());
                (name.to_string(), dir, v.path.to_string())
            })
            .collect(),
        user: p.user,
        limits: cfg.resources,
        self_contained: p.self_contained,
        stdin: false,
        cgroup: format!("kiln/{}/{id}", shared.cgroup_scope()),
    })
}
