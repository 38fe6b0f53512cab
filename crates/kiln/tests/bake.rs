//! Black-box tests of `kiln bake` and the store commands, through the real binary.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use util::{Env, app, chmod, copy_tree, have, require, sha256_hex, succeed, write};

fn digest(report: &serde_json::Value) -> String {
    report["digest"].as_str().expect("digest").to_owned()
}

/// Let freshly written files age past the stat cache's racy-file margin.
fn settle() {
    std::thread::sleep(Duration::from_millis(150));
}

#[test]
fn bake_prints_the_digest_and_fills_an_oci_layout() {
    let env = Env::new();
    let spec = app(&env.path("src"));
    let out = env.ok(&["bake", "-f", spec.to_str().unwrap()]);
    let line = out.trim();
    assert!(
        line.starts_with("app@sha256:") && line.len() == "app@sha256:".len() + 64,
        "{out}"
    );
    assert!(env.home.join("oci-layout").is_file());
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(env.home.join("index.json")).unwrap()).unwrap();
    let hex = &line["app@sha256:".len()..];
    let refs: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str())
        .collect();
    assert_eq!(
        refs,
        [format!("app:{}", &hex[..12])],
        "automatic tag NAME:<12 hex>"
    );
    // Beside it, untagged: its provenance statement, whose subject it is.
    let referrers: Vec<&serde_json::Value> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["annotations"]["org.opencontainers.image.ref.name"].is_null())
        .collect();
    assert_eq!(referrers.len(), 1, "{index}");
    // Marked as this store's own bake's (what makes it count as provenance).
    assert_eq!(
        referrers[0]["annotations"]["dev.kiln.made-here"], "bake",
        "{index}"
    );
    assert!(env.home.join("blobs/sha256").join(hex).is_file());
}

#[test]
fn same_inputs_give_the_same_digest_whatever_the_mtimes_umask_inodes_or_directory() {
    let env = Env::new();
    let a = env.path("a");
    let spec_a = app(&a);
    let first = digest(&env.bake(&spec_a, &[]));

    // Another directory, entries created in reverse order, every file
    // touched to a different time, permissions as under umask 077.
    let b = env.path("elsewhere/b");
    copy_tree(&a, &b);
    let later = SystemTime::now() + Duration::from_secs(3600);
    for rel in [
        "bin/app",
        "static/index.html",
        "static/css/site.css",
        "data/big.txt",
        "kiln.toml",
    ] {
        let f = fs::File::options().write(true).open(b.join(rel)).unwrap();
        f.set_modified(later).unwrap();
        let exec = fs::metadata(b.join(rel)).unwrap().mode() & 0o111 != 0;
        chmod(&b.join(rel), if exec { 0o700 } else { 0o600 });
    }
    for dir in ["bin", "static", "static/css", "data"] {
        chmod(&b.join(dir), 0o700);
    }
    // And into a different store.
    let other = Env::new();
    let second = digest(&other.bake(&b.join("kiln.toml"), &[]));
    assert_eq!(first, second);

    // SOURCE_DATE_EPOCH is an input: it moves the digest, and is reproducible too.
    let sde = |env: &Env, spec: &Path| {
        let out = env
            .cmd()
            .args(["bake", "-f", spec.to_str().unwrap(), "--json"])
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .output()
            .unwrap();
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        digest(&v[0])
    };
    let with_date = sde(&env, &spec_a);
    assert_ne!(with_date, first);
    assert_eq!(with_date, sde(&other, &b.join("kiln.toml")));
    let inspect = env.json(&["inspect", &with_date, "--json"]);
    assert_eq!(inspect["config"]["created"], "2023-11-14T22:13:20Z");
    assert_eq!(
        inspect["manifest"]["annotations"]["org.opencontainers.image.created"],
        "2023-11-14T22:13:20Z"
    );
}

#[test]
fn rebaking_is_incremental() {
    let env = Env::new();
    let root = env.path("src");
    let spec = app(&root);
    settle();
    let first = env.bake(&spec, &[]);
    assert_eq!(first["files_hashed"], 6);
    assert!(
        first["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["reused"] == false)
    );

    // Nothing changed: no file is read, no layer written.
    let again = env.bake(&spec, &[]);
    assert_eq!(digest(&again), digest(&first));
    assert_eq!(
        again["files_hashed"], 0,
        "the stat cache must answer for every file"
    );
    assert_eq!(again["bytes_written"], 0);
    assert!(
        again["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["reused"] == true)
    );

    // Touched but unchanged: files are re-read, but no layer is re-compressed.
    let later = SystemTime::now() - Duration::from_secs(60);
    for rel in [
        "bin/app",
        "static/index.html",
        "static/css/site.css",
        "data/big.txt",
        "kiln.toml",
        ".kilnignore",
    ] {
        fs::File::options()
            .write(true)
            .open(root.join(rel))
            .unwrap()
            .set_modified(later)
            .unwrap();
    }
    settle();
    let touched = env.bake(&spec, &[]);
    assert_eq!(digest(&touched), digest(&first));
    assert_eq!(touched["files_hashed"], 6);
    assert_eq!(touched["bytes_written"], 0);

    // One static file changed: only the static layer is written.
    write(&root.join("static/index.html"), b"<p>changed</p>\n");
    settle();
    let changed = env.bake(&spec, &[]);
    assert_ne!(digest(&changed), digest(&first));
    assert_eq!(changed["files_hashed"], 1);
    let layers = changed["layers"].as_array().unwrap();
    assert_eq!(layers[0]["name"], "static");
    assert_eq!(layers[0]["reused"], false);
    assert_eq!(layers[1]["name"], "app");
    assert_eq!(layers[1]["reused"], true);
    assert_eq!(changed["bytes_written"], layers[0]["size"]);
}

/// Issue 14: a one-file change inside a big single layer re-compresses
/// about one gzip member, not the layer: the members of unchanged runs of
/// files are copied from the previous bake — and the digest is exactly
/// the one a full bake of the same tree gives.
/// ~6 MiB of distinct, compressible files, and one file of 3 MiB.
fn mixed_tree(root: &Path) {
    for i in 0..400 {
        let text: String = (0..1500)
            .map(|j| format!("{} ", (i * 7919 + j * 31) % 10007))
            .collect();
        write(
            &root.join(format!("lib/m{:03}/f{i:04}.txt", i % 20)),
            text.as_bytes(),
        );
    }
    let big: Vec<u8> = (0..(3u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    write(&root.join("assets/big.bin"), &big);
}

#[test]
fn a_one_file_change_inside_a_layer_reuses_the_other_members() {
    let env = Env::new();
    let root = env.path("big");
    mixed_tree(&root);
    write(&root.join("kiln.toml"), b"[images.big]\n");
    settle();
    let first = env.bake(&root.join("kiln.toml"), &[]);
    assert_eq!(first["members_reused"], 0);
    // Each change: a re-bake that copies what it can, whose digest is a
    // full bake's in an empty store. Late in the layer (the prefix before
    // it is resumed), early (the members after it are copied), appended.
    let cases: [(&str, &[u8]); 3] = [
        ("lib/m019/f0399.txt", b"changed late\n"),
        ("assets/big.bin", b"changed early\n"),
        ("lib/zz-new.txt", b"appended\n"),
    ];
    for (rel, content) in cases {
        write(&root.join(rel), content);
        settle();
        let changed = env.bake(&root.join("kiln.toml"), &[]);
        let reused = changed["members_reused"].as_u64().unwrap();
        assert!(
            reused >= 5,
            "{rel}: most members are not compressed again: {changed}"
        );
        let fresh = Env::new();
        let full = fresh.bake(&root.join("kiln.toml"), &[]);
        assert_eq!(full["members_reused"], 0);
        assert_eq!(
            digest(&full),
            digest(&changed),
            "{rel}: a full bake's digest"
        );
        // And it unpacks to the tree.
        let out = env.path(&format!("out-{}", rel.replace('/', "-")));
        env.ok(&[
            "unpack",
            &format!("big@{}", digest(&changed)),
            out.to_str().unwrap(),
        ]);
        assert_eq!(fs::read(out.join(rel)).unwrap(), content, "{rel}");
        assert_eq!(
            fs::read(out.join("lib/m007/f0207.txt")).unwrap(),
            fs::read(root.join("lib/m007/f0207.txt")).unwrap()
        );
    }
}

/// Issue 14: a layer bigger than `part_size` is stored as parts, each an
/// OCI layer: a one-file change writes the one part it falls in (the
/// others are the same blobs), the digest is still a full bake's, and the
/// image unpacks to the tree. `part_size = 0` keeps the layer whole.
#[test]
fn a_big_layer_is_stored_in_parts_and_a_change_writes_only_its_part() {
    let env = Env::new();
    let root = env.path("big");
    mixed_tree(&root);
    write(
        &root.join("kiln.toml"),
        b"[images.big]\npart_size = \"256K\"\n",
    );
    settle();
    let first = env.bake(&root.join("kiln.toml"), &[]);
    let layers = first["layers"].as_array().unwrap();
    assert!(layers.len() >= 5, "parts of ~512 KiB: {first}");
    for (i, l) in layers.iter().enumerate() {
        assert_eq!(l["name"], "app");
        assert_eq!(l["part"], i + 1);
        assert_eq!(l["parts"], layers.len());
        assert_eq!(l["reused"], false);
    }
    let inspected = env.json(&["inspect", &format!("big@{}", digest(&first)), "--json"]);
    let parts: Vec<&str> = inspected["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["part"].as_str().unwrap())
        .collect();
    assert_eq!(parts[0], format!("1/{}", layers.len()));

    write(&root.join("lib/m007/f0207.txt"), b"changed\n");
    settle();
    let changed = env.bake(&root.join("kiln.toml"), &[]);
    let after = changed["layers"].as_array().unwrap();
    assert_eq!(
        after.len(),
        layers.len(),
        "the cuts did not move: {changed}"
    );
    let written: Vec<&serde_json::Value> = after.iter().filter(|l| l["reused"] == false).collect();
    assert_eq!(written.len(), 1, "one part written: {changed}");
    for (a, b) in layers.iter().zip(after) {
        if b["reused"] == true {
            assert_eq!(a["digest"], b["digest"]);
        }
    }
    assert!(
        changed["bytes_written"].as_u64().unwrap() < changed["size"].as_u64().unwrap() / 2,
        "{changed}"
    );
    let fresh = Env::new();
    assert_eq!(
        digest(&fresh.bake(&root.join("kiln.toml"), &[])),
        digest(&changed),
        "a full bake's digest"
    );
    let out = env.path("out");
    env.ok(&[
        "unpack",
        &format!("big@{}", digest(&changed)),
        out.to_str().unwrap(),
    ]);
    let source = kiln_tree(&root);
    let unpacked = kiln_tree(&out);
    let differ: Vec<&String> = source
        .iter()
        .chain(&unpacked)
        .filter(|e| !(source.contains(e) && unpacked.contains(e)))
        .map(|(p, _)| p)
        .collect();
    assert!(
        differ.is_empty(),
        "unpacked differs from the tree at {differ:?}"
    );

    write(&root.join("kiln.toml"), b"[images.big]\npart_size = 0\n");
    let whole = env.bake(&root.join("kiln.toml"), &[]);
    assert_eq!(whole["layers"].as_array().unwrap().len(), 1, "{whole}");
    assert!(whole["layers"][0]["part"] == 1 && whole["layers"][0]["parts"] == 1);
}

#[test]
fn layers_group_paths_and_kilnignore_and_globs_filter() {
    let env = Env::new();
    let root = env.path("src");
    app(&root);
    write(&root.join("drop/me.log"), b"x");
    let spec = root.join("kiln.toml");
    let mut text = fs::read_to_string(&spec).unwrap();
    text = text.replace("port = 8080", "port = 8080\nexclude = [\"drop\"]");
    write(&spec, text.as_bytes());
    let d = digest(&env.bake(&spec, &[]));
    let info = env.json(&["inspect", &d, "--json"]);
    let layers = info["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    assert_eq!(layers[0]["name"], "static");
    assert_eq!(layers[0]["files"], 2);
    // bin/app, data/big.txt, kiln.toml, .kilnignore (index.html is a symlink).
    assert_eq!(layers[1]["files"], 4);
    assert_eq!(info["files"], 6);
    assert_eq!(info["config"]["config"]["Entrypoint"][0], "/bin/app");
    assert_eq!(info["config"]["config"]["Env"][0], "MODE=test");
    assert!(info["config"]["config"]["ExposedPorts"]["8080/tcp"].is_object());

    let out = env.path("out");
    env.ok(&["unpack", &d, out.to_str().unwrap()]);
    assert!(!out.join("notes.tmp").exists(), ".kilnignore");
    assert!(!out.join("drop").exists(), "exclude");
    assert_eq!(
        fs::read_link(out.join("index.html")).unwrap(),
        Path::new("static/index.html")
    );
    assert_eq!(
        fs::read(out.join("static/index.html")).unwrap(),
        b"<p>hi</p>\n"
    );
    assert_eq!(
        fs::metadata(out.join("bin/app")).unwrap().mode() & 0o777,
        0o755
    );
    assert_eq!(
        fs::metadata(out.join("kiln.toml")).unwrap().mode() & 0o777,
        0o644
    );

    // include: only what is named.
    write(
        &root.join("only.toml"),
        b"[images.only]\ninclude = [\"static/**/*.css\", \"bin\"]\n",
    );
    let d = digest(&env.bake(&root.join("only.toml"), &[]));
    let out = env.path("only");
    env.ok(&["unpack", &d, out.to_str().unwrap()]);
    assert!(out.join("static/css/site.css").is_file());
    assert!(out.join("bin/app").is_file());
    assert!(!out.join("static/index.html").exists());
    assert!(!out.join("data").exists());

    // An include that takes nothing (a misspelt path) is refused, naming
    // it, and nothing is baked.
    write(
        &root.join("typo.toml"),
        b"[images.typo]
include = [\"bin\", \"staticc\"]
",
    );
    let before = env.store_state();
    let err = env.fails(&["bake", "-f", root.join("typo.toml").to_str().unwrap()]);
    assert!(err.contains("include `staticc` matches nothing"), "{err}");
    assert_eq!(env.store_state(), before);
}

#[test]
fn provenance_comes_from_git_and_the_kiln_version() {
    require("git");
    let env = Env::new();
    let root = env.path("repo");
    let spec = app(&root);
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    git(&["init", "-q"]);
    git(&[
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.invalid",
        "add",
        "-A",
    ]);
    git(&[
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.invalid",
        "commit",
        "-qm",
        "x",
    ]);
    git(&["remote", "add", "origin", "https://example.invalid/app.git"]);
    let head = git(&["rev-parse", "HEAD"]);
    let d = digest(&env.bake(&spec, &[]));
    let info = env.json(&["inspect", &d, "--json"]);
    let ann = &info["manifest"]["annotations"];
    // The manifest holds content and config only.
    assert!(
        ann.get("org.opencontainers.image.revision").is_none(),
        "{ann}"
    );
    assert_eq!(
        ann["org.opencontainers.image.created"],
        "1970-01-01T00:00:00Z"
    );
    let prov = &info["provenance"][0];
    assert_eq!(prov["commit"], head.as_str());
    assert_eq!(prov["dirty"], false);
    assert_eq!(prov["source"], "https://example.invalid/app.git");
    assert_eq!(
        prov["builder"],
        format!("https://kiln.dev/kiln@{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(prov["subject_matches"], true);
    assert_eq!(prov["verified"], true, "made by this store's bake");

    // Another remote, and an untracked file the image leaves out (the
    // context's .kilnignore has *.tmp), so git says dirty: the same digest,
    // one more statement beside it.
    git(&[
        "remote",
        "set-url",
        "origin",
        "https://mirror.example.invalid/app.git",
    ]);
    write(&root.join("scratch.tmp"), b"not in the image\n");
    let again = digest(&env.bake(&spec, &[]));
    assert_eq!(again, d, "the digest depends on content and config only");
    let info = env.json(&["inspect", &again, "--json"]);
    let provs = info["provenance"].as_array().unwrap();
    assert_eq!(provs.len(), 2, "{provs:?}");
    assert!(
        provs
            .iter()
            .any(|p| p["source"] == "https://mirror.example.invalid/app.git"
                && p["dirty"] == true
                && p["commit"] == head.as_str()),
        "{provs:?}"
    );

    // A statement someone else attached (as a deployer could through the
    // agent's registry endpoint, or a registry through a pull) is shown,
    // but unverified.
    let statement = serde_json::json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"digest": {"sha256": d.trim_start_matches("sha256:")}}],
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": {"buildDefinition": {"resolvedDependencies": [
            {"uri": "git+https://evil.example/app.git", "digest": {"gitCommit": "0000forged"}}
        ]}, "runDetails": {"builder": {"id": "https://kiln.dev/kiln@9.9.9"}}}
    })
    .to_string();
    let blobs = env.home.join("blobs/sha256");
    let put = |bytes: &[u8]| {
        let hex = sha256_hex(bytes);
        fs::write(blobs.join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    let (cd, cn) = put(b"{}");
    let (ld, ln) = put(statement.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","artifactType":"application/vnd.in-toto+json","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{cd}","size":{cn}}},"layers":[{{"mediaType":"application/vnd.in-toto+json","digest":"{ld}","size":{ln}}}],"subject":{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d}","size":1}}}}"#
    );
    let (md, mn) = put(manifest.as_bytes());
    let index_path = env.home.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(&index_path).unwrap()).unwrap();
    index["manifests"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": mn
        }));
    fs::write(&index_path, index.to_string()).unwrap();
    let info = env.json(&["inspect", &d, "--json"]);
    let provs = info["provenance"].as_array().unwrap();
    assert_eq!(provs.len(), 3, "{provs:?}");
    let forged = provs.iter().find(|p| p["commit"] == "0000forged").unwrap();
    assert_eq!(forged["verified"], false, "{forged}");
    assert_eq!(
        forged["subject_matches"], true,
        "it names the image, and still counts for nothing"
    );
    assert!(provs.iter().filter(|p| p["verified"] == true).count() == 2);
}

#[test]
fn tags_are_immutable() {
    let env = Env::new();
    let root = env.path("src");
    let spec = app(&root);
    let s = spec.to_str().unwrap();
    let first = digest(&env.bake(&spec, &["--tag", "v1"]));
    // The same content under the same tag is fine.
    assert_eq!(digest(&env.bake(&spec, &["--tag", "v1"])), first);
    write(&root.join("bin/app"), b"#!/bin/sh\necho v2\n");
    let before = env.store_state();
    let err = env.fails(&["bake", "-f", s, "--tag", "v1"]);
    assert!(
        err.contains("app:v1 already names") && err.contains("immutable"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    assert_eq!(
        env.store_state(),
        before,
        "a refused bake leaves the store unchanged"
    );
    let resolved = env.json(&["inspect", "app:v1", "--json"]);
    assert_eq!(resolved["digest"], first.as_str());
}

#[test]
fn references_resolve_in_every_form() {
    let env = Env::new();
    let spec = app(&env.path("src"));
    let d = digest(&env.bake(&spec, &["--tag", "stable"]));
    let hex = &d["sha256:".len()..];
    for r in [
        "app".to_owned(),
        "app:stable".to_owned(),
        format!("app:{}", &hex[..12]),
        format!("app@{d}"),
        format!("sha256:{}", &hex[..8]),
        hex[..10].to_owned(),
    ] {
        assert_eq!(
            env.json(&["inspect", &r, "--json"])["digest"],
            d.as_str(),
            "{r}"
        );
    }
    let err = env.fails(&["inspect", "nope"]);
    assert!(err.contains("no image matches `nope`"), "{err}");
    let err = env.fails(&["inspect", "app:nope"]);
    assert!(err.contains("no image matches `app:nope`"), "{err}");
    let err = env.fails(&["inspect", "Bad:REF"]);
    assert!(err.contains("invalid image name"), "{err}");
    let images = env.json(&["images", "--json"]);
    assert_eq!(images[0]["name"], "app");
    assert_eq!(images[0]["digest"], d.as_str());
    assert!(env.ok(&["images"]).contains("stable"));
}

#[test]
fn an_invalid_spec_names_file_line_column_and_the_nearest_key() {
    let env = Env::new();
    let spec = env.path("kiln.toml");
    write(
        &spec,
        b"[images.app]\nentrypoint = [\"/x\"]\ncontxt = \".\"\n",
    );
    let before = env.store_state();
    let err = env.fails(&["bake", "-f", spec.to_str().unwrap()]);
    assert!(
        err.contains("kiln.toml:3:1: unknown key `contxt`, did you mean `context`?"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(env.store_state(), before);
    let err = env.fails(&["bake", "-f", "missing.toml"]);
    assert!(err.contains("cannot read spec missing.toml"), "{err}");
}

#[test]
fn a_missing_or_unusable_context_is_a_clear_error() {
    let env = Env::new();
    write(
        &env.path("kiln.toml"),
        b"[images.app]\ncontext = \"nowhere\"\n",
    );
    let err = env.fails(&["bake"]);
    assert!(
        err.contains("context ./nowhere: No such file or directory"),
        "{err}"
    );
    let (_, files) = env.store_state();
    assert!(
        files
            .iter()
            .all(|f| !f.starts_with("blobs/") && !f.starts_with("tmp/")),
        "{files:?}"
    );

    write(&env.path("afile"), b"x");
    write(
        &env.path("kiln.toml"),
        b"[images.app]\ncontext = \"afile\"\n",
    );
    let err = env.fails(&["bake"]);
    assert!(err.contains("afile is not a directory"), "{err}");
}

#[test]
fn a_symlink_escaping_the_context_is_refused() {
    let env = Env::new();
    let root = env.path("src");
    let spec = app(&root);
    std::os::unix::fs::symlink("../../etc/passwd", root.join("static/leak")).unwrap();
    env.ok(&["images"]);
    let before = env.store_state();
    let err = env.fails(&["bake", "-f", spec.to_str().unwrap()]);
    assert!(
        err.contains("static/leak points outside the context"),
        "{err}"
    );
    assert_eq!(env.store_state(), before);
    fs::remove_file(root.join("static/leak")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("static/abs")).unwrap();
    let err = env.fails(&["bake", "-f", spec.to_str().unwrap()]);
    assert!(
        err.contains("static/abs points outside the context"),
        "{err}"
    );
}

#[test]
fn sockets_and_pipes_cannot_be_baked() {
    let env = Env::new();
    let root = env.path("src");
    let spec = app(&root);
    let _sock = std::os::unix::net::UnixListener::bind(root.join("app.sock")).unwrap();
    let err = env.fails(&["bake", "-f", spec.to_str().unwrap()]);
    assert!(err.contains("app.sock is a socket"), "{err}");
    drop(_sock);
    fs::remove_file(root.join("app.sock")).unwrap();
    assert!(
        Command::new("mkfifo")
            .arg(root.join("pipe"))
            .status()
            .unwrap()
            .success()
    );
    let err = env.fails(&["bake", "-f", spec.to_str().unwrap()]);
    assert!(err.contains("pipe is a named pipe"), "{err}");
}

#[test]
fn verify_names_each_corrupt_blob_and_drifted_file() {
    let env = Env::new();
    let spec = app(&env.path("src"));
    let d = digest(&env.bake(&spec, &[]));
    assert!(env.ok(&["verify"]).starts_with("ok:"));
    let tree = env.ok(&["unpack", &d]);
    let rootfs = Path::new(tree.trim());
    assert!(rootfs.join("bin/app").is_file());
    assert_eq!(
        fs::metadata(rootfs.join("bin/app")).unwrap().mode() & 0o222,
        0,
        "read-only tree"
    );
    assert!(env.ok(&["verify", "app"]).contains("1 trees verified"));

    // Drift in the tree: a changed file and an added one.
    chmod(&rootfs.join("static"), 0o755);
    chmod(&rootfs.join("static/index.html"), 0o644);
    write(&rootfs.join("static/index.html"), b"defaced");
    chmod(&rootfs.join("static/index.html"), 0o444);
    write(&rootfs.join("static/extra"), b"x");
    let err = env.fails(&["verify"]);
    assert!(err.contains("static/index.html: content changed"), "{err}");
    assert!(err.contains("static/extra: not in the image"), "{err}");

    // A corrupt layer blob.
    let info = env.json(&["inspect", &d, "--json"]);
    let layer = info["layers"][1]["digest"].as_str().unwrap().to_owned();
    let blob = env
        .home
        .join("blobs/sha256")
        .join(&layer["sha256:".len()..]);
    let mut bytes = fs::read(&blob).unwrap();
    bytes[100] ^= 0xff;
    fs::write(&blob, bytes).unwrap();
    let err = env.fails(&["verify"]);
    assert!(err.contains(&format!("blob {layer} is corrupt")), "{err}");
    let err = env.fails(&["verify", "app"]);
    assert!(err.contains(&format!("blob {layer} is corrupt")), "{err}");
    let json = env.run(&["verify", "--json"]);
    assert_eq!(json.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert!(v["problems"].as_array().unwrap().len() >= 2);
}

#[test]
fn export_interoperates_with_skopeo_and_umoci() {
    for tool in ["skopeo", "umoci"] {
        assert!(have(tool), "{tool} is required (scripts/test installs it)");
    }
    let env = Env::new();
    let root = env.path("src");
    let spec = app(&root);
    let d = digest(&env.bake(&spec, &["--tag", "v1"]));
    let layout = env.path("oci");
    env.ok(&["export", "app:v1", "--oci", layout.to_str().unwrap()]);

    let out =
        succeed(Command::new("skopeo").args(["inspect", &format!("oci:{}:v1", layout.display())]));
    let info: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(info["Digest"], d.as_str());

    // umoci unpacks exactly the baked tree: contents, types and modes.
    let bundle = env.path("bundle");
    succeed(
        Command::new("umoci")
            .args(["unpack", "--rootless", "--image"])
            .arg(format!("{}:v1", layout.display()))
            .arg(&bundle),
    );
    let got = kiln_tree(&bundle.join("rootfs"));
    let mut want = kiln_tree(&root);
    want.retain(|(p, _)| p != "notes.tmp"); // .kilnignore'd
    assert_eq!(got, want);

    let archive = env.path("app.tar");
    succeed(Command::new("skopeo").args([
        "copy",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker-archive:{}", archive.display()),
    ]));

    // kiln's own docker archive is accepted too.
    let ours = env.path("ours.tar");
    // Issue 13: `export` had no --json.
    let out = env.json(&[
        "export",
        &d,
        "--docker-archive",
        ours.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out["exported"][0]["format"], "docker-archive", "{out}");
    assert_eq!(out["exported"][0]["path"], ours.to_str().unwrap(), "{out}");
    assert!(
        out["digest"].as_str().unwrap().starts_with("sha256:"),
        "{out}"
    );
    let out = succeed(
        Command::new("skopeo").args(["inspect", &format!("docker-archive:{}", ours.display())]),
    );
    let info: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(info["Layers"].as_array().unwrap().len(), 2);

    // Exporting onto something that is not a layout, or over a file, is refused.
    write(&env.path("busy/file"), b"x");
    let err = env.fails(&["export", &d, "--oci", env.path("busy").to_str().unwrap()]);
    assert!(err.contains("is not an OCI image layout"), "{err}");
    let err = env.fails(&["export", &d, "--docker-archive", ours.to_str().unwrap()]);
    assert!(err.contains("already exists"), "{err}");
}

/// (path, description) of a tree, with modes normalized the way kiln bakes.
fn kiln_tree(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = fs::symlink_metadata(&p).unwrap();
            let desc = if m.file_type().is_symlink() {
                format!("link {}", fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                stack.push(p.clone());
                "dir".to_owned()
            } else {
                let exec = m.mode() & 0o111 != 0;
                format!(
                    "file {} {:?}",
                    if exec { 755 } else { 644 },
                    fs::read(&p).unwrap()
                )
            };
            out.push((rel, desc));
        }
    }
    out.sort();
    out
}

#[test]
fn unpack_of_a_hostile_image_leaves_nothing() {
    let env = Env::new();
    env.ok(&["images"]); // create the store
    // A gzip layer whose only entry climbs out with `..`.
    let mut tar = Vec::new();
    let mut h = tar::Header::new_gnu();
    let name = b"../../evil";
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(4);
    h.set_cksum();
    tar.extend_from_slice(h.as_bytes());
    tar.extend_from_slice(b"evil");
    tar.resize(1024 + 1024, 0);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let layer = gz.finish().unwrap();
    let put = |bytes: &[u8]| {
        let d = kiln_core::Digest::of(bytes);
        fs::write(env.home.join("blobs/sha256").join(d.hex()), bytes).unwrap();
        (d.to_string(), bytes.len())
    };
    let (layer_d, layer_n) = put(&layer);
    let diff = kiln_core::Digest::of(&tar).to_string();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["{diff}"]}}}}"#
    );
    let (config_d, config_n) = put(config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_d}","size":{config_n}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer_d}","size":{layer_n}}}]}}"#
    );
    let (manifest_d, manifest_n) = put(manifest.as_bytes());
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest_d}","size":{manifest_n},"annotations":{{"org.opencontainers.image.ref.name":"evil:x"}}}}]}}"#
    );
    fs::write(env.home.join("index.json"), index).unwrap();

    let dest = env.path("out");
    let err = env.fails(&["unpack", "evil:x", dest.to_str().unwrap()]);
    assert!(
        err.contains("refused entry") && err.contains("climbs out"),
        "{err}"
    );
    assert!(!dest.exists());
    assert!(!env.path("evil").exists() && !env.dir.path().parent().unwrap().join("evil").exists());
    let err = env.fails(&["unpack", "evil:x"]);
    assert!(err.contains("refused entry"), "{err}");
    let (_, files) = env.store_state();
    assert!(
        files
            .iter()
            .all(|f| !f.starts_with("trees/") && !f.starts_with("tmp/")),
        "{files:?}"
    );
}

#[test]
fn a_full_disk_during_bake_leaves_the_store_unchanged() {
    // A 2 MiB tmpfs as the store; an incompressible 4 MiB file cannot fit.
    let env = Env::new();
    fs::create_dir_all(&env.home).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&env.home)
        .status()
        .is_ok_and(|s| s.success());
    // Only root can mount a tmpfs: the test says so rather than pass
    // without checking (CI runs as root).
    assert!(mounted, "cannot mount a tmpfs: run this test as root");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(&env.home);
    let root = env.path("src");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let noise: Vec<u8> = (0..4 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    write(&root.join("noise.bin"), &noise);
    write(&root.join("kiln.toml"), b"[images.big]\n");
    env.ok(&["images"]);
    let before = env.store_state();
    let err = env.fails(&["bake", "-f", root.join("kiln.toml").to_str().unwrap()]);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("image big"), "{err}");
    assert_eq!(env.store_state(), before, "no partial blob may remain");
    assert!(env.ok(&["verify"]).starts_with("ok:"));
}

#[test]
fn concurrent_bakes_do_not_corrupt_the_store() {
    let env = Env::new();
    env.ok(&["images"]);
    let mut children = Vec::new();
    for i in 0..4 {
        let root = env.path(&format!("src{i}"));
        app(&root);
        write(&root.join("id"), format!("{i}").as_bytes());
        write(
            &root.join("kiln.toml"),
            format!("[images.app{i}]\n[[images.app{i}.layers]]\npaths = [\"static\"]\n").as_bytes(),
        );
        // Each image twice at once, all eight processes together.
        for _ in 0..2 {
            children.push(
                env.cmd()
                    .args(["bake", "-f", root.join("kiln.toml").to_str().unwrap()])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap(),
            );
        }
    }
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let images = env.json(&["images", "--json"]);
    let mut names: Vec<&str> = images
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["app0", "app1", "app2", "app3"]);
    assert!(env.ok(&["verify"]).starts_with("ok:"));
    assert_eq!(fs::read_dir(env.home.join("tmp")).unwrap().count(), 0);
}

#[test]
fn no_progress_bar_when_stderr_is_not_a_terminal() {
    let env = Env::new();
    let spec = app(&env.path("src"));
    let out = env.run(&["bake", "-f", spec.to_str().unwrap()]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().count(),
        1,
        "only the summary line: {stderr:?}"
    );
    assert!(
        !stderr.contains('\r') && !stderr.contains('\x1b'),
        "{stderr:?}"
    );
}
