//! kiln's agent (`kiln serve`): the daemon on each node.
//!
//! Start at [`serve`]. Then:
//! - [`supervisor`]: the process that holds the sockets and the instances'
//!   output pipes while agent processes come and go; [`keeper`] its side.
//! - [`agent`] (apply, status, history, rollback, remove, tokens) and
//!   [`api`] (the same over the Unix socket and TLS, with roles; [`gate`]
//!   its per-address limits), [`ui`] (the dashboard), [`remote`] (TLS,
//!   tokens), [`oci`] (the store as an OCI registry).
//! - [`controller`]: the per-service reconciler, carrying out
//!   `kiln_core::rollout` decisions; its rollout saved in the state store.
//! - [`instance`]: one instance's life — its output into its log
//!   (`instance::logs`), its probes (`instance::probe`); [`runtime`]:
//!   bubblewrap with its seccomp filter, the embedded OCI runtime (youki's
//!   libcontainer in kiln's own single-threaded shim), or a plain process.
//! - [`router`]: the listeners, routes and metrics.
//! - [`state`]: `ClusterState` (what a cluster shares: async, conditional,
//!   watched) and `NodeState` (this node's instances), their SQLite, etcd
//!   (`kiln serve --etcd`, [`open_state`]) and in-memory stores and their
//!   contract tests; [`ledger`]: the chain's checkpoints (each node's key listed) and
//!   verification; [`trust`]: the agent's signature policy.
//! - [`drift`]: watching and verifying image trees; [`gc`]: collecting the
//!   store and the logs.

pub mod acme;
pub(crate) mod agent;
pub(crate) mod api;
#[cfg(feature = "bench")]
pub mod bench;
pub mod cluster;
pub(crate) mod controller;
pub mod drift;
pub(crate) mod gate;
pub mod gc;
pub(crate) mod instance;
pub mod keeper;
pub mod ledger;
pub(crate) mod oci;
pub mod peers;
pub mod remote;
pub mod router;
pub(crate) mod runtime;
mod shared;
pub(crate) mod state;
pub mod supervisor;
pub mod trust;
pub(crate) mod ui;

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_core::health::Backoff;
use kiln_store::Store;
use tokio::signal::unix::{SignalKind, signal};

use crate::agent::Agent;
use crate::instance::StopKind;
use crate::state::SqliteState;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("another agent (pid {pid}) is already serving {home}")]
    AlreadyRunning { pid: String, home: PathBuf },
    #[error(transparent)]
    Peers(#[from] peers::PeerError),
    #[error(
        "cannot serve images to the other nodes on {addr} (is it this host's address? --advertise): {source}"
    )]
    Images {
        addr: std::net::IpAddr,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] kiln_store::StoreError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Agent(#[from] agent::AgentError),
    #[error(transparent)]
    Remote(#[from] remote::RemoteError),
    #[error(transparent)]
    Key(#[from] ledger::KeyError),
    #[error(transparent)]
    Trust(#[from] trust::TrustError),
    /// Started by a supervisor that is gone already.
    #[error("the supervisor that started this agent is gone: not serving unsupervised")]
    Orphaned,
}

/// How the agent ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// A stop signal: every instance was stopped gracefully.
    Graceful,
    /// A second signal cut the graceful stop short.
    Forced,
    /// A successor took over; every instance still runs.
    HandedOver,
}

/// The socket the CLI talks to.
pub fn socket_path(home: &Path) -> PathBuf {
    home.join("kiln.sock")
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ServeError + '_ {
    move |source| ServeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Bind the API socket at `sock` with mode 0600 from the start: it is made
/// in a fresh directory only the owner can enter, made 0600 there, and
/// only then moved into place (a socket bound where it belongs and
/// chmod-ed after is open to anyone in between).
fn bind_private(sock: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    let dir = sock.with_file_name(format!(".kiln.sock.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(io(&dir))?;
    let made = dir.join("kiln.sock");
    let bound = (|| {
        let listener = tokio::net::UnixListener::bind(&made)?;
        std::fs::set_permissions(&made, std::fs::Permissions::from_mode(0o600))?;
        // We hold the agent's lock, so a socket file left behind is stale:
        // the rename replaces it.
        std::fs::rename(&made, sock)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    bound.map_err(io(sock))
}

pub use runtime::oci::SHIM_ARG as OCI_SHIM_ARG;
pub use runtime::shim::main as oci_shim;
pub use runtime::{find_bwrap, oci_available};
pub use state::{ETCD_PREFIX, StateError};

/// Record a change made outside the agent (a bake, a pull) in the ledger
/// of `home`, by `actor`, when no agent runs there (one that runs takes
/// it through `POST /v1/records`): through the state store's API, as the
/// agent writes it (each event chained under the store's write lock).
pub async fn record(
    home: &Path,
    change: kiln_core::event::Change,
    actor: kiln_core::event::Actor,
) -> Result<(), StateError> {
    let state = open_state(home, cluster_of(home)?.as_ref()).await?;
    state
        .append_event(&state::NewEvent::node(change, actor))
        .await?;
    Ok(())
}

/// `kiln serve --etcd URL --node NAME`: the cluster's state in etcd.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClusterOptions {
    /// etcd's client URLs (`http://HOST:PORT`).
    pub etcd: Vec<String>,
    /// The key prefix of this cluster's state in etcd.
    pub prefix: String,
    /// This node's name (default: its host name).
    pub node: Option<String>,
    /// This node's address for the others (`--advertise`): its instances
    /// and its listeners without an IP are there.
    #[serde(default = "cluster::loopback")]
    pub advertise: std::net::IpAddr,
    /// This node's labels (`--label KEY=VALUE`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// TLS to etcd (`https://` URLs): its CA, and this node's client
    /// certificate and key when etcd asks for one.
    #[serde(default)]
    pub tls: Option<EtcdTls>,
}

/// `--etcd-ca FILE [--etcd-cert FILE --etcd-key FILE]`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: Option<(PathBuf, PathBuf)>,
}

/// Where a home remembers the cluster it was last served in, so that the
/// CLI's own records (a bake, a pull, `kiln gc`) go to the same state.
const CLUSTER_FILE: &str = "cluster.json";

/// The cluster the home was last served in (`None`: on its own).
pub fn cluster_of(home: &Path) -> Result<Option<ClusterOptions>, StateError> {
    let path = home.join(CLUSTER_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StateError::Decode {
                    what: "cluster.json",
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StateError::Open {
            path: path.display().to_string(),
            source: Box::new(e),
        }),
    }
}

/// Remember (or forget) the cluster the home is served in; written whole
/// or not at all (a temporary file renamed).
fn remember_cluster(home: &Path, cluster: Option<&ClusterOptions>) -> std::io::Result<()> {
    let path = home.join(CLUSTER_FILE);
    match cluster {
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
        Some(c) => {
            let tmp = home.join(format!(".{CLUSTER_FILE}.tmp"));
            std::fs::write(&tmp, serde_json::to_vec_pretty(c).unwrap_or_default())?;
            std::fs::rename(&tmp, &path)
        }
    }
}

/// The home's state store: SQLite (`state.db`) on its own; in a cluster,
/// the cluster's state in etcd with this node's instances in `state.db`.
pub async fn open_state(
    home: &Path,
    cluster: Option<&ClusterOptions>,
) -> Result<Arc<dyn state::StateStore>, StateError> {
    let local = SqliteState::open(&home.join("state.db"))?;
    Ok(match cluster {
        None => Arc::new(local),
        Some(c) => {
            Arc::new(state::EtcdState::connect(&c.etcd, &c.prefix, local, c.tls.as_ref()).await?)
        }
    })
}

/// How an agent process was started.
#[derive(Clone, Debug, Default)]
pub struct AgentMode {
    /// It replaces a running agent (a restart or an upgrade): it waits for
    /// that one to let go of the home instead of refusing to start.
    pub successor: bool,
    /// Collect the store when its blobs pass a size (`--gc-above`).
    pub gc: Option<gc::AutoGc>,
    /// Serve the API over TLS on this address too (`--api`).
    pub api: Option<ApiOptions>,
    /// Sign the ledger's head at least this often while it moves
    /// (`--checkpoint-every`; `None`: [`ledger::EVERY`]).
    pub checkpoint_every: Option<Duration>,
    /// The drift detector's full verification (`--verify-every`,
    /// `--verify-rate`).
    pub drift: drift::detector::Options,
    /// Services may run as plain processes (`--allow-runtime process`).
    pub allow_process: bool,
    /// The trust policy file (`--trust FILE`).
    pub trust: Option<std::path::PathBuf>,
    /// The cluster's state in etcd (`--etcd`); `None`: SQLite, on its own.
    pub cluster: Option<ClusterOptions>,
    /// What this node offers its instances (`--cpus`, `--memory`).
    pub offer: cluster::Offer,
}

/// `kiln serve --api ADDR [--tls-cert F --tls-key F]`.
#[derive(Clone, Debug)]
pub struct ApiOptions {
    pub addr: std::net::SocketAddr,
    pub cert: Option<remote::GivenCert>,
}

/// Run the agent on `home` until SIGTERM or SIGINT (stop everything), or
/// SIGUSR2 (hand over to a successor: stop accepting, leave every instance
/// running). `ready` is called once the socket accepts requests.
pub async fn serve(
    home: &Path,
    metrics: Option<std::net::SocketAddr>,
    mode: AgentMode,
    ready: impl FnOnce(&Path),
) -> Result<Exit, ServeError> {
    std::fs::create_dir_all(home).map_err(io(home))?;
    let keeper = Arc::new(keeper::Keeper::from_env().map_err(io(home))?);
    if keeper.supervised() {
        // The supervisor's end is ours too: if it dies, stop as if asked.
        let _ =
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM));
        // A supervisor that died before that call sends nothing: this
        // process was handed to init meanwhile. Stop now rather than run
        // unsupervised (nobody would stop it).
        if rustix::process::getppid().is_none_or(|p| p.as_raw_nonzero().get() == 1) {
            return Err(ServeError::Orphaned);
        }
    }
    // Traffic must not take the descriptors the API, probes and instances
    // need: the limit is raised before the router sizes its budget.
    let nofile = router::raise_nofile_limit();
    tracing::info!(
        "descriptor limit {nofile}: the router holds at most {} client connections",
        router::connection_budget(nofile)
    );
    // One agent per home: the lock is held for the agent's life. A
    // successor waits for its predecessor to let go.
    let lock_path = home.join("agent.lock");
    let mut lock = File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    // Started by a supervisor, an agent may find the previous one still
    // stopping (its supervisor was killed): it waits a little.
    let wait = match (mode.successor, keeper.supervised()) {
        (true, _) => SUCCESSOR_WAIT,
        (false, true) => Duration::from_secs(10),
        (false, false) => Duration::ZERO,
    };
    let waited = std::time::Instant::now();
    while lock.try_lock().is_err() {
        if waited.elapsed() >= wait {
            let mut pid = String::new();
            let _ = lock.read_to_string(&mut pid);
            return Err(ServeError::AlreadyRunning {
                pid: pid.trim().to_owned(),
                home: home.to_path_buf(),
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    lock.set_len(0).map_err(io(&lock_path))?;
    lock.rewind().map_err(io(&lock_path))?;
    write!(lock, "{}", std::process::id()).map_err(io(&lock_path))?;

    // A certificate that does not load stops the start, before anything runs.
    let api_tls = match &mode.api {
        Some(api) => Some(remote::tls(home, api.cert.as_ref(), api.addr)?),
        None => None,
    };
    // A trust policy that does not load stops the start too.
    let trust = mode
        .trust
        .as_deref()
        .map(trust::TrustPolicy::load)
        .transpose()?;
    let store = Store::open(home)?;
    let node_name = mode
        .cluster
        .as_ref()
        .and_then(|c| c.node.clone())
        .unwrap_or_else(shared::node_name);
    // The ledger's checkpoints are signed by the node's key.
    let node_key = Arc::new(ledger::NodeKey::load_or_create(home)?);
    // On its own: SQLite. In a cluster: etcd (this node's instances in
    // SQLite beside it), and the node a member under its lease.
    // In a cluster, the endpoint the other members pull images from, on
    // this node's address (its port registered with the membership).
    let mut images = None;
    let (state, membership): (Arc<dyn state::StateStore>, _) = match &mode.cluster {
        None => (open_state(home, None).await?, None),
        Some(c) => {
            let local = SqliteState::open(&home.join("state.db"))?;
            let etcd = Arc::new(
                state::EtcdState::connect(&c.etcd, &c.prefix, local, c.tls.as_ref()).await?,
            );
            let listener = tokio::net::TcpListener::bind((c.advertise, 0))
                .await
                .map_err(|source| ServeError::Images {
                    addr: c.advertise,
                    source,
                })?;
            let port = listener.local_addr().map_or(0, |a| a.port());
            let (tls, fingerprint) = peers::certificate(c.advertise)?;
            images = Some((listener, tls));
            let m = cluster::join(
                etcd.clone(),
                &node_name,
                &node_key.public(),
                (c.advertise, port, fingerprint),
                (c.labels.clone(), mode.offer),
                cluster::DEFAULT_TTL,
            )
            .await?;
            (etcd, Some(m))
        }
    };
    remember_cluster(home, mode.cluster.as_ref()).map_err(io(home))?;
    // Listed in the store: the checkpoints this node signs count for every
    // node that verifies the ledger.
    state.put_node_key(&node_name, &node_key.public()).await?;
    // The ledger is verified whole before anything is appended or signed
    // (a break is recorded, and the agent serves all the same).
    let ledger_health = Arc::new(ledger::Health::default());
    ledger::verify_own(&node_key, &*state, &ledger_health).await?;
    let verifier = (node_key.clone(), state.clone());
    let ledger_state: Arc<dyn state::ClusterState> = state.clone();
    let checkpoints = tokio::spawn(ledger::run(
        node_key.clone(),
        ledger_state.clone(),
        mode.checkpoint_every.unwrap_or(ledger::EVERY),
    ));
    let final_checkpoint = async move || {
        checkpoints.abort();
        if let Err(e) = node_key.checkpoint(&*ledger_state).await {
            tracing::error!("ledger checkpoint at stop: {e}");
        }
    };
    if let Some(auto) = mode.gc {
        tokio::spawn(gc::run(store.clone(), state.clone(), state.clone(), auto));
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id());
    let agent = Agent::start(
        home.to_path_buf(),
        store,
        state,
        Backoff::default(),
        seed,
        keeper.clone(),
        agent::Policy {
            allow_process: mode.allow_process,
            trust,
            ledger: ledger_health.clone(),
            node: Some(node_name),
            membership: membership.clone(),
            offer: mode.offer,
        },
    )
    .await?;
    if let Some((listener, tls)) = images {
        let read = oci::read_router(agent.store().clone());
        let app = peers::router(read, agent.pull_token());
        tokio::spawn(remote::serve(listener, tls, app));
    }
    // And again whole at every full verification of the trees.
    {
        let (key, state) = verifier;
        let health = ledger_health.clone();
        let every = mode.drift.verify_every;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = ledger::verify_own(&key, &*state, &health).await {
                    tracing::error!("ledger verification: {e}");
                }
            }
        });
    }
    tokio::spawn(agent.drift_detector(mode.drift).run());

    let sock = socket_path(home);
    let listener = match keeper.take("api") {
        // The socket the previous agent served (requests meanwhile waited
        // in its queue).
        Some(mut fds) if fds.len() == 1 && sock.exists() => {
            let std = std::os::unix::net::UnixListener::from(fds.remove(0));
            std.set_nonblocking(true).map_err(io(&sock))?;
            tokio::net::UnixListener::from_std(std).map_err(io(&sock))?
        }
        _ => {
            let l = bind_private(&sock)?;
            keeper.keep("api", &[std::os::fd::AsFd::as_fd(&l)]);
            l
        }
    };
    // What no one took belonged to instances gone while no agent ran.
    for name in keeper.left() {
        keeper.forget(&name);
    }

    let mut term = signal(SignalKind::terminate()).map_err(io(home))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io(home))?;
    let mut usr2 = signal(SignalKind::user_defined2()).map_err(io(home))?;
    // Each connection's peer credentials name who made the changes it asks for.
    let app = api::local_router(agent.clone()).into_make_service_with_connect_info::<api::Peer>();
    let server = tokio::spawn(axum::serve(listener, app).into_future());
    let api_server = match (&mode.api, api_tls) {
        (Some(api), Some(tls)) => {
            let listener = match keeper.take("api-tcp") {
                // The port the previous agent served: no connection refused
                // across a restart or an upgrade.
                Some(mut fds) if fds.len() == 1 => {
                    let std = std::net::TcpListener::from(fds.remove(0));
                    std.set_nonblocking(true).map_err(io(home))?;
                    tokio::net::TcpListener::from_std(std).map_err(io(home))?
                }
                _ => {
                    let l = tokio::net::TcpListener::bind(api.addr)
                        .await
                        .map_err(|source| remote::RemoteError::Bind {
                            addr: api.addr,
                            source,
                        })?;
                    keeper.keep("api-tcp", &[std::os::fd::AsFd::as_fd(&l)]);
                    l
                }
            };
            let local = listener.local_addr().map_err(io(home))?;
            tracing::info!("API on https://{local} (certificate {})", tls.fingerprint);
            Some(tokio::spawn(remote::serve(
                listener,
                tls.config,
                remote::router(agent.clone()),
            )))
        }
        _ => None,
    };
    let metrics_server = match metrics {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Io {
                    path: PathBuf::from(format!("metrics listener {addr}")),
                    source,
                })?;
            tracing::info!("metrics on http://{addr}/metrics");
            Some(tokio::spawn(
                axum::serve(l, api::metrics_router(agent.clone())).into_future(),
            ))
        }
        None => None,
    };
    ready(&sock);
    keeper.serving();
    tracing::info!("agent serving {}", sock.display());

    let hand_over = tokio::select! {
        _ = term.recv() => false,
        _ = int.recv() => false,
        _ = usr2.recv() => true,
    };
    server.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    if let Some(a) = api_server {
        a.abort();
    }
    if hand_over {
        tracing::info!(
            "handing over to a successor: no new connections; every instance keeps running"
        );
        agent.detach().await;
        // The successor may take the home now; this process only finishes
        // the requests it has.
        drop(lock);
        // Its requests finish, unless kiln is being stopped meanwhile.
        tokio::select! {
            () = agent.hand_over_traffic() => {}
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        final_checkpoint().await;
        if let Some(m) = &membership {
            m.leave().await;
        }
        tracing::info!("handed over");
        return Ok(Exit::HandedOver);
    }
    tracing::info!("stopping: no new requests; stopping instances (signal again to force)");
    let _ = std::fs::remove_file(&sock);
    keeper.forget("api");
    keeper.forget("api-tcp");
    let graceful = agent.shutdown(StopKind::Graceful, Duration::from_secs(600));
    let exit = tokio::select! {
        _ = graceful => Exit::Graceful,
        _ = term.recv() => Exit::Forced,
        _ = int.recv() => Exit::Forced,
    };
    if exit == Exit::Forced {
        tracing::warn!("forced: killing every instance");
        agent.shutdown(StopKind::Kill, Duration::from_secs(5)).await;
    }
    final_checkpoint().await;
    if let Some(m) = &membership {
        m.leave().await;
    }
    let _ = std::fs::remove_file(&lock_path);
    drop(lock);
    tracing::info!("agent stopped ({exit:?})");
    Ok(exit)
}

/// How long a successor waits for its predecessor to let go of the home.
const SUCCESSOR_WAIT: Duration = Duration::from_secs(120);
