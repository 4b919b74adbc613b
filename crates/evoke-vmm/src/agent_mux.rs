//! The host end of the agent channel inside the VMM process: one thread
//! that multiplexes onto the channel (1) the main workload's frames from the
//! VMM's stdin, (2) the signals the VMM catches, turned into
//! [`Frame::Signal`], and (3) exec sessions, one per connection on a Unix
//! socket next to the VM's state ([`ProcessConfig::exec_socket`]). Guest →
//! host, [`GuestOutput`] (the channel's output sink, written by the vCPU
//! thread) passes the main workload's frames to stdout and hands exec frames
//! to this thread through a [`Mailbox`].
//!
//! An exec client speaks the agent protocol with session 0 in every frame:
//! it sends one [`Frame::ExecStart`], then stdin, resize and signal frames;
//! it receives output, at most one [`Frame::ExecError`] and one
//! [`Frame::ExecExit`]. The mux numbers the sessions. If the VM ends first,
//! the client gets an [`Frame::ExecError`] that says so and the connection
//! closes with no exit.
//!
//! Flow control (see `evoke_guest::proto`): output is acknowledged to the
//! guest only once written to the client's socket, so a slow client holds
//! at most one window in this process; a client's socket is read only
//! while its session's stdin window has room, and the VMM's stdin only
//! while the main workload's has. Nothing is read from anyone before the
//! guest has spoken (its tty is raw only from then on).
//!
//! [`ProcessConfig::exec_socket`]: crate::runner::ProcessConfig::exec_socket

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evoke_guest::proto::{self, Frame, FrameBuffer, MAIN_SESSION, OUTPUT_WINDOW, STDIN_WINDOW};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signalfd::SignalFd;

/// How often the mux looks whether the guest has written yet.
const GUEST_SPOKE_POLL: Duration = Duration::from_millis(10);

/// Output acknowledgements are batched up to this many bytes (or until the
/// client has everything), so small writes do not each cost a frame.
const ACK_BATCH: usize = OUTPUT_WINDOW / 4;

/// Most exec sessions open at once; more connections are refused with an
/// error frame.
pub const MAX_SESSIONS: usize = 64;

/// What the client of a session that outlived its VM is told.
pub const VM_ENDED: &str =
    "the microVM ended before the command did (its workload exited, or the guest stopped)";

/// Exec frames from the guest, passed from the vCPU thread that wrote them
/// to the mux thread, which is woken through an eventfd.
pub struct Mailbox {
    frames: Mutex<VecDeque<Vec<u8>>>,
    wake: EventFd,
}

impl Mailbox {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Mailbox {
            frames: Mutex::new(VecDeque::new()),
            wake: EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?,
        }))
    }

    fn post(&self, frame: Vec<u8>) {
        lock(&self.frames).push_back(frame);
        let _ = self.wake.write(1);
    }

    fn take(&self) -> Vec<Vec<u8>> {
        let _ = self.wake.read();
        lock(&self.frames).drain(..).collect()
    }
}

/// The agent channel's output (guest → host): frames of the main workload
/// go on to `inner` (the VMM's stdout) whole and in order; exec frames go to
/// the mux. The first write also tells the mux that the guest has spoken.
/// The guest keeps within its window per session, so the mailbox holds at
/// most a window per open session.
pub struct GuestOutput<W: Write> {
    inner: W,
    frames: FrameBuffer,
    mailbox: Arc<Mailbox>,
    spoke: Arc<AtomicBool>,
}

impl<W: Write> GuestOutput<W> {
    pub fn new(inner: W, mailbox: Arc<Mailbox>, spoke: Arc<AtomicBool>) -> Self {
        GuestOutput {
            inner,
            frames: FrameBuffer::default(),
            mailbox,
            spoke,
        }
    }
}

impl<W: Write> Write for GuestOutput<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.spoke.store(true, Ordering::Release);
        self.frames.push(buf);
        loop {
            match self.frames.next_raw() {
                Ok(Some(raw)) if proto::is_session_frame(&raw) => self.mailbox.post(raw),
                Ok(Some(raw)) => self.inner.write_all(&raw)?,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "the guest wrote something that is not agent frames; dropped");
                    break;
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// `bind` or `connect` to a Unix socket at `path` even when the path is
/// longer than `sun_path` holds: through the directory's `/proc/self/fd`
/// entry.
fn with_short_path<T>(
    path: &Path,
    f: impl FnOnce(&Path) -> std::io::Result<T>,
) -> std::io::Result<T> {
    const SUN_PATH_MAX: usize = 100;
    if path.as_os_str().len() < SUN_PATH_MAX {
        return f(path);
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return f(path);
    };
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags_path()
        .open(dir)?;
    let short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    f(&short)
}

/// `O_PATH | O_DIRECTORY` for [`with_short_path`].
trait PathOnly {
    fn custom_flags_path(&mut self) -> &mut Self;
}

impl PathOnly for std::fs::OpenOptions {
    fn custom_flags_path(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
    }
}

/// The exec socket, bound and non-blocking (an old one from a previous VM
/// of the same id is replaced).
pub fn bind_exec_socket(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = with_short_path(path, |p| UnixListener::bind(p))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Connects to a VM's exec socket.
pub fn connect_exec_socket(path: &Path) -> std::io::Result<UnixStream> {
    with_short_path(path, |p| UnixStream::connect(p))
}

/// Output for a client, frame by frame, with the guest bytes each frame
/// carries (acknowledged once the frame is written).
struct Outgoing {
    bytes: Vec<u8>,
    at: usize,
    credit: usize,
}

/// One exec session's connection.
struct Client {
    /// Reads and writes use read(2)/write(2) on the socket: the seccomp
    /// filter allows those, not recv/send.
    conn: File,
    inbox: FrameBuffer,
    started: bool,
    /// The client has closed its end (or broke): its stdin ended.
    hung_up: bool,
    /// Stdin sent to the guest and not yet acknowledged.
    stdin_in_flight: usize,
    out: VecDeque<Outgoing>,
    /// Output written to the client, not yet acknowledged to the guest.
    ack_owed: usize,
    /// The guest ended the session; close once `out` is written.
    ended: bool,
}

impl Client {
    fn new(conn: File) -> Self {
        Client {
            conn,
            inbox: FrameBuffer::default(),
            started: false,
            hung_up: false,
            stdin_in_flight: 0,
            out: VecDeque::new(),
            ack_owed: 0,
            ended: false,
        }
    }

    /// Whether to read the client now: the guest has spoken, the session
    /// goes on and its stdin window has room.
    fn wants_input(&self, guest_spoke: bool) -> bool {
        guest_spoke && !self.hung_up && !self.ended && self.stdin_in_flight < STDIN_WINDOW
    }

    fn queue(&mut self, frame: &Frame, credit: usize) {
        match frame.encode() {
            Ok(bytes) => self.out.push_back(Outgoing {
                bytes,
                at: 0,
                credit,
            }),
            Err(e) => tracing::warn!(error = %e, "exec frame for the client"),
        }
    }

    /// Writes what the socket takes; returns the guest bytes now delivered.
    fn flush(&mut self) -> usize {
        let mut delivered = 0;
        while let Some(o) = self.out.front_mut() {
            if self.hung_up {
                delivered += o.credit;
                self.out.pop_front();
                continue;
            }
            match self.conn.write(&o.bytes[o.at..]) {
                Ok(n) => {
                    o.at += n;
                    if o.at == o.bytes.len() {
                        delivered += o.credit;
                        self.out.pop_front();
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => self.hung_up = true,
            }
        }
        delivered
    }
}

/// The mux's inputs and outputs.
pub struct Mux {
    /// Main workload frames from the host (the VMM's stdin).
    pub input: File,
    pub sigfd: SignalFd,
    /// Into the guest (the VM's agent input).
    pub out: File,
    pub spoke: Arc<AtomicBool>,
    pub mailbox: Arc<Mailbox>,
    pub listener: Option<UnixListener>,
}

impl Mux {
    /// Runs until the VM has ended (it closes the read end of `out`).
    pub fn run(mut self) {
        let mut pending: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 16 << 10];
        let mut input_open = true;
        let mut main_in_flight = 0usize;
        let mut clients: BTreeMap<u32, Client> = BTreeMap::new();
        let mut next_session = MAIN_SESSION + 1;
        loop {
            let open = self.spoke.load(Ordering::Acquire);
            let mut tags: Vec<u32> = Vec::new();
            let (input_ready, sig_ready, out_gone, accept_ready, mail_ready, client_ready) = {
                let wanted = |yes: bool| {
                    if yes {
                        PollFlags::POLLIN
                    } else {
                        PollFlags::empty()
                    }
                };
                // Only what was asked for is served: poll reports a hangup
                // even on an fd polled for nothing.
                let input_wanted = open && input_open && main_in_flight < STDIN_WINDOW;
                let mut fds = vec![
                    PollFd::new(self.sigfd.as_fd(), wanted(open)),
                    // No events asked: poll still reports POLLERR once the
                    // read end is closed.
                    PollFd::new(self.out.as_fd(), PollFlags::empty()),
                    PollFd::new(self.mailbox.wake.as_fd(), PollFlags::POLLIN),
                ];
                // An fd is left out while nothing is wanted from it, so a
                // hangup on it cannot make the loop spin.
                let input_i = input_wanted.then(|| {
                    fds.push(PollFd::new(self.input.as_fd(), PollFlags::POLLIN));
                    fds.len() - 1
                });
                let listen_i = self.listener.as_ref().map(|l| {
                    fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
                    fds.len() - 1
                });
                let first_client = fds.len();
                for (&id, c) in &clients {
                    let mut ev = PollFlags::empty();
                    if c.wants_input(open) {
                        ev |= PollFlags::POLLIN;
                    }
                    if !c.out.is_empty() && !c.hung_up {
                        ev |= PollFlags::POLLOUT;
                    }
                    if !ev.is_empty() {
                        fds.push(PollFd::new(c.conn.as_fd(), ev));
                        tags.push(id);
                    }
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
                        tracing::error!(error = %e, "agent mux: poll");
                        return;
                    }
                }
                let hit = |i: usize| {
                    fds.get(i)
                        .and_then(|f| f.revents())
                        .is_some_and(|r| !r.is_empty())
                };
                let clients_hit: Vec<bool> =
                    (0..tags.len()).map(|i| hit(first_client + i)).collect();
                let hit_at = |i: Option<usize>| i.is_some_and(hit);
                (
                    hit_at(input_i),
                    open && hit(0),
                    hit(1),
                    hit_at(listen_i),
                    hit(2),
                    clients_hit,
                )
            };
            if out_gone {
                for c in clients.values_mut() {
                    if !c.ended {
                        c.queue(
                            &Frame::ExecError {
                                session: MAIN_SESSION,
                                message: VM_ENDED.into(),
                            },
                            0,
                        );
                    }
                    // Best effort, without blocking: the VMM is ending.
                    c.flush();
                }
                return;
            }
            if sig_ready {
                while let Ok(Some(info)) = self.sigfd.read_signal() {
                    let sig = info.ssi_signo as i32;
                    tracing::debug!(signal = sig, "forwarding a signal to the workload");
                    if Frame::Signal(sig).write_to(&mut self.out).is_err() {
                        return;
                    }
                }
            }
            if input_ready {
                match self.input.read(&mut buf) {
                    Ok(0) => input_open = false,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => input_open = false,
                }
                loop {
                    match proto::whole_frame_len(&pending) {
                        Ok(Some(len)) => {
                            tracing::trace!(bytes = len, "relaying a frame to the guest");
                            if pending[0] == STDIN_KIND {
                                main_in_flight += len - proto::HEADER_LEN;
                            }
                            if self.out.write_all(&pending[..len]).is_err() {
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
            if accept_ready {
                if let Some(l) = &self.listener {
                    while let Some(conn) = accept(l) {
                        if clients.len() >= MAX_SESSIONS {
                            let mut c = Client::new(conn);
                            c.queue(
                                &Frame::ExecError {
                                    session: MAIN_SESSION,
                                    message: format!(
                                        "too many exec sessions in this microVM (limit {MAX_SESSIONS})"
                                    ),
                                },
                                0,
                            );
                            c.flush();
                            continue;
                        }
                        // Session numbers are not reused while the VM runs.
                        clients.insert(next_session, Client::new(conn));
                        next_session = next_session.wrapping_add(1).max(1);
                    }
                }
            }
            if mail_ready {
                for raw in self.mailbox.take() {
                    let frame = match Frame::decode(&raw) {
                        Ok(f) => f,
                        Err(e) => {
                            tracing::warn!(error = %e, "bad exec frame from the guest");
                            continue;
                        }
                    };
                    if let Some(ack) = route_from_guest(frame, &mut clients, &mut main_in_flight) {
                        if ack.write_to(&mut self.out).is_err() {
                            return;
                        }
                    }
                }
            }
            for (hit, id) in client_ready.into_iter().zip(tags) {
                let Some(c) = clients.get_mut(&id) else {
                    continue;
                };
                if hit && c.wants_input(open) {
                    read_client(id, c, &mut buf);
                }
                if open && !self.forward_client_frames(id, c) {
                    return;
                }
            }
            // Deliver output, acknowledge it to the guest, close what ended.
            let mut closed = Vec::new();
            for (&id, c) in clients.iter_mut() {
                c.ack_owed += c.flush();
                if c.ack_owed > 0 && (c.ack_owed >= ACK_BATCH || c.out.is_empty()) {
                    let ack = Frame::OutputAck {
                        session: id,
                        bytes: c.ack_owed as u32,
                    };
                    if ack.write_to(&mut self.out).is_err() {
                        return;
                    }
                    c.ack_owed = 0;
                }
                if c.hung_up && c.started && !c.ended {
                    // The caller left while its command runs: close the
                    // command's stdin and hang up on it, as a terminal would.
                    // What it still writes is acknowledged unread.
                    let eof = Frame::ExecStdin {
                        session: id,
                        data: Vec::new(),
                    };
                    let hup = Frame::ExecSignal {
                        session: id,
                        signal: libc::SIGHUP,
                    };
                    if eof.write_to(&mut self.out).is_err() || hup.write_to(&mut self.out).is_err()
                    {
                        return;
                    }
                }
                if (c.ended && c.out.is_empty()) || c.hung_up {
                    closed.push(id);
                }
            }
            for id in closed {
                clients.remove(&id);
            }
        }
    }

    /// Passes a client's whole frames on to the guest under its session
    /// number. `false` when the guest is gone.
    fn forward_client_frames(&mut self, id: u32, c: &mut Client) -> bool {
        let mut to_guest = Vec::new();
        loop {
            let frame = match c.inbox.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(session = id, error = %e, "exec client sent bad frames; hanging up");
                    c.hung_up = true;
                    break;
                }
            };
            match frame {
                Frame::ExecStart { request, .. } if !c.started => {
                    c.started = true;
                    to_guest.push(Frame::ExecStart {
                        session: id,
                        request,
                    });
                }
                Frame::ExecStdin { data, .. } if c.started => {
                    c.stdin_in_flight += data.len();
                    to_guest.push(Frame::ExecStdin { session: id, data });
                }
                Frame::ExecResize { cols, rows, .. } if c.started => {
                    to_guest.push(Frame::ExecResize {
                        session: id,
                        cols,
                        rows,
                    })
                }
                Frame::ExecSignal { signal, .. } if c.started => to_guest.push(Frame::ExecSignal {
                    session: id,
                    signal,
                }),
                other => {
                    tracing::debug!(session = id, frame = ?other.session(), "exec client frame ignored")
                }
            }
        }
        for f in to_guest {
            if f.write_to(&mut self.out).is_err() {
                return false;
            }
        }
        true
    }
}

/// The kind byte of [`Frame::Stdin`] (what the main stdin window counts).
const STDIN_KIND: u8 = 17;

fn accept(l: &UnixListener) -> Option<File> {
    use nix::sys::socket::{accept4, SockFlag};
    match accept4(
        l.as_fd().as_raw_fd(),
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    ) {
        Ok(fd) => Some(File::from(owned(fd))),
        Err(nix::Error::EAGAIN) => None,
        Err(e) => {
            tracing::warn!(error = %e, "exec socket accept");
            None
        }
    }
}

#[allow(unsafe_code)]
fn owned(fd: std::os::fd::RawFd) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` was just returned by accept4 and is owned by no one else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The size (columns, rows) of the terminal `fd` is on, if it is one.
#[allow(unsafe_code)]
pub fn terminal_size(fd: std::os::fd::BorrowedFd<'_>) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the valid, writable
    // pointer; the fd is borrowed, so open for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

fn read_client(id: u32, c: &mut Client, buf: &mut [u8]) {
    match c.conn.read(buf) {
        Ok(0) => c.hung_up = true,
        Ok(n) => c.inbox.push(&buf[..n]),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
        Err(e) => {
            tracing::debug!(session = id, error = %e, "exec client read");
            c.hung_up = true;
        }
    }
}

/// A guest exec frame goes to its client with the session number cleared;
/// stdin acknowledgements open the window they name. Output of a session
/// whose client has left is acknowledged at once (returned, to send).
fn route_from_guest(
    frame: Frame,
    clients: &mut BTreeMap<u32, Client>,
    main_in_flight: &mut usize,
) -> Option<Frame> {
    if let Frame::StdinAck { session, bytes } = frame {
        let bytes = bytes as usize;
        if session == MAIN_SESSION {
            *main_in_flight = main_in_flight.saturating_sub(bytes);
        } else if let Some(c) = clients.get_mut(&session) {
            c.stdin_in_flight = c.stdin_in_flight.saturating_sub(bytes);
        }
        return None;
    }
    let session = frame.session()?;
    let Some(c) = clients.get_mut(&session) else {
        return match frame {
            Frame::ExecStdout { data, .. } | Frame::ExecStderr { data, .. } => {
                Some(Frame::OutputAck {
                    session,
                    bytes: data.len() as u32,
                })
            }
            _ => None,
        };
    };
    let s = MAIN_SESSION;
    let (out, credit) = match frame {
        Frame::ExecStdout { data, .. } => {
            let n = data.len();
            (Frame::ExecStdout { session: s, data }, n)
        }
        Frame::ExecStderr { data, .. } => {
            let n = data.len();
            (Frame::ExecStderr { session: s, data }, n)
        }
        Frame::ExecError { message, .. } => (
            Frame::ExecError {
                session: s,
                message,
            },
            0,
        ),
        Frame::ExecExit { status, .. } => {
            c.ended = true;
            (Frame::ExecExit { session: s, status }, 0)
        }
        _ => return None,
    };
    c.queue(&out, credit);
    None
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use evoke_guest::proto::ExitStatus;
    use evoke_guest::spec::ExecRequest;
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::signalfd::SfdFlags;
    use vmm_sys_util::signal::Killable;

    fn pipe() -> (File, File) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        (File::from(r), File::from(w))
    }

    /// A mux on pipes, with an exec socket in a temp dir: the test plays
    /// the host (`host_in`), the guest (`guest_in` is what reaches the
    /// guest; `guest_out` is the channel's output sink) and exec clients.
    struct Rig {
        host_in: Option<File>,
        guest_in: Option<File>,
        guest_out: GuestOutput<File>,
        main_out: File,
        socket: PathBuf,
        spoke: Arc<AtomicBool>,
        thread: std::thread::JoinHandle<()>,
        _dir: tempfile::TempDir,
    }

    fn rig(sigfd: SignalFd, spoke: bool) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("exec.sock");
        let listener = bind_exec_socket(&socket).unwrap();
        let (in_r, in_w) = pipe();
        let (g_r, g_w) = pipe();
        let (m_r, m_w) = pipe();
        let spoke = Arc::new(AtomicBool::new(spoke));
        let mailbox = Mailbox::new().unwrap();
        let mux = Mux {
            input: in_r,
            sigfd,
            out: g_w,
            spoke: spoke.clone(),
            mailbox: mailbox.clone(),
            listener: Some(listener),
        };
        let thread = std::thread::spawn(move || mux.run());
        Rig {
            host_in: Some(in_w),
            guest_in: Some(g_r),
            guest_out: GuestOutput::new(m_w, mailbox, spoke.clone()),
            main_out: m_r,
            socket,
            spoke,
            thread,
            _dir: dir,
        }
    }

    fn no_signals() -> SignalFd {
        SignalFd::with_flags(&SigSet::empty(), SfdFlags::SFD_NONBLOCK).unwrap()
    }

    impl Rig {
        fn guest_reads(&mut self) -> Frame {
            let g = self.guest_in.as_mut().unwrap();
            Frame::read_from(g).unwrap().expect("a frame for the guest")
        }

        fn guest_writes(&mut self, f: Frame) {
            f.write_to(&mut self.guest_out).unwrap();
        }

        fn nothing_for_the_guest(&self, ms: u8) -> bool {
            let g = self.guest_in.as_ref().unwrap();
            let mut fds = [PollFd::new(g.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(ms)).unwrap() == 0
        }

        /// The VM ends: the mux sees the guest's input closed.
        fn end_vm(mut self) {
            drop(self.guest_in.take());
            for _ in 0..300 {
                if self.thread.is_finished() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(
                self.thread.is_finished(),
                "mux still running after the VM ended"
            );
            self.thread.join().unwrap();
        }
    }

    fn client(rig: &Rig, argv: &[&str]) -> UnixStream {
        let mut c = connect_exec_socket(&rig.socket).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Frame::ExecStart {
            session: 0,
            request: ExecRequest {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                stdin: true,
                ..Default::default()
            },
        }
        .write_to(&mut c)
        .unwrap();
        c
    }

    #[test]
    fn a_signal_becomes_a_frame_between_whole_input_frames_and_the_relay_ends_with_the_vm() {
        let mut set = SigSet::empty();
        set.add(Signal::SIGUSR1);
        // Blocked here, so in the mux thread too; sent to that thread only.
        set.thread_block().unwrap();
        let sigfd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK).unwrap();
        let mut r = rig(sigfd, false);
        let mut stdin_frame = Vec::new();
        Frame::Stdin(b"typed".to_vec())
            .write_to(&mut stdin_frame)
            .unwrap();
        let host = r.host_in.as_mut().unwrap();
        host.write_all(&stdin_frame[..3]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        r.thread.kill(libc::SIGUSR1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        // Nothing reaches the guest before it has written to the channel.
        assert!(r.nothing_for_the_guest(100));
        r.spoke.store(true, Ordering::Release);
        std::thread::sleep(Duration::from_millis(50));
        let host = r.host_in.as_mut().unwrap();
        host.write_all(&stdin_frame[3..]).unwrap();
        drop(r.host_in.take());
        assert_eq!(r.guest_reads(), Frame::Signal(libc::SIGUSR1));
        assert_eq!(r.guest_reads(), Frame::Stdin(b"typed".to_vec()));
        // The VM side closing its end is what stops the relay.
        r.end_vm();
    }

    #[test]
    fn input_that_is_not_frames_is_cut_off_instead_of_passed_on_in_pieces() {
        let mut r = rig(no_signals(), true);
        // A header announcing 4 GiB: not a frame of this protocol.
        let host = r.host_in.as_mut().unwrap();
        host.write_all(&[2, 0xff, 0xff, 0xff, 0xff, b'x']).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(r.host_in.take());
        assert!(
            r.nothing_for_the_guest(100),
            "bytes that are not frames reached the guest"
        );
        r.end_vm();
    }

    #[test]
    fn a_terminals_size_is_read_and_a_pipe_has_none() {
        let pty = nix::pty::openpty(
            Some(&nix::pty::Winsize {
                ws_row: 33,
                ws_col: 99,
                ws_xpixel: 0,
                ws_ypixel: 0,
            }),
            None,
        )
        .unwrap();
        assert_eq!(terminal_size(pty.slave.as_fd()), Some((99, 33)));
        let (r, _w) = pipe();
        assert_eq!(terminal_size(r.as_fd()), None);
    }

    #[test]
    fn guest_output_passes_main_frames_on_and_keeps_exec_frames_for_the_mux() {
        let mailbox = Mailbox::new().unwrap();
        let spoke = Arc::new(AtomicBool::new(false));
        let mut main = Vec::new();
        let mut out = GuestOutput::new(&mut main, mailbox.clone(), spoke.clone());
        let exec = Frame::ExecStdout {
            session: 3,
            data: b"x".to_vec(),
        };
        let wire: Vec<u8> = [Frame::Ready, exec.clone(), Frame::Stdout(b"y".to_vec())]
            .iter()
            .flat_map(|f| f.encode().unwrap())
            .collect();
        // Split mid-frame, as virtio buffers may be.
        out.write_all(&wire[..7]).unwrap();
        out.write_all(&wire[7..]).unwrap();
        drop(out);
        assert!(spoke.load(Ordering::Acquire));
        let mut r = main.as_slice();
        assert_eq!(Frame::read_from(&mut r).unwrap(), Some(Frame::Ready));
        assert_eq!(
            Frame::read_from(&mut r).unwrap(),
            Some(Frame::Stdout(b"y".to_vec()))
        );
        assert_eq!(Frame::read_from(&mut r).unwrap(), None);
        let mail = mailbox.take();
        assert_eq!(mail.len(), 1);
        assert_eq!(Frame::decode(&mail[0]).unwrap(), exec);
    }

    #[test]
    fn an_exec_client_gets_a_session_its_stdin_resizes_output_and_exit_while_the_guest_gets_acks() {
        let mut r = rig(no_signals(), true);
        let mut c = client(&r, &["cat"]);
        let Frame::ExecStart { session, request } = r.guest_reads() else {
            panic!("no exec start")
        };
        assert_ne!(session, MAIN_SESSION);
        assert_eq!(request.argv, ["cat"]);
        Frame::ExecStdin {
            session: 0,
            data: b"in".to_vec(),
        }
        .write_to(&mut c)
        .unwrap();
        assert_eq!(
            r.guest_reads(),
            Frame::ExecStdin {
                session,
                data: b"in".to_vec()
            }
        );
        Frame::ExecResize {
            session: 0,
            cols: 120,
            rows: 40,
        }
        .write_to(&mut c)
        .unwrap();
        assert_eq!(
            r.guest_reads(),
            Frame::ExecResize {
                session,
                cols: 120,
                rows: 40
            }
        );
        r.guest_writes(Frame::ExecStdout {
            session,
            data: b"out".to_vec(),
        });
        assert_eq!(
            Frame::read_from(&mut c).unwrap(),
            Some(Frame::ExecStdout {
                session: 0,
                data: b"out".to_vec()
            })
        );
        // Delivered to the client, so acknowledged to the guest.
        assert_eq!(r.guest_reads(), Frame::OutputAck { session, bytes: 3 });
        let status = ExitStatus {
            code: 4,
            signal: 0,
            oom_killed: false,
        };
        r.guest_writes(Frame::ExecExit { session, status });
        assert_eq!(
            Frame::read_from(&mut c).unwrap(),
            Some(Frame::ExecExit { session: 0, status })
        );
        // The session is over: the connection closes.
        assert_eq!(Frame::read_from(&mut c).unwrap(), None);
        r.end_vm();
    }

    #[test]
    fn a_client_of_a_vm_that_ends_is_told_so_and_a_client_that_leaves_is_hung_up_on() {
        let mut r = rig(no_signals(), true);
        let leaver = client(&r, &["sleep", "100"]);
        let Frame::ExecStart { session: first, .. } = r.guest_reads() else {
            panic!("no exec start")
        };
        drop(leaver);
        assert_eq!(
            r.guest_reads(),
            Frame::ExecStdin {
                session: first,
                data: Vec::new()
            }
        );
        assert_eq!(
            r.guest_reads(),
            Frame::ExecSignal {
                session: first,
                signal: libc::SIGHUP
            }
        );
        // Output of the abandoned session is acknowledged unread.
        r.guest_writes(Frame::ExecStdout {
            session: first,
            data: b"late".to_vec(),
        });
        assert_eq!(
            r.guest_reads(),
            Frame::OutputAck {
                session: first,
                bytes: 4
            }
        );
        let mut stayer = client(&r, &["sleep", "100"]);
        let Frame::ExecStart {
            session: second, ..
        } = r.guest_reads()
        else {
            panic!("no exec start")
        };
        assert_ne!(first, second, "session numbers are not reused");
        r.end_vm();
        match Frame::read_from(&mut stayer).unwrap() {
            Some(Frame::ExecError { message, .. }) => assert_eq!(message, VM_ENDED),
            other => panic!("want an error frame, got {other:?}"),
        }
        assert_eq!(Frame::read_from(&mut stayer).unwrap(), None);
    }

    #[test]
    fn the_main_workloads_stdin_stops_at_its_window_until_the_guest_acknowledges() {
        let mut r = rig(no_signals(), true);
        let chunk = vec![b'z'; 16 << 10];
        let mut host = r.host_in.take().unwrap();
        let writer = std::thread::spawn(move || {
            for _ in 0..(2 * STDIN_WINDOW / chunk.len()) {
                if Frame::Stdin(chunk.clone()).write_to(&mut host).is_err() {
                    return;
                }
            }
        });
        let mut got = 0;
        while got < STDIN_WINDOW {
            match r.guest_reads() {
                Frame::Stdin(b) => got += b.len(),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(
            r.nothing_for_the_guest(200),
            "more than a window of stdin was sent unacknowledged"
        );
        r.guest_writes(Frame::StdinAck {
            session: MAIN_SESSION,
            bytes: STDIN_WINDOW as u32,
        });
        while got < 2 * STDIN_WINDOW {
            match r.guest_reads() {
                Frame::Stdin(b) => got += b.len(),
                other => panic!("unexpected {other:?}"),
            }
        }
        writer.join().unwrap();
        let _ = &r.main_out;
        r.end_vm();
    }
}
