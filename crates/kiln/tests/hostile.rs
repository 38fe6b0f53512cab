//! Hostile images, black-box: layers a malicious registry could serve, put
//! straight into the store, run through every path that unpacks them —
//! `kiln unpack REF DIR`, `kiln unpack REF` (the store's materialization),
//! the agent's materialization at deploy and its drift repair. None may
//! change a file outside the tree, remove the caller's directory, or write
//! more than a bounded multiple of the layer's size.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use util::*;

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Host files a hostile image aims at: a file 0600 and a directory 0700
/// with a child directory 0700.
struct Victims {
    file: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Victims {
    fn new(env: &Env) -> Self {
        let file = env.path("victim-file");
        write(&file, b"secret");
        chmod(&file, 0o600);
        let dir = env.path("victim-dir");
        fs::create_dir_all(dir.join("b")).unwrap();
        chmod(&dir.join("b"), 0o700);
        chmod(&dir, 0o700);
        Self { file, dir }
    }

    fn untouched(&self, after: &str) {
        assert_eq!(mode(&self.file), 0o600, "victim file's mode after {after}");
        assert_eq!(mode(&self.dir), 0o700, "victim dir's mode after {after}");
        assert_eq!(
            mode(&self.dir.join("b")),
            0o700,
            "victim dir/b after {after}"
        );
        assert_eq!(fs::read(&self.file).unwrap(), b"secret");
    }
}

/// An image whose directory modes would land on the victims if applied
/// through symlinks: `x` (0777) then `x` → the victim file; `a/b` (0777),
/// then in a second layer `a` whited out and made a symlink to the victim
/// directory. It also carries a regular file `f`, for the drift test.
fn chmod_image(env: &Env, v: &Victims) -> String {
    let mut lower = Vec::new();
    tar_entry(&mut lower, "x", tar::EntryType::Directory, 0o777, "", b"");
    let file = v.file.to_str().unwrap();
    tar_entry(&mut lower, "x", tar::EntryType::Symlink, 0o777, file, b"");
    tar_entry(&mut lower, "a", tar::EntryType::Directory, 0o777, "", b"");
    tar_entry(&mut lower, "a/b", tar::EntryType::Directory, 0o777, "", b"");
    tar_entry(
        &mut lower,
        "f",
        tar::EntryType::Regular,
        0o755,
        "",
        b"#!/bin/sh\nsleep 60\n",
    );
    let mut upper = Vec::new();
    tar_entry(&mut upper, ".wh.a", tar::EntryType::Regular, 0o644, "", b"");
    let dir = v.dir.to_str().unwrap();
    tar_entry(&mut upper, "a", tar::EntryType::Symlink, 0o777, dir, b"");
    put_image(
        env,
        "chmod:x",
        &[RawLayer::of_tar(lower), RawLayer::of_tar(upper)],
        r#"{"Entrypoint":["/f"]}"#,
    )
}

/// An image whose second layer whites out `..` of the root.
fn whiteout_image(env: &Env, name: &str) -> String {
    let mut lower = Vec::new();
    tar_entry(&mut lower, "f", tar::EntryType::Regular, 0o755, "", b"x");
    let mut upper = Vec::new();
    tar_entry(&mut upper, name, tar::EntryType::Regular, 0o644, "", b"");
    put_image(
        env,
        "whiteout:x",
        &[RawLayer::of_tar(lower), RawLayer::of_tar(upper)],
        r#"{"Entrypoint":["/f"]}"#,
    )
}

/// A ~0.3 MiB gzip layer that expands to 320 MiB of zeros: one member for
/// the tar header, then the same member of 1 MiB of zeros 320 times
/// (gzip members concatenate). Its diff_id is never reached: the cap
/// stops the read first.
fn bomb_image(env: &Env) -> String {
    let gz = |bytes: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut e, bytes).unwrap();
        e.finish().unwrap()
    };
    let mut header = tar::Header::new_gnu();
    header.set_path("zeros").unwrap();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_size(320 << 20);
    header.set_cksum();
    let mut gzip = gz(header.as_bytes());
    let zeros = gz(&vec![0u8; 1 << 20]);
    for _ in 0..320 {
        gzip.extend_from_slice(&zeros);
    }
    let layer = RawLayer {
        gzip,
        diff_id: format!("sha256:{}", "0".repeat(64)),
    };
    put_image(env, "bomb:x", &[layer], "{}")
}

fn no_leftovers(env: &Env) {
    let (_, files) = env.store_state();
    assert!(
        files
            .iter()
            .all(|f| !f.starts_with("trees/") && !f.starts_with("tmp/")),
        "{files:?}"
    );
}

#[test]
fn directory_modes_never_follow_an_images_symlinks_out_of_the_tree() {
    let env = Env::new();
    env.ok(&["images"]);
    let v = Victims::new(&env);
    chmod_image(&env, &v);

    let out = env.path("out");
    env.ok(&["unpack", "chmod:x", out.to_str().unwrap()]);
    v.untouched("kiln unpack REF DIR");
    assert!(fs::symlink_metadata(out.join("x")).unwrap().is_symlink());
    assert!(fs::symlink_metadata(out.join("a")).unwrap().is_symlink());

    // The store's read-only materialization, as the agent does at deploy.
    let tree = env.ok(&["unpack", "chmod:x"]);
    v.untouched("kiln unpack REF");
    assert!(Path::new(tree.trim()).join("f").is_file());
}

#[test]
fn the_agents_materialization_and_drift_repair_never_chmod_outside_the_tree() {
    let env = Env::new();
    env.ok(&["images"]);
    let v = Victims::new(&env);
    let digest = chmod_image(&env, &v);
    let _agent = Agent::start(&env);
    let spec = env.path("kiln.toml");
    write(&spec, b"[services.evil]\nimage = \"chmod:x\"\n");
    env.ok(&["apply", "--detach"]);
    let rootfs = env
        .home
        .join("trees")
        .join(digest.trim_start_matches("sha256:"))
        .join("rootfs");
    wait_for("the agent's tree", Duration::from_secs(30), || {
        rootfs.join("f").is_file()
    });
    v.untouched("the agent's materialization");
    // The watch sees edits from the moment it watches the tree (one made
    // before that is the periodic verification's to find, minutes later).
    wait_for(
        "the agent watching the tree",
        Duration::from_secs(30),
        || {
            env.json(&["drift", "--json"])["watching"]["trees"]
                .as_u64()
                .is_some_and(|n| n >= 1)
        },
    );

    // Drift: edit the tree; the agent makes it again from the blobs.
    chmod(&rootfs.join("f"), 0o755);
    fs::write(rootfs.join("f"), b"#!/bin/sh\nexit 3\n").unwrap();
    wait_for("the drift repair", Duration::from_secs(30), || {
        let out = env.ok(&["audit", "--kind", "tree-drift", "--json"]);
        out.contains(r#"\"repaired\":true"#)
    });
    v.untouched("the agent's drift repair");
}

#[test]
fn a_whiteout_of_the_root_or_above_is_refused_everywhere() {
    for name in [".wh...", ".wh..", "sub/.wh..."] {
        let env = Env::new();
        env.ok(&["images"]);
        write(&env.path("precious"), b"keep");
        whiteout_image(&env, name);

        let out = env.path("out");
        let err = env.fails(&["unpack", "whiteout:x", out.to_str().unwrap()]);
        assert!(err.contains("refused whiteout"), "{name}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            env.path("precious").is_file(),
            "{name}: the caller's directory"
        );
        assert!(!out.exists());

        let err = env.fails(&["unpack", "whiteout:x"]);
        assert!(err.contains("refused whiteout"), "{name}: {err}");
        assert!(env.home.join("index.json").is_file());
        no_leftovers(&env);
    }
}

#[test]
fn a_decompression_bomb_is_refused_before_it_fills_the_disk() {
    let env = Env::new();
    env.ok(&["images"]);
    bomb_image(&env);
    let out = env.path("out");
    let err = env.fails(&["unpack", "bomb:x", out.to_str().unwrap()]);
    assert!(err.contains("decompression bomb"), "{err}");
    assert!(!out.exists());
    let err = env.fails(&["unpack", "bomb:x"]);
    assert!(err.contains("decompression bomb"), "{err}");
    no_leftovers(&env);
}
