//! An instance's `cpu`, `memory` and `pids`, enforced: an instance whose release
//! declares them runs in a cgroup of its own, `kiln/SCOPE/ID` (SCOPE names
//! the agent's home, so that two agents on one host never share one),
//! with a CPU quota and a memory limit (no swap past it). The values are
//! kiln-core's ([`kiln_core::resources::cgroup_settings`]); this module
//! writes them, on the unified hierarchy (v2) or on the `cpu`, `memory`
//! and `pids` hierarchies of a v1 or hybrid host.
//!
//! The instance enters its cgroup before it runs anything: the child
//! writes `0` (itself) to the cgroup's `cgroup.procs`, opened by the agent
//! before the fork, between fork and exec. What the instance then starts
//! (a sandbox's reaper and app, their children) is born inside.
//!
//! Where the host gives no such controllers, or the agent may not make
//! cgroups (not root, no delegation), the instance runs unlimited and its
//! log says why: placement still reserves what it declared.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln_core::resources::{CgroupVersion, Resources, cgroup_settings};
use tokio::process::Command;

/// Why an instance's limits could not be set.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("this host has no cgroup {0} controller kiln can use")]
    NoController(&'static str),
    #[error("cgroup {path}: {source}", path = .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The host's cgroup hierarchies, as found once.
#[derive(Debug)]
pub struct Cgroups {
    version: CgroupVersion,
    /// `/sys/fs/cgroup`: the unified hierarchy (v2), or where the v1
    /// hierarchies are mounted (`cpu`, `memory` under it).
    root: PathBuf,
    /// The controllers usable on it.
    controllers: Vec<&'static str>,
}

const MOUNT: &str = "/sys/fs/cgroup";

/// The host's cgroups (found at the first use).
pub fn host() -> &'static Cgroups {
    static HOST: OnceLock<Cgroups> = OnceLock::new();
    HOST.get_or_init(|| Cgroups::find(Path::new(MOUNT)))
}

impl Cgroups {
    /// What is mounted under `root`: the unified hierarchy when `root` is
    /// one (its `cgroup.controllers` lists what it offers), else the v1
    /// hierarchies of `cpu` and `memory` that exist there.
    fn find(root: &Path) -> Self {
        let wanted = ["cpu", "memory", "pids"];
        match std::fs::read_to_string(root.join("cgroup.controllers")) {
            Ok(list) => Self {
                version: CgroupVersion::V2,
                root: root.to_owned(),
                controllers: wanted
                    .into_iter()
                    .filter(|c| list.split_whitespace().any(|l| l == *c))
                    .collect(),
            },
            Err(_) => Self {
                version: CgroupVersion::V1,
                root: root.to_owned(),
                controllers: wanted
                    .into_iter()
                    .filter(|c| root.join(c).join("cgroup.procs").is_file())
                    .collect(),
            },
        }
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The directory of cgroup `name` in `controller`'s hierarchy.
    fn dir(&self, controller: &str, name: &str) -> PathBuf {
        match self.version {
            CgroupVersion::V1 => self.root.join(controller).join(name),
            CgroupVersion::V2 => self.root.join(name),
        }
    }

    /// Make cgroup `name` (`kiln/SCOPE/ID`) holding an instance to
    /// `limits`: the `cgroup.procs` files it enters through ([`enter`]).
    pub fn make(&self, name: &str, limits: &Resources) -> Result<Vec<File>, CgroupError> {
        let settings = cgroup_settings(self.version, limits);
        let mut controllers: Vec<&'static str> = settings.iter().map(|s| s.controller).collect();
        controllers.dedup();
        if let Some(missing) = controllers.iter().find(|c| !self.controllers.contains(*c)) {
            return Err(CgroupError::NoController(missing));
        }
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| CgroupError::Io { path, source }
        };
        let mut procs = Vec::new();
        match self.version {
            CgroupVersion::V1 => {
                for c in &controllers {
                    let dir = self.dir(c, name);
                    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
                }
            }
            CgroupVersion::V2 => {
                // Each level above the instance's hands the controllers
                // down (the root's own included).
                let enable = controllers
                    .iter()
                    .map(|c| format!("+{c}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                let mut dir = self.root.clone();
                let parts: Vec<&str> = name.split('/').collect();
                for part in parts {
                    let control = dir.join("cgroup.subtree_control");
                    std::fs::write(&control, &enable).map_err(io(&control))?;
                    dir.push(part);
                    match std::fs::create_dir(&dir) {
                        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                            return Err(io(&dir)(e));
                        }
                        _ => {}
                    }
                }
            }
        }
        for s in &settings {
            let file = self.dir(s.controller, name).join(s.file);
            match std::fs::write(&file, &s.value) {
                Ok(()) => {}
                Err(e) if s.optional && e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&file)(e)),
            }
        }
        let dirs: Vec<PathBuf> = match self.version {
            CgroupVersion::V1 => controllers.iter().map(|c| self.dir(c, name)).collect(),
            CgroupVersion::V2 => vec![self.dir("", name)],
        };
        for dir in dirs {
            let file = dir.join("cgroup.procs");
            procs.push(File::options().write(true).open(&file).map_err(io(&file))?);
        }
        Ok(procs)
    }

    /// Remove cgroup `name` once its instance is gone, and the levels
    /// above it that no other instance uses.
    /// Every v1 hierarchy, not only `cpu` and `memory`: the OCI runtime
    /// makes the cgroup in each (`pids`, `devices`, `freezer` …).
    pub fn remove(&self, name: &str) {
        let hierarchies: Vec<String> = match self.version {
            CgroupVersion::V1 => std::fs::read_dir(&self.root)
                .map(|rd| {
                    rd.flatten()
                        // `cpu,cpuacct` is often also reachable by symlinks.
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default(),
            CgroupVersion::V2 => vec![String::new()],
        };
        for c in &hierarchies {
            let leaf = self.dir(c, name);
            // The instance's last processes may still be leaving. (Already
            // gone when its runtime removed it: the levels above remain.)
            for _ in 0..10 {
                if !leaf.exists() {
                    break;
                }
                match std::fs::remove_dir(&leaf) {
                    Ok(()) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) => {
                        tracing::debug!("cgroup {}: {e}", leaf.display());
                        break;
                    }
                }
            }
            // `kiln/SCOPE` and `kiln`, when empty (another agent's or
            // instance's keep them).
            let top = self.dir(c, "");
            let mut up = leaf.parent();
            while let Some(dir) = up {
                if dir == top || std::fs::remove_dir(dir).is_err() {
                    break;
                }
                up = dir.parent();
            }
        }
    }
}

/// Have the child of `cmd` enter the cgroups of `procs` before it runs
/// anything.
pub fn enter(cmd: &mut Command, procs: Vec<File>) {
    use std::os::fd::AsRawFd;
    let fds: Vec<i32> = procs.iter().map(AsRawFd::as_raw_fd).collect();
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and makes
    // only write(2) calls on descriptors opened before the fork, which is
    // async-signal-safe; it allocates nothing (`fds` was made before) and
    // takes no lock. `procs` is moved into the closure, so the descriptors
    // stay open as long as the command.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &procs;
            for &fd in &fds {
                // "0": the writing process itself.
                if libc::write(fd, b"0".as_ptr().cast(), 1) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// What an instance's log says of its limits at its start.
pub fn describe(limits: &Resources, made: &Result<Vec<File>, CgroupError>) -> String {
    match made {
        Ok(_) => format!("held to {limits} (cgroup {})", version_name()),
        Err(e) => format!("{limits} not enforced: {e}"),
    }
}

/// What an instance's log says of limits its runtime applies itself (the
/// OCI runtime, from the bundle's `config.json`).
pub fn describe_own(limits: &Resources) -> String {
    format!(
        "held to {limits} (cgroup {}, set by the oci runtime)",
        version_name()
    )
}

/// The host's cgroup version, as the logs say it.
fn version_name() -> &'static str {
    match host().version() {
        CgroupVersion::V1 => "v1",
        CgroupVersion::V2 => "v2",
    }
}

/// A file's text (empty when there is none), for tests.
#[cfg(test)]
fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hierarchies_are_found_by_what_is_mounted() {
        let dir = tempfile::tempdir().unwrap();
        // A v1 host with memory only.
        std::fs::create_dir_all(dir.path().join("memory")).unwrap();
        std::fs::write(dir.path().join("memory/cgroup.procs"), "").unwrap();
        let v1 = Cgroups::find(dir.path());
        assert_eq!(v1.version, CgroupVersion::V1);
        assert_eq!(v1.controllers, ["memory"]);
        let cpu = Resources {
            cpu_millis: 500,
            memory_bytes: 0,
            pids: 0,
        };
        assert!(matches!(
            v1.make("kiln/s/i", &cpu),
            Err(CgroupError::NoController("cpu"))
        ));
        // A unified one offering both.
        std::fs::write(
            dir.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        let v2 = Cgroups::find(dir.path());
        assert_eq!(v2.version, CgroupVersion::V2);
        assert_eq!(v2.controllers, ["cpu", "memory", "pids"]);
        assert_eq!(v2.dir("cpu", "kiln/s/i"), dir.path().join("kiln/s/i"));
        assert_eq!(v1.dir("cpu", "kiln/s/i"), dir.path().join("cpu/kiln/s/i"));
    }

    #[test]
    fn a_v2_cgroup_is_made_with_its_limits_handed_down_every_level() {
        // A directory standing in for the unified hierarchy (the kernel's
        // is exercised by the CLI tests on a host that has one).
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu memory").unwrap();
        let v2 = Cgroups::find(dir.path());
        let limits = Resources {
            cpu_millis: 250,
            memory_bytes: 32 << 20,
            pids: 0,
        };
        // Files the kernel would make in each new cgroup.
        let leaf = dir.path().join("kiln/scope/id1");
        std::fs::create_dir_all(&leaf).unwrap();
        std::fs::write(leaf.join("cgroup.procs"), "").unwrap();
        let procs = v2.make("kiln/scope/id1", &limits).unwrap();
        assert_eq!(procs.len(), 1);
        assert_eq!(read(&leaf.join("cpu.max")), "25000 100000");
        assert_eq!(read(&leaf.join("memory.max")), (32u64 << 20).to_string());
        assert_eq!(read(&leaf.join("memory.swap.max")), "0");
        for level in ["", "kiln", "kiln/scope"] {
            assert_eq!(
                read(&dir.path().join(level).join("cgroup.subtree_control")),
                "+cpu +memory",
                "{level}"
            );
        }
        assert!(
            describe(&limits, &Err(CgroupError::NoController("cpu"))).contains(
                "cpu 0.25, memory 32 MiB not enforced: this host has no cgroup cpu controller"
            )
        );
    }
}
