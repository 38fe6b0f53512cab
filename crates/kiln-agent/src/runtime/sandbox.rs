//! `sandbox`: bubblewrap. The instance's root is the image's tree bound
//! read-only (writes fail with EROFS, enforced by the kernel; bubblewrap's
//! binds are `nosuid,nodev`), with host `/usr` and loader paths the image
//! does not have, a private `/tmp`, declared volumes read-write, new user,
//! pid and ipc namespaces, a new session (so the app cannot inject
//! keystrokes into the agent's terminal with TIOCSTI). The app has no
//! capabilities, `no_new_privs`, cannot make user namespaces of its own,
//! and runs under [`seccomp`](super::seccomp)'s filter. An agent running as
//! root starts bubblewrap as the instance's user (default `nobody`), so the
//! app is that user on the host too; `user = "root"` keeps uid 0 inside a
//! user namespace, still without capabilities. It outlives the agent
//! process (a successor adopts it); stopping kiln stops it.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use kiln_core::service::RuntimeKind;
use tokio::process::Command;

use super::root::Entry;
use super::{HostRuntime, Launch, RuntimeError, children};

/// Provided by the sandbox itself, never taken from the image.
const SANDBOX_DIRS: [&str; 3] = ["proc", "dev", "tmp"];

pub struct Sandbox {
    bwrap: PathBuf,
}

impl Sandbox {
    pub fn new(bwrap: PathBuf) -> Self {
        Self { bwrap }
    }

    fn command(&self, launch: &Launch, argv: &[String]) -> Command {
        let mut c = Command::new(&self.bwrap);
        c.args(self.args(launch)).args(argv);
        // An agent running as root starts bubblewrap as the instance's
        // user: unprivileged, it makes a user namespace mapping only that
        // user, and the app has no capability anywhere. (std drops the
        // supplementary groups when root sets a uid.)
        if let Some(id) = launch.user.filter(|id| !id.is_root()) {
            c.uid(id.uid).gid(id.gid);
        }
        // The instance's environment is bwrap's own, which it passes on:
        // never `--setenv` arguments, which any local user reads in `ps`
        // (`/proc/PID/environ` is readable only by the same user and root).
        c.env_clear().envs(&launch.env).process_group(0);
        c
    }

    /// `argv` inside running instance `pid` (the outer bwrap): nsenter
    /// joins the namespaces of its app (mount, pid, ipc; its user
    /// namespace when it has its own, as bwrap makes for a non-root
    /// agent), takes its root and the instance's workdir, and runs `argv`
    /// with the instance's environment, under the instance's seccomp
    /// filter.
    fn enter(&self, launch: &Launch, pid: u32, argv: &[String]) -> Result<Command, RuntimeError> {
        let target = app_pid(pid)
            .or_else(|| children(pid).first().copied())
            .ok_or(RuntimeError::NoApp(pid))?;
        // Its user namespace when it has its own (as bwrap makes for a
        // non-root agent); the probe then runs as the instance's user.
        let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/user")).ok();
        let own_userns = ns(&target.to_string()) != ns("self");
        let join: &[&str] = if own_userns {
            &[
                "--mount",
                "--pid",
                "--ipc",
                "--user",
                "--preserve-credentials",
            ]
        } else {
            &["--mount", "--pid", "--ipc"]
        };
        super::nsenter(launch, target, join, own_userns, argv)
    }

    fn args(&self, l: &Launch) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |items: &[&dyn AsRef<std::ffi::OsStr>]| {
            for i in items {
                a.push(i.as_ref().to_owned());
            }
        };
        // A user namespace always (an unprivileged bubblewrap makes one
        // anyway), and none inside it: the app cannot gain capabilities in
        // a namespace of its own.
        push(&[&"--unshare-user", &"--disable-userns"]);
        if l.user.is_some_and(|id| id.is_root()) {
            push(&[&"--uid", &"0", &"--gid", &"0", &"--cap-drop", &"ALL"]);
        }
        push(&[&"--unshare-pid", &"--unshare-ipc", &"--new-session"]);
        push(&[&"--seccomp", &SECCOMP_FD.to_string()]);
        // The image's entries, and the host's it borrows (none for an image
        // with a userland of its own).
        for e in super::root::entries(l, &SANDBOX_DIRS) {
            match e {
                Entry::Link { inside, target } => push(&[&"--symlink", &target, &inside]),
                Entry::Bind { inside, host, .. } => push(&[&"--ro-bind", &host, &inside]),
            }
        }
        push(&[&"--proc", &"/proc", &"--dev", &"/dev", &"--tmpfs", &"/tmp"]);
        for (_, host, mount) in &l.volumes {
            push(&[&"--bind", host, mount]);
        }
        // The root itself is a tmpfs holding the mount points: read-only too.
        push(&[&"--remount-ro", &"/", &"--chdir", &l.workdir, &"--"]);
        a
    }
}

/// The descriptor bubblewrap reads the seccomp filter from.
const SECCOMP_FD: i32 = 3;

impl HostRuntime for Sandbox {
    const KIND: RuntimeKind = RuntimeKind::Sandbox;
    const READ_ONLY: bool = true;
    const LAUNCHER: bool = true;

    fn command(&self, launch: &Launch, argv: &[String]) -> Command {
        Sandbox::command(self, launch, argv)
    }

    fn before_spawn(&self, launch: &Launch, cmd: &mut Command) -> Result<(), RuntimeError> {
        super::give_volumes(launch)?;
        // The filter goes through a pipe of its own for each start (bwrap
        // reads it to the end).
        let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| RuntimeError::Spawn(e.into()))?;
        let program =
            super::seccomp::program().map_err(|e| RuntimeError::Spawn(std::io::Error::other(e)))?;
        std::fs::File::from(write)
            .write_all(&program)
            .map_err(RuntimeError::Spawn)?;
        super::pass_fd(cmd, read, SECCOMP_FD);
        Ok(())
    }

    fn enter(&self, launch: &Launch, pid: u32, argv: &[String]) -> Result<Command, RuntimeError> {
        Sandbox::enter(self, launch, pid, argv)
    }

    fn app(child: u32) -> Option<u32> {
        app_pid(child)
    }
}

/// bubblewrap with `--unshare-pid` runs: outer bwrap → pid-1 reaper → the
/// app. Signalling the outer process or the reaper would kill the app
/// without a chance to stop cleanly; signal the app.
fn app_pid(child: u32) -> Option<u32> {
    children(child)
        .first()
        .and_then(|reaper| children(*reaper).first().copied())
}
