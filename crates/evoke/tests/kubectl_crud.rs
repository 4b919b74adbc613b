//! The real kubectl against `evoke server`: create, apply, get in every
//! output format, describe, label, annotate, patch, scale, edit, delete,
//! get -w, wait, server-side apply, and kube's error messages.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{require_kubectl, start_server, KUBECTL};

const CM: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: demo\n  labels: {app: web}\ndata:\n  a: \"1\"\n";

const DEPLOY: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 1
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: c
        image: busybox
        command: [sleep, \"3600\"]
";

#[test]
fn apply_twice_is_unchanged_and_a_changed_field_updates_through_the_three_way_merge() {
    if !require_kubectl() {
        return;
    }
    let s = start_server();
    let out = s.ok_with(&["apply", "-f", "-"], Some(CM));
    assert!(out.contains("configmap/demo created"), "{out}");
    let out = s.ok_with(&["apply", "-f", "-"], Some(CM));
    assert!(out.contains("configmap/demo unchanged"), "{out}");
    // A label added by someone else survives the next apply.
    s.ok(&["label", "cm", "demo", "extra=kept"]);
    let changed = CM.replace("\"1\"", "\"2\"");
    let out = s.ok_with(&["apply", "-f", "-"], Some(&changed));
    assert!(out.contains("configmap/demo configured"), "{out}");
    let v = s.ok(&[
        "get",
        "cm",
        "demo",
        "-o",
        "jsonpath={.data.a} {.metadata.labels.extra}",
    ]);
    assert_eq!(v, "2 kept");
    // Dropping a field from the file removes it from the object, and
    // leaves what others set.
    let two = changed.replace("{app: web}", "{app: web, tier: fe}");
    s.ok_with(&["apply", "-f", "-"], Some(&two));
    s.ok_with(&["apply", "-f", "-"], Some(&changed));
    let v = s.ok(&["get", "cm", "demo", "-o", "jsonpath={.metadata.labels}"]);
    assert!(
        !v.contains("tier") && v.contains("extra") && v.contains("app"),
        "{v}"
    );
}

#[test]
fn get_prints_yaml_json_wide_jsonpath_and_describe() {
    if !require_kubectl() {
        return;
    }
    let s = start_server();
    s.ok_with(&["create", "-f", "-"], Some(CM));
    let yaml = s.ok(&["get", "cm", "demo", "-o", "yaml"]);
    assert!(
        yaml.contains("kind: ConfigMap") && yaml.contains("resourceVersion:"),
        "{yaml}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&s.ok(&["get", "cm", "-o", "json"])).expect("json");
    assert_eq!(json["items"][0]["metadata"]["name"], "demo");
    let table = s.ok(&["get", "cm", "demo"]);
    assert!(
        table.starts_with("NAME") && table.contains("DATA") && table.contains("demo"),
        "{table}"
    );
    s.ok_with(&["create", "-f", "-"], Some(DEPLOY));
    let wide = s.ok(&["get", "deploy", "web", "-o", "wide"]);
    assert!(
        wide.contains("CONTAINERS") && wide.contains("busybox") && wide.contains("app=web"),
        "{wide}"
    );
    let jp = s.ok(&[
        "get",
        "deploy",
        "web",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image}",
    ]);
    assert_eq!(jp, "busybox");
    let desc = s.ok(&["describe", "cm", "demo"]);
    assert!(
        desc.contains("Name:") && desc.contains("demo") && desc.contains("Data"),
        "{desc}"
    );
    let nss = s.ok(&["get", "ns"]);
    assert!(nss.contains("STATUS") && nss.contains("Active"), "{nss}");
}

#[test]
fn label_annotate_patch_scale_and_edit_change_the_object() {
    if !require_kubectl() {
        return;
    }
    let s = start_server();
    s.ok_with(&["create", "-f", "-"], Some(DEPLOY));
    s.ok(&["label", "deploy", "web", "team=a"]);
    s.ok(&["annotate", "deploy", "web", "note=hello"]);
    s.ok(&["scale", "deploy", "web", "--replicas=3"]);
    assert_eq!(
        s.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"]),
        "3"
    );
    s.ok(&["patch", "deploy", "web", "-p", r#"{"spec":{"replicas":2}}"#]);
    s.ok(&[
        "patch",
        "deploy",
        "web",
        "--type=merge",
        "-p",
        r#"{"metadata":{"labels":{"merged":"yes"}}}"#,
    ]);
    s.ok(&[
        "patch",
        "deploy",
        "web",
        "--type=json",
        "-p",
        r#"[{"op":"add","path":"/spec/minReadySeconds","value":5}]"#,
    ]);
    let out = s.kubectl_with(
        &["edit", "deploy", "web"],
        None,
        &[(
            "KUBE_EDITOR",
            "sed -i s/minReadySeconds:\\ 5/minReadySeconds:\\ 7/",
        )],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = s.ok(&[
        "get",
        "deploy",
        "web",
        "-o",
        "jsonpath={.metadata.labels.team} {.metadata.annotations.note} {.spec.replicas} {.metadata.labels.merged} {.spec.minReadySeconds}",
    ]);
    assert_eq!(v, "a hello 2 yes 7");
    let gen = s.ok(&[
        "get",
        "deploy",
        "web",
        "-o",
        "jsonpath={.metadata.generation}",
    ]);
    assert!(
        gen.parse::<i64>().expect("generation") >= 4,
        "spec changes bump generation: {gen}"
    );
}

#[test]
fn get_watch_streams_changes_and_wait_sees_conditions_and_deletion() {
    if !require_kubectl() {
        return;
    }
    let s = start_server();
    // A sentinel object shows when the watch is running.
    s.ok(&["create", "configmap", "sentinel"]);
    let mut watcher = Command::new(KUBECTL)
        .env("KUBECONFIG", &s.kubeconfig)
        .args(["get", "cm", "-w", "--output-watch-events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl get -w");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = watcher.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen: Vec<String> = Vec::new();
    let mut wait_for = |pred: &dyn Fn(&str) -> bool, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !seen.iter().any(|l| pred(l)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => seen.push(l),
                Err(_) => panic!("no {what} from kubectl get -w; saw:\n{}", seen.join("\n")),
            }
        }
    };
    wait_for(&|l| l.contains("sentinel"), "sentinel");
    s.ok_with(&["create", "-f", "-"], Some(CM));
    wait_for(
        &|l| l.starts_with("ADDED") && l.contains("demo"),
        "ADDED demo",
    );
    s.ok(&["label", "cm", "demo", "ready=yes"]);
    wait_for(
        &|l| l.starts_with("MODIFIED") && l.contains("demo"),
        "MODIFIED demo",
    );
    let wait = s.ok(&[
        "wait",
        "--for=jsonpath={.metadata.labels.ready}=yes",
        "cm/demo",
        "--timeout=10s",
    ]);
    assert!(wait.contains("condition met"), "{wait}");
    let deleter = {
        let kubeconfig = s.kubeconfig.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            Command::new(KUBECTL)
                .env("KUBECONFIG", kubeconfig)
                .args(["delete", "cm", "demo"])
                .output()
                .expect("delete")
        })
    };
    let out = s.kubectl(&["wait", "--for=delete", "cm/demo", "--timeout=20s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    // On a slow machine the delete may land before the wait starts.
    assert!(out.status.success() || err.contains("not found"), "{err}");
    assert!(deleter.join().expect("deleter").status.success());
    wait_for(
        &|l| l.starts_with("DELETED") && l.contains("demo"),
        "DELETED demo",
    );
    let _ = watcher.kill();
    let _ = watcher.wait();
    assert_eq!(s.kubectl(&["get", "cm", "demo"]).status.code(), Some(1));
}

#[test]
fn server_side_apply_is_idempotent_and_reports_conflicts_with_other_managers() {
    if !require_kubectl() {
        return;
    }
    let s = start_server();
    let out = s.ok_with(&["apply", "--server-side", "-f", "-"], Some(CM));
    assert!(out.contains("serverside-applied"), "{out}");
    let rv = s.ok(&[
        "get",
        "cm",
        "demo",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ]);
    s.ok_with(&["apply", "--server-side", "-f", "-"], Some(CM));
    let rv2 = s.ok(&[
        "get",
        "cm",
        "demo",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ]);
    assert_eq!(rv, rv2, "a second identical apply writes nothing");
    let changed = CM.replace("\"1\"", "\"9\"");
    let err = s.fails(
        &[
            "apply",
            "--server-side",
            "--field-manager",
            "other",
            "-f",
            "-",
        ],
        Some(&changed),
    );
    assert!(err.contains("conflict"), "{err}");
    s.ok_with(
        &[
            "apply",
            "--server-side",
            "--field-manager",
            "other",
            "--force-conflicts",
            "-f",
            "-",
        ],
        Some(&changed),
    );
    assert_eq!(
        s.ok(&["get", "cm", "demo", "-o", "jsonpath={.data.a}"]),
        "9"
    );
    let mf = s.ok(&[
        "get",
        "cm",
        "demo",
        "--show-managed-fields",
        "-o",
        "jsonpath={.metadata.managedFields[*].manager}",
    ]);
    assert!(mf.contains("other"), "{mf}");
}

#[test]
fn errors_read_as_kube_apiserver_writes_them() {
    if !require_kubectl() {
        return;
    }
    let s = start_server();
    let bad = CM.replace("name: demo", "name: Bad_Name");
    let err = s.fails(&["create", "-f", "-"], Some(&bad));
    assert!(
        err.contains("is invalid") && err.contains("metadata.name"),
        "{err}"
    );
    let err = s.fails(
        &["create", "-f", "-"],
        Some("apiVersion: v1\nkind: ConfigMap\nmetadata: [oops\n"),
    );
    assert!(
        err.contains("error") && (err.contains("yaml") || err.contains("YAML")),
        "{err}"
    );
    let err = s.fails(
        &["create", "-f", "-"],
        Some("apiVersion: v1\nkind: Widget\nmetadata:\n  name: x\n"),
    );
    assert!(err.contains("no matches for kind \"Widget\""), "{err}");
    s.ok_with(&["create", "-f", "-"], Some(CM));
    let err = s.fails(&["create", "-f", "-"], Some(CM));
    assert!(
        err.contains("AlreadyExists") && err.contains("already exists"),
        "{err}"
    );
    let err = s.fails(&["get", "cm", "missing"], None);
    assert!(
        err.contains("NotFound") && err.contains("\"missing\" not found"),
        "{err}"
    );
    let err = s.fails(&["get", "widgets"], None);
    assert!(err.contains("doesn't have a resource type"), "{err}");
    let err = s.fails(&["create", "-n", "nope", "-f", "-"], Some(CM));
    assert!(err.contains("namespaces \"nope\" not found"), "{err}");
    let err = s.fails(&["delete", "ns", "default"], None);
    assert!(err.contains("forbidden"), "{err}");
    // kubectl validates on the server: unknown fields are refused by
    // default and only warned about with --validate=warn.
    let bogus = CM.replace("name: demo", "name: other") + "bogus: 1\n";
    let err = s.fails(&["create", "-f", "-"], Some(&bogus));
    assert!(
        err.contains("strict decoding error: unknown field \"bogus\""),
        "{err}"
    );
    let out = s.kubectl_with(&["create", "--validate=warn", "-f", "-"], Some(&bogus), &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Warning: unknown field \"bogus\""));
}

#[test]
fn explain_describes_every_served_kind() {
    if !require_kubectl() {
        return;
    }
    let s = start_server();
    for kind in [
        "pods",
        "deployments",
        "configmaps",
        "leases",
        "endpointslices",
        "runtimeclasses",
    ] {
        let out = s.ok(&["explain", kind]);
        assert!(
            out.contains("KIND:") && out.contains("FIELDS:"),
            "{kind}: {out}"
        );
    }
    let out = s.ok(&["explain", "deployment.spec.replicas"]);
    assert!(out.contains("<integer>"), "{out}");
}

#[test]
fn kubectl_create_generators_and_run_work_over_protobuf() {
    if !require_kubectl() {
        return;
    }
    let s = start_server();
    s.ok(&["create", "namespace", "gen"]);
    s.ok(&[
        "create",
        "configmap",
        "c",
        "-n",
        "gen",
        "--from-literal=a=b",
    ]);
    s.ok(&[
        "create",
        "secret",
        "generic",
        "s",
        "-n",
        "gen",
        "--from-literal=k=v",
    ]);
    s.ok(&[
        "create",
        "deployment",
        "d",
        "-n",
        "gen",
        "--image=busybox",
        "--",
        "sleep",
        "100",
    ]);
    s.ok(&[
        "create",
        "service",
        "clusterip",
        "svc",
        "-n",
        "gen",
        "--tcp=80:8080",
    ]);
    s.ok(&[
        "run",
        "p",
        "-n",
        "gen",
        "--image=busybox",
        "--",
        "sleep",
        "1",
    ]);
    assert_eq!(
        s.ok(&["get", "cm", "c", "-n", "gen", "-o", "jsonpath={.data.a}"]),
        "b"
    );
    assert_eq!(
        s.ok(&[
            "get",
            "secret",
            "s",
            "-n",
            "gen",
            "-o",
            "jsonpath={.data.k}"
        ]),
        "dg=="
    );
    assert_eq!(
        s.ok(&[
            "get",
            "deploy",
            "d",
            "-n",
            "gen",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].command}"
        ]),
        r#"["sleep","100"]"#
    );
    let ip = s.ok(&[
        "get",
        "svc",
        "svc",
        "-n",
        "gen",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    assert!(ip.starts_with("10.43."), "{ip}");
    assert_eq!(
        s.ok(&[
            "get",
            "pod",
            "p",
            "-n",
            "gen",
            "-o",
            "jsonpath={.spec.containers[0].image}"
        ]),
        "busybox"
    );
}
