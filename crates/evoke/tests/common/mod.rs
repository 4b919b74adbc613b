//! Shared e2e helpers: start the built `evoke server` on a free port in a
//! fresh data dir, and run the real kubectl against it.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running `evoke server` (`--disable-agent` unless started with
/// [`start_cluster`]); killed on drop.
pub struct Server {
    /// Kept so the data dir lives as long as the server.
    pub tmp: Option<tempfile::TempDir>,
    pub data_dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub port: u16,
    /// How long from spawn until the server said it was ready.
    pub startup: Duration,
    /// The in-process node agent runs pods: stop them before the server.
    agent: bool,
    child: Child,
}

/// Where kubectl lives; tests that need it call [`require_kubectl`].
pub const KUBECTL: &str = "/usr/bin/kubectl";

/// True when kubectl is installed. Missing under CI=true is a failure;
/// elsewhere the caller skips with the printed reason.
pub fn require_kubectl() -> bool {
    if Path::new(KUBECTL).exists() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{KUBECTL} is missing; scripts/setup installs it");
    }
    eprintln!("skipping: {KUBECTL} is not installed");
    false
}

/// Starts a server in a new temporary data dir.
pub fn start_server() -> Server {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let mut s = start_server_in(&dir, &[]);
    s.tmp = Some(tmp);
    s
}

/// Starts a server on `data_dir` (which may hold a previous run's state)
/// with extra flags.
pub fn start_server_in(data_dir: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["--disable-agent"];
    args.extend_from_slice(extra);
    spawn_server(data_dir, &args, false)
}

/// True when this machine can run pods (root for namespaces and cgroups,
/// the static busybox for the image) and has kubectl. A missing one is a
/// failure under CI=true; elsewhere the caller skips with the reason.
pub fn require_pods() -> bool {
    if !require_kubectl() {
        return false;
    }
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root");
    }
    if !Path::new("/bin/busybox").exists() {
        missing.push("/bin/busybox (busybox-static)");
    }
    nothing_missing("this test runs pods", &missing)
}

/// True when `missing` (what `who` needs and this host lacks) is empty.
/// Otherwise a failure under CI=true; elsewhere prints why the caller
/// skips.
pub fn nothing_missing(who: &str, missing: &[impl AsRef<str>]) -> bool {
    if missing.is_empty() {
        return true;
    }
    let list: Vec<&str> = missing.iter().map(AsRef::as_ref).collect();
    let list = list.join(", ");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{who} needs {list}");
    }
    eprintln!("skipping: needs {list}");
    false
}

/// `evoke server` with its node agent, in a fresh data dir that holds the
/// image `busybox:1` (the host's static busybox). Pods get no pod network
/// (loopback only), so parallel tests share no bridge; on drop the pods
/// are deleted and torn down before the server stops.
pub fn start_cluster() -> Server {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let root = dir.join("busybox-rootfs");
    evoke_runtime::testing::busybox_rootfs(&root).expect("busybox rootfs");
    image_build_dir(&dir, &root, "busybox:1");
    let mut s = spawn_server(&dir, &[], true);
    s.tmp = Some(tmp);
    s
}

/// `evoke server` with its node agent on `data_dir`, which may hold a
/// previous run's state (a restart after [`Server::kill9`]) and the images
/// the test built ([`build_image`]); pods are loopback-only as in
/// [`start_cluster`]. The caller keeps the data dir alive.
pub fn start_cluster_in(data_dir: &Path, extra: &[&str]) -> Server {
    spawn_server(data_dir, extra, true)
}

/// Builds `busybox:<tag>` (or any `name:tag`) into `data_dir`'s image store
/// from the host's static busybox, with a /www/index.html that names the
/// tag, for httpd.
pub fn build_image(data_dir: &Path, tag: &str) {
    let root = data_dir.join(format!("rootfs-{}", tag.replace([':', '/'], "-")));
    evoke_runtime::testing::busybox_rootfs(&root).expect("busybox rootfs");
    std::fs::create_dir_all(root.join("www")).expect("www");
    std::fs::write(root.join("www/index.html"), format!("hello from {tag}\n")).expect("index");
    image_build_dir(data_dir, &root, tag);
}

/// `evoke --data-dir DATA_DIR image build-dir ROOT --tag TAG`, which must
/// succeed.
pub fn image_build_dir(data_dir: &Path, root: &Path, tag: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_evoke"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(["image", "build-dir"])
        .arg(root)
        .args(["--tag", tag])
        .output()
        .expect("evoke image build-dir");
    assert!(
        out.status.success(),
        "image build-dir of {} as {tag} failed: {}",
        root.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn spawn_server(data_dir: &Path, args: &[&str], agent: bool) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_evoke"));
    cmd.arg("--data-dir")
        .arg(data_dir)
        .args(["server", "--https-listen-port", "0"])
        .args(args)
        .env("EVOKE_FLANNEL_BACKEND", "none");
    let started = Instant::now();
    // Appended to, so a restart on the same data dir keeps the first run's log.
    let (child, line) = spawn_ready(cmd, &data_dir.join("server.log"), SERVER_READY, 20);
    let startup = started.elapsed();
    let port = ready_word(&line, "https://")
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    Server {
        tmp: None,
        data_dir: data_dir.to_path_buf(),
        kubeconfig: ready_kubeconfig(&line),
        port,
        startup,
        agent,
        child,
    }
}

/// How `evoke server` says it is up:
/// "evoke server ready on https://HOST:PORT kubeconfig=PATH".
pub const SERVER_READY: &str = "evoke server ready";

/// Spawns a long-running evoke process `cmd` (the binary itself or behind
/// a prefix such as `nsenter --net=...`) with `EVOKE_LOG=info`, stderr
/// appended to `log`, and waits up to `secs` for a stdout line starting
/// with `ready`; returns the child and that line. On timeout the child is
/// killed and the panic shows the log.
pub fn spawn_ready(mut cmd: Command, log: &Path, ready: &str, secs: u64) -> (Child, String) {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let mut child = cmd
        .env("EVOKE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(file))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let want = ready.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with(&want) {
                let _ = tx.send(line);
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(line) => (child, line),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "no {ready:?} line within {secs}s; {}:\n{}",
                log.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

/// The word of a ready line that starts with `prefix`, without it
/// (`https://` gives `HOST:PORT`).
pub fn ready_word<'a>(line: &'a str, prefix: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in the ready line {line:?}"))
}

/// The kubeconfig path a server's ready line names.
pub fn ready_kubeconfig(line: &str) -> PathBuf {
    PathBuf::from(ready_word(line, "kubeconfig="))
}

/// `nsenter --net=NETNS -- program`: only the network namespace changes;
/// `ip netns exec` would also remount /sys and hide the cgroup hierarchies.
pub fn in_netns(netns: &Path, program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(program);
    c
}

/// Runs kubectl through `cmd` (`Command::new(KUBECTL)`, or kubectl behind a
/// prefix such as [`in_netns`]) against `kubeconfig`, with HOME at `home`
/// (its cache), `--request-timeout`, `args`, `stdin` and extra `env`.
pub fn run_kubectl(
    mut cmd: Command,
    kubeconfig: &Path,
    home: &Path,
    request_timeout: &str,
    args: &[&str],
    stdin: Option<&str>,
    env: &[(&str, &str)],
) -> Output {
    cmd.env("KUBECONFIG", kubeconfig)
        .env("HOME", home)
        .args(["--request-timeout", request_timeout])
        .args(args)
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn kubectl");
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write kubectl stdin");
    }
    child.wait_with_output().expect("kubectl output")
}

impl Server {
    /// Runs kubectl with this server's kubeconfig.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_with(args, None, &[])
    }

    /// Runs kubectl with `stdin` and extra environment.
    pub fn kubectl_with(&self, args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Output {
        run_kubectl(
            Command::new(KUBECTL),
            &self.kubeconfig,
            &self.data_dir,
            "20s",
            args,
            stdin,
            env,
        )
    }

    /// Runs kubectl, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        self.ok_with(args, None)
    }

    pub fn ok_with(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl_with(args, stdin, &[]);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs kubectl, asserts failure, returns stderr.
    pub fn fails(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl_with(args, stdin, &[]);
        assert!(
            !out.status.success(),
            "kubectl {args:?} should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// The last lines of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.data_dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(30);
        format!("server log tail:\n{}", lines[from..].join("\n"))
    }

    /// `kubectl ARGS -o json`, which must succeed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&a)).expect("kubectl json")
    }

    /// The pods matching a label selector, as JSON.
    pub fn pods(&self, selector: &str) -> Vec<serde_json::Value> {
        let v = self.json(&["get", "pods", "-l", selector]);
        v["items"].as_array().cloned().unwrap_or_default()
    }

    /// SIGKILL, as a crash would: the pods' workloads stay behind for a
    /// restart on the same data dir to adopt.
    pub fn kill9(&mut self) {
        self.agent = false;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The server's pid, for tests that signal it.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits up to `within` for the server to exit;
    /// None if it is still running then (it is killed on drop).
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Nothing to stop through a server that is gone; a restart
                // on the same data dir adopts (and later stops) its pods.
                self.agent = false;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Stops the server and waits for it.
    pub fn stop(mut self) {
        self.kill();
    }

    /// Polls `cond` every 200 ms until it holds or `secs` pass; panics
    /// with `what`, the pods and the server log.
    pub fn wait_for(&self, what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if cond() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let pods = self.kubectl(&["get", "pods", "-o", "wide"]);
        panic!(
            "timed out after {secs}s waiting for {what}\npods:\n{}\n{}",
            String::from_utf8_lossy(&pods.stdout),
            self.log_tail()
        );
    }

    /// `kubectl get pod NAME -o json`, or Null when it fails.
    pub fn pod(&self, name: &str) -> serde_json::Value {
        let out = self.kubectl(&["get", "pod", name, "-o", "json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    /// Applies `yaml` and waits until every container of pod `name` runs.
    pub fn run_pod(&self, name: &str, yaml: &str) {
        self.ok_with(&["apply", "-f", "-"], Some(yaml));
        self.wait_for(&format!("pod {name} running"), 60, || {
            let p = self.pod(name);
            p["status"]["phase"] == "Running"
                && p["status"]["containerStatuses"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().all(|c| !c["state"]["running"].is_null()))
        });
    }

    fn kill(&mut self) {
        if self.agent {
            // Stop the workloads through the agent first, so no
            // container, namespace or cgroup outlives the test; the
            // agent removes a pod's directory last.
            self.agent = false;
            // Owners first, so no controller replaces the pods meanwhile.
            let _ = self.kubectl(&[
                "delete",
                "deployments,replicasets,pods",
                "--all",
                "--grace-period=1",
                "--timeout=40s",
            ]);
            let pods = self.data_dir.join("pods");
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline
                && std::fs::read_dir(&pods).is_ok_and(|mut d| d.next().is_some())
            {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}
