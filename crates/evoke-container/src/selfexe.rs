//! The CVE-2019-5736 defence: never let a container reach a writable copy
//! of the runtime's binary.
//!
//! A container's init (and every `exec`) is a fork of the evoke process
//! that made it, so until it execs the workload its `/proc/PID/exe` is the
//! host's evoke binary. A process in the container that opens that link (or
//! gets the runtime to exec itself through a `#!/proc/self/exe` script or a
//! binfmt_misc interpreter) could write to the host binary once it is no
//! longer busy. [`protect`] makes that impossible instead of unlikely: it
//! re-executes the running binary from a private, read-only overlayfs
//! mount whose only layers are the binary's directory and an empty tmpfs.
//! The mount is detached (made with fsopen/fsmount, attached nowhere), so
//! nobody can reach it by path, and an overlay without an upper layer can
//! never be made writable, not even by a remount. The page cache is shared
//! with the real file, so this costs one execve and no copy. This is the
//! approach runc takes since 1.2. Where overlayfs is unavailable the binary
//! is copied into a sealed memfd instead (runc's older way: costly for a
//! large binary, but equally safe).
//!
//! The check in the init that refuses to exec the runtime's own inode stays
//! as a second line.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, OsString};
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// Where the binary was started from, saved across the re-exec: after it,
/// `/proc/self/exe` names a file on a detached mount, which is no path to
/// start another process from.
pub const ORIGINAL_EXE_ENV: &str = "EVOKE_ORIGINAL_EXE";

/// What went wrong protecting the binary.
#[derive(Debug, thiserror::Error)]
pub enum SelfExeError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("re-exec of {path}: {source}")]
    Exec { path: PathBuf, source: io::Error },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SelfExeError + 'a {
    move |source| SelfExeError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The path of the evoke binary on the host, for starting helpers (the VMM)
/// after [`protect`] re-executed us from a detached mount.
pub fn original_exe() -> io::Result<PathBuf> {
    match std::env::var_os(ORIGINAL_EXE_ENV) {
        Some(p) if !p.is_empty() && is_protected() => Ok(PathBuf::from(p)),
        _ => std::env::current_exe(),
    }
}

/// Whether the running binary already is a file nobody can write: one on a
/// read-only overlayfs, or a write-sealed memfd.
pub fn is_protected() -> bool {
    let Ok(f) = fs::File::open("/proc/self/exe") else {
        return false;
    };
    if let Ok(seals) = nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_GET_SEALS) {
        if nix::fcntl::SealFlag::from_bits_truncate(seals)
            .contains(nix::fcntl::SealFlag::F_SEAL_WRITE)
        {
            return true;
        }
    }
    let overlay = nix::sys::statfs::fstatfs(&f)
        .map(|s| s.filesystem_type() == nix::sys::statfs::OVERLAYFS_SUPER_MAGIC)
        .unwrap_or(false);
    let read_only = nix::sys::statvfs::fstatvfs(&f)
        .map(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
        .unwrap_or(false);
    overlay && read_only
}

/// Re-executes this process from a protected copy of its binary (see the
/// module doc) with the same arguments and environment, unless it already
/// runs from one. Returns only when already protected or on error.
pub fn protect() -> Result<(), SelfExeError> {
    if is_protected() {
        return Ok(());
    }
    let exe =
        fs::read_link("/proc/self/exe").map_err(io_err("readlink", Path::new("/proc/self/exe")))?;
    if let Some(orig) = std::env::var_os(ORIGINAL_EXE_ENV) {
        // Set, yet we run from elsewhere: we are the re-executed copy and
        // still not protected. Fail closed rather than loop. (A process
        // that merely inherited the variable runs from the original path.)
        if Path::new(&orig) != exe {
            return Err(SelfExeError::Exec {
                path: exe,
                source: io::Error::other("the re-executed binary is still writable"),
            });
        }
    }
    let file = match overlay_file(&exe) {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!(error = %e, "no overlayfs for the binary; sealing a memfd copy");
            sealed_copy(&exe)?
        }
    };
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != ORIGINAL_EXE_ENV)
        .map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend(v.into_vec());
            kv
        })
        .filter_map(|kv| CString::new(kv).ok())
        .collect();
    let mut orig = OsString::from(format!("{ORIGINAL_EXE_ENV}="));
    orig.push(&exe);
    env.extend(CString::new(orig.into_vec()).ok());
    let args: Vec<CString> = std::env::args_os()
        .filter_map(|a| CString::new(a.into_vec()).ok())
        .collect();
    let e = nix::unistd::execveat(
        file.as_fd(),
        c"",
        &args,
        &env,
        nix::fcntl::AtFlags::AT_EMPTY_PATH,
    )
    .unwrap_err();
    Err(SelfExeError::Exec {
        path: exe,
        source: e.into(),
    })
}

// The new mount API (linux/mount.h); libc has the syscall numbers only.
const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOUNT_ATTR_RDONLY: libc::c_uint = 0x1;
const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;

fn fd_or_err(rc: libc::c_long, op: &'static str, path: &Path) -> Result<OwnedFd, SelfExeError> {
    if rc < 0 {
        return Err(io_err(op, path)(io::Error::last_os_error()));
    }
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
}

fn fsopen(fstype: &CStr, path: &Path) -> Result<OwnedFd, SelfExeError> {
    // SAFETY: fsopen reads the NUL-terminated name; no memory is written.
    let rc = unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) };
    fd_or_err(rc, "fsopen", path)
}

fn fsconfig(
    fs: &OwnedFd,
    cmd: libc::c_uint,
    key: Option<&CStr>,
    value: Option<&CStr>,
    path: &Path,
) -> Result<(), SelfExeError> {
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: key and value are NUL-terminated strings (or NULL, as the
    // command allows) that outlive the call; fs is an fs context fd.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            cmd,
            key.map_or(null, CStr::as_ptr),
            value.map_or(null, CStr::as_ptr),
            0,
        )
    };
    if rc < 0 {
        return Err(io_err("fsconfig", path)(io::Error::last_os_error()));
    }
    Ok(())
}

fn fsmount(fs: &OwnedFd, attrs: libc::c_uint, path: &Path) -> Result<OwnedFd, SelfExeError> {
    // SAFETY: fsmount takes an fs context fd and flags; no memory is passed.
    let rc = unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, attrs) };
    fd_or_err(rc, "fsmount", path)
}

/// Escapes the characters overlayfs treats specially in `lowerdir`.
fn escape_layer(p: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in p.as_os_str().as_bytes() {
        if b == b':' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out
}

/// Opens `exe` through a detached read-only overlay of its directory.
fn overlay_file(exe: &Path) -> Result<OwnedFd, SelfExeError> {
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let name = exe.file_name().unwrap_or_default();
    // Overlayfs without an upper layer wants two lower ones: the binary's
    // directory and an empty tmpfs, both detached from every namespace.
    let tmp = fsopen(c"tmpfs", exe)?;
    fsconfig(&tmp, FSCONFIG_CMD_CREATE, None, None, exe)?;
    let empty = fsmount(&tmp, MOUNT_ATTR_RDONLY, exe)?;
    let mut lower = escape_layer(dir);
    lower.extend_from_slice(format!(":/proc/self/fd/{}", empty.as_raw_fd()).as_bytes());
    let lower = CString::new(lower).map_err(|e| io_err("overlay", exe)(io::Error::other(e)))?;
    let ov = fsopen(c"overlay", exe)?;
    fsconfig(
        &ov,
        FSCONFIG_SET_STRING,
        Some(c"lowerdir"),
        Some(&lower),
        exe,
    )?;
    fsconfig(&ov, FSCONFIG_CMD_CREATE, None, None, exe)?;
    let mnt = fsmount(
        &ov,
        MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        exe,
    )?;
    let f = nix::fcntl::openat(
        mnt.as_fd(),
        Path::new(name),
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| io_err("open on the overlay", exe)(e.into()))?;
    Ok(f)
}

/// Copies `exe` into a memfd and seals it against every change.
fn sealed_copy(exe: &Path) -> Result<OwnedFd, SelfExeError> {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let fd = memfd_create(
        c"evoke",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(|e| io_err("memfd_create for", exe)(e.into()))?;
    let mut src = fs::File::open(exe).map_err(io_err("open", exe))?;
    let mut dst = fs::File::from(fd);
    io::copy(&mut src, &mut dst).map_err(io_err("copy", exe))?;
    use nix::fcntl::SealFlag as S;
    let seals = S::F_SEAL_SEAL | S::F_SEAL_SHRINK | S::F_SEAL_GROW | S::F_SEAL_WRITE;
    nix::fcntl::fcntl(&dst, nix::fcntl::FcntlArg::F_ADD_SEALS(seals))
        .map_err(|e| io_err("seal", exe)(e.into()))?;
    Ok(OwnedFd::from(dst))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_paths_escape_colons_and_backslashes() {
        assert_eq!(escape_layer(Path::new("/a:b\\c")), b"/a\\:b\\\\c".to_vec());
    }
}
