//! Drift, black-box: a file edited in a running image's tree is found by
//! the watch, the tree is made again from the blobs and the instances are
//! replaced under load with no failed request, the ledger naming the file;
//! a change made while no agent ran is found by the full verification; an
//! instance whose environment is changed in memory is replaced.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use util::*;

/// A hello service with a static page, `replicas` instances on `port`.
fn spec(env: &Env, port: u16, replicas: u32) -> PathBuf {
    spec_on(env, port, replicas, "")
}

/// The same, with `extra` lines in `[services.web]`.
fn spec_on(env: &Env, port: u16, replicas: u32, extra: &str) -> PathBuf {
    let app = env.path("app");
    hello_app(&app, "");
    write(&app.join("static/page.html"), b"original page\n");
    let spec = env.path("kiln.toml");
    write(
        &spec,
        format!(
            "[images.app]\ncontext = \"app\"\nentrypoint = [\"/bin/start.sh\"]\n\n\
             [services.web]\nimage = \"app\"\nlisten = \"127.0.0.1:{port}\"\nreplicas = {replicas}\n{extra}\n\
             [services.web.env]\nGREETING = \"hello-from-the-release\"\n"
        )
        .as_bytes(),
    );
    spec
}

fn instance_ids(env: &Env) -> BTreeSet<String> {
    service_status(env, "web")["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect()
}

fn ready_ids(env: &Env) -> BTreeSet<String> {
    service_status(env, "web")["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|i| i["ready"] == true)
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The ledger's entries of `kind`, as `kiln audit --json` prints them
/// (each detail, kept as the exact JSON text chained, parsed).
fn audit(env: &Env, kind: &str) -> Vec<serde_json::Value> {
    let out = env.ok(&["audit", "--kind", kind, "--json"]);
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut e: serde_json::Value = serde_json::from_str(l).unwrap();
            let detail = serde_json::from_str(e["detail"].as_str().unwrap()).unwrap();
            e["detail"] = detail;
            e
        })
        .collect()
}

/// The tree of the image `web` runs.
fn rootfs(env: &Env) -> PathBuf {
    let image = releases(env, "web")[0]["config"]["image"]
        .as_str()
        .unwrap()
        .to_owned();
    let hex = image.trim_start_matches("sha256:");
    env.home.join("trees").join(hex).join("rootfs")
}

fn edit(file: &Path, content: &[u8]) {
    chmod(file, 0o644);
    std::fs::write(file, content).unwrap();
}

#[test]
fn a_file_edited_in_a_running_tree_gets_its_instances_replaced_under_load() {
    let env = Env::new();
    let metrics = free_port();
    let mut agent = Agent::start_with(&env, |c| {
        c.args([
            "--verify-every",
            "1h",
            "--metrics",
            &format!("127.0.0.1:{metrics}"),
        ]);
    });
    let port = free_port();
    let spec = spec(&env, port, 2);
    env.ok(&["apply", "-f", spec.to_str().unwrap()]);
    wait_for("2 ready instances", Duration::from_secs(30), || {
        ready_ids(&env).len() == 2
    });
    let before = instance_ids(&env);
    assert_eq!(
        http_get(port.into(), "/static/page.html").as_deref(),
        Some("original page\n")
    );
    let drift = env.json(&["drift", "--json"]);
    assert!(drift["watching"]["trees"].as_u64().unwrap() >= 1, "{drift}");
    assert_eq!(drift["findings"], serde_json::json!([]), "{drift}");

    let load = Load::start(port, 4);
    std::thread::sleep(Duration::from_millis(300));
    let page = rootfs(&env).join("static/page.html");
    edit(&page, b"tampered\n");
    wait_for(
        "the drift recorded and both instances replaced",
        Duration::from_secs(30),
        || {
            let ready = ready_ids(&env);
            !audit(&env, "tree-drift").is_empty()
                && ready.len() == 2
                && ready.is_disjoint(&before)
                && instance_ids(&env).is_disjoint(&before)
        },
    );
    std::thread::sleep(Duration::from_millis(300));
    let count = load.finish();
    count.assert_none_failed();
    assert!(count.ok > 100, "{count:?}");

    // The ledger names the file and how it differed.
    let found = audit(&env, "tree-drift");
    assert_eq!(found.len(), 1, "{found:?}");
    let detail = &found[0]["detail"];
    assert_eq!(detail["found_by"], "watch", "{detail}");
    assert_eq!(detail["repaired"], true, "{detail}");
    assert_eq!(detail["services"], serde_json::json!(["web"]));
    assert_eq!(
        detail["files"],
        serde_json::json!([{"path": "static/page.html", "how": "content changed"}]),
        "{detail}"
    );
    // The old instances stopped as drifted; the fresh ones serve the
    // image's page, and the tree is the image's again.
    let stopping = audit(&env, "instance-stopping");
    let drifted: BTreeSet<String> = stopping
        .iter()
        .filter(|e| e["detail"]["reason"].as_str().unwrap().contains("drifted"))
        .map(|e| e["instance"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(drifted, before);
    assert_eq!(
        http_get(port.into(), "/static/page.html").as_deref(),
        Some("original page\n")
    );
    assert_eq!(std::fs::read(&page).unwrap(), b"original page\n");
    // The drifted tree is kept for inspection.
    let quarantine = env.home.join(detail["quarantine"].as_str().unwrap());
    assert_eq!(
        std::fs::read(quarantine.join("rootfs/static/page.html")).unwrap(),
        b"tampered\n"
    );
    // Still release 1: drift makes no release.
    assert_eq!(releases(&env, "web").len(), 1);
    let text = env.ok(&["drift", "web"]);
    assert!(
        text.contains("static/page.html content changed") && text.contains("replaced"),
        "{text}"
    );
    let m = http_get(metrics.into(), "/metrics").unwrap();
    for want in [
        "kiln_drift_detected_total{kind=\"tree\"} 1\n",
        "kiln_drift_files_total 1\n",
        "kiln_drift_instances_replaced_total 2\n",
        "kiln_drift_watched_trees 1\n",
    ] {
        assert!(m.contains(want), "{want}: {m}");
    }
    let err = env.fails(&["drift", "nope"]);
    assert!(err.contains("nope"), "{err}");

    // A change made while no agent runs has no event: the full
    // verification at start finds it.
    let page = rootfs(&env).join("static/page.html");
    agent.stop();
    edit(&page, b"changed while stopped\n");
    let _agent = Agent::start_with(&env, |c| {
        c.args(["--verify-every", "1h"]);
    });
    wait_for(
        "the verification's finding",
        Duration::from_secs(30),
        || audit(&env, "tree-drift").len() == 2,
    );
    let found = audit(&env, "tree-drift");
    assert_eq!(found[1]["detail"]["found_by"], "verification", "{found:?}");
    wait_for("the page restored", Duration::from_secs(30), || {
        http_get(port.into(), "/static/page.html").as_deref() == Some("original page\n")
            && ready_ids(&env).len() == 2
    });
    let drift = env.json(&["drift", "--json"]);
    assert_eq!(drift["findings"].as_array().unwrap().len(), 2, "{drift}");
    assert!(
        drift["verification"]["files"].as_u64().unwrap() > 0,
        "{drift}"
    );
}

/// Overwrite `from` with `to` (same length) in the environment block of
/// process `pid`, through `/proc/PID/mem`: what someone with root (or a
/// debugger) can do to a running process.
fn poke_environ(pid: u64, from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // proc(5): env_start and env_end are fields 50 and 51 (1-based); the
    // fields after the command name start at field 3.
    let env_start: u64 = fields[50 - 3].parse().unwrap();
    let env_end: u64 = fields[51 - 3].parse().unwrap();
    let mut mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .unwrap();
    mem.seek(SeekFrom::Start(env_start)).unwrap();
    let mut block = vec![0; (env_end - env_start) as usize];
    mem.read_exact(&mut block).unwrap();
    let at = block
        .windows(from.len())
        .position(|w| w == from)
        .expect("the variable in the environment block");
    mem.seek(SeekFrom::Start(env_start + at as u64)).unwrap();
    mem.write_all(to).unwrap();
}

#[test]
fn an_instance_whose_environment_changes_in_memory_is_replaced() {
    // Sandboxed: the process checked is bubblewrap, as kiln started it.
    config_drift_on("", false);
    // A plain process: its entrypoint script `exec`s the app, which is not
    // drift; how it looks once ready is what must not change.
    config_drift_on("runtime = \"process\"", false);
}

/// Inside the sandbox, the app itself is watched too (not only bubblewrap,
/// as kiln started it): its environment changed in memory is drift.
#[test]
fn the_app_inside_a_sandbox_is_watched_too() {
    config_drift_on("", true);
}

fn config_drift_on(runtime: &str, poke_app: bool) {
    let env = Env::new();
    let _agent = Agent::start_with(&env, |c| {
        c.args(["--verify-every", "1h", "--allow-runtime", "process"]);
    });
    let port = free_port();
    let spec = spec_on(&env, port, 1, runtime);
    env.ok(&["apply", "-f", spec.to_str().unwrap()]);
    wait_for("a ready instance", Duration::from_secs(30), || {
        ready_ids(&env).len() == 1
    });
    let inst = service_status(&env, "web")["instances"][0].clone();
    let (id, pid) = (
        inst["id"].as_str().unwrap().to_owned(),
        inst["pid"].as_u64().unwrap(),
    );
    // Nothing differs while it runs as launched.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(audit(&env, "config-drift").is_empty());
    let pid = if poke_app { sandbox_app(pid) } else { pid };
    poke_environ(
        pid,
        b"GREETING=hello-from-the-release",
        b"GREETING=HELLO-FROM-SOMEONE-ELS",
    );
    wait_for("the instance replaced", Duration::from_secs(30), || {
        let ready = ready_ids(&env);
        ready.len() == 1 && !ready.contains(&id) && !instance_ids(&env).contains(&id)
    });
    let found = audit(&env, "config-drift");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["instance"], id.as_str());
    assert_eq!(
        found[0]["detail"]["differs"],
        serde_json::json!(["environment: GREETING changed"])
    );
    // Names only: neither value is in the ledger or in `kiln drift`.
    let ledger = env.ok(&["audit", "--json"]);
    assert!(!ledger.contains("SOMEONE"), "{ledger}");
    let text = env.ok(&["drift"]);
    assert!(
        text.contains("environment: GREETING changed") && text.contains(&id),
        "{text}"
    );
    assert!(
        !text.contains("SOMEONE") && !text.contains("hello-from"),
        "{text}"
    );
}

/// A drift made within a tree's repair back-off (just after a repair) is
/// recorded when it is seen, not only at the deferred check: undone before
/// that, it still leaves its ledger entry.
#[test]
fn a_drift_undone_within_the_repair_back_off_is_still_recorded() {
    let env = Env::new();
    let _agent = Agent::start_with(&env, |c| {
        c.args(["--verify-every", "1h"]);
    });
    let port = free_port();
    let spec = spec(&env, port, 1);
    env.ok(&["apply", "-f", spec.to_str().unwrap()]);
    let page = rootfs(&env).join("static/page.html");
    let mode = std::fs::metadata(&page).unwrap().permissions();
    edit(&page, b"first edit\n");
    wait_for("the first repair", Duration::from_secs(20), || {
        audit(&env, "tree-drift")
            .iter()
            .any(|e| e["detail"]["repaired"] == true)
    });
    // The fresh tree drifts again at once, within its back-off...
    let page = rootfs(&env).join("static/page.html");
    edit(&page, b"second edit\n");
    wait_for("the deferred finding", Duration::from_secs(20), || {
        audit(&env, "tree-drift").iter().any(|e| {
            e["detail"]["repaired"] == false
                && e["detail"]["error"]
                    .as_str()
                    .is_some_and(|m| m.contains("within its repair back-off"))
        })
    });
    // ...and is undone before the deferred check: the entry stays.
    std::fs::write(&page, b"original page\n").unwrap();
    std::fs::set_permissions(&page, mode).unwrap();
    let found = audit(&env, "tree-drift");
    let deferred = found
        .iter()
        .find(|e| e["detail"]["repaired"] == false)
        .unwrap();
    let files = deferred["detail"]["files"].to_string();
    assert!(files.contains("static/page.html"), "{deferred}");
}
