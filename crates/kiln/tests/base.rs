//! `[images.NAME] base = "REF"`, black-box: an app baked on a userland made
//! from Debian's `busybox-static` (its shell and tools, not the host's),
//! the base's config under the spec's, reproducible across homes and
//! pinned by the base's digest; the base taken from the same spec, the
//! store, an OCI layout (`kiln export --oci`, as skopeo writes them) and a
//! docker archive; a tampered layout refused, naming the blob.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::path::Path;
use std::time::Duration;

use util::*;

/// A userland of one static busybox: `bin/busybox` and the applets the
/// app uses as links to it.
fn busybox_rootfs(dir: &Path, extra: &str) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let busybox = ["/usr/bin/busybox", "/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("busybox-static (scripts/test installs it)");
    std::fs::copy(busybox, bin.join("busybox")).unwrap();
    for applet in ["sh", "cat", "echo", "sleep", "ls"] {
        let _ = std::fs::remove_file(bin.join(applet));
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    write(&dir.join("etc/base-release"), extra.as_bytes());
}

const SPEC: &str = r#"
[images.base]
context = "base"
env = { PATH = "/bin", LANG = "C.base" }
workdir = "/"

[images.app]
base = "BASE"
context = "app"
env = { GREETING = "hi" }
workdir = "/srv"
entrypoint = ["/bin/sh", "/srv/run.sh"]

[services.worker]
image = "app"
"#;

/// A home with the base's and the app's contexts and `SPEC` naming `base`
/// as the app's base.
fn project(env: &Env, base: &str, release: &str) -> std::path::PathBuf {
    let root = env.path("project");
    busybox_rootfs(&root.join("base"), release);
    std::fs::create_dir_all(root.join("app/srv")).unwrap();
    write(
        &root.join("app/srv/run.sh"),
        b"if [ -e /usr ]; then usr=host-usr; else usr=no-usr; fi\necho \"$GREETING in $LANG from $(cat /etc/base-release) at $(pwd), $usr\"\nexec sleep 600\n",
    );
    let spec = root.join("kiln.toml");
    write(&spec, SPEC.replace("BASE", base).as_bytes());
    spec
}

/// `kiln bake --json`'s reports (every image baked).
fn bake(env: &Env, spec: &Path, images: &[&str]) -> serde_json::Value {
    let mut args = vec!["bake", "-f", spec.to_str().unwrap(), "--json"];
    args.extend_from_slice(images);
    env.json(&args)
}

fn digest_of(reports: &serde_json::Value, image: &str) -> String {
    reports
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["image"] == image)
        .unwrap_or_else(|| panic!("no report of {image}: {reports}"))["digest"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn an_app_baked_on_a_base_runs_its_userland_and_is_pinned_by_its_digest() {
    let one = Env::new();
    let spec = project(&one, "base", "debian-ish 1");
    let baked = bake(&one, &spec, &[]);
    let (base, app) = (digest_of(&baked, "base"), digest_of(&baked, "app"));
    let report = baked
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["image"] == "app")
        .unwrap()
        .clone();
    assert_eq!(report["base"], format!("base@{base}"), "{report}");
    // Another home, the same inputs: the same digests.
    let two = Env::new();
    let spec_two = project(&two, "base", "debian-ish 1");
    let again = bake(&two, &spec_two, &[]);
    assert_eq!(digest_of(&again, "base"), base);
    assert_eq!(digest_of(&again, "app"), app);
    // Another base (one file changed): another app.
    let three = Env::new();
    let spec_three = project(&three, "base", "debian-ish 2");
    let other = bake(&three, &spec_three, &[]);
    assert_ne!(digest_of(&other, "base"), base);
    assert_ne!(digest_of(&other, "app"), app);
    // Its provenance names the base.
    let inspect = one.json(&["inspect", "app", "--json"]);
    assert!(
        inspect.to_string().contains(&format!("base@{base}")),
        "{inspect}"
    );

    // It runs the base's shell and tools, with the base's environment under
    // the app's and the app's working directory — and nothing of the
    // host's: no /usr inside, and status says it borrows nothing.
    let _agent = Agent::start(&one);
    one.ok(&["apply", "-f", spec.to_str().unwrap()]);
    wait_for("the worker's line", Duration::from_secs(30), || {
        one.ok(&["logs", "worker"])
            .contains("hi in C.base from debian-ish 1 at /srv, no-usr")
    });
    let worker = service_status(&one, "worker");
    assert_eq!(worker["instances"][0]["borrows_host"], false, "{worker}");
    assert!(one.ok(&["status"]).contains("self-contained"));
}

#[test]
fn a_base_comes_from_the_store_an_oci_layout_or_a_docker_archive() {
    let env = Env::new();
    let spec = project(&env, "base", "layout 1");
    let baked = bake(&env, &spec, &[]);
    let base = digest_of(&baked, "base");
    let root = env.path("project");
    // The store, by digest.
    let pinned = format!("base@{base}");
    write(&spec, SPEC.replace("BASE", &pinned).as_bytes());
    let from_store = bake(&env, &spec, &["app"]);
    assert_eq!(
        from_store.as_array().unwrap().len(),
        1,
        "only app: {from_store}"
    );
    // An OCI layout, as `kiln export` (and skopeo) write one.
    env.ok(&[
        "export",
        "base",
        "--oci",
        root.join("layout").to_str().unwrap(),
        "--tag",
        "v1",
    ]);
    write(&spec, SPEC.replace("BASE", "oci:layout:v1").as_bytes());
    let from_layout = bake(&env, &spec, &["app"]);
    assert_eq!(
        from_layout[0]["base"],
        format!("oci:layout:v1@{base}"),
        "the same base: {from_layout}"
    );
    // A docker archive: its layers uncompressed, each checked against the
    // config's diff_ids.
    env.ok(&[
        "export",
        "base",
        "--docker-archive",
        root.join("base.tar").to_str().unwrap(),
    ]);
    write(
        &spec,
        SPEC.replace("BASE", "docker-archive:base.tar").as_bytes(),
    );
    let from_archive = bake(&env, &spec, &["app"]);
    assert!(
        from_archive[0]["base"]
            .as_str()
            .unwrap()
            .starts_with("docker-archive:base.tar@sha256:"),
        "{from_archive}"
    );
    // An instance of it runs the base's shell.
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", spec.to_str().unwrap()]);
    wait_for("the worker's line", Duration::from_secs(30), || {
        env.ok(&["logs", "worker"])
            .contains("hi in C.base from layout 1")
    });

    // A layout whose layer was changed is refused, naming the blob; the
    // store keeps nothing of it.
    let layer = std::fs::read_dir(root.join("layout/blobs/sha256"))
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&layer).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&layer, bytes).unwrap();
    let fresh = Env::new();
    let copy = fresh.path("project");
    copy_tree(&root, &copy);
    write(
        &copy.join("kiln.toml"),
        SPEC.replace("BASE", "oci:layout:v1").as_bytes(),
    );
    let err = fresh.fails(&[
        "bake",
        "-f",
        copy.join("kiln.toml").to_str().unwrap(),
        "app",
    ]);
    assert!(
        err.contains("does not match its digest")
            && err.contains(layer.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
    // Bad names are refused in one line before anything is read.
    for (base, says) in [
        ("nothere", "base `nothere` is not an [images] table"),
        ("oci:", "names a directory"),
        ("app", "loop"),
    ] {
        write(&spec, SPEC.replace("BASE", base).as_bytes());
        let err = env.fails(&["check", "-f", spec.to_str().unwrap()]);
        assert!(err.contains(says), "{base}: {err}");
    }
}

/// The agent's policy `require_self_contained`: an image without a
/// userland of its own (it would borrow the host's /usr) is refused at
/// apply in one line naming the policy; one baked on a base runs; status
/// says which instances borrow the host's.
#[test]
fn an_agent_that_requires_self_contained_images_refuses_the_others() {
    let env = Env::new();
    let spec = project(&env, "base", "strict 1");
    let policy = env.path("policy.toml");
    write(&policy, b"[trust]\nrequire_self_contained = true\n");
    let _agent = Agent::start_with(&env, |c| {
        c.args(["--trust", policy.to_str().unwrap()]);
    });
    // The base itself has no /usr and was baked on nothing.
    let lone = env.path("project/lone.toml");
    write(
        &lone,
        b"[images.base]\ncontext = \"base\"\n[services.lone]\nimage = \"base\"\ncommand = [\"/bin/sleep\", \"600\"]\n",
    );
    let err = env.fails(&["apply", "-f", lone.to_str().unwrap()]);
    assert!(
        err.contains("require_self_contained") && err.contains("policy.toml"),
        "{err}"
    );
    // (After the bake's own lines, one line of error.)
    assert!(
        err.trim()
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("kiln: error: service lone: image base@")
                && l.contains("require_self_contained")),
        "{err}"
    );
    env.ok(&["apply", "-f", spec.to_str().unwrap()]);
    let worker = service_status(&env, "worker");
    assert_eq!(worker["instances"][0]["borrows_host"], false, "{worker}");
    // In a spec it is refused: it is the agent's to require.
    write(
        &spec,
        (SPEC.replace("BASE", "base") + "[trust]\nrequire_self_contained = true\n").as_bytes(),
    );
    let err = env.fails(&["check", "-f", spec.to_str().unwrap()]);
    assert!(err.contains("the agent's policy"), "{err}");
}
