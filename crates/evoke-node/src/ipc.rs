//! A pod's shared IPC namespace: containers of one pod see the same System
//! V IPC and POSIX message queues, as Kubernetes promises. The namespace is
//! kept alive by a bind mount (like `ip netns` does for network
//! namespaces), so it needs no holder process and survives agent restarts.

use std::path::PathBuf;

use crate::network::netns_name;
use crate::NodeError;

/// Where pods' IPC namespaces are pinned.
pub const IPC_DIR: &str = "/run/evoke/ipc";

/// The pinned IPC namespace of a pod.
pub fn path(pod_uid: &str) -> PathBuf {
    PathBuf::from(IPC_DIR).join(netns_name(pod_uid))
}

/// Whether a namespace is bind-mounted at `p`: the file then lives on nsfs.
/// (A statfs, not a scan of /proc/self/mountinfo, which grows with every
/// container's mounts and was a visible cost in a burst of pod starts.)
fn is_pinned(p: &std::path::Path) -> bool {
    nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

/// Creates (or finds) the pod's IPC namespace; idempotent.
pub fn setup(pod_uid: &str) -> Result<PathBuf, NodeError> {
    let p = path(pod_uid);
    if is_pinned(&p) {
        return Ok(p);
    }
    std::fs::create_dir_all(IPC_DIR).map_err(|source| NodeError::Io {
        path: IPC_DIR.into(),
        source,
    })?;
    std::fs::write(&p, b"").map_err(|source| NodeError::Io {
        path: p.clone(),
        source,
    })?;
    // Namespaces belong to threads: a short-lived thread unshares a new IPC
    // namespace for itself and pins it with a bind mount, with no fork and
    // exec of unshare(1) from this large process.
    let target = p.clone();
    let pinned = std::thread::spawn(move || -> nix::Result<()> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWIPC)?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/ipc"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
    })
    .join()
    .unwrap_or(Err(nix::Error::EINVAL));
    if let Err(e) = pinned {
        let _ = std::fs::remove_file(&p);
        return Err(NodeError::Network(format!(
            "pinning the ipc namespace at {}: {e}",
            p.display()
        )));
    }
    Ok(p)
}

/// Releases the pod's IPC namespace; idempotent.
pub fn teardown(pod_uid: &str) {
    let p = path(pod_uid);
    if is_pinned(&p) {
        if let Err(e) = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(path = %p.display(), error = %e, "could not unpin ipc namespace");
        }
    }
    let _ = std::fs::remove_file(&p);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipc_namespace_is_pinned_once_and_released() {
        if !nix::unistd::geteuid().is_root() {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("this test needs root under CI");
            }
            eprintln!("skipping: needs root");
            return;
        }
        let uid = format!("ipc-test-{}-{}", std::process::id(), rand::random::<u32>());
        let p = setup(&uid).unwrap();
        assert!(is_pinned(&p));
        let ino = std::fs::metadata(&p)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap();
        let host_ipc = std::fs::metadata("/proc/self/ns/ipc")
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap();
        assert_ne!(ino, host_ipc, "the pinned namespace is a new one");
        assert_eq!(setup(&uid).unwrap(), p, "second setup reuses the namespace");
        assert_eq!(
            std::fs::metadata(&p)
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                .unwrap(),
            ino
        );
        teardown(&uid);
        assert!(!p.exists());
        teardown(&uid);
    }
}
