//! Probes: one check (`http`, `tcp`, `exec`) and the loops that run an
//! instance's startup, readiness and liveness probes for its whole life,
//! reporting only when health flips (after the thresholds).

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use kiln_core::health::ProbeState;
use kiln_core::service::{Duration as SpecDuration, HealthSpec, Probe, ProbeCheck};
use tokio::net::TcpStream;
use tokio::process::Command;

/// Builds the command that runs an exec probe inside the instance (the
/// runtime's `exec`), or says why it cannot.
pub type ExecFn = Box<dyn Fn(&[String]) -> Result<Command, String> + Send + Sync>;

/// What builds an exec probe's command, borrowed.
type Exec<'a> = &'a (dyn Fn(&[String]) -> Result<Command, String> + Send + Sync);

/// Which probe flipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    Startup,
    Readiness,
    Liveness,
}

/// Run one check against the instance at `addr`.
pub async fn check(
    probe: &ProbeCheck,
    addr: SocketAddr,
    timeout: Duration,
    exec: Exec<'_>,
) -> bool {
    examine(probe, addr, timeout, exec).await.is_ok()
}

/// Run one check; a failure says what it saw: the HTTP status, the
/// connection error, or an exec command's exit and the tail of its output.
pub async fn examine(
    probe: &ProbeCheck,
    addr: SocketAddr,
    timeout: Duration,
    exec: Exec<'_>,
) -> Result<(), String> {
    let attempt = async {
        match probe {
            ProbeCheck::Tcp => TcpStream::connect(addr)
                .await
                .map(drop)
                .map_err(|e| format!("tcp: connecting to {addr}: {e}")),
            ProbeCheck::Http { path, status } => match http_status(addr, path).await {
                Ok(got) if got == *status => Ok(()),
                Ok(got) => Err(format!("http: GET {path} answered {got} (not {status})")),
                Err(e) => Err(format!("http: GET {path}: {e}")),
            },
            ProbeCheck::Exec { command } => {
                let mut c =
                    exec(command).map_err(|e| format!("exec: `{}`: {e}", command.join(" ")))?;
                c.stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped());
                let child = c
                    .spawn()
                    .map_err(|e| format!("exec: `{}`: {e}", command.join(" ")))?;
                // A probe that outlives its timeout is ended with all it
                // started (it runs in a process group of its own).
                let mut group = KillGroup(child.id());
                let output = child.wait_with_output().await;
                // Reaped: its pid (and group id) may be reused from now on.
                group.0 = None;
                match output {
                    Ok(out) if out.status.success() => Ok(()),
                    Ok(out) => {
                        let mut text = out.stdout;
                        text.extend_from_slice(&out.stderr);
                        let text = String::from_utf8_lossy(&text);
                        let tail: String = text.trim().chars().rev().take(200).collect();
                        let tail: String = tail.chars().rev().collect();
                        Err(format!(
                            "exec: `{}` {}: {tail}",
                            command.join(" "),
                            out.status
                        ))
                    }
                    Err(e) => Err(format!("exec: `{}`: {e}", command.join(" "))),
                }
            }
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            ))
        })
}

/// SIGKILLs an exec probe's process group when dropped before the probe
/// was reaped (it timed out: its future was dropped).
struct KillGroup(Option<u32>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(pid) = self
            .0
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
        {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

async fn http_status(addr: SocketAddr, path: &str) -> Result<u16, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .header("user-agent", "kiln-probe")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}

/// The readiness probe used when a service declares none: the port accepts.
pub fn default_readiness() -> Probe {
    Probe {
        check: ProbeCheck::Tcp,
        interval: SpecDuration::from_secs(1),
        timeout: SpecDuration::from_secs(1),
        success_threshold: 1,
        failure_threshold: 3,
        initial_delay: SpecDuration::from_secs(0),
    }
}

/// Polling while an instance has not yet passed a probe: instances should
/// get traffic as soon as they can serve, not a probe period later. Every
/// millisecond through its first [`FAST_WINDOW`] (a probe of a port that
/// refuses costs microseconds; coarser steps would add up to a step's
/// length to every start and self-heal), then doubling up to the interval.
const FAST_POLL: Duration = Duration::from_millis(1);
const FAST_WINDOW: Duration = Duration::from_millis(250);

/// The wait before the next check of a probe not yet passed, `since` its
/// first check, after waiting `wait`.
fn next_wait(since: Duration, wait: Duration, interval: Duration) -> Duration {
    if since < FAST_WINDOW {
        FAST_POLL.min(interval)
    } else {
        (wait * 2).min(interval)
    }
}

/// Run `probe` until it first flips to `target`, polling fast (from 2 ms,
/// doubling up to the interval). Returns false if it flipped the other way.
async fn until_first(
    probe: &Probe,
    addr: SocketAddr,
    exec: Exec<'_>,
    state: &mut ProbeState,
) -> bool {
    let first = tokio::time::Instant::now();
    let mut wait = FAST_POLL;
    loop {
        let ok = check(&probe.check, addr, probe.timeout.0, exec).await;
        if let Some(h) = state.record(ok, probe.success_threshold, probe.failure_threshold) {
            return h;
        }
        if state.healthy {
            return true;
        }
        wait = next_wait(first.elapsed(), wait, probe.interval.0);
        tokio::time::sleep(wait).await;
    }
}

/// How readiness is told when the service declares no readiness probe:
/// a service the router serves (`listen`) is ready when its port accepts;
/// a worker (no `listen`) is ready while it runs, so that staying up for
/// `min_ready` makes it ready, as Kubernetes does without a probe and Nomad
/// does with `min_healthy_time`.
pub fn readiness(health: &HealthSpec, serves: bool) -> Option<Probe> {
    match &health.readiness {
        Some(p) => Some(p.clone()),
        None if serves => Some(default_readiness()),
        None => None,
    }
}

/// Probe an instance for its whole life, calling `report` on every flip.
/// Returns only if the startup probe fails (reported as liveness lost).
/// `serves`: whether the router sends it traffic (see [`readiness`]).
pub async fn run(
    health: HealthSpec,
    addr: SocketAddr,
    serves: bool,
    exec: ExecFn,
    report: impl Fn(ProbeKind, bool, Option<String>) + Send + Sync + 'static,
) {
    let report = std::sync::Arc::new(report);
    if let Some(startup) = &health.startup {
        tokio::time::sleep(startup.initial_delay.0).await;
        // A startup probe starts "not started" and flips once to started.
        // It polls fast so a quick app is seen at once, but failures are
        // counted once per interval: the app gets failure_threshold x
        // interval to start, however fast the polling.
        let mut state = ProbeState::new(false);
        let mut failures = 0;
        let first = tokio::time::Instant::now();
        let mut wait = FAST_POLL;
        let mut next_count = first + startup.interval.0;
        let mut last = None;
        loop {
            let result = examine(&startup.check, addr, startup.timeout.0, &*exec).await;
            let ok = result.is_ok();
            last = result.err().or(last);
            if state.record(ok, startup.success_threshold, startup.failure_threshold) == Some(true)
            {
                report(ProbeKind::Startup, true, None);
                break;
            }
            if ok {
                failures = 0;
            } else if tokio::time::Instant::now() >= next_count {
                failures += 1;
                next_count += startup.interval.0;
                if failures >= startup.failure_threshold {
                    let why = last.map(|l| format!("startup probe: {l}"));
                    report(ProbeKind::Liveness, false, why);
                    return;
                }
            }
            wait = next_wait(first.elapsed(), wait, startup.interval.0);
            tokio::time::sleep(wait).await;
        }
    }
    let exec = std::sync::Arc::new(exec);
    let readiness = readiness(&health, serves);
    let ready_loop = {
        let exec = exec.clone();
        let report = report.clone();
        async move {
            let Some(readiness) = readiness else {
                // A worker: ready from now on, for as long as it runs.
                report(ProbeKind::Readiness, true, None);
                return;
            };
            tokio::time::sleep(readiness.initial_delay.0).await;
            let mut state = ProbeState::new(false);
            if until_first(&readiness, addr, &**exec, &mut state).await {
                report(ProbeKind::Readiness, true, None);
            }
            loop {
                tokio::time::sleep(readiness.interval.0).await;
                let result = examine(&readiness.check, addr, readiness.timeout.0, &**exec).await;
                let ok = result.is_ok();
                if let Some(h) =
                    state.record(ok, readiness.success_threshold, readiness.failure_threshold)
                {
                    let why = result.err().map(|e| format!("readiness probe: {e}"));
                    report(ProbeKind::Readiness, h, why);
                }
            }
        }
    };
    let live_loop = async move {
        let Some(liveness) = health.liveness else {
            return std::future::pending::<()>().await;
        };
        tokio::time::sleep(liveness.initial_delay.0).await;
        let mut state = ProbeState::new(true);
        loop {
            let result = examine(&liveness.check, addr, liveness.timeout.0, &**exec).await;
            let ok = result.is_ok();
            if let Some(h) =
                state.record(ok, liveness.success_threshold, liveness.failure_threshold)
            {
                let why = result.err().map(|e| format!("liveness probe: {e}"));
                report(ProbeKind::Liveness, h, why);
            }
            tokio::time::sleep(liveness.interval.0).await;
        }
    };
    tokio::join!(ready_loop, live_loop);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_not_yet_passed_is_polled_every_millisecond_then_backs_off() {
        let ms = Duration::from_millis;
        let interval = ms(1000);
        assert_eq!(next_wait(ms(0), ms(1), interval), ms(1));
        assert_eq!(next_wait(ms(249), ms(1), interval), ms(1));
        assert_eq!(next_wait(FAST_WINDOW, ms(1), interval), ms(2));
        assert_eq!(next_wait(ms(400), ms(256), interval), ms(512));
        assert_eq!(next_wait(ms(900), ms(512), interval), interval);
        // Never past the interval, even a shorter one than a fast poll.
        assert_eq!(
            next_wait(ms(0), ms(1), Duration::from_micros(500)),
            Duration::from_micros(500)
        );
    }

    fn loopback(port: u16) -> SocketAddr {
        (std::net::Ipv4Addr::LOCALHOST, port).into()
    }

    fn no_exec() -> ExecFn {
        Box::new(|argv: &[String]| {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]).process_group(0);
            Ok(c)
        })
    }

    /// Regression: fast polling counted every early failure, so an app
    /// slower than ~15 ms to listen failed its startup probe.
    #[tokio::test]
    async fn a_slow_start_within_the_startup_budget_is_not_a_failure() {
        let port = crate::router::testing::free_port();
        let startup = Probe {
            check: ProbeCheck::Tcp,
            interval: SpecDuration::from_millis(100),
            timeout: SpecDuration::from_millis(100),
            success_threshold: 1,
            failure_threshold: 3,
            initial_delay: SpecDuration::from_secs(0),
        };
        let health = HealthSpec {
            startup: Some(startup),
            readiness: None,
            liveness: None,
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(run(
            health,
            loopback(port),
            true,
            no_exec(),
            move |kind, healthy, _why| {
                let _ = tx.send((kind, healthy));
            },
        ));
        // The app starts listening after 200 ms: inside 3 x 100 ms.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first, (ProbeKind::Startup, true));
    }

    #[tokio::test]
    async fn a_start_beyond_the_budget_fails_the_startup_probe() {
        let port = crate::router::testing::free_port();
        let startup = Probe {
            check: ProbeCheck::Tcp,
            interval: SpecDuration::from_millis(50),
            timeout: SpecDuration::from_millis(50),
            success_threshold: 1,
            failure_threshold: 2,
            initial_delay: SpecDuration::from_secs(0),
        };
        let health = HealthSpec {
            startup: Some(startup),
            readiness: None,
            liveness: None,
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let started = std::time::Instant::now();
        tokio::spawn(run(
            health,
            loopback(port),
            true,
            no_exec(),
            move |kind, healthy, why| {
                let _ = tx.send((kind, healthy, why));
            },
        ));
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((first.0, first.1), (ProbeKind::Liveness, false));
        // The failure says what the check saw (issue 13: it said nothing).
        let why = first.2.unwrap_or_default();
        assert!(
            why.starts_with("startup probe: tcp: connecting to 127.0.0.1:")
                && why.contains("refused"),
            "{why}"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(100),
            "not before 2 x 50 ms"
        );
    }

    #[tokio::test]
    async fn tcp_and_exec_checks() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let t = Duration::from_secs(1);
        assert!(check(&ProbeCheck::Tcp, loopback(port), t, &*no_exec()).await);
        drop(listener);
        assert!(!check(&ProbeCheck::Tcp, loopback(port), t, &*no_exec()).await);
        let ok = ProbeCheck::Exec {
            command: vec!["true".into()],
        };
        let bad = ProbeCheck::Exec {
            command: vec!["false".into()],
        };
        let missing = ProbeCheck::Exec {
            command: vec!["/nonexistent/kiln".into()],
        };
        assert!(check(&ok, loopback(0), t, &*no_exec()).await);
        assert!(!check(&bad, loopback(0), t, &*no_exec()).await);
        assert!(!check(&missing, loopback(0), t, &*no_exec()).await);
        let slow = ProbeCheck::Exec {
            command: vec!["sleep".into(), "5".into()],
        };
        assert!(
            !check(&slow, loopback(0), Duration::from_millis(100), &*no_exec()).await,
            "a timeout is a failure"
        );
    }

    #[tokio::test]
    async fn http_check_compares_the_status() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; 1024];
                    let n = s.read(&mut buf).await.unwrap();
                    let req = String::from_utf8_lossy(&buf[..n]);
                    let code = if req.starts_with("GET /ok ") {
                        200
                    } else {
                        503
                    };
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\n\r\n").as_bytes(),
                        )
                        .await;
                });
            }
        });
        let t = Duration::from_secs(1);
        assert!(
            check(
                &ProbeCheck::Http {
                    path: "/ok".into(),
                    status: 200
                },
                loopback(port),
                t,
                &*no_exec()
            )
            .await
        );
        assert!(
            !check(
                &ProbeCheck::Http {
                    path: "/bad".into(),
                    status: 200
                },
                loopback(port),
                t,
                &*no_exec()
            )
            .await
        );
        assert!(
            check(
                &ProbeCheck::Http {
                    path: "/bad".into(),
                    status: 503
                },
                loopback(port),
                t,
                &*no_exec()
            )
            .await
        );
    }
}
