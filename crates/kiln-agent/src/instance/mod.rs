//! One instance's life, as a task: start it through its runtime, send its
//! output to its log, probe it, and end it — gracefully when asked (stop
//! signal, then SIGKILL after `kill_timeout`). It reports to its service's
//! controller; it never decides anything itself.
//!
//! - [`probe`]: the startup, readiness and liveness checks.
//! - [`logs`]: its output, to a file per instance.

use std::sync::Arc;
use std::time::Duration;

use kiln_core::service::{HealthSpec, StopSignal, StopSpec};
use rustix::process::Signal;
use tokio::sync::mpsc;

use crate::runtime::{Launch, Running, Runtime};

pub(crate) mod logs;
pub(crate) mod probe;

use logs::LogFile;
use probe::ProbeKind;

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
        /// What the failing check saw, when it failed.
        why: Option<String>,
    },
    Exited {
        id: String,
        status: String,
        requested: bool,
    },
    /// Left running for a successor to adopt.
    Detached {
        id: String,
    },
    /// A release task of release `revision` ended (`failed`: how, when it
    /// did not pass).
    Hook {
        revision: u64,
        failed: Option<String>,
    },
}

pub struct InstanceTask {
    pub id: String,
    pub launch: Launch,
    pub runtime: Arc<dyn Runtime>,
    pub health: HealthSpec,
    pub stop: StopSpec,
    /// Where it listens: probes go there.
    pub addr: std::net::SocketAddr,
    /// Whether the router serves it (the service has a `listen`): without
    /// a readiness probe, a worker is ready while it runs.
    pub serves: bool,
    pub log: LogFile,
    /// Requests the router has in flight to this instance.
    pub inflight: Arc<crate::router::metrics::InFlight>,
    /// How long a graceful stop waits, once the instance left this node's
    /// routes, before it counts what is in flight: a moment on one node;
    /// in a cluster, until the other nodes' routers read that it stops.
    pub settle: Duration,
    /// Holds its output pipes across agent processes.
    pub keeper: Arc<crate::keeper::Keeper>,
    /// `Some`: an earlier agent process started it (pid, output pipes);
    /// this task takes it over instead of starting it.
    pub adopt: Option<(u32, Vec<std::os::fd::OwnedFd>)>,
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
    /// Leave it running, and stop watching it (the agent hands over to a
    /// successor, which adopts it).
    Detach,
}

impl InstanceTask {
    /// Run until the instance is gone. `stop` asks it to end (a `Kill`
    /// after a `Graceful` escalates).
    pub async fn run(
        self,
        to: mpsc::UnboundedSender<Report>,
        mut stop: mpsc::UnboundedReceiver<StopKind>,
    ) {
        let id = self.id.clone();
        let adopted = self.adopt.is_some();
        let taken = match self.adopt {
            Some((pid, output)) => {
                self.log
                    .note(&format!("adopted by a new agent process (pid {pid})"))
                    .await;
                self.runtime.adopt(&id, pid, output)
            }
            None => {
                self.log
                    .note(&format!(
                        "starting {} ({} runtime, port {})",
                        id,
                        self.runtime.kind(),
                        self.addr.port()
                    ))
                    .await;
                self.runtime
                    .prepare(&id, &self.launch)
                    .and_then(|()| self.runtime.spawn(&id, &self.launch))
            }
        };
        let mut running = match taken {
            Ok(r) => r,
            Err(e) => {
                self.log.note(&format!("failed to start: {e}")).await;
                self.runtime.clean_up(&id, &self.launch);
                let _ = to.send(Report::StartFailed {
                    id,
                    error: e.to_string(),
                });
                return;
            }
        };
        if let Some(note) = running.note() {
            self.log.note(&note).await;
        }
        if !adopted {
            let _ = to.send(Report::Started {
                id: id.clone(),
                pid: running.pid(),
            });
        }
        let output = running.output();
        // The supervisor holds the pipes too: while no agent reads them,
        // the instance's lines wait there (never a SIGPIPE).
        self.keeper
            .keep(&format!("log:{id}"), &crate::keeper::borrowed(&output));
        let log = Arc::new(self.log);
        let (stop_pumps, pumps_stop) = tokio::sync::watch::channel(false);
        let pumps: Vec<_> = output
            .into_iter()
            .filter_map(|fd| tokio::net::unix::pipe::Receiver::from_owned_fd(fd).ok())
            .map(|out| {
                let (log, stop) = (log.clone(), pumps_stop.clone());
                tokio::spawn(async move { log.pump(out, stop).await })
            })
            .collect();
        let probes = {
            let to = to.clone();
            let id = id.clone();
            let runtime = self.runtime.clone();
            let launch = self.launch.clone();
            let pid = running.pid();
            let exec = Box::new(move |argv: &[String]| {
                runtime.exec(&launch, pid, argv).map_err(|e| e.to_string())
            });
            tokio::spawn(probe::run(
                self.health.clone(),
                self.addr,
                self.serves,
                exec,
                move |probe, healthy, why| {
                    let _ = to.send(Report::Health {
                        id: id.clone(),
                        probe,
                        healthy,
                        why,
                    });
                },
            ))
        };

        let (status, requested) = tokio::select! {
            status = running.wait() => (status, false),
            kind = stop.recv() => {
                let kind = kind.unwrap_or(StopKind::Graceful);
                if kind == StopKind::Detach {
                    // Its output stays in its pipes (the supervisor holds
                    // them) for the successor to read.
                    probes.abort();
                    let _ = stop_pumps.send(true);
                    for p in pumps {
                        let _ = p.await;
                    }
                    log.note("the agent hands over; left running").await;
                    running.detach();
                    let _ = to.send(Report::Detached { id });
                    return;
                }
                let status = end(
                    &mut *running,
                    kind,
                    &mut stop,
                    &self.stop,
                    (&self.inflight, self.settle),
                    &log,
                )
                .await;
                (status, true)
            }
        };
        // Whatever is left of the instance goes with it.
        running.kill();
        probes.abort();
        // The pipes close when the process is gone; wait briefly for the tail.
        for p in pumps {
            let _ = tokio::time::timeout(Duration::from_millis(200), p).await;
        }
        drop(running);
        self.runtime.clean_up(&id, &self.launch);
        self.keeper.forget(&format!("log:{id}"));
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

/// End a running instance as `kind` asks: gracefully, it drains in-flight
/// requests, gets its stop signal, and is killed after `kill_timeout`; a
/// `Kill` (at once, or arriving meanwhile) ends it now.
async fn end(
    running: &mut dyn Running,
    kind: StopKind,
    stop: &mut mpsc::UnboundedReceiver<StopKind>,
    spec: &StopSpec,
    (inflight, settle): (&crate::router::metrics::InFlight, Duration),
    log: &LogFile,
) -> String {
    if kind == StopKind::Graceful {
        let graceful = async {
            drain(inflight, settle, spec.drain_timeout.0).await;
            // No app to signal yet (a sandbox still being set up): kill.
            if !running.signal(signal(spec.signal)).await {
                return false;
            }
            match tokio::time::timeout(spec.kill_timeout.0, running.wait()).await {
                Ok(_) => true,
                Err(_) => {
                    log.note("did not stop in time: SIGKILL").await;
                    false
                }
            }
        };
        tokio::select! {
            _ = graceful => {}
            () = killed(stop) => {}
        }
    }
    running.kill();
    running.wait().await
}

/// Until a `Kill` arrives (a repeated `Graceful` changes nothing).
async fn killed(stop: &mut mpsc::UnboundedReceiver<StopKind>) {
    loop {
        match stop.recv().await {
            Some(StopKind::Kill) => return,
            Some(StopKind::Graceful | StopKind::Detach) => {}
            None => std::future::pending().await,
        }
    }
}

/// Wait until the router has no request in flight to the instance (it is
/// already out of the routing table), at most `limit`.
async fn drain(inflight: &crate::router::metrics::InFlight, settle: Duration, limit: Duration) {
    // A request may have loaded the previous routing snapshot just before
    // the swap; give it a moment to be counted (in a cluster, the other
    // routers a moment to read the stop).
    tokio::time::sleep(settle).await;
    let deadline = tokio::time::Instant::now() + limit;
    while inflight.get() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
