//! The syscall the pod workers need to learn of a workload's exit from the
//! async reactor instead of a parked thread: pidfd_open.
#![allow(unsafe_code)]

use std::os::fd::{FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Opens a pidfd for `pid` (Linux 5.3+). It becomes readable once the
/// process has exited, whether or not we are its parent, and keeps naming
/// that process even if the pid is reused.
pub fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and a flags word, touches no memory of
    // ours, and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("pidfd out of range"))?;
    // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Resolves once the process behind `pidfd` has exited (it may still be a
/// zombie: reaping is the tier's job, so it can read the exit status).
pub async fn exited(pidfd: OwnedFd) -> std::io::Result<()> {
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open
    // and names the same pidfd for as long as it is registered.
    let fd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }?;
    // A pidfd never becomes unreadable again once the process is gone, so
    // one readiness event is the answer; nothing is read from it.
    let _ready = fd.readable().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn pidfd_resolves_when_the_process_exits_and_not_before() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id() as i32;
        let fd = pidfd_open(pid).expect("pidfd_open (Linux 5.3+)");
        let mut wait = Box::pin(exited(fd));
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut wait)
                .await
                .is_err(),
            "resolved while the process still ran"
        );
        child.kill().expect("kill sleep");
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("the pidfd did not fire within 10 s of the kill")
            .expect("pidfd readiness");
        // Still a zombie for its parent to reap: the exit status is intact.
        let status = child.wait().expect("reap");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
    }

    #[test]
    fn pidfd_of_a_missing_process_is_an_error() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id() as i32;
        child.wait().expect("reap");
        // The pid is free now (reuse within this test is vanishingly unlikely).
        assert!(pidfd_open(pid).is_err());
    }
}
