//! The reconciler: one controller task per service, so passes over one
//! service never overlap. Level-triggered: every pass reads the desired
//! state (the service's target release and replicas, from the state store)
//! and the observed state (its instances) into one [`View`], asks
//! [`kiln_core::rollout::decide`] what to do, and carries the steps out;
//! then it sets a timer for the next time something is due. Messages only
//! say "look again"; why a pass ran never changes what it does.
//!
//! Each pass is the leader's, then the node worker's, through the state
//! store (`kiln_core::rollout::assign`): the worker publishes what it
//! runs (observations); the leader reads the service, its releases, every
//! node's observations and its assignments, builds the view from them,
//! decides, and writes the assignments the decision makes (with the
//! rollout, in one transaction, under its fence); the worker then reads
//! its node's assignments and starts, relabels and stops instances to
//! match. On one node both run here, in one task; in a cluster the leader
//! will be one agent and every node's worker its own.
//!
//! Instances are never modified: one that exits or fails liveness is
//! replaced by a new instance (new id) of the same release in the same
//! replica slot, at once the first time and with exponential back-off while
//! the slot keeps failing before it was stable.
//!
//! - [`instances`]: the instances' bookkeeping (start, stop, their reports).
//! - [`publish`]: what the pass shows others (the router's table, status).

pub(crate) mod hooks;
pub(crate) mod instances;
mod publish;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use kiln_core::counters::Snapshot;
use kiln_core::event::{Actor, Change};
use kiln_core::health::SlotHistory;
use kiln_core::release::Outcome;
use kiln_core::resources::{Resources, Room};
use kiln_core::rollout::assign::{self, Assignment, Fleet, Observation};
use kiln_core::rollout::{self, Decision, Message, Rollout, Routing, Seen, Step, View};
use kiln_core::spec::ServiceName;
use tokio::sync::{mpsc, oneshot};

use crate::instance::{Report, StopKind};
use crate::shared::Shared;
use crate::state::{NewEvent, ServiceRecord, StateError};

use instances::{Inst, Prepared};
use publish::Routed;

/// A one-off instance, ready to start (`kiln run`).
pub struct OneOff {
    pub id: String,
    pub revision: u64,
    pub launch: crate::runtime::Launch,
    pub runtime: Arc<dyn crate::runtime::Runtime>,
}

/// What a controller is told.
pub enum Msg {
    /// Something changed (an apply): reconcile.
    Wake,
    /// Leave every instance running and end (the agent hands over to a
    /// successor), then answer.
    Detach { done: oneshot::Sender<()> },
    /// Stop every instance, then answer.
    Shutdown {
        kind: StopKind,
        done: oneshot::Sender<()>,
    },
    /// The service was removed: stop every instance gracefully (drained,
    /// out of the routes), answer how many, and end.
    Remove { done: oneshot::Sender<usize> },
    /// `kiln promote`: switch a blue-green rollout waiting for it, or pass
    /// a canary's current step.
    Promote {
        actor: Actor,
        done: oneshot::Sender<Result<(u64, Option<u32>), ControllerError>>,
    },
    /// `kiln run`: how a one-off instance of a release starts (its release
    /// `Some`, else the active one, else the target), with the runtime to
    /// start it with.
    OneOff {
        revision: Option<u64>,
        done: oneshot::Sender<Result<OneOff, ControllerError>>,
    },
    /// `kiln exec`: the command that runs `argv` inside running instance
    /// `id` (as an exec probe does), and its release.
    Exec {
        id: String,
        argv: Vec<String>,
        done: oneshot::Sender<Result<(tokio::process::Command, u64), ControllerError>>,
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
    #[error("service {service}: {source}")]
    User {
        service: ServiceName,
        source: kiln_core::user::UserError,
    },
    #[error(
        "service {service}: its instances run as {user} and cannot reach their image tree: {dir} is not searchable by them (chmod o+x {dir}, or keep KILN_HOME where every user may pass, as /var/lib/kiln)",
        dir = .dir.display()
    )]
    Unreachable {
        service: ServiceName,
        user: kiln_core::user::Identity,
        dir: PathBuf,
    },
    #[error("cannot materialize {image}: {source}")]
    Materialize {
        image: kiln_core::Digest,
        source: Box<kiln_store::tree::TreeError>,
    },
    #[error("unpacking {image} stopped: {0}", image = .1)]
    Unpacker(tokio::task::JoinError, kiln_core::Digest),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
    #[error(transparent)]
    Peers(#[from] crate::peers::PeerError),
    /// A release of the `process` runtime on a node whose agent does not
    /// allow it (each agent enforces its own policy, whoever applied).
    #[error(
        "node {node} does not run the process runtime (its agent was started without --allow-runtime process)"
    )]
    ProcessNotAllowed { node: String },
    #[error("service {service} runs no instance {id} on this node (kiln status lists them)")]
    NoInstance { service: ServiceName, id: String },
    #[error("secret {name} of release {revision} is not in the state store")]
    MissingSecret { name: String, revision: u64 },
    /// An image without a userland of its own, where this agent's policy
    /// (`require_self_contained`) refuses those.
    #[error("image {image}: {}", crate::trust::NOT_SELF_CONTAINED)]
    NotSelfContained { image: String },
    #[error("volume {path}: {source}", path = .path.display())]
    Volume {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no rollout of {0} is waiting for promotion")]
    NotWaitingForPromotion(ServiceName),
    /// A rollout request sent to a member that does not lead.
    #[error(
        "node {node} does not lead the cluster: promote and abort go to the leader ({})",
        leader.as_deref().unwrap_or("none now: one is elected within the lease's TTL")
    )]
    NotLeader {
        node: String,
        leader: Option<String>,
    },
    #[error(
        "no rollout of {service} is in progress (it is on release {revision}): nothing to abort"
    )]
    NothingToAbort { service: ServiceName, revision: u64 },
    #[error(
        "release {revision} is the first release of {service}: there is no earlier release to return to"
    )]
    FirstRelease { service: ServiceName, revision: u64 },
}

pub struct Controller {
    /// Starts of the last decision that no node had room for.
    unplaced: usize,
    /// A release whose `post_deploy` hook failed, and how (its watch fails).
    post_deploy_failed: Option<(u64, String)>,
    shared: Arc<Shared>,
    name: ServiceName,
    rx: mpsc::UnboundedReceiver<Msg>,
    reports_tx: mpsc::UnboundedSender<Report>,
    reports: mpsc::UnboundedReceiver<Report>,
    instances: BTreeMap<String, Inst>,
    slots: BTreeMap<(u64, u32), SlotHistory>,
    prepared: BTreeMap<u64, Arc<Prepared>>,
    /// The rollout in progress, as the last pass left it.
    rollout: Rollout,
    /// The rollout as last saved in the state store (saved again when a
    /// pass or a request changes it).
    saved: Rollout,
    /// Which ready instances get the traffic, as the last pass decided.
    routing: Routing,
    shutdown: Option<(StopKind, Vec<oneshot::Sender<()>>)>,
    message: Option<String>,
    /// What was last published to the router.
    routed: Routed,
    /// The preview instance ids last published.
    previewed: Vec<String>,
    /// The service as the last pass read it: its settings (min_ready,
    /// timeout, preview) serve the timers and route publishing until the
    /// next pass, without another read of the state store.
    service: Option<ServiceRecord>,
    /// When the next pass is due, as the last pass computed it.
    due: Option<Instant>,
    /// Instances an earlier agent process left running, to take over
    /// before the first pass.
    adopting: Vec<Adoptee>,
    /// Handing over: waiting for every instance task to let go.
    detaching: Option<oneshot::Sender<()>>,
    /// The service was removed: its instances stop for that reason.
    removing: bool,
    /// Whether this node led at the last pass (a node that starts leading
    /// reads the fleet and the rollout again from the store).
    leading: bool,
    /// In a cluster, the whole fleet's counts at the last pass (`status`
    /// says ready and converged from them).
    counts: Option<kiln_core::api::FleetCounts>,
    /// Changes when the drift detector found something: look again.
    drift: tokio::sync::watch::Receiver<u64>,
    /// The leader's: the assignments as the last pass left them, the
    /// observations it took in, the instances it counted as failed while
    /// they were still there, and its view of them.
    fleet: Fleet,
    /// A digest of the store's assignments as this leader knows them
    /// (which `fleet` holds): `None` when not read yet, or a write
    /// failed (read them again); `Some(None)` when none were ever
    /// written. It is their only writer while its fence holds, so it
    /// reads them once.
    stored: Option<Option<u64>>,
    /// Whether the leader took in the observations as the store has
    /// them (`false`: a node published since: read them again).
    observed: bool,
    /// The worker's: instances of this node gone (reported until the
    /// leader dropped their assignments, never started again), and what
    /// it last published.
    gone: Vec<Observation>,
    ended: BTreeSet<String>,
    /// A digest of what it last published (what it sees is hashed each
    /// pass, and published only when it changed).
    published: Option<u64>,
    /// A digest of what it saw at this pass's start (what it publishes;
    /// nothing changes it before the pass's work).
    sees: u64,
    /// The assignments' generation and what it saw when it last carried
    /// them out: the same again has nothing new to do.
    worked: Option<(u64, u64)>,
    /// The assignments' generation and a digest of them, as last hashed.
    hashed: (u64, u64),
    /// The routing as the store has it beside the assignments (the
    /// leader writes it again when its decision changes it).
    stored_routing: Option<Routing>,
    /// In a cluster, the other nodes' instances that take traffic, as the
    /// assignments and observations last read say.
    peers: Vec<Remote>,
    /// In a cluster, the other nodes' routers' counters of the service's
    /// releases, summed (a canary is judged on every router's requests).
    peer_counts: BTreeMap<u64, Snapshot>,
    /// A digest of this router's counters as last published, and when.
    counted: Option<(u64, Instant)>,
}

/// An instance of another node that this node's router sends to.
#[derive(Clone, Debug)]
pub(super) struct Remote {
    id: String,
    revision: u64,
    addr: std::net::SocketAddr,
    /// This router's requests in flight to it (kept across publications).
    inflight: Arc<crate::router::metrics::InFlight>,
}

/// An instance an earlier agent process left running: its record and its
/// output pipes (held by the supervisor meanwhile).
pub type Adoptee = (crate::state::InstanceRecord, Vec<std::os::fd::OwnedFd>);

/// What a pass read, owned: a [`View`] borrows it.
struct Observed {
    rec: ServiceRecord,
    outcome: Outcome,
    previous: Option<u64>,
    same_content: BTreeSet<u64>,
    counters: BTreeMap<u64, Snapshot>,
    /// A digest of the assignments as the store has them (`None`: never
    /// written).
    stored: Option<u64>,
    /// What each recorded release's instances declare they use.
    demands: BTreeMap<u64, Resources>,
}

impl Observed {
    /// What an instance of release `revision` reserves (a release not read
    /// counts as the target).
    fn demand(&self, revision: u64) -> Resources {
        self.demands
            .get(&revision)
            .or_else(|| self.demands.get(&self.rec.target))
            .copied()
            .unwrap_or_default()
    }
}

/// How soon a leader looks again when a start found no node with room
/// (another service's instances may have ended meanwhile).
const ROOM_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// A cluster's instances of a service as the leader's view has them.
fn counts(seen: &[Seen<String>], target: u64) -> kiln_core::api::FleetCounts {
    let on_target = |s: &&Seen<String>| s.revision == target && !s.stopping;
    kiln_core::api::FleetCounts {
        ready: seen
            .iter()
            .filter(on_target)
            .filter(|s| s.ready_since.is_some() && s.live)
            .count() as u32,
        running: seen.iter().filter(on_target).count() as u32,
        instances: seen.len() as u32,
    }
}

/// How often, in a cluster, a member that does not lead reads its
/// assignments again, and the leader the members' observations.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// A digest of a value, to tell whether it changed without keeping it.
fn digest(v: &impl std::hash::Hash) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(0).hash_one(v)
}

/// Now, on tokio's clock: a test that pauses tokio's time controls every
/// timer of the controller.
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Now, as an instant and as wall-clock time, for a rollout's saved times
/// and the times in observations.
pub(crate) fn clock() -> rollout::Clock {
    rollout::Clock {
        now: now(),
        wall_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    }
}

impl Controller {
    pub fn new(shared: Arc<Shared>, name: ServiceName, rx: mpsc::UnboundedReceiver<Msg>) -> Self {
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let drift = shared.drift.subscribe();
        Self {
            drift,
            shared,
            name,
            rx,
            reports_tx,
            reports,
            instances: BTreeMap::new(),
            slots: BTreeMap::new(),
            prepared: BTreeMap::new(),
            rollout: Rollout::Idle,
            saved: Rollout::Idle,
            routing: Routing::Any,
            shutdown: None,
            message: None,
            routed: Routed::default(),
            previewed: Vec::new(),
            service: None,
            due: None,
            adopting: Vec::new(),
            removing: false,
            leading: false,
            counts: None,
            detaching: None,
            fleet: Fleet::default(),
            stored_routing: None,
            peers: Vec::new(),
            peer_counts: BTreeMap::new(),
            counted: None,
            stored: None,
            observed: false,
            gone: Vec::new(),
            ended: BTreeSet::new(),
            published: None,
            sees: 0,
            worked: None,
            hashed: (u64::MAX, 0),
            unplaced: 0,
            post_deploy_failed: None,
        }
    }

    /// Take over `records` (running instances an earlier agent process
    /// started) before the first pass.
    pub fn adopting(mut self, records: Vec<Adoptee>) -> Self {
        self.adopting = records;
        self
    }

    pub async fn run(mut self) {
        for (rec, output) in std::mem::take(&mut self.adopting) {
            self.adopt_running(rec, output).await;
        }
        self.report_lost().await;
        self.resume_rollout().await;
        loop {
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some(Msg::Wake) => {}
                    Some(Msg::Promote { actor, done }) => {
                        let _ = done.send(self.request_promotion(actor).await);
                    }
                    Some(Msg::Abort { actor, done }) => {
                        let answer = self.request_abort(actor).await;
                        let _ = done.send(answer);
                    }
                    Some(Msg::OneOff { revision, done }) => {
                        let _ = done.send(self.one_off(revision).await);
                    }
                    Some(Msg::Exec { id, argv, done }) => {
                        let _ = done.send(self.exec_in(&id, &argv).await);
                    }
                    Some(Msg::Detach { done }) => {
                        for inst in self.instances.values() {
                            let _ = inst.stop.send(StopKind::Detach);
                        }
                        self.detaching = Some(done);
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
                            self.stop_all(StopKind::Kill, true).await;
                        }
                    }
                    Some(Msg::Remove { done }) => {
                        let count = self.instances.len();
                        let (tx, rx) = oneshot::channel();
                        self.removing = true;
                        match &mut self.shutdown {
                            Some((_, waiters)) => waiters.push(tx),
                            None => self.shutdown = Some((StopKind::Graceful, vec![tx])),
                        }
                        tokio::spawn(async move {
                            if rx.await.is_ok() {
                                let _ = done.send(count);
                            }
                        });
                    }
                    None => return,
                },
                Some(report) = self.reports.recv() => self.on_report(report).await,
                Ok(()) = self.drift.changed() => {}
                _ = sleep_until(self.due) => {}
            }
            // Drain whatever else arrived, then one pass for all of it.
            while let Ok(report) = self.reports.try_recv() {
                self.on_report(report).await;
            }
            if self.detaching.is_some() {
                // Nothing is decided while handing over.
                if self.instances.is_empty()
                    && let Some(done) = self.detaching.take()
                {
                    let _ = done.send(());
                    return;
                }
                continue;
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
    async fn record_event(
        &mut self,
        change: Change,
        revision: Option<u64>,
        instance: Option<&str>,
    ) {
        let ev = self.event(change, revision, instance);
        if let Err(e) = self.shared.state.append_event(&ev).await {
            self.log_state_error(e);
        }
    }

    /// The rollout an earlier agent process saved, resumed: its deadlines
    /// and windows keep their wall-clock ends; a canary step's analysis
    /// window starts again (the router's counters are this process's).
    async fn resume_rollout(&mut self) {
        match self.shared.state.rollout(&self.name).await {
            Ok(Some(saved)) => {
                self.rollout = Rollout::restore(&saved, &clock(), |rev| self.counters(rev));
                self.saved = self.rollout.clone();
            }
            Ok(None) => {}
            Err(e) => self.log_state_error(e),
        }
    }

    /// The worker, as it starts: an instance of this node assigned by an
    /// earlier agent process and not adopted (it ended while no agent
    /// ran) is reported gone, so that the leader replaces it.
    async fn report_lost(&mut self) {
        let assigned = match self.shared.state.assignments(&self.name).await {
            Ok(a) => a.map(|a| a.list).unwrap_or_default(),
            Err(e) => return self.log_state_error(e),
        };
        for a in assigned {
            if a.node == self.shared.node_name && !self.instances.contains_key(&a.id) {
                self.report(a.gone(false));
            }
        }
    }

    /// The worker reports an instance of this node gone, until the leader
    /// dropped its assignment; it is never started again.
    fn report(&mut self, gone: Observation) {
        self.ended.insert(gone.id.clone());
        self.gone.push(gone);
    }

    /// How the worker sees instance `i` (its id borrowed: a digest of
    /// what it sees needs no copy, and hashes as the published one).
    fn observed<'a>(&self, i: &'a instances::Inst) -> Observation<&'a str> {
        Observation {
            id: i.id.as_str(),
            revision: i.revision,
            slot: i.slot,
            stopping: i.stopping,
            ready_since_ms: i.ready_ms,
            live: i.live,
            adopted: i.adopted,
            stale: self.shared.drift.stale(&i.image, i.started_wall, &i.id),
            gone: None,
            refused: false,
            port: i.port,
        }
    }

    /// What this node's worker sees of the service's instances: those it
    /// runs, and those gone since (until the leader took it in).
    fn observations(&self) -> Vec<Observation> {
        self.instances
            .values()
            .map(|i| self.observed(i).map_id(str::to_owned))
            .chain(self.gone.iter().cloned())
            .collect()
    }

    /// A digest of what the worker sees (each instance as
    /// [`observed`](Self::observed) says, then the reports), made without
    /// copying it: most passes change nothing.
    fn observations_digest(&self) -> u64 {
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut h = foldhash::fast::FixedState::with_seed(0).build_hasher();
        for i in self.instances.values() {
            self.observed(i).hash(&mut h);
        }
        self.gone.hash(&mut h);
        h.finish()
    }

    /// A digest of the assignments, hashed again only when they changed.
    fn assigned_digest(&mut self) -> u64 {
        let generation = self.fleet.generation();
        if self.hashed.0 != generation {
            self.hashed = (generation, digest(&self.fleet.assigned()));
        }
        self.hashed.1
    }

    /// The worker publishes what it sees, when it changed.
    async fn publish_observations(&mut self) {
        let digest = self.observations_digest();
        self.sees = digest;
        if self.published == Some(digest) {
            return;
        }
        let now = self.observations();
        match self
            .shared
            .state
            .publish(&self.name, &self.shared.node_name, &now)
            .await
        {
            Ok(()) => {
                self.published = Some(digest);
                // The leader reads them again (in a cluster, a node's
                // publication comes through the store's watch).
                self.observed = false;
            }
            Err(e) => self.log_state_error(e),
        }
    }

    /// Keep the rollout in the state store when it changed since it was
    /// last kept.
    async fn save_rollout(&mut self) {
        if self.rollout == self.saved {
            return;
        }
        let saved = self.rollout.save(&clock());
        match self
            .shared
            .state
            .set_rollout(&self.name, &saved, self.shared.fenced())
            .await
        {
            Ok(()) => self.saved = self.rollout.clone(),
            Err(e) => self.log_state_error(e),
        }
    }

    fn log_state_error(&mut self, e: crate::state::StateError) {
        tracing::error!(service = %self.name, "state: {e}");
        self.message = Some(format!("state store error: {e}"));
    }

    /// One pass: observe, decide (kiln-core), carry the steps out.
    async fn reconcile(&mut self) {
        if let Some((kind, _)) = &self.shutdown {
            // The agent's order, not a rollout decision.
            let kind = *kind;
            self.stop_all(kind, false).await;
            self.due = None;
            return;
        }
        // The worker says what it runs; the leader decides from it.
        self.publish_observations().await;
        if !self.shared.membership.is_solo() {
            self.share_counters().await;
        }
        let leading = self.shared.membership.is_leading();
        if leading != self.leading {
            self.leading = leading;
            if leading {
                // Taken over (or first pass): the store holds the fleet
                // and the rollout as the last leader left them.
                self.stored = None;
                self.observed = false;
                self.resume_rollout().await;
            }
        }
        if !leading {
            self.follow_leader().await;
            return;
        }
        let solo = self.shared.membership.is_solo();
        if !solo {
            // The other members publish through etcd: read them every pass.
            self.observed = false;
        }
        let Some(o) = self.observe().await else {
            if !solo {
                self.due = Some(now() + FOLLOW_EVERY);
            }
            return;
        };
        let decision = rollout::decide(&self.rollout, &self.view(&o));
        self.execute(&o, decision).await;
        self.save_rollout().await;
        // The timer: from what the fleet looks like after the steps (the
        // leader's view follows them).
        self.due = rollout::due(&self.rollout, &self.view(&o));
        if !solo {
            self.counts = Some(counts(self.fleet.seen(), o.rec.target));
            // The other nodes' instances, as the assignments now say (one
            // this pass stops leaves this router with it).
            self.peers = self.remotes(self.fleet.assigned(), self.fleet.observations());
            self.publish_routes();
            // And a pass at least that often, to hear of them.
            let soon = now() + FOLLOW_EVERY;
            self.due = Some(self.due.map_or(soon, |d| d.min(soon)));
        }
        if self.unplaced > 0 {
            let soon = now() + ROOM_RETRY;
            self.due = Some(self.due.map_or(soon, |d| d.min(soon)));
        }
        // What the worker found gone while it worked (an instance that
        // could not start) is the leader's to take in soon.
        if !self.gone.is_empty() {
            let soon = now() + std::time::Duration::from_millis(50);
            self.due = Some(self.due.map_or(soon, |d| d.min(soon)));
        }
    }

    /// A member that does not lead: its worker carries out what the leader
    /// assigned to this node, as the store has it, and its router sends
    /// traffic to this node's ready instances of the service's active
    /// release (a canary's or a blue-green's new release gets traffic
    /// through the leader's router only, until it is active). Assignments
    /// are read again every [`FOLLOW_EVERY`].
    async fn follow_leader(&mut self) {
        match self.shared.state.service(&self.name).await {
            Ok(rec) => self.service = rec,
            Err(e) => self.log_state_error(e),
        }
        self.stored = None;
        self.due = Some(now() + FOLLOW_EVERY);
        // The assignments, read once: the fleet as the leader sees it (for
        // `status` here), what this node's worker carries out, and where
        // its router sends (the leader's routing, with them).
        let assigned = match self.shared.state.assignments(&self.name).await {
            Ok(Some(a)) => a,
            // Nothing was ever assigned: nothing to do.
            Ok(None) => return,
            Err(e) => return self.log_state_error(e),
        };
        match assigned.routing {
            Some(r) => self.routing = r,
            // A leader that did not say: the active release.
            None => {
                if let Ok(releases) = self.shared.state.current_releases(&self.name).await {
                    self.routing = releases
                        .iter()
                        .filter(|r| r.outcome == Outcome::Active)
                        .map(|r| r.revision)
                        .max()
                        .map_or(Routing::Any, Routing::Release);
                }
            }
        }
        // The leader's rollout, for this node's status (a canary's step, a
        // release kept warm beside the new one).
        if let Ok(Some(saved)) = self.shared.state.rollout(&self.name).await {
            self.rollout = Rollout::restore(&saved, &clock(), |rev| self.counters(rev));
        }
        if let Ok(o) = self.shared.state.observations(&self.name).await {
            if let Some(rec) = &self.service {
                let seen = assign::seen(&assigned.list, &o, &clock());
                self.counts = Some(counts(&seen, rec.target));
            }
            self.peers = self.remotes(&assigned.list, &o);
        }
        self.reserve(&assigned.list);
        self.work(Some(assigned.list)).await;
        self.publish_routes();
    }

    /// The other nodes' instances that take traffic, at their nodes'
    /// advertised addresses (a node that left has none).
    fn remotes(&self, assigned: &[Assignment], observed: &[Observation]) -> Vec<Remote> {
        let m = &self.shared.membership;
        // Each peer's in-flight count carries over (by id, not a scan per
        // peer: a pass of a large fleet stays linear).
        let known: std::collections::HashMap<&str, &Arc<crate::router::metrics::InFlight>> = self
            .peers
            .iter()
            .map(|r| (r.id.as_str(), &r.inflight))
            .collect();
        assign::peers(&m.node, assigned, observed)
            .into_iter()
            .filter_map(|p| {
                let ip = m.address_of(p.node)?;
                let inflight = known.get(p.id).map(|i| (*i).clone()).unwrap_or_default();
                Some(Remote {
                    id: p.id.to_owned(),
                    revision: p.revision,
                    addr: (ip, p.port).into(),
                    inflight,
                })
            })
            .collect()
    }

    /// Read the service, its releases and its instances for a pass. `None`
    /// when there is nothing to reconcile (the reason is in the message).
    async fn observe(&mut self) -> Option<Observed> {
        let rec = match self.shared.state.service(&self.name).await {
            Ok(Some(r)) => r,
            Ok(None) => return None,
            Err(e) => {
                self.log_state_error(e);
                return None;
            }
        };
        self.service = Some(rec.clone());
        let target = rec.target;
        let p = match self.prepare(target).await {
            Ok(p) => p,
            Err(e) => {
                self.message = Some(e.to_string());
                return None;
            }
        };
        let releases = match self.shared.state.current_releases(&self.name).await {
            Ok(r) => r,
            Err(e) => {
                self.log_state_error(e);
                return None;
            }
        };
        let outcome = releases.iter().find(|r| r.revision == target)?.outcome;
        let mut demands: BTreeMap<u64, Resources> = releases
            .iter()
            .map(|r| (r.revision, r.config.resources))
            .collect();
        demands.insert(target, p.release.config.resources);
        let previous = releases
            .iter()
            .filter(|r| r.revision != target && r.outcome == Outcome::Active)
            .map(|r| r.revision)
            .max();
        let same_content = self
            .prepared
            .iter()
            .filter(|(_, q)| q.release.hash == p.release.hash)
            .map(|(rev, _)| *rev)
            .collect();
        let mut counters = BTreeMap::new();
        let canary = match &self.rollout {
            Rollout::Canary(run) => Some(run.stable),
            _ => None,
        };
        for rev in [Some(target), previous, canary].into_iter().flatten() {
            counters.insert(rev, self.counters(rev));
        }
        // The fleet, as the store has it: the assignments, and what every
        // node observed of them.
        let clock = clock();
        let stored = match self.stored {
            Some(known) => known,
            None => match self.shared.state.assignments(&self.name).await {
                Ok(a) => {
                    self.stored_routing = a.as_ref().and_then(|a| a.routing);
                    let a = a.map(|a| a.list);
                    let d = a.as_ref().map(digest);
                    // A service recorded before assignments: what this
                    // node runs is what was assigned.
                    let list = a.unwrap_or_else(|| {
                        self.instances
                            .values()
                            .map(|i| Assignment {
                                id: i.id.clone(),
                                node: self.shared.node_name.clone(),
                                revision: i.revision,
                                slot: i.slot,
                                adopted: i.adopted,
                                stop: None,
                                resources: Default::default(),
                            })
                            .collect()
                    });
                    self.fleet.reset(list, &clock);
                    d
                }
                Err(e) => {
                    self.log_state_error(e);
                    return None;
                }
            },
        };
        // Drained members, and those without the labels the service asks
        // for: their instances are replaced on the others.
        let mut drained = self
            .shared
            .drained
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let m = &self.shared.membership;
        if !rec.settings.node_labels.is_empty() {
            let with = m.members_with(&rec.settings.node_labels);
            drained.extend(m.member_names().into_iter().filter(|n| !with.contains(n)));
        }
        self.fleet.drain(&drained);
        // Members gone (their leases expired): their assignments go, and
        // the decision below starts their slots on the others.
        let members = self.shared.membership.member_names();
        let lost = self.fleet.lose_nodes(&members, &clock);
        if lost > 0 {
            tracing::warn!(
                service = %self.name,
                "{lost} instance(s) on nodes no longer in the cluster: placed again"
            );
        }
        if !self.observed {
            match self.shared.state.observations(&self.name).await {
                Ok(o) => {
                    for f in self.fleet.observe(o, &clock) {
                        let since = f.ready_since_ms.map(|ms| clock.to_instant(ms));
                        self.count_failure(f.revision, f.slot, since);
                    }
                    self.observed = true;
                }
                Err(e) => {
                    self.log_state_error(e);
                    return None;
                }
            }
        }
        // A worker without a readiness probe counts only once it has run a
        // while (one that exits at once never does).
        let mut rec = rec;
        rec.settings.rollout.min_ready.0 = kiln_core::service::effective_min_ready(
            rec.settings.rollout.min_ready.0,
            rec.settings.listen.is_some(),
            &p.release.config.health,
            self.shared.worker_min_ready,
        );
        self.reserve(self.fleet.assigned());
        Some(Observed {
            rec,
            outcome,
            previous,
            same_content,
            counters,
            stored,
            demands,
        })
    }

    fn view<'a>(&'a self, o: &'a Observed) -> View<'a, String> {
        View {
            service: &self.name,
            now: now(),
            target: o.rec.target,
            outcome: o.outcome,
            previous: o.previous,
            settings: &o.rec.settings,
            backoff: self.shared.backoff,
            instances: self.fleet.seen(),
            slots: &self.slots,
            same_content: &o.same_content,
            counters: &o.counters,
            last_error: self.message.as_deref(),
            hook_failed: self
                .post_deploy_failed
                .as_ref()
                .filter(|(rev, _)| *rev == o.rec.target)
                .map(|(_, why)| why.as_str()),
        }
    }

    /// Carry a decision out: the leader's assignments (with the rollout,
    /// in one change), then the node worker's part (from the assignments
    /// as stored), then the decision's routes, records and outcomes in
    /// order (a failure's record says how long the swap took).
    async fn execute(&mut self, o: &Observed, d: Decision<String>) {
        let target = o.rec.target;
        let decided = now();
        // When this decision's first route swap happened (a canary's abort
        // reports how long it took).
        let mut swapped: Option<Instant> = None;
        self.rollout = d.next;
        self.routing = d.routing;
        let shared = self.shared.clone();
        let name = &self.name;
        // New instances go to members with the service's labels, not
        // drained (drained ones if nothing else has the labels).
        let members = self
            .fleet
            .nodes_for(&shared.membership.members_with(&o.rec.settings.node_labels));
        if members.is_empty() && d.steps.iter().any(|s| matches!(s, Step::Start { .. })) {
            self.message = Some(format!(
                "no member has the labels {} (kiln serve --label): nothing can start",
                o.rec
                    .settings
                    .node_labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ));
        }
        // Placed within what every node has left once every service's
        // instances took their share (one service at a time: the lock is
        // held from reading what the others reserved to writing what this
        // one now does). Only a decision that starts something takes room
        // (a stop keeps its share until the instance is gone): the others
        // neither read the other services' shares nor write this one's.
        let starts = d.steps.iter().any(|s| matches!(s, Step::Start { .. }));
        let unplaced = {
            let mut reserved =
                starts.then(|| shared.reserved.lock().unwrap_or_else(|p| p.into_inner()));
            let room = match &reserved {
                Some(reserved) => {
                    let others = reserved
                        .iter()
                        .filter(|(s, _)| *s != name)
                        .flat_map(|(_, v)| v.iter().map(|(n, r)| (n.as_str(), r)));
                    let mine = self
                        .fleet
                        .assigned()
                        .iter()
                        .map(|a| (a.node.as_str(), &a.resources));
                    Room::new(shared.membership.capacity(), others.chain(mine))
                }
                None => Room::default(),
            };
            let unplaced = self.fleet.assign(
                &d.steps,
                target,
                (&members, &room),
                |rev| o.demand(rev),
                |rev| shared.new_instance_id(name, rev),
            );
            if let Some(reserved) = &mut reserved {
                reserved.insert(name.clone(), reservations(self.fleet.assigned()));
            }
            unplaced
        };
        // The rollout goes with the assignments, unless the decision also
        // changes an outcome (a release active, or failed): then it is
        // kept after that record, so that a crash between the two never
        // leaves a rollout that says it is over beside a release still
        // pending.
        let outcome = d
            .steps
            .iter()
            .any(|s| matches!(s, Step::Activate | Step::Fail { .. }));
        let saved = (self.rollout != self.saved && !outcome).then(|| self.rollout.save(&clock()));
        let digest_now = self.assigned_digest();
        self.stored = None;
        if o.stored != Some(digest_now)
            || saved.is_some()
            || self.stored_routing != Some(self.routing)
        {
            match self
                .shared
                .state
                .assign(
                    &self.name,
                    self.fleet.assigned(),
                    Some(self.routing),
                    saved.as_ref(),
                    self.shared.fenced(),
                )
                .await
            {
                Ok(()) => {
                    if saved.is_some() {
                        self.saved = self.rollout.clone();
                    }
                    self.stored = Some(Some(digest_now));
                    self.stored_routing = Some(self.routing);
                }
                // Read again next time: the store has what it has.
                Err(e) => self.log_state_error(e),
            }
        } else {
            self.stored = Some(o.stored);
        }
        // The leader's own bookkeeping; the node's steps are the worker's.
        let mut after = Vec::new();
        for step in d.steps {
            match step {
                Step::SlotStable { revision, slot } => {
                    if let Some(s) = self.slots.get_mut(&(revision, slot)) {
                        s.failures = 0;
                    }
                }
                Step::Start { revision, slot } => {
                    self.slots.entry((revision, slot)).or_default().retry_at = None;
                }
                Step::Adopt { .. } | Step::Stop { .. } => {}
                other => after.push(other),
            }
        }
        let worked = self.work(None).await;
        swapped = swapped.or(worked);
        // Then the rest, in the decision's order, onto what the worker
        // made: a switch routes to warm instances it just relabelled, and
        // a release is active (what `kiln promote` and `apply` wait for)
        // only once the routes serve it.
        for step in after {
            match step {
                Step::Route => {
                    self.publish_routes();
                    swapped = swapped.or(Some(now()));
                }
                Step::Record(change) => self.record_event(change, Some(target), None).await,
                Step::Activate => self.complete_rollout(target).await,
                Step::Fail {
                    reason,
                    to,
                    automatic,
                    by,
                    timed,
                } => {
                    let swap = timed.then(|| swapped.unwrap_or(decided).duration_since(decided));
                    tracing::warn!(
                        service = %self.name,
                        "release {target} failed: {reason}{}",
                        swap.map_or(String::new(), |s| format!(
                            " (routes switched in {}us)",
                            s.as_micros()
                        ))
                    );
                    let swap_us = swap.map(|s| s.as_micros() as u64);
                    self.record_failure(target, to, &reason, automatic, swap_us, by)
                        .await;
                }
                Step::SlotStable { .. }
                | Step::Start { .. }
                | Step::Adopt { .. }
                | Step::Stop { .. } => {}
            }
        }
        match d.message {
            Message::Keep => {}
            Message::Clear => self.message = None,
            Message::Set(m) => self.message = Some(m),
        }
        self.unplaced = unplaced;
        if unplaced > 0 {
            self.message = Some(format!(
                "{unplaced} instance(s) of release {target} wait for room: no node has {} left (kiln nodes shows what each offers)",
                o.demand(target)
            ));
        }
    }

    /// How a one-off instance of `revision` (else the active release, else
    /// the target) starts: prepared as the service's own instances are
    /// (this agent's policies included), with their environment, volumes,
    /// user and limits.
    async fn one_off(&mut self, revision: Option<u64>) -> Result<OneOff, ControllerError> {
        let revision = match revision {
            Some(r) => r,
            None => {
                let releases = self.shared.state.current_releases(&self.name).await?;
                let target = self
                    .shared
                    .state
                    .service(&self.name)
                    .await?
                    .ok_or_else(|| ControllerError::NoService(self.name.clone()))?
                    .target;
                releases
                    .iter()
                    .filter(|r| r.outcome == Outcome::Active)
                    .map(|r| r.revision)
                    .max()
                    .unwrap_or(target)
            }
        };
        let p = self.prepare(revision).await?;
        let id = format!("{}-run", self.shared.new_instance_id(&self.name, revision));
        let port = instances::free_port(self.shared.membership.address)
            .map_err(|e| ControllerError::Runtime(crate::runtime::RuntimeError::Spawn(e)))?;
        let launch = self.launch_of(&p, &id, port).await.map_err(|e| match e {
            instances::LaunchError::State(e) => ControllerError::State(e),
            instances::LaunchError::Secret(name) => {
                ControllerError::MissingSecret { name, revision }
            }
        })?;
        Ok(OneOff {
            id,
            revision,
            launch,
            runtime: p.runtime.clone(),
        })
    }

    /// The command that runs `argv` inside this node's running instance
    /// `id`: in its namespaces, as its user, with its environment (an exec
    /// probe's way).
    async fn exec_in(
        &mut self,
        id: &str,
        argv: &[String],
    ) -> Result<(tokio::process::Command, u64), ControllerError> {
        let (revision, port, pid) = match self.instances.get(id) {
            Some(i) if !i.stopping => (i.revision, i.port, i.pid),
            _ => {
                return Err(ControllerError::NoInstance {
                    service: self.name.clone(),
                    id: id.to_owned(),
                });
            }
        };
        let pid = pid.ok_or_else(|| ControllerError::NoInstance {
            service: self.name.clone(),
            id: id.to_owned(),
        })?;
        let p = self.prepare(revision).await?;
        let launch = self.launch_of(&p, id, port).await.map_err(|e| match e {
            instances::LaunchError::State(e) => ControllerError::State(e),
            instances::LaunchError::Secret(name) => {
                ControllerError::MissingSecret { name, revision }
            }
        })?;
        Ok((p.runtime.exec(&launch, pid, argv)?, revision))
    }

    /// Release `target` goes live: its `post_deploy` hook, if it has one,
    /// runs now as a one-off of it, on a task of its own (the service goes
    /// on being reconciled meanwhile); how it ended comes back as a report,
    /// and a failure fails the release's watch.
    async fn post_deploy(&mut self, target: u64) {
        let Some(p) = self.prepared.get(&target).cloned() else {
            return;
        };
        let argv = p.release.config.hooks.post_deploy.clone();
        // A release an apply made (not a rollback's return to content that
        // went live before).
        if argv.is_empty() || p.release.cause != "apply" {
            return;
        }
        let (shared, name, release) = (self.shared.clone(), self.name.clone(), p.release.clone());
        let to = self.reports_tx.clone();
        tokio::spawn(async move {
            let failed = match hooks::run(
                &shared,
                &name,
                release,
                "post_deploy",
                argv,
                Actor::Agent,
            )
            .await
            {
                Ok(()) => None,
                Err(hooks::HookError::Failed(status)) => Some(status),
                Err(hooks::HookError::Refused(e)) => Some(format!("it could not start: {e}")),
                Err(hooks::HookError::State(e)) => Some(format!("it could not be recorded: {e}")),
            };
            let _ = to.send(Report::Hook {
                revision: target,
                failed,
            });
        });
    }

    /// Keep this service's share of each node where the other services'
    /// placements see it.
    fn reserve(&self, assigned: &[Assignment]) {
        let mine = reservations(assigned);
        let mut reserved = self
            .shared
            .reserved
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if mine.is_empty() {
            reserved.remove(&self.name);
        } else {
            reserved.insert(self.name.clone(), mine);
        }
    }

    fn counters(&self, revision: u64) -> Snapshot {
        // Read without keeping: a release nothing routes to loses its
        // series (`Metrics::prune`). In a cluster, with every other
        // router's.
        let here = self.shared.router.metrics.peek(&self.name, revision);
        match self.peer_counts.get(&revision) {
            Some(there) => here.plus(there),
            None => here,
        }
    }

    /// In a cluster: this router's counters of the releases it serves,
    /// published when they changed (at most every [`FOLLOW_EVERY`]), and
    /// the other routers' read back and summed.
    async fn share_counters(&mut self) {
        let mut revisions: BTreeSet<u64> = self.instances.values().map(|i| i.revision).collect();
        revisions.extend(self.peers.iter().map(|r| r.revision));
        match self.routing {
            Routing::Any => {}
            Routing::Release(r) => {
                revisions.insert(r);
            }
            Routing::Split { stable, canary, .. } => {
                revisions.extend([stable, canary]);
            }
        }
        let mine: BTreeMap<u64, Snapshot> = revisions
            .into_iter()
            .map(|r| (r, self.shared.router.metrics.peek(&self.name, r)))
            .filter(|(_, s)| *s != Snapshot::default())
            .collect();
        let d = digest(&mine);
        let due = self
            .counted
            .is_none_or(|(seen, at)| seen != d && now().duration_since(at) >= FOLLOW_EVERY);
        if due {
            let node = self.shared.node_name.clone();
            match self
                .shared
                .state
                .publish_counters(&self.name, &node, &mine)
                .await
            {
                Ok(()) => self.counted = Some((d, now())),
                Err(e) => self.log_state_error(e),
            }
        }
        match self.shared.state.counters(&self.name).await {
            Ok(all) => {
                let mut sum: BTreeMap<u64, Snapshot> = BTreeMap::new();
                for (node, counts) in all {
                    if node == self.shared.node_name {
                        continue;
                    }
                    for (rev, s) in counts {
                        let total = sum.entry(rev).or_default();
                        *total = total.plus(&s);
                    }
                }
                self.peer_counts = sum;
            }
            Err(e) => self.log_state_error(e),
        }
    }

    async fn complete_rollout(&mut self, target: u64) {
        self.post_deploy(target).await;
        let ev = self.event(Change::ReleaseActive {}, Some(target), None);
        if let Err(e) = self
            .shared
            .state
            .set_outcome(
                &self.name,
                target,
                Outcome::Active,
                None,
                &ev,
                self.shared.fenced(),
            )
            .await
        {
            return self.log_state_error(e);
        }
        let releases = match self.shared.state.current_releases(&self.name).await {
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
                if let Err(e) = self
                    .shared
                    .state
                    .set_outcome(
                        &self.name,
                        r.revision,
                        Outcome::Superseded,
                        None,
                        &ev,
                        self.shared.fenced(),
                    )
                    .await
                {
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

    /// Release `target` failed, and the service is back on `previous`, in
    /// one transaction.
    async fn record_failure(
        &mut self,
        target: u64,
        previous: Option<u64>,
        reason: &str,
        automatic: bool,
        swap_us: Option<u64>,
        actor: Actor,
    ) {
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
            .fail_release(
                &self.name,
                target,
                reason,
                previous,
                &events,
                self.shared.fenced(),
            )
            .await
        {
            return self.log_state_error(e);
        }
        self.message = Some(format!("release {target} failed: {reason}"));
    }

    /// The service as stored now (not as the last pass read it: a request
    /// answers for what `kiln` just recorded), and whether its target
    /// release is still being rolled out.
    async fn target_pending(&self) -> Result<(crate::state::ServiceRecord, bool), ControllerError> {
        let rec = self
            .shared
            .state
            .service(&self.name)
            .await?
            .ok_or_else(|| ControllerError::NoService(self.name.clone()))?;
        let pending = self
            .shared
            .state
            .release(&self.name, rec.target)
            .await?
            .is_some_and(|r| r.outcome == Outcome::Pending);
        Ok((rec, pending))
    }

    /// `kiln promote`: only a blue-green rollout waiting for its switch,
    /// or a canary, can be promoted.
    async fn request_promotion(
        &mut self,
        actor: Actor,
    ) -> Result<(u64, Option<u32>), ControllerError> {
        self.leads()?;
        let (rec, pending) = self.target_pending().await?;
        let step = self
            .rollout
            .promote(rec.target, pending)
            .map_err(|_| ControllerError::NotWaitingForPromotion(self.name.clone()))?;
        let ev = self
            .event(Change::PromoteRequested { step }, Some(rec.target), None)
            .by(actor);
        if let Err(e) = self.shared.state.append_event(&ev).await {
            self.log_state_error(e);
        }
        // A pending promote survives a restart.
        self.save_rollout().await;
        Ok((rec.target, step))
    }

    /// A rollout request is the leader's: its controller holds the
    /// rollout (the others' do not follow it).
    fn leads(&self) -> Result<(), ControllerError> {
        let m = &self.shared.membership;
        // On its own it always leads; in a cluster, once its controller
        // took the rollout over (its first pass as the leader).
        if m.is_solo() || (m.is_leading() && self.leading) {
            return Ok(());
        }
        Err(ControllerError::NotLeader {
            node: m.node.clone(),
            leader: m.leader.borrow().clone(),
        })
    }

    /// `kiln abort`: only a rollout in progress with a release before it
    /// can be aborted. Decided on what is stored now (a request answers
    /// for what `kiln` just recorded).
    async fn request_abort(&mut self, actor: Actor) -> Result<(u64, u64), ControllerError> {
        self.leads()?;
        let (rec, _) = self.target_pending().await?;
        let target = rec.target;
        self.publish_observations().await;
        let Some(o) = self.observe().await else {
            return Err(ControllerError::NoService(self.name.clone()));
        };
        let d = rollout::abort(&self.rollout, &self.view(&o), actor).map_err(|e| match e {
            rollout::AbortRefused::NothingToAbort => ControllerError::NothingToAbort {
                service: self.name.clone(),
                revision: target,
            },
            rollout::AbortRefused::FirstRelease => ControllerError::FirstRelease {
                service: self.name.clone(),
                revision: target,
            },
        })?;
        let previous = o.previous.unwrap_or(target);
        self.execute(&o, d).await;
        self.save_rollout().await;
        Ok((target, previous))
    }
}

/// What a list of assignments reserves, by node (those that declare
/// something).
pub(crate) fn reservations(assigned: &[Assignment]) -> Vec<(String, Resources)> {
    assigned
        .iter()
        .filter(|a| !a.resources.is_none())
        .map(|a| (a.node.clone(), a.resources))
        .collect()
}

impl Drop for Controller {
    /// A service gone (or its agent handing over) reserves nothing more.
    fn drop(&mut self) {
        self.shared
            .reserved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
