//! Pseudo-terminals for `exec -t`: the two ioctls nix does not wrap safely
//! (making the terminal the child's controlling tty, and resizing it).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes the child's stdin (the pty's slave end) its controlling terminal.
/// Must be registered after the hook that calls `setsid` (hooks run in
/// order, after stdio is in place).
pub fn make_controlling_tty(cmd: &mut Command) {
    let hook = || -> io::Result<()> {
        // SAFETY: an ioctl on fd 0 with an integer argument; async-signal-safe.
        let rc = unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook makes one async-signal-safe syscall and allocates
    // nothing.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Sets the terminal size on the pty's master end; the kernel sends
/// SIGWINCH to the terminal's foreground process group.
pub fn resize(master: BorrowedFd<'_>, cols: u16, rows: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the valid pointer for the
    // call's duration; the fd is borrowed, so open.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_resized_pty_reports_its_new_size_to_the_slave_side() {
        let pty = nix::pty::openpty(None, None).unwrap();
        resize(pty.master.as_fd(), 132, 43).unwrap();
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize into the valid pointer.
        let rc = unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!(rc, 0);
        assert_eq!((ws.ws_col, ws.ws_row), (132, 43));
    }
}
