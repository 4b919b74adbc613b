//! The VMM as its own process (`evoke vmm`): it enters its cgroup, wires the
//! serial console to stderr and the agent channel to stdin/stdout, runs the
//! VM and exits. A separate process per VM gives each VM its own cgroup and
//! seccomp filter, and lets a crash or kill of one VMM touch nothing else.
//!
//! With [`ProcessConfig::forward_signals`] (the tier sets it), stdin carries
//! agent frames and the signals a user sends the VMM (`evoke stop`, `evoke
//! kill`, a terminal's ^C) reach the workload inside the guest instead of
//! killing the VM: a relay thread passes stdin's frames on whole and puts a
//! [`Frame::Signal`] between them for each signal caught. The VM ends when
//! the workload does; SIGKILL still ends the VMM at once.
//!
//! The relay is [`crate::agent_mux`], which also carries exec sessions from
//! [`ProcessConfig::exec_socket`]. It holds everything back until the guest
//! has written to the agent channel (the agent's Ready frame). Until the
//! agent has opened its end and made the tty raw, the guest kernel would
//! treat input as a terminal's cooked input and echo it back into the host's
//! frame stream.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::agent_mux::{self, GuestOutput, Mailbox, Mux};

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
    /// Relay catchable termination and user signals to the workload as
    /// agent frames (stdin must then carry frames too).
    #[serde(default)]
    pub forward_signals: bool,
    /// With `forward_signals`: take exec sessions on a Unix socket here
    /// (see [`crate::agent_mux`]).
    #[serde(default)]
    pub exec_socket: Option<PathBuf>,
}

/// The signals the relay forwards; the rest keep their default action.
const FORWARDED: [Signal; 7] = [
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGTERM,
    Signal::SIGWINCH,
];

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
    let stdin = dup(std::io::stdin(), "agent stdin")?;
    let stdout = dup(std::io::stdout(), "agent stdout")?;
    let (agent_in, agent_out, relay): (File, Box<dyn Write + Send>, _) = if cfg.forward_signals {
        let guest_spoke = Arc::new(AtomicBool::new(false));
        let mailbox = Mailbox::new().map_err(|source| VmmError::Sys {
            what: "agent mux eventfd",
            source,
        })?;
        let listener = match &cfg.exec_socket {
            Some(p) => Some(
                agent_mux::bind_exec_socket(p).map_err(|source| VmmError::Sys {
                    what: "exec socket",
                    source,
                })?,
            ),
            None => None,
        };
        let (rx, relay) = start_relay(
            stdin,
            cfg.vm.seccomp,
            guest_spoke.clone(),
            mailbox.clone(),
            listener,
        )?;
        let out = GuestOutput::new(stdout, mailbox, guest_spoke);
        (rx, Box::new(out), Some(relay))
    } else {
        (stdin, Box::new(stdout), None)
    };
    let io = VmIo {
        serial_out: serial,
        agent_out,
        agent_in: Some(agent_in),
    };
    let reason = Vm::new(&cfg.vm, io).and_then(|vm| {
        // Set-up is done: unmap the start-up code and data that stays
        // resident otherwise (most of the VMM's memory overhead).
        match crate::residency::drop_clean_file_pages() {
            Ok(kib) => tracing::debug!(kib, "dropped start-up pages"),
            Err(e) => tracing::debug!(error = %e, "cannot read /proc/self/smaps"),
        }
        vm.run()
    });
    // The VM has dropped the relay's pipe, which ends the relay.
    if let Some(t) = relay {
        if t.join().is_err() {
            tracing::error!("the signal relay thread panicked");
        }
    }
    if let Some(cg) = cgroup {
        tracing::debug!(dirs = ?cg.dirs(), "leaving cgroup for the parent to remove");
    }
    reason
}

/// Blocks [`FORWARDED`] in this thread (so in every thread started after
/// it) and starts the relay from `stdin`, those signals and the exec
/// sessions to the returned pipe, which becomes the VM's agent input.
fn start_relay(
    stdin: File,
    seccomp: bool,
    guest_spoke: Arc<AtomicBool>,
    mailbox: Arc<Mailbox>,
    listener: Option<std::os::unix::net::UnixListener>,
) -> Result<(File, std::thread::JoinHandle<()>), VmmError> {
    let sys = |what| {
        move |e: nix::Error| VmmError::Sys {
            what,
            source: e.into(),
        }
    };
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.thread_block().map_err(sys("signal mask"))?;
    let sigfd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(sys("signalfd"))?;
    let (rx, tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("relay pipe"))?;
    let filter = if seccomp {
        Some(crate::seccomp::vmm_filter()?)
    } else {
        None
    };
    let t = std::thread::Builder::new()
        .name("signal-relay".into())
        .stack_size(RELAY_STACK)
        .spawn(move || {
            if let Some(f) = filter {
                if let Err(e) = crate::seccomp::apply(&f) {
                    tracing::error!(error = %e, "signal relay without its seccomp filter; stopping it");
                    return;
                }
            }
            Mux {
                input: stdin,
                sigfd,
                out: File::from(tx),
                spoke: guest_spoke,
                mailbox,
                listener,
            }
            .run();
        })
        .map_err(|source| VmmError::Sys {
            what: "signal relay thread",
            source,
        })?;
    Ok((File::from(rx), t))
}

/// The relay needs little stack: small buffers and no recursion.
const RELAY_STACK: usize = 64 << 10;

/// The process exit code for a VM exit: 0 for a guest-initiated reset or
/// power-off, 1 for a crash or vCPU failure, 143 when stopped by the host.
pub fn exit_code(reason: &ExitReason) -> u8 {
    match reason {
        ExitReason::Reset | ExitReason::PowerOff => 0,
        ExitReason::Stopped => 143,
        ExitReason::Crash | ExitReason::VcpuError(_) => 1,
    }
}
