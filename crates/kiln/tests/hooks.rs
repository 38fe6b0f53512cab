//! Release tasks, black-box: `pre_deploy` runs once per applied release as
//! a one-off instance of it (its env and volumes) before anything is
//! recorded or started — failing, the apply is refused with nothing
//! changed and the old release serving; a rollback, or an apply of
//! content released before, never re-runs it; a rollback
//! runs the left release's `pre_rollback` first — failing, the rollback is
//! refused. Every run is in the ledger and in `kiln logs --hook`.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use util::*;

fn spec(port: u16, version: &str, pre_deploy: &str, pre_rollback: &str) -> String {
    spec_with(port, version, pre_deploy, pre_rollback, "true")
}

fn spec_with(
    port: u16,
    version: &str,
    pre_deploy: &str,
    pre_rollback: &str,
    post_deploy: &str,
) -> String {
    format!(
        r#"
[images.app]
include = ["bin"]
entrypoint = ["/bin/start.sh"]

[services.web]
image = "app"
listen = "127.0.0.1:{port}"
env = {{ HELLO_VERSION = "{version}" }}
volumes = {{ data = "/data" }}
[services.web.health.readiness]
http = "/healthz"
interval = "200ms"
[services.web.hooks]
pre_deploy = ["/usr/bin/sh", "-c", "{pre_deploy}"]
pre_rollback = ["/usr/bin/sh", "-c", "{pre_rollback}"]
post_deploy = ["/usr/bin/sh", "-c", "{post_deploy}"]
"#
    )
}

fn migrations(env: &Env) -> String {
    std::fs::read_to_string(env.home.join("volumes/web/data/migrations")).unwrap_or_default()
}

#[test]
fn pre_deploy_and_pre_rollback_run_once_and_a_failure_changes_nothing() {
    let env = Env::new();
    let port = free_port();
    let up = "echo up-$HELLO_VERSION >> /data/migrations; echo migrated $HELLO_VERSION";
    let down = "echo down-$HELLO_VERSION >> /data/migrations";
    let path = hello_app(&env.path("app"), &spec(port, "v1", up, down));
    let spec_path = path.to_str().unwrap();
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", spec_path]);
    assert_eq!(migrations(&env), "up-v1\n");
    // Re-applying the same spec is no new release: no second run.
    env.ok(&["apply", "-f", spec_path]);
    assert_eq!(migrations(&env), "up-v1\n");
    // v2: its own pre_deploy, once.
    std::fs::write(&path, spec(port, "v2", up, down)).unwrap();
    env.ok(&["apply", "-f", spec_path]);
    assert_eq!(migrations(&env), "up-v1\nup-v2\n");
    assert!(http_get(u64::from(port), "/").unwrap().contains("v2"));
    // A failing pre_deploy: refused in one line, nothing recorded, v2 serves.
    let failing = "echo cannot migrate >&2; exit 7";
    std::fs::write(&path, spec(port, "v3", failing, down)).unwrap();
    let err = env.fails(&["apply", "-f", spec_path]);
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(
        last.contains("the pre_deploy hook of release 3 failed (exit status: 7)")
            && last.contains("nothing changed"),
        "{err}"
    );
    assert_eq!(releases(&env, "web").len(), 2, "nothing recorded");
    assert!(http_get(u64::from(port), "/").unwrap().contains("v2"));
    let hooks = env.ok(&["logs", "web", "--hook"]);
    assert!(
        hooks.contains("migrated v2") && hooks.contains("cannot migrate"),
        "{hooks}"
    );
    assert!(
        !env.ok(&["logs", "web", "--hook", "--release", "1"])
            .contains("v2")
    );
    // A rollback runs the left release's pre_rollback, never pre_deploy.
    env.ok(&["rollback", "web"]);
    assert_eq!(migrations(&env), "up-v1\nup-v2\ndown-v2\n");
    // A failing pre_rollback refuses the rollback.
    std::fs::write(&path, spec(port, "v4", up, "exit 5")).unwrap();
    env.ok(&["apply", "-f", spec_path]);
    let before = releases(&env, "web").len();
    let err = env.fails(&["rollback", "web"]);
    assert!(err.contains("the pre_rollback hook of release"), "{err}");
    assert!(err.contains("(exit status: 5)"), "{err}");
    assert_eq!(releases(&env, "web").len(), before, "nothing recorded");
    assert!(http_get(u64::from(port), "/").unwrap().contains("v4"));
    // Back to v2's content by an apply: it ran its pre_deploy when it was
    // first released, not again.
    let before = migrations(&env);
    std::fs::write(&path, spec(port, "v2", up, down)).unwrap();
    env.ok(&["apply", "-f", spec_path]);
    assert_eq!(migrations(&env), before);
    // Each run, in the ledger: six pre_deploy and pre_rollback runs, and
    // each applied release's post_deploy (v1, v2, v4, v2 again: `true`).
    wait_for("ten hook runs", std::time::Duration::from_secs(10), || {
        actors_of(&env, &["hook-run"]).len() == 10
    });
}

/// `post_deploy` runs once the release is live; failing, the release fails
/// as a crash loop inside its watch does and the service is back on the
/// release before it, whose warm instances take the traffic again.
#[test]
fn a_failing_post_deploy_returns_to_the_release_before() {
    let env = Env::new();
    let port = free_port();
    let smoke = "echo smoke-$HELLO_VERSION >> /data/smoke";
    let path = hello_app(
        &env.path("app"),
        &spec_with(port, "v1", "true", "true", smoke),
    );
    let spec_path = path.to_str().unwrap();
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", spec_path]);
    let smoked =
        || std::fs::read_to_string(env.home.join("volumes/web/data/smoke")).unwrap_or_default();
    wait_for(
        "v1's post_deploy",
        std::time::Duration::from_secs(30),
        || smoked() == "smoke-v1\n",
    );
    let bad = "echo smoke-$HELLO_VERSION >> /data/smoke; exit 9";
    std::fs::write(&path, spec_with(port, "v2", "true", "true", bad)).unwrap();
    // The apply ends once release 2 is live; the hook may fail before the
    // command's last look (then it says so and exits 1) or after.
    let out = env.run(&["apply", "-f", spec_path]);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("the post_deploy hook of release 2 failed (exit status: 9); the service is back on release 1"),
            "{err}"
        );
    }
    wait_for(
        "release 2 failed and v1 serving",
        std::time::Duration::from_secs(30),
        || {
            let r = releases(&env, "web");
            r.len() == 2
                && r[1]["outcome"] == "failed"
                && http_get(u64::from(port), "/").is_some_and(|b| b.contains("v1"))
        },
    );
    let r = releases(&env, "web");
    assert!(
        r[1]["reason"]
            .as_str()
            .unwrap()
            .contains("the post_deploy hook of release 2 failed (exit status: 9)"),
        "{r:?}"
    );
    assert_eq!(smoked(), "smoke-v1\nsmoke-v2\n");
}
