//! The monitor behind `evoke run -d`: a small detached process that is the
//! parent of a workload, so it can collect the exit status (and OOM kill)
//! when the command that started it is long gone.
//!
//! It is made by a double fork of the calling process rather than a re-exec:
//! the caller has already parsed everything, the child needs no new argv
//! format, and no second binary start is paid. The caller must be
//! single-threaded when it calls [`spawn_detached`] (the CLI is: no runtime
//! or worker threads are started before it).
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use crate::workload::{RuntimeError, Stdio, WorkloadRuntime, WorkloadSpec};

/// What the monitor reports back through the pipe: `ok`, or an error.
const OK: &str = "ok";
const IMAGE_NOT_FOUND: &str = "image-not-found\t";
/// A tier's own error: `TIER_ERROR tier \t message`, rebuilt as such.
const TIER_ERROR: &str = "tier\t";

/// Create and start `spec` on `rt` from a detached monitor process, and
/// return once it runs (or failed to start, with the error). The monitor
/// waits for the workload to end, records its exit through the tier, and
/// removes it first if `remove_on_exit`. Output goes to the tier's log.
pub fn spawn_detached(
    rt: &dyn WorkloadRuntime,
    spec: &WorkloadSpec,
    remove_on_exit: bool,
) -> Result<(), RuntimeError> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| RuntimeError::io("pipe for the monitor", e.into()))?;
    // SAFETY: the caller is single-threaded (documented above), so the child
    // may run arbitrary code after fork.
    match unsafe { nix::unistd::fork() }.map_err(|e| RuntimeError::io("fork monitor", e.into()))? {
        nix::unistd::ForkResult::Child => {
            drop(r);
            // A new session, then a second fork, so the monitor is no
            // session leader and is reparented to init (or a subreaper).
            let _ = nix::unistd::setsid();
            // SAFETY: still single-threaded in the child.
            match unsafe { nix::unistd::fork() } {
                Ok(nix::unistd::ForkResult::Child) => {
                    monitor(rt, spec, remove_on_exit, w);
                    std::process::exit(0);
                }
                _ => std::process::exit(0),
            }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(w);
            let _ = nix::sys::wait::waitpid(child, None);
            let mut msg = String::new();
            File::from(r)
                .read_to_string(&mut msg)
                .map_err(|e| RuntimeError::io("read from the monitor", e))?;
            if msg == OK {
                Ok(())
            } else if let Some(image) = msg.strip_prefix(IMAGE_NOT_FOUND) {
                Err(RuntimeError::ImageNotFound(image.to_string()))
            } else if let Some((tier, error)) = msg
                .strip_prefix(TIER_ERROR)
                .and_then(|m| m.split_once('\t'))
            {
                Err(RuntimeError::tier(tier, error.to_string()))
            } else if msg.is_empty() {
                Err(RuntimeError::tier(
                    rt.name(),
                    "the monitor process died before the workload started",
                ))
            } else {
                Err(RuntimeError::tier(rt.name(), msg))
            }
        }
    }
}

/// The monitor's life: start the workload, report, wait, clean up.
fn monitor(rt: &dyn WorkloadRuntime, spec: &WorkloadSpec, remove_on_exit: bool, report: OwnedFd) {
    // Let go of the caller's terminal and pipes, so whoever reads the
    // caller's output sees it end when the caller exits.
    let null = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        Ok(f) => f,
        Err(_) => return,
    };
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors; `null` stays open.
        unsafe { libc::dup2(null.as_raw_fd(), fd) };
    }
    let stdin: Option<OwnedFd> = null.try_clone().ok().map(OwnedFd::from);
    let started = rt
        .create(
            spec,
            Stdio {
                stdin,
                stdout: None,
                stderr: None,
            },
        )
        .and_then(|_| rt.start(&spec.id));
    let mut report = File::from(report);
    match &started {
        Ok(()) => {
            let _ = report.write_all(OK.as_bytes());
        }
        Err(RuntimeError::ImageNotFound(i)) => {
            let _ = write!(report, "{IMAGE_NOT_FOUND}{i}");
        }
        Err(RuntimeError::Tier { tier, error }) => {
            let _ = write!(report, "{TIER_ERROR}{tier}\t{error}");
        }
        Err(e) => {
            let _ = write!(report, "{e}");
            // Leave nothing half-made behind.
            let _ = rt.remove(&spec.id, true);
        }
    }
    drop(report);
    if started.is_err() {
        return;
    }
    match rt.wait(&spec.id, None) {
        Ok(info) => tracing::debug!(id = %spec.id, ?info, "workload ended"),
        Err(e) => tracing::warn!(id = %spec.id, error = %e, "waiting for the workload"),
    }
    if remove_on_exit {
        let _ = rt.remove(&spec.id, true);
    }
}
