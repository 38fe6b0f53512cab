//! The ledger, black-box: `kiln audit` shows who did what; `kiln audit
//! verify` catches an edited, deleted, inserted or reordered entry and a
//! truncation past a checkpoint, in an export and in the live database,
//! with nothing but the entries, the checkpoints and the public key.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::path::Path;
use std::time::Duration;

use util::*;

fn spec(port: u16, version: &str) -> String {
    format!(
        r#"
[images.app]
context = "app"
entrypoint = ["/bin/start.sh"]

[services.web]
image = "app"
replicas = 1
listen = "127.0.0.1:{port}"
env = {{ HELLO_VERSION = "{version}" }}
"#
    )
}

/// An agent that signs its ledger's head every 200 ms, with two releases
/// of `web` applied and the head signed.
fn ledger_with_releases() -> (Env, Agent) {
    let env = Env::new();
    let agent = Agent::start_with(&env, |c| {
        c.args(["--checkpoint-every", "200ms"]);
    });
    hello_app(&env.path("app"), "");
    let port = free_port();
    let path = env.path("kiln.toml");
    for v in ["v1", "v2"] {
        write(&path, spec(port, v).as_bytes());
        env.ok(&["apply", "-f", path.to_str().unwrap()]);
    }
    wait_for("the head signed", Duration::from_secs(20), || {
        let v = env.json(&["audit", "verify", "--json"]);
        v["signed_through"] == v["entries"]
    });
    (env, agent)
}

/// The entry lines of an export and the rest (header, checkpoints).
fn split(file: &Path) -> (String, Vec<String>, Vec<String>) {
    let text = std::fs::read_to_string(file).unwrap();
    let mut lines = text.lines().map(str::to_owned);
    let header = lines.next().unwrap();
    let (entries, checkpoints): (Vec<String>, Vec<String>) =
        lines.partition(|l| l.starts_with("{\"entry\""));
    (header, entries, checkpoints)
}

fn join(header: &str, entries: &[String], checkpoints: &[String]) -> String {
    let mut out = vec![header.to_owned()];
    out.extend_from_slice(entries);
    out.extend_from_slice(checkpoints);
    out.join("\n") + "\n"
}

#[test]
fn audit_shows_who_did_what_and_filters() {
    let (env, _agent) = ledger_with_releases();
    let all: Vec<serde_json::Value> = env
        .ok(&["audit", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let created: Vec<&serde_json::Value> = all
        .iter()
        .filter(|e| e["kind"] == "release-created")
        .collect();
    assert_eq!(created.len(), 2);
    let uid = rustix::process::getuid().as_raw();
    for e in &created {
        assert_eq!(e["actor"], format!("uid:{uid}"));
        assert_eq!(e["service"], "web");
    }
    // The bake the first apply made is recorded too: who baked which digest.
    let baked: Vec<&serde_json::Value> =
        all.iter().filter(|e| e["kind"] == "image-baked").collect();
    assert_eq!(baked.len(), 1, "{all:?}");
    assert_eq!(baked[0]["actor"], format!("uid:{uid}"));
    let detail: serde_json::Value =
        serde_json::from_str(baked[0]["detail"].as_str().unwrap()).unwrap();
    let digest = env.json(&["images", "--json"])[0]["digest"].clone();
    assert_eq!(detail["digest"], digest);
    assert_eq!(detail["image"], "app");
    let only = env.ok(&["audit", "web", "--kind", "release-created"]);
    assert_eq!(only.lines().count(), 3, "a header and two entries: {only}");
    assert!(env.ok(&["audit", "--since", "1h"]).lines().count() > 3);
    let none = env.ok(&["audit", "--since", "2099-01-01T00:00:00Z"]);
    assert_eq!(none.lines().count(), 1, "{none}");
    let err = env.fails(&["audit", "--since", "yesterday-ish"]);
    assert!(err.contains("--since"), "{err}");
}

#[test]
fn audit_verify_names_the_first_bad_entry_of_a_tampered_export() {
    let (env, _agent) = ledger_with_releases();
    let file = env.path("ledger.jsonl");
    env.ok(&["audit", "export", file.to_str().unwrap()]);
    let key = env.home.join("node.pub");
    let verify = |text: &str| -> String {
        let f = env.path("tampered.jsonl");
        std::fs::write(&f, text).unwrap();
        env.fails(&[
            "audit",
            "verify",
            f.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ])
    };
    let ok = env.ok(&[
        "audit",
        "verify",
        file.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert!(ok.contains("verified"), "{ok}");
    let (header, entries, checkpoints) = split(&file);
    assert!(entries.len() >= 6 && !checkpoints.is_empty());

    // Edited: entry 3's actor changed.
    let mut edited = entries.clone();
    let e3: serde_json::Value = serde_json::from_str(&edited[2]).unwrap();
    let actor = e3["entry"]["actor"].as_str().unwrap().to_owned();
    edited[2] = edited[2].replace(&format!("\"actor\":\"{actor}\""), "\"actor\":\"uid:4242\"");
    let err = verify(&join(&header, &edited, &checkpoints));
    assert!(err.contains("entry 3: edited"), "{err}");

    // Deleted: entry 4 gone.
    let mut deleted = entries.clone();
    deleted.remove(3);
    let err = verify(&join(&header, &deleted, &checkpoints));
    assert!(err.contains("entry 4: missing (deleted)"), "{err}");

    // Inserted: entry 2 again after itself.
    let mut inserted = entries.clone();
    inserted.insert(2, entries[1].clone());
    let err = verify(&join(&header, &inserted, &checkpoints));
    assert!(
        err.contains("entry 2:") && err.contains("inserted"),
        "{err}"
    );

    // Reordered: entries 4 and 5 swapped.
    let mut reordered = entries.clone();
    reordered.swap(3, 4);
    let err = verify(&join(&header, &reordered, &checkpoints));
    assert!(
        err.contains("entry 4:") && err.contains("reordered"),
        "{err}"
    );

    // Truncated past a checkpoint: the last two entries cut off.
    let cut = &entries[..entries.len() - 2];
    let err = verify(&join(&header, cut, &checkpoints));
    assert!(err.contains("cut off"), "{err}");
    assert!(
        err.contains(&format!("entry {}", entries.len() - 1)),
        "{err}"
    );

    // Another node's key, and a file that is not a key.
    let other = env.path("other.pub");
    write(&other, format!("ed25519 {}\n", "ab".repeat(32)).as_bytes());
    let err = env.fails(&[
        "audit",
        "verify",
        file.to_str().unwrap(),
        "--key",
        other.to_str().unwrap(),
    ]);
    assert!(err.contains("its header names the key"), "{err}");
    let err = env.fails(&[
        "audit",
        "verify",
        file.to_str().unwrap(),
        "--key",
        env.home.join("node.key").to_str().unwrap(),
    ]);
    assert!(err.contains("not a kiln public key"), "{err}");
    let garbage = env.path("garbage.jsonl");
    write(&garbage, b"{\"kiln_ledger\":1,\"key\":\"x\"}\nnot json\n");
    let err = env.fails(&[
        "audit",
        "verify",
        garbage.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert!(err.contains(":2: not a ledger line"), "{err}");
}

#[test]
fn audit_verify_catches_an_edit_in_the_live_database_and_older_exports_are_prefixes() {
    let (env, _agent) = ledger_with_releases();
    let old = env.path("old.jsonl");
    env.ok(&["audit", "export", old.to_str().unwrap()]);
    // More entries; the older export is a prefix of the ledger now.
    env.ok(&["rollback", "web"]);
    let out = env.ok(&[
        "audit",
        "verify",
        "--since-checkpoint",
        old.to_str().unwrap(),
    ]);
    assert!(out.contains("prefix"), "{out}");
    // Someone with the database file rewrites history under the triggers.
    let db = rusqlite::Connection::open(env.home.join("state.db")).unwrap();
    db.execute_batch(
        "DROP TRIGGER events_append_only_update; \
         UPDATE events SET actor = 'uid:4242' WHERE seq = 2;",
    )
    .unwrap();
    let err = env.fails(&["audit", "verify"]);
    assert!(err.contains("entry 2: edited"), "{err}");
    let err = env.fails(&[
        "audit",
        "verify",
        "--since-checkpoint",
        old.to_str().unwrap(),
    ]);
    assert!(err.contains("entry 2"), "{err}");
}

/// The rewrite the issue reproduced: an entry edited, every hash after it
/// recomputed, every checkpoint deleted — with the node's key in the
/// header, or another key put there. Both fail; `--allow-unsigned-tail`
/// makes the exception explicit (and still catches the swapped key).
#[test]
fn a_rewritten_export_stripped_of_its_checkpoints_fails() {
    let (env, _agent) = ledger_with_releases();
    let file = env.path("ledger.jsonl");
    env.ok(&["audit", "export", file.to_str().unwrap()]);
    let key = env.home.join("node.pub");
    let (header, lines, _checkpoints) = split(&file);
    let mut entries: Vec<kiln_core::ledger::Entry> = lines
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            serde_json::from_value(v["entry"].clone()).unwrap()
        })
        .collect();
    entries[2].actor = Some("uid:4242".into());
    let mut prev = kiln_core::ledger::GENESIS.to_owned();
    let rechained: Vec<String> = entries
        .into_iter()
        .map(|e| {
            let e = e.chained(&prev);
            prev = e.hash.clone();
            serde_json::json!({ "entry": e }).to_string()
        })
        .collect();
    let verify = |header: &str, extra: &[&str]| {
        let f = env.path("rewritten.jsonl");
        std::fs::write(&f, join(header, &rechained, &[])).unwrap();
        let mut args = vec![
            "audit",
            "verify",
            f.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        env.run(&args)
    };
    let out = verify(&header, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("entry 1:") && err.contains("covered by no checkpoint"),
        "{err}"
    );
    // The exception, made explicit: the chain itself is consistent.
    let out = verify(&header, &["--allow-unsigned-tail"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another key in the header: refused whatever the flags.
    let swapped = header.replace(
        std::fs::read_to_string(&key).unwrap().trim(),
        &format!("ed25519 {}", "cd".repeat(32)),
    );
    assert_ne!(swapped, header);
    let out = verify(&swapped, &["--allow-unsigned-tail"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("its header names the key"), "{err}");
}

/// The database edited while no agent ran: the agent finds the break at
/// start, says so (log, metric, a `ledger-broken` entry, `kiln audit`
/// first), and goes on serving.
#[test]
fn an_agent_started_on_an_edited_ledger_records_the_break_and_serves() {
    let env = Env::new();
    let metrics = free_port();
    let start = |env: &Env| {
        Agent::start_with(env, move |c| {
            c.args(["--checkpoint-every", "200ms"]);
            c.args(["--metrics", &format!("127.0.0.1:{metrics}")]);
        })
    };
    let mut agent = start(&env);
    hello_app(&env.path("app"), "");
    let port = free_port();
    let path = env.path("kiln.toml");
    write(&path, spec(port, "v1").as_bytes());
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    wait_for("the head signed", Duration::from_secs(20), || {
        let v = env.json(&["audit", "verify", "--json"]);
        v["signed_through"] == v["entries"]
    });
    agent.stop();
    let db = rusqlite::Connection::open(env.home.join("state.db")).unwrap();
    db.execute_batch(
        "DROP TRIGGER events_append_only_update; \
         UPDATE events SET actor = 'uid:4242' WHERE seq = 2;",
    )
    .unwrap();
    drop(db);

    let _agent = start(&env);
    // Still serving.
    wait_for("the service back", Duration::from_secs(20), || {
        http_get(port.into(), "/").is_some_and(|b| b.contains("hello"))
    });
    let broken = env.ok(&["audit", "--kind", "ledger-broken", "--json"]);
    assert_eq!(broken.lines().count(), 1, "{broken}");
    assert!(
        broken.contains("entry 2") || broken.contains("\\\"seq\\\":2"),
        "{broken}"
    );
    let shown = env.ok(&["audit"]);
    let first = shown.lines().next().unwrap();
    assert!(first.starts_with("LEDGER BROKEN: entry 2"), "{shown}");
    let m = http_get(metrics.into(), "/metrics").unwrap();
    assert!(m.contains("kiln_ledger_broken 1"), "{m}");
    let err = env.fails(&["audit", "verify"]);
    assert!(err.contains("entry 2: edited"), "{err}");
}

/// `kiln plan --exit-code`: 0 while what runs is the spec, 2 once the spec
/// on disk differs (for cron and CI); nothing applied either way.
#[test]
fn plan_exit_code_says_when_the_spec_differs_from_what_runs() {
    let (env, _agent) = ledger_with_releases();
    let path = env.path("kiln.toml");
    let plan = |env: &Env| {
        env.run(&["plan", "-f", path.to_str().unwrap(), "--exit-code"])
            .status
            .code()
    };
    assert_eq!(plan(&env), Some(0));
    let text = std::fs::read_to_string(&path).unwrap();
    write(&path, text.replace("\"v2\"", "\"v3\"").as_bytes());
    assert_eq!(plan(&env), Some(2));
    assert_eq!(releases(&env, "web").len(), 2, "a plan applies nothing");
    // Without --exit-code a plan with changes still exits 0.
    assert!(
        env.run(&["plan", "-f", path.to_str().unwrap()])
            .status
            .success()
    );
}

/// `kiln audit -f` keeps printing entries as they are added.
#[test]
fn audit_follow_prints_new_entries_as_they_come() {
    let (env, _agent) = ledger_with_releases();
    let mut follow = env
        .cmd()
        .args(["audit", "--json", "-f", "--kind", "rollback"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Nothing of that kind yet; then a rollback is made and shows up.
    assert!(rx.recv_timeout(Duration::from_millis(700)).is_err());
    env.ok(&["rollback", "web"]);
    let line = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["kind"], "rollback");
    assert_eq!(entry["service"], "web");
    let _ = follow.kill();
    let _ = follow.wait();
}
