//! The few raw syscalls the agent needs that std and nix do not wrap here.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Loads a kernel module from an open `.ko` file.
pub fn finit_module(file: &std::fs::File) -> io::Result<()> {
    let params = c"";
    // SAFETY: the fd is open for the call's duration and params is a valid
    // NUL-terminated string; the kernel copies what it needs.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes `cmd` start in its own session, chrooted into `root`, in `workdir`,
/// as `uid`/`gid` with no supplementary groups.
pub fn confine(cmd: &mut Command, root: &str, workdir: &str, uid: u32, gid: u32) -> io::Result<()> {
    let root = CString::new(root).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let workdir =
        CString::new(workdir).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let hook = move || -> io::Result<()> {
        // Only async-signal-safe libc calls on pre-made C strings: this runs
        // between fork and exec.
        let check = |rc: libc::c_int| {
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        // SAFETY: plain syscalls with valid NUL-terminated paths and no
        // pointers kept after return.
        unsafe {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            check(libc::chroot(root.as_ptr()))?;
            check(libc::chdir(workdir.as_ptr()))?;
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(gid))?;
            check(libc::setuid(uid))?;
        }
        Ok(())
    };
    // SAFETY: the hook only makes async-signal-safe syscalls and allocates
    // nothing (the agent is single-threaded anyway).
    unsafe {
        cmd.pre_exec(hook);
    }
    Ok(())
}

/// Seconds since the guest kernel started its clock (CLOCK_BOOTTIME); needs
/// no /proc, so init can stamp its first line with it.
pub fn boottime_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec for the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}
