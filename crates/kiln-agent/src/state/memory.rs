//! [`ClusterState`] and [`NodeState`] in memory: the same contract as SQLite (`contract.rs`
//! runs the same tests on both), for tests and benchmarks of what sits
//! above the trait. Nothing survives the process; the agent never uses it.
//!
//! Faithful where it matters: every method is all or nothing (a change
//! that fails leaves no trace, as a rolled-back transaction), lists come in
//! the same order, updating what does not exist changes nothing and is no
//! error (as an SQL `UPDATE` that matches no row), and events only grow.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use kiln_core::auth::{TokenName, TokenRecord};
use kiln_core::release::{Outcome, Release};
use kiln_core::rollout::assign::{Assignment, Observation};
use kiln_core::rollout::{Routing, SavedRollout};
use kiln_core::secret::{Sealed, SecretValue};
use kiln_core::spec::ServiceName;

use super::{
    Assigned, ClusterState, Event, Fence, Guard, InstanceRecord, NewEvent, NodeCounters, NodeState,
    Result, ServiceRecord, StateError, now,
};

#[derive(Default)]
pub struct MemoryState {
    inner: Mutex<Inner>,
    /// The last event's sequence number, for watchers.
    head: super::Head,
}

#[derive(Default)]
struct Inner {
    services: BTreeMap<ServiceName, ServiceRecord>,
    /// Each service's saved rollout (gone with the service).
    rollouts: BTreeMap<ServiceName, SavedRollout>,
    /// Each service's assignments, and what each node observed (gone with
    /// the service).
    assignments: BTreeMap<ServiceName, Assigned>,
    /// The drained nodes.
    drained: std::collections::BTreeSet<String>,
    /// The paused services.
    paused: BTreeMap<ServiceName, u64>,
    observations: BTreeMap<(ServiceName, String), Vec<Observation>>,
    /// Each node's counters of each service.
    counters: BTreeMap<(ServiceName, String), NodeCounters>,
    releases: BTreeMap<(ServiceName, u64), Release>,
    /// By id (the order `instances()` lists them in).
    instances: BTreeMap<String, InstanceRecord>,
    events: Vec<Event>,
    secret_key: Option<[u8; 32]>,
    secrets: BTreeMap<Sealed, SecretValue>,
    tokens: BTreeMap<TokenName, TokenRecord>,
    ledger: Vec<kiln_core::ledger::Entry>,
    checkpoints: BTreeMap<u64, kiln_core::ledger::Checkpoint>,
    node_keys: BTreeMap<String, String>,
    /// The newest fence handed out.
    fence: u64,
}

impl MemoryState {
    pub fn new() -> Self {
        Self::default()
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // Every method checks before it changes anything, so a panic can
        // leave no half-made change behind: a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A change, made under the lock; watchers hear of the events it
    /// appended once the lock is let go.
    fn write<T>(&self, change: impl FnOnce(&mut Inner) -> Result<T>) -> Result<T> {
        let (done, head) = {
            let mut inner = self.inner();
            let done = change(&mut inner);
            (done, inner.events.len() as u64)
        };
        self.head.moved(head);
        done
    }
}

impl Inner {
    /// The guard's verdict on a change of `service`, before anything changes.
    fn check(&self, service: &ServiceName, guard: Guard) -> Result<()> {
        let version = self.services.get(service).map_or(0, |s| s.version);
        guard.check(service, version, Fence(self.fence))
    }

    /// The service's record was changed by the events just appended.
    fn bump(&mut self, service: &ServiceName) {
        let seq = self.events.len() as u64;
        if let Some(s) = self.services.get_mut(service) {
            s.version = seq;
        }
    }

    /// Refuse a release whose revision is taken, before anything changes.
    fn check_new(&self, release: Option<&Release>) -> Result<()> {
        match release {
            Some(r) if self.releases.contains_key(&(r.service.clone(), r.revision)) => {
                Err(StateError::ReleaseExists {
                    service: r.service.clone(),
                    revision: r.revision,
                })
            }
            _ => Ok(()),
        }
    }

    fn append(&mut self, e: &NewEvent) -> u64 {
        // Sequence numbers start at 1 and only grow (SQLite's
        // AUTOINCREMENT): nothing is ever removed.
        let seq = self.events.len() as u64 + 1;
        let time = now();
        let detail = serde_json::to_string(&e.change.detail()).unwrap_or_default();
        let prev = self
            .ledger
            .last()
            .map_or(kiln_core::ledger::GENESIS, |l| l.hash.as_str())
            .to_owned();
        self.ledger
            .push(super::ledger_entry(seq, time.clone(), e, detail).chained(&prev));
        self.events.push(Event {
            seq,
            time,
            actor: Some(e.actor),
            service: e.service.as_ref().map(|s| s.to_string()),
            revision: e.revision,
            instance: e.instance.clone(),
            change: e.change.clone(),
        });
        seq
    }

    fn set_outcome(
        &mut self,
        service: &ServiceName,
        revision: u64,
        outcome: Outcome,
        reason: Option<&str>,
    ) {
        if let Some(r) = self.releases.get_mut(&(service.clone(), revision)) {
            r.outcome = outcome;
            if let Some(reason) = reason {
                r.reason = Some(reason.to_owned());
            }
        }
    }

    /// An apply's writes; `check_new` has passed.
    fn apply(&mut self, service: &ServiceRecord, release: Option<&Release>, events: &[NewEvent]) {
        if let Some(r) = release {
            self.releases
                .insert((r.service.clone(), r.revision), r.clone());
        }
        self.services.insert(service.name.clone(), service.clone());
        for e in events {
            self.append(e);
        }
        self.bump(&service.name);
    }
}

#[async_trait::async_trait]
impl ClusterState for MemoryState {
    async fn services(&self) -> Result<Vec<ServiceRecord>> {
        Ok(self.inner().services.values().cloned().collect())
    }

    async fn service(&self, name: &ServiceName) -> Result<Option<ServiceRecord>> {
        Ok(self.inner().services.get(name).cloned())
    }

    async fn releases(&self, service: &ServiceName) -> Result<Vec<Release>> {
        let inner = self.inner();
        Ok(inner
            .releases
            .range((service.clone(), 0)..=(service.clone(), u64::MAX))
            .map(|(_, r)| r.clone())
            .collect())
    }

    async fn current_releases(&self, service: &ServiceName) -> Result<Vec<Release>> {
        let inner = self.inner();
        let target = inner.services.get(service).map(|s| s.target);
        let all = inner
            .releases
            .range((service.clone(), 0)..=(service.clone(), u64::MAX));
        let newest = all.clone().next_back().map(|(_, r)| r.revision);
        Ok(all
            .map(|(_, r)| r)
            .filter(|r| {
                matches!(r.outcome, Outcome::Pending | Outcome::Active)
                    || Some(r.revision) == target
                    || Some(r.revision) == newest
            })
            .cloned()
            .collect())
    }

    async fn all_releases(&self) -> Result<Vec<Release>> {
        // Keyed by (service, revision): already in that order.
        Ok(self.inner().releases.values().cloned().collect())
    }

    async fn release(&self, service: &ServiceName, revision: u64) -> Result<Option<Release>> {
        Ok(self
            .inner()
            .releases
            .get(&(service.clone(), revision))
            .cloned())
    }

    async fn record_apply(
        &self,
        service: &ServiceRecord,
        release: Option<&Release>,
        events: &[NewEvent],
        guard: Guard,
    ) -> Result<()> {
        self.write(|inner| {
            inner.check(&service.name, guard)?;
            inner.check_new(release)?;
            inner.apply(service, release, events);
            Ok(())
        })
    }

    async fn record_rollback(
        &self,
        service: &ServiceRecord,
        release: &Release,
        abandoned: Option<(u64, &str)>,
        events: &[NewEvent],
        guard: Guard,
    ) -> Result<()> {
        self.write(|inner| {
            inner.check(&service.name, guard)?;
            inner.check_new(Some(release))?;
            if let Some((revision, reason)) = abandoned {
                inner.set_outcome(&service.name, revision, Outcome::Failed, Some(reason));
            }
            inner.apply(service, Some(release), events);
            Ok(())
        })
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
        self.write(|inner| {
            inner.check(service, guard)?;
            inner.set_outcome(service, revision, outcome, reason);
            inner.append(event);
            Ok(())
        })
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
        self.write(|inner| {
            inner.check(service, guard)?;
            inner.set_outcome(service, revision, Outcome::Failed, Some(reason));
            if let Some(previous) = return_to {
                if let Some(s) = inner.services.get_mut(service) {
                    s.target = previous;
                }
                inner.set_outcome(service, previous, Outcome::Active, None);
            }
            for e in events {
                inner.append(e);
            }
            if return_to.is_some() {
                inner.bump(service);
            }
            Ok(())
        })
    }

    async fn remove_service(
        &self,
        name: &ServiceName,
        event: &NewEvent,
        guard: Guard,
    ) -> Result<()> {
        self.write(|inner| {
            inner.check(name, guard)?;
            inner.services.remove(name);
            inner.rollouts.remove(name);
            inner.assignments.remove(name);
            inner.observations.retain(|(s, _), _| s != name);
            inner.counters.retain(|(s, _), _| s != name);
            inner.append(event);
            Ok(())
        })
    }

    async fn rollout(&self, service: &ServiceName) -> Result<Option<SavedRollout>> {
        Ok(self.inner().rollouts.get(service).cloned())
    }

    async fn set_rollout(
        &self,
        service: &ServiceName,
        rollout: &SavedRollout,
        guard: Guard,
    ) -> Result<()> {
        self.write(|inner| {
            inner.check(service, guard)?;
            if inner.services.contains_key(service) {
                inner.rollouts.insert(service.clone(), rollout.clone());
            }
            Ok(())
        })
    }

    async fn assignments(&self, service: &ServiceName) -> Result<Option<Assigned>> {
        Ok(self.inner().assignments.get(service).cloned())
    }

    async fn assign(
        &self,
        service: &ServiceName,
        assignments: &[Assignment],
        routing: Option<Routing>,
        rollout: Option<&SavedRollout>,
        guard: Guard,
    ) -> Result<()> {
        self.write(|inner| {
            inner.check(service, guard)?;
            if inner.services.contains_key(service) {
                let kept = inner.assignments.get(service).and_then(|a| a.routing);
                inner.assignments.insert(
                    service.clone(),
                    Assigned {
                        list: assignments.to_vec(),
                        routing: routing.or(kept),
                    },
                );
                if let Some(r) = rollout {
                    inner.rollouts.insert(service.clone(), r.clone());
                }
            }
            Ok(())
        })
    }

    async fn observations(&self, service: &ServiceName) -> Result<Vec<Observation>> {
        let inner = self.inner();
        Ok(inner
            .observations
            .range((service.clone(), String::new())..)
            .take_while(|((s, _), _)| s == service)
            .flat_map(|(_, list)| list.iter().cloned())
            .collect())
    }

    async fn publish(
        &self,
        service: &ServiceName,
        node: &str,
        observations: &[Observation],
    ) -> Result<()> {
        let mut inner = self.inner();
        if inner.services.contains_key(service) {
            inner
                .observations
                .insert((service.clone(), node.to_owned()), observations.to_vec());
        }
        Ok(())
    }

    async fn publish_counters(
        &self,
        service: &ServiceName,
        node: &str,
        counters: &NodeCounters,
    ) -> Result<()> {
        let mut inner = self.inner();
        if inner.services.contains_key(service) {
            inner
                .counters
                .insert((service.clone(), node.to_owned()), counters.clone());
        }
        Ok(())
    }

    async fn counters(&self, service: &ServiceName) -> Result<BTreeMap<String, NodeCounters>> {
        Ok(self
            .inner()
            .counters
            .iter()
            .filter(|((s, _), _)| s == service)
            .map(|((_, node), c)| (node.clone(), c.clone()))
            .collect())
    }

    async fn lead(&self) -> Result<Fence> {
        let mut inner = self.inner();
        inner.fence += 1;
        Ok(Fence(inner.fence))
    }

    async fn append_event(&self, event: &NewEvent) -> Result<u64> {
        self.write(|inner| Ok(inner.append(event)))
    }

    async fn watch(&self, after: u64) -> Result<Vec<Event>> {
        self.head.watch(self, after, None).await
    }

    async fn secret_key(&self, fresh: [u8; 32]) -> Result<[u8; 32]> {
        Ok(*self.inner().secret_key.get_or_insert(fresh))
    }

    async fn put_secrets(&self, secrets: &[(Sealed, SecretValue)]) -> Result<()> {
        let mut inner = self.inner();
        for (sealed, value) in secrets {
            inner
                .secrets
                .entry(sealed.clone())
                .or_insert_with(|| value.clone());
        }
        Ok(())
    }

    async fn secret(&self, sealed: &Sealed) -> Result<Option<SecretValue>> {
        Ok(self.inner().secrets.get(sealed).cloned())
    }

    async fn put_token(&self, record: &TokenRecord, event: &NewEvent) -> Result<bool> {
        self.write(|inner| {
            if inner.tokens.contains_key(&record.name) {
                return Ok(false);
            }
            inner.tokens.insert(record.name, record.clone());
            inner.append(event);
            Ok(true)
        })
    }

    async fn token(&self, name: &TokenName) -> Result<Option<TokenRecord>> {
        Ok(self.inner().tokens.get(name).cloned())
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        Ok(self.inner().tokens.values().cloned().collect())
    }

    async fn revoke_token(&self, name: &TokenName, event: &NewEvent) -> Result<bool> {
        self.write(|inner| {
            if inner.tokens.remove(name).is_none() {
                return Ok(false);
            }
            inner.append(event);
            Ok(true)
        })
    }

    async fn set_drained(&self, node: &str, drained: bool, event: &NewEvent) -> Result<bool> {
        self.write(|inner| {
            let changed = if drained {
                inner.drained.insert(node.to_owned())
            } else {
                inner.drained.remove(node)
            };
            if changed {
                inner.append(event);
            }
            Ok(changed)
        })
    }

    async fn drained(&self) -> Result<std::collections::BTreeSet<String>> {
        Ok(self.inner().drained.clone())
    }

    async fn set_paused(
        &self,
        service: &ServiceName,
        timeout_ms: Option<u64>,
        event: &NewEvent,
    ) -> Result<bool> {
        self.write(|inner| {
            let changed = match timeout_ms {
                Some(t) => inner.paused.insert(service.clone(), t) != Some(t),
                None => inner.paused.remove(service).is_some(),
            };
            if changed {
                inner.append(event);
            }
            Ok(changed)
        })
    }

    async fn paused(&self) -> Result<BTreeMap<ServiceName, u64>> {
        Ok(self.inner().paused.clone())
    }

    async fn ledger(&self, after: u64) -> Result<Vec<kiln_core::ledger::Entry>> {
        let inner = self.inner();
        let from = usize::try_from(after)
            .unwrap_or(usize::MAX)
            .min(inner.ledger.len());
        Ok(inner.ledger[from..].to_vec())
    }

    async fn checkpoints(&self) -> Result<Vec<kiln_core::ledger::Checkpoint>> {
        Ok(self.inner().checkpoints.values().cloned().collect())
    }

    async fn put_checkpoint(&self, cp: &kiln_core::ledger::Checkpoint) -> Result<()> {
        self.inner()
            .checkpoints
            .entry(cp.seq)
            .or_insert_with(|| cp.clone());
        Ok(())
    }

    async fn put_node_key(&self, node: &str, key: &str) -> Result<()> {
        self.inner()
            .node_keys
            .entry(key.to_owned())
            .or_insert_with(|| node.to_owned());
        Ok(())
    }

    async fn node_keys(&self) -> Result<Vec<(String, String)>> {
        Ok(self
            .inner()
            .node_keys
            .iter()
            .map(|(k, n)| (k.clone(), n.clone()))
            .collect())
    }

    async fn last_checkpoint(&self) -> Result<Option<u64>> {
        Ok(self.inner().checkpoints.keys().next_back().copied())
    }

    async fn head(&self) -> Result<Option<(u64, String)>> {
        Ok(self.inner().ledger.last().map(|e| (e.seq, e.hash.clone())))
    }

    async fn events(&self, after: u64) -> Result<Vec<Event>> {
        let inner = self.inner();
        // seq n is at index n - 1.
        let from = usize::try_from(after)
            .unwrap_or(usize::MAX)
            .min(inner.events.len());
        Ok(inner.events[from..].to_vec())
    }
}

impl NodeState for MemoryState {
    fn put_instance(&self, instance: &InstanceRecord) -> Result<()> {
        self.inner()
            .instances
            .insert(instance.id.clone(), instance.clone());
        Ok(())
    }

    fn remove_instance(&self, id: &str) -> Result<()> {
        self.inner().instances.remove(id);
        Ok(())
    }

    fn instances(&self) -> Result<Vec<InstanceRecord>> {
        Ok(self.inner().instances.values().cloned().collect())
    }
}
