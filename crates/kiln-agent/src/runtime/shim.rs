//! `kiln __oci-shim BUNDLE STATE ID`: the process between the agent and
//! an OCI container ([`super::oci`]). The kiln binary becomes it before
//! anything else runs (no async runtime, no thread: libcontainer forks
//! inside its caller). It creates container `ID` from `BUNDLE` with its
//! state under `STATE`, starts it, waits for its init (a child of the
//! shim), removes what is left of it and exits as the container did. Its stdio is the
//! container's: the agent's pipes.
//!
//! The container's workload is started by [`Exec`], kiln's executor: it
//! installs kiln's seccomp filter as the very last step before the app
//! runs (after libcontainer set `no_new_privs` and dropped the
//! capabilities), so seccomp is enforced without libseccomp; the app is
//! pid 1's child, pid 1 a small reaper that passes signals on.

use std::ffi::{CString, OsString};
use std::path::{Path, PathBuf};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use oci_spec::runtime::Spec;
use seccompiler::BpfProgram;

/// The executor of kiln's containers: the workload under kiln's seccomp
/// filter.
#[derive(Clone)]
struct Exec {
    filter: BpfProgram,
}

impl Executor for Exec {
    /// Runs as the container's pid 1, set up: installs the filter, then
    /// forks the app and stays as its reaper ([`reap`]), as bubblewrap's
    /// pid 1 and tini do: an app that is pid 1 gets no default action for
    /// SIGTERM (it would ignore the stop signal) and would have to reap
    /// orphans itself.
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let args = spec
            .process()
            .as_ref()
            .and_then(|p| p.args().as_ref())
            .filter(|a| !a.is_empty())
            .ok_or(ExecutorError::InvalidArg)?;
        let argv: Vec<CString> = args
            .iter()
            .map(|a| CString::new(a.as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|_| ExecutorError::InvalidArg)?;
        let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        #[allow(unsafe_code)]
        // SAFETY: this process is single-threaded (the container's init,
        // set up by libcontainer), so fork is sound and the child may run
        // anything before it execs. `install` makes two system calls with
        // values alive through them; the signal sets are locals the calls
        // fill or read; `ptrs` is a NULL-terminated array of pointers into
        // `argv`, alive through `execvp`.
        unsafe {
            super::seccomp::install(&self.filter).map_err(|e| {
                ExecutorError::Other(format!("cannot install the seccomp filter: {e}"))
            })?;
            // Every signal's action back to its default: this process is a
            // Rust program's (which ignores SIGPIPE) started by the agent
            // (which ignores others), and an ignored signal stays ignored
            // across exec — the app would never die of a broken pipe.
            for sig in 1..libc::SIGRTMAX() {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            // Every signal waits for the reaper, which passes it on; the
            // app gets its own mask back before it runs.
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut before: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::sigprocmask(libc::SIG_BLOCK, &all, &mut before);
            match libc::fork() {
                -1 => Err(ExecutorError::Other(format!(
                    "cannot start the app: {}",
                    std::io::Error::last_os_error()
                ))),
                0 => {
                    libc::sigprocmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
                    libc::execvp(ptrs[0], ptrs.as_ptr());
                    eprintln!(
                        "kiln: oci runtime: cannot run {}: {}",
                        args[0],
                        std::io::Error::last_os_error()
                    );
                    libc::_exit(127)
                }
                app => reap(app, &all),
            }
        }
    }

    fn validate(&self, _spec: &Spec) -> Result<(), ExecutorValidationError> {
        // A missing program is said by execvp, in the instance's log.
        Ok(())
    }
}

/// The container's pid 1 once the app runs: passes every signal it gets
/// on to `app`, reaps whatever ends, and exits as `app` did.
///
/// # Safety
/// Single-threaded, with the signals of `all` blocked.
#[allow(unsafe_code)]
unsafe fn reap(app: libc::pid_t, all: &libc::sigset_t) -> ! {
    loop {
        // SAFETY: a zeroed siginfo_t is a valid buffer for the kernel;
        // `all` and `info` are valid for the call.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let sig = unsafe { libc::sigwaitinfo(all, &mut info) };
        if sig < 0 {
            continue;
        }
        if sig != libc::SIGCHLD {
            // SAFETY: kill takes plain values.
            unsafe { libc::kill(app, sig) };
            continue;
        }
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes the status into a local.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if pid == app {
                let code = if libc::WIFSIGNALED(status) {
                    128 + libc::WTERMSIG(status)
                } else {
                    libc::WEXITSTATUS(status)
                };
                // SAFETY: ends this process; nothing is left to unwind.
                unsafe { libc::_exit(code) };
            }
        }
    }
}

/// Why the shim could not run the container.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("usage: kiln __oci-shim BUNDLE STATE ID")]
    Usage,
    #[error("the seccomp filter: {0}")]
    Seccomp(#[from] super::seccomp::SeccompError),
    #[error("container {id}: {source}")]
    Container {
        id: String,
        source: libcontainer::error::LibcontainerError,
    },
}

/// Run the shim with the arguments after `__oci-shim`; its exit status.
/// The caller must be single-threaded.
pub fn main(args: &[OsString]) -> i32 {
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: oci runtime: {e}");
            // As runc and youki: the runtime itself failed.
            125
        }
    }
}

fn run(args: &[OsString]) -> Result<i32, ShimError> {
    let [bundle, state, id] = args else {
        return Err(ShimError::Usage);
    };
    let id = id.to_str().ok_or(ShimError::Usage)?.to_owned();
    let err = |source| ShimError::Container {
        id: id.clone(),
        source,
    };
    let filter = super::seccomp::filter()?;
    let mut container = ContainerBuilder::new(id.clone(), SyscallType::default())
        .with_root_path(PathBuf::from(state))
        .map_err(err)?
        .with_executor(Exec { filter })
        .validate_id()
        .map_err(err)?
        .as_init(PathBuf::from(bundle))
        .with_systemd(false)
        .with_detach(true)
        .build()
        .map_err(err)?;
    if let Err(e) = container.start() {
        let _ = container.delete(true);
        return Err(err(e));
    }
    let init = container.pid().map_or(0, |p| p.as_raw());
    let cgroup = spec_cgroup(Path::new(bundle));
    let code = wait_for(init);
    // Its init reaped, the container is gone (its pid namespace ended with
    // it): what libcontainer's delete would remove goes at once — the
    // cgroup in every hierarchy, the state, the bundle — so the agent
    // learns of the end without delete's re-reading of the mount table and
    // its retries with sleeps (measured: 3-10 ms of every self-heal). The
    // agent's clean-up removes the same again if this did not.
    if let Some(cgroup) = cgroup {
        super::cgroup::host().remove(&cgroup);
    }
    let _ = std::fs::remove_dir_all(Path::new(state).join(&id));
    let _ = std::fs::remove_dir_all(bundle);
    Ok(code)
}

/// The cgroup the bundle's `config.json` names (`kiln/SCOPE/ID`).
fn spec_cgroup(bundle: &Path) -> Option<String> {
    let spec = Spec::load(bundle.join("config.json")).ok()?;
    let path = spec.linux().as_ref()?.cgroups_path().clone()?;
    Some(path.to_string_lossy().trim_start_matches('/').to_owned())
}

/// Reap children until `init` ends; its exit code (128 + the signal that
/// ended it, as a shell says).
fn wait_for(init: i32) -> i32 {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a local it is given.
        #[allow(unsafe_code)]
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // No child left: the init is gone (reaped elsewhere).
            return 255;
        }
        if pid == init {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status);
            }
            if libc::WIFSIGNALED(status) {
                return 128 + libc::WTERMSIG(status);
            }
        }
    }
}
