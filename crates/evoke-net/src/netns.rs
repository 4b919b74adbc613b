//! Named network namespaces kept alive by a bind mount on a file, as
//! `ip netns add` does, and running code inside one.
//!
//! Namespace switches are per thread, so every operation runs on a short-lived
//! thread of its own and never changes the namespace of a caller's thread
//! (least of all a tokio worker).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

use crate::NetError;

fn ns_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(nix::Error) -> NetError + 'a {
    move |source| NetError::Netns {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Creates a new network namespace pinned at `path` (its parent directory is
/// created). An existing namespace at `path` is left as it is.
pub fn create(path: &Path) -> Result<(), NetError> {
    if is_netns(path) {
        return Ok(());
    }
    create_then(path, || ())
}

/// Creates a new network namespace pinned at `path` and runs `inside` in it,
/// on the very thread that made it (so a netlink socket for the new
/// namespace costs no second thread and no `setns`). Fails if `path` is
/// a namespace already.
pub fn create_then<R: Send>(path: &Path, inside: impl FnOnce() -> R + Send) -> Result<R, NetError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| NetError::io(dir, e))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .or_else(|e| match e.kind() {
            // A placeholder left by a failed attempt is reused; a mounted
            // namespace is not.
            std::io::ErrorKind::AlreadyExists if !is_netns(path) => Ok(std::fs::File::open(path)?),
            _ => Err(e),
        })
        .map_err(|e| NetError::io(path, e))?;
    let target = path.to_path_buf();
    let result = std::thread::scope(|s| {
        s.spawn(|| -> Result<R, NetError> {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(ns_err(&target, "unshare"))?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(ns_err(&target, "bind mount"))?;
            Ok(inside())
        })
        .join()
        .unwrap_or_else(|_| Err(NetError::BadInput("namespace thread panicked".into())))
    });
    if result.is_err() {
        let _ = remove(path);
    }
    result
}

/// Creates a new network namespace that nothing pins: it lives as long as
/// the returned fd (or a later [`pin`]). Runs `inside` in it on the thread
/// that made it, like [`create_then`]. A process killed while holding it
/// leaves nothing behind: the kernel frees the namespace and its devices.
pub fn create_held<R: Send>(inside: impl FnOnce() -> R + Send) -> Result<(OwnedFd, R), NetError> {
    let here = Path::new("/proc/thread-self/ns/net");
    std::thread::scope(|s| {
        s.spawn(|| -> Result<(OwnedFd, R), NetError> {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(ns_err(here, "unshare"))?;
            let fd = std::fs::File::open(here).map_err(|e| NetError::io(here, e))?;
            Ok((OwnedFd::from(fd), inside()))
        })
        .join()
        .unwrap_or_else(|_| Err(NetError::BadInput("namespace thread panicked".into())))
    })
}

/// Pins the namespace `ns` (from [`create_held`]) at `path`, as [`create`]
/// would have. Fails if `path` is a namespace already.
pub fn pin(ns: BorrowedFd<'_>, path: &Path) -> Result<(), NetError> {
    if is_netns(path) {
        return Err(NetError::BadInput(format!(
            "network namespace {} exists already",
            path.display()
        )));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| NetError::io(dir, e))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| NetError::io(path, e))?;
    let source = format!("/proc/self/fd/{}", ns.as_raw_fd());
    if let Err(e) = nix::mount::mount(
        Some(source.as_str()),
        path,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    ) {
        let _ = std::fs::remove_file(path);
        return Err(ns_err(path, "bind mount")(e));
    }
    Ok(())
}

/// Unmounts and removes the namespace file at `path`; a missing one is fine.
/// The kernel frees the namespace (and any interfaces left in it) once the
/// last process and mount holding it are gone.
pub fn remove(path: &Path) -> Result<(), NetError> {
    match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(e) => return Err(ns_err(path, "unmount")(e)),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NetError::io(path, e)),
    }
}

/// Whether `path` is a mounted network namespace file.
pub fn is_netns(path: &Path) -> bool {
    // A pinned namespace file is a nsfs inode; an unmounted placeholder is an
    // ordinary empty file on the parent file system.
    match nix::sys::statfs::statfs(path) {
        Ok(st) => st.filesystem_type() == nix::sys::statfs::NSFS_MAGIC,
        Err(_) => false,
    }
}

/// Runs `f` on a fresh thread that has joined the namespace at `path`
/// (`None`: the caller's namespace) and returns its result.
pub fn run_in<R: Send>(path: Option<&Path>, f: impl FnOnce() -> R + Send) -> Result<R, NetError> {
    let path: Option<PathBuf> = path.map(Path::to_path_buf);
    std::thread::scope(|s| {
        s.spawn(move || {
            if let Some(p) = &path {
                let file = std::fs::File::open(p).map_err(|e| NetError::io(p, e))?;
                nix::sched::setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(ns_err(p, "setns"))?;
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(NetError::BadInput("namespace thread panicked".into())))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn privileged() -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("namespace tests need root and CI=true");
        }
        eprintln!("skipping: namespace tests need root");
        false
    }

    fn ino(p: &Path) -> u64 {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).expect("stat"))
    }

    #[test]
    fn a_held_namespace_is_pinned_at_a_path_once_and_outlives_its_fd() {
        if !privileged() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("netns").join("evoke-pinned");
        let (fd, inside) =
            create_held(|| ino(Path::new("/proc/thread-self/ns/net"))).expect("held");
        assert_ne!(
            inside,
            ino(Path::new("/proc/self/ns/net")),
            "a new namespace"
        );
        pin(fd.as_fd(), &path).expect("pin");
        drop(fd);
        assert!(is_netns(&path));
        assert_eq!(ino(&path), inside, "the same namespace");
        let (other, _) = create_held(|| ()).expect("another");
        assert!(
            pin(other.as_fd(), &path).is_err(),
            "a pinned path is refused"
        );
        remove(&path).expect("remove");
        assert!(!path.exists());
    }
}
