//! One pass of a service's controller, decided: [`decide`] takes the
//! rollout's state (a closed enum, [`Rollout`]) and what the controller
//! observed ([`View`]: the instances, their slots' failures, the release's
//! outcome, the request counters, the time) and returns the state after
//! the pass with the [`Step`]s that take the fleet there. The controller
//! carries the steps out in order and decides nothing itself; `kiln
//! promote` and `kiln abort` are decided here too ([`Rollout::promote`],
//! [`abort`]).
//!
//! The strategies:
//! - `rolling` and `recreate`: [`fleet_step`] replaces the fleet within
//!   `max_surge` / `max_unavailable`; the rollout fails at its deadline, or
//!   when its instances crash-loop while a previous release can take over.
//! - `blue-green`: the whole new fleet starts beside the old one, which
//!   keeps the traffic until the switch (at once with `auto_promote`, else
//!   on `kiln promote`); the old fleet then stays warm for
//!   `scale_down_delay`, so that a rollback adopts it.
//! - `canary`: stable keeps its whole fleet; the canary's fleet follows
//!   the current step's weight; once it is ready the weight takes effect
//!   and the step's analysis window opens; the step passes when its pause
//!   is over (or on `kiln promote`) and the analysis has enough requests; a
//!   failed analysis aborts at once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use crate::counters::Snapshot;
use crate::event::{Actor, Change};
use crate::health::{Backoff, SlotHistory};
use crate::release::{Outcome, ServiceSettings};
use crate::rollout::canary::{Judgement, fleet, judge};
use crate::rollout::fleet::{Fleet, OldInstance, fleet_step};
use crate::service::{Pause, Strategy};
use crate::spec::ServiceName;

/// How often a canary step is judged while its numbers come in.
pub const CANARY_TICK: Duration = Duration::from_millis(50);

/// Consecutive failures of a slot that make a rollout a crash loop.
pub const CRASH_LOOP_FAILURES: u32 = 3;

/// The rollout of a service, between two passes. Each variant carries what
/// its phase needs and nothing else: a paused rollout has no deadline, a
/// canary's analysis window exists only once its weight took effect.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Rollout {
    /// No rollout in progress: the fleet is kept whole on its target (or,
    /// for a failed first release, emptied).
    #[default]
    Idle,
    /// `rolling` or `recreate` (or a canary with nothing to compare to:
    /// a first release, or a warm rollback) towards `target`.
    Rolling {
        target: u64,
        deadline: Instant,
    },
    /// `blue-green` before its switch: `routed` keeps the traffic while the
    /// target's fleet comes up; `promote` once `kiln promote` asked.
    BlueGreen {
        target: u64,
        deadline: Instant,
        routed: u64,
        promote: bool,
    },
    /// `blue-green` after its switch: the target has the traffic and is
    /// active; the fleet before it stays warm until `until`. `watch`: the
    /// target is watched meanwhile too.
    Warm {
        target: u64,
        until: Instant,
        watch: Option<Watch>,
    },
    /// The target went live and is watched (`rollout.watch`): if it
    /// crash-loops before the watch ends, the service returns to the
    /// release before.
    Watching {
        target: u64,
        watch: Watch,
    },
    Canary(CanaryRun),
    /// Failed with `auto_rollback = false`: old and new stay as they are,
    /// nothing new starts, until another release or `kiln abort`.
    /// `routed`: a blue-green rollout's traffic stays there.
    Paused {
        target: u64,
        routed: Option<u64>,
    },
}

/// The watch on a release that went live: until `until`, a crash loop
/// returns the service to `back_to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watch {
    pub back_to: u64,
    pub until: Instant,
}

/// A canary rollout in progress.
#[derive(Clone, Debug, PartialEq)]
pub struct CanaryRun {
    pub target: u64,
    /// The release it is compared with and returns to.
    pub stable: u64,
    /// Index of the current step in `rollout.steps`.
    pub step: usize,
    /// The canary's share now: the previous step's while this step's
    /// fleet starts, 0 before the first.
    pub weight: u32,
    pub phase: CanaryPhase,
    /// `kiln promote` asked to pass this step.
    pub promote: bool,
    /// What the step waits for, for `status` (empty: nothing).
    pub waiting: String,
}

/// Where a canary step is.
#[derive(Clone, Debug, PartialEq)]
pub enum CanaryPhase {
    /// The step's fleet comes up; it must be ready by `deadline`.
    Starting { deadline: Instant },
    /// The step's weight took effect at `began`, when both releases'
    /// counters were these: its analysis window starts there. (Boxed:
    /// the counters are most of a state's size.)
    Judging {
        began: Instant,
        canary: Box<Snapshot>,
        stable: Box<Snapshot>,
    },
}

impl Rollout {
    /// The release being rolled out, if any.
    pub fn target(&self) -> Option<u64> {
        match self {
            Self::Idle | Self::Warm { .. } | Self::Watching { .. } => None,
            Self::Rolling { target, .. }
            | Self::BlueGreen { target, .. }
            | Self::Paused { target, .. } => Some(*target),
            Self::Canary(run) => Some(run.target),
        }
    }

    /// Paused by a failure with `auto_rollback = false`
    /// (`ServiceStatus::stalled`).
    pub fn stalled(&self) -> bool {
        matches!(self, Self::Paused { .. })
    }

    /// A blue-green fleet kept warm after its switch at `now`.
    pub fn warm(&self, now: Instant) -> bool {
        matches!(self, Self::Warm { until, .. } if *until > now)
    }

    /// The release a watch keeps warm beside `target` at `now` (the one it
    /// returns to): any strategy but blue-green, whose own warm window
    /// (`scale_down_delay`) says how long its old fleet stays.
    pub fn watch_keeps_warm(&self, target: u64, now: Instant, strategy: Strategy) -> Option<u64> {
        if strategy == Strategy::BlueGreen {
            return None;
        }
        self.watched(now)
            .filter(|(t, _)| *t == target)
            .map(|(_, w)| w.back_to)
    }

    /// Another release's fleet is expected beside `target` at `now`: a
    /// blue-green fleet in its warm window, or the one a watch keeps warm.
    pub fn warm_beside(&self, target: u64, now: Instant, strategy: Strategy) -> bool {
        matches!(self, Self::Warm { target: t, .. } if *t == target) && self.warm(now)
            || self.watch_keeps_warm(target, now, strategy).is_some()
    }

    /// The release watched after it went live, and its watch, at `now`.
    pub fn watched(&self, now: Instant) -> Option<(u64, Watch)> {
        match self {
            Self::Warm {
                target,
                watch: Some(w),
                ..
            }
            | Self::Watching { target, watch: w }
                if w.until > now =>
            {
                Some((*target, *w))
            }
            _ => None,
        }
    }

    /// `kiln promote`: a blue-green rollout waiting for its switch, or a
    /// canary's current step. Returns the canary step (1-based) it passes.
    pub fn promote(&mut self, target: u64, pending: bool) -> Result<Option<u32>, NotWaiting> {
        match self {
            Self::Canary(run) if pending && run.target == target => {
                run.promote = true;
                Ok(Some(run.step as u32 + 1))
            }
            Self::BlueGreen {
                target: t, promote, ..
            } if pending && *t == target => {
                *promote = true;
                Ok(None)
            }
            _ => Err(NotWaiting),
        }
    }
}

/// `kiln promote` with no rollout waiting for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no rollout is waiting for promotion")]
pub struct NotWaiting;

/// Why `kiln abort` was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AbortRefused {
    #[error("no rollout is in progress")]
    NothingToAbort,
    #[error("the target is the service's first release")]
    FirstRelease,
}

/// An instance as the controller sees it, until it has exited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen<Id> {
    pub id: Id,
    pub revision: u64,
    pub slot: u32,
    /// Asked to stop (draining or ending): it no longer counts.
    pub stopping: bool,
    /// Passing its readiness probe since then.
    pub ready_since: Option<Instant>,
    /// Passing its liveness probe (or it has none).
    pub live: bool,
    /// Taken over from a release with the same content (warm rollback).
    pub adopted: bool,
    /// What it runs drifted from its release (its image's tree was found
    /// changed after it started, or its live command line or environment
    /// differs): it is replaced.
    pub stale: bool,
    /// Its node is drained (`kiln drain`): it is replaced by one on
    /// another node, as a stale one is.
    pub drained: bool,
}

/// What one pass observed of one service.
#[derive(Clone, Debug)]
pub struct View<'a, Id> {
    pub service: &'a ServiceName,
    pub now: Instant,
    /// The release the service is driven to, and its outcome.
    pub target: u64,
    pub outcome: Outcome,
    /// The newest other active release: what a failed rollout returns to.
    pub previous: Option<u64>,
    pub settings: &'a ServiceSettings,
    pub backoff: Backoff,
    pub instances: &'a [Seen<Id>],
    /// Per (release, slot).
    pub slots: &'a BTreeMap<(u64, u32), SlotHistory>,
    /// Releases whose content is the target's (their warm instances may
    /// be adopted).
    pub same_content: &'a BTreeSet<u64>,
    /// The router's counters of the releases a canary compares (absent:
    /// zero).
    pub counters: &'a BTreeMap<u64, Snapshot>,
    /// The last failure the controller saw (named when a crash loop fails
    /// the rollout).
    pub last_error: Option<&'a str>,
    /// The target's `post_deploy` hook failed, and how: it fails inside
    /// its watch as a crash loop does.
    pub hook_failed: Option<&'a str>,
}

/// Why an instance is stopped (recorded in its `instance-stopping` event;
/// kept in an assignment the leader marks to stop).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    /// The agent is shutting down (the controller's own order, not a
    /// rollout decision).
    Shutdown,
    ScaledDown,
    Replaced,
    Recreate,
    ReleaseFailed,
    NotInCanary,
    CanaryAborted,
    ReplacedByCanary,
    LivenessFailed,
    /// The service was removed (`kiln remove`, `apply --prune`).
    Removed,
    /// What it runs drifted from its release (its tree or its command
    /// line and environment): a fresh instance took its place.
    Drifted,
    /// Its node is drained: a fresh instance on another node took its
    /// place.
    Drained,
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Shutdown => "agent shutting down",
            Self::ScaledDown => "scaled down",
            Self::Replaced => "replaced by the new release",
            Self::Recreate => "recreate: replaced by the new release",
            Self::ReleaseFailed => "release failed",
            Self::NotInCanary => "not part of the canary rollout",
            Self::CanaryAborted => "canary aborted",
            Self::ReplacedByCanary => "replaced by the canary release",
            Self::LivenessFailed => "liveness failed",
            Self::Removed => "service removed",
            Self::Drifted => "drifted from its release: replaced",
            Self::Drained => "its node is drained: replaced on another",
        })
    }
}

/// One thing to do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Step<Id> {
    /// A warm instance of release `from` with the target's content becomes
    /// the target's, in `slot`.
    Adopt { id: Id, from: u64, slot: u32 },
    /// The slot's instance stayed ready for `stable_after`: forget its
    /// failures.
    SlotStable { revision: u64, slot: u32 },
    /// Start an instance of `revision` in `slot`.
    Start { revision: u64, slot: u32 },
    /// Stop these instances: they leave the routing table in one swap,
    /// then each drains and gets its stop signal.
    Stop { ids: Vec<Id>, reason: StopReason },
    /// Publish the routing table now (a switch that stops nothing).
    Route,
    /// Record an event of the target release.
    Record(Change),
    /// The target is whole: it is active, the releases before it
    /// superseded.
    Activate,
    /// The target failed: record it, and the service returns to `to` (if
    /// any), in one transaction. `timed`: the record says how long the
    /// route swap before it took (a canary's abort).
    Fail {
        reason: String,
        to: Option<u64>,
        automatic: bool,
        by: Actor,
        timed: bool,
    },
}

/// Which ready instances get the service's traffic. In a cluster the
/// leader keeps it beside the assignments, so that every node's router
/// sends where the leader's does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    /// Every ready instance, of any release (a rolling update: both serve).
    Any,
    /// Only the release's.
    Release(u64),
    /// `weight` percent to the canary's, the rest to stable's.
    Split {
        stable: u64,
        canary: u64,
        weight: u32,
    },
}

/// The service's status message after the pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Keep,
    Clear,
    Set(String),
}

/// What a pass decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision<Id> {
    pub next: Rollout,
    pub steps: Vec<Step<Id>>,
    pub routing: Routing,
    pub message: Message,
}

/// One pass: from `state` and what was observed, the state after it and
/// the steps to get there.
pub fn decide<Id: Clone>(state: &Rollout, v: &View<'_, Id>) -> Decision<Id> {
    let mut p = Pass::new(state, v);
    // An instance that failed liveness is replaced, never restarted in
    // place: it stops, and its slot fills again below.
    let dead = p.running(|i| !i.live);
    p.stop(&dead, StopReason::LivenessFailed);
    p.replace_stale();
    p.forget_stable_slots();
    if v.outcome == Outcome::Pending {
        p.adopt_warm();
    }
    p.shape();
    if p.watch_failed() {
        return p.finish();
    }
    if let Rollout::Canary(_) = p.next {
        p.canary();
    } else {
        p.fleet();
    }
    p.say_unwatched_hook_failure();
    p.finish()
}

/// `kiln abort`: fail the rollout in progress and return to the release
/// before it, as `by` asked.
pub fn abort<Id: Clone>(
    state: &Rollout,
    v: &View<'_, Id>,
    by: Actor,
) -> Result<Decision<Id>, AbortRefused> {
    if v.outcome != Outcome::Pending {
        return Err(AbortRefused::NothingToAbort);
    }
    let previous = v.previous.ok_or(AbortRefused::FirstRelease)?;
    let mut p = Pass::new(state, v);
    let reason = "aborted by hand (kiln abort)".to_owned();
    match &p.next {
        Rollout::Canary(run) if run.target == v.target => p.abort_canary(reason, by),
        _ => {
            // As an automatic rollback: the previous release takes over
            // as its fleet allows.
            p.fail(reason, Some(previous), false, by, false);
        }
    }
    Ok(p.finish())
}

/// When the next pass is due without news: a slot's back-off ends, a
/// deadline or the warm window passes, an instance has been ready for
/// `min_ready` or `stable_after`, or a canary is judged again.
pub fn due<Id>(state: &Rollout, v: &View<'_, Id>) -> Option<Instant> {
    let now = v.now;
    let mut due: Option<Instant> = None;
    let mut at = |t: Instant| due = Some(due.map_or(t, |d| d.min(t)));
    for s in v.slots.values() {
        if let Some(t) = s.retry_at {
            at(t);
        }
    }
    match state {
        Rollout::Rolling { deadline, .. } | Rollout::BlueGreen { deadline, .. } => at(*deadline),
        Rollout::Canary(run) => {
            if let CanaryPhase::Starting { deadline } = run.phase {
                at(deadline);
            }
            // The analysis judges the step as its numbers come in.
            at(now + CANARY_TICK);
        }
        Rollout::Warm { until, .. } if *until > now => at(*until),
        _ => {}
    }
    if let Some((_, w)) = state.watched(now) {
        // Its end changes what status shows.
        at(w.until);
    }
    let min_ready = v.settings.rollout.min_ready.0;
    for i in v.instances {
        if let Some(t) = i.ready_since {
            for wait in [v.backoff.stable_after, min_ready] {
                if now.saturating_duration_since(t) < wait {
                    at(t + wait);
                }
            }
        }
    }
    due.map(|d| d.max(now))
}

/// One instance during a pass: what was seen, and what the pass did to it
/// so far (adopted into the target, asked to stop).
#[derive(Clone, Copy)]
struct Inst {
    revision: u64,
    slot: u32,
    stopping: bool,
    ready_since: Option<Instant>,
    live: bool,
    adopted: bool,
    /// Drifted, or on a drained node: replaced.
    stale: bool,
    drained: bool,
}

struct Pass<'v, 'a, Id> {
    v: &'v View<'a, Id>,
    insts: Vec<Inst>,
    next: Rollout,
    steps: Vec<Step<Id>>,
    message: Message,
    /// The release a `Fail` step returned the service to.
    returned_to: Option<u64>,
}

impl<'v, 'a, Id: Clone> Pass<'v, 'a, Id> {
    fn new(state: &Rollout, v: &'v View<'a, Id>) -> Self {
        Self {
            v,
            insts: v
                .instances
                .iter()
                .map(|i| Inst {
                    revision: i.revision,
                    slot: i.slot,
                    stopping: i.stopping,
                    ready_since: i.ready_since,
                    live: i.live,
                    adopted: i.adopted,
                    stale: i.stale || i.drained,
                    drained: i.drained,
                })
                .collect(),
            next: state.clone(),
            steps: Vec::new(),
            message: Message::Keep,
            returned_to: None,
        }
    }

    fn finish(self) -> Decision<Id> {
        let v = self.v;
        // After a failure the service is on the release it returned to.
        let on = self.returned_to.unwrap_or(v.target);
        let routing = match &self.next {
            Rollout::Canary(run) if run.weight > 0 => Routing::Split {
                stable: run.stable,
                canary: run.target,
                weight: run.weight,
            },
            Rollout::Canary(run) => Routing::Release(run.stable),
            Rollout::BlueGreen { routed, .. }
            | Rollout::Paused {
                routed: Some(routed),
                ..
            } => Routing::Release(*routed),
            // A watched release serves alone: the one before it is warm.
            Rollout::Warm { target, .. } | Rollout::Watching { target, .. } => {
                Routing::Release(*target)
            }
            _ if v.settings.rollout.strategy == Strategy::BlueGreen => Routing::Release(on),
            // A return to a release with a ready fleet (warm through the
            // watch) is one swap.
            _ if self.returned_to.is_some_and(|r| {
                self.insts
                    .iter()
                    .any(|i| i.revision == r && !i.stopping && i.ready_since.is_some())
            }) =>
            {
                Routing::Release(on)
            }
            _ => Routing::Any,
        };
        Decision {
            next: self.next,
            steps: self.steps,
            routing,
            message: self.message,
        }
    }

    fn rollout(&self) -> &'a crate::service::RolloutSpec {
        &self.v.settings.rollout
    }

    fn deadline(&self) -> Instant {
        self.v.now + self.rollout().progress_deadline.0
    }

    /// Indexes of the instances `pick` selects, of those not stopping.
    fn running(&self, pick: impl Fn(&Inst) -> bool) -> Vec<usize> {
        (0..self.insts.len())
            .filter(|&i| !self.insts[i].stopping && pick(&self.insts[i]))
            .collect()
    }

    fn stop(&mut self, which: &[usize], reason: StopReason) -> bool {
        if which.is_empty() {
            return false;
        }
        for &i in which {
            self.insts[i].stopping = true;
        }
        let ids = which
            .iter()
            .map(|&i| self.v.instances[i].id.clone())
            .collect();
        self.steps.push(Step::Stop { ids, reason });
        true
    }

    /// Ready for at least `min_ready`.
    fn settled(&self, i: &Inst) -> bool {
        !i.stopping
            && i.ready_since.is_some_and(|t| {
                self.v.now.saturating_duration_since(t) >= self.rollout().min_ready.0
            })
    }

    fn settled_of(&self, revision: u64) -> u32 {
        self.insts
            .iter()
            .filter(|i| i.revision == revision && self.settled(i))
            .count() as u32
    }

    /// Slots `0..count` with no running instance of `revision` (a drifted
    /// one still stopping holds its slot: it runs until it exits, and its
    /// replacement must not take the fleet past its surge).
    fn free_slots(&self, revision: u64, count: u32) -> Vec<u32> {
        let mut taken = vec![false; count as usize];
        for i in &self.insts {
            if i.revision == revision && (!i.stopping || i.stale) && i.slot < count {
                taken[i.slot as usize] = true;
            }
        }
        (0..count).filter(|s| !taken[*s as usize]).collect()
    }

    /// Start instances of `revision` in `slots`, but not in those still in
    /// their crash-loop back-off.
    fn start(&mut self, revision: u64, slots: impl IntoIterator<Item = u32>) {
        for slot in slots {
            if self
                .v
                .slots
                .get(&(revision, slot))
                .is_some_and(|s| s.backing_off(self.v.now))
            {
                continue;
            }
            self.steps.push(Step::Start { revision, slot });
        }
    }

    /// Exactly `count` instances of `revision`, in slots `0..count`.
    fn keep_fleet(&mut self, revision: u64, count: u32) {
        let extras = self.running(|i| i.revision == revision && i.slot >= count);
        self.stop(&extras, StopReason::ScaledDown);
        let free = self.free_slots(revision, count);
        self.start(revision, free);
    }

    fn crash_looping(&self, revision: u64) -> bool {
        self.v
            .slots
            .iter()
            .any(|((rev, _), s)| *rev == revision && s.failures >= CRASH_LOOP_FAILURES)
    }

    fn last_error(&self) -> &str {
        self.v.last_error.unwrap_or_default()
    }

    /// Instances that drifted from their release (or run on a drained
    /// node) are replaced as a rolling update of that release, while no rollout moves the fleet (a rollout
    /// replaces them anyway): a fresh instance starts in a stale one's slot
    /// within `max_surge` (stopping instances count: they still run), and
    /// the stale one stops once its replacement has been ready for
    /// `min_ready`. Without surge room, a stale instance stops first while
    /// `max_unavailable` allows, and its slot fills once it has exited. A
    /// stale instance that serves nobody (unready, or not of the target: a
    /// warm fleet) stops at once.
    fn replace_stale(&mut self) {
        let v = self.v;
        let t = v.target;
        let quiet = matches!(
            self.next,
            Rollout::Idle | Rollout::Watching { .. } | Rollout::Warm { .. }
        );
        if !quiet || v.outcome != Outcome::Active {
            return;
        }
        let rollout = self.rollout();
        let replicas = v.settings.replicas;
        let idle = self.running(|i| i.stale && (i.revision != t || i.ready_since.is_none()));
        self.stop_replaced(&idle);
        // Empty slots fill later in this pass: they take room too.
        let alive = self.insts.iter().filter(|i| i.revision == t).count()
            + self.free_slots(t, replicas).len();
        let mut room = (replicas + rollout.max_surge).saturating_sub(alive as u32);
        let min_available = replicas.saturating_sub(rollout.max_unavailable);
        let mut available = self.settled_of(t);
        let mut stops = Vec::new();
        for i in self.running(|i| i.stale && i.revision == t) {
            let slot = self.insts[i].slot;
            let replacement = self
                .insts
                .iter()
                .find(|j| j.revision == t && j.slot == slot && !j.stopping && !j.stale);
            match replacement {
                Some(r) if self.settled(r) => stops.push(i),
                Some(_) => {}
                None if room > 0 && slot < replicas => {
                    room -= 1;
                    self.start(t, [slot]);
                }
                None if rollout.max_surge > 0 => {}
                None => {
                    let counts = self.settled(&self.insts[i]);
                    if !counts || available > min_available {
                        available -= u32::from(counts);
                        stops.push(i);
                    }
                }
            }
        }
        self.stop_replaced(&stops);
    }

    /// Stop replaced instances, each for its reason: its node drained, or
    /// it drifted.
    fn stop_replaced(&mut self, which: &[usize]) {
        let (drained, drifted): (Vec<usize>, Vec<usize>) =
            which.iter().partition(|&&i| self.insts[i].drained);
        self.stop(&drifted, StopReason::Drifted);
        self.stop(&drained, StopReason::Drained);
    }

    fn forget_stable_slots(&mut self) {
        let stable_after = self.v.backoff.stable_after;
        for i in &self.insts {
            let key = (i.revision, i.slot);
            // One that failed its liveness probe is no proof of a stable
            // slot, however long it was ready: its failure was just
            // counted.
            if i.live
                && i.ready_since
                    .is_some_and(|t| self.v.now.saturating_duration_since(t) >= stable_after)
                && self.v.slots.get(&key).is_some_and(|s| s.failures > 0)
            {
                self.steps.push(Step::SlotStable {
                    revision: key.0,
                    slot: key.1,
                });
            }
        }
    }

    /// A pending release with the same content as warm, ready instances of
    /// another release takes them over instead of starting new ones: this
    /// is what makes a rollback inside the warm window a route swap.
    fn adopt_warm(&mut self) {
        let (target, replicas) = (self.v.target, self.v.settings.replicas);
        if replicas == 0
            || self
                .insts
                .iter()
                .any(|i| i.revision == target && !i.stopping)
        {
            return;
        }
        let candidates: Vec<usize> = self
            .running(|i| {
                i.revision != target
                    && i.ready_since.is_some()
                    && !i.stale
                    && self.v.same_content.contains(&i.revision)
            })
            .into_iter()
            .take(replicas as usize)
            .collect();
        if candidates.len() < replicas as usize {
            return;
        }
        for (slot, i) in candidates.into_iter().enumerate() {
            let inst = &mut self.insts[i];
            let from = inst.revision;
            (inst.revision, inst.slot, inst.adopted) = (target, slot as u32, true);
            self.steps.push(Step::Adopt {
                id: self.v.instances[i].id.clone(),
                from,
                slot: slot as u32,
            });
        }
    }

    /// The blue-green release that keeps the traffic before the switch:
    /// the one routed so far while it has instances, else the newest other
    /// release with a ready one, else the target.
    fn routed(&self, before: Option<u64>) -> u64 {
        let target = self.v.target;
        before
            .filter(|r| self.insts.iter().any(|i| i.revision == *r && !i.stopping))
            .or_else(|| {
                self.insts
                    .iter()
                    .filter(|i| i.revision != target && !i.stopping && i.ready_since.is_some())
                    .map(|i| i.revision)
                    .max()
            })
            .unwrap_or(target)
    }

    /// The state's shape follows the target and the strategy: a new
    /// pending target begins a rollout of its strategy's kind.
    fn shape(&mut self) {
        let v = self.v;
        let t = v.target;
        let strategy = v.settings.rollout.strategy;
        if v.outcome != Outcome::Pending {
            let keep = match &self.next {
                Rollout::Warm { target, .. } => *target == t,
                Rollout::Watching { target, watch } => *target == t && watch.until > v.now,
                _ => false,
            };
            if !keep {
                self.next = Rollout::Idle;
            }
            return;
        }
        // A new rollout during a watch: the fleet kept warm for a return
        // serves nobody now (a rollback to it adopted what it needed).
        if let Some((watched, w)) = self.next.watched(v.now)
            && watched != t
            && w.back_to != t
        {
            let warm = self.running(|i| i.revision == w.back_to);
            self.stop(&warm, StopReason::Replaced);
        }
        let adopted = self.insts.iter().any(|i| i.revision == t && i.adopted);
        // A canary needs a stable release to compare with and return to; a
        // first release, or one that took over warm instances, goes whole.
        let stable = match &self.next {
            Rollout::Canary(run) if run.target == t => Some(run.stable),
            _ => v.previous,
        }
        .filter(|_| strategy == Strategy::Canary && !adopted);
        self.next = match std::mem::take(&mut self.next) {
            paused @ Rollout::Paused { target, .. } if target == t => paused,
            Rollout::Canary(run) if run.target == t && stable.is_some() => Rollout::Canary(run),
            Rollout::BlueGreen {
                target,
                deadline,
                routed,
                promote,
            } if target == t && strategy == Strategy::BlueGreen => Rollout::BlueGreen {
                target,
                deadline,
                routed: self.routed(Some(routed)),
                promote,
            },
            Rollout::Rolling { target, deadline }
                if target == t && stable.is_none() && !matches!(strategy, Strategy::BlueGreen) =>
            {
                Rollout::Rolling { target, deadline }
            }
            before => match stable {
                Some(stable) => {
                    self.steps.push(Step::Record(Change::CanaryStarted {
                        stable,
                        steps: v.settings.rollout.steps.clone(),
                    }));
                    Rollout::Canary(CanaryRun {
                        target: t,
                        stable,
                        step: 0,
                        weight: 0,
                        phase: CanaryPhase::Starting {
                            deadline: self.deadline(),
                        },
                        promote: false,
                        waiting: String::new(),
                    })
                }
                None if strategy == Strategy::BlueGreen => {
                    let before = match before {
                        Rollout::Warm { target, .. } => Some(target),
                        _ => None,
                    };
                    Rollout::BlueGreen {
                        target: t,
                        deadline: self.deadline(),
                        routed: self.routed(before),
                        promote: false,
                    }
                }
                None => Rollout::Rolling {
                    target: t,
                    deadline: self.deadline(),
                },
            },
        };
    }

    /// Every strategy but a canary with a stable release.
    fn fleet(&mut self) {
        let v = self.v;
        let (t, replicas) = (v.target, v.settings.replicas);
        let rollout = self.rollout();
        let pending = v.outcome == Outcome::Pending;
        let blue_green = rollout.strategy == Strategy::BlueGreen;

        // Extra instances of the target (scaled down).
        let extras = self.running(|i| i.revision == t && i.slot >= replicas);
        self.stop(&extras, StopReason::ScaledDown);

        // The release a live watch returns to is kept warm beside the
        // target (see `keep_warm`): it is no old fleet to replace.
        let warm = self.kept_warm(t);
        let replaced = |i: &Inst| i.revision != t && Some(i.revision) != warm;
        let old: Vec<OldInstance<usize>> = self
            .running(replaced)
            .into_iter()
            .map(|i| OldInstance {
                id: i,
                ready: self.settled(&self.insts[i]),
            })
            .collect();
        let (new_running, new_ready) = self
            .insts
            .iter()
            .filter(|i| i.revision == t && !i.stopping)
            .fold((0, 0), |(n, r), i| (n + 1, r + u32::from(self.settled(i))));
        let free = self.free_slots(t, replicas);
        let paused = self.next.stalled();
        let step = fleet_step(&Fleet {
            strategy: rollout.strategy,
            replicas,
            max_surge: rollout.max_surge,
            max_unavailable: rollout.max_unavailable,
            free_slots: free.len() as u32,
            new_running,
            new_ready,
            old: &old,
            any_old_left: self.insts.iter().any(replaced),
            draining: self
                .insts
                .iter()
                .filter(|i| i.stopping && replaced(i))
                .count() as u32,
            may_start: v.outcome != Outcome::Failed && !paused,
        });
        self.start(t, free.into_iter().take(step.start as usize));
        let why = if rollout.strategy == Strategy::Recreate {
            StopReason::Recreate
        } else {
            StopReason::Replaced
        };
        // Paused: old and new stay as they are. (Nothing starts in a
        // stopped one's place, and an old instance that is unready for a
        // moment — probed again after an agent restart — is no instance to
        // replace.)
        if !paused {
            self.stop(&step.stop, why);
        }

        let ready = self.settled_of(t);
        let adopted = self.insts.iter().any(|i| i.revision == t && i.adopted);
        if blue_green && ready >= replicas && pending {
            let (routed, promote) = match &self.next {
                Rollout::BlueGreen {
                    routed, promote, ..
                } => (*routed, *promote),
                Rollout::Paused { routed, .. } => (routed.unwrap_or(t), false),
                _ => (t, false),
            };
            if routed != t {
                if !(rollout.auto_promote || promote || adopted) {
                    self.message = Message::Set(format!(
                        "release {t} is ready: waiting for `kiln promote {}`",
                        v.service
                    ));
                    return;
                }
                // The switch: one swap of the routing table to the new fleet.
                self.next = Rollout::Warm {
                    target: t,
                    until: v.now + rollout.scale_down_delay.0,
                    watch: self.watch(v.previous),
                };
                self.steps.push(Step::Route);
                self.steps.push(Step::Record(Change::Promoted {
                    warm_for: rollout.scale_down_delay.to_string(),
                }));
            }
        }
        if ready >= replicas && v.outcome != Outcome::Failed {
            // The target is whole: everything else goes (after the warm
            // period, for blue-green), but the release its watch returns to.
            let warm_window = blue_green && self.next.warm(v.now);
            if !warm_window && let Rollout::Warm { watch, .. } = self.next {
                // The warm window is over; the watch goes on.
                self.next = match watch {
                    Some(watch) if watch.until > v.now => Rollout::Watching { target: t, watch },
                    _ => Rollout::Idle,
                };
            }
            if pending && !matches!(self.next, Rollout::Warm { .. }) {
                self.next = self.watching(v.previous);
            }
            if !warm_window {
                self.keep_warm(t, replicas, StopReason::Replaced);
            }
            if pending {
                self.steps.push(Step::Activate);
            }
            self.message = Message::Clear;
        } else if pending && !paused {
            self.check_progress(ready, replicas);
        } else if v.outcome == Outcome::Failed {
            // No instance of a failed release is left running.
            let failed = self.running(|i| i.revision == t);
            self.stop(&failed, StopReason::ReleaseFailed);
        }
    }

    /// The release kept warm beside target `t` while it is watched
    /// ([`Rollout::watch_keeps_warm`]), unless it has the target's content.
    fn kept_warm(&self, t: u64) -> Option<u64> {
        self.next
            .watch_keeps_warm(t, self.v.now, self.rollout().strategy)
            // The same content would crash the same way: no second fleet.
            .filter(|back_to| !self.v.same_content.contains(back_to))
    }

    /// With the target whole: every other instance stops, but while the
    /// target is watched the release its watch returns to keeps (or gets
    /// back) a whole fleet beside it, ready and unrouted, so that a return
    /// inside the watch is a route swap, not a cold start. The budget: up
    /// to twice `replicas` for `rollout.watch` after each release.
    fn keep_warm(&mut self, t: u64, replicas: u32, why: StopReason) {
        let warm = self.kept_warm(t);
        let old = self.running(|i| i.revision != t && Some(i.revision) != warm);
        self.stop(&old, why);
        if let Some(back_to) = warm {
            self.keep_fleet(back_to, replicas);
        }
    }

    /// A rollout that is not whole by its deadline, or whose instances keep
    /// crashing while a previous release can take over, has failed.
    fn check_progress(&mut self, ready: u32, replicas: u32) {
        let t = self.v.target;
        let (Rollout::Rolling { deadline, .. } | Rollout::BlueGreen { deadline, .. }) = self.next
        else {
            return;
        };
        let previous = self.v.previous;
        let reason = if previous.is_some() && self.crash_looping(t) {
            format!(
                "instances of release {t} keep crashing ({CRASH_LOOP_FAILURES}); last: {}",
                self.last_error()
            )
        } else if self.v.now >= deadline {
            format!(
                "{ready}/{replicas} instances ready after the progress deadline of {}",
                self.rollout().progress_deadline
            )
        } else {
            return;
        };
        if !self.rollout().auto_rollback {
            // Paused: old and new stay as they are, nothing new starts.
            let routed = match self.next {
                Rollout::BlueGreen { routed, .. } => Some(routed),
                _ => None,
            };
            self.next = Rollout::Paused { target: t, routed };
            self.message = Message::Set(format!(
                "rollout of release {t} paused: {reason} (auto_rollback = false; kiln rollback {} to return)",
                self.v.service
            ));
            self.steps
                .push(Step::Record(Change::RolloutPaused { reason }));
            return;
        }
        self.fail(reason, previous, true, Actor::Agent, false);
    }

    /// The watch on the target as it goes live now, returning to
    /// `back_to`: none without a release to return to or with
    /// `rollout.watch = "0s"`.
    fn watch(&self, back_to: Option<u64>) -> Option<Watch> {
        let watch = self.rollout().watch.0;
        back_to.filter(|_| !watch.is_zero()).map(|back_to| Watch {
            back_to,
            until: self.v.now + watch,
        })
    }

    /// The state once the target went live: watched, or idle.
    fn watching(&self, back_to: Option<u64>) -> Rollout {
        match self.watch(back_to) {
            Some(watch) => Rollout::Watching {
                target: self.v.target,
                watch,
            },
            None => Rollout::Idle,
        }
    }

    /// A release that crash-loops inside its watch fails, and the service
    /// returns to the release before it (or, with `auto_rollback = false`,
    /// says so and stays). True when it failed.
    fn watch_failed(&mut self) -> bool {
        let v = self.v;
        let t = v.target;
        let hook = v
            .hook_failed
            .filter(|_| v.outcome == Outcome::Active)
            .map(|why| format!("the post_deploy hook of release {t} failed ({why})"));
        let Some((target, watch)) = self.next.watched(v.now) else {
            return false;
        };
        if target != t || v.outcome != Outcome::Active {
            return false;
        }
        let reason = match hook {
            Some(reason) => reason,
            None if self.crash_looping(t) => {
                let watched = self.rollout().watch;
                let live_for = watched
                    .0
                    .saturating_sub(watch.until.saturating_duration_since(v.now));
                format!(
                    "instances of release {t} keep crashing ({CRASH_LOOP_FAILURES}) {} after it went live, inside rollout.watch ({watched}); last: {}",
                    crate::service::Duration(Duration::from_secs(live_for.as_secs())),
                    self.last_error()
                )
            }
            None => return false,
        };
        if !self.rollout().auto_rollback {
            self.message = Message::Set(format!(
                "{reason} (auto_rollback = false: kiln rollback {} to return)",
                v.service
            ));
            return false;
        }
        self.fail(reason, Some(watch.back_to), true, Actor::Agent, false);
        true
    }

    /// A live release's post_deploy failed with no watch (nothing kept
    /// warm to return to): said in status, not undone.
    fn say_unwatched_hook_failure(&mut self) {
        let v = self.v;
        if let Some(why) = v.hook_failed
            && v.outcome == Outcome::Active
            && self.next.watched(v.now).is_none()
        {
            self.message = Message::Set(format!(
                "the post_deploy hook of release {} failed ({why}); rollout.watch is 0s, so nothing was kept to return to: kiln rollback {} to return",
                v.target, v.service
            ));
        }
    }

    fn fail(&mut self, reason: String, to: Option<u64>, automatic: bool, by: Actor, timed: bool) {
        self.next = Rollout::Idle;
        self.returned_to = to;
        self.steps.push(Step::Fail {
            reason,
            to,
            automatic,
            by,
            timed,
        });
    }

    /// Abort a canary: all traffic back on stable in one swap, the canary
    /// fleet stopped, and the release failed with `reason`.
    fn abort_canary(&mut self, reason: String, by: Actor) {
        let Rollout::Canary(run) = &self.next else {
            return;
        };
        let (t, stable) = (run.target, run.stable);
        // The state has no canary side now: stopping its whole fleet is
        // the swap; draining and signals follow.
        self.next = Rollout::Idle;
        let fleet = self.running(|i| i.revision == t);
        if !self.stop(&fleet, StopReason::CanaryAborted) {
            self.steps.push(Step::Route);
        }
        self.fail(reason, Some(stable), true, by, true);
    }

    /// One pass of a canary rollout (see the module's comment).
    fn canary(&mut self) {
        let v = self.v;
        let rollout = self.rollout();
        let (t, replicas) = (v.target, v.settings.replicas);
        let Rollout::Canary(run) = &self.next else {
            return;
        };
        let stable = run.stable;
        // Anything neither stable nor canary goes (what earlier rollouts left).
        let strays = self.running(|i| i.revision != t && i.revision != stable);
        self.stop(&strays, StopReason::NotInCanary);
        // Stable is healed like any fleet while the canary runs beside it.
        self.keep_fleet(stable, replicas);
        let steps = rollout.steps.len();
        // The steps are settings: an apply may shorten them mid-canary,
        // which puts the canary on the new last step.
        let index = match &mut self.next {
            Rollout::Canary(run) => {
                run.step = run.step.min(steps.saturating_sub(1));
                run.step
            }
            _ => return,
        };
        let Some(step) = rollout.steps.get(index) else {
            return;
        };
        let needed = fleet(replicas, step.weight);
        self.keep_fleet(t, needed);
        let ready = self.settled_of(t);
        let count = |rev: u64| v.counters.get(&rev).copied().unwrap_or_default();
        let (now_canary, now_stable) = (count(t), count(stable));
        let label = format!("step {}/{steps} (weight {}%)", index + 1, step.weight);
        let crash_loop = self.crash_looping(t);
        let Rollout::Canary(run) = &mut self.next else {
            return;
        };
        if let CanaryPhase::Starting { deadline } = run.phase {
            if ready < needed {
                run.waiting = format!("canary fleet: {ready}/{needed} ready");
                // The fleet of a step must come up in time, and not crash-loop.
                if crash_loop || v.now >= deadline {
                    let why = if crash_loop {
                        format!(
                            "canary instances keep crashing at {label}; last: {}",
                            self.last_error()
                        )
                    } else {
                        format!(
                            "{ready}/{needed} canary instances ready at {label} after the progress deadline of {}",
                            rollout.progress_deadline
                        )
                    };
                    self.abort_canary(why, Actor::Agent);
                }
                return;
            }
            // The step's weight takes effect, in one swap.
            run.weight = step.weight;
            run.phase = CanaryPhase::Judging {
                began: v.now,
                canary: Box::new(now_canary),
                stable: Box::new(now_stable),
            };
            self.steps.push(Step::Route);
            self.steps.push(Step::Record(Change::CanaryStep {
                step: index + 1,
                of: steps,
                weight: step.weight,
                pause: step.pause,
            }));
        }
        let Rollout::Canary(run) = &mut self.next else {
            return;
        };
        let CanaryPhase::Judging {
            began,
            canary: ref base_canary,
            stable: ref base_stable,
        } = run.phase
        else {
            return;
        };
        let canary_window = now_canary.since(base_canary).window();
        let stable_window = now_stable.since(base_stable).window();
        let last = index + 1 == steps;
        let judgement = match judge(rollout.analysis.as_ref(), &canary_window, &stable_window) {
            // The last step needs no traffic to end, unless the spec says
            // so: a quiet service would wait for it forever.
            Judgement::TooFew { .. }
                if last
                    && !rollout
                        .analysis
                        .as_ref()
                        .is_some_and(|a| a.last_step_needs_traffic) =>
            {
                Judgement::Pass
            }
            j => j,
        };
        if let Judgement::Fail(why) = judgement {
            return self.abort_canary(
                format!("canary analysis failed at {label}: {why}"),
                Actor::Agent,
            );
        }
        let left = match step.pause {
            Pause::Manual => None,
            Pause::For(d) => Some(d.0.saturating_sub(v.now.saturating_duration_since(began))),
        };
        // Every step has a deadline: too little traffic to judge it, past
        // its pause plus the progress deadline, ends the canary (an
        // analysis that cannot conclude is not a pass).
        if let Judgement::TooFew { have, need } = judgement
            && !run.promote
            && let Some(left) = left
            && left.is_zero()
        {
            let pause = match step.pause {
                Pause::For(d) => d.0,
                Pause::Manual => std::time::Duration::ZERO,
            };
            if v.now.saturating_duration_since(began) >= pause + rollout.progress_deadline.0 {
                return self.abort_canary(
                    format!(
                        "only {have} of the {need} canary requests needed to judge {label} came within its pause and the progress deadline of {}",
                        rollout.progress_deadline
                    ),
                    Actor::Agent,
                );
            }
        }
        run.waiting = if run.promote {
            String::new()
        } else if left.is_none() {
            format!("manual pause: kiln promote {} to go on", v.service)
        } else if left.is_some_and(|l| !l.is_zero()) {
            // Worded to stay the same through the step: `apply` prints
            // each change.
            format!("pause of {}", step.pause)
        } else if let Judgement::TooFew { need, .. } = judgement {
            format!("waiting for {need} canary requests to judge")
        } else if ready < needed {
            format!("canary fleet: {ready}/{needed} ready")
        } else {
            String::new()
        };
        if !run.waiting.is_empty() {
            return;
        }
        let promoted = run.promote;
        if !last {
            run.step += 1;
            run.phase = CanaryPhase::Starting {
                deadline: v.now + rollout.progress_deadline.0,
            };
            run.promote = false;
        }
        self.steps.push(Step::Record(Change::CanaryStepPassed {
            step: index + 1,
            weight: step.weight,
            promoted,
            canary: canary_window,
            stable: stable_window,
        }));
        if !last {
            return;
        }
        // The last step had all traffic: the canary is the release now.
        self.steps.push(Step::Activate);
        self.next = self.watching(Some(stable));
        self.keep_warm(t, replicas, StopReason::ReplacedByCanary);
        self.message = Message::Clear;
    }
}
