//! `kiln why`, black-box: from the PID of a process inside a (sandboxed)
//! instance to the git commit its image was baked from, every link checked.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::process::Command;

use util::*;

/// Processes whose parent chain reaches `pid` (not `pid` itself).
fn descendants(pid: u64) -> Vec<u64> {
    let parent = |p: u64| -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let mut cur = p;
        for _ in 0..16 {
            match parent(cur) {
                Some(pp) if pp == pid => {
                    out.push(p);
                    break;
                }
                Some(pp) if pp > 1 => cur = pp,
                _ => break,
            }
        }
    }
    out
}

#[test]
fn why_from_a_pid_inside_an_instance_reaches_the_git_commit() {
    let env = Env::new();
    let _agent = Agent::start(&env);
    let app = env.path("app");
    hello_app(&app, "");
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .arg("-C")
            .arg(&app)
            .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    git(&["commit", "-qm", "v1"]);
    git(&[
        "remote",
        "add",
        "origin",
        "https://example.invalid/hello.git",
    ]);
    let head = git(&["rev-parse", "HEAD"]);
    let port = free_port();
    let spec = env.path("kiln.toml");
    write(
        &spec,
        format!(
            "[images.app]\ncontext = \"app\"\nentrypoint = [\"/bin/start.sh\"]\n\n\
             [services.web]\nimage = \"app\"\nlisten = \"127.0.0.1:{port}\"\n"
        )
        .as_bytes(),
    );
    env.ok(&["apply", "-f", spec.to_str().unwrap()]);
    let inst = &service_status(&env, "web")["instances"][0];
    let pid = inst["pid"].as_u64().unwrap();
    require("bwrap");
    assert_eq!(inst["runtime"], "sandbox", "{inst}");
    // A process inside the instance (in the sandbox: below bubblewrap).
    let inside = descendants(pid);
    let target = inside.last().copied().unwrap_or(pid);
    let why = env.json(&["why", &target.to_string(), "--json"]);
    assert_eq!(why["instance"]["id"], inst["id"], "{why}");
    assert_eq!(why["release"]["revision"], 1);
    assert_eq!(why["provenance"][0]["commit"], head.as_str(), "{why}");
    assert_eq!(why["provenance"][0]["dirty"], false);
    assert_eq!(
        why["provenance"][0]["verified"], true,
        "made by this store's bake"
    );
    assert_eq!(
        why["provenance"][0]["source"],
        "https://example.invalid/hello.git"
    );
    assert_eq!(why["image_problems"], serde_json::json!([]));
    assert!(why["ledger_verified"]["Ok"].is_string(), "{why}");
    assert!(
        why["ledger"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "release-created"),
        "{why}"
    );
    assert_eq!(why["baked"].as_array().unwrap().len(), 1);
    // The text form names each link.
    let text = env.ok(&["why", "web"]);
    for want in [
        "release    web 1",
        "blobs and tree verified",
        &head[..12],
        "verified:",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    // A process that is not kiln's, and a name that is nothing.
    let err = env.fails(&["why", &std::process::id().to_string()]);
    assert!(err.contains("is not a process of any instance"), "{err}");
    let err = env.fails(&["why", "nothing-here"]);
    assert!(
        err.contains("no instance, process of an instance, or service"),
        "{err}"
    );
}
