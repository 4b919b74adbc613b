//! `evoke server` start-up, TLS and authentication, driven by the real kubectl.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{require_kubectl, start_server, start_server_in, Server};

/// A kubeconfig for `server` with its CA (TLS verified) and `user` YAML.
fn kubeconfig_with_user(server: &Server, user: &str, path: &Path) {
    let ca = server.ok(&[
        "config",
        "view",
        "--raw",
        "-o",
        "jsonpath={.clusters[0].cluster.certificate-authority-data}",
    ]);
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority-data: {ca}\nusers:\n- name: u\n  user: {user}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\n",
        server.port
    );
    std::fs::write(path, text).expect("write kubeconfig");
}

fn kubectl_as(kubeconfig: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(common::KUBECTL)
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .output()
        .expect("kubectl")
}

#[test]
fn fresh_server_is_ready_within_a_second_and_lists_default_namespaces() {
    if !require_kubectl() {
        return;
    }
    // Under a loaded CI machine one start may be slow; the best of three
    // says what the server itself needs.
    let mut s = start_server();
    let mut best = s.startup;
    for _ in 0..2 {
        if best < Duration::from_secs(1) {
            break;
        }
        s = start_server();
        best = best.min(s.startup);
    }
    assert!(best < Duration::from_secs(1), "start-up took {best:?}");
    let out = s.ok(&["get", "ns", "-o", "name"]);
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert!(out.contains(&format!("namespace/{ns}")), "{out}");
    }
    let svc = s.ok(&[
        "get",
        "svc",
        "kubernetes",
        "-n",
        "default",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    assert_eq!(svc, "10.43.0.1");
    let mode = std::fs::metadata(&s.kubeconfig)
        .expect("kubeconfig")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let version = s.ok(&["version", "-o", "json"]);
    assert!(version.contains("\"minor\": \"32\""), "{version}");
}

#[test]
fn requests_without_or_with_wrong_credentials_get_401() {
    if !require_kubectl() {
        return;
    }
    let s = start_server();
    let dir = tempfile::tempdir().expect("tempdir");
    // (With no credentials at all kubectl prompts for a password; the kube
    // crate test covers that case.) Basic auth is not accepted.
    let none = dir.path().join("basic");
    kubeconfig_with_user(&s, "{username: admin, password: admin}", &none);
    let out = kubectl_as(&none, &["get", "ns"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must be logged in"), "{err}");

    let wrong = dir.path().join("wrong");
    kubeconfig_with_user(&s, "{token: not-the-token}", &wrong);
    let out = kubectl_as(&wrong, &["get", "ns"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("must be logged in"),
        "{err}"
    );

    // The right token works, and never shows up in the server's log.
    let token = std::fs::read_to_string(s.data_dir.join("server/tls/token")).expect("token file");
    let right = dir.path().join("right");
    kubeconfig_with_user(&s, &format!("{{token: {token}}}"), &right);
    let out = kubectl_as(&right, &["get", "ns", "default"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(s.data_dir.join("server.log")).expect("log");
    assert!(!log.contains(token.trim()), "the token leaked into the log");
}

#[test]
fn restart_on_the_same_data_dir_reuses_ca_and_credentials() {
    if !require_kubectl() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let s = start_server_in(dir.path(), &[]);
    let ca1 = std::fs::read_to_string(dir.path().join("server/tls/server-ca.crt")).expect("ca");
    let kc1 = std::fs::read_to_string(&s.kubeconfig).expect("kubeconfig");
    s.stop();
    let s = start_server_in(dir.path(), &[]);
    let ca2 = std::fs::read_to_string(dir.path().join("server/tls/server-ca.crt")).expect("ca");
    assert_eq!(ca1, ca2);
    // The old kubeconfig's credentials still work; only the port differs.
    let old = dir.path().join("old.kubeconfig");
    let port_line = |k: &str| {
        k.lines()
            .find(|l| l.contains("server: https://"))
            .map(String::from)
            .expect("server line")
    };
    let kc2 = std::fs::read_to_string(&s.kubeconfig).expect("kubeconfig");
    std::fs::write(&old, kc1.replace(&port_line(&kc1), &port_line(&kc2))).expect("write");
    let out = kubectl_as(&old, &["get", "ns", "default"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kubeconfig_path_mode_and_token_flags_are_honoured() {
    if !require_kubectl() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = dir.path().join("my.kubeconfig");
    let kc_str = kc.to_str().expect("utf-8 path");
    let s = start_server_in(
        dir.path(),
        &[
            "--write-kubeconfig",
            kc_str,
            "--write-kubeconfig-mode",
            "0644",
            "--token",
            "fixed-token-1",
        ],
    );
    assert_eq!(s.kubeconfig, kc);
    let mode = std::fs::metadata(&kc)
        .expect("kubeconfig")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
    // --token is the join secret (as k3s's): it goes into the join token,
    // and the API knows it (403, not 401) but grants it nothing beyond
    // joining a node.
    // (written just after the API comes up)
    let join_path = dir.path().join("server/node-token");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !join_path.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let join = std::fs::read_to_string(&join_path).expect("join token");
    assert!(join.trim().ends_with("::server:fixed-token-1"), "{join}");
    let tokpath = dir.path().join("tok.kubeconfig");
    kubeconfig_with_user(&s, "{token: fixed-token-1}", &tokpath);
    let out = kubectl_as(&tokpath, &["get", "ns", "kube-system"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("Forbidden"), "{err}");
}

#[test]
fn objects_survive_a_restart_on_the_embedded_sqlite_store() {
    if !require_kubectl() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let s = start_server_in(dir.path(), &[]);
    s.ok(&["create", "namespace", "keep"]);
    s.stop();
    let s = start_server_in(dir.path(), &[]);
    let out = s.ok(&["get", "ns", "keep", "-o", "name"]);
    assert_eq!(out.trim(), "namespace/keep");
}

#[test]
fn datastore_endpoint_runs_the_server_on_etcd() {
    if !require_kubectl() {
        return;
    }
    if evoke_store::etcd::LocalEtcd::binary().is_none() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("etcd is not installed; scripts/setup installs etcd-server");
        }
        eprintln!("skipping: etcd is not installed");
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let etcd = rt
        .block_on(evoke_store::etcd::LocalEtcd::start(None))
        .expect("etcd starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoint = etcd.endpoint().to_string();
    let s = start_server_in(dir.path(), &["--datastore-endpoint", &endpoint]);
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: in-etcd\ndata:\n  a: \"1\"\n";
    s.ok_with(&["apply", "-f", "-"], Some(cm));
    s.stop();
    let s = start_server_in(dir.path(), &["--datastore-endpoint", &endpoint]);
    assert_eq!(
        s.ok(&["get", "cm", "in-etcd", "-o", "jsonpath={.data.a}"]),
        "1"
    );
    drop(s);
    drop(etcd);
}

#[test]
fn sigterm_stops_the_server_promptly_and_a_restart_adopts_its_running_pod() {
    if !common::require_pods() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    common::build_image(tmp.path(), "busybox:1");
    let mut server = common::start_cluster_in(tmp.path(), &[]);
    server.run_pod(
        "sleeper",
        "apiVersion: v1
kind: Pod
metadata: {name: sleeper}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {name: main, image: busybox:1, command: [/bin/sleep, '3600']}
",
    );
    // A watch stays open until the server closes it.
    let mut watch = std::process::Command::new(common::KUBECTL)
        .env("KUBECONFIG", &server.kubeconfig)
        .env("HOME", &server.data_dir)
        .args(["get", "pods", "--watch"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn kubectl --watch");
    let mut out = std::io::BufReader::new(watch.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).expect("watch output");
    assert!(line.contains("NAME"), "watch printed {line:?}");

    // The server must stop even though the agent has blocking work in
    // flight for the running container.
    let status = server.terminate(Duration::from_secs(20));
    let _ = watch.kill();
    let _ = watch.wait();
    let status = status.expect("evoke server still running 20 s after SIGTERM");
    assert!(status.success(), "evoke server exited with {status}");
    drop(server);

    // The workload outlived the server; the next start adopts it.
    let server = common::start_cluster_in(tmp.path(), &[]);
    server.wait_for("the pod adopted as Running with no restart", 30, || {
        let p = server.pod("sleeper");
        p["status"]["phase"] == "Running"
            && p["status"]["containerStatuses"][0]["restartCount"] == 0
    });
}

#[test]
fn serving_certificate_covers_the_kubernetes_service_names_pods_dial() {
    if !require_kubectl() {
        return;
    }
    let server = start_server();
    for name in [
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "10.43.0.1",
    ] {
        server.ok(&["--tls-server-name", name, "get", "namespaces"]);
    }
    // TLS verification is real: a name the certificate lacks is refused.
    let err = server.fails(
        &["--tls-server-name", "not-this.example", "get", "namespaces"],
        None,
    );
    assert!(err.contains("certificate"), "unexpected error: {err}");
}

#[test]
fn an_invalid_node_name_is_a_one_line_error_before_the_server_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_evoke"))
        .arg("--data-dir")
        .arg(dir.path())
        .args([
            "server",
            "--https-listen-port",
            "0",
            "--node-name",
            "(none)",
        ])
        .env("EVOKE_FLANNEL_BACKEND", "none")
        .output()
        .expect("run evoke server");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "server started: {err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(
        err.contains("node name \"(none)\""),
        "unexpected error: {err}"
    );
    assert!(
        err.contains("--node-name"),
        "does not say what to do: {err}"
    );
}

#[test]
fn node_name_flag_names_the_servers_own_node() {
    if !common::require_pods() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = common::start_cluster_in(dir.path(), &["--node-name", "first-node"]);
    server.wait_for("node first-node registered", 30, || {
        server
            .kubectl(&["get", "node", "first-node"])
            .status
            .success()
    });
}
