//! `hostUsers: false` pods, through the built binary and the real kubectl:
//! the pod's containers run in a user namespace of their own, where uid 0
//! is an unprivileged uid of the host, and still share the pod's IPC
//! namespace, /dev/mqueue included (which such a container may not mount
//! itself: the intermediate mounts it for the pod's IPC namespace and the
//! init binds it).
//!
//! Needs root, kubectl and busybox-static; under CI=true a missing one is
//! a failure, elsewhere the test prints why it skips.

mod common;

use std::os::unix::fs::PermissionsExt;

/// The host uids of processes named `comm` (from /proc/PID/status).
fn host_uids_of(comm: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let status = match std::fs::read_to_string(e.path().join("status")) {
            Ok(s) => s,
            Err(_) => continue,
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        if field("Name:").as_deref() == Some(comm) {
            if let Some(uid) = field("Uid:").and_then(|u| u.split_whitespace().next()?.parse().ok())
            {
                out.push(uid);
            }
        }
    }
    out
}

#[test]
fn host_users_false_pods_run_as_root_mapped_to_an_unprivileged_host_uid_share_their_mqueue_and_the_process_tier_refuses_them(
) {
    if !common::require_pods() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    // The containers' mapped root reads the image layers and its files
    // under the data dir.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod data dir");
    common::build_image(tmp.path(), "busybox:1");
    let c = common::start_cluster_in(tmp.path(), &[]);
    // A queue name unique to this run, so the host's /dev/mqueue can be
    // checked for it.
    let queue = format!("evoke-userns-{}", std::process::id());
    c.run_pod(
        "unprivileged",
        &format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: unprivileged}}
spec:
  hostUsers: false
  terminationGracePeriodSeconds: 1
  containers:
  - name: a
    image: busybox:1
    command: [/bin/sh, -c, 'id -u; cat /proc/self/uid_map; touch /dev/mqueue/{queue} && echo made {queue}; exec sleep 3600']
  - name: b
    image: busybox:1
    command: [/bin/sh, -c, 'until [ -e /dev/mqueue/{queue} ]; do sleep 0.2; done; echo b sees {queue}; exec sleep 3600']
"
        ),
    );
    c.wait_for("both containers' output", 30, || {
        let a = String::from_utf8_lossy(&c.kubectl(&["logs", "unprivileged", "-c", "a"]).stdout)
            .into_owned();
        let b = String::from_utf8_lossy(&c.kubectl(&["logs", "unprivileged", "-c", "b"]).stdout)
            .into_owned();
        a.contains(&format!("made {queue}")) && b.contains(&format!("b sees {queue}"))
    });
    let logs = String::from_utf8_lossy(&c.kubectl(&["logs", "unprivileged", "-c", "a"]).stdout)
        .into_owned();
    let mut lines = logs.lines();
    assert_eq!(lines.next(), Some("0"), "root inside: {logs}");
    // uid_map: "0 HOSTID COUNT", HOSTID an ordinary (non-zero) host uid.
    let map: Vec<u64> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(
        map.len() == 3 && map[0] == 0 && map[1] >= 1000 && map[2] >= 1,
        "uid_map: {logs}"
    );
    let host_uid = map[1] as u32;
    // Seen from the host, the containers' processes run as that uid.
    assert!(
        host_uids_of("sleep").contains(&host_uid),
        "no sleep process of uid {host_uid} on the host: {:?}",
        host_uids_of("sleep")
    );
    // The queue lives in the pod's IPC namespace, not the host's.
    assert!(
        !std::path::Path::new("/dev/mqueue").join(&queue).exists(),
        "the pod's queue {queue} showed up in the host's /dev/mqueue"
    );
    // kubectl exec joins the same user namespace (and the pod's IPC
    // namespace, which that namespace's root could not join by itself).
    let out = c.ok(&[
        "exec",
        "unprivileged",
        "-c",
        "b",
        "--",
        "sh",
        "-c",
        "id -u; cat /proc/self/uid_map; ls /dev/mqueue",
    ]);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("0"), "{out}");
    // The pod's containers share one id block, as in Kubernetes.
    assert_eq!(
        lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|h| h.parse::<u32>().ok()),
        Some(host_uid),
        "container b's uid_map: {out}"
    );
    assert!(out.contains(&queue), "{out}");
    assert_eq!(c.pod("unprivileged")["status"]["phase"], "Running");

    // The process tier has no user namespaces: such a pod fails visibly.
    c.ok_with(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: v1
kind: Pod
metadata: {name: plain}
spec:
  hostUsers: false
  runtimeClassName: process
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: busybox:1
    command: [/bin/sleep, '3600']
",
        ),
    );
    c.wait_for("the process tier's refusal in the pod's status", 30, || {
        c.pod("plain")["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("hostUsers: false) needs the container tier"))
    });
}
