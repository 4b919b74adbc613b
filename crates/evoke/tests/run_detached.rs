//! `evoke run -d` and the commands that manage a running container: ps,
//! logs, exec, stop, kill, rm, by name and by id prefix.
// Helpers here are test code too: a failed step should panic.
#![allow(clippy::unwrap_used)]

mod run_support;

use std::time::{Duration, Instant};

use run_support::{can_run_containers, text, Env};

fn wait_for(env: &Env, what: &str, mut f: impl FnMut(&Env) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f(env) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn detached_container_can_be_logged_execed_stopped_and_removed() {
    if !can_run_containers() {
        return;
    }
    let env = Env::with_busybox();
    let id = env.ok(&[
        "run",
        "-d",
        "--name",
        "web",
        "busybox",
        "sh",
        "-c",
        "trap 'echo got TERM; exit 0' TERM; echo started; while true; do sleep 0.1; done",
    ]);
    let id = id.trim().to_string();
    assert_eq!(id.len(), 64, "{id}");
    wait_for(&env, "the log line", |e| {
        e.ok(&["logs", "web"]).contains("started")
    });
    let ps = env.ok(&["ps"]);
    assert!(ps.contains("web") && ps.contains("Up "), "{ps}");
    assert_eq!(env.ok(&["ps", "-q"]).trim(), &id[..12]);

    // exec joins the container: same hostname, sees the sleeping loop.
    let out = env.evoke(&["exec", &id[..8], "sh", "-c", "hostname; exit 5"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), &id[..12]);

    // stop sends SIGTERM, which the trap turns into a clean exit.
    env.ok(&["stop", "-t", "10", "web"]);
    wait_for(&env, "exit status", |e| {
        e.ok(&["ps", "-a"]).contains("Exited (0)")
    });
    assert!(env.ok(&["logs", "web"]).contains("got TERM"));
    assert_eq!(env.ok(&["ps", "-q"]), "");

    env.ok(&["rm", "web"]);
    assert_eq!(env.ok(&["ps", "-a", "-q"]), "");
    let out = env.evoke(&["logs", "web"]);
    assert!(text(&out.stderr).contains("no such container: web"));
}

#[test]
fn kill_and_forced_rm_end_a_running_container() {
    if !can_run_containers() {
        return;
    }
    let env = Env::with_busybox();
    env.ok(&["run", "-d", "--name", "a", "busybox", "sleep", "1000"]);
    env.ok(&["run", "-d", "--name", "b", "busybox", "sleep", "1000"]);
    // rm without -f refuses a running container.
    let out = env.evoke(&["rm", "a"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("stop it first"),
        "{}",
        text(&out.stderr)
    );
    // PID 1 of a pid namespace ignores signals it has no handler for, so
    // `kill` defaults to KILL, as Docker's does.
    env.ok(&["kill", "a"]);
    wait_for(&env, "a to exit", |e| {
        e.ok(&["ps", "-a"]).contains("Exited (137)")
    });
    env.ok(&["rm", "-f", "b"]);
    let all = env.ok(&["ps", "-a"]);
    assert!(!all.contains(" b\n"), "{all}");
    env.ok(&["rm", "a"]);
}

#[test]
fn detached_run_with_rm_leaves_nothing_after_exit() {
    if !can_run_containers() {
        return;
    }
    let env = Env::with_busybox();
    env.ok(&["run", "-d", "--rm", "busybox", "true"]);
    // ps stops listing it as soon as its record goes; the directory, with
    // the overlay's upper and work dirs, goes last.
    wait_for(&env, "removal", |e| {
        e.ok(&["ps", "-a", "-q"]).is_empty()
            && std::fs::read_dir(e.data.join("containers"))
                .unwrap()
                .count()
                == 0
    });
}

#[test]
fn logs_follow_streams_until_the_container_exits() {
    if !can_run_containers() {
        return;
    }
    let env = Env::with_busybox();
    env.ok(&[
        "run",
        "-d",
        "--name",
        "talker",
        "busybox",
        "sh",
        "-c",
        "echo one; sleep 1; echo two >&2; sleep 1; echo three",
    ]);
    let started = Instant::now();
    let out = env.ok(&["logs", "-f", "talker"]);
    assert_eq!(out, "one\ntwo\nthree\n");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "it waited for the end"
    );
}

#[test]
fn detached_run_that_cannot_start_fails_in_one_line_and_leaves_nothing() {
    if !can_run_containers() {
        return;
    }
    let env = Env::with_busybox();
    for args in [
        &["run", "-d", "busybox", "no-such-command"][..],
        &["run", "-d", "no-such-image", "true"][..],
    ] {
        let out = env.evoke(args);
        assert_ne!(out.status.code(), Some(0), "{args:?}");
        let err = text(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        if args[2] == "no-such-image" {
            assert!(err.contains("image not found: no-such-image"), "{err}");
        } else {
            // The engine's words for a missing binary are its own.
            assert!(err.contains("container tier"), "{err}");
        }
        // The monitor's error reaches us once, not wrapped again.
        assert!(err.matches("tier:").count() <= 1, "{err}");
    }
    assert_eq!(env.ok(&["ps", "-a", "-q"]), "");
}
