//! Unpack one layer tar into a directory that overlayfs can use as a lowerdir.
//!
//! OCI layers mark deletions with AUFS-style whiteout files; overlayfs wants
//! its own form, so they are converted here, once, at import:
//! - `dir/.wh.NAME` (NAME deleted) becomes a character device 0/0 `dir/NAME`;
//! - `dir/.wh..wh..opq` (dir's lower contents hidden) becomes the xattr
//!   `trusted.overlay.opaque=y` on `dir`.

use std::fs;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use super::{ImageError, Result};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Unpack the (already decompressed) tar `reader` into `dest`, which must exist.
/// `file` names the archive in errors. Returns the number of entries.
pub(crate) fn unpack_layer(reader: impl Read, dest: &Path, file: &Path) -> Result<u64> {
    let corrupt = |reason: String| ImageError::Corrupt {
        file: file.to_path_buf(),
        reason,
    };
    let mut ar = tar::Archive::new(reader);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(true);
    ar.set_overwrite(true);
    let mut count = 0;
    let entries = ar
        .entries()
        .map_err(|e| corrupt(format!("layer tar: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| corrupt(format!("layer tar: {e}")))?;
        count += 1;
        let path = entry
            .path()
            .map_err(|e| corrupt(format!("layer entry path: {e}")))?
            .into_owned();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            // "./" or "/": the root itself; nothing to create.
            continue;
        };
        if name == OPAQUE_MARKER {
            let dir = safe_parent(dest, &path, file)?;
            fs::create_dir_all(&dir).map_err(|e| ImageError::io(&dir, e))?;
            xattr::set(&dir, "trusted.overlay.opaque", b"y").map_err(|e| {
                ImageError::io(
                    &dir,
                    std::io::Error::new(e.kind(), format!("set opaque xattr (needs root): {e}")),
                )
            })?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            let dir = safe_parent(dest, &path, file)?;
            fs::create_dir_all(&dir).map_err(|e| ImageError::io(&dir, e))?;
            let target = dir.join(hidden);
            remove_any(&target)?;
            nix::sys::stat::mknod(
                &target,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::empty(),
                nix::sys::stat::makedev(0, 0),
            )
            .map_err(|e| {
                ImageError::io(
                    &target,
                    std::io::Error::other(format!("make whiteout device (needs root): {e}")),
                )
            })?;
            continue;
        }
        // unpack_in refuses `..` and paths that leave `dest` through symlinks.
        entry
            .unpack_in(dest)
            .map_err(|e| corrupt(format!("unpack {}: {}", path.display(), chain(&e))))?;
    }
    Ok(count)
}

/// The directory holding `path` inside `dest`, refusing anything that leaves it.
fn safe_parent(dest: &Path, path: &Path, file: &Path) -> Result<PathBuf> {
    let mut out = dest.to_path_buf();
    if let Some(parent) = path.parent() {
        for c in parent.components() {
            match c {
                Component::Normal(n) => {
                    out.push(n);
                    // A symlink here could point out of the layer.
                    if fs::symlink_metadata(&out).is_ok_and(|m| m.file_type().is_symlink()) {
                        return Err(ImageError::Corrupt {
                            file: file.to_path_buf(),
                            reason: format!("whiteout {} goes through a symlink", path.display()),
                        });
                    }
                }
                Component::CurDir | Component::RootDir => {}
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(ImageError::Corrupt {
                        file: file.to_path_buf(),
                        reason: format!("whiteout {} leaves the layer", path.display()),
                    })
                }
            }
        }
    }
    Ok(out)
}

fn remove_any(p: &Path) -> Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).map_err(|e| ImageError::io(p, e)),
        Ok(_) => fs::remove_file(p).map_err(|e| ImageError::io(p, e)),
        Err(_) => Ok(()),
    }
}

/// An error and its causes on one line (tar hides the OS error in `source`).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
