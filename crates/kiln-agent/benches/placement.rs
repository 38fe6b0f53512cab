//! Placement throughput (`bench/placement.sh` starts the etcd): a leader
//! places SERVICES × REPLICAS instances (default 10 × 1,000 = 10,000) over
//! NODES simulated nodes (default 100), each service's first release at
//! once, through the leader's own code: the rollout decision (kiln-core's
//! `decide`), the spread within each node's room (`Fleet::assign`, the
//! node running the fewest of the service's instances among those with
//! room left for `cpu = "100m"`, `memory = "64M"`; each node offers 16
//! CPUs and 64 GiB, every service's reservations counted), and the fenced write of the assignments with
//! the routing (`ClusterState::assign`, one transaction per service and
//! pass). Then every node reads its assignments back (what each node's
//! worker does) and the spread is checked: no node runs two more of a
//! service than another.
//!
//! The nodes are names, not processes: what is measured is the cluster's
//! placement (decided, durable, readable by every node), not the start of
//! 10,000 processes (`bench/reconcile.sh` measures that on one node with
//! the fake runtime). Prints one JSON object per store (etcd and SQLite).
//!
//!   ETCD=http://127.0.0.1:2379 cargo bench -p kiln-agent --features bench --bench placement

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use kiln_agent::bench::{
    ClusterState, EtcdState, Guard, MemoryState, NewEvent, ServiceRecord, SqliteState,
};
use kiln_core::Digest;
use kiln_core::event::Change;
use kiln_core::health::Backoff;
use kiln_core::release::{Outcome, Release, ReleaseConfig, ServiceSettings};
use kiln_core::resources::{Amount, Resources, Room};
use kiln_core::rollout::assign::Fleet;
use kiln_core::rollout::{Rollout, View, decide};
use kiln_core::service::{RolloutSpec, RuntimeKind};
use kiln_core::spec::{AbsolutePath, ServiceName};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn settings(replicas: u32) -> ServiceSettings {
    ServiceSettings {
        replicas,
        listen: None,
        route: Default::default(),
        tls: None,
        rollout: RolloutSpec::default(),
        timeout: kiln_core::service::Duration::from_secs(30),
        router: Default::default(),
        node_labels: Default::default(),
        error_pages: Default::default(),
    }
}

/// What each instance declares (`cpu = "100m"`, `memory = "64M"`).
const DEMAND: Resources = Resources {
    cpu_millis: 100,
    memory_bytes: 64 << 20,
    pids: 0,
};

fn release(name: &ServiceName) -> Release {
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
        resources: DEMAND,
        hooks: Default::default(),
        health: Default::default(),
        stop: Default::default(),
    };
    Release::pending(
        name.clone(),
        1,
        config,
        "apply".to_owned(),
        "2026-12-07T00:00:00Z".to_owned(),
    )
}

async fn measure(
    state: Arc<dyn ClusterState>,
    services: usize,
    replicas: u32,
    nodes: &[String],
) -> serde_json::Value {
    let names: Vec<ServiceName> = (0..services)
        .map(|i| ServiceName::try_from(format!("svc{i}").as_str()).expect("a name"))
        .collect();
    for name in &names {
        let record = ServiceRecord {
            name: name.clone(),
            settings: settings(replicas),
            target: 1,
            version: 0,
        };
        let ev = NewEvent::service(
            Change::RolloutPaused {
                reason: "bench".to_owned(),
            },
            name,
            Some(1),
        );
        state
            .record_apply(&record, Some(&release(name)), &[ev], Guard::NONE)
            .await
            .expect("apply");
    }
    let fence = state.lead().await.expect("lead");
    let (slots, same, counters) = (BTreeMap::new(), BTreeSet::new(), BTreeMap::new());
    let mut id = 0u64;
    let mut decide_s = 0.0;
    // What each node offers, and what every service placed so far reserves.
    let capacity: Vec<(String, Amount)> = nodes
        .iter()
        .map(|n| (n.clone(), Amount::capacity(16, 64 << 10)))
        .collect();
    let mut reserved: Vec<(String, Resources)> = Vec::new();
    let started = Instant::now();
    for name in &names {
        let settings = settings(replicas);
        let mut fleet: Fleet = Fleet::default();
        let now = Instant::now();
        let t = Instant::now();
        let d = decide(
            &Rollout::Idle,
            &View {
                service: name,
                now,
                target: 1,
                outcome: Outcome::Pending,
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
        );
        let room = Room::new(
            capacity.iter().cloned(),
            reserved.iter().map(|(n, r)| (n.as_str(), r)),
        );
        let unplaced = fleet.assign(
            &d.steps,
            1,
            (nodes, &room),
            |_| DEMAND,
            |_| {
                id += 1;
                format!("{name}-{id}")
            },
        );
        assert_eq!(unplaced, 0, "every node has room");
        reserved.extend(
            fleet
                .assigned()
                .iter()
                .map(|a| (a.node.clone(), a.resources)),
        );
        decide_s += t.elapsed().as_secs_f64();
        state
            .assign(
                name,
                fleet.assigned(),
                Some(d.routing),
                None,
                Guard::fence(fence),
            )
            .await
            .expect("assign");
    }
    let placed_s = started.elapsed().as_secs_f64();
    // Every node reads every service's assignments (its worker's read).
    let t = Instant::now();
    let mut per_node: BTreeMap<(String, String), u32> = BTreeMap::new();
    for node in nodes {
        for name in &names {
            let a = state.assignments(name).await.expect("read").expect("some");
            let mine = a.list.iter().filter(|a| a.node == *node).count() as u32;
            per_node.insert((name.to_string(), node.clone()), mine);
        }
    }
    let read_s = t.elapsed().as_secs_f64();
    let total = id as f64;
    let spread_ok = names.iter().all(|name| {
        let counts: Vec<u32> = nodes
            .iter()
            .map(|n| per_node[&(name.to_string(), n.clone())])
            .collect();
        counts.iter().max().unwrap_or(&0) - counts.iter().min().unwrap_or(&0) <= 1
    });
    serde_json::json!({
        "instances": id,
        "placed_seconds": placed_s,
        "placements_per_second": total / placed_s,
        "decide_and_spread_seconds": decide_s,
        "write_seconds": placed_s - decide_s,
        "read_back_by_every_node_seconds": read_s,
        "placed_and_read_per_second": total / (placed_s + read_s),
        "spread_within_one": spread_ok,
    })
}

#[tokio::main]
async fn main() {
    let services = env("SERVICES", 10);
    let replicas = env("REPLICAS", 1000) as u32;
    let nodes: Vec<String> = (0..env("NODES", 100))
        .map(|i| format!("node-{i:03}"))
        .collect();
    let etcd =
        std::env::var("ETCD").expect("ETCD=http://HOST:PORT (bench/placement.sh starts one)");
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = Arc::new(SqliteState::open(&dir.path().join("state.db")).expect("open"));
    let etcd_state = Arc::new(
        EtcdState::connect(&[etcd], "/bench-placement/", MemoryState::new(), None)
            .await
            .expect("etcd"),
    );
    let mut out = serde_json::Map::new();
    out.insert(
        "etcd".to_owned(),
        measure(etcd_state, services, replicas, &nodes).await,
    );
    out.insert(
        "sqlite".to_owned(),
        measure(sqlite, services, replicas, &nodes).await,
    );
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
}
