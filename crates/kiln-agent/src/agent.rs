//! The agent: owns the state store, the store of images, and one
//! controller per service; answers the API's commands.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use kiln_core::api::{
    AbortResponse, RemoveResponse, RollbackResponse, TokenCreateRequest, TokenCreateResponse,
};
use kiln_core::api::{
    AgentInfo, ApplyRequest, ApplyResponse, HistoryResponse, ServiceStatus, StatusResponse,
};
use kiln_core::auth::{self, Role, TokenName, TokenRecord};
use kiln_core::event::{Actor, Change};
use kiln_core::health::Backoff;
use kiln_core::plan::{Action, CurrentService, plan};
use kiln_core::release::{Outcome, Release};
use kiln_core::service::{ProbeCheck, RuntimeKind};
use kiln_core::spec::ServiceName;
use kiln_store::Store;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::controller::{Controller, ControllerError, Msg};
use crate::instance::StopKind;
use crate::router::RouteKey;
use crate::runtime::{command_exists, find_bwrap, start_ticks};
use crate::shared::Shared;
use crate::state::{Guard, NewEvent, ServiceRecord, StateError};
use kiln_core::secret::Sealed;

/// Why a command was refused, with what it was about. Each variant is one
/// HTTP status (`api.rs` maps them, with no catch-all arm).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request itself is malformed: its body, its query, a name in it
    /// (the parser's own message).
    #[error("{0}")]
    BadRequest(String),
    #[error("no such API endpoint")]
    NoEndpoint,
    #[error("service {0} appears twice")]
    DuplicateService(ServiceName),
    #[error(
        "service {0}: runtime sandbox needs bubblewrap (`bwrap`), which is not installed on this node (apt-get install bubblewrap, or runtime = \"oci\")"
    )]
    NoBubblewrap(ServiceName),
    #[error(
        "service {0}: runtime oci needs the agent to run as root (it makes the container's namespaces and cgroups)"
    )]
    OciUnavailable(ServiceName),
    #[error(
        "service {0}: runtime process runs the app unconfined, which this agent does not allow (start it with `kiln serve --allow-runtime process`{hint})",
        hint = if *.1 { "" } else { ", or install bubblewrap" }
    )]
    ProcessNotAllowed(ServiceName, bool),
    #[error("service {0}: {1}")]
    BadUser(ServiceName, kiln_core::user::UserError),
    #[error(
        "service {service}: image {image_name}@{image} is refused by this agent's trust policy ({policy}): {why}",
        image = .image.short(), policy = .policy.display()
    )]
    Untrusted {
        service: ServiceName,
        image_name: String,
        image: kiln_core::Digest,
        policy: std::path::PathBuf,
        why: String,
    },
    #[error(
        "service {service}: image name `{image_name}` does not name {image} in this agent's store",
        image = .image.short()
    )]
    ImageNameMismatch {
        service: ServiceName,
        image_name: String,
        image: kiln_core::Digest,
    },
    #[error("the signatures of {0} cannot be read: {1}")]
    Signatures(kiln_core::Digest, String),
    #[error("the layers of {0} cannot be read: {1}")]
    Layers(kiln_core::Digest, String),
    /// A release task failed: what it was refused for has not happened.
    #[error(
        "service {service}: the {hook} hook of release {revision} failed ({status}): {what}; its output: kiln logs {service} --hook"
    )]
    HookFailed {
        service: ServiceName,
        hook: &'static str,
        revision: u64,
        status: String,
        what: &'static str,
    },
    /// The caller's role does not allow this part of a request.
    #[error("{0}")]
    Forbidden(String),
    #[error(
        "service {service}: image {image_name}@{image} is not in the store (collected by kiln gc, or never pulled: kiln pull, or apply its spec)"
    )]
    ImageMissing {
        service: ServiceName,
        image_name: String,
        image: kiln_core::Digest,
    },
    #[error("service {service}: cannot unpack its image: {source}")]
    Unpack {
        service: ServiceName,
        source: Box<kiln_store::tree::TreeError>,
    },
    #[error("service {service}: unpacking its image stopped: {source}")]
    Unpacker {
        service: ServiceName,
        source: tokio::task::JoinError,
    },
    #[error(
        "service {0}: no command: the image has no entrypoint or cmd and the service sets no command"
    )]
    NoCommand(ServiceName),
    /// The service's command, or an exec probe's (`probe`: its kind).
    #[error(
        "service {service}: {}command `{program}` does not exist in image {image}",
        probe.map_or(String::new(), |p| format!("{p} probe "))
    )]
    NoSuchCommand {
        service: ServiceName,
        probe: Option<&'static str>,
        program: String,
        image: String,
    },
    #[error(
        "service {service} is still rolling out release {revision} (started {started}); wait for it (kiln status {service}) and apply again"
    )]
    RolloutInProgress {
        service: ServiceName,
        revision: u64,
        started: String,
    },
    /// Two services would answer the same host and path on one address.
    #[error(transparent)]
    Route(#[from] Box<kiln_core::edge::RouteError>),
    #[error(transparent)]
    Listen(#[from] crate::router::ListenError),
    #[error("no service named {0}")]
    NoService(ServiceName),
    #[error(
        "service {service} has no instance {instance} (kiln status {service} lists them; logs are kept after an instance is gone)"
    )]
    NoInstance {
        service: ServiceName,
        instance: String,
    },
    #[error("release {revision} of {service} does not exist (it has releases 1 to {latest})")]
    NoRelease {
        service: ServiceName,
        revision: u64,
        latest: u64,
    },
    #[error("{0} has no earlier successful release to return to")]
    NothingToRollBackTo(ServiceName),
    #[error("{service} is on release {revision} already")]
    AlreadyOn { service: ServiceName, revision: u64 },
    /// `promote` / `abort` with no rollout to act on; `none` says what is
    /// missing (`is waiting for promotion`, …).
    #[error("no rollout of {service} {none}")]
    NoRollout {
        service: ServiceName,
        none: &'static str,
    },
    /// The service's controller refused (`promote`, `abort`).
    #[error(transparent)]
    Refused(ControllerError),
    #[error("cannot make the node's secret key: reading /dev/urandom: {0}")]
    Random(std::io::Error),
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error("a token named {0} exists (kiln token revoke {0} first)")]
    TokenExists(TokenName),
    #[error("no token named {0}")]
    NoToken(TokenName),
    /// `kiln drain` on an agent that is not in a cluster.
    #[error(
        "node {0} is on its own (no --etcd): drain moves instances to other nodes of a cluster"
    )]
    NotInCluster(String),
    #[error("no node {node} in the cluster (members: {members})")]
    NoNode { node: String, members: String },
    #[error("node {0} is the only node not drained: its instances would have nowhere to go")]
    LastNode(String),
    #[error("request body over the 2 MiB limit")]
    TooLarge,
    #[error("store collection: {0}")]
    Collect(#[from] crate::gc::GcError),
    /// A blocking task that panicked or was cancelled.
    #[error("an agent task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(transparent)]
    State(#[from] StateError),
}

pub struct Agent {
    shared: Arc<Shared>,
    controllers: Mutex<BTreeMap<ServiceName, mpsc::UnboundedSender<Msg>>>,
    shutting_down: std::sync::atomic::AtomicBool,
    bwrap: bool,
    /// This node can run the embedded OCI runtime (the agent is root).
    oci: bool,
    /// Seals secrets (`kiln_core::secret`): kept in the state store.
    secret_key: [u8; 32],
    /// Each ACME service's standing with its CA (for status).
    acme: Arc<crate::acme::Standings>,
}

/// What this agent allows, from its command line: plain processes
/// (`--allow-runtime process`) and which images (`--trust FILE`).
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub allow_process: bool,
    pub trust: Option<crate::trust::TrustPolicy>,
    /// Where the agent's ledger verifications report (made before the
    /// agent, which verifies its ledger before anything else).
    pub ledger: Arc<crate::ledger::Health>,
    /// This node's name (`kiln serve --node`); `None`: its host name.
    pub node: Option<String>,
    /// Its cluster (`kiln serve --etcd`); `None`: on its own.
    pub membership: Option<crate::cluster::Membership>,
    /// What it offers its instances on its own (`kiln serve --cpus
    /// --memory`; a cluster's member registers it when it joins).
    pub offer: crate::cluster::Offer,
}

/// Record the trust policy in the ledger when it differs from the last one
/// recorded (a first policy, a changed file, or none any more).
async fn record_trust_policy(shared: &Shared) -> Result<(), AgentError> {
    let now = match &shared.trust {
        Some(p) => Change::TrustPolicy {
            file: p.file.display().to_string(),
            require_signed: p.require_signed,
            allowed_signers: p.allowed.clone(),
        },
        None => Change::TrustPolicy {
            file: "none".to_owned(),
            require_signed: false,
            allowed_signers: Vec::new(),
        },
    };
    let last = shared
        .state
        .events_of(&["trust-policy"])
        .await?
        .pop()
        .map(|e| e.change);
    // An agent that never had a policy records nothing until it has one.
    let unchanged = match &last {
        Some(last) => last == &now,
        None => shared.trust.is_none(),
    };
    if !unchanged {
        if let Some(p) = &shared.trust {
            tracing::info!(
                "trust policy {}: {} allowed signer(s), signatures {}",
                p.file.display(),
                p.allowed.len(),
                if p.require_signed {
                    "required"
                } else {
                    "recorded"
                }
            );
        }
        shared
            .state
            .append_event(&NewEvent::node(now, Actor::Agent))
            .await?;
    }
    Ok(())
}

/// A one-off's end: `event` (its run) in the ledger, `then`, and how it
/// ended to its caller (`status` as the runtime words it).
async fn recorded_end(
    state: &dyn crate::state::ClusterState,
    event: &NewEvent,
    then: impl FnOnce(),
    tx: &tokio::sync::mpsc::Sender<kiln_core::api::RunFrame>,
    status: String,
    duration_ms: u64,
) {
    if let Err(e) = state.append_event(event).await {
        tracing::error!("{}: not recorded in the ledger: {e}", event.change.kind());
    }
    then();
    let _ = tx
        .send(kiln_core::api::RunFrame::Exited {
            code: kiln_core::api::exit_code(&status),
            status,
            duration_ms,
        })
        .await;
}

/// Write what the caller sends (`kiln run -i`) into a command's standard
/// input, as it comes; closed (end of input) when the caller's input ends.
fn feed_input(mut input: tokio::sync::mpsc::Receiver<Vec<u8>>, fd: std::os::fd::OwnedFd) {
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let Ok(mut pipe) = tokio::net::unix::pipe::Sender::from_owned_fd(fd) else {
            return;
        };
        while let Some(chunk) = input.recv().await {
            if pipe.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
}

/// A one-off's argv names a program (`usage`: how to give one).
fn needs_command(argv: &[String], usage: &str) -> Result<(), AgentError> {
    match argv.first() {
        Some(program) if !program.is_empty() => Ok(()),
        _ => Err(AgentError::BadRequest(format!(
            "a command is needed: {usage}"
        ))),
    }
}

/// The digest of a command's output, stdout and stderr as they came.
#[derive(Clone, Default)]
struct OutputDigest(Arc<std::sync::Mutex<sha2::Sha256>>);

impl OutputDigest {
    fn update(&self, bytes: &[u8]) {
        sha2::Digest::update(
            &mut *self.0.lock().unwrap_or_else(|p| p.into_inner()),
            bytes,
        );
    }

    fn finish(&self) -> kiln_core::Digest {
        kiln_core::Digest::from_hasher(self.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// Read a command's stdout and stderr (`output`, in that order) as they
/// come: each chunk into `digest` and to `tx` as an `Output` frame, until
/// the pipe ends or the caller is gone.
fn pump_output(
    output: Vec<std::os::fd::OwnedFd>,
    tx: &tokio::sync::mpsc::Sender<kiln_core::api::RunFrame>,
    digest: &OutputDigest,
) -> Vec<tokio::task::JoinHandle<()>> {
    output
        .into_iter()
        .zip([1u8, 2])
        .filter_map(|(fd, stream)| {
            let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(fd).ok()?;
            let (tx, digest) = (tx.clone(), digest.clone());
            Some(tokio::spawn(async move {
                use base64::Engine;
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; 16 << 10];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    digest.update(&buf[..n]);
                    let data = base64::engine::general_purpose::STANDARD.encode(&buf[..n]);
                    let frame = kiln_core::api::RunFrame::Output { stream, data };
                    if tx.send(frame).await.is_err() {
                        break;
                    }
                }
            }))
        })
        .collect()
}

/// 32 bytes from the kernel's random source.
fn random_key() -> Result<[u8; 32], AgentError> {
    use std::io::Read;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(AgentError::Random)?;
    Ok(key)
}

impl Agent {
    /// Start the agent on `home`: end what a previous agent left running,
    /// then start a controller for every known service.
    pub async fn start(
        home: PathBuf,
        store: Store,
        state: Arc<dyn crate::state::StateStore>,
        backoff: Backoff,
        seed: u64,
        keeper: Arc<crate::keeper::Keeper>,
        policy: Policy,
    ) -> Result<Arc<Self>, AgentError> {
        let mut shared = Shared::new(
            home,
            store,
            state,
            backoff,
            crate::router::Router::new(keeper.clone()),
            seed,
        )
        .with_keeper(keeper);
        shared
            .router
            .set_access_dir(shared.home.join("logs").join("access"));
        shared.allow_process = policy.allow_process;
        shared.trust = policy.trust;
        shared.ledger = policy.ledger;
        if let Some(node) = policy.node {
            shared.membership = crate::cluster::Membership::solo(&node, policy.offer);
            shared.node_name = node;
        }
        if let Some(m) = policy.membership {
            shared.node_name = m.node.clone();
            shared.membership = m;
        }
        record_trust_policy(&shared).await?;
        Self::start_on(Arc::new(shared)).await
    }

    /// Start the agent on what its controllers will share.
    pub(crate) async fn start_on(shared: Arc<Shared>) -> Result<Arc<Self>, AgentError> {
        // On its own, this agent leads from now on: a predecessor's late
        // writes of fleet decisions are refused. (A cluster's member takes
        // its fence when it wins the leadership.)
        if shared.membership.is_solo() {
            let fence = shared.state.lead().await?;
            shared.membership.set_fence(fence);
        }
        let secret_key = shared.state.secret_key(random_key()?).await?;
        let _ = shared.pull_token.set(crate::peers::pull_token(&secret_key));
        let agent = Arc::new(Self {
            secret_key,
            shared,
            controllers: Mutex::new(BTreeMap::new()),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            bwrap: find_bwrap().is_some(),
            oci: crate::runtime::oci_available(),
            acme: Arc::default(),
        });
        // Followed from here: what is recorded from now on wakes the
        // controllers that the loop below starts.
        let head = agent.shared.state.head().await?.map_or(0, |(seq, _)| seq);
        *agent
            .shared
            .drained
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = agent.shared.state.drained().await?;
        tokio::spawn(Self::follow(Arc::downgrade(&agent), head));
        tokio::spawn(Self::reload_certificates(Arc::downgrade(&agent)));
        tokio::spawn(Self::order_certificates(Arc::downgrade(&agent)));
        if !agent.shared.membership.is_solo() {
            tokio::spawn(Self::follow_membership(Arc::downgrade(&agent)));
        }
        let mut adopted = agent.adopt_or_end().await?;
        let services = agent.shared.state.services().await?;
        // Every service's share of each node, as the store has it, before
        // any controller places anything: the first placement of one
        // service already counts what the others hold.
        for svc in &services {
            if let Some(a) = agent.shared.state.assignments(&svc.name).await? {
                let mine = crate::controller::reservations(&a.list);
                if !mine.is_empty() {
                    agent
                        .shared
                        .reserved
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(svc.name.clone(), mine);
                }
            }
        }
        let mut waiting = Vec::new();
        for svc in &services {
            let mine = adopted.remove(&svc.name).unwrap_or_default();
            waiting.extend(mine.iter().map(|(r, _)| r.id.clone()));
            agent.start_controller(&svc.name, mine).await;
        }
        // Traffic comes back once the adopted instances answer their
        // probes again (clients wait in the accept queues meanwhile, which
        // this agent's listeners then serve): never a 503 for want of an
        // instance that is in fact running.
        let deadline = std::time::Instant::now() + ADOPTED_READY_WAIT;
        while !waiting.is_empty() && std::time::Instant::now() < deadline {
            let ready: std::collections::BTreeSet<String> = agent
                .shared
                .status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .flat_map(|s| s.instances.iter().filter(|i| i.ready).map(|i| i.id.clone()))
                .collect();
            waiting.retain(|id| !ready.contains(id));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Paused before the first request: a pause survives a restart.
        agent.refresh_paused().await;
        for svc in &services {
            if let Err(e) = agent.open_listeners(&svc.name, &svc.settings).await {
                tracing::error!("{e}");
            }
        }
        Ok(agent)
    }

    /// The instances an earlier agent process recorded. Those still
    /// running (same pid *and* start time) of a known service are adopted,
    /// by service: their controllers take them over with their pipes. The
    /// rest are recorded as lost (and a survivor of a forgotten service
    /// is killed).
    async fn adopt_or_end(
        &self,
    ) -> Result<BTreeMap<ServiceName, Vec<crate::controller::Adoptee>>, AgentError> {
        let services: std::collections::BTreeSet<ServiceName> = self
            .shared
            .state
            .services()
            .await?
            .into_iter()
            .map(|s| s.name)
            .collect();
        let mut adopted: BTreeMap<ServiceName, Vec<_>> = BTreeMap::new();
        for rec in self.shared.node.instances()? {
            let alive = rec.pid != 0 && start_ticks(rec.pid).is_some_and(|t| t == rec.start_ticks);
            if alive && services.contains(&rec.service) {
                // Its output pipes are taken now, before what nobody took
                // is let go (the controller adopts it a moment later).
                let output = self
                    .shared
                    .keeper
                    .take(&format!("log:{}", rec.id))
                    .unwrap_or_default();
                adopted
                    .entry(rec.service.clone())
                    .or_default()
                    .push((rec, output));
                continue;
            }
            if alive {
                crate::runtime::kill_group(rec.pid);
            }
            let ev = NewEvent {
                change: Change::InstanceLost {
                    reason: "the agent that ran it stopped without stopping it".to_owned(),
                    killed: alive,
                },
                actor: Actor::Agent,
                service: Some(rec.service.clone()),
                revision: Some(rec.revision),
                instance: Some(rec.id.clone()),
            };
            self.shared.node.remove_instance(&rec.id)?;
            self.shared.state.append_event(&ev).await?;
        }
        if self.shared.keeper.supervised() {
            let accounted: std::collections::BTreeSet<u32> =
                adopted.values().flatten().map(|(r, _)| r.pid).collect();
            sweep_orphans(&accounted);
        }
        Ok(adopted)
    }

    /// Start the controller of `name`, taking over `adopted`.
    async fn start_controller(&self, name: &ServiceName, adopted: Vec<crate::controller::Adoptee>) {
        let mut ctl = self.controllers.lock().await;
        let tx = ctl.entry(name.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let c = Controller::new(self.shared.clone(), name.clone(), rx).adopting(adopted);
            tokio::spawn(c.run());
            tx
        });
        let _ = tx.send(Msg::Wake);
    }

    /// Every controller looks again when this node starts or stops
    /// leading, or a member comes or goes (the leader re-places what a
    /// lost node ran). Ends with the agent.
    async fn follow_membership(agent: std::sync::Weak<Self>) {
        let Some(m) = agent.upgrade().map(|a| a.shared.membership.clone()) else {
            return;
        };
        let (mut leading, mut members) = (m.leading.clone(), m.members.clone());
        loop {
            tokio::select! {
                r = leading.changed() => if r.is_err() { return },
                r = members.changed() => if r.is_err() { return },
            }
            let Some(agent) = agent.upgrade() else {
                return;
            };
            for tx in agent.controllers.lock().await.values() {
                let _ = tx.send(Msg::Wake);
            }
        }
    }

    /// The HTTPS listeners read their certificate files again when they
    /// change (a renewal by certbot, say). Ends with the agent.
    async fn reload_certificates(agent: std::sync::Weak<Self>) {
        loop {
            tokio::time::sleep(crate::router::CERT_CHECK).await;
            let Some(router) = agent.upgrade().map(|a| a.shared.router.clone()) else {
                return;
            };
            router.reload_certificates().await;
        }
    }

    /// Certificates from ACME directories: ordered when missing or due,
    /// looked at every second (an order in progress holds the loop).
    /// Ends with the agent.
    async fn order_certificates(agent: std::sync::Weak<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some((home, router, standings)) = agent.upgrade().map(|a| {
                (
                    a.shared.home.clone(),
                    a.shared.router.clone(),
                    a.acme.clone(),
                )
            }) else {
                return;
            };
            let services = router.acme_services().await;
            if services.is_empty() {
                continue;
            }
            crate::acme::pass(
                &home,
                &router,
                services,
                &standings,
                std::time::SystemTime::now(),
            )
            .await;
        }
    }

    /// Controllers hear of what moves their service (an apply, a
    /// rollback) through the state store's watch, from the events after
    /// `after`: a change made through another agent of a cluster wakes
    /// them as one made here. Ends with the agent.
    async fn follow(agent: std::sync::Weak<Self>, mut after: u64) {
        loop {
            let Some(state) = agent.upgrade().map(|a| a.shared.state.clone()) else {
                return;
            };
            let events = match state.watch(after).await {
                Ok(events) => events,
                Err(e) => {
                    tracing::error!("state watch: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut moved = std::collections::BTreeSet::new();
            let (mut drains, mut pauses) = (false, false);
            for e in &events {
                after = after.max(e.seq);
                drains |= matches!(e.change, Change::NodeDrain { .. });
                pauses |= matches!(
                    e.change,
                    Change::ServicePaused { .. } | Change::ServiceResumed {}
                );
                if (e.change.moves_target() || matches!(e.change, Change::ServiceRemoved { .. }))
                    && let Some(service) = &e.service
                    && let Ok(name) = ServiceName::try_from(service.as_str())
                {
                    moved.insert(name);
                }
            }
            let Some(agent) = agent.upgrade() else {
                return;
            };
            // A drain made through any member: the leader moves instances.
            if drains {
                agent.refresh_drained().await;
            }
            // A pause or resume made through any member holds on every
            // node's router.
            if pauses {
                agent.refresh_paused().await;
            }
            for name in moved {
                // A service removed since is not brought back, and nothing
                // starts once shutdown began.
                if agent.shutting_down.load(Ordering::SeqCst) {
                    return;
                }
                match agent.shared.state.service(&name).await {
                    Ok(Some(rec)) => {
                        agent.start_controller(&name, Vec::new()).await;
                        // Applied through another member of a cluster: this
                        // node serves it on its own address too.
                        if let Err(e) = agent.open_listeners(&name, &rec.settings).await {
                            tracing::error!("{e}");
                        }
                    }
                    // Removed through another member: its listeners close
                    // here too (its instances stop with their assignments).
                    // On its own, a removal is this agent's, which closes
                    // them once the instances drained.
                    Ok(None) if !agent.shared.membership.is_solo() => {
                        agent.close_listeners(&name).await;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!("state: {e}"),
                }
            }
        }
    }

    pub fn info(&self) -> AgentInfo {
        AgentInfo {
            pid: std::process::id(),
            version: version(),
            home: self.shared.home.display().to_string(),
            sandbox_available: self.bwrap,
            oci_available: self.oci,
        }
    }

    /// A new release (apply, rollback) is refused once shutdown began: it
    /// would be recorded and never rolled out. (The API stops accepting
    /// first; this answers a request already in flight.)
    fn refuse_during_shutdown(&self) -> Result<(), AgentError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(AgentError::ShuttingDown);
        }
        Ok(())
    }

    /// Where a service's routes go: its own on its `listen` address (with
    /// its hosts and path prefix, and its certificate), its redirect to
    /// HTTPS on `tls.redirect_from` (the same hosts and prefix), its
    /// blue-green preview's on `preview_listen` (every host and path).
    fn routes_of(
        &self,
        name: &ServiceName,
        settings: &kiln_core::release::ServiceSettings,
    ) -> Vec<(RouteKey, crate::router::Attachment)> {
        use crate::router::Attachment;
        let m = &self.shared.membership;
        let mut out = Vec::new();
        if let Some(l) = settings.listen {
            let addr = m.listen_addr(l.0);
            // An ACME certificate is read from where the agent keeps it.
            let tls = settings.tls.clone().map(|mut t| {
                if t.acme.is_some() {
                    let (cert, key) = crate::acme::cert_paths(&self.shared.home, name);
                    t.cert = Some(cert.to_string_lossy().into_owned());
                    t.key = Some(key.to_string_lossy().into_owned());
                }
                t
            });
            out.push((
                RouteKey::Service(name.clone()),
                Attachment {
                    addr,
                    route: settings.route.clone(),
                    tls,
                    redirect_to: None,
                    h2c: settings.router.h2c,
                },
            ));
            if let Some(from) = settings.tls.as_ref().and_then(|t| t.redirect_from) {
                out.push((
                    RouteKey::Redirect(name.clone()),
                    Attachment {
                        addr: m.listen_addr(from.0),
                        route: settings.route.clone(),
                        tls: None,
                        redirect_to: Some(addr.port()),
                        h2c: false,
                    },
                ));
            }
        }
        if let Some(l) = settings.rollout.preview_listen {
            out.push((
                RouteKey::Preview(name.clone()),
                Attachment::plain(m.listen_addr(l.0)),
            ));
        }
        out
    }

    /// The one place a service's routes are attached (at start, and on
    /// apply): a listener opens on an address that has none. A route
    /// another service has is refused.
    async fn open_listeners(
        &self,
        name: &ServiceName,
        settings: &kiln_core::release::ServiceSettings,
    ) -> Result<(), AgentError> {
        let routes = self.routes_of(name, settings);
        for (key, to) in &routes {
            self.shared.router.attach(key, to.clone()).await?;
        }
        // A `listen` (or `preview_listen`, `tls.redirect_from`) the
        // settings no longer have.
        for key in [
            RouteKey::Service(name.clone()),
            RouteKey::Preview(name.clone()),
            RouteKey::Redirect(name.clone()),
        ] {
            if !routes.iter().any(|(k, _)| *k == key) {
                self.shared.router.detach(&key).await;
            }
        }
        Ok(())
    }

    /// Refuse, before anything changes, an apply after which two services
    /// would answer the same host and path on one address (those of this
    /// apply, and those the agent keeps running), naming both.
    fn check_routes(
        &self,
        desired: &[kiln_core::release::DesiredService],
        current: &BTreeMap<ServiceName, CurrentService>,
        the_plan: &kiln_core::plan::Plan,
    ) -> Result<(), AgentError> {
        let removed: std::collections::BTreeSet<&ServiceName> = the_plan
            .services
            .iter()
            .filter(|s| s.action == Action::Remove)
            .map(|s| &s.service)
            .collect();
        let kept = current
            .iter()
            .filter(|(name, c)| {
                !c.removed && !removed.contains(name) && !desired.iter().any(|d| &d.name == *name)
            })
            .map(|(name, c)| (name, &c.settings));
        let all = kept.chain(desired.iter().map(|d| (&d.name, &d.settings)));
        let attached: Vec<_> = all
            .flat_map(|(name, settings)| self.routes_of(name, settings))
            .collect();
        kiln_core::edge::check(
            attached
                .iter()
                .flat_map(|(key, to)| to.route.routes(key).into_iter().map(|r| (to.addr, r))),
        )
        .map_err(Box::new)?;
        kiln_core::edge::check_tls(
            attached
                .iter()
                .map(|(key, to)| (to.addr, key, to.tls.is_some())),
        )
        .map_err(Box::new)?;
        Ok(())
    }

    /// Seal a desired service's secret values into its release config:
    /// the release records only the digests (whatever the client sent as
    /// digests is replaced by what its values seal to).
    fn seal_secrets(&self, d: &mut kiln_core::release::DesiredService) {
        d.config.secrets.clear();
        for (name, value) in &d.secret_values {
            if d.config.env.contains_key(name) {
                // The image's env may name it (a default): the secret wins.
                d.config.env.remove(name);
            }
            d.config
                .secrets
                .insert(name.clone(), Sealed::seal(&self.secret_key, name, value));
        }
    }

    /// `kiln plan` (dry run) and `kiln apply`. Applies are not queued:
    /// each service is recorded only if its record is still at the
    /// version this apply read (else refused, naming it, with nothing of
    /// it written), and a service whose rollout is still in progress
    /// refuses a new release (naming it).
    pub async fn apply(
        &self,
        mut req: ApplyRequest,
        actor: Actor,
    ) -> Result<ApplyResponse, AgentError> {
        self.refuse_during_shutdown()?;
        let mut seen = std::collections::BTreeSet::new();
        for d in &mut req.services {
            if !seen.insert(d.name.clone()) {
                return Err(AgentError::DuplicateService(d.name.clone()));
            }
            // What names the host itself (a file the agent reads, a command
            // it runs unsandboxed) is for who is on the host: a token's
            // holder may deploy, never read the agent's files or run code
            // outside an instance.
            if let Actor::Token { name } = actor
                && let Some(t) = &d.settings.tls
                && let Some(key) = [
                    ("tls.cert", t.cert.is_some()),
                    ("tls.key", t.key.is_some()),
                    ("tls.acme_root", t.acme_root.is_some()),
                    ("tls.dns_hook", !t.dns_hook.is_empty()),
                ]
                .into_iter()
                .find_map(|(k, set)| set.then_some(k))
            {
                return Err(AgentError::Forbidden(format!(
                    "service {}: {key} names a file or command on the agent's host: only a caller on the agent's socket may set it, not token {name}",
                    d.name
                )));
            }
            let explicit = req.explicit_runtime.contains(&d.name);
            d.config.runtime = match (d.config.runtime, explicit) {
                (RuntimeKind::Sandbox, true) if !self.bwrap => {
                    return Err(AgentError::NoBubblewrap(d.name.clone()));
                }
                (RuntimeKind::Oci, _) if !self.oci => {
                    return Err(AgentError::OciUnavailable(d.name.clone()));
                }
                (RuntimeKind::Process, true) if !self.shared.allow_process => {
                    return Err(AgentError::ProcessNotAllowed(d.name.clone(), true));
                }
                (kind, true) => kind,
                (_, false) if self.bwrap => RuntimeKind::Sandbox,
                // No bubblewrap: the embedded OCI runtime, never plain
                // processes unless this agent allows them.
                (_, false) if self.oci => RuntimeKind::Oci,
                (_, false) if self.shared.allow_process => RuntimeKind::Process,
                (_, false) => {
                    return Err(AgentError::ProcessNotAllowed(d.name.clone(), false));
                }
            };
            if let Some(user) = &d.config.user {
                kiln_core::user::check(user).map_err(|e| AgentError::BadUser(d.name.clone(), e))?;
            }
            self.seal_secrets(d);
            if !self.shared.store.has_blob(&d.config.image) {
                return Err(AgentError::ImageMissing {
                    service: d.name.clone(),
                    image_name: d.config.image_name.clone(),
                    image: d.config.image.clone(),
                });
            }
            if !crate::trust::names_digest(
                &self.shared.store,
                &d.config.image_name,
                &d.config.image,
            ) {
                return Err(AgentError::ImageNameMismatch {
                    service: d.name.clone(),
                    image_name: d.config.image_name.clone(),
                    image: d.config.image.clone(),
                });
            }
            // The signers recorded are the ones this agent verified, never
            // the ones the client claims.
            d.signed_by =
                self.trusted(&d.name, &d.config.image_name, &d.config.image, &d.signed_by)?;
        }
        let mut current = BTreeMap::new();
        // Each service is recorded only if it is still as read here
        // (applies are not serialized: the first to write wins, a later one
        // is refused naming the service).
        let mut versions = BTreeMap::new();
        for rec in self.shared.state.services().await? {
            versions.insert(rec.name.clone(), rec.version);
            let release = self.shared.state.release(&rec.name, rec.target).await?;
            let latest = self.latest_revision(&rec.name).await?;
            current.insert(
                rec.name.clone(),
                CurrentService {
                    settings: rec.settings,
                    release: release.map(|r| (r.revision, r.config)),
                    latest,
                    removed: false,
                },
            );
        }
        // A desired service removed earlier: created anew, numbered past
        // the releases it keeps.
        for d in &req.services {
            if !current.contains_key(&d.name) {
                let latest = self.latest_revision(&d.name).await?;
                if latest > 0 {
                    current.insert(
                        d.name.clone(),
                        CurrentService {
                            settings: d.settings.clone(),
                            release: None,
                            latest,
                            removed: true,
                        },
                    );
                }
            }
        }
        // The pages come from the client: held to their limits here too.
        for d in &req.services {
            kiln_core::release::check_error_pages(&d.settings.error_pages)
                .map_err(|e| AgentError::BadRequest(format!("service {}: {e}", d.name)))?;
        }
        let the_plan = plan(&req.services, &current, req.prune);
        self.check_routes(&req.services, &current, &the_plan)?;
        if req.dry_run {
            return Ok(ApplyResponse { plan: the_plan });
        }
        // The values before the releases that name them: a release never
        // names a secret the store lacks.
        for d in &mut req.services {
            let values: Vec<_> = std::mem::take(&mut d.secret_values)
                .into_iter()
                .map(|(name, value)| (Sealed::seal(&self.secret_key, &name, &value), value))
                .collect();
            self.shared.state.put_secrets(&values).await?;
        }
        // Refuse what cannot run before recording anything.
        for (d, sp) in req.services.iter().zip(&the_plan.services) {
            if matches!(sp.action, Action::Create | Action::Release) {
                if let Some(rec) = self.shared.state.service(&d.name).await?
                    && let Some(r) = self.shared.state.release(&d.name, rec.target).await?
                    && r.outcome == Outcome::Pending
                {
                    return Err(AgentError::RolloutInProgress {
                        service: d.name.clone(),
                        revision: r.revision,
                        started: r.created,
                    });
                }
                self.check_runnable(d).await?;
            }
        }
        // Each new release's pre_deploy (a migration), before anything is
        // recorded or started: failing, nothing changed. Content that was
        // released before (a return to it, which may adopt its warm
        // instances) ran it then: not again.
        for (d, sp) in req.services.iter().zip(&the_plan.services) {
            if matches!(sp.action, Action::Create | Action::Release)
                && !d.config.hooks.pre_deploy.is_empty()
                && !self
                    .shared
                    .state
                    .releases(&d.name)
                    .await?
                    .iter()
                    .any(|r| r.hash == d.config.hash())
            {
                let release = Release::pending(
                    d.name.clone(),
                    sp.revision.unwrap_or(1),
                    d.config.clone(),
                    "apply".into(),
                    now(),
                );
                self.run_hook(
                    &d.name,
                    release,
                    "pre_deploy",
                    d.config.hooks.pre_deploy.clone(),
                    "the apply is refused and nothing changed",
                    actor,
                )
                .await?;
            }
        }
        // What `--prune` removes goes first: its address may be one a
        // service of this spec takes over.
        for sp in &the_plan.services {
            if sp.action == Action::Remove {
                self.remove_locked(&sp.service, actor).await?;
            }
        }
        // Every listener is bound before anything is recorded: a busy
        // address is refused with nothing changed.
        for d in &req.services {
            self.open_listeners(&d.name, &d.settings).await?;
        }
        for (d, sp) in req.services.iter().zip(&the_plan.services) {
            let revision = sp.revision.unwrap_or(1);
            let rec = ServiceRecord {
                name: d.name.clone(),
                settings: d.settings.clone(),
                target: revision,
                version: 0,
            };
            let guard = Guard::version(versions.get(&d.name).copied().unwrap_or(0));
            match sp.action {
                Action::Unchanged | Action::Remove | Action::LeftRunning => continue,
                Action::Settings => {
                    let ev = NewEvent::service(
                        Change::ServiceSettings {
                            changes: sp.changes.clone(),
                        },
                        &d.name,
                        Some(revision),
                    )
                    .by(actor);
                    self.shared
                        .state
                        .record_apply(&rec, None, &[ev], guard)
                        .await?;
                }
                Action::Create | Action::Release => {
                    let release = Release::pending(
                        d.name.clone(),
                        revision,
                        d.config.clone(),
                        "apply".into(),
                        now(),
                    );
                    let ev = NewEvent::service(
                        Change::ReleaseCreated {
                            image: d.config.image.clone(),
                            hash: release.hash.clone(),
                            changes: sp.changes.clone(),
                            signed_by: (!d.signed_by.is_empty()).then(|| d.signed_by.clone()),
                        },
                        &d.name,
                        Some(revision),
                    )
                    .by(actor);
                    self.shared
                        .state
                        .record_apply(&rec, Some(&release), &[ev], guard)
                        .await?;
                }
            }
        }
        Ok(ApplyResponse { plan: the_plan })
    }

    /// The highest revision a service ever had (0: none).
    async fn latest_revision(&self, name: &ServiceName) -> Result<u64, AgentError> {
        Ok(self
            .shared
            .state
            .current_releases(name)
            .await?
            .iter()
            .map(|r| r.revision)
            .max()
            .unwrap_or(0))
    }

    /// `kiln remove SERVICE`: stop every instance of the service
    /// gracefully (out of the routes, drained, stop signal), close its
    /// listeners, and forget it; its releases and events stay.
    pub async fn remove(
        &self,
        name: &ServiceName,
        actor: Actor,
    ) -> Result<RemoveResponse, AgentError> {
        self.refuse_during_shutdown()?;
        self.remove_locked(name, actor).await
    }

    /// [`remove`](Self::remove), the apply lock held.
    async fn remove_locked(
        &self,
        name: &ServiceName,
        actor: Actor,
    ) -> Result<RemoveResponse, AgentError> {
        let Some(rec) = self.shared.state.service(name).await? else {
            return Err(AgentError::NoService(name.clone()));
        };
        let ev = NewEvent::service(
            Change::ServiceRemoved {
                release: rec.target,
            },
            name,
            Some(rec.target),
        )
        .by(actor);
        self.shared
            .state
            .remove_service(name, &ev, Guard::version(rec.version))
            .await?;
        let ctl = self.controllers.lock().await.remove(name);
        let mut stopped = 0;
        if let Some(tx) = ctl {
            let (done, wait) = oneshot::channel();
            if tx.send(Msg::Remove { done }).is_ok() {
                stopped = wait.await.unwrap_or(0);
            }
        }
        self.close_listeners(name).await;
        self.shared
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        Ok(RemoveResponse {
            service: name.clone(),
            revision: rec.target,
            stopped,
        })
    }

    /// A removed service's listeners close and its routes go (its own and
    /// its blue-green preview's).
    async fn close_listeners(&self, name: &ServiceName) {
        for key in [
            RouteKey::Service(name.clone()),
            RouteKey::Preview(name.clone()),
            RouteKey::Redirect(name.clone()),
        ] {
            self.shared.router.detach(&key).await;
            self.shared.router.remove_routes(&key);
            self.shared.router.hold(&key, None);
        }
    }

    /// The image's tree exists and has the command and every exec probe's command.
    async fn check_runnable(
        &self,
        d: &kiln_core::release::DesiredService,
    ) -> Result<(), AgentError> {
        let store = self.shared.store.clone();
        let image = d.config.image.clone();
        let tree = tokio::task::spawn_blocking(move || store.materialize(&image))
            .await
            .map_err(|source| AgentError::Unpacker {
                service: d.name.clone(),
                source,
            })?
            .map_err(|source| AgentError::Unpack {
                service: d.name.clone(),
                source: Box::new(source),
            })?;
        let cfg = &d.config;
        let Some(program) = cfg.command.first() else {
            return Err(AgentError::NoCommand(d.name.clone()));
        };
        if !command_exists(&tree.rootfs, &cfg.env, cfg.workdir.as_str(), program) {
            return Err(AgentError::NoSuchCommand {
                service: d.name.clone(),
                probe: None,
                program: program.clone(),
                image: cfg.image_label(),
            });
        }
        for (kind, probe) in [
            ("startup", &cfg.health.startup),
            ("readiness", &cfg.health.readiness),
            ("liveness", &cfg.health.liveness),
        ] {
            if let Some(p) = probe
                && let ProbeCheck::Exec { command } = &p.check
                && let Some(program) = command.first()
                && !command_exists(&tree.rootfs, &cfg.env, cfg.workdir.as_str(), program)
            {
                return Err(AgentError::NoSuchCommand {
                    service: d.name.clone(),
                    probe: Some(kind),
                    program: program.clone(),
                    image: cfg.image_label(),
                });
            }
        }
        Ok(())
    }

    /// `kiln rollback`: a new release whose content is an earlier one's,
    /// rolled out like any other. A rollout in progress is abandoned (its
    /// release marked failed).
    pub async fn rollback(
        &self,
        name: &ServiceName,
        to: Option<u64>,
        actor: Actor,
    ) -> Result<RollbackResponse, AgentError> {
        self.refuse_during_shutdown()?;
        let mut rec = self
            .shared
            .state
            .service(name)
            .await?
            .ok_or_else(|| AgentError::NoService(name.clone()))?;
        let releases = self.shared.state.releases(name).await?;
        let current = rec.target;
        let guard = Guard::version(rec.version);
        let latest = releases.iter().map(|r| r.revision).max().unwrap_or(0);
        let source =
            match to {
                Some(n) => releases.iter().find(|r| r.revision == n).ok_or_else(|| {
                    AgentError::NoRelease {
                        service: name.clone(),
                        revision: n,
                        latest,
                    }
                })?,
                None => releases
                    .iter()
                    .rev()
                    .find(|r| {
                        r.revision != current
                            && matches!(r.outcome, Outcome::Active | Outcome::Superseded)
                    })
                    .ok_or_else(|| AgentError::NothingToRollBackTo(name.clone()))?,
            };
        if source.revision == current {
            return Err(AgentError::AlreadyOn {
                service: name.clone(),
                revision: current,
            });
        }
        let mut events = Vec::new();
        // A rollout in progress is abandoned: failed in the same
        // transaction that records the rollback.
        let abandoned = releases
            .iter()
            .find(|r| r.revision == current && r.outcome == Outcome::Pending)
            .map(|_| format!("rolled back by hand to release {}", source.revision));
        if let Some(reason) = &abandoned {
            events.push(
                NewEvent::service(
                    Change::ReleaseFailed {
                        reason: reason.clone(),
                    },
                    name,
                    Some(current),
                )
                .by(actor),
            );
        }
        // Its image may have been collected (`kiln gc` keeps only the last
        // releases): refused with nothing recorded, not a rollout that
        // never starts.
        if !self.shared.store.has_blob(&source.config.image) {
            return Err(AgentError::ImageMissing {
                service: name.clone(),
                image_name: source.config.image_name.clone(),
                image: source.config.image.clone(),
            });
        }
        // The policy in force now decides, not the one the release was
        // made under: an unsigned old release cannot come back once
        // signatures are required.
        self.trusted(name, &source.config.image_name, &source.config.image, &[])?;
        // The release being left undoes what it did (a down-migration),
        // before anything is recorded: failing, the rollback is refused.
        if let Some(leaving) = releases.iter().find(|r| r.revision == current)
            && !leaving.config.hooks.pre_rollback.is_empty()
        {
            self.run_hook(
                name,
                leaving.clone(),
                "pre_rollback",
                leaving.config.hooks.pre_rollback.clone(),
                "the rollback is refused and nothing changed",
                actor,
            )
            .await?;
        }
        let revision = latest + 1;
        let release = Release::pending(
            name.clone(),
            revision,
            source.config.clone(),
            format!("rollback to {}", source.revision),
            now(),
        );
        events.push(
            NewEvent::service(
                Change::Rollback {
                    from: current,
                    to: Some(source.revision),
                    automatic: false,
                    reason: None,
                    swap_us: None,
                },
                name,
                Some(revision),
            )
            .by(actor),
        );
        rec.target = revision;
        self.shared
            .state
            .record_rollback(
                &rec,
                &release,
                abandoned.as_deref().map(|reason| (current, reason)),
                &events,
                guard,
            )
            .await?;
        Ok(RollbackResponse {
            revision,
            from: current,
            to: source.revision,
        })
    }

    /// The signers of `image` this agent verified, or its refusal under
    /// the trust policy.
    fn trusted(
        &self,
        service: &ServiceName,
        image_name: &str,
        image: &kiln_core::Digest,
        claimed: &[String],
    ) -> Result<Vec<String>, AgentError> {
        let policy = self.shared.trust.as_ref();
        if let Some(p) = policy.filter(|p| p.require_self_contained)
            && !kiln_store::base::is_self_contained(&self.shared.store, image)
                .map_err(|e| AgentError::Layers(image.clone(), e.to_string()))?
        {
            return Err(AgentError::Untrusted {
                service: service.clone(),
                image_name: image_name.to_owned(),
                image: image.clone(),
                policy: p.file.clone(),
                why: crate::trust::NOT_SELF_CONTAINED.to_owned(),
            });
        }
        match crate::trust::decide(&self.shared.store, policy, image, claimed)
            .map_err(|e| AgentError::Signatures(image.clone(), e.to_string()))?
        {
            crate::trust::Verdict::Allowed(signers) => Ok(signers),
            crate::trust::Verdict::Refused(why) => Err(AgentError::Untrusted {
                service: service.clone(),
                image_name: image_name.to_owned(),
                image: image.clone(),
                policy: policy.map(|p| p.file.clone()).unwrap_or_default(),
                why,
            }),
        }
    }

    /// `kiln run`: `argv` in a one-off instance of a release of `name`
    /// (its sandbox, environment and secrets, volumes, user and limits, as
    /// its own instances have them), its output and then how it ended as
    /// [`RunFrame`](kiln_core::api::RunFrame)s. It takes no traffic and no
    /// slot. A caller that goes away ends it. Recorded in the ledger
    /// (`command-run`: argv, status, duration, the digest of its output).
    pub async fn run_command(
        &self,
        name: &ServiceName,
        revision: Option<u64>,
        argv: Vec<String>,
        input: Option<tokio::sync::mpsc::Receiver<Vec<u8>>>,
        actor: Actor,
    ) -> Result<tokio::sync::mpsc::Receiver<kiln_core::api::RunFrame>, AgentError> {
        use kiln_core::api::RunFrame;
        needs_command(&argv, "kiln run SERVICE -- CMD [ARG...]")?;
        let one = self
            .ask(
                name,
                |done| crate::controller::Msg::OneOff { revision, done },
                "runs no controller here",
            )
            .await?;
        let mut launch = one.launch;
        launch.argv = argv.clone();
        launch.stdin = input.is_some();
        let rt = one.runtime;
        rt.prepare(&one.id, &launch)
            .map_err(|e| AgentError::Refused(e.into()))?;
        let mut running = match rt.spawn(&one.id, &launch) {
            Ok(r) => r,
            Err(e) => {
                rt.clean_up(&one.id, &launch);
                return Err(AgentError::Refused(e.into()));
            }
        };
        if let (Some(input), Some(fd)) = (input, running.stdin()) {
            feed_input(input, fd);
        }
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let state = self.shared.state.clone();
        let (service, id, rev) = (name.clone(), one.id, one.revision);
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let _ = tx
                .send(RunFrame::Started {
                    id: id.clone(),
                    revision: rev,
                })
                .await;
            let digest = OutputDigest::default();
            let pumps = pump_output(running.output(), &tx, &digest);
            // The caller gone: the command goes too.
            let status = tokio::select! {
                status = running.wait() => status,
                () = tx.closed() => {
                    running.kill();
                    running.wait().await
                }
            };
            running.kill();
            for p in pumps {
                let _ = tokio::time::timeout(std::time::Duration::from_millis(500), p).await;
            }
            drop(running);
            rt.clean_up(&id, &launch);
            let duration_ms = started.elapsed().as_millis() as u64;
            let output = digest.finish();
            let event = NewEvent {
                change: Change::CommandRun {
                    argv,
                    status: status.clone(),
                    duration_ms,
                    output,
                },
                actor,
                service: Some(service),
                revision: Some(rev),
                instance: Some(id),
            };
            recorded_end(&*state, &event, || {}, &tx, status, duration_ms).await;
        });
        Ok(rx)
    }

    /// Run release task `hook` (`argv`) of `release` of `name`
    /// ([`crate::controller::hooks::run`]). `Err` when it did not exit 0
    /// (`what`: what that stops).
    async fn run_hook(
        &self,
        name: &ServiceName,
        release: Release,
        hook: &'static str,
        argv: Vec<String>,
        what: &'static str,
        actor: Actor,
    ) -> Result<(), AgentError> {
        use crate::controller::hooks::HookError;
        let revision = release.revision;
        crate::controller::hooks::run(&self.shared, name, release, hook, argv, actor)
            .await
            .map_err(|e| match e {
                HookError::Failed(status) => AgentError::HookFailed {
                    service: name.clone(),
                    hook,
                    revision,
                    status,
                    what,
                },
                HookError::Refused(e) => AgentError::Refused(e),
                HookError::State(e) => AgentError::State(e),
            })
    }

    /// `kiln exec`: `argv` inside this node's running instance `id` (its
    /// namespaces, user and environment, as an exec probe), streamed as
    /// `kiln run`'s. The instance is then **tainted**: replaced from its
    /// image as a drifted one is, unless `keep` (an admin's). Recorded in
    /// the ledger (`instance-exec`), whatever the command did.
    pub async fn exec_command(
        &self,
        id: &str,
        argv: Vec<String>,
        keep: bool,
        input: Option<tokio::sync::mpsc::Receiver<Vec<u8>>>,
        actor: Actor,
    ) -> Result<tokio::sync::mpsc::Receiver<kiln_core::api::RunFrame>, AgentError> {
        use kiln_core::api::RunFrame;
        needs_command(&argv, "kiln exec INSTANCE -- CMD [ARG...]")?;
        let service = self
            .shared
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(_, r)| r.instances.iter().any(|i| i.id == id))
            .map(|(name, _)| name.clone())
            .ok_or_else(|| {
                AgentError::BadRequest(format!(
                    "no instance {id} runs on this node (kiln status lists them)"
                ))
            })?;
        let (mut cmd, revision) = self
            .ask(
                &service,
                |done| crate::controller::Msg::Exec {
                    id: id.to_owned(),
                    argv: argv.clone(),
                    done,
                },
                "runs no controller here",
            )
            .await?;
        cmd.stdin(if input.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| AgentError::Refused(crate::runtime::RuntimeError::Spawn(e).into()))?;
        if let (Some(input), Some(fd)) = (
            input,
            child.stdin.take().and_then(|i| i.into_owned_fd().ok()),
        ) {
            feed_input(input, fd);
        }
        let output: Vec<std::os::fd::OwnedFd> = [
            child.stdout.take().and_then(|o| o.into_owned_fd().ok()),
            child.stderr.take().and_then(|e| e.into_owned_fd().ok()),
        ]
        .into_iter()
        .flatten()
        .collect();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let (state, drift) = (self.shared.state.clone(), self.shared.drift.clone());
        let id = id.to_owned();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let _ = tx
                .send(RunFrame::Started {
                    id: id.clone(),
                    revision,
                })
                .await;
            let digest = OutputDigest::default();
            let pumps = pump_output(output, &tx, &digest);
            let status = tokio::select! {
                s = child.wait() => s,
                () = tx.closed() => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
            for p in pumps {
                let _ = tokio::time::timeout(std::time::Duration::from_millis(500), p).await;
            }
            let duration_ms = started.elapsed().as_millis() as u64;
            let by = actor.to_string();
            let event = NewEvent {
                change: Change::InstanceExec {
                    argv,
                    status: status.clone(),
                    kept: keep,
                },
                actor,
                service: Some(service),
                revision: Some(revision),
                instance: Some(id.clone()),
            };
            // Once recorded: what ran inside may have changed it, so it is
            // replaced from its image, as drift is.
            let taint = || {
                if !keep {
                    drift.config_drifted(&id, vec![format!("tainted: kiln exec by {by}")]);
                }
            };
            recorded_end(&*state, &event, taint, &tx, status, duration_ms).await;
        });
        Ok(rx)
    }

    /// `kiln promote`: switch a blue-green rollout that waits for it.
    pub async fn promote(
        &self,
        name: &ServiceName,
        actor: Actor,
    ) -> Result<(u64, Option<u32>), AgentError> {
        self.ask(
            name,
            |done| Msg::Promote { actor, done },
            "is waiting for promotion",
        )
        .await
    }

    /// `kiln abort`: fail the rollout in progress; the service returns to
    /// the release before it (for a canary: in one route swap).
    pub async fn abort(
        &self,
        name: &ServiceName,
        actor: Actor,
    ) -> Result<AbortResponse, AgentError> {
        let (revision, back_to) = self
            .ask(
                name,
                |done| Msg::Abort { actor, done },
                "is in progress: nothing to abort",
            )
            .await?;
        Ok(AbortResponse { revision, back_to })
    }

    /// Put a request to `name`'s controller and wait for its answer; its
    /// refusal (or no controller) is a conflict: "no rollout of NAME {none}".
    async fn ask<T>(
        &self,
        name: &ServiceName,
        msg: impl FnOnce(oneshot::Sender<Result<T, ControllerError>>) -> Msg,
        none: &'static str,
    ) -> Result<T, AgentError> {
        if !self.knows(name).await? {
            return Err(AgentError::NoService(name.clone()));
        }
        let tx = self.controllers.lock().await.get(name).cloned();
        let Some(tx) = tx else {
            return Err(AgentError::NoRollout {
                service: name.clone(),
                none,
            });
        };
        let gone = || AgentError::ShuttingDown;
        let (done, answer) = oneshot::channel();
        tx.send(msg(done)).map_err(|_| gone())?;
        let answer = answer.await.map_err(|_| gone())?.map_err(|e| match e {
            ControllerError::State(e) => AgentError::State(e),
            refused => AgentError::Refused(refused),
        })?;
        let _ = tx.send(Msg::Wake);
        Ok(answer)
    }

    /// The drift detector, on this agent's store, state and board (the
    /// agent process starts it; tests of the controller do not).
    pub fn drift_detector(
        &self,
        options: crate::drift::detector::Options,
    ) -> crate::drift::detector::Detector {
        crate::drift::detector::Detector::new(
            self.shared.store.clone(),
            self.shared.state.clone(),
            self.shared.node.clone(),
            self.shared.drift.clone(),
            options,
        )
    }

    /// What the drift detector found, as controllers read it.
    #[cfg(test)]
    pub(crate) fn drift_board(&self) -> &Arc<crate::drift::Board> {
        &self.shared.drift
    }

    /// `kiln drift [SERVICE]`.
    pub fn drift(&self, service: Option<&ServiceName>) -> kiln_core::api::DriftResponse {
        self.shared.drift.report(service.map(ServiceName::as_str))
    }

    /// Router metrics plus service and rollout gauges, in Prometheus text.
    pub async fn render_metrics(&self, out: &mut String) -> Result<(), AgentError> {
        self.shared.router.metrics.render(out);
        self.shared.drift.render(out);
        self.shared.ledger.render(out);
        let status = self.status().await?;
        let services = &status.services;
        gauge(
            out,
            "kiln_service_revision",
            "The release each service is on or moving to.",
            services,
            |s| s.revision.unwrap_or(0),
        );
        gauge(
            out,
            "kiln_service_ready_instances",
            "Ready instances of the service's release.",
            services,
            |s| s.ready.into(),
        );
        gauge(
            out,
            "kiln_service_replicas",
            "Instances the service's spec asks for.",
            services,
            |s| s.replicas.into(),
        );
        gauge(
            out,
            "kiln_rollout_in_progress",
            "1 while a service's release is being rolled out.",
            services,
            |s| u64::from(s.outcome == Some(Outcome::Pending)),
        );
        gauge(
            out,
            "kiln_rollout_stalled",
            "1 while a rollout is past its progress deadline with no release to return to.",
            services,
            |s| u64::from(s.stalled),
        );
        gauge(
            out,
            "kiln_canary_weight",
            "Percent of requests the router sends to a service's canary (0 when none).",
            services,
            |s| s.canary.as_ref().map_or(0, |c| c.weight.into()),
        );
        gauge(
            out,
            "kiln_canary_step",
            "The canary's current step, 1-based (0 when none).",
            services,
            |s| s.canary.as_ref().map_or(0, |c| c.step.into()),
        );
        Ok(())
    }

    /// Every service's status from one view: what its controller last
    /// saw, joined with its settings and releases as stored now.
    pub async fn status(&self) -> Result<StatusResponse, AgentError> {
        let seen = self
            .shared
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let now = SystemTime::now();
        let mut services = Vec::new();
        let paused = self.shared.state.paused().await?;
        for rec in self.shared.state.services().await? {
            let releases = self.shared.state.current_releases(&rec.name).await?;
            let mut status = ServiceStatus::of(
                &rec.name,
                &rec.settings,
                rec.target,
                &releases,
                seen.get(&rec.name),
                now,
            );
            if rec.settings.tls.as_ref().is_some_and(|t| t.acme.is_some()) {
                let standing = self
                    .acme
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&rec.name)
                    .cloned()
                    .unwrap_or_default();
                status.certificate = Some(standing.describe());
            }
            status.paused_ms = paused.get(&rec.name).copied();
            services.push(status);
        }
        Ok(StatusResponse {
            agent: self.info(),
            services,
        })
    }

    pub async fn history(&self, service: &ServiceName) -> Result<HistoryResponse, AgentError> {
        // Releases first, then the service: a release failed and its
        // rollback target are one transaction, so this order never pairs a
        // failed release with the target it replaced.
        let releases = self.shared.state.releases(service).await?;
        match self.shared.state.service(service).await? {
            Some(rec) => Ok(HistoryResponse {
                releases,
                target: rec.target,
                removed: false,
            }),
            // Removed: its history stays; it was on its newest active
            // release (else its newest).
            None => {
                let on = releases
                    .iter()
                    .rev()
                    .find(|r| r.outcome == Outcome::Active)
                    .or(releases.last())
                    .map(|r| r.revision)
                    .ok_or_else(|| AgentError::NoService(service.clone()))?;
                Ok(HistoryResponse {
                    releases,
                    target: on,
                    removed: true,
                })
            }
        }
    }

    pub fn home(&self) -> &std::path::Path {
        &self.shared.home
    }

    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// The node's key: it seals secrets and derives the dashboard's
    /// anti-forgery values.
    pub(crate) fn key(&self) -> &[u8; 32] {
        &self.secret_key
    }

    /// Make an API token: its secret from the kernel's random source, only
    /// its hash kept. The token is returned this once.
    pub async fn create_token(
        &self,
        req: &TokenCreateRequest,
        now: u64,
        actor: Actor,
    ) -> Result<TokenCreateResponse, AgentError> {
        let token = auth::make_token(req.name, &random_key()?);
        let record = TokenRecord {
            name: req.name,
            role: req.role,
            hash: auth::token_hash(&token),
            created: now,
            expires: req.expires_in.map(|s| now.saturating_add(s)),
        };
        let event = NewEvent::node(
            Change::TokenCreated {
                name: req.name,
                role: req.role,
                expires: record.expires,
            },
            actor,
        );
        if !self.shared.state.put_token(&record, &event).await? {
            return Err(AgentError::TokenExists(req.name));
        }
        Ok(TokenCreateResponse { token, record })
    }

    /// A bake or pull the CLI made into this agent's store, in the ledger
    /// by `actor` (`POST /v1/records`). Nothing else comes from clients,
    /// and only for an image the store holds: a record names what is here.
    pub async fn record(&self, change: Change, actor: Actor) -> Result<u64, AgentError> {
        let digest = match &change {
            Change::ImageBaked { digest, .. } | Change::ImagePulled { digest, .. } => digest,
            other => {
                return Err(AgentError::BadRequest(format!(
                    "a client records only image-baked and image-pulled, not {}",
                    other.kind()
                )));
            }
        };
        if !self.shared.store.has_blob(digest) {
            return Err(AgentError::BadRequest(format!(
                "image {} is not in this agent's store: only what was baked or pulled into it is recorded",
                digest.short()
            )));
        }
        Ok(self
            .shared
            .state
            .append_event(&NewEvent::node(change, actor))
            .await?)
    }

    /// Collect the store (`POST /v1/gc`), off the async threads.
    pub async fn collect(
        &self,
        keep_releases: usize,
        grace: Duration,
        dry_run: bool,
    ) -> Result<kiln_store::gc::GcReport, AgentError> {
        let keep = crate::gc::keep(&*self.shared.state, &*self.shared.node, keep_releases)
            .await
            .map_err(|e| AgentError::Collect(e.into()))?;
        let store = self.shared.store.clone();
        tokio::task::spawn_blocking(move || crate::gc::collect(&store, keep, grace, dry_run))
            .await?
            .map_err(AgentError::Collect)
    }

    /// The ledger after entry `after`, its checkpoints, the node's key and
    /// every key the store lists (a cluster's nodes each sign).
    pub async fn audit(&self, after: u64) -> Result<kiln_core::api::AuditResponse, AgentError> {
        let key = std::fs::read_to_string(self.shared.home.join("node.pub"))
            .map(|k| k.trim().to_owned())
            .unwrap_or_default();
        let keys = self
            .shared
            .state
            .node_keys()
            .await?
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        Ok(kiln_core::api::AuditResponse {
            key,
            keys,
            entries: self.shared.state.ledger(after).await?,
            checkpoints: self.shared.state.checkpoints().await?,
        })
    }

    /// The cluster's members as this node sees them, with the instances
    /// assigned to each.
    pub async fn nodes(&self) -> Result<kiln_core::api::NodesResponse, AgentError> {
        let m = &self.shared.membership;
        let mut assigned: BTreeMap<String, u64> = BTreeMap::new();
        let mut reserved: BTreeMap<String, kiln_core::resources::Amount> = BTreeMap::new();
        for svc in self.shared.state.services().await? {
            for a in self
                .shared
                .state
                .assignments(&svc.name)
                .await?
                .map(|a| a.list)
                .unwrap_or_default()
            {
                let r = reserved.entry(a.node.clone()).or_default();
                *r = r.plus(&a.resources);
                if a.stop.is_none() {
                    *assigned.entry(a.node).or_default() += 1;
                }
            }
        }
        let leader = m.leader.borrow().clone();
        let drained = self.shared.state.drained().await?;
        let leases = self.shared.state.member_leases().await?;
        let nodes = m
            .members
            .borrow()
            .values()
            .map(|n| kiln_core::api::NodeStatus {
                name: n.name.clone(),
                version: n.version.clone(),
                joined: n.joined.clone(),
                leader: leader.as_deref() == Some(n.name.as_str()),
                instances: assigned.get(&n.name).copied().unwrap_or(0),
                address: n.address.to_string(),
                drained: drained.contains(&n.name),
                labels: n.labels.clone(),
                cpus: n.cpus,
                memory_mib: n.memory_mib,
                lease: leases.get(&n.name).copied(),
                reserved: reserved.get(&n.name).map_or_else(Default::default, |r| {
                    kiln_core::resources::Resources {
                        cpu_millis: u32::try_from(r.cpu_millis).unwrap_or(u32::MAX),
                        memory_bytes: r.memory_bytes,
                        // Not reserved: a limit only.
                        pids: 0,
                    }
                }),
            })
            .collect();
        Ok(kiln_core::api::NodesResponse {
            cluster: !m.is_solo(),
            this: m.node.clone(),
            leader,
            nodes,
        })
    }

    /// `kiln drain NODE` (`drained`) or `kiln undrain NODE`: recorded in
    /// the cluster's state, where the leader reads it: a drained node
    /// takes no new instance, and each of its instances is replaced on
    /// another node before it stops (zero failed requests, as a drifted
    /// one is replaced).
    pub async fn drain(
        &self,
        node: &str,
        drained: bool,
        actor: Actor,
    ) -> Result<kiln_core::api::DrainResponse, AgentError> {
        let m = &self.shared.membership;
        if m.is_solo() {
            return Err(AgentError::NotInCluster(m.node.clone()));
        }
        let members = m.member_names();
        let known = self.shared.state.drained().await?;
        if drained {
            if !members.iter().any(|n| n == node) {
                return Err(AgentError::NoNode {
                    node: node.to_owned(),
                    members: members.join(", "),
                });
            }
            if members.iter().all(|n| n == node || known.contains(n)) {
                return Err(AgentError::LastNode(node.to_owned()));
            }
        }
        let event = NewEvent::node(
            Change::NodeDrain {
                node: node.to_owned(),
                drained,
            },
            actor,
        );
        self.shared.state.set_drained(node, drained, &event).await?;
        self.refresh_drained().await;
        let instances = self
            .nodes()
            .await?
            .nodes
            .iter()
            .find(|n| n.name == node)
            .map_or(0, |n| n.instances);
        Ok(kiln_core::api::DrainResponse {
            node: node.to_owned(),
            drained,
            instances,
        })
    }

    /// The cluster's node-to-node pull password.
    pub fn pull_token(&self) -> String {
        self.shared.pull_token.get().cloned().unwrap_or_default()
    }

    /// `kiln pause SERVICE` (`Some(timeout_ms)`) or `kiln resume SERVICE`
    /// (`None`): recorded in the state store (a restart and every node
    /// keep it), then held by this node's router.
    pub async fn pause(
        &self,
        name: &ServiceName,
        timeout_ms: Option<u64>,
        actor: Actor,
    ) -> Result<kiln_core::api::PauseResponse, AgentError> {
        if self.shared.state.service(name).await?.is_none() {
            return Err(AgentError::NoService(name.clone()));
        }
        let change = match timeout_ms {
            Some(timeout_ms) => Change::ServicePaused { timeout_ms },
            None => Change::ServiceResumed {},
        };
        let event = NewEvent {
            actor,
            ..NewEvent::service(change, name, None)
        };
        let changed = self
            .shared
            .state
            .set_paused(name, timeout_ms, &event)
            .await?;
        self.refresh_paused().await;
        Ok(kiln_core::api::PauseResponse {
            service: name.to_string(),
            paused: timeout_ms.is_some(),
            timeout_ms,
            changed,
        })
    }

    /// Read the paused services again and hold exactly those at the router.
    async fn refresh_paused(&self) {
        match self.shared.state.paused().await {
            Ok(p) => self.shared.router.set_paused(&p),
            Err(e) => tracing::error!("state: {e}"),
        }
    }

    /// Read the drained nodes again and wake every controller (the leader
    /// moves what runs there).
    async fn refresh_drained(&self) {
        match self.shared.state.drained().await {
            Ok(d) => {
                *self
                    .shared
                    .drained
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = d
            }
            Err(e) => tracing::error!("state: {e}"),
        }
        for tx in self.controllers.lock().await.values() {
            let _ = tx.send(Msg::Wake);
        }
    }

    /// The events after sequence number `after` (the dashboard's feed).
    pub async fn events(&self, after: u64) -> Result<Vec<crate::state::Event>, AgentError> {
        Ok(self.shared.state.events(after).await?)
    }

    pub async fn tokens(&self) -> Result<Vec<TokenRecord>, AgentError> {
        Ok(self.shared.state.tokens().await?)
    }

    pub async fn revoke_token(&self, name: TokenName, actor: Actor) -> Result<(), AgentError> {
        let event = NewEvent::node(Change::TokenRevoked { name }, actor);
        if self.shared.state.revoke_token(&name, &event).await? {
            Ok(())
        } else {
            Err(AgentError::NoToken(name))
        }
    }

    /// The role a presented token carries, checked against its record.
    pub async fn authenticate(
        &self,
        token: &str,
        now: u64,
    ) -> Result<(TokenName, Role), auth::Refusal> {
        let name = auth::token_name(token).ok_or(auth::Refusal::Invalid)?;
        let record = self.shared.state.token(&name).await.map_err(|e| {
            tracing::error!("reading token {name}: {e}");
            auth::Refusal::Invalid
        })?;
        auth::check_token(token, record.as_ref(), now).map(|role| (name, role))
    }

    /// Whether the service exists or existed (a removed one keeps its
    /// history and logs).
    pub async fn knows(&self, service: &ServiceName) -> Result<bool, AgentError> {
        Ok(self.shared.state.service(service).await?.is_some()
            || self.latest_revision(service).await? > 0)
    }

    /// Stop every instance (gracefully, or killed when `kind` says so) and
    /// wait for them, at most `limit`.
    pub async fn shutdown(&self, kind: StopKind, limit: Duration) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.shared.router.close().await;
        let ctls: Vec<_> = self.controllers.lock().await.values().cloned().collect();
        let mut waits = Vec::new();
        for tx in ctls {
            let (done, wait) = oneshot::channel();
            if tx.send(Msg::Shutdown { kind, done }).is_ok() {
                waits.push(wait);
            }
        }
        let _ = tokio::time::timeout(limit, async {
            for w in waits {
                let _ = w.await;
            }
        })
        .await;
    }
}

impl Agent {
    /// Hand over to a successor, first half: stop accepting (clients wait
    /// in the accept queues, which the successor serves next), and let go
    /// of every instance without stopping it (each keeps its pid, its
    /// record and its output pipes, which the supervisor holds).
    pub async fn detach(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.shared.router.stop_accepting().await;
        let ctls: Vec<_> = self.controllers.lock().await.values().cloned().collect();
        let mut waits = Vec::new();
        for tx in ctls {
            let (done, wait) = oneshot::channel();
            if tx.send(Msg::Detach { done }).is_ok() {
                waits.push(wait);
            }
        }
        for w in waits {
            let _ = w.await;
        }
    }

    /// Second half: the connections this process has finish their
    /// current exchanges (at most 30 s).
    pub async fn hand_over_traffic(&self) {
        self.shared.router.drain(Duration::from_secs(30)).await;
    }
}

/// End the supervisor's children that no agent accounts for: the inner
/// processes of an instance whose outer process died together with the
/// agent (a sandbox's reaper runs in a session of its own, and is
/// reparented to the supervisor, the subreaper). Agents (`kiln serve
/// --agent`) and the instances being adopted are left alone.
fn sweep_orphans(accounted: &std::collections::BTreeSet<u32>) {
    let supervisor = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get() as u32);
    let me = std::process::id();
    if supervisor <= 1 {
        return;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me || accounted.contains(&pid) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // Field 4, after the parenthesized command name.
        let parent = stat
            .rfind(')')
            .and_then(|i| stat[i + 2..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if parent != Some(supervisor) {
            continue;
        }
        // An agent (`kiln serve --agent`, whatever the binary is called),
        // or one the supervisor is starting (forked, not yet exec'd: its
        // command line is still the supervisor's `kiln serve`). Never one
        // whose command line reads empty: a process exiting (an agent that
        // just handed over reads so) — ending it would end its children,
        // the very instances being adopted.
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if cmdline.is_empty() || args.get(1) == Some(&b"serve".as_slice()) {
            continue;
        }
        tracing::warn!("ending process {pid}: left by a dead agent, no instance of it is recorded");
        crate::runtime::kill_group(pid);
    }
}

/// Stamped into the binary as is: a release process (or a test that needs
/// "another build" of the same source) may patch the 16 characters after
/// the colon in place, and `kiln status` reports them.
static BUILD_ID: &str = "kiln-build-id:0000000000000000";

/// This build's version: the package's, plus its build id when stamped.
pub fn version() -> String {
    // black_box: the id is read from the binary at run time, never folded.
    let id = std::hint::black_box(BUILD_ID).trim_start_matches("kiln-build-id:");
    if id.bytes().all(|b| b == b'0') {
        env!("CARGO_PKG_VERSION").to_owned()
    } else {
        format!("{}+{id}", env!("CARGO_PKG_VERSION"))
    }
}

/// How long a new agent process waits for the instances it adopted to
/// answer their probes before it serves traffic anyway.
const ADOPTED_READY_WAIT: Duration = Duration::from_secs(10);

/// The time a release is recorded, RFC 3339 to the second.
fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// One gauge with a sample per service, in Prometheus text.
fn gauge(
    out: &mut String,
    name: &str,
    help: &str,
    services: &[ServiceStatus],
    value: fn(&ServiceStatus) -> u64,
) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for s in services {
        let _ = writeln!(out, "{name}{{service=\"{}\"}} {}", s.name, value(s));
    }
}
