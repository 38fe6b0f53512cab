//! Blue-green through the real router: preview, promotion as one swap, the
//! warm old fleet, and rollback inside the warm window as a route swap.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::collections::BTreeSet;
use std::io::BufReader;
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;
use util::{Agent, Env, Load, free_port, hello_app, request, service_status, wait_for, write};

fn spec(port: u16, preview: u16, version: &str, rollout: &str) -> String {
    format!(
        r#"
[images.app]
include = ["bin"]
entrypoint = ["/bin/start.sh"]

[services.web]
image = "app"
replicas = 2
listen = "127.0.0.1:{port}"
env = {{ HELLO_VERSION = "{version}" }}
[services.web.health.readiness]
http = "/healthz"
interval = "200ms"
[services.web.rollout]
strategy = "blue-green"
preview_listen = "127.0.0.1:{preview}"
{rollout}
"#
    )
}

fn body(port: u16) -> String {
    let mut c = BufReader::new(TcpStream::connect(("127.0.0.1", port)).unwrap());
    request(&mut c, "/").unwrap().1
}

fn pids(s: &Value) -> BTreeSet<u64> {
    s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] != "stopping")
        .map(|i| i["pid"].as_u64().unwrap())
        .collect()
}

#[test]
fn blue_green_previews_promotes_in_one_swap_and_rolls_back_warm() {
    let env = Env::new();
    let (port, preview) = (free_port(), free_port());
    let rollout = "auto_promote = false\nscale_down_delay = \"5m\"";
    let path = hello_app(&env.path("app"), &spec(port, preview, "v1", rollout));
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    let v1_pids = pids(&service_status(&env, "web"));
    let load = Load::start(port, 3);

    // The new fleet starts beside the old, reachable only on the preview.
    write(&path, spec(port, preview, "v2", rollout).as_bytes());
    env.ok(&["apply", "-f", path.to_str().unwrap(), "--detach"]);
    wait_for(
        "the green fleet waiting for promotion",
        Duration::from_secs(30),
        || {
            service_status(&env, "web")["message"]
                .as_str()
                .is_some_and(|m| m.contains("waiting for `kiln promote web`"))
        },
    );
    assert_eq!(
        service_status(&env, "web")["instances"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    assert!(body(port).starts_with("hello from v1"));
    assert!(body(preview).starts_with("hello from v2"));
    // Issue 13: status says which fleet has the traffic.
    let text = env.ok(&["status", "web"]);
    assert!(
        text.contains("traffic on release 1; release 2 beside it, without traffic"),
        "{text}"
    );

    env.ok(&["promote", "web"]);
    for _ in 0..20 {
        assert!(
            body(port).starts_with("hello from v2"),
            "after the swap, only the new release answers"
        );
    }
    let s = service_status(&env, "web");
    assert_eq!(s["revision"], 2);
    assert!(
        v1_pids.is_subset(&pids(&s)),
        "the old fleet stays warm: {s}"
    );
    let text = env.ok(&["status", "web"]);
    assert!(
        text.contains("traffic on release 2; release 1 kept warm"),
        "{text}"
    );

    // Rollback inside the warm window: a route swap to the same processes.
    env.ok(&["rollback", "web"]);
    for _ in 0..20 {
        assert!(body(port).starts_with("hello from v1"));
    }
    let s = service_status(&env, "web");
    assert_eq!(s["revision"], 3);
    let serving: BTreeSet<u64> = s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["revision"] == 3)
        .map(|i| i["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(
        serving, v1_pids,
        "release 3 is served by release 1's warm instances, no new start"
    );
    let count = load.finish();
    count.assert_none_failed();
    assert!(
        count.bodies.contains_key("hello from v1") && count.bodies.contains_key("hello from v2")
    );
    let h = env.json(&["history", "web", "--json"]);
    assert_eq!(h["releases"][2]["cause"], "rollback to 1");
}

#[test]
fn the_old_fleet_goes_after_the_scale_down_delay() {
    let env = Env::new();
    let (port, preview) = (free_port(), free_port());
    let rollout = "scale_down_delay = \"1s\"";
    let path = hello_app(&env.path("app"), &spec(port, preview, "v1", rollout));
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    write(&path, spec(port, preview, "v2", rollout).as_bytes());
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    assert!(body(port).starts_with("hello from v2"), "auto-promoted");
    wait_for(
        "the old fleet to be scaled down",
        Duration::from_secs(20),
        || {
            let s = service_status(&env, "web");
            s["instances"]
                .as_array()
                .unwrap()
                .iter()
                .all(|i| i["revision"] == 2)
        },
    );
}

#[test]
fn promote_without_a_waiting_rollout_is_refused() {
    let env = Env::new();
    let (port, preview) = (free_port(), free_port());
    let path = hello_app(&env.path("app"), &spec(port, preview, "v1", ""));
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    let err = env.fails(&["promote", "web"]);
    assert!(
        err.contains("no rollout of web is waiting for promotion"),
        "{err}"
    );
    let err = env.fails(&["promote", "nope"]);
    assert!(err.contains("no service named nope"), "{err}");
}

#[test]
fn the_router_measures_each_release_on_the_metrics_endpoint() {
    use std::io::{Read, Write};
    let env = Env::new();
    let (port, preview, metrics) = (free_port(), free_port(), free_port());
    let path = hello_app(
        &env.path("app"),
        &spec(port, preview, "v1", "").replace(
            "HELLO_VERSION = \"v1\"",
            "HELLO_VERSION = \"v1\", HELLO_ERROR_RATE = \"0.25\"",
        ),
    );
    let _agent = Agent::start_with(&env, |c| {
        c.args(["--metrics", &format!("127.0.0.1:{metrics}")]);
    });
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    let mut c = BufReader::new(TcpStream::connect(("127.0.0.1", port)).unwrap());
    let mut statuses = Vec::new();
    for _ in 0..40 {
        statuses.push(request(&mut c, "/").unwrap().0);
    }
    let five = statuses.iter().filter(|s| **s == 500).count();
    assert_eq!(
        five, 10,
        "the app fails a quarter of requests: {statuses:?}"
    );
    let mut m = TcpStream::connect(("127.0.0.1", metrics)).unwrap();
    write!(
        m,
        "GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    m.read_to_string(&mut text).unwrap();
    assert!(
        text.contains(
            "kiln_router_requests_total{service=\"web\",release=\"1\",class=\"2xx\"} 30\n"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "kiln_router_requests_total{service=\"web\",release=\"1\",class=\"5xx\"} 10\n"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "kiln_router_request_duration_seconds_count{service=\"web\",release=\"1\"} 40\n"
        ),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "kiln_router_active_connections{{listener=\"127.0.0.1:{port}\"}} 1\n"
        )),
        "{text}"
    );
    assert!(
        text.contains("kiln_service_revision{service=\"web\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("kiln_rollout_in_progress{service=\"web\"} 0\n"),
        "{text}"
    );
}
