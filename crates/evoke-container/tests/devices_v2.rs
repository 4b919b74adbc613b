//! Device rules on cgroup v2: a container whose cgroup is in the unified
//! hierarchy (this host's /sys/fs/cgroup/unified, or a pure v2 host's
//! /sys/fs/cgroup) gets a BPF device program, so that a device outside
//! Docker's default list cannot be opened even though mknod is allowed.

// Helpers outside #[test] fns unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use evoke_container::cgroups::Hierarchy;
use evoke_container::testutil;

fn cgroup2_mount() -> Option<PathBuf> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mi.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mountpoint = left.split(' ').nth(4)?;
        right
            .starts_with("cgroup2 ")
            .then(|| PathBuf::from(mountpoint))
    })
}

fn own_v2_cgroup() -> String {
    let s = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/")
        .to_string()
}

/// Runs `script` with busybox sh in a container whose cgroup is on the v2
/// mount; returns (exit code, output).
fn run_on_v2(mount: PathBuf, script: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let bundle =
        testutil::busybox_bundle(&dir.path().join("b"), &["/bin/sh", "-c", script], |_| {})
            .unwrap();
    let id = testutil::unique_id("devv2");
    let (r, w) = nix::unistd::pipe().unwrap();
    let w2: OwnedFd = w.try_clone().unwrap();
    let opts = evoke_container::CreateOptions {
        stdout: Some(w),
        stderr: Some(w2),
        hierarchy: Some(Hierarchy::V2 {
            mount,
            own: own_v2_cgroup(),
        }),
        ..Default::default()
    };
    evoke_container::create(state.path(), &id, &bundle, opts).unwrap();
    evoke_container::start(state.path(), &id).unwrap();
    let status = evoke_container::wait(state.path(), &id).unwrap();
    evoke_container::delete(state.path(), &id, true).unwrap();
    let mut out = String::new();
    std::fs::File::from(r).read_to_string(&mut out).unwrap();
    (status.code, out)
}

#[test]
fn v2_container_can_mknod_but_not_open_a_device_outside_the_default_list() {
    if !testutil::require_root_and_busybox("v2 device rules") {
        return;
    }
    let Some(mount) = cgroup2_mount() else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("no cgroup2 mount on this host");
        }
        eprintln!("skipping: no cgroup2 mount");
        return;
    };
    // 8:0 is the first SCSI disk; mknod is allowed (Docker's "b *:* m"),
    // opening it is not. /dev/null (1:3) is on the list.
    let (code, out) = run_on_v2(
        mount,
        "echo ok > /dev/null && echo null-ok; \
         mknod /dev/sdx b 8 0 && echo mknod-ok; \
         head -c1 /dev/sdx >/dev/null 2>/tmp/err; echo open=$?; cat /tmp/err",
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("null-ok"), "allowed device refused: {out}");
    assert!(out.contains("mknod-ok"), "{out}");
    assert!(
        !out.contains("open=0"),
        "block device 8:0 was opened: {out}"
    );
    assert!(out.contains("Operation not permitted"), "{out}");
}

#[test]
fn v2_container_is_cloned_into_its_cgroup_and_sees_it_as_the_namespace_root() {
    if !testutil::require_root_and_busybox("v2 cgroup namespace") {
        return;
    }
    let Some(mount) = cgroup2_mount() else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("no cgroup2 mount on this host");
        }
        eprintln!("skipping: no cgroup2 mount");
        return;
    };
    // The init is cloned straight into the cgroup (CLONE_INTO_CGROUP) and
    // unshares its cgroup namespace there, so it sees itself at the root.
    let (code, out) = run_on_v2(mount, "grep '^0::' /proc/self/cgroup");
    assert_eq!(code, 0, "{out}");
    assert!(out.lines().any(|l| l == "0::/"), "{out}");
}
