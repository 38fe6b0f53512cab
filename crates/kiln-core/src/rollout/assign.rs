//! Fleet decisions apart from node work. The **leader** (on one node, the
//! agent itself; in a cluster, the node holding the lease) decides for
//! the whole fleet: it builds the [`View`](super::View) from what the
//! nodes published ([`Observation`]s, through the state store), asks
//! [`decide`](super::decide), and turns the decision's steps into
//! [`Assignment`]s — start this release in this slot on this node, stop
//! that instance. Each node's **worker** compares its assignments with what
//! it runs ([`work`]) and carries that out, then publishes what it sees.
//! Both sides are pure here; the agent carries them out.
//!
//! The protocol, so that nothing is started twice or forgotten:
//! - An assignment exists from the leader's decision until its instance is
//!   gone: the worker reports the end (an observation with `gone`), and
//!   only then does the leader drop it ([`settle`]).
//! - An assignment not observed yet (its node has not started it) counts
//!   in the view as an instance not ready: the leader never starts a slot
//!   twice while a node is slow to act.
//! - A worker stops what it runs without an assignment: no instance runs
//!   that the leader does not know of.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;

use serde::{Deserialize, Serialize};

use super::pass::{Seen, Step, StopReason};
use super::saved::Clock;
use crate::resources::{Amount, Resources, Room};

/// The leader's word to a node: run this instance (or stop it).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Assignment<Id = String> {
    /// Chosen by the leader, unique in the cluster.
    pub id: Id,
    pub node: String,
    pub revision: u64,
    pub slot: u32,
    /// Taken over by a release with the same content (a warm rollback).
    #[serde(default)]
    pub adopted: bool,
    /// The leader decided it stops, and why.
    #[serde(default)]
    pub stop: Option<StopReason>,
    /// What its release declares it uses: reserved on its node until the
    /// instance is gone.
    #[serde(default, skip_serializing_if = "Resources::is_none")]
    pub resources: Resources,
}

impl<Id: Clone> Assignment<Id> {
    /// Its instance gone as its node reports it when it never saw it run
    /// (it could not start, or it ended while no agent ran): never ready.
    pub fn gone(&self, failed: bool) -> Observation<Id> {
        Observation {
            id: self.id.clone(),
            revision: self.revision,
            slot: self.slot,
            stopping: self.stop.is_some(),
            ready_since_ms: None,
            live: true,
            adopted: self.adopted,
            stale: false,
            gone: Some(failed),
            refused: false,
            port: 0,
        }
    }

    /// Its node could not start it at all: gone, failed, and refused (the
    /// leader starts its slot on another node).
    pub fn refused(&self) -> Observation<Id> {
        Observation {
            refused: true,
            ..self.gone(true)
        }
    }
}

/// What a node says of an instance it runs (or ran).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Observation<Id = String> {
    pub id: Id,
    pub revision: u64,
    pub slot: u32,
    /// Draining or ending.
    pub stopping: bool,
    /// Passing its readiness probe since then (wall-clock milliseconds).
    pub ready_since_ms: Option<u64>,
    /// Passing its liveness probe (or it has none).
    pub live: bool,
    pub adopted: bool,
    /// What it runs drifted from its release.
    pub stale: bool,
    /// It ended (or could not start): `Some(failed)`, failed when it
    /// exited unasked or never started.
    pub gone: Option<bool>,
    /// Its node could not start it at all (no image, no runtime, a volume
    /// it cannot make): the leader places the slot on another node.
    #[serde(default)]
    pub refused: bool,
    /// Where it listens on its node's advertised address (0: not known):
    /// the other nodes' routers send to it there.
    #[serde(default)]
    pub port: u16,
}

impl<Id> Observation<Id> {
    /// The same observation with its id in another form (a node hashes
    /// what it sees with ids borrowed, and publishes them owned).
    pub fn map_id<J>(self, f: impl FnOnce(Id) -> J) -> Observation<J> {
        Observation {
            id: f(self.id),
            revision: self.revision,
            slot: self.slot,
            stopping: self.stopping,
            ready_since_ms: self.ready_since_ms,
            live: self.live,
            adopted: self.adopted,
            stale: self.stale,
            gone: self.gone,
            refused: self.refused,
            port: self.port,
        }
    }
}

/// What a node runs, as its worker compares it with its assignments
/// (its id borrowed from the worker's own records).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Running<'a, Id = String> {
    pub id: &'a Id,
    pub revision: u64,
    pub slot: u32,
    pub stopping: bool,
}

/// A failure the leader counts against a slot (its back-off, and a crash
/// loop's detection).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub revision: u64,
    pub slot: u32,
    /// When the instance had been ready since (a long-ready one that dies
    /// does not count as a crash loop).
    pub ready_since_ms: Option<u64>,
}

/// The leader takes in what the nodes published: an instance gone drops
/// its assignment; one that ended unasked, or failed its liveness probe,
/// is a failure of its slot, counted once (`counted` remembers, across
/// passes, the instances counted while still there).
pub fn settle<Id: Clone + Ord>(
    assignments: &mut Vec<Assignment<Id>>,
    observations: &[Observation<Id>],
    counted: &mut BTreeSet<Id>,
) -> Vec<Failure> {
    let mut failures = Vec::new();
    let mut gone: BTreeSet<&Id> = BTreeSet::new();
    for o in observations {
        let failure = Failure {
            revision: o.revision,
            slot: o.slot,
            ready_since_ms: o.ready_since_ms,
        };
        match o.gone {
            Some(failed) => {
                gone.insert(&o.id);
                // Counted while it was there (its liveness), or now; one
                // no longer assigned was taken in already (the same
                // observations read twice count once).
                if !counted.remove(&o.id) && failed && assignments.iter().any(|a| a.id == o.id) {
                    failures.push(failure);
                }
            }
            None if !o.live && counted.insert(o.id.clone()) => failures.push(failure),
            None => {}
        }
    }
    assignments.retain(|a| !gone.contains(&a.id));
    failures
}

/// The leader's view of the fleet: every assignment, as its node observed
/// it (not ready until it did); a stop decided counts at once.
pub fn seen<Id: Clone + Eq + Hash>(
    assignments: &[Assignment<Id>],
    observations: &[Observation<Id>],
    clock: &Clock,
) -> Vec<Seen<Id>> {
    let observed: HashMap<&Id, &Observation<Id>, _> = observations
        .iter()
        .filter(|o| o.gone.is_none())
        .map(|o| (&o.id, o))
        .collect_fast(observations.len());
    assignments
        .iter()
        .map(|a| {
            let o = observed.get(&a.id);
            Seen {
                id: a.id.clone(),
                revision: a.revision,
                slot: a.slot,
                stopping: a.stop.is_some() || o.is_some_and(|o| o.stopping),
                ready_since: o
                    .and_then(|o| o.ready_since_ms)
                    .map(|ms| clock.to_instant(ms)),
                live: o.is_none_or(|o| o.live),
                adopted: a.adopted || o.is_some_and(|o| o.adopted),
                stale: o.is_some_and(|o| o.stale),
                drained: false,
            }
        })
        .collect()
}

/// The assignments after a decision's steps, each new instance on a node
/// of `nodes` with `room` left for what its release declares (`demand`),
/// the one that runs the fewest of the service's instances not being
/// stopped (replicas spread: no two on one node while another has room),
/// the first in `nodes`' order on a tie — among those `refused` does not
/// name for its release, unless every one with room does (`new_id` names
/// them). A start that no node has room for (or with no node at all) is
/// left out: the next decision asks for it again. `target`: the release an
/// adopted instance moves to. How many starts were left out.
#[allow(clippy::too_many_arguments)]
pub fn assign<Id: Clone + PartialEq>(
    assignments: &mut Vec<Assignment<Id>>,
    steps: &[Step<Id>],
    target: u64,
    nodes: &[String],
    room: &Room,
    demand: impl Fn(u64) -> Resources,
    refused: impl Fn(&str, u64) -> bool,
    mut new_id: impl FnMut(u64) -> Id,
) -> usize {
    // What placement counts, kept as the steps go (a decision that starts
    // a thousand instances over a hundred nodes must not count the fleet
    // again for each): each node's running instances and what it has
    // left, by its index in `nodes`, and the nodes willing to run each
    // release.
    let index: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let mut load: Option<(Vec<usize>, Vec<Amount>)> = None;
    let mut willing: HashMap<u64, Vec<usize>> = HashMap::new();
    let mut unplaced = 0;
    for step in steps {
        match step {
            Step::Start { revision, slot } => {
                let (load, free) = load.get_or_insert_with(|| {
                    let mut l = vec![0; nodes.len()];
                    for a in assignments.iter().filter(|a| a.stop.is_none()) {
                        if let Some(&i) = index.get(a.node.as_str()) {
                            l[i] += 1;
                        }
                    }
                    (l, nodes.iter().map(|n| room.free(n)).collect())
                });
                let ok = willing.entry(*revision).or_insert_with(|| {
                    (0..nodes.len())
                        .filter(|&i| !refused(&nodes[i], *revision))
                        .collect()
                });
                let need = demand(*revision);
                // The first of the fewest with room, among the willing (all
                // of those with room when none of them is willing).
                let best = ok
                    .iter()
                    .copied()
                    .filter(|&i| free[i].fits(&need))
                    .min_by_key(|&i| load[i])
                    .or_else(|| {
                        (0..nodes.len())
                            .filter(|&i| free[i].fits(&need))
                            .min_by_key(|&i| load[i])
                    });
                let Some(i) = best else {
                    unplaced += 1;
                    continue;
                };
                load[i] += 1;
                free[i] = free[i].minus(Amount::default().plus(&need));
                assignments.push(Assignment {
                    id: new_id(*revision),
                    node: nodes[i].clone(),
                    revision: *revision,
                    slot: *slot,
                    adopted: false,
                    stop: None,
                    resources: need,
                });
            }
            Step::Stop { ids, reason } => {
                // (What it reserved stays reserved until it is gone.)
                for a in assignments.iter_mut().filter(|a| ids.contains(&a.id)) {
                    if a.stop.is_none()
                        && let (Some((load, _)), Some(&i)) =
                            (load.as_mut(), index.get(a.node.as_str()))
                    {
                        load[i] = load[i].saturating_sub(1);
                    }
                    a.stop.get_or_insert(*reason);
                }
            }
            Step::Adopt { id, slot, .. } => {
                if let Some(a) = assignments.iter_mut().find(|a| a.id == *id) {
                    (a.revision, a.slot, a.adopted) = (target, *slot, true);
                }
            }
            Step::SlotStable { .. }
            | Step::Route
            | Step::Record(_)
            | Step::Activate
            | Step::Fail { .. } => {}
        }
    }
    unplaced
}

/// What a node's worker does to make what it runs match its assignments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Work<Id = String> {
    /// Assigned and not running: start them (with the leader's ids).
    pub start: Vec<Assignment<Id>>,
    /// Running under another release or slot than assigned: relabel them
    /// (a warm instance taken over).
    pub relabel: Vec<Assignment<Id>>,
    /// Assigned to stop and not stopping yet.
    pub stop: Vec<(Id, StopReason)>,
    /// Running with no assignment: stopped, the leader knows nothing of
    /// them.
    pub orphans: Vec<Id>,
}

/// Compare `node`'s assignments with what it runs. `ended`: instances of
/// this node already gone (reported, not to start again).
pub fn work<Id: Clone + Ord + Hash>(
    node: &str,
    assignments: &[Assignment<Id>],
    running: &[Running<'_, Id>],
    ended: &BTreeSet<Id>,
) -> Work<Id> {
    let mine: HashMap<&Id, &Assignment<Id>, _> = assignments
        .iter()
        .filter(|a| a.node == node)
        .map(|a| (&a.id, a))
        .collect_fast(assignments.len());
    let runs: HashMap<&Id, &Running<'_, Id>, _> = running
        .iter()
        .map(|r| (r.id, r))
        .collect_fast(running.len());
    let mut w = Work {
        start: Vec::new(),
        relabel: Vec::new(),
        stop: Vec::new(),
        orphans: Vec::new(),
    };
    // In the assignments' order (a map's order is not a stable one).
    for a in assignments.iter().filter(|a| a.node == node) {
        let id = &a.id;
        match runs.get(id) {
            None if a.stop.is_none() && !ended.contains(id) => w.start.push(a.clone()),
            None => {}
            Some(r) => {
                if let Some(reason) = a.stop {
                    if !r.stopping {
                        w.stop.push((a.id.clone(), reason));
                    }
                } else if (r.revision, r.slot) != (a.revision, a.slot) {
                    w.relabel.push(a.clone());
                }
            }
        }
    }
    w.orphans = running
        .iter()
        .filter(|r| !r.stopping && !mine.contains_key(r.id))
        .map(|r| r.id.clone())
        .collect();
    w
}

/// An instance of another node that this node's router may send to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer<'a> {
    pub id: &'a str,
    pub node: &'a str,
    pub revision: u64,
    pub port: u16,
}

/// The instances of nodes other than `node` that take traffic: assigned
/// and not told to stop, observed ready, live, not stopping nor gone, on a
/// known port. An instance the leader stops leaves every router as soon as
/// its assignment says so, before its own node has acted on it.
pub fn peers<'a>(
    node: &str,
    assigned: &'a [Assignment],
    observed: &'a [Observation],
) -> Vec<Peer<'a>> {
    let serving: HashMap<&str, &Observation> = observed
        .iter()
        .filter(|o| {
            o.ready_since_ms.is_some() && o.live && !o.stopping && o.gone.is_none() && o.port != 0
        })
        .map(|o| (o.id.as_str(), o))
        .collect();
    assigned
        .iter()
        .filter(|a| a.node != node && a.stop.is_none())
        .filter_map(|a| {
            let o = serving.get(a.id.as_str())?;
            // (A relabelled instance serves its assignment's release.)
            Some(Peer {
                id: &a.id,
                node: &a.node,
                revision: a.revision,
                port: o.port,
            })
        })
        .collect()
}

/// The leader's bookkeeping of one service between passes: the
/// assignments as it last wrote them, what the nodes last published, the
/// instances it counted as failed while they were still there, and the
/// view made of them. The view is built when observations come in
/// ([`observe`](Self::observe)) and follows each decision's steps
/// ([`assign`](Self::assign)) without being built again: a pass over a
/// steady fleet copies nothing.
#[derive(Clone, Debug)]
pub struct Fleet<Id = String> {
    assigned: Vec<Assignment<Id>>,
    observations: Vec<Observation<Id>>,
    counted: BTreeSet<Id>,
    seen: Vec<Seen<Id>>,
    /// Bumped on every change of the assignments (a worker that already
    /// carried out this generation has nothing new to do).
    generation: u64,
    /// The nodes that could not start a release (its image missing, …):
    /// new instances of it go elsewhere while another node can take them.
    refused: BTreeSet<(String, u64)>,
    /// The drained nodes: their instances are replaced elsewhere.
    drained: BTreeSet<String>,
}

impl<Id> Default for Fleet<Id> {
    fn default() -> Self {
        Self {
            assigned: Vec::new(),
            observations: Vec::new(),
            counted: BTreeSet::new(),
            seen: Vec::new(),
            generation: 0,
            refused: BTreeSet::new(),
            drained: BTreeSet::new(),
        }
    }
}

impl<Id: Clone + Ord + Hash> Fleet<Id> {
    /// The assignments as read from the state store (a leader that starts;
    /// one whose write failed reads them again). What it counted stays
    /// counted.
    pub fn reset(&mut self, mut assigned: Vec<Assignment<Id>>, clock: &Clock) {
        // Those the leader already took in as gone stay dropped (a write
        // of that failed: the store still has them).
        let gone: BTreeSet<&Id> = self
            .observations
            .iter()
            .filter(|o| o.gone.is_some())
            .map(|o| &o.id)
            .collect();
        assigned.retain(|a| !gone.contains(&a.id));
        self.assigned = assigned;
        self.generation += 1;
        self.seen = seen(&self.assigned, &self.observations, clock);
        self.mark_drained();
    }

    /// Take in what the nodes published ([`settle`]): the failures to
    /// count against their slots.
    pub fn observe(&mut self, observations: Vec<Observation<Id>>, clock: &Clock) -> Vec<Failure> {
        for o in observations
            .iter()
            .filter(|o| o.refused && o.gone.is_some())
        {
            if let Some(a) = self.assigned.iter().find(|a| a.id == o.id) {
                self.refused.insert((a.node.clone(), a.revision));
            }
        }
        let before = self.assigned.len();
        let failures = settle(&mut self.assigned, &observations, &mut self.counted);
        if self.assigned.len() != before {
            self.generation += 1;
        }
        self.observations = observations;
        self.seen = seen(&self.assigned, &self.observations, clock);
        self.mark_drained();
        failures
    }

    /// A decision's steps carried into the assignments ([`assign`]) and
    /// into the view, as [`seen`] would make it of them. How many starts
    /// no node had room for.
    pub fn assign(
        &mut self,
        steps: &[Step<Id>],
        target: u64,
        (nodes, room): (&[String], &Room),
        demand: impl Fn(u64) -> Resources,
        new_id: impl FnMut(u64) -> Id,
    ) -> usize {
        let before = self.assigned.len();
        let refused = &self.refused;
        let unplaced = assign(
            &mut self.assigned,
            steps,
            target,
            nodes,
            room,
            demand,
            |node, revision| refused.contains(&(node.to_owned(), revision)),
            new_id,
        );
        let mut changed = self.assigned.len() != before;
        for a in &self.assigned[before..] {
            self.seen.push(Seen {
                id: a.id.clone(),
                revision: a.revision,
                slot: a.slot,
                stopping: a.stop.is_some(),
                ready_since: None,
                live: true,
                adopted: a.adopted,
                stale: false,
                drained: self.drained.contains(&a.node),
            });
        }
        for step in steps {
            match step {
                Step::Stop { ids, .. } => {
                    for s in self.seen.iter_mut().filter(|s| ids.contains(&s.id)) {
                        changed |= !s.stopping;
                        s.stopping = true;
                    }
                }
                Step::Adopt { id, slot, .. } => {
                    if let Some(s) = self.seen.iter_mut().find(|s| s.id == *id) {
                        (s.revision, s.slot, s.adopted) = (target, *slot, true);
                        changed = true;
                    }
                }
                Step::Start { .. }
                | Step::SlotStable { .. }
                | Step::Route
                | Step::Record(_)
                | Step::Activate
                | Step::Fail { .. } => {}
            }
        }
        if changed {
            self.generation += 1;
        }
        unplaced
    }

    /// Nodes gone from the cluster (their leases expired): their
    /// assignments are dropped, so that their slots start elsewhere — no
    /// failure of the app's. How many were dropped.
    pub fn lose_nodes(&mut self, live: &[String], clock: &Clock) -> usize {
        let before = self.assigned.len();
        self.assigned.retain(|a| live.contains(&a.node));
        let lost = before - self.assigned.len();
        if lost > 0 {
            self.generation += 1;
            self.seen = seen(&self.assigned, &self.observations, clock);
            self.mark_drained();
        }
        lost
    }

    /// The drained nodes, as the cluster has them now: their instances
    /// are marked in the view (the decision replaces them on the others),
    /// and no new instance goes there ([`Self::nodes_for`]).
    pub fn drain(&mut self, drained: &BTreeSet<String>) {
        if *drained != self.drained {
            self.drained.clone_from(drained);
            self.mark_drained();
        }
    }

    /// The members a new instance may go to: those not drained (all of
    /// them when every one is).
    pub fn nodes_for(&self, members: &[String]) -> Vec<String> {
        let open: Vec<String> = members
            .iter()
            .filter(|m| !self.drained.contains(*m))
            .cloned()
            .collect();
        if open.is_empty() {
            members.to_vec()
        } else {
            open
        }
    }

    /// The view's instances on drained nodes, marked (the view is in the
    /// assignments' order).
    fn mark_drained(&mut self) {
        for (s, a) in self.seen.iter_mut().zip(&self.assigned) {
            s.drained = self.drained.contains(&a.node);
        }
    }

    pub fn assigned(&self) -> &[Assignment<Id>] {
        &self.assigned
    }

    pub fn observations(&self) -> &[Observation<Id>] {
        &self.observations
    }

    /// The leader's view of the fleet (as [`seen`] makes it).
    pub fn seen(&self) -> &[Seen<Id>] {
        &self.seen
    }

    /// Changes whenever the assignments do.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// Collecting into a map with a fast hash (the ids are not chosen by an
/// adversary: the leader picks them), sized at once.
trait CollectFast<K, V> {
    fn collect_fast(self, capacity: usize) -> HashMap<K, V, foldhash::fast::FixedState>;
}

impl<K: Eq + Hash, V, I: Iterator<Item = (K, V)>> CollectFast<K, V> for I {
    fn collect_fast(self, capacity: usize) -> HashMap<K, V, foldhash::fast::FixedState> {
        let mut map =
            HashMap::with_capacity_and_hasher(capacity, foldhash::fast::FixedState::with_seed(0));
        map.extend(self);
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// The placement rule, counted anew for each instance (what [`assign`]
    /// does incrementally): of the nodes of `nodes` that `fit`, the one that
    /// runs the fewest of the service's instances not being stopped, the
    /// first on a tie. `None` when there is none.
    fn place<'a, Id>(
        nodes: &'a [String],
        assigned: &[Assignment<Id>],
        fit: impl Fn(&str) -> bool,
    ) -> Option<&'a str> {
        nodes
            .iter()
            .filter(|n| fit(n))
            .min_by_key(|n| {
                assigned
                    .iter()
                    .filter(|a| a.node == **n && a.stop.is_none())
                    .count()
            })
            .map(String::as_str)
    }

    /// What [`assign`] does, one [`place`] per start (counting the fleet
    /// and what each node has left anew each time): the incremental counts
    /// must pick the same nodes.
    fn assign_by_place(
        assignments: &mut Vec<Assignment>,
        steps: &[Step<String>],
        nodes: &[String],
        refused: &BTreeSet<(String, u64)>,
        (capacity, demand): (&HashMap<String, Amount>, &dyn Fn(u64) -> Resources),
    ) {
        let mut n = 0;
        for step in steps {
            match step {
                Step::Start { revision, slot } => {
                    let need = demand(*revision);
                    let fit = |node: &str| {
                        let Some(c) = capacity.get(node) else {
                            return true;
                        };
                        let used = assignments
                            .iter()
                            .filter(|a| a.node == node)
                            .fold(Amount::default(), |u, a| u.plus(&a.resources));
                        c.minus(used).fits(&need)
                    };
                    let willing: Vec<String> = nodes
                        .iter()
                        .filter(|x| !refused.contains(&((*x).clone(), *revision)))
                        .cloned()
                        .collect();
                    let node = place(&willing, assignments, fit)
                        .or_else(|| place(nodes, assignments, fit))
                        .map(str::to_owned);
                    if let Some(node) = node {
                        n += 1;
                        assignments.push(Assignment {
                            id: format!("new{n}"),
                            node,
                            revision: *revision,
                            slot: *slot,
                            adopted: false,
                            stop: None,
                            resources: need,
                        });
                    }
                }
                Step::Stop { ids, reason } => {
                    for a in assignments.iter_mut().filter(|a| ids.contains(&a.id)) {
                        a.stop.get_or_insert(*reason);
                    }
                }
                _ => {}
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn counting_as_it_goes_places_as_counting_anew(
            existing in proptest::collection::vec((0usize..5, proptest::bool::ANY), 0..30),
            steps in proptest::collection::vec((0u8..3, 0usize..40, 1u64..3), 0..40),
            node_count in 0usize..5,
            refused in proptest::collection::btree_set((0usize..5, 1u64..3), 0..4),
            capacity in proptest::collection::vec(proptest::option::of((0u64..9, 0u64..9)), 5),
            demands in proptest::collection::vec((0u32..3, 0u64..3), 2),
        ) {
            let nodes: Vec<String> = (0..node_count).map(|i| format!("n{i}")).collect();
            // Half CPUs and 100 MiB steps; a node without a capacity has
            // no limit.
            let capacity: HashMap<String, Amount> = capacity
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    c.map(|(cpu, mem)| {
                        (format!("n{i}"), Amount { cpu_millis: cpu * 500, memory_bytes: (mem * 100) << 20 })
                    })
                })
                .collect();
            let demand = |rev: u64| {
                let (cpu, mem) = demands[usize::from(rev == 2)];
                Resources { cpu_millis: cpu * 500, memory_bytes: (mem * 100) << 20, pids: 0 }
            };
            let list: Vec<Assignment> = existing
                .iter()
                .enumerate()
                .map(|(i, (node, stopped))| Assignment {
                    id: format!("old{i}"),
                    node: format!("n{node}"),
                    revision: 1,
                    slot: i as u32,
                    adopted: false,
                    stop: stopped.then_some(StopReason::Replaced),
                    resources: demand(1),
                })
                .collect();
            let steps: Vec<Step<String>> = steps
                .iter()
                .map(|(kind, n, rev)| match kind {
                    0 | 1 => Step::Start { revision: *rev, slot: *n as u32 },
                    _ => Step::Stop {
                        ids: vec![format!("old{n}"), format!("new{n}")],
                        reason: StopReason::ScaledDown,
                    },
                })
                .collect();
            let refused: BTreeSet<(String, u64)> =
                refused.into_iter().map(|(n, r)| (format!("n{n}"), r)).collect();
            let room = Room::new(
                capacity.iter().map(|(n, c)| (n.clone(), *c)),
                list.iter().map(|a| (a.node.as_str(), &a.resources)),
            );
            let mut fast = list.clone();
            let mut made = 0;
            let unplaced = assign(
                &mut fast,
                &steps,
                1,
                &nodes,
                &room,
                demand,
                |n, r| refused.contains(&(n.to_owned(), r)),
                |_| {
                    made += 1;
                    format!("new{made}")
                },
            );
            let mut slow = list.clone();
            assign_by_place(&mut slow, &steps, &nodes, &refused, (&capacity, &demand));
            let starts = steps.iter().filter(|s| matches!(s, Step::Start { .. })).count();
            proptest::prop_assert_eq!(unplaced, starts - (slow.len() - list.len()));
            proptest::prop_assert_eq!(&fast, &slow);
            // No node holds more than it has, unless it did already.
            for (node, c) in &capacity {
                let used = |l: &[Assignment]| {
                    l.iter()
                        .filter(|a| a.node == *node)
                        .fold(Amount::default(), |u, a| u.plus(&a.resources))
                };
                let (before, after) = (used(&list), used(&fast));
                proptest::prop_assert!(
                    after == before
                        || (after.cpu_millis <= c.cpu_millis.max(before.cpu_millis)
                            && after.memory_bytes <= c.memory_bytes.max(before.memory_bytes))
                );
            }
        }
    }

    fn n1() -> Vec<String> {
        vec!["n1".to_owned()]
    }

    #[test]
    fn replicas_spread_over_nodes_and_leave_lost_ones() {
        let nodes: Vec<String> = ["n1", "n2", "n3"].map(str::to_owned).to_vec();
        let mut list = Vec::new();
        let starts: Vec<Step<String>> = (0..5)
            .map(|slot| Step::Start { revision: 1, slot })
            .collect();
        let mut n = 0;
        assign(
            &mut list,
            &starts,
            1,
            &nodes,
            &Room::default(),
            |_| Resources::default(),
            |_, _| false,
            |_| {
                n += 1;
                format!("i{n}")
            },
        );
        let on = |list: &[Assignment], node: &str| list.iter().filter(|a| a.node == node).count();
        assert_eq!(
            (on(&list, "n1"), on(&list, "n2"), on(&list, "n3")),
            (2, 2, 1),
            "no two on one node while another has fewer"
        );
        // A stopping instance makes room on its node.
        list[0].stop = Some(StopReason::Replaced);
        assert_eq!(place(&nodes, &list, |_| true), Some(list[0].node.as_str()));
        assert_eq!(place::<String>(&[], &list, |_| true), None);
        // With no node, nothing starts.
        let mut none = Vec::new();
        assign(
            &mut none,
            &starts,
            1,
            &[],
            &Room::default(),
            |_| Resources::default(),
            |_, _| false,
            |_| unreachable!(),
        );
        assert!(none.is_empty());

        let clock = Clock {
            now: Instant::now(),
            wall_ms: 1_000,
        };
        let mut fleet = Fleet::default();
        fleet.reset(list.clone(), &clock);
        let g = fleet.generation();
        assert_eq!(fleet.lose_nodes(&nodes, &clock), 0);
        assert_eq!(fleet.generation(), g, "nothing lost, nothing changed");
        assert_eq!(fleet.lose_nodes(&nodes[..2], &clock), 1);
        assert!(fleet.generation() > g);
        assert!(fleet.assigned().iter().all(|a| a.node != "n3"));
        assert_eq!(fleet.seen().len(), 4);
    }

    #[test]
    fn placement_stays_within_each_nodes_room() {
        let nodes: Vec<String> = ["n1", "n2", "n3"].map(str::to_owned).to_vec();
        let one_cpu = Resources {
            cpu_millis: 1000,
            memory_bytes: 64 << 20,
            pids: 0,
        };
        // n1 has two CPUs, n2 one, n3 one of which another service holds.
        let other = Assignment {
            node: "n3".to_owned(),
            resources: one_cpu,
            ..a("other", 1, 0)
        };
        let room = Room::new(
            [
                ("n1".to_owned(), Amount::capacity(2, 1024)),
                ("n2".to_owned(), Amount::capacity(1, 1024)),
                ("n3".to_owned(), Amount::capacity(1, 1024)),
            ],
            [("n3", &other.resources)],
        );
        let starts: Vec<Step<String>> = (0..4)
            .map(|slot| Step::Start { revision: 1, slot })
            .collect();
        let mut list = Vec::new();
        let mut n = 0;
        let unplaced = assign(
            &mut list,
            &starts,
            1,
            &nodes,
            &room,
            |_| one_cpu,
            |_, _| false,
            |_| {
                n += 1;
                format!("i{n}")
            },
        );
        let on = |node: &str| list.iter().filter(|a| a.node == node).count();
        assert_eq!((on("n1"), on("n2"), on("n3")), (2, 1, 0));
        assert_eq!(unplaced, 1, "no room left for the fourth");
        assert!(list.iter().all(|a| a.resources == one_cpu));
        // What declares nothing fits anywhere, spread as before.
        let mut free = Vec::new();
        let unplaced = assign(
            &mut free,
            &starts[..3],
            1,
            &nodes,
            &Room::new([("n1".to_owned(), Amount::default())], []),
            |_| Resources::default(),
            |_, _| false,
            |_| "x".to_owned(),
        );
        assert_eq!(unplaced, 0);
        assert_eq!(
            free.iter().map(|a| a.node.as_str()).collect::<Vec<_>>(),
            ["n1", "n2", "n3"]
        );
        // A stop does not free its share (it holds it until gone): the
        // same room after stopping one still has none.
        let mut again = list.clone();
        let stop = Step::Stop {
            ids: vec![list[0].id.clone()],
            reason: StopReason::Replaced,
        };
        let room = Room::new(
            [
                ("n1".to_owned(), Amount::capacity(2, 1024)),
                ("n2".to_owned(), Amount::capacity(1, 1024)),
                ("n3".to_owned(), Amount::capacity(1, 1024)),
            ],
            list.iter()
                .chain([&other])
                .map(|a| (a.node.as_str(), &a.resources)),
        );
        let unplaced = assign(
            &mut again,
            &[stop, starts[0].clone()],
            1,
            &nodes,
            &room,
            |_| one_cpu,
            |_, _| false,
            |_| unreachable!("no room"),
        );
        assert_eq!(unplaced, 1);
    }

    #[test]
    fn a_fleets_generation_moves_with_its_assignments_only() {
        let clock = Clock {
            now: Instant::now(),
            wall_ms: 1_000,
        };
        let mut fleet = Fleet::default();
        let g0 = fleet.generation();
        fleet.reset(vec![a("x", 1, 0), a("y", 1, 1)], &clock);
        assert!(fleet.generation() > g0, "a reset is a change");
        let stop = |id: &str| Step::Stop {
            ids: vec![id.to_owned()],
            reason: StopReason::Replaced,
        };
        let g1 = fleet.generation();
        fleet.assign(
            &[stop("x")],
            1,
            (&n1(), &Room::default()),
            |_| Resources::default(),
            |_| unreachable!(),
        );
        assert!(fleet.generation() > g1, "a stop alone is a change");
        let g2 = fleet.generation();
        fleet.assign(
            &[stop("x")],
            1,
            (&n1(), &Room::default()),
            |_| Resources::default(),
            |_| unreachable!(),
        );
        assert_eq!(fleet.generation(), g2, "stopping already: no change");
    }

    #[test]
    fn a_slot_its_node_refused_starts_on_another() {
        let clock = Clock {
            now: Instant::now(),
            wall_ms: 1_000,
        };
        let nodes: Vec<String> = ["n1", "n2"].map(str::to_owned).to_vec();
        let mut fleet = Fleet::default();
        // n1 runs nothing and would be chosen; it could not start release 1.
        let mut on_n1 = a("x", 1, 0);
        on_n1.node = "n1".to_owned();
        let mut on_n2 = a("y", 1, 1);
        on_n2.node = "n2".to_owned();
        fleet.reset(vec![on_n1.clone(), on_n2.clone()], &clock);
        // An instance that crashed there is no refusal: n1 stays a place.
        fleet.observe(vec![on_n1.gone(true)], &clock);
        let mut n0 = 0;
        fleet.assign(
            &[Step::Start {
                revision: 1,
                slot: 0,
            }],
            1,
            (&nodes, &Room::default()),
            |_| Resources::default(),
            |_| {
                n0 += 1;
                format!("crashed{n0}")
            },
        );
        assert_eq!(fleet.assigned().last().unwrap().node, "n1");
        // Another instance there could not start at all: refused.
        let mut refused_on_n1 = a("x2", 1, 0);
        refused_on_n1.node = "n1".to_owned();
        fleet.reset(vec![refused_on_n1.clone(), on_n2], &clock);
        fleet.observe(vec![refused_on_n1.refused()], &clock);
        let start = |revision| [Step::Start { revision, slot: 0 }];
        let mut n = 0;
        let mut id = |_| {
            n += 1;
            format!("new{n}")
        };
        fleet.assign(
            &start(1),
            1,
            (&nodes, &Room::default()),
            |_| Resources::default(),
            &mut id,
        );
        assert_eq!(
            fleet.assigned().last().unwrap().node,
            "n2",
            "not where it was refused"
        );
        // Another release may still go there.
        fleet.assign(
            &start(2),
            2,
            (&nodes, &Room::default()),
            |_| Resources::default(),
            &mut id,
        );
        assert_eq!(fleet.assigned().last().unwrap().node, "n1");
        // Every node refused it: it goes where placement says (and fails
        // there as the app's own failure would, with its back-off).
        let mut on_n2 = a("z", 3, 0);
        on_n2.node = "n2".to_owned();
        let mut on_n1 = a("w", 3, 1);
        on_n1.node = "n1".to_owned();
        fleet.reset(vec![on_n2.clone(), on_n1.clone()], &clock);
        fleet.observe(vec![on_n2.refused(), on_n1.refused()], &clock);
        fleet.assign(
            &start(3),
            3,
            (&nodes, &Room::default()),
            |_| Resources::default(),
            &mut id,
        );
        assert_eq!(fleet.assigned().len(), 1, "{:?}", fleet.assigned());
    }

    fn a(id: &str, revision: u64, slot: u32) -> Assignment {
        Assignment {
            id: id.to_owned(),
            node: "n1".to_owned(),
            revision,
            slot,
            adopted: false,
            stop: None,
            resources: Default::default(),
        }
    }

    fn obs(id: &str, revision: u64, slot: u32) -> Observation {
        Observation {
            id: id.to_owned(),
            revision,
            slot,
            stopping: false,
            ready_since_ms: Some(1_000),
            live: true,
            adopted: false,
            stale: false,
            gone: None,
            refused: false,
            port: 0,
        }
    }

    fn run(id: &'static String, revision: u64, slot: u32) -> Running<'static> {
        Running {
            id,
            revision,
            slot,
            stopping: false,
        }
    }

    /// An id that lives as long as the test (`Running` borrows it).
    fn id(s: &str) -> &'static String {
        Box::leak(Box::new(s.to_owned()))
    }

    #[test]
    fn peers_are_the_other_nodes_instances_that_serve() {
        let on = |id: &str, node: &str, revision: u64| Assignment {
            node: node.to_owned(),
            ..a(id, revision, 0)
        };
        let serving = |id: &str, port: u16| Observation {
            port,
            ..obs(id, 1, 0)
        };
        let mut told = on("told", "n2", 1);
        told.stop = Some(StopReason::Replaced);
        let assigned = vec![
            on("mine", "n1", 1),
            on("far", "n2", 2),
            told,
            on("unready", "n2", 1),
            on("dying", "n3", 1),
            on("sick", "n3", 1),
            on("ended", "n3", 1),
            on("portless", "n3", 1),
            on("unseen", "n3", 1),
        ];
        let observed = vec![
            serving("mine", 1),
            // (A relabelled instance serves its assignment's release.)
            serving("far", 2),
            serving("told", 3),
            Observation {
                ready_since_ms: None,
                ..serving("unready", 4)
            },
            Observation {
                stopping: true,
                ..serving("dying", 5)
            },
            Observation {
                live: false,
                ..serving("sick", 6)
            },
            Observation {
                gone: Some(false),
                ..serving("ended", 7)
            },
            serving("portless", 0),
        ];
        assert_eq!(
            peers("n1", &assigned, &observed),
            vec![Peer {
                id: "far",
                node: "n2",
                revision: 2,
                port: 2
            }]
        );
        // From another node, this one's instance is a peer.
        let from_n2: Vec<&str> = peers("n2", &assigned, &observed)
            .iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(from_n2, vec!["mine"]);
    }

    #[test]
    fn an_instance_never_seen_running_is_reported_gone_as_never_ready() {
        let mut stopped = a("x", 2, 1);
        stopped.adopted = true;
        stopped.stop = Some(StopReason::Replaced);
        let gone = stopped.gone(true);
        assert_eq!(
            gone,
            Observation {
                id: "x".to_owned(),
                revision: 2,
                slot: 1,
                stopping: true,
                ready_since_ms: None,
                live: true,
                adopted: true,
                stale: false,
                gone: Some(true),
                refused: false,
                port: 0,
            }
        );
        assert_eq!(a("y", 1, 0).gone(false).gone, Some(false));
        let refused = a("y", 1, 0).refused();
        assert!(refused.refused && refused.gone == Some(true));
        assert!(!a("y", 1, 0).gone(false).stopping);
        // Another form of its id, nothing else changed.
        let borrowed = gone.clone().map_id(|id| id.len());
        assert_eq!(borrowed.id, 1);
        assert_eq!(borrowed.map_id(|_| "x".to_owned()), gone);
    }

    #[test]
    fn a_decision_becomes_assignments() {
        let mut list = vec![a("x", 1, 0), a("y", 1, 1)];
        let mut n = 0;
        assign(
            &mut list,
            &[
                Step::Start {
                    revision: 2,
                    slot: 0,
                },
                Step::Stop {
                    ids: vec!["x".to_owned()],
                    reason: StopReason::Replaced,
                },
                Step::Adopt {
                    id: "y".to_owned(),
                    from: 1,
                    slot: 1,
                },
                Step::Route,
            ],
            3,
            &["n2".to_owned()],
            &Room::default(),
            |_| Resources::default(),
            |_, _| false,
            |rev| {
                n += 1;
                format!("new-{rev}-{n}")
            },
        );
        let mut started = a("new-2-1", 2, 0);
        started.node = "n2".to_owned();
        let mut stopped = a("x", 1, 0);
        stopped.stop = Some(StopReason::Replaced);
        let mut adopted = a("y", 3, 1);
        adopted.adopted = true;
        assert_eq!(list, [stopped, adopted, started]);
        // A second stop keeps the first reason.
        assign(
            &mut list,
            &[Step::Stop {
                ids: vec!["x".to_owned()],
                reason: StopReason::Shutdown,
            }],
            3,
            &n1(),
            &Room::default(),
            |_| Resources::default(),
            |_, _| false,
            |_| unreachable!("nothing starts"),
        );
        assert_eq!(list[0].stop, Some(StopReason::Replaced));
    }

    #[test]
    fn the_view_counts_what_is_assigned_and_not_observed_yet() {
        let clock = Clock {
            now: Instant::now(),
            wall_ms: 5_000,
        };
        let mut stopping = a("s", 1, 2);
        stopping.stop = Some(StopReason::ScaledDown);
        let assignments = [a("x", 1, 0), a("new", 2, 1), stopping];
        let mut unlive = obs("x", 1, 0);
        unlive.live = false;
        unlive.stale = true;
        let mut gone = obs("old", 1, 0);
        gone.gone = Some(true);
        let seen = seen(&assignments, &[unlive, gone, obs("s", 1, 2)], &clock);
        assert_eq!(seen.len(), 3, "only assignments, never a gone instance");
        assert_eq!(
            seen[0].ready_since,
            Some(clock.now - Duration::from_secs(4))
        );
        assert!(!seen[0].live && seen[0].stale && !seen[0].stopping);
        // Not observed yet: there, not ready, live.
        assert_eq!(seen[1].ready_since, None);
        assert!(seen[1].live && !seen[1].stopping && !seen[1].stale);
        assert_eq!((seen[1].revision, seen[1].slot), (2, 1));
        // A stop decided counts at once.
        assert!(seen[2].stopping);
        // The node's own stopping and adoption count too.
        let mut draining = obs("x", 1, 0);
        draining.stopping = true;
        draining.adopted = true;
        let s = super::seen(&[a("x", 1, 0)], &[draining], &clock);
        assert!(s[0].stopping && s[0].adopted);
    }

    #[test]
    fn failures_are_counted_once_and_gone_instances_dropped() {
        let mut list = vec![a("x", 1, 0), a("y", 1, 1), a("z", 1, 2)];
        let mut counted = BTreeSet::new();
        let mut unlive = obs("x", 1, 0);
        unlive.live = false;
        let mut crashed = obs("y", 1, 1);
        crashed.gone = Some(true);
        crashed.ready_since_ms = None;
        let failures = settle(
            &mut list,
            &[unlive.clone(), crashed, obs("z", 1, 2)],
            &mut counted,
        );
        assert_eq!(
            failures,
            [
                Failure {
                    revision: 1,
                    slot: 0,
                    ready_since_ms: Some(1_000)
                },
                Failure {
                    revision: 1,
                    slot: 1,
                    ready_since_ms: None
                }
            ]
        );
        assert_eq!(
            list.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
            ["x", "z"]
        );
        // Still not live: not counted again; then it goes, failed: not
        // counted a third time.
        assert!(settle(&mut list, &[unlive.clone()], &mut counted).is_empty());
        unlive.gone = Some(true);
        assert!(settle(&mut list, &[unlive], &mut counted).is_empty());
        assert!(counted.is_empty(), "forgotten once gone");
        // A stop asked for is no failure.
        let mut stopped = obs("z", 1, 2);
        stopped.gone = Some(false);
        assert!(settle(&mut list, &[stopped], &mut counted).is_empty());
        assert!(list.is_empty());
    }

    #[test]
    fn a_worker_starts_stops_relabels_and_ends_orphans() {
        let mut stop = a("s", 1, 1);
        stop.stop = Some(StopReason::Replaced);
        let mut stopped = a("t", 1, 3);
        stopped.stop = Some(StopReason::Replaced);
        let mut elsewhere = a("e", 1, 4);
        elsewhere.node = "n2".to_owned();
        let assignments = [
            a("new", 2, 0),
            stop,
            stopped,
            a("moved", 2, 2),
            elsewhere,
            a("ended", 2, 5),
            a("same", 1, 6),
        ];
        let mut draining = run(id("t"), 1, 3);
        draining.stopping = true;
        let mut old_draining = run(id("old"), 1, 7);
        old_draining.stopping = true;
        let running = [
            run(id("s"), 1, 1),
            draining,
            run(id("moved"), 1, 2),
            run(id("stray"), 1, 8),
            old_draining,
            run(id("same"), 1, 6),
        ];
        let ended = BTreeSet::from(["ended".to_owned()]);
        let w = work("n1", &assignments, &running, &ended);
        assert_eq!(w.start, [a("new", 2, 0)]);
        assert_eq!(w.stop, [("s".to_owned(), StopReason::Replaced)]);
        assert_eq!(w.relabel, [a("moved", 2, 2)]);
        assert_eq!(w.orphans, ["stray"]);
        // Another node's view of the same list.
        let w2 = work("n2", &assignments, &[], &BTreeSet::new());
        assert_eq!(w2.start.len(), 1);
        assert_eq!(w2.start[0].id, "e");
    }

    #[test]
    fn a_fleet_keeps_its_view_through_steps_and_counts_a_reread_once() {
        let clock = Clock {
            now: Instant::now(),
            wall_ms: 10_000,
        };
        let mut fleet = Fleet::default();
        fleet.reset(vec![a("x", 1, 0), a("y", 1, 1)], &clock);
        let g0 = fleet.generation();
        let mut crashed = obs("y", 1, 1);
        crashed.gone = Some(true);
        let observations = vec![obs("x", 1, 0), crashed];
        assert_eq!(fleet.observe(observations.clone(), &clock).len(), 1);
        assert!(fleet.generation() > g0, "an assignment dropped");
        // The same observations again (a re-read): nothing counted twice,
        // nothing changed.
        let g1 = fleet.generation();
        assert!(fleet.observe(observations, &clock).is_empty());
        assert_eq!(fleet.generation(), g1);
        // Steps that change nothing keep the generation.
        fleet.assign(
            &[Step::Route, Step::Activate],
            2,
            (&n1(), &Room::default()),
            |_| Resources::default(),
            |_| unreachable!(),
        );
        assert_eq!(fleet.generation(), g1);
        // A start, a stop and an adoption: the view follows, as built anew.
        let mut n = 0;
        fleet.assign(
            &[
                Step::Start {
                    revision: 2,
                    slot: 1,
                },
                Step::Stop {
                    ids: vec!["x".to_owned()],
                    reason: StopReason::Replaced,
                },
            ],
            2,
            (&n1(), &Room::default()),
            |_| Resources::default(),
            |_| {
                n += 1;
                format!("new{n}")
            },
        );
        assert!(fleet.generation() > g1);
        assert_eq!(
            fleet.seen(),
            seen(fleet.assigned(), fleet.observations(), &clock)
        );
        assert!(fleet.seen().iter().any(|s| s.id == "x" && s.stopping));
        let g2 = fleet.generation();
        fleet.assign(
            &[Step::Adopt {
                id: "new1".to_owned(),
                from: 2,
                slot: 4,
            }],
            3,
            (&n1(), &Room::default()),
            |_| Resources::default(),
            |_| unreachable!(),
        );
        assert!(fleet.generation() > g2);
        assert_eq!(
            fleet.seen(),
            seen(fleet.assigned(), fleet.observations(), &clock)
        );
        assert!(
            fleet
                .seen()
                .iter()
                .any(|s| s.id == "new1" && s.revision == 3 && s.slot == 4 && s.adopted)
        );
    }
}
