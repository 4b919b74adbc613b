//! User namespaces through `evoke oci`: a bundle with `linux.uidMappings`
//! and `gidMappings` runs as uid 0 inside and as an unprivileged uid on the
//! host.

// Helpers outside #[test] fns unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use evoke_container::oci_spec::runtime::{
    LinuxIdMappingBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, Spec,
};
use evoke_container::testutil::{busybox_bundle, require_root_and_busybox, unique_id};

/// Host ids the container's 0..65536 map to: far from any real account.
const HOST_BASE: u32 = 231_072;

fn map_user_ns(spec: &mut Spec) {
    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut ns = linux.namespaces().clone().unwrap_or_default();
    ns.push(
        LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::User)
            .build()
            .unwrap(),
    );
    linux.set_namespaces(Some(ns));
    let map = LinuxIdMappingBuilder::default()
        .container_id(0u32)
        .host_id(HOST_BASE)
        .size(65_536u32)
        .build()
        .unwrap();
    linux.set_uid_mappings(Some(vec![map]));
    linux.set_gid_mappings(Some(vec![map]));
    spec.set_linux(Some(linux));
}

/// The container's root is an unprivileged host uid, so the bundle's
/// directories must be searchable by others (as with runc).
fn open_up(mut dir: &Path) {
    while let Some(parent) = dir.parent() {
        if dir == Path::new("/tmp") || parent == Path::new("/") {
            break;
        }
        let mode = std::fs::metadata(dir).unwrap().permissions().mode();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o755)).unwrap();
        dir = parent;
    }
}

fn evoke_oci(root: &Path, args: &[&str]) -> std::process::Output {
    let o = Command::new(env!("CARGO_BIN_EXE_evoke"))
        .arg("oci")
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run evoke");
    assert!(
        o.status.success(),
        "evoke oci {args:?}: {}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

#[test]
fn uid_0_inside_a_user_namespace_is_an_unprivileged_uid_on_the_host() {
    if !require_root_and_busybox("user namespace") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let script = "echo uid=$(id -u) gid=$(id -g); cat /proc/self/uid_map; \
                  touch /probe && echo wrote-rootfs || echo rootfs-read-only-to-us; \
                  sleep 30";
    let bundle = busybox_bundle(&t.path().join("b"), &["sh", "-c", script], map_user_ns).unwrap();
    open_up(&bundle.join("rootfs"));
    let root = t.path().join("state");
    let id = unique_id("userns");
    let b = bundle.to_str().unwrap();
    let out_path = t.path().join("out");
    let out = std::fs::File::create(&out_path).unwrap();
    let pid_file = t.path().join("pid");
    let status = Command::new(env!("CARGO_BIN_EXE_evoke"))
        .arg("oci")
        .arg("--root")
        .arg(&root)
        .args(["run", "--detach", "--bundle", b, "--pid-file"])
        .arg(&pid_file)
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .status()
        .unwrap();
    let output = || std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(status.success(), "evoke oci run: {status}\n{}", output());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !output().contains("wrote-rootfs") && !output().contains("rootfs-read-only") {
        assert!(Instant::now() < deadline, "no output: {}", output());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Seen from the host, the container's root is HOST_BASE.
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let host_status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap();
    let uid_line = host_status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_string();
    evoke_oci(&root, &["delete", "--force", &id]);
    let text = output();
    assert!(text.contains("uid=0 gid=0"), "{text}");
    assert!(
        text.split_whitespace()
            .collect::<Vec<_>>()
            .windows(3)
            .any(|w| w == ["0", &HOST_BASE.to_string(), "65536"]),
        "uid_map: {text}"
    );
    let host_uids: Vec<&str> = uid_line.split_whitespace().skip(1).collect();
    assert_eq!(host_uids, vec![HOST_BASE.to_string(); 4], "{uid_line}");
    // The rootfs belongs to the host's root, which the namespace does not
    // map: its root may not write there.
    assert!(text.contains("rootfs-read-only-to-us"), "{text}");
}
