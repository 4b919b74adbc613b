//! `evoke run --userns`: the container runs in its own user namespace, its
//! root is an unprivileged uid on the host, the image (owned by host root)
//! is usable through idmapped layers, and `evoke exec` joins the namespace.

// Helpers outside #[test] fns unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod run_support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use evoke_runtime::{WorkloadRuntime, WorkloadState};
use run_support::{can_run_containers, text, Env};

/// A busybox env whose data dir the container's root may walk into (its
/// parents must be searchable by others).
fn open_env() -> Env {
    let env = Env::with_busybox();
    std::fs::set_permissions(env.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    env
}

/// The host pid of a running container's init.
fn init_pid(env: &Env, id: &str) -> u32 {
    let tier = evoke_container::tier::ContainerTier::new(&env.data).unwrap();
    match tier.state(id).unwrap().state {
        WorkloadState::Running { pid } => pid,
        other => panic!("container {id} is not running: {other:?}"),
    }
}

/// The (container, host, count) lines of a uid_map.
fn map_lines(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
        .filter(|f| f.len() == 3)
        .collect()
}

#[test]
fn root_in_a_userns_container_is_an_unprivileged_host_uid_and_can_use_the_image() {
    if !can_run_containers() {
        return;
    }
    let env = open_env();
    let script = "cat /proc/self/uid_map; echo uid=$(id -u); \
                  ls -ln /bin/busybox; touch /newfile && echo wrote-root; \
                  echo hi > /etc/motd && echo wrote-etc; \
                  echo 10.0.0.1 db >> /etc/hosts && echo wrote-hosts";
    let out = env.ok(&[
        "run",
        "--rm",
        "--userns=300000:65536",
        "busybox",
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(map_lines(&out)[0], ["0", "300000", "65536"], "{out}");
    assert!(out.contains("uid=0"), "{out}");
    // The image's files, owned by host root, belong to the container's root.
    let busybox_line = out.lines().find(|l| l.contains("/bin/busybox")).unwrap();
    let owner: Vec<&str> = busybox_line.split_whitespace().skip(2).take(2).collect();
    assert_eq!(owner, ["0", "0"], "{out}");
    for wrote in ["wrote-root", "wrote-etc", "wrote-hosts"] {
        assert!(out.contains(wrote), "{wrote}: {out}");
    }

    // Seen from the host, the running container's root is uid 300000.
    let id = env
        .ok(&[
            "run",
            "-d",
            "--userns=300000:65536",
            "busybox",
            "sleep",
            "60",
        ])
        .trim()
        .to_string();
    let pid = init_pid(&env, &id);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uids: Vec<&str> = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .split_whitespace()
        .skip(1)
        .collect();
    assert_eq!(uids, ["300000"; 4], "{status}");
    env.ok(&["rm", "-f", &id]);
}

#[test]
fn exec_joins_the_user_namespace_and_files_root_writes_belong_to_the_mapped_uid() {
    if !can_run_containers() {
        return;
    }
    let env = open_env();
    let a = env
        .ok(&["run", "-d", "--userns", "busybox", "sleep", "60"])
        .trim()
        .to_string();
    let b = env
        .ok(&["run", "-d", "--userns=auto", "busybox", "sleep", "60"])
        .trim()
        .to_string();
    let init_map =
        std::fs::read_to_string(format!("/proc/{}/uid_map", init_pid(&env, &a))).unwrap();
    let exec_map = env.ok(&["exec", &a, "cat", "/proc/self/uid_map"]);
    assert_eq!(map_lines(&exec_map), map_lines(&init_map));
    let host_root: u32 = map_lines(&init_map)[0][1].parse().unwrap();
    assert_ne!(host_root, 0, "{init_map}");
    assert_eq!(env.ok(&["exec", &a, "id", "-u"]).trim(), "0");

    // A file made by root inside lands in the upper dir as the mapped uid.
    env.ok(&["exec", &a, "sh", "-c", "echo x > /root/made-by-exec"]);
    let made = env
        .data
        .join("containers")
        .join(&a)
        .join("upper/root/made-by-exec");
    let md = std::fs::metadata(&made).unwrap();
    assert_eq!(
        (md.uid(), md.gid()),
        (host_root, host_root),
        "{}",
        made.display()
    );

    // Each auto container has a block of its own.
    let b_map = std::fs::read_to_string(format!("/proc/{}/uid_map", init_pid(&env, &b))).unwrap();
    let b_root: u64 = map_lines(&b_map)[0][1].parse().unwrap();
    let (lo, hi) = (
        u64::from(host_root).min(b_root),
        u64::from(host_root).max(b_root),
    );
    assert!(
        hi >= lo + 65536,
        "overlapping auto ranges: {init_map} / {b_map}"
    );
    env.ok(&["rm", "-f", &a, &b]);
    // No idmapped layer or overlay is left mounted.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let data = env.data.display().to_string();
    assert!(!mounts.contains(&data), "left mounted: {mounts}");
}

#[test]
fn bad_userns_values_and_other_tiers_are_refused_with_a_clear_error() {
    if !can_run_containers() {
        return;
    }
    let env = open_env();
    for (args, says) in [
        (vec!["--userns=0:65536"], "host's root"),
        (vec!["--userns=lots"], "invalid --userns value"),
        (vec!["--userns=5:0"], "invalid --userns value"),
        (vec!["--tier", "process", "--userns"], "container tier"),
    ] {
        let mut all = vec!["run", "--rm"];
        all.extend(args.iter().copied());
        all.extend(["busybox", "true"]);
        let out = env.evoke(&all);
        assert!(!out.status.success(), "{all:?} succeeded");
        let err = text(&out.stderr);
        assert!(err.contains(says), "{all:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{all:?}: {err}");
    }
}

#[test]
fn a_data_dir_the_containers_root_cannot_reach_is_a_clear_error_and_leaves_nothing() {
    if !can_run_containers() {
        return;
    }
    // A parent directory the mapped root may not search.
    let env = Env::with_busybox();
    std::fs::set_permissions(env.tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = env.evoke(&["run", "--rm", "--userns", "busybox", "true"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot reach") && err.contains("chmod o+x"),
        "{err}"
    );
    assert_eq!(env.ok(&["ps", "-a", "-q"]).trim(), "");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&env.data.display().to_string()),
        "{mounts}"
    );
}

#[test]
fn containers_started_at_once_in_auto_mode_get_disjoint_id_blocks() {
    if !can_run_containers() {
        return;
    }
    let env = open_env();
    let runs: Vec<_> = (0..4)
        .map(|_| {
            env.cmd(&["run", "-d", "--userns", "busybox", "sleep", "60"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let ids: Vec<String> = runs
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", text(&out.stderr));
            text(&out.stdout).trim().to_string()
        })
        .collect();
    let mut roots: Vec<u64> = ids
        .iter()
        .map(|id| {
            let map = std::fs::read_to_string(format!("/proc/{}/uid_map", init_pid(&env, id)));
            map_lines(&map.unwrap())[0][1].parse().unwrap()
        })
        .collect();
    roots.sort_unstable();
    for w in roots.windows(2) {
        assert!(w[1] >= w[0] + 65536, "overlapping blocks: {roots:?}");
    }
    let mut rm = vec!["rm", "-f"];
    rm.extend(ids.iter().map(String::as_str));
    env.ok(&rm);
}
