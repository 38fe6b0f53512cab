//! A rollout as the state store keeps it, so that a controller that starts
//! (after `kiln serve --upgrade`, a crash of the agent, a stop and start)
//! resumes it where it was: [`Rollout::save`] turns each of its
//! [`Instant`]s (a deadline, the end of a warm window or of a watch, when a
//! canary step's weight took effect) into wall-clock milliseconds since
//! the Unix epoch, and [`Rollout::restore`] turns them back into instants
//! of the new process. A time already past stays past.
//!
//! One thing does not survive: a canary step's analysis window. The
//! router's counters live in the agent process and start again from zero
//! in a new one, so a restored step's window starts again at the restore
//! (from the counters the new process has then); its pause keeps its end.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::counters::Snapshot;
use crate::rollout::pass::{CanaryPhase, CanaryRun, Rollout, Watch};

/// The clock pair at which instants and wall-clock time are converted:
/// one instant and the wall-clock time (ms since the Unix epoch) it was,
/// read together.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub now: Instant,
    pub wall_ms: u64,
}

impl Clock {
    /// `t` as wall-clock milliseconds.
    pub fn to_wall(&self, t: Instant) -> u64 {
        if t >= self.now {
            self.wall_ms
                .saturating_add(t.duration_since(self.now).as_millis() as u64)
        } else {
            self.wall_ms
                .saturating_sub(self.now.duration_since(t).as_millis() as u64)
        }
    }

    /// Wall-clock milliseconds `ms` as an instant of this process (one
    /// before the process could have started saturates at `now`: it is
    /// past either way).
    pub fn to_instant(&self, ms: u64) -> Instant {
        if ms >= self.wall_ms {
            self.now + Duration::from_millis(ms - self.wall_ms)
        } else {
            self.now
                .checked_sub(Duration::from_millis(self.wall_ms - ms))
                .unwrap_or(self.now)
        }
    }
}

/// [`Rollout`], with wall-clock times (ms since the Unix epoch).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SavedRollout {
    Idle,
    Rolling {
        target: u64,
        deadline_ms: u64,
    },
    BlueGreen {
        target: u64,
        deadline_ms: u64,
        routed: u64,
        promote: bool,
    },
    Warm {
        target: u64,
        until_ms: u64,
        watch: Option<SavedWatch>,
    },
    Watching {
        target: u64,
        watch: SavedWatch,
    },
    Canary {
        target: u64,
        stable: u64,
        step: usize,
        weight: u32,
        /// `None`: the step's fleet is starting, until `deadline_ms`.
        deadline_ms: Option<u64>,
        /// When the step's weight took effect (its pause counts from then).
        began_ms: Option<u64>,
        promote: bool,
        waiting: String,
    },
    Paused {
        target: u64,
        routed: Option<u64>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedWatch {
    pub back_to: u64,
    pub until_ms: u64,
}

impl Rollout {
    /// This rollout as the state store keeps it.
    pub fn save(&self, clock: &Clock) -> SavedRollout {
        let watch = |w: &Watch| SavedWatch {
            back_to: w.back_to,
            until_ms: clock.to_wall(w.until),
        };
        match self {
            Self::Idle => SavedRollout::Idle,
            Self::Rolling { target, deadline } => SavedRollout::Rolling {
                target: *target,
                deadline_ms: clock.to_wall(*deadline),
            },
            Self::BlueGreen {
                target,
                deadline,
                routed,
                promote,
            } => SavedRollout::BlueGreen {
                target: *target,
                deadline_ms: clock.to_wall(*deadline),
                routed: *routed,
                promote: *promote,
            },
            Self::Warm {
                target,
                until,
                watch: w,
            } => SavedRollout::Warm {
                target: *target,
                until_ms: clock.to_wall(*until),
                watch: w.as_ref().map(watch),
            },
            Self::Watching { target, watch: w } => SavedRollout::Watching {
                target: *target,
                watch: watch(w),
            },
            Self::Canary(run) => {
                let (deadline_ms, began_ms) = match &run.phase {
                    CanaryPhase::Starting { deadline } => (Some(clock.to_wall(*deadline)), None),
                    CanaryPhase::Judging { began, .. } => (None, Some(clock.to_wall(*began))),
                };
                SavedRollout::Canary {
                    target: run.target,
                    stable: run.stable,
                    step: run.step,
                    weight: run.weight,
                    deadline_ms,
                    began_ms,
                    promote: run.promote,
                    waiting: run.waiting.clone(),
                }
            }
            Self::Paused { target, routed } => SavedRollout::Paused {
                target: *target,
                routed: *routed,
            },
        }
    }

    /// The rollout `saved` describes, in this process: its times as
    /// instants of `clock`, a canary step's analysis window starting
    /// again from `counters` (each release's counters now).
    pub fn restore(
        saved: &SavedRollout,
        clock: &Clock,
        counters: impl Fn(u64) -> Snapshot,
    ) -> Self {
        let watch = |w: &SavedWatch| Watch {
            back_to: w.back_to,
            until: clock.to_instant(w.until_ms),
        };
        match saved {
            SavedRollout::Idle => Self::Idle,
            SavedRollout::Rolling {
                target,
                deadline_ms,
            } => Self::Rolling {
                target: *target,
                deadline: clock.to_instant(*deadline_ms),
            },
            SavedRollout::BlueGreen {
                target,
                deadline_ms,
                routed,
                promote,
            } => Self::BlueGreen {
                target: *target,
                deadline: clock.to_instant(*deadline_ms),
                routed: *routed,
                promote: *promote,
            },
            SavedRollout::Warm {
                target,
                until_ms,
                watch: w,
            } => Self::Warm {
                target: *target,
                until: clock.to_instant(*until_ms),
                watch: w.as_ref().map(watch),
            },
            SavedRollout::Watching { target, watch: w } => Self::Watching {
                target: *target,
                watch: watch(w),
            },
            SavedRollout::Canary {
                target,
                stable,
                step,
                weight,
                deadline_ms,
                began_ms,
                promote,
                waiting,
            } => {
                let phase = match (began_ms, deadline_ms) {
                    (Some(began), _) => CanaryPhase::Judging {
                        began: clock.to_instant(*began),
                        canary: Box::new(counters(*target)),
                        stable: Box::new(counters(*stable)),
                    },
                    (None, deadline) => CanaryPhase::Starting {
                        deadline: deadline.map_or(clock.now, |d| clock.to_instant(d)),
                    },
                };
                Self::Canary(CanaryRun {
                    target: *target,
                    stable: *stable,
                    step: *step,
                    weight: *weight,
                    phase,
                    promote: *promote,
                    waiting: waiting.clone(),
                })
            }
            SavedRollout::Paused { target, routed } => Self::Paused {
                target: *target,
                routed: *routed,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn clock() -> Clock {
        Clock {
            now: Instant::now() + Duration::from_secs(3600),
            wall_ms: 1_796_600_000_000,
        }
    }

    fn counters(rev: u64) -> Snapshot {
        let mut s = Snapshot::default();
        s.responses[1] = rev * 10;
        s
    }

    /// Every shape of rollout, its times `offset` ms from `clock.now`.
    fn every(clock: &Clock, offset: i64) -> Vec<Rollout> {
        let at = |ms: i64| {
            if ms >= 0 {
                clock.now + Duration::from_millis(ms as u64)
            } else {
                clock.now - Duration::from_millis(ms.unsigned_abs())
            }
        };
        let w = Watch {
            back_to: 1,
            until: at(offset + 7),
        };
        let run = |phase| CanaryRun {
            target: 3,
            stable: 2,
            step: 1,
            weight: 25,
            phase,
            promote: true,
            waiting: "manual pause: kiln promote web to go on".to_owned(),
        };
        vec![
            Rollout::Idle,
            Rollout::Rolling {
                target: 2,
                deadline: at(offset),
            },
            Rollout::BlueGreen {
                target: 2,
                deadline: at(offset + 1),
                routed: 1,
                promote: true,
            },
            Rollout::Warm {
                target: 2,
                until: at(offset + 2),
                watch: Some(w),
            },
            Rollout::Warm {
                target: 2,
                until: at(offset + 3),
                watch: None,
            },
            Rollout::Watching {
                target: 2,
                watch: w,
            },
            Rollout::Canary(run(CanaryPhase::Starting {
                deadline: at(offset + 4),
            })),
            Rollout::Canary(run(CanaryPhase::Judging {
                began: at(offset - 5),
                canary: Box::new(counters(3)),
                stable: Box::new(counters(2)),
            })),
            Rollout::Paused {
                target: 2,
                routed: Some(1),
            },
            Rollout::Paused {
                target: 2,
                routed: None,
            },
        ]
    }

    proptest! {
        /// Saved and restored at the same moment, a rollout is itself
        /// (to the millisecond), through its JSON too.
        #[test]
        fn a_rollout_restored_at_once_is_itself(offset in -1_000_000i64..1_000_000) {
            let clock = clock();
            for r in every(&clock, offset) {
                let json = serde_json::to_string(&r.save(&clock)).unwrap();
                let saved: SavedRollout = serde_json::from_str(&json).unwrap();
                prop_assert_eq!(&Rollout::restore(&saved, &clock, counters), &r, "{}", json);
            }
        }

        /// Restored later, in another process (another instant for the
        /// same wall-clock time), every time keeps its wall-clock end: as
        /// much of it is left as the wall clock says.
        #[test]
        fn a_rollout_restored_later_keeps_its_ends(offset in 0i64..1_000_000, later in 0u64..2_000_000) {
            let before = clock();
            // (An hour ahead: a machine up for less than the times
            // subtracted has no such instants.)
            let after = Clock {
                now: Instant::now() + Duration::from_secs(3600),
                wall_ms: before.wall_ms + later,
            };
            for r in every(&before, offset) {
                let restored = Rollout::restore(&r.save(&before), &after, counters);
                prop_assert_eq!(restored.save(&after), r.save(&before));
            }
        }
    }

    #[test]
    fn a_restored_canary_step_starts_its_window_again_from_the_counters_now() {
        let clock = clock();
        let saved = every(&clock, 0)[7].save(&clock);
        let now = |rev: u64| {
            let mut s = Snapshot::default();
            s.responses[1] = rev;
            s
        };
        let Rollout::Canary(run) = Rollout::restore(&saved, &clock, now) else {
            panic!("a canary");
        };
        let CanaryPhase::Judging {
            began,
            canary,
            stable,
        } = run.phase
        else {
            panic!("judging");
        };
        assert_eq!((*canary, *stable), (now(3), now(2)));
        assert_eq!(
            began,
            clock.now - Duration::from_millis(5),
            "its pause keeps its start"
        );
    }

    #[test]
    fn clock_conversions_round_trip_and_saturate() {
        let c = clock();
        for ms in [0u64, 1, 999, 86_400_000] {
            assert_eq!(c.to_wall(c.now + Duration::from_millis(ms)), c.wall_ms + ms);
            assert_eq!(c.to_wall(c.now - Duration::from_millis(ms)), c.wall_ms - ms);
            assert_eq!(
                c.to_instant(c.wall_ms + ms),
                c.now + Duration::from_millis(ms)
            );
            assert_eq!(
                c.to_instant(c.wall_ms - ms),
                c.now - Duration::from_millis(ms)
            );
        }
        // Before this process's instants can go: the earliest is now.
        assert_eq!(
            c.to_instant(0),
            c.now
                .checked_sub(Duration::from_millis(c.wall_ms))
                .unwrap_or(c.now)
        );
        let json = serde_json::to_string(&SavedRollout::Idle).unwrap();
        assert_eq!(json, r#"{"phase":"idle"}"#);
    }
}
