//! Where a pod's files land on disk. Every pod start creates about 25
//! inodes (its log directory and file, the container's bundle, overlay
//! layers and state) and every pod removal frees them. ext4 without a
//! journal skips, one buffer-cache lookup each, every free inode of a block
//! group deleted in the last minute when it allocates a new one; with all
//! pods under one directory, all of them share one group, so after 100 pods
//! are removed each create of the next 100 walks thousands of those
//! (`find_inode_bit` → `recently_deleted`, a third of a burst's CPU in a
//! profile). ext4's `T` attribute (FS_TOPDIR_FL, `chattr +T`) tells the
//! Orlov allocator that a directory's subdirectories are unrelated and are
//! to be spread over the block groups, so each pod's subtree gets a group
//! of its own with only a few recently freed inodes.

use std::path::Path;

use rustix::fs::{ioctl_getflags, ioctl_setflags, IFlags};

use crate::NodeError;

/// Creates `dir` if missing and marks it so that the filesystem spreads its
/// subdirectories apart. Ok(false) when the filesystem has no such hint
/// (tmpfs, xfs, btrfs...): nothing to do there.
pub fn spread_subdirectories(dir: &Path) -> Result<bool, NodeError> {
    let io = |e: std::io::Error| NodeError::Io {
        path: dir.to_path_buf(),
        source: e,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let f = std::fs::File::open(dir).map_err(io)?;
    let flags = match ioctl_getflags(&f) {
        Ok(flags) => flags,
        Err(e) if unsupported(e) => return Ok(false),
        Err(e) => return Err(io(e.into())),
    };
    if flags.contains(IFlags::TOPDIR) {
        return Ok(true);
    }
    match ioctl_setflags(&f, flags | IFlags::TOPDIR) {
        Ok(()) => Ok(true),
        Err(e) if unsupported(e) => Ok(false),
        Err(e) => Err(io(e.into())),
    }
}

fn unsupported(e: rustix::io::Errno) -> bool {
    use rustix::io::Errno;
    [Errno::NOTTY, Errno::OPNOTSUPP, Errno::INVAL, Errno::NOSYS].contains(&e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_ext4(p: &Path) -> bool {
        nix::sys::statfs::statfs(p)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::EXT4_SUPER_MAGIC)
    }

    #[test]
    fn a_pod_root_on_ext4_gets_the_topdir_hint_and_other_filesystems_are_left_alone() {
        let t = tempfile::tempdir().expect("temp dir");
        let dir = t.path().join("pods");
        let applied = spread_subdirectories(&dir).expect("spread");
        assert!(dir.is_dir(), "the directory is created");
        let flags = ioctl_getflags(std::fs::File::open(&dir).expect("open"));
        if on_ext4(t.path()) {
            assert!(applied, "ext4 takes the hint");
            assert!(flags.expect("flags").contains(IFlags::TOPDIR));
            // Idempotent: a restart finds it set.
            assert!(spread_subdirectories(&dir).expect("again"));
        } else {
            println!("temp dir is not on ext4; checking only that nothing failed");
            if let Ok(flags) = flags {
                assert_eq!(applied, flags.contains(IFlags::TOPDIR));
            }
        }
    }

    #[test]
    fn a_path_under_a_file_is_an_error_naming_the_path() {
        let t = tempfile::tempdir().expect("temp dir");
        let file = t.path().join("f");
        std::fs::write(&file, b"x").expect("write");
        let err = spread_subdirectories(&file.join("pods")).expect_err("not a directory");
        assert!(err.to_string().contains("pods"), "{err}");
    }
}
