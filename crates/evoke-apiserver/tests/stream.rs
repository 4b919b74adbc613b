//! `pods/exec` through the API server to a real node endpoint (evoke-node's
//! server on a fake tier), driven by a second real client: kube-rs, over
//! the WebSocket remote-command protocol. No root needed.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use evoke_apiserver::{Config, Server};
use evoke_runtime::{FakeRuntime, Stdio, WorkloadRuntime, WorkloadSpec};
use evoke_store::memory::MemoryBackend;
use evoke_store::Backend;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, AttachParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;

const TOKEN: &str = "stream-test-token";

struct Cluster {
    _dir: tempfile::TempDir,
    _server: evoke_apiserver::RunningServer,
    client: kube::Client,
    tier: Arc<FakeRuntime>,
}

/// An API server, a node endpoint holding pod default/p (container c,
/// running in a fake tier) and the Node and Pod objects that point at it.
async fn cluster() -> Cluster {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config::new(dir.path().join("server"));
    cfg.port = 0;
    cfg.node_token = Some(TOKEN.into());
    let store: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let server = Server::start(cfg, store).await.expect("server starts");
    let kc = Kubeconfig::read_from(&server.kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kube config");
    let client = kube::Client::try_from(config).expect("client");

    let tier = Arc::new(FakeRuntime::new("container"));
    let spec = WorkloadSpec {
        id: "u1_c_0".into(),
        labels: [
            ("io.kubernetes.pod.uid", "u1"),
            ("io.kubernetes.container.name", "c"),
            ("io.kubernetes.container.restartCount", "0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        ..Default::default()
    };
    tier.create(&spec, Stdio::default()).expect("create");
    tier.start("u1_c_0").expect("start");
    let pods = Arc::new(RwLock::new(HashMap::from([(
        "default/p".to_string(),
        "u1".to_string(),
    )])));
    let tiers = HashMap::from([(
        "container".to_string(),
        tier.clone() as Arc<dyn WorkloadRuntime>,
    )]);
    // The node's serving certificate, as a join would issue it.
    let (certs, _, serving_key) = evoke_apiserver::tls::issue_node_credentials(
        &server.credentials,
        "n1",
        &["127.0.0.1".to_string()],
    )
    .expect("node certificates");
    let endpoint_tls = evoke_node::server::EndpointTls::new(
        &server.credentials.ca_cert_pem,
        &certs.serving_cert_pem,
        &serving_key,
    )
    .expect("endpoint tls");
    let port = evoke_node::server::serve(
        "127.0.0.1:0",
        dir.path().join("node"),
        &endpoint_tls,
        pods,
        tiers,
    )
    .await
    .expect("node endpoint");

    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
        "status": {
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": port}}
        }
    }))
    .expect("node");
    nodes
        .create(&Default::default(), &node)
        .await
        .expect("create node");
    nodes
        .replace_status("n1", &Default::default(), &node)
        .await
        .expect("node status");
    let api: Api<Pod> = Api::default_namespaced(client.clone());
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox"}]}
    }))
    .expect("pod");
    api.create(&Default::default(), &pod)
        .await
        .expect("create pod");
    Cluster {
        _dir: dir,
        _server: server,
        client,
        tier,
    }
}

#[tokio::test]
async fn exec_is_relayed_to_the_node_and_its_exit_status_comes_back() {
    let c = cluster().await;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());

    let mut ok = pods
        .exec("p", ["true"], &AttachParams::default().stderr(false))
        .await
        .expect("exec starts");
    let status = ok.take_status().expect("status").await.expect("a status");
    assert_eq!(status.status.as_deref(), Some("Success"));
    ok.join().await.expect("session ends");

    c.tier.set_exec_code(3);
    let mut failed = pods
        .exec(
            "p",
            ["sh", "-c", "exit 3"],
            &AttachParams::default().stderr(false),
        )
        .await
        .expect("exec starts");
    let status = failed
        .take_status()
        .expect("status")
        .await
        .expect("a status");
    assert_eq!(status.reason.as_deref(), Some("NonZeroExitCode"));
    let causes = status.details.and_then(|d| d.causes).unwrap_or_default();
    assert_eq!(causes[0].reason.as_deref(), Some("ExitCode"));
    assert_eq!(causes[0].message.as_deref(), Some("3"));
    failed.join().await.expect("session ends");

    // The node ran exactly the commands asked for.
    let execs: Vec<Vec<String>> = c
        .tier
        .calls()
        .into_iter()
        .filter_map(|call| match call {
            evoke_runtime::FakeCall::Exec(id, spec) => {
                assert_eq!(id, "u1_c_0");
                Some(spec.command)
            }
            _ => None,
        })
        .collect();
    assert_eq!(execs, vec![vec!["true"], vec!["sh", "-c", "exit 3"]]);
}

#[tokio::test]
async fn exec_errors_arrive_as_statuses_before_any_upgrade() {
    let c = cluster().await;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    let err = |e: kube::Error| e.to_string();

    // A container the pod does not have: the API server's own check.
    let e = pods
        .exec("p", ["true"], &AttachParams::default().container("zz"))
        .await
        .map(|_| ())
        .map_err(err)
        .expect_err("no container zz");
    assert!(e.contains("container zz is not valid for pod p"), "{e}");

    // A container that is not running: the node's check, passed on.
    c.tier.remove("u1_c_0", true).expect("remove");
    let e = pods
        .exec("p", ["true"], &AttachParams::default())
        .await
        .map(|_| ())
        .map_err(err)
        .expect_err("not running");
    assert!(e.contains("container c in pod p is not running"), "{e}");

    // No such pod.
    let e = pods
        .exec("nope", ["true"], &AttachParams::default())
        .await
        .map(|_| ())
        .map_err(err)
        .expect_err("no pod");
    assert!(e.contains("not found"), "{e}");
}
