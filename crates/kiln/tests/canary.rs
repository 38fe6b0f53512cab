//! Canary rollouts through the real router: steps and their weights, the
//! automatic analysis from the router's own numbers, abort (automatic and
//! by hand) as one swap back to stable, and the split itself.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::collections::BTreeSet;
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;
use util::{
    Agent, Env, Load, actors_of, alive, free_port, hello_app, http_get, releases, request,
    service_status, wait_for, write,
};

/// Service `web` (3 replicas) as a canary with `rollout` (steps, analysis).
fn spec(port: u16, env: &str, rollout: &str) -> String {
    format!(
        r#"
[images.app]
include = ["bin"]
entrypoint = ["/bin/start.sh"]

[services.web]
image = "app"
replicas = 3
listen = "127.0.0.1:{port}"
env = {{ {env} }}
[services.web.health.readiness]
http = "/healthz"
interval = "200ms"
[services.web.rollout]
strategy = "canary"
{rollout}
"#
    )
}

/// Whether every instance in status `s` (stopping ones too) is of `revision`.
/// The canary went live on `revision`: it has all the traffic, and the
/// release before is kept warm beside it through the watch.
fn live_on(s: &Value, revision: u64) -> bool {
    s["revision"] == revision
        && s["outcome"] == "active"
        && s["converged"] == true
        && s["routed"] == revision
        && s["warm"] == true
}

fn all_on(s: &Value, revision: u64) -> bool {
    s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["revision"] == revision)
}

/// Pids of the running (not stopping) instances of `revision`.
fn pids_of(s: &Value, revision: u64) -> BTreeSet<u64> {
    s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["revision"] == revision && i["state"] != "stopping")
        .filter_map(|i| i["pid"].as_u64())
        .collect()
}

/// `n` requests on one keep-alive connection: how many v1 and v2 answered.
fn versions(port: u16, n: usize) -> (usize, usize) {
    let mut c = BufReader::new(TcpStream::connect(("127.0.0.1", port)).unwrap());
    let (mut v1, mut v2) = (0, 0);
    for _ in 0..n {
        let (status, body) = request(&mut c, "/").unwrap();
        assert_eq!(status, 200, "{body}");
        if body.starts_with("hello from v1") {
            v1 += 1;
        } else if body.starts_with("hello from v2") {
            v2 += 1;
        } else {
            panic!("unexpected body {body:?}");
        }
    }
    (v1, v2)
}

/// One request with an optional `Cookie` header: (status, body, set-cookie).
fn get_with_cookie(port: u16, cookie: Option<&str>) -> (u16, String, Option<String>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let cookie = cookie.map_or(String::new(), |c| format!("cookie: {c}\r\n"));
    s.write_all(
        format!("GET / HTTP/1.1\r\nhost: x\r\n{cookie}connection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let set_cookie = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("set-cookie")
            .then(|| v.trim().to_owned())
    });
    (head[9..12].parse().unwrap(), body.to_owned(), set_cookie)
}

/// A fresh agent running `web` at v1 with `rollout`: (env, port, spec
/// path, agent).
fn deployed_v1(rollout: &str) -> (Env, u16, std::path::PathBuf, Agent) {
    let env = Env::new();
    let port = free_port();
    let path = hello_app(
        &env.path("app"),
        &spec(port, "HELLO_VERSION = \"v1\"", rollout),
    );
    let agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    (env, port, path, agent)
}

/// One manual step at 50%, then all traffic.
const MANUAL_50: &str = "steps = [{ weight = 50, pause = \"manual\" }, { weight = 100 }]\n";

/// Write v2 of `web`, apply it without waiting, and wait for the canary to
/// take `weight` percent.
fn start_canary_v2(env: &Env, path: &std::path::Path, port: u16, rollout: &str, weight: u64) {
    write(
        path,
        spec(port, "HELLO_VERSION = \"v2\"", rollout).as_bytes(),
    );
    env.ok(&["apply", "-f", path.to_str().unwrap(), "--detach"]);
    wait_for(
        "the canary to take its weight",
        Duration::from_secs(30),
        || service_status(env, "web")["canary"]["weight"] == weight,
    );
}

const ANALYSIS: &str =
    "[services.web.rollout.analysis]\nmax_error_rate = \"5%\"\nmin_requests = 100\n";

#[test]
fn a_canary_answering_5xx_at_20_percent_is_aborted_and_traffic_returns_to_stable() {
    let rollout =
        format!("steps = [{{ weight = 20, pause = \"60s\" }}, {{ weight = 100 }}]\n{ANALYSIS}");
    let (env, port, path, _agent) = deployed_v1(&rollout);
    let load = Load::start(port, 2);
    write(
        &path,
        spec(
            port,
            "HELLO_VERSION = \"v2\", HELLO_ERROR_RATE = \"0.2\"",
            &rollout,
        )
        .as_bytes(),
    );
    // Keep the canary's pids while it runs, to check they are gone after.
    let mut apply = env
        .cmd()
        .args(["apply", "-f", path.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut canary_pids = BTreeSet::new();
    while apply.try_wait().unwrap().is_none() {
        canary_pids.extend(pids_of(&service_status(&env, "web"), 2));
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut err = String::new();
    apply
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!apply.wait().unwrap().success(), "apply succeeded: {err}");
    assert!(
        err.contains(
            "release 2 failed: canary analysis failed at step 1/2 (weight 20%): error rate"
        ) && err.contains("above max_error_rate 5%")
            && err.contains("back on release 1"),
        "{err}"
    );
    assert!(!canary_pids.is_empty(), "the canary ran");

    // No canary instance left, and every request is stable's.
    wait_for("the canary fleet to stop", Duration::from_secs(15), || {
        canary_pids.iter().all(|p| !alive(*p))
    });
    let s = service_status(&env, "web");
    assert!(all_on(&s, 1), "{s}");
    assert_eq!(versions(port, 200), (200, 0), "all traffic on stable");
    assert_eq!(s["failed_release"]["revision"], 2, "{s}");
    assert!(
        s["failed_release"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("canary analysis failed at step 1/2 (weight 20%): error rate"),
        "status shows why: {s}"
    );
    let text = env.ok(&["status", "web"]);
    assert!(
        text.contains("release 2 failed: canary analysis failed"),
        "{text}"
    );
    let r = releases(&env, "web");
    assert_eq!(r[1]["outcome"], "failed");
    let reason = r[1]["reason"].as_str().unwrap();
    assert!(
        reason.contains("requests) above max_error_rate 5%; stable 0.0%"),
        "history keeps the numbers: {reason}"
    );
    assert_eq!(r[0]["outcome"], "active");

    // The only failures clients saw are the canary's own 500s: the router
    // lost nothing, and stable answered everything else.
    let count = load.finish();
    assert!(
        count.errors.iter().all(|e| e.starts_with("500: ")),
        "{:?}",
        &count.errors[..count.errors.len().min(5)]
    );
    assert!(count.bodies.contains_key("hello from v1"));
}

#[test]
fn a_healthy_canary_is_promoted_through_every_step() {
    let env = Env::new();
    let port = free_port();
    let rollout = format!(
        "steps = [{{ weight = 25, pause = \"1s\" }}, {{ weight = 50, pause = \"manual\" }}, {{ weight = 100, pause = \"500ms\" }}]\n{}",
        ANALYSIS.replace("min_requests = 100", "min_requests = 20")
    );
    let path = hello_app(
        &env.path("app"),
        &spec(port, "HELLO_VERSION = \"v1\"", &rollout),
    );
    let metrics = free_port();
    let _agent = Agent::start_with(&env, |c| {
        c.args(["--metrics", &format!("127.0.0.1:{metrics}")]);
    });
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    let load = Load::start(port, 2);
    write(
        &path,
        spec(port, "HELLO_VERSION = \"v2\"", &rollout).as_bytes(),
    );
    env.ok(&["apply", "-f", path.to_str().unwrap(), "--detach"]);

    // Step 1 at 25% (one canary instance), then step 2 at 50% (two), where
    // the manual pause holds it.
    let mut seen = BTreeSet::new();
    wait_for("step 2's manual pause", Duration::from_secs(30), || {
        let s = service_status(&env, "web");
        let c = &s["canary"];
        if c["weight"].as_u64().unwrap_or(0) > 0 {
            seen.insert((c["step"].as_u64().unwrap(), c["weight"].as_u64().unwrap()));
        }
        c["waiting"]
            .as_str()
            .is_some_and(|w| w.contains("kiln promote web"))
            && c["canary_window"]["requests"].as_u64() >= Some(20)
    });
    assert!(seen.contains(&(1, 25)), "{seen:?}");
    assert!(seen.contains(&(2, 50)), "{seen:?}");
    let s = service_status(&env, "web");
    assert_eq!(pids_of(&s, 2).len(), 2, "the canary fleet at 50%: {s}");
    assert_eq!(pids_of(&s, 1).len(), 3, "stable stays whole: {s}");
    assert_eq!(s["canary"]["stable"], 1);
    let (v1, v2) = versions(port, 400);
    assert!(v1 > 100 && v2 > 100, "both serve at 50%: {v1}/{v2}");
    let m = http_get(u64::from(metrics), "/metrics").unwrap();
    assert!(
        m.contains("kiln_canary_weight{service=\"web\"} 50\n"),
        "{m}"
    );
    assert!(m.contains("kiln_canary_step{service=\"web\"} 2\n"), "{m}");
    assert_eq!(
        env.json(&["status", "web", "--json"])["services"][0]["outcome"],
        "pending"
    );

    let out = env.ok(&["promote", "web"]);
    let promoted_by = actors_of(&env, &["promote-requested"]);
    assert!(
        promoted_by.len() == 1 && promoted_by[0].starts_with("uid:"),
        "{promoted_by:?}"
    );
    assert!(out.contains("canary release 2 passes step 2"), "{out}");
    env.ok(&["rollout", "status", "web"]);
    wait_for(
        "the canary to be the release",
        Duration::from_secs(15),
        || live_on(&service_status(&env, "web"), 2),
    );
    assert_eq!(versions(port, 100), (0, 100));
    let r = releases(&env, "web");
    assert_eq!(r[1]["outcome"], "active");
    assert_eq!(r[0]["outcome"], "superseded");
    let s = service_status(&env, "web");
    assert!(s["canary"].is_null(), "{s}");
    assert_eq!(s["converged"], true, "{s}");
    let count = load.finish();
    count.assert_none_failed();
}

#[test]
fn abort_by_hand_leaves_no_canary_instance_and_no_route_to_it() {
    let rollout = MANUAL_50;
    let (env, port, path, _agent) = deployed_v1(rollout);

    // With no rollout in progress, promote and abort change nothing.
    let err = env.fails(&["abort", "web"]);
    assert!(
        err.contains("no rollout of web is in progress (it is on release 1): nothing to abort"),
        "{err}"
    );
    let err = env.fails(&["promote", "web"]);
    assert!(
        err.contains("no rollout of web is waiting for promotion"),
        "{err}"
    );
    assert_eq!(releases(&env, "web").len(), 1);

    // Steps that never give the canary all traffic are refused at apply,
    // with the place in the file, and nothing changes.
    write(
        &path,
        spec(
            port,
            "HELLO_VERSION = \"v2\"",
            "steps = [{ weight = 50, pause = \"manual\" }]\n",
        )
        .as_bytes(),
    );
    let err = env.fails(&["apply", "-f", path.to_str().unwrap()]);
    assert!(
        err.contains("kiln.toml:")
            && err.contains("rollout.steps must end at weight 100 (the last is 50)"),
        "{err}"
    );
    assert_eq!(releases(&env, "web").len(), 1);

    start_canary_v2(&env, &path, port, rollout, 50);
    let canary_pids = pids_of(&service_status(&env, "web"), 2);
    assert_eq!(canary_pids.len(), 2);
    let load = Load::start(port, 2);
    std::thread::sleep(Duration::from_millis(300));

    let out = env.ok(&["abort", "web"]);
    assert!(
        out.contains("release 2 aborted; the service is back on release 1"),
        "{out}"
    );
    // `abort` returns once the service is back: nothing of release 2 runs
    // and nothing routes to it.
    assert!(canary_pids.iter().all(|p| !alive(*p)), "{canary_pids:?}");
    let s = service_status(&env, "web");
    assert_eq!(pids_of(&s, 1).len(), 3, "{s}");
    assert!(all_on(&s, 1), "{s}");
    assert!(s["canary"].is_null(), "{s}");
    assert_eq!(versions(port, 200), (200, 0));
    let count = load.finish();
    count.assert_none_failed();
    assert!(
        count.bodies.contains_key("hello from v2"),
        "the canary served before"
    );
    let r = releases(&env, "web");
    assert_eq!(r[1]["outcome"], "failed");
    assert_eq!(r[1]["reason"], "aborted by hand (kiln abort)");
    let err = env.fails(&["abort", "web"]);
    assert!(err.contains("nothing to abort"), "{err}");
    // The abort's failure and rollback name the user who aborted.
    let actors = actors_of(&env, &["release-failed", "rollback"]);
    assert_eq!(actors.len(), 2, "{actors:?}");
    assert!(actors.iter().all(|a| a.starts_with("uid:")), "{actors:?}");
}

#[test]
fn the_split_follows_the_weight_and_a_sticky_client_stays_on_its_side() {
    let env = Env::new();
    let (port, sticky_port) = (free_port(), free_port());
    let rollout = "steps = [{ weight = 30, pause = \"manual\" }, { weight = 100 }]\n";
    let both = |version: &str| {
        let one = spec(port, &format!("HELLO_VERSION = \"{version}\""), rollout);
        let two = one
            .split("[services.web]")
            .nth(1)
            .unwrap()
            .replace("services.web", "services.sticky")
            .replace(&format!(":{port}"), &format!(":{sticky_port}"))
            .replace(
                "strategy = \"canary\"",
                "strategy = \"canary\"\nsticky = true",
            );
        format!("{one}\n[services.sticky]{two}")
    };
    let path = hello_app(&env.path("app"), &both("v1"));
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    write(&path, both("v2").as_bytes());
    env.ok(&["apply", "-f", path.to_str().unwrap(), "--detach"]);
    wait_for("both canaries at 30%", Duration::from_secs(30), || {
        let s = env.json(&["status", "--json"]);
        s["services"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["canary"]["weight"] == 30)
    });

    // 2000 independent draws at p = 0.3: the standard deviation of the
    // share is about 0.01, so ±0.05 fails only on a real bias.
    let (_, v2) = versions(port, 2000);
    let share = v2 as f64 / 2000.0;
    assert!((share - 0.3).abs() < 0.05, "canary share {share}");

    // Sticky: each client gets a cookie and keeps its side.
    let mut on_canary = 0;
    for _ in 0..200 {
        let (status, body, cookie) = get_with_cookie(sticky_port, None);
        assert_eq!(status, 200);
        let cookie = cookie.expect("a new client gets a cookie");
        assert!(cookie.starts_with("kiln-canary-sticky=2."), "{cookie}");
        let pair = cookie.split(';').next().unwrap().to_owned();
        let first = body[..13].to_owned();
        on_canary += usize::from(first == "hello from v2");
        for _ in 0..5 {
            let (_, again, set) = get_with_cookie(sticky_port, Some(&pair));
            assert_eq!(again[..13], first, "{pair} flipped sides");
            assert!(set.is_none(), "a valid cookie is kept");
        }
    }
    let share = on_canary as f64 / 200.0;
    assert!((0.15..0.45).contains(&share), "sticky canary share {share}");

    // A malformed or stale cookie is replaced, never an error.
    for bad in [
        "kiln-canary-sticky=garbage",
        "kiln-canary-sticky=2.999",
        "kiln-canary-sticky=1.5",
        "kiln-canary-sticky=",
    ] {
        let (status, _, set) = get_with_cookie(sticky_port, Some(bad));
        assert_eq!(status, 200, "{bad}");
        let set = set.unwrap_or_default();
        assert!(set.starts_with("kiln-canary-sticky=2."), "{bad}: {set:?}");
    }
}

#[test]
fn a_rollback_during_a_canary_takes_stable_back_and_stops_the_canary() {
    let rollout = MANUAL_50;
    let (env, port, path, _agent) = deployed_v1(rollout);
    let stable_pids = pids_of(&service_status(&env, "web"), 1);
    start_canary_v2(&env, &path, port, rollout, 50);
    let canary_pids = pids_of(&service_status(&env, "web"), 2);
    let load = Load::start(port, 2);
    env.ok(&["rollback", "web"]);
    wait_for("the canary fleet to stop", Duration::from_secs(15), || {
        canary_pids.iter().all(|p| !alive(*p))
    });
    let s = service_status(&env, "web");
    assert_eq!(s["revision"], 3);
    assert_eq!(
        pids_of(&s, 3),
        stable_pids,
        "release 3 (release 1's content) took over stable's warm instances: {s}"
    );
    assert_eq!(versions(port, 200), (200, 0));
    let count = load.finish();
    count.assert_none_failed();
    let r = releases(&env, "web");
    assert_eq!(r[1]["outcome"], "failed");
    assert_eq!(r[2]["outcome"], "active");
}

#[test]
fn an_agent_killed_mid_canary_starts_the_canary_again_beside_a_whole_stable() {
    let rollout = MANUAL_50;
    let (env, port, path, mut agent) = deployed_v1(rollout);
    start_canary_v2(&env, &path, port, rollout, 50);
    let mut child = agent.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let home = env.home.to_str().unwrap().to_owned();
    wait_for(
        "the old agent's instances to die",
        Duration::from_secs(10),
        || util::processes_mentioning(&home).is_empty(),
    );

    // The canary is still pending: it goes on at its step (the first),
    // its fleet started again beside a whole stable; nothing the old agent
    // ran survives.
    let _agent = Agent::start(&env);
    wait_for("the canary at 50% again", Duration::from_secs(30), || {
        let s = service_status(&env, "web");
        s["canary"]["weight"] == 50 && pids_of(&s, 1).len() == 3 && pids_of(&s, 2).len() == 2
    });
    let s = service_status(&env, "web");
    assert_eq!(s["instances"].as_array().unwrap().len(), 5, "{s}");
    let (v1, v2) = versions(port, 400);
    assert!(v1 > 100 && v2 > 100, "{v1}/{v2}");
    assert_eq!(releases(&env, "web")[1]["outcome"], "pending");
    env.ok(&["promote", "web"]);
    // Issue 13: `rollout status` had no --json: the service's status at the end.
    let end = env.json(&["rollout", "status", "web", "--json"]);
    assert_eq!(
        (&end["revision"], &end["outcome"]),
        (&2.into(), &"active".into()),
        "{end}"
    );
    assert_eq!(releases(&env, "web")[1]["outcome"], "active");
}

#[test]
fn steps_changed_mid_canary_take_effect_at_once() {
    // The canary passes step 1 at once and waits at step 2 (index 1).
    let three =
        "steps = [{ weight = 20 }, { weight = 50, pause = \"manual\" }, { weight = 100 }]\n";
    let (env, port, path, _agent) = deployed_v1(three);
    start_canary_v2(&env, &path, port, three, 50);
    assert_eq!(service_status(&env, "web")["canary"]["step"], 2);
    // Steps are a setting: the apply goes through while the canary runs;
    // shorter than where the canary is, it lands on the new last step
    // (all traffic) and finishes.
    write(
        &path,
        spec(
            port,
            "HELLO_VERSION = \"v2\"",
            "steps = [{ weight = 100 }]\n",
        )
        .as_bytes(),
    );
    env.ok(&["apply", "-f", path.to_str().unwrap(), "--detach"]);
    wait_for("the canary to finish", Duration::from_secs(30), || {
        let s = service_status(&env, "web");
        s["revision"] == 2 && s["converged"] == true && s["canary"].is_null()
    });
    assert_eq!(releases(&env, "web")[1]["outcome"], "active");
    assert_eq!(versions(port, 50), (0, 50));
}

/// Regression (issue 10): a client that broke its own request bodies (a
/// bad chunk, a hang-up mid-body) was answered 502 and counted as the
/// canary's error, and its sticky cookie let it choose the canary side:
/// one client could abort any canary.
#[test]
fn a_client_breaking_its_bodies_on_the_canary_side_cannot_abort_it() {
    let rollout = format!(
        "steps = [{{ weight = 50, pause = \"manual\" }}, {{ weight = 100 }}]\nsticky = true\n{ANALYSIS}"
    );
    let (env, port, path, _agent) = deployed_v1(&rollout);
    start_canary_v2(&env, &path, port, &rollout, 50);
    // Bucket 0 is below the weight: the canary's side.
    let cookie = "kiln-canary-web=2.0";
    for i in 0..40 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if i % 2 == 0 {
            s.write_all(
                format!("POST / HTTP/1.1\r\nhost: x\r\ncookie: {cookie}\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")
                    .as_bytes(),
            )
            .unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
        } else {
            s.write_all(
                format!("POST / HTTP/1.1\r\nhost: x\r\ncookie: {cookie}\r\ncontent-length: 100\r\n\r\nabc")
                    .as_bytes(),
            )
            .unwrap();
            // Hang up mid-body.
            drop(s);
        }
    }
    // Enough honest traffic for the analysis to judge the step.
    let (_, v2) = versions(port, 400);
    assert!(v2 >= 100, "{v2}");
    wait_for("the step to be judged", Duration::from_secs(30), || {
        let c = &service_status(&env, "web")["canary"];
        c["canary_window"]["requests"].as_u64() >= Some(100)
            && c["waiting"]
                .as_str()
                .is_some_and(|w| w.contains("kiln promote web"))
    });
    let s = service_status(&env, "web");
    assert_eq!(s["canary"]["canary_window"]["errors"], 0, "{s}");
    assert!(s["failed_release"].is_null(), "{s}");
    env.ok(&["promote", "web"]);
    // The last step (weight 100) is judged on its own requests too.
    wait_for(
        "the canary to be the release",
        Duration::from_secs(30),
        || {
            let _ = versions(port, 20);
            live_on(&service_status(&env, "web"), 2)
        },
    );
}

/// A manual pause does not hang a CI job: `apply` (and `rollout status`)
/// return at it, exit 0, naming the command that goes on; `--wait` goes
/// through it (here, once someone promotes).
#[test]
fn apply_returns_at_a_manual_pause_and_wait_goes_through_it() {
    // Watched for 2 s once live: --wait waits that out too.
    let rollout = format!("{MANUAL_50}watch = \"2s\"\n");
    let (env, port, path, _agent) = deployed_v1(&rollout);
    write(
        &path,
        spec(port, "HELLO_VERSION = \"v2\"", &rollout).as_bytes(),
    );
    let out = env.run(&["apply", "-f", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("web: the rollout waits at step 1/2 (50%) for `kiln promote web`"),
        "{err}"
    );
    assert_eq!(service_status(&env, "web")["canary"]["weight"], 50);
    let out = env.run(&["rollout", "status", "web"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("kiln promote web"));

    // --wait blocks through the pause until the release is settled.
    let mut waiting = env
        .cmd()
        .args(["rollout", "status", "web", "--wait"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "--wait returned at the pause"
    );
    env.ok(&["promote", "web"]);
    let status = (0..600)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            waiting.try_wait().unwrap()
        })
        .unwrap_or_else(|| {
            let _ = waiting.kill();
            panic!("--wait never returned after the promote")
        });
    assert!(status.success());
    let s = service_status(&env, "web");
    assert!(all_on(&s, 2), "{s}");
    assert!(
        s["watched_until"].is_null(),
        "returned before the watch ended: {s}"
    );
}
