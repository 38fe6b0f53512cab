//! What the scale benchmark (`bench/reconcile.sh`) drives, exported only
//! with the `bench` feature: the in-memory state store and the fake
//! runtime, behind the same traits the agent uses.

pub use crate::runtime::fake::Fake;
pub use crate::runtime::{Launch, Running, Runtime};
pub use crate::state::{
    ClusterState, EtcdState, Guard, InstanceRecord, MemoryState, NewEvent, NodeState,
    ServiceRecord, SqliteState,
};

/// The answer of a state store call that never waits (the memory store's;
/// SQLite's, which does its work when polled): one poll gives it, with no
/// runtime (the agent awaits the same calls on tokio).
pub fn ready<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f
        .as_mut()
        .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("a state store call waited: not one that never does"),
    }
}
