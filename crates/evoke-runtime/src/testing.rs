//! Helpers for tests in this and other crates: a busybox root filesystem made
//! from the host's static busybox, with no registry.

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

/// Where Debian's busybox-static puts its binary.
pub const HOST_BUSYBOX: &str = "/bin/busybox";

/// Fill `dir` with `/bin/busybox`, a symlink per applet in `/bin`, and the
/// few directories and files a container expects (`/etc/passwd`, `/tmp`…).
/// Fails if the host's busybox is missing or not static.
pub fn busybox_rootfs(dir: &Path) -> io::Result<()> {
    let host = Path::new(HOST_BUSYBOX);
    if !host.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{HOST_BUSYBOX} is missing: install busybox-static (scripts/setup)"),
        ));
    }
    let bin = dir.join("bin");
    for d in [
        "bin", "etc", "tmp", "proc", "sys", "dev", "root", "var/log", "home",
    ] {
        fs::create_dir_all(dir.join(d))?;
    }
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    fs::copy(host, bin.join("busybox"))?;
    let out = Command::new(host).arg("--list").output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{HOST_BUSYBOX} --list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        let link = bin.join(applet);
        if fs::symlink_metadata(&link).is_err() {
            symlink("busybox", &link)?;
        }
    }
    fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n",
    )?;
    fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    Ok(())
}
