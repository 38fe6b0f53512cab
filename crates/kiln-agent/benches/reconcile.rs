//! The controller's decisions and bookkeeping at scale (`bench/reconcile.sh`).
//!
//! 100 services × 100 replicas on the fake runtime (silent: no socket, no
//! process) and the in-memory state store. A pass per service does what
//! the agent's controller does on each pass, minus the instance tasks:
//! read the service and its current releases from the state store, build the
//! view, `kiln_core::rollout::decide`, and carry the steps out (spawn on
//! the runtime and record the instance, stop and record, mark releases
//! active). Time is virtual (passed in, as the controller's decisions
//! take it), so only the work is measured.
//!
//! Two ways, in one run (`"paths"`): `direct`, the controller as it was
//! before the leader/node split (the view from the instances it tracks,
//! the steps carried out at once), and `split`, as the agent's controller
//! does it now: the node worker publishes observations to the state
//! store, the leader builds its view from them and from the assignments
//! it reads, writes the assignments its decision makes, and the worker
//! reads them back and carries them out (`kiln_core::rollout::assign`).
//!
//! Prints one JSON object: for each path, the pass time at 100, 1,000 and
//! 10,000 instances (median of 21), and the rate of a rolling update of
//! all 10,000 to a new release.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_agent::bench::{
    ClusterState, Fake, Guard, InstanceRecord, Launch, MemoryState, NewEvent, NodeState, Running,
    Runtime, ServiceRecord, ready,
};
use kiln_core::Digest;
use kiln_core::event::Change;
use kiln_core::health::{Backoff, SlotHistory};
use kiln_core::release::{Outcome, Release, ReleaseConfig, ServiceSettings};
use kiln_core::rollout::assign::{self, Fleet, Observation};
use kiln_core::rollout::{Clock, Rollout, Seen, Step, View, decide};
use kiln_core::service::{self, RolloutSpec, RuntimeKind};
use kiln_core::spec::{AbsolutePath, ServiceName};

struct Svc {
    name: ServiceName,
    rollout: Rollout,
    seen: Vec<Seen<String>>,
    running: BTreeMap<String, Box<dyn Running>>,
    slots: BTreeMap<(u64, u32), SlotHistory>,
    ids: u64,
    /// The split's: the worker's reports of instances gone and their ids.
    gone: Vec<Observation>,
    ended: BTreeSet<String>,
    /// As the agent's controller keeps them: a digest of what the worker
    /// last published, whether the leader took in what the store has, its
    /// fleet, a digest of the assignments as stored, and what the worker
    /// last carried out.
    published: Option<u64>,
    observed: bool,
    fleet: Fleet,
    stored: Option<Option<u64>>,
    worked: Option<(u64, u64)>,
    hashed: (u64, u64),
}

/// The node of the split path.
const NODE: &str = "bench";

struct Node {
    state: MemoryState,
    fake: Arc<Fake>,
    services: Vec<Svc>,
    launch: Launch,
    now: Instant,
    started: u64,
    /// Through the store and the assignments (the agent's way now).
    split: bool,
    /// Wall-clock time 0 of the observations.
    epoch: Instant,
}

fn config(version: &str) -> ReleaseConfig {
    ReleaseConfig {
        image: Digest::of(b"bench"),
        image_name: "bench".to_owned(),
        command: vec!["/bin/server".to_owned()],
        workdir: AbsolutePath::try_from("/").expect("a valid path"),
        env: [(
            kiln_core::spec::EnvName::try_from("VERSION").expect("a valid name"),
            version.to_owned(),
        )]
        .into(),
        secrets: BTreeMap::new(),
        volumes: BTreeMap::new(),
        runtime: RuntimeKind::Process,
        user: None,
        resources: Default::default(),
        hooks: Default::default(),
        health: Default::default(),
        stop: Default::default(),
    }
}

fn settings(replicas: u32, max_surge: u32) -> ServiceSettings {
    ServiceSettings {
        replicas,
        listen: None,
        route: Default::default(),
        tls: None,
        rollout: RolloutSpec {
            max_surge,
            // Unwatched: a watched release keeps the one before it warm for
            // `rollout.watch` (5m: 3,000 passes of virtual time), which is
            // not the replacement this measures.
            watch: service::Duration::from_secs(0),
            ..RolloutSpec::default()
        },
        timeout: service::Duration::from_secs(30),
        router: service::RouterSpec::default(),
        node_labels: Default::default(),
        error_pages: Default::default(),
    }
}

impl Node {
    fn new(services: u32, replicas: u32, max_surge: u32, split: bool) -> Self {
        let mut node = Node {
            state: MemoryState::new(),
            fake: Fake::silent(),
            services: Vec::new(),
            launch: Launch {
                id: String::new(),
                rootfs: "/nonexistent".into(),
                argv: vec!["/bin/server".to_owned()],
                env: BTreeMap::new(),
                workdir: "/".to_owned(),
                volumes: Vec::new(),
                user: None,
                limits: Default::default(),
                cgroup: String::new(),
                self_contained: false,
                stdin: false,
            },
            now: Instant::now(),
            started: 0,
            split,
            epoch: Instant::now(),
        };
        for n in 0..services {
            let name = ServiceName::try_from(format!("svc{n}").as_str()).expect("a valid name");
            node.services.push(Svc {
                name: name.clone(),
                rollout: Rollout::Idle,
                seen: Vec::new(),
                running: BTreeMap::new(),
                slots: BTreeMap::new(),
                ids: 0,
                gone: Vec::new(),
                ended: BTreeSet::new(),
                published: None,
                observed: false,
                fleet: Fleet::default(),
                stored: None,
                worked: None,
                hashed: (u64::MAX, 0),
            });
            node.release(&name, 1, settings(replicas, max_surge));
        }
        // Release 1 everywhere, whole and ready.
        node.converge();
        node
    }

    /// `kiln apply`: release `revision` becomes the target.
    fn release(&self, name: &ServiceName, revision: u64, settings: ServiceSettings) {
        let cfg = config(&revision.to_string());
        let rel = Release {
            service: name.clone(),
            revision,
            hash: cfg.hash(),
            config: cfg,
            created: "2026-12-01T00:00:00Z".to_owned(),
            cause: "apply".to_owned(),
            outcome: Outcome::Pending,
            reason: None,
        };
        let rec = ServiceRecord {
            name: name.clone(),
            settings,
            target: revision,
            version: 0,
        };
        let ev = NewEvent::service(
            Change::ReleaseCreated {
                image: rel.config.image.clone(),
                hash: rel.hash.clone(),
                changes: Vec::new(),
                signed_by: None,
            },
            name,
            Some(revision),
        );
        ready(
            self.state
                .record_apply(&rec, Some(&rel), &[ev], Guard::NONE),
        )
        .expect("recorded");
    }

    /// One pass over every service; whether all of them were idle and
    /// had nothing to do.
    fn pass(&mut self) -> bool {
        let mut quiet = true;
        for i in 0..self.services.len() {
            quiet &= if self.split {
                self.pass_split(i)
            } else {
                self.pass_one(i)
            };
        }
        quiet
    }

    /// One pass of the agent's controller now: the worker publishes, the
    /// leader decides from the store and writes assignments, the worker
    /// reads them back and carries them out.
    fn pass_split(&mut self, i: usize) -> bool {
        let now = self.now;
        let clock = Clock {
            now,
            wall_ms: now.duration_since(self.epoch).as_millis() as u64 + 1_000_000,
        };
        let svc = &mut self.services[i];
        // The worker: what the instance tasks reported since the last
        // pass (stopped ones exited, started ones are ready), published.
        for gone in reports(&self.state, svc, now) {
            svc.ended.insert(gone.id.clone());
            svc.gone.push(observation(&gone, &clock, Some(false)));
        }
        let mine = observations_digest(svc, &clock);
        if svc.published != Some(mine) {
            let published: Vec<Observation> = svc
                .seen
                .iter()
                .map(|s| observation(s, &clock, None))
                .chain(svc.gone.iter().cloned())
                .collect();
            ready(self.state.publish(&svc.name, NODE, &published)).expect("published");
            svc.published = Some(mine);
            svc.observed = false;
        }
        // The leader.
        let Some((rec, releases, outcome, previous)) = current(&self.state, &svc.name) else {
            return true;
        };
        let target = rec.target;
        let stored = match svc.stored {
            Some(known) => known,
            None => {
                let a = ready(self.state.assignments(&svc.name))
                    .expect("read")
                    .map(|a| a.list);
                let d = a.as_ref().map(digest);
                svc.fleet.reset(a.unwrap_or_default(), &clock);
                d
            }
        };
        if !svc.observed {
            let observations = ready(self.state.observations(&svc.name)).expect("read");
            for f in svc.fleet.observe(observations, &clock) {
                svc.slots.entry((f.revision, f.slot)).or_default().failed(
                    now,
                    f.ready_since_ms.map(|ms| clock.to_instant(ms)),
                    &Backoff::default(),
                );
            }
            svc.observed = true;
        }
        let same_content = BTreeSet::from([target]);
        let counters = BTreeMap::new();
        let view = View {
            service: &svc.name,
            now,
            target,
            outcome,
            previous,
            settings: &rec.settings,
            backoff: Backoff::default(),
            instances: svc.fleet.seen(),
            slots: &svc.slots,
            same_content: &same_content,
            counters: &counters,
            last_error: None,
            hook_failed: None,
        };
        let d = decide(&svc.rollout, &view);
        let quiet = d.steps.is_empty() && d.next.target().is_none();
        svc.rollout = d.next;
        let name = svc.name.clone();
        let ids = &mut svc.ids;
        svc.fleet.assign(
            &d.steps,
            target,
            (&[NODE.to_owned()], &Default::default()),
            |_| Default::default(),
            |rev| {
                *ids += 1;
                format!("{name}-r{rev}-{ids}")
            },
        );
        if svc.hashed.0 != svc.fleet.generation() {
            svc.hashed = (svc.fleet.generation(), digest(&svc.fleet.assigned()));
        }
        let now_digest = svc.hashed.1;
        if stored != Some(now_digest) {
            ready(
                self.state
                    .assign(&svc.name, svc.fleet.assigned(), None, None, Guard::NONE),
            )
            .expect("assigned");
        }
        svc.stored = Some(Some(now_digest));
        for step in &d.steps {
            match step {
                Step::Activate => {
                    activate(&self.state, &svc.name, target, &releases);
                }
                Step::Record(change) => {
                    let ev = NewEvent::service(change.clone(), &svc.name, Some(target));
                    ready(self.state.append_event(&ev)).expect("recorded");
                }
                Step::Fail { .. } => panic!("no rollout fails here"),
                _ => {}
            }
        }
        // The worker: its assignments, as just stored (unless it carried
        // out the same already, on the same instances).
        let key = (svc.fleet.generation(), mine);
        if svc.worked == Some(key) {
            return quiet;
        }
        svc.worked = Some(key);
        let assignments = svc.fleet.assigned();
        let running: Vec<assign::Running<'_>> = svc
            .seen
            .iter()
            .map(|s| assign::Running {
                id: &s.id,
                revision: s.revision,
                slot: s.slot,
                stopping: s.stopping,
            })
            .collect();
        let w = assign::work(NODE, assignments, &running, &svc.ended);
        drop(running);
        let kept = |id: &String| assignments.iter().any(|a| a.id == *id);
        svc.gone.retain(|o| kept(&o.id));
        svc.ended.retain(|id| kept(id));
        for a in w.start {
            start(
                &self.state,
                &self.fake,
                &self.launch,
                svc,
                a.id,
                a.revision,
                a.slot,
            );
            self.started += 1;
        }
        let stops: BTreeMap<String, String> = w
            .stop
            .into_iter()
            .map(|(id, reason)| (id, reason.to_string()))
            .chain(
                w.orphans
                    .into_iter()
                    .map(|id| (id, "no assignment".to_owned())),
            )
            .collect();
        for s in svc.seen.iter_mut().filter(|s| stops.contains_key(&s.id)) {
            s.stopping = true;
            let ev = NewEvent::service(
                Change::InstanceStopping {
                    reason: stops[&s.id].clone(),
                },
                &svc.name,
                Some(s.revision),
            );
            ready(self.state.append_event(&ev)).expect("recorded");
        }
        quiet
    }

    fn pass_one(&mut self, i: usize) -> bool {
        let now = self.now;
        let svc = &mut self.services[i];
        let Some((rec, releases, outcome, previous)) = current(&self.state, &svc.name) else {
            return true;
        };
        let target = rec.target;
        // What the instance tasks would have reported since the last pass:
        // stopped ones exited, started ones are ready.
        reports(&self.state, svc, now);
        let same_content = BTreeSet::from([target]);
        let counters = BTreeMap::new();
        let view = View {
            service: &svc.name,
            now,
            target,
            outcome,
            previous,
            settings: &rec.settings,
            backoff: Backoff::default(),
            instances: &svc.seen,
            slots: &svc.slots,
            same_content: &same_content,
            counters: &counters,
            last_error: None,
            hook_failed: None,
        };
        let d = decide(&svc.rollout, &view);
        // Nothing to do and no rollout in progress. (Waiting out a watch
        // counted as work until issue 22: the 10,000-instance update then
        // ran 3,000 passes of 5 virtual minutes, and its rate fell from
        // ~89,000 to ~5,000 replacements/s.)
        let quiet = d.steps.is_empty() && d.next.target().is_none();
        svc.rollout = d.next;
        for step in d.steps {
            match step {
                Step::Start { revision, slot } => {
                    svc.ids += 1;
                    let id = format!("{}-r{revision}-{}", svc.name, svc.ids);
                    start(
                        &self.state,
                        &self.fake,
                        &self.launch,
                        svc,
                        id,
                        revision,
                        slot,
                    );
                    self.started += 1;
                }
                Step::Stop { ids, reason } => {
                    let ids: BTreeSet<String> = ids.into_iter().collect();
                    for s in svc.seen.iter_mut().filter(|s| ids.contains(&s.id)) {
                        s.stopping = true;
                        let ev = NewEvent::service(
                            Change::InstanceStopping {
                                reason: reason.to_string(),
                            },
                            &svc.name,
                            Some(s.revision),
                        );
                        ready(self.state.append_event(&ev)).expect("recorded");
                    }
                }
                Step::Activate => activate(&self.state, &svc.name, target, &releases),
                Step::Record(change) => {
                    let ev = NewEvent::service(change, &svc.name, Some(target));
                    ready(self.state.append_event(&ev)).expect("recorded");
                }
                Step::Fail { .. } => panic!("no rollout fails here"),
                Step::SlotStable { .. } | Step::Route | Step::Adopt { .. } => {}
            }
        }
        quiet
    }

    /// Passes until nothing is left to do; how many.
    fn converge(&mut self) -> u32 {
        let mut passes = 0;
        loop {
            passes += 1;
            self.now += Duration::from_millis(100);
            if self.pass() {
                return passes;
            }
            assert!(passes < 100_000, "never converged");
        }
    }

    fn instances(&self) -> usize {
        self.services.iter().map(|s| s.seen.len()).sum()
    }
}

/// The service as a pass reads it: its record, current releases, its
/// target's outcome and the release before it (`None`: no target yet).
fn current(
    state: &MemoryState,
    name: &ServiceName,
) -> Option<(ServiceRecord, Vec<Release>, Outcome, Option<u64>)> {
    let rec = ready(state.service(name)).expect("read").expect("recorded");
    let releases = ready(state.current_releases(name)).expect("read");
    let target = rec.target;
    let outcome = releases
        .iter()
        .find(|r| r.revision == target)
        .map(|r| r.outcome)?;
    let previous = releases
        .iter()
        .filter(|r| r.revision != target && r.outcome == Outcome::Active)
        .map(|r| r.revision)
        .max();
    Some((rec, releases, outcome, previous))
}

/// Start instance `id` on the fake runtime, with its records.
fn start(
    state: &MemoryState,
    fake: &Fake,
    launch: &Launch,
    svc: &mut Svc,
    id: String,
    revision: u64,
    slot: u32,
) {
    let running = fake.spawn(&id, launch).expect("spawned");
    let ev = NewEvent::service(
        Change::InstanceStarted {
            pid: running.pid(),
            port: 0,
            slot,
        },
        &svc.name,
        Some(revision),
    );
    let rec = InstanceRecord {
        id: id.clone(),
        service: svc.name.clone(),
        revision,
        slot,
        pid: running.pid(),
        start_ticks: 0,
        port: 0,
    };
    state.put_instance(&rec).expect("recorded");
    ready(state.append_event(&ev)).expect("recorded");
    svc.running.insert(id.clone(), running);
    svc.seen.push(Seen {
        id,
        revision,
        slot,
        stopping: false,
        ready_since: None,
        live: true,
        adopted: false,
        stale: false,
        drained: false,
    });
}

/// What the instance tasks would have reported since the last pass:
/// stopped ones exited (recorded, and returned), started ones are ready.
fn reports(state: &MemoryState, svc: &mut Svc, now: Instant) -> Vec<Seen<String>> {
    let mut exited = Vec::new();
    let mut k = 0;
    while k < svc.seen.len() {
        if svc.seen[k].stopping {
            let gone = svc.seen.swap_remove(k);
            if let Some(mut r) = svc.running.remove(&gone.id) {
                r.kill();
            }
            let ev = NewEvent::service(
                Change::InstanceExited {
                    status: "exit status: 0".to_owned(),
                    requested: true,
                },
                &svc.name,
                Some(gone.revision),
            );
            state.remove_instance(&gone.id).expect("recorded");
            ready(state.append_event(&ev)).expect("recorded");
            exited.push(gone);
        } else {
            if svc.seen[k].ready_since.is_none() {
                svc.seen[k].ready_since = Some(now);
            }
            k += 1;
        }
    }
    exited
}

/// A digest of what the worker sees (as the controller's
/// `observations_digest`: each instance as published, then the reports).
fn observations_digest(svc: &Svc, clock: &Clock) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = foldhash::fast::FixedState::with_seed(0).build_hasher();
    for s in &svc.seen {
        let ready_ms = s.ready_since.map(|t| clock.to_wall(t));
        (
            s.id.as_str(),
            s.revision,
            s.slot,
            s.stopping,
            ready_ms,
            s.live,
        )
            .hash(&mut h);
    }
    svc.gone.hash(&mut h);
    h.finish()
}

/// A digest of a value, to tell whether it changed without keeping it.
fn digest(v: &impl std::hash::Hash) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(0).hash_one(v)
}

/// An instance as the worker publishes it.
fn observation(s: &Seen<String>, clock: &Clock, gone: Option<bool>) -> Observation {
    Observation {
        id: s.id.clone(),
        revision: s.revision,
        slot: s.slot,
        stopping: s.stopping,
        ready_since_ms: s.ready_since.map(|t| clock.to_wall(t)),
        live: s.live,
        adopted: s.adopted,
        stale: s.stale,
        gone,
        refused: false,
        port: 0,
    }
}

/// `Step::Activate`: the target active, the releases before it superseded.
fn activate(state: &MemoryState, name: &ServiceName, target: u64, releases: &[Release]) {
    let ev = NewEvent::service(Change::ReleaseActive {}, name, Some(target));
    ready(state.set_outcome(name, target, Outcome::Active, None, &ev, Guard::NONE))
        .expect("recorded");
    for r in releases {
        if r.revision != target && r.outcome == Outcome::Active {
            let ev = NewEvent::service(
                Change::ReleaseSuperseded { by: target },
                name,
                Some(r.revision),
            );
            ready(state.set_outcome(
                name,
                r.revision,
                Outcome::Superseded,
                None,
                &ev,
                Guard::NONE,
            ))
            .expect("recorded");
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let surge: u32 = std::env::var("SURGE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut paths = serde_json::Map::new();
    for (path, split) in [("direct", false), ("split", true)] {
        paths.insert(path.to_owned(), measure(surge, split));
    }
    let out = serde_json::json!({ "max_surge": surge, "paths": paths });
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
}

/// The pass times and the rolling update's rate, one way.
fn measure(surge: u32, split: bool) -> serde_json::Value {
    let mut sizes = Vec::new();
    for (services, replicas) in [(1, 100), (10, 100), (100, 100)] {
        let mut node = Node::new(services, replicas, surge, split);
        assert_eq!(node.instances(), (services * replicas) as usize);
        let times: Vec<Duration> = (0..21)
            .map(|_| {
                let t = Instant::now();
                assert!(node.pass(), "a steady fleet has nothing to do");
                t.elapsed()
            })
            .collect();
        let m = median(times);
        sizes.push(serde_json::json!({
            "instances": services * replicas,
            "pass_ms": m.as_secs_f64() * 1e3,
            "us_per_instance": m.as_secs_f64() * 1e6 / f64::from(services * replicas),
        }));
    }
    // A rolling update of all 10,000 to release 2.
    let mut node = Node::new(100, 100, surge, split);
    let before = node.started;
    for i in 0..node.services.len() {
        let name = node.services[i].name.clone();
        node.release(&name, 2, settings(100, surge));
    }
    let t = Instant::now();
    let passes = node.converge();
    let took = t.elapsed();
    let replaced = node.started - before;
    assert_eq!(replaced, 10_000);
    assert!(
        node.services
            .iter()
            .all(|s| s.seen.iter().all(|i| i.revision == 2))
    );
    serde_json::json!({
        "pass": sizes,
        "rolling_update": {
            "replacements": replaced,
            "passes": passes,
            "seconds": took.as_secs_f64(),
            "replacements_per_second": replaced as f64 / took.as_secs_f64(),
        },
    })
}
