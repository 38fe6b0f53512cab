//! The strategies through [`decide`], with no process: a small simulated
//! service carries the steps out as the agent does, on the split: the
//! leader builds its view from the node's published observations, turns
//! the decision into assignments (`assign`), and the node's worker carries
//! them out (`assign::work`: a start adds an instance, a stop marks it
//! stopping and it is gone at the next tick, reported as gone); `Activate`
//! and `Fail` change the releases' outcomes as the state store does. Time
//! moves only when a test says so. Table tests pin
//! each strategy's steps; property tests check the invariants the README
//! promises over random fleets, settings and failures.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::assign::{self, Assignment, Fleet, Observation};
use super::pass::*;
use super::saved::Clock;
use crate::counters::Snapshot;
use crate::event::{Actor, Change};
use crate::health::{Backoff, SlotHistory};
use crate::release::{Outcome, ServiceSettings};
use crate::resources::{Resources, Room};
use crate::rollout::canary::fleet;
use crate::service::{self, AnalysisSpec, CanaryStep, Pause, Ratio, RolloutSpec, Strategy};
use crate::spec::ServiceName;

const TICK: Duration = Duration::from_millis(100);

/// How the instances of a release behave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    /// Ready one tick after it starts.
    Good,
    /// Never ready.
    NeverReady,
    /// Exits one tick after it starts.
    Crashes,
    /// Ready one tick after it starts, exits this many ticks after it
    /// started.
    CrashesAfter(u32),
}

struct Sim {
    name: ServiceName,
    now: Instant,
    settings: ServiceSettings,
    target: u64,
    outcomes: BTreeMap<u64, Outcome>,
    /// Releases with the same content, by revision: (revision, content).
    content: BTreeMap<u64, u32>,
    behaviour: BTreeMap<u64, Behaviour>,
    insts: Vec<Seen<u32>>,
    /// When each instance started.
    born: BTreeMap<u32, Instant>,
    slots: BTreeMap<(u64, u32), SlotHistory>,
    state: Rollout,
    routing: Routing,
    counters: BTreeMap<u64, Snapshot>,
    next_id: u32,
    /// Every step carried out, in order.
    log: Vec<Step<u32>>,
    starts: u32,
    /// The leader's assignments (all on one node, `n1`), what it last
    /// took in and its view.
    fleet: Fleet<u32>,
    /// The node's reports of instances gone since the leader's last pass.
    gone: Vec<Observation<u32>>,
    /// Instances the node ran that are gone (never started again).
    ended: BTreeSet<u32>,
    /// Wall-clock time at `born` of the first instance.
    epoch: Instant,
    /// The target's post_deploy hook failed, and how.
    hook_failed: Option<String>,
}

/// The one node of the simulation.
const NODE: &str = "n1";

fn settings(strategy: Strategy, replicas: u32) -> ServiceSettings {
    ServiceSettings {
        replicas,
        listen: None,
        route: Default::default(),
        tls: None,
        rollout: RolloutSpec {
            strategy,
            progress_deadline: service::Duration::from_secs(10),
            steps: vec![
                CanaryStep {
                    weight: 25,
                    pause: Pause::For(service::Duration::from_secs(1)),
                },
                CanaryStep {
                    weight: 100,
                    pause: Pause::default(),
                },
            ],
            ..RolloutSpec::default()
        },
        timeout: service::Duration::from_secs(30),
        router: service::RouterSpec::default(),
        node_labels: Default::default(),
        error_pages: Default::default(),
    }
}

impl Sim {
    /// A service whose release 1 runs `replicas` ready instances.
    fn steady(settings: ServiceSettings) -> Self {
        let mut sim = Sim {
            name: ServiceName::try_from("web").unwrap(),
            now: Instant::now(),
            settings,
            target: 1,
            outcomes: BTreeMap::from([(1, Outcome::Active)]),
            content: BTreeMap::from([(1, 1)]),
            behaviour: BTreeMap::from([(1, Behaviour::Good)]),
            insts: Vec::new(),
            born: BTreeMap::new(),
            slots: BTreeMap::new(),
            state: Rollout::Idle,
            routing: Routing::Any,
            counters: BTreeMap::new(),
            hook_failed: None,
            next_id: 0,
            log: Vec::new(),
            starts: 0,
            fleet: Fleet::default(),
            gone: Vec::new(),
            ended: BTreeSet::new(),
            epoch: Instant::now() - Duration::from_secs(7200),
        };
        let ready = sim.now - Duration::from_secs(3600);
        for slot in 0..sim.settings.replicas {
            sim.add(1, slot, Some(ready));
        }
        sim
    }

    /// An instance assigned and running (the steady fleet).
    fn add(&mut self, revision: u64, slot: u32, ready_since: Option<Instant>) {
        let mut assigned = self.fleet.assigned().to_vec();
        assigned.push(Assignment {
            id: self.next_id,
            node: NODE.to_owned(),
            revision,
            slot,
            adopted: false,
            stop: None,
            resources: Default::default(),
        });
        self.fleet.reset(assigned, &self.clock());
        self.run(self.next_id, revision, slot, ready_since);
        self.next_id += 1;
    }

    /// The node starts instance `id`.
    fn run(&mut self, id: u32, revision: u64, slot: u32, ready_since: Option<Instant>) {
        self.insts.push(Seen {
            id,
            revision,
            slot,
            stopping: false,
            ready_since,
            live: true,
            adopted: false,
            stale: false,
            drained: false,
        });
        self.born.insert(id, self.now);
    }

    /// The leader's and the node's clock (wall-clock milliseconds from an
    /// epoch before anything started).
    fn clock(&self) -> Clock {
        Clock {
            now: self.now,
            wall_ms: self.now.duration_since(self.epoch).as_millis() as u64,
        }
    }

    /// What the node publishes: every instance it runs, and those gone
    /// since the leader last looked.
    fn observations(&self) -> Vec<Observation<u32>> {
        let clock = self.clock();
        self.insts
            .iter()
            .map(|i| observed(i, &clock, None))
            .chain(self.gone.iter().cloned())
            .collect()
    }

    /// The leader takes in the node's observations: failures count
    /// against their slots, gone instances lose their assignments.
    fn take_in(&mut self) {
        let clock = self.clock();
        let observations = self.observations();
        for f in self.fleet.observe(observations, &clock) {
            self.slots.entry((f.revision, f.slot)).or_default().failed(
                self.now,
                f.ready_since_ms.map(|ms| clock.to_instant(ms)),
                &Backoff::default(),
            );
        }
        self.gone.clear();
    }

    /// No instance runs without an assignment, and every instance the
    /// leader sees is one the node runs or is about to.
    fn assert_assigned(&self) {
        for i in &self.insts {
            assert!(
                self.fleet.assigned().iter().any(|a| a.id == i.id),
                "instance {} runs without an assignment",
                i.id
            );
        }
    }

    /// `kiln apply` of a new release `revision` with `content`.
    fn apply(&mut self, revision: u64, content: u32, behaviour: Behaviour) {
        self.target = revision;
        self.outcomes.insert(revision, Outcome::Pending);
        self.content.insert(revision, content);
        self.behaviour.insert(revision, behaviour);
    }

    fn previous(&self) -> Option<u64> {
        self.outcomes
            .iter()
            .filter(|(r, o)| **r != self.target && **o == Outcome::Active)
            .map(|(r, _)| *r)
            .max()
    }

    fn view(&self) -> (BTreeSet<u64>, Option<u64>) {
        let content = self.content[&self.target];
        let same = self
            .content
            .iter()
            .filter(|(_, c)| **c == content)
            .map(|(r, _)| *r)
            .collect();
        (same, self.previous())
    }

    fn with_view<T>(&self, f: impl FnOnce(&View<'_, u32>) -> T) -> T {
        let (same_content, previous) = self.view();
        // The leader's view as it keeps it; or, when the node changed
        // since the leader took it in (a test's own edits, the worker's
        // starts), as the leader would take it in now.
        let observations = self.observations();
        let fresh;
        let seen = if self.fleet.observations() == observations {
            self.fleet.seen()
        } else {
            let mut fleet = self.fleet.clone();
            fleet.observe(observations, &self.clock());
            fresh = fleet;
            fresh.seen()
        };
        f(&View {
            service: &self.name,
            now: self.now,
            target: self.target,
            outcome: self.outcomes[&self.target],
            previous,
            settings: &self.settings,
            backoff: Backoff::default(),
            instances: seen,
            slots: &self.slots,
            same_content: &same_content,
            counters: &self.counters,
            last_error: None,
            hook_failed: self.hook_failed.as_deref(),
        })
    }

    /// One pass: decide and carry the steps out.
    fn pass(&mut self) -> Vec<Step<u32>> {
        self.take_in();
        let d = self.with_view(|v| decide(&self.state, v));
        self.carry_out(d)
    }

    /// The leader's side of a decision (assignments, outcomes), then the
    /// node worker's.
    fn carry_out(&mut self, d: Decision<u32>) -> Vec<Step<u32>> {
        self.state = d.next;
        self.routing = d.routing;
        let target = self.target;
        let mut next_id = self.next_id;
        self.fleet.assign(
            &d.steps,
            target,
            (&[NODE.to_owned()], &Room::default()),
            |_| Resources::default(),
            |_| {
                next_id += 1;
                next_id - 1
            },
        );
        self.next_id = next_id;
        // The view the leader keeps is the one it would build again.
        assert_eq!(
            self.fleet.seen(),
            assign::seen(
                self.fleet.assigned(),
                self.fleet.observations(),
                &self.clock()
            ),
            "the leader's view drifted from its assignments and observations"
        );
        for step in &d.steps {
            match step {
                Step::SlotStable { revision, slot } => {
                    self.slots.entry((*revision, *slot)).or_default().failures = 0;
                }
                Step::Adopt { .. }
                | Step::Start { .. }
                | Step::Stop { .. }
                | Step::Route
                | Step::Record(_) => {}
                Step::Activate => {
                    for o in self.outcomes.values_mut() {
                        if *o == Outcome::Active {
                            *o = Outcome::Superseded;
                        }
                    }
                    self.outcomes.insert(self.target, Outcome::Active);
                }
                Step::Fail { to, .. } => {
                    self.outcomes.insert(self.target, Outcome::Failed);
                    if let Some(to) = to {
                        // Active again (it was superseded when the failure
                        // came in the failed release's watch).
                        self.target = *to;
                        self.outcomes.insert(*to, Outcome::Active);
                    }
                }
            }
        }
        self.work();
        self.log.extend(d.steps.iter().cloned());
        d.steps
    }

    /// The node's worker: what it runs made to match its assignments.
    fn work(&mut self) {
        let running: Vec<assign::Running<'_, u32>> = self
            .insts
            .iter()
            .map(|i| assign::Running {
                id: &i.id,
                revision: i.revision,
                slot: i.slot,
                stopping: i.stopping,
            })
            .collect();
        let w = assign::work(NODE, self.fleet.assigned(), &running, &self.ended);
        drop(running);
        for a in &w.relabel {
            let i = self.insts.iter_mut().find(|i| i.id == a.id).unwrap();
            (i.revision, i.slot, i.adopted) = (a.revision, a.slot, a.adopted);
        }
        for a in &w.start {
            self.starts += 1;
            self.run(a.id, a.revision, a.slot, None);
        }
        let stops: BTreeSet<u32> = w.stop.iter().map(|(id, _)| *id).chain(w.orphans).collect();
        for i in self.insts.iter_mut().filter(|i| stops.contains(&i.id)) {
            i.stopping = true;
        }
        self.assert_assigned();
    }

    /// Instances `pick` selects were never there (a test's set-up): no
    /// instance, no assignment, no report.
    fn forget(&mut self, pick: impl Fn(&Seen<u32>) -> bool) {
        let gone: BTreeSet<u32> = self
            .insts
            .iter()
            .filter(|i| pick(i))
            .map(|i| i.id)
            .collect();
        self.insts.retain(|i| !gone.contains(&i.id));
        let kept = self
            .fleet
            .assigned()
            .iter()
            .filter(|a| !gone.contains(&a.id))
            .cloned()
            .collect();
        self.fleet.reset(kept, &self.clock());
    }

    /// The node reports instance `i` gone (`failed`: it ended unasked).
    fn report_gone(&mut self, i: &Seen<u32>, failed: bool) {
        let clock = self.clock();
        self.ended.insert(i.id);
        self.gone.push(observed(i, &clock, Some(failed)));
    }

    /// Time moves one tick: stopped instances are gone, started ones
    /// become ready or crash as their release does.
    fn tick(&mut self) {
        self.now += TICK;
        let now = self.now;
        self.drop_stopped(|_| true);
        let mut crashed = Vec::new();
        for i in &mut self.insts {
            match self.behaviour[&i.revision] {
                Behaviour::Good if i.ready_since.is_none() => i.ready_since = Some(now),
                Behaviour::Crashes => crashed.push((i.id, i.revision, i.slot, None)),
                Behaviour::CrashesAfter(ticks) => {
                    if now.duration_since(self.born[&i.id]) >= TICK * ticks {
                        crashed.push((i.id, i.revision, i.slot, i.ready_since));
                    } else if i.ready_since.is_none() {
                        i.ready_since = Some(now);
                    }
                }
                _ => {}
            }
        }
        for (id, _, _, ready_since) in crashed {
            if let Some(k) = self.insts.iter().position(|i| i.id == id) {
                let mut i = self.insts.remove(k);
                i.ready_since = ready_since;
                self.report_gone(&i, true);
            }
        }
        // The leader hears of it before its next pass.
        self.take_in();
    }

    /// Stopping instances that `done` says are done are gone (reported).
    fn drop_stopped(&mut self, mut done: impl FnMut(&Seen<u32>) -> bool) {
        let mut k = 0;
        while k < self.insts.len() {
            if self.insts[k].stopping && done(&self.insts[k]) {
                let i = self.insts.remove(k);
                self.report_gone(&i, false);
            } else {
                k += 1;
            }
        }
    }

    /// Passes and ticks until `revision` went live (at most 5 ticks).
    fn until_active(&mut self, revision: u64) {
        for _ in 0..5 {
            if self.outcomes[&revision] == Outcome::Active {
                return;
            }
            self.pass();
            self.tick();
        }
    }

    /// Passes and ticks until nothing is left to do (or `limit` ticks).
    fn settle(&mut self, limit: u32) {
        for _ in 0..limit {
            let steps = self.pass();
            if steps.is_empty()
                && matches!(self.state, Rollout::Idle | Rollout::Watching { .. })
                && self.insts.iter().all(|i| !i.stopping)
            {
                return;
            }
            self.tick();
        }
    }

    /// A tick of the property tests: stopped instances drain for
    /// `drain[id % 8]` ticks, then go; new ones get ready after
    /// `slow[id % 8]` ticks. `waited` counts each one's ticks.
    fn random_tick(&mut self, waited: &mut BTreeMap<u32, u32>, slow: &[u32], drain: &[u32]) {
        self.now += TICK;
        self.drop_stopped(|i| {
            let w = waited.entry(i.id + 1_000_000).or_insert(0u32);
            *w += 1;
            *w > drain[(i.id % 8) as usize]
        });
        let now = self.now;
        for i in &mut self.insts {
            let w = waited.entry(i.id).or_insert(0u32);
            *w += 1;
            if i.ready_since.is_none() && *w > slow[(i.id % 8) as usize] {
                i.ready_since = Some(now);
            }
        }
        self.take_in();
    }

    fn running(&self, revision: u64) -> usize {
        self.insts
            .iter()
            .filter(|i| i.revision == revision && !i.stopping)
            .count()
    }

    fn ready(&self) -> u32 {
        self.insts
            .iter()
            .filter(|i| !i.stopping && i.ready_since.is_some())
            .count() as u32
    }

    fn routed(&self, revision: u64) -> bool {
        let serves = |r: u64| {
            self.insts
                .iter()
                .any(|i| i.revision == r && !i.stopping && i.ready_since.is_some())
        };
        match self.routing {
            Routing::Any => serves(revision),
            Routing::Release(r) => r == revision && serves(r),
            Routing::Split { stable, canary, .. } => {
                (stable == revision || canary == revision) && serves(revision)
            }
        }
    }

    /// The instances `pick` selects (by release) stop being ready.
    fn unready(&mut self, pick: impl Fn(u64) -> bool) {
        for i in self.insts.iter_mut().filter(|i| pick(i.revision)) {
            i.ready_since = None;
        }
    }

    /// The release a blue-green rollout keeps the traffic on, if it is one.
    fn bg_routed(&self) -> Option<u64> {
        match self.state {
            Rollout::BlueGreen { routed, .. } => Some(routed),
            _ => None,
        }
    }

    fn recorded(&self, kind: &str) -> Vec<&Change> {
        self.log
            .iter()
            .filter_map(|s| match s {
                Step::Record(c) if c.kind() == kind => Some(c),
                _ => None,
            })
            .collect()
    }
}

/// Instance `i` as its node publishes it.
fn observed(i: &Seen<u32>, clock: &Clock, gone: Option<bool>) -> Observation<u32> {
    Observation {
        id: i.id,
        revision: i.revision,
        slot: i.slot,
        stopping: i.stopping,
        ready_since_ms: i.ready_since.map(|t| clock.to_wall(t)),
        live: i.live,
        adopted: i.adopted,
        stale: i.stale,
        gone,
        refused: false,
        port: 0,
    }
}

fn starts(steps: &[Step<u32>]) -> Vec<(u64, u32)> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::Start { revision, slot } => Some((*revision, *slot)),
            _ => None,
        })
        .collect()
}

fn stops(steps: &[Step<u32>]) -> Vec<(Vec<u32>, StopReason)> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::Stop { ids, reason } => Some((ids.clone(), *reason)),
            _ => None,
        })
        .collect()
}

fn failed(steps: &[Step<u32>]) -> Option<(String, Option<u64>, bool)> {
    steps.iter().find_map(|s| match s {
        Step::Fail {
            reason, to, timed, ..
        } => Some((reason.clone(), *to, *timed)),
        _ => None,
    })
}

// ---- rolling ----

#[test]
fn rolling_surges_one_at_a_time_and_stops_old_only_for_new_ready_ones() {
    let mut sim = Sim::steady(settings(Strategy::Rolling, 3));
    sim.apply(2, 2, Behaviour::Good);
    let steps = sim.pass();
    assert_eq!(starts(&steps), [(2, 0)], "one surge instance");
    assert!(
        stops(&steps).is_empty(),
        "no old one stops before a new one is ready"
    );
    assert!(matches!(sim.state, Rollout::Rolling { target: 2, .. }));
    sim.tick();
    let steps = sim.pass();
    assert_eq!(stops(&steps), [(vec![0], StopReason::Replaced)]);
    assert_eq!(
        starts(&steps),
        [],
        "the stopping one still counts this pass"
    );
    sim.settle(50);
    assert_eq!(sim.running(2), 3);
    assert_eq!(sim.outcomes[&2], Outcome::Active);
    assert_eq!(sim.outcomes[&1], Outcome::Superseded);
    assert!(matches!(sim.state, Rollout::Watching { target: 2, .. }));
    // Watched: release 1's fleet is whole again beside it, warm and
    // unrouted, until the watch ends.
    assert_eq!(sim.running(1), 3);
    assert_eq!(sim.routing, Routing::Release(2));
    assert!(!sim.routed(1));
    sim.now += Duration::from_secs(300);
    let steps = sim.pass();
    assert_eq!(stops(&steps).len(), 1, "{steps:?}");
    assert_eq!(stops(&steps)[0].1, StopReason::Replaced);
    sim.tick();
    assert_eq!(sim.state, Rollout::Idle);
    assert_eq!(sim.running(1), 0);
    assert_eq!(sim.routing, Routing::Any);
}

#[test]
fn rolling_fails_at_its_deadline_and_returns_to_the_previous_release() {
    let mut sim = Sim::steady(settings(Strategy::Rolling, 2));
    sim.apply(2, 2, Behaviour::NeverReady);
    sim.pass();
    sim.now += Duration::from_secs(9);
    assert_eq!(failed(&sim.pass()), None, "before the deadline");
    sim.now += Duration::from_secs(1);
    let steps = sim.pass();
    let (reason, to, timed) = failed(&steps).expect("failed at the deadline");
    assert_eq!(
        reason,
        "0/2 instances ready after the progress deadline of 10s"
    );
    assert_eq!((to, timed), (Some(1), false));
    assert_eq!(sim.state, Rollout::Idle);
    sim.settle(20);
    assert_eq!(sim.running(2), 0, "nothing of the failed release is left");
    assert_eq!(sim.running(1), 2);
}

#[test]
fn a_crash_loop_fails_the_rollout_before_its_deadline() {
    let mut sim = Sim::steady(settings(Strategy::Rolling, 2));
    sim.apply(2, 2, Behaviour::Crashes);
    let mut fail = None;
    for _ in 0..200 {
        let steps = sim.pass();
        if let Some(f) = failed(&steps) {
            fail = Some(f);
            break;
        }
        sim.tick();
        // Back-off lets the slot wait; time moves past it.
        sim.now += Duration::from_millis(500);
    }
    let (reason, to, _) = fail.expect("the crash loop failed the rollout");
    assert!(
        reason.starts_with("instances of release 2 keep crashing (3)"),
        "{reason}"
    );
    assert_eq!(to, Some(1));
}

#[test]
fn a_first_release_that_fails_is_emptied() {
    let mut s = settings(Strategy::Rolling, 2);
    s.rollout.progress_deadline = service::Duration::from_secs(1);
    let mut sim = Sim::steady(s);
    sim.forget(|_| true);
    sim.outcomes.clear();
    sim.apply(1, 1, Behaviour::NeverReady);
    let steps = sim.pass();
    assert_eq!(
        starts(&steps),
        [(1, 0), (1, 1)],
        "nothing old: every slot fills"
    );
    sim.now += Duration::from_secs(1);
    let (_, to, _) = failed(&sim.pass()).expect("failed");
    assert_eq!(to, None, "nothing to return to");
    let steps = sim.pass();
    // Ids 0 and 1 were release 1's, cleared above.
    assert_eq!(stops(&steps), [(vec![2, 3], StopReason::ReleaseFailed)]);
    assert!(starts(&steps).is_empty());
}

#[test]
fn auto_rollback_off_pauses_and_stays_paused() {
    let mut s = settings(Strategy::Rolling, 2);
    s.rollout.auto_rollback = false;
    let mut sim = Sim::steady(s);
    sim.apply(2, 2, Behaviour::NeverReady);
    sim.pass();
    sim.now += Duration::from_secs(10);
    let steps = sim.pass();
    assert_eq!(failed(&steps), None);
    assert!(sim.state.stalled());
    assert_eq!(sim.recorded("rollout-paused").len(), 1);
    // Later passes: still paused, nothing new starts, no second record.
    for _ in 0..5 {
        sim.tick();
        sim.now += Duration::from_secs(20);
        assert!(starts(&sim.pass()).is_empty());
        assert!(sim.state.stalled());
    }
    assert_eq!(sim.recorded("rollout-paused").len(), 1);
    assert_eq!(sim.running(1), 2, "the old fleet still serves");
    // kiln abort returns to release 1.
    let d = sim
        .with_view(|v| abort(&sim.state, v, Actor::Local { uid: 1000 }))
        .expect("abort");
    assert_eq!(failed(&d.steps).map(|f| f.1), Some(Some(1)));
}

#[test]
fn an_instance_that_failed_liveness_is_replaced_in_its_slot() {
    let mut sim = Sim::steady(settings(Strategy::Rolling, 3));
    sim.insts[1].live = false;
    let steps = sim.pass();
    assert_eq!(stops(&steps), [(vec![1], StopReason::LivenessFailed)]);
    assert_eq!(starts(&steps), [(1, 1)], "the same release, the same slot");
    // In its back-off, the slot waits.
    sim.tick();
    sim.insts.iter_mut().for_each(|i| i.live = i.id != 3);
    let steps = sim.pass();
    assert_eq!(stops(&steps), [(vec![3], StopReason::LivenessFailed)]);
    assert!(starts(&steps).is_empty(), "backing off: {steps:?}");
}

// ---- recreate ----

#[test]
fn recreate_stops_everything_then_starts_the_new_fleet() {
    let mut sim = Sim::steady(settings(Strategy::Recreate, 2));
    sim.apply(2, 2, Behaviour::Good);
    let steps = sim.pass();
    assert_eq!(stops(&steps), [(vec![0, 1], StopReason::Recreate)]);
    assert!(starts(&steps).is_empty());
    sim.tick();
    assert_eq!(starts(&sim.pass()), [(2, 0), (2, 1)]);
    sim.settle(20);
    assert_eq!(sim.running(2), 2);
}

// ---- blue-green ----

#[test]
fn blue_green_waits_for_promote_then_switches_and_keeps_the_old_fleet_warm() {
    let mut s = settings(Strategy::BlueGreen, 2);
    s.rollout.auto_promote = false;
    let mut sim = Sim::steady(s);
    sim.apply(2, 2, Behaviour::Good);
    let steps = sim.pass();
    assert_eq!(
        starts(&steps),
        [(2, 0), (2, 1)],
        "the whole new fleet beside"
    );
    assert_eq!(sim.routing, Routing::Release(1));
    sim.tick();
    let d = sim.with_view(|v| decide(&sim.state, v));
    assert_eq!(
        d.message,
        Message::Set("release 2 is ready: waiting for `kiln promote web`".into())
    );
    sim.carry_out(d);
    assert_eq!(sim.routing, Routing::Release(1), "no switch before promote");
    assert_eq!(sim.state.promote(2, true), Ok(None));
    let steps = sim.pass();
    assert!(steps.contains(&Step::Route));
    assert!(steps.contains(&Step::Activate));
    assert_eq!(sim.routing, Routing::Release(2));
    assert!(stops(&steps).is_empty(), "the old fleet stays warm");
    assert!(matches!(sim.state, Rollout::Warm { target: 2, .. }));
    sim.now += Duration::from_secs(300);
    let steps = sim.pass();
    assert_eq!(stops(&steps), [(vec![0, 1], StopReason::Replaced)]);
    assert_eq!(sim.state, Rollout::Idle);
}

#[test]
fn a_warm_rollback_adopts_the_warm_fleet_and_starts_nothing() {
    let mut sim = Sim::steady(settings(Strategy::BlueGreen, 3));
    sim.apply(2, 2, Behaviour::Good);
    for _ in 0..3 {
        sim.pass();
        sim.tick();
    }
    assert!(matches!(sim.state, Rollout::Warm { target: 2, .. }));
    // kiln rollback: release 3 has release 1's content.
    sim.apply(3, 1, Behaviour::Good);
    let starts_before = sim.starts;
    let steps = sim.pass();
    let adopted: Vec<u32> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Adopt { id, from: 1, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(adopted, [0, 1, 2]);
    assert_eq!(sim.starts, starts_before, "nothing started");
    assert_eq!(
        sim.routing,
        Routing::Release(3),
        "switched in the same pass"
    );
    assert_eq!(sim.outcomes[&3], Outcome::Active);
}

// ---- canary ----

fn canary_sim(replicas: u32) -> Sim {
    let mut sim = Sim::steady(settings(Strategy::Canary, replicas));
    sim.apply(2, 2, Behaviour::Good);
    sim
}

#[test]
fn a_canary_walks_its_steps_and_ends_on_the_canary() {
    let mut sim = canary_sim(4);
    let steps = sim.pass();
    assert_eq!(sim.recorded("canary-started").len(), 1);
    assert_eq!(starts(&steps), [(2, 0)], "25% of 4");
    assert_eq!(
        sim.routing,
        Routing::Release(1),
        "no weight before it is ready"
    );
    sim.tick();
    let steps = sim.pass();
    assert!(steps.contains(&Step::Route));
    assert_eq!(
        sim.routing,
        Routing::Split {
            stable: 1,
            canary: 2,
            weight: 25
        }
    );
    // The pause of 1s holds the step.
    sim.now += Duration::from_millis(500);
    assert!(sim.pass().is_empty());
    sim.now += Duration::from_millis(500);
    sim.pass();
    assert_eq!(sim.recorded("canary-step-passed").len(), 1);
    sim.settle(50);
    assert_eq!(sim.outcomes[&2], Outcome::Active);
    // Stable stays warm, unrouted, through the watch; then it goes.
    assert_eq!((sim.running(1), sim.running(2)), (4, 4));
    assert_eq!(sim.routing, Routing::Release(2));
    sim.now += Duration::from_secs(300);
    sim.pass();
    sim.tick();
    assert_eq!((sim.running(1), sim.running(2)), (0, 4));
    assert_eq!(sim.routing, Routing::Any);
}

#[test]
fn a_failed_analysis_aborts_the_canary_in_one_swap() {
    let mut s = settings(Strategy::Canary, 4);
    s.rollout.analysis = Some(AnalysisSpec {
        max_error_rate: Ratio::from_f64(0.05),
        max_p99: None,
        max_error_rate_increase: None,
        min_requests: 10,
        last_step_needs_traffic: false,
    });
    let mut sim = Sim::steady(s);
    sim.apply(2, 2, Behaviour::Good);
    sim.pass();
    sim.tick();
    sim.pass();
    // 20 canary answers, half of them 5xx.
    let mut c = Snapshot::default();
    c.responses[1] = 10;
    c.responses[4] = 10;
    sim.counters.insert(2, c);
    let steps = sim.pass();
    let (reason, to, timed) = failed(&steps).expect("aborted");
    assert!(
        reason.starts_with("canary analysis failed at step 1/2 (weight 25%)"),
        "{reason}"
    );
    assert_eq!((to, timed), (Some(1), true));
    assert_eq!(stops(&steps), [(vec![4], StopReason::CanaryAborted)]);
    assert_eq!(sim.routing, Routing::Release(1));
    assert!(!sim.routed(2));
}

/// A canary with analysis (`min_requests` 10) on a quiet service.
fn quiet_canary(last_step_needs_traffic: bool) -> Sim {
    let mut s = settings(Strategy::Canary, 4);
    s.rollout.analysis = Some(AnalysisSpec {
        max_error_rate: Ratio::from_f64(0.05),
        max_p99: None,
        max_error_rate_increase: None,
        min_requests: 10,
        last_step_needs_traffic,
    });
    let mut sim = Sim::steady(s);
    sim.apply(2, 2, Behaviour::Good);
    sim
}

/// `n` good answers of the canary, counted from what it had.
fn answered(sim: &mut Sim, n: u64) {
    let c = sim.counters.entry(2).or_default();
    c.responses[1] += n;
}

#[test]
fn the_last_step_needs_no_traffic_unless_the_spec_asks() {
    let mut sim = quiet_canary(false);
    sim.pass();
    sim.tick();
    sim.pass();
    // Step 1 is judged on its 10 requests, then the pause ends it.
    answered(&mut sim, 10);
    sim.now += Duration::from_secs(1);
    sim.pass();
    assert_eq!(sim.recorded("canary-step-passed").len(), 1);
    // Step 2 (weight 100) gets nothing more, and ends all the same.
    sim.settle(20);
    assert_eq!(sim.recorded("canary-step-passed").len(), 2);
    assert_eq!(sim.outcomes[&2], Outcome::Active);

    // Asked for: the last step waits for its requests...
    let mut sim = quiet_canary(true);
    sim.pass();
    sim.tick();
    sim.pass();
    answered(&mut sim, 10);
    sim.now += Duration::from_secs(1);
    sim.pass();
    sim.settle(3);
    assert_eq!(sim.outcomes[&2], Outcome::Pending, "waits at the last step");
    assert!(sim.recorded("release-failed").is_empty());
    // ...and passes once they come.
    answered(&mut sim, 10);
    sim.settle(20);
    assert_eq!(sim.outcomes[&2], Outcome::Active);
}

#[test]
fn a_step_without_enough_traffic_ends_the_canary_at_its_deadline() {
    let mut sim = quiet_canary(false);
    sim.pass();
    sim.tick();
    sim.pass();
    let began = sim.now;
    answered(&mut sim, 3);
    // Within the pause (1 s) plus the progress deadline (10 s): waiting.
    sim.now = began + Duration::from_millis(10_900);
    assert!(failed(&sim.pass()).is_none());
    assert_eq!(sim.outcomes[&2], Outcome::Pending);
    sim.now = began + Duration::from_secs(11);
    let steps = sim.pass();
    let (reason, to, _) = failed(&steps).expect("aborted at the deadline");
    assert!(
        reason
            .starts_with("only 3 of the 10 canary requests needed to judge step 1/2 (weight 25%)"),
        "{reason}"
    );
    assert_eq!(to, Some(1));
    assert_eq!(sim.routing, Routing::Release(1));
}

#[test]
fn a_canary_with_no_stable_release_goes_whole() {
    let mut sim = Sim::steady(settings(Strategy::Canary, 3));
    sim.forget(|_| true);
    sim.outcomes.clear();
    sim.apply(1, 1, Behaviour::Good);
    let steps = sim.pass();
    assert_eq!(starts(&steps), [(1, 0), (1, 1), (1, 2)]);
    assert!(matches!(sim.state, Rollout::Rolling { .. }));
}

#[test]
fn promote_and_abort_are_refused_when_nothing_waits() {
    let mut sim = Sim::steady(settings(Strategy::Rolling, 1));
    assert_eq!(sim.state.promote(1, false), Err(NotWaiting));
    let refused = sim.with_view(|v| abort(&sim.state, v, Actor::Agent));
    assert_eq!(refused, Err(AbortRefused::NothingToAbort));
    sim.forget(|_| true);
    sim.outcomes.clear();
    sim.apply(1, 1, Behaviour::Good);
    sim.pass();
    let refused = sim.with_view(|v| abort(&sim.state, v, Actor::Agent));
    assert_eq!(refused, Err(AbortRefused::FirstRelease));
    assert_eq!(sim.state.promote(1, true), Err(NotWaiting), "rolling");
}

#[test]
fn the_next_pass_is_due_at_the_earliest_timer() {
    let mut sim = Sim::steady(settings(Strategy::Rolling, 1));
    assert_eq!(sim.with_view(|v| due(&sim.state, v)), None, "nothing due");
    sim.apply(2, 2, Behaviour::NeverReady);
    sim.pass();
    let deadline = sim.now + Duration::from_secs(10);
    assert_eq!(sim.with_view(|v| due(&sim.state, v)), Some(deadline));
    sim.slots.entry((2, 0)).or_default().retry_at = Some(sim.now + TICK);
    assert_eq!(sim.with_view(|v| due(&sim.state, v)), Some(sim.now + TICK));
}

// ---- properties ----

fn strategy() -> impl proptest::strategy::Strategy<Value = Strategy> {
    prop_oneof![
        Just(Strategy::Rolling),
        Just(Strategy::Recreate),
        Just(Strategy::BlueGreen),
        Just(Strategy::Canary),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A rolling update never has fewer than `replicas − max_unavailable`
    /// ready instances nor more than `replicas + max_surge` running, and
    /// ends wholly on its release.
    #[test]
    fn rolling_keeps_its_bounds_and_ends_on_one_release(
        replicas in 1u32..8,
        max_surge in 0u32..4,
        max_unavailable in 0u32..4,
        slow in proptest::collection::vec(0u32..4, 8),
        drain in proptest::collection::vec(0u32..4, 8),
    ) {
        prop_assume!(max_surge + max_unavailable > 0);
        let mut s = settings(Strategy::Rolling, replicas);
        s.rollout.max_surge = max_surge;
        s.rollout.max_unavailable = max_unavailable;
        s.rollout.watch = service::Duration::from_secs(2);
        let mut sim = Sim::steady(s);
        sim.apply(2, 2, Behaviour::Good);
        let floor = replicas.saturating_sub(max_unavailable);
        let mut waited = BTreeMap::new();
        for _ in 0..200 {
            sim.pass();
            if sim.state.target().is_some() {
                // Draining ones count: they are processes that still run.
                let running = sim.insts.len() as u32;
                prop_assert!(running <= replicas + max_surge, "{running} running");
            } else {
                // Gone live: the release before is warm beside it (up to
                // its own fleet, draining ones aside), and serves nobody.
                let warm = sim.running(1) as u32;
                prop_assert!(warm <= replicas, "{warm} warm");
                prop_assert!(!sim.routed(1) || sim.state == Rollout::Idle);
            }
            prop_assert!(sim.ready() >= floor, "{} ready < {floor}", sim.ready());
            sim.random_tick(&mut waited, &slow, &drain);
            if sim.state == Rollout::Idle && sim.insts.iter().all(|i| i.revision == 2) {
                break;
            }
        }
        prop_assert_eq!(sim.outcomes[&2], Outcome::Active);
        prop_assert_eq!(sim.running(2) as u32, replicas);
        prop_assert_eq!(sim.running(1), 0);
    }

    /// Every strategy ends wholly on the new release, with all its traffic.
    #[test]
    fn every_rollout_ends_wholly_on_one_release(
        strategy in strategy(),
        replicas in 1u32..10,
    ) {
        let mut s = settings(strategy, replicas);
        s.rollout.scale_down_delay = service::Duration::from_secs(0);
        let mut sim = Sim::steady(s);
        sim.apply(2, 2, Behaviour::Good);
        for _ in 0..100 {
            sim.pass();
            sim.tick();
            sim.now += Duration::from_millis(500);
        }
        prop_assert_eq!(sim.outcomes[&2], Outcome::Active);
        prop_assert_eq!(sim.running(2) as u32, replicas);
        // No rollout left; the release is still watched, the one before
        // it warm and unrouted (blue-green: gone after its own warm
        // window, here 0s).
        prop_assert_eq!(sim.state.target(), None);
        prop_assert!(!sim.state.warm(sim.now));
        prop_assert!(sim.routed(2));
        prop_assert!(!sim.routed(1));
        let warm = if strategy == Strategy::BlueGreen { 0 } else { replicas };
        prop_assert_eq!(sim.running(1) as u32, warm);
        // Once the watch is over, nothing else is left.
        sim.now += Duration::from_secs(300);
        sim.pass();
        sim.tick();
        prop_assert_eq!(&sim.state, &Rollout::Idle);
        prop_assert_eq!(sim.insts.len() as u32, replicas, "nothing else is left");
        prop_assert!(sim.routed(2));
    }

    /// A failed rollout leaves no instance and no route of the failed
    /// release, whatever the strategy and however it failed.
    #[test]
    fn a_failed_rollout_leaves_nothing_of_the_failed_release(
        strategy in strategy(),
        replicas in 1u32..8,
        behaviour in prop_oneof![Just(Behaviour::NeverReady), Just(Behaviour::Crashes)],
    ) {
        let mut sim = Sim::steady(settings(strategy, replicas));
        sim.apply(2, 2, behaviour);
        for _ in 0..300 {
            sim.pass();
            sim.tick();
            sim.now += Duration::from_millis(200);
        }
        prop_assert_eq!(sim.outcomes[&2], Outcome::Failed);
        prop_assert_eq!(sim.target, 1);
        prop_assert_eq!(sim.running(2), 0);
        prop_assert!(!sim.routed(2));
        prop_assert_eq!(sim.running(1) as u32, replicas);
        prop_assert!(sim.routed(1));
    }

    /// The canary's fleet follows its step's weight, and stable keeps its
    /// whole fleet while the canary runs.
    #[test]
    fn the_canary_fleet_follows_its_weight(
        replicas in 1u32..20,
        first in 1u32..100,
    ) {
        let mut s = settings(Strategy::Canary, replicas);
        s.rollout.steps[0].weight = first;
        let mut sim = Sim::steady(s);
        sim.apply(2, 2, Behaviour::Good);
        for _ in 0..40 {
            sim.pass();
            if let Rollout::Canary(run) = &sim.state {
                let step = sim.settings.rollout.steps[run.step].weight;
                let canary = sim.running(2) as u32;
                // Never more than the step's fleet; exactly its weight's
                // fleet while that weight is judged.
                prop_assert!(canary <= fleet(replicas, step));
                if let CanaryPhase::Judging { .. } = run.phase {
                    prop_assert_eq!(canary, fleet(replicas, run.weight));
                    prop_assert_eq!(
                        sim.routing,
                        Routing::Split { stable: 1, canary: 2, weight: run.weight }
                    );
                }
                prop_assert_eq!(sim.running(1) as u32, replicas);
            }
            sim.tick();
            sim.now += Duration::from_millis(300);
        }
        prop_assert_eq!(sim.outcomes[&2], Outcome::Active);
    }

    /// A rollback inside the warm window (the same content as the warm
    /// fleet) adopts it and starts nothing, whatever the strategy.
    #[test]
    fn a_warm_rollback_starts_nothing(replicas in 1u32..10) {
        let mut sim = Sim::steady(settings(Strategy::BlueGreen, replicas));
        sim.apply(2, 2, Behaviour::Good);
        for _ in 0..5 {
            sim.pass();
            sim.tick();
        }
        let before = sim.starts;
        sim.apply(3, 1, Behaviour::Good);
        for _ in 0..5 {
            sim.pass();
            sim.tick();
        }
        prop_assert_eq!(sim.starts, before);
        prop_assert_eq!(sim.outcomes[&3], Outcome::Active);
        prop_assert_eq!(sim.routing, Routing::Release(3));
        prop_assert_eq!(sim.running(3) as u32, replicas);
    }
}

// ---- the watch after a release went live ----

/// Passes and ticks (time moving past any back-off) until a pass fails the
/// release; the failing pass's decision.
fn until_failed(sim: &mut Sim, limit: u32) -> Option<Decision<u32>> {
    for _ in 0..limit {
        let d = sim.with_view(|v| decide(&sim.state, v));
        let failing = failed(&d.steps).is_some();
        let kept = d.clone();
        sim.carry_out(d);
        if failing {
            return Some(kept);
        }
        sim.tick();
        sim.now += Duration::from_millis(300);
    }
    None
}

fn watched(strategy: Strategy, watch: u64) -> ServiceSettings {
    let mut s = settings(strategy, 2);
    s.rollout.watch = service::Duration::from_secs(watch);
    s
}

#[test]
fn a_release_that_crash_loops_after_it_went_live_is_rolled_back_inside_its_watch() {
    let mut sim = Sim::steady(watched(Strategy::Rolling, 60));
    // Ready at once, exits 0.5 s after each start: the rollout completes.
    sim.apply(2, 2, Behaviour::CrashesAfter(5));
    sim.until_active(2);
    assert_eq!(sim.outcomes[&2], Outcome::Active, "it went live");
    assert!(matches!(
        sim.state,
        Rollout::Watching {
            target: 2,
            watch: Watch { back_to: 1, .. }
        }
    ));
    let d = until_failed(&mut sim, 100).expect("the watch caught the crash loop");
    let (reason, to, _) = failed(&d.steps).unwrap();
    assert_eq!(to, Some(1));
    assert!(
        reason.starts_with("instances of release 2 keep crashing (3)")
            && reason.contains("after it went live, inside rollout.watch (1m)"),
        "{reason}"
    );
    sim.settle(50);
    assert_eq!(sim.outcomes[&1], Outcome::Active);
    assert_eq!(sim.outcomes[&2], Outcome::Failed);
    assert_eq!((sim.running(1), sim.running(2)), (2, 0));
}

#[test]
fn a_failed_post_deploy_fails_the_watch_and_returns_to_the_release_before() {
    let mut sim = Sim::steady(watched(Strategy::Rolling, 60));
    sim.apply(2, 2, Behaviour::Good);
    sim.until_active(2);
    // Live, passing: nothing to do.
    for _ in 0..5 {
        sim.pass();
        sim.tick();
    }
    assert_eq!(sim.outcomes[&2], Outcome::Active);
    sim.hook_failed = Some("exit status: 9".into());
    let d = until_failed(&mut sim, 5).expect("the hook's failure fails the watch");
    let (reason, to, _) = failed(&d.steps).unwrap();
    assert_eq!(to, Some(1));
    assert_eq!(
        reason,
        "the post_deploy hook of release 2 failed (exit status: 9)"
    );
    sim.hook_failed = None;
    sim.settle(50);
    assert_eq!(sim.outcomes[&1], Outcome::Active);
    assert_eq!(sim.outcomes[&2], Outcome::Failed);
    assert_eq!((sim.running(1), sim.running(2)), (2, 0));
}

#[test]
fn a_failed_post_deploy_without_a_watch_is_said_not_undone() {
    let mut sim = Sim::steady(watched(Strategy::Rolling, 0));
    sim.apply(2, 2, Behaviour::Good);
    sim.until_active(2);
    sim.hook_failed = Some("exit status: 9".into());
    let d = sim.with_view(|v| decide(&sim.state, v));
    assert!(failed(&d.steps).is_none());
    let Message::Set(m) = &d.message else {
        panic!("status says so: {:?}", d.message);
    };
    assert!(
        m.starts_with("the post_deploy hook of release 2 failed (exit status: 9)")
            && m.contains("rollout.watch is 0s")
            && m.contains("kiln rollback web"),
        "{m}"
    );
    // While its release is still rolling out, a hook failure is nobody's.
    let mut sim = Sim::steady(watched(Strategy::Rolling, 60));
    sim.apply(2, 2, Behaviour::Good);
    sim.hook_failed = Some("exit status: 9".into());
    let d = sim.with_view(|v| decide(&sim.state, v));
    assert!(failed(&d.steps).is_none());
}

#[test]
fn after_the_watch_a_crashing_release_is_only_healed() {
    let mut sim = Sim::steady(watched(Strategy::Rolling, 5));
    sim.apply(2, 2, Behaviour::Good);
    sim.settle(50);
    assert_eq!(sim.outcomes[&2], Outcome::Active);
    sim.now += Duration::from_secs(6);
    sim.pass();
    assert_eq!(sim.state, Rollout::Idle, "the watch is over");
    sim.behaviour.insert(2, Behaviour::Crashes);
    assert!(until_failed(&mut sim, 60).is_none(), "never rolled back");
    assert!(sim.starts > 4, "the slots were refilled");
}

#[test]
fn a_watch_of_zero_watches_nothing_and_a_first_release_has_no_watch() {
    let mut sim = Sim::steady(watched(Strategy::Rolling, 0));
    sim.apply(2, 2, Behaviour::CrashesAfter(5));
    assert!(until_failed(&mut sim, 60).is_none());
    assert_eq!(sim.outcomes[&2], Outcome::Active);
    // A first release has nothing to return to.
    let mut sim = Sim::steady(watched(Strategy::Rolling, 60));
    sim.forget(|_| true);
    sim.outcomes.clear();
    sim.apply(1, 1, Behaviour::Good);
    sim.settle(20);
    assert_eq!(sim.outcomes[&1], Outcome::Active);
    assert_eq!(sim.state, Rollout::Idle);
}

#[test]
fn auto_rollback_off_reports_a_crash_loop_in_the_watch_and_stays() {
    let mut s = watched(Strategy::Rolling, 60);
    s.rollout.auto_rollback = false;
    let mut sim = Sim::steady(s);
    sim.apply(2, 2, Behaviour::CrashesAfter(5));
    let mut said = None;
    for _ in 0..100 {
        let d = sim.with_view(|v| decide(&sim.state, v));
        assert!(failed(&d.steps).is_none());
        if let Message::Set(m) = &d.message {
            said = Some(m.clone());
        }
        sim.carry_out(d);
        sim.tick();
        sim.now += Duration::from_millis(300);
    }
    let said = said.expect("status says so");
    assert!(said.contains("auto_rollback = false"), "{said}");
    assert_eq!(sim.outcomes[&2], Outcome::Active);
}

#[test]
fn blue_green_crash_loop_inside_the_watch_swaps_back_to_the_warm_fleet() {
    let mut sim = Sim::steady(watched(Strategy::BlueGreen, 60));
    sim.apply(2, 2, Behaviour::CrashesAfter(5));
    sim.until_active(2);
    assert!(matches!(
        sim.state,
        Rollout::Warm {
            target: 2,
            watch: Some(Watch { back_to: 1, .. }),
            ..
        }
    ));
    let d = until_failed(&mut sim, 100).expect("caught");
    // The failing pass routes to the warm fleet at once: nothing to start.
    assert_eq!(d.routing, Routing::Release(1));
    assert!(sim.routed(1));
    assert_eq!(sim.running(1), 2, "release 1's warm fleet serves");
}

#[test]
fn rolling_crash_loop_inside_the_watch_swaps_back_to_the_warm_fleet() {
    let mut sim = Sim::steady(watched(Strategy::Rolling, 60));
    sim.apply(2, 2, Behaviour::CrashesAfter(5));
    sim.until_active(2);
    assert!(matches!(sim.state, Rollout::Watching { target: 2, .. }));
    // Release 1's fleet comes back warm beside the watched release.
    sim.pass();
    sim.tick();
    let d = until_failed(&mut sim, 100).expect("caught");
    assert_eq!(d.routing, Routing::Release(1), "one swap to the warm fleet");
    assert!(
        starts(&d.steps).is_empty(),
        "nothing starts cold: {:?}",
        d.steps
    );
    assert!(sim.routed(1));
    assert_eq!(sim.running(1), 2, "release 1's warm fleet serves");
    sim.settle(50);
    assert_eq!((sim.running(1), sim.running(2)), (2, 0));
    assert_eq!(sim.outcomes[&1], Outcome::Active);
}

#[test]
fn a_new_release_during_the_watch_stops_the_warm_fleet() {
    let mut sim = Sim::steady(watched(Strategy::Rolling, 60));
    sim.apply(2, 2, Behaviour::Good);
    sim.settle(50);
    sim.pass();
    sim.tick();
    assert_eq!(sim.running(1), 2, "warm");
    sim.apply(3, 3, Behaviour::Good);
    let steps = sim.pass();
    let warm: Vec<u32> = sim
        .insts
        .iter()
        .filter(|i| i.revision == 1)
        .map(|i| i.id)
        .collect();
    assert_eq!(stops(&steps)[0], (warm, StopReason::Replaced));
    assert!(!sim.routed(1));
    sim.settle(50);
    assert_eq!(sim.outcomes[&3], Outcome::Active);
    assert_eq!(sim.running(1), 0);
    assert_eq!(sim.running(2), 2, "release 2 is now the warm one");
}

#[test]
fn a_canary_that_went_live_is_watched_against_its_stable_release() {
    let mut s = watched(Strategy::Canary, 60);
    s.rollout.steps = vec![CanaryStep {
        weight: 100,
        pause: Pause::default(),
    }];
    let mut sim = Sim::steady(s);
    sim.apply(2, 2, Behaviour::Good);
    sim.settle(50);
    assert_eq!(sim.outcomes[&2], Outcome::Active);
    assert!(matches!(
        sim.state,
        Rollout::Watching {
            target: 2,
            watch: Watch { back_to: 1, .. }
        }
    ));
}

/// The instances that drifted, marked stale by the controller.
fn mark_stale(sim: &mut Sim, ids: &[u32]) {
    for i in sim.insts.iter_mut().filter(|i| ids.contains(&i.id)) {
        i.stale = true;
    }
}

fn drifted_stops(sim: &Sim) -> usize {
    stops(&sim.log)
        .iter()
        .filter(|(_, r)| *r == StopReason::Drifted)
        .map(|(ids, _)| ids.len())
        .sum()
}

#[test]
fn drifted_instances_are_replaced_one_at_a_time_and_never_below_replicas() {
    let mut sim = Sim::steady(settings(Strategy::Rolling, 3));
    let old: Vec<u32> = sim.insts.iter().map(|i| i.id).collect();
    mark_stale(&mut sim, &old);
    // The first pass starts one replacement, in the first stale slot, and
    // stops nothing: its replacement is not ready yet.
    let steps = sim.pass();
    assert_eq!(starts(&steps), [(1, 0)]);
    assert!(stops(&steps).is_empty());
    for _ in 0..30 {
        sim.tick();
        sim.pass();
        // max_surge 1, max_unavailable 0: at most 4 running, 3 ready.
        assert!(sim.insts.len() <= 4, "{} running", sim.insts.len());
        assert!(sim.ready() >= 3, "{} ready", sim.ready());
    }
    assert_eq!(sim.running(1), 3);
    assert!(sim.insts.iter().all(|i| !i.stale && !old.contains(&i.id)));
    assert_eq!(drifted_stops(&sim), 3);
    // Still release 1: no release was made or failed.
    assert_eq!(sim.outcomes[&1], Outcome::Active);
    assert!(sim.recorded("release-failed").is_empty());
}

#[test]
fn without_surge_a_drifted_instance_stops_first_within_max_unavailable() {
    let mut s = settings(Strategy::Rolling, 2);
    s.rollout.max_surge = 0;
    s.rollout.max_unavailable = 1;
    let mut sim = Sim::steady(s);
    let old: Vec<u32> = sim.insts.iter().map(|i| i.id).collect();
    mark_stale(&mut sim, &old);
    let steps = sim.pass();
    // One stops (2 − 1 may be unavailable); its slot starts again once it
    // has exited (no surge: never 3 processes).
    assert_eq!(stops(&steps), [(vec![old[0]], StopReason::Drifted)]);
    assert!(starts(&steps).is_empty());
    sim.tick();
    assert_eq!(starts(&sim.pass()), [(1, 0)]);
    for _ in 0..20 {
        sim.tick();
        sim.pass();
    }
    assert_eq!(sim.running(1), 2);
    assert!(sim.insts.iter().all(|i| !old.contains(&i.id)));
}

#[test]
fn a_drifted_instance_waits_for_a_rollout_and_a_stale_warm_one_is_not_adopted() {
    // During a rollout the rollout replaces the old fleet: nothing more.
    let mut sim = Sim::steady(settings(Strategy::Rolling, 2));
    sim.apply(2, 2, Behaviour::NeverReady);
    sim.pass();
    let old: Vec<u32> = sim
        .insts
        .iter()
        .filter(|i| i.revision == 1)
        .map(|i| i.id)
        .collect();
    mark_stale(&mut sim, &old);
    sim.tick();
    sim.pass();
    assert_eq!(drifted_stops(&sim), 0);

    // A blue-green fleet kept warm: a stale one stops at once, and a
    // rollback to its content starts fresh instances instead of adopting.
    let mut s = settings(Strategy::BlueGreen, 2);
    s.rollout.scale_down_delay = service::Duration::from_secs(60);
    let mut sim = Sim::steady(s);
    sim.apply(2, 2, Behaviour::Good);
    sim.settle(10);
    assert!(matches!(sim.state, Rollout::Warm { .. }), "{:?}", sim.state);
    let warm: Vec<u32> = sim
        .insts
        .iter()
        .filter(|i| i.revision == 1)
        .map(|i| i.id)
        .collect();
    assert_eq!(warm.len(), 2);
    mark_stale(&mut sim, &warm[..1]);
    let steps = sim.pass();
    assert_eq!(stops(&steps), [(vec![warm[0]], StopReason::Drifted)]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Replacing drifted instances keeps a rolling update's bounds — never
    /// fewer than `replicas − max_unavailable` ready, never more than
    /// `replicas + max_surge` running (draining ones count) — and ends
    /// with none of them left, whatever the strategy, the fleet and which
    /// instances drifted.
    #[test]
    fn drift_replacement_keeps_the_bounds_and_leaves_nothing_stale(
        strategy in strategy(),
        replicas in 1u32..7,
        max_surge in 0u32..3,
        max_unavailable in 0u32..3,
        which in proptest::collection::vec(any::<bool>(), 7),
        slow in proptest::collection::vec(0u32..4, 8),
    ) {
        prop_assume!(max_surge + max_unavailable > 0);
        let mut s = settings(strategy, replicas);
        s.rollout.max_surge = max_surge;
        s.rollout.max_unavailable = max_unavailable;
        let mut sim = Sim::steady(s);
        let stale: Vec<u32> = sim
            .insts
            .iter()
            .filter(|i| which[i.slot as usize])
            .map(|i| i.id)
            .collect();
        mark_stale(&mut sim, &stale);
        let floor = replicas.saturating_sub(max_unavailable);
        let mut waited = BTreeMap::new();
        for _ in 0..200 {
            sim.pass();
            let running = sim.insts.len() as u32;
            prop_assert!(running <= replicas + max_surge, "{running} running");
            prop_assert!(sim.ready() >= floor, "{} ready < {floor}", sim.ready());
            sim.random_tick(&mut waited, &slow, &[0; 8]);
            if sim.insts.iter().all(|i| !i.stale) && sim.ready() == replicas {
                break;
            }
        }
        prop_assert!(sim.insts.iter().all(|i| !i.stale));
        prop_assert_eq!(sim.running(1) as u32, replicas);
        prop_assert_eq!(drifted_stops(&sim), stale.len());
        prop_assert_eq!(sim.outcomes[&1], Outcome::Active);
    }
}

// ---- the small decisions, exactly ----

#[test]
fn a_watch_ends_at_its_instant_exactly() {
    let now = Instant::now();
    let w = Watch {
        back_to: 1,
        until: now + Duration::from_secs(1),
    };
    let state = Rollout::Watching {
        target: 2,
        watch: w,
    };
    assert_eq!(state.watched(now), Some((2, w)));
    assert_eq!(
        state.watched(w.until - Duration::from_millis(1)),
        Some((2, w))
    );
    assert_eq!(state.watched(w.until), None, "over at its end");
    assert_eq!(state.watched(w.until + Duration::from_secs(1)), None);
}

#[test]
fn promote_passes_only_the_waiting_rollout_of_the_pending_target() {
    let now = Instant::now();
    let canary = |step| {
        Rollout::Canary(CanaryRun {
            target: 2,
            stable: 1,
            step,
            weight: 25,
            phase: CanaryPhase::Starting { deadline: now },
            promote: false,
            waiting: String::new(),
        })
    };
    let mut c = canary(1);
    assert_eq!(c.promote(2, true), Ok(Some(2)), "step 2 (1-based)");
    assert!(matches!(&c, Rollout::Canary(run) if run.promote));
    for (target, pending) in [(3, true), (2, false)] {
        let mut c = canary(0);
        assert_eq!(
            c.promote(target, pending),
            Err(NotWaiting),
            "{target} {pending}"
        );
        assert_eq!(c, canary(0), "unchanged");
    }
    let bg = |promote| Rollout::BlueGreen {
        target: 2,
        deadline: now,
        routed: 1,
        promote,
    };
    let mut b = bg(false);
    assert_eq!(b.promote(2, true), Ok(None));
    assert_eq!(b, bg(true));
    for (target, pending) in [(3, true), (2, false)] {
        let mut b = bg(false);
        assert_eq!(
            b.promote(target, pending),
            Err(NotWaiting),
            "{target} {pending}"
        );
        assert_eq!(b, bg(false));
    }
}

#[test]
fn every_stop_reason_says_why() {
    for (reason, says) in [
        (StopReason::Shutdown, "agent shutting down"),
        (StopReason::ScaledDown, "scaled down"),
        (StopReason::Replaced, "replaced by the new release"),
        (
            StopReason::Recreate,
            "recreate: replaced by the new release",
        ),
        (StopReason::ReleaseFailed, "release failed"),
        (StopReason::NotInCanary, "not part of the canary rollout"),
        (StopReason::CanaryAborted, "canary aborted"),
        (
            StopReason::ReplacedByCanary,
            "replaced by the canary release",
        ),
        (StopReason::LivenessFailed, "liveness failed"),
        (StopReason::Removed, "service removed"),
        (StopReason::Drifted, "drifted from its release: replaced"),
        (
            StopReason::Drained,
            "its node is drained: replaced on another",
        ),
    ] {
        assert_eq!(reason.to_string(), says);
    }
}

#[test]
fn abort_of_a_canary_swaps_at_once_and_of_a_rolling_update_returns_as_its_fleet_allows() {
    let mut sim = canary_sim(4);
    sim.pass();
    sim.tick();
    sim.pass();
    let d = sim
        .with_view(|v| abort(&sim.state, v, Actor::Agent))
        .unwrap();
    let (_, to, timed) = failed(&d.steps).unwrap();
    assert_eq!(
        (to, timed),
        (Some(1), true),
        "a canary's abort is a timed swap"
    );
    assert!(
        stops(&d.steps)
            .iter()
            .any(|(_, r)| *r == StopReason::CanaryAborted)
    );
    // A canary state whose target is not the pending release (another
    // apply came): a plain return.
    let mut stale = sim.state.clone();
    if let Rollout::Canary(run) = &mut stale {
        run.target = 9;
    }
    let d = sim.with_view(|v| abort(&stale, v, Actor::Agent)).unwrap();
    let (_, to, timed) = failed(&d.steps).unwrap();
    assert_eq!((to, timed), (Some(1), false));
    assert!(stops(&d.steps).is_empty(), "{:?}", d.steps);

    let mut sim = Sim::steady(settings(Strategy::Rolling, 2));
    sim.apply(2, 2, Behaviour::NeverReady);
    sim.pass();
    let d = sim
        .with_view(|v| abort(&sim.state, v, Actor::Agent))
        .unwrap();
    let (reason, to, timed) = failed(&d.steps).unwrap();
    assert_eq!(
        (reason.as_str(), to, timed),
        ("aborted by hand (kiln abort)", Some(1), false)
    );
}

#[test]
fn the_next_pass_is_due_exactly_when_something_changes() {
    let now = Instant::now() + Duration::from_secs(3600);
    let mut sim = Sim::steady(settings(Strategy::Rolling, 1));
    sim.now = now;
    // Every instance ready long ago: nothing due.
    assert_eq!(sim.with_view(|v| due(&Rollout::Idle, v)), None);
    // Ready 1 s ago: due when it has been ready for min_ready (3 s here),
    // before stable_after (10 s).
    sim.settings.rollout.min_ready = service::Duration::from_secs(3);
    sim.insts[0].ready_since = Some(now - Duration::from_secs(1));
    assert_eq!(
        sim.with_view(|v| due(&Rollout::Idle, v)),
        Some(now + Duration::from_secs(2))
    );
    // Ready exactly stable_after ago (past min_ready): nothing left to wait.
    sim.insts[0].ready_since = Some(now - Duration::from_secs(10));
    assert_eq!(sim.with_view(|v| due(&Rollout::Idle, v)), None);
    sim.insts[0].ready_since = Some(now - Duration::from_secs(3600));
    // A warm window: due at its end while it lasts, not after.
    let warm = |until| Rollout::Warm {
        target: 1,
        until,
        watch: None,
    };
    let end = now + Duration::from_secs(5);
    assert_eq!(sim.with_view(|v| due(&warm(end), v)), Some(end));
    assert_eq!(sim.with_view(|v| due(&warm(now), v)), None);
    assert_eq!(
        sim.with_view(|v| due(&warm(now - Duration::from_secs(1)), v)),
        None
    );
    // A canary is judged every tick; a starting step also at its deadline.
    let judging = Rollout::Canary(CanaryRun {
        target: 2,
        stable: 1,
        step: 0,
        weight: 25,
        phase: CanaryPhase::Judging {
            began: now,
            canary: Box::default(),
            stable: Box::default(),
        },
        promote: false,
        waiting: String::new(),
    });
    assert_eq!(sim.with_view(|v| due(&judging, v)), Some(now + CANARY_TICK));
    let starting = Rollout::Canary(CanaryRun {
        phase: CanaryPhase::Starting {
            deadline: now + Duration::from_millis(20),
        },
        ..match judging {
            Rollout::Canary(run) => run,
            _ => unreachable!(),
        }
    });
    assert_eq!(
        sim.with_view(|v| due(&starting, v)),
        Some(now + Duration::from_millis(20))
    );
}

#[test]
fn scaling_down_stops_the_extra_slots_and_starts_nothing() {
    let mut sim = Sim::steady(settings(Strategy::Rolling, 3));
    sim.settings.replicas = 2;
    let steps = sim.pass();
    assert_eq!(stops(&steps), [(vec![2], StopReason::ScaledDown)]);
    assert!(starts(&steps).is_empty());
}

#[test]
fn a_crash_loop_failure_names_the_last_error() {
    let mut sim = Sim::steady(settings(Strategy::Rolling, 1));
    sim.apply(2, 2, Behaviour::Crashes);
    let mut reason = None;
    for _ in 0..100 {
        let d = sim.with_view(|v| {
            decide(
                &sim.state,
                &View {
                    last_error: Some("exit status: 3"),
                    hook_failed: None,
                    ..v.clone()
                },
            )
        });
        if let Some((r, ..)) = failed(&d.steps) {
            reason = Some(r);
            break;
        }
        sim.carry_out(d);
        sim.tick();
        sim.now += Duration::from_millis(300);
    }
    let reason = reason.expect("failed");
    assert!(reason.ends_with("last: exit status: 3"), "{reason}");
}

#[test]
fn a_drifted_instance_that_serves_nobody_stops_at_once() {
    // Unready and of the target: nothing to wait for.
    let mut sim = Sim::steady(settings(Strategy::Rolling, 2));
    sim.insts[0].ready_since = None;
    let id = sim.insts[0].id;
    mark_stale(&mut sim, &[id]);
    let steps = sim.pass();
    assert_eq!(stops(&steps)[0], (vec![id], StopReason::Drifted));
}

#[test]
fn after_a_failure_the_routes_go_to_the_release_returned_to_only_if_it_serves() {
    // Returned to a release with no ready instance: every ready one serves
    // meanwhile (not a table with no backend).
    let mut sim = Sim::steady(settings(Strategy::Rolling, 2));
    sim.apply(2, 2, Behaviour::NeverReady);
    sim.pass();
    sim.unready(|r| r == 1);
    sim.now += Duration::from_secs(10);
    let d = sim.with_view(|v| decide(&sim.state, v));
    assert!(failed(&d.steps).is_some());
    assert_eq!(d.routing, Routing::Any);
    // The same with the failed release's instances ready (not yet for
    // min_ready): they are no fleet of the release returned to.
    let mut s = settings(Strategy::Rolling, 2);
    s.rollout.min_ready = service::Duration::from_secs(60);
    let mut sim = Sim::steady(s);
    sim.apply(2, 2, Behaviour::Good);
    sim.pass();
    sim.tick();
    sim.unready(|r| r == 1);
    assert!(
        sim.insts
            .iter()
            .any(|i| i.revision == 2 && i.ready_since.is_some())
    );
    sim.now += Duration::from_secs(10);
    let d = sim.with_view(|v| decide(&sim.state, v));
    assert!(failed(&d.steps).is_some());
    assert_eq!(d.routing, Routing::Any);
    // Blue-green routes to the release returned to whatever its state.
    let mut sim = Sim::steady(settings(Strategy::BlueGreen, 2));
    sim.apply(2, 2, Behaviour::NeverReady);
    sim.pass();
    sim.now += Duration::from_secs(10);
    let d = sim.with_view(|v| decide(&sim.state, v));
    assert!(failed(&d.steps).is_some());
    assert_eq!(d.routing, Routing::Release(1));
}

#[test]
fn a_slot_is_forgiven_once_its_instance_stayed_ready_for_stable_after() {
    let mut sim = Sim::steady(settings(Strategy::Rolling, 1));
    let now = sim.now;
    let stable = |sim: &Sim| {
        let d = sim.with_view(|v| decide(&sim.state, v));
        d.steps.iter().any(|s| {
            matches!(
                s,
                Step::SlotStable {
                    revision: 1,
                    slot: 0
                }
            )
        })
    };
    sim.slots.insert(
        (1, 0),
        SlotHistory {
            failures: 1,
            ..SlotHistory::default()
        },
    );
    sim.insts[0].ready_since = Some(now - Duration::from_secs(10));
    assert!(stable(&sim), "ready for stable_after exactly");
    sim.insts[0].ready_since = Some(now - Duration::from_millis(9_999));
    assert!(!stable(&sim), "not yet");
    sim.insts[0].ready_since = Some(now - Duration::from_secs(60));
    sim.slots.get_mut(&(1, 0)).unwrap().failures = 0;
    assert!(!stable(&sim), "nothing to forgive");
}

#[test]
fn warm_instances_are_adopted_only_whole_and_only_by_an_empty_target() {
    // Release 2 has release 1's content: its two ready instances are taken
    // over, nothing starts.
    let mut sim = Sim::steady(settings(Strategy::Rolling, 2));
    sim.apply(2, 1, Behaviour::Good);
    let steps = sim.pass();
    let adopted = steps
        .iter()
        .filter(|s| matches!(s, Step::Adopt { .. }))
        .count();
    assert_eq!((adopted, starts(&steps).len()), (2, 0));
    // A target that already runs an instance adopts nothing.
    let mut sim = Sim::steady(settings(Strategy::Rolling, 2));
    sim.apply(2, 1, Behaviour::Good);
    sim.add(2, 0, None);
    let steps = sim.pass();
    assert!(
        !steps.iter().any(|s| matches!(s, Step::Adopt { .. })),
        "{steps:?}"
    );
    // Too few ready ones for the fleet: none is adopted.
    let mut sim = Sim::steady(settings(Strategy::Rolling, 2));
    sim.insts[1].ready_since = None;
    sim.apply(2, 1, Behaviour::Good);
    let steps = sim.pass();
    assert!(
        !steps.iter().any(|s| matches!(s, Step::Adopt { .. })),
        "{steps:?}"
    );
}

#[test]
fn blue_green_keeps_the_traffic_where_it_was_routed() {
    let mut s = settings(Strategy::BlueGreen, 2);
    s.rollout.scale_down_delay = service::Duration::from_secs(60);
    let mut sim = Sim::steady(s);
    sim.apply(2, 2, Behaviour::Good);
    sim.settle(20);
    assert!(matches!(sim.state, Rollout::Warm { target: 2, .. }));
    // The next rollout starts routed where the traffic is: release 2.
    sim.apply(3, 3, Behaviour::NeverReady);
    sim.pass();
    assert!(
        matches!(
            sim.state,
            Rollout::BlueGreen {
                target: 3,
                routed: 2,
                ..
            }
        ),
        "{:?}",
        sim.state
    );
    assert_eq!(sim.routing, Routing::Release(2));
    assert_eq!(
        sim.running(1),
        0,
        "release 1's warm fleet serves nobody now"
    );
    let routed_to = |sim: &mut Sim, routed: u64| {
        if let Rollout::BlueGreen { routed: r, .. } = &mut sim.state {
            *r = routed;
        }
    };
    // The release routed so far has no instance left: the newest other
    // release with a ready instance keeps the traffic.
    routed_to(&mut sim, 9);
    sim.pass();
    assert_eq!(sim.bg_routed(), Some(2), "{:?}", sim.state);
    // None ready anywhere: the target itself.
    sim.unready(|_| true);
    routed_to(&mut sim, 9);
    sim.pass();
    assert_eq!(sim.bg_routed(), Some(3), "{:?}", sim.state);
}

#[test]
fn a_drifted_extra_instance_gets_no_replacement_past_the_replicas() {
    let mut s = settings(Strategy::Rolling, 3);
    // Surge room enough to start one.
    s.rollout.max_surge = 3;
    let mut sim = Sim::steady(s);
    sim.settings.replicas = 2;
    let id = sim.insts[2].id;
    mark_stale(&mut sim, &[id]);
    let steps = sim.pass();
    assert!(
        starts(&steps).iter().all(|(_, slot)| *slot < 2),
        "{steps:?}"
    );
}

/// A state left for another target (or another strategy, changed by an
/// apply of the settings) is no state of this rollout: a fresh one of the
/// strategy's kind begins.
#[test]
fn a_rollout_state_of_another_target_or_strategy_starts_afresh() {
    let canary_run = |target, stable| {
        Rollout::Canary(CanaryRun {
            target,
            stable,
            step: 1,
            weight: 25,
            phase: CanaryPhase::Starting {
                deadline: Instant::now(),
            },
            promote: true,
            waiting: String::new(),
        })
    };
    let sim0 = Sim::steady(settings(Strategy::Rolling, 2));
    let long_ago = sim0.now - Duration::from_secs(3600);
    for (strategy, stale) in [
        (
            Strategy::Rolling,
            Rollout::Rolling {
                target: 9,
                deadline: long_ago,
            },
        ),
        (
            Strategy::BlueGreen,
            Rollout::BlueGreen {
                target: 9,
                deadline: long_ago,
                routed: 1,
                promote: true,
            },
        ),
        (Strategy::Canary, canary_run(9, 7)),
        (
            Strategy::Rolling,
            Rollout::Paused {
                target: 9,
                routed: None,
            },
        ),
        // The same target, another strategy now.
        (
            Strategy::Rolling,
            Rollout::BlueGreen {
                target: 2,
                deadline: long_ago,
                routed: 1,
                promote: true,
            },
        ),
        (
            Strategy::BlueGreen,
            Rollout::Rolling {
                target: 2,
                deadline: long_ago,
            },
        ),
        (
            Strategy::Canary,
            Rollout::Rolling {
                target: 2,
                deadline: long_ago,
            },
        ),
    ] {
        let mut sim = Sim::steady(settings(strategy, 2));
        sim.apply(2, 2, Behaviour::NeverReady);
        sim.state = stale.clone();
        sim.pass();
        let fresh = sim.now + Duration::from_secs(10);
        let ok = match (&sim.state, strategy) {
            (
                Rollout::Rolling {
                    target: 2,
                    deadline,
                },
                Strategy::Rolling,
            ) => *deadline == fresh,
            (
                Rollout::BlueGreen {
                    target: 2,
                    deadline,
                    promote: false,
                    ..
                },
                Strategy::BlueGreen,
            ) => *deadline == fresh,
            (Rollout::Canary(run), Strategy::Canary) => {
                (run.target, run.stable, run.step, run.promote) == (2, 1, 0, false)
            }
            _ => false,
        };
        assert!(ok, "{stale:?} under {strategy:?} became {:?}", sim.state);
    }
}

#[test]
fn a_canary_that_took_over_warm_instances_goes_whole() {
    // Release 2 has release 1's content: adopted, nothing to compare.
    let mut sim = canary_sim(2);
    sim.content.insert(2, 1);
    sim.pass();
    assert!(
        matches!(
            sim.state,
            Rollout::Rolling { .. } | Rollout::Watching { .. } | Rollout::Idle
        ),
        "{:?}",
        sim.state
    );
    assert!(sim.recorded("canary-started").is_empty());
}

#[test]
fn a_watch_kept_after_going_live_ends_at_its_end_exactly() {
    let mut sim = Sim::steady(watched(Strategy::Rolling, 60));
    sim.apply(2, 2, Behaviour::Good);
    sim.settle(50);
    let Rollout::Watching { watch, .. } = sim.state else {
        panic!("{:?}", sim.state);
    };
    sim.now = watch.until;
    sim.pass();
    assert_eq!(sim.state, Rollout::Idle, "over at its end");
}

#[test]
fn blue_green_after_its_warm_window_goes_on_watching() {
    let mut s = watched(Strategy::BlueGreen, 60);
    s.rollout.scale_down_delay = service::Duration::from_secs(1);
    let mut sim = Sim::steady(s);
    sim.apply(2, 2, Behaviour::Good);
    sim.settle(10);
    assert!(matches!(sim.state, Rollout::Warm { .. }), "{:?}", sim.state);
    sim.now += Duration::from_secs(2);
    sim.pass();
    assert!(
        matches!(sim.state, Rollout::Watching { target: 2, .. }),
        "{:?}",
        sim.state
    );
    assert_eq!(sim.running(1), 0, "the warm fleet went with its window");
}

#[test]
fn a_paused_blue_green_keeps_its_traffic_and_still_waits_for_promote() {
    let mut s = settings(Strategy::BlueGreen, 2);
    s.rollout.auto_rollback = false;
    s.rollout.auto_promote = false;
    let mut sim = Sim::steady(s);
    sim.apply(2, 2, Behaviour::NeverReady);
    sim.pass();
    sim.tick();
    sim.now += Duration::from_secs(10);
    sim.pass();
    assert_eq!(
        sim.state,
        Rollout::Paused {
            target: 2,
            routed: Some(1)
        }
    );
    assert_eq!(sim.routing, Routing::Release(1));
    // Its fleet gets ready after all: still routed to 1, waiting.
    for i in sim.insts.iter_mut().filter(|i| i.revision == 2) {
        i.ready_since = Some(sim.now);
    }
    let d = sim.with_view(|v| decide(&sim.state, v));
    assert_eq!(d.routing, Routing::Release(1));
    assert!(!d.steps.contains(&Step::Activate), "{:?}", d.steps);
    assert!(
        matches!(&d.message, Message::Set(m) if m.contains("waiting for `kiln promote web`")),
        "{:?}",
        d.message
    );
}

#[test]
fn a_rollout_replaces_drifted_instances_itself() {
    // A stale instance of the release before: the new rollout replaces it
    // as any other; no drift repair beside it.
    let mut sim = Sim::steady(settings(Strategy::Rolling, 2));
    let id = sim.insts[0].id;
    mark_stale(&mut sim, &[id]);
    sim.apply(2, 2, Behaviour::Good);
    let steps = sim.pass();
    assert!(
        !stops(&steps).iter().any(|(_, r)| *r == StopReason::Drifted),
        "{steps:?}"
    );
}

#[test]
fn a_blue_green_service_routes_only_its_release_when_idle() {
    let mut sim = Sim::steady(settings(Strategy::BlueGreen, 1));
    // A leftover of another release, ready.
    sim.add(5, 0, Some(sim.now));
    let d = sim.with_view(|v| decide(&Rollout::Idle, v));
    assert_eq!(d.routing, Routing::Release(1));
}

#[test]
fn a_paused_rollout_starts_nothing_new() {
    let mut s = settings(Strategy::Rolling, 2);
    s.rollout.auto_rollback = false;
    let mut sim = Sim::steady(s);
    sim.apply(2, 2, Behaviour::NeverReady);
    sim.pass();
    sim.now += Duration::from_secs(10);
    sim.pass();
    assert!(sim.state.stalled());
    // Its instance exits: the slot stays empty while paused.
    sim.forget(|i| i.revision == 2);
    let steps = sim.pass();
    assert!(starts(&steps).is_empty(), "{steps:?}");
}

/// Issue 23's paused row, found by its restart test: after an agent
/// restart its adopted instances are unready until their probes answer
/// again; a paused rollout must not take them for old instances to
/// replace (nothing would start in their place).
#[test]
fn a_paused_rollout_stops_nothing_while_old_instances_are_unready() {
    let mut s = settings(Strategy::Rolling, 3);
    s.rollout.auto_rollback = false;
    let mut sim = Sim::steady(s);
    sim.apply(2, 2, Behaviour::NeverReady);
    sim.pass();
    sim.now += Duration::from_secs(10);
    sim.pass();
    assert!(sim.state.stalled());
    // The agent restarted: every instance is unready until probed again.
    for i in &mut sim.insts {
        i.ready_since = None;
    }
    let steps = sim.pass();
    assert!(
        !steps.iter().any(|s| matches!(s, Step::Stop { .. })),
        "{steps:?}"
    );
    assert!(sim.state.stalled());
}

#[test]
fn a_blue_green_rollback_that_adopts_the_warm_fleet_switches_without_promote() {
    let mut s = settings(Strategy::BlueGreen, 2);
    s.rollout.auto_promote = false;
    s.rollout.scale_down_delay = service::Duration::from_secs(60);
    let mut sim = Sim::steady(s);
    sim.apply(2, 2, Behaviour::Good);
    sim.pass();
    sim.tick();
    sim.pass();
    sim.state.promote(2, true).unwrap();
    sim.pass();
    assert!(
        matches!(sim.state, Rollout::Warm { target: 2, .. }),
        "{:?}",
        sim.state
    );
    // Release 3 has release 1's content: it takes the warm fleet over and
    // gets the traffic at once.
    sim.apply(3, 1, Behaviour::Good);
    let steps = sim.pass();
    assert!(
        steps.iter().any(|s| matches!(s, Step::Adopt { .. })),
        "{steps:?}"
    );
    assert!(
        matches!(sim.state, Rollout::Warm { target: 3, .. }),
        "{:?}",
        sim.state
    );
    assert_eq!(sim.routing, Routing::Release(3));
}

#[test]
fn blue_green_routes_where_its_warm_release_was_even_unready() {
    // Unwatched, so release 1's warm fleet stays through the next apply.
    let mut s = watched(Strategy::BlueGreen, 0);
    s.rollout.scale_down_delay = service::Duration::from_secs(60);
    let mut sim = Sim::steady(s);
    sim.apply(2, 2, Behaviour::Good);
    sim.settle(10);
    assert!(
        matches!(sim.state, Rollout::Warm { target: 2, .. }),
        "{:?}",
        sim.state
    );
    sim.unready(|r| r == 2);
    sim.apply(3, 3, Behaviour::NeverReady);
    sim.pass();
    assert_eq!(
        sim.bg_routed(),
        Some(2),
        "the traffic stays with release 2: {:?}",
        sim.state
    );
}

#[test]
fn a_canary_abort_swaps_by_stopping_its_fleet_or_by_a_route_when_it_has_none() {
    let mut sim = canary_sim(4);
    sim.pass();
    sim.tick();
    sim.pass();
    let d = sim
        .with_view(|v| abort(&sim.state, v, Actor::Agent))
        .unwrap();
    assert!(
        !d.steps.contains(&Step::Route),
        "the stop is the swap: {:?}",
        d.steps
    );
    // No canary instance left (they crashed): a route swap, nothing stopped.
    sim.forget(|i| i.revision == 2);
    let d = sim
        .with_view(|v| abort(&sim.state, v, Actor::Agent))
        .unwrap();
    assert!(d.steps.contains(&Step::Route), "{:?}", d.steps);
    assert!(stops(&d.steps).is_empty());
}

#[test]
fn a_canarys_records_number_its_steps_from_one() {
    let mut sim = canary_sim(4);
    sim.pass();
    sim.tick();
    sim.pass();
    sim.now += Duration::from_secs(1);
    sim.pass();
    // Step 1 passed: step 2's fleet has the progress deadline from now.
    let Rollout::Canary(run) = &sim.state else {
        panic!("{:?}", sim.state);
    };
    assert_eq!(run.step, 1);
    assert_eq!(
        run.phase,
        CanaryPhase::Starting {
            deadline: sim.now + Duration::from_secs(10)
        }
    );
    sim.settle(50);
    let steps: Vec<(usize, usize, u32)> = sim
        .recorded("canary-step")
        .iter()
        .filter_map(|c| match c {
            Change::CanaryStep {
                step, of, weight, ..
            } => Some((*step, *of, *weight)),
            _ => None,
        })
        .collect();
    assert_eq!(steps, [(1, 2, 25), (2, 2, 100)]);
    let passed: Vec<(usize, u32)> = sim
        .recorded("canary-step-passed")
        .iter()
        .filter_map(|c| match c {
            Change::CanaryStepPassed { step, weight, .. } => Some((*step, *weight)),
            _ => None,
        })
        .collect();
    assert_eq!(passed, [(1, 25), (2, 100)]);
}

#[test]
fn a_canary_in_progress_keeps_its_stable_release_whatever_else_is_active() {
    let mut sim = canary_sim(4);
    sim.pass();
    assert!(matches!(sim.state, Rollout::Canary(_)));
    // Release 1 no longer counts as active (another change marked it):
    // the canary keeps comparing with it and returning to it.
    sim.outcomes.insert(1, Outcome::Superseded);
    assert_eq!(sim.previous(), None);
    sim.pass();
    assert!(
        matches!(&sim.state, Rollout::Canary(run) if run.stable == 1 && run.target == 2),
        "{:?}",
        sim.state
    );
}

#[test]
fn a_canary_step_passes_only_with_its_whole_fleet() {
    let mut sim = canary_sim(4);
    sim.pass();
    sim.tick();
    sim.pass();
    // The step's weight took effect; its canary instance exits.
    sim.forget(|i| i.revision == 2);
    sim.now += Duration::from_secs(2);
    sim.pass();
    assert!(
        sim.recorded("canary-step-passed").is_empty(),
        "passed without its fleet"
    );
    let Rollout::Canary(run) = &sim.state else {
        panic!("{:?}", sim.state);
    };
    assert_eq!(
        (run.step, run.waiting.as_str()),
        (0, "canary fleet: 0/1 ready")
    );
}

#[test]
fn a_fleet_is_expected_beside_the_target_in_a_warm_window_or_a_watch() {
    let now = Instant::now();
    let later = now + Duration::from_secs(5);
    let warm = Rollout::Warm {
        target: 2,
        until: later,
        watch: None,
    };
    let watching = Rollout::Watching {
        target: 2,
        watch: Watch {
            back_to: 1,
            until: later,
        },
    };
    assert!(warm.warm_beside(2, now, Strategy::BlueGreen));
    assert!(
        !warm.warm_beside(2, later, Strategy::BlueGreen),
        "window over"
    );
    assert!(
        !warm.warm_beside(3, now, Strategy::BlueGreen),
        "another target"
    );
    assert_eq!(
        watching.watch_keeps_warm(2, now, Strategy::Rolling),
        Some(1)
    );
    assert!(watching.warm_beside(2, now, Strategy::Canary));
    assert!(
        !watching.warm_beside(2, now, Strategy::BlueGreen),
        "blue-green's own window"
    );
    assert!(
        !watching.warm_beside(2, later, Strategy::Rolling),
        "watch over"
    );
    assert!(
        !watching.warm_beside(3, now, Strategy::Rolling),
        "another target"
    );
    assert!(!Rollout::Idle.warm_beside(2, now, Strategy::Rolling));
}

/// The leader keeps its routing in the state store for the other nodes:
/// every variant reads back as written.
#[test]
fn every_routing_reads_back_as_written() {
    for routing in [
        Routing::Any,
        Routing::Release(7),
        Routing::Split {
            stable: 1,
            canary: 2,
            weight: 30,
        },
    ] {
        let text = serde_json::to_string(&routing).unwrap();
        assert_eq!(
            serde_json::from_str::<Routing>(&text).unwrap(),
            routing,
            "{text}"
        );
    }
}

/// `kiln drain`: the instances of a drained node are replaced as drifted
/// ones are — a fresh one in the same slot on another node first, the
/// drained one stopped (for that reason) only once its replacement has
/// been ready for `min_ready`; the fleet never has fewer ready than its
/// replicas.
#[test]
fn a_drained_nodes_instances_are_replaced_on_the_others_before_they_stop() {
    let nodes: Vec<String> = ["n1", "n2", "n3"].map(str::to_owned).to_vec();
    let start = Instant::now();
    let clock = |after: Duration| Clock {
        now: start + after,
        wall_ms: 1_000_000 + after.as_millis() as u64,
    };
    let ready = |id: u32, revision: u64, slot: u32| Observation {
        id,
        revision,
        slot,
        stopping: false,
        ready_since_ms: Some(1_000_000),
        live: true,
        adopted: false,
        stale: false,
        gone: None,
        refused: false,
        port: 1,
    };
    let mut fleet: Fleet<u32> = Fleet::default();
    fleet.reset(
        (0..3)
            .map(|slot| Assignment {
                id: slot,
                node: nodes[slot as usize].clone(),
                revision: 1,
                slot,
                adopted: false,
                stop: None,
                resources: Default::default(),
            })
            .collect(),
        &clock(Duration::ZERO),
    );
    let mut seen: Vec<Observation<u32>> = (0..3).map(|i| ready(i, 1, i)).collect();
    fleet.observe(seen.clone(), &clock(Duration::ZERO));
    let settings = settings(Strategy::Rolling, 3);
    let (slots, same, counters) = (BTreeMap::new(), BTreeSet::new(), BTreeMap::new());
    let name = ServiceName::try_from("web").unwrap();
    let decide_at = |fleet: &Fleet<u32>, after: Duration| {
        decide(
            &Rollout::Idle,
            &View {
                service: &name,
                now: start + after,
                target: 1,
                outcome: Outcome::Active,
                previous: None,
                settings: &settings,
                backoff: Backoff::default(),
                instances: fleet.seen(),
                slots: &slots,
                same_content: &same,
                counters: &counters,
                last_error: None,
                hook_failed: None,
            },
        )
    };
    // Nothing drained: nothing to do.
    let d = decide_at(&fleet, Duration::from_secs(60));
    assert!(starts(&d.steps).is_empty() && stops(&d.steps).is_empty());

    fleet.drain(&BTreeSet::from(["n2".to_owned()]));
    assert_eq!(
        fleet.seen().iter().map(|s| s.drained).collect::<Vec<_>>(),
        [false, true, false]
    );
    assert_eq!(fleet.nodes_for(&nodes), ["n1", "n3"]);
    // A replacement in n2's slot, and no stop yet.
    let d = decide_at(&fleet, Duration::from_secs(60));
    assert_eq!(starts(&d.steps), [(1, 1)]);
    assert!(stops(&d.steps).is_empty());
    let open = fleet.nodes_for(&nodes);
    fleet.assign(
        &d.steps,
        1,
        (&open, &Room::default()),
        |_| Resources::default(),
        |_| 3,
    );
    let new = fleet.assigned().iter().find(|a| a.id == 3).unwrap();
    assert_ne!(new.node, "n2", "never placed on the drained node");
    // Not ready yet: the drained one still serves.
    let d = decide_at(&fleet, Duration::from_secs(61));
    assert!(stops(&d.steps).is_empty());
    // Ready (and for min_ready): the drained one stops, as drained.
    seen.push(Observation {
        ready_since_ms: Some(1_061_000),
        ..ready(3, 1, 1)
    });
    fleet.observe(seen, &clock(Duration::from_secs(61)));
    let d = decide_at(&fleet, Duration::from_secs(120));
    assert_eq!(stops(&d.steps), [(vec![1], StopReason::Drained)]);
    assert!(starts(&d.steps).is_empty());
    // Every node drained: new instances go anywhere rather than nowhere.
    fleet.drain(&nodes.iter().cloned().collect());
    assert_eq!(fleet.nodes_for(&nodes), nodes);
    fleet.drain(&BTreeSet::new());
    assert!(fleet.seen().iter().all(|s| !s.drained), "undrained");
}
