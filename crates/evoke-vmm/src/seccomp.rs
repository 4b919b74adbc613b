//! The seccomp allow-list every VMM thread runs under once the VM is set
//! up: I/O on fds it already holds, memory management for the allocator,
//! futexes and signals for thread coordination, and `ioctl` only for
//! `KVM_RUN` and a tap's `TUNSETOFFLOAD` (see [`crate::devices::net`]).
//! Anything else kills the process: a guest that subverts a device model
//! still cannot open files, spawn processes or use the network.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::error::VmmError;

/// `_IO(KVMIO, 0x80)`.
const KVM_RUN: u64 = 0xae80;
/// `_IOW('T', 208, unsigned int)`: a virtio-net device sets its tap's
/// offloads to what the guest driver accepted, once the driver is up.
const TUNSETOFFLOAD: u64 = 0x4004_54d0;

const ALLOWED: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // The agent mux takes exec connections on the VM's own Unix socket,
    // bound before the filter; no socket can be made or bound after it.
    libc::SYS_accept4,
];

/// Builds the VMM thread filter.
pub fn vmm_filter() -> Result<BpfProgram, VmmError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|s| (*s, Vec::new())).collect();
    let kvm_run = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, KVM_RUN)
        .map_err(|e| VmmError::Seccomp(e.to_string()))?;
    let tun_offload =
        SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, TUNSETOFFLOAD)
            .map_err(|e| VmmError::Seccomp(e.to_string()))?;
    rules.insert(
        libc::SYS_ioctl,
        vec![
            SeccompRule::new(vec![kvm_run]).map_err(|e| VmmError::Seccomp(e.to_string()))?,
            SeccompRule::new(vec![tun_offload]).map_err(|e| VmmError::Seccomp(e.to_string()))?,
        ],
    );
    // Debug builds of std check an fd's validity (F_GETFD) when dropping it.
    let getfd = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::F_GETFD as u64,
    )
    .map_err(|e| VmmError::Seccomp(e.to_string()))?;
    rules.insert(
        libc::SYS_fcntl,
        vec![SeccompRule::new(vec![getfd]).map_err(|e| VmmError::Seccomp(e.to_string()))?],
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| VmmError::Seccomp(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| VmmError::Seccomp(e.to_string()))
}

/// Installs the filter on the calling thread (and sets no_new_privs).
pub fn apply(filter: &BpfProgram) -> Result<(), VmmError> {
    seccompiler::apply_filter(filter).map_err(|e| VmmError::Seccomp(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    const PROBE: &str = "EVOKE_VMM_SECCOMP_PROBE";

    #[test]
    fn a_filtered_thread_may_write_but_opening_a_file_kills_the_process() {
        if std::env::var_os(PROBE).is_some() {
            // Child: filter this thread, show writes still work, then try
            // something a VMM thread never needs.
            apply(&vmm_filter().unwrap()).unwrap();
            println!("filtered and still writing");
            let _ = std::fs::File::open("/etc/hostname");
            std::process::exit(0);
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "seccomp::tests::a_filtered_thread_may_write_but_opening_a_file_kills_the_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(PROBE, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("filtered and still writing"), "{stdout}");
        assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{:?}", out.status);
    }
}
