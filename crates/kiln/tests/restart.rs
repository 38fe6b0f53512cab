//! kiln itself restarts, upgrades and crashes under steady load through
//! the router, with every instance kept: `kiln serve` is a supervisor that
//! holds the sockets and the instances' output pipes; its agent process
//! may come and go.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use util::*;

/// These tests start agents, instances and load at once, and time
/// hand-overs: one at a time, so that they do not starve each other's
/// processes on a small machine (CI's two cores).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn spec(port: u16, extra_env: &str) -> String {
    format!(
        r#"
[images.app]
include = ["bin"]
entrypoint = ["/bin/start.sh"]

[services.web]
image = "app"
replicas = 3
listen = "127.0.0.1:{port}"
env = {{ HELLO_VERSION = "v1"{extra_env} }}
[services.web.health.readiness]
http = "/healthz"
interval = "200ms"
[services.web.stop]
drain_timeout = "2s"
kill_timeout = "2s"
"#
    )
}

fn agent_pid(env: &Env) -> u64 {
    env.json(&["status", "--json"])["agent"]["pid"]
        .as_u64()
        .unwrap()
}

fn instance_pids(env: &Env) -> BTreeSet<u64> {
    pids_of(&service_status(env, "web"), None)
}

/// The pids of a status' instances (of `revision`, when given).
fn pids_of(status: &serde_json::Value, revision: Option<u64>) -> BTreeSet<u64> {
    status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| revision.is_none_or(|r| i["revision"] == r))
        .map(|i| i["pid"].as_u64().unwrap())
        .collect()
}

/// A service of three ready instances behind the router on `port`.
fn serving(env: &Env, port: u16) -> std::path::PathBuf {
    let path = hello_app(&env.path("app"), &spec(port, ""));
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    path
}

/// Release 2, slow to start, applied without waiting: a rollout that is
/// still in progress when this returns.
fn rollout_in_progress(env: &Env, port: u16, path: &Path) {
    write(
        path,
        spec(port, ", HELLO_START_DELAY = \"0.5\"")
            .replace("\"v1\"", "\"v2\"")
            .as_bytes(),
    );
    env.ok(&["apply", "-f", path.to_str().unwrap(), "--detach"]);
    util::until_rolling_out(env, "web", 2);
}

fn release_2_whole(env: &Env) {
    wait_for("release 2 whole", Duration::from_secs(60), || {
        let s = service_status(env, "web");
        s["converged"] == true && s["revision"] == 2
    });
}

/// `kiln serve` run from a copy of the binary (which an upgrade replaces).
fn serve_from_copy(env: &Env) -> (std::path::PathBuf, Agent) {
    let exe = env.path("bin/kiln");
    std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_kiln"), &exe).unwrap();
    let mut cmd = std::process::Command::new(&exe);
    cmd.env("KILN_HOME", &env.home);
    let agent = Agent::start_command(env, cmd);
    (exe, agent)
}

fn signal(pid: u64, sig: &str) {
    assert!(
        std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

fn kill9(pid: u64) {
    signal(pid, "-9");
}

/// Only what was in flight in each of `kills` killed agent processes
/// failed (one request per client at most), and no connection was
/// refused: the sockets stay open in the supervisor.
fn only_in_flight_failed(count: &LoadCount, threads: usize, kills: u64) {
    assert!(
        count.failed <= kills * threads as u64,
        "{} failed: {:?}",
        count.failed,
        count.errors
    );
    assert!(
        !count.errors.iter().any(|e| e.starts_with("connect")),
        "{:?}",
        count.errors
    );
}

/// Until another agent than `before` serves the home.
fn another_agent(env: &Env, before: u64) {
    wait_for("another agent", Duration::from_secs(20), || {
        env.run(&["status", "--json"]).status.success() && agent_pid(env) != before
    });
}

/// `kill -9` of the agent process, until the supervisor's next one serves.
fn crash_agent(env: &Env) {
    let before = agent_pid(env);
    kill9(before);
    another_agent(env, before);
}

/// `kiln serve --upgrade`, until the new agent serves.
fn upgrade_agent(env: &Env) {
    let before = agent_pid(env);
    env.ok(&["serve", "--upgrade"]);
    another_agent(env, before);
}

/// Release 1 of the service with `rollout` appended to its spec, applied;
/// release 2 (`v2`, with `extra_env`) written, not applied. The spec's path.
fn v1_applied_v2_written(env: &Env, port: u16, rollout: &str, extra_env: &str) -> PathBuf {
    let path = hello_app(&env.path("app"), &format!("{}{rollout}", spec(port, "")));
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    let v2 = spec(port, extra_env).replace("\"v1\"", "\"v2\"");
    write(&path, format!("{v2}{rollout}").as_bytes());
    path
}

/// Release 2's canary waits at step 2's manual pause (50%).
fn canary_at_step_2(env: &Env) -> bool {
    let s = service_status(env, "web");
    s["revision"] == 2
        && s["outcome"] == "pending"
        && s["canary"]["step"] == 2
        && s["canary"]["weight"] == 50
        && s["canary"]["waiting"]
            .as_str()
            .is_some_and(|w| w.contains("kiln promote web"))
}

/// Release 1 deployed with `rollout` (a [`TWO_MANUAL_STEPS`] canary), then
/// release 2 applied (it returns at step 1's pause) and promoted, until it
/// waits at step 2.
fn canary_waiting_at_step_2(env: &Env, port: u16, rollout: &str) {
    let path = v1_applied_v2_written(env, port, rollout, "");
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    env.ok(&["promote", "web"]);
    wait_for("the canary at step 2", Duration::from_secs(30), || {
        canary_at_step_2(env)
    });
}

#[test]
fn a_graceful_restart_keeps_every_instance_and_loses_no_request() {
    let _serial = one_at_a_time();
    let env = Env::new();
    let port = free_port();
    let _agent = Agent::start(&env);
    serving(&env, port);
    let (pids, before) = (instance_pids(&env), agent_pid(&env));
    let load = Load::start(port, 4);
    std::thread::sleep(Duration::from_millis(300));
    let out = env.ok(&["serve", "--upgrade"]);
    std::thread::sleep(Duration::from_millis(500));
    let count = load.finish();
    count.assert_none_failed();
    assert!(count.ok > 100, "{count:?}");
    assert_ne!(agent_pid(&env), before, "{out}");
    assert_eq!(instance_pids(&env), pids, "no instance was replaced");
    let s = service_status(&env, "web");
    assert_eq!(s["converged"], true);
    // Their uptime counts from their start, not from the adoption.
    assert!(
        s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["uptime_secs"].as_f64().unwrap() > 0.7),
        "{s}"
    );
}

/// The kiln binary with another build id stamped in: another build of the
/// same source, as `kiln status` tells.
fn another_build(to: &Path) {
    let mut bytes = std::fs::read(env!("CARGO_BIN_EXE_kiln")).unwrap();
    let (from, into) = (
        b"kiln-build-id:0000000000000000",
        b"kiln-build-id:upgradetest00001",
    );
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("the build id in the binary");
    bytes[at..at + from.len()].copy_from_slice(into);
    let tmp = to.with_extension("new");
    std::fs::write(&tmp, bytes).unwrap();
    chmod(&tmp, 0o755);
    // As an upgrade does: the new file replaces the old one's name.
    std::fs::rename(&tmp, to).unwrap();
}

#[test]
fn an_upgrade_to_another_build_takes_over_with_no_request_lost() {
    let _serial = one_at_a_time();
    let env = Env::new();
    let port = free_port();
    let (exe, _agent) = serve_from_copy(&env);
    serving(&env, port);
    let pids = instance_pids(&env);
    let version = |env: &Env| env.json(&["status", "--json"])["agent"]["version"].clone();
    assert_eq!(version(&env), env!("CARGO_PKG_VERSION"));
    let load = Load::start(port, 4);
    std::thread::sleep(Duration::from_millis(300));
    another_build(&exe);
    env.ok(&["serve", "--upgrade"]);
    std::thread::sleep(Duration::from_millis(500));
    let count = load.finish();
    count.assert_none_failed();
    assert!(count.ok > 100, "{count:?}");
    assert_eq!(
        version(&env),
        format!("{}+upgradetest00001", env!("CARGO_PKG_VERSION")),
        "the new build serves"
    );
    let log = std::fs::read_to_string(env.path("agent.log")).unwrap_or_default();
    assert_eq!(
        instance_pids(&env),
        pids,
        "no instance was replaced; kiln serve's log:\n{log}"
    );
}

#[test]
fn a_killed_agent_is_replaced_at_once_and_adopts_every_instance() {
    let _serial = one_at_a_time();
    let env = Env::new();
    let port = free_port();
    let _agent = Agent::start(&env);
    serving(&env, port);
    let (pids, before) = (instance_pids(&env), agent_pid(&env));
    let threads = 4;
    let load = Load::start(port, threads);
    std::thread::sleep(Duration::from_millis(300));
    kill9(before);
    another_agent(&env, before);
    std::thread::sleep(Duration::from_millis(500));
    let count = load.finish();
    only_in_flight_failed(&count, threads, 1);
    assert_eq!(instance_pids(&env), pids, "no instance was replaced");
    assert_eq!(service_status(&env, "web")["converged"], true);
}

#[test]
fn a_rollout_interrupted_by_the_agents_death_finishes_under_the_next() {
    let _serial = one_at_a_time();
    let env = Env::new();
    let port = free_port();
    let _agent = Agent::start(&env);
    let path = serving(&env, port);
    rollout_in_progress(&env, port, &path);
    let before = agent_pid(&env);
    kill9(before);
    release_2_whole(&env);
    assert_ne!(agent_pid(&env), before);
    let r = releases(&env, "web");
    assert_eq!(
        (&r[0]["outcome"], &r[1]["outcome"]),
        (&"superseded".into(), &"active".into())
    );
    assert!(
        http_get(port.into(), "/")
            .unwrap()
            .starts_with("hello from v2")
    );
}

#[test]
fn output_written_while_no_agent_runs_is_all_in_the_log() {
    let _serial = one_at_a_time();
    let env = Env::new();
    let port = free_port();
    let mut agent = Agent::start(&env);
    let app = env.path("app");
    let path = hello_app(
        &app,
        &spec(port, "").replace("replicas = 3", "replicas = 1"),
    );
    // The instance counts aloud, every 20 ms, whoever listens.
    write(
        &app.join("bin/start.sh"),
        b"#!/usr/bin/sh\n\
          (i=0; while [ $i -lt 100000 ]; do i=$((i+1)); echo \"tick $i\"; sleep 0.02; done) &\n\
          exec ./bin/hello\n",
    );
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    let log = || {
        let dir = env.home.join("logs/web");
        let f = std::fs::read_dir(&dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::read_to_string(f).unwrap()
    };
    wait_for("ticks in the log", Duration::from_secs(10), || {
        log().contains(" tick 5\n")
    });
    // Each line as kept: the time it was read, a space, the app's line.
    let ticks_in = |text: &str| -> Vec<u64> {
        text.lines()
            .filter_map(|l| {
                l.split_once(' ')
                    .and_then(|(_, rest)| rest.strip_prefix("tick "))
            })
            .map(|n| n.trim().parse().unwrap())
            .collect()
    };
    // No agent reads the pipe for a while: the instance goes on writing.
    let before = agent_pid(&env);
    kill9(before);
    // What the killed process wrote: the one chunk it may have read and not
    // written (in flight when it died) is all a kill may lose.
    let at_death = ticks_in(&log()).last().copied().unwrap();
    another_agent(&env, before);
    std::thread::sleep(Duration::from_millis(500));
    env.ok(&["serve", "--upgrade"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(agent.stop(), Some(0));
    let ticks = ticks_in(&log());
    let last = *ticks.last().unwrap();
    assert!(
        last > at_death + 20,
        "{} ticks after the kill",
        last - at_death
    );
    // Every line, in order, none twice: from the first to the last, except
    // at most one run right after what the killed process had written.
    let resumed = ticks
        .iter()
        .position(|t| *t > at_death)
        .map_or(ticks.len(), |i| i);
    // From `tick 1`. (Once in about twenty runs the log began at `tick 2`:
    // the app's `eprintln!` writes its line in pieces, and `tick 1` from
    // stdout was glued into the middle of it. Each stream's lines are now
    // assembled whole before they are written.)
    let expected: Vec<u64> = (1..=at_death).collect();
    let head: Vec<String> = log().lines().take(8).map(str::to_owned).collect();
    assert_eq!(
        &ticks[..resumed],
        &expected[..],
        "up to the kill; the log begins {head:#?}"
    );
    let first_after = ticks[resumed];
    assert!(
        first_after - at_death <= 8,
        "lost {} lines at the kill (one chunk in flight at most)",
        first_after - at_death - 1
    );
    let expected: Vec<u64> = (first_after..=last).collect();
    assert_eq!(
        &ticks[resumed..],
        &expected[..],
        "everything written while no agent ran, and after"
    );
}

#[test]
fn stopping_kiln_still_stops_everything() {
    let _serial = one_at_a_time();
    let env = Env::new();
    let port = free_port();
    let mut agent = Agent::start(&env);
    serving(&env, port);
    let pids = instance_pids(&env);
    let agent_process = agent_pid(&env);
    assert_eq!(agent.stop(), Some(0));
    for p in pids.iter().chain([&agent_process]) {
        assert!(!alive(*p), "process {p} survived");
    }
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

/// As systemd's socket activation starts it: the API socket and a
/// service's listener made beforehand, passed as descriptors 3 and 4 with
/// LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES.
#[test]
fn socket_activation_serves_the_sockets_it_was_given() {
    let _serial = one_at_a_time();
    let env = Env::new();
    let port = free_port();
    std::fs::create_dir_all(&env.home).unwrap();
    let api = std::os::unix::net::UnixListener::bind(env.home.join("kiln.sock")).unwrap();
    let web = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let child = std::process::Command::new("sh")
        .args([
            "-c",
            "exec 3<&0 4>&1 </dev/null >/dev/null; \
             LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=api:service=web exec \"$0\" serve",
            env!("CARGO_BIN_EXE_kiln"),
        ])
        .env("KILN_HOME", &env.home)
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(api)))
        .stdout(std::process::Stdio::from(std::os::fd::OwnedFd::from(web)))
        .stderr(std::fs::File::create(env.path("agent.log")).unwrap())
        .spawn()
        .unwrap();
    let _agent = Agent {
        child: Some(child),
        home: env.home.clone(),
    };
    wait_for(
        "the agent on the given socket",
        Duration::from_secs(20),
        || env.run(&["status", "--json"]).status.success(),
    );
    serving(&env, port);
    assert!(
        http_get(port.into(), "/")
            .unwrap()
            .starts_with("hello from v1")
    );
    let log = std::fs::read_to_string(env.path("agent.log")).unwrap();
    assert!(
        log.contains("socket activation: ") && log.contains("listen:service:web"),
        "{log}"
    );
}

#[test]
fn a_rollout_goes_on_under_the_agent_an_upgrade_hands_over_to() {
    let _serial = one_at_a_time();
    let env = Env::new();
    let port = free_port();
    let _agent = Agent::start(&env);
    let path = serving(&env, port);
    rollout_in_progress(&env, port, &path);
    let load = Load::start(port, 2);
    env.ok(&["serve", "--upgrade"]);
    release_2_whole(&env);
    let count = load.finish();
    count.assert_none_failed();
    assert!(count.bodies.contains_key("hello from v2"), "{count:?}");
}

#[test]
fn an_upgrade_to_a_binary_that_cannot_run_leaves_the_running_agent_serving() {
    let _serial = one_at_a_time();
    let env = Env::new();
    let port = free_port();
    let (exe, agent) = serve_from_copy(&env);
    serving(&env, port);
    let (pids, before) = (instance_pids(&env), agent_pid(&env));
    let load = Load::start(port, 2);
    // A broken build in place of the binary.
    let tmp = exe.with_extension("new");
    write(&tmp, b"#!/bin/sh\necho broken build >&2\nexit 3\n");
    chmod(&tmp, 0o755);
    std::fs::rename(&tmp, &exe).unwrap();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &agent.pid().to_string()])
            .status()
            .unwrap()
            .success()
    );
    std::thread::sleep(Duration::from_secs(1));
    let count = load.finish();
    count.assert_none_failed();
    assert_eq!(agent_pid(&env), before, "the running agent stays");
    assert_eq!(instance_pids(&env), pids);
    wait_for("the failed upgrade logged", Duration::from_secs(20), || {
        std::fs::read_to_string(env.path("agent.log"))
            .is_ok_and(|log| log.contains("exited before taking over"))
    });
}

#[test]
fn an_instance_that_died_with_the_agent_is_replaced_and_the_others_adopted() {
    let _serial = one_at_a_time();
    let env = Env::new();
    let port = free_port();
    let _agent = Agent::start(&env);
    serving(&env, port);
    let pids = instance_pids(&env);
    let before = agent_pid(&env);
    let gone = *pids.iter().next().unwrap();
    // The agent and one instance die together: the next agent finds two of
    // its three instances still running (adopted) and one it cannot
    // account for (recorded lost or exited, and replaced).
    // Stopped first, the agent cannot end the instance's inner processes.
    signal(before, "-STOP");
    kill9(gone);
    std::thread::sleep(Duration::from_millis(100));
    kill9(before);
    wait_for(
        "three ready instances again",
        Duration::from_secs(30),
        || {
            env.run(&["status", "--json"]).status.success()
                && agent_pid(&env) != before
                && service_status(&env, "web")["converged"] == true
        },
    );
    let now = instance_pids(&env);
    assert_eq!(now.len(), 3);
    assert!(!now.contains(&gone));
    assert_eq!(
        now.intersection(&pids).count(),
        2,
        "the other two were adopted"
    );
    assert!(!alive(gone));
    // Nothing of the lost one survives: not its sandbox's reaper, which the
    // dead agent could not end (the next one ends what no record names).
    let home = env.home.to_str().unwrap().to_owned();
    require("bwrap");
    // An outer bwrap and its reaper per sandboxed instance.
    let per_instance = 2;
    wait_for(
        "only the live instances' processes",
        Duration::from_secs(10),
        || processes_mentioning(&home).len() == 3 * per_instance,
    );
}

/// Issue 23: a rollout's state lived only in the controller's memory: a
/// canary waiting at its second step went back to its first after an
/// upgrade or a crash of the agent, and the watch of a release that went
/// live was dropped. Across `kill -9` of the agent process and across
/// `kiln serve --upgrade`, under load: the canary keeps its step, weight
/// and manual pause, every instance is kept, no request fails, and after
/// `promote` the release it went live as keeps its watch's end.
#[test]
fn a_rollout_survives_a_crash_and_an_upgrade_of_the_agent() {
    let _serial = one_at_a_time();
    let env = Env::new();
    let port = free_port();
    let _agent = Agent::start(&env);
    let canary = format!("{TWO_MANUAL_STEPS}watch = \"10m\"\n");
    canary_waiting_at_step_2(&env, port, &canary);
    let pids = instance_pids(&env);
    let threads = 4;
    let load = Load::start(port, threads);

    crash_agent(&env);
    wait_for(
        "the canary still at step 2 after kill -9",
        Duration::from_secs(20),
        || canary_at_step_2(&env),
    );
    upgrade_agent(&env);
    wait_for(
        "the canary still at step 2 after an upgrade",
        Duration::from_secs(20),
        || canary_at_step_2(&env),
    );
    assert_eq!(instance_pids(&env), pids, "no instance was replaced");
    assert_eq!(releases(&env, "web")[1]["outcome"], "pending");

    // Promoted: the last step, then live and watched.
    env.ok(&["promote", "web"]);
    wait_for(
        "release 2 live and watched",
        Duration::from_secs(30),
        || {
            let s = service_status(&env, "web");
            s["revision"] == 2 && s["outcome"] == "active" && s["watched_until"].is_string()
        },
    );
    let until = service_status(&env, "web")["watched_until"].clone();
    crash_agent(&env);
    wait_for(
        "the watch kept after kill -9",
        Duration::from_secs(20),
        || service_status(&env, "web")["watched_until"] == until,
    );
    upgrade_agent(&env);
    wait_for(
        "the watch kept after an upgrade",
        Duration::from_secs(20),
        || {
            let s = service_status(&env, "web");
            s["watched_until"] == until && s["converged"] == true
        },
    );
    let count = load.finish();
    // Two kills; the upgrade loses nothing.
    only_in_flight_failed(&count, threads, 2);
    assert!(count.ok > 100, "{count:?}");
}

/// Issue 23, the blue-green rows, under load: a `kiln promote` given
/// while the new fleet still starts is kept across `kill -9` and across an
/// upgrade (the switch happens when it is ready, with no second promote),
/// and the old fleet then stays warm for its `scale_down_delay` across an
/// upgrade and across `kill -9`.
#[test]
fn a_pending_promote_and_a_warm_window_survive_the_agent() {
    let _serial = one_at_a_time();
    let env = Env::new();
    let port = free_port();
    let _agent = Agent::start(&env);
    let bg = "[services.web.rollout]\nstrategy = \"blue-green\"\nauto_promote = false\nscale_down_delay = \"10m\"\nprogress_deadline = \"60s\"\n";
    let path = v1_applied_v2_written(&env, port, bg, ", HELLO_START_DELAY = \"2\"");
    let v1 = instance_pids(&env);
    let threads = 4;
    let load = Load::start(port, threads);
    env.ok(&["apply", "-f", path.to_str().unwrap(), "--detach"]);
    until_rolling_out(&env, "web", 2);
    // Promoted before the new fleet is ready; the agent dies at once.
    env.ok(&["promote", "web"]);
    crash_agent(&env);
    wait_for(
        "the switch, with no second promote",
        Duration::from_secs(30),
        || {
            let s = service_status(&env, "web");
            s["outcome"] == "active" && s["routed"] == 2 && s["warm"] == true
        },
    );
    upgrade_agent(&env);
    // The new agent has had passes: the warm fleet is release 1's, kept.
    wait_for("a pass of the new agent", Duration::from_secs(20), || {
        service_status(&env, "web")["converged"] == true
    });
    let s = service_status(&env, "web");
    assert_eq!(s["warm"], true, "{s}");
    assert_eq!(
        pids_of(&s, Some(1)),
        v1,
        "release 1's fleet is kept warm: {s}"
    );
    crash_agent(&env);
    wait_for("a pass of the next agent", Duration::from_secs(20), || {
        let s = service_status(&env, "web");
        s["converged"] == true && s["warm"] == true
    });
    let s = service_status(&env, "web");
    assert_eq!(pids_of(&s, Some(1)), v1, "still warm after kill -9: {s}");

    // Release 3, promoted before it is ready; then an upgrade.
    let v3 = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"v2\"", "\"v3\"");
    write(&path, v3.as_bytes());
    env.ok(&["apply", "-f", path.to_str().unwrap(), "--detach"]);
    until_rolling_out(&env, "web", 3);
    env.ok(&["promote", "web"]);
    upgrade_agent(&env);
    wait_for(
        "the switch to 3 after the upgrade, with no second promote",
        Duration::from_secs(30),
        || {
            let s = service_status(&env, "web");
            s["revision"] == 3 && s["outcome"] == "active" && s["routed"] == 3
        },
    );
    let count = load.finish();
    // Two kills; the upgrade loses nothing.
    only_in_flight_failed(&count, threads, 2);
    assert!(count.ok > 100, "{count:?}");
}

/// Issue 23, the paused row: a rollout paused by a failure with
/// `auto_rollback = false` stays paused across `kill -9` and across an
/// upgrade (no new deadline, no second failure recorded), with release 1
/// serving meanwhile under load.
#[test]
fn a_paused_rollout_stays_paused_across_the_agents_death() {
    let _serial = one_at_a_time();
    let env = Env::new();
    let port = free_port();
    let _agent = Agent::start(&env);
    let paused = "[services.web.rollout]\nprogress_deadline = \"1s\"\nauto_rollback = false\n";
    let path = v1_applied_v2_written(&env, port, paused, ", HELLO_FAIL_HEALTH = \"1\"");
    env.fails(&["apply", "-f", path.to_str().unwrap()]);
    let pauses = |env: &Env| {
        env.ok(&["audit", "--kind", "rollout-paused", "--json"])
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count()
    };
    assert_eq!(pauses(&env), 1);
    assert_eq!(service_status(&env, "web")["stalled"], true);
    let threads = 4;
    let load = Load::start(port, threads);
    crash_agent(&env);
    wait_for("the new agent's passes", Duration::from_secs(20), || {
        service_status(&env, "web")["stalled"] == true
    });
    // Past the progress deadline again: a rollout that started over would
    // have failed (and paused) a second time.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(pauses(&env), 1, "paused once");
    let s = service_status(&env, "web");
    assert_eq!(
        (&s["stalled"], &s["outcome"]),
        (&true.into(), &"pending".into()),
        "{s}"
    );
    upgrade_agent(&env);
    wait_for(
        "the upgraded agent's passes",
        Duration::from_secs(20),
        || service_status(&env, "web")["stalled"] == true,
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(pauses(&env), 1, "still paused once after the upgrade");
    let count = load.finish();
    only_in_flight_failed(&count, threads, 1);
    assert!(count.ok > 100, "{count:?}");
}

/// Issue 23, the stop-and-start column: `kiln serve` stopped (its
/// instances stopped with it) and started again, the canary is at its
/// step, its fleets started again.
#[test]
fn a_canary_goes_on_at_its_step_after_kiln_is_stopped_and_started() {
    let _serial = one_at_a_time();
    let env = Env::new();
    let port = free_port();
    let mut agent = Agent::start(&env);
    canary_waiting_at_step_2(&env, port, TWO_MANUAL_STEPS);
    let before = instance_pids(&env);
    assert_eq!(agent.stop(), Some(0));
    let _agent = Agent::start(&env);
    wait_for(
        "the canary at step 2 again, its fleets whole",
        Duration::from_secs(30),
        || {
            let s = service_status(&env, "web");
            canary_at_step_2(&env)
                && s["ready"].as_u64().is_some()
                && instance_pids(&env).len() == 5
        },
    );
    assert!(
        instance_pids(&env).is_disjoint(&before),
        "kiln stopped its instances; these are new"
    );
}
