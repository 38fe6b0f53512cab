//! The seccomp filter every sandboxed instance runs under: the system
//! calls an application never needs and an attacker inside it would want
//! (changing mounts, tracing other processes, loading kernel code or BPF,
//! the kernel keyring, namespaces, rebooting, the clock) fail with `EPERM`;
//! everything else is allowed, as Docker's default profile does in spirit.
//! Compiled to classic BPF by `seccompiler` (Firecracker's), handed to
//! bubblewrap (`--seccomp FD`), which installs it after its own setup and
//! before the app runs, with `no_new_privs`.

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
    let arch = std::env::consts::ARCH;
    let err = |reason: String| SeccompError { arch, reason };
    let target = TargetArch::try_from(arch).map_err(|e| err(format!("{e:?}")))?;
    let rules = DENIED
        .iter()
        .map(|(_, nr)| (*nr, Vec::new()))
        .collect::<BTreeMap<_, _>>();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        target,
    )
    .map_err(|e| err(e.to_string()))?;
    let bpf: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(e.to_string()))?;
    let mut out = Vec::with_capacity(bpf.len() * 8);
    for i in bpf {
        out.extend_from_slice(&i.code.to_ne_bytes());
        out.push(i.jt);
        out.push(i.jf);
        out.extend_from_slice(&i.k.to_ne_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
