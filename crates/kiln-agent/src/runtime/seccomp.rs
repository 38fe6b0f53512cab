//! The seccomp filter every sandboxed instance runs under: the system
//! calls an application never needs and an attacker inside it would want
//! (changing mounts, tracing other processes, loading kernel code or BPF,
//! the kernel keyring, namespaces, rebooting, the clock) fail with `EPERM`;
//! everything else is allowed, as Docker's default profile does in spirit.
//! Compiled to classic BPF by `seccompiler` (Firecracker's), handed to
//! bubblewrap (`--seccomp FD`), which installs it after its own setup and
//! before the app runs, with `no_new_privs`. An exec probe gets the same
//! filter but `setns` ([`probe_filter`]), installed before `nsenter` runs.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// The denied system calls, by name (for the README and errors) and number.
pub const DENIED: &[(&str, i64)] = &[
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("quotactl", libc::SYS_quotactl),
    ("syslog", libc::SYS_syslog),
    ("vhangup", libc::SYS_vhangup),
];

#[derive(Debug, thiserror::Error)]
#[error("the seccomp filter cannot be built for {arch}: {reason}")]
pub struct SeccompError {
    arch: &'static str,
    reason: String,
}

/// The filter as bubblewrap reads it: `struct sock_filter` after
/// `struct sock_filter`, in the machine's byte order.
pub fn program() -> Result<Vec<u8>, SeccompError> {
    let bpf = compile(DENIED.iter().map(|(_, nr)| *nr))?;
    let mut out = Vec::with_capacity(bpf.len() * 8);
    for i in bpf {
        out.extend_from_slice(&i.code.to_ne_bytes());
        out.push(i.jt);
        out.push(i.jf);
        out.extend_from_slice(&i.k.to_ne_bytes());
    }
    Ok(out)
}

/// The instance's filter, compiled (the OCI runtime's executor installs it
/// itself).
pub fn filter() -> Result<BpfProgram, SeccompError> {
    compile(DENIED.iter().map(|(_, nr)| *nr))
}

/// The filter an exec probe runs under: the instance's, but `setns`,
/// which `nsenter` calls after the filter is installed to join the
/// instance (the probe itself cannot use it: joining a namespace takes
/// `CAP_SYS_ADMIN` over it, which a probe as the instance's user has not,
/// and a probe as root has only in the instance's own user namespace).
pub fn probe_filter() -> Result<BpfProgram, SeccompError> {
    compile(
        DENIED
            .iter()
            .filter(|(name, _)| *name != "setns")
            .map(|(_, nr)| *nr),
    )
}

/// Install `filter` on the calling process, with `no_new_privs`, as the
/// last step before it execs.
///
/// # Safety
/// Meant for a forked child before exec (`pre_exec`): it makes two system
/// calls and allocates nothing.
#[allow(unsafe_code)]
pub unsafe fn install(filter: &BpfProgram) -> std::io::Result<()> {
    // SAFETY: prctl and seccomp take plain values and a pointer to a
    // `sock_fprog` that lives through the call; seccompiler's
    // `sock_filter` has the kernel's layout (`#[repr(C)]`, as `libc`'s).
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr() as *mut libc::sock_filter,
        };
        if libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &prog as *const libc::sock_fprog,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Have `cmd` (an exec probe's `nsenter`) run under [`probe_filter`], with
/// `no_new_privs`, from before it runs: the command it enters with
/// inherits it.
pub fn confine_probe(cmd: &mut tokio::process::Command) -> Result<(), SeccompError> {
    let filter = probe_filter()?;
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and makes
    // only the two system calls of `install`, allocating nothing; `filter`
    // is moved into it and lives as long as the command.
    unsafe {
        cmd.pre_exec(move || install(&filter));
    }
    Ok(())
}

/// The calls `denied` fail with `EPERM`, the rest are allowed.
fn compile(denied: impl Iterator<Item = i64>) -> Result<BpfProgram, SeccompError> {
    let arch = std::env::consts::ARCH;
    let err = |reason: String| SeccompError { arch, reason };
    let target = TargetArch::try_from(arch).map_err(|e| err(format!("{e:?}")))?;
    let rules = denied
        .map(|nr| (nr, Vec::new()))
        .collect::<BTreeMap<_, _>>();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        target,
    )
    .map_err(|e| err(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_filter_allows_setns_only() {
        let probe = probe_filter().unwrap();
        let ks: Vec<u32> = probe.iter().map(|i| i.k).collect();
        for (name, nr) in DENIED {
            assert_eq!(ks.contains(&(*nr as u32)), *name != "setns", "{name}");
        }
    }

    #[test]
    fn the_program_is_whole_instructions_and_names_every_call_once() {
        let p = program().unwrap();
        assert!(!p.is_empty());
        assert_eq!(p.len() % 8, 0);
        let mut names: Vec<_> = DENIED.iter().map(|(n, _)| n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), DENIED.len());
        // Every denied number appears as an immediate the program compares.
        let ks: Vec<u32> = p
            .chunks(8)
            .map(|c| u32::from_ne_bytes([c[4], c[5], c[6], c[7]]))
            .collect();
        for (name, nr) in DENIED {
            assert!(ks.contains(&(*nr as u32)), "{name}");
        }
    }
}
