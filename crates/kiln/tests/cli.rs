//! The CLI's own surface: shell completions and the manual page.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use util::{Env, succeed};

#[test]
fn completions_cover_every_command_for_each_shell() {
    let env = Env::new();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = env.ok(&["completions", shell]);
        for cmd in ["apply", "rollback", "promote", "serve", "completions"] {
            assert!(out.contains(cmd), "{shell}: no {cmd}");
        }
    }
    // A usage error (exit 2, as clap's), naming the shells there are.
    let out = env.run(&["completions", "tcsh"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("'tcsh'") && err.contains("bash"), "{err}");
}

#[test]
fn the_manual_page_is_roff_and_lists_the_commands() {
    let env = Env::new();
    let man = env.ok(&["man"]);
    assert!(man.contains(".TH kiln 1"), "{man}");
    for cmd in ["apply", "status", "rollback", "serve"] {
        assert!(man.contains(cmd), "no {cmd}");
    }
}

#[test]
fn store_commands_refuse_an_explicit_agent_and_ignore_one_from_the_environment() {
    let env = Env::new();
    env.ok(&["images"]);
    for args in [
        &["images", "--agent", "https://127.0.0.1:9"][..],
        &["verify", "--agent", "https://127.0.0.1:9"],
        &["inspect", "x", "--agent=https://127.0.0.1:9"],
        &["unpack", "x", "out", "--agent", "https://127.0.0.1:9"],
    ] {
        let err = env.fails(args);
        assert!(
            err.contains("--agent does not apply to this command"),
            "{args:?}: {err}"
        );
    }
    // KILN_AGENT in the environment is for the agent commands.
    succeed(
        env.cmd()
            .arg("images")
            .env("KILN_AGENT", "https://127.0.0.1:9"),
    );
}

#[test]
fn check_validates_a_spec_offline() {
    let env = Env::new();
    let spec = env.path("kiln.toml");
    std::fs::create_dir_all(env.path("app")).unwrap();
    util::write(
        &spec,
        b"[images.app]\ncontext = \"app\"\n[services.web]\nimage = \"app\"\nlisten = \"127.0.0.1:8080\"\n",
    );
    // No agent runs, and nothing is baked.
    let ok = env.ok(&["check", "-f", spec.to_str().unwrap()]);
    assert!(ok.contains("ok (1 image, 1 service)"), "{ok}");
    assert!(!env.home.join("index.json").exists(), "nothing baked");
    let v = env.json(&["check", "-f", spec.to_str().unwrap(), "--json"]);
    assert_eq!(v["services"][0], "web");

    util::write(
        &spec,
        b"[images.app]\ncontext = \"app\"\n[services.web]\nimage = \"app\"\nreplicsa = 2\n",
    );
    let err = env.fails(&["check", "-f", spec.to_str().unwrap()]);
    assert!(
        err.contains("kiln.toml:5:") && err.contains("replicas"),
        "{err}"
    );

    util::write(&spec, b"[images.app]\ncontext = \"missing\"\n");
    let err = env.fails(&["check", "-f", spec.to_str().unwrap()]);
    assert!(
        err.contains("context") && err.contains("not a directory"),
        "{err}"
    );
}
