//! How an instance is run: behind [`Runtime`] (a lifecycle: prepare,
//! spawn, signal / kill / wait through [`Running`], clean up), `sandbox`
//! (bubblewrap, [`sandbox`]), `oci` (the embedded OCI runtime, [`oci`],
//! through kiln's own [`shim`]) and `process` ([`process`]). [`fake`]
//! (tests and the scale benchmark) runs no process at all.

pub mod cgroup;
#[cfg(any(test, feature = "bench"))]
pub mod fake;
pub mod oci;
mod process;
mod root;
mod sandbox;
pub mod seccomp;
pub mod shim;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_core::service::RuntimeKind;
use rustix::process::{Pid, Signal, kill_process, kill_process_group};
use tokio::process::{Child, Command};

pub use process::Process;
use root::HOST_DIRS;
pub use sandbox::Sandbox;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "runtime sandbox needs bubblewrap (`bwrap`), which is not installed on this node (apt-get install bubblewrap)"
    )]
    NoBubblewrap,
    #[error(
        "runtime oci needs the agent to run as root (it makes the container's namespaces and cgroups)"
    )]
    OciNeedsRoot,
    #[error("cannot start the instance: {0}")]
    Spawn(std::io::Error),
    #[error("instance process {0} has no app running (yet)")]
    NoApp(u32),
}

/// Everything needed to start one instance.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The instance's id (names its OCI bundle and container).
    pub id: String,
    pub rootfs: PathBuf,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: String,
    /// (host directory, mount path inside the instance)
    pub volumes: Vec<(String, PathBuf, String)>,
    /// Who it runs as, when the agent can choose (it runs as root);
    /// `None`: as the agent's own user, inside the runtime's confinement.
    pub user: Option<kiln_core::user::Identity>,
    /// What its release declares it uses (`cpu`, `memory`): its limits.
    pub limits: kiln_core::resources::Resources,
    /// Its cgroup when it has limits (`kiln/SCOPE/ID`, [`cgroup`]).
    pub cgroup: String,
    /// Its image has a userland of its own: the sandbox binds nothing of
    /// the host's into it (no `/usr`, loader paths or `/etc` files).
    pub self_contained: bool,
    /// Its standard input is a pipe the caller writes (`kiln run -i`);
    /// else `/dev/null`.
    pub stdin: bool,
}

/// A future the runtime's instances hand out (the trait stays usable as
/// `dyn`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An instance's output: the read end of its stdout or stderr pipe.
pub type Output = OwnedFd;

/// How instances of one kind are run, as a lifecycle: [`prepare`]
/// (Self::prepare) what an instance needs, [`spawn`](Self::spawn) it,
/// then signal, kill and wait through the [`Running`] handle, and
/// [`clean_up`](Self::clean_up) once it is gone. The sandbox and plain
/// processes need no preparation (their tree is the store's); the OCI
/// runtime writes a bundle in `prepare` and removes what is left of its
/// container in `clean_up`.
pub trait Runtime: Send + Sync {
    fn kind(&self) -> RuntimeKind;
    /// Whether the kernel keeps the instance's root read-only.
    fn read_only_enforced(&self) -> bool;
    /// Make what instance `id` needs before it starts.
    fn prepare(&self, _id: &str, _launch: &Launch) -> Result<(), RuntimeError> {
        Ok(())
    }
    /// Start instance `id`, its output on pipes.
    fn spawn(&self, id: &str, launch: &Launch) -> Result<Box<dyn Running>, RuntimeError>;
    /// Take over instance `id`, started by an earlier agent process as
    /// `pid` (checked by its start time), with its output pipes.
    fn adopt(
        &self,
        id: &str,
        pid: u32,
        output: Vec<Output>,
    ) -> Result<Box<dyn Running>, RuntimeError>;
    /// The command that runs `argv` inside running instance `pid` (an
    /// exec probe): it sees what the instance sees (its `/tmp`, its
    /// processes, its volumes), as `kubectl exec` does.
    fn exec(&self, launch: &Launch, pid: u32, argv: &[String]) -> Result<Command, RuntimeError>;
    /// What the instance's root process is started as (command line and
    /// whole environment), which the drift detector compares with
    /// `/proc`; `None` when that is not known from the command (a plain
    /// process: see `HostRuntime::LAUNCHER`) or it has no process of its
    /// own (the fake).
    fn launched(&self, _launch: &Launch) -> Option<kiln_core::drift::Launched> {
        None
    }
    /// Remove what [`prepare`](Self::prepare) and [`spawn`](Self::spawn)
    /// made, once the instance is gone.
    fn clean_up(&self, _id: &str, _launch: &Launch) {}
    /// The app's own process when the started one is a launcher (the
    /// sandbox's bubblewrap: the app is below it); `None` when it is the
    /// app itself or has none yet.
    fn app_pid(&self, _pid: u32) -> Option<u32> {
        None
    }
}

/// A started instance.
pub trait Running: Send {
    /// Its process on this node (recorded so that a later agent can find
    /// it); 0 when it has none (the fake).
    fn pid(&self) -> u32;
    /// Its stdout and stderr, once.
    fn output(&mut self) -> Vec<Output>;
    /// Send `signal` to the app itself (not a sandbox's reaper), waiting
    /// briefly for a just-started sandbox to have one. `false`: there is
    /// no app to signal (yet).
    fn signal(&mut self, signal: Signal) -> BoxFuture<'_, bool>;
    /// End everything of the instance now.
    fn kill(&mut self);
    /// Until it has exited: how it ended.
    fn wait(&mut self) -> BoxFuture<'_, String>;
    /// Let it run on, unwatched (an agent handing over to a successor).
    fn detach(self: Box<Self>);
    /// What its log says of how it was started (its limits).
    fn note(&self) -> Option<String> {
        None
    }
    /// The write end of its standard input, once (started with
    /// `Launch::stdin`).
    fn stdin(&mut self) -> Option<OwnedFd> {
        None
    }
}

/// A runtime whose instances are host processes started by a command
/// (the sandbox's bwrap, or the plain process): the lifecycle is the same,
/// only the command and which process is the app differ.
pub(crate) trait HostRuntime: Send + Sync {
    const KIND: RuntimeKind;
    /// Whether the kernel keeps the instance's root read-only.
    const READ_ONLY: bool;
    /// Whether the started process is a launcher that stays as started
    /// (bubblewrap): its command line and environment are known from the
    /// command. A plain process may `exec` (an entrypoint script does), so
    /// how it looks is taken once it is ready instead.
    const LAUNCHER: bool;
    /// The command that runs `argv` as the instance.
    fn command(&self, launch: &Launch, argv: &[String]) -> Command;
    /// What a start needs besides its command (descriptors to pass,
    /// volumes to hand over), done once per start.
    fn before_spawn(&self, _launch: &Launch, _cmd: &mut Command) -> Result<(), RuntimeError> {
        Ok(())
    }
    /// The command that runs `argv` inside the running instance whose
    /// outer process is `pid` (an exec probe).
    fn enter(&self, launch: &Launch, pid: u32, argv: &[String]) -> Result<Command, RuntimeError>;
    /// The pid that gets the stop signal, given the started child's; `None`
    /// while the instance's process tree is still being set up.
    fn app(child: u32) -> Option<u32>;
    /// Whether the runtime puts the instance in its cgroup itself (the OCI
    /// runtime does, from its `config.json`): the launcher stays outside.
    const OWN_CGROUP: bool = false;
    /// Make what the instance needs before it starts (an OCI bundle).
    fn prepare(&self, _launch: &Launch) -> Result<(), RuntimeError> {
        Ok(())
    }
    /// Remove what `prepare` and the instance left, once it is gone.
    fn clean_up(&self, _launch: &Launch) {}
    /// How the launcher looks in `/proc` (see [`Runtime::launched`]): by
    /// default its command exactly.
    fn launched(&self, launch: &Launch) -> kiln_core::drift::Launched {
        use std::os::unix::ffi::OsStrExt;
        let cmd = self.command(launch, &launch.argv);
        let std = cmd.as_std();
        // The command's environment is exactly what it sets: every
        // runtime clears the agent's own first.
        kiln_core::drift::Launched {
            argv: std::iter::once(std.get_program())
                .chain(std.get_args())
                .map(|a| a.as_bytes().to_vec())
                .collect(),
            env: std
                .get_envs()
                .filter_map(|(k, v)| Some((k.as_bytes().to_vec(), v?.as_bytes().to_vec())))
                .collect(),
        }
    }
}

impl<T: HostRuntime> Runtime for T {
    fn kind(&self) -> RuntimeKind {
        T::KIND
    }

    fn read_only_enforced(&self) -> bool {
        T::READ_ONLY
    }

    fn prepare(&self, _id: &str, launch: &Launch) -> Result<(), RuntimeError> {
        HostRuntime::prepare(self, launch)
    }

    fn spawn(&self, _id: &str, launch: &Launch) -> Result<Box<dyn Running>, RuntimeError> {
        let mut cmd = HostRuntime::command(self, launch, &launch.argv);
        self.before_spawn(launch, &mut cmd)?;
        // Held to its limits from its first instruction, where the host
        // can; unlimited (and its log says why) where it cannot.
        let mut note = None;
        if T::OWN_CGROUP && !launch.limits.is_none() {
            note = Some(cgroup::describe_own(&launch.limits));
        } else if !launch.limits.is_none() {
            let made = cgroup::host().make(&launch.cgroup, &launch.limits);
            note = Some(cgroup::describe(&launch.limits, &made));
            match made {
                Ok(procs) => cgroup::enter(&mut cmd, procs),
                Err(e) => tracing::warn!("{}: limits not enforced: {e}", launch.cgroup),
            }
        }
        let mut p = HostProcess::spawn(cmd, T::app, launch.stdin)?;
        p.note = note;
        Ok(Box::new(p))
    }

    fn clean_up(&self, _id: &str, launch: &Launch) {
        HostRuntime::clean_up(self, launch);
        if !launch.limits.is_none() || T::OWN_CGROUP {
            cgroup::host().remove(&launch.cgroup);
        }
    }

    fn adopt(
        &self,
        _id: &str,
        pid: u32,
        output: Vec<Output>,
    ) -> Result<Box<dyn Running>, RuntimeError> {
        Ok(Box::new(HostProcess::adopt(pid, output, T::app)?))
    }

    fn exec(&self, launch: &Launch, pid: u32, argv: &[String]) -> Result<Command, RuntimeError> {
        HostRuntime::enter(self, launch, pid, argv)
    }

    fn app_pid(&self, pid: u32) -> Option<u32> {
        if T::LAUNCHER { T::app(pid) } else { None }
    }

    fn launched(&self, launch: &Launch) -> Option<kiln_core::drift::Launched> {
        T::LAUNCHER.then(|| HostRuntime::launched(self, launch))
    }
}

/// A host process started by a command (the sandbox's bwrap, or the plain
/// process), in its own process group.
pub(crate) struct HostProcess {
    /// `None` once adopted: another agent process started it, so only its
    /// pidfd tells when it ends.
    child: Option<Child>,
    pidfd: Option<OwnedFd>,
    output: Vec<OwnedFd>,
    pid: u32,
    detached: bool,
    /// The pid that gets the stop signal, given the child's; `None` while
    /// the instance's process tree is still being set up.
    app: fn(u32) -> Option<u32>,
    /// Its children once it has them (a sandbox's pid-1 reaper, which runs
    /// in a session of its own), with their start times: when the outer
    /// process dies first (killed from outside), they are ended too, for
    /// nothing else would (no `--die-with-parent`: instances outlive the
    /// agent process).
    tree: Arc<Mutex<Vec<(u32, u64)>>>,
    /// What its log says of its start (its limits).
    note: Option<String>,
    /// Its standard input's write end, until taken.
    input: Option<OwnedFd>,
}

/// Remember `pid`'s children (with their start times) once it has them,
/// looking for up to a second.
fn watch_tree(pid: u32) -> Arc<Mutex<Vec<(u32, u64)>>> {
    let tree: Arc<Mutex<Vec<(u32, u64)>>> = Arc::default();
    let found = |pid| -> Vec<(u32, u64)> {
        children(pid)
            .into_iter()
            .filter_map(|c| start_ticks(c).map(|t| (c, t)))
            .collect()
    };
    let now = found(pid);
    if now.is_empty() {
        let t = tree.clone();
        tokio::spawn(async move {
            for _ in 0..200 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let kids = found(pid);
                if !kids.is_empty() {
                    *t.lock().unwrap_or_else(|p| p.into_inner()) = kids;
                    return;
                }
            }
        });
    } else {
        *tree.lock().unwrap_or_else(|p| p.into_inner()) = now;
    }
    tree
}

impl HostProcess {
    pub(crate) fn spawn(
        mut cmd: Command,
        app: fn(u32) -> Option<u32>,
        stdin: bool,
    ) -> Result<Self, RuntimeError> {
        cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(RuntimeError::Spawn)?;
        let input = match child.stdin.take() {
            Some(i) => Some(i.into_owned_fd().map_err(RuntimeError::Spawn)?),
            None => None,
        };
        let pid = child.id().unwrap_or(0);
        let mut output = Vec::new();
        if let Some(o) = child.stdout.take() {
            output.push(o.into_owned_fd().map_err(RuntimeError::Spawn)?);
        }
        if let Some(e) = child.stderr.take() {
            output.push(e.into_owned_fd().map_err(RuntimeError::Spawn)?);
        }
        for o in &output {
            // Room for a second of chatter while no agent reads (the
            // system's cap applies; the default is 64 KiB).
            let _ = rustix::pipe::fcntl_setpipe_size(o, 1 << 20);
        }
        Ok(Self {
            child: Some(child),
            pidfd: None,
            output,
            pid,
            detached: false,
            app,
            tree: watch_tree(pid),
            note: None,
            input,
        })
    }

    /// An instance an earlier agent process started as `pid`.
    pub(crate) fn adopt(
        pid: u32,
        output: Vec<OwnedFd>,
        app: fn(u32) -> Option<u32>,
    ) -> Result<Self, RuntimeError> {
        let raw = Pid::from_raw(pid as i32).ok_or_else(|| {
            RuntimeError::Spawn(std::io::Error::other(format!("no process {pid}")))
        })?;
        let fd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::NONBLOCK)
            .map_err(|e| RuntimeError::Spawn(e.into()))?;
        Ok(Self {
            child: None,
            pidfd: Some(fd),
            output,
            pid,
            detached: false,
            app,
            tree: watch_tree(pid),
            note: None,
            input: None,
        })
    }
}

impl Running for HostProcess {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn output(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.output)
    }

    fn signal(&mut self, signal: Signal) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            for _ in 0..50 {
                if let Some(app) = (self.app)(self.pid) {
                    if let Some(p) = Pid::from_raw(app as i32) {
                        let _ = kill_process(p, signal);
                    }
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        })
    }

    fn kill(&mut self) {
        kill_group(self.pid);
        // Children that outlived it (it was killed first), if they are
        // still the same processes.
        let tree = self.tree.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (child, ticks) in tree {
            if start_ticks(child) == Some(ticks)
                && let Some(c) = Pid::from_raw(child as i32)
            {
                let _ = kill_process(c, Signal::KILL);
            }
        }
    }

    fn wait(&mut self) -> BoxFuture<'_, String> {
        Box::pin(async move {
            if let Some(child) = &mut self.child {
                return match child.wait().await {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                };
            }
            // An adopted instance is not our child: its pidfd (which names
            // that very process, whatever reuses its pid) turns readable
            // when it ends; its status goes to whoever reaps it, the
            // supervisor. Looked at every 20 ms.
            let Some(fd) = &self.pidfd else {
                return std::future::pending().await;
            };
            loop {
                let mut poll = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
                let zero = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                match rustix::event::poll(&mut poll, Some(&zero)) {
                    Ok(0) => tokio::time::sleep(Duration::from_millis(20)).await,
                    Ok(_) => {
                        return "exited (adopted: its status went to the supervisor)".to_owned();
                    }
                    Err(e) => return e.to_string(),
                }
            }
        })
    }

    fn detach(mut self: Box<Self>) {
        self.detached = true;
    }

    fn note(&self) -> Option<String> {
        self.note.clone()
    }

    fn stdin(&mut self) -> Option<OwnedFd> {
        self.input.take()
    }
}

impl Drop for HostProcess {
    /// Whatever is left of the instance's process group goes with it: a
    /// sandbox's reaper and app must never outlive the outer process
    /// (unless it was left running for a successor).
    fn drop(&mut self) {
        if !self.detached {
            Running::kill(self);
        }
    }
}

/// SIGKILL a host instance: its direct children first (a sandbox's pid-1
/// reaper, which runs in a session of its own: killing it ends every
/// process of its pid namespace), then its whole process group (it was
/// started in its own).
pub(crate) fn kill_group(pid: u32) {
    if pid == 0 {
        return;
    }
    for child in children(pid) {
        if let Some(c) = Pid::from_raw(child as i32) {
            let _ = kill_process(c, Signal::KILL);
        }
    }
    if let Some(p) = Pid::from_raw(pid as i32) {
        let _ = kill_process_group(p, Signal::KILL);
        let _ = kill_process(p, Signal::KILL);
    }
}

/// Hand the instance's volumes to its user, which must write them (their
/// top directory is chowned).
pub(crate) fn give_volumes(launch: &Launch) -> Result<(), RuntimeError> {
    if let Some(id) = launch.user {
        for (_, host, _) in &launch.volumes {
            std::os::unix::fs::chown(host, Some(id.uid), Some(id.gid))
                .map_err(RuntimeError::Spawn)?;
        }
    }
    Ok(())
}

/// `argv` inside process `target`'s namespaces (`join`: `--mount`,
/// `--pid` …) through nsenter: its root and the instance's workdir, the
/// instance's environment, as the instance's user when `as_user` (setuid
/// from root drops every capability a joined namespace gave), and under
/// the instance's seccomp filter but `setns` (which nsenter needs), with
/// no_new_privs, from before nsenter runs: the command inherits it.
pub(crate) fn nsenter(
    launch: &Launch,
    target: u32,
    join: &[&str],
    as_user: bool,
    argv: &[String],
) -> Result<Command, RuntimeError> {
    let mut c = Command::new("nsenter");
    c.arg(format!("--target={target}"))
        .args(join)
        .arg("--root")
        .arg(format!("--wdns={}", launch.workdir));
    if as_user && let Some(id) = launch.user.filter(|id| !id.is_root()) {
        c.arg(format!("--setgid={}", id.gid))
            .arg(format!("--setuid={}", id.uid));
    }
    c.arg("--").args(argv);
    c.env_clear().envs(&launch.env).process_group(0);
    seccomp::confine_probe(&mut c).map_err(|e| RuntimeError::Spawn(std::io::Error::other(e)))?;
    Ok(c)
}

/// Hand `fd` to the child as descriptor `target` (not close-on-exec
/// there); the parent's copy is closed once the child has started.
pub(crate) fn pass_fd(cmd: &mut Command, fd: OwnedFd, target: i32) {
    use std::os::fd::AsRawFd;
    let raw = fd.as_raw_fd();
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and only
    // makes system calls that are async-signal-safe (dup2, fcntl); it
    // allocates nothing and touches no lock. `fd` is moved into the
    // closure, so `raw` stays open until the command is dropped.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &fd;
            if raw == target {
                let flags = libc::fcntl(raw, libc::F_GETFD);
                if flags < 0 || libc::fcntl(raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Where bubblewrap is, if it is installed.
pub fn find_bwrap() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|d| d.join("bwrap"))
        .find(|p| p.is_file())
}

/// The runtime for `kind` on this node, whose home is `home`.
pub fn runtime(kind: RuntimeKind, home: &Path) -> Result<Box<dyn Runtime>, RuntimeError> {
    match kind {
        RuntimeKind::Sandbox => Ok(Box::new(Sandbox::new(
            find_bwrap().ok_or(RuntimeError::NoBubblewrap)?,
        ))),
        RuntimeKind::Process => Ok(Box::new(Process)),
        RuntimeKind::Oci if !oci_available() => Err(RuntimeError::OciNeedsRoot),
        RuntimeKind::Oci => Ok(Box::new(oci::Oci::new(home.join("run").join("oci")))),
    }
}

/// Whether this node can run the embedded OCI runtime: it makes the
/// container's namespaces and cgroups, which needs root.
pub fn oci_available() -> bool {
    rustix::process::geteuid().is_root()
}

/// An absolute program path as the image sees it: inside the tree when the
/// tree has it, else the host's (e.g. `/usr/bin/sh`).
pub(crate) fn resolve_in_tree(rootfs: &Path, program: &str) -> PathBuf {
    if let Some(rel) = program.strip_prefix('/') {
        let inside = rootfs.join(rel);
        if inside.exists() {
            return inside;
        }
    }
    PathBuf::from(program)
}

/// Whether `program` can be found for an instance of this image: in the
/// image's tree, or on the host paths the runtime exposes. Bare names are
/// looked up on `PATH` (from the instance's env, else the default).
pub fn command_exists<K: AsRef<str>>(
    rootfs: &Path,
    env: &BTreeMap<K, String>,
    workdir: &str,
    program: &str,
) -> bool {
    let exists = |abs: &str| {
        let rel = abs.trim_start_matches('/');
        if rootfs.join(rel).exists() {
            return true;
        }
        let top = rel.split('/').next().unwrap_or("");
        let image_has_top = rootfs.join(top).exists();
        !image_has_top && (HOST_DIRS.contains(&top) || top == "etc") && Path::new(abs).exists()
    };
    if program.starts_with('/') {
        return exists(program);
    }
    if program.contains('/') {
        return exists(&format!("{}/{program}", workdir.trim_end_matches('/')));
    }
    let path = env
        .iter()
        .find(|(k, _)| k.as_ref() == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    path.split(':')
        .filter(|d| d.starts_with('/'))
        .any(|d| exists(&format!("{}/{program}", d.trim_end_matches('/'))))
}

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The direct children of a process, from /proc.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in rd.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out.sort_unstable();
    out
}

/// When process `pid` started, by the wall clock: the boot time
/// (`btime` in /proc/stat) plus its start in clock ticks.
pub fn started_at(pid: u32) -> Option<std::time::SystemTime> {
    let ticks = start_ticks(pid)?;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let hz = rustix::param::clock_ticks_per_second().max(1);
    let since_boot = Duration::from_millis(ticks.saturating_mul(1000) / hz);
    Some(std::time::UNIX_EPOCH + Duration::from_secs(btime) + since_boot)
}

/// Field 22 of /proc/PID/stat: when the process started, in clock ticks.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields resume after ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_found_in_the_tree_or_on_exposed_host_paths() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("app/bin")).unwrap();
        std::fs::write(root.join("app/bin/server"), b"").unwrap();
        let env: BTreeMap<String, String> = BTreeMap::new();
        assert!(command_exists(root, &env, "/", "/app/bin/server"));
        assert!(command_exists(root, &env, "/app", "bin/server"));
        assert!(!command_exists(root, &env, "/", "/app/bin/missing"));
        assert!(
            command_exists(root, &env, "/", "/usr/bin/env"),
            "host /usr is exposed"
        );
        assert!(
            command_exists(root, &env, "/", "env"),
            "found on the default PATH"
        );
        assert!(!command_exists(root, &env, "/", "no-such-program-kiln"));
        // An image with its own /usr hides the host's.
        std::fs::create_dir_all(root.join("usr")).unwrap();
        assert!(!command_exists(root, &env, "/", "/usr/bin/env"));
    }

    #[test]
    fn start_ticks_reads_this_process() {
        assert!(start_ticks(std::process::id()).is_some());
        assert!(start_ticks(u32::MAX).is_none());
    }
}
