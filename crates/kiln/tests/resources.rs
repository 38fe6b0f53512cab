//! `cpu` and `memory` of an instance on one node, black-box: a sandboxed
//! instance (bubblewrap, as this test's agent runs it: root in CI) runs
//! in a cgroup of its own holding it to its release's quota and limit,
//! its app inside it from its start; one that allocates past its memory
//! is ended by the kernel and never gets to say it did; the cgroup goes
//! with the instance. And a plan names a change of resources, which is a
//! new release.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::path::PathBuf;
use std::time::Duration;

use util::*;

fn spec(port: u16) -> String {
    format!(
        r#"
[images.app]
include = ["bin"]
entrypoint = ["/bin/start.sh"]

[services.web]
image = "app"
listen = "127.0.0.1:{port}"
cpu = 0.5
memory = "48M"
pids = 64
[services.web.health.readiness]
http = "/healthz"
interval = "200ms"
"#
    )
}

/// An instance that holds 64 MiB in a shell variable, then says so.
const HOG: &str = r#"
[services.hog]
image = "app"
memory = "16M"
command = ["/usr/bin/sh", "-c", "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo allocated ${#x}; exec sleep 600"]
"#;

/// Whether the host has the unified hierarchy (else v1 or hybrid).
fn unified() -> bool {
    std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// The directory of `pid`'s cgroup in `controller`'s hierarchy.
fn cgroup_of(pid: u64, controller: &str) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctrls, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        let rel = path.trim_start_matches('/');
        if unified() && ctrls.is_empty() {
            return PathBuf::from("/sys/fs/cgroup").join(rel);
        }
        if ctrls.split(',').any(|c| c == controller) {
            return PathBuf::from("/sys/fs/cgroup").join(controller).join(rel);
        }
    }
    panic!("no {controller} cgroup for {pid}: {text}");
}

fn read(path: PathBuf) -> String {
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_owned()
}

#[test]
fn an_instance_is_held_to_its_cpu_and_memory_by_a_cgroup_of_its_own() {
    require("bwrap");
    if my_uid() != 0 {
        eprintln!("skipped: cgroups are made by an agent running as root (CI runs as root)");
        return;
    }
    let env = Env::new();
    let port = free_port();
    let path = hello_app(&env.path("app"), &spec(port));
    let spec_path = path.to_str().unwrap();
    let mut agent = Agent::start(&env);
    env.ok(&["apply", "-f", spec_path]);
    let status = service_status(&env, "web");
    let instance = &status["instances"][0];
    let (id, outer) = (
        instance["id"].as_str().unwrap().to_owned(),
        instance["pid"].as_u64().unwrap(),
    );
    // The sandbox's outer process and its app, below it, in one cgroup
    // named for the instance.
    let app = sandbox_app(outer);
    let memory = cgroup_of(outer, "memory");
    let cpu = cgroup_of(outer, "cpu");
    assert!(memory.ends_with(&id), "{}", memory.display());
    assert_eq!(cgroup_of(app, "memory"), memory);
    assert_eq!(cgroup_of(app, "cpu"), cpu);
    if unified() {
        assert_eq!(read(memory.join("memory.max")), (48u64 << 20).to_string());
        assert_eq!(read(cpu.join("cpu.max")), "50000 100000");
    } else {
        assert_eq!(
            read(memory.join("memory.limit_in_bytes")),
            (48u64 << 20).to_string()
        );
        assert_eq!(read(cpu.join("cpu.cfs_quota_us")), "50000");
        assert_eq!(read(cpu.join("cpu.cfs_period_us")), "100000");
    }
    let pids = cgroup_of(app, "pids");
    assert!(pids.ends_with(&id), "{}", pids.display());
    assert_eq!(read(pids.join("pids.max")), "64");
    let logs = env.ok(&["logs", "web"]);
    assert!(
        logs.contains("held to cpu 0.5, memory 48 MiB, pids 64"),
        "{logs}"
    );
    assert!(http_get(u64::from(port), "/").is_some(), "it serves");

    // Past its memory, the kernel ends it: it never says it allocated,
    // and it is replaced (and ended again) as any crash is.
    std::fs::write(&path, spec(port) + HOG).unwrap();
    env.ok(&["apply", "-f", spec_path, "--detach"]);
    wait_for(
        "the hog ended by the kernel",
        Duration::from_secs(60),
        || {
            let logs = env.ok(&["logs", "hog"]);
            logs.contains("exited (") && logs.contains("held to memory 16 MiB")
        },
    );
    let logs = env.ok(&["logs", "hog"]);
    assert!(!logs.contains("allocated"), "{logs}");
    assert!(
        logs.contains("signal: 9") || logs.contains("exit status: 137"),
        "{logs}"
    );

    // A change of resources is a new release, and the plan says which.
    let plan = env.ok(&["plan", "-f", spec_path]);
    assert!(!plan.contains("resources"), "{plan}");
    std::fs::write(
        &path,
        spec(port).replace("memory = \"48M\"", "memory = \"64M\"") + HOG,
    )
    .unwrap();
    let plan = env.ok(&["plan", "-f", spec_path]);
    assert!(
        plan.contains(
            "resources cpu 0.5, memory 48 MiB, pids 64 -> cpu 0.5, memory 64 MiB, pids 64"
        ),
        "{plan}"
    );

    // Gone with the instance.
    agent.stop();
    assert!(!memory.exists(), "{} left behind", memory.display());
    assert!(!cpu.exists(), "{} left behind", cpu.display());
    assert!(!pids.exists(), "{} left behind", pids.display());
}

#[test]
fn bad_resources_are_refused_in_one_line_naming_them() {
    let env = Env::new();
    for (line, says) in [
        ("cpu = 0", "cpu `0`: more than 0"),
        ("cpu = \"fast\"", "cpu `fast`"),
        ("memory = \"1K\"", "memory `1K`: at least 4 MiB"),
        ("pids = 1", "pids `1`: at least 8"),
    ] {
        let path = hello_app(
            &env.path("app"),
            &spec(8080)
                .replace("cpu = 0.5", line)
                .replace("memory = \"48M\"", "")
                .replace("pids = 64\n", ""),
        );
        let err = env.fails(&["check", "-f", path.to_str().unwrap()]);
        assert!(err.contains(says), "{line}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    // What a node offers: a size, of at least 1M.
    let out = env.run(&["serve", "--memory", "lots"]);
    assert_eq!(out.status.code(), Some(2));
    let out = env.run(&["serve", "--cpus", "0"]);
    assert_eq!(out.status.code(), Some(2));
}
