//! Black-box tests of `kiln serve --etcd`: the cluster's state (services,
//! releases, rollouts, assignments, the ledger) kept in a real etcd, this
//! node's instances in its own database.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::time::Duration;

use util::*;

const WEB: &str = r#"
[images.app]
include = ["bin"]
entrypoint = ["/bin/start.sh"]

[services.web]
image = "app"
replicas = 2
env = { HELLO_VERSION = "v1" }
[services.web.health.readiness]
http = "/healthz"
interval = "200ms"
"#;

/// The tests of three nodes start nine processes and time their healing:
/// one at a time, so that they do not starve each other on CI's two cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn on_etcd(etcd: &Etcd, node: &str) -> impl FnOnce(&mut std::process::Command) {
    let (url, node) = (etcd.endpoint.clone(), node.to_owned());
    move |c| {
        c.args(["--etcd", &url, "--node", &node]);
    }
}

/// The address node `i` (0..3) advertises when the test gives each its
/// own: 127.0.0.2 to 127.0.0.4.
fn advertised(i: usize) -> std::net::IpAddr {
    std::net::Ipv4Addr::new(127, 0, 0, 2 + i as u8).into()
}

/// The service's release is whole: two ready instances of it, each
/// answering as `version` (a release's predecessor may stay warm beside
/// them, for its watch).
fn ready_and_serving(env: &Env, version: &str) -> bool {
    let s = service_status(env, "web");
    s["ready"] == 2
        && s["instances"].as_array().is_some_and(|list| {
            let current: Vec<_> = list
                .iter()
                .filter(|i| i["revision"] == s["revision"])
                .collect();
            current.len() == 2
                && current.iter().all(|i| {
                    i["port"]
                        .as_u64()
                        .and_then(|p| http_get(p, "/"))
                        .is_some_and(|b| {
                            b.starts_with(&format!(
                                "hello from {version} (instance {}",
                                i["id"].as_str().unwrap_or("?")
                            ))
                        })
                })
        })
}

#[test]
fn the_cluster_state_lives_in_etcd_and_a_new_disk_resumes_from_it() {
    let etcd = Etcd::start();
    let env = Env::new();
    let spec = hello_app(&env.path("app"), WEB);
    let spec = spec.to_str().unwrap();
    let mut agent = Agent::start_with(&env, on_etcd(&etcd, "n1"));
    env.ok(&["apply", "-f", spec]);
    assert!(ready_and_serving(&env, "v1"));
    let nodes = env.json(&["nodes", "--json"]);
    assert_eq!(
        (
            &nodes["cluster"],
            &nodes["leader"],
            &nodes["nodes"][0]["instances"]
        ),
        (
            &serde_json::json!(true),
            &serde_json::json!("n1"),
            &serde_json::json!(2)
        )
    );
    let id = |s: &serde_json::Value| s["instances"][0]["id"].as_str().unwrap().to_owned();
    assert!(id(&service_status(&env, "web")).starts_with("web-"));

    // What the cluster shares is in etcd, under kiln's prefix.
    let keys = etcd.keys("/kiln/");
    for want in [
        "/kiln/svc/web",
        "/kiln/rel/web/00000000000000000001",
        "/kiln/assign/web",
        "/kiln/obs/web/n1",
        "/kiln/head",
        "/kiln/fence",
        "/kiln/key",
    ] {
        assert!(keys.iter().any(|k| k == want), "{want} in {keys:?}");
    }
    // The bake the apply made is in the cluster's ledger (the CLI's records
    // go through the agent), chained with the rest.
    let events = keys.iter().filter(|k| k.starts_with("/kiln/log/")).count();
    assert!(events >= 4, "{keys:?}");
    let audit = env.ok(&["audit", "--json"]);
    assert!(audit.contains("image-baked"), "{audit}");
    assert!(
        env.path("home/cluster.json").is_file(),
        "the home remembers its cluster"
    );

    // The node's disk is lost: another home, the same node name, on the
    // same etcd. The service comes back from etcd's records (release 1, two
    // replicas) with new instances; the ledger goes on from where it was.
    agent.stop();
    let head_before: u64 = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|e| e["seq"].as_u64())
        .max()
        .unwrap();
    let env2 = Env::new();
    // The new disk has the image (as a pull from a registry would give it).
    hello_app(&env2.path("app"), WEB);
    env2.ok(&["bake", "-f", env2.path("app/kiln.toml").to_str().unwrap()]);
    let _agent2 = Agent::start_with(&env2, on_etcd(&etcd, "n1"));
    wait_for(
        "the service back from etcd",
        Duration::from_secs(60),
        || ready_and_serving(&env2, "v1"),
    );
    let history = releases(&env2, "web");
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0]["revision"], 1);
    let audit2 = env2.ok(&["audit", "--json"]);
    let seqs: Vec<u64> = audit2
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|e| e["seq"].as_u64())
        .collect();
    assert!(seqs.contains(&head_before), "the same ledger: {audit2}");
    assert!(*seqs.iter().max().unwrap() > head_before, "and it goes on");
    // Signed by two nodes' keys (the first home's checkpoints, the new
    // one's), both listed in the cluster: one ledger that verifies whole,
    // and no break recorded.
    assert!(!audit2.contains("ledger-broken"), "{audit2}");
    assert_eq!(
        etcd.keys("/kiln/nodekey/").len(),
        2,
        "each home's key listed"
    );
    let verified = env2.ok(&["audit", "verify", "--allow-unsigned-tail"]);
    assert!(verified.contains("verified"), "{verified}");
    // With only the new node's key, the first node's checkpoints fail.
    let only_new = env2.run(&[
        "audit",
        "verify",
        "--key",
        env2.home.join("node.pub").to_str().unwrap(),
    ]);
    assert!(!only_new.status.success());
    assert!(
        String::from_utf8_lossy(&only_new.stderr).contains("not signed by this key"),
        "{}",
        String::from_utf8_lossy(&only_new.stderr)
    );
}

#[test]
fn bad_cluster_flags_and_an_unreachable_etcd_are_refused_in_one_line() {
    let env = Env::new();
    for (args, says) in [
        (vec!["--etcd", "127.0.0.1:2379"], "starts with http://"),
        (vec!["--etcd", "https://h:2379"], "needs --etcd-ca"),
        (
            vec!["--etcd", "http://h:2379", "--etcd-ca", "/ca.pem"],
            "https://",
        ),
        (
            vec![
                "--etcd",
                "https://h:2379",
                "--etcd-ca",
                "/ca.pem",
                "--etcd-cert",
                "/c.pem",
            ],
            "--etcd-key",
        ),
        (
            vec!["--etcd", "http://h:1", "--node", "Bad/Name"],
            "node name",
        ),
        (
            vec!["--etcd", "http://h:1", "--etcd-prefix", "kiln"],
            "starts and ends with /",
        ),
        (vec!["--node", "n1"], "--etcd"),
        (vec!["--advertise", "127.0.0.2"], "--etcd"),
        (
            vec!["--etcd", "http://h:1", "--advertise", "0.0.0.0"],
            "not unspecified",
        ),
        (
            vec!["--etcd", "http://h:1", "--advertise", "node-1"],
            "not an IP address",
        ),
        (
            vec!["--etcd", "http://h:1", "--label", "Zone=a"],
            "label `Zone=a`",
        ),
        (
            vec!["--etcd", "http://h:1", "--label", "zone"],
            "expected KEY=VALUE",
        ),
        (vec!["--label", "zone=a"], "--etcd"),
    ] {
        let mut full = vec!["serve"];
        full.extend(args.iter().copied());
        let out = env.run(&full);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{full:?}: {err}");
        assert!(err.contains(says), "{full:?}: {err}");
    }
    // Nothing listens there: the agent does not start, and says why.
    let url = format!("http://127.0.0.1:{}", free_port());
    let out = env
        .cmd()
        .args(["serve", "--run-agent", "--etcd", &url])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&url), "{err}");
}

/// etcd stops under load: the instances and the router keep serving (no
/// request fails), an apply is refused in one line naming etcd, and once
/// etcd is back the same apply goes through.
#[test]
fn losing_etcd_stops_changes_not_traffic() {
    let mut etcd = Etcd::start();
    let env = Env::new();
    let port = free_port();
    let spec = hello_app(
        &env.path("app"),
        &WEB.replace(
            "replicas = 2",
            &format!("replicas = 2\nlisten = \"127.0.0.1:{port}\""),
        ),
    );
    let spec = spec.to_str().unwrap();
    let _agent = Agent::start_with(&env, on_etcd(&etcd, "n1"));
    env.ok(&["apply", "-f", spec]);
    let load = Load::start(port, 4);
    std::thread::sleep(Duration::from_millis(300));
    etcd.stop();
    // Changed spec: a new release would be needed, which etcd must record.
    let v2 = std::fs::read_to_string(spec)
        .unwrap()
        .replace("HELLO_VERSION = \"v1\"", "HELLO_VERSION = \"v2\"");
    std::fs::write(spec, v2).unwrap();
    let out = env.run(&["apply", "-f", spec]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "applied without etcd");
    assert!(
        err.contains(&format!("etcd at {}", etcd.endpoint)) && err.trim().lines().count() == 1,
        "{err}"
    );
    std::thread::sleep(Duration::from_millis(500));
    etcd.run();
    // Back: the same apply goes through, the new release rolls out.
    wait_for(
        "an apply once etcd is back",
        Duration::from_secs(60),
        || env.run(&["apply", "-f", spec]).status.success(),
    );
    wait_for("v2 serving", Duration::from_secs(60), || {
        ready_and_serving(&env, "v2")
    });
    let count = load.finish();
    count.assert_none_failed();
    assert!(count.ok > 100, "{count:?}");
}

/// Three agents, `n1`..`n3`, on `etcd`, with `web` as the spec (in the
/// first home's app directory), its image baked on the nodes of `baked`
/// (the same inputs bake the same digest); returned once all three are
/// members and one leads.
fn three_nodes(etcd: &Etcd, web: &str, baked: &[usize]) -> (Vec<Env>, Vec<Option<Agent>>, String) {
    three_nodes_at(etcd, web, baked, false)
}

/// [`three_nodes`], each advertising its own address ([`advertised`]) when
/// `apart`.
fn three_nodes_at(
    etcd: &Etcd,
    web: &str,
    baked: &[usize],
    apart: bool,
) -> (Vec<Env>, Vec<Option<Agent>>, String) {
    three_nodes_with(etcd, web, baked, |i, c| {
        if apart {
            c.args(["--advertise", &advertised(i).to_string()]);
        }
    })
}

/// [`three_nodes`], `configure` adding node `i`'s own flags to its
/// `kiln serve`.
fn three_nodes_with(
    etcd: &Etcd,
    web: &str,
    baked: &[usize],
    configure: impl Fn(usize, &mut std::process::Command),
) -> (Vec<Env>, Vec<Option<Agent>>, String) {
    let envs: Vec<Env> = (0..3).map(|_| Env::new()).collect();
    let spec = hello_app(&envs[0].path("app"), web);
    let spec = spec.to_str().unwrap().to_owned();
    let agents = envs
        .iter()
        .enumerate()
        .map(|(i, env)| {
            let name = format!("n{}", i + 1);
            let member = on_etcd(etcd, &name);
            Some(Agent::start_with(env, |c| {
                member(c);
                configure(i, c);
            }))
        })
        .collect();
    for &i in baked {
        envs[i].ok(&["bake", "-f", &spec]);
    }
    wait_for(
        "three members and a leader",
        Duration::from_secs(20),
        || etcd.keys("/kiln/nodes/").len() == 3 && !leader_of(etcd).is_empty(),
    );
    (envs, agents, spec)
}

/// The leader's name, from etcd ("" when none).
fn leader_of(etcd: &Etcd) -> String {
    let out = etcd.ctl(&["get", "--print-value-only", "/kiln/leader"]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The index (0..3) of node `name` ("n1".."n3").
fn index_of(name: &str) -> usize {
    name.trim_start_matches('n').parse::<usize>().unwrap() - 1
}

/// `kill -9` of a node: its `kiln serve` (supervisor and agent) and its
/// instances (each one's process group: a sandbox's inner processes too),
/// the supervisor frozen first so that it cannot start another agent in
/// between.
fn kill_node(env: &Env, agent: &mut Agent) {
    let status = env.json(&["status", "--json"]);
    let supervisor = u64::from(agent.pid());
    signal(supervisor, "-STOP");
    if let Some(pid) = status["agent"]["pid"].as_u64() {
        signal(pid, "-KILL");
    }
    for pid in status["services"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["instances"].as_array().cloned().unwrap_or_default())
        .filter_map(|i| i["pid"].as_u64())
    {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}"), &pid.to_string()])
            .status();
    }
    signal(supervisor, "-KILL");
    if let Some(mut child) = agent.child.take() {
        let _ = child.wait();
    }
    // A sandbox's pid-1 reaper is in a session of its own: every process
    // that names this home goes too (its namespace with it), as with a
    // machine that dies.
    for pid in processes_mentioning(env.home.to_str().unwrap()) {
        signal(u64::from(pid), "-KILL");
    }
}

/// How many ready instances of `web` this node runs.
fn ready_here(env: &Env) -> usize {
    service_status(env, "web")["instances"]
        .as_array()
        .map_or(0, |list| {
            list.iter()
                .filter(|i| i["state"] == "running" && i["ready"] == true)
                .count()
        })
}

/// Three agents on one etcd: one leads; three replicas spread one per
/// node; a node killed with its instances has its slot started on the
/// others within its lease's TTL plus the app's start; the leader killed,
/// another takes over and does the same.
#[test]
fn three_nodes_spread_replicas_and_heal_a_lost_node_and_a_lost_leader() {
    let _serial = one_at_a_time();
    let etcd = Etcd::start();
    let (envs, mut agents, spec) = three_nodes(
        &etcd,
        &WEB.replace("replicas = 2", "replicas = 3"),
        &[0, 1, 2],
    );
    let spec = spec.as_str();
    // A plain apply returns once the whole fleet is ready (each node's
    // status counts every node's instances).
    envs[0].ok(&["apply", "-f", spec]);
    // Every node's status says so (the others' within a pass or two).
    wait_for("every node's status whole", Duration::from_secs(10), || {
        envs.iter().all(|env| {
            let s = service_status(env, "web");
            s["ready"] == 3 && s["converged"] == true
        })
    });
    wait_for(
        "one ready replica on each node",
        Duration::from_secs(60),
        || envs.iter().all(|e| ready_here(e) == 1),
    );
    // The leader saw them all ready (through the others' observations).
    wait_for("release 1 active", Duration::from_secs(60), || {
        releases(&envs[0], "web")[0]["outcome"] == "active"
    });

    let leader = || leader_of(&etcd);
    let first = leader();
    let lead = index_of(&first);
    let other = (lead + 1) % 3;
    let third = (lead + 2) % 3;
    // `kiln nodes` on any member: the three, the leader, one instance each.
    let nodes = envs[other].json(&["nodes", "--json"]);
    assert_eq!(nodes["cluster"], true);
    assert_eq!(nodes["this"], format!("n{}", other + 1));
    assert_eq!(nodes["leader"], first.as_str());
    // Each member's lease: seconds left of its 5 s TTL.
    for n in nodes["nodes"].as_array().unwrap() {
        assert_eq!(n["lease"][1], 5, "{n}");
        assert!((0..=5).contains(&n["lease"][0].as_i64().unwrap()), "{n}");
    }
    let listed: Vec<(String, bool, u64)> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_owned(),
                n["leader"] == true,
                n["instances"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        (1..=3)
            .map(|i| (format!("n{i}"), format!("n{i}") == first, 1))
            .collect::<Vec<_>>()
    );
    // Each node's status names it beside its instances.
    for (i, env) in envs.iter().enumerate() {
        let s = service_status(env, "web");
        assert_eq!(s["instances"][0]["node"], format!("n{}", i + 1));
        assert!(env.ok(&["status"]).contains(&format!(" n{} ", i + 1)));
    }
    let table = envs[lead].ok(&["nodes"]);
    assert!(
        table.contains("(this node)") && table.contains("yes"),
        "{table}"
    );

    // A node that is not the leader dies, instances and all.
    kill_node(&envs[other], agents[other].as_mut().unwrap());
    agents[other] = None;
    let t = std::time::Instant::now();
    wait_for(
        "its slot started on the others",
        Duration::from_secs(60),
        || ready_here(&envs[lead]) + ready_here(&envs[third]) == 3,
    );
    eprintln!("node loss healed in {:?}", t.elapsed());
    assert_eq!(leader(), first, "the leader did not change");
    let names: Vec<String> = envs[lead].json(&["nodes", "--json"])["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(!names.contains(&format!("n{}", other + 1)), "{names:?}");

    // Now the leader dies: the last node takes over and runs all three.
    kill_node(&envs[lead], agents[lead].as_mut().unwrap());
    agents[lead] = None;
    let t = std::time::Instant::now();
    wait_for(
        "the last node leads and runs every slot",
        Duration::from_secs(60),
        || ready_here(&envs[third]) == 3,
    );
    eprintln!("leader loss healed in {:?}", t.elapsed());
    assert_eq!(leader(), format!("n{}", third + 1));
    // Its instances serve.
    assert!(ready_and_serving_all(&envs[third], "v1"));
}

/// Every ready instance of `web` this node runs answers as `version`.
fn ready_and_serving_all(env: &Env, version: &str) -> bool {
    service_status(env, "web")["instances"]
        .as_array()
        .is_some_and(|list| {
            list.iter().all(|i| {
                i["port"]
                    .as_u64()
                    .and_then(|p| http_get(p, "/"))
                    .is_some_and(|b| b.starts_with(&format!("hello from {version}")))
            })
        })
}

fn signal(pid: u64, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status();
}

fn instance_ids(env: &Env) -> Vec<String> {
    let mut ids: Vec<String> = service_status(env, "web")["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    ids
}

/// A member cut off (its agent stopped with SIGSTOP) for less than its
/// lease's TTL loses nothing; past it, its slot starts on the others, and
/// when it comes back it stops only the instance whose slot moved (and
/// joins again). The leader cut off past its TTL: another leads, and the
/// old one, back, no longer does.
#[test]
fn a_member_cut_off_keeps_what_it_runs_until_its_lease_ends() {
    let _serial = one_at_a_time();
    let etcd = Etcd::start();
    let (envs, _agents, spec) = three_nodes(
        &etcd,
        &WEB.replace("replicas = 2", "replicas = 3"),
        &[0, 1, 2],
    );
    envs[0].ok(&["apply", "--detach", "-f", &spec]);
    wait_for(
        "one ready replica on each node",
        Duration::from_secs(60),
        || envs.iter().all(|e| ready_here(e) == 1),
    );
    let leader = || leader_of(&etcd);
    let first = leader();
    let lead = index_of(&first);
    let other = (lead + 1) % 3;
    let agent_pid = |env: &Env| {
        env.json(&["status", "--json"])["agent"]["pid"]
            .as_u64()
            .unwrap()
    };
    let before: Vec<Vec<String>> = envs.iter().map(instance_ids).collect();

    // Cut off for 2 s (under the 5 s TTL): nothing moves.
    let pid = agent_pid(&envs[other]);
    signal(pid, "-STOP");
    std::thread::sleep(Duration::from_secs(2));
    signal(pid, "-CONT");
    std::thread::sleep(Duration::from_secs(2));
    let after: Vec<Vec<String>> = envs.iter().map(instance_ids).collect();
    assert_eq!(before, after, "a short cut changed nothing");

    // Cut off for 9 s: its slot starts on the others meanwhile; back, it
    // stops its own (its slot moved) and is a member again.
    signal(pid, "-STOP");
    let healed = std::time::Instant::now();
    wait_for(
        "its slot started on the others",
        Duration::from_secs(60),
        || ready_here(&envs[lead]) + ready_here(&envs[(lead + 2) % 3]) == 3,
    );
    eprintln!("cut-off member's slot healed in {:?}", healed.elapsed());
    std::thread::sleep(Duration::from_secs(9).saturating_sub(healed.elapsed()));
    signal(pid, "-CONT");
    wait_for(
        "the returning member stops its moved instance",
        Duration::from_secs(60),
        || instance_ids(&envs[other]).is_empty(),
    );
    wait_for("it is a member again", Duration::from_secs(20), || {
        etcd.keys("/kiln/nodes/").len() == 3
    });
    let total: usize = envs.iter().map(ready_here).sum();
    assert_eq!(total, 3, "no slot twice");
    assert_eq!(leader(), first);

    // The leader cut off past its TTL: another member leads; back, the old
    // one does not.
    let pid = agent_pid(&envs[lead]);
    signal(pid, "-STOP");
    wait_for("another leader", Duration::from_secs(60), || {
        let l = leader();
        !l.is_empty() && l != first
    });
    let second = leader();
    signal(pid, "-CONT");
    wait_for(
        "the old leader sees the new one",
        Duration::from_secs(60),
        || envs[lead].json(&["nodes", "--json"])["leader"] == second.as_str(),
    );
    assert_eq!(leader(), second);
    wait_for("every slot ready once", Duration::from_secs(60), || {
        envs.iter().map(ready_here).sum::<usize>() == 3
    });
}

/// Release 2's canary waits at step 2's manual pause (50%), as `env`'s
/// agent (the leader) reports it.
fn canary_at_step_2(env: &Env) -> bool {
    let s = service_status(env, "web");
    s["revision"] == 2
        && s["outcome"] == "pending"
        && s["canary"]["step"] == 2
        && s["canary"]["weight"] == 50
}

/// The leader dies mid-canary (waiting at step 2 of 3): the new leader
/// goes on from that step — it waits there, a promote on it finishes the
/// rollout on the remaining nodes — and a promote sent to a member that
/// does not lead is refused naming the leader.
#[test]
fn a_new_leader_goes_on_with_the_canary_where_the_old_one_left_it() {
    let _serial = one_at_a_time();
    let etcd = Etcd::start();
    let web = format!(
        "{}{TWO_MANUAL_STEPS}",
        WEB.replace("replicas = 2", "replicas = 3")
    );
    let (envs, mut agents, spec) = three_nodes(&etcd, &web, &[0, 1, 2]);
    let spec = spec.as_str();
    let leader = || leader_of(&etcd);
    let lead = index_of(&leader());
    let (second, third) = ((lead + 1) % 3, (lead + 2) % 3);
    // Release 1, then 2 (the same image: only its env differs).
    envs[lead].ok(&["apply", "--detach", "-f", spec]);
    wait_for(
        "release 1 on every node, active",
        Duration::from_secs(60),
        || {
            envs.iter().all(|e| ready_here(e) == 1)
                && service_status(&envs[lead], "web")["outcome"] == "active"
        },
    );
    let v2 = std::fs::read_to_string(spec)
        .unwrap()
        .replace("HELLO_VERSION = \"v1\"", "HELLO_VERSION = \"v2\"");
    std::fs::write(spec, v2).unwrap();
    envs[lead].ok(&["apply", "-f", spec]);
    envs[lead].ok(&["promote", "web"]);
    wait_for("the canary at step 2", Duration::from_secs(60), || {
        canary_at_step_2(&envs[lead])
    });
    // A member that does not lead refuses the request, naming the leader.
    let refused = envs[second].run(&["promote", "web"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        err.contains("does not lead the cluster") && err.contains(&format!("n{}", lead + 1)),
        "{err}"
    );

    kill_node(&envs[lead], agents[lead].as_mut().unwrap());
    agents[lead] = None;
    wait_for("a new leader", Duration::from_secs(60), || {
        let l = leader();
        !l.is_empty() && l != format!("n{}", lead + 1)
    });
    let now = index_of(&leader());
    assert!(now == second || now == third);
    // It goes on from step 2 (not step 1, not a new rollout).
    wait_for("the new leader at step 2", Duration::from_secs(60), || {
        canary_at_step_2(&envs[now])
    });
    envs[now].ok(&["promote", "web"]);
    wait_for(
        "release 2 whole on the two nodes left",
        Duration::from_secs(60),
        || {
            let s = service_status(&envs[now], "web");
            s["revision"] == 2
                && s["outcome"] == "active"
                && ready_here(&envs[second]) + ready_here(&envs[third]) >= 3
        },
    );
    let history = releases(&envs[now], "web");
    assert_eq!(history.len(), 2, "no release made meanwhile: {history:?}");
}

/// A member that cannot start a release reports it, and the slot starts on
/// another node: here each agent enforces its own runtime policy — a
/// release of the process runtime, applied through the one member that
/// allows it, runs only there.
#[test]
fn a_slot_a_node_cannot_start_goes_to_another() {
    let _serial = one_at_a_time();
    let etcd = Etcd::start();
    let envs: Vec<Env> = (0..3).map(|_| Env::new()).collect();
    let spec = hello_app(
        &envs[0].path("app"),
        &WEB.replace("replicas = 2", "replicas = 3\nruntime = \"process\""),
    );
    let spec = spec.to_str().unwrap().to_owned();
    let _agents: Vec<Agent> = envs
        .iter()
        .enumerate()
        .map(|(i, env)| {
            let name = format!("n{}", i + 1);
            let member = on_etcd(&etcd, &name);
            Agent::start_with(env, |c| {
                member(c);
                if i == 0 {
                    c.args(["--allow-runtime", "process"]);
                }
            })
        })
        .collect();
    wait_for("three members", Duration::from_secs(20), || {
        etcd.keys("/kiln/nodes/").len() == 3 && !leader_of(&etcd).is_empty()
    });
    envs[0].ok(&["apply", "--detach", "-f", &spec]);
    wait_for("three ready on n1", Duration::from_secs(60), || {
        ready_here(&envs[0]) == 3
    });
    assert_eq!(ready_here(&envs[1]) + ready_here(&envs[2]), 0);
    wait_for("release 1 active", Duration::from_secs(60), || {
        releases(&envs[0], "web")[0]["outcome"] == "active"
    });
}

/// Images across nodes: only n1 baked the image; n2 and n3 pull it by
/// digest from n1's image endpoint (with the cluster's credentials, which
/// a stranger lacks), record the pull, and run it.
#[test]
fn a_node_without_the_image_pulls_it_by_digest_from_another() {
    let _serial = one_at_a_time();
    let etcd = Etcd::start();
    let (envs, _agents, spec) =
        three_nodes(&etcd, &WEB.replace("replicas = 2", "replicas = 3"), &[0]);
    envs[0].ok(&["apply", "--detach", "-f", &spec]);
    wait_for("one ready on each node", Duration::from_secs(60), || {
        envs.iter().all(|e| ready_here(e) == 1)
    });
    let digest = releases(&envs[0], "web")[0]["config"]["image"]
        .as_str()
        .unwrap()
        .to_owned();
    for env in &envs[1..] {
        let images = env.ok(&["images", "--json"]);
        assert!(images.contains(&digest), "{images}");
    }
    let pulls = envs[1].ok(&["audit", "--kind", "image-pulled", "--json"]);
    assert!(pulls.contains("node n1"), "{pulls}");
    // n1's endpoint, as registered: nothing without the credentials.
    let n1: serde_json::Value = serde_json::from_slice(
        &etcd
            .ctl(&["get", "--print-value-only", "/kiln/nodes/n1"])
            .stdout,
    )
    .unwrap();
    let port = n1["images"].as_u64().unwrap() as u16;
    assert_ne!(port, 0);
    assert!(!n1["images_cert"].as_str().unwrap_or("").is_empty());
    // Over TLS only (its certificate is the one registered; curl -k here),
    // and nothing without the cluster's credentials.
    let url = format!("https://127.0.0.1:{port}/v2/app/manifests/{digest}");
    let status = |auth: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(auth)
            .arg(&url)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(status(&[]), "401");
    assert_eq!(status(&["-u", "kiln-node:guess"]), "401");
    let plain = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(url.replace("https://", "http://"))
        .output()
        .unwrap();
    assert_ne!(
        String::from_utf8_lossy(&plain.stdout),
        "401",
        "no plain HTTP"
    );
}

/// `count` requests on one keep-alive connection to `addr`: the bodies'
/// "hello from VERSION (instance ID" parts, as (version, instance).
fn answers(addr: std::net::SocketAddr, count: usize) -> Vec<(String, String)> {
    let Ok(s) = std::net::TcpStream::connect(addr) else {
        return Vec::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut conn = std::io::BufReader::new(s);
    let mut out = Vec::new();
    for _ in 0..count {
        let Ok((200, body)) = request(&mut conn, "/") else {
            break;
        };
        let Some(rest) = body.strip_prefix("hello from ") else {
            break;
        };
        let (version, rest) = rest.split_once(" (instance ").unwrap_or((rest, ""));
        let id: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        out.push((version.to_owned(), id));
    }
    out
}

/// Traffic across nodes: each node listens on `listen = ":PORT"` at its
/// advertised address (127.0.0.2..4) and sends to the ready instances of
/// every node (which listen there too); a rolling update under load
/// through all three routers at once loses no request.
#[test]
fn every_router_sends_to_every_node_and_a_rolling_update_loses_no_request() {
    let _serial = one_at_a_time();
    let etcd = Etcd::start();
    let port = free_port();
    let web = WEB.replace(
        "replicas = 2",
        &format!("replicas = 3\nlisten = \":{port}\""),
    );
    let (envs, mut agents, spec) = three_nodes_at(&etcd, &web, &[0, 1, 2], true);
    envs[0].ok(&["apply", "-f", &spec]);
    let routers: Vec<std::net::SocketAddr> = (0..3).map(|i| (advertised(i), port).into()).collect();
    let behind = |router| {
        answers(router, 12)
            .into_iter()
            .map(|(_, id)| id)
            .collect::<std::collections::BTreeSet<_>>()
    };
    wait_for(
        "each router reaches the instances of all three nodes",
        Duration::from_secs(30),
        || routers.iter().all(|r| behind(*r).len() == 3),
    );
    // Each node's instance listens on its node's address, not loopback.
    for (i, env) in envs.iter().enumerate() {
        let s = service_status(env, "web");
        let p = s["instances"][0]["port"].as_u64().unwrap() as u16;
        assert!(std::net::TcpStream::connect((advertised(i), p)).is_ok());
        assert!(std::net::TcpStream::connect(("127.0.0.1", p)).is_err());
    }
    // Nothing listens on loopback's port: `:PORT` is the advertised one.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());

    // A rolling update, applied on a member that may not lead, under load
    // through every router.
    let loads: Vec<Load> = routers.iter().map(|r| Load::start_at(*r, 2)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(
        &spec,
        text.replace("HELLO_VERSION = \"v1\"", "HELLO_VERSION = \"v2\""),
    )
    .unwrap();
    // (It returns once the whole fleet is on v2, as every node counts it.)
    envs[1].ok(&["apply", "-f", &spec]);
    wait_for(
        "every router sends to three instances of v2",
        Duration::from_secs(30),
        || {
            routers.iter().all(|r| {
                let seen = answers(*r, 12);
                seen.iter().all(|(v, _)| v == "v2")
                    && seen
                        .iter()
                        .map(|(_, id)| id)
                        .collect::<std::collections::BTreeSet<_>>()
                        .len()
                        == 3
            })
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    for (i, load) in loads.into_iter().enumerate() {
        let count = load.finish();
        eprintln!("through n{}: {count:?}", i + 1);
        count.assert_none_failed();
        assert!(
            count.bodies.get("hello from v1").is_some_and(|n| *n > 0),
            "{count:?}"
        );
        assert!(
            count.bodies.get("hello from v2").is_some_and(|n| *n > 0),
            "{count:?}"
        );
    }
    for agent in agents.iter_mut().flatten() {
        agent.stop();
    }
}

/// `kiln drain`: under load through every node's router, a drained node's
/// instance is replaced on the others before it stops (no request fails),
/// the node takes nothing new, the last node not drained cannot be, and
/// `kiln undrain` ends it.
#[test]
fn a_drained_node_hands_its_instances_over_without_a_failed_request() {
    let _serial = one_at_a_time();
    let etcd = Etcd::start();
    let port = free_port();
    let web = WEB.replace(
        "replicas = 2",
        &format!("replicas = 3\nlisten = \":{port}\""),
    );
    let (envs, mut agents, spec) = three_nodes_at(&etcd, &web, &[0, 1, 2], true);
    envs[0].ok(&["apply", "-f", &spec]);
    let routers: Vec<std::net::SocketAddr> = (0..3).map(|i| (advertised(i), port).into()).collect();
    wait_for(
        "each router reaches the instances of all three nodes",
        Duration::from_secs(30),
        || {
            routers.iter().all(|r| {
                let ids: std::collections::BTreeSet<String> =
                    answers(*r, 12).into_iter().map(|(_, id)| id).collect();
                ids.len() == 3
            })
        },
    );
    let loads: Vec<Load> = routers.iter().map(|r| Load::start_at(*r, 2)).collect();
    std::thread::sleep(Duration::from_millis(300));
    // It returns once n2 runs nothing.
    let out = envs[0].ok(&["drain", "n2"]);
    assert!(out.contains("node n2 drained"), "{out}");
    wait_for("n2's instance gone", Duration::from_secs(10), || {
        service_status(&envs[1], "web")["instances"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
    wait_for("three ready on n1 and n3", Duration::from_secs(10), || {
        ready_here(&envs[0]) + ready_here(&envs[2]) == 3
    });
    std::thread::sleep(Duration::from_millis(500));
    for (i, load) in loads.into_iter().enumerate() {
        let count = load.finish();
        eprintln!("through n{}: {count:?}", i + 1);
        count.assert_none_failed();
        assert!(count.ok > 100, "{count:?}");
    }
    let nodes = envs[2].json(&["nodes", "--json"]);
    let n2 = &nodes["nodes"][1];
    assert_eq!(
        (n2["name"].as_str(), n2["drained"].as_bool()),
        (Some("n2"), Some(true))
    );
    assert_eq!(n2["instances"], 0);
    assert_eq!(n2["address"], "127.0.0.3");
    assert!(envs[1].ok(&["nodes"]).contains("DRAINED"));

    // What cannot be drained is refused, naming why.
    let err = envs[0].fails(&["drain", "nope"]);
    assert!(err.contains("no node nope in the cluster"), "{err}");
    envs[1].ok(&["drain", "n1", "--no-wait"]);
    let err = envs[1].fails(&["drain", "n3"]);
    assert!(err.contains("only node not drained"), "{err}");
    // Undrained: n2 takes instances again (n1's, which it moves away).
    envs[2].ok(&["undrain", "n2"]);
    let undrained = envs[0].json(&["undrain", "n1", "--json"]);
    assert_eq!(undrained["drained"], false);
    let nodes = envs[0].json(&["nodes", "--json"]);
    assert!(
        nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["drained"] == false),
        "{nodes}"
    );
    for agent in agents.iter_mut().flatten() {
        agent.stop();
    }
}

/// A canary is judged on every router's requests: with traffic only
/// through a member that does not lead, the leader sums that member's
/// counters with its own, sees the canary's 5xx and rolls it back.
#[test]
fn a_canary_is_judged_on_the_requests_of_every_nodes_router() {
    let _serial = one_at_a_time();
    let etcd = Etcd::start();
    let port = free_port();
    let web = format!(
        "{}[services.web.rollout]\nstrategy = \"canary\"\n\
         steps = [{{ weight = 50, pause = \"60s\" }}, {{ weight = 100 }}]\n\
         [services.web.rollout.analysis]\nmax_error_rate = \"5%\"\nmin_requests = 50\n",
        WEB.replace(
            "replicas = 2",
            &format!("replicas = 3\nlisten = \":{port}\""),
        )
    );
    let (envs, mut agents, spec) = three_nodes_at(&etcd, &web, &[0, 1, 2], true);
    envs[0].ok(&["apply", "-f", &spec]);
    let lead = index_of(&leader_of(&etcd));
    let other = (lead + 1) % 3;
    let through: std::net::SocketAddr = (advertised(other), port).into();
    wait_for(
        "a follower's router serves",
        Duration::from_secs(30),
        || answers(through, 6).len() == 6,
    );
    let load = Load::start_at(through, 2);
    let v2 = std::fs::read_to_string(&spec).unwrap().replace(
        "HELLO_VERSION = \"v1\"",
        "HELLO_VERSION = \"v2\", HELLO_ERROR_RATE = \"1\"",
    );
    std::fs::write(&spec, v2).unwrap();
    let out = envs[other].run(&["apply", "-f", &spec]);
    let err = String::from_utf8_lossy(&out.stderr);
    let count = load.finish();
    assert!(!out.status.success(), "the canary went live: {err}");
    assert!(
        err.contains("canary analysis failed at step 1/2")
            && err.contains("above max_error_rate 5%"),
        "{err}"
    );
    let r = releases(&envs[lead], "web");
    assert_eq!(r[1]["outcome"], "failed");
    assert_eq!(r[0]["outcome"], "active");
    // Stable answered the rest: the only failures are the canary's 500s.
    assert!(
        count.ok > 0 && count.errors.iter().all(|e| e.starts_with("500")),
        "{count:?}"
    );
    for agent in agents.iter_mut().flatten() {
        agent.stop();
    }
}

/// Placement within labels: a service with `node_labels = { zone = "a" }`
/// runs only on the members started with `--label zone=a`, spread over
/// them; `kiln nodes` lists each member's labels.
#[test]
fn a_service_runs_only_on_nodes_with_its_labels() {
    let _serial = one_at_a_time();
    let etcd = Etcd::start();
    let zones = ["a", "b", "a"];
    let web = WEB.replace(
        "replicas = 2",
        "replicas = 3\nnode_labels = { zone = \"a\" }",
    );
    let (envs, _agents, spec) = three_nodes_with(&etcd, &web, &[], |i, c| {
        let label = format!("zone={}", zones[i]);
        c.args(["--label", &label, "--label", "disk=ssd"]);
    });
    envs[0].ok(&["apply", "-f", &spec]);
    let (on_a1, on_b, on_a3) = (
        ready_here(&envs[0]),
        ready_here(&envs[1]),
        ready_here(&envs[2]),
    );
    assert_eq!(on_b, 0, "nothing on the node of zone b");
    assert_eq!(on_a1 + on_a3, 3);
    assert!(on_a1.abs_diff(on_a3) <= 1, "spread: {on_a1} and {on_a3}");
    let nodes = envs[1].json(&["nodes", "--json"]);
    assert_eq!(nodes["nodes"][1]["labels"]["zone"], "b");
    assert_eq!(nodes["nodes"][0]["labels"]["disk"], "ssd");
    assert!(nodes["nodes"][2]["cpus"].as_u64().unwrap() >= 1, "{nodes}");
    assert!(envs[1].ok(&["nodes"]).contains("disk=ssd,zone=b"));
    // The labels changed (a settings change, no new release): the
    // instances move to the node that has the new ones.
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(&spec, text.replace("zone = \"a\"", "zone = \"b\"")).unwrap();
    envs[2].ok(&["apply", "-f", &spec]);
    wait_for(
        "three on n2, none elsewhere",
        Duration::from_secs(60),
        || {
            ready_here(&envs[1]) == 3
                && envs
                    .iter()
                    .map(|e| {
                        service_status(e, "web")["instances"]
                            .as_array()
                            .map_or(0, Vec::len)
                    })
                    .sum::<usize>()
                    == 3
        },
    );
    assert_eq!(releases(&envs[0], "web").len(), 1, "no new release");
}

/// TLS to etcd with client certificates (etcd's `--client-cert-auth`): an
/// agent without a client certificate is refused at its start, in one
/// line naming etcd; with one, the cluster's state goes to etcd over TLS.
#[test]
fn etcd_over_tls_takes_only_a_member_with_a_client_certificate() {
    let etcd = Etcd::start_tls();
    let tls = etcd.tls.as_ref().unwrap();
    let env = Env::new();
    let ca = tls.ca.to_str().unwrap();
    let out = env
        .cmd()
        .args([
            "serve",
            "--run-agent",
            "--etcd",
            &etcd.endpoint,
            "--etcd-ca",
            ca,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&etcd.endpoint), "{err}");
    let (cert, key) = (tls.cert.to_str().unwrap(), tls.key.to_str().unwrap());
    let mut agent = Agent::start_with(&env, |c| {
        c.args(["--etcd", &etcd.endpoint, "--node", "n1", "--etcd-ca", ca]);
        c.args(["--etcd-cert", cert, "--etcd-key", key]);
    });
    let spec = hello_app(&env.path("app"), WEB);
    env.ok(&["apply", "-f", spec.to_str().unwrap()]);
    assert_eq!(etcd.keys("/kiln/svc/"), ["/kiln/svc/web"]);
    assert_eq!(service_status(&env, "web")["ready"], 2);
    // The CLI's own records (a bake with the agent stopped) go there too,
    // with the same certificate.
    agent.stop();
    env.ok(&["bake", "-f", spec.to_str().unwrap()]);
    assert!(etcd.keys("/kiln/log/").len() > 3);
}

/// How many running instances of `service` node `env` runs.
fn running_here(env: &Env, service: &str) -> usize {
    service_status(env, service)["instances"]
        .as_array()
        .map_or(0, |list| {
            list.iter().filter(|i| i["state"] == "running").count()
        })
}

/// Three nodes that offer one CPU each (`kiln serve --cpus 1`) and two
/// services whose instances declare one CPU each: only three of the four
/// instances asked for run, one per node (the spread keeps to each node's
/// room, whatever service holds it), the fourth waits and its service
/// says so; once one of the other service's instances goes (scaled down),
/// it is placed.
#[test]
fn instances_are_placed_within_what_each_node_offers() {
    let _serial = one_at_a_time();
    let etcd = Etcd::start();
    let web = WEB.replace("replicas = 2", "replicas = 2\ncpu = 1\nmemory = \"64M\"")
        + r#"
[services.api]
image = "app"
replicas = 2
cpu = 1
[services.api.health.readiness]
http = "/healthz"
interval = "200ms"
"#;
    let (envs, _agents, spec) = three_nodes_with(&etcd, &web, &[], |_, c| {
        c.args(["--cpus", "1", "--memory", "1G"]);
    });
    let nodes = envs[0].json(&["nodes", "--json"]);
    for n in nodes["nodes"].as_array().unwrap() {
        assert_eq!(n["cpus"], 1, "{nodes}");
        assert_eq!(n["memory_mib"], 1024, "{nodes}");
    }
    envs[0].ok(&["apply", "-f", &spec, "--detach"]);
    let per_node = || -> Vec<usize> {
        envs.iter()
            .map(|e| running_here(e, "web") + running_here(e, "api"))
            .collect()
    };
    let waiting = || {
        envs.iter().any(|e| {
            ["web", "api"].iter().any(|s| {
                service_status(e, s)["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("1 instance(s) of release 1 wait for room"))
            })
        })
    };
    wait_for(
        "one instance on each node, one waiting for room",
        Duration::from_secs(60),
        || per_node() == [1, 1, 1] && waiting(),
    );
    // It stays so: no node takes a second.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(per_node(), [1, 1, 1]);
    // Each node's offer is wholly reserved, as `kiln nodes` shows.
    let nodes = envs[2].json(&["nodes", "--json"]);
    for n in nodes["nodes"].as_array().unwrap() {
        assert_eq!(n["reserved"]["cpu_millis"], 1000, "{nodes}");
    }
    let table = envs[2].ok(&["nodes"]);
    assert_eq!(table.matches(" 1/1 ").count(), 3, "{table}");
    // web scaled down to one: its other instance goes, and api's second
    // takes the room it leaves.
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(
        &spec,
        text.replacen(
            "replicas = 2\ncpu = 1\nmemory",
            "replicas = 1\ncpu = 1\nmemory",
            1,
        ),
    )
    .unwrap();
    envs[1].ok(&["apply", "-f", &spec, "--detach"]);
    wait_for(
        "web 1, api 2, one per node",
        Duration::from_secs(60),
        || {
            let web: usize = envs.iter().map(|e| running_here(e, "web")).sum();
            let api: usize = envs.iter().map(|e| running_here(e, "api")).sum();
            web == 1 && api == 2 && per_node() == [1, 1, 1]
        },
    );
}
