//! The API server in-process on the memory store, driven by a second real
//! client: the `kube` crate. These tests read as the Kubernetes API
//! conventions evoke follows.

use std::sync::Arc;
use std::time::Duration;

use evoke_apiserver::{Config, RunningServer, Server};
use evoke_store::memory::MemoryBackend;
use evoke_store::Backend;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{json, Value};

struct Harness {
    _dir: tempfile::TempDir,
    server: Option<RunningServer>,
    store: Arc<dyn Backend>,
    client: kube::Client,
}

async fn kube_config(path: &std::path::Path) -> kube::Config {
    let kc = Kubeconfig::read_from(path).expect("kubeconfig parses");
    kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kube config")
}

async fn start() -> Harness {
    start_with(|_| {}).await
}

async fn start_with(tune: impl FnOnce(&mut Config)) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config::new(dir.path());
    cfg.port = 0;
    tune(&mut cfg);
    let store: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let server = Server::start(cfg, store.clone())
        .await
        .expect("server starts");
    let client = kube::Client::try_from(kube_config(&server.kubeconfig).await).expect("client");
    Harness {
        _dir: dir,
        server: Some(server),
        store,
        client,
    }
}

impl Harness {
    /// A raw request; returns the status code and the JSON body.
    async fn call(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: impl Into<Vec<u8>>,
    ) -> (u16, Value) {
        self.call_accept(method, path, content_type, "application/json", body)
            .await
    }

    async fn call_accept(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        accept: &str,
        body: impl Into<Vec<u8>>,
    ) -> (u16, Value) {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", content_type)
            .header("accept", accept)
            .body(kube::client::Body::from(body.into()))
            .expect("request");
        let resp = self.client.send(req).await.expect("response");
        let code = resp.status().as_u16();
        let bytes = resp.into_body().collect_bytes().await.expect("body");
        (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn json(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        self.call(method, path, "application/json", body.to_string())
            .await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, "application/json", Vec::new()).await
    }
}

fn cm(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}, "data": {"k": "v"}})
}

const CMS: &str = "/api/v1/namespaces/default/configmaps";

#[tokio::test]
async fn kube_client_creates_lists_and_watches_a_configmap() {
    let h = start().await;
    let api: Api<ConfigMap> = Api::namespaced(h.client.clone(), "default");
    let obj: ConfigMap = serde_json::from_value(cm("one", json!({"app": "a"}))).expect("cm");
    let created = api
        .create(&PostParams::default(), &obj)
        .await
        .expect("create");
    let rv = created.metadata.resource_version.clone().expect("rv");
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());

    let list = api
        .list(&ListParams::default().labels("app=a"))
        .await
        .expect("list");
    assert_eq!(list.items.len(), 1);

    let mut stream = api
        .watch(&WatchParams::default().timeout(10), &rv)
        .await
        .expect("watch")
        .boxed();
    let mut two = obj.clone();
    two.metadata.name = Some("two".into());
    api.create(&PostParams::default(), &two)
        .await
        .expect("create two");
    let ev = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .expect("event in time")
        .expect("stream ok")
        .expect("an event");
    match ev {
        WatchEvent::Added(c) => assert_eq!(c.metadata.name.as_deref(), Some("two")),
        other => panic!("expected ADDED, got {other:?}"),
    }
    api.delete("two", &Default::default())
        .await
        .expect("delete");
    let ev = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .expect("event in time")
        .expect("stream ok")
        .expect("an event");
    assert!(matches!(ev, WatchEvent::Deleted(_)), "{ev:?}");
}

#[tokio::test]
async fn requests_without_credentials_are_401_status() {
    let h = start().await;
    let mut cfg = kube_config(&h.server.as_ref().expect("server").kubeconfig).await;
    cfg.auth_info = Default::default();
    let anon = kube::Client::try_from(cfg).expect("client");
    let api: Api<ConfigMap> = Api::namespaced(anon, "default");
    match api.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 401),
        other => panic!("expected 401, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_input_gets_the_status_kube_apiserver_gives() {
    let h = start().await;
    let (c, s) = h.call("POST", CMS, "application/json", "{not json").await;
    assert_eq!((c, s["kind"].as_str()), (400, Some("Status")));
    assert_eq!(h.get("/api/v1/namespaces/default/widgets").await.0, 404);
    assert_eq!(h.get("/apis/nope.io/v1").await.0, 404);
    assert_eq!(h.json("POST", CMS, cm("dup", json!({}))).await.0, 201);
    let (c, s) = h.json("POST", CMS, cm("dup", json!({}))).await;
    assert_eq!((c, s["reason"].as_str()), (409, Some("AlreadyExists")));
    let (c, s) = h.json("POST", CMS, cm("Bad_Name", json!({}))).await;
    assert_eq!((c, s["reason"].as_str()), (422, Some("Invalid")));
    let big = vec![b' '; 3 * 1024 * 1024 + 10];
    assert_eq!(h.call("POST", CMS, "application/json", big).await.0, 413);
    let (c, _) = h
        .call("PATCH", &format!("{CMS}/dup"), "text/plain", "{}")
        .await;
    assert_eq!(c, 415);
    assert_eq!(h.json("PUT", CMS, cm("dup", json!({}))).await.0, 405);
    let (c, s) = h
        .call("POST", CMS, "application/vnd.kubernetes.protobuf", "k8s\0")
        .await;
    assert!(
        matches!(c, 400 | 415),
        "a truncated protobuf body is refused: {c}"
    );
    assert_eq!(s["kind"], "Status");
    // Creating in a namespace that does not exist is a 404 naming it.
    let (c, s) = h
        .json(
            "POST",
            "/api/v1/namespaces/nope/configmaps",
            cm("x", json!({})),
        )
        .await;
    assert_eq!(
        (c, s["message"].as_str()),
        (404, Some("namespaces \"nope\" not found"))
    );
}

#[tokio::test]
async fn update_with_a_stale_resource_version_is_a_conflict() {
    let h = start().await;
    let (_, created) = h.json("POST", CMS, cm("c", json!({}))).await;
    let mut first = created.clone();
    first["data"]["k"] = "2".into();
    assert_eq!(h.json("PUT", &format!("{CMS}/c"), first).await.0, 200);
    let mut stale = created;
    stale["data"]["k"] = "3".into();
    let (c, s) = h.json("PUT", &format!("{CMS}/c"), stale).await;
    assert_eq!((c, s["reason"].as_str()), (409, Some("Conflict")));
}

#[tokio::test]
async fn generate_name_uid_and_generation_follow_the_conventions() {
    let h = start().await;
    let deploy = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"generateName": "web-"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}});
    let path = "/apis/apps/v1/namespaces/default/deployments";
    let (c, d) = h.json("POST", path, deploy).await;
    assert_eq!(c, 201, "{d}");
    let name = d["metadata"]["name"]
        .as_str()
        .expect("generated name")
        .to_string();
    assert!(name.starts_with("web-") && name.len() == 9, "{name}");
    assert_eq!(d["metadata"]["generation"], 1);
    let (c, _) = h
        .call(
            "PATCH",
            &format!("{path}/{name}"),
            "application/merge-patch+json",
            json!({"metadata": {"labels": {"x": "y"}}}).to_string(),
        )
        .await;
    assert_eq!(c, 200);
    let (_, d2) = h.get(&format!("{path}/{name}")).await;
    assert_eq!(
        d2["metadata"]["generation"], 1,
        "metadata changes keep the generation"
    );
    let (c, d3) = h
        .call(
            "PATCH",
            &format!("{path}/{name}/scale"),
            "application/merge-patch+json",
            json!({"spec": {"replicas": 3}}).to_string(),
        )
        .await;
    assert_eq!(
        (c, d3["kind"].as_str(), d3["spec"]["replicas"].as_i64()),
        (200, Some("Scale"), Some(3))
    );
    let (_, d4) = h.get(&format!("{path}/{name}")).await;
    assert_eq!(
        (
            d4["spec"]["replicas"].as_i64(),
            d4["metadata"]["generation"].as_i64()
        ),
        (Some(3), Some(2))
    );
    assert_eq!(d4["metadata"]["uid"], d["metadata"]["uid"]);
    let (_, scale) = h.get(&format!("{path}/{name}/scale")).await;
    assert_eq!(scale["status"]["selector"], "app=web");
}

#[tokio::test]
async fn lists_filter_by_selectors_and_paginate_with_continue() {
    let h = start().await;
    for i in 0..7 {
        let tier = if i % 2 == 0 { "even" } else { "odd" };
        assert_eq!(
            h.json("POST", CMS, cm(&format!("c{i}"), json!({"tier": tier})))
                .await
                .0,
            201
        );
    }
    let (_, l) = h.get(&format!("{CMS}?labelSelector=tier%3Deven")).await;
    assert_eq!(l["items"].as_array().map(Vec::len), Some(4));
    let (_, l) = h
        .get(&format!("{CMS}?fieldSelector=metadata.name%3Dc3"))
        .await;
    assert_eq!(l["items"][0]["metadata"]["name"], "c3");
    let mut names = Vec::new();
    let mut cont = String::new();
    for _ in 0..10 {
        let (c, page) = h
            .get(&format!("{CMS}?limit=3&labelSelector=tier&continue={cont}"))
            .await;
        assert_eq!(c, 200, "{page}");
        for it in page["items"].as_array().expect("items") {
            names.push(it["metadata"]["name"].as_str().expect("name").to_string());
        }
        match page["metadata"]["continue"].as_str() {
            Some(t) if !t.is_empty() => cont = t.to_string(),
            _ => break,
        }
    }
    assert_eq!(names, ["c0", "c1", "c2", "c3", "c4", "c5", "c6"]);
    let (_, all) = h.get("/api/v1/configmaps").await;
    assert_eq!(all["items"].as_array().map(Vec::len), Some(7));
    // deletecollection honours the selector.
    let (c, _) = h
        .call(
            "DELETE",
            &format!("{CMS}?labelSelector=tier%3Dodd"),
            "application/json",
            "",
        )
        .await;
    assert_eq!(c, 200);
    let (_, l) = h.get(CMS).await;
    assert_eq!(l["items"].as_array().map(Vec::len), Some(4));
}

/// Reads watch events from a raw response body until `n` lines arrived.
async fn watch_lines(h: &Harness, path: &str, n: usize) -> Vec<Value> {
    let req = http::Request::builder()
        .uri(path)
        .body(kube::client::Body::empty())
        .expect("req");
    let resp = h.client.send(req).await.expect("watch");
    assert_eq!(resp.status().as_u16(), 200);
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let read = async {
        use http_body_util::BodyExt;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Some(d) = frame.data_ref() {
                buf.extend_from_slice(d);
            }
            while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                out.push(serde_json::from_slice::<Value>(&line).expect("event json"));
                if out.len() >= n {
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    out
}

#[tokio::test]
async fn watch_from_zero_replays_state_and_from_a_compacted_revision_is_gone() {
    let h = start().await;
    h.json("POST", CMS, cm("w1", json!({}))).await;
    let evs = watch_lines(
        &h,
        &format!("{CMS}?watch=1&resourceVersion=0&timeoutSeconds=5"),
        1,
    )
    .await;
    assert_eq!(evs[0]["type"], "ADDED");
    assert_eq!(evs[0]["object"]["metadata"]["name"], "w1");
    // The legacy /watch/ path works too, and sendInitialEvents ends with a bookmark.
    let evs = watch_lines(&h, "/api/v1/watch/namespaces/default/configmaps?sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=5", 2).await;
    assert_eq!(
        (evs[0]["type"].as_str(), evs[1]["type"].as_str()),
        (Some("ADDED"), Some("BOOKMARK"))
    );
    assert_eq!(
        evs[1]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    for i in 0..3 {
        h.json("POST", CMS, cm(&format!("x{i}"), json!({}))).await;
    }
    let rev = h.store.revision().await.expect("rev");
    h.store.compact(rev).await.expect("compact");
    let evs = watch_lines(&h, &format!("{CMS}?watch=true&resourceVersion=2"), 1).await;
    assert_eq!(evs[0]["type"], "ERROR");
    assert_eq!(evs[0]["object"]["code"], 410);
}

#[tokio::test]
async fn finalizers_hold_a_deleted_object_until_they_are_removed() {
    let h = start().await;
    let mut o = cm("held", json!({}));
    o["metadata"]["finalizers"] = json!(["example.com/hold"]);
    h.json("POST", CMS, o).await;
    let (c, d) = h
        .call("DELETE", &format!("{CMS}/held"), "application/json", "")
        .await;
    assert_eq!(c, 200);
    assert!(d["metadata"]["deletionTimestamp"].is_string(), "{d}");
    assert_eq!(h.get(&format!("{CMS}/held")).await.0, 200);
    let (c, _) = h
        .call(
            "PATCH",
            &format!("{CMS}/held"),
            "application/merge-patch+json",
            json!({"metadata": {"finalizers": null}}).to_string(),
        )
        .await;
    assert_eq!(c, 200);
    assert_eq!(h.get(&format!("{CMS}/held")).await.0, 404);
    // Orphan propagation adds the orphan finalizer, as kube does.
    h.json("POST", CMS, cm("orph", json!({}))).await;
    let (_, d) = h
        .json(
            "DELETE",
            &format!("{CMS}/orph"),
            json!({"propagationPolicy": "Orphan"}),
        )
        .await;
    assert_eq!(d["metadata"]["finalizers"], json!(["orphan"]));
}

fn pod(name: &str, node: Option<&str>) -> Value {
    let mut p = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
    if let Some(n) = node {
        p["spec"]["nodeName"] = n.into();
    }
    p
}

#[tokio::test]
async fn pods_on_a_node_are_deleted_gracefully_and_unscheduled_ones_at_once() {
    let h = start().await;
    let pods = "/api/v1/namespaces/default/pods";
    assert_eq!(h.json("POST", pods, pod("free", None)).await.0, 201);
    h.call("DELETE", &format!("{pods}/free"), "application/json", "")
        .await;
    assert_eq!(h.get(&format!("{pods}/free")).await.0, 404);

    h.json("POST", pods, pod("bound", None)).await;
    let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "bound"}, "target": {"kind": "Node", "name": "n1"}});
    assert_eq!(
        h.json("POST", &format!("{pods}/bound/binding"), binding.clone())
            .await
            .0,
        201
    );
    let (c, s) = h
        .json("POST", &format!("{pods}/bound/binding"), binding)
        .await;
    assert_eq!(c, 409, "{s}");
    let (_, p) = h.get(&format!("{pods}/bound")).await;
    assert_eq!(p["spec"]["nodeName"], "n1");
    let (c, d) = h
        .call("DELETE", &format!("{pods}/bound"), "application/json", "")
        .await;
    assert_eq!(c, 200);
    assert_eq!(d["metadata"]["deletionGracePeriodSeconds"], 30);
    assert_eq!(
        h.get(&format!("{pods}/bound")).await.0,
        200,
        "still there while the node stops it"
    );
    h.json(
        "DELETE",
        &format!("{pods}/bound"),
        json!({"gracePeriodSeconds": 0}),
    )
    .await;
    assert_eq!(h.get(&format!("{pods}/bound")).await.0, 404);
}

#[tokio::test]
async fn status_is_changed_only_through_the_status_subresource() {
    let h = start().await;
    let pods = "/api/v1/namespaces/default/pods";
    let (_, p) = h.json("POST", pods, pod("s", None)).await;
    let mut with_status = p.clone();
    with_status["status"] = json!({"phase": "Running"});
    let (_, after_main) = h
        .json("PUT", &format!("{pods}/s"), with_status.clone())
        .await;
    assert_ne!(after_main["status"]["phase"], "Running");
    let (c, after_status) = h
        .json("PUT", &format!("{pods}/s/status"), with_status)
        .await;
    assert_eq!(
        (c, after_status["status"]["phase"].as_str()),
        (200, Some("Running"))
    );
}

#[tokio::test]
async fn server_side_apply_creates_then_is_idempotent_and_reports_conflicts() {
    let h = start().await;
    let body = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\ndata:\n  a: \"1\"\n";
    let path = format!("{CMS}/ssa?fieldManager=alice");
    let (c, o) = h
        .call("PATCH", &path, "application/apply-patch+yaml", body)
        .await;
    assert_eq!(c, 201, "{o}");
    assert_eq!(o["metadata"]["managedFields"][0]["manager"], "alice");
    let (c, o2) = h
        .call("PATCH", &path, "application/apply-patch+yaml", body)
        .await;
    assert_eq!(c, 200);
    assert_eq!(
        o2["metadata"]["resourceVersion"],
        o["metadata"]["resourceVersion"]
    );
    let other = body.replace("\"1\"", "\"2\"");
    let (c, s) = h
        .call(
            "PATCH",
            &format!("{CMS}/ssa?fieldManager=bob"),
            "application/apply-patch+yaml",
            other.clone(),
        )
        .await;
    assert_eq!(c, 409, "{s}");
    let (c, o3) = h
        .call(
            "PATCH",
            &format!("{CMS}/ssa?fieldManager=bob&force=true"),
            "application/apply-patch+yaml",
            other,
        )
        .await;
    assert_eq!((c, o3["data"]["a"].as_str()), (200, Some("2")));
    let (c, _) = h
        .call(
            "PATCH",
            &format!("{CMS}/ssa"),
            "application/apply-patch+yaml",
            body,
        )
        .await;
    assert_eq!(c, 422, "apply needs a field manager");
}

#[tokio::test]
async fn dry_run_writes_nothing_and_tables_are_served_on_request() {
    let h = start().await;
    let (c, o) = h
        .json("POST", &format!("{CMS}?dryRun=All"), cm("dry", json!({})))
        .await;
    assert_eq!((c, o["metadata"]["name"].as_str()), (201, Some("dry")));
    assert_eq!(h.get(&format!("{CMS}/dry")).await.0, 404);
    let accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json";
    let (c, t) = h
        .call_accept(
            "GET",
            "/api/v1/namespaces",
            "application/json",
            accept,
            Vec::new(),
        )
        .await;
    assert_eq!((c, t["kind"].as_str()), (200, Some("Table")));
    assert!(t["rows"].as_array().is_some_and(|r| r.len() >= 4), "{t}");
}

#[tokio::test]
async fn discovery_serves_legacy_and_aggregated_documents() {
    let h = start().await;
    let (_, v) = h.get("/api").await;
    assert_eq!(v["versions"], json!(["v1"]));
    let accept =
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json";
    let (c, agg) = h
        .call_accept("GET", "/apis", "application/json", accept, Vec::new())
        .await;
    assert_eq!(
        (c, agg["kind"].as_str()),
        (200, Some("APIGroupDiscoveryList"))
    );
    let names: Vec<&str> = agg["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|g| g["metadata"]["name"].as_str())
        .collect();
    assert!(
        names.contains(&"apps") && names.contains(&"coordination.k8s.io"),
        "{names:?}"
    );
    let (_, apps) = h.get("/apis/apps/v1").await;
    assert_eq!(apps["groupVersion"], "apps/v1");
    let (_, version) = h.get("/version").await;
    assert_eq!(version["minor"], "32");
    assert_eq!(h.get("/readyz").await.0, 200);
    let (_, idx) = h.get("/openapi/v3").await;
    assert!(idx["paths"]["apis/apps/v1"]["serverRelativeURL"].is_string());
}

#[tokio::test]
async fn deleted_namespace_terminates_until_finalized_and_refuses_new_content() {
    let h = start().await;
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "gone"}});
    let (c, created) = h.json("POST", "/api/v1/namespaces", ns).await;
    assert_eq!(c, 201, "{created}");
    assert_eq!(created["spec"]["finalizers"], json!(["kubernetes"]));
    let (c, d) = h
        .call("DELETE", "/api/v1/namespaces/gone", "application/json", "")
        .await;
    assert_eq!(
        (c, d["status"]["phase"].as_str()),
        (200, Some("Terminating"))
    );
    let (c, _) = h
        .json(
            "POST",
            "/api/v1/namespaces/gone/configmaps",
            cm("late", json!({})),
        )
        .await;
    assert_eq!(c, 403);
    let mut fin = d.clone();
    fin["spec"]["finalizers"] = json!([]);
    let (c, _) = h.json("PUT", "/api/v1/namespaces/gone/finalize", fin).await;
    assert_eq!(c, 200);
    assert_eq!(h.get("/api/v1/namespaces/gone").await.0, 404);
    let (c, _) = h
        .call(
            "DELETE",
            "/api/v1/namespaces/default",
            "application/json",
            "",
        )
        .await;
    assert_eq!(c, 403, "default may not be deleted");
}

#[tokio::test]
async fn unknown_fields_are_refused_when_strict_and_warned_about_otherwise() {
    let h = start().await;
    let mut o = cm("strict", json!({}));
    o["bogus"] = json!(1);
    let (c, s) = h
        .json("POST", &format!("{CMS}?fieldValidation=Strict"), o.clone())
        .await;
    assert_eq!(c, 400, "{s}");
    assert!(
        s["message"]
            .as_str()
            .is_some_and(|m| m.contains("unknown field \"bogus\"")),
        "{s}"
    );
    let req = http::Request::builder()
        .method("POST")
        .uri(CMS)
        .header("content-type", "application/json")
        .body(kube::client::Body::from(o.to_string().into_bytes()))
        .expect("request");
    let resp = h.client.send(req).await.expect("response");
    assert_eq!(resp.status().as_u16(), 201);
    let warning = resp
        .headers()
        .get("warning")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        warning.starts_with("299 - ") && warning.contains("bogus"),
        "{warning}"
    );
}

#[tokio::test]
async fn openapi_documents_describe_the_served_kinds() {
    let h = start().await;
    let (c, idx) = h.get("/openapi/v3").await;
    assert_eq!(c, 200);
    let url = idx["paths"]["api/v1"]["serverRelativeURL"]
        .as_str()
        .expect("api/v1 url")
        .to_string();
    let (c, doc) = h.get(&url).await;
    assert_eq!(c, 200);
    assert!(doc["components"]["schemas"]["io.k8s.api.core.v1.Pod"].is_object());
    let (c, v2) = h.get("/openapi/v2").await;
    assert_eq!((c, v2["swagger"].as_str()), (200, Some("2.0")));
}

#[tokio::test]
async fn services_get_distinct_cluster_ips_and_node_ports() {
    let h = start().await;
    let svcs = "/api/v1/namespaces/default/services";
    let svc = |name: &str, spec: Value| json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec});
    let (c, a) = h
        .json(
            "POST",
            svcs,
            svc(
                "a",
                json!({"selector": {"app": "a"}, "ports": [{"port": 80}]}),
            ),
        )
        .await;
    assert_eq!(c, 201, "{a}");
    let (_, b) = h
        .json(
            "POST",
            svcs,
            svc(
                "b",
                json!({"type": "NodePort", "selector": {"app": "b"}, "ports": [{"port": 80}]}),
            ),
        )
        .await;
    let ip_a = a["spec"]["clusterIP"].as_str().expect("ip a").to_string();
    let ip_b = b["spec"]["clusterIP"].as_str().expect("ip b").to_string();
    assert!(
        ip_a.starts_with("10.43.") && ip_b.starts_with("10.43.") && ip_a != ip_b,
        "{ip_a} {ip_b}"
    );
    assert_ne!(
        ip_a, "10.43.0.1",
        "the kubernetes Service keeps its address"
    );
    assert_eq!(a["spec"]["clusterIPs"], json!([ip_a]));
    let np = b["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .expect("node port");
    assert!((30000..=32767).contains(&np));
    let (c, s) = h
        .json(
            "POST",
            svcs,
            svc("c", json!({"clusterIP": ip_a, "ports": [{"port": 80}]})),
        )
        .await;
    assert_eq!((c, s["reason"].as_str()), (422, Some("Invalid")), "{s}");
    let (c, d) = h
        .json(
            "POST",
            svcs,
            svc(
                "dns",
                json!({"clusterIP": "10.43.0.10", "ports": [{"port": 53, "protocol": "UDP"}]}),
            ),
        )
        .await;
    assert_eq!(
        (c, d["spec"]["clusterIP"].as_str()),
        (201, Some("10.43.0.10"))
    );
    let (c, hl) = h
        .json(
            "POST",
            svcs,
            svc(
                "headless",
                json!({"clusterIP": "None", "ports": [{"port": 80}]}),
            ),
        )
        .await;
    assert_eq!((c, hl["spec"]["clusterIP"].as_str()), (201, Some("None")));
}

#[tokio::test]
async fn cluster_ips_come_from_the_configured_service_cidr() {
    let cidr =
        evoke_apiserver::ServiceCidr::new("10.96.0.0".parse().expect("ip"), 12).expect("cidr");
    let h = start_with(|c| c.service_cidr = cidr).await;
    let svcs = "/api/v1/namespaces/default/services";
    let (c, k) = h.get(&format!("{svcs}/kubernetes")).await;
    assert_eq!(
        (c, k["spec"]["clusterIP"].as_str()),
        (200, Some("10.96.0.1"))
    );
    let svc = |name: &str, spec: Value| json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec});
    let (c, a) = h
        .json("POST", svcs, svc("a", json!({"ports": [{"port": 80}]})))
        .await;
    assert_eq!(c, 201, "{a}");
    let ip: std::net::Ipv4Addr = a["spec"]["clusterIP"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("cluster ip");
    assert!(cidr.contains(ip), "{ip} is in {cidr}");
    let (c, s) = h
        .json(
            "POST",
            svcs,
            svc(
                "b",
                json!({"clusterIP": "10.43.0.20", "ports": [{"port": 80}]}),
            ),
        )
        .await;
    assert_eq!((c, s["reason"].as_str()), (422, Some("Invalid")), "{s}");
    assert!(
        s["message"]
            .as_str()
            .unwrap_or_default()
            .contains("10.96.0.0/12"),
        "{s}"
    );
}

#[tokio::test]
async fn the_ca_is_served_without_credentials_at_cacerts() {
    let h = start().await;
    let mut cfg = kube_config(&h.server.as_ref().expect("server").kubeconfig).await;
    cfg.auth_info = Default::default();
    let anon = kube::Client::try_from(cfg).expect("client");
    let req = http::Request::builder()
        .uri("/cacerts")
        .body(kube::client::Body::empty())
        .expect("req");
    let resp = anon.send(req).await.expect("cacerts");
    assert_eq!(resp.status().as_u16(), 200);
    let body = resp.into_body().collect_bytes().await.expect("body");
    let ca = &h.server.as_ref().expect("server").credentials.ca_cert_pem;
    assert_eq!(String::from_utf8_lossy(&body), ca.as_str());
}

#[tokio::test]
async fn quiet_watches_with_bookmarks_get_the_latest_delivered_revision() {
    let h = start_with(|c| c.bookmark_interval = Duration::from_millis(200)).await;
    let (_, created) = h.json("POST", CMS, cm("b", json!({}))).await;
    let rv = created["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_string();
    let evs = watch_lines(
        &h,
        &format!("{CMS}?watch=1&allowWatchBookmarks=true&resourceVersion={rv}&timeoutSeconds=5"),
        2,
    )
    .await;
    assert_eq!(evs.len(), 2);
    for ev in &evs {
        assert_eq!(ev["type"], "BOOKMARK");
        assert_eq!(ev["object"]["kind"], "ConfigMap");
        assert_eq!(ev["object"]["metadata"]["resourceVersion"], rv.as_str());
    }
}

#[tokio::test]
async fn eviction_deletes_the_pod_with_its_options() {
    let h = start().await;
    let pods = "/api/v1/namespaces/default/pods";
    h.json("POST", pods, pod("ev", Some("n1"))).await;
    let eviction = json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "ev"},
        "deleteOptions": {"gracePeriodSeconds": 0}});
    let (c, s) = h
        .json("POST", &format!("{pods}/ev/eviction"), eviction)
        .await;
    assert_eq!(c, 201, "{s}");
    assert_eq!(h.get(&format!("{pods}/ev")).await.0, 404);
}

/// Node `name` with its endpoint at 127.0.0.1:`port`, status written
/// through /status as the node agent does.
async fn node_endpoint_at(h: &Harness, name: &str, port: u16) {
    let status = json!({"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": port}}});
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}});
    let (c, mut s) = h.json("POST", "/api/v1/nodes", node).await;
    assert_eq!(c, 201, "{s}");
    s["status"] = status;
    let (c, s) = h
        .json("PUT", &format!("/api/v1/nodes/{name}/status"), s)
        .await;
    assert_eq!(c, 200, "{s}");
}

#[tokio::test]
async fn a_node_endpoint_whose_certificate_the_cluster_ca_did_not_issue_is_not_trusted() {
    use std::sync::Arc;
    let h = start().await;
    // An impostor at the node's address with a self-signed certificate: the
    // API server gives up in the handshake, so no request reaches it.
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
    )
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    // It counts the handshakes that succeed (the client may retry a 503).
    let trusted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = trusted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            if acceptor.accept(tcp).await.is_ok() {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    node_endpoint_at(&h, "n1", port).await;
    h.json(
        "POST",
        "/api/v1/namespaces/default/pods",
        pod("p", Some("n1")),
    )
    .await;
    let (code, status) = h.get("/api/v1/namespaces/default/pods/p/log").await;
    assert_eq!(code, 500, "{status}");
    let msg = status["message"].as_str().unwrap_or_default();
    assert!(msg.contains("tls with node n1"), "{msg}");
    assert_eq!(trusted.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn pod_logs_are_proxied_over_tls_from_the_node_endpoint_with_the_kubelet_client_certificate()
{
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = start().await;
    let creds = h.server.as_ref().expect("server").credentials.clone();
    // A stand-in node endpoint with the serving certificate a join issues
    // for 127.0.0.1: it requires a client certificate from the cluster CA
    // and answers one request with the client's common name.
    let (certs, _, serving_key) =
        evoke_apiserver::tls::issue_node_credentials(&creds, "n1", &["127.0.0.1".to_string()])
            .expect("node certificates");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut creds.ca_cert_pem.as_bytes()) {
        roots.add(c.expect("ca")).expect("root");
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .expect("verifier");
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            rustls_pemfile::certs(&mut certs.serving_cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("cert"),
            rustls_pemfile::private_key(&mut serving_key.as_bytes())
                .expect("key")
                .expect("a key"),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let node = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut s = acceptor
            .accept(tcp)
            .await
            .expect("tls with a client certificate");
        let client = s.get_ref().1.peer_certificates().map(|c| c.len());
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.expect("read");
        let req = String::from_utf8_lossy(&buf[..n]).to_string();
        let body = "hello from c\n";
        let resp = format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
        s.write_all(resp.as_bytes()).await.expect("write");
        let _ = s.shutdown().await;
        assert_eq!(client, Some(1), "the api server presented its certificate");
        req.lines().next().unwrap_or_default().to_string()
    });
    node_endpoint_at(&h, "n1", port).await;
    h.json(
        "POST",
        "/api/v1/namespaces/default/pods",
        pod("logged", Some("n1")),
    )
    .await;
    let req = http::Request::builder()
        .uri("/api/v1/namespaces/default/pods/logged/log?tailLines=5")
        .body(kube::client::Body::empty())
        .expect("req");
    let resp = h.client.send(req).await.expect("log");
    assert_eq!(resp.status().as_u16(), 200);
    let body = resp.into_body().collect_bytes().await.expect("body");
    assert_eq!(String::from_utf8_lossy(&body), "hello from c\n");
    let line = node.await.expect("node task");
    assert_eq!(
        line,
        "GET /containerLogs/default/logged/c?tailLines=5 HTTP/1.1"
    );
}

#[tokio::test]
async fn namespaces_get_a_default_service_account_and_the_api_is_advertised_as_a_service() {
    let h = start().await;
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}});
    assert_eq!(h.json("POST", "/api/v1/namespaces", ns).await.0, 201);
    assert_eq!(
        h.get("/api/v1/namespaces/team/serviceaccounts/default")
            .await
            .0,
        200
    );
    assert_eq!(
        h.get("/api/v1/namespaces/kube-system/serviceaccounts/default")
            .await
            .0,
        200
    );
    let port = h.server.as_ref().expect("server").addr.port();
    let (c, ep) = h
        .get("/api/v1/namespaces/default/endpoints/kubernetes")
        .await;
    assert_eq!(c, 200);
    assert_eq!(ep["subsets"][0]["ports"][0]["port"], port);
    let (c, slice) = h
        .get("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/kubernetes")
        .await;
    assert_eq!(
        (c, slice["ports"][0]["port"].as_u64()),
        (200, Some(u64::from(port)))
    );
}

#[tokio::test]
async fn hostile_requests_get_statuses_and_the_server_keeps_serving() {
    let h = start().await;
    h.json("POST", CMS, cm("t", json!({}))).await;
    let long = "a".repeat(300);
    let cases: Vec<(&str, String, &str, Vec<u8>)> = vec![
        ("GET", format!("{CMS}/{long}"), "application/json", vec![]),
        (
            "GET",
            format!("{CMS}?limit=-5&continue=%%%"),
            "application/json",
            vec![],
        ),
        (
            "GET",
            format!("{CMS}?labelSelector=a%20in%20(b"),
            "application/json",
            vec![],
        ),
        (
            "GET",
            format!("{CMS}?watch=1&resourceVersion=abc"),
            "application/json",
            vec![],
        ),
        (
            "GET",
            format!("{CMS}?fieldSelector=%3D%3D"),
            "application/json",
            vec![],
        ),
        (
            "POST",
            CMS.to_string(),
            "application/json",
            b"[1,2,3]".to_vec(),
        ),
        (
            "POST",
            CMS.to_string(),
            "application/json",
            b"null".to_vec(),
        ),
        (
            "POST",
            CMS.to_string(),
            "application/yaml",
            b"kind: [".to_vec(),
        ),
        (
            "POST",
            CMS.to_string(),
            "application/json",
            br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":"x"}"#.to_vec(),
        ),
        (
            "POST",
            CMS.to_string(),
            "application/json",
            br#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"x"}}"#.to_vec(),
        ),
        (
            "PUT",
            format!("{CMS}/t"),
            "application/json",
            br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"other"}}"#.to_vec(),
        ),
        (
            "PATCH",
            format!("{CMS}/t"),
            "application/json-patch+json",
            br#"[{"op":"remove","path":"/nope/x"}]"#.to_vec(),
        ),
        (
            "PATCH",
            format!("{CMS}/t"),
            "application/json-patch+json",
            br#"{"op":"add"}"#.to_vec(),
        ),
        (
            "PATCH",
            format!("{CMS}/t"),
            "application/merge-patch+json",
            br#"{"metadata":{"name":"renamed"}}"#.to_vec(),
        ),
        (
            "PATCH",
            format!("{CMS}/t?fieldManager=x"),
            "application/apply-patch+yaml",
            b"- a\n- b\n".to_vec(),
        ),
        (
            "DELETE",
            format!("{CMS}/t"),
            "application/json",
            br#"{"propagationPolicy":"Sideways"}"#.to_vec(),
        ),
        (
            "DELETE",
            format!("{CMS}/t"),
            "application/json",
            br#"{"preconditions":{"uid":"nope"}}"#.to_vec(),
        ),
        (
            "POST",
            "/api/v1/namespaces/default/pods/none/binding".to_string(),
            "application/json",
            b"{}".to_vec(),
        ),
        (
            "GET",
            "/api/v1/namespaces/default/pods/none/log".to_string(),
            "application/json",
            vec![],
        ),
        (
            "OPTIONS",
            "/api/v1/namespaces".to_string(),
            "application/json",
            vec![],
        ),
        (
            "GET",
            "/apis/apps/v1/namespaces/default/deployments/none/scale".to_string(),
            "application/json",
            vec![],
        ),
    ];
    for (method, path, ct, body) in cases {
        let (c, s) = h.call(method, &path, ct, body).await;
        assert!((400..500).contains(&c), "{method} {path}: {c} {s}");
        if !path.contains("watch=1") {
            assert_eq!(s["kind"], "Status", "{method} {path}: {s}");
        }
    }
    assert_eq!(
        h.get(&format!("{CMS}/t")).await.0,
        200,
        "still serving, object intact"
    );
}

#[tokio::test]
async fn put_creates_a_missing_lease_but_not_a_missing_configmap() {
    let h = start().await;
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "n1"},
        "spec": {"holderIdentity": "n1", "leaseDurationSeconds": 40}});
    let path = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n1";
    let (c, l) = h.json("PUT", path, lease).await;
    assert_eq!(c, 201, "{l}");
    assert_eq!(
        h.json("PUT", &format!("{CMS}/missing"), cm("missing", json!({})))
            .await
            .0,
        404
    );
}

#[tokio::test]
async fn metadata_only_clients_get_partial_object_metadata() {
    use k8s_openapi::api::core::v1::ConfigMap as Cm;
    let h = start().await;
    h.json("POST", CMS, cm("meta", json!({"app": "m"}))).await;
    let api: Api<Cm> = Api::namespaced(h.client.clone(), "default");
    let list = api
        .list_metadata(&ListParams::default())
        .await
        .expect("list_metadata");
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].metadata.name.as_deref(), Some("meta"));
    let accept = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1";
    let (c, one) = h
        .call_accept(
            "GET",
            &format!("{CMS}/meta"),
            "application/json",
            accept,
            Vec::new(),
        )
        .await;
    assert_eq!(
        (c, one["kind"].as_str()),
        (200, Some("PartialObjectMetadata"))
    );
    assert!(one.get("data").is_none());
}

#[tokio::test]
async fn a_created_pod_or_deployment_starts_without_the_status_its_body_carried() {
    let h = start().await;
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Running", "reason": "CreateContainerConfigError",
            "containerStatuses": [{"name": "c", "ready": true, "restartCount": 4, "image": "busybox", "imageID": "",
                "state": {"running": {}}}]}});
    let (c, p) = h.json("POST", "/api/v1/namespaces/default/pods", pod).await;
    assert_eq!(c, 201, "{p}");
    assert_eq!(
        p["status"],
        json!({"phase": "Pending", "qosClass": "BestEffort"}),
        "{p}"
    );
    let deploy = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"selector": {"matchLabels": {"app": "d"}},
            "template": {"metadata": {"labels": {"app": "d"}}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}},
        "status": {"replicas": 7, "readyReplicas": 7}});
    let (c, d) = h
        .json(
            "POST",
            "/apis/apps/v1/namespaces/default/deployments",
            deploy,
        )
        .await;
    assert_eq!(c, 201, "{d}");
    assert!(d["status"]["replicas"].is_null(), "{d}");
    // A Node keeps the status it registers with.
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"},
        "status": {"capacity": {"cpu": "2"}}});
    let (c, n) = h.json("POST", "/api/v1/nodes", node).await;
    assert_eq!(
        (c, &n["status"]["capacity"]["cpu"]),
        (201, &json!("2")),
        "{n}"
    );
}
