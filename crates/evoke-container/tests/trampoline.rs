//! The workload's last exec goes through the sealed trampoline (see
//! `src/trampoline.rs`): the workload runs as itself, with its arguments and
//! environment, whichever way the trampoline is reached.

// Helpers outside #[test] fns unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::Read;

use evoke_container::oci_spec::runtime::Spec;
use evoke_container::testutil;

/// Runs `script` in a fresh container (after `edit`); (exit code, stdout).
fn run(name: &str, script: &str, edit: impl FnOnce(&mut Spec)) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let bundle =
        testutil::busybox_bundle(&dir.path().join("b"), &["/bin/sh", "-c", script], edit).unwrap();
    let id = testutil::unique_id(name);
    let (r, w) = nix::unistd::pipe().unwrap();
    let opts = evoke_container::CreateOptions {
        stdout: Some(w),
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
fn the_workload_runs_as_itself_with_its_arguments() {
    if !testutil::require_root_and_busybox("the_workload_runs_as_itself_with_its_arguments") {
        return;
    }
    let (code, out) = run(
        "tramp",
        "readlink /proc/self/exe; readlink /proc/1/exe; echo \"$0\"; exit 4",
        |_| {},
    );
    assert_eq!(code, 4, "{out}");
    // The shell (pid 1) and its child are busybox, not a memfd or evoke.
    assert_eq!(out, "/bin/busybox\n/bin/busybox\n/bin/sh\n");
}

#[test]
fn a_seccomp_profile_that_denies_execveat_still_starts_the_workload() {
    if !testutil::require_root_and_busybox(
        "a_seccomp_profile_that_denies_execveat_still_starts_the_workload",
    ) {
        return;
    }
    let (code, out) = run("noexecveat", "echo started; exit 6", |s| {
        let mut v = serde_json::to_value(&*s).unwrap();
        let calls = v["linux"]["seccomp"]["syscalls"]
            .as_array_mut()
            .expect("the default spec has a seccomp profile");
        calls.push(serde_json::json!({
            "names": ["execveat"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": 1
        }));
        *s = serde_json::from_value(v).unwrap();
    });
    // The trampoline was reached through /proc/self/fd instead.
    assert_eq!((code, out.as_str()), (6, "started\n"));
}
