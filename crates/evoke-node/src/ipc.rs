//! A pod's shared IPC namespace: containers of one pod see the same System
//! V IPC and POSIX message queues, as Kubernetes promises. The namespace is
//! kept alive by a bind mount (like `ip netns` does for network
//! namespaces), so it needs no holder process and survives agent restarts.

use std::path::PathBuf;
use std::process::Command;

use crate::network::netns_name;
use crate::NodeError;

/// Where pods' IPC namespaces are pinned.
pub const IPC_DIR: &str = "/run/evoke/ipc";

/// The pinned IPC namespace of a pod.
pub fn path(pod_uid: &str) -> PathBuf {
    PathBuf::from(IPC_DIR).join(netns_name(pod_uid))
}

fn is_pinned(p: &std::path::Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(4) == Some(p.to_string_lossy().as_ref()))
        })
        .unwrap_or(false)
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
    let out = Command::new("unshare")
        .arg(format!("--ipc={}", p.display()))
        .arg("true")
        .output()
        .map_err(|source| NodeError::Io {
            path: "unshare".into(),
            source,
        })?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&p);
        return Err(NodeError::Network(format!(
            "pinning the ipc namespace at {}: {}",
            p.display(),
            String::from_utf8_lossy(&out.stderr).trim()
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
        let has_unshare = Command::new("unshare").arg("--version").output().is_ok();
        if !nix::unistd::geteuid().is_root() || !has_unshare {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("this test needs root and util-linux unshare under CI");
            }
            eprintln!("skipping: needs root and unshare");
            return;
        }
        let uid = format!("ipc-test-{}-{}", std::process::id(), rand::random::<u32>());
        let p = setup(&uid).unwrap();
        assert!(is_pinned(&p));
        let ino = std::fs::metadata(&p)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap();
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
