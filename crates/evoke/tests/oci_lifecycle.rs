//! `evoke oci` through the binary: the OCI lifecycle on a busybox bundle.

// Helpers outside #[test] fns unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use evoke_container::testutil::{busybox_bundle, require_root_and_busybox, unique_id};

fn oci(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_evoke"))
        .arg("oci")
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("run evoke")
}

/// For commands that leave a container process behind (create, run
/// --detach): it inherits stdio, so capture into files instead of pipes
/// that would stay open.
fn oci_bg(root: &Path, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let out = std::fs::File::create(dir.path().join("out")).unwrap();
    let err = std::fs::File::create(dir.path().join("err")).unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_evoke"))
        .arg("oci")
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .expect("run evoke");
    Output {
        status,
        stdout: std::fs::read(dir.path().join("out")).unwrap(),
        stderr: std::fs::read(dir.path().join("err")).unwrap(),
    }
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "evoke failed: {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn status(root: &Path, id: &str) -> String {
    let out = ok(&oci(root, &["state", id]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("state is JSON");
    v["status"].as_str().expect("status field").to_string()
}

#[test]
fn create_start_kill_delete_walks_the_oci_states() {
    if !require_root_and_busybox("oci lifecycle") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let bundle = busybox_bundle(&t.path().join("b"), &["sleep", "30"], |_| {}).unwrap();
    let root = t.path().join("state");
    let id = unique_id("life");
    let b = bundle.to_str().unwrap();
    let pid_file = t.path().join("pid");
    ok(&oci_bg(
        &root,
        &[
            "create",
            "--bundle",
            b,
            "--pid-file",
            pid_file.to_str().unwrap(),
            &id,
        ],
    ));
    assert_eq!(status(&root, &id), "created");
    let state: serde_json::Value = serde_json::from_str(&ok(&oci(&root, &["state", &id]))).unwrap();
    let pid = state["pid"].as_i64().unwrap();
    assert!(pid > 0);
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), pid.to_string());
    assert_eq!(
        state["bundle"].as_str().unwrap(),
        bundle.canonicalize().unwrap().to_str().unwrap()
    );
    // A created container's process has not exec'd yet: it is still us.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_ne!(comm.trim(), "sleep");

    ok(&oci(&root, &["start", &id]));
    assert_eq!(status(&root, &id), "running");
    let started = oci(&root, &["start", &id]);
    assert!(
        !started.status.success(),
        "a running container cannot be started again"
    );
    let del = oci(&root, &["delete", &id]);
    assert!(
        !del.status.success(),
        "a running container is not deleted without --force"
    );

    ok(&oci(&root, &["kill", &id, "KILL"]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&root, &id) != "stopped" {
        assert!(
            Instant::now() < deadline,
            "container did not stop after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ok(&oci(&root, &["delete", &id]));
    let gone = oci(&root, &["state", &id]);
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("does not exist"));
}

#[test]
fn run_exits_with_the_container_exit_code_and_cleans_up() {
    if !require_root_and_busybox("oci run") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let bundle = busybox_bundle(
        &t.path().join("b"),
        &["sh", "-c", "echo out; exit 7"],
        |_| {},
    )
    .unwrap();
    let root = t.path().join("state");
    let id = unique_id("run");
    let o = oci(&root, &["run", "--bundle", bundle.to_str().unwrap(), &id]);
    assert_eq!(
        o.status.code(),
        Some(7),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
    assert!(
        !oci(&root, &["state", &id]).status.success(),
        "run deletes the container"
    );
}

#[test]
fn create_twice_with_one_id_is_refused() {
    if !require_root_and_busybox("oci duplicate id") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let bundle = busybox_bundle(&t.path().join("b"), &["true"], |_| {}).unwrap();
    let root = t.path().join("state");
    let id = unique_id("dup");
    let b = bundle.to_str().unwrap();
    ok(&oci_bg(&root, &["create", "--bundle", b, &id]));
    let again = oci_bg(&root, &["create", "--bundle", b, &id]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    ok(&oci(&root, &["delete", &id]));
}

#[test]
fn exec_joins_the_running_container() {
    if !require_root_and_busybox("oci exec") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let bundle = busybox_bundle(&t.path().join("b"), &["sleep", "30"], |s| {
        s.set_hostname(Some("inside".into()));
    })
    .unwrap();
    let root = t.path().join("state");
    let id = unique_id("exec");
    ok(&oci_bg(
        &root,
        &["run", "--detach", "--bundle", bundle.to_str().unwrap(), &id],
    ));
    let out = ok(&oci(
        &root,
        &["exec", &id, "sh", "-c", "hostname; cat /proc/1/comm"],
    ));
    assert_eq!(out, "inside\nsleep\n");
    let code = oci(&root, &["exec", &id, "sh", "-c", "exit 3"]);
    assert_eq!(code.status.code(), Some(3));
    ok(&oci(&root, &["delete", "--force", &id]));
}

#[test]
fn bad_config_gives_a_clear_error_and_leaves_no_state() {
    if !require_root_and_busybox("oci bad config") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let bundle = busybox_bundle(&t.path().join("b"), &["true"], |s| {
        let mut p = s.process().clone().unwrap();
        p.set_args(Some(vec!["/bin/definitely-not-here".into()]));
        s.set_process(Some(p));
    })
    .unwrap();
    let root = t.path().join("state");
    let id = unique_id("bad");
    let o = oci(
        &root,
        &["create", "--bundle", bundle.to_str().unwrap(), &id],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("definitely-not-here"), "{err}");
    assert!(!root.join(&id).exists(), "failed create leaves no state");
}
