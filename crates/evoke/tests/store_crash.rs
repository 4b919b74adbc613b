//! The store end to end: `kill -9` of `evoke server` in the middle of a
//! write burst through the API loses no write the API acknowledged, and
//! `--datastore-endpoint` keeps the cluster state in etcd.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{require_kubectl, start_server_in, KUBECTL};

const OBJECTS: usize = 400;

#[test]
fn kill_9_of_the_server_mid_burst_loses_no_acknowledged_object() {
    if !require_kubectl() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server_in(dir.path(), &[]);
    let kubeconfig = server.kubeconfig.clone();

    // One file of many ConfigMaps: kubectl creates them one by one and
    // prints "configmap/NAME created" after each acknowledged POST.
    let mut manifest = String::new();
    for i in 0..OBJECTS {
        manifest.push_str(&format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: burst-{i}\n  namespace: default\ndata:\n  n: \"{i}\"\n"
        ));
    }
    let file = dir.path().join("burst.yaml");
    std::fs::write(&file, manifest).expect("write manifest");
    let mut kubectl = Command::new(KUBECTL)
        .env("KUBECONFIG", &kubeconfig)
        .env("HOME", dir.path())
        .args(["--request-timeout", "20s", "create", "-f"])
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kubectl");
    let stdout = kubectl.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut acked = Vec::new();
    let take = |line: String, acked: &mut Vec<String>| {
        if let Some(name) = line
            .strip_prefix("configmap/")
            .and_then(|l| l.strip_suffix(" created"))
        {
            acked.push(name.to_owned());
        }
    };
    let started = Instant::now();
    while acked.len() < 60 && started.elapsed() < Duration::from_secs(60) {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            take(line, &mut acked);
        }
    }
    assert!(!acked.is_empty(), "the burst got going before the kill");
    server.stop(); // SIGKILL, mid-burst
    for line in rx.iter() {
        take(line, &mut acked);
    }
    reader.join().expect("reader thread");
    let _ = kubectl.wait();
    assert!(
        acked.len() < OBJECTS,
        "the kill landed mid-burst ({} of {OBJECTS} acknowledged)",
        acked.len()
    );

    let server = start_server_in(dir.path(), &[]);
    let names = server.ok(&["get", "configmaps", "-n", "default", "-o", "name"]);
    for name in &acked {
        assert!(
            names.lines().any(|l| l == format!("configmap/{name}")),
            "acknowledged configmap {name} was lost after kill -9\n{}",
            server.log_tail()
        );
    }
    // The store is consistent: it takes new writes and reads them back.
    server.ok_with(
        &["create", "-f", "-"],
        Some("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: after-crash\n  namespace: default\n"),
    );
    let got = server.ok(&[
        "get",
        "configmap",
        "after-crash",
        "-n",
        "default",
        "-o",
        "name",
    ]);
    assert_eq!(got.trim(), "configmap/after-crash");
}

#[test]
fn server_on_etcd_keeps_cluster_state_in_etcd_not_in_the_data_dir() {
    if !require_kubectl() {
        return;
    }
    if evoke_store::etcd::LocalEtcd::binary().is_none() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("etcd is not installed but CI=true: scripts/setup installs etcd-server");
        }
        eprintln!("skipping: etcd is not installed");
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let etcd = rt
        .block_on(evoke_store::etcd::LocalEtcd::start(None))
        .expect("start etcd");
    let endpoint = etcd.endpoint().to_owned();
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: in-etcd\n  namespace: default\ndata:\n  k: v\n";

    let first = tempfile::tempdir().expect("tempdir");
    let server = start_server_in(first.path(), &["--datastore-endpoint", &endpoint]);
    server.ok_with(&["create", "-f", "-"], Some(cm));
    assert!(
        !first.path().join("server/db/state.db").exists(),
        "no SQLite store when etcd is chosen"
    );
    server.stop();

    // A second server with an empty data dir, on the same etcd, sees it.
    let second = tempfile::tempdir().expect("tempdir");
    let server = start_server_in(second.path(), &["--datastore-endpoint", &endpoint]);
    let v = server.ok(&[
        "get",
        "configmap",
        "in-etcd",
        "-n",
        "default",
        "-o",
        "jsonpath={.data.k}",
    ]);
    assert_eq!(v, "v");
    drop(server);
    drop(etcd);
}
