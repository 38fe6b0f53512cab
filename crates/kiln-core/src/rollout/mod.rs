//! Rollout decisions as pure values: the agent's controller observes its
//! fleet and its measurements, asks here what to do, and does it. Nothing
//! here reads a clock or starts anything.
//!
//! - [`fleet`]: one pass of a fleet towards its target release, by
//!   strategy (`fleet_step`).
//! - [`canary`]: the canary's fleet at a weight, and the analysis'
//!   judgement of a step (`judge`).

pub mod canary;
pub mod fleet;

pub use fleet::{Fleet, FleetStep, OldInstance, fleet_step};
