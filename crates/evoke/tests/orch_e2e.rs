//! Orchestration end to end, through the built `evoke server` (with its
//! in-process node agent) and the real kubectl: Deployments that run, heal,
//! scale and roll on the container and process tiers; crash loops and OOM
//! kills reported as Kubernetes reports them; a tier that cannot run here
//! failing visibly; and running pods adopted after `kill -9` of the server.
//!
//! These tests need root (namespaces, cgroups), kubectl and the static
//! busybox. Under CI=true a missing one is a failure; elsewhere the test
//! prints why it skips.

mod common;

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

/// The cluster under test: `evoke server` with its in-process node agent
/// (see common::start_cluster_in).
type Cluster = common::Server;

fn running(pod: &Value) -> bool {
    pod["status"]["phase"] == "Running"
        && pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["containerStatuses"]
            .as_array()
            .is_some_and(|cs| cs.iter().all(|c| c["ready"] == true))
}

fn count_running(c: &Cluster, selector: &str) -> usize {
    c.pods(selector).iter().filter(|p| running(p)).count()
}

/// Host pids of a pod's container processes (found through the cgroup
/// named after the workload, which carries the pod uid).
fn container_pids(pod_uid: &str, container: &str) -> Vec<i32> {
    let needle = format!("/{pod_uid}_{container}_");
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cg = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        if cg.lines().any(|l| l.contains(&needle)) {
            pids.push(pid);
        }
    }
    pids
}

const HTTPD: &str = "[/bin/busybox, httpd, -f, -p, '8080', -h, /www]";
/// On the host network (process tier) replicas cannot share a port.
const SLEEP: &str = "[/bin/busybox, sleep, '3600']";

fn deployment(name: &str, image: &str, replicas: u32, runtime_class: Option<&str>) -> String {
    let command = if runtime_class == Some("process") {
        SLEEP
    } else {
        HTTPD
    };
    let rc = runtime_class
        .map(|r| format!("      runtimeClassName: {r}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
{rc}      terminationGracePeriodSeconds: 2
      containers:
      - name: httpd
        image: {image}
        command: {command}
"
    )
}

#[test]
fn busybox_httpd_deployment_runs_restarts_killed_containers_replaces_deleted_pods_and_scales() {
    if !common::require_pods() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    common::build_image(tmp.path(), "busybox:1");
    let c = common::start_cluster_in(tmp.path(), &[]);
    c.ok_with(
        &["apply", "-f", "-"],
        Some(&deployment("web", "busybox:1", 3, None)),
    );
    c.wait_for("3 running web pods", 40, || {
        count_running(&c, "app=web") == 3
    });
    c.ok(&["rollout", "status", "deployment/web", "--timeout=30s"]);
    let nodes = c.json(&["get", "nodes"]);
    assert_eq!(
        nodes["items"][0]["status"]["conditions"]
            .as_array()
            .map(|a| a
                .iter()
                .any(|x| x["type"] == "Ready" && x["status"] == "True")),
        Some(true)
    );

    // Killing the container's process is a restart, counted on the pod.
    let pod = c.pods("app=web").into_iter().next().expect("a pod");
    let (name, uid) = (
        pod["metadata"]["name"].as_str().expect("name").to_string(),
        pod["metadata"]["uid"].as_str().expect("uid").to_string(),
    );
    let pids = container_pids(&uid, "httpd");
    assert!(!pids.is_empty(), "no process found for pod {name}");
    for p in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    c.wait_for("the killed container to be restarted", 30, || {
        let p = c.json(&["get", "pod", &name]);
        p["status"]["containerStatuses"][0]["restartCount"].as_i64() == Some(1) && running(&p)
    });

    // A deleted pod is replaced by its ReplicaSet.
    c.ok(&["delete", "pod", &name, "--wait=false"]);
    c.wait_for("a replacement pod", 40, || {
        let pods = c.pods("app=web");
        pods.iter().filter(|p| running(p)).count() == 3
            && pods.iter().all(|p| p["metadata"]["name"] != name.as_str())
    });

    // Scale 3 -> 5 -> 1.
    c.ok(&["scale", "deployment/web", "--replicas=5"]);
    c.wait_for("5 running pods", 40, || count_running(&c, "app=web") == 5);
    c.ok(&["scale", "deployment/web", "--replicas=1"]);
    c.wait_for("1 pod left", 40, || {
        c.pods("app=web").len() == 1 && count_running(&c, "app=web") == 1
    });
}

#[test]
fn set_image_rolls_out_completely_and_undo_brings_the_old_image_back() {
    if !common::require_pods() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    common::build_image(tmp.path(), "busybox:1");
    common::build_image(tmp.path(), "busybox:2");
    let c = common::start_cluster_in(tmp.path(), &[]);
    c.ok_with(
        &["apply", "-f", "-"],
        Some(&deployment("roll", "busybox:1", 2, None)),
    );
    c.ok(&["rollout", "status", "deployment/roll", "--timeout=40s"]);
    c.ok(&["set", "image", "deployment/roll", "httpd=busybox:2"]);
    c.ok(&["rollout", "status", "deployment/roll", "--timeout=60s"]);
    let images: Vec<String> = c
        .pods("app=roll")
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| {
            p["spec"]["containers"][0]["image"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert!(
        !images.is_empty() && images.iter().all(|i| i == "busybox:2"),
        "{images:?}"
    );
    let history = c.ok(&["rollout", "history", "deployment/roll"]);
    assert!(history.contains('1') && history.contains('2'), "{history}");
    c.ok(&["rollout", "undo", "deployment/roll"]);
    c.ok(&["rollout", "status", "deployment/roll", "--timeout=60s"]);
    let d = c.json(&["get", "deployment", "roll"]);
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "busybox:1"
    );
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "3"
    );
    c.wait_for("only busybox:1 pods", 40, || {
        let pods = c.pods("app=roll");
        pods.len() == 2
            && pods
                .iter()
                .all(|p| p["spec"]["containers"][0]["image"] == "busybox:1" && running(p))
    });
}

#[test]
fn process_tier_deployment_runs_and_a_microvm_pod_on_this_host_says_why_it_cannot_start() {
    if !common::require_pods() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    common::build_image(tmp.path(), "busybox:1");
    let c = common::start_cluster_in(tmp.path(), &[]);
    // Created by the server right after its API comes up.
    c.wait_for("the three tier RuntimeClasses", 20, || {
        let names = c.ok(&["get", "runtimeclass", "-o", "name"]);
        ["process", "container", "microvm"]
            .iter()
            .all(|rc| names.contains(&format!("runtimeclass.node.k8s.io/{rc}")))
    });
    c.ok_with(
        &["apply", "-f", "-"],
        Some(&deployment("proc", "busybox:1", 2, Some("process"))),
    );
    c.wait_for("2 running process-tier pods", 40, || {
        count_running(&c, "app=proc") == 2
    });
    let pod = c.pods("app=proc").into_iter().next().expect("pod");
    assert!(
        pod["status"]["podIP"].is_string(),
        "process pods use the host network"
    );

    let vm = "apiVersion: v1
kind: Pod
metadata: {name: vm}
spec:
  runtimeClassName: microvm
  containers:
  - {name: c, image: busybox:1, command: [sleep, '3600']}
";
    c.ok_with(&["apply", "-f", "-"], Some(vm));
    // Either the tier works here, or the pod says why it does not: never a silent Pending.
    c.wait_for("the microvm pod to run or explain itself", 30, || {
        let p = c.json(&["get", "pod", "vm"]);
        if running(&p) {
            return true;
        }
        p["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter().any(|x| {
                x["type"] == "PodReadyToStartContainers"
                    && x["status"] == "False"
                    && x["message"].as_str().is_some_and(|m| m.contains("microvm"))
            })
        })
    });
    let p = c.json(&["get", "pod", "vm"]);
    if !running(&p) {
        c.wait_for("a FailedCreatePodSandBox event", 20, || {
            c.ok(&[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=vm",
            ])
            .contains("FailedCreatePodSandBox")
        });
    }
    c.ok(&["delete", "pod", "vm", "--wait=false"]);
}

#[test]
fn crash_loop_backs_off_and_memory_hog_is_oom_killed() {
    if !common::require_pods() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    common::build_image(tmp.path(), "busybox:1");
    let c = common::start_cluster_in(tmp.path(), &[]);
    let pods = "apiVersion: v1
kind: Pod
metadata: {name: crash}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {name: c, image: busybox:1, command: [sh, -c, 'echo dying; exit 3']}
---
apiVersion: v1
kind: Pod
metadata: {name: hog}
spec:
  restartPolicy: Never
  containers:
  - name: c
    image: busybox:1
    command: [sh, -c, 'x=aaaaaaaaaaaaaaaa; while true; do x=$x$x; done']
    resources: {limits: {memory: 32Mi}}
";
    c.ok_with(&["apply", "-f", "-"], Some(pods));
    c.wait_for("CrashLoopBackOff after two restarts", 40, || {
        let p = c.json(&["get", "pod", "crash"]);
        let s = &p["status"]["containerStatuses"][0];
        s["state"]["waiting"]["reason"] == "CrashLoopBackOff"
            && s["restartCount"].as_i64().unwrap_or(0) >= 2
    });
    let p = c.json(&["get", "pod", "crash"]);
    let s = &p["status"]["containerStatuses"][0];
    assert_eq!(s["lastState"]["terminated"]["exitCode"], 3);
    assert_eq!(s["lastState"]["terminated"]["reason"], "Error");
    let msg = s["state"]["waiting"]["message"].as_str().unwrap_or("");
    assert!(
        msg.starts_with("back-off 10s") || msg.starts_with("back-off 20s"),
        "{msg}"
    );
    c.wait_for("the back-off to grow", 40, || {
        let p = c.json(&["get", "pod", "crash"]);
        p["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("back-off 20s") || m.starts_with("back-off 40s"))
    });
    c.wait_for("the hog to be OOMKilled", 30, || {
        let p = c.json(&["get", "pod", "hog"]);
        let t = &p["status"]["containerStatuses"][0]["state"]["terminated"];
        t["reason"] == "OOMKilled" && t["exitCode"] == 137
    });
    assert_eq!(c.json(&["get", "pod", "hog"])["status"]["phase"], "Failed");
    let events = c.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=crash",
    ]);
    assert!(
        events.contains("BackOff") && events.contains("Started"),
        "{events}"
    );
    // The OOM kill is also a SystemOOM event on the Node, as the kubelet's
    // OOM watcher reports it.
    c.wait_for("a SystemOOM event on the node", 20, || {
        event_reasons(&c, "Node", None).contains(&"SystemOOM".to_string())
    });
}

/// The reasons of the events about objects of `kind` (and `name`), in order.
fn event_reasons(c: &Cluster, kind: &str, name: Option<&str>) -> Vec<String> {
    let v = c.json(&[
        "get",
        "events",
        "-A",
        "--sort-by",
        ".metadata.creationTimestamp",
    ]);
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            e["involvedObject"]["kind"] == kind
                && name.is_none_or(|n| e["involvedObject"]["name"] == n)
        })
        .filter_map(|e| e["reason"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn each_pod_step_is_recorded_as_an_event_as_the_kubelet_does() {
    if !common::require_pods() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    common::build_image(tmp.path(), "busybox:1");
    let c = common::start_cluster_in(tmp.path(), &[]);
    let pods = "apiVersion: v1
kind: Pod
metadata: {name: fine}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {name: c, image: busybox:1, command: [sleep, '3600']}
---
apiVersion: v1
kind: Pod
metadata: {name: sick}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: busybox:1
    command: [sleep, '3600']
    livenessProbe: {tcpSocket: {port: 1}, periodSeconds: 1, failureThreshold: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: noimage}
spec:
  containers:
  - {name: c, image: 'nothere:1', command: [sleep, '3600']}
---
apiVersion: v1
kind: Pod
metadata: {name: noconfig}
spec:
  containers:
  - name: c
    image: busybox:1
    command: [sleep, '3600']
    env: [{name: X, valueFrom: {configMapKeyRef: {name: missing, key: k}}}]
";
    c.ok_with(&["apply", "-f", "-"], Some(pods));
    let has = |pod: &str, want: &[&str]| {
        let got = event_reasons(&c, "Pod", Some(pod));
        want.iter().all(|w| got.iter().any(|g| g == w))
    };
    c.wait_for("fine: Scheduled, Pulled, Created, Started", 30, || {
        has("fine", &["Scheduled", "Pulled", "Created", "Started"])
    });
    c.wait_for("sick: Unhealthy, then Killing for the restart", 30, || {
        has("sick", &["Unhealthy", "Killing"])
    });
    c.wait_for("noimage: ErrImageNeverPull and Failed", 30, || {
        has("noimage", &["ErrImageNeverPull", "Failed"])
    });
    c.wait_for("noconfig: Failed (the configmap is missing)", 30, || {
        has("noconfig", &["Failed"])
    });
    let v = c.json(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=noconfig",
    ]);
    assert!(
        v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["reason"] == "Failed"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("configmap \"missing\" not found"))),
        "{v}"
    );
    c.ok(&["delete", "pod", "fine", "--wait=true", "--timeout=30s"]);
    c.wait_for("fine: Killing on deletion", 20, || {
        has("fine", &["Killing"])
    });
}

#[test]
fn after_kill_9_of_the_server_a_restart_adopts_running_pods_without_duplicates() {
    if !common::require_pods() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    common::build_image(tmp.path(), "busybox:1");
    let mut c = common::start_cluster_in(tmp.path(), &[]);
    c.ok_with(
        &["apply", "-f", "-"],
        Some(&deployment("keep", "busybox:1", 3, None)),
    );
    c.wait_for("3 running pods", 40, || count_running(&c, "app=keep") == 3);
    let before: Vec<(String, String, String)> = c
        .pods("app=keep")
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap_or("").to_string(),
                p["metadata"]["uid"].as_str().unwrap_or("").to_string(),
                p["status"]["containerStatuses"][0]["containerID"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect();
    c.kill9();
    // The workloads outlive the server.
    for (name, uid, _) in &before {
        assert_eq!(
            container_pids(uid, "httpd").len(),
            1,
            "pod {name} lost its process"
        );
    }
    let c = common::start_cluster_in(tmp.path(), &[]);
    std::thread::sleep(Duration::from_secs(3));
    c.wait_for("the same 3 pods running again", 30, || {
        count_running(&c, "app=keep") == 3
    });
    let after = c.pods("app=keep");
    assert_eq!(after.len(), 3, "no pod added or lost");
    for (name, uid, cid) in &before {
        let p = after
            .iter()
            .find(|p| p["metadata"]["name"] == name.as_str())
            .unwrap_or_else(|| panic!("pod {name} is gone after the restart"));
        assert_eq!(
            p["status"]["containerStatuses"][0]["containerID"],
            cid.as_str(),
            "pod {name} was not adopted"
        );
        assert_eq!(p["status"]["containerStatuses"][0]["restartCount"], 0);
        assert_eq!(
            container_pids(uid, "httpd").len(),
            1,
            "pod {name} runs twice"
        );
    }
}

#[test]
fn pod_with_init_container_env_sources_volumes_probes_and_a_sidecar_sharing_its_network_becomes_ready(
) {
    if !common::require_pods() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    common::build_image(tmp.path(), "busybox:1");
    let c = common::start_cluster_in(tmp.path(), &[]);
    let yaml = "apiVersion: v1
kind: ConfigMap
metadata: {name: cfg}
data: {greeting: hi, file.txt: from-configmap}
---
apiVersion: v1
kind: Secret
metadata: {name: sec}
stringData: {pw: s3cret}
---
apiVersion: v1
kind: Pod
metadata: {name: feat}
spec:
  terminationGracePeriodSeconds: 1
  initContainers:
  - {name: init, image: busybox:1, command: [sh, -c, 'echo init-ran > /work/init.txt'], volumeMounts: [{name: work, mountPath: /work}]}
  containers:
  - name: main
    image: busybox:1
    command: [sh, -c, 'readlink /proc/self/ns/ipc > /work/ipc-main; echo \"$GREETING $PW $POD\" > /work/env.txt; cat /cfg/file.txt /sec/pw > /work/files.txt; exec httpd -f -p 8080 -h /work']
    env:
    - {name: GREETING, valueFrom: {configMapKeyRef: {name: cfg, key: greeting}}}
    - {name: PW, valueFrom: {secretKeyRef: {name: sec, key: pw}}}
    - {name: POD, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
    volumeMounts:
    - {name: work, mountPath: /work}
    - {name: cfg, mountPath: /cfg}
    - {name: sec, mountPath: /sec}
    readinessProbe: {httpGet: {path: /env.txt, port: 8080}, periodSeconds: 1}
    livenessProbe: {tcpSocket: {port: 8080}, periodSeconds: 2}
  - name: side
    image: busybox:1
    command: [sh, -c, 'readlink /proc/self/ns/ipc > /work/ipc-side; while true; do wget -q -O /work/side.txt http://127.0.0.1:8080/env.txt; sleep 1; done']
    volumeMounts: [{name: work, mountPath: /work}]
    readinessProbe: {exec: {command: [test, -s, /work/side.txt]}, periodSeconds: 1}
  volumes:
  - {name: work, emptyDir: {}}
  - {name: cfg, configMap: {name: cfg}}
  - {name: sec, secret: {secretName: sec}}
";
    c.ok_with(&["apply", "-f", "-"], Some(yaml));
    c.wait_for("both containers ready", 40, || {
        running(&c.json(&["get", "pod", "feat"]))
    });
    let uid = c.json(&["get", "pod", "feat"])["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    let work = tmp.path().join("pods").join(&uid).join("volumes/work");
    let read = |f: &str| std::fs::read_to_string(work.join(f)).unwrap_or_default();
    assert_eq!(read("init.txt"), "init-ran\n");
    assert_eq!(read("env.txt"), "hi s3cret feat\n");
    assert_eq!(read("files.txt"), "from-configmaps3cret");
    // The sidecar reached the main container on 127.0.0.1: one network per pod.
    assert_eq!(read("side.txt"), "hi s3cret feat\n");
    let p = c.json(&["get", "pod", "feat"]);
    assert_eq!(
        p["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"],
        0
    );
    assert_eq!(
        p["status"]["containerStatuses"][0]["restartCount"], 0,
        "liveness must not kill a healthy container"
    );
}

#[test]
fn agent_refuses_to_join_a_server_whose_ca_does_not_match_the_token() {
    if !common::require_pods() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let c = common::start_cluster_in(tmp.path(), &[]);
    // The server wrote its own join token, K10<ca sha256>::server:<secret>.
    // It is written just after the API answers, so give it a moment.
    let token_path = tmp.path().join("server/node-token");
    c.wait_for("the join token file", 20, || token_path.exists());
    let token = std::fs::read_to_string(&token_path).expect("node-token");
    let token = token.trim();
    assert!(
        token.starts_with("K10") && token.contains("::server:"),
        "{token}"
    );
    let server = std::fs::read_to_string(&c.kubeconfig)
        .expect("kubeconfig")
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: ").map(str::to_string))
        .expect("server url in kubeconfig");
    // Same secret, another CA hash: the agent must stop before sending it.
    let forged = format!(
        "K10{}::server:{}",
        "0".repeat(64),
        token.rsplit(':').next().unwrap_or("")
    );
    let agent_dir = tempfile::tempdir().expect("agent dir");
    let out = Command::new(env!("CARGO_BIN_EXE_evoke"))
        .arg("--data-dir")
        .arg(agent_dir.path())
        .args([
            "agent",
            "--server",
            &server,
            "--token",
            &forged,
            "--node-name",
            "intruder",
        ])
        .output()
        .expect("run evoke agent");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to send credentials"), "{err}");
    let nodes = c.ok(&["get", "nodes", "-o", "name"]);
    assert!(!nodes.contains("intruder"), "{nodes}");
    // A malformed token is refused before any connection.
    let out = Command::new(env!("CARGO_BIN_EXE_evoke"))
        .arg("--data-dir")
        .arg(agent_dir.path())
        .args(["agent", "--server", &server, "--token", "not-a-token"])
        .output()
        .expect("run evoke agent");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected K10"));
}
