//! `oci`: the image runs as a full OCI container, kiln being its own OCI
//! runtime. The agent writes a bundle per instance (`config.json`, from
//! the image's config and the release: [`config`]) and starts
//! `kiln __oci-shim` from its own binary ([`super::shim`]): a
//! single-threaded process that creates and starts the container with
//! youki's `libcontainer` (which forks inside its caller, so never inside
//! the multi-threaded agent), waits for it and deletes it when it ends.
//! The shim is to an OCI instance what bubblewrap is to a sandboxed one:
//! the launcher the agent records, signals through and adopts after a
//! restart or an upgrade (the container never restarts with the agent).
//!
//! The container: its root is a per-instance directory of mount points
//! with the image's top-level entries bound read-only (so nothing is ever
//! created in the store's tree), itself read-only; private pid, mount,
//! ipc and uts namespaces, the host's network (the instance listens on its
//! port as under the other runtimes); the image's user, no capability,
//! `no_new_privs`, kiln's [`seccomp`](super::seccomp) filter (installed by
//! the shim's executor right before the app's `exec`: enforced without
//! libseccomp); the `cpu`, `memory` and `pids` limits in cgroup
//! `kiln/SCOPE/ID` of every hierarchy.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use kiln_core::service::RuntimeKind;
use serde_json::{Value, json};
use tokio::process::Command;

use super::root::{Entry, entries};
use super::{HostRuntime, Launch, RuntimeError, children};

/// The first argument that makes the kiln binary the shim.
pub const SHIM_ARG: &str = "__oci-shim";

/// Provided by the container itself, never taken from the image.
const OWN_DIRS: [&str; 4] = ["proc", "dev", "sys", "tmp"];

/// The embedded OCI runtime of a node.
pub struct Oci {
    /// `HOME/run/oci`: a bundle per instance, and libcontainer's state
    /// under `.state`.
    dir: PathBuf,
}

impl Oci {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn bundle(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn state(&self) -> PathBuf {
        self.dir.join(".state")
    }

    /// The shim's arguments, after its program name (stable across kiln
    /// versions: the drift detector compares them with `/proc`, also after
    /// an upgrade).
    fn shim_args(&self, launch: &Launch) -> Vec<std::ffi::OsString> {
        vec![
            SHIM_ARG.into(),
            self.bundle(&launch.id).into(),
            self.state().into(),
            launch.id.clone().into(),
        ]
    }
}

/// One mount of the container, as `config.json` has it.
fn mount(destination: &str, kind: &str, source: &Path, options: &[&str]) -> Value {
    json!({
        "destination": destination,
        "type": kind,
        "source": source,
        "options": options,
    })
}

/// The facts of the host the container's config depends on.
#[derive(Clone, Copy, Debug)]
pub struct Host {
    /// The memory controller accounts swap (`memory.memsw.*` on v1): the
    /// limit then covers memory and swap together.
    pub swap_accounting: bool,
}

/// The container's `config.json` (OCI runtime spec 1.0.2) for `launch`,
/// whose root holds `entries`. Pure: the same launch gives the same
/// config, which the tests read.
pub fn config(launch: &Launch, entries: &[Entry], host: Host) -> Result<Value, RuntimeError> {
    let user = launch.user.ok_or(RuntimeError::OciNeedsRoot)?;
    let env: Vec<String> = launch.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let none: [&str; 0] = [];
    let mut mounts = vec![
        mount(
            "/proc",
            "proc",
            Path::new("proc"),
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/dev",
            "tmpfs",
            Path::new("tmpfs"),
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            Path::new("devpts"),
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            Path::new("shm"),
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            Path::new("mqueue"),
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/sys",
            "sysfs",
            Path::new("sysfs"),
            &["nosuid", "noexec", "nodev", "ro"],
        ),
        mount(
            "/tmp",
            "tmpfs",
            Path::new("tmpfs"),
            &["nosuid", "nodev", "mode=1777"],
        ),
    ];
    for e in entries {
        if let Entry::Bind { inside, host, .. } = e {
            mounts.push(mount(
                inside,
                "bind",
                host,
                &["rbind", "ro", "nosuid", "nodev"],
            ));
        }
    }
    for (_, host, inside) in &launch.volumes {
        mounts.push(mount(
            inside,
            "bind",
            host,
            &["rbind", "rw", "nosuid", "nodev"],
        ));
    }
    let mut resources = json!({
        // Only the devices every program expects (and the container's own
        // ptys): no disk, no /dev/mem, no /dev/kmsg.
        "devices": [
            { "allow": false, "access": "rwm" },
            { "allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm" },
            { "allow": true, "type": "c", "major": 1, "minor": 5, "access": "rwm" },
            { "allow": true, "type": "c", "major": 1, "minor": 7, "access": "rwm" },
            { "allow": true, "type": "c", "major": 1, "minor": 8, "access": "rwm" },
            { "allow": true, "type": "c", "major": 1, "minor": 9, "access": "rwm" },
            { "allow": true, "type": "c", "major": 5, "minor": 0, "access": "rwm" },
            { "allow": true, "type": "c", "major": 5, "minor": 2, "access": "rwm" },
            { "allow": true, "type": "c", "major": 136, "access": "rwm" },
        ],
    });
    let limits = &launch.limits;
    if limits.memory_bytes != 0 {
        let mut memory = json!({ "limit": limits.memory_bytes });
        if host.swap_accounting {
            memory["swap"] = json!(limits.memory_bytes);
        }
        resources["memory"] = memory;
    }
    if limits.pids != 0 {
        resources["pids"] = json!({ "limit": limits.pids });
    }
    if limits.cpu_millis != 0 {
        let period = kiln_core::resources::CPU_PERIOD_US;
        resources["cpu"] = json!({
            "quota": u64::from(limits.cpu_millis) * period / 1000,
            "period": period,
        });
    }
    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": user.uid, "gid": user.gid, "additionalGids": none },
            "args": launch.argv,
            "env": env,
            "cwd": launch.workdir,
            // No capability at all, even for a root user.
            "capabilities": {
                "bounding": none, "effective": none, "inheritable": none,
                "permitted": none, "ambient": none,
            },
            "noNewPrivileges": true,
        },
        "root": { "path": "rootfs", "readonly": true },
        "hostname": launch.id,
        "mounts": mounts,
        "linux": {
            // The host's network: the instance listens on its port there.
            "namespaces": [
                { "type": "pid" }, { "type": "mount" }, { "type": "ipc" }, { "type": "uts" },
            ],
            // Always set: without it libcontainer names cgroups
            // `:youki:ID` at each hierarchy's root.
            "cgroupsPath": format!("/{}", launch.cgroup),
            "resources": resources,
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    }))
}

impl Oci {
    /// Write instance `launch.id`'s bundle: `config.json` and the root of
    /// mount points.
    fn write_bundle(&self, launch: &Launch) -> Result<(), RuntimeError> {
        let io = |what: &Path| {
            let what = what.to_owned();
            move |e: std::io::Error| {
                RuntimeError::Spawn(std::io::Error::other(format!(
                    "oci bundle {}: {e}",
                    what.display()
                )))
            }
        };
        let bundle = self.bundle(&launch.id);
        // A bundle left by an earlier start of the same id goes first.
        let _ = std::fs::remove_dir_all(&bundle);
        let root = bundle.join("rootfs");
        std::fs::create_dir_all(&root).map_err(io(&root))?;
        std::fs::create_dir_all(self.state()).map_err(io(&self.state()))?;
        let entries = entries(launch, &OWN_DIRS);
        for e in &entries {
            match e {
                Entry::Link { inside, target } => {
                    let at = root.join(inside.trim_start_matches('/'));
                    if let Some(parent) = at.parent() {
                        std::fs::create_dir_all(parent).map_err(io(parent))?;
                    }
                    symlink(target, &at).map_err(io(&at))?;
                }
                Entry::Bind { inside, dir, .. } => {
                    let at = root.join(inside.trim_start_matches('/'));
                    if *dir {
                        std::fs::create_dir_all(&at).map_err(io(&at))?;
                    } else {
                        if let Some(parent) = at.parent() {
                            std::fs::create_dir_all(parent).map_err(io(parent))?;
                        }
                        std::fs::write(&at, b"").map_err(io(&at))?;
                    }
                }
            }
        }
        for d in OWN_DIRS {
            std::fs::create_dir_all(root.join(d)).map_err(io(&root.join(d)))?;
        }
        super::give_volumes(launch)?;
        let host = Host {
            swap_accounting: swap_accounting(),
        };
        let config = config(launch, &entries, host)?;
        let path = bundle.join("config.json");
        let text = serde_json::to_vec_pretty(&config)
            .map_err(|e| RuntimeError::Spawn(std::io::Error::other(e)))?;
        std::fs::write(&path, text).map_err(io(&path))?;
        Ok(())
    }
}

/// Whether this host's memory controller accounts swap.
fn swap_accounting() -> bool {
    let root = Path::new("/sys/fs/cgroup");
    // v2: `memory.swap.max` exists in every non-root cgroup when it does.
    root.join("memory/memory.memsw.limit_in_bytes").exists()
        || (root.join("cgroup.controllers").exists()
            && std::fs::read_to_string("/proc/swaps").is_ok_and(|s| s.lines().count() > 1))
}

impl HostRuntime for Oci {
    const KIND: RuntimeKind = RuntimeKind::Oci;
    const READ_ONLY: bool = true;
    const LAUNCHER: bool = true;
    const OWN_CGROUP: bool = true;

    fn command(&self, launch: &Launch, _argv: &[String]) -> Command {
        // The agent's own binary, whatever its path now (an upgrade may
        // have replaced it), under a stable name.
        let mut c = Command::new("/proc/self/exe");
        c.arg0("kiln")
            .args(self.shim_args(launch))
            .env_clear()
            .process_group(0);
        c
    }

    fn prepare(&self, launch: &Launch) -> Result<(), RuntimeError> {
        self.write_bundle(launch)
    }

    fn clean_up(&self, launch: &Launch) {
        // What the shim deletes itself when it ends normally; left over
        // when it was killed.
        let _ = std::fs::remove_dir_all(self.bundle(&launch.id));
        let _ = std::fs::remove_dir_all(self.state().join(&launch.id));
    }

    fn launched(&self, launch: &Launch) -> kiln_core::drift::Launched {
        use std::os::unix::ffi::OsStrExt;
        kiln_core::drift::Launched {
            argv: std::iter::once(b"kiln".to_vec())
                .chain(self.shim_args(launch).iter().map(|a| a.as_bytes().to_vec()))
                .collect(),
            env: Default::default(),
        }
    }

    /// `argv` inside running instance `pid` (the shim): nsenter joins the
    /// namespaces of its container (mount, pid, ipc, uts), takes its root
    /// and workdir, runs as its user with its environment, under its
    /// seccomp filter (but `setns`, which nsenter needs).
    fn enter(&self, launch: &Launch, pid: u32, argv: &[String]) -> Result<Command, RuntimeError> {
        let target = app(pid).ok_or(RuntimeError::NoApp(pid))?;
        super::nsenter(
            launch,
            target,
            &["--mount", "--pid", "--ipc", "--uts"],
            true,
            argv,
        )
    }

    fn app(child: u32) -> Option<u32> {
        app(child)
    }
}

/// The app below shim `shim`: the child of the container's pid 1 (the
/// shim's child in another pid namespace: while libcontainer sets up, the
/// shim also has an intermediate child in its own).
fn app(shim: u32) -> Option<u32> {
    let ns = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok();
    let own = ns(shim)?;
    let init = children(shim)
        .into_iter()
        .find(|c| ns(*c).is_some_and(|n| n != own))?;
    children(init).first().copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::user::Identity;

    fn launch() -> Launch {
        Launch {
            id: "web-1".to_owned(),
            rootfs: PathBuf::from("/nonexistent"),
            argv: vec!["/app/server".to_owned(), "--port".to_owned()],
            env: [("PATH", "/bin"), ("PORT", "8080")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            workdir: "/app".to_owned(),
            volumes: vec![(
                "data".to_owned(),
                PathBuf::from("/home/k/volumes/web/data"),
                "/data".to_owned(),
            )],
            user: Some(Identity {
                uid: 1000,
                gid: 1001,
            }),
            limits: kiln_core::resources::Resources {
                cpu_millis: 500,
                memory_bytes: 64 << 20,
                pids: 64,
            },
            cgroup: "kiln/s/web-1".to_owned(),
            self_contained: true,
            stdin: false,
        }
    }

    const HOST: Host = Host {
        swap_accounting: true,
    };

    #[test]
    fn the_config_is_a_valid_oci_spec_of_the_launch() {
        let entries = vec![Entry::Bind {
            inside: "/app".to_owned(),
            host: PathBuf::from("/store/tree/app"),
            dir: true,
        }];
        let c = config(&launch(), &entries, HOST).unwrap();
        // What libcontainer reads it as.
        let spec: oci_spec::runtime::Spec = serde_json::from_value(c.clone()).unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.args().as_ref().unwrap(), &launch().argv);
        assert_eq!(
            p.env().as_ref().unwrap(),
            &["PATH=/bin".to_owned(), "PORT=8080".to_owned()]
        );
        assert_eq!(p.cwd(), Path::new("/app"));
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 1001));
        assert_eq!(p.no_new_privileges(), Some(true));
        let caps = p.capabilities().as_ref().unwrap();
        assert!(caps.bounding().as_ref().unwrap().is_empty());
        assert!(caps.effective().as_ref().unwrap().is_empty());
        assert!(caps.permitted().as_ref().unwrap().is_empty());
        let root = spec.root().as_ref().unwrap();
        assert_eq!(root.readonly(), Some(true));
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/kiln/s/web-1"))
        );
        let kinds: Vec<String> = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| format!("{:?}", n.typ()))
            .collect();
        assert_eq!(kinds, ["Pid", "Mount", "Ipc", "Uts"], "host network");
        let r = linux.resources().as_ref().unwrap();
        let m = r.memory().as_ref().unwrap();
        assert_eq!((m.limit(), m.swap()), (Some(64 << 20), Some(64 << 20)));
        let cpu = r.cpu().as_ref().unwrap();
        assert_eq!((cpu.quota(), cpu.period()), (Some(50_000), Some(100_000)));
        assert_eq!(r.pids().as_ref().map(|p| p.limit()), Some(64));
        let mounts = spec.mounts().as_ref().unwrap();
        let find = |d: &str| {
            mounts
                .iter()
                .find(|m| m.destination() == Path::new(d))
                .unwrap_or_else(|| panic!("no mount at {d}"))
        };
        let app = find("/app");
        assert_eq!(app.source().as_deref(), Some(Path::new("/store/tree/app")));
        assert!(app.options().as_ref().unwrap().contains(&"ro".to_owned()));
        let data = find("/data");
        assert!(data.options().as_ref().unwrap().contains(&"rw".to_owned()));
        assert_eq!(find("/tmp").typ().as_deref(), Some("tmpfs"));
        assert_eq!(find("/proc").typ().as_deref(), Some("proc"));
        assert!(
            find("/sys")
                .options()
                .as_ref()
                .unwrap()
                .contains(&"ro".to_owned())
        );
    }

    #[test]
    fn no_limit_is_set_when_none_is_declared_and_swap_only_where_accounted() {
        let mut l = launch();
        l.limits = Default::default();
        let c = config(&l, &[], HOST).unwrap();
        assert!(c["linux"]["resources"].get("memory").is_none());
        assert!(c["linux"]["resources"].get("cpu").is_none());
        assert!(c["linux"]["resources"].get("pids").is_none());
        let mut l = launch();
        l.limits.cpu_millis = 0;
        let c = config(
            &l,
            &[],
            Host {
                swap_accounting: false,
            },
        )
        .unwrap();
        assert_eq!(
            c["linux"]["resources"]["memory"],
            json!({ "limit": 64 << 20 })
        );
        assert!(c["linux"]["resources"].get("cpu").is_none());
    }

    #[test]
    fn an_agent_that_is_not_root_cannot_run_containers() {
        let mut l = launch();
        l.user = None;
        assert!(matches!(
            config(&l, &[], HOST),
            Err(RuntimeError::OciNeedsRoot)
        ));
    }

    #[test]
    fn the_root_holds_the_image_entries_and_the_host_userland_only_when_borrowed() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path();
        std::fs::create_dir_all(tree.join("app")).unwrap();
        std::fs::create_dir_all(tree.join("proc")).unwrap();
        std::fs::write(tree.join("VERSION"), b"1").unwrap();
        symlink("app", tree.join("srv")).unwrap();
        let mut l = launch();
        l.rootfs = tree.to_owned();
        let own = entries(&l, &OWN_DIRS);
        assert_eq!(
            own,
            vec![
                Entry::Bind {
                    inside: "/VERSION".to_owned(),
                    host: tree.join("VERSION"),
                    dir: false,
                },
                Entry::Bind {
                    inside: "/app".to_owned(),
                    host: tree.join("app"),
                    dir: true,
                },
                Entry::Link {
                    inside: "/srv".to_owned(),
                    target: PathBuf::from("app"),
                },
            ],
            "the image's /proc is never bound over the container's"
        );
        l.self_contained = false;
        let borrowed = entries(&l, &OWN_DIRS);
        assert!(borrowed.len() > own.len());
        assert!(borrowed.iter().any(|e| matches!(e,
            Entry::Bind { inside, .. } | Entry::Link { inside, .. } if inside == "/usr")));
    }
}
