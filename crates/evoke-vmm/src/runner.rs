//! The VMM as its own process (`evoke vmm`): it enters its cgroup, wires the
//! serial console to stderr and the agent channel to stdin/stdout, runs the
//! VM and exits. A separate process per VM gives each VM its own cgroup and
//! seccomp filter, and lets a crash or kill of one VMM touch nothing else.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::Path;

use crate::cgroup::{CgroupSpec, VmmCgroup};
use crate::devices::sink::CappedWriter;
use crate::error::VmmError;
use crate::vm::{ExitReason, Payload, Vm, VmConfig, VmIo};

/// Everything `evoke vmm` needs; the tier writes it as JSON.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ProcessConfig {
    pub vm: VmConfig,
    /// Confine the VMM process to this cgroup before guest memory exists.
    #[serde(default)]
    pub cgroup: Option<CgroupSpec>,
    /// Most bytes of serial console output passed to stderr; the rest is
    /// dropped so a flooding guest cannot fill a log.
    #[serde(default = "default_console_cap")]
    pub console_cap: u64,
}

fn default_console_cap() -> u64 {
    16 << 20
}

/// Set to boot a Linux payload on a PVM host anyway (it will fail there;
/// useful only to watch how).
pub const ALLOW_PVM_ENV: &str = "EVOKE_VMM_ALLOW_PVM";

fn dup(fd: impl AsFd, what: &'static str) -> Result<File, VmmError> {
    fd.as_fd()
        .try_clone_to_owned()
        .map(File::from)
        .map_err(|source| VmmError::Sys { what, source })
}

/// Runs one VM in this process, with the agent channel on stdin/stdout and
/// the serial console on stderr.
pub fn run_process(cfg: &ProcessConfig) -> Result<ExitReason, VmmError> {
    if matches!(cfg.vm.payload, Payload::Linux { .. })
        && crate::kvm_check::is_pvm_host()
        && std::env::var_os(ALLOW_PVM_ENV).is_none()
    {
        return Err(VmmError::PvmHost);
    }
    let mut cgroup = None;
    if let Some(spec) = &cfg.cgroup {
        match VmmCgroup::create(spec, Path::new("/sys/fs/cgroup"))
            .and_then(|cg| cg.add_pid(std::process::id()).map(|()| cg))
        {
            Ok(cg) => cgroup = Some(cg),
            // A host without cgroups still runs VMs; say what is missing.
            Err(e) => tracing::warn!(error = %e, "running the vmm without its own cgroup"),
        }
    }
    let serial: Box<dyn Write + Send> = Box::new(CappedWriter::new(
        dup(std::io::stderr(), "console stderr")?,
        cfg.console_cap,
    ));
    let io = VmIo {
        serial_out: serial,
        agent_out: Box::new(dup(std::io::stdout(), "agent stdout")?),
        agent_in: Some(dup(std::io::stdin(), "agent stdin")?),
    };
    let vm = Vm::new(&cfg.vm, io)?;
    let reason = vm.run();
    if let Some(cg) = cgroup {
        tracing::debug!(dirs = ?cg.dirs(), "leaving cgroup for the parent to remove");
    }
    reason
}

/// The process exit code for a VM exit: 0 for a guest-initiated reset or
/// power-off, 1 for a crash or vCPU failure, 143 when stopped by the host.
pub fn exit_code(reason: &ExitReason) -> u8 {
    match reason {
        ExitReason::Reset | ExitReason::PowerOff => 0,
        ExitReason::Stopped => 143,
        ExitReason::Crash | ExitReason::VcpuError(_) => 1,
    }
}
