//! `kiln run SERVICE [--release N] -- CMD…`, black-box: a one-off instance
//! of a release runs a command in the service's sandbox, with its env,
//! secrets and volumes; its stdout and stderr come back apart and its exit
//! status is kiln's; its root is as read-only as the service's; it takes
//! no slot; each run is in the ledger with who ran what and how it ended.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::time::Duration;

use util::*;

fn spec(port: u16, version: &str) -> String {
    format!(
        r#"
[images.app]
include = ["bin"]
entrypoint = ["/bin/start.sh"]

[services.web]
image = "app"
listen = "127.0.0.1:{port}"
env = {{ HELLO_VERSION = "{version}" }}
secrets = {{ API_KEY = "s3cret" }}
volumes = {{ data = "/data" }}
[services.web.health.readiness]
http = "/healthz"
interval = "200ms"
"#
    )
}

#[test]
fn a_one_off_instance_runs_a_command_of_a_release_in_its_sandbox() {
    let env = Env::new();
    let port = free_port();
    let path = hello_app(&env.path("app"), &spec(port, "v1"));
    let spec_path = path.to_str().unwrap();
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", spec_path]);
    let out = env.run(&[
        "run",
        "web",
        "--",
        "/usr/bin/sh",
        "-c",
        "echo out-$HELLO_VERSION-$API_KEY; echo err-line >&2; echo kept > /data/ran; exit 3",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_eq!(out.status.code(), Some(3), "{stdout}{stderr}");
    assert_eq!(stdout, "out-v1-s3cret\n");
    assert_eq!(stderr, "err-line\n");
    // Its volume is the service's.
    let kept = env.home.join("volumes/web/data/ran");
    assert_eq!(std::fs::read_to_string(kept).unwrap(), "kept\n");
    // Its root is read-only, as the service's instances' is.
    let out = env.run(&[
        "run",
        "web",
        "--",
        "/usr/bin/sh",
        "-c",
        "echo x > ./bin/start.sh",
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A release by number: release 1 while release 2 is active.
    std::fs::write(&path, spec(port, "v2")).unwrap();
    env.ok(&["apply", "-f", spec_path]);
    let old = env.ok(&[
        "run",
        "web",
        "--release",
        "1",
        "--",
        "/usr/bin/sh",
        "-c",
        "echo $HELLO_VERSION",
    ]);
    assert_eq!(old, "v1\n");
    let now = env.ok(&[
        "run",
        "web",
        "--",
        "/usr/bin/sh",
        "-c",
        "echo $HELLO_VERSION",
    ]);
    assert_eq!(now, "v2\n");
    // -i: our standard input is its own, to its end.
    let piped = |args: &[&str], input: &[u8]| {
        use std::io::Write;
        let mut child = env
            .cmd()
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = piped(
        &[
            "run",
            "web",
            "-i",
            "--",
            "/usr/bin/sh",
            "-c",
            "read a; read b; echo got-$a-$b; cat",
        ],
        b"one\ntwo\nrest\n",
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got-one-two\nrest\n");
    // Without -i, none: the command reads the end of its input at once.
    let out = piped(&["run", "web", "--", "/usr/bin/cat"], b"not passed\n");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    // It took no slot: the service's instances are its own (release 2's,
    // and release 1's kept warm for its watch).
    let status = service_status(&env, "web");
    let instances = status["instances"].as_array().unwrap();
    assert!(
        instances
            .iter()
            .all(|i| !i["id"].as_str().unwrap().ends_with("-run")),
        "{status}"
    );
    assert_eq!(
        instances.iter().filter(|i| i["revision"] == 2).count(),
        1,
        "{status}"
    );
    // Every run is in the ledger, by who ran it.
    let runs = actors_of(&env, &["command-run"]);
    assert_eq!(runs.len(), 6, "{runs:?}");
    assert!(runs.iter().all(|a| a.starts_with("uid:")), "{runs:?}");
    // Refusals: one line each.
    let err = env.fails(&["run", "nope", "--", "true"]);
    assert!(err.contains("nope"), "{err}");
    let err = env.fails(&["run", "web", "--release", "9", "--", "true"]);
    assert!(err.contains("release 9"), "{err}");
    let out = env.run(&["run", "web"]);
    assert_eq!(out.status.code(), Some(2), "a command is required");
}

/// `kiln exec INSTANCE -- CMD`: break glass. The command runs inside the
/// running instance (it sees the instance's own `/tmp` and environment),
/// its output and exit code come back, the ledger records who ran what,
/// and the instance is then **tainted**: replaced from its image as a
/// drifted one is, with no failed request. `--keep` leaves it running.
#[test]
fn a_command_inside_an_instance_taints_it_unless_kept() {
    let env = Env::new();
    let port = free_port();
    let path = hello_app(&env.path("app"), &spec(port, "v1"));
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    let first = service_status(&env, "web")["instances"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Kept (the local socket's caller has every role): it stays.
    let out = env.run(&[
        "exec",
        &first,
        "--keep",
        "--",
        "/usr/bin/sh",
        "-c",
        "echo inside-$KILN_INSTANCE > /tmp/mark; cat /tmp/mark; exit 4",
    ]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("inside-{first}\n")
    );
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(
        service_status(&env, "web")["instances"][0]["id"],
        first.as_str()
    );
    // Its own /tmp: what the first exec wrote is there for the next (given
    // on our standard input, -i).
    let mut child = env
        .cmd()
        .args(["exec", &first, "--keep", "-i", "--", "/usr/bin/sh"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        input.write_all(b"cat /tmp/mark\nexit 0\n").unwrap();
    }
    let seen = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&seen.stdout),
        format!("inside-{first}\n")
    );
    // Not kept: replaced from its image, without a failed request.
    let load = Load::start(port, 2);
    let out = env.ok(&[
        "exec",
        &first,
        "--",
        "/usr/bin/sh",
        "-c",
        "echo changed > /tmp/mark",
    ]);
    assert_eq!(out, "");
    wait_for(
        "the tainted instance replaced",
        Duration::from_secs(30),
        || {
            let s = service_status(&env, "web");
            let list = s["instances"].as_array().unwrap();
            list.len() == 1 && list[0]["id"] != first.as_str() && list[0]["ready"] == true
        },
    );
    let count = load.finish();
    count.assert_none_failed();
    // In the ledger, each with its keeping.
    let execs = actors_of(&env, &["instance-exec"]);
    assert_eq!(execs.len(), 3, "{execs:?}");
    // An instance that is not there, in one line.
    let err = env.fails(&["exec", &first, "--", "true"]);
    assert!(err.contains(&first) && err.contains("kiln status"), "{err}");
}
