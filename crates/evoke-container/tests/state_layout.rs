//! The engine's state on disk and the start hand-shake: one flat state file
//! per container (no directory, no fifo), `start` that reaches the init's
//! start pipe through /proc, and statuses that follow the lifecycle at once.

// Helpers outside #[test] fns unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use evoke_container::{testutil, Error, Status};

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_container_is_one_state_file_from_create_to_delete() {
    if !testutil::require_root_and_busybox("a_container_is_one_state_file_from_create_to_delete") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let bundle =
        testutil::busybox_bundle(&dir.path().join("b"), &["/bin/sh", "-c", "exit 7"], |_| {})
            .unwrap();
    let id = testutil::unique_id("flat");
    let created = evoke_container::create(state.path(), &id, &bundle, Default::default()).unwrap();
    assert_eq!(created.status, Status::Created);
    assert_eq!(entries(state.path()), vec![format!("{id}.json")]);
    assert_eq!(
        evoke_container::state(state.path(), &id).unwrap().status,
        Status::Created
    );
    // The id is taken while the container exists.
    let again = evoke_container::create(state.path(), &id, &bundle, Default::default());
    assert!(matches!(again, Err(Error::Exists(_))), "{again:?}");

    evoke_container::start(state.path(), &id).unwrap();
    // Once `start` returns the container is "running", whether or not the
    // init has taken the start byte yet: no window in which it still looks
    // "created".
    let after = evoke_container::state(state.path(), &id).unwrap();
    assert_ne!(after.status, Status::Created, "{after:?}");
    let second = evoke_container::start(state.path(), &id);
    assert!(matches!(second, Err(Error::BadStatus { .. })), "{second:?}");

    let exit = evoke_container::wait(state.path(), &id).unwrap();
    assert_eq!(exit.code, 7);
    assert_eq!(
        evoke_container::state(state.path(), &id).unwrap().status,
        Status::Stopped
    );
    assert_eq!(evoke_container::list(state.path()).unwrap().len(), 1);
    evoke_container::delete(state.path(), &id, false).unwrap();
    // The file is kept under a spare name for the next container.
    assert_eq!(entries(state.path()), vec![".spare0".to_string()]);
    assert!(evoke_container::list(state.path()).unwrap().is_empty());
    assert!(matches!(
        evoke_container::state(state.path(), &id),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn the_next_container_takes_a_deleted_containers_state_file_without_a_new_inode() {
    use std::os::unix::fs::MetadataExt;
    if !testutil::require_root_and_busybox("state file reuse") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let bundle =
        testutil::busybox_bundle(&dir.path().join("b"), &["/bin/sh", "-c", "exit 3"], |_| {})
            .unwrap();
    let first = testutil::unique_id("reuse");
    evoke_container::create(state.path(), &first, &bundle, Default::default()).unwrap();
    let inode = std::fs::metadata(state.path().join(format!("{first}.json")))
        .unwrap()
        .ino();
    evoke_container::delete(state.path(), &first, false).unwrap();
    let second = testutil::unique_id("reuse");
    evoke_container::create(state.path(), &second, &bundle, Default::default()).unwrap();
    let file = state.path().join(format!("{second}.json"));
    assert_eq!(std::fs::metadata(&file).unwrap().ino(), inode);
    assert_eq!(entries(state.path()), vec![format!("{second}.json")]);
    // The record is the new container's alone, nothing of the old one's.
    let s = evoke_container::state(state.path(), &second).unwrap();
    assert_eq!(
        (s.id.as_str(), s.status),
        (second.as_str(), Status::Created)
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains(&first), "{text}");
    assert!(matches!(
        evoke_container::state(state.path(), &first),
        Err(Error::NotFound(_))
    ));
    evoke_container::start(state.path(), &second).unwrap();
    assert_eq!(
        evoke_container::wait(state.path(), &second).unwrap().code,
        3
    );
    evoke_container::delete(state.path(), &second, false).unwrap();
}

#[test]
fn a_spare_state_file_renamed_into_place_but_not_yet_rewritten_is_not_a_container() {
    // `create` renames a spare (another container's old record) to
    // ID.json, then truncates and fills it: in between, ID is not there yet.
    let state = tempfile::tempdir().unwrap();
    let old = serde_json::json!({
        "id": "old", "pid": 1, "start_time": 0, "bundle": "/b", "rootfs": "/b/rootfs",
        "cgroup": null, "annotations": {}, "created": 0,
    });
    std::fs::write(state.path().join("new.json"), old.to_string()).unwrap();
    assert!(matches!(
        evoke_container::state(state.path(), "new"),
        Err(Error::NotFound(_))
    ));
    assert!(evoke_container::list(state.path()).unwrap().is_empty());
}

#[test]
fn a_started_container_is_running_before_its_init_has_taken_the_start_byte() {
    if !testutil::require_root_and_busybox("started before the init takes the byte") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let bundle =
        testutil::busybox_bundle(&dir.path().join("b"), &["/bin/sh", "-c", "exit 9"], |_| {})
            .unwrap();
    let id = testutil::unique_id("pending");
    let created = evoke_container::create(state.path(), &id, &bundle, Default::default()).unwrap();
    let init = nix::unistd::Pid::from_raw(created.pid);
    // A stopped init cannot take the byte.
    nix::sys::signal::kill(init, nix::sys::signal::Signal::SIGSTOP).unwrap();
    evoke_container::start(state.path(), &id).unwrap();
    assert_eq!(
        evoke_container::state(state.path(), &id).unwrap().status,
        Status::Running
    );
    let second = evoke_container::start(state.path(), &id);
    assert!(matches!(second, Err(Error::BadStatus { .. })), "{second:?}");
    nix::sys::signal::kill(init, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(evoke_container::wait(state.path(), &id).unwrap().code, 9);
    evoke_container::delete(state.path(), &id, false).unwrap();
}

#[test]
fn a_created_container_that_is_deleted_never_runs_its_process() {
    if !testutil::require_root_and_busybox(
        "a_created_container_that_is_deleted_never_runs_its_process",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let marker = dir.path().join("b/rootfs/tmp/ran");
    let bundle = testutil::busybox_bundle(
        &dir.path().join("b"),
        &["/bin/sh", "-c", "echo x > /tmp/ran"],
        |_| {},
    )
    .unwrap();
    let id = testutil::unique_id("never");
    evoke_container::create(state.path(), &id, &bundle, Default::default()).unwrap();
    evoke_container::delete(state.path(), &id, false).unwrap();
    assert_eq!(entries(state.path()), vec![".spare0".to_string()]);
    assert!(!marker.exists(), "the process ran without start");
}

#[test]
fn an_empty_state_file_is_a_container_that_does_not_exist_yet() {
    // What a `create` that died before filling its claimed file leaves.
    let state = tempfile::tempdir().unwrap();
    std::fs::write(state.path().join("half.json"), b"").unwrap();
    assert!(matches!(
        evoke_container::state(state.path(), "half"),
        Err(Error::NotFound(_))
    ));
    assert!(evoke_container::list(state.path()).unwrap().is_empty());
}

/// (pid, start time in clock ticks) of a live process, as a record keeps them.
fn pid_and_start(child: &std::process::Child) -> (i32, u64) {
    let pid = child.id() as i32;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let start = rest.split(' ').nth(19).unwrap().parse().unwrap();
    (pid, start)
}

/// Writes `STATE_ROOT/ID/state.json` as an evoke before the flat layout did.
fn write_old_layout(root: &Path, id: &str, pid: i32, start_time: u64, fifo: bool) {
    let dir = root.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let rec = serde_json::json!({
        "id": id,
        "pid": pid,
        "start_time": start_time,
        "bundle": "/nonexistent/bundle",
        "rootfs": "/nonexistent/bundle/rootfs",
        "cgroup": null,
        "annotations": {},
        "created": 1_700_000_000u64,
    });
    std::fs::write(dir.join("state.json"), rec.to_string()).unwrap();
    if fifo {
        nix::unistd::mkfifo(
            &dir.join("exec.fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
    }
}

#[test]
fn a_container_of_the_old_layout_is_listed_started_and_deleted_after_an_upgrade() {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let state = tempfile::tempdir().unwrap();
    // A stand-in for an old init that waits on its exec fifo.
    let mut init = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let (pid, start) = pid_and_start(&init);
    let id = testutil::unique_id("old");
    write_old_layout(state.path(), &id, pid, start, true);
    let mut fifo = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(state.path().join(&id).join("exec.fifo"))
        .unwrap();
    // A second one whose init is long gone.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let (gone_pid, gone_start) = pid_and_start(&gone);
    gone.wait().unwrap();
    let gone_id = testutil::unique_id("oldgone");
    write_old_layout(state.path(), &gone_id, gone_pid, gone_start, false);

    let mut listed = evoke_container::list(state.path()).unwrap();
    listed.sort_by(|a, b| a.id.cmp(&b.id));
    let by_id = |i: &str| listed.iter().find(|s| s.id == i).cloned().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(by_id(&id).status, Status::Created);
    assert_eq!(by_id(&id).pid, pid);
    assert_eq!(by_id(&gone_id).status, Status::Stopped);

    evoke_container::start(state.path(), &id).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(
        fifo.read(&mut b).unwrap(),
        1,
        "start wrote to the exec fifo"
    );
    assert_eq!(
        evoke_container::state(state.path(), &id).unwrap().status,
        Status::Running
    );
    let refused = evoke_container::delete(state.path(), &id, false);
    assert!(
        matches!(refused, Err(Error::BadStatus { .. })),
        "{refused:?}"
    );
    evoke_container::delete(state.path(), &id, true).unwrap();
    init.wait().unwrap();
    evoke_container::delete(state.path(), &gone_id, false).unwrap();
    assert!(
        entries(state.path()).is_empty(),
        "{:?}",
        entries(state.path())
    );
    assert!(matches!(
        evoke_container::state(state.path(), &id),
        Err(Error::NotFound(_))
    ));
}
