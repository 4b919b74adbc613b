//! Processes started by `exec` are children of the caller (they are cloned
//! with CLONE_PARENT into the container's pid namespace). A child left as a
//! zombie there keeps the container's init from finishing its exit: the
//! kernel's pid-namespace teardown waits until every process of the
//! namespace has been reaped, and only the caller can reap these. These
//! tests drive the container tier the way the node agent does (probes,
//! failing commands, callers that give up) and check that no exec'd
//! process is left unreaped and that the container still dies at once.

// Helpers outside #[test] fns unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use evoke_container::testutil::{require_root_and_busybox, unique_id};
use evoke_container::tier::ContainerTier;
use evoke_runtime::image::ImportOptions;
use evoke_runtime::{ExecSpec, Stdio, WorkloadRuntime, WorkloadSpec, WorkloadState};

/// A tier over a fresh data dir holding a `busybox` image.
fn tier_with_busybox(tmp: &Path) -> ContainerTier {
    let root = tmp.join("rootfs");
    evoke_runtime::testing::busybox_rootfs(&root).unwrap();
    let data = tmp.join("data");
    let tier = ContainerTier::new(&data).unwrap();
    tier.images()
        .build_dir(&root, "busybox", &ImportOptions::default())
        .unwrap();
    tier
}

/// Removes the workload even when the test fails half-way.
struct Removed<'a>(&'a ContainerTier, String);

impl Drop for Removed<'_> {
    fn drop(&mut self) {
        let _ = self.0.remove(&self.1, true);
    }
}

fn running(tier: &ContainerTier, id: &str, command: &[&str]) -> u32 {
    let spec = WorkloadSpec {
        id: id.to_string(),
        image: Some("busybox".into()),
        command: Some(command.iter().map(|s| s.to_string()).collect()),
        ..WorkloadSpec::default()
    };
    tier.create(&spec, Stdio::default()).unwrap();
    tier.start(id).unwrap();
    match tier.state(id).unwrap().state {
        WorkloadState::Running { pid } => pid,
        other => panic!("workload {id} is not running: {other:?}"),
    }
}

fn exec_spec(command: &[&str]) -> ExecSpec {
    ExecSpec {
        command: command.iter().map(|s| s.to_string()).collect(),
        ..ExecSpec::default()
    }
}

/// Children of this process that are zombies, with their pid namespace.
fn zombie_children() -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let f: Vec<&str> = stat[close + 2..].split(' ').collect();
        if f.first() == Some(&"Z") && f.get(1).and_then(|p| p.parse().ok()) == Some(me) {
            let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid"))
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            out.push((pid, ns));
        }
    }
    out
}

/// Kills the container and returns how long its init took to be gone
/// (at most a little over 15 s: a hung teardown is reported, not awaited).
fn kill_and_time(tier: &ContainerTier, id: &str) -> Duration {
    let t = Instant::now();
    tier.signal(id, 9).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (tier2, id2) = (tier.clone(), id.to_string());
    std::thread::spawn(move || {
        let _ = tx.send(tier2.wait(&id2, None));
    });
    if let Ok(r) = rx.recv_timeout(Duration::from_secs(15)) {
        r.unwrap();
    }
    t.elapsed()
}

#[test]
fn failing_execs_leave_no_zombie_and_the_container_dies_at_once() {
    if !require_root_and_busybox("exec reaping") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let tier = Arc::new(tier_with_busybox(tmp.path()));
    let id = unique_id("reap");
    let init = running(&tier, &id, &["sleep", "600"]);
    let _removed = Removed(&tier, id.clone());
    let ns = std::fs::read_link(format!("/proc/{init}/ns/pid"))
        .unwrap()
        .display()
        .to_string();
    // Many quick execs from several threads at once, as probes and
    // `kubectl exec` come: some succeed, some fail in the container (no
    // such program, a bad working directory) after the process was cloned.
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (tier, id) = (tier.clone(), id.clone());
            std::thread::spawn(move || {
                let mut failures = 0;
                for i in 0..25 {
                    let spec = match (t + i) % 3 {
                        0 => exec_spec(&["true"]),
                        1 => exec_spec(&["/no/such/program"]),
                        _ => ExecSpec {
                            workdir: Some("/no/such/dir".into()),
                            ..exec_spec(&["true"])
                        },
                    };
                    match tier.exec(&id, &spec, Stdio::default()) {
                        Ok(0) => {}
                        Ok(code) => panic!("exec {:?} exited {code}", spec.command),
                        Err(_) => failures += 1,
                    }
                }
                failures
            })
        })
        .collect();
    let failures: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(failures > 0, "the failing execs did not fail");
    let left: Vec<_> = zombie_children()
        .into_iter()
        .filter(|(_, n)| *n == ns)
        .collect();
    let took = kill_and_time(&tier, &id);
    assert!(
        left.is_empty(),
        "exec'd processes left as zombies in the container: {left:?} (its init took {took:?} to die)"
    );
    assert!(
        took < Duration::from_secs(5),
        "the init took {took:?} to die"
    );
}

#[test]
fn an_exec_past_its_timeout_is_killed_and_reaped_at_once() {
    if !require_root_and_busybox("exec timeout") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let tier = tier_with_busybox(tmp.path());
    let id = unique_id("reapt");
    running(&tier, &id, &["sleep", "600"]);
    let _removed = Removed(&tier, id.clone());
    let spec = ExecSpec {
        timeout: Some(Duration::from_millis(300)),
        ..exec_spec(&["sleep", "30"])
    };
    let t = Instant::now();
    let err = tier.exec(&id, &spec, Stdio::default()).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    match &err {
        evoke_runtime::RuntimeError::Io { error, .. } => {
            assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{err}")
        }
        other => panic!("not a timeout: {other}"),
    }
    assert!(err.to_string().contains("sleep"), "{err}");
    // Within its time, an exec gives its exit code.
    let quick = ExecSpec {
        timeout: Some(Duration::from_secs(20)),
        ..exec_spec(&["sh", "-c", "exit 7"])
    };
    assert_eq!(tier.exec(&id, &quick, Stdio::default()).unwrap(), 7);
    assert!(zombie_children().is_empty(), "{:?}", zombie_children());
    let took = kill_and_time(&tier, &id);
    assert!(
        took < Duration::from_secs(5),
        "the init took {took:?} to die"
    );
}

#[test]
fn a_container_killed_under_a_running_exec_dies_at_once() {
    if !require_root_and_busybox("exec under kill") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let tier = Arc::new(tier_with_busybox(tmp.path()));
    let id = unique_id("reapk");
    running(&tier, &id, &["sleep", "600"]);
    let _removed = Removed(&tier, id.clone());
    // A caller that gave up on its exec (as a probe whose timeout fired
    // leaves its blocking thread behind): nobody joins this thread.
    let (t2, id2) = (tier.clone(), id.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(t2.exec(&id2, &exec_spec(&["sleep", "300"]), Stdio::default()));
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while sleeping_execs(&tier, &id) == 0 {
        assert!(Instant::now() < deadline, "the exec did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = kill_and_time(&tier, &id);
    assert!(
        took < Duration::from_secs(5),
        "the init took {took:?} to die"
    );
    // The exec'd process died with its container and was reaped.
    let code = rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(code, 137);
    assert!(zombie_children().is_empty(), "{:?}", zombie_children());
}

/// How many `sleep 300` processes run in the container's pid namespace.
fn sleeping_execs(tier: &ContainerTier, id: &str) -> usize {
    let init = match tier.state(id).unwrap().state {
        WorkloadState::Running { pid } => pid,
        other => panic!("workload {id} is not running: {other:?}"),
    };
    let ns = std::fs::read_link(format!("/proc/{init}/ns/pid")).ok();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            let p = e.path();
            std::fs::read(p.join("cmdline")).is_ok_and(|c| c == b"sleep\x00300\x00")
                && std::fs::read_link(p.join("ns/pid")).ok() == ns
        })
        .count()
}
