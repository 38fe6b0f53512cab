//! The sandbox against its own instance, black-box: an app that tries,
//! from inside, what a compromised one would (remount its root writable,
//! write its tree, make namespaces, trace a process, read the agent's state
//! or another service's volume), under an agent running as this test does
//! (root in CI, as `dist/kiln.service` runs it). Every attempt fails and
//! the app still serves. The same for an exec probe, which runs as the
//! instance's user. Each also under the embedded OCI runtime
//! (`runtime = "oci"`).
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::collections::BTreeMap;
use std::time::Duration;

use util::*;

fn ptrace_nr() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "117",
        _ => "101",
    }
}

fn keyctl_nr() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "219",
        _ => "250",
    }
}

fn spec(env: &Env, port: u16, user: &str) -> std::path::PathBuf {
    let state = env.home.join("state.db");
    let other = env.home.join("volumes/other/data");
    hello_app(
        &env.path("app"),
        &format!(
            r#"
[images.app]
include = ["bin"]
entrypoint = ["/bin/start.sh"]

[services.web]
image = "app"
listen = "127.0.0.1:{port}"
{user}
volumes = {{ data = "/data" }}
env = {{ SANDBOX_REPORT = "1", PTRACE_NR = "{nr}", AGENT_STATE = "{state}", OTHER_VOLUME = "{other}" }}
[services.web.health.readiness]
http = "/healthz"
interval = "200ms"

[services.other]
image = "app"
volumes = {{ data = "/data" }}
"#,
            nr = ptrace_nr(),
            state = state.display(),
            other = other.display(),
        ),
    )
}

/// The `report NAME=VALUE` lines the instance printed.
fn report(env: &Env) -> BTreeMap<String, String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let logs = env.ok(&["logs", "web"]);
        let out: BTreeMap<String, String> = logs
            .lines()
            .filter_map(|l| l.split_once("report ").map(|(_, r)| r))
            .filter_map(|r| r.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
            .collect();
        if out.contains_key("done") {
            return out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no report from the instance; logs:\n{logs}\nstatus:\n{}",
            env.ok(&["status"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_confined(r: &BTreeMap<String, String>, uid: &str) {
    assert_eq!(r["uid"], uid, "{r:?}");
    for cap in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(r[cap], "0000000000000000", "{cap}: {r:?}");
    }
    assert_eq!(r["NoNewPrivs"], "1", "{r:?}");
    assert_eq!(r["Seccomp"], "2", "filter mode: {r:?}");
    // Signals as if started by hand: none blocked, none ignored (32 and 33
    // are the C library's own).
    assert_eq!(r["SigBlk"], "0000000000000000", "{r:?}");
    let ignored = u64::from_str_radix(&r["SigIgn"], 16).unwrap();
    assert_eq!(ignored & 0x7fff_ffff, 0, "ignored signals: {r:?}");
    for attempt in [
        "remount",
        "write",
        "userns",
        "netns",
        "ptrace",
        "state",
        "other-volume",
        "chmod-tree",
        "devnode",
    ] {
        assert_eq!(r[attempt], "refused", "{attempt}: {r:?}");
    }
    let opts = &r["bin-mount"];
    for o in ["ro", "nosuid", "nodev"] {
        assert!(opts.split(',').any(|x| x == o), "{o} in {opts}");
    }
}

#[test]
fn a_sandboxed_instance_cannot_remount_write_trace_or_reach_the_agent() {
    require("bwrap");
    cannot_remount_write_trace_or_reach_the_agent("");
}

/// The same attempts from an instance of the embedded OCI runtime: a full
/// container (its user, no capability, `no_new_privs`, kiln's seccomp
/// filter installed by kiln's executor, a read-only root of mount points).
#[test]
fn an_oci_instance_cannot_remount_write_trace_or_reach_the_agent() {
    if my_uid() != 0 {
        eprintln!("skipped: the oci runtime needs an agent running as root (CI runs as root)");
        return;
    }
    cannot_remount_write_trace_or_reach_the_agent("runtime = \"oci\"");
}

fn cannot_remount_write_trace_or_reach_the_agent(runtime: &str) {
    require("perl");
    let env = Env::new();
    let port = free_port();
    let spec = spec(&env, port, runtime);
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", spec.to_str().unwrap()]);
    let r = report(&env);
    // As root, the agent runs instances as nobody; otherwise they are the
    // agent's own user, in a user namespace of their own.
    let expected_uid = match my_uid() {
        0 => "65534".to_owned(),
        uid => uid.to_string(),
    };
    assert_confined(&r, &expected_uid);
    // It still serves, and its volume is its own to write.
    assert!(http_get(port.into(), "/").is_some_and(|b| b.contains("hello")));
    let data = std::fs::read_to_string(env.home.join("volumes/web/data/instances")).unwrap();
    assert!(data.contains("web-r1-"), "{data}");
    // The tree is unchanged.
    let out = env.run(&["verify", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn root_asked_for_is_root_without_capabilities() {
    require("bwrap");
    root_without_capabilities("");
}

#[test]
fn root_asked_for_is_root_without_capabilities_in_an_oci_container() {
    root_without_capabilities("runtime = \"oci\"");
}

fn root_without_capabilities(runtime: &str) {
    require("perl");
    if my_uid() != 0 {
        panic!("run as root: only an agent running as root can be asked for root");
    }
    let env = Env::new();
    let port = free_port();
    let spec = spec(&env, port, &format!("user = \"root\"\n{runtime}"));
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", spec.to_str().unwrap()]);
    let r = report(&env);
    assert_confined(&r, "0");
    assert!(http_get(port.into(), "/").is_some());
}

#[test]
fn a_named_user_of_the_image_or_host_is_used_and_an_unknown_one_refused() {
    require("bwrap");
    assert!(
        my_uid() == 0,
        "run as root: only an agent running as root chooses its instances' users"
    );
    let env = Env::new();
    let port = free_port();
    // `daemon` (uid 1) is in every Debian /etc/passwd.
    let daemon = spec(&env, port, "user = \"daemon\"");
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", daemon.to_str().unwrap()]);
    let r = report(&env);
    assert_eq!(r["uid"], "1", "{r:?}");
    assert_eq!(r["gid"], "1", "{r:?}");

    let bad = spec(&env, port, "user = \"no-such-user\"");
    env.ok(&["apply", "--detach", "-f", bad.to_str().unwrap()]);
    wait_for("the refusal in status", Duration::from_secs(20), || {
        env.ok(&["status"])
            .contains("user `no-such-user` is in neither")
    });
}

#[test]
fn an_exec_probe_runs_as_the_instances_user_without_capabilities() {
    require("bwrap");
    exec_probe_as_the_instances_user("");
}

/// Inside the container: its namespaces, user and filter.
#[test]
fn an_exec_probe_of_an_oci_instance_runs_inside_its_container() {
    exec_probe_as_the_instances_user("runtime = \"oci\"");
}

fn exec_probe_as_the_instances_user(runtime: &str) {
    require("nsenter");
    assert!(
        my_uid() == 0,
        "run as root: only an agent running as root chooses its instances' users"
    );
    let env = Env::new();
    let port = free_port();
    let spec = hello_app(
        &env.path("app"),
        &format!(
            r#"
[images.app]
include = ["bin"]
entrypoint = ["/bin/start.sh"]

[services.web]
image = "app"
listen = "127.0.0.1:{port}"
{runtime}
[services.web.health.readiness]
exec = ["/usr/bin/sh", "-c", "id -u > /tmp/probe-uid; grep CapEff /proc/self/status > /tmp/probe-caps; grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status > /tmp/probe-seccomp; perl -e 'syscall({keyctl}, 0, -3, 0) == -1 and print $!' > /tmp/probe-keyctl; perl -e 'syscall({ptrace}, 16, 1, 0, 0) == -1 and print $!' > /tmp/probe-ptrace; (echo x >> /bin/start.sh) 2> /dev/null && echo ok > /tmp/probe-write; mount -o remount,rw,bind /bin/start.sh && echo ok > /tmp/probe-remount; cat /tmp/probe-uid"]
interval = "200ms"
"#,
            keyctl = keyctl_nr(),
            ptrace = ptrace_nr()
        ),
    );
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", spec.to_str().unwrap()]);
    let pid = service_status(&env, "web")["instances"][0]["pid"]
        .as_u64()
        .unwrap();
    // The probe's files are in the instance's private /tmp: read them
    // through an instance-side exec of the same kind.
    let app = sandbox_app(pid);
    let read = |f: &str| {
        let out = std::process::Command::new("nsenter")
            .args([&format!("--target={app}"), "--mount", "--", "cat", f])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(read("/tmp/probe-uid"), "65534");
    assert_eq!(read("/tmp/probe-caps"), "CapEff:\t0000000000000000");
    assert_eq!(
        read("/tmp/probe-remount"),
        "",
        "the probe remounted the tree"
    );
    // The instance's seccomp filter: keyctl, which any user may call, is
    // refused.
    assert_eq!(read("/tmp/probe-seccomp"), "NoNewPrivs:\t1\nSeccomp:\t2");
    assert_eq!(read("/tmp/probe-keyctl"), "Operation not permitted");
    assert_eq!(read("/tmp/probe-ptrace"), "Operation not permitted");
    assert_eq!(
        read("/tmp/probe-write"),
        "",
        "the probe wrote into the tree"
    );
}
