//! The controller through the agent, with the fake runtime and the
//! in-memory state store: no process, no sandbox, no database file. A
//! tiny image is baked into a temporary store (the controller prepares its
//! tree as for any release); every instance is the fake's, which listens
//! on its port (so readiness passes) unless told not to.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kiln_core::api::{ApplyRequest, ServiceStatus};
use kiln_core::event::Actor;
use kiln_core::health::Backoff;
use kiln_core::release::{DesiredService, Outcome, ReleaseConfig, ServiceSettings};
use kiln_core::service::{self, RolloutSpec, RuntimeKind, StopSpec, Strategy};
use kiln_core::spec::{AbsolutePath, EnvName, ImageSpec, ServiceName};
use kiln_store::Store;
use kiln_store::bake::{BakeOptions, Quiet, bake_image};

use crate::agent::Agent;
use crate::instance::StopKind;
use crate::runtime::fake::Fake;
use crate::shared::Shared;
use crate::state::MemoryState;

struct Harness {
    _dir: tempfile::TempDir,
    agent: Arc<Agent>,
    fake: Arc<Fake>,
    image: kiln_core::Digest,
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let store = Store::open(home.join("store")).unwrap();
    let app = dir.path().join("app");
    std::fs::create_dir_all(app.join("bin")).unwrap();
    std::fs::write(app.join("bin/server"), b"#!/bin/sh\n").unwrap();
    let spec: ImageSpec = serde_json::from_value(serde_json::json!({ "context": "app" })).unwrap();
    let name = kiln_core::reference::ImageName::try_from("app").unwrap();
    let baked = bake_image(
        &store,
        dir.path(),
        &name,
        &spec,
        &BakeOptions::default(),
        &Quiet,
    )
    .unwrap();
    let backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(100),
        stable_after: Duration::from_secs(5),
    };
    let fake = Fake::new();
    let shared = Shared::new(
        home,
        store,
        Arc::new(MemoryState::new()),
        backoff,
        crate::router::Router::with_budget(1000),
        7,
    )
    .with_runtime(fake.clone());
    let agent = Agent::start_on(Arc::new(shared)).await.unwrap();
    Harness {
        _dir: dir,
        agent,
        fake,
        image: baked.digest,
    }
}

fn web() -> ServiceName {
    ServiceName::try_from("web").unwrap()
}

impl Harness {
    fn desired(&self, replicas: u32, env: &[(&str, &str)], rollout: RolloutSpec) -> DesiredService {
        DesiredService {
            name: web(),
            settings: ServiceSettings {
                replicas,
                listen: None,
                route: Default::default(),
                tls: None,
                rollout,
                timeout: service::Duration::from_secs(30),
                router: service::RouterSpec::default(),
                node_labels: Default::default(),
                error_pages: Default::default(),
            },
            config: ReleaseConfig {
                image: self.image.clone(),
                image_name: "app".to_owned(),
                command: vec!["/bin/server".to_owned()],
                workdir: AbsolutePath::try_from("/").unwrap(),
                env: env
                    .iter()
                    .map(|(k, v)| (EnvName::try_from(*k).unwrap(), (*v).to_owned()))
                    .collect::<BTreeMap<_, _>>(),
                secrets: BTreeMap::new(),
                volumes: BTreeMap::new(),
                runtime: RuntimeKind::Process,
                user: None,
                resources: Default::default(),
                hooks: Default::default(),
                health: Default::default(),
                stop: StopSpec {
                    drain_timeout: service::Duration::from_millis(0),
                    kill_timeout: service::Duration::from_secs(30),
                    ..StopSpec::default()
                },
            },
            secret_values: BTreeMap::new(),
            signed_by: Vec::new(),
        }
    }

    async fn apply(&self, d: DesiredService) {
        let req = ApplyRequest {
            services: vec![d],
            dry_run: false,
            explicit_runtime: vec![web()],
            prune: false,
        };
        self.agent.apply(req, Actor::Agent).await.unwrap();
    }

    async fn status(&self) -> ServiceStatus {
        let all = self.agent.status().await.unwrap();
        all.services.into_iter().find(|s| s.name == web()).unwrap()
    }

    /// The service's status once `done` holds (within 10 s).
    async fn until(&self, what: &str, done: impl Fn(&ServiceStatus) -> bool) -> ServiceStatus {
        for _ in 0..1000 {
            let s = self.status().await;
            if done(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what}: never happened; status: {:#?}", self.status().await);
    }

    async fn outcomes(&self) -> Vec<(u64, Outcome)> {
        let h = self.agent.history(&web()).await.unwrap();
        h.releases.iter().map(|r| (r.revision, r.outcome)).collect()
    }
}

fn converged_on(revision: u64) -> impl Fn(&ServiceStatus) -> bool {
    move |s| s.converged && s.revision == Some(revision)
}

fn rollout(strategy: Strategy) -> RolloutSpec {
    RolloutSpec {
        strategy,
        progress_deadline: service::Duration::from_secs(2),
        ..RolloutSpec::default()
    }
}

#[tokio::test]
async fn a_rolling_update_replaces_every_instance() {
    let h = harness().await;
    // Unwatched: nothing of release 1 is kept warm (the router test
    // covers the warm fleet of a watched release).
    let unwatched = RolloutSpec {
        watch: service::Duration::from_secs(0),
        ..rollout(Strategy::Rolling)
    };
    h.apply(h.desired(3, &[("V", "1")], unwatched.clone()))
        .await;
    h.until("release 1 converged", converged_on(1)).await;
    h.apply(h.desired(3, &[("V", "2")], unwatched)).await;
    let s = h.until("release 2 converged", converged_on(2)).await;
    assert!(s.instances.iter().all(|i| i.revision == 2 && i.ready));
    assert_eq!(h.fake.spawned.load(Ordering::Relaxed), 6);
    assert_eq!(
        h.outcomes().await,
        [(1, Outcome::Superseded), (2, Outcome::Active)]
    );
    // Every instance of release 1 was cleaned up after it stopped.
    h.until("cleaned up", |_| {
        h.fake.cleaned_up.load(Ordering::Relaxed) == 3
    })
    .await;
}

#[tokio::test]
async fn a_release_that_never_gets_ready_fails_and_the_service_returns() {
    let h = harness().await;
    h.apply(h.desired(2, &[], rollout(Strategy::Rolling))).await;
    h.until("release 1 converged", converged_on(1)).await;
    // It declares how to tell it is ready (a worker without a probe would
    // be ready while it runs): its port accepts, which it never does.
    let mut never = h.desired(2, &[("FAKE_NO_LISTEN", "1")], rollout(Strategy::Rolling));
    never.config.health.readiness = Some(tcp_probe());
    h.apply(never).await;
    let s = h
        .until("back on release 1", |s| {
            s.revision == Some(1) && s.converged && s.instances.iter().all(|i| i.revision == 1)
        })
        .await;
    assert_eq!(s.failed_release.as_ref().map(|f| f.revision), Some(2));
    assert!(
        s.failed_release
            .unwrap()
            .reason
            .contains("progress deadline"),
        "the deadline failed it"
    );
    assert_eq!(
        h.outcomes().await,
        [(1, Outcome::Active), (2, Outcome::Failed)]
    );
}

fn tcp_probe() -> service::Probe {
    service::Probe {
        check: service::ProbeCheck::Tcp,
        interval: service::Duration::from_millis(50),
        timeout: service::Duration::from_millis(50),
        success_threshold: 1,
        failure_threshold: 3,
        initial_delay: service::Duration::from_secs(0),
    }
}

/// A worker (no `listen`, no port it listens on, no probe) is ready once
/// it has stayed up for `min_ready`: nothing else can tell.
#[tokio::test]
async fn a_worker_without_port_or_probe_is_ready_after_min_ready() {
    let h = harness().await;
    let mut r = rollout(Strategy::Rolling);
    r.min_ready = service::Duration::from_millis(300);
    h.apply(h.desired(2, &[("FAKE_NO_LISTEN", "1")], r.clone()))
        .await;
    let s = h
        .until("release 1 active", |s| {
            converged_on(1)(s) && s.outcome == Some(Outcome::Active)
        })
        .await;
    assert!(s.instances.iter().all(|i| i.ready), "{s:#?}");
    // A worker that crashes inside min_ready is not ready: its release
    // fails at the deadline and never goes active.
    h.apply(h.desired(
        2,
        &[("FAKE_NO_LISTEN", "1"), ("FAKE_EXIT_AFTER_MS", "100")],
        r,
    ))
    .await;
    h.until("release 2 failed", |s| {
        s.failed_release.as_ref().is_some_and(|f| f.revision == 2)
    })
    .await;
    assert_eq!(
        h.outcomes().await,
        [(1, Outcome::Active), (2, Outcome::Failed)]
    );
}

#[tokio::test]
async fn an_instance_that_exits_is_replaced_in_its_slot() {
    let h = harness().await;
    h.apply(h.desired(
        1,
        &[("FAKE_EXIT_AFTER_MS", "300")],
        rollout(Strategy::Rolling),
    ))
    .await;
    // The third instance is listed (starting) a moment before its task
    // spawns it: wait for both.
    let s = h
        .until("replaced twice", |s| {
            s.instances.iter().any(|i| i.replacements >= 2)
                && h.fake.spawned.load(Ordering::Relaxed) >= 3
        })
        .await;
    assert!(s.instances.iter().all(|i| i.slot == 0));
}

#[tokio::test]
async fn blue_green_waits_for_promote_and_abort_returns() {
    let h = harness().await;
    let mut bg = rollout(Strategy::BlueGreen);
    bg.auto_promote = false;
    bg.progress_deadline = service::Duration::from_secs(30);
    h.apply(h.desired(2, &[], bg.clone())).await;
    h.until("release 1 converged", converged_on(1)).await;
    h.apply(h.desired(2, &[("V", "2")], bg.clone())).await;
    let s = h
        .until("waiting for promotion", |s| {
            s.message
                .as_deref()
                .is_some_and(|m| m.contains("kiln promote"))
        })
        .await;
    assert_eq!(s.instances.len(), 4, "both fleets run");
    let (aborted, back) = {
        let r = h
            .agent
            .abort(&web(), Actor::Local { uid: 1000 })
            .await
            .unwrap();
        (r.revision, r.back_to)
    };
    assert_eq!((aborted, back), (2, 1));
    h.until("only release 1 left", |s| {
        s.revision == Some(1) && s.instances.iter().all(|i| i.revision == 1) && s.converged
    })
    .await;
    // Nothing waits for promotion now.
    assert!(h.agent.promote(&web(), Actor::Agent).await.is_err());
}

#[tokio::test]
async fn a_second_shutdown_signal_kills_instances_that_ignore_the_first() {
    let h = harness().await;
    h.apply(h.desired(2, &[("FAKE_IGNORE_TERM", "1")], rollout(Strategy::Rolling)))
        .await;
    h.until("converged", converged_on(1)).await;
    let agent = h.agent.clone();
    let graceful = tokio::spawn(async move {
        agent
            .shutdown(StopKind::Graceful, Duration::from_secs(60))
            .await
    });
    // The instances ignore their stop signal (kill_timeout is 30 s): the
    // graceful shutdown waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!graceful.is_finished());
    h.agent
        .shutdown(StopKind::Kill, Duration::from_secs(60))
        .await;
    tokio::time::timeout(Duration::from_secs(5), graceful)
        .await
        .expect("the escalation ended the graceful shutdown")
        .unwrap();
    assert_eq!(h.fake.cleaned_up.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn instances_that_drifted_are_replaced_and_nothing_else_changes() {
    let h = harness().await;
    h.apply(h.desired(2, &[], rollout(Strategy::Rolling))).await;
    let before = h.until("release 1 converged", converged_on(1)).await;
    let old: std::collections::BTreeSet<String> =
        before.instances.iter().map(|i| i.id.clone()).collect();
    // The image's tree was replaced: both instances run the drifted one.
    h.agent
        .drift_board()
        .quarantined(h.image.clone(), std::time::SystemTime::now());
    let s = h
        .until("both replaced", |s| {
            s.instances.len() == 2 && s.instances.iter().all(|i| i.ready && !old.contains(&i.id))
        })
        .await;
    assert_eq!(h.fake.spawned.load(Ordering::Relaxed), 4);
    assert_eq!(h.outcomes().await, [(1, Outcome::Active)]);
    // One instance's process drifted: it alone is replaced.
    let (gone, kept) = (s.instances[0].id.clone(), s.instances[1].id.clone());
    h.agent
        .drift_board()
        .config_drifted(&gone, vec!["environment: V changed".into()]);
    let s = h
        .until("the drifted one replaced", |s| {
            s.instances.len() == 2 && s.instances.iter().all(|i| i.ready && i.id != gone)
        })
        .await;
    assert!(s.instances.iter().any(|i| i.id == kept));
    assert_eq!(h.fake.spawned.load(Ordering::Relaxed), 5);
    assert_eq!(
        h.agent
            .drift_board()
            .counts
            .replaced
            .load(Ordering::Relaxed),
        3
    );
}

/// `POST /v1/records`: a client records only bakes and pulls, only of an
/// image this agent's store holds, and as itself.
#[tokio::test]
async fn a_client_records_only_bakes_and_pulls_of_what_the_store_holds() {
    use kiln_core::event::Change;
    let h = harness().await;
    let me = Actor::Local { uid: 4242 };
    let err = h
        .agent
        .record(Change::ReleaseActive {}, me)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("only image-baked and image-pulled, not release-active"),
        "{err}"
    );
    let elsewhere = kiln_core::Digest::of(b"not in this store");
    let err = h
        .agent
        .record(
            Change::ImagePulled {
                image: "app".into(),
                digest: elsewhere,
                from: "example.com/app".into(),
            },
            me,
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("is not in this agent's store"),
        "{err}"
    );
    let before = h.agent.events(0).await.unwrap().len();
    let seq = h
        .agent
        .record(
            Change::ImageBaked {
                image: "app".into(),
                digest: h.image.clone(),
                tags: Vec::new(),
                provenance: Default::default(),
            },
            me,
        )
        .await
        .unwrap();
    let events = h.agent.events(0).await.unwrap();
    assert_eq!(events.len(), before + 1, "only the accepted record");
    let last = events.last().unwrap();
    assert_eq!((last.seq, last.actor), (seq, Some(me)));
    assert_eq!(last.change.kind(), "image-baked");
}
