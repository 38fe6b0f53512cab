//! Black-box tests of the router and rollouts: real instances behind the
//! real router, under real load on loopback.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;
use util::{
    Agent, Env, Load, free_port, hello_app, processes_mentioning, releases, request,
    service_status, wait_for, write,
};

/// The service on `port`. Unwatched (`rollout.watch = "0s"`) unless
/// `extra` says otherwise: these tests look at what a rollout leaves, and a
/// watched release keeps the one before it warm (see the watch test).
fn spec(port: u16, extra_env: &str, extra: &str) -> String {
    let extra = if extra.contains("watch =") {
        extra.to_owned()
    } else if extra.contains("[services.web.rollout]\n") {
        extra.replacen(
            "[services.web.rollout]\n",
            "[services.web.rollout]\nwatch = \"0s\"\n",
            1,
        )
    } else {
        format!("[services.web.rollout]\nwatch = \"0s\"\n{extra}")
    };
    format!(
        r#"
[images.app]
include = ["bin"]
entrypoint = ["/bin/start.sh"]

[services.web]
image = "app"
replicas = 3
listen = "127.0.0.1:{port}"
timeout = "1s"
env = {{ HELLO_VERSION = "v1"{extra_env} }}
[services.web.health.readiness]
http = "/healthz"
interval = "200ms"
[services.web.stop]
drain_timeout = "2s"
kill_timeout = "2s"
{extra}"#
    )
}

fn instances(s: &Value) -> Vec<Value> {
    s["instances"].as_array().cloned().unwrap_or_default()
}

/// Send `bytes` as they are on a new connection; all that comes back
/// until the router closes it (or 10 s pass).
fn send_raw(port: u16, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn get(port: u16, path: &str) -> (u16, String) {
    let mut c = BufReader::new(TcpStream::connect(("127.0.0.1", port)).unwrap());
    c.get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    request(&mut c, path).unwrap()
}

#[test]
fn a_rolling_update_and_a_rollback_under_load_lose_no_request() {
    let env = Env::new();
    let port = free_port();
    let path = hello_app(&env.path("app"), &spec(port, "", ""));
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    assert_eq!(get(port, "/").0, 200);

    let load = Load::start(port, 4);
    std::thread::sleep(Duration::from_millis(300));
    write(
        &path,
        spec(port, "", "").replace("\"v1\"", "\"v2\"").as_bytes(),
    );
    let out = env.ok(&["apply", "-f", path.to_str().unwrap()]);
    assert!(out.contains("web: new release 2"), "{out}");
    std::thread::sleep(Duration::from_millis(300));
    env.ok(&["rollback", "web"]);
    std::thread::sleep(Duration::from_millis(300));
    let count = load.finish();

    count.assert_none_failed();
    assert!(count.ok > 100, "{count:?}");
    assert!(
        count.bodies.contains_key("hello from v1") && count.bodies.contains_key("hello from v2"),
        "{count:?}"
    );
    let s = service_status(&env, "web");
    assert_eq!(s["revision"], 3);
    assert!(instances(&s).iter().all(|i| i["revision"] == 3), "{s}");
    assert!(
        get(port, "/").1.starts_with("hello from v1"),
        "release 3 has release 1's content"
    );
    let r = releases(&env, "web");
    assert_eq!(r[2]["cause"], "rollback to 1");
    assert_eq!(r[2]["hash"], r[0]["hash"]);
}

#[test]
fn a_release_that_never_becomes_ready_is_rolled_back_and_leaves_nothing() {
    let env = Env::new();
    let port = free_port();
    let path = hello_app(
        &env.path("app"),
        &spec(
            port,
            "",
            "[services.web.rollout]\nprogress_deadline = \"2s\"\n",
        ),
    );
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    write(
        &path,
        spec(
            port,
            ", HELLO_FAIL_HEALTH = \"1\"",
            "[services.web.rollout]\nprogress_deadline = \"2s\"\n",
        )
        .as_bytes(),
    );
    let load = Load::start(port, 2);
    let err = env.fails(&["apply", "-f", path.to_str().unwrap()]);
    assert!(
        err.contains("release 2 failed")
            && err.contains("progress deadline")
            && err.contains("back on release 1"),
        "{err}"
    );
    wait_for("no instance of release 2", Duration::from_secs(10), || {
        instances(&service_status(&env, "web"))
            .iter()
            .all(|i| i["revision"] == 1)
    });
    let count = load.finish();
    count.assert_none_failed();
    assert_eq!(
        count.bodies.keys().collect::<Vec<_>>(),
        ["hello from v1"],
        "no request reached release 2"
    );
    let s = service_status(&env, "web");
    assert_eq!(
        (s["revision"].as_u64(), s["ready"].as_u64()),
        (Some(1), Some(3))
    );
    let r = releases(&env, "web");
    assert_eq!(r[1]["outcome"], "failed");
    assert!(
        r[1]["reason"]
            .as_str()
            .unwrap()
            .contains("0/3 instances ready"),
        "{r:?}"
    );
    assert_eq!(r[0]["outcome"], "active");

    // The next release numbers past the failed one.
    write(
        &path,
        spec(
            port,
            ", A = \"1\"",
            "[services.web.rollout]\nprogress_deadline = \"2s\"\n",
        )
        .as_bytes(),
    );
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    let r = releases(&env, "web");
    assert_eq!(
        (r.len(), &r[2]["revision"], &r[2]["outcome"]),
        (3, &3.into(), &"active".into())
    );
}

#[test]
fn a_crash_looping_release_is_rolled_back() {
    let env = Env::new();
    let port = free_port();
    // Instances must stay ready 1 s to count; these crash after 0.3 s.
    let rollout = "[services.web.rollout]\nmin_ready = \"1s\"\nprogress_deadline = \"60s\"\n";
    let path = hello_app(&env.path("app"), &spec(port, "", rollout));
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    write(
        &path,
        spec(port, ", HELLO_CRASH_AFTER = \"0.3\"", rollout).as_bytes(),
    );
    let err = env.fails(&["apply", "-f", path.to_str().unwrap()]);
    assert!(
        err.contains("release 2 failed") && err.contains("keep crashing"),
        "{err}"
    );
    wait_for("no instance of release 2", Duration::from_secs(10), || {
        instances(&service_status(&env, "web"))
            .iter()
            .all(|i| i["revision"] == 1)
    });
    assert!(get(port, "/").1.starts_with("hello from v1"));
    assert_eq!(releases(&env, "web")[1]["outcome"], "failed");
}

/// Issue 13: with the default `min_ready` a release that crashes 1.5 s
/// after each start went live and then served 503s until someone ran
/// `kiln rollback`. Inside `rollout.watch` (default 5m) it is rolled back
/// automatically, like a failed rollout, with the reason recorded.
#[test]
fn a_release_that_breaks_after_it_went_live_is_rolled_back_inside_its_watch() {
    let env = Env::new();
    let port = free_port();
    let watched = "[services.web.rollout]\nwatch = \"5m\"\n";
    let path = hello_app(&env.path("app"), &spec(port, "", watched));
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    write(
        &path,
        spec(port, ", HELLO_CRASH_AFTER = \"1.5\"", watched)
            .replace("\"v1\"", "\"v2\"")
            .as_bytes(),
    );
    // The rollout itself succeeds: its instances are ready before they crash.
    let out = env.run(&["apply", "-f", path.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("web: live and watched until ") && said.contains("kept warm meanwhile"),
        "{said}"
    );
    let watched = service_status(&env, "web");
    assert_eq!(watched["outcome"], "active");
    assert!(watched["watched_until"].is_string(), "{watched}");
    // Release 1's fleet is kept warm through the watch, without traffic.
    let ready_of = |s: &Value, revision: u64| -> std::collections::BTreeSet<String> {
        instances(s)
            .iter()
            .filter(|i| i["revision"] == revision && i["ready"] == true && i["state"] != "stopping")
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut warm = Default::default();
    wait_for("release 1 kept warm", Duration::from_secs(30), || {
        let s = service_status(&env, "web");
        warm = ready_of(&s, 1);
        s["revision"] == 2 && s["warm"] == true && warm.len() == 3
    });
    wait_for("back on release 1", Duration::from_secs(60), || {
        let s = service_status(&env, "web");
        s["revision"] == 1 && s["outcome"] == "active" && s["converged"] == true
    });
    // The return was a route swap to those warm instances: none started cold.
    assert_eq!(ready_of(&service_status(&env, "web"), 1), warm);
    let r = releases(&env, "web");
    assert_eq!(r[1]["outcome"], "failed");
    let reason = r[1]["reason"].as_str().unwrap();
    assert!(
        reason.contains("keep crashing")
            && reason.contains("after it went live, inside rollout.watch (5m)"),
        "{reason}"
    );
    assert!(get(port, "/").1.starts_with("hello from v1"));
    let status = env.ok(&["status", "web"]);
    assert!(status.contains("release 2 failed"), "{status}");
}

/// Issue 13: a service could not be removed. `plan` lists the services a
/// spec no longer has, `apply` leaves them running and says so, `apply
/// --prune` and `kiln remove` stop them gracefully (an in-flight request
/// finishes, the listener closes), record it, and keep their history.
#[test]
fn a_service_left_out_of_the_spec_is_listed_and_removed_only_when_asked() {
    let env = Env::new();
    let (web_port, api_port) = (free_port(), free_port());
    let api = spec(api_port, "", "")
        .replace(
            "[images.app]\ninclude = [\"bin\"]\nentrypoint = [\"/bin/start.sh\"]\n",
            "",
        )
        .replace("services.web", "services.api")
        .replace("replicas = 3", "replicas = 1");
    let both = spec(web_port, "", "") + &api;
    let path = hello_app(&env.path("app"), &both);
    let file = path.to_str().unwrap();
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", file]);
    assert_eq!(get(api_port, "/").0, 200);
    // Without api: listed, left running.
    write(&path, spec(web_port, "", "").as_bytes());
    let plan = env.ok(&["plan", "-f", file]);
    assert!(
        plan.contains("api: not in the spec: left running"),
        "{plan}"
    );
    let out = env.ok(&["apply", "-f", file]);
    assert!(out.contains("api: not in the spec: left running"), "{out}");
    assert_eq!(get(api_port, "/").0, 200, "still serves");
    let plan = env.json(&["plan", "-f", file, "--prune", "--json"]);
    let api_plan = plan["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "api")
        .cloned()
        .unwrap();
    assert_eq!(api_plan["action"], "remove", "{plan}");
    assert_eq!(
        service_status(&env, "api")["ready"],
        1,
        "plan changed nothing"
    );
    // Removed with a request in flight: it finishes, then the port closes.
    let slow = std::thread::spawn(move || get(api_port, "/sleep/800"));
    std::thread::sleep(Duration::from_millis(200));
    let out = env.ok(&["apply", "-f", file, "--prune"]);
    assert!(out.contains("- api: remove"), "{out}");
    assert_eq!(slow.join().unwrap(), (200, "slept\n".to_owned()), "drained");
    assert!(
        TcpStream::connect(("127.0.0.1", api_port)).is_err(),
        "the listener is closed"
    );
    assert_eq!(service_status(&env, "api"), Value::Null);
    assert_eq!(get(web_port, "/").0, 200, "web is untouched");
    let logs = env.ok(&["logs", "api"]);
    assert!(
        logs.contains("exited (exit status: 143), as asked"),
        "{logs}"
    );
    // The history stays, and says so.
    let h = env.json(&["history", "api", "--json"]);
    assert_eq!(h["removed"], true);
    assert_eq!(h["releases"].as_array().unwrap().len(), 1);
    assert!(
        env.ok(&["history", "api"])
            .contains("api was removed while on release 1")
    );
    let db = rusqlite::Connection::open(env.home.join("state.db")).unwrap();
    let actor: String = db
        .query_row(
            "SELECT actor FROM events WHERE kind = 'service-removed' AND service = 'api'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(actor.starts_with("uid:"), "{actor}");
    let stopping: String = db
        .query_row(
            "SELECT detail FROM events WHERE kind = 'instance-stopping' AND service = 'api'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(stopping.contains("service removed"), "{stopping}");
    // Applied again: a new release, numbered past the kept one.
    write(&path, both.as_bytes());
    let plan = env.ok(&["plan", "-f", file]);
    assert!(plan.contains("+ api: create release 2"), "{plan}");
    env.ok(&["apply", "-f", file]);
    assert_eq!(get(api_port, "/").0, 200);
    // `kiln remove`, and a second one is an error naming it.
    let out = env.ok(&["remove", "api"]);
    assert!(
        out.contains("api: removed (it was on release 2; 1 instance stopped)"),
        "{out}"
    );
    let err = env.fails(&["remove", "api"]);
    assert!(err.contains("no service named api"), "{err}");
    assert!(TcpStream::connect(("127.0.0.1", api_port)).is_err());
}

#[test]
fn auto_rollback_off_leaves_the_rollout_paused() {
    let env = Env::new();
    let port = free_port();
    let rollout = "[services.web.rollout]\nprogress_deadline = \"1s\"\nauto_rollback = false\n";
    let path = hello_app(&env.path("app"), &spec(port, "", rollout));
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    write(
        &path,
        spec(port, ", HELLO_FAIL_HEALTH = \"1\"", rollout).as_bytes(),
    );
    let err = env.fails(&["apply", "-f", path.to_str().unwrap()]);
    assert!(err.contains("paused"), "{err}");
    let status = env.ok(&["status", "web"]);
    assert!(
        status.contains("paused") && status.contains("kiln rollback web"),
        "{status}"
    );
    // Old instances still serve.
    assert!(get(port, "/").1.starts_with("hello from v1"));
    env.ok(&["rollback", "web"]);
    let s = service_status(&env, "web");
    assert!(s["converged"] == true && s["revision"] == 3, "{s}");
}

#[test]
fn an_agent_killed_mid_rollout_converges_to_one_release() {
    let env = Env::new();
    let port = free_port();
    let path = hello_app(
        &env.path("app"),
        &spec(port, ", HELLO_START_DELAY = \"0.5\"", ""),
    );
    let mut agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    write(
        &path,
        spec(port, ", HELLO_START_DELAY = \"0.5\"", "")
            .replace("\"v1\"", "\"v2\"")
            .as_bytes(),
    );
    env.ok(&["apply", "-f", path.to_str().unwrap(), "--detach"]);
    util::until_rolling_out(&env, "web", 2);
    let mut child = agent.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let home = env.home.to_str().unwrap().to_owned();
    wait_for(
        "the old agent's instances to die",
        Duration::from_secs(10),
        || processes_mentioning(&home).is_empty(),
    );

    let _agent = Agent::start(&env);
    wait_for("convergence", Duration::from_secs(60), || {
        service_status(&env, "web")["converged"] == true
    });
    let s = service_status(&env, "web");
    let inst = instances(&s);
    assert_eq!(inst.len(), 3, "{s}");
    let rev = &inst[0]["revision"];
    assert!(
        inst.iter().all(|i| &i["revision"] == rev),
        "one release: {s}"
    );
    // Each sandboxed instance is an outer bwrap and its reaper (the app's
    // own command line does not name the home): nothing else survives.
    wait_for(
        "exactly the live instances' processes",
        Duration::from_secs(10),
        || processes_mentioning(&home).len() == 2 * inst.len(),
    );
    let body = get(port, "/").1;
    assert!(
        body.starts_with(if rev == 2 {
            "hello from v2"
        } else {
            "hello from v1"
        }),
        "{body}"
    );
    let events = std::fs::read_dir(env.home.join("logs/web"))
        .unwrap()
        .count();
    assert!(events >= 6, "the history of instances is kept");
}

#[test]
fn websockets_and_a_streamed_100_mb_body_pass_through() {
    let env = Env::new();
    let port = free_port();
    let path = hello_app(
        &env.path("app"),
        &spec(port, "", "").replace("replicas = 3", "replicas = 1"),
    );
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);

    // WebSocket: handshake through the router, then a masked text frame echoed.
    let mut ws = TcpStream::connect(("127.0.0.1", port)).unwrap();
    ws.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        ws,
        "GET /ws HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ws.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    let msg = b"hello through kiln";
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | msg.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(msg.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    ws.write_all(&frame).unwrap();
    let mut reply = [0u8; 2 + 18];
    ws.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[..2], &[0x81, msg.len() as u8]);
    assert_eq!(&reply[2..], msg);

    // 100 MB streamed up through the router, counted by the instance.
    let size: u64 = 100 << 20;
    let mut up = TcpStream::connect(("127.0.0.1", port)).unwrap();
    up.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        up,
        "POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {size}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let chunk = vec![b'k'; 1 << 20];
    for _ in 0..100 {
        up.write_all(&chunk).unwrap();
    }
    let mut resp = String::new();
    up.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with(&format!("\r\n\r\n{size}\n")), "{resp}");

    // X-Forwarded-* reach the instance.
    let headers = get(port, "/headers").1.to_lowercase();
    assert!(headers.contains("x-forwarded-for: 127.0.0.1"), "{headers}");
    assert!(headers.contains("x-forwarded-proto: http"), "{headers}");
    assert!(headers.contains("x-forwarded-host: kiln-test"), "{headers}");
}

#[test]
fn malformed_requests_get_400_and_a_hanging_instance_504() {
    let env = Env::new();
    let port = free_port();
    let path = hello_app(
        &env.path("app"),
        &spec(port, "", "").replace("replicas = 3", "replicas = 1"),
    );
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    let mut bad = TcpStream::connect(("127.0.0.1", port)).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    bad.write_all(b"NOT A REQUEST\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = bad.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 400"), "{out:?}");
    assert_eq!(get(port, "/").0, 200, "the router is unharmed");

    // An instance that accepts but never answers: 504 after the timeout, not a hang.
    write(
        &path,
        spec(port, ", HELLO_HANG = \"1\"", "")
            .replace("replicas = 3", "replicas = 1")
            .replace("http = \"/healthz\"", "tcp = true")
            .as_bytes(),
    );
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    let (status, body) = get(port, "/");
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("did not answer within 1s"), "{body}");
}

#[test]
fn a_listen_address_in_use_is_refused_at_apply_with_nothing_started() {
    let env = Env::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let path = hello_app(&env.path("app"), &spec(port, "", ""));
    let _agent = Agent::start(&env);
    let err = env.fails(&["apply", "-f", path.to_str().unwrap()]);
    assert!(
        err.contains(&format!(
            "cannot listen on 127.0.0.1:{port} for service web"
        )),
        "{err}"
    );
    assert!(err.contains("in use"), "{err}");
    let err = env.fails(&["history", "web"]);
    assert!(
        err.contains("no service named web"),
        "nothing was recorded: {err}"
    );
    assert!(
        env.json(&["status", "--json"])["services"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn rollback_to_a_revision_that_does_not_exist_is_a_clear_error() {
    let env = Env::new();
    let port = free_port();
    let path = hello_app(
        &env.path("app"),
        &spec(port, "", "").replace("replicas = 3", "replicas = 1"),
    );
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    let err = env.fails(&["rollback", "web", "--to", "9"]);
    assert!(err.contains("release 9 of web does not exist"), "{err}");
    let err = env.fails(&["rollback", "web"]);
    assert!(err.contains("no earlier successful release"), "{err}");
    assert_eq!(releases(&env, "web").len(), 1);
}

#[test]
fn an_in_flight_request_is_drained_before_its_instance_stops() {
    let env = Env::new();
    let port = free_port();
    let path = hello_app(
        &env.path("app"),
        &spec(port, "", "").replace("replicas = 3", "replicas = 1"),
    );
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    // A slow request to the only (old) instance, in flight during the rollout.
    let slow = std::thread::spawn(move || get(port, "/sleep/800"));
    std::thread::sleep(Duration::from_millis(200));
    write(
        &path,
        spec(port, "", "")
            .replace("replicas = 3", "replicas = 1")
            .replace("\"v1\"", "\"v2\"")
            .as_bytes(),
    );
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    assert_eq!(
        slow.join().unwrap(),
        (200, "slept\n".to_owned()),
        "drained, not cut off"
    );
    let logs = env.ok(&["logs", "web", "--release", "1"]);
    // SIGTERM after the drain: bubblewrap reports the app's death by it as 143.
    assert!(
        (logs.contains("exit status: 143") || logs.contains("signal: 15"))
            && logs.contains("as asked"),
        "stopped by its stop signal after draining: {logs}"
    );
}

#[test]
fn recreate_stops_every_old_instance_before_starting_new_ones() {
    let env = Env::new();
    let port = free_port();
    let rollout = "[services.web.rollout]\nstrategy = \"recreate\"\n";
    let path = hello_app(&env.path("app"), &spec(port, "", rollout));
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    write(
        &path,
        spec(port, "", rollout)
            .replace("\"v1\"", "\"v2\"")
            .as_bytes(),
    );
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    assert!(get(port, "/").1.starts_with("hello from v2"));
    // The event log: every release-1 exit comes before any release-2 start.
    let db = rusqlite::Connection::open(env.home.join("state.db")).unwrap();
    let mut stmt = db
        .prepare("SELECT seq, kind, revision FROM events WHERE service = 'web' ORDER BY seq")
        .unwrap();
    let events: Vec<(i64, String, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let last_old_exit = events
        .iter()
        .filter(|e| e.1 == "instance-exited" && e.2 == 1)
        .map(|e| e.0)
        .max()
        .unwrap();
    let first_new_start = events
        .iter()
        .filter(|e| e.1 == "instance-started" && e.2 == 2)
        .map(|e| e.0)
        .min()
        .unwrap();
    assert!(last_old_exit < first_new_start, "{events:?}");
    // Every release-1 instance that ever started has exited (a starved CI
    // machine may have replaced one of them during the first apply, so the
    // count is of starts, not a fixed 3), and at least the three replicas.
    let count = |kind: &str| events.iter().filter(|e| e.1 == kind && e.2 == 1).count();
    assert_eq!(
        count("instance-started"),
        count("instance-exited"),
        "{events:?}"
    );
    assert!(count("instance-exited") >= 3, "{events:?}");
}

#[test]
fn rollout_status_follows_a_rollout_to_its_end() {
    let env = Env::new();
    let port = free_port();
    let slow = |v: &str| {
        spec(port, ", HELLO_START_DELAY = \"0.5\"", "")
            .replace("replicas = 3", "replicas = 2")
            .replace("\"v1\"", v)
    };
    let path = hello_app(&env.path("app"), &slow("\"v1\""));
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    write(&path, slow("\"v2\"").as_bytes());
    env.ok(&["apply", "-f", path.to_str().unwrap(), "--detach"]);
    assert_ne!(
        service_status(&env, "web")["outcome"],
        "active",
        "still rolling out"
    );
    let out = env.run(&["rollout", "status", "web"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("web: release 2: 2/2 ready"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = service_status(&env, "web");
    assert_eq!(
        (s["revision"].as_u64(), s["outcome"].as_str()),
        (Some(2), Some("active"))
    );
}

/// Regression: routes were republished only when instances changed, so a
/// `timeout`-only change never reached the router.
#[test]
fn a_timeout_change_alone_reaches_the_router() {
    let env = Env::new();
    let port = free_port();
    let hang = |timeout: &str| {
        spec(port, ", HELLO_HANG = \"1\"", "")
            .replace("replicas = 3", "replicas = 1")
            .replace("http = \"/healthz\"", "tcp = true")
            .replace("timeout = \"1s\"", &format!("timeout = \"{timeout}\""))
    };
    let path = hello_app(&env.path("app"), &hang("1s"));
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    assert!(get(port, "/").1.contains("did not answer within 1s"));
    write(&path, hang("2s").as_bytes());
    let out = env.ok(&["apply", "-f", path.to_str().unwrap()]);
    assert!(out.contains("timeout 1s -> 2s"), "{out}");
    let (status, body) = get(port, "/");
    assert_eq!(status, 504);
    assert!(body.contains("did not answer within 2s"), "{body}");
}

/// Regression (issue 10, critical): `Connection: content-length` made the
/// router drop the body's framing, so the body reached the instance as a
/// second request, and an incomplete one waited on the pooled connection
/// for the next client's request to be glued onto it: a victim got the
/// answer to the attacker's request.
#[test]
fn a_client_cannot_smuggle_a_request_onto_another_clients_connection() {
    let env = Env::new();
    let port = free_port();
    let spec = spec(port, "", "").replace("replicas = 3", "replicas = 1");
    let path = hello_app(&env.path("app"), &spec);
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    let raw = |bytes: &[u8]| send_raw(port, bytes);
    // An incomplete request hidden in the body, on several connections
    // (so that every router thread's pool would hold one).
    let prefix = "GET /healthz HTTP/1.1\r\nX-Ignore: ";
    for _ in 0..4 {
        let out = raw(format!(
            "POST / HTTP/1.1\r\nHost: attacker\r\nConnection: content-length, close\r\n\
             Content-Length: {}\r\n\r\n{prefix}",
            prefix.len()
        )
        .as_bytes());
        assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
    }
    for _ in 0..8 {
        let (status, body) = get(port, "/");
        assert_eq!(status, 200);
        assert!(
            body.starts_with("hello from v1"),
            "a victim got another answer: {body}"
        );
    }
    // Nor does `Connection: host` hand the app the router's own Host.
    let out =
        raw(b"GET /headers HTTP/1.1\r\nHost: public.example\r\nConnection: host, close\r\n\r\n");
    assert!(
        out.to_lowercase().contains("host: public.example") && !out.contains("127.0.0.1:"),
        "{out}"
    );
}

/// Regression (issue 10, high): with no cap on connections, a flood of
/// idle ones took every descriptor: the accept loop spun, the API and the
/// probes stopped answering, and instances were marked unready.
#[test]
fn a_connection_flood_leaves_the_api_probes_and_instances_alone() {
    let env = Env::new();
    let port = free_port();
    let spec = spec(port, "", "").replace("replicas = 3", "replicas = 1");
    let path = hello_app(&env.path("app"), &spec);
    // A small limit, so that a flood reaches it quickly: the router may
    // take (400 - 256) / 2 = 72 client connections.
    let agent = Agent::start_with_nofile(&env, 400);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", agent.pid())).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 400 ")),
        "{limits}"
    );
    let before = instances(&service_status(&env, "web"));
    assert_eq!(before.len(), 1);
    let flood: Vec<TcpStream> = (0..500)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    // Several probe intervals pass under the flood.
    std::thread::sleep(Duration::from_secs(2));
    let s = service_status(&env, "web");
    assert_eq!(s["ready"], 1, "{s}");
    // The same instance, never replaced nor unready meanwhile.
    let after = instances(&s);
    assert_eq!(after.len(), 1, "{s}");
    assert_eq!(
        after[0]["id"], before[0]["id"],
        "no instance was replaced: {s}"
    );
    assert_eq!(after[0]["replacements"], 0, "{s}");
    assert_eq!(
        env.ok(&["audit", "web", "--kind", "instance-unready"])
            .lines()
            .count(),
        1,
        "no instance went unready under the flood (only the header line)"
    );
    // Room is made as the flood goes: a new client is served.
    drop(flood);
    let (status, body) = get(port, "/");
    assert_eq!(
        (status, body.starts_with("hello from v1")),
        (200, true),
        "{body}"
    );
    let log = std::fs::read_to_string(env.path("agent.log")).unwrap_or_default();
    assert!(
        log.contains("router holds at most 72 client connections"),
        "{log}"
    );
}

/// Regressions (issue 10, medium and low) through the real binary: the
/// router's refusals, the headers it owns, and a `[services.NAME.router]`
/// timeout set in kiln.toml reaching the router through `kiln apply`.
#[test]
fn hostile_requests_are_refused_and_the_spec_sets_the_routers_timeouts() {
    let env = Env::new();
    let port = free_port();
    let spec = spec(
        port,
        "",
        "[services.web.router]\nbody_timeout = \"300ms\"\nmax_connections = 50\n",
    )
    .replace("replicas = 3", "replicas = 1");
    let path = hello_app(&env.path("app"), &spec);
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    let raw = |bytes: &[u8]| send_raw(port, bytes);
    let big = format!(
        "GET / HTTP/1.1\r\nHost: h\r\nX-Big: {}\r\n\r\n",
        "a".repeat(72 * 1024)
    );
    for (req, status) in [
        ("GET / HTTP/1.1\r\n\r\n", "400"),
        ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "400"),
        ("GET / HTTP/1.1\r\nHost: user@h\r\n\r\n", "400"),
        (
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            "501",
        ),
        (big.as_str(), "431"),
    ] {
        let out = raw(req.as_bytes());
        assert!(
            out.starts_with(&format!("HTTP/1.1 {status} ")),
            "{}: {}",
            &req[..req.len().min(60)],
            &out[..out.len().min(200)]
        );
    }
    // An HTTP/1.0 client's expectation is ignored: no 100 Continue.
    let out = raw(b"POST /upload HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc");
    assert!(
        out.starts_with("HTTP/1.1 200 ") && !out.contains("100 Continue"),
        "{out}"
    );
    assert!(out.ends_with("3\n"), "the body arrived whole: {out}");
    // The headers that speak for the router are the router's.
    let out = raw(
        b"GET /headers HTTP/1.1\r\nHost: h\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n\
          X_Forwarded_For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n\r\n",
    );
    let lower = out.to_lowercase();
    assert!(
        !lower.contains("6.6.6.6")
            && lower.contains("x-forwarded-proto: http\n")
            && lower.contains("x-forwarded-for: 127.0.0.1"),
        "{out}"
    );
    // The spec's body_timeout (300ms) reached the router: a stalled body
    // is the client's 408, not the instance's 504 after `timeout` (1s).
    let out = raw(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc");
    assert!(
        out.starts_with("HTTP/1.1 408 ") && out.contains("sent nothing for 300ms"),
        "{out}"
    );
    // A changed router setting is a settings change, not a new release.
    write(
        &path,
        spec.replace("body_timeout = \"300ms\"", "body_timeout = \"400ms\"")
            .as_bytes(),
    );
    let out = env.ok(&["plan", "-f", path.to_str().unwrap()]);
    assert!(
        out.contains("router settings changed") && !out.contains("new release"),
        "{out}"
    );
}
