//! Black-box tests of the agent (`kiln serve`) and the commands that talk to
//! it, with real processes and real bubblewrap.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use util::{
    Agent, Env, actors_of, alive, hello_app, http_get, my_uid, processes_mentioning, releases,
    require, service_status, wait_for, write,
};

const WEB: &str = r#"
[images.app]
include = ["bin"]
entrypoint = ["/bin/start.sh"]

[services.web]
image = "app"
replicas = 2
volumes = { data = "/data" }
env = { HELLO_VERSION = "v1" }
[services.web.health.readiness]
http = "/healthz"
interval = "200ms"
"#;

fn apply(env: &Env, spec: &std::path::Path) -> String {
    env.ok(&["apply", "-f", spec.to_str().unwrap()])
}

fn instances(s: &Value) -> Vec<Value> {
    s["instances"].as_array().cloned().unwrap_or_default()
}

/// Every service the agent knows, from `kiln status --json`.
fn service_status_all(env: &Env) -> Vec<Value> {
    let v: Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    v["services"].as_array().cloned().unwrap_or_default()
}

fn converged(env: &Env, name: &str, revision: u64) -> bool {
    let s = service_status(env, name);
    s["converged"] == true && s["revision"] == revision
}

#[test]
fn instances_run_sandboxed_read_only_and_serve() {
    let env = Env::new();
    let spec = hello_app(
        &env.path("app"),
        &WEB.replace(
            "HELLO_VERSION = \"v1\"",
            "HELLO_VERSION = \"v1\", TRY_ROOT_WRITE = \"1\"",
        ),
    );
    let _agent = Agent::start(&env);
    apply(&env, &spec);
    let s = service_status(&env, "web");
    assert_eq!(s["ready"], 2);
    assert_eq!(s["outcome"], "active");
    for i in instances(&s) {
        assert_eq!(i["runtime"], "sandbox");
        assert_eq!(i["read_only_root"], true);
        assert_eq!(i["state"], "running");
        assert!(alive(i["pid"].as_u64().unwrap()));
        let body = http_get(i["port"].as_u64().unwrap(), "/").unwrap();
        assert_eq!(
            body,
            format!("hello from v1 (instance {})\n", i["id"].as_str().unwrap())
        );
    }
    // The write to the image's root failed with EROFS, and nothing landed in the tree.
    let logs = env.ok(&["logs", "web"]);
    assert!(
        logs.contains("root write refused") && logs.contains("Read-only file system"),
        "{logs}"
    );
    assert!(!logs.contains("ROOT-WRITABLE"), "{logs}");
    let trees = fs::read_dir(env.home.join("trees"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect::<Vec<_>>();
    assert!(
        trees
            .iter()
            .all(|t| !t.join("rootfs/bin/written-by-instance").exists())
    );
    assert!(
        env.ok(&["verify"]).starts_with("ok:"),
        "trees still match their manifests"
    );
}

#[test]
fn a_killed_instance_is_replaced_with_a_new_id_and_its_volume_survives() {
    let env = Env::new();
    let spec = hello_app(
        &env.path("app"),
        &WEB.replace("replicas = 2", "replicas = 1"),
    );
    let _agent = Agent::start(&env);
    apply(&env, &spec);
    let before = instances(&service_status(&env, "web"))[0].clone();
    let pid = before["pid"].as_u64().unwrap();
    assert!(
        std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    wait_for("a ready replacement", Duration::from_secs(20), || {
        let s = service_status(&env, "web");
        let i = instances(&s);
        i.len() == 1 && i[0]["id"] != before["id"] && i[0]["ready"] == true
    });
    let after = instances(&service_status(&env, "web"))[0].clone();
    assert_eq!(after["slot"], before["slot"]);
    assert_eq!(
        after["revision"], before["revision"],
        "replaced by the same release"
    );
    assert_eq!(after["replacements"], 1);
    assert_ne!(after["pid"], before["pid"]);
    // Nothing of the killed instance is left: a sandbox's reaper (and the
    // app under it) in a session of its own ends with it.
    let home = env.home.to_str().unwrap().to_owned();
    require("bwrap");
    // An outer bwrap and its reaper per sandboxed instance.
    let per_instance = 2;
    wait_for(
        "only the replacement's processes",
        Duration::from_secs(10),
        || processes_mentioning(&home).len() == per_instance,
    );
    // The volume kept what the first instance wrote, and the replacement added to it.
    let data = fs::read_to_string(env.home.join("volumes/web/data/instances")).unwrap();
    let lines: Vec<&str> = data.lines().collect();
    assert_eq!(
        lines,
        [
            before["id"].as_str().unwrap(),
            after["id"].as_str().unwrap()
        ]
    );
    // The history did not change: replacement is not a release.
    assert_eq!(
        env.json(&["history", "web", "--json"])["releases"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn a_crash_looping_release_backs_off() {
    let env = Env::new();
    let spec = hello_app(
        &env.path("app"),
        &WEB.replace("replicas = 2", "replicas = 1").replace(
            "env = { HELLO_VERSION = \"v1\" }",
            "env = { HELLO_CRASH_AFTER = \"0.05\" }",
        ),
    );
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", spec.to_str().unwrap(), "--detach"]);
    // The first crash is replaced at once; then the waits double.
    wait_for(
        "a back-off of at least 500 ms",
        Duration::from_secs(30),
        || {
            let s = service_status(&env, "web");
            s["backoff"]
                .as_array()
                .is_some_and(|b| b.iter().any(|b| b["failures"].as_u64() >= Some(3)))
        },
    );
    let s = service_status(&env, "web");
    let b = &s["backoff"][0];
    assert!(b["retry_in_ms"].as_u64().unwrap() > 0, "{s}");
    assert!(s["message"].as_str().unwrap().contains("exited"), "{s}");
    // Without a previous release to return to, a crash loop is retried (until
    // the deadline, 60 s here), not failed.
    assert_ne!(s["outcome"], "failed");
    let events = fs::read_dir(env.home.join("logs/web")).unwrap().count();
    assert!(
        events >= 3,
        "each attempt was a new instance with its own log"
    );
}

#[test]
fn liveness_failure_replaces_the_instance() {
    let env = Env::new();
    let spec = hello_app(
        &env.path("app"),
        &(WEB
            .replace("replicas = 2", "replicas = 1")
            .replace(
                "env = { HELLO_VERSION = \"v1\" }",
                "env = { HELLO_FAIL_HEALTH = \"1\" }",
            )
            .replace("http = \"/healthz\"", "tcp = true")
            + "[services.web.health.liveness]\nhttp = \"/healthz\"\ninterval = \"100ms\"\nfailure_threshold = 2\n"),
    );
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", spec.to_str().unwrap(), "--detach"]);
    let first = {
        let mut id = Value::Null;
        wait_for("a first instance", Duration::from_secs(20), || {
            id = instances(&service_status(&env, "web"))
                .first()
                .map_or(Value::Null, |i| i["id"].clone());
            !id.is_null()
        });
        id
    };
    wait_for("the liveness replacement", Duration::from_secs(20), || {
        instances(&service_status(&env, "web"))
            .iter()
            .any(|i| i["id"] != first && i["replacements"].as_u64() >= Some(1))
    });
    // The replacement may be in status before the first instance has
    // finished stopping (drained, then signalled): its last line comes then.
    let mut logs = String::new();
    wait_for(
        "the first instance's exit in its log",
        Duration::from_secs(20),
        || {
            logs = env.ok(&["logs", "web", "--instance", first.as_str().unwrap()]);
            logs.contains("exited")
        },
    );
    assert!(logs.contains("as asked"), "stopped by kiln: {logs}");
}

#[test]
fn a_changed_env_var_is_a_new_release_and_an_unchanged_spec_is_none() {
    let env = Env::new();
    let spec = hello_app(&env.path("app"), WEB);
    let _agent = Agent::start(&env);
    apply(&env, &spec);
    let again = apply(&env, &spec);
    assert_eq!(again.trim(), "no changes");
    let history = env.json(&["history", "web", "--json"]);
    assert_eq!(history["releases"].as_array().unwrap().len(), 1);

    write(
        &spec,
        WEB.replace("HELLO_VERSION = \"v1\"", "HELLO_VERSION = \"v2\"")
            .as_bytes(),
    );
    let plan = env.ok(&["plan", "-f", spec.to_str().unwrap()]);
    assert!(
        plan.contains("web: new release 2") && plan.contains("env changed: HELLO_VERSION"),
        "{plan}"
    );
    assert!(
        !plan.contains("v2"),
        "plans name env keys, not values: {plan}"
    );
    assert_eq!(
        env.json(&["history", "web", "--json"])["releases"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "plan changes nothing"
    );
    apply(&env, &spec);
    let h = env.json(&["history", "web", "--json"]);
    let releases = h["releases"].as_array().unwrap();
    assert_eq!(releases.len(), 2);
    assert_eq!(releases[0]["outcome"], "superseded");
    assert_eq!(releases[1]["outcome"], "active");
    assert_eq!(releases[1]["config"]["env"]["HELLO_VERSION"], "v2");
    assert_ne!(releases[0]["hash"], releases[1]["hash"]);
    let s = service_status(&env, "web");
    assert!(
        instances(&s)
            .iter()
            .all(|i| i["revision"] == 2 || (i["revision"] == 1 && s["warm"] == true)),
        "old instances are gone, or kept warm through the watch: {s}"
    );
    assert_eq!(s["routed"], 2, "only release 2 has the traffic: {s}");
    for i in instances(&s).iter().filter(|i| i["revision"] == 2) {
        assert!(
            http_get(i["port"].as_u64().unwrap(), "/")
                .unwrap()
                .starts_with("hello from v2")
        );
    }
    // Scaling is a settings change, not a release.
    write(
        &spec,
        WEB.replace("HELLO_VERSION = \"v1\"", "HELLO_VERSION = \"v2\"")
            .replace("replicas = 2", "replicas = 3")
            .as_bytes(),
    );
    let out = apply(&env, &spec);
    assert!(
        out.contains("settings") && out.contains("replicas 2 -> 3"),
        "{out}"
    );
    assert!(converged(&env, "web", 2));
    assert_eq!(service_status(&env, "web")["ready"], 3);
    assert_eq!(
        env.json(&["history", "web", "--json"])["releases"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn sigterm_stops_every_instance_and_exits_0() {
    let env = Env::new();
    let spec = hello_app(&env.path("app"), WEB);
    let mut agent = Agent::start(&env);
    apply(&env, &spec);
    let pids: Vec<u64> = instances(&service_status(&env, "web"))
        .iter()
        .map(|i| i["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(agent.stop(), Some(0));
    for pid in pids {
        assert!(!alive(pid), "instance {pid} outlived the agent");
    }
    assert!(!env.home.join("kiln.sock").exists());
    // A new agent on the same home starts the service again.
    let _agent = Agent::start(&env);
    wait_for("the service back", Duration::from_secs(20), || {
        converged(&env, "web", 1)
    });
}

#[test]
fn a_second_agent_on_the_same_home_refuses_naming_the_first() {
    let env = Env::new();
    let agent = Agent::start(&env);
    let err = env.fails(&["serve"]);
    assert!(
        err.contains(&format!(
            "another agent (pid {}) is already serving",
            agent.pid()
        )),
        "{err}"
    );
}

#[test]
fn without_an_agent_commands_say_how_to_start_one() {
    let env = Env::new();
    let err = env.fails(&["status"]);
    assert!(
        err.contains("cannot reach the agent") && err.contains("kiln serve"),
        "{err}"
    );
}

#[test]
fn the_socket_is_private_and_bad_requests_are_refused() {
    use std::io::{Read, Write};
    let env = Env::new();
    let _agent = Agent::start(&env);
    let sock = env.home.join("kiln.sock");
    assert_eq!(
        fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let request = |body: &str| {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        write!(
            s,
            "POST /v1/apply HTTP/1.1\r\nhost: kiln\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let out = request(r#"{"services": [], "dry_run": true, "surprise": 1}"#);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("unknown field `surprise`"), "{out}");
    let out = request("{not json");
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    let out = request(r#"{"services": [], "dry_run": true}"#);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // Regression (issue 10): volume and env names are validated at the API
    // too; a volume named `../../../x` made a directory outside the home,
    // bind-mounted read-write.
    for (body, says) in [
        (
            r#"{"services": [{"config": {"volumes": {"../../../x": {"path": "/x", "shared": false}}}}]}"#,
            "invalid volume name `../../../x`",
        ),
        (
            r#"{"services": [{"config": {"volumes": {"/abs": {"path": "/x", "shared": false}}}}]}"#,
            "invalid volume name `/abs`",
        ),
        (
            r#"{"services": [{"config": {"env": {"A=B": "x"}}}]}"#,
            "A=B",
        ),
        (
            r#"{"services": [{"config": {"workdir": "/../../etc"}}]}"#,
            "must not contain `..`",
        ),
    ] {
        let out = request(body);
        assert!(
            out.starts_with("HTTP/1.1 400") && out.contains(says),
            "{body}: {out}"
        );
    }
    assert!(!env.dir.path().join("x").exists() && !Path::new("/abs").exists());
    // The state (every release's env values) is the owner's alone; the
    // socket is made in place with its mode, nothing left of how.
    for file in ["state.db", "state.db-wal"] {
        assert_eq!(
            fs::metadata(env.home.join(file))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600,
            "{file}"
        );
    }
    let leftovers: Vec<_> = fs::read_dir(&env.home)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".kiln.sock"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn bad_specs_and_missing_things_are_refused_and_change_nothing() {
    let env = Env::new();
    let spec = hello_app(&env.path("app"), WEB);
    let _agent = Agent::start(&env);
    apply(&env, &spec);
    let history = || {
        env.json(&["history", "web", "--json"])["releases"]
            .as_array()
            .unwrap()
            .len()
    };

    write(&spec, (WEB.to_owned() + "bogus = 1\n").as_bytes());
    let err = env.fails(&["apply", "-f", spec.to_str().unwrap()]);
    assert!(err.contains("unknown key `bogus`"), "{err}");

    write(
        &spec,
        WEB.replace("image = \"app\"", "image = \"ghost:v1\"")
            .as_bytes(),
    );
    let err = env.fails(&["apply", "-f", spec.to_str().unwrap()]);
    assert!(err.contains("no image matches `ghost:v1`"), "{err}");

    write(
        &spec,
        (WEB.replace("HELLO_VERSION = \"v1\"", "HELLO_VERSION = \"v9\"")
            + "[services.web.health.liveness]\nexec = [\"/bin/no-such-check\"]\n")
            .as_bytes(),
    );
    let err = env.fails(&["apply", "-f", spec.to_str().unwrap()]);
    assert!(
        err.contains("liveness probe command `/bin/no-such-check` does not exist"),
        "{err}"
    );

    write(
        &spec,
        WEB.replace(
            "entrypoint = [\"/bin/start.sh\"]",
            "entrypoint = [\"/bin/nope\"]",
        )
        .as_bytes(),
    );
    let err = env.fails(&["apply", "-f", spec.to_str().unwrap()]);
    assert!(err.contains("command `/bin/nope` does not exist"), "{err}");

    assert_eq!(history(), 1, "nothing was recorded");
    assert!(converged(&env, "web", 1), "the service is untouched");
}

#[test]
fn without_bubblewrap_an_explicit_sandbox_is_refused_oci_is_the_default_and_process_only_if_allowed()
 {
    let env = Env::new();
    // A PATH without bwrap.
    let bin = env.path("bin-without-bwrap");
    fs::create_dir_all(&bin).unwrap();
    let start = |allow: bool| {
        let bin = bin.clone();
        Agent::start_with(&env, move |c| {
            c.env("PATH", &bin);
            if allow {
                c.args(["--allow-runtime", "process"]);
            }
        })
    };
    let mut agent = start(false);
    let spec = hello_app(
        &env.path("app"),
        &(WEB
            .replace("replicas = 2", "replicas = 1")
            .replace("volumes = { data = \"/data\" }\n", "")
            + "runtime = \"sandbox\"\n"),
    );
    // `runtime` must be inside [services.web], before its sub-tables.
    let text = fs::read_to_string(&spec)
        .unwrap()
        .replace("runtime = \"sandbox\"\n", "");
    let text = text.replace(
        "[services.web]\n",
        "[services.web]\nruntime = \"sandbox\"\n",
    );
    write(&spec, text.as_bytes());
    let err = env.fails(&["apply", "-f", spec.to_str().unwrap()]);
    assert!(err.contains("runtime sandbox needs bubblewrap"), "{err}");

    // No sandbox: an agent running as root runs the embedded OCI runtime,
    // whose roots are read-only as the sandbox's; never plain processes
    // unless allowed, whether the spec asks for `process` or (not root)
    // says nothing.
    write(
        &spec,
        text.replace("runtime = \"sandbox\"\n", "").as_bytes(),
    );
    if my_uid() == 0 {
        apply(&env, &spec);
        let s = service_status(&env, "web");
        let i = &instances(&s)[0];
        assert_eq!(i["runtime"], "oci", "{i}");
        assert_eq!(i["read_only_root"], true, "{i}");
        env.ok(&["remove", "web"]);
    } else {
        let err = env.fails(&["apply", "-f", spec.to_str().unwrap()]);
        assert!(
            err.contains("runtime process runs the app unconfined")
                && err.contains("--allow-runtime process")
                && err.contains("install bubblewrap"),
            "{err}"
        );
    }
    let process = text.replace("runtime = \"sandbox\"", "runtime = \"process\"");
    write(&spec, process.as_bytes());
    let err = env.fails(&["apply", "-f", spec.to_str().unwrap()]);
    assert!(err.contains("--allow-runtime process"), "{err}");
    assert!(service_status_all(&env).is_empty(), "nothing was applied");
    agent.stop();

    // Allowed: asked for (and the fallback of an agent that is not root).
    let _agent = start(true);
    write(&spec, process.as_bytes());
    apply(&env, &spec);
    let s = service_status(&env, "web");
    // (Release 1, which ran under oci, is kept warm beside it.)
    let i = &instances(&s)
        .into_iter()
        .find(|i| i["revision"] == s["revision"])
        .unwrap();
    assert_eq!(i["runtime"], "process");
    assert_eq!(i["read_only_root"], false);
    // Never as the agent's user: as root, the agent runs it as nobody.
    let pid = i["pid"].as_u64().unwrap();
    let uid = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|u| u.split_whitespace().next().unwrap().to_owned())
        })
        .unwrap();
    if my_uid() == 0 {
        assert_eq!(uid, "65534");
    }
    let status = env.ok(&["status"]);
    assert!(status.contains("not enforced"), "{status}");
}

#[test]
fn a_second_apply_during_a_rollout_fails_naming_it() {
    let env = Env::new();
    let slow = WEB.replace(
        "HELLO_VERSION = \"v1\"",
        "HELLO_VERSION = \"v1\", HELLO_START_DELAY = \"3\"",
    );
    let spec = hello_app(&env.path("app"), &slow);
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", spec.to_str().unwrap(), "--detach"]);
    write(&spec, slow.replace("\"v1\"", "\"v2\"").as_bytes());
    let err = env.fails(&["apply", "-f", spec.to_str().unwrap()]);
    assert!(
        err.contains("service web is still rolling out release 1"),
        "{err}"
    );
    assert_eq!(
        env.json(&["history", "web", "--json"])["releases"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    wait_for("release 1", Duration::from_secs(30), || {
        converged(&env, "web", 1)
    });
    apply(&env, &spec);
    assert!(converged(&env, "web", 2));
}

#[test]
fn exec_and_startup_probes_run_inside_the_sandbox() {
    let env = Env::new();
    // The exec probe can only pass if it sees the instance's volume at /data.
    let spec = hello_app(
        &env.path("app"),
        &(WEB.replace(
            "http = \"/healthz\"",
            "exec = [\"/usr/bin/sh\", \"-c\", \"test -s /data/instances\"]",
        ) + "[services.web.health.startup]\nhttp = \"/healthz\"\n"),
    );
    let _agent = Agent::start(&env);
    apply(&env, &spec);
    let s = service_status(&env, "web");
    assert_eq!(s["ready"], 2, "{s}");
}

/// Issue 13: exec probes ran in a fresh sandbox, so a worker probing its
/// own `/tmp/heartbeat` was never ready; and a worker with no port and no
/// probe was never ready at all. Now the probe runs inside the instance
/// (its mount and pid namespaces), and a worker without a probe is ready
/// once it has stayed up for `min_ready`.
/// An app whose entrypoint is `bin/worker.sh`, this shell script.
fn worker_script(app: &Path, script: &[u8]) {
    write(&app.join("bin/worker.sh"), script);
    util::chmod(&app.join("bin/worker.sh"), 0o755);
}

#[test]
fn exec_probes_run_inside_the_instance_and_workers_need_no_port() {
    let env = Env::new();
    let app = env.path("app");
    worker_script(
        &app,
        b"#!/usr/bin/sh
          echo $$ > /tmp/worker.pid
          touch /tmp/heartbeat
          echo worker up
          exec sleep 1000
",
    );
    let spec = app.join("kiln.toml");
    // The probe passes only where the instance's /tmp is, and where its
    // pid (as the instance sees it) is its `sleep`.
    let probe = "test -f /tmp/heartbeat && grep -q sleep /proc/$(cat /tmp/worker.pid)/cmdline";
    write(
        &spec,
        format!(
            r#"
[images.worker]
include = ["bin"]
entrypoint = ["/bin/worker.sh"]

[services.worker]
image = "worker"
replicas = 2
[services.worker.health.readiness]
exec = ["/usr/bin/sh", "-c", "{probe}"]
interval = "200ms"

[services.idle]
image = "worker"
replicas = 1
[services.idle.rollout]
min_ready = "1s"
"#
        )
        .as_bytes(),
    );
    let _agent = Agent::start(&env);
    apply(&env, &spec);
    for name in ["worker", "idle"] {
        let s = service_status(&env, name);
        assert_eq!(s["outcome"], "active", "{s}");
        assert!(instances(&s).iter().all(|i| i["ready"] == true), "{s}");
    }
    assert_eq!(service_status(&env, "worker")["ready"], 2);
    // Nothing was replaced: every instance is the first of its slot.
    for name in ["worker", "idle"] {
        let s = service_status(&env, name);
        assert!(instances(&s).iter().all(|i| i["replacements"] == 0), "{s}");
    }
}

/// Issue 13: every env value was a `bwrap --setenv` argument (any local
/// user read it in `ps`) and `history --json` printed it. Secrets come from
/// the spec, a file, the `kiln` command's environment or an env file; the
/// instance sees them; no command line, log, plan, history, status or event
/// does; a changed value is a new release and a rollback brings the old
/// value back.
#[test]
fn secrets_reach_the_instance_and_nothing_else() {
    let env = Env::new();
    let app = env.path("app");
    // The worker says which value it got, never the value.
    worker_script(
        &app,
        b"#!/usr/bin/sh
          case \"$DB_PASSWORD\" in s3cr3t-one) echo db=one;; s3cr3t-two) echo db=two;; *) echo db=wrong;; esac
          [ \"$API_TOKEN\" = tok-from-ci-9f2 ] && echo token=ok
          [ \"$FROM_FILE\" = 'env file value' ] && echo env_file=ok
          [ \"$INLINE\" = inline-secret-77 ] && echo inline=ok
          [ \"$PLAIN\" = plain ] && echo plain=ok
          exec sleep 1000
",
    );
    write(&app.join("db.secret"), b"s3cr3t-one\n");
    write(
        &app.join("prod.env"),
        b"# from the vault\nFROM_FILE='env file value'\n",
    );
    let spec = app.join("kiln.toml");
    write(
        &spec,
        br#"
[images.worker]
include = ["bin"]
entrypoint = ["/bin/worker.sh"]

[services.worker]
image = "worker"
replicas = 1
env = { PLAIN = "plain" }
env_file = "prod.env"
[services.worker.rollout]
min_ready = "300ms"
[services.worker.secrets]
DB_PASSWORD = { file = "db.secret" }
API_TOKEN = { env = "KILN_TEST_TOKEN" }
INLINE = "inline-secret-77"
"#,
    );
    let values = [
        "s3cr3t-one",
        "s3cr3t-two",
        "tok-from-ci-9f2",
        "env file value",
        "inline-secret-77",
    ];
    let kiln = |args: &[&str]| {
        let out = env
            .cmd()
            .env("KILN_TEST_TOKEN", "tok-from-ci-9f2")
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "kiln {args:?}: {text}");
        text
    };
    let shown = |text: &str| values.iter().find(|v| text.contains(*v)).copied();
    let _agent = Agent::start(&env);
    let spec_arg = spec.to_str().unwrap();
    let mut outputs = vec![
        kiln(&["plan", "-f", spec_arg]),
        kiln(&["apply", "-f", spec_arg]),
    ];
    let logs = env.ok(&["logs", "worker"]);
    for want in ["db=one", "token=ok", "env_file=ok", "inline=ok", "plain=ok"] {
        assert!(logs.contains(want), "{want}: {logs}");
    }
    // No process's command line holds a value (it was `--setenv`).
    for v in values {
        assert_eq!(
            processes_mentioning(v),
            Vec::<u32>::new(),
            "{v} in a command line"
        );
    }
    // A changed value is a new release; plan names the key only.
    write(&app.join("db.secret"), b"s3cr3t-two\n");
    let plan = kiln(&["plan", "-f", spec_arg]);
    assert!(plan.contains("secrets changed: DB_PASSWORD"), "{plan}");
    outputs.push(plan);
    outputs.push(kiln(&["apply", "-f", spec_arg]));
    assert!(
        env.ok(&["logs", "worker", "--release", "2"])
            .contains("db=two")
    );
    // A rollback brings the old value back: the instance serving release 3
    // is either one of release 1's, kept warm through the watch and
    // adopted (it read db=one), or a new one that read it.
    let warm: Vec<String> = instances(&service_status(&env, "worker"))
        .iter()
        .filter(|i| i["revision"] == 1)
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    env.ok(&["rollback", "worker"]);
    wait_for("release 3 active", Duration::from_secs(30), || {
        let s = service_status(&env, "worker");
        s["revision"] == 3 && s["outcome"] == "active" && s["converged"] == true
    });
    let r3 = env.ok(&["logs", "worker", "--release", "3"]);
    let s = service_status(&env, "worker");
    for i in instances(&s).iter().filter(|i| i["revision"] == 3) {
        let id = i["id"].as_str().unwrap();
        assert!(
            warm.iter().any(|w| w == id) || r3.contains("db=one"),
            "{id} is neither adopted from {warm:?} nor read db=one: {r3}"
        );
    }
    for args in [
        &["history", "worker", "--json"][..],
        &["history", "worker"],
        &["status", "--json"],
        &["status"],
        &["logs", "worker"],
    ] {
        outputs.push(kiln(args));
    }
    for text in &outputs {
        assert_eq!(shown(text), None, "a secret value was shown:\n{text}");
    }
    let history = env.json(&["history", "worker", "--json"]);
    let sealed = &history["releases"][0]["config"]["secrets"]["DB_PASSWORD"];
    assert!(
        sealed.as_str().unwrap().starts_with("hmac-sha256:"),
        "{history}"
    );
    // The events hold none either.
    let db = rusqlite::Connection::open(env.home.join("state.db")).unwrap();
    let details: Vec<String> = db
        .prepare("SELECT detail FROM events")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(shown(&details.join("\n")), None);
    // Who can read the values: the agent's user (the state database is
    // owner-only) and root.
    let mode = fs::metadata(env.home.join("state.db"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // A missing variable or file fails the apply, naming it.
    let err = env.fails(&["apply", "-f", spec_arg]);
    assert!(
        err.contains("secret API_TOKEN: the environment variable KILN_TEST_TOKEN is not set"),
        "{err}"
    );
    fs::remove_file(app.join("db.secret")).unwrap();
    let out = env
        .cmd()
        .env("KILN_TEST_TOKEN", "tok-from-ci-9f2")
        .args(["apply", "-f", spec_arg])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("secret DB_PASSWORD") && err.contains("db.secret"),
        "{err}"
    );
    assert_eq!(releases(&env, "worker").len(), 3, "nothing recorded");
}

#[test]
fn logs_filter_by_release_and_instance() {
    let env = Env::new();
    let spec = hello_app(&env.path("app"), WEB);
    let _agent = Agent::start(&env);
    apply(&env, &spec);
    write(&spec, WEB.replace("\"v1\"", "\"v2\"").as_bytes());
    apply(&env, &spec);
    let r1 = env.ok(&["logs", "web", "--release", "1"]);
    let r2 = env.ok(&["logs", "web", "--release", "2"]);
    assert!(
        r1.lines().all(|l| l.starts_with("web-r1-")) && r1.contains("hello v1"),
        "{r1}"
    );
    assert!(
        r2.lines().all(|l| l.starts_with("web-r2-")) && r2.contains("hello v2"),
        "{r2}"
    );
    assert!(r1.contains("exited"), "old instances' logs are kept: {r1}");
    let id = instances(&service_status(&env, "web"))[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let one = env.ok(&["logs", "web", "--instance", &id]);
    assert!(
        !one.is_empty() && one.lines().all(|l| l.starts_with(&id)),
        "{one}"
    );
    let err = env.fails(&["logs", "nope"]);
    assert!(err.contains("no service named nope"), "{err}");
    // An instance or release that never was is an error naming it (issue
    // 13: it printed nothing and exited 0).
    let err = env.fails(&["logs", "web", "--instance", "web-r1-nope"]);
    assert!(err.contains("no instance web-r1-nope"), "{err}");
    let err = env.fails(&["logs", "web", "--release", "9"]);
    assert!(err.contains("release 9 of web does not exist"), "{err}");
    // Issue 13: `logs` had no --json: JSON Lines, one per line of output.
    let lines = env.ok(&["logs", "web", "--instance", &id, "--json"]);
    assert!(!lines.is_empty());
    for l in lines.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["instance"], id.as_str(), "{l}");
        assert!(v["line"].is_string(), "{l}");
    }
    // A closed stdout ends a command quietly (issue 13: `status` panicked
    // with exit 101, `--json` and `logs` printed an error).
    for args in [&["status"][..], &["status", "--json"], &["logs", "web"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = env.cmd().args(args).stdout(writer).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(
            out.stderr.is_empty(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Regression (issue 10): instance output was 0644 in a 0755 home.
    let logs = env.home.join("logs");
    assert_eq!(
        fs::metadata(&logs).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let mut files = 0;
    for dir in fs::read_dir(&logs).unwrap() {
        let dir = dir.unwrap().path();
        let entries: Vec<_> = if dir.is_dir() {
            assert_eq!(
                fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
                0o700
            );
            fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect()
        } else {
            vec![dir]
        };
        for f in entries {
            assert_eq!(
                fs::metadata(&f).unwrap().permissions().mode() & 0o777,
                0o600,
                "{}",
                f.display()
            );
            files += 1;
        }
    }
    assert!(files > 0);
}

#[test]
fn an_agent_killed_with_sigkill_leaves_no_instance_and_recovers() {
    let env = Env::new();
    let spec = hello_app(&env.path("app"), WEB);
    let mut agent = Agent::start(&env);
    apply(&env, &spec);
    let pids: Vec<u64> = instances(&service_status(&env, "web"))
        .iter()
        .map(|i| i["pid"].as_u64().unwrap())
        .collect();
    let mut child = agent.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    // bubblewrap's --die-with-parent takes the instances down with the agent.
    wait_for(
        "instances to die with the agent",
        Duration::from_secs(10),
        || pids.iter().all(|p| !alive(*p)),
    );
    let _agent = Agent::start(&env);
    wait_for("the service back", Duration::from_secs(20), || {
        converged(&env, "web", 1)
    });
    let s = service_status(&env, "web");
    assert!(
        instances(&s)
            .iter()
            .all(|i| !pids.contains(&i["pid"].as_u64().unwrap()))
    );
    assert_eq!(
        env.json(&["history", "web", "--json"])["releases"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// Regression: a sandbox stopped while still being set up had its outer
/// bubblewrap signalled; the reaper and app inside survived, orphaned.
#[test]
fn stopping_the_agent_while_instances_start_leaves_no_process() {
    let env = Env::new();
    let spec = hello_app(
        &env.path("app"),
        &WEB.replace("replicas = 2", "replicas = 4"),
    );
    let home = env.home.to_str().unwrap().to_owned();
    for stop in ["SIGTERM", "SIGKILL"] {
        let mut agent = Agent::start(&env);
        env.ok(&["apply", "-f", spec.to_str().unwrap(), "--detach"]);
        if stop == "SIGTERM" {
            assert_eq!(agent.stop(), Some(0));
        } else {
            let mut child = agent.child.take().unwrap();
            child.kill().unwrap();
            child.wait().unwrap();
        }
        wait_for(
            "every instance process to end",
            Duration::from_secs(10),
            || processes_mentioning(&home).is_empty(),
        );
    }
}

#[test]
fn a_second_signal_forces_the_shutdown() {
    let env = Env::new();
    let spec = hello_app(
        &env.path("app"),
        &(WEB.replace(
            "HELLO_VERSION = \"v1\"",
            "HELLO_VERSION = \"v1\", IGNORE_TERM = \"1\"",
        ) + "[services.web.stop]\nkill_timeout = \"5m\"\n"),
    );
    let mut agent = Agent::start(&env);
    apply(&env, &spec);
    let home = env.home.to_str().unwrap().to_owned();
    let mut child = agent.child.take().unwrap();
    let pid = child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    // The instances ignore SIGTERM: the graceful stop would wait 5 minutes.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "still stopping gracefully"
    );
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "forced");
    wait_for(
        "every instance to be killed",
        Duration::from_secs(10),
        || processes_mentioning(&home).is_empty(),
    );
}

/// Every change names who made it: the uid of the user whose command it
/// was (the API socket's peer credentials), or the agent on its own.
#[test]
fn events_name_the_user_whose_command_made_them() {
    let env = Env::new();
    let spec = hello_app(&env.path("app"), WEB);
    let _agent = Agent::start(&env);
    apply(&env, &spec);
    write(&spec, WEB.replace("\"v1\"", "\"v2\"").as_bytes());
    apply(&env, &spec);
    env.ok(&["rollback", "web"]);
    let uid = String::from_utf8(
        std::process::Command::new("id")
            .arg("-u")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let me = format!("uid:{}", uid.trim());
    let by = |kind: &str| actors_of(&env, &[kind]);
    assert_eq!(by("release-created"), [me.as_str(), me.as_str()]);
    assert_eq!(by("rollback"), [me.as_str()]);
    assert!(
        !by("instance-started").is_empty() && by("instance-started").iter().all(|a| a == "agent"),
        "{:?}",
        by("instance-started")
    );
    assert!(
        by("release-active").iter().all(|a| a == "agent"),
        "{:?}",
        by("release-active")
    );
}

/// Issue 13: a release whose liveness probe fails failed with "…keep
/// crashing (3); last: " and nothing after it. The reason names the probe
/// and what it saw.
#[test]
fn a_crash_looping_release_names_the_failing_probe_and_its_result() {
    let env = Env::new();
    let good = WEB.replace("replicas = 2", "replicas = 1");
    let spec = hello_app(&env.path("app"), &good);
    let _agent = Agent::start(&env);
    apply(&env, &spec);
    let bad = good
        .replace(
            "env = { HELLO_VERSION = \"v1\" }",
            "env = { HELLO_VERSION = \"v2\", HELLO_FAIL_HEALTH = \"1\" }",
        )
        .replace("http = \"/healthz\"", "tcp = true")
        + "[services.web.health.liveness]\nhttp = \"/healthz\"\ninterval = \"50ms\"\nfailure_threshold = 1\n";
    write(&spec, bad.as_bytes());
    let err = env.fails(&["apply", "-f", spec.to_str().unwrap()]);
    assert!(
        err.contains("keep crashing")
            && err.contains("failed its liveness probe: http: GET /healthz"),
        "{err}"
    );
}

/// Issue 13: `plan` (and `apply`) without a running agent baked into the
/// store first, then found out. The agent is checked first: nothing is
/// baked, the error names what to do.
#[test]
fn plan_without_an_agent_changes_nothing() {
    let env = Env::new();
    let spec = hello_app(&env.path("app"), WEB);
    for cmd in ["plan", "apply"] {
        let err = env.fails(&[cmd, "-f", spec.to_str().unwrap()]);
        assert!(err.contains("kiln serve"), "{cmd}: {err}");
    }
    assert!(
        !env.home.join("blobs").exists() && !env.home.join("index.json").exists(),
        "nothing was baked"
    );
}

/// A worker (no listen, no readiness probe) counts as ready only once it
/// has run a while: one that exits at once fails its release instead of
/// `apply` saying "done" (and the plan says how it is judged).
#[test]
fn a_worker_that_exits_at_once_is_not_ready() {
    let env = Env::new();
    let _agent = Agent::start(&env);
    let spec = |cmd: &str| {
        format!(
            "[images.app]\ninclude = [\"bin\"]\nentrypoint = [\"/bin/start.sh\"]\n\
             [services.worker]\nimage = \"app\"\ncommand = [\"/usr/bin/sh\", \"-c\", \"{cmd}\"]\n\
             [services.worker.rollout]\nprogress_deadline = \"30s\"\n"
        )
    };
    let path = hello_app(&env.path("app"), &spec("sleep 600"));
    let out = env.run(&["apply", "-f", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("note: worker has no listen and no readiness probe") && err.contains("3s"),
        "{err}"
    );
    write(&path, spec("exit 0").as_bytes());
    let out = env.run(&["apply", "-f", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "apply said done: {err}");
    assert!(err.contains("worker: release 2 failed"), "{err}");
    assert_eq!(service_status(&env, "worker")["revision"], 1);
}

/// On its own, an agent is a one-node cluster that leads itself.
#[test]
fn kiln_nodes_on_its_own_lists_this_node_leading() {
    let env = Env::new();
    let _agent = Agent::start(&env);
    let n = env.json(&["nodes", "--json"]);
    assert_eq!(n["cluster"], false);
    let this = n["this"].as_str().unwrap().to_owned();
    assert!(!this.is_empty());
    assert_eq!(n["leader"], this.as_str());
    assert_eq!(n["nodes"].as_array().unwrap().len(), 1);
    assert_eq!(n["nodes"][0]["leader"], true);
    let table = env.ok(&["nodes"]);
    assert!(table.contains("on its own"), "{table}");
    assert_eq!(n["nodes"][0]["address"], "127.0.0.1");
    // Its capacity, as the host has it.
    assert!(n["nodes"][0]["cpus"].as_u64().unwrap() >= 1, "{n}");
    assert!(
        n["nodes"][0].get("lease").is_none(),
        "no lease on its own: {n}"
    );
    assert!(n["nodes"][0]["memory_mib"].as_u64().unwrap() > 0, "{n}");
    assert!(table.contains(" MiB"), "{table}");
    // Nowhere to move instances to: drain is refused, in one line.
    let err = env.fails(&["drain", &this]);
    assert!(err.contains("is on its own (no --etcd)"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let err = env.fails(&["drain", "Bad/Name"]);
    assert!(err.contains("node name"), "{err}");
}
