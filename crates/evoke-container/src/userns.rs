//! User namespaces for the container tier (`evoke run --userns`): which
//! host ids a container's ids map to, and an image rootfs its root can use.
//!
//! A container with a user namespace maps its ids `0..count` to host ids
//! `host..host+count` (uids and gids alike), so its root is an unprivileged
//! uid on the host, as with Docker's userns-remap or podman's
//! `--userns=auto`. [`UsernsMode::Auto`] gives each container a block of
//! 65536 ids of its own from a subordinate range: user `evoke`'s entries in
//! /etc/subuid and /etc/subgid, else [`DEFAULT_SUBORDINATE`].
//!
//! The image layers are shared and owned by host root, which the container
//! does not map: its root would see them as `nobody` and could not write
//! anything. So each lower layer is mounted for the container through an
//! idmapped mount ([`idmapped_bind`]: `open_tree` + `mount_setattr` with
//! `MOUNT_ATTR_IDMAP` + `move_mount`) that shows host id `i` as `host + i`;
//! overlayfs takes these as its lowerdirs, and the upper dir belongs to the
//! container's root, so files it writes land there owned by the mapped ids.
//! No layer is copied or chowned.
#![allow(unsafe_code)]

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The subordinate range used when /etc/subuid has no `evoke` entry:
/// 1000 blocks of 65536 ids from 100000000, far above real accounts.
pub const DEFAULT_SUBORDINATE: (u32, u32) = (100_000_000, 1000 * BLOCK);

/// The ids a container gets from `--userns` (auto): 0..65535, as a whole
/// Linux system expects (nobody is 65534).
pub const BLOCK: u32 = 65_536;

/// The user whose /etc/subuid and /etc/subgid entries auto mode draws from.
pub const SUBORDINATE_USER: &str = "evoke";

/// How `--userns` was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsernsMode {
    /// A free block of [`BLOCK`] ids from the subordinate range.
    Auto,
    /// Exactly this mapping.
    Fixed(IdMap),
}

/// Container ids `0..count` are host uids `uid..uid+count` and host gids
/// `gid..gid+count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    pub uid: u32,
    pub gid: u32,
    pub count: u32,
}

/// Bad `--userns` values, missing ranges, failed mounts.
#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    #[error("invalid --userns value {0:?}: use auto or HOSTID:COUNT (e.g. 200000:65536)")]
    Invalid(String),
    #[error("--userns {0}: host id 0 would make the container's root the host's root")]
    HostRoot(String),
    #[error("--userns {0}: the range passes the largest id (4294967294)")]
    Overflow(String),
    #[error("no free block of {BLOCK} ids left in the subordinate range {start}:{count} ({source_name})")]
    Exhausted {
        start: u32,
        count: u32,
        source_name: String,
    },
    #[error("{what} {path}: {error}")]
    Io {
        what: &'static str,
        path: String,
        error: std::io::Error,
    },
    #[error("cannot make an idmapped mount of {path} ({error}): user namespaces need a kernel (5.12+) and a filesystem for the image store that support idmapped mounts (ext4, xfs, btrfs, tmpfs)")]
    NoIdmap { path: String, error: std::io::Error },
    #[error("the container's root (host uid {uid}) cannot reach {path}: make it searchable by others (chmod o+x), or use a data dir whose parents are")]
    Unreachable { uid: u32, path: String },
}

fn io(what: &'static str, path: impl AsRef<Path>, error: std::io::Error) -> UsernsError {
    UsernsError::Io {
        what,
        path: path.as_ref().display().to_string(),
        error,
    }
}

impl std::str::FromStr for UsernsMode {
    type Err = UsernsError;

    /// `auto` (or empty), or `HOSTID:COUNT` for uids and gids alike.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s == "auto" {
            return Ok(UsernsMode::Auto);
        }
        let bad = || UsernsError::Invalid(s.to_string());
        let (host, count) = s.split_once(':').ok_or_else(bad)?;
        let host: u32 = host.parse().map_err(|_| bad())?;
        let count: u32 = count.parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(bad());
        }
        if host == 0 {
            return Err(UsernsError::HostRoot(s.to_string()));
        }
        if host.checked_add(count).is_none_or(|end| end > u32::MAX - 1) {
            return Err(UsernsError::Overflow(s.to_string()));
        }
        Ok(UsernsMode::Fixed(IdMap {
            uid: host,
            gid: host,
            count,
        }))
    }
}

impl IdMap {
    fn overlaps(&self, other: &IdMap) -> bool {
        // In u64: a range may end at the top of the id space.
        let meet = |a: u32, b: u32| {
            u64::from(a) < u64::from(b) + u64::from(other.count)
                && u64::from(b) < u64::from(a) + u64::from(self.count)
        };
        meet(self.uid, other.uid) || meet(self.gid, other.gid)
    }
}

/// `user`'s first range in a /etc/subuid-style text (`name:start:count`).
pub fn subordinate_range(text: &str, user: &str) -> Option<(u32, u32)> {
    text.lines().find_map(|l| {
        let mut f = l.trim().split(':');
        if f.next()? != user {
            return None;
        }
        let start = f.next()?.parse().ok()?;
        let count = f.next()?.parse().ok()?;
        Some((start, count))
    })
}

/// The uid and gid ranges auto mode draws from, with where they came from.
fn subordinate_ranges() -> ((u32, u32), (u32, u32), String) {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    let uid = subordinate_range(&read("/etc/subuid"), SUBORDINATE_USER);
    let gid = subordinate_range(&read("/etc/subgid"), SUBORDINATE_USER);
    match (uid, gid) {
        (Some(u), Some(g)) => (
            u,
            g,
            format!("user {SUBORDINATE_USER} in /etc/subuid and /etc/subgid"),
        ),
        _ => (
            DEFAULT_SUBORDINATE,
            DEFAULT_SUBORDINATE,
            "evoke's default; add an `evoke` entry to /etc/subuid and /etc/subgid to choose".into(),
        ),
    }
}

/// The mapping for a new container: `mode`'s own, or for auto the lowest
/// block of the subordinate range that no map in `taken` touches.
pub fn choose(mode: UsernsMode, taken: &[IdMap]) -> Result<IdMap, UsernsError> {
    match mode {
        UsernsMode::Fixed(m) => Ok(m),
        UsernsMode::Auto => {
            let (u, g, source_name) = subordinate_ranges();
            let blocks = (u.1 / BLOCK).min(g.1 / BLOCK);
            // Blocks that would pass the largest id are not offered.
            (0..blocks)
                .map_while(|k| {
                    let uid = u.0.checked_add(k * BLOCK)?;
                    let gid = g.0.checked_add(k * BLOCK)?;
                    (uid.checked_add(BLOCK)? < u32::MAX && gid.checked_add(BLOCK)? < u32::MAX)
                        .then_some(IdMap {
                            uid,
                            gid,
                            count: BLOCK,
                        })
                })
                .find(|m| !taken.iter().any(|t| t.overlaps(m)))
                .ok_or(UsernsError::Exhausted {
                    start: u.0,
                    count: u.1,
                    source_name,
                })
        }
    }
}

/// Checks that host uid `uid` (without privileges) may search every
/// directory from / down to `path`: the container's init walks that path
/// after it has entered its user namespace.
pub fn check_reachable(path: &Path, uid: u32, gid: u32) -> Result<(), UsernsError> {
    use std::os::unix::fs::MetadataExt;
    let mut cur = std::path::PathBuf::from("/");
    for c in path.components().skip(1) {
        cur.push(c);
        let md = fs::metadata(&cur).map_err(|e| io("stat", &cur, e))?;
        let mode = md.mode();
        let ok = if md.uid() == uid {
            mode & 0o100 != 0
        } else if md.gid() == gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !ok {
            return Err(UsernsError::Unreachable {
                uid,
                path: cur.display().to_string(),
            });
        }
    }
    Ok(())
}

/// A user namespace with `map`, held by an fd (the process that made it is
/// gone by the time this returns). Safe to call from a multi-threaded
/// process: the forked child only makes system calls.
pub fn make_userns(map: &IdMap) -> Result<OwnedFd, UsernsError> {
    let pipe = |what| {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| io(what, "pipe", e.into()))
    };
    let (ready_r, ready_w) = pipe("make")?;
    let (done_r, done_w) = pipe("make")?;
    // SAFETY: the child only calls unshare, write, read and _exit (all
    // async-signal-safe, no allocation), so forking a multi-threaded
    // process is sound.
    let child = match unsafe { nix::unistd::fork() }
        .map_err(|e| io("fork", "user namespace helper", e.into()))?
    {
        nix::unistd::ForkResult::Child => {
            let ok = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).is_ok();
            let _ = nix::unistd::write(&ready_w, if ok { b"1" } else { b"0" });
            let mut b = [0u8; 1];
            let _ = nix::unistd::read(&done_r, &mut b);
            // SAFETY: _exit ends the child without running the parent's
            // destructors or atexit handlers.
            unsafe { libc::_exit(0) }
        }
        nix::unistd::ForkResult::Parent { child } => child,
    };
    drop(ready_w);
    drop(done_r);
    let result = (|| {
        let mut b = [0u8; 1];
        let n = fs::File::from(ready_r)
            .read(&mut b)
            .map_err(|e| io("read", "user namespace helper", e))?;
        if n != 1 || b[0] != b'1' {
            return Err(io(
                "unshare",
                "CLONE_NEWUSER",
                std::io::Error::other("the helper could not make a user namespace"),
            ));
        }
        let write = |file: &str, text: String| {
            let p = format!("/proc/{child}/{file}");
            fs::write(&p, text).map_err(|e| io("write", &p, e))
        };
        write("uid_map", format!("0 {} {}\n", map.uid, map.count))?;
        write("gid_map", format!("0 {} {}\n", map.gid, map.count))?;
        let p = format!("/proc/{child}/ns/user");
        Ok(OwnedFd::from(
            fs::File::open(&p).map_err(|e| io("open", &p, e))?,
        ))
    })();
    let _ = fs::File::from(done_w).write_all(b"x");
    let _ = nix::sys::wait::waitpid(child, None);
    result
}

// From include/uapi/linux/mount.h (not in the libc crate for glibc).
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// The kernel's `struct mount_attr` (MOUNT_ATTR_SIZE_VER0).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn c_path(p: &Path) -> Result<std::ffi::CString, UsernsError> {
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        io(
            "use",
            p,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains NUL"),
        )
    })
}

/// Mounts `source` on `target` (an existing directory) so that ids appear
/// shifted by `userns`'s mapping: host id `i` reads as the host id that
/// the namespace maps its id `i` to.
pub fn idmapped_bind(source: &Path, target: &Path, userns: &OwnedFd) -> Result<(), UsernsError> {
    let src = c_path(source)?;
    let dst = c_path(target)?;
    // SAFETY: `src` is a NUL-terminated path that outlives the call;
    // open_tree returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io("open_tree", source, std::io::Error::last_os_error()));
    }
    let fd = i32::try_from(fd).map_err(|_| {
        io(
            "open_tree",
            source,
            std::io::Error::other("fd out of range"),
        )
    })?;
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    let tree = unsafe { OwnedFd::from_raw_fd(fd) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: `tree` is a detached mount we own, the empty path is
    // NUL-terminated, and `attr` is a valid mount_attr of the size given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EPERM) => UsernsError::NoIdmap {
                path: source.display().to_string(),
                error: e,
            },
            _ => io("idmap (mount_setattr)", source, e),
        });
    }
    // SAFETY: both paths are NUL-terminated and outlive the call; `tree`
    // is the detached mount to attach.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(io("move_mount to", target, std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userns_values_parse_as_auto_or_host_and_count() {
        assert_eq!("auto".parse::<UsernsMode>().unwrap(), UsernsMode::Auto);
        assert_eq!("".parse::<UsernsMode>().unwrap(), UsernsMode::Auto);
        assert_eq!(
            "200000:65536".parse::<UsernsMode>().unwrap(),
            UsernsMode::Fixed(IdMap {
                uid: 200_000,
                gid: 200_000,
                count: 65_536
            })
        );
        for bad in ["x", "1:", ":5", "5:0", "1:2:3", "-1:5"] {
            let e = bad.parse::<UsernsMode>().unwrap_err();
            assert!(e.to_string().contains("invalid --userns"), "{bad}: {e}");
        }
        let e = "0:65536".parse::<UsernsMode>().unwrap_err();
        assert!(e.to_string().contains("host's root"), "{e}");
        assert!("4294967000:65536".parse::<UsernsMode>().is_err());
    }

    #[test]
    fn subordinate_ranges_are_read_per_user() {
        let text = "alice:100000:65536\nevoke:300000:655360\n";
        assert_eq!(subordinate_range(text, "evoke"), Some((300_000, 655_360)));
        assert_eq!(subordinate_range(text, "bob"), None);
        assert_eq!(subordinate_range("evoke:x:1\n", "evoke"), None);
    }

    #[test]
    fn auto_takes_the_lowest_block_no_other_container_touches() {
        let first = choose(UsernsMode::Auto, &[]).unwrap();
        assert_eq!(first.count, BLOCK);
        let second = choose(UsernsMode::Auto, &[first]).unwrap();
        assert!(!second.overlaps(&first));
        assert_eq!(second.uid, first.uid + BLOCK);
        // A fixed map in the middle of the range pushes auto past it.
        let odd = IdMap {
            uid: first.uid + 10,
            gid: first.gid + 10,
            count: 5,
        };
        assert_eq!(choose(UsernsMode::Auto, &[odd]).unwrap(), second);
    }

    #[test]
    fn ranges_at_the_top_of_the_id_space_compare_without_overflow() {
        let top = IdMap {
            uid: u32::MAX - 10,
            gid: u32::MAX - 10,
            count: 9,
        };
        let low = IdMap {
            uid: 1,
            gid: 1,
            count: 5,
        };
        assert!(top.overlaps(&top));
        assert!(!top.overlaps(&low) && !low.overlaps(&top));
    }
}
