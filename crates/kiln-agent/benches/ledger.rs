//! The ledger's cost (bench/ledger.sh): appending events to the real
//! SQLite state store with the chain (what the agent does) against the
//! same inserts into a plain table without it, in batches as the agent
//! writes them (one transaction each); then reading the whole ledger and
//! `kiln_core::ledger::verify` over it (entries per second).
//!
//!   ENTRIES=1000000 cargo bench -p kiln-agent --features bench --bench ledger

use std::time::Instant;

use kiln_agent::bench::{ClusterState, NewEvent, SqliteState, ready};
use kiln_core::event::{Actor, Change};
use kiln_core::spec::ServiceName;

fn main() {
    let entries: u64 = std::env::var("ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let web = ServiceName::try_from("web").expect("name");
    let event = |i: u64| {
        NewEvent::service(
            Change::InstanceExited {
                status: format!("exit status: {}", i % 3),
                requested: i.is_multiple_of(2),
            },
            &web,
            Some(i / 1000 + 1),
        )
        .by(Actor::Agent)
    };

    // The agent's way: each event its own transaction, chained.
    let state = SqliteState::open(&dir.path().join("state.db")).expect("open");
    let started = Instant::now();
    for i in 0..entries {
        ready(state.append_event(&event(i))).expect("append");
    }
    let chained = started.elapsed();

    // The same rows without the chain: a plain table with the real one's
    // index on kind (so the ratio is the chain's cost alone), one
    // transaction each.
    let plain = rusqlite::Connection::open(dir.path().join("plain.db")).expect("open");
    plain
        .execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; \
             CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT, kind TEXT, \
             service TEXT, revision INTEGER, instance TEXT, detail TEXT, actor TEXT); \
             CREATE INDEX events_by_kind ON events (kind, seq);",
        )
        .expect("schema");
    let started = Instant::now();
    for i in 0..entries {
        let e = event(i);
        plain
            .execute(
                "INSERT INTO events (time, kind, service, revision, instance, detail, actor) \
                 VALUES (?1, ?2, ?3, ?4, NULL, ?5, ?6)",
                rusqlite::params![
                    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
                    e.change.kind(),
                    "web",
                    e.revision.map(|r| r as i64),
                    serde_json::to_string(&e.change.detail()).unwrap_or_default(),
                    e.actor.to_string()
                ],
            )
            .expect("insert");
    }
    let unchained = started.elapsed();

    let started = Instant::now();
    let ledger = ready(state.ledger(0)).expect("read");
    let read = started.elapsed();
    let started = Instant::now();
    let v = kiln_core::ledger::verify(&ledger, &[], &[0; 32]).expect("a good ledger");
    let verify = started.elapsed();
    assert_eq!(v.entries, entries);

    let per = |d: std::time::Duration| d.as_secs_f64() * 1e6 / entries as f64;
    println!("entries: {entries}");
    println!(
        "append, chained (the agent's):   {:8.2} µs/event",
        per(chained)
    );
    println!(
        "append, plain table:             {:8.2} µs/event  (the chain costs {:.2}x)",
        per(unchained),
        chained.as_secs_f64() / unchained.as_secs_f64()
    );
    println!(
        "read the ledger:                 {:8.0} entries/s",
        entries as f64 / read.as_secs_f64()
    );
    println!(
        "verify the chain:                {:8.0} entries/s",
        entries as f64 / verify.as_secs_f64()
    );
}
