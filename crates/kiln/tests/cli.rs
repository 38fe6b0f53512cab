//! The CLI's own surface: shell completions and the manual page.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use util::Env;

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
