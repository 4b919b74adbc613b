//! Exec probes through the whole stack: a pod whose exec probes fail fast
//! (no such program) and time out (a command that outlives its
//! timeoutSeconds) leaves no exec'd process unreaped in its pid namespace,
//! and its deletion is as quick as any other pod's. (An unreaped exec'd
//! process, a child of the server, once made a pod's deletion take ~41 s:
//! the container's init cannot finish dying while one is left.)

// Helpers outside #[test] fns unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

/// Zombie children of `parent`, as (pid, pid namespace).
fn zombie_children(parent: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let f: Vec<&str> = stat[close + 2..].split(' ').collect();
        if f.first() == Some(&"Z") && f.get(1).and_then(|p| p.parse().ok()) == Some(parent) {
            let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid"))
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            out.push((pid, ns));
        }
    }
    out
}

#[test]
fn failing_and_timed_out_exec_probes_leave_no_zombie_and_deletion_is_prompt() {
    if !common::require_pods() {
        return;
    }
    let c = common::start_cluster();
    let pod = "apiVersion: v1
kind: Pod
metadata: {name: probed}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: busybox:1
    command: [sleep, '3600']
    readinessProbe:
      exec: {command: [/no/such/probe]}
      periodSeconds: 1
    livenessProbe:
      exec: {command: [sleep, '30']}
      periodSeconds: 1
      timeoutSeconds: 1
      failureThreshold: 1000
  - name: d
    image: busybox:1
    command: [sleep, '3600']
    readinessProbe:
      exec: {command: [/no/such/probe]}
      periodSeconds: 1
  - name: e
    image: busybox:1
    command: [sleep, '3600']
    readinessProbe:
      exec: {command: [/no/such/probe]}
      periodSeconds: 1
";
    c.run_pod("probed", pod);
    // Enough periods for both probes to run several times.
    std::thread::sleep(Duration::from_secs(6));
    let p = c.pod("probed");
    assert_eq!(
        p["status"]["containerStatuses"][0]["ready"], false,
        "a probe of a missing program must fail: {p}"
    );
    // A process that has just ended is a zombie for the instant before its
    // waiter reaps it; one seen in three looks over two seconds is left.
    let mut left = zombie_children(c.pid());
    for _ in 0..2 {
        std::thread::sleep(Duration::from_secs(1));
        let now = zombie_children(c.pid());
        left.retain(|z| now.contains(z));
    }
    assert!(left.is_empty(), "exec'd processes left unreaped: {left:?}");
    // Timed-out probe commands are killed, not left running: only the one
    // of the current period (and the one being killed) may be alive, where
    // they used to pile up one a second.
    // (Exec'd processes are the server's children; other tests may run
    // `sleep 30` too.)
    let server = format!(") S {} ", c.pid());
    let sleeping = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == b"sleep\x0030\x00")
                && std::fs::read_to_string(e.path().join("stat")).is_ok_and(|s| s.contains(&server))
        })
        .count();
    assert!(
        sleeping <= 3,
        "{sleeping} timed-out probe commands still run"
    );

    let t = Instant::now();
    c.ok(&["delete", "pod", "probed", "--wait=true", "--timeout=60s"]);
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "deleting the pod took {took:?}\n{}",
        c.log_tail()
    );
}
