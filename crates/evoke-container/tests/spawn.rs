//! How a container's first process is started by a big, multi-threaded
//! caller (the node agent in `evoke server`): through a fresh exec of the
//! binary, so that the caller's memory is neither copied into the
//! container's init nor write-protected under the caller's threads.

// Helpers outside #[test] fns unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::os::fd::OwnedFd;

use evoke_container::testutil;

/// A /proc/PID/status field in kB.
fn status_kb(pid: i32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[test]
fn a_threaded_callers_memory_is_not_copied_into_the_container_init() {
    if !testutil::require_root_and_busybox(
        "a_threaded_callers_memory_is_not_copied_into_the_container_init",
    ) {
        return;
    }
    // A second thread, alive during `create`, as in the server.
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let other = std::thread::spawn(move || {
        let _ = stop_rx.recv();
    });
    // 128 MiB of touched private memory in the caller.
    const BIG: usize = 128 << 20;
    let big = vec![1u8; BIG];
    let own_rss = status_kb(std::process::id() as i32, "RssAnon:");
    assert!(own_rss > (BIG / 1024) as u64, "caller RssAnon {own_rss} kB");

    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let bundle = testutil::busybox_bundle(
        &dir.path().join("b"),
        &[
            "/bin/sh",
            "-c",
            "echo ran in $(cat /proc/self/cgroup | wc -l) cgroups",
        ],
        |_| {},
    )
    .unwrap();
    let id = testutil::unique_id("spawn");
    let (r, w) = nix::unistd::pipe().unwrap();
    let w2: OwnedFd = w.try_clone().unwrap();
    let opts = evoke_container::CreateOptions {
        stdout: Some(w),
        stderr: Some(w2),
        ..Default::default()
    };
    let created = evoke_container::create(state.path(), &id, &bundle, opts).unwrap();
    // A forked init would map all of the caller's pages (shared
    // copy-on-write, counted in its RSS); a fresh exec maps a few MB.
    let init_rss = status_kb(created.pid, "RssAnon:");
    assert!(
        init_rss < 32 * 1024,
        "the container's init maps {init_rss} kB of anonymous memory: a copy of the caller"
    );
    evoke_container::start(state.path(), &id).unwrap();
    let exit = evoke_container::wait(state.path(), &id).unwrap();
    evoke_container::delete(state.path(), &id, false).unwrap();
    let mut out = String::new();
    std::fs::File::from(r).read_to_string(&mut out).unwrap();
    assert_eq!(exit.code, 0, "output: {out}");
    assert!(out.starts_with("ran in "), "output: {out}");
    assert_eq!(big.len(), BIG);
    let _ = stop_tx.send(());
    other.join().unwrap();
}

#[test]
fn the_workload_starts_with_sigpipe_at_its_default_disposition() {
    if !testutil::require_root_and_busybox(
        "the_workload_starts_with_sigpipe_at_its_default_disposition",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let bundle = testutil::busybox_bundle(
        &dir.path().join("b"),
        &["/bin/sh", "-c", "grep SigIgn /proc/self/status"],
        |_| {},
    )
    .unwrap();
    let id = testutil::unique_id("sigpipe");
    let (r, w) = nix::unistd::pipe().unwrap();
    let opts = evoke_container::CreateOptions {
        stdout: Some(w),
        ..Default::default()
    };
    evoke_container::create(state.path(), &id, &bundle, opts).unwrap();
    evoke_container::start(state.path(), &id).unwrap();
    let exit = evoke_container::wait(state.path(), &id).unwrap();
    evoke_container::delete(state.path(), &id, false).unwrap();
    let mut out = String::new();
    std::fs::File::from(r).read_to_string(&mut out).unwrap();
    assert_eq!(exit.code, 0, "output: {out}");
    let mask = out
        .trim()
        .strip_prefix("SigIgn:")
        .map(str::trim)
        .and_then(|m| u64::from_str_radix(m, 16).ok())
        .unwrap_or_else(|| panic!("no SigIgn line in {out:?}"));
    // This test process ignores SIGPIPE (Rust's runtime does), so an
    // inherited disposition would show.
    assert_eq!(mask & (1 << (libc::SIGPIPE - 1)), 0, "SigIgn {mask:#x}");
}
