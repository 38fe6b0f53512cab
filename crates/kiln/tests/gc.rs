//! Black-box tests of `kiln gc`: rollback targets are never collected, and
//! a collection racing bakes loses nothing.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::time::Duration;

use util::{Agent, Env, hello_app, releases, service_status, wait_for, write};

const SPEC: &str = r#"
[images.app]
include = ["bin", "version"]
entrypoint = ["/bin/start.sh"]

[services.web]
image = "app"
replicas = 1
[services.web.health.readiness]
http = "/healthz"
interval = "100ms"
[services.web.stop]
drain_timeout = "0s"
# Unwatched: no fleet is kept warm, one instance runs.
[services.web.rollout]
watch = "0s"
"#;

#[test]
fn gc_keeps_every_rollback_target_and_frees_the_rest() {
    let env = Env::new();
    let spec = hello_app(&env.path("app"), SPEC);
    let _agent = Agent::start(&env);
    // Five releases, each its own image.
    for v in 1..=5 {
        write(&env.path("app/version"), format!("{v}\n").as_bytes());
        env.ok(&["apply", "-f", spec.to_str().unwrap()]);
    }
    let images: Vec<String> = releases(&env, "web")
        .iter()
        .map(|r| r["config"]["image"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(images.len(), 5);
    let dry = env.json(&[
        "gc",
        "--keep-releases",
        "2",
        "--grace",
        "0s",
        "--dry-run",
        "--json",
    ]);
    let before = env.ok(&["images"]);
    let r = env.json(&["gc", "--keep-releases", "2", "--grace", "0s", "--json"]);
    assert_eq!(dry["images"], r["images"], "a dry run says what a run does");
    assert!(before.lines().count() > 1);
    let gone: Vec<String> = r["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    // Releases 1–3 are beyond the two kept; 4 and 5 (active) stay.
    for (i, image) in images.iter().enumerate() {
        let collected = gone.iter().any(|g| g.ends_with(image.as_str()));
        assert_eq!(collected, i < 3, "release {}: {gone:?}", i + 1);
    }
    assert!(r["freed_bytes"].as_u64().unwrap() > 0);
    // The logs of the instances the releases replaced are gone with them
    // (gone longer than the grace); the running instance's log stays.
    let logs = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(env.home.join("logs/web"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let running: Vec<String> = service_status(&env, "web")["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| format!("{}.log", i["id"].as_str().unwrap()))
        .collect();
    assert!(r["logs"].as_u64().unwrap() >= 4, "{r}");
    assert_eq!(logs(), running, "only the running instance's log is kept");
    // Log lines carry the time they were read, and --tail / --since pick.
    let all = env.ok(&["logs", "web"]);
    let line = all.lines().find(|l| l.contains("hello")).unwrap();
    let stamp = line.split(" | ").nth(1).unwrap().split(' ').next().unwrap();
    assert!(stamp.len() == 24 && stamp.ends_with('Z'), "{line}");
    assert_eq!(env.ok(&["logs", "web", "--tail", "1"]).lines().count(), 1);
    assert_eq!(
        env.ok(&["logs", "web", "--since", "2099-01-01T00:00:00Z"]),
        ""
    );
    assert_eq!(env.ok(&["logs", "web", "--since", "1h"]), all);
    let err = env.fails(&["logs", "web", "--since", "yesterday-ish"]);
    assert!(err.contains("--since"), "{err}");
    // Every kept release is a rollback target that works.
    env.ok(&["rollback", "web", "--to", "4"]);
    wait_for(
        "release 6 (release 4's content) active",
        Duration::from_secs(30),
        || {
            let s = service_status(&env, "web");
            s["revision"] == 6 && s["outcome"] == "active"
        },
    );
    assert!(env.ok(&["verify"]).starts_with("ok"), "the store is whole");
    // A collected one is refused, naming its image, with nothing changed.
    let err = env.fails(&["rollback", "web", "--to", "2"]);
    assert!(err.contains("not in the store"), "{err}");
    assert_eq!(releases(&env, "web").len(), 6);
}

/// Bakes that reuse a layer while collections run: every image a bake
/// reports is whole afterwards. Each untagged bake brings a new static
/// layer; the next bake (tagged) reuses it from the layer cache, then
/// spends longer than the grace period on its big app layer, so the
/// untagged image becomes collectable meanwhile: a collection between the
/// reuse and the publishing must not take the reused layer.
#[test]
fn gc_racing_bakes_loses_nothing() {
    let env = Env::new();
    let app = env.path("app");
    write(
        &app.join("kiln.toml"),
        b"[images.app]\ninclude = [\"static\", \"bin\"]\n[[images.app.layers]]\nname = \"static\"\npaths = [\"static\"]\n",
    );
    env.ok(&["images"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let collector = {
        let stop = stop.clone();
        let home = env.home.clone();
        std::thread::spawn(move || {
            let mut freed = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let out = util::succeed(
                    std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
                        .env("KILN_HOME", &home)
                        .args(["gc", "--grace", "1s", "--keep-releases", "0", "--json"]),
                );
                let r: serde_json::Value = serde_json::from_slice(&out).unwrap();
                freed += r["blobs"].as_u64().unwrap();
            }
            freed
        })
    };
    let mut tagged = Vec::new();
    for i in 0..5 {
        // Static content k = (i + 1) / 2: new at each odd (untagged)
        // bake, reused by the even (tagged) one after it.
        write(&app.join("static/big"), &vec![((i + 1) / 2) as u8; 1 << 20]);
        // A big incompressible app layer: the bake spends a while between
        // taking the static layer and publishing, while collections run.
        write(&app.join("bin/app"), &noise(i as u64, 8 << 20));
        let tag = format!("t{i}");
        let extra: &[&str] = if i % 2 == 0 { &["--tag", &tag] } else { &[] };
        let r = env.bake(&app.join("kiln.toml"), extra);
        assert!(r["digest"].is_string());
        if i % 2 == 0 {
            tagged.push(format!("app:{tag}"));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let freed = collector.join().unwrap();
    assert!(freed > 0, "the collections removed the untagged images");
    for t in &tagged {
        let out = env.ok(&["verify", t]);
        assert!(out.starts_with("ok"), "{t}: {out}");
    }
    // Unpacking reads every layer: each tagged image is usable.
    let last = tagged.last().unwrap();
    env.ok(&["unpack", last, env.path("unpacked").to_str().unwrap()]);
    assert!(env.path("unpacked/static/big").is_file());
}

/// `len` pseudo-random bytes (xorshift), different for each `seed`.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `kiln serve --gc-above SIZE`: the agent collects on its own once the
/// store's blobs pass SIZE (soon after it starts, then every minute).
#[test]
fn the_agent_collects_when_the_store_passes_its_size() {
    let env = Env::new();
    let app = env.path("app");
    write(&app.join("kiln.toml"), b"[images.junk]\n");
    for i in 0..2 {
        write(&app.join("file"), format!("junk {i}\n").as_bytes());
        env.bake(&app.join("kiln.toml"), &[]);
    }
    write(&app.join("file"), b"kept\n");
    env.bake(&app.join("kiln.toml"), &["--tag", "keep"]);
    assert_eq!(
        env.ok(&["images"]).lines().count(),
        4,
        "3 images and a header"
    );
    let _agent = Agent::start_with(&env, |c| {
        c.args(["--gc-above", "1", "--gc-grace", "0s"]);
    });
    wait_for(
        "the untagged images collected",
        Duration::from_secs(20),
        || env.ok(&["images"]).lines().count() == 2,
    );
    assert!(env.ok(&["images"]).contains("keep"));
    // The images are gone before the agent logs the collection: wait for
    // the line rather than read the log once.
    wait_for("the collection logged", Duration::from_secs(20), || {
        std::fs::read_to_string(env.path("agent.log"))
            .is_ok_and(|log| log.contains("collected 2 images"))
    });
}

/// `kiln images` skips an image collected while it lists (its index entry
/// gone with its blob), but a listed image whose manifest is missing is
/// a corrupt store, and says so.
#[test]
fn images_names_a_missing_manifest_of_a_listed_image() {
    let env = Env::new();
    let app = env.path("app");
    write(&app.join("kiln.toml"), b"[images.one]\n");
    write(&app.join("file"), b"one\n");
    let digest = env.bake(&app.join("kiln.toml"), &[])["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let blob = env
        .home
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    std::fs::remove_file(&blob).unwrap();
    let err = env.fails(&["images"]);
    assert!(err.contains(&digest) && err.contains("missing"), "{err}");
}
