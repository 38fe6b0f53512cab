//! What the scale benchmark (`bench/reconcile.sh`) drives, exported only
//! with the `bench` feature: the in-memory state store and the fake
//! runtime, behind the same traits the agent uses.

pub use crate::runtime::fake::Fake;
pub use crate::runtime::{Launch, Running, Runtime};
pub use crate::state::{
    InstanceRecord, MemoryState, NewEvent, ServiceRecord, SqliteState, StateStore,
};
