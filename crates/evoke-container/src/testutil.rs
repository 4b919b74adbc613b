//! Helpers for tests that run real containers, here and in other crates:
//! a busybox root file system, a bundle with Docker's defaults, and the
//! root/CI gate. Not used by the engine itself.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

/// Where Debian's busybox-static lives.
pub const BUSYBOX: &str = "/bin/busybox";

/// Returns true when the test can run (root, busybox present). Otherwise,
/// under CI=true it panics with the reason; elsewhere it prints the reason
/// and returns false so the test can skip.
pub fn require_root_and_busybox(test: &str) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root");
    }
    if !Path::new(BUSYBOX).exists() {
        missing.push("/bin/busybox (apt-get install busybox-static)");
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{test}: needs {}", missing.join(" and "));
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg}");
    }
    eprintln!("skipping {msg}");
    false
}

/// Makes `dir` a busybox root file system: /bin/busybox plus a symlink per
/// applet, and the empty directories a container mounts on.
pub fn busybox_rootfs(dir: &Path) -> std::io::Result<()> {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(BUSYBOX, bin.join("busybox"))?;
    let list = std::process::Command::new(BUSYBOX).arg("--list").output()?;
    for name in String::from_utf8_lossy(&list.stdout).lines() {
        let name = name.trim();
        if name.is_empty() || name == "busybox" || name.contains('/') {
            continue;
        }
        let link = bin.join(name);
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    for d in ["proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
    )?;
    std::fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    Ok(())
}

/// Writes a bundle in `dir` (rootfs/ plus config.json) running `args` with
/// Docker's defaults, after `edit` had its say on the spec. Returns `dir`.
pub fn busybox_bundle(
    dir: &Path,
    args: &[&str],
    edit: impl FnOnce(&mut Spec),
) -> std::io::Result<PathBuf> {
    busybox_rootfs(&dir.join("rootfs"))?;
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let mut spec = crate::spec::default_spec(&args, "rootfs");
    edit(&mut spec);
    let text = serde_json::to_string_pretty(&spec).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("config.json"), text)?;
    Ok(dir.to_path_buf())
}

/// A container id no other concurrently running test uses.
pub fn unique_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Duplicates `fd` to the lowest free number >= `at`, without
/// FD_CLOEXEC, so that child processes inherit it; returns the number.
/// Tests use it to hand the runtime a descriptor that must not reach the
/// container (CVE-2024-21626). The duplicate stays open until exit.
pub fn leak_fd(fd: std::os::fd::BorrowedFd<'_>, at: i32) -> std::io::Result<i32> {
    use nix::fcntl::{fcntl, FcntlArg};
    fcntl(fd, FcntlArg::F_DUPFD(at)).map_err(std::io::Error::from)
}
