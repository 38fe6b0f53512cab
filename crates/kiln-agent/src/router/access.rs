//! Access logs (`router.access_log = true`): one JSON line per request in
//! `$KILN_HOME/logs/access/SERVICE.log`.
//!
//! A router thread never writes a file: it hands the line to the service's
//! writer thread through a bounded channel and goes on; when the writer
//! falls behind (a slow disk), lines are dropped and counted, never
//! waited for (nginx's `access_log ... buffer=` blocks its worker instead).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};

use serde::Serialize;

/// Lines waiting for the writer at most; past it, lines are dropped.
const QUEUE: usize = 64 * 1024;

/// One service's access log.
#[derive(Debug)]
pub struct AccessLog {
    pub service: String,
    tx: SyncSender<Vec<u8>>,
    /// Lines dropped because the writer was behind.
    pub dropped: AtomicU64,
}

/// One request, as its line says it.
#[derive(Serialize)]
pub struct Entry<'a> {
    /// RFC 3339, milliseconds, UTC: when the response's head went out.
    pub time: String,
    pub service: &'a str,
    pub request_id: &'a str,
    /// The client's address (as `X-Forwarded-For` ends).
    pub client: &'a str,
    pub protocol: &'static str,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub status: u16,
    /// From the request's head to the response's head.
    pub duration_ms: f64,
    /// The instance that answered and its release; none when the router
    /// answered itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release: Option<u64>,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub user_agent: &'a str,
}

impl AccessLog {
    /// Open (append to) `dir/SERVICE.log`, 0640, and start its writer.
    pub fn open(dir: &Path, service: &str) -> std::io::Result<Arc<Self>> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{service}.log"));
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(&path)?
        };
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(QUEUE);
        std::thread::Builder::new()
            .name(format!("kiln-access-{service}"))
            .spawn(move || {
                let mut out = std::io::BufWriter::with_capacity(64 * 1024, file);
                // Write what came, flush once nothing more is waiting; the
                // thread ends when the log is dropped.
                while let Ok(line) = rx.recv() {
                    let mut ok = out.write_all(&line).is_ok();
                    while let Ok(line) = rx.try_recv() {
                        ok &= out.write_all(&line).is_ok();
                    }
                    ok &= out.flush().is_ok();
                    if !ok {
                        tracing::warn!("access log {}: cannot write", path.display());
                    }
                }
            })?;
        Ok(Arc::new(Self {
            service: service.to_owned(),
            tx,
            dropped: AtomicU64::new(0),
        }))
    }

    /// Hand `entry` to the writer (or count it dropped).
    pub fn record(&self, entry: &Entry<'_>) {
        let Ok(mut line) = serde_json::to_vec(entry) else {
            return;
        };
        line.push(b'\n');
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Now as an access log's time.
pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
