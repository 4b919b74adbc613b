//! `kubectl logs` end to end: the real kubectl through `evoke server`'s
//! API server, which proxies `pods/log` to the node agent's endpoint.
//! Plain, `-c`, `--tail`, `-f` (new lines arrive while it runs),
//! `--previous` after a restart, and `--timestamps`, `--since` and
//! `--since-time`. Needs root, busybox and kubectl (a
//! failure under CI=true when missing).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TICKER: &str = "apiVersion: v1
kind: Pod
metadata: {name: ticker}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: ticks
    image: busybox:1
    command: [/bin/sh, -c, 'i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.3; done']
  - name: quiet
    image: busybox:1
    command: [/bin/sh, -c, 'echo one; echo two; echo three; exec sleep 3600']
";

/// The number in the last `tick N` line of `text`.
fn last_tick(text: &str) -> Option<u64> {
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("tick ").and_then(|n| n.trim().parse().ok()))
}

#[test]
fn logs_show_the_chosen_container_and_follow_new_lines() {
    if !common::require_pods() {
        return;
    }
    let c = common::start_cluster();
    c.run_pod("ticker", TICKER);
    c.wait_for("the quiet container's output", 20, || {
        c.kubectl(&["logs", "ticker", "-c", "quiet"]).stdout == b"one\ntwo\nthree\n"
    });
    let tail = c.ok(&["logs", "ticker", "-c", "quiet", "--tail", "2"]);
    assert_eq!(tail, "two\nthree\n");
    let some = c.ok(&["logs", "ticker", "-c", "quiet", "--limit-bytes", "6"]);
    assert_eq!(some, "one\ntw");
    // With -f too, the stream ends once the limit is out.
    let started = Instant::now();
    let some = c.ok(&["logs", "-f", "ticker", "-c", "ticks", "--limit-bytes", "14"]);
    assert_eq!(some, "tick 1\ntick 2\n");
    assert!(started.elapsed() < Duration::from_secs(10));

    // Two containers and no -c: kubectl picks the first and says so.
    let out = c.kubectl(&["logs", "ticker"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("Defaulted container \"ticks\""), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("tick 1\n"));

    let err = c.fails(&["logs", "ticker", "-c", "nosuch"], None);
    assert!(
        err.contains("container nosuch is not valid for pod ticker"),
        "{err}"
    );

    // -f: lines written after kubectl started still arrive.
    let now = last_tick(&c.ok(&["logs", "ticker", "-c", "ticks"])).expect("a tick so far");
    let mut follow = Command::new(common::KUBECTL)
        .env("KUBECONFIG", &c.kubeconfig)
        .env("HOME", &c.data_dir)
        .args(["logs", "-f", "ticker", "-c", "ticks"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kubectl logs -f");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut lines = Vec::new();
    let newest = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let n = last_tick(&l);
                lines.push(l);
                if let Some(n) = n.filter(|n| *n >= now + 5) {
                    break n;
                }
            }
            Err(_) => {
                let _ = follow.kill();
                panic!("logs -f showed no new lines after tick {now}: {lines:?}");
            }
        }
    };
    let _ = follow.kill();
    let _ = follow.wait();
    // Everything from the start, in order, with nothing lost in between.
    let ticks: Vec<u64> = lines.iter().filter_map(|l| last_tick(l)).collect();
    assert_eq!(ticks, (1..=newest).collect::<Vec<_>>());
}

#[test]
fn logs_previous_shows_the_run_before_a_restart() {
    if !common::require_pods() {
        return;
    }
    let c = common::start_cluster();
    // Each run prints its own random id, then fails.
    c.ok_with(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: v1
kind: Pod
metadata: {name: restarts}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: once
    image: busybox:1
    command: [/bin/sh, -c, 'echo run $(cat /proc/sys/kernel/random/uuid); sleep 2; exit 1']
",
        ),
    );
    // Before any restart there is no previous run.
    c.wait_for("the first run's output", 20, || {
        String::from_utf8_lossy(&c.kubectl(&["logs", "restarts"]).stdout).starts_with("run ")
    });
    let first = c.ok(&["logs", "restarts"]);
    // Asked right after: no restart yet means `first` was the first run.
    let before = c.kubectl(&["logs", "restarts", "--previous"]);
    let first_run = !before.status.success();
    if first_run {
        let err = String::from_utf8_lossy(&before.stderr);
        assert!(
            err.contains("previous terminated container \"once\" in pod \"restarts\" not found"),
            "{err}"
        );
    }
    // After the restart (the first is immediate), --previous is the run
    // before.
    c.wait_for("the second run's output", 40, || {
        let now = c.kubectl(&["logs", "restarts"]);
        now.status.success() && now.stdout.starts_with(b"run ") && now.stdout != first.as_bytes()
    });
    let previous = c.ok(&["logs", "restarts", "--previous"]);
    let current = c.ok(&["logs", "restarts"]);
    assert!(previous.starts_with("run "), "{previous}");
    assert_ne!(previous, current);
    // The next restart waits 10 s, so the run seen now is the second and
    // the one before it the first.
    if first_run {
        assert_eq!(previous, first);
    }
}

/// Seconds since the epoch of a UTC RFC 3339 time with nanoseconds, as
/// the kubelet prints it (`2026-01-02T03:04:05.123456789Z`); None for any
/// other shape.
fn rfc3339_secs(ts: &str) -> Option<f64> {
    let b = ts.as_bytes();
    if b.len() != 30 || b[4] != b'-' || b[10] != b'T' || b[19] != b'.' || b[29] != b'Z' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| ts.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    // Days from civil (proleptic Gregorian), Howard Hinnant's method.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + n(11..13)? * 3600 + n(14..16)? * 60 + n(17..19)?;
    Some(secs as f64 + n(20..29)? as f64 / 1e9)
}

/// The time in front of a `--timestamps` line (seconds since the epoch),
/// and the rest.
fn stamped(line: &str) -> (f64, &str) {
    let (ts, rest) = line.split_once(' ').expect("a timestamp and a line");
    let t = rfc3339_secs(ts).unwrap_or_else(|| panic!("{ts:?} is not RFC 3339 with nanoseconds"));
    (t, rest)
}

#[test]
fn logs_timestamps_and_since_select_lines_by_when_they_were_written() {
    if !common::require_pods() {
        return;
    }
    let c = common::start_cluster();
    c.run_pod(
        "stamps",
        "apiVersion: v1
kind: Pod
metadata: {name: stamps}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: busybox:1
    command: [/bin/sh, -c, 'echo early; sleep 5; echo late; exec sleep 3600']
",
    );
    c.wait_for("both lines", 30, || {
        c.kubectl(&["logs", "stamps"]).stdout == b"early\nlate\n"
    });
    // --timestamps: each line carries when it was written, RFC 3339 with
    // nanoseconds, as the kubelet prints it.
    let out = c.ok(&["logs", "stamps", "--timestamps"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let (early, text) = stamped(lines[0]);
    assert_eq!(text, "early");
    let (late, text) = stamped(lines[1]);
    assert_eq!(text, "late");
    let gap = late - early;
    assert!(
        gap > 3.0 && gap < 10.0,
        "the lines were written 5 s apart, stamped {gap} s apart: {out}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!((now - late).abs() < 60.0, "stamped {late}, now {now}");
    // --since-time at the late line keeps it and drops the early one
    // (kubectl sends it to the second).
    let since = lines[1].split(' ').next().expect("stamp").to_string();
    assert_eq!(c.ok(&["logs", "stamps", "--since-time", &since]), "late\n");
    // --since: an hour covers both; with --tail the newest only.
    assert_eq!(c.ok(&["logs", "stamps", "--since", "1h"]), "early\nlate\n");
    assert_eq!(
        c.ok(&["logs", "stamps", "--since", "1h", "--tail", "1"]),
        "late\n"
    );
    // -f --timestamps stamps the lines it follows too (the limit is the
    // one stamped line's length, which ends the stream).
    let want = format!("{}\n", lines[1]);
    let limit = want.len().to_string();
    let out = c.ok(&[
        "logs",
        "stamps",
        "-f",
        "--timestamps",
        "--since-time",
        &since,
        "--limit-bytes",
        &limit,
    ]);
    assert_eq!(out, want);
}
