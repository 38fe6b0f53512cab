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
use std::path::{Path, PathBuf};

use kiln_core::service::RuntimeKind;
use tokio::process::Command;

use super::{HostRuntime, Launch, RuntimeError, children};

pub(super) const HOST_DIRS: [&str; 6] = ["usr", "lib", "lib64", "lib32", "bin", "sbin"];
pub(super) const HOST_ETC: [&str; 9] = [
    "resolv.conf",
    "hosts",
    "nsswitch.conf",
    "passwd",
    "group",
    "ld.so.cache",
    "localtime",
    "ssl",
    "ca-certificates",
];
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
        let mut c = Command::new("nsenter");
        c.arg(format!("--target={target}"))
            .args(["--mount", "--pid", "--ipc", "--root"])
            .arg(format!("--wdns={}", launch.workdir));
        let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/user")).ok();
        if ns(&target.to_string()) != ns("self") {
            c.args(["--user", "--preserve-credentials"]);
            // The probe runs as the instance's user: setuid from root drops
            // every capability the joined namespace gave.
            if let Some(id) = launch.user.filter(|id| !id.is_root()) {
                c.arg(format!("--setgid={}", id.gid))
                    .arg(format!("--setuid={}", id.uid));
            }
        }
        c.arg("--").args(argv);
        c.env_clear().envs(&launch.env).process_group(0);
        // The instance's seccomp filter (but setns, which nsenter needs),
        // with no_new_privs, from before nsenter runs: the probe inherits it.
        super::seccomp::confine_probe(&mut c)
            .map_err(|e| RuntimeError::Spawn(std::io::Error::other(e)))?;
        Ok(c)
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
        let mut image_top = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&l.rootfs) {
            let mut entries: Vec<_> = rd.flatten().collect();
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let name = e.file_name();
                let name_s = name.to_string_lossy().into_owned();
                if SANDBOX_DIRS.contains(&name_s.as_str()) {
                    continue;
                }
                let dest = format!("/{name_s}");
                match std::fs::read_link(e.path()) {
                    Ok(target) => push(&[&"--symlink", &target, &dest]),
                    Err(_) => push(&[&"--ro-bind", &e.path(), &dest]),
                }
                image_top.push(name_s);
            }
        }
        // An image with a userland of its own gets nothing of the host's.
        let borrowed: &[&str] = if l.self_contained { &[] } else { &HOST_DIRS };
        for &dir in borrowed {
            if image_top.iter().any(|t| t == dir) {
                continue;
            }
            let host = Path::new("/").join(dir);
            match std::fs::read_link(&host) {
                Ok(target) => push(&[&"--symlink", &target, &format!("/{dir}")]),
                Err(_) if host.is_dir() => push(&[&"--ro-bind", &host, &host]),
                Err(_) => {}
            }
        }
        if !l.self_contained && !image_top.iter().any(|t| t == "etc") {
            for f in HOST_ETC {
                let host = Path::new("/etc").join(f);
                if host.exists() {
                    push(&[&"--ro-bind", &host, &host]);
                }
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
        // Volumes belong to the instance's user, which must write them.
        if let Some(id) = launch.user {
            for (_, host, _) in &launch.volumes {
                std::os::unix::fs::chown(host, Some(id.uid), Some(id.gid))
                    .map_err(RuntimeError::Spawn)?;
            }
        }
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
