//! `kiln demo`: the whole point of kiln in one command, on the example app,
//! in a temporary home: bake, deploy 3 replicas behind the router, roll out
//! a new release under load, roll back, and show what happened — with the
//! count of failed requests (zero).

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kiln_core::api::{ApplyRequest, ApplyResponse, RollbackRequest, RollbackResponse};
use kiln_core::plan::Action;

use crate::client::Client;
use crate::client::runtime;
use crate::deploy::{desired, wait_for};

const SPEC: &str = include_str!("../../../examples/hello/kiln.toml");
const INDEX_HTML: &str = include_str!("../../../examples/hello/static/index.html");

/// Where the example app's binary is: beside `kiln` (both built by the
/// workspace), or `$KILN_HELLO_BIN`.
pub fn hello_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_HELLO_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("cannot find the kiln executable")?;
    let candidate = exe.with_file_name("hello");
    if candidate.is_file() {
        Ok(candidate)
    } else {
        bail!(
            "the example app `hello` is not beside {} (build the whole workspace: `cargo build --release`)",
            exe.display()
        )
    }
}

/// Write the example app's context (binary, static file, spec with a
/// service listening on `port`) into `dir`.
fn stage_example(dir: &Path, port: u16, version: &str) -> Result<PathBuf> {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(dir.join("static"))?;
    if !bin.join("hello").exists() {
        std::fs::copy(hello_binary()?, bin.join("hello"))
            .context("cannot copy the hello binary")?;
    }
    std::fs::write(dir.join("static/index.html"), INDEX_HTML)?;
    let spec = dir.join("kiln.toml");
    let service = format!(
        r#"
[services.hello]
image = "hello"
replicas = 3
listen = "127.0.0.1:{port}"
env = {{ HELLO_VERSION = "{version}" }}
[services.hello.health.readiness]
http = "/healthz"
interval = "250ms"
[services.hello.stop]
drain_timeout = "2s"
kill_timeout = "2s"
"#
    );
    std::fs::write(&spec, format!("{SPEC}{service}"))?;
    Ok(spec)
}

struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.0.wait();
    }
}

/// Requests through the router from a few keep-alive clients.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                std::thread::spawn(move || {
                    let mut conn: Option<BufReader<TcpStream>> = None;
                    while !stop.load(Ordering::Relaxed) {
                        if conn.is_none() {
                            conn = TcpStream::connect(("127.0.0.1", port))
                                .ok()
                                .map(BufReader::new);
                        }
                        let good = conn
                            .as_mut()
                            .is_some_and(|c| get(c).is_ok_and(|s| s == 200));
                        if good {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed);
                            conn = None;
                        }
                        // A small load: a few hundred requests a second.
                        std::thread::sleep(Duration::from_millis(5));
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failed,
            threads,
        }
    }

    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// One GET / on a keep-alive connection; the status.
fn get(c: &mut BufReader<TcpStream>) -> std::io::Result<u16> {
    write!(c.get_mut(), "GET / HTTP/1.1\r\nhost: demo\r\n\r\n")?;
    let mut line = String::new();
    c.read_line(&mut line)?;
    let status = line.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if c.read_line(&mut h)? == 0 {
            return Err(std::io::Error::other("closed"));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    c.read_exact(&mut body)?;
    Ok(status)
}

fn body_of(port: u16) -> String {
    let Ok(s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let mut s = s;
    let _ = write!(
        s,
        "GET / HTTP/1.1\r\nhost: demo\r\nconnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_owned())
        .unwrap_or_default()
}

pub fn run(home: Option<PathBuf>, keep: bool, no_wait: bool) -> Result<ExitCode> {
    let work = tempfile::Builder::new().prefix("kiln-demo-").tempdir()?;
    // Searchable by everyone: an agent running as root runs the instances
    // as `nobody`, who must reach the image trees in the home below.
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )?;
    let given = home.is_some();
    let home = home.unwrap_or_else(|| work.path().join("home"));
    std::fs::create_dir_all(&home)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let app = work.path().join("hello");
    let spec = stage_example(&app, port, "v1")?;
    let bold = std::io::stdout().is_terminal();
    let step = |n: u32, text: &str| {
        if bold {
            println!("\n\x1b[1m{n}. {text}\x1b[0m");
        } else {
            println!("\n{n}. {text}");
        }
    };

    let where_ = if given {
        format!("in {} (kept)", home.display())
    } else {
        "in a temporary home".to_owned()
    };
    step(
        1,
        &format!("start the agent (reconciler, router, API) {where_}"),
    );
    let exe = std::env::current_exe()?;
    let log = std::fs::File::create(home.join("agent.log"))?;
    let agent = AgentProcess(
        Command::new(&exe)
            .arg("--home")
            .arg(&home)
            .arg("serve")
            // Without bubblewrap the agent runs the demo's instances in
            // its embedded OCI runtime (as root); else they can only be
            // plain processes, which an agent runs only when told (the note
            // at apply says what is not enforced then).
            .args(
                (kiln_agent::find_bwrap().is_none() && !kiln_agent::oci_available())
                    .then_some(["--allow-runtime", "process"])
                    .into_iter()
                    .flatten(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start the agent")?,
    );
    let sock = kiln_agent::socket_path(&home);
    let started = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if started.elapsed() > Duration::from_secs(20) {
            bail!(
                "the agent did not start; see {}",
                home.join("agent.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("   agent pid {} on {}", agent.0.id(), sock.display());

    let client = Client::new(&home);
    let rt = runtime()?;
    let apply = |label: &str| -> Result<f64> {
        let (services, explicit_runtime) = desired(&home, &spec, false)?;
        let t = Instant::now();
        let resp: ApplyResponse = rt.block_on(client.post(
            "/v1/apply",
            &ApplyRequest {
                services,
                dry_run: false,
                explicit_runtime,
                prune: false,
            },
        ))?;
        for s in &resp.plan.services {
            println!(
                "   {label}: {} release {}: {}",
                s.service,
                s.revision.unwrap_or(1),
                s.changes.join("; ")
            );
        }
        let waiting: Vec<_> = resp
            .plan
            .services
            .iter()
            .filter(|s| s.action != Action::Unchanged)
            .map(|s| (s.service.to_string(), s.revision.unwrap_or(1), s.action))
            .collect();
        rt.block_on(wait_for(&client, &waiting, false, false))?;
        Ok(t.elapsed().as_secs_f64() * 1000.0)
    };

    step(
        2,
        "bake examples/hello and deploy 3 sandboxed replicas behind the router",
    );
    let ms = apply("deploy")?;
    println!("   all 3 ready in {ms:.0} ms (bake included)");
    println!(
        "   serving at http://127.0.0.1:{port}/  ->  {}",
        body_of(port)
    );

    step(
        3,
        "roll out v2 (a changed env var is a new release) under load",
    );
    let load = Load::start(port, 4);
    std::thread::sleep(Duration::from_millis(500));
    stage_example(&app, port, "v2")?;
    let rollout_ms = apply("rollout")?;
    println!(
        "   rolling update done in {rollout_ms:.0} ms  ->  {}",
        body_of(port)
    );

    step(4, "roll back: a new release with release 1's content");
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let rb: RollbackResponse =
        rt.block_on(client.post("/v1/services/hello/rollback", &RollbackRequest { to: None }))?;
    rt.block_on(wait_for(
        &client,
        &[("hello".to_owned(), rb.revision, Action::Release)],
        false,
        false,
    ))?;
    let rollback_ms = t.elapsed().as_secs_f64() * 1000.0;
    println!(
        "   release {} (content of release {}) live in {rollback_ms:.0} ms  ->  {}",
        rb.revision,
        rb.to,
        body_of(port)
    );
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failed) = load.finish();
    println!(
        "   {} requests through the router during the rollout and the rollback: {failed} failed",
        ok + failed
    );

    step(5, "what kiln says: status and history");
    crate::deploy::status(&home, Some("hello"), false)?;
    println!();
    crate::deploy::history(&home, "hello", false)?;

    // It serves until Ctrl-C, whatever stdout is (as the README says);
    // `--no-wait` ends here, and the agent with it: no "try it" then.
    if !no_wait {
        println!(
            "\ntry it: curl http://127.0.0.1:{port}/   |   kiln --home {} status",
            home.display()
        );
        println!("serving until Ctrl-C ...");
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
    }
    drop(agent);
    if keep {
        let kept = work.keep();
        println!("kept {}", kept.display());
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
