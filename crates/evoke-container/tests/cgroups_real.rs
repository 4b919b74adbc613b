//! The cgroup managers against the kernel: v2 on this host's unified mount
//! (or whatever cgroup2 mount there is), v1 on the memory/pids hierarchies.

// Helpers outside #[test] fns unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use evoke_container::cgroups::{self, CgroupManager, Hierarchy, Resources, V2};

fn needs_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: needs root");
    }
    eprintln!("skipping {test}: needs root");
    false
}

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

fn sleeper() -> Child {
    Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawn sleep")
}

fn wait_gone(m: &dyn CgroupManager) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !m.procs().expect("read cgroup.procs").is_empty() {
        assert!(Instant::now() < deadline, "processes left in the cgroup");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn v2_cgroup_holds_kills_and_removes_processes_on_the_unified_mount() {
    if !needs_root("cgroup v2") {
        return;
    }
    let Some(mount) = cgroup2_mount() else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("no cgroup2 mount on this host");
        }
        eprintln!("skipping: no cgroup2 mount");
        return;
    };
    let dir = mount.join(format!("evoke-test-v2-{}", std::process::id()));
    let m = V2::create(&mount, &dir).unwrap();
    let mut child = sleeper();
    m.add_process(child.id() as i32).unwrap();
    assert_eq!(m.procs().unwrap(), vec![child.id() as i32]);
    // On a hybrid host the memory/cpu/pids controllers live in v1, so
    // only the limits the unified mount offers can be set; pure v2 takes all.
    let controllers = std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
    if controllers.split_whitespace().any(|c| c == "pids") {
        m.set(&Resources {
            pids_limit: Some(7),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("pids.max"))
                .unwrap()
                .trim(),
            "7"
        );
    }
    m.kill_all().unwrap();
    let _ = child.wait();
    wait_gone(&m);
    m.remove().unwrap();
    assert!(!dir.exists());
    assert!(!Path::new(&dir).exists());
}

#[test]
fn v1_cgroup_limits_memory_and_pids_of_a_real_process() {
    if !needs_root("cgroup v1") {
        return;
    }
    let h = cgroups::detect().unwrap();
    if !matches!(h, Hierarchy::V1 { .. }) {
        eprintln!("skipping: this host drives cgroups through v2");
        return;
    }
    let name = format!("evoke-test-v1-{}", std::process::id());
    let m = h.create(&name).unwrap();
    m.set(&Resources {
        memory_limit: Some(64 << 20),
        pids_limit: Some(9),
        cpu_quota: Some(20_000),
        cpu_period: Some(100_000),
        ..Default::default()
    })
    .unwrap();
    let mut child = sleeper();
    m.add_process(child.id() as i32).unwrap();
    assert!(m.procs().unwrap().contains(&(child.id() as i32)));
    let cgroups::CgroupPaths::V1(dirs) = m.paths() else {
        panic!("v1 manager reports v2 paths")
    };
    let read = |ctrl: &str, f: &str| std::fs::read_to_string(dirs[ctrl].join(f)).unwrap();
    assert_eq!(read("memory", "memory.limit_in_bytes").trim(), "67108864");
    assert_eq!(read("pids", "pids.max").trim(), "9");
    assert_eq!(read("cpu", "cpu.cfs_quota_us").trim(), "20000");
    assert_eq!(m.oom_kills().unwrap(), 0);
    m.remove().unwrap();
    let _ = child.wait();
    for d in dirs.values() {
        assert!(!d.exists(), "{} left behind", d.display());
    }
}
