//! Helpers for the multi-node tests (`agent_join`, `net_two_node`): start
//! the built `evoke server` and `evoke agent` as processes (optionally
//! inside a network namespace the test made), wait for their ready lines,
//! run the real kubectl against them, and clean up on drop. The spawning
//! and kubectl running are `common`'s; a test using this also declares
//! `mod common;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{
    image_build_dir, in_netns, nothing_missing, ready_kubeconfig, ready_word, run_kubectl,
    spawn_ready, SERVER_READY,
};

pub const KUBECTL: &str = "/usr/bin/kubectl";

/// True when this host can run the tests (root, kubectl, busybox-static,
/// and `extra` tools). Missing under CI=true is a failure; elsewhere the
/// test prints why it skips.
pub fn prerequisites(extra: &[&str]) -> bool {
    let mut missing: Vec<String> = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".into());
    }
    for p in [KUBECTL, "/bin/busybox"].iter().chain(extra) {
        if !Path::new(p).exists() {
            missing.push((*p).to_string());
        }
    }
    nothing_missing("this test", &missing)
}

/// A command for the built evoke binary, inside network namespace `netns`
/// (a name under /run/netns) when given.
pub fn evoke(netns: Option<&str>, data_dir: &Path) -> Command {
    let mut cmd = match netns {
        Some(ns) => in_netns(&netns_path(ns), env!("CARGO_BIN_EXE_evoke")),
        None => Command::new(env!("CARGO_BIN_EXE_evoke")),
    };
    cmd.arg("--data-dir").arg(data_dir);
    cmd
}

/// Where `ip netns add NAME` puts the namespace.
fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// The environment that gives pods loopback only (no bridge, proxy or
/// DNS), for tests about nodes rather than networks: several of them run
/// in the host's namespace at once.
pub const NO_POD_NETWORK: &[(&str, &str)] = &[("EVOKE_FLANNEL_BACKEND", "none")];

/// A long-running evoke process (server or agent); SIGKILLed on drop.
pub struct Proc {
    /// Its stdout line that said it was ready.
    pub ready: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Spawns `cmd` with stderr to `log` and waits up to `secs` for a
    /// stdout line starting with `ready`.
    pub fn spawn(cmd: Command, log: &Path, ready: &str, secs: u64) -> Proc {
        let (child, line) = spawn_ready(cmd, log, ready, secs);
        Proc {
            ready: line,
            log: log.to_path_buf(),
            child: Some(child),
        }
    }

    /// The last lines of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(30);
        format!("{}:\n{}", self.log.display(), lines[from..].join("\n"))
    }

    /// SIGKILL, as a crash or a pulled plug would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `evoke server` on a free port (unless `extra` names one); `netns` and
/// `extra` flags as given.
pub struct Server {
    pub proc: Proc,
    pub data_dir: PathBuf,
    pub kubeconfig: PathBuf,
    /// `https://HOST:PORT`, as agents dial it.
    pub url: String,
    pub netns: Option<String>,
}

impl Server {
    pub fn start(
        data_dir: &Path,
        netns: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let mut cmd = evoke(netns, data_dir);
        cmd.arg("server");
        if !extra.contains(&"--https-listen-port") {
            cmd.args(["--https-listen-port", "0"]);
        }
        cmd.args(extra).envs(env.iter().copied());
        let proc = Proc::spawn(cmd, &data_dir.join("server.log"), SERVER_READY, 30);
        let url = format!("https://{}", ready_word(&proc.ready, "https://"));
        let kubeconfig = ready_kubeconfig(&proc.ready);
        Server {
            proc,
            data_dir: data_dir.to_path_buf(),
            kubeconfig,
            url,
            netns: netns.map(String::from),
        }
    }

    /// The join token the server wrote (just after its API came up).
    pub fn token(&self) -> String {
        let path = self.data_dir.join("server/node-token");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(t) = std::fs::read_to_string(&path) {
                if !t.trim().is_empty() {
                    return t.trim().to_string();
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs kubectl against this server (in its namespace).
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let cmd = match &self.netns {
            Some(ns) => in_netns(&netns_path(ns), KUBECTL),
            None => Command::new(KUBECTL),
        };
        run_kubectl(
            cmd,
            &self.kubeconfig,
            &self.data_dir,
            "30s",
            args,
            stdin,
            &[],
        )
    }

    /// kubectl that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        self.ok_with(args, None)
    }

    pub fn ok_with(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.proc.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&a)).expect("kubectl json")
    }

    /// The named node's condition `type_` status ("True", "False", "Unknown").
    pub fn node_condition(&self, node: &str, type_: &str) -> Option<String> {
        let out = self.kubectl(&["get", "node", node, "-o", "json"], None);
        if !out.status.success() {
            return None;
        }
        let n: Value = serde_json::from_slice(&out.stdout).ok()?;
        n["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == type_)
            .and_then(|c| c["status"].as_str().map(String::from))
    }

    /// Deletes every pod and waits until `agents_data` dirs hold no pod
    /// directories (each agent removes a pod's directory last).
    pub fn delete_pods_and_wait(&self, agents_data: &[&Path]) {
        let _ = self.kubectl(
            &[
                "delete",
                "deployments,replicasets,pods",
                "--all",
                "--grace-period=1",
                "--timeout=40s",
            ],
            None,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        for d in agents_data {
            let pods = d.join("pods");
            while Instant::now() < deadline
                && std::fs::read_dir(&pods).is_ok_and(|mut d| d.next().is_some())
            {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Deletes every pod when dropped, and waits for the agents (still
/// running: declare this after them) to remove their workloads, so that a
/// failing test leaves no container, pod namespace or cgroup behind.
pub struct PodCleanup<'a> {
    pub server: &'a Server,
    pub agents_data: Vec<PathBuf>,
}

impl Drop for PodCleanup<'_> {
    fn drop(&mut self) {
        let dirs: Vec<&Path> = self.agents_data.iter().map(PathBuf::as_path).collect();
        self.server.delete_pods_and_wait(&dirs);
    }
}

/// `evoke agent` joined to `server` as `name` with `token` (or, when it is
/// empty, with the --token-file in `extra`).
pub fn start_agent(
    server_url: &str,
    token: &str,
    data_dir: &Path,
    name: &str,
    netns: Option<&str>,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let mut cmd = evoke(netns, data_dir);
    cmd.args(["agent", "--server", server_url]);
    // An empty token: the caller passes --token-file in `extra`.
    if !token.is_empty() {
        cmd.args(["--token", token]);
    }
    cmd.args(["--node-name", name])
        .args(extra)
        .envs(env.iter().copied());
    Proc::spawn(cmd, &data_dir.join("agent.log"), "evoke agent joined", 30)
}

/// Builds `busybox:<tag>` into `data_dir`'s image store from the host's
/// static busybox, with a /www holding `index` for httpd.
pub fn build_image(data_dir: &Path, tag: &str, index: &str) {
    let root = data_dir.join(format!("rootfs-{}", tag.replace([':', '/'], "-")));
    evoke_runtime::testing::busybox_rootfs(&root).expect("busybox rootfs");
    std::fs::create_dir_all(root.join("www")).expect("www");
    std::fs::write(root.join("www/index.html"), index).expect("index");
    image_build_dir(data_dir, &root, tag);
}

/// Polls `cond` every 300 ms until it holds or `secs` pass; then panics
/// with `what` and `diag()`.
pub fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool, diag: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("timed out after {secs}s waiting for {what}\n{}", diag());
}

/// A network namespace made for one test, deleted on drop.
pub struct Netns(pub String);

impl Netns {
    /// `ip netns add` with a name unique to this process and `tag`, with
    /// loopback up and IPv4 forwarding on (nodes route for their pods).
    pub fn new(tag: &str) -> Netns {
        let name = format!("evj{}{tag}", std::process::id());
        run(&["ip", "netns", "add", &name]);
        let ns = Netns(name);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        ns
    }

    /// Runs a command inside the namespace; asserts success.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut a = vec!["ip", "netns", "exec", &self.0];
        a.extend(args);
        run(&a)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs a command; asserts success; returns stdout.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
