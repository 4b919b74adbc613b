//! The two syscalls the pod workers need: a pidfd to learn of a workload's
//! exit from the async reactor instead of a parked thread, and a cap on
//! glibc's malloc arenas.
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

/// Caps glibc's malloc arenas at `n` for the whole process.
///
/// glibc gives each thread that allocates concurrently its own arena, up to
/// 8 per core, and an arena keeps the memory freed into it. The agent and
/// the API server run short-lived blocking threads in bursts (one per
/// starting container, store writes), so the arenas' high-water marks add
/// up; two arenas keep the lock contention low on a small node and save
/// tens of MB (see docs/benchmarks.md, orchestration). Returns false where
/// the allocator refused (or is not glibc's).
pub fn cap_malloc_arenas(n: i32) -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only sets an allocator parameter; M_ARENA_MAX
        // takes effect for arenas created from now on and is thread-safe.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, n) == 1 }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        let _ = n;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn pidfd_resolves_when_the_process_exits_and_not_before() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.3")
            .spawn()
            .expect("spawn sleep");
        let fd = pidfd_open(child.id() as i32).expect("pidfd_open (Linux 5.3+)");
        let t = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(10), exited(fd))
            .await
            .expect("the pidfd did not fire within 10 s")
            .expect("pidfd readiness");
        assert!(t.elapsed() >= Duration::from_millis(200), "fired too early");
        // Still a zombie for its parent to reap: the exit status is intact.
        assert!(child.wait().expect("reap").success());
    }

    #[test]
    fn pidfd_of_a_missing_process_is_an_error() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id() as i32;
        child.wait().expect("reap");
        // The pid is free now (reuse within this test is vanishingly unlikely).
        assert!(pidfd_open(pid).is_err());
    }

    #[test]
    fn malloc_arenas_can_be_capped() {
        assert!(cap_malloc_arenas(2));
    }
}
