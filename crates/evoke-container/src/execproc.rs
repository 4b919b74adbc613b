//! The life of a process started by [`crate::exec`], and the handle that
//! makes sure it ends reaped.
//!
//! Who reaps what: `exec` forks an intermediate child that joins the
//! container's namespaces and cgroup and clones the process with
//! CLONE_PARENT, so the process is a child of the caller (not of the
//! intermediate, and not of the container's init) while it lives in the
//! container's pid namespace. `exec` reaps the intermediate before it
//! returns; the process is the caller's to reap.
//!
//! Why it matters: when a container's init dies, the kernel kills the rest
//! of its pid namespace and then waits, inside the init's exit, until every
//! process of the namespace has been released, including the ones whose
//! parent is outside (ours). A zombie the caller never reaps therefore
//! keeps the init from ever becoming a zombie itself: SIGKILL seems to do
//! nothing, its pidfd does not fire and a pod's deletion hangs.
//!
//! [`ExecChild`] owns the pid: [`ExecChild::wait`] or
//! [`ExecChild::wait_timeout`] reap it, and dropping it unreaped (an error
//! path, a caller that gives up) kills and reaps it. A caller that abandons
//! a blocking exec without dropping the handle (a probe whose async
//! timeout fired while its blocking thread still waits) still has that
//! thread reap the process when it ends; give [`ExecChild::wait_timeout`]
//! the deadline instead, so the process is killed at once.
#![allow(unsafe_code)]

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::{Error, ExitStatus, Result};

/// A process started by [`crate::exec`], not yet reaped. Dropping it
/// unreaped kills (SIGKILL) and reaps it.
#[derive(Debug)]
pub struct ExecChild {
    pid: Pid,
    /// Becomes readable when the process exits; `None` where pidfds are
    /// missing (then [`ExecChild::wait_timeout`] polls).
    pidfd: Option<OwnedFd>,
    reaped: bool,
}

impl ExecChild {
    /// Takes charge of `pid`, which must be an unreaped child of ours.
    pub fn adopt(pid: Pid) -> ExecChild {
        ExecChild {
            pid,
            pidfd: pidfd_open(pid).ok(),
            reaped: false,
        }
    }

    /// The host pid.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        // Unreaped, so the pid still names our process.
        nix::sys::signal::kill(self.pid, signal).map_err(|e| Error::sys("kill", e))
    }

    /// Waits for the process to end and reaps it.
    pub fn wait(mut self) -> Result<ExitStatus> {
        let st = reap(self.pid, false)?;
        self.reaped = true;
        st.ok_or_else(|| Error::sys("waitpid", nix::Error::ECHILD))
    }

    /// Waits at most `timeout`. If the process is still running then, it is
    /// killed and reaped and the answer is `None`.
    pub fn wait_timeout(mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = reap(self.pid, true)? {
                self.reaped = true;
                return Ok(Some(st));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Dropping kills and reaps.
                return Ok(None);
            }
            match &self.pidfd {
                Some(fd) => {
                    let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
                    let mut fds = [nix::poll::PollFd::new(
                        fd.as_fd(),
                        nix::poll::PollFlags::POLLIN,
                    )];
                    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
                        Ok(_) | Err(nix::Error::EINTR) => {}
                        Err(e) => return Err(Error::sys("poll pidfd", e)),
                    }
                }
                None => std::thread::sleep(left.min(Duration::from_millis(10))),
            }
        }
    }
}

impl Drop for ExecChild {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        let _ = nix::sys::signal::kill(self.pid, Signal::SIGKILL);
        if let Err(e) = reap(self.pid, false) {
            tracing::warn!(pid = self.pid.as_raw(), error = %e, "reaping an exec'd process");
        }
    }
}

/// Reaps `pid` if it has ended (or, unless `nohang`, once it ends). `None`
/// means still running.
fn reap(pid: Pid, nohang: bool) -> Result<Option<ExitStatus>> {
    let flags = nohang.then_some(nix::sys::wait::WaitPidFlag::WNOHANG);
    loop {
        return match waitpid(pid, flags) {
            Ok(WaitStatus::Exited(_, c)) => Ok(Some(ExitStatus {
                code: c,
                signal: None,
                oom_killed: false,
            })),
            Ok(WaitStatus::Signaled(_, s, _)) => Ok(Some(ExitStatus {
                code: 128 + s as i32,
                signal: Some(s as i32),
                oom_killed: false,
            })),
            Ok(WaitStatus::StillAlive) => Ok(None),
            Ok(_) | Err(nix::Error::EINTR) => continue,
            Err(e) => Err(Error::sys("waitpid", e)),
        };
    }
}

/// pidfd_open(2) (Linux 5.3+).
fn pidfd_open(pid: Pid) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and a flags word and touches no memory
    // of ours; it returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("pidfd out of range"))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else
    // owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    // The ExecChild takes over waiting, which clippy cannot see.
    #[allow(clippy::zombie_processes)]
    fn spawn(args: &[&str]) -> ExecChild {
        let child = std::process::Command::new(args[0])
            .args(&args[1..])
            .spawn()
            .unwrap();
        // std's Child does not wait on drop: the pid is ours to reap.
        ExecChild::adopt(Pid::from_raw(child.id() as i32))
    }

    fn is_gone(pid: Pid) -> bool {
        // Reaped: no /proc entry (or one for a reused pid that is not a zombie).
        !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
    }

    #[test]
    fn a_process_that_ends_in_time_gives_its_exit_code() {
        let c = spawn(&["sh", "-c", "exit 3"]);
        let st = c.wait_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(st.code, 3);
    }

    #[test]
    fn a_process_past_its_timeout_is_killed_and_reaped() {
        let c = spawn(&["sleep", "30"]);
        let pid = c.pid();
        let t = Instant::now();
        assert!(c
            .wait_timeout(Duration::from_millis(200))
            .unwrap()
            .is_none());
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(is_gone(pid), "pid {pid} left as a zombie");
    }

    #[test]
    fn dropping_an_unwaited_process_kills_and_reaps_it() {
        let c = spawn(&["sleep", "30"]);
        let pid = c.pid();
        drop(c);
        assert!(is_gone(pid), "pid {pid} left as a zombie");
    }

    #[test]
    fn wait_reports_a_signal_as_128_plus_its_number() {
        let c = spawn(&["sleep", "30"]);
        c.signal(Signal::SIGTERM).unwrap();
        let st = c.wait().unwrap();
        assert_eq!((st.code, st.signal), (143, Some(15)));
    }
}
