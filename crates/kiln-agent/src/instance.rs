//! One instance's life, as a task: start it through its runtime, send its
//! output to its log, probe it, and end it — gracefully when asked (stop
//! signal, then SIGKILL after `kill_timeout`). It reports to its service's
//! controller; it never decides anything itself.

use std::sync::Arc;
use std::time::Duration;

use kiln_core::service::{HealthSpec, StopSignal, StopSpec};
use rustix::process::{Pid, Signal, kill_process, kill_process_group};
use tokio::sync::{mpsc, oneshot};

use crate::logs::LogFile;
use crate::probe::{self, ProbeKind};
use crate::runtime::{Launch, Runtime};

/// What an instance task tells its controller.
#[derive(Debug)]
pub enum Report {
    Started {
        id: String,
        pid: u32,
    },
    StartFailed {
        id: String,
        error: String,
    },
    Health {
        id: String,
        probe: ProbeKind,
        healthy: bool,
    },
    Exited {
        id: String,
        status: String,
        requested: bool,
    },
}

pub struct InstanceTask {
    pub id: String,
    pub launch: Launch,
    pub runtime: Arc<dyn Runtime>,
    pub health: HealthSpec,
    pub stop: StopSpec,
    pub port: u16,
    pub log: LogFile,
    /// Requests the router has in flight to this instance.
    pub inflight: Arc<crate::metrics::InFlight>,
}

fn signal(s: StopSignal) -> Signal {
    match s {
        StopSignal::Term => Signal::TERM,
        StopSignal::Int => Signal::INT,
        StopSignal::Quit => Signal::QUIT,
        StopSignal::Hup => Signal::HUP,
        StopSignal::Usr1 => Signal::USR1,
        StopSignal::Usr2 => Signal::USR2,
    }
}

/// How to end an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopKind {
    /// Stop signal, then SIGKILL after `kill_timeout`.
    Graceful,
    /// SIGKILL now (a second shutdown signal).
    Kill,
}

impl InstanceTask {
    /// Run until the instance is gone. `stop` asks it to end.
    pub async fn run(
        self,
        to: mpsc::UnboundedSender<Report>,
        mut stop: oneshot::Receiver<StopKind>,
    ) {
        let id = self.id.clone();
        let mut cmd = self.runtime.command(&self.launch, &self.launch.argv);
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        self.log
            .note(&format!(
                "starting {} ({} runtime, port {})",
                id,
                self.runtime.kind(),
                self.port
            ))
            .await;
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                self.log.note(&format!("failed to start: {e}")).await;
                let _ = to.send(Report::StartFailed {
                    id,
                    error: e.to_string(),
                });
                return;
            }
        };
        let pid = child.id().unwrap_or(0);
        let _ = to.send(Report::Started {
            id: id.clone(),
            pid,
        });
        let log = Arc::new(self.log);
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            let log = log.clone();
            pumps.push(tokio::spawn(async move { log.pump(out).await }));
        }
        if let Some(err) = child.stderr.take() {
            let log = log.clone();
            pumps.push(tokio::spawn(async move { log.pump(err).await }));
        }
        let probes = {
            let to = to.clone();
            let id = id.clone();
            let runtime = self.runtime.clone();
            let launch = self.launch.clone();
            let exec = Box::new(move |argv: &[String]| runtime.command(&launch, argv));
            tokio::spawn(probe::run(
                self.health.clone(),
                self.port,
                exec,
                move |probe, healthy| {
                    let _ = to.send(Report::Health {
                        id: id.clone(),
                        probe,
                        healthy,
                    });
                },
            ))
        };

        let (status, requested) = tokio::select! {
            status = child.wait() => (status, false),
            kind = &mut stop => {
                let kind = kind.unwrap_or(StopKind::Graceful);
                if kind == StopKind::Graceful {
                    drain(&self.inflight, self.stop.drain_timeout.0).await;
                }
                if kind == StopKind::Graceful && let Some(app) = app_pid(&*self.runtime, pid).await {
                    if let Some(p) = Pid::from_raw(app as i32) {
                        let _ = kill_process(p, signal(self.stop.signal));
                    }
                    match tokio::time::timeout(self.stop.kill_timeout.0, child.wait()).await {
                        Ok(status) => (status, true),
                        Err(_) => {
                            log.note("did not stop in time: SIGKILL").await;
                            kill_group(pid);
                            (child.wait().await, true)
                        }
                    }
                } else {
                    // Asked to kill, or still being set up with no app to
                    // signal yet: end the whole tree.
                    kill_group(pid);
                    (child.wait().await, true)
                }
            }
        };
        // Whatever is left of the instance's process group goes with it: a
        // sandbox's reaper and app must never outlive the outer process.
        kill_group(pid);
        probes.abort();
        // The pipes close when the process is gone; wait briefly for the tail.
        for p in pumps {
            let _ = tokio::time::timeout(Duration::from_millis(200), p).await;
        }
        let status = match status {
            Ok(s) => s.to_string(),
            Err(e) => e.to_string(),
        };
        log.note(&format!(
            "exited ({status}){}",
            if requested { ", as asked" } else { "" }
        ))
        .await;
        let _ = to.send(Report::Exited {
            id,
            status,
            requested,
        });
    }
}

/// Wait until the router has no request in flight to the instance (it is
/// already out of the routing table), at most `limit`.
async fn drain(inflight: &crate::metrics::InFlight, limit: Duration) {
    // A request may have loaded the previous routing snapshot just before
    // the swap; give it a moment to be counted.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let deadline = tokio::time::Instant::now() + limit;
    while inflight.get() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The app's pid, waiting up to half a second for a just-started sandbox to
/// finish setting up.
async fn app_pid(runtime: &dyn Runtime, child: u32) -> Option<u32> {
    for _ in 0..50 {
        if let Some(p) = runtime.app_pid(child) {
            return Some(p);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// SIGKILL the instance's whole process group (it was started in its own).
pub(crate) fn kill_group(pid: u32) {
    if let Some(p) = Pid::from_raw(pid as i32) {
        let _ = kill_process_group(p, Signal::KILL);
        let _ = kill_process(p, Signal::KILL);
    }
}
