//! `kiln serve`: a small supervisor that outlives its agent processes.
//!
//! It starts the agent (`kiln serve --agent`, the same binary) with one end
//! of a datagram socket pair as its stdin, holds every descriptor the agent
//! hands it ([`crate::keeper`]: the API socket, the listeners, each
//! instance's output pipes) and is the subreaper of the instances: when
//! the agent dies they stay up, and the supervisor starts a new agent at
//! once with everything it holds. The new agent adopts the instances and
//! serves the same sockets; clients meanwhile wait in the accept queues.
//!
//! Signals:
//! - `SIGTERM`, `SIGINT`: passed to the agent, which stops every instance
//!   gracefully (a second one forces it); the supervisor then exits with
//!   the agent's status.
//! - `SIGHUP` (`kiln serve --upgrade`): start a new agent from the binary
//!   now at the supervisor's path (an upgrade, or a restart with the same
//!   one); once it runs, the old one hands over (`SIGUSR2`): it stops
//!   accepting, lets go of its instances and finishes its requests.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, WaitOptions, kill_process};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::keeper::{self, KEEPER_FD, Note};
use crate::{ServeError, io};

/// Held descriptors, by name.
type Held = Arc<Mutex<HashMap<String, Vec<OwnedFd>>>>;

/// What the agents' links tell the main loop.
enum Heard {
    /// An agent runs (its link is up): a successor may replace it.
    Started(u32),
    /// An agent serves.
    Serving(u32),
}

struct AgentProc {
    pid: u32,
    started: Instant,
    /// It has served (an agent that dies before is broken, not crashed).
    served: bool,
}

/// The supervisor's lock (one per home), naming its pid for `kiln serve
/// --upgrade`.
pub fn pid_path(home: &Path) -> PathBuf {
    home.join("serve.lock")
}

/// Run the supervisor until its agent stops for good; the exit code.
/// `exe` is the binary to start agents from (looked up again for each, so
/// a binary replaced on disk is what an upgrade runs), `args` what each
/// gets after `serve --agent`.
pub fn supervise(home: &Path, exe: PathBuf, args: Vec<OsString>) -> Result<u8, ServeError> {
    std::fs::create_dir_all(home).map_err(io(home))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io(home))?;
    rt.block_on(run(home, exe, args))
}

async fn run(home: &Path, exe: PathBuf, args: Vec<OsString>) -> Result<u8, ServeError> {
    // Instances left by a dead agent become our children: we reap them,
    // and they are never init's.
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).map_err(|e| {
        ServeError::Io {
            path: home.to_path_buf(),
            source: e.into(),
        }
    })?;
    let pid_file = pid_path(home);
    let mut lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&pid_file)
        .map_err(io(&pid_file))?;
    if lock.try_lock().is_err() {
        let mut pid = String::new();
        let _ = std::io::Read::read_to_string(&mut lock, &mut pid);
        return Err(ServeError::AlreadyRunning {
            pid: pid.trim().to_owned(),
            home: home.to_path_buf(),
        });
    }
    lock.set_len(0).map_err(io(&pid_file))?;
    std::io::Write::write_all(&mut lock, std::process::id().to_string().as_bytes())
        .map_err(io(&pid_file))?;
    // Sockets systemd made for us (socket activation) are held from the
    // start, under the names their units give them.
    let held: Held = Arc::new(Mutex::new(systemd_sockets()));
    let (heard_tx, mut heard) = mpsc::unbounded_channel();
    let mut term = signal(SignalKind::terminate()).map_err(io(home))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io(home))?;
    let mut hup = signal(SignalKind::hangup()).map_err(io(home))?;
    let mut chld = signal(SignalKind::child()).map_err(io(home))?;

    let mut current = start_agent(home, &exe, &args, false, &held, &heard_tx).map_err(io(&exe))?;
    let mut first_start = true;
    // A successor being started, and a predecessor handing over.
    let mut next: Option<AgentProc> = None;
    let mut leaving: Option<u32> = None;
    let mut stopping = false;
    // Agents that died in a row before serving.
    let mut failed_starts = 0u32;
    let code = loop {
        tokio::select! {
            _ = term.recv() => {
                stopping = true;
                for pid in std::iter::once(current.pid).chain(leaving) {
                    signal_agent(pid, Signal::TERM);
                }
            }
            _ = int.recv() => {
                stopping = true;
                for pid in std::iter::once(current.pid).chain(leaving) {
                    signal_agent(pid, Signal::INT);
                }
            }
            _ = hup.recv(), if next.is_none() && !stopping => {
                tracing::info!("starting a new agent from {} to take over", exe.display());
                match start_agent(home, &exe, &args, true, &held, &heard_tx) {
                    Ok(a) => next = Some(a),
                    Err(e) => tracing::error!("cannot start a new agent: {e}"),
                }
            }
            Some(h) = heard.recv() => match h {
                // The successor runs: the current agent hands over to it.
                Heard::Started(pid) if next.as_ref().is_some_and(|n| n.pid == pid) => {
                    signal_agent(current.pid, Signal::USR2);
                    leaving = Some(current.pid);
                    if let Some(n) = next.take() {
                        current = n;
                    }
                }
                Heard::Serving(pid) if pid == current.pid => {
                    tracing::info!("agent {pid} serves");
                    current.served = true;
                    failed_starts = 0;
                }
                _ => {}
            },
            _ = chld.recv() => {
                let mut ended = None;
                // Reap everything: agents, and instances orphaned by one.
                while let Ok(Some((pid, status))) = rustix::process::wait(WaitOptions::NOHANG) {
                    let pid = pid.as_raw_nonzero().get() as u32;
                    if leaving == Some(pid) {
                        tracing::info!("agent {pid} handed over and exited");
                        leaving = None;
                    } else if next.as_ref().is_some_and(|n| n.pid == pid) {
                        tracing::error!("the new agent {pid} exited before taking over ({status:?}); the running one stays");
                        next = None;
                    } else if pid == current.pid {
                        ended = Some(exit_code(status));
                    }
                }
                let Some(code) = ended else { continue };
                if stopping {
                    break code;
                }
                // One that never served cannot (another agent holds the
                // home, the state cannot be read, …): its error is on
                // stderr; the first one's ends `kiln serve`.
                if !current.served {
                    failed_starts += 1;
                    if first_start || failed_starts >= MAX_FAILED_STARTS {
                        break code;
                    }
                }
                // The agent died: start another at once (its instances and
                // sockets are held). One that keeps dying young waits.
                tracing::error!("agent {} exited (code {code}); starting another", current.pid);
                if current.started.elapsed() < Duration::from_secs(1) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                first_start = false;
                match start_agent(home, &exe, &args, false, &held, &heard_tx) {
                    Ok(a) => current = a,
                    Err(e) => {
                        tracing::error!("cannot start an agent: {e}");
                        break 1;
                    }
                }
            }
        }
    };
    let _ = std::fs::remove_file(&pid_file);
    drop(lock);
    Ok(code)
}

/// Agents in a row that may die before serving before `kiln serve` gives up.
const MAX_FAILED_STARTS: u32 = 5;

/// The sockets systemd passes by socket activation (`LISTEN_PID` is us,
/// `LISTEN_FDS` of them from descriptor 3, named by `LISTEN_FDNAMES`, that
/// is by each socket unit's `FileDescriptorName=`: `api` for
/// `$KILN_HOME/kiln.sock`, `service=NAME` for a service's `listen`,
/// `preview=NAME` for its `preview_listen`), close-on-exec. None when not
/// socket-activated.
fn systemd_sockets() -> HashMap<String, Vec<OwnedFd>> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if !ours || !(1..=1024).contains(&count) {
        return HashMap::new();
    }
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .unwrap_or_default()
        .split(':')
        .map(str::to_owned)
        .collect();
    let mut held: HashMap<String, Vec<OwnedFd>> = HashMap::new();
    for i in 0..count {
        let fd = take_inherited(3 + i);
        let _ = rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC);
        // A name twice (two sockets, `ReusePort=yes`) is one group, served
        // by as many router threads; an unknown name is held, never used.
        let name = match names.get(i as usize).map(|n| n.split_once('=')) {
            Some(Some((kind @ ("service" | "preview"), service))) => {
                format!("listen:{kind}:{service}")
            }
            _ => names
                .get(i as usize)
                .cloned()
                .unwrap_or_else(|| format!("systemd-{i}")),
        };
        held.entry(name).or_default().push(fd);
    }
    tracing::info!(
        "socket activation: {}",
        held.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    held
}

/// Take ownership of descriptor `fd`, inherited from systemd.
#[allow(unsafe_code)]
fn take_inherited(fd: i32) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: systemd's socket activation protocol hands this process
    // (LISTEN_PID, checked by the caller) descriptors 3 to 3+LISTEN_FDS-1,
    // open and owned by no one else in it; each is taken exactly once,
    // before any other code could open or close descriptors in that range.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The exit code an agent's status stands for (128 + signal when killed).
fn exit_code(status: rustix::process::WaitStatus) -> u8 {
    if let Some(code) = status.exit_status() {
        return u8::try_from(code).unwrap_or(1);
    }
    status
        .terminating_signal()
        .map_or(1, |s| 128u8.saturating_add(u8::try_from(s).unwrap_or(0)))
}

fn signal_agent(pid: u32, sig: Signal) {
    if let Some(p) = Pid::from_raw(pid as i32) {
        let _ = kill_process(p, sig);
    }
}

/// Start an agent process with every held descriptor.
fn start_agent(
    home: &Path,
    exe: &Path,
    args: &[OsString],
    successor: bool,
    held: &Held,
    heard: &mpsc::UnboundedSender<Heard>,
) -> std::io::Result<AgentProc> {
    let (mine, theirs) = UnixDatagram::pair()?;
    let mut cmd = std::process::Command::new(exe);
    // The home travels in the environment (the agent's command line stays
    // as short as the one the user typed).
    cmd.env("KILN_HOME", home).arg("serve").arg("--run-agent");
    if successor {
        cmd.arg("--successor");
    }
    cmd.args(args)
        .env(KEEPER_FD, "0")
        .stdin(std::process::Stdio::from(OwnedFd::from(theirs)));
    let child = cmd.spawn()?;
    let pid = child.id();
    // Reaped by the SIGCHLD loop, not through this handle.
    drop(child);
    {
        let held = held.lock().unwrap_or_else(|p| p.into_inner());
        for (name, fds) in held.iter() {
            keeper::send(
                &mine,
                &Note::Held { name: name.clone() },
                &keeper::borrowed(fds),
            )?;
        }
    }
    keeper::send(&mine, &Note::HeldEnd {}, &[])?;
    let (held, heard) = (held.clone(), heard.clone());
    std::thread::Builder::new()
        .name(format!("kiln-keeper-{pid}"))
        .spawn(move || listen(mine, pid, &held, &heard))?;
    Ok(AgentProc {
        pid,
        started: Instant::now(),
        served: false,
    })
}

/// Hold what agent `pid` hands over, until its link closes (it exited).
fn listen(link: UnixDatagram, pid: u32, held: &Held, heard: &mpsc::UnboundedSender<Heard>) {
    while let Ok((note, fds)) = keeper::recv(&link) {
        match note {
            Note::Keep { name } => {
                held.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name, fds);
            }
            Note::Forget { name } => {
                held.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
            }
            Note::Started {} => {
                let _ = heard.send(Heard::Started(pid));
            }
            Note::Serving {} => {
                let _ = heard.send(Heard::Serving(pid));
            }
            Note::Held { .. } | Note::HeldEnd {} => {}
        }
    }
}

/// `kiln serve --upgrade`: ask the supervisor serving `home` to start a new
/// agent from its binary (as now on disk) and hand over to it. Returns the
/// supervisor's pid.
pub fn request_upgrade(home: &Path) -> Result<u32, ServeError> {
    let path = pid_path(home);
    let pid: u32 = std::fs::read_to_string(&path)
        .map_err(io(&path))?
        .trim()
        .parse()
        .map_err(|_| ServeError::Io {
            path: path.clone(),
            source: std::io::Error::other("not a pid"),
        })?;
    let p = Pid::from_raw(pid as i32).ok_or_else(|| ServeError::Io {
        path: path.clone(),
        source: std::io::Error::other("not a pid"),
    })?;
    kill_process(p, Signal::HUP).map_err(|e| ServeError::Io {
        path,
        source: e.into(),
    })?;
    Ok(pid)
}
