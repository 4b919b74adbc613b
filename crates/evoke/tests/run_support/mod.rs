//! Helpers for the `evoke run` and `evoke image` end-to-end tests: a fresh
//! data dir per test with a busybox image built from the host's
//! busybox-static by `evoke image build-dir`, and the built binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Busybox from Debian's busybox-static (scripts/setup installs it).
pub const BUSYBOX: &str = "/bin/busybox";

/// True when this host can run containers (root, overlayfs, busybox).
/// Missing under CI=true is a failure; elsewhere the test skips.
pub fn can_run_containers() -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root");
    }
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs.lines().any(|l| l.trim_end().ends_with("overlay")) {
        missing.push("overlayfs");
    }
    if !Path::new(BUSYBOX).exists() {
        missing.push("busybox-static");
    }
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "this test needs {} (scripts/setup, run as root)",
            missing.join(", ")
        );
    }
    eprintln!("skipping: missing {}", missing.join(", "));
    false
}

/// A data dir of its own; removes its containers when dropped.
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub data: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        Env { tmp, data }
    }

    /// A new data dir with `busybox:latest` built in it.
    pub fn with_busybox() -> Env {
        let env = Env::new();
        let root = env.tmp.path().join("busybox-rootfs");
        busybox_rootfs(&root);
        let out = env.evoke(&[
            "image",
            "build-dir",
            root.to_str().expect("utf-8 temp path"),
            "--tag",
            "busybox",
        ]);
        assert!(out.status.success(), "build-dir: {}", text(&out.stderr));
        env
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_evoke"));
        c.arg("--data-dir")
            .arg(&self.data)
            .args(args)
            .env("EVOKE_LOG", "warn")
            .stdin(Stdio::null());
        c
    }

    /// Run evoke with a time limit; panics if it hangs.
    pub fn evoke(&self, args: &[&str]) -> Output {
        let mut child = self
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn evoke");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(50);
        loop {
            if child.try_wait().expect("try_wait").is_some() {
                return child.wait_with_output().expect("output");
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().expect("output");
                panic!(
                    "evoke {args:?} hung; stdout {} stderr {}",
                    text(&out.stdout),
                    text(&out.stderr)
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Run evoke and expect success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.evoke(args);
        assert!(
            out.status.success(),
            "evoke {args:?} failed ({:?}): {}{}",
            out.status.code(),
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Unmount rootfs overlays and free cgroups before the dir goes.
        let out = self.evoke(&["ps", "-a", "-q"]);
        for id in text(&out.stdout).lines() {
            let _ = self.evoke(&["rm", "-f", id.trim()]);
        }
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// /bin/busybox plus a symlink per applet.
pub fn busybox_rootfs(root: &Path) {
    evoke_runtime::testing::busybox_rootfs(root).expect("busybox rootfs");
}
