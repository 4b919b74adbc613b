//! Pod networking end to end, through the built `evoke server` (bridge
//! network by default) and the real kubectl. Each test runs its server
//! inside a network namespace the test makes, so the bridge, the nft table,
//! 10.42.x and the cluster DNS address never touch the host's network.
//!
//! Shown here: pod IPs in `kubectl get pods -o wide`, pod to pod and node to
//! pod traffic, a ClusterIP Service spreading load over three pods, DNS
//! names (short, `<svc>.<ns>`, FQDN, headless A records and per-pod names),
//! an ExternalName alias, sessionAffinity ClientIP, dnsPolicy None with
//! dnsConfig,
//! an unready pod leaving the rotation, NodePort from the node, the
//! `kubernetes` Service reaching the API server, a deleted Service no longer
//! answering, addresses and interfaces released, and a pod keeping its IP
//! and its Service across a `kill -9` of the server.
//!
//! Waits are generous (a loaded 2-core CI machine runs the client's loop
//! slowly); a passing run takes about 25 s.
//!
//! Needs root, iproute2, nsenter, nft, kubectl and busybox-static; under
//! CI=true a missing one is a failure, elsewhere the test says why it skips.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

const KUBECTL: &str = "kubectl";
/// The node's address inside the test namespace.
const NODE_IP: &str = "192.168.50.1";

fn prerequisites() -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".to_string());
    }
    for tool in ["ip", "nsenter", "nft", "timeout", KUBECTL] {
        let path = std::env::var_os("PATH").unwrap_or_default();
        if !std::env::split_paths(&path).any(|d| d.join(tool).is_file()) {
            missing.push(tool.to_string());
        }
    }
    if !Path::new("/bin/busybox").exists() {
        missing.push("/bin/busybox (busybox-static)".into());
    }
    common::nothing_missing("network e2e", &missing)
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace made for one test: `lo`, and a veth pair inside it
/// whose one end holds the node address and the default route.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        let name = format!("evn{}x{:x}", std::process::id(), rand_u32());
        ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["link", "add", "nd0", "type", "veth", "peer", "name", "nd1"],
            vec!["addr", "add", &format!("{NODE_IP}/24"), "dev", "nd0"],
            vec!["link", "set", "nd0", "up"],
            vec!["link", "set", "nd1", "up"],
            vec!["route", "add", "default", "via", "192.168.50.254"],
        ] {
            ok(Command::new("ip").args(["-n", &ns.name]).args(&args));
        }
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `program args…` run inside the namespace (mounts stay the host's,
    /// unlike `ip netns exec`, so cgroups remain visible).
    fn cmd(&self, program: &str) -> Command {
        common::in_netns(&self.path(), program)
    }

    /// busybox wget from the node, bounded: `Some(body)` or `None`.
    fn wget(&self, url: &str) -> Option<String> {
        let out =
            run(self
                .cmd("timeout")
                .args(["5", "/bin/busybox", "wget", "-q", "-O", "-", url]));
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn links(&self) -> Vec<String> {
        ok(Command::new("ip").args(["-n", &self.name, "-o", "link", "show"]))
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    t ^ std::process::id().rotate_left(16)
}

/// `evoke server` (with its agent and the bridge network) in `ns`.
struct Cluster<'a> {
    ns: &'a Netns,
    data_dir: PathBuf,
    kubeconfig: PathBuf,
    child: Option<Child>,
}

impl<'a> Cluster<'a> {
    fn start(ns: &'a Netns, data_dir: &Path) -> Cluster<'a> {
        let mut cmd = ns.cmd(env!("CARGO_BIN_EXE_evoke"));
        cmd.arg("--data-dir")
            .arg(data_dir)
            .args(["server", "--https-listen-port", "0"])
            .args(["--bind-address", "0.0.0.0"]);
        let (child, line) =
            common::spawn_ready(cmd, &data_dir.join("server.log"), common::SERVER_READY, 30);
        let kubeconfig = common::ready_kubeconfig(&line);
        Cluster {
            ns,
            data_dir: data_dir.to_path_buf(),
            kubeconfig,
            child: Some(child),
        }
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        common::run_kubectl(
            self.ns.cmd(KUBECTL),
            &self.kubeconfig,
            &self.data_dir,
            "30s",
            args,
            stdin,
            &[],
        )
    }

    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}\n--- server log tail ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&a, None)).expect("kubectl json")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.data_dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn wait_for(&self, what: &str, secs: u64, cond: impl FnMut() -> bool) {
        self.wait_for_with(what, secs, &String::new, cond)
    }

    /// [`Cluster::wait_for`], adding `extra()` (a pod's log) to the failure.
    fn wait_for_with(
        &self,
        what: &str,
        secs: u64,
        extra: &dyn Fn() -> String,
        mut cond: impl FnMut() -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if cond() {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "timed out after {secs}s waiting for {what}\n--- pods ---\n{}\n--- more ---\n{}\n--- server log tail ---\n{}",
            String::from_utf8_lossy(&self.kubectl(&["get", "pods", "-o", "wide"], None).stdout),
            extra(),
            self.log_tail()
        );
    }

    /// The ready pods' IPs by pod name, for pods labelled `selector`.
    fn ready_ips(&self, selector: &str) -> BTreeMap<String, String> {
        let list = self.json(&["get", "pods", "-l", selector]);
        list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| {
                p["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
            .filter_map(|p| {
                Some((
                    p["metadata"]["name"].as_str()?.to_string(),
                    p["status"]["podIP"].as_str()?.to_string(),
                ))
            })
            .collect()
    }

    fn logs(&self, pod: &str) -> String {
        String::from_utf8_lossy(&self.kubectl(&["logs", pod], None).stdout).into_owned()
    }

    /// The ready addresses of Service `name`'s Endpoints.
    fn endpoint_ips(&self, name: &str) -> BTreeSet<String> {
        let ep = self.json(&["get", "endpoints", name]);
        ep["subsets"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["addresses"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| a["ip"].as_str().map(str::to_string))
            .collect()
    }

    /// Deletes every pod and waits until the agent has torn them down, so
    /// no container outlives the test.
    fn delete_all_pods(&self) {
        let _ = self.kubectl(
            &[
                "delete",
                "pods",
                "--all",
                "--grace-period=1",
                "--wait=false",
            ],
            None,
        );
        self.wait_for("every pod to be gone", 45, || {
            self.kubectl(&["get", "pods", "-o", "name"], None)
                .stdout
                .is_empty()
        });
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Cluster<'_> {
    fn drop(&mut self) {
        if self.child.is_some() {
            // Containers outlive the server: on a failed test, remove the
            // pods first (best effort, no panic in a drop).
            let _ = self.kubectl(
                &[
                    "delete",
                    "pods",
                    "--all",
                    "--grace-period=1",
                    "--wait=false",
                ],
                None,
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                let out = self.kubectl(&["get", "pods", "-o", "name"], None);
                if out.status.success() && out.stdout.is_empty() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `busybox:1` from the host's static busybox, in `data_dir`'s store.
fn build_image(data_dir: &Path) {
    let root = data_dir.join("rootfs");
    evoke_runtime::testing::busybox_rootfs(&root).expect("busybox rootfs");
    std::fs::create_dir_all(root.join("www")).expect("www");
    common::image_build_dir(data_dir, &root, "busybox:1");
}

/// A busybox httpd pod serving the host directory `www` (so the test can
/// flip its readiness by removing `www/ready`), named `name`, with DNS
/// hostname `name` under the headless Service `web-h`.
fn web_pod(name: &str, www: &Path) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{app: web}}
spec:
  hostname: {name}
  subdomain: web-h
  terminationGracePeriodSeconds: 1
  volumes:
  - name: www
    hostPath: {{path: {www}}}
  containers:
  - name: httpd
    image: busybox:1
    command: [/bin/busybox, httpd, -f, -p, '8080', -h, /www]
    volumeMounts: [{{name: www, mountPath: /www}}]
    readinessProbe:
      httpGet: {{path: /ready, port: 8080}}
      periodSeconds: 1
      failureThreshold: 1
---
",
        www = www.display()
    )
}

const SERVICES: &str = "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-np}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-sticky}
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-alias}
spec:
  type: ExternalName
  externalName: web.default.svc.cluster.local
---
apiVersion: v1
kind: Service
metadata: {name: web-h}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{port: 8080}]
";

/// A pod with its own DNS settings, printing its resolv.conf.
const DNS_CONFIG_POD: &str = "apiVersion: v1
kind: Pod
metadata: {name: dnscfg}
spec:
  terminationGracePeriodSeconds: 1
  dnsPolicy: None
  dnsConfig:
    nameservers: [192.0.2.53]
    searches: [corp.example]
    options: [{name: ndots, value: '2'}]
  containers:
  - name: c
    image: busybox:1
    command: [/bin/busybox, sh, -c, 'cat /etc/resolv.conf; exec sleep 3600']
";

/// A client pod: one-off checks printed as `TAG value`, then a request
/// to http://web/ every 200 ms printed as `LB <body or error>`. The
/// affinity check goes to the sticky Service's ClusterIP, so that it tests
/// the proxy alone (names are checked above it).
fn client_pod(direct_ip: &str, sticky_ip: &str) -> String {
    let script = [
        "cat /etc/resolv.conf".to_string(),
        format!("echo POD $(wget -q -O - http://{direct_ip}:8080/ 2>&1)"),
        "echo SHORT $(wget -q -O - http://web/ 2>&1)".into(),
        "echo NS $(wget -q -O - http://web.default/ 2>&1)".into(),
        "echo FQDN $(wget -q -O - http://web.default.svc.cluster.local/ 2>&1)".into(),
        "echo ALIAS $(wget -q -O - http://web-alias/ 2>&1)".into(),
        "echo HEADLESS $(nslookup web-h.default.svc.cluster.local 2>&1 | grep -v 10.43.0.10 | grep Address | tr '\\n' ' ')".into(),
        // Up to three tries a second apart: a pod's first look may come
        // before the node has programmed everything (seen once in a dry run,
        // both checks failing within the same 3 s). Every try that fails
        // is printed, so a run that needed one shows it in the log.
        "for i in 1 2 3; do a=$(nslookup web-1.web-h.default.svc.cluster.local 2>&1 | grep -v 10.43.0.10 | grep Address | tr '\\n' ' '); [ -n \"$a\" ] && break; echo RETRY PODNAME; sleep 1; done; echo PODNAME $a".into(),
        "k=closed; for i in 1 2 3; do if nc -w 3 kubernetes.default 443 </dev/null; then k=open; break; fi; echo RETRY KUBE; sleep 1; done; echo KUBE $k".into(),
        format!("for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo STICKY $(wget -q -O - http://{sticky_ip}/ 2>&1); done"),
        "echo SETUP done".into(),
        "while true; do echo LB $(timeout 3 wget -q -O - http://web/ 2>&1); sleep 0.2; done".into(),
    ]
    .join("; ");
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: client}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: busybox:1
    command: [/bin/busybox, sh, -c, {script:?}]
"
    )
}

/// The `LB` answers in `log` from line `from` on.
fn lb_answers(log: &str, from: usize) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.strip_prefix("LB "))
        .skip(from)
        .map(|s| s.trim().to_string())
        .collect()
}

fn tagged<'l>(log: &'l str, tag: &str) -> &'l str {
    log.lines()
        .find_map(|l| l.strip_prefix(tag).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or("")
}

#[test]
fn pods_reach_each_other_and_services_spread_load_follow_readiness_resolve_and_stop_when_deleted() {
    if !prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    build_image(tmp.path());
    let ns = Netns::new();
    let c = Cluster::start(&ns, tmp.path());

    let mut yaml = String::new();
    for i in 0..3 {
        let www = tmp.path().join(format!("www-{i}"));
        std::fs::create_dir_all(&www).expect("www");
        std::fs::write(www.join("index.html"), format!("web-{i}\n")).expect("index");
        std::fs::write(www.join("ready"), "ok\n").expect("ready");
        yaml.push_str(&web_pod(&format!("web-{i}"), &www));
    }
    yaml.push_str(SERVICES);
    c.ok(&["apply", "-f", "-"], Some(&yaml));
    c.wait_for("three ready web pods", 90, || {
        c.ready_ips("app=web").len() == 3
    });
    let ips = c.ready_ips("app=web");
    let distinct: BTreeSet<&String> = ips.values().collect();
    assert_eq!(distinct.len(), 3, "pod IPs are distinct: {ips:?}");
    for ip in ips.values() {
        assert!(
            ip.starts_with("10.42.0."),
            "pod IP {ip} is in the node's /24"
        );
    }
    let node = c.json(&["get", "nodes"]);
    assert_eq!(
        node["items"][0]["spec"]["podCIDR"], "10.42.0.0/24",
        "the server gave the node its podCIDR"
    );
    let wide = c.ok(&["get", "pods", "-o", "wide"], None);
    for ip in ips.values() {
        assert!(wide.contains(ip.as_str()), "-o wide shows {ip}:\n{wide}");
    }
    let dns = c.json(&["get", "svc", "-n", "kube-system", "kube-dns"]);
    assert_eq!(
        dns["spec"]["clusterIP"], "10.43.0.10",
        "kube-dns names the cluster DNS"
    );
    let pod0 = c.json(&["get", "pod", "web-0"]);
    assert_eq!(pod0["status"]["hostIP"], NODE_IP);

    // Node to pod.
    assert_eq!(
        ns.wget(&format!("http://{}:8080/", ips["web-0"]))
            .as_deref(),
        Some("web-0")
    );

    let sticky_svc = c.json(&["get", "svc", "web-sticky"]);
    let sticky_ip = sticky_svc["spec"]["clusterIP"]
        .as_str()
        .expect("web-sticky has a ClusterIP");
    c.ok(
        &["apply", "-f", "-"],
        Some(&client_pod(&ips["web-0"], sticky_ip)),
    );
    c.ok(&["apply", "-f", "-"], Some(DNS_CONFIG_POD));
    c.wait_for("the client's one-off checks", 90, || {
        c.logs("client").contains("SETUP done")
    });
    let log = c.logs("client");
    assert!(
        log.contains("nameserver 10.43.0.10")
            && log.contains("search default.svc.cluster.local svc.cluster.local cluster.local")
            && log.contains("options ndots:5"),
        "resolv.conf points at the cluster DNS:\n{log}"
    );
    assert_eq!(tagged(&log, "POD"), "web-0", "pod to pod by IP:\n{log}");
    for tag in ["SHORT", "NS", "FQDN", "ALIAS"] {
        assert!(
            tagged(&log, tag).starts_with("web-"),
            "{tag} name reaches the Service:\n{log}"
        );
    }
    let headless: BTreeSet<String> = tagged(&log, "HEADLESS")
        .split_whitespace()
        .filter(|w| w.starts_with("10.42."))
        .map(str::to_string)
        .collect();
    assert_eq!(
        headless,
        ips.values().cloned().collect::<BTreeSet<_>>(),
        "a headless Service answers every ready pod:\n{log}"
    );
    assert!(
        tagged(&log, "PODNAME").contains(ips["web-1"].as_str()),
        "<hostname>.<headless svc> answers that pod:\n{log}"
    );
    assert_eq!(
        tagged(&log, "KUBE"),
        "open",
        "kubernetes.default reaches the API server:\n{log}"
    );

    let sticky: BTreeSet<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("STICKY "))
        .collect();
    assert!(
        sticky.len() == 1 && sticky.iter().all(|s| s.starts_with("web-")),
        "sessionAffinity ClientIP keeps one client on one pod: {sticky:?}"
    );

    c.wait_for("the dnsPolicy None pod's resolv.conf", 60, || {
        c.logs("dnscfg").contains("options")
    });
    assert_eq!(
        c.logs("dnscfg"),
        "nameserver 192.0.2.53\nsearch corp.example\noptions ndots:2\n",
        "dnsPolicy None takes dnsConfig alone"
    );

    // Load spreads over the three replicas.
    c.wait_for_with(
        "30 requests through the Service",
        90,
        &|| c.logs("client"),
        || lb_answers(&c.logs("client"), 0).len() >= 30,
    );
    let answers = lb_answers(&c.logs("client"), 0);
    for i in 0..3 {
        let n = answers.iter().filter(|a| **a == format!("web-{i}")).count();
        assert!(
            n >= 2,
            "web-{i} answered {n} of {}: {answers:?}",
            answers.len()
        );
    }

    // An unready pod leaves the rotation.
    std::fs::remove_file(tmp.path().join("www-2/ready")).expect("unready");
    c.wait_for("web-2 to leave the endpoints", 40, || {
        c.endpoint_ips("web").len() == 2
    });
    // Rules follow the Endpoints within a moment; count from after that.
    std::thread::sleep(Duration::from_secs(1));
    let from = lb_answers(&c.logs("client"), 0).len();
    c.wait_for("20 more requests", 90, || {
        lb_answers(&c.logs("client"), from).len() >= 20
    });
    let after = lb_answers(&c.logs("client"), from);
    assert!(
        after.iter().all(|a| a == "web-0" || a == "web-1"),
        "only ready pods answer: {after:?}"
    );

    // NodePort from the node, and the ClusterIP from the node.
    let np = c.json(&["get", "svc", "web-np"]);
    let node_port = np["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .expect("nodePort");
    let body = ns.wget(&format!("http://{NODE_IP}:{node_port}/"));
    assert!(
        matches!(body.as_deref(), Some("web-0" | "web-1")),
        "NodePort answers from a ready pod: {body:?}"
    );
    let svc = c.json(&["get", "svc", "web"]);
    let cluster_ip = svc["spec"]["clusterIP"]
        .as_str()
        .expect("clusterIP")
        .to_string();
    assert!(cluster_ip.starts_with("10.43."));
    assert!(ns.wget(&format!("http://{cluster_ip}/")).is_some());

    // A deleted Service stops answering, by address and by name.
    c.ok(&["delete", "svc", "web"], None);
    c.wait_for(
        "the deleted Service's address to stop answering",
        20,
        || ns.wget(&format!("http://{cluster_ip}/")).is_none(),
    );
    std::thread::sleep(Duration::from_secs(1));
    let from = lb_answers(&c.logs("client"), 0).len();
    c.wait_for("5 more requests", 60, || {
        lb_answers(&c.logs("client"), from).len() >= 5
    });
    let gone = lb_answers(&c.logs("client"), from);
    assert!(
        gone.iter().all(|a| !a.starts_with("web-")),
        "nothing answers a deleted Service: {gone:?}"
    );

    // Everything a pod held is released.
    c.delete_all_pods();
    c.wait_for("the pods' veths to go", 20, || {
        ns.links().iter().all(|l| !l.starts_with("ve"))
    });
    let ipam = std::fs::read_to_string(tmp.path().join("net/ipam.json")).expect("ipam state");
    let ipam: Value = serde_json::from_str(&ipam).expect("ipam json");
    assert_eq!(ipam["pods"], serde_json::json!({}), "no address is held");
    let resolv = tmp.path().join("net/resolv");
    assert_eq!(
        std::fs::read_dir(&resolv).map(|d| d.count()).unwrap_or(0),
        0,
        "no resolv.conf is left in {}",
        resolv.display()
    );
}

#[test]
fn a_pod_keeps_its_ip_interface_and_service_across_a_kill_9_of_the_server() {
    if !prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    build_image(tmp.path());
    let ns = Netns::new();
    let www = tmp.path().join("www-0");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(www.join("index.html"), "web-0\n").expect("index");
    std::fs::write(www.join("ready"), "ok\n").expect("ready");
    let mut c = Cluster::start(&ns, tmp.path());
    let mut yaml = web_pod("web-0", &www);
    yaml.push_str(SERVICES);
    c.ok(&["apply", "-f", "-"], Some(&yaml));
    c.wait_for("a ready web pod", 90, || c.ready_ips("app=web").len() == 1);
    let ip = c.ready_ips("app=web")["web-0"].clone();
    let cluster_ip = c.json(&["get", "svc", "web"])["spec"]["clusterIP"]
        .as_str()
        .expect("clusterIP")
        .to_string();
    c.wait_for("the Service to answer", 40, || {
        ns.wget(&format!("http://{cluster_ip}/")).as_deref() == Some("web-0")
    });
    let veths: Vec<String> = ns
        .links()
        .into_iter()
        .filter(|l| l.starts_with("ve"))
        .collect();
    assert_eq!(veths.len(), 1, "one veth for one pod: {veths:?}");

    c.kill9();
    // The pod's container and network outlive the server.
    assert_eq!(
        ns.wget(&format!("http://{ip}:8080/")).as_deref(),
        Some("web-0")
    );
    let c2 = Cluster::start(&ns, tmp.path());
    // The restarted proxy reprograms the Service with no change to it.
    c2.wait_for("the Service to answer again", 60, || {
        ns.wget(&format!("http://{cluster_ip}/")).as_deref() == Some("web-0")
    });
    // Readiness is probed afresh after a restart, as a kubelet does.
    c2.wait_for("the adopted pod to be ready again", 60, || {
        c2.ready_ips("app=web").contains_key("web-0")
    });
    assert_eq!(c2.ready_ips("app=web").get("web-0"), Some(&ip), "same IP");
    let after: Vec<String> = ns
        .links()
        .into_iter()
        .filter(|l| l.starts_with("ve"))
        .collect();
    assert_eq!(after, veths, "the adopted pod keeps its veth");
    c2.delete_all_pods();
    drop(c);
}
