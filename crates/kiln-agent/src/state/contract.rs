//! The contract of [`StateStore`]: every implementation runs these same
//! tests (`contract_tests!` below, instantiated for SQLite and memory; etcd
//! will be the next). A behaviour the agent relies on belongs here, not in
//! one backend's tests.

use kiln_core::Digest;
use kiln_core::event::{Actor, Change};
use kiln_core::release::{Outcome, Release, ReleaseConfig, ServiceSettings};
use kiln_core::service::{HealthSpec, RolloutSpec, RuntimeKind, StopSpec};
use kiln_core::spec::ServiceName;

use super::{InstanceRecord, NewEvent, ServiceRecord, StateError, StateStore};

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
            rollout: RolloutSpec::default(),
            timeout: kiln_core::service::Duration::from_secs(30),
            router: Default::default(),
        },
        target,
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

pub(super) fn apply_records_release_service_and_events_together(state: &dyn StateStore) {
    let name = web();
    let svc = service(&name, 2, 1);
    let ev = event("release-created");
    state
        .record_apply(&svc, Some(&release(1)), std::slice::from_ref(&ev))
        .unwrap();
    // A duplicate revision fails, typed, and the whole apply with it.
    let mut svc2 = svc.clone();
    svc2.target = 9;
    let err = state
        .record_apply(&svc2, Some(&release(1)), std::slice::from_ref(&ev))
        .unwrap_err();
    assert!(
        matches!(err, StateError::ReleaseExists { revision: 1, .. }),
        "{err}"
    );
    assert_eq!(state.service(&name).unwrap().unwrap().target, 1);
    assert_eq!(state.events(0).unwrap().len(), 1);

    state
        .set_outcome(&name, 1, Outcome::Failed, Some("not ready"), &ev)
        .unwrap();
    let r = state.release(&name, 1).unwrap().unwrap();
    assert_eq!(
        (r.outcome, r.reason.as_deref()),
        (Outcome::Failed, Some("not ready"))
    );
    assert_eq!(r.config, release(1).config);
    assert_eq!(r.hash, release(1).hash);
    // An outcome without a reason keeps the reason it had.
    state
        .set_outcome(&name, 1, Outcome::Superseded, None, &ev)
        .unwrap();
    let r = state.release(&name, 1).unwrap().unwrap();
    assert_eq!(
        (r.outcome, r.reason.as_deref()),
        (Outcome::Superseded, Some("not ready"))
    );
    // Setting the outcome of a release that does not exist changes nothing
    // (and still records its event).
    state
        .set_outcome(&name, 99, Outcome::Active, None, &ev)
        .unwrap();
    assert!(state.release(&name, 99).unwrap().is_none());
    assert_eq!(state.events(0).unwrap().len(), 4);
}

pub(super) fn a_failed_rollout_and_its_rollback_are_one_change(state: &dyn StateStore) {
    let name = web();
    let mut svc = service(&name, 1, 1);
    let ev = event("x");
    state
        .record_apply(&svc, Some(&release(1)), std::slice::from_ref(&ev))
        .unwrap();
    svc.target = 2;
    state
        .record_apply(&svc, Some(&release(2)), std::slice::from_ref(&ev))
        .unwrap();
    // Release 2 went live (1 superseded), then crash-looped in its watch.
    state
        .set_outcome(&name, 2, Outcome::Active, None, &ev)
        .unwrap();
    state
        .set_outcome(&name, 1, Outcome::Superseded, None, &ev)
        .unwrap();
    state
        .fail_release(&name, 2, "crash loop", Some(1), &[ev.clone(), ev.clone()])
        .unwrap();
    assert_eq!(state.service(&name).unwrap().unwrap().target, 1);
    let r1 = state.release(&name, 1).unwrap().unwrap();
    assert_eq!(r1.outcome, Outcome::Active, "what runs again is active");
    let r2 = state.release(&name, 2).unwrap().unwrap();
    assert_eq!(
        (r2.outcome, r2.reason.as_deref()),
        (Outcome::Failed, Some("crash loop"))
    );
    assert_eq!(state.events(0).unwrap().len(), 6);
    // Without a release to return to, only the outcome changes.
    svc.target = 3;
    state
        .record_apply(&svc, Some(&release(3)), std::slice::from_ref(&ev))
        .unwrap();
    state.fail_release(&name, 3, "deadline", None, &[]).unwrap();
    assert_eq!(state.service(&name).unwrap().unwrap().target, 3);
}

pub(super) fn a_rollback_abandons_the_rollout_in_the_same_change(state: &dyn StateStore) {
    let name = web();
    let mut svc = service(&name, 1, 2);
    let ev = event("x");
    state
        .record_apply(&svc, Some(&release(1)), std::slice::from_ref(&ev))
        .unwrap();
    state
        .record_apply(&svc, Some(&release(2)), std::slice::from_ref(&ev))
        .unwrap();
    // A rollback whose release cannot be recorded (its revision is taken)
    // changes nothing: release 2 stays pending, the target too, no event.
    svc.target = 3;
    let err = state.record_rollback(
        &svc,
        &release(2),
        Some((2, "rolled back")),
        std::slice::from_ref(&ev),
    );
    assert!(
        matches!(err, Err(StateError::ReleaseExists { revision: 2, .. })),
        "{err:?}"
    );
    assert_eq!(state.service(&name).unwrap().unwrap().target, 2);
    assert_eq!(
        state.release(&name, 2).unwrap().unwrap().outcome,
        Outcome::Pending
    );
    assert_eq!(state.events(0).unwrap().len(), 2);
    state
        .record_rollback(&svc, &release(3), Some((2, "rolled back")), &[])
        .unwrap();
    assert_eq!(state.service(&name).unwrap().unwrap().target, 3);
    let r2 = state.release(&name, 2).unwrap().unwrap();
    assert_eq!(
        (r2.outcome, r2.reason.as_deref()),
        (Outcome::Failed, Some("rolled back"))
    );
}

pub(super) fn lists_come_in_order(state: &dyn StateStore) {
    let ev = event("x");
    for name in ["zeta", "alpha", "mid"] {
        let name = ServiceName::try_from(name).unwrap();
        state
            .record_apply(&service(&name, 1, 0), None, std::slice::from_ref(&ev))
            .unwrap();
    }
    let names: Vec<String> = state
        .services()
        .unwrap()
        .iter()
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(names, ["alpha", "mid", "zeta"]);
    // Settings are replaced whole by the next apply.
    let alpha = ServiceName::try_from("alpha").unwrap();
    state
        .record_apply(&service(&alpha, 5, 0), None, &[])
        .unwrap();
    assert_eq!(state.service(&alpha).unwrap().unwrap().settings.replicas, 5);
    assert_eq!(state.services().unwrap().len(), 3);
    // Releases by revision, whatever the order they were recorded in, and
    // only the service's own.
    let name = web();
    for rev in [3, 1, 2] {
        state
            .record_apply(&service(&name, 1, rev), Some(&release(rev)), &[])
            .unwrap();
    }
    let revs: Vec<u64> = state
        .releases(&name)
        .unwrap()
        .iter()
        .map(|r| r.revision)
        .collect();
    assert_eq!(revs, [1, 2, 3]);
    assert!(state.releases(&alpha).unwrap().is_empty());
    assert!(
        state
            .service(&ServiceName::try_from("none").unwrap())
            .unwrap()
            .is_none()
    );
}

pub(super) fn instances_are_put_replaced_and_removed_with_their_events(state: &dyn StateStore) {
    state
        .put_instance(&instance("web-r1-b", 1), &event("started"))
        .unwrap();
    state
        .put_instance(&instance("web-r1-a", 1), &event("started"))
        .unwrap();
    // Put again: replaced, not doubled.
    let mut moved = instance("web-r1-b", 1);
    moved.pid = 43;
    state.put_instance(&moved, &event("started")).unwrap();
    let all = state.instances().unwrap();
    assert_eq!(
        all.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        ["web-r1-a", "web-r1-b"]
    );
    assert_eq!(all[1], moved);
    state
        .remove_instance("web-r1-a", &event("stopped"))
        .unwrap();
    // Removing what is gone is no error.
    state
        .remove_instance("web-r1-a", &event("stopped"))
        .unwrap();
    assert_eq!(state.instances().unwrap(), [moved]);
    assert_eq!(state.events(0).unwrap().len(), 5);
}

pub(super) fn events_come_in_order_from_a_sequence_number(state: &dyn StateStore) {
    assert!(state.events(0).unwrap().is_empty());
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
            .unwrap();
        seqs.push(seq);
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let all = state.events(0).unwrap();
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
    let later = state.events(seqs[0]).unwrap();
    assert_eq!(later.iter().map(|e| e.seq).collect::<Vec<_>>(), &seqs[1..]);
    assert!(state.events(seqs[2]).unwrap().is_empty());
    // By kind: only those, in order.
    let kinds = [changes[2].kind(), changes[0].kind()];
    let of: Vec<u64> = state
        .events_of(&kinds)
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
    assert!(state.events_of(&["no-such-kind"]).unwrap().is_empty());
    assert!(state.events(u64::MAX).unwrap().is_empty());
}

pub(super) fn secrets_are_kept_by_digest_and_the_key_once(state: &dyn StateStore) {
    use kiln_core::secret::{Sealed, SecretValue};
    let key = state.secret_key([1; 32]).unwrap();
    assert_eq!(key, [1; 32]);
    assert_eq!(
        state.secret_key([2; 32]).unwrap(),
        key,
        "the first key stays"
    );
    let name = kiln_core::spec::EnvName::try_from("DB").unwrap();
    let (a, b) = (SecretValue::new("one"), SecretValue::new("two"));
    let (sa, sb) = (Sealed::seal(&key, &name, &a), Sealed::seal(&key, &name, &b));
    assert_eq!(state.secret(&sa).unwrap(), None);
    state.put_secrets(&[(sa.clone(), a.clone())]).unwrap();
    state
        .put_secrets(&[(sa.clone(), a.clone()), (sb.clone(), b.clone())])
        .unwrap();
    assert_eq!(state.secret(&sa).unwrap(), Some(a));
    assert_eq!(state.secret(&sb).unwrap(), Some(b));
}

pub(super) fn tokens_are_kept_once_by_name_and_revoked_with_their_events(state: &dyn StateStore) {
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
    assert_eq!(state.token(&name).unwrap(), None);
    assert!(state.put_token(&record, &made).unwrap());
    let other = TokenRecord {
        role: Role::Admin,
        ..record.clone()
    };
    assert!(
        !state.put_token(&other, &made).unwrap(),
        "the name is taken"
    );
    assert_eq!(state.token(&name).unwrap(), Some(record.clone()));
    assert_eq!(state.tokens().unwrap(), vec![record]);
    let revoked = NewEvent::node(Change::TokenRevoked { name }, Actor::Local { uid: 0 });
    assert!(state.revoke_token(&name, &revoked).unwrap());
    assert!(!state.revoke_token(&name, &revoked).unwrap());
    assert_eq!(state.token(&name).unwrap(), None);
    let kinds: Vec<_> = state
        .events(0)
        .unwrap()
        .into_iter()
        .map(|e| e.change.kind())
        .collect();
    assert_eq!(kinds, ["token-created", "token-revoked"]);
}

pub(super) fn every_event_is_chained_in_the_ledger(state: &dyn StateStore) {
    assert_eq!(state.head().unwrap(), None);
    let name = web();
    state
        .record_apply(&service(&name, 1, 1), Some(&release(1)), &[event("a")])
        .unwrap();
    state.append_event(&event("b")).unwrap();
    state
        .append_event(&event("c").by(Actor::Local { uid: 7 }))
        .unwrap();
    let entries = state.ledger(0).unwrap();
    let events = state.events(0).unwrap();
    assert_eq!(entries.len(), events.len());
    for (l, e) in entries.iter().zip(&events) {
        assert_eq!((l.seq, l.kind.as_str()), (e.seq, e.change.kind()));
        assert_eq!(l.time, e.time);
    }
    assert_eq!(entries[0].prev, kiln_core::ledger::GENESIS);
    // The chain checks out with no checkpoint; no key is needed for that.
    let v = kiln_core::ledger::verify(&entries, &[], &[0; 32]).unwrap();
    assert_eq!(v.entries, events.len() as u64);
    let head = state.head().unwrap().unwrap();
    assert_eq!(head, (v.entries, v.head.clone()));
    assert_eq!(state.ledger(1).unwrap(), entries[1..].to_vec());
    let cp = kiln_core::ledger::Checkpoint {
        seq: head.0,
        head: head.1,
        time: "t".into(),
        signature: "00".into(),
    };
    assert_eq!(state.last_checkpoint().unwrap(), None);
    state.put_checkpoint(&cp).unwrap();
    state.put_checkpoint(&cp).unwrap();
    assert_eq!(state.last_checkpoint().unwrap(), Some(cp.seq));
    assert_eq!(state.checkpoints().unwrap(), vec![cp]);
}

pub(super) fn a_removed_service_keeps_its_releases_and_events(state: &dyn StateStore) {
    let name = web();
    let ev = event("x");
    state
        .record_apply(
            &service(&name, 1, 1),
            Some(&release(1)),
            std::slice::from_ref(&ev),
        )
        .unwrap();
    state.remove_service(&name, &event("removed")).unwrap();
    assert_eq!(state.service(&name).unwrap(), None);
    assert!(state.services().unwrap().is_empty());
    assert_eq!(state.releases(&name).unwrap().len(), 1, "its history stays");
    assert_eq!(state.events(0).unwrap().len(), 2);
    // Applied again: a new record beside the old releases.
    state
        .record_apply(
            &service(&name, 1, 2),
            Some(&release(2)),
            std::slice::from_ref(&ev),
        )
        .unwrap();
    assert_eq!(state.service(&name).unwrap().unwrap().target, 2);
    assert_eq!(state.releases(&name).unwrap().len(), 2);
    let all: Vec<u64> = state
        .all_releases()
        .unwrap()
        .iter()
        .map(|r| r.revision)
        .collect();
    assert_eq!(all, [1, 2], "every release, removed service or not");
}

/// The current releases are the pending and active ones, the target and
/// the newest: not the superseded or failed history.
pub(super) fn current_releases_leave_the_history_out(state: &dyn StateStore) {
    let name = web();
    for rev in 1..=6 {
        state
            .record_apply(&service(&name, 1, rev), Some(&release(rev)), &[])
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
        state.set_outcome(&name, rev, outcome, None, &ev).unwrap();
    }
    let current = |state: &dyn StateStore| -> Vec<u64> {
        state
            .current_releases(&name)
            .unwrap()
            .iter()
            .map(|r| r.revision)
            .collect()
    };
    // 2 active, 6 pending (the target and the newest).
    assert_eq!(current(state), [2, 6]);
    // Back on 4 after 6 failed: the target (superseded) and the newest
    // (failed) stay current.
    state
        .set_outcome(&name, 6, Outcome::Failed, None, &ev)
        .unwrap();
    state
        .record_apply(&service(&name, 1, 4), None, &[])
        .unwrap();
    assert_eq!(current(state), [2, 4, 6]);
    let full = state.current_releases(&name).unwrap();
    assert_eq!(
        full[1],
        state.release(&name, 4).unwrap().unwrap(),
        "whole records"
    );
    assert!(
        state
            .current_releases(&ServiceName::try_from("none").unwrap())
            .unwrap()
            .is_empty()
    );
}

/// A saved rollout is kept with its service, survives an apply of the
/// service's settings, and goes with the service.
pub(super) fn a_rollout_is_kept_with_its_service(state: &dyn StateStore) {
    use kiln_core::rollout::{SavedRollout, SavedWatch};
    let name = web();
    assert_eq!(state.rollout(&name).unwrap(), None);
    // Nothing for a service that does not exist.
    let watching = SavedRollout::Watching {
        target: 2,
        watch: SavedWatch {
            back_to: 1,
            until_ms: 1_796_600_000_000,
        },
    };
    state.set_rollout(&name, &watching).unwrap();
    assert_eq!(state.rollout(&name).unwrap(), None);
    state
        .record_apply(&service(&name, 1, 1), Some(&release(1)), &[])
        .unwrap();
    assert_eq!(state.rollout(&name).unwrap(), None, "never saved");
    state.set_rollout(&name, &watching).unwrap();
    assert_eq!(state.rollout(&name).unwrap(), Some(watching.clone()));
    // An apply of its settings keeps it.
    state
        .record_apply(&service(&name, 3, 1), None, &[])
        .unwrap();
    assert_eq!(state.rollout(&name).unwrap(), Some(watching));
    state.set_rollout(&name, &SavedRollout::Idle).unwrap();
    assert_eq!(state.rollout(&name).unwrap(), Some(SavedRollout::Idle));
    state.remove_service(&name, &event("removed")).unwrap();
    assert_eq!(state.rollout(&name).unwrap(), None, "gone with the service");
}

/// The contract's tests for one implementation: `fresh` makes an empty
/// store (and whatever must live as long as it, e.g. its directory).
macro_rules! contract_tests {
    ($fresh:expr) => {
        #[test]
        fn apply_records_release_service_and_events_together() {
            let (_keep, state) = $fresh();
            $crate::state::contract::apply_records_release_service_and_events_together(&state);
        }
        #[test]
        fn a_failed_rollout_and_its_rollback_are_one_change() {
            let (_keep, state) = $fresh();
            $crate::state::contract::a_failed_rollout_and_its_rollback_are_one_change(&state);
        }
        #[test]
        fn a_rollback_abandons_the_rollout_in_the_same_change() {
            let (_keep, state) = $fresh();
            $crate::state::contract::a_rollback_abandons_the_rollout_in_the_same_change(&state);
        }
        #[test]
        fn lists_come_in_order() {
            let (_keep, state) = $fresh();
            $crate::state::contract::lists_come_in_order(&state);
        }
        #[test]
        fn instances_are_put_replaced_and_removed_with_their_events() {
            let (_keep, state) = $fresh();
            $crate::state::contract::instances_are_put_replaced_and_removed_with_their_events(
                &state,
            );
        }
        #[test]
        fn a_removed_service_keeps_its_releases_and_events() {
            let (_keep, state) = $fresh();
            $crate::state::contract::a_removed_service_keeps_its_releases_and_events(&state);
        }
        #[test]
        fn tokens_are_kept_once_by_name_and_revoked_with_their_events() {
            let (_keep, state) = $fresh();
            $crate::state::contract::tokens_are_kept_once_by_name_and_revoked_with_their_events(
                &state,
            );
        }
        #[test]
        fn every_event_is_chained_in_the_ledger() {
            let (_keep, state) = $fresh();
            $crate::state::contract::every_event_is_chained_in_the_ledger(&state);
        }
        #[test]
        fn secrets_are_kept_by_digest_and_the_key_once() {
            let (_keep, state) = $fresh();
            $crate::state::contract::secrets_are_kept_by_digest_and_the_key_once(&state);
        }
        #[test]
        fn current_releases_leave_the_history_out() {
            let (_keep, state) = $fresh();
            $crate::state::contract::current_releases_leave_the_history_out(&state);
        }
        #[test]
        fn a_rollout_is_kept_with_its_service() {
            let (_keep, state) = $fresh();
            $crate::state::contract::a_rollout_is_kept_with_its_service(&state);
        }
        #[test]
        fn events_come_in_order_from_a_sequence_number() {
            let (_keep, state) = $fresh();
            $crate::state::contract::events_come_in_order_from_a_sequence_number(&state);
        }
    };
}

pub(super) use contract_tests;

mod memory {
    super::contract_tests!(|| ((), crate::state::MemoryState::new()));
}
