//! Exec sessions: commands the host asks the agent to run next to the
//! workload (`evoke exec`, `kubectl exec`), in the workload's rootfs, each
//! with its own stdin, output, terminal and exit status multiplexed on the
//! agent channel (see `evoke_guest::proto`).
//!
//! Flow control: a session's output is read only while fewer than
//! [`OUTPUT_WINDOW`] of its bytes wait for the host's acknowledgement, so a
//! command whose reader is slow blocks on its own pipe and nothing else
//! waits. Its stdin is acknowledged as the command takes it, which is what
//! lets the host send more.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags};
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use evoke_guest::proto::{ExitStatus, Frame, OUTPUT_WINDOW};
use evoke_guest::spec::ExecRequest;

use crate::sys;

/// Where the agent's frames go (the channel; a list in tests).
pub trait FrameSink {
    fn send(&mut self, frame: &Frame);
}

/// After a command ends, how long its output may stay quiet before the
/// session is closed even though its pipes are still open (held by
/// background children).
const QUIET_AFTER_EXIT: Duration = Duration::from_millis(100);

/// Most bytes held for a command that does not read its stdin. The host
/// keeps within [`evoke_guest::proto::STDIN_WINDOW`]; this bounds a host
/// that does not.
const INPUT_BUFFER: usize = 1 << 20;

pub fn set_nonblocking(fd: BorrowedFd<'_>) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    if let Ok(fl) = fcntl(fd, FcntlArg::F_GETFL) {
        let _ = fcntl(
            fd,
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(fl) | OFlag::O_NONBLOCK),
        );
    }
}

/// A command's stdin: bytes from the host wait here until the pipe (or
/// terminal) takes them. The fd is non-blocking, so a command that does not
/// read cannot stall the agent. Every count returned is of bytes taken
/// (written, or dropped because nobody reads any more), which is what the
/// host's window is acknowledged with.
pub struct Input {
    pipe: Option<File>,
    pending: Vec<u8>,
    /// An empty stdin frame came: close the pipe once `pending` is written.
    eof: bool,
}

impl Input {
    pub fn new(pipe: Option<File>) -> Self {
        if let Some(p) = &pipe {
            set_nonblocking(p.as_fd());
        }
        Input {
            pipe,
            pending: Vec::new(),
            eof: false,
        }
    }

    pub fn has_room(&self) -> bool {
        self.pending.len() < INPUT_BUFFER
    }

    /// The pipe, when bytes wait for it.
    pub fn waiting_fd(&self) -> Option<BorrowedFd<'_>> {
        self.pipe
            .as_ref()
            .filter(|_| !self.pending.is_empty())
            .map(|p| p.as_fd())
    }

    /// Queues `bytes` (empty: the end of input) and writes what the pipe
    /// takes now; returns the bytes taken.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let mut dropped = 0;
        if bytes.is_empty() {
            self.eof = true;
        } else if self.pipe.is_none() || !self.has_room() {
            dropped = bytes.len();
        } else {
            self.pending.extend_from_slice(bytes);
        }
        dropped + self.flush()
    }

    /// Writes what the pipe takes now; closes it at the end of input or
    /// when the command closed its end. Returns the bytes taken.
    pub fn flush(&mut self) -> usize {
        let mut taken = 0;
        if let Some(p) = self.pipe.as_mut() {
            while !self.pending.is_empty() {
                match p.write(&self.pending) {
                    Ok(n) => {
                        self.pending.drain(..n);
                        taken += n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return taken,
                    Err(_) => {
                        // EPIPE: nobody reads any more.
                        taken += self.pending.len();
                        self.pending.clear();
                        self.pipe = None;
                        return taken;
                    }
                }
            }
        }
        if self.eof {
            self.pipe = None;
        }
        taken
    }

    #[cfg(test)]
    pub fn is_closed(&self) -> bool {
        self.pipe.is_none()
    }
}

/// What every exec inherits from the workload unless the request says
/// otherwise.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub root: String,
    pub env: Vec<String>,
    pub workdir: String,
    pub uid: u32,
    pub gid: u32,
}

/// Which of a session's fds a poll entry is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Out,
    Err,
    In,
}

struct Session {
    pid: Pid,
    /// stdout, or the terminal's master end.
    out: Option<File>,
    err: Option<File>,
    input: Input,
    /// The terminal's master end, for resizing.
    tty: Option<File>,
    /// Output sent and not yet acknowledged by the host.
    unacked: usize,
    status: Option<ExitStatus>,
    /// When the command ended or last wrote, whichever is later.
    quiet_since: Instant,
}

impl Session {
    fn room(&self) -> usize {
        OUTPUT_WINDOW.saturating_sub(self.unacked)
    }

    fn done(&self) -> bool {
        self.status.is_some()
            && ((self.out.is_none() && self.err.is_none())
                || (self.room() > 0 && self.quiet_since.elapsed() >= QUIET_AFTER_EXIT))
    }
}

/// The open exec sessions, by the host's session number.
pub struct Sessions {
    defaults: Defaults,
    open: BTreeMap<u32, Session>,
}

impl Sessions {
    pub fn new(defaults: Defaults) -> Self {
        Sessions {
            defaults,
            open: BTreeMap::new(),
        }
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Starts `req` as `session`; a command that cannot be started ends the
    /// session at once with an error and Docker's exit code (127 not found,
    /// 126 not executable, 125 otherwise).
    pub fn start(&mut self, session: u32, req: &ExecRequest, sink: &mut impl FrameSink) {
        if self.open.contains_key(&session) {
            sink.send(&Frame::ExecError {
                session,
                message: format!("exec session {session} is already open"),
            });
            return;
        }
        match self.spawn(req) {
            Ok(s) => {
                self.open.insert(session, s);
            }
            Err(e) => {
                let code = match e.kind() {
                    io::ErrorKind::NotFound => 127,
                    io::ErrorKind::PermissionDenied => 126,
                    _ => 125,
                };
                let argv0 = req.argv.first().map(String::as_str).unwrap_or_default();
                sink.send(&Frame::ExecError {
                    session,
                    message: format!("exec {argv0} in the workload's rootfs: {e}"),
                });
                sink.send(&Frame::ExecExit {
                    session,
                    status: ExitStatus {
                        code,
                        signal: 0,
                        oom_killed: false,
                    },
                });
            }
        }
    }

    fn spawn(&self, req: &ExecRequest) -> io::Result<Session> {
        let d = &self.defaults;
        let argv0 = req
            .argv
            .first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
        let mut env = d.env.clone();
        for kv in &req.env {
            let key = kv.split_once('=').map_or(kv.as_str(), |(k, _)| k);
            env.retain(|e| e.split_once('=').map_or(e != key, |(k, _)| k != key));
            env.push(kv.clone());
        }
        if req.tty && !env.iter().any(|e| e.starts_with("TERM=")) {
            env.push("TERM=xterm".into());
        }
        let workdir = req
            .workdir
            .as_deref()
            .filter(|w| !w.is_empty())
            .unwrap_or(&d.workdir);
        let (uid, gid) = req.user.unwrap_or((d.uid, d.gid));
        let mut cmd = Command::new(argv0);
        cmd.args(&req.argv[1..])
            .env_clear()
            .envs(env.iter().filter_map(|kv| kv.split_once('=')));
        sys::confine(&mut cmd, &d.root, workdir, uid, gid)?;
        if req.tty {
            let size = (req.cols > 0 && req.rows > 0).then_some(nix::pty::Winsize {
                ws_row: req.rows,
                ws_col: req.cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            });
            let pty = nix::pty::openpty(size.as_ref(), None).map_err(io::Error::from)?;
            let slave = |fd: &OwnedFd| fd.try_clone().map(Stdio::from);
            cmd.stdin(slave(&pty.slave)?)
                .stdout(slave(&pty.slave)?)
                .stderr(Stdio::from(pty.slave));
            crate::pty::make_controlling_tty(&mut cmd);
            let child = cmd.spawn()?;
            // The slave's copies in `cmd` must close here, or reading the
            // master never sees the end of the session.
            drop(cmd);
            let master = File::from(pty.master);
            set_nonblocking(master.as_fd());
            Ok(Session {
                pid: Pid::from_raw(child.id() as i32),
                out: Some(master.try_clone()?),
                err: None,
                input: Input::new(req.stdin.then(|| master.try_clone()).transpose()?),
                tty: Some(master),
                unacked: 0,
                status: None,
                quiet_since: Instant::now(),
            })
        } else {
            cmd.stdin(if req.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            let mut child = cmd.spawn()?;
            let file = |fd: Option<OwnedFd>| {
                fd.map(|fd| {
                    let f = File::from(fd);
                    set_nonblocking(f.as_fd());
                    f
                })
            };
            Ok(Session {
                pid: Pid::from_raw(child.id() as i32),
                out: file(child.stdout.take().map(OwnedFd::from)),
                err: file(child.stderr.take().map(OwnedFd::from)),
                input: Input::new(child.stdin.take().map(|s| File::from(OwnedFd::from(s)))),
                tty: None,
                unacked: 0,
                status: None,
                quiet_since: Instant::now(),
            })
        }
    }

    /// Stdin bytes for `session` (empty: its end); acknowledges what the
    /// command took. Bytes for a session that is gone are acknowledged too,
    /// so the host's window never sticks.
    pub fn stdin(&mut self, session: u32, data: &[u8], sink: &mut impl FrameSink) {
        let taken = match self.open.get_mut(&session) {
            Some(s) => s.input.push(data),
            None => data.len(),
        };
        ack_stdin(session, taken, sink);
    }

    pub fn resize(&mut self, session: u32, cols: u16, rows: u16) {
        if let Some(tty) = self.open.get(&session).and_then(|s| s.tty.as_ref()) {
            if let Err(e) = crate::pty::resize(tty.as_fd(), cols, rows) {
                tracing::debug!(session, error = %e, "resize");
            }
        }
    }

    /// Signals the session's process group (the command runs in a session
    /// of its own).
    pub fn signal(&mut self, session: u32, signal: i32) {
        if let (Some(s), Ok(sig)) = (self.open.get(&session), Signal::try_from(signal)) {
            let _ = nix::sys::signal::kill(Pid::from_raw(-s.pid.as_raw()), sig);
        }
    }

    pub fn output_acked(&mut self, session: u32, bytes: u32) {
        if let Some(s) = self.open.get_mut(&session) {
            s.unacked = s.unacked.saturating_sub(bytes as usize);
        }
    }

    /// Adds the fds worth polling: output while the window has room, stdin
    /// while bytes wait for it. `tags` says whose each one is.
    pub fn poll_fds<'a>(&'a self, fds: &mut Vec<PollFd<'a>>, tags: &mut Vec<(u32, Stream)>) {
        for (&id, s) in &self.open {
            if s.room() > 0 {
                for (f, which) in [(&s.out, Stream::Out), (&s.err, Stream::Err)] {
                    if let Some(f) = f {
                        fds.push(PollFd::new(f.as_fd(), PollFlags::POLLIN));
                        tags.push((id, which));
                    }
                }
            }
            if let Some(fd) = s.input.waiting_fd() {
                fds.push(PollFd::new(fd, PollFlags::POLLOUT));
                tags.push((id, Stream::In));
            }
        }
    }

    /// Serves a ready fd: output within the window becomes frames, waiting
    /// stdin is written and acknowledged.
    pub fn ready(
        &mut self,
        session: u32,
        which: Stream,
        sink: &mut impl FrameSink,
        buf: &mut [u8],
    ) {
        let Some(s) = self.open.get_mut(&session) else {
            return;
        };
        if which == Stream::In {
            let taken = s.input.flush();
            ack_stdin(session, taken, sink);
            return;
        }
        let room = s.room().min(buf.len());
        let src = if which == Stream::Out {
            &mut s.out
        } else {
            &mut s.err
        };
        let Some(f) = src.as_mut() else { return };
        match f.read(&mut buf[..room]) {
            Ok(0) => *src = None,
            Ok(n) => {
                let data = buf[..n].to_vec();
                sink.send(&if which == Stream::Out {
                    Frame::ExecStdout { session, data }
                } else {
                    Frame::ExecStderr { session, data }
                });
                s.unacked += n;
                if s.status.is_some() {
                    s.quiet_since = Instant::now();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // EIO: a terminal whose every slave fd has closed.
            Err(_) => *src = None,
        }
    }

    /// Records the end of a reaped child; `false` when it was no session's.
    pub fn reaped(&mut self, ws: &WaitStatus) -> bool {
        let Some(pid) = ws.pid() else { return false };
        let Some(s) = self.open.values_mut().find(|s| s.pid == pid) else {
            return false;
        };
        s.status = Some(exit_status(ws, false));
        s.quiet_since = Instant::now();
        true
    }

    /// Ends the sessions whose command has ended and whose output is
    /// drained (or quiet): each gets its ExecExit, after all its output.
    pub fn finish_ended(&mut self, sink: &mut impl FrameSink) {
        let done: Vec<u32> = self
            .open
            .iter()
            .filter(|(_, s)| s.done())
            .map(|(&id, _)| id)
            .collect();
        for session in done {
            if let Some(s) = self.open.remove(&session) {
                sink.send(&Frame::ExecExit {
                    session,
                    status: s.status.unwrap_or(ExitStatus {
                        code: 125,
                        signal: 0,
                        oom_killed: false,
                    }),
                });
            }
        }
    }

    /// How soon [`Sessions::finish_ended`] may have work without any fd
    /// becoming ready (a quiet session after its command ended).
    pub fn next_deadline(&self) -> Option<Duration> {
        self.open
            .values()
            // One waiting for acknowledgements is woken by them instead.
            .filter(|s| s.status.is_some() && s.room() > 0)
            .map(|s| QUIET_AFTER_EXIT.saturating_sub(s.quiet_since.elapsed()))
            .min()
    }

    /// The VM is about to end: every session's processes go with it.
    pub fn kill_all(&mut self) {
        for s in self.open.values() {
            let _ = nix::sys::signal::kill(Pid::from_raw(-s.pid.as_raw()), Signal::SIGKILL);
        }
        self.open.clear();
    }
}

fn ack_stdin(session: u32, taken: usize, sink: &mut impl FrameSink) {
    if taken > 0 {
        sink.send(&Frame::StdinAck {
            session,
            bytes: taken as u32,
        });
    }
}

/// Shell-style status of a reaped child.
pub fn exit_status(ws: &WaitStatus, oom: bool) -> ExitStatus {
    match *ws {
        WaitStatus::Exited(_, code) => ExitStatus {
            code,
            signal: 0,
            oom_killed: false,
        },
        WaitStatus::Signaled(_, sig, _) => ExitStatus {
            code: 128 + sig as i32,
            signal: sig as i32,
            oom_killed: oom && sig == Signal::SIGKILL,
        },
        _ => ExitStatus {
            code: 125,
            signal: 0,
            oom_killed: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::{poll, PollTimeout};
    use nix::sys::wait::{waitpid, WaitPidFlag};

    impl FrameSink for Vec<Frame> {
        fn send(&mut self, frame: &Frame) {
            self.push(frame.clone());
        }
    }

    /// Sessions rooted at the host's `/` (no chroot needed for the test:
    /// chroot to `/` as root is a no-op, and tests run as root in CI; as a
    /// user, chroot fails and the test skips).
    fn sessions() -> Option<Sessions> {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "exec session tests need root (chroot)"
            );
            eprintln!("skipped: exec session tests need root (chroot)");
            return None;
        }
        Some(Sessions::new(Defaults {
            root: "/".into(),
            env: vec!["PATH=/usr/bin:/bin".into(), "FROM_WORKLOAD=yes".into()],
            workdir: "/".into(),
            uid: 0,
            gid: 0,
        }))
    }

    /// Polls and serves sessions until all have ended or `limit` passed;
    /// acknowledges output at once when `ack` is set.
    fn drive(s: &mut Sessions, sink: &mut Vec<Frame>, ack: bool, limit: Duration) {
        let start = Instant::now();
        let mut buf = vec![0u8; 4096];
        while !s.is_empty() && start.elapsed() < limit {
            let (ready, tags) = {
                let mut fds = Vec::new();
                let mut tags = Vec::new();
                s.poll_fds(&mut fds, &mut tags);
                let _ = poll(&mut fds, PollTimeout::from(20u8));
                let ready: Vec<bool> = fds
                    .iter()
                    .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                    .collect();
                (ready, tags)
            };
            for (hit, (id, which)) in ready.into_iter().zip(tags) {
                if hit {
                    s.ready(id, which, sink, &mut buf);
                }
            }
            while let Ok(ws) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                if ws == WaitStatus::StillAlive {
                    break;
                }
                s.reaped(&ws);
            }
            if ack {
                // Output is taken away as if delivered; the rest stays.
                let mut acks: Vec<(u32, u32)> = Vec::new();
                sink.retain(|f| match f {
                    Frame::ExecStdout { session, data } | Frame::ExecStderr { session, data } => {
                        acks.push((*session, data.len() as u32));
                        false
                    }
                    _ => true,
                });
                for (session, n) in acks {
                    s.output_acked(session, n);
                }
            }
            s.finish_ended(sink);
        }
    }

    fn output(frames: &[Frame], session: u32) -> (Vec<u8>, Vec<u8>, Option<ExitStatus>) {
        let (mut out, mut err, mut exit) = (Vec::new(), Vec::new(), None);
        for f in frames {
            match f {
                Frame::ExecStdout { session: s, data } if *s == session => out.extend(data),
                Frame::ExecStderr { session: s, data } if *s == session => err.extend(data),
                Frame::ExecExit { session: s, status } if *s == session => {
                    assert!(exit.is_none(), "two exits for session {session}");
                    exit = Some(*status)
                }
                _ => {}
            }
        }
        (out, err, exit)
    }

    fn req(argv: &[&str]) -> ExecRequest {
        ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn an_exec_gets_the_workloads_env_its_own_overrides_and_its_exit_code_after_its_output() {
        let Some(mut s) = sessions() else { return };
        let mut sink = Vec::new();
        let mut r = req(&[
            "sh",
            "-c",
            "echo \"$FROM_WORKLOAD $EXTRA\"; echo oops >&2; exit 3",
        ]);
        r.env = vec!["EXTRA=added".into()];
        s.start(4, &r, &mut sink);
        drive(&mut s, &mut sink, false, Duration::from_secs(10));
        let (out, err, exit) = output(&sink, 4);
        assert_eq!(out, b"yes added\n");
        assert_eq!(err, b"oops\n");
        assert_eq!(exit.map(|e| e.code), Some(3));
        assert!(matches!(sink.last(), Some(Frame::ExecExit { .. })));
    }

    #[test]
    fn a_missing_command_ends_its_session_with_an_error_and_127() {
        let Some(mut s) = sessions() else { return };
        let mut sink = Vec::new();
        s.start(1, &req(&["/no/such/program"]), &mut sink);
        assert!(s.is_empty());
        assert!(
            matches!(&sink[0], Frame::ExecError { session: 1, message } if message.contains("/no/such/program")),
            "{sink:?}"
        );
        assert_eq!(output(&sink, 1).2.map(|e| e.code), Some(127));
    }

    #[test]
    fn stdin_reaches_the_command_is_acknowledged_and_its_end_closes_the_pipe() {
        let Some(mut s) = sessions() else { return };
        let mut sink = Vec::new();
        let mut r = req(&["cat"]);
        r.stdin = true;
        s.start(2, &r, &mut sink);
        s.stdin(2, b"hello ", &mut sink);
        s.stdin(2, b"exec\n", &mut sink);
        s.stdin(2, b"", &mut sink);
        drive(&mut s, &mut sink, true, Duration::from_secs(10));
        let acked: u32 = sink
            .iter()
            .filter_map(|f| match f {
                Frame::StdinAck { session: 2, bytes } => Some(*bytes),
                _ => None,
            })
            .sum();
        assert_eq!(acked, 11);
        // The exit came because cat saw the end of its input.
        assert_eq!(output(&sink, 2).2.map(|e| e.code), Some(0));
    }

    #[test]
    fn output_beyond_the_window_waits_for_acknowledgements_while_other_sessions_go_on() {
        let Some(mut s) = sessions() else { return };
        let mut sink = Vec::new();
        // Four windows' worth from session 1; session 2 is short.
        let big = format!("head -c {} /dev/zero", 4 * OUTPUT_WINDOW);
        s.start(1, &req(&["sh", "-c", &big]), &mut sink);
        s.start(2, &req(&["echo", "small"]), &mut sink);
        drive(&mut s, &mut sink, false, Duration::from_millis(500));
        let (out1, _, exit1) = output(&sink, 1);
        let (out2, _, exit2) = output(&sink, 2);
        assert_eq!(out1.len(), OUTPUT_WINDOW, "session 1 stops at its window");
        assert_eq!(exit1, None);
        assert_eq!(out2, b"small\n");
        assert_eq!(exit2.map(|e| e.code), Some(0));
        // Acknowledging lets the rest through.
        s.output_acked(1, OUTPUT_WINDOW as u32);
        let mut rest = Vec::new();
        drive(&mut s, &mut rest, true, Duration::from_secs(10));
        let (_, _, exit1) = output(&rest, 1);
        assert_eq!(exit1.map(|e| e.code), Some(0));
    }

    #[test]
    fn a_tty_exec_runs_on_a_terminal_of_the_requested_size() {
        let Some(mut s) = sessions() else { return };
        let mut sink = Vec::new();
        let mut r = req(&[
            "sh",
            "-c",
            "[ -t 0 ] && [ -t 1 ] && echo tty; stty size; echo $TERM",
        ]);
        r.tty = true;
        r.cols = 100;
        r.rows = 30;
        s.start(5, &r, &mut sink);
        drive(&mut s, &mut sink, false, Duration::from_secs(10));
        let (out, err, exit) = output(&sink, 5);
        let text = String::from_utf8_lossy(&out);
        assert!(err.is_empty(), "a terminal carries stderr too");
        assert_eq!(exit.map(|e| e.code), Some(0), "{text}");
        assert!(text.contains("tty\r\n"), "{text:?}");
        assert!(text.contains("30 100\r\n"), "{text:?}");
        assert!(text.contains("xterm"), "{text:?}");
    }

    #[test]
    fn a_signal_reaches_the_sessions_process_group() {
        let Some(mut s) = sessions() else { return };
        let mut sink = Vec::new();
        s.start(6, &req(&["sleep", "30"]), &mut sink);
        std::thread::sleep(Duration::from_millis(100));
        s.signal(6, libc::SIGTERM);
        drive(&mut s, &mut sink, false, Duration::from_secs(10));
        let exit = output(&sink, 6).2.expect("exit");
        assert_eq!((exit.code, exit.signal), (128 + 15, 15));
    }

    #[test]
    fn stdin_for_a_session_that_is_gone_is_still_acknowledged() {
        let Some(mut s) = sessions() else { return };
        let mut sink = Vec::new();
        s.stdin(42, b"late", &mut sink);
        assert_eq!(
            sink,
            [Frame::StdinAck {
                session: 42,
                bytes: 4
            }]
        );
    }
}
