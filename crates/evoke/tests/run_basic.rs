//! `evoke run` in the foreground: output, exit codes, and the flags that
//! shape the process (env, workdir, user), through the built binary.
// Helpers here are test code too: a failed step should panic.
#![allow(clippy::unwrap_used)]

mod run_support;

use run_support::{can_run_containers, text, Env};

#[test]
fn run_echo_prints_its_output_and_exits_zero() {
    if !can_run_containers() {
        return;
    }
    let env = Env::with_busybox();
    let out = env.evoke(&["run", "--rm", "busybox", "echo", "hello from evoke"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello from evoke\n");
}

#[test]
fn run_exit_code_is_the_containers() {
    if !can_run_containers() {
        return;
    }
    let env = Env::with_busybox();
    let out = env.evoke(&["run", "--rm", "busybox", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    // And the record outlives the process without --rm.
    let out = env.evoke(&["run", "--name", "seven", "busybox", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    let ps = env.ok(&["ps", "-a"]);
    assert!(ps.contains("Exited (7)") && ps.contains("seven"), "{ps}");
}

#[test]
fn run_honours_env_workdir_and_user() {
    if !can_run_containers() {
        return;
    }
    let env = Env::with_busybox();
    let out = env.ok(&[
        "run",
        "--rm",
        "-e",
        "GREETING=hi there",
        "-w",
        "/srv/app",
        "-u",
        "1000:1001",
        "busybox",
        "sh",
        "-c",
        "echo \"$GREETING|$(pwd)|$(id -u):$(id -g)|$HOSTNAME\"",
    ]);
    let fields: Vec<&str> = out.trim().split('|').collect();
    assert_eq!(
        &fields[..3],
        &["hi there", "/srv/app", "1000:1001"],
        "{out}"
    );
    assert_eq!(fields[3].len(), 12, "hostname is the short id: {out}");
}

#[test]
fn run_sees_only_its_own_processes_and_loopback() {
    if !can_run_containers() {
        return;
    }
    let env = Env::with_busybox();
    let out = env.ok(&[
        "run",
        "--rm",
        "busybox",
        "sh",
        "-c",
        "ps -o pid= | wc -l; ls /sys/class/net",
    ]);
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    // sh, ps and wc: the host's processes are not visible.
    assert!(lines[0].parse::<u32>().unwrap() <= 4, "{out}");
    assert_eq!(&lines[1..], &["lo"], "{out}");
}

#[test]
fn missing_image_is_a_one_line_error_and_a_failure() {
    if !can_run_containers() {
        return;
    }
    let env = Env::with_busybox();
    let out = env.evoke(&["run", "--rm", "no-such-image:1", "true"]);
    assert_ne!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("image not found: no-such-image:1"), "{err}");
    assert_eq!(env.ok(&["ps", "-a", "-q"]), "", "nothing is left behind");
}

#[test]
fn unknown_tier_and_unavailable_microvm_say_why() {
    let env = Env::new();
    let out = env.evoke(&["run", "--tier", "mainframe", "busybox", "true"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("unknown tier"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn tty_workloads_get_a_terminal_of_their_own() {
    if !can_run_containers() {
        return;
    }
    let env = Env::with_busybox();
    // The pty lives in the container's devpts, so it has a name there, and
    // a terminal turns "\n" into "\r\n" on the way out.
    let out = env.evoke(&["run", "--rm", "-t", "busybox", "sh", "-c", "tty; exit 4"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "/dev/pts/0\r\n");
    env.ok(&["run", "-d", "--name", "t", "busybox", "sleep", "100"]);
    let out = env.evoke(&["exec", "-t", "t", "sh", "-c", "tty"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("/dev/pts/"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn containers_get_their_own_hostname_and_hosts_files() {
    if !can_run_containers() {
        return;
    }
    let env = Env::with_busybox();
    let out = env.ok(&[
        "run",
        "--rm",
        "busybox",
        "sh",
        "-c",
        "cat /etc/hostname; grep -c localhost /etc/hosts; hostname; ping -c1 -W2 localhost >/dev/null && echo lo-up",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(lines[3], "lo-up", "loopback works inside: {out}");
    assert_eq!(
        lines[0], lines[2],
        "/etc/hostname matches the UTS name: {out}"
    );
    assert_eq!(lines[1], "2", "{out}");
}

#[test]
fn process_tier_runs_a_host_program_given_by_absolute_path_without_an_image() {
    if !can_run_containers() {
        return;
    }
    let env = Env::with_busybox();
    let out = env.evoke(&[
        "run",
        "--rm",
        "--tier",
        "process",
        "--",
        "/bin/echo",
        "hi",
        "-n",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hi -n\n");
    // A relative name is still an image reference, and there is no such image.
    let out = env.evoke(&["run", "--rm", "--tier", "process", "no-such-image"]);
    assert_ne!(out.status.code(), Some(0));
}
