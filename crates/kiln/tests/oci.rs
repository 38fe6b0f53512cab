//! `runtime = "oci"`, black-box: an image made by another tool (umoci, from
//! a busybox userland, with its own `USER`, `WORKDIR` and environment) runs
//! as a full container of kiln's embedded runtime — as that user, in that
//! directory, with a read-only root holding nothing of the host's, held to
//! its `cpu`, `memory` and `pids` by cgroups (read back), and on through `kiln
//! serve --upgrade` with the same pid; nothing of it is left once it is
//! gone. (Its confinement against a hostile app, exec probes and root
//! without capabilities: tests/sandbox.rs, under both runtimes.)
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use util::*;

fn umoci(args: &[&str]) {
    succeed(Command::new("umoci").args(args));
}

/// An OCI layout at `layout` holding `app:latest`, made by umoci: a static
/// busybox userland, user `app` (1000:1000) with `/home/app` its working
/// directory, `PATH=/bin`.
fn foreign_image(dir: &Path) -> PathBuf {
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let image = format!("{}:latest", layout.display());
    umoci(&["init", "--layout", layout.to_str().unwrap()]);
    umoci(&["new", "--image", &image]);
    umoci(&["unpack", "--image", &image, bundle.to_str().unwrap()]);
    let root = bundle.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    let busybox = ["/usr/bin/busybox", "/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("busybox-static (scripts/test installs it)");
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    for applet in ["sh", "id", "pwd", "touch", "echo", "sleep", "cat", "grep"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::create_dir_all(root.join("etc")).unwrap();
    write(
        &root.join("etc/passwd"),
        b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    );
    write(&root.join("etc/group"), b"root:x:0:\napp:x:1000:\n");
    std::fs::create_dir_all(root.join("home/app")).unwrap();
    umoci(&["repack", "--image", &image, bundle.to_str().unwrap()]);
    umoci(&[
        "config",
        "--image",
        &image,
        "--config.user",
        "app",
        "--config.workingdir",
        "/home/app",
        "--config.env",
        "PATH=/bin",
        "--config.env",
        "FROM_IMAGE=yes",
        "--config.entrypoint",
        "/bin/sh",
    ]);
    layout
}

/// What the container says of itself, then it stays.
const SAYS: &str = "echo who=$(id -u):$(id -g) in=$(pwd) from-image=$FROM_IMAGE; \
    if [ -e /usr ]; then echo usr=present; else echo usr=absent; fi; \
    if touch /written 2>/dev/null; then echo root=WRITABLE; else echo root=read-only; fi; \
    if touch /tmp/t; then echo tmp=writable; fi; \
    grep -E '^Sig(Ign|Blk)' /proc/self/status; \
    echo said=all; exec sleep 600";

fn spec(dir: &Path) -> PathBuf {
    let ctx = dir.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    write(&ctx.join("MARKER"), b"baked by kiln on a foreign image\n");
    let spec = dir.join("kiln.toml");
    write(
        &spec,
        format!(
            r#"
[images.app]
base = "oci:layout:latest"
context = "ctx"

[services.worker]
image = "app"
runtime = "oci"
cpu = 0.5
memory = "48M"
pids = 64
command = ["/bin/sh", "-c", "{SAYS}"]
"#
        )
        .as_bytes(),
    );
    spec
}

/// The directory of `pid`'s cgroup in `controller`'s hierarchy.
fn cgroup_of(pid: u64, controller: &str) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let unified = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctrls, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        let rel = path.trim_start_matches('/');
        if unified && ctrls.is_empty() {
            return PathBuf::from("/sys/fs/cgroup").join(rel);
        }
        if ctrls.split(',').any(|c| c == controller) {
            return PathBuf::from("/sys/fs/cgroup").join(controller).join(rel);
        }
    }
    panic!("no {controller} cgroup for {pid}: {text}");
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_owned()
}

#[test]
fn an_image_built_by_another_tool_runs_as_a_full_container() {
    require("umoci");
    if my_uid() != 0 {
        eprintln!("skipped: the oci runtime needs an agent running as root (CI runs as root)");
        return;
    }
    let env = Env::new();
    let dir = env.path("project");
    foreign_image(&dir);
    let spec = spec(&dir);
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", spec.to_str().unwrap(), "--detach"]);
    wait_for("the container to speak", Duration::from_secs(30), || {
        env.ok(&["logs", "worker"]).contains("said=all")
    });
    let logs = env.ok(&["logs", "worker"]);
    // The image's user (named in its config, found in its /etc/passwd), its
    // working directory and environment; its own userland only.
    assert!(
        logs.contains("who=1000:1000 in=/home/app from-image=yes"),
        "{logs}"
    );
    assert!(logs.contains("usr=absent"), "{logs}");
    assert!(logs.contains("root=read-only"), "{logs}");
    assert!(logs.contains("tmp=writable"), "{logs}");
    // Every signal at its default action, none blocked: as if it were
    // started by hand (not inheriting the agent's or the shim's ignored
    // SIGPIPE, which would keep it alive on a broken pipe).
    let mask = |name: &str| {
        let hex = logs
            .lines()
            .find_map(|l| l.split_once(&format!("{name}:\t")).map(|(_, v)| v.trim()))
            .unwrap_or_else(|| panic!("no {name} in {logs}"));
        u64::from_str_radix(hex, 16).unwrap()
    };
    assert_eq!(mask("SigBlk"), 0, "{logs}");
    // (Signals 32 and 33 are the C library's own, which it refuses to
    // have changed.)
    assert_eq!(mask("SigIgn") & 0x7fff_ffff, 0, "{logs}");
    assert!(
        logs.contains("held to cpu 0.5, memory 48 MiB, pids 64"),
        "{logs}"
    );
    let status = service_status(&env, "worker");
    let instance = &status["instances"][0];
    assert_eq!(instance["runtime"], "oci", "{instance}");
    assert_eq!(instance["borrows_host"], false, "{instance}");
    let id = instance["id"].as_str().unwrap().to_owned();
    let shim = instance["pid"].as_u64().unwrap();
    // shim → the container's pid 1 → the app.
    let app = sandbox_app(shim);

    // Its limits, in cgroup kiln/SCOPE/ID (every hierarchy the runtime
    // uses), as the kernel holds them.
    let memory = cgroup_of(app, "memory");
    let cpu = cgroup_of(app, "cpu");
    assert!(memory.ends_with(&id), "{}", memory.display());
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        assert_eq!(read(&memory.join("memory.max")), (48u64 << 20).to_string());
        assert_eq!(read(&cpu.join("cpu.max")), "50000 100000");
    } else {
        assert_eq!(
            read(&memory.join("memory.limit_in_bytes")),
            (48u64 << 20).to_string()
        );
        assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "50000");
    }
    assert_eq!(read(&cgroup_of(app, "pids").join("pids.max")), "64");

    // kiln upgrades itself: the container runs on, the same processes,
    // adopted by the new agent.
    let before = env.json(&["status", "--json"])["agent"]["pid"]
        .as_u64()
        .unwrap();
    env.ok(&["serve", "--upgrade"]);
    wait_for("the new agent", Duration::from_secs(20), || {
        env.run(&["status", "--json"]).status.success()
            && env.json(&["status", "--json"])["agent"]["pid"].as_u64() != Some(before)
    });
    let after = service_status(&env, "worker");
    assert_eq!(after["instances"][0]["pid"].as_u64(), Some(shim), "{after}");
    assert_eq!(sandbox_app(shim), app);
    assert!(alive(app));
    let logs = env.ok(&["logs", "worker"]);
    assert!(logs.contains("adopted by a new agent process"), "{logs}");
    assert_eq!(logs.matches("said=all").count(), 1, "not restarted: {logs}");

    // A one-off of the same release is a container of its own, as the
    // image's user; its output and exit status are the command's.
    let out = env.run(&[
        "run",
        "worker",
        "--",
        "/bin/sh",
        "-c",
        "echo one-off $(id -u) $(pwd); echo err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "one-off 1000 /home/app\n"
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    // Inside the running container: its files (its private /tmp), its user.
    let inside = env.ok(&[
        "exec",
        &id,
        "--keep",
        "--",
        "/bin/sh",
        "-c",
        "ls /tmp; id -u",
    ]);
    let lines: Vec<&str> = inside.lines().collect();
    assert!(lines.contains(&"t") && lines.contains(&"1000"), "{inside}");

    // Removed: the processes, the bundle and the cgroup go with it.
    env.ok(&["remove", "worker"]);
    wait_for("the container to end", Duration::from_secs(20), || {
        !alive(shim) && !alive(app)
    });
    assert!(!memory.exists(), "{} left behind", memory.display());
    let bundles = env.home.join("run/oci");
    let left: Vec<_> = std::fs::read_dir(&bundles)
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.iter().all(|n| n == ".state"), "bundles left: {left:?}");
    assert_eq!(
        std::fs::read_dir(bundles.join(".state")).unwrap().count(),
        0,
        "container state left"
    );
}
