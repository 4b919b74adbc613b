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
    // `start` returns once the init has left the start pipe: no window in
    // which the container still looks "created".
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
    assert!(entries(state.path()).is_empty());
    assert!(matches!(
        evoke_container::state(state.path(), &id),
        Err(Error::NotFound(_))
    ));
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
    assert!(entries(state.path()).is_empty());
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
