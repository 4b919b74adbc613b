//! Resource limits through `evoke run`: a memory hog is OOM-killed and
//! reported, a fork bomb hits the pids limit, and the process tier puts a
//! host process in its own cgroup.
// Helpers here are test code too: a failed step should panic.
#![allow(clippy::unwrap_used)]

mod run_support;

use run_support::{can_run_containers, text, Env};

#[test]
fn memory_hog_is_oom_killed_with_exit_137() {
    if !can_run_containers() {
        return;
    }
    let env = Env::with_busybox();
    let out = env.evoke(&[
        "run",
        "--name",
        "hog",
        "--memory",
        "32m",
        "busybox",
        "sh",
        "-c",
        "x=aaaaaaaa; while true; do x=$x$x; done",
    ]);
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("OOMKilled"),
        "{}",
        text(&out.stderr)
    );
    let ps = env.ok(&["ps", "-a"]);
    assert!(
        ps.contains("Exited (137)") && ps.contains("OOMKilled"),
        "{ps}"
    );
}

#[test]
fn fork_bomb_is_contained_by_the_pids_limit() {
    if !can_run_containers() {
        return;
    }
    let env = Env::with_busybox();
    // 50 background sleeps cannot all start under a limit of 16.
    let out = env.evoke(&[
        "run",
        "--rm",
        "--pids-limit",
        "16",
        "busybox",
        "sh",
        "-c",
        "for i in $(seq 1 50); do sleep 3 & done; echo spawned",
    ]);
    let err = text(&out.stderr);
    assert!(
        err.contains("can't fork") || err.contains("Resource temporarily unavailable"),
        "{err}"
    );
    // The host is fine: we can still run another container at once.
    assert_eq!(env.ok(&["run", "--rm", "busybox", "echo", "ok"]), "ok\n");
}

#[test]
fn cpu_limit_is_written_to_the_cgroup() {
    if !can_run_containers() {
        return;
    }
    let env = Env::with_busybox();
    // The process tier's process sees its cgroup files on the host.
    let out = env.ok(&[
        "run",
        "--rm",
        "--tier",
        "process",
        "--cpus",
        "0.5",
        "--memory",
        "64m",
        "busybox",
        "sh",
        "-c",
        "cat /proc/self/cgroup",
    ]);
    let cpu = out
        .lines()
        .find(|l| l.contains(":cpu,cpuacct:") || l.contains(":cpu:") || l.starts_with("0::"))
        .unwrap_or_else(|| panic!("no cpu cgroup in {out}"));
    assert!(cpu.contains("/evoke/"), "{cpu}");
}

#[test]
fn process_tier_runs_on_the_host_with_the_exit_code() {
    if !can_run_containers() {
        return;
    }
    let env = Env::with_busybox();
    let out = env.evoke(&[
        "run",
        "--tier",
        "process",
        "busybox",
        "sh",
        "-c",
        "echo host; exit 9",
    ]);
    assert_eq!(out.status.code(), Some(9), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "host\n");
    let ps = env.ok(&["ps", "-a"]);
    assert!(ps.contains("Exited (9)"), "{ps}");
}

/// The value of the first of `files` found in a cgroup directory named `id`
/// anywhere under /sys/fs/cgroup (v1 has one tree per controller, v2 one).
fn cgroup_value(id: &str, files: &[&str]) -> Option<String> {
    fn walk(dir: &std::path::Path, id: &str, depth: u32, out: &mut Vec<std::path::PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if !p.is_dir() || p.is_symlink() {
                continue;
            }
            if e.file_name() == id {
                out.push(p);
            } else if depth > 0 {
                walk(&p, id, depth - 1, out);
            }
        }
    }
    let mut dirs = Vec::new();
    walk(std::path::Path::new("/sys/fs/cgroup"), id, 4, &mut dirs);
    dirs.iter().find_map(|d| {
        files
            .iter()
            .find_map(|f| std::fs::read_to_string(d.join(f)).ok())
            .map(|v| v.trim().to_string())
    })
}

#[test]
fn container_limits_reach_its_cgroup() {
    if !can_run_containers() {
        return;
    }
    let env = Env::with_busybox();
    let id = env.ok(&[
        "run",
        "-d",
        "--cpus",
        "0.5",
        "--memory",
        "64m",
        "--pids-limit",
        "33",
        "busybox",
        "sleep",
        "100",
    ]);
    let id = id.trim();
    let quota = cgroup_value(id, &["cpu.cfs_quota_us", "cpu.max"]).expect("cpu cgroup");
    assert!(quota == "50000" || quota == "50000 100000", "{quota}");
    let mem = cgroup_value(id, &["memory.limit_in_bytes", "memory.max"]).expect("memory cgroup");
    assert_eq!(mem, (64u64 << 20).to_string());
    assert_eq!(cgroup_value(id, &["pids.max"]).as_deref(), Some("33"));
    env.ok(&["rm", "-f", id]);
    assert_eq!(
        cgroup_value(id, &["pids.max"]),
        None,
        "the cgroup is removed"
    );
}
