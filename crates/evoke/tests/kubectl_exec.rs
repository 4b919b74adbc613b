//! `kubectl exec` end to end: the real kubectl (WebSocket,
//! `v5.channel.k8s.io`) through `evoke server`'s API server to its node
//! agent, into containers of a running pod. Needs root, busybox and
//! kubectl (a failure under CI=true when missing).

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TWO_CONTAINERS: &str = "apiVersion: v1
kind: Pod
metadata: {name: two}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: first
    image: busybox:1
    command: [/bin/sleep, '3600']
    env: [{name: WHO, value: first}]
  - name: second
    image: busybox:1
    command: [/bin/sleep, '3600']
    env: [{name: WHO, value: second}]
    workingDir: /tmp
";

fn text(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn exec_runs_in_the_chosen_container_with_stdin_streams_and_exit_codes() {
    if !common::require_pods() {
        return;
    }
    let c = common::start_cluster();
    c.run_pod("two", TWO_CONTAINERS);

    // The pod's hostname, from the container's own UTS namespace.
    let host = c.ok(&["exec", "two", "-c", "first", "--", "cat", "/etc/hostname"]);
    assert_eq!(host.trim(), "two");

    // -c picks the container: each sees its own env and working dir.
    let first = c.ok(&[
        "exec",
        "two",
        "-c",
        "first",
        "--",
        "sh",
        "-c",
        "echo $WHO $PWD",
    ]);
    assert_eq!(first.trim(), "first /");
    let second = c.ok(&[
        "exec",
        "two",
        "-c",
        "second",
        "--",
        "sh",
        "-c",
        "echo $WHO $PWD",
    ]);
    assert_eq!(second.trim(), "second /tmp");

    // Without -c, kubectl picks the first container and says so.
    let out = c.kubectl(&["exec", "two", "--", "sh", "-c", "echo $WHO"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "first");
    assert!(stderr.contains("Defaulted container \"first\""), "{stderr}");

    // -i: stdin reaches the command and its EOF ends it.
    let echoed = c.ok_with(
        &["exec", "-i", "two", "-c", "second", "--", "cat"],
        Some("hi\nthere\n"),
    );
    assert_eq!(echoed, "hi\nthere\n");
    let counted = c.ok_with(&["exec", "-i", "two", "--", "wc", "-l"], Some("a\nb\nc\n"));
    assert_eq!(counted.trim(), "3");

    // stdout and stderr arrive on their own streams.
    let out = c.kubectl(&[
        "exec",
        "two",
        "-c",
        "first",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, "out\n");
    assert!(stderr.contains("err\n"), "{stderr}");

    // The command's exit code is kubectl's exit code.
    let out = c.kubectl(&["exec", "two", "-c", "first", "--", "sh", "-c", "exit 3"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("command terminated with exit code 3"),
        "{stderr}"
    );

    // More output than one message holds arrives whole.
    let big = c.ok(&[
        "exec",
        "two",
        "-c",
        "first",
        "--",
        "sh",
        "-c",
        "seq 1 20000",
    ]);
    assert_eq!(big.lines().count(), 20000);
    assert_eq!(big.lines().last(), Some("20000"));

    // kubectl cp is tar over exec, both ways: binary data intact.
    let payload: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let local = c.data_dir.join("payload.bin");
    std::fs::write(&local, &payload).expect("write payload");
    let local_s = local.to_string_lossy().into_owned();
    c.ok(&["cp", &local_s, "two:/tmp/payload.bin", "-c", "second"]);
    let sum = c.ok(&[
        "exec",
        "two",
        "-c",
        "second",
        "--",
        "wc",
        "-c",
        "/tmp/payload.bin",
    ]);
    assert!(sum.starts_with("300000"), "{sum}");
    let back = c.data_dir.join("back.bin");
    let back_s = back.to_string_lossy().into_owned();
    c.ok(&["cp", "two:/tmp/payload.bin", &back_s, "-c", "second"]);
    assert!(std::fs::read(&back).expect("copied back") == payload);

    // A container the pod does not have, or a program the image lacks.
    let err = c.fails(&["exec", "two", "-c", "nosuch", "--", "true"], None);
    assert!(
        err.contains("container nosuch is not valid for pod two"),
        "{err}"
    );
    let err = c.fails(&["exec", "two", "-c", "first", "--", "/bin/nosuch"], None);
    assert!(err.contains("nosuch"), "{err}");
    let err = c.fails(&["exec", "nopod", "--", "true"], None);
    assert!(err.contains("pods \"nopod\" not found"), "{err}");
}

#[test]
fn exec_into_a_container_that_is_not_running_says_so() {
    if !common::require_pods() {
        return;
    }
    let c = common::start_cluster();
    c.ok_with(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: v1
kind: Pod
metadata: {name: crashing}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: crash
    image: busybox:1
    command: [/bin/sh, -c, 'exit 1']
",
        ),
    );
    c.wait_for("the container to have ended once", 40, || {
        c.pod("crashing")["status"]["containerStatuses"][0]["restartCount"]
            .as_i64()
            .is_some_and(|n| n >= 1)
    });
    // Between restarts (back-off) there is nothing to exec into.
    c.wait_for("the container to wait in back-off", 40, || {
        !c.pod("crashing")["status"]["containerStatuses"][0]["state"]["waiting"].is_null()
    });
    let err = c.fails(&["exec", "crashing", "--", "true"], None);
    assert!(
        err.contains("container crash in pod crashing is not running"),
        "{err}"
    );
}

/// Reads `r` into `buf` on a thread, so the test can wait with a deadline.
fn collect(mut r: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn exec_it_gives_a_shell_on_a_terminal() {
    if !common::require_pods() {
        return;
    }
    let script = std::path::Path::new("/usr/bin/script");
    if !script.exists() {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "/usr/bin/script (bsdutils) is missing"
        );
        eprintln!("skipping: /usr/bin/script (bsdutils) is missing");
        return;
    }
    let c = common::start_cluster();
    c.run_pod("two", TWO_CONTAINERS);
    // `script` gives kubectl a terminal, so -t is honoured end to end;
    // kubectl sends that terminal's size, which the shell inside sees.
    let kubectl = format!(
        "stty rows 33 cols 101; {} --kubeconfig {} exec -it two -c second -- sh",
        common::KUBECTL,
        c.kubeconfig.display()
    );
    let mut child = Command::new(script)
        .args(["-qefc", &kubectl, "/dev/null"])
        .env("HOME", &c.data_dir)
        .env("SHELL", "/bin/sh")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn script");
    let mut stdin = child.stdin.take().expect("stdin");
    let out = collect(child.stdout.take().expect("stdout"));
    let mut seen = Vec::new();
    let wait_for = |seen: &mut Vec<u8>, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !String::from_utf8_lossy(seen).contains(what) {
            let left = deadline.saturating_duration_since(Instant::now());
            match out.recv_timeout(left) {
                Ok(b) => seen.extend(b),
                Err(_) => panic!(
                    "no {what:?} on the terminal; it showed:\n{}",
                    String::from_utf8_lossy(seen)
                ),
            }
        }
    };
    // The shell is interactive: it prompts.
    wait_for(&mut seen, "# ");
    stdin
        .write_all(b"tty; echo $((6*7)) $WHO\n")
        .expect("type a command");
    wait_for(&mut seen, "42 second");
    let shown = String::from_utf8_lossy(&seen).into_owned();
    assert!(shown.contains("/dev/pts/"), "no terminal inside: {shown}");
    stdin
        .write_all(b"echo size $(stty size)\n")
        .expect("type stty");
    wait_for(&mut seen, "size 33 101");
    stdin.write_all(b"exit 4\n").expect("type exit");
    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait script") {
            break s;
        }
        assert!(Instant::now() < deadline, "kubectl exec -it did not end");
        std::thread::sleep(Duration::from_millis(100));
    };
    // `script -e` passes on kubectl's exit code, which is the shell's.
    assert_eq!(status.code(), Some(4));
}

#[test]
fn attach_streams_the_main_process_output_until_it_exits() {
    if !common::require_pods() {
        return;
    }
    let c = common::start_cluster();
    c.run_pod(
        "talker",
        "apiVersion: v1
kind: Pod
metadata: {name: talker}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: talk
    image: busybox:1
    command: [/bin/sh, -c, 'echo early; sleep 5; echo late; sleep 1']
",
    );
    // Output from the moment of attaching, until the process ends.
    let out = c.kubectl(&["attach", "talker"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    // (`early` is usually out before kubectl attaches.)
    assert!(stdout == "late\n" || stdout == "early\nlate\n", "{stdout}");
    // A container without `stdin: true` keeps no stdin: -i is refused, clearly.
    c.run_pod("two", TWO_CONTAINERS);
    let err = c.fails(&["attach", "-i", "two", "-c", "first"], None);
    assert!(
        err.contains("cannot attach to the stdin of container first in pod two"),
        "{err}"
    );
}

/// `kubectl attach -i pod` fed `line`: waits until the attached output
/// shows `want`, then ends kubectl (the pod's `cat` never exits).
fn attach_and_type(c: &common::Server, pod: &str, line: &str, want: &str) {
    let mut kc = Command::new(common::KUBECTL)
        .env("KUBECONFIG", &c.kubeconfig)
        .env("HOME", &c.data_dir)
        .args(["attach", "-i", pod])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl attach -i");
    let out = collect(kc.stdout.take().expect("stdout"));
    let err = collect(kc.stderr.take().expect("stderr"));
    let mut stdin = kc.stdin.take().expect("stdin");
    stdin.write_all(line.as_bytes()).expect("type into kubectl");
    // kubectl's stdin ends here; the container's stays open.
    drop(stdin);
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.contains(want) {
        match out.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(b) => seen.push_str(&String::from_utf8_lossy(&b)),
            Err(_) => {
                let _ = kc.kill();
                let _ = kc.wait();
                let e: Vec<u8> = err.try_iter().flatten().collect();
                panic!(
                    "no {want:?} from kubectl attach -i {pod}: {seen:?}\n{}\n{}",
                    String::from_utf8_lossy(&e),
                    c.log_tail()
                );
            }
        }
    }
    let _ = kc.kill();
    let _ = kc.wait();
}

#[test]
fn attach_i_and_run_i_write_to_the_containers_kept_open_stdin() {
    if !common::require_pods() {
        return;
    }
    let c = common::start_cluster();
    c.run_pod(
        "reader",
        "apiVersion: v1
kind: Pod
metadata: {name: reader}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: cat
    image: busybox:1
    command: [/bin/cat]
    stdin: true
",
    );
    // One attachment after another: the first client's end of input is
    // no end of input for `cat`, which echoes what each one typed.
    attach_and_type(&c, "reader", "one\n", "one\n");
    attach_and_type(&c, "reader", "two\n", "two\n");
    c.wait_for("both lines in the logs of reader", 20, || {
        c.kubectl(&["logs", "reader"]).stdout == b"one\ntwo\n"
    });
    assert_eq!(c.pod("reader")["status"]["phase"], "Running");

    // `kubectl run -i`: the pod is made with stdin open, kubectl attaches,
    // and the command's answer comes back before it exits.
    let out = c.kubectl_with(
        &[
            "run",
            "asker",
            "-i",
            "--restart=Never",
            "--image=busybox:1",
            "--",
            "sh",
            "-c",
            "read l; echo got:$l",
        ],
        Some("hello\n"),
        &[],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}\n{}", c.log_tail());
    assert!(stdout.contains("got:hello"), "{stdout}\n{stderr}");
}

#[test]
fn run_i_rm_closes_a_stdin_once_containers_stdin_when_the_attach_ends_so_a_reader_to_eof_finishes()
{
    if !common::require_pods() {
        return;
    }
    let c = common::start_cluster();
    // `kubectl run -i` makes the pod with stdinOnce: true. `wc -c` reads
    // to end of input: it finishes only if the container's stdin closes
    // when kubectl's does; then --rm deletes the pod.
    let out = c.kubectl_with(
        &[
            "run",
            "counter",
            "-i",
            "--rm",
            "--restart=Never",
            "--image=busybox:1",
            "--pod-running-timeout=60s",
            "--",
            "sh",
            "-c",
            "wc -c; echo counted",
        ],
        Some("hello\n"),
        &[],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}\n{}", c.log_tail());
    assert!(
        stdout.contains('6') && stdout.contains("counted"),
        "{stdout}\n{stderr}"
    );
    c.wait_for("pod counter deleted by --rm", 30, || {
        !c.kubectl(&["get", "pod", "counter"]).status.success()
    });

    // A stdinOnce container keeps its stdin open until the first attach
    // ends; after that, no attach may write to it.
    c.run_pod(
        "once",
        "apiVersion: v1
kind: Pod
metadata: {name: once}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: busybox:1
    command: [/bin/sh, -c, 'wc -l; echo stdin closed; exec sleep 3600']
    stdin: true
    stdinOnce: true
",
    );
    attach_and_type(&c, "once", "a\nb\n", "stdin closed");
    let logs = String::from_utf8_lossy(&c.kubectl(&["logs", "once"]).stdout).into_owned();
    assert!(
        logs.contains('2') && logs.contains("stdin closed"),
        "{logs}"
    );
    let err = c.fails(&["attach", "-i", "once"], Some("c\n"));
    assert!(err.contains("stdinOnce"), "{err}");
}

/// One HTTP GET over a fresh connection to 127.0.0.1:`port`.
fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to kubectl");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    out
}

#[test]
fn port_forward_reaches_a_port_on_the_pods_loopback() {
    if !common::require_pods() {
        return;
    }
    let c = common::start_cluster();
    c.run_pod(
        "web",
        "apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: httpd
    image: busybox:1
    command: [/bin/sh, -c, 'echo hello from the pod > /tmp/index.html; exec httpd -f -p 127.0.0.1:8080 -h /tmp']
",
    );
    let mut pf = Command::new(common::KUBECTL)
        .env("KUBECONFIG", &c.kubeconfig)
        .env("HOME", &c.data_dir)
        .args(["port-forward", "pod/web", ":8080"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl port-forward");
    // "Forwarding from 127.0.0.1:PORT -> 8080"
    let lines = collect(pf.stdout.take().expect("stdout"));
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let local: u16 = loop {
        if let Some(p) = seen.lines().find_map(|l| {
            l.strip_prefix("Forwarding from 127.0.0.1:")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|p| p.parse().ok())
        }) {
            break p;
        }
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(b) => seen.push_str(&String::from_utf8_lossy(&b)),
            Err(_) => {
                let _ = pf.kill();
                panic!("kubectl port-forward did not start: {seen}");
            }
        }
    };
    // Several connections, each its own pair of streams.
    for _ in 0..3 {
        let reply = http_get(local, "/index.html");
        assert!(
            reply.lines().next().is_some_and(|l| l.contains(" 200 ")),
            "{reply}"
        );
        assert!(reply.ends_with("hello from the pod\n"), "{reply}");
    }
    let _ = pf.kill();
    let _ = pf.wait();
}
