//! The contract of [`ClusterState`] and [`NodeState`]: every implementation runs these same
//! tests (`contract_tests!` below, instantiated for SQLite, memory and etcd). A behaviour the agent relies on belongs here, not in
//! one backend's tests.

use kiln_core::Digest;
use kiln_core::event::{Actor, Change};
use kiln_core::release::{Outcome, Release, ReleaseConfig, ServiceSettings};
use kiln_core::service::{HealthSpec, RolloutSpec, RuntimeKind, StopSpec};
use kiln_core::spec::ServiceName;

use super::{ClusterState, Guard, InstanceRecord, NewEvent, NodeState, ServiceRecord, StateError};

pub(super) fn release(rev: u64) -> Release {
    let config = ReleaseConfig {
        image: Digest::of(b"i"),
        image_name: "hello".into(),
        command: vec!["/bin/hello".into()],
        workdir: kiln_core::spec::AbsolutePath::try_from("/").unwrap(),
        env: [(
            kiln_core::spec::EnvName::try_from("A").unwrap(),
            rev.to_string(),
        )]
        .into(),
        secrets: Default::default(),
        volumes: Default::default(),
        runtime: RuntimeKind::Process,
        user: None,
        resources: Default::default(),
        hooks: Default::default(),
        health: HealthSpec::default(),
        stop: StopSpec::default(),
    };
    Release::pending(web(), rev, config, "apply".into(), super::now())
}

pub(super) fn web() -> ServiceName {
    ServiceName::try_from("web").unwrap()
}

pub(super) fn service(name: &ServiceName, replicas: u32, target: u64) -> ServiceRecord {
    ServiceRecord {
        name: name.clone(),
        settings: ServiceSettings {
            replicas,
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

/// An event of `web`; `reason` tells events apart.
pub(super) fn event(reason: &str) -> NewEvent {
    NewEvent::service(
        Change::RolloutPaused {
            reason: reason.to_owned(),
        },
        &web(),
        None,
    )
}

fn instance(id: &str, revision: u64) -> InstanceRecord {
    InstanceRecord {
        id: id.to_owned(),
        service: web(),
        revision,
        slot: 0,
        pid: 42,
        start_ticks: 7,
        port: 8080,
    }
}

pub(super) async fn apply_records_release_service_and_events_together<
    S: ClusterState + NodeState,
>(
    state: &S,
) {
    let name = web();
    let svc = service(&name, 2, 1);
    let ev = event("release-created");
    state
        .record_apply(
            &svc,
            Some(&release(1)),
            std::slice::from_ref(&ev),
            Guard::NONE,
        )
        .await
        .unwrap();
    // A duplicate revision fails, typed, and the whole apply with it.
    let mut svc2 = svc.clone();
    svc2.target = 9;
    let err = state
        .record_apply(
            &svc2,
            Some(&release(1)),
            std::slice::from_ref(&ev),
            Guard::NONE,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, StateError::ReleaseExists { revision: 1, .. }),
        "{err}"
    );
    assert_eq!(state.service(&name).await.unwrap().unwrap().target, 1);
    assert_eq!(state.events(0).await.unwrap().len(), 1);

    state
        .set_outcome(
            &name,
            1,
            Outcome::Failed,
            Some("not ready"),
            &ev,
            Guard::NONE,
        )
        .await
        .unwrap();
    let r = state.release(&name, 1).await.unwrap().unwrap();
    assert_eq!(
        (r.outcome, r.reason.as_deref()),
        (Outcome::Failed, Some("not ready"))
    );
    assert_eq!(r.config, release(1).config);
    assert_eq!(r.hash, release(1).hash);
    // An outcome without a reason keeps the reason it had.
    state
        .set_outcome(&name, 1, Outcome::Superseded, None, &ev, Guard::NONE)
        .await
        .unwrap();
    let r = state.release(&name, 1).await.unwrap().unwrap();
    assert_eq!(
        (r.outcome, r.reason.as_deref()),
        (Outcome::Superseded, Some("not ready"))
    );
    // Setting the outcome of a release that does not exist changes nothing
    // (and still records its event).
    state
        .set_outcome(&name, 99, Outcome::Active, None, &ev, Guard::NONE)
        .await
        .unwrap();
    assert!(state.release(&name, 99).await.unwrap().is_none());
    assert_eq!(state.events(0).await.unwrap().len(), 4);
}

pub(super) async fn a_failed_rollout_and_its_rollback_are_one_change<
    S: ClusterState + NodeState,
>(
    state: &S,
) {
    let name = web();
    let mut svc = service(&name, 1, 1);
    let ev = event("x");
    state
        .record_apply(
            &svc,
            Some(&release(1)),
            std::slice::from_ref(&ev),
            Guard::NONE,
        )
        .await
        .unwrap();
    svc.target = 2;
    state
        .record_apply(
            &svc,
            Some(&release(2)),
            std::slice::from_ref(&ev),
            Guard::NONE,
        )
        .await
        .unwrap();
    // Release 2 went live (1 superseded), then crash-looped in its watch.
    state
        .set_outcome(&name, 2, Outcome::Active, None, &ev, Guard::NONE)
        .await
        .unwrap();
    state
        .set_outcome(&name, 1, Outcome::Superseded, None, &ev, Guard::NONE)
        .await
        .unwrap();
    state
        .fail_release(
            &name,
            2,
            "crash loop",
            Some(1),
            &[ev.clone(), ev.clone()],
            Guard::NONE,
        )
        .await
        .unwrap();
    assert_eq!(state.service(&name).await.unwrap().unwrap().target, 1);
    let r1 = state.release(&name, 1).await.unwrap().unwrap();
    assert_eq!(r1.outcome, Outcome::Active, "what runs again is active");
    let r2 = state.release(&name, 2).await.unwrap().unwrap();
    assert_eq!(
        (r2.outcome, r2.reason.as_deref()),
        (Outcome::Failed, Some("crash loop"))
    );
    assert_eq!(state.events(0).await.unwrap().len(), 6);
    // Without a release to return to, only the outcome changes.
    svc.target = 3;
    state
        .record_apply(
            &svc,
            Some(&release(3)),
            std::slice::from_ref(&ev),
            Guard::NONE,
        )
        .await
        .unwrap();
    state
        .fail_release(&name, 3, "deadline", None, &[], Guard::NONE)
        .await
        .unwrap();
    assert_eq!(state.service(&name).await.unwrap().unwrap().target, 3);
}

pub(super) async fn a_rollback_abandons_the_rollout_in_the_same_change<
    S: ClusterState + NodeState,
>(
    state: &S,
) {
    let name = web();
    let mut svc = service(&name, 1, 2);
    let ev = event("x");
    state
        .record_apply(
            &svc,
            Some(&release(1)),
            std::slice::from_ref(&ev),
            Guard::NONE,
        )
        .await
        .unwrap();
    state
        .record_apply(
            &svc,
            Some(&release(2)),
            std::slice::from_ref(&ev),
            Guard::NONE,
        )
        .await
        .unwrap();
    // A rollback whose release cannot be recorded (its revision is taken)
    // changes nothing: release 2 stays pending, the target too, no event.
    svc.target = 3;
    let err = state
        .record_rollback(
            &svc,
            &release(2),
            Some((2, "rolled back")),
            std::slice::from_ref(&ev),
            Guard::NONE,
        )
        .await;
    assert!(
        matches!(err, Err(StateError::ReleaseExists { revision: 2, .. })),
        "{err:?}"
    );
    assert_eq!(state.service(&name).await.unwrap().unwrap().target, 2);
    assert_eq!(
        state.release(&name, 2).await.unwrap().unwrap().outcome,
        Outcome::Pending
    );
    assert_eq!(state.events(0).await.unwrap().len(), 2);
    state
        .record_rollback(
            &svc,
            &release(3),
            Some((2, "rolled back")),
            &[],
            Guard::NONE,
        )
        .await
        .unwrap();
    assert_eq!(state.service(&name).await.unwrap().unwrap().target, 3);
    let r2 = state.release(&name, 2).await.unwrap().unwrap();
    assert_eq!(
        (r2.outcome, r2.reason.as_deref()),
        (Outcome::Failed, Some("rolled back"))
    );
}

pub(super) async fn lists_come_in_order<S: ClusterState + NodeState>(state: &S) {
    let ev = event("x");
    for name in ["zeta", "alpha", "mid"] {
        let name = ServiceName::try_from(name).unwrap();
        state
            .record_apply(
                &service(&name, 1, 0),
                None,
                std::slice::from_ref(&ev),
                Guard::NONE,
            )
            .await
            .unwrap();
    }
    let names: Vec<String> = state
        .services()
        .await
        .unwrap()
        .iter()
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(names, ["alpha", "mid", "zeta"]);
    // Settings are replaced whole by the next apply.
    let alpha = ServiceName::try_from("alpha").unwrap();
    state
        .record_apply(&service(&alpha, 5, 0), None, &[], Guard::NONE)
        .await
        .unwrap();
    assert_eq!(
        state
            .service(&alpha)
            .await
            .unwrap()
            .unwrap()
            .settings
            .replicas,
        5
    );
    assert_eq!(state.services().await.unwrap().len(), 3);
    // Releases by revision, whatever the order they were recorded in, and
    // only the service's own.
    let name = web();
    for rev in [3, 1, 2] {
        state
            .record_apply(
                &service(&name, 1, rev),
                Some(&release(rev)),
                &[],
                Guard::NONE,
            )
            .await
            .unwrap();
    }
    let revs: Vec<u64> = state
        .releases(&name)
        .await
        .unwrap()
        .iter()
        .map(|r| r.revision)
        .collect();
    assert_eq!(revs, [1, 2, 3]);
    assert!(state.releases(&alpha).await.unwrap().is_empty());
    assert!(
        state
            .service(&ServiceName::try_from("none").unwrap())
            .await
            .unwrap()
            .is_none()
    );
}

/// The node's own records: no event (the caller appends one to the
/// cluster's ledger), nothing of the cluster's state touched.
pub(super) async fn instances_are_put_replaced_and_removed<S: ClusterState + NodeState>(state: &S) {
    state.put_instance(&instance("web-r1-b", 1)).unwrap();
    state.put_instance(&instance("web-r1-a", 1)).unwrap();
    // Put again: replaced, not doubled.
    let mut moved = instance("web-r1-b", 1);
    moved.pid = 43;
    state.put_instance(&moved).unwrap();
    let all = state.instances().unwrap();
    assert_eq!(
        all.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        ["web-r1-a", "web-r1-b"]
    );
    assert_eq!(all[1], moved);
    state.remove_instance("web-r1-a").unwrap();
    // Removing what is gone is no error.
    state.remove_instance("web-r1-a").unwrap();
    assert_eq!(state.instances().unwrap(), [moved]);
    assert!(state.events(0).await.unwrap().is_empty());
    assert!(state.services().await.unwrap().is_empty());
}

pub(super) async fn events_come_in_order_from_a_sequence_number<S: ClusterState + NodeState>(
    state: &S,
) {
    assert!(state.events(0).await.unwrap().is_empty());
    let mut seqs = Vec::new();
    let changes = [
        Change::InstanceReady {},
        Change::ReleaseSuperseded { by: 2 },
        Change::InstanceStarted {
            pid: 7,
            port: 8080,
            slot: 1,
        },
    ];
    for (i, change) in changes.iter().enumerate() {
        let seq = state
            .append_event(&NewEvent {
                change: change.clone(),
                actor: if i == 1 {
                    Actor::Local { uid: 1000 }
                } else {
                    Actor::Agent
                },
                service: (i == 1).then(web),
                revision: (i == 2).then_some(7),
                instance: (i == 0).then(|| "web-r7-x".to_owned()),
            })
            .await
            .unwrap();
        seqs.push(seq);
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let all = state.events(0).await.unwrap();
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), seqs);
    assert_eq!(
        all.iter().map(|e| e.change.clone()).collect::<Vec<_>>(),
        changes,
        "each change comes back as it was, typed"
    );
    assert_eq!(
        all.iter().map(|e| e.actor).collect::<Vec<_>>(),
        [
            Some(Actor::Agent),
            Some(Actor::Local { uid: 1000 }),
            Some(Actor::Agent)
        ]
    );
    assert_eq!(all[0].instance.as_deref(), Some("web-r7-x"));
    assert_eq!(all[1].service.as_deref(), Some("web"));
    assert_eq!(all[2].revision, Some(7));
    assert!(
        all.iter()
            .all(|e| humantime::parse_rfc3339(&e.time).is_ok())
    );
    // After a sequence number: only what came later.
    let later = state.events(seqs[0]).await.unwrap();
    assert_eq!(later.iter().map(|e| e.seq).collect::<Vec<_>>(), &seqs[1..]);
    assert!(state.events(seqs[2]).await.unwrap().is_empty());
    // By kind: only those, in order.
    let kinds = [changes[2].kind(), changes[0].kind()];
    let of: Vec<u64> = state
        .events_of(&kinds)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    let want: Vec<u64> = all
        .iter()
        .filter(|e| kinds.contains(&e.change.kind()))
        .map(|e| e.seq)
        .collect();
    assert_eq!(of, want);
    assert!(!want.is_empty());
    assert!(state.events_of(&["no-such-kind"]).await.unwrap().is_empty());
    assert!(state.events(u64::MAX).await.unwrap().is_empty());
}

pub(super) async fn secrets_are_kept_by_digest_and_the_key_once<S: ClusterState + NodeState>(
    state: &S,
) {
    use kiln_core::secret::{Sealed, SecretValue};
    let key = state.secret_key([1; 32]).await.unwrap();
    assert_eq!(key, [1; 32]);
    assert_eq!(
        state.secret_key([2; 32]).await.unwrap(),
        key,
        "the first key stays"
    );
    let name = kiln_core::spec::EnvName::try_from("DB").unwrap();
    let (a, b) = (SecretValue::new("one"), SecretValue::new("two"));
    let (sa, sb) = (Sealed::seal(&key, &name, &a), Sealed::seal(&key, &name, &b));
    assert_eq!(state.secret(&sa).await.unwrap(), None);
    state.put_secrets(&[(sa.clone(), a.clone())]).await.unwrap();
    state
        .put_secrets(&[(sa.clone(), a.clone()), (sb.clone(), b.clone())])
        .await
        .unwrap();
    assert_eq!(state.secret(&sa).await.unwrap(), Some(a));
    assert_eq!(state.secret(&sb).await.unwrap(), Some(b));
}

pub(super) async fn a_drained_node_is_kept_until_undrained_with_its_events<
    S: ClusterState + NodeState,
>(
    state: &S,
) {
    let drain = |node: &str, drained: bool| {
        NewEvent::node(
            Change::NodeDrain {
                node: node.to_owned(),
                drained,
            },
            Actor::Agent,
        )
    };
    assert!(state.drained().await.unwrap().is_empty());
    assert!(
        state
            .set_drained("n2", true, &drain("n2", true))
            .await
            .unwrap()
    );
    assert!(
        state
            .set_drained("n3", true, &drain("n3", true))
            .await
            .unwrap()
    );
    // Drained already: nothing changes, nothing is recorded.
    assert!(
        !state
            .set_drained("n2", true, &drain("n2", true))
            .await
            .unwrap()
    );
    assert_eq!(
        state
            .drained()
            .await
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        ["n2", "n3"]
    );
    assert!(
        state
            .set_drained("n2", false, &drain("n2", false))
            .await
            .unwrap()
    );
    assert!(
        !state
            .set_drained("n2", false, &drain("n2", false))
            .await
            .unwrap()
    );
    assert_eq!(
        state
            .drained()
            .await
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        ["n3"]
    );
    let kinds: Vec<(bool, String)> = state
        .events_of(&["node-drain"])
        .await
        .unwrap()
        .into_iter()
        .map(|e| match e.change {
            Change::NodeDrain { node, drained } => (drained, node),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            (true, "n2".to_owned()),
            (true, "n3".to_owned()),
            (false, "n2".to_owned())
        ]
    );
}

pub(super) async fn a_paused_service_is_kept_until_resumed_with_its_events<
    S: ClusterState + NodeState,
>(
    state: &S,
) {
    let web = ServiceName::try_from("web").unwrap();
    let api = ServiceName::try_from("api").unwrap();
    let event = |name: &ServiceName, t: Option<u64>| {
        let change = match t {
            Some(timeout_ms) => Change::ServicePaused { timeout_ms },
            None => Change::ServiceResumed {},
        };
        NewEvent {
            actor: Actor::Agent,
            ..NewEvent::service(change, name, None)
        }
    };
    assert!(state.paused().await.unwrap().is_empty());
    assert!(
        state
            .set_paused(&web, Some(30_000), &event(&web, Some(30_000)))
            .await
            .unwrap()
    );
    assert!(
        state
            .set_paused(&api, Some(5_000), &event(&api, Some(5_000)))
            .await
            .unwrap()
    );
    // The same again: nothing changes, nothing recorded; a new timeout does.
    assert!(
        !state
            .set_paused(&web, Some(30_000), &event(&web, Some(30_000)))
            .await
            .unwrap()
    );
    assert!(
        state
            .set_paused(&web, Some(1_000), &event(&web, Some(1_000)))
            .await
            .unwrap()
    );
    assert_eq!(
        state
            .paused()
            .await
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        [(api.clone(), 5_000), (web.clone(), 1_000)]
    );
    assert!(
        state
            .set_paused(&web, None, &event(&web, None))
            .await
            .unwrap()
    );
    assert!(
        !state
            .set_paused(&web, None, &event(&web, None))
            .await
            .unwrap()
    );
    assert_eq!(
        state
            .paused()
            .await
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        [(api, 5_000)]
    );
    let seen: Vec<(Option<String>, String)> = state
        .events_of(&["service-paused", "service-resumed"])
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.service, e.change.kind().to_owned()))
        .collect();
    let w = Some("web".to_owned());
    assert_eq!(
        seen,
        [
            (w.clone(), "service-paused".to_owned()),
            (Some("api".to_owned()), "service-paused".to_owned()),
            (w.clone(), "service-paused".to_owned()),
            (w, "service-resumed".to_owned()),
        ]
    );
}

pub(super) async fn tokens_are_kept_once_by_name_and_revoked_with_their_events<
    S: ClusterState + NodeState,
>(
    state: &S,
) {
    use kiln_core::auth::{Role, TokenName, TokenRecord};
    let name = TokenName::try_from("ci").unwrap();
    let record = TokenRecord {
        name,
        role: Role::Deployer,
        hash: "ab".repeat(32),
        created: 5,
        expires: Some(9),
    };
    let made = NewEvent::node(
        Change::TokenCreated {
            name,
            role: Role::Deployer,
            expires: Some(9),
        },
        Actor::Local { uid: 0 },
    );
    assert_eq!(state.token(&name).await.unwrap(), None);
    assert!(state.put_token(&record, &made).await.unwrap());
    let other = TokenRecord {
        role: Role::Admin,
        ..record.clone()
    };
    assert!(
        !state.put_token(&other, &made).await.unwrap(),
        "the name is taken"
    );
    assert_eq!(state.token(&name).await.unwrap(), Some(record.clone()));
    assert_eq!(state.tokens().await.unwrap(), vec![record]);
    let revoked = NewEvent::node(Change::TokenRevoked { name }, Actor::Local { uid: 0 });
    assert!(state.revoke_token(&name, &revoked).await.unwrap());
    assert!(!state.revoke_token(&name, &revoked).await.unwrap());
    assert_eq!(state.token(&name).await.unwrap(), None);
    let kinds: Vec<_> = state
        .events(0)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.change.kind())
        .collect();
    assert_eq!(kinds, ["token-created", "token-revoked"]);
}

pub(super) async fn every_event_is_chained_in_the_ledger<S: ClusterState + NodeState>(state: &S) {
    assert_eq!(state.head().await.unwrap(), None);
    let name = web();
    state
        .record_apply(
            &service(&name, 1, 1),
            Some(&release(1)),
            &[event("a")],
            Guard::NONE,
        )
        .await
        .unwrap();
    state.append_event(&event("b")).await.unwrap();
    state
        .append_event(&event("c").by(Actor::Local { uid: 7 }))
        .await
        .unwrap();
    let entries = state.ledger(0).await.unwrap();
    let events = state.events(0).await.unwrap();
    assert_eq!(entries.len(), events.len());
    for (l, e) in entries.iter().zip(&events) {
        assert_eq!((l.seq, l.kind.as_str()), (e.seq, e.change.kind()));
        assert_eq!(l.time, e.time);
    }
    assert_eq!(entries[0].prev, kiln_core::ledger::GENESIS);
    // The chain checks out with no checkpoint; no key is needed for that.
    let v = kiln_core::ledger::verify(&entries, &[], &[0; 32]).unwrap();
    assert_eq!(v.entries, events.len() as u64);
    let head = state.head().await.unwrap().unwrap();
    assert_eq!(head, (v.entries, v.head.clone()));
    assert_eq!(state.ledger(1).await.unwrap(), entries[1..].to_vec());
    let cp = kiln_core::ledger::Checkpoint {
        seq: head.0,
        head: head.1,
        time: "t".into(),
        signature: "00".into(),
    };
    assert_eq!(state.last_checkpoint().await.unwrap(), None);
    state.put_checkpoint(&cp).await.unwrap();
    state.put_checkpoint(&cp).await.unwrap();
    assert_eq!(state.last_checkpoint().await.unwrap(), Some(cp.seq));
    assert_eq!(state.checkpoints().await.unwrap(), vec![cp]);
}

pub(super) async fn a_removed_service_keeps_its_releases_and_events<S: ClusterState + NodeState>(
    state: &S,
) {
    let name = web();
    let ev = event("x");
    state
        .record_apply(
            &service(&name, 1, 1),
            Some(&release(1)),
            std::slice::from_ref(&ev),
            Guard::NONE,
        )
        .await
        .unwrap();
    state
        .remove_service(&name, &event("removed"), Guard::NONE)
        .await
        .unwrap();
    assert_eq!(state.service(&name).await.unwrap(), None);
    assert!(state.services().await.unwrap().is_empty());
    assert_eq!(
        state.releases(&name).await.unwrap().len(),
        1,
        "its history stays"
    );
    assert_eq!(state.events(0).await.unwrap().len(), 2);
    // Applied again: a new record beside the old releases.
    state
        .record_apply(
            &service(&name, 1, 2),
            Some(&release(2)),
            std::slice::from_ref(&ev),
            Guard::NONE,
        )
        .await
        .unwrap();
    assert_eq!(state.service(&name).await.unwrap().unwrap().target, 2);
    assert_eq!(state.releases(&name).await.unwrap().len(), 2);
    let all: Vec<u64> = state
        .all_releases()
        .await
        .unwrap()
        .iter()
        .map(|r| r.revision)
        .collect();
    assert_eq!(all, [1, 2], "every release, removed service or not");
}

/// The current releases are the pending and active ones, the target and
/// the newest: not the superseded or failed history.
pub(super) async fn current_releases_leave_the_history_out<S: ClusterState + NodeState>(state: &S) {
    let name = web();
    for rev in 1..=6 {
        state
            .record_apply(
                &service(&name, 1, rev),
                Some(&release(rev)),
                &[],
                Guard::NONE,
            )
            .await
            .unwrap();
    }
    let ev = event("outcomes");
    for (rev, outcome) in [
        (1, Outcome::Superseded),
        (2, Outcome::Active),
        (3, Outcome::Failed),
        (4, Outcome::Superseded),
        (5, Outcome::Failed),
    ] {
        state
            .set_outcome(&name, rev, outcome, None, &ev, Guard::NONE)
            .await
            .unwrap();
    }
    let current = async || -> Vec<u64> {
        state
            .current_releases(&name)
            .await
            .unwrap()
            .iter()
            .map(|r| r.revision)
            .collect()
    };
    // 2 active, 6 pending (the target and the newest).
    assert_eq!(current().await, [2, 6]);
    // Back on 4 after 6 failed: the target (superseded) and the newest
    // (failed) stay current.
    state
        .set_outcome(&name, 6, Outcome::Failed, None, &ev, Guard::NONE)
        .await
        .unwrap();
    state
        .record_apply(&service(&name, 1, 4), None, &[], Guard::NONE)
        .await
        .unwrap();
    assert_eq!(current().await, [2, 4, 6]);
    let full = state.current_releases(&name).await.unwrap();
    assert_eq!(
        full[1],
        state.release(&name, 4).await.unwrap().unwrap(),
        "whole records"
    );
    assert!(
        state
            .current_releases(&ServiceName::try_from("none").unwrap())
            .await
            .unwrap()
            .is_empty()
    );
}

/// A saved rollout is kept with its service, survives an apply of the
/// service's settings, and goes with the service.
pub(super) async fn a_rollout_is_kept_with_its_service<S: ClusterState + NodeState>(state: &S) {
    use kiln_core::rollout::{SavedRollout, SavedWatch};
    let name = web();
    assert_eq!(state.rollout(&name).await.unwrap(), None);
    // Nothing for a service that does not exist.
    let watching = SavedRollout::Watching {
        target: 2,
        watch: SavedWatch {
            back_to: 1,
            until_ms: 1_796_600_000_000,
        },
    };
    state
        .set_rollout(&name, &watching, Guard::NONE)
        .await
        .unwrap();
    assert_eq!(state.rollout(&name).await.unwrap(), None);
    state
        .record_apply(&service(&name, 1, 1), Some(&release(1)), &[], Guard::NONE)
        .await
        .unwrap();
    assert_eq!(state.rollout(&name).await.unwrap(), None, "never saved");
    state
        .set_rollout(&name, &watching, Guard::NONE)
        .await
        .unwrap();
    assert_eq!(state.rollout(&name).await.unwrap(), Some(watching.clone()));
    // An apply of its settings keeps it.
    state
        .record_apply(&service(&name, 3, 1), None, &[], Guard::NONE)
        .await
        .unwrap();
    assert_eq!(state.rollout(&name).await.unwrap(), Some(watching));
    state
        .set_rollout(&name, &SavedRollout::Idle, Guard::NONE)
        .await
        .unwrap();
    assert_eq!(
        state.rollout(&name).await.unwrap(),
        Some(SavedRollout::Idle)
    );
    state
        .remove_service(&name, &event("removed"), Guard::NONE)
        .await
        .unwrap();
    assert_eq!(
        state.rollout(&name).await.unwrap(),
        None,
        "gone with the service"
    );
}

/// A service's version moves with each change of what it runs (an apply,
/// a rollback, an automatic return), not with outcomes or saved rollouts;
/// a change conditional on a version read before another writer's change
/// is refused, typed, with nothing written.
pub(super) async fn two_writers_racing_one_wins<S: ClusterState + NodeState>(state: &S) {
    let name = web();
    // Absent reads as version 0: creating is conditional on it too.
    state
        .record_apply(
            &service(&name, 1, 1),
            Some(&release(1)),
            &[event("a")],
            Guard::version(0),
        )
        .await
        .unwrap();
    let v1 = state.service(&name).await.unwrap().unwrap().version;
    assert!(v1 > 0);
    // Neither an outcome nor a saved rollout is a change of the version.
    state
        .set_outcome(&name, 1, Outcome::Active, None, &event("b"), Guard::NONE)
        .await
        .unwrap();
    state
        .set_rollout(&name, &kiln_core::rollout::SavedRollout::Idle, Guard::NONE)
        .await
        .unwrap();
    assert_eq!(state.service(&name).await.unwrap().unwrap().version, v1);
    // Two writers read v1 and race: the first wins, the second is refused.
    let (svc2, svc3) = (service(&name, 2, 2), service(&name, 3, 3));
    let (rel2, rel3) = (release(2), release(3));
    let (ev2, ev3) = ([event("first")], [event("second")]);
    let (a, b) = tokio::join!(
        state.record_apply(&svc2, Some(&rel2), &ev2, Guard::version(v1)),
        state.record_apply(&svc3, Some(&rel3), &ev3, Guard::version(v1)),
    );
    let (won, lost) = match (a, b) {
        (Ok(()), Err(e)) => (2, e),
        (Err(e), Ok(())) => (3, e),
        other => panic!("exactly one writer wins: {other:?}"),
    };
    assert!(
        matches!(&lost, StateError::Conflict { expected, found, .. } if *expected == v1 && *found > v1),
        "{lost}"
    );
    let now = state.service(&name).await.unwrap().unwrap();
    assert_eq!((now.target, now.settings.replicas), (won, won as u32));
    let loser = if won == 2 { 3 } else { 2 };
    assert!(
        state.release(&name, loser).await.unwrap().is_none(),
        "nothing of the loser"
    );
    assert_eq!(
        state.events(0).await.unwrap().len(),
        3,
        "no event of the loser"
    );
    // An automatic return moves the version; a rollback and a removal are
    // conditional like an apply.
    let v2 = now.version;
    state
        .fail_release(&name, won, "x", Some(1), &[event("failed")], Guard::NONE)
        .await
        .unwrap();
    let v3 = state.service(&name).await.unwrap().unwrap().version;
    assert!(v3 > v2);
    let err = state
        .record_rollback(
            &service(&name, 1, 9),
            &release(9),
            None,
            &[event("r")],
            Guard::version(v2),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::Conflict { .. }), "{err}");
    let err = state
        .remove_service(&name, &event("rm"), Guard::version(v2))
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::Conflict { .. }), "{err}");
    state
        .remove_service(&name, &event("rm"), Guard::version(v3))
        .await
        .unwrap();
    assert!(state.service(&name).await.unwrap().is_none());
}

/// Each leadership's fence is larger than the last; a write under an
/// older one is refused, typed, with nothing written.
pub(super) async fn a_stale_fence_is_refused<S: ClusterState + NodeState>(state: &S) {
    let name = web();
    state
        .record_apply(
            &service(&name, 1, 1),
            Some(&release(1)),
            &[event("a")],
            Guard::NONE,
        )
        .await
        .unwrap();
    let old = state.lead().await.unwrap();
    let new = state.lead().await.unwrap();
    assert!(new > old);
    let events = state.events(0).await.unwrap().len();
    let stale = Guard::fence(old);
    for err in [
        state
            .set_outcome(&name, 1, Outcome::Active, None, &event("late"), stale)
            .await
            .unwrap_err(),
        state
            .fail_release(&name, 1, "late", None, &[event("late")], stale)
            .await
            .unwrap_err(),
        state
            .set_rollout(&name, &kiln_core::rollout::SavedRollout::Idle, stale)
            .await
            .unwrap_err(),
        state
            .record_apply(&service(&name, 5, 1), None, &[event("late")], stale)
            .await
            .unwrap_err(),
    ] {
        assert!(
            matches!(err, StateError::Fenced { fence, newest } if fence == old && newest == new),
            "{err}"
        );
    }
    assert_eq!(
        state.events(0).await.unwrap().len(),
        events,
        "nothing written"
    );
    assert_eq!(
        state.release(&name, 1).await.unwrap().unwrap().outcome,
        Outcome::Pending
    );
    assert_eq!(state.rollout(&name).await.unwrap(), None);
    assert_eq!(
        state
            .service(&name)
            .await
            .unwrap()
            .unwrap()
            .settings
            .replicas,
        1
    );
    // The newest leadership writes.
    state
        .set_outcome(
            &name,
            1,
            Outcome::Active,
            None,
            &event("ok"),
            Guard::fence(new),
        )
        .await
        .unwrap();
    assert_eq!(
        state.release(&name, 1).await.unwrap().unwrap().outcome,
        Outcome::Active
    );
}

/// A watch answers with what was written after its sequence number: at
/// once when some was written meanwhile (a watcher that fell behind
/// resumes where it was, missing nothing), else as soon as the next is.
pub(super) async fn a_watch_resumes_after_a_gap<S: ClusterState + NodeState>(state: &S) {
    for r in ["a", "b", "c"] {
        state.append_event(&event(r)).await.unwrap();
    }
    let seen = state.watch(0).await.unwrap();
    assert_eq!(seen.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
    // A gap: written while nobody watched.
    state.append_event(&event("d")).await.unwrap();
    state
        .record_apply(
            &service(&web(), 1, 1),
            Some(&release(1)),
            &[event("e")],
            Guard::NONE,
        )
        .await
        .unwrap();
    let resumed = state.watch(3).await.unwrap();
    assert_eq!(resumed.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
    assert_eq!(resumed[1].change, event("e").change);
    // Nothing after 5 yet: the watch waits for the next write.
    let (woken, ()) = tokio::join!(state.watch(5), async {
        tokio::task::yield_now().await;
        state.append_event(&event("f")).await.unwrap();
    });
    assert_eq!(
        woken.unwrap().iter().map(|e| e.seq).collect::<Vec<_>>(),
        [6]
    );
    // A write that fails wakes nobody with nothing.
    let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), state.watch(6)).await;
    assert!(waiting.is_err(), "no event after 6: the watch still waits");
}

/// The leader's assignments (with its rollout, in one change) and what
/// each node observed are kept with their service, and go with it.
pub(super) async fn node_keys_are_listed_once<S: ClusterState + NodeState>(state: &S) {
    assert!(state.node_keys().await.unwrap().is_empty());
    state.put_node_key("n2", "ed25519 bb").await.unwrap();
    state.put_node_key("n1", "ed25519 aa").await.unwrap();
    // Listed already: stays under its first node's name.
    state.put_node_key("n3", "ed25519 aa").await.unwrap();
    assert_eq!(
        state.node_keys().await.unwrap(),
        [
            ("ed25519 aa".to_owned(), "n1".to_owned()),
            ("ed25519 bb".to_owned(), "n2".to_owned())
        ]
    );
}

pub(super) async fn assignments_and_observations_are_kept_with_their_service<
    S: ClusterState + NodeState,
>(
    state: &S,
) {
    use super::Assigned;
    use kiln_core::rollout::assign::{Assignment, Observation};
    use kiln_core::rollout::{Routing, SavedRollout};
    let name = web();
    let assigned = |id: &str, node: &str| Assignment {
        id: id.to_owned(),
        node: node.to_owned(),
        revision: 1,
        slot: 0,
        adopted: false,
        stop: None,
        resources: Default::default(),
    };
    let seen = |id: &str| Observation {
        id: id.to_owned(),
        revision: 1,
        slot: 0,
        stopping: false,
        ready_since_ms: Some(7),
        live: true,
        adopted: false,
        stale: false,
        gone: None,
        refused: false,
        port: 4242,
    };
    // Nothing for a service that does not exist.
    state
        .assign(&name, &[assigned("a", "n1")], None, None, Guard::NONE)
        .await
        .unwrap();
    state.publish(&name, "n1", &[seen("a")]).await.unwrap();
    assert_eq!(state.assignments(&name).await.unwrap(), None);
    assert!(state.observations(&name).await.unwrap().is_empty());
    state
        .record_apply(&service(&name, 2, 1), Some(&release(1)), &[], Guard::NONE)
        .await
        .unwrap();
    assert_eq!(
        state.assignments(&name).await.unwrap(),
        None,
        "never written"
    );
    let fence = state.lead().await.unwrap();
    let list = [assigned("a", "n1"), assigned("b", "n2")];
    state
        .assign(
            &name,
            &list,
            None,
            Some(&SavedRollout::Idle),
            Guard::fence(fence),
        )
        .await
        .unwrap();
    assert_eq!(
        state.assignments(&name).await.unwrap(),
        Some(Assigned {
            list: list.to_vec(),
            routing: None
        })
    );
    assert_eq!(
        state.rollout(&name).await.unwrap(),
        Some(SavedRollout::Idle)
    );
    // The routing goes with the assignments, read together.
    let split = Routing::Split {
        stable: 1,
        canary: 2,
        weight: 25,
    };
    state
        .assign(&name, &list, Some(split), None, Guard::fence(fence))
        .await
        .unwrap();
    assert_eq!(
        state.assignments(&name).await.unwrap().unwrap().routing,
        Some(split)
    );
    for routing in [Routing::Release(2), Routing::Any, split] {
        state
            .assign(&name, &list, Some(routing), None, Guard::fence(fence))
            .await
            .unwrap();
        assert_eq!(
            state.assignments(&name).await.unwrap().unwrap().routing,
            Some(routing)
        );
    }
    // Without a rollout (or a routing), the saved one stays; a deposed
    // leader writes nothing.
    state
        .assign(&name, &list[..1], None, None, Guard::fence(fence))
        .await
        .unwrap();
    assert_eq!(
        state.rollout(&name).await.unwrap(),
        Some(SavedRollout::Idle)
    );
    state.lead().await.unwrap();
    let err = state
        .assign(&name, &[], Some(Routing::Any), None, Guard::fence(fence))
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::Fenced { .. }), "{err}");
    assert_eq!(
        state.assignments(&name).await.unwrap(),
        Some(Assigned {
            list: list[..1].to_vec(),
            routing: Some(split)
        })
    );
    // Each node's observations replace its own.
    state.publish(&name, "n2", &[seen("b")]).await.unwrap();
    state
        .publish(&name, "n1", &[seen("a"), seen("c")])
        .await
        .unwrap();
    state.publish(&name, "n1", &[seen("a")]).await.unwrap();
    let ids = |o: Vec<Observation>| o.into_iter().map(|o| o.id).collect::<Vec<_>>();
    let now = state.observations(&name).await.unwrap();
    assert_eq!(now[0], seen("a"), "kept whole, its port with it");
    // Each node's counters replace its own, by release.
    let counted = |n: u64| {
        let mut s = kiln_core::counters::Snapshot::default();
        s.responses[1] = n;
        s.buckets[3] = n;
        std::collections::BTreeMap::from([(1, s), (2, s)])
    };
    state
        .publish_counters(&name, "n1", &counted(5))
        .await
        .unwrap();
    state
        .publish_counters(&name, "n2", &counted(7))
        .await
        .unwrap();
    state
        .publish_counters(&name, "n1", &counted(9))
        .await
        .unwrap();
    assert_eq!(
        state.counters(&name).await.unwrap(),
        std::collections::BTreeMap::from([
            ("n1".to_owned(), counted(9)),
            ("n2".to_owned(), counted(7))
        ])
    );
    assert_eq!(ids(now), ["a", "b"]);
    assert!(
        state
            .observations(&ServiceName::try_from("other").unwrap())
            .await
            .unwrap()
            .is_empty()
    );
    state
        .remove_service(&name, &event("removed"), Guard::NONE)
        .await
        .unwrap();
    assert_eq!(state.assignments(&name).await.unwrap(), None);
    assert!(state.observations(&name).await.unwrap().is_empty());
    assert!(state.counters(&name).await.unwrap().is_empty());
    // Nothing for a service that does not exist.
    state
        .publish_counters(&name, "n1", &counted(1))
        .await
        .unwrap();
    assert!(state.counters(&name).await.unwrap().is_empty());
}

/// The contract's tests for one implementation: `fresh` makes an empty
/// store (and whatever must live as long as it, e.g. its directory).
macro_rules! contract_tests {
    ($fresh:expr) => {
        #[tokio::test]
        async fn apply_records_release_service_and_events_together() {
            let (_keep, state) = $fresh().await;
            $crate::state::contract::apply_records_release_service_and_events_together(&state)
                .await;
        }
        #[tokio::test]
        async fn a_failed_rollout_and_its_rollback_are_one_change() {
            let (_keep, state) = $fresh().await;
            $crate::state::contract::a_failed_rollout_and_its_rollback_are_one_change(&state).await;
        }
        #[tokio::test]
        async fn a_rollback_abandons_the_rollout_in_the_same_change() {
            let (_keep, state) = $fresh().await;
            $crate::state::contract::a_rollback_abandons_the_rollout_in_the_same_change(&state)
                .await;
        }
        #[tokio::test]
        async fn lists_come_in_order() {
            let (_keep, state) = $fresh().await;
            $crate::state::contract::lists_come_in_order(&state).await;
        }
        #[tokio::test]
        async fn instances_are_put_replaced_and_removed() {
            let (_keep, state) = $fresh().await;
            $crate::state::contract::instances_are_put_replaced_and_removed(&state).await;
        }
        #[tokio::test]
        async fn a_removed_service_keeps_its_releases_and_events() {
            let (_keep, state) = $fresh().await;
            $crate::state::contract::a_removed_service_keeps_its_releases_and_events(&state).await;
        }
        #[tokio::test]
        async fn a_drained_node_is_kept_until_undrained_with_its_events() {
            let (_keep, state) = $fresh().await;
            $crate::state::contract::a_drained_node_is_kept_until_undrained_with_its_events(&state)
                .await;
        }
        #[tokio::test]
        async fn a_paused_service_is_kept_until_resumed_with_its_events() {
            let (_keep, state) = $fresh().await;
            $crate::state::contract::a_paused_service_is_kept_until_resumed_with_its_events(&state)
                .await;
        }
        #[tokio::test]
        async fn tokens_are_kept_once_by_name_and_revoked_with_their_events() {
            let (_keep, state) = $fresh().await;
            $crate::state::contract::tokens_are_kept_once_by_name_and_revoked_with_their_events(
                &state,
            )
            .await;
        }
        #[tokio::test]
        async fn every_event_is_chained_in_the_ledger() {
            let (_keep, state) = $fresh().await;
            $crate::state::contract::every_event_is_chained_in_the_ledger(&state).await;
        }
        #[tokio::test]
        async fn secrets_are_kept_by_digest_and_the_key_once() {
            let (_keep, state) = $fresh().await;
            $crate::state::contract::secrets_are_kept_by_digest_and_the_key_once(&state).await;
        }
        #[tokio::test]
        async fn current_releases_leave_the_history_out() {
            let (_keep, state) = $fresh().await;
            $crate::state::contract::current_releases_leave_the_history_out(&state).await;
        }
        #[tokio::test]
        async fn a_rollout_is_kept_with_its_service() {
            let (_keep, state) = $fresh().await;
            $crate::state::contract::a_rollout_is_kept_with_its_service(&state).await;
        }
        #[tokio::test]
        async fn two_writers_racing_one_wins() {
            let (_keep, state) = $fresh().await;
            $crate::state::contract::two_writers_racing_one_wins(&state).await;
        }
        #[tokio::test]
        async fn a_stale_fence_is_refused() {
            let (_keep, state) = $fresh().await;
            $crate::state::contract::a_stale_fence_is_refused(&state).await;
        }
        #[tokio::test]
        async fn a_watch_resumes_after_a_gap() {
            let (_keep, state) = $fresh().await;
            $crate::state::contract::a_watch_resumes_after_a_gap(&state).await;
        }
        #[tokio::test]
        async fn assignments_and_observations_are_kept_with_their_service() {
            let (_keep, state) = $fresh().await;
            $crate::state::contract::assignments_and_observations_are_kept_with_their_service(
                &state,
            )
            .await;
        }
        #[tokio::test]
        async fn node_keys_are_listed_once() {
            let (_keep, state) = $fresh().await;
            $crate::state::contract::node_keys_are_listed_once(&state).await;
        }
        #[tokio::test]
        async fn events_come_in_order_from_a_sequence_number() {
            let (_keep, state) = $fresh().await;
            $crate::state::contract::events_come_in_order_from_a_sequence_number(&state).await;
        }
    };
}

pub(super) use contract_tests;

mod memory {
    async fn fresh() -> ((), crate::state::MemoryState) {
        ((), crate::state::MemoryState::new())
    }
    super::contract_tests!(fresh);
}
