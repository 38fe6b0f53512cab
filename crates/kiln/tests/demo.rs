//! `kiln demo` runs end to end (it needs the `hello` binary beside `kiln`,
//! which `cargo test --workspace` builds).
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

#[test]
fn demo_deploys_rolls_out_under_load_and_rolls_back_with_no_failed_request() {
    let kiln = std::path::Path::new(env!("CARGO_BIN_EXE_kiln"));
    let hello = kiln.with_file_name("hello");
    assert!(
        hello.is_file(),
        "build the workspace first: {} is missing",
        hello.display()
    );
    let env = util::Env::new();
    let out = env.cmd().args(["demo", "--no-wait"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("->  hello from v1 (instance hello-r1-"),
        "{stdout}"
    );
    // Issue 13: with --no-wait the agent is gone at the end: no "try it"
    // pointing at it.
    assert!(!stdout.contains("try it:"), "{stdout}");
    assert!(stdout.contains("in a temporary home"), "{stdout}");
    assert!(
        stdout.contains("rolling update done")
            && stdout.contains("->  hello from v2 (instance hello-r2-"),
        "{stdout}"
    );
    assert!(
        stdout.contains("release 3 (content of release 1) live"),
        "{stdout}"
    );
    let line = stdout
        .lines()
        .find(|l| l.contains("requests through the router"))
        .unwrap();
    assert!(line.ends_with(": 0 failed"), "{line}");
    let served: u64 = line.trim().split(' ').next().unwrap().parse().unwrap();
    assert!(served > 50, "{line}");
    assert!(stdout.contains("rollback to 1"), "{stdout}");
    assert!(
        String::from_utf8_lossy(&out.stderr).is_empty(),
        "nothing on stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// On a machine without bubblewrap (a `PATH` without it), the demo's
/// instances are containers of the embedded OCI runtime, their roots
/// read-only: never plain processes.
#[test]
fn without_bubblewrap_the_demo_runs_read_only_containers() {
    if util::my_uid() != 0 {
        eprintln!("skipped: the oci runtime needs an agent running as root (CI runs as root)");
        return;
    }
    let env = util::Env::new();
    let bin = env.path("empty-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let out = env
        .cmd()
        .env("PATH", &bin)
        .args(["demo", "--no-wait"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("plain processes"), "{stdout}");
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("hello-r"))
        .collect();
    assert!(rows.len() >= 3, "{stdout}");
    for row in rows {
        assert!(row.contains(" oci "), "{row}");
        assert!(row.contains("read-only (enforced)"), "{row}");
    }
    let line = stdout
        .lines()
        .find(|l| l.contains("requests through the router"))
        .unwrap();
    assert!(line.ends_with(": 0 failed"), "{line}");
}
