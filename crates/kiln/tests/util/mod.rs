//! A temp-dir harness for black-box tests of the real `kiln` binary
//! (after ripgrep's `tests/util.rs`).
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Env {
    pub dir: tempfile::TempDir,
    pub home: PathBuf,
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("home");
        Self { dir, home }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A command for the real binary with this env's home and no ambient
    /// `SOURCE_DATE_EPOCH`.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.env("KILN_HOME", &self.home)
            .env_remove("SOURCE_DATE_EPOCH")
            .current_dir(self.dir.path());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run kiln")
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "kiln {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Run and require failure with exit code 1; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(1),
            "kiln {args:?} should fail; stderr: {stderr}"
        );
        stderr
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).expect("json output")
    }

    /// Bake and return the digest of the (single) image.
    pub fn bake(&self, spec: &Path, extra: &[&str]) -> serde_json::Value {
        let spec = spec.to_str().expect("utf-8 path");
        let mut args = vec!["bake", "-f", spec, "--json"];
        args.extend_from_slice(extra);
        let v = self.json(&args);
        v[0].clone()
    }

    /// A snapshot of the store's visible state: index.json bytes and the
    /// set of blobs and temp files.
    pub fn store_state(&self) -> (Vec<u8>, Vec<String>) {
        let index = fs::read(self.home.join("index.json")).unwrap_or_default();
        let mut files = Vec::new();
        for sub in ["blobs/sha256", "tmp", "trees"] {
            if let Ok(rd) = fs::read_dir(self.home.join(sub)) {
                for e in rd.flatten() {
                    files.push(format!("{sub}/{}", e.file_name().to_string_lossy()));
                }
            }
        }
        files.sort();
        (index, files)
    }
}

/// Write a file, creating parents.
pub fn write(path: &Path, content: &[u8]) {
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    fs::write(path, content).expect("write");
}

pub fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A small app tree: a binary-ish executable, static files, a nested dir,
/// a symlink, and a spec with a separate static layer.
pub fn app(root: &Path) -> PathBuf {
    write(&root.join("bin/app"), b"#!/bin/sh\necho app\n");
    chmod(&root.join("bin/app"), 0o755);
    write(&root.join("static/index.html"), b"<p>hi</p>\n");
    write(&root.join("static/css/site.css"), b"p { color: red }\n");
    write(
        &root.join("data/big.txt"),
        &b"compressible line\n".repeat(20_000),
    );
    write(&root.join("notes.tmp"), b"excluded by .kilnignore\n");
    write(&root.join(".kilnignore"), b"*.tmp\n");
    std::os::unix::fs::symlink("static/index.html", root.join("index.html")).expect("symlink");
    let spec = root.join("kiln.toml");
    write(
        &spec,
        br#"
[images.app]
context = "."
entrypoint = ["/bin/app"]
env = { MODE = "test" }
workdir = "/"
port = 8080

[[images.app.layers]]
name = "static"
paths = ["static"]
"#,
    );
    spec
}

/// Copy a directory tree, recreating entries in reverse order (so inode
/// order differs) and keeping symlinks.
pub fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    let mut entries: Vec<_> = fs::read_dir(from).expect("read_dir").flatten().collect();
    entries.sort_by_key(|e| std::cmp::Reverse(e.file_name()));
    for e in entries {
        let src = e.path();
        let dst = to.join(e.file_name());
        let ft = e.file_type().expect("file type");
        if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src).expect("readlink"), &dst)
                .expect("symlink");
        } else if ft.is_dir() {
            copy_tree(&src, &dst);
        } else {
            fs::copy(&src, &dst).expect("copy");
        }
    }
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}
