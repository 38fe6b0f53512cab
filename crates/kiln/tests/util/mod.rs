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
        // Searchable by everyone, as a real home's parents are: an agent
        // running as root runs instances as `nobody`, who must reach the
        // trees below.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).expect("chmod");
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

/// Run `cmd` (a tool beside kiln: skopeo, umoci, kiln itself by path) and
/// require success, naming its stderr otherwise; its stdout.
pub fn succeed(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().expect("run the command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Fail (never skip) when a tool the test needs is missing: CI installs
/// every one, so a skip would hide a broken install.
pub fn require(tool: &str) {
    assert!(
        have(tool),
        "{tool} is not installed (scripts/test installs what the tests need)"
    );
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A running `kiln serve` on an [`Env`]'s home, stopped (SIGTERM, then
/// SIGKILL) when dropped.
pub struct Agent {
    pub child: Option<std::process::Child>,
    pub home: PathBuf,
}

impl Agent {
    pub fn start(env: &Env) -> Self {
        Self::start_with(env, |_| {})
    }

    /// `kiln serve` with a descriptor limit of `nofile` (soft and hard),
    /// set by `prlimit` before it starts.
    pub fn start_with_nofile(env: &Env, nofile: u32) -> Self {
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_kiln"))
            .env("KILN_HOME", &env.home)
            .env_remove("SOURCE_DATE_EPOCH")
            .current_dir(env.dir.path());
        Self::spawn(env, cmd, |_| {})
    }

    pub fn start_with(env: &Env, configure: impl FnOnce(&mut Command)) -> Self {
        Self::spawn(env, env.cmd(), configure)
    }

    /// `kiln serve` run by `cmd` (another binary than the one under test).
    pub fn start_command(env: &Env, cmd: Command) -> Self {
        Self::spawn(env, cmd, |_| {})
    }

    fn spawn(env: &Env, mut cmd: Command, configure: impl FnOnce(&mut Command)) -> Self {
        cmd.arg("serve")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(env.path("agent.log")).expect("agent log"));
        configure(&mut cmd);
        let child = cmd.spawn().expect("start kiln serve");
        let agent = Self {
            child: Some(child),
            home: env.home.clone(),
        };
        wait_for("the agent's socket", Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(env.home.join("kiln.sock")).is_ok()
        });
        agent
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

use std::time::Duration;

/// Poll `cond` until it holds; panic naming `what` after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The example app's binary, built beside `kiln` by `cargo test --workspace`.
pub fn hello_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_kiln")).with_file_name("hello");
    assert!(
        p.is_file(),
        "{} is missing: build the workspace",
        p.display()
    );
    p
}

/// A context with the hello binary at /bin/hello and a start script at
/// /bin/start.sh, plus `spec` as its kiln.toml.
pub fn hello_app(root: &Path, spec: &str) -> PathBuf {
    fs::create_dir_all(root.join("bin")).expect("mkdir");
    fs::copy(hello_bin(), root.join("bin/hello")).expect("copy hello");
    write(
        &root.join("bin/start.sh"),
        b"#!/usr/bin/sh\n\
          # Paths are relative to the working directory (the image root) so the\n\
          # script runs under both runtimes.\n\
          if [ -n \"$TRY_ROOT_WRITE\" ]; then\n\
            if echo x > ./bin/written-by-instance 2>/tmp/err; then echo ROOT-WRITABLE; else echo \"root write refused: $(cat /tmp/err)\"; fi\n\
          fi\n\
          if [ -n \"$SANDBOX_REPORT\" ]; then . ./bin/report.sh; fi\n\
          if [ -d /data ]; then echo \"$KILN_INSTANCE\" >> /data/instances; fi\n\
          # An ignored signal stays ignored across exec.\n\
          if [ -n \"$IGNORE_TERM\" ]; then trap '' TERM; fi\n\
          exec ./bin/hello\n",
    );
    chmod(&root.join("bin/start.sh"), 0o755);
    // What the instance may do, tried from inside (tests/sandbox.rs): each
    // line `report NAME=VALUE`.
    write(
        &root.join("bin/report.sh"),
        br#"r() { echo "report $1"; }
try() { name=$1; shift; if "$@" >/dev/null 2>&1; then r "$name=ok"; else r "$name=refused"; fi; }
r "uid=$(id -u)"
r "gid=$(id -g)"
r "groups=$(id -G)"
while read -r k v; do case "$k" in CapEff:|CapPrm:|CapInh:|CapAmb:|NoNewPrivs:|Seccomp:|SigIgn:|SigBlk:) r "${k%:}=$v";; esac; done < /proc/self/status
try remount mount -o remount,rw,bind /bin/start.sh
try write sh -c 'echo x >> ./bin/start.sh'
try userns unshare -U true
try netns unshare -n true
try ptrace perl -e "exit(syscall($PTRACE_NR, 16, 1, 0, 0) == -1 ? 1 : 0)"
try state cat "$AGENT_STATE"
try other-volume ls "$OTHER_VOLUME"
try chmod-tree chmod 777 ./bin/start.sh
try devnode mknod ./tmp-node c 1 3
while read -r id parent majmin root mnt opts rest; do
  if [ "$mnt" = /bin ]; then r "bin-mount=$opts"; fi
done < /proc/self/mountinfo
r "done=yes"
"#,
    );
    let path = root.join("kiln.toml");
    write(&path, spec.as_bytes());
    path
}

/// A service's status from `kiln status --json`.
/// `kiln history SERVICE --json`'s releases, oldest first.
pub fn releases(env: &Env, service: &str) -> Vec<serde_json::Value> {
    env.json(&["history", service, "--json"])["releases"]
        .as_array()
        .expect("releases")
        .clone()
}

/// Wait until `revision` of service `name` is rolling out: an instance of
/// it runs and the service is not whole on it yet (what a test that acts
/// "mid-rollout" needs to have seen, rather than a sleep).
#[allow(dead_code)]
pub fn until_rolling_out(env: &Env, name: &str, revision: u64) {
    wait_for(
        &format!("release {revision} of {name} rolling out"),
        Duration::from_secs(30),
        || {
            let s = service_status(env, name);
            s["revision"] == revision
                && s["converged"] != true
                && s["instances"]
                    .as_array()
                    .is_some_and(|i| i.iter().any(|i| i["revision"] == revision))
        },
    );
}

pub fn service_status(env: &Env, name: &str) -> serde_json::Value {
    let v = env.json(&["status", "--json"]);
    v["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|s| s["name"] == name)
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// GET `path` on 127.0.0.1:`port`; the body.
pub fn http_get(port: u64, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port as u16)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out.split_once("\r\n\r\n")?.1.to_owned())
}

/// Whether a process is alive.
pub fn alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

/// Pids of processes whose command line mentions `needle` (e.g. a home dir).
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = fs::read(e.path().join("cmdline"))
            && String::from_utf8_lossy(&cmd).contains(needle)
            && alive(u64::from(pid))
        {
            out.push(pid);
        }
    }
    out
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 request on a keep-alive connection: (status, body).
pub fn request(
    conn: &mut std::io::BufReader<std::net::TcpStream>,
    path: &str,
) -> std::io::Result<(u16, String)> {
    request_on(conn, path).map(|(status, body, _)| (status, body))
}

/// One HTTP/1.1 request on a keep-alive connection: (status, body, whether
/// the server ends the connection after it, `connection: close`).
pub fn request_on(
    conn: &mut std::io::BufReader<std::net::TcpStream>,
    path: &str,
) -> std::io::Result<(u16, String, bool)> {
    request_to(conn, "kiln-test", path)
}

/// [`request_on`] with `host` as its `Host`.
pub fn request_to(
    conn: &mut std::io::BufReader<std::net::TcpStream>,
    host: &str,
    path: &str,
) -> std::io::Result<(u16, String, bool)> {
    use std::io::{BufRead, Read, Write};
    // One write: split across several, Nagle's algorithm and delayed ACKs
    // would hold each request back ~40 ms.
    conn.get_mut()
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n").as_bytes())?;
    let mut line = String::new();
    conn.read_line(&mut line)?;
    let status: u16 = line
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let (mut len, mut close) = (0usize, false);
    loop {
        let mut h = String::new();
        if conn.read_line(&mut h)? == 0 {
            return Err(std::io::Error::other("connection closed in headers"));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            } else if k.eq_ignore_ascii_case("connection") {
                close = v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"));
            }
        }
    }
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned(), close))
}

/// Steady load through the router from `threads` keep-alive clients, until
/// stopped (or 120 s). Counts responses by body prefix and every failure.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<LoadCount>>,
}

#[derive(Debug, Default)]
pub struct LoadCount {
    pub ok: u64,
    pub failed: u64,
    pub errors: Vec<String>,
    pub bodies: std::collections::BTreeMap<String, u64>,
}

impl LoadCount {
    /// Count `other`'s requests in this one.
    pub fn add(&mut self, other: LoadCount) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.errors.extend(other.errors);
        for (k, v) in other.bodies {
            *self.bodies.entry(k).or_default() += v;
        }
    }

    /// No request failed; otherwise the first few failures are the message.
    pub fn assert_none_failed(&self) {
        assert_eq!(
            self.failed,
            0,
            "failed requests: {:?}",
            &self.errors[..self.errors.len().min(5)]
        );
    }
}

impl Load {
    pub fn start(port: u16, threads: usize) -> Self {
        Self::start_at(([127, 0, 0, 1], port).into(), threads)
    }

    /// The same load on `addr`.
    pub fn start_at(addr: std::net::SocketAddr, threads: usize) -> Self {
        Self::start_to(addr, threads, "kiln-test", "/")
    }

    /// The same load on `addr`, for `host` and `path`.
    pub fn start_to(
        addr: std::net::SocketAddr,
        threads: usize,
        host: &'static str,
        path: &'static str,
    ) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handles = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut c = LoadCount::default();
                    let deadline = std::time::Instant::now() + Duration::from_secs(120);
                    let mut conn = None;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed)
                        && std::time::Instant::now() < deadline
                    {
                        if conn.is_none() {
                            match std::net::TcpStream::connect(addr) {
                                Ok(s) => conn = Some(std::io::BufReader::new(s)),
                                Err(e) => {
                                    c.failed += 1;
                                    c.errors.push(format!("connect: {e}"));
                                    continue;
                                }
                            }
                        }
                        let Some(cn) = conn.as_mut() else { continue };
                        // Bounded: at most ~500 requests/s per thread, so the
                        // load does not starve what it measures.
                        std::thread::sleep(Duration::from_millis(2));
                        // A client honours `connection: close` (RFC 9112
                        // §9.6): the next request goes on a new connection.
                        match request_to(cn, host, path) {
                            Ok((200, body, close)) => {
                                c.ok += 1;
                                let key = body.split(" (").next().unwrap_or("").to_owned();
                                *c.bodies.entry(key).or_default() += 1;
                                if close {
                                    conn = None;
                                }
                            }
                            Ok((status, body, close)) => {
                                c.failed += 1;
                                c.errors.push(format!("{status}: {body}"));
                                if close {
                                    conn = None;
                                }
                            }
                            Err(e) => {
                                c.failed += 1;
                                c.errors.push(format!("io: {e}"));
                                conn = None;
                            }
                        }
                    }
                    c
                })
            })
            .collect();
        Self {
            stop,
            threads: handles,
        }
    }

    pub fn finish(self) -> LoadCount {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = LoadCount::default();
        for t in self.threads {
            let c = t.join().unwrap();
            total.add(c);
        }
        total
    }
}

/// The actors recorded for events of `web` of the given kinds, in order.
pub fn actors_of(env: &Env, kinds: &[&str]) -> Vec<String> {
    let db = rusqlite::Connection::open(env.home.join("state.db")).unwrap();
    let mut stmt = db
        .prepare("SELECT kind, actor FROM events WHERE service = 'web' ORDER BY seq")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .filter(|(k, _)| kinds.contains(&k.as_str()))
        .map(|(_, a)| a)
        .collect()
}

/// Lowercase hex SHA-256 of `bytes`, by `sha256sum` (the tests' own check,
/// independent of kiln's hashing).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use std::io::Write as _;
    let out = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().expect("stdin").write_all(bytes)?;
            c.wait_with_output()
        })
        .expect("run sha256sum");
    String::from_utf8_lossy(&out.stdout)[..64].to_owned()
}

/// One raw tar entry: the name and link are written as-is (the `tar`
/// builder refuses `..` and absolute paths, which hostile layers need).
pub fn tar_entry(
    out: &mut Vec<u8>,
    name: &str,
    kind: tar::EntryType,
    mode: u32,
    link: &str,
    data: &[u8],
) {
    let mut h = tar::Header::new_gnu();
    {
        let raw = h.as_old_mut();
        raw.name[..name.len()].copy_from_slice(name.as_bytes());
        raw.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// A layer as it would come from a registry: its gzip bytes and the
/// diff_id it claims.
pub struct RawLayer {
    pub gzip: Vec<u8>,
    pub diff_id: String,
}

impl RawLayer {
    /// A well-formed layer of `tar` (end marker added).
    pub fn of_tar(mut tar: Vec<u8>) -> Self {
        tar.extend_from_slice(&[0u8; 1024]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &tar).expect("gzip");
        Self {
            gzip: gz.finish().expect("gzip"),
            diff_id: format!("sha256:{}", sha256_hex(&tar)),
        }
    }
}

/// Put an image made of `layers` straight into `env`'s store as
/// `reference` (`NAME:TAG`), bypassing every check a pull makes: what a
/// hostile registry could have served, now in the store.
pub fn put_image(env: &Env, reference: &str, layers: &[RawLayer], config: &str) -> String {
    let blobs = env.home.join("blobs/sha256");
    fs::create_dir_all(&blobs).expect("mkdir");
    let put = |bytes: &[u8]| {
        let hex = sha256_hex(bytes);
        fs::write(blobs.join(&hex), bytes).expect("write blob");
        (format!("sha256:{hex}"), bytes.len())
    };
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("\"{}\"", l.diff_id))
        .collect();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{config},"rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
        diff_ids.join(",")
    );
    let (config_d, config_n) = put(config.as_bytes());
    let descs: Vec<String> = layers
        .iter()
        .map(|l| {
            let (d, n) = put(&l.gzip);
            format!(
                r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{d}","size":{n}}}"#
            )
        })
        .collect();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_d}","size":{config_n}}},"layers":[{}]}}"#,
        descs.join(",")
    );
    let (manifest_d, manifest_n) = put(manifest.as_bytes());
    let index_path = env.home.join("index.json");
    let mut index: serde_json::Value = fs::read(&index_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({"schemaVersion": 2, "manifests": []}));
    index["manifests"]
        .as_array_mut()
        .expect("manifests")
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_d,
            "size": manifest_n,
            "annotations": {"org.opencontainers.image.ref.name": reference},
        }));
    fs::write(&index_path, serde_json::to_vec(&index).expect("json")).expect("index");
    manifest_d
}

/// The uid this test runs as.
pub fn my_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// The app of a sandboxed instance: below its outer bubblewrap (`outer`,
/// the pid kiln records) and bubblewrap's pid-1 reaper.
pub fn sandbox_app(outer: u64) -> u64 {
    let kids = |p: u64| -> Vec<u64> {
        fs::read_to_string(format!("/proc/{p}/task/{p}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect()
    };
    kids(kids(outer)[0])[0]
}

/// A real etcd (Debian's `etcd-server`) in a temporary directory, on free
/// loopback ports, stopped by its pid when dropped (or by
/// [`stop`](Self::stop)).
pub struct Etcd {
    child: Option<std::process::Child>,
    pub endpoint: String,
    peer: String,
    dir: tempfile::TempDir,
    /// With TLS: its CA, and a client certificate and key it accepts
    /// (etcd runs with `--client-cert-auth`).
    pub tls: Option<EtcdTls>,
}

/// PEM files of an etcd with TLS, in its directory.
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl Etcd {
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// An etcd serving clients over TLS only to those with a certificate
    /// from its CA (made here with rcgen).
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Self {
        require("etcd");
        let dir = tempfile::tempdir().expect("tempdir");
        let scheme = if tls { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{}", free_port());
        let peer = format!("http://127.0.0.1:{}", free_port());
        let tls = tls.then(|| make_tls(dir.path()));
        let mut etcd = Self {
            child: None,
            endpoint,
            peer,
            dir,
            tls,
        };
        etcd.run();
        etcd
    }

    /// Start it (again, on the same data and ports) and wait until it
    /// answers.
    pub fn run(&mut self) {
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &self.endpoint])
            .args(["--advertise-client-urls", &self.endpoint])
            .args(["--listen-peer-urls", &self.peer])
            .args(["--initial-advertise-peer-urls", &self.peer])
            .args(["--initial-cluster", &format!("default={}", self.peer)])
            .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
            .args(["--log-level", "error"])
            .args(self.tls.as_ref().map_or(Vec::new(), |t| {
                vec![
                    "--cert-file".into(),
                    t.server_cert.clone().into_os_string(),
                    "--key-file".into(),
                    t.server_key.clone().into_os_string(),
                    "--trusted-ca-file".into(),
                    t.ca.clone().into_os_string(),
                    "--client-cert-auth".into(),
                ]
            }))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        wait_for("etcd", Duration::from_secs(30), || {
            self.ctl(&["endpoint", "health"]).status.success()
        });
    }

    /// `etcdctl` (API v3) against it.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint, "--command-timeout", "3s"])
            .args(self.tls.as_ref().map_or(Vec::new(), |t| {
                vec![
                    "--cacert".into(),
                    t.ca.clone().into_os_string(),
                    "--cert".into(),
                    t.cert.clone().into_os_string(),
                    "--key".into(),
                    t.key.clone().into_os_string(),
                ]
            }))
            .args(args)
            .output()
            .expect("run etcdctl")
    }

    /// Every key under `prefix`.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let out = self.ctl(&["get", "--prefix", "--keys-only", prefix]);
        assert!(out.status.success(), "etcdctl get");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A canary whose first two steps wait for `kiln promote`: one that
/// started again would wait at step 1 (20%), not at step 2.
pub const TWO_MANUAL_STEPS: &str = "[services.web.rollout]\nstrategy = \"canary\"\nsteps = [{ weight = 20, pause = \"manual\" }, { weight = 50, pause = \"manual\" }, { weight = 100 }]\n";

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as
/// PEM files in `dir`.
fn make_tls(dir: &Path) -> EtcdTls {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let mut p = CertificateParams::new(names).unwrap();
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(
        vec!["kiln-node".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let put = |name: &str, pem: &str| {
        let path = dir.join(name);
        write(&path, pem.as_bytes());
        path
    };
    EtcdTls {
        ca: put("ca.pem", &ca_cert.pem()),
        server_cert: put("server.pem", &server_cert),
        server_key: put("server-key.pem", &server_key),
        cert: put("client.pem", &client_cert),
        key: put("client-key.pem", &client_key),
    }
}
