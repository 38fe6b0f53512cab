//! The state store's operations per second, etcd against SQLite, in one
//! run (`bench/state.sh` starts the etcd): each backend with its own
//! defaults (etcd fsyncs every write to its log; SQLite in WAL mode with
//! `synchronous = NORMAL` does not).
//!
//! - `append`: one event appended (the ledger's chain), one writer;
//! - `append x8`: the same from 8 concurrent writers (etcd: optimistic
//!   transactions on the head, retried when another came first; SQLite:
//!   one writer at a time);
//! - `apply`: a release recorded with its service, guarded on the version;
//! - `assign`: a leader's fenced write of 100 assignments;
//! - `read`: one service record.
//!
//! Prints one JSON object: for each backend, each operation's count,
//! seconds and operations per second.
//!
//!   ETCD=http://127.0.0.1:2379 N=500 cargo bench -p kiln-agent --features bench --bench state

use std::sync::Arc;
use std::time::Instant;

use kiln_agent::bench::{
    ClusterState, EtcdState, Guard, MemoryState, NewEvent, ServiceRecord, SqliteState,
};
use kiln_core::Digest;
use kiln_core::event::Change;
use kiln_core::release::{Release, ReleaseConfig, ServiceSettings};
use kiln_core::rollout::assign::Assignment;
use kiln_core::service::{RolloutSpec, RuntimeKind};
use kiln_core::spec::{AbsolutePath, ServiceName};

fn release(name: &ServiceName, revision: u64) -> Release {
    let config = ReleaseConfig {
        image: Digest::of(b"bench"),
        image_name: "bench".to_owned(),
        command: vec!["/bin/server".to_owned()],
        workdir: AbsolutePath::try_from("/").expect("a path"),
        env: Default::default(),
        secrets: Default::default(),
        volumes: Default::default(),
        runtime: RuntimeKind::Process,
        user: None,
        resources: Default::default(),
        hooks: Default::default(),
        health: Default::default(),
        stop: Default::default(),
    };
    Release::pending(
        name.clone(),
        revision,
        config,
        "apply".to_owned(),
        "2026-12-07T00:00:00Z".to_owned(),
    )
}

fn record(name: &ServiceName, target: u64) -> ServiceRecord {
    ServiceRecord {
        name: name.clone(),
        settings: ServiceSettings {
            replicas: 100,
            listen: None,
            route: Default::default(),
            tls: None,
            rollout: RolloutSpec::default(),
            timeout: kiln_core::service::Duration::from_secs(30),
            router: Default::default(),
            node_labels: Default::default(),
            error_pages: Default::default(),
        },
        target,
        version: 0,
    }
}

fn event(name: &ServiceName, i: u64) -> NewEvent {
    NewEvent::service(
        Change::RolloutPaused {
            reason: format!("bench {i}"),
        },
        name,
        None,
    )
}

async fn timed<F: std::future::Future<Output = ()>>(
    out: &mut serde_json::Map<String, serde_json::Value>,
    what: &str,
    n: u64,
    f: F,
) {
    let t = Instant::now();
    f.await;
    let s = t.elapsed().as_secs_f64();
    out.insert(
        what.to_owned(),
        serde_json::json!({ "ops": n, "seconds": s, "ops_per_second": n as f64 / s }),
    );
}

async fn measure(state: Arc<dyn ClusterState>, n: u64) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    let web = ServiceName::try_from("web").expect("a name");
    timed(&mut out, "append", n, async {
        for i in 0..n {
            state.append_event(&event(&web, i)).await.expect("append");
        }
    })
    .await;
    timed(&mut out, "append x8", n, async {
        let tasks: Vec<_> = (0..8)
            .map(|w| {
                let state = state.clone();
                let web = web.clone();
                tokio::spawn(async move {
                    for i in 0..n / 8 {
                        state
                            .append_event(&event(&web, w * n + i))
                            .await
                            .expect("append");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("a writer");
        }
    })
    .await;
    timed(&mut out, "apply", n, async {
        let mut version = 0;
        for rev in 1..=n {
            let rel = release(&web, rev);
            state
                .record_apply(
                    &record(&web, rev),
                    Some(&rel),
                    &[event(&web, rev)],
                    Guard::version(version),
                )
                .await
                .expect("apply");
            version = state
                .service(&web)
                .await
                .expect("read")
                .expect("there")
                .version;
        }
    })
    .await;
    let fence = state.lead().await.expect("lead");
    let list: Vec<Assignment> = (0..100)
        .map(|slot| Assignment {
            id: format!("web-r1-{slot:016x}"),
            node: "bench".to_owned(),
            revision: 1,
            slot,
            adopted: false,
            stop: None,
            resources: Default::default(),
        })
        .collect();
    timed(&mut out, "assign", n, async {
        for _ in 0..n {
            state
                .assign(&web, &list, None, None, Guard::fence(fence))
                .await
                .expect("assign");
        }
    })
    .await;
    timed(&mut out, "read", n, async {
        for _ in 0..n {
            state.service(&web).await.expect("read");
        }
    })
    .await;
    serde_json::Value::Object(out)
}

#[tokio::main]
async fn main() {
    let n: u64 = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let etcd = std::env::var("ETCD").expect("ETCD=http://HOST:PORT (bench/state.sh starts one)");
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = Arc::new(SqliteState::open(&dir.path().join("state.db")).expect("open"));
    let etcd_state = Arc::new(
        EtcdState::connect(&[etcd], "/bench/", MemoryState::new(), None)
            .await
            .expect("etcd"),
    );
    let mut out = serde_json::Map::new();
    out.insert("sqlite".to_owned(), measure(sqlite, n).await);
    out.insert("etcd".to_owned(), measure(etcd_state, n).await);
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
}
