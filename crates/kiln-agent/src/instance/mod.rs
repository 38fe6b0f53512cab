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
    pub inflight: Arc<crate::router::metrics::InFlight>,
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
    /// Run until the instance is gone. `stop` asks it to end (a `Kill`
    /// after a `Graceful` escalates).
    pub async fn run(
        self,
        to: mpsc::UnboundedSender<Report>,
        mut stop: mpsc::UnboundedReceiver<StopKind>,
    ) {
        let id = self.id.clone();
        self.log
            .note(&format!(
                "starting {} ({} runtime, port {})",
                id,
                self.runtime.kind(),
                self.port
            ))
            .await;
        let spawned = self
            .runtime
            .prepare(&id, &self.launch)
            .and_then(|()| self.runtime.spawn(&id, &self.launch));
        let mut running = match spawned {
            Ok(r) => r,
            Err(e) => {
                self.log.note(&format!("failed to start: {e}")).await;
                self.runtime.clean_up(&id);
                let _ = to.send(Report::StartFailed {
                    id,
                    error: e.to_string(),
                });
                return;
            }
        };
        let _ = to.send(Report::Started {
            id: id.clone(),
            pid: running.pid(),
        });
        let log = Arc::new(self.log);
        let pumps: Vec<_> = running
            .output()
            .into_iter()
            .map(|out| {
                let log = log.clone();
                tokio::spawn(async move { log.pump(out).await })
            })
            .collect();
        let probes = {
            let to = to.clone();
            let id = id.clone();
            let runtime = self.runtime.clone();
            let launch = self.launch.clone();
            let exec = Box::new(move |argv: &[String]| runtime.exec(&launch, argv));
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
            status = running.wait() => (status, false),
            kind = stop.recv() => {
                let kind = kind.unwrap_or(StopKind::Graceful);
                let status = end(
                    &mut *running,
                    kind,
                    &mut stop,
                    &self.stop,
                    &self.inflight,
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
        self.runtime.clean_up(&id);
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
    inflight: &crate::router::metrics::InFlight,
    log: &LogFile,
) -> String {
    if kind == StopKind::Graceful {
        let graceful = async {
            drain(inflight, spec.drain_timeout.0).await;
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
            Some(StopKind::Graceful) => {}
            None => std::future::pending().await,
        }
    }
}

/// Wait until the router has no request in flight to the instance (it is
/// already out of the routing table), at most `limit`.
async fn drain(inflight: &crate::router::metrics::InFlight, limit: Duration) {
    // A request may have loaded the previous routing snapshot just before
    // the swap; give it a moment to be counted.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let deadline = tokio::time::Instant::now() + limit;
    while inflight.get() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
