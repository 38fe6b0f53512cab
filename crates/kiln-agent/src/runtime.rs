//! How an instance is started: behind [`Runtime`], `sandbox` (bubblewrap)
//! and `process`. (`oci`, runc, comes later and fits the same trait.)
//!
//! `sandbox` gives the instance a root made of the image's tree bound
//! read-only (writes fail with EROFS, enforced by the kernel), host `/usr`
//! and loader paths the image does not have, a private `/tmp`, declared
//! volumes read-write, new pid and ipc namespaces, and `--die-with-parent`
//! so no instance outlives its agent. `process` runs the command from the
//! tree as a plain child (killed with the agent via `setpriv --pdeathsig`);
//! nothing stops it from writing where it may, which `status` says.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use kiln_core::service::RuntimeKind;
use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "runtime sandbox needs bubblewrap (`bwrap`), which is not installed on this node (apt-get install bubblewrap)"
    )]
    NoBubblewrap,
    #[error("runtime oci (runc) is not available yet; use sandbox or process")]
    OciUnavailable,
}

/// Everything needed to start one instance.
#[derive(Clone, Debug)]
pub struct Launch {
    pub rootfs: PathBuf,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: String,
    /// (host directory, mount path inside the instance)
    pub volumes: Vec<(String, PathBuf, String)>,
}

pub trait Runtime: Send + Sync {
    fn kind(&self) -> RuntimeKind;
    /// Whether the kernel keeps the instance's root read-only.
    fn read_only_enforced(&self) -> bool;
    /// The command that starts `argv` as (or inside) the instance.
    fn command(&self, launch: &Launch, argv: &[String]) -> Command;
    /// The pid that should get the stop signal, given the started child's;
    /// `None` while the instance's process tree is still being set up.
    fn app_pid(&self, child: u32) -> Option<u32>;
}

/// Where bubblewrap is, if it is installed.
pub fn find_bwrap() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|d| d.join("bwrap"))
        .find(|p| p.is_file())
}

/// The runtime for `kind` on this node.
pub fn runtime(kind: RuntimeKind) -> Result<Box<dyn Runtime>, RuntimeError> {
    match kind {
        RuntimeKind::Sandbox => Ok(Box::new(Sandbox {
            bwrap: find_bwrap().ok_or(RuntimeError::NoBubblewrap)?,
        })),
        RuntimeKind::Process => Ok(Box::new(Process)),
        RuntimeKind::Oci => Err(RuntimeError::OciUnavailable),
    }
}

const HOST_DIRS: [&str; 6] = ["usr", "lib", "lib64", "lib32", "bin", "sbin"];
const HOST_ETC: [&str; 9] = [
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
    fn args(&self, l: &Launch) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |items: &[&dyn AsRef<std::ffi::OsStr>]| {
            for i in items {
                a.push(i.as_ref().to_owned());
            }
        };
        push(&[
            &"--die-with-parent",
            &"--unshare-pid",
            &"--unshare-ipc",
            &"--new-session",
        ]);
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
        for dir in HOST_DIRS {
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
        if !image_top.iter().any(|t| t == "etc") {
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
        push(&[&"--remount-ro", &"/", &"--chdir", &l.workdir, &"--clearenv"]);
        for (k, v) in &l.env {
            push(&[&"--setenv", k, v]);
        }
        push(&[&"--"]);
        a
    }
}

impl Runtime for Sandbox {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Sandbox
    }

    fn read_only_enforced(&self) -> bool {
        true
    }

    fn command(&self, launch: &Launch, argv: &[String]) -> Command {
        let mut c = Command::new(&self.bwrap);
        c.args(self.args(launch)).args(argv);
        c.env_clear().process_group(0).kill_on_drop(true);
        c
    }

    /// bubblewrap with `--unshare-pid` runs: outer bwrap → pid-1 reaper →
    /// the app. Signalling the outer process or the reaper would kill the app
    /// without a chance to stop cleanly; signal the app.
    fn app_pid(&self, child: u32) -> Option<u32> {
        children(child)
            .first()
            .and_then(|reaper| children(*reaper).first().copied())
    }
}

pub struct Process;

impl Runtime for Process {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Process
    }

    fn read_only_enforced(&self) -> bool {
        false
    }

    fn command(&self, l: &Launch, argv: &[String]) -> Command {
        // setpriv (util-linux) sets the parent-death signal before exec, so
        // the instance dies with the agent — without unsafe pre_exec code.
        let mut c = Command::new("setpriv");
        c.args(["--pdeathsig", "KILL", "--"]);
        let mut argv = argv.iter();
        if let Some(first) = argv.next() {
            c.arg(resolve_in_tree(&l.rootfs, first));
        }
        c.args(argv);
        c.env_clear().envs(&l.env);
        for (name, host, _) in &l.volumes {
            c.env(
                format!(
                    "KILN_VOLUME_{}",
                    name.to_uppercase().replace(['-', '.'], "_")
                ),
                host,
            );
        }
        c.current_dir(l.rootfs.join(l.workdir.trim_start_matches('/')));
        c.process_group(0).kill_on_drop(true);
        c
    }

    fn app_pid(&self, child: u32) -> Option<u32> {
        Some(child)
    }
}

/// An absolute program path as the image sees it: inside the tree when the
/// tree has it, else the host's (e.g. `/usr/bin/sh`).
fn resolve_in_tree(rootfs: &Path, program: &str) -> PathBuf {
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
