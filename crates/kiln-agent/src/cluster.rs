//! A node's place in its cluster: who is a member, who leads, and this
//! node's leadership fence. On its own (SQLite) a node is the only member
//! and always leads ([`Membership::solo`]). With `kiln serve --etcd` it
//! registers under an etcd **lease** (kept alive; the key goes when the
//! node stops renewing it), watches the other members, and **campaigns**
//! for the `leader` key under the same lease: the one that holds it runs
//! the fleet decisions, with a fence taken when it won
//! ([`crate::state::ClusterState::lead`]), so a deposed leader's late
//! writes are refused. A node that cannot renew its lease for a whole TTL
//! stops leading (it may have lost it) and joins again when etcd answers.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::state::{Etcd, Fence, StateError};

/// The lease's time to live when none is given: a node gone this long is
/// gone (and its slots start elsewhere).
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);

/// A member as it registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    /// kiln's version on it.
    pub version: String,
    /// When its agent joined (RFC 3339).
    pub joined: String,
    /// Its node key (`ed25519 HEX`): the same home's next agent (an
    /// upgrade) takes the name over; another home's is refused it.
    #[serde(default)]
    pub key: String,
    /// Its advertised address: where its instances and listeners are.
    #[serde(default = "loopback")]
    pub address: IpAddr,
    /// The port of its image endpoint for the other members
    /// ([`crate::peers`]) on that address (0: none).
    #[serde(default)]
    pub images: u16,
    /// That endpoint's certificate fingerprint (`sha256:HEX`): the only
    /// one the others accept there.
    #[serde(default)]
    pub images_cert: String,
    /// Its capacity: CPUs and memory (MiB) as the host has them.
    #[serde(default)]
    pub cpus: u32,
    #[serde(default)]
    pub memory_mib: u64,
    /// Its labels (`kiln serve --label KEY=VALUE`): a service's
    /// `node_labels` picks the nodes its instances may run on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// What a node offers its instances (`kiln serve --cpus N --memory SIZE`):
/// by default, the host's CPUs and memory. The leader places an instance
/// on a node only while what its release declares (`cpu`, `memory`) fits
/// in what the node offers less what its other instances declared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
}

impl Offer {
    /// The CPUs offered: the given number, else the host's.
    pub fn cpus(&self) -> u32 {
        self.cpus.unwrap_or_else(cpus)
    }

    /// The memory offered (MiB): the given amount, else the host's.
    pub fn memory_mib(&self) -> u64 {
        self.memory_mib.unwrap_or_else(memory_mib)
    }
}

/// An address on its own: loopback.
pub(crate) fn loopback() -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
}

/// What the agent reads of its cluster.
#[derive(Clone, Debug)]
pub struct Membership {
    /// This node's name.
    pub node: String,
    /// This node's address (loopback on its own): its instances listen
    /// there, and so do its listeners that name no IP.
    pub address: IpAddr,
    /// Whether this node runs the fleet decisions now.
    pub leading: watch::Receiver<bool>,
    /// The live members, by name (this node among them while it is).
    pub members: watch::Receiver<BTreeMap<String, NodeInfo>>,
    /// The member that leads, when one does.
    pub leader: watch::Receiver<Option<String>>,
    /// The fence of this node's leadership (0: never led).
    fence: Arc<AtomicU64>,
    /// On its own (no etcd): it takes its fence when the agent starts.
    solo: bool,
    /// Asks the membership task to let go of the lease (the node's name
    /// and, if it led, the leadership) at once.
    leave: Option<tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<()>>>,
}

impl Membership {
    /// A node on its own: the only member, always leading (its fence is
    /// set when the agent starts).
    pub fn solo(node: &str, offer: Offer) -> Self {
        let info = NodeInfo {
            name: node.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            joined: now(),
            key: String::new(),
            address: loopback(),
            images: 0,
            images_cert: String::new(),
            cpus: offer.cpus(),
            memory_mib: offer.memory_mib(),
            labels: BTreeMap::new(),
        };
        // The senders are dropped: the values never change.
        Self {
            node: node.to_owned(),
            address: loopback(),
            leading: watch::channel(true).1,
            members: watch::channel(BTreeMap::from([(node.to_owned(), info)])).1,
            leader: watch::channel(Some(node.to_owned())).1,
            fence: Arc::default(),
            solo: true,
            leave: None,
        }
    }

    /// Leave the cluster now (an agent that stops): its lease is revoked,
    /// so its name and its leadership are free at once rather than after
    /// the lease's TTL. Nothing on its own.
    pub async fn leave(&self) {
        if let Some(tx) = &self.leave {
            let (done, left) = tokio::sync::oneshot::channel();
            if tx.send(done).is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(3), left).await;
            }
        }
    }

    /// A node on its own, not a member of an etcd cluster.
    pub fn is_solo(&self) -> bool {
        self.solo
    }

    /// The fence of this node's leadership, if it ever led.
    pub fn fence(&self) -> Option<Fence> {
        match self.fence.load(Ordering::SeqCst) {
            0 => None,
            f => Some(Fence(f)),
        }
    }

    pub(crate) fn set_fence(&self, fence: Fence) {
        self.fence.store(fence.0, Ordering::SeqCst);
    }

    pub fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// A live member's advertised address.
    pub fn address_of(&self, node: &str) -> Option<IpAddr> {
        self.members.borrow().get(node).map(|n| n.address)
    }

    /// The live members whose labels hold every one of `wanted` (all of
    /// them when nothing is wanted), in order.
    pub fn members_with(&self, wanted: &BTreeMap<String, String>) -> Vec<String> {
        self.members
            .borrow()
            .values()
            .filter(|n| kiln_core::cluster::labels_match(&n.labels, wanted))
            .map(|n| n.name.clone())
            .collect()
    }

    /// The other live members' image endpoints ([`crate::peers`]).
    pub fn image_endpoints(&self) -> Vec<crate::peers::Endpoint> {
        self.members
            .borrow()
            .values()
            .filter(|n| n.name != self.node && n.images != 0)
            .map(|n| {
                (
                    n.name.clone(),
                    (n.address, n.images).into(),
                    n.images_cert.clone(),
                )
            })
            .collect()
    }

    /// Where a listener of `addr` binds on this node: in a cluster, one
    /// that names no IP (`:8080`) takes the node's advertised address, so
    /// that each node serves the port on its own.
    pub fn listen_addr(&self, addr: std::net::SocketAddr) -> std::net::SocketAddr {
        if self.solo || !addr.ip().is_unspecified() {
            addr
        } else {
            (self.address, addr.port()).into()
        }
    }

    /// What each live member offers its instances (a dimension it did not
    /// register is not limited).
    pub fn capacity(&self) -> Vec<(String, kiln_core::resources::Amount)> {
        self.members
            .borrow()
            .values()
            .map(|n| {
                (
                    n.name.clone(),
                    kiln_core::resources::Amount::capacity(n.cpus, n.memory_mib),
                )
            })
            .collect()
    }

    /// The live members' names, in order.
    pub fn member_names(&self) -> Vec<String> {
        self.members.borrow().keys().cloned().collect()
    }
}

/// The CPUs this process may use.
fn cpus() -> u32 {
    std::thread::available_parallelism().map_or(0, |n| n.get() as u32)
}

/// The host's memory (`MemTotal` of `/proc/meminfo`), in MiB; 0 unknown.
fn memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Join the cluster of `state` as `node` (whose node key is `key`):
/// registered under a lease of `ttl`, campaigning for the leadership,
/// watching the members. Refused when a live member of another home
/// already has this name.
pub(crate) async fn join<S: Etcd + 'static>(
    state: Arc<S>,
    node: &str,
    key: &str,
    (address, images, images_cert): (IpAddr, u16, String),
    (labels, offer): (BTreeMap<String, String>, Offer),
    ttl: Duration,
) -> Result<Membership, StateError> {
    let info = NodeInfo {
        name: node.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        joined: now(),
        key: key.to_owned(),
        address,
        images,
        images_cert,
        cpus: offer.cpus(),
        memory_mib: offer.memory_mib(),
        labels,
    };
    let (leading_tx, leading) = watch::channel(false);
    let (members_tx, members) = watch::channel(BTreeMap::new());
    let (leader_tx, leader) = watch::channel(None);
    let membership = Membership {
        node: node.to_owned(),
        address,
        leading,
        members,
        leader,
        fence: Arc::default(),
        solo: false,
        leave: None,
    };
    let (leave_tx, leave_rx) = tokio::sync::mpsc::unbounded_channel();
    let membership = Membership {
        leave: Some(leave_tx),
        ..membership
    };
    let lease = register(&*state, &info, ttl).await?;
    // The members as they are now, before the agent decides anything.
    let (found, revision) = read_members(&*state).await?;
    members_tx.send_replace(found);
    tokio::spawn(watch_members(state.clone(), members_tx, revision));
    tokio::spawn(lead(
        state,
        info,
        ttl,
        lease,
        (leading_tx, leader_tx),
        membership.clone(),
        leave_rx,
    ));
    Ok(membership)
}

fn node_key<S: Etcd>(state: &S, name: &str) -> String {
    state.prefixed(&format!("nodes/{name}"))
}

/// A lease of `ttl`, and this node's key under it (refused while another
/// live agent holds the name).
async fn register<S: Etcd>(state: &S, info: &NodeInfo, ttl: Duration) -> Result<i64, StateError> {
    let mut client = state.client();
    let lease = client
        .lease_grant(ttl.as_secs().max(1) as i64, None)
        .await
        .map_err(|e| state.fail(e))?
        .id();
    let key = node_key(state, &info.name);
    let value = serde_json::to_vec(info).unwrap_or_default();
    // Free, or held by this home's previous agent (same node key): taken,
    // on condition that nobody wrote it since it was read.
    let held = client
        .get(key.as_str(), None)
        .await
        .map_err(|e| state.fail(e))?
        .kvs()
        .first()
        .map(|kv| {
            let same = serde_json::from_slice::<NodeInfo>(kv.value())
                .is_ok_and(|n| n.key == info.key && !info.key.is_empty());
            (kv.mod_revision(), same)
        });
    let condition = match held {
        None => Some(Compare::create_revision(key.as_str(), CompareOp::Equal, 0)),
        Some((rev, true)) => Some(Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)),
        Some((_, false)) => None,
    };
    let put = match condition {
        Some(c) => client
            .txn(Txn::new().when([c]).and_then([TxnOp::put(
                key.as_str(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]))
            .await
            .map_err(|e| state.fail(e))?
            .succeeded(),
        None => false,
    };
    if !put {
        let _ = client.lease_revoke(lease).await;
        return Err(StateError::Backend(
            format!(
                "node {} is a member already (another agent holds its name; a stopped one lets go within its lease's TTL)",
                info.name
            )
            .into(),
        ));
    }
    Ok(lease)
}

async fn read_members<S: Etcd>(state: &S) -> Result<(BTreeMap<String, NodeInfo>, i64), StateError> {
    let prefix = state.prefixed("nodes/");
    let resp = state
        .client()
        .get(
            prefix.as_str(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .map_err(|e| state.fail(e))?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let members = resp
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice::<NodeInfo>(kv.value()).ok())
        .map(|n| (n.name.clone(), n))
        .collect();
    Ok((members, revision))
}

/// Keep `members` as etcd has them: a watch of the prefix from `revision`
/// on, read again whole whenever the watch ends.
async fn watch_members<S: Etcd>(
    state: Arc<S>,
    members: watch::Sender<BTreeMap<String, NodeInfo>>,
    mut revision: i64,
) {
    let prefix = state.prefixed("nodes/");
    loop {
        let stream = state
            .client()
            .watch(
                prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await;
        if let Ok(mut stream) = stream {
            while let Ok(Some(m)) = stream.message().await {
                if m.canceled() {
                    break;
                }
                for e in m.events() {
                    let Some(kv) = e.kv() else { continue };
                    revision = revision.max(kv.mod_revision());
                    let name = String::from_utf8_lossy(kv.key())
                        .trim_start_matches(prefix.as_str())
                        .to_owned();
                    members.send_modify(|m| match e.event_type() {
                        EventType::Put => {
                            if let Ok(info) = serde_json::from_slice::<NodeInfo>(kv.value()) {
                                m.insert(name, info);
                            }
                        }
                        EventType::Delete => {
                            m.remove(&name);
                        }
                    });
                }
            }
        }
        // The stream ended (etcd restarted, a compaction): read it whole.
        if members.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok((found, rev)) = read_members(&*state).await {
            revision = rev;
            members.send_replace(found);
        }
    }
}

/// Keep the lease alive and campaign for the leadership under it. A node
/// whose lease may have expired (no renewal for a TTL) stops leading and
/// joins again.
async fn lead<S: Etcd>(
    state: Arc<S>,
    info: NodeInfo,
    ttl: Duration,
    mut lease: i64,
    (leading, leader): (watch::Sender<bool>, watch::Sender<Option<String>>),
    membership: Membership,
    mut leave: tokio::sync::mpsc::UnboundedReceiver<tokio::sync::oneshot::Sender<()>>,
) {
    let leader_key = state.prefixed("leader");
    let renew = ttl / 3;
    let mut renewed = tokio::time::Instant::now();
    let mut keeper = state.client().lease_keep_alive(lease).await.ok();
    loop {
        // Renew.
        let alive = match keeper.as_mut() {
            Some((k, stream)) => {
                k.keep_alive().await.is_ok()
                    && matches!(stream.message().await, Ok(Some(r)) if r.ttl() > 0)
            }
            None => false,
        };
        if alive {
            renewed = tokio::time::Instant::now();
        } else if renewed.elapsed() >= ttl {
            // Possibly expired: not the leader any more, and joined again
            // (under a new lease) once etcd answers.
            if leading.send_replace(false) {
                tracing::warn!(
                    "{}: lost the cluster's leadership (lease not renewed)",
                    info.name
                );
            }
            if let Ok(l) = register(&*state, &info, ttl).await {
                lease = l;
                renewed = tokio::time::Instant::now();
                keeper = state.client().lease_keep_alive(lease).await.ok();
            }
        } else {
            keeper = state.client().lease_keep_alive(lease).await.ok();
        }
        // Campaign: the leader key under this lease, if nobody holds it.
        let mut client = state.client();
        let won = client
            .txn(
                Txn::new()
                    .when([Compare::create_revision(
                        leader_key.as_str(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then([TxnOp::put(
                        leader_key.as_str(),
                        info.name.as_bytes().to_vec(),
                        Some(PutOptions::new().with_lease(lease)),
                    )])
                    .or_else([TxnOp::get(leader_key.as_str(), None)]),
            )
            .await;
        let holder = match &won {
            Ok(r) if r.succeeded() => Some(info.name.clone()),
            Ok(r) => {
                r.op_responses()
                    .into_iter()
                    .find_map(|op| match op {
                        etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| {
                            (kv.lease(), String::from_utf8_lossy(kv.value()).into_owned())
                        }),
                        _ => None,
                    })
                    .map(|(held_by, name)| {
                        if held_by == lease {
                            info.name.clone()
                        } else {
                            name
                        }
                    })
            }
            Err(_) => None,
        };
        let mine = holder.as_deref() == Some(info.name.as_str()) && renewed.elapsed() < ttl;
        if mine && !*leading.borrow() {
            // A fence larger than any before: the previous leader's late
            // writes fail from now on.
            match state.lead().await {
                Ok(fence) => {
                    membership.set_fence(fence);
                    tracing::info!("{}: leads the cluster (fence {})", info.name, fence.0);
                    leading.send_replace(true);
                }
                Err(e) => tracing::error!("{}: cannot take the leadership: {e}", info.name),
            }
        } else if !mine && *leading.borrow() {
            tracing::warn!("{}: no longer leads the cluster", info.name);
            leading.send_replace(false);
        }
        leader.send_if_modified(|l| std::mem::replace(l, holder.clone()) != holder);
        tokio::select! {
            () = tokio::time::sleep(renew.max(Duration::from_millis(100))) => {}
            asked = leave.recv() => {
                leading.send_replace(false);
                let _ = state.client().lease_revoke(lease).await;
                if let Some(done) = asked {
                    let _ = done.send(());
                }
                return;
            }
        }
    }
}
