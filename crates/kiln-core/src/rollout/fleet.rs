//! [`fleet_step`] is one pass of a service's fleet towards its target
//! release: how many new instances may start (into the target's empty
//! slots) and which old ones may stop, by strategy. It reads no clock and
//! starts nothing; the caller passes in what it observed (an instance is
//! "ready" here once it has stayed ready for `min_ready`).

use crate::service::Strategy;

/// An instance of an earlier release, not already stopping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OldInstance<Id> {
    pub id: Id,
    /// Ready (for `min_ready`): it serves, and counts towards availability.
    pub ready: bool,
}

/// What a pass observed of one service's fleet.
#[derive(Clone, Debug)]
pub struct Fleet<'a, Id> {
    pub strategy: Strategy,
    pub replicas: u32,
    pub max_surge: u32,
    pub max_unavailable: u32,
    /// Empty replica slots of the target release.
    pub free_slots: u32,
    /// Instances of the target, not stopping.
    pub new_running: u32,
    /// Of those, the ready ones.
    pub new_ready: u32,
    /// Instances of earlier releases, not stopping.
    pub old: &'a [OldInstance<Id>],
    /// Whether any instance of an earlier release is left, stopping ones
    /// included (`recreate` starts nothing new until all are gone).
    pub any_old_left: bool,
    /// Instances of earlier releases still stopping (draining their
    /// requests, then exiting): they run, so a rolling update counts them
    /// against its surge. (The target's own replaced instances do not
    /// count: self-healing never waits for a drain.)
    pub draining: u32,
    /// New instances may start (not while the release failed, or while its
    /// rollout is paused).
    pub may_start: bool,
}

/// What to do in this pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetStep<Id> {
    /// How many of the target's empty slots to start instances in.
    pub start: u32,
    /// The old instances to stop, in order (unready ones first: they serve
    /// nobody).
    pub stop: Vec<Id>,
}

/// One pass of the fleet towards its target:
///
/// - `rolling`: at most `replicas + max_surge` instances in all (old ones
///   still draining included: they are processes that run), and old
///   ready instances stop only while `replicas − max_unavailable` ready
///   ones stay (an old unready one can always stop).
/// - `recreate`: every old instance stops; nothing new starts until none
///   is left.
/// - `blue-green`: the whole new fleet starts beside the old one, which
///   this step never stops (the switch and the warm window decide that).
/// - `canary`: as `rolling` for its stable fleet (the canary's own fleet
///   follows its weight elsewhere).
///
/// With no old instance left, every empty slot fills.
pub fn fleet_step<Id: Clone>(f: &Fleet<'_, Id>) -> FleetStep<Id> {
    let blue_green = f.strategy == Strategy::BlueGreen;
    let recreate = f.strategy == Strategy::Recreate;
    let surge = |old: u32| {
        (f.replicas + f.max_surge)
            .saturating_sub(f.new_running + old + f.draining)
            .min(f.free_slots)
    };
    let start = if !f.may_start {
        0
    } else if blue_green || (recreate && !f.any_old_left) {
        f.free_slots
    } else if recreate {
        0
    } else if f.old.is_empty() && f.draining == 0 {
        f.free_slots
    } else {
        surge(f.old.len() as u32)
    };
    let stop = if f.old.is_empty() || blue_green {
        Vec::new()
    } else if recreate {
        f.old.iter().map(|o| o.id.clone()).collect()
    } else {
        let ready_old = f.old.iter().filter(|o| o.ready).count() as u32;
        let min_available = f.replicas.saturating_sub(f.max_unavailable);
        let mut can_stop = (f.new_ready + ready_old).saturating_sub(min_available);
        let mut stop: Vec<Id> = f
            .old
            .iter()
            .filter(|o| !o.ready)
            .map(|o| o.id.clone())
            .collect();
        for o in f.old.iter().filter(|o| o.ready) {
            if can_stop == 0 {
                break;
            }
            can_stop -= 1;
            stop.push(o.id.clone());
        }
        stop
    };
    FleetStep { start, stop }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Strategy;
    use proptest::prelude::{TestCaseError, any, prop, prop_assert, proptest};

    fn old(ready: &[bool]) -> Vec<OldInstance<usize>> {
        ready
            .iter()
            .enumerate()
            .map(|(id, &ready)| OldInstance { id, ready })
            .collect()
    }

    fn fleet(strategy: Strategy, old: &[OldInstance<usize>]) -> Fleet<'_, usize> {
        Fleet {
            strategy,
            replicas: 3,
            max_surge: 1,
            max_unavailable: 0,
            free_slots: 3,
            new_running: 0,
            new_ready: 0,
            old,
            any_old_left: !old.is_empty(),
            draining: 0,
            may_start: true,
        }
    }

    /// Issue 13: with `replicas = 3, max_surge = 1` and slow requests in
    /// flight, six instances ran ("2/3 ready, 1 starting, 3 old"): the old
    /// ones still draining were not counted.
    #[test]
    fn old_instances_still_draining_count_against_the_surge() {
        let o = old(&[true, true]);
        let mut f = fleet(Strategy::Rolling, &o);
        (f.new_running, f.new_ready, f.free_slots, f.draining) = (1, 1, 2, 1);
        assert_eq!(fleet_step(&f).start, 0, "1 new + 2 old + 1 draining = 4");
        f.draining = 0;
        assert_eq!(fleet_step(&f).start, 1);
        // No old instance serving, but two still draining: the surge holds.
        let none = old(&[]);
        let mut f = fleet(Strategy::Rolling, &none);
        (f.new_running, f.free_slots, f.draining) = (2, 1, 2);
        assert_eq!(fleet_step(&f).start, 0);
    }

    #[test]
    fn a_rolling_update_surges_by_one_and_stops_an_old_one_per_new_ready_one() {
        let o = old(&[true, true, true]);
        // Three old, ready: one new may start (3 + 1 surge), none may stop.
        let s = fleet_step(&fleet(Strategy::Rolling, &o));
        assert_eq!(
            s,
            FleetStep {
                start: 1,
                stop: vec![]
            }
        );
        // The new one is ready: one old one may stop.
        let f = Fleet {
            new_running: 1,
            new_ready: 1,
            free_slots: 2,
            ..fleet(Strategy::Rolling, &o)
        };
        assert_eq!(
            fleet_step(&f),
            FleetStep {
                start: 0,
                stop: vec![0]
            }
        );
        // An unready old one goes at once, whatever availability says.
        let o = old(&[true, false, true]);
        assert_eq!(
            fleet_step(&fleet(Strategy::Rolling, &o)),
            FleetStep {
                start: 1,
                stop: vec![1]
            }
        );
    }

    #[test]
    fn recreate_stops_everything_old_before_starting_anything() {
        let o = old(&[true, false]);
        assert_eq!(
            fleet_step(&fleet(Strategy::Recreate, &o)),
            FleetStep {
                start: 0,
                stop: vec![0, 1]
            }
        );
        // Old ones still stopping: nothing new yet.
        let f = Fleet {
            any_old_left: true,
            ..fleet(Strategy::Recreate, &[])
        };
        assert_eq!(fleet_step(&f).start, 0);
        let f = Fleet {
            any_old_left: false,
            ..fleet(Strategy::Recreate, &[])
        };
        assert_eq!(fleet_step(&f).start, 3);
    }

    #[test]
    fn blue_green_starts_the_whole_fleet_beside_the_old_one_and_stops_nothing() {
        let o = old(&[true, true, true]);
        assert_eq!(
            fleet_step(&fleet(Strategy::BlueGreen, &o)),
            FleetStep {
                start: 3,
                stop: vec![]
            }
        );
    }

    #[test]
    fn a_failed_or_paused_release_starts_nothing() {
        let o = old(&[true]);
        let f = Fleet {
            may_start: false,
            ..fleet(Strategy::Rolling, &o)
        };
        assert_eq!(fleet_step(&f).start, 0);
        let f = Fleet {
            may_start: false,
            ..fleet(Strategy::Rolling, &[])
        };
        assert_eq!(fleet_step(&f).start, 0);
    }

    /// A whole rolling update simulated pass by pass: instances start,
    /// become ready (or not) at random, stop when told; the promise of the
    /// README holds at every pass, and the update ends wholly on the new
    /// release.
    fn simulate(
        strategy: Strategy,
        replicas: u32,
        max_surge: u32,
        max_unavailable: u32,
        readiness: &[bool],
    ) -> Result<(), TestCaseError> {
        // (id, release is new, ready)
        let mut fleet: Vec<(usize, bool, bool)> =
            (0..replicas as usize).map(|i| (i, false, true)).collect();
        let mut next_id = fleet.len();
        let min_available = replicas.saturating_sub(max_unavailable);
        // Each pass an unready new instance becomes ready when its coin for
        // that pass says so; every instance meets each coin within
        // `readiness.len()` passes, so one `true` lets all get ready.
        let coin = |pass: usize, id: usize| readiness[(pass + id) % readiness.len()];
        let passes = (replicas as usize + 2) * (readiness.len() + 2) * 2;
        for pass in 0..passes {
            // New instances become ready, at random.
            for inst in fleet.iter_mut().filter(|i| i.1 && !i.2) {
                inst.2 = coin(pass, inst.0);
            }
            let old: Vec<OldInstance<usize>> = fleet
                .iter()
                .filter(|i| !i.1)
                .map(|&(id, _, ready)| OldInstance { id, ready })
                .collect();
            let new_running = fleet.iter().filter(|i| i.1).count() as u32;
            let new_ready = fleet.iter().filter(|i| i.1 && i.2).count() as u32;
            let ready_before = fleet.iter().filter(|i| i.2).count() as u32;
            let step = fleet_step(&Fleet {
                strategy,
                replicas,
                max_surge,
                max_unavailable,
                free_slots: replicas.saturating_sub(new_running),
                new_running,
                new_ready,
                old: &old,
                any_old_left: !old.is_empty(),
                draining: 0,
                may_start: true,
            });
            fleet.retain(|i| !step.stop.contains(&i.0));
            for _ in 0..step.start {
                fleet.push((next_id, true, false));
                next_id += 1;
            }
            let total = fleet.len() as u32;
            let ready = fleet.iter().filter(|i| i.2).count() as u32;
            if strategy == Strategy::Recreate {
                // Never old and new at once, never more than the replicas.
                prop_assert!(
                    fleet.iter().all(|i| i.1) || fleet.iter().all(|i| !i.1),
                    "old and new at once: {fleet:?}"
                );
                prop_assert!(total <= replicas);
            } else {
                prop_assert!(
                    total <= (replicas + max_surge).max(replicas),
                    "{total} instances > {replicas} + {max_surge}"
                );
                prop_assert!(
                    ready >= min_available.min(ready_before),
                    "{ready} ready < {min_available} (was {ready_before})"
                );
            }
            if fleet.iter().all(|i| i.1 && i.2) && fleet.len() as u32 == replicas {
                return Ok(());
            }
        }
        prop_assert!(
            readiness.iter().all(|r| !r)
                || (strategy != Strategy::Recreate && max_surge + max_unavailable == 0),
            "the update never finished: {fleet:?}"
        );
        Ok(())
    }

    proptest! {
        #[test]
        fn a_rolling_update_keeps_its_bounds_and_ends_wholly_new(
            replicas in 1u32..12,
            max_surge in 0u32..4,
            max_unavailable in 0u32..4,
            readiness in prop::collection::vec(any::<bool>(), 1..16),
        ) {
            simulate(Strategy::Rolling, replicas, max_surge, max_unavailable, &readiness)?;
        }

        #[test]
        fn a_recreate_never_runs_old_and_new_at_once_and_ends_wholly_new(
            replicas in 1u32..12,
            readiness in prop::collection::vec(any::<bool>(), 1..16),
        ) {
            simulate(Strategy::Recreate, replicas, 1, 0, &readiness)?;
        }
    }
}
