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
//! The relay holds everything back until the guest has written to the agent
//! channel (the agent's Ready frame). Until the agent has opened its end and
//! made the tty raw, the guest kernel would treat input as a terminal's
//! cooked input and echo it back into the host's frame stream.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use evoke_guest::proto::{self, Frame};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

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
        let (rx, relay) = start_relay(stdin, cfg.vm.seccomp, guest_spoke.clone())?;
        let out = NotesFirstWrite {
            inner: stdout,
            flag: guest_spoke,
        };
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
/// it) and starts the relay from `stdin` and those signals to the returned
/// pipe, which becomes the VM's agent input.
fn start_relay(
    stdin: File,
    seccomp: bool,
    guest_spoke: Arc<AtomicBool>,
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
            relay(stdin, &sigfd, File::from(tx), &guest_spoke);
        })
        .map_err(|source| VmmError::Sys {
            what: "signal relay thread",
            source,
        })?;
    Ok((File::from(rx), t))
}

/// How often the relay looks whether the guest has written yet.
const GUEST_SPOKE_POLL: Duration = Duration::from_millis(10);

/// The relay needs little stack: one small buffer and no recursion.
const RELAY_STACK: usize = 64 << 10;

/// The agent output: notes that the guest has written (so its end of the
/// channel is open and raw).
struct NotesFirstWrite {
    inner: File,
    flag: Arc<AtomicBool>,
}

impl Write for NotesFirstWrite {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.flag.store(true, Ordering::Release);
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Copies whole frames from `input` to `out` and writes a [`Frame::Signal`]
/// for each signal read from `sigfd`, never inside another frame; nothing
/// before `guest_spoke` is set (signals wait, pending). Ends when `out`'s
/// reader is gone (the VM ended).
fn relay(mut input: File, sigfd: &SignalFd, mut out: File, guest_spoke: &AtomicBool) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16 << 10];
    let mut input_open = true;
    loop {
        let open = guest_spoke.load(Ordering::Acquire);
        let (input_ready, sig_ready, out_gone) = {
            let wanted = if open {
                PollFlags::POLLIN
            } else {
                PollFlags::empty()
            };
            let mut fds = vec![
                PollFd::new(sigfd.as_fd(), wanted),
                // No events asked: poll still reports POLLERR once the
                // read end is closed.
                PollFd::new(out.as_fd(), PollFlags::empty()),
            ];
            if input_open {
                fds.push(PollFd::new(input.as_fd(), wanted));
            }
            // Until the guest speaks, wake now and then to look again.
            let timeout = if open {
                PollTimeout::NONE
            } else {
                PollTimeout::from(GUEST_SPOKE_POLL.as_millis() as u16)
            };
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => {
                    tracing::error!(error = %e, "signal relay: poll");
                    return;
                }
            }
            let hit = |i: usize| {
                fds.get(i)
                    .and_then(|f| f.revents())
                    .is_some_and(|r| !r.is_empty())
            };
            (hit(2), hit(0), hit(1))
        };
        if out_gone {
            return;
        }
        if sig_ready {
            while let Ok(Some(info)) = sigfd.read_signal() {
                let sig = info.ssi_signo as i32;
                tracing::debug!(signal = sig, "forwarding a signal to the workload");
                if Frame::Signal(sig).write_to(&mut out).is_err() {
                    return;
                }
            }
        }
        if input_ready {
            match input.read(&mut buf) {
                Ok(0) => input_open = false,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => input_open = false,
            }
            loop {
                match proto::whole_frame_len(&pending) {
                    Ok(Some(len)) => {
                        tracing::trace!(bytes = len, "relaying a frame to the guest");
                        if out.write_all(&pending[..len]).is_err() {
                            return;
                        }
                        pending.drain(..len);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "agent input is not frames; no more input for the guest");
                        pending.clear();
                        input_open = false;
                        break;
                    }
                }
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use vmm_sys_util::signal::Killable;

    fn pipe() -> (File, File) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        (File::from(r), File::from(w))
    }

    #[test]
    fn a_signal_becomes_a_frame_between_whole_input_frames_and_the_relay_ends_with_the_vm() {
        let mut set = SigSet::empty();
        set.add(Signal::SIGUSR1);
        // Blocked here, so in the relay thread too; sent to that thread only.
        set.thread_block().unwrap();
        let sigfd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK).unwrap();
        let (in_r, mut in_w) = pipe();
        let (mut out_r, out_w) = pipe();
        let spoke = Arc::new(AtomicBool::new(false));
        let flag = spoke.clone();
        let relay_thread = std::thread::spawn(move || relay(in_r, &sigfd, out_w, &flag));

        let mut stdin_frame = Vec::new();
        Frame::Stdin(b"typed".to_vec())
            .write_to(&mut stdin_frame)
            .unwrap();
        in_w.write_all(&stdin_frame[..3]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        relay_thread.kill(libc::SIGUSR1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        // Nothing reaches the guest before it has written to the channel.
        let mut fds = [PollFd::new(out_r.as_fd(), PollFlags::POLLIN)];
        assert_eq!(poll(&mut fds, PollTimeout::from(100u8)).unwrap(), 0);
        spoke.store(true, Ordering::Release);
        std::thread::sleep(Duration::from_millis(50));
        in_w.write_all(&stdin_frame[3..]).unwrap();
        drop(in_w);

        let first = Frame::read_from(&mut out_r).unwrap();
        let second = Frame::read_from(&mut out_r).unwrap();
        assert_eq!(first, Some(Frame::Signal(libc::SIGUSR1)));
        assert_eq!(second, Some(Frame::Stdin(b"typed".to_vec())));
        // The VM side closing its end is what stops the relay.
        drop(out_r);
        for _ in 0..200 {
            if relay_thread.is_finished() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            relay_thread.is_finished(),
            "relay still running after the VM ended"
        );
    }

    #[test]
    fn input_that_is_not_frames_is_cut_off_instead_of_passed_on_in_pieces() {
        let sigfd = SignalFd::with_flags(&SigSet::empty(), SfdFlags::SFD_NONBLOCK).unwrap();
        let (in_r, mut in_w) = pipe();
        let (out_r, out_w) = pipe();
        let t = std::thread::spawn(move || relay(in_r, &sigfd, out_w, &AtomicBool::new(true)));
        // A header announcing 4 GiB: not a frame of this protocol.
        in_w.write_all(&[2, 0xff, 0xff, 0xff, 0xff, b'x']).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(in_w);
        let mut fds = [PollFd::new(out_r.as_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::from(100u8)).unwrap();
        assert_eq!(ready, 0, "bytes that are not frames reached the guest");
        drop(out_r);
        t.join().unwrap();
    }
}
