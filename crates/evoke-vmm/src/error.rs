//! The crate's errors. Each message is one lower-case line naming the thing
//! involved and, where the user can act, what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("/dev/kvm does not exist: this host offers no KVM; load kvm_intel or kvm_amd on a host with VT-x/AMD-V (or enable nested virtualisation)")]
    KvmMissing,
    #[error("no permission to open /dev/kvm: run as root or add the user to the kvm group")]
    KvmPermission,
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(#[source] std::io::Error),
    #[error("this host's KVM is PVM (kvm_pvm is loaded): it has no VT-x/AMD-V, so an unmodified Linux guest fails in instruction emulation; run the microvm tier on a host with hardware virtualisation (VT-x or AMD-V)")]
    PvmHost,
    #[error("kvm {op} failed: {source}")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest kernel {path} not found: run scripts/setup, which installs linux-image-cloud-amd64 (kernel at /boot/vmlinuz-*-cloud-amd64)")]
    KernelMissing { path: PathBuf },
    #[error("cannot load guest kernel {path}: {reason}")]
    KernelLoad { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest memory of {size} bytes: {reason}")]
    Memory { size: u64, reason: String },
    #[error("vm setup: {0}")]
    Setup(&'static str),
    #[error("invalid vm config: {0}")]
    Config(String),
    #[error("cannot create {what}: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot spawn vcpu thread {index}: {source}")]
    SpawnVcpu {
        index: u8,
        #[source]
        source: std::io::Error,
    },
    #[error("vcpu {index}: {reason}")]
    Vcpu { index: u8, reason: String },
    #[error("tap {name}: {reason}")]
    Tap { name: String, reason: String },
    #[error("seccomp filter: {0}")]
    Seccomp(String),
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
