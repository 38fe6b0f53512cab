//! A runtime that runs no process, for the controller's tests and the scale
//! benchmark. It keeps the promises a real instance keeps, so the agent
//! cannot tell: it listens on its `PORT` and answers every HTTP request
//! `200 ok` (so TCP and HTTP probes pass), exits on its stop signal, and
//! dies when killed. Its environment scripts the rest:
//!
//! - `FAKE_NO_LISTEN=1`: never listens (never ready);
//! - `FAKE_EXIT_AFTER_MS=N`: exits on its own, status 1, after N ms;
//! - `FAKE_IGNORE_TERM=1`: ignores its stop signal (only a kill ends it).
//!
//! With [`Fake::silent`] nothing listens at all: the instances exist only
//! as bookkeeping (the benchmark's 10,000).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kiln_core::service::RuntimeKind;
use rustix::process::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::watch;

use super::{BoxFuture, Launch, Output, Running, Runtime, RuntimeError};

/// Counts what it was asked to do.
#[derive(Debug, Default)]
pub struct Fake {
    silent: bool,
    pub spawned: AtomicU64,
    pub cleaned_up: AtomicU64,
}

impl Fake {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Instances that neither listen nor run anything.
    pub fn silent() -> Arc<Self> {
        Arc::new(Self {
            silent: true,
            ..Self::default()
        })
    }
}

impl Runtime for Fake {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Process
    }

    fn read_only_enforced(&self) -> bool {
        false
    }

    fn spawn(&self, _id: &str, launch: &Launch) -> Result<Box<dyn Running>, RuntimeError> {
        self.spawned.fetch_add(1, Ordering::Relaxed);
        let env = |k: &str| launch.env.get(k).map(String::as_str);
        let (exit_tx, exit_rx) = watch::channel(None::<String>);
        let mut task = None;
        if !self.silent {
            let listen = env("FAKE_NO_LISTEN") != Some("1");
            let port: u16 = env("PORT").and_then(|p| p.parse().ok()).unwrap_or(0);
            let listener = if listen {
                let host: std::net::IpAddr = env("HOST")
                    .and_then(|h| h.parse().ok())
                    .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into());
                let l = std::net::TcpListener::bind((host, port)).map_err(RuntimeError::Spawn)?;
                l.set_nonblocking(true).map_err(RuntimeError::Spawn)?;
                Some(tokio::net::TcpListener::from_std(l).map_err(RuntimeError::Spawn)?)
            } else {
                None
            };
            let exit_after = env("FAKE_EXIT_AFTER_MS")
                .and_then(|ms| ms.parse().ok())
                .map(Duration::from_millis);
            let tx = exit_tx.clone();
            task = Some(tokio::spawn(async move {
                let serve = async {
                    match listener {
                        Some(l) => serve(l).await,
                        None => std::future::pending().await,
                    }
                };
                let exit = async {
                    match exit_after {
                        Some(d) => tokio::time::sleep(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = serve => {}
                    () = exit => { let _ = tx.send(Some("exit status: 1".to_owned())); }
                }
            }));
        }
        Ok(Box::new(FakeInstance {
            task,
            exit_tx,
            exit_rx,
            ignore_term: env("FAKE_IGNORE_TERM") == Some("1"),
        }))
    }

    fn adopt(
        &self,
        id: &str,
        _pid: u32,
        _output: Vec<super::Output>,
    ) -> Result<Box<dyn Running>, RuntimeError> {
        // Its instances live in this process: no later one finds them.
        Err(RuntimeError::Spawn(std::io::Error::other(format!(
            "the fake runtime cannot adopt {id}"
        ))))
    }

    fn exec(&self, _launch: &Launch, _pid: u32, _argv: &[String]) -> Result<Command, RuntimeError> {
        // An exec probe "runs" `true`.
        Ok(Command::new("true"))
    }

    fn clean_up(&self, _id: &str, _launch: &Launch) {
        self.cleaned_up.fetch_add(1, Ordering::Relaxed);
    }
}

/// Answer every request on every connection `200 ok`.
async fn serve(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut have = Vec::new();
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => have.extend_from_slice(&buf[..n]),
                }
                while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                    have.drain(..end + 4);
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(ok).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

struct FakeInstance {
    task: Option<tokio::task::JoinHandle<()>>,
    exit_tx: watch::Sender<Option<String>>,
    exit_rx: watch::Receiver<Option<String>>,
    ignore_term: bool,
}

impl FakeInstance {
    fn end(&mut self, status: &str) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        self.exit_tx.send_if_modified(|s| {
            let first = s.is_none();
            if first {
                *s = Some(status.to_owned());
            }
            first
        });
    }
}

impl Running for FakeInstance {
    fn pid(&self) -> u32 {
        0
    }

    fn output(&mut self) -> Vec<Output> {
        Vec::new()
    }

    fn signal(&mut self, signal: Signal) -> BoxFuture<'_, bool> {
        if !self.ignore_term {
            self.end(&format!("exit status: 0 (signal {signal:?})"));
        }
        Box::pin(async { true })
    }

    fn kill(&mut self) {
        self.end("signal: 9 (SIGKILL)");
    }

    fn detach(mut self: Box<Self>) {
        // Dropping the handle leaves the task running.
        drop(self.task.take());
    }

    fn wait(&mut self) -> BoxFuture<'_, String> {
        Box::pin(async move {
            let mut rx = self.exit_rx.clone();
            match rx.wait_for(Option::is_some).await {
                Ok(s) => s.clone().unwrap_or_default(),
                Err(_) => "gone".to_owned(),
            }
        })
    }
}

impl Drop for FakeInstance {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(env: &[(&str, &str)]) -> Launch {
        Launch {
            id: "i-1".to_owned(),
            rootfs: "/nonexistent".into(),
            argv: vec!["/bin/server".to_owned()],
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            workdir: "/".to_owned(),
            volumes: Vec::new(),
            user: None,
            limits: Default::default(),
            cgroup: String::new(),
            self_contained: false,
            stdin: false,
        }
    }

    #[tokio::test]
    async fn it_answers_on_its_port_and_exits_on_its_stop_signal() {
        let p = crate::router::testing::free_port();
        let mut r = Fake::new()
            .spawn("a", &launch(&[("PORT", &p.to_string())]))
            .unwrap();
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p))
            .await
            .unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = [0u8; 64];
        let n = s.read(&mut got).await.unwrap();
        assert!(got[..n].starts_with(b"HTTP/1.1 200 OK"));
        assert!(r.signal(Signal::TERM).await);
        assert!(r.wait().await.starts_with("exit status: 0"));
        // Gone: its port no longer accepts.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", p))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn its_environment_scripts_exits_and_ignored_signals() {
        let fake = Fake::new();
        let mut exits = fake
            .spawn("b", &launch(&[("PORT", "0"), ("FAKE_EXIT_AFTER_MS", "10")]))
            .unwrap();
        assert_eq!(exits.wait().await, "exit status: 1");
        let mut stubborn = fake
            .spawn(
                "c",
                &launch(&[("FAKE_NO_LISTEN", "1"), ("FAKE_IGNORE_TERM", "1")]),
            )
            .unwrap();
        stubborn.signal(Signal::TERM).await;
        let waiting = tokio::time::timeout(Duration::from_millis(50), stubborn.wait()).await;
        assert!(waiting.is_err(), "it ignored its stop signal");
        stubborn.kill();
        assert!(stubborn.wait().await.contains("SIGKILL"));
        assert_eq!(fake.spawned.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_silent_instance_is_bookkeeping_only() {
        let mut r = Fake::silent().spawn("d", &launch(&[])).unwrap();
        assert_eq!(r.pid(), 0, "no process: nothing a kill_group could hit");
        assert!(r.output().is_empty());
        r.kill();
        assert!(r.wait().await.contains("SIGKILL"));
    }
}
