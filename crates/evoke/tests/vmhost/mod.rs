// Shared by the microvm_* tests: runs scripts inside the test host booted by
// tests/vmhost/run. (Kept in a subdirectory so cargo does not build it as a
// test of its own.)

use std::path::PathBuf;
use std::process::Command;

/// Shell functions for the scripts: `mkimg DIR` makes a busybox rootfs, and
/// `guest_qemu INITRD AGENT_OUT MEM_MIB` boots the guest kernel with that
/// initramfs under `qemu-system-x86_64 -M microvm -enable-kvm`, the agent
/// channel (virtio-console) written to AGENT_OUT.
#[allow(dead_code)]
pub const GUEST_QEMU: &str = r#"
mkimg() {
  mkdir -p "$1/bin" "$1/etc"
  cp /bin/busybox "$1/bin/busybox"
  for a in sh echo cat grep pwd sed env id sleep ls; do ln -sf busybox "$1/bin/$a"; done
}
guest_qemu() {
  timeout 120 qemu-system-x86_64 -M microvm -enable-kvm -cpu host -m "$3" -smp 1 \
    -nodefaults -no-user-config -display none -no-reboot -serial stdio \
    -kernel /boot/vmlinuz-$(uname -r) -initrd "$1" \
    -append "console=ttyS0 reboot=t panic=-1 quiet" \
    -device virtio-serial-device -chardev file,id=agent,path="$2" \
    -device virtconsole,chardev=agent </dev/null
}
"#;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Whether the test host can be booted here. Under CI a missing piece is a
/// failure with the reason; elsewhere the test is skipped with the reason.
pub fn test_host_ready() -> bool {
    let mut missing = Vec::new();
    if !nix_is_root() {
        missing.push("root".to_string());
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        missing.push("qemu-system-x86_64 (scripts/setup installs qemu-system-x86)".into());
    }
    let kernel = std::fs::read_dir("/boot")
        .map(|d| {
            d.filter_map(|e| e.ok()).any(|e| {
                e.file_name().to_string_lossy().ends_with("-cloud-amd64")
                    && e.file_name().to_string_lossy().starts_with("vmlinuz-")
            })
        })
        .unwrap_or(false);
    if !kernel {
        missing.push(
            "/boot/vmlinuz-*-cloud-amd64 (scripts/setup installs linux-image-cloud-amd64)".into(),
        );
    }
    if Command::new("busybox").arg("true").output().is_err() {
        missing.push("busybox (scripts/setup installs busybox-static)".into());
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("the vmhost test host needs: {}", missing.join(", "));
    assert!(std::env::var_os("CI").is_none(), "{msg}");
    eprintln!("skipped: {msg}");
    false
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

/// Runs `script` in the test host with the evoke binary under test on PATH;
/// returns its exit status and everything the test host printed.
pub fn run_in_test_host(script: &str) -> (i32, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("script.sh");
    std::fs::write(&path, script).expect("write script");
    run_script_in_test_host(&path, None, 300, &[])
}

/// Runs the script file `path` in the test host (`extra`, if given, at
/// /vmhost/extra, and `env` set for tests/vmhost/run), each boot limited to
/// `timeout_s` seconds. Returns the exit status and the output of the last
/// boot, then the run's stderr.
///
/// tests/vmhost/run boots the test host again when it froze; what the
/// script printed before such a freeze is dropped, so a check reads the
/// output of one whole run only.
#[allow(dead_code)]
pub fn run_script_in_test_host(
    path: &std::path::Path,
    extra: Option<&std::path::Path>,
    timeout_s: u32,
    env: &[(&str, &str)],
) -> (i32, String) {
    let mut cmd = Command::new(repo().join("tests/vmhost/run"));
    cmd.arg(path)
        .env("EVOKE_BIN", env!("CARGO_BIN_EXE_evoke"))
        .env("VMHOST_TIMEOUT", timeout_s.to_string());
    if let Some(extra) = extra {
        cmd.env("VMHOST_EXTRA", extra);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run tests/vmhost/run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let text = format!(
        "{}\n--- stderr ---\n{}",
        last_boot(&stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The part of tests/vmhost/run's stdout after its last "vmhost-retry:" line
/// (the whole of it when the test host never froze).
fn last_boot(stdout: &str) -> &str {
    match stdout.rfind("vmhost-retry:") {
        Some(at) => stdout[at..].split_once('\n').map_or("", |(_, rest)| rest),
        None => stdout,
    }
}
