//! [`ClusterState`] on etcd: what every node of a cluster shares, in one
//! etcd (or an etcd cluster), under a key prefix. [`NodeState`] stays this
//! node's own (its SQLite file, or any other), carried beside it.
//!
//! Every compound change is **one etcd transaction**, optimistic: the keys
//! it depends on are read at one revision, the change is computed from
//! them (its [`Guard`] judged by the same `Guard::check` as every backend),
//! and the writes are committed only if none of those keys changed since
//! (a compare on each key's modification revision, or on its absence); if
//! one did, the change is computed again from a new read. Events are
//! appended under the `head` key (the last sequence number and hash), so
//! two writers never chain the same sequence number: the ledger stays one
//! hash chain for the cluster. [`ClusterState::watch`] is an etcd watch
//! of that key.
//!
//! Keys, under the prefix (`/kiln/` by default):
//!
//! | key | value |
//! |---|---|
//! | `svc/NAME` | the service's record ([`ServiceRecord`]) |
//! | `rel/NAME/REVISION` | a release (revision zero-padded: keys sort as revisions) |
//! | `drain/NODE` | a drained node (`kiln drain`) |
//! | `rollout/NAME`, `assign/NAME`, `route/NAME` | its saved rollout, its assignments, the leader's routing |
//! | `obs/NAME/NODE` | what a node last published of the service's instances |
//! | `count/NAME/NODE` | a node's router's counters of the service's releases |
//! | `log/SEQ` | an event with its ledger entry |
//! | `head` | the last event's sequence number and hash |
//! | `fence` | the newest leadership handed out |
//! | `key`, `secret/SEALED` | the key that seals secrets, secret values |
//! | `token/NAME`, `cp/SEQ` | API tokens' records, signed checkpoints |
//! | `nodekey/DIGEST` | a node's public key (and its name): its checkpoints count |
//! | `nodes/NAME`, `leader` | a live member, the leader's name (each under its node's lease: `crate::cluster`) |

use std::collections::BTreeMap;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};
use kiln_core::auth::{TokenName, TokenRecord};
use kiln_core::ledger::{Checkpoint, Entry};
use kiln_core::release::{Outcome, Release};
use kiln_core::rollout::assign::{Assignment, Observation};
use kiln_core::rollout::{Routing, SavedRollout};
use kiln_core::secret::{Sealed, SecretValue};
use kiln_core::spec::ServiceName;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::{
    Assigned, ClusterState, Event, Fence, Guard, InstanceRecord, NewEvent, NodeCounters, NodeState,
    Result, ServiceRecord, StateError, now,
};

/// The prefix when none is given.
pub const DEFAULT_PREFIX: &str = "/kiln/";

/// The cluster's state on etcd, with this node's own state `N` beside it.
pub struct EtcdState<N> {
    client: Client,
    /// The endpoints, as errors name them.
    endpoints: String,
    prefix: String,
    node: N,
}

/// An event as kept: the event and its place in the chain, one key.
#[derive(Serialize, Deserialize)]
struct Logged {
    event: Event,
    entry: Entry,
}

/// The `head` key: the last event's sequence number and hash.
#[derive(Clone, Serialize, Deserialize)]
struct Head {
    seq: u64,
    hash: String,
}

fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|source| StateError::Decode { what, source })
}

fn encode(v: &impl Serialize) -> Vec<u8> {
    // Plain data (strings, numbers, maps with string keys) always encodes.
    serde_json::to_vec(v).unwrap_or_default()
}

/// The first key after every key that starts with `prefix` (etcd's range
/// end for a prefix).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: to the end of the keyspace.
    vec![0]
}

/// Keys read at one revision for a change: their values and modification
/// revisions (absent keys are absent).
struct Snapshot {
    keys: Vec<String>,
    found: BTreeMap<String, KeyValue>,
}

impl Snapshot {
    fn get<T: DeserializeOwned>(&self, what: &'static str, key: &str) -> Result<Option<T>> {
        self.found
            .get(key)
            .map(|kv| decode(what, kv.value()))
            .transpose()
    }

    fn has(&self, key: &str) -> bool {
        self.found.contains_key(key)
    }
}

/// The writes of a change, and the events it appends (chained from the
/// head its snapshot read).
struct Writes {
    ops: Vec<TxnOp>,
    head: Option<Head>,
    head_key: String,
    log_key: String,
    appended: bool,
}

impl Writes {
    fn put(&mut self, key: &str, value: &impl Serialize) {
        self.ops.push(TxnOp::put(key, encode(value), None));
    }

    fn delete(&mut self, key: &str) {
        self.ops.push(TxnOp::delete(key, None));
    }

    fn delete_prefix(&mut self, prefix: &str) {
        self.ops.push(TxnOp::delete(
            prefix,
            Some(DeleteOptions::new().with_prefix()),
        ));
    }

    /// Append an event after the head; its sequence number.
    fn append(&mut self, e: &NewEvent) -> u64 {
        let (seq, prev) = match &self.head {
            Some(h) => (h.seq + 1, h.hash.clone()),
            None => (1, kiln_core::ledger::GENESIS.to_owned()),
        };
        let time = now();
        let detail = serde_json::to_string(&e.change.detail()).unwrap_or_default();
        let entry = super::ledger_entry(seq, time.clone(), e, detail).chained(&prev);
        let event = Event {
            seq,
            time,
            actor: Some(e.actor),
            service: e.service.as_ref().map(|s| s.to_string()),
            revision: e.revision,
            instance: e.instance.clone(),
            change: e.change.clone(),
        };
        self.head = Some(Head {
            seq,
            hash: entry.hash.clone(),
        });
        let key = format!("{}{seq:020}", self.log_key);
        self.put(&key, &Logged { event, entry });
        self.appended = true;
        seq
    }

    /// The last sequence number, with what this change appended.
    fn seq(&self) -> u64 {
        self.head.as_ref().map_or(0, |h| h.seq)
    }

    fn finish(mut self) -> Vec<TxnOp> {
        if self.appended
            && let Some(head) = self.head.take()
        {
            let key = self.head_key.clone();
            self.put(&key, &head);
        }
        self.ops
    }
}

impl<N> EtcdState<N> {
    /// Connect to etcd at `endpoints` (`http://HOST:PORT`), keeping the
    /// cluster's state under `prefix`, with this node's state `node`.
    ///
    /// Over TLS when `tls` is given (`https://` endpoints): etcd's
    /// certificate checked against the CA, and this node's client
    /// certificate shown when there is one.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        node: N,
        tls: Option<&crate::EtcdTls>,
    ) -> Result<Self> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|source| StateError::Open {
                path: path.display().to_string(),
                source: Box::new(source),
            })
        };
        let mut options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(5))
            .with_timeout(std::time::Duration::from_secs(10))
            .with_keep_alive(
                std::time::Duration::from_secs(2),
                std::time::Duration::from_secs(5),
            );
        if let Some(t) = tls {
            let mut config = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&t.ca)?));
            if let Some((cert, key)) = &t.cert {
                config = config.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(config);
        }
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| StateError::Open {
                path: endpoints.join(","),
                source: Box::new(e),
            })?;
        let state = Self {
            client,
            endpoints: endpoints.join(","),
            prefix: prefix.to_owned(),
            node,
        };
        // Reachable now, or refused now (not at the first change).
        state
            .raw_get(&state.key("head"))
            .await
            .map_err(|e| StateError::Open {
                path: endpoints.join(","),
                source: Box::new(e),
            })?;
        Ok(state)
    }

    /// An etcd error, as the cluster's state's failure (one line naming
    /// the endpoints).
    fn fail(&self, e: etcd_client::Error) -> StateError {
        // tonic's messages may span lines: one line, as every error here.
        let line = e.to_string().replace('\n', " ");
        StateError::Cluster {
            endpoints: self.endpoints.clone(),
            source: line.into(),
        }
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    fn svc_key(&self, name: &ServiceName) -> String {
        self.key(&format!("svc/{name}"))
    }

    fn rel_key(&self, name: &ServiceName, revision: u64) -> String {
        self.key(&format!("rel/{name}/{revision:020}"))
    }

    async fn raw_get(
        &self,
        key: &str,
    ) -> std::result::Result<Option<KeyValue>, etcd_client::Error> {
        let mut kv = self.client.kv_client();
        let mut resp = kv.get(key, None).await?;
        Ok(resp.take_kvs().into_iter().next())
    }

    async fn get<T: DeserializeOwned>(&self, what: &'static str, key: &str) -> Result<Option<T>> {
        match self.raw_get(key).await.map_err(|e| self.fail(e))? {
            Some(kv) => decode(what, kv.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Every value under `prefix`, by key, from `from` (a full key) on.
    async fn range<T: DeserializeOwned>(
        &self,
        what: &'static str,
        prefix: &str,
        from: Option<&str>,
    ) -> Result<Vec<T>> {
        let mut kv = self.client.kv_client();
        let start = from.unwrap_or(prefix);
        let resp = kv
            .get(
                start,
                Some(GetOptions::new().with_range(prefix_end(prefix))),
            )
            .await
            .map_err(|e| self.fail(e))?;
        resp.kvs()
            .iter()
            .map(|kv| decode(what, kv.value()))
            .collect()
    }

    /// Put `value` at `key` (under the prefix) while `service` exists: what
    /// a node publishes of a service that was removed meanwhile is dropped.
    async fn put_if_service(
        &self,
        service: &ServiceName,
        key: &str,
        value: &impl Serialize,
    ) -> Result<()> {
        let svc = self.svc_key(service);
        self.change(vec![svc.clone()], |snap, w| {
            if snap.has(&svc) {
                w.put(&self.key(key), value);
            }
            Ok(())
        })
        .await
    }

    /// Read `keys` at one revision.
    async fn read(&self, keys: Vec<String>) -> Result<Snapshot> {
        let ops: Vec<TxnOp> = keys.iter().map(|k| TxnOp::get(k.as_str(), None)).collect();
        let mut kv = self.client.kv_client();
        let resp = kv
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(|e| self.fail(e))?;
        let mut found = BTreeMap::new();
        for r in resp.op_responses() {
            if let TxnOpResponse::Get(mut g) = r {
                for kv in g.take_kvs() {
                    found.insert(String::from_utf8_lossy(kv.key()).into_owned(), kv);
                }
            }
        }
        Ok(Snapshot { keys, found })
    }

    /// One change: `keys` read at one revision, `change` computes the
    /// writes from them (or refuses), committed only if none of those keys
    /// moved meanwhile; computed again from a new read if one did.
    async fn change<T>(
        &self,
        mut keys: Vec<String>,
        mut change: impl FnMut(&Snapshot, &mut Writes) -> Result<T>,
    ) -> Result<T> {
        let head_key = self.key("head");
        if !keys.contains(&head_key) {
            keys.push(head_key.clone());
        }
        loop {
            let snap = self.read(keys.clone()).await?;
            let mut w = Writes {
                ops: Vec::new(),
                head: snap.get("ledger head", &head_key)?,
                head_key: head_key.clone(),
                log_key: self.key("log/"),
                appended: false,
            };
            let out = change(&snap, &mut w)?;
            let ops = w.finish();
            if ops.is_empty() {
                return Ok(out);
            }
            let compares: Vec<Compare> = snap
                .keys
                .iter()
                .map(|k| match snap.found.get(k) {
                    Some(kv) => {
                        Compare::mod_revision(k.as_str(), CompareOp::Equal, kv.mod_revision())
                    }
                    None => Compare::create_revision(k.as_str(), CompareOp::Equal, 0),
                })
                .collect();
            let mut kv = self.client.kv_client();
            let resp = kv
                .txn(Txn::new().when(compares).and_then(ops))
                .await
                .map_err(|e| self.fail(e))?;
            if resp.succeeded() {
                return Ok(out);
            }
            // Another writer came first: read again, decide again.
        }
    }

    fn newest_fence(&self, snap: &Snapshot) -> Result<Fence> {
        Ok(Fence(snap.get("fence", &self.key("fence"))?.unwrap_or(0)))
    }

    /// The guard's verdict on a change of `service`, from a snapshot that
    /// holds the service's record and the fence.
    fn check(&self, snap: &Snapshot, service: &ServiceName, guard: Guard) -> Result<()> {
        let version = snap
            .get::<ServiceRecord>("service", &self.svc_key(service))?
            .map_or(0, |s| s.version);
        guard.check(service, version, self.newest_fence(snap)?)
    }

    /// The keys a change of `service` under a guard reads.
    fn guarded(
        &self,
        service: &ServiceName,
        more: impl IntoIterator<Item = String>,
    ) -> Vec<String> {
        let mut keys = vec![self.svc_key(service), self.key("fence")];
        keys.extend(more);
        keys
    }

    /// A release's outcome (and reason) changed in `w`, if it exists.
    fn set_outcome_in(
        &self,
        snap: &Snapshot,
        w: &mut Writes,
        service: &ServiceName,
        revision: u64,
        outcome: Outcome,
        reason: Option<&str>,
    ) -> Result<()> {
        let key = self.rel_key(service, revision);
        if let Some(mut r) = snap.get::<Release>("release", &key)? {
            r.outcome = outcome;
            if let Some(reason) = reason {
                r.reason = Some(reason.to_owned());
            }
            w.put(&key, &r);
        }
        Ok(())
    }

    /// An apply's writes: the release (refused if its revision is taken),
    /// the events, the record at the version of its last event.
    fn apply_in(
        &self,
        snap: &Snapshot,
        w: &mut Writes,
        service: &ServiceRecord,
        release: Option<&Release>,
        events: &[NewEvent],
    ) -> Result<()> {
        if let Some(r) = release {
            let key = self.rel_key(&r.service, r.revision);
            if snap.has(&key) {
                return Err(StateError::ReleaseExists {
                    service: r.service.clone(),
                    revision: r.revision,
                });
            }
            w.put(&key, r);
        }
        for e in events {
            w.append(e);
        }
        let mut rec = service.clone();
        rec.version = w.seq();
        w.put(&self.svc_key(&service.name), &rec);
        Ok(())
    }

    /// The events or ledger entries after `after`, in order.
    async fn logged(&self, after: u64) -> Result<Vec<Logged>> {
        let prefix = self.key("log/");
        let from = format!("{prefix}{:020}", after.saturating_add(1));
        self.range("event", &prefix, Some(&from)).await
    }
}

/// What a cluster's membership (`crate::cluster`) needs of the state
/// store on etcd: its client and prefix, its errors, and the fence it
/// takes when it wins ([`ClusterState::lead`]).
pub(crate) trait Etcd: ClusterState {
    fn client(&self) -> Client;
    fn prefixed(&self, rest: &str) -> String;
    fn fail(&self, e: etcd_client::Error) -> StateError;
}

impl<N: Send + Sync> Etcd for EtcdState<N> {
    fn client(&self) -> Client {
        self.client.clone()
    }

    fn prefixed(&self, rest: &str) -> String {
        self.key(rest)
    }

    fn fail(&self, e: etcd_client::Error) -> StateError {
        EtcdState::fail(self, e)
    }
}

#[async_trait::async_trait]
impl<N: Send + Sync> ClusterState for EtcdState<N> {
    async fn services(&self) -> Result<Vec<ServiceRecord>> {
        self.range("service", &self.key("svc/"), None).await
    }

    async fn service(&self, name: &ServiceName) -> Result<Option<ServiceRecord>> {
        self.get("service", &self.svc_key(name)).await
    }

    async fn releases(&self, service: &ServiceName) -> Result<Vec<Release>> {
        self.range("release", &self.key(&format!("rel/{service}/")), None)
            .await
    }

    async fn current_releases(&self, service: &ServiceName) -> Result<Vec<Release>> {
        // The record and the releases at one revision.
        let prefix = self.key(&format!("rel/{service}/"));
        let mut kv = self.client.kv_client();
        let resp = kv
            .txn(Txn::new().and_then([
                TxnOp::get(self.svc_key(service), None),
                TxnOp::get(
                    prefix.as_str(),
                    Some(GetOptions::new().with_range(prefix_end(&prefix))),
                ),
            ]))
            .await
            .map_err(|e| self.fail(e))?;
        let mut target = None;
        let mut all: Vec<Release> = Vec::new();
        for (i, r) in resp.op_responses().into_iter().enumerate() {
            let TxnOpResponse::Get(g) = r else { continue };
            for kv in g.kvs() {
                if i == 0 {
                    target = Some(decode::<ServiceRecord>("service", kv.value())?.target);
                } else {
                    all.push(decode("release", kv.value())?);
                }
            }
        }
        let newest = all.last().map(|r| r.revision);
        all.retain(|r| {
            matches!(r.outcome, Outcome::Pending | Outcome::Active)
                || Some(r.revision) == target
                || Some(r.revision) == newest
        });
        Ok(all)
    }

    async fn release(&self, service: &ServiceName, revision: u64) -> Result<Option<Release>> {
        self.get("release", &self.rel_key(service, revision)).await
    }

    async fn all_releases(&self) -> Result<Vec<Release>> {
        // Keyed by service then zero-padded revision: in that order.
        self.range("release", &self.key("rel/"), None).await
    }

    async fn record_apply(
        &self,
        service: &ServiceRecord,
        release: Option<&Release>,
        events: &[NewEvent],
        guard: Guard,
    ) -> Result<()> {
        let keys = self.guarded(
            &service.name,
            release.map(|r| self.rel_key(&r.service, r.revision)),
        );
        self.change(keys, |snap, w| {
            self.check(snap, &service.name, guard)?;
            self.apply_in(snap, w, service, release, events)
        })
        .await
    }

    async fn record_rollback(
        &self,
        service: &ServiceRecord,
        release: &Release,
        abandoned: Option<(u64, &str)>,
        events: &[NewEvent],
        guard: Guard,
    ) -> Result<()> {
        let keys = self.guarded(
            &service.name,
            [
                Some(self.rel_key(&release.service, release.revision)),
                abandoned.map(|(rev, _)| self.rel_key(&service.name, rev)),
            ]
            .into_iter()
            .flatten(),
        );
        self.change(keys, |snap, w| {
            self.check(snap, &service.name, guard)?;
            if snap.has(&self.rel_key(&release.service, release.revision)) {
                return Err(StateError::ReleaseExists {
                    service: release.service.clone(),
                    revision: release.revision,
                });
            }
            if let Some((revision, reason)) = abandoned {
                self.set_outcome_in(
                    snap,
                    w,
                    &service.name,
                    revision,
                    Outcome::Failed,
                    Some(reason),
                )?;
            }
            self.apply_in(snap, w, service, Some(release), events)
        })
        .await
    }

    async fn set_outcome(
        &self,
        service: &ServiceName,
        revision: u64,
        outcome: Outcome,
        reason: Option<&str>,
        event: &NewEvent,
        guard: Guard,
    ) -> Result<()> {
        let keys = self.guarded(service, [self.rel_key(service, revision)]);
        self.change(keys, |snap, w| {
            self.check(snap, service, guard)?;
            self.set_outcome_in(snap, w, service, revision, outcome, reason)?;
            w.append(event);
            Ok(())
        })
        .await
    }

    async fn fail_release(
        &self,
        service: &ServiceName,
        revision: u64,
        reason: &str,
        return_to: Option<u64>,
        events: &[NewEvent],
        guard: Guard,
    ) -> Result<()> {
        let keys = self.guarded(
            service,
            [
                Some(self.rel_key(service, revision)),
                return_to.map(|r| self.rel_key(service, r)),
            ]
            .into_iter()
            .flatten(),
        );
        self.change(keys, |snap, w| {
            self.check(snap, service, guard)?;
            self.set_outcome_in(snap, w, service, revision, Outcome::Failed, Some(reason))?;
            if let Some(previous) = return_to {
                self.set_outcome_in(snap, w, service, previous, Outcome::Active, None)?;
            }
            for e in events {
                w.append(e);
            }
            if let Some(previous) = return_to
                && let Some(mut rec) =
                    snap.get::<ServiceRecord>("service", &self.svc_key(service))?
            {
                rec.target = previous;
                rec.version = w.seq();
                w.put(&self.svc_key(service), &rec);
            }
            Ok(())
        })
        .await
    }

    async fn remove_service(
        &self,
        name: &ServiceName,
        event: &NewEvent,
        guard: Guard,
    ) -> Result<()> {
        let keys = self.guarded(name, []);
        self.change(keys, |snap, w| {
            self.check(snap, name, guard)?;
            if snap.has(&self.svc_key(name)) {
                w.delete(&self.svc_key(name));
            }
            w.delete(&self.key(&format!("rollout/{name}")));
            w.delete(&self.key(&format!("assign/{name}")));
            w.delete(&self.key(&format!("route/{name}")));
            w.delete_prefix(&self.key(&format!("obs/{name}/")));
            w.delete_prefix(&self.key(&format!("count/{name}/")));
            w.append(event);
            Ok(())
        })
        .await
    }

    async fn rollout(&self, service: &ServiceName) -> Result<Option<SavedRollout>> {
        self.get("rollout", &self.key(&format!("rollout/{service}")))
            .await
    }

    async fn set_rollout(
        &self,
        service: &ServiceName,
        rollout: &SavedRollout,
        guard: Guard,
    ) -> Result<()> {
        let keys = self.guarded(service, []);
        self.change(keys, |snap, w| {
            self.check(snap, service, guard)?;
            if snap.has(&self.svc_key(service)) {
                w.put(&self.key(&format!("rollout/{service}")), rollout);
            }
            Ok(())
        })
        .await
    }

    async fn assignments(&self, service: &ServiceName) -> Result<Option<Assigned>> {
        let (list, route) = (
            self.key(&format!("assign/{service}")),
            self.key(&format!("route/{service}")),
        );
        // One read: the routing the leader wrote with these assignments.
        let snap = self.read(vec![list.clone(), route.clone()]).await?;
        let Some(list) = snap.get("assignments", &list)? else {
            return Ok(None);
        };
        Ok(Some(Assigned {
            list,
            routing: snap.get("routing", &route)?,
        }))
    }

    async fn assign(
        &self,
        service: &ServiceName,
        assignments: &[Assignment],
        routing: Option<Routing>,
        rollout: Option<&SavedRollout>,
        guard: Guard,
    ) -> Result<()> {
        let keys = self.guarded(service, []);
        self.change(keys, |snap, w| {
            self.check(snap, service, guard)?;
            if snap.has(&self.svc_key(service)) {
                w.put(&self.key(&format!("assign/{service}")), &assignments);
                if let Some(r) = &routing {
                    w.put(&self.key(&format!("route/{service}")), r);
                }
                if let Some(r) = rollout {
                    w.put(&self.key(&format!("rollout/{service}")), r);
                }
            }
            Ok(())
        })
        .await
    }

    async fn observations(&self, service: &ServiceName) -> Result<Vec<Observation>> {
        let lists: Vec<Vec<Observation>> = self
            .range("observations", &self.key(&format!("obs/{service}/")), None)
            .await?;
        Ok(lists.into_iter().flatten().collect())
    }

    async fn publish(
        &self,
        service: &ServiceName,
        node: &str,
        observations: &[Observation],
    ) -> Result<()> {
        self.put_if_service(service, &format!("obs/{service}/{node}"), &observations)
            .await
    }

    async fn publish_counters(
        &self,
        service: &ServiceName,
        node: &str,
        counters: &NodeCounters,
    ) -> Result<()> {
        self.put_if_service(service, &format!("count/{service}/{node}"), counters)
            .await
    }

    async fn counters(&self, service: &ServiceName) -> Result<BTreeMap<String, NodeCounters>> {
        let prefix = self.key(&format!("count/{service}/"));
        let mut kv = self.client.kv_client();
        let resp = kv
            .get(
                prefix.as_str(),
                Some(GetOptions::new().with_range(prefix_end(&prefix))),
            )
            .await
            .map_err(|e| self.fail(e))?;
        resp.kvs()
            .iter()
            .map(|kv| {
                let node = String::from_utf8_lossy(kv.key())
                    .trim_start_matches(prefix.as_str())
                    .to_owned();
                Ok((node, decode("counters", kv.value())?))
            })
            .collect()
    }

    async fn member_leases(&self) -> Result<BTreeMap<String, (i64, i64)>> {
        let prefix = self.key("nodes/");
        let mut client = self.client.clone();
        let resp = client
            .get(
                prefix.as_str(),
                Some(GetOptions::new().with_range(prefix_end(&prefix))),
            )
            .await
            .map_err(|e| self.fail(e))?;
        let mut out = BTreeMap::new();
        for kv in resp.kvs().iter().filter(|kv| kv.lease() != 0) {
            let name = String::from_utf8_lossy(kv.key())
                .trim_start_matches(prefix.as_str())
                .to_owned();
            let ttl = client
                .lease_time_to_live(kv.lease(), None)
                .await
                .map_err(|e| self.fail(e))?;
            out.insert(name, (ttl.ttl(), ttl.granted_ttl()));
        }
        Ok(out)
    }

    async fn lead(&self) -> Result<Fence> {
        let key = self.key("fence");
        self.change(vec![key.clone()], |snap, w| {
            let next = self.newest_fence(snap)?.0 + 1;
            w.put(&key, &next);
            Ok(Fence(next))
        })
        .await
    }

    async fn append_event(&self, event: &NewEvent) -> Result<u64> {
        self.change(Vec::new(), |_, w| Ok(w.append(event))).await
    }

    async fn watch(&self, after: u64) -> Result<Vec<Event>> {
        let head_key = self.key("head");
        loop {
            // The head at one revision: the watch starts after it, so a
            // write between this read and the watch is not missed.
            let mut kv = self.client.kv_client();
            let mut resp = kv
                .get(head_key.as_str(), None)
                .await
                .map_err(|e| self.fail(e))?;
            let revision = resp.header().map_or(0, |h| h.revision());
            let head = match resp.take_kvs().into_iter().next() {
                Some(kv) => decode::<Head>("ledger head", kv.value())?.seq,
                None => 0,
            };
            if head > after {
                let events: Vec<Event> = self
                    .logged(after)
                    .await?
                    .into_iter()
                    .map(|l| l.event)
                    .collect();
                if !events.is_empty() {
                    return Ok(events);
                }
            }
            let mut watch = self.client.watch_client();
            let mut stream = watch
                .watch(
                    head_key.as_str(),
                    Some(WatchOptions::new().with_start_revision(revision + 1)),
                )
                .await
                .map_err(|e| self.fail(e))?;
            // Any change of the head (or the stream's end: read again).
            loop {
                match stream.message().await.map_err(|e| self.fail(e))? {
                    Some(m) if m.events().is_empty() && !m.canceled() => continue,
                    _ => break,
                }
            }
        }
    }

    async fn secret_key(&self, fresh: [u8; 32]) -> Result<[u8; 32]> {
        let key = self.key("key");
        self.change(vec![key.clone()], |snap, w| match snap.found.get(&key) {
            Some(kv) => <[u8; 32]>::try_from(kv.value())
                .map_err(|_| StateError::SecretKey(kv.value().len())),
            None => {
                w.ops.push(TxnOp::put(key.as_str(), fresh.to_vec(), None));
                Ok(fresh)
            }
        })
        .await
    }

    async fn put_secrets(&self, secrets: &[(Sealed, SecretValue)]) -> Result<()> {
        let keyed: Vec<(String, &SecretValue)> = secrets
            .iter()
            .map(|(s, v)| (self.key(&format!("secret/{s}")), v))
            .collect();
        let keys = keyed.iter().map(|(k, _)| k.clone()).collect();
        self.change(keys, |snap, w| {
            for (key, value) in &keyed {
                if !snap.has(key) {
                    w.put(key, value);
                }
            }
            Ok(())
        })
        .await
    }

    async fn secret(&self, sealed: &Sealed) -> Result<Option<SecretValue>> {
        self.get("secret", &self.key(&format!("secret/{sealed}")))
            .await
    }

    async fn put_token(&self, record: &TokenRecord, event: &NewEvent) -> Result<bool> {
        let key = self.key(&format!("token/{}", record.name));
        self.change(vec![key.clone()], |snap, w| {
            if snap.has(&key) {
                return Ok(false);
            }
            w.put(&key, record);
            w.append(event);
            Ok(true)
        })
        .await
    }

    async fn token(&self, name: &TokenName) -> Result<Option<TokenRecord>> {
        self.get("token", &self.key(&format!("token/{name}"))).await
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.range("token", &self.key("token/"), None).await
    }

    async fn revoke_token(&self, name: &TokenName, event: &NewEvent) -> Result<bool> {
        let key = self.key(&format!("token/{name}"));
        self.change(vec![key.clone()], |snap, w| {
            if !snap.has(&key) {
                return Ok(false);
            }
            w.delete(&key);
            w.append(event);
            Ok(true)
        })
        .await
    }

    async fn set_drained(&self, node: &str, drained: bool, event: &NewEvent) -> Result<bool> {
        let key = self.key(&format!("drain/{node}"));
        self.change(vec![key.clone()], |snap, w| {
            if snap.has(&key) == drained {
                return Ok(false);
            }
            if drained {
                w.put(&key, &node);
            } else {
                w.delete(&key);
            }
            w.append(event);
            Ok(true)
        })
        .await
    }

    async fn drained(&self) -> Result<std::collections::BTreeSet<String>> {
        let nodes: Vec<String> = self
            .range("drained node", &self.key("drain/"), None)
            .await?;
        Ok(nodes.into_iter().collect())
    }

    async fn set_paused(
        &self,
        service: &ServiceName,
        timeout_ms: Option<u64>,
        event: &NewEvent,
    ) -> Result<bool> {
        let key = self.key(&format!("pause/{service}"));
        self.change(vec![key.clone()], |snap, w| {
            let was: Option<(ServiceName, u64)> = snap.get("paused service", &key)?;
            if was.map(|(_, t)| t) == timeout_ms {
                return Ok(false);
            }
            match timeout_ms {
                Some(t) => w.put(&key, &(service, t)),
                None => w.delete(&key),
            }
            w.append(event);
            Ok(true)
        })
        .await
    }

    async fn paused(&self) -> Result<BTreeMap<ServiceName, u64>> {
        let all: Vec<(ServiceName, u64)> = self
            .range("paused service", &self.key("pause/"), None)
            .await?;
        Ok(all.into_iter().collect())
    }

    async fn ledger(&self, after: u64) -> Result<Vec<Entry>> {
        Ok(self
            .logged(after)
            .await?
            .into_iter()
            .map(|l| l.entry)
            .collect())
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        self.range("checkpoint", &self.key("cp/"), None).await
    }

    async fn put_checkpoint(&self, cp: &Checkpoint) -> Result<()> {
        let key = self.key(&format!("cp/{:020}", cp.seq));
        self.change(vec![key.clone()], |snap, w| {
            if !snap.has(&key) {
                w.put(&key, cp);
            }
            Ok(())
        })
        .await
    }

    async fn put_node_key(&self, node: &str, key: &str) -> Result<()> {
        // Keyed by a digest of the key: etcd keys stay short and plain.
        let at = self.key(&format!(
            "nodekey/{}",
            kiln_core::Digest::of(key.as_bytes()).hex()
        ));
        self.change(vec![at.clone()], |snap, w| {
            if !snap.has(&at) {
                w.put(&at, &(key, node));
            }
            Ok(())
        })
        .await
    }

    async fn node_keys(&self) -> Result<Vec<(String, String)>> {
        let mut keys: Vec<(String, String)> =
            self.range("node key", &self.key("nodekey/"), None).await?;
        keys.sort();
        Ok(keys)
    }

    async fn last_checkpoint(&self) -> Result<Option<u64>> {
        let prefix = self.key("cp/");
        let mut kv = self.client.kv_client();
        let resp = kv
            .get(
                prefix.as_str(),
                Some(
                    GetOptions::new()
                        .with_range(prefix_end(&prefix))
                        .with_sort(SortTarget::Key, SortOrder::Descend)
                        .with_limit(1),
                ),
            )
            .await
            .map_err(|e| self.fail(e))?;
        resp.kvs()
            .first()
            .map(|kv| decode::<Checkpoint>("checkpoint", kv.value()).map(|c| c.seq))
            .transpose()
    }

    async fn head(&self) -> Result<Option<(u64, String)>> {
        Ok(self
            .get::<Head>("ledger head", &self.key("head"))
            .await?
            .map(|h| (h.seq, h.hash)))
    }

    async fn events(&self, after: u64) -> Result<Vec<Event>> {
        Ok(self
            .logged(after)
            .await?
            .into_iter()
            .map(|l| l.event)
            .collect())
    }
}

/// This node's own state, as the node store beside it keeps it.
impl<N: NodeState> NodeState for EtcdState<N> {
    fn put_instance(&self, instance: &InstanceRecord) -> Result<()> {
        self.node.put_instance(instance)
    }

    fn remove_instance(&self, id: &str) -> Result<()> {
        self.node.remove_instance(id)
    }

    fn instances(&self) -> Result<Vec<InstanceRecord>> {
        self.node.instances()
    }
}

/// A real etcd for tests: Debian's `etcd-server`, in a temporary
/// directory, on free loopback ports, stopped (by its pid) when dropped.
#[cfg(test)]
pub(crate) mod testing {
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    pub struct Etcd {
        child: Child,
        pub endpoint: String,
        _dir: tempfile::TempDir,
    }

    impl Etcd {
        pub async fn start() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let (client, peer) = (
                crate::router::testing::free_port(),
                crate::router::testing::free_port(),
            );
            let endpoint = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let child = Command::new("etcd")
                .arg("--data-dir")
                .arg(dir.path().join("data"))
                .args(["--listen-client-urls", &endpoint])
                .args(["--advertise-client-urls", &endpoint])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("default={peer_url}")])
                // A single member elects itself at once.
                .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
                .args(["--log-level", "error"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("etcd (apt-get install etcd-server) starts");
            let etcd = Self {
                child,
                endpoint,
                _dir: dir,
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(mut c) = etcd_client::Client::connect([&etcd.endpoint], None).await
                    && c.get("probe", None).await.is_ok()
                {
                    return etcd;
                }
                assert!(Instant::now() < deadline, "etcd did not start in 30 s");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Etcd;

    async fn fresh() -> (Etcd, super::EtcdState<crate::state::MemoryState>) {
        let etcd = Etcd::start().await;
        let state = super::EtcdState::connect(
            std::slice::from_ref(&etcd.endpoint),
            super::DEFAULT_PREFIX,
            crate::state::MemoryState::new(),
            None,
        )
        .await
        .unwrap();
        (etcd, state)
    }
    crate::state::contract::contract_tests!(fresh);

    async fn client(etcd: &Etcd, prefix: &str) -> super::EtcdState<crate::state::MemoryState> {
        super::EtcdState::connect(
            std::slice::from_ref(&etcd.endpoint),
            prefix,
            crate::state::MemoryState::new(),
            None,
        )
        .await
        .unwrap()
    }

    /// Two agents (two clients, as two nodes are) on one etcd: appends from
    /// both make one chain with no sequence number twice, a change guarded
    /// on a version one of them read loses to the other's, and a watch on
    /// one wakes for the other's write.
    #[tokio::test]
    async fn two_clients_share_one_chain_and_race_fairly() {
        use crate::state::contract::{event, release, service, web};
        use crate::state::{ClusterState, Guard, StateError};
        let etcd = Etcd::start().await;
        let (a, b) = (
            client(&etcd, super::DEFAULT_PREFIX).await,
            client(&etcd, super::DEFAULT_PREFIX).await,
        );
        let appends = (0..20).map(|i| {
            let (a, b) = (&a, &b);
            async move {
                let by = if i % 2 == 0 { a } else { b };
                by.append_event(&event(&format!("e{i}"))).await.unwrap()
            }
        });
        let mut seqs = futures_util::future::join_all(appends).await;
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=20).collect::<Vec<u64>>(), "each number once");
        let entries = b.ledger(0).await.unwrap();
        kiln_core::ledger::verify(&entries, &[], &[0; 32]).expect("one unbroken chain");

        let name = web();
        a.record_apply(
            &service(&name, 1, 1),
            Some(&release(1)),
            &[event("a")],
            Guard::version(0),
        )
        .await
        .unwrap();
        let v = b.service(&name).await.unwrap().unwrap().version;
        let (s2, s3, r2, r3) = (
            service(&name, 2, 2),
            service(&name, 3, 3),
            release(2),
            release(3),
        );
        let (ex, ey) = ([event("x")], [event("y")]);
        let (x, y) = tokio::join!(
            a.record_apply(&s2, Some(&r2), &ex, Guard::version(v)),
            b.record_apply(&s3, Some(&r3), &ey, Guard::version(v)),
        );
        assert!(
            matches!(
                (&x, &y),
                (Ok(()), Err(StateError::Conflict { .. }))
                    | (Err(StateError::Conflict { .. }), Ok(()))
            ),
            "exactly one wins: {x:?} {y:?}"
        );

        // A watch on `a` from the head wakes when `b` writes.
        let head = a.head().await.unwrap().unwrap().0;
        let watch = tokio::spawn(async move { a.watch(head).await.unwrap() });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!watch.is_finished(), "nothing new yet");
        let seq = b.append_event(&event("wake")).await.unwrap();
        let woke = tokio::time::timeout(std::time::Duration::from_secs(10), watch)
            .await
            .expect("the watch woke")
            .unwrap();
        assert_eq!(woke.iter().map(|e| e.seq).collect::<Vec<_>>(), [seq]);
    }

    /// Two clusters on one etcd under two prefixes see nothing of each
    /// other.
    #[tokio::test]
    async fn prefixes_keep_clusters_apart() {
        use crate::state::contract::{event, release, service, web};
        use crate::state::{ClusterState, Guard};
        let etcd = Etcd::start().await;
        let (a, b) = (client(&etcd, "/one/").await, client(&etcd, "/two/").await);
        a.record_apply(
            &service(&web(), 1, 1),
            Some(&release(1)),
            &[event("a")],
            Guard::NONE,
        )
        .await
        .unwrap();
        assert!(b.services().await.unwrap().is_empty());
        assert!(b.events(0).await.unwrap().is_empty());
        assert_eq!(a.services().await.unwrap().len(), 1);
    }

    /// An etcd that cannot be reached is refused when the state opens, in
    /// one line naming it.
    #[tokio::test]
    async fn an_unreachable_etcd_is_refused_at_once() {
        let port = crate::router::testing::free_port();
        let url = format!("http://127.0.0.1:{port}");
        let e = super::EtcdState::connect(
            std::slice::from_ref(&url),
            super::DEFAULT_PREFIX,
            crate::state::MemoryState::new(),
            None,
        )
        .await
        .err()
        .expect("refused");
        let line = e.to_string();
        assert!(line.contains(&url) && !line.contains('\n'), "{line}");
    }

    #[test]
    fn a_prefix_ends_after_every_key_under_it() {
        assert_eq!(super::prefix_end("/kiln/"), b"/kiln0");
        assert_eq!(super::prefix_end("a\u{7f}"), b"a\x80");
        assert_eq!(super::prefix_end(""), [0]);
    }
}
