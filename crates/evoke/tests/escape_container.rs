//! Escape tests through the `evoke` binary: each one fails if the escape
//! works. The containers are busybox bundles with Docker's defaults.

// Helpers outside #[test] fns unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Output};

use evoke_container::oci_spec::runtime::{LinuxResources, Spec};
use evoke_container::testutil::{busybox_bundle, leak_fd, require_root_and_busybox, unique_id};

fn oci(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_evoke"))
        .arg("oci")
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("run evoke")
}

/// Runs `script` in a fresh container (after `edit`) and returns its output.
fn run_sh(name: &str, script: &str, edit: impl FnOnce(&mut Spec)) -> Output {
    let t = tempfile::tempdir().unwrap();
    let bundle = busybox_bundle(&t.path().join("b"), &["sh", "-c", script], edit).unwrap();
    let root = t.path().join("state");
    oci(
        &root,
        &[
            "run",
            "--bundle",
            bundle.to_str().unwrap(),
            &unique_id(name),
        ],
    )
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn set_args(s: &mut Spec, args: &[&str]) {
    let mut p = s.process().clone().unwrap();
    p.set_args(Some(args.iter().map(|a| a.to_string()).collect()));
    s.set_process(Some(p));
}

fn set_resources(s: &mut Spec, r: LinuxResources) {
    let mut l = s.linux().clone().unwrap();
    l.set_resources(Some(r));
    s.set_linux(Some(l));
}

/// CVE-2019-5736: a container whose process is /proc/self/exe (or a script
/// whose interpreter is) would get the runtime's host binary as its own
/// executable and could then overwrite it through /proc/PID/exe.
#[test]
fn container_cannot_exec_the_runtime_binary_via_proc_self_exe() {
    if !require_root_and_busybox("CVE-2019-5736") {
        return;
    }
    // Run a copy of evoke, so that a successful attack cannot hurt the
    // build's binary, and check its bytes at the end.
    let t = tempfile::tempdir().unwrap();
    let evoke = t.path().join("evoke-copy");
    std::fs::copy(env!("CARGO_BIN_EXE_evoke"), &evoke).unwrap();
    let before = std::fs::read(&evoke).unwrap();
    let attacks: [&[&str]; 2] = [&["/proc/self/exe", "--version"], &["/bin/evil"]];
    for (i, args) in attacks.iter().enumerate() {
        let dir = t.path().join(format!("b{i}"));
        let bundle = busybox_bundle(&dir, args, |_| {}).unwrap();
        std::fs::write(dir.join("rootfs/bin/evil"), "#!/proc/self/exe oci\n").unwrap();
        std::os::unix::fs::PermissionsExt::set_mode(
            &mut std::fs::metadata(dir.join("rootfs/bin/evil"))
                .unwrap()
                .permissions(),
            0o755,
        );
        Command::new("chmod")
            .arg("755")
            .arg(dir.join("rootfs/bin/evil"))
            .status()
            .unwrap();
        let o = Command::new(&evoke)
            .arg("oci")
            .arg("--root")
            .arg(t.path().join("state"))
            .args([
                "run",
                "--bundle",
                bundle.to_str().unwrap(),
                &unique_id("exe"),
            ])
            .output()
            .unwrap();
        assert!(!o.status.success(), "attack {args:?} ran: {}", stdout(&o));
        assert!(
            stderr(&o).contains("runtime's own binary"),
            "attack {args:?}: {}",
            stderr(&o)
        );
        assert!(
            !stdout(&o).contains("evoke"),
            "the runtime ran inside the container"
        );
    }
    assert!(
        std::fs::read(&evoke).unwrap() == before,
        "host binary was modified"
    );
}

/// CVE-2019-5736, the other way in: a process that holds on to the init's
/// /proc/PID/exe while the init still runs the runtime (before `start`), and
/// reopens it for writing once no process runs it any more. Others can see
/// the init before `start` when it joins a pid namespace that already has
/// processes (here another container's). The runtime then runs from a
/// read-only overlay of its binary, so the reopen fails. (With a pid
/// namespace of its own the init is alone and not dumpable, and its last
/// exec goes through a sealed trampoline: no copy is made.)
#[test]
fn runtime_binary_seen_by_a_container_cannot_be_reopened_for_writing() {
    if !require_root_and_busybox("CVE-2019-5736 reopen") {
        return;
    }
    // A copy of evoke, so that a failed defence cannot hurt the build's binary.
    let t = tempfile::tempdir().unwrap();
    let evoke = t.path().join("evoke-copy");
    std::fs::copy(env!("CARGO_BIN_EXE_evoke"), &evoke).unwrap();
    let root = t.path().join("state");
    // The first container owns the pid namespace that the second joins.
    let first = busybox_bundle(&t.path().join("a"), &["sleep", "60"], |_| {}).unwrap();
    let first_id = unique_id("reopen-ns");
    let first_pid_file = t.path().join("pid-a");
    // Its init keeps stdio open until it runs: no pipes to wait on.
    let status = Command::new(env!("CARGO_BIN_EXE_evoke"))
        .arg("oci")
        .arg("--root")
        .arg(&root)
        .args(["create", "--bundle", first.to_str().unwrap(), "--pid-file"])
        .arg(&first_pid_file)
        .arg(&first_id)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "create the first: {status}");
    let first_pid = std::fs::read_to_string(&first_pid_file).unwrap();
    let pid_ns = format!("/proc/{}/ns/pid", first_pid.trim());
    let bundle = busybox_bundle(&t.path().join("b"), &["true"], |s| {
        let mut l = s.linux().clone().unwrap();
        let mut nss = l.namespaces().clone().unwrap();
        for ns in &mut nss {
            if ns.typ() == evoke_container::oci_spec::runtime::LinuxNamespaceType::Pid {
                ns.set_path(Some(pid_ns.clone().into()));
            }
        }
        l.set_namespaces(Some(nss));
        s.set_linux(Some(l));
    })
    .unwrap();
    let pid_file = t.path().join("pid");
    let id = unique_id("reopen");
    let status = Command::new(&evoke)
        .arg("oci")
        .arg("--root")
        .arg(&root)
        .args(["create", "--bundle", bundle.to_str().unwrap(), "--pid-file"])
        .arg(&pid_file)
        .arg(&id)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "create: {status}");
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let held = std::fs::File::options()
        .read(true)
        .custom_flags(nix::libc::O_PATH)
        .open(format!("/proc/{}/exe", pid.trim()))
        .unwrap();
    let o = oci(&root, &["delete", "--force", &id]);
    assert!(o.status.success(), "delete: {}", stderr(&o));
    let o = oci(&root, &["delete", "--force", &first_id]);
    assert!(o.status.success(), "delete the first: {}", stderr(&o));
    // The init is gone and nothing runs the file now: only a read-only
    // file system stands between the holder and the runtime's binary.
    let reopened = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{}", held.as_raw_fd()));
    match reopened {
        Ok(_) => panic!("the runtime's binary was reopened for writing"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(nix::libc::EROFS), "{e}"),
    }
}

/// CVE-2024-21626: a descriptor of the runtime's (here a directory of the
/// host, deliberately inherited) must not reach the container, neither as
/// an open fd nor as cwd=/proc/self/fd/N.
#[test]
fn leaked_host_fd_is_neither_open_nor_usable_as_cwd() {
    if !require_root_and_busybox("CVE-2024-21626") {
        return;
    }
    let host_dir = tempfile::tempdir().unwrap();
    std::fs::write(host_dir.path().join("host-secret"), "s3cret").unwrap();
    let dir = std::fs::File::open(host_dir.path()).unwrap();
    // A high number, so it cannot be mistaken for the fd `ls` opens.
    let n = leak_fd(dir.as_fd(), 100).unwrap();
    // The inherited fd is not open in the container.
    let o = run_sh(
        "fdleak",
        "ls /proc/self/fd; readlink /proc/self/fd/* ; true",
        |_| {},
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let fds: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    assert!(!fds.contains(&n.to_string()), "fd {n} leaked: {fds:?}");
    assert!(!stdout(&o).contains(host_dir.path().to_str().unwrap()));
    // And a cwd through it is refused rather than landing on the host.
    for fd in [3, 4, 5, 6, 7, 8, 100] {
        let cwd = format!("/proc/self/fd/{fd}");
        let o = run_sh("fdcwd", "cat host-secret ../host-secret; pwd", |s| {
            let mut p = s.process().clone().unwrap();
            p.set_cwd(cwd.clone().into());
            s.set_process(Some(p));
        });
        assert!(!stdout(&o).contains("s3cret"), "escaped via {cwd}");
        assert!(
            !o.status.success(),
            "cwd {cwd} was accepted: {}",
            stdout(&o)
        );
    }
    drop(dir);
}

/// CVE-2019-16884: /proc must be a real procfs, so that masking and the
/// runtime's own /proc lookups act on it: a fake file system mounted over
/// /proc, or a /proc that is a symlink in the rootfs, are refused.
#[test]
fn fake_proc_in_the_bundle_is_refused() {
    if !require_root_and_busybox("CVE-2019-16884") {
        return;
    }
    let fake = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(fake.path().join("self/attr")).unwrap();
    let fake_src = fake.path().to_str().unwrap().to_string();
    let o = run_sh("fakeproc", "cat /proc/self/attr/*; true", |s| {
        let mut mounts = s.mounts().clone().unwrap();
        let m: evoke_container::oci_spec::runtime::Mount = serde_json::from_value(
            serde_json::json!({"destination": "/proc", "type": "bind", "source": fake_src, "options": ["rbind"]}),
        )
        .unwrap();
        mounts.push(m);
        s.set_mounts(Some(mounts));
    });
    assert!(!o.status.success(), "fake /proc accepted: {}", stdout(&o));
    assert!(
        stderr(&o).contains("only a proc filesystem"),
        "{}",
        stderr(&o)
    );

    let t = tempfile::tempdir().unwrap();
    let bundle = busybox_bundle(&t.path().join("b"), &["true"], |_| {}).unwrap();
    let rootfs = bundle.join("rootfs");
    std::fs::remove_dir(rootfs.join("proc")).unwrap();
    std::fs::create_dir(rootfs.join("fakeproc")).unwrap();
    std::os::unix::fs::symlink("/fakeproc", rootfs.join("proc")).unwrap();
    let o = oci(
        &t.path().join("state"),
        &[
            "run",
            "--bundle",
            bundle.to_str().unwrap(),
            &unique_id("symproc"),
        ],
    );
    assert!(!o.status.success(), "symlinked /proc accepted");
    assert!(stderr(&o).contains("symlink"), "{}", stderr(&o));
}

/// Processes in the pid namespace of `pid`, seen from the host.
fn procs_in_pidns_of(pid: i64) -> usize {
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| std::fs::read_link(e.path().join("ns/pid")).ok() == ns)
        .count()
}

#[test]
fn fork_bomb_is_stopped_by_the_pids_limit() {
    if !require_root_and_busybox("fork bomb") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    // The inner shell forks until it cannot; the outer one then becomes a
    // sleep without forking, so the container lives on at its limit.
    let script = "sh -c 'while true; do sleep 60 & done' 2>/dev/null; exec sleep 60";
    let bundle = busybox_bundle(&t.path().join("b"), &["sh", "-c", script], |s| {
        set_resources(
            s,
            serde_json::from_value(serde_json::json!({"pids": {"limit": 16}})).unwrap(),
        );
    })
    .unwrap();
    let root = t.path().join("state");
    let id = unique_id("forkbomb");
    let st = Command::new(env!("CARGO_BIN_EXE_evoke"))
        .arg("oci")
        .arg("--root")
        .arg(&root)
        .args(["run", "--detach", "--bundle", bundle.to_str().unwrap(), &id])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let state: serde_json::Value =
        serde_json::from_slice(&oci(&root, &["state", &id]).stdout).unwrap();
    let pid = state["pid"].as_i64().unwrap();
    // Let the bomb run into the limit, then look from the host.
    let mut most = 0;
    for _ in 0..30 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        most = most.max(procs_in_pidns_of(pid));
    }
    let del = oci(&root, &["delete", "--force", &id]);
    assert!(del.status.success(), "{}", stderr(&del));
    assert!(most <= 16, "{most} processes in a container limited to 16");
    assert!(most >= 8, "the bomb should reach the limit, saw {most}");
}

#[test]
fn memory_hog_is_oom_killed_and_reported_with_137() {
    if !require_root_and_busybox("memory hog") {
        return;
    }
    // The shell itself buffers 200 MB from the substitution: it is the
    // biggest process, so the OOM killer takes pid 1.
    let o = run_sh(
        "oom",
        "a=$(head -c 200000000 /dev/zero | tr '\\0' x); echo survived",
        |s| {
            set_resources(
                s,
                serde_json::from_value(serde_json::json!({"memory": {"limit": 33554432}})).unwrap(),
            );
        },
    );
    assert_eq!(
        o.status.code(),
        Some(137),
        "stdout {} stderr {}",
        stdout(&o),
        stderr(&o)
    );
    assert!(!stdout(&o).contains("survived"));
    assert!(stderr(&o).contains("OOM-killed"), "{}", stderr(&o));
    // The host is fine: it can still start another container.
    let again = run_sh("oom-after", "echo ok", |_| {});
    assert_eq!(stdout(&again), "ok\n");
}

#[test]
fn host_processes_mounts_and_interfaces_are_not_visible() {
    if !require_root_and_busybox("host visibility") {
        return;
    }
    let o = run_sh(
        "visible",
        "echo PROCS; ls /proc | grep '^[0-9]'; echo MOUNTS; cat /proc/mounts; echo NET; ls /sys/class/net; echo LINK; ip -o link",
        |_| {},
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let section = |name: &str, next: &str| -> Vec<String> {
        let start = out.find(name).unwrap() + name.len();
        let end = out[start..].find(next).map_or(out.len(), |e| start + e);
        out[start..end]
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    };
    let procs = section("PROCS\n", "MOUNTS\n");
    assert!(procs.len() <= 3, "host processes visible: {procs:?}");
    assert!(procs.contains(&"1".to_string()));
    let mounts = section("MOUNTS\n", "NET\n");
    for m in &mounts {
        assert!(!m.contains("cgroup "), "host cgroup mount visible: {m}");
        assert!(!m.contains("/sys/fs/cgroup"), "host mount visible: {m}");
        assert!(!m.contains(" /mnt"), "host mount visible: {m}");
    }
    assert_eq!(section("NET\n", "LINK\n"), vec!["lo".to_string()]);
    let links = section("LINK\n", "\u{0}");
    assert_eq!(links.len(), 1, "{links:?}");
    assert!(links[0].contains("lo:"));
}

#[test]
fn seccomp_denies_mount_keyctl_and_unshare() {
    if !require_root_and_busybox("seccomp") {
        return;
    }
    // unshare -U needs no capability: only seccomp can stop it.
    let o = run_sh(
        "seccomp",
        "grep Seccomp: /proc/self/status; unshare -U true && echo UNSHARE-OK; \
         mount -t tmpfs none /tmp && echo MOUNT-OK; \
         nsenter -t 1 -m true && echo SETNS-OK; echo done",
        |_| {},
    );
    let out = stdout(&o);
    assert!(out.contains("Seccomp:\t2"), "{out}");
    assert!(!out.contains("UNSHARE-OK"), "unshare allowed");
    assert!(!out.contains("MOUNT-OK"), "mount allowed");
    assert!(!out.contains("SETNS-OK"), "setns allowed");
    assert!(
        stderr(&o).contains("Operation not permitted"),
        "{}",
        stderr(&o)
    );
    assert!(out.ends_with("done\n"));
}

#[test]
fn capabilities_are_docker_defaults_and_no_new_privs_is_set() {
    if !require_root_and_busybox("caps") {
        return;
    }
    let o = run_sh(
        "caps",
        "grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs)' /proc/self/status",
        |_| {},
    );
    let out = stdout(&o);
    // Docker's 14: chown dac_override fowner fsetid kill setgid setuid
    // setpcap net_bind_service net_raw sys_chroot mknod audit_write setfcap.
    assert!(out.contains("CapEff:\t00000000a80425fb"), "{out}");
    assert!(out.contains("CapBnd:\t00000000a80425fb"), "{out}");
    assert!(out.contains("CapAmb:\t0000000000000000"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
}

#[test]
fn masked_and_readonly_paths_are_protected() {
    if !require_root_and_busybox("masked paths") {
        return;
    }
    let o = run_sh(
        "masked",
        "wc -c < /proc/keys; wc -c < /proc/timer_list; ls -A /sys/firmware | wc -l; ls -A /proc/acpi | wc -l; \
         echo x > /proc/sys/kernel/domainname && echo SYSCTL-WRITTEN; \
         echo h > /proc/sysrq-trigger && echo SYSRQ-WRITTEN; echo end",
        |_| {},
    );
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..4], &["0", "0", "0", "0"], "{out}");
    assert!(!out.contains("SYSCTL-WRITTEN"));
    assert!(!out.contains("SYSRQ-WRITTEN"));
    assert!(out.ends_with("end\n"));
    let _ = set_args;
}
