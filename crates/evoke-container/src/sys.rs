//! The few raw system calls nix does not wrap safely: fork, clone with
//! CLONE_PARENT (and clone3 with CLONE_INTO_CGROUP), close_range, _exit, TIOCSWINSZ and
//! TIOCSCTTY.
#![allow(unsafe_code)]

use nix::unistd::Pid;

/// Which side of a fork we are on.
pub(crate) enum Forked {
    Parent(Pid),
    Child,
}

/// glibc's fork. The child may allocate (glibc resets its malloc locks) but
/// must not take locks that other threads of the parent might have held.
pub(crate) fn fork() -> nix::Result<Forked> {
    // SAFETY: the child only runs engine code that makes system calls and
    // allocates; it never returns into the caller's code (it exits or execs).
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(Forked::Parent(child)),
        nix::unistd::ForkResult::Child => Ok(Forked::Child),
    }
}

/// clone(2) with fork semantics (no new stack) and CLONE_PARENT, so that the
/// new process is a sibling of the caller: a child of the caller's parent.
/// `flags` adds namespace flags. Only call from a single-threaded process.
pub(crate) fn clone_sibling(flags: libc::c_int) -> nix::Result<Forked> {
    clone_forklike(flags | libc::CLONE_PARENT)
}

/// Like [`clone_sibling`], but the new process is the caller's own child.
/// Only call from a single-threaded process.
pub(crate) fn clone_child(flags: libc::c_int) -> nix::Result<Forked> {
    clone_forklike(flags)
}

fn clone_forklike(flags: libc::c_int) -> nix::Result<Forked> {
    let all = (flags | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: a NULL stack makes clone behave like fork: the child runs on a
    // copy-on-write copy of this stack. The caller is single-threaded (the
    // intermediate child of `fork`), so no lock can be held by another thread.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            all,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_int>(),
            std::ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    };
    match rc {
        -1 => Err(nix::Error::last()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(Pid::from_raw(pid as i32))),
    }
}

/// The kernel's `struct clone_args` up to `cgroup` (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Like [`clone_sibling`], but the new process starts in the cgroup v2
/// directory `cgroup` (CLONE_INTO_CGROUP), so nobody has to move it there.
/// `flags` must not hold CLONE_NEWCGROUP: the kernel makes namespaces
/// before it places the child, so the namespace would be rooted in the
/// caller's cgroup; the child unshares it itself. Single-threaded callers
/// only, as for [`clone_sibling`].
pub(crate) fn clone_sibling_into(
    flags: libc::c_int,
    cgroup: std::os::fd::BorrowedFd<'_>,
) -> nix::Result<Forked> {
    // clone3 refuses an exit signal with CLONE_PARENT: the child takes the
    // caller's own (SIGCHLD, from its fork).
    clone3_into(flags | libc::CLONE_PARENT, 0, cgroup)
}

/// Like [`clone_sibling_into`], but the new process is the caller's own
/// child. Single-threaded callers only.
pub(crate) fn clone_child_into(
    flags: libc::c_int,
    cgroup: std::os::fd::BorrowedFd<'_>,
) -> nix::Result<Forked> {
    clone3_into(flags, libc::SIGCHLD as u64, cgroup)
}

fn clone3_into(
    flags: libc::c_int,
    exit_signal: u64,
    cgroup: std::os::fd::BorrowedFd<'_>,
) -> nix::Result<Forked> {
    use std::os::fd::AsRawFd;
    let args = CloneArgs {
        flags: flags as u64 | CLONE_INTO_CGROUP,
        exit_signal,
        cgroup: cgroup.as_raw_fd() as u64,
        ..Default::default()
    };
    // SAFETY: clone3 reads `args` (size given) and, with a zero stack,
    // behaves like fork: the child continues on a copy-on-write copy of this
    // stack. The caller is single-threaded, so no lock can be held by
    // another thread in the child.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match rc {
        -1 => Err(nix::Error::last()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(Pid::from_raw(pid as i32))),
    }
}

/// include/uapi/linux/sched.h (not in every libc crate version).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Closes every descriptor in [first, last].
pub(crate) fn close_range(first: u32, last: u32) -> nix::Result<()> {
    if first > last {
        return Ok(());
    }
    // SAFETY: close_range only closes descriptors; the caller owns all of
    // them (it is the container init, about to exec) and holds no Rust
    // object over the closed range.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0 as libc::c_uint) };
    if rc == -1 {
        return Err(nix::Error::last());
    }
    Ok(())
}

/// Leaves a forked child at once, without running the parent's atexit
/// handlers or flushing its stdio buffers a second time.
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and touches no memory of ours.
    unsafe { libc::_exit(code) }
}

/// Makes stdin's terminal the controlling terminal of this session.
pub(crate) fn set_controlling_tty() -> nix::Result<()> {
    // SAFETY: TIOCSCTTY takes an int argument by value; fd 0 is the pty
    // slave we just put there.
    let rc = unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
    if rc == -1 {
        return Err(nix::Error::last());
    }
    Ok(())
}

/// Sets a terminal's size (TIOCSWINSZ).
pub(crate) fn set_winsize(fd: &impl std::os::fd::AsRawFd, rows: u16, cols: u16) -> nix::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize through the pointer, which points
    // to a valid one on our stack; the fd is open for the call's duration.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc == -1 {
        return Err(nix::Error::last());
    }
    Ok(())
}

/// Puts SIGPIPE back to its default disposition (Rust's runtime ignores it,
/// and an ignored signal stays ignored across execve).
pub(crate) fn default_sigpipe() -> nix::Result<()> {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: SIG_DFL installs no handler, so no code of ours can run in
    // signal context.
    unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) }.map(drop)
}
