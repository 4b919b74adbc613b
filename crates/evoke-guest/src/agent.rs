//! The guest's /init: prepares the guest, runs the workload chrooted into
//! the image rootfs, forwards its output and exit status over the agent
//! channel, then ends the VM.
//!
//! Order matters for boot time: the boot mark is written before anything
//! else, and nothing waits longer than the devices need.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::termios;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use evoke_guest::proto::{ExitStatus, Frame, FrameBuffer, MAIN_SESSION};
use evoke_guest::spec::{self, Channel, GuestSpec, Shutdown};

use crate::exec::{self, set_nonblocking, FrameSink, Input, Sessions};
use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{what}: {source}")]
    Sys { what: String, source: nix::Error },
    #[error("guest spec {path}: {source}")]
    Spec {
        path: &'static str,
        source: serde_json::Error,
    },
    #[error("no agent channel: {0}")]
    NoChannel(String),
}

fn io_ctx(what: impl Into<String>) -> impl FnOnce(io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}

fn nix_ctx(what: impl Into<String>) -> impl FnOnce(nix::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Sys { what, source }
}

/// Where frames go: a framed channel, or the console for plain output.
enum Sink {
    Framed(File),
    Console(File),
}

impl FrameSink for Sink {
    fn send(&mut self, frame: &Frame) {
        let res = match (self, frame) {
            (Sink::Framed(f), _) => frame
                .encode()
                .map_err(|e| e.to_string())
                .and_then(|b| write_all_waiting(f, &b).map_err(|e| e.to_string())),
            (Sink::Console(c), Frame::Stdout(b) | Frame::Stderr(b)) => {
                c.write_all(b).map_err(|e| e.to_string())
            }
            (Sink::Console(c), Frame::Exit(s)) => {
                writeln!(c, "\n{}{}", spec::CONSOLE_EXIT_PREFIX, s.code).map_err(|e| e.to_string())
            }
            (Sink::Console(c), Frame::Error(m)) => {
                writeln!(c, "evoke-guest: {m}").map_err(|e| e.to_string())
            }
            (Sink::Console(_), _) => Ok(()),
        };
        if let Err(e) = res {
            console(&format!("evoke-guest: agent channel write failed: {e}"));
        }
    }
}

/// Writes a whole frame to the channel, which is non-blocking (the agent
/// polls it for input): when the port's buffers are full, wait for room
/// rather than cut a frame in two.
fn write_all_waiting(f: &mut File, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match f.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLOUT)];
                match poll(&mut fds, PollTimeout::from(1000u16)) {
                    Ok(_) | Err(nix::Error::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Sink {
    fn readable(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Sink::Framed(f) => Some(f.as_fd()),
            Sink::Console(_) => None,
        }
    }
}

/// A best-effort line on the console (fd 1 of init is /dev/console).
fn console(msg: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{msg}");
    let _ = out.flush();
}

pub fn run() -> ! {
    // The kernel's own clock at this point tells a benchmark how much of the
    // boot was the guest kernel and how much the VMM before it.
    console(&format!(
        "{} t={:.6}",
        spec::BOOT_MARK,
        sys::boottime_secs()
    ));
    let mut shutdown = Shutdown::default();
    if let Err(e) = boot(&mut shutdown) {
        console(&format!("evoke-guest: {e}"));
    }
    nix::unistd::sync();
    let mode = match shutdown {
        Shutdown::Reboot => RebootMode::RB_AUTOBOOT,
        Shutdown::PowerOff => RebootMode::RB_POWER_OFF,
    };
    let _ = reboot(mode);
    // Only reached if the kernel refused; PID 1 must never exit.
    let _ = reboot(RebootMode::RB_AUTOBOOT);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn boot(shutdown: &mut Shutdown) -> Result<(), AgentError> {
    mount_basics("")?;
    let spec_res = fs::read(spec::SPEC_PATH)
        .map_err(io_ctx(format!("read {}", spec::SPEC_PATH)))
        .and_then(|b| {
            GuestSpec::from_json(&b).map_err(|source| AgentError::Spec {
                path: spec::SPEC_PATH,
                source,
            })
        });
    if let Ok(s) = &spec_res {
        *shutdown = s.shutdown;
    }
    load_modules();
    let channel = spec_res
        .as_ref()
        .map(|s| s.channel)
        .unwrap_or(Channel::Auto);
    let mut sink = open_channel(channel)?;
    sink.send(&Frame::Ready);
    let spec = match spec_res {
        Ok(s) => s,
        Err(e) => {
            sink.send(&Frame::Error(e.to_string()));
            return Err(e);
        }
    };
    if let Some(h) = &spec.hostname {
        if let Err(e) = nix::unistd::sethostname(h) {
            console(&format!("evoke-guest: sethostname {h}: {e}"));
        }
    }
    if let Err(e) = setup_network(&spec) {
        // A pod without its network is not running as asked: fail it the
        // way a failed runtime set-up fails (125), and say why.
        sink.send(&Frame::Error(e.to_string()));
        sink.send(&Frame::Exit(ExitStatus {
            code: 125,
            signal: 0,
            oom_killed: false,
        }));
        return Ok(());
    }
    let status = match run_workload(&spec, &mut sink) {
        Ok(s) => s,
        Err(e) => {
            sink.send(&Frame::Error(e.to_string()));
            ExitStatus {
                code: exec_failure_code(&e),
                signal: 0,
                oom_killed: false,
            }
        }
    };
    sink.send(&Frame::Exit(status));
    Ok(())
}

/// `lo` always; eth0, its route and the workload's resolv.conf when the
/// host gave the VM a network (see `evoke_guest::net`).
fn setup_network(spec: &GuestSpec) -> Result<(), evoke_guest::net::NetError> {
    if let Err(e) = evoke_guest::net::bring_up_loopback() {
        console(&format!("evoke-guest: {e}"));
    }
    let Some(net) = &spec.network else {
        return Ok(());
    };
    evoke_guest::net::configure(net, Duration::from_secs(3))?;
    evoke_guest::net::write_resolv_conf(net, Path::new(spec::ROOTFS_DIR))
}

/// Docker's convention: 127 when the command is missing, 126 when it cannot
/// be executed, 125 when the runtime itself failed.
fn exec_failure_code(e: &AgentError) -> i32 {
    match e {
        AgentError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => 127,
        AgentError::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => 126,
        _ => 125,
    }
}

fn mount_one(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), AgentError> {
    let _ = fs::create_dir_all(target);
    mount(Some(src), target, Some(fstype), flags, data)
        .map_err(nix_ctx(format!("mount {fstype} on {target}")))
}

/// /proc, /sys, /dev, /dev/pts and /tmp under `root` ("" for the guest's own root).
fn mount_basics(root: &str) -> Result<(), AgentError> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_one("proc", &format!("{root}/proc"), "proc", nosuid, None)?;
    mount_one("sysfs", &format!("{root}/sys"), "sysfs", nosuid, None)?;
    mount_one(
        "devtmpfs",
        &format!("{root}/dev"),
        "devtmpfs",
        MsFlags::MS_NOSUID,
        None,
    )?;
    mount_one(
        "devpts",
        &format!("{root}/dev/pts"),
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mount_one(
        "tmpfs",
        &format!("{root}/tmp"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    Ok(())
}

/// Loads the modules listed in the initramfs, in order. A failure is
/// reported and skipped: the channel set-up then says what is missing.
fn load_modules() {
    let Ok(list) = fs::read_to_string(spec::MODULES_LIST) else {
        return;
    };
    for name in list.lines().filter(|l| !l.is_empty()) {
        let path = format!("{}/{name}", spec::MODULES_DIR);
        let res = File::open(&path).and_then(|f| sys::finit_module(&f));
        match res {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => console(&format!("evoke-guest: load module {path}: {e}")),
        }
    }
}

/// Candidate virtio-console devices, most specific first: the console port
/// (`hvc0`, when the host offers a virtconsole) and then generic ports
/// (`vportNpM`; opening a port that backs a console gives ENXIO).
fn virtio_ports() -> Vec<String> {
    let mut ports = Vec::new();
    // hvc0 is listed only once a backing console is registered (the built-in
    // Xen hvc driver has no device here).
    if Path::new("/sys/class/tty/hvc0").exists() {
        ports.push("/dev/hvc0".to_owned());
    }
    let mut vports: Vec<String> = fs::read_dir("/dev")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("vport") && n.contains('p'))
                .map(|n| format!("/dev/{n}"))
                .collect()
        })
        .unwrap_or_default();
    vports.sort();
    ports.extend(vports);
    ports
}

fn open_raw(path: &str) -> Result<File, AgentError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_ctx(format!("open agent channel {path}")))?;
    // A tty would otherwise translate and echo bytes of the binary frames.
    if let Ok(mut t) = termios::tcgetattr(&f) {
        termios::cfmakeraw(&mut t);
        termios::tcsetattr(&f, termios::SetArg::TCSANOW, &t)
            .map_err(nix_ctx(format!("make {path} raw")))?;
        // Whatever arrived while the tty was still cooked was mangled (and
        // echoed); the host sends nothing before our Ready frame anyway.
        let _ = termios::tcflush(&f, termios::FlushArg::TCIFLUSH);
    }
    Ok(f)
}

fn open_channel(channel: Channel) -> Result<Sink, AgentError> {
    let console_sink = || -> Result<Sink, AgentError> {
        let c = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open("/dev/console")
            .map_err(io_ctx("open /dev/console"))?;
        Ok(Sink::Console(c))
    };
    match channel {
        Channel::Console => console_sink(),
        Channel::Serial => Ok(Sink::Framed(open_raw("/dev/ttyS1")?)),
        Channel::VirtioConsole | Channel::Auto => {
            // The port appears once virtio_console has probed; that normally
            // happened inside finit_module, so this rarely waits.
            let patience = if channel == Channel::Auto { 200 } else { 3000 };
            let start = Instant::now();
            let mut last_err = None;
            loop {
                for p in virtio_ports() {
                    match open_raw(&p) {
                        Ok(f) => return Ok(Sink::Framed(f)),
                        Err(e) => last_err = Some(e),
                    }
                }
                if start.elapsed() > Duration::from_millis(patience) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            if let Some(e) = last_err {
                console(&format!("evoke-guest: {e}"));
            }
            if channel == Channel::Auto {
                console_sink()
            } else {
                Err(AgentError::NoChannel(
                    "no virtio-console port (/dev/vport*p*, /dev/hvc0) appeared within 3 s; is a virtio-mmio console described to the guest by ACPI?".into(),
                ))
            }
        }
    }
}

fn oom_kills() -> u64 {
    fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("oom_kill ")
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

/// Reads what is available now from a non-blocking pipe; `Ok(false)` at EOF.
fn pump(src: &mut impl Read, stderr: bool, sink: &mut Sink, buf: &mut [u8]) -> bool {
    loop {
        match src.read(buf) {
            Ok(0) => return false,
            Ok(n) => {
                let data = buf[..n].to_vec();
                sink.send(&if stderr {
                    Frame::Stderr(data)
                } else {
                    Frame::Stdout(data)
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

fn run_workload(spec: &GuestSpec, sink: &mut Sink) -> Result<ExitStatus, AgentError> {
    let root = spec::ROOTFS_DIR;
    if !Path::new(root).is_dir() {
        return Err(AgentError::Io {
            what: format!("image rootfs {root}"),
            source: io::Error::from(io::ErrorKind::NotFound),
        });
    }
    mount_basics(root)?;
    let workdir = if spec.workdir.is_empty() {
        "/"
    } else {
        spec.workdir.as_str()
    };
    let _ = fs::create_dir_all(format!("{root}/{}", workdir.trim_start_matches('/')));

    // SIGCHLD arrives through a signalfd so the loop wakes at once when the
    // workload ends (the time to exit is benchmarked). std resets the signal
    // mask in the child before exec.
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.thread_block().map_err(nix_ctx("block SIGCHLD"))?;
    let sigfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(nix_ctx("signalfd"))?;

    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env.iter().filter_map(|kv| kv.split_once('=')))
        .stdin(if spec.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    sys::confine(&mut cmd, root, workdir, spec.uid, spec.gid)
        .map_err(io_ctx("prepare workload"))?;
    let oom_before = oom_kills();
    let mut child = cmd
        .spawn()
        .map_err(io_ctx(format!("exec {} in the image", spec.argv[0])))?;
    // std's spawn returns once the exec has succeeded: the workload runs.
    // The host reports it running only on this frame.
    sink.send(&Frame::Started {
        unix_nanos: unix_nanos_now(),
    });
    let pid = Pid::from_raw(child.id() as i32);
    let (Some(mut out), Some(mut err)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(AgentError::NoChannel("workload pipes missing".into()));
    };
    set_nonblocking(out.as_fd());
    set_nonblocking(err.as_fd());
    let mut input = Input::new(
        child
            .stdin
            .take()
            .map(|s| File::from(std::os::fd::OwnedFd::from(s))),
    );
    if let Some(fd) = sink.readable() {
        set_nonblocking(fd);
    }
    let mut sessions = Sessions::new(exec::Defaults {
        root: root.to_owned(),
        env: spec.env.clone(),
        workdir: workdir.to_owned(),
        uid: spec.uid,
        gid: spec.gid,
    });

    let mut buf = vec![0u8; 32 * 1024];
    let mut inbox = FrameBuffer::default();
    let (mut out_open, mut err_open) = (true, true);
    let mut status: Option<WaitStatus> = None;
    let mut exited_at: Option<Instant> = None;
    loop {
        // After the main process ends, its pipes may be held open by
        // background children; give them a moment, then stop waiting.
        if let Some(t) = exited_at {
            if (!out_open && !err_open) || t.elapsed() > Duration::from_millis(100) {
                break;
            }
        }
        let (ready_out, ready_err, ready_sig, ready_chan, ready_in, ready_sessions) = {
            let mut fds = vec![PollFd::new(sigfd.as_fd(), PollFlags::POLLIN)];
            let out_i = out_open.then(|| {
                fds.push(PollFd::new(out.as_fd(), PollFlags::POLLIN));
                fds.len() - 1
            });
            let err_i = err_open.then(|| {
                fds.push(PollFd::new(err.as_fd(), PollFlags::POLLIN));
                fds.len() - 1
            });
            // Stop reading the channel while the workload's stdin is
            // backed up: the host then waits on the virtio queue.
            let chan_i = sink.readable().filter(|_| input.has_room()).map(|fd| {
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
                fds.len() - 1
            });
            let in_i = input.waiting_fd().map(|fd| {
                fds.push(PollFd::new(fd, PollFlags::POLLOUT));
                fds.len() - 1
            });
            let first_session = fds.len();
            let mut tags = Vec::new();
            sessions.poll_fds(&mut fds, &mut tags);
            let mut timeout = if exited_at.is_some() { 20u16 } else { 1000 };
            if let Some(d) = sessions.next_deadline() {
                timeout = timeout.min(d.as_millis() as u16 + 1);
            }
            match poll(&mut fds, PollTimeout::from(timeout)) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => return Err(nix_ctx("poll")(e)),
            }
            let hit = |i: Option<usize>| {
                i.is_some_and(|i| fds[i].revents().is_some_and(|r| !r.is_empty()))
            };
            let ready_sessions: Vec<_> = tags
                .into_iter()
                .enumerate()
                .filter(|(i, _)| hit(Some(first_session + i)))
                .map(|(_, t)| t)
                .collect();
            (
                hit(out_i),
                hit(err_i),
                hit(Some(0)),
                hit(chan_i),
                hit(in_i),
                ready_sessions,
            )
        };
        if ready_out {
            out_open = pump(&mut out, false, sink, &mut buf);
        }
        if ready_err {
            err_open = pump(&mut err, true, sink, &mut buf);
        }
        if ready_chan {
            if let Sink::Framed(f) = sink {
                match f.read(&mut buf) {
                    Ok(n) if n > 0 => inbox.push(&buf[..n]),
                    _ => {}
                }
            }
            handle_host_frames(&mut inbox, pid, &mut input, &mut sessions, sink);
        }
        if ready_in {
            let taken = input.flush();
            ack_main_stdin(taken, sink);
        }
        for (session, stream) in ready_sessions {
            sessions.ready(session, stream, sink, &mut buf);
        }
        if ready_sig {
            while let Ok(Some(_)) = sigfd.read_signal() {}
        }
        // Reap every child: PID 1 inherits orphans; remember the workload's.
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(ws) => {
                    if ws.pid() == Some(pid) {
                        status = Some(ws);
                        exited_at = Some(Instant::now());
                    } else {
                        sessions.reaped(&ws);
                    }
                }
            }
        }
        sessions.finish_ended(sink);
    }
    // The VM ends with the workload, and every exec with it; the host
    // tells each exec's caller so.
    sessions.kill_all();
    if out_open {
        pump(&mut out, false, sink, &mut buf);
    }
    if err_open {
        pump(&mut err, true, sink, &mut buf);
    }
    // Nothing of the workload may outlive it: the VM ends next anyway.
    let _ = nix::sys::signal::kill(Pid::from_raw(-pid.as_raw()), Signal::SIGKILL);
    let oom = oom_kills() > oom_before;
    Ok(match status {
        Some(ws) => exec::exit_status(&ws, oom),
        None => ExitStatus {
            code: 125,
            signal: 0,
            oom_killed: false,
        },
    })
}

/// The guest's wall clock (kvmclock gives it the host's time at boot); 0
/// when it reads before the epoch, which the host takes as unknown.
fn unix_nanos_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn ack_main_stdin(taken: usize, sink: &mut impl FrameSink) {
    if taken > 0 {
        sink.send(&Frame::StdinAck {
            session: MAIN_SESSION,
            bytes: taken as u32,
        });
    }
}

/// Decodes complete host → guest frames from `inbox` and acts on them:
/// signals go to the workload's process group, stdin bytes to its stdin,
/// exec frames to their session.
fn handle_host_frames(
    inbox: &mut FrameBuffer,
    pid: Pid,
    input: &mut Input,
    sessions: &mut Sessions,
    sink: &mut impl FrameSink,
) {
    loop {
        let frame = match inbox.next_frame() {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                console(&format!("evoke-guest: bad frame from host: {e}"));
                continue;
            }
        };
        match frame {
            Frame::Signal(n) => {
                if let Ok(sig) = Signal::try_from(n) {
                    let _ = nix::sys::signal::kill(Pid::from_raw(-pid.as_raw()), sig);
                }
            }
            Frame::Stdin(bytes) => {
                let taken = input.push(&bytes);
                ack_main_stdin(taken, sink);
            }
            Frame::ExecStart { session, request } => sessions.start(session, &request, sink),
            Frame::ExecStdin { session, data } => sessions.stdin(session, &data, sink),
            Frame::ExecResize {
                session,
                cols,
                rows,
            } => sessions.resize(session, cols, rows),
            Frame::ExecSignal { session, signal } => sessions.signal(session, signal),
            Frame::OutputAck { session, bytes } => sessions.output_acked(session, bytes),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_sessions() -> Sessions {
        Sessions::new(exec::Defaults {
            root: "/".into(),
            env: Vec::new(),
            workdir: "/".into(),
            uid: 0,
            gid: 0,
        })
    }

    #[test]
    fn host_frames_are_taken_whole_and_partial_ones_wait_for_more_bytes() {
        let mut wire = Vec::new();
        Frame::Signal(0).write_to(&mut wire).unwrap();
        Frame::Signal(0).write_to(&mut wire).unwrap();
        let mut inbox = FrameBuffer::default();
        inbox.push(&wire[..7]);
        // Signal 0 to a process group that does not exist: nothing happens.
        let nobody = Pid::from_raw(i32::MAX - 1);
        let mut input = Input::new(None);
        let mut sent: Vec<Frame> = Vec::new();
        let mut sessions = no_sessions();
        handle_host_frames(&mut inbox, nobody, &mut input, &mut sessions, &mut sent);
        // A signal frame is 9 bytes: 7 are not enough to act on.
        assert_eq!(inbox.len(), 7);
        inbox.push(&wire[7..]);
        handle_host_frames(&mut inbox, nobody, &mut input, &mut sessions, &mut sent);
        assert!(inbox.is_empty());
        assert!(sent.is_empty());
    }

    #[test]
    fn stdin_frames_reach_the_workload_are_acknowledged_and_an_empty_one_closes_its_stdin() {
        let mut child = Command::new("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = Input::new(
            child
                .stdin
                .take()
                .map(|s| File::from(std::os::fd::OwnedFd::from(s))),
        );
        let mut wire = Vec::new();
        Frame::Stdin(b"hello ".to_vec())
            .write_to(&mut wire)
            .unwrap();
        Frame::Stdin(b"guest\n".to_vec())
            .write_to(&mut wire)
            .unwrap();
        Frame::Stdin(Vec::new()).write_to(&mut wire).unwrap();
        let nobody = Pid::from_raw(i32::MAX - 1);
        let mut inbox = FrameBuffer::default();
        inbox.push(&wire);
        let mut sent: Vec<Frame> = Vec::new();
        handle_host_frames(
            &mut inbox,
            nobody,
            &mut input,
            &mut no_sessions(),
            &mut sent,
        );
        while input.waiting_fd().is_some() {
            ack_main_stdin(input.flush(), &mut sent);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(input.is_closed(), "stdin not closed at the end of input");
        // cat ends only if its stdin was closed.
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.stdout, b"hello guest\n");
        let acked: u32 = sent
            .iter()
            .map(|f| match f {
                Frame::StdinAck {
                    session: MAIN_SESSION,
                    bytes,
                } => *bytes,
                other => panic!("unexpected {other:?}"),
            })
            .sum();
        assert_eq!(acked, 12);
    }

    #[test]
    fn exec_failures_map_to_dockers_exit_codes() {
        let err = |kind| AgentError::Io {
            what: "exec x".into(),
            source: io::Error::from(kind),
        };
        assert_eq!(exec_failure_code(&err(io::ErrorKind::NotFound)), 127);
        assert_eq!(
            exec_failure_code(&err(io::ErrorKind::PermissionDenied)),
            126
        );
        assert_eq!(exec_failure_code(&AgentError::NoChannel("x".into())), 125);
    }
}
