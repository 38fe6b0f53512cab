//! Rollout decisions as pure values: the agent's controller observes its
//! fleet and its measurements, asks here what to do, and does it. Nothing
//! here reads a clock or starts anything.
//!
//! - [`fleet`]: one pass of a fleet towards its target release, by
//!   strategy (`fleet_step`).
//! - [`canary`]: the canary's fleet at a weight, and the analysis'
//!   judgement of a step (`judge`).
//! - [`pass`]: one whole pass of a service's controller (`decide`): the
//!   rollout's state as a closed enum, and the steps the controller
//!   carries out. It uses the two above.
//! - [`saved`]: the rollout's state as the state store keeps it, with
//!   wall-clock times, so that a new agent process resumes it.
//! - [`assign`]: the leader's decisions as assignments to nodes, the view
//!   from what nodes observe, and a node worker's work.

pub mod assign;
pub mod canary;
pub mod fleet;
pub mod pass;
pub mod saved;
#[cfg(test)]
mod tests;

pub use fleet::{Fleet, FleetStep, OldInstance, fleet_step};
pub use pass::{
    AbortRefused, CanaryPhase, CanaryRun, Decision, Message, NotWaiting, Rollout, Routing, Seen,
    Step, StopReason, View, Watch, abort, decide, due,
};
pub use saved::{Clock, SavedRollout, SavedWatch};
